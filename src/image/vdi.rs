//! VirtualBox VDI images, version 1.1, static (preallocated) and dynamic: a 512-byte
//! header, a block map of little-endian u32 entries (one per 1 MiB block: the index of
//! the data block in the file, or "unallocated", or "zero"), then the data blocks.
//!
//! The block map is small (4 bytes per MiB of guest disk) and its size is bounded by the
//! file's, so it is read whole at open and checked entry by entry before any read: every
//! allocated entry names a data block inside the file, and no two entries name the same
//! block (a duplicate would make two guest ranges alias one stored block; no VirtualBox
//! or qemu writer produces one, so it is refused as corruption). Reads then need no
//! locking at all.
//!
//! Header limits follow what qemu 10 accepts (checked by experiment with qemu-img; its
//! messages are quoted next to the constants), so that every image accepted here reads
//! the same as in qemu: version 1.1, 512-byte sectors, 1 MiB blocks, no per-block extra
//! data, no parent or link UUID (differencing images are refused).

use super::file::{LayerFile, map_end};
use super::tables::{BlockTable, MAX_LOADED_TABLE_BYTES, le_u32, le_u64, read_u32_table};
use super::{Error, Extent, Format, Layer, Mapping, Result, read_exact_at};
use std::fs::File;
use std::path::Path;

/// Bytes of the VDI 1.1 header (pre-header text, signature, version, then the fields up
/// to the unused tail).
const HEADER_LEN: usize = 512;
/// The signature at offset 64 (VirtualBox `VDI_IMAGE_SIGNATURE`).
const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, major in the high half; qemu: "unsupported VDI image (version 1.0)".
const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// qemu: "unsupported VDI image (sector size N is not 512)".
const SECTOR: u64 = 512;
/// qemu: "unsupported VDI image (block size N is not 1048576)".
const BLOCK_SIZE: u64 = 1 << 20;
/// qemu: "unsupported VDI image (too many blocks 4294967295, max is 536870784)".
const MAX_BLOCKS: u64 = 536_870_784;
/// qemu: "Unsupported VDI image size (size is …, max supported is 0x1fffff8000000)".
const MAX_DISK_SIZE: u64 = MAX_BLOCKS * BLOCK_SIZE;
/// Block map entry: the block has no data (reads as zeroes, or from a parent).
const BLOCK_UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry: the block was discarded and reads as zeroes.
const BLOCK_ZERO: u32 = 0xffff_fffe;

#[derive(Debug)]
pub struct VdiLayer {
    src: LayerFile,
    size: u64,
    data_offset: u64,
    /// One entry per block of the guest disk.
    bmap: BlockTable,
}

/// Opens `file` (already opened from `path`) as a VDI image.
pub fn open(file: File, path: &Path) -> Result<VdiLayer> {
    VdiLayer::new(file, path)
}

/// Where the data blocks of a VDI file start, read from its first bytes (`head`, at least
/// its 512-byte header): the header and the block map, all the reader needs besides the
/// blocks, lie below. `None` when `head` holds no VDI header.
pub fn data_start(head: &[u8]) -> Option<u64> {
    if head.len() < HEADER_LEN || le_u32(head, 64) != SIGNATURE {
        return None;
    }
    Some(u64::from(le_u32(head, 344)))
}

/// Opens a VDI file still being written front to back, once its first
/// [`data_start`] bytes are final: checked as [`open`] checks a whole file, except that
/// its blocks are checked against `assumed_len` rather than its current length (the
/// caller checks the complete file again with [`open`]).
pub fn open_arriving(file: File, path: &Path, assumed_len: u64) -> Result<VdiLayer> {
    VdiLayer::checked(file, path, Some(assumed_len))
}

impl VdiLayer {
    pub fn new(file: File, path: &Path) -> Result<VdiLayer> {
        VdiLayer::checked(file, path, None)
    }

