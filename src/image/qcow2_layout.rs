//! The arrangement of a standalone qcow2 v3 file that this project writes: the layout
//! shared by the `disk.qcow2` view (which serves it on read) and the import converter
//! (which writes it to a layer file), so both produce the same bytes for the same disk.
//!
//! The file holds 64 KiB clusters, 16-bit refcounts, no compression, no backing file and
//! no header extension but the end marker. Everything sits at a computed place:
//!
//! ```text
//! | header | L1 | refcount table | refcount blocks | L2 | data… | L2 | data… | …
//! ```
//!
//! after the fixed prefix, every non-empty L2 group (512 MiB of guest space) is its L2
//! table followed by the data clusters it maps, in guest order. Every cluster of the file
//! is used exactly once, so every refcount is 1 and every table entry carries the
//! `COPIED` flag; `qemu-img check` then finds neither errors nor leaks.
//!
//! The layout keeps only the allocated runs of guest clusters and the non-empty groups
//! (memory in proportion to the allocation, never to the virtual size) and answers
//! "what is at file offset X" by binary search over them. Table bytes are produced on
//! demand for the range asked for. The grouping itself ([`Placement`]) is format-neutral:
//! the QED view places its tables the same way.

use super::{Disk, Error, Format, Result};
use std::path::Path;

/// log2 of the cluster size of every qcow2 file this project writes (qemu's default).
pub const CLUSTER_BITS: u32 = 16;
/// 64 KiB.
pub const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
/// qcow2 magic, `QFI\xfb` (qcow2.rst, "Header").
const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Version 3 (qcow2.rst): refcount order and the feature bitmaps are in the header.
const QCOW2_VERSION: u32 = 3;
/// 16-bit refcounts, qemu's default (qcow2.rst: `refcount_order` 4 means 2^4 bits).
const REFCOUNT_ORDER: u32 = 4;
/// Bytes of one refcount entry.
const REFCOUNT_BYTES: u64 = 1 << (REFCOUNT_ORDER - 3);
/// Refcount entries per refcount block.
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER_SIZE / REFCOUNT_BYTES;
/// 8-byte entries (L1, L2, refcount table) per cluster.
const ENTRIES_PER_CLUSTER: u64 = CLUSTER_SIZE / 8;
/// log2 of the guest clusters one L2 table maps.
const L2_BITS: u32 = CLUSTER_BITS - 3;
/// Length of the v3 header without the optional `compression_type` field (qcow2.rst:
/// `header_length`, at least 104 for version 3). Without the field, compression is zlib,
/// which does not matter for a file with no compressed cluster.
const HEADER_LENGTH: u32 = 104;
/// L1/L2 entry flag: the cluster's refcount is exactly one (qcow2.rst, bit 63).
const COPIED: u64 = 1 << 63;
/// qemu refuses an L1 table above 32 MiB (`QCOW_MAX_L1_SIZE`): with 64 KiB clusters that
/// bounds the virtual size to 2 PiB. Bigger disks have no qcow2 form here.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest virtual size written, from the largest L1 table (`MAX_L1_BYTES`).
pub const MAX_VIRTUAL_SIZE: u64 = (MAX_L1_BYTES / 8) << (L2_BITS + CLUSTER_BITS);
/// Granularity at which generated tables report their all-zero stretches as holes: the
/// usual filesystem block, the unit GNU `cp` and `SEEK_HOLE` work in. A table block
/// with no entry in it is never stored, by the view or by the converter.
pub const ZERO_BLOCK: u64 = 4096;
/// qemu sees every disk as whole 512-byte sectors and rounds sizes up to them.
pub const SECTOR_SIZE: u64 = 512;

/// Rounds `n` up to a multiple of the power of two `align`.
pub fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

