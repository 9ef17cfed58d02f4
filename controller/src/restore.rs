//! Restore and clone (CreateVolume with a content source), from the controller's side.
//!
//! The controller never moves blocks. It places the new volume like any other and
//! sends every chosen replica a CreateVolume carrying a [`CopySource`]: the sealed
//! snapshot, the daemons holding it and the source's replication factor. Each target
//! daemon pulls the sealed copies of a majority of the holders itself and merges them
//! block by block keeping the highest seq. The controller then polls the new
//! replicas' records until every one reports its copy complete, bounded by
//! `--copy-wait`; past that the call is ABORTED with the progress, and the CO's retry
//! (same name, same source) waits again and returns the same volume.
//!
//! A clone first seals an internal snapshot of the source volume (`tc-…`, its record
//! named after the clone's volume id), restores it with `clone = true`, and deletes it
//! once every replica is complete. Internal snapshots whose clone completed or no
//! longer exists are swept at controller start and opportunistically.
//!
//! [`Restorer`] does all of it for the controller service: it holds the volume records,
//! the per-volume locks and the copy wait, and hides internal snapshots from the
//! service's snapshot listings.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_csi_proto::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use tessera_csi_proto::v1::{CapacityRange, VolumeContentSource};
use tessera_replica_protocol::control_proto::{CopySource, ReplicaRef, VolumeRecord};

use crate::capacity;
use crate::error::ControllerError;
use crate::fs_type::FsType;
use crate::locks::{KeyGuard, KeyedLocks};
use crate::quorum::{majority, ReplicaFailure};
use crate::snapshots::{self, is_internal, FoundSnapshot};
use crate::volume_index::is_volume_id;
use crate::volumes::{now_nanos, Volumes};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// First pause between two progress polls; doubles up to [`MAX_POLL_PAUSE`].
const FIRST_POLL_PAUSE: Duration = Duration::from_millis(25);
/// Longest pause between two progress polls.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(500);

/// What a CreateVolume asks its volume to be populated from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedSource {
    /// Restore: a snapshot id.
    Snapshot(String),
    /// Clone: a volume id.
    Volume(String),
}

impl RequestedSource {
    /// The source of a CreateVolume request; `None` for an empty volume. A source
    /// naming nothing is INVALID_ARGUMENT.
    pub fn from_csi(source: Option<&VolumeContentSource>) -> Result<Option<Self>> {
        let Some(source) = source else {
            return Ok(None);
        };
        let (field, id, make): (&'static str, &str, fn(String) -> Self) = match &source.r#type {
            Some(SourceType::Snapshot(s)) => (
                "volume_content_source.snapshot.snapshot_id",
                &s.snapshot_id,
                Self::Snapshot,
            ),
            Some(SourceType::Volume(v)) => (
                "volume_content_source.volume.volume_id",
                &v.volume_id,
                Self::Volume,
            ),
            None => return Err(ControllerError::EmptyContentSource),
        };
        if id.is_empty() {
            return Err(ControllerError::Missing { field });
        }
        Ok(Some(make(id.to_string())))
    }
}

/// Whether an existing volume populated from `existing` (`None`: created empty) has
/// the source a repeated CreateVolume asks for: another source is ALREADY_EXISTS.
pub fn same_source(requested: Option<&RequestedSource>, existing: Option<&CopySource>) -> bool {
    match (requested, existing) {
        (None, None) => true,
        (Some(RequestedSource::Snapshot(id)), Some(c)) => !c.clone && c.snapshot_id == *id,
        (Some(RequestedSource::Volume(id)), Some(c)) => c.clone && c.source_volume_id == *id,
        _ => false,
    }
}

/// The CSI content source of a volume populated from `copy` (what CreateVolume,
/// ListVolumes and ControllerGetVolume report, also on repeats).
pub fn content_source(copy: &CopySource) -> VolumeContentSource {
    let r#type = if copy.clone {
        SourceType::Volume(VolumeSource {
            volume_id: copy.source_volume_id.clone(),
        })
    } else {
        SourceType::Snapshot(SnapshotSource {
            snapshot_id: copy.snapshot_id.clone(),
        })
    };
    VolumeContentSource {
        r#type: Some(r#type),
    }
}

