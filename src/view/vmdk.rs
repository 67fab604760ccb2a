//! `disk.vmdk`: a VMware monolithicSparse disk (one hosted sparse extent with its
//! descriptor embedded), generated from the disk's allocation.
//!
//! File layout (VMware Virtual Disk Format 1.1, "Hosted Sparse Extents"), in 512-byte
//! sectors:
//!
//! ```text
//! 0            sparse extent header ("KDMV")
//! 1 .. 21      embedded descriptor, zero padded (qemu reserves the same 20 sectors)
//! 21 ..        grain directory: one u32 per 32 MiB of guest, sector of its grain table
//!              or 0 when no grain of that range is stored
//! ..           grain tables (512 u32 entries each) of the ranges that hold data only
//! .. overhead  hole up to a grain boundary, so grains are 64 KiB aligned in the file
//! overhead ..  the allocated grains, 128 sectors each, in guest order
//! ```
//!
//! Grains hold only blocks with data; inside a stored grain, guest ranges that read zero
//! stay holes in the view. A grain's sector is `overhead + 128 × rank`, its rank among
//! stored grains, so both tables are produced on demand from a `BlockMap` and nothing
//! proportional to the virtual size is kept. There is no redundant grain directory (flag
//! bit 1 clear): it would double the tables for no reader's benefit, and neither qemu's
//! reader nor `qemu-img check` looks for it.
//!
//! The descriptor names the extent `disk.vmdk`, the view's own name. qemu never reads
//! that line for a monolithicSparse file (it takes the extent from the header of the
//! file it opened), so a copy under another name opens the same; VMware resolves an
//! embedded descriptor's sparse extent to the file itself as well.

use super::blockmap::{
    BlockMap, Endian, SECTOR, TABLE_CHUNK, copy_area, derive, derive_uuid, fill_u32_table,
    guest_segment, round_up, uuid_text,
};
use super::{Error, Layout, Piece, Result, Segment, ViewId};
use crate::image::{Disk, Format};
use std::sync::Arc;

/// Header magic "KDMV" (spec: `SPARSE_MAGICNUMBER` 0x564d444b, stored little-endian).
const MAGIC: &[u8; 4] = b"KDMV";
/// Sparse extent format version 1 (no zeroed-grain entries, no compression).
const VERSION: u32 = 1;
/// Flags: bit 0, "valid new line detection test" (the four line-ending bytes are set).
const FLAGS: u32 = 1;
/// Sectors per grain: 64 KiB grains, the size qemu and VMware create.
const GRAIN_SECTORS: u64 = 128;
const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR;
/// Entries per grain table (the spec's value for hosted sparse extents).
const GTES_PER_GT: u64 = 512;
/// Bytes of one grain table.
const GT_BYTES: u64 = GTES_PER_GT * 4;
/// Sector of the embedded descriptor and its reserved length, as qemu creates them.
const DESCRIPTOR_SECTOR: u64 = 1;
const DESCRIPTOR_SECTORS: u64 = 20;
/// The grain directory follows the descriptor.
const GD_SECTOR: u64 = DESCRIPTOR_SECTOR + DESCRIPTOR_SECTORS;
/// qemu refuses grain directories of more than 32 Mi entries (its "L1 size too big"):
/// with 64 KiB grains and 512-entry tables, disks up to 1 PiB.
const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Grain tables and directory entries hold 32-bit sector numbers: the file cannot
/// exceed 2^32 sectors (2 TiB).
const MAX_FILE_SECTORS: u64 = 1 << 32;
/// The name the embedded descriptor gives its extent: the view's file name.
const EXTENT_FILE_NAME: &str = "disk.vmdk";
/// Geometry qemu writes in the descriptor: 16 heads, 63 sectors per track.
const GEOMETRY_HEADS: u64 = 16;
const GEOMETRY_SECTORS: u64 = 63;

#[derive(Debug)]
pub struct VmdkLayout {
    disk: Arc<Disk>,
    grains: BlockMap,
    tables: BlockMap,
    /// Header and descriptor: sectors 0 .. GD_SECTOR.
    head: Vec<u8>,
    gd_entries: u64,
    gt_sector: u64,
    overhead: u64,
    size: u64,
    allocated: u64,
}

