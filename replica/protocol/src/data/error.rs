//! Error codes carried on the wire and the client's error type.
//!
//! [`ErrorCode`] values are part of the protocol (the `status` header field) and never
//! change meaning. [`ClientError`] separates "the replica answered no" ([`RemoteError`],
//! which an engine acts on: fence, try another replica, fail the I/O) from "the
//! connection is gone" (reconnect or mark the replica down).

use std::fmt;

use super::frame::FrameError;

/// Error status of a response. The numeric values are the wire encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request's epoch is lower than the replica's: the sender has been fenced.
    /// Detail: the replica's current epoch.
    StaleEpoch = 1,
    /// The range reaches past the end of the volume. Detail: the volume size.
    OutOfRange = 2,
    /// Offset or length is not a multiple of the block size.
    Unaligned = 3,
    /// A stored block failed its checksum and was not returned. Detail: block index.
    CorruptBlock = 4,
    /// The replica's backing filesystem is full.
    NoSpace = 5,
    /// The replica's backing storage failed.
    IoError = 6,
    /// A frame failed its crc or length checks; the connection is closed after this.
    BadFrame = 7,
    /// The volume named at HELLO is not stored on this replica (or not servable yet:
    /// still being populated from a snapshot, which the message says).
    UnknownVolume = 8,
    /// No protocol version both sides speak. Detail: the highest version the replica speaks.
    UnsupportedVersion = 9,
    /// A well-formed frame whose contents make no sense (unknown opcode, flags set,
    /// empty range, payload where none belongs, a second HELLO, ...).
    InvalidRequest = 10,
    /// The caller's certificate names an identity that may not use the data plane
    /// (only nodes and the controller may); the connection is closed after this.
    PermissionDenied = 11,
    /// A write or trim on a connection that another connection to the volume has
    /// since claimed (CLAIM): the sender gave this connection up, and what it still
    /// carried must not land after the newer connection's catch-up. Detail: 0.
    Superseded = 12,
}

impl ErrorCode {
    /// Maps a status value back to a code; `None` for values this version doesn't know.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::StaleEpoch,
            2 => ErrorCode::OutOfRange,
            3 => ErrorCode::Unaligned,
            4 => ErrorCode::CorruptBlock,
            5 => ErrorCode::NoSpace,
            6 => ErrorCode::IoError,
            7 => ErrorCode::BadFrame,
            8 => ErrorCode::UnknownVolume,
            9 => ErrorCode::UnsupportedVersion,
            10 => ErrorCode::InvalidRequest,
            11 => ErrorCode::PermissionDenied,
            12 => ErrorCode::Superseded,
            _ => return None,
        })
    }

    /// The protocol name of the code, as used in the wire spec and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::StaleEpoch => "STALE_EPOCH",
            ErrorCode::OutOfRange => "OUT_OF_RANGE",
            ErrorCode::Unaligned => "UNALIGNED",
            ErrorCode::CorruptBlock => "CORRUPT_BLOCK",
            ErrorCode::NoSpace => "NO_SPACE",
            ErrorCode::IoError => "IO_ERROR",
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::UnknownVolume => "UNKNOWN_VOLUME",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::Superseded => "SUPERSEDED",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error reply from a replica: code, a code-specific number and a short message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replica answered {code} (detail {detail}): {message}")]
pub struct RemoteError {
    /// What went wrong; match on this.
    pub code: ErrorCode,
    /// Code-specific value (see [`ErrorCode`]'s variants), 0 if none.
    pub detail: u64,
    /// Human-readable explanation, at most [`super::message::MAX_ERROR_MESSAGE`] bytes.
    pub message: String,
}

impl RemoteError {
    /// Builds an error, cutting the message to the wire limit at a char boundary.
    pub fn new(code: ErrorCode, detail: u64, message: impl Into<String>) -> RemoteError {
        let mut message = message.into();
        super::message::truncate_message(&mut message);
        RemoteError {
            code,
            detail,
            message,
        }
    }
}

/// Why a [`super::ReplicaDataClient`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be established.
    #[error("connecting to the replica failed")]
    Connect(#[source] std::io::Error),
    /// The handshake did not complete within the configured time.
    #[error("handshake with the replica timed out")]
    HandshakeTimeout,
    /// The replica answered with an error; the connection stays usable (except after
    /// a failed HELLO, which fails `connect`).
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The connection is closed or broke; every pending and later call fails with this.
    /// Create a new client to reconnect.
    #[error("connection to the replica is closed: {reason}")]
    Disconnected {
        /// What closed it (EOF, I/O error, corrupt frame from the replica, ...).
        reason: String,
    },
    /// No reply within the configured per-request timeout. The request may still
    /// execute on the replica.
    #[error("request timed out")]
    Timeout,
    /// The replica sent something that violates the protocol (unknown status code,
    /// wrong payload size); the connection is kept, the call fails.
    #[error("protocol violation by the replica: {0}")]
    Protocol(String),
    /// The call's arguments can't be sent (e.g. a payload above the frame limit).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// A frame from the replica failed to decode during the handshake.
    #[error("bad frame from the replica")]
    Frame(#[source] FrameError),
}

impl ClientError {
    /// The replica's error code, if this is an error reply. The usual way for an
    /// engine to decide what to do.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(r) => Some(r.code),
            _ => None,
        }
    }
}
