//! qcow2 layers (versions 2 and 3): the header, the L1 table in memory, L2 tables through
//! a bounded shared cache, and a [`Layer::map`] that answers with long extents.
//!
//! Supported: cluster sizes 512 B to 2 MiB, zero clusters (v3), unallocated clusters
//! (they fall through to the backing layer, see [`super::chain`]), compressed clusters
//! (deflate and zstd, decoded by [`super::compressed`]) and extended L2 entries
//! (32 subclusters per cluster with allocation and zero bitmaps), and an external data
//! file holding the guest clusters when the caller opens it
//! ([`Qcow2Layer::with_data_file`]). Refused with an error naming the file: encryption,
//! the corrupt bit and any unknown incompatible feature.
//!
//! Limits enforced before allocating (see [`header`]): cluster bits 9..=21; L1 table at
//! most 32 MiB, large enough for the virtual size, cluster-aligned and inside the file
//! (only the entries covering the virtual size are loaded); refcount table within
//! qemu's 8 MiB; virtual size at most `i64::MAX`; backing name at most 1023 bytes; no
//! two L1 entries may name the same L2 table. L2 tables must be cluster-aligned and
//! inside the file; compressed clusters must start inside the file and after the header
//! cluster; data clusters must be cluster-aligned (so never in the header cluster), and
//! reading one past the end of the file fails that read, as in qemu.
//!
//! Guest data that points at other metadata (an L2 entry naming the L1 table or a
//! refcount block) is read as stored, as qemu reads it: it leaks nothing from outside
//! the file, and telling metadata apart would need the refcounts, which reading does
//! not otherwise load.
//!
//! `map` merges neighbouring clusters of one L2 table that share a kind (unallocated,
//! zero, or data at contiguous host offsets), and runs of empty L1 entries, so a large
//! read costs few lookups and few `pread`s.

pub mod header;
pub mod keep;

#[cfg(test)]
mod tests;

pub use header::BackingRef;

use super::cache::LruCache;
use super::file::{LayerFile, map_end};
use super::{CompressedCluster, Compression, Error, Extent, Format, Layer, Mapping, Result};
use header::{Header, OFFSET_MASK, invalid};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// L2 entry bit 62: the cluster is compressed (spec).
const L2_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 63: the cluster's refcount is exactly one (spec, "COPIED").
const L2_COPIED: u64 = 1 << 63;
/// Standard cluster descriptor bit 0: the cluster reads as zeroes (spec, v3 only).
const L2_ZERO: u64 = 1;
/// Extended L2 entries split a cluster into this many subclusters (spec).
const SUBCLUSTERS: u32 = 32;
/// Compressed sizes are counted in 512-byte sectors (spec).
const COMPRESSED_SECTOR: u64 = 512;

/// Bytes of L2 tables each layer keeps in memory; at least [`MIN_L2_CACHE_TABLES`]
/// tables are kept whatever the cluster size. With 64 KiB clusters, 8 MiB of tables map
/// 64 GiB of guest disk.
const L2_CACHE_BYTES: usize = 8 << 20;
const MIN_L2_CACHE_TABLES: usize = 16;

/// A qcow2 image file, immutable after open, shared by any number of reading threads.
pub struct Qcow2Layer {
    src: LayerFile,
    /// The external data file holding the guest clusters, when the image has one.
    data: Option<LayerFile>,
    header: Header,
    l1: Box<[u64]>,
    l2_cache: LruCache<u64, Arc<[u64]>>,
}

impl std::fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("path", &self.src.path)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// What one guest unit (a cluster, or a subcluster with extended L2) holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Unallocated,
    Zero,
    /// Stored verbatim at this host offset (of the unit's first byte).
    Data(u64),
    /// A compressed cluster: host offset and stored length.
    Compressed(u64, u64),
}

/// The refusal of the external data file `name` of the image at `path`, where the
/// files an image names are not read.
pub fn data_file_refused(path: &Path, name: &str) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        reason: format!(
            "its data lives in an external data file {name:?}, which is not read here \
             (`pcocc image import` reads it); convert it to a standalone image with \
             qemu-img convert"
        ),
    }
}

