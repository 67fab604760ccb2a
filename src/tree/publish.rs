//! Publishing an import: the one path every import takes (a file written into the mount,
//! a staging file renamed into place, `pcocc image import`).
//!
//! The source is an untrusted file in any supported format. Through the mount it is
//! opened standalone (no backing file, no VMDK naming other files: [`NoBacking`] and the
//! readers' own checks), except a qcow2 overlay of a view of the mount, which is saved
//! as a layer above that revision (`super::save`). `pcocc image import`, the user's own
//! process, reads the backing chain of a qcow2 and the extents of a multi-file VMDK as
//! the user can ([`CallerFiles`]) and flattens them, as pcocc (`qemu-img convert`) does.
//! Either way the source is converted into one standalone qcow2 layer under `.tmp/` (the
//! layer is then clean, deterministic for its content and deduplicated whatever the
//! source format was) — except a file written into the mount that is already a clean
//! standalone qcow2, which is its own layer ([`publish_as_is`]) — added to `data/`
//! (synced, 0444, renamed or linked, deduplicated) and finally described by
//! metadata created exclusively, so that two writers of one name give one winner. The
//! name is checked before any data is converted, and nothing but an unreferenced layer
//! (which gc removes, and which may already be shared by a concurrent import) can remain
//! after a failure.

use std::fs::File;
use std::path::Path;

use super::ops::now_timestamp;
use super::{Error, Format};
use crate::image::chain::{CallerFiles, NoBacking, open_chain_file, open_image_chain};
use crate::image::qcow2_layout::CLUSTER_SIZE;
use crate::image::{self, Disk, Layer, convert, detect};
use crate::store::{self, Meta, Store};

/// Attempts at taking the next revision number when other writers take it first.
pub(super) const REVISION_ATTEMPTS: u32 = 16;
/// The kind pcocc records for VM images.
pub(super) const KIND_VM: &str = super::VM_KIND;

/// Where an import lands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A new image: `name@0`, which must not exist.
    NewImage(String),
    /// The next revision of an image (`latest + 1`, or 0 for an empty image directory).
    NextRevision(String),
}

impl Target {
    pub fn image(&self) -> &str {
        match self {
            Target::NewImage(n) | Target::NextRevision(n) => n,
        }
    }
}

/// A known format suffix of a file name, dropped, and the format it names as a hint:
/// `x.qcow2` → (`x`, qcow2); `x.img` → (`x.img`, none).
pub fn split_suffix(name: &str) -> (&str, Option<Format>) {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => match Format::from_name(ext) {
            Some(f) => (stem, Some(f)),
            None => (name, None),
        },
        _ => (name, None),
    }
}

/// The format to read `file` as: `forced` if given (unless the content contradicts it),
/// else the content's, else the `hint` (a name's suffix), else raw.
pub fn choose_format(
    forced: Option<Format>,
    hint: Option<Format>,
    path: &Path,
    file: &File,
) -> Result<Format, Error> {
    if forced.is_some() {
        return detect::resolve_format(forced, path, file).map_err(|e| match e {
            image::Error::FormatMismatch {
                forced, detected, ..
            } => Error::FormatMismatch { forced, detected },
            e => source_error(e.into()),
        });
    }
    Ok(detect::detect_file(file, path)
        .map_err(|e| source_error(e.into()))?
        .or(hint)
        .unwrap_or(Format::Raw))
}

/// Opens `file` (known as `path`) as a standalone `format` image: backing files and
/// external files are refused, headers and tables are checked by the reader. The reader
/// gets a duplicate of the descriptor, never a reopen by name.
pub fn open_standalone(file: &File, path: &Path, format: Format) -> Result<Disk, Error> {
    open_source(file, path, format, Reader::Standalone).map_err(source_error)
}

/// Which other files reading a source may open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// None: the source must be one standalone file (imports through the mount).
    Standalone,
    /// The backing chain (qcow2 and QED backing files, VMDK parent disks) and the VMDK
    /// extent files the source names, opened with the rights of this process, which acts
    /// for its own user (`pcocc image import`).
    CallerFiles,
}

/// An error met reading an import's source: the content's fault ([`Error::BadImage`],
/// EINVAL) when it is no valid image of the format read (data its tables place past the
/// end of the file included: a truncated image), unless the file itself could not be
/// read.
pub(super) fn source_error(e: Error) -> Error {
    match e {
        Error::Image(
            e @ (image::Error::Invalid { .. }
            | image::Error::Unsupported { .. }
            | image::Error::NotAFormat { .. }
            | image::Error::OutOfRange { .. }),
        ) => Error::BadImage(e),
        Error::Image(e @ image::Error::Io { .. }) if past_the_end(&e) => Error::BadImage(e),
        e => e,
    }
}

