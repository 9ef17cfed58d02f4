//! `tessera verify VOLUME`: do the in-sync replicas of a volume hold the same blocks?
//!
//! Reads the volume's record from the replica daemons (replica set, epoch, size),
//! asks every replica for its in-sync record and takes the newest (what the volume's
//! engine last declared), then reads every block's version from each in-sync replica
//! over the data plane (VERSIONS, 4 MiB at a time; with the data by default, so each
//! replica also verifies every block's crc32c and reports rot as corrupt). A block is
//! *divergent* when the in-sync replicas disagree on its version (seq and kind) or one
//! holds it corrupt. Ranges that differ are read again once, so a write in flight on
//! an attached volume is not reported; what still differs is printed and the command
//! exits non-zero.
//!
//! It only reads: it connects with the volume's current epoch (never a newer one, so
//! nothing is fenced) and sends no write.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tessera_replica_protocol::block::BlockVersion;
use tessera_replica_protocol::block::BLOCK_SIZE;
use tessera_replica_protocol::control_proto::{GetVolumeRequest, VolumeRecord};
use tessera_replica_protocol::data::message::MAX_VERSIONS_LEN;
use tessera_replica_protocol::data::{ClientConfig, ReplicaDataClient};
use tessera_replica_protocol::sync::Membership;
use tessera_tls::Transport;

use crate::csi_client;
use crate::replica_tls::plaintext_hint;

/// Deadline of one request.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Divergent blocks printed in full.
const SHOWN: usize = 20;

/// What a verification found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Blocks compared.
    pub blocks: u64,
    /// In-sync replicas compared (node ids).
    pub replicas: Vec<String>,
    /// Divergent blocks: block → each replica's version.
    pub divergent: BTreeMap<u64, Vec<(String, BlockVersion)>>,
}

/// Runs the verification of `volume_id` with the replica daemons at `replicas`
/// (control addresses), dialled through `transport` on both ports; `versions_only`
/// skips reading (and crc-checking) the data.
pub async fn verify(
    volume_id: &str,
    replicas: &[String],
    transport: &Transport,
    versions_only: bool,
) -> anyhow::Result<Verdict> {
    let record = newest_record(volume_id, replicas, transport).await?;
    let mut clients = Vec::new();
    let mut declared: Membership = Membership::default();
    for r in &record.replicas {
        let client = ReplicaDataClient::connect_with(
            r.data_address.as_str(),
            volume_id,
            record.epoch,
            ClientConfig {
                request_timeout: Some(RPC_TIMEOUT),
                transport: transport.clone(),
                ..ClientConfig::default()
            },
        )
        .await;
        match client {
            Ok(c) => {
                if !c.supports_sync() {
                    bail!("replica {} is too old to verify (protocol v1)", r.node_id);
                }
                let m = c
                    .membership()
                    .await
                    .with_context(|| format!("in-sync record of {}", r.node_id))?;
                if m.key() > declared.key() {
                    declared = m;
                }
                clients.push((r.node_id.clone(), c));
            }
            Err(e) => eprintln!("verify: replica {} not reachable: {e}", r.node_id),
        }
    }
    clients.retain(|(node, _)| declared.includes(node));
    if clients.len() < 2 {
        bail!(
            "fewer than two in-sync replicas reachable ({}): nothing to compare",
            clients.len()
        );
    }
    let size = record.size_bytes;
    let mut verdict = Verdict {
        blocks: size / BLOCK_SIZE,
        replicas: clients.iter().map(|(n, _)| n.clone()).collect(),
        ..Verdict::default()
    };
    let with_data = !versions_only;
    let mut offset = 0;
    while offset < size {
        let len = MAX_VERSIONS_LEN.min(size - offset);
        let mut differs = compare(&clients, offset, len, with_data).await?;
        if !differs.is_empty() {
            // Once more: a write in flight may have reached only some replicas.
            differs = compare(&clients, offset, len, with_data).await?;
        }
        verdict.divergent.extend(differs);
        offset += len;
    }
    Ok(verdict)
}

/// The divergent blocks of one range.
async fn compare(
    clients: &[(String, ReplicaDataClient)],
    offset: u64,
    len: u64,
    with_data: bool,
) -> anyhow::Result<BTreeMap<u64, Vec<(String, BlockVersion)>>> {
    let mut all = Vec::with_capacity(clients.len());
    for (node, c) in clients {
        let v = c
            .versions(offset, len, with_data)
            .await
            .with_context(|| format!("versions of {offset}+{len} on {node}"))?;
        all.push(v.versions().to_vec());
    }
    let mut out = BTreeMap::new();
    let first = offset / BLOCK_SIZE;
    for k in 0..(len / BLOCK_SIZE) as usize {
        let v0 = all[0][k];
        if all.iter().any(|v| !v[k].reads_like(&v0)) {
            let row = clients
                .iter()
                .zip(&all)
                .map(|((n, _), v)| (n.clone(), v[k]))
                .collect();
            out.insert(first + k as u64, row);
        }
    }
    Ok(out)
}

/// The record with the highest generation among the daemons that hold the volume.
async fn newest_record(
    volume_id: &str,
    replicas: &[String],
    transport: &Transport,
) -> anyhow::Result<VolumeRecord> {
    let mut best: Option<VolumeRecord> = None;
    // Why the others did not answer: shown when none did (refused certificates,
    // daemons down), since "no answer" alone does not say what to fix.
    let mut failures = Vec::new();
    for addr in replicas {
        let mut client = match csi_client::replica(addr, transport, RPC_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{addr}: {e:#}"));
                continue;
            }
        };
        let request = GetVolumeRequest {
            volume_id: volume_id.to_owned(),
        };
        match client.get_volume(request).await {
            Ok(rec) => {
                let rec = rec.into_inner();
                if best.as_ref().is_none_or(|b| rec.generation > b.generation) {
                    best = Some(rec);
                }
            }
            Err(s) => failures.push(format!(
                "{addr}: GetVolume: {:?}: {}",
                s.code(),
                s.message()
            )),
        }
    }
    best.ok_or_else(|| {
        anyhow!(
            "no replica daemon answered with volume {volume_id} ({}){}",
            failures.join("; "),
            plaintext_hint(transport)
        )
    })
}

/// Prints the verdict; returns whether the copies agree.
pub fn report(volume_id: &str, v: &Verdict) -> bool {
    if v.divergent.is_empty() {
        println!(
            "{volume_id}: {} blocks identical on the in-sync replicas {}",
            v.blocks,
            v.replicas.join(", ")
        );
        return true;
    }
    println!(
        "{volume_id}: {} of {} blocks differ between the in-sync replicas {}",
        v.divergent.len(),
        v.blocks,
        v.replicas.join(", ")
    );
    for (block, row) in v.divergent.iter().take(SHOWN) {
        let cells: Vec<String> = row.iter().map(|(n, ver)| format!("{n}={ver:?}")).collect();
        println!("  block {block}: {}", cells.join(" "));
    }
    if v.divergent.len() > SHOWN {
        println!("  ... and {} more", v.divergent.len() - SHOWN);
    }
    false
}
