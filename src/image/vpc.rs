//! VHD images (Microsoft's "Virtual Hard Disk Image Format Specification", qemu's `vpc`
//! driver): fixed disks (the guest disk followed by a 512-byte footer) and dynamic disks
//! (a footer copy at offset 0, a dynamic disk header, a block allocation table (BAT) of
//! big-endian sector offsets, then blocks made of a sector bitmap and the data).
//!
//! The virtual size is the one qemu reports, because users compare against qemu-img and
//! qemu is what boots the exported files. qemu 10 (checked by experiment) takes the
//! size from the CHS geometry when the footer's creator application is `vpc ` (Virtual PC)
//! or `qemu` (qemu-img without `force_size`), unless the geometry is the maximum one
//! (65535/16/255), and from the footer's current size, rounded down to a sector, for every
//! other creator (`qem2`, `win `, `d2v `, `tap\0`, …).
//!
//! Like qemu, reads of an allocated block return its stored bytes without consulting the
//! block's sector bitmap (qemu sets every bit when it allocates a block, and the bitmap
//! only matters for differencing disks, which are refused: they name a parent file).
//!
//! The BAT (4 bytes per 2 MiB block by default) is bounded by the file size, so it is read
//! whole at open and every entry is checked to lie inside the file, with no two blocks
//! overlapping; reads take no lock.

use super::file::{LayerFile, map_end};
use super::tables::{BlockTable, MAX_LOADED_TABLE_BYTES, be_u16, be_u32, be_u64, read_u32_table};
use super::{Error, Extent, Format, Layer, Mapping, Result, read_exact_at};
use std::fs::File;
use std::path::Path;

const SECTOR: u64 = 512;
/// The footer (spec: "Hard Disk Footer Format"), 512 bytes, at the end of every VHD and
/// copied at offset 0 of dynamic ones.
const FOOTER_LEN: u64 = 512;
const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Spec: the dynamic disk header is 1024 bytes.
const DYN_HEADER_LEN: usize = 1024;
const DYN_HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Spec "Disk Type" values.
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
/// BAT entry of a block with no data.
const BAT_UNALLOCATED: u32 = 0xffff_ffff;
/// Creators whose images qemu sizes by CHS geometry (qemu 10, by experiment).
const CHS_CREATORS: [&[u8; 4]; 2] = [b"vpc ", b"qemu"];
/// The largest geometry (spec: 65535 cylinders, 16 heads, 255 sectors per track);
/// qemu takes the current size instead of a geometry this large.
const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// qemu refuses larger images with "File too large" (2040 GiB).
const MAX_SECTORS: u64 = 0xff00_0000;

#[derive(Debug)]
enum Kind {
    Fixed,
    Dynamic {
        block_size: u64,
        /// Bytes of the sector bitmap at the start of each block (rounded to a sector).
        bitmap_len: u64,
        /// One entry per block of the guest disk.
        bat: BlockTable,
    },
}

#[derive(Debug)]
pub struct VpcLayer {
    src: LayerFile,
    size: u64,
    kind: Kind,
}

/// Opens `file` (already opened from `path`) as a VHD image.
pub fn open(file: File, path: &Path) -> Result<VpcLayer> {
    VpcLayer::new(file, path)
}

