//! The image builder: turn a directory or an OCI layer tarball into a RAFS v5 or v6 image (a bootstrap
//! plus one data blob), optionally on top of a parent image, and merge layer bootstraps into one.
//!
//! One module per concern:
//! - [`tree`]: the in-memory tree and the directory scanner; [`tar`]: the tar / tar.gz scanner.
//! - [`chunker`]: chunking, digests, compression and dedup on worker threads; [`blob`]: the blob writer.
//! - [`v6`], [`v5`]: bootstrap writers. [`layer`]: load an existing bootstrap. [`overlay`]: whiteouts.

pub mod blob;
pub mod chunker;
pub mod layer;
pub mod overlay;
pub mod tar;
pub mod tar_stream;
pub mod tree;
pub mod v5;
pub mod v6;

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use blob::{BlobOptions, BlobWriter};
use chunker::{ChunkOptions, ChunkStats, ChunkTable, Chunker};
pub use overlay::WhiteoutSpec;
use tree::{Kind, NodeId, Tree};

use crate::error::{Error, Result};
use crate::format::v6::INLINE_BLOB_PLACEHOLDER;
use crate::format::{BlobInfo, Compressor, Digester};

/// `rafsd build` options.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// 5 or 6.
    pub fs_version: u32,
    /// Power of two, 4 KiB ..= 16 MiB.
    pub chunk_size: u32,
    pub compressor: Compressor,
    pub digester: Digester,
    /// Build an upper layer on this image: whiteouts applied, its chunks reused, its blobs kept.
    pub parent_bootstrap: Option<PathBuf>,
    /// Bootstraps whose chunks the new blob reuses instead of storing again (`nydus-image create
    /// --chunk-dict`): their blobs join the blob table, their trees are not applied. A standalone layer
    /// built this way keeps its whiteouts and deduplicates against the layers below it.
    pub chunk_dict: Vec<PathBuf>,
    pub whiteout_spec: WhiteoutSpec,
    /// Absolute paths whose data goes first in the blob and whose inodes fill the prefetch table.
    pub prefetch_files: Vec<Vec<u8>>,
    /// Record no owners (reproducible images; readers then show their own uid/gid).
    pub repeatable: bool,
    /// Append the bootstrap (and a ToC) to the data blob (v6 only).
    pub blob_inline_meta: bool,
    pub threads: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            fs_version: 6,
            chunk_size: 0x10_0000,
            compressor: Compressor::Zstd,
            digester: Digester::Blake3,
            parent_bootstrap: None,
            chunk_dict: Vec::new(),
            whiteout_spec: WhiteoutSpec::Oci,
            prefetch_files: Vec::new(),
            repeatable: false,
            blob_inline_meta: false,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone, Default)]
pub struct BuildReport {
    /// The bootstrap written, if any (inline-meta builds may write none).
    pub bootstrap: Option<PathBuf>,
    /// The new data blob (absent when the layer adds no file data).
    pub blob_id: Option<String>,
    pub blob_path: Option<PathBuf>,
    /// Size of the new blob file, metadata sections included.
    pub blob_size: u64,
    /// Entries in the resulting image (names, root included).
    pub entries: u64,
    /// Entries left out of the source (sockets), with the reason.
    pub skipped: Vec<String>,
    pub chunks: ChunkStats,
}

/// Upstream's limits on the chunk size (doc §4.1).
pub fn check_chunk_size(size: u32) -> Result<()> {
    if !size.is_power_of_two() || !(0x1000..=0x100_0000).contains(&size) {
        return Err(Error::Invalid(format!(
            "chunk size {size:#x} must be a power of two from 0x1000 to 0x1000000"
        )));
    }
    Ok(())
}

enum Source {
    Dir,
    Tar,
    TarGz,
}

fn source_kind(path: &Path) -> Result<Source> {
    let md = fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if md.is_dir() {
        return Ok(Source::Dir);
    }
    let mut magic = [0u8; 2];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Source::TarGz
    } else {
        Source::Tar
    })
}

