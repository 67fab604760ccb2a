//! A VDI, dynamic VHD or hosted sparse VMDK (monolithicSparse or streamOptimized) file
//! being imported, converted while its bytes arrive.
//!
//! These formats hold their headers and their tables before their first data block
//! (a VMDK whose grain tables do not is left alone; a streamOptimized one as qemu-img
//! writes it has them first, and each compressed grain's stored length in a marker
//! before it, which the stream must have passed before the grain is mapped), and `cp`,
//! `cat` or `dd` write them front to back. So once a file written in order has passed
//! its data start ([`data_start`]), a thread of its own opens it
//! ([`vdi::open_arriving`], [`vpc::open_arriving`], [`vmdk::open_arriving`]) and converts
//! it ([`convert::convert`]) as the blocks come, each read waiting until the stream has
//! gone past the bytes it needs. The layer's layout must be the one the disk's content
//! gives (the same bytes and the same name whatever the source), which needs to know
//! which clusters hold data before the first byte of the layer is written: it is guessed
//! from the block map (every allocated cluster holds data: true of a fully written disk,
//! and of a streamOptimized VMDK, whose writer stores only the grains holding data) and
//! checked cluster by cluster; the first cluster that reads as zeroes ends the attempt.
//! A write going back, a file cut shorter, or a failed guess stop the thread and leave
//! the file to the conversion at its close, as before; so does anything the complete
//! file fails at its close that the early open let pass (it is opened again then).
//!
//! The copy received of a created file (not a staging file, which stays when its
//! publish fails) is read only by this conversion, once: what it has read is dropped
//! from the copy as it goes ([`Dropper`]), so that the copy's pages leave the page cache
//! without being written to the disk, and a file converted while it arrives is written
//! to the disk once, as its layer. Whenever the copy is needed as it was written after
//! all (the thread stopped for any of the reasons above, a read of the file before its
//! close), the dropped bytes are first written back from the conversion's output, which
//! holds every one of them.
//!
//! QED is not converted while it arrives: qemu writes each of its L2 tables after the
//! data it maps, so the layout is known only at the end. Neither is a VMDK whose grain
//! directory follows its grains.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::follow::{Followed, Follower};
use crate::image::convert::{self, Converted};
use crate::image::qcow2_layout::{CLUSTER_SIZE, allocated_clusters};
use crate::image::{self, Disk, Format, Layer, Mapping, vdi, vmdk, vpc};
use crate::store::{Store, TmpFile};

/// The length a file still arriving is assumed to have when it is opened: its blocks are
/// only read once they have arrived, and the complete file is checked again at its close.
const ASSUMED_LEN: u64 = 1 << 50;

fn stopped(path: &Path, why: &str) -> image::Error {
    image::Error::io(path, std::io::Error::other(why.to_string()))
}

/// Where the data of a file starting with `head` starts, and its format, when it is one
/// converted while it arrives.
pub fn data_start(head: &[u8]) -> Option<(u64, Format)> {
    vdi::data_start(head)
        .map(|at| (at, Format::Vdi))
        .or_else(|| vpc::data_start(head).map(|at| (at, Format::Vpc)))
        .or_else(|| vmdk::data_start(head).map(|at| (at, Format::Vmdk)))
}

/// Where an import stands with its conversion while it arrives.
#[derive(Debug)]
pub enum Streaming {
    /// Not started: where the data starts and the format ([`data_start`]).
    Before((u64, Format)),
    /// Running.
    Running(StreamConvert),
}

/// The conversion of one stream (see the module text).
#[derive(Debug)]
pub struct StreamConvert {
    follower: Follower<Ended>,
    /// The format the stream is read as.
    format: Format,
    /// Source bytes dropped so far (see [`Dropper`]).
    dropped: Arc<AtomicU64>,
    /// End of the last run dropped, in the scratch file.
    dropped_to: Arc<AtomicU64>,
    /// It drops what it has read of the scratch file.
    drops: bool,
}

/// What a conversion thread leaves: its output (complete or not), what it gave, and
/// what it dropped of the scratch file.
struct Ended {
    out: TmpFile,
    result: image::Result<Converted>,
    dropper: Dropper,
}

