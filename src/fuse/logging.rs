//! Where the daemon's log goes, and what it holds at each level.
//!
//! In the foreground, and in the background with a log file (`-o log=FILE`, whose
//! descriptor is the daemon's standard error), lines go to standard error as
//! `env_logger` writes them. Otherwise a background daemon, which has no terminal, sends
//! each line to syslog: one datagram per line on the `/dev/log` socket, RFC 3164 style
//! (`<PRI>Mmm dd hh:mm:ss pcocc-imagefs[PID]: LEVEL message`, facility daemon), which
//! journald and rsyslog both take (`journalctl -t pcocc-imagefs`). The environment
//! variable [`SYSLOG_ENV`] names another socket, for tests.
//!
//! The level comes from `RUST_LOG` (env_logger's syntax), `warn` when unset. fuser's own
//! lines (one per request at debug) stay at `warn` unless `RUST_LOG` names `fuser`, and
//! the few fuser warnings that a clean exit makes are lowered (see [`lowered`]).

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;

use log::{Level, Log, Metadata, Record};

/// The identity of the daemon's syslog lines.
pub const IDENTITY: &str = "pcocc-imagefs";
/// The syslog socket.
pub const SYSLOG_SOCKET: &str = "/dev/log";
/// Environment variable naming another syslog socket (for tests).
pub const SYSLOG_ENV: &str = "PCOCC_IMAGEFS_SYSLOG";
/// syslog(3)'s `LOG_DAEMON` facility number.
const FACILITY_DAEMON: u8 = 3;
/// Longest message sent in one datagram; longer ones are cut.
const MAX_MESSAGE: usize = 8 << 10;

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Standard error (the terminal, or the log file of a background daemon).
    Stderr,
    /// Datagrams on the syslog socket at this path.
    Syslog(PathBuf),
}

impl Destination {
    /// Syslog on `/dev/log`, or on the socket [`SYSLOG_ENV`] names.
    pub fn syslog() -> Destination {
        let path = std::env::var_os(SYSLOG_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SYSLOG_SOCKET));
        Destination::Syslog(path)
    }
}

/// The filter for a `RUST_LOG` value: `warn` when unset or empty; otherwise the value,
/// with `fuser=warn` added unless it names fuser itself (so that `RUST_LOG=debug` is
/// about this daemon, not about every request fuser decodes).
pub fn filter_spec(rust_log: Option<&str>) -> String {
    let spec = rust_log.map(str::trim).unwrap_or("");
    if spec.is_empty() {
        return "warn".to_string();
    }
    if spec.contains("fuser") {
        return spec.to_string();
    }
    // A trailing `/REGEX` applies to every directive: keep it last.
    let (directives, regex) = match spec.split_once('/') {
        Some((d, r)) => (d, Some(r)),
        None => (spec, None),
    };
    let mut out = if directives.trim().is_empty() {
        "fuser=warn".to_string()
    } else {
        format!("{directives},fuser=warn")
    };
    if let Some(r) = regex {
        out.push('/');
        out.push_str(r);
    }
    out
}

/// The level a record is logged at: its own, except for fuser's warnings and errors
/// that a clean exit or an ordinary request makes. fuser unmounts the mountpoint once
/// more when its session ends, after the kernel has already removed the mount
/// (`umount`), and warns that this failed; it warns for every request of a kind the
/// daemon does not implement, whose caller gets ENOSYS; and it logs an error for a
/// reply the kernel no longer waits for (ENOENT: its caller was interrupted, killed say,
/// while the request was served). None is something to act on.
pub fn lowered(target: &str, level: Level, message: &str) -> Level {
    if !matches!(level, Level::Warn | Level::Error) || !target.starts_with("fuser") {
        return level;
    }
    if level == Level::Error {
        return if message.starts_with("Failed to send FUSE reply: No such file or directory") {
            Level::Debug
        } else {
            level
        };
    }
    if message.starts_with("Failed to umount filesystem") || message.starts_with("Unmount failed") {
        Level::Info
    } else if message.starts_with("[Not Implemented]") {
        Level::Debug
    } else {
        level
    }
}

/// The syslog severity of a level (syslog(3) `LOG_ERR` … `LOG_DEBUG`).
fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One syslog line for `message` at `level` (without the trailing newline, which
/// datagram receivers do not want), stamped `stamp` (`Mmm dd hh:mm:ss`).
pub fn syslog_line(level: Level, pid: u32, stamp: &str, message: &str) -> String {
    let pri = FACILITY_DAEMON * 8 + severity(level);
    let mut line = format!("<{pri}>{stamp} {IDENTITY}[{pid}]: {level} ");
    let mut cut = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    line.push_str(message[..cut].trim_end());
    line
}

/// The local time as RFC 3164 writes it: `Mmm dd hh:mm:ss`, the day padded with a space.
fn timestamp() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t = libc::time_t::try_from(now).unwrap_or(0);
    // SAFETY: localtime_r writes only into `tm`, which outlives the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return "Jan  1 00:00:00".to_string();
    }
    let month = MONTHS[tm.tm_mon.clamp(0, 11) as usize];
    format!(
        "{month} {:2} {:02}:{:02}:{:02}",
        tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec
    )
}

/// The syslog socket, connected when first needed and again after a failure (the
/// syslog daemon restarted).
struct Syslog {
    path: PathBuf,
    socket: Mutex<Option<UnixDatagram>>,
}

