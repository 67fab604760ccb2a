//! The filesystem mounted for real and used with ordinary tools: `ls`, `cp`, `ln`, `mv`,
//! `rm`, `qemu-img` and `qemu-io` on the mount, judged by qemu-img and by the repository
//! left on disk. Needs root, `/dev/fuse` and qemu-img (CI has all three); without them each
//! test prints why and returns.

mod common;
use common::{daemon_pid, ok, run, s};
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "mount/qemu.rs"]
mod qemu;

const DAEMON: &str = env!("CARGO_BIN_EXE_pcocc-imagefs");

fn sha256_file(p: &Path) -> String {
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The daemon's default refresh time: how long the kernel may keep an entry of a
/// repository or image directory that another host changes.
const DEFAULT_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// A mounted daemon over two repositories `user` (the default) and `global`, in a
/// temporary directory ([`common::MountedRepos`]), and this suite's helpers.
struct Mounted(common::MountedRepos);

impl std::ops::Deref for Mounted {
    type Target = common::MountedRepos;
    fn deref(&self) -> &common::MountedRepos {
        &self.0
    }
}

impl Mounted {
    fn start() -> Option<Mounted> {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Option<Mounted> {
        common::MountedRepos::start("mount", &["qemu-img"], &["user", "global"], extra).map(Mounted)
    }

    fn work(&self) -> PathBuf {
        self.work_dir()
    }

    fn meta_names(&self, repo: &str) -> Vec<String> {
        common::sorted_names(&self.repo(repo).join("meta"))
    }

    fn layer_files(&self, repo: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(d) = fs::read_dir(self.repo(repo).join("data")) {
            for sub in d.filter_map(|e| e.ok()) {
                if let Ok(d2) = fs::read_dir(sub.path()) {
                    out.extend(d2.filter_map(|e| e.ok()).map(|e| e.path()));
                }
            }
        }
        out.sort();
        out
    }

    fn tmp_entries(&self, repo: &str) -> usize {
        fs::read_dir(self.repo(repo).join(".tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A raw disk of `size` with a few recognisable extents (and holes), written by qemu-io.
    fn source_raw(&self, name: &str, size: &str) -> PathBuf {
        let p = self.work().join(name);
        ok("qemu-img", &["create", "-q", "-f", "raw", s(&p), size]);
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
                s(&p),
            ],
        );
        p
    }

    /// `source` converted to `fmt` in the work directory as `name`.
    fn source_as(&self, source: &Path, fmt: &str, name: &str) -> PathBuf {
        let p = self.work().join(name);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if fmt == "vpc" {
            args.extend(["-o", "force_size=on"]);
        }
        args.extend([s(source), s(&p)]);
        ok("qemu-img", &args);
        p
    }

    /// Stores a 3-layer revision `name@0` in `repo` the way pcocc's resize makes one: a
    /// base with data, then two overlays (relative backing names) that each write.
    fn layered_image(&self, repo: &str, name: &str) {
        let data = self.repo(repo).join("data");
        let mut hashes: Vec<String> = Vec::new();
        for (i, (size, cmd)) in [
            ("16M", "write -P 0x41 0 2M"),
            ("16M", "write -P 0x42 1M 1M"),
            ("24M", "write -z 0 64k"),
        ]
        .iter()
        .enumerate()
        {
            let f = self.work().join(format!("{name}-layer{i}"));
            // Written with the absolute backing name, then rebased (unsafely: same
            // content) to the relative name pcocc stores.
            let below = hashes.last().map(|b| {
                (
                    data.join(&b[..2]).join(b),
                    format!("../../data/{}/{b}", &b[..2]),
                )
            });
            match &below {
                None => ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&f), size]),
                Some((abs, _)) => ok(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        "qcow2",
                        "-b",
                        s(abs),
                        s(&f),
                        size,
                    ],
                ),
            };
            ok("qemu-io", &["-f", "qcow2", "-c", cmd, s(&f)]);
            if let Some((_, rel)) = &below {
                ok(
                    "qemu-img",
                    &[
                        "rebase",
                        "-u",
                        "-F",
                        "qcow2",
                        "-b",
                        rel,
                        "-f",
                        "qcow2",
                        s(&f),
                    ],
                );
            }
            let h = sha256_file(&f);
            let dst = data.join(&h[..2]).join(&h);
            fs::create_dir_all(dst.parent().unwrap()).unwrap();
            fs::copy(&f, &dst).unwrap();
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o444)).unwrap();
            hashes.push(h);
        }
        let blobs: Vec<String> = hashes.iter().map(|h| format!("\"{h}\"")).collect();
        fs::write(
            self.repo(repo).join("meta").join(format!("{name}@0")),
            format!(
                "{{\"name\": \"{name}\", \"revision\": 0, \"kind\": \"vm\", \"owner\": \"root\", \"timestamp\": 1795749382.4048052, \"data_blobs\": [{}], \"custom_meta\": {{}}}}",
                blobs.join(", ")
            ),
        )
        .unwrap();
    }

    /// The top layer of `name@0` in `repo`, flattened to raw by qemu-img (the reference
    /// content of a layered revision).
    fn reference_raw(&self, repo: &str, name: &str) -> PathBuf {
        let meta =
            fs::read_to_string(self.repo(repo).join("meta").join(format!("{name}@0"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let top = v["data_blobs"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        let layer = self.repo(repo).join("data").join(&top[..2]).join(&top);
        let out = self.work().join(format!("{name}-ref.raw"));
        ok(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", s(&layer), s(&out)],
        );
        out
    }
}

/// qemu-img's verdict on a view: detected without `-f` as `fmt`, the exact virtual size,
/// `check` clean where the format supports it, and identical to `reference` (raw).
#[track_caller]
fn assert_view_is(view: &Path, fmt: &str, reference: &Path) {
    let info = ok("qemu-img", &["info", "--output=json", s(view)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["format"].as_str(),
        Some(fmt),
        "{}: {info}",
        view.display()
    );
    let size = fs::metadata(reference).unwrap().len();
    assert_eq!(
        v["virtual-size"].as_u64(),
        Some(size.div_ceil(512) * 512),
        "{}",
        view.display()
    );
    if fmt != "raw" {
        let out = run("qemu-img", &["check", "-f", fmt, s(view)]);
        assert!(
            out.status.success() || out.status.code() == Some(63),
            "qemu-img check {}: {}{}",
            view.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    common::assert_same_disk(view, fmt, reference, "raw");
}

const VIEWS: [(&str, &str); 6] = [
    ("disk.raw", "raw"),
    ("disk.qcow2", "qcow2"),
    ("disk.qed", "qed"),
    ("disk.vdi", "vdi"),
    ("disk.vpc", "vpc"),
    ("disk.vmdk", "vmdk"),
];

#[test]
fn every_view_of_a_single_layer_and_a_layered_revision_is_what_qemu_expects() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "12M");
    let qcow = m.source_as(&src, "qcow2", "single.qcow2");
    ok("cp", &[s(&qcow), s(&m.at("user/"))]);
    m.layered_image("user", "chain");
    let chain_ref = m.reference_raw("user", "chain");
    for (image, reference) in [("single", &src), ("chain", &chain_ref)] {
        for (file, fmt) in VIEWS {
            let view = m.at(&format!("user/{image}/@0/{file}"));
            assert_view_is(&view, fmt, reference);
            // st_size is the exact length read.
            let len = fs::metadata(&view).unwrap().len();
            assert_eq!(
                fs::read(&view).unwrap().len() as u64,
                len,
                "{}",
                view.display()
            );
        }
    }
    let raw = m.at("user/single/@0/disk.raw");
    ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 0 1M", s(&raw)],
    );
    ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x22 3M 64k",
            s(&m.at("user/single/@0/disk.qcow2")),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "vmdk",
            "-c",
            "read -P 0x42 1M 1M",
            s(&m.at("user/chain/@0/disk.vmdk")),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "vdi",
            "-c",
            "read -P 0 0 64k",
            s(&m.at("user/chain/@0/disk.vdi")),
        ],
    );
}

#[test]
fn listing_every_level_shows_repositories_images_revisions_and_views() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("global/"))]);
    let root = ok("ls", &["-l", s(&m.mnt)]);
    assert!(
        root.contains(" user\n") && root.contains(" global\n"),
        "{root}"
    );
    let repo = ok("ls", &["-l", s(&m.at("global"))]);
    assert!(repo.contains(" src\n"), "{repo}");
    let image = ok("ls", &["-l", s(&m.at("global/src"))]);
    assert!(
        image.contains(" @0\n") && image.contains("latest -> @0"),
        "{image}"
    );
    let rev = ok("ls", &["-1", s(&m.at("global/src/@0"))]);
    let names: Vec<&str> = rev.lines().collect();
    assert_eq!(
        names,
        [
            "disk.qcow2",
            "disk.qed",
            "disk.raw",
            "disk.vdi",
            "disk.vmdk",
            "disk.vpc",
            "meta.json"
        ]
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(m.at("global/src/@0/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["name"], "src");
    assert_eq!(meta["virtual_size"], 8 << 20);
    // The raw view is sparse: it holds about the 1.6 MiB written, not 8 MiB.
    let st = fs::metadata(m.at("global/src/@0/disk.raw")).unwrap();
    assert_eq!(st.len(), 8 << 20);
    assert!(
        st.blocks() * 512 < 4 << 20,
        "st_blocks {} too large",
        st.blocks()
    );
}

#[test]
fn every_accepted_format_imports_as_a_new_image_and_as_a_next_revision() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("base.raw", "10M");
    for fmt in ["qcow2", "vmdk", "vdi", "vpc", "qed"] {
        let f = m.source_as(&src, fmt, &format!("img-{fmt}.{fmt}"));
        ok("cp", &[s(&f), s(&m.at("user/"))]);
        let name = format!("img-{fmt}");
        assert_view_is(&m.at(&format!("user/{name}/@0/disk.raw")), "raw", &src);
        // The same file copied into the image directory becomes revision 1.
        ok("cp", &[s(&f), s(&m.at(&format!("user/{name}/")))]);
        assert_view_is(&m.at(&format!("user/{name}/@1/disk.qcow2")), "qcow2", &src);
    }
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    assert_view_is(&m.at("user/base/@0/disk.vdi"), "vdi", &src);
    ok("cp", &[s(&src), s(&m.at("user/base/"))]);
    assert_view_is(&m.at("user/base/@1/disk.vmdk"), "vmdk", &src);
    // Every stored layer is a standalone qcow2 that qemu-img finds clean.
    for layer in m.layer_files("user") {
        ok("qemu-img", &["check", "-f", "qcow2", s(&layer)]);
        assert_eq!(
            fs::metadata(&layer).unwrap().permissions().mode() & 0o777,
            0o444
        );
    }
    assert_eq!(m.tmp_entries("user"), 0, ".tmp must be empty after imports");
    // Metadata exactly as pcocc writes it.
    let meta = fs::read_to_string(m.repo("user").join("meta/img-qcow2@1")).unwrap();
    assert!(meta.starts_with("{\"name\": \"img-qcow2\", \"revision\": 1, \"kind\": \"vm\", \"owner\": \"root\", \"timestamp\": "), "{meta}");
    assert!(meta.ends_with(", \"custom_meta\": {}}"), "{meta}");
}

#[test]
fn a_failed_import_fails_cp_and_leaves_nothing() {
    let Some(m) = Mounted::start() else { return };
    let text = m.work().join("notes.qcow2");
    fs::write(&text, "this is not a disk image\n").unwrap();
    let out = run("cp", &[s(&text), s(&m.at("user/"))]);
    assert!(
        !out.status.success(),
        "cp of a text file named .qcow2 must fail"
    );
    let src = m.source_raw("src.raw", "8M");
    let vmdk = m.source_as(&src, "vmdk", "cut.vmdk");
    let bytes = fs::read(&vmdk).unwrap();
    fs::write(&vmdk, &bytes[..bytes.len() / 3]).unwrap();
    let out = run("cp", &[s(&vmdk), s(&m.at("user/"))]);
    assert!(!out.status.success(), "cp of a truncated vmdk must fail");
    assert!(
        m.meta_names("user").is_empty(),
        "{:?}",
        m.meta_names("user")
    );
    assert_eq!(m.tmp_entries("user"), 0);
    assert!(!m.at("user/notes").exists() && !m.at("user/cut").exists());
    assert_eq!(ok("ls", &[s(&m.at("user"))]), "");
}

#[test]
fn sparse_export_with_cp_gives_the_source_back() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "64M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let out = m.work().join("out.raw");
    ok(
        "cp",
        &["--sparse=always", s(&m.at("user/src/@0/disk.raw")), s(&out)],
    );
    assert_eq!(sha256_file(&out), sha256_file(&src));
    let blocks = fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        blocks < 8 << 20,
        "exported file holds {blocks} bytes: not sparse"
    );
    let holes = ok(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "raw",
            s(&m.at("user/src/@0/disk.raw")),
        ],
    );
    assert!(
        holes.contains("\"data\": false"),
        "SEEK_HOLE must report holes: {holes}"
    );
}

