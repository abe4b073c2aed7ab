//! The fact pipeline: engine sinks and the daemon send facts to one spooler
//! thread, which appends whatever has gathered in one fsynced batch (group
//! commit), then hands the batch, now with seqs, to the announcer task that
//! emits `FactsAppended` and moves the run objects.
//!
//! One writer keeps seqs and announcements in the same order; the bounded
//! channel pushes back on a run that logs faster than the disk syncs.

use liminal_facts::FactBody;
use liminal_spool::{Spool, SpoolError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A fact with its seq and its wire form.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub seq: u64,
    pub kind: &'static str,
    pub json: String,
    pub body: FactBody,
}

pub type Admit = oneshot::Sender<Result<u64, String>>;

// Facts are nearly every message; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum SpoolMsg {
    /// A fact; with `Some(reply)` it is refused (not retried) when the spool
    /// is full and the reply says so (admission of a new run).
    Fact(FactBody, Option<Admit>),
    /// Replies once everything sent before is durable and announced.
    Flush(oneshot::Sender<()>),
}

pub enum Announce {
    Batch(Vec<Spooled>),
    Flushed(oneshot::Sender<()>),
}

/// Facts taken from the channel per append at most.
const MAX_BATCH: usize = 4096;
pub const CHANNEL_DEPTH: usize = 8192;

pub fn spawn(
    spool: Arc<Spool>,
    rx: Receiver<SpoolMsg>,
    out: mpsc::UnboundedSender<Announce>,
    full: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("spooler".into())
        .spawn(move || run(&spool, &rx, &out, &full))
}

fn run(
    spool: &Spool,
    rx: &Receiver<SpoolMsg>,
    out: &mpsc::UnboundedSender<Announce>,
    full: &AtomicBool,
) {
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        let mut facts: Vec<(FactBody, Option<Admit>)> = Vec::with_capacity(msgs.len());
        let mut flushes = Vec::new();
        for m in msgs {
            match m {
                SpoolMsg::Fact(f, reply) => facts.push((f, reply)),
                SpoolMsg::Flush(tx) => flushes.push(tx),
            }
        }
        if !append_with_retry(spool, facts, full, out, rx, &mut flushes) {
            return;
        }
        for tx in flushes {
            let _ = out.send(Announce::Flushed(tx));
        }
    }
}

/// Appends all `facts`, in order, and hands each appended chunk, now with
/// seqs, to the announcer at once (a consumer must see facts to acknowledge
/// them and so make room for the rest). False once the announcer is gone.
///
/// On `Full` it refuses the admission facts (their callers report
/// SpoolFull) and keeps the rest: the engine's facts wait, since a run in
/// progress must not lose facts. It then appends the largest prefix that
/// fits, halving the chunk, so a batch larger than the free space (or the
/// whole quota) still goes in piece by piece as acknowledgements make room;
/// only when a single fact does not fit does it pause. Other errors are
/// retried after a pause.
fn append_with_retry(
    spool: &Spool,
    mut facts: Vec<(FactBody, Option<Admit>)>,
    full: &AtomicBool,
    out: &mpsc::UnboundedSender<Announce>,
    rx: &Receiver<SpoolMsg>,
    flushes: &mut Vec<oneshot::Sender<()>>,
) -> bool {
    let mut pause = Duration::from_millis(50);
    let mut chunk = facts.len();
    // Messages taken from the channel while waiting for room, at most a
    // channel's worth: enough to reach any admission sent before `full`
    // was raised; past it the engine's sinks block again (back-pressure).
    let mut drained = 0usize;
    while !facts.is_empty() {
        chunk = chunk.clamp(1, facts.len());
        match spool.append(facts[..chunk].iter().map(|(f, _)| f)) {
            Ok(receipt) => {
                pause = Duration::from_millis(50);
                let spooled: Vec<Spooled> = facts
                    .drain(..chunk)
                    .zip(receipt.seqs())
                    .map(|((body, reply), seq)| {
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(seq));
                        }
                        let (kind, json) = body.to_wire();
                        Spooled {
                            seq,
                            kind,
                            json,
                            body,
                        }
                    })
                    .collect();
                if out.send(Announce::Batch(spooled)).is_err() {
                    return false;
                }
                chunk = facts.len();
            }
            Err(SpoolError::Poisoned { reason }) => poisoned(&reason),
            Err(e) => {
                let is_full = matches!(e, SpoolError::Full { .. });
                if is_full {
                    full.store(true, Ordering::Relaxed);
                }
                // Admission facts fail fast; the caller reports SpoolFull.
                let before = facts.len();
                facts.retain_mut(|(_, reply)| match reply.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e.to_string()));
                        false
                    }
                    None => true,
                });
                if facts.len() < before {
                    chunk = facts.len();
                    continue;
                }
                if is_full && chunk > 1 {
                    chunk /= 2;
                    continue;
                }
                tracing::warn!(error = %e, facts = facts.len(), "spool append failed; retrying");
                wait_for_room(rx, &mut facts, flushes, &mut drained, pause, &e);
                pause = (pause * 2).min(Duration::from_secs(2));
                chunk = facts.len();
            }
        }
    }
    // Cleared only once everything waiting is in: a run admitted while
    // engine facts still wait would queue behind them.
    full.store(false, Ordering::Relaxed);
    true
}

