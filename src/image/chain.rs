//! Backing chains: a qcow2 image and the backing files it names, opened as one [`Disk`].
//!
//! A backing file name inside an image is untrusted: it could name `/etc/shadow`, a
//! device, or a file of another repository. So the caller passes a [`BackingPolicy`]
//! that turns each name into a path it allows, or refuses it: imports use
//! [`NoBacking`] (a standalone image is required), repository layers use [`WithinDir`]
//! (names resolve relative to the layer's directory and must stay inside the
//! repository's `data/`). The chain is at most [`MAX_CHAIN_DEPTH`] layers deep and a
//! file met twice (compared by canonical path) is a loop, reported as such.

use super::qcow2::{BackingRef, Qcow2Layer};
use super::raw::RawLayer;
use super::{Disk, Error, Format, Layer, MAX_CHAIN_DEPTH, Result};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Decides which backing files may be opened.
pub trait BackingPolicy: Send + Sync {
    /// The path to open for `backing`, named by the layer at `layer_path`; an error if
    /// the name is not allowed.
    fn resolve(&self, layer_path: &Path, backing: &BackingRef) -> Result<PathBuf>;
}

/// Allows no backing file at all (imports must be standalone images).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBacking;

impl BackingPolicy for NoBacking {
    fn resolve(&self, layer_path: &Path, backing: &BackingRef) -> Result<PathBuf> {
        Err(Error::Unsupported {
            path: layer_path.to_path_buf(),
            format: Format::Qcow2,
            reason: format!(
                "it has a backing file {:?}; a standalone image is required (flatten it with `qemu-img convert`)",
                backing.name
            ),
        })
    }
}

/// Allows relative backing names that, resolved against the naming layer's directory,
/// land inside `root` (for a repository: its `data/` directory).
#[derive(Clone, Debug)]
pub struct WithinDir {
    pub root: PathBuf,
}

impl BackingPolicy for WithinDir {
    fn resolve(&self, layer_path: &Path, backing: &BackingRef) -> Result<PathBuf> {
        let refuse = |why: &str| Error::Unsupported {
            path: layer_path.to_path_buf(),
            format: Format::Qcow2,
            reason: format!(
                "backing file {:?} {why}; only layers inside {} may be used",
                backing.name,
                self.root.display()
            ),
        };
        let name = Path::new(&backing.name);
        if name.is_absolute() || name.components().any(|c| matches!(c, Component::Prefix(_))) {
            return Err(refuse("is an absolute path"));
        }
        // qemu accepts protocol prefixes and json: pseudo-names; none are files here.
        if backing.name.starts_with("json:") {
            return Err(refuse("is a json: specification, not a file name"));
        }
        let dir = layer_path.parent().unwrap_or(Path::new("."));
        let joined = dir.join(name);
        let canonical = joined.canonicalize().map_err(|e| Error::io(&joined, e))?;
        let root = self
            .root
            .canonicalize()
            .map_err(|e| Error::io(&self.root, e))?;
        if !canonical.starts_with(&root) {
            return Err(refuse("resolves outside the allowed directory"));
        }
        if !canonical.is_file() {
            return Err(refuse("is not a regular file"));
        }
        Ok(canonical)
    }
}

/// Opens the qcow2 image at `path` and every backing file it names (as `policy`
/// allows), top layer first.
pub fn open_chain(path: &Path, policy: &dyn BackingPolicy) -> Result<Disk> {
    let top = Qcow2Layer::open(path)?;
    let mut seen = HashSet::new();
    seen.insert(path.canonicalize().map_err(|e| Error::io(path, e))?);
    let mut next = top.backing().cloned().map(|b| (path.to_path_buf(), b));
    let mut layers: Vec<Arc<dyn Layer>> = vec![Arc::new(top)];
    while let Some((from, backing)) = next.take() {
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                format: Format::Qcow2,
                reason: format!("its backing chain is deeper than {MAX_CHAIN_DEPTH} layers"),
            });
        }
        let resolved = policy.resolve(&from, &backing)?;
        let canonical = resolved
            .canonicalize()
            .map_err(|e| Error::io(&resolved, e))?;
        if !seen.insert(canonical.clone()) {
            return Err(Error::Invalid {
                path: from,
                format: Format::Qcow2,
                reason: format!(
                    "backing chain loops: {} is already part of the chain",
                    canonical.display()
                ),
            });
        }
        let format = backing_format(&from, &backing, &resolved)?;
        match format {
            Format::Qcow2 => {
                let layer = Qcow2Layer::open(&resolved)?;
                next = layer.backing().cloned().map(|b| (resolved.clone(), b));
                layers.push(Arc::new(layer));
            }
            Format::Raw => layers.push(Arc::new(RawLayer::open(&resolved)?)),
            other => {
                return Err(Error::Unsupported {
                    path: from,
                    format: Format::Qcow2,
                    reason: format!(
                        "backing file {:?} is a {other} image; only qcow2 and raw backing files are followed",
                        backing.name
                    ),
                });
            }
        }
    }
    Ok(Disk::new(layers))
}

/// The format of a backing file: its header extension if present, else its content.
fn backing_format(from: &Path, backing: &BackingRef, resolved: &Path) -> Result<Format> {
    match &backing.format {
        Some(name) => Format::from_name(name).ok_or_else(|| Error::Unsupported {
            path: from.to_path_buf(),
            format: Format::Qcow2,
            reason: format!("backing format {name:?} of {:?} is unknown", backing.name),
        }),
        None => {
            let file = std::fs::File::open(resolved).map_err(|e| Error::io(resolved, e))?;
            Ok(super::detect::detect_file(&file, resolved)?.unwrap_or(Format::Raw))
        }
    }
}
