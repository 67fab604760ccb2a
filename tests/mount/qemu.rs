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
    m.unmount();
    assert!(!m.is_mounted());
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
            // The page cache of buffered readers survives O_DIRECT and new opens
            // (FOPEN_KEEP_CACHE on immutable files).
            if let Some(pages) = resident_pages(&view) {
                assert!(pages > 0, "{image}/{file}: page cache dropped");
            }
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
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(&view),
                "-F",
                fmt,
                s(&overlay),
            ],
        );
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
