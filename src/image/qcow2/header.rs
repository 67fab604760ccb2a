//! The qcow2 header and its extensions, parsed and checked before anything else of the
//! image is read or allocated.
//!
//! Facts from qemu's `docs/interop/qcow2.rst`; limits from qemu's qcow2 driver, each
//! named below. Everything that sizes an allocation (L1 table, header area) is checked
//! against both the spec's limits and the file's real length first.

use super::super::{Compression, Error, Format, Result};
use std::fs::File;
use std::path::Path;

/// "QFI\xfb" (spec, byte 0).
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header length of version 2 images; version 3 headers are at least
/// [`V3_MIN_HEADER_LEN`] bytes (spec).
pub const V2_HEADER_LEN: u64 = 72;
pub const V3_MIN_HEADER_LEN: u64 = 104;
/// Byte offset of the v3 `compression_type` field (spec).
const COMPRESSION_TYPE_OFFSET: usize = 104;

/// qemu's `MIN_CLUSTER_BITS` / `MAX_CLUSTER_BITS`: 512 B to 2 MiB clusters.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB (spec, `cluster_bits`).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// qemu's `QCOW_MAX_L1_SIZE`: the active L1 table is at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's `QCOW_MAX_REFTABLE_SIZE`: the refcount table is at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The backing file name "must not be longer than 1023 bytes" (spec).
pub const MAX_BACKING_NAME_LEN: u64 = 1023;
/// `refcount_order` "may not exceed 6" (spec).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// qemu's block layer counts disks in 512-byte sectors (`BDRV_SECTOR_SIZE`).
const SECTOR_SIZE: u64 = 512;
/// Virtual sizes are `int64_t` in qemu's block layer.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64;

/// Incompatible feature bits (spec, `incompatible_features`).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// `crypt_method` values (spec): 0 none, 1 AES, 2 LUKS.
const CRYPT_NONE: u32 = 0;

/// `compression_type` values (spec).
const COMPRESSION_DEFLATE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;

/// Header extension types (spec, "Header extensions").
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// One feature name table entry: type, bit, 46-byte name (spec).
const FEATURE_NAME_ENTRY_LEN: usize = 48;

/// Host offset bits 9-55 of L1, L2 and refcount table entries (spec).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The backing file an image names, as stored in its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// The backing file name, as written (pcocc writes `../../data/XX/<sha256>`).
    pub name: String,
    /// The backing format header extension (`qcow2`, `raw`, …), when present.
    pub format: Option<String>,
    /// The content ID the backing file must carry (a VMDK's `parentCID`), when the
    /// format records one.
    pub content_id: Option<u32>,
}

/// The fields of a checked header that the reader uses.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_offset: u64,
    /// Entries of the L1 table needed to cover `size` (never more than the header's
    /// `l1_size`: entries past the virtual size only describe snapshot VM state).
    pub l1_entries: u64,
    pub compression: Compression,
    pub extended_l2: bool,
    pub backing: Option<BackingRef>,
    /// The external data file holding the guest clusters, by the name the header
    /// records (relative to the image's directory, or absolute).
    pub data_file: Option<String>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(super) fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        reason: reason.into(),
    }
}

fn unsupported(path: &Path, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        reason: reason.into(),
    }
}

