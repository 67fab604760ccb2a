//! `pcocc image …` end to end: the built binary runs against repositories made in a
//! temporary directory exactly as pcocc makes them (layers by qemu-img, named by their
//! sha256; metadata JSON written by hand in pcocc's key order, without a trailing
//! newline), and its output is compared byte for byte with pcocc's transcripts
//! (`reference/pcocc-behaviour.md` in the project notes), except where we fix a pcocc bug.
//!
//! Every test builds its own repositories and runs with `TZ=UTC`, so dates are stable;
//! tests that need qemu-img return early, saying so, where it is missing.

mod common;
use common::{Run, have_qemu};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// pcocc's timestamps from the transcripts and the UTC second each prints as.
const T_IMG1_0: (&str, &str) = ("1795749382.4048052", "2026-11-27 03:16:22");
const T_IMG1_1: (&str, &str) = ("1795749453.041635", "2026-11-27 03:17:33");
const T_IMG1_2: (&str, &str) = ("1795749454.9273655", "2026-11-27 03:17:34");
const T_DISKIMG: (&str, &str) = ("1795749388.9076195", "2026-11-27 03:16:28");
const T_VMDKIMG: (&str, &str) = ("1795749386.0579588", "2026-11-27 03:16:26");
const T_RAWIMG: (&str, &str) = ("1795749383.6878085", "2026-11-27 03:16:23");

/// A scratch directory with a system `repos.yaml` naming `user` (the default) and
/// `global`, an empty user configuration directory and a `$HOME`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Option<Fixture> {
        if !have_qemu() {
            return None;
        }
        let fixture = Fixture {
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        for sub in ["etc", "user-conf", "home", "work"] {
            fs::create_dir_all(fixture.root().join(sub)).expect("fixture directories");
        }
        fixture.write_repos_yaml(&fixture.root().join("etc/repos.yaml"), &["user", "global"]);
        fixture.make_repo("user", 2);
        fixture.make_repo("global", 2);
        Some(fixture)
    }

    /// [`Fixture::new`] plus the images of the transcripts:
    /// `user`: img1@0..2 (a base layer, then two overlays), diskimg@0, vmdkimg@0;
    /// `global`: rawimg@0.
    fn standard() -> Option<Fixture> {
        let fixture = Fixture::new()?;
        let base = fixture.store_layer("user", &fixture.base_layer());
        let small = fixture.store_layer("user", &fixture.small_layer());
        let over1 = fixture.store_layer("user", &fixture.overlay(&base, "over1", "128M"));
        let over2 = fixture.store_layer("user", &fixture.overlay(&over1, "over2", "256M"));
        // Written newest first, so that directory order is unlikely to be revision order.
        fixture.write_meta("user", "img1", 2, T_IMG1_2.0, &[&base, &over1, &over2]);
        fixture.write_meta("user", "img1", 1, T_IMG1_1.0, &[&base, &over1]);
        fixture.write_meta("user", "img1", 0, T_IMG1_0.0, &[&base]);
        fixture.write_meta("user", "diskimg", 0, T_DISKIMG.0, &[&small]);
        fixture.write_meta("user", "vmdkimg", 0, T_VMDKIMG.0, &[&base]);
        let small = fixture.store_layer("global", &fixture.small_layer());
        fixture.write_meta("global", "rawimg", 0, T_RAWIMG.0, &[&small]);
        Some(fixture)
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.root().join("repos").join(name)
    }

    fn write_repos_yaml(&self, file: &Path, repos: &[&str]) {
        let mut text = String::from("repos:\n");
        for repo in repos {
            text.push_str(&format!(
                "  - name: {repo}\n    path: {}\n",
                self.repo(repo).display()
            ));
        }
        fs::write(file, text).expect("write repos.yaml");
    }

    /// An empty repository as pcocc creates it on first use.
    fn make_repo(&self, name: &str, version: u32) {
        let repo = self.repo(name);
        for sub in [".tmp", "data", "meta"] {
            fs::create_dir_all(repo.join(sub)).expect("repository directories");
        }
        fs::write(repo.join(".config"), format!("version: {version}\n")).expect("write .config");
    }

    fn work(&self, name: &str) -> PathBuf {
        self.root().join("work").join(name)
    }

    #[track_caller]
    fn run_tool(&self, tool: &str, args: &[&str]) {
        let output = Command::new(tool)
            .args(args)
            .current_dir(self.root().join("work"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A 64 MiB qcow2 with 1 MiB of data: about 1.3 MB on disk ("1.0 MB" in `show`).
    fn base_layer(&self) -> PathBuf {
        let path = self.work("base.qcow2");
        if !path.exists() {
            self.run_tool(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
            );
            self.run_tool("qemu-io", &["-c", "write -P 0x5a 0 1M", "base.qcow2"]);
        }
        path
    }

    /// A 16 MiB qcow2 with one 64 KiB cluster of data: 393216 bytes ("384.0 KB").
    fn small_layer(&self) -> PathBuf {
        let path = self.work("small.qcow2");
        if !path.exists() {
            self.run_tool(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "small.qcow2", "16M"],
            );
            self.run_tool("qemu-io", &["-c", "write -P 1 0 64k", "small.qcow2"]);
        }
        path
    }

    /// An empty overlay of the stored layer `backing`, with the relative backing path
    /// pcocc writes (`../../data/XX/<sha256>`), made the way pcocc's resize makes it.
    fn overlay(&self, backing: &str, name: &str, size: &str) -> PathBuf {
        let path = self.work(name);
        let absolute = self.layer_path("user", backing);
        let relative = format!("../../data/{}/{backing}", &backing[..2]);
        let absolute = absolute.to_str().expect("utf-8 path");
        self.run_tool(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", absolute, name, size,
            ],
        );
        self.run_tool(
            "qemu-img",
            &[
                "rebase", "-u", "-b", &relative, "-F", "qcow2", "-f", "qcow2", name,
            ],
        );
        path
    }

    fn layer_path(&self, repo: &str, hash: &str) -> PathBuf {
        self.repo(repo).join("data").join(&hash[..2]).join(hash)
    }

    /// Stores `file` in `repo` as pcocc does: named by the sha256 of its bytes, mode 0444.
    fn store_layer(&self, repo: &str, file: &Path) -> String {
        let bytes = fs::read(file).expect("read layer");
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let target = self.layer_path(repo, &hash);
        fs::create_dir_all(target.parent().expect("data/XX")).expect("create data/XX");
        if !target.exists() {
            fs::write(&target, &bytes).expect("write layer");
            fs::set_permissions(&target, fs::Permissions::from_mode(0o444)).expect("chmod 0444");
        }
        hash
    }

    /// Metadata exactly as pcocc's `json.dump` writes it: its key order, `", "` and
    /// `": "` separators, no trailing newline.
    fn write_meta(&self, repo: &str, name: &str, revision: u64, timestamp: &str, blobs: &[&str]) {
        let blobs: Vec<String> = blobs.iter().map(|b| format!("\"{b}\"")).collect();
        let json = format!(
            "{{\"name\": \"{name}\", \"revision\": {revision}, \"kind\": \"vm\", \"owner\": \"root\", \
             \"timestamp\": {timestamp}, \"data_blobs\": [{}], \"custom_meta\": {{}}}}",
            blobs.join(", ")
        );
        let path = self
            .repo(repo)
            .join("meta")
            .join(format!("{name}@{revision}"));
        fs::write(path, json).expect("write metadata");
    }

    fn meta_path(&self, repo: &str, name: &str, revision: u64) -> PathBuf {
        self.repo(repo)
            .join("meta")
            .join(format!("{name}@{revision}"))
    }

    /// Runs `pcocc ARGS` with this fixture's configuration directories and `TZ=UTC`.
    fn pcocc(&self, args: &[&str]) -> Run {
        self.run_with_env(env!("CARGO_BIN_EXE_pcocc"), args)
    }

    /// Runs `program ARGS` in this fixture's environment.
    fn run_with_env(&self, program: &str, args: &[&str]) -> Run {
        common::run_in_fixture(self.root(), program, args)
    }
}