impl Syslog {
    fn send(&self, line: &str) {
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        for _attempt in 0..2 {
            if socket.is_none() {
                let Ok(s) = UnixDatagram::unbound() else {
                    return;
                };
                if s.connect(&self.path).is_err() {
                    // Nobody listens: the line is lost, as syslog(3) loses it.
                    return;
                }
                *socket = Some(s);
            }
            match socket.as_ref().map(|s| s.send(line.as_bytes())) {
                Some(Ok(_)) => return,
                _ => *socket = None,
            }
        }
    }
}

/// The daemon's logger: env_logger's filter, env_logger's output or syslog.
struct DaemonLogger {
    filter: env_logger::Logger,
    syslog: Option<Syslog>,
}

impl DaemonLogger {
    fn emit(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        match &self.syslog {
            Some(s) => {
                let mut msg = String::new();
                let _ = write!(msg, "{}", record.args());
                let line = syslog_line(record.level(), std::process::id(), &timestamp(), &msg);
                s.send(&line);
            }
            None => self.filter.log(record),
        }
    }
}

impl Log for DaemonLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if matches!(record.level(), Level::Warn | Level::Error)
            && record.target().starts_with("fuser")
        {
            let msg = record.args().to_string();
            let level = lowered(record.target(), record.level(), &msg);
            if level != record.level() {
                return self.emit(
                    &Record::builder()
                        .level(level)
                        .target(record.target())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .args(format_args!("{msg}"))
                        .build(),
                );
            }
        }
        self.emit(record)
    }

    fn flush(&self) {
        self.filter.flush();
    }
}

/// Installs the daemon's logger: the level from `RUST_LOG` (see [`filter_spec`]), lines
/// to `destination`. Once per process; later calls change nothing.
pub fn init(destination: Destination) {
    let spec = filter_spec(std::env::var("RUST_LOG").ok().as_deref());
    let filter = env_logger::Builder::new().parse_filters(&spec).build();
    let max = filter.filter();
    let syslog = match destination {
        Destination::Stderr => None,
        Destination::Syslog(path) => Some(Syslog {
            path,
            socket: Mutex::new(None),
        }),
    };
    if log::set_boxed_logger(Box::new(DaemonLogger { filter, syslog })).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_level_is_warn_and_fuser_stays_at_warn() {
        assert_eq!(filter_spec(None), "warn");
        assert_eq!(filter_spec(Some("")), "warn");
        assert_eq!(filter_spec(Some("debug")), "debug,fuser=warn");
        assert_eq!(
            filter_spec(Some("pcocc_imagefs=trace")),
            "pcocc_imagefs=trace,fuser=warn"
        );
        assert_eq!(filter_spec(Some("debug/import")), "debug,fuser=warn/import");
        assert_eq!(filter_spec(Some("debug,fuser=debug")), "debug,fuser=debug");
    }

    #[test]
    fn clean_exit_warnings_of_fuser_are_lowered() {
        let t = "fuser::session";
        let m = "Failed to umount filesystem: EINVAL: Invalid argument";
        assert_eq!(lowered(t, Level::Warn, m), Level::Info);
        assert_eq!(
            lowered("fuser::mnt", Level::Warn, "Unmount failed: x"),
            Level::Info
        );
        assert_eq!(
            lowered("fuser", Level::Warn, "[Not Implemented] fsyncdir(ino: 1)"),
            Level::Debug
        );
        assert_eq!(lowered(t, Level::Warn, "Reply not sent"), Level::Warn);
        let gone = "Failed to send FUSE reply: No such file or directory (os error 2)";
        assert_eq!(lowered("fuser::reply", Level::Error, gone), Level::Debug);
        let other = "Failed to send FUSE reply: Invalid argument (os error 22)";
        assert_eq!(lowered("fuser::reply", Level::Error, other), Level::Error);
        assert_eq!(
            lowered("pcocc_imagefs::tree", Level::Warn, m),
            Level::Warn,
            "only fuser's own lines are lowered"
        );
    }

    #[test]
    fn syslog_lines_carry_facility_severity_identity_and_pid() {
        let l = syslog_line(Level::Warn, 42, "Mar  5 14:03:01", "import failed\n");
        assert_eq!(
            l,
            "<28>Mar  5 14:03:01 pcocc-imagefs[42]: WARN import failed"
        );
        let l = syslog_line(Level::Error, 1, "Jan 10 00:00:00", "x");
        assert!(l.starts_with("<27>"), "{l}");
        let long = "é".repeat(MAX_MESSAGE);
        let l = syslog_line(Level::Debug, 1, "Jan 10 00:00:00", &long);
        assert!(l.starts_with("<31>") && l.len() < MAX_MESSAGE + 64);
    }

    #[test]
    fn the_syslog_socket_receives_one_datagram_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rx = UnixDatagram::bind(&path).unwrap();
        let s = Syslog {
            path: path.clone(),
            socket: Mutex::new(None),
        };
        s.send("<28>x pcocc-imagefs[1]: WARN one");
        s.send("<28>x pcocc-imagefs[1]: WARN two");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<28>x pcocc-imagefs[1]: WARN one");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<28>x pcocc-imagefs[1]: WARN two");
        // The listener goes and comes back: lines reach the new one.
        drop(rx);
        std::fs::remove_file(&path).unwrap();
        s.send("lost");
        let rx = UnixDatagram::bind(&path).unwrap();
        s.send("three");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"three");
    }
}
