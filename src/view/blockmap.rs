//! Shared machinery of the block-based sparse views (`vmdk`, `vdi`, `vpc`): which
//! fixed-size guest blocks hold data, where the n-th allocated block lands in the file,
//! and the identifiers derived from a [`ViewId`].
//!
//! All three formats store a guest block (VMDK grain, VDI block, VHD block) only when
//! some of it holds data, packed in guest order, so the file offset of a block is a
//! prefix count: the number of allocated blocks before it. [`BlockMap`] keeps the
//! allocated blocks as sorted runs with those counts, which makes memory proportional to
//! the number of data runs (never to the virtual size) and answers both directions
//! (guest block → rank for tables, rank → guest block for data) by binary search. It is
//! computed from the disk's allocation map only, never from its data.

use super::{Piece, Result, Segment, ViewId};
use crate::image::Disk;
use sha2::{Digest, Sha256};

/// The sector size of every format generated here (VMDK, VDI and VHD all count in
/// 512-byte sectors).
pub const SECTOR: u64 = 512;

/// `x` rounded up to a multiple of `align` (a power of two or any non-zero value).
pub fn round_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// A run of consecutive allocated blocks: `count` blocks from guest block `first`, the
/// first of which is the `rank`-th allocated block of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    first: u64,
    count: u64,
    rank: u64,
}

/// The allocated blocks of a guest disk cut into `block_size` pieces.
#[derive(Clone, Debug)]
pub struct BlockMap {
    block_size: u64,
    blocks: u64,
    runs: Vec<Run>,
    allocated: u64,
    data_bytes: u64,
}

impl BlockMap {
    /// The blocks of `disk` that hold data. `span` (≥ the disk's size) is the guest size
    /// the format describes, so the block count covers the padding of the last sector.
    pub fn of_disk(disk: &Disk, span: u64, block_size: u64) -> Result<BlockMap> {
        let mut map = BlockMap::empty(span, block_size);
        let max_runs = disk.walk_limits().runs as usize;
        disk.walk(0, disk.virtual_size(), |pos, ext| {
            if ext.mapping.is_data() {
                map.add(pos, ext.len);
                if map.runs.len() > max_runs {
                    return Err(disk.too_fragmented());
                }
            }
            Ok(())
        })?;
        Ok(map)
    }

    /// A map with no allocated block.
    fn empty(span: u64, block_size: u64) -> BlockMap {
        BlockMap {
            block_size,
            blocks: span.div_ceil(block_size),
            runs: Vec::new(),
            allocated: 0,
            data_bytes: 0,
        }
    }

    /// Marks the blocks touched by guest data `[start, start + len)`; calls come in
    /// increasing, non-overlapping order.
    fn add(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.data_bytes += len;
        let first = start / self.block_size;
        let end = (start + len).div_ceil(self.block_size);
        self.add_blocks(first, end);
    }

    /// Marks blocks `[first, end)` allocated; calls come in increasing order.
    fn add_blocks(&mut self, mut first: u64, end: u64) {
        if let Some(last) = self.runs.last_mut() {
            let last_end = last.first + last.count;
            if first <= last_end {
                if end > last_end {
                    last.count = end - last.first;
                    self.allocated += end - last_end;
                }
                return;
            }
            first = first.max(last_end);
        }
        if end > first {
            self.runs.push(Run {
                first,
                count: end - first,
                rank: self.allocated,
            });
            self.allocated += end - first;
        }
    }

    /// The map of the same disk in blocks `factor` times larger (VMDK grain tables: a
    /// table exists where any of its grains does).
    pub fn coarsen(&self, factor: u64) -> BlockMap {
        let mut out = BlockMap::empty(self.blocks * self.block_size, self.block_size * factor);
        out.blocks = self.blocks.div_ceil(factor);
        for r in &self.runs {
            out.add_blocks(r.first / factor, (r.first + r.count).div_ceil(factor));
        }
        out.data_bytes = self.data_bytes;
        out
    }

    #[cfg(test)]
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks needed to cover the span, allocated or not (the table length).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Allocated blocks.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Guest bytes that hold data (what the view stores of the guest).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The run holding `block`, if any.
    #[cfg(test)]
    fn run_of(&self, block: u64) -> Option<&Run> {
        let i = self.runs.partition_point(|r| r.first <= block);
        let r = self.runs.get(i.checked_sub(1)?)?;
        (block < r.first + r.count).then_some(r)
    }

    /// The rank of `block` among allocated blocks (its slot in the data area), or `None`
    /// when it holds no data.
    #[cfg(test)]
    pub fn rank(&self, block: u64) -> Option<u64> {
        self.run_of(block).map(|r| r.rank + (block - r.first))
    }

