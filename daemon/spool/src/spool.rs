//! The spool itself: open/recover, group-committed appends, reads, acks,
//! trimming.

use crate::error::SpoolError;
use crate::record::{self, EncodedRecord, SEGMENT_HEADER_LEN};
use liminal_facts::FactBody;
use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, warn};
use ulid::Ulid;

/// A fact as read back: `(seq, kind, wire JSON)`, the D-Bus `(tss)` triple.
pub type WireFact = (u64, String, String);

const ID_FILE: &str = "spool.id";
const ACK_FILE: &str = "acked";
const LOCK_FILE: &str = "LOCK";
const SEGMENT_EXT: &str = "seg";
/// One sparse index entry per this many records of a segment: reads start
/// at most this many records before the one asked for.
const INDEX_STRIDE: u64 = 64;
/// errno for "no space left on device".
const ENOSPC: i32 = 28;

/// The spool's identity: a ULID made once, when the spool directory is
/// first created. A consumer keys its cursor by it, so a re-created spool
/// (whose seqs start again at 1) is never mistaken for the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpoolId(pub Ulid);

impl std::fmt::Display for SpoolId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How the spool is sized and when it lets facts go.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// A segment is sealed and a new one started once the next record would
    /// take it past this size (a single larger record gets a segment to
    /// itself). Trimming works in whole segments. At least 1024.
    pub segment_bytes: u64,
    /// Upper bound on the bytes of all segments together. At least
    /// `segment_bytes`.
    pub quota_bytes: u64,
    pub retention: Retention,
    pub group_commit: GroupCommit,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_bytes: 64 * 1024 * 1024,
            quota_bytes: 1024 * 1024 * 1024,
            retention: Retention::default(),
            group_commit: GroupCommit::default(),
        }
    }
}

/// What happens to facts the consumer has not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Unacknowledged facts are kept whatever it costs: when the quota is
    /// reached, [`Spool::append`] fails with [`SpoolError::Full`] and the
    /// daemon must push back. Nothing is ever lost. The default.
    #[default]
    KeepUnacknowledged,
    /// Sealed segments are dropped, acknowledged or not, oldest first: when
    /// an append would exceed the quota, and (if `max_age` is set) when the
    /// segment's last write is older than `max_age`. Appends only fail with
    /// `Full` when a single segment does not fit. The daemon never blocks,
    /// but a consumer that falls behind loses facts and sees
    /// [`SpoolError::Trimmed`]. The active segment is never dropped.
    DropOldest { max_age: Option<Duration> },
}

/// Group commit tuning. Concurrent appenders share fsyncs: an appender that
/// finds records queued and a free slot leads a batch of everything queued,
/// writes it and fsyncs it once; the others wait for it. `max_delay` makes
/// the leader additionally wait for company before writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// How long the leader waits for more appenders before writing. Zero (the
    /// default) writes at once: the lowest latency for a single appender.
    pub max_delay: Duration,
    /// The leader stops waiting once this many bytes are queued.
    pub max_batch_bytes: usize,
    /// How many batches may be between their write and the end of their
    /// fsync at once. 1 is classic group commit (one fsync at a time; the
    /// next batch gathers meanwhile). More overlaps fsyncs, which on disks
    /// and file systems that batch flushes themselves (ext4's journal does)
    /// raises throughput for many appenders. Batches are still written in
    /// order and reported durable in order. At least 1.
    pub max_inflight: usize,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            max_delay: Duration::ZERO,
            max_batch_bytes: 4 * 1024 * 1024,
            max_inflight: 4,
        }
    }
}

/// The seqs given to one [`Spool::append`] call, all durable on return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    pub first_seq: u64,
    /// Equal to `first_seq - 1` when nothing was appended.
    pub last_seq: u64,
}

impl AppendReceipt {
    pub fn len(&self) -> u64 {
        (self.last_seq + 1).saturating_sub(self.first_seq)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The seqs, in order; zip them with the appended facts.
    pub fn seqs(&self) -> std::ops::RangeInclusive<u64> {
        self.first_seq..=self.last_seq
    }
}

/// What [`Spool::open`] found and did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub spool_id: SpoolId,
    /// The directory had no spool: a new identity was made.
    pub created: bool,
    pub segments: usize,
    /// The oldest fact still stored (`last_seq + 1` when none is).
    pub first_seq: u64,
    /// The newest durable fact (0 when none was ever appended).
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Set when an incomplete or corrupt tail was cut off the last segment.
    pub torn_tail: Option<TornTail>,
    pub disk_usage: u64,
}

/// A tail cut off the last segment on recovery: records appended but never
/// made durable (so never acknowledged to any appender).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    /// Where the file now ends.
    pub offset: u64,
    pub dropped_bytes: u64,
    pub reason: String,
}