/// Waits `pause` for room, reading the channel meanwhile: a run's admission
/// that arrives is refused at once (it would otherwise wait behind the facts
/// that do not fit, and its D-Bus caller with it), other facts queue behind
/// the waiting ones in order, flushes are kept for after.
fn wait_for_room(
    rx: &Receiver<SpoolMsg>,
    facts: &mut Vec<(FactBody, Option<Admit>)>,
    flushes: &mut Vec<oneshot::Sender<()>>,
    drained: &mut usize,
    pause: Duration,
    why: &SpoolError,
) {
    let deadline = Instant::now() + pause;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if *drained >= CHANNEL_DEPTH {
            std::thread::sleep(left);
            return;
        }
        match rx.recv_timeout(left) {
            Ok(SpoolMsg::Fact(_, Some(reply))) => {
                let _ = reply.send(Err(why.to_string()));
            }
            Ok(SpoolMsg::Fact(f, None)) => {
                *drained += 1;
                facts.push((f, None));
            }
            Ok(SpoolMsg::Flush(tx)) => flushes.push(tx),
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(left);
                return;
            }
        }
    }
}

/// Exit status when the spool can no longer be trusted: EX_IOERR.
pub const EXIT_SPOOL_POISONED: i32 = 74;

/// A write or fsync of the spool failed: whether the batch reached the disk
/// is unknown, and after a failed fsync the page cache cannot be trusted
/// either (PostgreSQL's answer to the same problem is to crash and recover).
/// So the daemon exits with a failure; systemd restarts it
/// (Restart=on-failure) and recovery at start drops any torn tail, marks
/// the interrupted runs and cleans their sandboxes, as after a kill -9.
/// Facts announced before stay durable; the facts of this batch were never
/// announced, so no consumer has seen them.
fn poisoned(reason: &str) -> ! {
    tracing::error!(
        reason,
        "the fact spool failed to write or sync; exiting so that a restart recovers it"
    );
    crate::notify::failing(
        &format!("fact spool failed: {reason}; restarting to recover"),
        libc_eio(),
    );
    std::process::exit(EXIT_SPOOL_POISONED)
}

fn libc_eio() -> u32 {
    nix::errno::Errno::EIO as u32
}

/// Blocks until the spooler has durably written and announced everything
/// sent before. Used at shutdown.
pub async fn flush(tx: &SyncSender<SpoolMsg>) {
    let (done_tx, done_rx) = oneshot::channel();
    let tx = tx.clone();
    // The channel may be full: send from a blocking thread.
    let sent = tokio::task::spawn_blocking(move || tx.send(SpoolMsg::Flush(done_tx)).is_ok())
        .await
        .unwrap_or(false);
    if sent {
        let _ = tokio::time::timeout(Duration::from_secs(30), done_rx).await;
    }
}
