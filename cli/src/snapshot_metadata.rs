//! `tessera snapshot-metadata`: a client of the Kubernetes SnapshotMetadata API the
//! controller serves (`--snapshot-metadata-listen`), as a backup application calls
//! it: over TLS, with an audience-scoped service-account token. For operators
//! checking the service and its access rules, and for the e2e.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tessera_csi_proto::k8s_snapshot_metadata::snapshot_metadata_client::SnapshotMetadataClient;
use tessera_csi_proto::k8s_snapshot_metadata::{
    BlockMetadata, GetMetadataAllocatedRequest, GetMetadataDeltaRequest,
};
use tokio::net::TcpStream;
use tonic::transport::{Endpoint, Uri};
use tower::service_fn;

/// Where and as whom to call.
#[derive(Debug, Args)]
pub struct SnapshotMetadataArgs {
    /// HOST:PORT of the controller's SnapshotMetadata API.
    #[arg(long)]
    address: String,
    /// CA certificate the service's serving certificate chains to.
    #[arg(long)]
    ca_cert: PathBuf,
    /// Name to verify the serving certificate against (default: the host of
    /// --address).
    #[arg(long)]
    server_name: Option<String>,
    /// File holding the service-account token (`kubectl create token SA --audience
    /// ...`); an empty file sends no token.
    #[arg(long)]
    token_file: PathBuf,
    /// Namespace of the VolumeSnapshot(s).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Leave out ranges ending at or before this byte offset.
    #[arg(long, default_value_t = 0)]
    starting_offset: i64,
    /// At most this many ranges per streamed message (0: the server chooses).
    #[arg(long, default_value_t = 0)]
    max_results: i32,
    #[command(subcommand)]
    call: Call,
}

/// The two calls of the API.
#[derive(Debug, Subcommand)]
enum Call {
    /// Allocated ranges of a VolumeSnapshot.
    Allocated {
        /// The VolumeSnapshot's name.
        snapshot: String,
    },
    /// Ranges changed between a base snapshot and a later VolumeSnapshot.
    Delta {
        /// The base snapshot's CSI handle (its VolumeSnapshotContent's
        /// status.snapshotHandle).
        #[arg(long)]
        base_snapshot_id: String,
        /// The later VolumeSnapshot's name.
        target: String,
    },
}

/// Prints one `offset length` line per range and a summary; a refused call is an
/// error naming the gRPC code (UNAUTHENTICATED, PERMISSION_DENIED, ...).
pub async fn run(args: SnapshotMetadataArgs) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?
        .trim()
        .to_string();
    let tls = tessera_tls::material::client_trusting(&args.ca_cert)?;
    let host = args
        .address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| anyhow!("--address {:?} is not HOST:PORT", args.address))?;
    let name = args.server_name.clone().unwrap_or_else(|| host.to_string());
    let server_name = ServerName::try_from(name.clone())
        .map_err(|_| anyhow!("{name:?} is not a host name or address"))?;
    let address = args.address.clone();
    let channel = Endpoint::from_shared(format!("http://{}", args.address))?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(service_fn(move |_: Uri| {
            let (address, tls, server_name) =
                (address.clone(), Arc::clone(&tls), server_name.clone());
            async move {
                let tcp = TcpStream::connect(address).await?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(server_name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to {}", args.address))?;
    let mut client = SnapshotMetadataClient::new(channel);
    let refused = |s: tonic::Status| anyhow!("{:?}: {}", s.code(), s.message());
    let mut ranges: Vec<BlockMetadata> = Vec::new();
    let mut capacity = 0;
    match args.call {
        Call::Allocated { snapshot } => {
            let mut stream = client
                .get_metadata_allocated(GetMetadataAllocatedRequest {
                    security_token: token,
                    namespace: args.namespace,
                    snapshot_name: snapshot,
                    starting_offset: args.starting_offset,
                    max_results: args.max_results,
                })
                .await
                .map_err(refused)?
                .into_inner();
            while let Some(m) = stream.message().await.map_err(refused)? {
                capacity = m.volume_capacity_bytes;
                ranges.extend(m.block_metadata);
            }
        }
        Call::Delta {
            base_snapshot_id,
            target,
        } => {
            let mut stream = client
                .get_metadata_delta(GetMetadataDeltaRequest {
                    security_token: token,
                    namespace: args.namespace,
                    base_snapshot_id,
                    target_snapshot_name: target,
                    starting_offset: args.starting_offset,
                    max_results: args.max_results,
                })
                .await
                .map_err(refused)?
                .into_inner();
            while let Some(m) = stream.message().await.map_err(refused)? {
                capacity = m.volume_capacity_bytes;
                ranges.extend(m.block_metadata);
            }
        }
    }
    for r in &ranges {
        println!("{} {}", r.byte_offset, r.size_bytes);
    }
    let bytes: i64 = ranges.iter().map(|r| r.size_bytes).sum();
    eprintln!(
        "{} ranges, {bytes} bytes, volume capacity {capacity} bytes",
        ranges.len()
    );
    Ok(())
}