/// Build `source` (a directory, .tar or .tar.gz) into `blob_dir/<blob id>` and `bootstrap`.
/// With `blob_inline_meta` the bootstrap goes into the blob; `bootstrap` then gets a standalone copy
/// (naming the real blob id) if given.
pub fn build(
    source: &Path,
    bootstrap: Option<&Path>,
    blob_dir: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    check_options(bootstrap, opts)?;
    match source_kind(source)? {
        Source::Dir => build_input(Input::Dir(source), bootstrap, blob_dir, opts),
        kind => {
            let file = File::open(source)
                .map_err(|e| Error::io(format!("open {}", source.display()), e))?;
            let reader = BufReader::with_capacity(1 << 20, file);
            let mut reader: Box<dyn Read> = match kind {
                Source::TarGz => Box::new(flate2::read::MultiGzDecoder::new(reader)),
                _ => Box::new(reader),
            };
            build_input(Input::Tar(&mut reader, source), bootstrap, blob_dir, opts)
        }
    }
}

/// Build an uncompressed tar stream (an OCI layer read as it arrives, never held whole) into
/// `blob_dir/<blob id>` and `bootstrap`. `name` stands for the stream in errors.
pub fn build_tar_stream(
    reader: &mut dyn Read,
    name: &Path,
    bootstrap: Option<&Path>,
    blob_dir: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    check_options(bootstrap, opts)?;
    build_input(Input::Tar(reader, name), bootstrap, blob_dir, opts)
}

/// What a build reads: a directory, or a tar stream with the name it goes by in errors.
enum Input<'a> {
    Dir(&'a Path),
    Tar(&'a mut dyn Read, &'a Path),
}

fn check_options(bootstrap: Option<&Path>, opts: &BuildOptions) -> Result<()> {
    check_chunk_size(opts.chunk_size)?;
    if opts.fs_version != 5 && opts.fs_version != 6 {
        return Err(Error::Invalid(format!(
            "fs version {} (5 or 6)",
            opts.fs_version
        )));
    }
    if opts.blob_inline_meta && opts.fs_version != 6 {
        return Err(Error::Invalid(
            "--blob-inline-meta needs --fs-version 6".into(),
        ));
    }
    if bootstrap.is_none() && !opts.blob_inline_meta {
        return Err(Error::Invalid(
            "a bootstrap path is needed unless the metadata is inlined in the blob".into(),
        ));
    }
    if opts.compressor == Compressor::Gzip {
        return Err(Error::Invalid(
            "gzip chunks are only made by OCI ref conversions; use none, lz4_block or zstd".into(),
        ));
    }
    Ok(())
}

/// Why a loaded layer cannot share chunks or a tree with the image being built, if it cannot.
fn layer_clash(layer: &layer::Layer, opts: &BuildOptions) -> Option<String> {
    if layer.version != opts.fs_version {
        Some(format!("RAFS v{}", layer.version))
    } else if layer.chunk_size != opts.chunk_size {
        Some(format!("chunk size {:#x}", layer.chunk_size))
    } else if layer.digester != opts.digester {
        Some(format!("digester {}", layer.digester.name()))
    } else if opts.fs_version == 5 && layer.compressor != opts.compressor {
        Some(format!(
            "compressor {} (v5 records one per image)",
            layer.compressor.name()
        ))
    } else {
        None
    }
}

