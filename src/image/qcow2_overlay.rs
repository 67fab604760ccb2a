//! An empty qcow2 v3 overlay: a file that names a backing file and allocates no cluster,
//! so every guest read falls through to the backing chain (and reads zeroes past the end
//! of a shorter backing disk). This is the top layer of a resized revision.
//!
//! The bytes are those `qemu-img create -f qcow2 -b BACKING -F qcow2 FILE SIZE` writes
//! with its defaults (64 KiB clusters, 16-bit refcounts, zlib, no lazy refcounts), once
//! the backing file name is rewritten in place as pcocc does (relative, `../../data/XX/H`).
//! Same parent and same size therefore give the same bytes, hence the same layer name,
//! as a layer real pcocc made with the qemu it runs:
//!
//! ```text
//! cluster 0   header (112 bytes, compression_type included)
//!             extension 0xe2792aca "backing file format name" = "qcow2"
//!             extension 0x6803f857 "feature name table"
//!             end of extensions, then the backing file name
//! cluster 1   refcount table: one entry, the block at cluster 2
//! cluster 2   refcount block: clusters 0..3+L1 clusters have refcount 1
//! cluster 3…  L1 table, all entries zero; the file ends with the table
//! ```
//!
//! A zero-sized disk has no L1 table at all (size 0, offset 0): the file is three
//! clusters long.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::qcow2_layout::{CLUSTER_BITS, CLUSTER_SIZE, MAX_VIRTUAL_SIZE, SECTOR_SIZE, align_up};
use super::{Error, Format, Result};

/// qcow2 magic, `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
/// Header version.
const VERSION: u32 = 3;
/// `refcount_order` 4: 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// Header length with the `compression_type` byte and its padding to 8 bytes.
const HEADER_LENGTH: usize = 112;
/// Header extension type: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: names of the feature bits.
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Length of one feature name table entry: type, bit number, 46 bytes of name.
const FEATURE_ENTRY: usize = 48;
/// Feature name table entry types.
const INCOMPATIBLE: u8 = 0;
const COMPATIBLE: u8 = 1;
const AUTOCLEAR: u8 = 2;
/// The feature names qemu (10.x) describes in the table it writes into new images.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (INCOMPATIBLE, 0, "dirty bit"),
    (INCOMPATIBLE, 1, "corrupt bit"),
    (INCOMPATIBLE, 2, "external data file"),
    (INCOMPATIBLE, 3, "compression type"),
    (INCOMPATIBLE, 4, "extended L2 entries"),
    (COMPATIBLE, 0, "lazy refcounts"),
    (AUTOCLEAR, 0, "bitmaps"),
    (AUTOCLEAR, 1, "raw external data"),
];
/// Longest backing file name qemu accepts (`backing_file_size` up to 1023).
pub(crate) const MAX_BACKING_NAME: usize = 1023;
/// Longest backing format name that fits the extension qemu reads.
const MAX_FORMAT_NAME: usize = 16;
/// log2 of the guest clusters one L2 table maps (64 KiB clusters, 8-byte entries).
const L2_BITS: u32 = CLUSTER_BITS - 3;
/// Bytes of one refcount entry.
const REFCOUNT_BYTES: usize = 2;

/// An empty overlay of a given size on a given backing file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmptyOverlay {
    virtual_size: u64,
    backing: String,
    backing_format: String,
}

