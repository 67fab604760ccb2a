//! The attacks of an ordinary user on a root daemon mounted with `allow_other` (default
//! options otherwise). The daemon acts as root on the repositories, so everything it does
//! for a caller must be what that caller could do directly: no file outside their rights
//! read (a layer swapped for a symlink, a directory swapped for a symlink mid-operation,
//! ACLs and modes of `data/` and of layers), no change they could not make (the sticky
//! bit of a shared repository, a group repository without the group), nothing left behind
//! that they cannot manage (files owned by root in their own repository), and no hang on
//! metadata that is not a regular file.
//!
//! Each test reproduces one attack as `nobody` (uid 65534, through `setpriv`), asserts
//! that it fails the way it fails directly, and that nothing outside the user's rights
//! changed or was read. Needs root, `/dev/fuse`, qemu-img, qemu-io, setpriv, setfacl and
//! /usr/bin/python3; without them each test prints SKIPPED and returns, except in CI
//! (env `CI` set), where a test that cannot run fails.

mod common;
use common::{daemon_pid, ok, run, s};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

const PCOCC: &str = env!("CARGO_BIN_EXE_pcocc");
/// The unprivileged user of the attacks (`nobody` on Debian-like systems).
const NOBODY: u32 = 65534;
/// A group no account has, given to `nobody` as a supplementary group by setpriv.
const TEAM_GID: u32 = 4242;
/// A python reachable by `nobody` (a pyenv shim under /root is not).
const PYTHON: &str = "/usr/bin/python3";
/// Tools the tests run, besides the binaries of this crate.
const TOOLS: &[&str] = &["qemu-img", "qemu-io", "setpriv", "setfacl", PYTHON];
/// Every view of a revision.
const VIEWS: [&str; 6] = [
    "disk.raw",
    "disk.qcow2",
    "disk.qed",
    "disk.vdi",
    "disk.vpc",
    "disk.vmdk",
];
/// What the root-only file of the symlink attack holds, and what no read may return.
const MAGIC: &[u8] = b"PCOCC-IMAGEFS-ROOT-ONLY-SECRET-7f3a9c1e";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `setpriv` arguments that make the command run as `nobody` with the supplementary
/// `groups` (none when empty).
fn setpriv_args(groups: &[u32]) -> Vec<String> {
    let mut a = vec![format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")];
    if groups.is_empty() {
        a.push("--clear-groups".into());
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        a.push(format!("--groups={}", list.join(",")));
    }
    a.push("--".into());
    a
}

/// `args` as a command run by `nobody` with the supplementary `groups`.
fn nobody_cmd(groups: &[u32], args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(setpriv_args(groups)).args(args);
    c
}

/// Runs `args` as `nobody` with the supplementary `groups` (none when empty).
fn as_nobody(groups: &[u32], args: &[&str]) -> Output {
    nobody_cmd(groups, args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run setpriv: {e}"))
}

/// Runs `cmd`, killing it if it has not finished within `limit`: its output, or an
/// error saying it hung.
fn run_within(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.map_err(|e| e.to_string()),
        Err(_) => {
            // SAFETY: killing the child this function started (not yet reaped: the
            // waiting thread has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(format!("{cmd:?} did not return within {limit:?}"))
        }
    }
}

#[track_caller]
fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// Asserts that `out` failed with the message of `errno` (e.g. "Permission denied").
#[track_caller]
fn assert_fails_with(out: &Output, message: &str, what: &str) {
    assert!(
        !out.status.success(),
        "{what} must fail with \"{message}\" but succeeded (stdout {:?})",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(out).contains(message),
        "{what} must fail with \"{message}\": {}",
        stderr(out)
    );
}

#[track_caller]
fn assert_succeeds(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} must work: {}", stderr(out));
}

/// Every entry under `root` (itself included): path relative to `root` mapped to type,
/// mode, owner, group and, for a file, the hash of its content (for a symlink, its
/// target). Symlinks are never followed.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ft = m.file_type();
        let what = if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("symlink -> {}", fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            format!("file {}", hex(&fs::read(&p).unwrap()))
        } else {
            format!("special {:?}", ft)
        };
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        out.insert(
            rel,
            format!("{what} mode {:o} {}:{}", m.mode(), m.uid(), m.gid()),
        );
    }
    out
}

/// Asserts that two snapshots are the same, naming each entry that differs.
#[track_caller]
fn assert_same_tree(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diffs.push(format!("removed {k:?} ({v})")),
            Some(w) if w != v => diffs.push(format!("changed {k:?}: {v} => {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            diffs.push(format!("added {k:?} ({v})"));
        }
    }
    assert!(diffs.is_empty(), "the tree changed:\n{}", diffs.join("\n"));
}

