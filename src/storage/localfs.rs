//! The `localfs` backend: blobs are files named by their id in a directory (or one fixed file).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::BlobBackend;
use crate::error::{Error, Result};
use crate::format::check_blob_id;

pub struct LocalFs {
    dir: Option<PathBuf>,
    alt_dirs: Vec<PathBuf>,
    blob_file: Option<PathBuf>,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl LocalFs {
    pub fn new(
        dir: Option<PathBuf>,
        alt_dirs: Vec<PathBuf>,
        blob_file: Option<PathBuf>,
    ) -> Result<Self> {
        if dir.is_none() && blob_file.is_none() {
            return Err(Error::Invalid(
                "localfs backend needs `dir` or `blob_file`".into(),
            ));
        }
        Ok(LocalFs {
            dir,
            alt_dirs,
            blob_file,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        LocalFs {
            dir: Some(dir.into()),
            alt_dirs: Vec::new(),
            blob_file: None,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn path_of(&self, blob_id: &str) -> Result<PathBuf> {
        if let Some(f) = &self.blob_file {
            return Ok(f.clone());
        }
        // The id becomes a file name: it must not be able to name anything outside the blob directories.
        check_blob_id(blob_id)?;
        let dirs = self.dir.iter().chain(self.alt_dirs.iter());
        let candidates: Vec<PathBuf> = dirs.map(|d| d.join(blob_id)).collect();
        candidates
            .iter()
            .find(|p| p.exists())
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("blob {blob_id} in {}", describe(&candidates))))
    }

    fn file(&self, blob_id: &str) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(blob_id) {
            return Ok(f.clone());
        }
        let path = self.path_of(blob_id)?;
        let file = Arc::new(
            File::open(&path).map_err(|e| Error::io(format!("open blob {}", path.display()), e))?,
        );
        open.insert(blob_id.to_string(), file.clone());
        Ok(file)
    }
}

/// `[pos, end)` of a blob file, read in the caller's pieces.
struct FileRange {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl std::io::Read for FileRange {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = buf.len().min(self.end.saturating_sub(self.pos) as usize);
        if max == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..max], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn describe(paths: &[PathBuf]) -> String {
    let dirs: Vec<String> = paths
        .iter()
        .filter_map(|p| p.parent())
        .map(|d: &Path| d.display().to_string())
        .collect();
    dirs.join(", ")
}

impl BlobBackend for LocalFs {
    fn kind(&self) -> &'static str {
        "localfs"
    }

    fn read_at(&self, blob_id: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let file = self.file(blob_id)?;
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("read blob {blob_id} at {offset}"), e)),
            }
        }
        Ok(done)
    }

    fn open_range(
        &self,
        blob_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(FileRange {
            file: self.file(blob_id)?,
            pos: offset,
            end: offset.saturating_add(len as u64),
        }))
    }

    fn blob_size(&self, blob_id: &str) -> Result<u64> {
        let file = self.file(blob_id)?;
        Ok(file
            .metadata()
            .map_err(|e| Error::io(format!("stat blob {blob_id}"), e))?
            .len())
    }
}
