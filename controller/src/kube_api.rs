//! The few Kubernetes API calls the controller makes itself: reviewing a backup
//! application's token and its access (TokenReview, SubjectAccessReview) and reading
//! VolumeSnapshots, for the SnapshotMetadata API (`k8s_snapshot_metadata`).
//!
//! A client library would bring a large dependency tree for four requests, so this
//! is HTTP/1.1 over rustls, one connection per request (the calls are rare: one
//! review per backup stream), with the pod's service-account credentials: the API
//! server from `KUBERNETES_SERVICE_HOST`/`_PORT`, its CA and the token from the
//! service-account mount. The token file is read at every call, since projected
//! tokens are rotated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tessera_tls::TlsError;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where a pod finds its service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Bound on one API request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body read (a TokenReview or a VolumeSnapshot is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("not running in a Kubernetes pod: {0} is not set")]
    NotInCluster(&'static str),
    #[error("{0:?} is not a host name or address")]
    BadHost(String),
    #[error("the API server's CA")]
    Tls(#[from] TlsError),
    #[error("reading the service-account token {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}")]
    Io {
        method: Method,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}")]
    Http {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {path}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout { method: Method, path: String },
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{method} {path}: unexpected response")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A client of one API server.
#[derive(Clone)]
pub struct KubeApi {
    authority: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token_file: PathBuf,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// The API server of the pod this runs in.
    pub fn in_cluster() -> Result<KubeApi, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubeError::NotInCluster("KUBERNETES_SERVICE_HOST"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .map_err(|_| KubeError::NotInCluster("KUBERNETES_SERVICE_PORT"))?;
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        KubeApi::new(&host, &port, &dir.join("ca.crt"), dir.join("token"))
    }

    /// The API server at `host:port`, trusted by the CA in `ca_file`, called with the
    /// bearer token in `token_file`.
    pub fn new(
        host: &str,
        port: &str,
        ca_file: &Path,
        token_file: PathBuf,
    ) -> Result<KubeApi, KubeError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_string())
            .map_err(|_| KubeError::BadHost(host.to_string()))?;
        let authority = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        Ok(KubeApi {
            authority,
            server_name,
            tls: tessera_tls::material::client_trusting(ca_file)?,
            token_file,
        })
    }

    /// POSTs `body` as JSON to `path` and decodes the answer.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, KubeError> {
        let bytes = serde_json::to_vec(body).map_err(|source| KubeError::Decode {
            method: Method::POST,
            path: path.to_string(),
            source,
        })?;
        let (status, answer) = self.request(Method::POST, path, Some(bytes)).await?;
        self.decode(Method::POST, path, status, &answer)
    }

    /// GETs `path`; `None` when the object does not exist.
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<Option<R>, KubeError> {
        let (status, answer) = self.request(Method::GET, path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.decode(Method::GET, path, status, &answer).map(Some)
    }

    fn decode<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        status: StatusCode,
        body: &[u8],
    ) -> Result<R, KubeError> {
        if !status.is_success() {
            return Err(KubeError::Status {
                method,
                path: path.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        serde_json::from_slice(body).map_err(|source| KubeError::Decode {
            method,
            path: path.to_string(),
            source,
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), KubeError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| KubeError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let io = |source| KubeError::Io {
            method: method.clone(),
            path: path.to_string(),
            source,
        };
        let http = |source| KubeError::Http {
            method: method.clone(),
            path: path.to_string(),
            source,
        };
        let exchange = async {
            let tcp = TcpStream::connect(&self.authority).await.map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            let tls = TlsConnector::from(Arc::clone(&self.tls))
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(io)?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(http)?;
            let driver = tokio::spawn(connection);
            let request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, &self.authority)
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", token.trim()),
                )
                .header(hyper::header::ACCEPT, "application/json")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| io(std::io::Error::other(e)))?;
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
            let answer = limited
                .collect()
                .await
                .map_err(|e| io(std::io::Error::other(e)))?
                .to_bytes();
            driver.abort();
            Ok((status, answer))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| KubeError::Timeout {
                method: method.clone(),
                path: path.to_string(),
            })?
    }
}