#[test]
fn ln_copies_share_layers_and_mv_and_rm_work_like_pcocc() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let layers = m.layer_files("user");
    assert_eq!(layers.len(), 1);
    // Within one repository: metadata only.
    ok(
        "ln",
        &[s(&m.at("user/src/@0/disk.qcow2")), s(&m.at("user/copy"))],
    );
    assert_eq!(m.layer_files("user"), layers);
    assert!(m.at("user/copy/@0").is_dir());
    assert_view_is(&m.at("user/copy/@0/disk.raw"), "raw", &src);
    // Across repositories: the layer is hard-linked (same filesystem).
    ok(
        "ln",
        &[s(&m.at("user/src/@0/disk.qcow2")), s(&m.at("global/other"))],
    );
    let global = m.layer_files("global");
    assert_eq!(global.len(), 1);
    assert_eq!(
        fs::metadata(&global[0]).unwrap().ino(),
        fs::metadata(&layers[0]).unwrap().ino()
    );
    // cp between repositories shares layers too (no conversion, no new data).
    ok(
        "cp",
        &[
            s(&m.at("user/src/@0/disk.qcow2")),
            s(&m.at("global/third.qcow2")),
        ],
    );
    assert_eq!(m.layer_files("global").len(), 1);
    // cp within one repository: the same content is the same layer, nothing new stored.
    ok(
        "cp",
        &[
            s(&m.at("user/src/@0/disk.vmdk")),
            s(&m.at("user/fourth.vmdk")),
        ],
    );
    assert_eq!(m.layer_files("user"), layers);
    // mv renames within a repository.
    ok("mv", &[s(&m.at("user/copy")), s(&m.at("user/renamed"))]);
    assert!(m.at("user/renamed/@0/disk.raw").exists() && !m.at("user/copy").exists());
    assert_eq!(m.meta_names("user"), ["fourth@0", "renamed@0", "src@0"]);
    // rm -r of a revision, then of an image: quiet, exit 0, metadata gone, layers kept.
    ok("cp", &[s(&src), s(&m.at("user/src/"))]);
    let out = run("rm", &["-r", s(&m.at("user/src/@1"))]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    assert_eq!(m.meta_names("user"), ["fourth@0", "renamed@0", "src@0"]);
    let out = run("rm", &["-r", s(&m.at("user/src"))]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    assert_eq!(m.meta_names("user"), ["fourth@0", "renamed@0"]);
    assert_eq!(m.layer_files("user"), layers);
}

#[test]
fn cp_of_a_view_into_another_repository_shares_the_layer() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    ok(
        "cp",
        &[
            s(&m.at("user/src/@0/disk.vdi")),
            s(&m.at("global/copied.vdi")),
        ],
    );
    let (user, global) = (m.layer_files("user"), m.layer_files("global"));
    assert_eq!((user.len(), global.len()), (1, 1));
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&global[0]),
        ino(&user[0]),
        "the layer must be shared, not copied"
    );
    assert_view_is(&m.at("global/copied/@0/disk.raw"), "raw", &src);
    assert_eq!(m.tmp_entries("global"), 0);
}

