//! VMDK hosted sparse extents, one file each (VMware "Virtual Disk Format 1.1" and 5.0):
//! `monolithicSparse` (a sparse extent header, an embedded text descriptor, a grain
//! directory (GD) of grain table (GT) offsets, GTs of grain offsets, grains stored
//! verbatim) and `streamOptimized` (the same tables, but each grain is a marker, its
//! guest sector and stored length, followed by a zlib stream; the GD may be found
//! only through the footer at the end of the file).
//!
//! [`Layer::map`] walks GD and GT entries grain by grain, merging runs of unallocated or
//! zero grains and of verbatim grains contiguous in the file; a compressed grain is one
//! [`Mapping::Compressed`] extent whose stored length comes from its marker. GD and GT
//! entries are read through a bounded `PageCache`; only the header, the descriptor, the
//! footer and (in bounded chunks, to check that no two entries name the same GT) the GD
//! are read at open. The redundant GD is ignored, as qemu does.
//!
//! A VMDK can name other files: a text descriptor lists extents by path (any host file,
//! `/etc/passwd` included), and a descriptor may name a parent disk. None of that is
//! opened here: text descriptors are refused (see `vmdk_extents`), and an embedded
//! descriptor must describe exactly this one sparse file; a parent disk is refused by
//! [`open`] and only named by [`open_overlay`] ([`Layer::backing`], with the `CID` the
//! parent must carry), for a caller allowed to open it (see `chain`). Limits checked
//! before anything is read through the tables: capacity, grain size and GT size within
//! qemu's limits, the GD and every GT inside the file, grains starting inside the file,
//! a compressed grain's marker naming its own guest sector and a stored length of at
//! most twice the grain (qemu's read buffer).

use super::file::{LayerFile, map_end};
use super::qcow2::BackingRef;
use super::tables::{Page, PageCache, TableOfTables, le_u16, le_u32, le_u64, read_upto_at};
use super::{
    CompressedCluster, Compression, Error, Extent, Format, Layer, Mapping, Result, read_exact_at,
};
use std::fs::File;
use std::path::Path;

const SECTOR: u64 = 512;
/// "KDMV": the sparse extent magic (spec: SPARSE_MAGICNUMBER 0x564d444b, little-endian).
const SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// "COWD": the older ESX sparse extent (VMDK3), not read here.
const COWD_MAGIC: &[u8; 4] = b"COWD";
const HEADER_LEN: usize = 512;
/// Header versions qemu reads (3 is what qemu-img writes for streamOptimized).
const MAX_VERSION: u32 = 3;
/// Flag bit 2 (Virtual Disk Format 5.0): GT entry 1 means "grain reads as zeroes".
const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
/// Flag bit 17: every grain and metadata block is preceded by a marker.
const FLAG_MARKERS: u32 = 1 << 17;
/// compressAlgorithm values (spec): none, and deflate in zlib format.
const COMPRESSION_NONE: u16 = 0;
const COMPRESSION_DEFLATE: u16 = 1;
/// gdOffset of a streamOptimized header whose GD is known only from the footer.
const GD_AT_END: u64 = u64::MAX;
/// Metadata marker types (spec: MARKER_EOS, MARKER_FOOTER).
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// A grain marker: lba (u64) and compressed size (u32), then the zlib stream.
pub const GRAIN_MARKER_LEN: u64 = 12;
/// GT entry values with a meaning of their own.
const GTE_UNALLOCATED: u32 = 0;
const GTE_ZERO: u32 = 1;
/// qemu: "Invalid granularity, image may be corrupt" above 0x200000 sectors (1 GiB).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Compressed grains are inflated whole into memory; qemu-img and VMware use 64 KiB,
/// and 2 MiB (qcow2's largest cluster) bounds that buffer.
const MAX_COMPRESSED_GRAIN: u64 = 2 << 20;
/// qemu: "L2 table size too big" above 512 entries (the spec's only value).
const MAX_GTES_PER_GT: u64 = 512;
/// qemu: "L1 size too big" above 32 Mi GD entries.
const MAX_GD_ENTRIES: u64 = 32 << 20;
/// An embedded descriptor larger than this is not a descriptor (qemu-img writes 10 KiB).
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Pages of GD/GT entries kept per open image (4 KiB each, two 512-entry GTs per page).
const CACHE_PAGES: usize = 256;
/// The advice every refusal of another file ends with.
const ONE_FILE_ADVICE: &str = "extents naming other files are not accepted; convert the \
                               disk to a single file first (`qemu-img convert -O vmdk SRC OUT.vmdk`)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    /// Stored at this file offset (verbatim, or the marker of a compressed grain).
    Stored(u64),
}

#[derive(Debug)]
pub struct VmdkLayer {
    src: LayerFile,
    size: u64,
    grain_bits: u32,
    gtes_per_gt: u64,
    gd_offset: u64,
    gd_entries: u64,
    zeroed_grains: bool,
    compressed: bool,
    cache: PageCache,
    /// The descriptor's `CID`.
    cid: Option<u32>,
    /// The parent disk, for a layer opened as an overlay.
    backing: Option<BackingRef>,
}

/// Opens `file` (already opened from `path`) as a single-file sparse VMDK that names
/// no parent disk.
pub fn open(file: File, path: &Path) -> Result<VmdkLayer> {
    VmdkLayer::new(file, path)
}

/// Opens `file` as a single-file sparse VMDK that may name a parent disk
/// ([`Layer::backing`], with the `CID` it must carry), which the caller follows.
pub fn open_overlay(file: File, path: &Path) -> Result<VmdkLayer> {
    VmdkLayer::checked(file, path, None, true)
}

