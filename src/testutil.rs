//! Helpers for unit tests that build real images with qemu-img / qemu-io and judge our
//! output with them. Tests that need qemu call [`have_qemu`] first and return early with
//! a printed reason when it is missing — except in a run that must not skip (CI), where
//! they fail ([`skip`]).

use std::path::{Path, PathBuf};
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
        skip("qemu-img/qemu-io not found (install Debian's qemu-utils)");
        false
    }
}

/// Whether this run must not skip a test: in CI (env `CI` set and not `false`) or with
/// `PCOCC_IMAGEFS_NO_SKIP=1`.
pub fn no_skip() -> bool {
    let set =
        |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("PCOCC_IMAGEFS_NO_SKIP")
}

/// Says why the calling test skips its checks; fails it instead in a run that must not
/// skip ([`no_skip`]).
#[track_caller]
pub fn skip(reason: &str) {
    assert!(
        !no_skip(),
        "this run must not skip a test, and this one would: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
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

/// `qemu-img create -q -f FMT [-o OPTS] DIR/NAME SIZE` (no `-o` when `opts` is empty);
/// returns the new file's path.
pub fn qemu_create(dir: &Path, fmt: &str, name: &str, size: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p.to_str().expect("utf-8 test path"), size]);
    qemu_img(&args);
    p
}

/// A new empty file `f` in a fresh temporary directory, open for reading and writing
/// (the directory goes when its handle is dropped).
pub fn scratch_file() -> (tempfile::TempDir, std::fs::File) {
    let dir = tempfile::tempdir().unwrap();
    let f = new_rw_file(&dir.path().join("f"));
    (dir, f)
}

/// `path` created empty (or emptied), open for reading and writing.
pub fn new_rw_file(path: &Path) -> std::fs::File {
    std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
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

/// Writes `view` to `path` the way a sparse-aware reader would: only its data extents,
/// each read through [`crate::view::View::read_at`] in uneven `chunk`-byte pieces, then
/// the file length set to the view's size (so holes stay holes). Returns the sha256 of
/// the whole view content (holes included).
pub fn write_view_sparse(view: &crate::view::View, path: &Path, chunk: usize) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create view copy");
    let mut buf = vec![0u8; chunk];
    for (start, len) in view.data_extents().expect("view extents") {
        let mut pos = start;
        while pos < start + len {
            let n = chunk.min((start + len - pos) as usize);
            let got = view.read_at(&mut buf[..n], pos).expect("view read");
            assert_eq!(got, n, "short read inside a data extent at {pos}");
            f.write_all_at(&buf[..n], pos).expect("write view copy");
            pos += n as u64;
        }
    }
    f.set_len(view.size()).expect("set view length");
    drop(f);
    // Hash by a plain sequential read of the whole view (holes read as zeroes).
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let mut big = vec![0u8; 1 << 20];
    loop {
        let n = view.read_at(&mut big, pos).expect("view read");
        if n == 0 {
            break;
        }
        h.update(&big[..n]);
        pos += n as u64;
    }
    assert_eq!(pos, view.size(), "sequential read must cover the view");
    format!("{:x}", h.finalize())
}

/// Judges a generated view file with qemu-img: the format is detected without `-f` as
/// `fmt` with exactly `virtual_size`; `qemu-img check` finds no error; `qemu-img compare`
/// with `source` (read as `source_fmt`) says identical.
pub fn assert_qemu_accepts(
    view_file: &Path,
    fmt: &str,
    virtual_size: u64,
    source: &Path,
    source_fmt: &str,
) {
    let file = view_file.to_str().unwrap();
    let info = qemu_img(&["info", "--output=json", file]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info json");
    assert_eq!(
        v["format"].as_str(),
        Some(fmt),
        "format detected by qemu-img for {file}"
    );
    assert_eq!(
        v["virtual-size"].as_u64(),
        Some(virtual_size),
        "virtual size of {file}"
    );
    if fmt != "raw" {
        let out = Command::new("qemu-img")
            .args(["check", "-f", fmt, file])
            .output()
            .expect("run qemu-img check");
        // Exit 63 means "this format does not support checks" (vpc): nothing to judge.
        assert!(
            out.status.success() || out.status.code() == Some(63),
            "qemu-img check {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let src = source.to_str().unwrap();
    let out = qemu_img(&["compare", "-f", fmt, "-F", source_fmt, file, src]);
    assert!(
        out.contains("Images are identical"),
        "compare {file} {src}: {out}"
    );
}

#[path = "../tests/common/foreign.rs"]
mod foreign;
pub use foreign::{FOREIGN_FORMATS, foreign_bytes, foreign_image};
