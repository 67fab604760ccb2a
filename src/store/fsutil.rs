//! Filesystem steps the store's safety rests on: exclusive publication by `link(2)`,
//! scratch files in `.tmp/`, and directory syncs. Kept apart so each rule is written
//! once.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::Error;
use crate::sys;

/// Mode of metadata and `.config` files before the umask (pcocc: 0644 under umask 022).
const META_MODE: u32 = 0o644;
/// Mode of scratch files (pcocc's `mkstemp`: 0600).
const TMP_MODE: u32 = 0o600;
/// Attempts at finding an unused scratch name before giving up.
const TMP_NAME_ATTEMPTS: u32 = 64;

pub fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An OS error as Python prints it: `[Errno 2] No such file or directory: 'PATH'`.
pub fn py_os_error(e: &io::Error, path: &Path) -> String {
    match e.raw_os_error() {
        Some(code) => format!(
            "[Errno {code}] {}: '{}'",
            crate::sys::strerror(code),
            path.display()
        ),
        None => format!("{e}: '{}'", path.display()),
    }
}

/// The status-change time of `m` (the moment a file was last created, renamed, linked or
/// chmod'ed), as a `SystemTime`.
pub fn ctime(m: &fs::Metadata) -> std::time::SystemTime {
    let secs = m.ctime().max(0) as u64;
    let nanos = m.ctime_nsec().clamp(0, 999_999_999) as u32;
    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos)
}

/// fsync of directory `dir` (a descriptor of it), so that entries created, renamed or
/// removed in it are durable; `path` names it in errors.
pub fn sync_dir(dir: BorrowedFd<'_>, path: &Path) -> Result<(), Error> {
    sys::sync_dir(dir).map_err(|e| io_err(path, e))
}

/// A fresh name `tmpXXXXXXXX` (pcocc's mkstemp style), unique within this process and
/// very likely across processes and hosts; callers still create it with O_EXCL.
fn tmp_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";
    let mut name = String::from("tmp");
    for _ in 0..8 {
        // xorshift64: cheap mixing, uniqueness is enforced by O_EXCL anyway.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        name.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
    }
    name
}

/// A directory of a repository, held open: the descriptor every name in it is resolved
/// from, and its path for messages.
#[derive(Debug)]
pub struct Dir {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

impl Dir {
    /// The descriptor, to pass to `*at` calls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path of `name` inside this directory, for messages.
    pub fn show(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// The directory `rel` below this one (no symlink on the way), as a handle.
    pub fn subdir(&self, rel: impl AsRef<Path>) -> Result<Dir, Error> {
        let rel = rel.as_ref();
        let path = self.path.join(rel);
        let fd = sys::open_beneath(self.fd(), rel, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| io_err(&path, e))?;
        Ok(Dir { fd, path })
    }

    /// The metadata of this directory itself (`fstat` of its handle).
    pub fn metadata(&self) -> io::Result<fs::Metadata> {
        File::from(self.fd.try_clone()?).metadata()
    }

    /// Opens `rel` below this directory read-only and checks it is a regular file
    /// (`O_NONBLOCK`, so a FIFO placed there cannot block the open).
    pub fn open_regular(&self, rel: impl AsRef<Path>) -> Result<(File, fs::Metadata), Error> {
        let rel = rel.as_ref();
        let path = self.path.join(rel);
        let fd = sys::open_beneath(self.fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .map_err(|e| io_err(&path, e))?;
        let file = File::from(fd);
        let m = file.metadata().map_err(|e| io_err(&path, e))?;
        if !m.is_file() {
            return Err(io_err(
                &path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        Ok((file, m))
    }

    /// Whether `rel` exists below this directory (as anything, a symlink included).
    pub fn has(&self, rel: impl AsRef<Path>) -> bool {
        match sys::open_beneath(self.fd(), rel.as_ref(), libc::O_PATH, 0) {
            Ok(_) => true,
            Err(e) => e.raw_os_error() == Some(libc::ELOOP),
        }
    }

    /// The metadata of `rel` below this directory, not following a final symlink (a
    /// symlink anywhere on the way is an error).
    pub fn stat(&self, rel: impl AsRef<Path>) -> io::Result<fs::Metadata> {
        let fd = sys::open_beneath(self.fd(), rel.as_ref(), libc::O_PATH, 0)?;
        File::from(fd).metadata()
    }

    /// Removes `name` here and, if it is a directory, everything below it, never
    /// following a symlink.
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        match sys::unlink_at(self.fd(), name, false) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR | libc::EPERM)) => {}
            other => return other,
        }
        let sub = self
            .subdir(Path::new(name))
            .map_err(|e| io::Error::other(e.to_string()))?;
        for (entry, _) in sys::read_dir(sub.fd())? {
            sub.remove_tree(&entry)?;
        }
        sys::unlink_at(self.fd(), name, true)
    }

    /// Creates the directory `name` here unless it exists; true when it was created.
    pub fn make_dir(&self, name: &str) -> Result<bool, Error> {
        match sys::mkdir_at(self.fd(), OsStr::new(name), DIR_MODE) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err(&self.show(name), e)),
        }
    }

