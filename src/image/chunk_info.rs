//! The chunk-info arrays of v6 blobs (where each chunk is stored, compressed), read from the blob on first
//! use and kept. One reader loads a blob's array while the others of that blob wait; a failed load is
//! remembered for a while so an unreachable layer does not cost every reader a round of retries.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::RafsImage;
use crate::corrupt;
use crate::error::{Error, Result};
use crate::format::blob_meta::ChunkInfoArray;

/// How long a failed chunk-info array load (and a data request that found no answer, `failures.rs`) is
/// remembered: readers of that blob get the error at once for this long, then the next reader loads it
/// again. About one backend request timeout (5 s by default): an unreachable layer does not cost every
/// reader a full round of retries, and a backend that recovers is used again within seconds.
pub const FAILED_LOAD_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The chunk-info array of one v6 blob, loaded on first use by one reader while the others of that blob
/// wait for it (readers of other blobs are not held up: no lock is kept across backend I/O).
#[derive(Default)]
pub(super) struct BlobMetaSlot {
    state: Mutex<LoadState>,
    done: Condvar,
}

#[derive(Default)]
enum LoadState {
    #[default]
    Idle,
    Loading,
    Ready(Arc<ChunkInfoArray>),
    Failed {
        at: Instant,
        error: Error,
    },
}

/// Puts a slot back to `Idle` if its loader unwinds, so waiters do not wait forever.
struct Loading<'a>(Option<&'a BlobMetaSlot>);

impl Loading<'_> {
    fn finish(mut self, state: LoadState) {
        if let Some(slot) = self.0.take() {
            *slot.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
            slot.done.notify_all();
        }
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            *slot.state.lock().unwrap_or_else(|e| e.into_inner()) = LoadState::Idle;
            slot.done.notify_all();
        }
    }
}

impl RafsImage {
    /// The decoded chunk-info array of v6 blob `index`, read from the blob on first use. Concurrent first
    /// readers of one blob share one load; a failed load is remembered for [`FAILED_LOAD_RETRY_AFTER`].
    pub fn chunk_info_array(&self, index: u32) -> Result<Arc<ChunkInfoArray>> {
        let slot = self
            .blob_meta
            .get(index as usize)
            .ok_or_else(|| corrupt!("blob index {index} does not exist"))?;
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*state {
                LoadState::Ready(array) => return Ok(array.clone()),
                LoadState::Failed { at, error } if at.elapsed() < FAILED_LOAD_RETRY_AFTER => {
                    return Err(error.replay())
                }
                LoadState::Loading => {
                    state = slot.done.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                LoadState::Idle | LoadState::Failed { .. } => break,
            }
        }
        *state = LoadState::Loading;
        drop(state);
        let loading = Loading(Some(slot));
        let loaded = self.load_chunk_info_array(index).map(Arc::new);
        loading.finish(match &loaded {
            Ok(array) => LoadState::Ready(array.clone()),
            Err(e) => LoadState::Failed {
                at: Instant::now(),
                error: e.replay(),
            },
        });
        loaded
    }

    /// The chunk-info array of v6 blob `index` if it is loaded already (never loads it).
    pub(super) fn loaded_chunk_info_array(&self, index: u32) -> Option<Arc<ChunkInfoArray>> {
        let slot = self.blob_meta.get(index as usize)?;
        match &*slot.state.lock().unwrap_or_else(|e| e.into_inner()) {
            LoadState::Ready(array) => Some(array.clone()),
            _ => None,
        }
    }

    fn load_chunk_info_array(&self, index: u32) -> Result<ChunkInfoArray> {
        let blob = &self.meta.info().blobs[index as usize];
        let ci = blob
            .ci
            .ok_or_else(|| corrupt!("blob {} has no chunk-info array", blob.id))?;
        let len = ci
            .compressed_size
            .checked_add(crate::format::blob_meta::CI_HEADER_SIZE)
            .ok_or_else(|| corrupt!("blob {}: chunk-info size overflows", blob.id))?;
        // Its size was checked against the limits when the image was opened; the blob's own size is not
        // asked for (a network round trip): a range past its end is a short read.
        let raw = self
            .backend
            .read_exact_at(&blob.id, ci.offset, len as usize)
            .map_err(|e| match e {
                Error::Corrupt(m) => corrupt!(
                    "blob {}: chunk-info array at {}+{len} lies past the blob's end ({m})",
                    blob.id,
                    ci.offset
                ),
                other => other,
            })?;
        ChunkInfoArray::parse(blob, &ci, &raw)
    }
}
