//! `-o a,b,c` mount options, as `mount(8)`, fstab and users write them, turned into plain
//! settings before anything is mounted.
//!
//! Three kinds of option arrive in one list: FUSE/kernel options (`allow_other`, `ro`,
//! `nosuid`, …) that go to the mount, with `nonempty` that lets it hide a directory's
//! files; options of this daemon (`config=`, `threads=`, `log=`, `refresh=`,
//! `readahead=`) that are the same as its command-line flags, so an fstab line can say
//! everything; and options meant for `mount(8)` or systemd alone (`defaults`, `nofail`,
//! `_netdev`, `x-systemd.*`, …) which are accepted and dropped. Anything else
//! is an error that names the option, so a typo never mounts something unexpected.

use std::path::PathBuf;
use std::time::Duration;

/// Settings gathered from `-o` (and the flags that mirror them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountSettings {
    /// Let every user use the mount (`allow_other`).
    pub allow_other: bool,
    /// Let root use the mount besides its owner (`allow_root`).
    pub allow_root: bool,
    /// Refuse every change (`ro`).
    pub read_only: bool,
    /// Let the kernel check permission bits (`default_permissions`).
    pub default_permissions: bool,
    /// Mount on a directory that holds files, hiding them while mounted (`nonempty`).
    pub nonempty: bool,
    /// Kernel flags passed through as they are (`nosuid`, `nodev`, `noexec`, …).
    pub kernel_flags: Vec<String>,
    /// `fsname=`: the mount source shown in /proc/mounts.
    pub fsname: Option<String>,
    /// `config=FILE`: repos.yaml to use instead of the user and system ones.
    pub config: Option<PathBuf>,
    /// `threads=N`: request threads.
    pub threads: Option<usize>,
    /// `log=FILE`: where a background daemon writes its log.
    pub log_file: Option<PathBuf>,
    /// `refresh=SECS`: how long repository and image listings may be cached.
    pub refresh: Option<Duration>,
    /// `readahead=KIB`: the mount's read-ahead window (0: the kernel's own).
    pub readahead_kib: Option<u32>,
}

/// Options `mount(8)`, fstab and systemd use for themselves; a FUSE daemon receives them
/// from `mount -t` / fstab and must ignore them.
const MOUNT8_ONLY: &[&str] = &[
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner", "group",
    "sw", "rw", "bg", "fg",
];

/// Kernel mount flags FUSE accepts and this daemon passes on unchanged.
const KERNEL_FLAGS: &[&str] = &[
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "relatime",
    "nodiratime",
    "sync",
    "async",
    "dirsync",
];

/// Why an option list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("unknown mount option '{0}' (see pcocc-imagefs(8) for the accepted options)")]
    Unknown(String),
    #[error("mount option '{0}' needs a value, as in '{0}=…'")]
    MissingValue(String),
    #[error("mount option '{option}': {reason}")]
    BadValue { option: String, reason: String },
}

