//! Meaning of frames: HELLO and its reply, error payloads, and request validation.
//!
//! Pure functions over an already crc-checked [`Header`] and payload. Everything a
//! peer can get wrong here is an [`InvalidMessage`], answered with INVALID_REQUEST
//! (the stream itself is still sound, so the connection stays open).

use super::error::RemoteError;
use super::frame::{Header, Opcode, MAX_PAYLOAD, RESPONSE_BIT};
use crate::block::BLOCK_SIZE;
use crate::block::{BlockVersion, VersionedBlocks};
use crate::sync::Membership;

/// First bytes of every HELLO payload: identifies the Tessera data-plane protocol.
pub const HELLO_MAGIC: [u8; 4] = *b"TSDP";
/// Highest protocol version this build speaks. Version 2 adds the sync requests
/// (VERSIONS, DIRTY_REGIONS, GET/SET_MEMBERSHIP, MARK_CLEAN, CLEAN) and marks dirty
/// regions before every write and trim; an engine needs it to reconcile. Version 3
/// adds conditional writes and trims ([`FLAG_IF_NEWER`]), which online resync needs.
/// Version 4 adds REPLICA_SET, through which an attached engine learns that the
/// controller replaced a member of the volume's replica set. Version 5 adds CLAIM,
/// with which an engine's new connection to a replica shuts out what its earlier,
/// abandoned connections still carry.
pub const PROTOCOL_VERSION: u16 = 5;
/// The version that introduced the sync requests.
pub const SYNC_PROTOCOL_VERSION: u16 = 2;
/// The version that introduced [`FLAG_IF_NEWER`].
pub const IF_NEWER_PROTOCOL_VERSION: u16 = 3;
/// The version that introduced REPLICA_SET.
pub const REPLICA_SET_PROTOCOL_VERSION: u16 = 4;
/// The version that introduced CLAIM.
pub const CLAIM_PROTOCOL_VERSION: u16 = 5;
/// VERSIONS flag: return the verified data of intact data blocks too.
pub const FLAG_WITH_DATA: u8 = 1;
/// WRITE and TRIM flag (version 3): apply each block only where the replica's current
/// version of it has a lower seq than the request's (a corrupt or unwritten block
/// counts as seq 0); the OK reply carries the number of blocks applied (u64).
pub const FLAG_IF_NEWER: u8 = 2;
/// Longest range one VERSIONS request may cover: with data, its reply (9 bytes of
/// version and 4096 of data per block) must fit one frame.
pub const MAX_VERSIONS_LEN: u64 = 4 << 20;
/// Bytes per block in a VERSIONS reply before the data: kind (u8) and seq (u64).
pub const VERSION_ENTRY_LEN: usize = 9;
/// Lowest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Longest volume id accepted at HELLO, in bytes.
pub const MAX_VOLUME_ID: usize = 256;
/// Longest error message sent on the wire, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 256;
/// Size of the HELLO reply payload.
pub const HELLO_REPLY_LEN: usize = 16;

/// A well-framed message whose contents are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// The opcode is not one this version knows.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The opcode came with a later protocol version than the connection's.
    #[error("{op:?} needs protocol version {needs}; the connection speaks {version}")]
    NotInVersion {
        /// The operation.
        op: Opcode,
        /// The version that introduced it.
        needs: u16,
        /// The version the connection negotiated.
        version: u16,
    },
    /// The flags byte holds a flag the operation does not define.
    #[error("flags {0:#04x} are not defined in this protocol version")]
    Flags(u8),
    /// A VERSIONS request covers more than [`MAX_VERSIONS_LEN`].
    #[error("versions of {0} bytes exceed the {MAX_VERSIONS_LEN}-byte limit")]
    VersionsTooLarge(u64),
    /// A SET_MEMBERSHIP payload that does not decode, or a VERSIONS reply that does
    /// not match its request.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A request carried a nonzero status.
    #[error("requests must carry status 0")]
    Status,
    /// A payload arrived where the operation takes none, or its size is wrong.
    #[error("{op:?} with a {len}-byte payload is malformed")]
    Payload {
        /// The operation.
        op: Opcode,
        /// Payload bytes received.
        len: usize,
    },
    /// The header's length disagrees with the payload of a WRITE.
    #[error("header length {header} does not match the {payload}-byte payload")]
    LengthMismatch {
        /// Length in the header.
        header: u64,
        /// Payload bytes received.
        payload: usize,
    },
    /// READ, WRITE and TRIM need a nonempty range.
    #[error("empty range")]
    EmptyRange,
    /// A READ asked for more than one frame can carry back.
    #[error("read of {0} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")]
    ReadTooLarge(u64),
    /// HELLO did not start with [`HELLO_MAGIC`].
    #[error("HELLO does not carry the Tessera data-plane magic")]
    BadMagic,
    /// HELLO named a volume id that is empty, too long or not UTF-8.
    #[error("volume id is empty, longer than {MAX_VOLUME_ID} bytes, or not UTF-8")]
    VolumeId,
    /// The first frame of a connection was not HELLO, or a later one was.
    #[error("HELLO must be the first and only handshake frame")]
    HandshakeOrder,
}

