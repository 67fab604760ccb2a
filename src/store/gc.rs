//! Garbage collection and the version 1 → 2 upgrade.
//!
//! gc removes layers no revision of the repository references and `.tmp/` entries older
//! than a grace period, and upgrades a version 1 repository as pcocc's gc does. Losing
//! data is the worst bug, so it errs towards keeping: when a metadata file cannot be
//! read, no layer is removed; layers added within the grace period are kept (an import
//! may be about to publish the metadata that references them); the references are read
//! twice, before choosing and again right before removing; and a layer's age is looked
//! at again just before it is removed, since an import reusing an existing layer marks
//! it (see `refresh_ctime` in layers.rs) before publishing its metadata. What remains
//! is an import reusing the layer between that last look and the unlink, a window of
//! microseconds that no lock-free scheme over a shared filesystem closes.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::fsutil::{self, Dir, io_err};
use super::{CONFIG_V2, Error, Meta, Store, VERSION_CURRENT, VERSION_LEGACY, is_hash, v1};
use crate::sys;

/// What [`Store::gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Hashes of the layers removed.
    pub layers_removed: Vec<String>,
    /// Unreferenced layers kept because they were added within the grace period.
    pub layers_kept_fresh: Vec<String>,
    /// True when no layer was considered because some metadata could not be read.
    pub layers_skipped: bool,
    /// `.tmp/` entries removed.
    pub tmp_removed: Vec<PathBuf>,
    /// True when a version 1 repository was upgraded to version 2.
    pub upgraded: bool,
}

impl Store {
    /// Every readable revision's metadata, and the metadata files that could not be read
    /// (each logged as a warning).
    pub fn all_metas(&self) -> Result<(Vec<Meta>, Vec<PathBuf>), Error> {
        if self.version() == VERSION_LEGACY {
            let (good, bad) = v1::read_all_checked(&self.dir("meta")?)?;
            return Ok((good.into_iter().map(|(_, m)| m).collect(), bad));
        }
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for (name, revs) in self.list()? {
            for rev in revs {
                match self.read_meta(&name, rev) {
                    Ok(Some(m)) => good.push(m),
                    Ok(None) => {} // deleted meanwhile
                    Err(e) => {
                        log::warn!("repository {}: skipping: {e}", self.name());
                        bad.push(self.meta_path(&name, rev));
                    }
                }
            }
        }
        // Files in meta/ that are not NAME@REV are not revisions (pcocc reads only
        // those; NFS leaves `.nfsXXXX` files there): list() already warned about them.
        Ok((good, bad))
    }

    /// The layer hashes referenced by some revision, or `None` when some metadata could
    /// not be read (and so might reference anything).
    fn referenced(&self) -> Result<Option<HashSet<String>>, Error> {
        let (metas, bad) = self.all_metas()?;
        if !bad.is_empty() {
            return Ok(None);
        }
        let mut set = HashSet::new();
        for m in &metas {
            // all_metas only returns metadata whose layer names parsed.
            for h in m.layer_hashes().unwrap_or_default() {
                set.insert(h.to_string());
            }
        }
        Ok(Some(set))
    }

    /// Removes unreferenced layers (and emptied `data/XX/`), and `.tmp/` entries not
    /// modified for `grace`; upgrades a version 1 repository first.
    pub fn gc(&self, grace: Duration) -> Result<GcReport, Error> {
        let mut report = GcReport::default();
        if self.version() == VERSION_LEGACY {
            self.upgrade()?;
            report.upgraded = true;
        }
        let now = SystemTime::now();
        let older_than_grace = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= grace);

        let data = self.dir("data")?;
        let candidates = match self.referenced()? {
            None => {
                log::warn!(
                    "repository {}: some metadata cannot be read: no layer removed",
                    self.name()
                );
                report.layers_skipped = true;
                Vec::new()
            }
            Some(refs) => {
                let mut c = Vec::new();
                for hash in self.layers(&data)? {
                    if refs.contains(&hash) {
                        continue;
                    }
                    let fresh = data
                        .stat(Self::layer_rel(&hash))
                        .map(|m| !older_than_grace(fsutil::ctime(&m)))
                        .unwrap_or(true);
                    if fresh {
                        report.layers_kept_fresh.push(hash);
                    } else {
                        c.push(hash);
                    }
                }
                c
            }
        };
        if !candidates.is_empty() {
            // Second look, right before removing: a revision published since the first
            // scan may reference a candidate.
            match self.referenced()? {
                None => report.layers_skipped = true,
                Some(refs) => {
                    for hash in candidates {
                        let path = data.show(Self::layer_rel(&hash));
                        if refs.contains(&hash) {
                            continue;
                        }
                        // An import that found this layer already present marked it
                        // (ctime) and is about to publish metadata the second scan
                        // could not see yet: the mark is looked at again, last thing
                        // before the removal.
                        let reused = data
                            .stat(Self::layer_rel(&hash))
                            .map(|m| !older_than_grace(fsutil::ctime(&m)))
                            .unwrap_or(true);
                        if reused {
                            report.layers_kept_fresh.push(hash);
                            continue;
                        }
                        let Ok(xx) = data.subdir(&hash[..2]) else {
                            continue;
                        };
                        match xx.remove(&hash) {
                            Ok(()) => {
                                log::info!("removed unreferenced layer {}", path.display());
                                report.layers_removed.push(hash.clone());
                            }
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(io_err(&path, e)),
                        }
                        // Fails harmlessly while other layers share the prefix.
                        let _ = sys::unlink_at(data.fd(), OsStr::new(&hash[..2]), true);
                    }
                    fsutil::sync_dir(data.fd(), &data.path)?;
                }
            }
        }