#[test]
fn revisions_cannot_be_changed() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let view = m.at("user/src/@0/disk.raw");
    let err = fs::OpenOptions::new().write(true).open(&view).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "{err}"
    );
    let err = fs::write(m.at("user/src/@0/new"), b"x").unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "{err}"
    );
    let err = fs::set_permissions(&view, fs::Permissions::from_mode(0o666)).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "{err}"
    );
    let err = fs::create_dir(m.at("user/src/@7")).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM)),
        "{err}"
    );
    assert_eq!(sha256_file(&view), sha256_file(&src));
}

#[test]
fn concurrent_readers_of_one_view_get_the_same_bytes() {
    let Some(m) = Mounted::start() else { return };
    m.layered_image("user", "chain");
    let view = m.at("user/chain/@0/disk.vmdk");
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let v = view.clone();
            std::thread::spawn(move || sha256_file(&v))
        })
        .collect();
    let sums: Vec<String> = readers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
}

#[test]
fn another_user_reads_what_they_may_and_cannot_import_where_they_may_not() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("global/"))]);
    fs::set_permissions(m.work(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut full = vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
        full.extend_from_slice(args);
        run("setpriv", &full)
    };
    let out = as_nobody(&["sha256sum", s(&m.at("global/src/@0/disk.raw"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&sha256_file(&src)));
    let out = as_nobody(&["cp", s(&src), s(&m.at("user/"))]);
    assert!(
        !out.status.success(),
        "nobody must not import into root's repository"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(m.meta_names("user").is_empty());
    // Where nobody may write, nobody imports, and what they import is theirs.
    ok("chmod", &["-R", "a+rwX", s(&m.repo("global"))]);
    let out = as_nobody(&["cp", s(&src), s(&m.at("global/mine.raw"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta_file = m.repo("global").join("meta/mine@0");
    let meta = fs::read_to_string(&meta_file).unwrap();
    assert!(meta.contains("\"owner\": \"nobody\""), "{meta}");
    assert_eq!(fs::metadata(&meta_file).unwrap().uid(), 65534);
    let listed = ok("ls", &["-ln", s(&m.at("global/mine/@0/disk.raw"))]);
    assert!(listed.contains(" 65534 "), "{listed}");
}

#[test]
fn sigterm_during_a_read_unmounts_cleanly_and_a_stale_mount_is_cleared() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "64M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    let reader = {
        let v = m.at("user/src/@0/disk.vmdk");
        std::thread::spawn(move || fs::read(v).map(|b| b.len()))
    };
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = reader.join();
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.is_mounted() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!m.is_mounted(), "SIGTERM must unmount");
    // A daemon killed outright leaves a dead mount; a new daemon clears it and serves.
    m.mount(&[]);
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    m.mount(&[]);
    assert_eq!(
        sha256_file(&m.at("user/src/@0/disk.raw")),
        sha256_file(&src)
    );
}

#[test]
fn tools_that_reopen_write_to_a_staging_name_and_rename_it_into_place() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    let staging = m.at("user/.new");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&staging)],
    );
    // Only a staging file so far: not an image, yet readable by its writer.
    assert!(m.meta_names("user").is_empty());
    ok("qemu-img", &["check", "-f", "qcow2", s(&staging)]);
    ok("mv", &[s(&staging), s(&m.at("user/new"))]);
    assert_view_is(&m.at("user/new/@0/disk.raw"), "raw", &src);
    assert!(!staging.exists());
    assert_eq!(m.tmp_entries("user"), 0);
}

