//! Benchmark of the qcow2/QED view layouts and of the import converter.
//!
//! 1. Layout: a sparse raw file of 1 TiB virtual size holding 100 MiB of data (100
//!    extents of 1 MiB, then 1600 extents of 64 KiB), and the time and peak memory
//!    (`VmHWM`) to compute its `disk.qcow2` and `disk.qed` layouts, plus the time to
//!    read the whole qcow2 view; then the same over a 1 TiB qcow2 source.
//! 2. Converter: a ~1 GiB raw file (768 MiB of incompressible data, the rest holes and
//!    explicit zeroes) converted by `to_qcow2_layer`, beside `qemu-img convert -O qcow2`
//!    of the same file in the same run.
//!
//! Run: `cargo run --release --example layout_bench [DIR]` (DIR defaults to a temporary
//! directory; it needs ~2.5 GiB free).

use pcocc_imagefs::image::convert::to_qcow2_layer;
use pcocc_imagefs::image::raw::RawLayer;
use pcocc_imagefs::image::{Disk, Format, Layer};
use pcocc_imagefs::view::{View, ViewId};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

/// Peak resident memory of this process so far, in KiB (`VmHWM` of /proc/self/status).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Incompressible bytes (xorshift), fast enough not to dominate the set-up.
fn fill_noise(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// A sparse raw file of `size` bytes with `count` extents of `extent` bytes spread evenly.
fn sparse_raw(path: &Path, size: u64, count: u64, extent: u64) -> Arc<Disk> {
    let f = File::create(path).expect("create raw");
    f.set_len(size).expect("size raw");
    let mut buf = vec![0u8; extent as usize];
    let stride = size / count;
    for i in 0..count {
        fill_noise(&mut buf, i + 1);
        // Spread, and off the cluster grid by a little so runs are not all aligned.
        let at = (i * stride + (i % 7) * 4096) & !4095;
        f.write_all_at(&buf, at).expect("write raw");
    }
    f.sync_all().expect("sync raw");
    disk(path)
}

fn disk(path: &Path) -> Arc<Disk> {
    let layer: Arc<dyn Layer> = Arc::new(RawLayer::open(path).expect("open raw"));
    Arc::new(Disk::new(vec![layer]))
}

fn bench_layouts(dir: &Path, count: u64, extent: u64) {
    let path = dir.join(format!("sparse-{count}x{extent}.raw"));
    let disk = sparse_raw(&path, TIB, count, extent);
    println!(
        "layout: 1 TiB virtual, {} MiB of data in {count} extents of {} KiB",
        count * extent / MIB,
        extent >> 10
    );
    let rss0 = peak_rss_kib();
    for format in [Format::Qcow2, Format::Qed] {
        let t = Instant::now();
        let view = View::new(disk.clone(), format, ViewId([0; 32])).expect("layout");
        let took = t.elapsed();
        println!(
            "  {format}: layout {:.3} ms, view {} bytes, peak RSS {} KiB (before layouts {} KiB)",
            took.as_secs_f64() * 1e3,
            view.size(),
            peak_rss_kib(),
            rss0
        );
        if format == Format::Qcow2 {
            let t = Instant::now();
            let mut buf = vec![0u8; MIB as usize];
            let mut pos = 0;
            loop {
                let n = view.read_at(&mut buf, pos).expect("read view");
                if n == 0 {
                    break;
                }
                pos += n as u64;
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "  {format}: sequential read of the whole view {:.3} s, {:.0} MB/s",
                s,
                pos as f64 / s / 1e6
            );
        }
    }
    std::fs::remove_file(&path).ok();
}

/// The same measure over a 1 TiB qcow2 (written by qemu-io) read through our qcow2
/// reader, so the allocation walk goes through L1/L2 tables instead of `SEEK_DATA`.
fn bench_qcow2_source(dir: &Path) {
    let path = dir.join("sparse.qcow2");
    let p = path.to_str().expect("utf-8 path");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", p, "1T"])
        .status();
    if !matches!(created, Ok(s) if s.success()) {
        println!("layout over qcow2: qemu-img unavailable, skipped");
        return;
    }
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    for i in 0..100u64 {
        args.push("-c".into());
        args.push(format!(
            "write -P {} {} 1M",
            i + 1,
            i * (TIB / 100) / MIB * MIB
        ));
    }
    args.push(p.into());
    let ok = Command::new("qemu-io")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .status();
    if !matches!(ok, Ok(s) if s.success()) {
        println!("layout over qcow2: qemu-io failed, skipped");
        return;
    }
    let policy = pcocc_imagefs::image::chain::NoBacking;
    let t = Instant::now();
    let disk = Arc::new(pcocc_imagefs::image::chain::open_chain(&path, &policy).expect("open"));
    let open = t.elapsed();
    println!(
        "layout: 1 TiB virtual qcow2, 100 MiB of data in 100 extents of 1 MiB (open {:.3} ms)",
        open.as_secs_f64() * 1e3
    );
    for format in [Format::Qcow2, Format::Qed] {
        let t = Instant::now();
        let view = View::new(disk.clone(), format, ViewId([0; 32])).expect("layout");
        println!(
            "  {format}: layout {:.3} ms, view {} bytes, peak RSS {} KiB",
            t.elapsed().as_secs_f64() * 1e3,
            view.size(),
            peak_rss_kib()
        );
    }
    std::fs::remove_file(&path).ok();
}

fn bench_converter(dir: &Path) {
    let src = dir.join("convert-src.raw");
    let f = File::create(&src).expect("create source");
    let size = 1u64 << 30;
    f.set_len(size).expect("size source");
    let mut buf = vec![0u8; 16 * MIB as usize];
    // 48 extents of 16 MiB of noise (768 MiB), every fourth 16 MiB slot left a hole,
    // and one slot of explicit zeroes.
    for slot in 0..(size / (16 * MIB)) {
        let at = slot * 16 * MIB;
        match slot % 4 {
            3 => continue,
            _ if slot == 5 => {
                buf.fill(0);
            }
            _ => fill_noise(&mut buf, slot + 100),
        }
        f.write_all_at(&buf, at).expect("write source");
    }
    f.sync_all().expect("sync source");
    drop(f);
    let disk = disk(&src);
    println!(
        "converter: 1 GiB raw, {} MiB allocated",
        disk.top().allocated_bytes() / MIB
    );
    // For scale: sha256 alone over as many bytes as the layer holds, in memory (the
    // converter must hash every byte it writes; qemu-img does not hash).
    {
        use sha2::{Digest, Sha256};
        let buf = vec![0x5au8; 4 * MIB as usize];
        let t = Instant::now();
        let mut h = Sha256::new();
        let rounds = 788_922_368 / buf.len();
        for _ in 0..rounds {
            h.update(&buf);
        }
        let _ = h.finalize();
        let s = t.elapsed().as_secs_f64();
        println!(
            "  sha256 alone over {} MiB in memory: {s:.3} s ({:.0} MB/s)",
            rounds * 4,
            (rounds * buf.len()) as f64 / s / 1e6
        );
    }
    // Three rounds, alternating which converter goes first, so neither always meets a
    // colder page cache or a busier disk.
    for round in 0..3 {
        if round % 2 == 0 {
            run_ours(dir, &disk, size, round);
            run_qemu(dir, &src, size, round);
        } else {
            run_qemu(dir, &src, size, round);
            run_ours(dir, &disk, size, round);
        }
    }
    for p in ["convert-src.raw", "ours.qcow2", "qemu.qcow2"] {
        std::fs::remove_file(dir.join(p)).ok();
    }
}

fn run_ours(dir: &Path, disk: &Disk, size: u64, round: u32) {
    let out_path = dir.join("ours.qcow2");
    let out = File::create(&out_path).expect("create output");
    let t = Instant::now();
    let got = to_qcow2_layer(disk, &out, &out_path, &mut |_, _| {}).expect("convert");
    let conv = t.elapsed().as_secs_f64();
    out.sync_all().expect("sync output");
    let synced = t.elapsed().as_secs_f64();
    println!(
        "  to_qcow2_layer (round {round}): {conv:.3} s ({:.0} MB/s of virtual size), \
         {synced:.3} s with fsync, {} bytes, sha256 {}…",
        size as f64 / conv / 1e6,
        got.len,
        &got.sha256[..16]
    );
}

fn run_qemu(dir: &Path, src: &Path, size: u64, round: u32) {
    let qemu_out = dir.join("qemu.qcow2");
    let t = Instant::now();
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(src)
        .arg(&qemu_out)
        .status();
    let q = t.elapsed().as_secs_f64();
    match status {
        Ok(s) if s.success() => println!(
            "  qemu-img convert -O qcow2 (round {round}): {q:.3} s ({:.0} MB/s), {} bytes",
            size as f64 / q / 1e6,
            std::fs::metadata(&qemu_out).map(|m| m.len()).unwrap_or(0)
        ),
        other => println!("  qemu-img convert unavailable: {other:?}"),
    }
}

fn main() {
    let tmp;
    let dir = match std::env::args_os().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("tempdir");
            tmp.path().to_path_buf()
        }
    };
    bench_layouts(&dir, 100, MIB);
    bench_layouts(&dir, 1600, 64 << 10);
    bench_qcow2_source(&dir);
    bench_converter(&dir);
}
