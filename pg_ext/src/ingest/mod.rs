//! The ingest worker: a static background worker (registered only when the
//! library is in `shared_preload_libraries`) that moves facts from liminald's
//! spool into the version tables, exactly once.
//!
//! Protocol (see CONTRACTS, D-Bus API): on every (re)connection the worker
//! reads `SpoolId` (the cursor's key), then replays with
//! `FactsSince(cursor, 10000)` until it returns nothing, while
//! `FactsAppended` signals stream in. Facts wait in a buffer ordered by seq;
//! only the contiguous run after the committed cursor is written, in one
//! transaction with the cursor row (store.rs), then acknowledged with
//! `AckFacts`. A hole in front of buffered facts triggers a replay instead
//! of writing past it. When idle the worker polls with a replay once a
//! second, which also refreshes the lag.
//!
//! Status lives in the table `liminal.ingest_state` (not shared memory: it
//! survives restarts and is readable with plain SQL), shown with the cursor
//! by the view `liminal.ingest_status`.

mod bus;
pub mod store;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::WireFact;

pub static BUS_ADDRESS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// Facts written per transaction at most (a replay page).
const MAX_BATCH: usize = 10_000;
/// Facts held while waiting for a hole to be filled; beyond it the newest are
/// dropped (the replay fetches them again).
const MAX_BUFFERED: usize = 200_000;
/// Idle poll: replay once a second to catch anything missed and refresh the lag.
const POLL: Duration = Duration::from_secs(1);

