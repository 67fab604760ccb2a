//! Whether a qcow2 file may be stored as a layer just as it is, instead of converted.
//!
//! A file written into the mount is staged whole before it is published; when it is
//! already a standalone qcow2 that qemu finds clean, converting it would only rewrite
//! the same disk into the same format. Such a file is kept: its bytes (hashed as they
//! arrived) become the layer. "Clean" is what `qemu-img check` would say of it, decided
//! from its tables alone: no backing file, no external data file, no encryption, no
//! snapshot, no bitmap, neither dirty nor corrupt; every cluster a table points to
//! inside the file, aligned, flagged `COPIED` and referenced once; and every refcount
//! equal to the number of references to its cluster (no leak, no overlap). Anything
//! else, or anything this check does not know well enough (compressed clusters, extended
//! L2 entries, refcounts narrower than a byte), is converted as before: the answer is
//! only ever "keep" or "convert", never an error of the import.

use super::header::{self, INCOMPAT_COMPRESSION_TYPE, OFFSET_MASK};
use std::fs::File;
use std::path::Path;

/// L1 and L2 entry flag: refcount exactly one (spec, bit 63).
const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster (spec, bit 62).
const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag: reads as zeroes (spec, bit 0; version 3 only).
const ZERO: u64 = 1;
/// Most clusters in a file this check tracks (one bit each, 8 MiB at most): 64 Mi, a
/// 4 TiB file of 64 KiB clusters. A bigger file is converted.
const MAX_CLUSTERS: u64 = 1 << 26;

/// Why a file is converted rather than kept; `Ok(())` when it may be kept.
pub type Verdict = std::result::Result<(), String>;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// Whether `file` (`file_len` bytes, named `path` in messages) is a clean standalone
/// qcow2 that can be stored as it is (see the module text).
pub fn keepable(file: &File, path: &Path, file_len: u64) -> Verdict {
    let h = header::parse(file, path, file_len).map_err(|e| e.to_string())?;
    if h.backing.is_some() {
        return Err("it has a backing file".into());
    }
    if h.data_file.is_some() {
        return Err("it has an external data file".into());
    }
    if h.extended_l2 {
        return Err("extended L2 entries".into());
    }
    let read = |buf: &mut [u8], at: u64| {
        super::super::read_exact_at(file, path, buf, at).map_err(|e| e.to_string())
    };
    let mut fixed = [0u8; header::V3_MIN_HEADER_LEN as usize];
    let fixed_len = if h.version == 2 {
        header::V2_HEADER_LEN as usize
    } else {
        fixed.len()
    };
    read(&mut fixed[..fixed_len], 0)?;
    if be32(&fixed, 32) != 0 {
        return Err("it is encrypted".into());
    }
    if be32(&fixed, 60) != 0 {
        return Err("it holds internal snapshots".into());
    }
    let refcount_order = if h.version == 2 {
        4
    } else {
        if be64(&fixed, 72) & !INCOMPAT_COMPRESSION_TYPE != 0 {
            return Err("an incompatible feature bit is set (dirty, corrupt, …)".into());
        }
        if be64(&fixed, 88) != 0 {
            return Err("an autoclear feature is set (bitmaps, …)".into());
        }
        be32(&fixed, 96)
    };
    if refcount_order < 3 {
        return Err(format!("refcount_order {refcount_order}"));
    }
    let cs = h.cluster_size();
    let clusters = file_len.div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        return Err(format!("{clusters} clusters"));
    }
    let mut refs = Refs {
        used: vec![0u64; clusters.div_ceil(64) as usize],
        clusters,
        cs,
    };
    refs.mark(0, 1)?;
    let l1_size = u64::from(be32(&fixed, 36));
    let l1_offset = be64(&fixed, 40);
    let rt_offset = be64(&fixed, 48);
    let rt_clusters = u64::from(be32(&fixed, 56));
    let l1_bytes = l1_size * 8;
    if l1_bytes > header::MAX_L1_BYTES {
        return Err(format!("an L1 table of {l1_size} entries"));
    }
    if l1_bytes > 0 {
        refs.mark(l1_offset, l1_bytes.div_ceil(cs))?;
    }
    if rt_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(format!("{rt_clusters} refcount table clusters"));
    }
    refs.mark(rt_offset, rt_clusters)?;

    // The refcount blocks the refcount table lists.
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    read(&mut rt, rt_offset)?;
    let blocks: Vec<u64> = rt.chunks_exact(8).map(|e| be64(e, 0)).collect();
    for &b in &blocks {
        if b & 0x1ff != 0 {
            return Err("reserved bits set in a refcount table entry".into());
        }
        if b != 0 {
            refs.mark(b, 1)?;
        }
    }

    // The L2 tables and the data clusters they map.
    let mut l1 = vec![0u8; l1_bytes as usize];
    read(&mut l1, l1_offset)?;
    let mut l2 = vec![0u8; cs as usize];
    for e in l1.chunks_exact(8).map(|e| be64(e, 0)) {
        let at = e & OFFSET_MASK;
        if e & !(OFFSET_MASK | COPIED) != 0 {
            return Err("reserved bits set in an L1 entry".into());
        }
        if at == 0 {
            continue;
        }
        if e & COPIED == 0 {
            return Err("an L2 table without the COPIED flag".into());
        }
        refs.mark(at, 1)?;
        read(&mut l2, at)?;
        for e in l2.chunks_exact(8).map(|e| be64(e, 0)) {
            if e & COMPRESSED != 0 {
                return Err("compressed clusters".into());
            }
            let zero = if h.version == 3 { ZERO } else { 0 };
            if e & !(OFFSET_MASK | COPIED | zero) != 0 {
                return Err("reserved bits set in an L2 entry".into());
            }
            let host = e & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if e & COPIED == 0 {
                return Err("a data cluster without the COPIED flag".into());
            }
            refs.mark(host, 1)?;
        }
    }

    // Every refcount equals the references counted: none missing, none leaked.
    let bits = 1u64 << refcount_order;
    let width = (bits / 8) as usize;
    let per_block = cs / width as u64;
    let mut block = vec![0u8; cs as usize];
    for (i, &b) in blocks.iter().enumerate() {
        let first = i as u64 * per_block;
        if b == 0 {
            let end = (first + per_block).min(clusters);
            if (first..end).any(|c| refs.is_used(c)) {
                return Err(format!(
                    "clusters from {first} are in use with no refcount block"
                ));
            }
            continue;
        }
        read(&mut block, b)?;
        for (j, entry) in block.chunks_exact(width).enumerate() {
            let c = first + j as u64;
            let stored = entry.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
            let counted = u64::from(refs.is_used(c));
            if stored != counted {
                return Err(format!(
                    "cluster {c} has refcount {stored} and {counted} references"
                ));
            }
        }
    }
    let covered = blocks.len() as u64 * per_block;
    if (covered..clusters).any(|c| refs.is_used(c)) {
        return Err("clusters past the refcount table are in use".into());
    }
    Ok(())
}

