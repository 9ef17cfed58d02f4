//! CSI Identity service of the node plugin.
//!
//! Plugin capabilities describe the *plugin* (the Tessera driver as a whole), not the
//! one process answering, so the node plugin advertises the same ones as the
//! controller: CONTROLLER_SERVICE (served by `tessera-controller` on its own endpoint)
//! and VOLUME_ACCESSIBILITY_CONSTRAINTS. Kubernetes reads them only from the
//! controller's endpoint; tools that look at the node endpoint alone (csi-sanity's
//! Node specs) learn from them that volumes go through ControllerPublishVolume, whose
//! `publish_context` NodeStageVolume needs.

use tessera_csi_proto::v1::identity_server::Identity;
use tessera_csi_proto::v1::plugin_capability::service::Type as ServiceType;
use tessera_csi_proto::v1::plugin_capability::{Service, Type as CapType};
use tessera_csi_proto::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tessera_csi_proto::DRIVER_NAME;
use tonic::{Request, Response, Status};

/// Identity service: driver name, version and readiness.
#[derive(Debug, Default, Clone)]
pub struct IdentityService;

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let capabilities = [
            ServiceType::ControllerService,
            ServiceType::VolumeAccessibilityConstraints,
        ]
        .into_iter()
        .map(|t| PluginCapability {
            r#type: Some(CapType::Service(Service { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        // Nothing to warm up yet: once the socket is served the plugin is ready.
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn advertises_the_drivers_plugin_capabilities() {
        let caps = IdentityService
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .expect("never fails")
            .into_inner()
            .capabilities;
        let types: Vec<i32> = caps
            .iter()
            .filter_map(|c| match c.r#type {
                Some(CapType::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        assert_eq!(
            types,
            vec![
                ServiceType::ControllerService as i32,
                ServiceType::VolumeAccessibilityConstraints as i32
            ]
        );
    }
}
