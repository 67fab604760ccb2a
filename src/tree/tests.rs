//! The tree on real repositories in temporary directories, with qcow2 layers made by
//! qemu-img and named by their sha256 as pcocc names them.

use super::*;
use crate::config::{Origin, RepoConfig};
use crate::testutil::qemu_img;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Virtual size of fixture disks.
const DISK: u64 = 64 << 20;

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) root: PathBuf,
    pub(super) tree: Tree,
    pub(super) me: Caller,
}

impl Fixture {
    /// Repositories `user` and `global` (in that priority order) under one temp dir.
    pub(super) fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let config = Config {
            repos: ["user", "global"]
                .into_iter()
                .map(|n| RepoConfig {
                    name: n.to_string(),
                    path: root.join(n),
                    origin: Origin::Default,
                })
                .collect(),
        };
        let tree = Tree::new(&config).unwrap();
        Fixture {
            _dir: dir,
            root,
            tree,
            me: Caller::current(),
        }
    }

    pub(super) fn repo(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Makes a qcow2 layer in `repo` as pcocc does, with the crate's own writer (no
    /// qemu needed): 64 KiB of `pattern` at `pattern` × 64 KiB of a `DISK`-sized disk;
    /// with a `backing` layer, only those clusters, over the backing chain, named
    /// `../../data/XX/<hash>`. Moved to `data/XX/<sha256>` with mode 0444. Returns the
    /// hash.
    pub(super) fn layer(&self, repo: &str, backing: Option<&str>, pattern: u8) -> String {
        use crate::image::{Disk, Layer, chain, convert, qcow2_delta, raw::RawLayer};
        use std::os::unix::fs::FileExt;
        let r = self.repo(repo);
        std::fs::create_dir_all(r.join(".tmp")).unwrap();
        // The layer's own data, as a sparse raw disk, then a standalone qcow2 holding
        // only its clusters.
        let raw_path = r.join(".tmp").join(format!("fixture-{pattern}.raw"));
        let raw = std::fs::File::create(&raw_path).unwrap();
        raw.set_len(DISK).unwrap();
        raw.write_all_at(&[pattern; 64 << 10], u64::from(pattern) * (64 << 10))
            .unwrap();
        let raw_disk = Disk::new(vec![Arc::new(RawLayer::open(&raw_path).unwrap())]);
        let own_path = r.join(".tmp").join(format!("fixture-{pattern}.own"));
        let own = std::fs::File::create(&own_path).unwrap();
        convert::to_qcow2_layer(&raw_disk, &own, &own_path, &mut |_, _| {}).unwrap();
        std::fs::remove_file(&raw_path).unwrap();
        let tmp = r.join(".tmp").join(format!("fixture-{pattern}"));
        match backing {
            None => std::fs::rename(&own_path, &tmp).unwrap(),
            Some(b) => {
                let base_path = r.join("data").join(&b[..2]).join(b);
                let policy = chain::WithinDir {
                    root: r.join("data"),
                };
                let base = chain::open_chain(&base_path, &policy).unwrap();
                let top = crate::image::qcow2::Qcow2Layer::new(
                    std::fs::File::open(&own_path).unwrap(),
                    &own_path,
                )
                .unwrap();
                let mut layers: Vec<Arc<dyn Layer>> = vec![Arc::new(top)];
                layers.extend(base.layers().iter().cloned());
                let out = std::fs::File::create(&tmp).unwrap();
                let name = format!("../../data/{}/{b}", &b[..2]);
                qcow2_delta::write_delta(&Disk::new(layers), 1, &name, &out, &tmp).unwrap();
                std::fs::remove_file(&own_path).unwrap();
            }
        }
        let hash = format!("{:x}", Sha256::digest(std::fs::read(&tmp).unwrap()));
        let dir = r.join("data").join(&hash[..2]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::rename(&tmp, dir.join(&hash)).unwrap();
        hash
    }

    /// Writes `meta/NAME@REV` by hand, byte for byte as pcocc does.
    pub(super) fn meta(
        &self,
        repo: &str,
        name: &str,
        rev: u64,
        owner: &str,
        ts: &str,
        blobs: &[&str],
    ) {
        let blobs: Vec<String> = blobs.iter().map(|b| format!("\"{b}\"")).collect();
        let text = format!(
            r#"{{"name": "{name}", "revision": {rev}, "kind": "vm", "owner": "{owner}", "timestamp": {ts}, "data_blobs": [{}], "custom_meta": {{}}}}"#,
            blobs.join(", ")
        );
        std::fs::write(
            self.repo(repo).join("meta").join(format!("{name}@{rev}")),
            text,
        )
        .unwrap();
    }

    pub(super) fn data_files(&self, repo: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(self.repo(repo).join("data")).unwrap() {
            for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                out.push(f.unwrap().path());
            }
        }
        out.sort();
        out
    }

    /// user: img1@0 (base), img1@1 (base + overlay); global: other@0 (base).
    pub(super) fn standard() -> Option<(Fixture, String, String)> {
        let f = Fixture::new();
        let base = f.layer("user", None, 1);
        let top = f.layer("user", Some(&base), 2);
        f.meta("user", "img1", 0, "root", "1795749382.4048052", &[&base]);
        f.meta(
            "user",
            "img1",
            1,
            "root",
            "1795749453.041635",
            &[&base, &top],
        );
        let gbase = f.layer("global", None, 3);
        f.meta(
            "global",
            "other",
            0,
            "nosuchuser",
            "1500000000.5",
            &[&gbase],
        );
        Some((f, base, top))
    }
}