#[test]
fn mkdir_makes_room_for_an_image_that_cp_then_fills() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("mkdir", &["-p", s(&m.at("user/fresh"))]);
    assert!(m.at("user/fresh").is_dir());
    assert!(m.meta_names("user").is_empty());
    ok("cp", &[s(&src), s(&m.at("user/fresh/"))]);
    assert_eq!(m.meta_names("user"), ["fresh@0"]);
    assert_view_is(&m.at("user/fresh/@0/disk.qed"), "qed", &src);
    ok("mkdir", &[s(&m.at("user/unused"))]);
    ok("rmdir", &[s(&m.at("user/unused"))]);
    assert!(!m.at("user/unused").exists());
}

#[test]
fn copying_with_attributes_works_and_a_published_name_changes_kind_at_once() {
    // A long refresh time, so that the kernel caches entries and only the daemon's
    // invalidation can make the new kind visible at once.
    let Some(m) = Mounted::start_with(&["-o", "refresh=30"]) else {
        return;
    };
    let src = m.source_raw("src.raw", "8M");
    let qcow = m.source_as(&src, "qcow2", "kept.qcow2");
    ok("cp", &["-a", s(&qcow), s(&m.at("user/"))]);
    let st = fs::symlink_metadata(m.at("user/kept")).expect("kept/ right after cp");
    assert!(st.is_dir());
    // Listings show the image at once (the file's name still answers its writer's
    // metadata calls for a moment, for `install -m`).
    assert_eq!(ok("ls", &[s(&m.at("user"))]), "kept\n");
    ok(
        "install",
        &["-m", "644", s(&src), s(&m.at("user/installed.raw"))],
    );
    assert!(m.at("user/installed").is_dir());
    assert_eq!(m.meta_names("user"), ["installed@0", "kept@0"]);
    assert_view_is(&m.at("user/kept/@0/disk.raw"), "raw", &src);
}