/// A restore or clone checked and ready to place.
pub struct PreparedCopy<'a> {
    /// Size of the new volume.
    pub size: u64,
    /// What every replica of the new volume is populated from.
    pub copy: CopySource,
    /// The source volume's lock (and a restored snapshot's), held until the new
    /// volume is in the index.
    pub guards: Vec<KeyGuard<'a>>,
    /// Placement ids of every daemon holding the snapshot: placement takes them first,
    /// because a target that holds the snapshot shares its sealed layers (instant)
    /// instead of copying them.
    pub holder_daemons: Vec<String>,
}

/// "restoring from snapshot X" / "cloning volume Y": the subject of progress messages.
pub fn describe(copy: &CopySource) -> String {
    if copy.clone {
        format!("cloning volume {}", copy.source_volume_id)
    } else {
        format!("restoring from snapshot {}", copy.snapshot_id)
    }
}

/// The size of a volume populated from a source of `source_size` bytes: the source's
/// size without a capacity range (or with only a limit); a required size below the
/// source's, or a limit below it, is OUT_OF_RANGE.
///
/// Like any volume that may be mounted, a copy is at least the minimum of its
/// filesystem `filesystem` (`None`: raw block only), rounded up within the limit
/// ([`capacity::raise_to_filesystem_minimum`]). A source created through Tessera as a
/// mount volume is already that large; a smaller one (a raw block volume, or one
/// created before the minimum existed) holds no such filesystem, and the node will
/// have to mkfs the copy.
pub fn copy_size(
    range: Option<&CapacityRange>,
    source_size: u64,
    filesystem: Option<FsType>,
) -> Result<u64> {
    // Validates signs and the range itself the way a plain create does.
    let resolved = capacity::resolve_size(range)?;
    let (required, limit) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    let size = if required == 0 { source_size } else { resolved };
    if size < source_size {
        return Err(ControllerError::CopySmallerThanSource {
            requested: size,
            source_size,
        });
    }
    if limit != 0 && u64::try_from(limit).unwrap_or(0) < size {
        return Err(ControllerError::CopyLimitBelowSource { limit, source_size });
    }
    capacity::raise_to_filesystem_minimum(size, range, filesystem).map_err(ControllerError::from)
}

/// Copy progress over the replicas of a restored or cloned volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStatus {
    /// Every replica reports its copy complete.
    pub complete: bool,
    /// Bytes copied, summed over the replicas.
    pub done_bytes: u64,
    /// Bytes to copy, summed over the replicas.
    pub total_bytes: u64,
    /// Per replica trouble: unreachable, or the error its copy is retrying past.
    pub problems: Vec<String>,
}

impl CopyStatus {
    /// Judges the answers of a volume's replicas to GetVolume. A replica that did not
    /// answer counts as complete only when `unreachable_complete` (the controller saw
    /// the copy finish before), never otherwise: its copy may still need the source.
    pub fn of(
        copy: &CopySource,
        answers: &[(
            ReplicaRef,
            std::result::Result<VolumeRecord, ReplicaFailure>,
        )],
        unreachable_complete: bool,
    ) -> Self {
        let mut s = CopyStatus {
            complete: !answers.is_empty(),
            ..Default::default()
        };
        for (r, answer) in answers {
            let (done, total, complete) = match answer {
                Ok(rec) => match &rec.copy {
                    Some(p) => {
                        if !p.last_error.is_empty() && !p.complete {
                            s.problems.push(format!("{}: {}", r.node_id, p.last_error));
                        }
                        (p.done_bytes, p.total_bytes, p.complete)
                    }
                    None => (0, copy.size_bytes, false),
                },
                Err(e) => {
                    s.problems.push(format!("{}: {e}", r.node_id));
                    if unreachable_complete {
                        (copy.size_bytes, copy.size_bytes, true)
                    } else {
                        (0, copy.size_bytes, false)
                    }
                }
            };
            s.done_bytes = s.done_bytes.saturating_add(done.min(total));
            s.total_bytes = s.total_bytes.saturating_add(total);
            s.complete &= complete;
        }
        s
    }

