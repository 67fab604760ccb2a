//! The lifecycle of a file being imported, and the registry of such files and of empty
//! image directories ([`Pending`]), shared by the tree and the open handles (which must
//! publish and discard without the tree).
//!
//! A file is `Writing` (its bytes in a scratch file under `.tmp/`), then `Published`
//! (kept only for handles still open), `Failed` (the scratch file gone, the reason
//! kept for a repeated close) or `Dropped`. Only a `Writing` file has a visible name,
//! and only for its writer. A flag mirrors that state outside the state lock, which a
//! publish holds for as long as the conversion takes: lookups and listings never wait.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long after a publish the image directory accepts, from the writer, the mode and
/// time changes meant for the file it was: `install -m` sets the mode by path after
/// `close`, when the name is already the image directory. Nothing changes (a revision
/// has its own owner and time); the call just does not fail.
pub(super) const PUBLISHED_GRACE: Duration = Duration::from_secs(5);

/// How long a blank file whose last descriptor was closed stays for its writer to
/// reopen: `qemu-img convert` and `qemu-img create` create the file, size it, close it
/// and open it again to write the image. Past it, the file is published as it is.
pub(super) const BLANK_GRACE: Duration = Duration::from_secs(10);

use super::access;
use super::arrival::Arrival;
use super::nodes::{display, revision_dir_name};
use super::open::Changes;
use super::publish::{self, Target, choose_format};
use super::save;
use super::stream_convert::Streaming;
use super::stream_hash::StreamHash;
use super::{Attr, Caller, Error, Format, IMPORT_BLKSIZE, Node, NodeType};
use crate::image::qcow2::keep;
use crate::image::writeback::Writeback;
use crate::store::{Store, TmpFile};

/// Name of the symlink to the highest revision (see [`super::nodes::LATEST`]).
const LATEST: &str = super::nodes::LATEST;

// One per file being imported, a handful at a time: the size of `Writing` costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum State {
    /// Being written: the scratch file, its current length, what its writes showed and
    /// the pacing of its write-back (a multi-GiB scratch copy left to the kernel's
    /// dirty-page limits is received at a fraction of the disk's speed).
    Writing {
        tmp: TmpFile,
        size: u64,
        arrival: Arrival,
        writeback: Writeback,
        /// The sha256 of an in-order stream that may be stored as it is, computed as
        /// it arrives.
        hash: Option<StreamHash>,
        /// The conversion of an in-order VDI, VHD or sparse VMDK stream as it arrives.
        stream: Option<Streaming>,
    },
    /// Published; the attributes it had, for handles still open.
    Published(Attr),
    /// The publish failed (the scratch file is gone); flush repeats the reason and the
    /// errno.
    Failed(String, i32),
    /// Unlinked or released unpublished.
    Dropped,
}

/// Stops `stream`, the conversion of a file as it arrives, if one runs: what it read and
/// dropped of the file's scratch copy is put back first. An error says the copy could
/// not be made whole again: the import must fail.
pub(super) fn stop_stream(stream: &mut Option<Streaming>) -> Result<(), Error> {
    match stream.take() {
        Some(Streaming::Running(conversion)) => conversion.stop().map_err(Error::Image),
        _ => Ok(()),
    }
}

