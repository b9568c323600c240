//! Compile the seccomp allow-list of the target architecture (`seccomp/<arch>.json`) into BPF, once per
//! mismatch action, so the daemon embeds ready programs and needs no JSON or serde at run time.
//!
//! Each program is written to `OUT_DIR/seccomp-<action>.bpf` as the raw `sock_filter` array (8 bytes per
//! instruction, native endian), which `src/seccomp.rs` includes with `include_bytes!`.

use std::path::PathBuf;

/// The mismatch actions `--seccomp` can choose, as seccompiler's JSON spells them.
const ACTIONS: &[(&str, &str)] = &[
    ("kill", "\"kill_process\""),
    ("log", "\"log\""),
    ("trap", "\"trap\""),
];

/// Every architecture with a policy here; each build compiles them all, so a mistake in a policy for
/// another architecture (a syscall name it does not have) fails the build on any machine.
const POLICIES: &[&str] = &["x86_64", "aarch64"];

fn main() {
    for other in POLICIES {
        println!("cargo:rerun-if-changed=seccomp/{other}.json");
        let text = std::fs::read_to_string(format!("seccomp/{other}.json"))
            .unwrap_or_else(|e| panic!("seccomp/{other}.json: {e}"));
        let target: seccompiler::TargetArch = (*other).try_into().expect("known architecture");
        seccompiler::compile_from_json(text.as_bytes(), target)
            .unwrap_or_else(|e| panic!("seccomp/{other}.json: {e}"));
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let policy = PathBuf::from("seccomp").join(format!("{arch}.json"));
    println!("cargo:rerun-if-changed={}", policy.display());
    // Paths are relative to the package root, where this script is not: a path that does not exist
    // would make cargo rerun the script, and rebuild the crate, on every build.
    println!("cargo:rerun-if-changed=seccomp/build.rs");
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
        // The policy as written kills on a mismatch; the log and trap programs swap that action.
        let variant = text.replace(
            "\"mismatch_action\": \"kill_process\"",
            &format!("\"mismatch_action\": {action}"),
        );
        assert!(
            variant.contains(action),
            "seccomp: {} must say \"mismatch_action\": \"kill_process\"",
            policy.display()
        );
        let mut programs = seccompiler::compile_from_json(variant.as_bytes(), target)
            .unwrap_or_else(|e| panic!("seccomp: {}: {e}", policy.display()));
        let program = programs
            .remove("rafsd")
            .unwrap_or_else(|| panic!("seccomp: {} has no \"rafsd\" filter", policy.display()));
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for insn in &program {
            bytes.extend_from_slice(&insn.code.to_ne_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_ne_bytes());
        }
        std::fs::write(out.join(format!("seccomp-{name}.bpf")), bytes).expect("write filter");
    }
}
