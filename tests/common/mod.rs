//! Helpers shared by the integration tests that run the binaries and the qemu tools
//! (`tests/cli.rs`, `tests/cli_import_export.rs`, `tests/mount.rs`,
//! `tests/reliability.rs`, `tests/resources.rs`). Each test crate includes this module
//! and uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub mod foreign;

/// Runs `prog` with `args` and returns what it did, panicking only if it cannot start.
#[track_caller]
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs `prog` with `args`, asserts it succeeded and returns its standard output.
#[track_caller]
pub fn ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that qemu-img reads the same disk in `a` (a `fa` image) and `b` (a `fb`
/// image): `qemu-img compare`, the judge of every format.
#[track_caller]
pub fn assert_same_disk(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = run("qemu-img", &["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert!(
        out.status.success(),
        "{} ({fa}) and {} ({fb}) differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test path as the `&str` an argument list wants.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// Whether this process can mount the daemon and run `tools`: root, `/dev/fuse`, and each
/// tool answering `--version`. When not, says why (naming `suite`) so that a skipped test
/// never passes silently.
pub fn can_mount(suite: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid only reads the process credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    let have = tools.iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && fuse && have) {
        skip(&format!(
            "{suite} tests need root ({root}), /dev/fuse ({fuse}) and {} ({have})",
            tools.join(", ")
        ));
    }
    root && fuse && have
}

/// A scratch directory for a test that mounts the daemon, when [`can_mount`] says it can
/// (`suite` and `tools` as there). Under /var/tmp, a disk filesystem, where /tmp may be
/// a small tmpfs: the tests write multi-GiB sparse sources and layers there.
pub fn mount_scratch(suite: &str, tools: &[&str]) -> Option<tempfile::TempDir> {
    if !can_mount(suite, tools) {
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("imagefs-{suite}"))
        .tempdir_in("/var/tmp")
        .expect("a scratch directory in /var/tmp");
    Some(dir)
}

/// Starts pcocc-imagefs with `args` (the mountpoint `mnt` last among them) and
/// `RUST_LOG=log`; asserts it succeeded and that `mnt` is mounted when it returns (the
/// daemon returns once its mount is live).
#[track_caller]
pub fn start_daemon(args: &[&str], mnt: &Path, log: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_pcocc-imagefs"))
        .args(args)
        .env("RUST_LOG", log)
        .output()
        .expect("run pcocc-imagefs");
    assert!(
        out.status.success(),
        "pcocc-imagefs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(mnt), "mount not live when the daemon returned");
}

/// Whether something is mounted on `mnt`.
pub fn is_mounted(mnt: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(s(mnt)))
}

/// Unmounts `mnt`, retrying while it is busy, lazily after 10 s.
pub fn unmount(mnt: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(mnt) {
        if run("umount", &[s(mnt)]).status.success() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = run("umount", &["-l", s(mnt)]);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The pid of the pcocc-imagefs process serving `mnt` (from its command line).
pub fn daemon_pid(mnt: &Path) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"pcocc-imagefs"));
        if is_daemon && args.contains(&mnt.as_os_str().as_encoded_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Whether qemu-img runs here; when not, says that the test is skipped.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip("qemu-img is not installed (Debian package qemu-utils)");
    }
    ok
}

/// Whether this run must not skip a test: in CI (env `CI` set and not `false`) or with
/// `PCOCC_IMAGEFS_NO_SKIP=1` (`.ci/run` sets both).
pub fn no_skip() -> bool {
    let set =
        |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("PCOCC_IMAGEFS_NO_SKIP")
}

/// Says why the calling test skips its checks; fails it instead in a run that must not
/// skip ([`no_skip`]).
#[track_caller]
pub fn skip(reason: &str) {
    assert!(
        !no_skip(),
        "this run must not skip a test, and this one would: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
}

/// What one run of a program printed and returned.
#[derive(Debug)]
pub struct Run {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

impl Run {
    /// Asserts the whole output and the exit status.
    #[track_caller]
    pub fn expect(&self, stdout: &str, stderr: &str, code: i32) {
        assert_eq!(
            self.stdout, stdout,
            "stdout differs; stderr was {:?}",
            self.stderr
        );
        assert_eq!(
            self.stderr, stderr,
            "stderr differs; stdout was {:?}",
            self.stdout
        );
        assert_eq!(self.code, code, "exit status differs: {self:?}");
    }

    /// Asserts a pcocc error: nothing on stdout, `message` on stderr, exit 255.
    #[track_caller]
    pub fn expect_error(&self, message: &str) {
        self.expect("", &format!("{message}\n"), 255);
    }
}

/// Runs `program ARGS` the way a user of a test fixture rooted at `root` would: in
/// `root/work`, with `TZ=UTC`, `HOME=root/home` and pcocc's configuration directories
/// `root/user-conf` and `root/etc`, and no logging or colour settings of the caller.
pub fn run_in_fixture(root: &Path, program: &str, args: &[&str]) -> Run {
    let output = Command::new(program)
        .args(args)
        .current_dir(root.join("work"))
        .env("TZ", "UTC")
        .env("HOME", root.join("home"))
        .env("PCOCC_USER_CONF_DIR", root.join("user-conf"))
        .env("PCOCC_SYSTEM_CONF_DIR", root.join("etc"))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        code: output.status.code().unwrap_or(-1),
    }
}

/// The names in directory `dir`, sorted (none when it cannot be read).
pub fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; true if it held.
pub fn eventually(limit: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// [`mount_scratch`], for the suites written with it: in a run that must not skip
/// ([`no_skip`]) missing prerequisites fail the test, as they do for every suite.
pub fn required_mount_scratch(suite: &str, tools: &[&str]) -> Option<tempfile::TempDir> {
    mount_scratch(suite, tools)
}

/// Unmounts `mnt` and makes sure its daemon `pid` (if known) is gone: a daemon stuck in
/// a system call (the open of a FIFO) does not exit when unmounted, and is killed
/// rather than left behind.
pub fn stop_daemon(mnt: &Path, pid: Option<i32>) {
    unmount(mnt);
    if let Some(pid) = pid
        && !eventually(std::time::Duration::from_secs(3), || {
            daemon_pid(mnt) != Some(pid)
        })
    {
        // SAFETY: killing the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Repositories `repos/NAME` in a scratch directory (with `work/`, reachable by other
/// users), a configuration naming them (the first the default) and one daemon mounted on
/// `mnt/` as root with `allow_other` and default options otherwise (plus `extra`);
/// unmounted, and its daemon killed if it hangs, when dropped, even by a panic.
pub struct MountedRepos {
    pub dir: tempfile::TempDir,
    pub mnt: std::path::PathBuf,
    /// The daemon last started on `mnt`.
    daemon: std::cell::Cell<Option<i32>>,
}

impl MountedRepos {
    /// `None` (the test then returns) when this run cannot mount; see [`mount_scratch`]
    /// for `suite` and `tools`.
    pub fn start(suite: &str, tools: &[&str], repos: &[&str], extra: &[&str]) -> Option<Self> {
        let m = Self::prepare(suite, tools, repos)?;
        m.mount(extra);
        Some(m)
    }

    /// [`MountedRepos::start`] with the daemon logging to [`MountedRepos::log_file`].
    pub fn start_logged(suite: &str, tools: &[&str], repos: &[&str]) -> Option<Self> {
        let m = Self::prepare(suite, tools, repos)?;
        let log = m.log_file();
        m.mount(&["--log-file", s(&log)]);
        Some(m)
    }

    /// The scratch directory, its repositories and the configuration, nothing mounted.
    fn prepare(suite: &str, tools: &[&str], repos: &[&str]) -> Option<Self> {
        let dir = required_mount_scratch(suite, tools)?;
        let m = MountedRepos {
            mnt: dir.path().join("mnt"),
            dir,
            daemon: std::cell::Cell::new(None),
        };
        for sub in ["repos", "work", "mnt"] {
            std::fs::create_dir_all(m.dir.path().join(sub)).unwrap();
        }
        for sub in ["", "repos", "work"] {
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(m.dir.path().join(sub), mode).unwrap();
        }
        let mut yaml = String::from("repos:\n");
        for r in repos {
            yaml += &format!("  - name: {r}\n    path: {}\n", s(&m.repo(r)));
        }
        std::fs::write(m.config(), yaml).unwrap();
        Some(m)
    }

    /// Where a daemon started by [`MountedRepos::start_logged`] logs.
    pub fn log_file(&self) -> std::path::PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Starts the daemon on `mnt` with the options users have (`allow_other` and
    /// `extra`); returns once the mount is live.
    pub fn mount(&self, extra: &[&str]) {
        let config = self.config();
        let mut args = vec!["--config", s(&config), "-o", "allow_other"];
        args.extend_from_slice(extra);
        args.push(s(&self.mnt));
        start_daemon(&args, &self.mnt, "info");
        self.daemon.set(daemon_pid(&self.mnt));
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mnt)
    }

    pub fn unmount(&self) {
        unmount(&self.mnt);
    }

    pub fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("repos.yaml")
    }

    pub fn repo(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("repos").join(name)
    }

    pub fn work_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("work")
    }

    /// `rel` under the mountpoint.
    pub fn at(&self, rel: &str) -> std::path::PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for MountedRepos {
    fn drop(&mut self) {
        stop_daemon(&self.mnt, self.daemon.get());
    }
}

/// A scratch directory for the pcocc command: repositories `user` (the default) and
/// `global` under `repos/`, pcocc's configuration directories, a home, and the work
/// directory where commands run (see [`run_in_fixture`]).
pub struct CliScratch {
    dir: tempfile::TempDir,
}

impl CliScratch {
    pub fn new() -> CliScratch {
        let f = CliScratch {
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        for sub in ["etc", "user-conf", "home", "work", "repos"] {
            std::fs::create_dir_all(f.root().join(sub)).expect("fixture directories");
        }
        let mut yaml = String::from("repos:\n");
        for repo in ["user", "global"] {
            yaml.push_str(&format!(
                "  - name: {repo}\n    path: {}\n",
                f.repo(repo).display()
            ));
        }
        std::fs::write(f.root().join("etc/repos.yaml"), yaml).expect("repos.yaml");
        f
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn repo(&self, name: &str) -> std::path::PathBuf {
        self.root().join("repos").join(name)
    }

    pub fn work(&self, name: &str) -> std::path::PathBuf {
        self.root().join("work").join(name)
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Run {
        run_in_fixture(self.root(), program, args)
    }

    /// `pcocc image ARGS`.
    pub fn pcocc(&self, args: &[&str]) -> Run {
        let mut all = vec!["image"];
        all.extend_from_slice(args);
        self.run(env!("CARGO_BIN_EXE_pcocc"), &all)
    }

    /// Runs `program ARGS` in the work directory; asserts it succeeded; its stdout.
    #[track_caller]
    pub fn tool(&self, program: &str, args: &[&str]) -> String {
        let run = self.run(program, args);
        assert_eq!(run.code, 0, "{program} {args:?}: {run:?}");
        run.stdout
    }
}
