//! Open files: what a file handle of the mount (or an export) reads from or writes to.
//!
//! Opening resolves a node once into what serves it: the bytes of `meta.json`, a stored
//! layer file (`disk.qcow2` of a single-layer revision), a generated [`View`], or a file
//! being imported. Later reads then need no lookup, no metadata and no lock, so one open
//! file serves many reader threads at once. Revision files never change, so their
//! handles say so ([`OpenFile::immutable`]) and the adapter lets the kernel keep their
//! pages.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::import::ImportHandle;
use super::views::Content;
use super::{Attr, Caller, Error, FileKind, Node, Tree, metajson};
use crate::view::{ReadAhead, View};

/// What a change did to names the kernel may have cached: entries whose cache must be
/// dropped (parent node, name), and objects that moved to another node (a rename: the
/// kernel moves its inode with the name, so the inode must now stand for the new node,
/// and so must the inodes of everything below it), and objects that are gone (their
/// inode numbers must never stand for whatever takes their place later).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub entries: Vec<(Node, String)>,
    pub moved: Vec<(Node, Node)>,
    pub gone: Vec<Node>,
}

/// One open file. `Send + Sync`: the adapter keeps it in an `Arc` per file handle and
/// calls it from any thread.
pub struct OpenFile {
    inner: Inner,
    /// The file's path in the tree, for messages.
    name: String,
}

enum Inner {
    /// `meta.json`, rendered at open.
    Bytes { bytes: Vec<u8>, attr: Attr },
    /// A stored layer, read with `pread`.
    Stored {
        file: Arc<File>,
        path: PathBuf,
        attr: Attr,
    },
    /// A generated view, and its read-ahead for sequential readers.
    View {
        view: View,
        attr: Attr,
        ahead: ReadAhead,
    },
    /// A file being imported or a staging file.
    Import(ImportHandle),
}