/// The durable fact spool. `Send + Sync`: share it behind an `Arc`; call
/// the blocking methods from `spawn_blocking` in async code.
pub struct Spool {
    dir: PathBuf,
    id: SpoolId,
    cfg: SpoolConfig,
    state: Mutex<State>,
    /// Signalled when `durable_seq` advances, a write fails, or a writer
    /// slot becomes free.
    committed: Condvar,
    /// Signalled when records are queued (wakes a leader waiting for company).
    queued: Condvar,
    /// Held by a leader while it writes (not while it fsyncs). Lock order:
    /// `writer` before `state`, never the reverse.
    writer: Mutex<Writer>,
    /// Serializes ack-file writes.
    ack_lock: Mutex<()>,
    /// Holds the directory's flock for as long as the spool is open.
    _lock: File,
}

const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Spool>();
};

struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Durable length in bytes.
    len: u64,
    /// Seq after the last durable record.
    next_seq: u64,
    /// Sparse `(seq, offset)` index, first entry at the first record.
    index: Vec<(u64, u64)>,
    modified: SystemTime,
}

struct State {
    segments: BTreeMap<u64, Segment>,
    next_seq: u64,
    durable_seq: u64,
    acked: u64,
    used: u64,
    /// Bytes queued or being written, counted against the quota.
    reserved: u64,
    pending: Vec<(u64, EncodedRecord)>,
    pending_bytes: usize,
    /// Threads currently writing or fsyncing a batch.
    writers: usize,
    /// Number of the next batch to be written.
    next_batch: u64,
    /// Number of the next batch to publish as durable.
    next_publish: u64,
    /// Batches fsynced but waiting for an earlier batch's fsync.
    completed: BTreeMap<u64, Written>,
    poisoned: Option<String>,
    /// Group commits (fsynced batches) since open.
    commits: u64,
}

/// The active segment as the leader sees it.
struct Writer {
    file: Arc<File>,
    path: PathBuf,
    first_seq: u64,
    len: u64,
    next_seq: u64,
    /// Set when a write failed: the file's tail is unknown.
    failed: Option<String>,
}

/// A batch written and fsynced, not yet published.
struct Written {
    number: u64,
    last_seq: u64,
    bytes: u64,
    updates: Vec<SegUpdate>,
}

