//! The spool's errors: each names the file, offset or sequence number involved.

use std::path::PathBuf;

/// Everything that can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O call failed; `op` says what the spool was doing.
    #[error("spool: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Another process (or another `Spool` in this one) has the directory open.
    #[error("spool {} is in use by another process (lock held on {})", dir.display(), lock.display())]
    Locked { dir: PathBuf, lock: PathBuf },

    /// Stored data fails its checksum or framing where it must be intact
    /// (a sealed segment, or acknowledged facts). Never skipped silently.
    #[error("spool corrupt: {} at offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// Appending would exceed the configured quota. Nothing was written; ack
    /// facts (or widen the quota) to make room. Back-pressure, not data loss.
    #[error("spool full: {used} bytes used of a {quota}-byte quota; {needed} more needed (acknowledge facts to free space)")]
    Full { used: u64, quota: u64, needed: u64 },

    /// The facts after `after_seq` were already trimmed; the oldest stored
    /// fact is `first_available`.
    #[error("facts after seq {after_seq} were trimmed; first available seq is {first_available}")]
    Trimmed {
        after_seq: u64,
        first_available: u64,
    },

    /// One record would be larger than the spool accepts.
    #[error("{kind} fact of {bytes} bytes exceeds the {max}-byte record limit")]
    RecordTooLarge {
        kind: String,
        bytes: usize,
        max: usize,
    },

    /// A fact kind that cannot be stored (empty or longer than 255 bytes).
    #[error("invalid fact kind {kind:?}: must be 1..=255 bytes")]
    InvalidKind { kind: String },

    /// `ack` named a sequence number that was never made durable.
    #[error("cannot acknowledge seq {seq}: the spool ends at seq {last_seq}")]
    AckBeyondEnd { seq: u64, last_seq: u64 },

    /// An earlier write or fsync failed, so the spool refuses appends until
    /// it is reopened (reads and acks still work). A failed write is undone
    /// before this is set; after a failed fsync whether that batch reached
    /// the disk is unknown, and reopening keeps whatever intact records it
    /// finds and truncates a torn tail.
    #[error("spool refuses appends after a failed write ({reason}); reopen it to recover")]
    Poisoned { reason: String },

    /// The spool identity file is missing or malformed.
    #[error("spool identity {}: {reason}", path.display())]
    BadIdentity { path: PathBuf, reason: String },

    /// The configuration is unusable.
    #[error("invalid spool configuration: {0}")]
    InvalidConfig(String),
}

impl SpoolError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SpoolError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        SpoolError::Corrupt {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }
}
