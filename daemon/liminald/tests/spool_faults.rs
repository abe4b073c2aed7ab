//! The spool under pressure, with real sandboxes (busybox rootfs,
//! liminal-sandbox helper), root:
//! - full: a run logs more than the quota holds while no consumer
//!   acknowledges. New runs are refused with `SpoolFull` (admission fails
//!   fast), the running run's facts wait instead of being dropped, and once
//!   the consumer acknowledges, the run finishes, new runs are admitted
//!   again, and every line the run printed is a fact, each exactly once.
//! - failed writes: the spool's filesystem (a small tmpfs) runs out of space
//!   below the quota. The daemon exits with EX_IOERR for systemd to restart
//!   it; after the restart every announced fact is there and the run is
//!   `interrupted`.

mod common;

use common::*;
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use zbus::zvariant::{self, Value};

const LINES: usize = 6000;

type Wire = (u64, String, String);

#[test]
fn full_spool_refuses_new_runs_and_loses_no_fact() {
    if !require_runtime() {
        return;
    }
    let rootfs = busybox_rootfs();
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    // The smallest quota the daemon accepts: 1 MiB. The run below logs about
    // 6000 × 300 bytes of facts, nearly twice that.
    let _d = Daemon::start(
        &bus,
        &state.path().join("s"),
        &["--spool-quota", "1048576"],
        &[],
    );
    let pad = "x".repeat(120);
    let chatty = format!(
        "[run]\nname = \"chatty\"\nimage = \"{}\"\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while [ $i -lt {LINES} ]; do echo line-$i-{pad}; i=$((i+1)); done\"]\ntimeout = \"120s\"\n[results]\nformat = \"exit-code\"\n",
        rootfs.display()
    );
    let small = format!(
        "[run]\nname = \"small\"\nimage = \"{}\"\ncommand = [\"/bin/true\"]\n[results]\nformat = \"exit-code\"\n",
        rootfs.display()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let start = |plan: String| {
            let proxy = proxy.clone();
            async move {
                let opts: HashMap<&str, Value<'_>> = HashMap::new();
                let fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
                // A full spool must answer, not hold the caller.
                tokio::time::timeout(
                    Duration::from_secs(30),
                    proxy.call::<_, _, (String, zvariant::OwnedObjectPath)>(
                        "StartRun",
                        &(plan.as_str(), fds, opts),
                    ),
                )
                .await
                .expect("StartRun got no answer within 30 s")
            }
        };
        let (chatty_id, _) = start(chatty).await.expect("chatty run admitted");

        // Without acknowledgements the spool fills: new runs are refused.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match start(small.clone()).await {
                Err(zbus::Error::MethodError(name, msg, _)) => {
                    assert_eq!(
                        name.as_str(),
                        "org.liminalqa.Liminal1.Error.SpoolFull",
                        "{msg:?}"
                    );
                    break;
                }
                Err(e) => panic!("expected SpoolFull, got {e}"),
                Ok(_) => {
                    assert!(Instant::now() < deadline, "the spool never filled");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // The daemon keeps serving while full.
        let _: Vec<(String, String, String, String, u64)> =
            proxy.call("ListRuns", &()).await.expect("ListRuns");

        // Consume and acknowledge, as the extension's worker does, until the
        // chatty run is final.
        let mut seen: Vec<Wire> = Vec::new();
        let mut after = 0u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let page: Vec<Wire> = proxy
                .call("FactsSince", &(after, 10_000u32))
                .await
                .expect("FactsSince");
            if let Some(last) = page.last() {
                after = last.0;
                let _: () = proxy.call("AckFacts", &(after,)).await.expect("AckFacts");
            }
            let done = page.iter().any(|(_, kind, json)| {
                kind == "run"
                    && json.contains(&chatty_id)
                    && !json.contains("\"queued\"")
                    && !json.contains("\"running\"")
            });
            seen.extend(page);
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "the chatty run never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Nothing lost, nothing twice: every printed line is one log fact.
        let seqs: BTreeSet<u64> = seen.iter().map(|f| f.0).collect();
        assert_eq!(seqs.len(), seen.len(), "a seq was delivered twice");
        let mut lines = BTreeSet::new();
        for (_, kind, json) in &seen {
            if kind != "signal" || !json.contains(&chatty_id) {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            if let Some(text) = v["value"].as_str() {
                if let Some(n) = text.strip_prefix("line-") {
                    let n: usize = n.split('-').next().unwrap().parse().unwrap();
                    assert!(lines.insert(n), "line {n} twice");
                }
            }
        }
        assert_eq!(lines.len(), LINES, "log lines that became facts");
        assert!(
            seen.iter()
                .any(|(_, k, j)| k == "run" && j.contains(&chatty_id) && j.contains("\"passed\"")),
            "the chatty run passed"
        );

        // Acknowledged facts are trimmed: admission works again.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match start(small.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "still refused after ack: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// A tmpfs mounted for the test, unmounted on drop (even on panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn failed_spool_write_exits_for_a_restart_that_recovers() {
    if !require_runtime() {
        return;
    }
    let rootfs = busybox_rootfs();
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let sdir = state.path().join("s");
    // 256 KiB of disk under a 1 MiB quota: the quota never refuses, the
    // filesystem does (ENOSPC), as a disk filled by someone else would.
    let fs = Tmpfs::mount(&sdir.join("spool"), "256k");
    let mut d = Daemon::start(&bus, &sdir, &["--spool-quota", "1048576"], &[]);
    let pad = "y".repeat(120);
    let chatty = format!(
        "[run]\nname = \"filler\"\nimage = \"{}\"\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while [ $i -lt 4000 ]; do echo fill-$i-{pad}; i=$((i+1)); done\"]\ntimeout = \"120s\"\n[results]\nformat = \"exit-code\"\n",
        rootfs.display()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (run_id, announced) = rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let mut sig = proxy.receive_signal("FactsAppended").await.unwrap();
        let opts: HashMap<&str, Value<'_>> = HashMap::new();
        let fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
        let (run_id, _): (String, zvariant::OwnedObjectPath) = proxy
            .call("StartRun", &(chatty.as_str(), fds, opts))
            .await
            .expect("StartRun");
        let mut announced: Vec<Wire> = Vec::new();
        // Until the daemon goes away (the stream ends or goes quiet).
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), sig.next()).await {
            let (facts,): (Vec<Wire>,) = msg.body().deserialize().unwrap();
            announced.extend(facts);
        }
        (run_id, announced)
    });
    let child = d.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "liminald kept running on a failed spool"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(74),
        "exit status (EX_IOERR)\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("fact spool failed"),
        "{}",
        d.log_text()
    );
    assert!(
        !announced.is_empty(),
        "some facts were announced before the disk filled"
    );
    d.child = None;

    // The operator (or systemd, after making room) restarts it.
    fs.resize("16m");
    let _d2 = Daemon::start(&bus, &sdir, &["--spool-quota", "1048576"], &[]);
    rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let mut replay: Vec<Wire> = Vec::new();
        let mut after = 0u64;
        loop {
            let page: Vec<Wire> = proxy
                .call("FactsSince", &(after, 10_000u32))
                .await
                .expect("FactsSince");
            match page.last() {
                Some(last) => after = last.0,
                None => break,
            }
            replay.extend(page);
        }
        for fact in &announced {
            assert!(replay.contains(fact), "announced fact {} lost", fact.0);
        }
        let json: String = proxy
            .call("GetRun", &(run_id.as_str(),))
            .await
            .expect("GetRun");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["status"], "interrupted", "{json}");
    });
}