fn io_error(path: &std::path::Path, source: std::io::Error) -> Error {
    Error::Store(crate::store::Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `lseek(SEEK_DATA/SEEK_HOLE)` on `file`; `None` for ENXIO (past the last data / the
/// end).
pub(super) fn seek_file(
    file: &File,
    path: &std::path::Path,
    offset: u64,
    whence: i32,
) -> Result<Option<u64>, Error> {
    libc::off_t::try_from(offset).map_err(|_| {
        Error::Unreadable(format!("{}: offset {offset} out of range", path.display()))
    })?;
    crate::sys::lseek_data_hole(file.as_fd(), offset, whence).map_err(|e| io_error(path, e))
}

impl OpenFile {
    pub(super) fn import(handle: ImportHandle) -> OpenFile {
        OpenFile {
            name: handle.name(),
            inner: Inner::Import(handle),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`; short only at the end of the file.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize, Error> {
        match &self.inner {
            Inner::Bytes { bytes, .. } => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let n = buf.len().min(bytes.len() - start);
                buf[..n].copy_from_slice(&bytes[start..start + n]);
                Ok(n)
            }
            Inner::Stored { file, path, .. } => read_full(file, path, buf, offset),
            Inner::View { view, ahead, .. } => {
                ahead.on_read(view, offset, buf.len() as u64);
                Ok(view.read_at(buf, offset)?)
            }
            Inner::Import(h) => h.read(buf, offset),
        }
    }

    /// Writes `data` at `offset` (files being imported only).
    pub fn write(&self, data: &[u8], offset: u64) -> Result<usize, Error> {
        match &self.inner {
            Inner::Import(h) => h.write(data, offset),
            _ => Err(Error::ReadOnly(self.name.clone())),
        }
    }

    /// `SEEK_DATA`: the first offset ≥ `offset` holding data; `None` means ENXIO.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>, Error> {
        match &self.inner {
            Inner::Bytes { bytes, .. } => Ok((offset < bytes.len() as u64).then_some(offset)),
            Inner::Stored { file, path, .. } => seek_file(file, path, offset, libc::SEEK_DATA),
            Inner::View { view, .. } => Ok(view.next_data(offset)?),
            Inner::Import(h) => h.seek(offset, libc::SEEK_DATA),
        }
    }

    /// `SEEK_HOLE`: the first offset ≥ `offset` in a hole (the size when none is left);
    /// `None` (ENXIO) past the end.
    pub fn seek_hole(&self, offset: u64) -> Result<Option<u64>, Error> {
        match &self.inner {
            Inner::Bytes { bytes, .. } => {
                let len = bytes.len() as u64;
                Ok((offset < len).then_some(len))
            }
            Inner::Stored { file, path, .. } => seek_file(file, path, offset, libc::SEEK_HOLE),
            Inner::View { view, .. } => Ok(view.next_hole(offset)?),
            Inner::Import(h) => h.seek(offset, libc::SEEK_HOLE),
        }
    }

    /// The stored file this open file reads verbatim, when it is one (`disk.qcow2` of a
    /// single-layer revision): the kernel may then read it directly (FUSE passthrough).
    pub fn stored_file(&self) -> Option<&File> {
        match &self.inner {
            Inner::Stored { file, .. } => Some(file.as_ref()),
            _ => None,
        }
    }

    /// The generated view this open file reads, when it is one.
    pub fn view(&self) -> Option<&View> {
        match &self.inner {
            Inner::View { view, .. } => Some(view),
            _ => None,
        }
    }

    /// True when the content never changes (revision files).
    pub fn immutable(&self) -> bool {
        !matches!(self.inner, Inner::Import(_))
    }

    /// close(2) of one descriptor; `last` when nothing else holds the file any more. A
    /// created import is published by its last close, whose error that close returns; a
    /// staging file is only checked. Returns the entries whose cache must be dropped.
    pub fn flush(&self, last: bool) -> Result<Changes, Error> {
        match &self.inner {
            Inner::Import(h) => h.flush(last),
            _ => Ok(Changes::default()),
        }
    }

    /// A `close` made by the kernel for a process killed by a signal: a file it was
    /// writing (through this handle, opened for writing) is incomplete and is never
    /// published; a handle opened only for reading changes nothing.
    pub fn abandon(&self) {
        if let Inner::Import(h) = &self.inner {
            h.abandon();
        }
    }

    /// The last reference to this handle is gone. A created file whose last `close`
    /// could not publish it (still held elsewhere) is published now; one that cannot be
    /// is discarded. Returns the names that changed.
    pub fn release(&self) -> Changes {
        match &self.inner {
            Inner::Import(h) => h.release(),
            _ => Changes::default(),
        }
    }

    /// The attributes of the open file (of an import in progress: its current size).
    pub fn attr(&self) -> Result<Attr, Error> {
        match &self.inner {
            Inner::Bytes { attr, .. } | Inner::Stored { attr, .. } | Inner::View { attr, .. } => {
                Ok(attr.clone())
            }
            Inner::Import(h) => h.attr(),
        }
    }

    /// Total length of the file.
    pub fn size(&self) -> Result<u64, Error> {
        Ok(self.attr()?.size)
    }

    /// The place of the file being imported through this handle once it is no longer
    /// being written there (published, failed, dropped): its inode is spent.
    pub fn import_ended(&self) -> Option<Node> {
        match &self.inner {
            Inner::Import(h) if !h.import().is_writing() => Some(h.import().node()),
            _ => None,
        }
    }

    /// The import handle, when this is a file being imported.
    pub(super) fn as_import(&self) -> Option<&ImportHandle> {
        match &self.inner {
            Inner::Import(h) => Some(h),
            _ => None,
        }
    }
}

/// `pread` until `buf` is full or the end of the file.
fn read_full(
    file: &File,
    path: &std::path::Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<usize, Error> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, e)),
        }
    }
    Ok(done)
}

impl Tree {
    /// Opens file `node`. Writing anything inside a revision is [`Error::ReadOnly`]
    /// (EROFS); files being imported are opened by their writer only.
    pub fn open(
        &self,
        caller: &Caller,
        node: &Node,
        write: bool,
        truncate: bool,
    ) -> Result<Arc<OpenFile>, Error> {
        match node {
            Node::File {
                repo,
                image,
                rev,
                file,
            } => {
                if write || truncate {
                    return Err(Error::ReadOnly(super::nodes::display(node)));
                }
                let (store, meta) = self.revision_meta(caller, repo, image, *rev, node)?;
                let attr = self.getattr(caller, node)?;
                let inner = match file {
                    FileKind::MetaJson => Inner::Bytes {
                        bytes: metajson::render(store, &meta),
                        attr,
                    },
                    FileKind::View(format) => {
                        match self.opened_revision(store, &meta)?.content(*format)? {
                            Content::Stored(file, path) => Inner::Stored { file, path, attr },
                            Content::View(view) => Inner::View {
                                view,
                                attr,
                                ahead: ReadAhead::default(),
                            },
                        }
                    }
                };
                Ok(Arc::new(OpenFile {
                    inner,
                    name: super::nodes::display(node),
                }))
            }
            Node::Import { .. } => Ok(Arc::new(OpenFile::import(
                self.open_import(caller, node, write, truncate)?,
            ))),
            Node::Latest { .. } => Err(Error::NotSupported(super::nodes::display(node))),
            _ => Err(Error::IsADirectory(super::nodes::display(node))),
        }
    }
}
