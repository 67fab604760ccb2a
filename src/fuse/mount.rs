//! Mounting and serving: the FUSE session with its options, the threads that set the
//! read-ahead window and forward cache invalidations, and the signal handling that
//! unmounts cleanly.

use super::daemon::{self, Readiness};
use super::mountpoint;
use super::options::MountSettings;
use super::readahead;
use super::{FsSettings, ImageFs};
use crate::config::Config;
use crate::tree::Tree;
use crate::tree::session::SessionSettings;
use std::path::Path;
use std::sync::Arc;

/// The mount flag for a kernel option `-o` accepted. `relatime` and `nodiratime` are what
/// the kernel does by default for a FUSE mount, so they need no flag.
fn kernel_flag(name: &str) -> Option<fuser::MountOption> {
    use fuser::MountOption as M;
    Some(match name {
        "nosuid" => M::NoSuid,
        "suid" => M::Suid,
        "nodev" => M::NoDev,
        "dev" => M::Dev,
        "noexec" => M::NoExec,
        "exec" => M::Exec,
        "noatime" => M::NoAtime,
        "atime" => M::Atime,
        "sync" => M::Sync,
        "async" => M::Async,
        "dirsync" => M::DirSync,
        _ => return None,
    })
}

/// Mounts the tree of `config` on `mountpoint` and serves it until it is unmounted or
/// a signal ends it; `ready` is told once the mount is live.
pub fn serve(
    config: &Config,
    settings: &MountSettings,
    threads: usize,
    mountpoint: &Path,
    ready: &mut Readiness,
) -> Result<(), String> {
    let mut tree = Tree::new(config).map_err(|e| e.to_string())?;
    tree.set_mountpoint(mountpoint);
    let fs = ImageFs::new(
        Arc::new(tree),
        FsSettings {
            session: SessionSettings {
                refresh: settings
                    .refresh
                    .unwrap_or(SessionSettings::default().refresh),
                read_only: settings.read_only,
                shared: settings.allow_other,
            },
            mountpoint: Some(mountpoint.to_path_buf()),
        },
    );
    let source = settings
        .fsname
        .clone()
        .unwrap_or_else(|| mountpoint::DEFAULT_SOURCE.into());
    let mut cfg = fuser::Config::default();
    // Used only when mounting through fusermount3 (see below), which takes the type and
    // source as options.
    let mut opts = vec![
        fuser::MountOption::FSName(source.clone()),
        fuser::MountOption::Subtype(mountpoint::SUBTYPE.into()),
    ];
    if settings.read_only {
        opts.push(fuser::MountOption::RO);
    }
    if settings.default_permissions {
        opts.push(fuser::MountOption::DefaultPermissions);
    }
    opts.extend(settings.kernel_flags.iter().filter_map(|f| kernel_flag(f)));
    cfg.mount_options = opts;
    cfg.acl = if settings.allow_other {
        fuser::SessionACL::All
    } else if settings.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    cfg.n_threads = Some(threads);
    cfg.clone_fd = threads > 1;

    let invalidator = fs.invalidator();
    let pusher = fs.pusher();
    let readahead_kib = settings
        .readahead_kib
        .unwrap_or(readahead::DEFAULT_READAHEAD_KIB);
    let gate = fs.open_gate();
    if readahead_kib > 0 {
        gate.hold();
    }
    let cannot = |e: std::io::Error| format!("cannot mount on {}: {e}", mountpoint.display());
    // The mount is made here, with its type and source, when the kernel lets this
    // process mount (root); fuser then serves the connection and never unmounts it.
    // Otherwise fuser mounts through fusermount3 and is handed the one unmount it would
    // otherwise repeat when the session ends.
    let (session, own) =
        match mountpoint::mount_direct(mountpoint, &source, settings).map_err(cannot)? {
            Some(dev) => {
                let own = mountpoint::OwnMount::identify(mountpoint).map_err(cannot)?;
                match fuser::Session::from_fd(fs, dev, cfg.acl, cfg.clone()) {
                    Ok(session) => (session, own),
                    Err(e) => {
                        let _ = own.unmount(true);
                        return Err(cannot(e));
                    }
                }
            }
            None => {
                let mut session = fuser::Session::new(fs, mountpoint, &cfg).map_err(cannot)?;
                let own = mountpoint::OwnMount::identify(mountpoint).map_err(cannot)?;
                own.set_fuser_unmounter(session.unmount_callable());
                (session, own)
            }
        };
    invalidator.start(session.notifier());
    // The kernel's window: what it sets, or its own 128 KiB when left alone.
    pusher.start(
        session.notifier(),
        u64::from(if readahead_kib > 0 {
            readahead_kib
        } else {
            128
        }) * 1024,
    );
    if readahead_kib > 0 {
        // Set from its own thread: the stat it needs is answered by the session loop.
        let at = mountpoint.to_path_buf();
        let g = gate.clone();
        let spawned = std::thread::Builder::new()
            .name("readahead".into())
            .spawn(move || {
                match readahead::apply(&at, readahead_kib) {
                    Ok(()) => log::debug!(
                        "read-ahead window of {} set to {readahead_kib} KiB",
                        at.display()
                    ),
                    // An unprivileged daemon cannot write sysfs: the kernel's window stays.
                    Err(e) => log::info!("read-ahead window left as the kernel set it: {e}"),
                }
                g.release();
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the read-ahead thread: {e}");
            gate.release();
        }
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let sig = daemon::wait_for_signal();
                log::info!("signal {sig}: unmounting");
                unmount_on_signal(&own, sig);
            }
        })
        .map_err(|e| e.to_string())?;
    ready.ready();
    session
        .run()
        .map_err(|e| format!("session ended with an error: {e}"))
}

/// Unmounts the daemon's own mount after signal `sig`, if it is still the one on top at
/// its path; the session then ends. Whatever is under it stays mounted.
fn unmount_on_signal(own: &mountpoint::OwnMount, sig: i32) {
    let at = own.path().display();
    match own.unmount(false) {
        Ok(true) => {}
        Ok(false) => log::warn!(
            "signal {sig}: the mount on top at {at} is not this daemon's (unmounted already, \
             or mounted over): nothing unmounted"
        ),
        // A file is still open (a VM running from a view): detach now, serve the open
        // files until they close, then the session ends.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            log::info!("mount busy after signal {sig}: detaching lazily");
            match own.unmount(true) {
                Ok(true) => {}
                Ok(false) => log::warn!("signal {sig}: {at} changed; nothing unmounted"),
                Err(e) => log::warn!("lazy unmount after signal {sig} failed: {e}"),
            }
        }
        Err(e) => log::warn!("unmount after signal {sig} failed: {e}"),
    }
}
