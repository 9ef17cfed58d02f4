//! The small operator commands: `tessera volumes` and `tessera replicas`.
//!
//! Both only read: `volumes` asks the controller (CSI ListVolumes) and, for the names
//! CSI does not carry, the replica daemons' records; `replicas` asks each daemon for
//! its GetInfo.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tessera_csi_proto::v1::ListVolumesRequest;
use tessera_replica::control_proto::{GetInfoRequest, ListVolumesRequest as RecordsRequest};

use crate::csi_client::{self, ControllerClient};
use crate::demo::human_bytes;

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

/// `tessera volumes`: every volume the controller lists.
pub async fn volumes(controller: &str, replicas: &[String]) -> anyhow::Result<()> {
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
    let names = names_from_replicas(replicas).await;
    let rows: Vec<Vec<String>> = entries
        .into_iter()
        .filter_map(|e| {
            let volume = e.volume?;
            let status = e.status.unwrap_or_default();
            let condition = match status.volume_condition {
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
            Some(vec![
                volume.volume_id.clone(),
                names
                    .get(&volume.volume_id)
                    .cloned()
                    .unwrap_or_else(|| "-".to_owned()),
                human_bytes(volume.capacity_bytes),
                published,
                condition,
            ])
        })
        .collect();
    print_table(&["ID", "NAME", "SIZE", "PUBLISHED", "CONDITION"], &rows);
    Ok(())
}

/// Volume names by id from the replica daemons' records (CSI has no names in
/// ListVolumes). Daemons that do not answer are skipped: names are a convenience.
async fn names_from_replicas(replicas: &[String]) -> HashMap<String, String> {
    let mut names = HashMap::new();
    for addr in replicas {
        let Ok(mut client) = csi_client::replica(addr, RPC_TIMEOUT).await else {
            continue;
        };
        if let Ok(resp) = client.list_volumes(RecordsRequest {}).await {
            for rec in resp.into_inner().volumes {
                names.entry(rec.volume_id).or_insert(rec.name);
            }
        }
    }
    names
}

/// `tessera replicas`: GetInfo of each daemon; one that does not answer is listed
/// with its error and makes the command fail.
pub async fn replicas(replicas: &[String]) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut failed = 0;
    for addr in replicas {
        let info = async {
            let mut client = csi_client::replica(addr, RPC_TIMEOUT).await?;
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
            "{failed} of {} replica daemons did not answer",
            replicas.len()
        ))
        .context("tessera replicas");
    }
    Ok(())
}
