//! Shared helpers of the table-driven readers (qed, vdi, vpc, vmdk): fixed-endian field
//! access on header buffers, and a bounded cache of metadata pages.
//!
//! Lookup tables (QED L2 tables, VMDK grain directories and grain tables) can be far
//! larger than what one `map()` needs and are untrusted in size, so they are never loaded
//! whole: the cache holds fixed [`PAGE_SIZE`]-byte pages of the file, keyed by file
//! offset. It is direct-mapped (one slot per hash bucket, each behind its own mutex held
//! only to swap an `Arc`), so it is bounded by construction, needs no eviction list, and
//! threads reading different pages never wait on each other; all I/O happens outside
//! the locks.

use super::{Error, Format, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes per cached page: small enough that a miss costs one short read, large enough
/// to hold 512 QED entries or 1024 VMDK entries (a whole default grain table).
pub const PAGE_SIZE: u64 = 4096;

pub fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

pub fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early only at the end of the file;
/// returns how many bytes were read.
pub fn read_upto_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(done)
}

/// Largest block table a reader loads whole at open (VDI block map, VHD BAT): 64 Mi
/// entries, enough for a 64 TiB VDI or a 2040 GiB VHD with blocks of 32 KiB or more.
/// A table must also fit in its file, but a sparse file can be large at no cost, so
/// this bounds the memory an untrusted header can ask for.
pub const MAX_LOADED_TABLE_BYTES: u64 = 256 << 20;

/// A block table loaded at open (VDI block map, VHD BAT), whose `Debug` output is a
/// summary rather than every entry.
pub struct BlockTable(pub Box<[u32]>);

impl std::ops::Deref for BlockTable {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.0
    }
}

impl std::fmt::Debug for BlockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockTable({} entries)", self.0.len())
    }
}

/// Reads `count` u32 entries (`big_endian` or little) at `offset`, in bounded chunks so
/// the table is never held twice. A table cut short by the end of the file is an error
/// naming `what`; the caller bounds `count` first.
pub fn read_u32_table(
    file: &File,
    path: &Path,
    format: Format,
    offset: u64,
    count: u64,
    big_endian: bool,
    what: &str,
) -> Result<Vec<u32>> {
    const CHUNK: u64 = 64 << 10;
    let mut out = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = offset;
    let end = offset + count * 4;
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        if read_upto_at(file, path, &mut buf[..n], pos)? != n {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                format,
                reason: format!(
                    "the {what} at offset {offset} is cut short by the end of the file"
                ),
            });
        }
        let decode = if big_endian { be_u32 } else { le_u32 };
        out.extend(buf[..n].chunks_exact(4).map(|c| decode(c, 0)));
        pos += n as u64;
    }
    Ok(out)
}

/// Where a table of second-level tables (QED L1, VMDK grain directory) lives and how
/// its entries read.
pub struct TableOfTables<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub format: Format,
    /// File offset and number of entries of the table.
    pub offset: u64,
    pub count: u64,
    /// Bytes per entry (4 or 8, little-endian) and the file bytes one entry stands for
    /// (an entry's value times this is the named table's offset).
    pub entry_len: usize,
    pub unit: u64,
    /// Bytes of each named table, and the file length they must fit in.
    pub table_bytes: u64,
    pub file_len: u64,
    pub what: &'a str,
}