    /// Removes the file `name` here.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        sys::unlink_at(self.fd(), OsStr::new(name), false)
    }
}

/// Mode of directories the store creates, before the umask.
pub const DIR_MODE: u32 = 0o777;

/// A new empty file in `dir`, created with O_EXCL under a fresh name and mode `mode`.
pub fn create_tmp(dir: &Dir, mode: u32) -> Result<(File, String), Error> {
    let mut last = None;
    for _ in 0..TMP_NAME_ATTEMPTS {
        let name = tmp_name();
        match sys::open_beneath(
            dir.fd(),
            Path::new(&name),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            mode,
        ) {
            Ok(fd) => return Ok((File::from(fd), name)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err(&dir.show(&name), e)),
        }
    }
    Err(io_err(
        &dir.path,
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EEXIST)),
    ))
}

pub fn create_scratch(dir: &Dir) -> Result<(File, String), Error> {
    create_tmp(dir, TMP_MODE)
}

/// True for link(2) errors that mean "this filesystem or policy does not allow a hard
/// link here", as opposed to a real failure: try another way.
pub fn link_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EXDEV | libc::EMLINK | libc::ENOTSUP | libc::ENOSYS)
    )
}

/// Writes `bytes` to `name` in `dest` so that it appears complete or not at all and is
/// never replaced: a scratch file in `tmp` (same filesystem) is written and synced, then
/// linked to `name` (falling back to `renameat2(RENAME_NOREPLACE)`, then to an O_EXCL
/// create, where the filesystem refuses hard links); the directory is synced.
pub fn publish_exclusive(tmp: &Dir, dest: &Dir, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let dest_path = dest.show(name);
    let exists = || Error::AlreadyExists {
        path: dest_path.clone(),
    };
    let (mut f, tmp_name) = create_tmp(tmp, META_MODE)?;
    let tmp_path = tmp.show(&tmp_name);
    let (from, to) = (OsStr::new(&tmp_name), OsStr::new(name));
    let result = (|| {
        f.write_all(bytes).map_err(|e| io_err(&tmp_path, e))?;
        f.sync_all().map_err(|e| io_err(&tmp_path, e))?;
        match sys::link_at(tmp.fd(), from, dest.fd(), to) {
            Ok(()) => Ok(()),
            // Over NFS a retransmitted LINK can fail although the first one worked: the
            // scratch file's link count tells (the recipe of open(2)'s O_EXCL notes).
            Err(_) if f.metadata().is_ok_and(|m| m.nlink() == 2) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) if link_unsupported(&e) => {
                match sys::rename_at(tmp.fd(), from, dest.fd(), to, true) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                        write_excl(dest, name, bytes)
                    }
                    Err(e) => Err(io_err(&dest_path, e)),
                }
            }
            Err(e) => Err(io_err(&dest_path, e)),
        }
    })();
    let _ = tmp.remove(&tmp_name);
    result?;
    sync_dir(dest.fd(), &dest.path)
}

/// Last resort where neither links nor RENAME_NOREPLACE exist: an O_EXCL create of
/// `name` itself. Never overwrites, but a reader may briefly see it partly written.
fn write_excl(dest: &Dir, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let path = dest.show(name);
    let fd = match sys::open_beneath(
        dest.fd(),
        Path::new(name),
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        META_MODE,
    ) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::AlreadyExists { path });
        }
        Err(e) => return Err(io_err(&path, e)),
    };
    let mut f = File::from(fd);
    let done = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = done {
        let _ = dest.remove(name);
        return Err(io_err(&path, e));
    }
    Ok(())
}

/// Reads the whole of `file` (a small file: metadata or configuration), refusing one
/// larger than `max` bytes before allocating for it, since such files are untrusted
/// input; `m` is its metadata.
pub fn read_bounded_file(file: File, m: &fs::Metadata, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let len = m.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is {len} bytes, more than the {max} allowed"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against a file growing between the size check and the read.
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file grew beyond the {max} bytes allowed"),
        ));
    }
    Ok(buf)
}
