//! Views in the tree, judged by qemu-img: every `disk.FMT` of a single-layer and of a
//! layered revision, their attributes, holes and read-only handles.

use super::tests::{Fixture, node_rev, uri};
use super::*;
use crate::testutil::{assert_qemu_accepts, qemu_img};
use std::os::unix::fs::MetadataExt;

fn file_node(rev: u64, kind: FileKind) -> Node {
    let Node::Revision { repo, image, rev } = node_rev("user", "img1", rev) else {
        unreachable!()
    };
    Node::File {
        repo,
        image,
        rev,
        file: kind,
    }
}

/// Reads a whole open file sequentially in odd-sized pieces.
fn read_handle(f: &OpenFile) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 300_007];
    loop {
        let n = f.read(&mut buf, out.len() as u64).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn every_view_of_single_and_layered_revisions_compares_identical_to_its_chain() {
    // qemu-img judges what the tree serves.
    if !crate::testutil::have_qemu() {
        return;
    }
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let layer = |h: &str| f.repo("user").join("data").join(&h[..2]).join(h);
    let out = tempfile::tempdir().unwrap();
    for (rev, src) in [(0, layer(&base)), (1, layer(&top))] {
        for format in Format::ALL {
            let dest = out.path().join(format!("r{rev}.{}", format.name()));
            let uri = Uri::parse(&format!("user:img1@{rev}")).unwrap();
            f.tree
                .export_file(&f.me, &uri, format, &dest, &mut |_, _| {})
                .unwrap();
            assert_qemu_accepts(&dest, format.name(), 64 << 20, &src, "qcow2");
            let attr = f
                .tree
                .getattr(&f.me, &file_node(rev, FileKind::View(format)))
                .unwrap();
            assert_eq!(attr.size, std::fs::metadata(&dest).unwrap().len());
        }
    }
}

#[test]
fn view_sizes_and_blocks_come_from_the_view_and_match_the_bytes_read() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    for rev in [0, 1] {
        for format in Format::ALL {
            let node = file_node(rev, FileKind::View(format));
            let attr = f.tree.getattr(&f.me, &node).unwrap();
            let h = f.tree.open(&f.me, &node, false, false).unwrap();
            assert!(h.immutable());
            assert_eq!(h.attr().unwrap(), attr);
            let bytes = read_handle(&h);
            assert_eq!(bytes.len() as u64, attr.size, "{format} @{rev}");
            assert!(attr.blocks > 0);
            // cp copies a view out in 128 KiB pieces (see READ_BLKSIZE).
            assert_eq!(attr.blksize, crate::tree::READ_BLKSIZE);
            // Holes: every byte outside the data extents reads zero, and the extents
            // seen through seek_data/seek_hole cover all the non-zero bytes.
            let mut pos = 0u64;
            let mut covered = vec![false; bytes.len()];
            let mut data_bytes = 0;
            while let Some(d) = h.seek_data(pos).unwrap() {
                let hole = h.seek_hole(d).unwrap().unwrap();
                assert!(hole > d && hole <= attr.size, "{format}: {d}..{hole}");
                covered[d as usize..hole as usize].fill(true);
                data_bytes += hole - d;
                pos = hole;
                if pos >= attr.size {
                    break;
                }
            }
            assert!(
                bytes.iter().zip(&covered).all(|(&b, &c)| c || b == 0),
                "{format} @{rev}: data outside the extents seek_data reports"
            );
            if !(rev == 0 && format == Format::Qcow2) {
                // A generated view holds its stored bytes: all of its non-zero bytes, and
                // no more than seek_data reports (short holes count as data there).
                let nonzero = bytes.chunks(512).filter(|c| c.iter().any(|&b| b != 0));
                assert!(
                    attr.blocks >= nonzero.count() as u64
                        && attr.blocks <= u64::div_ceil(data_bytes, 512),
                    "{format} @{rev}: {} blocks, {data_bytes} bytes of data",
                    attr.blocks
                );
            }
            assert_eq!(h.seek_data(attr.size).unwrap(), None);
            assert_eq!(h.seek_hole(attr.size).unwrap(), None);
        }
    }
}

