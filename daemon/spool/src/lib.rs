//! liminald's durable, append-only fact spool.
//!
//! Every fact the daemon produces is written here, fsynced, and only then
//! announced on D-Bus; a consumer replays with [`Spool::read_since`] and
//! acknowledges what it has committed with [`Spool::ack`], which lets the
//! spool drop whole segments.
//!
//! # Layout of the directory
//! - `spool.id`: the spool's identity, a ULID made once when the spool is
//!   created (a consumer keys its cursor by it).
//! - `acked`: the highest seq the consumer acknowledged (decimal).
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segments named by their first seq (20
//!   digits): a 16-byte header (`LIMSPL01`, first seq as u64 LE), then
//!   records back to back, each `len u32 LE | crc u32 LE | seq u64 LE |
//!   kind_len u8 | kind | body`, where `len` counts the bytes after the crc,
//!   the CRC32C covers `len` and everything after the crc, and `body` is the
//!   fact's wire JSON ([`liminal_facts::FactBody::to_wire`]).
//! - `LOCK`: held with `flock` while a process has the spool open.
//!
//! Small files (`spool.id`, `acked`) are replaced atomically (write a temp
//! file, fsync, rename, fsync the directory).
//!
//! # Durability and group commit
//! [`Spool::append`] returns only once its records are on disk
//! (`fdatasync`). Appenders on several threads share fsyncs: an appender
//! whose records are queued becomes a leader, writes everything queued so
//! far in one `pwrite` and one `fdatasync`, and wakes the others; while it
//! waits on the disk the next batch accumulates. Up to
//! [`GroupCommit::max_inflight`] batches may be in their fsync at once
//! (written in order, reported durable in order). No background thread.
//!
//! # Recovery
//! [`Spool::open`] verifies every record's checksum. A torn tail of the last
//! segment (what `kill -9` or a power loss leaves behind after the last
//! fsync) is truncated and reported in [`RecoveryReport::torn_tail`]; damage
//! anywhere else (a sealed segment, or records the consumer already
//! acknowledged) is a hard [`SpoolError::Corrupt`] naming file and offset.
//!
//! # Space
//! The spool never grows past [`SpoolConfig::quota_bytes`]. By default
//! ([`Retention::KeepUnacknowledged`]) unacknowledged facts are never
//! dropped and [`Spool::append`] fails with [`SpoolError::Full`] instead
//! (the caller pushes back, e.g. stops admitting runs). With
//! [`Retention::DropOldest`] the oldest sealed segments go instead, acked or
//! not: the daemon never blocks, but a consumer that fell behind loses facts
//! (it sees [`SpoolError::Trimmed`]).

mod error;
mod record;
mod spool;

pub use error::SpoolError;
pub use record::MAX_RECORD_BYTES;
pub use spool::{
    AppendReceipt, GroupCommit, RecoveryReport, Retention, Spool, SpoolConfig, SpoolId, TornTail,
    WireFact,
};
