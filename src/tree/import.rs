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

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::access::{self, W, X};
use super::nodes::{display, revision_dir_name};
use super::open::{Changes, OpenFile, seek_file};
use super::publish::{self, Target, choose_format, split_suffix};
use super::{Attr, Caller, Error, Format, Node, NodeType, Tree};
use crate::store::{Store, TmpFile};

/// Permission bits of a file being imported when the creator gives none.
const DEFAULT_IMPORT_PERM: u16 = 0o644;
/// Name of the symlink to the highest revision (see [`super::nodes::LATEST`]).
const LATEST: &str = super::nodes::LATEST;

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

enum State {
    /// Being written: the scratch file and its current length.
    Writing { tmp: TmpFile, size: u64 },
    /// Published; the attributes it had, for handles still open.
    Published(Attr),
    /// The publish failed (the scratch file is gone); flush repeats the reason.
    Failed(String),
    /// Unlinked or released unpublished.
    Dropped,
}

/// One file being imported.
pub(super) struct Import {
    node: Node,
    store: Arc<Store>,
    writer: Caller,
    /// `None` for a staging file: its target is decided by `rename`.
    target: Option<Target>,
    /// The format a name suffix suggests.
    hint: Option<Format>,
    created: SystemTime,
    perm: Mutex<u16>,
    state: Mutex<State>,
    opens: AtomicUsize,
}

/// Files being imported and empty image directories, shared by the tree and its
/// handles.
#[derive(Default)]
pub(super) struct Pending {
    imports: Mutex<HashMap<Node, Arc<Import>>>,
    empty_dirs: Mutex<BTreeMap<(String, String), SystemTime>>,
}