/// A client's handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// Volume the connection is for.
    pub volume_id: String,
}

impl Hello {
    /// Encodes the HELLO payload (the epoch travels in the header).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.volume_id.len());
        v.extend_from_slice(&HELLO_MAGIC);
        v.extend_from_slice(&self.min_version.to_le_bytes());
        v.extend_from_slice(&self.max_version.to_le_bytes());
        v.extend_from_slice(self.volume_id.as_bytes());
        v
    }

    /// Decodes and validates a HELLO payload.
    pub fn decode(p: &[u8]) -> Result<Hello, InvalidMessage> {
        if p.len() < 8 || p[..4] != HELLO_MAGIC {
            return Err(InvalidMessage::BadMagic);
        }
        let id = &p[8..];
        if id.is_empty() || id.len() > MAX_VOLUME_ID {
            return Err(InvalidMessage::VolumeId);
        }
        let volume_id = std::str::from_utf8(id)
            .map_err(|_| InvalidMessage::VolumeId)?
            .to_owned();
        Ok(Hello {
            min_version: u16::from_le_bytes([p[4], p[5]]),
            max_version: u16::from_le_bytes([p[6], p[7]]),
            volume_id,
        })
    }

    /// Picks the highest version both sides speak, if any.
    pub fn negotiate(&self) -> Option<u16> {
        let hi = self.max_version.min(PROTOCOL_VERSION);
        let lo = self.min_version.max(MIN_PROTOCOL_VERSION);
        (lo <= hi).then_some(hi)
    }
}

/// The replica's successful answer to HELLO (its current epoch is in the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// Protocol version the connection will use.
    pub version: u16,
    /// Block size of the volume; every offset and length must be a multiple of it.
    pub block_size: u32,
    /// Volume size in bytes at handshake time.
    pub volume_size: u64,
}

impl HelloReply {
    /// Encodes the reply payload.
    pub fn encode(&self) -> [u8; HELLO_REPLY_LEN] {
        let mut b = [0u8; HELLO_REPLY_LEN];
        b[0..2].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.block_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.volume_size.to_le_bytes());
        b
    }

    /// Decodes a reply payload; `None` if its size is wrong.
    pub fn decode(p: &[u8]) -> Option<HelloReply> {
        let b: &[u8; HELLO_REPLY_LEN] = p.try_into().ok()?;
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[8..16]);
        Some(HelloReply {
            version: u16::from_le_bytes([b[0], b[1]]),
            block_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            volume_size: u64::from_le_bytes(size),
        })
    }
}

/// Cuts `s` to at most [`MAX_ERROR_MESSAGE`] bytes without splitting a character.
pub fn truncate_message(s: &mut String) {
    if s.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Encodes an error reply payload: detail (u64) then the UTF-8 message.
pub fn encode_error(e: &RemoteError) -> Vec<u8> {
    let msg = e.message.as_bytes();
    let msg = &msg[..msg.len().min(MAX_ERROR_MESSAGE)];
    let mut v = Vec::with_capacity(8 + msg.len());
    v.extend_from_slice(&e.detail.to_le_bytes());
    v.extend_from_slice(msg);
    v
}

/// Decodes an error reply payload; tolerant (a short payload gives detail 0, invalid
/// UTF-8 is replaced) because the code alone is what callers act on.
pub fn decode_error_payload(p: &[u8]) -> (u64, String) {
    let (detail, msg) = match p.get(..8) {
        Some(d) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(d);
            (u64::from_le_bytes(a), &p[8..])
        }
        None => (0, &[][..]),
    };
    let msg = &msg[..msg.len().min(MAX_ERROR_MESSAGE)];
    (detail, String::from_utf8_lossy(msg).into_owned())
}

