//! Generated views pushed into the kernel's page cache ahead of a sequential reader.
//!
//! A reader of a generated view (`cp disk.vdi OUT`) pays, on its own core, for every
//! page of the view the kernel allocates and fills from the daemon's replies: measured,
//! three quarters of the daemon's time was the kernel copying replies into freshly
//! allocated page cache, and `cp` most of a second of system time allocating it. So once
//! a reader is seen reading an open view sequentially (large reads, each starting where
//! the previous one ended), a thread of the mount generates the view further on and
//! stores it into the kernel's cache itself (`FUSE_NOTIFY_STORE`), on the other core,
//! where the reader then finds it. Bounded: at most [`PUSH_AHEAD`] bytes past the end of
//! the latest read the kernel asked for, one [`PUSH_PIECE`] buffer, one thread for the
//! whole mount, and nothing once the file is closed. The reader's reads of cached pages
//! are not seen, so one page in every [`TRIP_EVERY`] pushed is left out: the kernel asks
//! for it when the reader gets there, and the push goes on from there. Holes the view
//! reports (`SEEK_HOLE`) are skipped, as a sparse-aware reader skips them; what is
//! stored is whole pages.
//!
//! Behind a sequential reader of a view in an export format (every view but `disk.raw`),
//! the pages it has passed are dropped from the cache ([`DROP_BEHIND`]). Such a view is
//! copied out once (`cp disk.vpc OUT`, `pcocc image export`): kept, its pages would stay
//! until memory runs short, each copy filling as much fresh memory for the view as for
//! the copy itself, where `qemu-img convert` fills only the copy. Dropped, their memory is
//! what the next pieces reuse (measured on a 2-CPU VM whose freed memory goes back to
//! its host: `cp` of a 3-layer revision's `disk.qcow2`, 2.3 GB, took 3.03× `qemu-img
//! convert` with the pages kept, 0.63× with them dropped). `disk.raw`, the view a VM
//! reads again and again, keeps its pages like any file read. Nothing is dropped while
//! another reader of the same view is being pushed for.
//!
//! Views never change (revision files are immutable and kept across opens), so a page
//! stored ahead holds exactly what a read would have brought.

use crate::image::Format;
use crate::tree::OpenFile;
use crate::view::ReadAhead;
use fuser::{INodeNo, Notifier};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// How far past the end of the latest read asked by the kernel the view is pushed.
pub const PUSH_AHEAD: u64 = 64 << 20;
/// Bytes generated and stored at a time (one notification).
pub const PUSH_PIECE: usize = 1 << 20;
/// The kernel's page: what is stored is whole pages of the view.
const PAGE: u64 = 4096;
/// One page in this many bytes pushed is left out, so that the reader's read of it
/// comes to the daemon (a page read, one round trip) and tells it how far the reader
/// is: the push then goes on while the reader reads what was pushed, instead of waiting
/// at [`PUSH_AHEAD`] until the reader finds nothing cached and waits in turn.
pub const TRIP_EVERY: u64 = 8 << 20;
/// Reads smaller than this are not a sequential stream worth pushing for (the kernel's
/// read-ahead of a sequential reader asks for 1 MiB at a time on this mount).
pub const MIN_READ: u64 = 128 << 10;
/// Pages of an export view further than this behind the latest read the kernel asked
/// for are dropped from the cache (the reader is past them).
pub const DROP_BEHIND: u64 = 16 << 20;

/// One open view being pushed.
struct Job {
    ino: u64,
    file: Arc<OpenFile>,
    /// End of the latest read the kernel asked for.
    last_end: u64,
    /// Pushed up to here.
    pushed: u64,
    /// Push up to here.
    want: u64,
    /// The pusher's own read-ahead of the view's stored bytes.
    ahead: ReadAhead,
    /// Dropped from the kernel's cache up to here.
    dropped: u64,
    /// Drop up to here.
    drop_to: u64,
    /// The next piece starting at or past here leaves its first page out (see
    /// [`TRIP_EVERY`]).
    next_trip: u64,
}

impl Job {
    /// The reader of a view of `size` bytes read `offset..end`: the push goes on to
    /// [`PUSH_AHEAD`] past it, and an export view drops the pages the reader has passed
    /// (see the module text). Returns whether the pushing thread has work.
    fn reader_at(&mut self, offset: u64, end: u64, size: u64) -> bool {
        self.want = self.want.max(end.saturating_add(PUSH_AHEAD).min(size));
        if self.file.view().is_some_and(|v| v.format() != Format::Raw) {
            let behind = offset.saturating_sub(DROP_BEHIND) & !(PUSH_PIECE as u64 - 1);
            self.drop_to = self.drop_to.max(behind);
        }
        self.pushed < self.want || self.dropped < self.drop_to
    }
}

