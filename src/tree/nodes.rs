//! The node-level operations the filesystem maps its callbacks to: lookup, readdir,
//! getattr, read, readlink, and the metadata operations expressed on nodes.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::access::{self, R, X};
use super::{
    Attr, Caller, DIR_BLKSIZE, Deleted, DirEntry, Error, FileKind, Node, NodeType, READ_BLKSIZE,
    Tree, Uri, metajson,
};
use crate::store::fsutil::ctime;
use crate::store::{self, Meta, Store};

/// `st_size` reported for directories (what ext4 shows for a small one).
const DIR_SIZE: u64 = 4096;
/// Permission bits of revision directories and the files in them: read-only for all.
const REVISION_DIR_PERM: u16 = 0o555;
const REVISION_FILE_PERM: u16 = 0o444;
/// The root lists repositories; nothing is created there.
const ROOT_PERM: u16 = 0o555;
const SYMLINK_PERM: u16 = 0o777;
/// Name of the symlink to the highest revision.
pub const LATEST: &str = "latest";
/// `st_blocks` unit.
const BLOCK: u64 = 512;

/// `@N` for revision `rev`.
pub fn revision_dir_name(rev: u64) -> String {
    format!("@{rev}")
}

/// The revision number in a directory name `@N`, only in its canonical spelling (no
/// sign, no leading zero), so that one revision has one name.
pub fn parse_revision_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('@')?;
    let rev: u64 = digits.parse().ok()?;
    (digits.bytes().all(|b| b.is_ascii_digit()) && rev.to_string() == digits).then_some(rev)
}

