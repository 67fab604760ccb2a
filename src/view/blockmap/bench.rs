//! Measures what issue 4 asks of layouts: a 1 TiB virtual disk with 100 MiB of data in
//! 1600 scattered 64 KiB pieces. Run by hand (it writes 100 MiB):
//! `cargo test --lib view::blockmap::bench -- --ignored --nocapture`.

use crate::image::Format;
use crate::view::{View, ViewId};
use std::time::Instant;

#[test]
#[ignore = "benchmark: writes 100 MiB, run by hand"]
fn layout_of_a_1_tib_disk_with_100_mib_of_data() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 40).unwrap();
    let chunk = crate::testutil::noise(1, 64 << 10);
    // 1600 chunks of 64 KiB, one every ~687 MiB: every one its own run.
    let stride = (1u64 << 40) / 1600;
    for i in 0..1600u64 {
        f.write_all_at(&chunk, i * stride / 65536 * 65536).unwrap();
    }
    drop(f);
    let qcow2 = dir.path().join("big.qcow2");
    let (src, dst) = (path.to_str().unwrap(), qcow2.to_str().unwrap());
    crate::testutil::qemu_img(&["convert", "-O", "qcow2", src, dst]);
    let policy = crate::image::chain::NoBacking;
    let from_qcow2 = crate::image::chain::open_chain(&qcow2, &policy).unwrap();
    for (source, disk) in [
        ("raw", super::check::raw_disk(&path)),
        ("qcow2", std::sync::Arc::new(from_qcow2)),
    ] {
        println!("source: {source}");
        layouts_of(disk);
    }
}

fn layouts_of(disk: std::sync::Arc<crate::image::Disk>) {
    for format in [Format::Vmdk, Format::Vdi, Format::Vpc, Format::Vmdk] {
        let t = Instant::now();
        let view = View::new(disk.clone(), format, ViewId([9; 32]));
        let layout = t.elapsed();
        let Ok(view) = view else {
            println!("{format}: {}", view.unwrap_err());
            continue;
        };
        // Read every generated table once, front to back, through the view.
        let t = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut tables = 0u64;
        let first_data = view.data_extents().unwrap()[0].1;
        while tables < first_data.min(view.size()) {
            tables += view.read_at(&mut buf, tables).unwrap() as u64;
        }
        println!(
            "{format}: layout {layout:?}, size {} bytes, allocated {} bytes, \
             first extent ({tables} bytes) read in {:?}",
            view.size(),
            view.allocated_bytes(),
            t.elapsed()
        );
    }
}

/// Reads every view of a 512 MiB dense disk front to back in 1 MiB reads, the raw view
/// first as the baseline: what the segment mapping costs on the data path.
#[test]
#[ignore = "benchmark: writes 512 MiB, run by hand"]
fn sequential_read_of_each_view_of_a_dense_disk() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dense.raw");
    let f = std::fs::File::create(&path).unwrap();
    let chunk = crate::testutil::noise(2, 1 << 20);
    for i in 0..512u64 {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    drop(f);
    let disk = super::check::raw_disk(&path);
    let mut buf = vec![0u8; 1 << 20];
    for format in [
        Format::Raw,
        Format::Vmdk,
        Format::Vdi,
        Format::Vpc,
        Format::Raw,
    ] {
        let view = View::new(disk.clone(), format, ViewId([9; 32])).unwrap();
        let t = Instant::now();
        let mut pos = 0u64;
        loop {
            let n = view.read_at(&mut buf, pos).unwrap();
            if n == 0 {
                break;
            }
            pos += n as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{format}: {pos} bytes in {secs:.3} s, {:.0} MB/s",
            pos as f64 / secs / 1e6
        );
    }
}
