//! liminald on a private dbus-daemon: the D-Bus contract, errors, access
//! control, sd_notify, and the spool across a kill -9. These need no
//! sandbox: runs here fail to start or are refused, which is enough to
//! exercise the bus, auth, notify and spool paths.

mod common;

use common::*;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};
use zbus::zvariant::{self, Value};

const OK_PLAN: &str =
    "[run]\nname = \"smoke\"\nimage = \"/nonexistent-rootfs\"\ncommand = [\"/bin/true\"]\n";

#[test]
fn introspects_and_serves_properties() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(&bus, &state.path().join("s"), &[], &[]);
    let out = busctl(&bus, &["introspect", NAME, PATH]);
    let text = String::from_utf8_lossy(&out.stdout);
    for member in [
        ".StartRun",
        "sa{sh}a{sv}",
        ".FactsSince",
        "a(tss)",
        ".FactsAppended",
        ".SpoolId",
        ".LastSeq",
        ".ListRuns",
        "a(sssst)",
    ] {
        assert!(
            text.contains(member),
            "introspection lacks {member}:\n{text}"
        );
    }
    let out = busctl(&bus, &["get-property", NAME, PATH, IFACE, "SpoolId"]);
    let id = String::from_utf8_lossy(&out.stdout);
    assert!(
        id.starts_with("s \"") && id.trim().len() == 26 + 4,
        "SpoolId {id:?}"
    );
}

#[test]
fn errors_are_typed_and_daemon_keeps_serving() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, &state.path().join("s"), &[], &[]);

    // Malformed plan: InvalidPlan with file:line:col.
    let (ok, _, err) = call(
        &bus,
        "StartRun",
        &[
            "sa{sh}a{sv}",
            "[run]\nname = \n",
            "0",
            "1",
            "plan_path",
            "s",
            "/srv/p/plan.toml",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("/srv/p/plan.toml:2:8:"),
        "InvalidPlan message: {err}"
    );
    let (ok, _, _) = call(&bus, "ListRuns", &[]);
    assert!(ok, "daemon stopped serving after InvalidPlan");

    // Unknown run id: NotFound.
    for m in ["GetRun", "CancelRun"] {
        let (ok, _, err) = call(&bus, m, &["s", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
        assert!(!ok && err.contains("no run with id"), "{m}: {err}");
    }
    let (ok, _, _) = call(&bus, "ListRuns", &[]);
    assert!(ok);

    // The error names on the wire, via a real client.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let e = proxy
            .call::<_, _, String>("GetRun", &("01ARZ3NDEKTSV4RRFFQ69G5FAV",))
            .await
            .unwrap_err();
        assert_error_name(&e, "org.liminalqa.Liminal1.Error.NotFound");
        let opts: HashMap<&str, Value<'_>> = HashMap::new();
        let fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
        let e = proxy
            .call::<_, _, (String, zvariant::OwnedObjectPath)>(
                "StartRun",
                &("[run]\nbogus = 1\n", fds, opts),
            )
            .await
            .unwrap_err();
        assert_error_name(&e, "org.liminalqa.Liminal1.Error.InvalidPlan");
        assert!(e.to_string().contains("<dbus>:"), "{e}");

        // A socket is no secret: SecretRejected.
        let plan = format!("{OK_PLAN}[[secret]]\nname = \"token\"\nfrom = \"fd\"\n");
        let (a, _b) = UnixStream::pair().unwrap();
        let mut fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
        fds.insert("token", zvariant::Fd::from(&a));
        let opts: HashMap<&str, Value<'_>> = HashMap::new();
        let e = proxy
            .call::<_, _, (String, zvariant::OwnedObjectPath)>(
                "StartRun",
                &(plan.as_str(), fds, opts),
            )
            .await
            .unwrap_err();
        assert_error_name(&e, "org.liminalqa.Liminal1.Error.SecretRejected");
        assert!(e.to_string().contains("token"), "names the secret: {e}");

        // Trimmed/InvalidArgs: acking past the end is refused.
        let e = proxy
            .call::<_, _, ()>("AckFacts", &(1_000_000u64,))
            .await
            .unwrap_err();
        assert_error_name(&e, "org.freedesktop.DBus.Error.InvalidArgs");
        // Still serving.
        let _: Vec<(String, String, String, String, u64)> =
            proxy.call("ListRuns", &()).await.unwrap();
    });
    drop(d);
}

fn assert_error_name(e: &zbus::Error, want: &str) {
    match e {
        zbus::Error::MethodError(name, _, _) => assert_eq!(name.as_str(), want, "{e}"),
        other => panic!("expected {want}, got {other}"),
    }
}

