//! Disk image readers, format detection and the import converter.
//!
//! Every format is reduced to one question, asked of a [`Layer`]: *what backs guest
//! offset X, and for how long?* The answer is a [`Mapping`]: bytes stored verbatim at a
//! host offset, a compressed cluster, known zeroes, or nothing (fall through to the
//! backing layer). A [`Disk`] stacks layers (top first) and resolves "nothing" down the
//! chain; one loop ([`Disk::read_at`]) turns mappings into bytes, and the same mappings
//! drive hole reporting, view layouts and conversion. Layers never keep a cursor: every
//! read is positioned, so one reader serves many threads at once.
//!
//! Every image is untrusted input: each format module documents the limits it enforces
//! before it allocates or follows anything, and refuses tables shared between entries
//! (one L2 table named by every L1 entry would make a small file describe petabytes).
//! Whatever walks a whole disk's map (view layouts, the converter) goes through
//! [`Disk::walk`], whose extents and kept data runs are bounded by what the layers
//! store ([`Disk::walk_limits`]). `tests/hostile.rs` feeds mutated images of every
//! format to all of it.

mod cache;
pub mod chain;
pub mod compressed;
pub mod convert;
pub mod detect;
mod file;
pub mod qcow2;
pub mod qcow2_delta;
pub mod qcow2_layout;
pub mod qcow2_overlay;
pub mod qed;
pub mod raw;
pub(crate) mod tables;
pub mod vdi;
pub mod vmdk;
pub mod vmdk_extents;
pub mod vpc;
pub mod writeback;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// A disk format this project reads (and, through views, generates).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    Raw,
    Qcow2,
    Qed,
    Vdi,
    Vpc,
    Vmdk,
}

impl Format {
    /// Every format, in the order the tree lists views.
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Qed,
        Format::Vdi,
        Format::Vpc,
        Format::Vmdk,
    ];

    /// The name qemu-img and pcocc use (`-f`/`-O`/`-t`), also the view file suffix.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "qed",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vmdk => "vmdk",
        }
    }

    /// Parses a format name as pcocc accepts it (`-t`, `FMT:` prefixes, file suffixes).
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the image layer. Each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid image of the format it claims (or was forced to).
    #[error("{path}: invalid {format} image: {reason}")]
    Invalid {
        path: PathBuf,
        format: Format,
        reason: String,
    },
    /// A valid image that uses something this project refuses to follow or decode.
    #[error("{path}: unsupported {format} image: {reason}")]
    Unsupported {
        path: PathBuf,
        format: Format,
        reason: String,
    },
    /// A forced format (`-t`) that the content contradicts; `detected` is qemu's name
    /// of the content's format, which may be one pcocc does not import.
    #[error("{path}: format mismatch: {forced} was specified but the file is a {detected} image")]
    FormatMismatch {
        path: PathBuf,
        forced: Format,
        detected: &'static str,
    },
    /// Content of a format qemu knows and pcocc does not import (pcocc's message).
    #[error("{path}: {name} is not a valid image format")]
    NotAFormat { path: PathBuf, name: &'static str },
    /// A read or map request outside the disk.
    #[error("{path}: offset {offset} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        size: u64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The errno a FUSE reply or a CLI exit should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } | Error::NotAFormat { .. } => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

/// Compression of a stored cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate stream with no zlib header (qcow2's default compression).
    Deflate,
    /// Deflate stream with a zlib header (VMDK streamOptimized grains).
    Zlib,
    /// A zstd frame (qcow2 compression type 1).
    Zstd,
}

/// A compressed cluster: `stored_len` bytes at `offset` in `file` inflate to at least
/// `cluster_len` bytes, of which the mapping's guest range starts `skip` bytes in.
#[derive(Clone, Debug)]
pub struct CompressedCluster {
    pub file: Arc<File>,
    pub path: Arc<PathBuf>,
    pub offset: u64,
    pub stored_len: u64,
    pub cluster_len: u64,
    pub skip: u64,
    pub compression: Compression,
}