impl EmptyOverlay {
    /// An overlay of `virtual_size` bytes (rounded up to whole sectors, as qemu does) on
    /// the file named `backing`, whose format is `backing_format`. `path` names the file
    /// to be written, in errors.
    pub fn new(
        path: &Path,
        virtual_size: u64,
        backing: &str,
        backing_format: &str,
    ) -> Result<EmptyOverlay> {
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            format: Format::Qcow2,
            reason,
        };
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(unsupported(format!(
                "a virtual size of {virtual_size} bytes is above the {MAX_VIRTUAL_SIZE} bytes \
                 a qcow2 file with 64 KiB clusters can hold"
            )));
        }
        if backing.is_empty() || backing.len() > MAX_BACKING_NAME || backing.contains('\0') {
            return Err(unsupported(format!(
                "backing file name of {} bytes (1 to {MAX_BACKING_NAME}, no NUL)",
                backing.len()
            )));
        }
        if backing_format.is_empty()
            || backing_format.len() > MAX_FORMAT_NAME
            || backing_format.contains('\0')
        {
            return Err(unsupported(format!(
                "backing format name {backing_format:?}"
            )));
        }
        Ok(EmptyOverlay {
            virtual_size: align_up(virtual_size, SECTOR_SIZE),
            backing: backing.to_string(),
            backing_format: backing_format.to_string(),
        })
    }

    /// The virtual size written in the header.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn l1_entries(&self) -> u64 {
        self.virtual_size
            .div_ceil(CLUSTER_SIZE)
            .div_ceil(1 << L2_BITS)
    }

    fn l1_clusters(&self) -> u64 {
        (self.l1_entries() * 8).div_ceil(CLUSTER_SIZE)
    }

    fn l1_offset(&self) -> u64 {
        if self.l1_entries() == 0 {
            0
        } else {
            3 * CLUSTER_SIZE
        }
    }

    /// Length of the file: the L1 table ends it.
    pub fn file_size(&self) -> u64 {
        3 * CLUSTER_SIZE + self.l1_entries() * 8
    }

    /// The first three clusters: header, refcount table, refcount block. The rest of the
    /// file (the L1 table) is zeroes.
    pub fn prefix(&self) -> Vec<u8> {
        let cluster = CLUSTER_SIZE as usize;
        let mut out = vec![0u8; 3 * cluster];
        self.fill_header(&mut out[..cluster]);
        // Refcount table: its one block is cluster 2.
        put_u64(&mut out[cluster..], 0, 2 * CLUSTER_SIZE);
        // Refcount block: header, table, block and the L1 clusters are in use.
        let used = 3 + self.l1_clusters();
        let block = &mut out[2 * cluster..];
        for i in 0..used as usize {
            block[i * REFCOUNT_BYTES..(i + 1) * REFCOUNT_BYTES]
                .copy_from_slice(&1u16.to_be_bytes());
        }
        out
    }

    fn fill_header(&self, h: &mut [u8]) {
        BackedHeader {
            virtual_size: self.virtual_size,
            l1_entries: self.l1_entries(),
            l1_offset: self.l1_offset(),
            refcount_table_offset: CLUSTER_SIZE,
            refcount_table_clusters: 1,
            backing: &self.backing,
            backing_format: &self.backing_format,
        }
        .fill(h);
    }

    /// Writes the whole file into the empty file `out` (known as `path`): the three
    /// clusters, then the length that the zero L1 table gives (a hole).
    pub fn write_to(&self, out: &File, path: &Path) -> Result<()> {
        out.write_all_at(&self.prefix(), 0)
            .and_then(|()| out.set_len(self.file_size()))
            .map_err(|e| Error::io(path, e))
    }
}

/// The header cluster of a qcow2 v3 file with a backing file, as qemu writes it: the
/// 112-byte header, the backing format and feature name extensions, the end marker, then
/// the backing file name. The callers check the names' lengths ([`EmptyOverlay::new`]).
pub(crate) struct BackedHeader<'a> {
    pub virtual_size: u64,
    pub l1_entries: u64,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u64,
    pub backing: &'a str,
    pub backing_format: &'a str,
}

impl BackedHeader<'_> {
    /// Writes the header into `h`, the first cluster of the file (zero-filled).
    pub fn fill(&self, h: &mut [u8]) {
        let mut ext = Vec::new();
        push_extension(&mut ext, EXT_BACKING_FORMAT, self.backing_format.as_bytes());
        let mut names = Vec::with_capacity(FEATURE_NAMES.len() * FEATURE_ENTRY);
        for (kind, bit, name) in FEATURE_NAMES {
            let mut entry = [0u8; FEATURE_ENTRY];
            entry[0] = kind;
            entry[1] = bit;
            entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
            names.extend_from_slice(&entry);
        }
        push_extension(&mut ext, EXT_FEATURE_NAMES, &names);
        // The end-of-extensions marker: type 0, length 0.
        ext.extend_from_slice(&[0u8; 8]);
        let backing_offset = HEADER_LENGTH + ext.len();

        put_u32(h, 0, MAGIC);
        put_u32(h, 4, VERSION);
        put_u64(h, 8, backing_offset as u64);
        put_u32(h, 16, self.backing.len() as u32);
        put_u32(h, 20, CLUSTER_BITS);
        put_u64(h, 24, self.virtual_size);
        // crypt_method 0 at 32.
        put_u32(h, 36, self.l1_entries as u32);
        put_u64(h, 40, self.l1_offset);
        put_u64(h, 48, self.refcount_table_offset);
        put_u32(h, 56, self.refcount_table_clusters as u32);
        // No snapshots (60, 64); no feature bits (72, 80, 88).
        put_u32(h, 96, REFCOUNT_ORDER);
        put_u32(h, 100, HEADER_LENGTH as u32);
        // compression_type 0 (zlib) at 104, then padding up to 112.
        h[HEADER_LENGTH..backing_offset].copy_from_slice(&ext);
        h[backing_offset..backing_offset + self.backing.len()]
            .copy_from_slice(self.backing.as_bytes());
    }
}

