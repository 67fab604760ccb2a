//! Format detection: by content (magic numbers plus header sanity), then by file-name
//! suffix, then raw — the order pcocc follows for imports.
//!
//! Content that qemu reads as a format pcocc does not list ([`Foreign`]: vhdx, parallels,
//! qcow version 1, luks, dmg, cloop, bochs) is refused with pcocc's message ("vhdx is not
//! a valid image format"), never imported as raw: raw is only for content no format
//! claims.
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
/// qcow (version 1) shares qcow2's magic; the big-endian version follows it.
const QCOW_VERSION_OFFSET: usize = 4;
/// VHDX file type identifier "vhdxfile" at offset 0 (VHDX spec 2.2.1).
const VHDX_MAGIC: &[u8] = b"vhdxfile";
/// Parallels disk signatures at offset 0, the second for images with format extensions.
const PARALLELS_MAGICS: [&[u8]; 2] = [b"WithoutFreeSpace", b"WithouFreSpacExt"];
/// LUKS header magic "LUKS\xba\xbe" followed by the big-endian version; qemu probes
/// version 1 only (a LUKS2 header is raw to it).
const LUKS_MAGIC: &[u8] = b"LUKS\xba\xbe";
const LUKS_VERSION_1: u16 = 1;
/// Bochs growing images: a NUL-padded magic string, type and subtype, then a version.
const BOCHS_MAGIC: &[u8] = b"Bochs Virtual HD Image";
const BOCHS_TYPE_OFFSET: usize = 32;
const BOCHS_TYPE: &[u8] = b"Redolog";
const BOCHS_SUBTYPE_OFFSET: usize = 48;
const BOCHS_SUBTYPE: &[u8] = b"Growing";
/// cloop images start with the shell script that mounts them, "#V2.0 Format" version.
const CLOOP_HEAD: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// Apple UDIF (dmg) images end with a 512-byte "koly" trailer, version 4. qemu probes
/// dmg by the name's `.dmg` suffix only (a misnamed dmg is raw to it, and pcocc would
/// import its container bytes as the disk); the trailer is refused whatever the name.
const DMG_TRAILER_LEN: usize = 512;
const DMG_MAGIC: &[u8] = b"koly";
const DMG_VERSION: u32 = 4;

/// A format qemu recognises by content that pcocc does not import: pcocc asks
/// `qemu-img info` and refuses any detected format it does not list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    Vhdx,
    Parallels,
    /// qcow version 1 (qcow2's predecessor, same magic).
    Qcow,
    Luks,
    Dmg,
    Cloop,
    Bochs,
}

impl Foreign {
    /// qemu's name of the format, as pcocc's message shows it.
    pub fn name(self) -> &'static str {
        match self {
            Foreign::Vhdx => "vhdx",
            Foreign::Parallels => "parallels",
            Foreign::Qcow => "qcow",
            Foreign::Luks => "luks",
            Foreign::Dmg => "dmg",
            Foreign::Cloop => "cloop",
            Foreign::Bochs => "bochs",
        }
    }
}

/// What a content probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A format this project reads.
    Known(Format),
    /// A format pcocc does not import.
    Foreign(Foreign),
}

impl Found {
    /// The format's name (qemu's).
    pub fn name(self) -> &'static str {
        match self {
            Found::Known(f) => f.name(),
            Found::Foreign(f) => f.name(),
        }
    }
}

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
pub fn detect(head: &[u8], tail: &[u8], file_len: u64) -> Option<Found> {
    probe(head, tail, file_len).map(|(f, _)| f)
}

fn probe(head: &[u8], tail: &[u8], file_len: u64) -> Option<(Found, Strength)> {
    let strong = |f| Some((Found::Known(f), Strength::Strong));
    let foreign = |f| Some((Found::Foreign(f), Strength::Strong));
    if head.starts_with(QCOW2_MAGIC) {
        // Version 1 is qcow; any other version is qcow2's, whose reader names an
        // unsupported one.
        if be32(head, QCOW_VERSION_OFFSET) == Some(1) {
            return foreign(Foreign::Qcow);
        }
        return strong(Format::Qcow2);
    }
    if let Some(f) = probe_foreign(head, tail) {
        return foreign(f);
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
        return Some((Found::Known(Format::Vpc), Strength::Weak));
    }
    None
}

