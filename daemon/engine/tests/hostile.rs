//! Hostile payloads against the real sandbox: real containers (as root) in the
//! busybox rootfs from `oci/images/busybox.sh`.
//!
//! The helper binary: `$LIMINAL_SANDBOX_HELPER` if set; else
//! `liminal-sandbox` next to this test's target folder (`target/<profile>/`);
//! else the test builds it once with `cargo build -p liminal-sandbox` (same
//! target dir). The rootfs: `$LIMINAL_TEST_ROOTFS` if set, else built once by
//! `oci/images/busybox.sh` into `$LIMINAL_CACHE_DIR` (default
//! `~/.cache/liminal`). Not root: every test says so and passes vacuously.
//!
//! Tests run one at a time (a global lock): several of them look for
//! leftover processes and cgroups, and the machine has two cores.
//!
//! Run: `cargo test -p liminal-engine --test hostile`.
//!
//! `LIMINAL_HOSTILE_WARM=1` runs every case in a warm sandbox: before each
//! plan, the same sandbox configuration runs `/bin/true` once (no secrets,
//! no report), so the fork server makes a warm slot for it, and the case's
//! own run must then report `warm_sandbox` (see the helper's `warm`
//! module). `scripts/test` runs the suite both ways.

use liminal_engine::runner::{self, CancelHandle, EngineConfig, RunOutcome, RunRequest};
use liminal_facts::{FactBody, RunStatus, SignalKind, TestStatus};
use liminal_plan::Plan;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `LIMINAL_HOSTILE_WARM=1`: every case runs in a warm sandbox.
fn warm_mode() -> bool {
    std::env::var_os("LIMINAL_HOSTILE_WARM").is_some_and(|v| v == "1")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn helper() -> PathBuf {
    static HELPER: OnceLock<PathBuf> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("LIMINAL_SANDBOX_HELPER") {
                return PathBuf::from(p);
            }
            // target/<profile>/deps/hostile-<hash> -> target/<profile>/liminal-sandbox
            let exe = std::env::current_exe().expect("test executable path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target layout");
            let candidate = profile_dir.join("liminal-sandbox");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "-p", "liminal-sandbox", "--bin", "liminal-sandbox"])
                .current_dir(repo_root());
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            if let Some(target) = profile_dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            // Always (re)build: cheap when fresh, and a stale helper would
            // test old code.
            let st = cmd.status().expect("running cargo build for the helper");
            assert!(st.success(), "building liminal-sandbox failed");
            assert!(
                candidate.exists(),
                "{} missing after build",
                candidate.display()
            );
            candidate
        })
        .clone()
}