impl TableOfTables<'_> {
    /// Reads the table in bounded chunks and checks that no two entries name the same
    /// second-level table. Each table maps its own part of the disk; one named by every
    /// entry would let a small file describe a disk of terabytes of data (and make a
    /// conversion read it all). Memory: one `u64` per named table, and there cannot be
    /// more distinct ones than fit in the file.
    pub fn check_distinct(&self) -> Result<()> {
        const CHUNK: usize = 64 << 10;
        let most = self.file_len / self.table_bytes.max(1) + 1;
        let mut named: Vec<u64> = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        let end = self.offset + self.count * self.entry_len as u64;
        let mut pos = self.offset;
        while pos < end {
            let n = (CHUNK as u64).min(end - pos) as usize;
            let got = read_upto_at(self.file, self.path, &mut buf[..n], pos)?;
            for e in buf[..got].chunks_exact(self.entry_len) {
                let v = if self.entry_len == 8 {
                    le_u64(e, 0)
                } else {
                    u64::from(le_u32(e, 0))
                };
                if v != 0 {
                    named.push(v);
                }
            }
            if named.len() as u64 > most {
                return Err(self.shared(None));
            }
            if got < n {
                break; // the rest is past the end: the reader reports it when used
            }
            pos += n as u64;
        }
        named.sort_unstable();
        match named.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(self.shared(Some(w[0].saturating_mul(self.unit)))),
            None => Ok(()),
        }
    }

    fn shared(&self, at: Option<u64>) -> Error {
        let reason = match at {
            Some(at) => format!(
                "the table at offset {at} is named by more than one {} entry",
                self.what
            ),
            None => format!(
                "the {} names more tables than the {}-byte file can hold, so some are shared",
                self.what, self.file_len
            ),
        };
        Error::Invalid {
            path: self.path.to_path_buf(),
            format: self.format,
            reason,
        }
    }
}

/// One cached page: the bytes of the file from `start`, possibly fewer than
/// [`PAGE_SIZE`] at the end of the file.
#[derive(Debug, Clone)]
pub struct Page {
    pub start: u64,
    pub bytes: Arc<[u8]>,
}

impl Page {
    /// True when the `len` bytes at file offset `offset` lie inside this page.
    pub fn holds(&self, offset: u64, len: u64) -> bool {
        offset >= self.start && offset - self.start + len <= self.bytes.len() as u64
    }

    pub fn le_u32(&self, offset: u64) -> u32 {
        le_u32(&self.bytes, (offset - self.start) as usize)
    }

    pub fn le_u64(&self, offset: u64) -> u64 {
        le_u64(&self.bytes, (offset - self.start) as usize)
    }
}

type Slot = Mutex<Option<Page>>;

/// A bounded, direct-mapped cache of [`PAGE_SIZE`]-byte pages of one file.
pub struct PageCache {
    file: Arc<File>,
    path: Arc<PathBuf>,
    format: Format,
    file_len: u64,
    slots: Box<[Slot]>,
}

impl std::fmt::Debug for PageCache {
    // Summarised: a layer's Debug output must not dump cached table bytes into logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("path", &self.path)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl PageCache {
    /// A cache of at most `slots` pages (so at most `slots × PAGE_SIZE` bytes) of `file`,
    /// whose length is `file_len`.
    pub fn new(
        file: Arc<File>,
        path: Arc<PathBuf>,
        format: Format,
        file_len: u64,
        slots: usize,
    ) -> PageCache {
        let slots = (0..slots.max(1)).map(|_| Mutex::new(None)).collect();
        PageCache {
            file,
            path,
            format,
            file_len,
            slots,
        }
    }

    /// The cached page holding the `len` bytes at file offset `offset` (`len` must not
    /// cross a page boundary; table entries are naturally aligned, so they never do).
    /// Bytes past the end of the file are an error naming `what`.
    pub fn page_for(&self, offset: u64, len: u64, what: &str) -> Result<Page> {
        let start = offset - offset % PAGE_SIZE;
        let index = (start / PAGE_SIZE).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let slot = &self.slots[(index % self.slots.len() as u64) as usize];
        let cached = match slot.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let page = match cached {
            Some(p) if p.start == start => p,
            _ => {
                let page = self.load(start)?;
                match slot.lock() {
                    Ok(mut guard) => *guard = Some(page.clone()),
                    Err(poisoned) => *poisoned.into_inner() = Some(page.clone()),
                }
                page
            }
        };
        if !page.holds(offset, len) {
            return Err(Error::Invalid {
                path: self.path.to_path_buf(),
                format: self.format,
                reason: format!(
                    "{what} at offset {offset} is past the end of the file ({} bytes)",
                    self.file_len
                ),
            });
        }
        Ok(page)
    }

