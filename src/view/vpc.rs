//! `disk.vpc`: a dynamic VHD (Microsoft Virtual Hard Disk), generated from the disk's
//! allocation.
//!
//! File layout (Virtual Hard Disk Image Format Specification 1.0, "Dynamic Hard Disk
//! Image"; every field big-endian):
//!
//! ```text
//! 0         copy of the footer (dynamic disks keep one at the front)
//! 512       dynamic disk header ("cxsparse"), 1024 bytes
//! 1536      block allocation table: one u32 per 2 MiB guest block, the sector of the
//!           block's bitmap or 0xFFFFFFFF when the block is not stored
//! ..        hole up to a 4 KiB boundary
//! blocks    one slot per stored block, in guest order: a 3.5 KiB hole, the block's
//!           512-byte sector bitmap, then its 2 MiB of data (so data is 4 KiB aligned)
//! end-512   the footer
//! ```
//!
//! The footer's creator application is `qem2`, which makes qemu take the size from the
//! footer's current size instead of the CHS geometry, so the disk keeps its exact size
//! (rounded up to a sector). The geometry is still filled the way the specification
//! computes it from the size, as Microsoft's tools do (qemu's own `force_size` writes
//! the 65535/16/255 marker instead; qemu accepts both). Bitmaps are all ones: every
//! sector of a stored block is described by the file (ranges that read zero are holes,
//! and holes read as zeroes). The timestamp is fixed at the VHD epoch and the unique id
//! comes from the view identity, so the bytes never change.
//!
//! qemu refuses VHDs larger than 2040 GiB (`0xff000000` sectors); so does
//! [`VpcLayout::new`], with an error that says why.

use super::blockmap::{
    BlockMap, Endian, SECTOR, TABLE_CHUNK, copy_area, derive_uuid, fill_u32_table, guest_segment,
    round_up,
};
use super::{Error, Layout, Piece, Result, Segment, ViewId};
use crate::image::{Disk, Format};
use std::sync::Arc;

/// Footer cookie.
const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Features: bit 1 "reserved", which the specification says must always be set.
const FEATURES: u32 = 2;
/// File format version 1.0, also the dynamic header version.
const FORMAT_VERSION: u32 = 0x0001_0000;
/// Creator application "qem2": qemu trusts the footer's size for it.
const CREATOR_APP: &[u8; 4] = b"qem2";
/// Creator version (informational): this generator's format revision, 1.0.
const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS "Wi2k", the value qemu writes and Windows tools accept.
const CREATOR_OS: &[u8; 4] = b"Wi2k";
/// Disk type 3: dynamic hard disk.
const DISK_TYPE_DYNAMIC: u32 = 3;
/// Fixed timestamp: 0 seconds after 2000-01-01 00:00 UTC, the VHD epoch.
const TIMESTAMP: u32 = 0;
/// Dynamic disk header cookie.
const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER_SIZE: u64 = 512;
const HEADER_OFFSET: u64 = 512;
const HEADER_SIZE: u64 = 1024;
/// The block allocation table follows the dynamic header, where qemu puts it.
const BAT_OFFSET: u64 = HEADER_OFFSET + HEADER_SIZE;
/// Block size: 2 MiB, the specification's default and qemu's.
const BLOCK: u64 = 2 << 20;
/// One bitmap bit per sector of a block, rounded to a whole sector.
const BITMAP_SIZE: u64 = 512;
/// BAT entry of a block that is not stored.
const UNALLOCATED: u32 = 0xffff_ffff;
/// Data of each block starts on this boundary; its bitmap sits just before it.
const DATA_ALIGN: u64 = 4096;
/// File bytes taken by one stored block: bitmap padding, bitmap, data.
const SLOT: u64 = DATA_ALIGN + BLOCK;
/// qemu's limit (`VHD_MAX_SECTORS`): 0xff000000 sectors, 2040 GiB.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// BAT entries are 32-bit sector numbers.
const MAX_FILE_SECTORS: u64 = 1 << 32;
/// CHS limits of the footer's geometry field (VHD specification, "CHS calculation").
const CHS_MAX_CYLINDERS: u64 = 65535;
const CHS_MAX_HEADS: u64 = 16;
const CHS_MAX_SECTORS: u64 = 255;

