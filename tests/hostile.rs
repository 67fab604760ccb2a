//! Hostile images: property tests that break valid images of every format and feed the
//! wreckage to everything that reads untrusted images — format detection, the readers
//! (open, map the whole disk, read it in uneven chunks), every generated view (layout and
//! reads) and the import converter. Each must answer with an error or with consistent
//! data, and never panic, hang or allocate without bound.
//!
//! The seed images are made by qemu-img from one small raw disk, one per format and
//! variant (qcow2 v2/v3, compressed with zlib and zstd, extended L2, a backing chain, an
//! external data file; QED, alone and over a qcow2; VDI dynamic and static; VHD dynamic
//! and fixed; VMDK monolithicSparse, streamOptimized, a snapshot over its parent, and
//! split into extent files named by a descriptor), and opened as `pcocc image import`
//! opens a file: with every file it names, of any format, as long as it lies in the
//! case's own directory. Each case mutates a copy with a few edits drawn from a tiny xorshift
//! generator: bit flips, bytes and 64-bit values (0, all ones, huge offsets, the file
//! length…) written over metadata (the bytes of the file that hold no guest data, found
//! from the seed's own mapping), a block copied over another (duplicate table entries),
//! truncation and extension. Seeds are fixed, so every run tries the same cases.
//!
//! Guards, per case: the case runs in its own thread, so a panic is caught and reported
//! with the case that caused it, and the test waits for it only up to a deadline (a hang
//! is a failure naming the case). This binary installs a counting allocator: a case whose
//! peak of live heap bytes grows by more than [`CASE_HEAP_BUDGET`] fails, and a single
//! process-wide cap makes an unbounded allocation fail the run at once (naming the case)
//! rather than exhaust the machine.
//!
//! Besides the random cases: every seed cut at each header sector and metadata edge;
//! every seed (and images at each format's largest size) with its size field set near
//! `u64::MAX` and the formats' limits; and named `regression_*` tests for the bugs these
//! found (tables shared between entries, sizes qemu cuts to whole sectors).
//!
//! `PCOCC_IMAGEFS_FUZZ_CASES=N` runs N cases per seed image (default [`DEFAULT_CASES`]);
//! `PCOCC_IMAGEFS_FUZZ_SEED=S` changes the base seed; `PCOCC_IMAGEFS_FUZZ_REPLAY=NAME:SEED`
//! runs the one case a failure printed; `PCOCC_IMAGEFS_FUZZ_QEMU=1` also compares every
//! small disk that reads without error with what `qemu-img convert` reads (when qemu
//! reads it too).

mod common;
use common::{have_qemu, ok};
use pcocc_imagefs::image::chain::{BackingPolicy, WithinDir, open_image_chain};
use pcocc_imagefs::image::qcow2::BackingRef;
use pcocc_imagefs::image::vmdk_extents::ExtentFiles;
use pcocc_imagefs::image::{Disk, Format, Mapping, convert, detect};
use pcocc_imagefs::view::{View, ViewId};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

// ---- bounded resources: a counting allocator for this test binary only ----

/// Live heap bytes may never exceed this in this binary: past it an allocation fails,
/// which aborts the run after the allocator has named the case.
const HARD_HEAP_CAP: usize = 2 << 30;
/// How much a single case may raise the peak of live heap bytes: the readers' caches
/// (8 MiB of qcow2 L2 tables, 32 MiB of inflated clusters), a view's layout and the
/// converter's buffers fit many times over; a table sized by a hostile header does not.
const CASE_HEAP_BUDGET: usize = 384 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The case being run, for the allocator's last words (it may not allocate to print).
static CASE_TEXT: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];

struct Counting;

impl Counting {
    /// Takes back the count of a failed system allocation.
    fn undo_if_null(ptr: *mut u8, size: usize) -> *mut u8 {
        if ptr.is_null() {
            LIVE.fetch_sub(size, Ordering::Relaxed);
        }
        ptr
    }

    /// Counts `size` more live bytes, or refuses past [`HARD_HEAP_CAP`] after naming the
    /// case on stderr.
    fn grow(size: usize) -> bool {
        let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        if now > HARD_HEAP_CAP {
            LIVE.fetch_sub(size, Ordering::Relaxed);
            let mut text = [0u8; 256];
            for (t, c) in text.iter_mut().zip(&CASE_TEXT) {
                *t = c.load(Ordering::Relaxed);
            }
            let n = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            let msg = b"\nhostile: heap cap exceeded (unbounded allocation) in case: ";
            // SAFETY: writes of plain byte buffers to stderr; no allocation.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::write(2, text.as_ptr().cast(), n);
                libc::write(2, b"\n".as_ptr().cast(), 1);
            }
            return false;
        }
        PEAK.fetch_max(now, Ordering::Relaxed);
        true
    }
}