pub(super) fn uri(s: &str) -> Uri {
    Uri::parse(s).unwrap()
}

pub(super) fn node_repo(r: &str) -> Node {
    Node::Repo { repo: r.into() }
}

pub(super) fn node_image(r: &str, i: &str) -> Node {
    Node::Image {
        repo: r.into(),
        image: i.into(),
    }
}

pub(super) fn node_rev(r: &str, i: &str, rev: u64) -> Node {
    Node::Revision {
        repo: r.into(),
        image: i.into(),
        rev,
    }
}

pub(super) fn names(entries: &[DirEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

pub(super) fn read_all(f: &Fixture, node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 100];
    loop {
        let n = f
            .tree
            .read(&f.me, node, out.len() as u64, &mut buf)
            .unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn uris_parse_like_pcocc_and_reject_its_quirks() {
    let u = |repo: Option<&str>, name: &str, rev: Option<u64>| Uri {
        repo: repo.map(String::from),
        name: name.into(),
        revision: rev,
    };
    assert_eq!(uri("img"), u(None, "img", None));
    assert_eq!(uri("r:img@3"), u(Some("r"), "img", Some(3)));
    assert_eq!(uri(":img"), u(Some(""), "img", None));
    assert_eq!(uri("r:img@3").to_string(), "r:img@3");
    let err = |s: &str| Uri::parse(s).unwrap_err().to_string();
    assert!(err("x@").starts_with("Bad revision: "), "{}", err("x@"));
    assert_eq!(err("x@x"), "Bad revision: x");
    for quirk in ["x@-1", "x@+1", "img1@0@1", "a:b:c"] {
        assert!(Uri::parse(quirk).is_err(), "{quirk} accepted");
    }
    assert!(err("a:b:c").contains("a:b:c"), "{}", err("a:b:c"));
}

#[test]
fn names_are_validated_with_pcocc_messages() {
    assert!(validate_name("My-img_1.0").is_ok());
    assert_eq!(
        validate_name("bad name").unwrap_err().to_string(),
        "Object name contains invalid characters"
    );
    assert_eq!(
        validate_name("").unwrap_err().to_string(),
        "Empty object name"
    );
}

#[test]
fn root_lists_repositories_in_priority_order() {
    let f = Fixture::new();
    let e = f.tree.readdir(&f.me, &Node::Root).unwrap();
    assert_eq!(names(&e), ["user", "global"]);
    assert!(e.iter().all(|e| e.kind == NodeType::Directory));
    assert_eq!(f.tree.repo_names(), ["user", "global"]);
    assert_eq!(f.tree.default_repo().unwrap(), "user");
    let a = f.tree.getattr(&f.me, &Node::Root).unwrap();
    assert_eq!((a.kind, a.perm, a.nlink), (NodeType::Directory, 0o555, 4));
}

#[test]
fn opening_creates_every_configured_repository() {
    let f = Fixture::new();
    for r in ["user", "global"] {
        assert_eq!(
            std::fs::read_to_string(f.repo(r).join(".config")).unwrap(),
            "version: 2\n"
        );
    }
    let list = f.tree.repo_list(&f.me);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].path, f.repo("user"));
    assert_eq!(list[0].writable, Some(true));
}

#[test]
fn lookups_walk_repository_image_revision_and_file() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    let repo = t.lookup(&f.me, &Node::Root, "user").unwrap();
    assert_eq!(repo, node_repo("user"));
    let img = t.lookup(&f.me, &repo, "img1").unwrap();
    assert_eq!(img, node_image("user", "img1"));
    let rev = t.lookup(&f.me, &img, "@1").unwrap();
    assert_eq!(rev, node_rev("user", "img1", 1));
    let file = t.lookup(&f.me, &rev, "meta.json").unwrap();
    assert!(matches!(
        file,
        Node::File {
            file: FileKind::MetaJson,
            rev: 1,
            ..
        }
    ));
    let latest = t.lookup(&f.me, &img, "latest").unwrap();
    assert_eq!(t.readlink(&f.me, &latest).unwrap(), "@1");

    for (parent, name) in [
        (Node::Root, "nosuch"),
        (repo.clone(), "nosuch"),
        (repo.clone(), "other"),
        (img.clone(), "@2"),
        (img.clone(), "@01"),
        (img.clone(), "@+1"),
        (img.clone(), "1"),
        (rev.clone(), "disk.xyz"),
    ] {
        let e = t.lookup(&f.me, &parent, name).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT, "{parent:?}/{name}: {e}");
    }
    let e = t.lookup(&f.me, &file, "x").unwrap_err();
    assert_eq!(e.errno(), libc::ENOTDIR);
}

