//! Delta layers: a qcow2 v3 file holding only what the top layers of a disk change over
//! the layers below them, with a backing file name for those layers. This is how a VM's
//! overlay becomes the next layer of a revision: its clusters, nothing of its base.
//!
//! The top `depth` layers of the disk are the delta (one overlay, or a chain of overlays
//! flattened together); below them is the base the new layer will name as its backing
//! file. Each 64 KiB guest cluster of the delta is one of:
//!
//! * unallocated in every delta layer: left unallocated, so it falls through to the base;
//! * zero in the delta (qcow2 zero flag, or past the end of a delta layer shorter than the
//!   one above it): written with the zero flag, so it reads as zeroes whatever the base
//!   holds. Past the end of the base, where both read zero, it is left unallocated;
//! * anything else (stored data, or a mix, as when the overlay's clusters are smaller
//!   than 64 KiB): the disk's bytes of that cluster are read, and stored, unless they are
//!   all zero, in which case the cluster gets the zero flag.
//!
//! The file is laid out as:
//!
//! ```text
//! | header + backing name | L1 | data clusters, in guest order | L2 tables | refcounts |
//! ```
//!
//! every cluster used exactly once (refcount 1, `COPIED` set), so `qemu-img check` finds
//! neither errors nor leaks. The layout depends on the disk's content only: the same
//! changes give the same bytes. Memory grows with the number of runs of changed clusters,
//! never with the virtual size; the walk is bounded by [`Disk::walk_limits`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::qcow2_layout::{CLUSTER_BITS, CLUSTER_SIZE, MAX_VIRTUAL_SIZE, SECTOR_SIZE, align_up};
use super::qcow2_overlay::{BackedHeader, MAX_BACKING_NAME, put_u64};
use super::{Disk, Error, Extent, Format, Mapping, Result};

/// Entries of 8 bytes per cluster (L1, L2, refcount table).
const ENTRIES_PER_CLUSTER: u64 = CLUSTER_SIZE / 8;
/// log2 of the guest clusters one L2 table maps.
const L2_BITS: u32 = CLUSTER_BITS - 3;
/// 16-bit refcounts per refcount block.
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER_SIZE / 2;
/// L1/L2 entry flag: refcount exactly one.
const COPIED: u64 = 1 << 63;
/// L2 entry flag (v3): the cluster reads as zeroes.
const ZERO_FLAG: u64 = 1;
/// Clusters read from the disk at a time.
const READ_CLUSTERS: u64 = 32;
/// Names the backing file's format in the new layer.
const BACKING_FORMAT: &str = "qcow2";

/// What [`write_delta`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Guest clusters stored.
    pub data_clusters: u64,
    /// Guest clusters with the zero flag.
    pub zero_clusters: u64,
    /// Length of the file.
    pub file_size: u64,
}

/// What one 64 KiB guest cluster of the delta is, before its bytes are looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Unallocated,
    Zero,
    /// Read the disk's bytes.
    Read,
}

/// What an L2 entry of the new layer says for a run of guest clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Zero,
    /// Stored at consecutive host clusters from this one.
    Data(u64),
}

/// A run of guest clusters `[first, first + count)`.
#[derive(Clone, Copy, Debug)]
struct Run<T> {
    first: u64,
    count: u64,
    what: T,
}

fn push_run<T: Copy + PartialEq>(runs: &mut Vec<Run<T>>, first: u64, count: u64, what: T) {
    if let Some(last) = runs.last_mut()
        && last.what == what
        && last.first + last.count == first
    {
        last.count += count;
        return;
    }
    runs.push(Run { first, count, what });
}

