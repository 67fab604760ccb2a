//! The kernel's side of the tree: what one mount holds between requests.
//!
//! The kernel names files by inode number and open files by handle number; it caches
//! names and attributes for as long as it is told, and it closes a file once per
//! descriptor (`flush`) and once more when the last reference to an open file goes
//! (`release`). A [`Session`] keeps all of that state — the inode table, open files and
//! directories, the rule for which close publishes an import, cache lifetimes and which
//! cached names an operation made wrong — and answers every request of the protocol in
//! plain values, so that the whole filesystem, as the kernel sees it, runs in tests
//! without a mount. The FUSE adapter only decodes a request, calls one method here and
//! encodes its answer.
//!
//! Two things come from outside: who still holds a file when one descriptor of it is
//! closed (a mount reads `/proc`; a test answers from its simulated processes), see
//! [`Holders`]; and the kernel's name cache, told to drop entries a change made wrong,
//! see [`NameCache`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::inodes::{Inodes, ROOT_INO};
use super::{
    Attr, Caller, Changes, DIR_BLKSIZE, Error, Node, NodeType, OpenFile, SetAttr, StatFs, Tree,
    XATTR_PREFIX, display, parent,
};

/// The only extended attribute namespace this filesystem has (its `user.pcocc.*`
/// names); xattr(7).
const USER_XATTR_NAMESPACE: &str = "user.";

/// Entries of a first `readdirplus` reply whose metadata is read ahead: `ls` reads
/// with a 32 KiB buffer and an entry with attributes takes ~160 bytes of it.
const FIRST_REPLY_ENTRIES: usize = 256;

/// What is known about a `close` of one descriptor of a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closing {
    /// The closing process is being killed by a signal (the kernel closes its files).
    pub killed: bool,
    /// Another descriptor or a mapping of the same file is still open somewhere.
    pub held: bool,
}

/// Who still holds a file when one of its descriptors is closed.
pub trait Holders: Send + Sync {
    /// Process `pid` closed one descriptor of inode `ino`.
    fn closing(&self, ino: u64, pid: u32) -> Closing;
}

/// Holders for a session no process can be asked about: every close is the last.
pub struct NoHolders;

impl Holders for NoHolders {
    fn closing(&self, _ino: u64, _pid: u32) -> Closing {
        Closing::default()
    }
}

/// The kernel's cache of names.
pub trait NameCache: Send + Sync {
    /// Drop the cached entry `name` of directory `parent` (it names another object now,
    /// or nothing).
    fn invalidate(&self, parent: u64, name: &str);
}

/// A name cache nobody keeps.
pub struct NoNameCache;

impl NameCache for NoNameCache {
    fn invalidate(&self, _parent: u64, _name: &str) {}
}

/// Settings of one mount.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// How long repository and image directory listings and entries may be cached.
    pub refresh: Duration,
    /// Refuse every change (`-o ro`).
    pub read_only: bool,
    /// Every user may use the mount (`-o allow_other`): what the kernel caches for one
    /// caller must not let another past a check (see `Session::ttl`).
    pub shared: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            refresh: Duration::from_secs(1),
            read_only: false,
            shared: false,
        }
    }
}

/// A name the kernel may cache: its inode, attributes and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub attr: Attr,
    pub ttl: Duration,
}

/// A file opened: its handle number and what the adapter needs to know of it.
pub struct Opened {
    pub fh: u64,
    /// Never changes: the kernel may keep its pages across opens.
    pub keep_cache: bool,
    pub file: Arc<OpenFile>,
}

/// One entry of a directory read: `offset` is where the next read continues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub ino: u64,
    pub offset: u64,
    pub kind: NodeType,
    pub name: String,
}

/// One entry of a `readdirplus` read: a [`Listed`] entry with the [`Entry`] the kernel
/// caches (for `.` and `..`, attributes valid for no time, which the kernel never
/// takes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedPlus {
    pub listed: Listed,
    pub entry: Entry,
}

