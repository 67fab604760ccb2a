//! `pcocc image import` and `pcocc image export` end to end: the built binary against
//! repositories made in a temporary directory, with qemu-img as the judge of every image
//! that goes in or comes out (`qemu-img compare`, `qemu-img check`, `qemu-img info`), and
//! stdout, stderr and exit codes compared with pcocc's transcripts
//! (`reference/pcocc-behaviour.md` in the project notes) except where pcocc has a bug.
//!
//! Images are small (a few MiB of virtual size, a few KiB of data) except the sparseness
//! test, whose 1 GiB disk is almost all holes. Tests return early where qemu-img is
//! missing.

mod common;
use common::have_qemu;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The formats pcocc imports and exports, as qemu-img names them.
const FORMATS: [&str; 6] = ["raw", "qcow2", "qed", "vdi", "vpc", "vmdk"];
/// pcocc's stdout lines before a transfer.
const COPYING: &str = "Copying image...\n";
const CONVERTING: &str = "Converting image...\n";
/// pcocc's warning (through Python's logging) for a file of unknown content.
const ASSUMING_RAW: &str = "WARNING:root:Could not detect image format, assuming raw VM\n";

/// A scratch directory with repositories `user` (the default) and `global` and a work
/// directory where the commands run.
struct Fixture {
    cli: common::CliScratch,
}

impl std::ops::Deref for Fixture {
    type Target = common::CliScratch;

    fn deref(&self) -> &common::CliScratch {
        &self.cli
    }
}

impl Fixture {
    fn new() -> Option<Fixture> {
        if !have_qemu() {
            return None;
        }
        Some(Fixture {
            cli: common::CliScratch::new(),
        })
    }

    /// A `format` image `name` of 8 MiB (virtual) with three written areas, one of them
    /// across a 64 KiB boundary, the rest unallocated.
    fn source(&self, format: &str, name: &str) -> PathBuf {
        self.tool("qemu-img", &["create", "-q", "-f", format, name, "8M"]);
        for (pattern, offset, len) in [
            ("0x11", "0", "4k"),
            ("0x22", "60k", "8k"),
            ("0x33", "5M", "1M"),
        ] {
            self.tool(
                "qemu-io",
                &[
                    "-f",
                    format,
                    "-c",
                    &format!("write -P {pattern} {offset} {len}"),
                    name,
                ],
            );
        }
        self.work(name)
    }

    /// The metadata file of `name@rev` in `repo`, if any.
    fn meta(&self, repo: &str, name: &str, rev: u64) -> Option<String> {
        fs::read_to_string(self.repo(repo).join("meta").join(format!("{name}@{rev}"))).ok()
    }

