//! The namespace `REPO/IMAGE/@REV/FILE` and its operations: the one place where
//! repository semantics live (DESIGN §3–§4).
//!
//! ```text
//! ROOT/
//!   REPO/            one per configured repository, in priority order
//!     IMAGE/         one per image (or made empty by mkdir, in memory only)
//!       @0/ @1/ …    one per revision, read-only
//!         disk.raw disk.qcow2 disk.qed disk.vdi disk.vpc disk.vmdk   views, generated on read
//!         meta.json  the revision's pcocc metadata, plus repo, virtual size and layers
//!       latest -> @N
//!       FILE         a file being imported as the next revision (its writer sees it)
//!     FILE           a file being imported as a new image; `.NAME`: a staging file
//! ```
//!
//! Both the CLI and the FUSE adapter call this module and nothing below it. It speaks in
//! plain values: a [`Node`] names a place in the tree (the adapter maps inode numbers to
//! nodes), [`Attr`] and [`DirEntry`] describe it, an [`OpenFile`] serves reads and writes
//! of one open file, [`Changes`] name the entries an operation changed, and every call
//! takes the [`Caller`] whose rights it is carried out with. No fuser type appears here,
//! so the whole filesystem, import and export included, runs in ordinary tests. Errors
//! are one [`Error`] type whose messages are pcocc's and which maps to an errno in one
//! place ([`Error::errno`]).
//!
//! Files: `nodes` (lookup, readdir, getattr and the node-level metadata operations),
//! `views` (revision files and the cache of opened revisions), `open` (open files),
//! `import` (create, setattr and the handles of files being written), `pending` (their
//! lifecycle, staging files, empty directories), `publish` (the one import path), `entries` (mkdir, link, rename, unlink, rmdir by name), `transfer`
//! (CLI import/export), `inodes` (inode numbers bound to nodes, moved by renames),
//! `ops` (URI-level pcocc operations), `extras` (parent, statfs,
//! access, xattrs), `access` (permission checks), `metajson`, `uri`.

mod access;
mod arrival;
mod entries;
mod extras;
mod follow;
mod import;
pub mod inodes;
mod layers;
mod metajson;
mod nodes;
mod open;
mod ops;
mod pending;
mod publish;
mod save;
pub mod session;
mod stream_convert;
mod stream_hash;
mod transfer;
mod uri;
mod views;

pub use extras::{
    LAYERS_SEPARATOR, StatFs, XATTR_FORMAT, XATTR_LAYERS, XATTR_NAME, XATTR_OWNER, XATTR_PREFIX,
    XATTR_REVISION, XATTR_VIRTUAL_SIZE, parent,
};
pub use import::{SetAttr, is_staging};
pub use nodes::display;
pub use open::{Changes, OpenFile};
pub use publish::split_suffix;
pub use uri::{Uri, UriError};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::Config;
pub use crate::image::Format;
pub use crate::store::Meta;

/// The kind pcocc records for VM images; other kinds (`ctr`: container images) have no
/// disk, so the tree shows their revisions with `meta.json` only.
pub const VM_KIND: &str = "vm";

/// True when `meta` describes a VM disk (kind [`VM_KIND`]).
pub fn is_vm(meta: &Meta) -> bool {
    meta.kind == VM_KIND
}
use crate::store::Store;

/// The identity a call is carried out as: the FUSE request's uid/gid and the caller's
/// supplementary groups, or the current process for the CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    /// The identity of this process (effective uid/gid and supplementary groups), read
    /// once.
    pub fn current() -> Caller {
        access::current_caller()
    }

    fn current_uncached() -> Caller {
        Caller {
            uid: crate::sys::euid(),
            gid: crate::sys::egid(),
            groups: crate::sys::process_groups(),
        }
    }

    /// Makes the calling thread act as this caller until the guard is dropped, so that
    /// the kernel judges every access it makes (see [`crate::sys::Identity::assume`]):
    /// a no-op for the process's own identity and outside a root process.
    pub fn act(&self) -> Result<crate::sys::ActingAs, Error> {
        crate::sys::Identity {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
        .assume()
        .map_err(|e| Error::Unreadable(format!("cannot act as uid {}: {e}", self.uid)))
    }

    /// True when this caller is in group `gid` (primary or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A file inside a revision directory: one view per disk format, and `meta.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// `disk.FMT`: the revision presented in one disk format, generated on read (or, for
    /// `disk.qcow2` of a single-layer revision, the stored layer itself).
    View(Format),
    /// `meta.json`: the revision's metadata plus repo, virtual size and layer list.
    MetaJson,
}