/// The formats pcocc refuses, by their magic (qcow version 1 aside).
fn probe_foreign(head: &[u8], tail: &[u8]) -> Option<Foreign> {
    let at = |offset: usize, magic: &[u8]| {
        head.get(offset..offset + magic.len())
            .is_some_and(|b| b == magic)
    };
    // A NUL-padded string field.
    let field = |offset: usize, value: &[u8]| {
        at(offset, value) && head.get(offset + value.len()) == Some(&0)
    };
    if head.starts_with(VHDX_MAGIC) {
        return Some(Foreign::Vhdx);
    }
    if PARALLELS_MAGICS.iter().any(|m| head.starts_with(m)) {
        return Some(Foreign::Parallels);
    }
    if head.starts_with(LUKS_MAGIC)
        && head
            .get(LUKS_MAGIC.len()..LUKS_MAGIC.len() + 2)
            .is_some_and(|v| v == LUKS_VERSION_1.to_be_bytes())
    {
        return Some(Foreign::Luks);
    }
    if field(0, BOCHS_MAGIC)
        && field(BOCHS_TYPE_OFFSET, BOCHS_TYPE)
        && field(BOCHS_SUBTYPE_OFFSET, BOCHS_SUBTYPE)
    {
        return Some(Foreign::Bochs);
    }
    if head.starts_with(CLOOP_HEAD) {
        return Some(Foreign::Cloop);
    }
    if tail.len() >= DMG_TRAILER_LEN {
        let trailer = &tail[tail.len() - DMG_TRAILER_LEN..];
        if trailer.starts_with(DMG_MAGIC)
            && be32(trailer, 4) == Some(DMG_VERSION)
            && be32(trailer, 8) == Some(DMG_TRAILER_LEN as u32)
        {
            return Some(Foreign::Dmg);
        }
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

/// Reads the probe window and the footer of `file` and detects its format: `None` for
/// raw content, [`Error::NotAFormat`] for a format pcocc does not import.
pub fn detect_file(file: &File, path: &Path) -> Result<Option<Format>> {
    match probe_file(file, path)? {
        None => Ok(None),
        Some((Found::Known(f), _)) => Ok(Some(f)),
        Some((Found::Foreign(f), _)) => Err(not_a_format(path, f)),
    }
}

/// What [`detect_file`] finds, a format pcocc does not import included.
pub fn probe_found(file: &File, path: &Path) -> Result<Option<Found>> {
    Ok(probe_file(file, path)?.map(|(f, _)| f))
}

fn not_a_format(path: &Path, format: Foreign) -> Error {
    Error::NotAFormat {
        path: path.to_path_buf(),
        name: format.name(),
    }
}

fn probe_file(file: &File, path: &Path) -> Result<Option<(Found, Strength)>> {
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
/// never contradicts, as in pcocc); content of a format pcocc does not import is
/// [`Error::NotAFormat`] when nothing is forced.
pub fn resolve_format(forced: Option<Format>, path: &Path, file: &File) -> Result<Format> {
    let found = probe_file(file, path)?;
    match (forced, found) {
        (Some(f), None) => Ok(f),
        (Some(f), Some((Found::Known(d), _))) if f == d => Ok(f),
        (Some(Format::Raw), Some((_, Strength::Weak))) => Ok(Format::Raw),
        (Some(f), Some((d, _))) => Err(Error::FormatMismatch {
            path: path.to_path_buf(),
            forced: f,
            detected: d.name(),
        }),
        (None, Some((Found::Known(d), _))) => Ok(d),
        (None, Some((Found::Foreign(d), _))) => Err(not_a_format(path, d)),
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
    fn formats_pcocc_does_not_import_are_refused_with_its_message() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for fmt in crate::testutil::FOREIGN_FORMATS {
            let p = crate::testutil::foreign_image(dir.path(), fmt, &format!("img-{fmt}"));
            if fmt != "dmg" {
                // qemu agrees (it probes dmg by the name's suffix only).
                let info =
                    crate::testutil::qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
                assert!(info.contains(&format!("\"format\": \"{fmt}\"")), "{info}");
            }
            let f = File::open(&p).unwrap();
            let err = detect_file(&f, &p).unwrap_err();
            assert!(
                matches!(err, Error::NotAFormat { name, .. } if name == fmt),
                "{fmt}: {err}"
            );
            assert!(
                err.to_string()
                    .ends_with(&format!("{fmt} is not a valid image format"))
            );
            assert_eq!(err.errno(), libc::EINVAL);
            let err = resolve_format(None, &p, &f).unwrap_err();
            assert!(matches!(err, Error::NotAFormat { .. }), "{fmt}: {err}");
            // Forcing any format, raw included, is a mismatch naming the content's.
            for forced in [Format::Raw, Format::Qcow2] {
                let err = resolve_format(Some(forced), &p, &f).unwrap_err();
                assert!(
                    matches!(err, Error::FormatMismatch { detected, .. } if detected == fmt),
                    "{fmt}: {err}"
                );
            }
        }
        // Near misses stay raw: a LUKS2 header (qemu probes LUKS1 only), a bochs magic
        // without its type, a cloop script of another version.
        let mut luks2 = b"LUKS\xba\xbe\x00\x02".to_vec();
        luks2.resize(4096, 0);
        let mut bochs = crate::testutil::foreign_bytes("bochs");
        bochs[32..39].copy_from_slice(b"Redolug");
        let mut cloop = crate::testutil::foreign_bytes("cloop");
        cloop[11..15].copy_from_slice(b"V1.0");
        for bytes in [luks2, bochs, cloop] {
            assert_eq!(detect(&bytes, &bytes, bytes.len() as u64), None);
        }
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
                matches!(err, Error::FormatMismatch { forced: fo, detected: "qcow2", .. } if fo == forced),
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
        assert_eq!(
            detect(b"QFI\xfb\0\0\0\x02", b"", 8),
            Some(Found::Known(Format::Qcow2))
        );
        assert_eq!(
            detect(b"QFI\xfb\0\0\0\x01", b"", 8),
            Some(Found::Foreign(Foreign::Qcow))
        );
        assert_eq!(
            detect(b"conectix", b"conectix", 8),
            Some(Found::Known(Format::Vpc))
        );
        assert_eq!(
            detect(b"  # Disk DescriptorFile\nversion=1\n", b"", 40),
            Some(Found::Known(Format::Vmdk))
        );
        assert_eq!(detect(b"hello world", b"hello world", 11), None);
    }
}
