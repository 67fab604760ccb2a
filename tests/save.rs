//! Saving a VM's overlay by `cp`: a qcow2 overlay whose backing file is a view of a
//! revision of the mount (`MOUNT/REPO/IMAGE/@N/disk.FMT` or `…/latest/disk.FMT`), copied
//! into an image directory, becomes its next revision = the backing revision's layers +
//! one delta layer; copied into a repository directory, a new image made the same way,
//! in that repository or another one (whose `data/` then holds the base layers too).
//!
//! Each saved revision is judged by qemu: every view equals `qemu-img convert -O raw` of
//! the overlay (zeroes written over base data, a partial cluster, data past the base's
//! end after the overlay was enlarged), `qemu-img check` of its qcow2 view and of the
//! stored top layer with its chain is clean, the top layer names
//! `../../data/XX/<base top>` and is about the size of what the overlay wrote. An
//! overlay backed by a file outside the mount is refused (EINVAL) and publishes nothing.
//!
//! The daemon is mounted as root with `allow_other` and default options otherwise. Needs
//! root, `/dev/fuse`, qemu-img and qemu-io; without them each test prints SKIPPED and
//! returns, except in CI (env `CI` set), where a test that cannot run fails.

mod common;
use common::{ok, run, s, sorted_names};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const TOOLS: &[&str] = &["qemu-img", "qemu-io"];
/// The base image's virtual size, and the overlays' after they grow.
const BASE_SIZE: &str = "16M";
const GROWN_SIZE: u64 = 24 << 20;
/// Every view of a revision, by file name and qemu format.
const VIEWS: [(&str, &str); 6] = [
    ("disk.raw", "raw"),
    ("disk.qcow2", "qcow2"),
    ("disk.qed", "qed"),
    ("disk.vdi", "vdi"),
    ("disk.vpc", "vpc"),
    ("disk.vmdk", "vmdk"),
];

/// Repositories `user` (default) and `global` in a scratch directory, one daemon
/// mounted as root with `allow_other`, and `user/img@0` imported by `cp` of a 16 MiB
/// qcow2 with data at 0, 3M and 7M; unmounted when dropped.
struct Fs(common::MountedRepos);

impl std::ops::Deref for Fs {
    type Target = common::MountedRepos;
    fn deref(&self) -> &common::MountedRepos {
        &self.0
    }
}

