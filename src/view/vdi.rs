//! `disk.vdi`: a dynamic VirtualBox disk image, generated from the disk's allocation.
//!
//! File layout (VirtualBox VDI 1.1, the header qemu and VirtualBox both read):
//!
//! ```text
//! 0         pre-header (text, signature, version) and header, 512 bytes
//! 512       block map: one u32 per 1 MiB guest block, its index in the data area
//!           or 0xFFFFFFFF when the block is not stored
//! ..        hole up to a 1 MiB boundary (VirtualBox aligns its data the same way)
//! data      the stored blocks, 1 MiB each, in guest order
//! ```
//!
//! A block is stored when some of it holds data; inside a stored block, guest ranges
//! that read zero are holes in the view, so the file stays as sparse as the disk. A
//! block's index is its rank among stored blocks, so the map is produced on demand from
//! a `BlockMap` and memory stays proportional to the data. The image and
//! modification UUIDs come from the view identity; VDI has no timestamp.

use super::blockmap::{
    BlockMap, Endian, SECTOR, TABLE_CHUNK, copy_area, derive_uuid, fill_u32_table, guest_segment,
    round_up,
};
use super::{Error, Layout, Piece, Result, Segment, ViewId};
use crate::image::{Disk, Format};
use std::sync::Arc;

/// Informational text at the start of the file (VirtualBox's own wording).
const TEXT: &[u8] = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
/// Image signature at offset 64.
const SIGNATURE: u32 = 0xbeda_107f;
/// Format version 1.1, stored as major << 16 | minor.
const VERSION: u32 = 0x0001_0001;
/// Size of the version 1.1 header after the pre-header, as qemu writes it (up to and
/// including the parent UUID).
const HEADER_SIZE: u32 = 0x180;
/// Image type 1: dynamic (blocks allocated on demand).
const TYPE_DYNAMIC: u32 = 1;
/// Block size: 1 MiB, the only size qemu accepts.
const BLOCK: u64 = 1 << 20;
/// Block map entry of a block that is not stored.
const UNALLOCATED: u32 = 0xffff_ffff;
/// The block map follows the 512-byte header.
const BMAP_OFFSET: u64 = 512;
/// Stored blocks start at a multiple of this, so guest blocks are aligned in the file.
const DATA_ALIGN: u64 = 1 << 20;
/// qemu's limit on the block count: the map, rounded to a sector, must stay below
/// 2 GiB (`VDI_BLOCKS_IN_IMAGE_MAX` = (2^31 − 512) / 4).
const MAX_BLOCKS: u64 = ((1 << 31) - 512) / 4;

#[derive(Debug)]
pub struct VdiLayout {
    disk: Arc<Disk>,
    blocks: BlockMap,
    header: Vec<u8>,
    data_offset: u64,
    size: u64,
    allocated: u64,
}

impl VdiLayout {
    pub fn new(disk: Arc<Disk>, id: ViewId) -> Result<VdiLayout> {
        let disk_size = round_up(disk.virtual_size(), SECTOR);
        let block_count = disk_size.div_ceil(BLOCK);
        if block_count > MAX_BLOCKS {
            return Err(Error::Unsupported {
                path: disk.top().path().to_path_buf(),
                format: Format::Vdi,
                reason: format!(
                    "a {} byte disk needs {} blocks of 1 MiB, more than the {MAX_BLOCKS} \
                     qemu accepts in a VDI",
                    disk.virtual_size(),
                    block_count
                ),
            });
        }
        let blocks = BlockMap::of_disk(&disk, disk_size, BLOCK)?;
        let bmap_end = BMAP_OFFSET + blocks.blocks() * 4;
        let data_offset = round_up(bmap_end, DATA_ALIGN);
        let header = header_bytes(&id, disk_size, &blocks, data_offset);
        Ok(VdiLayout {
            size: data_offset + blocks.allocated() * BLOCK,
            allocated: bmap_end + blocks.data_bytes(),
            disk,
            blocks,
            header,
            data_offset,
        })
    }

    fn bmap_end(&self) -> u64 {
        BMAP_OFFSET + self.blocks.blocks() * 4
    }

    /// Block map entries `first ..`: each block's index in the data area, or
    /// [`UNALLOCATED`].
    fn bmap_chunk(&self, first: u64, values: &mut [u32; TABLE_CHUNK]) {
        let mut ranks = [None; TABLE_CHUNK];
        self.blocks.ranks_from(first, &mut ranks);
        for (v, r) in values.iter_mut().zip(ranks) {
            // Ranks are below MAX_BLOCKS, so they fit the u32 entry.
            *v = r.map_or(UNALLOCATED, |r| r as u32);
        }
    }
}

