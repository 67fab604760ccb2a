//! Bounded resources through a real mount (issue 7, point 5): the daemon's peak resident
//! memory (`VmHWM` in `/proc/PID/status`) stays under a stated bound while it serves a
//! 1 TiB-virtual sparse image end to end in every format, lists a repository of 10,000
//! images, imports a 4 GiB image, and imports 102 images 16 at a time (whose RSS once
//! they have ended is checked too: no thread keeps what its imports used). Each test mounts its own daemon, so the peak it reads
//! is that workload's alone. The descriptor-leak promise (10,000 open/close cycles) is
//! `ten_thousand_opens_and_closes_leak_no_descriptor_in_the_daemon` in `tests/mount.rs`.
//!
//! The bounds are peaks of memory, not timings, so the machine's load does not move them.
//! They come from `bench/resources` (release build, figures in the README's
//! "Guarantees") and from these tests' own measurements (debug build), with a margin of
//! about three times the largest figure seen. A blown bound means a cache or a buffer
//! grew with the image; fix that, do not raise the bound.
//!
//! `PCOCC_IMAGEFS_SLOW=1` (set by `.ci/run`) makes the import test write and import 4 GiB
//! of real data (90 s in a debug build on a 2-core VM); without it the 4 GiB source is
//! sparse, with 256 MiB of data (under 10 s); and the many-imports test's two large
//! images 512 MiB of data each instead of 128 MiB (about 20 s either way). The whole file
//! takes about 2 minutes. Needs
//! root, `/dev/fuse`, qemu-img and qemu-io (CI has all of them); without them each test
//! prints why and returns.

mod common;
use common::{daemon_pid, ok, s};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PCOCC: &str = env!("CARGO_BIN_EXE_pcocc");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Peak RSS of the daemon while it reads every view of the 1 TiB sparse image end to end
/// (non-raw views by plain reads, `disk.raw` through SEEK_DATA/SEEK_HOLE plus
/// [`RAW_HOLE_READ`] of plain hole reads). 100 MiB is issue 6's target for a 1 TiB read;
/// measured 2026-11-28: 38 MiB in this test (debug build) and at most 24 MiB per view in
/// `bench/resources` (release build, 2,048 qcow2 L2 tables, 4,096 extents).
const READ_PEAK_RSS_MIB: u64 = 100;
/// Peak RSS of the daemon over `ls -l` of a repository of 10,000 images; measured: 22 MiB
/// here (debug), 25 MiB in `bench/resources` (29 MiB for `ls -l` of every image
/// directory too).
const LIST_PEAK_RSS_MIB: u64 = 64;
/// Peak RSS of the `pcocc image list` process over the same repository; measured 13 MiB
/// here and in `bench/resources`.
const CLI_LIST_PEAK_RSS_MIB: u64 = 48;
/// Peak RSS of the daemon importing a 4 GiB image by `cp`, and of a `pcocc image import`
/// process importing it; measured: 17 MiB for both here (debug, sparse or with
/// `PCOCC_IMAGEFS_SLOW=1` all data) and 17–18 MiB in `bench/resources` (release, 4 GiB of
/// real data, raw or qcow2 source).
const IMPORT_PEAK_RSS_MIB: u64 = 64;

/// Request threads of the many-imports test: the most the daemon starts by default.
const MANY_THREADS: usize = 16;
/// Small images of the many-imports test, and the data of each: enough for all three of
/// the converter's 4 MiB buffers.
const SMALL_IMPORTS: usize = 100;
const SMALL_IMPORT: u64 = 10 * MIB;
/// Large images of the many-imports test, and the data of each (all written) with
/// `PCOCC_IMAGEFS_SLOW=1` and without.
const LARGE_IMPORTS: usize = 2;
const LARGE_IMPORT: u64 = 512 * MIB;
const LARGE_IMPORT_QUICK: u64 = 128 * MIB;
/// `cp` processes of the many-imports test running at once: one per request thread.
const CONCURRENT_COPIES: usize = 16;

/// The README's bounds for a daemon with `threads` request threads. While imports run
/// (each request thread converting one at most): 16 MiB plus 14 MiB per thread, as each
/// conversion holds three 4 MiB buffers. Measured 75–144 MiB in this test (debug build,
/// 16 threads all converting). Once they have ended: 16 MiB plus 2 MiB per thread (each
/// keeps its FUSE request buffer); measured 23–24 MiB here with 16 threads (5–7 MiB fresh),
/// against 219 MiB when every thread kept its conversion buffers.
fn import_peak_rss_bound_mib(threads: usize) -> u64 {
    16 + 14 * threads as u64
}