// ---------------------------------------------------------------- list

const LIST_USER_ALL: &str = "\
User images:
NAME       TYPE    REVISION    REPO    OWNER    DATE
----       ----    --------    ----    -----    ----
diskimg    vm      0           user    root     2026-11-27 03:16:28
img1       vm      2           user    root     2026-11-27 03:17:34
vmdkimg    vm      0           user    root     2026-11-27 03:16:26

";

const LIST_GLOBAL_ALL: &str = "\
Global images:
NAME      TYPE    REVISION    REPO      OWNER    DATE
----      ----    --------    ----      -----    ----
rawimg    vm      0           global    root     2026-11-27 03:16:23

";

#[test]
fn list_shows_each_repository_in_priority_order_with_the_latest_revision() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "list"])
        .expect(&format!("{LIST_USER_ALL}{LIST_GLOBAL_ALL}"), "", 0);
}

#[test]
fn list_filters_names_with_an_unanchored_regex() {
    let Some(f) = Fixture::standard() else { return };
    let expected = "\
User images:
NAME       TYPE    REVISION    REPO    OWNER    DATE
----       ----    --------    ----    -----    ----
diskimg    vm      0           user    root     2026-11-27 03:16:28
vmdkimg    vm      0           user    root     2026-11-27 03:16:26

";
    f.pcocc(&["image", "list", "kimg"]).expect(expected, "", 0);
}

#[test]
fn list_with_an_anchored_regex_skips_repositories_without_a_match() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "list", "^raw"])
        .expect(LIST_GLOBAL_ALL, "", 0);
}

#[test]
fn list_restricted_to_one_repository() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "list", "-R", "global"])
        .expect(LIST_GLOBAL_ALL, "", 0);
    let expected = "\
User images:
NAME    TYPE    REVISION    REPO    OWNER    DATE
----    ----    --------    ----    -----    ----
img1    vm      2           user    root     2026-11-27 03:17:34

";
    f.pcocc(&["image", "list", "--repo", "user", "^img1$"])
        .expect(expected, "", 0);
}

#[test]
fn list_with_an_empty_repository_lists_them_all_and_the_last_repo_option_wins() {
    // As pcocc 0.7.5 answers: `-R ''` is no restriction, and of several `-R` the last
    // one counts (an empty last one included).
    let Some(f) = Fixture::standard() else { return };
    let all = format!("{LIST_USER_ALL}{LIST_GLOBAL_ALL}");
    f.pcocc(&["image", "list", "-R", ""]).expect(&all, "", 0);
    f.pcocc(&["image", "list", "-R", "user", "-R", "global"])
        .expect(LIST_GLOBAL_ALL, "", 0);
    f.pcocc(&["image", "list", "-R", "", "--repo", "global"])
        .expect(LIST_GLOBAL_ALL, "", 0);
    f.pcocc(&["image", "list", "-R", "global", "-R", ""])
        .expect(&all, "", 0);
    f.pcocc(&["image", "list", "-R", "nosuch", "-R", "global"])
        .expect(LIST_GLOBAL_ALL, "", 0);
}

