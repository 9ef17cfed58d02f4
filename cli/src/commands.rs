//! The small operator commands: `tessera volumes` and `tessera replicas`.
//!
//! Both only read: `volumes` asks the controller (CSI ListVolumes) and, for what CSI
//! does not carry (names, the progress of a restore or clone, which replica daemons
//! hold the volume and answer right now), the replica daemons' records; `replicas`
//! asks each daemon for its GetInfo.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{anyhow, Context};
use tessera_csi_proto::v1::{ControllerGetVolumeRequest, ListVolumesRequest};
use tessera_replica_protocol::control_proto::{
    GetInfoRequest, ListVolumesRequest as RecordsRequest, VolumeRecord,
};
use tessera_tls::Transport;

use crate::csi_client::{self, ControllerClient};
use crate::demo::human_bytes;
use crate::replica_tls::plaintext_hint;

/// Deadline of one RPC of these commands.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on ListVolumes pages, so a controller repeating a token cannot hang us.
const MAX_PAGES: usize = 10_000;

/// Prints `rows` as left-aligned columns under `header`.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `tessera volumes --watch`: the table again every `every`, on a cleared screen, until
/// interrupted (a rebuild's or resync's progress as it moves).
pub async fn watch_volumes(
    controller: &str,
    replicas: &[String],
    transport: &Transport,
    every: Duration,
) -> anyhow::Result<()> {
    loop {
        // Clear the screen and go home, then draw; an error is shown, not fatal: the
        // controller may be restarting.
        print!("\x1b[2J\x1b[H");
        println!("every {every:?}, {} (Ctrl-C to stop)\n", clock_now());
        if let Err(e) = volumes(controller, replicas, transport).await {
            println!("{e:#}");
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Wall-clock time as seconds since the Unix epoch (no timezone database needed).
fn clock_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02} UTC")
}

/// `tessera volumes`: every volume the controller lists, with what the replica
/// daemons at `replicas` (dialled through `transport`) say about each.
pub async fn volumes(
    controller: &str,
    replicas: &[String],
    transport: &Transport,
) -> anyhow::Result<()> {
    let socket = csi_client::socket_of(controller)?;
    let mut client = ControllerClient::new(csi_client::connect_unix(&socket, RPC_TIMEOUT).await?);
    let mut entries = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: token,
            })
            .await
            .map_err(|s| anyhow!("ListVolumes: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        entries.extend(page.entries);
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let (details, answered) = details_from_replicas(replicas, transport).await;
    // ControllerGetVolume asks the replicas, so its condition says which are in sync
    // (ListVolumes' only says which daemons the controller reaches).
    let mut conditions = HashMap::new();
    for e in &entries {
        let Some(volume) = &e.volume else { continue };
        let request = ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        };
        if let Ok(resp) = client.controller_get_volume(request).await {
            if let Some(c) = resp.into_inner().status.and_then(|s| s.volume_condition) {
                conditions.insert(volume.volume_id.clone(), c);
            }
        }
    }
    let rows: Vec<Vec<String>> = entries
        .into_iter()
        .filter_map(|e| {
            let volume = e.volume?;
            let status = e.status.unwrap_or_default();
            let condition = match conditions
                .remove(&volume.volume_id)
                .or(status.volume_condition)
            {
                Some(c) if c.abnormal => format!("abnormal: {}", c.message),
                Some(c) if !c.message.is_empty() => format!("ok: {}", c.message),
                Some(_) => "ok".to_owned(),
                None => "-".to_owned(),
            };
            let published = if status.published_node_ids.is_empty() {
                "-".to_owned()
            } else {
                status.published_node_ids.join(",")
            };
            let detail = details.get(&volume.volume_id);
            Some(vec![
                volume.volume_id.clone(),
                detail
                    .map(|d| d.name.clone())
                    .unwrap_or_else(|| "-".to_owned()),
                human_bytes(volume.capacity_bytes),
                detail
                    .and_then(VolumeDetail::copy_state)
                    .unwrap_or_else(|| "-".to_owned()),
                detail
                    .map(|d| d.replica_state(replicas, &answered))
                    .unwrap_or_else(|| "-".to_owned()),
                published,
                condition,
            ])
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "SIZE",
            "COPY",
            "REPLICAS",
            "PUBLISHED",
            "CONDITION",
        ],
        &rows,
    );
    Ok(())
}

/// What the replica records say about one volume beyond CSI.
#[derive(Debug, Default)]
struct VolumeDetail {
    name: String,
    /// Restored or cloned: whether from a volume (clone).
    clone: Option<bool>,
    /// Copy progress summed over the replicas that answered.
    done_bytes: u64,
    total_bytes: u64,
    /// Every replica that answered has its copy complete.
    complete: bool,
    /// The replica set: (node id, control address), from the newest record seen
    /// (highest generation: a replaced member's leftover record names the old set).
    replica_set: Vec<(String, String)>,
    /// Generation of the record `replica_set` came from.
    set_generation: u64,
    /// Control addresses of the daemons that returned a record of the volume.
    holders: BTreeSet<String>,
}