/// What one batch did to a segment, applied to `State` after the fsync.
struct SegUpdate {
    first_seq: u64,
    created: Option<(PathBuf, Arc<File>)>,
    len: u64,
    next_seq: u64,
    index: Vec<(u64, u64)>,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers it: every
    /// checksum is verified, a torn tail of the last segment is cut off,
    /// seqs continue after the last intact record.
    pub fn open(
        dir: impl AsRef<Path>,
        cfg: SpoolConfig,
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        let _span = tracing::info_span!("spool_open", dir = %dir.display()).entered();
        validate(&cfg)?;
        if !dir.is_dir() {
            fs::create_dir_all(&dir)
                .map_err(|e| SpoolError::io("creating spool directory", &dir, e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| SpoolError::io("opening lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked {
                    dir,
                    lock: lock_path,
                })
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(SpoolError::io("locking", &lock_path, e))
            }
        }

        let mut seg_paths = BTreeMap::new();
        let entries = fs::read_dir(&dir).map_err(|e| SpoolError::io("listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| SpoolError::io("listing", &dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                // A crashed atomic write; the real file is intact.
                fs::remove_file(&path)
                    .map_err(|e| SpoolError::io("removing stale temp file", &path, e))?;
                continue;
            }
            if let Some(stem) = name.strip_suffix(".seg") {
                match stem.parse::<u64>() {
                    Ok(seq) if stem.len() == 20 => {
                        seg_paths.insert(seq, path);
                    }
                    _ => {
                        warn!(file = %path.display(), "ignoring a .seg file whose name is not a 20-digit seq")
                    }
                }
            }
        }

        let id_path = dir.join(ID_FILE);
        let (id, created) = match fs::read_to_string(&id_path) {
            Ok(text) => {
                let ulid = Ulid::from_string(text.trim()).map_err(|e| SpoolError::BadIdentity {
                    path: id_path.clone(),
                    reason: format!("not a ULID: {e}"),
                })?;
                (SpoolId(ulid), false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !seg_paths.is_empty() {
                    return Err(SpoolError::BadIdentity {
                        path: id_path,
                        reason: "missing although segments exist; refusing to give old facts a new identity".into(),
                    });
                }
                let id = SpoolId(Ulid::new());
                write_atomic(&dir, ID_FILE, format!("{id}\n").as_bytes())?;
                info!(spool_id = %id, "created a new spool");
                (id, true)
            }
            Err(e) => return Err(SpoolError::io("reading", &id_path, e)),
        };

        let ack_path = dir.join(ACK_FILE);
        let acked = match fs::read_to_string(&ack_path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                SpoolError::corrupt(
                    &ack_path,
                    0,
                    format!("acknowledged seq is not a number: {e}"),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(SpoolError::io("reading", &ack_path, e)),
        };

        let mut segments = BTreeMap::new();
        let mut torn_tail = None;
        let mut expected: Option<u64> = None;
        let count = seg_paths.len();
        for (i, (first_seq, path)) in seg_paths.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let seg = recover_segment(&path, first_seq, is_last, acked, expected, &mut torn_tail)?;
            expected = Some(seg.next_seq);
            segments.insert(first_seq, seg);
        }
        if segments.is_empty() {
            let first = acked + 1;
            let (path, file) = create_segment(&dir, first, &mut Vec::new())?;
            segments.insert(
                first,
                Segment {
                    first_seq: first,
                    path,
                    file,
                    len: SEGMENT_HEADER_LEN,
                    next_seq: first,
                    index: Vec::new(),
                    modified: SystemTime::now(),
                },
            );
        }
        let Some(last) = segments.values().next_back() else {
            return Err(SpoolError::InvalidConfig(
                "no segment after recovery".into(),
            ));
        };
        let next_seq = last.next_seq;
        let durable_seq = next_seq - 1;
        if acked > durable_seq {
            return Err(SpoolError::corrupt(
                &ack_path,
                0,
                format!("the consumer acknowledged seq {acked} but the spool ends at seq {durable_seq}: acknowledged facts are missing"),
            ));
        }
        let writer = Writer {
            file: last.file.clone(),
            path: last.path.clone(),
            first_seq: last.first_seq,
            len: last.len,
            next_seq: last.next_seq,
            failed: None,
        };
        let used: u64 = segments.values().map(|s| s.len).sum();
        let first_seq = segments.keys().next().copied().unwrap_or(next_seq);
        let report = RecoveryReport {
            spool_id: id,
            created,
            segments: segments.len(),
            first_seq,
            last_seq: durable_seq,
            acked_seq: acked,
            torn_tail,
            disk_usage: used,
        };
        info!(
            spool_id = %id,
            segments = report.segments,
            first_seq,
            last_seq = durable_seq,
            acked,
            torn_bytes = report.torn_tail.as_ref().map(|t| t.dropped_bytes).unwrap_or(0),
            "spool open"
        );
        let spool = Spool {
            dir,
            id,
            cfg,
            state: Mutex::new(State {
                segments,
                next_seq,
                durable_seq,
                acked,
                used,
                reserved: 0,
                pending: Vec::new(),
                pending_bytes: 0,
                writers: 0,
                next_batch: 0,
                next_publish: 0,
                completed: BTreeMap::new(),
                poisoned: None,
                commits: 0,
            }),
            committed: Condvar::new(),
            queued: Condvar::new(),
            writer: Mutex::new(writer),
            ack_lock: Mutex::new(()),
            _lock: lock,
        };
        // Age-based retention may already apply to what was on disk.
        let unlink = {
            let mut st = spool.lock_state();
            spool.collect_trimmable(&mut st)
        };
        spool.unlink(unlink)?;
        // Acked segments a crash left behind were just trimmed too.
        let mut report = report;
        {
            let st = spool.lock_state();
            report.first_seq = first_available(&st);
            report.segments = st.segments.len();
            report.disk_usage = st.used;
        }
        Ok((spool, report))
    }

    /// Appends facts (encoded with [`FactBody::to_wire`]) and returns once
    /// they are fsynced. Accepts `Vec<FactBody>`, `&[FactBody]`, …. All or
    /// nothing: on [`SpoolError::Full`] or any other error none of the facts
    /// is stored (a failed write is undone), with one exception: if the
    /// fsync itself fails, whether the facts reached the disk is unknown
    /// (the spool then refuses appends until reopened, see
    /// [`SpoolError::Poisoned`]). Blocks: call from a plain thread or
    /// `spawn_blocking`.
    pub fn append<I>(&self, facts: I) -> Result<AppendReceipt, SpoolError>
    where
        I: IntoIterator,
        I::Item: Borrow<FactBody>,
    {
        let records = facts
            .into_iter()
            .map(|f| {
                let (kind, json) = f.borrow().to_wire();
                EncodedRecord::new(kind, &json)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.append_records(records)
    }

    /// Like [`Spool::append`] for facts already in wire form `(kind, json)`.
    /// The spool does not parse the JSON.
    pub fn append_wire<'a, I>(&self, facts: I) -> Result<AppendReceipt, SpoolError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let records = facts
            .into_iter()
            .map(|(kind, json)| EncodedRecord::new(kind, json))
            .collect::<Result<Vec<_>, _>>()?;
        self.append_records(records)
    }

    fn append_records(&self, mut records: Vec<EncodedRecord>) -> Result<AppendReceipt, SpoolError> {
        let bytes: u64 = records.iter().map(|r| r.len() as u64).sum();
        let mut st = self.lock_state();
        if let Some(reason) = &st.poisoned {
            return Err(SpoolError::Poisoned {
                reason: reason.clone(),
            });
        }
        if records.is_empty() {
            return Ok(AppendReceipt {
                first_seq: st.next_seq,
                last_seq: st.next_seq - 1,
            });
        }
        // Room for the records and, should they start a segment, its header.
        let need = bytes + SEGMENT_HEADER_LEN;
        let mut unlink = Vec::new();
        while st.used + st.reserved + need > self.cfg.quota_bytes {
            match self.cfg.retention {
                Retention::DropOldest { .. } if st.segments.len() > 1 => {
                    if let Some((_, seg)) = st.segments.pop_first() {
                        warn!(
                            segment = %seg.path.display(),
                            first_seq = seg.first_seq,
                            last_seq = seg.next_seq - 1,
                            acked = st.acked,
                            "quota reached: dropping the oldest segment (retention DropOldest)"
                        );
                        st.used -= seg.len;
                        unlink.push(seg.path);
                    }
                }
                _ => break,
            }
        }
        if st.used + st.reserved + need > self.cfg.quota_bytes {
            let used = st.used + st.reserved;
            drop(st);
            self.unlink(unlink)?;
            return Err(SpoolError::Full {
                used,
                quota: self.cfg.quota_bytes,
                needed: need,
            });
        }
        let first_seq = st.next_seq;
        for mut rec in records.drain(..) {
            let seq = st.next_seq;
            rec.seal(seq);
            st.pending.push((seq, rec));
            st.next_seq += 1;
        }
        let last_seq = st.next_seq - 1;
        st.reserved += bytes;
        st.pending_bytes += bytes as usize;
        self.queued.notify_one();
        if !unlink.is_empty() {
            drop(st);
            self.unlink(unlink)?;
            st = self.lock_state();
        }

        loop {
            if st.durable_seq >= last_seq {
                return Ok(AppendReceipt {
                    first_seq,
                    last_seq,
                });
            }
            if let Some(reason) = &st.poisoned {
                return Err(SpoolError::Poisoned {
                    reason: reason.clone(),
                });
            }
            if st.pending.is_empty() || st.writers >= self.cfg.group_commit.max_inflight {
                st = self.committed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead: write everything queued so far and fsync it once.
            st.writers += 1;
            let gc = self.cfg.group_commit;
            if !gc.max_delay.is_zero() {
                let deadline = Instant::now() + gc.max_delay;
                while st.pending_bytes < gc.max_batch_bytes {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    st = self
                        .queued
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            drop(st);
            let result = self.write_and_sync();
            st = self.lock_state();
            st.writers -= 1;
            match result {
                Ok(None) => {}
                Ok(Some(done)) => {
                    st.completed.insert(done.number, done);
                    // Publish in write order: a batch is durable once it and
                    // every batch written before it are fsynced.
                    let now = SystemTime::now();
                    loop {
                        let next = st.next_publish;
                        let Some(done) = st.completed.remove(&next) else {
                            break;
                        };
                        for u in done.updates {
                            self.apply(&mut st, u, now);
                        }
                        st.durable_seq = done.last_seq;
                        st.reserved = st.reserved.saturating_sub(done.bytes);
                        st.commits += 1;
                        st.next_publish += 1;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "spool write failed; refusing further appends until reopened");
                    st.poisoned = Some(e.to_string());
                    self.committed.notify_all();
                    return Err(e);
                }
            }
            self.committed.notify_all();
            let unlink = self.collect_trimmable(&mut st);
            if !unlink.is_empty() {
                drop(st);
                self.unlink(unlink)?;
                st = self.lock_state();
            }
        }
    }

    /// Takes the queued records, writes them (under the writer lock, so
    /// batches land in the order they are numbered) and fsyncs them (outside
    /// it, so up to `max_inflight` fsyncs overlap). `None`: nothing queued.
    fn write_and_sync(&self) -> Result<Option<Written>, SpoolError> {
        let started = Instant::now();
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &w.failed {
            return Err(SpoolError::Poisoned {
                reason: reason.clone(),
            });
        }
        let (batch, bytes, number) = {
            let mut st = self.lock_state();
            if st.pending.is_empty() {
                return Ok(None);
            }
            let number = st.next_batch;
            st.next_batch += 1;
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.pending_bytes) as u64,
                number,
            )
        };
        let records = batch.len();
        let last_seq = batch.last().map(|(s, _)| *s).unwrap_or(0);
        let (orig_file, orig_path) = (w.file.clone(), w.path.clone());
        let (orig_first, orig_len, orig_next) = (w.first_seq, w.len, w.next_seq);
        let mut created = Vec::new();
        let updates = match self.write_batch(&mut w, batch, &mut created) {
            Ok(u) => u,
            Err(e) => {
                // Undo the batch (a partial pwrite, e.g. on ENOSPC, and any
                // segment it started) so that a reopen finds exactly what
                // was reported durable, not facts whose append failed.
                if let Err(undo) = orig_file
                    .set_len(orig_len)
                    .and_then(|()| orig_file.sync_all())
                {
                    warn!(segment = %orig_path.display(), error = %undo, "could not undo a failed write");
                }
                for p in &created {
                    let _ = fs::remove_file(p);
                }
                if !created.is_empty() {
                    let _ = sync_dir(&self.dir);
                }
                *w = Writer {
                    file: orig_file,
                    path: orig_path,
                    first_seq: orig_first,
                    len: orig_len,
                    next_seq: orig_next,
                    failed: Some(e.to_string()),
                };
                return Err(e);
            }
        };
        let (file, path) = (w.file.clone(), w.path.clone());
        drop(w);
        file.sync_data()
            .map_err(|e| SpoolError::io("fsyncing segment", &path, e))?;
        debug!(
            records,
            micros = started.elapsed().as_micros() as u64,
            "group commit"
        );
        Ok(Some(Written {
            number,
            last_seq,
            bytes,
            updates,
        }))
    }

    /// Writes a batch to the active segment(s) without the final fsync. Runs
    /// under the writer lock, without the state lock.
    fn write_batch(
        &self,
        w: &mut Writer,
        batch: Vec<(u64, EncodedRecord)>,
        created: &mut Vec<PathBuf>,
    ) -> Result<Vec<SegUpdate>, SpoolError> {
        let mut updates = vec![SegUpdate {
            first_seq: w.first_seq,
            created: None,
            len: w.len,
            next_seq: w.next_seq,
            index: Vec::new(),
        }];
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = w.len;
        for (seq, rec) in batch {
            let rlen = rec.len() as u64;
            if w.len + rlen > self.cfg.segment_bytes && w.next_seq > w.first_seq {
                // Seal: the old segment must be durable before a newer one
                // exists, or recovery would find a torn "sealed" segment.
                write_at(&w.file, &w.path, &buf, buf_at)?;
                buf.clear();
                w.file
                    .sync_data()
                    .map_err(|e| SpoolError::io("fsyncing segment", &w.path, e))?;
                let (path, file) = create_segment(&self.dir, seq, created)?;
                debug!(segment = %path.display(), "started a new segment");
                *w = Writer {
                    file: file.clone(),
                    path: path.clone(),
                    first_seq: seq,
                    len: SEGMENT_HEADER_LEN,
                    next_seq: seq,
                    failed: None,
                };
                buf_at = w.len;
                updates.push(SegUpdate {
                    first_seq: seq,
                    created: Some((path, file)),
                    len: w.len,
                    next_seq: seq,
                    index: Vec::new(),
                });
            }
            let Some(u) = updates.last_mut() else {
                continue; // unreachable: updates starts non-empty
            };
            if (seq - w.first_seq).is_multiple_of(INDEX_STRIDE) {
                u.index.push((seq, w.len));
            }
            buf.extend_from_slice(&rec.bytes);
            w.len += rlen;
            w.next_seq = seq + 1;
            u.len = w.len;
            u.next_seq = w.next_seq;
        }
        write_at(&w.file, &w.path, &buf, buf_at)?;
        Ok(updates)
    }

    fn apply(&self, st: &mut State, u: SegUpdate, now: SystemTime) {
        match u.created {
            Some((path, file)) => {
                st.used += u.len;
                st.segments.insert(
                    u.first_seq,
                    Segment {
                        first_seq: u.first_seq,
                        path,
                        file,
                        len: u.len,
                        next_seq: u.next_seq,
                        index: u.index,
                        modified: now,
                    },
                );
            }
            None => {
                // The segment that was active when the batch started is the
                // newest in the map until now, so trimming cannot have
                // removed it.
                if let Some(seg) = st.segments.get_mut(&u.first_seq) {
                    st.used += u.len - seg.len;
                    seg.len = u.len;
                    seg.next_seq = u.next_seq;
                    seg.index.extend(u.index);
                    seg.modified = now;
                }
            }
        }
    }

    /// Up to `max` facts with seq > `after_seq`, in order; empty when there
    /// are none. Fails with [`SpoolError::Trimmed`] when fact `after_seq + 1`
    /// was already trimmed, and with [`SpoolError::Corrupt`] when a stored
    /// record fails its checksum.
    pub fn read_since(&self, after_seq: u64, max: usize) -> Result<Vec<WireFact>, SpoolError> {
        let start = after_seq.saturating_add(1);
        let mut plan = Vec::new();
        {
            let st = self.lock_state();
            let first = first_available(&st);
            if start < first {
                return Err(SpoolError::Trimmed {
                    after_seq,
                    first_available: first,
                });
            }
            if max == 0 || after_seq >= st.durable_seq {
                return Ok(Vec::new());
            }
            let mut remaining = max as u64;
            let containing = st.segments.range(..=start).next_back();
            let later = st.segments.range(start.saturating_add(1)..);
            for (_, seg) in containing.into_iter().chain(later) {
                if seg.next_seq <= start {
                    continue;
                }
                let (from_seq, from_off) = if start > seg.first_seq {
                    let i = seg.index.partition_point(|&(s, _)| s <= start);
                    if i == 0 {
                        (seg.first_seq, SEGMENT_HEADER_LEN)
                    } else {
                        seg.index[i - 1]
                    }
                } else {
                    (seg.first_seq, SEGMENT_HEADER_LEN)
                };
                plan.push((
                    seg.file.clone(),
                    seg.path.clone(),
                    from_off,
                    seg.len,
                    from_seq,
                    seg.next_seq,
                ));
                let n = seg.next_seq - start.max(seg.first_seq);
                if n >= remaining {
                    break;
                }
                remaining -= n;
            }
        }
        // Read without the lock: the files stay readable through their open
        // handles even if a concurrent ack unlinks them.
        let mut out = Vec::with_capacity(max.min(4096));
        for (file, path, from, end, from_seq, next_seq) in plan {
            let mut visit = |rec: record::RawRecord<'_>| -> Result<bool, SpoolError> {
                if rec.seq > after_seq {
                    let kind = std::str::from_utf8(rec.kind).map_err(|_| {
                        SpoolError::corrupt(&path, rec.offset, "fact kind is not UTF-8")
                    })?;
                    let body = std::str::from_utf8(rec.body).map_err(|_| {
                        SpoolError::corrupt(&path, rec.offset, "fact body is not UTF-8")
                    })?;
                    out.push((rec.seq, kind.to_string(), body.to_string()));
                }
                Ok(out.len() < max)
            };
            let end_state = record::scan(&file, &path, from, end, from_seq, &mut visit)?;
            if let Some(stop) = end_state.stop {
                return Err(SpoolError::corrupt(&path, stop.offset, stop.reason));
            }
            if out.len() >= max {
                break;
            }
            if end_state.next_seq != next_seq {
                return Err(SpoolError::corrupt(
                    &path,
                    end_state.end,
                    format!(
                        "segment ends at seq {} but the index expects {}",
                        end_state.next_seq - 1,
                        next_seq - 1
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Records that the consumer committed every fact up to `seq`
    /// (persisted atomically before returning) and trims the segments that
    /// hold only acknowledged facts. Acks are monotonic: an older `seq` is a
    /// no-op. Fails with [`SpoolError::AckBeyondEnd`] past [`Spool::last_seq`].
    pub fn ack(&self, seq: u64) -> Result<(), SpoolError> {
        let _ack = self.ack_lock.lock().unwrap_or_else(|p| p.into_inner());
        {
            let st = self.lock_state();
            if seq > st.durable_seq {
                return Err(SpoolError::AckBeyondEnd {
                    seq,
                    last_seq: st.durable_seq,
                });
            }
            if seq <= st.acked {
                return Ok(());
            }
        }
        let contents = format!("{seq}\n");
        match write_atomic(&self.dir, ACK_FILE, contents.as_bytes()) {
            Ok(()) => {}
            Err(SpoolError::Io { source, .. }) if source.raw_os_error() == Some(ENOSPC) => {
                // A full disk must not stop the ack that would free it: the
                // consumer has committed these facts, so their segments may
                // go first. (A crash in between leaves an older ack on disk
                // and fewer segments; the consumer's own cursor is ahead.)
                warn!(
                    seq,
                    "disk full writing the ack file; trimming acknowledged segments first"
                );
                let unlink = {
                    let mut st = self.lock_state();
                    self.collect_trimmable_upto(&mut st, seq)
                };
                self.unlink(unlink)?;
                write_atomic(&self.dir, ACK_FILE, contents.as_bytes())?;
            }
            Err(e) => return Err(e),
        }
        let unlink = {
            let mut st = self.lock_state();
            st.acked = seq;
            self.collect_trimmable(&mut st)
        };
        self.unlink(unlink)
    }

    /// Applies the retention policy now (acked segments, and with
    /// [`Retention::DropOldest`] segments past `max_age`). Acks and appends
    /// do this too; a daemon with `max_age` set may call it on a timer.
    /// Returns how many segments were removed.
    pub fn trim(&self) -> Result<usize, SpoolError> {
        let unlink = {
            let mut st = self.lock_state();
            self.collect_trimmable(&mut st)
        };
        let n = unlink.len();
        self.unlink(unlink)?;
        Ok(n)
    }

    /// Removes from the map the sealed segments policy lets go and returns
    /// their paths for unlinking (outside the lock). Never the newest one.
    fn collect_trimmable(&self, st: &mut State) -> Vec<PathBuf> {
        let acked = st.acked;
        self.collect_trimmable_upto(st, acked)
    }

    /// [`Spool::collect_trimmable`] with segments up to `acked` counting as
    /// acknowledged.
    fn collect_trimmable_upto(&self, st: &mut State, acked_seq: u64) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let now = SystemTime::now();
        while st.segments.len() > 1 {
            let Some(oldest) = st.segments.values().next() else {
                break;
            };
            let acked = oldest.next_seq <= acked_seq + 1;
            let expired = match self.cfg.retention {
                Retention::DropOldest { max_age: Some(age) } => now
                    .duration_since(oldest.modified)
                    .map(|d| d > age)
                    .unwrap_or(false),
                _ => false,
            };
            if !(acked || expired) {
                break;
            }
            let Some((_, seg)) = st.segments.pop_first() else {
                break;
            };
            if !acked {
                warn!(
                    segment = %seg.path.display(),
                    first_seq = seg.first_seq,
                    last_seq = seg.next_seq - 1,
                    acked = st.acked,
                    "dropping an unacknowledged segment past max_age (retention DropOldest)"
                );
            } else {
                debug!(segment = %seg.path.display(), "trimmed acknowledged segment");
            }
            st.used -= seg.len;
            out.push(seg.path);
        }
        out
    }

    fn unlink(&self, paths: Vec<PathBuf>) -> Result<(), SpoolError> {
        if paths.is_empty() {
            return Ok(());
        }
        for p in &paths {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io("removing segment", p, e)),
            }
        }
        sync_dir(&self.dir)
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves State consistent enough:
        // every mutation is a few field updates with no I/O in between.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest durable seq (0 if nothing was ever appended).
    pub fn last_seq(&self) -> u64 {
        self.lock_state().durable_seq
    }

    /// The oldest seq still stored (`last_seq() + 1` when the spool is empty).
    pub fn first_seq(&self) -> u64 {
        first_available(&self.lock_state())
    }

    /// The highest seq the consumer acknowledged.
    pub fn acked_seq(&self) -> u64 {
        self.lock_state().acked
    }

    pub fn spool_id(&self) -> SpoolId {
        self.id
    }

    /// Bytes in segment files (what the quota limits).
    pub fn disk_usage(&self) -> u64 {
        self.lock_state().used
    }

    /// How many group commits (batches written with one fsync) this spool
    /// made since it was opened; with concurrent appenders it is smaller
    /// than the number of `append` calls.
    pub fn commits(&self) -> u64 {
        self.lock_state().commits
    }

    /// Number of segment files.
    pub fn segments(&self) -> usize {
        self.lock_state().segments.len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.cfg
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn first_available(st: &State) -> u64 {
    // Only the newest segment can be empty, so the oldest one's first seq is
    // the first stored fact (or, empty, the next to come).
    st.segments.keys().next().copied().unwrap_or(st.next_seq)
}

fn validate(cfg: &SpoolConfig) -> Result<(), SpoolError> {
    if cfg.segment_bytes < 1024 {
        return Err(SpoolError::InvalidConfig(format!(
            "segment_bytes {} is below the minimum 1024",
            cfg.segment_bytes
        )));
    }
    if cfg.group_commit.max_inflight == 0 {
        return Err(SpoolError::InvalidConfig(
            "group_commit.max_inflight must be at least 1".into(),
        ));
    }
    if cfg.quota_bytes < cfg.segment_bytes {
        return Err(SpoolError::InvalidConfig(format!(
            "quota_bytes {} is smaller than segment_bytes {}",
            cfg.quota_bytes, cfg.segment_bytes
        )));
    }
    Ok(())
}

fn recover_segment(
    path: &Path,
    first_seq: u64,
    is_last: bool,
    acked: u64,
    expected: Option<u64>,
    torn_tail: &mut Option<TornTail>,
) -> Result<Segment, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| SpoolError::io("opening segment", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| SpoolError::io("stat", path, e))?;
    let file_len = meta.len();
    let modified = meta.modified().unwrap_or_else(|_| SystemTime::now());
    if let Some(exp) = expected {
        if exp != first_seq {
            return Err(SpoolError::corrupt(
                path,
                0,
                format!(
                    "segment starts at seq {first_seq} but the previous one ends at seq {}",
                    exp - 1
                ),
            ));
        }
    }
    if file_len < SEGMENT_HEADER_LEN {
        if !is_last {
            return Err(SpoolError::corrupt(
                path,
                0,
                format!("sealed segment is only {file_len} bytes"),
            ));
        }
        // Created but its header never made it to disk: start it over.
        file.set_len(0)
            .map_err(|e| SpoolError::io("truncating segment", path, e))?;
        write_at(&file, path, &record::segment_header(first_seq), 0)?;
        file.sync_all()
            .map_err(|e| SpoolError::io("fsyncing segment", path, e))?;
        warn!(segment = %path.display(), bytes = file_len, "rewrote a segment header cut short by a crash");
        *torn_tail = Some(TornTail {
            path: path.to_path_buf(),
            offset: 0,
            dropped_bytes: file_len,
            reason: "segment header cut short".into(),
        });
        return Ok(Segment {
            first_seq,
            path: path.to_path_buf(),
            file: Arc::new(file),
            len: SEGMENT_HEADER_LEN,
            next_seq: first_seq,
            index: Vec::new(),
            modified,
        });
    }
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| SpoolError::io("reading segment header", path, e))?;
    let header_seq =
        record::parse_segment_header(&header).map_err(|r| SpoolError::corrupt(path, 0, r))?;
    if header_seq != first_seq {
        return Err(SpoolError::corrupt(
            path,
            8,
            format!("header says first seq {header_seq}, file name says {first_seq}"),
        ));
    }
    let mut index = Vec::new();
    let mut visit = |rec: record::RawRecord<'_>| -> Result<bool, SpoolError> {
        if (rec.seq - first_seq).is_multiple_of(INDEX_STRIDE) {
            index.push((rec.seq, rec.offset));
        }
        Ok(true)
    };
    let end = record::scan(
        &file,
        path,
        SEGMENT_HEADER_LEN,
        file_len,
        first_seq,
        &mut visit,
    )?;
    if let Some(stop) = end.stop {
        if !is_last {
            return Err(SpoolError::corrupt(
                path,
                stop.offset,
                format!("in a sealed segment: {}", stop.reason),
            ));
        }
        if end.next_seq <= acked {
            return Err(SpoolError::corrupt(
                path,
                stop.offset,
                format!(
                    "{}; records up to seq {acked} were acknowledged by the consumer, so they were durable",
                    stop.reason
                ),
            ));
        }
        file.set_len(end.end)
            .map_err(|e| SpoolError::io("truncating torn tail of", path, e))?;
        file.sync_all()
            .map_err(|e| SpoolError::io("fsyncing segment", path, e))?;
        let dropped = file_len - end.end;
        warn!(
            segment = %path.display(),
            offset = end.end,
            dropped_bytes = dropped,
            reason = %stop.reason,
            "truncated a torn tail (records never acknowledged as durable)"
        );
        *torn_tail = Some(TornTail {
            path: path.to_path_buf(),
            offset: end.end,
            dropped_bytes: dropped,
            reason: stop.reason,
        });
    }
    Ok(Segment {
        first_seq,
        path: path.to_path_buf(),
        file: Arc::new(file),
        len: end.end,
        next_seq: end.next_seq,
        index,
        modified,
    })
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.{SEGMENT_EXT}"))
}

/// Creates a segment file with its header; its path goes into `created` as
/// soon as the file exists, so a failed batch can remove it.
fn create_segment(
    dir: &Path,
    first_seq: u64,
    created: &mut Vec<PathBuf>,
) -> Result<(PathBuf, Arc<File>), SpoolError> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| SpoolError::io("creating segment", &path, e))?;
    created.push(path.clone());
    write_at(&file, &path, &record::segment_header(first_seq), 0)?;
    file.sync_all()
        .map_err(|e| SpoolError::io("fsyncing segment", &path, e))?;
    sync_dir(dir)?;
    Ok((path, Arc::new(file)))
}

fn write_at(file: &File, path: &Path, bytes: &[u8], at: u64) -> Result<(), SpoolError> {
    if bytes.is_empty() {
        return Ok(());
    }
    file.write_all_at(bytes, at)
        .map_err(|e| SpoolError::io("writing segment", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io("fsyncing directory", dir, e))
}

/// Replaces `dir/name` atomically: temp file, fsync, rename, fsync dir.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dest = dir.join(name);
    {
        let f = File::create(&tmp).map_err(|e| SpoolError::io("creating", &tmp, e))?;
        f.write_all_at(bytes, 0)
            .map_err(|e| SpoolError::io("writing", &tmp, e))?;
        f.sync_all()
            .map_err(|e| SpoolError::io("fsyncing", &tmp, e))?;
    }
    fs::rename(&tmp, &dest).map_err(|e| SpoolError::io("renaming into place", &dest, e))?;
    sync_dir(dir)
}
