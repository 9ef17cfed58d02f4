//! Volume records as the controller sees them: the in-memory index, filled from the
//! replicas when a record is missing, and the quorum reads and compare-and-set writes
//! ([`crate::quorum`]) every record mutation goes through, keeping the index in step.
//!
//! The index is updated after the replicas, never before, so a crash in between loses
//! nothing: the next start rebuilds it from the records.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tessera_replica_protocol::control_proto::{
    Attachment, CopySource, CreateVolumeRequest, ReplicaRef, UpdateVolumeRequest, VolumeRecord,
};

use crate::error::ControllerError;
use crate::quorum::{self, majority, Committed, Op, Plan, QuorumError, Reads, RecordWrite};
use crate::replica_pool::{join_all, ReplicaPool};
use crate::volume_index::{is_volume_id, VolumeIndex};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// Now, in nanoseconds since the Unix epoch (record timestamps).
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The CreateVolume that makes a member of `rec` (its immutable fields and current
/// set) with `copy_source`, starting at `epoch`: a create a crashed controller did not
/// finish, or a rebuild.
pub fn member_create_request(
    rec: &VolumeRecord,
    copy_source: Option<CopySource>,
    epoch: u64,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_id: rec.volume_id.clone(),
        name: rec.name.clone(),
        size_bytes: rec.size_bytes,
        replication_factor: rec.replication_factor,
        replicas: rec.replicas.clone(),
        parameters: rec.parameters.clone(),
        created_unix_nanos: rec.created_unix_nanos,
        access_type: rec.access_type.clone(),
        copy_source,
        epoch,
    }
}

/// Loads every record from every live daemon into a fresh index (highest generation
/// wins); returns the index and how many daemons could not be listed.
pub async fn load_index(pool: &ReplicaPool) -> (VolumeIndex, usize) {
    let live = pool.live();
    let lists = join_all(live.iter().map(|(addr, _)| pool.list_volumes(addr))).await;
    let mut failed = 0;
    let index = VolumeIndex::default();
    for ((addr, _), r) in live.iter().zip(lists) {
        match r {
            Ok(records) => records.into_iter().for_each(|rec| index.merge(rec)),
            Err(e) => {
                failed += 1;
                tracing::warn!(address = %addr, error = %e.message(), "listing volumes of replica daemon failed");
            }
        }
    }
    (index, failed)
}

/// The replica pool and the record index, shared by everything that reads or
/// changes volume records.
#[derive(Debug, Clone)]
pub struct Volumes {
    pool: Arc<ReplicaPool>,
    index: Arc<VolumeIndex>,
    /// Copies this controller knows are garbage, as (volume, node): members replaced
    /// while lost, and members a DeleteVolume did not reach. Collected when their
    /// daemons answer again (`crate::heal`).
    forsaken: Arc<Mutex<BTreeSet<(String, String)>>>,
}

impl Volumes {
    /// Records of the daemons in `pool`, indexed in `index` (see
    /// [`crate::load_index`]).
    pub fn new(pool: Arc<ReplicaPool>, index: Arc<VolumeIndex>) -> Self {
        Self {
            pool,
            index,
            forsaken: Arc::default(),
        }
    }

    /// Notes that the copy of `volume_id` on `node_id` is garbage: the member was
    /// replaced, or the volume's deletion did not reach it.
    pub fn forsake(&self, volume_id: &str, node_id: &str) {
        self.forsaken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((volume_id.to_string(), node_id.to_string()));
    }