    /// The layers `name@0` of `repo` lists, as paths, base first.
    fn layers(&self, repo: &str, name: &str) -> Vec<PathBuf> {
        let meta = self
            .meta(repo, name, 0)
            .unwrap_or_else(|| panic!("{repo}:{name}@0 has no metadata"));
        let blobs = meta
            .split("\"data_blobs\": [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .expect("a data_blobs list");
        blobs
            .split(", ")
            .map(|b| b.trim_matches('"'))
            .map(|h| self.repo(repo).join("data").join(&h[..2]).join(h))
            .collect()
    }

    /// Entries of a repository subdirectory (`.tmp`, `data`, `meta`).
    fn entries(&self, repo: &str, sub: &str) -> Vec<String> {
        match fs::read_dir(self.repo(repo).join(sub)) {
            Ok(dir) => dir
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `qemu-img compare` of two images; true when identical.
    fn identical(&self, a: (&str, &Path), b: (&str, &Path)) -> bool {
        let run = self.run(
            "qemu-img",
            &[
                "compare",
                "-f",
                a.0,
                "-F",
                b.0,
                a.1.to_str().expect("utf-8"),
                b.1.to_str().expect("utf-8"),
            ],
        );
        run.code == 0
    }

    /// The format `qemu-img info` sees in `path` (no `-f`).
    fn probed(&self, path: &Path) -> String {
        let json = self.tool(
            "qemu-img",
            &["info", "--output=json", path.to_str().expect("utf-8")],
        );
        let info: serde_json::Value = serde_json::from_str(&json).expect("qemu-img info JSON");
        info["format"]
            .as_str()
            .expect("a format in qemu-img info")
            .to_string()
    }

    /// Imports a qcow2 source as `user:img` and returns the source's path.
    fn stored_image(&self) -> PathBuf {
        let source = self.source("qcow2", "src.qcow2");
        self.pcocc(&["import", "src.qcow2", "img"]).expect(
            &format!("Storing image in repository 'user' as 'img' ... \n{COPYING}"),
            "",
            0,
        );
        source
    }
}

fn announcement(format: &str) -> &'static str {
    if format == "qcow2" {
        COPYING
    } else {
        CONVERTING
    }
}

fn storing(repo: &str, name: &str) -> String {
    format!("Storing image in repository '{repo}' as '{name}' ... \n")
}

// ---------------------------------------------------------------- import

#[test]
fn every_format_imports_by_suffix_and_by_content_into_a_clean_qcow2_layer() {
    let Some(f) = Fixture::new() else { return };
    for format in FORMATS {
        let source = f.source(format, &format!("src.{format}"));
        let bare = f.work(&format!("bare-{format}"));
        fs::copy(&source, &bare).expect("copy without suffix");
        for (arg, name) in [
            (format!("src.{format}"), format!("{format}-suffix")),
            (format!("bare-{format}"), format!("{format}-content")),
        ] {
            let run = f.pcocc(&["import", &arg, &name]);
            // Raw content cannot be told apart: without a suffix it is assumed, with pcocc's
            // warning.
            let warning = if format == "raw" && !arg.contains('.') {
                ASSUMING_RAW
            } else {
                ""
            };
            run.expect(
                &format!("{}{}", storing("user", &name), announcement(format)),
                warning,
                0,
            );
            let layers = f.layers("user", &name);
            assert_eq!(layers.len(), 1, "{name}");
            let layer = &layers[0];
            f.tool("qemu-img", &["check", "-q", layer.to_str().expect("utf-8")]);
            assert_eq!(f.probed(layer), "qcow2", "{name}");
            assert!(
                f.identical((format, &source), ("qcow2", layer)),
                "{name}: the stored layer differs from the source"
            );
            let mode = fs::metadata(layer).expect("layer").mode() & 0o777;
            assert_eq!(mode, 0o444, "{name}: layers are read-only");
        }
    }
    assert!(f.entries("user", ".tmp").is_empty(), "scratch files left");
}

#[test]
fn import_metadata_is_what_pcocc_writes() {
    let Some(f) = Fixture::new() else { return };
    f.stored_image();
    let meta = f.meta("user", "img", 0).expect("img@0");
    let layer = f.layers("user", "img")[0].clone();
    let hash = layer.file_name().and_then(|n| n.to_str()).expect("hash");
    let prefix = r#"{"name": "img", "revision": 0, "kind": "vm", "owner": ""#;
    assert!(meta.starts_with(prefix), "{meta}");
    let tail = format!(r#", "data_blobs": ["{hash}"], "custom_meta": {{}}}}"#);
    assert!(meta.ends_with(&tail), "{meta}");
    assert!(meta.contains(r#""timestamp": "#), "{meta}");
}

#[test]
fn the_format_can_be_forced_prefixed_or_given_in_any_case() {
    let Some(f) = Fixture::new() else { return };
    f.source("qcow2", "src.qcow2");
    fs::copy(f.work("src.qcow2"), f.work("disk")).expect("copy");
    f.pcocc(&["import", "-t", "qcow2", "disk", "forced"])
        .expect(&format!("{}{COPYING}", storing("user", "forced")), "", 0);
    f.pcocc(&["import", "--fmt", "QCOW2", "disk", "upper"])
        .expect(&format!("{}{COPYING}", storing("user", "upper")), "", 0);
    f.pcocc(&["import", "qcow2:disk", "prefixed"]).expect(
        &format!("{}{COPYING}", storing("user", "prefixed")),
        "",
        0,
    );
    f.pcocc(&["import", "-t", "raw", "RAW:src.qcow2", "x"])
        .expect_error("Mismatch between specified format raw and detected image type qcow2");
    f.pcocc(&["import", "-t", "raw", "qcow2:disk", "x"])
        .expect_error("Mismatch between specified image format raw and import URI prefix qcow2");
}

#[test]
fn the_old_kind_argument_is_accepted_when_it_is_vm() {
    let Some(f) = Fixture::new() else { return };
    f.source("qcow2", "src.qcow2");
    f.pcocc(&["import", "vm", "src.qcow2", "global:kind"])
        .expect(&format!("{}{COPYING}", storing("global", "kind")), "", 0);
    f.pcocc(&["export", "vm", "global:kind", "out.qcow2"])
        .expect(COPYING, "", 0);
    f.pcocc(&["import", "cont", "src.qcow2", "other"]).expect(
        "",
        "Usage: pcocc image import [OPTIONS] [KIND] SOURCE DEST\n\
         Try 'pcocc image import --help' for help.\n\
         \n\
         Error: Invalid value for 'KIND': 'cont' is not 'vm' (only VM images are handled; leave KIND out).\n",
        2,
    );
    f.pcocc(&["import"]).expect(
        "",
        "Usage: pcocc image import [OPTIONS] [KIND] SOURCE DEST\n\
         Try 'pcocc image import --help' for help.\n\
         \n\
         Error: Missing argument 'SOURCE'.\n",
        2,
    );
    assert!(f.meta("user", "other", 0).is_none());
}

#[test]
fn an_empty_repository_or_none_imports_into_the_default_one() {
    let Some(f) = Fixture::new() else { return };
    f.source("qcow2", "src.qcow2");
    f.pcocc(&["import", "src.qcow2", ":colon@7"]).expect(
        &format!("{}{COPYING}", storing("user", "colon")),
        "",
        0,
    );
    assert!(
        f.meta("user", "colon", 0).is_some(),
        "the revision is always 0"
    );
}

#[test]
fn import_refuses_what_pcocc_refuses_before_storing_anything() {
    let Some(f) = Fixture::new() else { return };
    f.stored_image();
    fs::copy(f.work("src.qcow2"), f.work("misnamed.vmdk")).expect("copy");
    f.pcocc(&["import", "src.qcow2", "img"])
        .expect_error("Image img already exists in repo user");
    f.pcocc(&["import", "src.qcow2", "nosuch:x"])
        .expect_error("Unknown repository nosuch");
    f.pcocc(&["import", "src.qcow2", "x@y"])
        .expect_error("Bad revision: y");
    f.pcocc(&["import", "-t", "raw", "src.qcow2", "x"])
        .expect_error("Mismatch between specified format raw and detected image type qcow2");
    f.pcocc(&["import", "misnamed.vmdk", "x"])
        .expect_error("Mismatch between specified format vmdk and detected image type qcow2");
    f.pcocc(&["import", "-t", "iso", "src.qcow2", "x"])
        .expect_error("Mismatch between specified format iso and detected image type qcow2");
    fs::write(f.work("plain"), vec![0u8; 4096]).expect("plain file");
    f.pcocc(&["import", "-t", "iso", "plain", "x"])
        .expect_error("iso is not a valid image format");
    f.pcocc(&["import", "does-not-exist", "x"])
        .expect_error("Could not detect image format");
    let work = f.root().join("work");
    f.pcocc(&["import", work.to_str().expect("utf-8"), "x"])
        .expect_error("Could not detect image format");
    f.pcocc(&["import", "src.qcow2", "bad name"])
        .expect_error("Object name contains invalid characters");
    // Names no metadata file or directory of the mount can carry.
    for name in [".", ".."] {
        f.pcocc(&["import", "src.qcow2", name])
            .expect_error(&format!(
                "Object name {name} is reserved: it names a directory itself"
            ));
        f.pcocc(&["copy", "img", name]).expect(
            "Copying image ...\n",
            &format!("Object name {name} is reserved: it names a directory itself\n"),
            255,
        );
    }
    let long = "x".repeat(251);
    f.pcocc(&["import", "src.qcow2", &long])
        .expect_error("Object name too long: 251 bytes, at most 250 are allowed");
    f.pcocc(&["copy", "img", &long]).expect(
        "Copying image ...\n",
        "Object name too long: 251 bytes, at most 250 are allowed\n",
        255,
    );
    assert!(f.meta("user", "x", 0).is_none());
    assert!(f.entries("user", ".tmp").is_empty());
}

#[test]
fn a_missing_source_with_a_known_suffix_fails_after_the_storing_line() {
    let Some(f) = Fixture::new() else { return };
    f.pcocc(&["import", "does-not-exist.qcow2", "missing"])
        .expect(
            &storing("user", "missing"),
            "Failed to import does-not-exist.qcow2 : not an image file\n",
            255,
        );
    assert!(f.meta("user", "missing", 0).is_none());
}

#[test]
fn a_name_used_in_another_repository_is_warned_about() {
    let Some(f) = Fixture::new() else { return };
    f.stored_image();
    f.pcocc(&["import", "src.qcow2", "global:img"]).expect(
        &format!(
            "Warning: an image with name img already exists in another repo (user)\n{}{COPYING}",
            storing("global", "img")
        ),
        "",
        0,
    );
}

#[test]
fn a_file_of_unknown_content_is_imported_as_raw_with_pcoccs_warning() {
    let Some(f) = Fixture::new() else { return };
    fs::write(f.work("notes.txt"), "some notes, not a disk\n").expect("notes");
    f.pcocc(&["import", "notes.txt", "notes"]).expect(
        &format!("{}{CONVERTING}", storing("user", "notes")),
        ASSUMING_RAW,
        0,
    );
    let layer = &f.layers("user", "notes")[0];
    assert!(f.identical(("raw", &f.work("notes.txt")), ("qcow2", layer)));
    f.pcocc(&["import", "-t", "raw", "notes.txt", "forced"])
        .expect(&format!("{}{CONVERTING}", storing("user", "forced")), "", 0);
}

#[test]
fn formats_qemu_knows_and_pcocc_does_not_list_are_refused_with_pcoccs_message() {
    let Some(f) = Fixture::new() else { return };
    for fmt in common::foreign::FOREIGN_FORMATS {
        let name = format!("disk-{fmt}");
        common::foreign::foreign_image(&f.work(""), fmt, &name);
        // pcocc 0.7.5: the detected format is refused before anything is said or stored,
        // whether given plainly, forced (raw too), or under a known suffix.
        f.pcocc(&["import", &name, "img"])
            .expect_error(&format!("{fmt} is not a valid image format"));
        for forced in ["raw", "qcow2"] {
            f.pcocc(&["import", "-t", forced, &name, "img"])
                .expect_error(&format!(
                    "Mismatch between specified format {forced} and detected image type {fmt}"
                ));
        }
        let suffixed = format!("{name}.qcow2");
        fs::copy(f.work(&name), f.work(&suffixed)).expect("copy");
        f.pcocc(&["import", &suffixed, "img"])
            .expect_error(&format!(
                "Mismatch between specified format qcow2 and detected image type {fmt}"
            ));
        // An export never overwrites such a file.
        let before = fs::read(f.work(&name)).expect("fixture");
        f.pcocc(&["export", "nosuch", &name])
            .expect_error("Object nosuch not found in configured repositories");
        assert_eq!(fs::read(f.work(&name)).expect("fixture"), before);
    }
    assert!(f.meta("user", "img", 0).is_none());
    assert!(f.entries("user", "data").is_empty(), "layers left");
    f.stored_image();
    f.pcocc(&["export", "img", "disk-vhdx"])
        .expect_error("vhdx is not a valid image format");
    f.pcocc(&["export", "-t", "qcow2", "img", "disk-vhdx"])
        .expect_error("Mismatch between specified format qcow2 and detected image type vhdx");
}

#[test]
fn a_tilde_in_the_source_or_the_destination_is_the_home_directory() {
    // pcocc 0.7.5 expands `~` after splitting a format prefix off, for both commands.
    let Some(f) = Fixture::new() else { return };
    let home = f.root().join("home");
    let source = f.source("qcow2", "src.qcow2");
    fs::copy(&source, home.join("h.qcow2")).expect("copy to the home");
    f.pcocc(&["import", "~/h.qcow2", "t1"]).expect(
        &format!("{}{COPYING}", storing("user", "t1")),
        "",
        0,
    );
    f.pcocc(&["import", "qcow2:~/h.qcow2", "t2"]).expect(
        &format!("{}{COPYING}", storing("user", "t2")),
        "",
        0,
    );
    f.pcocc(&["export", "t1", "~/o.raw"])
        .expect(CONVERTING, "", 0);
    f.pcocc(&["export", "t1", "vmdk:~/o2"])
        .expect(CONVERTING, "", 0);
    assert!(f.identical(("qcow2", &source), ("raw", &home.join("o.raw"))));
    assert!(f.identical(("qcow2", &source), ("vmdk", &home.join("o2"))));
    assert!(!f.work("~").exists());
}

/// Asserts that `name@0` of `user` is one standalone layer (no backing file, `qemu-img
/// check` clean) holding the same disk as `source` read as `format`.
#[track_caller]
fn assert_flattened(f: &Fixture, name: &str, format: &str, source: &Path) {
    let layers = f.layers("user", name);
    assert_eq!(layers.len(), 1, "{name}: one layer");
    let json = f.tool(
        "qemu-img",
        &["info", "--output=json", layers[0].to_str().expect("utf-8")],
    );
    assert!(!json.contains("backing-filename"), "{name}: {json}");
    f.tool(
        "qemu-img",
        &[
            "check",
            "-q",
            "-f",
            "qcow2",
            layers[0].to_str().expect("utf-8"),
        ],
    );
    assert!(
        f.identical((format, source), ("qcow2", &layers[0])),
        "{name}: the stored layer differs from the source"
    );
}

/// Asserts that `pcocc image import SOURCE NAME` fails (exit 255) with a message holding
/// every one of `needles`, leaving no image and no scratch file.
#[track_caller]
fn assert_import_fails(f: &Fixture, source: &str, name: &str, needles: &[&str]) {
    let run = f.pcocc(&["import", source, name]);
    assert_eq!(run.code, 255, "{run:?}");
    assert!(
        needles.iter().all(|n| run.stderr.contains(n)),
        "{needles:?}: {run:?}"
    );
    assert!(f.meta("user", name, 0).is_none(), "{name} stored");
    assert!(f.entries("user", ".tmp").is_empty(), "scratch files left");
}

#[test]
fn a_qcow2_with_a_backing_chain_is_imported_flattened_as_pcocc_does() {
    // pcocc 0.7.5 (qemu-img convert) flattens the chain into one standalone layer and
    // says "Copying image..." for a qcow2 whatever its chain.
    let Some(f) = Fixture::new() else { return };
    fs::create_dir_all(f.work("chain/base")).expect("dirs");
    let base = f.source("qcow2", "chain/base/base.qcow2");
    let _ = base;
    // mid names its backing file relative to its own directory, top by absolute path
    // (with a raw base under a second chain, below).
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base/base.qcow2",
            "-F",
            "qcow2",
            "chain/mid.qcow2",
        ],
    );
    f.tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1M 2M",
            "chain/mid.qcow2",
        ],
    );
    let mid = f.work("chain/mid.qcow2");
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            mid.to_str().unwrap(),
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    f.tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 5M 64k",
            "-c",
            "write -P 0x55 7M 4k",
            "top.qcow2",
        ],
    );
    f.pcocc(&["import", "top.qcow2", "chained"]).expect(
        &format!("{}{COPYING}", storing("user", "chained")),
        "",
        0,
    );
    assert_flattened(&f, "chained", "qcow2", &f.work("top.qcow2"));
    // Imported from another directory: names are relative to the image's directory.
    f.pcocc(&["import", "chain/mid.qcow2", "mid"]).expect(
        &format!("{}{COPYING}", storing("user", "mid")),
        "",
        0,
    );
    assert_flattened(&f, "mid", "qcow2", &mid);
    // A raw backing file, and an overlay larger than it.
    f.tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", "chain/base.raw", "4M"],
    );
    f.tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 0 1M", "chain/base.raw"],
    );
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "chain/big.qcow2",
            "16M",
        ],
    );
    f.tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 12M 1M",
            "chain/big.qcow2",
        ],
    );
    f.pcocc(&["import", "chain/big.qcow2", "big"]).expect(
        &format!("{}{COPYING}", storing("user", "big")),
        "",
        0,
    );
    assert_flattened(&f, "big", "qcow2", &f.work("chain/big.qcow2"));
    // Backing files of the other formats qemu reads, as qemu-img convert follows them.
    for format in ["qed", "vdi", "vpc", "vmdk"] {
        let base = format!("chain/base.{format}");
        let over = format!("chain/over-{format}.qcow2");
        f.tool("qemu-img", &["create", "-q", "-f", format, &base, "4M"]);
        f.tool(
            "qemu-io",
            &["-f", format, "-c", "write -P 0x68 64k 1M", &base],
        );
        let name = base.trim_start_matches("chain/");
        f.tool(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", name, "-F", format, &over,
            ],
        );
        f.tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x69 1M 64k", &over],
        );
        let image = format!("over-{format}");
        f.pcocc(&["import", &over, &image]).expect(
            &format!("{}{COPYING}", storing("user", &image)),
            "",
            0,
        );
        assert_flattened(&f, &image, "qcow2", &f.work(&over));
    }
    // A missing backing file fails naming it, leaving nothing.
    fs::rename(f.work("chain/base.raw"), f.work("chain/gone.raw")).expect("rename");
    assert_import_fails(&f, "chain/big.qcow2", "broken", &["base.raw"]);
}

