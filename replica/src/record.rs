//! The volume record: what one replica knows about one volume, and its file format.
//!
//! The records on a majority of a volume's replicas are the cluster's source of truth
//! (the controller keeps only an in-memory index rebuilt from them), so the format is
//! built to be checked, not trusted:
//!
//! ```text
//! offset  size  field
//!      0     4  magic  b"TSVR"
//!      4     2  format version, little endian (currently 1)
//!      6     2  reserved, zero
//!      8     4  body length in bytes, little endian
//!     12     4  crc32c over bytes 0..12 followed by the body, little endian
//!     16     n  body: UTF-8 JSON object, a serde mirror of the proto `VolumeRecord`
//! ```
//!
//! The body is JSON rather than the prost encoding so an operator can read a record
//! during an incident (`tail -c +17 record | jq`); fields added later get
//! `#[serde(default)]` so older records still decode. A change the defaults cannot
//! express bumps the format version and adds an `upgrade_vN` step in [`decode`].
//!
//! Files are replaced atomically: written to a temp file next to the target, fsynced,
//! renamed over it, and the directory fsynced ([`write_file`]), so a crash leaves either
//! the old or the new record, never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::control_proto as proto;

/// First bytes of every record file, so a stray file is never taken for a record.
pub const MAGIC: [u8; 4] = *b"TSVR";

/// Format version written by this build; [`decode`] accepts it and every older one.
pub const FORMAT_VERSION: u16 = 1;

/// Size of the fixed header in front of the JSON body.
pub const HEADER_LEN: usize = 16;

/// Largest body accepted by [`decode`]: far above any real record, and small enough
/// that a corrupt length cannot make the daemon allocate without bound.
pub const MAX_BODY_LEN: usize = 16 << 20;

/// Name of the temp file [`write_file`] uses next to a record (removed at start).
pub const TEMP_SUFFIX: &str = ".tmp";

/// One member of a volume's replica set (mirror of the proto `ReplicaRef`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ReplicaRef {
    /// Node the replica daemon runs on.
    pub node_id: String,
    /// Zone of that node ("" when the cluster has no zones).
    pub zone: String,
    /// host:port of that daemon's control gRPC.
    pub control_address: String,
    /// host:port of that daemon's data plane.
    pub data_address: String,
}

/// A node the volume is published to (mirror of the proto `Attachment`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Attachment {
    /// Node the volume is attached to.
    pub node_id: String,
    /// Whether it is attached read-only.
    pub readonly: bool,
}

/// Everything this replica stores about one volume (mirror of the proto
/// `VolumeRecord`; the proto comments are the contract for each field).
///
/// `parameters` is a `BTreeMap` so the encoded body is deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct VolumeRecord {
    /// Volume id; also the name of the volume's directory.
    pub volume_id: String,
    /// CSI name given at creation.
    pub name: String,
    /// Size of the volume in bytes, a multiple of the block size.
    pub size_bytes: u64,
    /// Number of replicas the volume has.
    pub replication_factor: u32,
    /// Replica set chosen at creation; never recomputed.
    pub replicas: Vec<ReplicaRef>,
    /// Validated StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// Highest fencing epoch this replica accepted.
    pub epoch: u64,
    /// Compare-and-set token, bumped by every update.
    pub generation: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// Nodes the volume is published to.
    pub attachments: Vec<Attachment>,
    /// "block", "mount" or "" when unknown.
    pub access_type: String,
    /// Snapshots of this volume sealed on this replica, oldest first. They live in
    /// the record (next to the store's sealed layers) so a controller restart finds
    /// them on the replicas.
    pub snapshots: Vec<SnapshotMeta>,
    /// The volume was deleted while it had snapshots: its head is gone, its sealed
    /// layers and this record stay until the last snapshot is deleted. Such a volume
    /// is not listed and not served; only its snapshots are.
    pub deleted: bool,
    /// Where the volume's data is copied from, when it was restored from a snapshot,
    /// cloned or rebuilt; kept after the copy completes, as provenance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_source: Option<CopySource>,
    /// Durable progress of that copy (`None` exactly when `copy_source` is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyProgress>,
}

