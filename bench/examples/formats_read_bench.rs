//! Sequential read throughput of the qed, vdi, vpc and vmdk readers beside qemu-img, in
//! one run.
//!
//! Builds, in a temporary directory under /var/tmp, a 256 MiB raw source of mixed data
//! (a quarter noise, half low-entropy text, a quarter repeated lines) and converts it
//! with qemu-img to each format (VMDK both monolithicSparse and streamOptimized). For
//! each input it reports `Disk::read_at` in 1 MiB chunks by one and by two threads, and
//! `qemu-img convert -n` into qemu's `null-co` driver (reads and decodes everything,
//! writes nothing). Every input is read once first, so all figures are from the page
//! cache. Run with `cargo run --release --example formats_read_bench`.

#[path = "shared.rs"]
mod shared;
use pcocc_imagefs::image::{Disk, Layer, qed, vdi, vmdk, vpc};
use shared::{run, s};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 256 << 20;
const CHUNK: usize = 1 << 20;

fn write_source(path: &Path) {
    let mut w = BufWriter::with_capacity(CHUNK, File::create(path).expect("create source"));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; CHUNK];
    for i in 0..(SIZE as usize / CHUNK) {
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        match i % 4 {
            0 => block.iter_mut().for_each(|b| *b = (next() >> 24) as u8),
            1 | 3 => {
                let text = b"etaoin shrdlu\n\tcmfwyp";
                block
                    .iter_mut()
                    .for_each(|b| *b = text[(next() >> 40) as usize % text.len()])
            }
            _ => block
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = b"Nov 28 00:00:01 host kernel: ok\n"[k % 32]),
        }
        w.write_all(&block).expect("write source");
    }
    w.flush().expect("flush source");
}

fn read_disk(disk: &Disk, threads: u64) -> Duration {
    let size = disk.virtual_size();
    let per = size.div_ceil(threads).next_multiple_of(CHUNK as u64);
    let t = Instant::now();
    std::thread::scope(|sc| {
        for i in 0..threads {
            sc.spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let (mut pos, end) = (i * per, ((i + 1) * per).min(size));
                while pos < end {
                    let n = CHUNK.min((end - pos) as usize);
                    disk.read_at(&mut buf[..n], pos).expect("read");
                    std::hint::black_box(&buf);
                    pos += n as u64;
                }
            });
        }
    });
    t.elapsed()
}

fn mbps(bytes: u64, d: Duration) -> String {
    format!("{:7.0} MB/s", bytes as f64 / d.as_secs_f64() / 1e6)
}

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("formats_bench")
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp");
    let d = dir.path();
    let src = d.join("src.raw");
    write_source(&src);
    println!(
        "{:<12} {:>12} {:>12} {:>12}",
        "input", "ours 1T", "ours 2T", "qemu null"
    );
    let inputs: [(&str, &str, &[&str]); 5] = [
        ("qed", "qed", &[]),
        ("vdi", "vdi", &[]),
        ("vpc", "vpc", &["-o", "force_size=on"]),
        ("vmdk", "vmdk", &[]),
        ("vmdk-stream", "vmdk", &["-o", "subformat=streamOptimized"]),
    ];
    for (name, fmt, opts) in inputs {
        let path = d.join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.extend([s(&src), s(&path)]);
        run("qemu-img", &args);
        std::io::copy(&mut File::open(&path).expect("open"), &mut std::io::sink()).expect("warm");
        let file = File::open(&path).expect("open");
        let layer: Arc<dyn Layer> = match fmt {
            "qed" => Arc::new(qed::open(file, &path).expect("open qed")),
            "vdi" => Arc::new(vdi::open(file, &path).expect("open vdi")),
            "vpc" => Arc::new(vpc::open(file, &path).expect("open vpc")),
            _ => Arc::new(vmdk::open(file, &path).expect("open vmdk")),
        };
        let disk = Disk::new(vec![layer]);
        let size = disk.virtual_size();
        let best = |threads| {
            (0..2)
                .map(|_| read_disk(&disk, threads))
                .min()
                .unwrap_or_default()
        };
        let (ours1, ours2) = (best(1), best(2));
        let null_target = format!("driver=null-co,size={size}");
        let qnull = (0..2)
            .map(|_| {
                run(
                    "qemu-img",
                    &[
                        "convert",
                        "-n",
                        "-f",
                        fmt,
                        "--target-image-opts",
                        s(&path),
                        &null_target,
                    ],
                )
            })
            .min()
            .unwrap_or_default();
        println!(
            "{name:<12} {:>12} {:>12} {:>12}",
            mbps(size, ours1),
            mbps(size, ours2),
            mbps(size, qnull)
        );
    }
}