/// The spec's checksum: the one's complement of the byte sum, the checksum field (at
/// `at`, 4 bytes) counted as zero.
fn checksum(b: &[u8], at: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// Where the blocks of a dynamic VHD file start, read from its first bytes (`head`:
/// the footer copy and the dynamic disk header): where its block table ends, which is
/// all the reader needs besides the blocks. `None` when `head` starts no dynamic VHD.
pub fn data_start(head: &[u8]) -> Option<u64> {
    let footer = head.get(..FOOTER_LEN as usize)?;
    if &footer[..8] != FOOTER_COOKIE || be_u32(footer, 60) != DISK_DYNAMIC {
        return None;
    }
    let at = usize::try_from(be_u64(footer, 16)).ok()?;
    let h = head.get(at..at.checked_add(DYN_HEADER_LEN)?)?;
    if &h[..8] != DYN_HEADER_COOKIE {
        return None;
    }
    let table_end = be_u64(h, 16).checked_add(u64::from(be_u32(h, 28)) * 4)?;
    Some(table_end.next_multiple_of(SECTOR))
}

/// Opens a dynamic VHD file still being written front to back, once its first
/// [`data_start`] bytes are final: checked as [`open`] checks a whole file, except that
/// its blocks are checked against `assumed_len` rather than its current length (the
/// caller checks the complete file again with [`open`]).
pub fn open_arriving(file: File, path: &Path, assumed_len: u64) -> Result<VpcLayer> {
    VpcLayer::checked(file, path, Some(assumed_len))
}

impl VpcLayer {
    pub fn new(file: File, path: &Path) -> Result<VpcLayer> {
        VpcLayer::checked(file, path, None)
    }

    /// [`VpcLayer::new`], its blocks checked against `assumed_len` when given.
    fn checked(file: File, path: &Path, assumed_len: Option<u64>) -> Result<VpcLayer> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            format: Format::Vpc,
            reason,
        };
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            format: Format::Vpc,
            reason,
        };
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let file_len = assumed_len.unwrap_or(meta.len());
        if file_len < FOOTER_LEN {
            return Err(invalid(format!(
                "the file is {file_len} bytes, too short for a VHD footer"
            )));
        }
        // A dynamic disk has a copy of its footer at 0; a fixed one only at the end.
        let mut footer = [0u8; FOOTER_LEN as usize];
        read_exact_at(&file, path, &mut footer, 0)?;
        if &footer[..8] != FOOTER_COOKIE {
            read_exact_at(&file, path, &mut footer, file_len - FOOTER_LEN)?;
            if &footer[..8] != FOOTER_COOKIE {
                return Err(invalid(
                    "no VHD footer (\"conectix\") at the start or the end of the file".into(),
                ));
            }
        }
        let stored = be_u32(&footer, 64);
        if checksum(&footer, 64) != stored {
            return Err(invalid("the footer checksum is wrong".into()));
        }
        let data_offset = be_u64(&footer, 16);
        let creator: &[u8] = &footer[28..32];
        let current_size = be_u64(&footer, 48);
        let geometry_sectors =
            u64::from(be_u16(&footer, 56)) * u64::from(footer[58]) * u64::from(footer[59]);
        let disk_type = be_u32(&footer, 60);

        let use_chs = CHS_CREATORS.iter().any(|c| &c[..] == creator)
            && geometry_sectors != MAX_GEOMETRY_SECTORS;
        let sectors = if use_chs {
            geometry_sectors
        } else {
            current_size / SECTOR
        };
        if sectors > MAX_SECTORS {
            return Err(unsupported(format!(
                "{} bytes is larger than the VHD maximum of {} bytes",
                u128::from(sectors) * u128::from(SECTOR),
                MAX_SECTORS * SECTOR
            )));
        }
        let size = sectors * SECTOR;

        let kind = match disk_type {
            DISK_FIXED => {
                if size > file_len - FOOTER_LEN {
                    return Err(invalid(format!(
                        "the footer says {size} bytes but the file holds only {}",
                        file_len - FOOTER_LEN
                    )));
                }
                Kind::Fixed
            }
            DISK_DYNAMIC => {
                Self::dynamic(&file, path, file_len, data_offset, size).map_err(|e| match e {
                    Reason::Invalid(r) => invalid(r),
                    Reason::Unsupported(r) => unsupported(r),
                    Reason::Failed(e) => e,
                })?
            }
            DISK_DIFFERENCING => {
                return Err(unsupported(
                    "a differencing disk depends on a parent file; imports must be standalone \
                     images (flatten it first with `qemu-img convert`)"
                        .into(),
                ));
            }
            t => return Err(invalid(format!("unknown disk type {t}"))),
        };
        Ok(VpcLayer {
            src: LayerFile::new(file, path, &meta),
            size,
            kind,
        })
    }

    fn dynamic(
        file: &File,
        path: &Path,
        file_len: u64,
        header_offset: u64,
        size: u64,
    ) -> Result<Kind, Reason> {
        if header_offset
            .checked_add(DYN_HEADER_LEN as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(Reason::Invalid(format!(
                "the dynamic disk header offset {header_offset} is past the end of the file"
            )));
        }
        let mut h = [0u8; DYN_HEADER_LEN];
        read_exact_at(file, path, &mut h, header_offset).map_err(Reason::Failed)?;
        if &h[..8] != DYN_HEADER_COOKIE {
            return Err(Reason::Invalid(format!(
                "no dynamic disk header (\"cxsparse\") at offset {header_offset}"
            )));
        }
        let table_offset = be_u64(&h, 16);
        let max_entries = u64::from(be_u32(&h, 28));
        let block_size = u64::from(be_u32(&h, 32));
        if !block_size.is_power_of_two() || block_size < SECTOR {
            return Err(Reason::Invalid(format!(
                "block size {block_size} is not a power of 2 of at least {SECTOR}"
            )));
        }
        let blocks = size.div_ceil(block_size);
        if blocks > max_entries {
            return Err(Reason::Invalid(format!(
                "the block table has {max_entries} entries, too few for {size} bytes"
            )));
        }
        if table_offset
            .checked_add(max_entries * 4)
            .is_none_or(|end| end > file_len)
        {
            return Err(Reason::Invalid(format!(
                "the block table ({max_entries} entries at {table_offset}) is past the end of \
                 the {file_len}-byte file"
            )));
        }
        if blocks * 4 > MAX_LOADED_TABLE_BYTES {
            return Err(Reason::Unsupported(format!(
                "a block table of {blocks} entries (at most {} are loaded)",
                MAX_LOADED_TABLE_BYTES / 4
            )));
        }
        let bat = read_u32_table(
            file,
            path,
            Format::Vpc,
            table_offset,
            blocks,
            true,
            "block table",
        )
        .map_err(Reason::Failed)?;
        // Spec: one bit per sector, padded to a whole sector.
        let bitmap_len = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_UNALLOCATED {
                continue;
            }
            let i = i as u64;
            let needed = block_size.min(size - i * block_size);
            if u64::from(e) * SECTOR + bitmap_len + needed > file_len {
                return Err(Reason::Invalid(format!(
                    "block table entry {i} points to sector {e}, past the end of the \
                     {file_len}-byte file"
                )));
            }
        }
        check_blocks_distinct(&bat, (bitmap_len + block_size) / SECTOR, file_len)?;
        Ok(Kind::Dynamic {
            block_size,
            bitmap_len,
            bat: BlockTable(bat.into_boxed_slice()),
        })
    }
}

