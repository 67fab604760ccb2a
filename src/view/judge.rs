//! Test support shared by the view generators' tests: build a source disk with qemu,
//! write a view of it through the view API, and judge the result with qemu-img and by
//! comparing reads.

use super::{View, ViewId};
use crate::image::qcow2_layout::{CLUSTER_SIZE, SECTOR_SIZE, align_up, allocated_clusters};
use crate::image::raw::RawLayer;
use crate::image::{Disk, Format, Layer};
use crate::testutil::{self, assert_qemu_accepts, data_runs, qemu_img, qemu_io, qemu_map};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The id views of test disks carry (any fixed value: bytes must not depend on the clock).
pub const TEST_ID: ViewId = ViewId([7; 32]);

/// A raw file of `size` bytes made by `qemu-img create`, then written with the qemu-io
/// commands `cmds`.
pub fn raw_source(dir: &Path, name: &str, size: u64, cmds: &[&str]) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    if !cmds.is_empty() {
        qemu_io("raw", &path, cmds);
    }
    path
}

/// The single-layer disk of a raw file.
pub fn raw_disk(path: &Path) -> Arc<Disk> {
    let layer: Arc<dyn Layer> = Arc::new(RawLayer::open(path).expect("open raw source"));
    Arc::new(Disk::new(vec![layer]))
}

/// Tiny deterministic generator for property tests (xorshift64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `[0, n)` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The guest ranges a 64 KiB-cluster file made from `disk` stores, as `qemu-img map`
/// reports them: whole clusters, cut at the virtual size qemu sees.
pub fn expected_cluster_runs(disk: &Disk) -> Vec<(u64, u64)> {
    let qemu_size = align_up(disk.virtual_size(), SECTOR_SIZE);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (first, count) in allocated_clusters(disk, CLUSTER_SIZE).expect("allocation") {
        let start = first * CLUSTER_SIZE;
        let end = ((first + count) * CLUSTER_SIZE).min(qemu_size);
        out.push((start, end - start));
    }
    out
}

/// Writes the `format` view of `disk` to a file in `dir` and judges it:
/// * the file has the view's size and the view's extents lie inside it;
/// * qemu-img detects the format, the exact size, finds no error, compares identical
///   to `source` (read as `source_fmt`);
/// * `qemu-img map` of the file reports data exactly on `data_runs` (guest ranges);
/// * a second open of the view gives the same bytes;
/// * random reads at random offsets and lengths equal the sequential bytes.
///
/// Returns the written file.
pub fn judge_view(
    disk: &Arc<Disk>,
    format: Format,
    dir: &Path,
    source: &Path,
    source_fmt: &str,
    expected_data: &[(u64, u64)],
) -> PathBuf {
    let view = View::new(disk.clone(), format, TEST_ID).expect("view layout");
    let file = dir.join(format!("view.{}", format.name()));
    let hash = testutil::write_view_sparse(&view, &file, 4097);
    let len = std::fs::metadata(&file).expect("stat view").len();
    assert_eq!(len, view.size(), "written view length");
    let written = std::fs::read(&file).expect("read written view");
    assert_eq!(
        format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&written)),
        hash,
        "chunked reads of the data extents and a sequential read agree"
    );
    drop(written);

    let extents = view.data_extents().expect("view extents");
    let in_extents: u64 = extents.iter().map(|(_, l)| l).sum();
    assert_eq!(in_extents, view.allocated_bytes(), "extents vs allocated");
    assert!(extents.iter().all(|&(s, l)| s + l <= view.size()));

    if let Some(file_extents) = file_data_extents(&file) {
        assert_eq!(
            file_extents, extents,
            "holes of the written file are the view's"
        );
    }

    let qemu_size = align_up(disk.virtual_size(), SECTOR_SIZE);
    assert_qemu_accepts(&file, format.name(), qemu_size, source, source_fmt);
    assert_eq!(
        qemu_host_clusters(&file, format.name()),
        view_guest_clusters(&view),
        "where qemu finds each guest cluster in the file is where the view puts it"
    );
    let map = qemu_map(&file, Some(format.name()));
    assert_eq!(
        data_runs(&map),
        expected_data,
        "qemu-img map of the {format} view"
    );

    let again = View::new(disk.clone(), format, TEST_ID).expect("second layout");
    let copy = dir.join(format!("again.{}", format.name()));
    assert_eq!(
        testutil::write_view_sparse(&again, &copy, 65536 + 3),
        hash,
        "two opens give the same bytes"
    );

    // The same property from four threads at once: a view serves concurrent readers.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (view, file) = (&view, &file);
            s.spawn(move || random_reads_match(view, file, 0x5eed + len + t));
        }
    });
    file
}

