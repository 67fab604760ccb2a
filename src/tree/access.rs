//! Who may do what: the caller's identity, user names, and the early permission checks
//! that let an operation fail with pcocc's message before any work is done. The checks
//! are the kernel's own (`faccessat2` with the caller's filesystem identity, so ACLs
//! count), and they only decide how soon a refusal comes: every access that follows is
//! made with the caller's identity and judged again by the kernel at the moment of use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::{Caller, Error};

/// Bits of a mode for read, write and search (`R_OK`, `W_OK`, `X_OK`).
pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;
/// Bound of the owner-name cache (names seen in metadata): cleared when full.
const USER_CACHE_MAX: usize = 4096;

pub fn current_caller() -> Caller {
    static CURRENT: OnceLock<Caller> = OnceLock::new();
    CURRENT.get_or_init(Caller::current_uncached).clone()
}

/// Fails with `PermissionDenied` unless `caller` may access `path` for `want` (a mix of
/// [`R`], [`W`], [`X`]), as the kernel judges it for them, path resolution included.
pub fn check(caller: &Caller, path: &Path, want: u32) -> Result<(), Error> {
    let _as = caller.act()?;
    match crate::sys::access_path(path, want as libc::c_int) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            Err(Error::PermissionDenied(path.display().to_string()))
        }
        Err(source) => Err(crate::store::Error::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// `repo list`'s WRITABLE: whether `caller` may write to `path`, as the kernel judges
/// it; `None` when the path does not exist.
pub fn writable(caller: &Caller, path: &Path) -> Option<bool> {
    std::fs::metadata(path).ok()?;
    Some(check(caller, path, W).is_ok())
}

/// The user name of `uid` (what pcocc records as `owner`), or the number when the user
/// has no passwd entry.
pub fn user_name(uid: u32) -> String {
    crate::sys::user_name(uid).unwrap_or_else(|| uid.to_string())
}

/// Owner names of revisions resolved to (uid, gid), remembered because `stat` of every
/// file in a revision asks again.
#[derive(Default)]
pub struct UserCache {
    map: Mutex<HashMap<String, Option<(u32, u32)>>>,
}

impl UserCache {
    pub fn get(&self, name: &str) -> Option<(u32, u32)> {
        if let Some(hit) = self.map.lock().ok().and_then(|m| m.get(name).copied()) {
            return hit;
        }
        let found = crate::sys::user_by_name(name);
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= USER_CACHE_MAX {
                map.clear();
            }
            map.insert(name.to_string(), found);
        }
        found
    }
}
