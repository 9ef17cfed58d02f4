//! The replica data plane on the wire: the binary protocol engines use to read and
//! write a volume's blocks on a replica, and its client.
//!
//! Layout:
//! * [`frame`]: byte layout, encode/decode, limits. Pure, no I/O; fuzzed.
//! * [`message`]: HELLO, error payloads, request validation. Pure.
//! * [`replica_set`]: the REPLICA_SET reply. Pure.
//! * [`stream`]: frame reading/writing on async streams (shared by both sides).
//! * [`client`]: [`ReplicaDataClient`] — pipelined, cloneable connection.
//! * [`error`]: wire error codes and the client's error type.
//!
//! The server is the replica daemon's (`tessera_replica::dataplane`); this crate
//! holds everything both ends must agree on.
//!
//! # Wire protocol, version 5
//!
//! Version 2 adds the sync requests (opcodes 6–11 below); version 3 adds the
//! IF_NEWER flag of WRITE and TRIM (conditional writes, for online resync); version
//! 4 adds REPLICA_SET (opcode 12: how an attached engine learns that the controller
//! replaced a member of the replica set); version 5 adds CLAIM (opcode 13: a new
//! connection shuts out the writes its abandoned predecessors still carry) and the
//! error `SUPERSEDED`. Everything else is as in version 1; a version-5 replica
//! still speaks versions 1 to 4 with older engines, and an engine sends IF_NEWER
//! only on a connection that negotiated 3 or more
//! (`ReplicaDataClient::supports_if_newer`), REPLICA_SET only on one that negotiated
//! 4 (`ReplicaDataClient::supports_replica_set`; an engine simply learns no set
//! from an older replica), CLAIM only on one that negotiated 5
//! (`ReplicaDataClient::supports_claim`; an engine does not resync a replica online
//! that cannot be claimed).
//!
//! TCP, `TCP_NODELAY` on both sides. All integers little endian. Every message in
//! both directions is one frame:
//!
//! ```text
//! offset  size  field
//!      0     4  length      bytes after this field: 44 + payload + 4
//!      4     1  opcode      1 HELLO, 2 READ, 3 WRITE, 4 FLUSH, 5 TRIM, 6 VERSIONS,
//!                           7 DIRTY_REGIONS, 8 GET_MEMBERSHIP, 9 SET_MEMBERSHIP,
//!                           10 MARK_CLEAN, 11 CLEAN, 12 REPLICA_SET, 13 CLAIM;
//!                           | 0x80 in responses
//!      5     1  flags       0, except VERSIONS: bit 0 = with data;
//!                           WRITE and TRIM (v3): bit 1 (value 2) = IF_NEWER
//!      6     2  status      0 = OK; error code in error responses; 0 in requests
//!      8     8  request_id  chosen by the client, echoed in the response
//!     16     8  epoch       sender's fencing epoch (echoed in responses)
//!     24     8  offset      byte offset in the volume
//!     32     8  length      byte length of the range / payload
//!     40     8  seq         write sequence number (WRITE, TRIM)
//!     48     n  payload
//!   48+n     4  crc32c      over bytes 0 .. 48+n (length prefix, header, payload)
//! ```
//!
//! Limits: `length` must lie in 48 ..= 48 + 8 MiB ([`frame::MAX_PAYLOAD`]). A prefix
//! outside that range is a protocol error detected before anything is allocated.
//!
//! ## Transport
//!
//! Frames travel over TCP inside mutual TLS (the `tessera-tls` crate: certificates
//! from the cluster CA naming an identity), or over plain TCP when both ends were
//! started with `--insecure-plaintext`. Only the node and controller identities may
//! send HELLO; any other is answered `PERMISSION_DENIED` and the connection closed.
//!
//! ## Handshake
//!
//! The first frame a client sends is HELLO: header `epoch` = the engine's epoch,
//! payload = magic `"TSDP"`, `u16 min_version`, `u16 max_version`, then the volume id
//! (UTF-8, 1..=256 bytes). The layout of HELLO and its reply is frozen across
//! versions so any two builds can negotiate. The server answers:
//!
//! * OK: opcode `0x81`, header `epoch` = the replica's epoch for the volume, payload
//!   (16 bytes) = `u16 version` (highest both speak), `u16` 0, `u32 block_size`,
//!   `u64 volume_size`;
//! * or an error reply (`PERMISSION_DENIED`, `UNSUPPORTED_VERSION`, `UNKNOWN_VOLUME`,
//!   `STALE_EPOCH`, `INVALID_REQUEST`, `IO_ERROR`) and then closes the connection.
//!
//! Epochs at HELLO: lower than the replica's → `STALE_EPOCH`; higher → the replica
//! adopts it durably (`VolumeRegistry::adopt_epoch`, then `fetch_max` on the shared
//! atomic) before answering, so a replica that missed a raise learns it from the
//! engine. A connection is bound to one volume and one epoch.
//!
//! ## Requests
//!
//! | op | header fields used | request payload | OK reply payload |
//! |---|---|---|---|
//! | READ  | offset, length (≤ 8 MiB) | none | `length` bytes |
//! | WRITE | offset, length = payload size, seq | the data | none |
//! | FLUSH | — (send 0) | none | none |
//! | TRIM  | offset, length (u64), seq | none | none |
//! | WRITE + IF_NEWER (v3) | as WRITE, flags = 2 | the data | blocks applied u64 |
//! | TRIM + IF_NEWER (v3) | as TRIM, flags = 2 | none | blocks applied u64 |
//! | VERSIONS | offset, length (≤ 4 MiB), flags | none | per block: kind u8 (0 unwritten, 1 data, 2 trimmed, 3 corrupt) + seq u64; then, with data, 4096 bytes per intact data block |
//! | DIRTY_REGIONS | — | none | region size u64, region count u64, one bit per region |
//! | GET_MEMBERSHIP | — | none | in-sync record: epoch u64, version u64, count u16, per node id u16 length + UTF-8 |
//! | SET_MEMBERSHIP | — | an in-sync record (its epoch must be the connection's) | the record stored afterwards (the newer of the two by (epoch, version)) |
//! | MARK_CLEAN | — | none | token u64 |
//! | CLEAN | seq = token | none | regions cleared u64 |
//! | REPLICA_SET (v4) | — | none | the volume record's generation u64, count u16, per member: node id (u16 length + UTF-8, 1..=256 bytes), data address (u16 length + UTF-8, 1..=256 bytes) |
//! | CLAIM (v5) | — | none | none |
//!
//! A WRITE or TRIM is applied only after the regions it touches are marked in the
//! replica's dirty-region map on disk (`tessera_replica::sync_state`); CLEAN clears the
//! regions whose last write came before the MARK_CLEAN that returned its token. The
//! engine sends CLEAN only once every replica of the set holds those writes durably,
//! so after any crash the union of the replicas' maps covers every block on which
//! copies may differ. VERSIONS reads versions and data together under the blocks'
//! locks (background I/O): what an engine compares when it reconciles a region.
//!
//! **IF_NEWER** (version 3). A WRITE or TRIM with flags = 2 is applied block by
//! block, each only where the seq of the replica's current version of that block is
//! *lower* than the request's `seq`: newer-seq-wins, an equal seq is left alone, and a
//! corrupt or never-written block counts as seq 0 (so it is always replaced). A
//! conditional trim leaves a tombstone carrying its seq, like TRIM. The OK reply's
//! payload is the number of blocks actually written or trimmed (u64), so the sender
//! can account what it copied. This is how an engine copies the blocks a returning
//! replica missed while live writes reach it too: a copy never overwrites a newer
//! live write. The replica runs them as background I/O (its scheduler favours
//! foreground requests), with the same epoch checks, dirty-region marking and
//! ordering against epoch raises as WRITE and TRIM. IF_NEWER on any other opcode, or
//! on a connection that negotiated version 1 or 2, is `INVALID_REQUEST`.
//!
//! **REPLICA_SET** (version 4). The replica answers from its volume record: the
//! record's `generation` (its own compare-and-set token; replicas count theirs
//! independently) and the replica set in the record's order, at most 32 members.
//! The controller rewrites the set on a majority of the replicas when it replaces a
//! lost one, so an engine trusts a set only when a majority of its replica set
//! answers with the same members; what one replica says may be half of a change.
//! A replica that keeps no record for the volume (a test registry) answers
//! `INVALID_REQUEST`; on a connection that negotiated 3 or less the opcode is
//! `INVALID_REQUEST` too.
//!
//! **CLAIM** (version 5). Makes the connection the volume's writer on this replica:
//! the replica counts a claim, waits until every WRITE and TRIM already admitted on
//! any connection of the volume has been applied (as after an epoch raise), and
//! answers OK. From then on a WRITE or TRIM (conditional or not) arriving on any
//! other connection of the volume (opened before it, or after it without claiming)
//! is answered `SUPERSEDED` and changes nothing; reads and the sync requests stay allowed there. A CLAIM whose
//! connection's epoch was raised while it waited is `STALE_EPOCH` and claims
//! nothing (a fenced engine never shuts out its successor). Connections
//! that never claimed may write until the first CLAIM (engines of version 4 or
//! less). Why: an engine that gives up a connection (a timeout, a partition) cannot
//! take back what the network or the replica's queues still hold of it; with the
//! epoch unchanged, those writes would land whenever they arrive — possibly after
//! the engine's new connection compared and copied the same blocks, putting an
//! older version back under a replica the engine then counts as in sync. An engine
//! claims every connection it opens before it reads or copies anything. On a
//! connection that negotiated 4 or less the opcode is `INVALID_REQUEST`.
//!
//! Offsets and lengths are multiples of the block size (4096) and nonzero. FLUSH
//! completes once every write this replica answered OK before the FLUSH arrived is
//! durable. A client may send any number of requests without waiting; the server
//! executes them concurrently (up to 256 and 64 MiB of payload per connection, beyond
//! which it stops reading the socket) and answers each as it completes, so replies
//! come **in any order**, matched by `request_id`. Ordering between overlapping
//! requests in flight at once is the engine's business, not the replica's.
//!
//! Every request's `epoch` is checked against the volume's *current* epoch when the
//! request is dispatched (the control plane can raise it while the connection is
//! open): lower → `STALE_EPOCH`. It must also equal the HELLO epoch
//! (`INVALID_REQUEST` otherwise). A request already executing when a raise lands
//! completes.
//!
//! ## Errors
//!
//! An error reply has `status` = code and payload = `u64 detail` + UTF-8 message
//! (≤ 256 bytes). Checks run in this order: request validity, epoch, the seq's epoch
//! (a WRITE or TRIM whose seq carries an epoch above the connection's is
//! `INVALID_REQUEST`: it would outrank the next engine's writes), alignment, range.
//!
//! | code | name | detail | connection |
//! |---|---|---|---|
//! | 1 | STALE_EPOCH | replica's current epoch | stays open |
//! | 2 | OUT_OF_RANGE | volume size | stays open |
//! | 3 | UNALIGNED | 0 | stays open |
//! | 4 | CORRUPT_BLOCK | index of the bad block | stays open |
//! | 5 | NO_SPACE | 0 | stays open |
//! | 6 | IO_ERROR | 0 | stays open |
//! | 7 | BAD_FRAME | 0 | **closed** |
//! | 8 | UNKNOWN_VOLUME | 0 | closed (HELLO) |
//! | 9 | UNSUPPORTED_VERSION | replica's max version | closed (HELLO) |
//! | 10 | INVALID_REQUEST | 0 (or the HELLO epoch) | stays open (closed at HELLO) |
//! | 11 | PERMISSION_DENIED | 0 | closed (HELLO) |
//! | 12 | SUPERSEDED | 0 | stays open |
//!
//! **Corrupt frames.** A frame whose crc fails, or whose length prefix is out of
//! range, means the byte stream can't be trusted (we may be mid-frame). The server
//! stops reading, answers `BAD_FRAME` with the request id from the received header
//! (best effort — it may itself be corrupt; 0 if the length was bad), lets the
//! requests it had already read finish and answer, then closes. A client treats a
//! corrupt frame from the server the same way: it fails every pending call and
//! closes. Frames that pass the crc but make no sense (unknown opcode, flags) are
//! answered `INVALID_REQUEST` and the connection continues, so new opcodes can be
//! probed without losing a connection.

pub mod client;
mod crc_combine;
pub mod error;
pub mod frame;
pub mod message;
pub mod replica_set;
pub mod stream;

pub use client::{ClientConfig, ReplicaDataClient, VolumeInfo, WritePayload};
pub use error::{ClientError, ErrorCode, RemoteError};
pub use replica_set::ReplicaSet;
