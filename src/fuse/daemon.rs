//! Process plumbing of the mount daemon: going to the background only once the mount is
//! live, turning SIGTERM/SIGINT into a clean unmount, and clearing a dead mount left on
//! the mountpoint by a daemon that was killed.
//!
//! Backgrounding forks *before* any thread exists (fork keeps only the calling thread),
//! and the parent waits on a pipe until the child reports "mounted" or the reason it
//! could not mount, so `pcocc-imagefs MNT && ls MNT` works and a failure is printed by the
//! command the user ran.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use crate::sys;

/// The signals that end the daemon with a clean unmount.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

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
/// Must be called while the process has a single thread (fails otherwise).
pub fn daemonize(log_file: Option<&Path>) -> io::Result<Readiness> {
    let (rd, wr) = sys::pipe()?;
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
    match sys::fork()? {
        sys::Forked::Child => {
            drop(rd);
            let _ = sys::setsid();
            redirect_stdio(log.as_ref())?;
            Ok(Readiness {
                pipe: Some(File::from(wr)),
            })
        }
        sys::Forked::Parent(_) => {
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
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let err_target = log.map(|f| f.as_fd()).unwrap_or(null.as_fd());
    sys::set_stdio(null.as_fd(), err_target);
    Ok(())
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread, so that every thread spawned
/// afterwards inherits the mask and only [`wait_for_signal`] sees them. Call before
/// starting any thread.
pub fn block_signals() {
    sys::block_signals(&STOP_SIGNALS);
}

/// Waits until SIGTERM, SIGINT or SIGHUP arrives (they must be blocked, see
/// [`block_signals`]) and returns its number.
pub fn wait_for_signal() -> i32 {
    sys::wait_signal(&STOP_SIGNALS)
}

/// If `mountpoint` is a dead FUSE mount (its daemon was killed: `stat` or `statfs`
/// fails with ENOTCONN), detaches it so that a new daemon can mount there. Returns whether one was
/// cleared.
pub fn clear_stale_mount(mountpoint: &Path) -> io::Result<bool> {
    // `stat` may be answered from attributes the kernel still caches for the dead
    // mount's root (for the mount's refresh time); `statfs` always asks the daemon.
    let probe = std::fs::metadata(mountpoint).and_then(|_| sys::statvfs(mountpoint).map(|_| ()));
    match probe {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            sys::detach_mount(mountpoint).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} is a dead mount and cannot be cleared: {e}",
                        mountpoint.display()
                    ),
                )
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}
