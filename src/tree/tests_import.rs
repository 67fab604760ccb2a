//! Imports through the tree — `pcocc image import`/`export`, files created and written
//! like `cp` does, staging names, mkdir, link — judged by qemu-img and by the repository
//! files pcocc would read.

use super::tests::{Fixture, node_image, node_repo};
use super::*;
use crate::testutil::{have_qemu, qemu_img, qemu_io};
use std::path::Path;

/// Virtual size of import sources: small, with data at both ends and holes between.
const SRC_SIZE: &str = "8M";

/// A `fmt` image at `dir/name` holding two patterns and holes, made by qemu-img.
fn source(dir: &Path, fmt: &str, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", fmt, p.to_str().unwrap(), SRC_SIZE]);
    qemu_io(fmt, &p, &["write -P 0x5a 0 64k", "write -P 0xa5 7M 192k"]);
    p
}

fn tmp_is_empty(f: &Fixture, repo: &str) -> bool {
    std::fs::read_dir(f.repo(repo).join(".tmp"))
        .unwrap()
        .next()
        .is_none()
}

fn layer_of(f: &Fixture, repo: &str, meta: &Meta) -> PathBuf {
    let h = meta.top_layer().unwrap().unwrap();
    f.repo(repo).join("data").join(&h[..2]).join(h)
}

/// The checks every successful import must pass: the stored layer is a clean
/// standalone qcow2 equal to the source, 0444, and the metadata is pcocc's JSON.
fn assert_published(f: &Fixture, repo: &str, meta: &Meta, src: &Path, src_fmt: &str) {
    let layer = layer_of(f, repo, meta);
    let l = layer.to_str().unwrap();
    qemu_img(&["check", "-q", "-f", "qcow2", l]);
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        src_fmt,
        l,
        src.to_str().unwrap(),
    ]);
    assert!(out.contains("Images are identical"), "{out}");
    let info = qemu_img(&["info", "--output=json", l]);
    assert!(!info.contains("backing-filename"), "{info}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&layer).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444);
    let text = std::fs::read_to_string(
        f.repo(repo)
            .join("meta")
            .join(format!("{}@{}", meta.name, meta.revision)),
    )
    .unwrap();
    let prefix = format!(
        r#"{{"name": "{}", "revision": {}, "kind": "vm", "owner": "{}", "timestamp": "#,
        meta.name,
        meta.revision,
        access::user_name(f.me.uid)
    );
    assert!(text.starts_with(&prefix), "{text}");
    assert!(
        text.ends_with(&format!(
            r#", "data_blobs": ["{}"], "custom_meta": {{}}}}"#,
            meta.top_layer().unwrap().unwrap()
        )),
        "{text}"
    );
    assert!(tmp_is_empty(f, repo));
}

#[test]
fn import_file_then_export_file_round_trips_every_format() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for format in Format::ALL {
        let name = format.name();
        let src = source(dir.path(), name, &format!("src.{name}"));
        let dest = Uri::parse(&format!("user:{name}img@7")).unwrap();
        let mut calls = 0;
        let got = f
            .tree
            .import_file(&f.me, &src, None, &dest, &mut |_, _| calls += 1)
            .unwrap();
        assert_eq!((got.repo.as_str(), got.meta.revision), ("user", 0));
        assert!(calls > 0);
        assert_published(&f, "user", &got.meta, &src, name);
        hashes.push(got.meta.data_blobs[0].clone());
        // Export in every format compares identical to the source.
        for out_fmt in Format::ALL {
            let out = dir.path().join(format!("out-{name}.{}", out_fmt.name()));
            let uri = Uri::parse(&format!("user:{name}img")).unwrap();
            f.tree
                .export_file(&f.me, &uri, out_fmt, &out, &mut |_, _| {})
                .unwrap();
            let o = qemu_img(&[
                "compare",
                "-f",
                out_fmt.name(),
                "-F",
                name,
                out.to_str().unwrap(),
                src.to_str().unwrap(),
            ]);
            assert!(
                o.contains("Images are identical"),
                "{name} → {out_fmt}: {o}"
            );
        }
        // The raw export is sparse: far less allocated than its size.
        use std::os::unix::fs::MetadataExt;
        let raw = std::fs::metadata(dir.path().join(format!("out-{name}.raw"))).unwrap();
        assert!(
            raw.blocks() * 512 < raw.len() / 4,
            "{name}: raw export not sparse"
        );
    }
    // Same content, same layer: every format converted to one deduplicated layer, but
    // VHD, whose size is rounded to a disk geometry (qemu's CHS rule) and so differs.
    let vpc = Format::ALL.iter().position(|&f| f == Format::Vpc).unwrap();
    let others: Vec<_> = (0..hashes.len()).filter(|&i| i != vpc).collect();
    assert!(others.iter().all(|&i| hashes[i] == hashes[0]), "{hashes:?}");
    assert_eq!(f.data_files("user").len(), 2);
}

