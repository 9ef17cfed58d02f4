//! `--copy-max-bandwidth`: one token bucket (bytes) shared by every copy of the
//! daemon, so operators can cap the network and disk traffic restores and clones
//! cause next to application I/O.
//!
//! What is counted: the data bytes received from holders (a copy reading three
//! holders counts each of them), since that is the traffic, and it bounds the bytes
//! written too. The bucket is the scheduler's exact integer one; its burst is short so
//! the rate holds over seconds, not only on average.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::scheduler::{Clock, MonotonicClock, TokenBucket};

/// Burst allowance of the bucket.
const BURST: Duration = Duration::from_millis(250);

/// A bytes-per-second limit shared by all copies.
pub struct Bandwidth {
    bucket: Mutex<TokenBucket>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bandwidth").finish_non_exhaustive()
    }
}

impl Bandwidth {
    /// A limit of `bytes_per_sec`; `None` for 0 (unlimited).
    pub fn limit(bytes_per_sec: u64) -> Option<Arc<Bandwidth>> {
        (bytes_per_sec > 0).then(|| {
            Arc::new(Self::with_clock(
                bytes_per_sec,
                Arc::new(MonotonicClock::new()),
            ))
        })
    }

    /// A limit driven by `clock` (tests step time by hand).
    pub fn with_clock(bytes_per_sec: u64, clock: Arc<dyn Clock>) -> Bandwidth {
        let bucket = TokenBucket::new(bytes_per_sec, BURST, clock.now_ns());
        Bandwidth {
            bucket: Mutex::new(bucket),
            clock,
        }
    }

    /// Takes `bytes` if the limit allows it now, else says how long to wait.
    pub fn try_take(&self, bytes: u64) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.clock.now_ns();
        if bucket.try_take(bytes, now) {
            Ok(())
        } else {
            Err(Duration::from_nanos(bucket.wait_ns(bytes, now).max(1)))
        }
    }

    /// Waits until `bytes` fit the limit, then takes them.
    pub async fn take(&self, bytes: u64) {
        while let Err(wait) = self.try_take(bytes) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::ManualClock;

    #[test]
    fn holds_the_rate_after_a_short_burst() {
        let clock = Arc::new(ManualClock::new(0));
        let bw = Bandwidth::with_clock(1 << 20, Arc::clone(&clock) as Arc<dyn Clock>);
        // The burst (a quarter second) passes at once, then the bucket is in debt.
        assert_eq!(bw.try_take(1 << 20), Ok(()));
        let wait = bw.try_take(1 << 18).expect_err("in debt");
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        clock.advance(wait);
        assert_eq!(bw.try_take(1 << 18), Ok(()));
        assert!(Bandwidth::limit(0).is_none());
    }
}
