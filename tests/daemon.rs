//! The daemon as an administrator meets it: what it mounts on (and refuses to), what the
//! kernel and mount(8) see of its mount, and what stays mounted when it ends. Needs root
//! and `/dev/fuse`; with env `CI` set, their absence fails every test.

mod common;
use common::{daemon_pid, eventually, run, s};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const DAEMON: &str = env!("CARGO_BIN_EXE_pcocc-imagefs");
const HELPER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/mount-helpers/mount.pcocc-imagefs"
);

/// The kernel type of a pcocc-imagefs mount.
const FSTYPE: &str = "fuse.pcocc-imagefs";

/// One mount at a path as /proc/self/mountinfo lists it.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    fstype: String,
    source: String,
}

/// The mounts at `point`, bottom first (mountinfo lists a mount after the one it is
/// mounted on).
fn mounts_at(point: &Path) -> Vec<Mount> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = s(point).replace(' ', "\\040");
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.get(4) != Some(&want.as_str()) {
                return None;
            }
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                fstype: f.get(sep + 1)?.to_string(),
                source: f.get(sep + 2)?.to_string(),
            })
        })
        .collect()
}

/// A scratch directory with a configuration naming one repository (created by the daemon
/// on first use); whatever is still mounted under it is unmounted, and its daemons
/// stopped, when dropped.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Option<Scratch> {
        let dir = common::required_mount_scratch("daemon", &["mount", "umount", "findmnt"])?;
        let dir = Scratch { dir };
        fs::write(
            dir.config(),
            format!(
                "repos:\n  - name: user\n    path: {}\n",
                s(&dir.path().join("repo"))
            ),
        )
        .unwrap();
        Some(dir)
    }

    fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    fn config(&self) -> PathBuf {
        self.path().join("repos.yaml")
    }

    /// A new empty directory `name` in the scratch directory.
    fn dir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// Runs the daemon on `mnt` with `--config`, `-o allow_other` and `extra` options.
    fn start(&self, mnt: &Path, extra: &[&str]) -> Output {
        let config = self.config();
        Command::new(DAEMON)
            .args(["--config", s(&config), "-o", "allow_other"])
            .args(extra)
            .arg(mnt)
            .output()
            .expect("run pcocc-imagefs")
    }

    /// [`Scratch::start`], which must succeed with the mount live.
    #[track_caller]
    fn mount(&self, mnt: &Path, extra: &[&str]) {
        let config = self.config();
        let mut args = vec!["--config", s(&config), "-o", "allow_other"];
        args.extend_from_slice(extra);
        args.push(s(mnt));
        common::start_daemon(&args, mnt, "warn");
    }

    /// Mounts a tmpfs holding `file` (with "kept") on a new directory `name`.
    fn tmpfs_with_file(&self, name: &str) -> PathBuf {
        let mnt = self.dir(name);
        common::ok(
            "mount",
            &["-t", "tmpfs", "-o", "size=1m", "scratch", s(&mnt)],
        );
        fs::write(mnt.join("file"), "kept").unwrap();
        mnt
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.path();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(s(&root)))
            .collect();
        points.dedup();
        // Deepest and most recent first.
        for p in points.into_iter().rev() {
            let p = PathBuf::from(p.replace("\\040", " "));
            let pid = daemon_pid(&p);
            common::stop_daemon(&p, pid);
            // A tmpfs under the daemon's mount, or a mount a failed test left.
            for _ in 0..4 {
                if mounts_at(&p).is_empty() {
                    break;
                }
                let _ = run("umount", &["-l", s(&p)]);
            }
        }
    }
}

/// `umount TARGET`, retried for up to 10 s while it fails: a path lookup running at that
/// moment anywhere on the machine (a `find`, a shell completing a name) holds the mount
/// for its duration, and umount(2) then answers EBUSY. Returns the last attempt.
fn umount(target: &str) -> Output {
    let mut out = run("umount", &[target]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.status.success() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        out = run("umount", &[target]);
    }
    out
}

/// Waits until the daemon serving `mnt` (pid `pid`) has exited; false after 10 s.
fn exited(mnt: &Path, pid: i32) -> bool {
    eventually(Duration::from_secs(10), || daemon_pid(mnt) != Some(pid))
}