    /// The ranks of blocks `first ..` into `out` (`None` where a block holds no data),
    /// with one binary search for the whole batch.
    pub fn ranks_from(&self, first: u64, out: &mut [Option<u64>]) {
        let mut i = self.runs.partition_point(|r| r.first + r.count <= first);
        for (k, slot) in out.iter_mut().enumerate() {
            let block = first + k as u64;
            while self.runs.get(i).is_some_and(|r| r.first + r.count <= block) {
                i += 1;
            }
            *slot = match self.runs.get(i) {
                Some(r) if r.first <= block => Some(r.rank + (block - r.first)),
                _ => None,
            };
        }
    }

    /// The guest block stored in slot `rank` (< `allocated()`), and how many slots from
    /// it on hold consecutive guest blocks.
    pub fn block_at_rank(&self, rank: u64) -> Option<(u64, u64)> {
        let i = self.runs.partition_point(|r| r.rank <= rank);
        let r = self.runs.get(i.checked_sub(1)?)?;
        let k = rank - r.rank;
        (k < r.count).then_some((r.first + k, r.count - k))
    }

    /// The allocated blocks as `(first block, count)` runs, in guest order.
    #[cfg(test)]
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|r| (r.first, r.count))
    }
}

/// The segment of guest bytes from `guest` for at most `max_len` bytes, inside an
/// allocated block: the guest's data, or a hole where the disk stores nothing (zeroes,
/// unallocated, or the padding past the disk's last byte), so the view stays sparse.
pub fn guest_segment(disk: &Disk, guest: u64, max_len: u64) -> Result<Segment> {
    let size = disk.virtual_size();
    if guest >= size {
        return Ok(Segment {
            len: max_len,
            piece: Piece::Hole,
        });
    }
    let ext = disk.map(guest, max_len.min(size - guest))?;
    let piece = if ext.mapping.is_data() {
        Piece::Guest(guest)
    } else {
        Piece::Hole
    };
    Ok(Segment {
        len: ext.len,
        piece,
    })
}

/// 32 bytes derived from the view identity for one purpose (`label` names the format
/// and field), so that every identifier in a header is stable and distinct.
pub fn derive(id: &ViewId, label: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"pcocc-imagefs view identifier\0");
    h.update(label.as_bytes());
    h.update(b"\0");
    h.update(id.0);
    h.finalize().into()
}

