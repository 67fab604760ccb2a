//! `pcocc-imagefs`: mounts every configured pcocc repository as one directory tree.

use clap::Parser;
use pcocc_imagefs::config::Config;
use pcocc_imagefs::fuse::daemon::{self, Readiness};
use pcocc_imagefs::fuse::options::{MountSettings, check_threads};
use pcocc_imagefs::fuse::readahead;
use pcocc_imagefs::fuse::{FsSettings, ImageFs};
use pcocc_imagefs::tree::Tree;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Mount pcocc image repositories as a filesystem: MOUNT/REPO/IMAGE/@REV/disk.FORMAT.
#[derive(Parser, Debug)]
#[command(name = "pcocc-imagefs", version, about, long_about = None)]
struct Args {
    /// repos.yaml to use instead of the user and system ones
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Stay in the foreground (for systemd); log to stderr
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma-separated (allow_other, ro, config=FILE, threads=N, log=FILE,
    /// refresh=SECS, and the usual FUSE and fstab options)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Threads serving requests
    #[arg(long, value_name = "N", value_parser = parse_threads)]
    threads: Option<usize>,
    /// Read-ahead window of the mount in KiB, set after mounting (root only; 0 keeps the
    /// kernel's 128 KiB)
    #[arg(long, value_name = "KIB", value_parser = readahead::parse_readahead)]
    readahead: Option<u32>,
    /// Log file of a background daemon (default: no log)
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Where to mount (created if missing)
    mountpoint: PathBuf,
}

fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    check_threads(n)
}

/// Request threads when nothing says otherwise: measured gains stop at about two per core.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() * 2).clamp(2, 16))
        .unwrap_or(4)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("pcocc-imagefs: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn run(args: Args) -> Result<(), String> {
    let mut settings = MountSettings::default();
    for o in &args.options {
        settings.parse_into(o).map_err(|e| e.to_string())?;
    }
    let config_file = match args.config.or(settings.config.clone()) {
        Some(p) => Some(absolute(&p)?),
        None => None,
    };
    let log_file = match args.log_file.or(settings.log_file.clone()) {
        Some(p) => Some(absolute(&p)?),
        None => None,
    };
    let threads = args
        .threads
        .or(settings.threads)
        .unwrap_or_else(default_threads);
    settings.readahead_kib = args.readahead.or(settings.readahead_kib);
    let mountpoint = absolute(&args.mountpoint)?;

    // Checks that can fail are done before going to the background, so their message
    // reaches the user's terminal.
    daemon::clear_stale_mount(&mountpoint).map_err(|e| e.to_string())?;
    if !mountpoint.exists() {
        std::fs::create_dir_all(&mountpoint)
            .map_err(|e| format!("cannot create mountpoint {}: {e}", mountpoint.display()))?;
    }
    let config = Config::load(config_file.as_deref()).map_err(|e| e.to_string())?;

    let mut ready = if args.foreground {
        Readiness::foreground()
    } else {
        daemon::daemonize(log_file.as_deref()).map_err(|e| e.to_string())?
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    daemon::block_signals();

    match serve(&config, &settings, threads, &mountpoint, &mut ready) {
        Ok(()) => Ok(()),
        Err(msg) => {
            ready.failed(&msg);
            Err(msg)
        }
    }
}

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

fn serve(
    config: &Config,
    settings: &MountSettings,
    threads: usize,
    mountpoint: &Path,
    ready: &mut Readiness,
) -> Result<(), String> {
    let tree = Tree::new(config).map_err(|e| e.to_string())?;
    let fs = ImageFs::new(
        Arc::new(tree),
        FsSettings {
            refresh: settings.refresh.unwrap_or(FsSettings::default().refresh),
            read_only: settings.read_only,
            mountpoint: Some(mountpoint.to_path_buf()),
        },
    );
    let mut cfg = fuser::Config::default();
    let mut opts = vec![
        fuser::MountOption::FSName(
            settings
                .fsname
                .clone()
                .unwrap_or_else(|| "pcocc-imagefs".into()),
        ),
        fuser::MountOption::Subtype("pcocc-imagefs".into()),
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
    let readahead_kib = settings
        .readahead_kib
        .unwrap_or(readahead::DEFAULT_READAHEAD_KIB);
    let gate = fs.open_gate();
    if readahead_kib > 0 {
        gate.hold();
    }
    let mut session = fuser::Session::new(fs, mountpoint, &cfg)
        .map_err(|e| format!("cannot mount on {}: {e}", mountpoint.display()))?;
    invalidator.start(session.notifier());
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
    let mut unmounter = session.unmount_callable();
    let detach_point = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = daemon::wait_for_signal();
            log::info!("signal {sig}: unmounting");
            match unmounter.unmount() {
                Ok(()) => {}
                // A file is still open (a VM running from a view): detach now, serve
                // the open files until they close, then the session ends.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    log::info!("mount busy after signal {sig}: detaching lazily");
                    if let Err(e) = daemon::detach(&detach_point) {
                        log::warn!("lazy unmount after signal {sig} failed: {e}");
                    }
                }
                Err(e) => log::warn!("unmount after signal {sig} failed: {e}"),
            }
        })
        .map_err(|e| e.to_string())?;
    ready.ready();
    session
        .run()
        .map_err(|e| format!("session ended with an error: {e}"))
}