#[test]
fn import_file_refuses_an_existing_name_and_forced_mismatches_like_pcocc() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "qcow2", "a.qcow2");
    let dest = Uri::parse("img").unwrap();
    f.tree
        .import_file(&f.me, &src, None, &dest, &mut |_, _| {})
        .unwrap();
    let err = f
        .tree
        .import_file(&f.me, &src, None, &dest, &mut |_, _| {})
        .unwrap_err();
    assert_eq!(err.to_string(), "Image img already exists in repo user");
    let err = f
        .tree
        .import_file(
            &f.me,
            &src,
            Some(Format::Raw),
            &Uri::parse("other").unwrap(),
            &mut |_, _| {},
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Mismatch between specified format raw and detected image type qcow2"
    );
    let missing = dir.path().join("missing.qcow2");
    let err = f
        .tree
        .import_file(
            &f.me,
            &missing,
            None,
            &Uri::parse("m").unwrap(),
            &mut |_, _| {},
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "Could not detect image format");
    // Export refuses to overwrite a file holding another format.
    let err = f
        .tree
        .export_file(&f.me, &dest, Format::Raw, &src, &mut |_, _| {})
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Mismatch between specified format raw and detected image type qcow2"
    );
    assert!(tmp_is_empty(&f, "user"));
}

/// Writes `src` into an open import handle in 1 MiB pieces, last piece first, skipping
/// all-zero pieces after an ftruncate to the full size (what `cp --sparse` does, but out
/// of order).
fn write_like_cp(f: &Fixture, node: &Node, h: &OpenFile, src: &Path) {
    let bytes = std::fs::read(src).unwrap();
    let set = SetAttr {
        size: Some(bytes.len() as u64),
        ..SetAttr::default()
    };
    f.tree.setattr(&f.me, node, Some(h), &set).unwrap();
    let pieces: Vec<(usize, &[u8])> = bytes
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| (i << 20, c))
        .collect();
    for (off, piece) in pieces.into_iter().rev() {
        if piece.iter().any(|&b| b != 0) {
            assert_eq!(h.write(piece, off as u64).unwrap(), piece.len());
        }
    }
    assert_eq!(h.attr().unwrap().size, bytes.len() as u64);
}