/// A pcocc timestamp (float seconds, possibly negative or absurd) as a time.
fn to_time(ts: f64) -> SystemTime {
    if ts >= 0.0 {
        Duration::try_from_secs_f64(ts)
            .ok()
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    } else {
        Duration::try_from_secs_f64(-ts)
            .ok()
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_sub(d))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

fn mtime(m: &std::fs::Metadata) -> SystemTime {
    m.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A human path for messages: `repo/image/@N/file`.
pub fn display(node: &Node) -> String {
    match node {
        Node::Root => "/".to_string(),
        Node::Repo { repo } => repo.clone(),
        Node::Image { repo, image } => format!("{repo}/{image}"),
        Node::Revision { repo, image, rev } => format!("{repo}/{image}/@{rev}"),
        Node::Latest { repo, image } => format!("{repo}/{image}/{LATEST}"),
        Node::File {
            repo,
            image,
            rev,
            file,
        } => format!("{repo}/{image}/@{rev}/{}", file.file_name()),
        Node::Import {
            repo,
            image: Some(image),
            name,
        } => format!("{repo}/{image}/{name}"),
        Node::Import {
            repo,
            image: None,
            name,
        } => format!("{repo}/{name}"),
    }
}

fn child(parent: &Node, name: &str) -> String {
    match parent {
        Node::Root => name.to_string(),
        _ => format!("{}/{name}", display(parent)),
    }
}

impl Tree {
    /// The store of a node's repository, and a check that `caller` may read it.
    pub(super) fn readable_store(&self, caller: &Caller, repo: &str) -> Result<&Store, Error> {
        let store: &Store = self
            .repos
            .iter()
            .find(|s| s.name() == repo)
            .ok_or_else(|| Error::NoEntry(repo.to_string()))?;
        access::check(caller, &store.meta_dir(), R | X)?;
        Ok(store)
    }

    /// The metadata of a revision node, or `NoEntry` when it is gone. Served from the
    /// store's cache of parsed metadata: listings ask for every revision's attributes.
    pub(super) fn revision_meta(
        &self,
        caller: &Caller,
        repo: &str,
        image: &str,
        rev: u64,
        node: &Node,
    ) -> Result<(&Store, Arc<Meta>), Error> {
        let store = self.readable_store(caller, repo)?;
        let meta = store
            .read_meta_cached(image, rev)?
            .ok_or_else(|| Error::NoEntry(display(node)))?;
        Ok((store, meta))
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, caller: &Caller, parent: &Node, name: &str) -> Result<Node, Error> {
        let missing = || Error::NoEntry(child(parent, name));
        match parent {
            Node::Root => self
                .repos
                .iter()
                .find(|s| s.name() == name)
                .map(|s| Node::Repo {
                    repo: s.name().to_string(),
                })
                .ok_or_else(missing),
            Node::Repo { repo } => {
                let store = self.readable_store(caller, repo)?;
                let pending = Node::Import {
                    repo: repo.clone(),
                    image: None,
                    name: name.to_string(),
                };
                if self.pending.find(&pending, caller, true).is_some() {
                    return Ok(pending);
                }
                // The image directory wins over a file of the same name just published.
                let taken = store::is_valid_name(name) && !store.revisions(name)?.is_empty();
                if !taken && self.pending.find_recent(&pending, caller).is_some() {
                    return Ok(pending);
                }
                if !store::is_valid_name(name)
                    || (store.revisions(name)?.is_empty()
                        && self.pending.empty_dir(repo, name).is_none())
                {
                    return Err(missing());
                }
                Ok(Node::Image {
                    repo: repo.clone(),
                    image: name.to_string(),
                })
            }
            Node::Image { repo, image } => {
                let store = self.readable_store(caller, repo)?;
                let pending = Node::Import {
                    repo: repo.clone(),
                    image: Some(image.clone()),
                    name: name.to_string(),
                };
                if self.pending.find(&pending, caller, true).is_some()
                    || (name != LATEST
                        && parse_revision_dir_name(name).is_none()
                        && self.pending.find_recent(&pending, caller).is_some())
                {
                    return Ok(pending);
                }
                if name == LATEST {
                    if store.revisions(image)?.is_empty() {
                        return Err(missing());
                    }
                    return Ok(Node::Latest {
                        repo: repo.clone(),
                        image: image.clone(),
                    });
                }
                let rev = parse_revision_dir_name(name).ok_or_else(missing)?;
                if !store.has_revision(image, rev) {
                    return Err(missing());
                }
                Ok(Node::Revision {
                    repo: repo.clone(),
                    image: image.clone(),
                    rev,
                })
            }
            Node::Revision { repo, image, rev } => {
                let file = FileKind::from_file_name(name).ok_or_else(missing)?;
                let (store, meta) = self.revision_meta(caller, repo, image, *rev, parent)?;
                if !self.has_file(store, &meta, file) {
                    return Err(missing());
                }
                Ok(Node::File {
                    repo: repo.clone(),
                    image: image.clone(),
                    rev: *rev,
                    file,
                })
            }
            Node::Latest { .. } | Node::File { .. } | Node::Import { .. } => {
                Err(Error::NotADirectory(display(parent)))
            }
        }
    }

    /// The entries of directory `dir`, in a stable order (repositories in priority order,
    /// images by name, revisions by number then `latest`, files in [`FileKind::ALL`]
    /// order).
    pub fn readdir(&self, caller: &Caller, dir: &Node) -> Result<Vec<DirEntry>, Error> {
        let entry = |name: String, node: Node, kind: NodeType| DirEntry { name, node, kind };
        match dir {
            Node::Root => Ok(self
                .repos
                .iter()
                .map(|s| {
                    let repo = s.name().to_string();
                    entry(repo.clone(), Node::Repo { repo }, NodeType::Directory)
                })
                .collect()),
            Node::Repo { repo } => {
                let store = self.readable_store(caller, repo)?;
                // `.` and `..` (names pcocc accepts) cannot be shown as entries.
                let mut images: Vec<String> = store
                    .list()?
                    .into_keys()
                    .filter(|n| n != "." && n != "..")
                    .collect();
                for empty in self.pending.empty_dirs(repo) {
                    if let Err(at) = images.binary_search(&empty) {
                        images.insert(at, empty);
                    }
                }
                let mut out: Vec<DirEntry> = images
                    .into_iter()
                    .map(|image| {
                        let node = Node::Image {
                            repo: repo.clone(),
                            image: image.clone(),
                        };
                        entry(image, node, NodeType::Directory)
                    })
                    .collect();
                out.extend(self.pending_entries(repo, None, caller));
                Ok(out)
            }
            Node::Image { repo, image } => {
                let store = self.readable_store(caller, repo)?;
                let revs = store.revisions(image)?;
                if revs.is_empty() {
                    if self.pending.empty_dir(repo, image).is_some() {
                        return Ok(self.pending_entries(repo, Some(image), caller));
                    }
                    return Err(Error::NoEntry(display(dir)));
                }
                // `latest` comes first: `rm -r IMAGE` handles entries in this order, and
                // `latest` vanishes with the last revision.
                let latest = Node::Latest {
                    repo: repo.clone(),
                    image: image.clone(),
                };
                let mut out = vec![entry(LATEST.to_string(), latest, NodeType::Symlink)];
                // A revision whose metadata cannot be read as metadata is not listed: its
                // name could not be looked up. (`rm -r` of the image still removes it.)
                let readable = revs.into_iter().filter(|&rev| {
                    store
                        .read_meta_cached(image, rev)
                        .inspect_err(|e| log::warn!("{}: {e}", display(dir)))
                        .is_ok()
                });
                out.extend(readable.map(|rev| {
                    let node = Node::Revision {
                        repo: repo.clone(),
                        image: image.clone(),
                        rev,
                    };
                    entry(revision_dir_name(rev), node, NodeType::Directory)
                }));
                out.extend(self.pending_entries(repo, Some(image), caller));
                Ok(out)
            }
            Node::Revision { repo, image, rev } => {
                let (store, meta) = self.revision_meta(caller, repo, image, *rev, dir)?;
                Ok(FileKind::ALL
                    .into_iter()
                    .filter(|&file| self.has_file(store, &meta, file))
                    .map(|file| {
                        let node = Node::File {
                            repo: repo.clone(),
                            image: image.clone(),
                            rev: *rev,
                            file,
                        };
                        entry(file.file_name().to_string(), node, NodeType::RegularFile)
                    })
                    .collect())
            }
            Node::Latest { .. } | Node::File { .. } | Node::Import { .. } => {
                Err(Error::NotADirectory(display(dir)))
            }
        }
    }

    /// Starts reading ahead, in the background, the metadata that the attributes of
    /// `entries` (nodes listed in `dir`) are made of: each revision's for an image
    /// directory, each image's latest for a repository. `ls -l` then finds them parsed
    /// instead of waiting for one file after the other. Nothing happens unless `caller`
    /// may read the repository; nothing is shown to anyone by this call.
    pub fn prefetch_attrs<'a>(
        &self,
        caller: &Caller,
        dir: &Node,
        entries: impl IntoIterator<Item = &'a Node>,
    ) {
        let (Node::Repo { repo } | Node::Image { repo, .. }) = dir else {
            return;
        };
        if self.readable_store(caller, repo).is_err() {
            return;
        }
        let Some(store) = self.repos.iter().find(|s| s.name() == repo) else {
            return;
        };
        let revs = entries
            .into_iter()
            .filter_map(|node| match node {
                Node::Revision { image, rev, .. } => Some((image.clone(), *rev)),
                Node::Image { image, .. } => store
                    .revisions(image)
                    .ok()?
                    .last()
                    .map(|&rev| (image.clone(), rev)),
                _ => None,
            })
            .collect();
        // Detached: the listing goes on while the threads read.
        drop(store.prefetch_meta(revs));
    }

    /// Metadata files opened and parsed so far by every repository of this tree (reads
    /// the metadata cache did not spare), for tests and statistics.
    pub fn meta_files_read(&self) -> u64 {
        self.repos.iter().map(|s| s.meta_files_read()).sum()
    }

    /// The files `caller` is importing into a directory, as entries.
    fn pending_entries(&self, repo: &str, image: Option<&str>, caller: &Caller) -> Vec<DirEntry> {
        self.pending
            .names(repo, image, caller)
            .into_iter()
            .filter_map(|node| match &node {
                Node::Import { name, .. } => Some(DirEntry {
                    name: name.clone(),
                    node: node.clone(),
                    kind: NodeType::RegularFile,
                }),
                _ => None,
            })
            .collect()
    }

    /// The attributes of `node`.
    pub fn getattr(&self, caller: &Caller, node: &Node) -> Result<Attr, Error> {
        match node {
            Node::Root => {
                let me = access::current_caller();
                Ok(Attr {
                    kind: NodeType::Directory,
                    perm: ROOT_PERM,
                    nlink: 2 + self.repos.len() as u32,
                    uid: me.uid,
                    gid: me.gid,
                    size: DIR_SIZE,
                    blocks: 0,
                    atime: self.opened,
                    mtime: self.opened,
                    ctime: self.opened,
                    blksize: DIR_BLKSIZE,
                })
            }
            Node::Repo { repo } => {
                let store = self.readable_store(caller, repo)?;
                let m = meta_dir_stat(store)?;
                let images = u32::try_from(store.image_count()?).unwrap_or(u32::MAX);
                Ok(dir_attr_like(&m, 2 + images, mtime(&m), ctime(&m)))
            }
            Node::Image { repo, image } => {
                let store = self.readable_store(caller, repo)?;
                let revs = store.revisions(image)?;
                let m = meta_dir_stat(store)?;
                if revs.is_empty()
                    && let Some(t) = self.pending.empty_dir(repo, image)
                {
                    return Ok(dir_attr_like(&m, 2, t, t));
                }
                if revs.is_empty() {
                    return Err(Error::NoEntry(display(node)));
                }
                // An image whose metadata is all damaged still resolves, so that it can be
                // listed and removed; it takes the times of `meta/`.
                let t = self
                    .latest_time(store, image, &revs)
                    .unwrap_or_else(|| mtime(&m));
                Ok(dir_attr_like(&m, 2 + revs.len() as u32, t, t))
            }
            Node::Latest { repo, image } => {
                let store = self.readable_store(caller, repo)?;
                let revs = store.revisions(image)?;
                let last = *revs.last().ok_or_else(|| Error::NoEntry(display(node)))?;
                let m = meta_dir_stat(store)?;
                let t = self.latest_time(store, image, &revs).unwrap_or(self.opened);
                let target = revision_dir_name(last);
                Ok(Attr {
                    kind: NodeType::Symlink,
                    perm: SYMLINK_PERM,
                    nlink: 1,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: target.len() as u64,
                    blocks: 0,
                    atime: t,
                    mtime: t,
                    ctime: t,
                    blksize: DIR_BLKSIZE,
                })
            }
            Node::Revision { repo, image, rev } => {
                let (store, meta) = self.revision_meta(caller, repo, image, *rev, node)?;
                let (uid, gid) = self.revision_owner(store, &meta);
                let t = to_time(meta.timestamp);
                Ok(Attr {
                    kind: NodeType::Directory,
                    perm: REVISION_DIR_PERM,
                    nlink: 2,
                    uid,
                    gid,
                    size: DIR_SIZE,
                    blocks: 0,
                    atime: t,
                    mtime: t,
                    ctime: t,
                    blksize: DIR_BLKSIZE,
                })
            }
            Node::File {
                repo,
                image,
                rev,
                file,
            } => {
                let (store, meta) = self.revision_meta(caller, repo, image, *rev, node)?;
                let (uid, gid) = self.revision_owner(store, &meta);
                let t = to_time(meta.timestamp);
                let (size, blocks) = match file {
                    FileKind::MetaJson => {
                        let size = metajson::render(store, &meta).len() as u64;
                        (size, size.div_ceil(BLOCK))
                    }
                    FileKind::View(format) => self
                        .opened_revision(store, &meta)?
                        .size_and_blocks(*format)?,
                };
                Ok(Attr {
                    kind: NodeType::RegularFile,
                    perm: REVISION_FILE_PERM,
                    nlink: 1,
                    uid,
                    gid,
                    size,
                    blocks,
                    atime: t,
                    mtime: t,
                    ctime: t,
                    blksize: READ_BLKSIZE,
                })
            }
            Node::Import { repo, .. } => {
                self.readable_store(caller, repo)?;
                self.pending
                    .find(node, caller, false)
                    .ok_or_else(|| Error::NoEntry(display(node)))?
                    .attr()
            }
        }
    }

    /// The time of an image: its latest readable revision's timestamp.
    fn latest_time(&self, store: &Store, image: &str, revs: &[u64]) -> Option<SystemTime> {
        revs.iter()
            .rev()
            .find_map(|&r| store.read_meta_cached(image, r).ok().flatten())
            .map(|m| to_time(m.timestamp))
    }

    /// uid/gid shown for a revision: its owner's where that user exists here, else the
    /// metadata file's.
    fn revision_owner(&self, store: &Store, meta: &Meta) -> (u32, u32) {
        if let Some(ids) = self.users.get(&meta.owner) {
            return ids;
        }
        store
            .revision_file_metadata(&meta.name, meta.revision)
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or((0, 0))
    }

    /// Reads file `node` at `offset` into `buf`; returns the bytes read (0 at the end).
    /// One-off reads (the CLI); the mount opens a file once and reads its handle.
    pub fn read(
        &self,
        caller: &Caller,
        node: &Node,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Error> {
        self.open(caller, node, false, false)?.read(buf, offset)
    }

    /// The target of symlink `node` (`@N` for `latest`).
    pub fn readlink(&self, caller: &Caller, node: &Node) -> Result<String, Error> {
        let Node::Latest { repo, image } = node else {
            return Err(Error::NotASymlink(display(node)));
        };
        let store = self.readable_store(caller, repo)?;
        let last = *store
            .revisions(image)?
            .last()
            .ok_or_else(|| Error::NoEntry(display(node)))?;
        Ok(revision_dir_name(last))
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
        let (repo, image, rev) = match src {
            Node::Revision { repo, image, rev }
            | Node::File {
                repo, image, rev, ..
            } => (repo, image, *rev),
            Node::Latest { repo, image } => {
                let target = self.readlink(caller, src)?;
                let rev =
                    parse_revision_dir_name(&target).ok_or_else(|| Error::NoEntry(display(src)))?;
                (repo, image, rev)
            }
            _ => return Err(Error::NotSupported(display(src))),
        };
        let from = Uri {
            repo: Some(repo.clone()),
            name: image.clone(),
            revision: Some(rev),
        };
        let to = Uri {
            repo: Some(dst_repo.to_string()),
            name: dst_name.to_string(),
            revision: None,
        };
        self.copy(caller, &from, &to)?;
        Ok(Node::Image {
            repo: dst_repo.to_string(),
            image: dst_name.to_string(),
        })
    }

    /// Removes directory `node` (`rmdir`, or the end of `rm -r`): a revision directory
    /// deletes that revision, an image directory every revision left in it. Metadata
    /// only. An image directory with no revision left (`rm -r` removed them one by one)
    /// removes nothing and succeeds.
    pub fn remove(&self, caller: &Caller, node: &Node) -> Result<Deleted, Error> {
        // Files just published into this image stop answering for it when the image goes
        // as a whole; not when a revision does: `rm -r IMAGE` that listed such a file
        // while it was being written removes the revisions, then unlinks the file's name,
        // and must reach the rmdir of the image.
        if let Node::Image { repo, image } = node {
            self.pending.forget_published(repo, image);
        }
        match node {
            Node::Revision { repo, image, rev } => {
                let store = self.readable_store(caller, repo)?;
                self.delete_in(caller, store, image, Some(*rev))
                    .map_err(|e| match e {
                        Error::RevisionNotFound { .. } => Error::NoEntry(display(node)),
                        e => e,
                    })
            }
            Node::Image { repo, image } => {
                let store = self.readable_store(caller, repo)?;
                self.delete_in(caller, store, image, None)
            }
            Node::Root | Node::Repo { .. } => Err(Error::PermissionDenied(display(node))),
            Node::Latest { .. } | Node::File { .. } | Node::Import { .. } => {
                Err(Error::NotADirectory(display(node)))
            }
        }
    }

    /// Unlinks file `node`. A file inside a revision, or `latest`, is a view of the
    /// revision: unlinking it alone deletes nothing and succeeds, so that `rm -r` of a
    /// revision or image directory reaches the `rmdir` that deletes (DESIGN §4).
    pub fn unlink(&self, caller: &Caller, node: &Node) -> Result<(), Error> {
        match node {
            Node::File { repo, .. } | Node::Latest { repo, .. } => {
                self.readable_store(caller, repo)?;
                Ok(())
            }
            Node::Import { .. } => {
                if let Some(imp) = self.pending.find(node, caller, true) {
                    self.pending.drop_import(&imp);
                    return Ok(());
                }
                // A file its writer published a moment ago still answers the writer (see
                // `Pending::find_recent`); unlinking the name deletes nothing, as for a
                // revision's file, and the name stops answering. `rm -r IMAGE` that
                // listed the file while it was written then goes on to the rmdir of the
                // image instead of failing half way, leaving an empty image directory.
                let imp = self
                    .pending
                    .find_recent(node, caller)
                    .ok_or_else(|| Error::NoEntry(display(node)))?;
                self.pending.forget_recent(&imp);
                Ok(())
            }
            _ => Err(Error::IsADirectory(display(node))),
        }
    }

    /// Renames `from` to `new_name` under directory `to_parent` (`mv`): only an image
    /// directory (to another repository: a copy of every revision, then the delete).
    pub fn rename(
        &self,
        caller: &Caller,
        from: &Node,
        to_parent: &Node,
        new_name: &str,
    ) -> Result<(), Error> {
        match (from, to_parent) {
            (Node::Image { repo, image }, Node::Repo { repo: to_repo }) => {
                if repo != to_repo {
                    return self.move_image(caller, repo, image, to_repo, new_name);
                }
                if image == new_name {
                    return Ok(());
                }
                self.rename_image(caller, repo, image, new_name)
            }
            (Node::Revision { .. } | Node::File { .. } | Node::Latest { .. }, _) => {
                Err(Error::ReadOnly(display(from)))
            }
            // `mv IMAGE OTHER` of an existing image OTHER, which `mv` takes for OTHER/IMAGE.
            (Node::Image { .. }, Node::Image { .. }) => Err(Error::NotPermitted(format!(
                "{}: an image cannot go inside another image ({})",
                display(from),
                display(to_parent)
            ))),
            _ => Err(Error::PermissionDenied(display(from))),
        }
    }
}

/// The metadata of the repository's `meta/`, reached without following symlinks.
fn meta_dir_stat(store: &Store) -> Result<std::fs::Metadata, Error> {
    Ok(store.meta_dir_metadata()?)
}

/// A repository or image directory: it looks as writable as the repository's `meta/`
/// really is (same mode bits and owner), so `ls -l` and the kernel's permission checks
/// tell the truth about who may import or delete there.
fn dir_attr_like(
    meta_dir: &std::fs::Metadata,
    nlink: u32,
    mtime: SystemTime,
    ctime: SystemTime,
) -> Attr {
    Attr {
        kind: NodeType::Directory,
        perm: (meta_dir.mode() & 0o7777) as u16,
        nlink,
        uid: meta_dir.uid(),
        gid: meta_dir.gid(),
        size: DIR_SIZE,
        blocks: 0,
        atime: mtime,
        mtime,
        ctime,
        blksize: DIR_BLKSIZE,
    }
}