/// Appends a header extension: type, length, data padded to 8 bytes.
fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(align_up(out.len() as u64, 8) as usize, 0);
}

pub(crate) fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const PARENT: &str =
        "../../data/de/de3b53e781dffec9b08746d868d94849e3c3f32a8f1cf35c94b49b18e947172d";

    fn bytes(o: &EmptyOverlay) -> Vec<u8> {
        let mut b = o.prefix();
        b.resize(o.file_size() as usize, 0);
        b
    }

    fn sha(b: &[u8]) -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    fn overlay(size: u64) -> EmptyOverlay {
        EmptyOverlay::new(Path::new("t"), size, PARENT, "qcow2").unwrap()
    }

    /// Layers that pcocc 0.7.5 made with `qemu-img create` (qemu 10.0) and `qemu-img
    /// rebase -u` when resizing: (size asked, parent layer, file length, layer name).
    /// The same parent and size give the same bytes here.
    #[test]
    fn empty_overlays_are_the_bytes_pcocc_resize_writes() {
        for (size, parent, len, hash) in [
            (
                128u64 << 20,
                "de3b53e781dffec9b08746d868d94849e3c3f32a8f1cf35c94b49b18e947172d",
                196_616,
                "d90601b18ea19416d69f24654e65dd3a9e906eeff83629e9d7ced48ed34cc488",
            ),
            (
                3 << 40,
                "ec2f6e0ea972254acbe53a5677f065091d805cc95c009cb9e1efba22bc908ea6",
                245_760,
                "37f0a55945eadd277579f4c350419d2c839319c7f5efe3d09945acec43484754",
            ),
            (
                0,
                "045234278a814f7908231dba23cdde57b5852b2c8d1e3b80eb61077a6a66c6db",
                196_608,
                "43113de95509c841e374fd1c2ff163e49d2f2971d2ccfc06071f5fa9f1869f2a",
            ),
            (
                1000,
                "c5557cc4268602ab96d013ec4055ec3bcf46673e762262eaf65af42e6def1092",
                196_616,
                "3717f22d88ac329034a51a12ab413b17a1a950a5f24070530d876790d71dab7d",
            ),
            (
                1 << 50,
                "782daa074e5ad84977b395016a3a80dbe730cda2258e76741a97e17d081955f4",
                16_973_824,
                "0e4f9ed9b03611ca557f320f2c5b085ed7bb9becad59a2bb4deae020b0702741",
            ),
        ] {
            let backing = format!("../../data/{}/{parent}", &parent[..2]);
            let o = EmptyOverlay::new(Path::new("t"), size, &backing, "qcow2").unwrap();
            let b = bytes(&o);
            assert_eq!(b.len() as u64, len, "size {size}");
            assert_eq!(sha(&b), hash, "size {size}");
        }
    }

    #[test]
    fn header_fields() {
        let o = overlay((3u64 << 40) + 1);
        let b = o.prefix();
        assert_eq!(o.virtual_size(), (3u64 << 40) + 512);
        assert_eq!(&b[0..4], b"QFI\xfb");
        let u32_at = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        assert_eq!(u32_at(36), 6145);
        assert_eq!(u64_at(40), 3 * CLUSTER_SIZE);
        let off = u64_at(8) as usize;
        assert_eq!(&b[off..off + PARENT.len()], PARENT.as_bytes());
        assert_eq!(u32_at(16) as usize, PARENT.len());
        assert_eq!(u32_at(112), EXT_BACKING_FORMAT);
        assert_eq!(&b[120..125], b"qcow2");
        // 6145 entries fit one L1 cluster: four clusters in use.
        let rb = 2 * CLUSTER_SIZE as usize;
        assert_eq!(&b[rb..rb + 10], &[0, 1, 0, 1, 0, 1, 0, 1, 0, 0]);
        assert_eq!(o.file_size(), 3 * CLUSTER_SIZE + 6145 * 8);
    }

    #[test]
    fn too_large_or_bad_names_are_refused() {
        let p = Path::new("t");
        assert!(EmptyOverlay::new(p, MAX_VIRTUAL_SIZE, PARENT, "qcow2").is_ok());
        assert!(EmptyOverlay::new(p, MAX_VIRTUAL_SIZE + 1, PARENT, "qcow2").is_err());
        assert!(EmptyOverlay::new(p, 1, "", "qcow2").is_err());
        assert!(EmptyOverlay::new(p, 1, &"x".repeat(1024), "qcow2").is_err());
        assert!(EmptyOverlay::new(p, 1, PARENT, "").is_err());
    }
}
