//! What a replica remembers about keeping the copies of its volume in sync: which
//! regions it changed since the copies were last known equal, and which replicas
//! the volume's engine last declared in sync.
//!
//! Both exist so that a *new* engine — after any crash of the old one, of the node,
//! or of a minority of replicas — can make the copies equal again without reading
//! the whole volume, and never reads from a copy that missed writes (DESIGN.md
//! "Recovery"):
//!
//! * [`DirtyRegions`] (`dirty-regions` in the store directory) is the activity log:
//!   a bitmap of [`REGION_SIZE`] regions. The data plane marks a region durably
//!   *before* a write or trim into it is applied, so every block that may differ
//!   between copies lies in a region marked on at least one replica that took the
//!   write. The engine clears regions only once every replica of the set holds the
//!   writes durably (`mark_generation`, then `clean`).
//! * [`Membership`] (`in-sync` in the store directory) is the set of replicas the
//!   engine declared in sync, with the epoch and version of that declaration. An
//!   engine writes it to every replica it can reach and needs a majority; a new
//!   engine takes the highest (epoch, version) among a majority, so it sees the
//!   last declaration that reached a majority.
//!
//! Both files are per volume and live in its store directory, so a deleted volume
//! takes them along and a restored one starts clean.

mod dirty;
mod membership;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) use dirty::decode_file as decode_dirty_file;
pub use dirty::{DirtyRegions, REGION_SIZE};
pub(crate) use membership::decode_file as decode_membership_file;
pub use membership::MembershipFile;
pub use tessera_replica_protocol::sync::{DirtyMap, Membership};

/// File name of the dirty-region bitmap in a store directory.
pub const DIRTY_FILE: &str = "dirty-regions";
/// File name of the membership record in a store directory.
pub const MEMBERSHIP_FILE: &str = "in-sync";

/// Why the sync state could not be read or made durable.
#[derive(Debug, thiserror::Error)]
pub enum SyncStateError {
    /// Reading or writing one of the files failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl SyncStateError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| SyncStateError::Io {
            action,
            path: path.display().to_string(),
            source,
        }
    }
}

/// A volume replica's sync state: its dirty regions, its membership record, and
/// the fence that orders writes against epoch raises.
#[derive(Debug)]
pub struct SyncState {
    /// The activity log.
    pub dirty: DirtyRegions,
    /// The in-sync set as last declared by an engine.
    pub membership: MembershipFile,
    /// Held shared by every data-plane mutation from its epoch check until it is
    /// applied, and taken exclusively once by whoever raised the epoch, right after
    /// publishing it: so when a raise returns, no write of an older epoch is still on
    /// its way to the store (it either finished first or is refused).
    pub epoch_fence: tokio::sync::RwLock<()>,
    /// CLAIMs so far (in memory: a restart ends every connection anyway). A write or
    /// trim is admitted only on the connection holding the latest one, or on any
    /// connection while there was none (the data-plane protocol's CLAIM).
    claims: AtomicU64,
}

impl SyncState {
    /// Loads the state kept in `dir` for a volume of `size` bytes. Never fails: a
    /// missing dirty map is a clean one (a new volume), an unreadable or damaged one
    /// marks every region dirty (the safe side), and a damaged membership record
    /// reads as "no declaration yet", which a new engine resolves with the other
    /// replicas' records.
    pub fn load(dir: &Path, size: u64) -> SyncState {
        SyncState {
            dirty: DirtyRegions::load(&dir.join(DIRTY_FILE), size),
            membership: MembershipFile::load(&dir.join(MEMBERSHIP_FILE)),
            epoch_fence: tokio::sync::RwLock::new(()),
            claims: AtomicU64::new(0),
        }
    }

    /// Takes a new claim for a connection and returns its number, once every write
    /// admitted under an earlier claim (or none) has been applied: from then on only
    /// the holder of this number may write ([`Self::superseded`]). `None`, and no
    /// claim, if `current` (checked once those writes are done) says the connection's
    /// epoch was raised meanwhile: a fenced engine must not shut out its successor.
    pub async fn claim(&self, current: impl FnOnce() -> bool) -> Option<u64> {
        // Writes check the count under the fence, so taking it exclusively waits for
        // every one admitted so far, and those after it see the new count.
        let _fence = self.epoch_fence.write().await;
        current().then(|| self.claims.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Whether a connection holding claim `held` (0: it never claimed) has been
    /// superseded by a later claim. Check under the fence, like the epoch.
    pub fn superseded(&self, held: u64) -> bool {
        self.claims.load(Ordering::SeqCst) > held
    }

    /// Waits until every mutation admitted under an older epoch has been applied.
    /// Call after the new epoch is visible; blocking (the catalog's raise runs on a
    /// blocking thread). Parks the thread rather than using tokio's blocking lock,
    /// which refuses runtime threads even when nothing is held.
    pub fn drain_older_epochs_blocking(&self) {
        drop(crate::park::block_on(self.epoch_fence.write()));
    }

    /// [`Self::drain_older_epochs_blocking`] for async callers.
    pub async fn drain_older_epochs(&self) {
        drop(self.epoch_fence.write().await);
    }
}