#[test]
fn list_matching_nothing_prints_nothing_and_succeeds() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "list", "zzz"]).expect("", "", 0);
}

#[test]
fn list_with_a_bad_regex_fails_with_pcoccs_prefix() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "list", "("])
        .expect_error("Could not parse regular expression :unclosed group at position 0");
}

#[test]
fn list_of_an_unknown_repository_fails() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "list", "-R", "nosuch"])
        .expect_error("Unknown repository nosuch");
}

#[test]
fn list_capitalizes_the_repository_heading_like_python() {
    let Some(f) = Fixture::new() else { return };
    let yaml = f.root().join("mixed.yaml");
    f.write_repos_yaml(&yaml, &["myRepo"]);
    f.make_repo("myRepo", 2);
    let base = f.store_layer("myRepo", &f.base_layer());
    f.write_meta("myRepo", "a", 0, T_IMG1_0.0, &[&base]);
    let expected = "\
Myrepo images:
NAME    TYPE    REVISION    REPO      OWNER    DATE
----    ----    --------    ----      -----    ----
a       vm      0           myRepo    root     2026-11-27 03:16:22

";
    f.pcocc(&["--config", yaml.to_str().unwrap(), "image", "list"])
        .expect(expected, "", 0);
}

#[test]
fn unreadable_metadata_is_skipped_with_a_warning_naming_the_file() {
    let Some(f) = Fixture::standard() else { return };
    fs::write(f.repo("user").join("meta/bad@0"), "{bad").unwrap();
    fs::write(f.repo("user").join("meta/noat"), "{}").unwrap();
    let run = f.pcocc(&["image", "list"]);
    assert_eq!(run.stdout, format!("{LIST_USER_ALL}{LIST_GLOBAL_ALL}"));
    assert_eq!(run.code, 0, "{run:?}");
    // One warning per file, naming it, however often the command reads the repository.
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("WARNING:root:")),
        "{run:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("meta/bad@0")).count(),
        1,
        "{run:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("meta/noat")).count(),
        1,
        "{run:?}"
    );
    let run = f.pcocc(&["image", "show", "img1"]);
    assert_eq!((run.stdout.as_str(), run.code), (SHOW_IMG1, 0), "{run:?}");
}

#[test]
fn a_version_1_repository_is_listed_and_shown() {
    let Some(f) = Fixture::new() else { return };
    let yaml = f.root().join("user-conf/repos.yaml");
    f.write_repos_yaml(&yaml, &["legacy"]);
    f.make_repo("legacy", 1);
    let base = f.store_layer("legacy", &f.base_layer());
    let key: String = Sha256::digest(b"old\n0")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = f.repo("legacy").join("meta").join(&key[..2]);
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join(&key),
        format!(
            "custom_meta: {{}}\ndata_blobs:\n- {base}\nkind: vm\nname: old\nowner: someone\nrevision: 0\ntimestamp: 1500000000.5\n"
        ),
    )
    .unwrap();
    let expected = "\
Legacy images:
NAME    TYPE    REVISION    REPO      OWNER      DATE
----    ----    --------    ----      -----      ----
old     vm      0           legacy    someone    2017-07-14 02:40:00

";
    f.pcocc(&["image", "list", "-R", "legacy"])
        .expect(expected, "", 0);
    let expected = "\
------------------------------
Repo:                   legacy
Name:                      old
Type:                       vm
------------------------------
URI:              legacy:old@0
Layers:                      1
------------------------------
Owner:                 someone
Date:      2017-07-14 02:40:00
------------------------------

REVISION    SIZE      CREATION DATE
--------    ----      -------- ----
0           1.0 MB    2017-07-14 02:40:00
";
    f.pcocc(&["image", "show", "legacy:old"])
        .expect(expected, "", 0);
}

// ---------------------------------------------------------------- show

const SHOW_IMG1: &str = "\
------------------------------
Repo:                     user
Name:                     img1
Type:                       vm
------------------------------
URI:               user:img1@2
Layers:                      3
------------------------------
Owner:                    root
Date:      2026-11-27 03:17:34
------------------------------

REVISION    SIZE        CREATION DATE
--------    ----        -------- ----
0           1.0 MB      2026-11-27 03:16:22
1           192.0 KB    2026-11-27 03:17:33
2           192.0 KB    2026-11-27 03:17:34
";

#[test]
fn show_describes_the_latest_revision_and_lists_revisions_in_order() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "show", "img1"]).expect(SHOW_IMG1, "", 0);
    f.pcocc(&["image", "show", "user:img1"])
        .expect(SHOW_IMG1, "", 0);
}

#[test]
fn show_of_an_explicit_revision_describes_that_revision() {
    let Some(f) = Fixture::standard() else { return };
    let expected = "\
------------------------------
Repo:                     user
Name:                     img1
Type:                       vm
------------------------------
URI:               user:img1@0
Layers:                      1
------------------------------
Owner:                    root
Date:      2026-11-27 03:16:22
------------------------------

REVISION    SIZE        CREATION DATE
--------    ----        -------- ----
0           1.0 MB      2026-11-27 03:16:22
1           192.0 KB    2026-11-27 03:17:33
2           192.0 KB    2026-11-27 03:17:34
";
    f.pcocc(&["image", "show", "img1@0"])
        .expect(expected, "", 0);
}