#[derive(Debug)]
pub struct VpcLayout {
    disk: Arc<Disk>,
    blocks: BlockMap,
    /// Footer (also the first 512 bytes) and dynamic header: bytes 0 .. BAT_OFFSET.
    head: Vec<u8>,
    bat_end: u64,
    blocks_start: u64,
    footer_offset: u64,
    allocated: u64,
}

impl VpcLayout {
    pub fn new(disk: Arc<Disk>, id: ViewId) -> Result<VpcLayout> {
        let size = round_up(disk.virtual_size(), SECTOR);
        let unsupported = |reason: String| Error::Unsupported {
            path: disk.top().path().to_path_buf(),
            format: Format::Vpc,
            reason,
        };
        if size / SECTOR > MAX_SECTORS {
            return Err(unsupported(format!(
                "the disk is {} bytes but a VHD holds at most 2040 GiB ({} bytes, \
                 qemu's limit); use another format for this disk",
                disk.virtual_size(),
                MAX_SECTORS * SECTOR
            )));
        }
        let blocks = BlockMap::of_disk(&disk, size, BLOCK)?;
        let bat_end = BAT_OFFSET + round_up(blocks.blocks() * 4, SECTOR);
        let blocks_start = round_up(bat_end, DATA_ALIGN);
        let footer_offset = blocks_start + blocks.allocated() * SLOT;
        if footer_offset / SECTOR >= MAX_FILE_SECTORS {
            return Err(unsupported(
                "the stored blocks would pass the 2 TiB a VHD block table can address".into(),
            ));
        }
        let footer = footer_bytes(&id, size);
        let mut head = footer.to_vec();
        head.extend_from_slice(&header_bytes(blocks.blocks()));
        Ok(VpcLayout {
            allocated: bat_end
                + blocks.allocated() * BITMAP_SIZE
                + blocks.data_bytes()
                + FOOTER_SIZE,
            disk,
            blocks,
            head,
            bat_end,
            blocks_start,
            footer_offset,
        })
    }

    /// BAT entries `first ..`: the sector of each block's bitmap, or [`UNALLOCATED`]
    /// (also in the padding after the last entry, as qemu fills it).
    fn bat_chunk(&self, first: u64, values: &mut [u32; TABLE_CHUNK]) {
        let mut ranks = [None; TABLE_CHUNK];
        self.blocks.ranks_from(first, &mut ranks);
        for (v, r) in values.iter_mut().zip(ranks) {
            // Below MAX_FILE_SECTORS, checked in `new`.
            let bitmap = |r| (self.blocks_start + r * SLOT + DATA_ALIGN - BITMAP_SIZE) / SECTOR;
            *v = r.map_or(UNALLOCATED, |r| bitmap(r) as u32);
        }
    }

    fn out_of_range(&self, offset: u64) -> Error {
        Error::OutOfRange {
            path: self.disk.top().path().to_path_buf(),
            offset,
            size: self.size(),
        }
    }
}

