//! The filesystems Tessera formats mount volumes with, and the smallest volume each
//! one fits on.
//!
//! The node plugin runs `mkfs` when a volume is first staged, and `mkfs` refuses (or
//! quietly degrades) below a certain size. NodeStageVolume cannot fix that, so a
//! volume too small for its filesystem would fail every stage forever. CreateVolume
//! therefore sizes mount volumes here, once, before anything exists: this module is
//! the one place that knows each filesystem's minimum
//! ([`MinVolumeSize::min_volume_bytes`]).
//!
//! The minimums were measured with the node's own `mkfs` invocations (`mkfs.xfs -q -K`,
//! `mkfs.ext4 -q -E nodiscard,lazy_itable_init=1,lazy_journal_init=1`) on loop devices
//! with 4 KiB logical blocks, like the node's (xfsprogs 6.1, e2fsprogs 1.47, Debian 12):
//!
//! * **xfs: 300 MiB** (314 572 800 bytes). xfsprogs >= 5.19 refuses anything smaller
//!   ("Filesystem must be larger than 300MB"): 314 572 800 bytes formats and mounts,
//!   314 568 704 (one 4 KiB block less) and 300 000 000 do not. At that size mkfs
//!   picks the 64 MiB internal log xfsprogs now insists on (16 384 4 KiB blocks next to
//!   76 800 data blocks), so the data minimum is also what keeps the log legal.
//! * **ext4: 8 MiB** (8 388 608 bytes). Below 224 KiB mke2fs fails ("Not enough space
//!   to build proposed filesystem"); from there up to 8 MiB - 4 KiB it succeeds but
//!   only prints "Filesystem too small for a journal" and makes an ext4 *without* a
//!   journal (4 KiB blocks, because the device's logical block is 4 KiB, and a journal
//!   needs 2048 of them), which loses metadata consistency on every crash. 8 MiB is
//!   the smallest size that gets a journal; with 512-byte sectors (1 KiB blocks) the
//!   threshold would be 2 MiB, so 8 MiB covers both.
//!
//! Raw block volumes have no filesystem and no minimum beyond one block.

pub use tessera_replica_protocol::volume_params::FsType;

/// Smallest xfs volume, in bytes: 300 MiB, xfsprogs' minimum filesystem size.
pub const XFS_MIN_VOLUME_BYTES: u64 = 300 << 20;
/// Smallest ext4 volume, in bytes: 8 MiB, the smallest size mke2fs gives a journal on
/// a device with 4 KiB logical blocks.
pub const EXT4_MIN_VOLUME_BYTES: u64 = 8 << 20;

// Volumes are whole blocks; a minimum that is not one would be rounded past itself.
const _: () = assert!(XFS_MIN_VOLUME_BYTES.is_multiple_of(crate::capacity::BLOCK_SIZE));
const _: () = assert!(EXT4_MIN_VOLUME_BYTES.is_multiple_of(crate::capacity::BLOCK_SIZE));

/// The minimum of each [`FsType`]; a trait because the type is the protocol's and
/// the minimums are the controller's knowledge alone.
pub trait MinVolumeSize {
    /// The smallest volume, in bytes, on which the node plugin's mkfs makes a
    /// filesystem of this type that mounts and keeps its journal (see the module doc
    /// for how the numbers were measured). Always a whole number of blocks.
    fn min_volume_bytes(self) -> u64;
}

impl MinVolumeSize for FsType {
    fn min_volume_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => EXT4_MIN_VOLUME_BYTES,
            FsType::Xfs => XFS_MIN_VOLUME_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimums_are_the_measured_sizes() {
        // 300 MiB, not 300 MB: mkfs.xfs refuses 300_000_000 bytes.
        assert_eq!(FsType::Xfs.min_volume_bytes(), 314_572_800);
        assert_eq!(FsType::Ext4.min_volume_bytes(), 8_388_608);
    }
}