    fn load(&self, start: u64) -> Result<Page> {
        let len = PAGE_SIZE.min(self.file_len.saturating_sub(start)) as usize;
        let mut buf = vec![0u8; len];
        let got = read_upto_at(&self.file, &self.path, &mut buf, start)?;
        buf.truncate(got);
        Ok(Page {
            start,
            bytes: buf.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pages_serve_entries_and_refuse_bytes_past_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut f = File::create(&p).unwrap();
        let data: Vec<u8> = (0..5000u32).flat_map(|i| (i as u8).to_le_bytes()).collect();
        f.write_all(&data).unwrap();
        drop(f);
        let file = Arc::new(File::open(&p).unwrap());
        let cache = PageCache::new(file, Arc::new(p), Format::Qed, 5000, 2);
        for off in [0u64, 4, 4092, 4096, 4992] {
            let page = cache.page_for(off, 4, "entry").unwrap();
            assert_eq!(page.le_u32(off), le_u32(&data, off as usize));
        }
        assert!(cache.page_for(4998, 4, "entry").is_err());
        assert!(cache.page_for(8192, 4, "entry").is_err());
    }
}

/// Helpers shared by the format readers' tests: judge a layer against qemu-img, and make
/// malformed copies of qemu-made images.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::image::{Disk, Layer};
    use crate::testutil::{data_runs, qemu_img, qemu_map, qemu_raw_bytes};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    /// Images up to this virtual size are compared byte for byte in memory; larger
    /// (sparse) ones through a sparse raw copy, run by run.
    const FULL_COMPARE_LIMIT: u64 = 256 << 20;

    /// `qemu-img info`'s virtual size of `path` read as `fmt`.
    pub fn qemu_virtual_size(path: &Path, fmt: &str) -> u64 {
        let info = qemu_img(&["info", "--output=json", "-f", fmt, path.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info json");
        v["virtual-size"].as_u64().expect("virtual-size")
    }

    fn assert_same_bytes(got: &[u8], expected: &[u8], at: u64, path: &Path) {
        if got != expected {
            let i = got
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(expected.len()));
            panic!(
                "{path:?}: bytes differ from qemu-img convert at guest offset {}",
                at + i as u64
            );
        }
    }

    /// The layer has qemu-img info's virtual size; its data extents are qemu-img map's
    /// data runs; reading the whole disk (in uneven chunks) gives qemu-img convert's
    /// bytes.
    pub fn assert_layer_matches_qemu(layer: Arc<dyn Layer>, path: &Path, fmt: &str) {
        let size = qemu_virtual_size(path, fmt);
        assert_eq!(layer.virtual_size(), size, "virtual size of {path:?}");
        let disk = Disk::new(vec![layer]);
        let ours = disk.data_extents(0, size).expect("data extents");
        let theirs = data_runs(&qemu_map(path, Some(fmt)));
        assert_eq!(
            ours, theirs,
            "data extents of {path:?} against qemu-img map"
        );
        if size <= FULL_COMPARE_LIMIT {
            let expected = qemu_raw_bytes(path, Some(fmt));
            assert_eq!(expected.len() as u64, size);
            let mut got = vec![0u8; size as usize];
            let mut pos = 0usize;
            while pos < got.len() {
                let n = 1_000_003.min(got.len() - pos);
                disk.read_at(&mut got[pos..pos + n], pos as u64)
                    .unwrap_or_else(|e| panic!("read at {pos}: {e}"));
                pos += n;
            }
            assert_same_bytes(&got, &expected, 0, path);
        } else {
            let dir = tempfile::tempdir().unwrap();
            let raw = dir.path().join("raw");
            qemu_img(&[
                "convert",
                "-f",
                fmt,
                "-O",
                "raw",
                path.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
            let raw = std::fs::File::open(&raw).unwrap();
            let mut windows: Vec<(u64, u64)> = theirs.clone();
            // Also a few windows outside the data, which must read as zeroes on both sides.
            for at in [0, size / 3, size / 2, size - size.min(1 << 20)] {
                windows.push((at, size.min(1 << 20).min(size - at)));
            }
            for (start, len) in windows {
                let mut pos = start;
                while pos < start + len {
                    let n = (8u64 << 20).min(start + len - pos) as usize;
                    let mut got = vec![0u8; n];
                    let mut want = vec![0u8; n];
                    disk.read_at(&mut got, pos).expect("read");
                    std::os::unix::fs::FileExt::read_exact_at(&raw, &mut want, pos).unwrap();
                    assert_same_bytes(&got, &want, pos, path);
                    pos += n as u64;
                }
            }
        }
    }

    /// Eight threads read overlapping pseudo-random ranges of `disk` at once; every
    /// range equals the same range of qemu-img convert's output.
    pub fn assert_concurrent_reads_match(disk: &Disk, path: &Path, fmt: &str) {
        let expected = Arc::new(qemu_raw_bytes(path, Some(fmt)));
        let size = expected.len() as u64;
        assert_eq!(disk.virtual_size(), size);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let expected = expected.clone();
                s.spawn(move || {
                    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..200 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let at = x % size;
                        let len = (x >> 40) % (300 << 10) + 1;
                        let len = len.min(size - at) as usize;
                        let mut buf = vec![0u8; len];
                        disk.read_at(&mut buf, at).expect("concurrent read");
                        assert_same_bytes(
                            &buf,
                            &expected[at as usize..at as usize + len],
                            at,
                            path,
                        );
                    }
                });
            }
        });
    }