    /// [`VdiLayer::new`], its blocks checked against `assumed_len` when given.
    fn checked(file: File, path: &Path, assumed_len: Option<u64>) -> Result<VdiLayer> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            format: Format::Vdi,
            reason,
        };
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            format: Format::Vdi,
            reason,
        };
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let file_len = assumed_len.unwrap_or(meta.len());
        if file_len < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "the file is {file_len} bytes, too short for a VDI header"
            )));
        }
        let mut h = [0u8; HEADER_LEN];
        read_exact_at(&file, path, &mut h, 0)?;
        if le_u32(&h, 64) != SIGNATURE {
            return Err(invalid("no VDI signature at offset 64".into()));
        }
        let version = le_u32(&h, 68);
        if version != VERSION_1_1 {
            return Err(unsupported(format!(
                "version {}.{} (only 1.1 is read)",
                version >> 16,
                version & 0xffff
            )));
        }
        let image_type = le_u32(&h, 76);
        let offset_bmap = u64::from(le_u32(&h, 340));
        let offset_data = u64::from(le_u32(&h, 344));
        let sector_size = u64::from(le_u32(&h, 360));
        let disk_size = le_u64(&h, 368);
        let block_size = u64::from(le_u32(&h, 376));
        let block_extra = le_u32(&h, 380);
        let blocks_in_image = u64::from(le_u32(&h, 384));
        let uuid_link = &h[424..440];
        let uuid_parent = &h[440..456];

        match image_type {
            TYPE_DYNAMIC | TYPE_STATIC => {}
            t => {
                return Err(unsupported(format!(
                    "image type {t} (only dynamic and static images are read; undo and \
                     differencing images depend on other files)"
                )));
            }
        }
        if uuid_link.iter().any(|&b| b != 0) || uuid_parent.iter().any(|&b| b != 0) {
            return Err(unsupported(
                "the image has a parent (non-null link or parent UUID); imports must be \
                 standalone images"
                    .into(),
            ));
        }
        if sector_size != SECTOR {
            return Err(unsupported(format!(
                "sector size {sector_size} is not {SECTOR}"
            )));
        }
        if block_size != BLOCK_SIZE {
            return Err(unsupported(format!(
                "block size {block_size} is not {BLOCK_SIZE}"
            )));
        }
        if block_extra != 0 {
            return Err(unsupported(format!(
                "{block_extra} bytes of extra data per block"
            )));
        }
        if offset_bmap % SECTOR != 0 || offset_data % SECTOR != 0 {
            return Err(invalid(format!(
                "block map offset {offset_bmap} or data offset {offset_data} is not sector-aligned"
            )));
        }
        if disk_size > MAX_DISK_SIZE {
            return Err(unsupported(format!(
                "disk size {disk_size} is larger than {MAX_DISK_SIZE}"
            )));
        }
        if blocks_in_image > MAX_BLOCKS {
            return Err(unsupported(format!(
                "{blocks_in_image} blocks, more than {MAX_BLOCKS}"
            )));
        }
        // VBoxManage can write sizes that are not whole sectors; qemu rounds them up.
        let size = disk_size.next_multiple_of(SECTOR);
        if size > blocks_in_image * BLOCK_SIZE {
            return Err(invalid(format!(
                "disk size {size} is larger than the {blocks_in_image} blocks of the block map"
            )));
        }
        let bmap_len = blocks_in_image * 4;
        if offset_bmap < HEADER_LEN as u64
            || offset_bmap + bmap_len > offset_data
            || offset_bmap + bmap_len > file_len
        {
            return Err(invalid(format!(
                "the block map ({blocks_in_image} entries at {offset_bmap}) does not fit \
                 between the header and the data at {offset_data} in the {file_len}-byte file"
            )));
        }

        if bmap_len > MAX_LOADED_TABLE_BYTES {
            return Err(unsupported(format!(
                "a block map of {bmap_len} bytes (at most {MAX_LOADED_TABLE_BYTES} are loaded)"
            )));
        }
        let all = read_u32_table(
            &file,
            path,
            Format::Vdi,
            offset_bmap,
            blocks_in_image,
            false,
            "block map",
        )?;
        let mut seen = vec![0u64; blocks_in_image.div_ceil(64) as usize];
        let guest_blocks = size.div_ceil(BLOCK_SIZE);
        for (i, &e) in all.iter().enumerate() {
            if e == BLOCK_UNALLOCATED || e == BLOCK_ZERO {
                continue;
            }
            let e64 = u64::from(e);
            if e64 >= blocks_in_image {
                return Err(invalid(format!(
                    "block map entry {i} names data block {e}, but the image has {blocks_in_image} blocks"
                )));
            }
            let (word, bit) = ((e64 / 64) as usize, e64 % 64);
            if seen[word] & (1 << bit) != 0 {
                return Err(invalid(format!(
                    "block map entry {i} names data block {e}, which another entry already uses"
                )));
            }
            seen[word] |= 1 << bit;
            let i = i as u64;
            if i < guest_blocks {
                let needed = BLOCK_SIZE.min(size - i * BLOCK_SIZE);
                if offset_data + e64 * BLOCK_SIZE + needed > file_len {
                    return Err(invalid(format!(
                        "block map entry {i} names data block {e}, which is past the end of \
                         the {file_len}-byte file"
                    )));
                }
            }
        }
        let mut bmap = all;
        bmap.truncate(guest_blocks as usize);
        Ok(VdiLayer {
            src: LayerFile::new(file, path, &meta),
            size,
            data_offset: offset_data,
            bmap: BlockTable(bmap.into_boxed_slice()),
        })
    }
}

