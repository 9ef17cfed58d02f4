//! The replica's data-plane server: accepts engines' connections, runs the
//! handshake and executes their requests against the block store.
//!
//! The protocol itself (frames, messages, error codes, the client) is
//! [`tessera_replica_protocol::data`], whose module doc is the wire specification.
//!
//! * [`server`]: [`serve`] — accept loop, handshake, pipelined execution.
//! * [`shards`]: the threads connections run on, each with its own I/O ring.
//! * [`reply`]: the error reply for each block-store error.
//!
//! The server only knows storage through [`crate::block_io::VolumeRegistry`].

pub mod reply;
pub mod server;
pub mod shards;

pub use server::{serve, serve_with_config, ServerConfig};
