//! Backing chains: an image and the backing files it names (a qcow2 or QED backing
//! file, a VMDK parent disk), opened as one [`Disk`].
//!
//! A backing file name inside an image is untrusted: it could name `/etc/shadow`, a
//! device, or a file of another repository. So the caller passes a [`BackingPolicy`]
//! that opens each name it allows, or refuses it: imports use [`NoBacking`] (a
//! standalone image is required), repository layers use [`BeneathDir`] (names resolve
//! relative to the layer's directory, must stay inside the repository's `data/`, and are
//! opened from its descriptor without following any symlink). The chain is at most
//! [`MAX_CHAIN_DEPTH`] layers deep and a file met twice (compared by device and inode)
//! is a loop, reported as such.

use super::qcow2::{BackingRef, Qcow2Layer};
use super::raw::RawLayer;
use super::{Disk, Error, Format, Layer, MAX_CHAIN_DEPTH, Result};
use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Decides which backing files may be opened, and opens them.
pub trait BackingPolicy: Send + Sync {
    /// Opens the backing file `backing` named by the `format` layer at `layer_path`: the
    /// path it is known by and the open file; an error if the name is not allowed.
    fn open(
        &self,
        layer_path: &Path,
        format: Format,
        backing: &BackingRef,
    ) -> Result<(PathBuf, File)>;

    /// Whether a backing file may be of a format other than qcow2 and raw (read as a
    /// standalone image of that format, the bottom of the chain).
    fn any_format(&self) -> bool {
        false
    }

    /// How the extent files a VMDK descriptor names are opened; `None` refuses
    /// descriptor files.
    fn extent_files(&self) -> Option<&dyn super::vmdk_extents::ExtentFiles> {
        None
    }

    /// Opens the external data file `name` of the qcow2 image at `layer_path`, or
    /// refuses it.
    fn open_data_file(&self, layer_path: &Path, name: &str) -> Result<(PathBuf, File)> {
        Err(super::qcow2::data_file_refused(layer_path, name))
    }
}

/// Allows no backing file at all (imports through the mount, which cannot read the
/// writer's files with the writer's rights, must be standalone images).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBacking;

impl BackingPolicy for NoBacking {
    fn open(
        &self,
        layer_path: &Path,
        format: Format,
        backing: &BackingRef,
    ) -> Result<(PathBuf, File)> {
        Err(Error::Unsupported {
            path: layer_path.to_path_buf(),
            format,
            reason: format!(
                "it has a backing file {:?}, which an import through the mount cannot read \
                 with the writer's rights; a standalone image is required (flatten it with \
                 `qemu-img convert`, or import it with `pcocc image import`, which reads \
                 backing files)",
                backing.name
            ),
        })
    }
}

/// Opens backing files and VMDK extent files as the running process can, as qemu-img
/// does for pcocc: names relative to the naming file's directory, absolute names as they
/// are. Only for a process acting for its own user (`pcocc image import`): the files
/// are the user's, read with the user's rights. Names must be regular files (not a
/// device or a FIFO); `json:` pseudo-names and protocols are refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallerFiles;

impl CallerFiles {
    /// Opens `name` as named by the file at `from`.
    pub fn open_named(&self, from: &Path, name: &str, format: Format) -> Result<(PathBuf, File)> {
        let refuse = |why: &str| Error::Unsupported {
            path: from.to_path_buf(),
            format,
            reason: format!("{name:?} {why}"),
        };
        if name.is_empty() {
            return Err(refuse("is an empty file name"));
        }
        if name.starts_with("json:") || name.contains("://") {
            return Err(refuse(
                "is not a file name (a json: specification or a protocol)",
            ));
        }
        let path = from.parent().unwrap_or(Path::new(".")).join(name);
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if !file.metadata().map_err(|e| Error::io(&path, e))?.is_file() {
            return Err(refuse("is not a regular file"));
        }
        Ok((path, file))
    }
}

