//! Layers: content-addressed files in `data/XX/<sha256>`, mode 0444. A layer is only
//! ever created complete: written under `.tmp/`, synced, then renamed into place; an
//! identical layer already present wins and the scratch file is removed, so `.tmp/` is
//! left empty (unlike pcocc, which leaves the duplicate behind). Across repositories a
//! layer is hard-linked when the filesystem and its policy allow, else copied extent by
//! extent (holes stay holes) and checked against its name.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::fsutil::{self, io_err};
use super::{Error, Store, is_hash};

/// Mode of a published layer (pcocc: `chmod 0444`).
const LAYER_MODE: u32 = 0o444;
/// Buffer for hashing and copying layers.
const IO_CHUNK: usize = 1 << 20;

/// A scratch file in a repository's `.tmp/`, removed when dropped unless it was turned
/// into a layer ([`Store::add_layer`]) or kept ([`TmpFile::keep`]).
#[derive(Debug)]
pub struct TmpFile {
    file: File,
    path: PathBuf,
    keep: bool,
}

impl TmpFile {
    /// The open file (read-write).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path under `.tmp/`.
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
            let _ = fs::remove_file(&self.path);
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
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
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
        let (file, path) = fsutil::create_scratch(&self.tmp_dir())?;
        Ok(TmpFile {
            file,
            path,
            keep: false,
        })
    }

    /// Publishes the complete file `tmp` (in this repository's `.tmp/`) as a layer and
    /// returns its hash: `hash` if the caller already knows it (hashed while writing),
    /// else computed here. The file is synced, made 0444 and renamed to
    /// `data/XX/<hash>`; if that layer already exists the scratch file is removed instead.
    pub fn add_layer(&self, tmp: &Path, hash: Option<&str>) -> Result<String, Error> {
        let hash = match hash {
            Some(h) if is_hash(h) => h.to_string(),
            Some(h) => return Err(Error::BadHash(h.to_string())),
            None => sha256_file(tmp)?,
        };
        let dest = self.layer_path(&hash);
        if fs::symlink_metadata(&dest).is_ok() {
            refresh_ctime(&dest);
            fs::remove_file(tmp).map_err(|e| io_err(tmp, e))?;
            return Ok(hash);
        }
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(tmp, e))?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(LAYER_MODE))
            .map_err(|e| io_err(tmp, e))?;
        self.ensure_prefix_dir(&dest)?;
        // Overwriting a layer that appeared meanwhile is harmless: same name, same bytes.
        fs::rename(tmp, &dest).map_err(|e| io_err(&dest, e))?;
        fsutil::sync_dir(dest.parent().unwrap_or(&self.data_dir()))?;
        Ok(hash)
    }

    /// Makes layer `hash` of `src` present in this repository: nothing to do if it is
    /// there, else a hard link (same filesystem, and allowed), else a sparse copy through
    /// `.tmp/` whose hash is checked before it is published.
    pub fn import_layer_from(&self, src: &Store, hash: &str) -> Result<LayerTransfer, Error> {
        if !is_hash(hash) {
            return Err(Error::BadHash(hash.to_string()));
        }
        let from = src.layer_path(hash);
        if fs::symlink_metadata(&from).is_err() && !self.has_layer(hash) {
            return Err(Error::NotFound { path: from });
        }
        if let Some(done) = self.link_layer_from(src, hash)? {
            return Ok(done);
        }
        let tmp = self.tmp_file()?;
        let actual = sparse_copy_hashing(&from, tmp.file(), tmp.path())?;
        if actual != hash {
            return Err(Error::HashMismatch { path: from, actual });
        }
        self.add_layer(tmp.path(), Some(hash))?;
        Ok(LayerTransfer::Copied)
    }

    /// Makes layer `hash` of `src` present here without copying data: `Present` if it is
    /// already here, `Linked` after a hard link; `None` when `src` lacks it or a link is
    /// impossible (another filesystem, `fs.protected_hardlinks`).
    pub fn link_layer_from(&self, src: &Store, hash: &str) -> Result<Option<LayerTransfer>, Error> {
        if !is_hash(hash) {
            return Err(Error::BadHash(hash.to_string()));
        }
        let dest = self.layer_path(hash);
        if fs::symlink_metadata(&dest).is_ok() {
            refresh_ctime(&dest);
            return Ok(Some(LayerTransfer::Present));
        }
        let from = src.layer_path(hash);
        if fs::symlink_metadata(&from).is_err() {
            return Ok(None);
        }
        self.ensure_prefix_dir(&dest)?;
        match fs::hard_link(&from, &dest) {
            Ok(()) => {
                fsutil::sync_dir(dest.parent().unwrap_or(&self.data_dir()))?;
                Ok(Some(LayerTransfer::Linked))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Some(LayerTransfer::Present)),
            Err(e) if fsutil::link_unsupported(&e) => {
                log::debug!("cannot link {} here ({e})", from.display());
                Ok(None)
            }
            Err(e) => Err(io_err(&dest, e)),
        }
    }

    /// Creates `data/XX/` for `dest` if needed, syncing `data/` when it did.
    fn ensure_prefix_dir(&self, dest: &Path) -> Result<(), Error> {
        let Some(dir) = dest.parent() else {
            return Ok(());
        };
        match fs::create_dir(dir) {
            Ok(()) => fsutil::sync_dir(&self.data_dir()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err(dir, e)),
        }
    }
}

/// Marks an existing layer as just used, so a gc running now does not take it for
/// unreferenced before the metadata that uses it again is published (gc keeps layers
/// whose ctime is within its grace period). Best effort: someone else's layer cannot be
/// chmod-ed, and then only the double scan of gc protects it.
fn refresh_ctime(layer: &Path) {
    let _ = fs::set_permissions(layer, fs::Permissions::from_mode(LAYER_MODE));
}

/// Copies `from` into `to` data extent by data extent (SEEK_DATA/SEEK_HOLE), so holes
/// stay holes, and returns the sha256 of the whole content (holes as zeroes). The copy
/// is synced.
pub fn sparse_copy_hashing(from: &Path, to: &File, to_path: &Path) -> Result<String, Error> {
    let src = File::open(from).map_err(|e| io_err(from, e))?;
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
        let (data, hole) = match next_extent(&src, pos, size) {
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
    let fd = f.as_raw_fd();
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let data = match seek(pos, libc::SEEK_DATA) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((pos, size))),
        Err(e) => return Err(e),
    };
    if data >= size {
        return Ok(None);
    }
    let hole = seek(data, libc::SEEK_HOLE)?.min(size);
    Ok(Some((data, hole)))
}
