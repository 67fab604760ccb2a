//! Raw images: the file is the guest disk. Holes in the file (found with
//! `SEEK_DATA`/`SEEK_HOLE`) read as zeroes and are reported as [`Mapping::Zero`], so a
//! sparse raw file stays sparse through every view and conversion.

use super::file::{LayerFile, map_end};
use super::{Error, Extent, Format, Layer, Mapping, Result};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

#[derive(Debug)]
pub struct RawLayer {
    src: LayerFile,
}

impl RawLayer {
    /// Opens `file` (already opened from `path`) as a raw disk of its current length.
    pub fn new(file: File, path: &Path) -> Result<RawLayer> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        Ok(RawLayer {
            src: LayerFile::new(file, path, &meta),
        })
    }

    pub fn open(path: &Path) -> Result<RawLayer> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        RawLayer::new(file, path)
    }

    /// `lseek(fd, offset, whence)`; `None` when the kernel answers ENXIO (no more data)
    /// or the filesystem does not support the query.
    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        crate::sys::lseek_data_hole(self.src.file.as_fd(), offset, whence)
            .ok()
            .flatten()
    }
}

impl Layer for RawLayer {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn file_id(&self) -> Option<(u64, u64)> {
        Some(self.src.id)
    }

    fn guest_at_file_offsets(&self) -> bool {
        true
    }

    fn path(&self) -> &Path {
        &self.src.path
    }

    /// The file's length when opened.
    fn virtual_size(&self) -> u64 {
        self.src.len
    }

    fn allocated_bytes(&self) -> u64 {
        self.src.allocated
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = map_end(&self.src.path, offset, max_len, self.src.len)?;
        let data = match self.seek(offset, libc::SEEK_DATA) {
            Some(d) => d,
            // No data at or after `offset` (ENXIO), or no hole support: decide below.
            None => {
                if self.seek(offset, libc::SEEK_HOLE).is_some() {
                    end
                } else {
                    offset
                }
            }
        };
        if data > offset {
            return Ok(Extent {
                len: data.min(end) - offset,
                mapping: Mapping::Zero,
            });
        }
        let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
        Ok(Extent {
            len: hole.clamp(offset + 1, end) - offset,
            mapping: self.src.data(offset),
        })
    }
}
