//! Reading pcocc's legacy (version 1) repositories: one YAML file per revision at
//! `meta/XX/<sha256("NAME\nREV")>`. Names are hidden in the hash, so listing parses
//! every file; legacy repositories are small and gc upgrades them to version 2.

use std::io;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::fsutil::{Dir, io_err, read_bounded_file};
use super::{Error, Meta};
use crate::sys::{self, EntryType};

/// Where version 1 keeps the metadata of `name@rev`, relative to `meta/`.
pub fn meta_rel(name: &str, rev: u64) -> PathBuf {
    let hash = format!("{:x}", Sha256::digest(format!("{name}\n{rev}").as_bytes()));
    PathBuf::from(&hash[..2]).join(hash)
}

/// Parses one version 1 metadata file.
pub fn parse(bytes: &[u8]) -> Result<Meta, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

/// Readable metadata files with their content, and unreadable ones.
pub type Scan = (Vec<(PathBuf, Meta)>, Vec<PathBuf>);

/// Every metadata file under `meta` with its parsed content, and the files that could
/// not be parsed (each also logged as a warning).
pub fn read_all_checked(meta: &Dir) -> Result<Scan, Error> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let top = match sys::read_dir(meta.fd()) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((good, bad)),
        Err(e) => return Err(io_err(&meta.path, e)),
    };
    for (sub, kind) in top {
        let sub_dir = match kind {
            EntryType::Directory | EntryType::Unknown => meta.subdir(&sub).ok(),
            _ => None,
        };
        let Some(sub_dir) = sub_dir else {
            log::warn!(
                "skipping {}: not a version 1 metadata directory",
                meta.show(&sub).display()
            );
            continue;
        };
        let entries = sys::read_dir(sub_dir.fd()).map_err(|e| io_err(&sub_dir.path, e))?;
        for (name, _) in entries {
            let path = sub_dir.show(&name);
            let parsed = sub_dir
                .open_regular(&name)
                .map_err(|e| e.to_string())
                .and_then(|(f, m)| {
                    read_bounded_file(f, &m, super::MAX_META_BYTES).map_err(|e| e.to_string())
                })
                .and_then(|b| parse(&b))
                .and_then(|m| m.layer_hashes().map(|_| ()).map(|()| m));
            match parsed {
                Ok(m) => good.push((path, m)),
                Err(reason) => {
                    log::warn!("skipping {}: bad metadata: {reason}", path.display());
                    bad.push(path);
                }
            }
        }
    }
    Ok((good, bad))
}

/// [`read_all_checked`] without the list of bad files.
pub fn read_all(meta: &Dir) -> Result<Vec<(PathBuf, Meta)>, Error> {
    Ok(read_all_checked(meta)?.0)
}