/// The runs of `cluster_size`-byte guest clusters of `disk` that hold any stored data, as
/// sorted, merged `(first cluster, count)`. Built from the disk's tables only (never its
/// data), one extent at a time, so memory follows the number of runs.
pub fn allocated_clusters(disk: &Disk, cluster_size: u64) -> Result<Vec<(u64, u64)>> {
    let max_runs = disk.walk_limits().runs;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    disk.walk(0, disk.virtual_size(), |pos, ext| {
        if ext.mapping.is_data() {
            let first = pos / cluster_size;
            let end = (pos + ext.len).div_ceil(cluster_size);
            let kept = runs.len() as u64;
            match runs.last_mut() {
                Some((s, n)) if *s + *n >= first => *n = end.max(*s + *n) - *s,
                _ if kept >= max_runs => return Err(disk.too_fragmented()),
                _ => runs.push((first, end - first)),
            }
        }
        Ok(())
    })?;
    Ok(runs)
}

/// One non-empty table group: the `index`-th L2 table (its L1 index) and where it sits.
#[derive(Clone, Copy, Debug)]
struct Group {
    /// Index of the group in the L1 table.
    index: u64,
    /// First cluster of its table, relative to the start of the grouped area.
    table: u64,
    /// Index in `runs` of its first run.
    first_run: usize,
}

/// A run of guest clusters stored back to back in the file.
#[derive(Clone, Copy, Debug)]
struct Run {
    guest: u64,
    count: u64,
    /// First host cluster, relative to the start of the grouped area.
    host: u64,
}

/// What occupies one cluster of the grouped area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Cluster `cluster` of the table of the `group`-th non-empty group; `left` clusters of
    /// that table from here on (this one included).
    Table {
        group: usize,
        cluster: u64,
        left: u64,
    },
    /// Guest cluster `guest`, with `left` guest clusters stored contiguously from here on.
    Data { guest: u64, left: u64 },
}

/// Where the allocated guest clusters and their second-level tables go in a two-level
/// table format: after a fixed prefix of `base` clusters, each non-empty group of
/// `2^group_bits` guest clusters is its table (`table_clusters` clusters) followed by its
/// data clusters in guest order. Used by qcow2 (one-cluster L2 tables) and QED (tables
/// of `table_size` clusters).
#[derive(Clone, Debug)]
pub struct Placement {
    group_bits: u32,
    table_clusters: u64,
    base: u64,
    groups: Vec<Group>,
    runs: Vec<Run>,
    data_clusters: u64,
    area_clusters: u64,
}