/// `lseek` for data or holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

/// One open directory. Its listing is made when reading starts (offset 0) and kept for
/// the reads that continue it: the kernel reads a directory a few dozen entries per
/// request, and listing the whole directory again for each would make reading it
/// quadratic. A new `opendir` (the next `ls`) or a rewind lists afresh, so changes show.
#[derive(Default)]
struct DirHandle {
    listing: Mutex<Option<Listing>>,
    /// Whether the metadata of the rest of this listing is being read ahead already.
    prefetched: AtomicBool,
}

/// A directory's entries as the kernel reads them, `.` and `..` first.
type Listing = Arc<Vec<Item>>;

/// One entry of a kept listing; `node` is `None` for `.` and `..`, which the kernel
/// never counts as lookups.
struct Item {
    ino: Option<u64>,
    node: Option<Node>,
    kind: NodeType,
    name: String,
}

/// The attributes sent with a `readdirplus` entry whose own attributes could not be
/// had (gone meanwhile, unreadable): valid for no time, so that the kernel asks again
/// with a lookup, which reports the error.
fn placeholder_attr(kind: NodeType) -> Attr {
    let t = std::time::SystemTime::UNIX_EPOCH;
    Attr {
        kind,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        blksize: DIR_BLKSIZE,
    }
}

/// The path of entry `name` of directory `parent`, for messages.
fn named(parent: &Node, name: &str) -> String {
    match parent {
        Node::Root => name.to_string(),
        p => format!("{}/{name}", display(p)),
    }
}

/// Requests that change something: their refusals are what a user must be able to read.
const WRITES: [&str; 11] = [
    "setattr",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "link",
    "open for writing",
    "create",
    "write",
    "import",
    "setxattr",
];

/// Errors of a change that are part of ordinary use (a tool probing a name, `mv` across
/// repositories falling back to a copy, `rm -r` of a directory another writer filled),
/// not something refused for a reason the user needs: logged at info, not as warnings.
const ORDINARY: [i32; 7] = [
    libc::EEXIST,
    libc::ENOTEMPTY,
    libc::EXDEV,
    libc::EISDIR,
    libc::ENOTDIR,
    libc::ESTALE,
    libc::EBADF,
];

/// The level a failed request `what` with error `e` is logged at. Each failure of data
/// (EIO) and each refused change (a refused import, a permission refused, a full
/// repository) is a warning: the caller only gets an errno, and the reason is in this
/// line. A lookup miss is debug; an error an import already reported, debug (it was
/// logged when it happened); other errors of a change, info; other errors of a read,
/// debug. So the default level, warn, shows nothing of ordinary use.
pub(super) fn failure_level(what: &str, e: &Error) -> log::Level {
    let errno = e.errno();
    if errno == libc::ENOENT || matches!(e, Error::ImportFailed { .. }) {
        log::Level::Debug
    } else if errno == libc::EIO {
        log::Level::Warn
    } else if WRITES.contains(&what) {
        if ORDINARY.contains(&errno) {
            log::Level::Info
        } else {
            log::Level::Warn
        }
    } else {
        log::Level::Debug
    }
}

/// Logs a failed request `what` at `path` of the tree, made by `uid`, with the reason
/// (the error's message) and the errno its caller got; at [`failure_level`].
pub(super) fn log_failure(what: &str, path: &str, uid: Option<u32>, e: &Error) {
    let level = failure_level(what, e);
    if !log::log_enabled!(level) {
        return;
    }
    let by = uid.map(|u| format!(" by uid {u}")).unwrap_or_default();
    let errno = std::io::Error::from_raw_os_error(e.errno());
    log::log!(level, "{what} of {path}{by} failed: {e} [{errno}]");
}

fn name_str(name: &OsStr) -> Result<&str, Error> {
    // Repository names are [a-zA-Z0-9_.-]; a name that is not UTF-8 cannot exist.
    name.to_str()
        .ok_or_else(|| Error::NoEntry(name.to_string_lossy().into_owned()))
}

