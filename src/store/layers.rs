//! Layers: content-addressed files in `data/XX/<sha256>`, mode 0444. A layer is only
//! ever created complete: written under `.tmp/`, synced, then renamed into place; an
//! identical layer already present wins and the scratch file is removed, so `.tmp/` is
//! left empty (unlike pcocc, which leaves the duplicate behind). Across repositories a
//! layer is hard-linked when the filesystem and its policy allow, else copied extent by
//! extent (holes stay holes) and checked against its name.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::fsutil::{self, Dir, io_err};
use super::{Error, Store, is_hash};
use crate::sys;

/// Mode of a published layer (pcocc: `chmod 0444`).
const LAYER_MODE: u32 = 0o444;
/// Buffer for hashing and copying layers.
const IO_CHUNK: usize = 1 << 20;
/// Times a layer is placed again after gc removed its fresh `data/XX/` directory.
const PREFIX_DIR_ATTEMPTS: u32 = 8;

/// A scratch file in a repository's `.tmp/`, removed when dropped unless it was turned
/// into a layer ([`Store::add_layer`]) or kept ([`TmpFile::keep`]). It is reached only
/// through its descriptor and the descriptor of `.tmp/` it was created in.
#[derive(Debug)]
pub struct TmpFile {
    file: File,
    dir: Dir,
    name: String,
    path: PathBuf,
    keep: bool,
}

impl TmpFile {
    /// The open file (read-write).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path under `.tmp/`, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the file in place when this value is dropped (gc removes it later).
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.dir.remove(&self.name);
        }
    }
}

/// How [`Store::import_layer_from`] obtained a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerTransfer {
    /// The repository already had it.
    Present,
    /// Hard-linked from the other repository (same inode, no data written).
    Linked,
    /// Copied byte for byte (sparse) and verified.
    Copied,
}

/// sha256 of a whole file, in lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    sha256_of(&f, path)
}

/// sha256 of the whole content of the open file `f` (read from its start), in
/// lowercase hex; `path` names it in errors.
pub fn sha256_of(f: &File, path: &Path) -> Result<String, Error> {
    let mut f = f;
    f.rewind().map_err(|e| io_err(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; IO_CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, e)),
        };
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

impl Store {
    /// Creates a scratch file in `.tmp/` (mode 0600, name `tmpXXXXXXXX`).
    pub fn tmp_file(&self) -> Result<TmpFile, Error> {
        let dir = self.dir(".tmp")?;
        let (file, name) = fsutil::create_scratch(&dir)?;
        Ok(TmpFile {
            file,
            path: dir.show(&name),
            dir,
            name,
            keep: false,
        })
    }

    /// Publishes the complete scratch file `tmp` (of this repository's `.tmp/`) as a
    /// layer and returns its hash: `hash` if the caller already knows it (hashed while
    /// writing), else computed here. The file is made 0444, synced and renamed to
    /// `data/XX/<hash>`; if that layer already exists the scratch file is removed
    /// instead.
    pub fn add_layer(&self, mut tmp: TmpFile, hash: Option<&str>) -> Result<String, Error> {
        let hash = match hash {
            Some(h) => h.to_string(),
            None => sha256_of(&tmp.file, &tmp.path)?,
        };
        if self.place_layer(&tmp, &hash, rename_over)? {
            tmp.keep = true;
        }
        Ok(hash)
    }

    /// [`Store::add_layer`] of a scratch file whose hash `hash` is known, by a hard
    /// link: `tmp` keeps its name (and loses it when dropped), so a caller that must
    /// keep the scratch file if what follows fails still has it.
    pub fn link_layer(&self, tmp: &TmpFile, hash: &str) -> Result<(), Error> {
        self.place_layer(tmp, hash, sys::link_at).map(|_| ())
    }

    /// Makes `tmp` layer `hash` with `place` (rename or link) unless that layer exists;
    /// true when it was placed.
    fn place_layer(
        &self,
        tmp: &TmpFile,
        hash: &str,
        place: fn(BorrowedFd<'_>, &OsStr, BorrowedFd<'_>, &OsStr) -> io::Result<()>,
    ) -> Result<bool, Error> {
        if !is_hash(hash) {
            return Err(Error::BadHash(hash.to_string()));
        }
        let data = self.dir("data")?;
        let rel = Self::layer_rel(hash);
        if data.has(&rel) {
            refresh_ctime(&data, &rel);
            return Ok(false);
        }
        // The mode first, then the sync, so that the mode is as durable as the bytes.
        tmp.file
            .set_permissions(fs::Permissions::from_mode(LAYER_MODE))
            .and_then(|()| tmp.file.sync_all())
            .map_err(|e| io_err(&tmp.path, e))?;
        // Overwriting a layer that appeared meanwhile is harmless: same name, same bytes.
        let placed = self.place_in_prefix_dir(&data, hash, |xx| {
            place(
                tmp.dir.fd(),
                OsStr::new(&tmp.name),
                xx.fd(),
                OsStr::new(hash),
            )
        })?;
        let xx = match placed {
            Ok(xx) => xx,
            // A link loses to a layer placed meanwhile: same name, same bytes.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(&data.show(&rel), e)),
        };
        fsutil::sync_dir(xx.fd(), &xx.path)?;
        Ok(true)
    }

