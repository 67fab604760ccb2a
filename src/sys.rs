//! The system calls the repository code rests on, each behind a safe wrapper with the
//! reason it is sound, so the unsafe surface can be reviewed in one place.
//!
//! Two families matter for safety (DESIGN §9):
//!
//! * **Acting as the caller.** A root daemon serving every user runs each request, on
//!   its own thread, with the caller's filesystem uid, gid and supplementary groups, so
//!   that the kernel judges every access at the moment of use (mode bits, ACLs, the
//!   sticky bit, set-group-ID directories, quotas, `protected_hardlinks`), and what the
//!   caller creates is theirs. Credentials are per thread in the kernel; glibc's
//!   `setgroups()` and `setuid()` broadcast to every thread of the process, so the raw
//!   system calls are used here. [`ActingAs`] restores the previous identity when
//!   dropped, whatever happened meanwhile.
//! * **Paths confined to a directory.** Inside a repository nothing is reached by a full
//!   path: every file is opened from a directory descriptor with `openat2(…,
//!   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` (or, on kernels
//!   without `openat2`, one `O_NOFOLLOW` open per component), and every change is an
//!   `*at` call on such descriptors. A symlink or a swapped directory placed by whoever
//!   may write to a repository then fails the call instead of redirecting it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

/// The superuser's uid.
const ROOT_UID: u32 = 0;
/// Most supplementary groups a process can have (Linux's NGROUPS_MAX).
const MAX_GROUPS: usize = 65536;
/// An id no user or group has: `setfsuid(-1)` and `setfsgid(-1)` change nothing and
/// return the current value (setfsuid(2)).
const QUERY_ID: u32 = u32::MAX;

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_fd(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------
// Identity

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid only reads the process credentials.
    unsafe { libc::geteuid() }
}

/// The effective gid of this process.
pub fn egid() -> u32 {
    // SAFETY: getegid only reads the process credentials.
    unsafe { libc::getegid() }
}

/// The supplementary groups of the calling thread (the raw system call reads the
/// thread's own credentials).
pub fn thread_groups() -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        // SAFETY: the kernel writes at most `groups.len()` ids into the buffer.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getgroups,
                groups.len() as libc::c_int,
                groups.as_mut_ptr(),
            )
        };
        if n >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            || groups.len() >= MAX_GROUPS
        {
            return Vec::new();
        }
        groups.resize(groups.len() * 4, 0);
    }
}

/// The filesystem identity of the calling thread: fsuid, fsgid and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Identity {
    /// The calling thread's current filesystem identity.
    pub fn of_thread() -> Identity {
        // SAFETY: with an invalid id, setfsuid/setfsgid change nothing and return the
        // current value.
        let (uid, gid) = unsafe {
            (
                libc::syscall(libc::SYS_setfsuid, QUERY_ID) as u32,
                libc::syscall(libc::SYS_setfsgid, QUERY_ID) as u32,
            )
        };
        Identity {
            uid,
            gid,
            groups: thread_groups(),
        }
    }

    /// Makes the calling thread act as this identity until the guard is dropped (see
    /// [`ActingAs`]). A no-op in a process that is not root (it can only act as itself)
    /// and for the identity the thread already has.
    pub fn assume(&self) -> io::Result<ActingAs> {
        if euid() != ROOT_UID {
            return Ok(ActingAs { previous: None });
        }
        let previous = Identity::of_thread();
        if previous == *self {
            return Ok(ActingAs { previous: None });
        }
        let guard = ActingAs {
            previous: Some(previous),
        };
        // On any failure the guard, dropped with the error, restores what was set.
        set_thread_identity(self)?;
        Ok(guard)
    }
}

/// Sets the calling thread's groups, fsgid and fsuid, in the order that keeps the
/// privilege to set the next one.
fn set_thread_identity(id: &Identity) -> io::Result<()> {
    // SAFETY: the raw setgroups reads `groups.len()` ids from the slice and changes the
    // calling thread's credentials only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            id.groups.len() as libc::size_t,
            id.groups.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setfsgid/setfsuid change the calling thread's credentials only; they
    // report failure only by leaving the value unchanged, checked below.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, id.gid);
        libc::syscall(libc::SYS_setfsuid, id.uid);
    }
    let now = Identity::of_thread();
    if now.uid != id.uid || now.gid != id.gid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "cannot act as uid {} gid {} (the thread is uid {} gid {})",
                id.uid, id.gid, now.uid, now.gid
            ),
        ));
    }
    Ok(())
}

