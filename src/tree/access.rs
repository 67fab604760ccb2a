//! Who may do what: the caller's identity, user names, and permission checks against
//! the repository directories' modes. Every tree call is carried out for a [`Caller`];
//! these checks mirror what the kernel would decide for that user on the repository
//! directory itself (owner, group, other bits; root passes), so a daemon serving several
//! users refuses what the user could not do directly. ACLs are not consulted.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::{Caller, Error};

/// Bits of a mode for read, write and search, for the owner class (shifted for others).
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

/// True when `caller` may access an object with metadata `m` for `want` (a mix of
/// [`R`], [`W`], [`X`]), by its mode bits.
pub fn permits(caller: &Caller, m: &std::fs::Metadata, want: u32) -> bool {
    if caller.uid == 0 {
        // Root passes, except that search needs some x bit on non-directories.
        return want & X == 0 || m.is_dir() || m.mode() & 0o111 != 0;
    }
    let mode = m.mode();
    let bits = if m.uid() == caller.uid {
        (mode >> 6) & 7
    } else if caller.in_group(m.gid()) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    bits & want == want
}

/// Fails with `PermissionDenied` unless `caller` may access `path` for `want`, and may
/// search every directory above it, as path resolution by the kernel requires: a
/// repository whose own directory is 0700 keeps its `meta/` private whatever the mode
/// of `meta/`.
pub fn check(caller: &Caller, path: &Path, want: u32) -> Result<(), Error> {
    let stat = |p: &Path| {
        std::fs::metadata(p).map_err(|source| crate::store::Error::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let m = stat(path)?;
    if !permits(caller, &m, want) {
        return Err(Error::PermissionDenied(path.display().to_string()));
    }
    if caller.uid != 0 {
        for dir in path
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
        {
            if !permits(caller, &stat(dir)?, X) {
                return Err(Error::PermissionDenied(path.display().to_string()));
            }
        }
    }
    Ok(())
}

/// `repo list`'s WRITABLE: `access(W_OK)` for this process, the mode check for anyone
/// else; `None` when the path does not exist.
pub fn writable(caller: &Caller, path: &Path) -> Option<bool> {
    let m = std::fs::metadata(path).ok()?;
    if *caller == current_caller() {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path; access only reads it.
        return Some(unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0);
    }
    Some(permits(caller, &m, W))
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