/// Writes into the empty file `out` (known as `path`) a layer holding what the top
/// `depth` layers of `disk` change over the layers below, of the disk's virtual size,
/// whose backing file is named `backing` (a qcow2 file: the base's top layer).
pub fn write_delta(
    disk: &Disk,
    depth: usize,
    backing: &str,
    out: &File,
    path: &Path,
) -> Result<DeltaStats> {
    let unsupported = |reason: String| Error::Unsupported {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        reason,
    };
    if depth == 0 || depth > disk.layers().len() {
        return Err(unsupported(format!(
            "a delta of {depth} layers of a disk of {}",
            disk.layers().len()
        )));
    }
    if backing.is_empty() || backing.len() > MAX_BACKING_NAME || backing.contains('\0') {
        return Err(unsupported(format!(
            "backing file name of {} bytes",
            backing.len()
        )));
    }
    let size = align_up(disk.virtual_size(), SECTOR_SIZE);
    if size > MAX_VIRTUAL_SIZE {
        return Err(unsupported(format!(
            "a virtual size of {size} bytes is above the {MAX_VIRTUAL_SIZE} bytes a qcow2 \
             file with 64 KiB clusters can hold"
        )));
    }
    let base_size = disk.layers().get(depth).map_or(0, |l| l.virtual_size());
    let classes = classify(disk, depth, base_size)?;

    let guest_clusters = size.div_ceil(CLUSTER_SIZE);
    let l1_entries = guest_clusters.div_ceil(1 << L2_BITS);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER_SIZE);
    let l1_offset = if l1_entries == 0 { 0 } else { CLUSTER_SIZE };
    let io = |e| Error::io(path, e);

    // Data clusters, in guest order, right after the L1 table.
    let mut next_host = 1 + l1_clusters;
    let mut entries: Vec<Run<Entry>> = Vec::new();
    let mut stats = DeltaStats::default();
    let mut buf = vec![0u8; (READ_CLUSTERS * CLUSTER_SIZE) as usize];
    for run in &classes {
        match run.what {
            Class::Unallocated => {}
            Class::Zero => {
                push_run(&mut entries, run.first, run.count, Entry::Zero);
                stats.zero_clusters += run.count;
            }
            Class::Read => {
                let mut c = run.first;
                let end = run.first + run.count;
                while c < end {
                    let n = (end - c).min(READ_CLUSTERS);
                    let start = c * CLUSTER_SIZE;
                    let len = (n * CLUSTER_SIZE).min(disk.virtual_size() - start);
                    let chunk = &mut buf[..(n * CLUSTER_SIZE) as usize];
                    chunk.fill(0);
                    disk.read_at(&mut chunk[..len as usize], start)?;
                    for (i, cluster) in chunk.chunks(CLUSTER_SIZE as usize).enumerate() {
                        let guest = c + i as u64;
                        if super::convert::is_zero(cluster) {
                            push_run(&mut entries, guest, 1, Entry::Zero);
                            stats.zero_clusters += 1;
                        } else {
                            out.write_all_at(cluster, next_host * CLUSTER_SIZE)
                                .map_err(io)?;
                            push_data(&mut entries, guest, next_host);
                            next_host += 1;
                            stats.data_clusters += 1;
                        }
                    }
                    c += n;
                }
            }
        }
    }
    // L2 tables, one per 512 MiB group that has an entry, in group order.
    let mut groups: Vec<u64> = Vec::new();
    for run in &entries {
        let first = run.first >> L2_BITS;
        let last = (run.first + run.count - 1) >> L2_BITS;
        for g in first..=last {
            if groups.last() != Some(&g) {
                groups.push(g);
            }
        }
    }
    let l2_first = next_host;
    let mut table = vec![0u8; CLUSTER_SIZE as usize];
    let mut at = 0usize;
    for (i, &g) in groups.iter().enumerate() {
        table.fill(0);
        let (lo, hi) = (g << L2_BITS, (g + 1) << L2_BITS);
        while at < entries.len() && entries[at].first + entries[at].count <= lo {
            at += 1;
        }
        let mut j = at;
        while j < entries.len() && entries[j].first < hi {
            let r = entries[j];
            let from = r.first.max(lo);
            let to = (r.first + r.count).min(hi);
            for guest in from..to {
                let value = match r.what {
                    Entry::Zero => ZERO_FLAG,
                    Entry::Data(h) => ((h + guest - r.first) * CLUSTER_SIZE) | COPIED,
                };
                put_u64(&mut table, ((guest - lo) * 8) as usize, value);
            }
            j += 1;
        }
        out.write_all_at(&table, (l2_first + i as u64) * CLUSTER_SIZE)
            .map_err(io)?;
    }
    let l2_count = groups.len() as u64;

    // L1 table.
    if l1_entries > 0 {
        let mut l1 = vec![0u8; (l1_clusters * CLUSTER_SIZE) as usize];
        for (i, &g) in groups.iter().enumerate() {
            let l2 = (l2_first + i as u64) * CLUSTER_SIZE;
            put_u64(&mut l1, (g * 8) as usize, l2 | COPIED);
        }
        out.write_all_at(&l1, CLUSTER_SIZE).map_err(io)?;
    }

    // Refcounts at the end; they must count themselves.
    let used = l2_first + l2_count;
    let (mut rt, mut rb) = (1u64, 1u64);
    let total = loop {
        let total = used + rt + rb;
        let need_rb = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let need_rt = need_rb.div_ceil(ENTRIES_PER_CLUSTER);
        if need_rb <= rb && need_rt <= rt {
            break total;
        }
        (rt, rb) = (need_rt.max(rt), need_rb.max(rb));
    };
    let rt_first = used;
    let rb_first = used + rt;
    let mut reftable = vec![0u8; (rt * CLUSTER_SIZE) as usize];
    for b in 0..rb {
        put_u64(
            &mut reftable,
            (b * 8) as usize,
            (rb_first + b) * CLUSTER_SIZE,
        );
    }
    out.write_all_at(&reftable, rt_first * CLUSTER_SIZE)
        .map_err(io)?;
    let mut blocks = vec![0u8; (rb * CLUSTER_SIZE) as usize];
    for c in 0..total as usize {
        blocks[c * 2..c * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    out.write_all_at(&blocks, rb_first * CLUSTER_SIZE)
        .map_err(io)?;

    let mut header = vec![0u8; CLUSTER_SIZE as usize];
    BackedHeader {
        virtual_size: size,
        l1_entries,
        l1_offset,
        refcount_table_offset: rt_first * CLUSTER_SIZE,
        refcount_table_clusters: rt,
        backing,
        backing_format: BACKING_FORMAT,
    }
    .fill(&mut header);
    out.write_all_at(&header, 0).map_err(io)?;
    stats.file_size = total * CLUSTER_SIZE;
    out.set_len(stats.file_size).map_err(io)?;
    Ok(stats)
}

/// Adds guest cluster `guest`, stored at host cluster `host`, extending the last run when
/// both follow it.
fn push_data(entries: &mut Vec<Run<Entry>>, guest: u64, host: u64) {
    if let Some(last) = entries.last_mut()
        && let Entry::Data(h) = last.what
        && last.first + last.count == guest
        && h + last.count == host
    {
        last.count += 1;
        return;
    }
    entries.push(Run {
        first: guest,
        count: 1,
        what: Entry::Data(host),
    });
}

/// What backs `[offset, offset + max_len)` in the top `depth` layers only:
/// [`Mapping::Unallocated`] where every one of them falls through.
fn delta_map(disk: &Disk, depth: usize, offset: u64, max_len: u64) -> Result<Extent> {
    crate::image::map_layers(&disk.layers()[..depth], offset, max_len)
}

/// The class of every guest cluster, as runs (unallocated ones left out). Past
/// `base_size` a zero cluster is left unallocated: the base reads zero there too.
fn classify(disk: &Disk, depth: usize, base_size: u64) -> Result<Vec<Run<Class>>> {
    let size = disk.virtual_size();
    let max_extents = disk.walk_limits().extents;
    let mut runs: Vec<Run<Class>> = Vec::new();
    // The cluster being gathered and its class so far.
    let mut current: Option<(u64, Class)> = None;
    let push = |runs: &mut Vec<Run<Class>>, cluster: u64, class: Class| {
        let class = match class {
            Class::Zero if cluster * CLUSTER_SIZE >= base_size => Class::Unallocated,
            c => c,
        };
        if class != Class::Unallocated {
            push_run(runs, cluster, 1, class);
        }
    };
    let mut pos = 0u64;
    let mut visited = 0u64;
    while pos < size {
        let ext = delta_map(disk, depth, pos, size - pos)?;
        visited += 1;
        if visited > max_extents {
            return Err(disk.too_fragmented());
        }
        let class = match ext.mapping {
            Mapping::Unallocated => Class::Unallocated,
            Mapping::Zero => Class::Zero,
            Mapping::Data { .. } | Mapping::Compressed(_) => Class::Read,
        };
        let end = pos + ext.len;
        let mut p = pos;
        while p < end {
            let cluster = p >> CLUSTER_BITS;
            let cluster_end = ((cluster + 1) << CLUSTER_BITS).min(end);
            let whole = p & (CLUSTER_SIZE - 1) == 0 && cluster_end - p == CLUSTER_SIZE;
            if whole && current.is_none() {
                // Whole clusters of one class at once.
                let count = (end - p) >> CLUSTER_BITS;
                if class != Class::Unallocated {
                    if class == Class::Zero && (p + count * CLUSTER_SIZE) > base_size {
                        // Split at the base's end: past it, zero is unallocated.
                        let below = base_size.saturating_sub(p).div_ceil(CLUSTER_SIZE);
                        let below = below.min(count);
                        if below > 0 {
                            push_run(&mut runs, cluster, below, Class::Zero);
                        }
                    } else {
                        push_run(&mut runs, cluster, count, class);
                    }
                }
                p += count << CLUSTER_BITS;
                continue;
            }
            let merged = match current {
                Some((c, prev)) if c == cluster => {
                    if prev == class {
                        prev
                    } else {
                        Class::Read
                    }
                }
                Some((c, prev)) => {
                    push(&mut runs, c, prev);
                    class
                }
                None => class,
            };
            current = Some((cluster, merged));
            if cluster_end == (cluster + 1) << CLUSTER_BITS {
                push(&mut runs, cluster, merged);
                current = None;
            }
            p = cluster_end;
        }
        pos = end;
    }
    if let Some((c, class)) = current {
        push(&mut runs, c, class);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::chain::{WithinDir, open_chain};
    use crate::testutil::{have_qemu, qemu_create, qemu_img, qemu_io};
    use std::path::PathBuf;

    /// Writes the delta of the top `depth` layers of the chain at `top` (backing files
    /// in `dir`) over `base`, and checks it with qemu-img: no error, same virtual size,
    /// and the same guest bytes as `top` once read over `base`.
    fn delta_of(dir: &Path, top: &Path, depth: usize, base: &str) -> (PathBuf, DeltaStats) {
        let disk = open_chain(top, &WithinDir { root: dir.into() }).unwrap();
        let out_path = dir.join("delta.qcow2");
        let out = File::create(&out_path).unwrap();
        let stats = write_delta(&disk, depth, base, &out, &out_path).unwrap();
        drop(out);
        assert_eq!(std::fs::metadata(&out_path).unwrap().len(), stats.file_size);
        let d = out_path.to_str().unwrap();
        let check = qemu_img(&["check", d]);
        assert!(check.contains("No errors were found"), "{check}");
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", d])).unwrap();
        assert_eq!(info["backing-filename"].as_str(), Some(base));
        assert_eq!(info["backing-filename-format"], "qcow2");
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(align_up(disk.virtual_size(), SECTOR_SIZE))
        );
        let cmp = qemu_img(&["compare", d, top.to_str().unwrap()]);
        assert!(cmp.contains("Images are identical"), "{cmp}");
        (out_path, stats)
    }

    /// `qemu-img map` of the delta alone: (start, length, depth, zero, data) per entry.
    fn map(file: &Path) -> Vec<(u64, u64, u64, bool, bool)> {
        let json = qemu_img(&["map", "--output=json", file.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                    e["zero"].as_bool().unwrap(),
                    e["data"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    /// What backs guest offset `at` in `map`.
    fn at(map: &[(u64, u64, u64, bool, bool)], at: u64) -> (u64, bool, bool) {
        let e = map
            .iter()
            .find(|e| e.0 <= at && at < e.0 + e.1)
            .unwrap_or_else(|| panic!("{at} not mapped in {map:?}"));
        (e.2, e.3, e.4)
    }

    fn base(dir: &Path) -> PathBuf {
        let base = qemu_create(dir, "qcow2", "base.qcow2", "8M", "");
        qemu_io("qcow2", &base, &["write -P 0x11 0 4M"]);
        base
    }

    fn overlay(dir: &Path, name: &str, backing: &str, size: &str, opts: &str) -> PathBuf {
        let mut o = format!("backing_file={backing},backing_fmt=qcow2");
        if !opts.is_empty() {
            o = format!("{o},{opts}");
        }
        qemu_create(dir, "qcow2", name, size, &o)
    }

    #[test]
    fn only_the_overlays_clusters_go_into_the_delta_and_zeroes_mask_the_base() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        base(d);
        let top = overlay(d, "vm.qcow2", "base.qcow2", "16M", "");
        qemu_io(
            "qcow2",
            &top,
            &[
                "write -P 0x22 64k 64k",
                "write -z 1M 128k",
                "write -P 0 2M 64k",
                "write -P 0x33 10M 4k",
                "write -z 12M 64k",
            ],
        );
        let (delta, stats) = delta_of(d, &top, 1, "base.qcow2");
        assert_eq!(stats.data_clusters, 2, "{stats:?}");
        // 1M..1M+128k and the zeroes written at 2M; 12M is past the base: unallocated.
        assert_eq!(stats.zero_clusters, 3, "{stats:?}");
        // Header, L1, 2 data clusters, 1 L2 table, refcount table and block.
        assert_eq!(stats.file_size, 7 * CLUSTER_SIZE);
        let m = map(&delta);
        assert_eq!(at(&m, 0), (1, false, true), "falls through to the base");
        assert_eq!(at(&m, 64 << 10), (0, false, true));
        assert_eq!(
            at(&m, 1 << 20),
            (0, true, false),
            "zero flag over base data"
        );
        assert_eq!(at(&m, 2 << 20), (0, true, false), "written zeroes");
        assert_eq!(at(&m, 10 << 20), (0, false, true));
        assert!(!at(&m, 12 << 20).2, "nothing stored past the base");
    }

    #[test]
    fn small_overlay_clusters_take_the_rest_of_their_cluster_from_the_base() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        base(d);
        let top = overlay(d, "vm.qcow2", "base.qcow2", "8M", "cluster_size=4096");
        qemu_io(
            "qcow2",
            &top,
            &[
                "write -P 0x44 68k 4k",
                "write -z 1028k 4k",
                "write -z 5M 4k",
                "write -P 0x55 7M 4k",
            ],
        );
        let (_, stats) = delta_of(d, &top, 1, "base.qcow2");
        // 64k (0x44 in base data), 1M (zeroes in base data), 7M; 5M reads zero anyway
        // (the zero 4k over unallocated base bytes): a zero cluster.
        assert_eq!(stats.data_clusters, 3, "{stats:?}");
        assert_eq!(stats.zero_clusters, 1, "{stats:?}");
    }

    #[test]
    fn a_chain_of_overlays_flattens_into_one_delta_over_the_base() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        base(d);
        let mid = overlay(d, "mid.qcow2", "base.qcow2", "6M", "");
        qemu_io("qcow2", &mid, &["write -P 0x66 0 64k", "write -z 3M 64k"]);
        let top = overlay(d, "top.qcow2", "mid.qcow2", "32M", "");
        qemu_io(
            "qcow2",
            &top,
            &["write -P 0x77 64k 64k", "write -P 0x78 20M 64k"],
        );
        let (delta, stats) = delta_of(d, &top, 2, "base.qcow2");
        assert_eq!(stats.data_clusters, 3, "{stats:?}");
        // 3M (mid's zero flag), and 6M..8M where mid ends but the base goes on.
        assert_eq!(stats.zero_clusters, 1 + 32, "{stats:?}");
        let m = map(&delta);
        assert_eq!(
            at(&m, 7 << 20),
            (0, true, false),
            "base masked past mid's end"
        );
    }

    #[test]
    fn an_untouched_overlay_gives_an_empty_delta() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        base(d);
        let top = overlay(d, "vm.qcow2", "base.qcow2", "8M", "");
        let (_, stats) = delta_of(d, &top, 1, "base.qcow2");
        assert_eq!(
            stats,
            DeltaStats {
                data_clusters: 0,
                zero_clusters: 0,
                file_size: 4 * CLUSTER_SIZE
            }
        );
    }

    #[test]
    fn bad_depths_and_names_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let b = base(d);
        let disk = open_chain(&b, &WithinDir { root: d.into() }).unwrap();
        let out_path = d.join("out");
        let out = File::create(&out_path).unwrap();
        assert!(write_delta(&disk, 0, "x", &out, &out_path).is_err());
        assert!(write_delta(&disk, 2, "x", &out, &out_path).is_err());
        assert!(write_delta(&disk, 1, "", &out, &out_path).is_err());
        assert!(write_delta(&disk, 1, &"x".repeat(1024), &out, &out_path).is_err());
    }
}