#[test]
fn show_searches_every_repository_and_names_the_one_found() {
    let Some(f) = Fixture::standard() else { return };
    let expected = "\
------------------------------
Repo:                   global
Name:                   rawimg
Type:                       vm
------------------------------
URI:           global:rawimg@0
Layers:                      1
------------------------------
Owner:                    root
Date:      2026-11-27 03:16:23
------------------------------

REVISION    SIZE        CREATION DATE
--------    ----        -------- ----
0           384.0 KB    2026-11-27 03:16:23
";
    f.pcocc(&["image", "show", "rawimg"])
        .expect(expected, "", 0);
}

#[test]
fn show_failures_say_what_was_not_found_where() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "show", "img1@5"])
        .expect_error("Object img1 revision 5 not found in configured repositories");
    f.pcocc(&["image", "show", "nosuch"])
        .expect_error("Object nosuch not found in configured repositories");
    f.pcocc(&["image", "show", "global:img1"])
        .expect_error("Object img1 not found in repository global");
    f.pcocc(&["image", "show", "nosuch:img1"])
        .expect_error("Unknown repository nosuch");
    f.pcocc(&["image", "show", "img1@x"])
        .expect_error("Bad revision: x");
}

#[test]
fn an_empty_repository_in_a_uri_is_the_default_repository() {
    let Some(f) = Fixture::standard() else { return };
    let plain = f.pcocc(&["image", "show", "img1@0"]);
    assert_eq!(plain.code, 0, "{plain:?}");
    f.pcocc(&["image", "show", ":img1@0"])
        .expect(&plain.stdout, "", 0);
    // The default repository is searched only: rawimg lives in global.
    f.pcocc(&["image", "show", ":rawimg"])
        .expect_error("Object rawimg not found in repository user");
    f.pcocc(&["image", "delete", ":diskimg"]).expect("", "", 0);
    assert!(!f.meta_path("user", "diskimg", 0).exists());
}

#[test]
fn uris_that_pcocc_half_accepted_are_refused_clearly() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "show", "user:img1:x"]).expect_error(
        "Bad image URI user:img1:x: more than one ':' (expected [REPO:]IMAGE[@REVISION])",
    );
    f.pcocc(&["image", "show", "img1@0@1"]).expect_error(
        "Bad image URI img1@0@1: more than one '@' (expected [REPO:]IMAGE[@REVISION])",
    );
    f.pcocc(&["image", "show", "img1@"]).expect_error(
        "Bad revision: nothing after '@' in img1@ (write img1@N, or leave out '@' for the latest revision)",
    );
    f.pcocc(&["image", "show", "img1@-1"])
        .expect_error("Bad revision: -1 (a revision is a plain number: 0, 1, 2, ...)");
    f.pcocc(&["image", "delete", "img1@+1"])
        .expect_error("Bad revision: +1 (a revision is a plain number: 0, 1, 2, ...)");
    assert!(f.meta_path("user", "img1", 1).exists());
}

// ---------------------------------------------------------------- copy

const COPIED: &str = "Copying image ...\nImage successufly copied\n";

#[test]
fn copy_to_another_repository_writes_revision_0_with_the_same_layers() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "copy", "img1", "global:img1copy"])
        .expect(COPIED, "", 0);
    let written = fs::read_to_string(f.meta_path("global", "img1copy", 0)).unwrap();
    let source: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(f.meta_path("user", "img1", 2)).unwrap()).unwrap();
    let prefix = "{\"name\": \"img1copy\", \"revision\": 0, \"kind\": \"vm\", \"owner\": \"";
    assert!(written.starts_with(prefix), "{written}");
    assert!(written.ends_with(", \"custom_meta\": {}}"), "{written}");
    let copy: serde_json::Value = serde_json::from_str(&written).unwrap();
    assert_eq!(copy["data_blobs"], source["data_blobs"]);
    for blob in source["data_blobs"].as_array().unwrap() {
        assert!(f.layer_path("global", blob.as_str().unwrap()).exists());
    }
    let run = f.pcocc(&["image", "list", "-R", "global", "copy"]);
    assert!(
        run.stdout
            .contains("img1copy    vm      0           global"),
        "{run:?}"
    );
}