/// Refuses a BAT whose allocated entries name overlapping blocks (of `block_sectors`
/// sectors, bitmap included). Each block holds one part of the disk; a block named by
/// every entry would let a small file describe terabytes of data (and make a
/// conversion read them all). Allocated blocks must all fit in the file, which bounds
/// the sorted copy before it is made.
fn check_blocks_distinct(bat: &[u32], block_sectors: u64, file_len: u64) -> Result<(), Reason> {
    let allocated = bat.iter().filter(|&&e| e != BAT_UNALLOCATED).count() as u64;
    // The last block may be cut short by the disk's end: count the others in full.
    if allocated
        .saturating_sub(1)
        .saturating_mul(block_sectors * SECTOR)
        > file_len
    {
        return Err(Reason::Invalid(format!(
            "the block table names {allocated} blocks, more than the {file_len}-byte file \
             holds, so some are shared"
        )));
    }
    let mut starts: Vec<u32> = bat
        .iter()
        .copied()
        .filter(|&e| e != BAT_UNALLOCATED)
        .collect();
    starts.sort_unstable();
    match starts
        .windows(2)
        .find(|w| u64::from(w[1]) - u64::from(w[0]) < block_sectors)
    {
        Some(w) => Err(Reason::Invalid(format!(
            "the blocks at sectors {} and {} of the block table overlap",
            w[0], w[1]
        ))),
        None => Ok(()),
    }
}

/// Why the dynamic part was refused, before the path is attached.
enum Reason {
    Invalid(String),
    Unsupported(String),
    Failed(Error),
}