#[test]
fn a_read_only_mount_refuses_every_change() {
    let Some(m) = Mounted::start_with(&["-o", "ro"]) else {
        return;
    };
    let src = m.source_raw("src.raw", "8M");
    let out = run("cp", &[s(&src), s(&m.at("user/"))]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{out:?}"
    );
    let err = fs::create_dir(m.at("user/x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn the_mount_helper_accepts_fstab_options() {
    let Some(m) = Mounted::start() else { return };
    m.unmount();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/mount.pcocc-imagefs");
    let bin_dir = Path::new(DAEMON).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(&helper)
        .args([
            s(&m.config()),
            s(&m.mnt),
            "-o",
            "allow_other,defaults,nofail,_netdev,x-systemd.automount,noatime",
        ])
        .env("PATH", path)
        .output()
        .expect("run mount.pcocc-imagefs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(m.is_mounted());
    assert!(m.at("user").is_dir() && m.at("global").is_dir());
    let bad = Command::new(&helper)
        .args([
            s(&m.config()),
            s(&m.dir.path().join("other")),
            "-o",
            "allow_other,nosuchoption",
        ])
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir.display()))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown mount option 'nosuchoption'"),
        "{bad:?}"
    );
}

#[test]
fn a_damaged_layer_gives_eio_on_read_and_the_rest_keeps_being_served() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/good.raw"))]);
    ok("cp", &[s(&src), s(&m.at("user/bad.raw"))]);
    // Both images share one layer; give `bad` a layer of its own and cut its data off.
    let meta_path = m.repo("user").join("meta/bad@0");
    let layer = m.layer_files("user").remove(0);
    let mut bytes = fs::read(&layer).unwrap();
    let map = ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", s(&layer)],
    );
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let first_data = v
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["offset"].as_u64())
        .expect("a data cluster");
    bytes.truncate(first_data as usize + 65536);
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let damaged = m.repo("user").join("data").join(&hash[..2]).join(&hash);
    fs::create_dir_all(damaged.parent().unwrap()).unwrap();
    fs::write(&damaged, &bytes).unwrap();
    let old = fs::read_to_string(&meta_path).unwrap();
    let good_hash = layer.file_name().unwrap().to_str().unwrap();
    fs::remove_file(&meta_path).unwrap();
    fs::write(&meta_path, old.replace(good_hash, &hash)).unwrap();
    // The whole read fails with EIO: the data past the cut is gone.
    let err = fs::read(m.at("user/bad/@0/disk.raw")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Everything else is still served, byte for byte.
    assert_eq!(
        sha256_file(&m.at("user/good/@0/disk.raw")),
        sha256_file(&src)
    );
    assert_view_is(&m.at("user/good/@0/disk.vmdk"), "vmdk", &src);
}