#[test]
fn a_null_custom_meta_is_read_as_an_empty_object_and_never_copied() {
    // pcocc 0.7.5 refuses `"custom_meta": null` ("Bad metadata for N: None is not of type
    // 'object'"), failing every list of the repository: here it reads as `{}`, and what
    // a copy writes is `{}`, which pcocc reads.
    let Some(f) = Fixture::standard() else { return };
    let meta = fs::read_to_string(f.meta_path("user", "diskimg", 0)).unwrap();
    let nulled = meta.replace("\"custom_meta\": {}", "\"custom_meta\": null");
    assert_ne!(meta, nulled);
    fs::write(f.meta_path("user", "diskimg", 0), nulled).unwrap();
    f.pcocc(&["image", "list"])
        .expect(&format!("{LIST_USER_ALL}{LIST_GLOBAL_ALL}"), "", 0);
    f.pcocc(&["image", "copy", "diskimg", "global:copied"])
        .expect(COPIED, "", 0);
    let written = fs::read_to_string(f.meta_path("global", "copied", 0)).unwrap();
    assert!(written.ends_with(", \"custom_meta\": {}}"), "{written}");
    // Any other non-object is bad metadata, skipped with a warning, as pcocc refuses it.
    let listed = fs::read_to_string(f.meta_path("user", "vmdkimg", 0)).unwrap();
    fs::write(
        f.meta_path("user", "vmdkimg", 0),
        listed.replace("\"custom_meta\": {}", "\"custom_meta\": [1]"),
    )
    .unwrap();
    let run = f.pcocc(&["image", "list", "-R", "user"]);
    assert!(!run.stdout.contains("vmdkimg"), "{run:?}");
    assert!(run.stderr.contains("vmdkimg@0"), "{run:?}");
}

/// A container image `name@0` in `repo` as pcocc keeps one: kind `ctr`, a layer that is
/// no disk (here 384 KiB of text standing for an OCI blob) and an OCI index in
/// `custom_meta`.
fn write_container_image(f: &Fixture, repo: &str, name: &str) {
    let blob = f.root().join("work/oci-blob");
    fs::write(
        &blob,
        &"not a disk\n".repeat(393216 / 11 + 1).as_bytes()[..393216],
    )
    .unwrap();
    let hash = f.store_layer(repo, &blob);
    let json = format!(
        "{{\"name\": \"{name}\", \"revision\": 0, \"kind\": \"ctr\", \"owner\": \"root\", \
         \"timestamp\": 1796493157.267927, \"data_blobs\": [\"{hash}\"], \
         \"custom_meta\": {{\"index\": {{\"schemaVersion\": 2}}}}}}"
    );
    fs::write(f.meta_path(repo, name, 0), json).unwrap();
}

#[test]
fn container_images_are_listed_shown_and_copied_but_not_exported_to_a_vm_format() {
    // pcocc 0.7.5's answers for a `kind: ctr` image.
    let Some(f) = Fixture::new() else { return };
    write_container_image(&f, "user", "ctr1");
    let list = "\
User images:
NAME    TYPE    REVISION    REPO    OWNER    DATE
----    ----    --------    ----    -----    ----
ctr1    ctr     0           user    root     2026-12-05 17:52:37

";
    f.pcocc(&["image", "list"]).expect(list, "", 0);
    let show = "\
------------------------------
Repo:                     user
Name:                     ctr1
Type:                      ctr
------------------------------
URI:               user:ctr1@0
Layers:                      1
------------------------------
Owner:                    root
Date:      2026-12-05 17:52:37
------------------------------

REVISION    SIZE        CREATION DATE
--------    ----        -------- ----
0           384.0 KB    2026-12-05 17:52:37
";
    f.pcocc(&["image", "show", "ctr1"]).expect(show, "", 0);
    f.pcocc(&["image", "export", "ctr1", "out.raw"])
        .expect_error("raw is not a valid ctr format");
    f.pcocc(&["image", "export", "ctr1", "out.qcow2"])
        .expect_error("qcow2 is not a valid ctr format");
    f.pcocc(&["image", "export", "-t", "vmdk", "ctr1", "x"])
        .expect_error("vmdk is not a valid ctr format");
    // With no format pcocc hands the image to skopeo; here it is refused, saying why.
    f.pcocc(&["image", "export", "ctr1", "noext"])
        .expect_error("ctr1 is a ctr image: container images are not handled here, only VM images");
    for out in ["out.raw", "out.qcow2", "x", "noext"] {
        assert!(!f.root().join("work").join(out).exists(), "{out} written");
    }
    f.pcocc(&["image", "copy", "ctr1", "global:ctr2"])
        .expect(COPIED, "", 0);
    let copied = fs::read_to_string(f.meta_path("global", "ctr2", 0)).unwrap();
    assert!(copied.contains("\"kind\": \"ctr\""), "{copied}");
    assert!(
        copied.ends_with("\"custom_meta\": {\"index\": {\"schemaVersion\": 2}}}"),
        "{copied}"
    );
}

#[test]
fn copy_of_a_revision_copies_that_revision() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "copy", "img1@1", "user:img1one@7"])
        .expect(COPIED, "", 0);
    let copy: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(f.meta_path("user", "img1one", 0)).unwrap())
            .unwrap();
    assert_eq!(copy["data_blobs"].as_array().unwrap().len(), 2);
    assert!(!f.meta_path("user", "img1one", 7).exists());
}

#[test]
fn copy_to_a_name_used_in_another_repository_warns() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "copy", "img1", "global:img1"]).expect(
        "Copying image ...\n\
         Warning: an image with name img1 already exists in another repo (user)\n\
         Image successufly copied\n",
        "",
        0,
    );
}

#[test]
fn copy_to_an_existing_name_fails() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "copy", "img1", "global:rawimg"]).expect(
        "Copying image ...\n",
        "Image rawimg already exists in repo global\n",
        255,
    );
}

#[test]
fn copy_from_an_unknown_repository_fails_after_announcing_the_copy() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "copy", "nosuch:img1", "global:x"])
        .expect("Copying image ...\n", "Unknown repository nosuch\n", 255);
    f.pcocc(&["image", "copy", "img1", "global:bad name"])
        .expect(
            "Copying image ...\n",
            "Object name contains invalid characters\n",
            255,
        );
}

