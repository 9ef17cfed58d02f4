//! Pacing of the holder side of `ReadSnapshotBlocks` next to foreground I/O.
//!
//! A copy stream (a rebuild pulling a volume's head, a restore or clone pulling a
//! snapshot) costs its holder CPU as well as disk: every block's checksum is verified
//! and every chunk encoded. The scheduler keeps the stream's *disk* reads behind
//! foreground requests, but nothing kept its CPU work out of their way: on a busy
//! node a full-speed rebuild multiplied the QD1 write p99 of the volumes it copied
//! from by 6.9 (bench/README.md, "Healing"). So while the holder's disk has
//! foreground I/O (the scheduler's own notion of "active"), a stream works at most
//! `share` of the time: after each chunk it pauses for the time the chunk took,
//! scaled by `(1 - share) / share`. With no foreground I/O it runs at full speed, so
//! an idle cluster rebuilds as fast as before, and a busy one still makes progress at
//! `share` of that speed. The default, a tenth, was the best of 1, 0.25, 0.1 and 0.05
//! in `bench/healing` (bench/README.md).

use std::time::Duration;

/// Default share of the time a stream may work while foreground I/O is active.
pub const DEFAULT_BUSY_SHARE: f64 = 0.1;

/// Longest single pause: a chunk that took long (a slow disk) must not stall the
/// stream for seconds once foreground I/O stops.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// How much a stream may work while foreground I/O is active.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamPacing {
    share: f64,
}

/// A share outside (0, 1].
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the busy share of copy streams must be in (0, 1], not {0}")]
pub struct InvalidShare(pub f64);

impl Default for StreamPacing {
    fn default() -> Self {
        StreamPacing {
            share: DEFAULT_BUSY_SHARE,
        }
    }
}

/// The share, as `--copy-busy-share` takes it.
impl std::fmt::Display for StreamPacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.share)
    }
}

impl StreamPacing {
    /// Streams work at most `share` of the time while foreground I/O is active; 1
    /// never pauses.
    pub fn new(share: f64) -> Result<Self, InvalidShare> {
        if share > 0.0 && share <= 1.0 {
            Ok(StreamPacing { share })
        } else {
            Err(InvalidShare(share))
        }
    }

    /// Never pauses (tests, tools).
    pub fn unpaced() -> Self {
        StreamPacing { share: 1.0 }
    }

    /// The pause after a chunk that took `worked`, given whether foreground I/O is
    /// active on the holder's disk.
    pub fn pause_after(&self, worked: Duration, foreground_active: bool) -> Duration {
        if !foreground_active || self.share >= 1.0 {
            return Duration::ZERO;
        }
        worked
            .mul_f64((1.0 - self.share) / self.share)
            .min(MAX_PAUSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_stream_pauses_only_while_foreground_io_is_active() {
        let p = StreamPacing::default();
        assert_eq!(p.pause_after(4 * MS, false), Duration::ZERO);
        assert_eq!(p.pause_after(2 * MS, true), 18 * MS);
    }

    #[test]
    fn the_share_bounds_the_pause_and_one_never_pauses() {
        assert_eq!(
            StreamPacing::new(0.5)
                .expect("valid")
                .pause_after(4 * MS, true),
            4 * MS
        );
        assert_eq!(
            StreamPacing::unpaced().pause_after(4 * MS, true),
            Duration::ZERO
        );
        assert_eq!(
            StreamPacing::new(0.01)
                .expect("valid")
                .pause_after(10 * MS, true),
            MAX_PAUSE
        );
    }

    #[test]
    fn shares_outside_zero_to_one_are_refused() {
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(StreamPacing::new(bad).is_err(), "{bad}");
        }
    }
}