// SAFETY: every call is forwarded to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Counting::grow(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout as the caller's.
        Counting::undo_if_null(unsafe { System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Counting::grow(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout as the caller's.
        Counting::undo_if_null(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            if !Counting::grow(new_size - layout.size()) {
                return std::ptr::null_mut();
            }
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged.
        let out = unsafe { System.realloc(ptr, layout, new_size) };
        if out.is_null() {
            // The old block stays allocated: count it as before.
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Ordering::Relaxed);
            } else {
                LIVE.fetch_add(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        out
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Records the case being run for the allocator's failure message.
fn set_case_text(text: &str) {
    let bytes = text.as_bytes();
    for (i, slot) in CASE_TEXT.iter().enumerate() {
        slot.store(bytes.get(i).copied().unwrap_or(0), Ordering::Relaxed);
    }
}

// ---- knobs ----

/// Cases per seed image in an ordinary `cargo test` (13 seed images).
const DEFAULT_CASES: u64 = 12;
const DEFAULT_SEED: u64 = 0x5eed_1234_abcd_0007;
/// Time one case may take before it counts as a hang. Generous: the test machines are
/// shared, and a healthy case takes milliseconds.
const CASE_DEADLINE: Duration = Duration::from_secs(60);
/// Guest or view bytes read per case at most; bigger disks are sampled (head, tail and
/// the first data runs), so a header claiming petabytes costs no more than a small disk.
const READ_BUDGET: u64 = 24 << 20;
/// Extents walked per whole-disk map at most (a healthy 2 MiB seed has a handful).
const MAX_EXTENTS: u64 = 1 << 20;

/// An environment variable as a number (decimal, or hex with `0x`).
fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

// ---- a tiny deterministic generator ----

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so neighbouring seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

// ---- seed images ----

/// Guest size of every seed: small, so a case reads all of it in milliseconds, yet
/// large enough for several tables with the small cluster sizes used below.
const SEED_SIZE: u64 = 2 << 20;

/// The raw disk every seed holds: data runs of varied shape (compressible and not),
/// zero stretches, and a last partial cluster.
fn seed_raw(dir: &Path) -> PathBuf {
    let mut data = vec![0u8; SEED_SIZE as usize];
    let mut rng = Rng::new(42);
    let mut fill = |start: usize, len: usize, noisy: bool| {
        for (i, b) in data[start..start + len].iter_mut().enumerate() {
            *b = if noisy {
                rng.next() as u8
            } else {
                (i / 7 % 251) as u8 + 1
            };
        }
    };
    fill(0, 64 << 10, false);
    fill(300 << 10, 100 << 10, true);
    fill(1 << 20, 4 << 10, false);
    fill((1 << 20) + (200 << 10), 36 << 10, true);
    fill(SEED_SIZE as usize - 3000, 3000, false);
    let p = dir.join("seed.raw");
    std::fs::write(&p, data).unwrap();
    p
}

/// One seed image: its files (the chain's top first) and the format to read it as.
struct Seed {
    name: &'static str,
    format: Format,
    files: Vec<PathBuf>,
}

fn convert_seed(raw: &Path, dir: &Path, name: &str, fmt: &str, opts: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    args.extend_from_slice(opts);
    args.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
    ok("qemu-img", &args);
    out
}

/// The seed images whose names start with `prefix`.
fn make_seeds(dir: &Path, prefix: &str) -> Vec<Seed> {
    let raw = seed_raw(dir);
    let one = |name: &'static str, format: Format, opts: &[&str]| Seed {
        name,
        format,
        files: if name.starts_with(prefix) {
            vec![convert_seed(&raw, dir, name, format.name(), opts)]
        } else {
            Vec::new()
        },
    };
    let mut seeds = vec![
        one("qcow2-v3-64k", Format::Qcow2, &["-o", "cluster_size=65536"]),
        one(
            "qcow2-v2-512",
            Format::Qcow2,
            &["-o", "compat=0.10,cluster_size=512"],
        ),
        one(
            "qcow2-zlib",
            Format::Qcow2,
            &["-c", "-o", "cluster_size=4096"],
        ),
        one(
            "qcow2-zstd",
            Format::Qcow2,
            &["-c", "-o", "compression_type=zstd,cluster_size=8192"],
        ),
        one(
            "qcow2-extl2",
            Format::Qcow2,
            &["-o", "extended_l2=on,cluster_size=16384"],
        ),
        one("qed", Format::Qed, &["-o", "cluster_size=4096"]),
        one("vdi-dynamic", Format::Vdi, &[]),
        one("vdi-static", Format::Vdi, &["-o", "static=on"]),
        one("vpc-dynamic", Format::Vpc, &["-o", "force_size=on"]),
        one(
            "vpc-fixed",
            Format::Vpc,
            &["-o", "subformat=fixed,force_size=on"],
        ),
        one("vmdk-sparse", Format::Vmdk, &[]),
        one(
            "vmdk-stream",
            Format::Vmdk,
            &["-o", "subformat=streamOptimized"],
        ),
    ];
    seeds.retain(|s| !s.files.is_empty());
    match prefix {
        "qed" => {
            seeds.push(overlay_seed(&raw, dir, "qed-chain", Format::Qed, "qcow2"));
            return seeds;
        }
        "vmdk" => {
            seeds.push(overlay_seed(
                &raw,
                dir,
                "vmdk-snapshot",
                Format::Vmdk,
                "vmdk",
            ));
            seeds.push(vmdk_split_seed(&raw, dir));
            return seeds;
        }
        "qcow2" => {}
        _ => return seeds,
    }
    // Clusters in an external data file, the qcow2 holding only the tables; made from
    // the seeds' directory, so that the image names its data file relatively, as a
    // case's copy needs.
    let made = Command::new("qemu-img")
        .current_dir(dir)
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o"])
        .args(["data_file=qcow2-datafile.data,cluster_size=4096"])
        .arg(&raw)
        .arg("qcow2-datafile.qcow2")
        .status()
        .unwrap();
    assert!(made.success(), "qemu-img convert with a data file failed");
    seeds.push(Seed {
        name: "qcow2-datafile",
        format: Format::Qcow2,
        files: vec![
            dir.join("qcow2-datafile.qcow2"),
            dir.join("qcow2-datafile.data"),
        ],
    });
    // Zero clusters and a discard in the v3 image, which convert alone never makes.
    let v3 = &seeds[0].files[0];
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 320k 64k",
            "-c",
            "write -z 1536k 128k",
            "-c",
            "discard 0 64k",
            v3.to_str().unwrap(),
        ],
    );
    // A two-layer chain: the top overwrites part of the base, names it relatively.
    let base = convert_seed(
        &raw,
        dir,
        "base.qcow2",
        "qcow2",
        &["-o", "cluster_size=4096"],
    );
    let top = dir.join("top.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=4096",
            top.to_str().unwrap(),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 32k 40k",
            "-c",
            "write -z 1M 8k",
            top.to_str().unwrap(),
        ],
    );
    seeds.push(Seed {
        name: "qcow2-chain",
        format: Format::Qcow2,
        files: vec![top, base],
    });
    seeds
}

/// `name`: a `format` overlay (top, first) of a `base_format` image of the seed disk
/// (`name`-base), named relatively as qemu-img names it, that rewrites some of it and
/// zeroes some more.
fn overlay_seed(
    raw: &Path,
    dir: &Path,
    name: &'static str,
    format: Format,
    base_format: &str,
) -> Seed {
    let base_name = format!("{name}-base.{base_format}");
    let base = convert_seed(raw, dir, &base_name, base_format, &[]);
    let top = dir.join(format!("{name}.{}", format.name()));
    let backing = format!("backing_file={base_name},backing_fmt={base_format}");
    let mut create = vec!["create", "-q", "-f", format.name(), "-o", &backing];
    if format == Format::Qed {
        create.extend(["-o", "cluster_size=4096"]);
    }
    create.push(top.to_str().unwrap());
    ok("qemu-img", &create);
    ok(
        "qemu-io",
        &[
            "-f",
            format.name(),
            "-c",
            "write -P 0x5a 40k 72k",
            "-c",
            "write -z 1M 64k",
            top.to_str().unwrap(),
        ],
    );
    Seed {
        name,
        format,
        files: vec![top, base],
    }
}

/// A VMDK split into extent files (`twoGbMaxExtentSparse`): a text descriptor naming
/// them.
fn vmdk_split_seed(raw: &Path, dir: &Path) -> Seed {
    let top = convert_seed(
        raw,
        dir,
        "vmdk-split.vmdk",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentSparse"],
    );
    Seed {
        name: "vmdk-split",
        format: Format::Vmdk,
        files: vec![top, dir.join("vmdk-split-s001.vmdk")],
    }
}

// ---- mutations ----

/// One edit of one file of a case.
#[derive(Clone, Debug)]
enum Edit {
    FlipBit {
        at: u64,
        bit: u8,
    },
    Byte {
        at: u64,
        value: u8,
    },
    Word {
        at: u64,
        value: u64,
        big_endian: bool,
    },
    Copy {
        from: u64,
        to: u64,
        len: u64,
    },
    Truncate {
        len: u64,
    },
    Extend {
        len: u64,
    },
}

/// Byte ranges of a seed file that hold no guest data: headers, tables, descriptors,
/// footers (what a mutation should mostly hit).
fn metadata_ranges(seed: &Seed, file: &Path, len: u64) -> Vec<(u64, u64)> {
    let Ok(disk) = open_disk(seed.format, file, file.parent().unwrap()) else {
        return vec![(0, len)];
    };
    let mut data: Vec<(u64, u64)> = Vec::new();
    let size = disk.virtual_size();
    let mut pos = 0;
    while pos < size {
        let Ok(ext) = disk.map(pos, size - pos) else {
            break;
        };
        if let Mapping::Data { offset, path, .. } = &ext.mapping
            && path.as_path() == file
        {
            data.push((*offset, *offset + ext.len));
        }
        pos += ext.len;
    }
    data.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for (s, e) in data {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < len {
        out.push((at, len));
    }
    out
}

/// Values that break size and offset arithmetic: zero, one, the ends of the signed and
/// unsigned ranges, single high bits, 32-bit edges and common unit sizes.
const INTERESTING: [u64; 12] = [
    0,
    1,
    u64::MAX,
    u64::MAX - 511,
    i64::MAX as u64,
    1 << 63,
    1 << 62,
    1 << 40,
    0xffff_ffff,
    0x8000_0000,
    512,
    65536,
];

/// One to four edits of a `len`-byte file, most of them inside `meta` (its metadata),
/// some in its first or last 4 KiB (headers, footers), the rest anywhere.
fn draw_edits(rng: &mut Rng, len: u64, meta: &[(u64, u64)]) -> Vec<Edit> {
    let pick_offset = |rng: &mut Rng| -> u64 {
        if len == 0 {
            return 0;
        }
        match rng.below(10) {
            0..=5 if !meta.is_empty() => {
                let (s, e) = meta[rng.below(meta.len() as u64) as usize];
                s + rng.below(e - s)
            }
            6 => rng.below(len.min(4096)),
            7 => len - 1 - rng.below(len.min(4096)),
            _ => rng.below(len),
        }
    };
    let count = 1 + rng.below(4);
    let mut edits = Vec::new();
    for _ in 0..count {
        let edit = match rng.below(20) {
            0..=5 => Edit::FlipBit {
                at: pick_offset(rng),
                bit: rng.below(8) as u8,
            },
            6..=9 => Edit::Byte {
                at: pick_offset(rng),
                value: [0, 0xff, 1, 0x80, rng.next() as u8][rng.below(5) as usize],
            },
            10..=14 => {
                let at = pick_offset(rng) & ![0, 3, 7][rng.below(3) as usize];
                let value = match rng.below(4) {
                    0 => len.wrapping_add(rng.below(3)).wrapping_sub(1),
                    1 => rng.next() >> rng.below(64),
                    _ => INTERESTING[rng.below(INTERESTING.len() as u64) as usize],
                };
                Edit::Word {
                    at,
                    value,
                    big_endian: rng.below(2) == 0,
                }
            }
            15 | 16 => Edit::Copy {
                from: pick_offset(rng) & !7,
                to: pick_offset(rng) & !7,
                len: [4, 8, 16, 512][rng.below(4) as usize],
            },
            17 | 18 => Edit::Truncate {
                len: match rng.below(3) {
                    0 => rng.below(len.min(4096) + 1),
                    1 => len.saturating_sub(1 + rng.below(len.min(8192))),
                    _ => rng.below(len + 1),
                },
            },
            _ => Edit::Extend {
                len: len
                    + match rng.below(4) {
                        0 => 1 + rng.below(511),
                        1 => 512 * (1 + rng.below(64)),
                        2 => 1 << 20,
                        _ => 1 << 30,
                    },
            },
        };
        edits.push(edit);
    }
    edits
}

/// Applies `edits` to a copy of `original` written at `path` (extension is sparse).
fn write_mutated(original: &[u8], edits: &[Edit], path: &Path) {
    let mut data = original.to_vec();
    let mut logical_len = data.len() as u64;
    let put = |data: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        let at = at as usize;
        if at < data.len() {
            let n = bytes.len().min(data.len() - at);
            data[at..at + n].copy_from_slice(&bytes[..n]);
        }
    };
    for e in edits {
        match *e {
            Edit::FlipBit { at, bit } => {
                if let Some(b) = data.get_mut(at as usize) {
                    *b ^= 1 << bit;
                }
            }
            Edit::Byte { at, value } => put(&mut data, at, &[value]),
            Edit::Word {
                at,
                value,
                big_endian,
            } => {
                let bytes = if big_endian {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                put(&mut data, at, &bytes)
            }
            Edit::Copy { from, to, len } => {
                let (from, len) = (from as usize, len as usize);
                if from + len <= data.len() {
                    let chunk = data[from..from + len].to_vec();
                    put(&mut data, to, &chunk);
                }
            }
            Edit::Truncate { len } => {
                data.truncate(len as usize);
                logical_len = logical_len.min(len);
            }
            Edit::Extend { len } => logical_len = logical_len.max(len),
        }
    }
    let logical_len = logical_len.max(data.len() as u64);
    let f = File::create(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
    f.set_len(logical_len).unwrap();
}

// ---- feeding a case to everything ----

/// Opens what a case's images name — backing files and parent disks of any format,
/// VMDK extent files, a qcow2's external data file — as `pcocc image import` does, but
/// only inside the case's directory: a mutated name must not reach the rest of the
/// machine.
struct CaseFiles(WithinDir);

impl CaseFiles {
    fn within(
        &self,
        from: &Path,
        name: &str,
        format: Format,
    ) -> pcocc_imagefs::image::Result<(PathBuf, File)> {
        let named = BackingRef {
            name: name.to_string(),
            format: None,
            content_id: None,
        };
        self.0.open(from, format, &named)
    }
}

impl BackingPolicy for CaseFiles {
    fn open(
        &self,
        layer_path: &Path,
        format: Format,
        backing: &BackingRef,
    ) -> pcocc_imagefs::image::Result<(PathBuf, File)> {
        self.0.open(layer_path, format, backing)
    }

    fn any_format(&self) -> bool {
        true
    }

    fn extent_files(&self) -> Option<&dyn ExtentFiles> {
        Some(self)
    }

    fn open_data_file(
        &self,
        layer_path: &Path,
        name: &str,
    ) -> pcocc_imagefs::image::Result<(PathBuf, File)> {
        self.within(layer_path, name, Format::Qcow2)
    }
}

impl ExtentFiles for CaseFiles {
    fn open(&self, descriptor: &Path, name: &str) -> pcocc_imagefs::image::Result<(PathBuf, File)> {
        self.within(descriptor, name, Format::Vmdk)
    }
}

/// Opens `path` as `format` with everything it names inside `root` (see [`CaseFiles`]),
/// as `pcocc image import` opens a file.
fn open_disk(format: Format, path: &Path, root: &Path) -> pcocc_imagefs::image::Result<Disk> {
    let file = File::open(path).map_err(|e| pcocc_imagefs::image::Error::io(path, e))?;
    let files = CaseFiles(WithinDir {
        root: root.to_path_buf(),
    });
    open_image_chain(file, path, format, &files)
}

/// Chunk lengths that cut reads at odd places: 1 byte, a sector plus one, and larger.
fn uneven(rng: &mut Rng) -> u64 {
    match rng.below(5) {
        0 => 1 + rng.below(16),
        1 => 513,
        2 => 4095 + rng.below(3),
        3 => 65536 + 7,
        _ => 300_001,
    }
}

/// Windows of `[0, size)` to read: all of it when small, else head, tail and the first
/// `extra` runs, within [`READ_BUDGET`].
fn windows(size: u64, extra: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if size <= READ_BUDGET {
        return vec![(0, size)];
    }
    let mut out = vec![(0, 1 << 20), (size - (1 << 20), 1 << 20)];
    let mut budget = READ_BUDGET - (2 << 20);
    for &(s, l) in extra {
        if budget == 0 {
            break;
        }
        let l = l.min(budget).min(size - s);
        out.push((s, l));
        budget -= l;
    }
    out
}

/// Maps the whole disk and checks the extents tile it; returns its data runs (capped).
fn check_map(disk: &Disk) -> Result<Vec<(u64, u64)>, String> {
    let size = disk.virtual_size();
    let mut pos = 0;
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut n = 0u64;
    while pos < size && n < MAX_EXTENTS {
        let ext = match disk.map(pos, size - pos) {
            Ok(e) => e,
            Err(_) => return Ok(data),
        };
        if ext.len == 0 || ext.len > size - pos {
            return Err(format!(
                "map at {pos} answered {} bytes of {} left",
                ext.len,
                size - pos
            ));
        }
        if matches!(ext.mapping, Mapping::Unallocated) {
            return Err(format!("Disk::map at {pos} answered Unallocated"));
        }
        if ext.mapping.is_data() && data.len() < 64 {
            data.push((pos, ext.len));
        }
        pos += ext.len;
        n += 1;
    }
    Ok(data)
}

/// Reads `[start, start + len)` of the disk in uneven chunks; where the disk maps zeroes
/// the bytes must be zero. Stops quietly at the first error (errors are allowed).
fn check_disk_reads(disk: &Disk, rng: &mut Rng, start: u64, len: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 300_001];
    let mut pos = start;
    while pos < start + len {
        let n = uneven(rng).min(start + len - pos);
        let out = &mut buf[..n as usize];
        if disk.read_at(out, pos).is_err() {
            return Ok(());
        }
        if let Ok(ext) = disk.map(pos, n)
            && matches!(ext.mapping, Mapping::Zero)
        {
            let z = ext.len.min(n) as usize;
            if out[..z].iter().any(|&b| b != 0) {
                return Err(format!("bytes at {pos} mapped as zero read non-zero"));
            }
        }
        pos += n;
    }
    Ok(())
}

/// Reads the view (all of it, or sampled windows when large) in uneven chunks: every
/// read inside the view returns its full length or an error; seeks answer.
fn check_view(view: &View, rng: &mut Rng) -> Result<(), String> {
    let size = view.size();
    let extents = match view.data_extents() {
        Ok(e) => e,
        Err(_) => return Ok(()),
    };
    let mut buf = vec![0u8; 300_001];
    for (start, len) in windows(size, &extents) {
        let mut pos = start;
        while pos < start + len {
            let want = uneven(rng).min(start + len - pos) as usize;
            match view.read_at(&mut buf[..want], pos) {
                Ok(got) if got == want => {}
                Ok(got) => {
                    return Err(format!(
                        "{} view read {got} of {want} bytes at {pos} inside its {size} bytes",
                        view.format()
                    ));
                }
                Err(_) => return Ok(()),
            }
            pos += want as u64;
        }
    }
    for at in [0, size / 2, size.saturating_sub(1), size] {
        let _ = view.next_data(at);
        let _ = view.next_hole(at);
    }
    Ok(())
}

/// Converts the disk and, when that works, checks the layer reads as the disk does.
/// Returns whether the conversion worked.
fn check_convert(disk: &Disk, dir: &Path, data: &[(u64, u64)]) -> Result<bool, String> {
    let out_path = dir.join("converted.qcow2");
    let out = File::create(&out_path).unwrap();
    let converted = convert::to_qcow2_layer(disk, &out, &out_path, &mut |_, _| {});
    drop(out);
    if converted.is_err() {
        return Ok(false);
    }
    let layer = open_disk(Format::Qcow2, &out_path, dir)
        .map_err(|e| format!("the converted layer does not open: {e}"))?;
    let size = disk.virtual_size();
    // The layer's size is the disk's rounded up to a sector, as qemu sees it.
    if layer.virtual_size() < size || layer.virtual_size() - size >= 512 {
        return Err(format!(
            "converted layer has size {} for a {size}-byte disk",
            layer.virtual_size()
        ));
    }
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for (start, len) in windows(size, data) {
        let mut pos = start;
        while pos < start + len {
            let n = (start + len - pos).min(1 << 20) as usize;
            if disk.read_at(&mut a[..n], pos).is_err() {
                // The conversion succeeded, so the source was readable then: it is now.
                return Err(format!("source read at {pos} fails after a conversion"));
            }
            layer
                .read_at(&mut b[..n], pos)
                .map_err(|e| format!("converted layer read at {pos}: {e}"))?;
            if a[..n] != b[..n] {
                return Err(format!("converted layer differs from the source at {pos}"));
            }
            pos += n as u64;
        }
    }
    Ok(true)
}

/// When both this crate and `qemu-img convert` read the whole (small) disk without an
/// error, they must read the same bytes. Opt-in (`PCOCC_IMAGEFS_FUZZ_QEMU=1`): a qemu-img
/// run per case is slow, and qemu accepts some damage this crate refuses.
fn compare_with_qemu(disk: &Disk, format: Format, top: &Path, dir: &Path) -> Result<(), String> {
    let size = disk.virtual_size();
    if size > READ_BUDGET {
        return Ok(());
    }
    let mut ours = vec![0u8; size as usize];
    if disk.read_at(&mut ours, 0).is_err() {
        return Ok(());
    }
    let out = dir.join("qemu.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", format.name(), "-O", "raw"])
        .arg(top)
        .arg(&out)
        .output()
        .map_err(|e| e.to_string())?;
    if !status.status.success() {
        return Ok(());
    }
    let theirs = std::fs::read(&out).map_err(|e| e.to_string())?;
    if theirs.len() != ours.len() {
        return Err(format!(
            "qemu reads {} bytes, this crate {}",
            theirs.len(),
            ours.len()
        ));
    }
    match ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        Some(at) => Err(format!("qemu reads other bytes from guest offset {at}")),
        None => Ok(()),
    }
}

