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

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

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
    follower: Follower<image::Result<(TmpFile, Converted)>>,
    /// The format the stream is read as.
    format: Format,
}

impl StreamConvert {
    /// Starts converting `file` (named `path`; its data start and format as
    /// [`data_start`] gives them), whose first `ready` bytes (past its data start) are
    /// final, into a new scratch file of `store` (made now, by the caller's identity, as
    /// the layer must be). `None` when it cannot start.
    pub fn start(
        store: &Store,
        file: &File,
        path: &Path,
        (from, format): (u64, Format),
        ready: u64,
    ) -> Option<StreamConvert> {
        let out = store.tmp_file().ok()?;
        let file = file.try_clone().ok()?;
        let path = path.to_path_buf();
        let follower = Follower::spawn("import-convert", ready, move |followed| {
            convert_stream(file, &path, (from, format), out, followed)
        })?;
        Some(StreamConvert { follower, format })
    }

    /// The format the stream is read as.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Every byte below `ready` is final.
    pub fn advance(&self, ready: u64) {
        self.follower.advance(ready);
    }

    /// The file is complete at `len` bytes: the converted layer, once the thread is
    /// done, or `None` if the conversion stopped (the caller converts the file itself).
    pub fn finish(self, len: u64) -> Option<(TmpFile, Converted)> {
        self.follower
            .finish(len)?
            .inspect_err(|e| log::debug!("converted at close: {e}"))
            .ok()
    }
}

fn convert_stream(
    file: File,
    path: &Path,
    (from, format): (u64, Format),
    out: TmpFile,
    followed: &Followed,
) -> image::Result<(TmpFile, Converted)> {
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
    let mut wait = |guest: u64, len: u64| {
        let marker = match &markers {
            Some(vmdk) => vmdk.last_marker(guest, len)?,
            None => None,
        };
        if let Some(at) = marker {
            reached(at + vmdk::GRAIN_MARKER_LEN)?;
        }
        let mut end = 0u64;
        disk.walk(guest, guest + len, |_, ext| {
            match &ext.mapping {
                Mapping::Data { offset, .. } => end = end.max(offset + ext.len),
                Mapping::Compressed(c) => end = end.max(c.offset + c.stored_len),
                _ => {}
            }
            Ok(())
        })?;
        reached(end)
    };
    opts.gate = Some(&mut wait);
    let converted = convert::convert(&disk, out.file(), out.path(), opts)?;
    Ok((out, converted))
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
        let raw = qemu_create(dir, "raw", "src.raw", "24M", "");
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
    /// they arrive as an import does; the streamed layer, if any, and the file.
    fn stream(store: &Store, dir: &Path, bytes: &[u8]) -> (Option<(TmpFile, Converted)>, File) {
        let path = dir.join("arriving");
        let f = new_rw_file(&path);
        let start = data_start(bytes).unwrap();
        let mut conv = None;
        for (i, piece) in bytes.chunks(1 << 20).enumerate() {
            let at = (i << 20) as u64;
            f.write_all_at(piece, at).unwrap();
            let end = at + piece.len() as u64;
            if conv.is_none() && end >= start.0 {
                conv = StreamConvert::start(store, &f, &path, start, end);
            }
            if let Some(c) = &conv {
                c.advance(end);
            }
        }
        (conv.unwrap().finish(bytes.len() as u64), f)
    }

    /// Streams `bytes`, a `format` file: it must convert as it arrives, into the very
    /// layer (byte for byte) that the conversion of the complete file gives.
    fn assert_streamed_as_converted(store: &Store, dir: &Path, bytes: &[u8], format: Format) {
        let (streamed, file) = stream(store, dir, bytes);
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
        let (streamed, _) = stream(&store, dir.path(), &bytes);
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
        let c = StreamConvert::start(&store, &f, &path, vdi, from as u64 + 4096).unwrap();
        // The file ends before its blocks: no layer, and finish returns.
        assert!(c.finish(from as u64 + 4096).is_none());
        let c = StreamConvert::start(&store, &f, &path, vdi, from as u64 + 4096).unwrap();
        drop(c); // returns: the waiting thread saw the stop
    }
}
