//! Helpers shared by the in-process benchmarks (included with `#[path]`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `prog args…`, panicking with its stderr when it fails; returns its wall time.
pub fn run(prog: &str, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// A path as the `&str` an argument list wants.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