impl VolumeRecord {
    /// The copy source while the copy is not complete: the data plane must not serve
    /// the volume yet, and the daemon runs (or resumes) the copy.
    pub fn pending_copy(&self) -> Option<(&CopySource, &CopyProgress)> {
        match (&self.copy_source, &self.copy) {
            (Some(source), Some(progress)) if !progress.complete => Some((source, progress)),
            _ => None,
        }
    }
}

/// Where a restored, cloned or rebuilt volume's data comes from (mirror of the proto
/// `CopySource`; the proto comments are the contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CopySource {
    /// Sealed snapshot to copy.
    pub snapshot_id: String,
    /// Volume the snapshot belongs to on the holders.
    pub source_volume_id: String,
    /// Replication factor of the source: a majority of it must answer.
    pub source_replication_factor: u32,
    /// Daemons holding a sealed copy.
    pub holders: Vec<ReplicaRef>,
    /// Size of the snapshot in bytes.
    pub size_bytes: u64,
    /// The CSI source was a volume (clone) rather than a snapshot.
    pub clone: bool,
    /// A rebuild: the head of this same volume, copied from its surviving replicas
    /// with every block's own seq.
    pub rebuild: bool,
    /// With `rebuild`: the epoch the controller fenced a detached volume at before
    /// the copy (0 otherwise); the controller's, stored only.
    pub fence_epoch: u64,
}

impl CopySource {
    /// What the copy is, for logs and messages: "rebuild", "clone" or "restore".
    pub fn kind(&self) -> &'static str {
        if self.rebuild {
            "rebuild"
        } else if self.clone {
            "clone"
        } else {
            "restore"
        }
    }

    /// Whether `other` names the same data (snapshot, volume, size, kind). Holders and
    /// replication factor are where to fetch it from, which may legitimately change
    /// between a create and its retry (daemons move).
    pub fn same_data(&self, other: &CopySource) -> bool {
        self.snapshot_id == other.snapshot_id
            && self.source_volume_id == other.source_volume_id
            && self.size_bytes == other.size_bytes
            && self.clone == other.clone
            && self.rebuild == other.rebuild
    }
}

/// Progress of populating a volume from its [`CopySource`] (mirror of the proto
/// `CopyProgress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CopyProgress {
    /// `[0, done_bytes)` of the source is copied and durable.
    pub done_bytes: u64,
    /// Bytes to copy (the source size).
    pub total_bytes: u64,
    /// Everything is copied and flushed; the data plane serves the volume.
    pub complete: bool,
    /// The last error the copy is retrying past ("" when none).
    pub last_error: String,
    /// The volume's base shares this daemon's sealed layers of the snapshot (hard
    /// links); the copy fetches only blocks where the holders' merge differs.
    pub shared_layers: bool,
    /// With `shared_layers`, the source's epoch here when they were shared: the
    /// volume's epochs must exceed it (see the proto field).
    pub epoch_floor: u64,
}

impl CopyProgress {
    /// Whole percent done, for messages and logs.
    pub fn percent(&self) -> u64 {
        if self.total_bytes == 0 {
            return 100;
        }
        u64::try_from(u128::from(self.done_bytes) * 100 / u128::from(self.total_bytes))
            .unwrap_or(100)
    }
}

/// One snapshot as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SnapshotMeta {
    /// Snapshot id; also the id of the sealed layer in the store.
    pub snapshot_id: String,
    /// CSI name given at CreateSnapshot.
    pub name: String,
    /// Volume size when the snapshot was taken.
    pub size_bytes: u64,
    /// Creation time (the controller's), nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
}