#[test]
fn a_file_written_into_a_repository_becomes_a_new_image_at_close() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let other = Caller {
        uid: f.me.uid + 1,
        gid: f.me.gid,
        groups: vec![],
    };
    for format in Format::ALL {
        let name = format.name();
        let src = source(dir.path(), name, &format!("s-{name}"));
        let file = format!("new-{name}.{name}");
        let (node, attr, h) = f
            .tree
            .create(&f.me, &node_repo("user"), &file, 0o644)
            .unwrap();
        assert_eq!((attr.size, attr.kind), (0, NodeType::RegularFile));
        // cp writes into it in pieces of the largest FUSE request.
        assert_eq!(attr.blksize, crate::tree::IMPORT_BLKSIZE);
        // Only the writer sees the file being imported.
        assert_eq!(
            f.tree.lookup(&f.me, &node_repo("user"), &file).unwrap(),
            node
        );
        let listed = f.tree.readdir(&f.me, &node_repo("user")).unwrap();
        assert!(listed.iter().any(|e| e.name == file));
        assert!(f.tree.lookup(&other, &node_repo("user"), &file).is_err());
        let listed = f.tree.readdir(&other, &node_repo("user")).unwrap();
        assert!(!listed.iter().any(|e| e.name == file));
        write_like_cp(&f, &node, &h, &src);
        // Closing a reader that peeked at the file publishes nothing.
        let peek = f.tree.open(&f.me, &node, false, false).unwrap();
        assert_eq!(peek.flush(true).unwrap(), Changes::default());
        peek.release();
        assert!(f.tree.lookup(&f.me, &node_repo("user"), &file).is_ok());
        f.tree.setxattr(&f.me, &node).unwrap();
        let times = SetAttr {
            mode: Some(0o600),
            times: true,
            ..SetAttr::default()
        };
        f.tree.setattr(&f.me, &node, Some(&h), &times).unwrap();
        let changes = h.flush(true).unwrap();
        let image = format!("new-{name}");
        assert!(changes.entries.contains(&(node_repo("user"), file.clone())));
        assert!(
            changes
                .entries
                .contains(&(node_repo("user"), image.clone()))
        );
        h.release();
        let meta = f
            .tree
            .resolve(&f.me, &Uri::parse(&image).unwrap())
            .unwrap()
            .meta;
        assert_eq!(meta.revision, 0);
        assert_published(&f, "user", &meta, &src, name);
        // The file's name is gone from listings; for a moment it still answers its
        // writer's metadata calls (install -m), never anyone else's.
        let listed = f.tree.readdir(&f.me, &node_repo("user")).unwrap();
        assert!(listed.iter().all(|e| e.name != file), "{file} still listed");
        let other = Caller {
            uid: f.me.uid + 1,
            ..f.me.clone()
        };
        if file != image {
            assert!(f.tree.lookup(&other, &node_repo("user"), &file).is_err());
        }
        let img = f.tree.lookup(&f.me, &node_repo("user"), &image).unwrap();
        assert_eq!(img, node_image("user", &image));
    }
}

#[test]
fn a_file_written_into_an_image_directory_becomes_its_next_revision() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let first = source(dir.path(), "qcow2", "first.qcow2");
    f.tree
        .import_file(
            &f.me,
            &first,
            None,
            &Uri::parse("img").unwrap(),
            &mut |_, _| {},
        )
        .unwrap();
    for (i, format) in Format::ALL.into_iter().enumerate() {
        let name = format.name();
        let src = dir.path().join(format!("next.{name}"));
        qemu_img(&["create", "-q", "-f", name, src.to_str().unwrap(), "8M"]);
        qemu_io(name, &src, &[&format!("write -P {} 1M 64k", i + 1)]);
        // No suffix in the name: the content tells the format.
        let parent = node_image("user", "img");
        let (node, _, h) = f.tree.create(&f.me, &parent, "upload", 0o644).unwrap();
        write_like_cp(&f, &node, &h, &src);
        let changes = h.flush(true).unwrap();
        h.release();
        let rev = i as u64 + 1;
        assert!(
            changes
                .entries
                .contains(&(parent.clone(), format!("@{rev}")))
        );
        let meta = f
            .tree
            .resolve(&f.me, &Uri::parse("img").unwrap())
            .unwrap()
            .meta;
        assert_eq!(meta.revision, rev);
        assert_published(&f, "user", &meta, &src, name);
        assert_eq!(
            f.tree
                .readlink(
                    &f.me,
                    &Node::Latest {
                        repo: "user".into(),
                        image: "img".into(),
                    }
                )
                .unwrap(),
            format!("@{rev}")
        );
    }
}