fn after_imports_rss_bound_mib(threads: usize) -> u64 {
    16 + 2 * threads as u64
}

/// Virtual size of the sparse image: 1 TiB.
const VIRTUAL: u64 = 1 << 40;
/// Data extents spread over it, one per `VIRTUAL / SPARSE_EXTENTS` slot: 512 extents
/// touch 512 qcow2 L2 tables (32 MiB of tables, four times the reader's 8 MiB L2 cache)
/// while keeping the VHD view (one 2 MiB block per extent) near 1 GiB to read.
const SPARSE_EXTENTS: u64 = 512;
/// Plain reads of `disk.raw` holes: 1 GiB, in four windows spread over the disk. The
/// whole 1 TiB of zeros takes a quarter of an hour through FUSE; SEEK_DATA covers it.
const RAW_HOLE_READ: u64 = GIB;
/// Revisions of the listing test: 10,000 images of one revision each.
const IMAGES: usize = 10_000;
/// The import source: 4 GiB of virtual size.
const IMPORT_SIZE: u64 = 4 * GIB;
/// Data in the import source without `PCOCC_IMAGEFS_SLOW`: 64 extents of 4 MiB.
const IMPORT_SPARSE_EXTENTS: u64 = 64;
const IMPORT_EXTENT: u64 = 4 * MIB;
/// Read and write buffer of the tests.
const BUF: usize = MIB as usize;

fn slow() -> bool {
    std::env::var("PCOCC_IMAGEFS_SLOW").as_deref() == Ok("1")
}

/// A small deterministic generator (splitmix64): the same images on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One daemon over one repository `r`, in a temporary directory; unmounted when dropped.
struct Mounted {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    pid: i32,
}

impl Mounted {
    /// A scratch directory with an empty repository `r`, not mounted yet: the test fills
    /// the repository, then calls [`Mounted::mount`].
    fn prepare() -> Option<Mounted> {
        let dir = common::mount_scratch("resource", &["qemu-img", "qemu-io"])?;
        let m = Mounted {
            mnt: dir.path().join("mnt"),
            dir,
            pid: 0,
        };
        for d in ["data", "meta", ".tmp"] {
            fs::create_dir_all(m.repo().join(d)).unwrap();
        }
        fs::write(m.repo().join(".config"), "version: 2\n").unwrap();
        fs::create_dir_all(m.work()).unwrap();
        fs::create_dir_all(&m.mnt).unwrap();
        fs::write(
            m.config(),
            format!("repos:\n  - name: r\n    path: {}\n", s(&m.repo())),
        )
        .unwrap();
        Some(m)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("repos.yaml")
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Starts the daemon; it returns once the mount is live.
    fn mount(&mut self) {
        self.mount_with(&[]);
    }

    /// Starts the daemon with the options `extra` besides the configuration.
    fn mount_with(&mut self, extra: &[&str]) {
        let config = self.config();
        let mut args = vec!["--config", s(&config)];
        args.extend_from_slice(extra);
        args.push(s(&self.mnt));
        common::start_daemon(&args, &self.mnt, "warn");
        self.pid = daemon_pid(&self.mnt).expect("the daemon's pid");
    }

    /// The daemon's resident set now, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("the daemon's /proc status");
        status_kib(&status, "VmRSS:").expect("VmRSS in /proc/PID/status") as f64 / 1024.0
    }