#[test]
fn disk_qcow2_of_a_single_layer_revision_is_the_stored_layer() {
    // qemu-img judges what the tree serves.
    if !crate::testutil::have_qemu() {
        return;
    }
    let Some((f, base, _)) = Fixture::standard() else {
        return;
    };
    let path = f.repo("user").join("data").join(&base[..2]).join(&base);
    let node = file_node(0, FileKind::View(Format::Qcow2));
    let attr = f.tree.getattr(&f.me, &node).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((attr.size, attr.blocks), (m.len(), m.blocks()));
    let h = f.tree.open(&f.me, &node, false, false).unwrap();
    assert_eq!(read_handle(&h), std::fs::read(&path).unwrap());
    // The layered revision's disk.qcow2 is a flattened standalone image instead.
    let node = file_node(1, FileKind::View(Format::Qcow2));
    let h = f.tree.open(&f.me, &node, false, false).unwrap();
    let bytes = read_handle(&h);
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("flat.qcow2");
    std::fs::write(&flat, bytes).unwrap();
    let info = qemu_img(&["info", "--output=json", flat.to_str().unwrap()]);
    assert!(!info.contains("backing-filename"), "{info}");
}

#[test]
fn open_files_are_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<OpenFile>();
    assert_send_sync::<Tree>();
}

#[test]
fn nothing_inside_a_revision_opens_for_writing() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    for kind in FileKind::ALL {
        let node = file_node(0, kind);
        let err = f.tree.open(&f.me, &node, true, false).err().unwrap();
        assert_eq!(err.errno(), libc::EROFS, "{kind:?}");
        let h = f.tree.open(&f.me, &node, false, false).unwrap();
        assert_eq!(h.write(b"x", 0).unwrap_err().errno(), libc::EROFS);
        assert_eq!(h.flush(true).unwrap(), Changes::default());
    }
    let set = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    let node = file_node(0, FileKind::View(Format::Raw));
    let err = f.tree.setattr(&f.me, &node, None, &set).unwrap_err();
    assert_eq!(err.errno(), libc::EROFS);
}

#[test]
fn views_are_byte_stable_across_trees_and_cached_by_layer_list() {
    let Some((f, _, _)) = Fixture::standard() else {
        return;
    };
    let node = file_node(1, FileKind::View(Format::Vmdk));
    let a = read_handle(&f.tree.open(&f.me, &node, false, false).unwrap());
    let config = crate::config::Config {
        repos: vec![crate::config::RepoConfig {
            name: "user".into(),
            path: f.repo("user"),
            origin: crate::config::Origin::Default,
        }],
    };
    let other = Tree::new(&config).unwrap();
    let b = read_handle(&other.open(&f.me, &node, false, false).unwrap());
    assert_eq!(a, b);
    assert_eq!(f.tree.revisions.len(), 1);
    f.tree
        .getattr(&f.me, &file_node(0, FileKind::View(Format::Raw)))
        .unwrap();
    assert_eq!(f.tree.revisions.len(), 2);
}

