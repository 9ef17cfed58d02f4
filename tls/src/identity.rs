//! Who a certificate says its holder is.
//!
//! Kinds of process, not individual hosts: every node's engine-host presents the same
//! node identity (a DaemonSet mounts one Secret), and every replica daemon the same
//! replica identity. That is what the replicas authorize by; which node a request
//! comes from is the epoch fence's business, not TLS's.
//!
//! The identity is a DNS name in the certificate's subjectAltName (Helm's
//! `genSignedCert` and `tessera certs` both put it there, and in the CN). A client
//! always verifies the server against the replica name, so clients need not know
//! anything about the address they dial (pod IPs change).

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::{CertificateDer, ServerName};

/// The kinds of Tessera process a certificate can identify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// The CSI controller (and the operator's CLI, which acts with its authority).
    Controller,
    /// A node's engine-host: the data plane of attached volumes.
    Node,
    /// A replica daemon: serves both ports, and reads other daemons' copies.
    Replica,
}

impl Identity {
    /// Every identity.
    pub const ALL: [Identity; 3] = [Identity::Controller, Identity::Node, Identity::Replica];

    /// The DNS name a certificate of this identity carries in its subjectAltName.
    pub fn dns_name(self) -> &'static str {
        match self {
            Identity::Controller => "controller.tessera",
            Identity::Node => "node.tessera",
            Identity::Replica => "replica.tessera",
        }
    }

    /// The short name used in flags, file names, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Identity::Controller => "controller",
            Identity::Node => "node",
            Identity::Replica => "replica",
        }
    }

    /// The identity `cert` (already verified against the CA) names, if exactly one.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Option<Identity> {
        let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
        let mut named = Identity::ALL.into_iter().filter(|id| {
            ServerName::try_from(id.dns_name())
                .is_ok_and(|name| parsed.verify_is_valid_for_subject_name(&name).is_ok())
        });
        let first = named.next()?;
        // A certificate naming two identities names none: granting either would let
        // one leaked key act as both.
        named.next().is_none().then_some(first)
    }

    /// The name clients verify a replica daemon's certificate against.
    pub(crate) fn replica_server_name() -> ServerName<'static> {
        ServerName::DnsName(
            rustls::pki_types::DnsName::try_from(Identity::Replica.dns_name())
                .expect("a valid DNS name")
                .to_owned(),
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not one of the identity names.
#[derive(Debug, thiserror::Error)]
#[error("unknown identity {0:?} (expected controller, node or replica)")]
pub struct UnknownIdentity(String);

impl FromStr for Identity {
    type Err = UnknownIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::ALL
            .into_iter()
            .find(|id| id.as_str() == s)
            .ok_or_else(|| UnknownIdentity(s.to_string()))
    }
}

/// Who is on the other end of a connection, as far as authorization is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The connection is plain text (the operator chose `--insecure-plaintext`):
    /// nobody is authenticated, so nothing can be refused by identity.
    Unverified,
    /// A certificate from the cluster CA naming this identity.
    Verified(Identity),
}

impl PeerIdentity {
    /// Whether a caller of this identity may do what `allowed` lists.
    pub fn is_one_of(self, allowed: &[Identity]) -> bool {
        match self {
            PeerIdentity::Unverified => true,
            PeerIdentity::Verified(id) => allowed.contains(&id),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Unverified => f.write_str("unverified (plain text)"),
            PeerIdentity::Verified(id) => id.fmt(f),
        }
    }
}
