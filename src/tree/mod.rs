//! The namespace `REPO/IMAGE/@REV/FILE` and its operations: the one place where
//! repository semantics live (DESIGN §3–§4).
//!
//! ```text
//! ROOT/
//!   REPO/            one per configured repository, in priority order
//!     IMAGE/         one per image
//!       @0/ @1/ …    one per revision, read-only
//!         meta.json  the revision's pcocc metadata, plus repo, virtual size and layers
//!       latest -> @N
//! ```
//!
//! Both the CLI and the FUSE adapter call this module and nothing below it. It speaks in
//! plain values: a [`Node`] names a place in the tree (the adapter maps inode numbers to
//! nodes), [`Attr`] and [`DirEntry`] describe it, and every call takes the [`Caller`]
//! whose rights it is carried out with. No fuser type appears here, so the whole
//! filesystem runs in ordinary tests. Files inside a revision are a [`FileKind`], an enum
//! that grows as views are added. Errors are one [`Error`] type whose messages are
//! pcocc's and which maps to an errno in one place ([`Error::errno`]).

mod uri;

pub use uri::Uri;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::config::Config;
pub use crate::store::Meta;

/// The identity a call is carried out as: the FUSE request's uid/gid and the caller's
/// supplementary groups, or the current process for the CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    /// The identity of this process (effective uid/gid and supplementary groups).
    pub fn current() -> Caller {
        // SAFETY: these calls only read the process credentials.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut groups = vec![0 as libc::gid_t; 0];
        // SAFETY: a zero-sized query returns the count; the second call fills at most
        // `n` entries of a buffer that has exactly `n`.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if n > 0 {
            groups.resize(n as usize, 0);
            let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
            groups.truncate(got.max(0) as usize);
        }
        Caller { uid, gid, groups }
    }

    /// True when this caller is in group `gid` (primary or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A file inside a revision directory. Views (`disk.raw`, `disk.qcow2`, …) join as more
/// variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    /// `meta.json`: the revision's metadata plus repo, virtual size and layer list.
    MetaJson,
}

impl FileKind {
    /// Every kind of file a revision directory lists, in listing order.
    pub const ALL: [FileKind; 1] = [FileKind::MetaJson];