impl FileKind {
    /// Every kind of file a revision directory lists, in listing order.
    pub const ALL: [FileKind; 7] = [
        FileKind::View(Format::Raw),
        FileKind::View(Format::Qcow2),
        FileKind::View(Format::Qed),
        FileKind::View(Format::Vdi),
        FileKind::View(Format::Vpc),
        FileKind::View(Format::Vmdk),
        FileKind::MetaJson,
    ];

    /// The file's name inside `@N/`.
    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::View(Format::Raw) => "disk.raw",
            FileKind::View(Format::Qcow2) => "disk.qcow2",
            FileKind::View(Format::Qed) => "disk.qed",
            FileKind::View(Format::Vdi) => "disk.vdi",
            FileKind::View(Format::Vpc) => "disk.vpc",
            FileKind::View(Format::Vmdk) => "disk.vmdk",
            FileKind::MetaJson => "meta.json",
        }
    }

    /// The kind named `name` inside `@N/`, if any.
    pub fn from_file_name(name: &str) -> Option<FileKind> {
        FileKind::ALL.into_iter().find(|k| k.file_name() == name)
    }
}

/// A place in the tree. Nodes are values: equal nodes are the same place, so the FUSE
/// adapter can key its inode table by them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Node {
    /// The mount root: one directory per repository.
    Root,
    /// A repository directory.
    Repo { repo: String },
    /// An image directory.
    Image { repo: String, image: String },
    /// A revision directory `@N`.
    Revision {
        repo: String,
        image: String,
        rev: u64,
    },
    /// The `latest` symlink of an image.
    Latest { repo: String, image: String },
    /// A file inside a revision directory.
    File {
        repo: String,
        image: String,
        rev: u64,
        file: FileKind,
    },
    /// A file being imported, or a staging file (a name starting with `.`), in a
    /// repository directory (`image: None`) or an image directory. Only its writer sees
    /// it; it lives in the daemon until it is published, dropped or discarded.
    Import {
        repo: String,
        image: Option<String>,
        name: String,
    },
}

impl Node {
    /// This node once `from` has moved to `to` (a rename): `to` itself for `from`, the
    /// same place under `to` for what is below an image `from`; `None` for a node the
    /// move does not concern.
    pub fn rebased(&self, from: &Node, to: &Node) -> Option<Node> {
        if self == from {
            return Some(to.clone());
        }
        let (
            Node::Image {
                repo: from_repo,
                image: from_image,
            },
            Node::Image {
                repo: to_repo,
                image: to_image,
            },
        ) = (from, to)
        else {
            return None;
        };
        let moved = |repo: &String, image: &String| repo == from_repo && image == from_image;
        let (repo, image) = (to_repo.clone(), to_image.clone());
        match self {
            Node::Revision {
                repo: r,
                image: i,
                rev,
            } if moved(r, i) => Some(Node::Revision {
                repo,
                image,
                rev: *rev,
            }),
            Node::File {
                repo: r,
                image: i,
                rev,
                file,
            } if moved(r, i) => Some(Node::File {
                repo,
                image,
                rev: *rev,
                file: *file,
            }),
            Node::Latest { repo: r, image: i } if moved(r, i) => Some(Node::Latest { repo, image }),
            Node::Import {
                repo: r,
                image: Some(i),
                name,
            } if moved(r, i) => Some(Node::Import {
                repo,
                image: Some(image),
                name: name.clone(),
            }),
            _ => None,
        }
    }
}

/// How long the kernel may cache what never changes (revision directories and files).
pub const IMMUTABLE_TTL: Duration = Duration::from_secs(3600);