#[test]
fn qed_and_vmdk_overlays_are_imported_flattened_as_pcocc_does() {
    // pcocc 0.7.5 (qemu-img convert) follows a QED backing file and a VMDK parent disk
    // like a qcow2 backing file, into one standalone layer.
    let Some(f) = Fixture::new() else { return };
    fs::create_dir_all(f.work("ov")).expect("dirs");
    let io = |fmt: &str, file: &str, cmd: &str| f.tool("qemu-io", &["-f", fmt, "-c", cmd, file]);
    let overlay = |fmt: &str, backing: &str, backing_fmt: &str, file: &str| {
        f.tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                fmt,
                "-b",
                backing,
                "-F",
                backing_fmt,
                file,
            ],
        )
    };
    let import = |source: &str, name: &str, format: &str| {
        f.pcocc(&["import", source, name]).expect(
            &format!("{}{}", storing("user", name), announcement(format)),
            "",
            0,
        );
        assert_flattened(&f, name, format, &f.work(source));
    };
    // QED over qcow2 (its backing format probed), QED over raw (not probed), and a qcow2
    // over the first QED: each layer's writes partly hide the one below.
    f.tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "ov/base.qcow2", "8M"],
    );
    io("qcow2", "ov/base.qcow2", "write -P 0x11 0 3M");
    overlay("qed", "base.qcow2", "qcow2", "ov/mid.qed");
    io("qed", "ov/mid.qed", "write -P 0x12 1M 1M");
    io("qed", "ov/mid.qed", "write -z 2M 64k");
    import("ov/mid.qed", "qed-over-qcow2", "qed");
    f.tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", "ov/base.raw", "4M"],
    );
    io("raw", "ov/base.raw", "write -P 0x13 0 2M");
    overlay("qed", "base.raw", "raw", "ov/raw-under.qed");
    io("qed", "ov/raw-under.qed", "write -P 0x14 1M 64k");
    import("ov/raw-under.qed", "qed-over-raw", "qed");
    overlay("qcow2", "mid.qed", "qed", "ov/top.qcow2");
    io("qcow2", "ov/top.qcow2", "write -P 0x15 2M 4k");
    import("ov/top.qcow2", "qcow2-over-qed", "qcow2");
    // A VMDK snapshot of a VMDK snapshot (monolithicSparse, parent named in the embedded
    // descriptor with its CID).
    f.tool(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", "ov/disk.vmdk", "8M"],
    );
    io("vmdk", "ov/disk.vmdk", "write -P 0x21 0 4M");
    overlay("vmdk", "disk.vmdk", "vmdk", "ov/snap1.vmdk");
    io("vmdk", "ov/snap1.vmdk", "write -P 0x22 1M 1M");
    overlay("vmdk", "snap1.vmdk", "vmdk", "ov/snap2.vmdk");
    io("vmdk", "ov/snap2.vmdk", "write -P 0x23 3M 64k");
    import("ov/snap1.vmdk", "snap1", "vmdk");
    import("ov/snap2.vmdk", "snap2", "vmdk");
    // A parent disk changed after the snapshot (another CID) is refused, as qemu refuses
    // to read through it, naming both files; nothing is stored.
    let parent = f.work("ov/disk.vmdk");
    let mut bytes = fs::read(&parent).expect("parent");
    let at = bytes
        .windows(5)
        .position(|w| w == b"\nCID=")
        .expect("the parent's CID")
        + 5;
    // qemu writes the CID in hex without leading zeroes: its last digit is changed in
    // place, so the descriptor keeps its length.
    let digits = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .expect("the CID's line");
    let last = &mut bytes[at + digits - 1];
    *last = if *last == b'0' { b'1' } else { b'0' };
    let stale = std::str::from_utf8(&bytes[at..at + digits]).expect("a hex CID");
    let stale = format!("{:08x}", u32::from_str_radix(stale, 16).expect("a hex CID"));
    fs::write(&parent, &bytes).expect("parent");
    assert_import_fails(
        &f,
        "ov/snap1.vmdk",
        "stale",
        &["snap1.vmdk", "disk.vmdk", &stale, "parentCID"],
    );
    // A QED that names itself as its backing file is a loop, refused as such.
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-u",
            "-b",
            "self.qed",
            "-F",
            "qed",
            "ov/tmp.qed",
            "8M",
        ],
    );
    fs::rename(f.work("ov/tmp.qed"), f.work("ov/self.qed")).expect("rename");
    assert_import_fails(&f, "ov/self.qed", "looped", &["loops"]);
}

