//! Latency histograms per volume and operation, cheap enough for the data path.
//!
//! A connection or engine resolves its volume's histograms once
//! ([`VolumeLatency::volume`]) and observes through the returned handles: no label
//! look-up, no allocation per request, one uncontended lock inside the histogram. The
//! series of a volume exist while some handle to it is alive, so a deleted or detached
//! volume leaves no stale series behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A block operation whose latency is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Reading blocks.
    Read,
    /// Writing blocks.
    Write,
    /// Discarding blocks.
    Trim,
    /// Making earlier writes durable.
    Flush,
}

impl Op {
    /// Every operation, in the order of their histograms.
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Trim, Op::Flush];

    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::Flush => "flush",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl EncodeLabelValue for Op {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VolumeOp {
    volume_id: String,
    op: Op,
}

/// Bucket bounds: 50 µs doubling to about 6.5 s, from a cached NVMe read to a
/// flush behind a throttled volume.
fn new_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 18))
}

struct Shared {
    family: Family<VolumeOp, Histogram, fn() -> Histogram>,
    /// The live handles per volume, so every user of a volume shares one set.
    open: Mutex<HashMap<String, Weak<VolumeOpHistograms>>>,
}

fn lock(
    open: &Mutex<HashMap<String, Weak<VolumeOpHistograms>>>,
) -> MutexGuard<'_, HashMap<String, Weak<VolumeOpHistograms>>> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A histogram family labelled `volume_id` and `op`. Clones share the family.
#[derive(Clone)]
pub struct VolumeLatency {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VolumeLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeLatency")
            .field("volumes", &lock(&self.shared.open).len())
            .finish()
    }
}

impl Default for VolumeLatency {
    fn default() -> Self {
        VolumeLatency {
            shared: Arc::new(Shared {
                family: Family::new_with_constructor(new_histogram as fn() -> Histogram),
                open: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl VolumeLatency {
    /// Registers the family in `registry` as `name` (which should end in `_seconds`).
    /// Handles taken before registering observe into the same histograms.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.shared.family.clone());
    }

    /// The histograms of `volume_id`, created on first use; shared by every caller
    /// until the last handle is dropped, which removes the volume's series.
    pub fn volume(&self, volume_id: &str) -> Arc<VolumeOpHistograms> {
        let mut open = lock(&self.shared.open);
        if let Some(live) = open.get(volume_id).and_then(Weak::upgrade) {
            return live;
        }
        let by_op = Op::ALL.map(|op| {
            self.shared.family.get_or_create_owned(&VolumeOp {
                volume_id: volume_id.to_owned(),
                op,
            })
        });
        let handles = Arc::new(VolumeOpHistograms {
            by_op,
            volume_id: volume_id.to_owned(),
            shared: Arc::clone(&self.shared),
        });
        open.insert(volume_id.to_owned(), Arc::downgrade(&handles));
        handles
    }
}

/// One volume's histograms, one per [`Op`].
pub struct VolumeOpHistograms {
    by_op: [Histogram; 4],
    volume_id: String,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VolumeOpHistograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeOpHistograms")
            .field("volume_id", &self.volume_id)
            .finish_non_exhaustive()
    }
}

impl VolumeOpHistograms {
    /// Records that one `op` took `elapsed`.
    pub fn observe(&self, op: Op, elapsed: Duration) {
        self.by_op[op.index()].observe(elapsed.as_secs_f64());
    }
}

impl Drop for VolumeOpHistograms {
    fn drop(&mut self) {
        let mut open = lock(&self.shared.open);
        // Someone resolved the volume again since the last handle went: the new
        // handles share these histograms, so the series stay.
        if open
            .get(&self.volume_id)
            .is_some_and(|handle| handle.strong_count() > 0)
        {
            return;
        }
        open.remove(&self.volume_id);
        for op in Op::ALL {
            self.shared.family.remove(&VolumeOp {
                volume_id: self.volume_id.clone(),
                op,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::render;

    #[test]
    fn observes_per_volume_and_op_and_forgets_closed_volumes() {
        let mut registry = Registry::default();
        let latency = VolumeLatency::default();
        let a = latency.volume("a");
        latency.register(&mut registry, "t_op_seconds", "Op latency.");
        let a_again = latency.volume("a");
        assert!(Arc::ptr_eq(&a, &a_again), "one set of handles per volume");
        a.observe(Op::Write, Duration::from_micros(80));
        a_again.observe(Op::Write, Duration::from_millis(3));
        latency
            .volume("b")
            .observe(Op::Read, Duration::from_secs(1));

        let page = render(&registry).expect("render");
        for line in [
            "# TYPE t_op_seconds histogram\n",
            "t_op_seconds_bucket{volume_id=\"a\",op=\"write\",le=\"0.0001\"} 1\n",
            "t_op_seconds_bucket{volume_id=\"a\",op=\"write\",le=\"+Inf\"} 2\n",
            "t_op_seconds_count{volume_id=\"a\",op=\"write\"} 2\n",
            "t_op_seconds_count{volume_id=\"a\",op=\"flush\"} 0\n",
        ] {
            assert!(page.contains(line), "{line:?} missing from\n{page}");
        }
        // The handle of "b" was dropped at once: no series left for it.
        assert!(!page.contains("volume_id=\"b\""), "{page}");

        drop(a);
        assert!(render(&registry)
            .expect("render")
            .contains("volume_id=\"a\""));
        drop(a_again);
        assert!(!render(&registry)
            .expect("render")
            .contains("volume_id=\"a\""));
    }
}
