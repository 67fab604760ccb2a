//! Directory-entry operations by parent and name, as the filesystem calls them: `mkdir`
//! (an empty image directory held in memory), `link` (a metadata-only copy), `rename`
//! (an image within its repository, or a staging file published under its proper name),
//! `unlink` and `rmdir`. Each returns the entries whose kernel cache must be dropped.

use super::import::is_staging;
use super::nodes::{display, parse_revision_dir_name};
use super::open::Changes;
use super::pending::publish_changes;
use super::publish::{Target, split_suffix};
use super::{Attr, Caller, Error, Node, Tree, validate_new_name};

impl Tree {
    /// mkdir in a repository directory: an empty image directory, held by this tree only
    /// (a repository has no empty images) until something is imported into it; gone at
    /// rmdir or when the tree is dropped. Anywhere else: EPERM, or EROFS in a revision.
    ///
    /// In an image directory, a revision directory `@N` cannot be made (EPERM): a revision
    /// is made by writing a disk into the image directory. `cp -r` of an image directory
    /// makes the image directory, then each `@N`: when the first of these is refused,
    /// the image directory the same user just made, still empty, is dropped, so that the
    /// copy fails leaving nothing behind.
    pub fn mkdir(&self, caller: &Caller, parent: &Node, name: &str) -> Result<(Node, Attr), Error> {
        let repo = match parent {
            Node::Repo { repo } => repo,
            Node::Revision { .. } | Node::File { .. } | Node::Latest { .. } => {
                return Err(Error::ReadOnly(display(parent)));
            }
            Node::Image { repo, image } if parse_revision_dir_name(name).is_some() => {
                return Err(self.refuse_revision_dir(caller, repo, image, name));
            }
            _ => return Err(Error::NotPermitted(format!("{}/{name}", display(parent)))),
        };
        validate_new_name(name)?;
        let store = self.writable_store(caller, repo)?;
        let exists = || Error::ImageExists {
            name: name.to_string(),
            repo: repo.clone(),
        };
        let file = Node::Import {
            repo: repo.clone(),
            image: None,
            name: name.to_string(),
        };
        if self.pending.empty_dir(repo, name).is_some() || self.pending.writing(&file) {
            return Err(exists());
        }
        let no_revision = || Ok(store.revisions(name)?.is_empty());
        if !self
            .pending
            .add_empty_dir(repo, name, Some(caller.uid), no_revision)?
        {
            return Err(exists());
        }
        let node = Node::Image {
            repo: repo.clone(),
            image: name.to_string(),
        };
        let attr = self.getattr(caller, &node)?;
        Ok((node, attr))
    }

    /// The refusal of `mkdir IMAGE/@N`, dropping IMAGE if `caller` made it by `mkdir` and
    /// it is still empty (no revision, nothing being written into it).
    fn refuse_revision_dir(&self, caller: &Caller, repo: &str, image: &str, name: &str) -> Error {
        let refused = Error::NotPermitted(format!(
            "{repo}/{image}/{name}: a revision directory cannot be made, only a disk image \
             written into {repo}/{image} makes one"
        ));
        let Ok(store) = self.writable_store(caller, repo) else {
            return refused;
        };
        let no_revision = || Ok(store.revisions(image)?.is_empty());
        match self
            .pending
            .drop_empty_dir_made_by(repo, image, caller.uid, no_revision)
        {
            Ok(true) => log::info!(
                "{repo}/{image}: empty image directory dropped: its maker's mkdir of {name} \
                 was refused (a copy of an image directory fails leaving nothing)"
            ),
            Ok(false) => {}
            Err(e) => log::warn!("{repo}/{image}: {e}"),
        }
        refused
    }

