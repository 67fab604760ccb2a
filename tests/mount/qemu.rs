//! qemu as a client of the mount: self-describing files (`user.pcocc.*` xattrs, inode
//! numbers stable across remounts), `O_DIRECT` and `aio=native` reads, qemu's image
//! locking, local overlays backed by a view, and (behind `PCOCC_IMAGEFS_QEMU_BOOT=1`) real
//! guests booting from every view.

use super::*;
use std::ffi::CString;

/// The value of extended attribute `name` of `path`, via getxattr(2); `None` when the
/// file has no such attribute.
fn xattr(path: &Path, name: &str) -> Option<String> {
    let p = CString::new(s(path)).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and live across the call; the buffer is
    // writable for its full length, which is what we pass.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENODATA),
            "getxattr {name}: {e}"
        );
        return None;
    }
    buf.truncate(len as usize);
    Some(String::from_utf8(buf).unwrap())
}

/// The names listxattr(2) gives for `path`, sorted.
fn xattr_names(path: &Path) -> Vec<String> {
    let p = CString::new(s(path)).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `xattr`.
    let len = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(len as usize);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    names
}

/// The layer hashes of `name@0` in `repo`, base first.
fn layer_hashes(m: &Mounted, repo: &str, name: &str) -> Vec<String> {
    let meta = fs::read_to_string(m.repo(repo).join("meta").join(format!("{name}@0"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    v["data_blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b.as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect()
}

/// A local qcow2 `overlay` backed by `base`, read as `base_fmt` (what a VM of its own is
/// started on).
fn overlay_on(base: &Path, base_fmt: &str, overlay: &Path) {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(base),
            "-F",
            base_fmt,
            s(overlay),
        ],
    );
}

fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn revisions_and_views_describe_themselves_and_keep_their_inodes_across_remounts() {
    let Some(m) = Mounted::start() else { return };
    m.layered_image("user", "chain");
    let layers = layer_hashes(&m, "user", "chain");
    assert_eq!(layers.len(), 3);
    let rev = m.at("user/chain/@0");
    let common = [
        ("user.pcocc.name", "chain".to_string()),
        ("user.pcocc.revision", "0".to_string()),
        ("user.pcocc.owner", "root".to_string()),
        ("user.pcocc.layers", layers.join(",")),
        ("user.pcocc.virtual_size", (24u64 << 20).to_string()),
    ];
    let mut names: Vec<String> = common.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(xattr_names(&rev), names);
    for (name, value) in &common {
        assert_eq!(xattr(&rev, name).as_deref(), Some(value.as_str()), "{name}");
    }
    assert_eq!(xattr(&rev, "user.pcocc.format"), None);
    for (file, fmt) in VIEWS {
        let view = rev.join(file);
        for (name, value) in &common {
            assert_eq!(
                xattr(&view, name).as_deref(),
                Some(value.as_str()),
                "{file} {name}"
            );
        }
        assert_eq!(xattr(&view, "user.pcocc.format").as_deref(), Some(fmt));
        assert!(xattr_names(&view).contains(&"user.pcocc.format".to_string()));
    }
    if have("getfattr") {
        let dump = ok("getfattr", &["-d", s(&rev.join("disk.qcow2"))]);
        for (name, value) in &common {
            assert!(dump.contains(&format!("{name}=\"{value}\"")), "{dump}");
        }
        assert!(dump.contains("user.pcocc.format=\"qcow2\""), "{dump}");
    } else {
        eprintln!("getfattr missing (Debian package attr): checked through getxattr(2) only");
    }

    let inodes = |m: &Mounted| -> Vec<u64> {
        let mut v = vec![fs::metadata(&rev).unwrap().ino()];
        for (file, _) in VIEWS {
            v.push(
                fs::metadata(m.at(&format!("user/chain/@0/{file}")))
                    .unwrap()
                    .ino(),
            );
        }
        v.push(fs::metadata(m.at("user/chain/@0/meta.json")).unwrap().ino());
        v
    };
    let before = inodes(&m);
    let mut distinct = before.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        before.len(),
        "inode numbers collide: {before:?}"
    );
    let old = daemon_pid(&m.mnt);
    m.unmount();
    assert!(!m.is_mounted());
    // A fresh daemon, not the old one still winding down.
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.is_some() && daemon_pid(&m.mnt) == old && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    m.mount(&[]);
    // Visit in another order, so that numbers cannot come from lookup order.
    let _ = fs::metadata(m.at("user/chain/@0/meta.json")).unwrap();
    let _ = fs::metadata(m.at("user/chain/@0/disk.vmdk")).unwrap();
    assert_eq!(inodes(&m), before);
}

/// O_DIRECT alignment qemu's `cache=none` uses for a file whose logical block size it
/// cannot probe (block/file-posix.c falls back to 512).
const SECTOR: u64 = 512;
/// Page alignment for O_DIRECT buffers (any buffer alignment ≥ 512 works; a page is safe).
const PAGE: usize = 4096;

/// A deterministic xorshift64 stream: the property test's fixed-seed randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A uniform-ish number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A zeroed buffer of `len` bytes starting on a page boundary, for O_DIRECT: the vector
/// and the offset of the aligned slice in it.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + PAGE];
    let skew = v.as_ptr().align_offset(PAGE);
    (v, skew)
}