#[test]
fn directories_list_images_revisions_latest_and_files() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    assert_eq!(
        names(&t.readdir(&f.me, &node_repo("user")).unwrap()),
        ["img1"]
    );
    let e = t.readdir(&f.me, &node_image("user", "img1")).unwrap();
    assert_eq!(names(&e), ["latest", "@0", "@1"]);
    assert_eq!(e[0].kind, NodeType::Symlink);
    let e = t.readdir(&f.me, &node_rev("user", "img1", 0)).unwrap();
    assert_eq!(
        names(&e),
        [
            "disk.raw",
            "disk.qcow2",
            "disk.qed",
            "disk.vdi",
            "disk.vpc",
            "disk.vmdk",
            "meta.json"
        ]
    );
    assert!(e.iter().all(|e| e.kind == NodeType::RegularFile));
}

#[test]
fn revision_attributes_carry_owner_time_and_read_only_modes() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    let a = t.getattr(&f.me, &node_rev("user", "img1", 0)).unwrap();
    assert_eq!(
        (a.kind, a.perm, a.nlink, a.uid),
        (NodeType::Directory, 0o555, 2, 0)
    );
    let want = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1795749382.4048052);
    assert_eq!(a.mtime, want);
    assert_eq!(a.ctime, want);

    // An owner unknown here: the metadata file's owner instead.
    let a = t.getattr(&f.me, &node_rev("global", "other", 0)).unwrap();
    let meta_uid = std::fs::metadata(f.repo("global").join("meta/other@0"))
        .unwrap()
        .uid();
    assert_eq!(a.uid, meta_uid);
    assert_eq!(
        a.mtime,
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_500_000_000_500)
    );

    let file = t
        .lookup(&f.me, &node_rev("user", "img1", 1), "meta.json")
        .unwrap();
    let a = t.getattr(&f.me, &file).unwrap();
    assert_eq!((a.kind, a.perm, a.nlink), (NodeType::RegularFile, 0o444, 1));
    assert_eq!(a.size, read_all(&f, &file).len() as u64);
    assert_eq!(a.blocks, a.size.div_ceil(512));

    // Image and repository directories look as writable as meta/ is.
    let meta_mode = std::fs::metadata(f.repo("user").join("meta"))
        .unwrap()
        .mode()
        & 0o7777;
    let a = t.getattr(&f.me, &node_image("user", "img1")).unwrap();
    assert_eq!((a.perm as u32, a.nlink), (meta_mode, 4));
    assert_eq!(
        a.mtime,
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1795749453.041635)
    );
    let a = t.getattr(&f.me, &node_repo("user")).unwrap();
    assert_eq!((a.perm as u32, a.nlink), (meta_mode, 3));
    let latest = Node::Latest {
        repo: "user".into(),
        image: "img1".into(),
    };
    let a = t.getattr(&f.me, &latest).unwrap();
    assert_eq!((a.kind, a.size), (NodeType::Symlink, 2));
}

