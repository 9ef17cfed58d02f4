//! Frame layout: length prefix, fixed header, payload, crc32c trailer.
//!
//! Pure functions only, no I/O, so every byte-level rule is testable and fuzzable
//! without sockets. The async stream helpers in `stream.rs` and the one-shot
//! [`decode`] here share [`parse_length`], [`Header::decode`] and [`check_crc`], so the
//! server, the client and the fuzz target all enforce the same limits.

/// Bytes of the little-endian length prefix.
pub const PREFIX_LEN: usize = 4;
/// Bytes of the fixed header that follows the prefix.
pub const HEADER_LEN: usize = 44;
/// Bytes of the crc32c trailer.
pub const CRC_LEN: usize = 4;
/// Largest payload a frame may carry (8 MiB). Bounds every allocation a peer can cause.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024;
/// Smallest legal value of the length prefix: a header and a crc, no payload.
pub const MIN_FRAME_LEN: u32 = (HEADER_LEN + CRC_LEN) as u32;
/// Largest legal value of the length prefix.
pub const MAX_FRAME_LEN: u32 = (HEADER_LEN + MAX_PAYLOAD + CRC_LEN) as u32;
/// Set in the opcode of every response, so a response can never be mistaken for a
/// request (a reflected or crossed stream fails validation instead of executing).
pub const RESPONSE_BIT: u8 = 0x80;

/// Operation codes of the data-plane protocol (the low 7 bits of the header's opcode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Handshake: protocol version, volume id and epoch.
    Hello = 1,
    /// Read `length` bytes at `offset`.
    Read = 2,
    /// Write the payload at `offset`, tagged with `seq`.
    Write = 3,
    /// Make all completed writes durable.
    Flush = 4,
    /// Discard `length` bytes at `offset`, tagged with `seq`.
    Trim = 5,
    /// Versions (and optionally verified data) of the blocks of a range (v2).
    Versions = 6,
    /// The replica's dirty-region map (v2).
    DirtyRegions = 7,
    /// The replica's in-sync record (v2).
    GetMembership = 8,
    /// Store a newer in-sync record (v2).
    SetMembership = 9,
    /// Start a cleaning of the dirty regions: returns a token (v2).
    MarkClean = 10,
    /// Clear the dirty regions the token covers (v2).
    Clean = 11,
    /// The volume record's generation and replica set (v4).
    ReplicaSet = 12,
    /// Make this connection the volume's writer: writes of connections opened
    /// before it are refused from now on (v5).
    Claim = 13,
}

impl Opcode {
    /// Maps the opcode byte (without [`RESPONSE_BIT`]) to an operation; `None` for
    /// codes this version does not know, which the server answers with an error
    /// instead of dropping the connection.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Hello,
            2 => Opcode::Read,
            3 => Opcode::Write,
            4 => Opcode::Flush,
            5 => Opcode::Trim,
            6 => Opcode::Versions,
            7 => Opcode::DirtyRegions,
            8 => Opcode::GetMembership,
            9 => Opcode::SetMembership,
            10 => Opcode::MarkClean,
            11 => Opcode::Clean,
            12 => Opcode::ReplicaSet,
            13 => Opcode::Claim,
            _ => return None,
        })
    }
}

/// The fixed 44-byte header, identical for requests and responses.
///
/// Fields are kept raw (opcode as a byte, status as a number) so a frame with an
/// unknown opcode still decodes and can be answered by request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Operation, with [`RESPONSE_BIT`] set in responses.
    pub opcode: u8,
    /// Per-operation flags: VERSIONS bit 0 = with data (v2), WRITE and TRIM bit 1 =
    /// if newer (v3); 0 everywhere else.
    pub flags: u8,
    /// 0 in requests and successful responses, otherwise an error code.
    pub status: u16,
    /// Chosen by the client, echoed in the response; matches answers to requests.
    pub request_id: u64,
    /// The sender's fencing epoch (requests) or an echo of it (responses).
    pub epoch: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Byte length of the range (READ, TRIM) or of the payload (WRITE, READ reply).
    pub length: u64,
    /// Engine-assigned write sequence number (WRITE, TRIM).
    pub seq: u64,
}

impl Header {
    /// Decodes the header bytes. Infallible: every bit pattern is a header; what the
    /// values mean is checked later, once the crc has vouched for them.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Header {
            opcode: b[0],
            flags: b[1],
            status: u16::from_le_bytes([b[2], b[3]]),
            request_id: u64_at(4),
            epoch: u64_at(12),
            offset: u64_at(20),
            length: u64_at(28),
            seq: u64_at(36),
        }
    }

    /// Encodes the length prefix and header for a frame carrying `payload_len` bytes.
    /// Fails (instead of writing a frame the peer must reject) if the payload is too large.
    pub fn encode_prefix(
        &self,
        payload_len: usize,
    ) -> Result<[u8; PREFIX_LEN + HEADER_LEN], FrameError> {
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge { len: payload_len });
        }
        // Cannot truncate: payload_len <= MAX_PAYLOAD, so the sum fits in u32.
        let frame_len = (HEADER_LEN + payload_len + CRC_LEN) as u32;
        let mut b = [0u8; PREFIX_LEN + HEADER_LEN];
        b[0..4].copy_from_slice(&frame_len.to_le_bytes());
        b[4] = self.opcode;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..48].copy_from_slice(&self.seq.to_le_bytes());
        Ok(b)
    }
}

