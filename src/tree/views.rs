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
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::{Error, FileKind, Format, Tree};
use crate::image::Disk;
use crate::image::chain::{WithinDir, open_chain};
use crate::store::{Meta, Store};
use crate::view::{View, ViewId};

/// Opened revisions kept at once. Each holds a few file descriptors and its layers'
/// table caches (bounded per layer), so a few hundred stay well within limits.
pub const REVISION_CACHE_ENTRIES: usize = 256;
/// `st_blocks` unit.
const BLOCK: u64 = 512;

/// What a disk file of a revision serves.
pub(super) enum Content {
    /// The stored layer file itself (`disk.qcow2` of a single-layer revision).
    Stored(PathBuf),
    /// A generated view.
    View(View),
}

/// One revision, opened: its disk and, built on first use, its views.
pub(super) struct OpenedRevision {
    disk: Arc<Disk>,
    id: ViewId,
    /// The only layer, when the revision is one standalone layer.
    single_layer: Option<PathBuf>,
    /// Views in [`Format::ALL`] order; a build error is kept as its message (a VHD that
    /// cannot hold the disk stays unable to).
    views: [OnceLock<Result<View, String>>; 6],
}

impl OpenedRevision {
    fn open(store: &Store, hashes: &[&str]) -> Result<OpenedRevision, Error> {
        let top = hashes
            .last()
            .ok_or_else(|| Error::Unreadable("revision has no layer".into()))?;
        let policy = WithinDir {
            root: store.data_dir(),
        };
        // Resolved and confined to data/ (backing names are, by the policy).
        let top_path = store.layer_file(top)?;
        let disk = Arc::new(open_chain(&top_path, &policy)?);
        let single_layer = (disk.layers().len() == 1).then_some(top_path);
        Ok(OpenedRevision {
            disk,
            id: view_id(hashes),
            single_layer,
            views: Default::default(),
        })
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
            (Some(path), Format::Qcow2) => Ok(Content::Stored(path.clone())),
            _ => Ok(Content::View(self.view(format)?.clone())),
        }
    }

    /// Exact size and 512-byte blocks of `disk.FMT`, from tables only.
    pub(super) fn size_and_blocks(&self, format: Format) -> Result<(u64, u64), Error> {
        match self.content(format)? {
            Content::Stored(path) => {
                let m = std::fs::metadata(&path)
                    .map_err(|source| Error::Store(crate::store::Error::Io { path, source }))?;
                Ok((m.len(), m.blocks()))
            }
            Content::View(v) => Ok((v.size(), v.allocated_bytes().div_ceil(BLOCK))),
        }
    }
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
    ) -> Result<Arc<OpenedRevision>, Error> {
        {
            let mut lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            lru.tick += 1;
            let tick = lru.tick;
            if let Some((used, rev)) = lru.map.get_mut(&key) {
                *used = tick;
                return Ok(rev.clone());
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
        Ok(entry.1.clone())
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
        let hashes = meta.layer_hashes().map_err(crate::store::Error::BadHash)?;
        let key = (
            store.name().to_string(),
            hashes.iter().map(|h| h.to_string()).collect(),
        );
        self.revisions
            .get_or_open(key, || OpenedRevision::open(store, &hashes))
    }

    /// True when revision `meta` has file `kind`: `meta.json` always; views when the
    /// revision has layers, `disk.vpc` only where VHD can hold the disk.
    pub(super) fn has_file(&self, store: &Store, meta: &Meta, kind: FileKind) -> bool {
        match kind {
            FileKind::MetaJson => true,
            FileKind::View(_) if meta.data_blobs.is_empty() => false,
            FileKind::View(Format::Vpc) => self
                .opened_revision(store, meta)
                .and_then(|r| r.view(Format::Vpc).map(|_| ()))
                .is_ok(),
            FileKind::View(_) => true,
        }
    }
}
