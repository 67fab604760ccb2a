//! The judgement every sparse view passes in its tests: sources built with qemu-img,
//! the view written the way `cp` would and checked with qemu-img.

use super::round_up;
use crate::image::raw::RawLayer;
use crate::image::{Disk, Extent, Format, Layer, Mapping};
use crate::testutil::{self, qemu_img, qemu_io, qemu_map};
use crate::view::{View, ViewId};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A sparse raw file of `size` bytes with `writes` (`offset`, `len`, seed) done by
/// qemu-io. Each write is distinct noise, so a block placed at the wrong offset
/// cannot compare equal. The file is made by `set_len`, not `qemu-img create`,
/// which allocates the first 4 KiB of every raw file it creates.
pub fn raw_source(dir: &Path, name: &str, size: u64, writes: &[(u64, u64, u64)]) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create raw source");
    f.set_len(size).expect("size raw source");
    drop(f);
    qemu_write_noise(&path, "raw", writes);
    path
}

/// `qemu-io -f FMT -c "write -s NOISE off len"` for each write.
pub fn qemu_write_noise(path: &Path, fmt: &str, writes: &[(u64, u64, u64)]) {
    qemu_write(path, fmt, "", writes, false);
}

/// `qemu-io -f FMT -c "write FLAGS -s FILE off len"` for each write: noise, or
/// (`compressible`) noise thinned out so that a compressed cluster is smaller than
/// the cluster (qcow2 stores it uncompressed otherwise) yet unlike any other.
pub fn qemu_write(
    path: &Path,
    fmt: &str,
    flags: &str,
    writes: &[(u64, u64, u64)],
    compressible: bool,
) {
    let dir = path.parent().expect("source in a directory");
    let mut cmds = Vec::new();
    for (i, &(off, len, seed)) in writes.iter().enumerate() {
        let noise = dir.join(format!(".noise{i}"));
        let mut data = testutil::noise(seed, len as usize);
        if compressible {
            // Keep 64 noise bytes in every 512.
            for (k, b) in data.iter_mut().enumerate() {
                if k % 512 >= 64 {
                    *b = 0x55;
                }
            }
        }
        std::fs::write(&noise, data).unwrap();
        cmds.push(format!("write {flags} -s {} {off} {len}", noise.display()));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    if !cmds.is_empty() {
        qemu_io(fmt, path, &cmds);
    }
}

pub fn raw_disk(path: &Path) -> Arc<Disk> {
    let layer: Arc<dyn Layer> = Arc::new(RawLayer::open(path).expect("open raw source"));
    Arc::new(Disk::new(vec![layer]))
}

/// A disk of `size` bytes that stores nothing, for sizes no test file can have.
pub fn empty_disk(size: u64) -> Arc<Disk> {
    #[derive(Debug)]
    struct Nothing(u64, PathBuf);
    impl Layer for Nothing {
        fn format(&self) -> Format {
            Format::Raw
        }
        fn path(&self) -> &Path {
            &self.1
        }
        fn virtual_size(&self) -> u64 {
            self.0
        }
        fn map(&self, _offset: u64, max_len: u64) -> crate::image::Result<Extent> {
            Ok(Extent {
                len: max_len,
                mapping: Mapping::Unallocated,
            })
        }
        fn allocated_bytes(&self) -> u64 {
            0
        }
    }
    Arc::new(Disk::new(vec![Arc::new(Nothing(size, "huge.img".into()))]))
}

/// sha256 of the whole view read front to back in 1 MiB reads.
pub fn hash_view(view: &View) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    loop {
        let n = view.read_at(&mut buf, pos).expect("view read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    format!("{:x}", h.finalize())
}

/// The guest data of `disk`, rounded out to `granularity` blocks and clipped to
/// `span`: what `qemu-img map` must report as data in a view storing whole blocks.
pub fn expected_blocks(disk: &Disk, granularity: u64, span: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in disk.data_extents(0, disk.virtual_size()).unwrap() {
        let a = s / granularity * granularity;
        let b = round_up(s + l, granularity).min(span);
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= a => *pl = b.max(*ps + *pl) - *ps,
            _ => out.push((a, b - a)),
        }
    }
    out
}

/// Writes `format`'s view of `disk` to `dir` and judges it against `source`:
/// qemu-img detects it with the exact (sector-rounded) size, checks it clean and
/// finds it identical to the source; its length is the view's size; `qemu-img map`
/// shows data exactly in the blocks holding source data; `allocated_bytes` is the
/// sum of its data extents; a second open gives the same bytes. Returns the view.
pub fn judge(
    dir: &Path,
    format: Format,
    disk: Arc<Disk>,
    source: &Path,
    source_fmt: &str,
    granularity: u64,
) -> View {
    let id = ViewId([0x5a; 32]);
    let view = View::new(disk.clone(), format, id).expect("view layout");
    let out = dir.join(format!("view.{}", format.name()));
    let hash = testutil::write_view_sparse(&view, &out, 4097);
    let len = std::fs::metadata(&out).unwrap().len();
    assert_eq!(len, view.size(), "written view length");
    let span = round_up(disk.virtual_size(), 512);
    testutil::assert_qemu_accepts(&out, format.name(), span, source, source_fmt);
    let got = testutil::data_runs(&qemu_map(&out, Some(format.name())));
    assert_eq!(
        got,
        expected_blocks(&disk, granularity, span),
        "qemu-img map data runs"
    );
    if span <= 128 << 20 {
        // qemu's own raw conversion of the view is the disk, byte for byte.
        let mut want = vec![0u8; span as usize];
        disk.read_at(&mut want[..disk.virtual_size() as usize], 0)
            .unwrap();
        let got = testutil::qemu_raw_bytes(&out, Some(format.name()));
        assert!(
            got == want,
            "qemu-img convert of the view differs from the disk"
        );
    }
    own_reader_agrees(&out, format, &disk, granularity, span);
    let extents = view.data_extents().unwrap();
    let held: u64 = extents.iter().map(|(_, l)| l).sum();
    assert_eq!(
        view.allocated_bytes(),
        held,
        "allocated bytes are the data extents"
    );
    let again = View::new(disk, format, id).expect("second layout");
    assert_eq!(hash_view(&again), hash, "two opens give the same bytes");
    view
}

/// The project's own reader of `format` opens the written view with the sector-rounded
/// size, reports data exactly in the stored blocks, and reads back the disk's bytes.
fn own_reader_agrees(file: &Path, format: Format, disk: &Disk, granularity: u64, span: u64) {
    let f = std::fs::File::open(file).unwrap();
    let layer: Arc<dyn Layer> = match format {
        Format::Vmdk => Arc::new(crate::image::vmdk::open(f, file).expect("own vmdk reader")),
        Format::Vdi => Arc::new(crate::image::vdi::open(f, file).expect("own vdi reader")),
        Format::Vpc => Arc::new(crate::image::vpc::open(f, file).expect("own vpc reader")),
        _ => return,
    };
    let back = Disk::new(vec![layer]);
    assert_eq!(
        back.virtual_size(),
        span,
        "size seen by our {format} reader"
    );
    let data = back.data_extents(0, span).unwrap();
    assert_eq!(
        data,
        expected_blocks(disk, granularity, span),
        "data seen by our {format} reader"
    );
    let mut want = vec![0u8; 1 << 20];
    let mut got = vec![0u8; 1 << 20];
    for (start, len) in data {
        let mut pos = start;
        while pos < start + len {
            let n = (start + len - pos).min(1 << 20) as usize;
            back.read_at(&mut got[..n], pos).unwrap();
            let inside = disk.virtual_size().saturating_sub(pos).min(n as u64) as usize;
            want[..n].fill(0);
            disk.read_at(&mut want[..inside], pos).unwrap();
            assert!(
                got[..n] == want[..n],
                "our {format} reader differs at {pos}"
            );
            pos += n as u64;
        }
    }
}

/// Random reads at random offsets and lengths (tiny xorshift, fixed seed) equal the
/// same ranges of one sequential read of the whole view.
pub fn random_reads_match_sequential(view: &View, seed: u64, cases: usize) {
    let size = view.size() as usize;
    let mut whole = vec![0u8; size];
    assert_eq!(view.read_at(&mut whole, 0).unwrap(), size);
    // Two readers at once: layouts serve concurrent reads with no shared cursor.
    std::thread::scope(|scope| {
        for reader in 0..2u64 {
            let whole = &whole;
            scope.spawn(move || random_reads(view, whole, seed ^ (reader << 32), cases / 2));
        }
    });
}

fn random_reads(view: &View, whole: &[u8], seed: u64, cases: usize) {
    let size = whole.len();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = Vec::new();
    for case in 0..cases {
        // A third of the reads land in the first 2 MiB, where headers and tables are.
        let span = if case % 3 == 1 {
            size.min(2 << 20)
        } else {
            size
        };
        let off = (next() % (span as u64 + 1)) as usize;
        // Mostly short reads, some spanning several segments.
        let max = if case % 4 == 0 { 3 << 20 } else { 70_000 };
        let len = (next() % max) as usize;
        buf.resize(len, 0xee);
        let n = view.read_at(&mut buf, off as u64).unwrap();
        let want = len.min(size - off);
        assert_eq!(n, want, "read length at {off}+{len}");
        assert!(
            buf[..n] == whole[off..off + n],
            "bytes at {off}+{len} differ from the sequential read"
        );
    }
}

const MIB: u64 = 1 << 20;

/// The shapes of issue 4's source matrix as raw files (the same shapes as qcow2
/// images, with compressed and layered ones, are [`Qcow2Case`]).
#[derive(Clone, Copy, Debug)]
pub enum Case {
    /// 64 MiB with data runs of many sizes and alignments.
    Plain,
    /// 64 MiB and no data at all.
    Empty,
    /// 64 KiB + 1 byte, all data: the last block (and sector) is partial.
    OneBytePastACluster,
    /// 5 GiB with a few MiB of data spread over it.
    LargeSparse,
    /// Data in 2 MiB-aligned chunks, as a 2 MiB-cluster source allocates it.
    TwoMibChunks,
    /// A disk of 0 bytes.
    ZeroLength,
}

/// Builds `case` in `dir` as a raw file; returns the disk and the file.
pub fn raw_case(dir: &Path, case: Case) -> (Arc<Disk>, PathBuf) {
    let src = match case {
        Case::Plain => raw_source(
            dir,
            "plain.raw",
            64 * MIB,
            &[
                (0, 512, 1),
                (4096, 8192, 2),
                (65536 - 512, 1024, 3),
                (MIB + 12345 - 345, 300_000, 4),
                (7 * MIB, 2 * MIB + 4096, 5),
                (31 * MIB + 512, 2 * MIB, 6),
                (64 * MIB - 4096, 4096, 7),
            ],
        ),
        Case::Empty => raw_source(dir, "empty.raw", 64 * MIB, &[]),
        Case::OneBytePastACluster => {
            let path = raw_source(dir, "odd.raw", 65536, &[(0, 65536, 8)]);
            // qemu-io cannot write a 1-byte tail past a sector; append it directly.
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(&[0x99]).unwrap();
            path
        }
        Case::LargeSparse => raw_source(
            dir,
            "large.raw",
            5 << 30,
            &[
                (0, MIB, 10),
                (1 << 30, 512, 11),
                ((3 << 30) + 777 * 512, 2 * MIB, 12),
                ((5 << 30) - MIB, MIB, 13),
            ],
        ),
        Case::TwoMibChunks => raw_source(
            dir,
            "chunks.raw",
            32 * MIB,
            &[
                (0, 2 * MIB, 14),
                (6 * MIB, 4 * MIB, 15),
                (30 * MIB, 2 * MIB, 16),
            ],
        ),
        Case::ZeroLength => raw_source(dir, "zero.raw", 0, &[]),
    };
    (raw_disk(&src), src)
}

/// Judges `format`'s view of `case` (see [`judge`]) and reads it randomly.
pub fn raw_matrix_case(format: Format, granularity: u64, case: Case) {
    if !testutil::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (disk, src) = raw_case(dir.path(), case);
    let view = judge(dir.path(), format, disk, &src, "raw", granularity);
    random_reads_match_sequential(&view, 0x2545_f491_4f6c_dd1d, 64);
}

/// The shapes of issue 4's matrix as qcow2 images, read by the qcow2 reader.
#[derive(Clone, Copy, Debug)]
pub enum Qcow2Case {
    /// 64 MiB, 64 KiB clusters, data of many sizes and alignments, zero clusters.
    Plain,
    /// Compressed clusters, deflate (qcow2's default compression type).
    Zlib,
    /// Compressed clusters, zstd.
    Zstd,
    /// base ← mid ← top, each writing over the one below, the top zeroing some.
    Chain,
    /// 64 MiB and no cluster allocated.
    Empty,
    /// 64 KiB + 1 byte (qemu rounds it to 64.5 KiB), data in the last sector.
    OneBytePastACluster,
    /// 5 GiB with a few MiB of data.
    LargeSparse,
    /// 2 MiB clusters, partly written.
    TwoMibClusters,
}

fn qcow2_create(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size = size.to_string();
    args.extend([path.to_str().unwrap(), size.as_str()]);
    qemu_img(&args);
    path
}

/// Builds `case` in `dir`; returns the disk opened through its backing chain and
/// the top image.
pub fn qcow2_case(dir: &Path, case: Qcow2Case) -> (Arc<Disk>, PathBuf) {
    let plain_writes = [
        (0, 512, 1),
        (4096, 8192, 2),
        (65536 - 512, 1024, 3),
        (MIB + 12000, 300_000, 4),
        (7 * MIB, 2 * MIB + 4096, 5),
        (64 * MIB - 4096, 4096, 7),
    ];
    let top = match case {
        Qcow2Case::Plain => {
            let p = qcow2_create(dir, "plain.qcow2", 64 * MIB, "");
            qemu_write_noise(&p, "qcow2", &plain_writes);
            // Zero clusters over data: the view must read (and store) them as zero.
            qemu_io("qcow2", &p, &["write -z 7M 64k", "write -z 20M 1M"]);
            p
        }
        Qcow2Case::Zlib | Qcow2Case::Zstd => {
            let opts = match case {
                Qcow2Case::Zstd => "compression_type=zstd",
                _ => "",
            };
            let p = qcow2_create(dir, "compressed.qcow2", 64 * MIB, opts);
            let clusters = [
                (0, 64 << 10, 21),
                (MIB, 4 * MIB, 22),
                (60 * MIB, 64 << 10, 23),
            ];
            qemu_write(&p, "qcow2", "-c", &clusters, true);
            // And one plain cluster among the compressed ones.
            qemu_write_noise(&p, "qcow2", &[(2 * MIB + 4096, 4096, 24)]);
            let map = qemu_img(&["map", "--output=json", p.to_str().unwrap()]);
            assert!(
                map.contains("\"compressed\": true"),
                "no compressed cluster: {map}"
            );
            let info = qemu_img(&["info", p.to_str().unwrap()]);
            let kind = if opts.is_empty() { "zlib" } else { "zstd" };
            assert!(
                info.contains(&format!("compression type: {kind}")),
                "{info}"
            );
            p
        }
        Qcow2Case::Chain => {
            let base = qcow2_create(dir, "base.qcow2", 64 * MIB, "");
            qemu_write_noise(&base, "qcow2", &plain_writes);
            let mid = qcow2_create(
                dir,
                "mid.qcow2",
                64 * MIB,
                "backing_file=base.qcow2,backing_fmt=qcow2",
            );
            qemu_write_noise(
                &mid,
                "qcow2",
                &[(4096, 4096, 31), (8 * MIB, MIB, 32), (40 * MIB, 512, 33)],
            );
            let top = qcow2_create(
                dir,
                "top.qcow2",
                64 * MIB,
                "backing_file=mid.qcow2,backing_fmt=qcow2",
            );
            qemu_write_noise(
                &top,
                "qcow2",
                &[(MIB + 65536, 65536, 41), (50 * MIB, 3 * MIB, 42)],
            );
            // Zeroes in the top that hide data below, whole and partial clusters.
            qemu_io("qcow2", &top, &["write -z 8M 64k", "write -z 0 4k"]);
            top
        }
        Qcow2Case::Empty => qcow2_create(dir, "empty.qcow2", 64 * MIB, ""),
        Qcow2Case::OneBytePastACluster => {
            let p = qcow2_create(dir, "odd.qcow2", 65537, "");
            qemu_write_noise(&p, "qcow2", &[(0, 4096, 51), (65536, 512, 52)]);
            p
        }
        Qcow2Case::LargeSparse => {
            let p = qcow2_create(dir, "large.qcow2", 5 << 30, "");
            qemu_write_noise(
                &p,
                "qcow2",
                &[
                    (0, MIB, 61),
                    (1 << 30, 512, 62),
                    ((3 << 30) + 777 * 512, 2 * MIB, 63),
                    ((5 << 30) - MIB, MIB, 64),
                ],
            );
            p
        }
        Qcow2Case::TwoMibClusters => {
            let p = qcow2_create(dir, "big-clusters.qcow2", 64 * MIB, "cluster_size=2M");
            qemu_write_noise(
                &p,
                "qcow2",
                &[
                    (4096, 4096, 71),
                    (9 * MIB, 3 * MIB, 72),
                    (63 * MIB, 512, 73),
                ],
            );
            p
        }
    };
    let policy = crate::image::chain::WithinDir {
        root: dir.to_path_buf(),
    };
    let disk = crate::image::chain::open_chain(&top, &policy).expect("open qcow2 chain");
    if let Qcow2Case::Chain = case {
        assert_eq!(disk.layers().len(), 3, "base, mid and top are all read");
    }
    (Arc::new(disk), top)
}

/// Judges `format`'s view of the qcow2 `case` and reads it randomly.
pub fn qcow2_matrix_case(format: Format, granularity: u64, case: Qcow2Case) {
    if !testutil::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (disk, src) = qcow2_case(dir.path(), case);
    let view = judge(dir.path(), format, disk, &src, "qcow2", granularity);
    random_reads_match_sequential(&view, 0x51_7cc1_b727_220a, 64);
}

/// One test per qcow2 matrix case for a format, named after the case.
macro_rules! qcow2_matrix_tests {
    ($format:expr, $granularity:expr) => {
        mod qcow2_matrix {
            use super::*;
            use crate::view::blockmap::check::{Qcow2Case, qcow2_matrix_case};
            #[test]
            fn plain_qcow2_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::Plain);
            }
            #[test]
            fn zlib_compressed_qcow2_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::Zlib);
            }
            #[test]
            fn zstd_compressed_qcow2_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::Zstd);
            }
            #[test]
            fn three_layer_chain_is_flattened_identically() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::Chain);
            }
            #[test]
            fn empty_qcow2_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::Empty);
            }
            #[test]
            fn qcow2_one_byte_past_a_cluster_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::OneBytePastACluster);
            }
            #[test]
            fn five_gib_sparse_qcow2_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::LargeSparse);
            }
            #[test]
            fn two_mib_cluster_qcow2_is_identical_through_qemu() {
                qcow2_matrix_case($format, $granularity, Qcow2Case::TwoMibClusters);
            }
        }
    };
}
pub(crate) use qcow2_matrix_tests;

