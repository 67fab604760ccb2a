//! Helpers for unit tests that build real images with qemu-img / qemu-io and judge our
//! output with them. Tests that need qemu call [`have_qemu`] first and return early with
//! a printed reason when it is missing.

use std::path::Path;
use std::process::Command;

/// True when `qemu-img` and `qemu-io` can run; otherwise prints why the calling test is
/// skipped.
pub fn have_qemu() -> bool {
    let ok = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if ok("qemu-img") && ok("qemu-io") {
        true
    } else {
        eprintln!("SKIPPED: qemu-img/qemu-io not found (install Debian's qemu-utils)");
        false
    }
}

/// Runs `prog args…`, panicking with its stderr when it fails; returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -f FMT -c CMD… FILE` (each command a separate `-c`).
pub fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let f = file.to_str().expect("utf-8 test path");
    args.push(f);
    run("qemu-io", &args);
}

/// `qemu-img convert -O raw` of `file` (format detected by qemu) into memory.
pub fn qemu_raw_bytes(file: &Path, fmt: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.raw");
    let mut args = vec!["convert"];
    if let Some(f) = fmt {
        args.push("-f");
        args.push(f);
    }
    let (src, dst) = (file.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["-O", "raw", src, dst]);
    qemu_img(&args);
    std::fs::read(&out).expect("read converted raw")
}

/// One entry of `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub data: bool,
}

/// `qemu-img map --output=json` of `file`, with adjacent entries of the same `data`
/// merged (so different cluster sizes compare equal).
pub fn qemu_map(file: &Path, fmt: Option<&str>) -> Vec<MapEntry> {
    let mut args = vec!["map", "--output=json"];
    if let Some(f) = fmt {
        args.push("-f");
        args.push(f);
    }
    args.push(file.to_str().unwrap());
    let out = qemu_img(&args);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    let mut merged: Vec<MapEntry> = Vec::new();
    for e in v.as_array().expect("array") {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        match merged.last_mut() {
            Some(m) if m.data == data && m.start + m.length == start => m.length += length,
            _ => merged.push(MapEntry {
                start,
                length,
                data,
            }),
        }
    }
    merged
}

/// The data runs of a merged map, as `(start, length)`.
pub fn data_runs(map: &[MapEntry]) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|e| e.data)
        .map(|e| (e.start, e.length))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), for test data that does not compress.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
