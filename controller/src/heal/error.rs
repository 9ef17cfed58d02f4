//! Why a healing step failed (logged; the next pass tries again).

use crate::error::ControllerError;

/// Why a healing step failed.
#[derive(Debug, thiserror::Error)]
pub enum HealError {
    /// A quorum read or write, or placement, failed.
    #[error(transparent)]
    Controller(#[from] ControllerError),
    /// One replica daemon refused or did not answer.
    #[error("{call} on node {node} failed: {message}")]
    Replica {
        /// The call.
        call: &'static str,
        /// The node of the daemon.
        node: String,
        /// The daemon's answer.
        message: String,
    },
    /// The in-sync declaration of a rebuilt copy could not be made.
    #[error("declaring node {node} in sync for volume {volume}: {reason}")]
    Declare {
        /// The volume.
        volume: String,
        /// The rebuilt member.
        node: String,
        /// What went wrong.
        reason: String,
    },
}

impl HealError {
    /// A failed call to one daemon.
    pub fn replica(call: &'static str, node: &str, status: &tonic::Status) -> Self {
        HealError::Replica {
            call,
            node: node.to_string(),
            message: status.message().to_string(),
        }
    }
}