fn rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("LIMINAL_TEST_ROOTFS") {
                return PathBuf::from(p);
            }
            let out = std::process::Command::new("bash")
                .arg(repo_root().join("oci/images/busybox.sh"))
                .output()
                .expect("running oci/images/busybox.sh");
            assert!(
                out.status.success(),
                "busybox.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// One plan in a temp dir; its state dir is checked for leftovers on drop.
struct Case {
    dir: tempfile::TempDir,
    _guard: MutexGuard<'static, ()>,
}

struct Ran {
    outcome: RunOutcome,
    facts: Vec<FactBody>,
}

impl Ran {
    fn lines(&self, stream: &str) -> Vec<String> {
        self.facts
            .iter()
            .filter_map(|f| match f {
                FactBody::Signal(s) if s.kind == SignalKind::Log && s.name == stream => {
                    s.value.as_str().map(str::to_owned)
                }
                _ => None,
            })
            .collect()
    }
    fn stdout(&self) -> String {
        self.lines("stdout").join("\n")
    }
    fn assert_status(&self, want: RunStatus) {
        assert_eq!(
            self.outcome.status,
            want,
            "reason {:?}\nstdout:\n{}\nstderr:\n{}",
            self.outcome.reason,
            self.stdout(),
            self.lines("stderr").join("\n")
        );
    }
}

impl Case {
    fn new() -> Option<Case> {
        if !is_root() {
            eprintln!("skipped: the sandbox tests need root");
            return None;
        }
        static LOG: std::sync::Once = std::sync::Once::new();
        LOG.call_once(|| {
            // LIMINAL_TEST_LOG=liminal_engine=debug: the engine's (and the
            // helpers' relayed) diagnostics on stderr.
            if let Ok(filter) = std::env::var("LIMINAL_TEST_LOG") {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                    .with_writer(std::io::stderr)
                    .try_init();
            }
        });
        let guard = serial();
        let dir = tempfile::Builder::new()
            .prefix("liminal-hostile")
            .tempdir()
            .expect("tempdir");
        // The sandbox's mapped ids must traverse the state dir inside it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Some(Case { dir, _guard: guard })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self) -> EngineConfig {
        EngineConfig {
            state_dir: self.path().join("state"),
            cache_dir: self.path().join("cache"),
            helper: helper(),
            host: "test-host".into(),
            cgroup_parent: String::new(),
            credentials_dir: None,
        }
    }

    /// `body` is the plan after the [run] header's name/image lines.
    fn plan(&self, body: &str) -> Plan {
        let text = format!(
            "[run]\nname = \"hostile\"\nimage = \"{}\"\n{body}",
            rootfs().display()
        );
        let p = self.path().join("plan.toml");
        std::fs::write(&p, text).expect("writing plan");
        Plan::load(&p).unwrap_or_else(|e| panic!("plan: {e}"))
    }

    fn run_plan(
        &self,
        plan: Plan,
        fd_secrets: BTreeMap<String, std::os::fd::OwnedFd>,
        cancel: &CancelHandle,
    ) -> Ran {
        let cfg = self.config();
        let warm =
            warm_mode() && std::env::var_os("LIMINAL_SANDBOX_PREFORK").is_none_or(|v| v != "0");
        if warm {
            let mut prelude = plan.clone();
            prelude.command = vec!["/bin/true".into()];
            prelude.secrets.clear();
            prelude.results = liminal_plan::Results {
                format: liminal_plan::ResultsFormat::ExitCode,
                path: None,
            };
            prelude.artifacts.clear();
            let out = runner::run(
                &cfg,
                RunRequest {
                    run_id: liminal_facts::new_id(),
                    plan: prelude,
                    fd_secrets: BTreeMap::new(),
                },
                &mut |_| {},
                &CancelHandle::new(),
            )
            .unwrap_or_else(|e| panic!("prelude run could not start: {e}"));
            assert_eq!(out.status, RunStatus::Passed, "prelude: {:?}", out.reason);
        }
        let mut facts = Vec::new();
        let outcome = runner::run(
            &cfg,
            RunRequest {
                run_id: liminal_facts::new_id(),
                plan,
                fd_secrets,
            },
            &mut |f| facts.push(f),
            cancel,
        )
        .unwrap_or_else(|e| panic!("run could not start: {e}"));
        // A helper killed mid-run (a case below) leaves no report to say so.
        let reported = !outcome
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("helper died"));
        if warm && reported {
            assert!(outcome.warm_sandbox, "the run did not get the warm sandbox");
        }
        self.assert_clean(&outcome);
        check_fact_order(&facts);
        Ran { outcome, facts }
    }

    fn run(&self, body: &str) -> Ran {
        let plan = self.plan(body);
        self.run_plan(plan, BTreeMap::new(), &CancelHandle::new())
    }

    /// No run folder, container state, cgroup or mount left behind; and
    /// nothing of a warm slot (the one that ran, or the next one, being
    /// made or waiting) on the disk: its bundle and state live in a tmpfs
    /// of its own mount namespace.
    fn assert_clean(&self, outcome: &RunOutcome) {
        let state = self.path().join("state");
        for sub in ["runs", "containers", "warm"] {
            let left: Vec<_> = std::fs::read_dir(state.join(sub))
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left in {sub}: {left:?}");
        }
        let id = runner::container_id(outcome.run_id);
        let cgroups = find_cgroups(&id);
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        assert!(
            !mounts.contains(&*self.path().to_string_lossy()),
            "mounts left under {}",
            self.path().display()
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        // Even when an assertion failed: remove whatever a run left.
        let _ = runner::cleanup_orphans(&self.config());
    }
}

fn find_cgroups(name: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 8 {
            return;
        }
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    if e.file_name().to_string_lossy().contains(name) {
                        out.push(e.path());
                    }
                    walk(&e.path(), name, depth + 1, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 0, &mut out);
    out
}

/// Run(running) first, Run(final) last, test results and artifacts after
/// every signal.
fn check_fact_order(facts: &[FactBody]) {
    assert!(matches!(facts.first(), Some(FactBody::Run(r)) if r.status == RunStatus::Running));
    assert!(matches!(facts.last(), Some(FactBody::Run(r)) if r.status.is_final()));
    let last_signal = facts.iter().rposition(|f| matches!(f, FactBody::Signal(_)));
    let first_after = facts
        .iter()
        .position(|f| matches!(f, FactBody::TestResult(_) | FactBody::Artifact(_)));
    if let (Some(s), Some(a)) = (last_signal, first_after) {
        assert!(s < a, "a signal came after test results/artifacts");
    }
}

fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(marker) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------

/// `cleanup_orphans` ends the warm slots made for its state dir: a slot
/// still making its container there would go on writing into the folders the
/// caller removes next, and so make them again (what left empty
/// `liminal-hostile*/state/warm` folders in /tmp after this suite).
#[test]
fn cleanup_orphans_ends_the_state_dirs_warm_slots() {
    if std::env::var_os("LIMINAL_SANDBOX_PREFORK").is_some_and(|v| v == "0")
        || std::env::var_os("LIMINAL_SANDBOX_WARM").is_some_and(|v| v == "0")
    {
        return;
    }
    let Some(c) = Case::new() else { return };
    let state = c.path().join("state");
    let slots = state.join("warm");
    c.run(r#"command = ["/bin/true"]"#)
        .assert_status(RunStatus::Passed);
    // The run was handed over, so the server makes a slot for the next one;
    // a slot's tmpfs is mounted on the slots' folder in its own namespace.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let slot_pids = loop {
        let pids = processes_with_mount_at(&slots);
        if !pids.is_empty() {
            break pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warm slot was made for the next run"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let cleaned = runner::cleanup_orphans(&c.config()).expect("cleanup_orphans");
    assert!(cleaned.errors.is_empty(), "{:?}", cleaned.errors);
    // Idle slots are gone when it returns; the slot that ran the job may
    // still be exiting after its report (it makes nothing any more).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let alive = loop {
        let alive: Vec<i32> = slot_pids
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if alive.is_empty() || std::time::Instant::now() > deadline {
            break alive;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(
        alive.is_empty(),
        "warm slots of this state dir outlived cleanup_orphans: {alive:?}"
    );
    std::fs::remove_dir_all(&state).expect("removing the state dir");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!state.exists(), "something made {} again", state.display());
}

/// Processes with something mounted on `dir` in their mount namespace.
fn processes_with_mount_at(dir: &Path) -> Vec<i32> {
    let want = dir.to_string_lossy();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let info = std::fs::read_to_string(e.path().join("mountinfo")).unwrap_or_default();
        if info.lines().any(|l| l.split(' ').nth(4) == Some(&*want)) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn echo_runs_with_fixed_identity_and_clean_env() {
    let Some(c) = Case::new() else { return };
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "echo hello; hostname; cat /proc/sys/kernel/domainname; id -u; id -g; umask; pwd; env | sort; cut -d. -f1 /proc/uptime; nproc; echo err >&2"]
[env]
FOO = "bar"
[resources]
cpus = 1
"#,
    );
    r.assert_status(RunStatus::Passed);
    let out = r.lines("stdout");
    assert_eq!(out[0], "hello");
    assert_eq!(out[1], "liminal");
    assert_eq!(out[2], "liminal.invalid");
    assert_eq!(&out[3..5], ["0", "0"]);
    assert_eq!(out[5], "0022");
    assert_eq!(out[6], "/workspace");
    let env: Vec<&String> = out.iter().filter(|l| l.contains('=')).collect();
    for want in [
        "FOO=bar",
        "TZ=UTC",
        "LC_ALL=C.UTF-8",
        "SOURCE_DATE_EPOCH=0",
        "HOME=/tmp",
        "LIMINAL_SIGNALS_FD=3",
    ] {
        assert!(
            env.iter().any(|l| *l == want),
            "{want} missing from {env:?}"
        );
    }
    for banned in ["LISTEN_", "CARGO", "RUST_", "USER=root\nX"] {
        assert!(
            !env.iter().any(|l| l.starts_with(banned)),
            "{banned} leaked: {env:?}"
        );
    }
    let n = env.len();
    let uptime: u64 = out[7 + n].parse().expect("uptime seconds");
    assert!(
        uptime < 5,
        "uptime {uptime}s: the time namespace should start near zero"
    );
    assert_eq!(out[8 + n], "1", "nproc follows cpus = 1");
    assert_eq!(r.lines("stderr"), ["err"]);
    assert!(r.outcome.input_digest.starts_with("blake3:"));
}

#[test]
fn network_is_unreachable() {
    let Some(c) = Case::new() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    for mode in ["none", "loopback"] {
        let r = c.run(&format!(
            r#"command = ["/bin/sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/operstate; echo x | nc -w 2 127.0.0.1 {port} && echo CONNECTED || echo REFUSED; wget -T 2 -q -O- http://10.0.0.1/ && echo CONNECTED || echo NOROUTE"]
[network]
mode = "{mode}"
"#
        ));
        r.assert_status(RunStatus::Passed);
        let out = r.lines("stdout");
        assert_eq!(out[0], "lo", "only loopback exists ({mode})");
        let want_state = if mode == "none" { "down" } else { "unknown" };
        assert_eq!(out[1], want_state, "lo state in mode {mode}");
        assert_eq!(out[2], "REFUSED");
        assert_eq!(out[3], "NOROUTE");
        assert!(
            listener.accept().is_err(),
            "the host listener got a connection ({mode})"
        );
    }
}

#[test]
fn loopback_mode_has_working_private_loopback() {
    let Some(c) = Case::new() else { return };
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "nc -l -p 5555 > /tmp/got & sleep 0.3; echo ping | nc -w 1 127.0.0.1 5555; sleep 0.3; cat /tmp/got"]
[network]
mode = "loopback"
"#,
    );
    r.assert_status(RunStatus::Passed);
    assert!(
        r.lines("stdout").contains(&"ping".to_owned()),
        "{}",
        r.stdout()
    );
}