#[test]
fn meta_json_holds_pcocc_metadata_repo_virtual_size_and_layers() {
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let file = f
        .tree
        .lookup(&f.me, &node_rev("user", "img1", 1), "meta.json")
        .unwrap();
    let bytes = read_all(&f, &file);
    assert_eq!(bytes.last(), Some(&b'\n'));
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["name"], "img1");
    assert_eq!(v["revision"], 1);
    assert_eq!(v["owner"], "root");
    assert_eq!(v["timestamp"].as_f64(), Some(1795749453.041635));
    assert_eq!(v["data_blobs"], serde_json::json!([base, top]));
    assert_eq!(v["repo"], "user");
    assert_eq!(v["virtual_size"], DISK);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[1]["sha256"], top.as_str());
    let top_path = f.repo("user").join("data").join(&top[..2]).join(&top);
    assert_eq!(layers[1]["path"], top_path.to_str().unwrap());
    assert_eq!(
        layers[1]["size"].as_u64(),
        Some(std::fs::metadata(&top_path).unwrap().len())
    );
    // Reads past the end return nothing.
    let mut buf = [0u8; 8];
    let n = f.tree.read(&f.me, &file, 1 << 40, &mut buf).unwrap();
    assert_eq!(n, 0);
    let e = f
        .tree
        .read(&f.me, &node_rev("user", "img1", 1), 0, &mut buf)
        .unwrap_err();
    assert_eq!(e.errno(), libc::EISDIR);
}

