//! Token bucket with exact integer refill, driven by an injected time.
//!
//! One bucket limits one quantity (operations or bytes) of one volume to `rate` per
//! second, with a capacity of `rate × burst` so an idle volume may briefly run faster.
//!
//! *Behaviour.* Tokens are counted in nano-tokens (`1e-9` token), so refilling for
//! `Δ` nanoseconds adds exactly `rate × Δ` units: no rounding, hence no drift however
//! many small steps time advances in. A request needing `n` tokens is admitted once the
//! bucket holds `min(n, capacity)`; it then takes all `n`, possibly leaving the bucket
//! in debt. That admits requests larger than the whole burst (a 1 MiB write under a
//! 512 KiB/s limit) while keeping the long-run rate exact: the debt is repaid before
//! the next request passes.
//!
//! *Limitations.* Time that goes backwards is ignored (no refill) rather than trusted.
//! The bucket is not thread-safe by itself; the scheduler holds it under its lock.

use std::time::Duration;

use super::clock::duration_ns;

/// Nano-tokens per token.
const SCALE: i128 = 1_000_000_000;

/// A token bucket refilled at `rate` tokens per second up to `rate × burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second (also nano-tokens per nanosecond).
    rate: u64,
    /// Capacity in nano-tokens, at least one token.
    cap: i128,
    /// Current content in nano-tokens; negative while in debt.
    tokens: i128,
    /// Time of the last refill, in clock nanoseconds.
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` tokens/s, holding at most `rate × burst`
    /// tokens (but at least one, so a tiny burst never blocks forever). `rate` must be
    /// non-zero; callers validate it ([`super::Qos::validate`]) and a zero rate is
    /// treated as one token per second rather than a divide-by-zero.
    pub fn new(rate: u64, burst: Duration, now_ns: u64) -> Self {
        let rate = rate.max(1);
        let cap = Self::capacity_for(rate, burst);
        Self {
            rate,
            cap,
            tokens: cap,
            last_ns: now_ns,
        }
    }

    fn capacity_for(rate: u64, burst: Duration) -> i128 {
        (i128::from(rate) * i128::from(duration_ns(burst))).max(SCALE)
    }

    /// Changes rate and burst, keeping what was earned so far (clamped to the new
    /// capacity), so a QoS change neither grants a fresh burst nor forgets debt.
    pub fn reconfigure(&mut self, rate: u64, burst: Duration, now_ns: u64) {
        self.refill(now_ns);
        self.rate = rate.max(1);
        self.cap = Self::capacity_for(self.rate, burst);
        self.tokens = self.tokens.min(self.cap);
    }

    /// Adds the tokens earned since the last refill.
    pub fn refill(&mut self, now_ns: u64) {
        if now_ns > self.last_ns {
            let earned = i128::from(self.rate) * i128::from(now_ns - self.last_ns);
            self.tokens = (self.tokens + earned).min(self.cap);
            self.last_ns = now_ns;
        }
    }

    fn need(&self, n: u64) -> i128 {
        (i128::from(n) * SCALE).min(self.cap)
    }

    /// Whether a request of `n` tokens would be admitted at `now_ns`.
    pub fn can_take(&mut self, n: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        self.tokens >= self.need(n)
    }

    /// Takes `n` tokens unconditionally (may leave debt); call after
    /// [`Self::can_take`] said yes.
    pub fn take(&mut self, n: u64, now_ns: u64) {
        self.refill(now_ns);
        self.tokens -= i128::from(n) * SCALE;
    }

    /// Takes `n` tokens if admitted, returning whether it did.
    pub fn try_take(&mut self, n: u64, now_ns: u64) -> bool {
        if self.can_take(n, now_ns) {
            self.take(n, now_ns);
            true
        } else {
            false
        }
    }

    /// Nanoseconds from `now_ns` until a request of `n` tokens is admitted (0 if now).
    pub fn wait_ns(&mut self, n: u64, now_ns: u64) -> u64 {
        self.refill(now_ns);
        let deficit = self.need(n) - self.tokens;
        if deficit <= 0 {
            return 0;
        }
        let rate = i128::from(self.rate);
        u64::try_from((deficit + rate - 1) / rate).unwrap_or(u64::MAX)
    }

    /// Whole tokens available at `now_ns` (negative while in debt).
    pub fn available(&mut self, now_ns: u64) -> i64 {
        self.refill(now_ns);
        i64::try_from(self.tokens.div_euclid(SCALE)).unwrap_or(i64::MAX)
    }

    /// Capacity in whole tokens.
    pub fn capacity(&self) -> u64 {
        u64::try_from(self.cap / SCALE).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn starts_full_with_rate_times_burst() {
        let mut b = TokenBucket::new(1000, Duration::from_millis(500), 0);
        assert_eq!(b.capacity(), 500);
        assert_eq!(b.available(0), 500);
        for _ in 0..500 {
            assert!(b.try_take(1, 0));
        }
        assert!(!b.try_take(1, 0), "burst exhausted");
    }

    #[test]
    fn refills_at_rate_and_caps_at_burst() {
        let mut b = TokenBucket::new(100, Duration::from_secs(1), 0);
        assert!(b.try_take(100, 0));
        assert_eq!(b.available(0), 0);
        // 10 ms at 100/s is exactly one token.
        assert!(!b.can_take(1, 9 * MS));
        assert!(b.can_take(1, 10 * MS));
        assert_eq!(b.available(500 * MS), 50);
        // Long idle never exceeds the burst capacity.
        assert_eq!(b.available(100 * SEC), 100);
    }

    #[test]
    fn wait_ns_is_exact() {
        let mut b = TokenBucket::new(1000, Duration::from_millis(1), 0);
        assert!(b.try_take(1, 0));
        assert_eq!(b.wait_ns(1, 0), MS);
        assert_eq!(b.wait_ns(1, MS / 2), MS / 2);
        assert_eq!(b.wait_ns(1, MS), 0);
    }

    #[test]
    fn oversized_request_admitted_when_full_then_debt_is_repaid() {
        // 4096 bytes/s with a 1 s burst, then an 8192-byte request.
        let mut b = TokenBucket::new(4096, Duration::from_secs(1), 0);
        assert!(b.try_take(8192, 0), "admitted with a full bucket");
        assert_eq!(b.available(0), -4096);
        // Needs 1 s to repay debt and 1 s more to fill again.
        assert_eq!(b.wait_ns(1, 0), SEC + SEC.div_ceil(4096));
        assert!(!b.can_take(8192, 2 * SEC - 1));
        assert!(b.can_take(8192, 2 * SEC));
    }

    #[test]
    fn tiny_burst_still_admits_one_token() {
        let mut b = TokenBucket::new(10, Duration::from_nanos(1), 0);
        assert_eq!(b.capacity(), 1);
        assert!(b.try_take(1, 0));
        assert!(!b.can_take(1, 0));
        assert!(b.can_take(1, 100 * MS));
    }

    #[test]
    fn time_going_backwards_does_not_refill() {
        let mut b = TokenBucket::new(10, Duration::from_secs(1), 5 * SEC);
        assert!(b.try_take(10, 5 * SEC));
        assert!(!b.can_take(1, SEC));
        assert!(!b.can_take(1, 5 * SEC));
    }

    #[test]
    fn reconfigure_keeps_earned_tokens_clamped() {
        let mut b = TokenBucket::new(1000, Duration::from_secs(1), 0);
        assert!(b.try_take(400, 0));
        b.reconfigure(100, Duration::from_secs(1), 0);
        assert_eq!(b.available(0), 100, "clamped to the new capacity");
        assert!(b.try_take(100, 0));
        assert!(!b.can_take(1, 9 * MS));
        assert!(b.can_take(1, 10 * MS), "refills at the new rate");
    }

    #[test]
    fn no_drift_over_a_million_irregular_steps() {
        // 3333 tokens/s does not divide a nanosecond evenly; step by an irregular
        // amount and take greedily. Every token earned must be taken exactly once.
        let rate = 3333;
        let mut b = TokenBucket::new(rate, Duration::from_millis(10), 0);
        let initial = b.capacity();
        let mut now = 0u64;
        let mut taken = 0u64;
        for i in 0..1_000_000u64 {
            now += 1_000 + (i * 7919) % 3_001; // 1..4 µs
            while b.try_take(1, now) {
                taken += 1;
            }
        }
        let earned = u128::from(rate) * u128::from(now) / u128::from(SEC);
        let expected = u64::try_from(earned).expect("fits") + initial;
        assert!(
            taken == expected || taken + 1 == expected,
            "taken {taken}, expected {expected}"
        );
    }

    #[test]
    fn rate_holds_over_time_with_byte_costs() {
        // 1 MiB/s, 4 KiB requests, 100 ms burst; over 10 s of simulated time the bytes
        // admitted are 10 MiB plus the initial burst, within one request.
        let rate = 1 << 20;
        let mut b = TokenBucket::new(rate, Duration::from_millis(100), 0);
        let mut now = 0;
        let mut bytes = 0u64;
        while now <= 10 * SEC {
            if b.try_take(4096, now) {
                bytes += 4096;
            } else {
                now += b.wait_ns(4096, now);
            }
        }
        let expected = 10 * rate + rate / 10;
        assert!(
            bytes.abs_diff(expected) <= 4096,
            "bytes {bytes}, expected {expected}"
        );
    }
}