/// The 512-byte footer for a disk of `size` bytes.
fn footer_bytes(id: &ViewId, size: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(FOOTER_COOKIE);
    b[8..12].copy_from_slice(&FEATURES.to_be_bytes());
    b[12..16].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    b[16..24].copy_from_slice(&HEADER_OFFSET.to_be_bytes());
    b[24..28].copy_from_slice(&TIMESTAMP.to_be_bytes());
    b[28..32].copy_from_slice(CREATOR_APP);
    b[32..36].copy_from_slice(&CREATOR_VERSION.to_be_bytes());
    b[36..40].copy_from_slice(CREATOR_OS);
    b[40..48].copy_from_slice(&size.to_be_bytes());
    b[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = chs_geometry(size / SECTOR);
    b[56..58].copy_from_slice(&c.to_be_bytes());
    b[58] = h;
    b[59] = s;
    b[60..64].copy_from_slice(&DISK_TYPE_DYNAMIC.to_be_bytes());
    b[68..84].copy_from_slice(&derive_uuid(id, "vpc unique id"));
    // Saved state (84) 0; reserved zero.
    let sum = checksum(&b);
    b[64..68].copy_from_slice(&sum.to_be_bytes());
    b
}

/// The 1024-byte dynamic disk header for a table of `entries` blocks.
fn header_bytes(entries: u64) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    b[0..8].copy_from_slice(HEADER_COOKIE);
    // Data offset: unused, all ones per the specification.
    b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    b[16..24].copy_from_slice(&BAT_OFFSET.to_be_bytes());
    b[24..28].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    // At most MAX_SECTORS / 4096 entries: fits.
    b[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    b[32..36].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    // Parent fields (40..768) and reserved bytes stay zero: no parent.
    let sum = checksum(&b);
    b[36..40].copy_from_slice(&sum.to_be_bytes());
    b
}

/// The specification's checksum: the one's complement of the sum of all bytes, taken
/// while the checksum field itself is zero.
fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)))
}

/// Cylinders, heads and sectors per track for `total` sectors, by the specification's
/// "CHS calculation" (capped at 65535 × 16 × 255).
fn chs_geometry(total: u64) -> (u16, u8, u8) {
    let total = total.min(CHS_MAX_CYLINDERS * CHS_MAX_HEADS * CHS_MAX_SECTORS);
    let (spt, heads, cth);
    if total >= CHS_MAX_CYLINDERS * CHS_MAX_HEADS * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        (spt, heads, cth) = (s, h, c);
    }
    // Each value is within its field by construction of the caps above.
    ((cth / heads) as u16, heads as u8, spt as u8)
}

impl Layout for VpcLayout {
    fn size(&self) -> u64 {
        self.footer_offset + FOOTER_SIZE
    }

    fn segment(&self, offset: u64) -> Result<Segment> {
        let seg = |len, piece| Ok(Segment { len, piece });
        if offset < self.bat_end {
            return seg(self.bat_end - offset, Piece::Generated);
        }
        if offset < self.blocks_start {
            return seg(self.blocks_start - offset, Piece::Hole);
        }
        if offset >= self.footer_offset {
            return seg(self.size() - offset, Piece::Generated);
        }
        let rel = offset - self.blocks_start;
        let (slot, inner) = (rel / SLOT, rel % SLOT);
        let bitmap = DATA_ALIGN - BITMAP_SIZE;
        if inner < bitmap {
            return seg(bitmap - inner, Piece::Hole);
        }
        if inner < DATA_ALIGN {
            return seg(DATA_ALIGN - inner, Piece::Generated);
        }
        let (block, _) = self
            .blocks
            .block_at_rank(slot)
            .ok_or_else(|| self.out_of_range(offset))?;
        let within = inner - DATA_ALIGN;
        guest_segment(&self.disk, block * BLOCK + within, BLOCK - within)
    }

