//! `rafsd inspect`: what an image is, in text or JSON.

use serde_json::{json, Value};

use crate::format::{blob_features as bf, flags, SuperInfo};
use crate::image::{MetaSource, RafsImage};

const FLAG_NAMES: &[(u64, &str)] = &[
    (flags::COMPRESSION_NONE, "COMPRESSION_NONE"),
    (flags::COMPRESSION_LZ4, "COMPRESSION_LZ4"),
    (flags::HASH_BLAKE3, "HASH_BLAKE3"),
    (flags::HASH_SHA256, "HASH_SHA256"),
    (flags::EXPLICIT_UID_GID, "EXPLICIT_UID_GID"),
    (flags::HAS_XATTR, "HAS_XATTR"),
    (flags::COMPRESSION_GZIP, "COMPRESSION_GZIP"),
    (flags::COMPRESSION_ZSTD, "COMPRESSION_ZSTD"),
    (flags::INLINED_CHUNK_DIGEST, "INLINED_CHUNK_DIGEST"),
    (flags::TARFS_MODE, "TARFS_MODE"),
    (flags::ENCRYPTION_NONE, "ENCRYPTION_NONE"),
    (flags::ENCRYPTION_AES128XTS, "ENCRYPTION_AES128XTS"),
];

const FEATURE_NAMES: &[(u32, &str)] = &[
    (bf::ALIGNED, "ALIGNED"),
    (bf::INLINED_FS_META, "INLINED_FS_META"),
    (bf::CHUNK_INFO_V2, "CHUNK_INFO_V2"),
    (bf::ZRAN, "ZRAN"),
    (bf::SEPARATE, "SEPARATE"),
    (bf::INLINED_CHUNK_DIGEST, "INLINED_CHUNK_DIGEST"),
    (bf::TARFS, "TARFS"),
    (bf::BATCH, "BATCH"),
    (bf::ENCRYPTED, "ENCRYPTED"),
    (bf::EXTERNAL, "EXTERNAL"),
    (bf::HAS_TAR_HEADER, "HAS_TAR_HEADER"),
    (bf::HAS_TOC, "HAS_TOC"),
    (bf::CAP_TAR_TOC, "CAP_TAR_TOC"),
];

fn names<T: Copy + std::ops::BitAnd<Output = T> + PartialEq + Default>(
    v: T,
    table: &[(T, &str)],
) -> Vec<String> {
    table
        .iter()
        .filter(|(bit, _)| v & *bit != T::default())
        .map(|(_, n)| n.to_string())
        .collect()
}

pub fn to_json(image: &RafsImage) -> Value {
    let info: &SuperInfo = image.info();
    let blobs: Vec<Value> = info
        .blobs
        .iter()
        .map(|b| {
            json!({
                "index": b.index,
                "id": b.id,
                "chunk_count": b.chunk_count,
                "chunk_size": b.chunk_size,
                "compressor": b.compressor.name(),
                "digester": b.digester.name(),
                "features": format!("{:#x}", b.features),
                "feature_names": names(b.features, FEATURE_NAMES),
                "compressed_size": b.compressed_size,
                "uncompressed_size": b.uncompressed_size,
                "ci": b.ci.map(|c| json!({
                    "compressor": c.compressor.name(),
                    "offset": c.offset,
                    "compressed_size": c.compressed_size,
                    "uncompressed_size": c.uncompressed_size,
                })),
            })
        })
        .collect();
    let source = match image.source() {
        MetaSource::Bootstrap(p) => json!({"bootstrap": p}),
        MetaSource::InlineBlob { path, blob_id } => {
            json!({"inline_meta_blob": path, "blob_id": blob_id})
        }
    };
    json!({
        "source": source,
        "fs_version": info.version,
        "flags": format!("{:#x}", info.flags),
        "flag_names": names(info.flags, FLAG_NAMES),
        "compressor": info.compressor.name(),
        "digester": info.digester.name(),
        "chunk_size": info.chunk_size,
        "block_size": info.block_size,
        "inode_count": info.inode_count,
        "root_ino": info.root_ino,
        "explicit_uid_gid": info.explicit_uid_gid(),
        "prefetch": info.prefetch,
        "blob_count": info.blobs.len(),
        "blobs": blobs,
    })
}

pub fn to_text(image: &RafsImage) -> String {
    let info = image.info();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    line("format", format!("RAFS v{}", info.version));
    line(
        "flags",
        format!(
            "{:#x} {}",
            info.flags,
            names(info.flags, FLAG_NAMES).join("|")
        ),
    );
    line("compressor", info.compressor.name().into());
    line("digester", info.digester.name().into());
    line("chunk size", format!("{:#x}", info.chunk_size));
    line("inodes", info.inode_count.to_string());
    line("root inode", info.root_ino.to_string());
    line("prefetch entries", info.prefetch.len().to_string());
    line("blobs", info.blobs.len().to_string());
    for b in &info.blobs {
        out.push_str(&format!(
            "  [{}] {} chunks={} compressed={} uncompressed={} {}/{} features={:#x} {}\n",
            b.index,
            b.id,
            b.chunk_count,
            b.compressed_size,
            b.uncompressed_size,
            b.compressor.name(),
            b.digester.name(),
            b.features,
            names(b.features, FEATURE_NAMES).join("|")
        ));
    }
    out
}
