//! FUSE passthrough: the kernel reads a stored layer served verbatim straight from its
//! file. The kernel accepts only one backing file per inode at a time, so every
//! passthrough open of an inode shares one backing id, closed when the last of them is
//! released.

use fuser::{BackingId, ReplyOpen};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Table {
    /// Inode → (backing id, open handles using it).
    by_inode: HashMap<u64, (Arc<BackingId>, usize)>,
    /// Handle → inode, for `release`.
    by_handle: HashMap<u64, u64>,
}

/// The backing files registered with the kernel.
#[derive(Default)]
pub struct Backings {
    table: Mutex<Table>,
}

impl Backings {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backing id the kernel reads inode `ino` through for handle `fh`, registering
    /// `file` when no open of the inode holds one. `None` (serve the reads ourselves)
    /// when the kernel refuses, for example without `CAP_SYS_ADMIN`.
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        file: &std::fs::File,
        reply: &ReplyOpen,
    ) -> Option<Arc<BackingId>> {
        let mut t = self.lock();
        let id = match t.by_inode.get_mut(&ino) {
            Some((id, users)) => {
                *users += 1;
                id.clone()
            }
            None => match reply.open_backing(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    t.by_inode.insert(ino, (id.clone(), 1));
                    id
                }
                Err(e) => {
                    log::debug!("passthrough refused, serving reads: {e}");
                    return None;
                }
            },
        };
        t.by_handle.insert(fh, ino);
        Some(id)
    }

    /// Handle `fh` is released: one user less of its inode's backing id, which is closed
    /// with the last.
    pub fn release(&self, fh: u64) {
        let mut t = self.lock();
        let Some(ino) = t.by_handle.remove(&fh) else {
            return;
        };
        if let Some((_, users)) = t.by_inode.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                t.by_inode.remove(&ino);
            }
        }
    }
}
