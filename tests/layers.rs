//! `pcocc image resize` end to end: the built binary against repositories made in a
//! temporary directory. The new revision's metadata and top layer are checked field by
//! field against what pcocc 0.7.5 writes (a qcow2 v3 layer whose backing file is the
//! relative `../../data/XX/<parent top>`, format qcow2, mode 0444, named by its sha256;
//! metadata = the parent's layers plus the new one), and qemu-img judges the layers and
//! the exported disks. Output and errors are pcocc's, except its tracebacks.

mod common;
use common::have_qemu;
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// pcocc's stdout of an import of a qcow2 file as `user:img`.
const IMPORTED: &str = "Storing image in repository 'user' as 'img' ... \nCopying image...\n";

/// Repositories `user` (default) and `global`, a work directory, and `user:img@0`
/// imported from an 8 MiB qcow2 with data in its first 64 KiB and at 5 MiB.
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
        let f = Fixture {
            cli: common::CliScratch::new(),
        };
        f.tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "src.qcow2", "8M"],
        );
        for (pattern, at, len) in [("0x11", "0", "64k"), ("0x33", "5M", "1M")] {
            let cmd = format!("write -P {pattern} {at} {len}");
            f.tool("qemu-io", &["-f", "qcow2", "-c", &cmd, "src.qcow2"]);
        }
        f.pcocc(&["import", "src.qcow2", "img"])
            .expect(IMPORTED, "", 0);
        Some(f)
    }

    /// The metadata of `repo:name@rev`, parsed, and its text.
    #[track_caller]
    fn meta(&self, repo: &str, name: &str, rev: u64) -> (serde_json::Value, String) {
        let path = self.repo(repo).join("meta").join(format!("{name}@{rev}"));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        (serde_json::from_str(&text).expect("metadata JSON"), text)
    }

    fn blobs(&self, repo: &str, name: &str, rev: u64) -> Vec<String> {
        let (meta, _) = self.meta(repo, name, rev);
        meta["data_blobs"]
            .as_array()
            .expect("data_blobs")
            .iter()
            .map(|b| b.as_str().expect("a string").to_string())
            .collect()
    }

    fn layer(&self, repo: &str, hash: &str) -> PathBuf {
        self.repo(repo).join("data").join(&hash[..2]).join(hash)
    }

    fn meta_files(&self, repo: &str) -> Vec<String> {
        common::sorted_names(&self.repo(repo).join("meta"))
    }

    /// `qemu-img info --output=json` of a file.
    fn info(&self, path: &Path) -> serde_json::Value {
        let json = self.tool(
            "qemu-img",
            &["info", "--output=json", path.to_str().unwrap()],
        );
        serde_json::from_str(&json).expect("qemu-img info JSON")
    }

    /// Exports `uri` to raw with the CLI; returns the file.
    fn export_raw(&self, uri: &str, name: &str) -> PathBuf {
        self.pcocc(&["export", uri, name])
            .expect("Converting image...\n", "", 0);
        self.work(name)
    }

    /// A raw copy of `src` cut or extended (with zeroes) to `size` bytes.
    fn resized_copy(&self, src: &Path, name: &str, size: u64) -> PathBuf {
        let dest = self.work(name);
        fs::copy(src, &dest).expect("copy");
        fs::OpenOptions::new()
            .write(true)
            .open(&dest)
            .and_then(|f| f.set_len(size))
            .expect("set_len");
        dest
    }

    #[track_caller]
    fn assert_identical(&self, a: &Path, b: &Path) {
        let run = self.run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                a.to_str().unwrap(),
                b.to_str().unwrap(),
            ],
        );
        assert_eq!(run.code, 0, "qemu-img compare {a:?} {b:?}: {run:?}");
    }
}