/// How long the kernel may cache the entry and attributes of `node`: long for a revision
/// directory (whatever it holds, its files are looked up again), never for a file being
/// imported (it becomes an image directory, or goes, when it is published), `refresh`
/// for repository and image directories, which other hosts change, and for the files of
/// a revision: a revision never changes, but its number can be deleted and made again
/// outside the mount (see `Tree::stamp`).
pub fn cache_ttl(node: &Node, refresh: Duration) -> Duration {
    match node {
        Node::Revision { .. } => IMMUTABLE_TTL,
        Node::Import { .. } => Duration::ZERO,
        _ => refresh,
    }
}

impl Tree {
    /// What the kernel's inode for `node` stands for, beyond its name: for a file of a
    /// revision, the identity of the revision's metadata file (`Some(0)` when there is
    /// none any more); `None` for any other node, or when it cannot be told (an error
    /// reaching the file). A revision deleted and made again under the same number
    /// outside the mount (`pcocc image delete`, then `import`, on this host or another)
    /// holds other bytes: its files must not be the inodes whose pages the kernel keeps
    /// for the old ones. (A revision directory's inode stands for its place: the files
    /// looked up in it are the current ones.)
    pub fn stamp(&self, node: &Node) -> Option<u64> {
        let Node::File {
            repo, image, rev, ..
        } = node
        else {
            return None;
        };
        let store = self.store(repo).ok()?;
        match store.meta_stamp(image, *rev) {
            Ok(stamp) => Some(stamp.unwrap_or(0)),
            Err(_) => None,
        }
    }

    /// Publishes the created files left blank and unopened for longer than the 10 s
    /// their writer may take to open them again (see `Pending::publish_abandoned`); the
    /// changes to the names, for the kernel's cache.
    pub fn publish_abandoned(&self) -> Vec<Changes> {
        self.pending.publish_abandoned(pending::BLANK_GRACE)
    }

    /// At the daemon's exit: publishes every created file left blank by its writer,
    /// whatever time is left of its grace (nobody can open it again after).
    pub fn publish_blank_files_now(&self) {
        let _ = self.pending.publish_abandoned(Duration::ZERO);
    }

    /// [`cache_ttl`] for `node` as this tree has it now: never for an empty image
    /// directory either, which goes at once when the command that made it fails (see
    /// [`Tree::mkdir`]) and becomes an image when something is imported into it.
    pub fn node_ttl(&self, node: &Node, refresh: Duration) -> Duration {
        match node {
            Node::Image { repo, image } if self.pending.empty_dir(repo, image).is_some() => {
                Duration::ZERO
            }
            _ => cache_ttl(node, refresh),
        }
    }

    /// Whether every user may read repository `repo` (see `access::open_to_all`).
    pub fn repo_open_to_all(&self, repo: &str) -> bool {
        self.store(repo)
            .is_ok_and(|s| access::open_to_all(&s.meta_dir()))
    }
}

/// What kind of object a node is, as `stat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeType {
    Directory,
    RegularFile,
    Symlink,
}

/// The attributes of a node, as `stat` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: NodeType,
    /// Permission bits only (`0o555`, `0o444`, …), without the file type.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Exact length in bytes.
    pub size: u64,
    /// 512-byte blocks really held (what `du` and `qemu-img info` "disk size" show).
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Preferred I/O size (`st_blksize`), which `cp`, `cat` and most tools size their
    /// buffer from.
    pub blksize: u32,
}

/// `st_blksize` of directories and symbolic links.
pub const DIR_BLKSIZE: u32 = 4096;

/// `st_blksize` of revision files (views, `meta.json`): 128 KiB, the least buffer GNU
/// `cp` uses anyway. A larger one makes `cp` write its copy in larger pieces, and the
/// page cache of the destination then takes larger (higher-order) folios, which on a
/// virtual machine returning free memory to its host costs up to 4× more (measured: 2.3 GB
/// copied with 1 MiB writes 0.5–2.8 s, with 128 KiB writes 0.64–1.0 s). What the mount
/// reads at a time is the read-ahead's business, not the reader's buffer.
pub const READ_BLKSIZE: u32 = 128 << 10;

/// `st_blksize` of a file being imported: 1 MiB, so that `cp` writes the largest FUSE
/// request at a time (writing 2 GiB into the mount took half the time as with 128 KiB).
pub const IMPORT_BLKSIZE: u32 = 1 << 20;

/// One entry of a directory listing (`.` and `..` are the adapter's business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub node: Node,
    pub kind: NodeType,
}