    /// link(2) of a revision file (or directory) to `new_parent/new_name` in a repository
    /// directory: copies the revision to `NEW@0` (metadata only within a repository,
    /// layers linked or copied across; a known format suffix of the name is dropped).
    /// Returns the source's node and attributes, which is what the kernel expects in the
    /// reply.
    pub fn link(
        &self,
        caller: &Caller,
        src: &Node,
        new_parent: &Node,
        new_name: &str,
    ) -> Result<(Node, Attr, Changes), Error> {
        let Node::Repo { repo } = new_parent else {
            return Err(Error::NotPermitted(format!(
                "{}/{new_name}",
                display(new_parent)
            )));
        };
        let (image, _) = split_suffix(new_name);
        self.copy_revision(caller, src, repo, image)?;
        self.pending.remove_empty_dir(repo, image);
        let attr = self.getattr(caller, src)?;
        let mut changes = Changes::default();
        changes
            .entries
            .push((new_parent.clone(), new_name.to_string()));
        if image != new_name {
            changes
                .entries
                .push((new_parent.clone(), image.to_string()));
        }
        Ok((src.clone(), attr, changes))
    }

    /// rename(2) by parent and name: an image directory within its repository; a staging
    /// file to another staging name, or to a proper name, which publishes it (a new image
    /// in a repository directory, the next revision in an image directory), failing if
    /// it cannot. Anything else: EPERM, EROFS or EXDEV.
    pub fn rename_entry(
        &self,
        caller: &Caller,
        parent: &Node,
        name: &str,
        new_parent: &Node,
        new_name: &str,
    ) -> Result<Changes, Error> {
        let from = self.lookup(caller, parent, name)?;
        let mut changes = Changes {
            entries: vec![
                (parent.clone(), name.to_string()),
                (new_parent.clone(), new_name.to_string()),
            ],
            moved: Vec::new(),
            gone: Vec::new(),
        };
        if let (Node::Image { repo, .. }, Node::Repo { .. }) = (&from, new_parent) {
            let file = Node::Import {
                repo: repo.clone(),
                image: None,
                name: new_name.to_string(),
            };
            if self.pending.writing(&file) {
                return Err(Error::NotADirectory(display(&file)));
            }
        }
        if let Node::Image { repo, image } = &from
            && self.pending.writing_into(repo, image)
        {
            // The file would be published into the image it was created in.
            return Err(Error::Busy(format!(
                "{}: a file is being written into it",
                display(&from)
            )));
        }
        match (&from, new_parent) {
            (Node::Import { repo, .. }, Node::Repo { repo: to } | Node::Image { repo: to, .. }) => {
                if repo != to {
                    return Err(Error::CrossRepository(display(&from)));
                }
                let imp = self
                    .pending
                    .find(&from, caller, true)
                    .ok_or_else(|| Error::NoEntry(display(&from)))?;
                if !imp.is_staging() {
                    return Err(Error::NotPermitted(display(&from)));
                }
                let image = match new_parent {
                    Node::Image { image, .. } => Some(image.clone()),
                    _ => None,
                };
                let taken = Node::Import {
                    repo: repo.clone(),
                    image: image.clone(),
                    name: new_name.to_string(),
                };
                if taken != from && self.pending.writing(&taken) {
                    return Err(Error::Exists(format!(
                        "{}: a file is being written under that name",
                        display(&taken)
                    )));
                }
                if is_staging(new_name) {
                    let to = Node::Import {
                        repo: repo.clone(),
                        image,
                        name: new_name.to_string(),
                    };
                    self.pending.rekey(&imp, to.clone());
                    changes.moved.push((from.clone(), to));
                    return Ok(changes);
                }
                let target = match image {
                    Some(image) => Target::NextRevision(image),
                    None => Target::NewImage(split_suffix(new_name).0.to_string()),
                };
                self.writable_store(caller, repo)?;
                let hint = split_suffix(new_name).1;
                let meta = imp.publish(&target, hint, &self.pending, false)?;
                self.pending.drop_import(&imp);
                let published = publish_changes(&from, repo, &meta);
                changes.entries.extend(published.entries);
                changes.gone.extend(published.gone);
                Ok(changes)
            }
            (Node::Image { repo, image }, Node::Repo { repo: to })
                if self.pending.empty_dir(repo, image).is_some()
                    && self.store(repo)?.revisions(image)?.is_empty() =>
            {
                if repo != to {
                    return Err(Error::CrossRepository(display(&from)));
                }
                validate_new_name(new_name)?;
                self.writable_store(caller, repo)?;
                if !self.store(repo)?.revisions(new_name)?.is_empty() {
                    return Err(Error::ImageExists {
                        name: new_name.to_string(),
                        repo: repo.clone(),
                    });
                }
                if new_name == image {
                    return Ok(changes);
                }
                let store = self.store(repo)?;
                let no_revision = || Ok(store.revisions(new_name)?.is_empty());
                if !self
                    .pending
                    .add_empty_dir(repo, new_name, None, no_revision)?
                {
                    return Err(Error::ImageExists {
                        name: new_name.to_string(),
                        repo: repo.clone(),
                    });
                }
                self.pending.remove_empty_dir(repo, image);
                changes.moved.push((from.clone(), image_node(to, new_name)));
                Ok(changes)
            }
            _ => {
                self.rename(caller, &from, new_parent, new_name)?;
                if let (Node::Image { .. }, Node::Repo { repo }) = (&from, new_parent) {
                    // An empty directory that stood at the new name is replaced.
                    self.pending.remove_empty_dir(repo, new_name);
                    changes
                        .moved
                        .push((from.clone(), image_node(repo, new_name)));
                }
                Ok(changes)
            }
        }
    }

