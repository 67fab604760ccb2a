//! Decoding of compressed clusters (qcow2 deflate and zstd clusters, VMDK zlib grains).
//!
//! A compressed cluster is read in one `pread` and inflated into a cluster-sized buffer.
//! Readers of a guest range that covers a whole cluster get it inflated straight into
//! their buffer; smaller reads (a kernel reading 4 KiB or 128 KiB at a time) would
//! otherwise inflate the same cluster over and over, so partially read clusters go
//! through a small LRU cache shared by all threads and all images. Decoder states are
//! kept per thread, because creating a zstd context or a deflate window costs more than
//! inflating a small cluster.
//!
//! Limits, checked before anything is allocated: a cluster inflates to at most
//! [`MAX_CLUSTER_LEN`] bytes and is stored in at most [`max_stored_len`] bytes. A stream
//! that ends before producing the whole cluster is an error (the image is corrupt).

use super::cache::LruCache;
use super::{CompressedCluster, Compression, Error, Result};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock, Weak};

/// Largest cluster this module inflates: qcow2's largest cluster (qemu's
/// `MAX_CLUSTER_BITS` = 21) and well above VMDK's default 64 KiB grain.
pub const MAX_CLUSTER_LEN: u64 = 2 << 20;

/// Total bytes of inflated clusters kept for partial reads, across all images.
const CACHE_BUDGET: usize = 32 << 20;

/// The most compressed bytes a `cluster_len` cluster may occupy. qcow2 stores at most
/// twice the cluster size (its sector count field has `cluster_bits - 8` bits); deflate
/// and zstd of incompressible data grow by far less than one extra cluster.
pub fn max_stored_len(cluster_len: u64) -> u64 {
    cluster_len * 2 + 4096
}

/// Inflated clusters, keyed by the identity of the open file (its `Arc` address) and the
/// stored offset. The entry keeps a `Weak` to the file: while it exists the allocation
/// cannot be reused by another `File`, so the address stays a unique key.
type Inflated = (Weak<File>, Arc<[u8]>);

fn cache() -> &'static LruCache<(usize, u64), Inflated> {
    static CACHE: OnceLock<LruCache<(usize, u64), Inflated>> = OnceLock::new();
    CACHE.get_or_init(|| LruCache::new(CACHE_BUDGET))
}

fn corrupt(c: &CompressedCluster, what: String) -> Error {
    Error::io(
        c.path.as_path(),
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "compressed cluster at offset {} ({} bytes): {what}",
                c.offset, c.stored_len
            ),
        ),
    )
}