    /// Opens many corrupted copies of `src` (a few bytes overwritten, half of the time
    /// in the first sector, where the headers are) and maps and reads each one that
    /// opens. Errors are expected; a panic, a hang or a huge allocation fails the test.
    pub fn assert_corruption_never_panics(
        src: &Path,
        open: impl Fn(&Path) -> crate::image::Result<Arc<dyn Layer>>,
        rounds: u64,
    ) {
        let original = std::fs::read(src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("corrupt");
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        std::fs::write(&p, &original).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let mut opened = 0;
        for _ in 0..rounds {
            // Patch the copy in place and restore it after the round: rewriting whole
            // files each round would dominate the test's time.
            let mut changed = Vec::new();
            for _ in 0..1 + next() % 4 {
                let r = next();
                let at = if r % 2 == 0 { r >> 8 } else { (r >> 8) % 512 } as usize % original.len();
                let byte = match (r >> 4) % 4 {
                    0 => 0,
                    1 => 0xff,
                    2 => 1,
                    _ => (r >> 32) as u8,
                };
                std::os::unix::fs::FileExt::write_all_at(&f, &[byte], at as u64).unwrap();
                changed.push(at);
            }
            if let Ok(layer) = open(&p) {
                opened += 1;
                let size = layer.virtual_size();
                let disk = Disk::new(vec![layer]);
                let extents = disk.data_extents(0, size).unwrap_or_default();
                let mut buf = vec![0u8; 1 << 20];
                let _ = disk.read_at(&mut buf[..size.min(1 << 20) as usize], 0);
                for (start, len) in extents.into_iter().take(8) {
                    let n = len.min(1 << 20) as usize;
                    let _ = disk.read_at(&mut buf[..n], start);
                }
            }
            for at in changed {
                std::os::unix::fs::FileExt::write_all_at(&f, &original[at..at + 1], at as u64)
                    .unwrap();
            }
        }
        assert!(opened > 0, "no corrupted copy of {src:?} opened at all");
    }

    /// A copy of `src` at `dst` cut to `len` bytes.
    pub fn copy_truncated(src: &Path, dst: PathBuf, len: u64) -> PathBuf {
        std::fs::copy(src, &dst).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&dst)
            .unwrap()
            .set_len(len)
            .unwrap();
        dst
    }

    /// A copy of `src` at `dst` with `bytes` written at offset `at`.
    pub fn patched(src: &Path, dst: PathBuf, at: usize, bytes: &[u8]) -> PathBuf {
        let mut data = std::fs::read(src).unwrap();
        if data.len() < at + bytes.len() {
            data.resize(at + bytes.len(), 0);
        }
        data[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&dst, data).unwrap();
        dst
    }
}