    fn generate(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let left = (buf.len() - done) as u64;
            let n = if pos < BAT_OFFSET {
                let n = (BAT_OFFSET - pos).min(left) as usize;
                copy_area(&self.head, 0, pos, &mut buf[done..done + n]);
                n
            } else if pos < self.bat_end {
                let n = (self.bat_end - pos).min(left) as usize;
                fill_u32_table(
                    &mut buf[done..done + n],
                    pos - BAT_OFFSET,
                    Endian::Big,
                    |f, v| self.bat_chunk(f, v),
                );
                n
            } else if pos >= self.footer_offset {
                let n = (self.size() - pos).min(left) as usize;
                // The footer is the first 512 bytes of `head`.
                copy_area(
                    &self.head[..512],
                    self.footer_offset,
                    pos,
                    &mut buf[done..done + n],
                );
                n
            } else {
                // A block bitmap: every sector of a stored block is present.
                let inner = (pos - self.blocks_start) % SLOT;
                if inner < DATA_ALIGN - BITMAP_SIZE {
                    return Err(self.out_of_range(pos));
                }
                let n = (DATA_ALIGN - inner).min(left) as usize;
                buf[done..done + n].fill(0xff);
                n
            };
            done += n;
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
    use crate::testutil::{have_qemu, qemu_img};
    use crate::view::View;
    use crate::view::blockmap::check::{
        judge, random_reads_match_sequential, raw_disk, raw_source,
    };

    const MIB: u64 = 1 << 20;

    crate::view::blockmap::check::raw_matrix_tests!(Format::Vpc, BLOCK);
    crate::view::blockmap::check::qcow2_matrix_tests!(Format::Vpc, BLOCK);
    crate::view::blockmap::check::zero_length_test!(Format::Vpc, BLOCK);

    #[test]
    fn sparse_raw_disk_becomes_a_vhd_qemu_reads_identically() {
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
        let view = judge(dir.path(), Format::Vpc, disk, &src, "raw", BLOCK);
        random_reads_match_sequential(&view, 0x0dd_ba11, 200);
    }

    #[test]
    fn geometry_follows_the_specification_and_never_exceeds_the_size() {
        // 1 MiB: 2048 sectors → 17 sectors/track, 4 heads, 120/4 cylinders.
        assert_eq!(chs_geometry(2048), (30, 4, 17));
        // 10 GiB: 20971520 / 63 / 16 cylinders, rounded down (qemu's creator "qemu"
        // disks round up to 20806 so that the geometry covers the requested size).
        assert_eq!(chs_geometry(20_971_520), (20805, 16, 63));
        // Past 65535 × 16 × 63 sectors the geometry uses 255 sectors per track.
        assert_eq!(chs_geometry(127 << 21), (65278, 16, 255));
        assert_eq!(chs_geometry(MAX_SECTORS), (65535, 16, 255));
        for total in [1u64, 17, 1000, 99_999, 4_000_000, 300_000_000] {
            let (c, h, s) = chs_geometry(total);
            assert!(
                u64::from(c) * u64::from(h) * u64::from(s) <= total,
                "{total}"
            );
        }
    }

    #[test]
    fn footer_and_header_checksums_are_right() {
        let f = footer_bytes(&ViewId([3; 32]), 100 * MIB);
        let mut zeroed = f;
        zeroed[64..68].fill(0);
        assert_eq!(
            u32::from_be_bytes([f[64], f[65], f[66], f[67]]),
            checksum(&zeroed)
        );
        let h = header_bytes(50);
        let mut zeroed = h;
        zeroed[36..40].fill(0);
        assert_eq!(
            u32::from_be_bytes([h[36], h[37], h[38], h[39]]),
            checksum(&zeroed)
        );
    }

    #[test]
    fn qemu_reports_the_exact_size_of_an_odd_sized_disk() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 1000 MiB + 3 sectors: a size the CHS geometry cannot express.
        let size = 1000 * MIB + 1536;
        let src = raw_source(dir.path(), "src.raw", size, &[(size - 4096, 4096, 9)]);
        judge(dir.path(), Format::Vpc, raw_disk(&src), &src, "raw", BLOCK);
        let info = qemu_img(&["info", dir.path().join("view.vpc").to_str().unwrap()]);
        assert!(info.contains(&format!("({size} bytes)")), "{info}");
    }

    #[test]
    fn a_disk_larger_than_2040_gib_has_no_vhd_view() {
        let dir = tempfile::tempdir().unwrap();
        let max = MAX_SECTORS * SECTOR;
        let ok = raw_source(dir.path(), "max.raw", max, &[]);
        let view = View::new(raw_disk(&ok), Format::Vpc, ViewId([0; 32])).unwrap();
        // 1044480 BAT entries end at 4179456, the footer follows at the next 4 KiB.
        assert_eq!(view.size(), 4_182_016 + 512);
        let big = raw_source(dir.path(), "big.raw", max + 1, &[]);
        let err = View::new(raw_disk(&big), Format::Vpc, ViewId([0; 32])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("2040 GiB") && msg.contains("big.raw"), "{msg}");
    }
}