/// Reads `view` at random offsets and lengths and compares with the file written from it.
pub fn random_reads_match(view: &View, file: &Path, seed: u64) {
    let f = std::fs::File::open(file).expect("open written view");
    let size = view.size();
    if size == 0 {
        return;
    }
    let mut rng = Rng::new(seed);
    let mut got = vec![0u8; 300_000];
    let mut want = vec![0u8; 300_000];
    for _ in 0..100 {
        let off = rng.below(size + 100);
        let max = if rng.below(4) == 0 { 300_000 } else { 5000 };
        let len = 1 + rng.below(max) as usize;
        let n = view.read_at(&mut got[..len], off).expect("random read");
        let expect_n = size.saturating_sub(off).min(len as u64) as usize;
        assert_eq!(n, expect_n, "read length at {off}+{len}");
        f.read_exact_at(&mut want[..n], off).expect("read file");
        assert!(
            got[..n] == want[..n],
            "bytes differ in a read at {off}+{len}"
        );
    }
}

/// Builds a raw source of `size` bytes written with qemu-io `cmds` and judges its
/// `format` view with [`judge_view`]; qemu-img map of the view must report data on the
/// source's stored 64 KiB clusters.
pub fn judge_raw_case(format: Format, size: u64, cmds: &[&str]) {
    if !testutil::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = raw_source(dir.path(), "src.raw", size, cmds);
    let disk = raw_disk(&src);
    let expected = expected_cluster_runs(&disk);
    judge_view(&disk, format, dir.path(), &src, "raw", &expected);
}

/// qemu-io commands that scatter data over a disk of at least 1 GiB: an aligned cluster,
/// an unaligned 4 KiB write, a run across the 512 MiB boundary of qcow2's first L2 table,
/// explicit zeroes (stored, so still data), and the last 4 KiB.
pub const SCATTERED_1G: [&str; 5] = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1049088 4k",
    "write -P 0x33 535822336 2M",
    "write -P 0 700M 128k",
    "write -P 0x44 1073737728 4k",
];

/// The source images of the view and converter matrix (issue 4), built with qemu.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// qcow2 with data, zero writes and discards.
    Plain,
    /// qcow2 with every cluster deflate-compressed.
    Zlib,
    /// qcow2 with every cluster zstd-compressed.
    Zstd,
    /// base ← mid ← top, each layer with data, zero writes and discards.
    Chain,
    /// qcow2 of size 0.
    Empty,
    /// qcow2 of 64 KiB + 1 byte (qemu rounds it to 66048).
    OneBytePastCluster,
    /// 5 GiB qcow2 with a few MiB of data.
    Sparse5G,
    /// qcow2 with 2 MiB clusters.
    Cluster2M,
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

fn qcow2(path: &Path, opts: &str, size: &str, cmds: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    qemu_img(&args);
    if !cmds.is_empty() {
        qemu_io("qcow2", path, cmds);
    }
}

/// Data, explicit zeroes over data, and a discard: what every plain layer gets.
const PLAIN_1G: [&str; 8] = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1049088 4k",
    "write -P 0x33 535822336 2M",
    "write -P 0 700M 128k",
    "write -P 0x44 1073737728 4k",
    "write -P 0x55 127M 4M",
    "write -z 128M 1M",
    "discard 130M 64k",
];