    /// Whole percent copied (100 when there is nothing to copy).
    pub fn percent(&self) -> u64 {
        if self.total_bytes == 0 {
            return 100;
        }
        let p = u128::from(self.done_bytes) * 100 / u128::from(self.total_bytes);
        u64::try_from(p).unwrap_or(100)
    }

    /// "restoring from snapshot X: 43% (n/m bytes)", plus any replica trouble.
    pub fn message(&self, copy: &CopySource) -> String {
        let mut m = format!(
            "{}: {}% ({}/{} bytes)",
            describe(copy),
            self.percent(),
            self.done_bytes,
            self.total_bytes
        );
        if !self.problems.is_empty() {
            m.push_str("; ");
            m.push_str(&self.problems.join("; "));
        }
        m
    }
}

/// Restores and clones for the controller service: checks sources, waits for copies,
/// and keeps the clones' internal snapshots out of sight and swept.
#[derive(Debug, Clone)]
pub struct Restorer {
    volumes: Volumes,
    locks: Arc<KeyedLocks>,
    copy_wait: Duration,
    /// Set while a background sweep of internal clone snapshots runs.
    sweeping: Arc<AtomicBool>,
}

impl Restorer {
    /// A restorer over `volumes`, taking the service's per-volume `locks`, waiting up
    /// to `copy_wait` for a copy (`--copy-wait`).
    pub fn new(volumes: Volumes, locks: Arc<KeyedLocks>, copy_wait: Duration) -> Self {
        Self {
            volumes,
            locks,
            copy_wait,
            sweeping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Every user snapshot the live daemons hold, by id; internal clone snapshots are
    /// left out, since no CSI call may see them. Fails when no daemon answers at all.
    pub async fn user_snapshots(&self) -> Result<BTreeMap<String, FoundSnapshot>> {
        let mut all = snapshots::scan(self.volumes.pool()).await?;
        let before = all.len();
        all.retain(|id, _| !is_internal(id));
        if all.len() != before {
            self.sweep_in_background();
        }
        Ok(all)
    }

    /// Starts a sweep of internal clone snapshots unless one is running: seeing one
    /// is the opportunity to drop those whose clone is done.
    fn sweep_in_background(&self) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let restorer = self.clone();
        tokio::spawn(async move {
            restorer.sweep_clone_snapshots().await;
            restorer.sweeping.store(false, Ordering::Release);
        });
    }

    /// Checks the source of a new volume `volume_id` and returns its size, the
    /// `CopySource` for its replicas and the source volume's lock, which the caller
    /// holds until the replicas are created: DeleteSnapshot takes that lock too, so it
    /// either runs first (and the restore finds no snapshot) or sees the new volume
    /// in the index (and refuses). A restore needs a ready snapshot; a clone seals the
    /// internal snapshot of the source volume first, as CreateSnapshot does. Nothing
    /// is created on any daemon when the source does not exist.
    pub async fn prepare_copy(
        &self,
        source: &RequestedSource,
        volume_id: &str,
        range: Option<&CapacityRange>,
        filesystem: Option<FsType>,
    ) -> Result<PreparedCopy<'_>> {
        let (found, guards) = match source {
            RequestedSource::Snapshot(id) => {
                let missing = || ControllerError::SnapshotNotFound(id.clone());
                let source_volume = self
                    .user_snapshots()
                    .await?
                    .remove(id)
                    .ok_or_else(missing)?
                    .record
                    .source_volume_id;
                // A volume restored under the id of its deleted source already holds
                // that lock. DeleteSnapshot takes the snapshot's lock (not the
                // volume's, so it does not hold up snapshots of the volume while the
                // daemons merge): held here too, it sees this restore or runs first.
                let mut guards = Vec::with_capacity(2);
                if source_volume != volume_id {
                    guards.push(self.locks.lock(&source_volume).await);
                }
                guards.push(self.locks.lock(id).await);
                // Looked up again under the locks: a DeleteSnapshot may have run first.
                let found = self
                    .user_snapshots()
                    .await?
                    .remove(id)
                    .ok_or_else(missing)?;
                if !found.ready() {
                    return Err(ControllerError::SnapshotNotReady {
                        snapshot: id.clone(),
                        sealed: found.holders.len(),
                        needed: found.quorum(),
                    });
                }
                (found, guards)
            }
            RequestedSource::Volume(src) => {
                let rec = self.volumes.require(src).await?;
                copy_size(range, rec.size_bytes, filesystem)?;
                self.check_copy_done(&rec).await?;
                let snapshot_id = snapshots::clone_snapshot_id(volume_id);
                let guards = vec![self.locks.lock(src).await];
                let found = snapshots::seal(
                    self.volumes.pool(),
                    &rec,
                    &snapshot_id,
                    volume_id,
                    now_nanos(),
                )
                .await?;
                (found, guards)
            }
        };
        let clone = matches!(source, RequestedSource::Volume(_));
        let size = match copy_size(range, found.record.size_bytes, filesystem) {
            Ok(size) => size,
            Err(e) => {
                if clone {
                    // The source grew while it was sealed: the sealed copy is useless.
                    self.drop_internal_snapshot(&found.record.snapshot_id).await;
                }
                return Err(e);
            }
        };
        let holder_daemons = found
            .holders
            .iter()
            .map(|h| {
                let h = self.volumes.pool().resolve_ref(h);
                crate::placement::daemon_id(&h.node_id, &h.control_address)
            })
            .collect();
        let copy = CopySource {
            snapshot_id: found.record.snapshot_id.clone(),
            source_volume_id: found.record.source_volume_id.clone(),
            source_replication_factor: found.record.replication_factor,
            holders: self.copy_holders(&found.holders, found.record.replication_factor),
            size_bytes: found.record.size_bytes,
            clone,
            rebuild: false,
            fence_epoch: 0,
        };
        Ok(PreparedCopy {
            size,
            copy,
            guards,
            holder_daemons,
        })
    }