/// A conversion that ran to its end.
#[derive(Debug)]
pub struct Streamed {
    out: TmpFile,
    converted: Converted,
    dropper: Dropper,
}

impl Streamed {
    /// The layer, to be stored: the scratch file it was made from is not needed again.
    pub fn into_layer(self) -> (TmpFile, Converted) {
        (self.out, self.converted)
    }

    /// The layer is not used: puts back into the scratch file what the conversion
    /// dropped of it, for a conversion of the file at its close.
    pub fn restore(self) -> image::Result<()> {
        self.dropper.restore(&self.out)
    }
}

impl StreamConvert {
    /// Starts converting `file` (named `path`; its data start and format as
    /// [`data_start`] gives them), whose first `ready` bytes (past its data start) are
    /// final, into a new scratch file of `store` (made now, by the caller's identity, as
    /// the layer must be). With `drop`, the data it has read is dropped from `file`
    /// (see [`Dropper`]): only for a scratch copy nobody reads but through this module's
    /// owner, which then calls [`StreamConvert::stop`] before anything else touches the
    /// bytes already written. `None` when it cannot start.
    pub fn start(
        store: &Store,
        file: &File,
        path: &Path,
        (from, format): (u64, Format),
        ready: u64,
        drop: bool,
    ) -> Option<StreamConvert> {
        let out = store.tmp_file().ok()?;
        let dropped = Arc::new(AtomicU64::new(0));
        let dropped_to = Arc::new(AtomicU64::new(0));
        let dropper = Dropper {
            file: file.try_clone().ok()?,
            path: path.to_path_buf(),
            enabled: drop,
            queued: Vec::new(),
            queued_bytes: 0,
            dropped: Vec::new(),
            holes: Default::default(),
            total: dropped.clone(),
            to: dropped_to.clone(),
        };
        let file = file.try_clone().ok()?;
        let path = path.to_path_buf();
        let follower = Follower::spawn("import-convert", ready, move |followed| {
            let mut dropper = dropper;
            let result = convert_stream(file, &path, (from, format), &out, followed, &mut dropper);
            Ended {
                out,
                result,
                dropper,
            }
        })?;
        Some(StreamConvert {
            follower,
            format,
            dropped,
            dropped_to,
            drops: drop,
        })
    }

    /// The format the stream is read as.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Every byte below `ready` is final.
    pub fn advance(&self, ready: u64) {
        self.follower.advance(ready);
    }

    /// Whether it drops what it has read of the scratch file: nothing but its owner may
    /// read the file until it is stopped ([`StreamConvert::stop`]).
    pub fn drops(&self) -> bool {
        self.drops
    }

    /// End of the last run dropped from the scratch file (0 before the first).
    pub fn dropped_to(&self) -> u64 {
        self.dropped_to.load(Ordering::Acquire)
    }

    /// Bytes of the scratch file dropped so far (they read as zeroes until
    /// [`StreamConvert::stop`] or [`Streamed::restore`] puts them back).
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }

    /// The file is complete at `len` bytes: the conversion, once the thread is done, or
    /// `Ok(None)` if it stopped (the scratch file is whole again: the caller converts
    /// it itself). An error says the scratch file could not be made whole again.
    pub fn finish(self, len: u64) -> image::Result<Option<Streamed>> {
        let ended = self.follower.finish(len);
        // Counted once the thread is done: it may have dropped more before it ended.
        let dropped = self.dropped.load(Ordering::Acquire);
        match ended {
            Some(Ended {
                out,
                result: Ok(converted),
                dropper,
            }) => Ok(Some(Streamed {
                out,
                converted,
                dropper,
            })),
            Some(Ended {
                out,
                result: Err(e),
                dropper,
            }) => {
                log::debug!("converted at close: {e}");
                dropper.restore(&out).map(|()| None)
            }
            None => lost(dropped).map(|()| None),
        }
    }

    /// Stops the conversion and puts back what it dropped of the scratch file, before
    /// the file is read, changed or cut by anything else. An error says it could not
    /// be made whole again.
    pub fn stop(self) -> image::Result<()> {
        let ended = self.follower.stop();
        let dropped = self.dropped.load(Ordering::Acquire);
        match ended {
            Some(ended) => ended.dropper.restore(&ended.out),
            None => lost(dropped),
        }
    }
}