#[test]
fn a_qcow2_with_an_external_data_file_is_imported_flattened_as_pcocc_does() {
    // pcocc 0.7.5 (qemu-img convert) reads the guest clusters from the data file the
    // image names and stores a standalone layer. A relative name is found in the
    // image's directory, as a backing file's is (qemu looks in its working directory,
    // so pcocc imports such an image only from there).
    let Some(f) = Fixture::new() else { return };
    fs::create_dir_all(f.work("ext")).expect("dirs");
    let in_ext = |cmd: String| f.tool("sh", &["-c", &format!("cd ext && {cmd}")]);
    for (name, options) in [
        ("plain", "data_file=plain.data"),
        ("raw", "data_file=raw.data,data_file_raw=on"),
    ] {
        in_ext(format!(
            "qemu-img create -q -f qcow2 -o {options} {name}.qcow2 8M"
        ));
        for cmd in [
            "write -P 0x31 0 1M",
            "write -z 2M 64k",
            "write -P 0x32 5M 192k",
        ] {
            in_ext(format!("qemu-io -f qcow2 -c '{cmd}' {name}.qcow2"));
        }
        // The disk as qemu reads it, to compare the layer with.
        in_ext(format!("qemu-img convert -O raw {name}.qcow2 {name}.raw"));
        let image = format!("ext/{name}.qcow2");
        f.pcocc(&["import", &image, name]).expect(
            &format!("{}{COPYING}", storing("user", name)),
            "",
            0,
        );
        assert_flattened(&f, name, "raw", &f.work(&format!("ext/{name}.raw")));
    }
    // A missing data file fails naming it; nothing is stored.
    fs::remove_file(f.work("ext/plain.data")).expect("rm");
    assert_import_fails(&f, "ext/plain.qcow2", "gone", &["plain.data"]);
}

