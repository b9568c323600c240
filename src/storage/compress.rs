//! Chunk codecs. Decompression always knows the exact output size from the metadata and refuses
//! anything else, so a hostile chunk cannot make us allocate or return more than the image promised.

use std::io::Read;

use crate::error::{Error, Result};
use crate::format::Compressor;

pub fn decompress(algo: Compressor, src: &[u8], out_len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; out_len];
    decompress_into(algo, src, &mut out)?;
    Ok(out)
}

/// Decompress `src` into exactly `out.len()` bytes.
pub fn decompress_into(algo: Compressor, src: &[u8], out: &mut [u8]) -> Result<()> {
    let want = out.len();
    let wrong_size = |got: usize| {
        Error::Integrity(format!(
            "{} data decompressed to {got} bytes, expected {want}",
            algo.name()
        ))
    };
    match algo {
        Compressor::None => {
            if src.len() != out.len() {
                return Err(wrong_size(src.len()));
            }
            out.copy_from_slice(src);
        }
        Compressor::Lz4Block => {
            let n = lz4_flex::block::decompress_into(src, out).map_err(|e| {
                Error::Integrity(format!("lz4_block data does not decompress: {e}"))
            })?;
            if n != out.len() {
                return Err(wrong_size(n));
            }
        }
        Compressor::Zstd => {
            // A streaming decoder bounded by the output buffer: one byte of slack detects an oversized frame.
            let mut decoder = zstd::stream::read::Decoder::new(src)
                .map_err(|e| Error::Integrity(format!("zstd decoder: {e}")))?;
            let mut filled = 0;
            while filled < out.len() {
                match decoder.read(&mut out[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        return Err(Error::Integrity(format!(
                            "zstd data does not decompress: {e}"
                        )))
                    }
                }
            }
            if filled != out.len() {
                return Err(wrong_size(filled));
            }
            let mut extra = [0u8; 1];
            if matches!(decoder.read(&mut extra), Ok(n) if n > 0) {
                return Err(Error::Integrity(format!(
                    "zstd data decompresses past the expected {} bytes",
                    out.len()
                )));
            }
        }
        Compressor::Gzip => {
            return Err(Error::Unsupported(
                "gzip chunks (OCI ref / zran images)".into(),
            ))
        }
    }
    Ok(())
}

pub fn compress(algo: Compressor, src: &[u8]) -> Result<Vec<u8>> {
    match algo {
        Compressor::None => Ok(src.to_vec()),
        Compressor::Lz4Block => Ok(lz4_flex::block::compress(src)),
        Compressor::Zstd => {
            zstd::bulk::compress(src, 3).map_err(|e| Error::io("zstd compression", e))
        }
        Compressor::Gzip => Err(Error::Unsupported("gzip compression".into())),
    }
}
