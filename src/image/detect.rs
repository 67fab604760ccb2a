//! Format detection: by content (magic numbers plus header sanity), then by file-name
//! suffix, then raw — the order pcocc follows for imports.
//!
//! Content probes look at the first [`PROBE_LEN`] bytes (qemu's `BLOCK_PROBE_BUF_SIZE`)
//! and, for fixed VHDs, which are raw data followed by a footer, at the last
//! [`VHD_FOOTER_LEN`] bytes. qemu itself probes a fixed VHD as raw, so that detection is
//! *weak*: forcing `raw` on such a file is not a mismatch (it is what qemu would do),
//! while forcing `raw` on any other real image is, as in pcocc (which reports
//! "Mismatch between specified format A and detected image type B").

use super::{Error, Format, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes of the file start a probe needs (qemu's `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_LEN: usize = 2048;
/// A VHD footer is the last 512 bytes of the file (VHD spec, "Hard Disk Footer Format").
pub const VHD_FOOTER_LEN: usize = 512;

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// QED spec: magic "QED\0" at offset 0.
const QED_MAGIC: &[u8] = b"QED\0";
/// VDI: signature 0xbeda107f (little-endian) at offset 0x40 of the pre-header.
const VDI_SIGNATURE: u32 = 0xbeda_107f;
const VDI_SIGNATURE_OFFSET: usize = 0x40;
/// VHD footer cookie (also at offset 0 of a dynamic VHD, which starts with a footer copy).
const VHD_COOKIE: &[u8] = b"conectix";
/// VHD footer fields (VHD spec): current size at 48, disk type at 60, checksum at 64.
const VHD_CURRENT_SIZE_OFFSET: usize = 48;
const VHD_DISK_TYPE_OFFSET: usize = 60;
const VHD_CHECKSUM_OFFSET: usize = 64;
const VHD_TYPE_FIXED: u32 = 2;
/// VMDK sparse extent magic "KDMV" (VMDK spec: 0x564d444b, little-endian); hosted
/// sparse (VMDK3/COWD) files are VMDK too.
const VMDK4_MAGIC: &[u8] = b"KDMV";
const VMDK3_MAGIC: &[u8] = b"COWD";
/// A VMDK text descriptor's first line, as VMware and qemu write it.
const VMDK_DESCRIPTOR_HEAD: &str = "# Disk DescriptorFile";

/// How sure a content probe is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strength {
    /// A magic at the start of the file: qemu detects the same.
    Strong,
    /// Only a fixed VHD footer at the end: qemu probes such a file as raw.
    Weak,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The format `head` (the first bytes of a file, ideally [`PROBE_LEN`]) and `tail` (its
/// last bytes, ideally [`VHD_FOOTER_LEN`]) show, or `None` for no known image (raw).
pub fn detect(head: &[u8], tail: &[u8], file_len: u64) -> Option<Format> {
    probe(head, tail, file_len).map(|(f, _)| f)
}

fn probe(head: &[u8], tail: &[u8], file_len: u64) -> Option<(Format, Strength)> {
    let strong = |f| Some((f, Strength::Strong));
    // Any version: the reader names an unsupported one (qcow v1) better than a raw
    // import of a qcow file would.
    if head.starts_with(QCOW2_MAGIC) {
        return strong(Format::Qcow2);
    }
    if head.starts_with(QED_MAGIC) {
        return strong(Format::Qed);
    }
    if head
        .get(VDI_SIGNATURE_OFFSET..VDI_SIGNATURE_OFFSET + 4)
        .is_some_and(|b| b == VDI_SIGNATURE.to_le_bytes())
    {
        return strong(Format::Vdi);
    }
    if head.starts_with(VHD_COOKIE) {
        return strong(Format::Vpc);
    }
    if head.starts_with(VMDK4_MAGIC) || head.starts_with(VMDK3_MAGIC) || is_vmdk_descriptor(head) {
        return strong(Format::Vmdk);
    }
    if is_fixed_vhd_footer(tail, file_len) {
        return Some((Format::Vpc, Strength::Weak));
    }
    None
}

/// A text VMDK descriptor: starts with VMware's header comment, or (as qemu accepts)
/// its first line that is not a comment is `version=`.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        // The probe window may cut a multi-byte character: judge the valid prefix.
        Err(e) => match std::str::from_utf8(&head[..e.valid_up_to()]) {
            Ok(t) => t,
            Err(_) => return false,
        },
    };
    let text = text.trim_start();
    if text.starts_with(VMDK_DESCRIPTOR_HEAD) {
        return true;
    }
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with("version="))
}