impl VolumeDetail {
    /// Adds the record daemon `from` (its control address) returned.
    fn add(&mut self, from: &str, rec: VolumeRecord) {
        if self.name.is_empty() {
            self.name = rec.name;
        }
        if self.replica_set.is_empty() || rec.generation > self.set_generation {
            self.replica_set = rec
                .replicas
                .iter()
                .map(|r| (r.node_id.clone(), r.control_address.clone()))
                .collect();
            self.set_generation = rec.generation;
        }
        self.holders.insert(from.to_owned());
        // A rebuild's progress is the controller's condition ("rebuilding 43 %"); the
        // COPY column is about restores and clones.
        if let Some(src) = rec.copy_source.filter(|s| !s.rebuild) {
            self.clone = Some(src.clone);
            let (done, total, complete) = rec.copy.map_or((0, src.size_bytes, false), |c| {
                (c.done_bytes, c.total_bytes, c.complete)
            });
            self.done_bytes = self.done_bytes.saturating_add(done.min(total));
            self.total_bytes = self.total_bytes.saturating_add(total);
            self.complete &= complete;
        }
    }

    /// "restoring 43%" / "cloning 43%" while the copy runs; `None` otherwise.
    fn copy_state(&self) -> Option<String> {
        let verb = if self.clone? { "cloning" } else { "restoring" };
        if self.complete {
            return None;
        }
        let percent = if self.total_bytes == 0 {
            0
        } else {
            u128::from(self.done_bytes) * 100 / u128::from(self.total_bytes)
        };
        Some(format!("{verb} {percent}%"))
    }

    /// The REPLICAS column: the node ids of the replica set whose daemons answer
    /// and hold the volume, then those that do not, e.g.
    /// `node-a,node-c (down: node-b)`. `asked` are the daemons queried and
    /// `answered` those that answered; a daemon that answered without the volume is
    /// `missing`, one that was not asked `unknown`. Sorted, so the column of a
    /// healthy volume does not depend on placement order.
    fn replica_state(&self, asked: &[String], answered: &BTreeSet<String>) -> String {
        let mut up = BTreeSet::new();
        let mut down = BTreeSet::new();
        let mut missing = BTreeSet::new();
        let mut unknown = BTreeSet::new();
        for (node, addr) in &self.replica_set {
            let group = if self.holders.contains(addr) {
                &mut up
            } else if !asked.contains(addr) {
                &mut unknown
            } else if answered.contains(addr) {
                &mut missing
            } else {
                &mut down
            };
            group.insert(node.as_str());
        }
        let list = |nodes: &BTreeSet<&str>| nodes.iter().copied().collect::<Vec<_>>().join(",");
        let mut text = if up.is_empty() {
            "none".to_owned()
        } else {
            list(&up)
        };
        let notes: Vec<String> = [
            ("down", &down),
            ("missing", &missing),
            ("unknown", &unknown),
        ]
        .into_iter()
        .filter(|(_, nodes)| !nodes.is_empty())
        .map(|(what, nodes)| format!("{what}: {}", list(nodes)))
        .collect();
        if !notes.is_empty() {
            text.push_str(&format!(" ({})", notes.join("; ")));
        }
        text
    }
}

/// Names, copy progress and holders by volume id from the replica daemons' records
/// (CSI has none of them in ListVolumes), and the daemons that answered. Daemons
/// that do not answer are shown as down in the REPLICAS column, and why on stderr
/// (a refused certificate looks like a daemon down otherwise).
async fn details_from_replicas(
    replicas: &[String],
    transport: &Transport,
) -> (HashMap<String, VolumeDetail>, BTreeSet<String>) {
    let mut details: HashMap<String, VolumeDetail> = HashMap::new();
    let mut answered = BTreeSet::new();
    for addr in replicas {
        let records = async {
            let mut client = csi_client::replica(addr, transport, RPC_TIMEOUT).await?;
            client
                .list_volumes(RecordsRequest {})
                .await
                .map_err(|s| anyhow!("ListVolumes: {:?}: {}", s.code(), s.message()))
        }
        .await;
        match records {
            Ok(resp) => {
                answered.insert(addr.clone());
                for rec in resp.into_inner().volumes {
                    details
                        .entry(rec.volume_id.clone())
                        .or_insert_with(|| VolumeDetail {
                            complete: true,
                            ..Default::default()
                        })
                        .add(addr, rec);
                }
            }
            Err(e) => eprintln!(
                "tessera volumes: replica daemon {addr}: {e:#}{}",
                plaintext_hint(transport)
            ),
        }
    }
    (details, answered)
}