/// Whether `e` says the data read lies past the end of its file.
fn past_the_end(e: &image::Error) -> bool {
    matches!(e, image::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof)
}

fn open_source(file: &File, path: &Path, format: Format, reader: Reader) -> Result<Disk, Error> {
    let file = file.try_clone().map_err(|e| image::Error::io(path, e))?;
    match reader {
        // Backing files, a VMDK's extent files and parent disk, read as qemu-img does.
        Reader::CallerFiles => Ok(open_image_chain(file, path, format, &CallerFiles)?),
        Reader::Standalone => open_one(file, path, format),
    }
}

/// A source of a format that names no other file (a VMDK: a single-file one).
fn open_one(file: File, path: &Path, format: Format) -> Result<Disk, Error> {
    let layer: std::sync::Arc<dyn Layer> = match format {
        Format::Qcow2 => return Ok(open_chain_file(file, path, &NoBacking)?),
        Format::Raw => std::sync::Arc::new(image::raw::RawLayer::new(file, path)?),
        Format::Qed => std::sync::Arc::new(image::qed::open(file, path)?),
        Format::Vdi => std::sync::Arc::new(image::vdi::open(file, path)?),
        Format::Vpc => std::sync::Arc::new(image::vpc::open(file, path)?),
        Format::Vmdk => std::sync::Arc::new(image::vmdk::open(file, path)?),
    };
    Ok(Disk::new(vec![layer]))
}

/// Fails when `target` cannot be published in `store` (a new image whose name is taken,
/// an invalid name), before any data is converted.
pub fn check_target(store: &Store, target: &Target) -> Result<(), Error> {
    super::validate_new_name(target.image())?;
    if let Target::NewImage(name) = target
        && !store.revisions(name)?.is_empty()
    {
        return Err(Error::ImageExists {
            name: name.clone(),
            repo: store.name().to_string(),
        });
    }
    Ok(())
}

/// What an import publishes.
pub struct Source<'a> {
    /// The file, open.
    pub file: &'a File,
    /// Its path, for messages.
    pub path: &'a Path,
    /// The format to read it as.
    pub format: Format,
    /// Set when the file is the daemon's own scratch copy of what a writer sent.
    pub scratch: Option<Scratch>,
    /// Which other files reading it may open.
    pub reader: Reader,
}

/// What is known of a scratch copy, and what may be done to it.
#[derive(Clone, Debug, Default)]
pub struct Scratch {
    /// Its non-zero 64 KiB clusters, seen while its bytes arrived (used where clusters
    /// of the file are clusters of the disk: raw, fixed VHD).
    pub nonzero: Option<Vec<(u64, u64)>>,
    /// Its bytes may be dropped as soon as they are converted: nothing needs the file
    /// after this publish, successful or not.
    pub consume: bool,
}

/// Bytes of a consumed raw scratch file dropped at a time: few calls, and little left of
/// it in the page cache (where it would be written back to the disk for nothing).
const CONSUME_STEP: u64 = 32 << 20;