#[derive(Default)]
struct Jobs {
    by_fh: HashMap<u64, Job>,
    /// Served last, so that several readers take turns.
    turn: u64,
}

/// The mount's pusher (see the module text). Does nothing until [`Pusher::start`].
#[derive(Default)]
pub struct Pusher {
    shared: Arc<(Mutex<Jobs>, Condvar)>,
    /// Set when started: the kernel's own read-ahead window, in bytes.
    window: OnceLock<u64>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").finish_non_exhaustive()
    }
}

impl Pusher {
    /// Starts the pushing thread, storing through `notifier`, past the kernel's own
    /// read-ahead of `window` bytes.
    pub fn start(&self, notifier: Notifier, window: u64) {
        if self.window.set(window).is_err() {
            return;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("push".into())
            .spawn(move || push_loop(&shared, &notifier));
        if let Err(e) = spawned {
            log::warn!("cannot start the view push thread: {e}");
        }
    }

    /// The kernel asked for fewer than [`MIN_READ`] bytes at `offset` of the open file
    /// `fh`: where a reader being pushed for reads within what was pushed, a page left
    /// out (see [`TRIP_EVERY`]), it is that far: the push goes on from there.
    pub fn on_small_read(&self, fh: u64, offset: u64, len: u64) {
        let (lock, wake) = &*self.shared;
        let mut jobs = lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(job) = jobs.by_fh.get_mut(&fh) else {
            return;
        };
        if !(job.last_end..job.pushed).contains(&offset) {
            return;
        }
        let Ok(size) = job.file.size() else {
            return;
        };
        let end = offset.saturating_add(len);
        job.last_end = end;
        if job.reader_at(offset, end, size) {
            wake.notify_one();
        }
    }

    /// The kernel asked for `len` bytes at `offset` of the open file `fh` (inode `ino`).
    pub fn on_read(&self, fh: u64, ino: u64, file: &Arc<OpenFile>, offset: u64, len: u64) {
        let Some(&window) = self.window.get() else {
            return;
        };
        if len < MIN_READ || file.view().is_none() {
            return;
        }
        let Ok(size) = file.size() else {
            return;
        };
        let end = offset.saturating_add(len);
        let (lock, wake) = &*self.shared;
        let mut jobs = lock.lock().unwrap_or_else(|e| e.into_inner());
        let job = jobs.by_fh.entry(fh).or_insert_with(|| Job {
            ino,
            file: file.clone(),
            last_end: end,
            pushed: 0,
            want: 0,
            ahead: ReadAhead::default(),
            dropped: 0,
            drop_to: 0,
            next_trip: 0,
        });
        // Requests of one stream arrive nearly in order; anything else is not pushed for.
        let sequential = offset.abs_diff(job.last_end) <= PUSH_AHEAD;
        job.last_end = end;
        if !sequential {
            return;
        }
        // The kernel reads its own window past `end`; the push starts beyond it.
        job.pushed = job.pushed.max(end.saturating_add(window));
        if job.reader_at(offset, end, size) {
            wake.notify_one();
        }
    }

    /// The open file `fh` was closed: nothing more is pushed for it.
    pub fn release(&self, fh: u64) {
        let (lock, _) = &*self.shared;
        lock.lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_fh
            .remove(&fh);
    }
}

/// What the pushing thread does next.
enum Work {
    /// Pushes a piece.
    Push(Task),
    /// Drops the cached pages of inode `ino` from `from` to `to`.
    Drop { ino: u64, from: u64, to: u64 },
}

/// The next piece to push: the open file `fh` (inode `ino`) from `at`, up to `want`.
struct Task {
    fh: u64,
    ino: u64,
    file: Arc<OpenFile>,
    at: u64,
    want: u64,
    /// Leave the first page the piece stores out (see [`TRIP_EVERY`]).
    trip: bool,
}

/// Waits for the next work: pages a reader has passed first (their memory is what the
/// next pieces reuse), else the next piece of the job after the one served last.
fn next_work(lock: &Mutex<Jobs>, wake: &Condvar) -> Work {
    let mut jobs = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(j) = jobs.by_fh.values_mut().find(|j| j.dropped < j.drop_to) {
            let (ino, from, to) = (j.ino, j.dropped, j.drop_to);
            j.dropped = to;
            // Another reader of the same view may still be behind.
            if jobs.by_fh.values().filter(|j| j.ino == ino).count() == 1 {
                return Work::Drop { ino, from, to };
            }
            continue;
        }
        let turn = jobs.turn;
        let next = jobs
            .by_fh
            .iter()
            .filter(|(_, j)| j.pushed < j.want)
            .map(|(&fh, _)| fh)
            .min_by_key(|&fh| (fh <= turn, fh));
        if let Some(fh) = next {
            // Found in the map under this very lock.
            let j = &jobs.by_fh[&fh];
            let (at, want) = (j.pushed, j.want);
            let trip = at >= j.next_trip;
            if let Some(view) = j.file.view() {
                j.ahead
                    .on_read(view, at, (want - at).min(PUSH_PIECE as u64));
            }
            let task = Task {
                fh,
                ino: j.ino,
                file: j.file.clone(),
                at,
                want,
                trip,
            };
            jobs.turn = fh;
            return Work::Push(task);
        }
        jobs = wake.wait(jobs).unwrap_or_else(|e| e.into_inner());
    }
}

