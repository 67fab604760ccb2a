//! The import converter: any disk (a raw, qcow2, qed, vdi, vpc or vmdk file read through
//! its [`Disk`]) becomes one standalone qcow2 layer, the form a repository stores.
//!
//! Two passes, both streaming. The first reads only the clusters the source stores and
//! keeps the runs of 64 KiB clusters that hold a non-zero byte (a compact run list, never
//! a bitmap of the disk); a caller that already knows them (an import that watched its
//! bytes arrive, [`Options::nonzero`]) skips it. The second writes the file front to back
//! in the arrangement of [`Qcow2Layout`] (the same one `disk.qcow2` serves), hashing every
//! byte with sha256 as it goes. Zero blocks of the output, in tables or data, are not
//! written, so they stay holes in the layer file but are hashed as the zeroes they read
//! as. The output depends only on the disk's content: the same content gives the same
//! bytes and the same hash, whatever the source format or its allocation.
//!
//! The layer is synced by the caller; its write-back is paced as it is written
//! ([`super::writeback`]), so the disk works while the conversion does and the final
//! sync finds little left to write.

use super::qcow2_layout::{CLUSTER_SIZE, Part, Qcow2Layout, ZERO_BLOCK, allocated_clusters};
use super::writeback::Writeback;
use super::{Disk, Error, Result};
use crate::sys::MappedBuf;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

/// Bytes read or written per call: large enough to amortise calls and table lookups,
/// small enough to stay in cache (a multiple of the cluster size).
const CHUNK: usize = 4 << 20;
/// Granularity of hole detection in the output: the block at which views report holes
/// too, the usual filesystem block.
const BLOCK: usize = ZERO_BLOCK as usize;
/// Buffers in flight between the writer and the hashing thread: one being filled, one
/// being hashed, one queued. Each is its own mapping ([`MappedBuf`]), returned to the
/// system when the conversion ends: a daemon keeps no conversion memory between
/// imports, whichever of its threads ran them.
const BUFFERS: usize = 3;

/// What a conversion may use or do besides the disk and the output.
pub struct Options<'a> {
    /// Called with (bytes done, bytes to do) as the passes advance; the total may shrink
    /// once the first pass knows how much data is zero.
    pub progress: &'a mut dyn FnMut(u64, u64),
    /// The sorted, merged runs `(first cluster, count)` of 64 KiB guest clusters holding
    /// a non-zero byte, when the caller knows them exactly: the first pass is skipped.
    /// A wrong list gives a wrong layer; only exact knowledge may be passed.
    pub nonzero: Option<Vec<(u64, u64)>>,
    /// Called with a guest offset below which the conversion will read nothing more, in
    /// increasing order (the second pass reads guest data front to back). A caller whose
    /// source is a scratch copy of a raw disk can drop what was read (its dirty pages
    /// then never reach the disk). An error stops the conversion.
    pub consumed: Option<&'a mut dyn FnMut(u64) -> Result<()>>,
    /// Called with each guest range `(offset, len)` before it is read, for a source whose
    /// bytes are still arriving: returns once they can be read, or fails to stop the
    /// conversion.
    pub gate: Option<&'a mut dyn FnMut(u64, u64) -> Result<()>>,
    /// `nonzero` is a guess (the allocated clusters of a source still arriving), not
    /// knowledge: every data cluster read is checked, and the first one that holds only
    /// zeroes stops the conversion with [`Error::Unsupported`] (the layout would not be
    /// the one the disk's content gives).
    pub guessed: bool,
}

impl<'a> Options<'a> {
    /// Progress reporting only.
    pub fn new(progress: &'a mut dyn FnMut(u64, u64)) -> Options<'a> {
        Options {
            progress,
            nonzero: None,
            consumed: None,
            gate: None,
            guessed: false,
        }
    }
}

/// The layer that was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    /// sha256 of the file's bytes, lowercase hex: the layer's name in a repository.
    pub sha256: String,
    /// Length of the file in bytes.
    pub len: u64,
}

