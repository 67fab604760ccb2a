//! Process plumbing of the mount daemon: going to the background only once the mount is
//! live, turning SIGTERM/SIGINT into a clean unmount, and clearing a dead mount left on
//! the mountpoint by a daemon that was killed.
//!
//! Backgrounding forks *before* any thread exists (fork keeps only the calling thread),
//! and the parent waits on a pipe until the child reports "mounted" or the reason it
//! could not mount, so `pcocc-imagefs MNT && ls MNT` works and a failure is printed by the
//! command the user ran.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The child's end of the start-up pipe: report the outcome of mounting exactly once.
#[derive(Debug)]
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// A foreground daemon has nobody waiting.
    pub fn foreground() -> Readiness {
        Readiness { pipe: None }
    }

    /// The mount is live: let the waiting parent exit 0.
    pub fn ready(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"\0");
        }
    }

    /// Mounting failed: the waiting parent prints `message` and exits non-zero.
    pub fn failed(&mut self, message: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(message.as_bytes());
        }
    }
}

/// Forks. The parent waits for the child's report and exits with it (never returns); the
/// child detaches from the terminal (new session, stdio on /dev/null, stderr on
/// `log_file` when given) and returns the handle on which it reports readiness.
///
/// Must be called while the process has a single thread.
pub fn daemonize(log_file: Option<&Path>) -> io::Result<Readiness> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Open the log before forking so that an unwritable log path fails in the foreground.
    let log = match log_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open log file {}: {e}", p.display()),
                    )
                })?,
        ),
        None => None,
    };
    // SAFETY: the process is single-threaded here (documented precondition).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(rd);
            // SAFETY: plain syscalls on the child's own process state.
            unsafe { libc::setsid() };
            redirect_stdio(log.as_ref())?;
            Ok(Readiness {
                pipe: Some(File::from(wr)),
            })
        }
        _child => {
            drop(wr);
            let mut report = Vec::new();
            let _ = File::from(rd).read_to_end(&mut report);
            match report.as_slice() {
                [0, ..] => std::process::exit(0),
                [] => {
                    eprintln!(
                        "pcocc-imagefs: the daemon exited before the mount was live (see its log)"
                    );
                    std::process::exit(1)
                }
                msg => {
                    eprintln!("pcocc-imagefs: {}", String::from_utf8_lossy(msg));
                    std::process::exit(1)
                }
            }
        }
    }
}

fn redirect_stdio(log: Option<&File>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let err_target = log.map(|f| f.as_raw_fd()).unwrap_or(null.as_raw_fd());
    // SAFETY: dup2 onto the standard descriptors of this process.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(err_target, 2);
    }
    Ok(())
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread, so that every thread spawned
/// afterwards inherits the mask and only [`wait_for_signal`] sees them. Call before
/// starting any thread.
pub fn block_signals() {
    // SAFETY: building and installing a signal mask for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits until SIGTERM, SIGINT or SIGHUP arrives (they must be blocked, see
/// [`block_signals`]) and returns its number.
pub fn wait_for_signal() -> i32 {
    // SAFETY: sigwait on a mask we build; the signals are blocked in every thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

/// If `mountpoint` is a dead FUSE mount (its daemon was killed: `stat` fails with
/// ENOTCONN), detaches it so that a new daemon can mount there. Returns whether one was
/// cleared.
pub fn clear_stale_mount(mountpoint: &Path) -> io::Result<bool> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let c = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "mountpoint contains a NUL byte",
                )
            })?;
            // SAFETY: umount2 with a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} is a dead mount and cannot be cleared: {e}",
                        mountpoint.display()
                    ),
                ));
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Detaches `mountpoint` lazily (MNT_DETACH): it leaves the namespace at once, and the
/// kernel ends the FUSE session (so the daemon exits) when the last file open on it is
/// closed. What a signal falls back to when a plain unmount is refused with EBUSY because
/// a reader (a running VM, a `cp`) still has a file open. Unprivileged daemons go through
/// `fusermount3 -u -z`.
pub fn detach(mountpoint: &Path) -> io::Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "mountpoint contains a NUL byte",
        )
    })?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    for tool in ["fusermount3", "fusermount"] {
        let status = std::process::Command::new(tool)
            .args(["-u", "-z"])
            .arg(mountpoint)
            .status();
        if status.is_ok_and(|s| s.success()) {
            return Ok(());
        }
    }
    Err(e)
}