/// Why bytes could not be decoded as a record. The file is then treated as corrupt:
/// reported and left alone, never overwritten.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header, or than the header says the body has.
    #[error("record is truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header requires.
        expected: usize,
    },
    /// Bytes after the body; a record is never padded, so the file is damaged.
    #[error("record has {extra} trailing bytes after its body")]
    TrailingBytes {
        /// Number of unexpected bytes.
        extra: usize,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a volume record (bad magic {found:02x?})")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// Written by a newer build that this one cannot read.
    #[error("record format version {0} is newer than supported version {FORMAT_VERSION}")]
    UnsupportedVersion(u16),
    /// The header claims a body larger than [`MAX_BODY_LEN`].
    #[error("record body length {0} exceeds the limit")]
    BodyTooLarge(usize),
    /// Header and body do not match the stored checksum.
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The checksum matched but the body is not a valid record.
    #[error("record body is not valid JSON for a volume record")]
    Body(#[source] serde_json::Error),
}

/// Why a record file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read at all.
    #[error("cannot read record file")]
    Io(#[source] io::Error),
    /// The file was read but is not a valid record.
    #[error("record file is corrupt")]
    Corrupt(#[source] RecordError),
}

/// Serialises a record into the on-disk format described in the module docs.
///
/// Fails only if the record cannot be represented (serde_json refusing a value).
pub fn encode(record: &VolumeRecord) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(record)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    // A body over 4 GiB cannot be produced from a gRPC message (4 MiB limit), but
    // refuse it rather than truncating the length.
    let len = u32::try_from(body.len()).map_err(|_| {
        serde_json::Error::io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "record body exceeds 4 GiB",
        ))
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses and verifies a record produced by [`encode`] (any supported version).
pub fn decode(bytes: &[u8]) -> Result<VolumeRecord, RecordError> {
    let header = bytes.get(..HEADER_LEN).ok_or(RecordError::Truncated {
        len: bytes.len(),
        expected: HEADER_LEN,
    })?;
    let field = |at: usize| [header[at], header[at + 1], header[at + 2], header[at + 3]];
    let magic = field(0);
    if magic != MAGIC {
        return Err(RecordError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(RecordError::UnsupportedVersion(version));
    }
    // u32 always fits in usize on the 64-bit targets this daemon supports; saturate
    // elsewhere so the limit check below rejects it.
    let body_len = usize::try_from(u32::from_le_bytes(field(8))).unwrap_or(usize::MAX);
    if body_len > MAX_BODY_LEN {
        return Err(RecordError::BodyTooLarge(body_len));
    }
    let expected = HEADER_LEN + body_len;
    if bytes.len() < expected {
        return Err(RecordError::Truncated {
            len: bytes.len(),
            expected,
        });
    }
    if bytes.len() > expected {
        return Err(RecordError::TrailingBytes {
            extra: bytes.len() - expected,
        });
    }
    let stored = u32::from_le_bytes(field(12));
    let body = &bytes[HEADER_LEN..];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&header[..12]), body);
    if stored != computed {
        return Err(RecordError::ChecksumMismatch { stored, computed });
    }
    // Version 1 is the only format so far; an upgrade_v1(..) step goes here when a
    // version 2 exists.
    serde_json::from_slice(body).map_err(RecordError::Body)
}

/// Reads and verifies the record file at `path`.
pub fn read_file(path: &Path) -> Result<VolumeRecord, ReadError> {
    let bytes = fs::read(path).map_err(ReadError::Io)?;
    decode(&bytes).map_err(ReadError::Corrupt)
}

/// Atomically replaces the record file at `path` and makes the change durable.
///
/// Writes `<path>.tmp`, fsyncs it, renames it over `path` and fsyncs the parent
/// directory. On error the temp file is removed (best effort) and `path` still holds
/// the previous record.
pub fn write_file(path: &Path, record: &VolumeRecord) -> io::Result<()> {
    let bytes = encode(record).map_err(io::Error::other)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TEMP_SUFFIX);
    let tmp = Path::new(&tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        // The temp file may not exist (open failed) or already be renamed; either way
        // the error that matters is the one returned.
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Fsyncs a directory so entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Fsyncs the directory containing `path`.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

impl From<proto::ReplicaRef> for ReplicaRef {
    fn from(r: proto::ReplicaRef) -> Self {
        ReplicaRef {
            node_id: r.node_id,
            zone: r.zone,
            control_address: r.control_address,
            data_address: r.data_address,
        }
    }
}

impl From<ReplicaRef> for proto::ReplicaRef {
    fn from(r: ReplicaRef) -> Self {
        proto::ReplicaRef {
            node_id: r.node_id,
            zone: r.zone,
            control_address: r.control_address,
            data_address: r.data_address,
        }
    }
}

impl From<proto::CopySource> for CopySource {
    fn from(c: proto::CopySource) -> Self {
        CopySource {
            snapshot_id: c.snapshot_id,
            source_volume_id: c.source_volume_id,
            source_replication_factor: c.source_replication_factor,
            holders: c.holders.into_iter().map(Into::into).collect(),
            size_bytes: c.size_bytes,
            clone: c.clone,
            rebuild: c.rebuild,
            fence_epoch: c.fence_epoch,
        }
    }
}

impl From<CopySource> for proto::CopySource {
    fn from(c: CopySource) -> Self {
        proto::CopySource {
            snapshot_id: c.snapshot_id,
            source_volume_id: c.source_volume_id,
            source_replication_factor: c.source_replication_factor,
            holders: c.holders.into_iter().map(Into::into).collect(),
            size_bytes: c.size_bytes,
            clone: c.clone,
            rebuild: c.rebuild,
            fence_epoch: c.fence_epoch,
        }
    }
}

impl From<proto::CopyProgress> for CopyProgress {
    fn from(p: proto::CopyProgress) -> Self {
        CopyProgress {
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            complete: p.complete,
            last_error: p.last_error,
            shared_layers: p.shared_layers,
            epoch_floor: p.epoch_floor,
        }
    }
}

impl From<CopyProgress> for proto::CopyProgress {
    fn from(p: CopyProgress) -> Self {
        proto::CopyProgress {
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            complete: p.complete,
            last_error: p.last_error,
            shared_layers: p.shared_layers,
            epoch_floor: p.epoch_floor,
        }
    }
}

impl From<proto::Attachment> for Attachment {
    fn from(a: proto::Attachment) -> Self {
        Attachment {
            node_id: a.node_id,
            readonly: a.readonly,
        }
    }
}

impl From<Attachment> for proto::Attachment {
    fn from(a: Attachment) -> Self {
        proto::Attachment {
            node_id: a.node_id,
            readonly: a.readonly,
        }
    }
}

impl From<proto::VolumeRecord> for VolumeRecord {
    fn from(r: proto::VolumeRecord) -> Self {
        VolumeRecord {
            volume_id: r.volume_id,
            name: r.name,
            size_bytes: r.size_bytes,
            replication_factor: r.replication_factor,
            replicas: r.replicas.into_iter().map(Into::into).collect(),
            parameters: r.parameters.into_iter().collect(),
            epoch: r.epoch,
            generation: r.generation,
            created_unix_nanos: r.created_unix_nanos,
            attachments: r.attachments.into_iter().map(Into::into).collect(),
            access_type: r.access_type,
            // Not carried by the proto record: snapshots have their own RPCs, and a
            // deleted volume is never sent as a volume.
            snapshots: Vec::new(),
            deleted: false,
            copy_source: r.copy_source.map(Into::into),
            copy: r.copy.map(Into::into),
        }
    }
}

impl From<VolumeRecord> for proto::VolumeRecord {
    fn from(r: VolumeRecord) -> Self {
        proto::VolumeRecord {
            volume_id: r.volume_id,
            name: r.name,
            size_bytes: r.size_bytes,
            replication_factor: r.replication_factor,
            replicas: r.replicas.into_iter().map(Into::into).collect(),
            parameters: r.parameters.into_iter().collect(),
            epoch: r.epoch,
            generation: r.generation,
            created_unix_nanos: r.created_unix_nanos,
            attachments: r.attachments.into_iter().map(Into::into).collect(),
            access_type: r.access_type,
            copy_source: r.copy_source.map(Into::into),
            copy: r.copy.map(Into::into),
            // Not part of the record: the control service adds it for GetVolume.
            in_sync: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VolumeRecord {
        VolumeRecord {
            volume_id: "pvc-1234".into(),
            name: "data-db-0".into(),
            size_bytes: 1 << 30,
            replication_factor: 3,
            replicas: vec![ReplicaRef {
                node_id: "n1".into(),
                zone: "z1".into(),
                control_address: "10.0.0.1:7400".into(),
                data_address: "10.0.0.1:7401".into(),
            }],
            parameters: [("fsType".to_string(), "ext4".to_string())].into(),
            epoch: 7,
            generation: 2,
            created_unix_nanos: 1_700_000_000_000_000_000,
            attachments: vec![Attachment {
                node_id: "n2".into(),
                readonly: true,
            }],
            access_type: "mount".into(),
            snapshots: Vec::new(),
            deleted: false,
            copy_source: Some(CopySource {
                snapshot_id: "ts-1".into(),
                source_volume_id: "tv-0".into(),
                source_replication_factor: 3,
                holders: vec![ReplicaRef {
                    node_id: "n3".into(),
                    control_address: "10.0.0.3:7400".into(),
                    ..ReplicaRef::default()
                }],
                size_bytes: 1 << 29,
                clone: false,
                ..CopySource::default()
            }),
            copy: Some(CopyProgress {
                done_bytes: 1 << 20,
                total_bytes: 1 << 29,
                complete: false,
                last_error: "holder n3 is unreachable".into(),
                shared_layers: false,
                epoch_floor: 0,
            }),
        }
    }

    #[test]
    fn round_trips() {
        let rec = sample();
        let bytes = encode(&rec).expect("encode");
        assert_eq!(&bytes[..4], b"TSVR");
        assert_eq!(decode(&bytes).expect("decode"), rec);
    }

    #[test]
    fn round_trips_through_proto() {
        let rec = sample();
        let back = VolumeRecord::from(proto::VolumeRecord::from(rec.clone()));
        assert_eq!(back, rec);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = encode(&sample()).expect("encode");
        for len in 0..bytes.len() {
            assert!(
                matches!(decode(&bytes[..len]), Err(RecordError::Truncated { .. })),
                "truncated to {len} bytes was accepted"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = encode(&sample()).expect("encode");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip in byte {i} was accepted");
        }
    }

    #[test]
    fn specific_corruptions_name_their_cause() {
        let good = encode(&sample()).expect("encode");

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(RecordError::BadMagic { .. })));

        let mut bad = good.clone();
        bad[4..6].copy_from_slice(&9u16.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(RecordError::UnsupportedVersion(9))
        ));

        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            decode(&bad),
            Err(RecordError::ChecksumMismatch { .. })
        ));

        let mut bad = good.clone();
        bad.push(0);
        assert!(matches!(
            decode(&bad),
            Err(RecordError::TrailingBytes { extra: 1 })
        ));

        let mut bad = good;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(RecordError::BodyTooLarge(_))));
    }

    #[test]
    fn valid_checksum_over_bad_json_is_rejected() {
        let body = b"{\"size_bytes\": \"not a number\"}";
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(body.len()).expect("small").to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), body);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(body);
        assert!(matches!(decode(&bytes), Err(RecordError::Body(_))));
    }

    #[test]
    fn missing_fields_take_defaults() {
        // A record written before a field existed must still decode.
        let body = b"{\"volume_id\":\"v\",\"size_bytes\":4096}";
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(body.len()).expect("small").to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), body);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(body);
        let rec = decode(&bytes).expect("decode");
        assert_eq!(rec.volume_id, "v");
        assert_eq!(rec.size_bytes, 4096);
        assert_eq!(rec.epoch, 0);
        assert!(rec.parameters.is_empty());
        assert_eq!((rec.copy_source, rec.copy), (None, None));
    }

    #[test]
    fn write_file_replaces_atomically_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record");
        let mut rec = sample();
        write_file(&path, &rec).expect("first write");
        rec.generation += 1;
        write_file(&path, &rec).expect("second write");
        assert_eq!(read_file(&path).expect("read"), rec);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("record")]);
    }

    #[test]
    fn read_file_reports_io_and_corruption_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record");
        assert!(matches!(read_file(&path), Err(ReadError::Io(_))));
        fs::write(&path, b"garbage").expect("write");
        assert!(matches!(read_file(&path), Err(ReadError::Corrupt(_))));
    }
}