#[test]
fn writes_outside_workdir_and_tmp_fail() {
    let Some(c) = Case::new() else { return };
    let input = c.path().join("input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("data"), "input").unwrap();
    let script = "for p in /x /etc/x /root/x /bin/x /src/x /dev/shm/x /proc/x /sys/x; do \
                  if touch $p 2>/dev/null; then echo WROTE $p; else echo DENIED $p; fi; done; \
                  echo data > /src/data 2>/dev/null && echo WROTE /src/data || echo DENIED /src/data; \
                  touch /workspace/ok && echo WROTE /workspace; touch /tmp/ok && echo WROTE /tmp; \
                  echo to-dev-null > /dev/null && echo WROTE /dev/null; echo x > /dev/stderr";
    let r = c.run(&format!(
        r#"command = ["/bin/sh", "-c", "{script}"]
[[mount]]
source = "input"
target = "/src"
"#
    ));
    r.assert_status(RunStatus::Passed);
    let out = r.lines("stdout");
    for p in [
        "/x",
        "/etc/x",
        "/root/x",
        "/bin/x",
        "/src/x",
        "/dev/shm/x",
        "/proc/x",
        "/sys/x",
        "/src/data",
    ] {
        assert!(out.contains(&format!("DENIED {p}")), "{p}: {out:?}");
    }
    for p in ["/workspace", "/tmp", "/dev/null"] {
        assert!(out.contains(&format!("WROTE {p}")), "{p}: {out:?}");
    }
    assert_eq!(
        std::fs::read_to_string(input.join("data")).unwrap(),
        "input"
    );
}

#[test]
fn host_paths_outside_image_and_mounts_are_invisible() {
    let Some(c) = Case::new() else { return };
    let secret_place = c.path().join("host-only");
    std::fs::write(&secret_place, "host").unwrap();
    let r = c.run(&format!(
        r#"command = ["/bin/sh", "-c", "ls {p} 2>&1; ls /work /home /usr/lib 2>&1; ls /; grep -c . /proc/mounts"]
"#,
        p = secret_place.display()
    ));
    r.assert_status(RunStatus::Passed);
    let out = r.stdout();
    assert!(out.contains("No such file"), "{out}");
    assert!(!out.contains("CONTRACTS"), "{out}");
    assert!(!r.lines("stdout").iter().any(|l| l == "host"));
}

#[test]
fn mount_unshare_and_privilege_raising_fail() {
    let Some(c) = Case::new() else { return };
    let script = "mkdir -p /tmp/m; \
        mount -t tmpfs none /tmp/m 2>/dev/null && echo MOUNTED || echo NOMOUNT; \
        unshare -U -r true 2>/dev/null && echo UNSHARED || echo NOUNSHARE; \
        unshare -n true 2>/dev/null && echo UNSHARED || echo NOUNSHARE; \
        nsenter -t 1 -n true 2>/dev/null && echo SETNS || echo NOSETNS; \
        hostname evil 2>/dev/null && echo RENAMED || echo NORENAME; \
        chroot / true 2>/dev/null && echo CHROOTED || echo NOCHROOT; \
        mknod /tmp/null c 1 3 2>/dev/null && echo MKNOD || echo NOMKNOD; \
        grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd|Seccomp):' /proc/self/status";
    let r = c.run(&format!("command = [\"/bin/sh\", \"-c\", \"{script}\"]\n"));
    r.assert_status(RunStatus::Passed);
    let out = r.stdout();
    for want in [
        "NOMOUNT",
        "NOUNSHARE",
        "NOSETNS",
        "NORENAME",
        "NOCHROOT",
        "NOMKNOD",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    for bad in [
        "MOUNTED", "UNSHARED", "SETNS", "RENAMED", "CHROOTED", "MKNOD",
    ] {
        assert!(!r.lines("stdout").iter().any(|l| l == bad), "{bad}:\n{out}");
    }
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
}

#[test]
fn only_standard_and_declared_fds_are_open() {
    let Some(c) = Case::new() else { return };
    let secret = c.path().join("token");
    std::fs::write(&secret, "tok").unwrap();
    let r = c.run(
        // exec: ls lists its own table, which is exactly what sh inherited
        // (a shell listing itself shows its own redirection fds).
        r#"command = ["/bin/sh", "-c", "echo $LIMINAL_SECRET_TOKEN_FD; exec ls -l /proc/self/fd"]
[[secret]]
name = "token"
from = "file:token"
"#,
    );
    r.assert_status(RunStatus::Passed);
    let out = r.lines("stdout");
    assert_eq!(out[0], "4");
    let mut fds: Vec<u32> = out[1..]
        .iter()
        .filter_map(|l| {
            let (left, target) = l.split_once(" -> ")?;
            // ls's own handle on the folder it lists.
            if target.starts_with("/proc/") && target.ends_with("/fd") {
                return None;
            }
            left.split_whitespace().last()?.parse().ok()
        })
        .collect();
    fds.sort_unstable();
    assert_eq!(
        fds,
        [0, 1, 2, 3, 4],
        "open descriptors:\n{}",
        out.join("\n")
    );
}

#[test]
fn fork_bomb_is_stopped_by_pids_limit() {
    let Some(c) = Case::new() else { return };
    let started = Instant::now();
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "b() { b | b & }; b; sleep 3; echo survived"]
timeout = "6s"
[resources]
pids = 64
"#,
    );
    assert!(
        matches!(
            r.outcome.status,
            RunStatus::Passed | RunStatus::Failed | RunStatus::Timeout
        ),
        "{:?}",
        r.outcome
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The host is fine: it can still start processes.
    let st = std::process::Command::new("true")
        .status()
        .expect("host can fork");
    assert!(st.success());
}

#[test]
fn memory_hog_is_oom_killed_and_reported() {
    let Some(c) = Case::new() else { return };
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "a=xxxxxxxxxxxxxxxx; while true; do a=$a$a; done"]
timeout = "60s"
[resources]
memory = "32M"
"#,
    );
    r.assert_status(RunStatus::Error);
    assert_eq!(
        r.outcome.reason.as_deref(),
        Some("out of memory (OOM kill)")
    );
}