/// Why bytes could not be taken as a frame. Every variant means the stream can no
/// longer be trusted: the receiver answers (if it can) and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is smaller than a header plus crc.
    #[error("frame length {len} is shorter than the minimum {MIN_FRAME_LEN}")]
    TooShort {
        /// The length prefix received.
        len: u32,
    },
    /// The length prefix exceeds [`MAX_FRAME_LEN`]; nothing is allocated for it.
    #[error("frame length {len} exceeds the maximum {MAX_FRAME_LEN}")]
    TooLarge {
        /// The length prefix received.
        len: u32,
    },
    /// The crc32c trailer does not match the frame's bytes.
    #[error("frame crc32c mismatch (computed {computed:#010x}, trailer {trailer:#010x})")]
    BadCrc {
        /// The header as received; not trustworthy, but its request id is the best
        /// guess at which request to answer with BAD_FRAME.
        header: Header,
        /// crc32c computed over the received bytes.
        computed: u32,
        /// crc32c carried in the trailer.
        trailer: u32,
    },
    /// Refused to encode a payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {len} bytes exceeds the maximum {MAX_PAYLOAD}")]
    PayloadTooLarge {
        /// Payload length asked for.
        len: usize,
    },
}

/// Validates a length prefix and returns the payload length it implies.
pub fn parse_length(prefix: [u8; PREFIX_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len < MIN_FRAME_LEN {
        return Err(FrameError::TooShort { len });
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len as usize - HEADER_LEN - CRC_LEN)
}

/// crc32c over the length prefix, the header and the payload (everything before the
/// trailer). Covering the prefix too means a flipped length bit is caught as well.
pub fn frame_crc(prefix_and_header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(prefix_and_header), payload)
}

/// The same crc32c as [`frame_crc`], from the payload's own crc32c: a sender that
/// writes one payload to several replicas checksums it once and combines per frame
/// (in constant time: [`super::crc_combine`]).
pub fn frame_crc_with_payload_crc(
    prefix_and_header: &[u8],
    payload_crc: u32,
    payload_len: usize,
) -> u32 {
    super::crc_combine::crc32c_combine(crc32c::crc32c(prefix_and_header), payload_crc, payload_len)
}

/// Checks the trailer of a received frame.
pub fn check_crc(
    prefix_and_header: &[u8; PREFIX_LEN + HEADER_LEN],
    payload: &[u8],
    trailer: [u8; CRC_LEN],
) -> Result<(), FrameError> {
    let computed = frame_crc(prefix_and_header, payload);
    let trailer = u32::from_le_bytes(trailer);
    if computed == trailer {
        return Ok(());
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&prefix_and_header[PREFIX_LEN..]);
    Err(FrameError::BadCrc {
        header: Header::decode(&h),
        computed,
        trailer,
    })
}

/// A whole decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload (empty for most requests).
    pub payload: Vec<u8>,
}