#[test]
fn full_queue_answers_queue_full() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(&bus, &state.path().join("s"), &["--queue-depth", "0"], &[]);
    let (ok, _, err) = call(&bus, "StartRun", &["sa{sh}a{sv}", OK_PLAN, "0", "0"]);
    assert!(!ok && err.contains("queue is full"), "{err}");
    let (ok, _, _) = call(&bus, "ListRuns", &[]);
    assert!(ok);
}

/// Creates a group and a member for the test and removes them afterwards.
struct TestUser {
    user: String,
    group: String,
}

impl TestUser {
    fn create() -> TestUser {
        let tag = std::process::id() % 100_000;
        let group = format!("limgrp{tag}");
        let user = format!("limusr{tag}");
        let g = Command::new("groupadd")
            .arg(&group)
            .status()
            .expect("groupadd");
        assert!(g.success(), "groupadd {group}");
        let t = TestUser {
            user: user.clone(),
            group: group.clone(),
        };
        let u = Command::new("useradd")
            .args([
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "-G",
                &group,
                &user,
            ])
            .status()
            .expect("useradd");
        assert!(u.success(), "useradd {user}");
        t
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.user).status();
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

fn busctl_as(user: &str, bus: &Bus, method: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups", "busctl"])
        .arg(format!("--address={}", bus.address))
        .args(["call", NAME, PATH, IFACE, method])
        .output()
        .expect("setpriv");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn access_needs_root_or_group_membership() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: needs root (setpriv, useradd)");
        return;
    }
    let member = TestUser::create();
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(
        &bus,
        &state.path().join("s"),
        &["--access-group", &member.group],
        &[],
    );

    // nobody's primary group is nogroup, not ours.
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "busctl",
        ])
        .arg(format!("--address={}", bus.address))
        .args(["call", NAME, PATH, IFACE, "ListRuns"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Access denied"),
        "nobody got in: {err}"
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "busctl",
        ])
        .arg(format!("--address={}", bus.address))
        .args([
            "call",
            NAME,
            PATH,
            IFACE,
            "StartRun",
            "sa{sh}a{sv}",
            OK_PLAN,
            "0",
            "0",
        ])
        .output()
        .unwrap();
    // busctl turns org.freedesktop.DBus.Error.AccessDenied into EACCES's text.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Access denied"),
        "{err}"
    );
    // A supplementary member of the group is allowed.
    let (ok, out) = busctl_as(&member.user, &bus, "ListRuns");
    assert!(ok, "member refused: {out}");
    // Root is allowed.
    let (ok, _, _) = call(&bus, "ListRuns", &[]);
    assert!(ok);
}

#[test]
fn sd_notify_ready_status_watchdog_stopping() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let sock_path = state.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let log = state.path().join("d.log");
    let mut d = Daemon::spawn(
        &bus,
        &state.path().join("s"),
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &log,
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let n = sock.recv(&mut buf).expect("no notification within 10 s");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        let all = got.join("\n");
        if all.contains("READY=1")
            && all.contains("WATCHDOG=1")
            && all.matches("WATCHDOG=1").count() >= 2
        {
            break;
        }
    }
    let all = got.join("\n");
    assert!(all.contains("READY=1"), "{all}");
    assert!(all.contains("STATUS=0 running, 0 queued"), "{all}");
    assert!(all.matches("WATCHDOG=1").count() >= 2, "{all}");
    // READY only once the name is owned.
    let out = busctl(
        &bus,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            NAME,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b true");
    let st = d.term();
    assert!(st.success(), "exit after SIGTERM: {st:?}\n{}", d.log_text());
    let mut rest = String::new();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
        rest.push('\n');
    }
    assert!(rest.contains("STOPPING=1"), "{rest}");
}