#[test]
fn multi_file_vmdks_are_imported_flattened_as_pcocc_does() {
    let Some(f) = Fixture::new() else { return };
    let write = |fmt: &str, file: &str, cmds: &[&str]| {
        for c in cmds {
            f.tool("qemu-io", &["-f", fmt, "-c", c, file]);
        }
    };
    // monolithicFlat: a descriptor and one raw extent.
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "flat.vmdk",
            "8M",
        ],
    );
    write(
        "vmdk",
        "flat.vmdk",
        &["write -P 0x11 0 64k", "write -P 0x12 7M 1M"],
    );
    // twoGbMaxExtentSparse: three sparse extents, data in each and across the first
    // boundary.
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "split.vmdk",
            "5G",
        ],
    );
    write(
        "vmdk",
        "split.vmdk",
        &[
            "write -P 0x21 0 64k",
            "write -P 0x22 2047M 2M",
            "write -P 0x23 4500M 1M",
        ],
    );
    // Hand-written: ESXi's VMFS extent, two FLAT extents with offsets, in a subdirectory
    // with the descriptor imported from elsewhere.
    fs::create_dir_all(f.work("esx")).expect("dir");
    f.tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", "esx/disk-flat.vmdk", "4M"],
    );
    write(
        "raw",
        "esx/disk-flat.vmdk",
        &["write -P 0x31 0 1M", "write -P 0x32 3M 1M"],
    );
    fs::write(
        f.work("esx/disk.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"vmfs\"\n\n# Extent description\nRW 8192 VMFS \"disk-flat.vmdk\"\n\n\
         ddb.adapterType = \"lsilogic\"\n",
    )
    .expect("descriptor");
    fs::write(
        f.work("esx/parts.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentFlat\"\nRW 2048 FLAT \"disk-flat.vmdk\" 4096\n\
         RW 4096 FLAT \"disk-flat.vmdk\" 0\n",
    )
    .expect("descriptor");
    for (source, name) in [
        ("flat.vmdk", "flat"),
        ("split.vmdk", "split"),
        ("esx/disk.vmdk", "esx"),
        ("esx/parts.vmdk", "parts"),
    ] {
        f.pcocc(&["import", source, name]).expect(
            &format!("{}{CONVERTING}", storing("user", name)),
            "",
            0,
        );
        assert_flattened(&f, name, "vmdk", &f.work(source));
    }
    // A snapshot of the split disk (a descriptor naming its parent and its own sparse
    // extents) is read through to its parent, as qemu reads it.
    f.tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "-b",
            "split.vmdk",
            "-F",
            "vmdk",
            "split-snap.vmdk",
        ],
    );
    write(
        "vmdk",
        "split-snap.vmdk",
        &["write -P 0x24 2046M 4M", "write -z 0 32k"],
    );
    f.pcocc(&["import", "split-snap.vmdk", "split-snap"])
        .expect(
            &format!("{}{CONVERTING}", storing("user", "split-snap")),
            "",
            0,
        );
    assert_flattened(&f, "split-snap", "vmdk", &f.work("split-snap.vmdk"));
    // One whose delta file is missing fails naming it, nothing stored.
    fs::write(
        f.work("esx/child.vmdk"),
        "version=1\nCID=12345678\nparentCID=fffffffe\nparentFileNameHint=\"disk.vmdk\"\n\
         RW 8192 SPARSE \"child-delta.vmdk\"\n",
    )
    .expect("descriptor");
    assert_import_fails(&f, "esx/child.vmdk", "child", &["child-delta.vmdk"]);
}