/// An open file, its inode number and the uid that opened it (named in the log lines
/// of its failures).
type OpenHandle = (Arc<OpenFile>, u64, u32);

/// The state of one mount, answering the kernel's requests (see the module comment).
pub struct Session {
    tree: Arc<Tree>,
    settings: SessionSettings,
    inodes: Inodes,
    /// Open files, each with its inode number and the uid that opened it.
    files: Mutex<HashMap<u64, OpenHandle>>,
    /// Open directories (numbered from the same counter as files).
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    holders: Box<dyn Holders>,
    names: Box<dyn NameCache>,
}

impl Session {
    pub fn new(
        tree: Arc<Tree>,
        settings: SessionSettings,
        holders: Box<dyn Holders>,
        names: Box<dyn NameCache>,
    ) -> Session {
        Session {
            tree,
            settings,
            inodes: Inodes::new(),
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            holders,
            names,
        }
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The node inode `ino` stands for, while the kernel knows it.
    pub fn node(&self, ino: u64) -> Result<Node, Error> {
        let node = self.known_node(ino)?;
        self.current(ino, &node)?;
        Ok(node)
    }

    /// The node behind `ino`, whatever it stands for now.
    fn known_node(&self, ino: u64) -> Result<Node, Error> {
        self.inodes
            .node(ino)
            .ok_or_else(|| Error::Stale(format!("inode {ino}")))
    }

    /// ESTALE when `ino` stands for a revision that is no longer the one at its place
    /// (deleted and made again outside the mount): the kernel then looks the path up
    /// again, and gets the new revision's inodes, with pages of their own, instead of
    /// mixing pages it kept of the old one with the new one's bytes.
    fn current(&self, ino: u64, node: &Node) -> Result<(), Error> {
        match (self.inodes.stamp(ino), self.tree.stamp(node)) {
            (Some(was), Some(now)) if was != now => Err(Error::Stale(format!(
                "{}: made again since the kernel looked it up",
                display(node)
            ))),
            _ => Ok(()),
        }
    }

    /// Number of inodes the kernel holds.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// How long the kernel may keep `node`'s entry and attributes. Without
    /// `default_permissions` the kernel checks nothing on a name it holds: a path
    /// through cached names reaches the daemon only at its first uncached one. Every
    /// check of who may see a repository's content is made at the repository (its
    /// `meta/`), so on a shared mount a repository some user may not read is never
    /// cached: each path through it is looked up again, as its caller, and refused to
    /// whoever may not read it, whatever is cached below.
    fn ttl(&self, node: &Node) -> Duration {
        if self.settings.shared
            && let Node::Repo { repo } = node
            && !self.tree.repo_open_to_all(repo)
        {
            return Duration::ZERO;
        }
        self.tree.node_ttl(node, self.settings.refresh)
    }

    /// Open file `fh`, its inode number and the uid that opened it.
    /// The open file behind `fh`, if it is open.
    pub fn open_file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.file(fh).ok().map(|(f, _, _)| f)
    }

