//! Files written on the mount by ordinary tools, judged by what the next command sees.
//!
//! 1. Every ordinary writer imports: the same source (qcow2, raw and vmdk) written into a
//!    repository by `cp`, `cat`, `dd`, `tee`, `gunzip`, a shell redirect, python, `install`,
//!    `rsync`, `tar`, `qemu-img`, a forked child and a shared mmap becomes an image of one
//!    revision whose raw view is the source's content and whose qcow2 view is clean. An
//!    import is published when the last descriptor of the new file is closed in any
//!    process.
//! 2. A command that failed leaves nothing: `truncate -s 1P`, `touch`, a 254-byte name and
//!    a text file leave no image in the mount nor in the repository's `meta/` (and
//!    `fallocate` either fails and leaves nothing or imports a 10 MiB zero disk).
//! 3. Names tell the truth at once: sequences of commands with no pause between them
//!    (import then remove, stage then rename, link then rename, rename then add a revision,
//!    one file copied into an image twice, remove then test, fstat of an open view after
//!    its removal, rename to another repository) each succeed `PCOCC_IMAGEFS_FILES_ROUNDS` times in a row (100 unless
//!    set).
//! 4. No empty image directory is left behind: `cp SRC M/r/img/` racing `rm -r M/r/img`
//!    leaves a real image or nothing, and so does `rm -r` that listed a file published
//!    since; `cp -r` of an image directory fails leaving nothing at its target.
//!
//! The daemon is mounted as root with `allow_other` and default options otherwise. Needs
//! root, `/dev/fuse`, qemu-img, qemu-io, rsync, gzip, tar and /usr/bin/python3; without
//! them each test prints SKIPPED and returns, except in CI (env `CI` set), where a test
//! that cannot run fails.