#[test]
fn timeout_kills_the_whole_tree() {
    let Some(c) = Case::new() else { return };
    let marker = format!("{}", 1_000_000 + std::process::id());
    let started = Instant::now();
    let r = c.run(&format!(
        r#"command = ["/bin/sh", "-c", "trap '' TERM; for i in 1 2 3 4; do (sleep {marker}; sleep {marker}) & done; sleep {marker}"]
timeout = "1s"
"#
    ));
    r.assert_status(RunStatus::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        processes_with(&format!("sleep {marker}")).is_empty(),
        "sleepers survived"
    );
}

#[test]
fn cancel_stops_the_run() {
    let Some(c) = Case::new() else { return };
    let plan = c.plan("command = [\"/bin/sh\", \"-c\", \"echo started; sleep 1000\"]\n");
    let cancel = CancelHandle::new();
    let h = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        h.cancel();
    });
    let started = Instant::now();
    let r = c.run_plan(plan, BTreeMap::new(), &cancel);
    t.join().unwrap();
    r.assert_status(RunStatus::Cancelled);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel took {:?}: {:?}",
        started.elapsed(),
        r.outcome.reason
    );
}

#[test]
fn secret_never_leaks() {
    let Some(c) = Case::new() else { return };
    const SECRET: &str = "s3cr3t-Zq8wX";
    std::fs::write(c.path().join("token"), SECRET).unwrap();
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "v=$(cat <&$LIMINAL_SECRET_TOKEN_FD); echo token=$v; echo $v >&2; grep -c \"$v\" /proc/self/environ; grep -c \"$v\" /proc/1/cmdline; echo x >&$LIMINAL_SECRET_TOKEN_FD 2>/dev/null && echo WRITABLE || echo READONLY; printf '{\"kind\":\"event\",\"name\":\"leak\",\"value\":\"%s\"}\n' $v >&$LIMINAL_SIGNALS_FD"]
[[secret]]
name = "token"
from = "file:token"
"#,
    );
    r.assert_status(RunStatus::Passed);
    let out = r.lines("stdout");
    assert_eq!(out[0], "token=***");
    assert_eq!(out[1], "0", "secret in environ");
    assert_eq!(out[2], "0", "secret in argv");
    assert_eq!(out[3], "READONLY");
    assert_eq!(r.lines("stderr"), ["***"]);
    let all =
        serde_json::to_string(&r.facts.iter().map(|f| f.to_wire().1).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains(SECRET), "secret in facts");
    assert!(r
        .facts
        .iter()
        .any(|f| matches!(f, FactBody::Signal(s) if s.name == "leak" && s.value == "***")));
}