fn build_input(
    input: Input,
    bootstrap: Option<&Path>,
    blob_dir: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    // The parent's blobs come first, so its chunk addresses stay valid.
    let mut table = ChunkTable::default();
    let mut blobs: Vec<BlobInfo> = Vec::new();
    let parent = load_lower_layers(opts, &mut table, &mut blobs)?;
    let blob_index = blobs.len() as u32;
    if blob_index >= 255 {
        return Err(Error::Invalid("the parent already names 255 blobs".into()));
    }

    let mut writer = BlobWriter::create(
        blob_dir,
        BlobOptions {
            fs_version: opts.fs_version,
            compressor: opts.compressor,
            toc: opts.blob_inline_meta,
        },
    )?;
    let copts = ChunkOptions {
        chunk_size: opts.chunk_size,
        compressor: opts.compressor,
        digester: opts.digester,
        threads: opts.threads,
    };
    let mut report = BuildReport::default();
    let chunker = Chunker::new(copts, &mut writer, &mut table, blob_index);
    let upper = scan_input(input, chunker, opts, &mut report)?;
    let mut tree = put_on_parent(parent, upper, opts);
    tree.sort();
    report.entries = tree.bfs().len() as u64;
    let prefetch = resolve_prefetch(&tree, &opts.prefetch_files);
    let params = v6::ImageParams {
        chunk_size: opts.chunk_size,
        compressor: opts.compressor,
        digester: opts.digester,
        explicit_uid_gid: !opts.repeatable,
        prefetch: &prefetch,
    };
    let write_bootstrap = |blobs: &[BlobInfo]| -> Result<Vec<u8>> {
        if opts.fs_version == 6 {
            v6::write(&tree, &table, blobs, &params)
        } else {
            v5::write(&tree, &table, blobs, &params)
        }
    };

    let new_blob = |layout: &blob::BlobLayout, id: &str| new_blob(blob_index, opts, layout, id);
    if opts.blob_inline_meta {
        // The bootstrap travels in the blob, naming it by the placeholder the reader replaces with the
        // blob's file name; a blob is written even without file data, to carry the bootstrap.
        let layout = writer.finish_data()?;
        let mut with_placeholder = blobs.clone();
        if layout.chunk_count > 0 {
            with_placeholder.push(new_blob(&layout, INLINE_BLOB_PLACEHOLDER));
        }
        writer.append_bootstrap(&write_bootstrap(&with_placeholder)?)?;
        let (id, size, path) = writer.commit()?;
        if layout.chunk_count > 0 {
            blobs.push(new_blob(&layout, &id));
        }
        if let Some(b) = bootstrap {
            write_file(b, &write_bootstrap(&blobs)?)?;
            report.bootstrap = Some(b.to_path_buf());
        }
        report.blob_id = Some(id);
        report.blob_path = Some(path);
        report.blob_size = size;
    } else {
        if writer.chunk_count() > 0 {
            let layout = writer.finish_data()?;
            let (id, size, path) = writer.commit()?;
            blobs.push(new_blob(&layout, &id));
            report.blob_id = Some(id);
            report.blob_path = Some(path);
            report.blob_size = size;
        }
        let b = bootstrap.expect("checked above");
        write_file(b, &write_bootstrap(&blobs)?)?;
        report.bootstrap = Some(b.to_path_buf());
    }
    Ok(report)
}

/// Load the parent bootstrap (returned) and the chunk dictionaries into `table` and `blobs`; each must
/// match the image being built.
fn load_lower_layers(
    opts: &BuildOptions,
    table: &mut ChunkTable,
    blobs: &mut Vec<BlobInfo>,
) -> Result<Option<layer::Layer>> {
    let parent = match &opts.parent_bootstrap {
        Some(p) => {
            let layer = layer::load(p, table, blobs)?;
            if let Some(c) = layer_clash(&layer, opts) {
                return Err(Error::Invalid(format!(
                    "parent bootstrap {} is {c}: the new layer must match it",
                    p.display()
                )));
            }
            Some(layer)
        }
        None => None,
    };
    for p in &opts.chunk_dict {
        let dict = layer::load(p, table, blobs)?;
        if let Some(c) = layer_clash(&dict, opts) {
            return Err(Error::Invalid(format!(
                "chunk dict {} is {c}: the new layer must match it",
                p.display()
            )));
        }
    }
    Ok(parent)
}

/// The new layer's tree, its files chunked into the blob by `chunker` (every chunk committed).
fn scan_input(
    input: Input,
    mut chunker: Chunker,
    opts: &BuildOptions,
    report: &mut BuildReport,
) -> Result<Tree> {
    let mut tree = match input {
        Input::Dir(source) => {
            let (mut tree, scan) = tree::scan_dir(source)?;
            report.skipped = scan.skipped;
            tree.sort();
            chunk_files(&mut tree, &mut chunker, &opts.prefetch_files)?;
            tree
        }
        Input::Tar(reader, name) => {
            let mut tree = tar::scan(reader, &mut chunker, name)?;
            tree.sort();
            tree
        }
    };
    let (assignments, stats) = chunker.finish()?;
    for (file, k, chunk) in assignments {
        let chunks = &mut tree.files[file].chunks;
        if chunks.len() <= k as usize {
            chunks.resize(k as usize + 1, u32::MAX);
        }
        chunks[k as usize] = chunk;
    }
    if tree.files.iter().any(|f| f.chunks.contains(&u32::MAX)) {
        return Err(Error::Invalid(
            "internal error: a file chunk was never committed".into(),
        ));
    }
    report.chunks = stats;
    Ok(tree)
}