/// The fields of a sparse extent header (spec: SparseExtentHeader) this reader uses.
struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_size: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    gtes_per_gt: u64,
    gd_offset: u64,
    compress_algorithm: u16,
}

impl Header {
    fn parse(h: &[u8]) -> Header {
        Header {
            version: le_u32(h, 4),
            flags: le_u32(h, 8),
            capacity: le_u64(h, 12),
            grain_size: le_u64(h, 20),
            descriptor_offset: le_u64(h, 28),
            descriptor_size: le_u64(h, 36),
            gtes_per_gt: u64::from(le_u32(h, 44)),
            gd_offset: le_u64(h, 56),
            compress_algorithm: le_u16(h, 77),
        }
    }
}

/// True when `bytes` look like the start of a text descriptor file.
fn looks_like_descriptor(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.trim_start().starts_with('#') || text.contains("createType") || text.contains("RW ")
}

/// What a descriptor says of the disk's place in a chain of snapshots.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Descriptor {
    /// `CID`: the content ID an overlay of this disk records as its `parentCID`.
    pub cid: Option<u32>,
    /// `parentFileNameHint` and `parentCID` of a disk that is an overlay of another.
    pub parent: Option<(String, u32)>,
}

/// `NO_PARENT_CID` of the spec: the disk has no parent.
const NO_PARENT: u32 = 0xffff_ffff;

/// The keys of a [`Descriptor`] as they are met in a descriptor's text.
#[derive(Debug, Default)]
pub(super) struct DescriptorKeys {
    cid: Option<u32>,
    parent_cid: Option<u32>,
    parent_name: Option<String>,
}

impl DescriptorKeys {
    /// Notes `key = value` (quotes trimmed) when it is one of the keys.
    pub fn note(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let cid = || {
            u32::from_str_radix(value, 16).map_err(|_| {
                format!("its descriptor's {key} {value:?} is not a hexadecimal content ID")
            })
        };
        if key.eq_ignore_ascii_case("CID") {
            self.cid = Some(cid()?);
        } else if key.eq_ignore_ascii_case("parentCID") {
            self.parent_cid = Some(cid()?).filter(|&c| c != NO_PARENT);
        } else if key.eq_ignore_ascii_case("parentFileNameHint") {
            self.parent_name = Some(value.to_string());
        }
        Ok(())
    }

    /// The descriptor's keys, a parent named with both its file name and content ID.
    pub fn finish(self) -> std::result::Result<Descriptor, String> {
        let parent = match (self.parent_name, self.parent_cid) {
            (None, None) => None,
            (Some(name), Some(cid)) => Some((name, cid)),
            (None, Some(_)) => {
                return Err("its descriptor has a parentCID but no parentFileNameHint \
                            naming the parent disk"
                    .into());
            }
            (Some(name), None) => {
                return Err(format!(
                    "its descriptor names the parent disk {name:?} without a parentCID"
                ));
            }
        };
        Ok(Descriptor {
            cid: self.cid,
            parent,
        })
    }
}

impl Descriptor {
    /// The parent disk as a backing file: a VMDK carrying the recorded content ID.
    pub fn backing(&self) -> Option<BackingRef> {
        self.parent.as_ref().map(|(name, cid)| BackingRef {
            name: name.clone(),
            // A parent disk is a VMDK (qemu reads it as one).
            format: Some("vmdk".into()),
            content_id: Some(*cid),
        })
    }
}

/// Checks an embedded descriptor: it must describe this one sparse file and nothing
/// else (a parent disk is for the caller to accept or refuse). Returns a refusal reason
/// otherwise.
fn check_descriptor(text: &str) -> std::result::Result<Descriptor, String> {
    let mut extents = 0;
    let mut keys = DescriptorKeys::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Extent lines first: a file name may contain '=' and must not pass for a key.
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if ["RW", "RDONLY", "NOACCESS"]
            .iter()
            .any(|a| a.eq_ignore_ascii_case(first))
        {
            extents += 1;
            let _sectors = words.next();
            let kind = words.next().unwrap_or("");
            let name = line.split('"').nth(1).unwrap_or("");
            if !kind.eq_ignore_ascii_case("SPARSE") || name.contains('/') || name.contains('\\') {
                return Err(format!(
                    "its descriptor has the extent `{line}`; {ONE_FILE_ADVICE}"
                ));
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim().trim_matches('"');
        if key.eq_ignore_ascii_case("createType")
            && !["monolithicSparse", "streamOptimized"]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(value))
        {
            return Err(format!(
                "its descriptor has createType {value}, whose extents are other files; \
                 {ONE_FILE_ADVICE}"
            ));
        }
        keys.note(key, value)?;
    }
    if extents > 1 {
        return Err(format!(
            "its descriptor lists {extents} extents; {ONE_FILE_ADVICE}"
        ));
    }
    keys.finish()
}

/// Where the grains of a hosted sparse VMDK file whose grain directory is in its header
/// start (monolithicSparse, and streamOptimized as qemu-img writes it: its tables before
/// its compressed grains), read from its first bytes (`head`, at least its header): its
/// header's `overHead`, the sectors of header, descriptor and tables before the first
/// grain. `None` when `head` starts no such file (a streamOptimized file whose grain
/// directory is known only from its footer, at the end).
pub fn data_start(head: &[u8]) -> Option<u64> {
    if head.len() < HEADER_LEN || &head[..4] != SPARSE_MAGIC {
        return None;
    }
    let hdr = Header::parse(head);
    let readable = match hdr.compress_algorithm {
        COMPRESSION_NONE => true,
        COMPRESSION_DEFLATE => hdr.flags & FLAG_MARKERS != 0,
        _ => false,
    };
    if hdr.gd_offset == GD_AT_END || !readable {
        return None;
    }
    le_u64(head, 64).checked_mul(SECTOR)
}

