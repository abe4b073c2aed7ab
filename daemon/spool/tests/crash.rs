//! A real crash test: a child process (this test binary, re-run with an
//! environment variable) appends from several threads and prints each
//! receipt once `append` returned; the parent `kill -9`s it at random
//! moments, reopens the spool and checks that every fact reported durable
//! is there and intact, and that no torn record remains.

mod common;

use common::{signal, tag_of, Rng};
use liminal_facts::FactBody;
use liminal_spool::{Spool, SpoolConfig};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const CHILD_ENV: &str = "LIMINAL_SPOOL_CRASH_CHILD_DIR";
const WRITERS: usize = 4;

fn config() -> SpoolConfig {
    SpoolConfig {
        // Small segments so kills also land around segment rolls.
        segment_bytes: 16 * 1024,
        quota_bytes: 512 * 1024 * 1024,
        ..SpoolConfig::default()
    }
}

/// The child's body. A no-op in a normal test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (spool, _) = Spool::open(&dir, config()).expect("child opens the spool");
    let spool = Arc::new(spool);
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    // An acker, so kills also hit the atomic ack write and segment trimming.
    {
        let spool = spool.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(3));
            let last = spool.last_seq();
            if last > 200 {
                spool.ack(last - 200).expect("child ack");
            }
        });
    }
    let round: u64 = std::env::var("LIMINAL_SPOOL_CRASH_ROUND")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let workers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let spool = spool.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for n in 0u64.. {
                    let batch: Vec<FactBody> = (0..(n % 4 + 1))
                        .map(|k| signal(&format!("{round}/{w}/{n}/{k}")))
                        .collect();
                    let r = spool.append(&batch).expect("child append");
                    let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                    writeln!(o, "ACK {} {}", r.first_seq, r.last_seq).expect("stdout");
                    o.flush().expect("stdout");
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}

/// Runs one child until it has printed some receipts, kills it with
/// SIGKILL after `delay`, and returns the receipts it printed.
fn run_child_and_kill(dir: &Path, round: u64, delay: Duration) -> Vec<(u64, u64)> {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, dir)
        .env("LIMINAL_SPOOL_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            if parts.next() != Some("ACK") {
                continue;
            }
            let first: u64 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .expect("ACK first");
            let last: u64 = parts.next().and_then(|s| s.parse().ok()).expect("ACK last");
            if acks.is_empty() {
                let _ = tx.send(());
            }
            acks.push((first, last));
        }
        acks
    });
    // Kill only after the child is appending, so every round exercises a
    // crash mid-stream rather than at start-up.
    let started = rx.recv_timeout(Duration::from_secs(20));
    std::thread::sleep(delay);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    assert!(started.is_ok(), "child never appended");
    reader.join().expect("reader thread")
}

#[test]
fn kill_9_never_loses_acknowledged_facts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let mut rng = Rng(0x5eed_0001);
    // Every receipt any child printed: seq -> round.
    let mut durable: BTreeMap<u64, u64> = BTreeMap::new();
    let mut torn_rounds = 0;
    let mut rolled = 0;
    for round in 0..20u64 {
        let delay = Duration::from_millis(rng.below(150));
        let acks = run_child_and_kill(&dir, round, delay);
        assert!(!acks.is_empty());
        for (first, last) in &acks {
            for seq in *first..=*last {
                assert!(
                    durable.insert(seq, round).is_none(),
                    "seq {seq} handed out twice"
                );
            }
        }

        let (spool, report) = Spool::open(&dir, config()).expect("reopen after kill -9");
        if report.torn_tail.is_some() {
            torn_rounds += 1;
        }
        rolled = rolled.max(report.segments);
        let acked = report.acked_seq;
        let max_printed = *durable.keys().next_back().unwrap();
        assert!(
            report.last_seq >= max_printed,
            "round {round}: printed seq {max_printed} but the spool ends at {}",
            report.last_seq
        );
        // Nothing unacknowledged was trimmed.
        assert!(report.first_seq <= acked + 1, "round {round}: {report:?}");
        let facts = spool
            .read_since(report.first_seq - 1, usize::MAX)
            .expect("read all");
        assert_eq!(facts.len() as u64, report.last_seq - report.first_seq + 1);
        let mut by_seq = HashMap::new();
        for (i, (seq, kind, json)) in facts.iter().enumerate() {
            assert_eq!(*seq, report.first_seq + i as u64);
            FactBody::from_wire(kind, json).expect("intact fact");
            by_seq.insert(*seq, tag_of(json));
        }
        // Every printed seq still stored is there, from the round that wrote it.
        for (seq, r) in durable.range(report.first_seq..) {
            let tag = by_seq
                .get(seq)
                .unwrap_or_else(|| panic!("round {round}: durable seq {seq} missing"));
            assert!(
                tag.starts_with(&format!("{r}/")),
                "seq {seq}: {tag} not from round {r}"
            );
        }
        // Per writer, facts are in the order they were appended.
        let mut last_n: HashMap<(String, String), u64> = HashMap::new();
        for seq in report.first_seq..=report.last_seq {
            let tag = &by_seq[&seq];
            let parts: Vec<&str> = tag.split('/').collect();
            let key = (parts[0].to_string(), parts[1].to_string());
            let n: u64 = parts[2].parse().unwrap();
            if let Some(prev) = last_n.insert(key, n) {
                assert!(n >= prev, "seq {seq}: writer went back from {prev} to {n}");
            }
        }
        drop(spool);
        // Recovery left nothing torn behind: a second open finds it clean.
        let (spool, again) = Spool::open(&dir, config()).expect("second reopen");
        assert!(
            again.torn_tail.is_none(),
            "round {round}: torn tail survived recovery"
        );
        assert_eq!(again.last_seq, report.last_seq);
        drop(spool);
    }
    eprintln!(
        "20 kill -9 rounds: {} durable seqs checked, {torn_rounds} rounds with a torn tail, up to {rolled} segments",
        durable.len()
    );
}
