//! Which format the file of an import (its source) or an export (its destination) is,
//! decided the way pcocc decides it, so that the same command line picks the same format:
//!
//! 1. A `FMT:` prefix naming a known format is split off the path (`qcow2:disk`); an
//!    unknown prefix stays part of the path (`./a:b`).
//! 2. `-t FMT` and a prefix must agree. Both are case-insensitive (`-t QCOW2`), as pcocc
//!    lower-cases them.
//! 3. Without either, a suffix that is exactly a format name (`disk.vmdk`, not
//!    `disk.VMDK`) specifies the format.
//! 4. An existing regular file is probed ([`crate::image::detect`]); raw content is
//!    "unknown" and never contradicts. A probe that contradicts the specified format is a
//!    mismatch, so an export never overwrites a file of another format and an import never
//!    reads an image as something else.
//! 5. With nothing specified: the probed format; else an import assumes raw (with pcocc's
//!    warning) when the file exists and cannot be told apart ("Could not detect image
//!    format" when it does not); an export writes raw.
//!
//! A leading `~` or `~user` of the path (after any prefix) is the home directory, as
//! pcocc expands it (Python's `os.path.expanduser`).
//!
//! Only then is the specified name checked against the formats this project writes and
//! reads (`iso is not a valid image format`), which is why a mismatch with the content is
//! reported first, as pcocc does. pcocc also routed container formats (`docker`, `oci`,
//! …) to skopeo; here they are refused with a message that says why.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::image::{self, Format, detect};

/// The transports pcocc hands to skopeo for container images; accepted as prefixes (so
/// `docker://…` is understood as such) and refused as formats.
const CONTAINER_FORMATS: [&str; 7] = [
    "containers-storage",
    "dir",
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
];

/// The separator between a format prefix and the path (`qcow2:disk`).
const PREFIX_SEPARATOR: char = ':';

/// Which end of a transfer the file is: the source of an import or the destination of an
/// export. They differ only when no format can be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Import,
    Export,
}

/// The decided format of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guess {
    /// The path without its format prefix.
    pub path: PathBuf,
    pub format: Format,
    /// Nothing specified and nothing detected: an import reads the file as raw, and says
    /// so (pcocc's warning "Could not detect image format, assuming raw VM").
    pub assumed_raw: bool,
    /// Nothing specified and nothing detected, on either side: raw is a default.
    pub defaulted: bool,
}

/// Why no format could be decided; messages are pcocc's where it has one.
#[derive(Debug, thiserror::Error)]
pub enum GuessError {
    /// pcocc says "import URI prefix" for exports too.
    #[error("Mismatch between specified image format {option} and import URI prefix {prefix}")]
    PrefixMismatch { option: String, prefix: String },
    #[error("Mismatch between specified format {specified} and detected image type {detected}")]
    DetectedMismatch {
        specified: String,
        detected: &'static str,
    },
    #[error("{0} is not a valid image format")]
    NotAFormat(String),
    #[error(
        "{0} is not a valid image format: container images are not handled here, only VM images (raw, qcow2, qed, vdi, vpc, vmdk)"
    )]
    ContainerFormat(String),
    #[error("Could not detect image format")]
    Undetectable,
    /// The file exists but could not be probed (permissions, I/O).
    #[error(transparent)]
    Probe(image::Error),
}

impl From<image::Error> for GuessError {
    /// Content of a format pcocc does not import is pcocc's plain message.
    fn from(e: image::Error) -> GuessError {
        match e {
            image::Error::NotAFormat { name, .. } => GuessError::NotAFormat(name.to_string()),
            e => GuessError::Probe(e),
        }
    }
}

/// Decides the format of `arg` (a path, maybe with a `FMT:` prefix) given `-t` (`option`).
/// See the module comment for the rules.
pub fn guess(option: Option<&str>, arg: &str, side: Side) -> Result<Guess, GuessError> {
    let option = option.map(str::to_ascii_lowercase);
    let (prefix, path) = split_prefix(arg);
    if let (Some(option), Some(prefix)) = (&option, &prefix)
        && option != prefix
    {
        return Err(GuessError::PrefixMismatch {
            option: option.clone(),
            prefix: prefix.clone(),
        });
    }
    let path = PathBuf::from(expand_user(path).into_owned());
    let specified = option
        .or(prefix)
        .or_else(|| detect::format_from_suffix(&path).map(|f| f.name().to_string()));
    let probe = if path.is_file() {
        Some(File::open(&path).map_err(|e| image::Error::io(&path, e))?)
    } else {
        None
    };
    let decided = |format, defaulted: bool| Guess {
        path: path.clone(),
        format,
        assumed_raw: defaulted && side == Side::Import,
        defaulted,
    };
    match (specified, probe) {
        (Some(name), probe) => {
            let known = Format::from_name(&name);
            match (known, probe) {
                (Some(format), Some(file)) => {
                    match detect::resolve_format(Some(format), &path, &file) {
                        Ok(format) => Ok(decided(format, false)),
                        Err(image::Error::FormatMismatch { detected, .. }) => {
                            Err(GuessError::DetectedMismatch {
                                specified: name,
                                detected,
                            })
                        }
                        Err(other) => Err(other.into()),
                    }
                }
                (Some(format), None) => Ok(decided(format, false)),
                (None, Some(file)) => match detect::probe_found(&file, &path)? {
                    Some(detected) => Err(GuessError::DetectedMismatch {
                        specified: name,
                        detected: detected.name(),
                    }),
                    None => Err(not_a_format(name)),
                },
                (None, None) => Err(not_a_format(name)),
            }
        }
        (None, Some(file)) => match detect::detect_file(&file, &path)? {
            Some(format) => Ok(decided(format, false)),
            None => Ok(decided(Format::Raw, true)),
        },
        (None, None) => match side {
            Side::Import => Err(GuessError::Undetectable),
            Side::Export => Ok(decided(Format::Raw, true)),
        },
    }
}