#[test]
fn signals_fd_lines_become_signals_and_malformed_ones_logs() {
    let Some(c) = Case::new() else { return };
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "echo '{\"kind\":\"metric\",\"name\":\"rss\",\"value\":42,\"attrs\":{\"unit\":\"MB\"}}' >&$LIMINAL_SIGNALS_FD; echo 'not json' >&$LIMINAL_SIGNALS_FD"]
"#,
    );
    r.assert_status(RunStatus::Passed);
    assert!(r.facts.iter().any(|f| matches!(f, FactBody::Signal(s) if s.kind == SignalKind::Metric && s.name == "rss" && s.value == 42)));
    assert!(r.facts.iter().any(
        |f| matches!(f, FactBody::Signal(s) if s.kind == SignalKind::Log && s.value == "not json")
    ));
}

#[test]
fn junit_report_failing_exit_and_missing_report() {
    let Some(c) = Case::new() else { return };
    let xml = r#"<testsuite name="s"><testcase classname="c" name="ok" time="0.5"/><testcase classname="c" name="bad" time="0.1"><failure message="boom"/></testcase></testsuite>"#;
    std::fs::write(c.path().join("report.xml"), xml).unwrap();
    let r = c.run(
        r#"command = ["/bin/sh", "-c", "cp /in/report.xml /workspace/report.xml"]
[[mount]]
source = "."
target = "/in"
[results]
format = "junit"
path = "report.xml"
"#,
    );
    r.assert_status(RunStatus::Failed);
    assert_eq!(r.outcome.tests.len(), 2);
    assert!(r
        .outcome
        .tests
        .iter()
        .any(|t| t.status == TestStatus::Failed));
    assert_eq!(
        r.facts
            .iter()
            .filter(|f| matches!(f, FactBody::TestResult(_)))
            .count(),
        2
    );

    let r = c.run("command = [\"/bin/sh\", \"-c\", \"exit 3\"]\n");
    r.assert_status(RunStatus::Failed);
    assert_eq!(r.outcome.exit_code, Some(3));

    let r = c.run(
        r#"command = ["/bin/true"]
[results]
format = "tap"
path = "/tmp/report.tap"
"#,
    );
    r.assert_status(RunStatus::Error);
    assert!(
        r.outcome
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("missing"),
        "{:?}",
        r.outcome.reason
    );
}