impl Pending {
    fn imports(&self) -> std::sync::MutexGuard<'_, HashMap<Node, Arc<Import>>> {
        self.imports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dirs(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), SystemTime>> {
        self.empty_dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The import at `node` if `caller` wrote it (`writing`: only while not yet
    /// published, which is when its name is visible).
    pub(super) fn find(&self, node: &Node, caller: &Caller, writing: bool) -> Option<Arc<Import>> {
        let imp = self.imports().get(node).cloned()?;
        let ok = imp.writer.uid == caller.uid && (!writing || imp.is_writing());
        ok.then_some(imp)
    }

    /// Names of the files `caller` is writing in a directory.
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

    /// When `mkdir` made the empty image directory `repo/image`, if it did.
    pub(super) fn empty_dir(&self, repo: &str, image: &str) -> Option<SystemTime> {
        self.dirs()
            .get(&(repo.to_string(), image.to_string()))
            .copied()
    }

    /// The empty image directories of `repo`.
    pub(super) fn empty_dirs(&self, repo: &str) -> Vec<String> {
        self.dirs()
            .keys()
            .filter(|(r, _)| r == repo)
            .map(|(_, i)| i.clone())
            .collect()
    }

    pub(super) fn add_empty_dir(&self, repo: &str, image: &str) {
        self.dirs()
            .insert((repo.to_string(), image.to_string()), SystemTime::now());
    }

    pub(super) fn remove_empty_dir(&self, repo: &str, image: &str) -> bool {
        self.dirs()
            .remove(&(repo.to_string(), image.to_string()))
            .is_some()
    }

    /// Forgets `imp` (if it is still the file at its node) and drops its data.
    pub(super) fn drop_import(&self, imp: &Arc<Import>) {
        {
            let mut map = self.imports();
            if map.get(&imp.node).is_some_and(|i| Arc::ptr_eq(i, imp)) {
                map.remove(&imp.node);
            }
        }
        let mut st = imp.lock();
        if matches!(*st, State::Writing { .. }) {
            *st = State::Dropped;
        }
    }

    /// Moves a staging file to another staging name.
    pub(super) fn rekey(&self, imp: &Arc<Import>, to: Node) -> Arc<Import> {
        let moved = Arc::new(Import {
            node: to.clone(),
            store: imp.store.clone(),
            writer: imp.writer.clone(),
            target: None,
            hint: imp.hint,
            created: imp.created,
            perm: Mutex::new(*imp.perm.lock().unwrap_or_else(|e| e.into_inner())),
            state: Mutex::new(std::mem::replace(&mut *imp.lock(), State::Dropped)),
            opens: AtomicUsize::new(imp.opens.load(Ordering::Acquire)),
        });
        let mut map = self.imports();
        map.remove(&imp.node);
        map.insert(to, moved.clone());
        moved
    }
}

impl Import {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_writing(&self) -> bool {
        matches!(*self.lock(), State::Writing { .. })
    }

    pub(super) fn is_staging(&self) -> bool {
        self.target.is_none()
    }

    /// Its attributes: a regular file of its writer, with its current size.
    pub(super) fn attr(&self) -> Result<Attr, Error> {
        self.attr_of(&self.lock())
    }

    fn attr_of(&self, st: &State) -> Result<Attr, Error> {
        let (size, blocks) = match st {
            State::Writing { tmp, size } => {
                let blocks = tmp.file().metadata().map(|m| m.blocks()).unwrap_or(0);
                (*size, blocks)
            }
            State::Published(attr) => return Ok(attr.clone()),
            State::Failed(..) | State::Dropped => return Err(Error::NoEntry(display(&self.node))),
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
        })
    }

    fn gone(&self) -> Error {
        Error::NoEntry(display(&self.node))
    }

    fn set_size(&self, len: u64) -> Result<(), Error> {
        let mut st = self.lock();
        match &mut *st {
            State::Writing { tmp, size } => {
                tmp.file().set_len(len).map_err(|source| {
                    Error::Store(crate::store::Error::Io {
                        path: tmp.path().to_path_buf(),
                        source,
                    })
                })?;
                *size = len;
                Ok(())
            }
            State::Published(_) => Err(Error::ReadOnly(display(&self.node))),
            _ => Err(self.gone()),
        }
    }

    /// Publishes the written bytes as `target`. On failure a created file is discarded
    /// (nothing remains) while a staging file is kept for its writer to fix or drop.
    pub(super) fn publish(
        &self,
        target: &Target,
        pending: &Pending,
    ) -> Result<crate::store::Meta, Error> {
        let mut st = self.lock();
        let State::Writing { tmp, .. } = &*st else {
            return Err(self.gone());
        };
        let result = (|| {
            let format = choose_format(None, self.hint, tmp.path(), tmp.file())?;
            let owner = access::user_name(self.writer.uid);
            publish::publish(
                &self.store,
                &owner,
                tmp.path(),
                format,
                target,
                &mut |_, _| {},
            )
        })();
        match result {
            Ok(meta) => {
                let attr = self.attr_of(&st)?;
                *st = State::Published(attr);
                pending.remove_empty_dir(self.store.name(), target.image());
                Ok(meta)
            }
            Err(e) => {
                log::warn!("import of {} failed: {e}", display(&self.node));
                if !self.is_staging() {
                    *st = State::Failed(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// The staging check: the content must open as a standalone image.
    fn check(&self) -> Result<(), Error> {
        let st = self.lock();
        let State::Writing { tmp, .. } = &*st else {
            return Err(self.gone());
        };
        let format = choose_format(None, self.hint, tmp.path(), tmp.file())?;
        publish::open_standalone(tmp.path(), format).map(|_| ())
    }
}

/// The entries a publish changes: the file name, and the image directory and what it
/// holds.
fn publish_changes(imp_node: &Node, store: &str, meta: &crate::store::Meta) -> Changes {
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
    Changes { entries }
}

/// What an open handle of an import holds.
pub struct ImportHandle {
    import: Arc<Import>,
    pending: Arc<Pending>,
}

impl ImportHandle {
    fn new(import: Arc<Import>, pending: Arc<Pending>) -> ImportHandle {
        import.opens.fetch_add(1, Ordering::AcqRel);
        ImportHandle { import, pending }
    }

    pub(super) fn import(&self) -> &Arc<Import> {
        &self.import
    }

    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize, Error> {
        let st = self.import.lock();
        let State::Writing { tmp, size } = &*st else {
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
        match &mut *st {
            State::Writing { tmp, size } => {
                tmp.file().write_all_at(data, offset).map_err(|source| {
                    Error::Store(crate::store::Error::Io {
                        path: tmp.path().to_path_buf(),
                        source,
                    })
                })?;
                *size = (*size).max(offset + data.len() as u64);
                Ok(data.len())
            }
            State::Published(_) => Err(Error::ReadOnly(display(&self.import.node))),
            _ => Err(self.import.gone()),
        }
    }

    pub(super) fn seek(&self, offset: u64, whence: i32) -> Result<Option<u64>, Error> {
        let st = self.import.lock();
        let State::Writing { tmp, size } = &*st else {
            return Err(self.import.gone());
        };
        if offset >= *size {
            return Ok(None);
        }
        Ok(seek_file(tmp.file(), tmp.path(), offset, whence)?.map(|o| o.min(*size)))
    }

    pub(super) fn flush(&self) -> Result<Changes, Error> {
        let imp = &self.import;
        let Some(target) = &imp.target else {
            return imp.check().map(|()| Changes::default());
        };
        {
            let st = imp.lock();
            match &*st {
                State::Writing { .. } => {}
                State::Published(_) | State::Dropped => return Ok(Changes::default()),
                State::Failed(msg) => return Err(Error::Unreadable(msg.clone())),
            }
        }
        match imp.publish(target, &self.pending) {
            Ok(meta) => Ok(publish_changes(&imp.node, imp.store.name(), &meta)),
            Err(e) => {
                self.pending.drop_import(imp);
                Err(e)
            }
        }
    }

    pub(super) fn release(&self) {
        let left = self
            .import
            .opens
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        if left == 0 && !self.import.is_staging() {
            self.pending.drop_import(&self.import);
        }
    }

    pub(super) fn attr(&self) -> Result<Attr, Error> {
        self.import.attr()
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
        if let Some(image) = image {
            if store.revisions(image)?.is_empty() && self.pending.empty_dir(repo, image).is_none() {
                return Err(Error::NoEntry(display(parent)));
            }
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
        let perm = match (mode & 0o7777) as u16 {
            0 => DEFAULT_IMPORT_PERM,
            p => p,
        };
        let imp = Arc::new(Import {
            node: node.clone(),
            store,
            writer: caller.clone(),
            target,
            hint,
            created: SystemTime::now(),
            perm: Mutex::new(perm),
            state: Mutex::new(State::Writing { tmp, size: 0 }),
            opens: AtomicUsize::new(0),
        });
        {
            let mut map = self.pending.imports();
            if map.get(&node).is_some_and(|i| i.is_writing()) {
                return Err(Error::Exists(display(&node)));
            }
            map.insert(node.clone(), imp.clone());
        }
        let attr = imp.attr()?;
        let handle = ImportHandle::new(imp, self.pending.clone());
        Ok((node, attr, Arc::new(OpenFile::import(handle))))
    }

    /// Reopens a file being imported (its writer only); `truncate` empties it.
    pub(super) fn open_import(
        &self,
        caller: &Caller,
        node: &Node,
        truncate: bool,
    ) -> Result<ImportHandle, Error> {
        let imp = self
            .pending
            .find(node, caller, true)
            .ok_or_else(|| Error::NoEntry(display(node)))?;
        if truncate {
            imp.set_size(0)?;
        }
        Ok(ImportHandle::new(imp, self.pending.clone()))
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
    /// the revision belongs to its importer at publish time); anything else is refused.
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
                if let Some(len) = set.size {
                    imp.set_size(len)?;
                }
                if let Some(mode) = set.mode {
                    *imp.perm.lock().unwrap_or_else(|e| e.into_inner()) = (mode & 0o7777) as u16;
                }
                imp.attr()
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