/// How far a case got: it opened, so many views were made, the conversion worked.
#[derive(Clone, Copy, Debug, Default)]
struct Reached {
    opened: bool,
    views: u64,
    converted: bool,
}

/// Everything a case goes through. `Err` is a broken promise (not an image error).
fn feed(format: Format, top: &Path, dir: &Path, seed: u64) -> Result<Reached, String> {
    let mut reached = Reached::default();
    let mut rng = Rng::new(seed ^ 0xfeed);
    let file = File::open(top).map_err(|e| e.to_string())?;
    let _ = detect::detect_file(&file, top);
    let _ = detect::resolve_format(None, top, &file);
    let _ = detect::resolve_format(Some(format), top, &file);
    drop(file);
    let Ok(disk) = open_disk(format, top, dir) else {
        return Ok(reached);
    };
    reached.opened = true;
    let disk = Arc::new(disk);
    let data = check_map(&disk)?;
    for (start, len) in windows(disk.virtual_size(), &data) {
        check_disk_reads(&disk, &mut rng, start, len)?;
    }
    let _ = disk.data_extents(0, disk.virtual_size().min(READ_BUDGET));
    if std::env::var_os("PCOCC_IMAGEFS_FUZZ_QEMU").is_some() {
        compare_with_qemu(&disk, format, top, dir)?;
    }
    for f in Format::ALL {
        if let Ok(view) = View::new(disk.clone(), f, ViewId([7; 32])) {
            reached.views += 1;
            check_view(&view, &mut rng)?;
        }
    }
    reached.converted = check_convert(&disk, dir, &data)?;
    Ok(reached)
}