/// Opens a hosted sparse VMDK file still being written front to back, once its first
/// `tables_end` bytes ([`data_start`]) are final: checked as [`open`] checks a whole
/// file, except that grains are checked against `assumed_len` rather than its current
/// length (the caller checks the complete file again with [`open`]); its grain
/// directory and every grain table must lie below `tables_end`, since they are read
/// while the grains arrive.
pub fn open_arriving(
    file: File,
    path: &Path,
    assumed_len: u64,
    tables_end: u64,
) -> Result<VmdkLayer> {
    let layer = VmdkLayer::checked(file, path, Some(assumed_len), false)?;
    let below = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= tables_end);
    let mut ok = below(layer.gd_offset, layer.gd_entries * 4);
    for i in 0..layer.gd_entries {
        if !ok {
            break;
        }
        if let Some(gt) = layer.grain_table(i)? {
            ok = below(gt, layer.gtes_per_gt * 4);
        }
    }
    if !ok {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            format: Format::Vmdk,
            reason: "grain tables among the grains".into(),
        });
    }
    Ok(layer)
}

impl VmdkLayer {
    pub fn new(file: File, path: &Path) -> Result<VmdkLayer> {
        VmdkLayer::checked(file, path, None, false)
    }

    /// [`VmdkLayer::new`], its grains checked against `assumed_len` when given, a parent
    /// disk accepted when `overlay`.
    fn checked(
        file: File,
        path: &Path,
        assumed_len: Option<u64>,
        overlay: bool,
    ) -> Result<VmdkLayer> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            format: Format::Vmdk,
            reason,
        };
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            format: Format::Vmdk,
            reason,
        };
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let file_len = assumed_len.unwrap_or(meta.len());
        let mut h = [0u8; HEADER_LEN];
        let got = read_upto_at(&file, path, &mut h, 0)?;
        if &h[..4] != SPARSE_MAGIC || got < HEADER_LEN {
            if &h[..4] == COWD_MAGIC {
                return Err(unsupported(
                    "a VMDK3 (COWD) sparse extent; only hosted sparse extents are read".into(),
                ));
            }
            if &h[..4] != SPARSE_MAGIC && looks_like_descriptor(&h[..got]) {
                return Err(unsupported(format!(
                    "a VMDK descriptor file, which describes the disk by naming other files \
                     (an import through the mount cannot read them with the writer's rights; \
                     `pcocc image import` does); {ONE_FILE_ADVICE}"
                )));
            }
            if &h[..4] == SPARSE_MAGIC {
                return Err(invalid(format!(
                    "the file is {file_len} bytes, too short for a sparse extent header"
                )));
            }
            return Err(invalid(
                "no sparse extent magic (KDMV) and no descriptor at offset 0".into(),
            ));
        }
        let mut hdr = Header::parse(&h);
        if hdr.gd_offset == GD_AT_END {
            hdr = Self::read_footer(&file, path, file_len).map_err(|r| match r {
                Ok(reason) => invalid(reason),
                Err(e) => e,
            })?;
        }

        if hdr.version == 0 || hdr.version > MAX_VERSION {
            return Err(unsupported(format!(
                "sparse extent version {}",
                hdr.version
            )));
        }
        if hdr.capacity == 0 {
            // qemu reads a zero capacity as "the descriptor names the extents", and
            // cannot open the zero-sized files qemu-img itself creates.
            return Err(unsupported(format!(
                "a capacity of 0 sectors marks a file whose descriptor names the extents; \
                 {ONE_FILE_ADVICE}"
            )));
        }
        let size = hdr
            .capacity
            .checked_mul(SECTOR)
            .ok_or_else(|| invalid(format!("capacity of {} sectors overflows", hdr.capacity)))?;
        let compressed = match hdr.compress_algorithm {
            COMPRESSION_NONE => false,
            COMPRESSION_DEFLATE => true,
            a => return Err(unsupported(format!("compression algorithm {a}"))),
        };
        if compressed && hdr.flags & FLAG_MARKERS == 0 {
            return Err(unsupported(
                "compressed grains without grain markers (their length is unknown)".into(),
            ));
        }
        let gs = hdr.grain_size;
        if !gs.is_power_of_two() || gs > MAX_GRAIN_SECTORS {
            return Err(invalid(format!(
                "grain size of {gs} sectors is not a power of 2 of at most {MAX_GRAIN_SECTORS}"
            )));
        }
        let grain_bytes = gs * SECTOR;
        if compressed && grain_bytes > MAX_COMPRESSED_GRAIN {
            return Err(unsupported(format!(
                "compressed grains of {grain_bytes} bytes (at most {MAX_COMPRESSED_GRAIN} are read)"
            )));
        }
        if hdr.gtes_per_gt == 0 || hdr.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(invalid(format!(
                "{} entries per grain table (1 to {MAX_GTES_PER_GT} are valid)",
                hdr.gtes_per_gt
            )));
        }
        let gd_entries = hdr.capacity.div_ceil(gs * hdr.gtes_per_gt);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(unsupported(format!(
                "{gd_entries} grain directory entries (at most {MAX_GD_ENTRIES})"
            )));
        }
        let gd_offset = hdr
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|off| {
                off.checked_add(gd_entries * 4)
                    .is_some_and(|e| e <= file_len)
            })
            .ok_or_else(|| {
                invalid(format!(
                    "the grain directory ({gd_entries} entries at sector {}) is past the end \
                     of the {file_len}-byte file",
                    hdr.gd_offset
                ))
            })?;

        let mut descriptor = Descriptor::default();
        if hdr.descriptor_size > 0 {
            let start = hdr.descriptor_offset.checked_mul(SECTOR);
            let len = hdr.descriptor_size.saturating_mul(SECTOR);
            let Some(start) = start.filter(|s| {
                len <= MAX_DESCRIPTOR && s.checked_add(len).is_some_and(|e| e <= file_len)
            }) else {
                return Err(invalid(format!(
                    "the embedded descriptor ({} sectors at sector {}) is past the end of \
                     the file or larger than {MAX_DESCRIPTOR} bytes",
                    hdr.descriptor_size, hdr.descriptor_offset
                )));
            };
            let mut text = vec![0u8; len as usize];
            read_exact_at(&file, path, &mut text, start)?;
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            descriptor =
                check_descriptor(&String::from_utf8_lossy(&text[..end])).map_err(unsupported)?;
            if descriptor.parent.is_some() && !overlay {
                return Err(unsupported(format!(
                    "its descriptor names a parent disk, which an import through the mount \
                     does not read (`pcocc image import` does); {ONE_FILE_ADVICE}"
                )));
            }
        }

        TableOfTables {
            file: &file,
            path,
            format: Format::Vmdk,
            offset: gd_offset,
            count: gd_entries,
            entry_len: 4,
            unit: SECTOR,
            table_bytes: hdr.gtes_per_gt * 4,
            file_len,
            what: "grain directory",
        }
        .check_distinct()?;

        let mut src = LayerFile::new(file, path, &meta);
        src.len = file_len;
        let cache = PageCache::new(
            src.file.clone(),
            src.path.clone(),
            Format::Vmdk,
            src.len,
            CACHE_PAGES,
        );
        Ok(VmdkLayer {
            src,
            size,
            grain_bits: grain_bytes.trailing_zeros(),
            gtes_per_gt: hdr.gtes_per_gt,
            gd_offset,
            gd_entries,
            zeroed_grains: hdr.flags & FLAG_ZEROED_GRAIN != 0,
            compressed,
            cache,
            cid: descriptor.cid,
            backing: descriptor.backing(),
        })
    }

    /// The footer of a streamOptimized file (spec: footer marker, footer, end-of-stream
    /// marker, the last three sectors), which takes precedence over the header.
    /// `Err(Ok(reason))` is an invalid footer.
    fn read_footer(
        file: &File,
        path: &Path,
        file_len: u64,
    ) -> std::result::Result<Header, std::result::Result<String, Error>> {
        let tail = 3 * SECTOR;
        if file_len < HEADER_LEN as u64 + tail {
            return Err(Ok(
                "the grain directory is at the end but the file has no room for a footer".into(),
            ));
        }
        let mut b = vec![0u8; tail as usize];
        read_exact_at(file, path, &mut b, file_len - tail).map_err(Err)?;
        let (marker, rest) = b.split_at(SECTOR as usize);
        let (footer, eos) = rest.split_at(SECTOR as usize);
        let marker_ok = le_u32(marker, 8) == 0 && le_u32(marker, 12) == MARKER_FOOTER;
        let eos_ok = le_u64(eos, 0) == 0 && le_u32(eos, 8) == 0 && le_u32(eos, 12) == MARKER_EOS;
        if !marker_ok || !eos_ok || &footer[..4] != SPARSE_MAGIC {
            return Err(Ok(
                "the grain directory is at the end but the last three sectors are not a \
                 footer marker, a footer and an end-of-stream marker"
                    .into(),
            ));
        }
        let hdr = Header::parse(footer);
        if hdr.gd_offset == GD_AT_END {
            return Err(Ok("the footer does not locate the grain directory".into()));
        }
        Ok(hdr)
    }

    fn grain_bytes(&self) -> u64 {
        1 << self.grain_bits
    }

    /// Whether its grains are compressed, each behind a marker.
    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// Calls `each` with every grain from number `first` below number `end` that the
    /// grain tables list as stored, and the file offset they give it (no marker is
    /// read); `each` returns `false` to stop.
    fn stored_grains(
        &self,
        first: u64,
        end: u64,
        mut each: impl FnMut(u64, u64) -> bool,
    ) -> Result<()> {
        let mut grain = first;
        while grain < end {
            let gt_index = grain / self.gtes_per_gt;
            let Some(gt) = self.grain_table(gt_index)? else {
                grain = (gt_index + 1) * self.gtes_per_gt;
                continue;
            };
            let at = gt + (grain % self.gtes_per_gt) * 4;
            let entry = self.cache.page_for(at, 4, "grain table entry")?.le_u32(at);
            if let Grain::Stored(off) = self.classify(grain, entry)?
                && !each(grain, off)
            {
                return Ok(());
            }
            grain += 1;
        }
        Ok(())
    }

    /// The runs `(first, count)` of `cluster`-byte guest clusters that hold a stored
    /// grain, found from the grain tables alone; `None` past `max_runs` runs.
    pub fn stored_clusters(&self, cluster: u64, max_runs: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut within = true;
        let grains = self.size.div_ceil(self.grain_bytes());
        self.stored_grains(0, grains, |grain, _| {
            let start = grain << self.grain_bits;
            let end = ((grain + 1) << self.grain_bits).min(self.size);
            let (first, last) = (start / cluster, end.div_ceil(cluster));
            let kept = runs.len() as u64;
            match runs.last_mut() {
                Some((s, n)) if *s + *n >= first => *n = last.max(*s + *n) - *s,
                _ if kept >= max_runs => within = false,
                _ => runs.push((first, last - first)),
            }
            within
        })?;
        Ok(within.then_some(runs))
    }

    /// For a layer of compressed grains, the marker furthest into the file among those of
    /// the grains holding guest bytes `offset..offset + len`, found from the grain tables
    /// alone: mapping a compressed grain reads its marker (its stored length), so a
    /// file still arriving must be past it first. `None` when there is none.
    pub fn last_marker(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        if !self.compressed {
            return Ok(None);
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut last: Option<u64> = None;
        let grains = end.div_ceil(self.grain_bytes());
        self.stored_grains(offset >> self.grain_bits, grains, |_, marker| {
            last = Some(last.map_or(marker, |l| l.max(marker)));
            true
        })?;
        Ok(last)
    }

    fn invalid(&self, reason: String) -> Error {
        Error::Invalid {
            path: self.src.path.to_path_buf(),
            format: Format::Vmdk,
            reason,
        }
    }

    /// The file offset of GT number `i`, or `None` when the whole GT is unallocated.
    fn grain_table(&self, i: u64) -> Result<Option<u64>> {
        debug_assert!(i < self.gd_entries);
        let at = self.gd_offset + i * 4;
        let sector = u64::from(
            self.cache
                .page_for(at, 4, "grain directory entry")?
                .le_u32(at),
        );
        if sector == 0 {
            return Ok(None);
        }
        let off = sector * SECTOR;
        if off + self.gtes_per_gt * 4 > self.src.len {
            return Err(self.invalid(format!(
                "grain directory entry {i} points to sector {sector}, past the end of the file"
            )));
        }
        Ok(Some(off))
    }

    fn classify(&self, grain: u64, entry: u32) -> Result<Grain> {
        match entry {
            GTE_UNALLOCATED => Ok(Grain::Unallocated),
            GTE_ZERO if self.zeroed_grains => Ok(Grain::Zero),
            sector => {
                let off = u64::from(sector) * SECTOR;
                if off >= self.src.len {
                    return Err(self.invalid(format!(
                        "the grain of guest offset {} is at sector {sector}, past the end of the file",
                        grain << self.grain_bits
                    )));
                }
                Ok(Grain::Stored(off))
            }
        }
    }

    /// The compressed grain `grain` whose marker is at `marker`, for the guest range
    /// starting at `offset`.
    fn compressed_grain(&self, grain: u64, marker: u64, offset: u64) -> Result<CompressedCluster> {
        let mut m = [0u8; GRAIN_MARKER_LEN as usize];
        read_exact_at(&self.src.file, &self.src.path, &mut m, marker)?;
        let lba = le_u64(&m, 0);
        let stored_len = u64::from(le_u32(&m, 8));
        let grain_start = grain << self.grain_bits;
        if lba != grain_start / SECTOR {
            return Err(self.invalid(format!(
                "the grain marker at {marker} is for sector {lba}, but the grain table uses it \
                 for sector {}",
                grain_start / SECTOR
            )));
        }
        if stored_len == 0
            || stored_len > 2 * self.grain_bytes()
            || marker + GRAIN_MARKER_LEN + stored_len > self.src.len
        {
            return Err(self.invalid(format!(
                "the compressed grain at {marker} claims {stored_len} bytes, beyond twice the \
                 grain size or the end of the file"
            )));
        }
        Ok(CompressedCluster {
            file: self.src.file.clone(),
            path: self.src.path.clone(),
            offset: marker + GRAIN_MARKER_LEN,
            stored_len,
            cluster_len: self.grain_bytes().min(self.size - grain_start),
            skip: offset - grain_start,
            compression: Compression::Zlib,
        })
    }
}

