//! Fuzzes a `ReadSnapshotBlocks` chunk as a copying replica decodes and checks it
//! (restore, clone, rebuild): a holder, or anything posing as one, can send any
//! bytes; the reader must refuse what is off its grid, inconsistent or corrupt with an
//! error and never panic or allocate beyond what the chunk claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_replica::snapshot_read::{chunk, ChunkGrid};
use tessera_replica_protocol::control_proto::SnapshotBlocks;

fuzz_target!(|data: &[u8]| {
    // 8 bytes of request offset (in blocks), 4 of request length (in blocks), one of
    // kind, 8 of the previous chunk's end; the rest is the message.
    let Some((head, message)) = data.split_at_checked(21) else {
        return;
    };
    let word = |at: usize, n: usize| {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&head[at..at + n]);
        u64::from_le_bytes(b)
    };
    let block = tessera_replica::block_io::BLOCK_SIZE;
    let (Some(offset), Some(length)) = (
        (word(0, 8) % (1 << 40)).checked_mul(block),
        word(8, 4).checked_mul(block),
    ) else {
        return;
    };
    let kind = if head[12] & 1 == 0 {
        chunk::ChunkKind::Data
    } else {
        chunk::ChunkKind::VersionsOnly
    };
    let previous_end = word(13, 8);
    if let Ok(msg) = SnapshotBlocks::decode(message) {
        let _ = chunk::decode(
            msg,
            ChunkGrid::of_request(offset, length),
            previous_end,
            kind,
        );
    }
});
