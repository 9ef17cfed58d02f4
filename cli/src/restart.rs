//! What `tessera up` does when one of its daemons dies, and how long it waits
//! before starting it again.
//!
//! A replicated store is there to survive the death of a replica, so killing one is
//! the first thing anyone tries, and `tessera up` must not turn it into the end of
//! the whole cluster. Per daemon:
//!
//! * **Replica daemon**: restarted, on the same data directory and the same
//!   addresses (engines and the controller know it by them). Meanwhile the volume
//!   serves I/O on the remaining replicas (writes need a majority of the replica
//!   set). The engine marked the dead replica stale; once the daemon is back it
//!   reconnects it, copies what it missed and counts it again (online resync).
//! * **Controller**: restarted. It keeps no state of its own (its index is rebuilt
//!   from the replica daemons at start), so a new one is indistinguishable.
//! * **Node plugin**: restarted. It holds no data-path state by design (it can
//!   restart under I/O; a new one finds its volumes through the engine-host).
//! * **Engine-host** while it serves a staged volume: fatal, the cluster is torn
//!   down. The engine, FUSE file and loop device under the mounted filesystem died
//!   with it, so that filesystem only returns errors now; a new engine-host cleans
//!   up its predecessor's leftovers but cannot give the mount back, and pretending
//!   the demo still runs would be worse than stopping with an error. With no volume
//!   staged (`--no-demo`) nothing depended on it and it is restarted like the rest.
//!
//! With `--no-restart` nothing is restarted: a dead daemon is reported and left
//! dead, and the cluster keeps running without it (the engine-host rule above still
//! holds). The run then ends with errors, since part of it was down.
//!
//! Restarts back off exponentially ([`Backoff`]) so a daemon that cannot start (its
//! port taken, its disk full) is retried without spinning, and one that crashes
//! again right after starting is not restarted in a tight loop.

use std::time::Duration;

use crate::daemon::Role;

/// What to do about a daemon that died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after the backoff.
    Restart,
    /// Report it and leave it dead (`--no-restart`).
    LeaveDead,
    /// Tear the cluster down; the reason says why a restart cannot help.
    Fatal(&'static str),
}

/// The restart policy of one `tessera up`.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Whether dead daemons are started again (off with `--no-restart`).
    pub enabled: bool,
}

/// Why the engine-host's death ends the run while a volume is staged.
const ENGINE_HOST_FATAL: &str = "it served the mounted demo volume (engine, FUSE file, loop \
     device), so the filesystem on it only returns errors now and a new engine-host \
     cannot give it back";

impl RestartPolicy {
    /// What to do when a daemon of `role` dies; `volume_staged` says whether the
    /// engine-host serves a staged volume.
    pub fn decide(&self, role: Role, volume_staged: bool) -> Decision {
        match role {
            Role::EngineHost if volume_staged => Decision::Fatal(ENGINE_HOST_FATAL),
            Role::Replica | Role::Controller | Role::NodePlugin | Role::EngineHost => {
                if self.enabled {
                    Decision::Restart
                } else {
                    Decision::LeaveDead
                }
            }
        }
    }
}

/// First pause before a restart: long enough for the kernel to release the dead
/// process's ports and locks, short enough that a replica is back before anyone
/// misses it.
pub const FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest pause between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// A daemon that ran at least this long before dying is considered to have been
/// healthy: its next restart starts again from [`FIRST_DELAY`].
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff of one daemon's restarts, doubling from a first delay up to
/// a cap, reset once the daemon ran long enough to count as healthy.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    stable_after: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(FIRST_DELAY, MAX_DELAY, STABLE_AFTER)
    }
}

impl Backoff {
    /// A backoff from `first` doubling up to `cap`, reset after a run of
    /// `stable_after`.
    pub fn new(first: Duration, cap: Duration, stable_after: Duration) -> Self {
        Self {
            first,
            cap: cap.max(first),
            stable_after,
            next: first,
        }
    }

    /// The pause before restarting a daemon that died after running for `ran`.
    pub fn after_death(&mut self, ran: Duration) -> Duration {
        if ran >= self.stable_after {
            self.next = self.first;
        }
        self.take()
    }

    /// The pause before the next attempt after a start that failed.
    pub fn after_failed_start(&mut self) -> Duration {
        self.take()
    }

    fn take(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next.saturating_mul(2)).min(self.cap);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 60_000 * MS);
        let delays: Vec<Duration> = (0..6).map(|_| b.after_failed_start()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000].map(|m| m * MS).to_vec()
        );
    }

    #[test]
    fn a_quick_crash_keeps_backing_off_a_long_run_resets() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS, 60_000 * MS);
        assert_eq!(b.after_death(10 * MS), 100 * MS);
        assert_eq!(b.after_failed_start(), 200 * MS);
        // Crashed again a second after a successful restart: still backing off.
        assert_eq!(b.after_death(1_000 * MS), 400 * MS);
        // Ran a minute: healthy, start over.
        assert_eq!(b.after_death(60_000 * MS), 100 * MS);
        assert_eq!(b.after_death(5 * MS), 200 * MS);
    }

    #[test]
    fn policy_restarts_all_but_an_engine_host_serving_a_volume() {
        let on = RestartPolicy { enabled: true };
        let off = RestartPolicy { enabled: false };
        for role in [Role::Replica, Role::Controller, Role::NodePlugin] {
            assert_eq!(on.decide(role, true), Decision::Restart, "{role:?}");
            assert_eq!(off.decide(role, true), Decision::LeaveDead, "{role:?}");
        }
        assert_eq!(on.decide(Role::EngineHost, false), Decision::Restart);
        assert_eq!(off.decide(Role::EngineHost, false), Decision::LeaveDead);
        assert!(matches!(
            on.decide(Role::EngineHost, true),
            Decision::Fatal(_)
        ));
        assert!(matches!(
            off.decide(Role::EngineHost, true),
            Decision::Fatal(_)
        ));
    }
}
