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

/// Whether every user may search every directory from `/` down to `meta_dir` and read
/// and search `meta_dir` itself (what [`check`] with `R | X` asks of a repository's
/// `meta/`), told from mode bits alone: each class (owner, group, other) has the bits,
/// and no directory carries an ACL. `false` when that cannot be told. A mount shared
/// by every user (`allow_other`) lets the kernel keep a name under a repository for
/// all users only when this holds (see `Session::ttl`).
pub fn open_to_all(meta_dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    const ALL_SEARCH: u32 = 0o111;
    const ALL_READ_SEARCH: u32 = 0o555;
    let Ok(real) = std::fs::canonicalize(meta_dir) else {
        return false;
    };
    real.ancestors().enumerate().all(|(i, dir)| {
        let want = if i == 0 { ALL_READ_SEARCH } else { ALL_SEARCH };
        std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & want == want)
            && !crate::sys::has_access_acl(dir)
    })
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

#[cfg(test)]
mod tests {
    use super::open_to_all;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A repository every user may read is one whose `meta/` every class of users may
    /// read and search, on a path every class may search, with no ACL on the way.
    #[test]
    fn a_repository_is_open_to_all_only_when_every_class_may_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("repo/meta");
        std::fs::create_dir_all(&meta).unwrap();
        for p in [dir.path(), &dir.path().join("repo"), &meta] {
            chmod(p, 0o755);
        }
        assert!(open_to_all(&meta));
        chmod(&dir.path().join("repo"), 0o700);
        assert!(!open_to_all(&meta), "a 0700 repository");
        chmod(&dir.path().join("repo"), 0o755);
        chmod(&meta, 0o750);
        assert!(!open_to_all(&meta), "a meta/ others may not read");
        chmod(&meta, 0o755);
        let acl = std::process::Command::new("setfacl")
            .args(["-m", "u:65534:---"])
            .arg(&meta)
            .status();
        if acl.is_ok_and(|s| s.success()) {
            assert!(!open_to_all(&meta), "an ACL on meta/");
        } else {
            crate::testutil::skip("setfacl cannot set an ACL here");
        }
        assert!(!open_to_all(&dir.path().join("missing")));
    }
}
