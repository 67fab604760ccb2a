//! Multi-file VMDKs: a text descriptor file that lists the disk's extents, each in a file
//! of its own (VMware "Virtual Disk Format 1.1", "The Descriptor File"):
//! `monolithicFlat` (one raw extent, `x-flat.vmdk`), `twoGbMaxExtentFlat` and
//! `twoGbMaxExtentSparse` (the disk cut into 2 GiB extents, raw or hosted sparse), and
//! ESXi's pair of a descriptor and a `VMFS` raw extent.
//!
//! An extent line reads `RW SECTORS TYPE "FILE" [OFFSET]`: `FLAT` (OFFSET required) and
//! `VMFS` (OFFSET optional) extents are raw bytes of FILE from sector OFFSET, `SPARSE`
//! extents are hosted sparse files ([`super::vmdk`]). The extents follow each other in
//! the order listed; the disk's size is their sum. That is the disk qemu reads, which
//! pcocc imports. qemu silently skips `RDONLY`, `NOACCESS` and `ZERO` extent lines, so
//! that its disk is shorter than VMware's: such lines are refused here rather than
//! imported as a disk that is neither VMware's nor qemu's.
//!
//! The extent files are whatever the descriptor names, so only a reader acting for a user
//! opens them, through an [`ExtentFiles`] that opens names with that user's rights
//! (`pcocc image import`, which is the user's own process). Imports through the mount
//! never get here: the daemon cannot read the writer's files. A parent disk (a
//! snapshot's `parentFileNameHint` and `parentCID`, both required) is named by the layer
//! for the caller to follow (see `chain`). Refused: other extent types (`VMFSSPARSE`,
//! `SESPARSE`, raw device maps), more than [`MAX_EXTENTS`] extents, and a descriptor
//! larger than [`MAX_DESCRIPTOR`].

use super::file::map_end;
use super::qcow2::BackingRef;
use super::{Error, Extent, Format, Layer, Mapping, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SECTOR: u64 = 512;
/// A descriptor file is a few hundred bytes; a larger file is not read as one.
pub const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Extents of one disk (each keeps its file open): 2 TiB in 2 GiB extents is 1024.
pub const MAX_EXTENTS: usize = 4096;

/// Opens the extent files a descriptor names.
pub trait ExtentFiles {
    /// Opens `name`, as written in the descriptor at `descriptor` (relative names are
    /// relative to its directory): the path it is known by and the open regular file.
    fn open(&self, descriptor: &Path, name: &str) -> Result<(PathBuf, File)>;
}

/// What an extent line describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Raw bytes of `file` from byte `offset` (`FLAT` and `VMFS`).
    Flat { file: String, offset: u64 },
    /// A hosted sparse extent file (`SPARSE`).
    Sparse { file: String },
}

/// One extent line: its length in bytes and what holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub len: u64,
    pub kind: ExtentKind,
}

/// True when `head` (a file's first bytes) is a text descriptor rather than a sparse
/// extent: no binary magic, and text whose first meaningful line is a comment or a
/// descriptor key.
pub fn is_descriptor(head: &[u8]) -> bool {
    if head.starts_with(b"KDMV") || head.starts_with(b"COWD") {
        return false;
    }
    let text = String::from_utf8_lossy(head);
    let text = text.trim_start();
    text.starts_with('#') || text.starts_with("version=")
}

/// True when `file` (opened from `path`) starts as a text descriptor.
pub fn file_is_descriptor(file: &File, path: &Path) -> Result<bool> {
    let mut head = [0u8; 512];
    let got = super::tables::read_upto_at(file, path, &mut head, 0)?;
    Ok(is_descriptor(&head[..got]))
}

/// Parses a descriptor's text into its extents and what ties the disk to a parent,
/// refusing what is not read (see the module comment). Errors are reasons, for the
/// caller to wrap.
pub(super) fn parse(
    text: &str,
) -> std::result::Result<(Vec<ExtentLine>, super::vmdk::Descriptor), String> {
    let mut keys = super::vmdk::DescriptorKeys::default();
    let mut extents = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && !line.starts_with("RW ")
            && !line.starts_with("RDONLY ")
            && !line.starts_with("NOACCESS ")
        {
            keys.note(key.trim(), value.trim().trim_matches('"'))?;
            continue;
        }
        extents.push(parse_extent(line)?);
        if extents.len() > MAX_EXTENTS {
            return Err(format!("it lists more than {MAX_EXTENTS} extents"));
        }
    }
    if extents.is_empty() {
        return Err("the descriptor lists no extent".into());
    }
    Ok((extents, keys.finish()?))
}

