//! On-disk encodings of the block store: per-block metadata entries, the layer
//! meta-file header, and the volume manifest.
//!
//! Everything here is pure (bytes in, values out) so it can be tested without files
//! and so a future `tessera` debugging tool can reuse it. The layouts themselves are
//! described in the parent module's documentation.

use serde::{Deserialize, Serialize};

use crate::block_io::BLOCK_SIZE;

/// Bytes per metadata entry.
pub(crate) const ENTRY_SIZE: u64 = 16;
/// Bytes reserved at the start of a layer's meta file for its header. A whole block,
/// so entry pages stay aligned with data pages for a later O_DIRECT meta file.
pub(crate) const META_HEADER_SIZE: u64 = BLOCK_SIZE;

/// Entry flag: the layer holds data for the block in its data file.
pub(crate) const FLAG_DATA: u32 = 1;
/// Entry flag: the block was trimmed at `seq`; it reads as zeros and hides older layers.
pub(crate) const FLAG_TRIMMED: u32 = 2;
/// Entry flag written when a merge finds a layer's in-memory index claiming a block
/// whose entry is missing on disk: no valid entry has this bit, so the block reads as
/// corrupt instead of silently falling through to older data.
pub(crate) const FLAG_POISONED: u32 = 0x8000_0000;

const LAYER_MAGIC: &[u8; 8] = b"TESSLAYR";
const LAYER_VERSION: u32 = 1;
const MANIFEST_MAGIC: &[u8; 8] = b"TESSMANI";
/// Current manifest format version.
pub(crate) const MANIFEST_VERSION: u32 = 1;
/// Bytes before the manifest body: magic, version, body length, crc32c.
const MANIFEST_HEADER: usize = 20;
/// Upper bound on a manifest body; a longer length field means a damaged file, and
/// bounding it keeps a corrupt length from driving a huge allocation.
const MANIFEST_MAX_BODY: usize = 16 << 20;

/// One block's metadata in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// crc32c over block index, seq, flags and (for data entries) the block's bytes.
    pub crc: u32,
    /// [`FLAG_DATA`] or [`FLAG_TRIMMED`]; anything else is damage.
    pub flags: u32,
    /// Sequence number of the write or trim that produced the block.
    pub seq: u64,
}

/// What a verified entry says about its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The data bytes are the ones written at `seq`.
    Data,
    /// The block was trimmed at `seq` and reads as zeros.
    Trimmed,
    /// Entry and data do not belong together: torn write, bit rot or a damaged entry.
    Corrupt,
}

/// The checksum binding a block's position, version and contents together.
///
/// Including the block index catches misdirected writes; including seq and flags means
/// an entry can only ever validate the exact bytes of the write that produced it.
pub(crate) fn block_crc(block: u64, seq: u64, flags: u32, data: Option<&[u8]>) -> u32 {
    let mut head = [0u8; 20];
    head[..8].copy_from_slice(&block.to_le_bytes());
    head[8..16].copy_from_slice(&seq.to_le_bytes());
    head[16..].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&head);
    match data {
        Some(d) => crc32c::crc32c_append(crc, d),
        None => crc,
    }
}

impl Entry {
    /// The entry for `data` written to `block` at `seq`.
    pub(crate) fn for_data(block: u64, seq: u64, data: &[u8]) -> Entry {
        Entry {
            crc: block_crc(block, seq, FLAG_DATA, Some(data)),
            flags: FLAG_DATA,
            seq,
        }
    }

    /// The tombstone for `block` trimmed at `seq`.
    pub(crate) fn tombstone(block: u64, seq: u64) -> Entry {
        Entry {
            crc: block_crc(block, seq, FLAG_TRIMMED, None),
            flags: FLAG_TRIMMED,
            seq,
        }
    }

    /// An entry that can never verify (see [`FLAG_POISONED`]).
    pub(crate) fn poisoned() -> Entry {
        Entry {
            crc: 0,
            flags: FLAG_POISONED,
            seq: 0,
        }
    }

    /// Little-endian encoding: crc u32, flags u32, seq u64.
    pub(crate) fn encode(&self) -> [u8; ENTRY_SIZE as usize] {
        let mut out = [0u8; ENTRY_SIZE as usize];
        out[..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..].copy_from_slice(&self.seq.to_le_bytes());
        out
    }

    /// Decodes one entry; `None` for the all-zero "no entry in this layer" value.
    pub(crate) fn decode(raw: &[u8; ENTRY_SIZE as usize]) -> Option<Entry> {
        if raw.iter().all(|&b| b == 0) {
            return None;
        }
        let mut crc = [0u8; 4];
        let mut flags = [0u8; 4];
        let mut seq = [0u8; 8];
        crc.copy_from_slice(&raw[..4]);
        flags.copy_from_slice(&raw[4..8]);
        seq.copy_from_slice(&raw[8..]);
        Some(Entry {
            crc: u32::from_le_bytes(crc),
            flags: u32::from_le_bytes(flags),
            seq: u64::from_le_bytes(seq),
        })
    }