/// Resident pages of `path` in the page cache, as `fincore` counts them; `None` when
/// fincore is missing.
fn resident_pages(path: &Path) -> Option<u64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "PAGES", s(path)])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
fn direct_io_reads_of_every_view_return_the_buffered_bytes_and_keep_the_page_cache() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "12M");
    let qcow = m.source_as(&src, "qcow2", "single.qcow2");
    ok("cp", &[s(&qcow), s(&m.at("user/"))]);
    m.layered_image("user", "chain");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for image in ["single", "chain"] {
        for (file, fmt) in VIEWS {
            let view = m.at(&format!("user/{image}/@0/{file}"));
            let buffered = fs::read(&view).unwrap();
            let size = buffered.len() as u64;
            assert_eq!(size % SECTOR, 0, "{file} is not a whole number of sectors");
            let direct = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&view)
                .unwrap_or_else(|e| panic!("O_DIRECT open of {}: {e}", view.display()));
            for _ in 0..64 {
                let off = rng.below(size / SECTOR) * SECTOR;
                // Up to 1 MiB, sometimes running past the end (a short read there).
                let len = (1 + rng.below(2048)) * SECTOR;
                let (mut buf, skew) = aligned(len as usize);
                let got = &mut buf[skew..skew + len as usize];
                let n = direct.read_at(got, off).unwrap_or_else(|e| {
                    panic!("O_DIRECT read {len} at {off} of {}: {e}", view.display())
                });
                let want_len = len.min(size - off) as usize;
                assert_eq!(n, want_len, "{image}/{file} {len}@{off}");
                assert!(
                    got[..n] == buffered[off as usize..off as usize + n],
                    "{image}/{file}: O_DIRECT {len}@{off} differs from buffered"
                );
            }
            // qemu with cache=none (O_DIRECT) through each AIO engine reads the guest
            // disk identical to the buffered source.
            let reference = if image == "single" {
                src.clone()
            } else {
                m.reference_raw("user", "chain")
            };
            for aio in ["threads", "native", "io_uring"] {
                let out = run(
                    "qemu-img",
                    &[
                        "compare",
                        "-T",
                        "none",
                        "-f",
                        fmt,
                        "-F",
                        "raw",
                        &format!(
                            "json:{{\"driver\":\"{fmt}\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\",\"aio\":\"{aio}\",\"cache\":{{\"direct\":true}}}}}}",
                            s(&view)
                        ),
                        s(&reference),
                    ],
                );
                let text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                if aio == "io_uring" && text.contains("io_uring") && !out.status.success() {
                    eprintln!("io_uring unavailable here, not checked: {text}");
                    continue;
                }
                assert!(
                    out.status.success() && text.contains("Images are identical"),
                    "{image}/{file} aio={aio}: {text}"
                );
            }
            // qemu-io -n (O_DIRECT) reads of random aligned ranges through the format
            // driver return the guest bytes of the reference.
            let guest = fs::read(&reference).unwrap();
            let sectors = guest.len() as u64 / SECTOR;
            let mut args = vec!["-r".to_string(), "-n".into(), "-f".into(), fmt.into()];
            let mut ranges = Vec::new();
            for _ in 0..8 {
                let off = rng.below(sectors) * SECTOR;
                let len = ((1 + rng.below(8)) * SECTOR).min(guest.len() as u64 - off);
                args.extend(["-c".to_string(), format!("read -v {off} {len}")]);
                ranges.push((off, len));
            }
            args.push(s(&view).to_string());
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let dump = ok("qemu-io", &argv);
            let mut seen = 0u64;
            for line in dump.lines() {
                let Some((addr, rest)) = line.split_once(":  ") else {
                    continue;
                };
                let Ok(addr) = u64::from_str_radix(addr, 16) else {
                    continue;
                };
                let bytes: Vec<u8> = rest
                    .split_whitespace()
                    .take(16)
                    .map_while(|h| u8::from_str_radix(h, 16).ok())
                    .collect();
                let at = addr as usize;
                assert!(
                    guest[at..at + bytes.len()] == bytes[..],
                    "{image}/{file}: qemu-io -n read at {addr:#x} differs"
                );
                seen += bytes.len() as u64;
            }
            assert_eq!(seen, ranges.iter().map(|r| r.1).sum::<u64>(), "{dump}");
            // The page cache of buffered readers survives O_DIRECT reads and new opens
            // (FOPEN_KEEP_CACHE on immutable files): fincore opens the file anew, which
            // would drop its pages otherwise. Memory reclaim on a busy machine can drop
            // them too, so a few tries: without KEEP_CACHE every try finds none.
            let kept = (0..5).any(|_| {
                let _ = fs::read(&view).unwrap();
                let (mut buf, skew) = aligned(SECTOR as usize);
                direct
                    .read_at(&mut buf[skew..skew + SECTOR as usize], 0)
                    .unwrap();
                resident_pages(&view).is_none_or(|pages| pages > 0)
            });
            assert!(kept, "{image}/{file}: page cache dropped on open");
        }
    }
    // qemu-io's own flags for the same: -n (O_DIRECT), -t none, -i native.
    let raw = m.at("user/single/@0/disk.raw");
    ok(
        "qemu-io",
        &[
            "-r",
            "-n",
            "-f",
            "raw",
            "-c",
            "read -P 0x22 3M 64k",
            s(&raw),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-r",
            "-t",
            "none",
            "-i",
            "native",
            "-f",
            "qcow2",
            "-c",
            "read -P 0x33 7M 512k",
            "-c",
            "read -P 0x11 512 1536",
            s(&m.at("user/single/@0/disk.qcow2")),
        ],
    );
}

