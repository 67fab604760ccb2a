//! The FUSE adapter: decodes each request, calls one [`Session`] method as the
//! requesting user and encodes its answer or its errno ([`tree::Error::errno`]).
//!
//! Everything the kernel's view of the tree depends on — inode numbers, open files,
//! which close publishes, listings, cache lifetimes — is the session's, in `tree`, where
//! tests drive it without a mount. What stays here is what only a mount has: the
//! caller's identity taken from the request (`caller`), who still holds a file as
//! `/proc` shows it (`caller::ProcHolders`), the thread that tells the kernel which
//! cached names to drop (`notify`), passthrough backing files (`passthrough`), the
//! read-ahead window (`readahead`), the mountpoint's checks and the daemon's own mount on it
//! (`mountpoint`, reading `/proc/self/mountinfo` through `mountinfo`), and mounting and
//! serving (`mount`).

pub mod caller;
pub mod daemon;
pub mod logging;
pub mod mount;
pub mod mountinfo;
pub mod mountpoint;
pub mod notify;
pub mod options;
pub mod passthrough;
pub mod push;
pub mod readahead;

use crate::tree::session::{Entry, Seek, Session, SessionSettings};
use crate::tree::{self, Attr, NodeType, SetAttr, Tree};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::Arc;

/// Largest read or write the daemon accepts in one request (the kernel's FUSE maximum,
/// `max_pages_limit` 256 × 4 KiB).
const MAX_IO: u32 = 1 << 20;

