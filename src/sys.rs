//! Every libc call of the crate, each behind a safe wrapper with the reason it is
//! sound, so the unsafe surface can be reviewed in one place: the rest of the crate
//! uses libc only for its constants and types.
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
//!
//! The others are plain: file hints and holes, buffers in their own mappings, the daemon's
//! process plumbing (fork, signals, unmount), passwd look-ups, `strerror` and `localtime_r`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The superuser's uid.
pub const ROOT_UID: u32 = 0;
/// Most supplementary groups a process can have (Linux's NGROUPS_MAX).
const MAX_GROUPS: usize = 65536;
/// Buffer for getpw*_r; glibc suggests sysconf(_SC_GETPW_R_SIZE_MAX), typically 1024.
const PW_BUF: usize = 16384;
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

/// The real uid of this process.
pub fn uid() -> u32 {
    // SAFETY: getuid only reads the process credentials.
    unsafe { libc::getuid() }
}

/// The supplementary groups of this process, as glibc's `getgroups` reports them.
pub fn process_groups() -> Vec<u32> {
    let mut groups: Vec<libc::gid_t> = Vec::new();
    // SAFETY: a zero-sized query returns the count and writes nothing.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n > 0 {
        groups.resize(n as usize, 0);
        // SAFETY: getgroups fills at most `n` entries of a buffer that has exactly `n`.
        let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
        groups.truncate(got.max(0) as usize);
    }
    groups
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

// ---------------------------------------------------------------------------------------
// Files

/// `lseek(fd, offset, whence)` with `SEEK_DATA` or `SEEK_HOLE`: the offset of the next
/// data or hole at or after `offset`, `None` when the kernel answers ENXIO (no data
/// after `offset`, or `offset` at or past the end). Filesystems without the query fail
/// with EINVAL, as does an `offset` beyond `off_t`.
pub fn lseek_data_hole(
    fd: BorrowedFd<'_>,
    offset: u64,
    whence: libc::c_int,
) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on an open descriptor touches no memory; it only moves the file
    // position, which every user of these queries leaves unused (their reads are
    // positioned).
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// `posix_fadvise(WILLNEED)` of `len` bytes at `offset` of `fd` (`len` 0: to the end):
/// the kernel queues the reads and returns without waiting for them.
pub fn fadvise_willneed(
    fd: BorrowedFd<'_>,
    offset: libc::off_t,
    len: libc::off_t,
) -> io::Result<()> {
    // SAFETY: advice on an open descriptor; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(fd.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
    // posix_fadvise returns the error number instead of setting errno.
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The machine's memory in bytes (`sysinfo`), or `None` when it cannot be had.
pub fn total_memory() -> Option<u64> {
    // SAFETY: sysinfo fills the zeroed struct it is given; nothing else is touched.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a struct of the right type.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    // `c_ulong`: 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    u64::from(info.totalram).checked_mul(u64::from(info.mem_unit))
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: frees the blocks of `len` bytes at `offset` of
/// `fd`, which then read as zeroes; the file keeps its size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: libc::off_t, len: libc::off_t) -> io::Result<()> {
    // SAFETY: fallocate on an open descriptor; no memory is touched.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    })
}

/// `sync_file_range(fd, offset, len, flags)` (`libc::SYNC_FILE_RANGE_*` flags).
pub fn sync_file_range(
    fd: BorrowedFd<'_>,
    offset: libc::off64_t,
    len: libc::off64_t,
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: sync_file_range on an open descriptor; no memory is touched.
    check(unsafe { libc::sync_file_range(fd.as_raw_fd(), offset, len, flags) })
}

/// Whether `path` (followed if a symlink) carries a POSIX access ACL, whose named
/// entries may refuse users its mode bits let in. `true` when that cannot be told.
pub fn has_access_acl(path: &Path) -> bool {
    let Ok(c) = cstring(path.as_os_str()) else {
        return true;
    };
    // SAFETY: both strings are NUL-terminated and live across the call; a null buffer
    // of size 0 only asks for the value's size (getxattr(2)).
    let rc = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc >= 0 {
        return true;
    }
    let e = io::Error::last_os_error().raw_os_error();
    !matches!(e, Some(libc::ENODATA | libc::EOPNOTSUPP))
}

/// `statvfs(path)`: the size and use of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = cstring(path.as_os_str())?;
    // SAFETY: statvfs is plain data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and alive for the call; statvfs writes only `st`.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st)
}

// ---------------------------------------------------------------------------------------
// Memory

