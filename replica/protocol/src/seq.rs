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

/// A write's sequence number: `epoch << COUNTER_BITS | counter`. Seqs of a later
/// epoch are always greater, so "highest seq wins" picks the last writer's data. The
/// wire and the store carry it as a `u64`; a [`Seq`] is one built by this layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(u64);

impl Seq {
    /// The seq of write number `counter` (from 1) of the engine with `epoch`; `None`
    /// once the counter is beyond [`MAX_COUNTER`].
    pub fn of(epoch: Epoch, counter: u64) -> Option<Seq> {
        (counter <= MAX_COUNTER).then_some(Seq(epoch.0 << COUNTER_BITS | counter))
    }

    /// A seq read off the wire or a store: every `u64` is one (its high bits are
    /// always an epoch that fits), which is why a replica compares that epoch with
    /// the connection's rather than trusting it.
    pub fn from_raw(seq: u64) -> Seq {
        Seq(seq)
    }

    /// The number as the wire and the store carry it.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The epoch of the engine that wrote it.
    pub fn epoch(self) -> Epoch {
        Epoch(self.0 >> COUNTER_BITS)
    }

    /// The write's number within its epoch.
    pub fn counter(self) -> u64 {
        self.0 & MAX_COUNTER
    }
}

/// The epoch that fences `current` (the highest any replica holds), if the epoch
/// space is not exhausted.
pub fn next_epoch(current: u64) -> Option<u64> {
    current.checked_add(1).filter(|e| *e <= MAX_EPOCH)
}

/// A fencing epoch that a seq can carry (at most [`MAX_EPOCH`]). The wire and the
/// records carry it as a `u64`; an [`Epoch`] is one that has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(u64);

/// An epoch above [`MAX_EPOCH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("epoch {0} does not fit the seq layout (at most {MAX_EPOCH})")]
pub struct EpochOutOfRange(pub u64);

impl Epoch {
    /// Epoch 0: a volume never published.
    pub const ZERO: Epoch = Epoch(0);

    /// Checks that `epoch` fits the seq layout.
    pub fn new(epoch: u64) -> Result<Epoch, EpochOutOfRange> {
        if epoch <= MAX_EPOCH {
            Ok(Epoch(epoch))
        } else {
            Err(EpochOutOfRange(epoch))
        }
    }

    /// The number as the wire and the records carry it.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The epoch that fences this one, if the epoch space is not exhausted.
    pub fn next(self) -> Option<Epoch> {
        next_epoch(self.0).map(Epoch)
    }

    /// The seq of write number `counter` of an engine at this epoch; `None` once the
    /// counter is exhausted.
    pub fn seq(self, counter: u64) -> Option<Seq> {
        Seq::of(self, counter)
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Epoch {
    type Err = EpochParseError;

    fn from_str(s: &str) -> Result<Epoch, EpochParseError> {
        let n: u64 = s.trim().parse().map_err(|_| EpochParseError::NotANumber)?;
        Ok(Epoch::new(n)?)
    }
}

/// Why a string is not an [`Epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EpochParseError {
    /// Not a decimal unsigned integer.
    #[error("not a decimal unsigned integer")]
    NotANumber,
    /// A number above [`MAX_EPOCH`].
    #[error(transparent)]
    OutOfRange(#[from] EpochOutOfRange),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_order_by_epoch_then_counter_and_bounds_hold() {
        let e = |n| Epoch::new(n).unwrap();
        assert_eq!(e(1).seq(1).map(Seq::get), Some((1 << 40) | 1));
        assert!(e(2).seq(1) > e(1).seq(MAX_COUNTER));
        assert_eq!(e(1).seq(MAX_COUNTER + 1), None);
        let last = e(MAX_EPOCH).seq(5).unwrap();
        assert_eq!((last.epoch(), last.counter()), (e(MAX_EPOCH), 5));
        assert_eq!(next_epoch(0), Some(1));
        assert_eq!(next_epoch(MAX_EPOCH), None);
        assert_eq!(next_epoch(u64::MAX), None);
    }

    #[test]
    fn epochs_are_checked_where_they_are_made() {
        assert_eq!(Epoch::new(MAX_EPOCH).map(Epoch::get), Ok(MAX_EPOCH));
        assert_eq!(
            Epoch::new(MAX_EPOCH + 1),
            Err(EpochOutOfRange(MAX_EPOCH + 1))
        );
        assert_eq!(Epoch::new(MAX_EPOCH).unwrap().next(), None);
        assert_eq!(Epoch::ZERO.next(), Epoch::new(1).ok());
        assert_eq!(
            Epoch::new(2).unwrap().seq(3).map(Seq::get),
            Some(2 << 40 | 3)
        );
        assert_eq!("7".parse::<Epoch>(), Ok(Epoch(7)));
        assert_eq!("-1".parse::<Epoch>(), Err(EpochParseError::NotANumber));
        assert!(matches!(
            (MAX_EPOCH + 1).to_string().parse::<Epoch>(),
            Err(EpochParseError::OutOfRange(_))
        ));
    }
}
