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

use std::path::PathBuf;

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
    /// Free-form; `{}` for VM images.
    #[serde(default = "empty_object")]
    pub custom_meta: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
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

/// What [`Store::gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Hashes of the layers removed.
    pub layers_removed: Vec<String>,
    /// Unreferenced layers kept because they were added within the grace period (an
    /// import may be about to publish their metadata).
    pub layers_kept_fresh: Vec<String>,
    /// `.tmp/` entries removed.
    pub tmp_removed: Vec<PathBuf>,
    /// True when a version 1 repository was upgraded to version 2.
    pub upgraded: bool,
}

/// One open repository.
pub struct Store {
    name: String,
    root: PathBuf,
}
