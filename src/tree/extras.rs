//! The small questions a filesystem must answer besides reading and writing: the parent
//! of a node (`..`), `statfs`, `access(2)` and extended attributes (the self-description
//! of revision directories and views, `user.pcocc.*`).

use std::ffi::OsStr;

use super::access::{self, R, W, X};
use super::nodes::display;
use super::{Caller, Error, FileKind, Node, NodeType, Tree, metajson};

/// The namespace of the attributes revision directories and views carry (`user.` so
/// that unprivileged `getfattr` lists them).
pub const XATTR_PREFIX: &str = "user.pcocc.";
/// The image name (pcocc's `name`).
pub const XATTR_NAME: &str = "user.pcocc.name";
/// The revision number, decimal.
pub const XATTR_REVISION: &str = "user.pcocc.revision";
/// The user who published the revision (pcocc's `owner`).
pub const XATTR_OWNER: &str = "user.pcocc.owner";
/// The layer hashes (sha256, hex, without pcocc's `sha256:` prefix), base first, joined
/// by [`LAYERS_SEPARATOR`].
pub const XATTR_LAYERS: &str = "user.pcocc.layers";
/// The virtual disk size in bytes, decimal (the guest's disk size, the same for every
/// view of the revision).
pub const XATTR_VIRTUAL_SIZE: &str = "user.pcocc.virtual_size";
/// On views only: the view's disk format as qemu names it (`raw`, `qcow2`, …).
pub const XATTR_FORMAT: &str = "user.pcocc.format";
/// Separates layer hashes in [`XATTR_LAYERS`]: a comma keeps the value on one line in
/// `getfattr -d` (which escapes a newline as `\012`) and never occurs in a hash.
pub const LAYERS_SEPARATOR: &str = ",";
/// The attributes both revision directories and views carry, in listing order.
const XATTR_NAMES: [&str; 5] = [
    XATTR_NAME,
    XATTR_REVISION,
    XATTR_OWNER,
    XATTR_LAYERS,
    XATTR_VIRTUAL_SIZE,
];

/// The directory that holds `node` (its `..`); `None` for the root.
pub fn parent(node: &Node) -> Option<Node> {
    match node {
        Node::Root => None,
        Node::Repo { .. } => Some(Node::Root),
        Node::Image { repo, .. } => Some(Node::Repo { repo: repo.clone() }),
        Node::Revision { repo, image, .. } | Node::Latest { repo, image } => Some(Node::Image {
            repo: repo.clone(),
            image: image.clone(),
        }),
        Node::File {
            repo, image, rev, ..
        } => Some(Node::Revision {
            repo: repo.clone(),
            image: image.clone(),
            rev: *rev,
        }),
        Node::Import {
            repo,
            image: Some(image),
            ..
        } => Some(Node::Image {
            repo: repo.clone(),
            image: image.clone(),
        }),
        Node::Import {
            repo, image: None, ..
        } => Some(Node::Repo { repo: repo.clone() }),
    }
}

/// What `statfs` reports (the fields of `struct statvfs` the kernel asks for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub frsize: u32,
}

/// `access(2)` mask bits (unistd.h).
const R_OK: i32 = 4;
const W_OK: i32 = 2;
const X_OK: i32 = 1;