impl BackingPolicy for CallerFiles {
    fn open(
        &self,
        layer_path: &Path,
        format: Format,
        backing: &BackingRef,
    ) -> Result<(PathBuf, File)> {
        self.open_named(layer_path, &backing.name, format)
    }

    /// qemu-img follows a backing file of any format it reads.
    fn any_format(&self) -> bool {
        true
    }

    fn extent_files(&self) -> Option<&dyn super::vmdk_extents::ExtentFiles> {
        Some(self)
    }

    fn open_data_file(&self, layer_path: &Path, name: &str) -> Result<(PathBuf, File)> {
        self.open_named(layer_path, name, Format::Qcow2)
    }
}

impl super::vmdk_extents::ExtentFiles for CallerFiles {
    fn open(&self, descriptor: &Path, name: &str) -> Result<(PathBuf, File)> {
        self.open_named(descriptor, name, Format::Vmdk)
    }
}

/// Allows relative backing names that, resolved against the naming layer's directory,
/// land inside `root` (for a repository: its `data/` directory), opened without
/// following any symlink. `root` is opened by its path at each use; see [`BeneathDir`]
/// for a directory already held open.
#[derive(Clone, Debug)]
pub struct WithinDir {
    pub root: PathBuf,
}

impl BackingPolicy for WithinDir {
    fn open(
        &self,
        layer_path: &Path,
        format: Format,
        backing: &BackingRef,
    ) -> Result<(PathBuf, File)> {
        let dir = crate::sys::open_dir_path(&self.root).map_err(|e| Error::io(&self.root, e))?;
        BeneathDir {
            dir,
            root: self.root.clone(),
        }
        .open(layer_path, format, backing)
    }
}

/// [`WithinDir`] for a directory held open as `dir` (known as `root`): backing files are
/// reached from that descriptor, whatever happens to the path meanwhile.
#[derive(Debug)]
pub struct BeneathDir {
    pub dir: OwnedFd,
    pub root: PathBuf,
}

impl BackingPolicy for BeneathDir {
    fn open(
        &self,
        layer_path: &Path,
        format: Format,
        backing: &BackingRef,
    ) -> Result<(PathBuf, File)> {
        let refuse = |why: &str| Error::Unsupported {
            path: layer_path.to_path_buf(),
            format,
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
        // Symlinks are refused when opening, so the name resolves lexically.
        let Some(rel) = normalize(&dir.join(name))
            .strip_prefix(normalize(&self.root))
            .ok()
            .map(Path::to_path_buf)
        else {
            return Err(refuse("resolves outside the allowed directory"));
        };
        let path = self.root.join(&rel);
        let fd =
            crate::sys::open_beneath(self.dir.as_fd(), &rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => refuse("is or passes through a symbolic link"),
                    Some(libc::EXDEV) => refuse("resolves outside the allowed directory"),
                    _ => Error::io(&path, e),
                })?;
        let file = File::from(fd);
        if !file.metadata().map_err(|e| Error::io(&path, e))?.is_file() {
            return Err(refuse("is not a regular file"));
        }
        Ok((path, file))
    }
}

/// `path` with `.` and `..` resolved lexically (`..` above the start is kept out).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Opens the qcow2 image at `path` and every backing file it names (as `policy`
/// allows), top layer first.
pub fn open_chain(path: &Path, policy: &dyn BackingPolicy) -> Result<Disk> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    open_chain_file(file, path, policy)
}

/// [`open_chain`] for a top layer already open as `file` (known as `path`).
pub fn open_chain_file(file: File, path: &Path, policy: &dyn BackingPolicy) -> Result<Disk> {
    open_image_chain(file, path, Format::Qcow2, policy)
}

