//! The disk files of a revision directory (`disk.raw`, `disk.qcow2`, … `disk.vmdk`) and
//! the cache of opened revisions behind them.
//!
//! A revision is opened once: its layers as one backing chain (confined to the
//! repository's `data/`), and each view built lazily the first time it is asked for.
//! Opened revisions are kept in a bounded LRU keyed by the repository and the layer list,
//! which is a content address: a revision deleted and re-imported under the same
//! `name@rev` with other content gets another key, so nothing stale is ever served.
//! Attributes come from the tables only (`View::size`, `View::allocated_bytes`), never
//! from data. The [`ViewId`] is the sha256 of the layer list, so a revision's views are
//! the same bytes in every process and every repository that holds those layers.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::{Error, FileKind, Format, Tree};
use crate::image::Disk;
use crate::image::chain::{BeneathDir, open_chain_file};
use crate::store::fsutil::Dir;
use crate::store::{Meta, Store};
use crate::view::{View, ViewId};

/// Opened revisions kept at once. Each holds a few file descriptors and its layers'
/// table caches (bounded per layer), so a few hundred stay well within limits.
pub const REVISION_CACHE_ENTRIES: usize = 256;
/// `st_blocks` unit.
const BLOCK: u64 = 512;

/// What a disk file of a revision serves.
pub(super) enum Content {
    /// The stored layer file itself (`disk.qcow2` of a single-layer revision), as the
    /// descriptor the revision was opened with (never reopened by name).
    Stored(Arc<File>, PathBuf),
    /// A generated view.
    View(View),
}

/// One revision, opened: its disk and, built on first use, its views.
pub(super) struct OpenedRevision {
    disk: Arc<Disk>,
    id: ViewId,
    /// The only layer, when the revision is one standalone layer.
    single_layer: Option<(Arc<File>, PathBuf)>,
    /// Device and inode of every layer of the chain, to check that a later caller
    /// opens these very files.
    layer_ids: Vec<(u64, u64)>,
    /// Views in [`Format::ALL`] order; a build error is kept as its message (a VHD that
    /// cannot hold the disk stays unable to).
    views: [OnceLock<Result<View, String>>; 6],
}

impl OpenedRevision {
    /// Opens the revision whose layers are `hashes` (base first) with the calling
    /// thread's identity: the top layer and its backing chain, each reached from the
    /// repository's `data/` descriptor without following symlinks.
    pub(super) fn open(store: &Store, hashes: &[&str]) -> Result<OpenedRevision, Error> {
        let top = hashes
            .last()
            .ok_or_else(|| Error::Unreadable("revision has no layer".into()))?;
        let data = store.dir("data")?;
        let (top_file, _) = store.open_layer_in(&data, top)?;
        let top_path = store.layer_path(top);
        let stored = Arc::new(top_file.try_clone().map_err(|e| io_error(&top_path, e))?);
        let policy = BeneathDir {
            dir: data.fd.try_clone().map_err(|e| io_error(&data.path, e))?,
            root: data.path.clone(),
        };
        let disk = Arc::new(open_chain_file(top_file, &top_path, &policy)?);
        let single_layer = (disk.layers().len() == 1).then_some((stored, top_path));
        let mut layer_ids: Vec<(u64, u64)> =
            disk.layers().iter().filter_map(|l| l.file_id()).collect();
        layer_ids.sort_unstable();
        let opened = OpenedRevision {
            disk,
            id: view_id(hashes),
            single_layer,
            layer_ids,
            views: Default::default(),
        };
        opened.check_layers(store, &data, hashes)?;
        Ok(opened)
    }

    /// Checks that the calling thread's identity opens, under the names `hashes`, the
    /// very files this revision was opened from: a revision opened for one user is
    /// served to another only if they could have opened it themselves, and a layer
    /// replaced since (by a symlink, say) is never taken for the old one.
    fn check_layers(&self, store: &Store, data: &Dir, hashes: &[&str]) -> Result<(), Error> {
        let mut ids = Vec::with_capacity(hashes.len());
        for h in hashes {
            let (_, m) = store.open_layer_in(data, h)?;
            ids.push((m.dev(), m.ino()));
        }
        ids.sort_unstable();
        ids.dedup();
        if ids != self.layer_ids {
            return Err(Error::Unreadable(format!(
                "the layers of this revision changed since it was opened, or do not form its backing chain ({})",
                store
                    .layer_path(hashes.last().copied().unwrap_or_default())
                    .display()
            )));
        }
        Ok(())
    }