/// Reads and checks the header of `file` (`file_len` bytes long).
pub fn parse(file: &File, path: &Path, file_len: u64) -> Result<Header> {
    if file_len < V2_HEADER_LEN {
        return Err(invalid(
            path,
            format!(
                "truncated header: the file has {file_len} bytes, a header needs {V2_HEADER_LEN}"
            ),
        ));
    }
    let mut fixed = [0u8; V2_HEADER_LEN as usize];
    super::super::read_exact_at(file, path, &mut fixed, 0)?;
    if fixed[0..4] != MAGIC {
        return Err(invalid(path, "no qcow2 magic (QFI\\xfb) at offset 0"));
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(
            path,
            format!("version {version} (only versions 2 and 3 exist)"),
        ));
    }
    let cluster_bits = be32(&fixed, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(invalid(
            path,
            format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"
            ),
        ));
    }
    let cluster_size = 1u64 << cluster_bits;

    // The header and its extensions live in the first cluster (spec): read it whole,
    // bounded by the 2 MiB cluster limit and by the file.
    let head_len = cluster_size.min(file_len);
    let mut head = vec![0u8; head_len as usize];
    super::super::read_exact_at(file, path, &mut head, 0)?;

    let (header_len, incompatible, refcount_order) = if version == 2 {
        (V2_HEADER_LEN, 0, 4)
    } else {
        if head_len < V3_MIN_HEADER_LEN {
            return Err(invalid(
                path,
                format!(
                    "truncated header: the file has {file_len} bytes, a version 3 header needs {V3_MIN_HEADER_LEN}"
                ),
            ));
        }
        let header_len = u64::from(be32(&head, 100));
        if header_len < V3_MIN_HEADER_LEN || header_len % 8 != 0 || header_len > head_len {
            return Err(invalid(
                path,
                format!(
                    "header_length {header_len} must be a multiple of 8 between {V3_MIN_HEADER_LEN} and the first cluster's {head_len} bytes"
                ),
            ));
        }
        (header_len, be64(&head, 72), be32(&head, 96))
    };
    if refcount_order > MAX_REFCOUNT_ORDER {
        return Err(invalid(
            path,
            format!("refcount_order {refcount_order} exceeds {MAX_REFCOUNT_ORDER}"),
        ));
    }

    // Backing file name: inside the first cluster, at most 1023 bytes.
    let backing_offset = be64(&fixed, 8);
    let backing_len = u64::from(be32(&fixed, 16));
    let backing_name = if backing_offset == 0 {
        None
    } else {
        if backing_len > MAX_BACKING_NAME_LEN
            || backing_offset < header_len
            || backing_offset.saturating_add(backing_len) > head_len
        {
            return Err(invalid(
                path,
                format!(
                    "backing file name ({backing_len} bytes at offset {backing_offset}) must be at most {MAX_BACKING_NAME_LEN} bytes inside the header cluster"
                ),
            ));
        }
        let raw = &head[backing_offset as usize..(backing_offset + backing_len) as usize];
        let name = std::str::from_utf8(raw)
            .map_err(|_| invalid(path, "backing file name is not UTF-8"))?;
        if name.is_empty() {
            None
        } else {
            Some(name.to_owned())
        }
    };

    // Header extensions, between the header and the backing name (or the cluster end).
    let ext_end = if backing_offset == 0 {
        head_len
    } else {
        backing_offset
    };
    let ext = parse_extensions(&head, header_len, ext_end, path)?;

    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let names: Vec<String> = (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(
                |b| match ext.feature_names.iter().find(|(bit, _)| *bit == b) {
                    Some((_, name)) => format!("bit {b} ({name})"),
                    None => format!("bit {b}"),
                },
            )
            .collect();
        return Err(unsupported(
            path,
            format!("unknown incompatible feature {}", names.join(", ")),
        ));
    }
    let data_file = match (
        incompatible & INCOMPAT_EXTERNAL_DATA != 0,
        ext.external_data_file,
    ) {
        (true, Some(name)) if !name.is_empty() => Some(name),
        (true, _) => {
            return Err(unsupported(
                path,
                "its data lives in an external data file it does not name (qemu needs the \
                 file given when opening it); convert it with qemu-img convert",
            ));
        }
        (false, Some(name)) => {
            return Err(invalid(
                path,
                format!(
                    "it names the external data file {name:?} without the external data \
                     feature bit"
                ),
            ));
        }
        (false, None) => None,
    };
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(invalid(
            path,
            "the image is marked corrupt; repair it with `qemu-img check -r all` first",
        ));
    }
    // The dirty bit only says refcounts may be stale; reading needs no refcounts.

    let crypt_method = be32(&fixed, 32);
    if crypt_method != CRYPT_NONE {
        let kind = match crypt_method {
            1 => "AES".to_string(),
            2 => "LUKS".to_string(),
            n => format!("method {n}"),
        };
        return Err(unsupported(
            path,
            format!("the image is encrypted ({kind}); decrypt it with qemu-img convert first"),
        ));
    }

    let compression_type = if header_len > COMPRESSION_TYPE_OFFSET as u64 {
        head[COMPRESSION_TYPE_OFFSET]
    } else {
        COMPRESSION_DEFLATE
    };
    let compression = if incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
        match compression_type {
            COMPRESSION_ZSTD => Compression::Zstd,
            COMPRESSION_DEFLATE => {
                return Err(invalid(
                    path,
                    "the compression type bit is set but compression_type is 0",
                ));
            }
            n => return Err(unsupported(path, format!("compression type {n}"))),
        }
    } else if compression_type != COMPRESSION_DEFLATE {
        return Err(invalid(
            path,
            format!("compression_type {compression_type} without the compression type feature bit"),
        ));
    } else {
        Compression::Deflate
    };

    let extended_l2 = incompatible & INCOMPAT_EXTENDED_L2 != 0;
    if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(invalid(
            path,
            format!(
                "extended L2 entries need clusters of at least 16 KiB, not {cluster_size} bytes"
            ),
        ));
    }

    // Tables: offsets cluster-aligned and inside the file, sizes within qemu's limits.
    let size = be64(&fixed, 24);
    if size > MAX_VIRTUAL_SIZE {
        return Err(invalid(
            path,
            format!("virtual size {size} exceeds qemu's limit of {MAX_VIRTUAL_SIZE} bytes"),
        ));
    }
    // qemu keeps whole sectors of the header's size (`total_sectors = size / 512` in its
    // qcow2 driver), so a size that is not a multiple of 512 reads, and is reported by
    // qemu-img info, cut down to one. Readers of the same file must agree on its length.
    let size = size / SECTOR_SIZE * SECTOR_SIZE;
    let l1_size = u64::from(be32(&fixed, 36));
    let l1_offset = be64(&fixed, 40);
    let entry_bytes = if extended_l2 { 16 } else { 8 };
    let l2_span = (cluster_size / entry_bytes) << cluster_bits;
    let l1_needed = size.div_ceil(l2_span);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(
            path,
            format!(
                "L1 table of {l1_size} entries exceeds qemu's limit of {} entries",
                MAX_L1_BYTES / 8
            ),
        ));
    }
    if l1_size < l1_needed {
        return Err(invalid(
            path,
            format!(
                "L1 table of {l1_size} entries is too small for a virtual size of {size} bytes ({l1_needed} needed)"
            ),
        ));
    }
    if l1_needed > 0 {
        check_table(
            path,
            "L1 table",
            l1_offset,
            l1_needed * 8,
            cluster_size,
            file_len,
        )?;
    }

    let reftable_offset = be64(&fixed, 48);
    let reftable_clusters = u64::from(be32(&fixed, 56));
    let reftable_bytes = reftable_clusters << cluster_bits;
    if reftable_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(invalid(
            path,
            format!(
                "refcount table of {reftable_clusters} clusters must be between 1 cluster and qemu's limit of {MAX_REFTABLE_BYTES} bytes"
            ),
        ));
    }
    check_table(
        path,
        "refcount table",
        reftable_offset,
        reftable_bytes.min(cluster_size),
        cluster_size,
        file_len,
    )?;

    let nb_snapshots = be32(&fixed, 60);
    let snapshots_offset = be64(&fixed, 64);
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(invalid(
            path,
            format!("{nb_snapshots} snapshots exceed qemu's limit of {MAX_SNAPSHOTS}"),
        ));
    }
    if nb_snapshots > 0 && !snapshots_offset.is_multiple_of(cluster_size) {
        return Err(invalid(
            path,
            format!("snapshot table offset {snapshots_offset} is not cluster-aligned"),
        ));
    }

    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_offset,
        l1_entries: l1_needed,
        compression,
        extended_l2,
        backing: backing_name.map(|name| BackingRef {
            name,
            format: ext.backing_format,
            content_id: None,
        }),
        data_file,
    })
}

