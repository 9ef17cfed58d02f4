//! The error reply the server sends for a block-store error: which wire code an
//! engine sees for each way the store can fail.

use tessera_replica_protocol::data::{ErrorCode, RemoteError};

use crate::block_io::BlockIoError;
use crate::sync_state::SyncStateError;

/// Translates a block-store error into the reply the server sends for it.
pub fn remote_error(e: &BlockIoError) -> RemoteError {
    let (code, detail) = match e {
        BlockIoError::OutOfRange { size, .. } => (ErrorCode::OutOfRange, *size),
        BlockIoError::Unaligned { .. } => (ErrorCode::Unaligned, 0),
        BlockIoError::Corrupt { block } => (ErrorCode::CorruptBlock, *block),
        BlockIoError::UnknownVolume(_) | BlockIoError::NotReady(_) => (ErrorCode::UnknownVolume, 0),
        BlockIoError::NoSpace => (ErrorCode::NoSpace, 0),
        BlockIoError::Io(_) => (ErrorCode::IoError, 0),
        BlockIoError::SyncState(s) if is_no_space(s) => (ErrorCode::NoSpace, 0),
        BlockIoError::SyncState(_) => (ErrorCode::IoError, 0),
        BlockIoError::NoReplicaSet(_) => (ErrorCode::InvalidRequest, 0),
    };
    let message = match e {
        BlockIoError::Io(io) => format!("{e}: {io}"),
        BlockIoError::SyncState(s) => format!("{e}: {}", tessera_telemetry::error_chain(s)),
        _ => e.to_string(),
    };
    RemoteError::new(code, detail, message)
}

fn is_no_space(e: &SyncStateError) -> bool {
    matches!(e, SyncStateError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
}