impl Layer for VmdkLayer {
    fn format(&self) -> Format {
        Format::Vmdk
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

    fn content_id(&self) -> Option<u32> {
        self.cid
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = map_end(&self.src.path, offset, max_len, self.size)?;
        let gb = self.grain_bytes();
        let first_grain = offset >> self.grain_bits;
        let mut grain = first_grain;
        let mut first: Option<Grain> = None;
        let mut run_end = offset;
        let mut page: Option<Page> = None;
        'outer: while run_end < end {
            let gt_index = grain / self.gtes_per_gt;
            let span_end = (gt_index + 1) * self.gtes_per_gt;
            let Some(gt) = self.grain_table(gt_index)? else {
                match first {
                    None => first = Some(Grain::Unallocated),
                    Some(Grain::Unallocated) => {}
                    Some(_) => break,
                }
                grain = span_end;
                run_end = grain.saturating_mul(gb);
                continue;
            };
            while grain < span_end && run_end < end {
                let at = gt + (grain % self.gtes_per_gt) * 4;
                let p = match page.take() {
                    Some(p) if p.holds(at, 4) => p,
                    _ => self.cache.page_for(at, 4, "grain table entry")?,
                };
                let this = self.classify(grain, p.le_u32(at))?;
                page = Some(p);
                let continues = match (first, this) {
                    (None, _) => true,
                    // A compressed grain is an extent of its own.
                    (Some(Grain::Stored(_)), _) if self.compressed => false,
                    (Some(Grain::Stored(start)), Grain::Stored(host)) => {
                        host.checked_sub(start) == Some((grain - first_grain) * gb)
                    }
                    (Some(a), b) => a == b,
                };
                if !continues {
                    break 'outer;
                }
                first.get_or_insert(this);
                grain += 1;
                run_end = grain << self.grain_bits;
            }
        }
        let len = run_end.min(end) - offset;
        let mapping = match first {
            Some(Grain::Stored(host)) if self.compressed => {
                Mapping::Compressed(self.compressed_grain(first_grain, host, offset)?)
            }
            Some(Grain::Stored(host)) => self.src.data(host + (offset & (gb - 1))),
            Some(Grain::Zero) => Mapping::Zero,
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

    fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
        qemu_create(dir, "vmdk", name, size, opts)
    }

    /// A streamOptimized copy of `src`, as `qemu-img convert` writes it.
    fn stream_optimized(src: &Path, dst: PathBuf) -> PathBuf {
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ]);
        dst
    }

    fn open_path(p: &Path) -> Result<VmdkLayer> {
        open(File::open(p).unwrap(), p)
    }

    /// Judges a streamOptimized image: its size, data extents and bytes.
    fn assert_stream_matches_qemu(p: &Path) {
        let layer = open_path(p).unwrap();
        assert!(layer.compressed);
        assert_layer_matches_qemu(Arc::new(layer), p, "vmdk");
    }

    const SCATTERED: &[&str] = &[
        "write -P 0x11 0 4k",
        "write -P 0x22 64k 192k",
        "write -P 0x33 1M 4k",
        "write -z 2M 256k",
        "write -P 0x44 2M 4k",
        "write -P 0x55 7340000 100k",
        "write -P 0x66 15M 1M",
    ];

    #[test]
    fn monolithic_sparse_with_scattered_data_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "m.vmdk", "16M", "");
        qemu_io("vmdk", &p, SCATTERED);
        let layer = open_path(&p).unwrap();
        assert!(!layer.compressed && !layer.zeroed_grains);
        assert_layer_matches_qemu(Arc::new(layer), &p, "vmdk");
    }

    #[test]
    fn zeroed_grains_are_zero_extents() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "z.vmdk", "16M", "zeroed_grain=on");
        qemu_io("vmdk", &p, SCATTERED);
        let layer = open_path(&p).unwrap();
        assert!(layer.zeroed_grains);
        let ext = layer.map((2 << 20) + (64 << 10), 16 << 20).unwrap();
        assert!(matches!(ext.mapping, Mapping::Zero), "{ext:?}");
        assert_eq!(ext.len, 192 << 10);
        assert_layer_matches_qemu(Arc::new(layer), &p, "vmdk");
    }

    #[test]
    fn contiguous_grains_merge_into_one_extent() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "c.vmdk", "16M", "");
        qemu_io("vmdk", &p, &["write -P 9 1M 1M"]);
        let layer = open_path(&p).unwrap();
        let ext = layer.map((1 << 20) + 100, 16 << 20).unwrap();
        assert!(ext.mapping.is_data());
        assert_eq!(ext.len, (1 << 20) - 100);
    }

    #[test]
    fn stream_optimized_maps_one_compressed_grain_per_extent() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "m.vmdk", "16M", "");
        qemu_io("vmdk", &p, SCATTERED);
        let s = stream_optimized(&p, dir.path().join("s.vmdk"));
        let layer = open_path(&s).unwrap();
        let ext = layer.map((64 << 10) + 10, 16 << 20).unwrap();
        assert_eq!(ext.len, (64 << 10) - 10);
        let Mapping::Compressed(c) = ext.mapping else {
            panic!("expected a compressed grain, got {ext:?}");
        };
        assert_eq!((c.skip, c.cluster_len), (10, 64 << 10));
        assert_eq!(c.compression, Compression::Zlib);
        assert_stream_matches_qemu(&s);
    }

    #[test]
    fn incompressible_grains_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // Noise grains deflate to slightly more than a grain; a short noise tail.
        let raw = dir.path().join("n.raw");
        let mut data = vec![0u8; (3 << 20) + 4608];
        data[..256 << 10].copy_from_slice(&crate::testutil::noise(1, 256 << 10));
        let tail = data.len() - 1000;
        data[tail..].copy_from_slice(&crate::testutil::noise(2, 1000));
        std::fs::write(&raw, &data).unwrap();
        for sub in ["monolithicSparse", "streamOptimized"] {
            let p = dir.path().join(format!("{sub}.vmdk"));
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                raw.to_str().unwrap(),
                p.to_str().unwrap(),
            ]);
            assert_layer_matches_qemu(Arc::new(open_path(&p).unwrap()), &p, "vmdk");
        }
    }

    #[test]
    fn stream_optimized_with_the_directory_in_the_footer_reads_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "m.vmdk", "16M", "");
        qemu_io("vmdk", &p, SCATTERED);
        let s = stream_optimized(&p, dir.path().join("s.vmdk"));
        // Move the GD location to a footer, as VMware's streaming writers do: the header
        // says GD_AT_END, and a footer marker, a footer and an end-of-stream marker end
        // the file.
        let mut d = std::fs::read(&s).unwrap();
        let header = d[..512].to_vec();
        d[56..64].copy_from_slice(&GD_AT_END.to_le_bytes());
        let mut marker = vec![0u8; 512];
        marker[0..8].copy_from_slice(&1u64.to_le_bytes());
        marker[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        d.extend_from_slice(&marker);
        d.extend_from_slice(&header);
        d.extend_from_slice(&[0u8; 512]);
        let f = dir.path().join("f.vmdk");
        std::fs::write(&f, &d).unwrap();
        assert_eq!(
            open_path(&f).unwrap().gd_offset,
            le_u64(&header, 56) * SECTOR
        );
        assert_stream_matches_qemu(&f);
        // Without its footer, such a file is refused.
        let cut = copy_truncated(&f, dir.path().join("cut.vmdk"), d.len() as u64 - 512);
        assert!(open_path(&cut).unwrap_err().to_string().contains("footer"));
    }

    #[test]
    fn empty_images_read_like_qemu_and_zero_capacity_is_refused_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "e.vmdk", "10M", "");
        assert_layer_matches_qemu(Arc::new(open_path(&p).unwrap()), &p, "vmdk");
        let s = stream_optimized(&p, dir.path().join("es.vmdk"));
        assert_stream_matches_qemu(&s);
        // qemu-img creates a zero-capacity file but cannot open it: such a header only
        // stands for a descriptor of other files.
        let z = create(dir.path(), "z.vmdk", "0", "");
        assert!(open_path(&z).is_err());
        assert!(
            std::process::Command::new("qemu-img")
                .args(["info", "-f", "vmdk", z.to_str().unwrap()])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(false)
        );
    }

    #[test]
    fn size_one_byte_past_a_grain_is_rounded_to_a_sector_as_qemu_does() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "o.vmdk", "65537", "");
        qemu_io(
            "vmdk",
            &p,
            &["write -P 0x77 65536 512", "write -P 0x78 0 512"],
        );
        let layer = open_path(&p).unwrap();
        assert_eq!(layer.virtual_size(), 66048);
        assert_layer_matches_qemu(Arc::new(layer), &p, "vmdk");
        // streamOptimized: the last grain is stored short (512 bytes) and maps so.
        let s = stream_optimized(&p, dir.path().join("os.vmdk"));
        let layer = open_path(&s).unwrap();
        let Mapping::Compressed(c) = layer.map(65536, 512).unwrap().mapping else {
            panic!("expected a compressed grain");
        };
        assert_eq!(c.cluster_len, 512);
        assert_stream_matches_qemu(&s);
    }

    #[test]
    fn multi_gib_sparse_images_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "big.vmdk", "5G", "");
        qemu_io(
            "vmdk",
            &p,
            &[
                "write -P 1 0 4k",
                "write -P 2 4294963200 8k",
                "write -P 3 5368705024 4k",
            ],
        );
        let layer = Arc::new(open_path(&p).unwrap());
        let ext = layer.map(64 << 10, 5 << 30).unwrap();
        assert!(matches!(ext.mapping, Mapping::Unallocated));
        assert_eq!(ext.len, (4 << 30) - (128 << 10));
        assert_layer_matches_qemu(layer, &p, "vmdk");
        let s = stream_optimized(&p, dir.path().join("bigs.vmdk"));
        assert_stream_matches_qemu(&s);
    }

    #[test]
    fn unallocated_grain_tables_read_like_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "g.vmdk", "1G", "");
        qemu_io(
            "vmdk",
            &p,
            &["write -P 1 0 4k", "write -P 3 1073676288 64k"],
        );
        // qemu-img preallocates every GT; VMware leaves a GD entry at 0 until its GT is
        // needed. Clear the entries of the GTs with no grains (all but the first and
        // the last of 32).
        let mut d = std::fs::read(&p).unwrap();
        let gd = le_u64(&d, 56) as usize * 512;
        d[gd + 4..gd + 31 * 4].fill(0);
        let q = dir.path().join("sparse-gd.vmdk");
        std::fs::write(&q, &d).unwrap();
        let layer = open_path(&q).unwrap();
        let ext = layer.map(32 << 20, 1 << 30).unwrap();
        assert!(matches!(ext.mapping, Mapping::Unallocated));
        assert_eq!(ext.len, (1 << 30) - (64 << 10) - (32 << 20));
        assert_layer_matches_qemu(Arc::new(layer), &q, "vmdk");
    }

    #[test]
    fn concurrent_reads_from_many_threads_agree_with_qemu() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "c.vmdk", "16M", "");
        qemu_io("vmdk", &p, SCATTERED);
        let disk = Disk::new(vec![Arc::new(open_path(&p).unwrap())]);
        assert_concurrent_reads_match(&disk, &p, "vmdk");
        let s = stream_optimized(&p, dir.path().join("s.vmdk"));
        let layer = open_path(&s).unwrap();
        assert_concurrent_reads_match(&Disk::new(vec![Arc::new(layer)]), &s, "vmdk");
    }

    #[test]
    fn descriptor_files_are_refused_because_their_extents_name_other_files() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for sub in [
            "monolithicFlat",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
        ] {
            let p = create(
                dir.path(),
                &format!("{sub}.vmdk"),
                "4M",
                &format!("subformat={sub}"),
            );
            let err = open_path(&p).unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{sub}: {err}");
            assert!(
                err.to_string()
                    .contains("extents naming other files are not accepted"),
                "{sub}: {err}"
            );
        }
    }

    #[test]
    fn descriptor_naming_etc_passwd_is_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // A text descriptor, as a user could copy into the mount.
        let text = dir.path().join("passwd.vmdk");
        std::fs::write(
            &text,
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\nRW 8 FLAT \"/etc/passwd\" 0\n",
        )
        .unwrap();
        let err = open_path(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains("extents naming other files are not accepted"),
            "{err}"
        );
        // The same extent line inside the descriptor of a sparse file.
        let p = create(dir.path(), "m.vmdk", "4M", "");
        let mut d = std::fs::read(&p).unwrap();
        let desc = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                     createType=\"monolithicSparse\"\nRW 8192 FLAT \"/etc/passwd\" 0\n";
        d[512..512 + desc.len()].copy_from_slice(desc);
        d[512 + desc.len()..512 * 21].fill(0);
        let embedded = dir.path().join("embedded.vmdk");
        std::fs::write(&embedded, &d).unwrap();
        let err = open_path(&embedded).unwrap_err();
        assert!(err.to_string().contains("/etc/passwd"), "{err}");
        assert!(err.to_string().contains("not accepted"), "{err}");
        // A sparse extent named by path, or a second extent, is refused too.
        for extra in [
            "RW 8192 SPARSE \"/etc/passwd\"\n",
            "RW 8192 SPARSE \"m.vmdk\"\nRW 8192 SPARSE \"other.vmdk\"\n",
            "RW 8192 SPARSE \"m.vmdk\"\nparentFileNameHint=\"/etc/passwd\"\n",
        ] {
            let mut d2 = std::fs::read(&p).unwrap();
            let desc = format!("# Disk DescriptorFile\ncreateType=\"monolithicSparse\"\n{extra}");
            d2[512..512 * 21].fill(0);
            d2[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
            std::fs::write(&embedded, &d2).unwrap();
            assert!(matches!(
                open_path(&embedded).unwrap_err(),
                Error::Unsupported { .. }
            ));
        }
    }

    #[test]
    fn descriptor_checks_are_not_fooled_by_names_with_equals_signs() {
        assert!(check_descriptor("RW 8 FLAT \"/etc/passwd=x\" 0\n").is_err());
        assert!(check_descriptor("RW 8 SPARSE \"a=b.vmdk\"\n").is_ok());
        assert!(check_descriptor("createType=\"vmfsSparse\"\n").is_err());
        assert!(check_descriptor("parentCID=12345678\n").is_err());
        assert!(check_descriptor("parentFileNameHint=\"p.vmdk\"\n").is_err());
        assert!(check_descriptor("parentCID=ffffffff\nRW 8 SPARSE \"d.vmdk\"\n").is_ok());
        assert_eq!(
            check_descriptor("CID=0000002a\nparentCID=fffffffe\nparentFileNameHint=\"p.vmdk\"\n"),
            Ok(Descriptor {
                cid: Some(42),
                parent: Some(("p.vmdk".into(), 0xffff_fffe)),
            })
        );
        assert!(check_descriptor("CID=zz\n").is_err());
    }

    #[test]
    fn truncated_file_is_an_error() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "t.vmdk", "4M", "");
        qemu_io("vmdk", &p, &["write -P 1 1M 64k"]);
        let short = copy_truncated(&p, dir.path().join("h.vmdk"), 300);
        assert!(
            open_path(&short)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        // Header and descriptor intact, the tables gone.
        let cut = copy_truncated(&p, dir.path().join("c.vmdk"), 21 * 512);
        let err = open_path(&cut).unwrap_err();
        assert!(err.to_string().contains("grain directory"), "{err}");
        assert!(err.to_string().contains("c.vmdk"), "{err}");
        // Tables intact, the grain gone.
        let len = std::fs::metadata(&p).unwrap().len();
        let cut = copy_truncated(&p, dir.path().join("g.vmdk"), len - (64 << 10));
        let layer = open_path(&cut).unwrap();
        assert!(layer.map(1 << 20, 1).is_err());
        // A streamOptimized grain cut in the middle of its zlib stream.
        let s = stream_optimized(&p, dir.path().join("s.vmdk"));
        let cut = copy_truncated(&s, dir.path().join("sc.vmdk"), 128 * 512 + 20);
        let layer = open_path(&cut).unwrap();
        assert!(layer.map(1 << 20, 1).is_err());
    }

    #[test]
    fn tables_pointing_past_the_end_are_errors() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "p.vmdk", "4M", "");
        qemu_io("vmdk", &p, &["write -P 1 1M 64k"]);
        let d = std::fs::read(&p).unwrap();
        let gd = le_u64(&d, 56) as usize * 512;
        let gt = le_u32(&d, gd) as usize * 512;
        let far = 0x7fff_0000u32.to_le_bytes();
        let bad = patched(&p, dir.path().join("gd.vmdk"), gd, &far);
        let err = open_path(&bad).unwrap().map(0, 1).unwrap_err();
        assert!(err.to_string().contains("grain directory entry 0"), "{err}");
        let bad = patched(&p, dir.path().join("gt.vmdk"), gt + 16 * 4, &far);
        let err = open_path(&bad).unwrap().map(1 << 20, 1).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        let bad = patched(
            &p,
            dir.path().join("h.vmdk"),
            56,
            &(1u64 << 50).to_le_bytes(),
        );
        assert!(open_path(&bad).is_err());
        // A grain marker naming another sector, or claiming a huge length.
        let s = stream_optimized(&p, dir.path().join("s.vmdk"));
        let bad = patched(
            &s,
            dir.path().join("lba.vmdk"),
            128 * 512,
            &7u64.to_le_bytes(),
        );
        assert!(open_path(&bad).unwrap().map(1 << 20, 1).is_err());
        let bad = patched(
            &s,
            dir.path().join("len.vmdk"),
            128 * 512 + 8,
            &u32::MAX.to_le_bytes(),
        );
        assert!(open_path(&bad).unwrap().map(1 << 20, 1).is_err());
    }

    #[test]
    fn sizes_near_u64_max_are_refused() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.vmdk", "4M", "");
        for capacity in [u64::MAX, u64::MAX / 512, 1u64 << 54] {
            let bad = patched(&p, dir.path().join("q.vmdk"), 12, &capacity.to_le_bytes());
            assert!(open_path(&bad).is_err(), "capacity {capacity}");
        }
        for (at, v) in [(20usize, u64::MAX), (20, 3), (20, 1 << 30)] {
            let bad = patched(&p, dir.path().join("g.vmdk"), at, &v.to_le_bytes());
            assert!(open_path(&bad).is_err(), "grain size {v}");
        }
        let bad = patched(&p, dir.path().join("n.vmdk"), 44, &u32::MAX.to_le_bytes());
        assert!(open_path(&bad).is_err());
    }

    #[test]
    fn corrupted_images_give_errors_never_panics() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "x.vmdk", "8M", "");
        qemu_io("vmdk", &p, &["write -P 1 0 4k", "write -P 2 3M 128k"]);
        assert_corruption_never_panics(&p, |q| Ok(Arc::new(open_path(q)?)), 300);
        let s = stream_optimized(&p, dir.path().join("s.vmdk"));
        assert_corruption_never_panics(&s, |q| Ok(Arc::new(open_path(q)?)), 300);
    }
}
