//! Meaning of frames: HELLO and its reply, error payloads, and request validation.
//!
//! Pure functions over an already crc-checked [`Header`] and payload. Everything a
//! peer can get wrong here is an [`InvalidMessage`], answered with INVALID_REQUEST
//! (the stream itself is still sound, so the connection stays open).

use super::error::RemoteError;
use super::frame::{Header, Opcode, MAX_PAYLOAD, RESPONSE_BIT};

/// First bytes of every HELLO payload: identifies the Tessera data-plane protocol.
pub const HELLO_MAGIC: [u8; 4] = *b"TSDP";
/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
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
    /// The flags byte is not zero (version 1 defines no flags).
    #[error("flags {0:#04x} are not defined in this protocol version")]
    Flags(u8),
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
}

impl Request {
    /// Validates a request frame after its crc passed. HELLO is an error here: it is
    /// only valid as the first frame, which the handshake consumes.
    pub fn parse(h: &Header, payload: Vec<u8>) -> Result<Request, InvalidMessage> {
        let op = Opcode::from_u8(h.opcode).ok_or(InvalidMessage::UnknownOpcode(h.opcode))?;
        if h.flags != 0 {
            return Err(InvalidMessage::Flags(h.flags));
        }
        if h.status != 0 {
            return Err(InvalidMessage::Status);
        }
        if op != Opcode::Write && !payload.is_empty() {
            return Err(InvalidMessage::Payload {
                op,
                len: payload.len(),
            });
        }
        let need_range = matches!(op, Opcode::Read | Opcode::Write | Opcode::Trim);
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
                Request::Write {
                    offset: h.offset,
                    data: payload,
                    seq: h.seq,
                }
            }
            Opcode::Flush => Request::Flush,
            Opcode::Trim => Request::Trim {
                offset: h.offset,
                len: h.length,
                seq: h.seq,
            },
        })
    }

    /// Byte range the request touches, for alignment and bounds checks.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Request::Read { offset, len } => Some((*offset, u64::from(*len))),
            Request::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Request::Trim { offset, len, .. } => Some((*offset, *len)),
            Request::Flush => None,
        }
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
    use crate::dataplane::error::ErrorCode;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trip_and_rejections() {
        let h = Hello {
            min_version: 1,
            max_version: 3,
            volume_id: "pvc-1".into(),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h.clone()));
        assert_eq!(h.negotiate(), Some(PROTOCOL_VERSION));
        let future = Hello {
            min_version: 2,
            max_version: 5,
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