    /// The file's name inside `@N/`.
    pub fn file_name(self) -> &'static str {
        match self {
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
}

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
    #[error("Bad revision: {0}")]
    BadRevision(String),
    #[error("Bad image URI {0}: expected [REPO:]IMAGE[@REVISION] with at most one ':'")]
    BadUri(String),
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
    #[error("{0}: operation not supported here")]
    NotSupported(String),
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
            Error::InvalidName | Error::EmptyName | Error::BadRevision(_) | Error::BadUri(_) => {
                libc::EINVAL
            }
            Error::NotADirectory(_) => libc::ENOTDIR,
            Error::IsADirectory(_) => libc::EISDIR,
            Error::NotASymlink(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::PermissionDenied(_) => libc::EACCES,
            Error::CrossRepository(_) => libc::EXDEV,
            Error::NotSupported(_) => libc::ENOTSUP,
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

/// Every configured repository, opened (and created on first use, as pcocc does).
pub struct Tree {
    #[allow(dead_code)]
    repos: Vec<crate::store::Store>,
}

impl Tree {
    /// Opens every repository of `config` in priority order, creating missing ones. Fails
    /// like pcocc on a repository it cannot use (bad parent, not a directory, bad
    /// `.config`).
    pub fn open(config: &Config) -> Result<Tree, Error> {
        let _ = config;
        todo!()
    }

    /// Repository names in priority order.
    pub fn repo_names(&self) -> Vec<&str> {
        todo!()
    }

    /// The default repository (the first configured one).
    pub fn default_repo(&self) -> Result<&str, Error> {
        todo!()
    }

    /// Every repository with its path and whether `caller` may write it.
    pub fn repo_list(&self, caller: &Caller) -> Vec<RepoInfo> {
        let _ = caller;
        todo!()
    }

    // ---- URI-level calls (the CLI) ----

    /// Finds a revision: in `uri.repo` if given (`""` = the default repository), else in
    /// the first repository, in priority order, that has it. Without a revision, the
    /// latest one. Errors as pcocc: `Unknown repository R`, `Object N[ revision K] not
    /// found in repository R` / `… in configured repositories`.
    pub fn resolve(&self, caller: &Caller, uri: &Uri) -> Result<Resolved, Error> {
        let _ = (caller, uri);
        todo!()
    }

    /// The images of `repo`, sorted by name, each with its latest revision's metadata.
    /// Revisions whose metadata cannot be read are skipped with a warning.
    pub fn list_images(&self, caller: &Caller, repo: &str) -> Result<Vec<ImageSummary>, Error> {
        let _ = (caller, repo);
        todo!()
    }

    /// Every revision of `repo:image`, sorted by revision number, with the byte size of
    /// each revision's top layer file.
    pub fn revisions(
        &self,
        caller: &Caller,
        repo: &str,
        image: &str,
    ) -> Result<Vec<RevisionInfo>, Error> {
        let _ = (caller, repo, image);
        todo!()
    }

    /// pcocc's copy: `src` is resolved like [`Tree::resolve`]; `dst` names the new image
    /// (repository defaults to the default one; its revision is ignored) and must not
    /// exist there. Writes `DST@0` listing the same layers, linking or copying layers the
    /// destination repository lacks.
    pub fn copy(&self, caller: &Caller, src: &Uri, dst: &Uri) -> Result<CopyOutcome, Error> {
        let _ = (caller, src, dst);
        todo!()
    }

    /// Deletes one revision (`uri.revision` given) or every revision of an image. Without
    /// a repository, acts on the first repository in priority order that has it (the man
    /// page's rule; pcocc itself only looks at the default one). Metadata only: layers
    /// stay until [`Tree::gc`].
    pub fn delete(&self, caller: &Caller, uri: &Uri) -> Result<Deleted, Error> {
        let _ = (caller, uri);
        todo!()
    }

    /// Garbage-collects `repo`: unreferenced layers and `.tmp/` entries older than
    /// `grace` (default [`DEFAULT_GC_GRACE`]); upgrades a version 1 repository.
    pub fn gc(
        &self,
        caller: &Caller,
        repo: &str,
        grace: Option<Duration>,
    ) -> Result<GcReport, Error> {
        let _ = (caller, repo, grace);
        todo!()
    }

    // ---- Node-level calls (the filesystem) ----

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, caller: &Caller, parent: &Node, name: &str) -> Result<Node, Error> {
        let _ = (caller, parent, name);
        todo!()
    }

    /// The entries of directory `dir`, in a stable order (repositories in priority order,
    /// images by name, revisions by number then `latest`, files in [`FileKind::ALL`]
    /// order).
    pub fn readdir(&self, caller: &Caller, dir: &Node) -> Result<Vec<DirEntry>, Error> {
        let _ = (caller, dir);
        todo!()
    }

    /// The attributes of `node`.
    pub fn getattr(&self, caller: &Caller, node: &Node) -> Result<Attr, Error> {
        let _ = (caller, node);
        todo!()
    }

    /// Reads file `node` at `offset` into `buf`; returns the bytes read (0 at the end).
    pub fn read(
        &self,
        caller: &Caller,
        node: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Error> {
        let _ = (caller, node, offset, buf);
        todo!()
    }

    /// The target of symlink `node` (`@N` for `latest`).
    pub fn readlink(&self, caller: &Caller, node: &Node) -> Result<String, Error> {
        let _ = (caller, node);
        todo!()
    }

    /// Copies the revision that `src` is (a revision directory or a file inside one) to a
    /// new image `dst_name` in `dst_repo` as its revision 0 (`ln …/@N/disk.qcow2 R/NEW`).
    /// Metadata only within a repository; layers linked or copied across. Returns the new
    /// image's node.
    pub fn copy_revision(
        &self,
        caller: &Caller,
        src: &Node,
        dst_repo: &str,
        dst_name: &str,
    ) -> Result<Node, Error> {
        let _ = (caller, src, dst_repo, dst_name);
        todo!()
    }

    /// Renames image `old` to `new` within `repo` (every revision). Fails if `new` exists.
    pub fn rename_image(
        &self,
        caller: &Caller,
        repo: &str,
        old: &str,
        new: &str,
    ) -> Result<(), Error> {
        let _ = (caller, repo, old, new);
        todo!()
    }

    /// Removes what `node` is: a revision directory deletes that revision, an image
    /// directory every revision of it. Metadata only; anything else is refused.
    pub fn remove(&self, caller: &Caller, node: &Node) -> Result<Deleted, Error> {
        let _ = (caller, node);
        todo!()
    }
}