impl Tree {
    /// statvfs of the default repository's filesystem, so that `df` on the mount shows
    /// the space imports really have.
    pub fn statfs(&self) -> Result<StatFs, Error> {
        let store = self.store("")?;
        let path = store.path();
        // A path with a NUL byte names nothing.
        if path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(Error::NoEntry(path.display().to_string()));
        }
        let st = crate::sys::statvfs(path).map_err(|source| {
            Error::Store(crate::store::Error::Io {
                path: path.to_path_buf(),
                source,
            })
        })?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: u32::try_from(st.f_bsize).unwrap_or(u32::MAX),
            frsize: u32::try_from(st.f_frsize).unwrap_or(u32::MAX),
        })
    }

    /// access(2), judged with the caller's identity: a repository or image directory
    /// as the kernel judges the repository's `meta/` (and for writing, `data/` and
    /// `.tmp/` too), ACLs included; what is inside a revision is readable when the
    /// caller can open its metadata and layers (which its attributes need), never
    /// writable (EROFS), and executable only as its mode bits say.
    pub fn access(&self, caller: &Caller, node: &Node, mask: i32) -> Result<(), Error> {
        let _as = caller.act()?;
        let attr = self.getattr(caller, node)?;
        let want = (if mask & R_OK != 0 { R } else { 0 })
            | (if mask & W_OK != 0 { W } else { 0 })
            | (if mask & X_OK != 0 { X } else { 0 });
        match node {
            Node::Repo { repo } | Node::Image { repo, .. } => {
                let store = self.store(repo)?;
                if want & W != 0 {
                    self.writable_store(caller, repo)?;
                }
                access::check(caller, &store.meta_dir(), want & (R | X))
            }
            Node::Revision { .. } | Node::File { .. } | Node::Latest { .. } if want & W != 0 => {
                Err(Error::ReadOnly(display(node)))
            }
            _ if want & X != 0
                && attr.kind != NodeType::Directory
                && u32::from(attr.perm) & 0o111 == 0 =>
            {
                Err(Error::PermissionDenied(display(node)))
            }
            _ => Ok(()),
        }
    }

    /// Extended attributes: revision directories and views describe themselves with
    /// the `user.pcocc.*` names of `XATTR_NAMES` (views also with
    /// [`XATTR_FORMAT`]), so `getfattr -d` on a file handed to qemu tells where it comes
    /// from. Anything else (the kernel probes `security.*` on every file) has none, and
    /// is answered without touching the repository.
    pub fn getxattr(
        &self,
        caller: &Caller,
        node: &Node,
        name: &OsStr,
    ) -> Result<Option<Vec<u8>>, Error> {
        let Some(name) = name.to_str().filter(|n| n.starts_with(XATTR_PREFIX)) else {
            return Ok(None);
        };
        if !self.listxattr(caller, node)?.iter().any(|n| n == name) {
            return Ok(None);
        }
        let (repo, image, rev, format) = match node {
            Node::Revision { repo, image, rev } => (repo, image, *rev, None),
            Node::File {
                repo,
                image,
                rev,
                file: FileKind::View(format),
            } => (repo, image, *rev, Some(*format)),
            _ => return Ok(None),
        };
        let (store, meta) = self.revision_meta(caller, repo, image, rev, node)?;
        let hashes = meta.layer_hashes().unwrap_or_default();
        let value = match name {
            XATTR_NAME => meta.name.clone(),
            XATTR_REVISION => meta.revision.to_string(),
            XATTR_OWNER => meta.owner.clone(),
            XATTR_LAYERS => hashes.join(LAYERS_SEPARATOR),
            XATTR_VIRTUAL_SIZE => {
                match hashes
                    .last()
                    .and_then(|h| store.open_layer(h).ok())
                    .and_then(|(f, _)| metajson::qcow2_virtual_size(&f))
                {
                    Some(size) => size.to_string(),
                    None => return Ok(None),
                }
            }
            XATTR_FORMAT => match format {
                Some(f) => f.name().to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        Ok(Some(value.into_bytes()))
    }

    /// The names of the extended attributes of `node`: the `user.pcocc.*` set on
    /// revision directories and views (after checking `caller` may read the revision),
    /// none elsewhere.
    pub fn listxattr(&self, caller: &Caller, node: &Node) -> Result<Vec<String>, Error> {
        let with_format = match node {
            Node::Revision { .. } => false,
            Node::File {
                file: FileKind::View(_),
                ..
            } => true,
            _ => return Ok(Vec::new()),
        };
        // Reading the revision's metadata proves it exists and is readable.
        if let Node::Revision { repo, image, rev }
        | Node::File {
            repo, image, rev, ..
        } = node
        {
            self.revision_meta(caller, repo, image, *rev, node)?;
        }
        let mut names: Vec<String> = XATTR_NAMES.iter().map(|n| n.to_string()).collect();
        if with_format {
            names.push(XATTR_FORMAT.to_string());
        }
        Ok(names)
    }
}
