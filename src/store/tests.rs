//! Store behaviour on real directories: layout, formats, exclusive publication, layers,
//! gc and the version 1 upgrade.

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn new_repo() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open("user", &dir.path().join("repo")).unwrap();
    (dir, store)
}

fn meta(name: &str, rev: u64, blobs: &[&str]) -> Meta {
    Meta {
        name: name.to_string(),
        revision: rev,
        kind: "vm".to_string(),
        owner: "root".to_string(),
        timestamp: 1795749382.4048052,
        data_blobs: blobs.iter().map(|s| s.to_string()).collect(),
        custom_meta: serde_json::json!({}),
    }
}

/// Adds a layer with content `bytes` through `.tmp/`, as an import would.
fn add(store: &Store, bytes: &[u8]) -> String {
    let tmp = store.tmp_file().unwrap();
    std::fs::write(tmp.path(), bytes).unwrap();
    store.add_layer(tmp, None).unwrap()
}

fn tmp_entries(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.tmp_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

const HASH_A: &str = "d843d202b62d2e6d2dbb89a84afa9498b7d2702076c730219ed86b5cde20c490";

#[test]
fn opening_a_missing_path_creates_pcocc_layout() {
    let (_d, store) = new_repo();
    let root = store.path();
    for dir in ["data", "meta", ".tmp"] {
        assert!(root.join(dir).is_dir(), "{dir} missing");
    }
    assert_eq!(
        std::fs::read_to_string(root.join(".config")).unwrap(),
        "version: 2\n"
    );
    assert_eq!(store.version(), 2);
    assert!(tmp_entries(&store).is_empty(), "nothing left in .tmp");
    // Opening again reads what was created.
    let again = Store::open("user", root).unwrap();
    assert_eq!(again.version(), 2);
}

#[test]
fn opening_under_a_missing_parent_names_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("no/such");
    let err = Store::open("r", &parent.join("repo")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Invalid repository parent directory {}", parent.display())
    );
}

#[test]
fn opening_a_regular_file_says_it_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let err = Store::open("r", &file).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("Repository path {} is not a directory", file.display())
    );
}

#[test]
fn a_directory_without_config_is_a_bad_repository_as_pcocc_says() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join(".config");
    let err = Store::open("r", dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Bad repository config file {0} : [Errno 2] No such file or directory: '{0}'",
            config.display()
        )
    );
}

#[test]
fn an_unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".config"), "version: 3\n").unwrap();
    let err = Store::open("r", dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unable to parse configuration file: Unsupported version for repository \"r\""
    );
}