#[test]
fn ten_thousand_opens_and_closes_leak_no_descriptor_in_the_daemon() {
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    // Warm up: the first opens build the revision's views (and open its layer once).
    let views: Vec<PathBuf> = VIEWS
        .iter()
        .map(|(f, _)| m.at(&format!("user/src/@0/{f}")))
        .collect();
    for v in &views {
        fs::File::open(v).unwrap();
    }
    let before = fds();
    let mut buf = [0u8; 512];
    for i in 0..10_000 {
        let f = fs::File::open(&views[i % views.len()]).unwrap();
        std::os::unix::fs::FileExt::read_at(&f, &mut buf, 0).unwrap();
    }
    // Releases are asynchronous: give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fds() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fds(),
        before,
        "the daemon's descriptors grew over 10,000 open/close cycles"
    );
}

/// Counts the files opened inside one directory (inotify `IN_OPEN`), to tell how often
/// the daemon reads metadata files without instrumenting it.
struct OpenWatch {
    fd: i32,
}

impl OpenWatch {
    fn new(dir: &Path) -> OpenWatch {
        // SAFETY: plain syscalls on a descriptor this struct owns; the path is a valid
        // NUL-terminated string for the call.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let c = std::ffi::CString::new(s(dir)).unwrap();
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        OpenWatch { fd }
    }

    /// Opens of each file name since the last call, once nothing has been opened for a
    /// second (read-ahead threads may still be finishing).
    fn settle(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
                return counts;
            }
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while n > 0 && at + header <= n as usize {
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &buf[at + header..at + header + len];
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_string();
                // The directory's own opens (its listing) carry no name.
                if !name.is_empty() {
                    *counts.entry(name).or_insert(0) += 1;
                }
                at += header + len;
            }
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this struct owns.
        unsafe { libc::close(self.fd) };
    }
}

#[test]
fn ls_l_of_many_revisions_shows_each_owner_and_time_and_again_reads_no_metadata() {
    let Some(m) = Mounted::start() else { return };
    let nobody: u32 = ok("id", &["-u", "nobody"]).trim().parse().unwrap();
    let hash = "d843d202b62d2e6d2dbb89a84afa9498b7d2702076c730219ed86b5cde20c490";
    // More revisions than one readdirplus reply holds (~200 with `ls`'s 32 KiB buffer).
    let revs: u64 = 500;
    let meta_dir = m.repo("user").join("meta");
    let ts = |rev: u64| 1_500_000_000 + rev * 60;
    for rev in 0..revs {
        let owner = if rev % 2 == 0 { "root" } else { "nobody" };
        let text = format!(
            r#"{{"name": "many", "revision": {rev}, "kind": "vm", "owner": "{owner}", "timestamp": {}.25, "data_blobs": ["{hash}"], "custom_meta": {{}}}}"#,
            ts(rev)
        );
        fs::write(meta_dir.join(format!("many@{rev}")), text).unwrap();
    }
    let watch = OpenWatch::new(&meta_dir);
    let dir = m.at("user/many");
    let listing = || ok("ls", &["-ln", "--time-style=+%s", s(&dir)]);
    let first = listing();
    let mut seen = 0;
    for line in first.lines().filter(|l| l.starts_with('d')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let rev: u64 = f[6].strip_prefix('@').unwrap().parse().unwrap();
        let uid: u32 = f[2].parse().unwrap();
        assert_eq!(
            uid,
            if rev.is_multiple_of(2) { 0 } else { nobody },
            "{line}"
        );
        assert_eq!(f[5], ts(rev).to_string(), "{line}");
        assert_eq!(f[0], "dr-xr-xr-x", "{line}");
        seen += 1;
    }
    assert_eq!(seen, revs, "{first}");
    assert!(
        first.contains(&format!("latest -> @{}", revs - 1)),
        "{first}"
    );
    // Each metadata file is read a bounded number of times (read ahead, then parsed),
    // not once per request.
    let opens = watch.settle();
    assert!(opens.values().all(|&n| n <= 3), "{opens:?}");

    // Listed again: the same, and parsed metadata is reused (checked by lstat only).
    assert_eq!(listing(), first);
    assert_eq!(watch.settle(), Default::default());

    // A revision published meanwhile (here by hand, as another host would) shows
    // within the mount's refresh time (1 s by default).
    fs::copy(
        meta_dir.join("many@0"),
        meta_dir.join(format!("many@{revs}")),
    )
    .unwrap();
    std::thread::sleep(DEFAULT_REFRESH);
    let after = listing();
    assert!(after.contains(&format!(" @{revs}\n")), "{after}");
    assert!(after.contains(&format!("latest -> @{revs}")), "{after}");
}

