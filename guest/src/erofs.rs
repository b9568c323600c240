//! The few EROFS superblock fields the helper needs: the block size and the device table, whose slot tags
//! are the blob ids of a RAFS v6 image (device `i + 1` is blob `i`). The records come from `rafs-layout`,
//! the daemon's own definitions (a dependency-free crate, so the static binary stays small).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rafs_layout::erofs::{DeviceSlot, SuperBlock, EROFS_MAGIC, SUPER_OFFSET};
use rafs_layout::{padded, Record};

/// One device slot: the blob id and how many blocks of it the image addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub tag: String,
    pub blocks: u64,
}

#[derive(Debug)]
pub struct Bootstrap {
    pub block_size: u64,
    pub devices: Vec<Device>,
}

/// Read the superblock and device table of `path`; any error names the file and what is wrong.
pub fn read_bootstrap(path: &Path) -> Result<Bootstrap, String> {
    let what = path.display();
    let file = File::open(path).map_err(|e| format!("open bootstrap {what}: {e}"))?;
    let mut sb = [0u8; SuperBlock::SIZE];
    file.read_exact_at(&mut sb, SUPER_OFFSET).map_err(|e| {
        format!("{what}: cannot read an EROFS superblock at byte {SUPER_OFFSET}: {e}")
    })?;
    parse(&sb, |offset, buf| file.read_exact_at(buf, offset)).map_err(|e| format!("{what}: {e}"))
}

/// Parse the superblock `sb` (128 bytes at 1024); `read_at` fetches the device table.
pub fn parse(
    sb: &[u8; SuperBlock::SIZE],
    read_at: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Bootstrap, String> {
    let sb = SuperBlock::read(sb).expect("a whole superblock");
    if sb.magic != EROFS_MAGIC {
        return Err(format!(
            "not an EROFS (RAFS v6) bootstrap: magic {:#010x}, want {EROFS_MAGIC:#010x} (RAFS v5 images cannot be mounted by the kernel)",
            sb.magic
        ));
    }
    let blkszbits = sb.blkszbits;
    if !(9..=16).contains(&blkszbits) {
        return Err(format!("block size 2^{blkszbits} is out of range"));
    }
    let extra_devices = sb.extra_devices as usize;
    let slot_off = sb.devt_slotoff as u64 * DeviceSlot::SIZE as u64;
    let mut table = vec![0u8; extra_devices * DeviceSlot::SIZE];
    read_at(slot_off, &mut table).map_err(|e| {
        format!("cannot read the device table ({extra_devices} slots at {slot_off}): {e}")
    })?;
    let mut devices = Vec::with_capacity(extra_devices);
    for (i, slot) in table.chunks_exact(DeviceSlot::SIZE).enumerate() {
        let slot = DeviceSlot::read(slot).expect("a whole slot");
        let tag = std::str::from_utf8(padded(&slot.tag))
            .map_err(|_| format!("device slot {i}: tag is not UTF-8"))?;
        // Tags become file names under --blob-dir: plain names only.
        if tag.is_empty() || tag.contains('/') || tag == "." || tag == ".." {
            return Err(format!("device slot {i}: tag {tag:?} is not a blob id"));
        }
        devices.push(Device {
            tag: tag.to_string(),
            blocks: slot.blocks as u64,
        });
    }
    Ok(Bootstrap {
        block_size: 1 << blkszbits,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(devices: u16) -> [u8; 128] {
        let record = SuperBlock {
            magic: EROFS_MAGIC,
            blkszbits: 12,
            extra_devices: devices,
            devt_slotoff: 11,
            ..Default::default()
        };
        let mut sb = [0u8; 128];
        record.write_to(&mut sb);
        sb
    }

    #[test]
    fn reads_device_tags_and_blocks() {
        let table = {
            let mut t = vec![0u8; 256];
            t[..3].copy_from_slice(b"abc");
            t[64..68].copy_from_slice(&7u32.to_le_bytes());
            t[128..131].copy_from_slice(b"def");
            t
        };
        let b = parse(&sb(2), |off, buf| {
            assert_eq!(off, 1408);
            buf.copy_from_slice(&table[..buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(b.block_size, 4096);
        assert_eq!(
            b.devices[0],
            Device {
                tag: "abc".into(),
                blocks: 7
            }
        );
        assert_eq!(b.devices[1].tag, "def");
    }

    #[test]
    fn refuses_bad_magic_and_path_like_tags() {
        let mut bad = sb(0);
        bad[0] ^= 1;
        assert!(parse(&bad, |_, _| Ok(()))
            .unwrap_err()
            .contains("not an EROFS"));
        let e = parse(&sb(1), |_, buf| {
            buf[..5].copy_from_slice(b"../x/");
            Ok(())
        })
        .unwrap_err();
        assert!(e.contains("not a blob id"), "{e}");
    }
}