/// Checks that a table of `len` bytes at `offset` is cluster-aligned and inside the file.
fn check_table(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(invalid(
            path,
            format!(
                "{what} offset {offset} is not a nonzero multiple of the cluster size {cluster_size}"
            ),
        ));
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(invalid(
            path,
            format!(
                "{what} ({len} bytes at offset {offset}) extends past the end of the file ({file_len} bytes)"
            ),
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    external_data_file: Option<String>,
    feature_names: Vec<(u32, String)>,
}

fn parse_extensions(head: &[u8], start: u64, end: u64, path: &Path) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let end = (end as usize).min(head.len());
    let mut at = start as usize;
    while at + 8 <= end {
        let kind = be32(head, at);
        let len = be32(head, at + 4) as usize;
        if kind == EXT_END {
            break;
        }
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|&e| e <= end)
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("header extension {kind:#x} at offset {at} overruns the header area"),
                )
            })?;
        let data = &head[data_start..data_end];
        let text = || String::from_utf8_lossy(data).into_owned();
        match kind {
            EXT_BACKING_FORMAT => ext.backing_format = Some(text()),
            EXT_EXTERNAL_DATA_FILE => ext.external_data_file = Some(text()),
            EXT_FEATURE_NAMES => {
                for entry in data.chunks_exact(FEATURE_NAME_ENTRY_LEN) {
                    // Only incompatible features (type 0) matter for error messages.
                    if entry[0] == 0 {
                        let name = &entry[2..];
                        let n = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        ext.feature_names.push((
                            u32::from(entry[1]),
                            String::from_utf8_lossy(&name[..n]).into_owned(),
                        ));
                    }
                }
            }
            _ => {} // Unknown extensions "can be safely ignored" (spec).
        }
        at = data_start + len.next_multiple_of(8);
    }
    Ok(ext)
}
