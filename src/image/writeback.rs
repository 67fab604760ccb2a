//! Paced write-back of a file being written: a few windows of dirty pages at most.
//!
//! A multi-GiB file written into the page cache and synced at the end keeps the disk idle
//! while it is written, then its writer waiting while it is flushed; and once the dirty
//! pages pass the kernel's thresholds, the kernel throttles this writer (and every other
//! one) to what it estimates the disk can take, far below what it can (measured on the
//! benchmark machine: a 4 GiB scratch copy received at 200 MB/s, the same bytes written
//! paced at 1.4 GB/s). So the write-back of every `WINDOW` bytes written is started at
//! once (`sync_file_range`), and waited for once `LAG` more bytes were written after
//! them: the disk works while the writer does, a final sync finds little left, and the
//! file never holds more than `LAG` + `WINDOW` bytes of dirty pages.
//!
//! Writes may come in any order: each window is the span of the writes made since the
//! last one was started (one span for an in-order writer, the usual case).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::io::AsFd;

/// Written bytes whose write-back is started at once: big enough for large disk
/// requests, small next to the page cache.
pub const WINDOW: u64 = 16 << 20;
/// How many bytes written after a window its write-back is waited for.
pub const LAG: u64 = 64 << 20;

/// Paces the write-back of one file (see the module text). Only a hint to the kernel:
/// the owner's sync is what makes the file durable, so a filesystem without
/// `sync_file_range` just skips it.
#[derive(Debug)]
pub struct Writeback {
    /// Span of the writes since the last window was started, and their bytes.
    span: Option<(u64, u64)>,
    bytes: u64,
    /// Windows started and not waited for, with the bytes written after each started.
    started: VecDeque<((u64, u64), u64)>,
    enabled: bool,
    /// Bytes to be written before the pacing starts.
    free: u64,
}

impl Default for Writeback {
    fn default() -> Writeback {
        Writeback::new()
    }
}

impl Writeback {
    pub fn new() -> Writeback {
        Writeback::after(0)
    }

    /// Paces only once `free` bytes were written: what a smaller file holds is left to
    /// the page cache, where its owner may drop it before it ever reaches the disk.
    pub fn after(free: u64) -> Writeback {
        Writeback {
            span: None,
            bytes: 0,
            started: VecDeque::new(),
            enabled: true,
            free,
        }
    }

    /// Paces from now on, whatever was written.
    pub fn now(&mut self) {
        self.free = 0;
    }

    /// `len` bytes were written at `offset` of `file`.
    pub fn wrote(&mut self, file: &File, offset: u64, len: u64) {
        if !self.enabled || len == 0 {
            return;
        }
        if self.free > 0 {
            self.free = self.free.saturating_sub(len);
            return;
        }
        let end = offset.saturating_add(len);
        self.span = Some(match self.span {
            Some((lo, hi)) => (lo.min(offset), hi.max(end)),
            None => (offset, end),
        });
        self.bytes += len;
        if self.bytes < WINDOW {
            return;
        }
        let window = self.span.take().unwrap_or((offset, end));
        let written = std::mem::take(&mut self.bytes);
        for (_, after) in self.started.iter_mut() {
            *after += written;
        }
        self.range(file, window, libc::SYNC_FILE_RANGE_WRITE);
        self.started.push_back((window, 0));
        while let Some(&(old, after)) = self.started.front() {
            if after < LAG {
                break;
            }
            self.started.pop_front();
            self.range(
                file,
                old,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
    }

    fn range(&mut self, file: &File, (from, to): (u64, u64), flags: libc::c_uint) {
        if !self.enabled {
            return;
        }
        let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            self.enabled = false;
            return;
        };
        if let Err(e) = crate::sys::sync_file_range(file.as_fd(), off, len, flags) {
            log::debug!("no paced write-back ({e}): the final sync writes it all");
            self.enabled = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Which windows are started and waited for, on a real file (what the kernel does
    /// with them is its business: the file reads back as written either way).
    #[test]
    fn windows_are_started_and_waited_in_order_whatever_the_write_order() {
        let (_dir, f) = crate::testutil::scratch_file();
        let mut w = Writeback::new();
        let piece = vec![7u8; 1 << 20];
        // In order: one window every 16 MiB, waited for 64 MiB later.
        for i in 0..(WINDOW + LAG) / (1 << 20) {
            f.write_all_at(&piece, i << 20).unwrap();
            w.wrote(&f, i << 20, 1 << 20);
        }
        assert!(w.enabled, "sync_file_range works on the test's filesystem");
        assert_eq!(w.started.len() as u64, LAG / WINDOW);
        assert_eq!(w.started.front().unwrap().0, (WINDOW, 2 * WINDOW));
        // Backwards: the window is the span of what was written since.
        let base = WINDOW + LAG;
        for i in (0..WINDOW / (1 << 20)).rev() {
            let at = base + (i << 20);
            f.write_all_at(&piece, at).unwrap();
            w.wrote(&f, at, 1 << 20);
        }
        assert_eq!(w.started.back().unwrap().0, (base, base + WINDOW));
        assert_eq!(w.started.len() as u64, LAG / WINDOW);
        assert_eq!(w.bytes, 0);
        assert!(w.span.is_none());
        // Everything reads back as written.
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, base).unwrap();
        assert_eq!(back, piece);
    }

    #[test]
    fn nothing_is_paced_before_the_free_bytes_unless_told_now() {
        let (_dir, f) = crate::testutil::scratch_file();
        let mut w = Writeback::after(2 * WINDOW);
        w.wrote(&f, 0, WINDOW);
        w.wrote(&f, WINDOW, WINDOW);
        assert!(
            w.started.is_empty() && w.span.is_none(),
            "within the free bytes"
        );
        w.wrote(&f, 2 * WINDOW, WINDOW);
        assert_eq!(w.started.len(), 1, "paced past them");
        let mut w = Writeback::after(u64::MAX);
        w.now();
        w.wrote(&f, 0, WINDOW);
        assert_eq!(w.started.len(), 1, "paced at once");
    }
}
