//! Rendering a registry for `/metrics`, and the few helpers per-scrape collectors share.
//!
//! Metrics whose values live elsewhere (a catalog's capacity, a pool's daemons) are not
//! copied into long-lived gauges: a [`Collector`](prometheus_client::collector::Collector)
//! reads them at scrape time and encodes them with [`gauge`], [`gauges`] and
//! [`counters`]. Counter names are given without `_total`; the encoder appends it.

use std::fmt;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// `Content-Type` of [`render`]'s output: the Prometheus text format 0.0.4, which every
/// Prometheus-compatible scraper reads.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The registry's metrics (collectors run now) in the Prometheus text format.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut page = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut page, registry)?;
    Ok(page)
}

/// One gauge without labels.
pub fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A gauge family: one sample per label set.
pub fn gauges<L, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    V: EncodeGaugeValue,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter family: one sample per label set (`name` without `_total`).
pub fn counters<L, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    V: EncodeCounterValue,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::metrics::counter::Counter;

    #[derive(Debug)]
    struct Volumes;

    impl Collector for Volumes {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            gauge(&mut encoder, "t_volumes", "Volumes.", 2u64)?;
            gauges(
                &mut encoder,
                "t_volume_bytes",
                "Bytes per volume.",
                [
                    ([("volume_id", "a\"b")], 3u64),
                    ([("volume_id", "c")], 4u64),
                ],
            )?;
            counters(
                &mut encoder,
                "t_volume_errors",
                "Errors per volume.",
                [([("volume_id", "c")], 1.5f64)],
            )
        }
    }

    #[test]
    fn renders_registered_metrics_and_collectors() {
        let mut registry = Registry::default();
        let requests: Counter = Counter::default();
        registry.register("t_requests", "Requests.", requests.clone());
        registry.register_collector(Box::new(Volumes));
        requests.inc();
        let page = render(&registry).expect("render");
        for line in [
            "# TYPE t_requests_total counter\nt_requests_total 1\n",
            "# TYPE t_volumes gauge\nt_volumes 2\n",
            "t_volume_bytes{volume_id=\"a\\\"b\"} 3\n",
            "t_volume_bytes{volume_id=\"c\"} 4\n",
            "# TYPE t_volume_errors_total counter\nt_volume_errors_total{volume_id=\"c\"} 1.5\n",
        ] {
            assert!(page.contains(line), "{line:?} missing from\n{page}");
        }
    }
}
