//! Saving a VM's overlay by `cp`: a qcow2 file written into the mount whose backing file
//! is a view of a revision of this same mount (`MOUNT/REPO/IMAGE/@N/disk.FMT`, or
//! through `latest`) is published as that revision's layers plus one delta layer holding
//! only what the overlay changes (see [`crate::image::qcow2_delta`]).
//!
//! A backing file name of the mount is never opened: it is read as a path (an absolute
//! path under the mountpoint, exactly `REPO/IMAGE/@N|latest/disk.FMT` below it), and
//! the revision it names is reached the way the tree reaches any revision, as the
//! writer (whose rights the kernel and [`access::check`] judge). An overlay may sit on
//! other overlays of the writer's own (absolute paths outside the mount, qcow2 files,
//! opened with the writer's rights, at most [`MAX_LOCAL_OVERLAYS`]) whose chain ends on
//! such a view: the chain is flattened down to that revision. Any other backing file
//! (relative, in the mount but not a view, a chain ending elsewhere) is refused, EINVAL.
//! Into another repository, the revision's layers are linked or copied first, as `ln`
//! does.

use std::fs::File;
use std::path::{Component, Path};
use std::sync::Arc;

use super::access::{self, R, W, X};
use super::layers::backing_name;
use super::nodes::{LATEST, parse_revision_dir_name};
use super::publish::{self, KIND_VM, Target};
use super::views::OpenedRevision;
use super::{Caller, Error, FileKind, Format};
use crate::image::qcow2::Qcow2Layer;
use crate::image::{self, Disk, Layer, qcow2_delta};
use crate::store::{self, Meta, Store};

/// A view of a revision named by a backing file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ViewPath {
    pub repo: String,
    pub image: String,
    /// `None`: through `latest`.
    pub rev: Option<u64>,
    pub format: Format,
}

/// The view `name` names if it is an absolute path of the mount at `mountpoint`:
/// `MOUNTPOINT/REPO/IMAGE/@N/disk.FMT` or `MOUNTPOINT/REPO/IMAGE/latest/disk.FMT`.
pub(super) fn parse_view_path(mountpoint: &Path, name: &str) -> Option<ViewPath> {
    let path = Path::new(name);
    if !path.is_absolute() || !mountpoint.is_absolute() {
        return None;
    }
    // `.` and `..` as qemu's open resolves them: inside the mount no symlink but
    // `latest` (to a sibling revision directory) leads elsewhere.
    let mut normal: Vec<&std::ffi::OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            Component::Normal(s) => normal.push(s),
            Component::Prefix(_) => return None,
        }
    }
    let normal: std::path::PathBuf = std::iter::once(std::ffi::OsStr::new("/"))
        .chain(normal)
        .collect();
    let rest = normal.strip_prefix(mountpoint).ok()?;
    let parts: Vec<&str> = rest
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let [repo, image, dir, file] = parts[..] else {
        return None;
    };
    if !store::is_valid_name(image) {
        return None;
    }
    let rev = match dir {
        LATEST => None,
        d => Some(parse_revision_dir_name(d)?),
    };
    let FileKind::View(format) = FileKind::from_file_name(file)? else {
        return None;
    };
    Some(ViewPath {
        repo: repo.to_string(),
        image: image.to_string(),
        rev,
        format,
    })
}

/// Most overlays of the writer's own files followed below the one written into the
/// mount before the chain must reach a view.
pub(super) const MAX_LOCAL_OVERLAYS: usize = 8;

/// Where an image on any other chain of backing files goes.
const IMPORT_HINT: &str = "`pcocc image import` reads any chain of backing files and \
                           stores the image flattened";

/// The error of an overlay that cannot be saved: the content's fault, EINVAL.
fn refuse(path: &Path, reason: String) -> Error {
    Error::BadImage(image::Error::Unsupported {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        reason,
    })
}

/// The qcow2 layer of `file` (known as `path`) if it names a backing file; the backing
/// file is not opened.
pub(super) fn backed_layer(file: &File, path: &Path) -> Result<Option<Qcow2Layer>, Error> {
    let file = file.try_clone().map_err(|e| image::Error::io(path, e))?;
    let layer = Qcow2Layer::new(file, path).map_err(|e| publish::source_error(e.into()))?;
    Ok(layer.backing().is_some().then_some(layer))
}

