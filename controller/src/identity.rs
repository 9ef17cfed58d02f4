//! The CSI Identity service of the controller plugin.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tessera_csi_proto::v1::identity_server::Identity;
use tessera_csi_proto::v1::plugin_capability::service::Type as ServiceType;
use tessera_csi_proto::v1::plugin_capability::{Service, Type as CapType};
use tessera_csi_proto::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tessera_csi_proto::DRIVER_NAME;
use tonic::{Request, Response, Status};

/// Answers who the plugin is and whether it is ready; readiness flips once the volume
/// index has been loaded from the replicas.
#[derive(Debug, Clone)]
pub struct IdentityService {
    ready: Arc<AtomicBool>,
}

impl IdentityService {
    /// An identity service reporting `ready`.
    pub fn new(ready: Arc<AtomicBool>) -> Self {
        Self { ready }
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

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {
            ready: Some(self.ready.load(Ordering::Acquire)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn info_and_probe() {
        let ready = Arc::new(AtomicBool::new(false));
        let s = IdentityService::new(ready.clone());
        let info = s
            .get_plugin_info(Request::new(GetPluginInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "tessera.csi.dev");
        assert!(!info.vendor_version.is_empty());
        assert_eq!(
            s.probe(Request::new(ProbeRequest {}))
                .await
                .unwrap()
                .into_inner()
                .ready,
            Some(false)
        );
        ready.store(true, Ordering::Release);
        assert_eq!(
            s.probe(Request::new(ProbeRequest {}))
                .await
                .unwrap()
                .into_inner()
                .ready,
            Some(true)
        );
        let caps = s
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(caps.capabilities.len(), 2);
    }
}