    /// The holders every replica of a new volume copies from: the same majority of
    /// the source's replication factor for all of them, live ones first, in node order.
    /// Sealed copies differ only in writes in flight while the snapshot was taken, and
    /// each target keeps the highest seq of the copies it reads, so targets that read
    /// different sets could end up disagreeing on such a block; one fixed set makes
    /// every target merge the same copies. A listed holder that dies mid-copy stalls
    /// the copy until it is back (its progress is kept), rather than risk that.
    fn copy_holders(&self, holders: &[ReplicaRef], replication_factor: u32) -> Vec<ReplicaRef> {
        let pool = self.volumes.pool();
        let mut refs: Vec<ReplicaRef> = holders.iter().map(|h| pool.resolve_ref(h)).collect();
        refs.sort_by(|a, b| {
            let down = |r: &ReplicaRef| !pool.is_live(r);
            (down(a), &a.node_id, &a.control_address).cmp(&(
                down(b),
                &b.node_id,
                &b.control_address,
            ))
        });
        refs.truncate(majority(replication_factor as usize).max(1));
        refs
    }

    /// Refuses to snapshot or clone a volume whose own restore is not complete yet:
    /// its sealed layers would miss the blocks still being copied (UNAVAILABLE, so the
    /// CO retries).
    pub async fn check_copy_done(&self, rec: &VolumeRecord) -> Result<()> {
        let Some(copy) = rec.copy_source.as_ref() else {
            return Ok(());
        };
        let status = self.copy_status(rec, copy).await;
        if status.complete {
            return Ok(());
        }
        Err(ControllerError::NotPopulated {
            volume: rec.volume_id.clone(),
            progress: status.message(copy),
        })
    }

