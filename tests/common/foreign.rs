//! Images of the formats qemu detects by content that pcocc does not import, for the unit
//! tests (`src/testutil.rs`) and the integration tests (`tests/common`) alike.

use std::path::{Path, PathBuf};
use std::process::Command;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

/// A minimal image of a format qemu detects but qemu-img cannot create (`bochs`, `cloop`,
/// `dmg`): only the bytes qemu's probe and open look at, each documented by the format
/// it follows.
pub fn foreign_bytes(fmt: &str) -> Vec<u8> {
    let pad = |s: &[u8], len: usize| {
        let mut v = s.to_vec();
        v.resize(len, 0);
        v
    };
    match fmt {
        // Bochs growing image: NUL-padded magic (32 bytes), type (16), subtype (16),
        // then the little-endian version 2.0 and header size, the catalog entries, bitmap
        // and extent sizes and the disk size; an all-empty catalog after the header.
        "bochs" => {
            let mut v = pad(b"Bochs Virtual HD Image", 32);
            v.extend(pad(b"Redolog", 16));
            v.extend(pad(b"Growing", 16));
            v.extend(0x0002_0000u32.to_le_bytes());
            v.extend(512u32.to_le_bytes());
            for n in [512u32, 512, 512] {
                v.extend(n.to_le_bytes());
            }
            v.extend((4u64 << 20).to_le_bytes());
            v.resize(4096, 0);
            v
        }
        // cloop: the mounting shell script, then the block size and count.
        "cloop" => {
            let mut v = pad(
                b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
                128,
            );
            v.extend(65536u32.to_be_bytes());
            v.extend(1u32.to_be_bytes());
            v.resize(4096, 0);
            v
        }
        // Apple UDIF: data, then a 512-byte trailer "koly", version 4, header size 512.
        "dmg" => {
            let mut v = vec![0u8; 4096];
            let mut trailer = b"koly".to_vec();
            trailer.extend(4u32.to_be_bytes());
            trailer.extend(512u32.to_be_bytes());
            v.extend(pad(&trailer, 512));
            v
        }
        other => panic!("no fixture for {other}"),
    }
}

/// Creates a `fmt` image qemu-img can make, that pcocc does not import (`vhdx`,
/// `parallels`, `qcow`, `luks`) with qemu-img, or writes [`foreign_bytes`] for the others.
/// Returns the new file's path.
pub fn foreign_image(dir: &Path, fmt: &str, name: &str) -> PathBuf {
    match fmt {
        "luks" => {
            let p = dir.join(name);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,id=s0,data=secret",
                "-o",
                "key-secret=s0,iter-time=10",
                p.to_str().unwrap(),
                "4M",
            ]);
            p
        }
        "vhdx" | "parallels" | "qcow" => {
            let p = dir.join(name);
            qemu_img(&["create", "-q", "-f", fmt, p.to_str().unwrap(), "4M"]);
            p
        }
        _ => {
            let p = dir.join(name);
            std::fs::write(&p, foreign_bytes(fmt)).unwrap();
            p
        }
    }
}

/// The formats pcocc refuses that qemu detects by content.
pub const FOREIGN_FORMATS: [&str; 7] =
    ["vhdx", "parallels", "qcow", "luks", "dmg", "cloop", "bochs"];