/// Opens the `format` image `file` (known as `path`) and every backing file its layers
/// name (a qcow2 or QED backing file, a VMDK parent disk), as `policy` allows, top
/// layer first.
pub fn open_image_chain(
    file: File,
    path: &Path,
    format: Format,
    policy: &dyn BackingPolicy,
) -> Result<Disk> {
    let identity = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| Error::io(p, e))
    };
    let mut seen = HashSet::new();
    seen.insert(identity(&file, path)?);
    // The layers above `lowest`, top first.
    let mut layers: Vec<Arc<dyn Layer>> = Vec::new();
    let mut lowest = open_layer(file, path, format, policy)?;
    while let Some(backing) = lowest.backing().cloned() {
        let below = &lowest;
        let from = below.path().to_path_buf();
        if layers.len() + 1 >= MAX_CHAIN_DEPTH {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                format,
                reason: format!("its backing chain is deeper than {MAX_CHAIN_DEPTH} layers"),
            });
        }
        let (resolved, file) = policy.open(&from, below.format(), &backing)?;
        if !seen.insert(identity(&file, &resolved)?) {
            return Err(Error::Invalid {
                path: from,
                format: below.format(),
                reason: format!(
                    "backing chain loops: {} is already part of the chain",
                    resolved.display()
                ),
            });
        }
        let backing_format = backing_format(&from, below.format(), &backing, &file, &resolved)?;
        if !matches!(backing_format, Format::Qcow2 | Format::Raw) && !policy.any_format() {
            return Err(Error::Unsupported {
                path: from,
                format: below.format(),
                reason: format!(
                    "backing file {:?} is a {backing_format} image; only qcow2 and raw backing files are followed",
                    backing.name
                ),
            });
        }
        let layer = open_layer(file, &resolved, backing_format, policy)?;
        if let Some(want) = backing.content_id
            && layer.content_id() != Some(want)
        {
            // qemu refuses to read such an overlay (its parent changed since).
            return Err(Error::Invalid {
                path: from,
                format: below.format(),
                reason: format!(
                    "its parent disk {} has content ID {}, not the parentCID {want:08x} it \
                     records: the parent changed after this disk was made from it",
                    resolved.display(),
                    layer
                        .content_id()
                        .map_or("(none)".to_string(), |c| format!("{c:08x}"))
                ),
            });
        }
        layers.push(std::mem::replace(&mut lowest, layer));
    }
    layers.push(lowest);
    Ok(Disk::new(layers))
}

/// Opens one layer of a chain: any backing file it names is followed by the caller.
fn open_layer(
    file: File,
    path: &Path,
    format: Format,
    policy: &dyn BackingPolicy,
) -> Result<Arc<dyn Layer>> {
    if format == Format::Vmdk
        && let Some(files) = policy.extent_files()
        && super::vmdk_extents::file_is_descriptor(&file, path)?
    {
        return Ok(Arc::new(super::vmdk_extents::open(&file, path, files)?));
    }
    Ok(match format {
        Format::Qcow2 => Arc::new(Qcow2Layer::with_data_file(file, path, &|name| {
            policy.open_data_file(path, name)
        })?),
        Format::Raw => Arc::new(RawLayer::new(file, path)?),
        Format::Qed => Arc::new(super::qed::open_overlay(file, path)?),
        Format::Vdi => Arc::new(super::vdi::open(file, path)?),
        Format::Vpc => Arc::new(super::vpc::open(file, path)?),
        Format::Vmdk => Arc::new(super::vmdk::open_overlay(file, path)?),
    })
}

/// The format of a backing file: its header extension if present, else its content.
fn backing_format(
    from: &Path,
    from_format: Format,
    backing: &BackingRef,
    file: &File,
    resolved: &Path,
) -> Result<Format> {
    match &backing.format {
        Some(name) => Format::from_name(name).ok_or_else(|| Error::Unsupported {
            path: from.to_path_buf(),
            format: from_format,
            reason: format!("backing format {name:?} of {:?} is unknown", backing.name),
        }),
        None => Ok(super::detect::detect_file(file, resolved)?.unwrap_or(Format::Raw)),
    }
}
