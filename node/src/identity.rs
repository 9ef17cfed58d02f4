//! CSI Identity service of the node plugin.
//!
//! The node plugin advertises no plugin capabilities: it serves no Controller
//! service, and topology is reported through NodeGetInfo by the node and through
//! the controller's own Identity service.

use tessera_csi_proto::v1::identity_server::Identity;
use tessera_csi_proto::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, ProbeRequest, ProbeResponse,
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
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
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
