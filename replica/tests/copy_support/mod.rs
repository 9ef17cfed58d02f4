//! What the copy tests share (restores and clones in `daemon_copy.rs`, rebuilds in
//! `daemon_rebuild.rs`): a daemon with its data directory ([`Node`]), block patterns
//! that name their block and version, copy sources, snapshot and head streams, reading
//! progress out of a daemon's log. Built on `daemon_support`, which each test crate
//! declares next to this module.

// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::daemon_support::{create_req, entries, get_req, http_get, Daemon, POLL};
use tessera_replica::snapshot_read::chunk::{decode, ChunkGrid, ChunkKind};
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::control_proto as proto;
use tessera_replica_protocol::data::ReplicaDataClient;
use tessera_tls::Identity;

pub const BS: u64 = 4096;
pub const MIB: u64 = 1 << 20;
pub const ARGS: &[&str] = &["--capacity", "1Gi"];
/// Longest any copy in these tests may take (throttled ones included).
pub const COPY_TIMEOUT: Duration = Duration::from_secs(90);

/// An engine seq of epoch 1.
pub fn seq(n: u64) -> u64 {
    (1 << 40) | n
}

/// A block whose bytes name it and its version, so no block can pass for another.
pub fn pattern(block: u64, salt: u8) -> Vec<u8> {
    (0..BS)
        .map(|i| (i as u8) ^ (block as u8).wrapping_mul(31) ^ ((block >> 8) as u8) ^ salt)
        .collect()
}

pub fn zeros(blocks: u64) -> Vec<u8> {
    vec![0u8; (blocks * BS) as usize]
}

/// A daemon with the directory it keeps its data in.
pub struct Node {
    pub daemon: Daemon,
    pub data_dir: PathBuf,
    pub name: &'static str,
}

impl Node {
    pub async fn start(work: &Path, name: &'static str, extra: &[&str]) -> Node {
        let data_dir = work.join(name);
        let daemon = Daemon::start(work, &data_dir, extra).await;
        Node {
            daemon,
            data_dir,
            name,
        }
    }

    /// The daemon again on the same data directory and control port (after a kill).
    pub async fn restart(
        work: &Path,
        data_dir: PathBuf,
        name: &'static str,
        control: &str,
    ) -> Node {
        let mut args = ARGS.to_vec();
        args.extend(["--listen", control]);
        let daemon = Daemon::start(work, &data_dir, &args).await;
        assert_eq!(daemon.control, control, "restarted on another port");
        Node {
            daemon,
            data_dir,
            name,
        }
    }

    pub fn holder(&self) -> proto::ReplicaRef {
        proto::ReplicaRef {
            node_id: self.name.into(),
            zone: "z1".into(),
            control_address: self.daemon.control.clone(),
            data_address: self.daemon.data.clone(),
        }
    }

    pub async fn create(&self, id: &str, size: u64) {
        self.daemon
            .client()
            .await
            .create_volume(create_req(id, size))
            .await
            .expect("create volume");
    }

    pub async fn data(&self, volume: &str) -> ReplicaDataClient {
        self.data_at(volume, 1).await
    }

    /// A data-plane connection as an engine of `epoch`.
    pub async fn data_at(&self, volume: &str, epoch: u64) -> ReplicaDataClient {
        match self.daemon.data_client(volume, epoch).await {
            Ok(c) => c,
            Err(e) => panic!("data-plane connect failed: {e:?}\n{}", self.daemon.log()),
        }
    }

    pub async fn snapshot(&self, volume: &str, snapshot: &str) {
        self.daemon
            .client()
            .await
            .create_snapshot(proto::CreateSnapshotRequest {
                volume_id: volume.into(),
                snapshot_id: snapshot.into(),
                name: snapshot.into(),
                created_unix_nanos: 0,
            })
            .await
            .expect("create snapshot");
    }

    pub async fn record(&self, volume: &str) -> proto::VolumeRecord {
        self.daemon
            .client()
            .await
            .get_volume(get_req(volume))
            .await
            .expect("get volume")
            .into_inner()
    }

    /// Polls GetVolume until `done` says yes about the copy progress.
    pub async fn wait_copy(
        &self,
        volume: &str,
        what: &str,
        done: impl Fn(&proto::CopyProgress) -> bool,
    ) -> proto::VolumeRecord {
        let deadline = Instant::now() + COPY_TIMEOUT;
        loop {
            let rec = self.record(volume).await;
            let progress = rec.copy.clone().expect("a copied volume reports progress");
            if done(&progress) {
                return rec;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: copy of {volume} on {} stuck at {progress:?}\n{}",
                self.name,
                self.daemon.log()
            );
            tokio::time::sleep(POLL * 5).await;
        }
    }

    pub async fn wait_complete(&self, volume: &str) -> proto::VolumeRecord {
        self.wait_copy(volume, "completion", |p| p.complete).await
    }

    /// The whole volume through the data plane.
    pub async fn read_all(&self, volume: &str, size: u64) -> Vec<u8> {
        let c = self.data(volume).await;
        let mut out = Vec::with_capacity(size as usize);
        let mut at = 0;
        while at < size {
            let n = MIB.min(size - at);
            out.extend(c.read(at, n as u32).await.expect("read"));
            at += n;
        }
        out
    }

    /// Flips one byte of `block`'s data in the oldest layer (the first snapshot's own).
    pub fn corrupt_sealed(&self, volume: &str, block: u64) {
        self.flip_sealed(volume, "data", block * BS + 123);
    }

