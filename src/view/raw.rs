//! `disk.raw`: the guest disk itself, with holes wherever the disk reads zero because
//! nothing stores data there.

use super::{Layout, Piece, Result, Segment};
use crate::image::Disk;
use std::sync::Arc;

#[derive(Debug)]
pub struct RawLayout {
    disk: Arc<Disk>,
    allocated: u64,
}

impl RawLayout {
    pub fn new(disk: Arc<Disk>) -> RawLayout {
        // Counting allocated bytes walks the tables once; raw views are opened once per
        // revision and kept, so this is paid once.
        // A disk whose map cannot be walked (corrupt, or too fragmented to be real)
        // reports nothing allocated; its reads report the error.
        let mut allocated = 0;
        let walked = disk.walk(0, disk.virtual_size(), |_, ext| {
            if ext.mapping.is_data() {
                allocated += ext.len;
            }
            Ok(())
        });
        let allocated = if walked.is_ok() { allocated } else { 0 };
        RawLayout { disk, allocated }
    }
}

impl Layout for RawLayout {
    fn size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn segment(&self, offset: u64) -> Result<Segment> {
        let ext = self.disk.map(offset, self.size() - offset)?;
        let piece = if ext.mapping.is_data() {
            Piece::Guest(offset)
        } else {
            Piece::Hole
        };
        Ok(Segment {
            len: ext.len,
            piece,
        })
    }

    fn generate(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }
}