/// One configured repository as `pcocc image repo list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoInfo {
    pub name: String,
    pub path: PathBuf,
    /// `access(path, W_OK)` for the caller; `None` when the path does not exist (`N/A`).
    pub writable: Option<bool>,
}

/// A located revision: the repository it was found in and its metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub repo: String,
    pub meta: Meta,
}

/// One image of a repository with its latest revision's metadata (`pcocc image list`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSummary {
    pub repo: String,
    pub latest: Meta,
}

/// One revision of an image (`pcocc image show`'s table).
#[derive(Clone, Debug, PartialEq)]
pub struct RevisionInfo {
    pub meta: Meta,
    /// Byte size of the revision's top layer file (not the virtual size); `None` when
    /// that file is missing.
    pub top_layer_size: Option<u64>,
}

/// What a copy did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOutcome {
    /// The destination repository and image (the new revision is 0).
    pub repo: String,
    pub name: String,
    /// Another repository that already has an image of that name (pcocc's warning
    /// `an image with name N already exists in another repo (R)`).
    pub shadowed_in: Option<String>,
    /// Layers the destination already had, hard-linked, and copied byte by byte.
    pub layers_present: usize,
    pub layers_linked: usize,
    pub layers_copied: usize,
}

/// What a delete removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub repo: String,
    pub name: String,
    /// The revisions whose metadata was removed.
    pub revisions: Vec<u64>,
}

pub use crate::store::GcReport;

