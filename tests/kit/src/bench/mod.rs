//! What the benchmarks (`tests/bench/*.rs`, run by `ci/bench-*.sh`) share.

pub mod harness;
pub mod image;