#[test]
fn a_failed_import_fails_at_close_and_leaves_nothing() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let vmdk = source(dir.path(), "vmdk", "t.vmdk");
    let mut truncated = std::fs::read(&vmdk).unwrap();
    truncated.truncate(truncated.len() / 2);
    let cases: [(&str, Vec<u8>); 2] = [
        (
            "x.qcow2",
            b"this is a text file, not a qcow2 image\n".to_vec(),
        ),
        ("t.vmdk", truncated),
    ];
    for (file, bytes) in cases {
        let (node, _, h) = f
            .tree
            .create(&f.me, &node_repo("user"), file, 0o644)
            .unwrap();
        h.write(&bytes, 0).unwrap();
        let err = h.flush(true).unwrap_err();
        assert!(matches!(err.errno(), libc::EIO | libc::EINVAL), "{err}");
        h.release();
        assert!(f.tree.lookup(&f.me, &node_repo("user"), file).is_err());
        assert!(f.tree.getattr(&f.me, &node).is_err());
        let stem = file.split('.').next().unwrap();
        assert!(f.tree.lookup(&f.me, &node_repo("user"), stem).is_err());
        assert!(
            std::fs::read_dir(f.repo("user").join("meta"))
                .unwrap()
                .next()
                .is_none()
        );
        assert!(tmp_is_empty(&f, "user"), "{file}");
    }
    // A file released without being flushed is discarded too.
    let (_, _, h) = f
        .tree
        .create(&f.me, &node_repo("user"), "gone.raw", 0o644)
        .unwrap();
    h.write(b"abc", 0).unwrap();
    h.release();
    assert!(tmp_is_empty(&f, "user"));
}

#[test]
fn a_staging_file_publishes_only_when_renamed_to_a_proper_name() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "qcow2", "s.qcow2");
    let repo = node_repo("user");
    // qemu-img creates the file empty and closes it before writing: an empty file passes.
    let (node, _, h) = f.tree.create(&f.me, &repo, ".new.part", 0o644).unwrap();
    assert_eq!(h.flush(true).unwrap(), Changes::default());
    write_like_cp(&f, &node, &h, &src);
    assert_eq!(h.flush(true).unwrap(), Changes::default());
    h.release();
    // Still there for its writer: reopen, read back, stat, flush again.
    assert_eq!(f.tree.lookup(&f.me, &repo, ".new.part").unwrap(), node);
    let h = f.tree.open(&f.me, &node, true, false).unwrap();
    let mut head = [0u8; 4];
    assert_eq!(h.read(&mut head, 0).unwrap(), 4);
    assert_eq!(&head, b"QFI\xfb");
    h.flush(true).unwrap();
    h.release();
    assert!(
        std::fs::read_dir(f.repo("user").join("meta"))
            .unwrap()
            .next()
            .is_none()
    );
    // Staging to staging is a rename in memory; to a proper name publishes.
    let kept = f.tree.open(&f.me, &node, false, false).unwrap();
    f.tree
        .rename_entry(&f.me, &repo, ".new.part", &repo, ".new")
        .unwrap();
    // A handle open across the rename still reads the file, as on any filesystem.
    assert_eq!(kept.read(&mut head, 0).unwrap(), 4);
    kept.release();
    let changes = f
        .tree
        .rename_entry(&f.me, &repo, ".new", &repo, "new.qcow2")
        .unwrap();
    assert!(changes.entries.contains(&(repo.clone(), "new".to_string())));
    let meta = f
        .tree
        .resolve(&f.me, &Uri::parse("new").unwrap())
        .unwrap()
        .meta;
    assert_published(&f, "user", &meta, &src, "qcow2");
    assert!(f.tree.lookup(&f.me, &repo, ".new").is_err());

    // Bad content fails the staging file's close, and it can be unlinked.
    let (node, _, h) = f.tree.create(&f.me, &repo, ".bad", 0o644).unwrap();
    h.write(b"QFI\xfbnot really", 0).unwrap();
    assert!(h.flush(true).is_err());
    h.release();
    assert!(f.tree.getattr(&f.me, &node).is_ok());
    assert!(
        f.tree
            .rename_entry(&f.me, &repo, ".bad", &repo, "bad")
            .is_err()
    );
    f.tree.unlink_entry(&f.me, &repo, ".bad").unwrap();
    assert!(f.tree.getattr(&f.me, &node).is_err());
    assert!(tmp_is_empty(&f, "user"));
}