impl Layer for VpcLayer {
    fn format(&self) -> Format {
        Format::Vpc
    }

    /// A fixed disk is the guest disk followed by its footer.
    fn guest_at_file_offsets(&self) -> bool {
        matches!(self.kind, Kind::Fixed)
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

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = map_end(&self.src.path, offset, max_len, self.size)?;
        let data = |at: u64| self.src.data(at);
        match &self.kind {
            // Like qemu, the stored bytes are the guest's, holes included.
            Kind::Fixed => Ok(Extent {
                len: end - offset,
                mapping: data(offset),
            }),
            Kind::Dynamic {
                block_size,
                bitmap_len,
                bat,
            } => {
                let bs = *block_size;
                let first = offset / bs;
                let entry = bat[first as usize];
                let host = |e: u32| u64::from(e) * SECTOR + bitmap_len;
                let mut next = first + 1;
                // Each block's sector bitmap sits between it and the next, so stored
                // data never continues across a block; unallocated runs do merge.
                if entry == BAT_UNALLOCATED {
                    while next * bs < end && bat[next as usize] == BAT_UNALLOCATED {
                        next += 1;
                    }
                }
                let len = (next * bs).min(end) - offset;
                let mapping = if entry == BAT_UNALLOCATED {
                    Mapping::Unallocated
                } else {
                    data(host(entry) + offset % bs)
                };
                Ok(Extent { len, mapping })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Disk;
    use crate::image::tables::test_support::*;
    use crate::testutil::{have_qemu, qemu_create, qemu_io};
    use std::path::PathBuf;
    use std::sync::Arc;

    fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
        qemu_create(dir, "vpc", name, size, opts)
    }

    fn open_path(p: &Path) -> Result<VpcLayer> {
        open(File::open(p).unwrap(), p)
    }

    /// A copy of `src` whose footer(s) get `edit` applied and their checksum fixed.
    fn edit_footer(src: &Path, dst: PathBuf, edit: impl Fn(&mut [u8])) -> PathBuf {
        let mut d = std::fs::read(src).unwrap();
        let n = d.len();
        let mut at = vec![n - 512];
        if &d[..8] == FOOTER_COOKIE {
            at.push(0);
        }
        for a in at {
            let f = &mut d[a..a + 512];
            edit(f);
            let c = checksum(f, 64);
            f[64..68].copy_from_slice(&c.to_be_bytes());
        }
        std::fs::write(&dst, d).unwrap();
        dst
    }

    const SCATTERED: &[&str] = &[
        "write -P 0x11 0 4k",
        "write -P 0x22 2M 2M",
        "write -P 0x33 4M 4k",
        "write -z 7M 64k",
        "write -P 0x44 10485000 100k",
        "write -P 0x55 15M 1M",
    ];

    #[test]
    fn dynamic_image_with_scattered_data_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, opts) in [("chs.vpc", ""), ("exact.vpc", "force_size=on")] {
            let p = create(dir.path(), name, "16M", opts);
            qemu_io("vpc", &p, SCATTERED);
            assert_layer_matches_qemu(Arc::new(open_path(&p).unwrap()), &p, "vpc");
        }
    }