impl VmdkLayout {
    pub fn new(disk: Arc<Disk>, id: ViewId) -> Result<VmdkLayout> {
        let capacity = disk.virtual_size().div_ceil(SECTOR);
        let gd_entries = (capacity * SECTOR).div_ceil(GRAIN_BYTES * GTES_PER_GT);
        let unsupported = |reason: String| Error::Unsupported {
            path: disk.top().path().to_path_buf(),
            format: Format::Vmdk,
            reason,
        };
        if capacity == 0 {
            // qemu reads a sparse extent of capacity 0 as a bare descriptor file and
            // then refuses its createType, so such a file would open nowhere.
            return Err(unsupported(
                "the disk is empty (0 bytes) and a VMDK sparse extent cannot describe \
                 an empty disk that qemu opens"
                    .into(),
            ));
        }
        if gd_entries > MAX_GD_ENTRIES {
            return Err(unsupported(format!(
                "a {} byte disk needs {gd_entries} grain directory entries, more than \
                 the {MAX_GD_ENTRIES} qemu accepts",
                disk.virtual_size()
            )));
        }
        let grains = BlockMap::of_disk(&disk, capacity * SECTOR, GRAIN_BYTES)?;
        let tables = grains.coarsen(GTES_PER_GT);
        debug_assert_eq!(tables.blocks(), gd_entries);
        let gd_sectors = (gd_entries * 4).div_ceil(SECTOR);
        let gt_sector = GD_SECTOR + gd_sectors;
        let gt_end = gt_sector + tables.allocated() * (GT_BYTES / SECTOR);
        let overhead = round_up(gt_end, GRAIN_SECTORS);
        let file_sectors = overhead + grains.allocated() * GRAIN_SECTORS;
        if file_sectors > MAX_FILE_SECTORS {
            return Err(unsupported(format!(
                "{} bytes of data do not fit a sparse extent, whose 32-bit sector \
                 numbers address at most 2 TiB",
                grains.allocated() * GRAIN_BYTES
            )));
        }
        let head = head_bytes(&id, capacity, overhead);
        Ok(VmdkLayout {
            allocated: gt_end * SECTOR + grains.data_bytes(),
            disk,
            grains,
            tables,
            head,
            gd_entries,
            gt_sector,
            overhead,
            size: file_sectors * SECTOR,
        })
    }

    /// The guest ranges stored as grains, `(offset, length)`, clipped to the capacity.
    #[cfg(test)]
    fn stored_guest_runs(&self) -> Vec<(u64, u64)> {
        let cap = round_up(self.disk.virtual_size(), SECTOR);
        self.grains
            .runs()
            .map(|(b, n)| {
                (
                    b * GRAIN_BYTES,
                    (n * GRAIN_BYTES).min(cap - b * GRAIN_BYTES),
                )
            })
            .collect()
    }

    /// Entries `first ..` of the grain tables area (table slot `first / 512`): the
    /// sector of each grain, 0 when it is not stored.
    fn gt_chunk(&self, first: u64, values: &mut [u32; TABLE_CHUNK]) {
        values.fill(0);
        let Some((table, _)) = self.tables.block_at_rank(first / GTES_PER_GT) else {
            return;
        };
        let mut ranks = [None; TABLE_CHUNK];
        self.grains.ranks_from(table * GTES_PER_GT, &mut ranks);
        for (v, r) in values.iter_mut().zip(ranks) {
            // Below MAX_FILE_SECTORS, checked in `new`.
            *v = r.map_or(0, |r| (self.overhead + r * GRAIN_SECTORS) as u32);
        }
    }

    /// Grain directory entries `first ..`: the sector of each grain table, 0 when it is
    /// absent (and in the padding after the last entry).
    fn gd_chunk(&self, first: u64, values: &mut [u32; TABLE_CHUNK]) {
        let mut ranks = [None; TABLE_CHUNK];
        self.tables.ranks_from(first, &mut ranks);
        for (k, (v, r)) in values.iter_mut().zip(ranks).enumerate() {
            let live = first + (k as u64) < self.gd_entries;
            *v = match r {
                Some(slot) if live => (self.gt_sector + slot * (GT_BYTES / SECTOR)) as u32,
                _ => 0,
            };
        }
    }

