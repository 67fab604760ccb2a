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
//! * `qemu raw`: `qemu-img convert -O raw` to a file on the same filesystem (one run).
//!
//! Each figure is wall-clock MB/s of guest data and, in parentheses, MB per CPU-second
//! (user + system, of this process or of qemu-img), which stays meaningful when other
//! work competes for the cores.
//!
//! All inputs are read once first so every figure is from the page cache.
//! Run with `cargo run --release --example read_bench` (needs qemu-img and qemu-io);
//! `READ_BENCH_MIB=256` shrinks the data for a quick look.

#[path = "shared.rs"]
mod shared;
use pcocc_imagefs::image::Disk;
use pcocc_imagefs::image::chain::{NoBacking, WithinDir, open_chain};
use shared::{run, s};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of data per input: 1 GiB, or `READ_BENCH_MIB` MiB for a quick look.
fn data_size() -> u64 {
    std::env::var("READ_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        << 20
}
const CHUNK: usize = 1 << 20;

/// Wall time and CPU time (user + system) of one measured action.
#[derive(Clone, Copy, Default)]
struct Cost {
    wall: Duration,
    cpu: Duration,
}

/// CPU time used so far by this process (`RUSAGE_SELF`) or its waited-for children.
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Measures `f`, charging CPU time of this process or of its children.
fn measure(who: libc::c_int, f: impl FnOnce()) -> Cost {
    let (t, c) = (Instant::now(), cpu_time(who));
    f();
    Cost {
        wall: t.elapsed(),
        cpu: cpu_time(who) - c,
    }
}

/// The better of two runs (by wall time).
fn best(mut f: impl FnMut() -> Cost) -> Cost {
    let (a, b) = (f(), f());
    if a.wall <= b.wall { a } else { b }
}

/// 1 GiB of data whose compressibility resembles a system disk: a quarter noise, half
/// low-entropy text, a quarter repeated lines.
fn write_source(path: &Path, size: u64) {
    let mut w = BufWriter::with_capacity(CHUNK, File::create(path).expect("create source"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; CHUNK];
    for i in 0..(size as usize).div_ceil(CHUNK) {
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
                const LETTERS: &[u8] = b"etaoin shrdlu\n\tcmfwyp";
                *b = LETTERS[(x >> 40) as usize % LETTERS.len()];
            }),
            _ => block.iter_mut().enumerate().for_each(|(k, b)| {
                const LINE: &[u8] = b"Nov 28 00:00:01 host kernel: ok\n";
                *b = LINE[k % LINE.len()];
            }),
        }
        w.write_all(&block).expect("write source");
    }
    w.flush().expect("flush source");
}

/// Reads `disk` in 1 MiB chunks with `threads` threads.
fn read_disk(disk: &Disk, threads: u64) {
    let size = disk.virtual_size();
    let per = size.div_ceil(threads).next_multiple_of(CHUNK as u64);
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
}

fn warm(paths: &[PathBuf]) {
    for p in paths {
        std::io::copy(&mut File::open(p).expect("open"), &mut std::io::sink()).expect("warm");
    }
}

/// "wall MB/s (MB per CPU-second)": the second figure does not depend on how busy the
/// machine's other cores are.
fn mbps(bytes: u64, c: Cost) -> String {
    let rate = |d: Duration| bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6;
    format!("{:6.0} ({:5.0})", rate(c.wall), rate(c.cpu))
}

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("read_bench")
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp");
    let d = dir.path();
    let src = d.join("src.raw");
    let t = Instant::now();
    let size = data_size();
    write_source(&src, size);
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
    // The upper layers each overwrite a quarter of the disk.
    let quarter = size / 4;
    for (layer, backing, at) in [
        (&mid, "../../data/aa/base", quarter),
        (&top, "../../data/bb/mid", size * 5 / 8),
    ] {
        let (size, write) = (size.to_string(), format!("write -P 0x5a {at} {quarter}"));
        let create = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2"];
        run("qemu-img", &[&create[..], &[s(layer), &size]].concat());
        run("qemu-io", &["-f", "qcow2", "-c", &write, s(layer)]);
    }
    warm(&[plain.clone(), zlib.clone(), base, mid, top.clone()]);

    println!("MB/s of guest data, wall clock (and per CPU-second), best of two runs");
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14}",
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
        let ours1 = best(|| measure(libc::RUSAGE_SELF, || read_disk(&disk, 1)));
        let ours2 = best(|| measure(libc::RUSAGE_SELF, || read_disk(&disk, 2)));
        let null_target = format!("driver=null-co,size={size}");
        let null_args = [
            "convert",
            "-n",
            "--target-image-opts",
            s(path),
            &null_target,
        ];
        let qnull = best(|| {
            measure(libc::RUSAGE_CHILDREN, || {
                run("qemu-img", &null_args);
            })
        });
        let out = d.join("out.raw");
        let qraw = measure(libc::RUSAGE_CHILDREN, || {
            run("qemu-img", &["convert", "-O", "raw", s(path), s(&out)]);
        });
        fs::remove_file(&out).ok();
        println!(
            "{name:<10} {:>14} {:>14} {:>14} {:>14}",
            mbps(size, ours1),
            mbps(size, ours2),
            mbps(size, qnull),
            mbps(size, qraw)
        );
    }
}