/// The conversion thread failed (it cannot, short of a bug): what it dropped is lost.
fn lost(dropped: u64) -> image::Result<()> {
    if dropped == 0 {
        return Ok(());
    }
    Err(image::Error::io(
        Path::new("(scratch file)"),
        std::io::Error::other(format!(
            "the conversion of an arriving file failed after dropping {dropped} bytes it had read"
        )),
    ))
}

/// Source bytes read by the conversion, dropped from a created import's scratch file in
/// steps of this many (few calls, little left in the page cache to reach the disk).
const DROP_STEP: u64 = 32 << 20;

/// Most runs dropped and remembered, 24 bytes each (1.5 MiB): past them the rest of the
/// copy is kept (a file whose stored data is split into many runs, such as a 2 TiB
/// dynamic VHD of 2 MiB blocks each after its bitmap, keeps what is past its first
/// 128 GiB).
const MAX_DROPPED_RUNS: usize = 1 << 16;

/// Adds `start..end` to the disjoint ranges `ranges` (start → end), merged with those it
/// overlaps or touches.
fn add_range(ranges: &mut std::collections::BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = ranges.range(..=start).next_back()
        && e >= start
    {
        start = s;
        end = end.max(e);
        ranges.remove(&s);
    }
    while let Some((&s, &e)) = ranges.range(start..=end).next() {
        end = end.max(e);
        ranges.remove(&s);
    }
    ranges.insert(start, end);
}

/// Drops from the scratch file the stored data a conversion has read and written out
/// (`fallocate(PUNCH_HOLE)`): its dirty pages then leave the page cache without ever
/// being written to the disk, so a file converted while it arrives is not written
/// twice. Only plain stored data is dropped (no tables, no compressed grains), and each
/// run dropped is remembered with the guest range it holds, so that the file can be made
/// whole again from the conversion's output ([`Dropper::restore`]) when the conversion
/// stops and the file is needed as it was written: a write going back, a file cut, a
/// cluster guessed wrong, a format chosen otherwise at the close.
#[derive(Debug)]
struct Dropper {
    file: File,
    path: PathBuf,
    enabled: bool,
    /// Runs `(guest offset, file offset, length)` read and written out, not dropped yet.
    queued: Vec<(u64, u64, u64)>,
    queued_bytes: u64,
    /// Runs dropped, in guest order.
    dropped: Vec<(u64, u64, u64)>,
    /// The file ranges dropped, merged: start → end.
    holes: std::collections::BTreeMap<u64, u64>,
    total: Arc<AtomicU64>,
    to: Arc<AtomicU64>,
}

impl Dropper {
    /// The conversion reads guest bytes `guest..guest + len` at `offset` of the file.
    fn reading(&mut self, guest: u64, offset: u64, len: u64) {
        if !self.enabled || len == 0 {
            return;
        }
        if self.dropped.len() + self.queued.len() >= MAX_DROPPED_RUNS {
            self.enabled = false;
            return;
        }
        match self.queued.last_mut() {
            Some((g, o, l)) if *g + *l == guest && *o + *l == offset => *l += len,
            _ => self.queued.push((guest, offset, len)),
        }
        self.queued_bytes += len;
    }

