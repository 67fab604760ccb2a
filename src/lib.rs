//! pcocc-imagefs: pcocc VM image repositories as a directory tree.
//!
//! Data flows one way: the CLI and the FUSE adapter call [`tree`], which owns the
//! repository semantics and reaches the on-disk repositories through [`store`] (configured
//! by [`config`]) and disk contents through [`view`] and [`image`].

pub mod image;
pub mod view;

#[cfg(test)]
#[allow(dead_code)] // shared by the tests of several modules; not all use every helper
pub(crate) mod testutil;