#[test]
fn metadata_is_written_byte_for_byte_like_pcocc_and_read_back() {
    let (_d, store) = new_repo();
    let m = meta("img1", 0, &[HASH_A]);
    store.put_meta(&m).unwrap();
    let path = store.meta_dir().join("img1@0");
    let expected = concat!(
        r#"{"name": "img1", "revision": 0, "kind": "vm", "owner": "root", "#,
        r#""timestamp": 1795749382.4048052, "data_blobs": ["#,
        r#""d843d202b62d2e6d2dbb89a84afa9498b7d2702076c730219ed86b5cde20c490"], "#,
        r#""custom_meta": {}}"#
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
    assert_eq!(store.read_meta("img1", 0).unwrap(), Some(m));
    assert_eq!(store.read_meta("img1", 1).unwrap(), None);
    assert!(
        tmp_entries(&store).is_empty(),
        "publishing leaves nothing in .tmp"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o600,
        0o600,
        "metadata readable and writable by its owner"
    );
}

#[test]
fn pcocc_written_metadata_with_prefixed_blobs_reads() {
    let (_d, store) = new_repo();
    let text = format!(
        r#"{{"name": "c", "revision": 3, "kind": "vm", "owner": "bob", "timestamp": 1500000000, "data_blobs": ["sha256:{HASH_A}"], "custom_meta": {{"x": [1, 2]}}}}"#
    );
    std::fs::write(store.meta_dir().join("c@3"), text).unwrap();
    let m = store.read_meta("c", 3).unwrap().unwrap();
    assert_eq!(m.layer_hashes().unwrap(), [HASH_A]);
    assert_eq!(m.timestamp, 1500000000.0);
    assert_eq!(m.custom_meta, serde_json::json!({"x": [1, 2]}));
}

#[test]
fn listing_reads_names_and_revisions_and_skips_unknown_files() {
    let (_d, store) = new_repo();
    for (n, r) in [("b", 0), ("a", 2), ("a", 0), ("a", 10)] {
        store.put_meta(&meta(n, r, &[HASH_A])).unwrap();
    }
    std::fs::write(store.meta_dir().join("stray"), "x").unwrap();
    std::fs::write(store.meta_dir().join("bad name@1"), "x").unwrap();
    std::fs::write(store.meta_dir().join("x@-1"), "x").unwrap();
    let l = store.list().unwrap();
    assert_eq!(
        l.into_iter().collect::<Vec<_>>(),
        [
            ("a".to_string(), vec![0, 2, 10]),
            ("b".to_string(), vec![0])
        ]
    );
    assert_eq!(store.revisions("a").unwrap(), [0, 2, 10]);
    assert!(store.revisions("nope").unwrap().is_empty());
}

#[test]
fn corrupt_metadata_is_an_error_naming_the_file_but_not_for_the_others() {
    let (_d, store) = new_repo();
    store.put_meta(&meta("good", 0, &[HASH_A])).unwrap();
    std::fs::write(store.meta_dir().join("bad@0"), "{garbage").unwrap();
    std::fs::write(
        store.meta_dir().join("evil@0"),
        r#"{"name": "evil", "revision": 0, "kind": "vm", "owner": "x", "timestamp": 1.0, "data_blobs": ["../../../etc/passwd"]}"#,
    )
    .unwrap();
    let err = store.read_meta("bad", 0).unwrap_err().to_string();
    assert!(err.contains("bad@0"), "{err}");
    assert!(
        store.read_meta("evil", 0).is_err(),
        "a layer name must be a hash"
    );
    assert!(store.read_meta("good", 0).unwrap().is_some());
    let (good, bad) = store.all_metas().unwrap();
    assert_eq!(good.len(), 1);
    assert_eq!(bad.len(), 2);
}

#[test]
fn two_writers_racing_for_one_revision_give_exactly_one_winner() {
    let (_d, store) = new_repo();
    let store = Arc::new(store);
    for round in 0..20u64 {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|who| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut m = meta("race", round, &[HASH_A]);
                    m.owner = format!("writer{who}");
                    barrier.wait();
                    store.put_meta(&m).map(|()| who)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(loser, Error::AlreadyExists { .. }),
            "round {round}: {loser}"
        );
        let stored = store.read_meta("race", round).unwrap().unwrap();
        assert_eq!(stored.owner, format!("writer{}", winners[0]));
    }
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn a_published_revision_is_never_overwritten() {
    let (_d, store) = new_repo();
    store.put_meta(&meta("x", 0, &[HASH_A])).unwrap();
    let mut other = meta("x", 0, &[]);
    other.owner = "mallory".into();
    assert!(matches!(
        store.put_meta(&other),
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(store.read_meta("x", 0).unwrap().unwrap().owner, "root");
}

#[test]
fn adding_a_layer_names_it_by_its_sha256_with_mode_0444() {
    let (_d, store) = new_repo();
    let bytes = b"layer bytes".repeat(1000);
    let hash = add(&store, &bytes);
    assert_eq!(hash, sha(&bytes));
    let path = store.data_dir().join(&hash[..2]).join(&hash);
    assert_eq!(path, store.layer_path(&hash));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);
    assert!(store.has_layer(&hash));
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn adding_a_layer_twice_keeps_one_copy_and_leaves_tmp_empty() {
    let (_d, store) = new_repo();
    let h1 = add(&store, b"same");
    let ino = std::fs::metadata(store.layer_path(&h1)).unwrap().ino();
    let h2 = add(&store, b"same");
    assert_eq!(h1, h2);
    assert_eq!(
        std::fs::metadata(store.layer_path(&h1)).unwrap().ino(),
        ino,
        "the first copy stays"
    );
    assert!(tmp_entries(&store).is_empty(), "{:?}", tmp_entries(&store));
}

#[test]
fn a_dropped_scratch_file_disappears() {
    let (_d, store) = new_repo();
    let tmp = store.tmp_file().unwrap();
    let name = tmp
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("tmp") && name.len() == 11, "{name}");
    assert_eq!(tmp_entries(&store), [name]);
    drop(tmp);
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn a_layer_from_a_repository_on_the_same_filesystem_is_hard_linked() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open("a", &dir.path().join("a")).unwrap();
    let b = Store::open("b", &dir.path().join("b")).unwrap();
    let h = add(&a, b"shared layer");
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Linked);
    let ia = std::fs::metadata(a.layer_path(&h)).unwrap().ino();
    let ib = std::fs::metadata(b.layer_path(&h)).unwrap().ino();
    assert_eq!(ia, ib);
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Present);
    assert!(matches!(
        b.import_layer_from(&a, &"0".repeat(64)),
        Err(Error::NotFound { .. })
    ));
}