/// Publishes `source` into `store` as `target`, owned by `owner`: convert to a
/// standalone qcow2 layer, add it, write the metadata exclusively. Returns the new
/// revision's metadata.
pub fn publish(
    store: &Store,
    siblings: &[std::sync::Arc<Store>],
    owner: &str,
    source: Source,
    target: &Target,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Meta, Error> {
    check_target(store, target)?;
    let started = std::time::Instant::now();
    let disk = open_source(source.file, source.path, source.format, source.reader)
        .map_err(source_error)?;
    let out = store.tmp_file()?;
    // A disk whose bytes are the file's own (raw, fixed VHD): the file's clusters seen
    // arriving are the disk's, read front to back, and what was converted can go.
    let flat = disk.layers().len() == 1 && disk.top().guest_at_file_offsets();
    let flat_scratch = source.scratch.filter(|_| flat);
    let mut opts = convert::Options::new(progress);
    let mut dropper = match flat_scratch {
        Some(s) => {
            let file_len = source
                .file
                .metadata()
                .map_err(|e| Error::from(image::Error::io(source.path, e)))?
                .len();
            opts.nonzero = s
                .nonzero
                .map(|runs| guest_clusters(&disk, file_len, runs))
                .transpose()
                .map_err(|e| source_error(e.into()))?;
            s.consume
                .then(|| Dropper::new(source.file, source.path))
                .transpose()?
        }
        None => None,
    };
    let mut drop_hook = dropper.as_mut().map(|d| move |upto| d.drop_below(upto));
    if let Some(hook) = drop_hook.as_mut() {
        opts.consumed = Some(hook);
    }
    // What fails here is the source (invalid tables found while reading it) or the
    // repository's filesystem (full, over quota), whose errno passes through.
    let converted = convert::convert(&disk, out.file(), out.path(), opts)
        .map_err(|e| source_error(e.into()))?;
    log::debug!(
        "{}: converted in {:.2?}",
        source.path.display(),
        started.elapsed()
    );
    store_converted(store, siblings, owner, out, &converted.sha256, target)
}

/// The runs of non-zero clusters of a file of `file_len` bytes whose first bytes are
/// `disk` (see [`Scratch::nonzero`]), as runs of the disk's clusters: none past its end,
/// and a last cluster that the file goes on past (a fixed VHD's footer follows the
/// guest's bytes inside it) kept only if its guest bytes hold a non-zero one.
fn guest_clusters(
    disk: &Disk,
    file_len: u64,
    mut runs: Vec<(u64, u64)>,
) -> image::Result<Vec<(u64, u64)>> {
    let size = disk.virtual_size();
    let clusters = size.div_ceil(CLUSTER_SIZE);
    runs.retain_mut(|(first, count)| {
        *count = (*first + *count).min(clusters).saturating_sub(*first);
        *count > 0
    });
    let tail = clusters.saturating_sub(1) * CLUSTER_SIZE;
    if let Some((first, count)) = runs.last_mut()
        && file_len > size
        && !size.is_multiple_of(CLUSTER_SIZE)
        && *first + *count == clusters
    {
        let mut buf = vec![0u8; (size - tail) as usize];
        disk.read_at(&mut buf, tail)?;
        if convert::is_zero(&buf) {
            *count -= 1;
            if *count == 0 {
                runs.pop();
            }
        }
    }
    Ok(runs)
}

/// Stores `out`, a standalone qcow2 layer of hash `sha256` (converted from an import),
/// as the one layer of `target`.
pub(super) fn store_converted(
    store: &Store,
    siblings: &[std::sync::Arc<Store>],
    owner: &str,
    out: store::TmpFile,
    sha256: &str,
    target: &Target,
) -> Result<Meta, Error> {
    check_target(store, target)?;
    // The scratch file becomes the layer, synced (or is removed as a duplicate).
    store_one_layer(store, siblings, owner, sha256, target, || {
        store.add_layer(out, Some(sha256)).map(drop)
    })
}

/// Makes layer `hash` present in `store` and describes it as the one layer of `target`.
/// Another repository may hold the very same layer (a view copied between repositories
/// with `cp`): it is shared by a hard link rather than kept twice; else `place` puts it
/// there.
fn store_one_layer(
    store: &Store,
    siblings: &[std::sync::Arc<Store>],
    owner: &str,
    hash: &str,
    target: &Target,
    place: impl FnOnce() -> Result<(), store::Error>,
) -> Result<Meta, Error> {
    let shared = siblings
        .iter()
        .filter(|s| s.name() != store.name())
        .find_map(|s| store.link_layer_from(s, hash).ok().flatten());
    if shared.is_none() {
        place()?;
    }
    let custom_meta = serde_json::Value::Object(serde_json::Map::new());
    write_meta(store, owner, vec![hash.to_string()], custom_meta, target)
}

/// Publishes a scratch file that is already a clean standalone qcow2
/// ([`crate::image::qcow2::keep`]) as it is: its bytes are the layer, named by `hash`
/// when it was computed while they arrived (else hashed here), and the scratch file is
/// linked into `data/` (it keeps its own name until its owner drops it). The caller
/// checked that the file may be kept.
pub(super) fn publish_as_is(
    store: &Store,
    siblings: &[std::sync::Arc<Store>],
    owner: &str,
    tmp: &store::TmpFile,
    hash: Option<String>,
    target: &Target,
) -> Result<Meta, Error> {
    check_target(store, target)?;
    let started = std::time::Instant::now();
    let hash = match hash {
        Some(h) => h,
        None => store::sha256_of(tmp.file(), tmp.path())?,
    };
    let meta = store_one_layer(store, siblings, owner, &hash, target, || {
        store.link_layer(tmp, &hash)
    })?;
    log::debug!(
        "{}: kept as it is ({hash}), stored in {:.2?}",
        tmp.path().display(),
        started.elapsed()
    );
    Ok(meta)
}

/// Drops the converted part of a raw scratch file by punching it out: its dirty pages
/// then leave the page cache without being written to the disk.
struct Dropper {
    file: File,
    path: std::path::PathBuf,
    /// Everything below was dropped.
    dropped: u64,
}

impl Dropper {
    /// Drops parts of `file` (known as `path`), through a duplicate of its descriptor.
    fn new(file: &File, path: &Path) -> Result<Dropper, Error> {
        let file = file.try_clone().map_err(|e| image::Error::io(path, e))?;
        Ok(Dropper {
            file,
            path: path.to_path_buf(),
            dropped: 0,
        })
    }

    fn drop_below(&mut self, upto: u64) -> image::Result<()> {
        if upto < self.dropped.saturating_add(CONSUME_STEP) {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (
            libc::off_t::try_from(self.dropped),
            libc::off_t::try_from(upto - self.dropped),
        ) else {
            return Ok(());
        };
        use std::os::unix::io::AsFd;
        if let Err(e) = crate::sys::punch_hole(self.file.as_fd(), off, len) {
            match e.raw_os_error() {
                // A filesystem without hole punching keeps the bytes: only slower.
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    self.dropped = u64::MAX;
                    return Ok(());
                }
                _ => return Err(image::Error::io(&self.path, e)),
            }
        }
        self.dropped = upto;
        Ok(())
    }
}

/// Creates the metadata of the new revision, made of `data_blobs` (base first) with
/// `custom_meta`: `name@0`, or `latest + 1` retried while other writers take the number
/// first.
pub(super) fn write_meta(
    store: &Store,
    owner: &str,
    data_blobs: Vec<String>,
    custom_meta: serde_json::Value,
    target: &Target,
) -> Result<Meta, Error> {
    let name = target.image().to_string();
    let mut attempts = 0;
    loop {
        let revision = match target {
            Target::NewImage(_) => 0,
            Target::NextRevision(n) => store.revisions(n)?.last().map_or(0, |r| r + 1),
        };
        let meta = Meta {
            name: name.clone(),
            revision,
            kind: KIND_VM.to_string(),
            owner: owner.to_string(),
            timestamp: now_timestamp(),
            data_blobs: data_blobs.clone(),
            custom_meta: custom_meta.clone(),
        };
        match store.put_meta(&meta) {
            Ok(()) => return Ok(meta),
            Err(store::Error::AlreadyExists { .. }) => match target {
                Target::NewImage(_) => {
                    return Err(Error::ImageExists {
                        name,
                        repo: store.name().to_string(),
                    });
                }
                Target::NextRevision(_) if attempts + 1 < REVISION_ATTEMPTS => attempts += 1,
                Target::NextRevision(_) => {
                    return Err(Error::RevisionExists {
                        name,
                        rev: revision,
                        repo: store.name().to_string(),
                    });
                }
            },
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{have_qemu, qemu_create, qemu_io};

    /// A fixed VHD of 1000 KiB: its last 64 KiB cluster holds 40 KiB of the guest, then
    /// the footer, which a stream of its bytes sees as non-zero.
    #[test]
    fn the_clusters_of_a_fixed_vhd_are_the_guests_without_its_footer() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = qemu_create(
            dir.path(),
            "vpc",
            "f.vpc",
            "1000K",
            "subformat=fixed,force_size=on",
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1000 * 1024 + 512);
        let open = || open_standalone(&File::open(&p).unwrap(), &p, Format::Vpc).unwrap();
        let disk = open();
        assert!(disk.top().guest_at_file_offsets());
        // Data in cluster 0; the footer in cluster 15; a run past the end.
        let seen = vec![(0, 1), (15, 1), (16, 2)];
        let len = 1000 * 1024 + 512;
        assert_eq!(
            guest_clusters(&disk, len, seen.clone()).unwrap(),
            vec![(0, 1)]
        );
        // Guest data in the last cluster keeps it.
        qemu_io("vpc", &p, &["write -P 9 960k 4k"]);
        assert_eq!(
            guest_clusters(&open(), len, seen).unwrap(),
            vec![(0, 1), (15, 1)]
        );
        // A dynamic VHD's bytes are not the guest's.
        let d = qemu_create(dir.path(), "vpc", "d.vpc", "1M", "");
        let dynamic = open_standalone(&File::open(&d).unwrap(), &d, Format::Vpc).unwrap();
        assert!(!dynamic.top().guest_at_file_offsets());
    }
}