/// Whether some process holds a lock on `path` that would conflict with a write lock on
/// bytes `start..start + len` (F_OFD_GETLK, which works on a read-only descriptor).
fn conflicting_lock(path: &Path, start: i64, len: i64) -> bool {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    // SAFETY: flock is plain data; zeroed is a valid starting value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass, on a descriptor we own.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as i16
}

/// qemu's image-locking byte range (block/file-posix.c: permission bytes from 100,
/// "shared" bytes from 200).
const QEMU_LOCK_START: i64 = 100;
const QEMU_LOCK_LEN: i64 = 200;

#[test]
fn read_only_qemus_share_a_view_and_a_read_write_open_fails_with_erofs() {
    use std::process::Stdio;
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    let qcow = m.source_as(&src, "qcow2", "img.qcow2");
    ok("cp", &[s(&qcow), s(&m.at("user/"))]);
    let view = m.at("user/img/@0/disk.qcow2");
    // An interactive qemu-io keeps the view open (and locked) until its stdin closes.
    let mut holder = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", s(&view)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qemu-io");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !conflicting_lock(&view, QEMU_LOCK_START, QEMU_LOCK_LEN) {
        assert!(
            Instant::now() < deadline,
            "qemu-io -r took no lock on the view (locks must work on the mount)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Read-only openers share it, with locking on (the default).
    ok(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x22 3M 64k", s(&view)],
    );
    ok("qemu-img", &["info", s(&view)]);
    ok(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&view), s(&src)],
    );
    // A read-write open is refused at once with EROFS (timeout guards against a hang).
    let rw = run(
        "timeout",
        &["30", "qemu-io", "-f", "qcow2", "-c", "read 0 512", s(&view)],
    );
    let err = String::from_utf8_lossy(&rw.stderr);
    assert!(
        !rw.status.success() && rw.status.code() != Some(124),
        "{rw:?}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    if have("qemu-system-x86_64") {
        let sys = run(
            "timeout",
            &[
                "30",
                "qemu-system-x86_64",
                "-display",
                "none",
                "-S",
                "-monitor",
                "none",
                "-serial",
                "none",
                "-drive",
                &format!("file={},if=virtio", s(&view)),
            ],
        );
        let err = String::from_utf8_lossy(&sys.stderr);
        assert!(
            !sys.status.success() && sys.status.code() != Some(124),
            "{sys:?}"
        );
        assert!(err.contains("Read-only file system"), "{err}");
    } else {
        eprintln!("qemu-system-x86_64 missing: read-write guest start not checked");
    }
    drop(holder.stdin.take());
    let out = holder.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!conflicting_lock(&view, QEMU_LOCK_START, QEMU_LOCK_LEN));
}