impl Fs {
    fn start() -> Option<Fs> {
        let fs = Fs(common::MountedRepos::start(
            "save",
            TOOLS,
            &["user", "global"],
            &[],
        )?);

        let base = fs.work("base.qcow2");
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", s(&base), BASE_SIZE],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 0 1M",
                "-c",
                "write -P 0x22 3M 64k",
                "-c",
                "write -P 0x33 7M 512k",
                s(&base),
            ],
        );
        ok("cp", &[s(&base), s(&fs.at("user/img"))]);
        assert!(fs.at("user/img/@0").is_dir());
        Some(fs)
    }

    fn work(&self, name: &str) -> PathBuf {
        self.work_dir().join(name)
    }

    /// An overlay `work/NAME` backed by `backing` (read as `fmt`), then written by
    /// qemu-io: zeroes over base data, new data in a cluster of its own and in part of
    /// a cluster holding base data, and (grown to 24 MiB) data past the base's end.
    /// Returns the overlay and its `qemu-img convert -O raw`.
    fn overlay(&self, name: &str, backing: &Path, fmt: &str) -> (PathBuf, PathBuf) {
        let p = self.work(name);
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                fmt,
                "-b",
                s(backing),
                s(&p),
            ],
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -z 0 64k",
                "-c",
                "write -P 0x55 1M 128k",
                "-c",
                "write -P 0x66 3M 4k",
                s(&p),
            ],
        );
        ok(
            "qemu-img",
            &["resize", "-q", s(&p), &GROWN_SIZE.to_string()],
        );
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x77 20M 64k", s(&p)],
        );
        let raw = self.work(&format!("{name}.raw"));
        ok("qemu-img", &["convert", "-q", "-O", "raw", s(&p), s(&raw)]);
        (p, raw)
    }

    /// `meta.json` of revision `rel` (`REPO/IMAGE/@N`).
    fn meta(&self, rel: &str) -> serde_json::Value {
        let text = fs::read_to_string(self.at(&format!("{rel}/meta.json"))).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The layer hashes of revision `rel`, base first.
    fn layers(&self, rel: &str) -> Vec<String> {
        self.meta(rel)["data_blobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    /// The stored layer `hash` of repository `repo`.
    fn layer_file(&self, repo: &str, hash: &str) -> PathBuf {
        self.repo(repo).join("data").join(&hash[..2]).join(hash)
    }

    /// Checks the saved revision `rel` (in repository `repo`) against `raw`, the
    /// overlay's content: every view equals it, qemu-img check finds nothing in its
    /// qcow2 view nor in its top layer with its chain, the top layer names
    /// `../../data/XX/<base top>` and holds only what the overlay wrote.
    #[track_caller]
    fn check_saved(&self, rel: &str, repo: &str, raw: &Path, base: &[String]) {
        for (file, fmt) in VIEWS {
            let view = self.at(&format!("{rel}/{file}"));
            common::assert_same_disk(&view, fmt, raw, "raw");
        }
        ok(
            "qemu-img",
            &[
                "check",
                "-q",
                "-f",
                "qcow2",
                s(&self.at(&format!("{rel}/disk.qcow2"))),
            ],
        );
        let layers = self.layers(rel);
        assert_eq!(layers.len(), base.len() + 1, "{rel}: {layers:?}");
        assert_eq!(&layers[..base.len()], base, "{rel}: base layers");
        for h in &layers {
            assert!(
                self.layer_file(repo, h).is_file(),
                "{rel}: layer {h} in {repo}"
            );
        }
        let top = self.layer_file(repo, layers.last().unwrap());
        ok("qemu-img", &["check", "-q", "-f", "qcow2", s(&top)]);
        let info: serde_json::Value = serde_json::from_str(&ok(
            "qemu-img",
            &["info", "--output=json", "-f", "qcow2", s(&top)],
        ))
        .unwrap();
        let base_top = base.last().unwrap();
        assert_eq!(
            info["backing-filename"].as_str(),
            Some(format!("../../data/{}/{base_top}", &base_top[..2]).as_str()),
            "{rel}: {info}"
        );
        assert_eq!(info["virtual-size"].as_u64(), Some(GROWN_SIZE), "{rel}");
        let mode = fs::metadata(&top).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444, "{rel}: top layer mode");
        // What the overlay wrote: 4 data clusters (1M 128k, the cluster at 3M, 20M 64k)
        // and one zero cluster, plus header, tables and refcounts: far below the
        // base's 1.6 MiB of data.
        let size = fs::metadata(&top).unwrap().len();
        assert!(size <= 640 << 10, "{rel}: top layer of {size} bytes");
        let map = ok(
            "qemu-img",
            &["map", "--output=json", "-f", "qcow2", s(&top)],
        );
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        let data: u64 = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(data, 4 << 16, "{rel}: data stored in the top layer: {map}");
    }
}

fn save_views_into_the_same_image(fs: &Fs) {
    let base = fs.layers("user/img/@0");
    let cases = [
        ("img/@0/disk.qcow2", "qcow2", "@1"),
        ("img/@0/disk.raw", "raw", "@2"),
        ("img/latest/disk.vmdk", "vmdk", "@3"),
    ];
    for (i, (view, fmt, rev)) in cases.into_iter().enumerate() {
        let backing = fs.at(&format!("user/{view}"));
        let (vm, raw) = fs.overlay(&format!("vm{i}.qcow2"), &backing, fmt);
        // The revision `latest` names when the overlay is saved is its base.
        let base_rev = fs.at("user/img/latest").read_link().unwrap();
        let base_layers = match view.contains("latest") {
            true => fs.layers(&format!("user/img/{}", base_rev.display())),
            false => base.clone(),
        };
        ok("cp", &[s(&vm), s(&fs.at("user/img/"))]);
        fs.check_saved(&format!("user/img/{rev}"), "user", &raw, &base_layers);
    }
    assert_eq!(
        sorted_names(&fs.at("user/img")),
        ["@0", "@1", "@2", "@3", "latest"]
    );
}

fn save_as_new_images(fs: &Fs) {
    let base = fs.layers("user/img/@0");
    let (vm, raw) = fs.overlay("saved.qcow2", &fs.at("user/img/@0/disk.qcow2"), "qcow2");
    ok("cp", &[s(&vm), s(&fs.at("user/"))]);
    fs.check_saved("user/saved/@0", "user", &raw, &base);
    assert!(!fs.repo("global").join("data").join(&base[0][..2]).exists());
    ok("cp", &[s(&vm), s(&fs.at("global/"))]);
    fs.check_saved("global/saved/@0", "global", &raw, &base);
    assert_eq!(fs.meta("global/saved/@0")["repo"], "global");
}

/// An overlay of a local overlay of a view: the chain is flattened down to the view's
/// revision, in one layer.
fn save_a_chain_of_overlays(fs: &Fs) {
    let base = fs.layers("user/img/@0");
    let (inner, _) = fs.overlay("inner.qcow2", &fs.at("user/img/@0/disk.qcow2"), "qcow2");
    let outer = fs.work("outer.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            s(&inner),
            s(&outer),
        ],
    );
    // Within the clusters the inner overlay wrote: the same 4 data clusters.
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x88 1M 4k",
            "-c",
            "write -P 0x99 20M 4k",
            s(&outer),
        ],
    );
    let raw = fs.work("outer.raw");
    ok(
        "qemu-img",
        &["convert", "-q", "-O", "raw", s(&outer), s(&raw)],
    );
    ok("cp", &[s(&outer), s(&fs.at("user/"))]);
    fs.check_saved("user/outer/@0", "user", &raw, &base);
}