/// The 512-byte pre-header and header.
fn header_bytes(id: &ViewId, disk_size: u64, blocks: &BlockMap, data_offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..TEXT.len()].copy_from_slice(TEXT);
    b[64..68].copy_from_slice(&SIGNATURE.to_le_bytes());
    b[68..72].copy_from_slice(&VERSION.to_le_bytes());
    b[72..76].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    b[76..80].copy_from_slice(&TYPE_DYNAMIC.to_le_bytes());
    // Flags (80..84) 0; description (84..340) empty.
    b[340..344].copy_from_slice(&(BMAP_OFFSET as u32).to_le_bytes());
    // data_offset < 2 GiB + 1 MiB: MAX_BLOCKS bounds the map.
    b[344..348].copy_from_slice(&(data_offset as u32).to_le_bytes());
    // Legacy geometry (348..360) 0, as qemu writes it: readers compute their own.
    b[360..364].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    b[368..376].copy_from_slice(&disk_size.to_le_bytes());
    b[376..380].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    // Extra data per block (380..384) 0.
    b[384..388].copy_from_slice(&(blocks.blocks() as u32).to_le_bytes());
    b[388..392].copy_from_slice(&(blocks.allocated() as u32).to_le_bytes());
    b[392..408].copy_from_slice(&derive_uuid(id, "vdi image"));
    b[408..424].copy_from_slice(&derive_uuid(id, "vdi modification"));
    // Link and parent UUIDs (424..456) stay nil: a standalone image.
    b
}

impl Layout for VdiLayout {
    fn size(&self) -> u64 {
        self.size
    }

    fn segment(&self, offset: u64) -> Result<Segment> {
        let bmap_end = self.bmap_end();
        if offset < bmap_end {
            return Ok(Segment {
                len: bmap_end - offset,
                piece: Piece::Generated,
            });
        }
        if offset < self.data_offset {
            return Ok(Segment {
                len: self.data_offset - offset,
                piece: Piece::Hole,
            });
        }
        let rel = offset - self.data_offset;
        let (block, run_left) =
            self.blocks
                .block_at_rank(rel / BLOCK)
                .ok_or_else(|| Error::OutOfRange {
                    path: self.disk.top().path().to_path_buf(),
                    offset,
                    size: self.size,
                })?;
        let inner = rel % BLOCK;
        guest_segment(&self.disk, block * BLOCK + inner, run_left * BLOCK - inner)
    }

    fn generate(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let head = (BMAP_OFFSET.saturating_sub(offset) as usize).min(buf.len());
        if head > 0 {
            copy_area(&self.header, 0, offset, &mut buf[..head]);
        }
        if head < buf.len() {
            let pos = offset + head as u64;
            fill_u32_table(
                &mut buf[head..],
                pos - BMAP_OFFSET,
                Endian::Little,
                |f, v| self.bmap_chunk(f, v),
            );
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::have_qemu;
    use crate::view::View;
    use crate::view::blockmap::check::{
        empty_disk, judge, random_reads_match_sequential, raw_disk, raw_source,
    };

    const MIB: u64 = 1 << 20;

    crate::view::blockmap::check::raw_matrix_tests!(Format::Vdi, BLOCK);
    crate::view::blockmap::check::qcow2_matrix_tests!(Format::Vdi, BLOCK);
    crate::view::blockmap::check::zero_length_test!(Format::Vdi, BLOCK);

    #[test]
    fn sparse_raw_disk_becomes_a_vdi_qemu_reads_identically() {
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
        let view = judge(dir.path(), Format::Vdi, disk, &src, "raw", BLOCK);
        random_reads_match_sequential(&view, 0x9e37_79b9, 200);
    }

    #[test]
    fn block_map_of_the_largest_vdi_is_generated_on_demand() {
        let disk = empty_disk(MAX_BLOCKS * BLOCK);
        let view = View::new(disk, Format::Vdi, ViewId([1; 32])).unwrap();
        // A 2 GiB block map and no data: the file ends where the data would start.
        assert_eq!(
            view.size(),
            round_up(BMAP_OFFSET + MAX_BLOCKS * 4, DATA_ALIGN)
        );
        let mut tail = [0u8; 4096];
        let end = BMAP_OFFSET + MAX_BLOCKS * 4;
        view.read_at(&mut tail, end - 4096).unwrap();
        assert!(tail.iter().all(|&b| b == 0xff), "every block unallocated");
        assert_eq!(view.next_hole(0).unwrap(), Some(end));
        let err = View::new(
            empty_disk(MAX_BLOCKS * BLOCK + 1),
            Format::Vdi,
            ViewId([1; 32]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("huge.img") && err.contains("blocks"), "{err}");
    }

    #[test]
    fn zero_ranges_inside_a_stored_block_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        if !have_qemu() {
            return;
        }
        let src = raw_source(dir.path(), "src.raw", 4 * MIB, &[(MIB + 8192, 4096, 7)]);
        let disk = raw_disk(&src);
        let layout = VdiLayout::new(disk, ViewId([2; 32])).unwrap();
        assert_eq!(layout.blocks.allocated(), 1);
        let data = layout.data_offset;
        assert_eq!(layout.segment(data).unwrap().piece, Piece::Hole);
        assert_eq!(layout.segment(data).unwrap().len, 8192);
        assert_eq!(
            layout.segment(data + 8192).unwrap(),
            Segment {
                len: 4096,
                piece: Piece::Guest(MIB + 8192)
            }
        );
        assert_eq!(layout.size(), data + MIB);
        assert_eq!(layout.allocated_bytes(), 512 + 4 * 4 + 4096);
    }
}
