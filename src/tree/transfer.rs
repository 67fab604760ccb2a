//! `pcocc image import` and `pcocc image export` through the tree, on the same paths as
//! the mount: an import is published by [`super::publish`] like a file written into the
//! mount, and an export copies a revision file opened like `disk.FMT` of the mount, data
//! extent by data extent, so holes stay holes.

use std::fs::{File, OpenOptions};
use std::path::Path;

use super::access;
use super::publish::{self, Target, choose_format};
use super::{Caller, Error, FileKind, Format, Node, Resolved, Tree, Uri};
use crate::image::convert::write_sparse;
use crate::image::detect;

/// Bytes copied per read/write during an export.
const EXPORT_CHUNK: usize = 1 << 20;

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Store(crate::store::Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Tree {
    /// pcocc image import: `src` (format forced, else detected from the content, then the
    /// suffix, then raw) becomes `dest.name@0` in `dest`'s repository (the default one
    /// when none is given; a revision in `dest` is ignored, as pcocc does). Errors as
    /// pcocc's: `Image N already exists in repo R`, format mismatches, and the reader's
    /// reason (naming the file) for what cannot be imported.
    pub fn import_file(
        &self,
        caller: &Caller,
        src: &Path,
        format: Option<Format>,
        dest: &Uri,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Resolved, Error> {
        let repo = self.shared_store(dest.repo.as_deref().unwrap_or(""))?;
        let store = self.writable_store(caller, repo.name())?;
        let target = Target::NewImage(dest.name.clone());
        publish::check_target(&store, &target)?;
        if !std::fs::metadata(src).is_ok_and(|m| m.is_file()) {
            return Err(Error::UndetectableFormat(src.to_path_buf()));
        }
        let file = File::open(src).map_err(|e| io_error(src, e))?;
        let format = choose_format(format, detect::format_from_suffix(src), src, &file)?;
        let owner = access::user_name(caller.uid);
        let meta = publish::publish(
            &store,
            &self.repos,
            &owner,
            publish::Source {
                file: &file,
                path: src,
                format,
                scratch: None,
                // The CLI is the user's own process: it reads what the source names.
                reader: publish::Reader::CallerFiles,
            },
            &target,
            progress,
        )?;
        self.pending.remove_empty_dir(store.name(), &meta.name);
        Ok(Resolved {
            repo: store.name().to_string(),
            meta,
        })
    }

    /// pcocc image export: the revision `src` resolves to, as `format`, into `dest`.
    /// Sparse (holes of the view stay holes of the file). An existing `dest` is
    /// overwritten only when it holds no image of another format (pcocc's rule).
    pub fn export_file(
        &self,
        caller: &Caller,
        src: &Uri,
        format: Format,
        dest: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Error> {
        let resolved = self.resolve(caller, src)?;
        let node = Node::File {
            repo: resolved.repo.clone(),
            image: resolved.meta.name.clone(),
            rev: resolved.meta.revision,
            file: FileKind::View(format),
        };
        // Only a file this export creates is removed when it fails: never something that
        // was there before (a device, a file of the user's).
        let existed = std::fs::symlink_metadata(dest).is_ok();
        if let Ok(f) = File::open(dest)
            && f.metadata().is_ok_and(|m| m.is_file())
        {
            choose_format(Some(format), None, dest, &f)?;
        }
        // A view that cannot be made (an empty disk as VMDK, a disk VHD cannot hold)
        // says why naming the layer it was made from: name the image too.
        let view = self
            .open(caller, &node, false, false)
            .map_err(|e| match e {
                Error::Unreadable(why) => Error::Unreadable(format!(
                    "{}:{}@{} cannot be exported as {format}: {why}",
                    resolved.repo, resolved.meta.name, resolved.meta.revision
                )),
                e => e,
            })?;
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)
            .map_err(|e| io_error(dest, e))?;
        let result = copy_sparse(&view, &out, dest, progress);
        if result.is_err() && !existed {
            let _ = std::fs::remove_file(dest);
        }
        result
    }
}

/// Copies every data extent of `from` into `out` and sets its length, so that holes are
/// not written.
fn copy_sparse(
    from: &super::OpenFile,
    out: &File,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let size = from.size()?;
    let mut buf = vec![0u8; EXPORT_CHUNK];
    let mut pos = 0u64;
    progress(0, size);
    while pos < size {
        let Some(data) = from.seek_data(pos)? else {
            break;
        };
        let hole = from.seek_hole(data)?.unwrap_or(size).min(size);
        let mut off = data;
        while off < hole {
            let want = (hole - off).min(EXPORT_CHUNK as u64) as usize;
            let n = from.read(&mut buf[..want], off)?;
            if n == 0 {
                return Err(Error::Unreadable(format!(
                    "{}: the source ended at {off}, before its size {size}",
                    dest.display()
                )));
            }
            // Runs of zeroes inside an extent (a view reports only long holes) stay
            // holes too.
            write_sparse(out, dest, &buf[..n], off)?;
            off += n as u64;
            progress(off, size);
        }
        // A view never reports a hole at a data offset; stepping on guards against it.
        pos = hole.max(data + 1);
    }
    out.set_len(size).map_err(|e| io_error(dest, e))?;
    out.sync_all().map_err(|e| io_error(dest, e))?;
    progress(size, size);
    Ok(())
}