/// The clusters of the file some header field or table points to (each at most once).
struct Refs {
    used: Vec<u64>,
    clusters: u64,
    cs: u64,
}

impl Refs {
    fn is_used(&self, c: u64) -> bool {
        c < self.clusters && self.used[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    /// `n` clusters from byte `offset` are referenced: they must be inside the file and
    /// referenced nowhere else.
    fn mark(&mut self, offset: u64, n: u64) -> Verdict {
        if !offset.is_multiple_of(self.cs) {
            return Err(format!("offset {offset} is not cluster-aligned"));
        }
        let first = offset / self.cs;
        for c in first..first.saturating_add(n) {
            if c >= self.clusters {
                return Err(format!("cluster {c} is past the end of the file"));
            }
            if self.is_used(c) {
                return Err(format!("cluster {c} is referenced twice"));
            }
            self.used[(c / 64) as usize] |= 1 << (c % 64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{have_qemu, qemu_create, qemu_img, qemu_io};
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    fn verdict(path: &Path) -> Verdict {
        let f = File::open(path).unwrap();
        keepable(&f, path, f.metadata().unwrap().len())
    }

    /// `qemu-img check` exit status: 0 clean, 2 corrupt, 3 leaks.
    fn qemu_check(path: &Path) -> i32 {
        let out = Command::new("qemu-img")
            .args(["check", "-q", path.to_str().unwrap()])
            .output()
            .unwrap();
        out.status.code().unwrap_or(-1)
    }

    /// A qemu-written image with data, a zero cluster and an unallocated hole.
    fn written(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
        let p = qemu_create(dir, "qcow2", name, "64M", opts);
        qemu_io(
            "qcow2",
            &p,
            &[
                "write -P 0x5a 0 256k",
                "write -z 1M 64k",
                "write -P 7 40M 1k",
            ],
        );
        p
    }

    /// The byte offset of the refcount entry (16-bit refcounts) of cluster `c`.
    fn refcount_entry(path: &Path, c: u64) -> u64 {
        let f = File::open(path).unwrap();
        let mut h = [0u8; 64];
        f.read_exact_at(&mut h, 0).unwrap();
        let cs = 1u64 << be32(&h, 20);
        let rt = be64(&h, 48);
        let per_block = cs / 2;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, rt + 8 * (c / per_block)).unwrap();
        be64(&e, 0) + 2 * (c % per_block)
    }

    fn patch(path: &Path, at: u64, bytes: &[u8]) {
        let f = File::options().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    #[test]
    fn clean_standalone_images_are_kept_whatever_wrote_them() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let plain = written(d, "plain.qcow2", "");
        let v2 = written(d, "v2.qcow2", "compat=0.10");
        let small = written(d, "small.qcow2", "cluster_size=4096");
        let wide = written(d, "wide.qcow2", "refcount_bits=64");
        let converted = d.join("converted.qcow2");
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            plain.to_str().unwrap(),
            converted.to_str().unwrap(),
        ]);
        for p in [&plain, &v2, &small, &wide, &converted] {
            assert_eq!(qemu_check(p), 0, "{}", p.display());
            assert_eq!(verdict(p), Ok(()), "{}", p.display());
        }
    }

    #[test]
    fn images_qemu_would_not_call_clean_or_standalone_are_converted() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = written(d, "base.qcow2", "");
        let cases: Vec<(&str, std::path::PathBuf)> = vec![
            ("backing", {
                let opts = format!("backing_file={},backing_fmt=qcow2", base.display());
                qemu_create(d, "qcow2", "over.qcow2", "64M", &opts)
            }),
            ("snapshot", {
                let p = written(d, "snap.qcow2", "");
                qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
                p
            }),
            ("compressed", {
                let p = d.join("zlib.qcow2");
                qemu_img(&[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    base.to_str().unwrap(),
                    p.to_str().unwrap(),
                ]);
                p
            }),
            ("bitmap", {
                let p = written(d, "bitmap.qcow2", "");
                qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
                p
            }),
            ("encrypted", {
                let p = d.join("luks.qcow2");
                qemu_img(&[
                    "create",
                    "-q",
                    "--object",
                    "secret,id=s0,data=x",
                    "-f",
                    "qcow2",
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0",
                    p.to_str().unwrap(),
                    "1M",
                ]);
                p
            }),
            ("dirty", {
                let p = written(d, "dirty.qcow2", "");
                patch(&p, 79, &[1]);
                p
            }),
            ("leak", {
                // One cluster past the end of what the tables use, counted but unused.
                let p = written(d, "leak.qcow2", "");
                let len = std::fs::metadata(&p).unwrap().len();
                let f = File::options().write(true).open(&p).unwrap();
                f.set_len(len + 65536).unwrap();
                patch(&p, refcount_entry(&p, len / 65536), &[0, 1]);
                p
            }),
            ("refcount 0 of a used cluster", {
                let p = written(d, "free.qcow2", "");
                // The last cluster of a fresh file holds the last data written.
                let last = std::fs::metadata(&p).unwrap().len().div_ceil(65536) - 1;
                patch(&p, refcount_entry(&p, last), &[0, 0]);
                p
            }),
        ];
        for (what, p) in &cases {
            let v = verdict(p);
            assert!(v.is_err(), "{what}: kept");
            eprintln!("{what}: {}", v.unwrap_err());
        }
        // qemu agrees that the leak and the missing refcount are not clean (a dirty
        // image it repairs as it opens it, which a stored layer never should need).
        for (what, p) in &cases[6..] {
            assert_ne!(qemu_check(p), 0, "{what}");
        }
    }

    #[test]
    fn what_is_not_qcow2_at_all_is_converted_without_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"QFI\xfb and then nothing that makes sense").unwrap();
        assert!(verdict(&p).is_err());
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(verdict(&p).is_err());
    }
}