    /// Waits (up to `--copy-wait`) until every replica of `rec` reports its copy
    /// complete, then drops a clone's internal snapshot and returns the fresh record.
    /// Past the wait: ABORTED with the progress; the CO retries.
    pub async fn finish_copy(&self, rec: VolumeRecord) -> Result<VolumeRecord> {
        let Some(copy) = rec.copy_source.clone() else {
            return Ok(rec);
        };
        let deadline = Instant::now() + self.copy_wait;
        let mut pause = FIRST_POLL_PAUSE;
        loop {
            let reads = self.volumes.read(&rec).await;
            let status = CopyStatus::of(&copy, reads.all(), false);
            if status.complete {
                let fresh = reads.freshest().unwrap_or(rec);
                self.volumes.index().upsert(fresh.clone());
                if copy.clone {
                    // In the background: the merge that deletes it on the daemons can
                    // take longer than a CO waits for this answer, and the clone is
                    // ready now. A failed deletion is retried by the sweep.
                    let restorer = self.clone();
                    let id = copy.snapshot_id.clone();
                    tokio::spawn(async move { restorer.drop_internal_snapshot(&id).await });
                }
                tracing::info!(volume = %fresh.volume_id, source = %describe(&copy), "volume populated");
                return Ok(fresh);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControllerError::CopyPending {
                    volume: rec.volume_id.clone(),
                    progress: status.message(&copy),
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }

    /// The copy progress of `rec` over all its replicas, right now.
    async fn copy_status(&self, rec: &VolumeRecord, copy: &CopySource) -> CopyStatus {
        let reads = self.volumes.read(rec).await;
        // The index holds a complete copy only once this controller (or the record it
        // loaded) saw it complete.
        let seen_complete = rec.copy.as_ref().is_some_and(|c| c.complete);
        let status = CopyStatus::of(copy, reads.all(), seen_complete);
        if status.complete && reads.ok_count() == reads.total() {
            if let Some(fresh) = reads.freshest() {
                self.volumes.index().merge(fresh);
            }
        }
        status
    }

    /// The volume still being populated from `snapshot_id`, with its progress: while
    /// one exists the snapshot is in use and DeleteSnapshot is FAILED_PRECONDITION.
    pub async fn restore_in_progress(&self, snapshot_id: &str) -> Option<String> {
        let candidates: Vec<VolumeRecord> = self
            .volumes
            .index()
            .all()
            .into_iter()
            .filter(|r| {
                r.copy_source
                    .as_ref()
                    .is_some_and(|c| c.snapshot_id == snapshot_id)
            })
            .collect();
        for rec in candidates {
            let Some(copy) = rec.copy_source.as_ref() else {
                continue;
            };
            let status = self.copy_status(&rec, copy).await;
            if !status.complete {
                return Some(format!(
                    "volume {} ({})",
                    rec.volume_id,
                    status.message(copy)
                ));
            }
        }
        None
    }

    /// Deletes the internal snapshot `snapshot_id` from every daemon holding it; best
    /// effort (a failure is logged and left to the sweep).
    pub async fn drop_internal_snapshot(&self, snapshot_id: &str) {
        let pool = self.volumes.pool();
        let found = match snapshots::scan(pool).await {
            Ok(mut all) => all.remove(snapshot_id),
            Err(e) => {
                tracing::warn!(snapshot = %snapshot_id, error = %e, "cannot list snapshots to drop a clone's internal snapshot");
                return;
            }
        };
        let Some(found) = found else { return };
        match snapshots::delete(pool, &found).await {
            Ok(()) => tracing::info!(snapshot = %snapshot_id, "internal clone snapshot deleted"),
            Err(e) => {
                tracing::warn!(snapshot = %snapshot_id, error = %e, "deleting a clone's internal snapshot failed; the sweep retries")
            }
        }
    }

    /// Deletes internal clone snapshots that are no longer needed: their clone is
    /// complete on every replica, or the clone volume no longer exists (judged only
    /// while every known daemon answers, so a down daemon cannot hide a clone that
    /// still copies). Runs under each clone's volume lock, so an in-flight clone is
    /// never swept. Returns how many were deleted.
    pub async fn sweep_clone_snapshots(&self) -> usize {
        let pool = self.volumes.pool();
        let all = match snapshots::scan(pool).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "sweeping internal clone snapshots: listing failed");
                return 0;
            }
        };
        let mut deleted = 0;
        for found in all
            .into_values()
            .filter(|f| is_internal(&f.record.snapshot_id))
        {
            let clone_id = found.record.name.clone();
            if !is_volume_id(&clone_id) {
                tracing::warn!(snapshot = %found.record.snapshot_id, name = %clone_id, "internal snapshot does not name a clone volume; kept");
                continue;
            }
            let _guard = self.locks.lock(&clone_id).await;
            let obsolete = match self.volumes.lookup(&clone_id).await {
                None => pool.daemons().iter().all(|d| d.live),
                Some(rec) => match rec.copy_source.as_ref() {
                    Some(c) if c.snapshot_id == found.record.snapshot_id => {
                        self.copy_status(&rec, c).await.complete
                    }
                    // The volume of that id was made from something else (the clone was
                    // rolled back and the name reused): the snapshot serves nobody.
                    _ => true,
                },
            };
            if !obsolete {
                continue;
            }
            match snapshots::delete(pool, &found).await {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(snapshot = %found.record.snapshot_id, clone = %clone_id, "swept internal clone snapshot");
                }
                Err(e) => {
                    tracing::warn!(snapshot = %found.record.snapshot_id, error = %e, "sweeping internal clone snapshot failed")
                }
            }
        }
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs_type::MinVolumeSize;
    use tessera_replica_protocol::control_proto::CopyProgress;