    /// The daemon's peak resident set so far, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("the daemon's /proc status");
        vm_hwm_kib(&status).expect("VmHWM in /proc/PID/status") as f64 / 1024.0
    }

    /// Stores the qcow2 file `layer` as the only layer of revision `name@0` (moved into
    /// `data/`, named by its sha256), as pcocc keeps one; returns the layer's hash.
    fn store_layer(&self, name: &str, layer: &Path) -> String {
        let h = sha256_file(layer);
        let dst = self.repo().join("data").join(&h[..2]).join(&h);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::rename(layer, &dst).unwrap();
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o444)).unwrap();
        self.write_meta(name, &h);
        h
    }

    fn write_meta(&self, name: &str, layer: &str) {
        fs::write(
            self.repo().join("meta").join(format!("{name}@0")),
            format!(
                "{{\"name\": \"{name}\", \"revision\": 0, \"kind\": \"vm\", \"owner\": \"root\", \"timestamp\": 1795749382.5, \"data_blobs\": [\"{layer}\"], \"custom_meta\": {{}}}}"
            ),
        )
        .unwrap();
    }

    /// The stored top layer of `name@0` (after an import).
    fn layer_of(&self, name: &str) -> PathBuf {
        let meta = fs::read_to_string(self.repo().join("meta").join(format!("{name}@0")))
            .unwrap_or_else(|e| panic!("{name}@0 has no metadata: {e}"));
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let top = v["data_blobs"]
            .as_array()
            .and_then(|a| a.last())
            .and_then(|h| h.as_str())
            .expect("a layer hash")
            .trim_start_matches("sha256:")
            .to_string();
        self.repo().join("data").join(&top[..2]).join(&top)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        common::unmount(&self.mnt);
    }
}

/// `VmHWM` (peak resident set) in KiB from the text of `/proc/PID/status`.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    status_kib(status, "VmHWM:")
}

/// The KiB figure of the `field` line (`VmRSS:`, `VmHWM:`) of `/proc/PID/status`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cmd` to its end with its standard output in `out` (and its standard error
/// beside it) and returns its peak resident set in MiB, from the kernel's accounting of
/// that one child (`wait4`).
#[track_caller]
// The child is reaped by wait4, which std's `Child::wait` cannot do while returning the
// child's own rusage.
#[allow(clippy::zombie_processes)]
fn peak_rss_of_command(cmd: &mut Command, out: &Path) -> f64 {
    let err_path = out.with_extension("stderr");
    let child = cmd
        .stdout(fs::File::create(out).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for the kernel to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid, with pointers to live locals.
    let got = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(got, child.id() as i32, "wait4 {cmd:?}");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed (wait status {status}): {}",
        fs::read_to_string(&err_path).unwrap_or_default()
    );
    // ru_maxrss is in KiB on Linux.
    usage.ru_maxrss as f64 / 1024.0
}

fn sha256_file(p: &Path) -> String {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A guest write of the sparse image: `len` bytes of `pattern` at `off`.
#[derive(Clone, Copy, Debug)]
struct GuestWrite {
    off: u64,
    len: u64,
    pattern: u8,
}

/// The writes of the 1 TiB image: one extent of 4..64 KiB (4 KiB aligned) at a seeded
/// place in each of [`SPARSE_EXTENTS`] equal slots, the last one ending at the disk's end,
/// so data spans the whole range. Sorted by offset, never overlapping.
fn sparse_writes() -> Vec<GuestWrite> {
    let mut rng = Rng(20261128);
    let slot = VIRTUAL / SPARSE_EXTENTS;
    (0..SPARSE_EXTENTS)
        .map(|i| {
            let len = 4096 * (1 + rng.below(16));
            let off = if i == SPARSE_EXTENTS - 1 {
                VIRTUAL - len
            } else {
                i * slot + 4096 * rng.below((slot - len) / 4096)
            };
            GuestWrite {
                off,
                len,
                pattern: 1 + rng.below(255) as u8,
            }
        })
        .collect()
}

/// What the guest disk holds at `[off, off + buf.len())`: the writes' patterns, zeros
/// elsewhere.
fn expected(writes: &[GuestWrite], off: u64, buf: &mut [u8]) {
    buf.fill(0);
    let end = off + buf.len() as u64;
    let first = writes.partition_point(|w| w.off + w.len <= off);
    for w in writes[first..].iter().take_while(|w| w.off < end) {
        let a = w.off.max(off);
        let b = (w.off + w.len).min(end);
        buf[(a - off) as usize..(b - off) as usize].fill(w.pattern);
    }
}

/// Builds the 1 TiB qcow2 with qemu-io (commands on its standard input).
fn build_sparse_qcow2(path: &Path, writes: &[GuestWrite]) {
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(path), "1T"]);
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", s(path)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run qemu-io");
    {
        let mut stdin = child.stdin.take().unwrap();
        for w in writes {
            writeln!(stdin, "write -q -P {} {} {}", w.pattern, w.off, w.len).unwrap();
        }
    }
    assert!(child.wait().unwrap().success(), "qemu-io failed");
}