#[test]
fn a_text_file_named_qcow2_fails_cleanly_naming_the_file() {
    let Some(f) = Fixture::new() else { return };
    fs::write(f.work("fake.qcow2"), "this is not a qcow2 image at all\n").expect("fake");
    let run = f.pcocc(&["import", "fake.qcow2", "fakeimg"]);
    assert_eq!(
        run.stdout,
        format!("{}{COPYING}", storing("user", "fakeimg")),
        "{run:?}"
    );
    assert_eq!(run.code, 255, "{run:?}");
    assert!(run.stderr.contains("fake.qcow2"), "{run:?}");
    assert!(!run.stderr.contains("Traceback") && !run.stderr.contains("panicked"));
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(f.meta("user", "fakeimg", 0).is_none());
    assert!(f.entries("user", ".tmp").is_empty(), "scratch files left");
    assert!(f.entries("user", "data").is_empty(), "layers left");
}

#[test]
fn a_truncated_image_fails_cleanly() {
    let Some(f) = Fixture::new() else { return };
    let source = f.source("vmdk", "whole.vmdk");
    let bytes = fs::read(&source).expect("vmdk");
    fs::write(f.work("cut.vmdk"), &bytes[..bytes.len() / 3]).expect("truncated");
    assert_import_fails(&f, "cut.vmdk", "cut", &["cut.vmdk"]);
}

