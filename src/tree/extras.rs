//! The small questions a filesystem must answer besides reading and writing: the parent
//! of a node (`..`), `statfs`, `access(2)` and extended attributes.

use std::ffi::{CString, OsStr};

use super::nodes::display;
use super::{Caller, Error, Node, NodeType, Tree};

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
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::NoEntry(path.display().to_string()))?;
        // SAFETY: statvfs only writes the zeroed struct we pass; the path is a valid
        // NUL-terminated string for the call's duration.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(Error::Store(crate::store::Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::last_os_error(),
            }));
        }
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

    /// access(2) with the tree's own rules: the node's mode bits for `caller` (root
    /// passes, but needs some x bit to execute a file); nothing inside a revision is
    /// writable (EROFS).
    pub fn access(&self, caller: &Caller, node: &Node, mask: i32) -> Result<(), Error> {
        let attr = self.getattr(caller, node)?;
        let in_revision = matches!(
            node,
            Node::Revision { .. } | Node::File { .. } | Node::Latest { .. }
        );
        if mask & W_OK != 0 && in_revision {
            return Err(Error::ReadOnly(display(node)));
        }
        let want = (if mask & R_OK != 0 { 4 } else { 0 })
            | (if mask & W_OK != 0 { 2 } else { 0 })
            | (if mask & X_OK != 0 { 1 } else { 0 });
        let perm = u32::from(attr.perm);
        let ok = if caller.uid == 0 {
            want & 1 == 0 || attr.kind == NodeType::Directory || perm & 0o111 != 0
        } else {
            let bits = if attr.uid == caller.uid {
                (perm >> 6) & 7
            } else if caller.in_group(attr.gid) {
                (perm >> 3) & 7
            } else {
                perm & 7
            };
            bits & want == want
        };
        if ok {
            Ok(())
        } else {
            Err(Error::PermissionDenied(display(node)))
        }
    }

    /// Extended attributes: none yet (the kernel probes `security.*` on every file).
    pub fn getxattr(
        &self,
        _caller: &Caller,
        _node: &Node,
        _name: &OsStr,
    ) -> Result<Option<Vec<u8>>, Error> {
        Ok(None)
    }

    /// The names of the extended attributes of `node`: none yet.
    pub fn listxattr(&self, _caller: &Caller, _node: &Node) -> Result<Vec<String>, Error> {
        Ok(Vec::new())
    }
}
