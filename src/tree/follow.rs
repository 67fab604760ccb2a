//! A thread that follows a file being written in order.
//!
//! While a file is imported front to back (`cp`, `cat`, `dd`), work on it can start
//! before its last byte: its hash ([`super::stream_hash`]) and its conversion
//! ([`super::stream_convert`]). Each runs on a thread of its own that only reads bytes
//! the writer can no longer change. The writer says how far that is
//! ([`Follower::advance`]), and at the last close how long the file is
//! ([`Follower::finish`]); a write going back or a shorter file ends the following (the
//! work is then done at the close, as for any other file), and so does dropping the
//! follower ([`Follower::stop`] also hands back what the thread's work returned).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

#[derive(Default)]
struct Progress {
    /// Every byte below is final.
    ready: u64,
    /// No more bytes: `ready` is the file's length.
    done: bool,
    /// The stream left its order, or its owner went: stop.
    stopped: bool,
}

/// How far a followed file has arrived, as its following thread sees it.
#[derive(Default)]
pub struct Followed {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Followed {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the bytes below `end` are final or the file is complete, and returns
    /// how far it is final and whether it is complete; `None` once the following stops.
    pub fn wait(&self, end: u64) -> Option<(u64, bool)> {
        let mut p = self.lock();
        loop {
            if p.stopped {
                return None;
            }
            if p.ready >= end || p.done {
                return Some((p.ready, p.done));
            }
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether the following was stopped.
    pub fn stopped(&self) -> bool {
        self.lock().stopped
    }
}

/// One thread following one file; the thread's work returns a `T`.
pub struct Follower<T> {
    followed: Arc<Followed>,
    thread: Option<JoinHandle<T>>,
}

impl<T> std::fmt::Debug for Follower<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Follower<T> {
    /// Starts thread `name` running `work`, the file's first `ready` bytes being final.
    /// `None` when no thread can be had.
    pub fn spawn(
        name: &str,
        ready: u64,
        work: impl FnOnce(&Followed) -> T + Send + 'static,
    ) -> Option<Follower<T>> {
        let followed = Arc::new(Followed::default());
        followed.lock().ready = ready;
        let theirs = followed.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&theirs))
            .ok()?;
        Some(Follower {
            followed,
            thread: Some(thread),
        })
    }

    /// Every byte below `ready` is final.
    pub fn advance(&self, ready: u64) {
        let mut p = self.followed.lock();
        if ready > p.ready {
            p.ready = ready;
            self.followed.changed.notify_all();
        }
    }

    /// The file is complete at `len` bytes: what the thread's work returned, once it is
    /// done (a file shorter than the bytes already called final stops the thread first);
    /// `None` when the thread failed.
    pub fn finish(mut self, len: u64) -> Option<T> {
        {
            let mut p = self.followed.lock();
            if len < p.ready {
                p.stopped = true;
            } else {
                p.ready = len;
                p.done = true;
            }
            self.followed.changed.notify_all();
        }
        self.thread.take()?.join().ok()
    }

    /// Stops the thread: what its work returned, once it is done; `None` when the
    /// thread failed.
    pub fn stop(mut self) -> Option<T> {
        self.followed.lock().stopped = true;
        self.followed.changed.notify_all();
        self.thread.take()?.join().ok()
    }
}

impl<T> Drop for Follower<T> {
    fn drop(&mut self) {
        self.followed.lock().stopped = true;
        self.followed.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_sees_the_file_arrive_and_gets_its_length_at_the_end() {
        let f = Follower::spawn("test-follow", 10, |a: &Followed| {
            let mut seen = vec![a.wait(10).unwrap()];
            seen.push(a.wait(100).unwrap());
            seen.push(a.wait(u64::MAX).unwrap());
            seen
        })
        .unwrap();
        f.advance(5); // never backwards
        f.advance(100);
        let seen = f.finish(150).unwrap();
        assert!(seen[0].0 >= 10);
        assert!(seen[1].0 >= 100);
        assert_eq!(seen[2], (150, true));
    }

    #[test]
    fn a_shorter_end_or_a_drop_stops_the_follower() {
        let f = Follower::spawn("test-follow", 0, |a: &Followed| a.wait(u64::MAX)).unwrap();
        f.advance(100);
        // The thread's own answer to the stop comes back.
        assert_eq!(f.finish(50), Some(None));
        let f = Follower::spawn("test-follow", 0, |a: &Followed| a.wait(u64::MAX)).unwrap();
        assert_eq!(f.stop(), Some(None));
        let (tx, rx) = std::sync::mpsc::channel();
        let f = Follower::spawn("test-follow", 0, move |a: &Followed| {
            tx.send(a.wait(u64::MAX)).unwrap();
            a.stopped()
        })
        .unwrap();
        drop(f); // returns: the waiting thread saw the stop
        assert_eq!(rx.recv().unwrap(), None);
    }
}