#[test]
fn a_local_overlay_backed_by_a_view_reads_through_and_keeps_its_writes() {
    let Some(m) = Mounted::start() else { return };
    m.layered_image("user", "chain");
    let reference = m.reference_raw("user", "chain");
    for (file, fmt) in [
        ("disk.qcow2", "qcow2"),
        ("disk.raw", "raw"),
        ("disk.vmdk", "vmdk"),
    ] {
        let view = m.at(&format!("user/chain/@0/{file}"));
        let before = sha256_file(&view);
        let overlay = m.work().join(format!("vm-{fmt}.qcow2"));
        overlay_on(&view, fmt, &overlay);
        let cmp = ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                s(&overlay),
                s(&reference),
            ],
        );
        assert!(cmp.contains("Images are identical"), "{fmt}: {cmp}");
        // Reads through the overlay with O_DIRECT on the whole chain, as a guest with
        // cache=none does.
        ok(
            "qemu-io",
            &[
                "-t",
                "none",
                "-f",
                "qcow2",
                "-c",
                "read -P 0x42 1M 1M",
                "-c",
                "write -P 0x77 4M 64k",
                "-c",
                "read -P 0x77 4M 64k",
                s(&overlay),
            ],
        );
        // The write landed in the overlay; the view is unchanged.
        let cmp = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                s(&overlay),
                s(&reference),
            ],
        );
        assert_eq!(
            cmp.status.code(),
            Some(1),
            "{fmt}: overlay write not seen: {cmp:?}"
        );
        assert_eq!(sha256_file(&view), before, "{fmt}: view changed");
        let map = ok("qemu-img", &["map", "--output=json", s(&overlay)]);
        let v: serde_json::Value = serde_json::from_str(&map).unwrap();
        let in_overlay = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(in_overlay, 64 << 10, "{fmt}: {map}");
    }
}