thread_local! {
    /// The read buffer of one request thread (see `read`).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The caller of request `$req` acting on this thread (see `ImageFs::acting`), or an
/// error reply on `$reply` when the thread cannot take their identity.
macro_rules! acting {
    ($req:expr, $reply:expr) => {
        match ImageFs::acting($req) {
            Ok(a) => a,
            Err(e) => return $reply.error(e),
        }
    };
}

/// Settings of one mount.
#[derive(Clone, Debug, Default)]
pub struct FsSettings {
    pub session: SessionSettings,
    /// Where the filesystem is mounted, to recognise its files in `/proc`.
    pub mountpoint: Option<std::path::PathBuf>,
}

/// The filesystem served over FUSE.
pub struct ImageFs {
    session: Arc<Session>,
    invalidator: Arc<notify::Invalidator>,
    /// Stores generated views into the page cache ahead of sequential readers.
    pusher: Arc<push::Pusher>,
    /// Opens wait here until the mount's read-ahead window is set (see [`readahead`]).
    open_gate: Arc<readahead::OpenGate>,
    /// Whether the kernel agreed to FUSE passthrough (decided in `init`).
    passthrough: bool,
    /// The kernel maps files opened with `FOPEN_DIRECT_IO` (files being imported).
    direct_imports: bool,
    backings: passthrough::Backings,
}

fn errno(e: tree::Error) -> Errno {
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

fn reply_entry(r: Result<Entry, tree::Error>, reply: ReplyEntry) {
    match r {
        Ok(e) => reply.entry(&e.ttl, &fuse_attr(e.ino, &e.attr), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_attr(ino: INodeNo, r: Result<(Attr, std::time::Duration), tree::Error>, reply: ReplyAttr) {
    match r {
        Ok((a, ttl)) => reply.attr(&ttl, &fuse_attr(ino.0, &a)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(r: Result<(), tree::Error>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// An extended attribute value (or name list) for a caller's buffer of `size` bytes
/// (0: asking for the size).
fn reply_xattr(r: Result<Vec<u8>, tree::Error>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(Errno::ERANGE),
        Err(e) => reply.error(errno(e)),
    }
}

impl ImageFs {
    /// How a file being imported is opened: straight through, without a page cache of
    /// its own, where the kernel still allows a shared mapping of it (a multi-GiB `cp`
    /// into the mount then fills one page cache, the scratch copy's, instead of two).
    fn import_flags(&self) -> FopenFlags {
        if self.direct_imports {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }

    pub fn new(tree: Arc<Tree>, settings: FsSettings) -> ImageFs {
        let invalidator = Arc::new(notify::Invalidator::default());
        let session = Arc::new(Session::new(
            tree,
            settings.session,
            Box::new(caller::ProcHolders::new(settings.mountpoint)),
            Box::new(notify::Names(invalidator.clone())),
        ));
        session.start_upkeep();
        ImageFs {
            session,
            invalidator,
            pusher: Arc::new(push::Pusher::default()),
            open_gate: Arc::default(),
            passthrough: false,
            direct_imports: false,
            backings: passthrough::Backings::default(),
        }
    }

    /// The gate opens wait at until the read-ahead window is set (open unless held).
    pub fn open_gate(&self) -> Arc<readahead::OpenGate> {
        self.open_gate.clone()
    }

    /// The invalidation forwarder, to start once the session is mounted.
    pub fn invalidator(&self) -> Arc<notify::Invalidator> {
        self.invalidator.clone()
    }

    pub fn pusher(&self) -> Arc<push::Pusher> {
        self.pusher.clone()
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
}

impl Filesystem for ImageFs {
    /// The mount is gone: blank files their writers closed are published now, since
    /// none can be opened again (they would be lost with the daemon).
    fn destroy(&mut self) {
        self.session.publish_blank_files_now();
    }

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
        // Files being imported are written straight through (`FOPEN_DIRECT_IO`); a
        // shared mapping of one still works where the kernel allows it.
        self.direct_imports = config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let caller = acting!(req, reply);
        reply_entry(self.session.lookup(&caller, parent.0, name), reply)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.session.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let caller = acting!(req, reply);
        let r = self.session.getattr(&caller, ino.0, fh.map(|f| f.0));
        reply_attr(ino, r, reply)
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
        let set = SetAttr {
            size,
            mode,
            uid,
            gid,
            times: atime.is_some() || mtime.is_some(),
        };
        let caller = acting!(req, reply);
        let r = self.session.setattr(&caller, ino.0, fh.map(|f| f.0), &set);
        reply_attr(ino, r, reply)
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let caller = acting!(req, reply);
        match self.session.readlink(&caller, ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(e)),
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
        let caller = acting!(req, reply);
        reply_entry(self.session.mkdir(&caller, parent.0, name), reply)
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = acting!(req, reply);
        reply_empty(self.session.unlink(&caller, parent.0, name), reply)
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let caller = acting!(req, reply);
        reply_empty(self.session.rmdir(&caller, parent.0, name), reply)
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
        let caller = acting!(req, reply);
        let r = self
            .session
            .rename(&caller, parent.0, name, newparent.0, newname, flags.bits());
        reply_empty(r, reply)
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let caller = acting!(req, reply);
        reply_entry(
            self.session.link(&caller, ino.0, newparent.0, newname),
            reply,
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // The kernel copies the read-ahead window into the file when this reply arrives.
        self.open_gate.wait(readahead::GATE_MAX_WAIT);
        let caller = acting!(req, reply);
        let opened = match self.session.open(&caller, ino.0, flags.0) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
        };
        let fh = FileHandle(opened.fh);
        let backing = match opened.file.stored_file() {
            Some(file) if self.passthrough => self.backings.open(ino.0, fh.0, file, &reply),
            _ => None,
        };
        // Never FOPEN_DIRECT_IO: without it the kernel serves an O_DIRECT open (qemu's
        // cache=none, aio=native/io_uring) by sending its reads straight through at the
        // caller's offsets and lengths, bypassing the page cache for that descriptor
        // only, while buffered readers of the same immutable file keep the cached pages
        // FOPEN_KEEP_CACHE preserves.
        // A file being imported (reopened by its writer) is written straight through,
        // as when it was created.
        match backing {
            Some(id) => reply.opened_passthrough(fh, FopenFlags::empty(), &id),
            None if opened.keep_cache => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
            None if !opened.file.immutable() => reply.opened(fh, self.import_flags()),
            None => reply.opened(fh, FopenFlags::empty()),
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
        let caller = acting!(req, reply);
        match self.session.create(&caller, parent.0, name, mode) {
            Ok((e, fh)) => reply.created(
                &e.ttl,
                &fuse_attr(e.ino, &e.attr),
                Generation(0),
                FileHandle(fh),
                self.import_flags(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // An O_DIRECT reader (qemu's cache=none) never reads the page cache: nothing is
        // pushed into it for such a descriptor; nor for small reads (random access),
        // which then cost no second lookup of their file: they only tell a reader being
        // pushed for how far it is (a page the push left out).
        let buffered = flags.0 & libc::O_DIRECT == 0;
        let pushable = buffered && u64::from(size) >= push::MIN_READ;
        // Each request thread keeps one buffer of the largest request and reuses it: a
        // fresh zeroed megabyte per request costs a page-fault storm and a memset for
        // every read. Stale bytes never leave: every reader fills exactly the count it
        // returns, and only that prefix is replied.
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < MAX_IO as usize {
                buf.resize(MAX_IO as usize, 0);
            }
            let buf = &mut buf[..size.min(MAX_IO) as usize];
            match self.session.read(fh.0, buf, offset) {
                Ok(n) => {
                    reply.data(&buf[..n]);
                    if pushable && let Some(file) = self.session.open_file(fh.0) {
                        self.pusher.on_read(fh.0, ino.0, &file, offset, n as u64);
                    } else if buffered {
                        self.pusher.on_small_read(fh.0, offset, n as u64);
                    }
                }
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.session.write(fh.0, data, offset) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) returns this reply's error: an import that fails must fail here.
        reply_empty(self.session.flush(fh.0, req.pid()), reply)
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
        self.pusher.release(fh.0);
        self.session.release(fh.0);
        self.backings.release(fh.0);
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
        // Imports are made durable when they are published; nothing else is written.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(self.session.opendir(ino.0)), FopenFlags::empty());
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.session.releasedir(fh.0);
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
        let caller = acting!(req, reply);
        let r = self.session.readdir(&caller, ino.0, fh.0, offset, |e| {
            reply.add(INodeNo(e.ino), e.offset, file_type(e.kind), &e.name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let caller = acting!(req, reply);
        let r = self.session.readdirplus(&caller, ino.0, fh.0, offset, |e| {
            let attr = fuse_attr(e.entry.ino, &e.entry.attr);
            let l = &e.listed;
            reply.add(
                INodeNo(l.ino),
                l.offset,
                &l.name,
                &e.entry.ttl,
                &attr,
                Generation(0),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.session.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let caller = acting!(req, reply);
        reply_xattr(self.session.getxattr(&caller, ino.0, name), size, reply)
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let caller = acting!(req, reply);
        reply_xattr(self.session.listxattr(&caller, ino.0), size, reply)
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
        let caller = acting!(req, reply);
        reply_empty(self.session.setxattr(&caller, ino.0), reply)
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let caller = acting!(req, reply);
        reply_empty(self.session.access(&caller, ino.0, mask.bits()), reply)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.session.fallocate(fh.0), reply)
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
        // Tools probe FS_IOC_* attributes; no ioctl exists here.
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
        let whence = match whence {
            libc::SEEK_DATA => Seek::Data,
            libc::SEEK_HOLE => Seek::Hole,
            // The kernel answers SEEK_SET/CUR/END itself.
            _ => return reply.error(Errno::EINVAL),
        };
        match self.session.lseek(fh.0, offset, whence) {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno(e)),
        }
    }
}
