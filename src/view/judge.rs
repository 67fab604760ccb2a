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
    qemu_img(&["create", "-q", "-f", "raw", path.to_str().unwrap(), &size.to_string()]);
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

    let extents = view.data_extents().expect("view extents");
    let in_extents: u64 = extents.iter().map(|(_, l)| l).sum();
    assert_eq!(in_extents, view.allocated_bytes(), "extents vs allocated");
    assert!(extents.iter().all(|&(s, l)| s + l <= view.size()));

    let qemu_size = align_up(disk.virtual_size(), SECTOR_SIZE);
    assert_qemu_accepts(&file, format.name(), qemu_size, source, source_fmt);
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

    random_reads_match(&view, &file, 0x5eed + len);
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
    for _ in 0..200 {
        let off = rng.below(size + 100);
        let max = if rng.below(4) == 0 { 300_000 } else { 5000 };
        let len = 1 + rng.below(max) as usize;
        let n = view.read_at(&mut got[..len], off).expect("random read");
        let expect_n = size.saturating_sub(off).min(len as u64) as usize;
        assert_eq!(n, expect_n, "read length at {off}+{len}");
        f.read_exact_at(&mut want[..n], off).expect("read file");
        assert!(got[..n] == want[..n], "bytes differ in a read at {off}+{len}");
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
