//! QED images (qemu's "QEMU Enhanced Disk", `docs/interop/qed_spec.txt`): a header
//! cluster, an L1 table of L2 table offsets, L2 tables of data cluster offsets.
//!
//! The reader answers [`Layer::map`] by walking L1/L2 entries cluster by cluster and
//! merging runs of the same kind (data contiguous in the file, zero, unallocated), so a
//! large sparse image maps in few extents. Nothing but the 64-byte header is read at
//! open: L1 and L2 entries come through a bounded `PageCache`, because tables can be
//! up to a GiB each by the spec and are untrusted in size.
//!
//! Limits enforced before anything is followed: the header fields are within the spec's
//! ranges; the L1 table and every L2 table lie inside the file after the header; data
//! cluster offsets are cluster-aligned, after the header and start inside the file; the
//! image size is a multiple of 512 within what the tables can address; no two L1 entries
//! name the same L2 table (checked at open, in bounded chunks). A backing file is
//! refused by [`open`] (a standalone image); [`open_overlay`] reads its name for the
//! caller to follow (see `chain`). The "needs check" feature (set by a writer that
//! crashed) is accepted, because every entry is checked as it is used and nothing is
//! written.

use super::file::{LayerFile, map_end};
use super::qcow2::BackingRef;
use super::qcow2::header::MAX_BACKING_NAME_LEN;
use super::tables::{Page, PageCache, TableOfTables, le_u32, le_u64};
use super::{Error, Extent, Format, Layer, Mapping, Result, read_exact_at};
use std::fs::File;
use std::path::Path;

/// `QED\0` read as a little-endian u32 (spec: "magic").
const QED_MAGIC: u32 = 0x0044_4551;
/// Bytes of the header fields this reader uses (spec: struct Header, up to
/// `backing_filename_size`).
const HEADER_LEN: usize = 64;
/// Spec: cluster_size is a power of 2 in [2^12, 2^26].
const MIN_CLUSTER_SIZE: u64 = 1 << 12;
const MAX_CLUSTER_SIZE: u64 = 1 << 26;
/// Spec: table_size (in clusters) is a power of 2 in [1, 16].
const MAX_TABLE_SIZE: u64 = 16;
/// Spec feature bits.
const F_BACKING_FILE: u64 = 0x01;
const F_NEED_CHECK: u64 = 0x02;
const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// Spec: data cluster offset 1 means "reads as zeroes, no cluster allocated"; 0 means
/// unallocated (for both L1 and L2 entries).
const ENTRY_UNALLOCATED: u64 = 0;
const ENTRY_ZERO: u64 = 1;
/// Spec: image_size must be a multiple of 512 bytes.
const SECTOR: u64 = 512;
/// Pages of L1/L2 entries kept per open image (4 KiB each: 1 MiB, enough to map 32 GiB
/// of guest space with default 64 KiB clusters without a reread).
const CACHE_PAGES: usize = 256;

/// What one L2 entry says about its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    Unallocated,
    Zero,
    Data(u64),
}

#[derive(Debug)]
pub struct QedLayer {
    src: LayerFile,
    cluster_bits: u32,
    /// Entries (u64) per L1 or L2 table.
    table_entries: u64,
    table_bytes: u64,
    /// First byte after the header clusters; no table or data may start before it.
    header_end: u64,
    l1_offset: u64,
    size: u64,
    cache: PageCache,
    backing: Option<BackingRef>,
}

/// Opens `file` (already opened from `path`) as a standalone QED image: one that names
/// a backing file is refused.
pub fn open(file: File, path: &Path) -> Result<QedLayer> {
    QedLayer::new(file, path)
}

/// Opens `file` as a QED image that may name a backing file ([`Layer::backing`]), which
/// the caller follows.
pub fn open_overlay(file: File, path: &Path) -> Result<QedLayer> {
    QedLayer::open_as(file, path, true)
}

impl QedLayer {
    pub fn new(file: File, path: &Path) -> Result<QedLayer> {
        QedLayer::open_as(file, path, false)
    }

