//! The FUSE adapter: inode numbers, fuser callbacks and errno replies, nothing else.
//!
//! Every callback turns inode numbers into tree nodes, calls one [`Tree`] method as the
//! requesting user and replies with its answer or one errno ([`tree::Error::errno`]).
//! Repository rules live in the tree, so the whole filesystem runs in tests without a
//! mount; this file only has to be a faithful translator. Expected misses (`ENOENT` on
//! lookup) log at debug, other failures one warning line with the path and errno.
//!
//! Caching follows what can change: revision directories and their files never change,
//! so the kernel may keep their attributes, entries and pages for long; repository and
//! image directories change when another host imports or deletes, so their entries live
//! only for the configured refresh time. Names that change kind because of this daemon
//! (an import published, a rename) are invalidated through fuser's notifier, from a
//! separate thread so that no request ever waits on its own notification.

pub mod caller;

/// The caller of request `$req` acting on this thread (see `ImageFs::acting`), or an
/// error reply on `$reply` when the thread cannot take their identity.
macro_rules! acting {
    ($req:expr, $reply:expr) => {
        match Self::acting($req) {
            Ok(a) => a,
            Err(e) => return $reply.error(e),
        }
    };
}
pub mod daemon;
pub mod options;
pub mod readahead;

use crate::tree::inodes::{Inodes, ROOT_INO};
use crate::tree::{self, Attr, Changes, Node, NodeType, OpenFile, SetAttr, Tree};
use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The only extended attribute namespace this filesystem has (its `user.pcocc.*`
/// names, see [`tree::XATTR_PREFIX`]); xattr(7).
const USER_XATTR_NAMESPACE: &str = "user.";

/// Entries of a first `readdirplus` reply whose metadata is read ahead: `ls` reads
/// with a 32 KiB buffer and an entry with attributes takes ~160 bytes of it.
const FIRST_REPLY_ENTRIES: usize = 256;

/// Largest read or write the daemon accepts in one request (the kernel's FUSE maximum,
/// `max_pages_limit` 256 × 4 KiB).
const MAX_IO: u32 = 1 << 20;

thread_local! {
    /// The read buffer of one request thread (see `read`).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Settings of one mount.
#[derive(Clone, Debug)]
pub struct FsSettings {
    /// How long repository and image directory listings and entries may be cached.
    pub refresh: Duration,
    /// Refuse every change (`-o ro`).
    pub read_only: bool,
    /// Where the filesystem is mounted, to recognise its files in `/proc`.
    pub mountpoint: Option<std::path::PathBuf>,
}

impl Default for FsSettings {
    fn default() -> Self {
        FsSettings {
            refresh: Duration::from_secs(1),
            read_only: false,
            mountpoint: None,
        }
    }
}

/// The filesystem served over FUSE.
pub struct ImageFs {
    tree: Arc<Tree>,
    settings: FsSettings,
    inodes: Inodes,
    /// Open files, each with its inode number.
    handles: Mutex<HashMap<u64, (Arc<OpenFile>, u64)>>,
    /// This mount as `/proc` shows it (found at the first close that needs it).
    mount: OnceLock<Option<caller::MountIds>>,
    /// Open directories (numbered from the same counter as files).
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    invalidator: Arc<Invalidator>,
    /// Opens wait here until the mount's read-ahead window is set (see [`readahead`]).
    open_gate: Arc<readahead::OpenGate>,
    /// Whether the kernel agreed to FUSE passthrough (decided in `init`).
    passthrough: bool,
    /// Backing files registered with the kernel for passthrough opens.
    backings: Mutex<Backings>,
}

/// The kernel accepts only one backing file per inode at a time, so every passthrough
/// open of an inode shares one backing id, closed when the last of them is released.
#[derive(Default)]
struct Backings {
    /// Inode → (backing id, open handles using it).
    by_inode: HashMap<u64, (Arc<BackingId>, usize)>,
    /// Handle → inode, for `release`.
    by_handle: HashMap<u64, u64>,
}

/// Forwards "drop this cached name" messages to the kernel from its own thread, once the
/// session (which owns the channel to the kernel) exists.
#[derive(Debug, Default)]
pub struct Invalidator {
    tx: OnceLock<Mutex<Sender<(u64, String)>>>,
}

impl Invalidator {
    /// Starts forwarding through `notifier` (from `Session::notifier`).
    pub fn start(&self, notifier: Notifier) {
        let (tx, rx) = mpsc::channel::<(u64, String)>();
        if self.tx.set(Mutex::new(tx)).is_ok() {
            let spawned = std::thread::Builder::new()
                .name("inval".into())
                .spawn(move || {
                    for (parent, name) in rx {
                        // ENOENT means the kernel had nothing cached: fine.
                        let _ = notifier.inval_entry(INodeNo(parent), OsStr::new(&name));
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start the cache invalidation thread: {e}");
            }
        }
    }

    fn send(&self, parent: u64, name: &str) {
        if let Some(tx) = self.tx.get() {
            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send((parent, name.to_string()));
        }
    }
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

/// A directory's entries as the adapter sends them, `.` and `..` first.
type Listing = Arc<Vec<Listed>>;

/// One entry of a listing as the adapter sends it; `node` is `None` for `.` and `..`,
/// which the kernel never counts as lookups.
struct Listed {
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
        blksize: tree::DIR_BLKSIZE,
    }
}

fn errno(e: &tree::Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(kind: NodeType) -> FileType {
    match kind {
        NodeType::Directory => FileType::Directory,
        NodeType::RegularFile => FileType::RegularFile,
        NodeType::Symlink => FileType::Symlink,
    }
}

fn fuse_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

fn name_str(name: &OsStr) -> Result<&str, Errno> {
    // Repository names are [a-zA-Z0-9_.-]; a name that is not UTF-8 cannot exist.
    name.to_str().ok_or(Errno::ENOENT)
}

impl ImageFs {
    pub fn new(tree: Arc<Tree>, settings: FsSettings) -> ImageFs {
        ImageFs {
            tree,
            settings,
            inodes: Inodes::new(),
            handles: Mutex::new(HashMap::new()),
            mount: OnceLock::new(),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            invalidator: Arc::default(),
            open_gate: Arc::default(),
            passthrough: false,
            backings: Mutex::default(),
        }
    }

    /// The gate opens wait at until the read-ahead window is set (open unless held).
    pub fn open_gate(&self) -> Arc<readahead::OpenGate> {
        self.open_gate.clone()
    }

    /// The invalidation forwarder, to start once the session is mounted.
    pub fn invalidator(&self) -> Arc<Invalidator> {
        self.invalidator.clone()
    }

    /// The caller of `req`, with the serving thread acting as them until the value is
    /// dropped: every repository access made for the request is judged by the kernel
    /// with the caller's rights.
    fn acting(req: &Request) -> Result<caller::Acting, Errno> {
        caller::Acting::new(caller::from_request(req.uid(), req.gid(), req.pid())).map_err(|e| {
            log::error!("request of uid {}: {e}", req.uid());
            Errno::EPERM
        })
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes.node(ino.0).ok_or(Errno::ESTALE)
    }

    fn ttl(&self, node: &Node) -> Duration {
        tree::cache_ttl(node, self.settings.refresh)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        let h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        h.get(&fh.0).map(|(f, _)| f.clone()).ok_or(Errno::EBADF)
    }

    /// This mount as `/proc` shows it, found at the first call.
    fn mount_ids(&self) -> Option<&caller::MountIds> {
        self.mount
            .get_or_init(|| {
                let found = self
                    .settings
                    .mountpoint
                    .as_deref()
                    .and_then(caller::MountIds::find);
                if found.is_none() {
                    log::warn!(
                        "this mount is not in /proc/self/mountinfo: every close of a file being imported is taken as its last"
                    );
                }
                found
            })
            .as_ref()
    }

    fn add_handle(&self, f: Arc<OpenFile>, ino: u64) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, (f, ino));
        FileHandle(fh)
    }

    /// The attributes of an open file of inode `ino`, if one is open: an open file
    /// stays what it was (`fstat` works on a view whose revision was deleted).
    fn open_attr(&self, ino: u64) -> Option<Attr> {
        let h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        h.values()
            .find(|(_, i)| *i == ino)
            .and_then(|(f, _)| f.attr().ok())
    }

    fn invalidate(&self, changes: &Changes) {
        for (parent, name) in &changes.entries {
            self.invalidator.send(self.inodes.peek(parent), name);
        }
    }

    fn fail(&self, what: &str, node: Option<&Node>, e: &tree::Error) -> Errno {
        let path = node.map(tree::display).unwrap_or_default();
        if e.errno() == libc::ENOENT {
            log::debug!("{what} {path}: {e}");
        } else {
            log::warn!("{what} {path}: {e} (errno {})", e.errno());
        }
        errno(e)
    }

    fn deny_if_read_only(&self) -> Result<(), Errno> {
        if self.settings.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// The listing of directory `node` for a read at `offset` through handle `fh`: the
    /// handle's own when reading continues, a fresh one when it starts (see
    /// [`DirHandle`]).
    fn listing(
        &self,
        req: &Request,
        ino: INodeNo,
        node: &Node,
        fh: FileHandle,
        offset: u64,
    ) -> Result<(Listing, Option<Arc<DirHandle>>), Errno> {
        let handle = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
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
            .readdir(&*Self::acting(req)?, node)
            .map_err(|e| self.fail("readdir", Some(node), &e))?;
        let parent_ino = match node {
            Node::Root => ROOT_INO,
            other => tree::parent(other)
                .map(|p| self.inodes.peek(&p))
                .unwrap_or(ROOT_INO),
        };
        let dots = [(ino.0, "."), (parent_ino, "..")].map(|(i, n)| Listed {
            ino: Some(i),
            node: None,
            kind: NodeType::Directory,
            name: n.to_string(),
        });
        let listing: Listing = Arc::new(
            dots.into_iter()
                .chain(entries.into_iter().map(|e| Listed {
                    ino: None,
                    kind: e.kind,
                    node: Some(e.node),
                    name: e.name,
                }))
                .collect(),
        );
        if let Some(h) = &handle {
            *h.listing.lock().unwrap_or_else(|e| e.into_inner()) = Some(listing.clone());
            h.prefetched.store(false, Ordering::Relaxed);
        }
        Ok((listing, handle))
    }

    fn lock_backings(&self) -> std::sync::MutexGuard<'_, Backings> {
        self.backings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backing id the kernel reads inode `ino` through, registering `file` when no
    /// open of the inode holds one; counted as one more user. `None` (serve the reads
    /// ourselves) when the kernel refuses, for example without `CAP_SYS_ADMIN`.
    fn backing_for(
        &self,
        ino: u64,
        file: &std::fs::File,
        reply: &ReplyOpen,
    ) -> Option<Arc<BackingId>> {
        let mut b = self.lock_backings();
        if let Some((id, users)) = b.by_inode.get_mut(&ino) {
            *users += 1;
            return Some(id.clone());
        }
        match reply.open_backing(file) {
            Ok(id) => {
                let id = Arc::new(id);
                b.by_inode.insert(ino, (id.clone(), 1));
                Some(id)
            }
            Err(e) => {
                log::debug!("passthrough refused, serving reads: {e}");
                None
            }
        }
    }

    /// Handle `fh` is released: one user less of its inode's backing id, which is closed
    /// with the last.
    fn drop_backing(&self, fh: u64) {
        let mut b = self.lock_backings();
        let Some(ino) = b.by_handle.remove(&fh) else {
            return;
        };
        if let Some((_, users)) = b.by_inode.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                b.by_inode.remove(&ino);
            }
        }
    }

    fn reply_entry(&self, node: &Node, attr: &Attr, ttl: Duration, reply: ReplyEntry) {
        let ino = self.inodes.remember(node);
        reply.entry(&ttl, &fuse_attr(ino, attr), Generation(0));
    }

    fn do_lookup(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<(Node, Attr), Errno> {
        let parent = self.node(parent)?;
        let name = name_str(name)?;
        let caller = Self::acting(req)?;
        let node = self
            .tree
            .lookup(&caller, &parent, name)
            .map_err(|e| self.fail("lookup", Some(&parent), &e))?;
        let attr = self
            .tree
            .getattr(&caller, &node)
            .map_err(|e| self.fail("getattr", Some(&node), &e))?;
        Ok((node, attr))
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        // readdirplus answers a listing with every entry's attributes, so `ls -l` needs
        // no lookup per entry; "auto" lets the kernel use it only when the reader also
        // stats the entries (plain `ls` gets plain readdir after the first request).
        if let Err(missing) = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO)
        {
            log::debug!("the kernel lacks readdirplus capabilities {missing:?}");
        }
        // Passthrough lets the kernel read a stored layer served verbatim straight from
        // its file. Stack depth 1: backing files on a plain filesystem, and this mount
        // may still sit under an overlay.
        if config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
        {
            self.passthrough = true;
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(req, parent, name) {
            Ok((node, attr)) => {
                let ttl = self.ttl(&node);
                self.reply_entry(&node, &attr, ttl, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        // An open file being imported knows its own size; everything else asks the tree.
        let attr = match fh.and_then(|fh| self.handle(fh).ok()) {
            Some(h) => h.attr(),
            None => match self.tree.getattr(&*acting!(req, reply), &node) {
                Err(e) => self.open_attr(ino.0).ok_or(e),
                found => found,
            },
        };
        match attr {
            Ok(a) => reply.attr(&self.ttl(&node), &fuse_attr(ino.0, &a)),
            Err(e) => reply.error(self.fail("getattr", Some(&node), &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = self.deny_if_read_only() {
            return reply.error(e);
        }
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        let set = SetAttr {
            size,
            mode,
            uid,
            gid,
            times: atime.is_some() || mtime.is_some(),
        };
        match self
            .tree
            .setattr(&*acting!(req, reply), &node, handle.as_deref(), &set)
        {
            Ok(a) => reply.attr(&self.ttl(&node), &fuse_attr(ino.0, &a)),
            Err(e) => reply.error(self.fail("setattr", Some(&node), &e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.tree.readlink(&*acting!(req, reply), &node) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(self.fail("readlink", Some(&node), &e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.deny_if_read_only().and_then(|_| {
            let parent = self.node(parent)?;
            let name = name_str(name)?;
            self.tree
                .mkdir(&*Self::acting(req)?, &parent, name)
                .map_err(|e| self.fail("mkdir", Some(&parent), &e))
        });
        match r {
            Ok((node, attr)) => self.reply_entry(&node, &attr, self.settings.refresh, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.deny_if_read_only().and_then(|_| {
            let parent = self.node(parent)?;
            let name = name_str(name)?;
            self.tree
                .unlink_entry(&*Self::acting(req)?, &parent, name)
                .map_err(|e| self.fail("unlink", Some(&parent), &e))
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.deny_if_read_only().and_then(|_| {
            let parent = self.node(parent)?;
            let name = name_str(name)?;
            self.tree
                .rmdir_entry(&*Self::acting(req)?, &parent, name)
                .map_err(|e| self.fail("rmdir", Some(&parent), &e))
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // RENAME_EXCHANGE and RENAME_WHITEOUT have no meaning for repository objects.
        if flags.bits() & !(libc::RENAME_NOREPLACE) != 0 {
            return reply.error(Errno::EINVAL);
        }
        let r = self.deny_if_read_only().and_then(|_| {
            let from = self.node(parent)?;
            let to = self.node(newparent)?;
            let (name, newname) = (name_str(name)?, name_str(newname)?);
            self.tree
                .rename_entry(&*Self::acting(req)?, &from, name, &to, newname)
                .map_err(|e| self.fail("rename", Some(&from), &e))
        });
        match r {
            Ok(changes) => {
                // Before the reply: the kernel moves the inode with the name.
                for (from, to) in &changes.moved {
                    self.inodes.rebind(from, to);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.deny_if_read_only().and_then(|_| {
            let src = self.node(ino)?;
            let parent = self.node(newparent)?;
            let name = name_str(newname)?;
            self.tree
                .link(&*Self::acting(req)?, &src, &parent, name)
                .map_err(|e| self.fail("link", Some(&src), &e))
        });
        match r {
            // The kernel insists on a regular-file entry for link(2); the name is an image
            // directory from now on, so the entry must not be cached (TTL 0).
            Ok((node, attr, changes)) => {
                self.invalidate(&changes);
                self.reply_entry(&node, &attr, Duration::ZERO, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // The kernel copies the read-ahead window into the file when this reply arrives.
        self.open_gate.wait(readahead::GATE_MAX_WAIT);
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let acc = flags.0 & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if write && self.settings.read_only {
            return reply.error(Errno::EROFS);
        }
        let truncate = flags.0 & libc::O_TRUNC != 0;
        match self
            .tree
            .open(&*acting!(req, reply), &node, write, truncate)
        {
            Ok(f) => {
                // Never FOPEN_DIRECT_IO: without it the kernel serves an O_DIRECT open
                // (qemu's cache=none, aio=native/io_uring) by sending its reads straight
                // through at the caller's offsets and lengths, bypassing the page cache
                // for that descriptor only, while buffered readers of the same
                // immutable file keep the cached pages FOPEN_KEEP_CACHE preserves.
                let keep = if f.immutable() {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                let backing = match f.stored_file() {
                    Some(file) if self.passthrough => self.backing_for(ino.0, file, &reply),
                    _ => None,
                };
                let fh = self.add_handle(f.clone(), ino.0);
                match backing {
                    Some(id) => {
                        self.lock_backings().by_handle.insert(fh.0, ino.0);
                        reply.opened_passthrough(fh, FopenFlags::empty(), &id);
                    }
                    None => reply.opened(fh, keep),
                }
            }
            Err(e) => reply.error(self.fail("open", Some(&node), &e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.deny_if_read_only().and_then(|_| {
            let parent = self.node(parent)?;
            let name = name_str(name)?;
            self.tree
                .create(&*Self::acting(req)?, &parent, name, mode)
                .map_err(|e| self.fail("create", Some(&parent), &e))
        });
        match r {
            Ok((node, attr, f)) => {
                let ino = self.inodes.remember(&node);
                let fh = self.add_handle(f, ino);
                // TTL 0: once published, this name is an image directory.
                reply.created(
                    &Duration::ZERO,
                    &fuse_attr(ino, &attr),
                    Generation(0),
                    fh,
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.handle(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // Each request thread keeps one buffer of the largest request and reuses it: a
        // fresh zeroed megabyte per request costs a page-fault storm and a memset for
        // every read. Stale bytes never leave: every reader fills exactly the count it
        // returns, and only that prefix is replied.
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < MAX_IO as usize {
                buf.resize(MAX_IO as usize, 0);
            }
            let buf = &mut buf[..size.min(MAX_IO) as usize];
            match f.read(buf, offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(self.fail("read", self.inodes.node(ino.0).as_ref(), &e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.handle(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match f.write(data, offset) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(self.fail("write", self.inodes.node(ino.0).as_ref(), &e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) returns this reply's error: an import that fails must fail here.
        let f = match self.handle(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // Only a file being imported cares about its closes.
        if f.immutable() {
            return reply.ok();
        }
        // Every close of every copy of the descriptor flushes; the file is complete when
        // nothing holds it any more (no descriptor in any process, no mapping), and a
        // close the kernel makes for a writer killed by a signal never completes it.
        let closing = caller::inspect_close(self.mount_ids(), ino.0, req.pid());
        if closing.killed {
            f.abandon();
            return reply.ok();
        }
        let last = !closing.held;
        match f.flush(last) {
            Ok(changes) => {
                self.invalidate(&changes);
                reply.ok()
            }
            Err(e) => reply.error(self.fail("import", self.inodes.node(ino.0).as_ref(), &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let f = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        if let Some((f, _)) = f {
            self.invalidate(&f.release());
        }
        self.drop_backing(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Imports are made durable when they are published (flush); nothing else is written.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::default());
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let listing = match self.listing(req, ino, &node, fh, offset) {
            Ok((l, _)) => l,
            Err(e) => return reply.error(e),
        };
        // Offsets are positions in the listing, which stays the same while it is read.
        for (i, e) in listing.iter().enumerate().skip(offset as usize) {
            let child = match (&e.ino, &e.node) {
                (Some(i), _) => *i,
                (None, Some(n)) => self.inodes.peek(n),
                (None, None) => continue,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, file_type(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let (listing, handle) = match self.listing(req, ino, &node, fh, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let caller = acting!(req, reply);
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
            self.tree.prefetch_attrs(&caller, &node, nodes.take(count));
        }
        for (i, e) in listing.iter().enumerate().skip(offset as usize) {
            let off = (i + 1) as u64;
            let Some(child) = &e.node else {
                // `.` and `..`: the kernel takes neither attributes nor a lookup from them.
                let ino = e.ino.unwrap_or(ROOT_INO);
                let attr = fuse_attr(ino, &placeholder_attr(NodeType::Directory));
                if reply.add(
                    INodeNo(ino),
                    off,
                    &e.name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            };
            let (attr, ttl) = match self.tree.getattr(&caller, child) {
                // Files being imported become image directories when published: never
                // cached, as in `create`.
                Ok(a) if matches!(child, Node::Import { .. }) => (a, Duration::ZERO),
                Ok(a) => (a, self.ttl(child)),
                Err(err) => {
                    log::debug!("readdirplus {}: {err}", tree::display(child));
                    (placeholder_attr(e.kind), Duration::ZERO)
                }
            };
            // Every entry sent counts as one lookup of its inode; one that does not fit
            // in the reply is not sent, so its count is given back.
            let child_ino = self.inodes.remember(child);
            let fattr = fuse_attr(child_ino, &attr);
            if reply.add(
                INodeNo(child_ino),
                off,
                &e.name,
                &ttl,
                &fattr,
                Generation(0),
            ) {
                self.inodes.forget(child_ino, 1);
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The first repository's filesystem answers for the mount (df shows real space).
        match self.tree.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.frsize,
            ),
            Err(e) => reply.error(self.fail("statfs", None, &e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        // `ls -l` asks for security.selinux and the POSIX ACLs of every entry, and the
        // kernel caches no answer. Only `user.pcocc.*` names exist here, so the rest is
        // answered at once, without the caller's identity or the repository: in the
        // `user.` namespace "no such attribute"; any other namespace (security.,
        // system., trusted.) is not supported at all, which is what the kernel itself
        // answers for a namespace a filesystem lacks, and what tells `ls` (coreutils
        // caches it per device) to stop asking for every entry.
        match name.to_str() {
            Some(n) if n.starts_with(tree::XATTR_PREFIX) => {}
            Some(n) if n.starts_with(USER_XATTR_NAMESPACE) => {
                return reply.error(Errno::NO_XATTR);
            }
            _ => return reply.error(Errno::EOPNOTSUPP),
        }
        match self.tree.getxattr(&*acting!(req, reply), &node, name) {
            Ok(Some(v)) if size == 0 => reply.size(v.len() as u32),
            Ok(Some(v)) if v.len() <= size as usize => reply.data(&v),
            Ok(Some(_)) => reply.error(Errno::ERANGE),
            Ok(None) => reply.error(Errno::NO_XATTR),
            Err(e) => reply.error(self.fail("getxattr", Some(&node), &e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let names = match self.tree.listxattr(&*acting!(req, reply), &node) {
            Ok(n) => n,
            Err(e) => return reply.error(self.fail("listxattr", Some(&node), &e)),
        };
        let mut buf = Vec::new();
        for n in names {
            buf.extend_from_slice(n.as_bytes());
            buf.push(0);
        }
        if size == 0 {
            reply.size(buf.len() as u32)
        } else if buf.len() <= size as usize {
            reply.data(&buf)
        } else {
            reply.error(Errno::ERANGE)
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.node(ino).and_then(|node| {
            self.tree
                .setxattr(&*Self::acting(req)?, &node)
                .map_err(|e| self.fail("setxattr", Some(&node), &e))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if mask.bits() & libc::W_OK != 0 && self.settings.read_only {
            return reply.error(Errno::EROFS);
        }
        match self.tree.access(&*acting!(req, reply), &node, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail("access", Some(&node), &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // `cp` punches holes in what it writes when it can; without fallocate it leaves
        // them by seeking, and imports keep holes either way. Not worth a warning.
        reply.error(Errno::EOPNOTSUPP);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // Tools probe FS_IOC_* attributes; none apply here.
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let f = match self.handle(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        let r = match whence {
            libc::SEEK_DATA => f.seek_data(off),
            libc::SEEK_HOLE => f.seek_hole(off),
            _ => return reply.error(Errno::EINVAL),
        };
        match r {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(self.fail("lseek", None, &e)),
        }
    }
}