impl Placement {
    /// Places `runs` (sorted `(first guest cluster, count)`, each inside the
    /// `guest_clusters` of the disk). `path` names the disk in errors.
    pub fn new(
        path: &Path,
        format: Format,
        runs: &[(u64, u64)],
        guest_clusters: u64,
        group_bits: u32,
        table_clusters: u64,
    ) -> Result<Placement> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            format,
            reason,
        };
        let mut out = Placement {
            group_bits,
            table_clusters,
            base: 0,
            groups: Vec::new(),
            runs: Vec::with_capacity(runs.len()),
            data_clusters: 0,
            area_clusters: 0,
        };
        let mut next_free = 0u64; // first guest cluster not yet placed
        let mut host = 0u64; // next relative host cluster
        for &(first, count) in runs {
            let end = first.checked_add(count).filter(|&e| e <= guest_clusters);
            let Some(end) = end.filter(|_| count > 0 && first >= next_free) else {
                return Err(invalid(format!(
                    "allocation run of {count} clusters at cluster {first} is empty, \
                     unsorted or past the {guest_clusters} clusters of the disk"
                )));
            };
            let mut g = first;
            while g < end {
                let index = g >> group_bits;
                let group_end = ((index + 1) << group_bits).min(end);
                if out.groups.last().is_none_or(|last| last.index != index) {
                    out.groups.push(Group {
                        index,
                        table: host,
                        first_run: out.runs.len(),
                    });
                    host += table_clusters;
                }
                match out.runs.last_mut() {
                    // Guest-adjacent runs in one group are host-adjacent too: merge.
                    Some(r) if r.guest + r.count == g && r.host + r.count == host => {
                        r.count += group_end - g
                    }
                    _ => out.runs.push(Run {
                        guest: g,
                        count: group_end - g,
                        host,
                    }),
                }
                host += group_end - g;
                out.data_clusters += group_end - g;
                g = group_end;
            }
            next_free = end;
        }
        out.area_clusters = host;
        Ok(out)
    }

    /// Moves the grouped area to start at cluster `base` of the file.
    pub fn set_base(&mut self, base: u64) {
        self.base = base;
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// Clusters of tables and data in the grouped area.
    pub fn area_clusters(&self) -> u64 {
        self.area_clusters
    }

    /// Guest clusters stored.
    pub fn data_clusters(&self) -> u64 {
        self.data_clusters
    }

    /// Non-empty groups (tables stored).
    pub fn table_count(&self) -> usize {
        self.groups.len()
    }

    /// What file cluster `cluster` (≥ `base`, < `base + area_clusters`) holds.
    pub fn slot(&self, cluster: u64) -> Slot {
        let rel = cluster - self.base;
        let gi = self.groups.partition_point(|g| g.table <= rel) - 1;
        let g = self.groups[gi];
        if rel < g.table + self.table_clusters {
            return Slot::Table {
                group: gi,
                cluster: rel - g.table,
                left: g.table + self.table_clusters - rel,
            };
        }
        let group_runs = self.group_runs(gi);
        let ri = group_runs.partition_point(|r| r.host <= rel) - 1;
        let r = group_runs[ri];
        Slot::Data {
            guest: r.guest + (rel - r.host),
            left: r.host + r.count - rel,
        }
    }

    /// Whether table byte `offset` of the L1 table (`table_len` bytes) lies in a
    /// [`ZERO_BLOCK`] that holds an entry, and for how many bytes that answer holds.
    pub fn l1_span(&self, offset: u64, table_len: u64) -> (bool, u64) {
        let first = block_floor(offset) / 8;
        let i = self.groups.partition_point(|g| g.index < first);
        block_span(offset, table_len, self.groups.get(i).map(|g| g.index))
    }

    /// Like [`l1_span`](Self::l1_span), for byte `offset` of the `group`-th table.
    pub fn table_span(&self, group: usize, offset: u64) -> (bool, u64) {
        let group_first = self.groups[group].index << self.group_bits;
        let first = group_first + block_floor(offset) / 8;
        let runs = self.group_runs(group);
        let i = runs.partition_point(|r| r.guest + r.count <= first);
        let next = runs.get(i).map(|r| r.guest.max(first) - group_first);
        block_span(offset, self.table_clusters << CLUSTER_BITS, next)
    }

    /// Bytes of the L1 table in blocks that hold an entry.
    pub fn l1_stored_bytes(&self) -> u64 {
        stored_blocks(self.groups.iter().map(|g| (g.index, g.index + 1))) * ZERO_BLOCK
    }

    /// Bytes of all second-level tables in blocks that hold an entry.
    pub fn tables_stored_bytes(&self) -> u64 {
        (0..self.groups.len())
            .map(|gi| {
                let group_first = self.groups[gi].index << self.group_bits;
                let runs = self.group_runs(gi).iter();
                let entries =
                    runs.map(|r| (r.guest - group_first, r.guest + r.count - group_first));
                stored_blocks(entries) * ZERO_BLOCK
            })
            .sum()
    }

    fn group_runs(&self, group: usize) -> &[Run] {
        let end = self
            .groups
            .get(group + 1)
            .map_or(self.runs.len(), |n| n.first_run);
        &self.runs[self.groups[group].first_run..end]
    }

    /// Fills `buf` with bytes `[offset, offset + len)` of the top-level table (one 8-byte
    /// entry per group), `entry(host byte offset of the group's table)` for non-empty
    /// groups and zero elsewhere.
    pub fn fill_l1(&self, offset: u64, buf: &mut [u8], entry: impl Fn(u64) -> [u8; 8]) {
        buf.fill(0);
        let (first, last) = entry_range(offset, buf.len());
        let from = self.groups.partition_point(|g| g.index < first);
        for g in self.groups[from..].iter().take_while(|g| g.index < last) {
            let host = (self.base + g.table) << CLUSTER_BITS;
            put_entry(buf, offset, g.index, entry(host));
        }
    }

    /// Fills `buf` with bytes `[offset, offset + len)` of the table of the `group`-th
    /// non-empty group: `entry(host byte offset)` for stored clusters, zero elsewhere.
    pub fn fill_table(
        &self,
        group: usize,
        offset: u64,
        buf: &mut [u8],
        entry: impl Fn(u64) -> [u8; 8],
    ) {
        buf.fill(0);
        let g = self.groups[group];
        let group_first = g.index << self.group_bits;
        let (first, last) = entry_range(offset, buf.len());
        let (first, last) = (group_first + first, group_first + last);
        let group_runs = self.group_runs(group);
        let from = group_runs.partition_point(|r| r.guest + r.count <= first);
        for r in group_runs[from..].iter().take_while(|r| r.guest < last) {
            for guest in r.guest.max(first)..(r.guest + r.count).min(last) {
                let host = (self.base + r.host + (guest - r.guest)) << CLUSTER_BITS;
                put_entry(buf, offset, guest - group_first, entry(host));
            }
        }
    }
}