/// Repositories in a scratch directory (mode 0755 down to `repos/`), a configuration
/// naming them, and one daemon mounted as root with `allow_other`; unmounted (and the
/// daemon killed if it hangs) when dropped, even by a panic.
struct Site {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    daemon: Option<i32>,
}

impl Site {
    /// The repositories `repos`, created by the CLI as root; nothing mounted yet.
    fn new(repos: &[&str]) -> Option<Site> {
        let dir = common::required_mount_scratch("security", TOOLS)?;
        let site = Site {
            mnt: dir.path().join("mnt"),
            dir,
            daemon: None,
        };
        for sub in ["repos", "work", "home", "user-conf", "mnt"] {
            fs::create_dir_all(site.dir.path().join(sub)).unwrap();
        }
        for sub in ["", "repos", "work"] {
            chmod(&site.dir.path().join(sub), 0o755);
        }
        chmod(&site.dir.path().join("home"), 0o777);
        let mut yaml = String::from("repos:\n");
        for r in repos {
            yaml += &format!("  - name: {r}\n    path: {}\n", s(&site.repo(r)));
        }
        fs::write(site.config(), yaml).unwrap();
        // Let the CLI create the repositories, as a first use does.
        let out = site.pcocc(&[], false, &["image", "repo", "list"]).output();
        assert_succeeds(&out.unwrap(), "pcocc image repo list");
        Some(site)
    }

    /// Mounts the daemon (as root, `allow_other`, default options otherwise).
    fn mount(&mut self) {
        let config = self.config();
        let args = ["--config", s(&config), "-o", "allow_other", s(&self.mnt)];
        common::start_daemon(&args, &self.mnt, "info");
        self.daemon = daemon_pid(&self.mnt);
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("repos.yaml")
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.dir.path().join("repos").join(name)
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The CLI with this site's configuration as the system file, as root or (when
    /// `nobody`) as `nobody` with `groups`.
    fn pcocc(&self, groups: &[u32], nobody: bool, args: &[&str]) -> Command {
        let mut c = if nobody {
            let mut all = vec![PCOCC];
            all.extend_from_slice(args);
            nobody_cmd(groups, &all)
        } else {
            let mut c = Command::new(PCOCC);
            c.args(args);
            c
        };
        c.current_dir(self.work())
            .env("HOME", self.dir.path().join("home"))
            .env("PCOCC_USER_CONF_DIR", self.dir.path().join("user-conf"))
            .env("PCOCC_SYSTEM_CONF_DIR", self.dir.path())
            .env_remove("RUST_LOG");
        c
    }

    /// A 4 MiB qcow2 image `name` in the work directory, with 1 MiB of `pattern` at 0
    /// and 64 KiB of its complement at 2 MiB (so that each `pattern` gives its own layer);
    /// readable by everyone.
    fn source(&self, name: &str, pattern: u8) -> PathBuf {
        let p = self.work().join(name);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
        let w1 = format!("write -P {pattern:#x} 0 1M");
        let w2 = format!("write -P {:#x} 2M 64k", !pattern);
        ok("qemu-io", &["-f", "qcow2", "-c", &w1, "-c", &w2, s(&p)]);
        chmod(&p, 0o644);
        p
    }

    /// The guest content of `source` as raw bytes.
    fn raw_of(&self, source: &Path) -> Vec<u8> {
        let raw = self.work().join("reference.raw");
        ok("qemu-img", &["convert", "-O", "raw", s(source), s(&raw)]);
        let bytes = fs::read(&raw).unwrap();
        fs::remove_file(raw).unwrap();
        bytes
    }

    /// Imports `source` as `repo/name` through the mount, as root.
    fn import_as_root(&self, source: &Path, repo: &str, name: &str) {
        ok("cp", &[s(source), s(&self.at(&format!("{repo}/{name}")))]);
    }

    fn meta_names(&self, repo: &str) -> Vec<String> {
        common::sorted_names(&self.repo(repo).join("meta"))
    }

    /// The layer files of `repo` (data/XX/HASH), sorted.
    fn layers(&self, repo: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in fs::read_dir(self.repo(repo).join("data")).unwrap() {
            let sub = sub.unwrap().path();
            if sub.is_dir() {
                out.extend(fs::read_dir(&sub).unwrap().map(|e| e.unwrap().path()));
            }
        }
        out.sort();
        out
    }

    /// The only layer of the single-layer revision `repo/image@rev`.
    fn layer_of(&self, repo: &str, image: &str, rev: u32) -> PathBuf {
        let meta = self.repo(repo).join("meta").join(format!("{image}@{rev}"));
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&meta).unwrap()).unwrap();
        let blobs = v["data_blobs"].as_array().expect("data_blobs");
        assert_eq!(blobs.len(), 1, "{image}@{rev} has one layer");
        let h = blobs[0].as_str().unwrap().trim_start_matches("sha256:");
        self.repo(repo).join("data").join(&h[..2]).join(h)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        common::stop_daemon(&self.mnt, self.daemon);
    }
}