/// The image's tree: the new layer put on the parent (whiteouts applied), or the layer alone.
fn put_on_parent(parent: Option<layer::Layer>, upper: Tree, opts: &BuildOptions) -> Tree {
    match parent {
        Some(mut p) => {
            overlay::apply(&mut p.tree, &upper, opts.whiteout_spec);
            p.tree.sort();
            p.tree
        }
        None => {
            if overlay::has_whiteouts(&upper, opts.whiteout_spec) {
                log::info!(
                    "the layer has whiteouts; they are kept as entries until it is put on a parent"
                );
            }
            upper
        }
    }
}

/// The blob table entry of the new layer's blob.
fn new_blob(blob_index: u32, opts: &BuildOptions, layout: &blob::BlobLayout, id: &str) -> BlobInfo {
    BlobInfo {
        index: blob_index,
        id: id.to_string(),
        chunk_size: opts.chunk_size,
        chunk_count: layout.chunk_count,
        compressor: opts.compressor,
        digester: opts.digester,
        features: layout.features,
        compressed_size: layout.compressed_size,
        uncompressed_size: layout.uncompressed_size,
        ci: layout.ci,
        toc_size: 0,
        toc_digest: [0; 32],
        readahead: (0, 0),
    }
}

/// Chunk every regular file of a directory source: prefetch files first, then breadth-first order.
fn chunk_files(tree: &mut Tree, chunker: &mut Chunker, prefetch: &[Vec<u8>]) -> Result<()> {
    let mut order: Vec<NodeId> = Vec::new();
    for path in prefetch {
        match tree.lookup_path(path) {
            Some(node) => order.extend(subtree(tree, node)),
            None => log::warn!(
                "prefetch path {} is not in the source",
                String::from_utf8_lossy(path)
            ),
        }
    }
    order.extend(tree.bfs().into_iter().map(|(n, _)| n));
    let mut done = vec![false; tree.files.len()];
    for node in order {
        let Kind::File(f) = tree.nodes[node].kind else {
            continue;
        };
        if std::mem::replace(&mut done[f], true) {
            continue;
        }
        let (size, path) = (
            tree.files[f].size,
            tree.files[f]
                .source
                .clone()
                .expect("directory sources record paths"),
        );
        let mut file =
            File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        chunker.add_file(f, &mut file, size, &path.display().to_string())?;
    }
    Ok(())
}

/// `node` and everything below it, breadth first.
fn subtree(tree: &Tree, node: NodeId) -> Vec<NodeId> {
    let mut out = vec![node];
    let mut i = 0;
    while i < out.len() {
        out.extend_from_slice(tree.children(out[i]));
        i += 1;
    }
    out
}

fn resolve_prefetch(tree: &Tree, paths: &[Vec<u8>]) -> Vec<NodeId> {
    let mut out = Vec::new();
    for path in paths {
        match tree.lookup_path(path) {
            Some(n) if !out.contains(&n) => out.push(n),
            Some(_) => {}
            None => log::warn!(
                "prefetch path {} is not in the image; left out of the prefetch table",
                String::from_utf8_lossy(path)
            ),
        }
    }
    out
}

/// Write through a temporary file and rename, so a failed build never leaves a half-written bootstrap.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.rafsd-tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bootstrap")
    ));
    fs::write(&tmp, bytes).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("rename {} to {}", tmp.display(), path.display()), e))
}

/// What `merge` produced.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    pub layers: usize,
    pub blobs: usize,
    pub entries: u64,
}

/// Merge layer bootstraps (lowest first) into one image at `output`, applying each layer's whiteouts
/// to the layers below. All layers must agree on format version, chunk size, digester and owners.
pub fn merge(sources: &[PathBuf], output: &Path, spec: WhiteoutSpec) -> Result<MergeReport> {
    merge_with_prefetch(sources, output, spec, &[])
}