impl Qcow2Layer {
    /// Opens `path` as a qcow2 image (no backing file is opened here).
    pub fn open(path: &Path) -> Result<Qcow2Layer> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Qcow2Layer::new(file, path)
    }

    /// Reads the header and L1 table of `file` (opened from `path`). An image whose
    /// guest clusters live in an external data file is refused (see
    /// [`Qcow2Layer::with_data_file`]).
    pub fn new(file: File, path: &Path) -> Result<Qcow2Layer> {
        Qcow2Layer::with_data_file(file, path, &|name| Err(data_file_refused(path, name)))
    }

    /// [`Qcow2Layer::new`] for an image that may keep its guest clusters in an external
    /// data file: `open_data` opens it from the name the header records (its path and
    /// the open file), or refuses.
    pub fn with_data_file(
        file: File,
        path: &Path,
        open_data: &dyn Fn(&str) -> Result<(std::path::PathBuf, File)>,
    ) -> Result<Qcow2Layer> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let file_len = meta.len();
        let header = header::parse(&file, path, file_len)?;
        let data = match &header.data_file {
            Some(name) => {
                let (data_path, data_file) = open_data(name)?;
                let data_meta = data_file.metadata().map_err(|e| Error::io(&data_path, e))?;
                Some(LayerFile::new(data_file, &data_path, &data_meta))
            }
            None => None,
        };
        // Bounded by the header checks: at most 32 MiB and inside the file.
        let mut raw = vec![0u8; (header.l1_entries * 8) as usize];
        super::read_exact_at(&file, path, &mut raw, header.l1_offset)?;
        let l1: Box<[u64]> = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        check_l1_tables_distinct(&l1, path)?;
        let cluster_size = header.cluster_size() as usize;
        let tables = (L2_CACHE_BYTES / cluster_size).max(MIN_L2_CACHE_TABLES);
        Ok(Qcow2Layer {
            src: LayerFile::new(file, path, &meta),
            data,
            l1,
            l2_cache: LruCache::new(tables * cluster_size),
            header,
        })
    }

    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Compression used by this image's compressed clusters.
    pub fn compression(&self) -> Compression {
        self.header.compression
    }

    pub fn extended_l2(&self) -> bool {
        self.header.extended_l2
    }

    /// Bytes of guest disk one L2 table covers.
    fn l2_span(&self) -> u64 {
        (self.header.cluster_size() / self.header.l2_entry_bytes()) << self.header.cluster_bits
    }

    /// The L2 table at host offset `offset`, from the cache or the file.
    fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        if let Some(t) = self.l2_cache.get(&offset) {
            return Ok(t);
        }
        let cs = self.header.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(invalid(
                &self.src.path,
                format!("L2 table offset {offset:#x} is not cluster-aligned"),
            ));
        }
        if offset.checked_add(cs).is_none_or(|e| e > self.src.len) {
            return Err(invalid(
                &self.src.path,
                format!(
                    "L2 table at offset {offset:#x} is past the end of the file ({} bytes)",
                    self.src.len
                ),
            ));
        }
        let mut raw = vec![0u8; cs as usize];
        super::read_exact_at(&self.src.file, &self.src.path, &mut raw, offset)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        self.l2_cache.insert(offset, table.clone(), cs as usize);
        Ok(table)
    }

    /// Bits of the guest-unit size: the subcluster with extended L2, else the cluster.
    fn unit_bits(&self) -> u32 {
        if self.header.extended_l2 {
            self.header.cluster_bits - SUBCLUSTERS.trailing_zeros()
        } else {
            self.header.cluster_bits
        }
    }

    /// What the guest unit containing `pos` holds, given its L2 table.
    fn unit(&self, table: &[u64], pos: u64) -> Result<Unit> {
        let h = &self.header;
        let per_table = h.cluster_size() / h.l2_entry_bytes();
        let index = ((pos >> h.cluster_bits) % per_table) as usize;
        let stride = (h.l2_entry_bytes() / 8) as usize;
        let entry = table[index * stride];
        let bad = |what: String| {
            invalid(
                &self.src.path,
                format!("L2 entry {entry:#018x} for guest offset {pos}: {what}"),
            )
        };
        if entry & L2_COMPRESSED != 0 {
            if self.data.is_some() {
                return Err(bad(
                    "a compressed cluster in an image with an external data file".into(),
                ));
            }
            // Descriptor: offset in bits 0..x, extra sectors in bits x..62, with
            // x = 62 - (cluster_bits - 8) (spec, "Compressed Clusters Descriptor").
            let x = 62 - (h.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
            let stored = sectors * COMPRESSED_SECTOR - (host % COMPRESSED_SECTOR);
            if host >= self.src.len {
                return Err(bad(format!(
                    "compressed cluster at {host:#x} is outside the file ({} bytes)",
                    self.src.len
                )));
            }
            // The first cluster is the header; no guest data lives there.
            if host < h.cluster_size() {
                return Err(bad(format!(
                    "compressed cluster at {host:#x} is inside the header cluster"
                )));
            }
            return Ok(Unit::Compressed(host, stored));
        }
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(h.cluster_size()) {
            return Err(bad("data cluster offset is not cluster-aligned".into()));
        }
        // Offset 0 means "no cluster", except in an external data file, where the
        // COPIED flag marks the cluster at its very start (spec).
        let stored = host != 0 || (self.data.is_some() && entry & L2_COPIED != 0);
        if h.extended_l2 {
            let bitmap = table[index * stride + 1];
            let sub = (pos >> self.unit_bits()) % u64::from(SUBCLUSTERS);
            let allocated = bitmap & (1 << sub) != 0;
            let zero = bitmap & (1 << (sub + 32)) != 0;
            return match (allocated, zero) {
                (true, true) => Err(bad(format!("subcluster {sub} is both allocated and zero"))),
                (true, false) if !stored => Err(bad(format!(
                    "subcluster {sub} is allocated in a cluster with no host offset"
                ))),
                (true, false) => Ok(Unit::Data(host + (sub << self.unit_bits()))),
                (false, true) => Ok(Unit::Zero),
                (false, false) => Ok(Unit::Unallocated),
            };
        }
        if entry & L2_ZERO != 0 {
            if h.version < 3 {
                // qemu reports the same corruption: v2 has no zero clusters.
                return Err(bad("zero flag in a version 2 image".into()));
            }
            return Ok(Unit::Zero);
        }
        Ok(if stored {
            Unit::Data(host)
        } else {
            Unit::Unallocated
        })
    }
}

