//! Sequential read throughput of the qcow2 reader beside qemu-img, in one run.
//!
//! Builds, in a temporary directory under /var/tmp, a 1 GiB raw source of mixed data
//! (incompressible noise, low-entropy text, repeated patterns) and three qcow2 inputs
//! from it with qemu-img: plain, zlib-compressed, and a 3-layer chain with relative
//! backing names (as pcocc lays out a repository). For each input it reports:
//!
//! * `ours 1T` / `ours 2T`: `Disk::read_at` in 1 MiB chunks over the whole disk, by one
//!   thread, then by two threads each reading one half;
//! * `qemu null`: `qemu-img convert -n` into qemu's `null-co` driver (reads and decodes
//!   everything, writes nothing), the closest qemu analogue of an in-memory read;
//! * `qemu raw`: `qemu-img convert -O raw` to a file on the same filesystem.
//!
//! All inputs are read once first so every figure is from the page cache.
//! Run with `cargo run --release --example read_bench` (needs qemu-img and qemu-io).

use pcocc_imagefs::image::Disk;
use pcocc_imagefs::image::chain::{NoBacking, WithinDir, open_chain};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;

fn run(prog: &str, args: &[&str]) -> Duration {
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

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// 1 GiB of data whose compressibility resembles a system disk: a quarter noise, half
/// low-entropy text, a quarter repeated lines.
fn write_source(path: &Path) {
    let mut w = BufWriter::with_capacity(CHUNK, File::create(path).expect("create source"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; CHUNK];
    for i in 0..(GIB as usize / CHUNK) {
        match i % 4 {
            0 => block.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8;
            }),
            1 | 3 => block.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = b"etaoin shrdlu\n\tcmfwyp"[(x >> 40) as usize % 22];
            }),
            _ => block
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = b"Nov 28 00:00:01 host kernel: ok\n"[k % 32]),
        }
        w.write_all(&block).expect("write source");
    }
    w.flush().expect("flush source");
}

/// Reads `disk` in 1 MiB chunks with `threads` threads; returns the elapsed time.
fn read_disk(disk: &Disk, threads: u64) -> Duration {
    let size = disk.virtual_size();
    let per = size.div_ceil(threads).next_multiple_of(CHUNK as u64);
    let t = Instant::now();
    std::thread::scope(|sc| {
        for i in 0..threads {
            sc.spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let (mut pos, end) = (i * per, ((i + 1) * per).min(size));
                let mut sum = 0u64;
                while pos < end {
                    let n = CHUNK.min((end - pos) as usize);
                    disk.read_at(&mut buf[..n], pos).expect("read");
                    sum = sum.wrapping_add(u64::from(buf[n - 1]));
                    pos += n as u64;
                }
                std::hint::black_box(sum);
            });
        }
    });
    t.elapsed()
}

fn warm(paths: &[PathBuf]) {
    for p in paths {
        std::io::copy(&mut File::open(p).expect("open"), &mut std::io::sink()).expect("warm");
    }
}

fn mbps(bytes: u64, d: Duration) -> String {
    format!("{:7.0} MB/s", bytes as f64 / d.as_secs_f64() / 1e6)
}

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("read_bench")
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp");
    let d = dir.path();
    let src = d.join("src.raw");
    let t = Instant::now();
    write_source(&src);
    eprintln!("source written in {:.1?}", t.elapsed());

    let plain = d.join("plain.qcow2");
    let zlib = d.join("zlib.qcow2");
    let data = d.join("repo/data");
    for xx in ["aa", "bb", "cc"] {
        fs::create_dir_all(data.join(xx)).expect("mkdir");
    }
    let (base, mid, top) = (
        data.join("aa/base"),
        data.join("bb/mid"),
        data.join("cc/top"),
    );
    let conv = |extra: &[&str], out: &Path| {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([s(&src), s(out)]);
        run("qemu-img", &args)
    };
    eprintln!("qemu-img convert -O qcow2: {:.1?}", conv(&[], &plain));
    eprintln!("qemu-img convert -c -O qcow2: {:.1?}", conv(&["-c"], &zlib));
    conv(&[], &base);
    for (layer, backing, write) in [
        (&mid, "../../data/aa/base", "write -P 0x5a 256M 256M"),
        (&top, "../../data/bb/mid", "write -P 0x6b 640M 256M"),
    ] {
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                backing,
                "-F",
                "qcow2",
                s(layer),
                "1G",
            ],
        );
        run("qemu-io", &["-f", "qcow2", "-c", write, s(layer)]);
    }
    warm(&[plain.clone(), zlib.clone(), base, mid, top.clone()]);

    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12}",
        "input", "ours 1T", "ours 2T", "qemu null", "qemu raw"
    );
    for (name, path, chain) in [
        ("plain", &plain, false),
        ("zlib", &zlib, false),
        ("3-layer", &top, true),
    ] {
        let disk = if chain {
            open_chain(path, &WithinDir { root: data.clone() })
        } else {
            open_chain(path, &NoBacking)
        }
        .expect("open");
        let size = disk.virtual_size();
        let ours1 = (0..2)
            .map(|_| read_disk(&disk, 1))
            .min()
            .unwrap_or_default();
        let ours2 = (0..2)
            .map(|_| read_disk(&disk, 2))
            .min()
            .unwrap_or_default();
        let null_target = format!("driver=null-co,size={size}");
        let qnull = (0..2)
            .map(|_| {
                run(
                    "qemu-img",
                    &[
                        "convert",
                        "-n",
                        "--target-image-opts",
                        s(path),
                        &null_target,
                    ],
                )
            })
            .min()
            .unwrap_or_default();
        let out = d.join("out.raw");
        let qraw = run("qemu-img", &["convert", "-O", "raw", s(path), s(&out)]);
        fs::remove_file(&out).ok();
        println!(
            "{name:<10} {:>12} {:>12} {:>12} {:>12}",
            mbps(size, ours1),
            mbps(size, ours2),
            mbps(size, qnull),
            mbps(size, qraw)
        );
    }
}
