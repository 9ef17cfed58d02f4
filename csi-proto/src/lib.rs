//! CSI v1.12 wire types and gRPC service traits for Tessera.
//!
//! Everything Kubernetes says to Tessera arrives through these types: the kubelet
//! and the external sidecars speak CSI over a unix socket, and `tessera-controller`
//! and `tessera-node` implement the generated service traits.
//!
//! Layout:
//! * [`v1`]: the code generated from `proto/csi.proto` (package `csi.v1`), unchanged.
//! * [`k8s_snapshot_metadata`]: the code generated from
//!   `proto/k8s_snapshot_metadata.proto`, the Kubernetes-facing SnapshotMetadata API
//!   the controller serves to backup applications.
//! * [`endpoint`]: parsing of CSI `--endpoint` values (unix sockets, tcp for debugging).
//! * [`identity`]: the CSI Identity service both plugins serve (the driver's name and
//!   plugin capabilities are the same whichever process answers).
//! * [`unix_channel`]: dialling gRPC over unix sockets (tonic does not by itself).
//! * [`DRIVER_NAME`], [`TOPOLOGY_NODE_KEY`]: names every component must agree on.
//!
//! This crate must stay slim: wire types and driver-wide identity only, no dependency on
//! other Tessera crates.

/// Generated CSI v1 messages, clients and servers.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// Generated messages, client and server of the Kubernetes SnapshotMetadata API
/// (package `snapshotmetadata`: what backup applications call, with a token).
#[allow(clippy::all, missing_docs)]
pub mod k8s_snapshot_metadata {
    tonic::include_proto!("snapshotmetadata");
}

pub mod endpoint;
pub mod identity;
pub mod unix_channel;

/// The CSI driver name: the CSIDriver object, StorageClass provisioner and
/// GetPluginInfo all use it, so it lives in one place.
pub const DRIVER_NAME: &str = "tessera.csi.dev";

/// Topology segment key naming the node a replica daemon or node plugin runs on.
pub const TOPOLOGY_NODE_KEY: &str = "topology.tessera.csi.dev/node";

/// Topology segment key naming the zone (failure domain above the node).
pub const TOPOLOGY_ZONE_KEY: &str = "topology.tessera.csi.dev/zone";

#[cfg(test)]
mod wire_identity {
    use sha2::{Digest, Sha256};

    /// sha256 of the CSI v1.12.0 `csi.proto` file descriptor as protoc serialises it,
    /// with the file renamed `csi.proto` and source positions and comments removed;
    /// computed once from the upstream file. Any change to a package, service, message,
    /// field number, type or custom option changes it; comments do not.
    const CSI_V1_12_0_DESCRIPTOR_SHA256: &str =
        "ac15e6dd86e78cf779a76826b1f43b34aa245f8136f23703031fecf57991a815";

    fn varint(buf: &[u8], pos: &mut usize) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = buf[*pos];
            *pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    }

    fn put_varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    /// Splits a message into (field number, whole encoded field) without decoding it,
    /// so extensions (the CSI custom options) survive untouched.
    fn fields(buf: &[u8]) -> Vec<(u64, &[u8], &[u8])> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let start = pos;
            let key = varint(buf, &mut pos);
            let body_start;
            match key & 7 {
                0 => {
                    varint(buf, &mut pos);
                    body_start = pos;
                }
                2 => {
                    let len = varint(buf, &mut pos) as usize;
                    body_start = pos;
                    pos += len;
                }
                1 => {
                    body_start = pos;
                    pos += 8;
                }
                5 => {
                    body_start = pos;
                    pos += 4;
                }
                other => panic!("unexpected wire type {other} in a descriptor"),
            }
            out.push((key >> 3, &buf[start..pos], &buf[body_start..pos]));
        }
        out
    }

    #[test]
    fn schema_is_wire_identical_to_csi_v1_12_0() {
        let set = include_bytes!(concat!(env!("OUT_DIR"), "/csi_descriptor.bin"));
        // FileDescriptorSet.file = 1; FileDescriptorProto.name = 1, .package = 2,
        // .source_code_info = 9.
        let file = fields(set)
            .into_iter()
            .map(|(_, _, body)| body)
            .find(|body| {
                fields(body)
                    .iter()
                    .any(|(n, _, v)| *n == 2 && *v == b"csi.v1")
            })
            .expect("the descriptor set holds package csi.v1");
        let mut canonical = Vec::new();
        for (number, whole, _) in fields(file) {
            match number {
                1 => {
                    canonical.push(0x0a);
                    put_varint(&mut canonical, "csi.proto".len() as u64);
                    canonical.extend_from_slice(b"csi.proto");
                }
                9 => {}
                _ => canonical.extend_from_slice(whole),
            }
        }
        let digest = hex::encode(Sha256::digest(&canonical));
        assert_eq!(digest, CSI_V1_12_0_DESCRIPTOR_SHA256);
    }
}
