//! qcow2 reader tests: images built by qemu-img/qemu-io in temporary directories, and our
//! reading of them judged by qemu-img (`convert -O raw`, `map`, `compare`).

use super::super::chain::{NoBacking, WithinDir, open_chain};
use super::super::{Disk, Error, Layer};
use super::Qcow2Layer;
use crate::testutil::{data_runs, have_qemu, noise, qemu_img, qemu_io, qemu_map, qemu_raw_bytes};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest disk compared byte for byte in memory; bigger (sparse) disks are compared
/// with `qemu-img compare` against a sparse raw copy of what we read.
const IN_MEMORY_LIMIT: u64 = 256 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`.
fn create(path: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    qemu_img(&args);
}

/// Opens `path` and its chain within `root` (or standalone when `root` is `None`).
fn open(path: &Path, root: Option<&Path>) -> Disk {
    match root {
        Some(r) => open_chain(path, &WithinDir { root: r.into() }),
        None => open_chain(path, &NoBacking),
    }
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads the whole disk in `chunk`-byte pieces.
fn read_all(disk: &Disk, chunk: usize) -> Vec<u8> {
    let size = disk.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        disk.read_at(&mut out[pos..pos + n], pos as u64)
            .unwrap_or_else(|e| panic!("read at {pos}: {e}"));
        pos += n;
    }
    out
}

/// The judge: what we read equals `qemu-img convert -O raw`, and our data extents equal
/// `qemu-img map`'s data runs.
fn assert_reads_like_qemu(path: &Path, disk: &Disk) {
    let size = disk.virtual_size();
    let info = qemu_img(&["info", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "virtual size");
    assert_eq!(
        disk.data_extents(0, size).unwrap(),
        data_runs(&qemu_map(path, Some("qcow2"))),
        "data extents of {}",
        path.display()
    );
    if size <= IN_MEMORY_LIMIT {
        let want = qemu_raw_bytes(path, Some("qcow2"));
        // Uneven chunks cross cluster and extent boundaries at many phases.
        for chunk in [1 << 20, 4096 * 3 + 512] {
            let got = read_all(disk, chunk);
            assert!(
                got == want,
                "{} read in {chunk}-byte chunks differs",
                path.display()
            );
        }
    } else {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy.raw");
        let f = File::create(&copy).unwrap();
        for (start, len) in disk.data_extents(0, size).unwrap() {
            let mut buf = vec![0u8; len as usize];
            disk.read_at(&mut buf, start).unwrap();
            f.write_all_at(&buf, start).unwrap();
        }
        f.set_len(size).unwrap();
        let out = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&copy), s(path)]);
        assert!(out.contains("Images are identical"), "{out}");
    }
}

/// A mix of data, zero writes and discards, scaled to the cluster size `cs`.
fn scribble(path: &Path, cs: u64, seed: u64) {
    let c = |n: f64| ((n * cs as f64) as u64).to_string();
    let cmds = [
        format!("write -P {} 0 {}", 0x11 + seed, c(3.0)),
        format!("write -P {} {} {}", 0x22 + seed, c(5.5), c(2.25)),
        format!("write -P {} {} 777", 0x33 + seed, 3 * cs + 100),
        format!("write -z {} {}", c(1.0), c(1.0)),
        format!("discard {} {}", c(2.0), c(1.0)),
        format!("write -P {} {} {}", 0x44 + seed, c(20.0), c(8.0)),
        format!("write -z {} {}", c(22.0), c(2.0)),
        format!("discard {} {}", c(26.0), c(1.0)),
    ];
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", path, &refs);
}

#[test]
fn cluster_sizes_512_64k_and_2m_at_compat_0_10_and_1_1_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cs in [512u64, 65536, 2 << 20] {
        for compat in ["0.10", "1.1"] {
            let p = dir.path().join(format!("c{cs}-{compat}.qcow2"));
            let size = (cs * 40).max(4 << 20);
            create(
                &p,
                &format!("cluster_size={cs},compat={compat}"),
                &size.to_string(),
            );
            scribble(&p, cs, 0);
            let disk = open(&p, None);
            let layer = Qcow2Layer::open(&p).unwrap();
            assert_eq!(layer.cluster_size(), cs);
            assert_eq!(layer.version(), if compat == "1.1" { 3 } else { 2 });
            assert_reads_like_qemu(&p, &disk);
        }
    }
}

/// A raw file mixing incompressible noise, compressible patterns and zeroes.
fn mixed_raw(path: &Path, size: usize) {
    let mut data = vec![0u8; size];
    let mut pos = 0;
    let mut i = 0u64;
    while pos < size {
        let n = (37 * 1024 + (i as usize * 7919) % 100_000).min(size - pos);
        match i % 3 {
            0 => data[pos..pos + n].copy_from_slice(&noise(i, n)),
            1 => data[pos..pos + n]
                .iter_mut()
                .enumerate()
                .for_each(|(k, b)| *b = (k / 13 % 7) as u8 + b'a'),
            _ => {} // zeroes
        }
        pos += n;
        i += 1;
    }
    fs::write(path, data).unwrap();
}

#[test]
fn zlib_and_zstd_compressed_images_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, (3 << 20) + 4096 + 77);
    for (kind, cs) in [
        ("zlib", 65536u64),
        ("zstd", 65536),
        ("zlib", 512),
        ("zstd", 2 << 20),
    ] {
        let p = dir.path().join(format!("{kind}-{cs}.qcow2"));
        let opts = format!("compression_type={kind},cluster_size={cs}");
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opts,
            s(&src),
            s(&p),
        ]);
        let disk = open(&p, None);
        assert_reads_like_qemu(&p, &disk);
        // 4 KiB reads, as the kernel makes them, served from the inflated-cluster cache.
        // qemu-img rounds the size up to a sector: the source is a prefix.
        let before = crate::image::compressed::inflated_by_this_thread();
        let (got, want) = (read_all(&disk, 4096), fs::read(&src).unwrap());
        let inflated = crate::image::compressed::inflated_by_this_thread() - before;
        assert!(
            inflated <= disk.virtual_size().div_ceil(cs),
            "{inflated} inflations for {} clusters",
            disk.virtual_size().div_ceil(cs)
        );
        assert!(got[..want.len()] == want[..], "{kind} {cs}");
        assert!(got[want.len()..].iter().all(|&b| b == 0));
    }
}

#[test]
fn extended_l2_subclusters_read_like_qemu_over_a_backing_layer() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    fs::create_dir_all(data.join("aa")).unwrap();
    fs::create_dir_all(data.join("bb")).unwrap();
    let base = data.join("aa/base");
    create(&base, "", "4M");
    qemu_io("qcow2", &base, &["write -P 0x5a 0 4M"]);
    let top = data.join("bb/top");
    create(
        &top,
        "extended_l2=on,cluster_size=64k,backing_file=../../data/aa/base,backing_fmt=qcow2",
        "4M",
    );
    // Subclusters are 2 KiB: write, zero and discard pieces of single clusters.
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x01 0 2k",
            "write -P 0x02 6k 4k",
            "write -P 0x03 64k 64k",
            "write -z 130k 2k",
            "write -z 200k 6k",
            "discard 70k 2k",
            "write -P 0x04 1m 3k",
            "write -P 0x05 2m 2m",
            "write -z 3m 62k",
        ],
    );
    assert!(Qcow2Layer::open(&top).unwrap().extended_l2());
    let disk = open(&top, Some(&data));
    assert_eq!(disk.layers().len(), 2);
    assert_reads_like_qemu(&top, &disk);
    // The same without a backing file: unallocated subclusters read as zeroes.
    let alone = data.join("bb/alone");
    create(&alone, "extended_l2=on,cluster_size=32k", "1M");
    qemu_io(
        "qcow2",
        &alone,
        &["write -P 7 1k 1k", "write -z 5k 1k", "write -P 8 33k 100k"],
    );
    assert_reads_like_qemu(&alone, &open(&alone, None));
}

/// Builds pcocc's repository layout: ROOT/data/XX/<name> layers whose backing names are
/// `../../data/XX/<name>`; returns the top layer. The base is smaller than the layers
/// above it, as after `pcocc image resize`.
fn three_layer_chain(root: &Path) -> PathBuf {
    let layer = |xx: &str, name: &str| {
        let d = root.join("data").join(xx);
        fs::create_dir_all(&d).unwrap();
        d.join(name)
    };
    let base = layer("3a", "3a01");
    create(&base, "", "6M");
    scribble(&base, 65536, 0);
    qemu_io("qcow2", &base, &["write -P 0x61 4m 2m"]);
    let mid = layer("7c", "7c02");
    create(
        &mid,
        "backing_file=../../data/3a/3a01,backing_fmt=qcow2",
        "8M",
    );
    qemu_io(
        "qcow2",
        &mid,
        &[
            "write -P 0x62 100k 300k",
            "write -z 4m 512k",
            "discard 5m 64k",
            "write -P 0x63 7m 1m",
        ],
    );
    let top = layer("e1", "e103");
    create(
        &top,
        "backing_file=../../data/7c/7c02,backing_fmt=qcow2",
        "8M",
    );
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x64 0 64k",
            "write -z 128k 64k",
            "discard 4352k 128k",
            "write -P 0x65 7m 4k",
        ],
    );
    top
}

#[test]
fn three_layer_chain_with_relative_backing_names_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let top = three_layer_chain(root.path());
    let disk = open(&top, Some(&root.path().join("data")));
    assert_eq!(disk.layers().len(), 3);
    assert_eq!(disk.layers()[2].virtual_size(), 6 << 20, "shorter base");
    assert_reads_like_qemu(&top, &disk);
    let layer = Qcow2Layer::open(&top).unwrap();
    let b = layer.backing().expect("backing");
    assert_eq!(b.name, "../../data/7c/7c02");
    assert_eq!(b.format.as_deref(), Some("qcow2"));
}

#[test]
fn virtual_sizes_zero_one_byte_past_a_cluster_and_five_gib_sparse_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.qcow2");
    create(&zero, "", "0");
    let disk = open(&zero, None);
    assert_eq!(disk.virtual_size(), 0);
    assert!(disk.data_extents(0, u64::MAX).unwrap().is_empty());
    disk.read_at(&mut [], 0).unwrap();
    assert!(disk.read_at(&mut [0u8; 1], 0).is_err());

    let odd = dir.path().join("odd.qcow2");
    create(&odd, "", "65537");
    qemu_io(
        "qcow2",
        &odd,
        &["write -P 0x99 65536 1", "write -P 0x98 100 200"],
    );
    assert_reads_like_qemu(&odd, &open(&odd, None));

    let big = dir.path().join("big.qcow2");
    create(&big, "", "5G");
    qemu_io(
        "qcow2",
        &big,
        &[
            "write -P 1 0 64k",
            "write -P 2 3g 1m",
            "write -P 3 5119m 1m",
            "write -z 4g 1m",
        ],
    );
    assert_reads_like_qemu(&big, &open(&big, None));
}

#[test]
fn image_with_no_data_reads_zero_and_has_no_extents() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        let p = dir.path().join(format!("empty-{compat}.qcow2"));
        create(&p, &format!("compat={compat}"), "3M");
        let disk = open(&p, None);
        assert!(disk.data_extents(0, 3 << 20).unwrap().is_empty());
        // One map call answers the whole empty disk.
        let ext = disk.top().map(0, 3 << 20).unwrap();
        assert_eq!(ext.len, 3 << 20);
        assert_reads_like_qemu(&p, &disk);
    }
}

#[test]
fn contiguous_clusters_map_as_one_extent() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dense.qcow2");
    create(&p, "", "4M");
    qemu_io("qcow2", &p, &["write -P 3 0 2m"]);
    let layer = Qcow2Layer::open(&p).unwrap();
    let ext = layer.map(4096, 4 << 20).unwrap();
    assert!(ext.mapping.is_data());
    assert_eq!(
        ext.len,
        (2 << 20) - 4096,
        "one extent for 32 contiguous clusters"
    );
}

#[test]
fn threads_reading_random_ranges_get_the_same_bytes_as_a_sequential_read() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    fs::create_dir_all(data.join("cc")).unwrap();
    let src = root.path().join("src.raw");
    mixed_raw(&src, 6 << 20);
    let base = data.join("cc/base");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&base),
    ]);
    let top = data.join("cc/top");
    create(
        &top,
        "backing_file=base,backing_fmt=qcow2,cluster_size=4k",
        "8M",
    );
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x77 1m 1m",
            "write -z 3m 100k",
            "write -P 0x78 7m 1m",
        ],
    );
    let disk = Arc::new(open(&top, Some(&data)));
    let want = Arc::new(read_all(&disk, 1 << 20));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let (disk, want) = (disk.clone(), want.clone());
            std::thread::spawn(move || {
                let r = noise(t + 1, 3 * 400);
                let size = want.len() as u64;
                for i in 0..400 {
                    let a = u64::from(r[3 * i]) << 16 | u64::from(r[3 * i + 1]) << 8;
                    let off = (a * 97) % size;
                    let len = ((u64::from(r[3 * i + 2]) + 1) * 1531).min(size - off);
                    let mut buf = vec![0u8; len as usize];
                    disk.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf[..] == want[off as usize..(off + len) as usize],
                        "at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("reader thread");
    }
}

#[test]
fn raw_backing_file_inside_the_root_is_read_through() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base.raw");
    fs::write(&base, noise(9, 1 << 20)).unwrap();
    let top = root.path().join("top.qcow2");
    create(&top, "backing_file=base.raw,backing_fmt=raw", "2M");
    qemu_io("qcow2", &top, &["write -P 1 64k 64k", "write -z 256k 64k"]);
    let disk = open(&top, Some(root.path()));
    assert_eq!(disk.layers()[1].format(), super::super::Format::Raw);
    assert_reads_like_qemu(&top, &disk);
}

#[test]
fn internal_snapshots_do_not_change_what_the_active_layer_reads() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap.qcow2");
    create(&p, "", "2M");
    qemu_io("qcow2", &p, &["write -P 1 0 1M"]);
    qemu_img(&["snapshot", "-c", "before", s(&p)]);
    qemu_io("qcow2", &p, &["write -P 2 512k 1M", "discard 0 64k"]);
    assert_reads_like_qemu(&p, &open(&p, None));
}

#[test]
fn dirty_bit_from_lazy_refcounts_does_not_prevent_reading() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let bits = read_be64(&p, 72) | super::header::INCOMPAT_DIRTY;
    patch(&p, 72, &bits.to_be_bytes());
    let disk = open(&p, None);
    let mut buf = vec![0u8; 128 << 10];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
}

// ---- malformed inputs ----

/// A small valid v3 image with data in its first clusters.
fn valid_image(dir: &Path) -> PathBuf {
    let p = dir.join("victim.qcow2");
    create(&p, "cluster_size=65536", "4M");
    qemu_io("qcow2", &p, &["write -P 0x42 0 128k"]);
    p
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn read_be64(path: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    u64::from_be_bytes(b)
}

/// Host offset of the first L2 table of a (64 KiB-cluster) image.
fn first_l2_offset(path: &Path) -> u64 {
    let l1 = read_be64(path, 40);
    read_be64(path, l1) & super::header::OFFSET_MASK
}

fn open_err(path: &Path) -> String {
    let e = Qcow2Layer::open(path).expect_err("malformed image must not open");
    let msg = e.to_string();
    assert!(msg.contains(s(path)), "error names the file: {msg}");
    msg
}

#[test]
fn truncated_header_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let head = fs::read(&p).unwrap();
    fs::write(&p, &head[..50]).unwrap();
    assert!(open_err(&p).contains("truncated header"));
    fs::write(&p, &head[..90]).unwrap();
    assert!(open_err(&p).contains("truncated header"));
}

#[test]
fn l1_table_offset_past_end_of_file_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    assert!(open_err(&p).contains("L1 table"));
    patch(&p, 40, &(65536u64 + 512).to_be_bytes());
    assert!(open_err(&p).contains("not a nonzero multiple of the cluster size"));
}

#[test]
fn l1_size_asking_for_terabytes_fails_fast_without_allocating() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let t = Instant::now();
    patch(&p, 36, &0xffff_fff0u32.to_be_bytes());
    assert!(open_err(&p).contains("exceeds qemu's limit"));
    // A virtual size of 1 EiB with the L1 size it would need: over the L1 limit too.
    patch(&p, 24, &(1u64 << 60).to_be_bytes());
    patch(&p, 36, &(1u32 << 31).to_be_bytes());
    assert!(open_err(&p).contains("exceeds qemu's limit"));
    // An L1 within qemu's limit that is larger than the file.
    patch(&p, 24, &(1u64 << 50).to_be_bytes());
    patch(&p, 36, &(1u32 << 21).to_be_bytes());
    assert!(open_err(&p).contains("past the end of the file"));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn l2_entry_pointing_past_end_of_file_fails_the_read() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let l2 = first_l2_offset(&p);
    patch(&p, l2, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let disk = open(&p, None);
    let err = disk
        .read_at(&mut vec![0u8; 4096], 0)
        .expect_err("read past EOF");
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
    // The second cluster is still fine.
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    // An L1 entry naming an L2 table past the end fails the lookup.
    let l1 = read_be64(&p, 40);
    patch(&p, l1, &((1u64 << 63) | (1u64 << 41)).to_be_bytes());
    let disk = open(&p, None);
    let err = disk.read_at(&mut buf, 0).expect_err("L2 past EOF");
    assert!(err.to_string().contains("L2 table"), "{err}");
}

#[test]
fn refcount_table_sized_for_terabytes_is_refused_without_allocating() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let t = Instant::now();
    // 2^32 - 1 clusters of refcount table: 256 TiB of table for a 256 KiB file.
    patch(&p, 56, &u32::MAX.to_be_bytes());
    assert!(open_err(&p).contains("refcount table"));
    // Within qemu's limit, but at an offset past the end of the file.
    patch(&p, 56, &1u32.to_be_bytes());
    patch(&p, 48, &(1u64 << 50).to_be_bytes());
    assert!(open_err(&p).contains("refcount table"));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn sizes_near_u64_max_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let good = fs::read(&p).unwrap();
    for size in [u64::MAX, u64::MAX - 511, 1 << 63, i64::MAX as u64, 1 << 62] {
        fs::write(&p, &good).unwrap();
        patch(&p, 24, &size.to_be_bytes());
        let msg = open_err(&p);
        assert!(
            msg.contains("virtual size") || msg.contains("L1 table"),
            "size {size}: {msg}"
        );
    }
}

#[test]
fn regression_size_not_a_whole_sector_is_cut_to_sectors_as_qemu_does() {
    if !have_qemu() {
        return;
    }
    // Found by tests/hostile.rs: a header size of 344065 read as 344065 bytes here and
    // as 344064 by qemu (qemu-img itself only writes whole sectors).
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    for size in [344_065u64, 1_000_000, 131_071] {
        patch(&p, 24, &size.to_be_bytes());
        let info = qemu_img(&["info", "--output=json", s(&p)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let qemu = v["virtual-size"].as_u64().unwrap();
        assert_eq!(qemu, size / 512 * 512);
        let disk = open(&p, None);
        assert_eq!(disk.virtual_size(), qemu, "header size {size}");
        assert_reads_like_qemu(&p, &disk);
    }
}

#[test]
fn l2_entries_pointing_into_the_header_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let l2 = first_l2_offset(&p);
    let good = fs::read(&p).unwrap();
    // A data cluster inside the header cluster cannot be cluster-aligned (offset 0 is
    // "unallocated"), so it is refused as misaligned; a compressed cluster can be, and
    // is refused as lying in the header. Either way the header is never guest data.
    for (entry, want) in [
        ((1u64 << 63) | 512, "not cluster-aligned"),
        ((1u64 << 62) | 72, "inside the header cluster"),
    ] {
        fs::write(&p, &good).unwrap();
        patch(&p, l2, &entry.to_be_bytes());
        let disk = open(&p, None);
        let err = disk
            .read_at(&mut vec![0u8; 4096], 0)
            .expect_err("header read as guest data");
        assert!(err.to_string().contains(want), "{err}");
    }
    // An L1 entry naming the header cluster as an L2 table: offset 0 is unallocated,
    // any other offset in it is misaligned.
    fs::write(&p, &good).unwrap();
    let l1 = read_be64(&p, 40);
    patch(&p, l1, &((1u64 << 63) | 4096).to_be_bytes());
    let err = open(&p, None)
        .read_at(&mut vec![0u8; 4096], 0)
        .expect_err("header read as an L2 table");
    assert!(err.to_string().contains("not cluster-aligned"), "{err}");
}

#[test]
fn l1_entries_sharing_one_l2_table_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shared.qcow2");
    create(&p, "cluster_size=65536", "2G");
    qemu_io("qcow2", &p, &["write -P 0x42 0 64k"]);
    let l1 = read_be64(&p, 40);
    let first = read_be64(&p, l1);
    patch(&p, l1 + 8, &first.to_be_bytes());
    let msg = open_err(&p);
    assert!(msg.contains("named by more than one L1 entry"), "{msg}");
}

#[test]
fn compressed_descriptor_past_end_of_file_is_an_error() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 1 << 20);
    let p = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&p),
    ]);
    let l2 = first_l2_offset(&p);
    // Compressed flag, one sector, host offset 1 TiB.
    patch(&p, l2 + 8, &((1u64 << 62) | (1u64 << 40)).to_be_bytes());
    let disk = open(&p, None);
    let err = disk
        .read_at(&mut vec![0u8; 4096], 65536)
        .expect_err("compressed past EOF");
    assert!(err.to_string().contains("outside the file"), "{err}");
}

#[test]
fn external_data_file_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ext.qcow2");
    let data = dir.path().join("ext.data");
    create(&p, &format!("data_file={}", s(&data)), "1M");
    let msg = open_err(&p);
    assert!(
        msg.contains("external data file") && msg.contains("ext.data"),
        "{msg}"
    );
}

#[test]
fn encrypted_image_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=swordfish",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&p),
        "1M",
    ]);
    let msg = open_err(&p);
    assert!(msg.contains("encrypted (LUKS)"), "{msg}");
}

#[test]
fn unknown_incompatible_feature_bit_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let bits = read_be64(&p, 72) | (1 << 5);
    patch(&p, 72, &bits.to_be_bytes());
    let msg = open_err(&p);
    assert!(msg.contains("unknown incompatible feature bit 5"), "{msg}");
    assert!(matches!(
        Qcow2Layer::open(&p),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn nonsense_header_fields_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = valid_image(dir.path());
    let good = fs::read(&p).unwrap();
    let cases: &[(u64, &[u8], &str)] = &[
        (4, &4u32.to_be_bytes(), "version 4"),
        (20, &8u32.to_be_bytes(), "cluster_bits 8"),
        (20, &22u32.to_be_bytes(), "cluster_bits 22"),
        (100, &105u32.to_be_bytes(), "header_length"),
        (96, &7u32.to_be_bytes(), "refcount_order"),
        (56, &0u32.to_be_bytes(), "refcount table"),
        (16, &2000u32.to_be_bytes(), "backing file name"),
        (24, &(1u64 << 63).to_be_bytes(), "virtual size"),
    ];
    for (offset, bytes, want) in cases {
        fs::write(&p, &good).unwrap();
        if *offset == 16 {
            patch(&p, 8, &512u64.to_be_bytes());
        }
        patch(&p, *offset, bytes);
        let msg = open_err(&p);
        assert!(msg.contains(want), "patching {offset}: {msg}");
    }
}

// ---- backing chains and the policy ----

#[test]
fn backing_chain_that_loops_is_refused() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    create(&a, "", "1M");
    create(&b, "backing_file=a,backing_fmt=qcow2", "1M");
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b",
        "-F",
        "qcow2",
        s(&a),
    ]);
    let err = open_chain(
        &b,
        &WithinDir {
            root: root.path().into(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("backing chain loops"), "{err}");
    // An image naming itself.
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "a",
        "-F",
        "qcow2",
        s(&a),
    ]);
    let err = open_chain(
        &a,
        &WithinDir {
            root: root.path().into(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("backing chain loops"), "{err}");
}

#[test]
fn backing_names_absolute_or_escaping_the_root_are_refused() {
    if !have_qemu() {
        return;
    }
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("repo/data");
    fs::create_dir_all(root.join("aa")).unwrap();
    let secret = outer.path().join("secret.qcow2");
    create(&secret, "", "1M");
    let policy = WithinDir { root: root.clone() };
    let layer = root.join("aa/layer");
    for name in [
        s(&secret).to_string(),
        "../../../secret.qcow2".into(),
        "/etc/passwd".into(),
    ] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &name,
            "-F",
            "qcow2",
            s(&layer),
            "1M",
        ]);
        let err = open_chain(&layer, &policy).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("absolute path") || msg.contains("outside the allowed directory"),
            "{name}: {msg}"
        );
    }
    // A symlink inside the root that leads out of it is refused too.
    std::os::unix::fs::symlink(&secret, root.join("aa/link")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "link",
        "-F",
        "qcow2",
        s(&layer),
        "1M",
    ]);
    let msg = open_chain(&layer, &policy).unwrap_err().to_string();
    assert!(msg.contains("symbolic link"), "{msg}");
}

#[test]
fn no_backing_policy_refuses_any_backing_file_and_says_so() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let top = three_layer_chain(root.path());
    let msg = open_chain(&top, &NoBacking).unwrap_err().to_string();
    assert!(
        msg.contains("backing file") && msg.contains("standalone"),
        "{msg}"
    );
}

#[test]
fn chain_deeper_than_the_limit_is_refused() {
    if !have_qemu() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut prev = root.path().join("l0");
    create(&prev, "", "1M");
    for i in 1..=super::super::MAX_CHAIN_DEPTH {
        let next = root.path().join(format!("l{i}"));
        let backing = format!("backing_file=l{},backing_fmt=qcow2", i - 1);
        create(&next, &backing, "1M");
        prev = next;
    }
    let err = open_chain(
        &prev,
        &WithinDir {
            root: root.path().into(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("deeper than"), "{err}");
    // One layer less is fine.
    let below = root
        .path()
        .join(format!("l{}", super::super::MAX_CHAIN_DEPTH - 1));
    let disk = open_chain(
        &below,
        &WithinDir {
            root: root.path().into(),
        },
    )
    .unwrap();
    assert_eq!(disk.layers().len(), super::super::MAX_CHAIN_DEPTH);
}
