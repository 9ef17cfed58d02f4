//! Reading and writing frames on async byte streams, shared by server and client.
//!
//! A frame is read in two steps, head (prefix + header) then body (payload + crc), so
//! the server can take its memory budget for the payload between them, and the
//! payload lands directly in the one buffer that is later handed to the block store
//! or the caller: one allocation per payload, no copy.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{
    check_crc, frame_crc, frame_crc_with_payload_crc, parse_length, Frame, FrameError, Header,
    CRC_LEN, HEADER_LEN, PREFIX_LEN,
};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed or closed in the middle of a frame.
    #[error("reading a frame failed")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Prefix and header of a frame whose body has not been read yet.
#[derive(Debug)]
pub struct FrameHead {
    raw: [u8; PREFIX_LEN + HEADER_LEN],
    /// Decoded header; not yet covered by a verified crc.
    pub header: Header,
    /// Payload bytes that follow, already checked against the frame limit.
    pub payload_len: usize,
}

/// Reads the prefix and header. `Ok(None)` means the peer closed the stream cleanly
/// between frames.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<FrameHead>, ReadError> {
    let mut raw = [0u8; PREFIX_LEN + HEADER_LEN];
    let n = r.read(&mut raw).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut raw[n..]).await?;
    let mut prefix = [0u8; PREFIX_LEN];
    prefix.copy_from_slice(&raw[..PREFIX_LEN]);
    let payload_len = parse_length(prefix)?;
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&raw[PREFIX_LEN..]);
    Ok(Some(FrameHead {
        raw,
        header: Header::decode(&h),
        payload_len,
    }))
}

/// Reads the payload and trailer of `head` and verifies the crc.
///
/// The payload buffer is not zeroed first: the socket's bytes are read straight into
/// its uninitialised capacity (tokio tracks what was filled), so a 1 MiB write costs
/// one pass over the memory instead of a `memset` plus the copy.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    head: &FrameHead,
) -> Result<Vec<u8>, ReadError> {
    let mut payload = Vec::with_capacity(head.payload_len);
    while payload.len() < head.payload_len {
        let want = (head.payload_len - payload.len()) as u64;
        // `take` keeps the read inside this frame even if the Vec got spare capacity.
        if (&mut *r).take(want).read_buf(&mut payload).await? == 0 {
            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    let mut trailer = [0u8; CRC_LEN];
    r.read_exact(&mut trailer).await?;
    check_crc(&head.raw, &payload, trailer)?;
    Ok(payload)
}

/// Reads one whole frame; `Ok(None)` on a clean close between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ReadError> {
    let Some(head) = read_head(r).await? else {
        return Ok(None);
    };
    let payload = read_body(r, &head).await?;
    Ok(Some(Frame {
        header: head.header,
        payload,
    }))
}

/// Writes one frame (prefix + header, payload, trailer) without copying the payload
/// into a frame buffer. Callers wrap the socket in a `BufWriter` and flush once per
/// batch, so small frames still go out in few syscalls.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &Header,
    payload: &[u8],
) -> std::io::Result<()> {
    let ph = encode_prefix(header, payload.len())?;
    w.write_all(&ph).await?;
    w.write_all(payload).await?;
    w.write_all(&frame_crc(&ph, payload).to_le_bytes()).await
}

/// [`write_frame`] for a payload whose crc32c the caller already has (computed once for
/// a payload sent to several replicas). A wrong `payload_crc` makes the receiver
/// reject the frame; it can never make bad data look good.
pub async fn write_frame_with_payload_crc<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &Header,
    payload: &[u8],
    payload_crc: u32,
) -> std::io::Result<()> {
    let ph = encode_prefix(header, payload.len())?;
    w.write_all(&ph).await?;
    w.write_all(payload).await?;
    let crc = frame_crc_with_payload_crc(&ph, payload_crc, payload.len());
    w.write_all(&crc.to_le_bytes()).await
}

fn encode_prefix(
    header: &Header,
    payload_len: usize,
) -> std::io::Result<[u8; PREFIX_LEN + HEADER_LEN]> {
    header
        .encode_prefix(payload_len)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::frame::encode;

    #[tokio::test]
    async fn stream_round_trip_and_errors() {
        let h = Header {
            opcode: 3,
            request_id: 9,
            length: 5,
            ..Header::default()
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &h, b"hello").await.unwrap();
        assert_eq!(buf, encode(&h, b"hello").unwrap());
        buf.extend_from_slice(&encode(&h, b"").unwrap());

        let mut r = &buf[..];
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.header, f.payload.as_slice()), (h, &b"hello"[..]));
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert!(f.payload.is_empty());
        assert!(read_frame(&mut r).await.unwrap().is_none());

        // Truncated mid-frame: an I/O error, not a clean close.
        let mut r = &buf[..10];
        assert!(matches!(read_frame(&mut r).await, Err(ReadError::Io(_))));

        // Flipped payload byte: crc error that still reports the request id.
        let mut bad = encode(&h, b"hello").unwrap();
        bad[50] ^= 0x40;
        let mut r = &bad[..];
        match read_frame(&mut r).await {
            Err(ReadError::Frame(FrameError::BadCrc { header, .. })) => {
                assert_eq!(header.request_id, 9)
            }
            other => panic!("expected BadCrc, got {other:?}"),
        }

        // Oversized length: rejected from the prefix alone.
        let huge = u32::MAX.to_le_bytes();
        let mut raw = huge.to_vec();
        raw.extend_from_slice(&[0u8; 60]);
        let mut r = &raw[..];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ReadError::Frame(FrameError::TooLarge { .. }))
        ));
    }
}
