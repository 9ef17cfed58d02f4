//! The activity log: a durable bitmap of the regions a replica changed since its
//! volume's copies were last known equal.
//!
//! # Rule
//!
//! A write or trim is applied only after every region it touches is marked *on
//! disk* ([`DirtyRegions::mark`]). A region is cleared only by
//! [`DirtyRegions::clean`] with a token from [`DirtyRegions::mark_generation`],
//! which the engine sends once every replica of the set has every write issued
//! before the token durably. So after any crash, the union of the replicas' maps
//! covers every block on which two copies may differ.
//!
//! # Cost
//!
//! Only the first write into a clean region waits for the map (one small `pwrite`
//! and `fdatasync`, shared by every write that needs a new region meanwhile: one
//! persist round writes all regions wanted so far); later writes into a marked
//! region cost a mutex and a bit test. The map is rewritten whole — 32 KiB for a
//! 1 TiB volume at 4 MiB regions.
//!
//! # File format (`dirty-regions`, little endian)
//!
//! ```text
//! 0..8    magic "TSDIRTY1"
//! 8..16   region size in bytes (u64)
//! 16..24  number of regions (u64)
//! 24..    one bit per region (bit r % 8 of byte r / 8), ceil(regions / 8) bytes
//! end-4   crc32c of everything before it
//! ```
//!
//! Written in place: a torn write fails the crc, and a map that fails to load
//! counts every region as dirty.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::SyncStateError;
use tessera_replica_protocol::sync::DirtyMap;

/// Bytes per region. Coarse enough that a 1 TiB volume's map is 32 KiB and a
/// sequential writer marks a new region every 4 MiB; a reconcile compares the
/// versions of a dirty region's blocks (16 KiB of metadata per replica), not their
/// data, so the granularity costs little there.
pub const REGION_SIZE: u64 = 4 << 20;

const MAGIC: &[u8; 8] = b"TSDIRTY1";
const HEADER_LEN: usize = 24;

fn regions_for(size: u64) -> u64 {
    size.div_ceil(REGION_SIZE)
}

/// State of one region in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Clean,
    /// A write waits for the region to reach the disk.
    Wanted,
    /// On disk.
    Durable,
}

#[derive(Debug)]
struct State {
    marks: Vec<Mark>,
    /// Per region, the generation of the last write that marked it (0 for regions
    /// loaded from disk: any later token covers them).
    last_gen: Vec<u64>,
    /// Generation new writes get; [`DirtyRegions::mark_generation`] advances it.
    generation: u64,
}

impl State {
    fn grow(&mut self, regions: usize) {
        if self.marks.len() < regions {
            self.marks.resize(regions, Mark::Clean);
            self.last_gen.resize(regions, 0);
        }
    }

    /// The bitmap that should be on disk: durable and wanted regions.
    fn image(&self) -> DirtyMap {
        let mut map = DirtyMap::clean(REGION_SIZE, self.marks.len() as u64);
        for (r, m) in self.marks.iter().enumerate() {
            if *m != Mark::Clean {
                map.set(r as u64);
            }
        }
        map
    }
}

/// The dirty regions of one volume replica (see the module doc).
#[derive(Debug)]
pub struct DirtyRegions {
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises persist rounds; each writes the image as of its start.
    io: tokio::sync::Mutex<()>,
}

