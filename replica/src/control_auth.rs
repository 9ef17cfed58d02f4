//! Who may call what on the control port.
//!
//! The caller's identity is the one its certificate names (see `tessera-tls`); this
//! module is the policy. The controller owns volume records, so every mutation and
//! every read of records is its alone; replicas read each other's blocks to copy and
//! repair; any identity may ask what a daemon is. A refused call is answered
//! PERMISSION_DENIED before it reaches the service, so nothing changes, and is
//! logged and counted with the daemon's other refusals. Over plain text (the
//! operator's `--insecure-plaintext`) nobody is authenticated and nothing is refused.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tessera_tls::grpc::{peer_of, CONTROL_PORT};
use tessera_tls::{Identity, Refusal, Transport};
use tonic::codegen::http;

/// The identities that may call `method` (the last segment of the gRPC path).
pub fn allowed(method: &str) -> &'static [Identity] {
    match method {
        "GetInfo" => &Identity::ALL,
        "ReadSnapshotBlocks" => &[Identity::Replica],
        // Every other method, and any this build does not know (the controller then
        // gets UNIMPLEMENTED, others PERMISSION_DENIED).
        _ => &[Identity::Controller],
    }
}

/// The layer that applies [`allowed`] to every call of a tonic server whose
/// connections come from `tessera_tls::grpc::incoming`.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    transport: Transport,
}

impl AuthorizeLayer {
    /// Refusals are counted on `transport`.
    pub fn new(transport: Transport) -> Self {
        AuthorizeLayer { transport }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            transport: self.transport.clone(),
        }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    transport: Transport,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let refusal = match peer_of(&request) {
            Some(peer) if peer.identity.is_one_of(allowed(&method)) => None,
            Some(peer) => {
                let refusal = Refusal::wrong_identity(peer.identity, format!("call {method}"));
                self.transport.refused(CONTROL_PORT, peer.addr, &refusal);
                Some(refusal)
            }
            // Not through the transport's incoming stream: a server wired wrongly.
            None => Some(Refusal::handshake(format!(
                "{method}: the connection did not come through the transport"
            ))),
        };
        match refusal {
            None => Box::pin(self.inner.call(request)),
            Some(r) => {
                let status = tonic::Status::permission_denied(format!(
                    "{}; it is the {} identity's",
                    r.detail,
                    allowed(&method)
                        .iter()
                        .map(|i| i.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_the_controllers_and_copies_the_replicas() {
        for m in [
            "CreateVolume",
            "DeleteVolume",
            "UpdateVolume",
            "RaiseEpoch",
            "ExpandVolume",
            "CreateSnapshot",
            "DeleteSnapshot",
            "GetVolume",
            "ListVolumes",
            "ListSnapshots",
            "SnapshotRanges",
            "SomethingNew",
        ] {
            assert_eq!(allowed(m), &[Identity::Controller], "{m}");
        }
        assert_eq!(allowed("ReadSnapshotBlocks"), &[Identity::Replica]);
        assert_eq!(allowed("GetInfo"), &Identity::ALL);
    }
}