/// How long gc leaves `.tmp/` entries and freshly added layers alone, so an import still
/// running on another host survives (DESIGN §9).
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// Errors of tree operations. Messages are pcocc's texts where pcocc has one
/// (`reference/pcocc-behaviour.md`); [`Error::errno`] maps each to one errno.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Unknown repository {0}")]
    UnknownRepo(String),
    #[error("Unable to parse configuration file: No repository configured")]
    NoRepository,
    #[error("Object {name} not found in repository {repo}")]
    ImageNotFound { name: String, repo: String },
    #[error("Object {name} revision {rev} not found in repository {repo}")]
    RevisionNotFound {
        name: String,
        rev: u64,
        repo: String,
    },
    #[error("Object {name} not found in configured repositories")]
    ImageNotFoundAnywhere { name: String },
    #[error("Object {name} revision {rev} not found in configured repositories")]
    RevisionNotFoundAnywhere { name: String, rev: u64 },
    #[error("Image {name} already exists in repo {repo}")]
    ImageExists { name: String, repo: String },
    #[error("Image {name} revision {rev} already exists in repo {repo}")]
    RevisionExists {
        name: String,
        rev: u64,
        repo: String,
    },
    #[error("Object name contains invalid characters")]
    InvalidName,
    #[error("Empty object name")]
    EmptyName,
    #[error("Object name {0} is reserved: it names a directory itself")]
    ReservedName(String),
    #[error("Object name too long: {0} bytes, at most {MAX_IMAGE_NAME} are allowed")]
    NameTooLong(usize),
    #[error(transparent)]
    Uri(#[from] UriError),
    /// A lookup miss (ENOENT), logged at debug by the adapter.
    #[error("{0}: no such file or directory")]
    NoEntry(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsADirectory(String),
    #[error("{0}: not a symbolic link")]
    NotASymlink(String),
    /// Anything that would change a revision (DESIGN §4).
    #[error("{0}: read-only: a revision never changes")]
    ReadOnly(String),
    #[error("{0}: permission denied")]
    PermissionDenied(String),
    #[error("cannot rename {0} across repositories: copy it, then delete the original")]
    CrossRepository(String),
    /// An object in use that the operation would pull from under its user (EBUSY).
    #[error("{0}")]
    Busy(String),
    /// An inode number the kernel no longer holds (ESTALE).
    #[error("{0}: stale file handle")]
    Stale(String),
    /// A file or directory handle that is not open (EBADF).
    #[error("handle {0} is not open")]
    BadHandle(u64),
    /// A change asked of a mount made read-only (`-o ro`).
    #[error("the mount is read-only")]
    ReadOnlyMount,
    #[error("unsupported flags {0:#x}")]
    InvalidFlags(u32),
    #[error("offset {0} out of range")]
    InvalidOffset(i64),
    /// An extended attribute that does not exist (ENODATA).
    #[error("no such attribute")]
    NoAttribute,
    #[error("{0}: operation not supported here")]
    NotSupported(String),
    /// An operation that makes no sense at this place of the tree (EPERM).
    #[error("{0}: operation not permitted")]
    NotPermitted(String),
    /// A name that is already taken by a file being imported.
    #[error("{0}: file exists")]
    Exists(String),
    /// What was written into the mount is not a disk image (empty, or raw bytes that
    /// are not whole 512-byte sectors).
    #[error("{0}: not a disk image: {1}")]
    NotAnImage(String, String),
    /// An import or a view that cannot be served; the message says why, naming the file.
    #[error("{0}")]
    Unreadable(String),
    /// What was written into the mount (or given to import) is not a valid image of a
    /// kind this project reads, or uses something it refuses (a backing file, an
    /// external data file): the content's fault, EINVAL. The same error of a stored
    /// layer is damaged data, [`Error::Image`] (EIO).
    #[error(transparent)]
    BadImage(crate::image::Error),
    /// A close of a file whose import failed earlier (a write that failed, a writer
    /// killed by a signal): the reason and errno of that failure, repeated.
    #[error("{reason}")]
    ImportFailed { reason: String, errno: i32 },
    /// pcocc's export refusal to overwrite a file of another format.
    #[error("Mismatch between specified format {forced} and detected image type {detected}")]
    FormatMismatch {
        forced: Format,
        detected: &'static str,
    },
    /// An import source that is missing or not a file (pcocc's message).
    #[error("Could not detect image format")]
    UndetectableFormat(PathBuf),
    #[error(transparent)]
    Image(#[from] crate::image::Error),
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

impl Error {
    /// The errno a filesystem call answers with for this error.
    pub fn errno(&self) -> i32 {
        use crate::store::Error as S;
        match self {
            Error::UnknownRepo(_)
            | Error::ImageNotFound { .. }
            | Error::RevisionNotFound { .. }
            | Error::ImageNotFoundAnywhere { .. }
            | Error::RevisionNotFoundAnywhere { .. }
            | Error::NoEntry(_) => libc::ENOENT,
            Error::NoRepository => libc::ENOENT,
            Error::ImageExists { .. } | Error::RevisionExists { .. } => libc::EEXIST,
            Error::InvalidName | Error::EmptyName | Error::Uri(_) => libc::EINVAL,
            Error::ReservedName(_) => libc::EINVAL,
            Error::NameTooLong(_) => libc::ENAMETOOLONG,
            Error::NotADirectory(_) => libc::ENOTDIR,
            Error::IsADirectory(_) => libc::EISDIR,
            Error::NotASymlink(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::PermissionDenied(_) => libc::EACCES,
            Error::CrossRepository(_) => libc::EXDEV,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::Stale(_) => libc::ESTALE,
            Error::Busy(_) => libc::EBUSY,
            Error::BadHandle(_) => libc::EBADF,
            Error::ReadOnlyMount => libc::EROFS,
            Error::InvalidFlags(_) | Error::InvalidOffset(_) => libc::EINVAL,
            Error::NoAttribute => libc::ENODATA,
            Error::NotPermitted(_) => libc::EPERM,
            Error::Exists(_) => libc::EEXIST,
            Error::NotAnImage(..) => libc::EINVAL,
            Error::Unreadable(_) => libc::EIO,
            Error::BadImage(_) => libc::EINVAL,
            Error::ImportFailed { errno, .. } => *errno,
            Error::FormatMismatch { .. } => libc::EINVAL,
            Error::UndetectableFormat(_) => libc::ENOENT,
            Error::Image(e) => e.errno(),
            Error::Config(_) => libc::EINVAL,
            Error::Store(e) => match e {
                S::AlreadyExists { .. } => libc::EEXIST,
                S::NotFound { .. } => libc::ENOENT,
                S::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
                S::BadParent(_) | S::NotADirectory(_) => libc::ENOTDIR,
                S::BadConfig { .. }
                | S::UnsupportedVersion(_)
                | S::BadMeta { .. }
                | S::BadHash(_)
                | S::HashMismatch { .. } => libc::EIO,
            },
        }
    }
}

/// Checks an image name as pcocc does: non-empty, only `[a-zA-Z0-9_.-]`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::EmptyName);
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok { Ok(()) } else { Err(Error::InvalidName) }
}

/// Longest image name a new revision may get: its metadata file `NAME@REV` must fit in
/// a file name (NAME_MAX, 255 bytes) with room for revisions up to 9999.
pub const MAX_IMAGE_NAME: usize = 255 - "@9999".len();

/// The rules for the name of an image about to be written, checked before anything is:
/// [`validate_name`], not `.` or `..` (a directory of the tree could not show it), and
/// short enough for its metadata file names.
pub fn validate_new_name(name: &str) -> Result<(), Error> {
    validate_name(name)?;
    if name == "." || name == ".." {
        return Err(Error::ReservedName(name.to_string()));
    }
    if name.len() > MAX_IMAGE_NAME {
        return Err(Error::NameTooLong(name.len()));
    }
    Ok(())
}
/// Every configured repository, opened (and created on first use, as pcocc does).
pub struct Tree {
    /// Shared with open import handles, which publish without the tree.
    repos: Vec<Arc<Store>>,
    /// When this tree was opened: the times of the root directory.
    opened: SystemTime,
    users: access::UserCache,
    /// Opened revisions and their views.
    revisions: views::RevisionCache,
    /// Files being imported, staging files and empty image directories.
    pending: Arc<pending::Pending>,
    /// Where the tree is mounted, if it is: overlays whose backing file is a view under
    /// it can be saved by `cp` (see `save`).
    mountpoint: Option<Arc<std::path::Path>>,
}

impl Tree {
    /// Opens every repository of `config` in priority order, creating missing ones. Fails
    /// like pcocc on a repository it cannot use (bad parent, not a directory, bad
    /// `.config`). (Named `new` because [`Tree::open`] opens files.)
    pub fn new(config: &Config) -> Result<Tree, Error> {
        let repos = config
            .repos
            .iter()
            .map(|r| {
                // The built-in default lives in ~/.pcocc, which a new user does not have
                // yet: create it, so that the tool works with no set-up (DESIGN §6).
                // Configured repositories keep pcocc's rule: their parent must exist.
                if r.origin == crate::config::Origin::Default
                    && let Some(parent) = r.path.parent()
                {
                    let _ = std::fs::create_dir_all(parent);
                }
                Store::open(&r.name, &r.path).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tree {
            repos,
            opened: SystemTime::now(),
            users: access::UserCache::default(),
            revisions: views::RevisionCache::default(),
            pending: Arc::default(),
            mountpoint: None,
        })
    }

    /// Tells the tree where it is mounted (an absolute, canonical path): a qcow2 file
    /// written into it whose backing file is a view under `mountpoint` is saved as a
    /// revision made of the viewed revision's layers plus one delta layer.
    pub fn set_mountpoint(&mut self, mountpoint: &std::path::Path) {
        self.mountpoint = Some(Arc::from(mountpoint));
    }

    /// Repository names in priority order.
    pub fn repo_names(&self) -> Vec<&str> {
        self.repos.iter().map(|s| s.name()).collect()
    }

    /// The default repository (the first configured one).
    pub fn default_repo(&self) -> Result<&str, Error> {
        self.repos
            .first()
            .map(|s| s.name())
            .ok_or(Error::NoRepository)
    }

    /// Every repository with its path and whether `caller` may write it.
    pub fn repo_list(&self, caller: &Caller) -> Vec<RepoInfo> {
        self.repos
            .iter()
            .map(|s| RepoInfo {
                name: s.name().to_string(),
                path: s.path().to_path_buf(),
                writable: access::writable(caller, s.path()),
            })
            .collect()
    }

    /// The repository named `name`; `""` is the default one (pcocc's `:IMAGE`).
    fn store(&self, name: &str) -> Result<&Store, Error> {
        self.shared_store(name).map(|s| &**s)
    }

    /// [`Tree::store`], shareable with open handles.
    fn shared_store(&self, name: &str) -> Result<&Arc<Store>, Error> {
        if name.is_empty() {
            return self.repos.first().ok_or(Error::NoRepository);
        }
        self.repos
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| Error::UnknownRepo(name.to_string()))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_import;
#[cfg(test)]
mod tests_views;