/// What backs a run of guest bytes.
#[derive(Clone, Debug)]
pub enum Mapping {
    /// Stored verbatim: the run's first byte is at `offset` in `file`.
    Data {
        file: Arc<File>,
        path: Arc<PathBuf>,
        offset: u64,
    },
    /// Inside one compressed cluster.
    Compressed(CompressedCluster),
    /// Known to read as zeroes (qcow2 zero flag, a hole in a raw file, …).
    Zero,
    /// Not described by this layer: read the backing layer (zeroes at the bottom).
    Unallocated,
}

impl Mapping {
    /// True when the bytes come from stored data (what `qemu-img map` calls `data`).
    pub fn is_data(&self) -> bool {
        matches!(self, Mapping::Data { .. } | Mapping::Compressed(_))
    }
}

/// A run of `len` guest bytes with one mapping.
#[derive(Clone, Debug)]
pub struct Extent {
    pub len: u64,
    pub mapping: Mapping,
}

/// One image file in one format. Implementations are immutable after open and answer
/// positioned queries from any thread.
pub trait Layer: Send + Sync + fmt::Debug {
    /// The format this layer was read as.
    fn format(&self) -> Format;
    /// The file this layer was opened from.
    fn path(&self) -> &std::path::Path;
    /// Guest size in bytes, as `qemu-img info` reports it.
    fn virtual_size(&self) -> u64;
    /// What backs guest offset `offset`, for at most `max_len` bytes (`max_len` > 0 and
    /// `offset < virtual_size()`). The returned extent is never empty.
    fn map(&self, offset: u64, max_len: u64) -> Result<Extent>;
    /// Bytes this file really occupies on disk (its `st_blocks` × 512).
    fn allocated_bytes(&self) -> u64;
    /// Device and inode of the file read, where the reader knows them.
    fn file_id(&self) -> Option<(u64, u64)> {
        None
    }
    /// Whether guest byte `x` is byte `x` of the file for the whole disk (a raw file, a
    /// fixed VHD): then what is known of the file's first bytes is known of the guest.
    fn guest_at_file_offsets(&self) -> bool {
        false
    }
    /// The backing file this layer names, read where [`Mapping::Unallocated`] (only
    /// layers opened as overlays name one; see `chain`).
    fn backing(&self) -> Option<&qcow2::BackingRef> {
        None
    }
    /// The content ID an overlay naming this layer checks (a VMDK's `CID`).
    fn content_id(&self) -> Option<u32> {
        None
    }
}

/// Upper bound of a backing chain (qcow2 layers over their base). pcocc adds one layer
/// per resize or save, so real chains are short; this bound stops loops and abuse.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A guest disk: layers stacked top first. Unallocated runs of a layer fall through to the
/// next; past the last layer (or past a shorter backing layer's end) the disk reads zero.
#[derive(Debug, Clone)]
pub struct Disk {
    layers: Vec<Arc<dyn Layer>>,
}

impl Disk {
    /// A disk made of `layers`, top first. The virtual size is the top layer's.
    ///
    /// # Panics
    /// If `layers` is empty (a programming error, not an input error).
    pub fn new(layers: Vec<Arc<dyn Layer>>) -> Disk {
        assert!(!layers.is_empty(), "a disk needs at least one layer");
        Disk { layers }
    }

    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    pub fn top(&self) -> &Arc<dyn Layer> {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// What backs guest offset `offset` for at most `max_len` bytes, resolved down the
    /// chain: the answer is never [`Mapping::Unallocated`].
    pub fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.virtual_size();
        if offset >= size || max_len == 0 {
            return Err(Error::OutOfRange {
                path: self.layers[0].path().to_path_buf(),
                offset,
                size,
            });
        }
        let ext = map_layers(&self.layers, offset, max_len.min(size - offset))?;
        Ok(match ext.mapping {
            // Past every layer: the disk reads as zeroes there.
            Mapping::Unallocated => Extent {
                len: ext.len,
                mapping: Mapping::Zero,
            },
            _ => ext,
        })
    }