#[track_caller]
fn assert_tmpfs_intact(mnt: &Path) {
    assert_eq!(
        mounts_at(mnt),
        [Mount {
            fstype: "tmpfs".into(),
            source: "scratch".into()
        }],
        "only the tmpfs must be left on {}",
        mnt.display()
    );
    assert_eq!(fs::read_to_string(mnt.join("file")).unwrap(), "kept");
}

#[test]
fn umount_of_a_mount_over_a_tmpfs_leaves_the_tmpfs_and_its_file() {
    let Some(t) = Scratch::new() else { return };
    let mnt = t.tmpfs_with_file("over-tmpfs");
    t.mount(&mnt, &["-o", "nonempty"]);
    let pid = daemon_pid(&mnt).expect("daemon pid");
    assert!(mnt.join("user").is_dir(), "the mount serves the repository");
    assert!(
        !mnt.join("file").exists(),
        "the tmpfs is hidden under the mount"
    );
    let out = umount(s(&mnt));
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon ends after the unmount: what it does on its way out must spare the tmpfs.
    assert!(exited(&mnt, pid), "the daemon must exit after umount");
    assert_tmpfs_intact(&mnt);
}

#[test]
fn sigterm_to_a_daemon_mounted_over_a_tmpfs_leaves_the_tmpfs_and_its_file() {
    let Some(t) = Scratch::new() else { return };
    let mnt = t.tmpfs_with_file("over-tmpfs");
    t.mount(&mnt, &["-o", "nonempty"]);
    let pid = daemon_pid(&mnt).expect("daemon pid");
    // SAFETY: signalling the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(exited(&mnt, pid), "the daemon must exit on SIGTERM");
    assert_tmpfs_intact(&mnt);
}