fn sha256_hex(path: &Path) -> String {
    let bytes = fs::read(path).expect("layer bytes");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks the new top layer of `repo:name@rev` as pcocc writes it, on top of `parent`.
#[track_caller]
fn assert_pcocc_layer(f: &Fixture, repo: &str, top: &str, parent: &str, size: u64) {
    let layer = f.layer(repo, top);
    let md = fs::metadata(&layer).expect("the new layer is in data/XX/");
    assert_eq!(md.permissions().mode() & 0o7777, 0o444, "layer mode");
    assert_eq!(sha256_hex(&layer), top, "a layer is named by its sha256");
    let info = f.info(&layer);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(size));
    assert_eq!(
        info["backing-filename"].as_str(),
        Some(format!("../../data/{}/{parent}", &parent[..2]).as_str()),
        "backing file string"
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    // An empty overlay: header, refcount table and block, L1 (pcocc's 196616 bytes up
    // to 512 MiB).
    if size <= 512 << 20 && size > 0 {
        assert_eq!(md.len(), 196_616);
    }
    let check = f.tool("qemu-img", &["check", layer.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn resize_adds_a_revision_of_two_layers_with_an_empty_top() {
    let Some(f) = Fixture::new() else {
        return;
    };
    f.pcocc(&["resize", "img", "16M"]).expect("", "", 0);
    let (meta0, _) = f.meta("user", "img", 0);
    let (meta1, text) = f.meta("user", "img", 1);
    // pcocc's keys, in pcocc's order, no trailing newline.
    let owner = meta0["owner"].as_str().unwrap();
    assert!(
        text.starts_with(&format!(
            "{{\"name\": \"img\", \"revision\": 1, \"kind\": \"vm\", \"owner\": \"{owner}\", \"timestamp\": "
        )),
        "{text}"
    );
    assert!(text.ends_with(", \"custom_meta\": {}}"), "{text}");
    assert!(meta1["timestamp"].as_f64().unwrap() >= meta0["timestamp"].as_f64().unwrap());
    let base = f.blobs("user", "img", 0);
    let blobs = f.blobs("user", "img", 1);
    assert_eq!(blobs.len(), 2);
    assert_eq!(blobs[0], base[0]);
    assert_pcocc_layer(&f, "user", &blobs[1], &base[0], 16 << 20);
    // Nothing left behind in .tmp; revision 0 untouched.
    assert!(common::sorted_names(&f.repo("user").join(".tmp")).is_empty());
    assert_eq!(f.blobs("user", "img", 0), base);

    // The disk: revision 0's bytes, then zeroes (qemu-img reading the chain itself and
    // our export of the new revision).
    let r0 = f.export_raw("img@0", "r0.raw");
    let expected = f.resized_copy(&r0, "expected.raw", 16 << 20);
    let r1 = f.export_raw("img", "r1.raw");
    f.assert_identical(&r1, &expected);
    let chain = f.layer("user", &blobs[1]);
    let run = f.run(
        "qemu-img",
        &[
            "compare",
            "-F",
            "raw",
            chain.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");

    // show counts two layers and lists both revisions.
    let show = f.pcocc(&["show", "img"]);
    assert_eq!(show.code, 0, "{show:?}");
    assert!(
        show.stdout
            .contains("URI:                user:img@1\nLayers:                      2\n")
    );
    assert!(
        show.stdout.contains("\n1           192.0 KB    "),
        "{}",
        show.stdout
    );
}

#[test]
fn resizing_a_layered_revision_stacks_on_its_top() {
    let Some(f) = Fixture::new() else {
        return;
    };
    f.pcocc(&["resize", "img", "16M"]).expect("", "", 0);
    f.pcocc(&["resize", "user:img", "1G"]).expect("", "", 0);
    let one = f.blobs("user", "img", 1);
    let two = f.blobs("user", "img", 2);
    assert_eq!(two.len(), 3);
    assert_eq!(two[..2], one[..]);
    assert_pcocc_layer(&f, "user", &two[2], &one[1], 1 << 30);
    assert_eq!(f.layer("user", &two[2]).metadata().unwrap().len(), 196_624);
    let r0 = f.export_raw("img@0", "r0.raw");
    let expected = f.resized_copy(&r0, "expected.raw", 1 << 30);
    let r2 = f.export_raw("img@2", "r2.raw");
    f.assert_identical(&r2, &expected);
}

#[test]
fn shrinking_an_old_revision_adds_the_latest_revision_and_keeps_the_others() {
    let Some(f) = Fixture::new() else {
        return;
    };
    f.pcocc(&["resize", "img", "16M"]).expect("", "", 0);
    let one = fs::read(f.repo("user").join("meta/img@1")).unwrap();
    // pcocc overwrote img@1 here; the new revision is img@2.
    f.pcocc(&["resize", "img@0", "1M"]).expect("", "", 0);
    assert_eq!(fs::read(f.repo("user").join("meta/img@1")).unwrap(), one);
    assert_eq!(f.meta_files("user"), ["img@0", "img@1", "img@2"]);
    let base = f.blobs("user", "img", 0);
    let two = f.blobs("user", "img", 2);
    assert_eq!(two.len(), 2);
    assert_eq!(two[0], base[0]);
    assert_pcocc_layer(&f, "user", &two[1], &base[0], 1 << 20);
    let r0 = f.export_raw("img@0", "r0.raw");
    let expected = f.resized_copy(&r0, "expected.raw", 1 << 20);
    let r2 = f.export_raw("img@2", "r2.raw");
    f.assert_identical(&r2, &expected);
}

#[test]
fn the_new_revision_stays_in_the_repository_of_the_image() {
    let Some(f) = Fixture::new() else {
        return;
    };
    f.pcocc(&["copy", "img", "global:other"]).expect(
        "Copying image ...\nImage successufly copied\n",
        "",
        0,
    );
    // pcocc wrote other@1 into the default repository here.
    f.pcocc(&["resize", "other", "32M"]).expect("", "", 0);
    assert_eq!(f.meta_files("global"), ["other@0", "other@1"]);
    assert_eq!(f.meta_files("user"), ["img@0"]);
    let blobs = f.blobs("global", "other", 1);
    assert_pcocc_layer(&f, "global", &blobs[1], &blobs[0], 32 << 20);
}

#[test]
fn sizes_round_up_to_sectors_and_take_units() {
    let Some(f) = Fixture::new() else {
        return;
    };
    for (text, size) in [("1000", 1024u64), ("1.5G", 1_610_612_736), ("0x1000", 4096)] {
        f.pcocc(&["resize", "img", text]).expect("", "", 0);
        let top = f.blobs("user", "img", f.meta_files("user").len() as u64 - 1);
        let info = f.info(&f.layer("user", top.last().unwrap()));
        assert_eq!(info["virtual-size"].as_u64(), Some(size), "{text}");
    }
}

#[test]
fn errors_are_pcoccs_and_write_nothing() {
    let Some(f) = Fixture::new() else {
        return;
    };
    let data = || common::sorted_names(&f.repo("user").join("data"));
    let before = data();
    for (args, message) in [
        (
            &["resize", "img", "banana"][..],
            "Unable to create image. Invalid image size specified: 'banana'.",
        ),
        (
            &["resize", "img", "1e9"][..],
            "Unable to create image. Invalid image size specified: '1e9'.",
        ),
        (
            &["resize", "img", "8E"][..],
            "Unable to create image. Invalid image size specified. Must be between 0 and \
             9223372036854775807.",
        ),
        (
            &["resize", "img", "3P"][..],
            "Unable to create image. The image size is too large for file format 'qcow2' \
             (try using a larger cluster size)",
        ),
        (
            &["resize", "nosuch", "1G"][..],
            "Object nosuch not found in configured repositories",
        ),
        // The image is looked up before the size is judged.
        (
            &["resize", "nosuch", "banana"][..],
            "Object nosuch not found in configured repositories",
        ),
        (
            &["resize", "img@9", "1G"][..],
            "Object img revision 9 not found in configured repositories",
        ),
        (
            &["resize", "user:img@9", "1G"][..],
            "Object img revision 9 not found in repository user",
        ),
        (
            &["resize", "global:img", "1G"][..],
            "Object img not found in repository global",
        ),
        (
            &["resize", "nosuch:img", "1G"][..],
            "Unknown repository nosuch",
        ),
    ] {
        f.pcocc(args).expect_error(message);
    }
    f.pcocc(&["resize", "img"]).expect(
        "",
        "Usage: pcocc image resize [OPTIONS] IMAGE NEW_SZ\n\
         Try 'pcocc image resize --help' for help.\n\n\
         Error: Missing argument 'NEW_SZ'.\n",
        2,
    );
    assert_eq!(f.meta_files("user"), ["img@0"]);
    assert_eq!(data(), before);
    assert!(common::sorted_names(&f.repo("user").join(".tmp")).is_empty());
}
