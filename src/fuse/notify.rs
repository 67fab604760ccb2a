//! The kernel's name cache, told from a thread of its own which entries to drop.
//!
//! A notification travels on the session's channel to the kernel, and the kernel may
//! take locks for it that a request being served holds: sending from a request thread
//! could wait on itself. Requests only queue the names; this thread sends them.

use crate::tree::session::NameCache;
use fuser::{INodeNo, Notifier};
use std::ffi::OsStr;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Forwards "drop this cached name" messages to the kernel once the session (which owns
/// the channel to the kernel) exists.
#[derive(Debug, Default)]
pub struct Invalidator {
    tx: OnceLock<Mutex<Sender<(u64, String)>>>,
}

impl Invalidator {
    /// Starts forwarding through `notifier` (from `Session::notifier`).
    pub fn start(&self, notifier: Notifier) {
        let (tx, rx) = mpsc::channel::<(u64, String)>();
        if self.tx.set(Mutex::new(tx)).is_ok() {
            let spawned = std::thread::Builder::new()
                .name("inval".into())
                .spawn(move || {
                    for (parent, name) in rx {
                        // ENOENT means the kernel had nothing cached: fine.
                        let _ = notifier.inval_entry(INodeNo(parent), OsStr::new(&name));
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start the cache invalidation thread: {e}");
            }
        }
    }
}

/// The session's view of the kernel's name cache.
pub struct Names(pub Arc<Invalidator>);

impl NameCache for Names {
    fn invalidate(&self, parent: u64, name: &str) {
        if let Some(tx) = self.0.tx.get() {
            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send((parent, name.to_string()));
        }
    }
}