/// Image `user/NAME@0`: one layer, a qcow2 of `size` (qemu-img's notation) made by
/// `qemu-img create`, holding nothing.
fn empty_image(f: &Fixture, name: &str, size: &str) {
    let tmp = f.repo("user").join(".tmp").join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", tmp.to_str().unwrap(), size]);
    let hash = crate::store::sha256_file(&tmp).unwrap();
    let dir = f.repo("user").join("data").join(&hash[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::rename(&tmp, dir.join(&hash)).unwrap();
    f.meta("user", name, 0, "root", "1795749382.5", &[&hash]);
}

/// Revision `user/IMAGE@0` and the names its directory lists.
fn listed(f: &Fixture, image: &str) -> (Node, Vec<String>) {
    let rev = Node::Revision {
        repo: "user".into(),
        image: image.into(),
        rev: 0,
    };
    let names = f
        .tree
        .readdir(&f.me, &rev)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    (rev, names)
}

#[test]
fn disk_vpc_is_absent_where_vhd_cannot_hold_the_disk() {
    if !crate::testutil::have_qemu() {
        return;
    }
    let f = Fixture::new();
    // 3 TiB: beyond VHD's 2040 GiB, and still a tiny sparse qcow2 file.
    empty_image(&f, "big", "3T");
    let (rev, names) = listed(&f, "big");
    assert!(!names.contains(&"disk.vpc".to_string()), "{names:?}");
    assert!(names.contains(&"disk.vmdk".to_string()), "{names:?}");
    assert!(f.tree.lookup(&f.me, &rev, "disk.vpc").is_err());
    let raw = f.tree.lookup(&f.me, &rev, "disk.raw").unwrap();
    assert_eq!(f.tree.getattr(&f.me, &raw).unwrap().size, 3 << 40);
}

/// An empty disk (0 bytes, as `pcocc image import` of an empty file or `resize` to 0
/// makes) has no `disk.vmdk`: qemu opens no VMDK of capacity 0. It was listed, and
/// every `stat` of it failed with EIO. Every other view is there and holds 0 bytes of
/// disk; exporting it as VMDK says which image cannot be.
#[test]
fn an_empty_disk_has_every_view_but_disk_vmdk() {
    if !crate::testutil::have_qemu() {
        return;
    }
    let f = Fixture::new();
    empty_image(&f, "empty", "0");
    let (rev, names) = listed(&f, "empty");
    let mut names: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("disk."))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk.qcow2", "disk.qed", "disk.raw", "disk.vdi", "disk.vpc"]
    );
    assert!(f.tree.lookup(&f.me, &rev, "disk.vmdk").is_err());
    for name in &names {
        let node = f.tree.lookup(&f.me, &rev, name).unwrap();
        f.tree.getattr(&f.me, &node).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("out.vmdk");
    let uri = crate::tree::Uri::parse("empty").unwrap();
    let err = f
        .tree
        .export_file(&f.me, &uri, Format::Vmdk, &dest, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("user:empty@0 cannot be exported as vmdk"),
        "{err}"
    );
    assert!(!dest.exists());
}

/// Each view is listed only where its format can hold the disk as qemu opens it:
/// past 64 TiB no `disk.qed`, past qemu's VDI block count no `disk.vdi`, past 1 PiB no
/// `disk.vmdk` (each was listed, and its `stat` failed with EIO, or qemu refused the
/// file: "L1 size too big").
#[test]
fn views_whose_format_cannot_hold_the_disk_are_absent() {
    if !crate::testutil::have_qemu() {
        return;
    }
    let f = Fixture::new();
    for (name, size, absent) in [
        ("qed", "100T", "disk.qed"),
        ("vdi", "600T", "disk.vdi"),
        ("vmdk", "1025T", "disk.vmdk"),
    ] {
        empty_image(&f, name, size);
        let (rev, names) = listed(&f, name);
        assert!(!names.contains(&absent.to_string()), "{size}: {names:?}");
        assert!(f.tree.lookup(&f.me, &rev, absent).is_err());
        for present in ["disk.raw", "disk.qcow2"] {
            assert!(names.contains(&present.to_string()), "{size}: {names:?}");
        }
    }
}

#[test]
fn revision_directories_and_views_describe_themselves_in_user_pcocc_xattrs() {
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let get = |node: &Node, name: &str| {
        f.tree
            .getxattr(&f.me, node, std::ffi::OsStr::new(name))
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    };
    let rev = node_rev("user", "img1", 1);
    let mut names = f.tree.listxattr(&f.me, &rev).unwrap();
    names.sort();
    assert_eq!(
        names,
        [
            XATTR_LAYERS,
            XATTR_NAME,
            XATTR_OWNER,
            XATTR_REVISION,
            XATTR_VIRTUAL_SIZE
        ]
    );
    assert_eq!(get(&rev, XATTR_NAME).as_deref(), Some("img1"));
    assert_eq!(get(&rev, XATTR_REVISION).as_deref(), Some("1"));
    assert_eq!(get(&rev, XATTR_OWNER).as_deref(), Some("root"));
    assert_eq!(
        get(&rev, XATTR_LAYERS),
        Some(format!("{base}{LAYERS_SEPARATOR}{top}"))
    );
    assert_eq!(get(&rev, XATTR_VIRTUAL_SIZE).as_deref(), Some("67108864"));
    assert_eq!(get(&rev, XATTR_FORMAT), None, "directories have no format");
    for format in Format::ALL {
        let view = file_node(0, FileKind::View(format));
        assert!(
            f.tree
                .listxattr(&f.me, &view)
                .unwrap()
                .contains(&XATTR_FORMAT.to_string())
        );
        assert_eq!(get(&view, XATTR_FORMAT).as_deref(), Some(format.name()));
        assert_eq!(get(&view, XATTR_LAYERS), Some(base.clone()));
        assert_eq!(get(&view, XATTR_REVISION).as_deref(), Some("0"));
    }
    // Other names, and other nodes, have none.
    assert_eq!(get(&rev, "user.pcocc.nosuch"), None);
    assert_eq!(get(&rev, "security.selinux"), None);
    let image = Node::Image {
        repo: "user".into(),
        image: "img1".into(),
    };
    assert!(f.tree.listxattr(&f.me, &image).unwrap().is_empty());
    assert_eq!(get(&image, XATTR_NAME), None);
    // A revision that is gone answers ENOENT, not an empty list.
    let gone = node_rev("user", "img1", 7);
    assert_eq!(
        f.tree.listxattr(&f.me, &gone).unwrap_err().errno(),
        libc::ENOENT
    );
}

/// A resize adds a revision at once whose every view qemu-img reads as the stored chain:
/// the old revision's bytes, then zeroes up to the new size (growing), or only the
/// first bytes (shrinking an older revision, which still becomes the latest).
#[test]
fn views_of_resized_revisions_are_the_old_disk_cut_or_extended_with_zeroes() {
    // qemu-img judges what the tree serves.
    if !crate::testutil::have_qemu() {
        return;
    }
    let Some((f, base, top)) = Fixture::standard() else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let export = |rev: u64, format: Format, dest: &std::path::Path| {
        let uri = Uri::parse(&format!("user:img1@{rev}")).unwrap();
        f.tree
            .export_file(&f.me, &uri, format, dest, &mut |_, _| {})
            .unwrap();
    };
    let old_raw = out.path().join("old.raw");
    export(1, Format::Raw, &old_raw);
    for (from, size, rev) in [
        ("user:img1", 96u64 << 20, 2u64),
        ("user:img1@0", 1 << 20, 3),
    ] {
        let meta = f.tree.resize(&f.me, &uri(from), size).unwrap();
        assert_eq!(meta.revision, rev);
        let parent = if rev == 2 {
            vec![&base, &top]
        } else {
            vec![&base]
        };
        assert_eq!(meta.data_blobs.len(), parent.len() + 1);
        assert!(meta.data_blobs.iter().zip(&parent).all(|(a, b)| a == *b));
        let new_top = meta.data_blobs.last().unwrap();
        let layer = f
            .repo("user")
            .join("data")
            .join(&new_top[..2])
            .join(new_top);
        // The revision is there at once, with the new size.
        let attr = f
            .tree
            .getattr(&f.me, &file_node(rev, FileKind::View(Format::Raw)))
            .unwrap();
        assert_eq!(attr.size, size);
        for format in Format::ALL {
            let dest = out.path().join(format!("r{rev}.{}", format.name()));
            export(rev, format, &dest);
            assert_qemu_accepts(&dest, format.name(), size, &layer, "qcow2");
        }
        // Against the old revision's own bytes: cut to the new size, zeroes past its end.
        let expected = out.path().join(format!("expected{rev}.raw"));
        let source = if rev == 2 {
            old_raw.clone()
        } else {
            let r0 = out.path().join("r0.raw");
            export(0, Format::Raw, &r0);
            r0
        };
        std::fs::copy(&source, &expected).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&expected)
            .unwrap()
            .set_len(size)
            .unwrap();
        let new_raw = out.path().join(format!("r{rev}.raw"));
        let (a, b) = (new_raw.to_str().unwrap(), expected.to_str().unwrap());
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "raw", a, b]);
        assert!(cmp.contains("Images are identical"), "{cmp}");
        let check = qemu_img(&["check", layer.to_str().unwrap()]);
        assert!(check.contains("No errors were found"), "{check}");
    }
    // Revision 1 was left alone.
    assert_eq!(
        f.tree
            .resolve(&f.me, &uri("user:img1@1"))
            .unwrap()
            .meta
            .data_blobs,
        vec![base.clone(), top.clone()]
    );
}
