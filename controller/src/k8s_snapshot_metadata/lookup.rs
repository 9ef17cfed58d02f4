//! From a VolumeSnapshot's namespace and name to the CSI snapshot handle Tessera
//! knows: the VolumeSnapshot's bound content, which must be this driver's and
//! ready.

use serde::Deserialize;
use tessera_csi_proto::DRIVER_NAME;
use tonic::Status;

use crate::kube_api::KubeApi;

/// Refuses anything but a DNS-1123 subdomain: names go into API paths, so a `/`
/// or `..` must never get that far.
pub fn check_name(field: &str, value: &str) -> Result<(), Status> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{field} {value:?} is not a Kubernetes object name"
        )))
    }
}

#[derive(Deserialize)]
struct VolumeSnapshot {
    #[serde(default)]
    status: Option<SnapshotStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotStatus {
    #[serde(default)]
    bound_volume_snapshot_content_name: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    spec: ContentSpec,
    #[serde(default)]
    status: Option<ContentStatus>,
}

#[derive(Deserialize)]
struct ContentSpec {
    driver: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContentStatus {
    #[serde(default)]
    snapshot_handle: Option<String>,
    #[serde(default)]
    ready_to_use: Option<bool>,
}

fn api_error(e: crate::kube_api::KubeError) -> Status {
    Status::unavailable(format!(
        "cannot read the snapshot from the Kubernetes API: {}",
        tessera_telemetry::error_chain(&e)
    ))
}

/// The CSI handle of VolumeSnapshot `namespace/name`.
pub async fn snapshot_handle(api: &KubeApi, namespace: &str, name: &str) -> Result<String, Status> {
    let path =
        format!("/apis/snapshot.storage.k8s.io/v1/namespaces/{namespace}/volumesnapshots/{name}");
    let snapshot: VolumeSnapshot =
        api.get(&path).await.map_err(api_error)?.ok_or_else(|| {
            Status::not_found(format!("VolumeSnapshot {namespace}/{name} not found"))
        })?;
    let content_name = snapshot
        .status
        .and_then(|s| s.bound_volume_snapshot_content_name)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "VolumeSnapshot {namespace}/{name} is not bound to a VolumeSnapshotContent yet"
            ))
        })?;
    check_name("boundVolumeSnapshotContentName", &content_name)?;
    let content: Content = api
        .get(&format!(
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/{content_name}"
        ))
        .await
        .map_err(api_error)?
        .ok_or_else(|| {
            Status::not_found(format!(
                "VolumeSnapshotContent {content_name} of {namespace}/{name} not found"
            ))
        })?;
    if content.spec.driver != DRIVER_NAME {
        return Err(Status::invalid_argument(format!(
            "VolumeSnapshot {namespace}/{name} belongs to the driver {:?}, not {DRIVER_NAME}",
            content.spec.driver
        )));
    }
    let status = content.status.ok_or_else(|| {
        Status::failed_precondition(format!("VolumeSnapshot {namespace}/{name} is not ready"))
    })?;
    match (status.snapshot_handle, status.ready_to_use) {
        (Some(handle), Some(true)) if !handle.is_empty() => Ok(handle),
        _ => Err(Status::failed_precondition(format!(
            "VolumeSnapshot {namespace}/{name} is not ready"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_path_are_refused() {
        for good in ["default", "backup-1", "snap.v2", "a"] {
            assert!(check_name("n", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "A",
            "-a",
            "a-",
            "a..b",
            "a b",
            &"x".repeat(254),
        ] {
            let e = check_name("n", bad).expect_err(bad);
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