/// Writes `disk` as a standalone qcow2 layer into `out` (opened for writing from
/// `out_path`, which only names it in errors), replacing what `out` held. `progress` is
/// called with (bytes done, bytes to do) as the passes advance; the total may shrink once
/// the first pass knows how much data is zero. The caller syncs the file.
pub fn to_qcow2_layer(
    disk: &Disk,
    out: &File,
    out_path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Converted> {
    convert(disk, out, out_path, Options::new(progress))
}

/// [`to_qcow2_layer`] with [`Options`].
pub fn convert(disk: &Disk, out: &File, out_path: &Path, opts: Options) -> Result<Converted> {
    let Options {
        progress,
        nonzero,
        mut consumed,
        mut gate,
        guessed,
    } = opts;
    let size = disk.virtual_size();
    // Refuse a disk too big for the format before reading any of it.
    Qcow2Layout::new(disk.top().path(), size, &[])?;
    let started = Instant::now();
    let mut done = 0u64;
    let new_buf = || MappedBuf::new(CHUNK).map_err(|e| Error::io(out_path, e));
    let mut buf = new_buf()?;
    let (kept, scan_bytes) = match nonzero {
        Some(kept) => (kept, 0),
        None => {
            let kept = nonzero_runs(disk, &mut buf, &mut done, progress)?;
            (kept, done)
        }
    };
    let data_bytes: u64 = kept
        .iter()
        .map(|&(first, count)| clip(first, count, size))
        .sum();
    let total = scan_bytes + data_bytes;
    progress(done, total);
    let scanned = Instant::now();

    // Pass 2: the file, front to back. Hashing runs on a second thread, fed the
    // buffers just written, so it overlaps the next read and write instead of adding to
    // them (sha256 costs about as much as the copy itself).
    let layout = Qcow2Layout::new(disk.top().path(), size, &kept)?;
    out.set_len(0).map_err(|e| Error::io(out_path, e))?;
    let file_size = layout.file_size();
    let sha256 = std::thread::scope(|s| -> Result<String> {
        let (to_hash, hash_rx) = mpsc::sync_channel::<(MappedBuf, usize)>(BUFFERS);
        let (to_reuse, reuse_rx) = mpsc::sync_channel::<MappedBuf>(BUFFERS);
        let hasher = s.spawn(move || {
            let mut h = Sha256::new();
            for (buf, n) in hash_rx {
                h.update(&buf[..n]);
                // The writer may have stopped on an error: nobody to give it back to.
                let _ = to_reuse.send(buf);
            }
            format!("{:x}", h.finalize())
        });
        let mut spare = Some(buf);
        let mut made = 1;
        let mut pos = 0u64;
        let mut writeback = Writeback::new();
        while pos < file_size {
            let mut buf = match spare.take() {
                Some(b) => b,
                None if made < BUFFERS => {
                    made += 1;
                    new_buf()?
                }
                None => match reuse_rx.recv() {
                    Ok(b) => b,
                    Err(_) => break, // the hasher is gone: its join below reports why
                },
            };
            let span = layout.span(pos);
            let n = span.len.min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            match span.part {
                Part::Table => layout.generate(pos, chunk),
                Part::Zero => chunk.fill(0),
                Part::Data(guest) => {
                    let real = size.saturating_sub(guest).min(n as u64) as usize;
                    if let Some(gate) = gate.as_mut() {
                        gate(guest, real as u64)?;
                    }
                    disk.read_at(&mut chunk[..real], guest)?;
                    if guessed && chunk[..real].chunks(CLUSTER_SIZE as usize).any(is_zero) {
                        return Err(Error::Unsupported {
                            path: disk.top().path().to_path_buf(),
                            format: disk.top().format(),
                            reason: "a cluster guessed to hold data reads as zeroes".into(),
                        });
                    }
                    chunk[real..].fill(0);
                    if let Some(consumed) = consumed.as_mut() {
                        consumed(guest + real as u64)?;
                    }
                    done += real as u64;
                    progress(done, total);
                }
            }
            write_sparse(out, out_path, chunk, pos)?;
            pos += n as u64;
            writeback.wrote(out, pos - n as u64, n as u64);
            if to_hash.send((buf, n)).is_err() {
                break; // the hasher is gone: its join below reports why
            }
        }
        drop(to_hash);
        hasher.join().map_err(|_| {
            Error::io(
                out_path,
                std::io::Error::other("the hashing thread panicked"),
            )
        })
    })?;
    out.set_len(file_size).map_err(|e| Error::io(out_path, e))?;
    log::debug!(
        "{}: {} bytes of data scanned in {:.2?}, layer of {file_size} bytes written in {:.2?}",
        disk.top().path().display(),
        scan_bytes,
        scanned - started,
        scanned.elapsed()
    );
    Ok(Converted {
        sha256,
        len: file_size,
    })
}

/// Pass 1: the runs of stored clusters of `disk` that hold anything but zeroes, read
/// through `buf`; `done` counts the bytes read.
fn nonzero_runs(
    disk: &Disk,
    buf: &mut [u8],
    done: &mut u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<(u64, u64)>> {
    let size = disk.virtual_size();
    let allocated = allocated_clusters(disk, CLUSTER_SIZE)?;
    let scan_bytes: u64 = allocated
        .iter()
        .map(|&(first, count)| clip(first, count, size))
        .sum();
    let mut kept: Vec<(u64, u64)> = Vec::new();
    let per_chunk = buf.len() as u64 / CLUSTER_SIZE;
    for &(first, count) in &allocated {
        let mut c = first;
        while c < first + count {
            let n = per_chunk.min(first + count - c);
            let start = c * CLUSTER_SIZE;
            let len = clip(c, n, size) as usize;
            disk.read_at(&mut buf[..len], start)?;
            for (i, cluster) in buf[..len].chunks(CLUSTER_SIZE as usize).enumerate() {
                if !is_zero(cluster) {
                    push_run(&mut kept, c + i as u64);
                }
            }
            c += n;
            *done += len as u64;
            progress(*done, scan_bytes * 2);
        }
    }
    Ok(kept)
}

/// Adds cluster `at` (not below the last one) to the sorted, merged runs `runs`.
pub fn push_run(runs: &mut Vec<(u64, u64)>, at: u64) {
    match runs.last_mut() {
        Some((s, k)) if *s + *k == at => *k += 1,
        Some((s, k)) if at < *s + *k => {}
        _ => runs.push((at, 1)),
    }
}

/// Guest bytes of `count` clusters from cluster `first`, cut at the disk's end.
fn clip(first: u64, count: u64, size: u64) -> u64 {
    ((first + count) * CLUSTER_SIZE).min(size) - first * CLUSTER_SIZE
}

/// True when `buf` holds only zeroes. Folds fixed blocks without branching (the compiler
/// vectorises the fold) and stops at the first block with a non-zero byte.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(512)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Largest write into a new file's page cache: the kernel sizes the page-cache folios
/// of a buffered write from its length, and higher-order folios cost up to 4× more to
/// fill on a virtual machine that returns free memory to its host (measured: 2.3 GB
/// written in 1 MiB pieces 0.5–2.8 s, in 128 KiB pieces 0.64–1.0 s).
pub const WRITE_PIECE: usize = 128 << 10;

/// Writes `buf` at `offset` into a fresh file, leaving its all-zero 4 KiB blocks
/// (counted from `offset`, which a layout's whole clusters keep block-aligned) unwritten
/// so they stay holes.
pub(crate) fn write_sparse(out: &File, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
    let block_end = |at: usize| (at + BLOCK).min(buf.len());
    let mut i = 0usize;
    while i < buf.len() {
        if is_zero(&buf[i..block_end(i)]) {
            i = block_end(i);
            continue;
        }
        // Write the run of non-zero blocks that starts here in one call, up to
        // WRITE_PIECE bytes.
        let mut j = block_end(i);
        while j < buf.len() && j - i < WRITE_PIECE && !is_zero(&buf[j..block_end(j)]) {
            j = block_end(j);
        }
        out.write_all_at(&buf[i..j], offset + i as u64)
            .map_err(|e| Error::io(path, e))?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Format;
    use crate::image::qcow2_layout::{SECTOR_SIZE, align_up};
    use crate::testutil::{self, data_runs, qemu_img, qemu_map};
    use crate::view::View;
    use crate::view::judge::{SCATTERED_1G, Source, TEST_ID, qcow2_disk, raw_disk, raw_source};
    use std::os::unix::fs::MetadataExt;

    /// Converts `disk` into `dir/name`; returns the result and the output path.
    fn convert(disk: &Disk, dir: &Path, name: &str) -> (Converted, std::path::PathBuf) {
        let path = dir.join(name);
        let out = File::create(&path).expect("create output");
        let mut calls = 0u64;
        let mut last = (0u64, 0u64);
        let got = to_qcow2_layer(disk, &out, &path, &mut |done, total| {
            assert!(done >= last.0, "progress goes forward");
            assert!(done <= total, "progress stays within its total");
            last = (done, total);
            calls += 1;
        })
        .expect("convert");
        assert_eq!(last.0, last.1, "progress ends complete");
        (got, path)
    }

    /// The 64 KiB clusters of `disk` with a non-zero byte, as guest byte runs cut at the
    /// size qemu sees.
    fn nonzero_clusters(disk: &Disk) -> Vec<(u64, u64)> {
        let size = disk.virtual_size();
        let mut buf = vec![0u8; CLUSTER_SIZE as usize];
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (first, count) in allocated_clusters(disk, CLUSTER_SIZE).unwrap() {
            for c in first..first + count {
                let start = c * CLUSTER_SIZE;
                let n = (size - start).min(CLUSTER_SIZE) as usize;
                disk.read_at(&mut buf[..n], start).unwrap();
                if buf[..n].iter().any(|&b| b != 0) {
                    let len = (align_up(size, SECTOR_SIZE) - start).min(CLUSTER_SIZE);
                    match out.last_mut() {
                        Some((s, l)) if *s + *l == start => *l += len,
                        _ => out.push((start, len)),
                    }
                }
            }
        }
        out
    }

    /// Converts the raw file `src` and judges the layer: qemu-img check clean and
    /// identical to the source, data exactly on the non-zero clusters, sparse on disk,
    /// hash and length those of the file, and a second conversion byte-identical.
    fn judge_conversion(src: &Path) -> Converted {
        judge_disk_conversion(&raw_disk(src), src, "raw")
    }

    /// [`judge_conversion`] of any disk read from `src` (format `fmt`).
    fn judge_disk_conversion(disk: &Disk, src: &Path, fmt: &str) -> Converted {
        let dir = src.parent().unwrap();
        let (got, out) = convert(disk, dir, "layer.qcow2");
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(got.len, bytes.len() as u64, "reported length");
        assert_eq!(
            got.sha256,
            format!("{:x}", Sha256::digest(&bytes)),
            "reported hash is the file's"
        );
        testutil::assert_qemu_accepts(
            &out,
            "qcow2",
            align_up(disk.virtual_size(), SECTOR_SIZE),
            src,
            fmt,
        );
        let check = qemu_img(&["check", "--output=json", out.to_str().unwrap()]);
        let check: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(check["leaks"].as_u64().unwrap_or(0), 0, "no leak: {check}");
        assert_eq!(check["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
        let expected = nonzero_clusters(disk);
        assert_eq!(data_runs(&qemu_map(&out, Some("qcow2"))), expected);
        let data: u64 = expected.iter().map(|(_, l)| l).sum();
        let on_disk = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            on_disk <= data + (256 << 10),
            "layer holds {on_disk} bytes for {data} bytes of data"
        );
        let (again, _) = convert(disk, dir, "again.qcow2");
        assert_eq!(again, got, "converting twice gives the same layer");
        got
    }

    #[test]
    fn raw_import_becomes_a_sparse_qcow2_without_its_zero_clusters() {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = raw_source(dir.path(), "src.raw", 1 << 30, &SCATTERED_1G);
        judge_conversion(&src);
    }

    #[test]
    fn same_content_with_different_allocation_gives_the_same_layer() {
        if !testutil::have_qemu() {
            return;
        }
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        // One source stores zeroes explicitly, the other leaves a hole there.
        let with_zeroes = ["write -P 7 0 1M", "write -P 0 8M 4M", "write -P 9 20M 64k"];
        let src_a = raw_source(a.path(), "a.raw", 64 << 20, &with_zeroes);
        let src_b = raw_source(
            b.path(),
            "b.raw",
            64 << 20,
            &["write -P 7 0 1M", "write -P 9 20M 64k"],
        );
        assert_eq!(judge_conversion(&src_a), judge_conversion(&src_b));
    }

    #[test]
    fn empty_and_odd_sized_disks_convert() {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        judge_conversion(&raw_source(dir.path(), "empty.raw", 0, &[]));
        let dir = tempfile::tempdir().unwrap();
        judge_conversion(&raw_source(
            dir.path(),
            "odd.raw",
            65537,
            &["write -P 0x5a 65536 1"],
        ));
    }

    #[test]
    fn five_gib_sparse_disk_converts_to_a_small_layer() {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = raw_source(
            dir.path(),
            "big.raw",
            5 << 30,
            &[
                "write -P 1 1M 1M",
                "write -P 2 3G 2M",
                "write -P 3 5119M 1M",
            ],
        );
        let got = judge_conversion(&src);
        assert!(got.len < 8 << 20, "layer of {} bytes", got.len);
    }

    fn judge_source_conversion(source: Source) {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (src, fmt) = source.build(dir.path());
        let disk = qcow2_disk(&src, dir.path());
        judge_disk_conversion(&disk, &src, fmt);
    }

    #[test]
    fn plain_qcow2_import_drops_zero_and_discarded_clusters() {
        judge_source_conversion(Source::Plain);
    }

    #[test]
    fn compressed_qcow2_imports_uncompressed() {
        judge_source_conversion(Source::Zlib);
        judge_source_conversion(Source::Zstd);
    }

    #[test]
    fn three_layer_chain_imports_as_one_layer() {
        judge_source_conversion(Source::Chain);
    }

    #[test]
    fn qcow2_sources_of_odd_shapes_import() {
        judge_source_conversion(Source::Empty);
        judge_source_conversion(Source::OneBytePastCluster);
        judge_source_conversion(Source::Sparse5G);
        judge_source_conversion(Source::Cluster2M);
    }

    #[test]
    fn converted_layer_is_the_qcow2_view_of_the_same_disk() {
        if !testutil::have_qemu() {
            return;
        }
        // A disk without zero clusters: the view and the layer have the same clusters,
        // so they must be the same bytes.
        let dir = tempfile::tempdir().unwrap();
        let src = raw_source(
            dir.path(),
            "src.raw",
            3 << 30,
            &["write -P 1 0 1M", "write -P 2 600M 64k", "write -P 3 2G 3M"],
        );
        let disk = raw_disk(&src);
        let (got, out) = convert(&disk, dir.path(), "layer.qcow2");
        let view = View::new(disk, Format::Qcow2, TEST_ID).unwrap();
        let copy = dir.path().join("view.qcow2");
        let hash = testutil::write_view_sparse(&view, &copy, 1 << 20);
        assert_eq!(hash, got.sha256);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&copy).unwrap());
    }

    #[test]
    fn same_content_in_any_format_gives_the_same_layer() {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = raw_source(dir.path(), "src.raw", 1 << 30, &SCATTERED_1G);
        let (want, _) = convert(&raw_disk(&raw), dir.path(), "from-raw.qcow2");
        for opts in [
            "compression_type=zlib",
            "compression_type=zstd",
            "cluster_size=2M",
        ] {
            let q = dir.path().join("src.qcow2");
            let compress = if opts.starts_with("compression") {
                "-c"
            } else {
                "-q"
            };
            qemu_img(&[
                "convert",
                "-q",
                compress,
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                opts,
                raw.to_str().unwrap(),
                q.to_str().unwrap(),
            ]);
            let (got, _) = convert(&qcow2_disk(&q, dir.path()), dir.path(), "from-qcow2.qcow2");
            assert_eq!(got, want, "layer of a qcow2 copy made with {opts}");
        }
    }

    /// The single-layer disk of an image file in `format`, read by this crate's reader.
    fn single_layer_disk(path: &Path, format: Format) -> std::sync::Arc<Disk> {
        use std::sync::Arc;
        let file = File::open(path).unwrap();
        let layer: Arc<dyn crate::image::Layer> = match format {
            Format::Qed => Arc::new(crate::image::qed::open(file, path).unwrap()),
            Format::Vdi => Arc::new(crate::image::vdi::open(file, path).unwrap()),
            Format::Vpc => Arc::new(crate::image::vpc::open(file, path).unwrap()),
            Format::Vmdk => Arc::new(crate::image::vmdk::open(file, path).unwrap()),
            other => panic!("no single-layer opener for {other} in this test"),
        };
        Arc::new(Disk::new(vec![layer]))
    }

    #[test]
    fn every_import_format_gives_the_layer_of_its_content() {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = raw_source(dir.path(), "src.raw", 1 << 30, &SCATTERED_1G);
        let (want, _) = convert(&raw_disk(&raw), dir.path(), "from-raw.qcow2");
        let cases: [(Format, &[&str]); 5] = [
            (Format::Qed, &[]),
            (Format::Vdi, &[]),
            // An exact size, not one rounded to a CHS geometry.
            (Format::Vpc, &["-o", "force_size=on"]),
            (Format::Vmdk, &[]),
            (Format::Vmdk, &["-o", "subformat=streamOptimized"]),
        ];
        for (format, opts) in cases {
            let sub = tempfile::tempdir_in(dir.path()).unwrap();
            let src = sub.path().join(format!("src.{format}"));
            let mut args = vec!["convert", "-q", "-f", "raw", "-O", format.name()];
            args.extend_from_slice(opts);
            args.extend([raw.to_str().unwrap(), src.to_str().unwrap()]);
            qemu_img(&args);
            let disk = single_layer_disk(&src, format);
            let got = judge_disk_conversion(&disk, &src, format.name());
            assert_eq!(
                got, want,
                "layer of a {format} {opts:?} copy of the raw source"
            );
        }
    }

    #[test]
    fn four_tib_disk_with_data_every_16_gib_converts() {
        if !testutil::have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cmds: Vec<String> = (0..64u64)
            .map(|i| format!("write -P {} {} 64k", i + 1, (i << 36) + (i << 12)))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let src = raw_source(dir.path(), "wide.raw", 4 << 40, &cmds);
        let got = judge_conversion(&src);
        assert!(got.len < 16 << 20, "layer of {} bytes", got.len);
    }
}