        let tmp = self.dir(".tmp")?;
        if let Ok(entries) = sys::read_dir(tmp.fd()) {
            for (name, _) in entries {
                let path = tmp.show(&name);
                let Ok(m) = tmp.stat(&name).or_else(|_| {
                    // A symlink: its own times.
                    fs::symlink_metadata(&path)
                }) else {
                    continue;
                };
                if !m.modified().is_ok_and(older_than_grace) {
                    continue;
                }
                match tmp.remove_tree(&name) {
                    Ok(()) => {
                        log::info!("removed stale scratch entry {}", path.display());
                        report.tmp_removed.push(path);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path, e)),
                }
            }
        }
        Ok(report)
    }

    /// Every file in `data/XX/` named by a hash. Other files are left alone with a
    /// warning.
    fn layers(&self, data: &Dir) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let top = match sys::read_dir(data.fd()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&data.path, e)),
        };
        for (sub, _) in top {
            let Ok(sub_dir) = data.subdir(&sub) else {
                log::warn!(
                    "gc: leaving {} alone: not a layer directory",
                    data.show(&sub).display()
                );
                continue;
            };
            for (name, _) in sys::read_dir(sub_dir.fd()).map_err(|e| io_err(&sub_dir.path, e))? {
                match name.to_str() {
                    Some(h) if is_hash(h) && sub.to_str() == Some(&h[..2]) => {
                        out.push(h.to_string());
                    }
                    _ => log::warn!(
                        "gc: leaving {} alone: not a layer name",
                        sub_dir.show(&name).display()
                    ),
                }
            }
        }
        Ok(out)
    }

    /// Upgrades a version 1 repository to version 2 as pcocc's gc does: every revision is
    /// rewritten as `meta/NAME@REV` JSON (owner and timestamp kept), the old `meta/` is
    /// kept as `meta.old/`, and `.config` says `version: 2`. The new `meta/` is built
    /// complete under `.tmp/` and swapped in by two renames.
    pub fn upgrade(&self) -> Result<(), Error> {
        let _changing = self.changing_meta();
        if self.version() != VERSION_LEGACY {
            return Ok(());
        }
        log::warn!(
            "Upgrading repository {} ({})",
            self.name(),
            self.path().display()
        );
        let root = self.root_dir()?;
        let (metas, bad) = v1::read_all_checked(&root.subdir("meta")?)?;
        if let Some(path) = bad.first() {
            return Err(Error::BadMeta {
                name: String::new(),
                path: path.clone(),
                reason: "cannot upgrade the repository while this file cannot be read".into(),
            });
        }
        let tmp = root.subdir(".tmp")?;
        let stage_name = format!("upgrade-{}", std::process::id());
        let _ = tmp.remove_tree(OsStr::new(&stage_name));
        tmp.make_dir(&stage_name)?;
        let stage = tmp.subdir(&stage_name)?;
        for (_, m) in &metas {
            let name = format!("{}@{}", m.name, m.revision);
            fsutil::publish_exclusive(&tmp, &stage, &name, &m.to_json())?;
        }
        let rename = |from_dir: &Dir, from: &str, to: &str| {
            sys::rename_at(
                from_dir.fd(),
                OsStr::new(from),
                root.fd(),
                OsStr::new(to),
                false,
            )
            .map_err(|e| io_err(&root.show(to), e))
        };
        if root.has("meta") {
            rename(&root, "meta", "meta.old")?;
        }
        rename(&tmp, &stage_name, "meta")?;
        write_config_v2(&root)?;
        fsutil::sync_dir(root.fd(), &root.path)?;
        self.version.store(VERSION_CURRENT, Ordering::Release);
        Ok(())
    }
}

/// Replaces `.config` with `version: 2` atomically (write aside, then rename over).
fn write_config_v2(root: &Dir) -> Result<(), Error> {
    let tmp = root.subdir(".tmp")?;
    let (f, name) = fsutil::create_tmp(&tmp, 0o644)?;
    let written = (|| {
        use std::io::Write;
        let mut f = f;
        f.write_all(CONFIG_V2.as_bytes())?;
        f.sync_all()?;
        sys::rename_at(
            tmp.fd(),
            OsStr::new(&name),
            root.fd(),
            OsStr::new(".config"),
            false,
        )
    })();
    if let Err(e) = written {
        let _ = tmp.remove(&name);
        return Err(io_err(&root.show(".config"), e));
    }
    Ok(())
}