impl DirtyRegions {
    /// Loads the map at `path` for a volume of `size` bytes (see
    /// [`super::SyncState::load`] for what a missing or damaged file means).
    pub fn load(path: &Path, size: u64) -> DirtyRegions {
        let regions = regions_for(size);
        let loaded = match std::fs::read(path) {
            Ok(bytes) => decode_file(&bytes).ok_or("damaged"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(DirtyMap::clean(REGION_SIZE, regions))
            }
            Err(_) => Err("unreadable"),
        };
        let map = loaded.unwrap_or_else(|why| {
            tracing::warn!(path = %path.display(), why, "dirty-region map cannot be loaded; every region counts as dirty");
            let mut all = DirtyMap::clean(REGION_SIZE, regions);
            for r in 0..regions {
                all.set(r);
            }
            all
        });
        let n = usize::try_from(map.regions.max(regions)).unwrap_or(usize::MAX);
        let mut marks = vec![Mark::Clean; n];
        for r in map.dirty() {
            marks[r as usize] = Mark::Durable;
        }
        DirtyRegions {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                marks,
                last_gen: vec![0; n],
                generation: 1,
            }),
            io: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Critical sections are plain assignments: a panic cannot leave them torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the regions of `len` bytes at `offset` durably dirty; returns once they
    /// are on disk. Call before applying a write or trim there.
    pub async fn mark(&self, offset: u64, len: u64) -> Result<(), SyncStateError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / REGION_SIZE;
        let last = (offset + len - 1) / REGION_SIZE;
        let (lo, hi) = (first as usize, last as usize);
        {
            let mut st = self.lock();
            st.grow(hi + 1);
            let generation = st.generation;
            let mut all_durable = true;
            for r in lo..=hi {
                st.last_gen[r] = generation;
                match st.marks[r] {
                    Mark::Durable => {}
                    Mark::Clean => {
                        st.marks[r] = Mark::Wanted;
                        all_durable = false;
                    }
                    Mark::Wanted => all_durable = false,
                }
            }
            if all_durable {
                return Ok(());
            }
        }
        loop {
            let _round = self.io.lock().await;
            if self.lock().marks[lo..=hi]
                .iter()
                .all(|m| *m == Mark::Durable)
            {
                return Ok(());
            }
            self.persist_round().await?;
        }
    }

    /// Writes the current image and marks the regions that were wanted when it was
    /// taken durable. The caller holds `io`.
    async fn persist_round(&self) -> Result<(), SyncStateError> {
        let (image, wanted): (DirtyMap, Vec<usize>) = {
            let st = self.lock();
            let wanted = st
                .marks
                .iter()
                .enumerate()
                .filter(|(_, m)| **m == Mark::Wanted)
                .map(|(r, _)| r)
                .collect();
            (st.image(), wanted)
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || write_file(&path, &image))
            .await
            .map_err(|e| SyncStateError::Io {
                action: "persist dirty regions",
                path: self.path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
        // On failure they stay wanted: the next round (the next write's) tries
        // again, and this write fails, so nothing lands without its mark.
        written?;
        let mut st = self.lock();
        for r in wanted {
            if st.marks[r] == Mark::Wanted {
                st.marks[r] = Mark::Durable;
            }
        }
        Ok(())
    }

    /// The regions marked (durable or being made so).
    pub fn snapshot(&self) -> DirtyMap {
        self.lock().image()
    }

    /// Starts a cleaning: returns a token covering every write marked so far; writes
    /// marked from now on are not covered.
    pub fn mark_generation(&self) -> u64 {
        let mut st = self.lock();
        let token = st.generation;
        st.generation += 1;
        token
    }

    /// Clears every durable region whose last write is covered by `token` and
    /// persists the map. The caller (the engine) guarantees that every replica of
    /// the set holds those writes durably. Returns how many regions were cleared.
    pub async fn clean(&self, token: u64) -> Result<u64, SyncStateError> {
        let cleared = {
            let mut st = self.lock();
            let mut n = 0;
            for r in 0..st.marks.len() {
                if st.marks[r] == Mark::Durable && st.last_gen[r] <= token {
                    st.marks[r] = Mark::Clean;
                    n += 1;
                }
            }
            n
        };
        if cleared > 0 {
            let _round = self.io.lock().await;
            self.persist_round().await?;
        }
        Ok(cleared)
    }
}

pub(crate) fn decode_file(bytes: &[u8]) -> Option<DirtyMap> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc || body.len() < HEADER_LEN || &body[..8] != MAGIC {
        return None;
    }
    DirtyMap::decode(&body[8..])
}

fn write_file(path: &Path, map: &DirtyMap) -> Result<(), SyncStateError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + map.bits.len() + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&map.encode());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let file: File = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(SyncStateError::io("open", path))?;
    file.write_all_at(&bytes, 0)
        .map_err(SyncStateError::io("write", path))?;
    file.set_len(bytes.len() as u64)
        .map_err(SyncStateError::io("truncate", path))?;
    file.sync_data().map_err(SyncStateError::io("sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test]
    async fn marks_survive_a_reload_and_only_covered_regions_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty-regions");
        let d = DirtyRegions::load(&path, 64 * MIB);
        assert_eq!(d.snapshot().count(), 0);
        d.mark(0, 4096).await.unwrap();
        d.mark(REGION_SIZE * 3 - 4096, 8192).await.unwrap(); // spans regions 2 and 3
        let token = d.mark_generation();
        d.mark(REGION_SIZE * 5, 4096).await.unwrap(); // after the token
        let dirty: Vec<u64> = d.snapshot().dirty().collect();
        assert_eq!(dirty, vec![0, 2, 3, 5]);

        let reloaded = DirtyRegions::load(&path, 64 * MIB);
        assert_eq!(reloaded.snapshot().dirty().collect::<Vec<_>>(), dirty);

        assert_eq!(d.clean(token).await.unwrap(), 3);
        assert_eq!(d.snapshot().dirty().collect::<Vec<_>>(), vec![5]);
        let reloaded = DirtyRegions::load(&path, 64 * MIB);
        assert_eq!(reloaded.snapshot().dirty().collect::<Vec<_>>(), vec![5]);
    }

    #[tokio::test]
    async fn a_write_after_the_token_keeps_its_region_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let d = DirtyRegions::load(&dir.path().join("m"), 16 * MIB);
        d.mark(0, 4096).await.unwrap();
        let token = d.mark_generation();
        d.mark(8192, 4096).await.unwrap(); // same region, newer generation
        assert_eq!(d.clean(token).await.unwrap(), 0);
        assert!(d.snapshot().is_dirty(0));
    }

    #[test]
    fn a_damaged_map_counts_every_region_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let mut map = DirtyMap::clean(REGION_SIZE, 4);
        map.set(1);
        write_file(&path, &map).unwrap();
        assert_eq!(
            DirtyRegions::load(&path, 16 * MIB)
                .snapshot()
                .dirty()
                .collect::<Vec<_>>(),
            vec![1]
        );
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(DirtyRegions::load(&path, 16 * MIB).snapshot().count(), 4);
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert_eq!(DirtyRegions::load(&path, 16 * MIB).snapshot().count(), 4);
    }
}
