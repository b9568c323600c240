//! Compile the seccomp policy of the target architecture (`seccomp/<arch>.json`) into BPF, once per
//! mismatch action, so the daemon embeds ready programs and needs no JSON or serde at run time.
//!
//! A policy file holds several filters: `rafsd` (the daemon's allow-list), `supervisor` (the supervisor's)
//! and `refuse_*` (calls the daemon's libraries make and cope without, answered with an errno instead of
//! the allow-list's mismatch action). `OUT_DIR/seccomp-<action>.bpf` holds all of them for one mismatch
//! action, each as `[name length: u8][name][instruction count: u32 LE][sock_filter array]` (8 bytes per
//! instruction, native endian), which `src/seccomp.rs` includes with `include_bytes!`.

use std::path::PathBuf;

mod build_info;

/// The mismatch actions `--seccomp` can choose, as seccompiler's JSON spells them.
const ACTIONS: &[(&str, &str)] = &[
    ("kill", "\"kill_process\""),
    ("log", "\"log\""),
    ("trap", "\"trap\""),
];

/// Every architecture with a policy here; each build compiles them all, so a mistake in a policy for
/// another architecture (a syscall name it does not have) fails the build on any machine.
const POLICIES: &[&str] = &["x86_64", "aarch64"];

/// Check what seccompiler does not: the filter names the daemon looks for, `refuse_*` filters that only
/// refuse (their mismatch lets the call on to the next filter), and no syscall listed both without
/// conditions and with some (seccompiler would silently keep only the conditional rules).
fn check_layout(path: &str, text: &str) {
    let policy: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let filters = policy
        .as_object()
        .unwrap_or_else(|| panic!("{path}: not a map"));
    for required in ["rafsd", "supervisor"] {
        assert!(
            filters.contains_key(required),
            "{path}: no {required:?} filter"
        );
    }
    for (name, filter) in filters {
        let allow_list = name == "rafsd" || name == "supervisor";
        assert!(
            allow_list || name.starts_with("refuse_"),
            "{path}: filter {name:?} is neither an allow-list nor refuse_*"
        );
        let mismatch = &filter["mismatch_action"];
        if allow_list {
            assert_eq!(mismatch, "kill_process", "{path}: {name} mismatch_action");
        } else {
            assert_eq!(mismatch, "allow", "{path}: {name} mismatch_action");
            assert!(
                filter["match_action"].get("errno").is_some(),
                "{path}: {name} must answer with an errno"
            );
        }
        let mut plain = std::collections::BTreeSet::new();
        let mut conditional = std::collections::BTreeSet::new();
        for rule in filter["filter"].as_array().into_iter().flatten() {
            let syscall = rule["syscall"].as_str().unwrap_or_default();
            if rule.get("args").is_some() {
                conditional.insert(syscall);
            } else {
                assert!(
                    plain.insert(syscall),
                    "{path}: {name} lists {syscall} twice"
                );
            }
        }
        if let Some(both) = plain.intersection(&conditional).next() {
            panic!("{path}: {name} lists {both} both with and without conditions");
        }
    }
}

fn main() {
    build_info::emit();
    for other in POLICIES {
        let path = format!("seccomp/{other}.json");
        println!("cargo:rerun-if-changed={path}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        check_layout(&path, &text);
        let target: seccompiler::TargetArch = (*other).try_into().expect("known architecture");
        seccompiler::compile_from_json(text.as_bytes(), target)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let policy = PathBuf::from("seccomp").join(format!("{arch}.json"));
    println!("cargo:rerun-if-changed={}", policy.display());
    // Paths are relative to the package root, where this script is not: a path that does not exist
    // would make cargo rerun the script, and rebuild the crate, on every build.
    println!("cargo:rerun-if-changed=seccomp/build.rs");
    println!("cargo:rerun-if-changed=seccomp/build_info.rs");
    let Ok(text) = std::fs::read_to_string(&policy) else {
        // No policy for this architecture: the daemon refuses `--seccomp kill|log|trap` at run time.
        for (name, _) in ACTIONS {
            std::fs::write(out.join(format!("seccomp-{name}.bpf")), [])
                .expect("write empty filter");
        }
        return;
    };
    let target: seccompiler::TargetArch = arch
        .as_str()
        .try_into()
        .unwrap_or_else(|e| panic!("seccomp: unsupported architecture {arch}: {e:?}"));
    for (name, action) in ACTIONS {
        // The allow-lists as written kill on a mismatch; the log and trap programs swap that action.
        let variant = text.replace(
            "\"mismatch_action\": \"kill_process\"",
            &format!("\"mismatch_action\": {action}"),
        );
        let programs = seccompiler::compile_from_json(variant.as_bytes(), target)
            .unwrap_or_else(|e| panic!("seccomp: {}: {e}", policy.display()));
        // Sorted by name, so the output does not depend on hash order.
        let programs: std::collections::BTreeMap<_, _> = programs.into_iter().collect();
        let mut bytes = Vec::new();
        for (filter, program) in &programs {
            bytes.push(u8::try_from(filter.len()).expect("short filter name"));
            bytes.extend_from_slice(filter.as_bytes());
            bytes.extend_from_slice(&u32::try_from(program.len()).unwrap().to_le_bytes());
            for insn in program {
                bytes.extend_from_slice(&insn.code.to_ne_bytes());
                bytes.push(insn.jt);
                bytes.push(insn.jf);
                bytes.extend_from_slice(&insn.k.to_ne_bytes());
            }
        }
        std::fs::write(out.join(format!("seccomp-{name}.bpf")), bytes).expect("write filter");
    }
}