// ---------------------------------------------------------------- export

#[test]
fn every_format_exports_identical_to_the_source() {
    let Some(f) = Fixture::new() else { return };
    let source = f.stored_image();
    for format in FORMATS {
        let out = f.work(&format!("out.{format}"));
        f.pcocc(&["export", "img", out.to_str().expect("utf-8")])
            .expect(announcement(format), "", 0);
        if format != "raw" {
            assert_eq!(f.probed(&out), format);
        }
        // qemu-img check knows these four; raw and vpc have nothing to check.
        if ["qcow2", "qed", "vdi", "vmdk"].contains(&format) {
            f.tool(
                "qemu-img",
                &["check", "-q", "-f", format, out.to_str().expect("utf-8")],
            );
        }
        assert!(
            f.identical(("qcow2", &source), (format, &out)),
            "export to {format} differs from the source"
        );
    }
}

#[test]
fn export_formats_come_from_the_option_the_prefix_or_default_to_raw() {
    let Some(f) = Fixture::new() else { return };
    let source = f.stored_image();
    f.pcocc(&["export", "-t", "vdi", "img", "forced"])
        .expect(CONVERTING, "", 0);
    assert_eq!(f.probed(&f.work("forced")), "vdi");
    f.pcocc(&["export", "img", "QCOW2:prefixed"])
        .expect(COPYING, "", 0);
    assert_eq!(f.probed(&f.work("prefixed")), "qcow2");
    f.pcocc(&["export", "user:img@0", "noext"])
        .expect(CONVERTING, "", 0);
    assert!(f.identical(("qcow2", &source), ("raw", &f.work("noext"))));
    f.pcocc(&["export", "-t", "raw", "img", "qcow2:x"])
        .expect_error("Mismatch between specified image format raw and import URI prefix qcow2");
    f.pcocc(&["export", "-t", "iso", "img", "out.iso"])
        .expect_error("iso is not a valid image format");
    f.pcocc(&["export", "nosuch", "out.raw"])
        .expect_error("Object nosuch not found in configured repositories");
    assert!(!f.work("out.raw").exists() && !f.work("out.iso").exists());
}