/// Refuses an L1 table that names one L2 table twice. Every L2 table of the active L1
/// maps one place of the disk (qemu-img check reports a shared one as a refcount
/// error); a table named by every L1 entry would let a small file describe a disk of
/// petabytes of data, and make a layout or a conversion of it run without end.
fn check_l1_tables_distinct(l1: &[u64], path: &Path) -> Result<()> {
    let mut offsets: Vec<u64> = l1
        .iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    offsets.sort_unstable();
    match offsets.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(invalid(
            path,
            format!(
                "the L2 table at offset {:#x} is named by more than one L1 entry",
                w[0]
            ),
        )),
        None => Ok(()),
    }
}

impl Layer for Qcow2Layer {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.header.backing.as_ref()
    }

    fn file_id(&self) -> Option<(u64, u64)> {
        Some(self.src.id)
    }

    fn path(&self) -> &Path {
        &self.src.path
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn allocated_bytes(&self) -> u64 {
        self.src.allocated + self.data.as_ref().map_or(0, |d| d.allocated)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = map_end(&self.src.path, offset, max_len, self.header.size)?;
        let span = self.l2_span();
        let l1_index = offset / span;
        let l2_offset = |i: u64| self.l1.get(i as usize).map_or(0, |e| e & OFFSET_MASK);
        if l2_offset(l1_index) == 0 {
            // No L2 table: unallocated, as are the next tables with none either.
            let mut stop = (l1_index + 1) * span;
            while stop < end && l2_offset(stop / span) == 0 {
                stop += span;
            }
            return Ok(Extent {
                len: stop.min(end) - offset,
                mapping: Mapping::Unallocated,
            });
        }
        let table = self.l2_table(l2_offset(l1_index))?;
        let table_end = ((l1_index + 1) * span).min(end);
        let unit_bits = self.unit_bits();
        let unit_start = |pos: u64| pos >> unit_bits << unit_bits;

        let first = self.unit(&table, offset)?;
        if let Unit::Compressed(host, stored) = first {
            let cb = self.header.cluster_bits;
            let cluster_start = offset >> cb << cb;
            let cluster_end = cluster_start + self.header.cluster_size();
            return Ok(Extent {
                len: cluster_end.min(end) - offset,
                mapping: Mapping::Compressed(CompressedCluster {
                    file: self.src.file.clone(),
                    path: self.src.path.clone(),
                    offset: host,
                    stored_len: stored,
                    cluster_len: self.header.cluster_size(),
                    skip: offset - cluster_start,
                    compression: self.header.compression,
                }),
            });
        }
        // Host offset of `offset` itself, for data units.
        let base = match first {
            Unit::Data(h) => Some(h + (offset - unit_start(offset))),
            _ => None,
        };
        let mut stop = unit_start(offset) + (1 << unit_bits);
        while stop < table_end {
            let next = self.unit(&table, stop)?;
            let same = match (first, next) {
                (Unit::Unallocated, Unit::Unallocated) | (Unit::Zero, Unit::Zero) => true,
                (Unit::Data(_), Unit::Data(h)) => base.is_some_and(|b| b + (stop - offset) == h),
                _ => false,
            };
            if !same {
                break;
            }
            stop += 1 << unit_bits;
        }
        let len = stop.min(end) - offset;
        let mapping = match (first, base) {
            // With an external data file, host offsets are offsets in it.
            (Unit::Data(_), Some(host)) => self.data.as_ref().unwrap_or(&self.src).data(host),
            (Unit::Zero, _) => Mapping::Zero,
            _ => Mapping::Unallocated,
        };
        Ok(Extent { len, mapping })
    }
}