impl Source {
    /// Builds the source in `dir`; returns its top file and qemu format name.
    pub fn build(self, dir: &Path) -> (PathBuf, &'static str) {
        let top = dir.join("src.qcow2");
        match self {
            Source::Plain => qcow2(&top, "", "1G", &PLAIN_1G),
            Source::Zlib | Source::Zstd => {
                let raw = raw_source(dir, "plain.raw", 1 << 30, &SCATTERED_1G);
                let opts = match self {
                    Source::Zstd => "compression_type=zstd",
                    _ => "compression_type=zlib",
                };
                qemu_img(&[
                    "convert",
                    "-q",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    opts,
                    s(&raw),
                    s(&top),
                ]);
                std::fs::remove_file(&raw).expect("remove raw");
            }
            Source::Chain => {
                let (base, mid) = (dir.join("base.qcow2"), dir.join("mid.qcow2"));
                qcow2(&base, "", "1G", &PLAIN_1G);
                qcow2(
                    &mid,
                    "backing_file=base.qcow2,backing_fmt=qcow2",
                    "1G",
                    &[
                        "write -P 0x66 32k 64k",
                        "write -z 535822336 64k",
                        "discard 127M 64k",
                        "write -P 0x77 900M 192k",
                    ],
                );
                qcow2(
                    &top,
                    "backing_file=mid.qcow2,backing_fmt=qcow2",
                    "1G",
                    &[
                        "write -P 0x88 1049088 512",
                        "write -z 900M 64k",
                        "discard 0 64k",
                        "write -P 0x99 1000M 64k",
                    ],
                );
            }
            Source::Empty => qcow2(&top, "", "0", &[]),
            Source::OneBytePastCluster => qcow2(&top, "", "65537", &["write -P 0x5a 65536 1"]),
            Source::Sparse5G => qcow2(
                &top,
                "",
                "5G",
                &[
                    "write -P 1 1M 1M",
                    "write -P 2 2047M 2M",
                    "write -P 3 5119M 1M",
                ],
            ),
            Source::Cluster2M => qcow2(&top, "cluster_size=2M", "1G", &PLAIN_1G),
        }
        (top, "qcow2")
    }
}

/// Opens a qcow2 source with its chain (backing files within `dir`).
pub fn qcow2_disk(path: &Path, dir: &Path) -> Arc<Disk> {
    let policy = crate::image::chain::WithinDir { root: dir.into() };
    Arc::new(crate::image::chain::open_chain(path, &policy).expect("open qcow2 source"))
}

