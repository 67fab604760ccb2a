//! Who is calling: a FUSE request carries the caller's uid, gid and pid; the
//! supplementary groups come from `/proc/PID/status` (the kernel does not send them).

use crate::tree::Caller;
use crate::tree::session::{Closing, Holders};

/// A request's caller, with the serving thread acting as them (see [`Caller::act`])
/// until this value is dropped.
pub struct Acting {
    caller: Caller,
    _guard: crate::sys::ActingAs,
}

impl Acting {
    pub fn new(caller: Caller) -> Result<Acting, crate::tree::Error> {
        let guard = caller.act()?;
        Ok(Acting {
            caller,
            _guard: guard,
        })
    }
}

impl std::ops::Deref for Acting {
    type Target = Caller;

    fn deref(&self) -> &Caller {
        &self.caller
    }
}

/// The identity of the process that made a request. Root's supplementary groups are
/// not read: every permission check passes root on its uid alone, and reading
/// `/proc/PID/status` for each request was the largest cost of a request like
/// `getxattr` that `ls -l` makes three times per entry.
pub fn from_request(uid: u32, gid: u32, pid: u32) -> Caller {
    Caller {
        uid,
        gid,
        groups: if pid == 0 || uid == ROOT_UID {
            Vec::new()
        } else {
            groups_of(pid)
        },
    }
}

/// The superuser's uid.
const ROOT_UID: u32 = 0;

/// Supplementary groups of process `pid`, empty when it is gone or unreadable (the
/// caller then has its primary group only, which can only deny, never grant, more).
fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
}

/// Field of `/proc/PID/stat` holding the exit code of an exiting task (proc(5), field
/// 52, since Linux 3.5), counted from the state field that follows the command name.
const STAT_EXIT_CODE_FROM_STATE: usize = 52 - 3;
/// Low bits of an exit code that hold the terminating signal (wait(2)'s WTERMSIG).
const EXIT_SIGNAL_MASK: i64 = 0x7f;

/// True when thread `tid` is exiting because a signal killed it. Its files are then
/// being closed by the kernel, not by the program: a file it was writing is incomplete.
/// The kernel records the exit code before closing the files of a dying task, and shows
/// it to whoever may trace it (the daemon as root, or as the same user); otherwise it
/// reads as 0 and the close counts as a normal one.
pub fn killed_by_signal(tid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{tid}/stat")) else {
        return false;
    };
    parse_exit_signal(&stat).is_some_and(|sig| sig != 0)
}

/// The terminating signal recorded in a `/proc/PID/stat` line (0 when none).
fn parse_exit_signal(stat: &str) -> Option<i64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let code: i64 = rest
        .split_whitespace()
        .nth(STAT_EXIT_CODE_FROM_STATE)?
        .parse()
        .ok()?;
    Some(code & EXIT_SIGNAL_MASK)
}

/// This mount as `/proc` shows it, to recognise its files among a process's
/// descriptors and mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountIds {
    /// The mountpoint, as descriptors' links start with it.
    pub path: std::path::PathBuf,
    /// Its mount id (`mnt_id` of `/proc/PID/fdinfo/N`).
    pub mnt_id: u64,
    /// Its device, `MAJOR:MINOR` in hex as `/proc/PID/maps` prints it.
    pub dev: String,
}

impl MountIds {
    /// The topmost mount at `path` in `/proc/self/mountinfo`.
    pub fn find(path: &std::path::Path) -> Option<MountIds> {
        super::mountinfo::topmost(path).map(|m| MountIds::of(path, &m))
    }

    /// The ids of mount `m` at `path`.
    fn of(path: &std::path::Path, m: &super::mountinfo::MountEntry) -> MountIds {
        let (major, minor) = m.dev;
        MountIds {
            path: path.to_path_buf(),
            mnt_id: m.id,
            dev: format!("{major:02x}:{minor:02x}"),
        }
    }
}

/// How long a close waits for [`inspect_close`]. Reading another process's `/proc`
/// entries can wait on that process's locks, and a process can hold them while it waits
/// on this very mount: an `execve` holds its exec lock while it closes its close-on-exec
/// descriptors, each close a flush this daemon must answer. Past this time the file is
/// taken as still held, and its import waits for the kernel's `release`.
pub const HOLDERS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The holders of this mount's files as `/proc` shows them (see [`inspect_close`]).
pub struct ProcHolders {
    mountpoint: Option<std::path::PathBuf>,
    /// This mount as `/proc` shows it, found at the first close that needs it.
    mount: std::sync::OnceLock<Option<MountIds>>,
}

impl ProcHolders {
    pub fn new(mountpoint: Option<std::path::PathBuf>) -> ProcHolders {
        ProcHolders {
            mountpoint,
            mount: std::sync::OnceLock::new(),
        }
    }

    fn mount_ids(&self) -> Option<&MountIds> {
        self.mount
            .get_or_init(|| {
                let found = self.mountpoint.as_deref().and_then(MountIds::find);
                if found.is_none() {
                    log::warn!(
                        "this mount is not in /proc/self/mountinfo: every close of a file being imported is taken as its last"
                    );
                }
                found
            })
            .as_ref()
    }
}

impl Holders for ProcHolders {
    fn closing(&self, ino: u64, pid: u32) -> Closing {
        inspect_close(self.mount_ids(), ino, pid)
    }
}

