//! The CSI Identity service, shared by the controller and the node plugin.
//!
//! Plugin capabilities describe the Tessera driver as a whole, not the one process
//! answering, so both plugins advertise the same ones: CONTROLLER_SERVICE and
//! SNAPSHOT_METADATA_SERVICE (both served by `tessera-controller` on its own endpoint)
//! and VOLUME_ACCESSIBILITY_CONSTRAINTS.
//! Kubernetes reads them from the controller's endpoint; tools that look at a node
//! endpoint alone (csi-sanity's Node specs) learn from them that volumes go through
//! ControllerPublishVolume, whose `publish_context` NodeStageVolume needs. Only
//! readiness differs per process, so it is a flag the owner flips.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::v1::identity_server::Identity;
use crate::v1::plugin_capability::service::Type as ServiceType;
use crate::v1::plugin_capability::volume_expansion::Type as ExpansionType;
use crate::v1::plugin_capability::{Service, Type as CapType, VolumeExpansion};
use crate::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use crate::DRIVER_NAME;

/// Answers who the plugin is and whether it is ready.
#[derive(Debug, Clone)]
pub struct IdentityService {
    ready: Arc<AtomicBool>,
}

impl IdentityService {
    /// An identity whose Probe reports `ready`; the controller flips it once its volume
    /// index is loaded from the replicas.
    pub fn new(ready: Arc<AtomicBool>) -> Self {
        Self { ready }
    }

    /// An identity that is ready as soon as it is served (nothing to warm up).
    pub fn always_ready() -> Self {
        Self::new(Arc::new(AtomicBool::new(true)))
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities: Vec<PluginCapability> = [
            ServiceType::ControllerService,
            ServiceType::VolumeAccessibilityConstraints,
            ServiceType::SnapshotMetadataService,
        ]
        .into_iter()
        .map(|t| PluginCapability {
            r#type: Some(CapType::Service(Service { r#type: t as i32 })),
        })
        .collect();
        // Volumes grow while attached and mounted: the replicas grow under the running
        // engine, and the node grows the device and the filesystem in place.
        capabilities.push(PluginCapability {
            r#type: Some(CapType::VolumeExpansion(VolumeExpansion {
                r#type: ExpansionType::Online as i32,
            })),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.ready.load(Ordering::Acquire)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn probe(s: &IdentityService) -> Option<bool> {
        s.probe(Request::new(ProbeRequest {}))
            .await
            .expect("probe never fails")
            .into_inner()
            .ready
    }

    #[tokio::test]
    async fn info_capabilities_and_readiness() {
        let ready = Arc::new(AtomicBool::new(false));
        let s = IdentityService::new(ready.clone());
        let info = s
            .get_plugin_info(Request::new(GetPluginInfoRequest {}))
            .await
            .expect("info never fails")
            .into_inner();
        assert_eq!(info.name, "tessera.csi.dev");
        assert!(!info.vendor_version.is_empty());
        assert_eq!(probe(&s).await, Some(false));
        ready.store(true, Ordering::Release);
        assert_eq!(probe(&s).await, Some(true));
        assert_eq!(probe(&IdentityService::always_ready()).await, Some(true));

        let types: Vec<i32> = s
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .expect("capabilities never fail")
            .into_inner()
            .capabilities
            .iter()
            .filter_map(|c| match c.r#type {
                Some(CapType::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        let expansion: Vec<i32> = s
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .expect("capabilities never fail")
            .into_inner()
            .capabilities
            .iter()
            .filter_map(|c| match c.r#type {
                Some(CapType::VolumeExpansion(e)) => Some(e.r#type),
                _ => None,
            })
            .collect();
        assert_eq!(expansion, vec![ExpansionType::Online as i32]);
        assert_eq!(
            types,
            vec![
                ServiceType::ControllerService as i32,
                ServiceType::VolumeAccessibilityConstraints as i32,
                ServiceType::SnapshotMetadataService as i32
            ]
        );
    }
}
