//! Filesystem steps the store's safety rests on: exclusive publication by `link(2)`,
//! scratch files in `.tmp/`, and directory syncs. Kept apart so each rule is written
//! once.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::Error;

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
        Some(code) => {
            // SAFETY: strerror returns a pointer to a static or thread-local string.
            let msg = unsafe { std::ffi::CStr::from_ptr(libc::strerror(code)) };
            format!(
                "[Errno {code}] {}: '{}'",
                msg.to_string_lossy(),
                path.display()
            )
        }
        None => format!("{e}: '{}'", path.display()),
    }
}

/// fsync of a directory, so that entries created, renamed or removed in it are durable.
/// The status-change time of `m` (the moment a file was last created, renamed, linked or
/// chmod'ed), as a `SystemTime`.
pub fn ctime(m: &fs::Metadata) -> std::time::SystemTime {
    let secs = m.ctime().max(0) as u64;
    let nanos = m.ctime_nsec().clamp(0, 999_999_999) as u32;
    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos)
}

pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
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

/// Creates a new empty file in `dir` with O_EXCL under a fresh name and mode `mode`.
pub fn create_tmp(dir: &Path, mode: u32) -> Result<(File, PathBuf), Error> {
    let mut last = None;
    for _ in 0..TMP_NAME_ATTEMPTS {
        let path = dir.join(tmp_name());
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err(&path, e)),
        }
    }
    Err(io_err(
        dir,
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EEXIST)),
    ))
}

pub fn create_scratch(dir: &Path) -> Result<(File, PathBuf), Error> {
    create_tmp(dir, TMP_MODE)
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `renameat2(from, to, RENAME_NOREPLACE)`: an atomic rename that fails if `to` exists.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: both are valid NUL-terminated paths for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True for link(2) errors that mean "this filesystem or policy does not allow a hard
/// link here", as opposed to a real failure: try another way.
pub fn link_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EXDEV | libc::EMLINK | libc::ENOTSUP | libc::ENOSYS)
    )
}

/// Writes `bytes` to `dest` so that `dest` appears complete or not at all and is never
/// replaced: a scratch file in `tmp_dir` (same filesystem) is written and synced, then
/// linked to `dest` (falling back to `renameat2(RENAME_NOREPLACE)`, then to an O_EXCL
/// create, where the filesystem refuses hard links); the directory is synced.
pub fn publish_exclusive(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), Error> {
    let exists = || Error::AlreadyExists {
        path: dest.to_path_buf(),
    };
    let (mut f, tmp) = create_tmp(tmp_dir, META_MODE)?;
    let result = (|| {
        f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        match fs::hard_link(&tmp, dest) {
            Ok(()) => Ok(()),
            // Over NFS a retransmitted LINK can fail although the first one worked: the
            // scratch file's link count tells (the recipe of open(2)'s O_EXCL notes).
            Err(_) if fs::metadata(&tmp).is_ok_and(|m| m.nlink() == 2) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) if link_unsupported(&e) => match rename_noreplace(&tmp, dest) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                    write_excl(dest, bytes)
                }
                Err(e) => Err(io_err(dest, e)),
            },
            Err(e) => Err(io_err(dest, e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Last resort where neither links nor RENAME_NOREPLACE exist: an O_EXCL create of
/// `dest` itself. Never overwrites, but a reader may briefly see it partly written.
fn write_excl(dest: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(META_MODE)
        .open(dest)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::AlreadyExists {
                path: dest.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err(dest, e)),
    };
    let done = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = done {
        let _ = fs::remove_file(dest);
        return Err(io_err(dest, e));
    }
    Ok(())
}

/// Reads a whole small file, refusing one larger than `max` bytes before allocating for
/// it (metadata and configuration files are untrusted input), and refusing a symlink:
/// whoever may write to a repository could otherwise make a root daemon read any file.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_bounded_with_metadata(path, max).map(|(_, bytes)| bytes)
}

/// [`read_bounded`], with the metadata of the file read (from the open descriptor, so it
/// is the file whose bytes these are, even if the name is replaced meanwhile).
pub fn read_bounded_with_metadata(path: &Path, max: u64) -> io::Result<(fs::Metadata, Vec<u8>)> {
    use std::io::Read;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let m = f.metadata()?;
    let len = m.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is {len} bytes, more than the {max} allowed"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against a file growing between the size check and the read.
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file grew beyond the {max} bytes allowed"),
        ));
    }
    Ok((m, buf))
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_string(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