// ---- running cases under guard ----

/// Serialises cases across this binary's tests, so heap peaks belong to one case.
static ONE_CASE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Case<'a> {
    seed_image: &'a Seed,
    originals: &'a [Vec<u8>],
    metas: &'a [Vec<(u64, u64)>],
    case_seed: u64,
}

impl Case<'_> {
    /// Which file of the seed gets which edits.
    fn edits(&self) -> (usize, Vec<Edit>) {
        let mut rng = Rng::new(self.case_seed);
        let which = rng.below(self.originals.len() as u64) as usize;
        let len = self.originals[which].len() as u64;
        (which, draw_edits(&mut rng, len, &self.metas[which]))
    }

    fn describe(&self) -> String {
        let (which, edits) = self.edits();
        format!(
            "PCOCC_IMAGEFS_FUZZ_REPLAY={}:{:#x} (file {} edited: {edits:?})",
            self.seed_image.name,
            self.case_seed,
            self.seed_image.files[which]
                .file_name()
                .unwrap()
                .to_string_lossy()
        )
    }

    /// Runs the case in a thread under the deadline and the heap budget.
    fn run(&self, work: &Path) -> Result<Reached, String> {
        let _serial = ONE_CASE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir_in(work).unwrap();
        let (which, edits) = self.edits();
        for (i, (orig, seed_file)) in self
            .originals
            .iter()
            .zip(&self.seed_image.files)
            .enumerate()
        {
            let dst = dir.path().join(seed_file.file_name().unwrap());
            if i == which {
                write_mutated(orig, &edits, &dst);
            } else {
                std::fs::write(&dst, orig).unwrap();
            }
        }
        let top = dir
            .path()
            .join(self.seed_image.files[0].file_name().unwrap());
        let description = self.describe();
        set_case_text(&description);
        let baseline = LIVE.load(Ordering::Relaxed);
        PEAK.store(baseline, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let (format, seed, case_dir) = (
            self.seed_image.format,
            self.case_seed,
            dir.path().to_path_buf(),
        );
        let started = Instant::now();
        let worker = std::thread::spawn(move || {
            let r = feed(format, &top, &case_dir, seed);
            let _ = tx.send(r);
        });
        let outcome = match rx.recv_timeout(CASE_DEADLINE) {
            Ok(r) => {
                let _ = worker.join();
                r
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The thread is left running: there is no safe way to stop it.
                std::mem::forget(dir);
                return Err(format!(
                    "hang: no answer after {:?}: {description}",
                    started.elapsed()
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = worker.join();
                Err("panic (message above)".to_string())
            }
        };
        let grown = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
        let outcome = outcome.and_then(|reached| {
            if grown > CASE_HEAP_BUDGET {
                Err(format!("heap grew by {grown} bytes during the case"))
            } else {
                Ok(reached)
            }
        });
        outcome.map_err(|why| format!("{why}: {description}"))
    }
}

/// Runs the cases of the seed images whose names start with `prefix`.
fn fuzz(prefix: &str) {
    if !have_qemu() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let seeds = make_seeds(work.path(), prefix);
    let replay = std::env::var("PCOCC_IMAGEFS_FUZZ_REPLAY").ok();
    let cases = env_u64("PCOCC_IMAGEFS_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let base = env_u64("PCOCC_IMAGEFS_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let mut failures = Vec::new();
    let mut ran = 0u64;
    let (mut opened, mut views, mut converted) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    for seed in &seeds {
        let originals: Vec<Vec<u8>> = seed
            .files
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .collect();
        let metas: Vec<Vec<(u64, u64)>> = seed
            .files
            .iter()
            .zip(&originals)
            .map(|(f, o)| metadata_ranges(seed, f, o.len() as u64))
            .collect();
        let seeds_to_run: Vec<u64> = match &replay {
            Some(r) => match r.split_once(':') {
                Some((name, s)) if name == seed.name => {
                    let s = s.trim_start_matches("0x");
                    vec![u64::from_str_radix(s, 16).expect("replay seed in hex")]
                }
                _ => continue,
            },
            None => (0..cases)
                .map(|i| Rng::new(base ^ i.wrapping_mul(0x1000_0000_01b3)).next() ^ hash(seed.name))
                .collect(),
        };
        for case_seed in seeds_to_run {
            let case = Case {
                seed_image: seed,
                originals: &originals,
                metas: &metas,
                case_seed,
            };
            ran += 1;
            match case.run(work.path()) {
                Ok(r) => {
                    opened += u64::from(r.opened);
                    views += r.views;
                    converted += u64::from(r.converted);
                }
                Err(why) => {
                    eprintln!("hostile: FAILED {why}");
                    failures.push(why);
                    if failures.len() >= 5 {
                        break;
                    }
                }
            }
        }
    }
    eprintln!(
        "hostile: {ran} cases of {} seed images ({prefix}*) in {:?}: {opened} opened, \
         {views} views made, {converted} converted",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// FNV-1a of a seed image's name, so each image gets its own case seeds.
fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn mutated_qcow2_images_give_errors_or_consistent_data() {
    fuzz("qcow2");
}

#[test]
fn mutated_qed_images_give_errors_or_consistent_data() {
    fuzz("qed");
}

#[test]
fn mutated_vdi_images_give_errors_or_consistent_data() {
    fuzz("vdi");
}

#[test]
fn mutated_vpc_images_give_errors_or_consistent_data() {
    fuzz("vpc");
}

#[test]
fn mutated_vmdk_images_give_errors_or_consistent_data() {
    fuzz("vmdk");
}

// ---- named regressions ----

// Header fields of seed images, read to build hostile variants.

fn be64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn le32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn le64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn be32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// A 256 GiB qcow2 (64 KiB clusters) whose first `tables` L1 entries name L2 tables
/// that all point into one data cluster: with `alternate`, every other entry names the
/// shared cluster and the others are holes (4096 runs of data per table, from one stored
/// cluster); without, the entries name consecutive clusters (one contiguous extent per
/// table). With `shared`, every L1 entry names one and the same L2 table.
fn shared_l2_image(dir: &Path, tables: usize, alternate: bool, shared: bool) -> PathBuf {
    let p = dir.join("shared.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "256G"],
    );
    let mut bytes = std::fs::read(&p).unwrap();
    let cluster = 65536usize;
    let l1_offset = be64_at(&bytes, 40) as usize;
    let l1_entries = u32::from_be_bytes(bytes[36..40].try_into().unwrap()) as usize;
    let first_table = bytes.len().next_multiple_of(cluster);
    let data_at = first_table + tables * cluster;
    bytes.resize(data_at + cluster, 0x5a);
    for t in 0..tables {
        let l2_at = first_table + t * cluster;
        for i in 0..cluster / 8 {
            let entry = match (alternate, i % 2) {
                (true, 0) => data_at as u64,
                (true, _) => 0,
                (false, _) => (data_at + i * cluster) as u64,
            };
            bytes[l2_at + i * 8..l2_at + i * 8 + 8].copy_from_slice(&entry.to_be_bytes());
        }
    }
    for i in 0..l1_entries {
        let table = match shared {
            true => first_table,
            false if i < tables => first_table + i * cluster,
            false => continue,
        };
        let at = l1_offset + i * 8;
        bytes[at..at + 8].copy_from_slice(&(table as u64).to_be_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs `f` as a case under the same guards as the property tests.
fn guarded(name: &str, f: impl FnOnce() -> Result<(), String> + Send + 'static) {
    let _serial = ONE_CASE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    set_case_text(name);
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => {
            let _ = worker.join();
            r.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: no answer within 30 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: panicked"),
    }
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(
        grown <= CASE_HEAP_BUDGET,
        "{name}: heap grew by {grown} bytes"
    );
}

#[test]
fn regression_tables_describing_far_more_runs_than_the_file_stores_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 300 distinct tables, 1.2 Mi runs of data out of one stored data cluster: past
    // the walk limits (1 Mi runs, or one per 512 stored bytes).
    let p = shared_l2_image(dir.path(), 300, true, false);
    let root = dir.path().to_path_buf();
    guarded(
        "L2 tables alternating one shared cluster with holes",
        move || {
            let disk = open_disk(Format::Qcow2, &p, &root)
                .map_err(|e| format!("distinct tables must open: {e}"))?;
            let disk = Arc::new(disk);
            // Views with blocks of 1 MiB or more (VDI, VHD) see few runs and may be made;
            // those of 64 KiB clusters must refuse. Either way within the case's bounds.
            for f in Format::ALL {
                let made = View::new(disk.clone(), f, ViewId([1; 32])).is_ok();
                if made && matches!(f, Format::Qcow2 | Format::Qed | Format::Vmdk) {
                    return Err(format!("the {f} view of {} runs was made", 300 * 4096));
                }
            }
            let out = root.join("out.qcow2");
            let file = File::create(&out).unwrap();
            if convert::to_qcow2_layer(&disk, &file, &out, &mut |_, _| {}).is_ok() {
                return Err("the conversion went through".into());
            }
            Ok(())
        },
    );
}

#[test]
fn regression_l2_table_shared_by_every_l1_entry_is_refused_before_any_walk() {
    if !have_qemu() {
        return;
    }
    // Contiguous entries: each shared table maps as one extent, so only refusing the
    // sharing itself stops a conversion from reading 256 GiB out of a hole.
    let dir = tempfile::tempdir().unwrap();
    let p = shared_l2_image(dir.path(), 1, false, true);
    let root = dir.path().to_path_buf();
    guarded(
        "shared L2 tables, contiguous entries",
        move || match open_disk(Format::Qcow2, &p, &root) {
            Ok(_) => Err("an L1 naming one L2 table 4096 times was opened".into()),
            Err(e) if e.to_string().contains("more than one L1 entry") => Ok(()),
            Err(e) => Err(format!("refused for another reason: {e}")),
        },
    );
}

/// Lengths to cut a seed file at: every sector boundary of its first 8 KiB (headers),
/// the edges of its metadata ranges, and its last bytes.
fn cut_points(len: u64, meta: &[(u64, u64)]) -> Vec<u64> {
    let mut cuts: Vec<u64> = (0..=16).map(|i| i * 512).collect();
    cuts.extend([
        1,
        7,
        71,
        72,
        103,
        105,
        len / 2,
        len - 1,
        len - 511,
        len - 512,
    ]);
    for &(s, e) in meta.iter().take(64) {
        cuts.extend([s, s + 1, e.saturating_sub(1), (s + e) / 2]);
    }
    cuts.retain(|&c| c < len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

#[test]
fn truncated_files_of_every_format_give_errors_or_consistent_data() {
    if !have_qemu() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for prefix in ["qcow2", "qed", "vdi", "vpc", "vmdk"] {
        for seed in make_seeds(work.path(), prefix) {
            for (which, file) in seed.files.iter().enumerate() {
                let original = std::fs::read(file).unwrap();
                let len = original.len() as u64;
                let meta = metadata_ranges(&seed, file, len);
                for cut in cut_points(len, &meta) {
                    ran += 1;
                    let case_dir = tempfile::tempdir_in(work.path()).unwrap();
                    for (i, f) in seed.files.iter().enumerate() {
                        let dst = case_dir.path().join(f.file_name().unwrap());
                        if i == which {
                            std::fs::write(&dst, &original[..cut as usize]).unwrap();
                        } else {
                            std::fs::copy(f, &dst).unwrap();
                        }
                    }
                    let top = case_dir.path().join(seed.files[0].file_name().unwrap());
                    let name = format!("{} file {which} cut to {cut} bytes", seed.name);
                    let (format, dir) = (seed.format, case_dir.path().to_path_buf());
                    let outcome = {
                        // Serialised with the guarded cases, whose heap peaks it would blur.
                        let _serial = ONE_CASE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
                        std::panic::catch_unwind(|| feed(format, &top, &dir, cut))
                    };
                    match outcome {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => failures.push(format!("{name}: {e}")),
                        Err(_) => failures.push(format!("{name}: panicked")),
                    }
                }
            }
        }
    }
    eprintln!("hostile: {ran} truncations");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Opens `p` as `format` under the guards and expects a refusal whose message holds
/// `want`.
fn assert_refused_at_open(name: &str, format: Format, p: PathBuf, want: &'static str) {
    let root = p.parent().unwrap().to_path_buf();
    guarded(name, move || match open_disk(format, &p, &root) {
        Ok(_) => Err("opened".into()),
        Err(e) if e.to_string().contains(want) => Ok(()),
        Err(e) => Err(format!("refused for another reason: {e}")),
    });
}

#[test]
fn regression_qed_l1_naming_one_l2_table_everywhere_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shared.qed");
    let ps = p.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "qed", ps, "1T"]);
    ok("qemu-io", &["-f", "qed", "-c", "write -P 1 0 64k", ps]);
    let mut bytes = std::fs::read(&p).unwrap();
    let cluster = le32_at(&bytes, 4) as u64;
    let table_bytes = cluster * u64::from(le32_at(&bytes, 8));
    let l1 = le64_at(&bytes, 40) as usize;
    let first = le64_at(&bytes, l1);
    assert_ne!(first, 0, "the write allocated an L2 table");
    let used = (1u64 << 40).div_ceil(cluster * (table_bytes / 8)) as usize;
    for i in 0..used {
        bytes[l1 + i * 8..l1 + i * 8 + 8].copy_from_slice(&first.to_le_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    // Room (sparse) for as many tables as are named, so the duplicate itself is found.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1 << 30).unwrap();
    assert_refused_at_open("QED shared L2 table", Format::Qed, p, "more than one L1");
}

#[test]
fn regression_vmdk_grain_directory_naming_one_grain_table_everywhere_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shared.vmdk");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", p.to_str().unwrap(), "64G"],
    );
    let mut bytes = std::fs::read(&p).unwrap();
    let capacity = le64_at(&bytes, 12);
    let grain = le64_at(&bytes, 20);
    let gtes = u64::from(le32_at(&bytes, 44));
    let gd = (le64_at(&bytes, 56) * 512) as usize;
    let entries = capacity.div_ceil(grain * gtes) as usize;
    let first = le32_at(&bytes, gd);
    assert_ne!(first, 0, "qemu-img preallocates grain tables");
    for i in 0..entries {
        bytes[gd + i * 4..gd + i * 4 + 4].copy_from_slice(&first.to_le_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    assert_refused_at_open(
        "VMDK shared grain table",
        Format::Vmdk,
        p,
        "more than one grain directory entry",
    );
}

#[test]
fn regression_vhd_block_table_naming_one_block_everywhere_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shared.vpc");
    let ps = p.to_str().unwrap();
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            ps,
            "100G",
        ],
    );
    ok("qemu-io", &["-f", "vpc", "-c", "write -P 1 0 64k", ps]);
    let good = std::fs::read(&p).unwrap();
    let header = u64::from_be_bytes(good[16..24].try_into().unwrap()) as usize;
    let bat = u64::from_be_bytes(good[header + 16..header + 24].try_into().unwrap()) as usize;
    let first = be32_at(&good, bat);
    assert_ne!(first, u32::MAX, "the write allocated a block");
    // Every entry names the one block; then only the second names it (a plain
    // duplicate); then the second starts one sector into the first (an overlap).
    for (name, entries, value) in [
        ("every entry", 50usize, first),
        ("one duplicate", 2, first),
        ("one overlap", 2, first + 1),
    ] {
        let mut bytes = good.clone();
        for i in 1..entries {
            bytes[bat + i * 4..bat + i * 4 + 4].copy_from_slice(&value.to_be_bytes());
        }
        let q = dir.path().join(format!("{}.vpc", name.replace(' ', "-")));
        // Room for the overlapping block, so only the overlap is wrong.
        let len = bytes.len() + (4 << 20);
        bytes.resize(len, 0);
        std::fs::write(&q, bytes).unwrap();
        let want = if entries > 2 { "shared" } else { "overlap" };
        assert_refused_at_open(&format!("VHD block table, {name}"), Format::Vpc, q, want);
    }
}

/// The VHD footer checksum (one's complement of the byte sum, its own field as zero).
fn fix_vhd_checksum(footer: &mut [u8]) {
    footer[64..68].fill(0);
    let sum = footer
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
}

/// Writes `size` into the size field of a copy of a seed file (`bytes`, of `name`).
fn with_size(name: &str, bytes: &[u8], size: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match name {
        n if n.starts_with("qcow2") || n == "top.qcow2" || n == "base.qcow2" => {
            b[24..32].copy_from_slice(&size.to_be_bytes())
        }
        n if n.starts_with("qed") => b[48..56].copy_from_slice(&size.to_le_bytes()),
        n if n.starts_with("vdi") => b[368..376].copy_from_slice(&size.to_le_bytes()),
        // A descriptor: the extent line's sectors.
        "vmdk-split" => {
            let text = String::from_utf8_lossy(&b).into_owned();
            let sized = text
                .lines()
                .map(|l| match l.strip_prefix("RW ") {
                    Some(rest) => {
                        let (_, tail) = rest.split_once(' ').unwrap();
                        format!("RW {} {tail}", size / 512)
                    }
                    None => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n");
            return sized.into_bytes();
        }
        n if n.starts_with("vmdk") => b[12..20].copy_from_slice(&(size / 512).to_le_bytes()),
        n if n.starts_with("vpc") => {
            let len = b.len();
            let mut at = vec![len - 512];
            if b.starts_with(b"conectix") {
                at.push(0);
            }
            for a in at {
                b[a + 40..a + 48].copy_from_slice(&size.to_be_bytes());
                b[a + 48..a + 56].copy_from_slice(&size.to_be_bytes());
                fix_vhd_checksum(&mut b[a..a + 512]);
            }
        }
        other => panic!("no size field known for {other}"),
    }
    b
}

/// Images at (or near) the largest size of their format, with data at both ends: a
/// patched size near these can pass the reader's checks, and then the views and the
/// converter face a disk of tens of terabytes.
fn big_seeds(dir: &Path) -> Vec<Seed> {
    let big = |name: &'static str, format: Format, size: &str, opts: &[&str]| {
        let p = dir.join(name);
        let mut args = vec!["create", "-q", "-f", format.name()];
        args.extend_from_slice(opts);
        args.extend([p.to_str().unwrap(), size]);
        ok("qemu-img", &args);
        let last = format!("write -P 9 {} 64k", parse_size(size) - (64 << 10));
        ok(
            "qemu-io",
            &[
                "-f",
                format.name(),
                "-c",
                "write -P 8 0 64k",
                "-c",
                &last,
                p.to_str().unwrap(),
            ],
        );
        Seed {
            name,
            format,
            files: vec![p],
        }
    };
    vec![
        big("qcow2-64t", Format::Qcow2, "64T", &[]),
        big("qed-64t", Format::Qed, "64T", &[]),
        big("vdi-4t", Format::Vdi, "4T", &[]),
        big("vpc-2040g", Format::Vpc, "2040G", &["-o", "force_size=on"]),
    ]
}

fn parse_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    let shift = match unit {
        "G" => 30,
        "T" => 40,
        other => panic!("unit {other}"),
    };
    n.parse::<u64>().unwrap() << shift
}

#[test]
fn sizes_near_u64_max_in_every_format_give_errors_or_consistent_data() {
    if !have_qemu() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let sizes = [
        u64::MAX,
        u64::MAX - 511,
        i64::MAX as u64,
        (i64::MAX as u64) - 511,
        1 << 62,
        1 << 55,
        1 << 50,
        (64 << 40) + 512,
        64 << 40,
        (64 << 40) - 512,
        (4 << 40) + 512,
        (4 << 40) - 512,
        (2040 << 30) + 512,
        2040 << 30,
        SEED_SIZE + 512,
        512,
        0,
    ];
    let mut ran = 0;
    let mut opened = Vec::new();
    let mut seeds: Vec<Seed> = ["qcow2", "qed", "vdi", "vpc", "vmdk"]
        .into_iter()
        .flat_map(|prefix| make_seeds(work.path(), prefix))
        .collect();
    seeds.extend(big_seeds(work.path()));
    {
        for seed in seeds {
            let top = &seed.files[0];
            let original = std::fs::read(top).unwrap();
            for size in sizes {
                ran += 1;
                let case_dir = tempfile::tempdir_in(work.path()).unwrap();
                for f in &seed.files[1..] {
                    std::fs::copy(f, case_dir.path().join(f.file_name().unwrap())).unwrap();
                }
                let p = case_dir.path().join(top.file_name().unwrap());
                std::fs::write(&p, with_size(seed.name, &original, size)).unwrap();
                let (format, dir) = (seed.format, case_dir.path().to_path_buf());
                let (tx, rx) = mpsc::channel();
                guarded(&format!("{} with size {size}", seed.name), move || {
                    let r = feed(format, &p, &dir, size)?;
                    let _ = tx.send(r);
                    Ok(())
                });
                if let Ok(r) = rx.recv()
                    && r.opened
                {
                    opened.push(format!("{}@{size}: {} views", seed.name, r.views));
                }
            }
        }
    }
    eprintln!("hostile: {ran} sizes, opened: {}", opened.join(", "));
}