    /// Fills `buf` with guest bytes from `offset`. Reading past the end is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::OutOfRange {
                path: self.layers[0].path().to_path_buf(),
                offset: offset.saturating_add(buf.len() as u64),
                size,
            });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ext = self.map(pos, (buf.len() - done) as u64)?;
            let n = ext.len as usize;
            let out = &mut buf[done..done + n];
            match ext.mapping {
                Mapping::Data { file, path, offset } => read_exact_at(&file, &path, out, offset)?,
                Mapping::Compressed(c) => decompress_into(&c, out)?,
                Mapping::Zero | Mapping::Unallocated => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Asks the kernel to start reading, in the background, the stored bytes behind
    /// guest `[offset, offset + len)` (`POSIX_FADV_WILLNEED` on each run of data, runs
    /// adjacent in one file merged into one call). A sequential reader of a chain
    /// needs this: an overlay's clusters sit in the order they were written, so a
    /// guest-order read of them is a series of small random reads, each of which the
    /// kernel's own read-ahead leaves alone and which would otherwise wait on the disk
    /// one at a time. Advice only: errors (a corrupt map, a refused call) are ignored,
    /// the read that follows reports them.
    pub fn prefetch(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.virtual_size());
        // (file, host start, host end) of the run being gathered.
        let mut run: Option<(Arc<File>, u64, u64)> = None;
        let mut pos = offset;
        while pos < end {
            let Ok(ext) = self.map(pos, end - pos) else {
                break;
            };
            let stored = match &ext.mapping {
                Mapping::Data { file, offset, .. } => Some((file, *offset, ext.len)),
                Mapping::Compressed(c) => Some((&c.file, c.offset, c.stored_len)),
                Mapping::Zero | Mapping::Unallocated => None,
            };
            if let Some((file, host, n)) = stored {
                match &mut run {
                    Some((f, _, e)) if Arc::ptr_eq(f, file) && *e == host => *e = host + n,
                    // A compressed cluster read again for its next guest extent.
                    Some((f, s, e)) if Arc::ptr_eq(f, file) && (*s..*e).contains(&host) => {
                        *e = (*e).max(host + n)
                    }
                    _ => {
                        if let Some((f, s, e)) = run.take() {
                            advise_willneed(&f, s, e - s);
                        }
                        run = Some((file.clone(), host, host + n));
                    }
                }
            }
            pos += ext.len;
        }
        if let Some((f, s, e)) = run {
            advise_willneed(&f, s, e - s);
        }
    }

    /// The runs of guest data in `[offset, offset + len)`, merged: each item is
    /// `(start, length)` of bytes that some layer stores (everything else reads zero).
    /// At most [`Disk::walk_limits`]`.runs` runs are kept.
    pub fn data_extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len).min(self.virtual_size());
        let max_runs = self.walk_limits().runs;
        let mut out: Vec<(u64, u64)> = Vec::new();
        self.walk(offset, end, |pos, ext| {
            if ext.mapping.is_data() {
                let kept = out.len() as u64;
                match out.last_mut() {
                    Some((s, l)) if *s + *l == pos => *l += ext.len,
                    _ if kept >= max_runs => return Err(self.too_fragmented()),
                    _ => out.push((pos, ext.len)),
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// How far a walk over this disk's map may go. A real image needs stored bytes for
    /// every change of mapping (a table entry at least) and for every run of data (a
    /// cluster at least), so the limits grow with what the layers store; a hostile image
    /// whose tables are shared or repeated (one L2 table named by every L1 entry) cannot
    /// make a small file describe billions of runs and hold a layout's memory or a
    /// conversion's time without bound.
    pub fn walk_limits(&self) -> WalkLimits {
        let stored: u64 = self.layers.iter().map(|l| l.allocated_bytes()).sum();
        WalkLimits {
            extents: MIN_WALK_EXTENTS.max(stored / STORED_BYTES_PER_EXTENT),
            runs: MIN_WALK_RUNS.max(stored / STORED_BYTES_PER_RUN),
        }
    }

    /// Calls `f(offset, extent)` for the extents covering `[start, end)`, in order. Fails
    /// once more than [`Disk::walk_limits`]`.extents` extents were visited.
    pub fn walk(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, &Extent) -> Result<()>,
    ) -> Result<()> {
        let end = end.min(self.virtual_size());
        let max_extents = self.walk_limits().extents;
        let mut visited = 0u64;
        let mut pos = start;
        while pos < end {
            // Never empty nor past `end`: `map` checks every layer's answer.
            let ext = self.map(pos, end - pos)?;
            visited += 1;
            if visited > max_extents {
                return Err(self.too_fragmented());
            }
            f(pos, &ext)?;
            pos += ext.len;
        }
        Ok(())
    }

    /// The error of a walk past [`Disk::walk_limits`].
    pub fn too_fragmented(&self) -> Error {
        let limits = self.walk_limits();
        Error::Unsupported {
            path: self.top().path().to_path_buf(),
            format: self.top().format(),
            reason: format!(
                "its tables describe more than {} extents or {} runs of data, more than \
                 the {} bytes its files store can hold (shared or repeated tables?)",
                limits.extents,
                limits.runs,
                self.layers.iter().map(|l| l.allocated_bytes()).sum::<u64>()
            ),
        }
    }
}

/// The most a walk over a disk's whole map may visit and keep: see [`Disk::walk_limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkLimits {
    /// Extents visited (each one `map` call).
    pub extents: u64,
    /// Runs of data kept (by a layout, a conversion, [`Disk::data_extents`]).
    pub runs: u64,
}

/// Floors of [`WalkLimits`], whatever the layers store: 16 Mi extents take seconds to
/// walk, 1 Mi runs take tens of MiB to keep.
pub const MIN_WALK_EXTENTS: u64 = 1 << 24;
pub const MIN_WALK_RUNS: u64 = 1 << 20;
/// A change of mapping costs a real image at least one stored table entry (4 bytes: a
/// VMDK grain table entry, a VDI block map entry, a VHD BAT entry).
const STORED_BYTES_PER_EXTENT: u64 = 4;
/// A run of data costs a real image at least one stored cluster or block; the smallest
/// are 512 bytes (qcow2, VMDK), and compressed clusters can be smaller, so this is
/// generous to real images and still far below what shared tables claim.
const STORED_BYTES_PER_RUN: u64 = 512;

/// `posix_fadvise(WILLNEED)` of `len` bytes at `offset` of `file` (`len` 0: to the
/// end): the kernel queues the reads and returns without waiting for them.
pub(crate) fn advise_willneed(file: &File, offset: u64, len: u64) {
    use std::os::unix::io::AsFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    let _ = crate::sys::fadvise_willneed(file.as_fd(), off, len);
}

/// `pread` that fills `buf` completely; reading past the end of the file is an error
/// (a table that points past the end of its file is a corrupt image).
pub fn read_exact_at(
    file: &File,
    path: &std::path::Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::io(
                path,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "data at offset {offset} (+{}) is past the end of the file",
                        buf.len()
                    ),
                ),
            )
        } else {
            Error::io(path, e)
        }
    })
}