    /// Everything queued was read and written out: dropped once there is enough of it.
    fn read_all_queued(&mut self) -> image::Result<()> {
        if self.queued_bytes < DROP_STEP {
            return Ok(());
        }
        for (guest, offset, len) in std::mem::take(&mut self.queued) {
            let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
            else {
                continue;
            };
            // Remembered first: a punch that fails may have zeroed part of the run, which
            // the restore then writes back.
            self.dropped.push((guest, offset, len));
            self.total.fetch_add(len, Ordering::AcqRel);
            self.to.fetch_max(offset + len, Ordering::AcqRel);
            add_range(&mut self.holes, offset, offset + len);
            if let Err(e) = crate::sys::punch_hole(self.file.as_fd(), off, n) {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) {
                    // A filesystem without hole punching keeps the bytes: only slower.
                    self.enabled = false;
                    break;
                }
                return Err(image::Error::io(&self.path, e));
            }
        }
        self.queued.clear();
        self.queued_bytes = 0;
        Ok(())
    }

    /// Whether file bytes `offset..offset + len` were dropped, in part or whole.
    fn overlaps_dropped(&self, offset: u64, len: u64) -> bool {
        self.holes
            .range(..offset.saturating_add(len))
            .next_back()
            .is_some_and(|(_, &end)| end > offset)
    }

    /// Writes back into the file what was dropped of it, read from the conversion's
    /// output `out` (the layer, complete or written as far as the conversion went, which
    /// holds every dropped run: a run is dropped only once written out).
    fn restore(&self, out: &TmpFile) -> image::Result<()> {
        if self.dropped.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let copy = out
            .file()
            .try_clone()
            .map_err(|e| image::Error::io(out.path(), e))?;
        let layer = crate::image::qcow2::Qcow2Layer::new(copy, out.path())?;
        let disk = Disk::new(vec![Arc::new(layer)]);
        // The layer's writer never writes blocks of zeroes, nor lengthens the file for
        // them: a layer written in part may end before the last bytes it maps, which read
        // as zeroes once the file reaches them.
        let mut mapped_to = 0u64;
        for &(guest, _, n) in &self.dropped {
            disk.walk(guest, guest + n, |_, ext| {
                if let Mapping::Data { offset, .. } = ext.mapping {
                    mapped_to = mapped_to.max(offset + ext.len);
                }
                Ok(())
            })?;
        }
        let out_len = out
            .file()
            .metadata()
            .map_err(|e| image::Error::io(out.path(), e))?
            .len();
        if mapped_to > out_len {
            out.file()
                .set_len(mapped_to)
                .map_err(|e| image::Error::io(out.path(), e))?;
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| image::Error::io(&self.path, e))?
            .len();
        let mut buf = vec![0u8; RESTORE_CHUNK];
        let mut restored = 0u64;
        for &(guest, offset, n) in &self.dropped {
            // Never past the file's end: a cut file is not lengthened again.
            let n = n.min(len.saturating_sub(offset));
            let mut done = 0u64;
            while done < n {
                let k = (n - done).min(RESTORE_CHUNK as u64) as usize;
                disk.read_at(&mut buf[..k], guest + done)?;
                self.file
                    .write_all_at(&buf[..k], offset + done)
                    .map_err(|e| image::Error::io(&self.path, e))?;
                done += k as u64;
            }
            restored += n;
        }
        log::debug!(
            "{}: {restored} bytes dropped while converting written back in {:.2?}",
            self.path.display(),
            started.elapsed()
        );
        Ok(())
    }
}

/// Bytes written back at a time by [`Dropper::restore`].
const RESTORE_CHUNK: usize = 1 << 20;