// ---------------------------------------------------------------------------------------
// 1. A layer swapped for a symlink after the daemon first read it
// ---------------------------------------------------------------------------------------

/// How a view is read: a fresh `cat`, or `dd` with `O_DIRECT` (no page cache).
const READERS: [&str; 2] = ["cat", "dd-direct"];

/// Reads `view` fully as `nobody` or root with `reader`.
fn read_view(view: &Path, nobody: bool, reader: &str) -> Output {
    let if_arg = format!("if={}", s(view));
    let args: Vec<&str> = match reader {
        "cat" => vec!["cat", s(view)],
        _ => vec!["dd", &if_arg, "iflag=direct", "bs=64k", "status=none"],
    };
    if nobody {
        as_nobody(&[], &args)
    } else {
        run(args[0], &args[1..])
    }
}

#[test]
fn layer_swapped_for_a_symlink_after_first_read_never_serves_the_target() {
    let Some(mut site) = Site::new(&["mine"]) else {
        return;
    };
    site.mount();
    let src = site.source("x.qcow2", 0x5a);
    site.import_as_root(&src, "mine", "x");
    ok(
        "chown",
        &["-R", &format!("{NOBODY}:{NOBODY}"), s(&site.repo("mine"))],
    );
    let layer = site.layer_of("mine", "x", 0);

    // A root-only file that is a valid layer of the same size, full of MAGIC: served
    // through any view, it would show.
    let secret_raw = site.work().join("secret.raw");
    let mut bytes = MAGIC.repeat((1 << 20) / MAGIC.len());
    bytes.resize(4 << 20, 0);
    fs::write(&secret_raw, &bytes).unwrap();
    let secret = site.work().join("secret");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&secret_raw),
            s(&secret),
        ],
    );
    fs::remove_file(&secret_raw).unwrap();
    chmod(&secret, 0o600);
    assert!(contains(&fs::read(&secret).unwrap(), MAGIC));
    assert_fails_with(
        &as_nobody(&[], &["cat", s(&secret)]),
        "Permission denied",
        "nobody reading the secret directly",
    );

    // nobody reads every view once (the daemon opens the layer), and stats them.
    let mut old = BTreeMap::new();
    for view in VIEWS {
        let p = site.at(&format!("mine/x/@0/{view}"));
        let out = as_nobody(&[], &["cat", s(&p)]);
        assert_succeeds(&out, &format!("nobody reading {view} before the swap"));
        assert!(!contains(&out.stdout, MAGIC));
        assert_eq!(
            out.stdout,
            run("cat", &[s(&p)]).stdout,
            "{view}: root reads the same"
        );
        assert_succeeds(&as_nobody(&[], &["stat", s(&p)]), "stat");
        old.insert(view, hex(&out.stdout));
    }

    // The layer is nobody's to rename (its directory is theirs): swapped for a symlink.
    let swap = as_nobody(
        &[],
        &[
            "sh",
            "-c",
            r#"mv -- "$1" "$1.orig" && ln -s -- "$2" "$1""#,
            "sh",
            s(&layer),
            s(&secret),
        ],
    );
    assert_succeeds(&swap, "nobody swapping their layer for a symlink");
    // Past the daemon's refresh time, so nothing cached stands in.

    let mut leaks = Vec::new();
    for round in ["", " after drop_caches"] {
        if !round.is_empty() {
            let _ = fs::write("/proc/sys/vm/drop_caches", "3");
        }
        for view in VIEWS {
            let p = site.at(&format!("mine/x/@0/{view}"));
            for nobody in [true, false] {
                for reader in READERS {
                    let out = read_view(&p, nobody, reader);
                    let who = if nobody { "nobody" } else { "root" };
                    if contains(&out.stdout, MAGIC) {
                        leaks.push(format!(
                            "{who} read the secret through {view} ({reader}{round})"
                        ));
                    } else if out.status.success() && hex(&out.stdout) != old[view] {
                        leaks.push(format!(
                            "{who} read other bytes than before the swap through {view} \
                             ({reader}{round}, {} bytes)",
                            out.stdout.len()
                        ));
                    }
                }
            }
        }
    }
    assert!(leaks.is_empty(), "after the swap:\n{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 2. meta/ and data/ exchanged with symlinks to a root-only repository mid-operation
// ---------------------------------------------------------------------------------------

/// Exchanges each `PATH` of argv with `PATH.swap` (RENAME_EXCHANGE) in a tight loop for
/// argv[1] seconds, then puts every pair back; prints the number of exchanges.
const RACER: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
pairs = [(p.encode(), (p + ".swap").encode()) for p in sys.argv[2:]]
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    for a, b in pairs:
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0:
            n += 1
for a, b in pairs:
    if os.path.islink(a):
        libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
print(n)
"#;

/// Changes of `mine` through the mount, in a loop for $3 seconds ($1 the mount, $2 a
/// source); every failure is ignored.
const CHANGER: &str = r#"
M=$1; SRC=$2; end=$(( $(date +%s) + $3 ))
while [ "$(date +%s)" -lt "$end" ]; do
    mkdir "$M/mine/x" "$M/mine/y"
    cp "$SRC" "$M/mine/x/"; cp "$SRC" "$M/mine/y/"
    rmdir "$M/mine/x/@0"; rmdir "$M/mine/x/@1"; rm -r "$M/mine/y"
    mv "$M/mine/a" "$M/mine/b"; mv "$M/mine/b" "$M/mine/a"
    ln "$M/mine/x/@0/disk.qcow2" "$M/mine/c"; rm -r "$M/mine/c"
    cp "$SRC" "$M/mine/"; rm -r "$M/mine/race"
    cp "$SRC" "$M/mine/new"; rm -r "$M/mine/new"
done >/dev/null 2>&1
"#;

#[test]
fn exchanging_meta_and_data_with_symlinks_mid_operation_never_touches_a_root_only_repository() {
    let Some(mut site) = Site::new(&["mine", "rootonly"]) else {
        return;
    };
    site.mount();
    for (i, name) in ["x", "y", "a"].iter().enumerate() {
        let src = site.source(&format!("{name}.qcow2"), 0x10 + i as u8);
        site.import_as_root(&src, "rootonly", name);
        site.import_as_root(&src, "mine", name);
    }
    let race_src = site.source("race.qcow2", 0x77);
    let mine = site.repo("mine");
    let rootonly = site.repo("rootonly");
    for d in ["meta", "data", ".tmp"] {
        std::os::unix::fs::symlink(rootonly.join(d), mine.join(format!("{d}.swap"))).unwrap();
    }
    ok("chown", &["-R", &format!("{NOBODY}:{NOBODY}"), s(&mine)]);
    chmod(&rootonly, 0o700);
    assert_fails_with(
        &as_nobody(&[], &["ls", s(&rootonly.join("meta"))]),
        "Permission denied",
        "nobody listing rootonly/meta directly",
    );
    let before = snapshot(&rootonly);

    let secs = "6";
    let racer = nobody_cmd(
        &[],
        &[
            PYTHON,
            "-c",
            RACER,
            secs,
            "mine/meta",
            "mine/data",
            "mine/.tmp",
        ],
    )
    .current_dir(site.dir.path().join("repos"))
    .stdout(Stdio::piped())
    .spawn()
    .expect("start the racer");
    let changer = nobody_cmd(
        &[],
        &["sh", "-c", CHANGER, "sh", s(&site.mnt), s(&race_src), secs],
    )
    .spawn()
    .expect("start the changer");
    let racer = racer.wait_with_output().expect("racer");
    let _ = changer.wait_with_output();
    // Whatever happened, mine is put back (the racer does; this is the safety net).
    for d in ["meta", "data", ".tmp"] {
        let (a, b) = (mine.join(d), mine.join(format!("{d}.swap")));
        if fs::symlink_metadata(&a).unwrap().file_type().is_symlink() {
            fs::rename(&b, mine.join("tmp-restore")).unwrap();
            fs::rename(&a, &b).unwrap();
            fs::rename(mine.join("tmp-restore"), &a).unwrap();
        }
    }
    let swaps: u64 = String::from_utf8_lossy(&racer.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(swaps > 1000, "the racer exchanged only {swaps} times");

    assert_same_tree(&before, &snapshot(&rootonly));
}

// ---------------------------------------------------------------------------------------
// 3. A sticky shared repository
// ---------------------------------------------------------------------------------------

#[test]
fn in_a_sticky_shared_repository_a_user_cannot_rename_or_delete_an_image_of_another() {
    let Some(mut site) = Site::new(&["shared"]) else {
        return;
    };
    let repo = site.repo("shared");
    for d in ["", "meta", "data", ".tmp"] {
        chmod(&repo.join(d), 0o1777);
    }
    site.mount();
    let src = site.source("rootimg.qcow2", 0x31);
    site.import_as_root(&src, "shared", "rootimg");
    // Every directory of the repository sticky and world-writable, data/XX included.
    ok(
        "find",
        &[s(&repo), "-type", "d", "-exec", "chmod", "1777", "{}", "+"],
    );
    let root_view = site.at("shared/rootimg/@0/disk.raw");
    let reference = fs::read(&root_view).unwrap();

    // Directly, the sticky bit stops nobody.
    let meta = repo.join("meta");
    assert_fails_with(
        &as_nobody(
            &[],
            &["mv", s(&meta.join("rootimg@0")), s(&meta.join("stolen@0"))],
        ),
        "Operation not permitted",
        "nobody renaming root's metadata directly",
    );
    // Through the mount, the same.
    assert_fails_with(
        &as_nobody(
            &[],
            &[
                "mv",
                s(&site.at("shared/rootimg")),
                s(&site.at("shared/stolen")),
            ],
        ),
        "Operation not permitted",
        "nobody renaming root's image through the mount",
    );
    assert_fails_with(
        &as_nobody(&[], &["rm", "-r", s(&site.at("shared/rootimg"))]),
        "Operation not permitted",
        "nobody deleting root's image through the mount",
    );
    assert_fails_with(
        &as_nobody(&[], &["rmdir", s(&site.at("shared/rootimg/@0"))]),
        "Operation not permitted",
        "nobody deleting root's revision through the mount",
    );
    assert_eq!(site.meta_names("shared"), ["rootimg@0"]);
    assert_eq!(fs::read(&root_view).unwrap(), reference);

    // nobody still imports into the shared repository, and deletes what is theirs.
    let mine = site.source("nobodyimg.qcow2", 0x32);
    let out = as_nobody(&[], &["cp", s(&mine), s(&site.at("shared/nobodyimg"))]);
    assert_succeeds(&out, "nobody importing into the shared repository");
    assert_eq!(site.meta_names("shared"), ["nobodyimg@0", "rootimg@0"]);
    let out = as_nobody(&[], &["rm", "-r", s(&site.at("shared/nobodyimg"))]);
    assert_succeeds(&out, "nobody deleting their own image");
    assert_eq!(site.meta_names("shared"), ["rootimg@0"]);
}

// ---------------------------------------------------------------------------------------
// 4. ACLs and modes below the repository directory
// ---------------------------------------------------------------------------------------

/// A site with repository `open` (0755 throughout) holding `img` (pattern 0x41) and
/// `other` (0x42), imported by root; returns the raw content of `img`.
fn open_repository() -> Option<(Site, Vec<u8>)> {
    let mut site = Site::new(&["open"])?;
    site.mount();
    let src = site.source("img.qcow2", 0x41);
    site.import_as_root(&src, "open", "img");
    site.import_as_root(&site.source("other.qcow2", 0x42), "open", "other");
    let raw = site.raw_of(&src);
    Some((site, raw))
}

/// Every view of `open/img@0` is refused to nobody with EACCES.
#[track_caller]
fn assert_views_denied_to_nobody(site: &Site) {
    for view in VIEWS {
        let p = site.at(&format!("open/img/@0/{view}"));
        let out = as_nobody(&[], &["cat", s(&p)]);
        assert!(
            !contains(&out.stdout, &[0x41; 4096]),
            "nobody read img's data through {view}"
        );
        assert_fails_with(&out, "Permission denied", &format!("nobody reading {view}"));
    }
}

#[track_caller]
fn assert_root_reads(site: &Site, raw: &[u8]) {
    let got = fs::read(site.at("open/img/@0/disk.raw")).expect("root reads disk.raw");
    assert!(got == raw, "root reads img as it was imported");
}

#[test]
fn an_acl_denying_a_user_the_repository_denies_them_its_images() {
    let Some((site, raw)) = open_repository() else {
        return;
    };
    let repo = site.repo("open");
    ok("setfacl", &["-m", &format!("u:{NOBODY}:---"), s(&repo)]);
    assert_fails_with(
        &as_nobody(&[], &["ls", s(&repo.join("meta"))]),
        "Permission denied",
        "nobody listing meta/ directly",
    );
    assert_fails_with(
        &as_nobody(&[], &["ls", s(&site.at("open"))]),
        "Permission denied",
        "nobody listing the repository through the mount",
    );
    assert_views_denied_to_nobody(&site);
    assert_root_reads(&site, &raw);
}

#[test]
fn a_data_directory_only_root_may_enter_denies_users_the_layers() {
    let Some((site, raw)) = open_repository() else {
        return;
    };
    let repo = site.repo("open");
    chmod(&repo.join("data"), 0o700);
    let layer = site.layer_of("open", "img", 0);
    assert_fails_with(
        &as_nobody(&[], &["cat", s(&layer)]),
        "Permission denied",
        "nobody reading the layer directly",
    );
    // The metadata stays readable: the images are listed, their content is not.
    let out = as_nobody(&[], &["ls", s(&site.at("open"))]);
    assert_succeeds(&out, "nobody listing the repository");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "img\nother\n");
    assert_views_denied_to_nobody(&site);
    assert_root_reads(&site, &raw);
}

/// `img`'s layer made 0400 (root's alone); when `root_first`, root reads every view of
/// it first, so the daemon has it open and cached when nobody asks.
fn layer_only_root_may_read(root_first: bool) {
    let Some((site, raw)) = open_repository() else {
        return;
    };
    let layer = site.layer_of("open", "img", 0);
    chmod(&layer, 0o400);
    assert_fails_with(
        &as_nobody(&[], &["cat", s(&layer)]),
        "Permission denied",
        "nobody reading the layer directly",
    );
    if root_first {
        for view in VIEWS {
            ok("cat", &[s(&site.at(&format!("open/img/@0/{view}")))]);
        }
    }
    assert_views_denied_to_nobody(&site);
    // The other image of the repository stays readable.
    let out = as_nobody(&[], &["cat", s(&site.at("open/other/@0/disk.raw"))]);
    assert_succeeds(&out, "nobody reading the other image");
    assert_root_reads(&site, &raw);
}

#[test]
fn a_layer_only_root_may_read_is_denied_to_a_user_reading_it_first() {
    layer_only_root_may_read(false);
}

#[test]
fn a_layer_only_root_may_read_is_denied_to_a_user_after_root_read_it() {
    layer_only_root_may_read(true);
}

// ---------------------------------------------------------------------------------------
// 5. Metadata that is not a regular file
// ---------------------------------------------------------------------------------------

/// Repository `odd` holds `good1` and `good2` and a `meta/x@0` made by `make`; listing
/// the repository through the mount and `pcocc image list`, as root and as nobody, must
/// return within a second and show the good images.
fn odd_metadata_is_skipped(make: impl FnOnce(&Path)) {
    let Some(mut site) = Site::new(&["odd"]) else {
        return;
    };
    for (i, name) in ["good1", "good2"].iter().enumerate() {
        let src = site.source(&format!("{name}.qcow2"), 0x51 + i as u8);
        let target = format!("odd:{name}");
        let mut out = site.pcocc(&[], false, &["image", "import", s(&src), &target]);
        assert_succeeds(&out.output().unwrap(), "pcocc image import");
    }
    let odd = site.repo("odd").join("meta/x@0");
    make(&odd);
    site.mount();
    let limit = Duration::from_secs(1);
    let listing = site.at("odd");
    let mut failures = Vec::new();
    for nobody in [false, true] {
        let who = if nobody { "nobody" } else { "root" };
        let mut ls = if nobody {
            nobody_cmd(&[], &["ls", "-l", s(&listing)])
        } else {
            let mut c = Command::new("ls");
            c.args(["-l", s(&listing)]);
            c
        };
        let mut list = site.pcocc(&[], nobody, &["image", "list"]);
        for (what, cmd) in [("ls -l", &mut ls), ("pcocc image list", &mut list)] {
            match run_within(cmd, limit) {
                Err(e) => failures.push(format!("{who}: {what} hung: {e}")),
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    if !(text.contains("good1") && text.contains("good2")) {
                        failures.push(format!(
                            "{who}: {what} does not list the good images: {text:?} {}",
                            stderr(&out)
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_fifo_as_metadata_neither_hangs_nor_hides_the_other_images() {
    odd_metadata_is_skipped(|p| {
        ok("mkfifo", &["-m", "0666", s(p)]);
    });
}

#[test]
fn a_socket_as_metadata_neither_hangs_nor_hides_the_other_images() {
    odd_metadata_is_skipped(|p| {
        ok(
            PYTHON,
            &[
                "-c",
                "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])",
                s(p),
            ],
        );
        assert!(fs::symlink_metadata(p).unwrap().file_type().is_socket());
    });
}

#[test]
fn a_directory_as_metadata_neither_hangs_nor_hides_the_other_images() {
    odd_metadata_is_skipped(|p| fs::create_dir(p).unwrap());
}

// ---------------------------------------------------------------------------------------
// 6. What a user imports into their own repository is theirs
// ---------------------------------------------------------------------------------------

#[test]
fn what_a_user_imports_into_their_repository_is_all_theirs_and_their_gc_runs() {
    let Some(mut site) = Site::new(&["mine"]) else {
        return;
    };
    let repo = site.repo("mine");
    ok("chown", &["-R", &format!("{NOBODY}:{NOBODY}"), s(&repo)]);
    site.mount();
    assert!(
        site.layers("mine").is_empty() && common::sorted_names(&repo.join("data")).is_empty(),
        "data/ starts empty: the import makes its data/XX directory"
    );
    let src = site.source("new.qcow2", 0x61);
    let out = as_nobody(&[], &["cp", s(&src), s(&site.at("mine/new"))]);
    assert_succeeds(&out, "nobody importing into their repository");
    assert_eq!(site.meta_names("mine"), ["new@0"]);
    let foreign: Vec<String> = snapshot(&repo)
        .into_iter()
        .filter(|(_, v)| !v.contains(&format!(" {NOBODY}:")))
        .map(|(k, v)| format!("{k:?}: {v}"))
        .collect();
    assert!(
        foreign.is_empty(),
        "entries of nobody's repository not owned by nobody:\n{}",
        foreign.join("\n")
    );
    let out = site
        .pcocc(&[], true, &["image", "repo", "gc", "--grace", "0", "mine"])
        .output()
        .unwrap();
    assert_succeeds(&out, "nobody's pcocc image repo gc --grace 0");
}

// ---------------------------------------------------------------------------------------
// 7. A group repository
// ---------------------------------------------------------------------------------------

#[test]
fn a_group_repository_lets_members_import_and_delete_and_no_one_else() {
    let Some(mut site) = Site::new(&["team"]) else {
        return;
    };
    let repo = site.repo("team");
    for d in ["", "meta", "data", ".tmp"] {
        let p = repo.join(d);
        ok("chown", &[&format!("0:{TEAM_GID}"), s(&p)]);
        chmod(&p, 0o2775);
    }
    site.mount();
    let before = snapshot(&repo);
    let src = site.source("teamimg.qcow2", 0x71);
    let out = as_nobody(&[TEAM_GID], &["cp", s(&src), s(&site.at("team/teamimg"))]);
    assert_succeeds(&out, "a member importing");
    assert_eq!(site.meta_names("team"), ["teamimg@0"]);
    let with_image = snapshot(&repo);
    let not_team: Vec<String> = with_image
        .iter()
        .filter(|(k, v)| !before.contains_key(*k) && !v.ends_with(&format!(":{TEAM_GID}")))
        .map(|(k, v)| format!("{k:?}: {v}"))
        .collect();
    assert!(
        not_team.is_empty(),
        "what the member created must have group {TEAM_GID}:\n{}",
        not_team.join("\n")
    );

    // Without the group, nobody can neither import nor delete.
    let other = site.source("other.qcow2", 0x72);
    assert_fails_with(
        &as_nobody(&[], &["cp", s(&other), s(&site.at("team/other"))]),
        "Permission denied",
        "a non-member importing",
    );
    assert_fails_with(
        &as_nobody(&[], &["rm", "-r", s(&site.at("team/teamimg"))]),
        "Permission denied",
        "a non-member deleting",
    );
    assert_same_tree(&with_image, &snapshot(&repo));

    let out = as_nobody(&[TEAM_GID], &["rm", "-r", s(&site.at("team/teamimg"))]);
    assert_succeeds(&out, "a member deleting");
    assert!(site.meta_names("team").is_empty());
}

// ---------------------------------------------------------------------------------------
// 8. A rule of the kernel that refuses a shortcut: a copy, never root's rights
// ---------------------------------------------------------------------------------------

#[test]
fn copying_another_users_image_into_ones_own_repository_copies_the_layer_they_may_not_link() {
    let Some(mut site) = Site::new(&["mine", "pub"]) else {
        return;
    };
    // The kernel refuses a hard link to a file one neither owns nor may write when
    // fs.protected_hardlinks is 1 (Debian's default): the copy must not use root's
    // right to make it.
    let protected = fs::read_to_string("/proc/sys/fs/protected_hardlinks").unwrap_or_default();
    assert_eq!(
        protected.trim(),
        "1",
        "this test needs fs.protected_hardlinks = 1"
    );
    let mine = site.repo("mine");
    ok("chown", &["-R", &format!("{NOBODY}:{NOBODY}"), s(&mine)]);
    site.mount();
    let src = site.source("pubimg.qcow2", 0x41);
    site.import_as_root(&src, "pub", "pubimg");
    let root_layer = site.layer_of("pub", "pubimg", 0);
    let out = as_nobody(
        &[],
        &[
            "ln",
            s(&site.at("pub/pubimg/@0/disk.qcow2")),
            s(&site.at("mine/copy")),
        ],
    );
    assert_succeeds(
        &out,
        "nobody copying root's image into their repository by ln",
    );
    assert_eq!(site.meta_names("mine"), ["copy@0"]);
    let copied = site.layer_of("mine", "copy", 0);
    let (a, b) = (
        fs::metadata(&root_layer).unwrap(),
        fs::metadata(&copied).unwrap(),
    );
    assert_ne!(
        a.ino(),
        b.ino(),
        "a copy, not a hard link made with root's rights"
    );
    assert_eq!(b.uid(), NOBODY, "the copied layer is the user's");
    assert_eq!(fs::read(&copied).unwrap(), fs::read(&root_layer).unwrap());
}

/// A layer shared with another repository becomes part of it: root importing into a
/// repository of its own the disk a user imported first (`cp`), copying the user's image
/// there (`pcocc image copy`, `ln`), gets layers of its own, not hard links to the
/// user's files, which the user could make writable and rewrite root's images with.
#[test]
fn root_never_links_a_users_layer_into_its_own_repository() {
    let Some(mut site) = Site::new(&["mine", "pub"]) else {
        return;
    };
    let mine = site.repo("mine");
    ok("chown", &["-R", &format!("{NOBODY}:{NOBODY}"), s(&mine)]);
    site.mount();
    let src = site.source("shared.qcow2", 0x5a);
    let raw = site.raw_of(&src);
    let out = as_nobody(&[], &["cp", s(&src), s(&site.at("mine/theirs"))]);
    assert_succeeds(&out, "nobody importing into their repository");
    site.import_as_root(&src, "pub", "ours");
    let out = site
        .pcocc(&[], false, &["image", "copy", "mine:theirs", "pub:copied"])
        .output()
        .unwrap();
    assert_succeeds(&out, "root's pcocc image copy mine:theirs pub:copied");
    ok(
        "ln",
        &[
            s(&site.at("mine/theirs/@0/disk.qcow2")),
            s(&site.at("pub/linked")),
        ],
    );
    let users = site.layer_of("mine", "theirs", 0);
    let users_ino = fs::metadata(&users).unwrap().ino();
    for image in ["ours", "copied", "linked"] {
        let layer = fs::metadata(site.layer_of("pub", image, 0)).unwrap();
        assert_ne!(
            layer.ino(),
            users_ino,
            "pub/{image}: a link to the user's layer"
        );
        assert_eq!(layer.uid(), 0, "pub/{image}: the layer is root's");
    }
    // The user rewrites their own layer: root's images keep their content.
    let out = as_nobody(&[], &["chmod", "u+w", s(&users)]);
    assert_succeeds(&out, "nobody making their layer writable");
    let out = as_nobody(
        &[],
        &[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x66 0 64k",
            s(&users),
        ],
    );
    assert_succeeds(&out, "nobody rewriting their layer");
    for image in ["ours", "copied", "linked"] {
        let view = site.at(&format!("pub/{image}/@0/disk.raw"));
        assert!(
            fs::read(&view).unwrap() == raw,
            "pub/{image} changed with the user's layer"
        );
    }
}

/// What the kernel caches for root never lets a user past a repository they may not
/// read: with root listing `priv/secret/@0` again and again, a user's `stat` of the
/// image, its revision and its `disk.raw` is refused every time (it succeeded for a
/// second after each of root's listings: the kernel, without `default_permissions`,
/// checks nothing on a name it holds).
#[test]
fn names_cached_for_root_never_let_a_user_into_a_repository_they_may_not_read() {
    let Some(mut site) = Site::new(&["priv"]) else {
        return;
    };
    chmod(&site.repo("priv"), 0o700);
    site.mount();
    let src = site.source("secret.qcow2", 0x3c);
    site.import_as_root(&src, "priv", "secret");
    let paths = ["priv/secret", "priv/secret/@0", "priv/secret/@0/disk.raw"];
    let paths: Vec<String> = paths.iter().map(|p| s(&site.at(p)).to_string()).collect();
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let listed = fs::read_dir(site.at("priv/secret/@0")).unwrap().count();
        assert!(listed > 0, "root lists the revision");
        let mut args = vec!["stat", "-c", "%n"];
        args.extend(paths.iter().map(String::as_str));
        let out = as_nobody(&[], &args);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "round {rounds}: nobody stat'ed {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            contains(&out.stderr, b"Permission denied"),
            "round {rounds}: {}",
            stderr(&out)
        );
        rounds += 1;
    }
}

/// Root importing into a user's repository leaves the `data/XX/` directories it makes
/// to the repository's owner (their own imports place layers there too: they failed
/// with EACCES at close whenever their layer's hash began like one root had placed),
/// while the layers root placed stay root's.
#[test]
fn root_importing_into_a_users_repository_leaves_them_its_directories() {
    let Some(mut site) = Site::new(&["mine"]) else {
        return;
    };
    let mine = site.repo("mine");
    ok("chown", &["-R", &format!("{NOBODY}:{NOBODY}"), s(&mine)]);
    site.mount();
    for (i, pattern) in [0x11u8, 0x22, 0x33].into_iter().enumerate() {
        let src = site.source(&format!("r{i}.qcow2"), pattern);
        site.import_as_root(&src, "mine", &format!("root{i}"));
    }
    for layer in site.layers("mine") {
        let dir = fs::metadata(layer.parent().unwrap()).unwrap();
        assert_eq!(
            (dir.uid(), dir.gid()),
            (NOBODY, NOBODY),
            "{} is the repository owner's",
            layer.parent().unwrap().display()
        );
        assert_eq!(
            fs::metadata(&layer).unwrap().uid(),
            0,
            "{layer:?} stays root's"
        );
    }
    // The owner places a layer in each of those directories.
    for layer in site.layers("mine") {
        let dir = layer.parent().unwrap();
        let out = as_nobody(&[], &["touch", s(&dir.join("probe"))]);
        assert_succeeds(&out, "the owner writing into a data/XX/ root made");
        fs::remove_file(dir.join("probe")).unwrap();
    }
}
