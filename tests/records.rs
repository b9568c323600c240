//! The record definitions in `rafs-layout` against images the upstream builder wrote: every record read
//! from a reference image and written back gives the same bytes (a field missing from a table, or too
//! narrow, loses bytes), and the fields hold what the format says they hold (a field at the wrong offset
//! reads the wrong value). The parsers' own tests (tests/fixtures.rs) check the rest through the manifest.

use kit::manifest;

use rafsd::layout::blob::{CiHeader, TarHeader, TocEntry, CI_MAGIC, TAR_HEADER_SIZE};
use rafsd::layout::erofs::{
    BlobEntry, DeviceSlot, ExtSuperBlock, SuperBlock, EROFS_MAGIC, EXT_SUPER_OFFSET,
};
use rafsd::layout::{padded, v5, Record};

/// Read the record at `at`, write it back into a zeroed buffer, and compare with the original bytes.
fn round_trip<R: Record + std::fmt::Debug>(bytes: &[u8], at: usize, what: &str) -> R {
    let original = &bytes[at..at + R::SIZE];
    let record = R::read(original).unwrap_or_else(|| panic!("{what}: too short"));
    let mut rewritten = vec![0u8; R::SIZE];
    record.write_to(&mut rewritten);
    assert_eq!(
        rewritten, original,
        "{what} does not survive a round trip: {record:?}"
    );
    record
}

fn v6_cases() -> Vec<String> {
    manifest::cases()
        .into_iter()
        .filter(|c| c.starts_with("v6") && c != "v6-inline-meta")
        .collect()
}

#[test]
fn v6_superblocks_device_slots_blob_entries_and_chunk_rows_round_trip() {
    for case in v6_cases() {
        let boot = std::fs::read(manifest::case_bootstrap(&case)).unwrap();
        let sb: SuperBlock = round_trip(&boot, 1024, &format!("{case} superblock"));
        assert_eq!(sb.magic, EROFS_MAGIC, "{case}");
        assert_eq!(
            (sb.blkszbits, sb.devt_slotoff, sb.root_nid),
            (12, 11, 128),
            "{case}"
        );
        assert_eq!(sb.feature_incompat, 0xC, "{case}");
        let ext: ExtSuperBlock = round_trip(
            &boot,
            EXT_SUPER_OFFSET as usize,
            &format!("{case} ext superblock"),
        );
        assert!(ext.chunk_size.is_power_of_two(), "{case}: {ext:?}");
        assert_eq!(
            ext.blob_table_size as usize,
            sb.extra_devices as usize * BlobEntry::SIZE
        );
        let slot_base = sb.devt_slotoff as usize * DeviceSlot::SIZE;
        for i in 0..sb.extra_devices as usize {
            let slot: DeviceSlot = round_trip(
                &boot,
                slot_base + i * DeviceSlot::SIZE,
                &format!("{case} slot {i}"),
            );
            let entry: BlobEntry = round_trip(
                &boot,
                ext.blob_table_offset as usize + i * BlobEntry::SIZE,
                &format!("{case} blob entry {i}"),
            );
            assert_eq!(
                slot.tag, entry.blob_id,
                "{case}: slot and entry name one blob"
            );
            assert_eq!(entry.blob_index as usize, i, "{case}");
            assert_eq!(entry.chunk_size, ext.chunk_size, "{case}");
            assert_eq!(slot.blocks as u64 * 4096, entry.uncompressed_size, "{case}");
        }
        let rows = ext.chunk_table_size as usize / v5::ChunkRecord::SIZE;
        assert!(rows > 0, "{case}: a chunk table");
        for r in 0..rows {
            let row: v5::ChunkRecord = round_trip(
                &boot,
                ext.chunk_table_offset as usize + r * v5::ChunkRecord::SIZE,
                &format!("{case} chunk row {r}"),
            );
            assert!(row.blob_index < sb.extra_devices as u32, "{case}: {row:?}");
            assert!(row.uncompressed_size <= ext.chunk_size, "{case}: {row:?}");
            assert_eq!(
                row.uncompressed_offset % 4096,
                0,
                "{case}: v6 chunks are aligned"
            );
        }
    }
}