#[test]
fn mkdir_makes_an_empty_image_directory_that_an_import_fills() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "raw", "s.raw");
    let repo = node_repo("user");
    let (node, attr) = f.tree.mkdir(&f.me, &repo, "fresh").unwrap();
    assert_eq!(
        (node.clone(), attr.kind),
        (node_image("user", "fresh"), NodeType::Directory)
    );
    assert!(f.tree.readdir(&f.me, &node).unwrap().is_empty());
    assert!(
        f.tree
            .readdir(&f.me, &repo)
            .unwrap()
            .iter()
            .any(|e| e.name == "fresh")
    );
    assert_eq!(
        f.tree.mkdir(&f.me, &repo, "fresh").unwrap_err().errno(),
        libc::EEXIST
    );
    // Nothing but a revision directory could be made in it, and none can be.
    assert_eq!(
        f.tree.mkdir(&f.me, &node, "sub").unwrap_err().errno(),
        libc::EPERM
    );
    assert!(f.tree.lookup(&f.me, &repo, "fresh").is_ok());
    // `cp -r IMAGE R/copy`: mkdir copy, then mkdir copy/@0, refused, which drops the
    // empty directory its maker just made: the copy fails leaving nothing.
    let (copy, _) = f.tree.mkdir(&f.me, &repo, "copy").unwrap();
    assert_eq!(
        f.tree.mkdir(&f.me, &copy, "@0").unwrap_err().errno(),
        libc::EPERM
    );
    assert_eq!(
        f.tree.lookup(&f.me, &repo, "copy").unwrap_err().errno(),
        libc::ENOENT
    );
    assert!(f.tree.getattr(&f.me, &copy).is_err());
    assert!(
        !f.tree
            .readdir(&f.me, &repo)
            .unwrap()
            .iter()
            .any(|e| e.name == "copy")
    );
    assert_eq!(
        f.tree.mkdir(&f.me, &copy, "@1").unwrap_err().errno(),
        libc::EPERM
    );
    // cp -a sets the times and mode of the directory it made.
    let times = SetAttr {
        mode: Some(0o755),
        times: true,
        ..SetAttr::default()
    };
    f.tree.setattr(&f.me, &node, None, &times).unwrap();
    // An empty directory goes with rmdir.
    f.tree.mkdir(&f.me, &repo, "empty").unwrap();
    f.tree.rmdir_entry(&f.me, &repo, "empty").unwrap();
    assert!(f.tree.lookup(&f.me, &repo, "empty").is_err());
    // A file copied into the new directory makes revision 0.
    let (inode, _, h) = f.tree.create(&f.me, &node, "s.raw", 0o644).unwrap();
    write_like_cp(&f, &inode, &h, &src);
    // A refused revision directory does not drop a directory being written into.
    assert_eq!(
        f.tree.mkdir(&f.me, &node, "@0").unwrap_err().errno(),
        libc::EPERM
    );
    assert!(f.tree.lookup(&f.me, &repo, "fresh").is_ok());
    h.flush(true).unwrap();
    h.release();
    let meta = f
        .tree
        .resolve(&f.me, &Uri::parse("fresh").unwrap())
        .unwrap()
        .meta;
    assert_eq!(meta.revision, 0);
    assert_published(&f, "user", &meta, &src, "raw");
    let listed = f.tree.readdir(&f.me, &node).unwrap();
    assert_eq!(
        listed.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["latest", "@0"]
    );
}

#[test]
fn link_copies_a_revision_without_new_layers() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let before = f.data_files("user");
    let src = Node::File {
        repo: "user".into(),
        image: "img1".into(),
        rev: 1,
        file: FileKind::View(Format::Qcow2),
    };
    let (node, attr, changes) = f
        .tree
        .link(&f.me, &src, &node_repo("user"), "copy.qcow2")
        .unwrap();
    assert_eq!(node, src);
    assert_eq!(attr.kind, NodeType::RegularFile);
    assert!(
        changes
            .entries
            .contains(&(node_repo("user"), "copy".to_string()))
    );
    assert_eq!(f.data_files("user"), before);
    let meta = f
        .tree
        .resolve(&f.me, &Uri::parse("copy").unwrap())
        .unwrap()
        .meta;
    let orig = f
        .tree
        .resolve(&f.me, &Uri::parse("img1@1").unwrap())
        .unwrap()
        .meta;
    assert_eq!((meta.revision, &meta.data_blobs), (0, &orig.data_blobs));
    // Writes and creates inside a revision are refused.
    let rev = super::tests::node_rev("user", "img1", 1);
    assert_eq!(
        f.tree
            .create(&f.me, &rev, "x", 0o644)
            .err()
            .unwrap()
            .errno(),
        libc::EROFS
    );
    assert_eq!(
        f.tree.mkdir(&f.me, &rev, "x").unwrap_err().errno(),
        libc::EROFS
    );
}

