//! Parsing of the CSI `--endpoint` flag.

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
}