    /// Whether this is a tombstone whose checksum is intact (no data needed to tell).
    pub(crate) fn is_valid_tombstone(&self, block: u64) -> bool {
        self.flags == FLAG_TRIMMED && self.crc == block_crc(block, self.seq, self.flags, None)
    }

    /// Checks the entry against the block's stored bytes.
    pub(crate) fn verify(&self, block: u64, data: &[u8]) -> Verdict {
        match self.flags {
            FLAG_DATA if self.crc == block_crc(block, self.seq, FLAG_DATA, Some(data)) => {
                Verdict::Data
            }
            FLAG_TRIMMED if self.is_valid_tombstone(block) => Verdict::Trimmed,
            _ => Verdict::Corrupt,
        }
    }
}

/// Encodes a layer meta file's header block.
///
/// Layout: magic `TESSLAYR`, version u32, reserved u32, layer id u64, crc32c u32 of
/// the preceding 24 bytes; the rest of the block is zero.
pub(crate) fn encode_layer_header(layer_id: u64) -> Vec<u8> {
    let mut out = vec![0u8; META_HEADER_SIZE as usize];
    out[..8].copy_from_slice(LAYER_MAGIC);
    out[8..12].copy_from_slice(&LAYER_VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&layer_id.to_le_bytes());
    let crc = crc32c::crc32c(&out[..24]);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a layer header and returns the layer id it names.
pub(crate) fn decode_layer_header(raw: &[u8]) -> Result<u64, String> {
    if raw.len() < 28 {
        return Err(format!("header is {} bytes, expected 28", raw.len()));
    }
    if &raw[..8] != LAYER_MAGIC {
        return Err("bad magic".to_string());
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&raw[24..28]);
    if u32::from_le_bytes(crc) != crc32c::crc32c(&raw[..24]) {
        return Err("header checksum mismatch".to_string());
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&raw[8..12]);
    let version = u32::from_le_bytes(version);
    if version != LAYER_VERSION {
        return Err(format!("unsupported layer version {version}"));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&raw[16..24]);
    Ok(u64::from_le_bytes(id))
}

/// The manifest body (version 1), serialised as JSON after the binary header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestV1 {
    /// Current volume size in bytes.
    pub size_bytes: u64,
    /// Id the next created layer gets; ids are never reused.
    pub next_layer_id: u64,
    /// The volume (its head layer) was deleted; only snapshots remain.
    pub volume_deleted: bool,
    /// The layer chain, head first, base last.
    pub layers: Vec<ManifestLayer>,
}

/// One layer in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestLayer {
    /// Layer id; its files live in `layers/<id>/`.
    pub id: u64,
    /// Snapshot this sealed layer ends; `None` only for the head.
    pub snapshot_id: Option<String>,
    /// Volume size when the layer was sealed (the head: the current size).
    pub size_bytes: u64,
    /// The snapshot is being deleted: its layer is still read through but is being
    /// merged into its child; an interrupted deletion resumes at open.
    pub deleting: bool,
    /// The layer is another volume's sealed layer, hard-linked in by
    /// `LayeredStore::create_sharing`: read through, never written, merged or listed
    /// as a snapshot here. Omitted when false, so manifests of volumes that share
    /// nothing stay byte-identical to those written before sharing existed (and such
    /// old manifests decode with `false`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub shared: bool,
}

/// serde's `skip_serializing_if` needs a function.
fn is_false(b: &bool) -> bool {
    !*b
}

/// Encodes a manifest: magic `TESSMANI`, version u32, body length u32, crc32c u32 of
/// version, length and body, then the JSON body.
pub(crate) fn encode_manifest(m: &ManifestV1) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(m).map_err(|e| e.to_string())?;
    frame_manifest(&body)
}