#[test]
fn a_second_mount_on_a_mounted_directory_is_refused_naming_it() {
    let Some(t) = Scratch::new() else { return };
    let mnt = t.dir("mnt");
    t.mount(&mnt, &[]);
    let out = t.start(&mnt, &["-o", "nonempty"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second mount accepted: {err}");
    assert!(
        err.contains(&format!(
            "{} already holds a pcocc-imagefs mount (source {})",
            s(&mnt),
            s(&t.config())
        )),
        "{err}"
    );
    assert_eq!(mounts_at(&mnt).len(), 1, "{:?}", mounts_at(&mnt));
    assert!(mnt.join("user").is_dir(), "the first mount still serves");
}

#[test]
fn a_regular_file_is_refused_as_mountpoint() {
    let Some(t) = Scratch::new() else { return };
    let file = t.path().join("plain");
    fs::write(&file, "x").unwrap();
    let out = t.start(&file, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mount on a file accepted: {err}");
    assert!(
        err.contains(&format!("{}: not a directory", s(&file))),
        "{err}"
    );
    assert!(mounts_at(&file).is_empty());
    assert_eq!(fs::read_to_string(&file).unwrap(), "x");
}

#[test]
fn a_non_empty_directory_is_refused_unless_nonempty_is_given() {
    let Some(t) = Scratch::new() else { return };
    let mnt = t.dir("full");
    fs::write(mnt.join("file"), "kept").unwrap();
    let out = t.start(&mnt, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "non-empty directory accepted: {err}");
    assert!(
        err.contains(&format!("{} is not empty", s(&mnt))) && err.contains("-o nonempty"),
        "{err}"
    );
    assert!(mounts_at(&mnt).is_empty());
    t.mount(&mnt, &["-o", "nonempty"]);
    assert!(mnt.join("user").is_dir());
    common::unmount(&mnt);
    assert_eq!(fs::read_to_string(mnt.join("file")).unwrap(), "kept");
}

#[test]
fn the_mount_shows_its_type_and_the_configuration_as_source() {
    let Some(t) = Scratch::new() else { return };
    let mnt = t.dir("mnt");
    t.mount(&mnt, &[]);
    assert_eq!(
        mounts_at(&mnt),
        [Mount {
            fstype: FSTYPE.into(),
            source: s(&t.config()).into()
        }]
    );
    let listed = common::ok(
        "findmnt",
        &["-n", "-t", FSTYPE, "-o", "SOURCE", "--mountpoint", s(&mnt)],
    );
    assert_eq!(listed.trim(), s(&t.config()));
}

/// The mount helper installed where mount(8) looks for it, for as long as this value
/// lives: `/sbin/mount.fuse.pcocc-imagefs`, a link to a copy of the helper in `bin`
/// beside a link to the daemon (so the helper finds the daemon next to itself). What
/// was installed there before is put back when dropped.
struct InstalledHelper {
    link: PathBuf,
    saved: Option<PathBuf>,
}

impl InstalledHelper {
    fn install(bin: &Path) -> InstalledHelper {
        fs::create_dir_all(bin).unwrap();
        copy_helper(&bin.join("mount.pcocc-imagefs"));
        std::os::unix::fs::symlink(DAEMON, bin.join("pcocc-imagefs")).unwrap();
        let link = PathBuf::from("/sbin/mount.fuse.pcocc-imagefs");
        let mut saved = None;
        if let Ok(target) = fs::read_link(&link) {
            // A link left by an interrupted run of this test points into a scratch
            // directory that is gone.
            if !target.exists() {
                fs::remove_file(&link).unwrap();
            }
        }
        if fs::symlink_metadata(&link).is_ok() {
            let keep = link.with_extension("pcocc-imagefs-test-saved");
            fs::rename(&link, &keep).unwrap();
            saved = Some(keep);
        }
        std::os::unix::fs::symlink(bin.join("mount.pcocc-imagefs"), &link).unwrap();
        InstalledHelper { link, saved }
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.link);
        if let Some(keep) = &self.saved {
            let _ = fs::rename(keep, &self.link);
        }
    }
}

/// Where `program` is in this process's PATH.
fn in_path(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not in PATH"))
}

/// `mount ARGS` with a PATH holding neither the daemon nor the helper.
fn mount8(args: &[&str]) -> Output {
    Command::new(in_path("mount"))
        .args(args)
        .env("PATH", "/nonexistent")
        .output()
        .expect("run mount")
}

#[test]
fn mount_all_twice_from_an_fstab_mounts_once_and_umount_of_the_source_unmounts() {
    let Some(t) = Scratch::new() else { return };
    let mnt = t.dir("fstab-mnt");
    let fstab = t.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# a test fstab\n{}  {}  {FSTYPE}  allow_other,nofail,_netdev  0 0\n",
            s(&t.config()),
            s(&mnt)
        ),
    )
    .unwrap();
    let _helper = InstalledHelper::install(&t.path().join("bin"));
    for round in 1..=2 {
        let out = mount8(&["-T", s(&fstab), "-a"]);
        assert!(
            out.status.success(),
            "mount -a, round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            mounts_at(&mnt),
            [Mount {
                fstype: FSTYPE.into(),
                source: s(&t.config()).into()
            }],
            "after mount -a, round {round}"
        );
    }
    assert!(mnt.join("user").is_dir());
    let listed = common::ok("findmnt", &["-n", "-t", FSTYPE, "-o", "TARGET"]);
    assert!(listed.lines().any(|l| l.trim() == s(&mnt)), "{listed}");
    let pid = daemon_pid(&mnt).expect("daemon pid");
    let out = umount(s(&t.config()));
    assert!(
        out.status.success(),
        "umount SOURCE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mounts_at(&mnt).is_empty());
    assert!(exited(&mnt, pid));
}

#[test]
fn the_helper_finds_the_daemon_next_to_it_without_a_path() {
    let Some(t) = Scratch::new() else { return };
    let bin = t.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    copy_helper(&bin.join("mount.pcocc-imagefs"));
    std::os::unix::fs::symlink(DAEMON, bin.join("pcocc-imagefs")).unwrap();
    let mnt = t.dir("mnt");
    let out = Command::new(bin.join("mount.pcocc-imagefs"))
        .args([s(&t.config()), s(&mnt), "-o", "allow_other,defaults"])
        .args(["-t", FSTYPE])
        .env_clear()
        .output()
        .expect("run the helper");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mounts_at(&mnt).len(), 1);
    assert!(mnt.join("user").is_dir());
}

/// Copies the mount helper to `dst` with cp(1): written by this process, the file could
/// still be open for writing in a child another test thread forks at that moment, and
/// executing it would then fail with ETXTBSY.
fn copy_helper(dst: &Path) {
    common::ok("cp", &[HELPER, s(dst)]);
}