    /// unlink(2) by parent and name: a staging file (or an import in progress) is
    /// dropped; a file of a revision deletes nothing (so that `rm -r` reaches the rmdir
    /// that deletes).
    pub fn unlink_entry(
        &self,
        caller: &Caller,
        parent: &Node,
        name: &str,
    ) -> Result<Changes, Error> {
        let node = match self.lookup(caller, parent, name) {
            Ok(node) => node,
            // `rm -r IMAGE` lists the directory, removes `@N` (the last revision, which
            // leaves the directory empty), then unlinks `latest`: already gone, fine.
            Err(Error::NoEntry(_))
                if name == super::nodes::LATEST
                    && matches!(parent, Node::Image { repo, image }
                        if self.pending.empty_dir(repo, image).is_some()) =>
            {
                return Ok(Changes::default());
            }
            Err(e) => return Err(e),
        };
        self.unlink(caller, &node)?;
        let gone = match node {
            Node::Import { .. } => vec![node],
            _ => Vec::new(),
        };
        Ok(Changes {
            entries: vec![(parent.clone(), name.to_string())],
            moved: Vec::new(),
            gone,
        })
    }

    /// rmdir(2) by parent and name: a revision or image directory deletes its
    /// revisions (metadata only); an empty image directory made by `mkdir` disappears.
    pub fn rmdir_entry(
        &self,
        caller: &Caller,
        parent: &Node,
        name: &str,
    ) -> Result<Changes, Error> {
        let node = self.lookup(caller, parent, name)?;
        if let Node::Image { repo, image } = &node
            && self.pending.writing_into(repo, image)
        {
            return Err(Error::Busy(format!(
                "{}: a file is being written into it",
                display(&node)
            )));
        }
        let mut changes = Changes {
            entries: vec![(parent.clone(), name.to_string())],
            moved: Vec::new(),
            gone: vec![node.clone()],
        };
        if let Node::Revision { .. } = node {
            // `latest` now names another revision, or nothing.
            changes
                .entries
                .push((parent.clone(), super::nodes::LATEST.to_string()));
        }
        if let Node::Image { repo, image } = &node {
            // Files just published into this image stop answering for it.
            self.pending.forget_published(repo, image);
            if self.store(repo)?.revisions(image)?.is_empty()
                && self.pending.empty_dir(repo, image).is_some()
            {
                self.writable_store(caller, repo)?;
                self.pending.remove_empty_dir(repo, image);
                return Ok(changes);
            }
        }
        self.remove(caller, &node)?;
        match &node {
            // Removing the last revision leaves its image directory in place, empty, as
            // any filesystem would, until it is removed in turn (`rm -r IMAGE` does just
            // that).
            Node::Revision { repo, image, .. } => {
                let store = self.store(repo)?;
                let no_revision = || Ok(store.revisions(image)?.is_empty());
                self.pending.add_empty_dir(repo, image, None, no_revision)?;
            }
            // Gone with its revisions, whatever else said it was there.
            Node::Image { repo, image } => {
                self.pending.remove_empty_dir(repo, image);
            }
            _ => {}
        }
        Ok(changes)
    }
}

fn image_node(repo: &str, image: &str) -> Node {
    Node::Image {
        repo: repo.to_string(),
        image: image.to_string(),
    }
}
