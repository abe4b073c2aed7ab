//! `fact-emitter`: a stand-in for liminald's fact spool, for the extension's
//! ingest tests and benchmark.
//!
//! It owns `org.liminalqa.Liminal1` on the given bus and serves the subset
//! of `org.liminalqa.Liminal1.Manager` the ingest worker uses: properties
//! `SpoolId`, `LastSeq`, `Version`, methods `FactsSince(t, u) -> a(tss)` and
//! `AckFacts(t)`, signal `FactsAppended(a(tss))` (batches of at most 512).
//! Facts are a pure function of (seed, seq), so a restarted emitter with the
//! same seed and `--already N` serves exactly the same spool.
//!
//! Fact mix per run: Run(running), then per test `--signals` log signals and
//! a TestResult, then Run(passed|failed) with a later valid time (a
//! progression). `--malformed-every K` makes every K-th fact undecodable.

use anyhow::Context;
use clap::Parser;
use liminal_facts::{
    FactBody, RunFact, RunStatus, SignalFact, SignalKind, TestResultFact, TestStatus, Timestamp,
    Ulid,
};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zbus::object_server::SignalEmitter;

const PATH: &str = "/org/liminalqa/Liminal1";
const MAX_SIGNAL_BATCH: usize = 512;

#[derive(Parser, Debug, Clone)]
#[command(about = "Serve generated facts like liminald's spool does")]
struct Args {
    /// Bus address (e.g. unix:path=/tmp/bus); default the system bus.
    #[arg(long)]
    bus: Option<String>,
    /// The spool id (a ULID); default derived from the seed.
    #[arg(long)]
    spool_id: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Facts 1..=N already exist (a restarted emitter): serve them, emit after.
    #[arg(long, default_value_t = 0)]
    already: u64,
    /// Total facts in the spool at the end.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Facts per second to announce (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Facts per FactsAppended signal (at most 512).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    #[arg(long, default_value_t = 10)]
    tests_per_run: u64,
    #[arg(long, default_value_t = 8)]
    signals: u64,
    /// Every K-th fact is malformed (0: none).
    #[arg(long, default_value_t = 0)]
    malformed_every: u64,
    /// Facts below this seq are trimmed (FactsSince answers Trimmed).
    #[arg(long, default_value_t = 1)]
    first_available: u64,
    /// Do not announce seqs in this range (inclusive, "A-B"): the consumer sees a gap.
    #[arg(long)]
    skip_announce: Option<String>,
    /// Write "seq emit_unix_us" per announced batch (its last seq) here.
    #[arg(long)]
    emit_log: Option<std::path::PathBuf>,
    /// Wait this long after taking the bus name before emitting.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Exit once AckFacts reached the last seq.
    #[arg(long)]
    exit_when_acked: bool,
}

struct Spool {
    args: Args,
    /// Facts emitted so far (the spool's LastSeq).
    last: AtomicU64,
    acked: AtomicU64,
}

