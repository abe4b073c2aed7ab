//! The daemon's shared state, the run queue and the announcer.

use crate::auth::Authorizer;
use crate::engine_glue::{self, CancelHandle, EngineConfig, RunRequest};
use crate::error::{BusError, BusResult, QUEUE_FULL, SPOOL_FULL, STOPPING};
use crate::service::{self, RunObject};
use crate::spooler::{Announce, SpoolMsg, Spooled};
use crate::state::RunRecord;
use liminal_facts::{FactBody, RunStatus, Ulid};
use liminal_plan::Plan;
use liminal_spool::Spool;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::sync::{mpsc, Notify, Semaphore};
use tracing::Instrument;

// VerifyReproducible lives in its own module; declared here to leave main.rs alone.
#[path = "verify.rs"]
pub mod verify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// Let running runs finish (queued ones are cancelled).
    Finish,
    /// Cancel running and queued runs.
    Cancel,
}

pub struct Settings {
    pub max_concurrent: usize,
    pub queue_depth: u32,
    /// Finished run records kept at most (oldest evicted first).
    pub keep_runs: usize,
    pub on_stop: OnStop,
    pub engine: Arc<EngineConfig>,
    pub auth: Authorizer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Running,
    Done,
}

struct Job {
    cancel: CancelHandle,
    phase: Phase,
}

pub struct Shared {
    pub settings: Settings,
    pub spool: Arc<Spool>,
    pub spool_full: Arc<AtomicBool>,
    pub facts_tx: SyncSender<SpoolMsg>,
    runs: Mutex<BTreeMap<Ulid, RunRecord>>,
    jobs: Mutex<HashMap<Ulid, Job>>,
    pub queued: AtomicU32,
    pub active: AtomicU32,
    slots: Arc<Semaphore>,
    pub stopping: AtomicBool,
    idle: Notify,
    pub conn: OnceLock<zbus::Connection>,
}

