//! Who is calling: a FUSE request carries the caller's uid, gid and pid; the
//! supplementary groups come from `/proc/PID/status` (the kernel does not send them).

use crate::tree::Caller;

/// The identity of the process that made a request.
pub fn from_request(uid: u32, gid: u32, pid: u32) -> Caller {
    Caller {
        uid,
        gid,
        groups: if pid == 0 { Vec::new() } else { groups_of(pid) },
    }
}

/// Supplementary groups of process `pid`, empty when it is gone or unreadable (the
/// caller then has its primary group only, which can only deny, never grant, more).
fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
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
    fn this_process_groups_are_found() {
        let me = std::process::id();
        let c = from_request(0, 0, me);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(c.groups, parse_groups(&status));
    }
}