/// A zero-filled byte buffer in its own anonymous private mapping, unmapped when dropped.
///
/// For large buffers that live for one operation (the import converter's): their pages
/// go back to the system the moment the buffer is dropped, whichever thread allocated
/// it. A `Vec` of the same size comes from the allocating thread's malloc arena, and
/// glibc keeps freed chunks there once its mmap threshold has risen past their size (it
/// rises with every large free): every request thread that ever ran an import would keep
/// its buffers' worth of memory resident for the life of the daemon. Pages are only
/// faulted in when touched, so a small operation costs little of a large buffer.
pub struct MappedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (nothing else holds its address), so
// moving it to another thread or sharing `&MappedBuf` is no different from a `Vec<u8>`.
unsafe impl Send for MappedBuf {}
// SAFETY: as above; `&MappedBuf` only gives shared, read-only access to the bytes.
unsafe impl Sync for MappedBuf {}

impl MappedBuf {
    /// A new mapping of `len` zero bytes (`len` > 0).
    pub fn new(len: usize) -> io::Result<MappedBuf> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: an anonymous private mapping at an address of the kernel's choice
        // touches no existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(MappedBuf { ptr, len })
    }

    /// A mapping of at least `len` zero bytes (rounded up to whole 2 MiB huge pages)
    /// at a 2 MiB boundary, which the kernel is asked to back with transparent huge
    /// pages: a buffer written to the kernel again and again (`writev` to the FUSE
    /// device) is then pinned a huge page at a time instead of 4 KiB at a time. Without
    /// huge pages it is an ordinary mapping.
    pub fn huge(len: usize) -> io::Result<MappedBuf> {
        const HUGE: usize = 2 << 20;
        let span = len.max(1).next_multiple_of(HUGE);
        let whole = MappedBuf::new(span + HUGE)?;
        let start = whole.ptr.as_ptr() as usize;
        let aligned = start.next_multiple_of(HUGE);
        let (head, tail) = (aligned - start, start + whole.len - (aligned + span));
        // The part kept is owned by the new value from here on.
        std::mem::forget(whole);
        // SAFETY: both ranges lie inside the mapping just made, outside the part kept;
        // nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(start as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((aligned + span) as *mut libc::c_void, tail);
            }
            // Advice only: a kernel without transparent huge pages refuses it.
            libc::madvise(aligned as *mut libc::c_void, span, libc::MADV_HUGEPAGE);
        }
        let ptr = std::ptr::NonNull::new(aligned as *mut u8)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(MappedBuf { ptr, len: span })
    }
}

impl std::ops::Deref for MappedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live readable mapping of `len` bytes (anonymous mappings
        // start zeroed, so every byte is initialised), owned by `self` and borrowed
        // for no longer than `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for MappedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and length and is
        // unmapped exactly once; no borrow of it outlives `self`.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap of a buffer's own mapping");
    }
}

impl std::fmt::Debug for MappedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedBuf").field("len", &self.len).finish()
    }
}

// ---------------------------------------------------------------------------------------
// Processes and signals

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Which side of a [`fork`] this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The original process, with the child's pid.
    Parent(libc::pid_t),
}

/// The number of threads of this process (the entries of `/proc/self/task`).
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `fork()`. Refused unless the process has a single thread: the child would get only
/// the calling thread, with whatever the others held (locks, half-made changes) left as
/// they were.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork a process with {threads} threads"
        )));
    }
    // SAFETY: the process has a single thread (checked above), so the child is a full
    // copy of it, with nothing held by a thread that no longer exists.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent(child)),
    }
}

/// `setsid()`: this process leads a new session, without a controlling terminal.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid changes only the process's session; no memory is touched.
    if unsafe { libc::setsid() } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Points standard input and output at `input_output` and standard error at `error`
/// (`dup2` onto descriptors 0, 1 and 2; failures are ignored, the previous ones stay).
pub fn set_stdio(input_output: BorrowedFd<'_>, error: BorrowedFd<'_>) {
    // SAFETY: dup2 onto the standard descriptors, which belong to the process as a whole
    // (nothing in it owns them as an OwnedFd); the sources are open descriptors.
    unsafe {
        libc::dup2(input_output.as_raw_fd(), libc::STDIN_FILENO);
        libc::dup2(input_output.as_raw_fd(), libc::STDOUT_FILENO);
        libc::dup2(error.as_raw_fd(), libc::STDERR_FILENO);
    }
}

/// A signal set holding `signals`.
fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; zeroed is a valid value, and sigemptyset and
    // sigaddset write only the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks `signals` in the calling thread (threads spawned afterwards inherit the mask).