#[test]
fn export_keeps_holes_as_holes() {
    let Some(f) = Fixture::new() else { return };
    // 1 GiB of virtual disk with 2 MiB written in the middle, 3 MiB apart: a sparse
    // raw source whose short gap is zeroes a view may read as data.
    f.tool("truncate", &["-s", "1G", "sparse.raw"]);
    f.tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x7e 512M 1M",
            "-c",
            "write -P 0x7f 516M 1M",
            "sparse.raw",
        ],
    );
    f.pcocc(&["import", "sparse.raw", "sparse"]).expect(
        &format!("{}{CONVERTING}", storing("user", "sparse")),
        "",
        0,
    );
    for format in ["raw", "qcow2", "vmdk", "vdi", "vpc"] {
        let name = format!("back.{format}");
        f.pcocc(&["export", "sparse", &name])
            .expect(announcement(format), "", 0);
        let out = f.work(&name);
        let meta = fs::metadata(&out).expect("exported file");
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < 3 << 20,
            "{name}: {allocated} bytes allocated for 2 MiB of data"
        );
        assert!(f.identical(("raw", &f.work("sparse.raw")), (format, &out)));
    }
    assert_eq!(
        fs::metadata(f.work("back.raw")).expect("raw").len(),
        1 << 30
    );
}

#[test]
fn export_replaces_a_file_of_its_format_and_refuses_another() {
    let Some(f) = Fixture::new() else { return };
    let source = f.stored_image();
    fs::write(f.work("again.qcow2"), "old content").expect("old file");
    // Unknown content does not contradict: the file is replaced.
    f.pcocc(&["export", "img", "again.qcow2"])
        .expect(COPYING, "", 0);
    f.pcocc(&["export", "img", "again.qcow2"])
        .expect(COPYING, "", 0);
    assert!(f.identical(("qcow2", &source), ("qcow2", &f.work("again.qcow2"))));
    fs::copy(&source, f.work("existing.raw")).expect("a qcow2 named .raw");
    let before = fs::read(f.work("existing.raw")).expect("before");
    f.pcocc(&["export", "img", "existing.raw"])
        .expect_error("Mismatch between specified format raw and detected image type qcow2");
    assert_eq!(fs::read(f.work("existing.raw")).expect("after"), before);
}

#[test]
fn export_into_a_missing_directory_fails_naming_the_path() {
    let Some(f) = Fixture::new() else { return };
    f.stored_image();
    let run = f.pcocc(&["export", "img", "nodir/x.qcow2"]);
    assert_eq!((run.stdout.as_str(), run.code), (COPYING, 255), "{run:?}");
    assert!(run.stderr.contains("nodir/x.qcow2"), "{run:?}");
    assert!(!f.root().join("work/nodir").exists());
}

#[test]
fn a_terminal_gets_a_progress_bar_and_a_pipe_does_not() {
    let Some(f) = Fixture::new() else { return };
    f.stored_image();
    // script(1) runs the command on a pseudo-terminal; without it, only the pipe case.
    let have_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_script {
        let command = format!("{} image export img tty.raw", env!("CARGO_BIN_EXE_pcocc"));
        let run = f.run("script", &["-qec", &command, "/dev/null"]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains("Converting image..."), "{run:?}");
        assert!(run.stdout.contains("\r["), "{run:?}");
        assert!(run.stdout.contains("] 100% 8.0 MiB/8.0 MiB\r\n"), "{run:?}");
    } else {
        common::skip("the terminal half needs script(1) (util-linux)");
    }
    f.pcocc(&["export", "img", "pipe.raw"])
        .expect(CONVERTING, "", 0);
}