/// The view `layer`'s backing file names, checked against what the layer says of its
/// format; refused unless it is a view of the mount at `mountpoint`.
pub(super) fn backing_view(
    layer: &Qcow2Layer,
    path: &Path,
    mountpoint: Option<&Path>,
) -> Result<ViewPath, Error> {
    let backing = layer
        .backing()
        .ok_or_else(|| refuse(path, "it names no backing file".into()))?;
    let view = mountpoint
        .and_then(|m| parse_view_path(m, &backing.name))
        .ok_or_else(|| {
            refuse(
                path,
                format!(
                    "backing file {:?} is not a view of this mount: only overlays of a \
                     revision in this mount can be saved by cp ({IMPORT_HINT})",
                    backing.name
                ),
            )
        })?;
    if let Some(named) = &backing.format
        && Format::from_name(named) != Some(view.format)
    {
        return Err(refuse(
            path,
            format!(
                "backing file {:?} is a {} view but the overlay reads it as {named:?}",
                backing.name, view.format
            ),
        ));
    }
    Ok(view)
}

/// The overlays from `overlay` (the file written into the mount, known as `path`) down
/// to the view of the mount at `mountpoint` its chain ends on, top first: each backing
/// file that is not a view must be an absolute path outside the mount, a regular qcow2
/// file the writer can read (the calling thread acts as the writer), itself naming a
/// backing file.
fn chain_to_view(
    overlay: Qcow2Layer,
    path: &Path,
    mountpoint: Option<&Path>,
) -> Result<(Vec<Qcow2Layer>, ViewPath), Error> {
    let mut chain = vec![overlay];
    loop {
        let last = chain.last().expect("the chain starts with the overlay");
        let not_a_view = match backing_view(last, path, mountpoint) {
            Ok(view) => return Ok((chain, view)),
            Err(e) => e,
        };
        let Some(backing) = last.backing() else {
            return Err(not_a_view);
        };
        let local = Path::new(&backing.name).to_path_buf();
        let in_mount = mountpoint.is_some_and(|m| local.starts_with(m));
        let qcow2 = backing
            .format
            .as_deref()
            .is_none_or(|f| Format::from_name(f) == Some(Format::Qcow2));
        if !local.is_absolute() || in_mount || !qcow2 || chain.len() > MAX_LOCAL_OVERLAYS {
            return Err(not_a_view);
        }
        let file = open_local(&local).map_err(|e| {
            refuse(
                path,
                format!("backing file {:?} cannot be read: {e}", backing.name),
            )
        })?;
        let layer = backed_layer(&file, &local)?.ok_or_else(|| {
            refuse(
                path,
                format!(
                    "its chain of backing files ends at {:?}, not at a view of this mount: \
                     only overlays of a revision in this mount can be saved by cp \
                     ({IMPORT_HINT})",
                    backing.name
                ),
            )
        })?;
        chain.push(layer);
    }
}