/// Inflates `c` and copies `out.len()` bytes starting `c.skip` bytes into the cluster.
pub fn decompress_into(c: &CompressedCluster, out: &mut [u8]) -> Result<()> {
    if c.cluster_len == 0 || c.cluster_len > MAX_CLUSTER_LEN {
        return Err(corrupt(
            c,
            format!(
                "cluster size {} is outside 1..={MAX_CLUSTER_LEN}",
                c.cluster_len
            ),
        ));
    }
    if c.stored_len == 0 || c.stored_len > max_stored_len(c.cluster_len) {
        return Err(corrupt(
            c,
            format!(
                "stored length is outside 1..={}",
                max_stored_len(c.cluster_len)
            ),
        ));
    }
    let end = c.skip.checked_add(out.len() as u64);
    if end.is_none_or(|e| e > c.cluster_len) {
        return Err(corrupt(
            c,
            format!(
                "read of {} bytes at {} is outside the {}-byte cluster",
                out.len(),
                c.skip,
                c.cluster_len
            ),
        ));
    }
    // A whole-cluster read inflates straight into the caller's buffer: nothing to reuse.
    if c.skip == 0 && out.len() as u64 == c.cluster_len {
        return inflate_cluster(c, out);
    }
    let key = (Arc::as_ptr(&c.file) as usize, c.offset);
    let data = match cache().get(&key) {
        Some((_, data)) => data,
        None => {
            let mut buf = vec![0u8; c.cluster_len as usize];
            inflate_cluster(c, &mut buf)?;
            let data: Arc<[u8]> = buf.into();
            cache().insert(
                key,
                (Arc::downgrade(&c.file), data.clone()),
                c.cluster_len as usize,
            );
            data
        }
    };
    let skip = c.skip as usize;
    out.copy_from_slice(&data[skip..skip + out.len()]);
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Clusters inflated by this thread, so tests can check the cache spares work.
    static INFLATED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Clusters inflated so far by the calling thread (tests only).
#[cfg(test)]
pub(crate) fn inflated_by_this_thread() -> u64 {
    INFLATED.with(|n| n.get())
}

/// Reads the stored bytes of `c` and inflates exactly `out.len()` (= `cluster_len`) bytes.
fn inflate_cluster(c: &CompressedCluster, out: &mut [u8]) -> Result<()> {
    #[cfg(test)]
    INFLATED.with(|n| n.set(n.get() + 1));
    let input = read_stored(c)?;
    let produced = match c.compression {
        Compression::Deflate => inflate_deflate(&input, out, false),
        Compression::Zlib => inflate_deflate(&input, out, true),
        Compression::Zstd => inflate_zstd(&input, out),
    }
    .map_err(|e| corrupt(c, format!("cannot decompress: {e}")))?;
    if produced != out.len() {
        return Err(corrupt(
            c,
            format!("inflates to {produced} bytes, {} expected", out.len()),
        ));
    }
    Ok(())
}

/// The stored bytes of `c`. qcow2 counts compressed data in whole 512-byte sectors, and
/// the last compressed cluster's final sector may extend past the end of the file, so
/// a short read is fine as long as it is not empty; the decoder decides whether it was
/// enough.
fn read_stored(c: &CompressedCluster) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; c.stored_len as usize];
    let mut got = 0usize;
    while got < buf.len() {
        match c.file.read_at(&mut buf[got..], c.offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(c.path.as_path(), e)),
        }
    }
    if got == 0 {
        return Err(corrupt(c, "data is past the end of the file".into()));
    }
    buf.truncate(got);
    Ok(buf)
}

/// Inflates a deflate stream (raw, or with a zlib header) into `out`; returns the bytes
/// produced. Stops once `out` is full: bytes after the stream (the next cluster sharing
/// the last sector) are ignored.
fn inflate_deflate(input: &[u8], out: &mut [u8], zlib_header: bool) -> io::Result<usize> {
    use flate2::{Decompress, FlushDecompress, Status};
    thread_local! {
        static RAW: RefCell<Option<Decompress>> = const { RefCell::new(None) };
        static ZLIB: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    }
    let slot = if zlib_header { &ZLIB } else { &RAW };
    slot.with(|cell| {
        let mut guard = cell.borrow_mut();
        let d = match guard.as_mut() {
            Some(d) => {
                d.reset(zlib_header);
                d
            }
            None => guard.insert(Decompress::new(zlib_header)),
        };
        loop {
            let (inp, outp) = (d.total_in() as usize, d.total_out() as usize);
            let status = d
                .decompress(&input[inp..], &mut out[outp..], FlushDecompress::Finish)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let produced = d.total_out() as usize;
            let progressed = d.total_in() as usize != inp || produced != outp;
            if produced == out.len() || status == Status::StreamEnd || !progressed {
                return Ok(produced);
            }
        }
    })
}

