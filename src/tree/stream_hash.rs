//! The sha256 of a file being imported, computed while its bytes arrive.
//!
//! A file that may be stored as it is (a clean standalone qcow2,
//! [`crate::image::qcow2::keep`]) is named by the sha256 of its bytes. Hashing 4 GiB
//! takes seconds; done at the last close, it is time its writer waits after the last
//! byte was sent. So while the file is written in order (every write at or past the end
//! of the previous one, as `cp`, `cat`, `dd` and `rsync` write), a thread of its own
//! reads back from the page cache what can no longer change (everything below the
//! stream's end) and hashes it. A write going back, a file cut shorter, or a close that
//! comes first stops it: the hash is then computed at publish as before.

use super::follow::{Followed, Follower};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes read back per step.
const STEP: usize = 1 << 20;

/// The hashing of one in-order stream (see the module text).
#[derive(Debug)]
pub struct StreamHash(Follower<Option<String>>);

impl StreamHash {
    /// Starts hashing `file` (through a duplicate of its descriptor) from its start.
    /// `None` when no thread or descriptor can be had: the hash is then computed later.
    pub fn start(file: &File) -> Option<StreamHash> {
        let file = file.try_clone().ok()?;
        Follower::spawn("import-hash", 0, move |followed| {
            hash_stream(&file, followed)
        })
        .map(StreamHash)
    }

    /// Every byte below `ready` is final.
    pub fn advance(&self, ready: u64) {
        self.0.advance(ready);
    }

    /// The file is complete at `len` bytes: its hash, once the thread has read it all;
    /// `None` if the stream was stopped.
    pub fn finish(self, len: u64) -> Option<String> {
        self.0.finish(len).flatten()
    }
}

fn hash_stream(file: &File, followed: &Followed) -> Option<String> {
    let mut h = Sha256::new();
    // Its own mapping, returned to the system when the stream ends.
    let mut buf = crate::sys::MappedBuf::new(STEP).ok()?;
    let mut at = 0u64;
    loop {
        let (ready, done) = followed.wait(at + STEP as u64)?;
        while at < ready && (done || ready - at >= STEP as u64) {
            let n = ((ready - at) as usize).min(STEP);
            let chunk = &mut buf[..n];
            let mut got = 0;
            while got < n {
                match file.read_at(&mut chunk[got..], at + got as u64) {
                    // Past the end of a file sized by its writer: zeroes.
                    Ok(0) => {
                        chunk[got..].fill(0);
                        got = n;
                    }
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return None,
                }
            }
            h.update(&chunk[..]);
            at += n as u64;
            if followed.stopped() {
                return None;
            }
        }
        if done && at >= ready {
            return Some(format!("{:x}", h.finalize()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::scratch_file;

    fn sha(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    #[test]
    fn an_in_order_stream_with_holes_and_a_sized_tail_hashes_as_its_bytes() {
        let (_d, f) = scratch_file();
        let h = StreamHash::start(&f).unwrap();
        let mut expect = Vec::new();
        for i in 0..7u8 {
            let piece = vec![i + 1; 700_000];
            let at = expect.len() as u64 + if i == 3 { 3 << 20 } else { 0 };
            expect.resize(at as usize, 0);
            f.write_all_at(&piece, at).unwrap();
            expect.extend_from_slice(&piece);
            h.advance(expect.len() as u64);
        }
        // `cp` of a sparse file ends with an ftruncate past its last write.
        let len = expect.len() as u64 + 5_000_000;
        f.set_len(len).unwrap();
        expect.resize(len as usize, 0);
        assert_eq!(h.finish(len).unwrap(), sha(&expect));
    }

    #[test]
    fn a_stream_finished_shorter_than_it_went_has_no_hash() {
        let (_d, f) = scratch_file();
        f.write_all_at(&[1u8; 3 << 20], 0).unwrap();
        let h = StreamHash::start(&f).unwrap();
        h.advance(3 << 20);
        assert_eq!(h.finish(1 << 20), None);
    }

    #[test]
    fn dropping_a_stream_stops_its_thread() {
        let (_d, f) = scratch_file();
        let h = StreamHash::start(&f).unwrap();
        h.advance(10);
        drop(h); // returns: the thread was waiting for more and saw the stop
    }
}
