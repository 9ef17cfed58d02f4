//! Counting gRPC calls by method and status code, the one request counter of the
//! controller's CSI services and the replica daemon's control service.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::Code;

/// A status code as its name (`Ok`, `NotFound`, ...), the `code` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CodeName(Code);

impl EncodeLabelValue for CodeName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(encoder, "{:?}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Call {
    method: &'static str,
    code: CodeName,
}

/// Finished calls by `method` and `code`. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct GrpcRequests {
    calls: Family<Call, Counter>,
}

impl GrpcRequests {
    /// Registers the counters in `registry` as `name` (without `_total`).
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.calls.clone());
    }

    /// Counts one finished call.
    pub fn observe(&self, method: &'static str, code: Code) {
        self.calls
            .get_or_create(&Call {
                method,
                code: CodeName(code),
            })
            .inc();
    }

    /// How many `method` calls ended with `code`.
    pub fn count(&self, method: &'static str, code: Code) -> u64 {
        self.calls
            .get(&Call {
                method,
                code: CodeName(code),
            })
            .map_or(0, |c| c.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::render;

    #[test]
    fn counts_by_method_and_code_name() {
        let mut registry = Registry::default();
        let requests = GrpcRequests::default();
        requests.register(&mut registry, "t_requests", "Calls.");
        requests.observe("CreateVolume", Code::Ok);
        requests.observe("CreateVolume", Code::Ok);
        requests.observe("CreateVolume", Code::AlreadyExists);
        assert_eq!(requests.count("CreateVolume", Code::Ok), 2);
        assert_eq!(requests.count("DeleteVolume", Code::Ok), 0);
        let page = render(&registry).expect("render");
        assert!(
            page.contains("t_requests_total{method=\"CreateVolume\",code=\"Ok\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("t_requests_total{method=\"CreateVolume\",code=\"AlreadyExists\"} 1\n"),
            "{page}"
        );
    }
}