/// Inflates the compressed cluster `c` and copies `out.len()` bytes from `c.skip`
/// (bounds, caching and decoders: see [`compressed`]).
pub fn decompress_into(c: &CompressedCluster, out: &mut [u8]) -> Result<()> {
    compressed::decompress_into(c, out)
}

/// What backs guest offset `offset` for at most `len` bytes in `layers` (top first):
/// the first layer that does not fall through decides; [`Mapping::Unallocated`] where
/// every one does. A layer shorter than the one above it reads as zeroes past its end.
pub fn map_layers(layers: &[Arc<dyn Layer>], offset: u64, len: u64) -> Result<Extent> {
    let mut len = len;
    for layer in layers {
        if offset >= layer.virtual_size() {
            return Ok(Extent {
                len,
                mapping: Mapping::Zero,
            });
        }
        let asked = len.min(layer.virtual_size() - offset);
        let ext = layer.map(offset, asked)?;
        if ext.len == 0 || ext.len > asked {
            // Every loop over extents relies on this: an empty answer would spin.
            return Err(Error::Invalid {
                path: layer.path().to_path_buf(),
                format: layer.format(),
                reason: format!(
                    "its tables map {} bytes at guest offset {offset} ({asked} asked)",
                    ext.len
                ),
            });
        }
        match ext.mapping {
            Mapping::Unallocated => len = ext.len.min(len),
            _ => return Ok(ext),
        }
    }
    Ok(Extent {
        len,
        mapping: Mapping::Unallocated,
    })
}