// ---------------------------------------------------------------- delete

#[test]
fn delete_of_one_revision_removes_only_its_metadata() {
    let Some(f) = Fixture::standard() else { return };
    let layers_before = fs::read_dir(f.repo("user").join("data")).unwrap().count();
    f.pcocc(&["image", "delete", "img1@1"]).expect("", "", 0);
    assert!(!f.meta_path("user", "img1", 1).exists());
    assert_eq!(
        fs::read_dir(f.repo("user").join("data")).unwrap().count(),
        layers_before
    );
    let run = f.pcocc(&["image", "show", "img1"]);
    assert!(
        run.stdout.ends_with(
            "0           1.0 MB      2026-11-27 03:16:22\n\
             2           192.0 KB    2026-11-27 03:17:34\n"
        ),
        "{run:?}"
    );
}

#[test]
fn delete_without_a_revision_removes_every_revision() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "delete", "user:img1"]).expect("", "", 0);
    for revision in 0..3 {
        assert!(!f.meta_path("user", "img1", revision).exists());
    }
    f.pcocc(&["image", "show", "img1"])
        .expect_error("Object img1 not found in configured repositories");
}

#[test]
fn delete_without_a_repository_searches_them_by_priority() {
    let Some(f) = Fixture::standard() else { return };
    // pcocc only looked in the default repository and failed here.
    f.pcocc(&["image", "delete", "rawimg"]).expect("", "", 0);
    assert!(!f.meta_path("global", "rawimg", 0).exists());
    // With the name in both, the first repository's image goes, the other stays.
    f.pcocc(&["image", "copy", "img1", "global:img1"]);
    f.pcocc(&["image", "delete", "img1"]).expect("", "", 0);
    assert!(!f.meta_path("user", "img1", 2).exists());
    assert!(f.meta_path("global", "img1", 0).exists());
}

#[test]
fn delete_failures_say_what_was_not_found_where() {
    let Some(f) = Fixture::standard() else { return };
    f.pcocc(&["image", "delete", "nosuch"])
        .expect_error("Object nosuch not found in configured repositories");
    f.pcocc(&["image", "delete", "global:img1"])
        .expect_error("Object img1 not found in repository global");
    f.pcocc(&["image", "delete", "user:img1@9"])
        .expect_error("Object img1 revision 9 not found in repository user");
    f.pcocc(&["image", "delete", "nosuch:img1"])
        .expect_error("Unknown repository nosuch");
    f.pcocc(&["image", "delete", "img1@x"])
        .expect_error("Bad revision: x");
    assert!(f.meta_path("user", "img1", 2).exists());
}

#[test]
fn verbose_logs_what_delete_did() {
    let Some(f) = Fixture::standard() else { return };
    let run = f.pcocc(&["-v", "image", "delete", "img1@1"]);
    assert_eq!((run.stdout.as_str(), run.code), ("", 0), "{run:?}");
    assert!(run.stderr.contains("INFO:root:"), "{run:?}");
    assert!(run.stderr.contains("img1"), "{run:?}");
}

// ---------------------------------------------------------------- repositories

#[test]
fn repo_list_shows_paths_and_writability_in_priority_order() {
    let Some(f) = Fixture::new() else { return };
    let run = f.pcocc(&["image", "repo", "list"]);
    // Column widths depend on the temporary path, so they are computed here.
    let user = f.repo("user").display().to_string();
    let global = f.repo("global").display().to_string();
    let width = global.len();
    let expected = format!(
        "NAME      {:<width$}    WRITABLE\n\
         ----      {:<width$}    --------\n\
         user      {user:<width$}    True\n\
         global    {global:<width$}    True\n",
        "PATH", "----"
    );
    run.expect(&expected, "", 0);
}

#[test]
fn repo_list_creates_missing_repositories_as_pcocc_does() {
    let Some(f) = Fixture::new() else { return };
    let yaml = f.root().join("fresh.yaml");
    f.write_repos_yaml(&yaml, &["fresh"]);
    let run = f.pcocc(&["--config", yaml.to_str().unwrap(), "image", "repo", "list"]);
    let path = f.repo("fresh").display().to_string();
    let width = path.len();
    run.expect(
        &format!(
            "NAME     {:<width$}    WRITABLE\n\
             ----     {:<width$}    --------\n\
             fresh    {path:<width$}    True\n",
            "PATH", "----"
        ),
        "",
        0,
    );
    assert_eq!(
        fs::read_to_string(f.repo("fresh").join(".config")).unwrap(),
        "version: 2\n"
    );
}

#[test]
fn a_configuration_error_is_reported_with_pcoccs_prefix() {
    let Some(f) = Fixture::new() else { return };
    let yaml = f.root().join("dup.yaml");
    f.write_repos_yaml(&yaml, &["r", "r"]);
    f.pcocc(&["--config", yaml.to_str().unwrap(), "image", "repo", "list"])
        .expect_error("Unable to parse configuration file: Duplicate repository: r");
}