/// A poisoned lock here only means a panic elsewhere; the data is still a
/// consistent map, so keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(
        settings: Settings,
        spool: Arc<Spool>,
        spool_full: Arc<AtomicBool>,
        facts_tx: SyncSender<SpoolMsg>,
        runs: BTreeMap<Ulid, RunRecord>,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(settings.max_concurrent.max(1)));
        Shared {
            settings,
            spool,
            spool_full,
            facts_tx,
            runs: Mutex::new(runs),
            jobs: Mutex::new(HashMap::new()),
            queued: AtomicU32::new(0),
            active: AtomicU32::new(0),
            slots,
            stopping: AtomicBool::new(false),
            idle: Notify::new(),
            conn: OnceLock::new(),
        }
    }

    pub fn with_run<R>(&self, id: &Ulid, f: impl FnOnce(&RunRecord) -> R) -> Option<R> {
        lock(&self.runs).get(id).map(f)
    }

    pub fn list_runs(&self) -> Vec<(String, String, String, String, u64)> {
        lock(&self.runs)
            .values()
            .map(|r| {
                (
                    r.run_id.to_string(),
                    r.plan_name.clone(),
                    r.status.as_str().to_owned(),
                    r.input_digest.clone(),
                    u64::try_from(r.started_at.unix_micros()).unwrap_or(0),
                )
            })
            .collect()
    }

    pub fn run_ids(&self) -> Vec<Ulid> {
        lock(&self.runs).keys().copied().collect()
    }

    pub fn status_line(&self) -> String {
        format!(
            "{} running, {} queued, last seq {}",
            self.active.load(Ordering::Relaxed),
            self.queued.load(Ordering::Relaxed),
            self.spool.last_seq()
        )
    }

    /// Sends a fact to the spooler from async code without blocking the
    /// runtime when the channel is full.
    async fn send_fact(&self, fact: FactBody) {
        let tx = self.facts_tx.clone();
        let _ =
            tokio::task::spawn_blocking(move || tx.send(SpoolMsg::Fact(fact, None)).is_ok()).await;
    }

    /// Admits a parsed plan: queue slot, queued fact (durable), run object,
    /// then a task that waits for a free slot and runs it.
    pub async fn start_run(
        self: &Arc<Self>,
        plan: Plan,
        fd_secrets: BTreeMap<String, OwnedFd>,
    ) -> BusResult<Ulid> {
        self.start_run_or_verify(plan, fd_secrets, None).await
    }

    /// [`Self::start_run`], or a reproducibility verification when `verify`
    /// is given.
    pub async fn start_run_or_verify(
        self: &Arc<Self>,
        plan: Plan,
        fd_secrets: BTreeMap<String, OwnedFd>,
        verify: Option<verify::VerifyOptions>,
    ) -> BusResult<Ulid> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(BusError::new(STOPPING, "liminald is stopping"));
        }
        if self.spool_full.load(Ordering::Relaxed) {
            return Err(BusError::new(
                SPOOL_FULL,
                "the fact spool is full: acknowledge facts (AckFacts) to make room",
            ));
        }
        let depth = self.settings.queue_depth;
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < depth).then_some(q + 1)
            })
            .is_err()
        {
            return Err(BusError::new(
                QUEUE_FULL,
                format!("the run queue is full ({depth} runs waiting)"),
            ));
        }
        match self.admit(plan, fd_secrets, verify).await {
            Ok(id) => {
                self.status_changed().await;
                Ok(id)
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    async fn admit(
        self: &Arc<Self>,
        plan: Plan,
        fd_secrets: BTreeMap<String, OwnedFd>,
        verify: Option<verify::VerifyOptions>,
    ) -> BusResult<Ulid> {
        let run_id = liminal_facts::new_id();
        let record = RunRecord::new(
            run_id,
            plan.name.clone(),
            self.settings.engine.host.clone(),
            Some(plan.timeout),
        );
        let queued_fact = FactBody::Run(record.run_fact(RunStatus::Queued, None));
        lock(&self.runs).insert(run_id, record);
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        let tx = self.facts_tx.clone();
        let _ = tokio::task::spawn_blocking(move || {
            tx.send(SpoolMsg::Fact(queued_fact, Some(reply_tx))).is_ok()
        })
        .await;
        let admitted = match reply_rx.await {
            Ok(Ok(_seq)) => Ok(()),
            Ok(Err(e)) => Err(BusError::new(SPOOL_FULL, e)),
            Err(_) => Err(BusError::failed("the spooler stopped")),
        };
        if let Err(e) = admitted {
            lock(&self.runs).remove(&run_id);
            return Err(e);
        }
        if let Some(conn) = self.conn.get() {
            let obj = RunObject {
                shared: Arc::clone(self),
                run_id,
            };
            if let Err(e) = conn
                .object_server()
                .at(service::run_path(&run_id), obj)
                .await
            {
                tracing::warn!(run_id = %run_id, error = %e, "cannot export run object");
            }
        }
        let cancel = CancelHandle::new();
        lock(&self.jobs).insert(
            run_id,
            Job {
                cancel: cancel.clone(),
                phase: Phase::Queued,
            },
        );
        let span = tracing::info_span!("run", run_id = %run_id, plan = %plan.name);
        let me = Arc::clone(self);
        tokio::spawn(
            async move { me.drive(run_id, plan, fd_secrets, cancel, verify).await }
                .instrument(span),
        );
        Ok(run_id)
    }

    async fn drive(
        self: Arc<Self>,
        run_id: Ulid,
        plan: Plan,
        fd_secrets: BTreeMap<String, OwnedFd>,
        cancel: CancelHandle,
        verify: Option<verify::VerifyOptions>,
    ) {
        let permit = Arc::clone(&self.slots).acquire_owned().await;
        let go = {
            let mut jobs = lock(&self.jobs);
            match jobs.get_mut(&run_id) {
                Some(job) if job.phase == Phase::Queued && permit.is_ok() => {
                    job.phase = Phase::Running;
                    true
                }
                _ => false,
            }
        };
        if !go {
            // Cancelled while queued: CancelRun already spooled the fact and
            // gave back the queue slot.
            lock(&self.jobs).remove(&run_id);
            self.finished_one().await;
            return;
        }
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        self.status_changed().await;
        tracing::info!("run starting");
        let cfg = Arc::clone(&self.settings.engine);
        let tx = self.facts_tx.clone();
        let span = tracing::Span::current();
        let plan_name = plan.name.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let mut sink = |fact: FactBody| {
                if let FactBody::TestResult(t) = &fact {
                    tracing::info!(test_name = %t.test_name, status = %t.status, duration_ms = t.duration_ms, "test result");
                }
                // Blocks when the spooler is behind: back-pressure on the run.
                let _ = tx.send(SpoolMsg::Fact(fact, None));
            };
            if let Some(opts) = verify {
                return verify::execute(&cfg, run_id, plan, fd_secrets, &opts, &mut sink, &cancel);
            }
            // A plain run: its last fact is already its final state.
            let req = RunRequest {
                run_id,
                plan,
                fd_secrets,
            };
            engine_glue::run(&cfg, req, &mut sink, &cancel)
                .map(|o| (o.status, o.exit_code, None))
                .map_err(|e| e.to_string())
        })
        .await;
        drop(permit);
        match result {
            Ok(Ok((status, exit_code, verdict_reason))) => {
                tracing::info!(%status, ?exit_code, "run finished");
                if let Some(reason) = verdict_reason {
                    // A verification: the verdict decides the run's final state.
                    let fact =
                        self.with_run(&run_id, |r| FactBody::Run(r.run_fact(status, Some(reason))));
                    if let Some(fact) = fact {
                        self.send_fact(fact).await;
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "run could not start");
                let fact = self.with_run(&run_id, |r| {
                    FactBody::Run(r.run_fact(RunStatus::Error, Some(e.to_string())))
                });
                if let Some(fact) = fact {
                    self.send_fact(fact).await;
                }
            }
            Err(join) => {
                tracing::error!(error = %join, plan = %plan_name, "engine task panicked");
                let fact = self.with_run(&run_id, |r| {
                    FactBody::Run(
                        r.run_fact(RunStatus::Error, Some(format!("engine failed: {join}"))),
                    )
                });
                if let Some(fact) = fact {
                    self.send_fact(fact).await;
                }
            }
        }
        lock(&self.jobs).remove(&run_id);
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.finished_one().await;
    }

    async fn finished_one(&self) {
        self.status_changed().await;
        self.idle.notify_waiters();
    }

    /// Cancels a queued or running run. `Ok(false)` when it had already ended.
    pub async fn cancel_run(&self, run_id: &Ulid, reason: &str) -> BusResult<bool> {
        let queued_fact = {
            let mut jobs = lock(&self.jobs);
            match jobs.get_mut(run_id) {
                Some(job) => {
                    job.cancel.cancel();
                    if job.phase == Phase::Queued {
                        job.phase = Phase::Done;
                        // The slot frees now, not when the waiting task wakes.
                        self.queued.fetch_sub(1, Ordering::SeqCst);
                        self.with_run(run_id, |r| {
                            FactBody::Run(r.run_fact(RunStatus::Cancelled, Some(reason.to_owned())))
                        })
                    } else {
                        None
                    }
                }
                None => {
                    return if lock(&self.runs).contains_key(run_id) {
                        Ok(false)
                    } else {
                        Err(BusError::not_found(&run_id.to_string()))
                    }
                }
            }
        };
        if let Some(fact) = queued_fact {
            self.send_fact(fact).await;
            self.status_changed().await;
            self.idle.notify_waiters();
        }
        Ok(true)
    }

    /// SIGTERM: refuse new runs, cancel the queue (and running runs when so
    /// configured), wait for running runs, flush the spool.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let ids: Vec<(Ulid, Phase)> = lock(&self.jobs)
            .iter()
            .map(|(id, j)| (*id, j.phase))
            .collect();
        for (id, phase) in ids {
            if phase == Phase::Queued || self.settings.on_stop == OnStop::Cancel {
                let _ = self.cancel_run(&id, "liminald stopped").await;
            }
        }
        loop {
            let notified = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 && self.queued.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
        crate::spooler::flush(&self.facts_tx).await;
    }

    /// STATUS= for systemd and the manager's counters.
    pub async fn status_changed(&self) {
        crate::notify::status(&self.status_line());
        if let Some(conn) = self.conn.get() {
            service::emit_manager_counters(
                conn,
                self.active.load(Ordering::Relaxed),
                self.queued.load(Ordering::Relaxed),
            )
            .await;
        }
    }

    /// Drops the oldest finished run records beyond `keep_runs` and returns
    /// their ids (the caller removes their D-Bus objects). Runs that are
    /// queued or running are never evicted. Ids are ULIDs, so map order is
    /// start order to the millisecond (within one, ULIDs sort at random).
    pub fn evict_finished(&self) -> Vec<Ulid> {
        let mut runs = lock(&self.runs);
        let finished: Vec<Ulid> = runs
            .iter()
            .filter(|(_, r)| r.status.is_final())
            .map(|(id, _)| *id)
            .collect();
        let excess = finished.len().saturating_sub(self.settings.keep_runs);
        let evicted: Vec<Ulid> = finished.into_iter().take(excess).collect();
        for id in &evicted {
            runs.remove(id);
        }
        evicted
    }

    /// Folds announced facts into the run records and returns, per run,
    /// which properties moved.
    fn fold(&self, batch: &[Spooled]) -> BTreeMap<Ulid, crate::state::Changed> {
        let mut runs = lock(&self.runs);
        let mut moved: BTreeMap<Ulid, crate::state::Changed> = BTreeMap::new();
        for s in batch {
            let id = s.body.run_id();
            let record = runs.entry(id).or_insert_with(|| match &s.body {
                FactBody::Run(f) => RunRecord::from_run_fact(f),
                _ => RunRecord::new(id, String::new(), String::new(), None),
            });
            let c = record.apply(&s.body);
            let m = moved.entry(id).or_default();
            m.state |= c.state;
            m.progress |= c.progress;
            m.passed |= c.passed;
            m.failed |= c.failed;
            m.input_digest |= c.input_digest;
        }
        moved
    }
}

