//! Keeping background I/O out of foreground's way in the device queue.
//!
//! EDF orders only what waits in the scheduler; once a request is in the engine, the
//! device serves it in its own order. A rebuild that fills the device queue with
//! 1 MiB writes therefore delays every foreground request behind megabytes of
//! transfers, whatever their deadlines say (issue 4's measurement: foreground QD1 p99
//! 194 µs alone, 3.4 ms next to such a stream). So while foreground I/O is active:
//!
//! * at most [`BackgroundLimits::busy_depth`] background requests are in the engine,
//!   the rest wait in their queues (EDF still picks foreground first among eligible
//!   requests, so this only bounds what is already in the device);
//! * background transfers larger than [`BackgroundLimits::max_transfer`] are issued by
//!   the engine in pieces of that size, one after the other, so each one occupies the
//!   device only briefly.
//!
//! "Active" means a foreground request is in flight, or one was queued or completed
//! within the last [`BackgroundLimits::linger`]: a QD1 workload has short gaps between
//! requests, and letting background refill the device queue in every gap would put
//! the next foreground request behind it again. When foreground has been quiet for
//! longer, background gets the whole queue depth (in pieces) until it shows up again.
//! Pieces are used all the time, not only while foreground is active: a request
//! dispatched in a quiet moment may still be in the device when foreground returns.

use std::time::Duration;

use super::clock::duration_ns;
use super::IoClass;

/// Limits on background I/O (see the module doc). Part of the scheduler's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundLimits {
    /// Most background requests in the engine while foreground is active (≥ 1, so
    /// background always progresses).
    pub busy_depth: u32,
    /// Largest single transfer of a background request; longer ones go to the device
    /// in pieces of this size, rounded down to a multiple of 4 KiB (0: never split).
    pub max_transfer: usize,
    /// How long foreground counts as active after its last request was queued or
    /// completed.
    pub linger: Duration,
}

impl Default for BackgroundLimits {
    /// Two requests of at most 128 KiB: a 4 KiB foreground request waits behind at most
    /// 256 KiB of background transfers (tens of microseconds on an SSD), while a stream
    /// of pieces still keeps the device busy. 10 ms of linger bridges the gaps of any
    /// foreground workload above ~100 IOPS.
    fn default() -> Self {
        BackgroundLimits {
            busy_depth: 2,
            max_transfer: 128 << 10,
            linger: Duration::from_millis(10),
        }
    }
}

impl BackgroundLimits {
    /// The piece size the engine should use for a request of `class`.
    pub(crate) fn max_transfer_for(&self, class: IoClass) -> Option<usize> {
        (class == IoClass::Background && self.max_transfer > 0).then_some(self.max_transfer)
    }
}

/// What the scheduler tracks to apply [`BackgroundLimits`]; lives under its lock.
#[derive(Debug)]
pub(crate) struct BackgroundGate {
    limits: BackgroundLimits,
    linger_ns: u64,
    foreground_in_flight: usize,
    background_in_flight: usize,
    /// Clock time of the last foreground enqueue or completion.
    foreground_seen_ns: Option<u64>,
}

impl BackgroundGate {
    pub(crate) fn new(limits: BackgroundLimits) -> Self {
        BackgroundGate {
            limits: BackgroundLimits {
                busy_depth: limits.busy_depth.max(1),
                ..limits
            },
            linger_ns: duration_ns(limits.linger),
            foreground_in_flight: 0,
            background_in_flight: 0,
            foreground_seen_ns: None,
        }
    }

    /// A request of `class` was queued at `now`.
    pub(crate) fn queued(&mut self, class: IoClass, now: u64) {
        if class != IoClass::Background {
            self.foreground_seen_ns = Some(now);
        }
    }

    /// A request of `class` went to the engine.
    pub(crate) fn dispatched(&mut self, class: IoClass) {
        match class {
            IoClass::Background => self.background_in_flight += 1,
            _ => self.foreground_in_flight += 1,
        }
    }

    /// A request of `class` left the engine at `now`.
    pub(crate) fn completed(&mut self, class: IoClass, now: u64) {
        match class {
            IoClass::Background => {
                self.background_in_flight = self.background_in_flight.saturating_sub(1)
            }
            _ => {
                self.foreground_in_flight = self.foreground_in_flight.saturating_sub(1);
                self.foreground_seen_ns = Some(now);
            }
        }
    }

    pub(crate) fn foreground_active(&self, now: u64) -> bool {
        self.foreground_in_flight > 0
            || self
                .foreground_seen_ns
                .is_some_and(|seen| now.saturating_sub(seen) < self.linger_ns)
    }

    /// Whether another background request may go to the engine at `now`.
    pub(crate) fn admits_background(&self, now: u64) -> bool {
        self.background_in_flight < self.limits.busy_depth as usize || !self.foreground_active(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn gate(busy_depth: u32) -> BackgroundGate {
        BackgroundGate::new(BackgroundLimits {
            busy_depth,
            max_transfer: 128 << 10,
            linger: Duration::from_millis(10),
        })
    }

    #[test]
    fn background_is_capped_only_while_foreground_is_active() {
        let mut g = gate(2);
        for _ in 0..5 {
            assert!(g.admits_background(0), "no foreground yet: no cap");
            g.dispatched(IoClass::Background);
        }
        // Foreground shows up: nothing more until background drops below 2.
        g.queued(IoClass::ForegroundWrite, 1);
        g.dispatched(IoClass::ForegroundWrite);
        assert!(!g.admits_background(2));
        for _ in 0..3 {
            g.completed(IoClass::Background, 3);
        }
        assert!(!g.admits_background(3), "2 still in flight");
        g.completed(IoClass::Background, 3);
        assert!(g.admits_background(3));
        g.dispatched(IoClass::Background);
        // Foreground completes; the cap lingers, then lifts.
        g.completed(IoClass::ForegroundWrite, 4 * MS);
        assert!(!g.admits_background(4 * MS + 9 * MS));
        assert!(g.admits_background(4 * MS + 10 * MS));
    }

    #[test]
    fn pieces_only_for_background_and_depth_at_least_one() {
        let mut g = gate(0);
        g.dispatched(IoClass::ForegroundRead);
        assert!(
            g.admits_background(0),
            "a depth of 0 still lets one through"
        );
        g.dispatched(IoClass::Background);
        assert!(!g.admits_background(0));
        let l = BackgroundLimits::default();
        assert_eq!(l.max_transfer_for(IoClass::Background), Some(128 << 10));
        assert_eq!(l.max_transfer_for(IoClass::ForegroundWrite), None);
        let none = BackgroundLimits {
            max_transfer: 0,
            ..BackgroundLimits::default()
        };
        assert_eq!(none.max_transfer_for(IoClass::Background), None);
    }
}