#[test]
fn parents_statfs_access_and_xattrs_answer_for_every_node() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let file = Node::File {
        repo: "user".into(),
        image: "img1".into(),
        rev: 0,
        file: FileKind::MetaJson,
    };
    let rev = parent(&file).unwrap();
    assert_eq!(rev, super::tests::node_rev("user", "img1", 0));
    assert_eq!(parent(&rev), Some(node_image("user", "img1")));
    assert_eq!(parent(&node_image("user", "img1")), Some(node_repo("user")));
    assert_eq!(parent(&node_repo("user")), Some(Node::Root));
    assert_eq!(parent(&Node::Root), None);
    let s = f.tree.statfs().unwrap();
    assert!(s.blocks > 0 && s.bsize > 0);
    f.tree.access(&f.me, &file, libc::R_OK).unwrap();
    assert_eq!(
        f.tree.access(&f.me, &file, libc::W_OK).unwrap_err().errno(),
        libc::EROFS
    );
    let nobody = Caller {
        uid: 65534,
        gid: 65534,
        groups: vec![],
    };
    if f.me.uid != 65534 {
        let err = f
            .tree
            .access(&nobody, &node_repo("user"), libc::W_OK)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EACCES);
    }
    assert_eq!(
        f.tree
            .getxattr(&f.me, &file, std::ffi::OsStr::new("security.selinux"))
            .unwrap(),
        None
    );
    assert!(f.tree.listxattr(&f.me, &file).unwrap().is_empty());
    assert_eq!(
        f.tree.setxattr(&f.me, &file).unwrap_err().errno(),
        libc::EROFS
    );
}

#[test]
fn a_file_nothing_was_written_to_is_not_an_image_and_leaves_nothing() {
    let f = Fixture::new();
    let repo = node_repo("user");
    // `touch` (empty), then a text file (raw bytes that are not whole sectors).
    for (name, size, bytes) in [("empty", 0, &b""[..]), ("text", 0, &b"hello\n"[..])] {
        let (_, _, h) = f.tree.create(&f.me, &repo, name, 0o644).unwrap();
        if size > 0 {
            let set = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            let node = Node::Import {
                repo: "user".into(),
                image: None,
                name: name.into(),
            };
            f.tree.setattr(&f.me, &node, Some(&h), &set).unwrap();
        }
        if !bytes.is_empty() {
            h.write(bytes, 0).unwrap();
        }
        let err = h.flush(true).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{name}: {err}");
        assert!(err.to_string().contains("not a disk image"), "{err}");
        h.release();
        assert!(
            f.tree.resolve(&f.me, &Uri::parse(name).unwrap()).is_err(),
            "{name} must not be an image"
        );
        assert!(tmp_is_empty(&f, "user"));
    }
}

#[test]
fn a_blank_file_is_kept_for_its_writer_to_reopen_then_published_with_its_content() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "raw", "s.raw");
    let bytes = std::fs::read(&src).unwrap();
    let repo = node_repo("user");
    let node = Node::Import {
        repo: "user".into(),
        image: None,
        name: "c".into(),
    };
    // qemu-img's create step: the file is sized, a zero block written, closed.
    let (_, _, h) = f.tree.create(&f.me, &repo, "c", 0o644).unwrap();
    let set = SetAttr {
        size: Some(bytes.len() as u64),
        ..SetAttr::default()
    };
    f.tree.setattr(&f.me, &node, Some(&h), &set).unwrap();
    h.write(&[0u8; 4096], 0).unwrap();
    assert_eq!(h.flush(true).unwrap(), Changes::default());
    h.release();
    assert!(f.tree.resolve(&f.me, &Uri::parse("c").unwrap()).is_err());
    // Its writer opens it again by name and writes the disk.
    assert_eq!(f.tree.lookup(&f.me, &repo, "c").unwrap(), node);
    let h = f.tree.open(&f.me, &node, true, false).unwrap();
    h.write(&bytes, 0).unwrap();
    assert!(!h.flush(true).unwrap().entries.is_empty());
    h.release();
    let meta = f
        .tree
        .resolve(&f.me, &Uri::parse("c").unwrap())
        .unwrap()
        .meta;
    let layer = layer_of(&f, "user", &meta);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        layer.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
}

