//! CSI endpoints: the `--endpoint` values Kubernetes and the tools hand the plugins.
//!
//! Every Tessera process that serves or dials CSI parses endpoints the same way, so the
//! rules live next to the wire types: `unix:///abs/path` (also `unix:/abs/path`) for
//! sockets, `tcp://host:port` only where a plugin serves over TCP for debugging.

use std::path::PathBuf;

/// Where the CSI gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsiEndpoint {
    /// A unix socket path (`unix:///path` or `unix:/path`), the CSI norm.
    Unix(PathBuf),
    /// `tcp://host:port`, for manual debugging only.
    Tcp(String),
}

/// An endpoint string that is neither `unix://` nor `tcp://`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {0:?} must be unix:///path/to/socket or tcp://host:port")]
pub struct EndpointError(pub String);

impl std::str::FromStr for CsiEndpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if p.starts_with('/') {
                return Ok(Self::Unix(PathBuf::from(p)));
            }
        } else if let Some(a) = s.strip_prefix("tcp://") {
            if !a.is_empty() {
                return Ok(Self::Tcp(a.to_string()));
            }
        }
        Err(EndpointError(s.to_string()))
    }
}

/// The socket path of a unix-socket CSI endpoint: `unix:///path`, `unix:/path`, or a
/// plain path (what the node plugin and the CLI accept). Other schemes are refused,
/// because those processes only speak CSI over unix sockets.
pub fn unix_socket_path(endpoint: &str) -> Result<PathBuf, EndpointError> {
    match endpoint.parse::<CsiEndpoint>() {
        Ok(CsiEndpoint::Unix(path)) => Ok(path),
        Ok(CsiEndpoint::Tcp(_)) => Err(EndpointError(endpoint.to_string())),
        Err(e) => match endpoint.strip_prefix("unix://") {
            // `unix://relative` names a path too; only an empty one is meaningless.
            Some(rest) if !rest.is_empty() => Ok(PathBuf::from(rest)),
            Some(_) => Err(e),
            None if endpoint.is_empty() || endpoint.contains("://") => Err(e),
            None => Ok(PathBuf::from(endpoint)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!(
            "unix:///csi/csi.sock".parse(),
            Ok(CsiEndpoint::Unix("/csi/csi.sock".into()))
        );
        assert_eq!(
            "unix:/csi/csi.sock".parse(),
            Ok(CsiEndpoint::Unix("/csi/csi.sock".into()))
        );
        assert_eq!(
            "tcp://127.0.0.1:10000".parse(),
            Ok(CsiEndpoint::Tcp("127.0.0.1:10000".into()))
        );
        for bad in ["/csi.sock", "unix://relative", "http://x", "tcp://", ""] {
            assert!(bad.parse::<CsiEndpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_socket_paths_accept_plain_paths_and_refuse_other_schemes() {
        assert_eq!(
            unix_socket_path("unix:///run/csi/n.sock"),
            Ok(PathBuf::from("/run/csi/n.sock"))
        );
        assert_eq!(
            unix_socket_path("/tmp/x.sock"),
            Ok(PathBuf::from("/tmp/x.sock"))
        );
        for bad in ["tcp://127.0.0.1:1", "unix://", "http://x", ""] {
            assert!(unix_socket_path(bad).is_err(), "{bad}");
        }
    }
}