/// A deterministic ULID from (seed, tag, n): ids survive emitter restarts.
fn ulid(seed: u64, tag: u64, n: u64) -> Ulid {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(tag.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add(n);
    // splitmix64, twice, for 128 bits of noise.
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let hi = next();
    let lo = next();
    Ulid::from_parts(
        1_767_225_600_000 + n,
        (u128::from(hi) << 64 | u128::from(lo)) & ((1u128 << 80) - 1),
    )
}

/// 2026-01-01T00:00:00Z plus one millisecond per seq.
fn time_of(seq: u64) -> Timestamp {
    Timestamp::from_unix_micros(1_767_225_600_000_000 + (seq as i64) * 1000)
}

impl Spool {
    fn fact(&self, seq: u64) -> (u64, String, String) {
        let a = &self.args;
        if a.malformed_every > 0 && seq % a.malformed_every == 0 {
            return if seq % 2 == 0 {
                (seq, "signal".into(), format!("{{\"broken\": {seq}"))
            } else {
                (seq, "no_such_kind".into(), "{}".into())
            };
        }
        let per_test = a.signals + 1;
        let group = 2 + a.tests_per_run * per_test;
        let run = (seq - 1) / group;
        let off = (seq - 1) % group;
        let run_id = ulid(a.seed, 1, run);
        let run_start = time_of(run * group + 1);
        let body = if off == 0 || off == group - 1 {
            let done = off == group - 1;
            let failed = done && run % 7 == 3;
            FactBody::Run(RunFact {
                fact_id: ulid(a.seed, 0, seq),
                run_id,
                plan_name: format!("plan-{}", run % 5),
                status: if !done {
                    RunStatus::Running
                } else if failed {
                    RunStatus::Failed
                } else {
                    RunStatus::Passed
                },
                exit_code: done.then_some(if failed { 1 } else { 0 }),
                input_digest: format!("blake3:{:064x}", run % 13),
                image_digest: Some("blake3:00".into()),
                host: "emitter".into(),
                started_at: run_start,
                finished_at: done.then(|| time_of(seq)),
                reason: None,
                valid_at: time_of(seq),
            })
        } else {
            let t = (off - 1) / per_test;
            let k = (off - 1) % per_test;
            let test_id = ulid(a.seed, 2, run * a.tests_per_run + t);
            if k < a.signals {
                FactBody::Signal(SignalFact {
                    fact_id: ulid(a.seed, 0, seq),
                    id: ulid(a.seed, 3, seq),
                    run_id,
                    test_result_id: Some(test_id),
                    kind: SignalKind::Log,
                    name: if k % 4 == 3 {
                        "stderr".into()
                    } else {
                        "stdout".into()
                    },
                    at: time_of(seq),
                    value: serde_json::Value::String(format!(
                        "run {run} test {t} line {k}: some output"
                    )),
                    attrs: [("line".to_string(), serde_json::json!(k))].into(),
                })
            } else {
                let failed = (run + t) % 11 == 5;
                FactBody::TestResult(TestResultFact {
                    fact_id: ulid(a.seed, 0, seq),
                    id: test_id,
                    run_id,
                    test_name: format!("suite::case_{t}"),
                    status: if failed {
                        TestStatus::Failed
                    } else {
                        TestStatus::Passed
                    },
                    started_at: time_of(seq - a.signals),
                    duration_ms: a.signals,
                    message: failed.then(|| "assertion failed".to_string()),
                    valid_at: time_of(seq),
                })
            }
        };
        let (kind, json) = body.to_wire();
        (seq, kind.to_string(), json)
    }
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.liminalqa.Liminal1.Error")]
enum SpoolError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Trimmed(String),
}

struct Manager(Arc<Spool>);

#[zbus::interface(name = "org.liminalqa.Liminal1.Manager")]
impl Manager {
    #[zbus(property)]
    fn spool_id(&self) -> String {
        self.0
            .args
            .spool_id
            .clone()
            .unwrap_or_else(|| ulid(self.0.args.seed, 9, 0).to_string())
    }
    #[zbus(property)]
    fn last_seq(&self) -> u64 {
        self.0.last.load(Ordering::SeqCst)
    }
    #[zbus(property)]
    fn version(&self) -> String {
        "fact-emitter".into()
    }
    #[zbus(property)]
    fn acked(&self) -> u64 {
        self.0.acked.load(Ordering::SeqCst)
    }

    fn facts_since(
        &self,
        after_seq: u64,
        max: u32,
    ) -> Result<Vec<(u64, String, String)>, SpoolError> {
        let first = self.0.args.first_available;
        if after_seq + 1 < first {
            return Err(SpoolError::Trimmed(format!(
                "facts before {first} were trimmed; first available seq is {first}"
            )));
        }
        let last = self.0.last.load(Ordering::SeqCst);
        let end = last.min(after_seq + u64::from(max.min(10_000)));
        Ok((after_seq + 1..=end).map(|s| self.0.fact(s)).collect())
    }

    fn ack_facts(&self, seq: u64) {
        self.0.acked.fetch_max(seq, Ordering::SeqCst);
    }

    #[zbus(signal)]
    async fn facts_appended(
        emitter: &SignalEmitter<'_>,
        facts: Vec<(u64, String, String)>,
    ) -> zbus::Result<()>;
}

fn parse_range(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s.split_once('-').context("--skip-announce wants A-B")?;
    Ok((a.parse()?, b.parse()?))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch >= 1 && args.batch <= MAX_SIGNAL_BATCH,
        "--batch must be 1..=512"
    );
    anyhow::ensure!(
        args.already <= args.count,
        "--already must not exceed --count"
    );
    let skip = args.skip_announce.as_deref().map(parse_range).transpose()?;
    let spool = Arc::new(Spool {
        last: AtomicU64::new(args.already),
        acked: AtomicU64::new(0),
        args: args.clone(),
    });
    let builder = match &args.bus {
        Some(a) => zbus::connection::Builder::address(a.as_str())?,
        None => zbus::connection::Builder::system()?,
    };
    let conn = builder
        .name("org.liminalqa.Liminal1")?
        .serve_at(PATH, Manager(spool.clone()))?
        .build()
        .await
        .context("connecting to the bus")?;
    let iface = conn.object_server().interface::<_, Manager>(PATH).await?;
    let mut log = match &args.emit_log {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    eprintln!(
        "fact-emitter: serving spool {} with facts 1..={}",
        Manager(spool.clone()).spool_id(),
        args.already
    );
    tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
    let start = Instant::now();
    let mut next = args.already + 1;
    while next <= args.count {
        let n = (args.count - next + 1).min(args.batch as u64);
        let facts: Vec<_> = (next..next + n).map(|s| spool.fact(s)).collect();
        let last = next + n - 1;
        // In the spool (and visible to FactsSince) before it is announced.
        spool.last.store(last, Ordering::SeqCst);
        let facts: Vec<_> = facts
            .into_iter()
            .filter(|f| !skip.is_some_and(|(a, b)| f.0 >= a && f.0 <= b))
            .collect();
        if !facts.is_empty() {
            Manager::facts_appended(iface.signal_emitter(), facts).await?;
        }
        if let Some(w) = log.as_mut() {
            let us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros();
            writeln!(w, "{last} {us}")?;
            // Flushed per batch: a test stops the emitter with a signal mid-stream
            // and reads the last line to know how far it got.
            w.flush()?;
        }
        next = last + 1;
        if args.rate > 0 {
            let due = start
                + Duration::from_secs_f64((next - args.already - 1) as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    if let Some(mut w) = log.take() {
        w.flush()?;
    }
    let emitted = start.elapsed();
    eprintln!(
        "fact-emitter: announced {} facts in {:.3}s ({:.0}/s)",
        args.count - args.already,
        emitted.as_secs_f64(),
        (args.count - args.already) as f64 / emitted.as_secs_f64().max(1e-9)
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if args.exit_when_acked && spool.acked.load(Ordering::SeqCst) >= args.count {
                    break;
                }
            }
        }
    }
    eprintln!(
        "fact-emitter: acked up to {}",
        spool.acked.load(Ordering::SeqCst)
    );
    Ok(())
}
