//! pcocc-imagefs: pcocc VM image repositories as a directory tree.
//!
//! Data flows one way: the CLI and the FUSE adapter call [`tree`], which owns the
//! repository semantics and reaches the on-disk repositories through [`store`] (configured
//! by [`config`]) and disk contents through [`view`] and [`image`].

pub mod cli;
pub mod config;
pub mod fuse;
pub mod image;
pub mod store;
pub mod sys;
pub mod tree;
pub mod view;

// Helpers shared by every module's tests; each branch uses only some of them.
#[cfg(test)]
#[allow(dead_code)] // shared by the tests of several modules; not all use every helper
pub(crate) mod testutil;