/// `qemu-img map`'s data runs of `source`, widened to whole 64 KiB clusters (cut at the
/// size qemu sees): where a 64 KiB-cluster image of it must hold data.
pub fn qemu_cluster_runs(source: &Path, fmt: &str, qemu_size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in data_runs(&qemu_map(source, Some(fmt))) {
        let s = start / CLUSTER_SIZE * CLUSTER_SIZE;
        let e = align_up(start + len, CLUSTER_SIZE).min(qemu_size);
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = e.max(*ps + *pl) - *ps,
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// Builds `source` and judges its `format` view with [`judge_view`]; the view must hold
/// data where qemu-img map says the source does, widened to 64 KiB clusters.
pub fn judge_source(format: Format, source: Source) {
    if !testutil::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, fmt) = source.build(dir.path());
    let disk = qcow2_disk(&src, dir.path());
    let qemu_size = align_up(disk.virtual_size(), SECTOR_SIZE);
    let expected = qemu_cluster_runs(&src, fmt, qemu_size);
    assert_eq!(
        expected_cluster_runs(&disk),
        expected,
        "our reader's allocation of {source:?}"
    );
    judge_view(&disk, format, dir.path(), &src, fmt, &expected);
}

/// The data runs of a file as `SEEK_DATA`/`SEEK_HOLE` report them, or `None` when the
/// filesystem keeps no holes (nothing to compare then).
pub fn file_data_extents(path: &Path) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(path).expect("open file");
    let meta = f.metadata().expect("stat file");
    if meta.blocks() * 512 >= meta.len() && meta.len() > 0 {
        return None;
    }
    let seek = |off: u64, whence| {
        crate::sys::lseek_data_hole(f.as_fd(), off, whence)
            .ok()
            .flatten()
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(start) = seek(pos, libc::SEEK_DATA) {
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(meta.len());
        out.push((start, end - start));
        pos = end;
    }
    Some(out)
}

/// Runs of `(host cluster, guest cluster, count)` where both advance together.
type ClusterRuns = Vec<(u64, u64, u64)>;

fn push_clusters(out: &mut ClusterRuns, host: u64, guest: u64, len: u64) {
    let (h, g) = (host / CLUSTER_SIZE, guest / CLUSTER_SIZE);
    let end = (host + len).div_ceil(CLUSTER_SIZE);
    match out.last_mut() {
        // Same host-guest shift, touching or overlapping: one run.
        Some((ph, pg, n)) if *ph + *n >= h && *ph + g == *pg + h => *n = (*n).max(end - *ph),
        _ => out.push((h, g, end - h)),
    }
}

/// Where `qemu-img map` finds each stored guest cluster of `file`.
pub fn qemu_host_clusters(file: &Path, fmt: &str) -> ClusterRuns {
    let json = qemu_img(&["map", "--output=json", "-f", fmt, file.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("qemu-img map json");
    let mut out = Vec::new();
    for e in v.as_array().expect("map array") {
        if e["data"].as_bool() == Some(true) {
            let host = e["offset"].as_u64().expect("data entry with an offset");
            let (guest, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            push_clusters(&mut out, host, guest, len);
        }
    }
    out
}

/// Where the view's layout puts each guest cluster.
pub fn view_guest_clusters(view: &View) -> ClusterRuns {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < view.size() {
        let seg = view.layout.segment(pos).expect("segment");
        if let super::Piece::Guest(g) = seg.piece {
            push_clusters(&mut out, pos, g, seg.len);
        }
        pos += seg.len;
    }
    out
}

/// Judges the `format` view of `source` ([`judge_view`]), then opens the written file
/// with this crate's own reader for `format` and checks it holds the same disk: same
/// size, same stored clusters, same bytes in them.
pub fn judge_source_reads_back(format: Format, source: Source) {
    if !testutil::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, fmt) = source.build(dir.path());
    let disk = qcow2_disk(&src, dir.path());
    let qemu_size = align_up(disk.virtual_size(), SECTOR_SIZE);
    let expected = qemu_cluster_runs(&src, fmt, qemu_size);
    let file = judge_view(&disk, format, dir.path(), &src, fmt, &expected);
    let back = match format {
        Format::Qcow2 => crate::image::chain::open_chain(&file, &crate::image::chain::NoBacking)
            .expect("open the qcow2 view"),
        Format::Qed => {
            let f = std::fs::File::open(&file).expect("open the qed view");
            let layer: Arc<dyn Layer> =
                Arc::new(crate::image::qed::open(f, &file).expect("read the qed view"));
            Disk::new(vec![layer])
        }
        other => panic!("no reader check for {other} views here"),
    };
    assert_eq!(back.virtual_size(), qemu_size);
    assert_eq!(expected_cluster_runs(&back), expected);
    for (start, len) in expected {
        let len = len.min(disk.virtual_size() - start) as usize;
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        disk.read_at(&mut a, start).expect("read source");
        back.read_at(&mut b, start).expect("read view");
        assert!(a == b, "bytes differ in the run at {start}");
    }
}

/// A 4 TiB sparse raw disk with 64 KiB of data every 16 GiB: 256 L2 tables, a
/// multi-block L1 with holes between its entries.
pub fn judge_wide_sparse_case(format: Format) {
    let cmds: Vec<String> = (0..256u64)
        .map(|i| {
            format!(
                "write -P {} {} 64k",
                i % 255 + 1,
                (i << 34) + ((i % 3) << 16)
            )
        })
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    judge_raw_case(format, 4 << 40, &cmds);
}

/// Declares `mod source_matrix`: one test per qcow2 source shape of [`Source`], each
/// judging the view of `$format` with [`judge_source`]. The qcow2 and QED views run the
/// same matrix; the test names read as the source they judge.
macro_rules! source_matrix {
    ($format:expr) => {
        mod source_matrix {
            use crate::image::Format;
            use crate::view::judge::{Source, judge_source};

            const FORMAT: Format = $format;

            #[test]
            fn plain_qcow2_with_zero_writes_and_discards() {
                judge_source(FORMAT, Source::Plain);
            }

            #[test]
            fn zlib_compressed_qcow2() {
                judge_source(FORMAT, Source::Zlib);
            }

            #[test]
            fn zstd_compressed_qcow2() {
                judge_source(FORMAT, Source::Zstd);
            }

            #[test]
            fn three_layer_chain_is_flattened() {
                judge_source(FORMAT, Source::Chain);
            }

            #[test]
            fn empty_qcow2() {
                judge_source(FORMAT, Source::Empty);
            }

            #[test]
            fn qcow2_one_byte_past_a_cluster() {
                judge_source(FORMAT, Source::OneBytePastCluster);
            }

            #[test]
            fn five_gib_sparse_qcow2() {
                judge_source(FORMAT, Source::Sparse5G);
            }

            #[test]
            fn qcow2_with_2_mib_clusters() {
                judge_source(FORMAT, Source::Cluster2M);
            }
        }
    };
}
pub(crate) use source_matrix;