/// One file being imported.
pub(super) struct Import {
    /// Where it is; a staging file renamed to another staging name moves.
    pub(super) node: Mutex<Node>,
    pub(super) store: Arc<Store>,
    /// Every repository of the tree, whose layers a publish may share.
    pub(super) siblings: Vec<Arc<Store>>,
    pub(super) writer: Caller,
    /// Where the tree is mounted: a qcow2 file backed by a view under it is saved as a
    /// layer over the viewed revision.
    pub(super) mountpoint: Option<Arc<std::path::Path>>,
    /// `None` for a staging file: its target is decided by `rename`.
    pub(super) target: Option<Target>,
    /// The format a name suffix suggests.
    pub(super) hint: Option<Format>,
    pub(super) created: SystemTime,
    pub(super) perm: Mutex<u16>,
    pub(super) state: Mutex<State>,
    /// True while `state` is `Writing`, readable without the state lock, which a publish
    /// holds for as long as the conversion takes: lookups and listings must not wait.
    pub(super) writing: AtomicBool,
    pub(super) opens: AtomicUsize,
    /// Handles open for writing whose descriptors are not all closed yet. A `close`
    /// returns before the kernel releases the handle, so a writer that closes and
    /// reopens (`qemu-img convert`) can open again while `opens` still counts the old
    /// handle; this counts it no more once its last descriptor was closed.
    pub(super) writers: AtomicUsize,
    /// Since when a blank file (see [`Import::is_blank`]) has had no open handle: it is
    /// kept [`BLANK_GRACE`] for its writer to reopen, then published as it is. Only a
    /// created file is ever left so (a staging file's last release leaves it as it is).
    pub(super) idle_since: Mutex<Option<Instant>>,
    /// When it was published, for [`PUBLISHED_GRACE`].
    pub(super) published: Mutex<Option<Instant>>,
}

impl Import {
    /// True within [`PUBLISHED_GRACE`] of a successful publish.
    pub(super) fn recently_published(&self) -> bool {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < PUBLISHED_GRACE)
    }
}

/// An empty image directory: made by `mkdir`, or left by the removal of an image's last
/// revision.
#[derive(Clone, Copy, Debug)]
struct EmptyDir {
    /// When it appeared (its times).
    made: SystemTime,
    /// The uid whose `mkdir` made it; `None` when the removal of the last revision left
    /// it.
    by: Option<u32>,
}

/// Files being imported and empty image directories, shared by the tree and its
/// handles.
///
/// An empty image directory is an entry here while its image has no revision; a
/// publish removes the entry after it writes the revision's metadata, and an entry is
/// added only while the dirs lock is held and the image is seen without revision (see
/// [`Pending::add_empty_dir`]), so an entry is never left beside revisions that a later
/// removal would then leave as an empty directory nobody made.
#[derive(Default)]
pub(super) struct Pending {
    imports: Mutex<HashMap<Node, Arc<Import>>>,
    empty_dirs: Mutex<BTreeMap<(String, String), EmptyDir>>,
    /// Images a writer published a revision of within [`PUBLISHED_GRACE`], with the
    /// writer's uid.
    recent: Mutex<HashMap<(String, String), (u32, Instant)>>,
}

impl Pending {
    pub(super) fn imports(&self) -> std::sync::MutexGuard<'_, HashMap<Node, Arc<Import>>> {
        self.imports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dirs(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), EmptyDir>> {
        self.empty_dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The import at `node` if `caller` wrote it (`writing`: only while not yet
    /// published, which is when its name is visible).
    pub(super) fn find(&self, node: &Node, caller: &Caller, writing: bool) -> Option<Arc<Import>> {
        let imp = self.imports().get(node).cloned()?;
        let ok = imp.writer.uid == caller.uid && (!writing || imp.is_writing());
        ok.then_some(imp)
    }

    /// The file at `node` that `caller` published a moment ago, under a name that is not
    /// the image's (`x.raw` became image `x`; a file written into an image directory
    /// became `@N`): it answers its writer's metadata calls for [`PUBLISHED_GRACE`]
    /// (`install -m` sets the mode by name after `close`), then goes. Nobody else sees
    /// it, and no listing shows it.
    pub(super) fn find_recent(&self, node: &Node, caller: &Caller) -> Option<Arc<Import>> {
        let mut map = self.imports();
        map.retain(|_, imp| {
            imp.is_writing() || imp.opens.load(Ordering::Acquire) > 0 || imp.recently_published()
        });
        let imp = map.get(node).cloned()?;
        // A file named as its image (`cp SRC R/x`) is the image directory from now on.
        let named_as_image = matches!((&imp.target, node),
            (Some(Target::NewImage(image)), Node::Import { name, .. }) if image == name);
        (imp.writer.uid == caller.uid
            && imp.recently_published()
            && !imp.is_staging()
            && !named_as_image)
            .then_some(imp)
    }

    /// Forgets the files published into image `repo/image` (see [`Pending::find_recent`]):
    /// once the image changes again, their names must not answer any more.
    pub(super) fn forget_published(&self, repo: &str, image: &str) {
        self.imports().retain(|node, imp| {
            let Node::Import { repo: r, .. } = node else {
                return true;
            };
            imp.is_writing() || r != repo || imp.target.as_ref().is_none_or(|t| t.image() != image)
        });
    }

    /// Whether `caller` published a revision of `repo/image` a moment ago (see
    /// [`PUBLISHED_GRACE`]).
    pub(super) fn just_published(&self, repo: &str, image: &str, caller: &Caller) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|_, (_, t)| t.elapsed() < PUBLISHED_GRACE);
        recent
            .get(&(repo.to_string(), image.to_string()))
            .is_some_and(|(uid, _)| *uid == caller.uid)
    }

