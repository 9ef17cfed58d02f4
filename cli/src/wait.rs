//! Polling with a deadline.
//!
//! Startup and shutdown wait for things other processes do (write a ready file,
//! answer a Probe, exit). Instead of sleeping a fixed time and hoping, the CLI polls
//! the condition with a short, growing pause and gives up at a deadline, so it is as
//! fast as the daemons allow and fails with a clear message when one never gets there.

use std::future::Future;
use std::time::{Duration, Instant};

/// First pause between polls; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between polls.
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// Outcome of one poll.
pub enum Poll<T> {
    /// The condition holds; here is what it produced.
    Ready(T),
    /// Not yet; poll again.
    Pending,
    /// It will never hold (e.g. the process exited); stop with this error.
    Failed(anyhow::Error),
}

/// Polls `cond` until it is ready, fails, or `timeout` passes. `cond` runs at least
/// once and once more at the deadline, so a condition that turns true during the
/// last pause is still seen.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut cond: F) -> Result<T, PollError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Poll<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        match cond().await {
            Poll::Ready(v) => return Ok(v),
            Poll::Failed(e) => return Err(PollError::Failed(e)),
            Poll::Pending => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(PollError::TimedOut(timeout));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Why [`poll_until`] gave up.
#[derive(Debug)]
pub enum PollError {
    /// The condition did not hold within this time.
    TimedOut(Duration),
    /// The condition reported it never will.
    Failed(anyhow::Error),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::TimedOut(t) => write!(f, "not ready within {}s", t.as_secs_f32()),
            PollError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for PollError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_ready_value() {
        let mut n = 0;
        let v = poll_until(Duration::from_secs(5), || {
            n += 1;
            let k = n;
            async move {
                if k >= 3 {
                    Poll::Ready(k)
                } else {
                    Poll::Pending
                }
            }
        })
        .await
        .expect("ready on the third poll");
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn times_out_and_fails() {
        let r: Result<(), _> =
            poll_until(Duration::from_millis(30), || async { Poll::Pending }).await;
        assert!(matches!(r, Err(PollError::TimedOut(_))));
        let r: Result<(), _> = poll_until(Duration::from_secs(5), || async {
            Poll::Failed(anyhow::anyhow!("gone"))
        })
        .await;
        assert!(matches!(r, Err(PollError::Failed(_))));
    }
}