    fn gt_end(&self) -> u64 {
        (self.gt_sector + self.tables.allocated() * (GT_BYTES / SECTOR)) * SECTOR
    }
}

/// Sectors 0 .. [`GD_SECTOR`]: the sparse extent header and the embedded descriptor.
fn head_bytes(id: &ViewId, capacity: u64, overhead: u64) -> Vec<u8> {
    let mut b = vec![0u8; (GD_SECTOR * SECTOR) as usize];
    b[0..4].copy_from_slice(MAGIC);
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..12].copy_from_slice(&FLAGS.to_le_bytes());
    b[12..20].copy_from_slice(&capacity.to_le_bytes());
    b[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    b[28..36].copy_from_slice(&DESCRIPTOR_SECTOR.to_le_bytes());
    b[36..44].copy_from_slice(&DESCRIPTOR_SECTORS.to_le_bytes());
    b[44..48].copy_from_slice(&(GTES_PER_GT as u32).to_le_bytes());
    // rgdOffset (48..56) stays 0: no redundant grain directory.
    b[56..64].copy_from_slice(&GD_SECTOR.to_le_bytes());
    b[64..72].copy_from_slice(&overhead.to_le_bytes());
    // uncleanShutdown (72) = 0; then the line-ending test bytes the spec prescribes.
    b[73..77].copy_from_slice(b"\n \r\n");
    // compressAlgorithm (77..79) = 0: none.
    let text = descriptor(id, capacity);
    let start = (DESCRIPTOR_SECTOR * SECTOR) as usize;
    // The descriptor is a few hundred bytes; the reserved 10 KiB always hold it.
    let end = (start + text.len()).min(b.len());
    b[start..end].copy_from_slice(&text.as_bytes()[..end - start]);
    b
}

/// The embedded descriptor text. The CID and UUIDs come from the view identity; the
/// geometry is what qemu writes (16 heads, 63 sectors, cylinders = sectors / 1008).
fn descriptor(id: &ViewId, capacity: u64) -> String {
    let d = derive(id, "vmdk cid");
    let mut cid = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    // 0xffffffff means "no parent" in parentCID; keep the image's own CID distinct.
    if cid == u32::MAX {
        cid = 0;
    }
    let cylinders = capacity / (GEOMETRY_HEADS * GEOMETRY_SECTORS);
    let nil = uuid_text(&[0; 16]);
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"monolithicSparse\"\n\
         \n\
         # Extent description\n\
         RW {capacity} SPARSE \"{EXTENT_FILE_NAME}\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{GEOMETRY_HEADS}\"\n\
         ddb.geometry.sectors = \"{GEOMETRY_SECTORS}\"\n\
         ddb.adapterType = \"ide\"\n\
         ddb.uuid.image = \"{}\"\n\
         ddb.uuid.parent = \"{nil}\"\n\
         ddb.uuid.modification = \"{}\"\n\
         ddb.uuid.parentmodification = \"{nil}\"\n",
        uuid_text(&derive_uuid(id, "vmdk image")),
        uuid_text(&derive_uuid(id, "vmdk modification")),
    )
}

impl Layout for VmdkLayout {
    fn size(&self) -> u64 {
        self.size
    }

    fn segment(&self, offset: u64) -> Result<Segment> {
        let gt_end = self.gt_end();
        let data_start = self.overhead * SECTOR;
        if offset < gt_end {
            return Ok(Segment {
                len: gt_end - offset,
                piece: Piece::Generated,
            });
        }
        if offset < data_start {
            return Ok(Segment {
                len: data_start - offset,
                piece: Piece::Hole,
            });
        }
        let rel = offset - data_start;
        let (block, run_left) = self
            .grains
            .block_at_rank(rel / GRAIN_BYTES)
            .ok_or_else(|| past_end(&self.disk, offset, self.size))?;
        let inner = rel % GRAIN_BYTES;
        guest_segment(
            &self.disk,
            block * GRAIN_BYTES + inner,
            run_left * GRAIN_BYTES - inner,
        )
    }