    /// Flips one byte of the checksum of `block`'s metadata entry in the oldest layer.
    pub fn corrupt_sealed_entry(&self, volume: &str, block: u64) {
        // Entries of 16 bytes (crc first) after a 4096-byte header.
        self.flip_sealed(volume, "meta", 4096 + block * 16);
    }

    /// Flips a bit of byte `at` of the oldest layer's `file`.
    pub fn flip_sealed(&self, volume: &str, file: &str, at: u64) {
        let layers = self
            .data_dir
            .join("volumes")
            .join(volume)
            .join("store/layers");
        let oldest = entries(&layers)
            .into_iter()
            .filter_map(|n| n.parse::<u64>().ok())
            .min()
            .expect("a layer");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(layers.join(oldest.to_string()).join(file))
            .expect("open layer file");
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).expect("read byte");
        byte[0] ^= 0x40;
        file.write_all_at(&byte, at).expect("flip byte");
        file.sync_all().expect("sync");
    }

    pub async fn metrics(&self) -> String {
        let addr = self.daemon.metrics.as_deref().expect("metrics listener");
        http_get(addr, "/metrics").await
    }
}

pub fn copy_source(
    snapshot: &str,
    volume: &str,
    size: u64,
    holders: &[&Node],
    rf: u32,
) -> proto::CopySource {
    proto::CopySource {
        snapshot_id: snapshot.into(),
        source_volume_id: volume.into(),
        source_replication_factor: rf,
        holders: holders.iter().map(|n| n.holder()).collect(),
        size_bytes: size,
        clone: false,
        rebuild: false,
        fence_epoch: 0,
    }
}

pub fn restore_req(id: &str, size: u64, source: proto::CopySource) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        copy_source: Some(source),
        ..create_req(id, size)
    }
}

pub async fn restore(
    node: &Node,
    id: &str,
    size: u64,
    source: proto::CopySource,
) -> proto::VolumeRecord {
    node.daemon
        .client()
        .await
        .create_volume(restore_req(id, size, source))
        .await
        .unwrap_or_else(|e| panic!("restore {id} on {}: {e}", node.name))
        .into_inner()
}

/// Every block of a snapshot as the holder streams it, and the chunk offsets sent.
pub async fn stream_versions(
    node: &Node,
    volume: &str,
    snapshot: &str,
    size: u64,
) -> (Vec<BlockVersion>, Vec<u64>) {
    stream_as(node, volume, snapshot, size, ChunkKind::Data).await
}

/// [`stream_versions`] with data or versions only.
pub async fn stream_as(
    node: &Node,
    volume: &str,
    snapshot: &str,
    size: u64,
    kind: ChunkKind,
) -> (Vec<BlockVersion>, Vec<u64>) {
    let (blocks, offsets) = stream_blocks(node, volume, snapshot, size, kind).await;
    (blocks.into_iter().map(|(v, _)| v).collect(), offsets)
}

/// Every block of a snapshot (or, with an empty `snapshot`, of the head) as the
/// holder streams it, each with its data when sent, and the chunk offsets sent.
pub async fn stream_blocks(
    node: &Node,
    volume: &str,
    snapshot: &str,
    size: u64,
    kind: ChunkKind,
) -> (Vec<(BlockVersion, Option<Vec<u8>>)>, Vec<u64>) {
    // Snapshot blocks are read by replicas (copies and repairs) only.
    let mut stream = node
        .daemon
        .client_as(Identity::Replica)
        .await
        .read_snapshot_blocks(proto::ReadSnapshotBlocksRequest {
            volume_id: volume.into(),
            snapshot_id: snapshot.into(),
            offset: 0,
            length: size,
            seqs_only: kind == ChunkKind::VersionsOnly,
        })
        .await
        .expect("read snapshot blocks")
        .into_inner();
    let grid = ChunkGrid::of_request(0, size);
    let mut out = vec![(BlockVersion::Unwritten, None); (size / BS) as usize];
    let mut offsets = Vec::new();
    let mut previous_end = 0;
    while let Some(chunk) = stream.message().await.expect("stream") {
        offsets.push(chunk.offset);
        let blocks = decode(chunk, grid, previous_end, kind).expect("a valid chunk");
        assert_eq!(blocks.is_versions_only(), kind == ChunkKind::VersionsOnly);
        previous_end = blocks.first_block() + blocks.len() as u64;
        for (b, v, data) in blocks.iter() {
            out[b as usize] = (v, data.map(<[u8]>::to_vec));
        }
    }
    (out, offsets)
}

/// A log line without its terminal colour codes.
pub fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The `done_bytes=` of the first log line containing `marker`.
pub fn logged_done(log: &str, marker: &str) -> Option<u64> {
    logged_number(log, marker, "done_bytes")
}

/// The numeric field `field` of the first log line containing `marker`.
pub fn logged_number(log: &str, marker: &str, field: &str) -> Option<u64> {
    let line = log.lines().map(plain).find(|l| l.contains(marker))?;
    let key = format!("{field}=");
    let rest = &line[line.find(&key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The volume a test expects, from its data blocks.
pub fn content(size: u64, blocks: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = zeros(size / BS);
    for (blk, data) in blocks {
        let at = (blk * BS) as usize;
        out[at..at + BS as usize].copy_from_slice(data);
    }
    out
}

/// Asserts `node`'s volume `id` reads as `want`, naming the first block that differs.
pub async fn assert_reads(node: &Node, id: &str, want: &[u8], what: &str) {
    let got = node.read_all(id, want.len() as u64).await;
    for blk in 0..want.len() as u64 / BS {
        let r = (blk * BS) as usize..((blk + 1) * BS) as usize;
        assert!(
            got[r.clone()] == want[r],
            "{what}: {id} block {blk} differs"
        );
    }
}