/// The environment variable that turns on the guest boot test (`.ci/run` sets it): booting
/// a dozen guests takes minutes, too long for every `cargo test`.
const BOOT_ENV: &str = "PCOCC_IMAGEFS_QEMU_BOOT";
/// Where Debian's busybox-static installs its static binary.
const BUSYBOX: &str = "/bin/busybox";
/// Modules the guest needs for `/dev/vda` when the kernel builds virtio as modules
/// (Debian does): the PCI transport and the block driver; their dependencies come from
/// modules.dep.
const GUEST_MODULES: [&str; 2] = ["virtio_pci", "virtio_blk"];
/// Upper bound for one guest, boot to power-off (TCG on a loaded 2-core machine).
const GUEST_TIMEOUT_SECS: &str = "300";
/// What the guest prints before the sha256 of /dev/vda, and where it writes (when asked
/// to on its command line) to prove writes reach an overlay.
const SHA_TAG: &str = "PCOCC-SHA256";
const WRITE_MARK: &[u8] = b"PCOCC-WROTE";
const WRITE_SECTOR: u64 = 8;

/// The guest's /init: loads the virtio modules, optionally writes a mark on /dev/vda,
/// prints the sha256 of the whole /dev/vda on the serial console and powers off.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
for m in /m/*.ko; do $B insmod "$m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do $B usleep 100000; i=$((i+1)); done
if $B grep -q pcocc.write /proc/cmdline; then
    $B printf PCOCC-WROTE | $B dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null
fi
echo "PCOCC-SHA256 $($B sha256sum /dev/vda)"
$B poweroff -f
"#;

/// Appends one cpio "newc" entry (the initramfs format the kernel reads, see the kernel's
/// Documentation/driver-api/early-userspace/buffer-format.rst): a 110-byte ASCII header
/// of 13 hex fields, the NUL-terminated name and the data, each padded to 4 bytes.
fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).expect("initramfs file under 4 GiB"),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).unwrap(),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A kernel and its modules directory for the guest: the newest /boot/vmlinuz-VER with a
/// /lib/modules/VER.
fn guest_kernel() -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("vmlinuz-")?.to_string();
            let modules = Path::new("/lib/modules").join(&ver);
            modules.is_dir().then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The module files to load for `wanted`, dependencies first, from `modules.dep` (an
/// empty list when the kernel has them built in).
fn module_load_order(modules: &Path, wanted: &[&str]) -> Vec<PathBuf> {
    let dep = fs::read_to_string(modules.join("modules.dep")).unwrap_or_default();
    let deps: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m, d.split_whitespace().collect()))
        })
        .collect();
    let stem = |p: &str| {
        let file = p.rsplit('/').next().unwrap_or(p);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    fn visit<'a>(m: &'a str, deps: &[(&'a str, Vec<&'a str>)], order: &mut Vec<&'a str>) {
        if order.contains(&m) {
            return;
        }
        if let Some((_, d)) = deps.iter().find(|(k, _)| *k == m) {
            for x in d {
                visit(x, deps, order);
            }
        }
        order.push(m);
    }
    let mut order = Vec::new();
    for w in wanted {
        if let Some((m, _)) = deps.iter().find(|(k, _)| stem(k) == *w) {
            visit(m, &deps, &mut order);
        }
    }
    order.iter().map(|m| modules.join(m)).collect()
}

/// A module file's bytes, decompressed when the kernel ships them compressed.
fn module_bytes(path: &Path) -> Vec<u8> {
    let name = s(path);
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).unwrap(),
        Some(t) => {
            let out = run(t, &["-dc", name]);
            assert!(out.status.success(), "{t} -dc {name}: {out:?}");
            out.stdout
        }
    }
}

/// Writes the guest's initramfs (busybox, /init, the virtio modules) to `dest`.
fn build_initramfs(modules: &Path, dest: &Path) {
    let mut cpio = Vec::new();
    let mut ino = 1;
    let mut add = |cpio: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        newc_entry(cpio, ino, name, mode, rdev, data);
        ino += 1;
    };
    for dir in ["bin", "dev", "proc", "sys", "m"] {
        add(&mut cpio, dir, 0o040755, (0, 0), b"");
    }
    // /dev/console (char 5:1) so that init starts with the serial console as stdio.
    add(&mut cpio, "dev/console", 0o020600, (5, 1), b"");
    add(
        &mut cpio,
        "bin/busybox",
        0o100755,
        (0, 0),
        &fs::read(BUSYBOX).unwrap(),
    );
    add(&mut cpio, "init", 0o100755, (0, 0), INIT.as_bytes());
    for (i, m) in module_load_order(modules, &GUEST_MODULES)
        .iter()
        .enumerate()
    {
        let file = m.file_name().unwrap().to_string_lossy();
        let base = file.split(".ko").next().unwrap_or(&file).to_string();
        add(
            &mut cpio,
            &format!("m/{i:02}-{base}.ko"),
            0o100644,
            (0, 0),
            &module_bytes(m),
        );
    }
    newc_entry(&mut cpio, 0, "TRAILER!!!", 0, (0, 0), b"");
    fs::write(dest, cpio).unwrap();
}

/// A booted guest's verdict: the sha256 it printed for /dev/vda, or its console.
struct Guest {
    child: std::process::Child,
    what: String,
}

impl Guest {
    /// Starts a guest on `drive` (a `-drive` value). TCG, not KVM: a nested or sandboxed
    /// /dev/kvm can be far slower than TCG for this tiny guest (seen here: no output in
    /// five minutes, against seconds with TCG), and TCG behaves the same everywhere.
    fn boot(kernel: &Path, initrd: &Path, drive: &str, write: bool) -> Guest {
        let append = format!(
            "console=ttyS0 panic=-1 quiet{}",
            if write { " pcocc.write" } else { "" }
        );
        let child = Command::new("timeout")
            .args([
                GUEST_TIMEOUT_SECS,
                "qemu-system-x86_64",
                "-machine",
                "accel=tcg",
                "-nic",
                "none",
                "-m",
                "256",
                "-nographic",
                "-no-reboot",
                "-kernel",
                s(kernel),
                "-initrd",
                s(initrd),
                "-append",
                &append,
                "-drive",
                drive,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run qemu-system-x86_64");
        Guest {
            child,
            what: drive.to_string(),
        }
    }

    /// Waits for power-off and returns the sha256 the guest printed.
    #[track_caller]
    fn sha256(self) -> String {
        let out = self.child.wait_with_output().unwrap();
        let console = String::from_utf8_lossy(&out.stdout);
        let line = console.lines().find_map(|l| {
            let rest = l.split(SHA_TAG).nth(1)?;
            rest.split_whitespace().next().map(str::to_string)
        });
        match line {
            Some(sha) if sha.len() == 64 => sha,
            _ => panic!(
                "guest on {} printed no sha256 ({}):\n{console}\n{}",
                self.what,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// The sha256 of what qemu-img reads from `image` (format probed), as a raw disk.
fn raw_sha256(m: &Mounted, image: &Path, tag: &str) -> String {
    let out = m.work().join(format!("{tag}.ref.raw"));
    ok("qemu-img", &["convert", "-O", "raw", s(image), s(&out)]);
    let sha = sha256_file(&out);
    fs::remove_file(&out).unwrap();
    sha
}

#[test]
fn guests_boot_from_every_view_and_read_the_disk_qemu_img_reads() {
    if std::env::var(BOOT_ENV).as_deref() != Ok("1") {
        common::skip(&format!(
            "guest boot test runs only with {BOOT_ENV}=1 (.ci/run sets it)"
        ));
        return;
    }
    if !have("qemu-system-x86_64") {
        common::skip("qemu-system-x86_64 missing (Debian package qemu-system-x86)");
        return;
    }
    let Some((kernel, modules)) = guest_kernel() else {
        common::skip("no /boot/vmlinuz-VER with /lib/modules/VER (linux-image-amd64)");
        return;
    };
    if !Path::new(BUSYBOX).exists() {
        common::skip(&format!(
            "{BUSYBOX} missing (Debian package busybox-static)"
        ));
        return;
    }
    let Some(m) = Mounted::start() else { return };
    let initrd = m.work().join("initramfs.cpio");
    build_initramfs(&modules, &initrd);

    // A 32 MiB disk with data spread over it, stored as a single-layer image, and a
    // 3-layer revision.
    let src = m.source_raw("src.raw", "32M");
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 30M 2M", s(&src)],
    );
    let qcow = m.source_as(&src, "qcow2", "disk.qcow2");
    ok("cp", &[s(&qcow), s(&m.at("user/"))]);
    m.layered_image("user", "chain");
    let single_sha = raw_sha256(&m, &qcow, "single");
    let chain_sha = raw_sha256(&m, &m.reference_raw("user", "chain"), "chain");

    let drive = |view: &Path, extra: &str| {
        format!("file={},if=virtio,cache=none,aio=native,{extra}", s(view))
    };
    let mut cases: Vec<(PathBuf, &String)> = VIEWS
        .iter()
        .map(|(file, _)| (m.at(&format!("user/disk/@0/{file}")), &single_sha))
        .collect();
    cases.push((m.at("user/chain/@0/disk.qcow2"), &chain_sha));
    for (view, want) in &cases {
        let got = Guest::boot(&kernel, &initrd, &drive(view, "readonly=on"), false).sha256();
        assert_eq!(&got, *want, "guest on {}", view.display());
    }

    // Two guests on one view at once: one read-only, one with a throwaway snapshot.
    let view = m.at("user/chain/@0/disk.vmdk");
    let a = Guest::boot(&kernel, &initrd, &drive(&view, "readonly=on"), false);
    let b = Guest::boot(&kernel, &initrd, &drive(&view, "snapshot=on"), false);
    assert_eq!(a.sha256(), chain_sha);
    assert_eq!(b.sha256(), chain_sha);

    // A guest on a local overlay writes into the overlay only.
    let view = m.at("user/disk/@0/disk.qcow2");
    let view_sha = sha256_file(&view);
    let overlay = m.work().join("vm.qcow2");
    overlay_on(&view, "qcow2", &overlay);
    let mut expected = fs::read(&src).unwrap();
    let at = (WRITE_SECTOR * 512) as usize;
    expected[at..at + WRITE_MARK.len()].copy_from_slice(WRITE_MARK);
    let expected_sha: String = Sha256::digest(&expected)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let got = Guest::boot(&kernel, &initrd, &drive(&overlay, "format=qcow2"), true).sha256();
    assert_eq!(
        got, expected_sha,
        "the guest's write is not what it reads back"
    );
    assert_eq!(raw_sha256(&m, &overlay, "overlay"), expected_sha);
    assert_eq!(sha256_file(&view), view_sha, "the view changed");
    assert_eq!(raw_sha256(&m, &view, "view"), single_sha);
}

#[test]
fn sigterm_while_a_vm_holds_a_view_detaches_and_serves_it_until_closed() {
    use std::os::unix::fs::FileExt;
    let Some(m) = Mounted::start() else { return };
    let src = m.source_raw("src.raw", "8M");
    ok("cp", &[s(&src), s(&m.at("user/"))]);
    let held = fs::File::open(m.at("user/src/@0/disk.raw")).unwrap();
    let pid = daemon_pid(&m.mnt).expect("daemon pid");
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.is_mounted() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !m.is_mounted(),
        "SIGTERM with a file open must detach the mount"
    );
    // The open file is still served.
    let mut buf = vec![0u8; 64 << 10];
    held.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0x22));
    drop(held);
    let alive = || Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(),
        "the daemon must exit once the last file is closed"
    );
}
