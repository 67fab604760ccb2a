//! What an import learns from its bytes as they arrive, so that its close has less to do:
//! the runs of 64 KiB clusters holding a non-zero byte, which the converter would
//! otherwise find by reading the whole scratch file again ([`convert::Options::nonzero`]).
//!
//! Only an in-order stream is understood, which is what `cp`, `dd`, `rsync` and `cat`
//! write: every write starts at or after the end of the previous one (skipped ranges are
//! holes that nobody wrote). Then every cluster below the current end is final once the
//! stream has moved past it, and one cluster at most is still open. Anything else (a
//! write going back, a file cut shorter, more runs than [`MAX_RUNS`]) makes the stream
//! unknown, and the converter scans the file as it always could: the knowledge is an
//! optimisation, never a second source of truth.

use crate::image::convert::{is_zero, push_run};
use crate::image::qcow2_layout::CLUSTER_SIZE;

/// Most runs remembered, 16 bytes each (16 MiB): a writer alternating data and zero
/// clusters over a huge file falls back to the scan, whose memory is bounded by the
/// reader's own limits, instead of growing this list without end.
const MAX_RUNS: usize = 1 << 20;

/// The non-zero clusters of an in-order stream of writes.
#[derive(Debug, Default)]
pub struct Arrival {
    /// Decided clusters with a non-zero byte, below the open one; `None` once the stream
    /// is not in order.
    runs: Option<Vec<(u64, u64)>>,
    /// Nothing at or past this offset was written.
    end: u64,
    /// The cluster holding `end - 1`, when `end` is inside it, has a non-zero byte.
    open_nonzero: bool,
    /// Some byte was written (a file only sized by `ftruncate` or `fallocate` holds
    /// nothing its writer gave).
    written: bool,
    /// Some non-zero byte was written.
    nonzero_written: bool,
}

impl Arrival {
    /// An empty file.
    pub fn new() -> Arrival {
        Arrival {
            runs: Some(Vec::new()),
            end: 0,
            open_nonzero: false,
            written: false,
            nonzero_written: false,
        }
    }

    /// Whether any non-zero byte was written since the file was empty.
    pub fn nonzero_written(&self) -> bool {
        self.nonzero_written
    }

    /// Whether any byte was written since the file was empty.
    pub fn written(&self) -> bool {
        self.written
    }

    /// `data` was written at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.written |= !data.is_empty();
        if !self.nonzero_written {
            self.nonzero_written = data.iter().any(|&b| b != 0);
        }
        let Some(runs) = self.runs.as_mut() else {
            return;
        };
        if data.is_empty() {
            return;
        }
        if offset < self.end {
            self.runs = None;
            return;
        }
        // The open cluster is closed unless this write continues inside it.
        if !self.end.is_multiple_of(CLUSTER_SIZE)
            && offset / CLUSTER_SIZE != self.end / CLUSTER_SIZE
        {
            if self.open_nonzero {
                push_run(runs, self.end / CLUSTER_SIZE);
            }
            self.open_nonzero = false;
        }
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let cluster = at / CLUSTER_SIZE;
            let cluster_end = (cluster + 1) * CLUSTER_SIZE;
            let n = ((cluster_end - at) as usize).min(rest.len());
            let nonzero = self.open_nonzero || !is_zero(&rest[..n]);
            at += n as u64;
            rest = &rest[n..];
            if at == cluster_end {
                if nonzero {
                    push_run(runs, cluster);
                }
                self.open_nonzero = false;
            } else {
                self.open_nonzero = nonzero;
            }
        }
        self.end = at;
        if runs.len() > MAX_RUNS {
            self.runs = None;
        }
    }

    /// Below this offset every byte is final while the stream stays in order (a write
    /// never goes back); `None` once it did not.
    pub fn in_order_end(&self) -> Option<u64> {
        self.runs.as_ref().map(|_| self.end)
    }

    /// The file was truncated or extended to `len`.
    pub fn set_len(&mut self, len: u64) {
        if len == 0 {
            *self = Arrival::new();
        } else if len < self.end {
            self.runs = None;
        }
    }

    /// The sorted, merged runs `(first cluster, count)` of clusters holding a non-zero
    /// byte, if the writes were understood.
    pub fn nonzero(&self) -> Option<Vec<(u64, u64)>> {
        let mut runs = self.runs.clone()?;
        if !self.end.is_multiple_of(CLUSTER_SIZE) && self.open_nonzero {
            push_run(&mut runs, self.end / CLUSTER_SIZE);
        }
        Some(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = CLUSTER_SIZE;

    #[test]
    fn in_order_writes_with_skipped_holes_give_their_nonzero_clusters() {
        let mut a = Arrival::new();
        a.write(0, &vec![1u8; C as usize]);
        a.write(C, &vec![0u8; C as usize]);
        // 4 KiB-aligned extents that straddle clusters, as `cp` writes a sparse file.
        a.write(3 * C + 4096, &vec![7u8; (C + 8192) as usize]);
        a.write(10 * C, &[0u8; 100]);
        a.write(10 * C + 100, &[5u8; 1]);
        assert_eq!(a.nonzero(), Some(vec![(0, 1), (3, 2), (10, 1)]));
    }

    #[test]
    fn a_partly_written_cluster_counts_once_whatever_its_pieces() {
        let mut a = Arrival::new();
        a.write(0, &[0u8; 4096]);
        a.write(4096, &[9u8; 4096]);
        a.write(8192, &[0u8; 4096]);
        a.write(C + 4096, &[0u8; 4096]);
        assert_eq!(a.nonzero(), Some(vec![(0, 1)]));
        a.write(2 * C - 1, &[1u8; 2]);
        assert_eq!(a.nonzero(), Some(vec![(0, 3)]));
    }

    #[test]
    fn writing_back_or_cutting_the_file_shorter_makes_the_stream_unknown() {
        let mut a = Arrival::new();
        a.write(0, &[1u8; 8192]);
        a.write(4096, &[1u8; 10]);
        assert_eq!(a.nonzero(), None);
        a.set_len(0);
        assert_eq!(a.nonzero(), Some(vec![]));
        a.write(0, &[1u8; 8192]);
        a.set_len(1 << 30);
        assert_eq!(a.nonzero(), Some(vec![(0, 1)]));
        a.set_len(100);
        assert_eq!(a.nonzero(), None);
    }

    #[test]
    fn too_many_runs_give_up_rather_than_grow() {
        let mut a = Arrival::new();
        for i in 0..=MAX_RUNS as u64 + 1 {
            a.write(2 * i * C, &[1u8]);
        }
        assert_eq!(a.nonzero(), None);
    }
}