#[test]
fn v6_blob_meta_headers_round_trip() {
    for case in v6_cases() {
        let boot = std::fs::read(manifest::case_bootstrap(&case)).unwrap();
        let ext = ExtSuperBlock::read(&boot[EXT_SUPER_OFFSET as usize..]).unwrap();
        let entry = BlobEntry::read(&boot[ext.blob_table_offset as usize..]).unwrap();
        let id = std::str::from_utf8(padded(&entry.blob_id))
            .unwrap()
            .to_string();
        let blob = std::fs::read(manifest::case_blob_dir(&case).join(&id)).unwrap();
        let at = (entry.ci_offset + entry.ci_compressed_size) as usize;
        let header: CiHeader = round_trip(&blob, at, &format!("{case} CI header"));
        assert_eq!(
            (header.magic, header.magic2),
            (CI_MAGIC, CI_MAGIC),
            "{case}"
        );
        assert_eq!(header.ci_entries, entry.chunk_count, "{case}");
        assert_eq!(header.ci_offset, entry.ci_offset, "{case}");
        assert_eq!(
            header.ci_uncompressed_size, entry.ci_uncompressed_size,
            "{case}"
        );
    }
}

#[test]
fn inline_meta_toc_and_tar_headers_round_trip() {
    let dir = manifest::case_blob_dir("v6-inline-meta");
    let path = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let blob = std::fs::read(path).unwrap();
    let tail = blob.len() - TAR_HEADER_SIZE as usize;
    let raw = &blob[tail..];
    let toc_header: TarHeader = round_trip(&blob, tail, "ToC tar header");
    assert!(toc_header.checksum_matches(raw));
    assert_eq!(padded(&toc_header.name), rafsd::layout::blob::TOC_NAME);
    let size = toc_header.size().unwrap() as usize;
    let rebuilt = TarHeader::section(padded(&toc_header.name), size as u64).unwrap();
    assert_eq!(
        &rebuilt[..],
        raw,
        "our writer makes the header upstream wrote"
    );
    let entries = &blob[tail - size..tail];
    let names: Vec<Vec<u8>> = entries
        .chunks_exact(TocEntry::SIZE)
        .enumerate()
        .map(|(i, e)| {
            padded(&round_trip::<TocEntry>(e, 0, &format!("ToC entry {i}")).name).to_vec()
        })
        .collect();
    assert!(names.contains(&b"image.boot".to_vec()), "{names:?}");
}

#[test]
fn v5_superblock_blob_entries_and_inode_records_round_trip() {
    for case in manifest::cases()
        .into_iter()
        .filter(|c| c.starts_with("v5"))
    {
        let boot = std::fs::read(manifest::case_bootstrap(&case)).unwrap();
        let sb: v5::SuperBlock = round_trip(&boot, 0, &format!("{case} superblock"));
        assert_eq!(
            (sb.magic, sb.fs_version, sb.sb_size),
            (v5::RAFS_V5_MAGIC, v5::RAFS_V5_VERSION, 8192),
            "{case}"
        );
        for i in 0..sb.extended_blob_table_entries as usize {
            round_trip::<v5::ExtBlobEntry>(
                &boot,
                sb.extended_blob_table_offset as usize + i * v5::ExtBlobEntry::SIZE,
                &format!("{case} ext blob entry {i}"),
            );
        }
        for slot in 0..sb.inode_table_entries as usize {
            let at = sb.inode_table_offset as usize + 4 * slot;
            let offset = u32::from_le_bytes(boot[at..at + 4].try_into().unwrap()) as usize * 8;
            let inode: v5::Inode = round_trip(&boot, offset, &format!("{case} inode slot {slot}"));
            assert!(
                inode.ino >= 1 && inode.ino <= sb.inode_table_entries as u64,
                "{case}"
            );
            assert!(inode.nlink >= 1, "{case}: {inode:?}");
            if inode.mode & libc::S_IFMT == libc::S_IFREG && inode.child_count > 0 {
                // The chunk records follow name, symlink and xattrs; the first one is enough here.
                let mut chunks =
                    offset + v5::Inode::SIZE + (inode.name_size as usize).div_ceil(8) * 8;
                chunks += (inode.symlink_size as usize).div_ceil(8) * 8;
                if inode.flags & v5::I_XATTR != 0 {
                    let total = u64::from_le_bytes(boot[chunks..chunks + 8].try_into().unwrap());
                    chunks += 8 + (total as usize).div_ceil(8) * 8;
                }
                let chunk: v5::ChunkRecord =
                    round_trip(&boot, chunks, &format!("{case} chunk of slot {slot}"));
                assert!(
                    chunk.uncompressed_size as u64 <= sb.block_size as u64,
                    "{chunk:?}"
                );
            }
        }
    }
}