/// Encodes a whole frame into one buffer. Convenient for tests and handshakes; the
/// hot paths write prefix, payload and trailer separately to avoid copying payloads.
pub fn encode(header: &Header, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let ph = header.encode_prefix(payload.len())?;
    let mut out = Vec::with_capacity(ph.len() + payload.len() + CRC_LEN);
    out.extend_from_slice(&ph);
    out.extend_from_slice(payload);
    out.extend_from_slice(&frame_crc(&ph, payload).to_le_bytes());
    Ok(out)
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` if `buf` holds only part of a frame (read more and retry),
/// `Ok(Some((frame, consumed)))` for a whole valid frame, or the reason the bytes are
/// not a frame. Never allocates more than the frame's actual, bounded payload.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(None);
    };
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(prefix);
    let payload_len = parse_length(p)?;
    let total = PREFIX_LEN + HEADER_LEN + payload_len + CRC_LEN;
    let Some(whole) = buf.get(..total) else {
        return Ok(None);
    };
    let mut ph = [0u8; PREFIX_LEN + HEADER_LEN];
    ph.copy_from_slice(&whole[..PREFIX_LEN + HEADER_LEN]);
    let payload = &whole[PREFIX_LEN + HEADER_LEN..total - CRC_LEN];
    let mut trailer = [0u8; CRC_LEN];
    trailer.copy_from_slice(&whole[total - CRC_LEN..]);
    check_crc(&ph, payload, trailer)?;
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&ph[PREFIX_LEN..]);
    Ok(Some((
        Frame {
            header: Header::decode(&h),
            payload: payload.to_vec(),
        },
        total,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_crc_equals_the_crc_over_the_whole_frame() {
        let ph = [3u8; PREFIX_LEN + HEADER_LEN];
        for len in [0usize, 1, 4096, 1 << 20] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            assert_eq!(
                frame_crc_with_payload_crc(&ph, crc32c::crc32c(&payload), len),
                frame_crc(&ph, &payload),
                "payload of {len} bytes"
            );
        }
    }
    use proptest::prelude::*;

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(opcode, flags, status, request_id, epoch, offset, length, seq)| Header {
                    opcode,
                    flags,
                    status,
                    request_id,
                    epoch,
                    offset,
                    length,
                    seq,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let bytes = encode(&h, &payload).unwrap();
            prop_assert_eq!(bytes.len(), PREFIX_LEN + HEADER_LEN + payload.len() + CRC_LEN);
            let (f, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(f.header, h);
            prop_assert_eq!(f.payload, payload);
        }

        #[test]
        fn every_strict_prefix_is_incomplete(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..300), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&h, &payload).unwrap();
            let cut = cut.index(bytes.len());
            prop_assert_eq!(decode(&bytes[..cut]), Ok(None));
        }

        #[test]
        fn trailing_bytes_are_left_for_the_next_frame(h in arb_header(), extra in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = encode(&h, b"abc").unwrap();
            let n = bytes.len();
            bytes.extend_from_slice(&extra);
            let (f, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, n);
            prop_assert_eq!(f.header, h);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            match decode(&bytes) {
                Ok(Some((f, used))) => {
                    prop_assert!(used <= bytes.len());
                    prop_assert_eq!(f.payload.len() + PREFIX_LEN + HEADER_LEN + CRC_LEN, used);
                }
                Ok(None) => {}
                Err(FrameError::TooShort { len }) => prop_assert!(len < MIN_FRAME_LEN),
                Err(FrameError::TooLarge { len }) => prop_assert!(len > MAX_FRAME_LEN),
                Err(FrameError::BadCrc { computed, trailer, .. }) => prop_assert_ne!(computed, trailer),
                Err(e @ FrameError::PayloadTooLarge { .. }) => prop_assert!(false, "decode returned {e}"),
            }
        }

        #[test]
        fn oversized_length_is_rejected_before_allocating(len in (MAX_FRAME_LEN + 1)..=u32::MAX, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(decode(&bytes), Err(FrameError::TooLarge { len }));
        }

        #[test]
        fn undersized_length_is_rejected(len in 0..MIN_FRAME_LEN, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(decode(&bytes), Err(FrameError::TooShort { len }));
        }

        #[test]
        fn any_single_bit_flip_is_detected(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..600), bit in any::<prop::sample::Index>()) {
            let good = encode(&h, &payload).unwrap();
            let mut bad = good.clone();
            let bit = bit.index(bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            let r = decode(&bad);
            if bit / 8 >= PREFIX_LEN {
                // Header, payload or trailer: crc32c catches every single-bit error.
                prop_assert!(matches!(r, Err(FrameError::BadCrc { .. })), "got {:?}", r);
            } else {
                // The length prefix: too short, too large, incomplete, or a crc
                // mismatch at the shifted trailer; never the original frame.
                if let Ok(Some((f, _))) = r {
                    prop_assert!(f.header != h || f.payload != payload);
                }
            }
        }
    }

    #[test]
    fn max_payload_encodes_and_one_more_byte_does_not() {
        let h = Header::default();
        assert!(h.encode_prefix(MAX_PAYLOAD).is_ok());
        assert_eq!(
            h.encode_prefix(MAX_PAYLOAD + 1),
            Err(FrameError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        assert_eq!(parse_length(MAX_FRAME_LEN.to_le_bytes()), Ok(MAX_PAYLOAD));
    }

    #[test]
    fn opcode_bytes_round_trip() {
        for op in [
            Opcode::Hello,
            Opcode::Read,
            Opcode::Write,
            Opcode::Flush,
            Opcode::Trim,
            Opcode::Versions,
            Opcode::DirtyRegions,
            Opcode::GetMembership,
            Opcode::SetMembership,
            Opcode::MarkClean,
            Opcode::Clean,
            Opcode::ReplicaSet,
            Opcode::Claim,
        ] {
            assert_eq!(Opcode::from_u8(op as u8), Some(op));
            assert_eq!(Opcode::from_u8(op as u8 | RESPONSE_BIT), None);
        }
        assert_eq!(Opcode::from_u8(0), None);
    }
}