fn convert_stream(
    file: File,
    path: &Path,
    (from, format): (u64, Format),
    out: &TmpFile,
    followed: &Followed,
    dropper: &mut Dropper,
) -> image::Result<Converted> {
    // A VMDK of compressed grains, whose markers are read when its grains are mapped.
    let mut markers: Option<Arc<vmdk::VmdkLayer>> = None;
    let layer: Arc<dyn Layer> = match format {
        Format::Vdi => Arc::new(vdi::open_arriving(file, path, ASSUMED_LEN)?),
        Format::Vpc => Arc::new(vpc::open_arriving(file, path, ASSUMED_LEN)?),
        Format::Vmdk => {
            let vmdk = Arc::new(vmdk::open_arriving(file, path, ASSUMED_LEN, from)?);
            markers = vmdk.compressed().then(|| vmdk.clone());
            vmdk
        }
        _ => return Err(stopped(path, "not a format converted while it arrives")),
    };
    let disk = Disk::new(vec![layer]);
    let guess = match &markers {
        // Its map cannot be walked before its grains arrive: the tables say which hold
        // a grain.
        Some(vmdk) => vmdk
            .stored_clusters(CLUSTER_SIZE, disk.walk_limits().runs)?
            .ok_or_else(|| disk.too_fragmented())?,
        None => allocated_clusters(&disk, CLUSTER_SIZE)?,
    };
    let mut progress = |_, _| {};
    let mut opts = convert::Options::new(&mut progress);
    opts.nonzero = Some(guess);
    opts.guessed = true;
    let reached = |end: u64| match followed.wait(end) {
        Some((ready, _)) if ready >= end => Ok(()),
        Some(_) => Err(stopped(path, "the file ends before its blocks")),
        None => Err(stopped(path, "the stream was stopped")),
    };
    // A guest range can be read once the stream is past the stored bytes it maps to.
    // The conversion reads guest data front to back and writes each piece out before it
    // asks for the next one: what it read before is dropped (see `Dropper`).
    let mut wait = |guest: u64, len: u64| {
        dropper.read_all_queued()?;
        let marker = match &markers {
            Some(vmdk) => vmdk.last_marker(guest, len)?,
            None => None,
        };
        if let Some(at) = marker {
            reached(at + vmdk::GRAIN_MARKER_LEN)?;
        }
        let mut end = 0u64;
        disk.walk(guest, guest + len, |at, ext| {
            let (offset, stored) = match &ext.mapping {
                Mapping::Data { offset, .. } => (*offset, ext.len),
                Mapping::Compressed(c) => (c.offset, c.stored_len),
                _ => return Ok(()),
            };
            // Bytes stored once and named twice (grains of a VMDK may share them): the
            // second time they may be gone already, so this file is converted at its
            // close instead.
            if dropper.overlaps_dropped(offset, stored) {
                return Err(stopped(
                    path,
                    "a block names bytes read and dropped already",
                ));
            }
            end = end.max(offset + stored);
            if let Mapping::Data { .. } = ext.mapping {
                dropper.reading(at, offset, stored);
            }
            Ok(())
        })?;
        reached(end)
    };
    opts.gate = Some(&mut wait);
    convert::convert(&disk, out.file(), out.path(), opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::convert::to_qcow2_layer;
    use crate::testutil::{have_qemu, new_rw_file, qemu_create, qemu_img, qemu_io};
    use std::os::unix::fs::FileExt;

    /// A disk of 24 MiB in `fmt` (`vdi`, `vpc` or `vmdk`, with qemu-img's options
    /// `opts`) made by qemu-img from a raw disk written by `cmds`.
    fn image_of(dir: &Path, fmt: &str, opts: &str, cmds: &[&str]) -> Vec<u8> {
        sized_image_of(dir, fmt, opts, "24M", cmds)
    }

    /// [`image_of`] for a disk of `size` (qemu-img's notation).
    fn sized_image_of(dir: &Path, fmt: &str, opts: &str, size: &str, cmds: &[&str]) -> Vec<u8> {
        let raw = qemu_create(dir, "raw", "src.raw", size, "");
        qemu_io("raw", &raw, cmds);
        let out = dir.join(format!("src.{fmt}"));
        let (raw, out_path) = (raw.to_str().unwrap(), out.to_str().unwrap());
        let mut args = vec!["convert", "-f", "raw", "-O", fmt, raw, out_path];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        qemu_img(&args);
        std::fs::read(&out).unwrap()
    }

    /// Writes `bytes` into a scratch file front to back in 1 MiB pieces, converting as
    /// they arrive as an import does (dropping what was read with `drop`); the running
    /// conversion and the file.
    fn arrive(store: &Store, dir: &Path, bytes: &[u8], drop: bool) -> (StreamConvert, File) {
        let path = dir.join("arriving");
        let f = new_rw_file(&path);
        let start = data_start(bytes).unwrap();
        let mut conv = None;
        for (i, piece) in bytes.chunks(1 << 20).enumerate() {
            let at = (i << 20) as u64;
            f.write_all_at(piece, at).unwrap();
            let end = at + piece.len() as u64;
            if conv.is_none() && end >= start.0 {
                conv = StreamConvert::start(store, &f, &path, start, end, drop);
            }
            if let Some(c) = &conv {
                c.advance(end);
            }
        }
        (conv.unwrap(), f)
    }

    /// [`arrive`], then the end of the file: the streamed layer, if any, and the file.
    fn stream(
        store: &Store,
        dir: &Path,
        bytes: &[u8],
        drop: bool,
    ) -> (Option<(TmpFile, Converted)>, File) {
        let (conv, f) = arrive(store, dir, bytes, drop);
        let streamed = conv.finish(bytes.len() as u64).unwrap();
        (streamed.map(Streamed::into_layer), f)
    }

    /// The layer the conversion of the complete `format` file `bytes` gives.
    fn layer_of(store: &Store, dir: &Path, bytes: &[u8], format: Format) -> (Converted, Vec<u8>) {
        let path = dir.join("complete");
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        let disk = crate::tree::publish::open_standalone(&file, &path, format).unwrap();
        let whole = store.tmp_file().unwrap();
        let expect = to_qcow2_layer(&disk, whole.file(), whole.path(), &mut |_, _| {}).unwrap();
        (expect, std::fs::read(whole.path()).unwrap())
    }

    /// Streams `bytes`, a `format` file: it must convert as it arrives, into the very
    /// layer (byte for byte) that the conversion of the complete file gives.
    fn assert_streamed_as_converted(store: &Store, dir: &Path, bytes: &[u8], format: Format) {
        let (streamed, file) = stream(store, dir, bytes, false);
        let Some((out, converted)) = streamed else {
            panic!("{format:?}: not converted as it arrived");
        };
        let disk = crate::tree::publish::open_standalone(&file, Path::new("x"), format).unwrap();
        let whole = store.tmp_file().unwrap();
        let expect = to_qcow2_layer(&disk, whole.file(), whole.path(), &mut |_, _| {}).unwrap();
        assert_eq!(converted, expect, "{format:?}");
        assert_eq!(
            std::fs::read(out.path()).unwrap(),
            std::fs::read(whole.path()).unwrap(),
            "{format:?}"
        );
        qemu_img(&["check", out.path().to_str().unwrap()]);
    }

    #[test]
    fn a_fully_written_vdi_vhd_or_vmdk_streamed_gives_the_layer_its_conversion_gives() {
        if !have_qemu() {
            return;
        }
        for (fmt, opts, format) in [
            ("vdi", "", Format::Vdi),
            ("vpc", "", Format::Vpc),
            ("vmdk", "", Format::Vmdk),
            ("vmdk", "subformat=streamOptimized", Format::Vmdk),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open("user", &dir.path().join("repo")).unwrap();
            // Random bytes: the compressed grains of a streamOptimized VMDK keep their size.
            let raw = dir.path().join("random");
            std::fs::write(&raw, crate::testutil::noise(7, 24 << 20)).unwrap();
            let write = format!("write -s {} 0 24M", raw.display());
            let bytes = image_of(dir.path(), fmt, opts, &[write.as_str()]);
            assert_eq!(data_start(&bytes).map(|(_, f)| f), Some(format));
            assert_streamed_as_converted(&store, dir.path(), &bytes, format);
        }
    }

    /// qemu-img stores only the grains of a streamOptimized VMDK that hold data, so one
    /// with holes converts as it arrives too, into the layer of the whole file.
    #[test]
    fn a_stream_optimized_vmdk_with_holes_streamed_gives_the_layer_its_conversion_gives() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("user", &dir.path().join("repo")).unwrap();
        let cmds = ["write -P 1 0 1M", "write -P 2 8M 2M", "write -P 3 20M 4k"];
        let bytes = image_of(dir.path(), "vmdk", "subformat=streamOptimized", &cmds);
        assert_streamed_as_converted(&store, dir.path(), &bytes, Format::Vmdk);
    }

    #[test]
    fn a_vdi_with_zeroes_in_its_blocks_is_left_to_the_conversion_at_close() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("user", &dir.path().join("repo")).unwrap();
        // 1 MiB blocks holding 64 KiB of data each: most of their clusters are zeroes.
        let cmds: Vec<String> = (0..24).map(|i| format!("write -P 7 {i}M 64k")).collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let bytes = image_of(dir.path(), "vdi", "", &cmds);
        let (streamed, _) = stream(&store, dir.path(), &bytes, false);
        assert!(streamed.is_none());
    }

    #[test]
    fn a_stream_dropped_or_finished_short_stops_its_thread() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("user", &dir.path().join("repo")).unwrap();
        let bytes = image_of(dir.path(), "vdi", "", &["write -P 0x5a 0 24M"]);
        let path = dir.path().join("cut.vdi");
        let f = new_rw_file(&path);
        let from = vdi::data_start(&bytes).unwrap() as usize;
        f.write_all_at(&bytes[..from + 4096], 0).unwrap();
        let vdi = (from as u64, Format::Vdi);
        let c = StreamConvert::start(&store, &f, &path, vdi, from as u64 + 4096, true).unwrap();
        // The file ends before its blocks: no layer, and finish returns.
        assert!(c.finish(from as u64 + 4096).unwrap().is_none());
        let c = StreamConvert::start(&store, &f, &path, vdi, from as u64 + 4096, true).unwrap();
        drop(c); // returns: the waiting thread saw the stop
        let c = StreamConvert::start(&store, &f, &path, vdi, from as u64 + 4096, true).unwrap();
        c.stop().unwrap(); // likewise, nothing to put back
    }

    /// A `fmt` image of `mib` MiB of random data (every block full), whose MiB `zero_at`
    /// (if any) holds 64 KiB of data and zeroes.
    fn big_image(dir: &Path, fmt: &str, mib: u64, zero_at: Option<u64>) -> Vec<u8> {
        let more: Vec<String> = zero_at
            .map(|at| {
                vec![
                    format!("write -z {at}M 960k"),
                    format!("write -P 5 {at}M 64k"),
                ]
            })
            .unwrap_or_default();
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        random_image(dir, fmt, mib, &more)
    }

    /// A `fmt` image of `mib` MiB of random data, then written by the qemu-io commands
    /// `more`.
    fn random_image(dir: &Path, fmt: &str, mib: u64, more: &[&str]) -> Vec<u8> {
        let raw = dir.join("random");
        std::fs::write(&raw, crate::testutil::noise(11, (mib << 20) as usize)).unwrap();
        let fill = format!("write -s {} 0 {mib}M", raw.display());
        let mut cmds = vec![fill.as_str()];
        cmds.extend_from_slice(more);
        sized_image_of(dir, fmt, "", &format!("{mib}M"), &cmds)
    }

    fn allocated(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn a_conversion_drops_what_it_has_read_of_a_created_files_copy_and_gives_the_same_layer() {
        if !have_qemu() {
            return;
        }
        for (fmt, format) in [
            ("vdi", Format::Vdi),
            ("vpc", Format::Vpc),
            ("vmdk", Format::Vmdk),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open("user", &dir.path().join("repo")).unwrap();
            let bytes = big_image(dir.path(), fmt, 96, None);
            let (expect, expect_bytes) = layer_of(&store, dir.path(), &bytes, format);
            let (conv, file) = arrive(&store, dir.path(), &bytes, true);
            let streamed = conv.finish(bytes.len() as u64).unwrap().unwrap();
            // All but the last step's worth of the copy was dropped as it was read.
            let left = allocated(&file);
            assert!(
                left <= 2 * DROP_STEP,
                "{fmt}: {left} bytes of the copy left"
            );
            let (out, converted) = streamed.into_layer();
            assert_eq!(converted, expect, "{fmt}");
            assert_eq!(std::fs::read(out.path()).unwrap(), expect_bytes, "{fmt}");
            // Without dropping, the copy stays whole.
            let (_, kept) = stream(&store, dir.path(), &bytes, false);
            assert!(allocated(&kept) >= 96 << 20, "{fmt}");
        }
    }

    /// Whatever stops a conversion that dropped what it had read — its owner (a write
    /// going back, a cut, a read), a cluster guessed wrong, a layer not used — the copy
    /// is whole again afterwards, byte for byte.
    #[test]
    fn a_conversion_that_dropped_what_it_read_puts_it_back_when_it_stops() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("user", &dir.path().join("repo")).unwrap();
        let whole = big_image(dir.path(), "vdi", 96, None);
        // Stopped by its owner once everything arrived (and was read, mostly dropped).
        let (conv, file) = arrive(&store, dir.path(), &whole, true);
        while conv.dropped() < 64 << 20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        conv.stop().unwrap();
        assert_eq!(std::fs::read(dir.path().join("arriving")).unwrap(), whole);
        drop(file);
        // A layer made, then not used.
        let (conv, _) = arrive(&store, dir.path(), &whole, true);
        let streamed = conv.finish(whole.len() as u64).unwrap().unwrap();
        streamed.restore().unwrap();
        assert_eq!(std::fs::read(dir.path().join("arriving")).unwrap(), whole);
        // A block of zeroes near the end: the guess fails after 80 MiB were dropped.
        let late_zero = big_image(dir.path(), "vdi", 96, Some(90));
        let (conv, _) = arrive(&store, dir.path(), &late_zero, true);
        while conv.dropped() < 64 << 20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(conv.finish(late_zero.len() as u64).unwrap().is_none());
        assert_eq!(
            std::fs::read(dir.path().join("arriving")).unwrap(),
            late_zero
        );
    }

    /// A random 96 MiB VDI whose 4 KiB block just before 32 MiB (the end of the first
    /// step dropped, see [`DROP_STEP`]) is zeroes, with `more` qemu-io commands.
    fn zero_before_a_step(dir: &Path, more: &[&str]) -> Vec<u8> {
        let mut cmds = vec!["write -z 32764k 4k"];
        cmds.extend_from_slice(more);
        random_image(dir, "vdi", 96, &cmds)
    }

    /// The layer written so far never holds a block of zeroes (nor a file length
    /// covering it): a partial layer may end before the last bytes a dropped run maps.
    /// Putting the run back reads them as zeroes, whether the conversion stops on a
    /// cluster guessed wrong right after a step was dropped, or is stopped by its owner
    /// while it waits there for more bytes.
    #[test]
    fn the_copy_is_made_whole_when_the_layer_written_so_far_ends_in_zeroes() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("user", &dir.path().join("repo")).unwrap();
        // A cluster of zeroes at 33 MiB: the guess fails in the piece after the drop.
        let bytes = zero_before_a_step(dir.path(), &["write -z 33M 64k"]);
        let (conv, _f) = arrive(&store, dir.path(), &bytes, true);
        assert!(conv.finish(bytes.len() as u64).unwrap().is_none());
        assert!(std::fs::read(dir.path().join("arriving")).unwrap() == bytes);
        // Stopped while waiting for the bytes past 33 MiB.
        let bytes = zero_before_a_step(dir.path(), &[]);
        let start = data_start(&bytes).unwrap();
        let upto = (start.0 + (33 << 20)) as usize;
        let path = dir.path().join("arriving-part");
        let f = new_rw_file(&path);
        f.write_all_at(&bytes[..upto], 0).unwrap();
        let conv = StreamConvert::start(&store, &f, &path, start, upto as u64, true).unwrap();
        while conv.dropped() < 32 << 20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        conv.stop().unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes[..upto]);
    }

    /// A VMDK grain naming bytes another grain already named (qemu reads both from
    /// them): met after those were dropped, the conversion gives up rather than read
    /// zeroes, and the file, made whole again, is converted at its close to the very
    /// layer of the whole file.
    #[test]
    fn a_grain_naming_bytes_already_dropped_stops_the_conversion() {
        if !have_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("user", &dir.path().join("repo")).unwrap();
        let mut bytes = big_image(dir.path(), "vmdk", 96, None);
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(&bytes, 20), 128, "64 KiB grains");
        let per_table = u32_at(&bytes, 44) as u64;
        let directory = u64_at(&bytes, 56) * 512;
        let entry_at = |b: &[u8], g: u64| {
            let table = u32_at(b, (directory + (g / per_table) * 4) as usize) as u64 * 512;
            (table + (g % per_table) * 4) as usize
        };
        let s1023 = u32_at(&bytes, entry_at(&bytes, 1023));
        assert_eq!(
            u32_at(&bytes, entry_at(&bytes, 1024)),
            s1023 + 128,
            "in order"
        );
        // The grain at 80 MiB names the second half of the grain at 64 MiB - 64 KiB and
        // the first half of the next one.
        let at = entry_at(&bytes, 1280);
        bytes[at..at + 4].copy_from_slice(&(s1023 + 64).to_le_bytes());
        let (expect, expect_bytes) = layer_of(&store, dir.path(), &bytes, Format::Vmdk);
        let (conv, _f) = arrive(&store, dir.path(), &bytes, true);
        assert!(conv.finish(bytes.len() as u64).unwrap().is_none());
        let whole = std::fs::read(dir.path().join("arriving")).unwrap();
        assert!(whole == bytes, "the copy is whole again");
        let (got, got_bytes) = layer_of(&store, dir.path(), &whole, Format::Vmdk);
        assert_eq!(got, expect);
        assert!(got_bytes == expect_bytes);
    }
}
