//! Transport security between Tessera's processes.
//!
//! Everything that talks to a replica daemon — the controller (control gRPC and
//! in-sync declarations on the data plane), the engines on the nodes (data plane),
//! other replica daemons (copy reads) and the operator's CLI — does so over mutual TLS
//! with certificates from one cluster CA. A certificate names one of three
//! [`Identity`]s in its subjectAltName; a replica decides what a caller may do by that
//! identity alone (see the replica's `control_auth` and data-plane handshake).
//!
//! This crate is the one owner of that contract:
//! * [`identity`]: the identities and the DNS names certificates carry for them;
//! * [`material`]: the files of a certificate directory (`ca.crt`, `tls.crt`,
//!   `tls.key`, the keys of a Kubernetes TLS Secret) and the rustls configurations
//!   built from them;
//! * [`context`]: a loaded directory that reloads itself when the files change, so a
//!   rotated Secret takes effect without a restart: connections already open keep the
//!   configuration they were made with, new ones use the new one;
//! * [`serving`]: the same for the server certificate of a port whose callers bring
//!   none (the SnapshotMetadata API);
//! * [`transport`]: TLS or, only when the operator asks for it, plain text, on a TCP
//!   stream in either direction; why a connection was refused;
//! * [`grpc`]: the same for tonic servers (an incoming stream whose connections carry
//!   the caller's identity into every request) and channels;
//! * [`args`]: the command-line flags every binary shares;
//! * [`generate`] (feature `generate`): a cluster CA and the certificates it issues,
//!   for `tessera certs`, `tessera up` and the tests.

pub mod args;
pub mod context;
#[cfg(feature = "generate")]
pub mod generate;
pub mod grpc;
pub mod identity;
pub mod material;
pub mod metrics;
pub mod serving;
pub mod transport;

pub use args::TlsArgs;
pub use context::TlsContext;
pub use identity::{Identity, PeerIdentity};
pub use material::TlsError;
pub use serving::ServingCert;
pub use transport::{Peer, Refusal, RefusalCounts, Stream, Transport};