/// Stores the view of `task.file` into the cache of its inode from `task.at`: one piece
/// of at most [`PUSH_PIECE`] bytes (the size of `buf`) that stops at `task.want` and at
/// the next reported hole, or nothing when `at` is in a reported hole. Returns where the
/// next piece starts.
fn push_piece(notifier: &Notifier, buf: &mut [u8], task: &Task) -> std::io::Result<Pushed> {
    let &Task {
        ino,
        at,
        want,
        ref file,
        trip,
        ..
    } = task;
    let view = file
        .view()
        .ok_or_else(|| std::io::Error::other("not a view"))?;
    let io = |e: crate::view::Error| std::io::Error::other(e.to_string());
    // A hole the reader is told of (SEEK_HOLE) is skipped, as the reader skips it. Only
    // whole pages are stored: the kernel leaves a page stored in part out of date, and
    // the reader's read of it goes to the daemon anyway (the data of `disk.vpc` starts
    // 512 bytes into a page after every hole).
    let Some(data) = view.next_data(at).map_err(io)? else {
        return Ok(Pushed::to(want));
    };
    let data = data & !(PAGE - 1);
    if data > at {
        return Ok(Pushed::to(data.min(want)));
    }
    // Only as far as this piece goes: a view with no hole left would be walked to its end
    // for every piece.
    let end = want.min(at + buf.len() as u64);
    let hole = view.hole_before(at, end).map_err(io)?;
    // `end` is within the view (`want` is), and so is the hole found before it.
    let stop = hole.next_multiple_of(PAGE).min(end);
    let n = (stop - at).max(1) as usize;
    let got = view.read_at(&mut buf[..n], at).map_err(io)?;
    if got == 0 {
        return Err(std::io::Error::other("nothing to push"));
    }
    // A page left out for the reader to ask for, in a piece of more than one page.
    let skip = if trip && got as u64 >= 2 * PAGE && at.is_multiple_of(PAGE) {
        PAGE as usize
    } else {
        0
    };
    notifier.store(INodeNo(ino), at + skip as u64, &buf[skip..got])?;
    Ok(Pushed {
        // The next piece starts at the hole, which it skips, or where this one ended.
        next: (at + got as u64).min(hole.max(at + 1)),
        left_out: (skip > 0).then_some(at),
    })
}

/// What a piece pushed.
struct Pushed {
    /// Where the next piece starts.
    next: u64,
    /// The page left out for the reader to ask for, if any.
    left_out: Option<u64>,
}

impl Pushed {
    /// Nothing stored: the next piece starts at `next`.
    fn to(next: u64) -> Pushed {
        Pushed {
            next,
            left_out: None,
        }
    }
}

fn push_loop(shared: &(Mutex<Jobs>, Condvar), notifier: &Notifier) {
    let (lock, wake) = shared;
    // Stored from again and again: in huge pages where the kernel has them (see
    // `MappedBuf::huge`), else in an ordinary buffer.
    let mut mapped = crate::sys::MappedBuf::huge(PUSH_PIECE).ok();
    let mut plain = Vec::new();
    let buf: &mut [u8] = match mapped.as_deref_mut() {
        Some(m) => &mut m[..PUSH_PIECE],
        None => {
            plain.resize(PUSH_PIECE, 0);
            &mut plain
        }
    };
    loop {
        let task = match next_work(lock, wake) {
            Work::Push(task) => task,
            Work::Drop { ino, from, to } => {
                // An inode the kernel no longer knows has no pages to drop.
                let _ = notifier.inval_inode(INodeNo(ino), from as i64, (to - from) as i64);
                continue;
            }
        };
        let pushed = push_piece(notifier, buf, &task);
        let Task { fh, ino, at, .. } = task;
        let mut jobs = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = jobs.by_fh.get_mut(&fh) {
            match pushed {
                Ok(p) => {
                    j.pushed = j.pushed.max(p.next);
                    if let Some(page) = p.left_out {
                        j.next_trip = page.saturating_add(TRIP_EVERY);
                    }
                }
                // The kernel no longer knows the inode, or the view cannot be read here
                // (the reader's own reads will say why): stop pushing this file.
                Err(e) => {
                    log::debug!("push of inode {ino} stopped at {at}: {e}");
                    j.want = 0;
                }
            }
        }
    }
}