#[test]
fn gc_removes_old_scratch_files_and_keeps_fresh_and_used_things() {
    let Some(f) = Fixture::standard() else { return };
    let base = f.store_layer("user", &f.base_layer());
    let orphan = f.store_layer("user", &f.overlay(&base, "orphan", "512M"));
    let tmp = f.repo("user").join(".tmp");
    let (old, fresh) = (tmp.join("tmpold"), tmp.join("tmpfresh"));
    fs::write(&old, b"abandoned").unwrap();
    fs::write(&fresh, b"in progress").unwrap();
    fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    f.pcocc(&["image", "repo", "gc", "user"]).expect("", "", 0);
    assert!(!old.exists());
    assert!(
        fresh.exists(),
        "a scratch file younger than an hour may be an import"
    );
    assert!(
        f.layer_path("user", &orphan).exists(),
        "a layer added just now may be an import"
    );
    f.pcocc(&["image", "show", "img1"]).expect(SHOW_IMG1, "", 0);
}

#[test]
fn gc_without_grace_removes_every_unused_layer_and_scratch_file() {
    let Some(f) = Fixture::standard() else { return };
    let base = f.store_layer("user", &f.base_layer());
    let orphan = f.store_layer("user", &f.overlay(&base, "orphan", "512M"));
    let scratch = f.repo("user").join(".tmp/tmpx");
    fs::write(&scratch, b"abandoned").unwrap();
    let run = f.pcocc(&["-v", "image", "repo", "gc", "--grace", "0", "user"]);
    assert_eq!((run.stdout.as_str(), run.code), ("", 0), "{run:?}");
    assert!(
        run.stderr.contains(&orphan),
        "removals are logged with -v: {run:?}"
    );
    assert!(!f.layer_path("user", &orphan).exists());
    assert!(!f.repo("user").join("data").join(&orphan[..2]).exists() || orphan[..2] == base[..2]);
    assert!(!scratch.exists());
    f.pcocc(&["image", "show", "img1"]).expect(SHOW_IMG1, "", 0);
    f.pcocc(&["image", "list"])
        .expect(&format!("{LIST_USER_ALL}{LIST_GLOBAL_ALL}"), "", 0);
}

#[test]
fn gc_without_a_repository_is_a_usage_error() {
    let Some(f) = Fixture::new() else { return };
    f.pcocc(&["image", "repo", "gc"]).expect(
        "",
        "Usage: pcocc image repo gc [OPTIONS] REPO\n\
         Try 'pcocc image repo gc --help' for help.\n\
         \n\
         Error: Missing argument 'REPO'.\n",
        2,
    );
}

#[test]
fn gc_of_an_unknown_repository_fails() {
    let Some(f) = Fixture::new() else { return };
    f.pcocc(&["image", "repo", "gc", "nosuch"])
        .expect_error("Unknown repository nosuch");
}

// ---------------------------------------------------------------- usage

#[test]
fn usage_errors_exit_2_with_clicks_layout() {
    let Some(f) = Fixture::new() else { return };
    f.pcocc(&["image", "frobnicate"]).expect(
        "",
        "Usage: pcocc image [OPTIONS] COMMAND [ARGS]...\n\
         Try 'pcocc image --help' for help.\n\
         \n\
         Error: No such command 'frobnicate'.\n",
        2,
    );
    f.pcocc(&["image", "show", "a", "b"]).expect(
        "",
        "Usage: pcocc image show [OPTIONS] IMAGE\n\
         Try 'pcocc image show --help' for help.\n\
         \n\
         Error: Got unexpected extra argument (b)\n",
        2,
    );
    f.pcocc(&["image", "list", "--foo"]).expect(
        "",
        "Usage: pcocc image list [OPTIONS] [REGEX]\n\
         Try 'pcocc image list --help' for help.\n\
         \n\
         Error: No such option '--foo'.\n",
        2,
    );
}

#[test]
fn pcocc_alone_prints_its_help_and_exits_2_and_help_exits_0() {
    let Some(f) = Fixture::new() else { return };
    let help = f.pcocc(&["--help"]);
    assert_eq!((help.stderr.as_str(), help.code), ("", 0), "{help:?}");
    assert!(
        help.stdout
            .starts_with("Usage: pcocc [OPTIONS] COMMAND [ARGS]...\n"),
        "{help:?}"
    );
    assert!(
        help.stdout
            .ends_with("Commands:\n  image  List and manage images\n"),
        "{help:?}"
    );
    f.pcocc(&[]).expect("", &help.stdout, 2);
    f.pcocc(&["imag", "list"]).expect(
        "",
        "Usage: pcocc [OPTIONS] COMMAND [ARGS]...\n\
         Try 'pcocc --help' for help.\n\
         \n\
         Error: No such command 'imag'. Did you mean 'image'?\n",
        2,
    );
}

#[test]
fn import_and_export_help_keeps_pcoccs_options_and_accepts_the_old_kind() {
    let Some(f) = Fixture::new() else { return };
    for (command, what) in [("import", "source"), ("export", "destination")] {
        let run = f.pcocc(&["image", command, "--help"]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            run.stdout.starts_with(&format!(
                "Usage: pcocc image {command} [OPTIONS] [KIND] SOURCE DEST\n"
            )),
            "{run:?}"
        );
        assert!(
            run.stdout.ends_with(&format!(
                "Options:\n  -t, --fmt TEXT  Force {what} image format\n  \
                 -h, --help      Show this message and exit.\n"
            )),
            "{run:?}"
        );
        let run = f.pcocc(&["image", command, "a"]);
        assert_eq!(run.code, 2, "{run:?}");
        assert!(
            run.stderr.ends_with("Error: Missing argument 'DEST'.\n"),
            "{run:?}"
        );
    }
}

