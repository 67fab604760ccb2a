//! `disk.qcow2`: any disk (a whole backing chain) flattened into one standalone qcow2 v3
//! file. The arrangement is [`Qcow2Layout`], the one the import converter writes, so a
//! view and a converted layer of the same disk content are the same bytes; this module
//! only maps that arrangement onto [`Layout`] segments: tables are generated (their
//! blocks without any entry are holes, as in the converted layer), data clusters are
//! guest reads.

use super::{Layout, Piece, Result, Segment};
use crate::image::Disk;
use crate::image::qcow2_layout::{Part, Qcow2Layout};
use std::sync::Arc;

#[derive(Debug)]
pub struct Qcow2View {
    layout: Qcow2Layout,
    /// The guest disk's own size: bytes of the last data cluster past it read as zeroes.
    disk_size: u64,
}

impl Qcow2View {
    /// Computes the layout of `disk` from its allocation tables (no data is read).
    pub fn new(disk: &Arc<Disk>) -> Result<Qcow2View> {
        Ok(Qcow2View {
            layout: Qcow2Layout::of_disk(disk)?,
            disk_size: disk.virtual_size(),
        })
    }
}

/// The segment of a data span from guest offset `guest` (`len` bytes), cut where the
/// guest disk ends (past it, the cluster is zero padding, generated).
pub(crate) fn guest_segment(guest: u64, len: u64, disk_size: u64) -> Segment {
    if guest >= disk_size {
        Segment {
            len,
            piece: Piece::Generated,
        }
    } else {
        Segment {
            len: len.min(disk_size - guest),
            piece: Piece::Guest(guest),
        }
    }
}

impl Layout for Qcow2View {
    fn size(&self) -> u64 {
        self.layout.file_size()
    }

    fn segment(&self, offset: u64) -> Result<Segment> {
        let span = self.layout.span(offset);
        Ok(match span.part {
            Part::Table => Segment {
                len: span.len,
                piece: Piece::Generated,
            },
            Part::Zero => Segment {
                len: span.len,
                piece: Piece::Hole,
            },
            Part::Data(guest) => guest_segment(guest, span.len, self.disk_size),
        })
    }

    fn generate(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.layout.generate(offset, buf);
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.layout.stored_bytes()
    }
}

#[cfg(test)]
mod tests {
    use crate::image::Format;
    use crate::view::judge::{SCATTERED_1G, judge_raw_case};

    #[test]
    fn scattered_raw_data_flattens_into_a_qcow2_that_qemu_accepts() {
        judge_raw_case(Format::Qcow2, 1 << 30, &SCATTERED_1G);
    }

    #[test]
    fn empty_disk_gives_a_valid_qcow2() {
        judge_raw_case(Format::Qcow2, 0, &[]);
    }

    #[test]
    fn disk_without_data_gives_a_qcow2_of_tables_only() {
        judge_raw_case(Format::Qcow2, 3 << 30, &[]);
    }

    #[test]
    fn disk_one_byte_past_a_cluster_keeps_its_last_byte() {
        judge_raw_case(Format::Qcow2, 65537, &["write -P 0x5a 65536 1"]);
    }

    #[test]
    fn five_gib_sparse_disk_with_a_few_mib_of_data() {
        judge_raw_case(
            Format::Qcow2,
            5 << 30,
            &[
                "write -P 1 1M 1M",
                "write -P 2 3G 2M",
                "write -P 3 5119M 1M",
            ],
        );
    }
}

#[cfg(test)]
mod wide {
    use crate::image::Format;

    #[test]
    fn four_tib_disk_with_data_every_16_gib() {
        crate::view::judge::judge_wide_sparse_case(Format::Qcow2);
    }
}

// One test per qcow2 source shape of the judge, each named for its source.
#[cfg(test)]
crate::view::judge::source_matrix!(Format::Qcow2);

#[cfg(test)]
mod read_back {
    use crate::image::Format;
    use crate::view::judge::{Source, judge_source_reads_back};

    #[test]
    fn qcow2_view_reads_back_through_the_qcow2_reader() {
        judge_source_reads_back(Format::Qcow2, Source::Chain);
    }
}