#[test]
fn a_stored_layer_opened_several_times_at_once_and_again_later_reads_as_the_layer_itself() {
    use std::io::Read;
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "12M");
    let qcow = m.source_as(&src, "qcow2", "single.qcow2");
    ok("cp", &[s(&qcow), s(&m.at("user/"))]);
    let layers = m.layer_files("user");
    assert_eq!(layers.len(), 1, "{layers:?}");
    let layer = fs::read(&layers[0]).unwrap();
    let view = m.at("user/single/@0/disk.qcow2");
    // With FUSE passthrough (as root) these opens share one backing file in the kernel.
    let mut files: Vec<fs::File> = (0..3).map(|_| fs::File::open(&view).unwrap()).collect();
    for f in &mut files {
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        assert!(bytes == layer, "disk.qcow2 differs from its layer file");
    }
    drop(files);
    // The last close gave the backing file up; a new open registers it again.
    assert!(
        fs::read(&view).unwrap() == layer,
        "disk.qcow2 differs from its layer file when reopened"
    );
}

#[test]
fn the_mount_reads_ahead_by_the_window_asked_for() {
    let Some(m) = Mounted::start_with(&["-o", "readahead=2048"]) else {
        return;
    };
    // Only root may change a device's read-ahead; other daemons keep the kernel's.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    // An open waits until the window is set, so after it the setting is visible.
    drop(fs::File::open(m.at("user/src/@0/disk.raw")).unwrap());
    let dev = fs::metadata(&m.mnt).unwrap().dev();
    let file = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    assert_eq!(fs::read_to_string(&file).unwrap().trim(), "2048", "{file}");
}

/// A raw disk of `mib` MiB with 1 MiB of data every 2 MiB (so every generated view is
/// about half its size, and reads sequentially for long).
fn striped_raw(m: &Mounted, name: &str, mib: u64) -> PathBuf {
    let p = m.work().join(name);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&p), &format!("{mib}M")],
    );
    let cmds: Vec<String> = (0..mib / 2)
        .map(|i| format!("write -P {} {}M 1M", i % 250 + 1, 2 * i))
        .collect();
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(&p));
    ok("qemu-io", &args);
    p
}

/// `cp` of each generated view out reads it sequentially, so the daemon stores the view
/// into the page cache ahead of it (and drops an export view's pages behind it): the copy
/// is the view qemu expects, and reading the view again gives the same bytes.
#[test]
fn views_copied_out_while_pushed_ahead_are_exactly_the_views() {
    let Some(m) = Mounted::start() else { return };
    let src = striped_raw(&m, "striped.raw", 96);
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    for (file, fmt) in VIEWS {
        let view = m.at(&format!("user/striped/@0/{file}"));
        let out = m.work().join(format!("out-{file}"));
        ok("cp", &[s(&view), s(&out)]);
        assert_view_is(&out, fmt, &src);
        ok("cmp", &[s(&view), s(&out)]);
    }
}

/// Bytes of `view` in the page cache (`fincore`) two seconds after the shell command
/// `read` read it from descriptor 3, still open.
fn cached_while_open(view: &Path, read: &str) -> u64 {
    let script = format!(
        r#"exec 3<"$1"
           {read}
           sleep 2
           fincore --bytes --noheadings --output RES "$1""#
    );
    let out = ok("bash", &["-c", &script, "bash", s(view)]);
    out.trim().parse().unwrap()
}