const BUILD: &str = r#"command = ["/bin/sh", "-c", "mkdir -p out/tree && cp /src/* out/tree/ && date -u -d @$SOURCE_DATE_EPOCH > out/tree/stamp && hostname >> out/tree/stamp && touch -d @$SOURCE_DATE_EPOCH out/tree out/tree/* && cd out && tar -cf - tree/a.txt tree/b.txt tree/stamp | gzip -n > build.tar.gz"]
[[mount]]
source = "src"
target = "/src"
[artifacts]
paths = ["out/*.tar.gz"]
"#;

#[test]
fn deterministic_build_gives_same_digests() {
    let Some(c) = Case::new() else { return };
    let src = c.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(src.join("b.txt"), "beta\n").unwrap();
    let a = c.run(BUILD);
    a.assert_status(RunStatus::Passed);
    let b = c.run(BUILD);
    b.assert_status(RunStatus::Passed);
    assert_eq!(a.outcome.input_digest, b.outcome.input_digest);
    assert_eq!(a.outcome.artifacts.len(), 1, "{:?}", a.outcome.artifacts);
    assert_eq!(
        a.outcome.artifacts, b.outcome.artifacts,
        "same inputs, same artifact digests"
    );
    // The artifact is in the CAS.
    let cas = c.path().join("state/cas");
    let mut found = false;
    for e in walk_files(&cas) {
        if e.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(&a.outcome.artifacts[0].blake3))
        {
            found = true;
        }
    }
    assert!(
        found,
        "artifact {} not in the CAS",
        a.outcome.artifacts[0].blake3
    );

    std::fs::write(src.join("b.txt"), "beta, changed\n").unwrap();
    let d = c.run(BUILD);
    d.assert_status(RunStatus::Passed);
    assert_ne!(
        a.outcome.input_digest, d.outcome.input_digest,
        "changed input, same digest"
    );
    assert_ne!(a.outcome.artifacts[0].blake3, d.outcome.artifacts[0].blake3);
}