/// A blank file its writer does not open again within the grace is complete as it is:
/// published, a disk of zeroes (only given a size, as `cp` leaves the copy of one), by
/// the upkeep of the session; one opened again is left to its writer's close.
#[test]
fn a_blank_file_not_opened_again_is_published_as_a_disk_of_zeroes() {
    let f = Fixture::new();
    let repo = node_repo("user");
    let blank = |name: &str| {
        let node = Node::Import {
            repo: "user".into(),
            image: None,
            name: name.into(),
        };
        let (_, _, h) = f.tree.create(&f.me, &repo, name, 0o644).unwrap();
        let set = SetAttr {
            size: Some(1 << 20),
            ..SetAttr::default()
        };
        f.tree.setattr(&f.me, &node, Some(&h), &set).unwrap();
        assert_eq!(h.flush(true).unwrap(), Changes::default());
        h.release();
        node
    };
    let zeroes = blank("zeroes");
    let reopened = blank("reopened");
    let h = f.tree.open(&f.me, &reopened, true, false).unwrap();
    // Within the grace: nothing yet.
    assert!(f.tree.publish_abandoned().is_empty());
    let changes = f.tree.pending.publish_abandoned(std::time::Duration::ZERO);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].gone, vec![zeroes]);
    let meta = f
        .tree
        .resolve(&f.me, &Uri::parse("zeroes").unwrap())
        .unwrap()
        .meta;
    let layer = layer_of(&f, "user", &meta);
    let file = std::fs::File::open(&layer).unwrap();
    let disk = super::publish::open_standalone(&file, &layer, crate::image::Format::Qcow2).unwrap();
    assert_eq!(disk.virtual_size(), 1 << 20);
    assert!(disk.data_extents(0, 1 << 20).unwrap().is_empty());
    assert!(
        f.tree
            .resolve(&f.me, &Uri::parse("reopened").unwrap())
            .is_err()
    );
    h.release();
}

/// Only a writer's death cancels an import: a reader of the file killed while it is
/// written (`cat FILE | head` dying of SIGPIPE) changes nothing; a reader still holding
/// the file when its writer closes publishes it at its own last close (the import was
/// lost); a killed writer still publishes nothing.
#[test]
fn only_a_killed_writer_cancels_an_import_and_a_reader_outliving_it_publishes() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "qcow2", "s.qcow2");
    let (node, _, h) = f
        .tree
        .create(&f.me, &node_repo("user"), "peeked", 0o644)
        .unwrap();
    write_like_cp(&f, &node, &h, &src);
    let killed = f.tree.open(&f.me, &node, false, false).unwrap();
    killed.abandon();
    killed.release();
    let reader = f.tree.open(&f.me, &node, false, false).unwrap();
    // The writer's close is not the last: the reader holds the file.
    assert_eq!(h.flush(false).unwrap(), Changes::default());
    h.release();
    assert!(!reader.flush(true).unwrap().entries.is_empty());
    reader.release();
    let meta = f
        .tree
        .resolve(&f.me, &Uri::parse("peeked").unwrap())
        .unwrap()
        .meta;
    assert_published(&f, "user", &meta, &src, "qcow2");
    // A killed writer: nothing is published, its close (by the kernel) says why.
    let (node, _, h) = f
        .tree
        .create(&f.me, &node_repo("user"), "killed", 0o644)
        .unwrap();
    write_like_cp(&f, &node, &h, &src);
    h.abandon();
    assert_eq!(h.flush(true).unwrap_err().errno(), libc::EIO);
    h.release();
    assert!(
        f.tree
            .resolve(&f.me, &Uri::parse("killed").unwrap())
            .is_err()
    );
}

