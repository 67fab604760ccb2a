//! One pcocc repository directory (pcocc on-disk format version 2; version 1 read).
//!
//! ```text
//! REPO/.config              "version: 2\n"
//! REPO/.tmp/                scratch: partial imports and metadata being published
//! REPO/data/XX/<sha256>     layers, mode 0444, named by the sha256 of their bytes
//! REPO/meta/<name>@<rev>    one JSON object per revision (v1: meta/XX/<sha256(name\nrev)>, YAML)
//! ```
//!
//! The store owns every byte written under a repository and the rules that keep it safe
//! when several hosts share it over NFS-like filesystems: layers are written under `.tmp/`,
//! synced and renamed into `data/`; metadata is published by `link(2)` from `.tmp/`, which
//! is atomic and never overwrites, so two writers of one `name@rev` give one winner. It
//! knows nothing of disk formats beyond "a layer is a file"; naming rules, URIs and
//! authorization live in [`crate::tree`].

pub(crate) mod fsutil;
mod gc;
mod json;
mod layers;
mod metacache;
mod v1;

pub use gc::GcReport;
pub use json::{python_float_repr, to_python_json};
pub use layers::{LayerTransfer, TmpFile, sha256_file, sha256_of, sparse_copy_hashing};

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::sys::{self, EntryType};
use fsutil::{Dir, io_err, py_os_error};

/// The metadata of one revision, as pcocc writes it. Field order is the on-disk key order
/// (pcocc's `json.dump` of its dict): name, revision, kind, owner, timestamp, data_blobs,
/// custom_meta.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub name: String,
    pub revision: u64,
    /// `vm` for VM images (pcocc also knows container kinds).
    pub kind: String,
    /// The user name of whoever published the revision.
    pub owner: String,
    /// Seconds since the epoch, as Python's `time.time()`.
    pub timestamp: f64,
    /// Layer hashes, base first, top last; entries may carry a `sha256:` prefix.
    pub data_blobs: Vec<String>,
    /// Free-form object; `{}` for VM images. A `null` (which pcocc's schema refuses,
    /// failing every listing of the repository) is read as `{}`, so it is never written
    /// back or copied; any other non-object makes the metadata bad, as in pcocc.
    #[serde(default = "empty_object", deserialize_with = "object_or_null")]
    pub custom_meta: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// `custom_meta`: an object, or `null` read as `{}`.
fn object_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    use serde::Deserialize;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(empty_object()),
        v @ serde_json::Value::Object(_) => Ok(v),
        other => Err(serde::de::Error::custom(format!(
            "custom_meta is not of type 'object': {other}"
        ))),
    }
}

