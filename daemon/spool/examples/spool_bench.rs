//! Durable appends per second, fsync on, on the disk that holds `--dir`.
//!
//! `cargo run --release -p liminal-spool --example spool_bench -- [--secs N] [--dir DIR] [--recovery-mb MB]`
//!
//! Scenarios (each for N seconds, default 3), ~300-byte signal facts built
//! with liminal-facts:
//! - `naive`: the peer without a spool design: one `write` + `fdatasync`
//!   per fact on a plain file (1 thread, and 8 threads behind a mutex).
//! - `spool 1x1`: one appender, one fact per `append`.
//! - `spool 8x1`: eight appenders, one fact per `append` (group commit),
//!   with one fsync at a time (`max_inflight` 1) and overlapping (4).
//! - `spool 1x64`: one appender, 64 facts per `append` (a batching caller).
//!
//! Prints facts/s, p50/p99 latency of one call, and fsyncs per second; then
//! (`--recovery-mb`, default 100, 0 to skip) the time to reopen a spool of
//! that size and to replay it with `read_since`.

use liminal_facts::{FactBody, SignalFact, SignalKind, Timestamp, Ulid};
use liminal_spool::{Spool, SpoolConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

fn signal(i: u64) -> FactBody {
    FactBody::Signal(SignalFact {
        fact_id: Ulid::new(),
        id: Ulid::new(),
        run_id: Ulid::new(),
        test_result_id: Some(Ulid::new()),
        kind: SignalKind::Log,
        name: "stdout".into(),
        at: Timestamp::now(),
        value: serde_json::json!(format!(
            "worker {i}: connection pool 4/16 busy, waited 12ms"
        )),
        attrs: [("stream".to_string(), serde_json::json!("stdout"))].into(),
    })
}

struct Result {
    name: String,
    facts: u64,
    calls: u64,
    fsyncs: u64,
    elapsed: Duration,
    lat: Vec<Duration>,
}

impl Result {
    fn rate(&self) -> f64 {
        self.facts as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&mut self, p: f64) -> Duration {
        self.lat.sort_unstable();
        let i = ((self.lat.len() as f64 - 1.0) * p).round() as usize;
        self.lat.get(i).copied().unwrap_or_default()
    }
    fn print(&mut self) {
        let (p50, p99) = (self.pct(0.50), self.pct(0.99));
        println!(
            "{:<28} {:>10.0} facts/s  p50 {:>8.3} ms  p99 {:>8.3} ms  {:>7.0} fsync/s  {:>6.1} facts/fsync",
            self.name,
            self.rate(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            self.fsyncs as f64 / self.elapsed.as_secs_f64(),
            self.facts as f64 / self.fsyncs.max(1) as f64,
        );
    }
}

/// Runs `threads` workers for `secs`, each calling `op` in a loop; `op`
/// returns how many facts the call stored.
fn drive(
    name: &str,
    threads: usize,
    secs: Duration,
    op: Arc<dyn Fn(usize, u64) -> u64 + Send + Sync>,
) -> Result {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let op = op.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let mut lat = Vec::new();
                let mut facts = 0;
                let mut n = 0;
                while start.elapsed() < secs {
                    let t0 = Instant::now();
                    facts += op(t, n);
                    lat.push(t0.elapsed());
                    n += 1;
                }
                (facts, lat)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut r = Result {
        name: name.to_string(),
        facts: 0,
        calls: 0,
        fsyncs: 0,
        elapsed: Duration::ZERO,
        lat: Vec::new(),
    };
    for h in handles {
        let (facts, lat) = h.join().expect("worker");
        r.facts += facts;
        r.calls += lat.len() as u64;
        r.lat.extend(lat);
    }
    r.elapsed = start.elapsed();
    r
}

fn naive(dir: &Path, threads: usize, secs: Duration) -> anyhow_free::Res<Result> {
    let path = dir.join(format!("naive-{threads}.log"));
    let file = Arc::new(Mutex::new(std::fs::File::create(&path)?));
    let facts: Arc<Vec<FactBody>> = Arc::new((0..1024).map(signal).collect());
    let op = {
        let file = file.clone();
        Arc::new(move |_t: usize, n: u64| {
            let (kind, json) = facts[(n % 1024) as usize].to_wire();
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(kind.as_bytes()).expect("write");
            f.write_all(json.as_bytes()).expect("write");
            f.write_all(b"\n").expect("write");
            f.sync_data().expect("fdatasync");
            1
        })
    };
    let mut r = drive(
        &format!("naive write+fdatasync {threads}x1"),
        threads,
        secs,
        op,
    );
    r.fsyncs = r.calls;
    std::fs::remove_file(&path)?;
    Ok(r)
}

fn spool(
    dir: &Path,
    threads: usize,
    per_call: usize,
    inflight: usize,
    secs: Duration,
) -> anyhow_free::Res<Result> {
    let sdir = dir.join(format!("spool-{threads}x{per_call}-{inflight}"));
    let mut cfg = SpoolConfig::default();
    cfg.group_commit.max_inflight = inflight;
    let (spool, _) = Spool::open(&sdir, cfg)?;
    let spool = Arc::new(spool);
    let facts: Arc<Vec<FactBody>> = Arc::new((0..1024).map(signal).collect());
    let op = {
        let spool = spool.clone();
        Arc::new(move |_t: usize, n: u64| {
            let i = (n as usize * per_call) % (1024 - per_call);
            let r = spool.append(&facts[i..i + per_call]).expect("append");
            r.len()
        })
    };
    let mut r = drive(
        &format!("spool {threads}x{per_call} inflight={inflight}"),
        threads,
        secs,
        op,
    );
    r.fsyncs = spool.commits();
    drop(spool);
    std::fs::remove_dir_all(&sdir)?;
    Ok(r)
}

/// Fills a spool with `mb` MiB of facts, then times a reopen (recovery scans
/// and checksums everything) and a full replay with `read_since` in pages
/// of 10,000 (what a consumer's catch-up does). Page cache warm.
fn recovery(dir: &Path, mb: u64) -> anyhow_free::Res<()> {
    let sdir = dir.join("recovery");
    let facts: Vec<FactBody> = (0..1024).map(signal).collect();
    let (spool, _) = Spool::open(&sdir, SpoolConfig::default())?;
    let t = Instant::now();
    while spool.disk_usage() < mb * 1024 * 1024 {
        spool.append(&facts)?;
    }
    let fill = t.elapsed();
    let (count, bytes) = (spool.last_seq(), spool.disk_usage());
    drop(spool);
    let t = Instant::now();
    let (spool, report) = Spool::open(&sdir, SpoolConfig::default())?;
    let open = t.elapsed();
    assert_eq!(report.last_seq, count);
    let t = Instant::now();
    let mut after = 0;
    loop {
        let page = spool.read_since(after, 10_000)?;
        let Some(last) = page.last() else { break };
        after = last.0;
    }
    let replay = t.elapsed();
    assert_eq!(after, count);
    let mib = bytes as f64 / (1024.0 * 1024.0);
    println!(
        "recovery: {count} facts, {mib:.0} MiB in {} segments; fill (1024/append) {:.0} facts/s; reopen {:.0} ms ({:.0} MiB/s); replay read_since {:.0} ms ({:.0} facts/s)",
        report.segments,
        count as f64 / fill.as_secs_f64(),
        open.as_secs_f64() * 1e3,
        mib / open.as_secs_f64(),
        replay.as_secs_f64() * 1e3,
        count as f64 / replay.as_secs_f64(),
    );
    drop(spool);
    std::fs::remove_dir_all(&sdir)?;
    Ok(())
}

/// Error plumbing for a binary without anyhow.
mod anyhow_free {
    pub type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}

fn main() -> anyhow_free::Res<()> {
    let mut secs = 3u64;
    let mut recovery_mb = 100u64;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().ok_or("--secs needs a value")?.parse()?,
            "--recovery-mb" => {
                recovery_mb = args.next().ok_or("--recovery-mb needs a value")?.parse()?
            }
            "--dir" => dir = Some(args.next().ok_or("--dir needs a value")?.into()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let base = dir.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let tmp = tempfile::tempdir_in(&base)?;
    let secs = Duration::from_secs(secs);
    let sample = signal(0).to_wire().1.len();
    println!(
        "spool_bench: dir {} , fact wire JSON {sample} bytes, {secs:?} per scenario",
        tmp.path().display()
    );
    let mut results = vec![
        naive(tmp.path(), 1, secs)?,
        naive(tmp.path(), 8, secs)?,
        spool(tmp.path(), 1, 1, 4, secs)?,
        spool(tmp.path(), 8, 1, 1, secs)?,
        spool(tmp.path(), 8, 1, 4, secs)?,
        spool(tmp.path(), 1, 64, 4, secs)?,
    ];
    for r in &mut results {
        r.print();
    }
    let base1 = results[0].rate();
    print!("facts/s ratio vs naive 1x1:");
    for r in &results[1..] {
        print!("  {} {:.2}x;", r.name, r.rate() / base1);
    }
    println!();
    if recovery_mb > 0 {
        recovery(tmp.path(), recovery_mb)?;
    }
    Ok(())
}