    #[test]
    fn fixed_image_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, opts) in [
            ("chs.vpc", "subformat=fixed"),
            ("exact.vpc", "subformat=fixed,force_size=on"),
        ] {
            let p = create(dir.path(), name, "16M", opts);
            qemu_io("vpc", &p, SCATTERED);
            let layer = open_path(&p).unwrap();
            assert!(matches!(layer.kind, Kind::Fixed));
            assert_layer_matches_qemu(Arc::new(layer), &p, "vpc");
        }
    }

    #[test]
    fn size_follows_chs_for_qemu_and_virtual_pc_creators_and_the_footer_for_others() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 1000 MiB exact, with the geometry qemu-img writes for it without force_size
        // (2031/16/63 sectors is less than the size; 2032 is more).
        let p = create(dir.path(), "f.vpc", "1000M", "force_size=on");
        for creator in [
            b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"tap\0", b"vbox",
        ] {
            let q = edit_footer(&p, dir.path().join("c.vpc"), |f| {
                f[28..32].copy_from_slice(creator);
                f[56..60].copy_from_slice(&[0x07, 0xef, 16, 63]);
            });
            let ours = open_path(&q).unwrap().virtual_size();
            assert_eq!(ours, qemu_virtual_size(&q, "vpc"), "creator {creator:?}");
            let chs = CHS_CREATORS.contains(&creator);
            assert_eq!(
                ours,
                if chs {
                    2031 * 16 * 63 * 512
                } else {
                    1000 << 20
                }
            );
        }
        // The maximum geometry means "use the current size" even for qemu's own creator.
        let q = edit_footer(&p, dir.path().join("m.vpc"), |f| {
            f[28..32].copy_from_slice(b"qemu");
        });
        assert_eq!(open_path(&q).unwrap().virtual_size(), 1000 << 20);
        assert_eq!(qemu_virtual_size(&q, "vpc"), 1000 << 20);
        // A current size that is not whole sectors is rounded down, as qemu does.
        let q = edit_footer(&p, dir.path().join("r.vpc"), |f| {
            f[48..56].copy_from_slice(&((1000u64 << 20) + 100).to_be_bytes());
        });
        assert_eq!(open_path(&q).unwrap().virtual_size(), 1000 << 20);
        assert_eq!(qemu_virtual_size(&q, "vpc"), 1000 << 20);
    }

    #[test]
    fn empty_and_zero_sized_images_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, size, opts) in [
            ("empty.vpc", "10M", ""),
            ("zero.vpc", "0", ""),
            ("zero-exact.vpc", "0", "force_size=on"),
        ] {
            let p = create(dir.path(), name, size, opts);
            assert_layer_matches_qemu(Arc::new(open_path(&p).unwrap()), &p, "vpc");
        }
        // A zero-sized fixed disk is a lone footer, which qemu 10 misreads as a dynamic
        // disk and cannot open; it is simply an empty disk.
        let p = create(dir.path(), "zero-fixed.vpc", "0", "subformat=fixed");
        assert_eq!(open_path(&p).unwrap().virtual_size(), 0);
    }

    #[test]
    fn size_one_byte_past_a_block_is_rounded_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, opts, expected) in [
            ("exact.vpc", "force_size=on", 2097664),
            ("chs.vpc", "", 2123776),
        ] {
            let p = create(dir.path(), name, "2097153", opts);
            qemu_io("vpc", &p, &["write -P 0x77 2M 512", "write -P 0x78 0 512"]);
            let layer = open_path(&p).unwrap();
            assert_eq!(layer.virtual_size(), expected);
            assert_layer_matches_qemu(Arc::new(layer), &p, "vpc");
        }
    }

    #[test]
    fn multi_gib_sparse_image_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "big.vpc", "5G", "force_size=on");
        qemu_io(
            "vpc",
            &p,
            &[
                "write -P 1 0 4k",
                "write -P 2 4294963200 8k",
                "write -P 3 5368705024 4k",
            ],
        );
        let layer = Arc::new(open_path(&p).unwrap());
        let ext = layer.map(2 << 20, 5 << 30).unwrap();
        assert!(matches!(ext.mapping, Mapping::Unallocated));
        assert_eq!(ext.len, (4 << 30) - (4 << 20));
        assert_layer_matches_qemu(layer, &p, "vpc");
    }

    #[test]
    fn concurrent_reads_from_many_threads_agree_with_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "c.vpc", "16M", "force_size=on");
        qemu_io("vpc", &p, SCATTERED);
        let disk = Disk::new(vec![Arc::new(open_path(&p).unwrap())]);
        assert_concurrent_reads_match(&disk, &p, "vpc");
    }

    #[test]
    fn differencing_disks_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "d.vpc", "4M", "");
        let q = edit_footer(&p, dir.path().join("diff.vpc"), |f| {
            f[60..64].copy_from_slice(&DISK_DIFFERENCING.to_be_bytes());
        });
        let err = open_path(&q).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("differencing"), "{err}");
    }

    #[test]
    fn wrong_footer_checksum_is_refused_as_qemu_does() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "k.vpc", "4M", "");
        let q = patched(&p, dir.path().join("bad.vpc"), 64, &[0, 0, 0, 0]);
        assert!(open_path(&q).unwrap_err().to_string().contains("checksum"));
    }

    #[test]
    fn truncated_file_is_an_error() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "t.vpc", "8M", "");
        qemu_io("vpc", &p, &["write -P 1 2M 1M"]);
        let short = copy_truncated(&p, dir.path().join("h.vpc"), 100);
        assert!(
            open_path(&short)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        let cut = copy_truncated(&p, dir.path().join("c.vpc"), 1 << 20);
        let err = open_path(&cut).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(err.to_string().contains("c.vpc"), "{err}");
        // A fixed disk cut short: its footer is gone, and then nothing says it is a VHD.
        let f = create(dir.path(), "f.vpc", "4M", "subformat=fixed");
        let cut = copy_truncated(&f, dir.path().join("fc.vpc"), 2 << 20);
        assert!(open_path(&cut).is_err());
    }

    #[test]
    fn block_table_past_the_end_is_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "b.vpc", "8M", "");
        qemu_io("vpc", &p, &["write -P 1 2M 1M"]);
        let d = std::fs::read(&p).unwrap();
        let table = be_u64(&d, 512 + 16) as usize;
        // An entry far past the end of the file.
        let q = patched(
            &p,
            dir.path().join("e.vpc"),
            table + 4,
            &0x7fff_0000u32.to_be_bytes(),
        );
        let err = open_path(&q).unwrap_err();
        assert!(err.to_string().contains("block table entry 1"), "{err}");
        // The table itself past the end.
        let q = patched(
            &p,
            dir.path().join("t.vpc"),
            512 + 16,
            &(1u64 << 40).to_be_bytes(),
        );
        let err = open_path(&q).unwrap_err();
        assert!(err.to_string().contains("block table"), "{err}");
        // A table far larger than the file.
        let q = patched(
            &p,
            dir.path().join("m.vpc"),
            512 + 28,
            &u32::MAX.to_be_bytes(),
        );
        assert!(open_path(&q).is_err());
    }

    #[test]
    fn sizes_near_u64_max_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.vpc", "4M", "force_size=on");
        let f = create(dir.path(), "sf.vpc", "4M", "subformat=fixed,force_size=on");
        for src in [&p, &f] {
            for size in [u64::MAX, u64::MAX - 511, 2041u64 << 30, 1 << 40] {
                let q = edit_footer(src, dir.path().join("q.vpc"), |h| {
                    h[48..56].copy_from_slice(&size.to_be_bytes());
                });
                assert!(open_path(&q).is_err(), "size {size}");
            }
        }
    }

    #[test]
    fn corrupted_images_give_errors_never_panics() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, size, opts) in [("d.vpc", "3M", ""), ("f.vpc", "1M", "subformat=fixed")] {
            let p = create(dir.path(), name, size, opts);
            qemu_io("vpc", &p, &["write -P 1 0 4k", "write -P 2 600k 4k"]);
            assert_corruption_never_panics(&p, |q| Ok(Arc::new(open_path(q)?)), 300);
        }
    }

    #[test]
    fn huge_block_table_in_a_sparse_file_is_refused_without_loading_it() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "h.vpc", "4M", "force_size=on");
        // 2040 GiB in 512-byte blocks: 16 GiB of table, room made in a sparse file.
        let q = edit_footer(&p, dir.path().join("q.vpc"), |f| {
            f[48..56].copy_from_slice(&(2040u64 << 30).to_be_bytes());
        });
        let q = patched(
            &q,
            dir.path().join("q2.vpc"),
            512 + 28,
            &u32::MAX.to_be_bytes(),
        );
        let q = patched(
            &q,
            dir.path().join("q3.vpc"),
            512 + 32,
            &512u32.to_be_bytes(),
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&q)
            .unwrap()
            .set_len(20 << 30)
            .unwrap();
        let err = open_path(&q).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("block table of"), "{err}");
    }
}
