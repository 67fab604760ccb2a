//! The URI-level operations (`pcocc image list/show/copy/delete/repo gc`), shared by the
//! CLI and, through [`super::nodes`], by the filesystem.

use std::time::{Duration, SystemTime};

use super::access::{self, R, W, X};
use super::{
    Caller, CopyOutcome, DEFAULT_GC_GRACE, Deleted, Error, GcReport, ImageSummary, Resolved,
    RevisionInfo, Tree, Uri, validate_new_name,
};
use crate::store::{LayerTransfer, Meta, Store};

/// Seconds since the epoch as pcocc records it (`time.time()`).
pub fn now_timestamp() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Tree {
    /// Finds a revision: in `uri.repo` if given (`""` = the default repository), else in
    /// the first repository, in priority order, that has it. Without a revision, the
    /// latest one. Errors as pcocc: `Unknown repository R`, `Object N[ revision K] not
    /// found in repository R` / `… in configured repositories`.
    pub fn resolve(&self, caller: &Caller, uri: &Uri) -> Result<Resolved, Error> {
        let store = self.locate(caller, uri)?;
        let repo = store.name().to_string();
        if let Some(rev) = uri.revision {
            let meta = store
                .read_meta(&uri.name, rev)?
                .ok_or_else(|| Error::RevisionNotFound {
                    name: uri.name.clone(),
                    rev,
                    repo: repo.clone(),
                })?;
            return Ok(Resolved { repo, meta });
        }
        // The latest revision that can be read: a corrupt newest revision is skipped with
        // a warning rather than hiding the whole image (pcocc fails here).
        let mut first_error = None;
        for rev in store.revisions(&uri.name)?.into_iter().rev() {
            match store.read_meta(&uri.name, rev) {
                Ok(Some(meta)) => return Ok(Resolved { repo, meta }),
                Ok(None) => {}
                Err(e) => {
                    log::warn!("repository {repo}: skipping: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(match first_error {
            Some(e) => e.into(),
            None => Error::ImageNotFound {
                name: uri.name.clone(),
                repo,
            },
        })
    }

    /// The repository that holds what `uri` names (the revision if one is given, else
    /// the image), checking that `caller` may read it.
    fn locate(&self, caller: &Caller, uri: &Uri) -> Result<&Store, Error> {
        let has = |s: &Store| -> Result<bool, Error> {
            Ok(match uri.revision {
                Some(rev) => s.has_revision(&uri.name, rev),
                None => !s.revisions(&uri.name)?.is_empty(),
            })
        };
        match &uri.repo {
            Some(r) => {
                let s = self.store(r)?;
                access::check(caller, &s.meta_dir(), R | X)?;
                if has(s)? {
                    return Ok(s);
                }
                let (name, repo) = (uri.name.clone(), s.name().to_string());
                Err(match uri.revision {
                    Some(rev) => Error::RevisionNotFound { name, rev, repo },
                    None => Error::ImageNotFound { name, repo },
                })
            }
            None => {
                for s in &self.repos {
                    // A repository this caller cannot read is one it cannot find things in.
                    if access::check(caller, &s.meta_dir(), R | X).is_ok() && has(s)? {
                        return Ok(s);
                    }
                }
                let name = uri.name.clone();
                Err(match uri.revision {
                    Some(rev) => Error::RevisionNotFoundAnywhere { name, rev },
                    None => Error::ImageNotFoundAnywhere { name },
                })
            }
        }
    }

    /// The images of `repo`, sorted by name, each with its latest readable revision's
    /// metadata. Revisions whose metadata cannot be read are skipped with a warning.
    pub fn list_images(&self, caller: &Caller, repo: &str) -> Result<Vec<ImageSummary>, Error> {
        let store = self.store(repo)?;
        access::check(caller, &store.meta_dir(), R | X)?;
        let mut out = Vec::new();
        for (name, revs) in store.list()? {
            let latest = revs
                .iter()
                .rev()
                .find_map(|&rev| match store.read_meta(&name, rev) {
                    Ok(m) => m,
                    Err(e) => {
                        log::warn!("repository {}: skipping: {e}", store.name());
                        None
                    }
                });
            if let Some(latest) = latest {
                out.push(ImageSummary {
                    repo: store.name().to_string(),
                    latest,
                });
            }
        }
        Ok(out)
    }

    /// Every revision of `repo:image`, sorted by revision number, with the byte size of
    /// each revision's top layer file. Unreadable revisions are skipped with a warning.
    pub fn revisions(
        &self,
        caller: &Caller,
        repo: &str,
        image: &str,
    ) -> Result<Vec<RevisionInfo>, Error> {
        let store = self.store(repo)?;
        access::check(caller, &store.meta_dir(), R | X)?;
        let revs = store.revisions(image)?;
        if revs.is_empty() {
            return Err(Error::ImageNotFound {
                name: image.to_string(),
                repo: store.name().to_string(),
            });
        }
        let mut out = Vec::with_capacity(revs.len());
        for rev in revs {
            let meta = match store.read_meta(image, rev) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("repository {}: skipping: {e}", store.name());
                    continue;
                }
            };
            let top_layer_size = meta
                .top_layer()
                .ok()
                .flatten()
                .and_then(|h| store.open_layer(h).ok())
                .map(|(_, m)| m.len());
            out.push(RevisionInfo {
                meta,
                top_layer_size,
            });
        }
        Ok(out)
    }

    /// pcocc's copy: `src` is resolved like [`Tree::resolve`]; `dst` names the new image
    /// (repository defaults to the default one; its revision is ignored) and must not
    /// exist there. Writes `DST@0` listing the same layers, linking or copying layers the
    /// destination repository lacks; the new revision belongs to `caller`, dated now.
    pub fn copy(&self, caller: &Caller, src: &Uri, dst: &Uri) -> Result<CopyOutcome, Error> {
        let from = self.resolve(caller, src)?;
        let src_store = self.store(&from.repo)?;
        let dst_store = self.store(dst.repo.as_deref().unwrap_or(""))?;
        validate_new_name(&dst.name)?;
        access::check(caller, &dst_store.meta_dir(), W | X)?;
        access::check(caller, &dst_store.tmp_dir(), W | X)?;
        let exists = || Error::ImageExists {
            name: dst.name.clone(),
            repo: dst_store.name().to_string(),
        };
        if !dst_store.revisions(&dst.name)?.is_empty() {
            return Err(exists());
        }
        let shadowed_in = self
            .repos
            .iter()
            .filter(|s| s.name() != dst_store.name())
            .find(|s| s.revisions(&dst.name).is_ok_and(|r| !r.is_empty()))
            .map(|s| s.name().to_string());
        let mut outcome = CopyOutcome {
            repo: dst_store.name().to_string(),
            name: dst.name.clone(),
            shadowed_in,
            layers_present: 0,
            layers_linked: 0,
            layers_copied: 0,
        };
        let hashes = from
            .meta
            .layer_hashes()
            .map_err(crate::store::Error::BadHash)?;
        if !hashes.is_empty() && src_store.name() != dst_store.name() {
            access::check(caller, &dst_store.data_dir(), W | X)?;
        }
        for h in hashes {
            if src_store.name() == dst_store.name() {
                // Metadata-only copy: the layers are already here, just make sure.
                if !dst_store.has_layer(h) {
                    return Err(crate::store::Error::NotFound {
                        path: dst_store.layer_path(h),
                    }
                    .into());
                }
                outcome.layers_present += 1;
                continue;
            }
            match dst_store.import_layer_from(src_store, h)? {
                LayerTransfer::Present => outcome.layers_present += 1,
                LayerTransfer::Linked => outcome.layers_linked += 1,
                LayerTransfer::Copied => outcome.layers_copied += 1,
            }
        }
        let meta = Meta {
            name: dst.name.clone(),
            revision: 0,
            kind: from.meta.kind.clone(),
            owner: access::user_name(caller.uid),
            timestamp: now_timestamp(),
            data_blobs: from.meta.data_blobs.clone(),
            custom_meta: from.meta.custom_meta.clone(),
        };
        match dst_store.put_meta(&meta) {
            Ok(()) => Ok(outcome),
            Err(crate::store::Error::AlreadyExists { .. }) => Err(exists()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes one revision (`uri.revision` given) or every revision of an image. Without
    /// a repository, acts on the first repository in priority order that has it (the man
    /// page's rule; pcocc itself only looks at the default one). Metadata only: layers
    /// stay until [`Tree::gc`].
    pub fn delete(&self, caller: &Caller, uri: &Uri) -> Result<Deleted, Error> {
        let store = self.locate(caller, uri)?;
        self.delete_in(caller, store, &uri.name, uri.revision)
    }

    /// Deletes `name@rev` (or every revision) in `store`, for `caller`.
    pub(super) fn delete_in(
        &self,
        caller: &Caller,
        store: &Store,
        name: &str,
        rev: Option<u64>,
    ) -> Result<Deleted, Error> {
        access::check(caller, &store.meta_dir(), W | X)?;
        let repo = store.name().to_string();
        let revisions = match rev {
            Some(rev) => match store.delete_revision(name, rev) {
                Ok(()) => vec![rev],
                Err(crate::store::Error::NotFound { .. }) => {
                    return Err(Error::RevisionNotFound {
                        name: name.to_string(),
                        rev,
                        repo,
                    });
                }
                Err(e) => return Err(e.into()),
            },
            None => store.delete_image(name)?,
        };
        Ok(Deleted {
            repo,
            name: name.to_string(),
            revisions,
        })
    }

    /// Garbage-collects `repo`: unreferenced layers and `.tmp/` entries older than
    /// `grace` (default [`DEFAULT_GC_GRACE`]); upgrades a version 1 repository.
    pub fn gc(
        &self,
        caller: &Caller,
        repo: &str,
        grace: Option<Duration>,
    ) -> Result<GcReport, Error> {
        let store = self.store(repo)?;
        for dir in [store.data_dir(), store.meta_dir(), store.tmp_dir()] {
            access::check(caller, &dir, W | X)?;
        }
        Ok(store.gc(grace.unwrap_or(DEFAULT_GC_GRACE))?)
    }

    /// Renames image `old` to `new` within `repo` (every revision, each keeping its
    /// number, owner and date). Fails if `new` exists.
    pub fn rename_image(
        &self,
        caller: &Caller,
        repo: &str,
        old: &str,
        new: &str,
    ) -> Result<(), Error> {
        let store = self.store(repo)?;
        validate_new_name(new)?;
        access::check(caller, &store.meta_dir(), W | X)?;
        access::check(caller, &store.tmp_dir(), W | X)?;
        match store.rename_image(old, new) {
            Ok(()) => Ok(()),
            Err(crate::store::Error::AlreadyExists { .. }) => Err(Error::ImageExists {
                name: new.to_string(),
                repo: repo.to_string(),
            }),
            Err(crate::store::Error::NotFound { .. }) => Err(Error::ImageNotFound {
                name: old.to_string(),
                repo: repo.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves image `image` of `from_repo` to `to_repo` as `new` (`mv` across
    /// repositories): every revision is copied with its number, owner, date and layers
    /// (linked where the kernel allows, else copied), then the original is deleted. If
    /// anything fails before the original is touched, the copies are removed: nothing
    /// changed.
    pub fn move_image(
        &self,
        caller: &Caller,
        from_repo: &str,
        image: &str,
        to_repo: &str,
        new: &str,
    ) -> Result<(), Error> {
        let src = self.store(from_repo)?;
        let dst = self.store(to_repo)?;
        validate_new_name(new)?;
        access::check(caller, &src.meta_dir(), W | X)?;
        for dir in [dst.meta_dir(), dst.data_dir(), dst.tmp_dir()] {
            access::check(caller, &dir, W | X)?;
        }
        let revs = src.revisions(image)?;
        if revs.is_empty() {
            return Err(Error::ImageNotFound {
                name: image.to_string(),
                repo: from_repo.to_string(),
            });
        }
        if !dst.revisions(new)?.is_empty() {
            return Err(Error::ImageExists {
                name: new.to_string(),
                repo: to_repo.to_string(),
            });
        }
        let mut created = Vec::new();
        let undo = |created: &[u64]| {
            for &rev in created {
                let _ = dst.delete_revision(new, rev);
            }
        };
        for &rev in &revs {
            let copied = (|| -> Result<(), Error> {
                let mut meta =
                    src.read_meta(image, rev)?
                        .ok_or_else(|| Error::RevisionNotFound {
                            name: image.to_string(),
                            rev,
                            repo: from_repo.to_string(),
                        })?;
                for h in meta.layer_hashes().map_err(crate::store::Error::BadHash)? {
                    dst.import_layer_from(src, h)?;
                }
                meta.name = new.to_string();
                match dst.put_meta(&meta) {
                    Ok(()) => Ok(()),
                    Err(crate::store::Error::AlreadyExists { .. }) => Err(Error::ImageExists {
                        name: new.to_string(),
                        repo: to_repo.to_string(),
                    }),
                    Err(e) => Err(e.into()),
                }
            })();
            if let Err(e) = copied {
                undo(&created);
                return Err(e);
            }
            created.push(rev);
        }
        for (i, &rev) in revs.iter().enumerate() {
            match src.delete_revision(image, rev) {
                Ok(()) | Err(crate::store::Error::NotFound { .. }) => {}
                Err(e) => {
                    // Refused before anything of the original went: take the copy back.
                    if i == 0 {
                        undo(&created);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}