fn block_floor(offset: u64) -> u64 {
    offset / ZERO_BLOCK * ZERO_BLOCK
}

/// The answer of [`Placement::l1_span`] for table byte `offset` of a `table_len`-byte
/// table whose first entry at or after the start of `offset`'s block is `next`.
fn block_span(offset: u64, table_len: u64, next: Option<u64>) -> (bool, u64) {
    let block_end = (block_floor(offset) + ZERO_BLOCK).min(table_len);
    match next {
        Some(e) if e * 8 < block_end => (true, block_end - offset),
        Some(e) => (false, block_floor(e * 8).min(table_len) - offset),
        None => (false, table_len - offset),
    }
}

/// Number of distinct [`ZERO_BLOCK`]s touched by sorted runs of 8-byte entries
/// `[first, end)`.
fn stored_blocks(runs: impl Iterator<Item = (u64, u64)>) -> u64 {
    let mut count = 0;
    let mut next_free = 0u64; // first block not yet counted
    for (first, end) in runs {
        let lo = ((first * 8) / ZERO_BLOCK).max(next_free);
        let hi = (end * 8).div_ceil(ZERO_BLOCK);
        if hi > lo {
            count += hi - lo;
            next_free = hi;
        }
    }
    count
}

/// The 8-byte entries that bytes `[offset, offset + len)` of a table touch.
fn entry_range(offset: u64, len: usize) -> (u64, u64) {
    (offset / 8, (offset + len as u64).div_ceil(8))
}

/// Copies the part of entry `index` (8 bytes at `index * 8` in the table) that falls in
/// `buf`, which holds table bytes from `buf_offset`.
fn put_entry(buf: &mut [u8], buf_offset: u64, index: u64, bytes: [u8; 8]) {
    let start = index * 8;
    let lo = start.max(buf_offset);
    let hi = (start + 8).min(buf_offset + buf.len() as u64);
    if lo < hi {
        buf[(lo - buf_offset) as usize..(hi - buf_offset) as usize]
            .copy_from_slice(&bytes[(lo - start) as usize..(hi - start) as usize]);
    }
}

/// What a run of qcow2 file bytes holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Header, L1, refcount table and blocks, or an L2 table: made by
    /// [`Qcow2Layout::generate`].
    Table,
    /// Table or header bytes that are all zero, whole [`ZERO_BLOCK`]s: left as holes.
    Zero,
    /// Guest bytes from this guest offset (the last cluster may reach past the virtual
    /// size: those bytes read as zeroes).
    Data(u64),
}

/// A run of `len` file bytes of one part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub len: u64,
    pub part: Part,
}

/// The complete arrangement of one standalone qcow2 file.
#[derive(Clone, Debug)]
pub struct Qcow2Layout {
    /// Virtual size written in the header (the disk's, rounded up to whole sectors).
    virtual_size: u64,
    l1_entries: u64,
    l1_clusters: u64,
    refcount_table_clusters: u64,
    refcount_block_clusters: u64,
    placement: Placement,
    total_clusters: u64,
}

