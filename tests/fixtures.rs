//! Every reference image built by the upstream `nydus-image` must read back exactly as `manifest.tsv`
//! describes it, through `unpack` and through `check` (with digest validation on).

use kit::manifest;

use std::process::Command;

use rafsd::{check, ImageOptions, RafsImage};

fn open(case: &str, validate: bool) -> RafsImage {
    RafsImage::open_local(
        &manifest::case_bootstrap(case),
        Some(&manifest::case_blob_dir(case)),
        ImageOptions {
            validate,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {case}: {e}"))
}

#[test]
#[ignore = "needs root: ci/test.sh"]
fn every_fixture_unpacks_to_the_manifest() {
    manifest::assert_root("unpacking device nodes and owners");
    for case in manifest::cases() {
        let image = open(&case, true);
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("tree");
        let stats =
            rafsd::unpack::unpack(&image, &dest).unwrap_or_else(|e| panic!("unpack {case}: {e}"));
        assert_eq!(stats.entries, 3405, "{case}: entries written");
        let problems = manifest::compare_tree(&dest, manifest::allowances_for(&case));
        assert!(
            problems.is_empty(),
            "{case}: {} mismatches, first: {:#?}",
            problems.len(),
            &problems[..problems.len().min(10)]
        );
    }
}

#[test]
fn every_fixture_checks_clean_with_validation() {
    for case in manifest::cases() {
        let image = open(&case, true);
        let report = check::check(&image, 10).unwrap();
        assert!(report.errors.is_empty(), "{case}: {:?}", report.errors);
        assert_eq!(report.entries, 3405, "{case}");
        // 3201 regular-file names, one pair of them hard links to a single inode.
        assert_eq!(report.files, 3200, "{case}");
        assert_eq!(report.bytes, 12_196_193, "{case}");
    }
}

#[test]
fn check_and_inspect_commands_agree_with_the_builder_report() {
    let bin = env!("CARGO_BIN_EXE_rafsd");
    for case in manifest::cases() {
        let bootstrap = manifest::case_bootstrap(&case);
        let blob_dir = manifest::case_blob_dir(&case);
        let out = Command::new(bin)
            .arg("check")
            .arg(&bootstrap)
            .arg("--blob-dir")
            .arg(&blob_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{case}: rafsd check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(": 0 errors"),
            "{case}"
        );

        let out = Command::new(bin)
            .args(["inspect", "--json"])
            .arg(&bootstrap)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{case}: rafsd inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let build: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(manifest::fixtures_dir().join(&case).join("build.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            got["fs_version"].to_string(),
            build["fs_version"].as_str().unwrap(),
            "{case}: fs version"
        );
        assert_eq!(got["compressor"], build["compressor"], "{case}: compressor");
        let ids: Vec<&serde_json::Value> = got["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| &b["id"])
            .collect();
        let want: Vec<&serde_json::Value> = build["blobs"].as_array().unwrap().iter().collect();
        assert_eq!(ids, want, "{case}: blob ids");
        assert!(
            got["inode_count"].as_u64().unwrap() >= 3400,
            "{case}: inode count"
        );
    }
}

#[test]
fn text_inspect_names_version_algorithms_and_blobs() {
    let case = "v6-lz4-sha256-64k";
    let out = Command::new(env!("CARGO_BIN_EXE_rafsd"))
        .arg("inspect")
        .arg(manifest::case_bootstrap(case))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for want in [
        "RAFS v6",
        "lz4_block",
        "sha256",
        "0x10000",
        "6a4871799aac978c2a2e2942a3a4d9223c14d274141ca71264df888d40cdc3af",
    ] {
        assert!(
            text.contains(want),
            "inspect output lacks {want:?}:\n{text}"
        );
    }
}

#[test]
fn lookup_and_readdir_agree_on_a_3000_entry_directory() {
    for case in ["v5-none-aligned", "v6-zstd-blake3"] {
        let image = open(case, false);
        let special = image
            .lookup(image.root_ino(), b"special")
            .unwrap()
            .expect("special/");
        let bigdir = image
            .lookup(special, b"bigdir")
            .unwrap()
            .expect("special/bigdir");
        let mut names = Vec::new();
        image
            .read_dir(bigdir, 0, &mut |e| {
                names.push((e.name, e.ino, e.offset));
                Ok(true)
            })
            .unwrap();
        assert_eq!(names.len(), 3000, "{case}");
        for (i, (name, ino, offset)) in names.iter().enumerate() {
            // Cookies are unique and increase in listing order (v5: ordinals; v6: block and slot).
            assert!(
                *offset > 0 && (i == 0 || *offset > names[i - 1].2),
                "{case}: cookie {offset} of entry {i}"
            );
            assert_eq!(
                image.lookup(bigdir, name).unwrap(),
                Some(*ino),
                "{case}: lookup {:?}",
                String::from_utf8_lossy(name)
            );
        }
        // Resuming from any cookie continues exactly after that entry.
        let mut resumed = Vec::new();
        image
            .read_dir(bigdir, names[1233].2, &mut |e| {
                resumed.push(e.name);
                Ok(resumed.len() < 3)
            })
            .unwrap();
        assert_eq!(
            resumed,
            vec![
                names[1234].0.clone(),
                names[1235].0.clone(),
                names[1236].0.clone()
            ],
            "{case}"
        );
        // Every cookie resumes at the very next entry.
        for (i, pair) in names.windows(2).enumerate() {
            let mut next = None;
            image
                .read_dir(bigdir, pair[0].2, &mut |e| {
                    next = Some((e.name, e.offset));
                    Ok(false)
                })
                .unwrap();
            assert_eq!(
                next,
                Some((pair[1].0.clone(), pair[1].2)),
                "{case}: after entry {i}"
            );
        }
        let mut after_last = 0;
        image
            .read_dir(bigdir, names[names.len() - 1].2, &mut |_| {
                after_last += 1;
                Ok(true)
            })
            .unwrap();
        assert_eq!(after_last, 0, "{case}: nothing after the last cookie");
        assert_eq!(image.lookup(bigdir, b"f99999").unwrap(), None, "{case}");
    }
}

#[test]
fn partial_reads_match_whole_file_reads() {
    // tail-unaligned spans two 1 MiB chunks with a one-byte tail; random-2m5 spans several chunks.
    for case in [
        "v5-zstd-sha256-128k",
        "v6-none-blake3-4k",
        "v6-zstd-batch",
        "v6-inline-meta",
    ] {
        let image = open(case, true);
        let special = image.lookup(image.root_ino(), b"special").unwrap().unwrap();
        for name in [&b"tail-unaligned"[..], b"random-2m5", b"xattrs"] {
            let ino = image.lookup(special, name).unwrap().unwrap();
            let size = image.inode(ino).unwrap().size as usize;
            let mut whole = vec![0u8; size + 100];
            assert_eq!(image.read(ino, 0, &mut whole).unwrap(), size);
            for (off, len) in [
                (0usize, 1usize),
                (4095, 2),
                (size.saturating_sub(1), 10),
                (size / 2, 70_000),
                (size, 5),
            ] {
                let mut part = vec![0u8; len];
                let n = image.read(ino, off as u64, &mut part).unwrap();
                let want_n = len.min(size.saturating_sub(off));
                assert_eq!(
                    n,
                    want_n,
                    "{case} {:?} at {off}",
                    String::from_utf8_lossy(name)
                );
                let from = off.min(size);
                assert_eq!(
                    &part[..n],
                    &whole[from..from + n],
                    "{case} {:?} at {off}",
                    String::from_utf8_lossy(name)
                );
            }
        }
    }
}