/// Inflates zstd frame data into `out`; returns the bytes produced. Stops once `out` is
/// full, so padding after the frame is ignored.
fn inflate_zstd(input: &[u8], out: &mut [u8]) -> io::Result<usize> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    thread_local! {
        static DECODER: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
    }
    DECODER.with(|cell| {
        let mut guard = cell.borrow_mut();
        let d = match guard.as_mut() {
            Some(d) => {
                d.reinit()?;
                d
            }
            None => guard.insert(Decoder::new()?),
        };
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        loop {
            let (inp, outp) = (inb.pos(), outb.pos());
            let hint = d.run(&mut inb, &mut outb)?;
            let full = outb.pos() == outb.capacity();
            let progressed = inb.pos() != inp || outb.pos() != outp;
            if full || hint == 0 || !progressed {
                return Ok(outb.pos());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn stored(bytes: &[u8], compression: Compression, cluster_len: u64) -> CompressedCluster {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        CompressedCluster {
            file: Arc::new(f),
            path: Arc::new(PathBuf::from("test-image")),
            offset: 0,
            stored_len: bytes.len() as u64,
            cluster_len,
            skip: 0,
            compression,
        }
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 7 % 251) as u8).collect()
    }

    fn deflate(data: &[u8], zlib: bool) -> Vec<u8> {
        let mut c = flate2::Compress::new(flate2::Compression::default(), zlib);
        let mut out = Vec::with_capacity(data.len() + 1024);
        c.compress_vec(data, &mut out, flate2::FlushCompress::Finish)
            .unwrap();
        out
    }

    #[test]
    fn raw_deflate_zlib_and_zstd_clusters_inflate_with_trailing_garbage_ignored() {
        let data = sample(65536);
        for (compression, mut bytes) in [
            (Compression::Deflate, deflate(&data, false)),
            (Compression::Zlib, deflate(&data, true)),
            (Compression::Zstd, zstd::bulk::compress(&data, 3).unwrap()),
        ] {
            bytes.extend_from_slice(&[0xa5; 300]);
            let mut c = stored(&bytes, compression, 65536);
            let mut whole = vec![0u8; 65536];
            decompress_into(&c, &mut whole).unwrap();
            assert_eq!(whole, data, "{compression:?}");
            // Partial reads, served from the shared cache after the first one.
            for skip in [0u64, 4096, 65536 - 100] {
                c.skip = skip;
                let mut part = vec![0u8; 100];
                decompress_into(&c, &mut part).unwrap();
                assert_eq!(part, data[skip as usize..skip as usize + 100]);
            }
        }
    }

    #[test]
    fn sequential_small_reads_inflate_each_cluster_once() {
        let data = sample(65536);
        let mut c = stored(&deflate(&data, false), Compression::Deflate, 65536);
        let before = INFLATED.with(|n| n.get());
        for skip in (0..65536).step_by(4096) {
            c.skip = skip;
            let mut part = vec![0u8; 4096];
            decompress_into(&c, &mut part).unwrap();
            assert_eq!(part, data[skip as usize..skip as usize + 4096]);
        }
        assert_eq!(INFLATED.with(|n| n.get()) - before, 1);
    }

    #[test]
    fn stream_that_inflates_short_is_an_error() {
        let data = sample(1000);
        let c = stored(&deflate(&data, false), Compression::Deflate, 4096);
        let err = decompress_into(&c, &mut vec![0u8; 4096]).unwrap_err();
        assert!(err.to_string().contains("inflates to 1000 bytes"), "{err}");
        let c = stored(
            &zstd::bulk::compress(&data, 3).unwrap(),
            Compression::Zstd,
            4096,
        );
        assert!(decompress_into(&c, &mut vec![0u8; 4096]).is_err());
    }

    #[test]
    fn garbage_and_absurd_lengths_are_refused_before_allocating() {
        let c = stored(&[0xff; 512], Compression::Deflate, 65536);
        assert!(decompress_into(&c, &mut vec![0u8; 65536]).is_err());
        let mut c = stored(&[0u8; 16], Compression::Zstd, 65536);
        assert!(decompress_into(&c, &mut vec![0u8; 65536]).is_err());
        c.cluster_len = 1 << 40;
        let err = decompress_into(&c, &mut [0u8; 16]).unwrap_err();
        assert!(err.to_string().contains("cluster size"), "{err}");
        c.cluster_len = 65536;
        c.stored_len = 1 << 40;
        let err = decompress_into(&c, &mut [0u8; 16]).unwrap_err();
        assert!(err.to_string().contains("stored length"), "{err}");
    }

    #[test]
    fn compressed_data_past_the_end_of_the_file_is_an_error() {
        let mut c = stored(&deflate(&sample(4096), false), Compression::Deflate, 4096);
        c.offset = 1 << 30;
        let err = decompress_into(&c, &mut vec![0u8; 4096]).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
}
