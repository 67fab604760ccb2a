//! Who may do what: the caller's identity, user names, and the early permission checks
//! that let an operation fail with pcocc's message before any work is done. The checks
//! are the kernel's own (`faccessat2` with the caller's filesystem identity, so ACLs
//! count), and they only decide how soon a refusal comes: every access that follows is
//! made with the caller's identity and judged again by the kernel at the moment of use.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::{Caller, Error};

/// Bits of a mode for read, write and search (`R_OK`, `W_OK`, `X_OK`).
pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;
/// Bound of the owner-name cache (names seen in metadata): cleared when full.
const USER_CACHE_MAX: usize = 4096;
/// Buffer for getpw*_r; glibc suggests sysconf(_SC_GETPW_R_SIZE_MAX), typically 1024.
const PW_BUF: usize = 16384;

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
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; PW_BUF];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes only into `pwd` and `buf`, which outlive the reads below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return uid.to_string();
    }
    // SAFETY: on success pw_name points into `buf`, NUL-terminated.
    unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned()
}

/// uid and primary gid of the user `name`, if such a user exists.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; PW_BUF];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in `user_name`.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some((pwd.pw_uid, pwd.pw_gid))
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
        let found = lookup_user(name);
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= USER_CACHE_MAX {
                map.clear();
            }
            map.insert(name.to_string(), found);
        }
        found
    }
}