/// As [`merge`], filling the merged image's prefetch table with these absolute paths.
pub fn merge_with_prefetch(
    sources: &[PathBuf],
    output: &Path,
    spec: WhiteoutSpec,
    prefetch_files: &[Vec<u8>],
) -> Result<MergeReport> {
    let Some((first, rest)) = sources.split_first() else {
        return Err(Error::Invalid("merge needs at least one bootstrap".into()));
    };
    let mut table = ChunkTable::default();
    let mut blobs = Vec::new();
    let base = layer::load(first, &mut table, &mut blobs)?;
    let mut tree = base.tree;
    let mut compressor = base.compressor;
    for path in rest {
        let layer = layer::load(path, &mut table, &mut blobs)?;
        let clash = if layer.version != base.version {
            Some(format!(
                "RAFS v{} (the first is v{})",
                layer.version, base.version
            ))
        } else if layer.chunk_size != base.chunk_size {
            Some(format!(
                "chunk size {:#x} (the first has {:#x})",
                layer.chunk_size, base.chunk_size
            ))
        } else if layer.digester != base.digester {
            Some(format!(
                "digester {} (the first has {})",
                layer.digester.name(),
                base.digester.name()
            ))
        } else if layer.explicit_uid_gid != base.explicit_uid_gid {
            Some("built with a different --repeatable setting".to_string())
        } else if base.version == 5 && layer.compressor != base.compressor {
            Some(format!(
                "compressor {} (v5 records one per image)",
                layer.compressor.name()
            ))
        } else {
            None
        };
        if let Some(c) = clash {
            return Err(Error::Invalid(format!(
                "cannot merge {}: it is {c}",
                path.display()
            )));
        }
        overlay::apply(&mut tree, &layer.tree, spec);
        compressor = layer.compressor;
    }
    tree.sort();
    let prefetch = resolve_prefetch(&tree, prefetch_files);
    let params = v6::ImageParams {
        chunk_size: base.chunk_size,
        compressor,
        digester: base.digester,
        explicit_uid_gid: base.explicit_uid_gid,
        prefetch: &prefetch,
    };
    let bytes = if base.version == 6 {
        v6::write(&tree, &table, &blobs, &params)?
    } else {
        v5::write(&tree, &table, &blobs, &params)?
    };
    write_file(output, &bytes)?;
    Ok(MergeReport {
        layers: sources.len(),
        blobs: blobs.len(),
        entries: tree.bfs().len() as u64,
    })
}

/// `--chunk-size`: hex (`0x100000`) or decimal.
pub fn parse_chunk_size(s: &str) -> std::result::Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    let size = parsed.map_err(|_| format!("{s:?} is not a number (hex 0x... or decimal)"))?;
    check_chunk_size(size).map_err(|e| e.to_string())?;
    Ok(size)
}

pub fn parse_compressor(s: &str) -> std::result::Result<Compressor, String> {
    match s {
        "none" => Ok(Compressor::None),
        "lz4_block" => Ok(Compressor::Lz4Block),
        "zstd" => Ok(Compressor::Zstd),
        _ => Err(format!(
            "unknown compressor {s:?} (none, lz4_block or zstd)"
        )),
    }
}

pub fn parse_digester(s: &str) -> std::result::Result<Digester, String> {
    match s {
        "blake3" => Ok(Digester::Blake3),
        "sha256" => Ok(Digester::Sha256),
        _ => Err(format!("unknown digester {s:?} (blake3 or sha256)")),
    }
}

/// A prefetch list: one absolute path per line (blank lines ignored); `-` reads standard input.
pub fn read_prefetch_list(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = if path.as_os_str() == "-" {
        let mut s = Vec::new();
        std::io::stdin()
            .read_to_end(&mut s)
            .map_err(|e| Error::io("read prefetch list from stdin", e))?;
        s
    } else {
        fs::read(path)
            .map_err(|e| Error::io(format!("read prefetch list {}", path.display()), e))?
    };
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if !line.starts_with(b"/") {
            return Err(Error::Invalid(format!(
                "prefetch list entry {:?} is not an absolute path",
                String::from_utf8_lossy(line)
            )));
        }
        out.push(line.to_vec());
    }
    Ok(out)
}