/// Opens the writer's own overlay `path` for reading: without blocking on a FIFO, and
/// only a regular file.
fn open_local(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Publishes the overlay `file` (known as `path`, a qcow2 file whose backing file is a
/// view of the mount at `mountpoint`) into `store` as `target`, owned by `owner`: the
/// backing revision's layers (linked or copied into `store` when it is another
/// repository) plus a delta layer of what the overlay changes. `repos` are the tree's
/// repositories; the revision is reached as `caller`, whose identity the calling thread
/// has taken. Returns the new revision's metadata.
#[allow(clippy::too_many_arguments)]
pub(super) fn publish_overlay(
    store: &Store,
    repos: &[Arc<Store>],
    mountpoint: Option<&Path>,
    caller: &Caller,
    owner: &str,
    file: &File,
    path: &Path,
    target: &Target,
) -> Result<Meta, Error> {
    publish::check_target(store, target)?;
    let overlay =
        backed_layer(file, path)?.ok_or_else(|| refuse(path, "it names no backing file".into()))?;
    let (overlays, view) = chain_to_view(overlay, path, mountpoint)?;
    let depth = overlays.len();
    let backing = overlays
        .last()
        .and_then(|o| o.backing())
        .map(|b| b.name.clone())
        .unwrap_or_default();
    let no_revision = || {
        refuse(
            path,
            format!("backing file {backing:?} names no revision of this mount"),
        )
    };
    let from: &Store = repos
        .iter()
        .find(|s| s.name() == view.repo)
        .ok_or_else(no_revision)?;
    access::check(caller, &from.meta_dir(), R | X)?;
    let rev = match view.rev {
        Some(rev) => rev,
        None => *from
            .revisions(&view.image)?
            .last()
            .ok_or_else(no_revision)?,
    };
    let base = from.read_meta(&view.image, rev)?.ok_or_else(no_revision)?;
    if base.kind != KIND_VM {
        return Err(refuse(
            path,
            format!(
                "backing file {backing:?} is a {} image, not a VM disk",
                base.kind
            ),
        ));
    }
    let hashes = base.layer_hashes().map_err(store::Error::BadHash)?;
    let top = *hashes.last().ok_or_else(no_revision)?;
    let opened = OpenedRevision::open(from, &hashes)?;
    let mut layers: Vec<Arc<dyn Layer>> = overlays
        .into_iter()
        .map(|o| Arc::new(o) as Arc<dyn Layer>)
        .collect();
    layers.extend(opened.disk().layers().iter().cloned());
    let disk = Disk::new(layers);

    if from.name() != store.name() {
        access::check(caller, &store.data_dir(), W | X)?;
        for h in &hashes {
            store.import_layer_from(from, h)?;
        }
    }
    let out = store.tmp_file()?;
    let stats = qcow2_delta::write_delta(&disk, depth, &backing_name(top), out.file(), out.path())
        .map_err(|e| publish::source_error(e.into()))?;
    out.file().sync_all().map_err(|source| store::Error::Io {
        path: out.path().to_path_buf(),
        source,
    })?;
    log::debug!(
        "{}: overlay of {}:{}@{rev}: {} clusters stored, {} zeroed",
        path.display(),
        from.name(),
        base.name,
        stats.data_clusters,
        stats.zero_clusters
    );
    let hash = store.add_layer(out, None)?;
    super::layers::add_revision_layer(store, owner, &base, &hash, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_paths() {
        let m = Path::new("/mnt/images");
        let view = |repo: &str, image: &str, rev, format| {
            Some(ViewPath {
                repo: repo.into(),
                image: image.into(),
                rev,
                format,
            })
        };
        let cases = [
            (
                "/mnt/images/user/centos/@0/disk.qcow2",
                view("user", "centos", Some(0), Format::Qcow2),
            ),
            (
                "/mnt/images/user/centos/@12/disk.raw",
                view("user", "centos", Some(12), Format::Raw),
            ),
            (
                "/mnt/images//global/a.b/latest/disk.vmdk",
                view("global", "a.b", None, Format::Vmdk),
            ),
            (
                "/mnt/images/./user/x/@1/disk.vpc",
                view("user", "x", Some(1), Format::Vpc),
            ),
            ("/mnt/images/user/x/@1/meta.json", None),
            ("/mnt/images/user/x/@01/disk.raw", None),
            // `..` as qemu resolves it (`latest` leads to a sibling directory).
            (
                "/mnt/images/user/x/@1/../@0/disk.raw",
                view("user", "x", Some(0), Format::Raw),
            ),
            (
                "/mnt/images/user/x/latest/../@2/disk.raw",
                view("user", "x", Some(2), Format::Raw),
            ),
            (
                "/mnt/other/../images/user/x/@0/disk.raw",
                view("user", "x", Some(0), Format::Raw),
            ),
            ("/mnt/images/user/../../images2/user/x/@0/disk.raw", None),
            ("/mnt/images/user/x/@1/disk.raw/..", None),
            ("/mnt/images/user/x/@1/disk.raw/y", None),
            ("/mnt/images/user/x/disk.raw", None),
            ("/mnt/images2/user/x/@1/disk.raw", None),
            ("/mnt/user/x/@1/disk.raw", None),
            ("user/x/@1/disk.raw", None),
            ("images/user/x/@1/disk.raw", None),
            ("/mnt/images/user/x y/@1/disk.raw", None),
        ];
        for (name, want) in cases {
            assert_eq!(parse_view_path(m, name), want, "{name}");
        }
        assert_eq!(
            parse_view_path(Path::new("mnt"), "mnt/u/x/@0/disk.raw"),
            None
        );
    }
}