fn refuse_other_backing_files(fs: &Fs) {
    let before_user = sorted_names(&fs.repo("user").join("meta"));
    let before_img = sorted_names(&fs.at("user/img"));
    // A backing file outside the mount, though it holds the very same disk.
    let outside = fs.work("base.qcow2");
    let (vm, _) = fs.overlay("outside.qcow2", &outside, "qcow2");
    for dest in ["user/img/", "user/"] {
        let out = run("cp", &[s(&vm), s(&fs.at(dest))]);
        assert!(!out.status.success(), "cp into {dest} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Invalid argument"), "cp into {dest}: {err}");
    }
    // A backing format that is not the view's.
    let vm = fs.work("mismatch.qcow2");
    let raw_view = fs.at("user/img/@0/disk.raw");
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "qcow2",
        "-b",
        s(&raw_view),
    ];
    ok("qemu-img", &[&args[..], &[s(&vm), BASE_SIZE]].concat());
    let out = run("cp", &[s(&vm), s(&fs.at("user/img/"))]);
    assert!(
        !out.status.success(),
        "cp of an overlay misreading its base"
    );
    assert_eq!(sorted_names(&fs.repo("user").join("meta")), before_user);
    assert_eq!(sorted_names(&fs.at("user/img")), before_img);
    assert!(!fs.at("user/outside").exists());
}

/// One mount for every case: each saves more revisions of `user/img`.
#[test]
fn save_overlays_by_cp() {
    let Some(fs) = Fs::start() else { return };
    save_views_into_the_same_image(&fs);
    save_as_new_images(&fs);
    save_a_chain_of_overlays(&fs);
    refuse_other_backing_files(&fs);
}
