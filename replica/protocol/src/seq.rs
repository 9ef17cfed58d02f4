//! The layout of a write's sequence number, shared by every process: `seq =
//! epoch << 40 | counter`. The engine numbers its writes with it, replicas compare
//! seqs to pick the newest copy of a block, and the controller hands out epochs, so
//! the bounds live here once.
//!
//! An epoch above [`MAX_EPOCH`] cannot be encoded; replicas refuse to adopt or be
//! raised to one (an engine or peer presenting `u64::MAX` would otherwise leave the
//! volume with no epoch anyone could publish above).

/// Bits of a seq below the epoch: an engine's write counter.
pub const COUNTER_BITS: u32 = 40;
/// Highest epoch a seq can carry.
pub const MAX_EPOCH: u64 = (1 << (64 - COUNTER_BITS)) - 1;
/// Highest counter an engine may use within one epoch.
pub const MAX_COUNTER: u64 = (1 << COUNTER_BITS) - 1;

/// The seq of write number `counter` (from 1) of the engine with `epoch`; `None`
/// when either is out of range.
pub fn seq(epoch: u64, counter: u64) -> Option<u64> {
    (epoch <= MAX_EPOCH && counter <= MAX_COUNTER).then_some(epoch << COUNTER_BITS | counter)
}

/// The epoch that fences `current` (the highest any replica holds), if the epoch
/// space is not exhausted.
pub fn next_epoch(current: u64) -> Option<u64> {
    current.checked_add(1).filter(|e| *e <= MAX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_order_by_epoch_then_counter_and_bounds_hold() {
        assert_eq!(seq(1, 1), Some((1 << 40) | 1));
        assert!(seq(2, 1) > seq(1, MAX_COUNTER));
        assert_eq!(seq(MAX_EPOCH + 1, 1), None);
        assert_eq!(seq(1, MAX_COUNTER + 1), None);
        assert_eq!(
            seq(MAX_EPOCH, 5).map(|s| s >> COUNTER_BITS),
            Some(MAX_EPOCH)
        );
        assert_eq!(next_epoch(0), Some(1));
        assert_eq!(next_epoch(MAX_EPOCH), None);
        assert_eq!(next_epoch(u64::MAX), None);
    }
}