    /// Makes layer `hash` of `src` present in this repository: nothing to do if it is
    /// there, else a hard link (same filesystem, and allowed), else a sparse copy through
    /// `.tmp/` whose hash is checked before it is published.
    pub fn import_layer_from(&self, src: &Store, hash: &str) -> Result<LayerTransfer, Error> {
        if !is_hash(hash) {
            return Err(Error::BadHash(hash.to_string()));
        }
        if let Some(done) = self.link_layer_from(src, hash)? {
            return Ok(done);
        }
        // Never a copy of what a symlink in the source repository leads to.
        let from = src.layer_path(hash);
        let (file, _) = match src.open_layer(hash) {
            Ok(opened) => opened,
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound { path: from });
            }
            Err(e) => return Err(e),
        };
        let tmp = self.tmp_file()?;
        let actual = sparse_copy_hashing(&file, &from, tmp.file(), tmp.path())?;
        if actual != hash {
            return Err(Error::HashMismatch { path: from, actual });
        }
        self.add_layer(tmp, Some(hash))?;
        Ok(LayerTransfer::Copied)
    }

    /// Makes layer `hash` of `src` present here without copying data: `Present` if it is
    /// already here, `Linked` after a hard link; `None` when `src` lacks it or a link is
    /// impossible (another filesystem, `fs.protected_hardlinks` for a layer the caller
    /// does not own) or unsafe (a user other than the caller and root could change the
    /// layer, or its name in `src`).
    pub fn link_layer_from(&self, src: &Store, hash: &str) -> Result<Option<LayerTransfer>, Error> {
        if !is_hash(hash) {
            return Err(Error::BadHash(hash.to_string()));
        }
        let data = self.dir("data")?;
        let rel = Self::layer_rel(hash);
        if data.has(&rel) {
            refresh_ctime(&data, &rel);
            return Ok(Some(LayerTransfer::Present));
        }
        // Only a regular file is linked (link(2) would link a symlink itself), and only
        // one nobody else can change, under a name nobody else can change.
        let Ok(src_data) = src.dir("data") else {
            return Ok(None);
        };
        let Ok(src_xx) = src_data.subdir(&hash[..2]) else {
            return Ok(None);
        };
        let Ok((_, file_meta)) = src_xx.open_regular(hash) else {
            return Ok(None);
        };
        let acting = sys::Identity::of_thread().uid;
        let kept = [src_data.metadata(), src_xx.metadata()]
            .into_iter()
            .all(|m| m.is_ok_and(|m| only_writable_by(&m, acting)));
        if !kept || !only_writable_by(&file_meta, acting) {
            log::debug!(
                "not linking {}: another user could change it or its name",
                src.layer_path(hash).display()
            );
            return Ok(None);
        }
        let placed = self.place_in_prefix_dir(&data, hash, |xx| {
            sys::link_at(src_xx.fd(), OsStr::new(hash), xx.fd(), OsStr::new(hash))
        })?;
        match placed {
            Ok(xx) => {
                fsutil::sync_dir(xx.fd(), &xx.path)?;
                Ok(Some(LayerTransfer::Linked))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Some(LayerTransfer::Present)),
            Err(e) if fsutil::link_unsupported(&e) => {
                log::debug!("cannot link {} here ({e})", src.layer_path(hash).display());
                Ok(None)
            }
            Err(e) => Err(io_err(&data.show(&rel), e)),
        }
    }

    /// Runs `place` (a rename or link into `data/XX/`, given as a directory handle) after
    /// creating `data/XX/` if needed. gc removes a `data/XX/` it has emptied, possibly
    /// between the creation and the placing: the directory is then created again and
    /// `place` retried. The outer error is the directory's, the inner result `place`'s
    /// (with the directory it placed into).
    fn place_in_prefix_dir(
        &self,
        data: &Dir,
        hash: &str,
        place: impl Fn(&Dir) -> io::Result<()>,
    ) -> Result<io::Result<Dir>, Error> {
        let prefix = &hash[..2];
        let mut attempts = 0;
        loop {
            if data.make_dir(prefix)? {
                give_to_owner_of(data, prefix);
                fsutil::sync_dir(data.fd(), &data.path)?;
            }
            let xx = data.subdir(prefix)?;
            match place(&xx) {
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && attempts < PREFIX_DIR_ATTEMPTS
                        && !data.has(prefix) =>
                {
                    attempts += 1;
                }
                Err(e) => return Ok(Err(e)),
                Ok(()) => return Ok(Ok(xx)),
            }
        }
    }
}

