//! Issue 15's fault suite on isolated hosts: every replica daemon and every node in a
//! network namespace of its own ([`crate::network`]), a random writer that records
//! what was durable and fails on any stale read, and faults real to the kernel:
//! SIGKILL, deleted data directories, iptables partitions, `tc tbf` slow links, full
//! filesystems, flipped bytes on disk.
//!
//! * [`rig`]: [`FaultRig`], the cluster, the volume and the checks.
//! * [`scenarios`]: the faults (a)–(h), one function each.
//! * [`soak`]: rounds of faults drawn at random, for `tessera-fault-soak` and the
//!   short soak in the test command.

pub mod rig;
pub mod scenarios;
pub mod soak;

pub use rig::{FaultRig, RigConfig, ALL_IN_SYNC, IN_SYNC_WITHIN};
pub use scenarios::Report;