/// Reads `path` to its end with plain 1 MiB reads; returns the byte count.
fn read_to_end(path: &Path) -> u64 {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; BUF];
    let mut total = 0;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) => panic!("read {} at {total}: {e}", path.display()),
        }
    }
}

/// `lseek(fd, from, whence)`, or `None` at ENXIO (no data, or no hole, after `from`).
fn seek(f: &fs::File, from: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENXIO),
            "lseek {whence} at {from}: {e}"
        );
        return None;
    }
    Some(r as u64)
}

/// Reads `f` at `[off, off + len)` and checks it against the writes; returns `len`.
#[track_caller]
fn read_and_check(f: &fs::File, writes: &[GuestWrite], off: u64, len: u64) -> u64 {
    let mut got = vec![0u8; BUF];
    let mut want = vec![0u8; BUF];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(BUF as u64) as usize;
        f.read_exact_at(&mut got[..n], pos)
            .unwrap_or_else(|e| panic!("disk.raw read at {pos}: {e}"));
        expected(writes, pos, &mut want[..n]);
        assert!(got[..n] == want[..n], "disk.raw differs in [{pos}, +{n})");
        pos += n as u64;
    }
    len
}

#[test]
fn reading_every_view_of_a_1_tib_sparse_image_end_to_end_keeps_the_daemon_under_its_rss_bound() {
    let Some(mut m) = Mounted::prepare() else {
        return;
    };
    let writes = sparse_writes();
    let qcow = m.work().join("sparse.qcow2");
    build_sparse_qcow2(&qcow, &writes);
    m.store_layer("sparse", &qcow);
    m.mount();

    let rev = m.at("r/sparse/@0");
    for view in [
        "disk.qcow2",
        "disk.qed",
        "disk.vdi",
        "disk.vpc",
        "disk.vmdk",
    ] {
        let path = rev.join(view);
        let size = fs::metadata(&path).unwrap().len();
        assert_eq!(read_to_end(&path), size, "{view}: bytes read != st_size");
        eprintln!(
            "{view}: {size} bytes, daemon peak {:.1} MiB",
            m.peak_rss_mib()
        );
    }

    // disk.raw: every data extent SEEK_DATA/SEEK_HOLE report, read and checked; together
    // they hold every write, and nothing but the writes' clusters.
    let raw = fs::File::open(rev.join("disk.raw")).unwrap();
    assert_eq!(raw.metadata().unwrap().len(), VIRTUAL);
    let (mut pos, mut data, mut extents) = (0, 0, 0);
    while let Some(start) = seek(&raw, pos, libc::SEEK_DATA) {
        let end = seek(&raw, start, libc::SEEK_HOLE).expect("a hole at the end at least");
        assert!(end > start && end <= VIRTUAL, "data [{start}, {end})");
        data += read_and_check(&raw, &writes, start, end - start);
        extents += 1;
        pos = end;
    }
    let written: u64 = writes.iter().map(|w| w.len).sum();
    // qemu allocates whole 64 KiB clusters: each write fills at most two.
    assert!(
        data >= written && data <= SPARSE_EXTENTS * 2 * 65536,
        "SEEK_DATA found {data} bytes in {extents} extents for {written} written"
    );
    // Plain reads of holes: four windows spread over the disk.
    let window = RAW_HOLE_READ / 4;
    for i in 0..4 {
        read_and_check(&raw, &writes, i * (VIRTUAL / 4) + VIRTUAL / 8, window);
    }
    drop(raw);

    let peak = m.peak_rss_mib();
    eprintln!("1 TiB sparse image read in every view: daemon peak RSS {peak:.1} MiB");
    assert!(
        peak < READ_PEAK_RSS_MIB as f64,
        "the daemon's peak RSS reached {peak:.1} MiB reading a 1 TiB sparse image (bound {READ_PEAK_RSS_MIB} MiB)"
    );
}