/// Whether block entry `b` continues a run that started with entry `a`, `n` blocks on.
fn continues(a: u32, b: u32, n: u64) -> bool {
    match a {
        BLOCK_UNALLOCATED | BLOCK_ZERO => a == b,
        _ => b != BLOCK_UNALLOCATED && b != BLOCK_ZERO && u64::from(b) == u64::from(a) + n,
    }
}

impl Layer for VdiLayer {
    fn format(&self) -> Format {
        Format::Vdi
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
        let first = offset / BLOCK_SIZE;
        let entry = self.bmap[first as usize];
        let mut next = first + 1;
        while next * BLOCK_SIZE < end && continues(entry, self.bmap[next as usize], next - first) {
            next += 1;
        }
        let len = (next * BLOCK_SIZE).min(end) - offset;
        let mapping = match entry {
            BLOCK_UNALLOCATED => Mapping::Unallocated,
            BLOCK_ZERO => Mapping::Zero,
            e => self
                .src
                .data(self.data_offset + u64::from(e) * BLOCK_SIZE + offset % BLOCK_SIZE),
        };
        Ok(Extent { len, mapping })
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
        qemu_create(dir, "vdi", name, size, opts)
    }

    fn open_path(p: &Path) -> Result<VdiLayer> {
        open(File::open(p).unwrap(), p)
    }

    /// Offset of block map entry `i` in a qemu-made image.
    fn bmap_entry_at(p: &Path, i: usize) -> usize {
        let bytes = std::fs::read(p).unwrap();
        le_u32(&bytes, 340) as usize + 4 * i
    }

    const SCATTERED: &[&str] = &[
        "write -P 0x11 0 4k",
        "write -P 0x22 1M 1M",
        "write -P 0x33 2M 4k",
        "write -z 5M 64k",
        "write -P 0x44 7340000 100k",
        "write -P 0x55 15M 1M",
    ];

