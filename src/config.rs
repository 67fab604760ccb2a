//! Repository configuration: pcocc's `repos.yaml`, loaded exactly as pcocc loads it.
//!
//! The user file (`$PCOCC_USER_CONF_DIR/repos.yaml`, default `~/.pcocc/repos.yaml`) comes
//! first, then the system file (`$PCOCC_SYSTEM_CONF_DIR/repos.yaml`, default
//! `/etc/pcocc/repos.yaml`); the first repository is the default one. An explicit file
//! (`pcocc --config FILE`) replaces both, and when no file exists at all the built-in
//! default is pcocc's stock one, a repository `user` at `%{homedir}/.pcocc/images`.
//! This module knows nothing of what a repository holds; YAML parsing sits behind one
//! small function ([`parse_yaml`]) so the YAML crate can be swapped in one line.

use std::path::{Path, PathBuf};

/// Where a repository's definition came from (pcocc's "tag").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The user's `repos.yaml`.
    User,
    /// The system `repos.yaml`.
    System,
    /// A file given with `--config`.
    Explicit,
    /// The built-in default (no file found).
    Default,
}

/// One configured repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoConfig {
    /// The name used in URIs (`NAME:image`).
    pub name: String,
    /// The repository directory, with `%{…}` expanded.
    pub path: PathBuf,
    /// Which file defined it.
    pub origin: Origin,
}

/// The repositories in priority order; the first is the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub repos: Vec<RepoConfig>,
}

/// A configuration that cannot be used. The messages are pcocc's (they follow
/// `Unable to parse configuration file: `), with the file name added where pcocc omits it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Unable to parse configuration file: {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("Unable to parse configuration file: Duplicate repository: {0}")]
    Duplicate(String),
    #[error("Unable to parse configuration file: {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Unable to parse configuration file: {0}")]
    Expand(String),
}

impl Config {
    /// Loads the configuration the way `pcocc` does: `explicit` (from `--config`) if
    /// given, else the user file then the system file found through the environment,
    /// else the built-in default.
    pub fn load(explicit: Option<&Path>) -> Result<Config, Error> {
        let _ = explicit;
        todo!()
    }
}