    /// Remembers that `writer` just published a revision of `repo/image`.
    fn note_published(&self, repo: &str, image: &str, writer: &Caller) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|_, (_, t)| t.elapsed() < PUBLISHED_GRACE);
        recent.insert(
            (repo.to_string(), image.to_string()),
            (writer.uid, Instant::now()),
        );
    }

    /// The blank files left unopened for longer than `grace` (see [`BLANK_GRACE`]), each
    /// taken once (only a created file is left so: a staging file stays its writer's).
    fn take_abandoned(&self, grace: Duration) -> Vec<Arc<Import>> {
        self.imports()
            .values()
            .filter(|imp| {
                let mut idle = imp.idle_since.lock().unwrap_or_else(|e| e.into_inner());
                let expired = idle.is_some_and(|t| t.elapsed() >= grace);
                if expired {
                    *idle = None;
                }
                expired
            })
            .cloned()
            .collect()
    }

    /// Publishes the created files left blank and unopened for longer than `grace`:
    /// their writer, which could have opened them again to write an image (as
    /// `qemu-img` does after its create step), did not, so they are complete as they
    /// are: a disk of zeroes (`cp` of one, `dd if=/dev/zero`, `truncate -s`), or an
    /// image whose tables map nothing. Returns the changes to the names; a file that
    /// cannot be published is dropped, the error logged.
    pub(super) fn publish_abandoned(&self, grace: Duration) -> Vec<Changes> {
        let mut out = Vec::new();
        for imp in self.take_abandoned(grace) {
            // Opened again meanwhile, or written: its writer's close decides.
            if imp.opens.load(Ordering::Acquire) > 0 || !imp.is_writing() || !imp.is_blank() {
                continue;
            }
            let Some(target) = imp.target.clone() else {
                continue;
            };
            match imp.publish(&target, None, self, true) {
                Ok(meta) => {
                    log::info!(
                        "{}: blank and not opened again within {grace:?}: published as it is",
                        display(&imp.node())
                    );
                    out.push(publish_changes(&imp.node(), imp.store.name(), &meta));
                }
                Err(e) => {
                    log::warn!("{}: not published: {e}", display(&imp.node()));
                    self.drop_import(&imp);
                }
            }
        }
        out
    }

    /// Names of the files `caller` is writing in a directory.
    /// Whether a file is being written at `node` (by anyone).
    pub(super) fn writing(&self, node: &Node) -> bool {
        self.imports().get(node).is_some_and(|imp| imp.is_writing())
    }

    /// Whether a file is being written into image directory `image` (by anyone).
    pub(super) fn writing_into(&self, repo: &str, image: &str) -> bool {
        self.imports().iter().any(|(n, imp)| {
            matches!(n, Node::Import { repo: r, image: Some(i), .. } if r == repo && i == image)
                && imp.is_writing()
        })
    }

    pub(super) fn names(&self, repo: &str, image: Option<&str>, caller: &Caller) -> Vec<Node> {
        let mut out: Vec<Node> = self
            .imports()
            .iter()
            .filter(|(n, imp)| {
                matches!(n, Node::Import { repo: r, image: i, .. }
                    if r == repo && i.as_deref() == image)
                    && imp.writer.uid == caller.uid
                    && imp.is_writing()
            })
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// When the empty image directory `repo/image` appeared, if there is one.
    pub(super) fn empty_dir(&self, repo: &str, image: &str) -> Option<SystemTime> {
        self.dirs()
            .get(&(repo.to_string(), image.to_string()))
            .map(|d| d.made)
    }

    /// The empty image directories of `repo`.
    pub(super) fn empty_dirs(&self, repo: &str) -> Vec<String> {
        self.dirs()
            .keys()
            .filter(|(r, _)| r == repo)
            .map(|(_, i)| i.clone())
            .collect()
    }

    /// Makes `repo/image` an empty image directory (`by`: the uid whose `mkdir` made it)
    /// if `no_revision` says, while the dirs lock is held, that the image has none; false
    /// (nothing added) otherwise. A publish writes its metadata before it removes the
    /// entry (under this lock): either this check sees the new revision, or the publish
    /// removes the entry added here.
    pub(super) fn add_empty_dir(
        &self,
        repo: &str,
        image: &str,
        by: Option<u32>,
        no_revision: impl FnOnce() -> Result<bool, Error>,
    ) -> Result<bool, Error> {
        let mut dirs = self.dirs();
        if !no_revision()? {
            return Ok(false);
        }
        let made = SystemTime::now();
        dirs.insert((repo.to_string(), image.to_string()), EmptyDir { made, by });
        Ok(true)
    }

    /// Drops the empty image directory `repo/image` if `uid`'s `mkdir` made it, nothing
    /// is being imported into it, and `no_revision` says (while the dirs lock is held)
    /// that the image still has no revision. Returns whether it was dropped.
    pub(super) fn drop_empty_dir_made_by(
        &self,
        repo: &str,
        image: &str,
        uid: u32,
        no_revision: impl FnOnce() -> Result<bool, Error>,
    ) -> Result<bool, Error> {
        let mut dirs = self.dirs();
        let key = (repo.to_string(), image.to_string());
        if dirs.get(&key).is_none_or(|d| d.by != Some(uid))
            || self.importing_into(repo, image)
            || !no_revision()?
        {
            return Ok(false);
        }
        dirs.remove(&key);
        Ok(true)
    }

    /// Whether a file is being written into image directory `repo/image` (by anyone).
    fn importing_into(&self, repo: &str, image: &str) -> bool {
        self.imports().iter().any(|(node, imp)| {
            matches!(node, Node::Import { repo: r, image: Some(i), .. } if r == repo && i == image)
                && imp.is_writing()
        })
    }

    /// Forgets the file `imp` that its writer published a moment ago (see
    /// [`Pending::find_recent`]): its name stops answering. The revision stays.
    pub(super) fn forget_recent(&self, imp: &Arc<Import>) {
        let mut map = self.imports();
        let node = imp.node();
        if !imp.is_writing() && map.get(&node).is_some_and(|i| Arc::ptr_eq(i, imp)) {
            map.remove(&node);
        }
    }

    pub(super) fn remove_empty_dir(&self, repo: &str, image: &str) -> bool {
        self.dirs()
            .remove(&(repo.to_string(), image.to_string()))
            .is_some()
    }

    /// Forgets `imp` (if it is still the file at its node) and drops its data.
    pub(super) fn drop_import(&self, imp: &Arc<Import>) {
        if !imp.recently_published() {
            let mut map = self.imports();
            let node = imp.node();
            if map.get(&node).is_some_and(|i| Arc::ptr_eq(i, imp)) {
                map.remove(&node);
            }
        }
        let mut st = imp.lock();
        if matches!(*st, State::Writing { .. }) {
            imp.writing.store(false, Ordering::Release);
            *st = State::Dropped;
        }
    }

    /// Moves a staging file to another staging name; its open handles follow it.
    pub(super) fn rekey(&self, imp: &Arc<Import>, to: Node) {
        let mut map = self.imports();
        let from = std::mem::replace(
            &mut *imp.node.lock().unwrap_or_else(|e| e.into_inner()),
            to.clone(),
        );
        map.remove(&from);
        map.insert(to, imp.clone());
    }
}

