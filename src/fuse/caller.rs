//! Who is calling: a FUSE request carries the caller's uid, gid and pid; the
//! supplementary groups come from `/proc/PID/status` (the kernel does not send them).

use crate::tree::Caller;

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

/// The process (thread group) of thread `tid`: FUSE requests carry the calling
/// thread's id, and a file opened by one thread may be closed by another of the same
/// process. `tid` itself when it cannot be read (the thread is gone).
pub fn process_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
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
    fn a_thread_belongs_to_its_process() {
        let me = std::process::id();
        // SAFETY: gettid only reads the calling thread's id.
        let tid = std::thread::spawn(|| unsafe { libc::gettid() } as u32)
            .join()
            .unwrap();
        assert_eq!(process_of(me), me);
        // The thread has ended: its id is returned as it is, or resolves to us.
        assert!([tid, me].contains(&process_of(tid)));
    }

    #[test]
    fn this_process_groups_are_found() {
        let me = std::process::id();
        let c = from_request(1000, 1000, me);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(c.groups, parse_groups(&status));
    }
}