pub fn block_signals(signals: &[libc::c_int]) {
    let set = sigset(signals);
    // SAFETY: installs a mask built above for this thread; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits until one of `signals` (blocked, see [`block_signals`]) is pending and returns
/// its number (0 if `sigwait` failed).
pub fn wait_signal(signals: &[libc::c_int]) -> libc::c_int {
    let set = sigset(signals);
    let mut sig = 0;
    // SAFETY: sigwait reads the set built above and writes only `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &OsStr,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target.as_os_str())?;
    let fstype = cstring(OsStr::new(fstype))?;
    let data = cstring(OsStr::new(data))?;
    // SAFETY: every string is NUL-terminated and alive for the call; the kernel only
    // reads them.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
}

/// `umount2(path, flags)`, never following a symbolic link at `path`.
pub fn unmount(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cstring(path.as_os_str())?;
    // SAFETY: `c` is NUL-terminated and alive for the call.
    check(unsafe { libc::umount2(c.as_ptr(), flags | libc::UMOUNT_NOFOLLOW) })
}

/// `umount2(path, MNT_DETACH)`: the mount leaves the namespace at once and goes when
/// its last user does.
pub fn detach_mount(path: &Path) -> io::Result<()> {
    let c = cstring(path.as_os_str())?;
    // SAFETY: `c` is NUL-terminated and alive for the call.
    check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) })
}

// ---------------------------------------------------------------------------------------
// Users

/// A passwd entry, copied out of the buffer getpw*_r filled.
struct Passwd {
    name: Vec<u8>,
    dir: Vec<u8>,
    uid: u32,
    gid: u32,
}

/// The key a passwd entry is looked up by.
enum PasswdKey<'a> {
    Uid(u32),
    Name(&'a CStr),
}

/// The passwd entry of `key`, if there is one.
fn passwd(key: PasswdKey<'_>) -> Option<Passwd> {
    // SAFETY: passwd is plain data; zeroed is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; PW_BUF];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpw*_r write only into `pwd`, `buf` and `result`, which outlive the reads
    // below; the name is NUL-terminated and alive for the call.
    let rc = unsafe {
        match key {
            PasswdKey::Uid(uid) => {
                libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result)
            }
            PasswdKey::Name(name) => libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            ),
        }
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let copy = |p: *const libc::c_char| {
        if p.is_null() {
            Vec::new()
        } else {
            // SAFETY: on success the strings of the entry point into `buf`, still alive,
            // NUL-terminated.
            unsafe { CStr::from_ptr(p) }.to_bytes().to_vec()
        }
    };
    Some(Passwd {
        name: copy(pwd.pw_name),
        dir: copy(pwd.pw_dir),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// The user name of `uid`, if the user has a passwd entry.
pub fn user_name(uid: u32) -> Option<String> {
    let p = passwd(PasswdKey::Uid(uid))?;
    Some(String::from_utf8_lossy(&p.name).into_owned())
}

/// The user name and home directory of `uid`, if the user has a passwd entry.
pub fn user_name_and_home(uid: u32) -> Option<(String, PathBuf)> {
    let p = passwd(PasswdKey::Uid(uid))?;
    let name = String::from_utf8_lossy(&p.name).into_owned();
    Some((name, PathBuf::from(OsString::from_vec(p.dir))))
}

/// The home directory of the user `name`, if such a user exists.
pub fn home_of(name: &str) -> Option<PathBuf> {
    let c = CString::new(name).ok()?;
    let p = passwd(PasswdKey::Name(&c))?;
    Some(PathBuf::from(OsString::from_vec(p.dir)))
}

/// The uid and primary gid of the user `name`, if such a user exists.
pub fn user_by_name(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let p = passwd(PasswdKey::Name(&c))?;
    Some((p.uid, p.gid))
}

// ---------------------------------------------------------------------------------------
// Errors and time

/// The C library's message for the error number `code` (`strerror`).
pub fn strerror(code: libc::c_int) -> String {
    // SAFETY: strerror returns a pointer to a static or thread-local NUL-terminated
    // string, valid until the next strerror call of this thread; it is copied at once.
    unsafe { CStr::from_ptr(libc::strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

/// `localtime_r`: `time` broken down in the local time zone, `None` when it cannot be.
pub fn local_time(time: libc::time_t) -> Option<libc::tm> {
    // SAFETY: tm is plain data that localtime_r fully initialises on success; zeroed is
    // a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call and localtime_r keeps
    // neither.
    let result = unsafe { libc::localtime_r(&time, &mut tm) };
    if result.is_null() { None } else { Some(tm) }
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