impl Qcow2Layout {
    /// The layout of a disk of `virtual_size` bytes whose stored 64 KiB clusters are
    /// `runs` (sorted `(first cluster, count)`, as from [`allocated_clusters`]). `path`
    /// names the source in errors.
    pub fn new(path: &Path, virtual_size: u64, runs: &[(u64, u64)]) -> Result<Qcow2Layout> {
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                format: Format::Qcow2,
                reason: format!(
                    "a virtual size of {virtual_size} bytes is above the {MAX_VIRTUAL_SIZE} \
                     bytes a qcow2 file with 64 KiB clusters can hold"
                ),
            });
        }
        let virtual_size = align_up(virtual_size, SECTOR_SIZE);
        let guest_clusters = virtual_size.div_ceil(CLUSTER_SIZE);
        let mut placement = Placement::new(path, Format::Qcow2, runs, guest_clusters, L2_BITS, 1)?;
        let l1_entries = guest_clusters.div_ceil(1 << L2_BITS);
        let l1_clusters = l1_entries.div_ceil(ENTRIES_PER_CLUSTER);
        // The refcount blocks must cover the whole file, themselves included: grow them
        // until they do (this settles within a couple of rounds).
        let (mut rt, mut rb) = (1u64, 1u64);
        let total = loop {
            let total = 1 + l1_clusters + rt + rb + placement.area_clusters();
            let need_rb = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_rt = need_rb.div_ceil(ENTRIES_PER_CLUSTER);
            if need_rb <= rb && need_rt <= rt {
                break total;
            }
            (rt, rb) = (need_rt.max(rt), need_rb.max(rb));
        };
        placement.set_base(1 + l1_clusters + rt + rb);
        Ok(Qcow2Layout {
            virtual_size,
            l1_entries,
            l1_clusters,
            refcount_table_clusters: rt,
            refcount_block_clusters: rb,
            placement,
            total_clusters: total,
        })
    }

    /// The layout of `disk`, from its tables.
    pub fn of_disk(disk: &Disk) -> Result<Qcow2Layout> {
        let runs = allocated_clusters(disk, CLUSTER_SIZE)?;
        Qcow2Layout::new(disk.top().path(), disk.virtual_size(), &runs)
    }

    /// Length of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.total_clusters << CLUSTER_BITS
    }

    /// The virtual size in the header.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Guest clusters stored in the file.
    pub fn data_clusters(&self) -> u64 {
        self.placement.data_clusters()
    }

    fn l1_offset(&self) -> u64 {
        CLUSTER_SIZE
    }

    fn refcount_table_offset(&self) -> u64 {
        (1 + self.l1_clusters) << CLUSTER_BITS
    }

    fn refcount_blocks_offset(&self) -> u64 {
        (1 + self.l1_clusters + self.refcount_table_clusters) << CLUSTER_BITS
    }

    /// What the file holds from `offset` (< [`file_size`](Self::file_size)) and for how
    /// long.
    pub fn span(&self, offset: u64) -> Span {
        let table = |(stored, len): (bool, u64)| Span {
            len,
            part: if stored { Part::Table } else { Part::Zero },
        };
        let rt = self.refcount_table_offset();
        let rb = self.refcount_blocks_offset();
        let base = self.placement.base() << CLUSTER_BITS;
        if offset < CLUSTER_SIZE {
            // The header and its end-of-extensions marker fit in the first block.
            table(prefix_span(offset, ZERO_BLOCK, CLUSTER_SIZE))
        } else if offset < rt {
            table(
                self.placement
                    .l1_span(offset - CLUSTER_SIZE, rt - CLUSTER_SIZE),
            )
        } else if offset < rb {
            let stored = align_up(self.refcount_block_clusters * 8, ZERO_BLOCK);
            table(prefix_span(offset - rt, stored, rb - rt))
        } else if offset < base {
            let stored = align_up(self.total_clusters * REFCOUNT_BYTES, ZERO_BLOCK);
            table(prefix_span(offset - rb, stored, base - rb))
        } else {
            let within = offset & (CLUSTER_SIZE - 1);
            match self.placement.slot(offset >> CLUSTER_BITS) {
                Slot::Table { group, .. } => table(self.placement.table_span(group, within)),
                Slot::Data { guest, left } => Span {
                    len: (left << CLUSTER_BITS) - within,
                    part: Part::Data((guest << CLUSTER_BITS) + within),
                },
            }
        }
    }

    /// Bytes of the file outside [`Part::Zero`] spans.
    pub fn stored_bytes(&self) -> u64 {
        let l1 = if self.l1_clusters == 0 {
            0
        } else {
            self.placement.l1_stored_bytes()
        };
        ZERO_BLOCK
            + l1
            + align_up(self.refcount_block_clusters * 8, ZERO_BLOCK)
            + align_up(self.total_clusters * REFCOUNT_BYTES, ZERO_BLOCK)
            + self.placement.tables_stored_bytes()
            + (self.placement.data_clusters() << CLUSTER_BITS)
    }

    /// Fills `buf` with the file bytes at `offset`. Table bytes are computed; bytes in
    /// data clusters (which the caller reads from the guest) come out as zeroes.
    pub fn generate(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let cluster = pos >> CLUSTER_BITS;
            let within = pos & (CLUSTER_SIZE - 1);
            // Work one cluster (or one prefix region) at a time.
            let n = ((CLUSTER_SIZE - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let rt = self.refcount_table_offset();
            let rb = self.refcount_blocks_offset();
            let base = self.placement.base() << CLUSTER_BITS;
            if cluster == 0 {
                self.fill_header(within, out);
            } else if pos < rt {
                let l1 = pos - self.l1_offset();
                self.placement
                    .fill_l1(l1, out, |host| (host | COPIED).to_be_bytes());
            } else if pos < rb {
                self.fill_refcount_table(pos - rt, out);
            } else if pos < base {
                self.fill_refcount_blocks(pos - rb, out);
            } else if pos >= self.file_size() {
                out.fill(0);
            } else {
                match self.placement.slot(cluster) {
                    Slot::Table { group, .. } => {
                        self.placement
                            .fill_table(group, within, out, |h| (h | COPIED).to_be_bytes())
                    }
                    Slot::Data { .. } => out.fill(0),
                }
            }
            done += n;
        }
    }

    /// The header cluster: the v3 header, the end-of-extensions marker, then zeroes.
    fn fill_header(&self, offset: u64, buf: &mut [u8]) {
        let mut h = [0u8; HEADER_LENGTH as usize + 8];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &QCOW2_MAGIC.to_be_bytes());
        put(4, &QCOW2_VERSION.to_be_bytes());
        // 8: backing_file_offset, 16: backing_file_size: none.
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        // 32: crypt_method: none.
        put(36, &(self.l1_entries as u32).to_be_bytes());
        // An empty disk has no L1 table: qemu writes offset 0 then (and a stored but
        // unreferenced L1 cluster would be a leak).
        let l1_offset = if self.l1_entries == 0 {
            0
        } else {
            self.l1_offset()
        };
        put(40, &l1_offset.to_be_bytes());
        put(48, &self.refcount_table_offset().to_be_bytes());
        put(56, &(self.refcount_table_clusters as u32).to_be_bytes());
        // 60: nb_snapshots, 64: snapshots_offset, 72/80/88: feature bitmaps: all zero.
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        // 104: header extension type 0 (end) with length 0.
        copy_window(&h, offset, buf);
    }

    fn fill_refcount_table(&self, offset: u64, buf: &mut [u8]) {
        let first_block = self.refcount_blocks_offset();
        let blocks = self.refcount_block_clusters;
        buf.fill(0);
        let (first, last) = entry_range(offset, buf.len());
        for i in first..last.min(blocks) {
            put_entry(
                buf,
                offset,
                i,
                (first_block + (i << CLUSTER_BITS)).to_be_bytes(),
            );
        }
    }

    /// Every cluster of the file has refcount 1; entries past the file's end are 0.
    fn fill_refcount_blocks(&self, offset: u64, buf: &mut [u8]) {
        let used_bytes = self.total_clusters * REFCOUNT_BYTES;
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            // Big-endian 16-bit 1: the low byte (odd address) is 1.
            *b = u8::from(at < used_bytes && at % REFCOUNT_BYTES == REFCOUNT_BYTES - 1);
        }
    }
}