impl Import {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the scratch copy whole before it is read: a conversion running as the file
    /// arrives that drops what it has read of the copy is stopped, and puts it back.
    pub(super) fn whole(&self, st: &mut State) -> Result<(), Error> {
        if let State::Writing { stream, .. } = st
            && let Some(Streaming::Running(conversion)) = stream
            && conversion.drops()
            && let Err(e) = stop_stream(stream)
        {
            return Err(self.fail(st, e));
        }
        Ok(())
    }

    /// The import fails now with `e` (its scratch file goes; the close repeats the
    /// reason): returns `e`.
    pub(super) fn fail(&self, st: &mut State, e: Error) -> Error {
        self.writing.store(false, Ordering::Release);
        *st = State::Failed(e.to_string(), e.errno());
        e
    }

    pub(super) fn node(&self) -> Node {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn is_writing(&self) -> bool {
        self.writing.load(Ordering::Acquire)
    }

    pub(super) fn is_staging(&self) -> bool {
        self.target.is_none()
    }

    /// Whether the file is blank: sized but holding no data (only zeroes were written,
    /// or an image whose tables map nothing), as a tool leaves the file it creates
    /// before it reopens it to write. Such a file is not published by its last close.
    pub(super) fn is_blank(&self) -> bool {
        let st = self.lock();
        let State::Writing {
            tmp, size, arrival, ..
        } = &*st
        else {
            return false;
        };
        if *size == 0 {
            return false;
        }
        if !arrival.nonzero_written() {
            return true;
        }
        let Ok(format) = choose_format(None, self.hint, tmp.path(), tmp.file()) else {
            return false;
        };
        format != Format::Raw
            && publish::open_standalone(tmp.file(), tmp.path(), format)
                .and_then(|disk| Ok(disk.data_extents(0, disk.virtual_size())?))
                .is_ok_and(|runs| runs.is_empty())
    }

    /// Its attributes: a regular file of its writer, with its current size.
    pub(super) fn attr(&self) -> Result<Attr, Error> {
        self.attr_of(&self.lock())
    }

    pub(super) fn attr_of(&self, st: &State) -> Result<Attr, Error> {
        let (size, blocks) = match st {
            State::Writing { tmp, size, .. } => {
                let blocks = tmp.file().metadata().map(|m| m.blocks()).unwrap_or(0);
                (*size, blocks)
            }
            State::Published(attr) => return Ok(attr.clone()),
            State::Failed(..) | State::Dropped => {
                return Err(Error::NoEntry(display(&self.node())));
            }
        };
        Ok(Attr {
            kind: NodeType::RegularFile,
            perm: *self.perm.lock().unwrap_or_else(|e| e.into_inner()),
            nlink: 1,
            uid: self.writer.uid,
            gid: self.writer.gid,
            size,
            blocks,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            blksize: IMPORT_BLKSIZE,
        })
    }

    /// The attributes of this file once it is no longer being written (published,
    /// failed or dropped) as seen through a descriptor still open on it: an empty
    /// regular file with no link.
    pub(super) fn unlinked_attr(&self) -> Result<Attr, Error> {
        Ok(Attr {
            kind: NodeType::RegularFile,
            perm: *self.perm.lock().unwrap_or_else(|e| e.into_inner()),
            nlink: 0,
            uid: self.writer.uid,
            gid: self.writer.gid,
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            blksize: IMPORT_BLKSIZE,
        })
    }

    pub(super) fn gone(&self) -> Error {
        Error::NoEntry(display(&self.node()))
    }

    pub(super) fn set_size(&self, len: u64) -> Result<(), Error> {
        let mut st = self.lock();
        // A file cut shorter, or emptied, loses bytes the conversion running as it
        // arrives may have read and dropped: they are put back before it is cut.
        if let State::Writing { size, stream, .. } = &mut *st
            && len < *size
            && let Err(e) = stop_stream(stream)
        {
            return Err(self.fail(&mut st, e));
        }
        match &mut *st {
            State::Writing {
                tmp,
                size,
                arrival,
                hash,
                stream,
                ..
            } => {
                tmp.file().set_len(len).map_err(|source| {
                    Error::Store(crate::store::Error::Io {
                        path: tmp.path().to_path_buf(),
                        source,
                    })
                })?;
                *size = len;
                arrival.set_len(len);
                if arrival.in_order_end().is_none() || len == 0 {
                    *hash = None;
                    // Stopped above if it ran (the file was cut).
                    *stream = None;
                }
                Ok(())
            }
            State::Published(_) => Err(Error::ReadOnly(display(&self.node()))),
            _ => Err(self.gone()),
        }
    }

    /// Publishes the written bytes as `target`. On failure a created file is discarded
    /// (nothing remains) while a staging file is kept for its writer to fix or drop.
    /// `left_blank`: the file was left blank on purpose (see
    /// [`Pending::publish_abandoned`]), so a file only given a size is a disk of zeroes.
    pub(super) fn publish(
        &self,
        target: &Target,
        hint: Option<Format>,
        pending: &Pending,
        left_blank: bool,
    ) -> Result<crate::store::Meta, Error> {
        let mut st = self.lock();
        // Taken now: a created file's scratch copy is consumed by its publish.
        let attr = self.attr_of(&st)?;
        let State::Writing {
            tmp,
            arrival,
            hash,
            stream,
            ..
        } = &mut *st
        else {
            return Err(self.gone());
        };
        log::debug!(
            "publishing {}: {} bytes received in {:.2?}",
            display(&self.node()),
            attr.size,
            self.created.elapsed().unwrap_or_default()
        );
        let result = (|| {
            // The files of the new revision are made by the writer, whoever closes.
            let _as = self.writer.act()?;
            let format = choose_format(None, hint.or(self.hint), tmp.path(), tmp.file())?;
            check_disk_size(
                &self.node(),
                format,
                attr.size,
                left_blank || arrival.written(),
            )?;
            let owner = access::user_name(self.writer.uid);
            if format == Format::Qcow2 && save::backed_layer(tmp.file(), tmp.path())?.is_some() {
                // A VM's overlay of a revision of this mount: saved as a layer over it.
                return save::publish_overlay(
                    &self.store,
                    &self.siblings,
                    self.mountpoint.as_deref(),
                    &self.writer,
                    &owner,
                    tmp.file(),
                    tmp.path(),
                    target,
                );
            }
            if format == Format::Qcow2 {
                match keep::keepable(tmp.file(), tmp.path(), attr.size) {
                    Ok(()) => {
                        let hash = hash.take().and_then(|h| h.finish(attr.size));
                        return publish::publish_as_is(
                            &self.store,
                            &self.siblings,
                            &owner,
                            tmp,
                            hash,
                            target,
                        );
                    }
                    Err(why) => log::debug!("{}: converted: {why}", display(&self.node())),
                }
            }
            // A file converted while it arrived: its layer, if the complete file opens.
            // Otherwise the file is converted below, whole again: what the conversion
            // dropped of it is put back first.
            match stream.take() {
                Some(Streaming::Running(conversion)) if conversion.format() == format => {
                    if let Some(streamed) = conversion.finish(attr.size)? {
                        if publish::open_standalone(tmp.file(), tmp.path(), format).is_ok() {
                            let (out, converted) = streamed.into_layer();
                            log::debug!("{}: converted while it arrived", display(&self.node()));
                            return publish::store_converted(
                                &self.store,
                                &self.siblings,
                                &owner,
                                out,
                                &converted.sha256,
                                target,
                            );
                        }
                        streamed.restore()?;
                    }
                }
                mut other => stop_stream(&mut other)?,
            }
            // A staging file that fails to publish stays for its writer to fix, so only
            // a created file's bytes may be dropped as they are converted.
            let scratch = publish::Scratch {
                nonzero: arrival.nonzero(),
                consume: !self.is_staging(),
            };
            publish::publish(
                &self.store,
                &self.siblings,
                &owner,
                publish::Source {
                    file: tmp.file(),
                    path: tmp.path(),
                    format,
                    scratch: Some(scratch),
                    reader: publish::Reader::Standalone,
                },
                target,
                &mut |_, _| {},
            )
        })();
        match result {
            Ok(meta) => {
                self.writing.store(false, Ordering::Release);
                *st = State::Published(attr);
                pending.note_published(self.store.name(), target.image(), &self.writer);
                *self.published.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                pending.remove_empty_dir(self.store.name(), target.image());
                Ok(meta)
            }
            Err(e) => {
                // Logged with its caller by whoever reports it (see session::log_failure).
                log::debug!("import of {} failed: {e}", display(&self.node()));
                if !self.is_staging() {
                    self.writing.store(false, Ordering::Release);
                    *st = State::Failed(e.to_string(), e.errno());
                    self.drop_empty_target(target, pending);
                }
                Err(e)
            }
        }
    }

    /// After a failed publish into an image directory that the writer made by `mkdir`
    /// and that is still empty (no revision, nothing else being written into it): the
    /// directory goes too, so that `cp -r DIR R/NEW` of files that are no disk images
    /// fails leaving nothing, as `cp` of one such file into `R/` does.
    fn drop_empty_target(&self, target: &Target, pending: &Pending) {
        let (repo, image) = (self.store.name(), target.image());
        let no_revision = || Ok(self.store.revisions(image)?.is_empty());
        match pending.drop_empty_dir_made_by(repo, image, self.writer.uid, no_revision) {
            Ok(true) => log::info!(
                "{repo}/{image}: empty image directory dropped: the import its maker wrote \
                 into it failed"
            ),
            Ok(false) => {}
            Err(e) => log::warn!("{repo}/{image}: {e}"),
        }
    }

    /// The staging check: the content must open as a standalone image.
    pub(super) fn check(&self) -> Result<(), Error> {
        let st = self.lock();
        let State::Writing { tmp, .. } = &*st else {
            return Err(self.gone());
        };
        let checked = choose_format(None, self.hint, tmp.path(), tmp.file()).and_then(|format| {
            // An overlay of a view of this mount is saved as a layer when renamed.
            if format == Format::Qcow2
                && let Some(layer) = save::backed_layer(tmp.file(), tmp.path())?
            {
                return save::backing_view(&layer, tmp.path(), self.mountpoint.as_deref())
                    .map(drop);
            }
            publish::open_standalone(tmp.file(), tmp.path(), format).map(drop)
        });
        checked.inspect_err(|e| {
            log::warn!(
                "staging file {} is not an image: {e}",
                display(&self.node())
            );
        })
    }
}

/// Bytes of a disk sector: a raw disk is made of whole sectors.
const SECTOR: u64 = 512;

/// Refuses what cannot be a disk written into the mount: an empty file, a file nothing
/// was written to (`truncate`, `fallocate`, or the file `qemu-img` creates and sizes
/// before it reopens it; `written` is also true for one left so, blank, past
/// [`BLANK_GRACE`]), or raw bytes that are not whole sectors (a text file written by
/// mistake).
fn check_disk_size(node: &Node, format: Format, size: u64, written: bool) -> Result<(), Error> {
    let why = if size == 0 {
        "the file is empty"
    } else if !written {
        "nothing was written to it, it was only given a size"
    } else if format == Format::Raw && !size.is_multiple_of(SECTOR) {
        "it is no known image format, and as a raw disk its size is not a multiple of 512 bytes"
    } else {
        return Ok(());
    };
    Err(Error::NotAnImage(display(node), why.to_string()))
}

/// The entries a publish changes: the file name, and the image directory and what it
/// holds.
pub(super) fn publish_changes(imp_node: &Node, store: &str, meta: &crate::store::Meta) -> Changes {
    let repo_node = Node::Repo {
        repo: store.to_string(),
    };
    let image_node = Node::Image {
        repo: store.to_string(),
        image: meta.name.clone(),
    };
    let mut entries = Vec::new();
    if let (Some(parent), Node::Import { name, .. }) = (super::parent(imp_node), imp_node) {
        entries.push((parent, name.clone()));
    }
    entries.push((repo_node, meta.name.clone()));
    entries.push((image_node.clone(), revision_dir_name(meta.revision)));
    entries.push((image_node, LATEST.to_string()));
    Changes {
        entries,
        moved: Vec::new(),
        gone: vec![imp_node.clone()],
    }
}