/// While alive, the calling thread acts as another identity; dropping it restores the
/// identity the thread had before (nested guards unwind in order). Not `Send`: it
/// belongs to the thread whose credentials it changed.
#[must_use = "the identity is restored when the guard is dropped"]
pub struct ActingAs {
    previous: Option<Identity>,
}

impl ActingAs {
    /// A guard that changes nothing.
    pub fn unchanged() -> ActingAs {
        ActingAs { previous: None }
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            // The uid first: back to root, the thread regains the capabilities it needs
            // to set the rest.
            // SAFETY: as in `set_thread_identity`.
            unsafe {
                libc::syscall(libc::SYS_setfsuid, previous.uid);
            }
            if let Err(e) = set_thread_identity(previous) {
                // A thread that cannot get its identity back must not serve anyone.
                log::error!("cannot restore the thread's identity: {e}; aborting");
                std::process::abort();
            }
        }
    }
}

impl std::fmt::Debug for ActingAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActingAs")
            .field("changed", &self.previous.is_some())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Confined paths

/// Set once `openat2` was found missing (Linux before 5.6): then components are opened
/// one by one with `O_NOFOLLOW`.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `path`, relative to the directory `dir`, without following any symlink and
/// without leaving `dir` (no `..`, no absolute path, no magic link). `flags` are
/// `open(2)` flags (`O_CLOEXEC` is added); `mode` is used with `O_CREAT`.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CLOEXEC;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let c = cstring(path.as_os_str())?;
        // SAFETY: open_how is plain data; zeroed is a valid value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = flags as u64;
        how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode)
        } else {
            0
        };
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: `c` is a NUL-terminated path and `how` a valid open_how of the size
        // passed, both alive for the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        match check_fd(fd) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    open_by_components(dir, path, flags, mode)
}

/// [`open_beneath`] without `openat2`: every directory on the way is opened with
/// `O_NOFOLLOW | O_DIRECTORY`, the last component with `O_NOFOLLOW`.
fn open_by_components(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            // RESOLVE_BENEATH's answer to an escape.
            _ => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
        }
    }
    let Some((last, dirs)) = names.split_last() else {
        return openat(dir, OsStr::new("."), flags, mode);
    };
    let mut held: Option<OwnedFd> = None;
    for name in dirs {
        let at = held.as_ref().map_or(dir, |d| d.as_fd());
        let next = openat(
            at,
            name,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        )?;
        held = Some(next);
    }
    let at = held.as_ref().map_or(dir, |d| d.as_fd());
    openat(at, last, flags | libc::O_NOFOLLOW, mode)
}

fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    // SAFETY: `c` is NUL-terminated and alive for the call; `dir` is an open descriptor.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
    check_fd(fd as libc::c_long)
}

/// A directory opened by its full path (following symlinks, as configured paths may),
/// as an `O_PATH` handle to resolve names from.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str())?;
    // SAFETY: `c` is NUL-terminated and alive for the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check_fd(fd as libc::c_long)
}

/// `unlinkat(dir, name)`: removes a file, or an empty directory when `directory`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, directory: bool) -> io::Result<()> {
    let c = cstring(name)?;
    let flags = if directory { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `c` is NUL-terminated and alive for the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })
}

/// `renameat2(from_dir, from, to_dir, to)`, with `RENAME_NOREPLACE` when `noreplace`.
pub fn rename_at(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
    noreplace: bool,
) -> io::Result<()> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
    // SAFETY: both names are NUL-terminated and alive for the call.
    check(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            flags,
        )
    })
}

/// `linkat(from_dir, from, to_dir, to, 0)`: a hard link, never following a symlink.
pub fn link_at(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    // SAFETY: both names are NUL-terminated and alive for the call.
    check(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            0,
        )
    })
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: `c` is NUL-terminated and alive for the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })
}

/// Whether the calling thread's identity may access `name` in `dir` for `mode`
/// (`libc::R_OK`, `W_OK`, `X_OK`), as the kernel judges it (ACLs included), without
/// following a final symlink. `name` `.` asks about `dir` itself.
pub fn access_at(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::c_int) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: `c` is NUL-terminated and alive for the call. AT_EACCESS makes the kernel
    // judge with the thread's filesystem identity rather than the real uid.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            mode,
            libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// [`access_at`] for a full path (following symlinks, as path resolution does).
pub fn access_path(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let c = cstring(path.as_os_str())?;
    // SAFETY: as in `access_at`; AT_FDCWD makes the path absolute or cwd-relative.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            mode,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a directory entry is, from `readdir`'s `d_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    File,
    Directory,
    Symlink,
    /// A FIFO, socket or device.
    Other,
    /// The filesystem does not say (`DT_UNKNOWN`): ask `fstatat`.
    Unknown,
}