/// For byte `offset` of a region of `len` bytes whose first `stored` bytes (a whole
/// number of blocks) are kept and the rest is zero: whether `offset` is kept, and for how
/// long.
pub fn prefix_span(offset: u64, stored: u64, len: u64) -> (bool, u64) {
    if offset < stored {
        (true, stored.min(len) - offset)
    } else {
        (false, len - offset)
    }
}

/// Copies the window `[offset, offset + buf.len())` of `src` (zero past its end).
pub fn copy_window(src: &[u8], offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    if offset < src.len() as u64 {
        let from = offset as usize;
        let n = (src.len() - from).min(buf.len());
        buf[..n].copy_from_slice(&src[from..from + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64, runs: &[(u64, u64)]) -> Qcow2Layout {
        Qcow2Layout::new(Path::new("t"), size, runs).expect("layout")
    }

    #[test]
    fn each_l2_table_is_followed_by_the_clusters_it_maps() {
        // Two groups: clusters 3..5 in group 0 and 8192+10 in group 1.
        let l = layout(2 << 30, &[(3, 2), (8192 + 10, 1)]);
        // header, 1 L1, 1 RT, 1 RB.
        assert_eq!(l.placement.base(), 4);
        let c = |n: u64| n << CLUSTER_BITS;
        assert_eq!(l.span(c(4)).part, Part::Table);
        assert_eq!(l.span(c(5)).part, Part::Data(c(3)));
        assert_eq!(l.span(c(5)).len, c(2));
        assert_eq!(l.span(c(6) + 7).part, Part::Data(c(4) + 7));
        assert_eq!(l.span(c(7)).part, Part::Table);
        assert_eq!(l.span(c(8)).part, Part::Data(c(8192 + 10)));
        assert_eq!(l.file_size(), c(9));
    }

    #[test]
    fn l2_entries_point_at_their_data_clusters_with_the_copied_flag() {
        let l = layout(1 << 30, &[(3, 2)]);
        let mut table = vec![0u8; CLUSTER_SIZE as usize];
        l.generate(4 << CLUSTER_BITS, &mut table);
        let entry = |i: usize| u64::from_be_bytes(table[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(2), 0);
        assert_eq!(entry(3), COPIED | (5 << CLUSTER_BITS));
        assert_eq!(entry(4), COPIED | (6 << CLUSTER_BITS));
        assert_eq!(entry(5), 0);
        // Any window of the table gives the same bytes.
        let mut part = vec![0u8; 13];
        l.generate((4 << CLUSTER_BITS) + 21, &mut part);
        assert_eq!(part, table[21..34]);
    }

    #[test]
    fn refcount_blocks_grow_to_cover_themselves() {
        // 32768 clusters is one block's reach; 32764 data clusters plus prefix and one L2
        // need a second block.
        let l = layout(4 << 30, &[(0, 32764)]);
        assert_eq!(l.refcount_block_clusters, 2);
        assert!(l.total_clusters <= 2 * REFCOUNTS_PER_BLOCK);
        assert!(l.total_clusters > REFCOUNTS_PER_BLOCK);
    }

    #[test]
    fn unsorted_or_out_of_disk_runs_are_refused() {
        assert!(Qcow2Layout::new(Path::new("t"), 1 << 20, &[(4, 1), (2, 1)]).is_err());
        assert!(Qcow2Layout::new(Path::new("t"), 1 << 20, &[(15, 2)]).is_err());
        assert!(Qcow2Layout::new(Path::new("t"), 1 << 20, &[(1, 0)]).is_err());
    }

    #[test]
    fn a_huge_sparse_disk_costs_memory_for_its_runs_only() {
        let runs: Vec<(u64, u64)> = (0..100).map(|i| (i * 160_000, 16)).collect();
        let l = layout(1 << 40, &runs);
        assert_eq!(l.l1_entries, 2048);
        assert_eq!(l.data_clusters(), 1600);
        assert!(l.placement.table_count() <= 100);
    }

    /// Walks the whole file span by span and checks it against the run list: every
    /// stored guest cluster appears once, at the place its L1 and L2 entries name;
    /// zero spans really read as zeroes; every refcount is 1 up to the end of the file.
    fn check_against_model(l: &Qcow2Layout, runs: &[(u64, u64)]) {
        let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
        let mut host_of = std::collections::BTreeMap::new();
        let (mut pos, mut stored) = (0u64, 0u64);
        let mut buf = Vec::new();
        while pos < l.file_size() {
            let span = l.span(pos);
            assert!(span.len > 0 && pos + span.len <= l.file_size());
            match span.part {
                Part::Data(g) => {
                    assert_eq!(pos % CLUSTER_SIZE, g % CLUSTER_SIZE);
                    for i in 0..span.len.div_ceil(CLUSTER_SIZE) {
                        let prev = host_of.insert(g / CLUSTER_SIZE + i, pos / CLUSTER_SIZE + i);
                        assert!(prev.is_none(), "guest cluster stored twice");
                    }
                    stored += span.len;
                }
                Part::Zero => {
                    buf.resize(span.len.min(1 << 20) as usize, 1);
                    l.generate(pos, &mut buf);
                    assert!(
                        buf.iter().all(|&b| b == 0),
                        "zero span at {pos} is not zero"
                    );
                    assert_eq!(pos % ZERO_BLOCK, 0);
                }
                Part::Table => stored += span.len,
            }
            pos += span.len;
        }
        assert_eq!(stored, l.stored_bytes(), "stored bytes");
        let model: Vec<u64> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
        assert_eq!(host_of.keys().copied().collect::<Vec<_>>(), model);
        // Follow the tables for every stored cluster.
        let mut header = [0u8; 112];
        l.generate(0, &mut header);
        let l1_offset = be(&header[40..48]);
        for (&guest, &host) in &host_of {
            let mut e = [0u8; 8];
            l.generate(l1_offset + (guest >> L2_BITS) * 8, &mut e);
            let l2 = be(&e);
            assert_eq!(l2 & COPIED, COPIED);
            l.generate((l2 & !COPIED) + (guest & ((1 << L2_BITS) - 1)) * 8, &mut e);
            assert_eq!(
                be(&e),
                COPIED | (host << CLUSTER_BITS),
                "L2 entry of {guest}"
            );
        }
        // Refcounts: 1 for each cluster of the file, 0 after.
        let rt = be(&header[48..56]);
        for c in [0, l.total_clusters - 1, l.total_clusters] {
            let mut e = [0u8; 8];
            l.generate(rt + (c / REFCOUNTS_PER_BLOCK) * 8, &mut e);
            let block = be(&e);
            let mut r = [0u8; 2];
            l.generate(block + (c % REFCOUNTS_PER_BLOCK) * 2, &mut r);
            assert_eq!(u16::from_be_bytes(r), u16::from(c < l.total_clusters));
        }
    }

    #[test]
    fn random_allocations_lay_out_consistently() {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for case in 0..60 {
            let size = 1 + next(if case % 3 == 0 { 1 << 36 } else { 4 << 30 });
            let clusters = align_up(size, SECTOR_SIZE).div_ceil(CLUSTER_SIZE);
            let mut runs = Vec::new();
            let mut at = next(clusters.min(20_000));
            while at < clusters && runs.len() < 200 {
                let n = 1 + next(40_000.min(clusters - at));
                runs.push((at, n));
                let gap = if next(2) == 0 { 50 } else { clusters / 8 + 1 };
                at += n + 1 + next(gap);
            }
            let l = layout(size, &runs);
            check_against_model(&l, &runs);
        }
    }
}