    fn file(&self, fh: u64) -> Result<OpenHandle, Error> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.get(&fh).cloned().ok_or(Error::BadHandle(fh))
    }

    fn add_file(&self, f: Arc<OpenFile>, ino: u64, uid: u32) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, (f, ino, uid));
        fh
    }

    /// The attributes of an open file of inode `ino`, if one is open: an open file
    /// stays what it was (`fstat` works on a view whose revision was deleted).
    fn open_attr(&self, ino: u64) -> Option<Attr> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .values()
            .find(|(_, i, _)| *i == ino)
            .and_then(|(f, _, _)| f.attr().ok())
    }

    /// Starts the thread that, every second, publishes the files their writer left
    /// blank (see [`Tree::publish_abandoned`]); it ends with the session.
    pub fn start_upkeep(self: &Arc<Self>) {
        let session = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let Some(s) = session.upgrade() else {
                        return;
                    };
                    for changes in s.tree.publish_abandoned() {
                        s.apply(&changes);
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the thread publishing blank files: {e}");
        }
    }

    /// At the daemon's exit: see [`Tree::publish_blank_files_now`].
    pub fn publish_blank_files_now(&self) {
        self.tree.publish_blank_files_now();
    }

    /// Brings the kernel's names in line with `changes`: moved objects keep their
    /// inodes under their new names; names that now stand for something else are
    /// dropped from its cache.
    fn apply(&self, changes: &Changes) {
        for gone in &changes.gone {
            self.inodes.detach(gone);
        }
        for (from, to) in &changes.moved {
            self.inodes.rebind(from, to);
        }
        for (parent, name) in &changes.entries {
            self.names.invalidate(self.inodes.peek(parent), name);
        }
    }

    /// Logs a failed request `what` at `path` made by `uid` (see [`log_failure`]) and
    /// passes its error on.
    fn fail(&self, what: &str, path: &str, uid: Option<u32>, e: Error) -> Error {
        log_failure(what, path, uid, &e);
        e
    }

    /// The path of the file open as inode `ino`, for messages.
    fn path_of(&self, ino: u64) -> String {
        self.inodes
            .node(ino)
            .map(|n| display(&n))
            .unwrap_or_else(|| format!("inode {ino}"))
    }

    fn writable(&self) -> Result<(), Error> {
        if self.settings.read_only {
            Err(Error::ReadOnlyMount)
        } else {
            Ok(())
        }
    }

    /// An entry reply for `node`: counts one kernel lookup of its inode.
    fn entry(&self, node: &Node, attr: Attr, ttl: Duration) -> Entry {
        Entry {
            ino: self.inodes.remember_as(node, self.tree.stamp(node)),
            attr,
            ttl,
        }
    }

    pub fn lookup(&self, caller: &Caller, parent: u64, name: &OsStr) -> Result<Entry, Error> {
        let parent = self.node(parent)?;
        let name = name_str(name)?;
        let node = self
            .tree
            .lookup(caller, &parent, name)
            .map_err(|e| self.fail("lookup", &named(&parent, name), Some(caller.uid), e))?;
        let attr = self
            .tree
            .getattr(caller, &node)
            .map_err(|e| self.fail("getattr", &display(&node), Some(caller.uid), e))?;
        let ttl = self.ttl(&node);
        Ok(self.entry(&node, attr, ttl))
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// `stat`: through an open handle `fh` the open file's own attributes (a file being
    /// imported knows its size); otherwise the tree's, or, for a file that is gone, those
    /// of a file still open on it.
    pub fn getattr(
        &self,
        caller: &Caller,
        ino: u64,
        fh: Option<u64>,
    ) -> Result<(Attr, Duration), Error> {
        let node = self.known_node(ino)?;
        let attr = match fh.and_then(|fh| self.file(fh).ok()) {
            Some((f, _, _)) => f.attr(),
            None => match self
                .current(ino, &node)
                .and_then(|()| self.tree.getattr(caller, &node))
            {
                Err(e) => self.open_attr(ino).ok_or(e),
                found => found,
            },
        };
        match attr {
            Ok(a) => Ok((a, self.ttl(&node))),
            Err(e) => Err(self.fail("getattr", &display(&node), Some(caller.uid), e)),
        }
    }

    pub fn setattr(
        &self,
        caller: &Caller,
        ino: u64,
        fh: Option<u64>,
        set: &SetAttr,
    ) -> Result<(Attr, Duration), Error> {
        let node = self.node(ino)?;
        self.writable()?;
        let file = fh.and_then(|fh| self.file(fh).ok()).map(|(f, _, _)| f);
        match self.tree.setattr(caller, &node, file.as_deref(), set) {
            Ok(a) => Ok((a, self.ttl(&node))),
            Err(e) => Err(self.fail("setattr", &display(&node), Some(caller.uid), e)),
        }
    }

    pub fn readlink(&self, caller: &Caller, ino: u64) -> Result<String, Error> {
        let node = self.node(ino)?;
        self.tree
            .readlink(caller, &node)
            .map_err(|e| self.fail("readlink", &display(&node), Some(caller.uid), e))
    }

    pub fn mkdir(&self, caller: &Caller, parent: u64, name: &OsStr) -> Result<Entry, Error> {
        self.writable()?;
        let parent = self.node(parent)?;
        let name = name_str(name)?;
        let (node, attr) = self
            .tree
            .mkdir(caller, &parent, name)
            .map_err(|e| self.fail("mkdir", &named(&parent, name), Some(caller.uid), e))?;
        let ttl = self.ttl(&node);
        Ok(self.entry(&node, attr, ttl))
    }

    pub fn unlink(&self, caller: &Caller, parent: u64, name: &OsStr) -> Result<(), Error> {
        self.writable()?;
        let parent = self.node(parent)?;
        let name = name_str(name)?;
        self.tree
            .unlink_entry(caller, &parent, name)
            .map(|c| self.apply(&c))
            .map_err(|e| self.fail("unlink", &named(&parent, name), Some(caller.uid), e))
    }

    pub fn rmdir(&self, caller: &Caller, parent: u64, name: &OsStr) -> Result<(), Error> {
        self.writable()?;
        let parent = self.node(parent)?;
        let name = name_str(name)?;
        self.tree
            .rmdir_entry(caller, &parent, name)
            .map(|c| self.apply(&c))
            .map_err(|e| self.fail("rmdir", &named(&parent, name), Some(caller.uid), e))
    }

    /// `rename`; `flags` are renameat2's (only `RENAME_NOREPLACE` means something here).
    /// The moved object keeps its inode before the reply, as the kernel's does.
    pub fn rename(
        &self,
        caller: &Caller,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Error> {
        // RENAME_EXCHANGE and RENAME_WHITEOUT have no meaning for repository objects.
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(Error::InvalidFlags(flags));
        }
        self.writable()?;
        let from = self.node(parent)?;
        let to = self.node(newparent)?;
        let (name, newname) = (name_str(name)?, name_str(newname)?);
        let changes = self
            .tree
            .rename_entry(caller, &from, name, &to, newname)
            .map_err(|e| {
                let path = format!("{} to {}", named(&from, name), named(&to, newname));
                self.fail("rename", &path, Some(caller.uid), e)
            })?;
        self.apply(&changes);
        Ok(())
    }

    /// `link`: the kernel insists on a regular-file entry, but the name is an image
    /// directory from now on, so the entry is sent valid for no time.
    pub fn link(
        &self,
        caller: &Caller,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<Entry, Error> {
        self.writable()?;
        let src = self.node(ino)?;
        let parent = self.node(newparent)?;
        let name = name_str(newname)?;
        let (node, attr, changes) = self.tree.link(caller, &src, &parent, name).map_err(|e| {
            let path = format!("{} to {}", display(&src), named(&parent, name));
            self.fail("link", &path, Some(caller.uid), e)
        })?;
        self.apply(&changes);
        Ok(self.entry(&node, attr, Duration::ZERO))
    }

    /// `open` with open(2) `flags`.
    pub fn open(&self, caller: &Caller, ino: u64, flags: i32) -> Result<Opened, Error> {
        let node = self.node(ino)?;
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if write {
            self.writable()?;
        }
        let truncate = flags & libc::O_TRUNC != 0;
        let file = self
            .tree
            .open(caller, &node, write, truncate)
            .map_err(|e| {
                let what = if write { "open for writing" } else { "open" };
                self.fail(what, &display(&node), Some(caller.uid), e)
            })?;
        Ok(Opened {
            fh: self.add_file(file.clone(), ino, caller.uid),
            keep_cache: file.immutable(),
            file,
        })
    }

    /// `create`: a new file to import; its entry is valid for no time, since once
    /// published the name is an image directory.
    pub fn create(
        &self,
        caller: &Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<(Entry, u64), Error> {
        self.writable()?;
        let parent = self.node(parent)?;
        let name = name_str(name)?;
        let (node, attr, file) = self
            .tree
            .create(caller, &parent, name, mode)
            .map_err(|e| self.fail("create", &named(&parent, name), Some(caller.uid), e))?;
        let entry = self.entry(&node, attr, Duration::ZERO);
        let fh = self.add_file(file, entry.ino, caller.uid);
        Ok((entry, fh))
    }

    pub fn read(&self, fh: u64, buf: &mut [u8], offset: u64) -> Result<usize, Error> {
        let (f, ino, uid) = self.file(fh)?;
        f.read(buf, offset)
            .map_err(|e| self.fail("read", &self.path_of(ino), Some(uid), e))
    }

    pub fn write(&self, fh: u64, data: &[u8], offset: u64) -> Result<usize, Error> {
        let (f, ino, uid) = self.file(fh)?;
        f.write(data, offset)
            .map_err(|e| self.fail("write", &self.path_of(ino), Some(uid), e))
    }

    /// `close(2)` of one descriptor of handle `fh` by process `pid`; its error is what
    /// `close` returns. A file being imported is complete when nothing holds it any more
    /// (no descriptor in any process, no mapping): that close publishes it and reports
    /// the outcome. A close the kernel makes for a writer killed by a signal (a process
    /// closing a handle opened for writing) never completes it; one made for a killed
    /// reader changes nothing.
    pub fn flush(&self, fh: u64, pid: u32) -> Result<(), Error> {
        let (f, ino, uid) = self.file(fh)?;
        // Only a file being imported cares about its closes.
        if f.immutable() {
            return Ok(());
        }
        let closing = self.holders.closing(ino, pid);
        let r = if closing.killed {
            f.abandon();
            Ok(())
        } else {
            f.flush(!closing.held).map(|changes| self.apply(&changes))
        };
        self.spent(&f);
        r.map_err(|e| self.fail("import", &self.path_of(ino), Some(uid), e))
    }

    /// The last reference to handle `fh` is gone: an import still unpublished is
    /// published now (when its last close could not), or discarded.
    pub fn release(&self, fh: u64) {
        let f = self
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        if let Some((f, _, _)) = f {
            self.apply(&f.release());
            self.spent(&f);
        }
    }

    /// A file that is no longer being imported where it was created (published, failed,
    /// dropped) keeps its inode for the descriptors still open on it; a new file of the
    /// same name gets another.
    fn spent(&self, f: &OpenFile) {
        if let Some(node) = f.import_ended() {
            self.inodes.detach(&node);
        }
    }

    pub fn opendir(&self, _ino: u64) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::default());
        fh
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
    }

    /// The listing of directory `node` (inode `ino`) for a read at `offset` through
    /// handle `fh`: the handle's own when reading continues, a fresh one when it starts
    /// (see [`DirHandle`]).
    fn listing(
        &self,
        caller: &Caller,
        ino: u64,
        node: &Node,
        fh: u64,
        offset: u64,
    ) -> Result<(Listing, Option<Arc<DirHandle>>), Error> {
        let handle = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned();
        let kept = handle.as_ref().filter(|_| offset > 0).and_then(|h| {
            let l = h.listing.lock().unwrap_or_else(|e| e.into_inner());
            l.clone()
        });
        if let Some(l) = kept {
            return Ok((l, handle));
        }
        let entries = self
            .tree
            .readdir(caller, node)
            .map_err(|e| self.fail("readdir", &display(node), Some(caller.uid), e))?;
        let parent_ino = match node {
            Node::Root => ROOT_INO,
            other => parent(other)
                .map(|p| self.inodes.peek(&p))
                .unwrap_or(ROOT_INO),
        };
        let dots = [(ino, "."), (parent_ino, "..")].map(|(i, n)| Item {
            ino: Some(i),
            node: None,
            kind: NodeType::Directory,
            name: n.to_string(),
        });
        let listing = Arc::new(
            dots.into_iter()
                .chain(entries.into_iter().map(|e| Item {
                    ino: None,
                    kind: e.kind,
                    node: Some(e.node),
                    name: e.name,
                }))
                .collect::<Vec<_>>(),
        );
        if let Some(h) = &handle {
            *h.listing.lock().unwrap_or_else(|e| e.into_inner()) = Some(listing.clone());
            h.prefetched.store(false, Ordering::Relaxed);
        }
        Ok((listing, handle))
    }

    /// `readdir` from `offset`: hands each entry to `add` until it answers that the
    /// reply is full.
    pub fn readdir(
        &self,
        caller: &Caller,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&Listed) -> bool,
    ) -> Result<(), Error> {
        let node = self.node(ino)?;
        let (listing, _) = self.listing(caller, ino, &node, fh, offset)?;
        // Offsets are positions in the listing, which stays the same while it is read.
        for (i, e) in listing.iter().enumerate().skip(offset as usize) {
            let child = match (&e.ino, &e.node) {
                (Some(i), _) => *i,
                (None, Some(n)) => self.inodes.peek(n),
                (None, None) => continue,
            };
            let listed = Listed {
                ino: child,
                offset: (i + 1) as u64,
                kind: e.kind,
                name: e.name.clone(),
            };
            if add(&listed) {
                break;
            }
        }
        Ok(())
    }

    /// `readdirplus` from `offset`: hands each entry with its attributes to `add` until
    /// it answers that the reply is full. Every entry sent counts as a lookup of its
    /// inode; the one that did not fit is not counted.
    pub fn readdirplus(
        &self,
        caller: &Caller,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&ListedPlus) -> bool,
    ) -> Result<(), Error> {
        let node = self.node(ino)?;
        let (listing, handle) = self.listing(caller, ino, &node, fh, offset)?;
        // Read ahead the metadata the attributes are made of: at the start, what one
        // reply holds; past the first request (the kernel asks for attributes then only
        // when the reader stats what it lists, as `ls -l` does), the whole rest, once.
        let ahead = if offset == 0 {
            Some(FIRST_REPLY_ENTRIES)
        } else if handle
            .as_ref()
            .is_some_and(|h| !h.prefetched.swap(true, Ordering::Relaxed))
        {
            Some(usize::MAX)
        } else {
            None
        };
        if let Some(count) = ahead {
            let nodes = listing
                .iter()
                .skip(offset as usize)
                .filter_map(|e| e.node.as_ref());
            self.tree.prefetch_attrs(caller, &node, nodes.take(count));
        }
        for (i, e) in listing.iter().enumerate().skip(offset as usize) {
            let off = (i + 1) as u64;
            let Some(child) = &e.node else {
                // `.` and `..`: the kernel takes neither attributes nor a lookup from them.
                let plus = ListedPlus {
                    listed: Listed {
                        ino: e.ino.unwrap_or(ROOT_INO),
                        offset: off,
                        kind: NodeType::Directory,
                        name: e.name.clone(),
                    },
                    entry: Entry {
                        ino: e.ino.unwrap_or(ROOT_INO),
                        attr: placeholder_attr(NodeType::Directory),
                        ttl: Duration::ZERO,
                    },
                };
                if add(&plus) {
                    break;
                }
                continue;
            };
            let (attr, ttl) = match self.tree.getattr(caller, child) {
                Ok(a) => (a, self.ttl(child)),
                Err(err) => {
                    log::debug!("readdirplus {}: {err}", display(child));
                    (placeholder_attr(e.kind), Duration::ZERO)
                }
            };
            let entry = self.entry(child, attr, ttl);
            let child_ino = entry.ino;
            let plus = ListedPlus {
                listed: Listed {
                    ino: child_ino,
                    offset: off,
                    kind: e.kind,
                    name: e.name.clone(),
                },
                entry,
            };
            if add(&plus) {
                self.inodes.forget(child_ino, 1);
                break;
            }
        }
        Ok(())
    }

    /// The first repository's filesystem answers for the mount (df shows real space).
    pub fn statfs(&self) -> Result<StatFs, Error> {
        self.tree
            .statfs()
            .map_err(|e| self.fail("statfs", "/", None, e))
    }

    /// The value of extended attribute `name`. `ls -l` asks for security.selinux and
    /// the POSIX ACLs of every entry, and the kernel caches no answer. Only
    /// `user.pcocc.*` names exist here, so the rest is answered at once, without the
    /// repository: in the `user.` namespace "no such attribute"; any other namespace
    /// (security., system., trusted.) is not supported at all, which is what the kernel
    /// itself answers for a namespace a filesystem lacks, and what tells `ls`
    /// (coreutils caches it per device) to stop asking for every entry.
    pub fn getxattr(&self, caller: &Caller, ino: u64, name: &OsStr) -> Result<Vec<u8>, Error> {
        let node = self.node(ino)?;
        match name.to_str() {
            Some(n) if n.starts_with(XATTR_PREFIX) => {}
            Some(n) if n.starts_with(USER_XATTR_NAMESPACE) => return Err(Error::NoAttribute),
            _ => return Err(Error::NotSupported(display(&node))),
        }
        match self.tree.getxattr(caller, &node, name) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(Error::NoAttribute),
            Err(e) => Err(self.fail("getxattr", &display(&node), Some(caller.uid), e)),
        }
    }

    /// The names of the extended attributes, each followed by a NUL, as listxattr(2)
    /// returns them.
    pub fn listxattr(&self, caller: &Caller, ino: u64) -> Result<Vec<u8>, Error> {
        let node = self.node(ino)?;
        let names = self
            .tree
            .listxattr(caller, &node)
            .map_err(|e| self.fail("listxattr", &display(&node), Some(caller.uid), e))?;
        let mut buf = Vec::new();
        for n in names {
            buf.extend_from_slice(n.as_bytes());
            buf.push(0);
        }
        Ok(buf)
    }

    pub fn setxattr(&self, caller: &Caller, ino: u64) -> Result<(), Error> {
        let node = self.node(ino)?;
        self.tree
            .setxattr(caller, &node)
            .map_err(|e| self.fail("setxattr", &display(&node), Some(caller.uid), e))
    }

    /// `access(2)` with `mask`'s `R_OK`/`W_OK`/`X_OK`.
    pub fn access(&self, caller: &Caller, ino: u64, mask: i32) -> Result<(), Error> {
        let node = self.node(ino)?;
        if mask & libc::W_OK != 0 {
            self.writable()?;
        }
        self.tree
            .access(caller, &node, mask)
            .map_err(|e| self.fail("access", &display(&node), Some(caller.uid), e))
    }

    /// `fallocate`: not supported. `cp` punches holes in what it writes when it can;
    /// without fallocate it leaves them by seeking, and imports keep holes either way.
    /// A writer that needs it fails, and its file is not published.
    pub fn fallocate(&self, fh: u64) -> Result<(), Error> {
        let (_, ino, _) = self.file(fh)?;
        Err(Error::NotSupported(format!(
            "{}: fallocate",
            self.path_of(ino)
        )))
    }

    /// `lseek(SEEK_DATA/SEEK_HOLE)`; `None` means ENXIO.
    pub fn lseek(&self, fh: u64, offset: i64, whence: Seek) -> Result<Option<u64>, Error> {
        let (f, ino, uid) = self.file(fh)?;
        let off = u64::try_from(offset).map_err(|_| Error::InvalidOffset(offset))?;
        let r = match whence {
            Seek::Data => f.seek_data(off),
            Seek::Hole => f.seek_hole(off),
        };
        r.map_err(|e| self.fail("lseek", &self.path_of(ino), Some(uid), e))
    }
}