/// A validated data-plane request (HELLO is handled by the handshake).
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count, at most [`MAX_PAYLOAD`].
        len: u32,
    },
    /// Write `data` at `offset` tagged with `seq`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes to write; the frame's payload buffer, moved, not copied.
        data: Vec<u8>,
        /// Engine-assigned sequence number.
        seq: u64,
    },
    /// WRITE with [`FLAG_IF_NEWER`]: write each block of `data` only where the held
    /// version's seq is lower than `seq`.
    WriteIfNewer {
        /// Byte offset.
        offset: u64,
        /// Bytes to write; the frame's payload buffer, moved, not copied.
        data: Vec<u8>,
        /// Sequence number of the copied version.
        seq: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard `len` bytes at `offset` tagged with `seq`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// Engine-assigned sequence number.
        seq: u64,
    },
    /// TRIM with [`FLAG_IF_NEWER`]: trim each block only where the held version's
    /// seq is lower than `seq`.
    TrimIfNewer {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// Sequence number of the copied trim.
        seq: u64,
    },
    /// The versions of the blocks of a range, with their data if `with_data`.
    Versions {
        /// Byte offset.
        offset: u64,
        /// Byte count, at most [`MAX_VERSIONS_LEN`].
        len: u64,
        /// Whether the reply carries the data of intact data blocks.
        with_data: bool,
    },
    /// The dirty-region map.
    DirtyRegions,
    /// The in-sync record.
    GetMembership,
    /// Store this in-sync record if it is newer than the stored one.
    SetMembership(Membership),
    /// Start cleaning the dirty regions.
    MarkClean,
    /// Clear the dirty regions `token` covers.
    Clean {
        /// From MARK_CLEAN (travels in the header's `seq`).
        token: u64,
    },
    /// The volume record's generation and replica set (v4).
    ReplicaSet,
    /// Make this connection the volume's writer (v5).
    Claim,
}

impl Request {
    /// Validates a request frame after its crc passed, as [`PROTOCOL_VERSION`]
    /// defines it. HELLO is an error here: it is only valid as the first frame, which
    /// the handshake consumes.
    pub fn parse(h: &Header, payload: Vec<u8>) -> Result<Request, InvalidMessage> {
        Self::parse_at(PROTOCOL_VERSION, h, payload)
    }