fn walk_files(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn output_past_the_pipe_buffer_does_not_deadlock() {
    let Some(c) = Case::new() else { return };
    let r = c.run("command = [\"/bin/sh\", \"-c\", \"seq 1 50000\"]\ntimeout = \"30s\"\n");
    r.assert_status(RunStatus::Passed);
    let lines = r.lines("stdout");
    assert_eq!(lines.len(), 50000);
    assert_eq!(lines.last().map(String::as_str), Some("50000"));
}

#[test]
fn crashed_helper_leftovers_are_cleaned_by_cleanup_orphans() {
    let Some(c) = Case::new() else { return };
    // Simulate what a crash leaves: a run folder with its job file and a
    // cgroup with a live process in it.
    let cfg = c.config();
    let cgroup = format!(
        "{}/{}orphan{}",
        own_memory_cgroup(),
        runner::cgroup_prefix(&cfg),
        std::process::id()
    );
    let dir = Path::new("/sys/fs/cgroup/pids").join(cgroup.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).expect("cgroup");
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    let run_dir = cfg.state_dir.join("runs/ORPHAN");
    std::fs::create_dir_all(&run_dir).unwrap();
    // A job file that no longer parses (say, an older protocol): the run
    // folder still goes, and the cgroup is found by its liminal- name.
    std::fs::write(run_dir.join("job.json"), "{\"version\": 0}").unwrap();
    let report = runner::cleanup_orphans(&cfg).expect("cleanup");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!dir.exists(), "orphan cgroup still there");
    assert!(!run_dir.exists());
    let st = child.wait().unwrap();
    assert!(!st.success(), "the orphan's process was killed");
}