/// The entries of directory `dir` (without `.` and `..`), with their types.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(OsString, EntryType)>> {
    let fd = openat(
        dir,
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    let raw = fd.as_raw_fd();
    // SAFETY: fdopendir takes ownership of a valid directory descriptor; on success it
    // is closed by closedir below, so it is released from `fd` first.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    let result = loop {
        // readdir reports errors only through errno, which must be cleared first.
        // SAFETY: __errno_location points at this thread's errno.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid open directory stream until closedir.
        let entry = unsafe { libc::readdir64(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: a non-null entry is valid until the next readdir on this stream;
        // d_name is NUL-terminated.
        let (name, kind) = unsafe {
            let e = &*entry;
            (CStr::from_ptr(e.d_name.as_ptr()).to_bytes(), e.d_type)
        };
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match kind {
            libc::DT_REG => EntryType::File,
            libc::DT_DIR => EntryType::Directory,
            libc::DT_LNK => EntryType::Symlink,
            libc::DT_UNKNOWN => EntryType::Unknown,
            _ => EntryType::Other,
        };
        out.push((OsString::from_vec(name.to_vec()), kind));
    };
    // SAFETY: `stream` came from fdopendir and is closed exactly once.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

/// fsync of directory `dir`, so that entries created, renamed or removed in it are
/// durable. A directory the caller may search but not read cannot be opened for that;
/// its changes are then left to the filesystem's own commit.
pub fn sync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    match openat(
        dir,
        OsStr::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    ) {
        Ok(fd) => File::from(fd).sync_all(),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir_fd(p: &Path) -> OwnedFd {
        open_dir_path(p).unwrap()
    }

    #[test]
    fn open_beneath_refuses_symlinks_and_escapes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), b"x").unwrap();
        std::fs::write(t.path().join("outside"), b"secret").unwrap();
        symlink(t.path().join("outside"), t.path().join("d/link")).unwrap();
        symlink("d", t.path().join("dlink")).unwrap();
        let root = dir_fd(t.path());
        let open = |p: &str| open_beneath(root.as_fd(), Path::new(p), libc::O_RDONLY, 0);
        assert!(open("d/f").is_ok());
        for bad in [
            "d/link",
            "dlink/f",
            "../outside",
            "/etc/passwd",
            "d/../../x",
        ] {
            assert!(open(bad).is_err(), "{bad} must be refused");
        }
        // The fallback walk refuses the same.
        let walk = |p: &str| open_by_components(root.as_fd(), Path::new(p), libc::O_RDONLY, 0);
        assert!(walk("d/f").is_ok());
        for bad in ["d/link", "dlink/f", "../outside", "/etc/passwd"] {
            assert!(walk(bad).is_err(), "{bad} must be refused by the walk");
        }
    }

    #[test]
    fn read_dir_lists_names_with_their_types() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), b"").unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        symlink("f", t.path().join("l")).unwrap();
        let root = dir_fd(t.path());
        let mut got = read_dir(root.as_fd()).unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want = [
            ("d", EntryType::Directory),
            ("f", EntryType::File),
            ("l", EntryType::Symlink),
        ];
        assert_eq!(got.len(), 3);
        for ((name, kind), (wn, wk)) in got.iter().zip(want) {
            assert_eq!(name, wn);
            // tmpfs and ext4 fill d_type; a filesystem that does not says Unknown.
            assert!(*kind == wk || *kind == EntryType::Unknown);
        }
    }

    #[test]
    fn acting_as_another_user_is_per_thread_and_restored() {
        if euid() != ROOT_UID {
            eprintln!("SKIPPED: acting as another user needs root");
            return;
        }
        let before = Identity::of_thread();
        let nobody = Identity {
            uid: 65534,
            gid: 65534,
            groups: vec![4242],
        };
        let t = tempfile::tempdir().unwrap();
        let root_only = t.path().join("root-only");
        std::fs::write(&root_only, b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A thread started before (a thread inherits the identity of its creator).
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let path = root_only.clone();
        let other = std::thread::spawn(move || {
            wait.recv().unwrap();
            std::fs::read(&path).is_ok()
        });
        {
            let _as = nobody.assume().unwrap();
            assert_eq!(Identity::of_thread(), nobody);
            // The kernel now judges as nobody: root's file is out of reach.
            let e = std::fs::read(&root_only).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EACCES));
            // Another thread of the process is still root.
            go.send(()).unwrap();
            assert!(other.join().unwrap());
        }
        assert_eq!(Identity::of_thread(), before);
        assert!(std::fs::read(t.path().join("root-only")).is_ok());
    }
}