/// `tessera replicas`: GetInfo of each daemon; one that does not answer is listed
/// with its error and makes the command fail.
pub async fn replicas(replicas: &[String], transport: &Transport) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut failed = 0;
    for addr in replicas {
        let info = async {
            let mut client = csi_client::replica(addr, transport, RPC_TIMEOUT).await?;
            client
                .get_info(GetInfoRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| anyhow!("GetInfo: {:?}: {}", s.code(), s.message()))
        }
        .await;
        match info {
            Ok(i) => rows.push(vec![
                addr.clone(),
                i.node_id,
                i.zone,
                i.data_address,
                human_bytes(i64::try_from(i.capacity_bytes).unwrap_or(i64::MAX)),
                human_bytes(i64::try_from(i.free_bytes).unwrap_or(i64::MAX)),
                i.volume_count.to_string(),
                i.version,
            ]),
            Err(e) => {
                failed += 1;
                let mut row = vec![addr.clone(), format!("unreachable: {e:#}")];
                row.resize(8, String::new());
                rows.push(row);
            }
        }
    }
    print_table(
        &[
            "CONTROL", "NODE", "ZONE", "DATA", "CAPACITY", "FREE", "VOLUMES", "VERSION",
        ],
        &rows,
    );
    if failed > 0 {
        return Err(anyhow!(
            "{failed} of {} replica daemons did not answer{}",
            replicas.len(),
            plaintext_hint(transport)
        ))
        .context("tessera replicas");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_replica_protocol::control_proto::{CopyProgress, CopySource, ReplicaRef};

    fn rec(clone: bool, done: u64, complete: bool) -> VolumeRecord {
        VolumeRecord {
            name: "pvc".into(),
            copy_source: Some(CopySource {
                clone,
                size_bytes: 100,
                ..Default::default()
            }),
            copy: Some(CopyProgress {
                done_bytes: done,
                total_bytes: 100,
                complete,
                last_error: String::new(),
                shared_layers: false,
                epoch_floor: 0,
            }),
            ..Default::default()
        }
    }

    fn detail(recs: Vec<VolumeRecord>) -> VolumeDetail {
        let mut d = VolumeDetail {
            complete: true,
            ..Default::default()
        };
        recs.into_iter().for_each(|r| d.add("127.0.0.1:1", r));
        d
    }

    fn placed(nodes: &[(&str, &str)]) -> VolumeRecord {
        VolumeRecord {
            replicas: nodes
                .iter()
                .map(|(node, addr)| ReplicaRef {
                    node_id: (*node).to_owned(),
                    control_address: (*addr).to_owned(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn replica_column_names_holders_and_the_ones_that_do_not_answer() {
        let set = [("node-a", "a:1"), ("node-c", "c:1"), ("node-b", "b:1")];
        let asked: Vec<String> = ["a:1", "b:1", "c:1"].map(str::to_owned).to_vec();
        let mut d = VolumeDetail::default();
        for addr in ["a:1", "b:1", "c:1"] {
            d.add(addr, placed(&set));
        }
        let all: BTreeSet<String> = asked.iter().cloned().collect();
        assert_eq!(d.replica_state(&asked, &all), "node-a,node-b,node-c");

        let mut d = VolumeDetail::default();
        d.add("a:1", placed(&set));
        d.add("c:1", placed(&set));
        let answered: BTreeSet<String> = ["a:1", "c:1"].map(str::to_owned).into();
        assert_eq!(
            d.replica_state(&asked, &answered),
            "node-a,node-c (down: node-b)"
        );
        // node-b answered but has no record; node-c was not asked.
        let mut d = VolumeDetail::default();
        d.add("a:1", placed(&set));
        let asked_ab: Vec<String> = ["a:1", "b:1"].map(str::to_owned).to_vec();
        let answered: BTreeSet<String> = ["a:1", "b:1"].map(str::to_owned).into();
        assert_eq!(
            d.replica_state(&asked_ab, &answered),
            "node-a (missing: node-b; unknown: node-c)"
        );
    }

    #[test]
    fn copy_state_shows_progress_until_every_replica_is_done() {
        let d = detail(vec![rec(false, 100, true), rec(false, 30, false)]);
        assert_eq!(d.name, "pvc");
        assert_eq!(d.copy_state().as_deref(), Some("restoring 65%"));
        let c = detail(vec![rec(true, 0, false)]);
        assert_eq!(c.copy_state().as_deref(), Some("cloning 0%"));
        assert_eq!(detail(vec![rec(true, 100, true)]).copy_state(), None);
        let plain = detail(vec![VolumeRecord::default()]);
        assert_eq!(plain.copy_state(), None);
    }
}