    /// [`Self::parse`] on a connection that negotiated `version`: flags and opcodes
    /// the version does not define are invalid ([`FLAG_IF_NEWER`] needs version 3,
    /// REPLICA_SET version 4, CLAIM version 5).
    pub fn parse_at(version: u16, h: &Header, payload: Vec<u8>) -> Result<Request, InvalidMessage> {
        let op = Opcode::from_u8(h.opcode).ok_or(InvalidMessage::UnknownOpcode(h.opcode))?;
        let needs = match op {
            Opcode::ReplicaSet => REPLICA_SET_PROTOCOL_VERSION,
            Opcode::Claim => CLAIM_PROTOCOL_VERSION,
            _ => MIN_PROTOCOL_VERSION,
        };
        if version < needs {
            return Err(InvalidMessage::NotInVersion { op, needs, version });
        }
        let allowed_flags = match op {
            Opcode::Versions => FLAG_WITH_DATA,
            Opcode::Write | Opcode::Trim if version >= IF_NEWER_PROTOCOL_VERSION => FLAG_IF_NEWER,
            _ => 0,
        };
        let if_newer = h.flags & FLAG_IF_NEWER != 0;
        if h.flags & !allowed_flags != 0 {
            return Err(InvalidMessage::Flags(h.flags));
        }
        if h.status != 0 {
            return Err(InvalidMessage::Status);
        }
        if !matches!(op, Opcode::Write | Opcode::SetMembership) && !payload.is_empty() {
            return Err(InvalidMessage::Payload {
                op,
                len: payload.len(),
            });
        }
        let need_range = matches!(
            op,
            Opcode::Read | Opcode::Write | Opcode::Trim | Opcode::Versions
        );
        if need_range && h.length == 0 {
            return Err(InvalidMessage::EmptyRange);
        }
        Ok(match op {
            Opcode::Hello => return Err(InvalidMessage::HandshakeOrder),
            Opcode::Read => Request::Read {
                offset: h.offset,
                len: u32::try_from(h.length)
                    .ok()
                    .filter(|&l| l as usize <= MAX_PAYLOAD)
                    .ok_or(InvalidMessage::ReadTooLarge(h.length))?,
            },
            Opcode::Write => {
                if h.length != payload.len() as u64 {
                    return Err(InvalidMessage::LengthMismatch {
                        header: h.length,
                        payload: payload.len(),
                    });
                }
                if if_newer {
                    Request::WriteIfNewer {
                        offset: h.offset,
                        data: payload,
                        seq: h.seq,
                    }
                } else {
                    Request::Write {
                        offset: h.offset,
                        data: payload,
                        seq: h.seq,
                    }
                }
            }
            Opcode::Flush => Request::Flush,
            Opcode::Trim if if_newer => Request::TrimIfNewer {
                offset: h.offset,
                len: h.length,
                seq: h.seq,
            },
            Opcode::Trim => Request::Trim {
                offset: h.offset,
                len: h.length,
                seq: h.seq,
            },
            Opcode::Versions => {
                if h.length > MAX_VERSIONS_LEN {
                    return Err(InvalidMessage::VersionsTooLarge(h.length));
                }
                Request::Versions {
                    offset: h.offset,
                    len: h.length,
                    with_data: h.flags & FLAG_WITH_DATA != 0,
                }
            }
            Opcode::DirtyRegions => Request::DirtyRegions,
            Opcode::GetMembership => Request::GetMembership,
            Opcode::SetMembership => {
                Request::SetMembership(Membership::decode(&payload).map_err(|e| {
                    InvalidMessage::Malformed {
                        what: "in-sync record",
                        why: e.to_string(),
                    }
                })?)
            }
            Opcode::MarkClean => Request::MarkClean,
            Opcode::Clean => Request::Clean { token: h.seq },
            Opcode::ReplicaSet => Request::ReplicaSet,
            Opcode::Claim => Request::Claim,
        })
    }

    /// Whether the request changes the replica (blocks or sync state), so it must be
    /// ordered against epoch raises.
    pub fn mutates(&self) -> bool {
        self.writes_blocks() || matches!(self, Request::SetMembership(_) | Request::Clean { .. })
    }

    /// The sequence number a write or trim carries (its epoch in the high bits).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Request::Write { seq, .. }
            | Request::WriteIfNewer { seq, .. }
            | Request::Trim { seq, .. }
            | Request::TrimIfNewer { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// Byte range the request touches, for alignment and bounds checks.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Request::Read { offset, len } => Some((*offset, u64::from(*len))),
            Request::Write { offset, data, .. } | Request::WriteIfNewer { offset, data, .. } => {
                Some((*offset, data.len() as u64))
            }
            Request::Trim { offset, len, .. } | Request::TrimIfNewer { offset, len, .. } => {
                Some((*offset, *len))
            }
            Request::Versions { offset, len, .. } => Some((*offset, *len)),
            Request::Flush
            | Request::DirtyRegions
            | Request::GetMembership
            | Request::SetMembership(_)
            | Request::MarkClean
            | Request::Clean { .. }
            | Request::ReplicaSet
            | Request::Claim => None,
        }
    }

    /// Whether the request changes blocks: what a connection that was superseded by
    /// a CLAIM may no longer send.
    pub fn writes_blocks(&self) -> bool {
        matches!(
            self,
            Request::Write { .. }
                | Request::WriteIfNewer { .. }
                | Request::Trim { .. }
                | Request::TrimIfNewer { .. }
        )
    }
}

