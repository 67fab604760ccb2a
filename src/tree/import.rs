//! Import is a write (DESIGN §4): files created in a repository or image directory, the
//! staging files that tools write before renaming them, and the empty image directories
//! `mkdir` makes, all held by the daemon until something is published.
//!
//! A created file's bytes go to a scratch file in the repository's `.tmp/`, written in
//! place at the offsets given (so out-of-order writes, `ftruncate` first and holes are
//! all plain file operations, and holes stay holes). A created file is published by its
//! first `flush` (close); a staging file (name starting with `.`) is only checked there
//! and published by `rename`. Until then the file is visible to its writer alone. The
//! registry of these files ([`Pending`]) is shared with the open handles, which must be
//! able to publish and discard without the tree.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::access::{self, W, X};
use super::arrival::Arrival;
use super::nodes::display;
use super::open::{Changes, OpenFile, seek_file};
use super::pending::{Import, Pending, State, publish_changes, stop_stream};
use super::publish::{self, Target, split_suffix};
use super::stream_convert::{self, StreamConvert, Streaming};
use super::stream_hash::StreamHash;
use super::{Attr, Caller, Error, Node, Tree};
use crate::image::convert::WRITE_PIECE;
use crate::image::qcow2::header::MAGIC as QCOW2_MAGIC;
use crate::image::writeback::Writeback;
use crate::store::Store;

/// Bytes of a staging file's scratch copy left to the page cache before its write-back
/// is paced: a smaller file converted at its close may be dropped before it reaches the
/// disk; a bigger one left alone passes the kernel's dirty-page limits, which then
/// throttle its writer far below the disk's speed (see `image::writeback`).
const SCRATCH_IN_MEMORY: u64 = 512 << 20;

/// Bytes of a created file's copy left to the page cache, unpaced, ahead of what was
/// dropped of it: such a copy is dropped as it is converted, while it arrives (see
/// `stream_convert`) or at its close (a raw disk, whose layout is known only then), so
/// what is written to the disk of it is written for nothing (measured: `cp` of a 4 GiB
/// VDI, converted at 1 GB/s while it arrives faster, wrote 1.7–2.5 GiB of its copy to
/// the disk with 512 MiB, none with 1.5 GiB; `cp` of a raw disk holding 2 GiB, converted
/// at its close, 1.3 GiB with 512 MiB, 0.3 GiB with 1.5 GiB). A sixteenth of the
/// machine's memory, under the kernel's dirty-page thresholds (by default a tenth and a
/// fifth of the memory available), from 512 MiB to 2 GiB.
fn drop_ahead() -> u64 {
    static AHEAD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AHEAD.get_or_init(|| {
        crate::sys::total_memory().map_or(SCRATCH_IN_MEMORY, |m| {
            (m / 16).clamp(SCRATCH_IN_MEMORY, 2 << 30)
        })
    })
}

/// Permission bits of a file being imported when the creator gives none.
const DEFAULT_IMPORT_PERM: u16 = 0o644;

/// True for a staging name: hidden files are written, then renamed into place.
pub fn is_staging(name: &str) -> bool {
    name.starts_with('.')
}

/// Attribute changes asked by `setattr`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// atime or mtime given (`utimensat`).
    pub times: bool,
}

/// What an open handle of an import holds.
pub struct ImportHandle {
    import: Arc<Import>,
    pending: Arc<Pending>,
    /// Opened for writing: while such a handle is open, only its close publishes (a
    /// reader peeking at the file while it is written must not publish half of it).
    writer: bool,
    /// Its last descriptor was closed (counted off `Import::writers`).
    closed: AtomicBool,
}

impl ImportHandle {
    fn new(import: Arc<Import>, pending: Arc<Pending>, writer: bool) -> ImportHandle {
        import.opens.fetch_add(1, Ordering::AcqRel);
        if writer {
            import.writers.fetch_add(1, Ordering::AcqRel);
        }
        *import.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        ImportHandle {
            import,
            pending,
            writer,
            closed: AtomicBool::new(false),
        }
    }

    /// The file's path in the tree when it was opened.
    pub(super) fn name(&self) -> String {
        display(&self.import.node())
    }