/// Errors of the store. Messages are pcocc's where pcocc has one, and otherwise name the
/// file and say what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid repository parent directory {0}")]
    BadParent(PathBuf),
    #[error("Repository path {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("Bad repository config file {path} : {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("Unable to parse configuration file: Unsupported version for repository \"{0}\"")]
    UnsupportedVersion(String),
    /// A revision's metadata file exists but cannot be read as metadata.
    #[error("Bad metadata for {name}: {path}: {reason}")]
    BadMeta {
        name: String,
        path: PathBuf,
        reason: String,
    },
    /// Exclusive creation found the name taken.
    #[error("{path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("{path} does not exist")]
    NotFound { path: PathBuf },
    #[error("Only sha256 is supported currently ({0})")]
    BadHash(String),
    /// A copied layer's bytes do not hash to its name.
    #[error("layer {path} does not match its name: its sha256 is {actual}")]
    HashMismatch { path: PathBuf, actual: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `.config` of a repository this project creates or upgrades (pcocc's `yaml.safe_dump`).
const CONFIG_V2: &str = "version: 2\n";
/// The on-disk format versions pcocc knows: 1 (legacy, read) and 2 (current).
const VERSION_LEGACY: u32 = 1;
const VERSION_CURRENT: u32 = 2;
/// Optional prefix of `data_blobs` entries (pcocc's `_parse_hash_algorithm`).
const SHA256_PREFIX: &str = "sha256:";
/// Largest metadata file read. pcocc's are a few hundred bytes; container images keep an
/// OCI index in `custom_meta`, still far below this.
pub const MAX_META_BYTES: u64 = 16 << 20;
/// Largest `.config` read (it holds one line).
const MAX_CONFIG_BYTES: u64 = 64 << 10;
/// Length of a layer name: a sha256 in lowercase hex.
const HASH_HEX_LEN: usize = 64;

impl Meta {
    /// The layer hashes of `data_blobs`, base first, without any `sha256:` prefix. Each is
    /// checked to be 64 lowercase hex digits, since it becomes a path under `data/`.
    pub fn layer_hashes(&self) -> Result<Vec<&str>, String> {
        self.data_blobs.iter().map(|b| parse_blob(b)).collect()
    }

    /// The top layer's hash (the last of `data_blobs`), if any.
    pub fn top_layer(&self) -> Result<Option<&str>, String> {
        Ok(self.layer_hashes()?.last().copied())
    }

    /// The JSON pcocc writes for this revision (see [`to_python_json`]).
    pub fn to_json(&self) -> Vec<u8> {
        // Meta holds only strings, integers, a float and JSON values: it always
        // serializes.
        to_python_json(self).unwrap_or_default()
    }
}

/// Strips an optional `sha256:` prefix and checks the rest is a sha256 in lowercase hex.
pub fn parse_blob(blob: &str) -> Result<&str, String> {
    let hex = match blob.strip_prefix(SHA256_PREFIX) {
        Some(hex) => hex,
        None => match blob.split_once(':') {
            Some((algo, _)) => {
                return Err(format!("Only sha256 is supported currently ({algo})"));
            }
            None => blob,
        },
    };
    if is_hash(hex) {
        Ok(hex)
    } else {
        Err(format!(
            "bad layer name {blob:?}: not a sha256 in lowercase hex"
        ))
    }
}

/// True for a 64-digit lowercase hex string, the only thing allowed as a layer name.
pub fn is_hash(s: &str) -> bool {
    s.len() == HASH_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True for a name pcocc accepts for an image: `[a-zA-Z0-9_.-]+`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Image names mapped to their revision numbers (ascending).
pub type Listing = BTreeMap<String, Vec<u64>>;

/// One open repository.
#[derive(Debug)]
pub struct Store {
    name: String,
    root: PathBuf,
    /// 1 or 2; becomes 2 when this process upgrades the repository.
    version: AtomicU32,
    /// The last listing of `meta/`, reused while that directory is unchanged.
    listing: Mutex<Option<CachedListing>>,
    /// Parsed metadata, checked against its file on each use.
    metas: metacache::MetaCache,
}

/// A listing of `meta/` and what `meta/` looked like when it was made.
#[derive(Debug)]
struct CachedListing {
    /// `meta/`'s modification and change times: any entry added, removed or renamed
    /// changes them.
    stamp: (SystemTime, SystemTime),
    /// When it was made: even an unchanged stamp is trusted only this long, for
    /// filesystems whose directory times are coarse (NFS servers with second
    /// granularity).
    made: Instant,
    listing: Arc<Listing>,
}

/// Drops the cached listing when created and again when dropped: held by every method
/// that changes `meta/`, so this process always sees its own changes at once.
pub(crate) struct ChangingMeta<'a>(&'a Mutex<Option<CachedListing>>);

impl Drop for ChangingMeta<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// How long a listing of `meta/` may be reused while `meta/` looks unchanged. Listing
/// every revision of a repository for each image (`ls -l` of a repository calls getattr
/// on each) would make listings quadratic.
const LISTING_REUSE: Duration = Duration::from_millis(500);

impl Store {
    /// Opens the repository `name` at `root`, creating it (with `data/`, `meta/`, `.tmp/`
    /// and `.config`) when the path does not exist, as pcocc does on first use. Errors as
    /// pcocc: a missing parent, a path that is not a directory, a missing or unreadable
    /// `.config`, a version other than 1 or 2.
    pub fn open(name: &str, root: &Path) -> Result<Store, Error> {
        match fs::metadata(root) {
            Ok(m) if !m.is_dir() => return Err(Error::NotADirectory(root.to_path_buf())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_repo(root)?,
            Err(source) => return Err(io_err(root, source)),
        }
        let config = root.join(".config");
        let bad_config = |reason: String| Error::BadConfig {
            reason,
            path: config.clone(),
        };
        let dir = sys::open_dir_path(root)
            .map(|fd| Dir {
                fd,
                path: root.to_path_buf(),
            })
            .map_err(|e| bad_config(py_os_error(&e, &config)))?;
        let text = match dir.open_regular(".config") {
            Ok((f, m)) => fsutil::read_bounded_file(f, &m, MAX_CONFIG_BYTES)
                .and_then(|b| {
                    String::from_utf8(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                })
                .map_err(|e| bad_config(py_os_error(&e, &config)))?,
            Err(Error::Io { source, .. }) => return Err(bad_config(py_os_error(&source, &config))),
            Err(e) => return Err(e),
        };
        let version = parse_config_version(&text).map_err(|reason| Error::BadConfig {
            path: config.clone(),
            reason,
        })?;
        if version != VERSION_LEGACY && version != VERSION_CURRENT {
            return Err(Error::UnsupportedVersion(name.to_string()));
        }
        if version == VERSION_LEGACY {
            log::info!(
                "repository {name} at {} uses the version 1 format",
                root.display()
            );
        }
        let store = Store {
            name: name.to_string(),
            root: root.to_path_buf(),
            version: AtomicU32::new(version),
            listing: Mutex::new(None),
            metas: metacache::MetaCache::default(),
        };
        // A repository copied without its empty directories still works; a read-only
        // one must still open, so failures here are not errors.
        for sub in ["data", "meta", ".tmp"] {
            let _ = dir.make_dir(sub);
        }
        Ok(store)
    }

    /// The repository's name in the configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The repository directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The on-disk format version (1 or 2).
    pub fn version(&self) -> u32 {
        self.version.load(Ordering::Acquire)
    }

    pub fn meta_dir(&self) -> PathBuf {
        self.root.join("meta")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// The repository directory, opened now with the calling thread's identity (the
    /// configured path may hold symlinks; nothing below it is followed).
    pub(crate) fn root_dir(&self) -> Result<Dir, Error> {
        let fd = sys::open_dir_path(&self.root).map_err(|e| io_err(&self.root, e))?;
        Ok(Dir {
            fd,
            path: self.root.clone(),
        })
    }

    /// `meta/`, `data/` or `.tmp/`, opened now (see [`Store::root_dir`]).
    pub(crate) fn dir(&self, sub: &str) -> Result<Dir, Error> {
        self.root_dir()?.subdir(sub)
    }

    /// The metadata of `meta/` (the directory itself), reached without following
    /// symlinks.
    pub fn meta_dir_metadata(&self) -> Result<fs::Metadata, Error> {
        let root = self.root_dir()?;
        root.stat("meta").map_err(|e| io_err(&root.show("meta"), e))
    }

    /// Where the metadata of `name@rev` lives, relative to `meta/`.
    fn meta_rel(&self, name: &str, rev: u64) -> PathBuf {
        if self.version() == VERSION_LEGACY {
            v1::meta_rel(name, rev)
        } else {
            PathBuf::from(format!("{name}@{rev}"))
        }
    }

    /// The metadata file of `name@rev` (whether or not it exists), in this repository's
    /// format, for messages. `name` must be a valid image name.
    pub fn meta_path(&self, name: &str, rev: u64) -> PathBuf {
        self.meta_dir().join(self.meta_rel(name, rev))
    }

    /// Where layer `hash` lives, relative to `data/`.
    fn layer_rel(hash: &str) -> PathBuf {
        let prefix = hash.get(..2).unwrap_or("__");
        PathBuf::from(prefix).join(hash)
    }

    /// The file of layer `hash` (a bare sha256 hex, see [`parse_blob`]), for messages.
    pub fn layer_path(&self, hash: &str) -> PathBuf {
        self.data_dir().join(Self::layer_rel(hash))
    }

    /// Opens layer `hash` for reading with the calling thread's identity: a regular file
    /// reached from the repository without following any symlink (anyone who may write
    /// to a repository can put one there, as a layer or as a `data/XX/` directory). The
    /// descriptor is what gets read from then on, never the name again.
    pub fn open_layer(&self, hash: &str) -> Result<(File, fs::Metadata), Error> {
        self.open_layer_in(&self.dir("data")?, hash)
    }

    /// [`Store::open_layer`] from this repository's `data/`, already open as `data`
    /// (for callers that open several layers).
    pub(crate) fn open_layer_in(
        &self,
        data: &Dir,
        hash: &str,
    ) -> Result<(File, fs::Metadata), Error> {
        if !is_hash(hash) {
            return Err(Error::BadHash(hash.to_string()));
        }
        data.open_regular(Self::layer_rel(hash))
    }

    /// True when this repository holds layer `hash`.
    pub fn has_layer(&self, hash: &str) -> bool {
        is_hash(hash) && self.dir("data").is_ok_and(|d| d.has(Self::layer_rel(hash)))
    }

    /// Every image and its revisions. For version 2 this reads only file names in
    /// `meta/`; a file whose name is not `NAME@REV` is skipped with a warning.
    pub fn list(&self) -> Result<Listing, Error> {
        Ok(Listing::clone(&*self.shared_listing()?))
    }

    /// The listing of `meta/`, shared with the cache rather than copied: lookups of one
    /// image's revisions must not copy every image's.
    fn shared_listing(&self) -> Result<Arc<Listing>, Error> {
        // Opened for reading with the caller's identity before anything cached is
        // handed out: a listing made for one user is shown only to those who may read
        // `meta/` themselves.
        let meta = self.dir("meta")?;
        sys::access_at(meta.fd(), OsStr::new("."), libc::R_OK)
            .map_err(|e| io_err(&meta.path, e))?;
        let stamp = meta
            .stat(".")
            .ok()
            .and_then(|m| Some((m.modified().ok()?, fsutil::ctime(&m))));
        let mut cache = self.listing.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(c), Some(stamp)) = (cache.as_ref(), stamp)
            && c.stamp == stamp
            && c.made.elapsed() < LISTING_REUSE
        {
            return Ok(c.listing.clone());
        }
        let listing = Arc::new(self.list_uncached(&meta)?);
        *cache = stamp.map(|stamp| CachedListing {
            stamp,
            made: Instant::now(),
            listing: listing.clone(),
        });
        Ok(listing)
    }

    /// Marks the start of a change to `meta/` (see [`ChangingMeta`]).
    pub(crate) fn changing_meta(&self) -> ChangingMeta<'_> {
        *self.listing.lock().unwrap_or_else(|e| e.into_inner()) = None;
        ChangingMeta(&self.listing)
    }

    /// Reads `meta/` (every file, for version 1). Only regular files count: a FIFO,
    /// socket, device, directory or symlink named like metadata is skipped with a
    /// warning, so that nothing a repository writer places there can block a listing.
    fn list_uncached(&self, meta: &Dir) -> Result<Listing, Error> {
        if self.version() == VERSION_LEGACY {
            return Ok(v1::read_all(meta)?
                .into_iter()
                .fold(Listing::new(), |mut l, (_, m)| {
                    l.entry(m.name.clone()).or_default().push(m.revision);
                    l
                })
                .into_iter()
                .map(|(n, mut revs)| {
                    revs.sort_unstable();
                    revs.dedup();
                    (n, revs)
                })
                .collect());
        }
        let mut listing = Listing::new();
        for (file, kind) in sys::read_dir(meta.fd()).map_err(|e| io_err(&meta.path, e))? {
            let Some((name, rev)) = file.to_str().and_then(parse_meta_file_name) else {
                log::warn!(
                    "repository {}: skipping {}: not a NAME@REVISION metadata file",
                    self.name,
                    meta.show(&file).display()
                );
                continue;
            };
            let regular = match kind {
                EntryType::File => true,
                EntryType::Unknown => meta.open_regular(&file).is_ok(),
                _ => false,
            };
            if !regular {
                log::warn!(
                    "repository {}: skipping {}: not a regular file",
                    self.name,
                    meta.show(&file).display()
                );
                continue;
            }
            listing.entry(name.to_string()).or_default().push(rev);
        }
        for revs in listing.values_mut() {
            revs.sort_unstable();
        }
        Ok(listing)
    }

    /// The revisions of image `name`, ascending; empty when it does not exist.
    pub fn revisions(&self, name: &str) -> Result<Vec<u64>, Error> {
        if !is_valid_name(name) {
            return Ok(Vec::new());
        }
        // Revision numbers are only known from file names, so this reads the directory
        // (pcocc globs it too); version 1 has to parse every file.
        Ok(self
            .shared_listing()?
            .get(name)
            .cloned()
            .unwrap_or_default())
    }

    /// The metadata of `name@rev`: `Ok(None)` when it does not exist, an error naming
    /// the file when it exists but is not valid metadata (bad JSON/YAML, a missing key,
    /// a layer name that is not a sha256).
    pub fn read_meta(&self, name: &str, rev: u64) -> Result<Option<Meta>, Error> {
        Ok(self.load_meta(name, rev)?.map(|(_, meta)| meta))
    }

    /// [`Store::read_meta`] through the cache of parsed metadata: a file parsed before
    /// and unchanged since (same inode, size and times) is not read again. Cached
    /// metadata is handed only to callers who opened that very file for reading
    /// themselves (with the calling thread's identity, judged by the kernel); for one
    /// who did, reaching the file (search rights on the way) and finding it unchanged is
    /// enough. For the filesystem's attribute paths, which ask for the same revisions
    /// over and over; gc and the CLI read files afresh.
    pub fn read_meta_cached(&self, name: &str, rev: u64) -> Result<Option<Arc<Meta>>, Error> {
        if !is_valid_name(name) {
            return Ok(None);
        }
        let me = sys::Identity::of_thread();
        // Reached as the caller (search rights on the way), not opened: enough for one
        // who has opened this very file before.
        let meta_dir = self.dir("meta")?;
        match meta_dir.stat(self.meta_rel(name, rev)) {
            Ok(m) => {
                if let Some(meta) = self.metas.get(name, rev, metacache::FileId::of(&m), &me) {
                    return Ok(Some(meta));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(_) => {}
        }
        let Some((file, m)) = self.open_meta_in(&meta_dir, name, rev)? else {
            return Ok(None);
        };
        let id = metacache::FileId::of(&m);
        if let Some(meta) = self.metas.get_opened(name, rev, id, &me) {
            return Ok(Some(meta));
        }
        let meta = Arc::new(self.parse_meta(name, rev, file, &m)?);
        self.metas.insert(name, rev, id, meta.clone(), me);
        Ok(Some(meta))
    }

    /// What tells the metadata file of `name@rev` from any other that stood or will
    /// stand under its name (its device, inode, size and times), not read: `Ok(None)`
    /// when there is none. A revision deleted and made again (another host's `pcocc
    /// image delete` and `import`) has another.
    pub fn meta_stamp(&self, name: &str, rev: u64) -> io::Result<Option<u64>> {
        use std::hash::{Hash, Hasher};
        if !is_valid_name(name) {
            return Ok(None);
        }
        let meta_dir = self.dir("meta").map_err(io::Error::other)?;
        match meta_dir.stat(self.meta_rel(name, rev)) {
            Ok(m) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                metacache::FileId::of(&m).hash(&mut h);
                Ok(Some(h.finish()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// True when `name@rev` has a metadata file (a regular file; not read).
    pub fn has_revision(&self, name: &str, rev: u64) -> bool {
        is_valid_name(name) && matches!(self.open_meta(name, rev), Ok(Some(_)))
    }

    /// The metadata of the metadata file of `name@rev` (its owner, times).
    pub fn revision_file_metadata(&self, name: &str, rev: u64) -> Option<fs::Metadata> {
        if !is_valid_name(name) {
            return None;
        }
        self.open_meta(name, rev).ok().flatten().map(|(_, m)| m)
    }

    /// Opens the metadata file of `name@rev` (a regular file, no symlink followed);
    /// `None` when it does not exist.
    fn open_meta(&self, name: &str, rev: u64) -> Result<Option<(File, fs::Metadata)>, Error> {
        self.open_meta_in(&self.dir("meta")?, name, rev)
    }

    /// [`Store::open_meta`] from `meta/`, already open as `meta`.
    fn open_meta_in(
        &self,
        meta: &Dir,
        name: &str,
        rev: u64,
    ) -> Result<Option<(File, fs::Metadata)>, Error> {
        match meta.open_regular(self.meta_rel(name, rev)) {
            Ok(opened) => Ok(Some(opened)),
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Metadata files this store has opened and parsed (each [`Store::read_meta`], and
    /// each [`Store::read_meta_cached`] that missed), for tests and statistics.
    pub fn meta_files_read(&self) -> u64 {
        self.metas.files_read()
    }

    /// Starts reading the metadata of `revs` into the cache in the background, several
    /// files at once (see `metacache`), so that a listing's attributes do not wait for
    /// one disk round trip per revision. Returns at once, with the threads started
    /// (join them to wait; dropping them lets them run on). A no-op for what is cached;
    /// fewer threads, or none, while other read-aheads of this repository run.
    pub fn prefetch_meta(
        self: &Arc<Self>,
        revs: Vec<(String, u64)>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        let mut todo: Vec<(String, u64)> = revs
            .into_iter()
            .filter(|(n, r)| is_valid_name(n) && !self.metas.contains(n, *r))
            .collect();
        todo.truncate(metacache::MAX_PREFETCH);
        let mut started = Vec::new();
        if todo.len() < 2 {
            return started;
        }
        let slots = self
            .metas
            .claim_prefetch_threads(metacache::PREFETCH_THREADS.min(todo.len()));
        let threads = slots.len();
        let todo = Arc::new(todo);
        // The threads read with the identity of the request that started them.
        let identity = sys::Identity::of_thread();
        for (t, slot) in slots.into_iter().enumerate() {
            let (store, todo, identity) = (self.clone(), todo.clone(), identity.clone());
            let spawned = std::thread::Builder::new()
                .name("meta-prefetch".into())
                .spawn(move || {
                    let share = || todo.iter().skip(t).step_by(threads);
                    // Queue every read first, so the disk sees them together; then parse.
                    let _as = match identity.assume() {
                        Ok(g) => g,
                        Err(e) => {
                            log::warn!("metadata read-ahead: {e}");
                            return;
                        }
                    };
                    for (name, rev) in share() {
                        if let Ok(Some((f, _))) = store.open_meta(name, *rev) {
                            crate::image::advise_willneed(&f, 0, 0);
                        }
                    }
                    for (name, rev) in share() {
                        // Errors are reported to whoever asks for that revision.
                        let _ = store.read_meta_cached(name, *rev);
                    }
                    drop(slot);
                });
            match spawned {
                Ok(h) => started.push(h),
                Err(e) => log::warn!(
                    "repository {}: cannot start a metadata read-ahead thread: {e}",
                    self.name
                ),
            }
        }
        started
    }

    /// Reads and parses the metadata file of `name@rev`, with the identity of the file
    /// read.
    fn load_meta(&self, name: &str, rev: u64) -> Result<Option<(metacache::FileId, Meta)>, Error> {
        if !is_valid_name(name) {
            return Ok(None);
        }
        let Some((file, m)) = self.open_meta(name, rev)? else {
            return Ok(None);
        };
        let meta = self.parse_meta(name, rev, file, &m)?;
        Ok(Some((metacache::FileId::of(&m), meta)))
    }

    /// Reads and parses the open metadata file of `name@rev`.
    fn parse_meta(
        &self,
        name: &str,
        rev: u64,
        file: File,
        m: &fs::Metadata,
    ) -> Result<Meta, Error> {
        let path = self.meta_path(name, rev);
        let bytes =
            fsutil::read_bounded_file(file, m, MAX_META_BYTES).map_err(|e| io_err(&path, e))?;
        self.metas.count_read();
        let parsed = if self.version() == VERSION_LEGACY {
            v1::parse(&bytes)
        } else {
            serde_json::from_slice::<Meta>(&bytes).map_err(|e| e.to_string())
        };
        let meta = parsed
            .and_then(|m| m.layer_hashes().map(|_| ()).map(|()| m))
            .map_err(|reason| Error::BadMeta {
                name: name.to_string(),
                path: path.clone(),
                reason,
            })?;
        if meta.name != name || meta.revision != rev {
            log::warn!(
                "{}: holds {}@{}, expected {name}@{rev}",
                path.display(),
                meta.name,
                meta.revision
            );
        }
        Ok(meta)
    }

    /// Number of images (names with at least one revision), from the shared listing.
    pub fn image_count(&self) -> Result<usize, Error> {
        Ok(self.shared_listing()?.len())
    }

    /// Publishes `meta` as `meta.name@meta.revision`, exclusively: the file is written and
    /// synced under `.tmp/`, then hard-linked into `meta/`, which is atomic and fails if
    /// the name exists, also when another process or host races for it (the classic
    /// NFS-safe exclusive create). A version 1 repository is upgraded first.
    pub fn put_meta(&self, meta: &Meta) -> Result<(), Error> {
        let _changing = self.changing_meta();
        if !is_valid_name(&meta.name) {
            return Err(Error::BadMeta {
                name: meta.name.clone(),
                path: self.meta_dir(),
                reason: "invalid image name".to_string(),
            });
        }
        if let Err(reason) = meta.layer_hashes() {
            return Err(Error::BadHash(reason));
        }
        if self.version() == VERSION_LEGACY {
            self.upgrade()?;
        }
        let root = self.root_dir()?;
        let name = format!("{}@{}", meta.name, meta.revision);
        fsutil::publish_exclusive(
            &root.subdir(".tmp")?,
            &root.subdir("meta")?,
            &name,
            &meta.to_json(),
        )
    }

    /// Removes the metadata of `name@rev` (never a layer).
    pub fn delete_revision(&self, name: &str, rev: u64) -> Result<(), Error> {
        let _changing = self.changing_meta();
        let path = self.meta_path(name, rev);
        if !is_valid_name(name) {
            return Err(Error::NotFound { path });
        }
        let rel = self.meta_rel(name, rev);
        let (Some(parent), Some(file)) = (rel.parent(), rel.file_name()) else {
            return Err(Error::NotFound { path });
        };
        let meta = self.dir("meta")?;
        let dir = if parent.as_os_str().is_empty() {
            meta
        } else {
            meta.subdir(parent)?
        };
        match sys::unlink_at(dir.fd(), file, false) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound { path });
            }
            Err(e) => return Err(io_err(&path, e)),
        }
        fsutil::sync_dir(dir.fd(), &dir.path)
    }

    /// Removes every revision of `name`; returns the revisions removed (empty when the
    /// image did not exist). A revision already removed by someone else is not an error.
    pub fn delete_image(&self, name: &str) -> Result<Vec<u64>, Error> {
        let _changing = self.changing_meta();
        let mut done = Vec::new();
        for rev in self.revisions(name)? {
            match self.delete_revision(name, rev) {
                Ok(()) => done.push(rev),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Renames image `old` to `new`, every revision keeping its number, owner and
    /// timestamp. New names are created exclusively first, then the old ones removed;
    /// if `new` exists (or appears meanwhile), nothing changes and the error is
    /// [`Error::AlreadyExists`].
    pub fn rename_image(&self, old: &str, new: &str) -> Result<(), Error> {
        let _changing = self.changing_meta();
        let revs = self.revisions(old)?;
        if revs.is_empty() {
            return Err(Error::NotFound {
                path: self.meta_dir().join(old),
            });
        }
        if let Some(&rev) = self.revisions(new)?.first() {
            return Err(Error::AlreadyExists {
                path: self.meta_path(new, rev),
            });
        }
        let mut metas = Vec::with_capacity(revs.len());
        for &rev in &revs {
            let mut m = self.read_meta(old, rev)?.ok_or_else(|| Error::NotFound {
                path: self.meta_path(old, rev),
            })?;
            m.name = new.to_string();
            m.revision = rev;
            metas.push(m);
        }
        let mut created = Vec::new();
        for m in &metas {
            if let Err(e) = self.put_meta(m) {
                for &rev in &created {
                    let _ = self.delete_revision(new, rev);
                }
                return Err(e);
            }
            created.push(m.revision);
        }
        for (i, &rev) in revs.iter().enumerate() {
            match self.delete_revision(old, rev) {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => {
                    // Refused before anything of `old` went (the sticky bit of a shared
                    // repository, say): the copies made are taken back, so nothing
                    // changed. Later, `old` is partly gone and `new` is kept whole.
                    if i == 0 {
                        for &rev in &created {
                            let _ = self.delete_revision(new, rev);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// `NAME@REV` → (name, rev) when both parts are valid.
fn parse_meta_file_name(file: &str) -> Option<(&str, u64)> {
    let (name, rev) = file.split_once('@')?;
    if !is_valid_name(name) || rev.is_empty() || !rev.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rev: u64 = rev.parse().ok()?;
    // Only the canonical spelling (`x@0`, never `x@00`) is the file of that revision.
    (format!("{rev}") == file[name.len() + 1..]).then_some((name, rev))
}

/// The `version` of a `.config` (`version: N`).
fn parse_config_version(text: &str) -> Result<u32, String> {
    let v: serde_yaml::Value = crate::config::parse_yaml(text)?;
    v.get("version")
        .and_then(serde_yaml::Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| "no version number".to_string())
}

/// Creates a new version 2 repository at `root`, whose parent must exist.
fn create_repo(root: &Path) -> Result<(), Error> {
    let parent = root.parent().unwrap_or(Path::new(""));
    let parent_ok = parent.as_os_str().is_empty() || fs::metadata(parent).is_ok_and(|m| m.is_dir());
    if !parent_ok {
        return Err(Error::BadParent(parent.to_path_buf()));
    }
    match fs::create_dir(root) {
        Ok(()) => {}
        // Another process creating the same repository at the same time.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(root, e)),
    }
    let dir = Dir {
        fd: sys::open_dir_path(root).map_err(|e| io_err(root, e))?,
        path: root.to_path_buf(),
    };
    for sub in ["data", "meta", ".tmp"] {
        dir.make_dir(sub)?;
    }
    // Published like metadata so that nobody ever reads a half-written `.config`.
    match fsutil::publish_exclusive(&dir.subdir(".tmp")?, &dir, ".config", CONFIG_V2.as_bytes()) {
        Ok(()) | Err(Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(fd) = sys::open_dir_path(parent)
    {
        let _ = sys::sync_dir(fd.as_fd());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
