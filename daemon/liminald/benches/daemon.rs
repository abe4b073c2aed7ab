//! liminald benchmark: `cargo bench -p liminald --bench daemon`
//! (build the helper first: `cargo build --release -p liminal-sandbox`).
//!
//! Measures, on a private dbus-daemon:
//! 1. idle RSS after start;
//! 2. N queued trivial runs (/bin/true in the busybox rootfs): runs per
//!    second from the first StartRun to the last final Run fact seen in
//!    FactsAppended, and the daemon's peak RSS (VmHWM);
//! 3. FactsAppended throughput: one run printing LINES lines (each a log
//!    signal fact), facts per second as a subscriber sees them.
//!
//! Env: BENCH_RUNS (200), BENCH_LINES (100000), BENCH_CONCURRENCY (2).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use zbus::zvariant::{self, Value};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vm(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn start(proxy: &zbus::Proxy<'_>, plan: &str, path: &str) -> String {
    let mut opts: HashMap<&str, Value<'_>> = HashMap::new();
    opts.insert("plan_path", Value::from(path));
    let fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
    let (id, _): (String, zvariant::OwnedObjectPath) = proxy
        .call("StartRun", &(plan, fds, opts))
        .await
        .expect("StartRun");
    id
}

fn main() {
    let runs = env_num("BENCH_RUNS", 200);
    let lines = env_num("BENCH_LINES", 100_000);
    let conc = env_num("BENCH_CONCURRENCY", 2).to_string();
    let rootfs = busybox_rootfs();
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &bus,
        &state.path().join("s"),
        &[
            "--max-concurrent",
            &conc,
            "--queue-depth",
            &(runs + 16).to_string(),
        ],
        &[("LIMINAL_LOG", "warn")],
    );
    let pid = d.child.as_ref().unwrap().id();
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "idle RSS: {} kB (VmRSS), helper {}",
        vm(pid, "VmRSS:"),
        sandbox_helper().display()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        // Drain signals on their own task: an unread zbus stream fills up
        // and then blocks the connection, method replies included.
        let mut stream = proxy.receive_signal("FactsAppended").await.unwrap();
        let (sig_tx, mut sig) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                if sig_tx.send(msg).is_err() {
                    break;
                }
            }
        });

        // 2. queued trivial runs
        let plan_text = format!(
            "[run]\nname = \"true\"\nimage = \"{}\"\ncommand = [\"/bin/true\"]\n[results]\nformat = \"exit-code\"\n",
            rootfs.display()
        );
        let t0 = Instant::now();
        let mut pending: HashSet<String> = HashSet::new();
        for _ in 0..runs {
            pending.insert(start(&proxy, &plan_text, "/bench/true.toml").await);
        }
        let queued_in = t0.elapsed();
        let mut statuses: HashMap<String, usize> = HashMap::new();
        let mut facts = 0usize;
        while !pending.is_empty() {
            let msg = tokio::time::timeout(Duration::from_secs(120), sig.recv())
                .await
                .expect("runs stalled")
                .expect("signal stream ended");
            let (batch,): (Vec<(u64, String, String)>,) = msg.body().deserialize().unwrap();
            facts += batch.len();
            for (_, kind, json) in batch {
                if kind != "run" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                let status = v["status"].as_str().unwrap_or("").to_owned();
                if !matches!(status.as_str(), "queued" | "running")
                    && pending.remove(v["run_id"].as_str().unwrap_or(""))
                {
                    *statuses.entry(status).or_default() += 1;
                }
            }
        }
        let el = t0.elapsed();
        println!(
            "{runs} runs (/bin/true, concurrency {conc}): StartRun x{runs} in {:.3} s; all final in {:.3} s = {:.1} runs/s; {facts} facts; statuses {statuses:?}",
            queued_in.as_secs_f64(),
            el.as_secs_f64(),
            runs as f64 / el.as_secs_f64()
        );
        println!("peak RSS after runs: {} kB (VmHWM)", vm(pid, "VmHWM:"));

        // 3. FactsAppended throughput
        let plan_text = format!(
            "[run]\nname = \"chatty\"\nimage = \"{}\"\ncommand = [\"/bin/sh\", \"-c\", \"seq {lines}\"]\ntimeout = \"5m\"\n[results]\nformat = \"exit-code\"\n",
            rootfs.display()
        );
        let t0 = Instant::now();
        let id = start(&proxy, &plan_text, "/bench/chatty.toml").await;
        let mut n = 0usize;
        let mut signals = 0usize;
        let mut first: Option<Instant> = None;
        'outer: loop {
            let msg = tokio::time::timeout(Duration::from_secs(120), sig.recv())
                .await
                .expect("facts stalled")
                .expect("signal stream ended");
            let (batch,): (Vec<(u64, String, String)>,) = msg.body().deserialize().unwrap();
            signals += 1;
            first.get_or_insert_with(Instant::now);
            for (_, kind, json) in &batch {
                n += 1;
                if kind == "run" && json.contains(&id) && !json.contains("\"queued\"") && !json.contains("\"running\"") {
                    break 'outer;
                }
            }
        }
        let el = first.map(|f| f.elapsed()).unwrap_or_default();
        println!(
            "FactsAppended: {n} facts in {signals} signals over {:.3} s = {:.0} facts/s ({:.0} signals/s); run wall {:.3} s",
            el.as_secs_f64(),
            n as f64 / el.as_secs_f64().max(1e-9),
            signals as f64 / el.as_secs_f64().max(1e-9),
            t0.elapsed().as_secs_f64()
        );
        println!("peak RSS overall: {} kB (VmHWM)", vm(pid, "VmHWM:"));
    });
    drop(d);
}