/// A reader that copies the data of a view and skips its holes (`cp`: `SEEK_DATA`,
/// `SEEK_HOLE`, reads of each extent) finds the view stored ahead of it all along: the
/// push learns how far the reader is from the page it leaves out every `TRIP_EVERY`
/// (8 MiB), not only when the reader has caught up with it and waits. Checked at every
/// 10 MiB of a 384 MiB striped `disk.vpc` (1 MiB of data, 1 MiB hole): within 5 s, at
/// least 16 MiB of the data in the 56 MiB past the reader (`PUSH_AHEAD` less a trip) is
/// in the page cache (`mincore`). Without the page left out, the push stayed where it
/// was until the reader had caught up with it (nothing cached ahead at 70 MiB).
#[test]
fn a_reader_skipping_holes_finds_the_view_pushed_ahead_all_along() {
    let Some(m) = Mounted::start() else { return };
    let src = striped_raw(&m, "holey.raw", 384);
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let raw = m.at("user/holey/@0/disk.vpc");
    let script = r#"
import ctypes, mmap, os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
libc = ctypes.CDLL(None, use_errno=True)
view = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
base = ctypes.addressof(ctypes.c_char.from_buffer(view))
def data_cached(start, end):
    # Pages of the data extents in [start, end) in the page cache (mincore).
    total, pos = 0, start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if d >= end:
            break
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        first, last = d >> 12, (h + 4095) >> 12
        vec = (ctypes.c_ubyte * (last - first))()
        if libc.mincore(ctypes.c_void_p(base + (first << 12)), (last - first) << 12, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        total += sum(b & 1 for b in vec) << 12
        pos = h
    return total
pos, mark, ahead = 0, 70 << 20, []
while pos < size and mark < 200 << 20:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    end = os.lseek(fd, pos, os.SEEK_HOLE)
    while pos < end:
        pos += len(os.pread(fd, min(128 << 10, end - pos), pos))
        time.sleep(0.0005)
        if pos >= mark:
            # Whatever the machine's load: the push has up to 5 s to get there.
            deadline = time.monotonic() + 5
            while True:
                got = data_cached(pos, pos + (56 << 20))
                if got >= 16 << 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            ahead.append((mark >> 20, got >> 20))
            mark += 10 << 20
print(" ".join(f"{m}:{a}" for m, a in ahead))
"#;
    let out = ok("/usr/bin/python3", &["-c", script, s(&raw)]);
    let ahead: Vec<(u64, u64)> = out
        .split_whitespace()
        .map(|w| {
            let (m, a) = w.split_once(':').unwrap();
            (m.parse().unwrap(), a.parse().unwrap())
        })
        .collect();
    assert_eq!(ahead.len(), 13, "checkpoints from 70 to 190 MiB: {out}");
    for (mark, mib) in ahead {
        assert!(
            mib >= 16,
            "at {mark} MiB only {mib} MiB of data cached past the reader: {out}"
        );
    }
}

/// What is stored ahead of a reader is bounded: while a reader that read the first
/// 8 MiB of a 192 MiB view sequentially keeps it open, the view holds at most the bytes
/// read, the kernel's read-ahead (its window, and the next one it may already have asked
/// for), the push's reach past that (`PUSH_AHEAD`, 64 MiB) and one piece in the page
/// cache (`fincore`), however long it waits. Read to its end, `disk.raw` stays cached as
/// any file read does, while an export view keeps only what the reader has not yet left
/// behind (`DROP_BEHIND`, 16 MiB, and the push's reach): it is copied out once, and its
/// pages would take as much fresh memory again as the copy.
#[test]
fn a_view_is_pushed_ahead_of_its_reader_only_so_far() {
    let Some(m) = Mounted::start() else { return };
    let src = striped_raw(&m, "wide.raw", 384);
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let view = m.at("user/wide/@0/disk.vdi");
    let size = fs::metadata(&view).unwrap().len();
    assert!(
        size > 190 << 20,
        "the vdi view holds the 192 MiB of data: {size}"
    );
    let resident = cached_while_open(&view, "dd bs=1M count=8 status=none <&3 >/dev/null");
    let window = 2 * (4 << 20) + (1 << 20);
    let bound = (8 << 20) + (64 << 20) + window;
    assert!(
        resident <= bound,
        "{resident} bytes of the view cached after an 8 MiB read: more than {bound}"
    );
    let resident = cached_while_open(&view, "dd bs=1M status=none <&3 >/dev/null");
    let bound = (16 << 20) + (64 << 20) + window;
    assert!(
        resident <= bound,
        "{resident} bytes of the {size}-byte export view cached after reading it all: \
         more than {bound}"
    );
    // What was dropped is generated again for the next reader, the same bytes.
    assert_view_is(&view, "vdi", &src);
    // disk.raw, read to its end, stays in the page cache as any file read does: a second
    // reader (a guest booted again, qemu-img compare after a cp) is served from there.
    let raw = m.at("user/wide/@0/disk.raw");
    let size = fs::metadata(&raw).unwrap().len();
    let resident = cached_while_open(&raw, "dd bs=1M status=none <&3 >/dev/null");
    assert!(
        resident >= size - (1 << 20),
        "{resident} bytes of the {size}-byte disk.raw cached after reading it all"
    );
    // An O_DIRECT reader (qemu's cache=none) never reads the page cache: nothing is
    // stored there for it, however sequentially it reads.
    let view = m.at("user/wide/@0/disk.vpc");
    let direct = r#"
import mmap, os, subprocess, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
for i in range(8):
    assert os.preadv(fd, [buf], i << 20) == 1 << 20
time.sleep(2)
sys.stdout.write(subprocess.check_output(
    ["fincore", "--bytes", "--noheadings", "--output", "RES", sys.argv[1]]).decode())
os.close(fd)
"#;
    let resident = ok("/usr/bin/python3", &["-c", direct, s(&view)]);
    let resident: u64 = resident.trim().parse().unwrap();
    assert_eq!(
        resident, 0,
        "pages of the view cached for an O_DIRECT reader"
    );
}
