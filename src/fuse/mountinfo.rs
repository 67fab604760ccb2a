//! The mounts of this process's namespace as `/proc/self/mountinfo` lists them: which
//! mount is on top at a path, and what it is (its id, device, type and source).

use std::path::{Path, PathBuf};

/// One line of mountinfo (proc(5)): `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS
/// [OPTIONAL…] - TYPE SOURCE SUPER_OPTIONS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount id, unique among the mounts present.
    pub id: u64,
    /// The id of the mount this one is mounted on.
    pub parent: u64,
    /// The device of the mounted filesystem (major, minor).
    pub dev: (u32, u32),
    /// Where it is mounted.
    pub point: PathBuf,
    /// The filesystem type, with its subtype (`fuse.pcocc-imagefs`).
    pub fstype: String,
    /// The mount source (`fsname=` of a FUSE mount).
    pub source: String,
}

/// Decodes the octal escapes (`\040` for a space, `\011`, `\012`, `\134`) the kernel
/// writes in mount points and sources.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let f: Vec<&str> = line.split(' ').collect();
    let (major, minor) = f.get(2)?.split_once(':')?;
    let sep = f.iter().position(|x| *x == "-")?;
    Some(MountEntry {
        id: f.first()?.parse().ok()?,
        parent: f.get(1)?.parse().ok()?,
        dev: (major.parse().ok()?, minor.parse().ok()?),
        point: PathBuf::from(unescape(f.get(4)?)),
        fstype: unescape(f.get(sep + 1)?),
        source: unescape(f.get(sep + 2)?),
    })
}

/// Every mount listed in a mountinfo text, in its order.
pub fn parse(info: &str) -> Vec<MountEntry> {
    info.lines().filter_map(parse_line).collect()
}

/// The mount on top at `path` in a mountinfo text: among the mounts at `path`, the one
/// no other mount at `path` is mounted on (the last listed when that does not tell).
pub fn topmost_in(info: &str, path: &Path) -> Option<MountEntry> {
    let at: Vec<MountEntry> = parse(info)
        .into_iter()
        .filter(|m| m.point == path)
        .collect();
    at.iter()
        .rev()
        .find(|m| !at.iter().any(|other| other.parent == m.id))
        .or(at.last())
        .cloned()
}

/// The mount on top at `path` now (None when nothing is mounted there or mountinfo
/// cannot be read). `path` must be absolute and free of symbolic links.
pub fn topmost(path: &Path) -> Option<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    topmost_in(&info, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "22 1 0:21 / /proc rw - proc proc rw\n\
        90 30 0:50 / /var/tmp/m\\040x rw,relatime shared:1 - tmpfs tmpfs rw\n\
        91 90 0:51 / /var/tmp/m\\040x rw,nosuid - fuse.pcocc-imagefs /etc/pcocc/my\\040repos.yaml rw,user_id=0\n\
        95 30 0:52 / /srv rw - fuse pcocc-imagefs rw\n";

    #[test]
    fn the_mount_on_top_is_found_with_its_type_and_source() {
        let m = topmost_in(INFO, Path::new("/var/tmp/m x")).unwrap();
        assert_eq!(m.id, 91);
        assert_eq!(m.parent, 90);
        assert_eq!(m.dev, (0, 51));
        assert_eq!(m.fstype, "fuse.pcocc-imagefs");
        assert_eq!(m.source, "/etc/pcocc/my repos.yaml");
        assert_eq!(topmost_in(INFO, Path::new("/srv")).unwrap().fstype, "fuse");
        assert!(topmost_in(INFO, Path::new("/nope")).is_none());
    }

    #[test]
    fn the_top_is_told_by_parentage_not_by_order() {
        let info = "91 90 0:51 / /m rw - fuse.x a rw\n90 30 0:50 / /m rw - tmpfs b rw\n";
        assert_eq!(topmost_in(info, Path::new("/m")).unwrap().id, 91);
    }

    #[test]
    fn escapes_are_decoded_and_a_lone_backslash_kept() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("a\\b\\04"), "a\\b\\04");
    }
}