    fn generate(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let gd_start = GD_SECTOR * SECTOR;
        let gt_start = self.gt_sector * SECTOR;
        let gt_end = self.gt_end();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let area_end = if pos < gd_start {
                gd_start
            } else if pos < gt_start {
                gt_start
            } else if pos < gt_end {
                gt_end
            } else {
                return Err(past_end(&self.disk, pos, gt_end));
            };
            let n = (area_end - pos).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            if pos < gd_start {
                copy_area(&self.head, 0, pos, out);
            } else if pos < gt_start {
                fill_u32_table(out, pos - gd_start, Endian::Little, |f, v| {
                    self.gd_chunk(f, v)
                });
            } else {
                fill_u32_table(out, pos - gt_start, Endian::Little, |f, v| {
                    self.gt_chunk(f, v)
                });
            }
            done += n;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }
}

/// A view offset that the layout does not cover (a bug, reported instead of a panic).
fn past_end(disk: &Disk, offset: u64, size: u64) -> Error {
    Error::OutOfRange {
        path: disk.top().path().to_path_buf(),
        offset,
        size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::have_qemu;
    use crate::view::blockmap::check::{
        empty_disk, expected_blocks, judge, random_reads_match_sequential, raw_disk, raw_source,
    };

    const MIB: u64 = 1 << 20;

    crate::view::blockmap::check::raw_matrix_tests!(Format::Vmdk, GRAIN_BYTES);
    crate::view::blockmap::check::qcow2_matrix_tests!(Format::Vmdk, GRAIN_BYTES);

    #[test]
    fn sparse_raw_disk_becomes_a_vmdk_qemu_reads_identically() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = raw_source(
            dir.path(),
            "src.raw",
            100 * MIB,
            &[
                (0, 4096, 1),
                (MIB + 512, 70_000, 2),
                (40 * MIB, 3 * MIB, 3),
                (100 * MIB - 512, 512, 4),
            ],
        );
        let disk = raw_disk(&src);
        let layout = VmdkLayout::new(disk.clone(), ViewId([1; 32])).unwrap();
        assert_eq!(
            layout.tables.allocated(),
            3,
            "grain tables only where data is"
        );
        assert_eq!(
            layout.stored_guest_runs(),
            expected_blocks(&disk, GRAIN_BYTES, 100 * MIB),
            "grains stored exactly where the source has data"
        );
        let view = judge(dir.path(), Format::Vmdk, disk, &src, "raw", GRAIN_BYTES);
        random_reads_match_sequential(&view, 0x1234_5678, 200);
    }

    #[test]
    fn a_petabyte_disk_gets_its_grain_directory_on_demand() {
        let size = MAX_GD_ENTRIES * GRAIN_BYTES * GTES_PER_GT;
        let layout = VmdkLayout::new(empty_disk(size), ViewId([1; 32])).unwrap();
        // 128 MiB of grain directory, all zero, and nothing else.
        assert_eq!(
            layout.size(),
            round_up(
                (GD_SECTOR + MAX_GD_ENTRIES * 4 / SECTOR) * SECTOR,
                GRAIN_BYTES
            )
        );
        let mut buf = vec![0xaau8; 8192];
        layout
            .generate(GD_SECTOR * SECTOR + (1 << 26), &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let err = VmdkLayout::new(empty_disk(size + 1), ViewId([1; 32])).unwrap_err();
        assert!(err.to_string().contains("grain directory"), "{err}");
    }

    #[test]
    fn zero_length_disk_has_no_vmdk_view() {
        let dir = tempfile::tempdir().unwrap();
        let src = raw_source(dir.path(), "zero.raw", 0, &[]);
        let err = VmdkLayout::new(raw_disk(&src), ViewId([1; 32])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("zero.raw") && msg.contains("empty"), "{msg}");
    }
}