/// A fixed VHD footer: cookie, fixed disk type, a valid checksum, and a size that fits
/// the file in front of the footer.
fn is_fixed_vhd_footer(tail: &[u8], file_len: u64) -> bool {
    if tail.len() < VHD_FOOTER_LEN || file_len < VHD_FOOTER_LEN as u64 {
        return false;
    }
    let footer = &tail[tail.len() - VHD_FOOTER_LEN..];
    if !footer.starts_with(VHD_COOKIE) || be32(footer, VHD_DISK_TYPE_OFFSET) != Some(VHD_TYPE_FIXED)
    {
        return false;
    }
    let size = footer
        .get(VHD_CURRENT_SIZE_OFFSET..VHD_CURRENT_SIZE_OFFSET + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    if size.is_none_or(|s| s > file_len - VHD_FOOTER_LEN as u64) {
        return false;
    }
    // Checksum: ones' complement of the byte sum, the checksum field counted as zero.
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(VHD_CHECKSUM_OFFSET..VHD_CHECKSUM_OFFSET + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    be32(footer, VHD_CHECKSUM_OFFSET) == Some(!sum)
}

/// Reads the probe window and the footer of `file` and detects its format.
pub fn detect_file(file: &File, path: &Path) -> Result<Option<Format>> {
    Ok(probe_file(file, path)?.map(|(f, _)| f))
}

fn probe_file(file: &File, path: &Path) -> Result<Option<(Format, Strength)>> {
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = vec![0u8; PROBE_LEN.min(len as usize)];
    read_full(file, path, &mut head, 0)?;
    let tail_len = VHD_FOOTER_LEN.min(len as usize);
    let mut tail = vec![0u8; tail_len];
    read_full(file, path, &mut tail, len - tail_len as u64)?;
    Ok(probe(&head, &tail, len))
}

fn read_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        let e = if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "the file shrank while its format was detected")
        } else {
            e
        };
        Error::io(path, e)
    })
}

/// The format a file name's suffix names (`disk.qcow2` → qcow2), as pcocc reads it:
/// the suffix must be a format name exactly.
pub fn format_from_suffix(path: &Path) -> Option<Format> {
    Format::from_name(path.extension()?.to_str()?)
}

