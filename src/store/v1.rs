//! Reading pcocc's legacy (version 1) repositories: one YAML file per revision at
//! `meta/XX/<sha256("NAME\nREV")>`. Names are hidden in the hash, so listing parses
//! every file; legacy repositories are small and gc upgrades them to version 2.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::fsutil::io_err;
use super::{Error, Meta};

/// Where version 1 keeps the metadata of `name@rev`.
pub fn meta_path(meta_dir: &Path, name: &str, rev: u64) -> PathBuf {
    let hash = format!("{:x}", Sha256::digest(format!("{name}\n{rev}").as_bytes()));
    meta_dir.join(&hash[..2]).join(hash)
}

/// Parses one version 1 metadata file.
pub fn parse(bytes: &[u8]) -> Result<Meta, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

/// Readable metadata files with their content, and unreadable ones.
pub type Scan = (Vec<(PathBuf, Meta)>, Vec<PathBuf>);

/// Every metadata file under `meta_dir` with its parsed content, and the files that could
/// not be parsed (each also logged as a warning).
pub fn read_all_checked(meta_dir: &Path) -> Result<Scan, Error> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let top = match fs::read_dir(meta_dir) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((good, bad)),
        Err(e) => return Err(io_err(meta_dir, e)),
    };
    for sub in top {
        let sub = sub.map_err(|e| io_err(meta_dir, e))?.path();
        if !sub.is_dir() {
            log::warn!(
                "skipping {}: not a version 1 metadata directory",
                sub.display()
            );
            continue;
        }
        for entry in fs::read_dir(&sub).map_err(|e| io_err(&sub, e))? {
            let path = entry.map_err(|e| io_err(&sub, e))?.path();
            let parsed = super::fsutil::read_bounded(&path, super::MAX_META_BYTES)
                .map_err(|e| e.to_string())
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
pub fn read_all(meta_dir: &Path) -> Result<Vec<(PathBuf, Meta)>, Error> {
    Ok(read_all_checked(meta_dir)?.0)
}