/// Python's `os.path.expanduser`: `~` (alone or before `/`) is `$HOME`, else the passwd
/// home of the process's user; `~name` is the home of `name`; anything else, an unknown
/// user included, is left as written.
pub fn expand_user(path: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let Some(rest) = path.strip_prefix('~') else {
        return Cow::Borrowed(path);
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let (name, tail) = rest.split_at(end);
    let home = if name.is_empty() {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .or_else(|| crate::sys::user_name_and_home(crate::sys::uid()).map(|(_, h)| h))
    } else {
        crate::sys::home_of(name)
    };
    let Some(home) = home else {
        return Cow::Borrowed(path);
    };
    let home = home.to_string_lossy();
    let joined = format!("{}{tail}", home.trim_end_matches('/'));
    Cow::Owned(if joined.is_empty() {
        "/".into()
    } else {
        joined
    })
}

/// Splits a known format prefix (case-insensitive, returned lower-cased) off `arg`.
fn split_prefix(arg: &str) -> (Option<String>, &str) {
    if let Some((head, rest)) = arg.split_once(PREFIX_SEPARATOR) {
        let head = head.to_ascii_lowercase();
        if Format::from_name(&head).is_some() || CONTAINER_FORMATS.contains(&head.as_str()) {
            return (Some(head), rest);
        }
    }
    (None, arg)
}

fn not_a_format(name: String) -> GuessError {
    if CONTAINER_FORMATS.contains(&name.as_str()) {
        GuessError::ContainerFormat(name)
    } else {
        GuessError::NotAFormat(name)
    }
}

/// True when `path` is something an import can read: pcocc's check before converting
/// ("Failed to import X : not an image file" otherwise).
pub fn is_importable(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{have_qemu, qemu_img};

    /// A scratch directory holding a small qcow2 image, a raw file and a text file.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Option<Files> {
            if !have_qemu() {
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let files = Files { dir };
            let q = files.path("disk.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]);
            std::fs::copy(&q, files.path("misnamed.vmdk")).unwrap();
            std::fs::copy(&q, files.path("noext")).unwrap();
            std::fs::write(files.path("notes.txt"), "hello\n").unwrap();
            std::fs::write(files.path("fake.qcow2"), "not an image at all\n").unwrap();
            Some(files)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn arg(&self, name: &str) -> String {
            self.path(name).to_str().unwrap().to_string()
        }

        fn guess(&self, option: Option<&str>, arg: &str, side: Side) -> Result<Guess, String> {
            guess(option, arg, side).map_err(|e| e.to_string())
        }
    }

    fn format_of(g: Result<Guess, String>) -> Format {
        g.expect("a format is decided").format
    }

    #[test]
    fn a_known_prefix_is_split_off_case_insensitively_and_others_stay() {
        assert_eq!(split_prefix("qcow2:a"), (Some("qcow2".into()), "a"));
        assert_eq!(split_prefix("RAW:a:b"), (Some("raw".into()), "a:b"));
        assert_eq!(split_prefix("docker:x"), (Some("docker".into()), "x"));
        assert_eq!(split_prefix("iso:a"), (None, "iso:a"));
        assert_eq!(split_prefix("./qcow2:a"), (None, "./qcow2:a"));
        assert_eq!(split_prefix("plain"), (None, "plain"));
    }

    #[test]
    fn a_tilde_is_the_home_directory_as_python_expands_it() {
        let home = std::env::var("HOME").unwrap_or_default();
        let home = home.trim_end_matches('/');
        assert_eq!(expand_user("~/a/b"), format!("{home}/a/b"));
        assert_eq!(expand_user("~"), if home.is_empty() { "/" } else { home });
        let root = crate::sys::home_of("root").unwrap();
        assert_eq!(
            expand_user("~root/x"),
            format!("{}/x", root.to_string_lossy().trim_end_matches('/'))
        );
        for kept in ["a/~/b", "./~", "~no-such-user-here/x", "x~"] {
            assert_eq!(expand_user(kept), kept);
        }
    }

    #[test]
    fn option_and_prefix_must_agree_whatever_their_case() {
        let e = guess(Some("RAW"), "QCOW2:x", Side::Import).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Mismatch between specified image format raw and import URI prefix qcow2"
        );
        assert!(guess(Some("Qcow2"), "qcow2:missing-file", Side::Export).is_ok());
    }

    #[test]
    fn content_decides_and_contradicting_it_is_a_mismatch() {
        let Some(f) = Files::new() else { return };
        assert_eq!(
            format_of(f.guess(None, &f.arg("noext"), Side::Import)),
            Format::Qcow2
        );
        assert_eq!(
            format_of(f.guess(Some("QCOW2"), &f.arg("noext"), Side::Import)),
            Format::Qcow2
        );
        assert_eq!(
            f.guess(None, &f.arg("misnamed.vmdk"), Side::Import),
            Err("Mismatch between specified format vmdk and detected image type qcow2".into())
        );
        assert_eq!(
            f.guess(Some("raw"), &f.arg("disk.qcow2"), Side::Export),
            Err("Mismatch between specified format raw and detected image type qcow2".into())
        );
        let prefixed = format!("vmdk:{}", f.arg("disk.qcow2"));
        assert_eq!(
            f.guess(None, &prefixed, Side::Import),
            Err("Mismatch between specified format vmdk and detected image type qcow2".into())
        );
    }

    #[test]
    fn an_unknown_format_contradicted_by_content_reports_the_mismatch_first() {
        let Some(f) = Files::new() else { return };
        assert_eq!(
            f.guess(Some("iso"), &f.arg("disk.qcow2"), Side::Import),
            Err("Mismatch between specified format iso and detected image type qcow2".into())
        );
        assert_eq!(
            f.guess(Some("iso"), &f.arg("notes.txt"), Side::Import),
            Err("iso is not a valid image format".into())
        );
        assert_eq!(
            f.guess(Some("iso"), "out.iso", Side::Export),
            Err("iso is not a valid image format".into())
        );
        let docker = f.guess(Some("docker"), "x", Side::Import).unwrap_err();
        assert!(
            docker.starts_with("docker is not a valid image format: container images"),
            "{docker}"
        );
    }

    #[test]
    fn raw_content_never_contradicts_so_a_text_file_named_qcow2_is_a_qcow2() {
        let Some(f) = Files::new() else { return };
        let g = guess(None, &f.arg("fake.qcow2"), Side::Import).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Qcow2, false));
        let g = guess(Some("vdi"), &f.arg("notes.txt"), Side::Export).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Vdi, false));
    }

    #[test]
    fn an_undetectable_import_is_raw_with_a_warning_and_an_export_is_raw() {
        let Some(f) = Files::new() else { return };
        let g = guess(None, &f.arg("notes.txt"), Side::Import).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Raw, true));
        let g = guess(Some("raw"), &f.arg("notes.txt"), Side::Import).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Raw, false));
        let g = guess(None, &f.arg("notes.txt"), Side::Export).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Raw, false));
        let g = guess(None, &f.arg("new-file"), Side::Export).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Raw, false));
    }

    #[test]
    fn a_missing_path_or_a_directory_cannot_be_detected_for_an_import() {
        let Some(f) = Files::new() else { return };
        for arg in [f.arg("does-not-exist"), f.arg("")] {
            assert_eq!(
                f.guess(None, &arg, Side::Import),
                Err("Could not detect image format".into())
            );
        }
        // A suffix or a prefix is enough to go on; the missing file is found later.
        let g = guess(None, &f.arg("does-not-exist.qcow2"), Side::Import).unwrap();
        assert_eq!(g.format, Format::Qcow2);
        assert!(!is_importable(&g.path));
        let g = guess(None, &format!("vdi:{}", f.arg("gone")), Side::Import).unwrap();
        assert_eq!((g.format, g.path), (Format::Vdi, f.path("gone")));
    }

    #[test]
    fn suffixes_count_only_when_spelled_exactly() {
        let Some(f) = Files::new() else { return };
        std::fs::write(f.path("upper.VMDK"), "text").unwrap();
        let g = guess(None, &f.arg("upper.VMDK"), Side::Import).unwrap();
        assert_eq!((g.format, g.assumed_raw), (Format::Raw, true));
        for format in Format::ALL {
            let name = format!("new.{}", format.name());
            assert_eq!(
                format_of(f.guess(None, &f.arg(&name), Side::Export)),
                format
            );
        }
    }
}
