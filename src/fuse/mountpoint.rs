//! The mountpoint and this daemon's own mount on it: the checks made before mounting,
//! the mount itself (type `fuse.pcocc-imagefs`, source the configuration file, as
//! `mount(8)` and fstab expect), and an unmount that only ever removes that mount.
//!
//! A path can hold several mounts stacked on each other (a tmpfs, then this daemon's
//! mount over it). Unmounting by path removes whatever is on top, so every unmount first
//! checks in `/proc/self/mountinfo` that the mount on top is still the one this daemon
//! made (same mount id and device); when it is not (it was unmounted already, or
//! something was mounted over it), nothing is unmounted.

use super::mountinfo::{self, MountEntry};
use super::options::MountSettings;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The kernel filesystem type of the mount: FUSE with this daemon's subtype.
pub const FSTYPE: &str = "fuse.pcocc-imagefs";
/// The subtype part of [`FSTYPE`].
pub const SUBTYPE: &str = "pcocc-imagefs";
/// The mount source when no configuration file is named (the user and system ones).
pub const DEFAULT_SOURCE: &str = "pcocc";

/// Whether `m` is a pcocc-imagefs mount (older daemons mounted with type `fuse` and
/// source `pcocc-imagefs`).
pub fn is_imagefs(m: &MountEntry) -> bool {
    m.fstype == FSTYPE || (m.fstype == "fuse" && m.source == "pcocc-imagefs")
}

/// The checks made before mounting on `path` (absolute, without symbolic links): it is
/// a directory, it holds no live pcocc-imagefs mount, and it is empty unless `nonempty`.
/// The error is the message for the user.
pub fn check(path: &Path, nonempty: bool) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("cannot mount on {shown}: not a directory"));
    }
    if let Some(m) = mountinfo::topmost(path).filter(is_imagefs) {
        return Err(format!(
            "{shown} already holds a pcocc-imagefs mount (source {}); unmount it first",
            m.source
        ));
    }
    if !nonempty {
        let mut entries = std::fs::read_dir(path).map_err(|e| format!("{shown}: {e}"))?;
        if entries.next().is_some() {
            return Err(format!(
                "{shown} is not empty: mounting would hide its files \
                 (add -o nonempty to mount over them)"
            ));
        }
    }
    Ok(())
}

/// The mount flags (mount(2)) for `settings`: like every FUSE mount, `nosuid` and
/// `nodev` unless `suid` or `dev` is asked for.
fn mount_flags(settings: &MountSettings) -> libc::c_ulong {
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if settings.read_only {
        flags |= libc::MS_RDONLY;
    }
    for f in &settings.kernel_flags {
        match f.as_str() {
            "nosuid" => flags |= libc::MS_NOSUID,
            "suid" => flags &= !libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "dev" => flags &= !libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "exec" => flags &= !libc::MS_NOEXEC,
            "noatime" => flags |= libc::MS_NOATIME,
            "atime" => flags &= !(libc::MS_NOATIME | libc::MS_RELATIME),
            "relatime" => flags |= libc::MS_RELATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "async" => flags &= !libc::MS_SYNCHRONOUS,
            "dirsync" => flags |= libc::MS_DIRSYNC,
            _ => {}
        }
    }
    flags
}

/// The FUSE mount data for a connection on descriptor `fd` whose root has mode `mode`.
fn mount_data(fd: i32, mode: u32, settings: &MountSettings) -> String {
    let mut data = format!(
        "fd={fd},rootmode={:o},user_id={},group_id={}",
        mode & (libc::S_IFMT | 0o7777),
        crate::sys::euid(),
        crate::sys::egid()
    );
    // Root alone besides the owner is told apart by the daemon; the kernel must let
    // both in.
    if settings.allow_other || settings.allow_root {
        data.push_str(",allow_other");
    }
    if settings.default_permissions {
        data.push_str(",default_permissions");
    }
    data
}