/// A layer linked from another repository becomes part of this one, so it is linked
/// only when nobody but the acting user (or root) can change it or its name: a layer
/// another user owns, a layer or a `data/XX/` writable by group or others, is copied
/// (its hash checked) instead. Without this, root importing into a repository of its
/// own a disk a user had imported first linked the user's file, and the user could
/// rewrite root's image.
#[test]
fn a_layer_someone_else_could_change_is_copied_not_linked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open("a", &dir.path().join("a")).unwrap();
    let inode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
    let chmod = |p: std::path::PathBuf, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // Group-writable layer.
    let h = add(&a, b"group writable");
    chmod(a.layer_path(&h), 0o464);
    let b = Store::open("b", &dir.path().join("b")).unwrap();
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Copied);
    assert_ne!(inode(a.layer_path(&h)), inode(b.layer_path(&h)));
    // A layer in a `data/XX/` others may write: its name is not to be trusted either,
    // and a file under a name its bytes do not match is refused.
    let h = add(&a, b"open directory");
    let xx = a.layer_path(&h).parent().unwrap().to_path_buf();
    chmod(xx.clone(), 0o777);
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Copied);
    let fake = format!("{}{}", &h[..2], "e".repeat(62));
    std::fs::write(xx.join(&fake), b"other bytes").unwrap();
    chmod(xx.join(&fake), 0o444);
    assert!(matches!(
        b.import_layer_from(&a, &fake),
        Err(Error::HashMismatch { .. })
    ));
    // A layer of our own in directories of our own is still linked.
    let h = add(&a, b"ours");
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Linked);
    // Another user's layer (needs root to make one).
    if crate::sys::euid() != 0 {
        crate::testutil::skip("making another user's layer needs root");
        return;
    }
    let h = add(&a, b"another user's");
    std::os::unix::fs::chown(a.layer_path(&h), Some(65534), Some(65534)).unwrap();
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Copied);
    let copied = std::fs::metadata(b.layer_path(&h)).unwrap();
    assert_ne!(copied.ino(), inode(a.layer_path(&h)));
    assert_eq!(copied.uid(), 0, "the copy is the importer's");
    // The same for a `data/XX/` another user owns, the layer being root's.
    let h = add(&a, b"root's, named by another user");
    let xx = a.layer_path(&h).parent().unwrap().to_path_buf();
    std::os::unix::fs::chown(&xx, Some(65534), Some(65534)).unwrap();
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Copied);
}

#[test]
fn sparse_copy_keeps_holes_and_hashes_the_whole_content() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let f = std::fs::File::create(&src).unwrap();
    let size = 64u64 << 20;
    f.set_len(size).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
    drop(f);
    let dst = dir.path().join("dst");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&dst)
        .unwrap();
    let src_file = std::fs::File::open(&src).unwrap();
    let h = sparse_copy_hashing(&src_file, &src, &out, &dst).unwrap();
    assert_eq!(h, sha(&std::fs::read(&src).unwrap()));
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    let m = std::fs::metadata(&dst).unwrap();
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "copy is sparse: {} blocks",
        m.blocks()
    );
}