/// The format to read `file` (opened from `path`) as: the content's, else the suffix's,
/// else raw. A `forced` format is used as given unless the content is a real image of
/// another format, which is [`Error::FormatMismatch`] (raw content is "unknown" and
/// never contradicts, as in pcocc).
pub fn resolve_format(forced: Option<Format>, path: &Path, file: &File) -> Result<Format> {
    let found = probe_file(file, path)?;
    match (forced, found) {
        (Some(f), None) => Ok(f),
        (Some(f), Some((d, _))) if f == d => Ok(f),
        (Some(Format::Raw), Some((_, Strength::Weak))) => Ok(Format::Raw),
        (Some(f), Some((d, _))) => Err(Error::FormatMismatch {
            path: path.to_path_buf(),
            forced: f,
            detected: d,
        }),
        (None, Some((d, _))) => Ok(d),
        (None, None) => Ok(format_from_suffix(path).unwrap_or(Format::Raw)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{have_qemu, qemu_create};

    fn create(dir: &Path, fmt: &str, opts: &str, name: &str) -> std::path::PathBuf {
        qemu_create(dir, fmt, name, "4M", opts)
    }

    fn detected(p: &Path) -> Option<Format> {
        detect_file(&File::open(p).unwrap(), p).unwrap()
    }

    #[test]
    fn every_format_qemu_img_creates_is_detected_by_content() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Names carry no suffix, so only the content can tell.
        let cases: &[(&str, &str, Format)] = &[
            ("qcow2", "compat=1.1", Format::Qcow2),
            ("qcow2", "compat=0.10", Format::Qcow2),
            ("qed", "", Format::Qed),
            ("vdi", "", Format::Vdi),
            ("vdi", "static=on", Format::Vdi),
            ("vpc", "", Format::Vpc),
            ("vpc", "subformat=fixed", Format::Vpc),
            ("vmdk", "", Format::Vmdk),
            ("vmdk", "subformat=streamOptimized", Format::Vmdk),
            ("vmdk", "subformat=monolithicFlat", Format::Vmdk),
        ];
        for (i, (fmt, opts, want)) in cases.iter().enumerate() {
            let p = create(d, fmt, opts, &format!("img{i}"));
            assert_eq!(detected(&p), Some(*want), "{fmt} {opts:?}");
            let f = File::open(&p).unwrap();
            assert_eq!(resolve_format(None, &p, &f).unwrap(), *want);
            assert_eq!(resolve_format(Some(*want), &p, &f).unwrap(), *want);
        }
        let raw = create(d, "raw", "", "plain");
        assert_eq!(detected(&raw), None);
    }

    #[test]
    fn forced_format_contradicted_by_content_is_a_mismatch_naming_both() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let q = create(dir.path(), "qcow2", "", "disk.qcow2");
        let f = File::open(&q).unwrap();
        for forced in [Format::Raw, Format::Vmdk, Format::Qed] {
            let err = resolve_format(Some(forced), &q, &f).unwrap_err();
            assert!(
                matches!(err, Error::FormatMismatch { forced: fo, detected: Format::Qcow2, .. } if fo == forced),
                "{err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(forced.name()) && msg.contains("qcow2"),
                "{msg}"
            );
        }
        // Raw content never contradicts: pcocc treats a raw detection as unknown.
        let r = create(dir.path(), "raw", "", "disk.raw");
        let f = File::open(&r).unwrap();
        assert_eq!(
            resolve_format(Some(Format::Qcow2), &r, &f).unwrap(),
            Format::Qcow2
        );
        // A fixed VHD is raw to qemu's probe, so forcing raw is allowed.
        let v = create(dir.path(), "vpc", "subformat=fixed", "fixed");
        let f = File::open(&v).unwrap();
        assert_eq!(
            resolve_format(Some(Format::Raw), &v, &f).unwrap(),
            Format::Raw
        );
    }

    #[test]
    fn content_wins_over_suffix_and_suffix_over_raw() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let q = create(dir.path(), "qcow2", "", "misnamed.vmdk");
        let f = File::open(&q).unwrap();
        assert_eq!(resolve_format(None, &q, &f).unwrap(), Format::Qcow2);
        let r = create(dir.path(), "raw", "", "plain.qed");
        let f = File::open(&r).unwrap();
        assert_eq!(resolve_format(None, &r, &f).unwrap(), Format::Qed);
        let r = create(dir.path(), "raw", "", "plain.img");
        let f = File::open(&r).unwrap();
        assert_eq!(resolve_format(None, &r, &f).unwrap(), Format::Raw);
    }

    #[test]
    fn suffixes_are_exact_format_names() {
        assert_eq!(
            format_from_suffix(Path::new("a/b.qcow2")),
            Some(Format::Qcow2)
        );
        assert_eq!(format_from_suffix(Path::new("b.vpc")), Some(Format::Vpc));
        assert_eq!(format_from_suffix(Path::new("b.raw")), Some(Format::Raw));
        assert_eq!(format_from_suffix(Path::new("b.img")), None);
        assert_eq!(format_from_suffix(Path::new("qcow2")), None);
    }

    #[test]
    fn short_and_empty_inputs_are_not_images() {
        assert_eq!(detect(b"", b"", 0), None);
        assert_eq!(detect(b"QFI", b"QFI", 3), None);
        assert_eq!(detect(b"QFI\xfb\0\0\0\x01", b"", 8), Some(Format::Qcow2));
        assert_eq!(detect(b"conectix", b"conectix", 8), Some(Format::Vpc));
        assert_eq!(
            detect(b"  # Disk DescriptorFile\nversion=1\n", b"", 40),
            Some(Format::Vmdk)
        );
        assert_eq!(detect(b"hello world", b"hello world", 11), None);
    }
}