const IMAGE_HELP_HEAD: &str = "\
Usage: pcocc image [OPTIONS] COMMAND [ARGS]...

  List and manage images

Options:
  -h, --help  Show this message and exit.

Commands:
";

#[test]
fn a_group_without_a_command_prints_its_help_and_exits_2() {
    let Some(f) = Fixture::new() else { return };
    let run = f.pcocc(&["image"]);
    assert_eq!((run.stdout.as_str(), run.code), ("", 2), "{run:?}");
    assert!(run.stderr.starts_with(IMAGE_HELP_HEAD), "{run:?}");
}

#[test]
fn both_binaries_print_their_version_with_version() {
    let version = env!("CARGO_PKG_VERSION");
    for (bin, name) in [
        (env!("CARGO_BIN_EXE_pcocc"), "pcocc"),
        (env!("CARGO_BIN_EXE_pcocc-imagefs"), "pcocc-imagefs"),
    ] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert_eq!(
            (
                String::from_utf8_lossy(&out.stdout).as_ref(),
                String::from_utf8_lossy(&out.stderr).as_ref(),
                out.status.code()
            ),
            (format!("{name} {version}\n").as_str(), "", Some(0)),
            "{name} --version"
        );
    }
    // pcocc's options stay as they were: no short form, and `image` has no version.
    for args in [&["-V"][..], &["image", "--version"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_pcocc"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "pcocc {args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Error: No such option"),
            "pcocc {args:?}: {out:?}"
        );
    }
}

#[test]
fn help_texts_keep_pcoccs_layout() {
    let Some(f) = Fixture::new() else { return };
    let run = f.pcocc(&["image", "--help"]);
    run.expect(
        &format!(
            "{IMAGE_HELP_HEAD}  copy    Copy an image from one repository to another\n  \
             delete  Delete an image from a repository\n  \
             export  Export an image from a repository\n  \
             import  Import an image to a repository\n  \
             list    List images in repositories\n  \
             repo    List and manage image repositories\n  \
             resize  Resize an image in a repository\n  \
             show    Show details for an image\n"
        ),
        "",
        0,
    );
    f.pcocc(&["image", "repo", "--help"]).expect(
        "\
Usage: pcocc image repo [OPTIONS] COMMAND [ARGS]...

  List and manage image repositories

Options:
  -h, --help  Show this message and exit.

Commands:
  gc    Cleanup unnecessary data in a repository
  list  List pcocc image repositories
",
        "",
        0,
    );
    let run = f.pcocc(&["image", "list", "-h"]);
    assert!(
        run.stdout.starts_with(
            "Usage: pcocc image list [OPTIONS] [REGEX]\n\n  List images in configured repositories.\n\n  \
             If REGEX is provided, only images whose name match the provided regular\n  \
             expression are shown."
        ),
        "{run:?}"
    );
    assert!(
        run.stdout.ends_with(
            "Options:\n  -R, --repo TEXT  Restrict image list to a repository\n  \
             -h, --help       Show this message and exit.\n"
        ),
        "{run:?}"
    );
    let run = f.pcocc(&["image", "delete", "--help"]);
    assert!(
        run.stdout
            .contains("(pcocc looked in the default repository only)"),
        "{run:?}"
    );
    let run = f.pcocc(&["image", "show", "--help"]);
    assert!(run.stdout.contains("in revision order"), "{run:?}");
    // pcocc's text, then what differs.
    let run = f.pcocc(&["image", "resize", "--help"]);
    assert!(
        run.stdout.starts_with(
            "Usage: pcocc image resize [OPTIONS] IMAGE NEW_SZ\n\n  Resize an image in a \
             repository\n\n  Images in repositories are specified with URIs of the form\n  \
             [REPO:]IMAGE[@REVISION]\n\n  A new image revision is created with the new image \
             size.\n"
        ),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("(pcocc overwrote the one after it)"),
        "{run:?}"
    );
}

#[test]
fn colours_appear_on_a_terminal_only() {
    let Some(f) = Fixture::standard() else { return };
    if Command::new("script").arg("--version").output().is_err() {
        common::skip("script (util-linux) is not installed");
        return;
    }
    // `script` runs the commands on a pseudo-terminal; both streams come back on stdout.
    let bin = env!("CARGO_BIN_EXE_pcocc");
    let commands = format!(
        "'{bin}' image list -R global; '{bin}' image show nosuch; '{bin}' image copy img1 global:img1"
    );
    let run = f.run_with_env("script", &["-qec", &commands, "/dev/null"]);
    let expected = [
        "\x1b[34m\x1b[1mGlobal images:\x1b[0m\r\n",
        "\x1b[31mObject nosuch not found in configured repositories\x1b[0m\r\n",
        "\x1b[35mWarning: an image with name img1 already exists in another repo (user)\x1b[0m\r\n",
        "\x1b[32mImage successufly copied\x1b[0m\r\n",
    ];
    for text in expected {
        assert!(run.stdout.contains(text), "{text:?} missing: {run:?}");
    }
    let plain = f.run_with_env(
        "script",
        &[
            "-qec",
            &format!("NO_COLOR=1 '{bin}' image list -R global"),
            "/dev/null",
        ],
    );
    assert!(plain.stdout.starts_with("Global images:\r\n"), "{plain:?}");
    assert!(!plain.stdout.contains('\x1b'), "{plain:?}");
}