/// Frames a manifest body (header and checksum); split out so tests can write bodies
/// of older layouts byte for byte.
pub(crate) fn frame_manifest(body: &[u8]) -> Result<Vec<u8>, String> {
    let len = u32::try_from(body.len()).map_err(|_| "manifest body too large".to_string())?;
    let mut out = Vec::with_capacity(MANIFEST_HEADER + body.len());
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[8..16]), body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes and checks a manifest, upgrading older versions to the current one.
pub(crate) fn decode_manifest(raw: &[u8]) -> Result<ManifestV1, String> {
    if raw.len() < MANIFEST_HEADER {
        return Err(format!(
            "file is {} bytes, shorter than its header",
            raw.len()
        ));
    }
    if &raw[..8] != MANIFEST_MAGIC {
        return Err("bad magic".to_string());
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&raw[8..12]);
    let version = u32::from_le_bytes(word);
    word.copy_from_slice(&raw[12..16]);
    let len = u32::from_le_bytes(word) as usize;
    word.copy_from_slice(&raw[16..20]);
    let crc = u32::from_le_bytes(word);
    if len > MANIFEST_MAX_BODY || raw.len() != MANIFEST_HEADER + len {
        return Err(format!(
            "body length {len} does not match file length {}",
            raw.len()
        ));
    }
    let body = &raw[MANIFEST_HEADER..];
    if crc != crc32c::crc32c_append(crc32c::crc32c(&raw[8..16]), body) {
        return Err("checksum mismatch".to_string());
    }
    upgrade_manifest(version, body)
}

/// Turns a body of any known version into the current one. Version 1 is the only
/// one so far; a new version adds a decode of the old struct and a conversion here.
fn upgrade_manifest(version: u32, body: &[u8]) -> Result<ManifestV1, String> {
    match version {
        1 => serde_json::from_slice(body).map_err(|e| format!("bad body: {e}")),
        v => Err(format!("unsupported manifest version {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_zero_is_absent() {
        let e = Entry::for_data(7, 42, &[3u8; 4096]);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&[0u8; 16]), None);
    }

    #[test]
    fn crc_binds_block_seq_and_data() {
        let data = [9u8; 4096];
        let e = Entry::for_data(7, 42, &data);
        assert_eq!(e.verify(7, &data), Verdict::Data);
        assert_eq!(e.verify(8, &data), Verdict::Corrupt, "misdirected block");
        let mut other = data;
        other[4095] ^= 1;
        assert_eq!(e.verify(7, &other), Verdict::Corrupt, "one flipped bit");
        let mut stale = e;
        stale.seq = 41;
        assert_eq!(stale.verify(7, &data), Verdict::Corrupt, "seq is covered");
    }

    #[test]
    fn tombstones_verify_without_data_and_poison_never_does() {
        let t = Entry::tombstone(3, 5);
        assert!(t.is_valid_tombstone(3));
        assert!(!t.is_valid_tombstone(4));
        assert_eq!(t.verify(3, &[1u8; 4096]), Verdict::Trimmed);
        assert_eq!(Entry::poisoned().verify(3, &[0u8; 4096]), Verdict::Corrupt);
    }

    #[test]
    fn layer_header_checks_magic_crc_and_version() {
        let h = encode_layer_header(12);
        assert_eq!(decode_layer_header(&h), Ok(12));
        let mut bad = h.clone();
        bad[17] ^= 1;
        assert!(decode_layer_header(&bad).is_err());
        let mut bad = h;
        bad[0] = b'X';
        assert!(decode_layer_header(&bad).is_err());
    }

    #[test]
    fn manifest_round_trips_and_rejects_damage() {
        let m = ManifestV1 {
            size_bytes: 8192,
            next_layer_id: 3,
            volume_deleted: false,
            layers: vec![
                ManifestLayer {
                    id: 2,
                    snapshot_id: None,
                    size_bytes: 8192,
                    deleting: false,
                    shared: false,
                },
                ManifestLayer {
                    id: 1,
                    snapshot_id: Some("s".into()),
                    size_bytes: 4096,
                    deleting: false,
                    shared: true,
                },
            ],
        };
        let raw = encode_manifest(&m).expect("small manifest encodes");
        assert_eq!(decode_manifest(&raw), Ok(m));
        for i in [0usize, 9, 13, 17, 25, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            assert!(decode_manifest(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(decode_manifest(&raw[..raw.len() - 1]).is_err());
        assert!(decode_manifest(&raw[..10]).is_err());
    }

    #[test]
    fn shared_is_optional_and_omitted_when_false() {
        // A body as written before layer sharing: no `shared` key anywhere.
        let old = br#"{"size_bytes":8192,"next_layer_id":3,"volume_deleted":false,"layers":[{"id":2,"snapshot_id":null,"size_bytes":8192,"deleting":false},{"id":1,"snapshot_id":"s","size_bytes":4096,"deleting":false}]}"#;
        let m = decode_manifest(&frame_manifest(old).expect("frame")).expect("old body decodes");
        assert!(m.layers.iter().all(|l| !l.shared));
        // Re-encoding it gives the very same bytes: nothing new appears for `false`.
        assert_eq!(
            encode_manifest(&m).expect("encode"),
            frame_manifest(old).expect("frame")
        );
    }
}