#[test]
fn listing_a_repository_of_10_000_images_keeps_the_daemon_and_the_cli_under_their_rss_bounds() {
    let Some(mut m) = Mounted::prepare() else {
        return;
    };
    // 10,000 images that share one small layer (metadata only, as pcocc's copy makes).
    let layer = m.work().join("small.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&layer), "1G"],
    );
    let h = m.store_layer("img00000", &layer);
    for i in 1..IMAGES {
        m.write_meta(&format!("img{i:05}"), &h);
    }
    m.mount();
    let listing = ok("ls", &["-l", s(&m.at("r"))]);
    // `total N`, then one line per image.
    assert_eq!(
        listing.lines().count(),
        IMAGES + 1,
        "ls -l of the repository"
    );
    assert!(listing.contains(" img09999\n"), "the last image is listed");
    let peak = m.peak_rss_mib();
    eprintln!("ls -l of {IMAGES} images: daemon peak RSS {peak:.1} MiB");
    assert!(
        peak < LIST_PEAK_RSS_MIB as f64,
        "the daemon's peak RSS reached {peak:.1} MiB listing {IMAGES} images (bound {LIST_PEAK_RSS_MIB} MiB)"
    );

    let out = m.work().join("list.txt");
    let cli = peak_rss_of_command(
        Command::new(PCOCC).args(["--config", s(&m.config()), "image", "list", "-R", "r"]),
        &out,
    );
    let listed = fs::read_to_string(&out).unwrap();
    assert!(
        (IMAGES..IMAGES + 10).contains(&listed.lines().count()) && listed.contains("img09999"),
        "pcocc image list printed {} lines",
        listed.lines().count()
    );
    eprintln!("pcocc image list of {IMAGES} images: peak RSS {cli:.1} MiB");
    assert!(
        cli < CLI_LIST_PEAK_RSS_MIB as f64,
        "pcocc image list reached {cli:.1} MiB listing {IMAGES} images (bound {CLI_LIST_PEAK_RSS_MIB} MiB)"
    );
}

/// Writes the 4 GiB raw import source. Sparse: [`IMPORT_SPARSE_EXTENTS`] extents of
/// [`IMPORT_EXTENT`] spread over it. With `full`: every byte written. Either way half the
/// data is random (incompressible) and half repeats a short text (compressible).
fn write_import_source(path: &Path, full: bool) {
    let f = fs::File::create(path).unwrap();
    f.set_len(IMPORT_SIZE).unwrap();
    let mut rng = Rng(4_294_967_296);
    let mut buf = vec![0u8; BUF];
    let text = b"pcocc-imagefs keeps the daemon's memory bounded while it imports. ";
    let mut chunk = 0u64;
    let mut write_at = |off: u64, len: u64, rng: &mut Rng| {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(BUF as u64) as usize;
            if chunk.is_multiple_of(2) {
                rng.fill(&mut buf[..n]);
            } else {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = text[(i + chunk as usize) % text.len()];
                }
            }
            f.write_all_at(&buf[..n], pos).unwrap();
            chunk += 1;
            pos += n as u64;
        }
    };
    if full {
        write_at(0, IMPORT_SIZE, &mut rng);
    } else {
        let slot = IMPORT_SIZE / IMPORT_SPARSE_EXTENTS;
        for i in 0..IMPORT_SPARSE_EXTENTS {
            let off = i * slot + MIB * rng.below((slot - IMPORT_EXTENT) / MIB);
            write_at(off, IMPORT_EXTENT, &mut rng);
        }
    }
}

#[test]
fn importing_a_4_gib_image_keeps_the_daemon_and_the_cli_under_their_rss_bound() {
    let Some(mut m) = Mounted::prepare() else {
        return;
    };
    let full = slow();
    let src = m.work().join("big");
    write_import_source(&src, full);
    m.mount();

    // Through the mount: `cp SRC MOUNT/REPO/` makes image `big`.
    ok("cp", &[s(&src), s(&m.at("r/"))]);
    let peak = m.peak_rss_mib();
    eprintln!(
        "cp of a 4 GiB image ({}) into the mount: daemon peak RSS {peak:.1} MiB",
        if full { "all data" } else { "sparse" }
    );
    assert_stored_as(&m, "big", &src);
    assert!(
        peak < IMPORT_PEAK_RSS_MIB as f64,
        "the daemon's peak RSS reached {peak:.1} MiB importing a 4 GiB image (bound {IMPORT_PEAK_RSS_MIB} MiB)"
    );

    // Through the CLI, from a qcow2 of the same content.
    let qcow = m.work().join("big.qcow2");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&qcow)],
    );
    let cli = peak_rss_of_command(
        Command::new(PCOCC).args([
            "--config",
            s(&m.config()),
            "image",
            "import",
            s(&qcow),
            "r:viacli",
        ]),
        &m.work().join("import.txt"),
    );
    eprintln!("pcocc image import of a 4 GiB image: peak RSS {cli:.1} MiB");
    assert_stored_as(&m, "viacli", &src);
    assert!(
        cli < IMPORT_PEAK_RSS_MIB as f64,
        "pcocc image import reached {cli:.1} MiB importing a 4 GiB image (bound {IMPORT_PEAK_RSS_MIB} MiB)"
    );
}

