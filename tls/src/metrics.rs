//! What a process's transport exports on its `/metrics`.

use std::fmt;

use tessera_telemetry::exposition::{counters, gauge};
use tessera_telemetry::prometheus_client::collector::Collector;
use tessera_telemetry::prometheus_client::encoding::DescriptorEncoder;

use crate::transport::Transport;

/// A counter without labels, in the families `counters` encodes.
const NO_LABELS: [(&str, &str); 0] = [];

/// Reads a [`Transport`] at scrape time: `<prefix>_transport_plaintext` (1 when the
/// operator turned TLS off), `<prefix>_tls_reloads_total`,
/// `<prefix>_tls_reload_failures_total` and `<prefix>_refused_total{port,reason}`.
#[derive(Debug)]
pub struct TransportCollector {
    prefix: &'static str,
    transport: Transport,
}

impl TransportCollector {
    /// Metrics named `<prefix>_…` (`tessera_replica`, `tessera_controller`, ...).
    pub fn new(prefix: &'static str, transport: Transport) -> Self {
        TransportCollector { prefix, transport }
    }
}

impl Collector for TransportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let p = self.prefix;
        gauge(
            &mut encoder,
            &format!("{p}_transport_plaintext"),
            "1 when the replica ports are used without TLS (--insecure-plaintext): INSECURE.",
            u64::from(self.transport.is_plaintext()),
        )?;
        let context = self.transport.tls_context();
        counters(
            &mut encoder,
            &format!("{p}_tls_reloads"),
            "Times changed certificate files were taken without a restart.",
            [(NO_LABELS, context.map_or(0, |c| c.reloads()))],
        )?;
        counters(
            &mut encoder,
            &format!("{p}_tls_reload_failures"),
            "Checks that found changed certificate files unusable (the previous ones stay).",
            [(NO_LABELS, context.map_or(0, |c| c.reload_failures()))],
        )?;
        counters(
            &mut encoder,
            &format!("{p}_refused"),
            "Connections and calls refused, by port and reason (no_certificate, \
             untrusted_certificate, unknown_identity, wrong_identity, handshake).",
            self.transport
                .refusals()
                .snapshot()
                .into_iter()
                .map(|(port, reason, n)| ([("port", port), ("reason", reason.as_str())], n)),
        )
    }
}