#[test]
fn deleting_revisions_removes_metadata_only() {
    let (_d, store) = new_repo();
    let h = add(&store, b"l");
    for r in 0..3 {
        store.put_meta(&meta("img", r, &[&h])).unwrap();
    }
    store.delete_revision("img", 1).unwrap();
    assert_eq!(store.revisions("img").unwrap(), [0, 2]);
    assert!(matches!(
        store.delete_revision("img", 1),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(store.delete_image("img").unwrap(), [0, 2]);
    assert!(store.revisions("img").unwrap().is_empty());
    assert!(store.has_layer(&h), "delete never removes layers");
}

#[test]
fn renaming_an_image_moves_every_revision_and_keeps_owner_and_time() {
    let (_d, store) = new_repo();
    let mut m0 = meta("old", 0, &[HASH_A]);
    m0.owner = "alice".into();
    m0.timestamp = 1500000000.5;
    store.put_meta(&m0).unwrap();
    store.put_meta(&meta("old", 1, &[HASH_A])).unwrap();
    store.rename_image("old", "new").unwrap();
    assert!(store.revisions("old").unwrap().is_empty());
    assert_eq!(store.revisions("new").unwrap(), [0, 1]);
    let n0 = store.read_meta("new", 0).unwrap().unwrap();
    assert_eq!(
        (n0.name.as_str(), n0.owner.as_str(), n0.timestamp),
        ("new", "alice", 1500000000.5)
    );
}

#[test]
fn renaming_onto_an_existing_image_changes_nothing() {
    let (_d, store) = new_repo();
    store.put_meta(&meta("a", 0, &[HASH_A])).unwrap();
    store.put_meta(&meta("b", 5, &[HASH_A])).unwrap();
    assert!(matches!(
        store.rename_image("a", "b"),
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(store.revisions("a").unwrap(), [0]);
    assert_eq!(store.revisions("b").unwrap(), [5]);
}

fn age(path: &std::path::Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn gc_keeps_referenced_layers_and_fresh_scratch_and_removes_the_rest() {
    let (_d, store) = new_repo();
    let kept = add(&store, b"referenced");
    let orphan = add(&store, b"orphan");
    store.put_meta(&meta("img", 0, &[&kept])).unwrap();
    let fresh = store.tmp_file().unwrap().keep();
    let stale = store.tmp_file().unwrap().keep();
    age(&stale, 7200);
    std::fs::create_dir(store.tmp_dir().join("stale-dir")).unwrap();
    std::fs::write(store.tmp_dir().join("stale-dir/f"), "x").unwrap();
    let sd = store.tmp_dir().join("stale-dir");
    let t = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::open(&sd).unwrap().set_modified(t).unwrap();

    // Within the grace period the orphan layer survives: an import may be publishing.
    let r = store.gc(DEFAULT_GRACE).unwrap();
    assert_eq!(r.layers_kept_fresh, vec![orphan.clone()]);
    assert!(r.layers_removed.is_empty());
    assert!(store.has_layer(&orphan));
    assert!(fresh.exists(), "fresh scratch kept");
    assert!(!stale.exists(), "stale scratch removed");
    assert!(!sd.exists(), "stale scratch directory removed");
    assert_eq!(r.tmp_removed.len(), 2);

    let r = store.gc(Duration::ZERO).unwrap();
    assert_eq!(r.layers_removed, vec![orphan.clone()]);
    assert!(!store.has_layer(&orphan));
    assert!(
        !store.data_dir().join(&orphan[..2]).exists() || orphan[..2] == kept[..2],
        "emptied data/XX removed"
    );
    assert!(store.has_layer(&kept));
    assert_eq!(
        store.read_meta("img", 0).unwrap().unwrap().data_blobs,
        [kept]
    );
}

#[test]
fn gc_removes_no_layer_while_some_metadata_is_unreadable() {
    let (_d, store) = new_repo();
    let orphan = add(&store, b"orphan");
    std::fs::write(store.meta_dir().join("broken@0"), "{").unwrap();
    let r = store.gc(Duration::ZERO).unwrap();
    assert!(r.layers_skipped);
    assert!(store.has_layer(&orphan));
}

const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Builds pcocc's version 1 layout by hand: `.config` 1, one layer, one YAML revision
/// at `meta/XX/sha256("old\n0")`.
fn v1_repo(root: &std::path::Path) -> String {
    for d in ["data", "meta", ".tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join(".config"), "version: 1\n").unwrap();
    let layer = b"legacy layer";
    let h = sha(layer);
    std::fs::create_dir_all(root.join("data").join(&h[..2])).unwrap();
    std::fs::write(root.join("data").join(&h[..2]).join(&h), layer).unwrap();
    let m = sha(b"old\n0");
    assert_eq!(
        m, "302986acd1d318a548a7a42de2115c3d34e73102e06d55b9947aa6c23d2bb321",
        "the name pcocc gives old@0"
    );
    std::fs::create_dir_all(root.join("meta").join(&m[..2])).unwrap();
    let yaml = format!(
        "custom_meta: {{}}\ndata_blobs:\n- {h}\nkind: vm\nname: old\nowner: someone\nrevision: 0\ntimestamp: 1500000000.5\n"
    );
    std::fs::write(root.join("meta").join(&m[..2]).join(&m), yaml).unwrap();
    h
}

#[test]
fn a_version_1_repository_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let h = v1_repo(dir.path());
    let store = Store::open("legacy", dir.path()).unwrap();
    assert_eq!(store.version(), 1);
    assert_eq!(
        store.list().unwrap().into_iter().collect::<Vec<_>>(),
        [("old".to_string(), vec![0])]
    );
    let m = store.read_meta("old", 0).unwrap().unwrap();
    assert_eq!(
        (m.owner.as_str(), m.timestamp, m.data_blobs.clone()),
        ("someone", 1500000000.5, vec![h])
    );
}

#[test]
fn gc_upgrades_a_version_1_repository_like_pcocc() {
    let dir = tempfile::tempdir().unwrap();
    let h = v1_repo(dir.path());
    let store = Store::open("legacy", dir.path()).unwrap();
    let r = store.gc(DEFAULT_GRACE).unwrap();
    assert!(r.upgraded);
    assert_eq!(store.version(), 2);
    let root = dir.path();
    assert_eq!(
        std::fs::read_to_string(root.join(".config")).unwrap(),
        "version: 2\n"
    );
    assert!(root.join("meta.old/30").is_dir(), "old metadata kept aside");
    assert_eq!(
        std::fs::read_to_string(root.join("meta/old@0")).unwrap(),
        format!(
            r#"{{"name": "old", "revision": 0, "kind": "vm", "owner": "someone", "timestamp": 1500000000.5, "data_blobs": ["{h}"], "custom_meta": {{}}}}"#
        )
    );
    assert!(store.has_layer(&h));
    assert!(tmp_entries(&store).is_empty());
    assert_eq!(Store::open("legacy", root).unwrap().version(), 2);
}

#[test]
fn writing_into_a_version_1_repository_upgrades_it_first() {
    let dir = tempfile::tempdir().unwrap();
    v1_repo(dir.path());
    let store = Store::open("legacy", dir.path()).unwrap();
    store.put_meta(&meta("new", 0, &[HASH_A])).unwrap();
    assert_eq!(store.version(), 2);
    assert_eq!(store.revisions("old").unwrap(), [0]);
    assert_eq!(store.revisions("new").unwrap(), [0]);
}

#[test]
fn a_layer_from_another_filesystem_is_copied_sparsely_and_verified() {
    // /dev/shm is a tmpfs on Linux: a different filesystem from the temp dir's.
    let shm = std::path::Path::new("/dev/shm");
    let (Ok(a_dir), Ok(b_dir)) = (tempfile::tempdir_in(shm), tempfile::tempdir()) else {
        crate::testutil::skip("no /dev/shm");
        return;
    };
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    if dev(a_dir.path()) == dev(b_dir.path()) {
        crate::testutil::skip("/dev/shm and the temp dir share a filesystem");
        return;
    }
    let a = Store::open("a", &a_dir.path().join("a")).unwrap();
    let b = Store::open("b", &b_dir.path().join("b")).unwrap();
    // A sparse layer: 8 MiB with data only at both ends.
    let tmp = a.tmp_file().unwrap();
    use std::os::unix::fs::FileExt;
    tmp.file().set_len(8 << 20).unwrap();
    tmp.file().write_all_at(b"start", 0).unwrap();
    tmp.file().write_all_at(b"end", (8 << 20) - 3).unwrap();
    let h = a.add_layer(tmp, None).unwrap();
    assert_eq!(b.import_layer_from(&a, &h).unwrap(), LayerTransfer::Copied);
    let copied = b.layer_path(&h);
    assert_eq!(sha(&std::fs::read(&copied).unwrap()), h);
    let m = std::fs::metadata(&copied).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o444);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "holes stay holes: {} blocks",
        m.blocks()
    );
    assert!(tmp_entries(&b).is_empty());
}

#[test]
fn a_copied_layer_that_does_not_match_its_name_is_refused() {
    let shm = std::path::Path::new("/dev/shm");
    let (Ok(a_dir), Ok(b_dir)) = (tempfile::tempdir_in(shm), tempfile::tempdir()) else {
        crate::testutil::skip("no /dev/shm");
        return;
    };
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    if dev(a_dir.path()) == dev(b_dir.path()) {
        crate::testutil::skip("/dev/shm and the temp dir share a filesystem");
        return;
    }
    let a = Store::open("a", &a_dir.path().join("a")).unwrap();
    let b = Store::open("b", &b_dir.path().join("b")).unwrap();
    let fake = "ab".repeat(32);
    let path = a.layer_path(&fake);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"not what the name says").unwrap();
    assert!(matches!(
        b.import_layer_from(&a, &fake),
        Err(Error::HashMismatch { .. })
    ));
    assert!(!b.has_layer(&fake));
    assert!(tmp_entries(&b).is_empty(), "the rejected copy is removed");
}

#[test]
fn layer_names_accept_a_sha256_prefix_and_nothing_else() {
    assert_eq!(parse_blob(HASH_A), Ok(HASH_A));
    assert_eq!(parse_blob(&format!("sha256:{HASH_A}")), Ok(HASH_A));
    assert_eq!(
        parse_blob(&format!("md5:{HASH_A}")).unwrap_err(),
        "Only sha256 is supported currently (md5)"
    );
    assert!(parse_blob(&HASH_A.to_uppercase()).is_err());
    assert!(parse_blob("../../etc/passwd").is_err());
    assert!(parse_blob(&HASH_A[1..]).is_err());
}

#[test]
fn a_layer_or_layer_directory_symlinked_outside_data_is_refused() {
    let (dir, store) = new_repo();
    let good = add(&store, b"inside");
    let (mut f, _) = store.open_layer(&good).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
    assert_eq!(bytes, b"inside");
    let secret = dir.path().join("secret");
    fs::write(&secret, b"secret").unwrap();
    let h = sha(b"secret");
    fs::create_dir_all(store.layer_path(&h).parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&secret, store.layer_path(&h)).unwrap();
    let err = store.open_layer(&h).unwrap_err().to_string();
    assert!(err.contains("symbolic links"), "{err}");
    // A whole data/XX/ directory pointing elsewhere.
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let h2 = format!("ee{}", &h[2..]);
    fs::write(outside.join(&h2), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, store.data_dir().join("ee")).unwrap();
    assert!(store.open_layer(&h2).is_err());
    // A symlink from another repository is not linked or copied in either.
    let (_d2, other) = new_repo();
    assert!(other.import_layer_from(&store, &h).is_err());
    assert!(!other.has_layer(&h));
}

#[test]
fn metadata_that_is_a_symlink_is_not_followed() {
    let (dir, store) = new_repo();
    let h = add(&store, b"layer");
    let elsewhere = dir.path().join("elsewhere");
    fs::write(&elsewhere, meta("x", 0, &[&h]).to_json()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, store.meta_path("x", 0)).unwrap();
    assert!(store.read_meta("x", 0).is_err());
}

/// Publishes `name@rev` owned by `owner` at `ts`, as another host or pcocc would.
fn publish(store: &Store, name: &str, rev: u64, owner: &str, ts: f64) {
    let mut m = meta(name, rev, &[HASH_A]);
    m.owner = owner.to_string();
    m.timestamp = ts;
    store.put_meta(&m).unwrap();
}

#[test]
fn parsed_metadata_is_reused_while_its_file_is_unchanged() {
    let (_d, store) = new_repo();
    for rev in 0..3 {
        publish(&store, "img", rev, "root", 1500000000.0 + rev as f64);
    }
    for _ in 0..3 {
        for rev in 0..3 {
            let cached = store.read_meta_cached("img", rev).unwrap().unwrap();
            assert_eq!(
                Some(&*cached),
                store.read_meta("img", rev).unwrap().as_ref()
            );
        }
    }
    // Three uncached reads per round above, and each file parsed once for the cache.
    assert_eq!(store.meta_files_read(), 3 * 3 + 3);
    assert_eq!(store.read_meta_cached("img", 7).unwrap(), None);
    assert_eq!(store.read_meta_cached("no/such", 0).unwrap(), None);
}

#[test]
fn a_revision_deleted_and_published_again_under_its_name_is_read_afresh() {
    let (_d, store) = new_repo();
    publish(&store, "img", 0, "root", 1500000000.0);
    assert_eq!(
        store.read_meta_cached("img", 0).unwrap().unwrap().owner,
        "root"
    );
    store.delete_revision("img", 0).unwrap();
    assert_eq!(store.read_meta_cached("img", 0).unwrap(), None);
    publish(&store, "img", 0, "alice", 1600000000.0);
    let m = store.read_meta_cached("img", 0).unwrap().unwrap();
    assert_eq!((m.owner.as_str(), m.timestamp), ("alice", 1600000000.0));

    // Replaced in one step by another host (a new file renamed over the name).
    let path = store.meta_path("img", 0);
    let mut other = meta("img", 0, &[HASH_A]);
    other.owner = "bob".to_string();
    let tmp = store.tmp_dir().join("other");
    std::fs::write(&tmp, other.to_json()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(
        store.read_meta_cached("img", 0).unwrap().unwrap().owner,
        "bob"
    );
}

#[test]
fn corrupt_metadata_is_an_error_through_the_cache_too_and_stays_one() {
    let (_d, store) = new_repo();
    std::fs::write(store.meta_path("img", 0), b"{not json").unwrap();
    for _ in 0..2 {
        let err = store.read_meta_cached("img", 0).unwrap_err();
        assert!(err.to_string().contains("img@0"), "{err}");
    }
    assert_eq!(store.meta_files_read(), 2);
}

#[test]
fn reading_ahead_parses_each_listed_revision_once_and_fills_the_cache() {
    let (_d, store) = new_repo();
    let store = Arc::new(store);
    let count = 50;
    for rev in 0..count {
        publish(&store, "img", rev, "root", 1500000000.0 + rev as f64);
    }
    let revs: Vec<(String, u64)> = (0..count).map(|r| ("img".to_string(), r)).collect();
    let threads = store.prefetch_meta(revs.clone());
    assert!(!threads.is_empty());
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.meta_files_read(), count);
    for rev in 0..count {
        let m = store.read_meta_cached("img", rev).unwrap().unwrap();
        assert_eq!((m.revision, m.timestamp), (rev, 1500000000.0 + rev as f64));
    }
    // Nothing left to read: neither the listing nor a second read-ahead opens a file.
    assert!(store.prefetch_meta(revs).is_empty());
    assert_eq!(store.meta_files_read(), count);
}