    fn open_as(file: File, path: &Path, overlay: bool) -> Result<QedLayer> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            format: Format::Qed,
            reason,
        };
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let file_len = meta.len();
        if file_len < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "the file is {file_len} bytes, too short for a QED header"
            )));
        }
        let mut h = [0u8; HEADER_LEN];
        read_exact_at(&file, path, &mut h, 0)?;
        if le_u32(&h, 0) != QED_MAGIC {
            return Err(invalid("no QED magic at offset 0".into()));
        }
        let cluster_size = u64::from(le_u32(&h, 4));
        let table_size = u64::from(le_u32(&h, 8));
        let header_size = u64::from(le_u32(&h, 12));
        let features = le_u64(&h, 16);
        let l1_offset = le_u64(&h, 40);
        let size = le_u64(&h, 48);

        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(invalid(format!(
                "cluster size {cluster_size} is not a power of 2 between {MIN_CLUSTER_SIZE} and {MAX_CLUSTER_SIZE}"
            )));
        }
        if !table_size.is_power_of_two() || table_size > MAX_TABLE_SIZE {
            return Err(invalid(format!(
                "table size {table_size} is not a power of 2 between 1 and {MAX_TABLE_SIZE} clusters"
            )));
        }
        if features & !KNOWN_FEATURES != 0 {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                format: Format::Qed,
                reason: format!("unknown feature bits {:#x}", features & !KNOWN_FEATURES),
            });
        }
        if features & F_BACKING_FILE != 0 && !overlay {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                format: Format::Qed,
                reason: "the image has a backing file, which an import through the mount \
                         does not read (`pcocc image import` does; or flatten it first with \
                         `qemu-img convert`)"
                    .into(),
            });
        }
        // Both factors are below 2^32, so the product fits.
        let header_end = header_size * cluster_size;
        if header_size == 0 || header_end > file_len {
            return Err(invalid(format!(
                "header size of {header_size} clusters does not fit in the {file_len}-byte file"
            )));
        }
        let backing = if features & F_BACKING_FILE != 0 {
            let (at, len) = (u64::from(le_u32(&h, 56)), u64::from(le_u32(&h, 60)));
            if len == 0
                || len > MAX_BACKING_NAME_LEN
                || at < HEADER_LEN as u64
                || at + len > header_end
            {
                return Err(invalid(format!(
                    "backing file name ({len} bytes at offset {at}) is empty, longer than \
                     {MAX_BACKING_NAME_LEN} bytes or outside the header clusters"
                )));
            }
            let mut name = vec![0u8; len as usize];
            read_exact_at(&file, path, &mut name, at)?;
            let name = String::from_utf8(name)
                .map_err(|_| invalid("backing file name is not UTF-8".into()))?;
            Some(BackingRef {
                name,
                // Spec: the backing file is raw, not probed, when this bit is set.
                format: (features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string()),
                content_id: None,
            })
        } else {
            None
        };
        let table_bytes = table_size * cluster_size;
        let table_entries = table_bytes / 8;
        if !l1_offset.is_multiple_of(cluster_size)
            || l1_offset < header_end
            || l1_offset
                .checked_add(table_bytes)
                .is_none_or(|end| end > file_len)
        {
            return Err(invalid(format!(
                "L1 table offset {l1_offset} is not a cluster-aligned table inside the file after the header"
            )));
        }
        // Spec: image_size <= TABLE_NOFFSETS * TABLE_NOFFSETS * cluster_size.
        let max_size =
            u128::from(table_entries) * u128::from(table_entries) * u128::from(cluster_size);
        if !size.is_multiple_of(SECTOR) || u128::from(size) > max_size {
            return Err(invalid(format!(
                "image size {size} is not a multiple of {SECTOR} within the {max_size} bytes the tables can address"
            )));
        }
        // Only the L1 entries that cover the image size are ever used.
        let l1_used = size.div_ceil(cluster_size).div_ceil(table_entries);
        TableOfTables {
            file: &file,
            path,
            format: Format::Qed,
            offset: l1_offset,
            count: l1_used,
            entry_len: 8,
            unit: 1,
            table_bytes,
            file_len,
            what: "L1",
        }
        .check_distinct()?;
        let src = LayerFile::new(file, path, &meta);
        let cache = PageCache::new(
            src.file.clone(),
            src.path.clone(),
            Format::Qed,
            src.len,
            CACHE_PAGES,
        );
        Ok(QedLayer {
            src,
            cluster_bits: cluster_size.trailing_zeros(),
            table_entries,
            table_bytes,
            header_end,
            l1_offset,
            size,
            cache,
            backing,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn invalid(&self, reason: String) -> Error {
        Error::Invalid {
            path: self.src.path.to_path_buf(),
            format: Format::Qed,
            reason,
        }
    }

    /// The L2 table offset for L1 index `i`, or `None` when unallocated.
    fn l2_offset(&self, i: u64) -> Result<Option<u64>> {
        let at = self.l1_offset + i * 8;
        let entry = self.cache.page_for(at, 8, "L1 entry")?.le_u64(at);
        if entry == ENTRY_UNALLOCATED {
            return Ok(None);
        }
        if entry % self.cluster_size() != 0
            || entry < self.header_end
            || entry
                .checked_add(self.table_bytes)
                .is_none_or(|end| end > self.src.len)
        {
            return Err(self.invalid(format!(
                "L1 entry {i} points to {entry}, not a cluster-aligned L2 table inside the file"
            )));
        }
        Ok(Some(entry))
    }

    fn classify(&self, guest_cluster: u64, entry: u64) -> Result<Cluster> {
        match entry {
            ENTRY_UNALLOCATED => Ok(Cluster::Unallocated),
            ENTRY_ZERO => Ok(Cluster::Zero),
            off if off % self.cluster_size() == 0
                && off >= self.header_end
                && off < self.src.len =>
            {
                Ok(Cluster::Data(off))
            }
            off => Err(self.invalid(format!(
                "the L2 entry of guest offset {} points to {off}, not a cluster-aligned \
                 data cluster inside the file",
                guest_cluster << self.cluster_bits
            ))),
        }
    }
}

impl Layer for QedLayer {
    fn format(&self) -> Format {
        Format::Qed
    }

    fn path(&self) -> &Path {
        &self.src.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn allocated_bytes(&self) -> u64 {
        self.src.allocated
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = map_end(&self.src.path, offset, max_len, self.size)?;
        let cs = self.cluster_size();
        let mut cluster = offset >> self.cluster_bits;
        let mut first: Option<Cluster> = None;
        // Guest offset up to which the run of `first`'s kind extends.
        let mut run_end = offset;
        let mut l2_page: Option<Page> = None;
        'outer: while run_end < end {
            let l1_index = cluster / self.table_entries;
            let Some(l2) = self.l2_offset(l1_index)? else {
                // A whole L2 span unallocated.
                let span_end = (l1_index + 1) * self.table_entries;
                match first {
                    None => first = Some(Cluster::Unallocated),
                    Some(Cluster::Unallocated) => {}
                    Some(_) => break,
                }
                cluster = span_end;
                run_end = cluster.saturating_mul(cs);
                continue;
            };
            let span_end = (l1_index + 1) * self.table_entries;
            while cluster < span_end && run_end < end {
                let at = l2 + (cluster % self.table_entries) * 8;
                let page = match l2_page.take() {
                    Some(p) if p.holds(at, 8) => p,
                    _ => self.cache.page_for(at, 8, "L2 entry")?,
                };
                let this = self.classify(cluster, page.le_u64(at))?;
                l2_page = Some(page);
                let continues = match (first, this) {
                    (None, _) => true,
                    (Some(Cluster::Data(start)), Cluster::Data(host)) => {
                        // Contiguous in the file: same distance from the run's start.
                        host.checked_sub(start)
                            == Some((cluster << self.cluster_bits) - (offset & !(cs - 1)))
                    }
                    (Some(a), b) => a == b,
                };
                if !continues {
                    break 'outer;
                }
                first.get_or_insert(this);
                cluster += 1;
                run_end = cluster << self.cluster_bits;
            }
        }
        let len = run_end.min(end) - offset;
        let mapping = match first {
            Some(Cluster::Data(host)) => self.src.data(host + (offset & (cs - 1))),
            Some(Cluster::Zero) => Mapping::Zero,
            _ => Mapping::Unallocated,
        };
        Ok(Extent { len, mapping })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Disk;
    use crate::image::tables::test_support::*;
    use crate::testutil::{have_qemu, qemu_create, qemu_img, qemu_io};
    use std::path::PathBuf;
    use std::sync::Arc;

    fn create(dir: &Path, name: &str, size: &str) -> PathBuf {
        qemu_create(dir, "qed", name, size, "")
    }

    fn open_path(p: &Path) -> Result<QedLayer> {
        open(File::open(p).unwrap(), p)
    }

    #[test]
    fn scattered_data_and_zero_writes_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "a.qed", "64M");
        qemu_io(
            "qed",
            &p,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x22 64k 64k",
                "write -P 0x33 1M 4k",
                "write -z 2M 256k",
                "write -P 0x44 2M 4k",
                "write -z 5M 128k",
                "write -P 0x55 40M 3M",
                "write -P 0x66 63M 1M",
            ],
        );
        let layer = open_path(&p).unwrap();
        assert_layer_matches_qemu(Arc::new(layer), &p, "qed");
    }

    #[test]
    fn small_clusters_and_tables_span_many_l2_tables_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("small.qed");
        qemu_img(&[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096,table_size=2",
            p.to_str().unwrap(),
            "24M",
        ]);
        // Each L2 table covers 4 MiB; writes cross table boundaries. (qemu 10 cannot
        // open the images it creates with table_size=1, so 2 it is.)
        qemu_io(
            "qed",
            &p,
            &[
                "write -P 1 4190208 12k",
                "write -z 6M 8k",
                "write -P 2 12578816 5M",
                "write -P 3 25161728 4k",
            ],
        );
        let layer = open_path(&p).unwrap();
        assert_eq!(layer.table_entries, 1024);
        assert_layer_matches_qemu(Arc::new(layer), &p, "qed");
    }

    #[test]
    fn zero_writes_are_zero_clusters_not_data() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "z.qed", "4M");
        qemu_io("qed", &p, &["write -z 128k 128k"]);
        let layer = open_path(&p).unwrap();
        let ext = layer.map(128 << 10, 4 << 20).unwrap();
        assert_eq!(ext.len, 128 << 10);
        assert!(matches!(ext.mapping, Mapping::Zero));
        assert!(matches!(
            layer.map(0, 4 << 20).unwrap().mapping,
            Mapping::Unallocated
        ));
        assert_layer_matches_qemu(Arc::new(layer), &p, "qed");
    }

    #[test]
    fn empty_and_zero_sized_images_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, size) in [("empty.qed", "10M"), ("zero.qed", "0")] {
            let p = create(dir.path(), name, size);
            let layer = open_path(&p).unwrap();
            assert_layer_matches_qemu(Arc::new(layer), &p, "qed");
        }
    }

    #[test]
    fn size_one_byte_past_a_cluster_is_rounded_to_a_sector_as_qemu_does() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "odd.qed", "65537");
        qemu_io(
            "qed",
            &p,
            &["write -P 0x77 65536 512", "write -P 0x78 0 512"],
        );
        let layer = open_path(&p).unwrap();
        assert_eq!(layer.virtual_size(), 66048);
        assert_layer_matches_qemu(Arc::new(layer), &p, "qed");
    }

    #[test]
    fn multi_gib_sparse_image_maps_in_few_extents() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "big.qed", "5G");
        qemu_io(
            "qed",
            &p,
            &[
                "write -P 1 0 64k",
                "write -P 2 4294901760 128k",
                "write -P 3 5368643584 64k",
            ],
        );
        let layer = Arc::new(open_path(&p).unwrap());
        // The unallocated middle comes back as one extent, not one per cluster.
        let ext = layer.map(1 << 20, 5 << 30).unwrap();
        assert!(matches!(ext.mapping, Mapping::Unallocated));
        assert_eq!(ext.len, 4294901760 - (1 << 20));
        assert_layer_matches_qemu(layer, &p, "qed");
    }

    #[test]
    fn contiguous_data_clusters_merge_into_one_extent() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "c.qed", "8M");
        qemu_io("qed", &p, &["write -P 9 1M 1M"]);
        let layer = open_path(&p).unwrap();
        let ext = layer.map((1 << 20) + 100, 8 << 20).unwrap();
        assert!(ext.mapping.is_data());
        assert_eq!(ext.len, (1 << 20) - 100);
    }

    #[test]
    fn concurrent_reads_from_many_threads_agree_with_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "t.qed", "16M");
        for i in 0..16u64 {
            qemu_io(
                "qed",
                &p,
                &[&format!(
                    "write -P {} {} 96k",
                    i + 1,
                    i * (1 << 20) + i * 4096
                )],
            );
        }
        let disk = Disk::new(vec![Arc::new(open_path(&p).unwrap())]);
        assert_concurrent_reads_match(&disk, &p, "qed");
    }

    #[test]
    fn backing_file_is_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = create(dir.path(), "base.qed", "1M");
        let top = dir.path().join("top.qed");
        qemu_img(&[
            "create",
            "-f",
            "qed",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qed",
            top.to_str().unwrap(),
        ]);
        let err = open_path(&top).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("backing file"), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "t.qed", "4M");
        qemu_io("qed", &p, &["write -P 5 1M 64k"]);
        // Header cut short.
        let short = copy_truncated(&p, dir.path().join("h.qed"), 40);
        assert!(
            open_path(&short)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        // Header and L1 intact, the L2 table and the data gone.
        let cut = copy_truncated(&p, dir.path().join("c.qed"), 5 * 65536);
        let layer = open_path(&cut).unwrap();
        let disk = Disk::new(vec![Arc::new(layer)]);
        let mut buf = vec![0u8; 4 << 20];
        let err = disk.read_at(&mut buf, 0).unwrap_err();
        assert!(err.to_string().contains("c.qed"), "{err}");
    }

    #[test]
    fn tables_pointing_past_the_end_are_errors() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "p.qed", "4M");
        qemu_io("qed", &p, &["write -P 5 1M 64k"]);
        let bytes = std::fs::read(&p).unwrap();
        let l1 = le_u64(&bytes, 40) as usize;
        let l2 = le_u64(&bytes, l1) as usize;
        // An L1 entry far past the end of the file.
        let bad_l1 = patched(
            &p,
            dir.path().join("l1.qed"),
            l1,
            &(1u64 << 40).to_le_bytes(),
        );
        let err = open_path(&bad_l1).unwrap().map(0, 1).unwrap_err();
        assert!(err.to_string().contains("L1 entry 0"), "{err}");
        // An L2 entry past the end of the file.
        let bad_l2 = patched(
            &p,
            dir.path().join("l2.qed"),
            l2 + 16 * 8,
            &(1u64 << 40).to_le_bytes(),
        );
        let err = open_path(&bad_l2).unwrap().map(1 << 20, 1).unwrap_err();
        assert!(err.to_string().contains("L2 entry"), "{err}");
        // The L1 table itself past the end.
        let bad_hdr = patched(
            &p,
            dir.path().join("h.qed"),
            40,
            &(1u64 << 40).to_le_bytes(),
        );
        assert!(open_path(&bad_hdr).is_err());
        // An L1 table whose size asks for gigabytes (64 MiB clusters × 16) in a small file.
        let mut huge = patched(&p, dir.path().join("g.qed"), 4, &(1u32 << 26).to_le_bytes());
        huge = patched(&huge, dir.path().join("g2.qed"), 8, &16u32.to_le_bytes());
        assert!(open_path(&huge).is_err());
    }

    #[test]
    fn sizes_near_u64_max_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.qed", "4M");
        for size in [u64::MAX, u64::MAX - 511, 1u64 << 63] {
            let bad = patched(&p, dir.path().join("s2.qed"), 48, &size.to_le_bytes());
            let err = open_path(&bad).unwrap_err();
            assert!(err.to_string().contains("image size"), "{err}");
        }
    }

    #[test]
    fn unknown_feature_bits_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "f.qed", "4M");
        let bad = patched(&p, dir.path().join("f2.qed"), 16, &0x100u64.to_le_bytes());
        assert!(matches!(
            open_path(&bad).unwrap_err(),
            Error::Unsupported { .. }
        ));
    }

    #[test]
    fn corrupted_images_give_errors_never_panics() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "x.qed", "8M");
        qemu_io(
            "qed",
            &p,
            &["write -P 1 0 64k", "write -z 1M 64k", "write -P 2 3M 128k"],
        );
        assert_corruption_never_panics(&p, |q| Ok(Arc::new(open_path(q)?)), 400);
    }
}