    /// Whether [`Self::forsake`] named this copy.
    pub fn is_forsaken(&self, volume_id: &str, node_id: &str) -> bool {
        self.forsaken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(volume_id.to_string(), node_id.to_string()))
    }

    /// The replica daemons.
    pub fn pool(&self) -> &ReplicaPool {
        &self.pool
    }

    /// The record index.
    pub fn index(&self) -> &VolumeIndex {
        &self.index
    }

    /// The replicas of `rec` with their current addresses.
    pub fn replicas(&self, rec: &VolumeRecord) -> Vec<ReplicaRef> {
        rec.replicas
            .iter()
            .map(|r| self.pool.resolve_ref(r))
            .collect()
    }

    /// The record of `volume_id`: from the index, else from any live daemon (lazy
    /// refresh after another controller instance or a daemon that was down at start).
    pub async fn lookup(&self, volume_id: &str) -> Option<VolumeRecord> {
        if let Some(r) = self.index.get(volume_id) {
            return Some(r);
        }
        if !is_volume_id(volume_id) {
            return None;
        }
        let live = self.pool.live();
        let answers = join_all(
            live.iter()
                .map(|(addr, _)| self.pool.get_volume(addr, volume_id)),
        )
        .await;
        let records: Vec<VolumeRecord> = answers
            .into_iter()
            .filter_map(|a| a.ok())
            .filter(|r| r.volume_id == volume_id)
            .collect();
        let found = quorum::newest(&records)?.clone();
        self.index.merge(found.clone());
        Some(found)
    }

    /// [`Self::lookup`], NOT_FOUND when there is no such volume.
    pub async fn require(&self, volume_id: &str) -> Result<VolumeRecord> {
        self.lookup(volume_id)
            .await
            .ok_or_else(|| ControllerError::VolumeNotFound(volume_id.to_string()))
    }

    /// GetVolume on every replica of `rec`, in parallel.
    pub async fn read(&self, rec: &VolumeRecord) -> Reads {
        quorum::read(&self.pool, &rec.volume_id, &self.replicas(rec)).await
    }

    /// The current record as a majority of the replicas that answered `reads` see it;
    /// a volume a majority lacks leaves the index.
    pub fn current(&self, rec: &VolumeRecord, reads: &Reads) -> Result<VolumeRecord> {
        reads
            .current(&rec.volume_id)
            .map_err(|e| self.forget_missing(e))
    }

    /// A compare-and-set on the replicas of `rec` ([`quorum::compare_and_set`]); a
    /// volume a majority lacks leaves the index.
    pub async fn compare_and_set<P>(&self, rec: &VolumeRecord, op: Op, plan: P) -> Result<Committed>
    where
        P: FnMut(&VolumeRecord, &Reads) -> Result<Plan>,
    {
        let replicas = self.replicas(rec);
        quorum::compare_and_set(&self.pool, &rec.volume_id, &replicas, op, plan)
            .await
            .map_err(|e| match e {
                ControllerError::Quorum(q) => self.forget_missing(q),
                other => other,
            })
    }

    fn forget_missing(&self, e: QuorumError) -> ControllerError {
        if let QuorumError::VolumeNotFound { volume } = &e {
            self.index.remove(volume);
        }
        e.into()
    }

    /// Sets the attachments to `change(current)` on a majority of replicas.
    /// `change` returning `None` means "keep", which still repairs replicas that lag
    /// behind the majority view.
    pub async fn update_attachments<F>(&self, rec: &VolumeRecord, change: F) -> Result<VolumeRecord>
    where
        F: Fn(&[Attachment]) -> Option<Vec<Attachment>>,
    {
        self.update_record(rec, |cur| {
            Ok(change(&cur.attachments).map(|att| (att, cur.parameters.clone())))
        })
        .await
    }

    /// Sets a volume's attachments and parameters to `change(current record)` on a
    /// majority of replicas with compare-and-set on each replica's generation.
    /// `change` returning `Ok(None)` means "keep", which still repairs replicas that
    /// lag behind the majority view; an error aborts before anything is written.
    pub async fn update_record<F>(&self, rec: &VolumeRecord, change: F) -> Result<VolumeRecord>
    where
        F: Fn(&VolumeRecord) -> Result<Option<(Vec<Attachment>, HashMap<String, String>)>>,
    {
        self.update_to(rec, |cur| {
            Ok(change(cur)?.map(|(attachments, parameters)| RecordTarget {
                attachments,
                parameters,
                replicas: cur.replicas.clone(),
            }))
        })
        .await
    }

    /// Replaces the replica set of `rec` with `replicas` on a majority of its current
    /// replicas (a lost member swapped for its replacement), keeping attachments and
    /// parameters as the majority holds them. Only while the set is still the one
    /// `rec` holds: a set another controller changed meanwhile is ABORTED, never
    /// overwritten (two healers must not each install their own replacement).
    pub async fn replace_replicas(
        &self,
        rec: &VolumeRecord,
        replicas: Vec<ReplicaRef>,
    ) -> Result<VolumeRecord> {
        self.update_to(rec, |cur| {
            if cur.replicas == replicas {
                return Ok(None);
            }
            if cur.replicas != rec.replicas {
                return Err(ControllerError::ReplicaSetChanged {
                    volume: rec.volume_id.clone(),
                });
            }
            Ok(Some(RecordTarget {
                attachments: cur.attachments.clone(),
                parameters: cur.parameters.clone(),
                replicas: replicas.clone(),
            }))
        })
        .await
    }

    /// The compare-and-set of [`Self::update_record`] and [`Self::replace_replicas`]:
    /// `target(current)` (or `None`: keep, and repair replicas that lag behind).
    async fn update_to<F>(&self, rec: &VolumeRecord, target: F) -> Result<VolumeRecord>
    where
        F: Fn(&VolumeRecord) -> Result<Option<RecordTarget>>,
    {
        let op = Op::Update {
            volume: rec.volume_id.clone(),
        };
        let committed = self
            .compare_and_set(rec, op, |cur, reads| {
                let wanted = target(cur)?;
                let changing = wanted.is_some();
                let wanted = wanted.unwrap_or_else(|| RecordTarget {
                    attachments: cur.attachments.clone(),
                    parameters: cur.parameters.clone(),
                    replicas: cur.replicas.clone(),
                });
                let in_sync = reads.ok().filter(|(_, r)| wanted.held_by(r)).count();
                if !changing && in_sync >= majority(reads.total()) {
                    return Ok(Plan::Done);
                }
                let writes = reads
                    .ok()
                    .filter(|(_, r)| changing || !wanted.held_by(r))
                    .map(|(replica, r)| {
                        let write = UpdateVolumeRequest {
                            volume_id: rec.volume_id.clone(),
                            expected_generation: r.generation,
                            attachments: wanted.attachments.clone(),
                            parameters: wanted.parameters.clone(),
                            // Sent only where it differs: a record from before data
                            // addresses were recorded keeps working for other updates.
                            replicas: if r.replicas == wanted.replicas {
                                Vec::new()
                            } else {
                                wanted.replicas.clone()
                            },
                        };
                        (replica.clone(), RecordWrite::Update(write))
                    })
                    .collect();
                Ok(Plan::Write {
                    writes,
                    already: if changing { 0 } else { in_sync },
                })
            })
            .await?;
        let newest = committed.newest();
        self.index.upsert(newest.clone());
        Ok(newest)
    }
}

/// The mutable part of a record an update writes.
struct RecordTarget {
    attachments: Vec<Attachment>,
    parameters: HashMap<String, String>,
    replicas: Vec<ReplicaRef>,
}

impl RecordTarget {
    fn held_by(&self, r: &VolumeRecord) -> bool {
        r.attachments == self.attachments
            && r.parameters == self.parameters
            && r.replicas == self.replicas
    }
}
