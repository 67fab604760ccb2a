//! qemu as a client of the mount: self-describing files (`user.pcocc.*` xattrs, inode
//! numbers stable across remounts), `O_DIRECT` and `aio=native` reads, qemu's image
//! locking, local overlays backed by a view, and (behind `PCOCC_IMAGEFS_QEMU_BOOT=1`) real
//! guests booting from every view.

use super::*;
use std::ffi::CString;

/// The value of extended attribute `name` of `path`, via getxattr(2); `None` when the
/// file has no such attribute.
fn xattr(path: &Path, name: &str) -> Option<String> {
    let p = CString::new(s(path)).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and live across the call; the buffer is
    // writable for its full length, which is what we pass.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENODATA),
            "getxattr {name}: {e}"
        );
        return None;
    }
    buf.truncate(len as usize);
    Some(String::from_utf8(buf).unwrap())
}

/// The names listxattr(2) gives for `path`, sorted.
fn xattr_names(path: &Path) -> Vec<String> {
    let p = CString::new(s(path)).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `xattr`.
    let len = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(len as usize);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    names
}

/// The layer hashes of `name@0` in `repo`, base first.
fn layer_hashes(m: &Mounted, repo: &str, name: &str) -> Vec<String> {
    let meta = fs::read_to_string(m.repo(repo).join("meta").join(format!("{name}@0"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    v["data_blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b.as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}

fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn revisions_and_views_describe_themselves_and_keep_their_inodes_across_remounts() {
    let Some(m) = Mounted::start() else { return };
    m.layered_image("user", "chain");
    let layers = layer_hashes(&m, "user", "chain");
    assert_eq!(layers.len(), 3);
    let rev = m.at("user/chain/@0");
    let common = [
        ("user.pcocc.name", "chain".to_string()),
        ("user.pcocc.revision", "0".to_string()),
        ("user.pcocc.owner", "root".to_string()),
        ("user.pcocc.layers", layers.join(",")),
        ("user.pcocc.virtual_size", (24u64 << 20).to_string()),
    ];
    let mut names: Vec<String> = common.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(xattr_names(&rev), names);
    for (name, value) in &common {
        assert_eq!(xattr(&rev, name).as_deref(), Some(value.as_str()), "{name}");
    }
    assert_eq!(xattr(&rev, "user.pcocc.format"), None);
    for (file, fmt) in VIEWS {
        let view = rev.join(file);
        for (name, value) in &common {
            assert_eq!(
                xattr(&view, name).as_deref(),
                Some(value.as_str()),
                "{file} {name}"
            );
        }
        assert_eq!(xattr(&view, "user.pcocc.format").as_deref(), Some(fmt));
        assert!(xattr_names(&view).contains(&"user.pcocc.format".to_string()));
    }
    if have("getfattr") {
        let dump = ok("getfattr", &["-d", s(&rev.join("disk.qcow2"))]);
        for (name, value) in &common {
            assert!(dump.contains(&format!("{name}=\"{value}\"")), "{dump}");
        }
        assert!(dump.contains("user.pcocc.format=\"qcow2\""), "{dump}");
    } else {
        eprintln!("getfattr missing (Debian package attr): checked through getxattr(2) only");
    }

    let inodes = |m: &Mounted| -> Vec<u64> {
        let mut v = vec![fs::metadata(&rev).unwrap().ino()];
        for (file, _) in VIEWS {
            v.push(
                fs::metadata(m.at(&format!("user/chain/@0/{file}")))
                    .unwrap()
                    .ino(),
            );
        }
        v.push(fs::metadata(m.at("user/chain/@0/meta.json")).unwrap().ino());
        v
    };
    let before = inodes(&m);
    let mut distinct = before.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        before.len(),
        "inode numbers collide: {before:?}"
    );
    m.unmount();
    assert!(!m.is_mounted());
    m.mount(&[]);
    // Visit in another order, so that numbers cannot come from lookup order.
    let _ = fs::metadata(m.at("user/chain/@0/meta.json")).unwrap();
    let _ = fs::metadata(m.at("user/chain/@0/disk.vmdk")).unwrap();
    assert_eq!(inodes(&m), before);
}
