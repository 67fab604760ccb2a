//! Reliability and security through real mounts (issue 7, points 2 to 4): daemons and
//! CLI imports killed with SIGKILL, two daemons and the CLI working on the same
//! repositories at once (standing in for two nodes of a shared filesystem), and other
//! users on a root mount with `allow_other`. Each test tries to break a promise of the
//! README's "Guarantees" section and judges the repository left on disk with qemu-img.
//! Needs root, `/dev/fuse`, qemu-img and setpriv (CI has all of them); without them each
//! test prints why and returns.

mod common;
use common::{daemon_pid, ok, run, s, unmount};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

const PCOCC: &str = env!("CARGO_BIN_EXE_pcocc");
/// The unprivileged user of the other-user tests (`nobody` on Debian-like systems).
const NOBODY: u32 = 65534;
/// A group no account has, given to `nobody` as a supplementary group by setpriv.
const TEAM_GID: u32 = 4242;
/// How many imports race each other in the concurrency tests.
const RACERS: usize = 6;

fn sha256_file(p: &Path) -> String {
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `args` as `nobody` with the supplementary `groups` (none when empty).
fn as_nobody(groups: &[u32], args: &[&str]) -> Output {
    let ids = [format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")];
    let group_list = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let group_arg = format!("--groups={group_list}");
    let mut full: Vec<&str> = vec![&ids[0], &ids[1]];
    if groups.is_empty() {
        full.push("--clear-groups");
    } else {
        full.push(&group_arg);
    }
    full.push("--");
    full.extend_from_slice(args);
    run("setpriv", &full)
}

/// Repositories `user` (the default) and `global` in a temporary directory, and any
/// number of daemons mounted on them; every mount is unmounted when dropped.
struct Site {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl Site {
    /// A site with one mount (default options besides `allow_other`).
    fn start() -> Option<Site> {
        let mut site = Site::new()?;
        site.add_mount(&[]);
        Some(site)
    }

    fn new() -> Option<Site> {
        let dir = common::mount_scratch("reliability", &["qemu-img", "setpriv"])?;
        let site = Site {
            dir,
            mounts: Vec::new(),
        };
        for sub in ["repos", "work", "user-conf", "home"] {
            fs::create_dir_all(site.dir.path().join(sub)).unwrap();
        }
        // Others must be able to reach the repositories and sources.
        for d in [site.dir.path().to_path_buf(), site.dir.path().join("repos")] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(site.work(), fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(
            site.config(),
            format!(
                "repos:\n  - name: user\n    path: {}\n  - name: global\n    path: {}\n",
                s(&site.repo("user")),
                s(&site.repo("global"))
            ),
        )
        .unwrap();
        // Let the CLI create the repositories, as a first use does.
        site.pcocc_ok(&["image", "repo", "list"]);
        Some(site)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("repos.yaml")
    }

    /// Mounts one more daemon on the same repositories (with `allow_other` and `extra`)
    /// and returns its index.
    fn add_mount(&mut self, extra: &[&str]) -> usize {
        let mnt = self.dir.path().join(format!("mnt{}", self.mounts.len()));
        self.mounts.push(mnt);
        let i = self.mounts.len() - 1;
        self.mount(i, extra);
        i
    }

    /// Starts the daemon of mount `i`; it returns once the mount is live (a dead mount
    /// left by a killed daemon is cleared by the new one).
    fn mount(&self, i: usize, extra: &[&str]) {
        let config = self.config();
        let mut args = vec!["--config", s(&config), "-o", "allow_other"];
        args.extend_from_slice(extra);
        args.push(s(&self.mounts[i]));
        common::start_daemon(&args, &self.mounts[i], "info");
    }

    fn at(&self, i: usize, rel: &str) -> PathBuf {
        self.mounts[i].join(rel)
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.dir.path().join("repos").join(name)
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The CLI, with this site's configuration as the system file.
    fn pcocc(&self, args: &[&str]) -> Command {
        let mut c = Command::new(PCOCC);
        c.args(args)
            .current_dir(self.work())
            .env("HOME", self.dir.path().join("home"))
            .env("PCOCC_USER_CONF_DIR", self.dir.path().join("user-conf"))
            .env("PCOCC_SYSTEM_CONF_DIR", self.dir.path())
            .env_remove("RUST_LOG");
        c
    }

    #[track_caller]
    fn pcocc_ok(&self, args: &[&str]) -> String {
        let out = self.pcocc(args).output().expect("run pcocc");
        assert!(out.status.success(), "pcocc {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn meta_names(&self, repo: &str) -> Vec<String> {
        common::sorted_names(&self.repo(repo).join("meta"))
    }

    fn tmp_entries(&self, repo: &str) -> Vec<PathBuf> {
        fs::read_dir(self.repo(repo).join(".tmp"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Every revision of `repo` names layers that exist and that `qemu-img check`
    /// finds clean; returns how many revisions there are.
    #[track_caller]
    fn assert_every_revision_sound(&self, repo: &str) -> usize {
        let names = self.meta_names(repo);
        for name in &names {
            let meta = fs::read_to_string(self.repo(repo).join("meta").join(name)).unwrap();
            let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
            let blobs = v["data_blobs"].as_array().expect("data_blobs");
            assert!(!blobs.is_empty(), "{name} has no layer");
            for b in blobs {
                let h = b.as_str().unwrap().trim_start_matches("sha256:");
                let layer = self.repo(repo).join("data").join(&h[..2]).join(h);
                assert!(
                    layer.is_file(),
                    "{name}: layer {} is missing",
                    layer.display()
                );
                ok("qemu-img", &["check", "-q", "-f", "qcow2", s(&layer)]);
            }
        }
        names.len()
    }

    /// A raw disk of `size` with a few recognisable extents (and holes); `seed` makes
    /// the content (and so the layer) distinct.
    fn source_raw(&self, name: &str, size: &str, seed: u8) -> PathBuf {
        let p = self.work().join(name);
        ok("qemu-img", &["create", "-q", "-f", "raw", s(&p), size]);
        let cmds = [
            format!("write -P {} 0 1M", 0x11u8.wrapping_add(seed)),
            format!("write -P {} 3M 64k", 0x22u8.wrapping_add(seed)),
        ];
        ok(
            "qemu-io",
            &["-f", "raw", "-c", &cmds[0], "-c", &cmds[1], s(&p)],
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        p
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for m in &self.mounts {
            unmount(m);
        }
    }
}

/// A child process killed (SIGKILL) and reaped when the test ends, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// 2. Crashes
// ---------------------------------------------------------------------------------------

#[test]
fn a_daemon_killed_during_an_import_leaves_no_partial_image_and_gc_empties_tmp() {
    let Some(site) = Site::start() else { return };
    let kept = site.source_raw("kept.raw", "8M", 0);
    ok("cp", &[s(&kept), s(&site.at(0, "user/"))]);
    // A large sparse source written slowly through the mount: 1 MiB every 20 ms at
    // offsets spread over 4 GiB, so the daemon is killed with the import half done.
    let target = site.at(0, "user/partial.raw");
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = fs::File::create(target)?;
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..200u64 {
            f.seek(SeekFrom::Start(i * (20 << 20)))?;
            f.write_all(&chunk)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        f.sync_all()
    });
    common::eventually(Duration::from_secs(10), || {
        !site.tmp_entries("user").is_empty() || writer.is_finished()
    });
    if writer.is_finished() || site.tmp_entries("user").is_empty() {
        panic!(
            "the import never started writing under .tmp/ (writer: {:?})",
            writer.is_finished().then(|| writer.join())
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = daemon_pid(&site.mounts[0]).expect("daemon pid");
    // SAFETY: killing the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let written = writer.join().expect("writer thread");
    assert!(
        written.is_err(),
        "the import must fail when its daemon dies"
    );

    site.mount(0, &[]);
    assert_eq!(site.meta_names("user"), ["kept@0"]);
    let listed = fs::read_dir(site.at(0, "user"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(listed, ["kept"], "the partial image must not be visible");
    assert_eq!(site.assert_every_revision_sound("user"), 1);
    assert_eq!(
        sha256_file(&site.at(0, "user/kept/@0/disk.raw")),
        sha256_file(&kept)
    );
    // The killed import's scratch file stays until gc, which then leaves .tmp/ empty.
    assert!(!site.tmp_entries("user").is_empty());
    site.pcocc_ok(&["image", "repo", "gc", "--grace", "0", "user"]);
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
    assert_eq!(site.assert_every_revision_sound("user"), 1);
}

#[test]
fn a_cli_import_killed_midway_leaves_no_partial_image_and_gc_empties_tmp() {
    let Some(site) = Site::start() else { return };
    let kept = site.source_raw("kept.raw", "8M", 0);
    site.pcocc_ok(&["image", "import", s(&kept), "user:kept"]);
    // 256 MiB of data: converting and hashing it takes long enough to be interrupted.
    let big = site.work().join("big.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&big), "256M"]);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 256M", s(&big)],
    );
    let mut child = KillOnDrop(
        site.pcocc(&["image", "import", s(&big), "user:big"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pcocc import"),
    );
    // Killed as soon as its scratch layer holds data.
    let started = common::eventually(Duration::from_secs(30), || {
        site.tmp_entries("user")
            .iter()
            .any(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
    });
    child.0.kill().expect("SIGKILL the import");
    let status = child.0.wait().unwrap();
    assert!(started, "the import never wrote under .tmp/");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the import ended first"
    );

    assert_eq!(site.meta_names("user"), ["kept@0"]);
    let listed = fs::read_dir(site.at(0, "user"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(listed, ["kept"], "the partial image must not be visible");
    assert_eq!(site.assert_every_revision_sound("user"), 1);
    site.pcocc_ok(&["image", "repo", "gc", "--grace", "0", "user"]);
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
    assert_eq!(site.assert_every_revision_sound("user"), 1);
    // And the image imports fine afterwards.
    site.pcocc_ok(&["image", "import", s(&kept), "user:again"]);
}

#[test]
fn a_writer_killed_mid_import_publishes_nothing_and_its_children_closing_publish_nothing() {
    let Some(site) = Site::start() else { return };
    let dest = site.at(0, "user/killed.raw");
    // The shell opens the file and keeps it; each `tr` inherits it, writes 64 KiB and
    // exits (closing its copy, which must not publish the file). The shell runs in a
    // process group of its own, killed whole as a job is (a `tr` left running would
    // end normally and its close would be the last).
    let script = format!(
        "exec 3>'{}'; while :; do head -c 65536 /dev/zero | tr '\\0' x >&3; sleep 0.02; done",
        s(&dest)
    );
    let mut sh = KillOnDrop(
        Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .expect("spawn sh"),
    );
    let tmp_grows = common::eventually(Duration::from_secs(10), || {
        site.tmp_entries("user")
            .iter()
            .any(|p| fs::metadata(p).is_ok_and(|m| m.len() >= 4 * 65536))
    });
    assert!(tmp_grows, "the writer never wrote");
    assert_eq!(site.meta_names("user"), Vec::<String>::new());
    let group = -(sh.0.id() as i32);
    // SAFETY: kill(2) of the writer's own process group; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(group, libc::SIGKILL) },
        0,
        "SIGKILL the writer"
    );
    sh.0.wait().unwrap();
    // The last copy closed, the scratch file goes; no image appears.
    assert!(
        common::eventually(Duration::from_secs(5), || site
            .tmp_entries("user")
            .is_empty()),
        "the killed writer's scratch file stays: {:?}",
        site.tmp_entries("user")
    );
    assert_eq!(site.meta_names("user"), Vec::<String>::new());
    assert!(!site.at(0, "user/killed").exists());
    // A writer that forks children while writing publishes once, complete, at its close.
    let mut f = fs::File::create(site.at(0, "user/forked.raw")).unwrap();
    f.write_all(&[0x42; 1 << 20]).unwrap();
    ok("true", &[]);
    assert_eq!(site.meta_names("user"), Vec::<String>::new());
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(&[0x43; 1 << 20]).unwrap();
    drop(f);
    assert_eq!(site.meta_names("user"), ["forked@0"]);
    let mut expected = vec![0x42; 1 << 20];
    expected.resize(8 << 20, 0);
    expected.extend_from_slice(&[0x43; 1 << 20]);
    assert_eq!(
        sha256_file(&site.at(0, "user/forked/@0/disk.raw")),
        hex(&expected)
    );
}

/// A directory with a small tmpfs mounted on it, unmounted when dropped.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run("umount", &[s(&self.0)]);
    }
}

#[test]
fn a_write_that_fails_for_lack_of_space_fails_the_import_and_publishes_nothing() {
    let Some(mut site) = Site::new() else { return };
    // The repository `global` on a 1 MiB filesystem, laid out as pcocc does.
    let repo = site.repo("global");
    ok(
        "mount",
        &["-t", "tmpfs", "-o", "size=1M,mode=0755", "tmpfs", s(&repo)],
    );
    let _small = SmallFs(repo.clone());
    for d in ["data", "meta", ".tmp"] {
        fs::create_dir(repo.join(d)).unwrap();
    }
    fs::write(repo.join(".config"), "version: 2\n").unwrap();
    site.add_mount(&[]);
    let src = site.source_raw("src.raw", "8M", 6);
    let out = run("cp", &[s(&src), s(&site.at(0, "global/full.raw"))]);
    assert!(!out.status.success(), "cp into a full repository must fail");
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
    assert_eq!(site.meta_names("global"), Vec::<String>::new());
    assert!(!site.at(0, "global/full").exists());
    assert!(
        common::eventually(Duration::from_secs(5), || site
            .tmp_entries("global")
            .is_empty()),
        "the failed import's scratch file stays"
    );
    // The other repository is untouched and still imports.
    ok("cp", &[s(&src), s(&site.at(0, "user/fine.raw"))]);
    assert_eq!(site.meta_names("user"), ["fine@0"]);
}

// ---------------------------------------------------------------------------------------
// 3. Concurrent hosts
// ---------------------------------------------------------------------------------------

/// Two daemons on the same repositories, with a refresh time of one second.
const REFRESH_SECS: u64 = 1;

fn two_hosts() -> Option<Site> {
    let mut site = Site::new()?;
    let refresh = format!("refresh={REFRESH_SECS}");
    site.add_mount(&["-o", &refresh]);
    site.add_mount(&["-o", &refresh]);
    Some(site)
}

/// How one import of a race went: success, or the tool's error output.
fn import_via(site: &Site, how: usize, src: &Path, name: &str) -> Result<(), String> {
    let out = match how % 3 {
        0 | 1 => {
            let dest = site.at(how % 3, &format!("user/{name}.raw"));
            Command::new("cp").args([s(src), s(&dest)]).output()
        }
        _ => site
            .pcocc(&["image", "import", s(src), &format!("user:{name}")])
            .output(),
    }
    .expect("run an import");
    if out.status.success() {
        Ok(())
    } else {
        Err(stderr(&out))
    }
}

/// One distinct 8 MiB raw source per racer.
fn racer_sources(site: &Site) -> Vec<PathBuf> {
    (0..RACERS)
        .map(|i| site.source_raw(&format!("s{i}.raw"), "8M", i as u8))
        .collect()
}

/// Imports every source at once, source `i` as `name(i)` by way `i` (see [`import_via`]);
/// returns how each went, in the order of `sources`.
fn race(site: &Site, sources: &[PathBuf], name: fn(usize) -> String) -> Vec<Result<(), String>> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(i, src)| sc.spawn(move || import_via(site, i, src, &name(i))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// [`race`] with distinct names `img{i}`, each import required to succeed.
fn race_distinct(site: &Site, sources: &[PathBuf]) {
    for (i, r) in race(site, sources, |i| format!("img{i}"))
        .into_iter()
        .enumerate()
    {
        assert_eq!(r, Ok(()), "import {i}");
    }
}

#[test]
fn parallel_imports_of_distinct_names_all_land_and_show_on_both_mounts() {
    let Some(site) = two_hosts() else { return };
    let sources = racer_sources(&site);
    // Both mounts have listed the repository before, so their caches must expire.
    for m in 0..2 {
        assert_eq!(fs::read_dir(site.at(m, "user")).unwrap().count(), 0);
    }
    race_distinct(&site, &sources);
    let expected: Vec<String> = (0..RACERS).map(|i| format!("img{i}@0")).collect();
    assert_eq!(site.meta_names("user"), expected);
    let limit = Duration::from_millis(REFRESH_SECS * 1000 + 500);
    for m in 0..2 {
        assert!(
            common::eventually(limit, || fs::read_dir(site.at(m, "user"))
                .map(|d| d.count() == RACERS)
                .unwrap_or(false)),
            "mount {m} does not list every image within the refresh time"
        );
        for (i, src) in sources.iter().enumerate() {
            let disk = site.at(m, &format!("user/img{i}/@0/disk.raw"));
            assert_eq!(sha256_file(&disk), sha256_file(src), "{}", disk.display());
        }
    }
    assert_eq!(site.assert_every_revision_sound("user"), RACERS);
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
}

#[test]
fn parallel_imports_of_one_name_give_one_image_and_clear_errors() {
    let Some(site) = two_hosts() else { return };
    let sources = racer_sources(&site);
    let results = race(&site, &sources, |_| "same".to_string());
    let winners: Vec<usize> = (0..RACERS).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one import wins: {results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            e.contains("File exists") || e.contains("already exists"),
            "a losing import says why: {e}"
        );
    }
    assert_eq!(site.meta_names("user"), ["same@0"]);
    let winner = &sources[winners[0]];
    assert_eq!(
        sha256_file(&site.at(0, "user/same/@0/disk.raw")),
        sha256_file(winner)
    );
    assert_eq!(site.assert_every_revision_sound("user"), 1);
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
}

#[test]
fn a_revision_deleted_on_one_host_keeps_reading_on_the_other_until_closed() {
    let Some(site) = two_hosts() else { return };
    let src = site.source_raw("src.raw", "16M", 3);
    ok("cp", &[s(&src), s(&site.at(0, "user/victim.raw"))]);
    let mut reader = fs::File::open(site.at(1, "user/victim/@0/disk.raw")).unwrap();
    let mut first = vec![0u8; 2 << 20];
    reader.read_exact(&mut first).unwrap();
    ok("rm", &["-r", s(&site.at(0, "user/victim"))]);
    assert!(site.meta_names("user").is_empty());
    // The layer stays until gc; even gc now does not disturb the open reader.
    site.pcocc_ok(&["image", "repo", "gc", "--grace", "0", "user"]);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    assert_eq!(hex(&first), sha256_file(&src));
    drop(reader);
    let gone = common::eventually(Duration::from_secs(REFRESH_SECS + 2), || {
        !site.at(1, "user/victim").exists()
    });
    assert!(
        gone,
        "the deleted image must disappear from the other mount"
    );
}

#[test]
fn gc_running_during_imports_never_removes_a_layer_in_use() {
    let Some(site) = two_hosts() else { return };
    let sources = racer_sources(&site);
    // One layer shared by a revision being deleted and an import of the same content,
    // the case where "layer just added (already there)" meets "meta not yet written".
    ok("cp", &[s(&sources[0]), s(&site.at(0, "user/old.raw"))]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let gc = sc.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                site.pcocc_ok(&["image", "repo", "gc", "--grace", "5", "user"]);
                runs += 1;
            }
            runs
        });
        let deleter = sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            ok("rm", &["-r", s(&site.at(1, "user/old"))]);
        });
        race_distinct(&site, &sources);
        deleter.join().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(gc.join().unwrap() > 0);
    });
    assert_eq!(site.assert_every_revision_sound("user"), RACERS);
    for (i, src) in sources.iter().enumerate() {
        let disk = site.at(0, &format!("user/img{i}/@0/disk.raw"));
        assert_eq!(sha256_file(&disk), sha256_file(src));
    }
    // Past the grace period, gc takes only what nothing uses.
    site.pcocc_ok(&["image", "repo", "gc", "--grace", "0", "user"]);
    assert_eq!(site.assert_every_revision_sound("user"), RACERS);
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------
// 4. Other users
// ---------------------------------------------------------------------------------------

#[track_caller]
fn assert_denied(out: &Output, what: &str) {
    assert!(!out.status.success(), "{what} must be refused");
    assert!(
        stderr(out).contains("Permission denied"),
        "{what} must fail with EACCES: {}",
        stderr(out)
    );
}

#[test]
fn a_user_without_write_access_cannot_change_a_repository() {
    let Some(site) = Site::start() else { return };
    let src = site.source_raw("src.raw", "8M", 1);
    ok("cp", &[s(&src), s(&site.at(0, "user/base.raw"))]);
    let before = site.meta_names("user");
    let at = |rel: &str| site.at(0, rel);
    assert_denied(
        &as_nobody(&[], &["cp", s(&src), s(&at("user/mine.raw"))]),
        "cp in",
    );
    assert_denied(
        &as_nobody(&[], &["rm", "-rf", s(&at("user/base"))]),
        "rm -r",
    );
    assert_denied(
        &as_nobody(&[], &["mv", s(&at("user/base")), s(&at("user/moved"))]),
        "mv",
    );
    assert_denied(
        &as_nobody(
            &[],
            &["ln", s(&at("user/base/@0/disk.qcow2")), s(&at("user/hard"))],
        ),
        "ln",
    );
    assert_denied(&as_nobody(&[], &["mkdir", s(&at("user/dir"))]), "mkdir");
    assert_eq!(site.meta_names("user"), before);
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
    // Still readable by them.
    let out = as_nobody(&[], &["sha256sum", s(&at("user/base/@0/disk.raw"))]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256_file(&src)));
}

#[test]
fn a_group_member_imports_into_a_group_repository_and_owns_what_they_import() {
    let Some(site) = Site::start() else { return };
    let src = site.source_raw("src.raw", "8M", 2);
    // The repository of a team: group-writable and set-group-ID, as an admin makes it.
    let repo = site.repo("global");
    ok("chgrp", &["-R", &TEAM_GID.to_string(), s(&repo)]);
    ok("chmod", &["-R", "g+rwXs", s(&repo)]);
    let out = as_nobody(
        &[TEAM_GID],
        &["cp", s(&src), s(&site.at(0, "global/teamimg.raw"))],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let meta_file = repo.join("meta/teamimg@0");
    let meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&meta_file).unwrap()).unwrap();
    assert_eq!(meta["owner"], "nobody");
    let top = meta["data_blobs"][0].as_str().unwrap().to_string();
    let layer = repo.join("data").join(&top[..2]).join(&top);
    for f in [&meta_file, &layer] {
        let m = fs::metadata(f).unwrap();
        assert_eq!((m.uid(), m.gid()), (NOBODY, TEAM_GID), "{}", f.display());
    }
    assert_eq!(fs::metadata(&layer).unwrap().mode() & 0o777, 0o444);
    assert_eq!(site.assert_every_revision_sound("global"), 1);
    // Without the group, the same user is refused.
    let out = as_nobody(&[], &["cp", s(&src), s(&site.at(0, "global/other.raw"))]);
    assert_denied(&out, "cp in without the group");
}

#[test]
fn a_repository_a_user_cannot_read_is_not_listable_by_them() {
    let Some(site) = Site::start() else { return };
    let src = site.source_raw("src.raw", "8M", 4);
    ok("cp", &[s(&src), s(&site.at(0, "user/private.raw"))]);
    fs::set_permissions(site.repo("user"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_denied(&as_nobody(&[], &["ls", s(&site.at(0, "user"))]), "ls");
    assert_denied(
        &as_nobody(&[], &["cat", s(&site.at(0, "user/private/@0/disk.raw"))]),
        "reading an image",
    );
    // Root still sees it.
    assert_eq!(ok("ls", &[s(&site.at(0, "user"))]), "private\n");
}

#[test]
fn symlinks_in_a_repository_never_lead_the_daemon_outside_it() {
    let Some(site) = Site::start() else { return };
    // A secret only root may read, as a qcow2 image and as valid-looking metadata.
    let secret_raw = site.source_raw("secret.raw", "8M", 9);
    let secret = site.work().join("secret.qcow2");
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
    let secret_hash = sha256_file(&secret);
    let secret_meta = site.work().join("secret-meta");
    fs::write(
        &secret_meta,
        format!(
            "{{\"name\": \"sneaky\", \"revision\": 0, \"kind\": \"vm\", \"owner\": \"root\", \"timestamp\": 1.0, \"data_blobs\": [\"{secret_hash}\"], \"custom_meta\": {{}}}}"
        ),
    )
    .unwrap();
    for f in [&secret_raw, &secret, &secret_meta] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o600)).unwrap();
    }
    // In a repository everyone may write: symlinks as layer and as metadata.
    let repo = site.repo("global");
    ok("chmod", &["-R", "a+rwX", s(&repo)]);
    let data_dir = repo.join("data").join(&secret_hash[..2]);
    fs::create_dir_all(&data_dir).unwrap();
    std::os::unix::fs::symlink(&secret, data_dir.join(&secret_hash)).unwrap();
    std::os::unix::fs::symlink(&secret_meta, repo.join("meta/sneaky@0")).unwrap();
    // A data/XX directory that is a symlink to outside, holding the "layer".
    let outside = site.work().join("outside");
    fs::create_dir(&outside).unwrap();
    let other_hash = format!("ff{}", &secret_hash[2..]);
    fs::copy(&secret, outside.join(&other_hash)).unwrap();
    std::os::unix::fs::symlink(&outside, repo.join("data/ff")).unwrap();
    fs::write(
        repo.join("meta/viadir@0"),
        format!(
            "{{\"name\": \"viadir\", \"revision\": 0, \"kind\": \"vm\", \"owner\": \"root\", \"timestamp\": 1.0, \"data_blobs\": [\"{secret_hash}\"], \"custom_meta\": {{}}}}"
        ),
    )
    .unwrap();
    fs::write(
        repo.join("meta/viasub@0"),
        format!(
            "{{\"name\": \"viasub\", \"revision\": 0, \"kind\": \"vm\", \"owner\": \"root\", \"timestamp\": 1.0, \"data_blobs\": [\"{other_hash}\"], \"custom_meta\": {{}}}}"
        ),
    )
    .unwrap();
    let secret_sum = sha256_file(&secret_raw);
    for name in ["sneaky", "viadir", "viasub"] {
        for view in ["disk.raw", "disk.qcow2"] {
            let p = site.at(0, &format!("global/{name}/@0/{view}"));
            for who in ["nobody", "root"] {
                let out = if who == "root" {
                    run("sha256sum", &[s(&p)])
                } else {
                    as_nobody(&[], &["sha256sum", s(&p)])
                };
                let leaked = String::from_utf8_lossy(&out.stdout).starts_with(&secret_sum)
                    || String::from_utf8_lossy(&out.stdout).starts_with(&secret_hash);
                assert!(!leaked, "{who} read the secret through {}", p.display());
            }
        }
    }
    // The daemon keeps serving the rest of the repository.
    let src = site.source_raw("src.raw", "8M", 5);
    ok("cp", &[s(&src), s(&site.at(0, "global/fine.raw"))]);
    assert_eq!(
        sha256_file(&site.at(0, "global/fine/@0/disk.raw")),
        sha256_file(&src)
    );
}

/// What a writer does with its file after writing all of it in order and before closing
/// it, in [`an_image_converted_as_it_arrives_imports_whatever_its_writer_does_before_closing`].
const AFTER_WRITING: &str = r#"
import os, sys, time
src, dst, then, done, go = sys.argv[1:6]
data = open(src, "rb").read()
fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for at in range(0, len(data), 1 << 20):
    os.pwrite(fd, data[at:at + (1 << 20)], at)
open(done, "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
at = (len(data) // 4) & ~4095
if then == "rewrite":
    os.pwrite(fd, b"\x77" * (1 << 20), at)
elif then == "readback":
    rd = os.open(dst, os.O_RDONLY)
    if os.pread(rd, 1 << 20, at) != data[at:at + (1 << 20)]:
        sys.exit("read back other bytes than were written")
    os.close(rd)
os.close(fd)
"#;

/// A VDI, a dynamic VHD and a sparse VMDK written in order are converted as they
/// arrive, and what the conversion has read of the copy received is dropped instead of
/// being written to the disk (the copy in the repository's `.tmp/` holds a fraction of
/// the file once all of it is written). A writer that then writes over those bytes, or
/// reads them back, before its close still gets the image of exactly what it wrote.
#[test]
fn an_image_converted_as_it_arrives_imports_whatever_its_writer_does_before_closing() {
    let Some(site) = Site::start() else {
        return;
    };
    ok("chmod", &["-R", "a+rwX", s(&site.repo("user"))]);
    let raw = site.work().join("full.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "160M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 160M",
            "-c",
            "write -P 0x3c 77M 3M",
            s(&raw),
        ],
    );
    let script = site.work().join("after.py");
    fs::write(&script, AFTER_WRITING).unwrap();
    for fmt in ["vdi", "vpc", "vmdk"] {
        let src = site.work().join(format!("src.{fmt}"));
        ok(
            "qemu-img",
            &["convert", "-q", "-f", "raw", "-O", fmt, s(&raw), s(&src)],
        );
        fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
        let len = fs::metadata(&src).unwrap().len();
        for then in ["close", "rewrite", "readback"] {
            let name = format!("{fmt}-{then}");
            let (done, go) = (site.work().join("done"), site.work().join("go"));
            let _ = fs::remove_file(&done);
            let _ = fs::remove_file(&go);
            let dst = site.at(0, &format!("user/{name}"));
            let args = [s(&script), s(&src), s(&dst), then, s(&done), s(&go)];
            let writer = std::thread::scope(|scope| {
                let writer = scope.spawn(|| {
                    let mut full = vec!["/usr/bin/python3"];
                    full.extend_from_slice(&args);
                    as_nobody(&[], &full)
                });
                // All written: the copy received shrinks as the conversion reads it.
                let started = std::time::Instant::now();
                while !done.exists() && !writer.is_finished() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let copy_held = || -> Option<u64> {
                    site.tmp_entries("user")
                        .iter()
                        .filter_map(|p| fs::metadata(p).ok())
                        .find(|m| m.len() == len)
                        .map(|m| m.blocks() * 512)
                };
                let mut held = copy_held();
                while held.is_none_or(|h| h > len / 2)
                    && started.elapsed() < Duration::from_secs(60)
                {
                    std::thread::sleep(Duration::from_millis(20));
                    held = copy_held();
                }
                fs::write(&go, b"").unwrap();
                let out = writer.join().unwrap();
                (out, held)
            });
            let (out, held) = writer;
            assert!(
                out.status.success(),
                "{name}: the writer failed: {}",
                stderr(&out)
            );
            let held = held.unwrap_or_else(|| panic!("{name}: no copy of {len} bytes in .tmp/"));
            assert!(
                held <= len / 2,
                "{name}: the copy received still holds {held} of its {len} bytes once converted"
            );
            // What the writer left: the source, with its change if it made one.
            let expect = site.work().join(format!("expect.{fmt}"));
            fs::copy(&src, &expect).unwrap();
            if then == "rewrite" {
                let f = fs::OpenOptions::new().write(true).open(&expect).unwrap();
                let at = (len / 4) & !4095;
                std::os::unix::fs::FileExt::write_all_at(&f, &[0x77; 1 << 20], at).unwrap();
            }
            let view = site.at(0, &format!("user/{name}/@0/disk.raw"));
            common::assert_same_disk(&view, "raw", &expect, fmt);
        }
    }
    assert_eq!(site.assert_every_revision_sound("user"), 9);
}

/// Only the death of its writer cancels an import: readers of the file killed while it
/// is written (`cat FILE | head -c 4`, which dies of SIGPIPE, and a shell holding
/// `exec 5<FILE` killed with SIGKILL) leave the writer's close to publish it, complete.
/// Both failed the import: the writer's close returned EIO.
#[test]
fn readers_killed_while_a_file_is_written_leave_its_import_alone() {
    let Some(site) = Site::start() else { return };
    let dest = site.at(0, "user/peeked.raw");
    let mut f = fs::File::create(&dest).unwrap();
    f.write_all(&[0x42; 1 << 20]).unwrap();
    let out = Command::new("sh")
        .args(["-c", &format!("cat '{}' | head -c 4 >/dev/null", s(&dest))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut holder = KillOnDrop(
        Command::new("sh")
            .args(["-c", &format!("exec 5<'{}'; sleep 60", s(&dest))])
            .spawn()
            .expect("spawn sh"),
    );
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) of the shell this test started.
    assert_eq!(
        unsafe { libc::kill(holder.0.id() as i32, libc::SIGKILL) },
        0
    );
    holder.0.wait().unwrap();
    f.write_all(&[0x43; 1 << 20]).unwrap();
    // close(2) of the writer's descriptor: its error, if any, is the import's.
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: closing the descriptor this test owns, once.
    assert_eq!(
        unsafe { libc::close(fd) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    assert_eq!(site.meta_names("user"), ["peeked@0"]);
    let mut expected = vec![0x42; 1 << 20];
    expected.extend_from_slice(&[0x43; 1 << 20]);
    assert_eq!(
        sha256_file(&site.at(0, "user/peeked/@0/disk.raw")),
        hex(&expected)
    );
}

/// A qcow2 source of 8 MiB holding `pattern` throughout, in the work directory.
fn filled_qcow2(site: &Site, name: &str, pattern: u8) -> PathBuf {
    let p = site.work().join(name);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    let w = format!("write -P {pattern:#x} 0 8M");
    ok("qemu-io", &["-f", "qcow2", "-c", &w, s(&p)]);
    p
}

/// A revision deleted and made again under the same number outside the mount (`pcocc
/// image delete`, then `import` of other bytes: this host's CLI, or another host) is
/// read afresh once the refresh time has passed, on a mount that read it and on one
/// that only `stat`ed it: `disk.raw`, whose pages the kernel keeps, and every view give
/// the new bytes and size, never a mix; a descriptor held on the revision directory
/// keeps working. They gave the old disk for seconds, then old pages mixed with new
/// ones, and the old size for as long as the kernel kept it (an hour).
#[test]
fn a_revision_made_again_outside_the_mount_is_read_afresh() {
    let Some(mut site) = Site::start() else {
        return;
    };
    let other = site.add_mount(&[]);
    let a = filled_qcow2(&site, "a.qcow2", 0xa1);
    site.pcocc_ok(&["image", "import", s(&a), "user:st"]);
    let raw = site.at(0, "user/st/@0/disk.raw");
    assert_eq!(fs::read(&raw).unwrap(), vec![0xa1; 8 << 20]);
    for view in ["disk.vmdk", "disk.vdi", "disk.qcow2"] {
        fs::read(site.at(0, &format!("user/st/@0/{view}"))).unwrap();
    }
    let stated = site.at(other, "user/st/@0/disk.raw");
    assert_eq!(fs::metadata(&stated).unwrap().len(), 8 << 20);
    let held = fs::File::open(site.at(0, "user/st/@0")).unwrap();
    site.pcocc_ok(&["image", "delete", "user:st"]);
    let c = filled_qcow2(&site, "c.qcow2", 0xb2);
    ok("qemu-img", &["resize", "-q", s(&c), "9M"]);
    site.pcocc_ok(&["image", "import", s(&c), "user:st"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        fs::metadata(&stated).unwrap().len(),
        9 << 20,
        "stat: the new size"
    );
    let mut expected = vec![0xb2; 8 << 20];
    expected.resize(9 << 20, 0);
    assert_eq!(fs::metadata(&raw).unwrap().len(), 9 << 20, "the new size");
    assert!(
        fs::read(&raw).unwrap() == expected,
        "disk.raw holds the new disk"
    );
    for (view, fmt) in [
        ("disk.vmdk", "vmdk"),
        ("disk.vdi", "vdi"),
        ("disk.qcow2", "qcow2"),
    ] {
        let out = site.work().join(format!("out.{fmt}"));
        ok(
            "cp",
            &[s(&site.at(0, &format!("user/st/@0/{view}"))), s(&out)],
        );
        ok(
            "qemu-img",
            &["compare", "-q", "-f", fmt, "-F", "qcow2", s(&out), s(&c)],
        );
    }
    held.metadata()
        .expect("fstat of the revision directory held open");
}

/// A file left blank by its writer (`truncate -s`, `cp` of a disk of zeroes) is
/// published when the daemon exits within its 10 s grace: nobody can open it again
/// after. It was lost with the daemon.
#[test]
fn blank_files_are_published_when_the_daemon_exits() {
    let Some(site) = Site::start() else { return };
    let zero = site.work().join("zero.raw");
    fs::File::create(&zero).unwrap().set_len(4 << 20).unwrap();
    ok("truncate", &["-s", "16M", s(&site.at(0, "user/sized"))]);
    ok("cp", &[s(&zero), s(&site.at(0, "user/zeroes"))]);
    unmount(&site.mounts[0]);
    assert!(
        common::eventually(Duration::from_secs(10), || {
            site.meta_names("user") == ["sized@0", "zeroes@0"]
        }),
        "{:?}",
        site.meta_names("user")
    );
    assert_eq!(site.tmp_entries("user"), Vec::<PathBuf>::new());
}