#[test]
fn resolve_finds_revisions_in_priority_order_with_pcocc_errors() {
    let Some((f, base, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    let r = t.resolve(&f.me, &uri("img1")).unwrap();
    assert_eq!((r.repo.as_str(), r.meta.revision), ("user", 1));
    let r = t.resolve(&f.me, &uri("img1@0")).unwrap();
    assert_eq!(r.meta.data_blobs, [base]);
    assert_eq!(t.resolve(&f.me, &uri("other")).unwrap().repo, "global");
    assert_eq!(t.resolve(&f.me, &uri(":img1")).unwrap().repo, "user");
    let err = |s: &str| t.resolve(&f.me, &uri(s)).unwrap_err().to_string();
    assert_eq!(
        err("img1@5"),
        "Object img1 revision 5 not found in configured repositories"
    );
    assert_eq!(
        err("nosuch"),
        "Object nosuch not found in configured repositories"
    );
    assert_eq!(
        err("global:img1"),
        "Object img1 not found in repository global"
    );
    assert_eq!(
        err("global:other@3"),
        "Object other revision 3 not found in repository global"
    );
    assert_eq!(err("nosuch:img1"), "Unknown repository nosuch");
    // The parser refuses such a name; the tree still answers a hand-built URI sanely.
    let odd = Uri {
        repo: None,
        name: "img1@0".into(),
        revision: Some(1),
    };
    assert_eq!(
        t.resolve(&f.me, &odd).unwrap_err().to_string(),
        "Object img1@0 revision 1 not found in configured repositories"
    );
}

#[test]
fn list_and_show_give_latest_metadata_and_top_layer_sizes() {
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    // A corrupt revision is skipped, not fatal.
    std::fs::write(f.repo("user").join("meta/broken@0"), "{").unwrap();
    f.meta("user", "aaa", 0, "root", "1.5", &[&base]);
    let l = t.list_images(&f.me, "user").unwrap();
    let got: Vec<(&str, u64)> = l
        .iter()
        .map(|s| (s.latest.name.as_str(), s.latest.revision))
        .collect();
    assert_eq!(got, [("aaa", 0), ("img1", 1)]);
    assert!(matches!(
        t.list_images(&f.me, "nosuch"),
        Err(Error::UnknownRepo(_))
    ));

    let revs = t.revisions(&f.me, "user", "img1").unwrap();
    let size = |h: &str| {
        std::fs::metadata(f.repo("user").join("data").join(&h[..2]).join(h))
            .unwrap()
            .len()
    };
    let got: Vec<(u64, Option<u64>)> = revs
        .iter()
        .map(|r| (r.meta.revision, r.top_layer_size))
        .collect();
    assert_eq!(got, [(0, Some(size(&base))), (1, Some(size(&top)))]);
    assert_eq!(
        t.revisions(&f.me, "global", "img1")
            .unwrap_err()
            .to_string(),
        "Object img1 not found in repository global"
    );
}

#[test]
fn copy_within_a_repository_writes_metadata_only() {
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let before = f.data_files("user");
    let out = f.tree.copy(&f.me, &uri("img1"), &uri("copy@7")).unwrap();
    assert_eq!((out.repo.as_str(), out.name.as_str()), ("user", "copy"));
    assert_eq!(out.shadowed_in, None);
    assert_eq!(
        (out.layers_present, out.layers_linked, out.layers_copied),
        (2, 0, 0)
    );
    assert_eq!(f.data_files("user"), before, "no new layer file");
    let m = f.tree.resolve(&f.me, &uri("user:copy")).unwrap().meta;
    assert_eq!(m.revision, 0);
    assert_eq!(m.data_blobs, [base, top]);
    assert_eq!(m.owner, access::user_name(f.me.uid));
    assert!(m.timestamp > 1.7e9);
    assert!(
        std::fs::read_dir(f.repo("user").join(".tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    let e = f.tree.copy(&f.me, &uri("img1"), &uri("copy")).unwrap_err();
    assert_eq!(e.to_string(), "Image copy already exists in repo user");
    assert_eq!(e.errno(), libc::EEXIST);
    let e = f
        .tree
        .copy(
            &f.me,
            &uri("img1"),
            &Uri {
                repo: None,
                name: "bad name".into(),
                revision: None,
            },
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "Object name contains invalid characters");
}

#[test]
fn copy_across_repositories_hard_links_the_layers() {
    // qemu-img judges what the tree serves.
    if !crate::testutil::have_qemu() {
        return;
    }
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let out = f
        .tree
        .copy(&f.me, &uri("user:img1"), &uri("global:img1"))
        .unwrap();
    assert_eq!(out.shadowed_in.as_deref(), Some("user"));
    assert_eq!(out.layers_linked, 2);
    for h in [&base, &top] {
        let rel = Path::new("data").join(&h[..2]).join(h);
        let a = std::fs::metadata(f.repo("user").join(&rel)).unwrap();
        let b = std::fs::metadata(f.repo("global").join(&rel)).unwrap();
        assert_eq!(a.ino(), b.ino(), "layer {h} is the same inode");
    }
    // The copied layered revision reads through its chain in the other repository.
    let top_in_global = f.repo("global").join("data").join(&top[..2]).join(&top);
    qemu_img(&["check", "-q", top_in_global.to_str().unwrap()]);

    // Through the node API, as `ln …/@0/meta.json global/again` would.
    let src = f
        .tree
        .lookup(&f.me, &node_rev("user", "img1", 0), "meta.json")
        .unwrap();
    let n = f
        .tree
        .copy_revision(&f.me, &src, "global", "again")
        .unwrap();
    assert_eq!(n, node_image("global", "again"));
    let m = f.tree.resolve(&f.me, &uri("global:again")).unwrap().meta;
    assert_eq!(m.data_blobs, [base]);
}

#[test]
fn renaming_an_image_moves_all_revisions_within_its_repository() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    t.rename(
        &f.me,
        &node_image("user", "img1"),
        &node_repo("user"),
        "moved",
    )
    .unwrap();
    let e = t.readdir(&f.me, &node_image("user", "moved")).unwrap();
    assert_eq!(names(&e), ["latest", "@0", "@1"]);
    assert!(t.lookup(&f.me, &node_repo("user"), "img1").is_err());
    let m = t.resolve(&f.me, &uri("moved@0")).unwrap().meta;
    assert_eq!(
        (m.name.as_str(), m.timestamp),
        ("moved", 1795749382.4048052)
    );

    // To another repository: every revision moves, with its number and date.
    t.rename(
        &f.me,
        &node_image("user", "moved"),
        &node_repo("global"),
        "x",
    )
    .unwrap();
    assert!(t.resolve(&f.me, &uri("user:moved")).is_err());
    let m = t.resolve(&f.me, &uri("global:x@0")).unwrap().meta;
    assert_eq!((m.name.as_str(), m.timestamp), ("x", 1795749382.4048052));
    t.rename(
        &f.me,
        &node_image("global", "x"),
        &node_repo("user"),
        "moved",
    )
    .unwrap();
    t.copy(&f.me, &uri("moved"), &uri("user:taken")).unwrap();
    let e = t.rename_image(&f.me, "user", "moved", "taken").unwrap_err();
    assert_eq!(e.to_string(), "Image taken already exists in repo user");
    let e = t
        .rename(
            &f.me,
            &node_rev("user", "moved", 0),
            &node_repo("user"),
            "x",
        )
        .unwrap_err();
    assert_eq!(e.errno(), libc::EROFS);
}

#[test]
fn deleting_one_revision_then_all_keeps_the_layers() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    let layers = f.data_files("user");
    let d = t.delete(&f.me, &uri("img1@0")).unwrap();
    assert_eq!((d.repo.as_str(), d.revisions.clone()), ("user", vec![0]));
    assert_eq!(
        names(&t.readdir(&f.me, &node_image("user", "img1")).unwrap()),
        ["latest", "@1"]
    );
    let err = |s: &str| t.delete(&f.me, &uri(s)).unwrap_err().to_string();
    assert_eq!(
        err("user:img1@0"),
        "Object img1 revision 0 not found in repository user"
    );
    assert_eq!(
        err("img1@0"),
        "Object img1 revision 0 not found in configured repositories"
    );
    assert_eq!(
        err("nosuch"),
        "Object nosuch not found in configured repositories"
    );
    assert_eq!(
        err("user:nosuch"),
        "Object nosuch not found in repository user"
    );
    assert_eq!(err("nosuch:x"), "Unknown repository nosuch");
    let d = t.delete(&f.me, &uri("img1")).unwrap();
    assert_eq!(d.revisions, [1]);
    assert!(t.readdir(&f.me, &node_repo("user")).unwrap().is_empty());
    assert_eq!(f.data_files("user"), layers, "delete never removes layers");

    // Without a repository, delete finds the image where it lives (not only the default).
    let d = t.delete(&f.me, &uri("other")).unwrap();
    assert_eq!(d.repo, "global");
}

#[test]
fn rm_r_of_an_image_directory_deletes_through_rmdir() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    let img = node_image("user", "img1");
    // What `rm -r` does: unlink files and symlinks (no-ops), rmdir revisions, rmdir image.
    let latest = t.lookup(&f.me, &img, "latest").unwrap();
    t.unlink(&f.me, &latest).unwrap();
    let file = t
        .lookup(&f.me, &node_rev("user", "img1", 0), "meta.json")
        .unwrap();
    t.unlink(&f.me, &file).unwrap();
    assert!(
        t.getattr(&f.me, &file).is_ok(),
        "unlinking a file deletes nothing"
    );
    assert_eq!(
        t.remove(&f.me, &node_rev("user", "img1", 0))
            .unwrap()
            .revisions,
        [0]
    );
    assert_eq!(
        t.remove(&f.me, &node_rev("user", "img1", 1))
            .unwrap()
            .revisions,
        [1]
    );
    assert!(t.remove(&f.me, &img).unwrap().revisions.is_empty());
    assert_eq!(t.getattr(&f.me, &img).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(
        t.remove(&f.me, &node_rev("user", "img1", 0))
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
    assert_eq!(
        t.remove(&f.me, &node_repo("user")).unwrap_err().errno(),
        libc::EACCES
    );
}

#[test]
fn gc_through_the_tree_removes_layers_no_revision_uses() {
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let t = &f.tree;
    t.delete(&f.me, &uri("img1@1")).unwrap();
    let r = t.gc(&f.me, "user", Some(Duration::ZERO)).unwrap();
    assert_eq!(r.layers_removed, vec![top.clone()]);
    let data = f.repo("user").join("data");
    assert!(data.join(&base[..2]).join(&base).exists());
    assert!(!data.join(&top[..2]).join(&top).exists());
    assert!(matches!(
        t.gc(&f.me, "nosuch", None),
        Err(Error::UnknownRepo(_))
    ));
}

#[test]
fn errors_map_to_errnos_in_one_place() {
    let cases: [(Error, i32); 6] = [
        (Error::UnknownRepo("r".into()), libc::ENOENT),
        (
            Error::ImageExists {
                name: "n".into(),
                repo: "r".into(),
            },
            libc::EEXIST,
        ),
        (Error::InvalidName, libc::EINVAL),
        (Error::ReadOnly("x".into()), libc::EROFS),
        (Error::CrossRepository("x".into()), libc::EXDEV),
        (Error::PermissionDenied("x".into()), libc::EACCES),
    ];
    for (e, errno) in cases {
        assert_eq!(e.errno(), errno, "{e}");
    }
}

#[test]
fn another_user_cannot_delete_in_a_repository_they_cannot_write() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let meta = f.repo("user").join("meta");
    std::fs::set_permissions(&meta, std::fs::Permissions::from_mode(0o755)).unwrap();
    let owner = std::fs::metadata(&meta).unwrap().uid();
    let stranger = Caller {
        uid: owner + 4242,
        gid: 4242,
        groups: vec![],
    };
    let e = f.tree.delete(&stranger, &uri("user:img1@0")).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES);
    // Reading is still allowed by the 0755 mode.
    assert!(f.tree.resolve(&stranger, &uri("user:img1@0")).is_ok());
    assert_eq!(f.tree.repo_list(&stranger)[0].writable, Some(false));
}

#[test]
fn the_tree_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tree>();
}

#[test]
fn a_version_1_repository_is_browsed_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("v1");
    for d in ["data", "meta", ".tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join(".config"), "version: 1\n").unwrap();
    let layer = b"legacy";
    let h = format!("{:x}", Sha256::digest(layer));
    std::fs::create_dir_all(root.join("data").join(&h[..2])).unwrap();
    std::fs::write(root.join("data").join(&h[..2]).join(&h), layer).unwrap();
    let m = format!("{:x}", Sha256::digest(b"old\n0"));
    std::fs::create_dir_all(root.join("meta").join(&m[..2])).unwrap();
    std::fs::write(
        root.join("meta").join(&m[..2]).join(&m),
        format!("custom_meta: {{}}\ndata_blobs:\n- {h}\nkind: vm\nname: old\nowner: someone\nrevision: 0\ntimestamp: 1500000000.5\n"),
    )
    .unwrap();
    let config = Config {
        repos: vec![RepoConfig {
            name: "legacy".into(),
            path: root,
            origin: Origin::Default,
        }],
    };
    let tree = Tree::new(&config).unwrap();
    let me = Caller::current();
    let l = tree.list_images(&me, "legacy").unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].latest.owner, "someone");
    let e = tree.readdir(&me, &node_image("legacy", "old")).unwrap();
    assert_eq!(names(&e), ["latest", "@0"]);
    let r = tree.revisions(&me, "legacy", "old").unwrap();
    assert_eq!(r[0].top_layer_size, Some(layer.len() as u64));
}

