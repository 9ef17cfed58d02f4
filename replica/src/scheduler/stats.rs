//! Per-volume counters of the scheduler.
//!
//! Kept as plain integers under the scheduler's lock (every update already happens
//! there), and copied out as a [`VolumeStats`] snapshot for metrics and tests.

use std::time::Duration;

/// A snapshot of one volume's scheduling counters. Why these: queued and in-flight show
/// load, throttled time shows the volume's own limits at work, deadline misses show the
/// device (or other volumes) failing it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Requests waiting in the volume's queues.
    pub queued: u64,
    /// Requests handed to the engine and not yet completed.
    pub in_flight: u64,
    /// Total time the volume had queued requests its token buckets did not admit.
    pub throttled: Duration,
    /// Requests that completed (successfully or not) after their deadline. A throttled
    /// volume misses deadlines by design; compare with `throttled` to tell the cases apart.
    pub deadline_misses: u64,
    /// Requests completed successfully.
    pub completed_ops: u64,
    /// Bytes read or written by successfully completed requests.
    pub completed_bytes: u64,
    /// Requests that completed with an error.
    pub failed_ops: u64,
    /// Queued requests dropped because their waiter went away before dispatch.
    pub cancelled_ops: u64,
}

/// Counters the scheduler updates; queue length and throttled time come from the
/// queues themselves.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub in_flight: u64,
    pub deadline_misses: u64,
    pub completed_ops: u64,
    pub completed_bytes: u64,
    pub failed_ops: u64,
    pub cancelled_ops: u64,
}

impl Counters {
    /// Records one completion at `now_ns` of a request due at `deadline_ns`.
    pub fn record_completion(&mut self, ok_bytes: Option<u64>, deadline_ns: u64, now_ns: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if now_ns > deadline_ns {
            self.deadline_misses += 1;
        }
        match ok_bytes {
            Some(bytes) => {
                self.completed_ops += 1;
                self.completed_bytes += bytes;
            }
            None => self.failed_ops += 1,
        }
    }

    /// Builds the snapshot, adding what the queues know.
    pub fn snapshot(&self, queued: usize, throttled: Duration) -> VolumeStats {
        VolumeStats {
            queued: queued as u64,
            in_flight: self.in_flight,
            throttled,
            deadline_misses: self.deadline_misses,
            completed_ops: self.completed_ops,
            completed_bytes: self.completed_bytes,
            failed_ops: self.failed_ops,
            cancelled_ops: self.cancelled_ops,
        }
    }
}