impl MountSettings {
    /// Adds every option of one `-o` argument (comma-separated) to the settings.
    pub fn parse_into(&mut self, list: &str) -> Result<(), OptionError> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            self.apply(opt)?;
        }
        Ok(())
    }

    fn apply(&mut self, opt: &str) -> Result<(), OptionError> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let missing = || OptionError::MissingValue(key.to_string());
        match key {
            "allow_other" => self.allow_other = true,
            "allow_root" => self.allow_root = true,
            "ro" => self.read_only = true,
            "default_permissions" => self.default_permissions = true,
            "nonempty" => self.nonempty = true,
            "fsname" => self.fsname = Some(value.ok_or_else(missing)?.to_string()),
            "config" => self.config = Some(PathBuf::from(value.ok_or_else(missing)?)),
            "log" => self.log_file = Some(PathBuf::from(value.ok_or_else(missing)?)),
            "threads" => {
                let v = value.ok_or_else(missing)?;
                let n: usize = v.parse().map_err(|_| OptionError::BadValue {
                    option: key.into(),
                    reason: format!("'{v}' is not a number of threads"),
                })?;
                self.threads = Some(check_threads(n).map_err(|reason| OptionError::BadValue {
                    option: key.into(),
                    reason,
                })?);
            }
            "readahead" => {
                let v = value.ok_or_else(missing)?;
                let kib = super::readahead::parse_readahead(v).map_err(|reason| {
                    OptionError::BadValue {
                        option: key.into(),
                        reason,
                    }
                })?;
                self.readahead_kib = Some(kib);
            }
            "refresh" => {
                let v = value.ok_or_else(missing)?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 86400.0)
                    .ok_or_else(|| OptionError::BadValue {
                        option: key.into(),
                        reason: format!("'{v}' is not a number of seconds between 0 and 86400"),
                    })?;
                self.refresh = Some(Duration::from_secs_f64(secs));
            }
            // Filesystem type and subtype are fixed by the daemon.
            "subtype" | "fstype" => {}
            k if KERNEL_FLAGS.contains(&k) && value.is_none() => {
                self.kernel_flags.push(k.to_string())
            }
            k if MOUNT8_ONLY.contains(&k) => {}
            k if k.starts_with("x-") || k == "comment" => {}
            _ => return Err(OptionError::Unknown(opt.to_string())),
        }
        Ok(())
    }
}

/// Bounds the number of request threads: at least one, and no more than the kernel
/// can keep busy (FUSE queues are shallow; 64 is far past any gain measured).
pub fn check_threads(n: usize) -> Result<usize, String> {
    const MAX_THREADS: usize = 64;
    if (1..=MAX_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "the number of threads must be between 1 and {MAX_THREADS}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &str) -> Result<MountSettings, OptionError> {
        let mut s = MountSettings::default();
        s.parse_into(list)?;
        Ok(s)
    }

    #[test]
    fn fstab_options_for_mount8_and_systemd_are_dropped() {
        let s = parse(
            "defaults,nofail,_netdev,x-systemd.automount,x-systemd.requires=a.service,noauto",
        )
        .unwrap();
        assert_eq!(s, MountSettings::default());
    }

    #[test]
    fn fuse_options_and_daemon_settings_are_understood() {
        let s = parse("allow_other,ro,nosuid,nodev,config=/etc/pcocc/repos.yaml,threads=4,refresh=2.5,log=/var/log/x,readahead=8192,nonempty")
            .unwrap();
        assert!(s.nonempty);
        assert_eq!(s.readahead_kib, Some(8192));
        assert!(s.allow_other && s.read_only);
        assert_eq!(s.kernel_flags, vec!["nosuid", "nodev"]);
        assert_eq!(s.config, Some(PathBuf::from("/etc/pcocc/repos.yaml")));
        assert_eq!(s.threads, Some(4));
        assert_eq!(s.refresh, Some(Duration::from_millis(2500)));
        assert_eq!(s.log_file, Some(PathBuf::from("/var/log/x")));
    }

    #[test]
    fn several_option_lists_accumulate() {
        let mut s = MountSettings::default();
        s.parse_into("allow_other").unwrap();
        s.parse_into("ro, ,threads=2").unwrap();
        assert!(s.allow_other && s.read_only);
        assert_eq!(s.threads, Some(2));
    }

    #[test]
    fn unknown_options_and_bad_values_are_refused_by_name() {
        assert_eq!(
            parse("allow_other,alow_root"),
            Err(OptionError::Unknown("alow_root".into()))
        );
        assert_eq!(
            parse("threads"),
            Err(OptionError::MissingValue("threads".into()))
        );
        assert!(matches!(
            parse("threads=0"),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse("threads=lots"),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse("readahead=1G"),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse("readahead=999999"),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse("refresh=-1"),
            Err(OptionError::BadValue { .. })
        ));
        assert!(matches!(
            parse("refresh=nan"),
            Err(OptionError::BadValue { .. })
        ));
        let e = parse("nosuid=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown mount option 'nosuid=1' (see pcocc-imagefs(8) for the accepted options)"
        );
    }
}