/// Encodes a VERSIONS reply: per block its kind (0 unwritten, 1 data, 2 trimmed,
/// 3 corrupt) and seq, then the data of the intact data blocks in block order (none
/// for a versions-only range).
pub fn encode_versions(blocks: &VersionedBlocks) -> Vec<u8> {
    let mut v = Vec::with_capacity(blocks.len() * VERSION_ENTRY_LEN + blocks.data().len());
    for version in blocks.versions() {
        let kind: u8 = match version {
            BlockVersion::Unwritten => 0,
            BlockVersion::Data { .. } => 1,
            BlockVersion::Trimmed { .. } => 2,
            BlockVersion::Corrupt { .. } => 3,
        };
        v.push(kind);
        v.extend_from_slice(&version.seq().to_le_bytes());
    }
    v.extend_from_slice(blocks.data());
    v
}

/// Decodes the reply to a VERSIONS request for `len` bytes at `offset`, checking
/// that it has exactly one entry per block and, `with_data`, exactly the bytes of
/// its intact data blocks.
pub fn decode_versions(
    offset: u64,
    len: u64,
    with_data: bool,
    payload: &[u8],
) -> Result<VersionedBlocks, InvalidMessage> {
    let bad = |why: String| InvalidMessage::Malformed {
        what: "versions reply",
        why,
    };
    let n = usize::try_from(len / BLOCK_SIZE).map_err(|_| bad("range too long".into()))?;
    let head = n * VERSION_ENTRY_LEN;
    if payload.len() < head {
        return Err(bad(format!("{} bytes for {n} blocks", payload.len())));
    }
    let mut versions = Vec::with_capacity(n);
    for e in payload[..head].chunks_exact(VERSION_ENTRY_LEN) {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&e[1..]);
        let seq = u64::from_le_bytes(seq);
        versions.push(match e[0] {
            0 if seq == 0 => BlockVersion::Unwritten,
            1 => BlockVersion::Data { seq },
            2 => BlockVersion::Trimmed { seq },
            3 => BlockVersion::Corrupt { seq },
            k => return Err(bad(format!("block kind {k} with seq {seq}"))),
        });
    }
    let first_block = offset / BLOCK_SIZE;
    if with_data {
        VersionedBlocks::new(first_block, versions, payload[head..].to_vec())
            .map_err(|e| bad(e.to_string()))
    } else if payload.len() != head {
        Err(bad("data in a versions-only reply".into()))
    } else {
        Ok(VersionedBlocks::versions_only(first_block, versions))
    }
}

