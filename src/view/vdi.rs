//! stub
use super::{Error, Layout, Result, Segment, ViewId};
use crate::image::Disk;
use std::sync::Arc;
#[derive(Debug)]
pub struct VdiLayout;
impl VdiLayout {
    pub fn new(disk: Arc<Disk>, _id: ViewId) -> Result<VdiLayout> {
        Err(Error::OutOfRange { path: disk.top().path().to_path_buf(), offset: 0, size: 0 })
    }
}
impl Layout for VdiLayout {
    fn size(&self) -> u64 { 0 }
    fn segment(&self, _o: u64) -> Result<Segment> { unreachable!() }
    fn generate(&self, _o: u64, _b: &mut [u8]) -> Result<()> { Ok(()) }
    fn allocated_bytes(&self) -> u64 { 0 }
}