    /// The revision's disk: its layers, top first.
    pub(super) fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The view of this revision in `format`, built on first use.
    pub(super) fn view(&self, format: Format) -> Result<&View, Error> {
        let slot = Format::ALL
            .iter()
            .position(|&f| f == format)
            .and_then(|i| self.views.get(i))
            .ok_or_else(|| Error::Unreadable(format!("no {format} view")))?;
        slot.get_or_init(|| {
            View::new(self.disk.clone(), format, self.id).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|msg| Error::Unreadable(msg.clone()))
    }

    /// What `disk.FMT` serves.
    pub(super) fn content(&self, format: Format) -> Result<Content, Error> {
        match (&self.single_layer, format) {
            (Some((file, path)), Format::Qcow2) => Ok(Content::Stored(file.clone(), path.clone())),
            _ => Ok(Content::View(self.view(format)?.clone())),
        }
    }

    /// Exact size and 512-byte blocks of `disk.FMT`, from tables only.
    pub(super) fn size_and_blocks(&self, format: Format) -> Result<(u64, u64), Error> {
        match self.content(format)? {
            Content::Stored(file, path) => {
                let m = file.metadata().map_err(|e| io_error(&path, e))?;
                Ok((m.len(), m.blocks()))
            }
            Content::View(v) => Ok((v.size(), v.allocated_bytes().div_ceil(BLOCK))),
        }
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Store(crate::store::Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The view identifier of a layer list: sha256 of the hashes joined by newlines.
pub fn view_id(hashes: &[&str]) -> ViewId {
    ViewId(Sha256::digest(hashes.join("\n").as_bytes()).into())
}

type Key = (String, Vec<String>);

/// A bounded LRU of opened revisions. Opening happens outside the lock, so a slow open
/// never blocks readers of other revisions; two threads opening the same revision at
/// once both succeed and one copy is kept.
#[derive(Default)]
pub(super) struct RevisionCache {
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    map: HashMap<Key, (u64, Arc<OpenedRevision>)>,
}

impl RevisionCache {
    fn get_or_open(
        &self,
        key: Key,
        open: impl FnOnce() -> Result<OpenedRevision, Error>,
    ) -> Result<(Arc<OpenedRevision>, bool), Error> {
        {
            let mut lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            lru.tick += 1;
            let tick = lru.tick;
            if let Some((used, rev)) = lru.map.get_mut(&key) {
                *used = tick;
                return Ok((rev.clone(), false));
            }
        }
        let opened = Arc::new(open()?);
        let mut lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        lru.tick += 1;
        let tick = lru.tick;
        if lru.map.len() >= REVISION_CACHE_ENTRIES && !lru.map.contains_key(&key) {
            let oldest = lru
                .map
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                lru.map.remove(&k);
            }
        }
        let entry = lru.map.entry(key).or_insert((tick, opened));
        entry.0 = tick;
        Ok((entry.1.clone(), true))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner.lock().map(|l| l.map.len()).unwrap_or(0)
    }
}

impl Tree {
    /// The opened revision `meta` of `store`, from the cache or opened now.
    pub(super) fn opened_revision(
        &self,
        store: &Store,
        meta: &Meta,
    ) -> Result<Arc<OpenedRevision>, Error> {
        if !super::is_vm(meta) {
            return Err(Error::NoEntry(format!(
                "{}:{}@{}: a {} image, which has no disk",
                store.name(),
                meta.name,
                meta.revision,
                meta.kind
            )));
        }
        let hashes = meta.layer_hashes().map_err(crate::store::Error::BadHash)?;
        let key = (
            store.name().to_string(),
            hashes.iter().map(|h| h.to_string()).collect(),
        );
        let (opened, fresh) = self
            .revisions
            .get_or_open(key, || OpenedRevision::open(store, &hashes))?;
        if !fresh {
            opened.check_layers(store, &store.dir("data")?, &hashes)?;
        }
        Ok(opened)
    }

    /// True when revision `meta` has file `kind`: `meta.json` always; views when the
    /// revision is a VM disk with layers, `disk.vpc`, `disk.vmdk`, `disk.qed` and
    /// `disk.vdi` only where their format can hold the disk as qemu opens it (VHD up to
    /// 2040 GiB, a VMDK sparse extent up to 1 PiB and not empty, QED up to 64 TiB, VDI
    /// up to qemu's block count).
    pub(super) fn has_file(&self, store: &Store, meta: &Meta, kind: FileKind) -> bool {
        match kind {
            FileKind::MetaJson => true,
            FileKind::View(_) if meta.data_blobs.is_empty() || !super::is_vm(meta) => false,
            // A revision the caller may not open still lists the file: opening it then
            // says why (EACCES), rather than a name that comes and goes with the caller.
            FileKind::View(format @ (Format::Vpc | Format::Vmdk | Format::Qed | Format::Vdi)) => {
                match self.opened_revision(store, meta) {
                    Ok(r) => r.view(format).is_ok(),
                    Err(e) => matches!(e.errno(), libc::EACCES | libc::EPERM),
                }
            }
            FileKind::View(_) => true,
        }
    }
}