/// Writes `len` bytes of data at the start of a new raw file `path` (no holes): as in
/// [`write_import_source`], half random and half a repeated text, from generator `seed`.
fn write_full_source(path: &Path, len: u64, seed: u64) {
    let f = fs::File::create(path).unwrap();
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; BUF];
    let text = b"pcocc-imagefs returns every conversion buffer once the import is done. ";
    let mut pos = 0u64;
    for chunk in 0.. {
        if pos >= len {
            break;
        }
        let n = (len - pos).min(BUF as u64) as usize;
        if chunk % 2 == 0 {
            rng.fill(&mut buf[..n]);
        } else {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = text[(i + chunk) % text.len()];
            }
        }
        f.write_all_at(&buf[..n], pos).unwrap();
        pos += n as u64;
    }
}

#[test]
fn importing_100_small_and_2_large_images_through_16_threads_keeps_the_daemon_under_its_rss_bound()
{
    let Some(mut m) = Mounted::prepare() else {
        return;
    };
    let large_len = if slow() {
        LARGE_IMPORT
    } else {
        LARGE_IMPORT_QUICK
    };
    let small = m.work().join("small");
    write_full_source(&small, SMALL_IMPORT, 1);
    let large: Vec<PathBuf> = (0..LARGE_IMPORTS)
        .map(|i| {
            let p = m.work().join(format!("large{i}"));
            write_full_source(&p, large_len, 100 + i as u64);
            p
        })
        .collect();
    m.mount_with(&["--threads", &MANY_THREADS.to_string()]);
    let fresh = m.rss_mib();

    // The large images first, so that they are converted while small ones come and go;
    // every small image is the same source under its own name (its layer is shared).
    let mut jobs: Vec<(PathBuf, String)> = large
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), format!("large{i}")))
        .collect();
    jobs.extend((0..SMALL_IMPORTS).map(|i| (small.clone(), format!("small{i:03}"))));
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..CONCURRENT_COPIES {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((src, name)) = jobs.get(i) else {
                        break;
                    };
                    ok("cp", &[s(src), s(&m.at(&format!("r/{name}")))]);
                }
            });
        }
    });
    let peak = m.peak_rss_mib();
    // Whatever a finished import leaves behind stays; give a close still publishing
    // (none should be) a moment to end.
    let idle_bound = after_imports_rss_bound_mib(MANY_THREADS);
    let mut idle = m.rss_mib();
    for _ in 0..20 {
        if idle < idle_bound as f64 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        idle = m.rss_mib();
    }
    let bound = import_peak_rss_bound_mib(MANY_THREADS);
    eprintln!(
        "{SMALL_IMPORTS} imports of {} MiB and {LARGE_IMPORTS} of {} MiB, {CONCURRENT_COPIES} cp at \
         once, daemon with {MANY_THREADS} threads: RSS {fresh:.1} MiB fresh, peak {peak:.1} MiB \
         (bound {bound} MiB), {idle:.1} MiB after (bound {idle_bound} MiB)",
        SMALL_IMPORT / MIB,
        large_len / MIB
    );
    for (src, name) in jobs.iter().take(LARGE_IMPORTS + 1) {
        assert_stored_as(&m, name, src);
    }
    for (_, name) in &jobs {
        assert!(m.layer_of(name).is_file(), "{name} has no layer");
    }
    assert!(
        peak < bound as f64,
        "the daemon's peak RSS reached {peak:.1} MiB over {} concurrent imports with {MANY_THREADS} threads (bound {bound} MiB)",
        jobs.len()
    );
    assert!(
        idle < idle_bound as f64,
        "the daemon kept {idle:.1} MiB resident after {} imports with {MANY_THREADS} threads (bound {idle_bound} MiB): memory of finished imports was kept",
        jobs.len()
    );
}

/// Asserts that image `name` of repository `r` holds exactly the raw disk `src`.
#[track_caller]
fn assert_stored_as(m: &Mounted, name: &str, src: &Path) {
    let layer = m.layer_of(name);
    common::assert_same_disk(src, "raw", &layer, "qcow2");
}