/// One test per matrix case for a format, named after the case.
macro_rules! raw_matrix_tests {
    ($format:expr, $granularity:expr) => {
        mod raw_matrix {
            use super::*;
            use crate::view::blockmap::check::{Case, raw_matrix_case};
            #[test]
            fn plain_disk_is_identical_through_qemu() {
                raw_matrix_case($format, $granularity, Case::Plain);
            }
            #[test]
            fn empty_disk_is_identical_through_qemu() {
                raw_matrix_case($format, $granularity, Case::Empty);
            }
            #[test]
            fn disk_one_byte_past_a_cluster_is_identical_through_qemu() {
                raw_matrix_case($format, $granularity, Case::OneBytePastACluster);
            }
            #[test]
            fn five_gib_sparse_disk_is_identical_through_qemu() {
                raw_matrix_case($format, $granularity, Case::LargeSparse);
            }
            #[test]
            fn disk_in_two_mib_chunks_is_identical_through_qemu() {
                raw_matrix_case($format, $granularity, Case::TwoMibChunks);
            }
        }
    };
}
pub(crate) use raw_matrix_tests;

/// The zero-length case, for formats that can describe a disk of 0 bytes.
macro_rules! zero_length_test {
    ($format:expr, $granularity:expr) => {
        #[test]
        fn zero_length_disk_is_identical_through_qemu() {
            crate::view::blockmap::check::raw_matrix_case(
                $format,
                $granularity,
                crate::view::blockmap::check::Case::ZeroLength,
            );
        }
    };
}
pub(crate) use zero_length_test;
