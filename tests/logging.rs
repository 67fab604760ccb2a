//! What a background daemon tells syslog: each refused change once, at WARN, naming the
//! file, the caller's uid and the reason (the caller itself only gets an errno, checked
//! here too), and nothing at all for ordinary use and a clean unmount at the default
//! level.
//!
//! The daemon is started in the background (no `--foreground`) as root with
//! `allow_other`, with `PCOCC_IMAGEFS_SYSLOG` naming a datagram socket the test listens
//! on in its scratch directory, in place of `/dev/log`. Writers run as `nobody` (uid
//! 65534, through `setpriv`) in a repository that `nobody` owns. Needs root, `/dev/fuse`
//! and setpriv; without them each test prints SKIPPED and returns, except in CI (env
//! `CI` set), where a test that cannot run fails.

mod common;
use common::{daemon_pid, s};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const PCOCC: &str = env!("CARGO_BIN_EXE_pcocc");
const DAEMON: &str = env!("CARGO_BIN_EXE_pcocc-imagefs");
/// The unprivileged writer (`nobody` on Debian-like systems).
const NOBODY: u32 = 65534;
const TOOLS: &[&str] = &["setpriv"];
/// The syslog priority of a warning of facility daemon: 3 × 8 + 4.
const WARN_PRI: &str = "<28>";

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `args` as `nobody` with no supplementary group.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run setpriv: {e}"))
}

