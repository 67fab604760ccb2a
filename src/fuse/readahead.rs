//! The mount's read-ahead window, raised once the mount is live.
//!
//! The kernel reads a FUSE file ahead by its backing-device window, 128 KiB by default,
//! and a filesystem can only lower it while the session starts (`max_readahead` of the
//! INIT reply is a minimum with what the kernel offers). A sequential reader of a view
//! then costs one request per 128 KiB, one at a time. Root can raise the window through
//! `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb` of the mount's device once the INIT
//! handshake is done (the handshake would lower it again): the kernel then sends
//! 1 MiB requests, several in flight, which the request threads serve in parallel.
//! Random readers are not hurt: the kernel reads ahead only for sequential patterns
//! (and not at all after `POSIX_FADV_RANDOM`).
//!
//! A file's window is copied from the device when it is opened, so opens wait at the
//! [`OpenGate`] until the window is set (or the attempt failed), for at most
//! [`GATE_MAX_WAIT`]; otherwise a reader started right after the mount appears would
//! keep the small window for its whole read.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Read-ahead window set when nothing says otherwise, in KiB. 4 MiB keeps four 1 MiB
/// requests in flight; on this project's test machine it lifted cached sequential reads
/// of a FUSE file from 1.1–2.2 to 3–3.9 GB/s (shared/reference/facts.md) and cold reads
/// of a view by the parallelism it gives the request threads.
pub const DEFAULT_READAHEAD_KIB: u32 = 4096;

/// Largest window accepted (`readahead=`): 64 MiB, far past any gain, still bounded.
pub const MAX_READAHEAD_KIB: u32 = 64 << 10;

/// Longest an open waits for the window to be set. Setting it takes a `stat` of the
/// mountpoint and one write to sysfs: milliseconds, unless the session is stuck.
pub const GATE_MAX_WAIT: Duration = Duration::from_secs(2);

/// Reads a `readahead=` / `--readahead` value: a number of KiB from 0 (leave the
/// kernel's window) up to [`MAX_READAHEAD_KIB`].
pub fn parse_readahead(text: &str) -> Result<u32, String> {
    let kib: u32 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of KiB"))?;
    if kib <= MAX_READAHEAD_KIB {
        Ok(kib)
    } else {
        Err(format!(
            "the read-ahead window must be between 0 and {MAX_READAHEAD_KIB} KiB"
        ))
    }
}

/// The sysfs file holding the read-ahead window of the device `dev` (a FUSE mount's
/// backing device is named after its anonymous device number).
pub fn bdi_file(dev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
}

/// Sets the read-ahead window of the live FUSE mount at `mountpoint` to `kib` KiB. The
/// `stat` of the mountpoint returns only once the session has answered the kernel's
/// INIT (and the root's attributes), so the window is never lowered again after this.
pub fn apply(mountpoint: &Path, kib: u32) -> io::Result<()> {
    let dev = std::fs::metadata(mountpoint)?.dev();
    let file = bdi_file(dev);
    std::fs::write(&file, format!("{kib}\n"))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))
}

/// A gate that `open` waits at until the mount's read-ahead window is settled. Starts
/// open (nothing to wait for); [`OpenGate::hold`] closes it before the mount exists and
/// [`OpenGate::release`] opens it for good.
#[derive(Debug, Default)]
pub struct OpenGate {
    held: AtomicBool,
    lock: Mutex<()>,
    released: Condvar,
}

impl OpenGate {
    /// Makes opens wait until [`release`](Self::release).
    pub fn hold(&self) {
        self.held.store(true, Ordering::Release);
    }

    /// Lets every waiting and future open through.
    pub fn release(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.held.store(false, Ordering::Release);
        self.released.notify_all();
    }

    /// Waits until the gate is open, for at most `max`.
    pub fn wait(&self, max: Duration) {
        if !self.held.load(Ordering::Acquire) {
            return;
        }
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .released
            .wait_timeout_while(guard, max, |_| self.held.load(Ordering::Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_sysfs_file_is_named_after_the_device_numbers() {
        assert_eq!(
            bdi_file(libc::makedev(0, 57)),
            PathBuf::from("/sys/class/bdi/0:57/read_ahead_kb")
        );
    }

    #[test]
    fn windows_above_the_maximum_are_refused() {
        assert_eq!(parse_readahead("0"), Ok(0));
        assert_eq!(parse_readahead("4096"), Ok(4096));
        assert!(parse_readahead(&(MAX_READAHEAD_KIB + 1).to_string()).is_err());
        assert!(parse_readahead("1G").is_err());
    }

    #[test]
    fn a_held_gate_lets_opens_through_once_released() {
        let gate = Arc::new(OpenGate::default());
        gate.wait(Duration::from_secs(60)); // open from the start: no wait
        gate.hold();
        let g = gate.clone();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            g.release();
        });
        gate.wait(Duration::from_secs(60));
        releaser.join().unwrap();
        assert!(!gate.held.load(Ordering::Acquire), "released");
        gate.wait(Duration::from_secs(60)); // stays open
    }

    #[test]
    fn a_gate_never_released_lets_opens_through_after_the_timeout() {
        let gate = OpenGate::default();
        gate.hold();
        gate.wait(Duration::from_millis(10));
    }
}