#[test]
fn a_corrupt_newest_revision_is_skipped_when_no_revision_is_named() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    std::fs::write(f.repo("user").join("meta/img1@2"), "{").unwrap();
    let r = f.tree.resolve(&f.me, &uri("img1")).unwrap();
    assert_eq!(r.meta.revision, 1);
    let e = f.tree.resolve(&f.me, &uri("img1@2")).unwrap_err();
    assert!(e.to_string().contains("img1@2"), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    let revs: Vec<u64> = f
        .tree
        .revisions(&f.me, "user", "img1")
        .unwrap()
        .iter()
        .map(|r| r.meta.revision)
        .collect();
    assert_eq!(revs, [0, 1]);
}

#[test]
fn listing_an_image_parses_each_revision_metadata_once_and_sees_it_published_again() {
    let f = Fixture::new();
    let hash = "d843d202b62d2e6d2dbb89a84afa9498b7d2702076c730219ed86b5cde20c490";
    let revs = 20;
    for rev in 0..revs {
        let ts = format!("{}.5", 1_500_000_000 + rev);
        f.meta("user", "many", rev, "root", &ts, &[hash]);
    }
    let image = node_image("user", "many");
    let before = f.tree.meta_files_read();
    for _ in 0..3 {
        // What `ls -l` asks: the listing, then every entry's attributes.
        f.tree.getattr(&f.me, &image).unwrap();
        for e in f.tree.readdir(&f.me, &image).unwrap() {
            let a = f.tree.getattr(&f.me, &e.node).unwrap();
            if let Node::Revision { rev, .. } = e.node {
                let want = Duration::from_millis((1_500_000_000 + rev) * 1000 + 500);
                assert_eq!(a.mtime, SystemTime::UNIX_EPOCH + want, "@{rev}");
            }
        }
    }
    assert_eq!(f.tree.meta_files_read() - before, revs);

    // Deleted and published again under the same name, as another host may: the new
    // metadata is what shows.
    let path = f.repo("user").join("meta/many@3");
    std::fs::remove_file(&path).unwrap();
    f.meta("user", "many", 3, "nosuchuser", "1700000000.0", &[hash]);
    let a = f.tree.getattr(&f.me, &node_rev("user", "many", 3)).unwrap();
    assert_eq!(
        a.mtime,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
    assert_eq!(a.uid, std::fs::metadata(&path).unwrap().uid());
}

#[test]
fn cache_lifetimes_follow_what_can_change() {
    let refresh = Duration::from_secs(1);
    let rev = node_rev("user", "img", 0);
    assert_eq!(cache_ttl(&rev, refresh), IMMUTABLE_TTL);
    let file = Node::File {
        repo: "user".into(),
        image: "img".into(),
        rev: 0,
        file: FileKind::View(Format::Raw),
    };
    assert_eq!(cache_ttl(&file, refresh), refresh);
    assert_eq!(cache_ttl(&node_image("user", "img"), refresh), refresh);
    assert_eq!(cache_ttl(&node_repo("user"), refresh), refresh);
    let import = Node::Import {
        repo: "user".into(),
        image: None,
        name: "x".into(),
    };
    assert_eq!(cache_ttl(&import, refresh), Duration::ZERO);
}

/// `mv A B` of two images asks to move A into B (`B/A`): refused as what it is, EPERM
/// naming both, not a "permission denied" that root cannot make sense of.
#[test]
fn an_image_moved_into_another_is_refused_saying_why() {
    let Some((f, base, _)) = Fixture::standard() else {
        return;
    };
    f.meta("user", "img2", 0, "root", "1795749382.5", &[&base]);
    let repo = Node::Repo {
        repo: "user".into(),
    };
    let into = Node::Image {
        repo: "user".into(),
        image: "img2".into(),
    };
    let err = f
        .tree
        .rename_entry(&f.me, &repo, "img1", &into, "img1")
        .unwrap_err();
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    assert!(
        err.to_string()
            .contains("user/img1: an image cannot go inside another image (user/img2)"),
        "{err}"
    );
}