fn parse_extent(line: &str) -> std::result::Result<ExtentLine, String> {
    let bad = || format!("the extent line `{line}` cannot be read");
    let mut words = line.splitn(3, char::is_whitespace);
    let access = words.next().ok_or_else(bad)?;
    let sectors: u64 = words
        .next()
        .and_then(|w| w.trim().parse().ok())
        .ok_or_else(bad)?;
    let rest = words.next().ok_or_else(bad)?.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let rest = rest.trim();
    match access {
        "RW" => {}
        "RDONLY" | "NOACCESS" => {
            return Err(format!(
                "the extent `{line}` is {access}, which qemu (and so pcocc) leaves out of the disk"
            ));
        }
        _ => return Err(bad()),
    }
    let len = sectors
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("the extent `{line}` is too large"))?;
    let file = || -> std::result::Result<(String, &str), String> {
        let quoted = rest.strip_prefix('"').ok_or_else(bad)?;
        let (name, after) = quoted.split_once('"').ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        Ok((name.to_string(), after.trim()))
    };
    let kind = match kind {
        "FLAT" | "VMFS" => {
            let (file, after) = file()?;
            let sectors: u64 = if after.is_empty() && kind == "VMFS" {
                0
            } else {
                after.parse().map_err(|_| bad())?
            };
            let offset = sectors
                .checked_mul(SECTOR)
                .ok_or_else(|| format!("the extent `{line}` has too large an offset"))?;
            ExtentKind::Flat { file, offset }
        }
        "SPARSE" => ExtentKind::Sparse { file: file()?.0 },
        "ZERO" => {
            return Err(format!(
                "the extent `{line}` is a ZERO extent, which qemu (and so pcocc) leaves out of \
                 the disk"
            ));
        }
        other => {
            return Err(format!(
                "extents of type {other} are not read (only FLAT, VMFS and SPARSE)"
            ));
        }
    };
    Ok(ExtentLine { len, kind })
}

#[derive(Debug)]
enum Part {
    Flat {
        file: Arc<File>,
        path: Arc<PathBuf>,
        offset: u64,
        file_len: u64,
    },
    Sparse(super::vmdk::VmdkLayer),
}

/// A disk made of the extents of a descriptor file.
#[derive(Debug)]
pub struct ExtentsLayer {
    path: PathBuf,
    size: u64,
    /// Each extent's first guest byte and its part, in guest order.
    parts: Vec<(u64, u64, Part)>,
    allocated: u64,
    /// The descriptor's `CID`.
    cid: Option<u32>,
    /// The parent disk, for a layer opened as an overlay.
    backing: Option<BackingRef>,
}