/// Every fact announced in FactsAppended is in FactsSince after a kill -9
/// and restart, byte for byte; the spool id survives.
#[test]
fn announced_facts_survive_kill9() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let sdir = state.path().join("s");
    let mut d = Daemon::start(&bus, &sdir, &[], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (announced, spool_id) = rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let spool_id: String = proxy.get_property("SpoolId").await.unwrap();
        let mut sig = proxy.receive_signal("FactsAppended").await.unwrap();
        for i in 0..20 {
            let plan = OK_PLAN.replace("smoke", &format!("smoke-{i}"));
            let opts: HashMap<&str, Value<'_>> = HashMap::new();
            let fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
            let _: (String, zvariant::OwnedObjectPath) = proxy
                .call("StartRun", &(plan.as_str(), fds, opts))
                .await
                .unwrap();
        }
        // Each run gives a queued fact and a final one.
        let mut announced: Vec<(u64, String, String)> = Vec::new();
        while announced.len() < 40 {
            let msg = tokio::time::timeout(Duration::from_secs(10), sig.next())
                .await
                .expect("FactsAppended")
                .unwrap();
            let (facts,): (Vec<(u64, String, String)>,) = msg.body().deserialize().unwrap();
            assert!(facts.len() <= 512);
            announced.extend(facts);
        }
        (announced, spool_id)
    });
    for w in announced.windows(2) {
        assert!(w[1].0 > w[0].0, "seqs announced in order");
    }
    d.kill9();
    let _d2 = Daemon::start(&bus, &sdir, &[], &[]);
    rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let id2: String = proxy.get_property("SpoolId").await.unwrap();
        assert_eq!(id2, spool_id);
        let replay: Vec<(u64, String, String)> =
            proxy.call("FactsSince", &(0u64, 10_000u32)).await.unwrap();
        for fact in &announced {
            assert!(
                replay.contains(fact),
                "announced fact {} missing after restart",
                fact.0
            );
            liminal_facts::FactBody::from_wire(&fact.1, &fact.2).expect("intact");
        }
        // Paging: after_seq/max.
        let page: Vec<(u64, String, String)> = proxy
            .call("FactsSince", &(announced[4].0, 3u32))
            .await
            .unwrap();
        assert_eq!(page.len(), 3);
        assert_eq!(page[0].0, announced[4].0 + 1);
        // Ack, then facts before it are gone once trimmed or still served.
        let last: u64 = proxy.get_property("LastSeq").await.unwrap();
        assert!(last >= announced.last().unwrap().0);
        let _: () = proxy.call("AckFacts", &(last,)).await.unwrap();
        // Runs are still known after the restart.
        let runs: Vec<(String, String, String, String, u64)> =
            proxy.call("ListRuns", &()).await.unwrap();
        assert_eq!(runs.len(), 20);
    });
}

#[test]
fn finished_runs_beyond_keep_runs_are_evicted_oldest_first() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let sdir = state.path().join("s");
    let mut d = Daemon::start(&bus, &sdir, &["--keep-runs", "5"], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ids = rt.block_on(async {
        let conn = client(&bus).await;
        let proxy = zbus::Proxy::new(&conn, NAME, PATH, IFACE).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..12 {
            // The image does not exist: each run fails at once (final).
            let plan = OK_PLAN.replace("smoke", &format!("evict-{i}"));
            let opts: HashMap<&str, Value<'_>> = HashMap::new();
            let fds: HashMap<&str, zvariant::Fd<'_>> = HashMap::new();
            let (id, _): (String, zvariant::OwnedObjectPath) = proxy
                .call("StartRun", &(plan.as_str(), fds, opts))
                .await
                .unwrap();
            ids.push(id);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let runs: Vec<(String, String, String, String, u64)> =
                proxy.call("ListRuns", &()).await.unwrap();
            let active: u32 = proxy.get_property("ActiveRuns").await.unwrap();
            let queued: u32 = proxy.get_property("QueuedRuns").await.unwrap();
            if runs.len() == 5 && active == 0 && queued == 0 {
                let mut listed: Vec<String> = runs.into_iter().map(|r| r.0).collect();
                listed.sort();
                // As sets: ULIDs made within one millisecond do not sort in
                // the order they were made.
                let mut newest = ids[7..].to_vec();
                newest.sort();
                assert_eq!(listed, newest, "the newest five are kept");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ListRuns never shrank to 5: {runs:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ids
    });
    // An evicted run: NotFound pointing at the database, and no object.
    let (ok, _, err) = call(&bus, "GetRun", &["s", &ids[0]]);
    assert!(!ok && err.contains("liminal.runs"), "{err}");
    let out = busctl(&bus, &["tree", NAME]);
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        !tree.contains(&ids[0]),
        "evicted run still exported:\n{tree}"
    );
    assert!(tree.contains(&ids[11]), "kept run not exported:\n{tree}");
    // After a restart the records recovered from the spool obey the bound too.
    d.term();
    let _d2 = Daemon::start(&bus, &sdir, &["--keep-runs", "3"], &[]);
    let (ok, out, err) = call(&bus, "ListRuns", &[]);
    assert!(ok, "{err}");
    assert!(out.starts_with("a(sssst) 3 "), "{out}");
}