    pub(super) fn import(&self) -> &Arc<Import> {
        &self.import
    }

    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize, Error> {
        let mut st = self.import.lock();
        self.import.whole(&mut st)?;
        let State::Writing { tmp, size, .. } = &*st else {
            return Err(self.import.gone());
        };
        let end = (*size).min(offset.saturating_add(buf.len() as u64));
        let want = end.saturating_sub(offset) as usize;
        let mut done = 0;
        while done < want {
            match tmp
                .file()
                .read_at(&mut buf[done..want], offset + done as u64)
            {
                // A scratch file is extended with set_len, so a short read is a hole.
                Ok(0) => {
                    buf[done..want].fill(0);
                    done = want;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Store(crate::store::Error::Io {
                        path: tmp.path().to_path_buf(),
                        source,
                    }));
                }
            }
        }
        Ok(want)
    }

    pub(super) fn write(&self, data: &[u8], offset: u64) -> Result<usize, Error> {
        let mut st = self.import.lock();
        // A write going back may land on bytes the conversion running as the file
        // arrives has read and dropped: they are put back before it lands.
        if let State::Writing {
            arrival, stream, ..
        } = &mut *st
            && !data.is_empty()
            && arrival.in_order_end().is_some_and(|end| offset < end)
            && let Err(e) = stop_stream(stream)
        {
            return Err(self.import.fail(&mut st, e));
        }
        match &mut *st {
            State::Writing {
                tmp,
                size,
                arrival,
                writeback,
                hash,
                stream,
            } => {
                // In pieces, for smaller page-cache folios (see convert::WRITE_PIECE).
                let written = data
                    .chunks(WRITE_PIECE)
                    .enumerate()
                    .try_for_each(|(i, piece)| {
                        tmp.file()
                            .write_all_at(piece, offset + (i * WRITE_PIECE) as u64)
                    });
                if let Err(source) = written {
                    let e = Error::Store(crate::store::Error::Io {
                        path: tmp.path().to_path_buf(),
                        source,
                    });
                    // A file missing some of its bytes (a full disk, an I/O error) must
                    // never be published by the close that follows: the import fails
                    // now, its scratch file goes, and the close repeats the reason.
                    return Err(self.import.fail(&mut st, e));
                }
                *size = (*size).max(offset + data.len() as u64);
                arrival.write(offset, data);
                // Bytes a conversion running as the file arrives is about to read and
                // drop are left in the page cache, unless the writer is far ahead of it.
                let dropping = match stream {
                    Some(Streaming::Running(s)) if s.drops() => Some(s.dropped_to()),
                    _ => None,
                };
                if dropping.is_none_or(|to| offset + data.len() as u64 > to + drop_ahead()) {
                    writeback.wrote(tmp.file(), offset, data.len() as u64);
                }
                match arrival.in_order_end() {
                    Some(end) => {
                        // A qcow2 file may be stored as it is: hash it as it arrives.
                        if hash.is_none() && offset == 0 && data.starts_with(&QCOW2_MAGIC) {
                            *hash = StreamHash::start(tmp.file());
                            // It may be its own layer, which must reach the disk.
                            writeback.now();
                        }
                        if let Some(h) = hash {
                            h.advance(end);
                        }
                        // A VDI, VHD or sparse VMDK is converted as it arrives, once its
                        // tables are in.
                        if offset == 0 && !matches!(stream, Some(Streaming::Running(_))) {
                            *stream = stream_convert::data_start(data).map(Streaming::Before);
                        }
                        if let Some(Streaming::Before(start)) = *stream
                            && end >= start.0
                        {
                            // Its layer is made by the writer, as a conversion at close.
                            // What it has read of a created file's copy is dropped; a
                            // staging file that fails to publish stays, whole.
                            let writer = self.import.writer.act().ok();
                            *stream = writer
                                .and_then(|_as| {
                                    StreamConvert::start(
                                        &self.import.store,
                                        tmp.file(),
                                        tmp.path(),
                                        start,
                                        end,
                                        !self.import.is_staging(),
                                    )
                                })
                                .map(Streaming::Running);
                        }
                        if let Some(Streaming::Running(s)) = stream {
                            s.advance(end);
                        }
                    }
                    None => {
                        *hash = None;
                        // This write was past what the conversion read.
                        if let Err(e) = stop_stream(stream) {
                            return Err(self.import.fail(&mut st, e));
                        }
                    }
                }
                Ok(data.len())
            }
            State::Published(_) => Err(Error::ReadOnly(display(&self.import.node()))),
            _ => Err(self.import.gone()),
        }
    }

    pub(super) fn seek(&self, offset: u64, whence: i32) -> Result<Option<u64>, Error> {
        let mut st = self.import.lock();
        self.import.whole(&mut st)?;
        let State::Writing { tmp, size, .. } = &*st else {
            return Err(self.import.gone());
        };
        if offset >= *size {
            return Ok(None);
        }
        Ok(seek_file(tmp.file(), tmp.path(), offset, whence)?.map(|o| o.min(*size)))
    }

    /// A `close` of this handle's file; `last` when nothing else holds the file (no
    /// descriptor in any process, no mapping): a created file is then published, and
    /// the error of a failed publish is what that `close` returns. A staging file is
    /// only checked. Earlier closes change nothing: the publish waits for the last one
    /// (or for [`ImportHandle::release`]).
    pub(super) fn flush(&self, last: bool) -> Result<Changes, Error> {
        let imp = &self.import;
        if last {
            self.closed_last();
        }
        let Some(target) = &imp.target else {
            return imp.check().map(|()| Changes::default());
        };
        // A reader's close publishes only once no handle is open for writing any more
        // (its writer closed while the reader still held the file, which made that
        // close not the last): a reader peeking while the file is written must not
        // publish half of it, and one outliving the writer must not lose it.
        if !last || (!self.writer && imp.writers.load(Ordering::Acquire) > 0) {
            return Ok(Changes::default());
        }
        // A blank file is not complete yet: its writer is about to reopen it.
        if imp.is_blank() {
            log::debug!("{}: blank at its last close: kept", display(&imp.node()));
            return Ok(Changes::default());
        }
        {
            let st = imp.lock();
            match &*st {
                State::Writing { .. } => {}
                State::Published(_) | State::Dropped => return Ok(Changes::default()),
                // A failure its writer was told of (or a writer killed) is not a reader's.
                State::Failed(..) if !self.writer => return Ok(Changes::default()),
                State::Failed(reason, errno) => {
                    return Err(Error::ImportFailed {
                        reason: reason.clone(),
                        errno: *errno,
                    });
                }
            }
        }
        match imp.publish(target, None, &self.pending, false) {
            Ok(meta) => Ok(publish_changes(&imp.node(), imp.store.name(), &meta)),
            Err(e) => {
                self.pending.drop_import(imp);
                Err(e)
            }
        }
    }

    /// Nothing holds this handle's descriptors any more: a writer may open the file
    /// again even before the kernel releases the handle.
    fn closed_last(&self) {
        if self.writer && !self.closed.swap(true, Ordering::AcqRel) {
            self.import.writers.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The process closing this handle was killed by a signal. When the handle was
    /// opened for writing, the writer is gone without finishing: its file is incomplete
    /// and is never published. A reader killed while peeking at the file (`cat | head`
    /// dying of SIGPIPE, a shell's `exec 5<FILE` killed) wrote nothing: its death
    /// changes nothing, and the import goes on.
    pub(super) fn abandon(&self) {
        if !self.writer {
            log::debug!(
                "{}: a reader of it was killed: the import goes on",
                display(&self.import.node())
            );
            return;
        }
        let mut st = self.import.lock();
        if matches!(*st, State::Writing { .. }) {
            log::warn!(
                "{}: its writer (uid {}) was killed: not published",
                display(&self.import.node()),
                self.import.writer.uid
            );
            self.import.writing.store(false, Ordering::Release);
            *st = State::Failed("the writer was killed by a signal".into(), libc::EIO);
        }
    }

    /// The last reference to this handle is gone. When it was the last handle of a
    /// created file still unpublished (its last `close` found the file still held, by a
    /// mapping say, that has gone since), the file is published now; a failure can no
    /// longer reach anyone but the log, and leaves nothing. Then the file is forgotten.
    pub(super) fn release(&self) -> Changes {
        self.closed_last();
        let left = self
            .import
            .opens
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        if left > 0 || self.import.is_staging() {
            return Changes::default();
        }
        if self.import.is_writing() && self.import.is_blank() {
            *self
                .import
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
            return Changes::default();
        }
        let changes = if self.import.is_writing() {
            // Nobody is left to get the error: the log is where it goes.
            self.flush(true).unwrap_or_else(|e| {
                let path = display(&self.import.node());
                let uid = Some(self.import.writer.uid);
                super::session::log_failure("import", &path, uid, &e);
                Changes::default()
            })
        } else {
            Changes::default()
        };
        self.pending.drop_import(&self.import);
        changes
    }

    /// The attributes `fstat` gives through this handle: those of a file removed while
    /// open (no link, nothing held) once the import is gone, as for any unlinked file.
    pub(super) fn attr(&self) -> Result<Attr, Error> {
        self.import.attr().or_else(|_| self.import.unlinked_attr())
    }
}

impl Tree {
    /// create(2): a new image (in a repository directory, named after the file without a
    /// known format suffix, which becomes a format hint), the next revision (in an image
    /// directory) or a staging file (a name starting with `.`). Returns the node, its
    /// attributes (an empty regular file) and the open handle.
    pub fn create(
        &self,
        caller: &Caller,
        parent: &Node,
        name: &str,
        mode: u32,
    ) -> Result<(Node, Attr, Arc<OpenFile>), Error> {
        let (repo, image) = match parent {
            Node::Repo { repo } => (repo, None),
            Node::Image { repo, image } => (repo, Some(image)),
            Node::Revision { .. } | Node::File { .. } | Node::Latest { .. } => {
                return Err(Error::ReadOnly(display(parent)));
            }
            Node::Root | Node::Import { .. } => return Err(Error::NotPermitted(display(parent))),
        };
        let store = self.writable_store(caller, repo)?;
        if let Some(image) = image
            && store.revisions(image)?.is_empty()
            && self.pending.empty_dir(repo, image).is_none()
        {
            return Err(Error::NoEntry(display(parent)));
        }
        let (stem, hint) = split_suffix(name);
        let target = match (is_staging(name), image) {
            (true, _) => None,
            (false, None) => {
                let target = Target::NewImage(stem.to_string());
                publish::check_target(&store, &target)?;
                Some(target)
            }
            (false, Some(image)) => Some(Target::NextRevision(image.clone())),
        };
        let node = Node::Import {
            repo: repo.clone(),
            image: image.cloned(),
            name: name.to_string(),
        };
        let tmp = store.tmp_file()?;
        // A created file's copy is dropped as it is converted; a staging file's stays.
        let writeback = Writeback::after(if target.is_some() {
            drop_ahead()
        } else {
            SCRATCH_IN_MEMORY
        });
        let perm = match (mode & 0o7777) as u16 {
            0 => DEFAULT_IMPORT_PERM,
            p => p,
        };
        let imp = Arc::new(Import {
            node: Mutex::new(node.clone()),
            store,
            siblings: self.repos.clone(),
            writer: caller.clone(),
            mountpoint: self.mountpoint.clone(),
            target,
            hint,
            created: SystemTime::now(),
            perm: Mutex::new(perm),
            state: Mutex::new(State::Writing {
                tmp,
                size: 0,
                arrival: Arrival::new(),
                writeback,
                hash: None,
                stream: None,
            }),
            writing: AtomicBool::new(true),
            opens: AtomicUsize::new(0),
            writers: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
            published: Mutex::new(None),
        });
        {
            let mut map = self.pending.imports();
            if map.get(&node).is_some_and(|i| i.is_writing()) {
                return Err(Error::Exists(display(&node)));
            }
            map.insert(node.clone(), imp.clone());
        }
        let attr = imp.attr()?;
        let handle = ImportHandle::new(imp, self.pending.clone(), true);
        Ok((node, attr, Arc::new(OpenFile::import(handle))))
    }

    /// Reopens a file being imported (by its writer only); `truncate` empties it.
    pub(super) fn open_import(
        &self,
        caller: &Caller,
        node: &Node,
        write: bool,
        truncate: bool,
    ) -> Result<ImportHandle, Error> {
        let Some(imp) = self.pending.find(node, caller, true) else {
            // A file its writer published a moment ago still answers the writer's
            // metadata calls (see `Pending::find_recent`). Opened for writing again (`cp`
            // of the same file into the image once more), it lets go of its name: the
            // writer's create that follows (`O_EXCL`, which the kernel checks with a
            // fresh lookup) makes a new file, the next revision.
            if (write || truncate)
                && let Some(recent) = self.pending.find_recent(node, caller)
            {
                self.pending.forget_recent(&recent);
            }
            return Err(Error::NoEntry(display(node)));
        };
        // An import has one writer at a time: a second open for writing while a
        // descriptor of the file is open means two imports of one name racing (two `cp` by one user), which
        // would mix their bytes and see the file published under them. The newcomer
        // is told the name is taken, as a second create(2) would be. (The kernel
        // truncates for O_TRUNC after this open, so this also protects the bytes.)
        if write && imp.writers.load(Ordering::Acquire) > 0 {
            return Err(Error::Exists(display(node)));
        }
        if truncate {
            imp.set_size(0)?;
        }
        Ok(ImportHandle::new(imp, self.pending.clone(), write))
    }

    /// The store of `repo`, checked writable for `caller` (imports and deletes need write
    /// access to the repository's `meta/`, `data/` and `.tmp/`).
    pub(super) fn writable_store(&self, caller: &Caller, repo: &str) -> Result<Arc<Store>, Error> {
        let store = self
            .repos
            .iter()
            .find(|s| s.name() == repo)
            .ok_or_else(|| Error::NoEntry(repo.to_string()))?;
        for dir in [store.meta_dir(), store.data_dir(), store.tmp_dir()] {
            access::check(caller, &dir, W | X)?;
        }
        Ok(store.clone())
    }

    /// ftruncate/truncate, chmod, chown and utimens: on a file being imported they
    /// succeed (a size changes the scratch file; the others are accepted and dropped,
    /// the revision belongs to its importer at publish time), as do all but a size on an
    /// empty image directory made by `mkdir`; anything else is refused (EROFS in a
    /// revision, EPERM elsewhere).
    pub fn setattr(
        &self,
        caller: &Caller,
        node: &Node,
        handle: Option<&OpenFile>,
        set: &SetAttr,
    ) -> Result<Attr, Error> {
        match node {
            Node::Import { .. } => {
                let imp = handle
                    .and_then(OpenFile::as_import)
                    .map(|h| h.import().clone())
                    .or_else(|| self.pending.find(node, caller, false))
                    .ok_or_else(|| Error::NoEntry(display(node)))?;
                if !imp.is_writing() {
                    // Published: the mode, owner and times of the file no longer matter
                    // (the revision has its own); its size can no longer change.
                    return match set.size {
                        Some(_) => Err(Error::ReadOnly(display(node))),
                        None => imp.attr(),
                    };
                }
                if let Some(len) = set.size {
                    imp.set_size(len)?;
                }
                if let Some(mode) = set.mode {
                    *imp.perm.lock().unwrap_or_else(|e| e.into_inner()) = (mode & 0o7777) as u16;
                }
                imp.attr()
            }
            // `cp -a DIR R/` sets the mode and times of the directory it made: an empty
            // image directory holds nothing those could change, so they are accepted.
            Node::Image { repo, image }
                if set.size.is_none()
                    && self.pending.empty_dir(repo, image).is_some()
                    && self.store(repo)?.revisions(image)?.is_empty() =>
            {
                self.writable_store(caller, repo)?;
                self.getattr(caller, node)
            }
            // What its writer does to the file just published (see PUBLISHED_GRACE).
            Node::Image { repo, image }
                if set.size.is_none() && self.pending.just_published(repo, image, caller) =>
            {
                self.getattr(caller, node)
            }
            Node::Revision { .. } | Node::File { .. } | Node::Latest { .. } => {
                Err(Error::ReadOnly(display(node)))
            }
            _ => Err(Error::NotPermitted(display(node))),
        }
    }

    /// setxattr: accepted and dropped on a file being imported (`cp -a`, `rsync -X`);
    /// not supported elsewhere.
    pub fn setxattr(&self, caller: &Caller, node: &Node) -> Result<(), Error> {
        match node {
            Node::Import { .. } if self.pending.find(node, caller, false).is_some() => Ok(()),
            Node::Import { .. } => Err(Error::NoEntry(display(node))),
            Node::Revision { .. } | Node::File { .. } | Node::Latest { .. } => {
                Err(Error::ReadOnly(display(node)))
            }
            _ => Err(Error::NotSupported(display(node))),
        }
    }
}
