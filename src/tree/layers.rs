//! Layered revisions: a new revision made of an existing revision's layers plus one new
//! top layer whose backing file is the old top (pcocc's `add_revision_layer`, used by
//! `pcocc image resize`).

use super::access::{self, W, X};
use super::publish::{self, KIND_VM, Target};
use super::{Caller, Error, Tree, Uri};
use crate::image::qcow2_overlay::EmptyOverlay;
use crate::store::{self, Meta, Store};

/// The format every layer is stored in, named in each layer's backing format extension.
const LAYER_FORMAT: &str = "qcow2";

/// The backing file name a layer stored in `data/YY/` gives for the layer `hash`: the
/// relative path pcocc writes, valid from any `data/YY/` of the same repository.
pub fn backing_name(hash: &str) -> String {
    format!("../../data/{}/{hash}", &hash[..2])
}

impl Tree {
    /// pcocc's `resize`: a new revision of the image `uri` names whose layers are those
    /// of the revision it names (the latest without one) plus an empty top layer of
    /// `size` bytes (rounded up to whole sectors). A smaller size shrinks the disk: the
    /// new revision shows the first `size` bytes.
    ///
    /// The new revision is the image's next one (latest + 1), also when `uri` names an
    /// older revision; it is written in the repository the image was found in. Returns
    /// its metadata.
    pub fn resize(&self, caller: &Caller, uri: &Uri, size: u64) -> Result<Meta, Error> {
        let from = self.resolve(caller, uri)?;
        let store = self.store(&from.repo)?;
        if from.meta.kind != KIND_VM {
            return Err(Error::NotSupported(format!(
                "{}:{}@{} is a {} image, not a VM disk",
                from.repo, from.meta.name, from.meta.revision, from.meta.kind
            )));
        }
        for dir in [store.meta_dir(), store.data_dir(), store.tmp_dir()] {
            access::check(caller, &dir, W | X)?;
        }
        let top = from
            .meta
            .top_layer()
            .map_err(store::Error::BadHash)?
            .ok_or_else(|| {
                Error::Unreadable(format!(
                    "{}:{}@{} has no layer",
                    from.repo, from.meta.name, from.meta.revision
                ))
            })?;
        if !store.has_layer(top) {
            return Err(store::Error::NotFound {
                path: store.layer_path(top),
            }
            .into());
        }
        let tmp = store.tmp_file()?;
        let overlay = EmptyOverlay::new(tmp.path(), size, &backing_name(top), LAYER_FORMAT)?;
        overlay.write_to(tmp.file(), tmp.path())?;
        let hash = store.add_layer(tmp, None)?;
        let target = Target::NextRevision(from.meta.name.clone());
        add_revision_layer(
            store,
            &access::user_name(caller.uid),
            &from.meta,
            &hash,
            &target,
        )
    }
}

/// Writes the metadata of `target` in `store` as pcocc's `add_revision_layer` does:
/// `parent`'s layers plus `hash` on top, `parent`'s custom metadata, owned by `owner`,
/// dated now (see [`publish::write_meta`], which takes the next number again if another
/// writer takes it first).
pub fn add_revision_layer(
    store: &Store,
    owner: &str,
    parent: &Meta,
    hash: &str,
    target: &Target,
) -> Result<Meta, Error> {
    let mut data_blobs = parent.data_blobs.clone();
    data_blobs.push(hash.to_string());
    publish::write_meta(store, owner, data_blobs, parent.custom_meta.clone(), target)
}