    fn copy(clone: bool) -> CopySource {
        CopySource {
            snapshot_id: "ts-1".into(),
            source_volume_id: "tv-1".into(),
            source_replication_factor: 3,
            holders: vec![],
            size_bytes: 100,
            clone,
            ..Default::default()
        }
    }

    fn node(n: &str) -> ReplicaRef {
        ReplicaRef {
            node_id: n.into(),
            ..Default::default()
        }
    }

    fn rec(done: u64, complete: bool, err: &str) -> VolumeRecord {
        VolumeRecord {
            copy: Some(CopyProgress {
                done_bytes: done,
                total_bytes: 100,
                complete,
                last_error: err.into(),
                shared_layers: false,
                epoch_floor: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sources_are_parsed_and_compared() {
        let snap = VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: "ts-1".into(),
            })),
        };
        let vol = VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource {
                volume_id: "tv-1".into(),
            })),
        };
        let s = RequestedSource::from_csi(Some(&snap)).unwrap();
        let v = RequestedSource::from_csi(Some(&vol)).unwrap();
        assert_eq!(s, Some(RequestedSource::Snapshot("ts-1".into())));
        assert_eq!(RequestedSource::from_csi(None).unwrap(), None);
        let empty = VolumeContentSource { r#type: None };
        assert!(RequestedSource::from_csi(Some(&empty)).is_err());
        let blank = VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource::default())),
        };
        assert!(RequestedSource::from_csi(Some(&blank)).is_err());

        assert!(same_source(s.as_ref(), Some(&copy(false))));
        assert!(!same_source(s.as_ref(), Some(&copy(true))));
        assert!(same_source(v.as_ref(), Some(&copy(true))));
        assert!(!same_source(v.as_ref(), None));
        assert!(!same_source(None, Some(&copy(false))));
        assert!(same_source(None, None));
        assert_eq!(content_source(&copy(false)), snap);
        assert_eq!(content_source(&copy(true)), vol);
    }

    #[test]
    fn copy_size_defaults_to_the_source_and_refuses_less() {
        let range = |required, limit| CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(copy_size(None, 8192, None).unwrap(), 8192);
        assert_eq!(copy_size(Some(&range(0, 0)), 8192, None).unwrap(), 8192);
        assert_eq!(
            copy_size(Some(&range(0, 1 << 20)), 8192, None).unwrap(),
            8192
        );
        assert_eq!(copy_size(Some(&range(8193, 0)), 8192, None).unwrap(), 12288);
        let small = copy_size(Some(&range(4096, 0)), 8192, None).unwrap_err();
        assert_eq!(small.code(), tonic::Code::OutOfRange);
        let capped = copy_size(Some(&range(0, 4096)), 8192, None).unwrap_err();
        assert_eq!(capped.code(), tonic::Code::OutOfRange);
        let negative = copy_size(Some(&range(-1, 0)), 8192, None).unwrap_err();
        assert_eq!(negative.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn copy_size_respects_the_filesystem_minimum() {
        let range = |required, limit| CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        let xfs = Some(FsType::Xfs);
        let min = FsType::Xfs.min_volume_bytes();
        // A source at or above the minimum keeps its size.
        assert_eq!(copy_size(None, min, xfs).unwrap(), min);
        assert_eq!(copy_size(None, 2 * min, xfs).unwrap(), 2 * min);
        // A smaller source (a raw block volume) grows to the minimum for mkfs...
        assert_eq!(copy_size(None, 64 << 20, xfs).unwrap(), min);
        assert_eq!(
            copy_size(Some(&range(0, min as i64)), 64 << 20, xfs).unwrap(),
            min
        );
        // ... unless the limit forbids it.
        let capped = copy_size(Some(&range(0, 100 << 20)), 64 << 20, xfs).unwrap_err();
        assert_eq!(capped.code(), tonic::Code::OutOfRange);
        assert!(capped.to_string().contains(&min.to_string()), "{capped}");
        // Raw block copies have no minimum.
        assert_eq!(copy_size(None, 64 << 20, None).unwrap(), 64 << 20);
    }

    #[test]
    fn status_needs_every_replica_complete() {
        let c = copy(false);
        let all = vec![
            (node("n1"), Ok(rec(100, true, ""))),
            (node("n2"), Ok(rec(100, true, ""))),
        ];
        let s = CopyStatus::of(&c, &all, false);
        assert!(s.complete);
        assert_eq!(s.percent(), 100);

        let partial = vec![
            (node("n1"), Ok(rec(100, true, ""))),
            (node("n2"), Ok(rec(30, false, "holder n3 refused"))),
            (node("n3"), Err(ReplicaFailure::Unreachable("down".into()))),
        ];
        let s = CopyStatus::of(&c, &partial, false);
        assert!(!s.complete);
        assert_eq!((s.done_bytes, s.total_bytes), (130, 300));
        assert_eq!(s.percent(), 43);
        let m = s.message(&c);
        assert!(
            m.starts_with("restoring from snapshot ts-1: 43% (130/300 bytes)"),
            "{m}"
        );
        assert!(m.contains("n2: holder n3 refused") && m.contains("n3: unreachable: down"));

        // A replica without copy progress (a daemon that ignored copy_source) is not done.
        let none = vec![(node("n1"), Ok(VolumeRecord::default()))];
        assert!(!CopyStatus::of(&c, &none, false).complete);
        // An unreachable replica counts as done only once the copy was seen complete.
        let down = vec![
            (node("n1"), Ok(rec(100, true, ""))),
            (node("n2"), Err(ReplicaFailure::Unreachable("down".into()))),
        ];
        assert!(!CopyStatus::of(&c, &down, false).complete);
        assert!(CopyStatus::of(&c, &down, true).complete);
        assert!(!CopyStatus::of(&c, &[], true).complete);
        assert!(copy(true).clone && describe(&copy(true)).starts_with("cloning volume tv-1"));
    }
}