mod common;
use common::{ok, run, s, sorted_names};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The system python (the one CI has, whatever shim comes first in PATH).
const PYTHON: &str = "/usr/bin/python3";
/// Tools the tests run, besides the binaries of this crate.
const TOOLS: &[&str] = &["qemu-img", "qemu-io", "rsync", "gzip", "tar", PYTHON];
/// The source formats of the writers' matrix.
const FORMATS: [&str; 3] = ["qcow2", "raw", "vmdk"];
/// The virtual size of the matrix's sources.
const SOURCE_SIZE: u64 = 16 << 20;
/// Longest a writer (or a whole loop of part 3) may take before it is called hung.
const WRITER_LIMIT: Duration = Duration::from_secs(300);
const LOOP_LIMIT: Duration = Duration::from_secs(1200);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How a command ended and what it printed, for a failure message.
fn describe(out: &Output) -> String {
    let status = match out.status.code() {
        Some(124) => "exit 124 (killed by timeout: hung)".to_string(),
        _ => out.status.to_string(),
    };
    format!(
        "{status}\n--- stdout:\n{}--- stderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Rounds of each sequence of part 3: `PCOCC_IMAGEFS_FILES_ROUNDS`, 100 unless set.
fn rounds() -> u32 {
    std::env::var("PCOCC_IMAGEFS_FILES_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// The suite's mounted repositories ([`common::MountedRepos`]) and its own helpers.
struct Fs(common::MountedRepos);

impl std::ops::Deref for Fs {
    type Target = common::MountedRepos;
    fn deref(&self) -> &common::MountedRepos {
        &self.0
    }
}

impl Fs {
    /// Mounts a daemon over the repositories `repos` (the first one the default).
    fn start(repos: &[&str]) -> Option<Fs> {
        common::MountedRepos::start("files", TOOLS, repos, &[]).map(Fs)
    }

    /// [`Fs::start`] with the daemon logging to `log_file()`.
    fn start_logged(repos: &[&str]) -> Option<Fs> {
        common::MountedRepos::start_logged("files", TOOLS, repos).map(Fs)
    }

    fn work(&self) -> PathBuf {
        self.work_dir()
    }

    /// The names in the repository's `meta/` on disk.
    fn meta_names(&self, repo: &str) -> Vec<String> {
        sorted_names(&self.repo(repo).join("meta"))
    }

    /// A raw disk of 16 MiB with a few recognisable extents (and holes), written by
    /// qemu-io; the last MiB is data, so that every format keeps the full size.
    fn source_raw(&self, name: &str) -> PathBuf {
        let p = self.work().join(name);
        ok("qemu-img", &["create", "-q", "-f", "raw", s(&p), "16M"]);
        ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 1M",
                "-c",
                "write -P 0x22 3M 64k",
                "-c",
                "write -P 0x33 7M 512k",
                "-c",
                "write -P 0x44 15M 1M",
                s(&p),
            ],
        );
        p
    }

    /// The matrix's source in `fmt` (`src.FMT` in the work directory) and its gzip.
    fn source(&self, fmt: &str) -> PathBuf {
        let raw = self.source_raw(&format!("src-{fmt}.img"));
        let p = self.work().join(format!("src.{fmt}"));
        ok(
            "qemu-img",
            &["convert", "-q", "-f", "raw", "-O", fmt, s(&raw), s(&p)],
        );
        fs::remove_file(raw).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let gz = ok("bash", &["-c", r#"gzip -c "$1" > "$1.gz""#, "gzip", s(&p)]);
        assert!(gz.is_empty());
        p
    }

    /// A small 4 MiB qcow2 source for the loops of part 3 (`pattern` at 0).
    fn small_source(&self, name: &str, pattern: u8) -> PathBuf {
        let p = self.work().join(name);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
        let w = format!("write -P {pattern:#x} 0 1M");
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", &w, "-c", "write -P 0x5a 3M 64k", s(&p)],
        );
        p
    }

    /// Runs the shell `script` with `env`, `M` (the mount) and `PY` (python) set, within
    /// `limit` (killed by `timeout` after).
    fn sh(&self, script: &str, env: &[(&str, &str)], limit: Duration) -> Output {
        let mut c = Command::new("timeout");
        c.args([
            "-k",
            "10",
            &limit.as_secs().to_string(),
            "bash",
            "-c",
            script,
        ])
        .current_dir(self.work())
        .env("M", &self.mnt)
        .env("PY", PYTHON);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output()
            .unwrap_or_else(|e| panic!("cannot run bash: {e}"))
    }

    /// Runs a loop `script` of part 3 (set -e, an ERR trap naming the round and the
    /// command that failed); panics with its output unless it succeeded.
    #[track_caller]
    fn run_loop(&self, what: &str, script: &str, env: &[(&str, &str)]) {
        let n = rounds().to_string();
        let full = format!(
            "set -eE -o pipefail\n\
             trap 'rc=$?; echo \"round $i of $N: command failed (exit $rc): $BASH_COMMAND\" >&2' ERR\n\
             for i in $(seq 1 \"$N\"); do\n{script}\ndone\n"
        );
        let mut all: Vec<(&str, &str)> = vec![("N", &n)];
        all.extend_from_slice(env);
        let out = self.sh(&full, &all, LOOP_LIMIT);
        assert!(
            out.status.success(),
            "{what}: the sequence must succeed {n} times in a row with no pause:\n{}\n\
             script:\n{script}",
            describe(&out)
        );
    }

    /// The names of `M/repo` starting with a dot (staging files left behind).
    fn hidden(&self, repo: &str) -> Vec<String> {
        sorted_names(&self.at(repo))
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    /// Checks that `repo/name` is an image of exactly one revision whose raw view has the
    /// content of `src` (in `fmt`) and whose qcow2 view qemu-img finds clean, and that no
    /// staging file is left in the repository.
    fn check_image(
        &self,
        repo: &str,
        name: &str,
        src: &Path,
        fmt: &str,
        size: u64,
    ) -> Result<(), String> {
        let dir = self.at(&format!("{repo}/{name}"));
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(format!(
                    "{} is not an image directory but a {:?} of {} bytes",
                    dir.display(),
                    m.file_type(),
                    m.len()
                ));
            }
            Err(e) => return Err(format!("no image {}: {e}", dir.display())),
        }
        let revs: Vec<String> = sorted_names(&dir)
            .into_iter()
            .filter(|n| n.starts_with('@'))
            .collect();
        if revs != ["@0"] {
            return Err(format!(
                "{} must have the one revision @0, has {revs:?} (entries {:?})",
                dir.display(),
                sorted_names(&dir)
            ));
        }
        let meta: Vec<String> = self
            .meta_names(repo)
            .into_iter()
            .filter(|n| n.starts_with(&format!("{name}@")))
            .collect();
        if meta != [format!("{name}@0")] {
            return Err(format!(
                "the repository's meta/ must hold {name}@0 only, holds {meta:?}"
            ));
        }
        let raw = dir.join("@0/disk.raw");
        // qemu-img compare takes a longer image's tail of zeros as equal: check the size.
        match fs::metadata(&raw) {
            Ok(m) if m.len() == size => {}
            Ok(m) => {
                return Err(format!(
                    "{} is {} bytes, not the {size} of the source",
                    raw.display(),
                    m.len()
                ));
            }
            Err(e) => return Err(format!("stat {}: {e}", raw.display())),
        }
        let out = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", fmt, s(&raw), s(src)],
        );
        if !out.status.success() {
            return Err(format!(
                "qemu-img compare -f raw -F {fmt} {} {}: {}",
                raw.display(),
                src.display(),
                describe(&out)
            ));
        }
        let qcow2 = dir.join("@0/disk.qcow2");
        let out = run("qemu-img", &["check", "-f", "qcow2", s(&qcow2)]);
        if !out.status.success() {
            return Err(format!(
                "qemu-img check {}: {}",
                qcow2.display(),
                describe(&out)
            ));
        }
        let hidden = self.hidden(repo);
        if !hidden.is_empty() {
            return Err(format!(
                "staging files left in {repo}/: {hidden:?} (ls -a: {:?})",
                sorted_names(&self.at(repo))
            ));
        }
        Ok(())
    }

    /// Checks that nothing named `name` is in `M/repo` nor in the repository's `meta/`,
    /// and that `M/repo` and `meta/` are as `before` (no new image of any name).
    fn check_nothing(
        &self,
        repo: &str,
        name: &str,
        before: &(Vec<String>, Vec<String>),
    ) -> Result<(), String> {
        let p = self.at(&format!("{repo}/{name}"));
        let mut errs = Vec::new();
        if let Ok(m) = fs::symlink_metadata(&p) {
            errs.push(format!(
                "{} exists (a {:?} of {} bytes)",
                p.display(),
                m.file_type(),
                m.len()
            ));
        }
        let now = (sorted_names(&self.at(repo)), self.meta_names(repo));
        if now.0 != before.0 {
            errs.push(format!("ls M/{repo} was {:?}, is {:?}", before.0, now.0));
        }
        if now.1 != before.1 {
            errs.push(format!(
                "the repository's meta/ was {:?}, is {:?}",
                before.1, now.1
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    /// What `M/repo` and the repository's `meta/` hold, for [`Fs::check_nothing`].
    fn state(&self, repo: &str) -> (Vec<String>, Vec<String>) {
        (sorted_names(&self.at(repo)), self.meta_names(repo))
    }
}

// ---------------------------------------------------------------------------------------
// 1. Every ordinary writer imports
// ---------------------------------------------------------------------------------------

/// One (writer, format) case: the source `src` in `fmt` written as `M/r/NAME`.
struct Case<'a> {
    fs: &'a Fs,
    fmt: &'static str,
    src: PathBuf,
    name: String,
}

impl Case<'_> {
    fn target(&self) -> PathBuf {
        self.fs.at(&format!("r/{}", self.name))
    }

    /// Runs the writer `script` with `SRC` (the source), `GZ` (its gzip), `FMT`, `R` (the
    /// repository's directory on the mount), `NAME` and `F` (`$R/$NAME`) set.
    fn sh(&self, script: &str) -> Output {
        let gz = format!("{}.gz", s(&self.src));
        let r = self.fs.at("r");
        let f = self.target();
        self.fs.sh(
            script,
            &[
                ("SRC", s(&self.src)),
                ("GZ", &gz),
                ("FMT", self.fmt),
                ("R", s(&r)),
                ("NAME", &self.name),
                ("F", s(&f)),
            ],
            WRITER_LIMIT,
        )
    }

    /// Runs the writer `script`; an error naming it and what it printed unless it
    /// succeeded.
    fn write(&self, script: &str) -> Result<(), String> {
        let out = self.sh(script);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("the writer `{script}` failed: {}", describe(&out)))
        }
    }
}

/// Imports the source in each format through `write` as `r/TOOL-FORMAT`, each into a
/// fresh name, and checks each image; panics listing every (tool, format) that failed.
fn matrix(tool: &str, write: impl Fn(&Case) -> Result<(), String>) {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let mut failures = Vec::new();
    for fmt in FORMATS {
        let case = Case {
            fs: &fs,
            fmt,
            src: fs.source(fmt),
            name: format!("{tool}-{fmt}"),
        };
        let result = write(&case).and_then(|()| {
            if tool == "python-mmap" {
                // The last reference is the mapping, dropped by munmap(2), which does not
                // wait for the kernel to tell the daemon (FUSE's release is sent in the
                // background): the image appears a moment after the writer returns.
                common::eventually(Duration::from_secs(10), || {
                    case.target().join("@0").exists()
                });
            }
            fs.check_image("r", &case.name, &case.src, fmt, SOURCE_SIZE)
        });
        if let Err(e) = result {
            failures.push(format!("[{tool}, {fmt} source] {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} formats failed for the writer {tool}:\n\n{}",
        failures.len(),
        FORMATS.len(),
        failures.join("\n\n")
    );
}

/// Python: open, write, close.
const PY_WRITE: &str = r#"
import sys
data = open(sys.argv[1], "rb").read()
f = open(sys.argv[2], "wb")
f.write(data)
f.close()
"#;

/// Python: the parent opens the file and forks; the child writes all the data and exits
/// first; the parent, which still holds the descriptor, closes it after.
const PY_FORK: &str = r#"
import os, sys
data = open(sys.argv[1], "rb").read()
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
pid = os.fork()
if pid == 0:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os._exit(0)
    except BaseException as e:
        sys.stderr.write("child: %r\n" % (e,))
        sys.stderr.flush()
        os._exit(1)
_, status = os.waitpid(pid, 0)
if status != 0:
    sys.exit("the child failed (wait status %d)" % status)
os.close(fd)
"#;

/// Python: open O_RDWR|O_CREAT, ftruncate to the size, map shared, close the descriptor,
/// then write the bytes through the map and unmap it.
const PY_MMAP: &str = r#"
import mmap, os, sys
data = open(sys.argv[1], "rb").read()
fd = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, len(data))
m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
m[:] = data
m.close()
"#;

#[test]
fn writer_cp() {
    matrix("cp", |c| c.write(r#"cp "$SRC" "$F""#));
}

#[test]
fn writer_cat_redirect() {
    matrix("cat", |c| c.write(r#"cat "$SRC" > "$F""#));
}

#[test]
fn writer_cat_append() {
    matrix("cat-append", |c| c.write(r#"cat "$SRC" >> "$F""#));
}

#[test]
fn writer_dd() {
    matrix("dd", |c| {
        c.write(r#"dd if="$SRC" of="$F" bs=1M status=none"#)
    });
}

#[test]
fn writer_dd_notrunc() {
    matrix("dd-notrunc", |c| {
        c.write(r#"dd if="$SRC" of="$F" bs=1M conv=notrunc status=none"#)
    });
}

#[test]
fn writer_tee() {
    matrix("tee", |c| c.write(r#"tee "$F" < "$SRC" >/dev/null"#));
}

#[test]
fn writer_gunzip() {
    matrix("gunzip", |c| c.write(r#"gunzip -c "$GZ" > "$F""#));
}

#[test]
fn writer_shell_exec_redirect() {
    matrix("bash-exec", |c| {
        c.write(r#"bash -c 'exec >"$F"; cat "$SRC"'"#)
    });
}

#[test]
fn writer_python() {
    matrix("python", |c| {
        c.write(&format!(r#""$PY" -c '{PY_WRITE}' "$SRC" "$F""#))
    });
}

#[test]
fn writer_install() {
    matrix("install", |c| c.write(r#"install -m 644 "$SRC" "$F""#));
}

#[test]
fn writer_rsync() {
    matrix("rsync", |c| c.write(r#"rsync "$SRC" "$F""#));
}

#[test]
fn writer_rsync_inplace() {
    matrix("rsync-inplace", |c| {
        c.write(r#"rsync --inplace "$SRC" "$F""#)
    });
}

#[test]
fn writer_tar() {
    matrix("tar", |c| {
        // An archive holding the source under the target name.
        let stage = c.fs.work().join(format!("tar-{}", c.name));
        fs::create_dir_all(&stage).unwrap();
        fs::copy(&c.src, stage.join(&c.name)).unwrap();
        let tar = c.fs.work().join(format!("{}.tar", c.name));
        ok("tar", &["-C", s(&stage), "-cf", s(&tar), &c.name]);
        c.write(&format!(r#"tar -C "$R" -xf '{}'"#, s(&tar)))
    });
}

#[test]
fn writer_qemu_img_staged() {
    matrix("qemu-img-staged", |c| {
        c.write(
            r#"qemu-img convert -q -f "$FMT" -O qcow2 "$SRC" "$R/.stage" && mv "$R/.stage" "$F""#,
        )
    });
}

#[test]
fn writer_python_fork() {
    matrix("python-fork", |c| {
        c.write(&format!(r#""$PY" -c '{PY_FORK}' "$SRC" "$F""#))
    });
}

#[test]
fn writer_python_mmap() {
    matrix("python-mmap", |c| {
        c.write(&format!(r#""$PY" -c '{PY_MMAP}' "$SRC" "$F""#))
    });
}

/// `qemu-img convert -O raw` straight onto the mount: it either imports the source
/// correctly or fails and leaves nothing.
#[test]
fn writer_qemu_img_raw_straight() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let mut failures = Vec::new();
    for fmt in FORMATS {
        let case = Case {
            fs: &fs,
            fmt,
            src: fs.source(fmt),
            name: format!("qemu-img-raw-{fmt}"),
        };
        let before = fs.state("r");
        let script = r#"qemu-img convert -q -f "$FMT" -O raw "$SRC" "$F""#;
        let out = case.sh(script);
        let result = if out.status.success() {
            fs.check_image("r", &case.name, &case.src, fmt, SOURCE_SIZE)
                .map_err(|e| format!("`{script}` succeeded, so it must have imported: {e}"))
        } else {
            fs.check_nothing("r", &case.name, &before).map_err(|e| {
                format!(
                    "`{script}` failed ({}), so it must leave nothing: {e}",
                    describe(&out)
                )
            })
        };
        if let Err(e) = result {
            failures.push(format!("[qemu-img-raw, {fmt} source] {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A disk of zeroes is a disk like any other: `cp` of one (which only sizes its copy),
/// `dd if=/dev/zero`, `truncate -s` and `qemu-img convert` of one into the mount, by a
/// user into their repository, publish it once its writer has not opened it again for
/// the time `qemu-img` may take between its create step and its writes (10 s); the name
/// is its writer's meanwhile. They were kept for 10 s, then dropped.
#[test]
fn a_disk_of_zeroes_is_published_whatever_writes_it() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    ok("chown", &["-R", "65534:65534", s(&fs.repo("r"))]);
    let zero = fs.work().join("zero.raw");
    fs::File::create(&zero)
        .unwrap()
        .set_len(SOURCE_SIZE)
        .unwrap();
    fs::set_permissions(&zero, fs::Permissions::from_mode(0o644)).unwrap();
    let script = r#"setpriv --reuid=65534 --regid=65534 --clear-groups bash -ec '
        cp "$Z" "$R/cp-zero"
        dd if=/dev/zero of="$R/dd-zero" bs=1M count=16 status=none
        truncate -s 16M "$R/truncate-zero"
        qemu-img convert -q -f raw -O raw "$Z" "$R/qemu-img-zero"'"#;
    let r = fs.at("r");
    let out = fs.sh(script, &[("Z", s(&zero)), ("R", s(&r))], WRITER_LIMIT);
    assert!(out.status.success(), "{}", describe(&out));
    let names = ["cp-zero", "dd-zero", "truncate-zero", "qemu-img-zero"];
    // Meanwhile its writer sees each name (as `qemu-img` must, to open it again).
    let out = fs.sh(
        r#"setpriv --reuid=65534 --regid=65534 --clear-groups ls "$R""#,
        &[("R", s(&r))],
        WRITER_LIMIT,
    );
    let mut listed: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    listed.sort();
    let mut expected = names.to_vec();
    expected.sort();
    assert_eq!(listed, expected, "{}", describe(&out));
    assert!(
        common::eventually(Duration::from_secs(30), || {
            names.iter().all(|n| r.join(n).join("@0").exists())
        }),
        "not all published: {:?}",
        sorted_names(&r)
    );
    for name in names {
        fs.check_image("r", name, &zero, "raw", SOURCE_SIZE)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for meta in fs.meta_names("r") {
        let m = fs::metadata(fs.repo("r").join("meta").join(&meta)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&m),
            65534,
            "{meta} is its writer's"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. A command that failed leaves nothing
// ---------------------------------------------------------------------------------------

/// Runs `script` (with `SRC` a valid qcow2 source and `R` the repository on the mount),
/// asserts that it failed, then that `name` and no other new image is in `M/r` or in
/// the repository's `meta/`.
#[track_caller]
fn fails_leaving_nothing(what: &str, script: &str, name: &str) {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let src = fs.small_source("src.qcow2", 0x61);
    let before = fs.state("r");
    let r = fs.at("r");
    let out = fs.sh(script, &[("SRC", s(&src)), ("R", s(&r))], WRITER_LIMIT);
    let mut errs = Vec::new();
    if out.status.success() {
        errs.push(format!(
            "`{script}` must fail but succeeded: {}",
            describe(&out)
        ));
    }
    if let Err(e) = fs.check_nothing("r", name, &before) {
        errs.push(format!(
            "`{script}` must leave nothing: {e}\n(the command ended: {})",
            describe(&out)
        ));
    }
    // The next command works and sees the repository as it was.
    let after = fs.sh(
        r#"cp "$SRC" "$R/after" && test -d "$R/after/@0" && rm -r "$R/after" && test ! -e "$R/after""#,
        &[("SRC", s(&src)), ("R", s(&r))],
        WRITER_LIMIT,
    );
    if !after.status.success() {
        errs.push(format!(
            "after `{script}`, an import and removal of another name failed: {}",
            describe(&after)
        ));
    }
    assert!(errs.is_empty(), "{what}:\n{}", errs.join("\n"));
}

#[test]
fn failed_truncate_1p() {
    fails_leaving_nothing("truncate -s 1P (EFBIG)", r#"truncate -s 1P "$R/h""#, "h");
}

#[test]
fn failed_touch() {
    fails_leaving_nothing(
        "touch (a 0-byte file is not an image)",
        r#"touch "$R/e""#,
        "e",
    );
}

#[test]
fn failed_name_too_long() {
    let name = "a".repeat(254);
    fails_leaving_nothing(
        "cp to a name of 254 bytes",
        r#"cp "$SRC" "$R/$(printf 'a%.0s' {1..254})""#,
        &name,
    );
}

#[test]
fn failed_text_file() {
    // cp checks close(2), which reports that the file is not an image.
    fails_leaving_nothing(
        "cp of a text file (not an image)",
        r#"printf 'hello\n' > "$R/../../t.txt" && cp "$R/../../t.txt" "$R/t""#,
        "t",
    );
}

#[test]
fn failed_text_file_into_a_new_directory() {
    // mkdir, then an import that fails: the directory made for it goes too.
    fails_leaving_nothing(
        "mkdir M/r/m, then cp of a text file into it",
        r#"printf 'hello\n' > "$R/../../t.txt" && mkdir "$R/m" && cp "$R/../../t.txt" "$R/m/""#,
        "m",
    );
}

#[test]
fn failed_cp_r_of_a_directory_of_text_files() {
    fails_leaving_nothing(
        "cp -r of a directory holding a text file",
        r#"mkdir -p "$R/../../d" && printf 'hello\n' > "$R/../../d/t.txt" && cp -r "$R/../../d" "$R/d""#,
        "d",
    );
}

#[test]
fn formats_pcocc_does_not_list_are_refused_at_close_naming_the_format() {
    // vhdx, parallels, qcow (version 1) and luks made by qemu-img; dmg, cloop and bochs
    // as the minimal headers of tests/common/foreign.rs.
    let Some(fs) = Fs::start_logged(&["r"]) else {
        return;
    };
    let log = fs.log_file();
    let before = fs.state("r");
    let r = fs.at("r");
    for fmt in common::foreign::FOREIGN_FORMATS {
        let name = format!("d-{fmt}");
        let src = common::foreign::foreign_image(&fs.work(), fmt, &name);
        let out = fs.sh(
            r#"cp "$SRC" "$R/""#,
            &[("SRC", s(&src)), ("R", s(&r))],
            WRITER_LIMIT,
        );
        assert!(
            !out.status.success(),
            "cp of a {fmt} file: {}",
            describe(&out)
        );
        assert!(
            text(&out.stderr).contains("Invalid argument"),
            "cp of a {fmt} file fails with EINVAL: {}",
            describe(&out)
        );
        if let Err(e) = fs.check_nothing("r", &name, &before) {
            panic!("cp of a {fmt} file must leave nothing: {e}");
        }
        let reason = format!("{fmt} is not a valid image format");
        assert!(
            common::eventually(Duration::from_secs(5), || {
                fs::read_to_string(&log).is_ok_and(|l| l.contains(&reason))
            }),
            "the daemon's log names the reason {reason:?}: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

#[test]
fn a_qcow2_with_a_backing_file_is_refused_at_close_saying_why() {
    // An overlay whose chain of backing files does not end on a view of the mount is
    // refused (pcocc image import flattens it instead), nothing is published.
    let Some(fs) = Fs::start_logged(&["r"]) else {
        return;
    };
    let log = fs.log_file();
    let before = fs.state("r");
    let r = fs.at("r");
    let base = fs.small_source("base.qcow2", 0x61);
    let top = fs.work().join("top.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    let out = fs.sh(
        r#"cp "$SRC" "$R/top""#,
        &[("SRC", s(&top)), ("R", s(&r))],
        WRITER_LIMIT,
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("Invalid argument"),
        "{}",
        describe(&out)
    );
    if let Err(e) = fs.check_nothing("r", "top", &before) {
        panic!("cp of an overlay must leave nothing: {e}");
    }
    assert!(
        common::eventually(Duration::from_secs(5), || {
            fs::read_to_string(&log).is_ok_and(|l| {
                l.contains("base.qcow2")
                    && l.contains("not at a view of this mount")
                    && l.contains("pcocc image import")
            })
        }),
        "the daemon's log says why: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    // The same for a VMDK descriptor naming its extent file.
    let desc = fs.work().join("flat.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            s(&desc),
            "4M",
        ],
    );
    let out = fs.sh(
        r#"cp "$SRC" "$R/flat""#,
        &[("SRC", s(&desc)), ("R", s(&r))],
        WRITER_LIMIT,
    );
    assert!(!out.status.success(), "{}", describe(&out));
    if let Err(e) = fs.check_nothing("r", "flat", &before) {
        panic!("cp of a VMDK descriptor must leave nothing: {e}");
    }
    assert!(
        common::eventually(Duration::from_secs(5), || {
            fs::read_to_string(&log).is_ok_and(|l| l.contains("`pcocc image import` does"))
        }),
        "the daemon's log says why: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    // And for a QED overlay, a VMDK snapshot and a qcow2 keeping its clusters in an
    // external data file: the mount never reads the files they name, so they are
    // refused whole rather than imported without what lies below.
    let made = fs.sh(
        r#"cd "$W" &&
           qemu-img create -q -f qed -b "$BASE" -F qcow2 over.qed &&
           qemu-img create -q -f vmdk parent.vmdk 4M &&
           qemu-img create -q -f vmdk -b parent.vmdk -F vmdk snap.vmdk &&
           qemu-img create -q -f qcow2 -o data_file=ext.data ext.qcow2 4M &&
           qemu-io -f qcow2 -c 'write -P 0x62 0 1M' ext.qcow2"#,
        &[("W", s(&fs.work())), ("BASE", s(&base))],
        WRITER_LIMIT,
    );
    assert!(made.status.success(), "{}", describe(&made));
    for (source, name, why) in [
        ("over.qed", "over", "has a backing file"),
        ("snap.vmdk", "snap", "names a parent disk"),
        ("ext.qcow2", "ext", "external data file"),
    ] {
        let out = fs.sh(
            r#"cp "$SRC" "$R/$N""#,
            &[
                ("SRC", s(&fs.work().join(source))),
                ("R", s(&r)),
                ("N", name),
            ],
            WRITER_LIMIT,
        );
        assert!(!out.status.success(), "{source}: {}", describe(&out));
        if let Err(e) = fs.check_nothing("r", name, &before) {
            panic!("cp of {source} must leave nothing: {e}");
        }
        assert!(
            common::eventually(Duration::from_secs(5), || {
                fs::read_to_string(&log).is_ok_and(|l| l.contains(why))
            }),
            "the daemon's log says why {source} is refused: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

#[test]
fn a_container_image_shows_as_a_directory_of_metadata_without_disks() {
    // A `kind: ctr` revision (an OCI blob, not a disk) next to a VM image: every listing
    // works, its revision holds meta.json only, and the VM image is untouched.
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let r = fs.at("r");
    let src = fs.small_source("src.qcow2", 0x61);
    let out = fs.sh(
        r#"cp "$SRC" "$R/vm""#,
        &[("SRC", s(&src)), ("R", s(&r))],
        WRITER_LIMIT,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let blob = b"an OCI layer, not a disk\n".repeat(1000);
    let hash = text(&ok_bytes("sha256sum", &blob));
    let hash = hash.split_whitespace().next().unwrap().to_string();
    let data = fs.repo("r").join("data").join(&hash[..2]);
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join(&hash), &blob).unwrap();
    let meta = format!(
        "{{\"name\": \"ctr1\", \"revision\": 0, \"kind\": \"ctr\", \"owner\": \"root\", \
         \"timestamp\": 1796493157.267927, \"data_blobs\": [\"{hash}\"], \
         \"custom_meta\": {{\"index\": {{}}}}}}"
    );
    fs::write(fs.repo("r").join("meta/ctr1@0"), meta).unwrap();
    let script = r#"set -e
        ls -l "$R" >/dev/null
        ls -lR "$R" >/dev/null
        test "$(cd "$R/ctr1/@0" && ls)" = meta.json
        test "$(readlink "$R/ctr1/latest")" = @0
        grep -q '"kind": "ctr"' "$R/ctr1/@0/meta.json"
        grep -q '"virtual_size": null' "$R/ctr1/@0/meta.json"
        for f in disk.raw disk.qcow2 disk.vmdk; do
            test ! -e "$R/ctr1/@0/$f"
            ! cat "$R/ctr1/@0/$f" 2>/dev/null
        done
        test "$(find "$R/ctr1" -type f | wc -l)" = 1
        test "$(find "$R/vm/@0" -type f | wc -l)" = 7
        qemu-img compare -q -f raw -F qcow2 "$R/vm/@0/disk.raw" "$SRC"
    "#;
    let out = fs.sh(script, &[("R", s(&r)), ("SRC", s(&src))], WRITER_LIMIT);
    assert!(out.status.success(), "{}", describe(&out));
    // The container image is removed as any image.
    let out = fs.sh(r#"rm -r "$R/ctr1""#, &[("R", s(&r))], WRITER_LIMIT);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(fs.meta_names("r"), ["vm@0"]);
}

/// Runs `prog` with `input` on its standard input; its standard output.
fn ok_bytes(prog: &str, input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(prog)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{prog} failed");
    out.stdout
}

#[test]
fn a_text_file_written_by_a_shell_builtin_leaves_nothing() {
    // `echo > F` restores its standard output with dup2(2), which drops the error of
    // the close it makes: the command succeeds whatever happens; nothing may be left.
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let before = fs.state("r");
    let r = fs.at("r");
    let out = fs.sh(r#"echo hello > "$R/t""#, &[("R", s(&r))], WRITER_LIMIT);
    let _ = out;
    if let Err(e) = fs.check_nothing("r", "t", &before) {
        panic!("echo hello > M/r/t must leave nothing: {e}");
    }
}

/// `fallocate -l 10M`: either unsupported (fails, nothing left) or a size change that
/// imports a 10 MiB zero raw disk; an image `f` is always a valid 10 MiB zero disk.
#[test]
fn fallocate_fails_or_imports_zero_disk() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let zero = fs.work().join("zero.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&zero), "10M"]);
    let before = fs.state("r");
    let r = fs.at("r");
    let script = r#"fallocate -l 10M "$R/f""#;
    let out = fs.sh(script, &[("R", s(&r))], WRITER_LIMIT);
    let image = fs.at("r/f");
    if out.status.success() || image.exists() {
        let how = if out.status.success() {
            "succeeded, so f must be"
        } else {
            "failed yet left an image f, so f must be"
        };
        fs.check_image("r", "f", &zero, "raw", 10 << 20)
            .unwrap_or_else(|e| {
                panic!(
                    "`{script}` {how} a valid 10 MiB zero disk: {e}\n(the command ended: {})",
                    describe(&out)
                )
            });
    } else {
        fs.check_nothing("r", "f", &before).unwrap_or_else(|e| {
            panic!(
                "`{script}` failed ({}), so it must leave nothing: {e}",
                describe(&out)
            )
        });
    }
}

// ---------------------------------------------------------------------------------------
// 3. Names tell the truth at once
// ---------------------------------------------------------------------------------------

/// A mount over `r` with the small source `SRC` (and `SRC2`, another content), and the
/// environment of the loops.
fn loop_site() -> Option<(Fs, PathBuf, PathBuf)> {
    let fs = Fs::start(&["r", "a", "b"])?;
    let src = fs.small_source("src.qcow2", 0x61);
    let src2 = fs.small_source("rev.qcow2", 0x62);
    Some((fs, src, src2))
}

#[test]
fn at_once_cp_then_rm() {
    let Some((fs, src, _)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    fs.run_loop(
        "cp SRC M/r/x && rm -r M/r/x",
        r#"cp "$SRC" "$R/x"
rm -r "$R/x""#,
        &[("SRC", s(&src)), ("R", s(&r))],
    );
}

#[test]
fn at_once_stage_then_mv() {
    let Some((fs, src, _)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    fs.run_loop(
        "qemu-img convert to .new, mv .new new, ls new/@0, rm -r new",
        r#"qemu-img convert -q -f qcow2 -O qcow2 "$SRC" "$R/.new"
mv "$R/.new" "$R/new"
ls "$R/new/@0" >/dev/null
rm -r "$R/new""#,
        &[("SRC", s(&src)), ("R", s(&r))],
    );
}

#[test]
fn at_once_ln_then_mv() {
    let Some((fs, src, _)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    ok("cp", &[s(&src), s(&fs.at("r/base"))]);
    fs.run_loop(
        "ln M/r/base/@0/disk.qcow2 M/r/c, mv c d, ls d/@0, rm -r d",
        r#"ln "$R/base/@0/disk.qcow2" "$R/c"
mv "$R/c" "$R/d"
ls "$R/d/@0" >/dev/null
rm -r "$R/d""#,
        &[("SRC", s(&src)), ("R", s(&r))],
    );
}

#[test]
fn at_once_mv_then_add_revision() {
    let Some((fs, src, src2)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    fs.run_loop(
        "cp SRC M/r/d, mv M/r/d M/r/e, cp SRC2 M/r/e/ (two revisions), rm -r M/r/e",
        r#"cp "$SRC" "$R/d"
mv "$R/d" "$R/e"
test ! -e "$R/d"
cp "$SRC2" "$R/e/"
revs=$(ls "$R/e" | grep -c '^@')
[ "$revs" = 2 ] || { echo "round $i: e has $revs revisions: $(ls "$R/e")" >&2; false; }
rm -r "$R/e""#,
        &[("SRC", s(&src)), ("SRC2", s(&src2)), ("R", s(&r))],
    );
}

/// `cp` of one file into an image, twice in a row: the second finds the name of the
/// first, published a moment ago, and still makes the next revision.
#[test]
fn at_once_cp_twice_into_an_image() {
    let Some((fs, src, src2)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    fs.run_loop(
        "cp SRC M/r/f, cp SRC2 M/r/f/x.qcow2 twice (three revisions), rm -r M/r/f",
        r#"cp "$SRC" "$R/f"
cp "$SRC2" "$R/f/x.qcow2"
cp "$SRC2" "$R/f/x.qcow2"
revs=$(ls "$R/f" | grep -c '^@')
[ "$revs" = 3 ] || { echo "round $i: f has $revs revisions: $(ls "$R/f")" >&2; false; }
rm -r "$R/f""#,
        &[("SRC", s(&src)), ("SRC2", s(&src2)), ("R", s(&r))],
    );
}

#[test]
fn at_once_rm_leaves_no_directory() {
    let Some((fs, src, _)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    fs.run_loop(
        "cp SRC M/r/x, rm -r M/r/x, then M/r/x must not exist",
        r#"cp "$SRC" "$R/x"
test -d "$R/x/@0"
rm -r "$R/x"
test ! -e "$R/x"
if ls "$R" | grep -qx x; then echo "round $i: ls still lists x" >&2; false; fi"#,
        &[("SRC", s(&src)), ("R", s(&r))],
    );
}

/// Python: N times, import SRC as R/img, open its raw view, `rm -r` the revision, then
/// fstat and read the open descriptor.
const PY_FSTAT_AFTER_RM: &str = r#"
import os, subprocess, sys
src, r, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
img = os.path.join(r, "img")
for i in range(1, n + 1):
    subprocess.run(["cp", src, img], check=True)
    fd = os.open(os.path.join(img, "@0", "disk.raw"), os.O_RDONLY)
    subprocess.run(["rm", "-r", os.path.join(img, "@0")], check=True)
    try:
        st = os.fstat(fd)
    except OSError as e:
        sys.exit("round %d: fstat of the open view after rm -r of its revision: %s" % (i, e))
    if st.st_size != 4 << 20:
        sys.exit("round %d: fstat size %d, want %d" % (i, st.st_size, 4 << 20))
    try:
        data = os.pread(fd, 65536, 0)
        tail = os.pread(fd, 65536, 3 << 20)
    except OSError as e:
        sys.exit("round %d: read of the open view after rm -r of its revision: %s" % (i, e))
    if data != b"\x61" * 65536 or tail != b"\x5a" * 65536:
        sys.exit("round %d: the open view reads wrong data" % i)
    os.close(fd)
    subprocess.run(["rm", "-rf", img], check=True)
    if os.path.lexists(img):
        sys.exit("round %d: %s still exists after rm -rf" % (i, img))
"#;

#[test]
fn at_once_fstat_after_rm() {
    let Some((fs, src, _)) = loop_site() else {
        return;
    };
    let r = fs.at("r");
    let n = rounds().to_string();
    let out = fs.sh(
        &format!(r#""$PY" -c '{PY_FSTAT_AFTER_RM}' "$SRC" "$R" "$N""#),
        &[("SRC", s(&src)), ("R", s(&r)), ("N", &n)],
        LOOP_LIMIT,
    );
    assert!(
        out.status.success(),
        "an open view must keep working after rm -r of its revision, {n} times: {}",
        describe(&out)
    );
}

#[test]
fn at_once_mv_to_another_repository() {
    let Some((fs, src, _)) = loop_site() else {
        return;
    };
    fs.run_loop(
        "cp SRC M/a/img, mv M/a/img M/b/, compare M/b/img, M/a/img gone, rm -r M/b/img",
        r#"cp "$SRC" "$M/a/img"
mv "$M/a/img" "$M/b/"
test ! -e "$M/a/img"
qemu-img compare -q -f raw -F qcow2 "$M/b/img/@0/disk.raw" "$SRC"
rm -r "$M/b/img""#,
        &[("SRC", s(&src))],
    );
    assert!(
        fs.meta_names("a").is_empty(),
        "repository a's meta/ must be empty: {:?}",
        fs.meta_names("a")
    );
}

// ---------------------------------------------------------------------------------------
// 4. No empty image directory is left behind
// ---------------------------------------------------------------------------------------

/// Names of the revision directories (`@N`) of `dir`, sorted.
fn revisions_of(dir: &Path) -> Vec<String> {
    sorted_names(dir)
        .into_iter()
        .filter(|n| n.starts_with('@'))
        .collect()
}

/// `cp -r` of an image directory (to another repository, and to a new name in its own
/// repository) cannot copy its revision directories: it fails and leaves no image
/// directory at the target, not even for a moment's lookup, and the source keeps its
/// revisions. `mv` of the image to another repository still works afterwards, and a
/// `mkdir` then `rmdir` leaves nothing.
#[test]
fn cp_r_of_an_image_directory_fails_leaving_nothing() {
    let Some((fs, src, src2)) = loop_site() else {
        return;
    };
    ok("cp", &[s(&src), s(&fs.at("a/img"))]);
    ok("cp", &[s(&src2), &format!("{}/", s(&fs.at("a/img")))]);
    let check_source = |when: &str| {
        let revs = revisions_of(&fs.at("a/img"));
        assert_eq!(revs, ["@0", "@1"], "{when}: a/img must keep its revisions");
        assert_eq!(
            fs.meta_names("a"),
            ["img@0", "img@1"],
            "{when}: repository a's meta/"
        );
        for (rev, want) in [("@0", &src), ("@1", &src2)] {
            let raw = fs.at(&format!("a/img/{rev}/disk.raw"));
            common::assert_same_disk(&raw, "raw", want, "qcow2");
        }
    };
    for (script, repo, name) in [
        (r#"cp -r "$M/a/img" "$M/b/""#, "b", "img"),
        (r#"cp -r "$M/a/img" "$M/a/img2""#, "a", "img2"),
        (r#"cp -r "$M/a/img" "$M/b/other""#, "b", "other"),
    ] {
        let before = fs.state(repo);
        let out = fs.sh(script, &[], WRITER_LIMIT);
        assert!(
            !out.status.success(),
            "`{script}` cannot copy revision directories and must fail: {}",
            describe(&out)
        );
        let target = fs.at(&format!("{repo}/{name}"));
        match fs::symlink_metadata(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            found => panic!(
                "after `{script}`, {} must not exist: {found:?} (cp said: {})",
                target.display(),
                describe(&out)
            ),
        }
        fs.check_nothing(repo, name, &before)
            .unwrap_or_else(|e| panic!("`{script}` must leave nothing: {e}"));
        check_source(&format!("after `{script}`"));
    }
    // mkdir then rmdir leaves nothing; a mkdir of a revision directory is refused and
    // leaves nothing either.
    let out = fs.sh(
        r#"mkdir "$M/b/x" && rmdir "$M/b/x" && test ! -e "$M/b/x"
! mkdir "$M/b/y/@0" 2>/dev/null && ! mkdir -p "$M/b/y/@0" 2>/dev/null && test ! -e "$M/b/y""#,
        &[],
        WRITER_LIMIT,
    );
    assert!(out.status.success(), "mkdir and rmdir: {}", describe(&out));
    assert!(
        !sorted_names(&fs.at("b"))
            .iter()
            .any(|n| n == "x" || n == "y"),
        "ls M/b: {:?}",
        sorted_names(&fs.at("b"))
    );
    // The whole image still moves to another repository with its revisions.
    let out = fs.sh(r#"mv "$M/a/img" "$M/b/""#, &[], WRITER_LIMIT);
    assert!(out.status.success(), "mv M/a/img M/b/: {}", describe(&out));
    assert_eq!(revisions_of(&fs.at("b/img")), ["@0", "@1"]);
    assert!(!fs.at("a/img").exists(), "a/img must be gone after mv");
    let raw = fs.at("b/img/@1/disk.raw");
    common::assert_same_disk(&raw, "raw", &src2, "qcow2");
}

/// Python: the steps of `rm -r R/img` in the order one run of the race below took them,
/// while SRC is written into `R/img/new.qcow2` (the next revision): rm lists the file
/// being written, the writer closes it (published as `@1`), rm lists `@1` too, removes
/// `latest`, `@0` and `@1`, then unlinks the name it listed (gone: the writer's close
/// published it), then the image directory.
const PY_RM_R_AFTER_PUBLISH: &str = r#"
import os, sys
src, r = sys.argv[1], sys.argv[2]
img = os.path.join(r, "img")
fd = os.open(os.path.join(img, "new.qcow2"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
with open(src, "rb") as f:
    os.write(fd, f.read())
listed = os.listdir(img)
if "new.qcow2" not in listed:
    sys.exit("the file being written is not listed: %r" % listed)
os.close(fd)
for name in os.listdir(img):
    if name not in listed:
        listed.append(name)
if sorted(listed) != ["@0", "@1", "latest", "new.qcow2"]:
    sys.exit("img lists %r" % sorted(listed))
def step(what, f, path):
    try:
        f(path)
    except OSError as e:
        sys.exit("%s %s: %s (img now lists %r)" % (what, path, e, os.listdir(img)))
for name in sorted(listed, key=lambda n: (n != "latest", not n.startswith("@"), n)):
    p = os.path.join(img, name)
    if name.startswith("@"):
        for f in os.listdir(p):
            step("unlink", os.unlink, os.path.join(p, f))
        step("rmdir", os.rmdir, p)
    else:
        step("unlink", os.unlink, p)
step("rmdir", os.rmdir, img)
if os.path.lexists(img) or "img" in os.listdir(r):
    sys.exit("img is still there")
"#;

/// `rm -r` of an image directory that listed a file while it was being written into
/// the image, then met its name after the writer published it: the removal goes on
/// (unlinking the published name deletes nothing) and leaves nothing, rather than
/// failing half way with the image directory left empty.
#[test]
fn rm_r_that_listed_a_file_published_since_leaves_nothing() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let src = fs.small_source("src.qcow2", 0x61);
    let r = fs.at("r");
    ok("cp", &[s(&src), s(&fs.at("r/img"))]);
    let out = fs.sh(
        &format!(r#""$PY" -c '{PY_RM_R_AFTER_PUBLISH}' "$SRC" "$R""#),
        &[("SRC", s(&src)), ("R", s(&r))],
        WRITER_LIMIT,
    );
    assert!(
        out.status.success(),
        "rm -r after a publish into the image: {}
ls M/r: {:?}",
        describe(&out),
        sorted_names(&r)
    );
    assert!(
        fs.meta_names("r").is_empty(),
        "repository r's meta/ must be empty: {:?}",
        fs.meta_names("r")
    );
}

/// Rounds of the race of `cp SRC M/r/img/` with `rm -r M/r/img`
/// (`PCOCC_IMAGEFS_RACE_ROUNDS` when set).
const RACE_ROUNDS: u32 = 30;

/// `cp SRC M/r/img/` (the next revision) racing `rm -r M/r/img`: either may fail, but
/// afterwards `img` is a real image whose every revision is SRC, or nothing at all;
/// never an image directory with no revision. What is left is removed by `rm -r`.
#[test]
fn cp_into_an_image_racing_rm_r_leaves_no_empty_directory() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let src = fs.work().join("src.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "1M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 64k", s(&src)],
    );
    let r = fs.at("r");
    let n = std::env::var("PCOCC_IMAGEFS_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(RACE_ROUNDS)
        .to_string();
    let script = r#"
set -u
fail() { echo "round $i: $*" >&2; exit 1; }
for i in $(seq 1 "$N"); do
    cp "$SRC" "$R/img" || fail "cp SRC R/img failed"
    cp "$SRC" "$R/img/" 2>/dev/null & cp_pid=$!
    rm -r "$R/img" 2>/dev/null & rm_pid=$!
    wait "$cp_pid"; cp_rc=$?
    wait "$rm_pid"; rm_rc=$?
    if ls "$R" | grep -qx img; then
        [ "$cp_rc" = 0 ] || [ "$rm_rc" != 0 ] ||
            fail "cp failed and rm -r succeeded, yet ls lists img: $(ls -la "$R/img" 2>&1)"
        revs=$(ls "$R/img" | grep '^@') ||
            fail "img is listed with no revision (cp $cp_rc, rm $rm_rc): $(ls -la "$R/img" 2>&1)"
        for rev in $revs; do
            qemu-img compare -q -f qcow2 -F qcow2 "$R/img/$rev/disk.qcow2" "$SRC" ||
                fail "img/$rev/disk.qcow2 differs from SRC (cp $cp_rc, rm $rm_rc)"
            qemu-img compare -q -f raw -F qcow2 "$R/img/$rev/disk.raw" "$SRC" ||
                fail "img/$rev/disk.raw differs from SRC (cp $cp_rc, rm $rm_rc)"
        done
        rm -r "$R/img" || fail "rm -r of what was left failed (cp $cp_rc, rm $rm_rc)"
    else
        if [ -e "$R/img" ]; then
            fail "img is not listed but exists (cp $cp_rc, rm $rm_rc): $(ls -la "$R/img" 2>&1)"
        fi
    fi
    if [ -e "$R/img" ] || ls "$R" | grep -qx img; then
        fail "img is still there after its removal: $(ls -la "$R" 2>&1)"
    fi
done
"#;
    let out = fs.sh(
        script,
        &[("SRC", s(&src)), ("R", s(&r)), ("N", &n)],
        LOOP_LIMIT,
    );
    assert!(
        out.status.success(),
        "cp into an image racing rm -r of it, {n} rounds: {}",
        describe(&out)
    );
    assert!(
        fs.meta_names("r").is_empty(),
        "repository r's meta/ must be empty: {:?}",
        fs.meta_names("r")
    );
}

// ---------------------------------------------------------------------------------------
// 5. Imports converted or kept as their bytes arrive, in any order
// ---------------------------------------------------------------------------------------

/// Python writing `argv[1]` into the new file `argv[2]` in 256 KiB pieces from the last to
/// the first: every write goes back, as a parallel or sparse-aware copier may write.
const PY_BACKWARDS: &str = r#"
import os, sys
data = open(sys.argv[1], "rb").read()
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
step = 256 << 10
for at in reversed(range(0, len(data), step)):
    os.pwrite(fd, data[at:at + step], at)
os.close(fd)
"#;

/// The two writers of part 5: `cp` (in order) and [`PY_BACKWARDS`].
const ORDERS: [(&str, &str); 2] = [
    ("cp", r#"cp "$SRC" "$M/$R/$NAME""#),
    (
        "backwards",
        r#""$PY" -c "$PY_BACKWARDS" "$SRC" "$M/$R/$NAME""#,
    ),
];

/// The virtual size qemu-img reads in `src` (in `fmt`).
fn virtual_size(src: &Path, fmt: &str) -> u64 {
    let info = ok("qemu-img", &["info", "--output=json", "-f", fmt, s(src)]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    info["virtual-size"]
        .as_u64()
        .expect("virtual-size in qemu-img info")
}

/// The layer files of repository `repo` on disk (`data/XX/<sha256>` names).
fn layer_names(fs: &Fs, repo: &str) -> Vec<String> {
    let data = fs.repo(repo).join("data");
    let mut names: Vec<String> = sorted_names(&data)
        .iter()
        .flat_map(|xx| sorted_names(&data.join(xx)))
        .collect();
    names.sort();
    names
}

/// Writes `src` into `M/repo/name` the way `order` (of [`ORDERS`]) writes.
fn write_in(fs: &Fs, order: &str, src: &Path, repo: &str, name: &str) -> Result<(), String> {
    let script = ORDERS.iter().find(|(o, _)| *o == order).unwrap().1;
    let out = fs.sh(
        script,
        &[
            ("SRC", s(src)),
            ("R", repo),
            ("NAME", name),
            ("PY_BACKWARDS", PY_BACKWARDS),
        ],
        WRITER_LIMIT,
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{script}` failed: {}", describe(&out)))
    }
}

/// Every source format, written in order by `cp` and backwards by python, imports the
/// source's disk: its raw view `qemu-img compare`s identical to the source, its qcow2
/// view is clean.
#[test]
fn every_format_imports_whatever_the_order_of_its_writes() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let formats = [
        ("raw", ""),
        ("qcow2", ""),
        ("qcow2", "compression_type=zlib"),
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=streamOptimized"),
        ("vmdk", "full"),
        ("vmdk", "full,subformat=streamOptimized"),
        ("vdi", ""),
        // Every block full: converted while it arrives (in order) rather than at close.
        ("vdi", "full"),
        ("vpc", ""),
        ("vpc", "full"),
        ("vpc", "subformat=fixed"),
        ("qed", ""),
    ];
    let mut failures = Vec::new();
    for (i, (fmt, opts)) in formats.iter().enumerate() {
        let raw = fs.source_raw(&format!("s{i}.img"));
        let (full, create) = match opts.strip_prefix("full") {
            Some(rest) => (true, rest.trim_start_matches(',')),
            None => (false, *opts),
        };
        if full {
            ok(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 0x5a 0 16M", s(&raw)],
            );
        }
        let src = fs.work().join(format!("s{i}.{fmt}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        // The zlib case is compressed: a qcow2 that is converted, not kept.
        if !create.is_empty() {
            args.extend(["-o", create]);
        }
        if create.starts_with("compression") {
            args.push("-c");
        }
        args.extend([s(&raw), s(&src)]);
        ok("qemu-img", &args);
        let size = virtual_size(&src, fmt);
        for (order, _) in ORDERS {
            let name = format!("{order}-{i}");
            let result = write_in(&fs, order, &src, "r", &name)
                .and_then(|()| fs.check_image("r", &name, &src, fmt, size));
            if let Err(e) = result {
                failures.push(format!("[{fmt} {opts} written by {order}] {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A fixed VHD is its raw disk followed by a footer: `cp`ed into the mount, it is the
/// very layer its raw disk makes (the footer, inside the disk's last cluster here, is not
/// taken for the guest's data).
#[test]
fn a_fixed_vhd_imports_as_the_layer_of_its_raw_disk() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let raw = fs.work().join("odd.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "1000K"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 7 0 64k", s(&raw)]);
    let vhd = fs.work().join("odd.vpc");
    let opts = "subformat=fixed,force_size=on";
    ok(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            opts,
            s(&raw),
            s(&vhd),
        ],
    );
    for (src, name) in [(&raw, "from-raw"), (&vhd, "from-vhd")] {
        write_in(&fs, "cp", src, "r", name).unwrap();
    }
    fs.check_image("r", "from-vhd", &raw, "raw", 1000 << 10)
        .unwrap();
    let layers = layer_names(&fs, "r");
    assert_eq!(layers.len(), 1, "one layer for the same disk: {layers:?}");
}

/// A clean standalone qcow2 is stored as it is, whatever the order it was written in:
/// the layer is the file itself (its sha256 is the source's), shared by both imports. A
/// compressed one is converted (a layer of its own, not the source's bytes).
#[test]
fn a_clean_qcow2_is_stored_as_it_is() {
    let Some(fs) = Fs::start(&["r"]) else {
        return;
    };
    let src = fs.source("qcow2");
    let sha = |p: &Path| ok("sha256sum", &[s(p)])[..64].to_string();
    let src_sha = sha(&src);
    let size = virtual_size(&src, "qcow2");
    for (order, _) in ORDERS {
        let name = format!("kept-{order}");
        write_in(&fs, order, &src, "r", &name).unwrap();
        fs.check_image("r", &name, &src, "qcow2", size).unwrap();
        assert_eq!(layer_names(&fs, "r"), [src_sha.as_str()], "after {order}");
    }
    let zipped = fs.work().join("zipped.qcow2");
    ok(
        "qemu-img",
        &["convert", "-q", "-c", "-O", "qcow2", s(&src), s(&zipped)],
    );
    write_in(&fs, "cp", &zipped, "r", "zipped").unwrap();
    fs.check_image("r", "zipped", &zipped, "qcow2", size)
        .unwrap();
    let layers = layer_names(&fs, "r");
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert!(
        !layers.contains(&sha(&zipped)),
        "a compressed qcow2 is converted"
    );
}