    #[test]
    fn dynamic_image_with_scattered_data_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "d.vdi", "16M", "");
        qemu_io("vdi", &p, SCATTERED);
        assert_layer_matches_qemu(Arc::new(open_path(&p).unwrap()), &p, "vdi");
    }

    #[test]
    fn static_image_reads_like_qemu_as_one_data_extent() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.vdi", "16M", "static=on");
        qemu_io("vdi", &p, SCATTERED);
        let layer = open_path(&p).unwrap();
        let ext = layer.map(0, 16 << 20).unwrap();
        assert!(ext.mapping.is_data());
        assert_eq!(ext.len, 16 << 20);
        assert_layer_matches_qemu(Arc::new(layer), &p, "vdi");
    }

    #[test]
    fn discarded_blocks_read_as_zero_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "d.vdi", "4M", "");
        qemu_io("vdi", &p, &["write -P 1 0 2M"]);
        let at = bmap_entry_at(&p, 1);
        let z = patched(&p, dir.path().join("z.vdi"), at, &BLOCK_ZERO.to_le_bytes());
        let layer = open_path(&z).unwrap();
        let ext = layer.map(1 << 20, 4 << 20).unwrap();
        assert!(matches!(ext.mapping, Mapping::Zero));
        assert_layer_matches_qemu(Arc::new(layer), &z, "vdi");
    }

    #[test]
    fn empty_and_zero_sized_images_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, size) in [("empty.vdi", "10M"), ("zero.vdi", "0")] {
            let p = create(dir.path(), name, size, "");
            assert_layer_matches_qemu(Arc::new(open_path(&p).unwrap()), &p, "vdi");
        }
    }

    #[test]
    fn size_one_byte_past_a_block_is_rounded_to_a_sector_as_qemu_does() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "odd.vdi", "1048577", "");
        qemu_io("vdi", &p, &["write -P 0x77 1M 512", "write -P 0x78 0 512"]);
        let layer = open_path(&p).unwrap();
        assert_eq!(layer.virtual_size(), 1049088);
        assert_layer_matches_qemu(Arc::new(layer), &p, "vdi");
        // A size that is not a whole sector in the header is rounded up, as qemu does.
        let at = 368;
        let odd = patched(
            &p,
            dir.path().join("o2.vdi"),
            at,
            &1_049_000u64.to_le_bytes(),
        );
        assert_eq!(open_path(&odd).unwrap().virtual_size(), 1049088);
        assert_eq!(qemu_virtual_size(&odd, "vdi"), 1049088);
    }

    #[test]
    fn multi_gib_sparse_image_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "big.vdi", "5G", "");
        qemu_io(
            "vdi",
            &p,
            &[
                "write -P 1 0 4k",
                "write -P 2 4294963200 8k",
                "write -P 3 5368705024 4k",
            ],
        );
        let layer = Arc::new(open_path(&p).unwrap());
        let ext = layer.map(1 << 20, 5 << 30).unwrap();
        assert!(matches!(ext.mapping, Mapping::Unallocated));
        assert_eq!(ext.len, (4 << 30) - (2 << 20));
        assert_layer_matches_qemu(layer, &p, "vdi");
    }

    #[test]
    fn concurrent_reads_from_many_threads_agree_with_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "c.vdi", "16M", "");
        qemu_io("vdi", &p, SCATTERED);
        let disk = Disk::new(vec![Arc::new(open_path(&p).unwrap())]);
        assert_concurrent_reads_match(&disk, &p, "vdi");
    }

    #[test]
    fn truncated_file_is_an_error() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "t.vdi", "4M", "");
        qemu_io("vdi", &p, &["write -P 1 1M 1M"]);
        let short = copy_truncated(&p, dir.path().join("h.vdi"), 300);
        assert!(
            open_path(&short)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        let len = std::fs::metadata(&p).unwrap().len();
        let cut = copy_truncated(&p, dir.path().join("c.vdi"), len - 4096);
        let err = open_path(&cut).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(err.to_string().contains("c.vdi"), "{err}");
    }

    #[test]
    fn block_map_entry_out_of_range_is_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "r.vdi", "4M", "");
        qemu_io("vdi", &p, &["write -P 1 0 1M"]);
        let bad = patched(
            &p,
            dir.path().join("b.vdi"),
            bmap_entry_at(&p, 0),
            &7u32.to_le_bytes(),
        );
        let err = open_path(&bad).unwrap_err();
        assert!(err.to_string().contains("names data block 7"), "{err}");
        // In range of the block count, but past the end of the file.
        let bad = patched(
            &p,
            dir.path().join("e.vdi"),
            bmap_entry_at(&p, 0),
            &3u32.to_le_bytes(),
        );
        let err = open_path(&bad).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }

    #[test]
    fn duplicate_block_map_entries_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "d.vdi", "4M", "");
        qemu_io("vdi", &p, &["write -P 1 0 1M", "write -P 2 2M 1M"]);
        // Entry 2 names block 1; make entry 3 name it too.
        let bad = patched(
            &p,
            dir.path().join("b.vdi"),
            bmap_entry_at(&p, 3),
            &1u32.to_le_bytes(),
        );
        let err = open_path(&bad).unwrap_err();
        assert!(err.to_string().contains("already uses"), "{err}");
    }

    #[test]
    fn block_map_past_the_end_of_the_file_is_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "m.vdi", "4M", "");
        // The largest block count qemu allows, in a file of a few KiB.
        let bad = patched(
            &p,
            dir.path().join("b.vdi"),
            384,
            &(MAX_BLOCKS as u32).to_le_bytes(),
        );
        let err = open_path(&bad).unwrap_err();
        assert!(err.to_string().contains("block map"), "{err}");
    }

    #[test]
    fn sizes_near_u64_max_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.vdi", "4M", "");
        for size in [u64::MAX, u64::MAX - 511, MAX_DISK_SIZE + 1, 5 << 20] {
            let bad = patched(&p, dir.path().join("s2.vdi"), 368, &size.to_le_bytes());
            assert!(open_path(&bad).is_err(), "size {size}");
        }
    }

    #[test]
    fn differencing_images_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "p.vdi", "4M", "");
        let bad = patched(&p, dir.path().join("b.vdi"), 440, &[1u8; 16]);
        assert!(matches!(
            open_path(&bad).unwrap_err(),
            Error::Unsupported { .. }
        ));
        let bad = patched(&p, dir.path().join("t.vdi"), 76, &4u32.to_le_bytes());
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
        let p = create(dir.path(), "x.vdi", "8M", "");
        qemu_io("vdi", &p, &["write -P 1 0 4k", "write -P 2 3M 4k"]);
        assert_corruption_never_panics(&p, |q| Ok(Arc::new(open_path(q)?)), 400);
    }

    #[test]
    fn huge_block_map_in_a_sparse_file_is_refused_without_loading_it() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "h.vdi", "4M", "");
        // 2 GiB of block map, with room made for it in a sparse 5 GiB file.
        let bad = patched(
            &p,
            dir.path().join("b.vdi"),
            384,
            &(MAX_BLOCKS as u32).to_le_bytes(),
        );
        let bad = patched(
            &bad,
            dir.path().join("b2.vdi"),
            344,
            &0xffff_fe00u32.to_le_bytes(),
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(5 << 30)
            .unwrap();
        let err = open_path(&bad).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("block map of"), "{err}");
    }

    #[test]
    fn debug_output_summarises_the_block_map() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "big.vdi", "5G", "");
        let layer = open_path(&p).unwrap();
        let text = format!("{layer:?}");
        assert!(text.contains("BlockTable(5120 entries)"), "{text}");
        assert!(text.len() < 1000, "{text}");
    }
}
