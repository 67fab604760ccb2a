//! `pcocc-imagefs`: mounts every configured pcocc repository as one directory tree.

use clap::Parser;
use pcocc_imagefs::config::Config;
use pcocc_imagefs::fuse::daemon::{self, Readiness};
use pcocc_imagefs::fuse::options::{MountSettings, check_threads};
use pcocc_imagefs::fuse::{logging, mount, mountpoint, readahead};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// Mount options, comma-separated (allow_other, ro, nonempty, config=FILE, threads=N,
    /// log=FILE, refresh=SECS, and the usual FUSE and fstab options)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Threads serving requests
    #[arg(long, value_name = "N", value_parser = parse_threads)]
    threads: Option<usize>,
    /// Read-ahead window of the mount in KiB, set after mounting (root only; 0 keeps the
    /// kernel's 128 KiB)
    #[arg(long, value_name = "KIB", value_parser = readahead::parse_readahead)]
    readahead: Option<u32>,
    /// Log file of a background daemon (default: syslog, identity pcocc-imagefs)
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Where to mount: an empty directory (created if missing; see -o nonempty)
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
    // As /proc/self/mountinfo shows it, so that the daemon finds its own mount there.
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    mountpoint::check(&mountpoint, settings.nonempty)?;
    // The mount source mount(8) matches against fstab: the configuration file named, or
    // `pcocc` for the user and system ones.
    if settings.fsname.is_none() {
        settings.fsname = Some(match &config_file {
            Some(p) => p.to_string_lossy().into_owned(),
            None => mountpoint::DEFAULT_SOURCE.into(),
        });
    }
    let config = Config::load(config_file.as_deref()).map_err(|e| e.to_string())?;

    let mut ready = if args.foreground {
        Readiness::foreground()
    } else {
        daemon::daemonize(log_file.as_deref()).map_err(|e| e.to_string())?
    };
    // A background daemon has no terminal: its log goes to syslog, unless it was given
    // a log file (its standard error by now).
    logging::init(if args.foreground || log_file.is_some() {
        logging::Destination::Stderr
    } else {
        logging::Destination::syslog()
    });
    daemon::block_signals();

    match mount::serve(&config, &settings, threads, &mountpoint, &mut ready) {
        Ok(()) => Ok(()),
        Err(msg) => {
            ready.failed(&msg);
            Err(msg)
        }
    }
}