/// Header of the response to `req`: same id, epoch, offset and seq, opcode with
/// [`RESPONSE_BIT`], the given status and payload length.
pub fn response_header(req: &Header, status: u16, payload_len: usize) -> Header {
    Header {
        opcode: req.opcode | RESPONSE_BIT,
        flags: 0,
        status,
        request_id: req.request_id,
        epoch: req.epoch,
        offset: req.offset,
        length: payload_len as u64,
        seq: req.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::error::ErrorCode;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trip_and_rejections() {
        let h = Hello {
            min_version: 1,
            max_version: 3,
            volume_id: "pvc-1".into(),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h.clone()));
        // A version-3 engine gets version 3 from a version-4 replica.
        assert_eq!(h.negotiate(), Some(3));
        let newest = Hello {
            max_version: PROTOCOL_VERSION,
            ..h.clone()
        };
        assert_eq!(newest.negotiate(), Some(PROTOCOL_VERSION));
        let future = Hello {
            min_version: PROTOCOL_VERSION + 1,
            max_version: PROTOCOL_VERSION + 3,
            ..h.clone()
        };
        assert_eq!(future.negotiate(), None);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert_eq!(Hello::decode(&bad), Err(InvalidMessage::BadMagic));
        assert_eq!(
            Hello::decode(&h.encode()[..8]),
            Err(InvalidMessage::VolumeId)
        );
        let mut not_utf8 = h.encode();
        not_utf8.push(0xff);
        assert_eq!(Hello::decode(&not_utf8), Err(InvalidMessage::VolumeId));
    }

    #[test]
    fn error_message_is_truncated_on_a_char_boundary() {
        let e = RemoteError::new(ErrorCode::IoError, 7, "é".repeat(200));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE);
        assert!(e.message.len() >= MAX_ERROR_MESSAGE - 1);
        let (d, m) = decode_error_payload(&encode_error(&e));
        assert_eq!((d, m), (7, e.message));
    }

    #[test]
    fn request_validation() {
        let h = Header {
            opcode: Opcode::Read as u8,
            length: 4096,
            ..Header::default()
        };
        assert_eq!(
            Request::parse(&h, vec![]),
            Ok(Request::Read {
                offset: 0,
                len: 4096
            })
        );
        let too_big = Header {
            length: MAX_PAYLOAD as u64 + 4096,
            ..h
        };
        assert!(matches!(
            Request::parse(&too_big, vec![]),
            Err(InvalidMessage::ReadTooLarge(_))
        ));
        let w = Header {
            opcode: Opcode::Write as u8,
            length: 4096,
            ..Header::default()
        };
        assert!(matches!(
            Request::parse(&w, vec![0; 512]),
            Err(InvalidMessage::LengthMismatch { .. })
        ));
        let flagged = Header { flags: 1, ..h };
        assert_eq!(
            Request::parse(&flagged, vec![]),
            Err(InvalidMessage::Flags(1))
        );
        let hello = Header {
            opcode: Opcode::Hello as u8,
            ..h
        };
        assert_eq!(
            Request::parse(&hello, vec![]),
            Err(InvalidMessage::HandshakeOrder)
        );
        let flush_with_payload = Header {
            opcode: Opcode::Flush as u8,
            ..Header::default()
        };
        assert!(matches!(
            Request::parse(&flush_with_payload, vec![1]),
            Err(InvalidMessage::Payload { .. })
        ));
    }

    #[test]
    fn versions_replies_round_trip_and_mismatches_are_refused() {
        let versions = vec![
            BlockVersion::Unwritten,
            BlockVersion::Data { seq: 7 << 40 | 3 },
            BlockVersion::Trimmed { seq: 9 },
            BlockVersion::Corrupt { seq: 4 },
        ];
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let blocks = VersionedBlocks::new(10, versions.clone(), data).unwrap();
        let wire = encode_versions(&blocks);
        assert_eq!(
            decode_versions(10 * BLOCK_SIZE, 4 * BLOCK_SIZE, true, &wire),
            Ok(blocks)
        );
        // One block more than the reply holds, data missing, data where none belongs.
        assert!(decode_versions(10 * BLOCK_SIZE, 5 * BLOCK_SIZE, true, &wire).is_err());
        assert!(decode_versions(0, 4 * BLOCK_SIZE, true, &wire[..wire.len() - 1]).is_err());
        assert!(decode_versions(0, 4 * BLOCK_SIZE, false, &wire).is_err());
        let only = VersionedBlocks::versions_only(0, versions);
        let wire = encode_versions(&only);
        assert_eq!(decode_versions(0, 4 * BLOCK_SIZE, false, &wire), Ok(only));
        // Unwritten with a seq is not a version any store writes.
        let mut bad = wire.clone();
        bad[1] = 1;
        assert!(decode_versions(0, 4 * BLOCK_SIZE, false, &bad).is_err());
    }

    #[test]
    fn sync_requests_parse_with_their_flags_and_payloads_only() {
        let v = Header {
            opcode: Opcode::Versions as u8,
            flags: FLAG_WITH_DATA,
            offset: 8192,
            length: 4096,
            ..Header::default()
        };
        assert_eq!(
            Request::parse(&v, vec![]),
            Ok(Request::Versions {
                offset: 8192,
                len: 4096,
                with_data: true
            })
        );
        let huge = Header {
            length: MAX_VERSIONS_LEN + 4096,
            ..v
        };
        assert_eq!(
            Request::parse(&huge, vec![]),
            Err(InvalidMessage::VersionsTooLarge(MAX_VERSIONS_LEN + 4096))
        );
        let read_with_flag = Header {
            opcode: Opcode::Read as u8,
            ..v
        };
        assert_eq!(
            Request::parse(&read_with_flag, vec![]),
            Err(InvalidMessage::Flags(FLAG_WITH_DATA))
        );
        let m = Membership {
            epoch: 3,
            version: 1,
            members: vec!["a".into()],
        };
        let set = Header {
            opcode: Opcode::SetMembership as u8,
            ..Header::default()
        };
        assert_eq!(
            Request::parse(&set, m.encode()),
            Ok(Request::SetMembership(m))
        );
        assert!(matches!(
            Request::parse(&set, vec![1, 2, 3]),
            Err(InvalidMessage::Malformed { .. })
        ));
        let clean = Header {
            opcode: Opcode::Clean as u8,
            seq: 42,
            ..Header::default()
        };
        assert_eq!(
            Request::parse(&clean, vec![]),
            Ok(Request::Clean { token: 42 })
        );
        assert!(matches!(
            Request::parse(&clean, vec![0]),
            Err(InvalidMessage::Payload { .. })
        ));
    }

    #[test]
    fn if_newer_is_a_version_3_flag_of_write_and_trim_only() {
        let w = Header {
            opcode: Opcode::Write as u8,
            flags: FLAG_IF_NEWER,
            offset: 4096,
            length: 4096,
            seq: 77,
            ..Header::default()
        };
        assert_eq!(
            Request::parse(&w, vec![5; 4096]),
            Ok(Request::WriteIfNewer {
                offset: 4096,
                data: vec![5; 4096],
                seq: 77
            })
        );
        let plain = Header { flags: 0, ..w };
        assert_eq!(
            Request::parse(&plain, vec![5; 4096]),
            Ok(Request::Write {
                offset: 4096,
                data: vec![5; 4096],
                seq: 77
            })
        );
        let t = Header {
            opcode: Opcode::Trim as u8,
            length: 3 * 4096,
            ..w
        };
        let trim_if_newer = Request::parse(&t, vec![]);
        assert_eq!(
            trim_if_newer,
            Ok(Request::TrimIfNewer {
                offset: 4096,
                len: 3 * 4096,
                seq: 77
            })
        );
        let trim_if_newer = trim_if_newer.unwrap();
        assert!(trim_if_newer.mutates());
        assert_eq!(trim_if_newer.range(), Some((4096, 3 * 4096)));
        // The flag is still a write's: a payload on a conditional trim, an empty
        // conditional write, a length mismatch are refused as without it.
        assert!(matches!(
            Request::parse(&t, vec![0]),
            Err(InvalidMessage::Payload { .. })
        ));
        assert_eq!(
            Request::parse(&Header { length: 0, ..w }, vec![]),
            Err(InvalidMessage::EmptyRange)
        );
        assert!(matches!(
            Request::parse(&w, vec![0; 512]),
            Err(InvalidMessage::LengthMismatch { .. })
        ));
        // On a connection of version 1 or 2 the flag is not defined.
        for version in [1, 2] {
            assert_eq!(
                Request::parse_at(version, &w, vec![5; 4096]),
                Err(InvalidMessage::Flags(FLAG_IF_NEWER))
            );
            assert_eq!(
                Request::parse_at(version, &t, vec![]),
                Err(InvalidMessage::Flags(FLAG_IF_NEWER))
            );
            assert!(matches!(
                Request::parse_at(version, &plain, vec![5; 4096]),
                Ok(Request::Write { .. })
            ));
        }
        assert!(matches!(
            Request::parse_at(IF_NEWER_PROTOCOL_VERSION, &w, vec![5; 4096]),
            Ok(Request::WriteIfNewer { .. })
        ));
        // On every other opcode it is invalid, and so are undefined bits beside it.
        for op in [
            Opcode::Read,
            Opcode::Flush,
            Opcode::Versions,
            Opcode::DirtyRegions,
            Opcode::GetMembership,
            Opcode::SetMembership,
            Opcode::MarkClean,
            Opcode::Clean,
        ] {
            let h = Header {
                opcode: op as u8,
                ..t
            };
            assert_eq!(
                Request::parse(&h, vec![]),
                Err(InvalidMessage::Flags(FLAG_IF_NEWER)),
                "{op:?}"
            );
        }
        for flags in [FLAG_IF_NEWER | FLAG_WITH_DATA, FLAG_IF_NEWER | 4, 0x80] {
            assert_eq!(
                Request::parse(&Header { flags, ..w }, vec![5; 4096]),
                Err(InvalidMessage::Flags(flags))
            );
        }
    }

    #[test]
    fn claim_is_a_version_5_request_without_payload_or_flags() {
        let h = Header {
            opcode: Opcode::Claim as u8,
            ..Header::default()
        };
        assert_eq!(Request::parse(&h, vec![]), Ok(Request::Claim));
        let parsed = Request::parse(&h, vec![]).unwrap();
        assert!(
            !parsed.mutates(),
            "takes the fence itself, not as a mutation"
        );
        assert!(!parsed.writes_blocks());
        assert_eq!(parsed.range(), None);
        assert_eq!(parsed.seq(), None);
        for version in 1..CLAIM_PROTOCOL_VERSION {
            assert_eq!(
                Request::parse_at(version, &h, vec![]),
                Err(InvalidMessage::NotInVersion {
                    op: Opcode::Claim,
                    needs: CLAIM_PROTOCOL_VERSION,
                    version
                })
            );
        }
        assert_eq!(
            Request::parse(&h, vec![1]),
            Err(InvalidMessage::Payload {
                op: Opcode::Claim,
                len: 1
            })
        );
        assert_eq!(
            Request::parse(&Header { flags: 1, ..h }, vec![]),
            Err(InvalidMessage::Flags(1))
        );
    }

    #[test]
    fn only_writes_and_trims_write_blocks() {
        let req = |opcode: Opcode, flags: u8, len: usize| {
            let h = Header {
                opcode: opcode as u8,
                flags,
                offset: 0,
                length: 4096,
                ..Header::default()
            };
            Request::parse(&h, vec![0; len]).unwrap()
        };
        assert!(req(Opcode::Write, 0, 4096).writes_blocks());
        assert!(req(Opcode::Write, FLAG_IF_NEWER, 4096).writes_blocks());
        assert!(req(Opcode::Trim, 0, 0).writes_blocks());
        assert!(req(Opcode::Trim, FLAG_IF_NEWER, 0).writes_blocks());
        assert!(!req(Opcode::Read, 0, 0).writes_blocks());
        assert!(!req(Opcode::Flush, 0, 0).writes_blocks());
        assert!(!req(Opcode::Versions, 0, 0).writes_blocks());
        assert!(!req(Opcode::MarkClean, 0, 0).writes_blocks());
    }

    #[test]
    fn replica_set_is_a_version_4_request_without_payload_or_flags() {
        let h = Header {
            opcode: Opcode::ReplicaSet as u8,
            ..Header::default()
        };
        assert_eq!(Request::parse(&h, vec![]), Ok(Request::ReplicaSet));
        assert_eq!(
            Request::parse_at(REPLICA_SET_PROTOCOL_VERSION, &h, vec![]),
            Ok(Request::ReplicaSet)
        );
        let parsed = Request::parse(&h, vec![]).unwrap();
        assert!(!parsed.mutates());
        assert_eq!(parsed.range(), None);
        // An engine that negotiated 3 or less never sends it; a peer that does is
        // told which version it needs.
        for version in [1, 2, 3] {
            assert_eq!(
                Request::parse_at(version, &h, vec![]),
                Err(InvalidMessage::NotInVersion {
                    op: Opcode::ReplicaSet,
                    needs: REPLICA_SET_PROTOCOL_VERSION,
                    version
                })
            );
        }
        assert!(matches!(
            Request::parse(&h, vec![0]),
            Err(InvalidMessage::Payload { .. })
        ));
        for flags in [FLAG_WITH_DATA, FLAG_IF_NEWER] {
            assert_eq!(
                Request::parse(&Header { flags, ..h }, vec![]),
                Err(InvalidMessage::Flags(flags))
            );
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(op in any::<u8>(), flags in any::<u8>(), status in any::<u16>(), length in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = Header { opcode: op, flags, status, length, ..Header::default() };
            let _ = Request::parse(&h, payload.clone());
            let _ = Hello::decode(&payload);
            let _ = HelloReply::decode(&payload);
            let _ = decode_error_payload(&payload);
        }
    }
}