/// Opens the descriptor `file` (opened from `path`) and every extent it names through
/// `files`; a parent disk it names is [`Layer::backing`] (with the `CID` it must carry),
/// for the caller to follow.
pub fn open(file: &File, path: &Path, files: &dyn ExtentFiles) -> Result<ExtentsLayer> {
    let unsupported = |reason: String| Error::Unsupported {
        path: path.to_path_buf(),
        format: Format::Vmdk,
        reason,
    };
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > MAX_DESCRIPTOR {
        return Err(unsupported(format!(
            "a descriptor file of {len} bytes (at most {MAX_DESCRIPTOR} are read)"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| Error::io(path, e))?;
    // qemu pads the descriptor it rewrites with NULs: the text ends at the first one.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    let (lines, keys) = parse(&text).map_err(unsupported)?;
    let mut parts = Vec::with_capacity(lines.len());
    let mut start = 0u64;
    let mut allocated = 0u64;
    for line in lines {
        let part = match line.kind {
            ExtentKind::Flat { file: name, offset } => {
                let (p, f) = files.open(path, &name)?;
                let m = f.metadata().map_err(|e| Error::io(&p, e))?;
                allocated = allocated.saturating_add(m.blocks() * SECTOR);
                Part::Flat {
                    file: Arc::new(f),
                    path: Arc::new(p),
                    offset,
                    file_len: m.len(),
                }
            }
            ExtentKind::Sparse { file: name } => {
                let (p, f) = files.open(path, &name)?;
                let layer = super::vmdk::VmdkLayer::new(f, &p)?;
                allocated = allocated.saturating_add(layer.allocated_bytes());
                Part::Sparse(layer)
            }
        };
        parts.push((start, line.len, part));
        start = start
            .checked_add(line.len)
            .ok_or_else(|| unsupported("the extents add up to more than 16 EiB".into()))?;
    }
    Ok(ExtentsLayer {
        path: path.to_path_buf(),
        size: start,
        parts,
        allocated,
        cid: keys.cid,
        backing: keys.backing(),
    })
}

impl Layer for ExtentsLayer {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = map_end(&self.path, offset, max_len, self.size)?;
        // Empty extents end where they start and are skipped.
        let i = self
            .parts
            .partition_point(|(start, len, _)| start + len <= offset);
        let (start, len, part) = &self.parts[i];
        let rel = offset - start;
        let want = (end - offset).min(len - rel);
        let zero = |len| Extent {
            len,
            mapping: Mapping::Zero,
        };
        Ok(match part {
            Part::Flat {
                file,
                path,
                offset: base,
                file_len,
            } => {
                let at = base.saturating_add(rel);
                // Past the end of a short flat file, the disk reads zeroes (as qemu).
                if at >= *file_len {
                    zero(want)
                } else {
                    Extent {
                        len: want.min(file_len - at),
                        mapping: Mapping::Data {
                            file: file.clone(),
                            path: path.clone(),
                            offset: at,
                        },
                    }
                }
            }
            Part::Sparse(layer) => {
                let size = layer.virtual_size();
                if rel >= size {
                    zero(want)
                } else {
                    layer.map(rel, want.min(size - rel))?
                }
            }
        })
    }

    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn content_id(&self) -> Option<u32> {
        self.cid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_lines_of_every_kind_are_read() {
        let text = "# Disk DescriptorFile\nversion=1\nCID=1a32e10d\nparentCID=ffffffff\n\
                    createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
                    RW 4194304 SPARSE \"s-s001.vmdk\"\nRW 16 FLAT \"a b.vmdk\" 8\n\
                    RW 8 VMFS \"esx-flat.vmdk\"\nddb.adapterType = \"ide\"\n";
        assert_eq!(
            parse(text).unwrap().0,
            [
                ExtentLine {
                    len: 4194304 * 512,
                    kind: ExtentKind::Sparse {
                        file: "s-s001.vmdk".into()
                    }
                },
                ExtentLine {
                    len: 16 * 512,
                    kind: ExtentKind::Flat {
                        file: "a b.vmdk".into(),
                        offset: 8 * 512
                    }
                },
                ExtentLine {
                    len: 8 * 512,
                    kind: ExtentKind::Flat {
                        file: "esx-flat.vmdk".into(),
                        offset: 0
                    }
                },
            ]
        );
    }

    #[test]
    fn parents_unknown_types_and_bad_lines_are_refused() {
        let ok = "RW 8 FLAT \"f\" 0\n";
        for (extra, why) in [
            ("parentCID=12345678\n", "parent"),
            ("parentFileNameHint=\"base.vmdk\"\n", "parent"),
            ("RW 8 VMFSSPARSE \"d.vmdk\"\n", "VMFSSPARSE"),
            ("RW 8 SESPARSE \"d.vmdk\"\n", "SESPARSE"),
            ("NOACCESS 8 FLAT \"d\" 0\n", "NOACCESS"),
            ("RDONLY 8 FLAT \"d\" 0\n", "RDONLY"),
            ("RW 8 ZERO\n", "ZERO"),
            ("RW 8 FLAT \"d\"\n", "cannot be read"),
            ("RW x FLAT \"d\" 0\n", "cannot be read"),
            ("RW 8 FLAT d 0\n", "cannot be read"),
            ("RW 8 FLAT \"\" 0\n", "cannot be read"),
            ("RW 99999999999999999999 FLAT \"d\"\n", "cannot be read"),
            ("RW 36028797018963968 FLAT \"d\"\n", "too large"),
        ] {
            let err = parse(&format!("version=1\n{ok}{extra}")).unwrap_err();
            assert!(err.contains(why), "{extra:?}: {err}");
        }
        assert!(parse("version=1\n").unwrap_err().contains("no extent"));
        assert!(
            parse(&format!("version=1\n{}", ok.repeat(MAX_EXTENTS + 1)))
                .unwrap_err()
                .contains("more than")
        );
    }

    #[test]
    fn descriptors_are_told_from_sparse_files() {
        assert!(is_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(is_descriptor(b"\n  version=1\nCID=1\n"));
        assert!(!is_descriptor(b"KDMV\x01\0\0\0# Disk DescriptorFile"));
        assert!(!is_descriptor(b"\0\0\0\0"));
    }
}
