//! Snapshots of a store: sealing the head into a snapshot layer, listing them, and
//! deleting one (merging its blocks into the layer above, crash-safely).

use super::*;

impl LayeredStore {
    /// Takes snapshot `snapshot_id`: seals the head as the snapshot's layer and starts
    /// a new empty head. O(1) in the volume size. Taking an existing snapshot again
    /// returns its layer (CreateSnapshot retries must succeed).
    pub fn snapshot(&self, snapshot_id: &str) -> Result<LayerId, StoreError> {
        validate_snapshot_id(snapshot_id)?;
        let _control = self.control();
        let (new_id, nblocks) = {
            let state = self.state_read();
            state.head()?;
            if let Some(slot) = state
                .layers
                .iter()
                .find(|s| !s.shared && s.snapshot_id.as_deref() == Some(snapshot_id))
            {
                if slot.deleting {
                    return Err(StoreError::InvalidSnapshotId {
                        id: snapshot_id.to_string(),
                        reason: "a snapshot with this id is being deleted",
                    });
                }
                return Ok(slot.layer.id);
            }
            (state.next_layer_id, state.size / BLOCK_SIZE)
        };
        // Sync outside the barrier so the one under it has little left to do.
        self.flush()?;
        let new_dir = Layer::dir_of(&self.dir, new_id);
        remove_layer_dir(&new_dir)?;
        let new_head = Arc::new(Layer::create(
            self.factory.as_ref(),
            &self.dir,
            new_id,
            nblocks,
        )?);
        // The chain changes: wait for the data operations running (`locks` module).
        let _gate = self.locks.gate_exclusive_blocking();
        let mut state = self.state_write();
        let sealed = {
            let head = state.head()?;
            let sealed = head.id;
            let mut m = state.manifest();
            m.next_layer_id = new_id + 1;
            if let Some(h) = m.layers.first_mut() {
                h.snapshot_id = Some(snapshot_id.to_string());
            }
            m.layers.insert(
                0,
                ManifestLayer {
                    id: new_id,
                    snapshot_id: None,
                    size_bytes: state.size,
                    deleting: false,
                    shared: false,
                },
            );
            let synced = block_on(head.sync(IoPriority::Foreground));
            if let Err(e) = synced.and_then(|()| self.write_manifest(&m)) {
                drop(state);
                let _ = remove_layer_dir(&new_dir);
                return Err(e);
            }
            sealed
        };
        let size = state.size;
        if let Some(h) = state.layers.last_mut() {
            h.snapshot_id = Some(snapshot_id.to_string());
            h.size = size;
        }
        state.layers.push(Slot {
            layer: new_head,
            snapshot_id: None,
            size,
            deleting: false,
            shared: false,
        });
        state.next_layer_id = new_id + 1;
        Ok(sealed)
    }

    /// Lists live snapshots, oldest first. Only this volume's own: shared base layers
    /// ([`Self::create_sharing`]) are another volume's snapshots.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.state_read()
            .layers
            .iter()
            .filter(|s| !s.deleting && !s.shared)
            .filter_map(|s| {
                s.snapshot_id.as_ref().map(|id| SnapshotInfo {
                    id: id.clone(),
                    layer: s.layer.id,
                    size_bytes: s.size,
                })
            })
            .collect()
    }

    /// Deletes a snapshot while I/O continues: its layer's blocks that the next newer
    /// layer lacks are merged into that layer, then the layer is freed. When it is the
    /// last snapshot of a deleted volume, the volume's directory is removed. While
    /// another deletion of this volume merges, it fails at once with
    /// [`StoreError::MergeInProgress`] (a merge can take minutes; the caller retries).
    pub fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), StoreError> {
        let _merging = match self.merging.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(StoreError::MergeInProgress),
        };
        let control = self.control();
        let layer_id = {
            let state = self.state_read();
            let i = state.find_snapshot(snapshot_id)?;
            let id = state.layers[i].layer.id;
            let mut m = state.manifest();
            if let Some(l) = m.layers.iter_mut().find(|l| l.id == id) {
                l.deleting = true;
            }
            self.write_manifest(&m)?;
            id
        };
        {
            let mut state = self.state_write();
            if let Some(s) = state.layers.iter_mut().find(|s| s.layer.id == layer_id) {
                s.deleting = true;
            }
        }
        // The copy can take minutes; other control operations may run meanwhile
        // (module doc: a seal, an expansion or a volume delete during a merge keeps
        // every view), another deletion waits for `merging`.
        drop(control);
        self.merge_copy(layer_id)?;
        let _control = self.control();
        self.merge_finish(layer_id)
    }

    /// Merges layer `id` into its child and drops it. Caller holds the control lock
    /// (at open, where nothing else runs yet).
    pub(super) fn merge_out(&self, id: LayerId) -> Result<(), StoreError> {
        self.merge_copy(id)?;
        self.merge_finish(id)
    }

    /// Copies every block of layer `id` that its child (the next newer layer, as it
    /// is now) lacks into the child, then syncs the child. Runs without the control
    /// lock in `delete_snapshot`: the child keeps its place when the head is sealed
    /// (a new head goes on top), copying into a sealed child changes no view, and a
    /// child dropped meanwhile (the volume deleted) no longer needs the blocks.
    ///
    /// The child is the next *newer* layer, so a merge never writes into an older
    /// one: shared layers (the base run) are never a merge target, and are never
    /// merged out themselves (they are not this volume's snapshots).
    fn merge_copy(&self, id: LayerId) -> Result<(), StoreError> {
        let (layer, child) = {
            let state = self.state_read();
            let Some(i) = state.layers.iter().position(|s| s.layer.id == id) else {
                return Ok(());
            };
            if state.layers[i].shared {
                return Err(StoreError::SnapshotNotFound(
                    state.layers[i].snapshot_id.clone().unwrap_or_default(),
                ));
            }
            (
                Arc::clone(&state.layers[i].layer),
                state.layers.get(i + 1).map(|s| Arc::clone(&s.layer)),
            )
        };
        if let Some(child) = &child {
            // Nobody waits on a merge: it yields to application I/O.
            let priority = IoPriority::Background;
            block_on(async {
                for b in layer.present_bits().ones() {
                    let _stripe = self.locks.exclusive(b, 1).await;
                    if child.has(b) {
                        continue;
                    }
                    copy_block(&layer, child, priority, b).await?;
                }
                child.sync(priority).await
            })?;
        }
        Ok(())
    }

    /// Drops merged layer `id` from the chain (manifest, then files). Caller holds
    /// the control lock.
    fn merge_finish(&self, id: LayerId) -> Result<(), StoreError> {
        // The chain changes: wait for the data operations running (`locks` module).
        let _gate = self.locks.gate_exclusive_blocking();
        let mut state = self.state_write();
        let Some(i) = state.layers.iter().position(|s| s.layer.id == id) else {
            return Ok(());
        };
        // The last own layer of a deleted volume: what is left (shared layers at most)
        // belongs to no snapshot of this volume. Removing the directory only drops
        // this volume's links of shared layers.
        if state.volume_deleted && state.own_layers() == 1 {
            return self.remove_all(&mut state);
        }
        let mut m = state.manifest();
        m.layers.retain(|l| l.id != id);
        self.write_manifest(&m)?;
        let layer = state.layers.remove(i).layer;
        drop(state);
        remove_layer_dir(layer.dir())
    }
}
