//! Entry points for the fuzz targets (`replica/fuzz/`): every parser the daemon runs
//! at start on bytes from its data directory, callable on arbitrary bytes, with the
//! properties each must keep (never panic; what it accepts re-encodes to an equal
//! value). Not an API: the daemon never calls these.

use crate::record;
use crate::store::format;

/// Which on-disk format [`on_disk`] parses (the first byte of a fuzz input picks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisk {
    /// A volume's record (`volume.rec`).
    Record,
    /// A store's manifest.
    Manifest,
    /// A layer's meta file header.
    LayerHeader,
    /// A layer's meta entries (16 bytes each).
    MetaEntries,
    /// The dirty-region map file.
    DirtyMap,
    /// The in-sync record file.
    Membership,
}

impl OnDisk {
    /// Every format, in the order a selector byte indexes them.
    pub const ALL: [OnDisk; 6] = [
        OnDisk::Record,
        OnDisk::Manifest,
        OnDisk::LayerHeader,
        OnDisk::MetaEntries,
        OnDisk::DirtyMap,
        OnDisk::Membership,
    ];

    /// The format selector byte `b` names.
    pub fn from_selector(b: u8) -> OnDisk {
        Self::ALL[b as usize % Self::ALL.len()]
    }
}

/// Parses `bytes` as `format` the way the daemon does at start and checks that an
/// accepted value re-encodes to one that parses back equal. Panics only when that
/// property fails (a bug the fuzzer reports).
pub fn on_disk(format: OnDisk, bytes: &[u8]) {
    match format {
        OnDisk::Record => {
            if let Ok(rec) = record::decode(bytes) {
                let again = record::encode(&rec).expect("a decoded record encodes");
                let back = record::decode(&again).expect("a re-encoded record decodes");
                assert_eq!(
                    record::encode(&back).expect("encodes"),
                    again,
                    "record round trip"
                );
            }
        }
        OnDisk::Manifest => {
            if let Ok(m) = format::decode_manifest(bytes) {
                let again = format::encode_manifest(&m).expect("a decoded manifest encodes");
                assert_eq!(
                    format::decode_manifest(&again).expect("a re-encoded manifest decodes"),
                    m,
                    "manifest round trip"
                );
            }
        }
        OnDisk::LayerHeader => {
            if let Ok(id) = format::decode_layer_header(bytes) {
                assert_eq!(
                    format::decode_layer_header(&format::encode_layer_header(id)),
                    Ok(id),
                    "layer header round trip"
                );
            }
        }
        OnDisk::MetaEntries => {
            for raw in bytes.chunks_exact(format::ENTRY_SIZE as usize) {
                let raw: &[u8; format::ENTRY_SIZE as usize] =
                    raw.try_into().expect("chunks_exact gives whole entries");
                if let Some(entry) = format::Entry::decode(raw) {
                    assert_eq!(&entry.encode(), raw, "meta entry round trip");
                }
            }
        }
        OnDisk::DirtyMap => {
            let _ = crate::sync_state::decode_dirty_file(bytes);
        }
        OnDisk::Membership => {
            let _ = crate::sync_state::decode_membership_file(bytes);
        }
    }
}