/// Emits each spooled batch (≤512 facts a signal), then moves run objects.
pub async fn announcer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Announce>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            Announce::Batch(mut batch) => {
                // Coalesce whatever else is already waiting.
                let mut flushes = Vec::new();
                while let Ok(more) = rx.try_recv() {
                    match more {
                        Announce::Batch(b) => batch.extend(b),
                        Announce::Flushed(tx) => flushes.push(tx),
                    }
                }
                if let Some(conn) = shared.conn.get() {
                    service::emit_facts(conn, &batch).await;
                }
                let moved = shared.fold(&batch);
                if let Some(conn) = shared.conn.get() {
                    for (id, changed) in moved {
                        service::emit_run_changes(&shared, conn, &id, changed).await;
                    }
                    service::emit_last_seq(conn, shared.spool.last_seq()).await;
                    for id in shared.evict_finished() {
                        service::unexport_run(conn, &id).await;
                    }
                }
                for tx in flushes {
                    let _ = tx.send(());
                }
            }
            Announce::Flushed(tx) => {
                let _ = tx.send(());
            }
        }
    }
}

/// Start-up recovery: folds the whole spool into run records; runs that were
/// queued or running when the previous process died get an `interrupted`
/// fact (returned, to be spooled once the pipeline runs).
pub fn recover(
    spool: &Spool,
) -> Result<(BTreeMap<Ulid, RunRecord>, Vec<FactBody>), liminal_spool::SpoolError> {
    let mut runs: BTreeMap<Ulid, RunRecord> = BTreeMap::new();
    let mut after = spool.first_seq().saturating_sub(1);
    loop {
        let facts = spool.read_since(after, 10_000)?;
        let Some(last) = facts.last() else { break };
        after = last.0;
        for (seq, kind, json) in &facts {
            match FactBody::from_wire(kind, json) {
                Ok(body) => {
                    let id = body.run_id();
                    let rec = runs.entry(id).or_insert_with(|| match &body {
                        FactBody::Run(f) => RunRecord::from_run_fact(f),
                        _ => RunRecord::new(id, String::new(), String::new(), None),
                    });
                    rec.apply(&body);
                }
                Err(e) => tracing::warn!(seq, error = %e, "unreadable fact in spool"),
            }
        }
    }
    let interrupted = runs
        .values()
        .filter(|r| !r.status.is_final())
        .map(|r| {
            FactBody::Run(r.run_fact(
                RunStatus::Interrupted,
                Some("liminald stopped while the run was going".into()),
            ))
        })
        .collect();
    Ok((runs, interrupted))
}