#[test]
fn killed_reproducibility_check_leftovers_are_cleaned_by_cleanup_orphans() {
    let Some(c) = Case::new() else { return };
    // What a verification killed mid-way leaves: its scratch folder with a
    // file-order view still mounted in it (a tmpfs stands in for disorderfs;
    // the cleanup treats every mount there alike). The name has a space,
    // which /proc/self/mountinfo escapes.
    let cfg = c.config();
    let scratch = cfg.state_dir.join("repro/01KILLEDCHECK0000000000000");
    let view = scratch.join("disorder varied-1");
    std::fs::create_dir_all(&view).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&view)
        .status()
        .unwrap();
    assert!(st.success(), "mount");
    std::fs::write(view.join("inside"), "x").unwrap();
    let report = runner::cleanup_orphans(&cfg).expect("cleanup");
    let still_mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains("disorder\\040varied-1");
    if still_mounted {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&view)
            .status();
    }
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!still_mounted, "the view is still mounted");
    assert!(!scratch.exists(), "the scratch folder is still there");
}

fn own_memory_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    text.lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            c.split(',').any(|c| c == "memory").then(|| path.to_owned())
        })
        .unwrap_or_else(|| "/".into())
}

#[test]
fn killed_helper_leaves_nothing_behind() {
    let Some(c) = Case::new() else { return };
    let marker = format!("{}", 2_000_000 + std::process::id());
    let plan = c.plan(&format!(
        "command = [\"/bin/sh\", \"-c\", \"sleep {marker} & sleep {marker}\"]\ntimeout = \"60s\"\n"
    ));
    let helper_path = helper();
    let killer = std::thread::spawn(move || {
        // Wait for the container's sleepers, then SIGKILL the helper.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if processes_with(&format!("sleep {marker}")).len() >= 2 {
                for pid in processes_with(&helper_path.to_string_lossy()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let started = Instant::now();
    let r = c.run_plan(plan, BTreeMap::new(), &CancelHandle::new());
    assert!(killer.join().unwrap(), "the container never started");
    r.assert_status(RunStatus::Error);
    let reason = r.outcome.reason.clone().unwrap_or_default();
    assert!(reason.contains("helper died"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let marker = format!("{}", 2_000_000 + std::process::id());
    assert!(
        processes_with(&format!("sleep {marker}")).is_empty(),
        "sleepers survived the helper"
    );
}

#[test]
fn killed_fork_server_spares_its_running_job_and_is_restarted() {
    let Some(c) = Case::new() else { return };
    if !liminal_engine::prefork::enabled() {
        eprintln!("skipped: LIMINAL_SANDBOX_PREFORK=0");
        return;
    }
    // $0 of the shell carries the marker, so the test can see the job run.
    let marker = format!("marker-{}", 3_000_000 + std::process::id());
    let plan = c.plan(&format!(
        "command = [\"/bin/sh\", \"-c\", \"sleep 2; echo finished\", \"{marker}\"]\ntimeout = \"60s\"\n"
    ));
    let server = format!("{} --serve", helper().display());
    let m = marker.clone();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !processes_with(&m).is_empty() {
                // The server is our child; the job it forked has the
                // same command line but the server as its parent.
                let servers: Vec<i32> = processes_with(&server)
                    .into_iter()
                    .filter(|p| parent_of(*p) == Some(std::process::id() as i32))
                    .collect();
                for pid in &servers {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return servers.len();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        0
    });
    let r = c.run_plan(plan, BTreeMap::new(), &CancelHandle::new());
    assert!(killer.join().unwrap() > 0, "no fork server to kill");
    r.assert_status(RunStatus::Passed);
    assert_eq!(r.stdout(), "finished");
    // The next run gets a fresh server.
    let r = c.run("command = [\"/bin/echo\", \"again\"]\n");
    r.assert_status(RunStatus::Passed);
    assert_eq!(r.stdout(), "again");
}

fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}