pub fn init() {
    GucRegistry::define_string_guc(
        c"liminal.bus_address",
        c"D-Bus address of the bus liminald is on (empty: the system bus).",
        c"A ,guid= part is ignored, so the worker can reconnect to a restarted bus. Read when the ingest worker starts.",
        &BUS_ADDRESS,
        // Sighup, not Postmaster: a Postmaster GUC cannot be defined after
        // startup, which makes CREATE EXTENSION fail in a backend that loads
        // the library without shared_preload_libraries.
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"liminal.database",
        c"Database the ingest worker writes into (where CREATE EXTENSION liminal ran).",
        c"Default postgres. Read when the ingest worker starts.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: reading a backend global on the main thread.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        BackgroundWorkerBuilder::new("liminal ingest")
            .set_type("liminal ingest")
            .set_function("liminal_ingest_main")
            .set_library("liminal")
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

fn guc_string(g: &GucSetting<Option<CString>>) -> Option<String> {
    g.get()
        .and_then(|c| c.into_string().ok())
        .filter(|s| !s.trim().is_empty())
}

/// What the main thread knows about the current session.
#[derive(Default)]
struct State {
    source: Option<String>,
    cursor: u64,
    connected: bool,
    replay_pending: bool,
    /// A gap appeared while a replay was running: run another when it ends.
    replay_again: bool,
    daemon_last_seq: Option<u64>,
    buffer: BTreeMap<u64, WireFact>,
    last_poll: Option<Instant>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn liminal_ingest_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = guc_string(&DATABASE).unwrap_or_else(|| "postgres".into());
    let address = guc_string(&BUS_ADDRESS);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    log!(
        "liminal ingest: starting (database {db}, bus {})",
        address.as_deref().unwrap_or("system")
    );

    // The worker can start before CREATE EXTENSION: wait for the schema.
    loop {
        if BackgroundWorker::transaction(store::schema_ready) {
            break;
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            return;
        }
    }

    let waker = bus::Waker::for_my_latch();
    let committed = Arc::new(AtomicU64::new(0));
    let (events, commands) = match bus::spawn(address, waker, committed.clone()) {
        Ok(ch) => ch,
        Err(e) => {
            // Exit with an error: the postmaster restarts the worker.
            pgrx::error!("liminal ingest: could not start the bus thread: {e}");
        }
    };
    let mut st = State::default();
    let send = |c: bus::Command| {
        // The bus thread only goes away with the process.
        let _ = commands.send(c);
    };

    while BackgroundWorker::wait_latch(Some(POLL)) {
        loop {
            match events.try_recv() {
                Ok(ev) => {
                    handle_event(&mut st, ev, &send);
                    committed.store(st.cursor, Ordering::Relaxed);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    pgrx::error!("liminal ingest: the bus thread stopped");
                }
            }
        }
        let Some(source) = st.source.clone() else {
            continue;
        };
        if !st.connected {
            continue;
        }
        // Write what is contiguous after the cursor, a page at a time.
        loop {
            while st
                .buffer
                .first_key_value()
                .is_some_and(|(s, _)| *s <= st.cursor)
            {
                st.buffer.pop_first();
            }
            let mut batch: Vec<WireFact> = Vec::new();
            let mut next = st.cursor + 1;
            while batch.len() < MAX_BATCH {
                match st.buffer.remove(&next) {
                    Some(f) => {
                        batch.push(f);
                        next += 1;
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let daemon = st.daemon_last_seq;
            let src = source.clone();
            // An error here raises a PostgreSQL ERROR: the transaction aborts
            // (no fact without its cursor), the worker exits and the
            // postmaster restarts it, resuming from the committed cursor.
            let o = BackgroundWorker::transaction(move || {
                match store::write_batch(&src, &batch, daemon) {
                    Ok(o) => o,
                    Err(e) => pgrx::error!("liminal ingest: writing a batch failed: {e}"),
                }
            });
            if o.rejected > 0 {
                warning!(
                    "liminal ingest: {} malformed fact(s) up to seq {} kept in liminal.ingest_errors",
                    o.rejected,
                    o.last_seq
                );
            }
            st.cursor = o.last_seq;
            committed.store(st.cursor, Ordering::Relaxed);
            send(bus::Command::Ack(o.last_seq));
        }
        // A hole in front of buffered facts, or time for the idle poll.
        let hole = st
            .buffer
            .first_key_value()
            .is_some_and(|(s, _)| *s > st.cursor + 1);
        let idle = st.last_poll.is_none_or(|t| t.elapsed() >= POLL);
        if hole || idle {
            request_replay(&mut st, &send);
        }
    }
    log!("liminal ingest: stopping");
    // Exit code 1, not 0: a worker that exits 0 is never restarted, and a
    // pg_terminate_backend must not end ingest for good (at shutdown the
    // postmaster does not restart anything anyway).
    unsafe { pg_sys::proc_exit(1) }
}

fn request_replay(st: &mut State, send: &impl Fn(bus::Command)) {
    if st.replay_pending {
        st.replay_again = true;
        return;
    }
    st.replay_pending = true;
    st.replay_again = false;
    st.last_poll = Some(Instant::now());
    send(bus::Command::Replay { after: st.cursor });
}

fn handle_event(st: &mut State, ev: bus::Event, send: &impl Fn(bus::Command)) {
    match ev {
        bus::Event::Connected { spool_id, last_seq } => {
            let src = spool_id.clone();
            let cursor = BackgroundWorker::transaction(move || -> Result<u64, String> {
                let c = store::cursor_for_update(&src).map_err(|e| e.to_string())?;
                store::set_state(&src, true, None, Some(last_seq)).map_err(|e| e.to_string())?;
                Ok(c)
            });
            match cursor {
                Ok(c) => {
                    log!("liminal ingest: connected to spool {spool_id} (daemon at seq {last_seq}, cursor {c})");
                    st.source = Some(spool_id);
                    st.cursor = c;
                    st.connected = true;
                    st.replay_pending = false;
                    st.buffer.clear();
                    st.daemon_last_seq = Some(last_seq);
                    request_replay(st, send);
                }
                Err(e) => pgrx::error!("liminal ingest: reading the cursor failed: {e}"),
            }
        }
        bus::Event::Facts { facts, replay: _ } => {
            for f in facts {
                if f.seq > st.cursor {
                    st.daemon_last_seq = Some(st.daemon_last_seq.unwrap_or(0).max(f.seq));
                    st.buffer.insert(f.seq, f);
                }
            }
            while st.buffer.len() > MAX_BUFFERED {
                st.buffer.pop_last();
            }
        }
        bus::Event::ReplayDone { last_seq } => {
            st.replay_pending = false;
            if let Some(l) = last_seq {
                st.daemon_last_seq = Some(l);
            }
            if st.replay_again {
                request_replay(st, send);
            }
        }
        bus::Event::Trimmed {
            after,
            first,
            message,
        } => {
            // The facts in between are gone from the spool: record the loss
            // loudly and move on rather than stall forever.
            st.replay_pending = false;
            if let Some(source) = st.source.clone() {
                let reason = format!(
                    "facts {}..{} were trimmed from the spool before ingest: {message}",
                    after + 1,
                    first - 1
                );
                warning!("liminal ingest: {reason}");
                let gap = WireFact {
                    seq: after + 1,
                    kind: "trimmed".into(),
                    json: "{}".into(),
                };
                let r = BackgroundWorker::transaction(move || {
                    store::record_gap(&source, &gap, first - 1, &reason)
                });
                match r {
                    Ok(()) => st.cursor = first - 1,
                    Err(e) => warning!("liminal ingest: recording a trimmed range failed: {e}"),
                }
            }
            request_replay(st, send);
        }
        bus::Event::Disconnected { error } => {
            if st.connected || st.source.is_none() {
                warning!("liminal ingest: bus session ended: {error}");
            }
            st.connected = false;
            st.replay_pending = false;
            st.buffer.clear();
            let src = st.source.clone().unwrap_or_else(|| "bus".into());
            let _ = BackgroundWorker::transaction(move || {
                store::set_state(&src, false, Some(&error), None)
            });
        }
    }
}
