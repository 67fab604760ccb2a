//! What every format reader keeps of the file it reads, and the one bounds check every
//! [`Layer::map`](super::Layer::map) starts with, so that the readers differ only in
//! how they read their tables.

use super::{Error, Mapping, Result};
use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open image file, shared by the layer and the mappings it hands out.
#[derive(Debug)]
pub(crate) struct LayerFile {
    pub file: Arc<File>,
    /// The path it was opened from, named in every error and mapping.
    pub path: Arc<PathBuf>,
    /// Its length in bytes when opened; tables are checked against it.
    pub len: u64,
    /// Bytes it occupies on disk (`st_blocks` × 512), the layer's allocated size.
    pub allocated: u64,
    /// Its device and inode.
    pub id: (u64, u64),
}

impl LayerFile {
    /// `file`, opened from `path`, whose metadata the reader has already read.
    pub fn new(file: File, path: &Path, meta: &Metadata) -> LayerFile {
        LayerFile {
            file: Arc::new(file),
            path: Arc::new(path.to_path_buf()),
            len: meta.len(),
            allocated: meta.blocks() * 512,
            id: (meta.dev(), meta.ino()),
        }
    }

    /// Guest bytes stored verbatim from file offset `offset`.
    pub fn data(&self, offset: u64) -> Mapping {
        Mapping::Data {
            file: self.file.clone(),
            path: self.path.clone(),
            offset,
        }
    }
}

/// The end of a `map(offset, max_len)` request on a disk of `size` bytes: `offset +
/// max_len` cut at `size`. A request that is empty or starts at or past the end is
/// [`Error::OutOfRange`], naming `path`.
pub(crate) fn map_end(path: &Path, offset: u64, max_len: u64, size: u64) -> Result<u64> {
    if offset >= size || max_len == 0 {
        return Err(Error::OutOfRange {
            path: path.to_path_buf(),
            offset,
            size,
        });
    }
    Ok(offset.saturating_add(max_len).min(size))
}