/// Mounts a new FUSE connection on `path` with mount(2), as type [`FSTYPE`] from
/// `source`, and returns the connection's `/dev/fuse` descriptor; None when the kernel
/// refuses for want of privilege (an unprivileged daemon goes through `fusermount3`).
pub fn mount_direct(
    path: &Path,
    source: &str,
    settings: &MountSettings,
) -> io::Result<Option<OwnedFd>> {
    let mode = std::fs::metadata(path)?.mode();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/fuse: {e}")))?;
    let data = mount_data(dev.as_raw_fd(), mode, settings);
    match crate::sys::mount(
        OsStr::new(source),
        path,
        FSTYPE,
        mount_flags(settings),
        &data,
    ) {
        Ok(()) => Ok(Some(dev.into())),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The mount this daemon made, as `/proc/self/mountinfo` showed it right after mounting.
#[derive(Debug)]
pub struct OwnMount {
    path: PathBuf,
    id: u64,
    dev: (u32, u32),
    /// The unmount of a mount made through `fusermount3`, which fuser would otherwise
    /// repeat when the session ends; taken by the first unmount.
    fuser: std::sync::Mutex<Option<fuser::SessionUnmounter>>,
}

impl OwnMount {
    /// The mount now on top at `path`, which must be of type [`FSTYPE`]: call right after
    /// mounting it.
    pub fn identify(path: &Path) -> io::Result<OwnMount> {
        let m = mountinfo::topmost(path)
            .filter(|m| m.fstype == FSTYPE)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "the new mount on {} is not in /proc/self/mountinfo",
                    path.display()
                ))
            })?;
        Ok(OwnMount {
            path: path.to_path_buf(),
            id: m.id,
            dev: m.dev,
            fuser: std::sync::Mutex::new(None),
        })
    }

    /// Makes the first unmount of a `fusermount3` mount go through fuser's own, so
    /// that fuser does not unmount the path again when the session ends.
    pub fn set_fuser_unmounter(&self, unmounter: fuser::SessionUnmounter) {
        *self.lock_fuser() = Some(unmounter);
    }

    fn lock_fuser(&self) -> std::sync::MutexGuard<'_, Option<fuser::SessionUnmounter>> {
        self.fuser.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the mount on top at its path is still this one.
    pub fn is_on_top(&self) -> bool {
        mountinfo::topmost(&self.path).is_some_and(|m| m.id == self.id && m.dev == self.dev)
    }

    /// Unmounts this mount if it is still the one on top at its path, lazily (MNT_DETACH:
    /// it leaves the namespace at once and goes when its last open file is closed) when
    /// `lazy`. Returns false, having done nothing, when another mount or none is on top.
    /// A daemon without the privilege goes through `fusermount3 -u`, which unmounts only
    /// FUSE mounts of its user.
    pub fn unmount(&self, lazy: bool) -> io::Result<bool> {
        if !self.is_on_top() {
            return Ok(false);
        }
        let fuser = self.lock_fuser().take();
        if let Some(mut u) = fuser {
            match u.unmount() {
                Ok(()) => return Ok(true),
                Err(e) if !lazy => return Err(e),
                Err(_) => {}
            }
        }
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        let Err(e) = crate::sys::unmount(&self.path, flags) else {
            return Ok(true);
        };
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
        let args: &[&str] = if lazy {
            &["-u", "-z", "--"]
        } else {
            &["-u", "--"]
        };
        for tool in ["fusermount3", "fusermount"] {
            let status = std::process::Command::new(tool)
                .args(args)
                .arg(&self.path)
                .status();
            if status.is_ok_and(|s| s.success()) {
                return Ok(true);
            }
        }
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_and_a_non_empty_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check(&file, true).unwrap_err();
        assert!(e.ends_with(": not a directory"), "{e}");
        let e = check(dir.path(), false).unwrap_err();
        assert!(
            e.contains("is not empty") && e.contains("-o nonempty"),
            "{e}"
        );
        check(dir.path(), true).unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        check(&empty, false).unwrap();
    }

    #[test]
    fn flags_default_to_nosuid_nodev_and_follow_the_options() {
        let mut s = MountSettings::default();
        assert_eq!(mount_flags(&s), libc::MS_NOSUID | libc::MS_NODEV);
        s.read_only = true;
        s.kernel_flags = vec!["suid".into(), "noexec".into(), "noatime".into()];
        assert_eq!(
            mount_flags(&s),
            libc::MS_NODEV | libc::MS_RDONLY | libc::MS_NOEXEC | libc::MS_NOATIME
        );
    }

    #[test]
    fn mount_data_names_the_connection_and_who_may_enter() {
        let s = MountSettings {
            allow_root: true,
            default_permissions: true,
            ..MountSettings::default()
        };
        let d = mount_data(7, libc::S_IFDIR | 0o755, &s);
        assert!(d.starts_with("fd=7,rootmode=40755,user_id="), "{d}");
        assert!(d.ends_with(",allow_other,default_permissions"), "{d}");
    }

    #[test]
    fn older_mounts_of_type_fuse_are_recognised_by_their_source() {
        let info = "91 90 0:51 / /m rw - fuse pcocc-imagefs rw\n\
                    92 90 0:52 / /n rw - fuse sshfs rw\n";
        assert!(is_imagefs(
            &mountinfo::topmost_in(info, Path::new("/m")).unwrap()
        ));
        assert!(!is_imagefs(
            &mountinfo::topmost_in(info, Path::new("/n")).unwrap()
        ));
    }
}