/// What the close of inode `ino` by task `closer` means ([`killed_by_signal`],
/// `held_elsewhere` when `mount` is known), found on a thread of its own and given up
/// after [`HOLDERS_WAIT`]: then the closer was not killed and the file is taken as
/// still held. That thread finishes by itself once what blocked it moves on.
pub fn inspect_close(mount: Option<&MountIds>, ino: u64, closer: u32) -> Closing {
    let (tx, rx) = std::sync::mpsc::channel();
    let mount = mount.cloned();
    let spawned = std::thread::Builder::new()
        .name("closing".into())
        .spawn(move || {
            let killed = killed_by_signal(closer);
            let held = !killed && mount.is_some_and(|m| held_elsewhere(&m, ino, closer));
            let _ = tx.send(Closing { killed, held });
        });
    let unknown = Closing {
        killed: false,
        held: true,
    };
    if spawned.is_err() {
        return unknown;
    }
    rx.recv_timeout(HOLDERS_WAIT).unwrap_or_else(|_| {
        log::debug!("close of inode {ino} by task {closer}: /proc did not answer in time");
        unknown
    })
}

/// True when some process other than through the descriptor being closed still holds
/// inode `ino` of this mount: an open descriptor in any process, or a mapping in the
/// closing one (`closer`, a thread id). A `close` is the last one only when nothing
/// holds the file any more; the kernel does not say so, `/proc` does. A descriptor being
/// closed has already left its table when the kernel asks the daemon to flush it, and an
/// exiting process shows no descriptor at all.
fn held_elsewhere(mount: &MountIds, ino: u64, closer: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        if holds_descriptor(&p.path(), mount, ino) {
            return true;
        }
    }
    maps_inode(&format!("/proc/{closer}/maps"), mount, ino)
}

/// Whether the process at `/proc/PID` has a descriptor of inode `ino` of this mount.
fn holds_descriptor(proc_dir: &std::path::Path, mount: &MountIds, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    for fd in fds.flatten() {
        let on_mount = std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(&mount.path));
        if !on_mount {
            continue;
        }
        let info = proc_dir.join("fdinfo").join(fd.file_name());
        if let Ok(text) = std::fs::read_to_string(info)
            && fdinfo_names(&text, mount.mnt_id, ino)
        {
            return true;
        }
    }
    false
}

/// Whether an fdinfo text (`mnt_id:` and `ino:` lines) names inode `ino` of mount
/// `mnt_id`.
fn fdinfo_names(text: &str, mnt_id: u64, ino: u64) -> bool {
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    field("mnt_id:") == Some(mnt_id) && field("ino:") == Some(ino)
}

/// Whether the maps file at `path` maps inode `ino` of this mount's device.
fn maps_inode(path: &str, mount: &MountIds, ino: u64) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    maps_name(&text, &mount.dev, ino)
}

/// Whether a maps text (`ADDR PERMS OFFSET DEV INODE PATH`) maps inode `ino` of `dev`.
fn maps_name(text: &str, dev: &str, ino: u64) -> bool {
    let ino = ino.to_string();
    text.lines().any(|l| {
        let mut f = l.split_whitespace().skip(3);
        f.next() == Some(dev) && f.next() == Some(ino.as_str())
    })
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_is_found_in_mountinfo_topmost_first() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 30 0:50 / /var/tmp/m\\040x rw - fuse pcocc rw\n\
                    91 90 0:51 / /var/tmp/m\\040x rw - fuse pcocc rw\n";
        let at = std::path::Path::new("/var/tmp/m x");
        let top = crate::fuse::mountinfo::topmost_in(info, at).unwrap();
        let m = MountIds::of(at, &top);
        assert_eq!((m.mnt_id, m.dev.as_str()), (91, "00:33"));
        let nope = std::path::Path::new("/nope");
        assert!(crate::fuse::mountinfo::topmost_in(info, nope).is_none());
    }

    #[test]
    fn a_descriptor_and_a_mapping_of_the_file_are_recognised() {
        let fdinfo = "pos:\t0\nflags:\t0100001\nmnt_id:\t91\nino:\t1234\n";
        assert!(fdinfo_names(fdinfo, 91, 1234));
        assert!(!fdinfo_names(fdinfo, 90, 1234));
        assert!(!fdinfo_names(fdinfo, 91, 123));
        let maps = "7f00-7f10 rw-s 00000000 00:33 1234    /var/tmp/m/user/x\n\
                    7f10-7f20 r--p 00000000 08:01 1234    /usr/lib/libc.so\n";
        assert!(maps_name(maps, "00:33", 1234));
        assert!(!maps_name(maps, "00:33", 12345));
        assert!(!maps_name(maps, "08:02", 1234));
    }

    #[test]
    fn supplementary_groups_are_read_from_proc_status() {
        let status =
            "Name:\tcp\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nVmRSS:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27, 1000]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name:\tx\n"), Vec::<u32>::new());
    }

    #[test]
    fn a_task_killed_by_a_signal_is_told_from_one_that_exits() {
        // Fields from a real exiting task; the command name holds ") (" on purpose.
        // The state, 48 fields, then the exit code (field 52).
        let tail = "0 ".repeat(48);
        let killed = format!("42 (a) (b) R {tail}9");
        let exited = format!("42 (cp) R {tail}256");
        assert_eq!(parse_exit_signal(&killed), Some(9));
        assert_eq!(parse_exit_signal(&exited), Some(0));
        assert_eq!(parse_exit_signal("42 (x) R 1 2"), None);
        assert!(!killed_by_signal(std::process::id()));
    }

    #[test]
    fn this_process_groups_are_found() {
        let me = std::process::id();
        let c = from_request(1000, 1000, me);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(c.groups, parse_groups(&status));
    }
}