/// Whether only `uid` (the identity a layer is shared for) or root can change the file
/// or directory `meta` describes: owned by one of them, writable by neither its group
/// nor others. A layer linked from another repository becomes part of this one: were
/// it, or the directories naming it, someone else's, that user could rewrite the
/// layer or put other bytes under its name.
fn only_writable_by(meta: &fs::Metadata, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    (meta.uid() == uid || meta.uid() == sys::ROOT_UID) && meta.mode() & 0o022 == 0
}

/// A `data/XX/` root has just made in a repository that is not root's becomes the
/// repository's (the owner and group of `data/`): the owner's own imports put their
/// layers there too, and could not in a directory of root's. Only the directory changes
/// hands (the layer root places in it stays root's), and `data/`'s owner could replace
/// it anyway. Best effort, through a descriptor of the directory itself (never a name
/// that could have become a symlink meanwhile).
fn give_to_owner_of(data: &Dir, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    if sys::Identity::of_thread().uid != sys::ROOT_UID {
        return;
    }
    let Ok(owner) = data.metadata() else {
        return;
    };
    if owner.uid() == sys::ROOT_UID {
        return;
    }
    let Ok(fd) = sys::open_beneath(
        data.fd(),
        Path::new(prefix),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    ) else {
        return;
    };
    // SAFETY: fchown(2) of a descriptor this function owns.
    if unsafe { libc::fchown(fd.as_raw_fd(), owner.uid(), owner.gid()) } != 0 {
        log::debug!(
            "cannot give {} to the repository's owner: {}",
            data.show(prefix).display(),
            io::Error::last_os_error()
        );
    }
}

/// Marks an existing layer as just used, so a gc running now does not take it for
/// unreferenced before the metadata that uses it again is published (gc keeps layers
/// whose ctime is within its grace period). Best effort: someone else's layer cannot be
/// chmod-ed, and then only the double scan of gc protects it.
fn refresh_ctime(data: &Dir, rel: &Path) {
    if let Ok((f, _)) = data.open_regular(rel) {
        let _ = f.set_permissions(fs::Permissions::from_mode(LAYER_MODE));
    }
}

/// Copies `src` (opened from `from`) into `to` data extent by data extent (SEEK_DATA/SEEK_HOLE), so holes
/// stay holes, and returns the sha256 of the whole content (holes as zeroes). The copy
/// is synced.
pub fn sparse_copy_hashing(
    src: &File,
    from: &Path,
    to: &File,
    to_path: &Path,
) -> Result<String, Error> {
    let size = src.metadata().map_err(|e| io_err(from, e))?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; IO_CHUNK];
    let zeros = vec![0u8; IO_CHUNK];
    let hash_zeros = |h: &mut Sha256, mut n: u64| {
        while n > 0 {
            let k = n.min(IO_CHUNK as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    let mut pos = 0u64;
    while pos < size {
        let (data, hole) = match next_extent(src, pos, size) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => return Err(io_err(from, e)),
        };
        hash_zeros(&mut h, data - pos);
        let mut off = data;
        while off < hole {
            let want = (hole - off).min(IO_CHUNK as u64) as usize;
            let n = src
                .read_at(&mut buf[..want], off)
                .map_err(|e| io_err(from, e))?;
            if n == 0 {
                // The file shrank under us: a layer never does, so this is corruption.
                return Err(io_err(
                    from,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "layer shrank while copied"),
                ));
            }
            to.write_all_at(&buf[..n], off)
                .map_err(|e| io_err(to_path, e))?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        pos = hole;
    }
    hash_zeros(&mut h, size - pos.min(size));
    to.set_len(size).map_err(|e| io_err(to_path, e))?;
    to.sync_all().map_err(|e| io_err(to_path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

/// The next data extent `[data, hole)` at or after `pos`, or `None` when only a hole is
/// left. Filesystems without SEEK_DATA report the whole rest as data.
fn next_extent(f: &File, pos: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    let seek = |off: u64, whence| crate::sys::lseek_data_hole(f.as_fd(), off, whence);
    let data = match seek(pos, libc::SEEK_DATA) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((pos, size))),
        Err(e) => return Err(e),
    };
    if data >= size {
        return Ok(None);
    }
    let hole = seek(data, libc::SEEK_HOLE)?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))?
        .min(size);
    Ok(Some((data, hole)))
}

/// `renameat` replacing what the target name holds.
fn rename_over(
    from_dir: BorrowedFd,
    from: &OsStr,
    to_dir: BorrowedFd,
    to: &OsStr,
) -> io::Result<()> {
    sys::rename_at(from_dir, from, to_dir, to, false)
}