/// A truncated image (its tables place data past the end of the file) is the file's
/// fault: EINVAL naming what is wrong, as for any invalid image; EIO stays for stored
/// data that cannot be read.
#[test]
fn a_truncated_image_written_into_the_mount_is_refused_as_invalid() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "qcow2", "s.qcow2");
    let bytes = std::fs::read(&src).unwrap();
    let cut = dir.path().join("cut.qcow2");
    // The data written at 7 MiB (192 KiB, the file's last clusters) is cut short.
    std::fs::write(&cut, &bytes[..bytes.len() - (128 << 10)]).unwrap();
    let (node, _, h) = f
        .tree
        .create(&f.me, &node_repo("user"), "cut", 0o644)
        .unwrap();
    write_like_cp(&f, &node, &h, &cut);
    let err = h.flush(true).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
    h.release();
    assert!(f.tree.resolve(&f.me, &Uri::parse("cut").unwrap()).is_err());
}

#[test]
fn two_imports_of_one_name_give_one_winner_and_a_clear_error() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), "raw", "s.raw");
    let qsrc = source(dir.path(), "qcow2", "s.qcow2");
    let repo = node_repo("user");
    let (a_node, _, a) = f.tree.create(&f.me, &repo, "x.qcow2", 0o644).unwrap();
    let (b_node, _, b) = f.tree.create(&f.me, &repo, "x.raw", 0o644).unwrap();
    // The same file name twice is refused at create.
    let err = f.tree.create(&f.me, &repo, "x.raw", 0o644).err().unwrap();
    assert_eq!(err.errno(), libc::EEXIST);
    write_like_cp(&f, &a_node, &a, &qsrc);
    write_like_cp(&f, &b_node, &b, &src);
    a.flush(true).unwrap();
    a.release();
    let err = b.flush(true).unwrap_err();
    assert_eq!(err.to_string(), "Image x already exists in repo user");
    assert_eq!(err.errno(), libc::EEXIST);
    b.release();
    assert_eq!(f.data_files("user").len(), 1);
    assert!(tmp_is_empty(&f, "user"));
    // Creating a file named after an existing image fails at once.
    let err = f.tree.create(&f.me, &repo, "x.vmdk", 0o644).err().unwrap();
    assert_eq!(err.errno(), libc::EEXIST);
}

/// Writes `src` into an open import handle front to back in `piece`-byte writes (not a
/// multiple of the cluster size), skipping all-zero pieces, then sets the full size, as
/// `cp` of a sparse file does.
fn write_in_order(f: &Fixture, node: &Node, h: &OpenFile, src: &Path, piece: usize) {
    let bytes = std::fs::read(src).unwrap();
    for (i, chunk) in bytes.chunks(piece).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            assert_eq!(h.write(chunk, (i * piece) as u64).unwrap(), chunk.len());
        }
    }
    let set = SetAttr {
        size: Some(bytes.len() as u64),
        ..SetAttr::default()
    };
    f.tree.setattr(&f.me, node, Some(h), &set).unwrap();
}

#[test]
fn a_raw_file_written_in_order_gives_the_layer_of_the_same_file_imported() {
    if !have_qemu() {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    // Data across cluster edges, a cluster written as zeroes, a lone byte, a tail that
    // ends inside a cluster.
    let src = dir.path().join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", src.to_str().unwrap(), "9M"]);
    qemu_io(
        "raw",
        &src,
        &[
            "write -P 0x11 60k 72k",
            "write -P 0 1M 64k",
            "write -P 0x22 3000k 1",
            "write -P 0x33 8M 700k",
        ],
    );
    let want = f
        .tree
        .import_file(
            &f.me,
            &src,
            None,
            &Uri::parse("user:scanned").unwrap(),
            &mut |_, _| {},
        )
        .unwrap()
        .meta;
    // In order (what the converter learns while the bytes arrive), and written
    // backwards (which it must notice and scan for instead).
    for (name, piece, in_order) in [("ordered", 20 << 10, true), ("backwards", 1 << 20, false)] {
        let (node, _, h) = f
            .tree
            .create(&f.me, &node_repo("user"), name, 0o644)
            .unwrap();
        if in_order {
            write_in_order(&f, &node, &h, &src, piece);
        } else {
            write_like_cp(&f, &node, &h, &src);
        }
        h.flush(true).unwrap();
        h.release();
        let meta = f
            .tree
            .resolve(&f.me, &Uri::parse(name).unwrap())
            .unwrap()
            .meta;
        assert_published(&f, "user", &meta, &src, "raw");
        assert_eq!(
            meta.data_blobs, want.data_blobs,
            "layer of the {name} import"
        );
    }
}
