//! Polling with a deadline instead of sleeping.
//!
//! Tests never sleep for a fixed time to "let something happen": they poll a
//! condition until it holds or a timeout passes, so they are as fast as the system
//! allows and fail with a clear message when it never gets there.

use std::future::Future;
use std::time::{Duration, Instant};

/// First pause between two polls; it doubles up to [`MAX_POLL_INTERVAL`].
const FIRST_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Longest pause between two polls.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A condition did not become true in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("condition not met within {timeout:?}")]
pub struct TimedOut {
    /// How long the caller was willing to wait.
    pub timeout: Duration,
}

/// Pause schedule shared by the sync and async pollers.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: FIRST_POLL_INTERVAL,
        }
    }

    /// The next pause, never past `deadline`.
    fn pause(&mut self, deadline: Instant) -> Duration {
        let pause = self
            .next
            .min(deadline.saturating_duration_since(Instant::now()));
        self.next = (self.next * 2).min(MAX_POLL_INTERVAL);
        pause
    }
}

/// Calls `cond` until it returns true or `timeout` passes (blocking the thread).
///
/// `cond` is always called at least once, and once more after the deadline, so a
/// condition that becomes true during the last pause is still seen.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), TimedOut> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TimedOut { timeout });
        }
        std::thread::sleep(backoff.pause(deadline));
    }
}

/// Async form of [`wait_until`]: awaits `cond()` until it yields `Some(value)`.
///
/// Returning a value lets the caller keep what the successful poll produced (a
/// connected client, a parsed file) instead of polling once more.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut cond: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        if let Some(value) = cond().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut { timeout });
        }
        tokio::time::sleep(backoff.pause(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_sees_a_condition_that_becomes_true() {
        let mut calls = 0;
        wait_until(Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        })
        .expect("third call returns true");
        assert_eq!(calls, 3);
    }

    #[test]
    fn wait_until_times_out() {
        let started = Instant::now();
        let err = wait_until(Duration::from_millis(50), || false).expect_err("never true");
        assert_eq!(err.timeout, Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn poll_until_returns_the_value() {
        let mut n = 0;
        let got = poll_until(Duration::from_secs(5), || {
            n += 1;
            let v = n;
            async move { (v >= 2).then_some(v * 10) }
        })
        .await
        .expect("second poll succeeds");
        assert_eq!(got, 20);
    }
}