/// A UUID derived from the view identity: a name-based UUID in the RFC 9562 "custom"
/// layout (version 8, variant 10), as allowed there for SHA-256 name hashing.
pub fn derive_uuid(id: &ViewId, label: &str) -> [u8; 16] {
    let d = derive(id, label);
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` of a UUID.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Table entries computed per call of a table filler: one VMDK grain table, and a
/// batch small enough for the stack for the other tables.
pub const TABLE_CHUNK: usize = 512;

/// Byte order of a table's 32-bit entries.
#[derive(Clone, Copy, Debug)]
pub enum Endian {
    Little,
    Big,
}

/// Fills `buf` with the bytes at `offset` of a table of 32-bit entries. `chunk(first,
/// values)` computes entries `first .. first + TABLE_CHUNK`; only the chunks the range
/// touches are computed, so a table is never materialised whole.
pub fn fill_u32_table(
    buf: &mut [u8],
    offset: u64,
    endian: Endian,
    mut chunk: impl FnMut(u64, &mut [u32; TABLE_CHUNK]),
) {
    const CHUNK_BYTES: u64 = TABLE_CHUNK as u64 * 4;
    let mut values = [0u32; TABLE_CHUNK];
    let mut bytes = [0u8; TABLE_CHUNK * 4];
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        chunk(pos / CHUNK_BYTES * TABLE_CHUNK as u64, &mut values);
        for (out, v) in bytes.chunks_exact_mut(4).zip(values) {
            out.copy_from_slice(&match endian {
                Endian::Little => v.to_le_bytes(),
                Endian::Big => v.to_be_bytes(),
            });
        }
        let skip = (pos % CHUNK_BYTES) as usize;
        let take = (bytes.len() - skip).min(buf.len() - done);
        buf[done..done + take].copy_from_slice(&bytes[skip..skip + take]);
        done += take;
    }
}

/// Copies the part of `area` (generated bytes placed at view offset `area_start`) that
/// `buf` at view offset `offset` overlaps; bytes past the area's end are zero.
pub fn copy_area(area: &[u8], area_start: u64, offset: u64, buf: &mut [u8]) {
    let skip = (offset - area_start) as usize;
    let avail = area.len().saturating_sub(skip).min(buf.len());
    buf[..avail].copy_from_slice(&area[skip..skip + avail]);
    buf[avail..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(runs: &[(u64, u64)], span: u64, bs: u64) -> BlockMap {
        let mut m = BlockMap::empty(span, bs);
        for &(s, l) in runs {
            m.add(s, l);
        }
        m
    }

    #[test]
    fn data_runs_become_merged_block_runs_with_prefix_ranks() {
        // Blocks of 10: data in blocks 0, 1 (two touches), 3..=5, and 9.
        let m = map_of(&[(2, 3), (15, 2), (30, 25), (95, 5)], 100, 10);
        assert_eq!(m.blocks(), 10);
        assert_eq!(m.runs().collect::<Vec<_>>(), vec![(0, 2), (3, 3), (9, 1)]);
        assert_eq!(m.allocated(), 6);
        assert_eq!(m.data_bytes(), 35);
        assert_eq!(m.rank(0), Some(0));
        assert_eq!(m.rank(1), Some(1));
        assert_eq!(m.rank(2), None);
        assert_eq!(m.rank(5), Some(4));
        assert_eq!(m.rank(9), Some(5));
        assert_eq!(m.rank(10), None);
        assert_eq!(m.block_at_rank(0), Some((0, 2)));
        assert_eq!(m.block_at_rank(3), Some((4, 2)));
        assert_eq!(m.block_at_rank(5), Some((9, 1)));
        assert_eq!(m.block_at_rank(6), None);
    }

    #[test]
    fn coarser_map_has_a_block_wherever_a_fine_block_is() {
        let m = map_of(&[(0, 1), (35, 1), (41, 1), (95, 1)], 100, 10);
        let c = m.coarsen(4);
        assert_eq!(c.block_size(), 40);
        assert_eq!(c.blocks(), 3);
        assert_eq!(c.runs().collect::<Vec<_>>(), vec![(0, 3)]);
        let sparse = map_of(&[(0, 1), (95, 1)], 100, 10).coarsen(4);
        assert_eq!(sparse.runs().collect::<Vec<_>>(), vec![(0, 1), (2, 1)]);
        assert_eq!(sparse.rank(2), Some(1));
    }

    #[test]
    fn table_bytes_are_cut_from_any_offset() {
        let fill = |i: u64, v: &mut [u32; TABLE_CHUNK]| {
            for (k, x) in v.iter_mut().enumerate() {
                *x = (i + k as u64 + 1) as u32;
            }
        };
        let mut buf = [0u8; 7];
        fill_u32_table(&mut buf, 3, Endian::Big, fill);
        assert_eq!(buf, [1, 0, 0, 0, 2, 0, 0]);
        // Across a chunk boundary, little-endian.
        let mut buf = [0u8; 8];
        fill_u32_table(&mut buf, 2046, Endian::Little, fill);
        assert_eq!(buf, [0, 0, 1, 2, 0, 0, 2, 2]);
    }

    #[test]
    fn batch_ranks_agree_with_single_lookups() {
        let m = map_of(&[(2, 3), (15, 2), (30, 25), (95, 5)], 100, 10);
        for first in 0..12 {
            let mut out = [None; 7];
            m.ranks_from(first, &mut out);
            for (k, r) in out.iter().enumerate() {
                assert_eq!(*r, m.rank(first + k as u64), "block {}", first + k as u64);
            }
        }
    }

    #[test]
    fn view_identity_changes_only_identifier_bytes() {
        use crate::image::Format;
        use crate::view::View;
        if !crate::testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = check::raw_source(dir.path(), "src.raw", 8 << 20, &[(4096, 70_000, 1)]);
        let disk = check::raw_disk(&src);
        for format in [Format::Vmdk, Format::Vdi, Format::Vpc] {
            let head = |id: u8| {
                let view = View::new(disk.clone(), format, ViewId([id; 32])).unwrap();
                let mut buf = vec![0u8; view.size() as usize];
                view.read_at(&mut buf, 0).unwrap();
                buf
            };
            let (a, b) = (head(1), head(2));
            assert_eq!(a, head(1), "{format}: same identity, same bytes");
            assert_eq!(
                a.len(),
                b.len(),
                "{format}: identity does not change the size"
            );
            let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            // A CID or UUIDs (and the checksums over them), nothing else.
            assert!(
                (1..=160).contains(&differing),
                "{format}: {differing} bytes differ"
            );
        }
    }

    #[test]
    fn derived_uuids_are_stable_distinct_and_well_formed() {
        let id = ViewId([7; 32]);
        let a = derive_uuid(&id, "a");
        assert_eq!(a, derive_uuid(&id, "a"));
        assert_ne!(a, derive_uuid(&id, "b"));
        assert_ne!(a, derive_uuid(&ViewId([8; 32]), "a"));
        assert_eq!(a[6] >> 4, 8);
        assert_eq!(a[8] >> 6, 2);
        let t = uuid_text(&a);
        assert_eq!(t.len(), 36);
        assert_eq!(t.matches('-').count(), 4);
    }
}

#[cfg(test)]
pub(crate) mod check;

#[cfg(test)]
mod bench;