/// Runs `args` as root and asserts that it succeeded.
#[track_caller]
fn ok(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Repositories `user` (owned by `nobody`) and `locked` (root's, mode 0755), a syslog
/// socket, and a background daemon logging to it; unmounted (the daemon killed if it
/// hangs) when dropped.
struct Site {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    syslog: UnixDatagram,
    daemon: Option<i32>,
}

impl Site {
    fn start() -> Option<Site> {
        let dir = common::required_mount_scratch("logging", TOOLS)?;
        for sub in ["repos", "work", "home", "mnt"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        for sub in ["", "repos", "work"] {
            chmod(&dir.path().join(sub), 0o755);
        }
        let repos = dir.path().join("repos");
        let yaml = format!(
            "repos:\n  - name: user\n    path: {}\n  - name: locked\n    path: {}\n",
            s(&repos.join("user")),
            s(&repos.join("locked"))
        );
        fs::write(dir.path().join("repos.yaml"), yaml).unwrap();
        // The CLI creates the repositories, as a first use does; `user` is then nobody's.
        let out = Command::new(PCOCC)
            .args(["image", "repo", "list"])
            .env("HOME", dir.path().join("home"))
            .env("PCOCC_USER_CONF_DIR", dir.path().join("home"))
            .env("PCOCC_SYSTEM_CONF_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "repo list: {}", text(&out.stderr));
        ok(&["chown", "-R", "65534:65534", s(&repos.join("user"))]);

        let sock = dir.path().join("syslog.sock");
        let syslog = UnixDatagram::bind(&sock).expect("bind the syslog socket");
        let mnt = dir.path().join("mnt");
        let config = dir.path().join("repos.yaml");
        let out = Command::new(DAEMON)
            .args(["--config", s(&config), "-o", "allow_other", s(&mnt)])
            .env("PCOCC_IMAGEFS_SYSLOG", &sock)
            .env_remove("RUST_LOG")
            .output()
            .expect("run pcocc-imagefs");
        assert!(
            out.status.success(),
            "pcocc-imagefs failed: {}",
            text(&out.stderr)
        );
        assert!(common::is_mounted(&mnt), "mount not live");
        let daemon = daemon_pid(&mnt);
        Some(Site {
            dir,
            mnt,
            syslog,
            daemon,
        })
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// A valid 1 MiB raw disk (whole sectors, not all zeroes), readable by everyone.
    fn disk(&self) -> PathBuf {
        let p = self.work().join("disk.raw");
        let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(&p, bytes).unwrap();
        chmod(&p, 0o644);
        p
    }

    /// A text file of 34 bytes (no image format, not whole sectors).
    fn text_file(&self) -> PathBuf {
        let p = self.work().join("notes.txt");
        fs::write(&p, "these are notes, not a disk image\n").unwrap();
        chmod(&p, 0o644);
        p
    }

    /// The lines received so far, waiting until none has come for `quiet`.
    fn lines(&self, quiet: Duration) -> Vec<String> {
        self.syslog.set_read_timeout(Some(quiet)).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = self.syslog.recv(&mut buf) {
            out.push(text(&buf[..n]));
        }
        out
    }

    /// Unmounts and waits for the daemon to exit (what it logs on its way out included).
    fn stop(&mut self) {
        common::stop_daemon(&self.mnt, self.daemon.take());
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asserts the form of a syslog line of the daemon `pid`: `<PRI>Mmm dd hh:mm:ss
/// pcocc-imagefs[PID]: LEVEL message`, with facility daemon.
#[track_caller]
fn assert_syslog_form(line: &str, pid: Option<i32>) {
    let pri: u32 = line
        .strip_prefix('<')
        .and_then(|r| r.split_once('>'))
        .and_then(|(p, _)| p.parse().ok())
        .unwrap_or_else(|| panic!("no <PRI> at the start of {line:?}"));
    assert_eq!(pri / 8, 3, "facility daemon: {line:?}");
    let ident = match pid {
        Some(p) => format!(" pcocc-imagefs[{p}]: "),
        None => " pcocc-imagefs[".to_string(),
    };
    assert!(line.contains(&ident), "identity {ident:?} in {line:?}");
}

#[test]
fn refusals_are_logged_once_with_file_caller_and_reason() {
    let Some(site) = Site::start() else {
        return;
    };
    let pid = site.daemon;
    let notes = site.text_file();
    let disk = site.disk();

    // A text file: close(2) fails with EINVAL, nothing is published.
    let out = as_nobody(&["cp", s(&notes), s(&site.at("user/notes"))]);
    assert!(!out.status.success(), "cp of a text file must fail");
    assert!(
        text(&out.stderr).contains("Invalid argument"),
        "cp of a text file: {}",
        text(&out.stderr)
    );
    // A name of 254 bytes (images take at most 250): ENAMETOOLONG at create.
    let long = "x".repeat(254);
    let out = as_nobody(&["cp", s(&disk), s(&site.at(&format!("user/{long}")))]);
    assert!(!out.status.success(), "cp to a 254-byte name must fail");
    assert!(
        text(&out.stderr).contains("File name too long"),
        "cp to a 254-byte name: {}",
        text(&out.stderr)
    );
    // A repository nobody may not write: EACCES.
    let out = as_nobody(&["cp", s(&disk), s(&site.at("locked/mine"))]);
    assert!(!out.status.success(), "cp into root's repository must fail");
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "cp into root's repository: {}",
        text(&out.stderr)
    );
    // What succeeds says nothing.
    let out = as_nobody(&["cp", s(&disk), s(&site.at("user/good"))]);
    assert!(out.status.success(), "cp of a disk: {}", text(&out.stderr));

    let lines = site.lines(Duration::from_millis(500));
    for l in &lines {
        assert_syslog_form(l, pid);
    }
    let warnings: Vec<&String> = lines.iter().filter(|l| l.starts_with(WARN_PRI)).collect();
    let about = |what: &str| -> Vec<&String> {
        warnings
            .iter()
            .copied()
            .filter(|l| l.contains(what))
            .collect()
    };
    let all = lines.join("\n");

    let notes_lines = about("user/notes ");
    assert_eq!(notes_lines.len(), 1, "one warning about user/notes:\n{all}");
    let l = notes_lines[0];
    assert!(l.contains("uid 65534"), "the caller in {l:?}");
    assert!(
        l.contains("not a disk image") && l.contains("not a multiple of 512 bytes"),
        "the reason in {l:?}"
    );

    let long_lines = about(&format!("user/{long} "));
    assert_eq!(
        long_lines.len(),
        1,
        "one warning about the long name:\n{all}"
    );
    let l = long_lines[0];
    assert!(l.contains("uid 65534"), "the caller in {l:?}");
    assert!(l.contains("Object name too long"), "the reason in {l:?}");

    let locked_lines = about("locked/mine ");
    assert_eq!(
        locked_lines.len(),
        1,
        "one warning about locked/mine:\n{all}"
    );
    let l = locked_lines[0];
    assert!(
        l.contains("uid 65534") && l.contains("ermission denied"),
        "the caller and the reason in {l:?}"
    );

    assert_eq!(warnings.len(), 3, "no other warning:\n{all}");
    assert!(
        lines.iter().all(|l| !l.contains("user/good")),
        "nothing about the import that succeeded:\n{all}"
    );
}

#[test]
fn ordinary_use_and_a_clean_unmount_log_nothing_at_the_default_level() {
    let Some(mut site) = Site::start() else {
        return;
    };
    let disk = site.disk();
    let back = site.work().join("back");
    fs::create_dir_all(&back).unwrap();
    chmod(&back, 0o777);
    let script = r#"set -e
        ls -l "$M" "$M/user" >/dev/null
        cp "$DISK" "$M/user/img"
        ls -lR "$M/user/img" >/dev/null
        cat "$M/user/img/@0/meta.json" >/dev/null
        cp "$M/user/img/@0/disk.raw" "$BACK/disk.raw"
        cmp "$DISK" "$BACK/disk.raw"
        cp "$M/user/img/@0/disk.qcow2" "$BACK/disk.qcow2"
        ls -l "$M/user/img/latest" "$M/user/nothing-here" >/dev/null 2>&1 || true
        rm -r "$M/user/img"
        test ! -e "$M/user/img"
        rm "$BACK"/*"#;
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            "bash",
            "-c",
            script,
        ])
        .env("M", &site.mnt)
        .env("DISK", &disk)
        .env("BACK", &back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ordinary use failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    site.stop();
    let lines = site.lines(Duration::from_millis(500));
    assert!(
        lines.is_empty(),
        "nothing may be logged at the default level:\n{}",
        lines.join("\n")
    );
}
