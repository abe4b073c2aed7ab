//! Runs one plan: resolves its inputs, spawns the `liminal-sandbox` helper,
//! reads the container's output while it runs, enforces cancellation, turns
//! what happened into facts and cleans up on every path.
//!
//! Blocking and thread-safe: the daemon calls [`run`] from a blocking thread.
//! libcontainer never runs in this process (see [`crate::job`]).

use crate::artifacts::{self, Cas, CollectedArtifact};
use crate::job::{self, BindMount, IdMap, Job, JobReport, Limits, Network, Outcome, Rlimit};
use crate::results::{self, ReportError};
use crate::signals::{self, LineSplitter, Redactor};
use crate::{digest, image, prefork, secrets};
use liminal_facts::{
    new_id, ArtifactFact, FactBody, RunFact, RunStatus, SignalFact, SignalKind, TestResultFact,
    TestStatus, Timestamp, Ulid,
};
use liminal_plan::{NetworkMode, Plan, ResultsFormat};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Host id that container uid/gid 0 maps to, and how many ids.
pub const ID_MAP: IdMap = IdMap {
    host_id: 100_000,
    size: 65_536,
};
pub const HOSTNAME: &str = "liminal";
pub const DOMAINNAME: &str = "liminal.invalid";
pub const UMASK: u32 = 0o022;
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Per-run, host-backed and writable: a sensible HOME for tools that write
/// dotfiles, without putting them among the workdir's artifacts.
pub const HOME: &str = "/tmp";
/// Between SIGTERM and SIGKILL on timeout and cancel.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// Captured bytes per stream; the rest is drained and counted, not kept.
pub const MAX_STREAM_BYTES: u64 = 16 << 20;
/// Longest stdout/stderr/signal line kept whole; longer ones are cut.
pub const MAX_LINE: usize = 64 << 10;
/// Largest JUnit/TAP report read.
pub const MAX_REPORT_BYTES: u64 = 64 << 20;
/// Signals accepted on LIMINAL_SIGNALS_FD per run.
pub const MAX_SIGNAL_LINES: u64 = 100_000;
/// Descriptor number of LIMINAL_SIGNALS_FD inside the sandbox.
pub const SIGNALS_FD: i32 = job::FIRST_CONTAINER_FD;

/// The default seccomp profile and base spec the helper embeds: their
/// digests are part of the sandbox configuration (and so of the input digest).
const SECCOMP_PROFILE: &str = include_str!("../../../oci/runtime/seccomp.json");
const BASE_SPEC: &str = include_str!("../../../oci/runtime/config.json");

pub struct EngineConfig {
    /// Per-run folders (`runs/`), libcontainer state (`containers/`), the CAS (`cas/`).
    pub state_dir: PathBuf,
    /// Unpacked OCI images, digest caches.
    pub cache_dir: PathBuf,
    /// The `liminal-sandbox` binary.
    pub helper: PathBuf,
    /// Recorded in run facts.
    pub host: String,
    /// Cgroup under which each run gets `<cgroup_prefix>-<run_id>`. Empty: this
    /// process's own cgroup (the memory controller's on cgroup v1, the
    /// unified one on v2), as PLATFORM-NOTES pitfall 3 asks.
    pub cgroup_parent: String,
    /// `$CREDENTIALS_DIRECTORY` for `credential:` secrets.
    pub credentials_dir: Option<PathBuf>,
}

pub struct RunRequest {
    pub run_id: Ulid,
    pub plan: Plan,
    /// Descriptors for `from = "fd"` secrets, by secret name.
    pub fd_secrets: BTreeMap<String, OwnedFd>,
}

/// Cancels a run from another thread; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TestSummary {
    pub name: String,
    pub status: TestStatus,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunOutcome {
    pub run_id: Ulid,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub input_digest: String,
    pub reason: Option<String>,
    pub tests: Vec<TestSummary>,
    pub artifacts: Vec<CollectedArtifact>,
    /// The command ran in a warm sandbox (created before the run asked for
    /// it; see the helper's `warm` module), not one created for the run.
    pub warm_sandbox: bool,
}

/// Only for runs that could not even start; a run that started always ends
/// in `Ok(RunOutcome)` with its status.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("input mount {target}: {source}")]
    MountDigest {
        target: String,
        #[source]
        source: digest::DigestError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox helper {}: {source}", path.display())]
    Helper {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Io { what, source }
}

/// What [`cleanup_orphans`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub runs: Vec<String>,
    pub cgroups: Vec<String>,
    pub errors: Vec<String>,
}

/// The per-run host folders, removed (with the cgroup) on drop: every path
/// out of [`run`], panics included, cleans up.
struct RunDirs {
    root: PathBuf,
    container_dir: PathBuf,
    cgroup_path: String,
    created_cgroup_parents: Vec<PathBuf>,
}

impl RunDirs {
    fn bundle(&self) -> PathBuf {
        self.root.join("bundle")
    }
    fn work(&self) -> PathBuf {
        self.root.join("work")
    }
    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

impl Drop for RunDirs {
    fn drop(&mut self) {
        for e in job::teardown_cgroup(&self.cgroup_path) {
            tracing::warn!("cleanup: {e}");
        }
        job::remove_empty_dirs(&self.created_cgroup_parents);
        for d in [&self.container_dir, &self.root] {
            if let Err(e) = std::fs::remove_dir_all(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cleanup: removing {}: {e}", d.display());
                }
            }
        }
    }
}

/// The container id (and last cgroup component) of a run.
pub fn container_id(run_id: Ulid) -> String {
    format!("liminal-{}", run_id.to_string().to_ascii_lowercase())
}

/// This process's cgroup, to nest runs under (pitfall 3).
fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut unified = None;
    let mut memory = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        if controllers.is_empty() {
            unified = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            memory = Some(path.to_owned());
        }
    }
    // On a hybrid host libcgroups uses v1: follow the memory controller,
    // whose limits are the ones that matter for the daemon.
    memory.or(unified).unwrap_or_else(|| "/".to_owned())
}

/// The name prefix of the run cgroups that belong to this engine's state dir:
/// `liminal-<8 hex of BLAKE3(state dir)>-`. Several engines (two daemons, a
/// daemon and `limctl run --local`, parallel tests) may share a parent
/// cgroup; the orphan sweep must only ever touch its own runs.
pub fn cgroup_prefix(cfg: &EngineConfig) -> String {
    let dir = std::fs::canonicalize(&cfg.state_dir).unwrap_or_else(|_| cfg.state_dir.clone());
    let tag = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    format!("liminal-{}-", &tag[..8])
}

fn cgroup_parent(cfg: &EngineConfig) -> String {
    if cfg.cgroup_parent.is_empty() {
        own_cgroup()
    } else {
        cfg.cgroup_parent.clone()
    }
}

fn cgroup_path(cfg: &EngineConfig, run_id: Ulid) -> String {
    format!(
        "{}/{}{}",
        cgroup_parent(cfg).trim_end_matches('/'),
        cgroup_prefix(cfg),
        run_id.to_string().to_ascii_lowercase()
    )
}

/// The fixed determinism set plus the plan's variables (which win, except
/// that LIMINAL_* names are the sandbox's own).
pub fn sandbox_env(plan: &Plan, secrets: &[(String, i32)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("PATH", DEFAULT_PATH),
        ("HOME", HOME),
        ("TZ", "UTC"),
        ("LC_ALL", "C.UTF-8"),
        ("LANG", "C.UTF-8"),
        ("SOURCE_DATE_EPOCH", "0"),
        ("HOSTNAME", HOSTNAME),
        ("USER", "root"),
        ("TMPDIR", "/tmp"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in &plan.env {
        env.insert(k.clone(), v.clone());
    }
    env.insert("LIMINAL_SIGNALS_FD".into(), SIGNALS_FD.to_string());
    for (var, fd) in secrets {
        env.insert(var.clone(), fd.to_string());
    }
    env
}

fn rlimits() -> Vec<Rlimit> {
    let r = |kind: &str, soft: u64, hard: u64| Rlimit {
        kind: kind.to_owned(),
        soft,
        hard,
    };
    vec![
        r("RLIMIT_NOFILE", 4096, 4096),
        r("RLIMIT_CORE", 0, 0),
        r("RLIMIT_STACK", 8 << 20, 8 << 20),
        r("RLIMIT_MEMLOCK", 8 << 20, 8 << 20),
    ]
}

/// Everything about the sandbox (besides the plan) that can change what a
/// run produces: it enters the input digest.
pub fn sandbox_config(plan: &Plan) -> serde_json::Value {
    json!({
        "protocol": job::PROTOCOL_VERSION,
        "hostname": HOSTNAME,
        "domainname": DOMAINNAME,
        "umask": UMASK,
        "uid": 0,
        "gid": 0,
        "id_map_size": ID_MAP.size,
        "env": sandbox_env(plan, &[]),
        "rlimits": rlimits().iter().map(|r| json!([r.kind, r.soft, r.hard])).collect::<Vec<_>>(),
        "reset_clocks": true,
        "cpu_affinity": format!("first {}", plan.resources.cpus),
        "seccomp": blake3::hash(SECCOMP_PROFILE.as_bytes()).to_hex().to_string(),
        "base_spec": blake3::hash(BASE_SPEC.as_bytes()).to_hex().to_string(),
    })
}

/// Changes to the sandbox that a reproducibility check applies to one build
/// (see [`crate::repro`]); the default changes nothing. Variations of the
/// plan itself (workdir, env, CPUs) are made on the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SandboxVariation {
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub umask: Option<u32>,
    /// Container uid and gid of the workload (the workdir is given to them).
    pub user: Option<(u32, u32)>,
    /// Extra personality(2) flags.
    pub personality: u32,
    /// Added to CLOCK_MONOTONIC and CLOCK_BOOTTIME in the time namespace.
    pub clock_offset_secs: i64,
}

impl SandboxVariation {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Blocking. Emits facts through `sink` as they happen: Run(running) first,
/// signals while running, test results and artifacts after, Run(final) last.
pub fn run(
    cfg: &EngineConfig,
    req: RunRequest,
    sink: &mut dyn FnMut(FactBody),
    cancel: &CancelHandle,
) -> Result<RunOutcome, EngineError> {
    run_varied(cfg, req, &SandboxVariation::default(), sink, cancel)
}

/// [`run`] with sandbox variations applied (a non-default variation enters
/// the input digest).
pub fn run_varied(
    cfg: &EngineConfig,
    req: RunRequest,
    variation: &SandboxVariation,
    sink: &mut dyn FnMut(FactBody),
    cancel: &CancelHandle,
) -> Result<RunOutcome, EngineError> {
    let RunRequest {
        run_id,
        plan,
        fd_secrets,
    } = req;
    let span = tracing::info_span!("run", %run_id, plan = %plan.name);
    let _enter = span.enter();

    // Inputs: anything failing here means the run could not start.
    let t0 = Instant::now();
    let image = image::resolve(&plan.image, &cfg.cache_dir)?;
    let t_image = t0.elapsed();
    let sealed = secrets::load(&plan.secrets, fd_secrets, cfg.credentials_dir.as_deref())?;
    let mut mount_digests = Vec::new();
    for m in &plan.mounts {
        let d = digest::tree_digest_cached(&m.source, &cfg.cache_dir).map_err(|source| {
            EngineError::MountDigest {
                target: m.target.clone(),
                source,
            }
        })?;
        mount_digests.push((m.target.clone(), d));
    }
    let mut sandbox = sandbox_config(&plan);
    if !variation.is_default() {
        sandbox["variation"] = json!(variation);
    }
    let input_digest = digest::input_digest(&plan, &image.digest, &mount_digests, &sandbox);

    let cid = container_id(run_id);
    let cgroup = cgroup_path(cfg, run_id);
    let dirs = RunDirs {
        root: cfg.state_dir.join("runs").join(run_id.to_string()),
        container_dir: cfg.state_dir.join("containers").join(&cid),
        created_cgroup_parents: job::missing_cgroup_parents(&cgroup),
        cgroup_path: cgroup.clone(),
    };
    prepare_dirs(&dirs, variation.user.unwrap_or((0, 0)))?;
    let t_prep = t0.elapsed();

    let started_at = Timestamp::now();
    let run_fact = |status: RunStatus,
                    exit_code: Option<i32>,
                    reason: Option<String>,
                    finished: Option<Timestamp>| {
        FactBody::Run(RunFact {
            fact_id: new_id(),
            run_id,
            plan_name: plan.name.clone(),
            status,
            exit_code,
            input_digest: input_digest.clone(),
            image_digest: Some(image.digest.clone()),
            host: cfg.host.clone(),
            started_at,
            finished_at: finished,
            reason,
            valid_at: finished.unwrap_or(started_at),
        })
    };
    sink(run_fact(RunStatus::Running, None, None, None));

    let secret_values: Vec<&[u8]> = sealed.iter().map(|s| &s.value[..]).collect();
    let redactor = Redactor::new(&secret_values);

    let report = spawn_and_pump(
        cfg,
        &plan,
        &image.rootfs,
        &sealed,
        &dirs,
        &cid,
        &redactor,
        run_id,
        variation,
        sink,
        cancel,
    )
    .map_err(|e| e.to_string());
    drop(sealed);
    let t_sandbox = t0.elapsed();

    // Decide the status.
    let mut reason: Option<String>;
    let mut exit_code = None;
    let mut tests = Vec::new();
    let mut artifacts_out = Vec::new();
    let mut ran = false;
    let status = match &report {
        // A cancel can kill the helper before it blocks SIGTERM.
        Err(_) if cancel.is_cancelled() => {
            reason = Some("cancelled before the sandbox started".into());
            RunStatus::Cancelled
        }
        Err(msg) => {
            reason = Some(msg.clone());
            RunStatus::Error
        }
        Ok(r) => {
            for e in &r.cleanup_errors {
                tracing::warn!("sandbox cleanup: {e}");
            }
            match &r.outcome {
                Outcome::SetupFailed { message } => {
                    reason = Some(format!("sandbox setup failed: {message}"));
                    RunStatus::Error
                }
                Outcome::Exited { .. } | Outcome::Signaled { .. } => {
                    ran = true;
                    let (code, signal) = match r.outcome {
                        Outcome::Signaled { signal } => (128 + signal, Some(signal)),
                        Outcome::Exited { code } => (code, None),
                        Outcome::SetupFailed { .. } => (-1, None),
                    };
                    exit_code = Some(code);
                    if r.cancelled {
                        reason = Some("cancelled".into());
                        RunStatus::Cancelled
                    } else if r.timed_out {
                        reason = Some(format!("timed out after {}", humanize(plan.timeout)));
                        RunStatus::Timeout
                    } else if r.oom_killed {
                        reason = Some("out of memory (OOM kill)".into());
                        RunStatus::Error
                    } else {
                        let (st, why, parsed) = judge(&plan, &dirs, code, signal, &redactor);
                        reason = why;
                        tests = parsed;
                        st
                    }
                }
            }
        }
    };

    // Test results, then artifacts, then the final run fact.
    // Reports rarely say when each case ran (TAP never does), so a case is
    // placed so that it ends when the command ended: the latest moment it
    // can have happened. Every signal the run emitted thus precedes its
    // failures, which is what causality_walk looks for.
    let command_ended = Timestamp::now();
    let mut summaries = Vec::new();
    for t in &tests {
        let duration_us = i64::try_from(t.duration_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        let case_started = Timestamp::from_unix_micros(
            command_ended
                .unix_micros()
                .saturating_sub(duration_us)
                .max(started_at.unix_micros()),
        );
        summaries.push(TestSummary {
            name: t.name.clone(),
            status: t.status,
            duration_ms: t.duration_ms,
        });
        sink(FactBody::TestResult(TestResultFact {
            fact_id: new_id(),
            id: new_id(),
            run_id,
            test_name: t.name.clone(),
            status: t.status,
            started_at: case_started,
            duration_ms: t.duration_ms,
            message: t
                .message
                .as_deref()
                .map(|m| String::from_utf8_lossy(&redactor.redact(m.as_bytes())).into_owned()),
            valid_at: Timestamp::now(),
        }));
    }
    if ran && !plan.artifacts.is_empty() {
        match Cas::open(&cfg.state_dir.join("cas"))
            .and_then(|cas| artifacts::collect(&dirs.work(), &plan.artifacts, &cas))
        {
            Ok(list) => artifacts_out = list,
            Err(e) => {
                tracing::warn!("collecting artifacts: {e}");
                if status == RunStatus::Passed || status == RunStatus::Failed {
                    reason.get_or_insert_with(|| format!("collecting artifacts: {e}"));
                }
            }
        }
        for a in &artifacts_out {
            sink(FactBody::Artifact(ArtifactFact {
                fact_id: new_id(),
                id: new_id(),
                run_id,
                path: a.path.clone(),
                blake3: a.blake3.clone(),
                size: a.size,
                valid_at: Timestamp::now(),
            }));
        }
    }
    let t_results = t0.elapsed();
    drop(dirs);
    let finished = Timestamp::now();
    sink(run_fact(status, exit_code, reason.clone(), Some(finished)));
    tracing::info!(%status, ?exit_code, "run finished");
    tracing::debug!(
        image_us = t_image.as_micros() as u64,
        prepared_us = t_prep.as_micros() as u64,
        sandbox_done_us = t_sandbox.as_micros() as u64,
        results_us = t_results.as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "run phases (cumulative)"
    );
    Ok(RunOutcome {
        run_id,
        status,
        exit_code,
        input_digest,
        reason,
        tests: summaries,
        artifacts: artifacts_out,
        warm_sandbox: report.as_ref().is_ok_and(|r| r.timings.warm),
    })
}

fn humanize(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Status of a run whose command ran to its end: the report (if any) and the
/// exit code. A missing or malformed report is an `error` naming the problem.
fn judge(
    plan: &Plan,
    dirs: &RunDirs,
    code: i32,
    signal: Option<i32>,
    redactor: &Redactor,
) -> (RunStatus, Option<String>, Vec<results::ParsedTest>) {
    let exit_reason = || match signal {
        Some(s) => Some(format!("killed by signal {s}")),
        None if code != 0 => Some(format!("exit code {code}")),
        None => None,
    };
    if plan.results.format == ResultsFormat::ExitCode {
        let st = if code == 0 {
            RunStatus::Passed
        } else {
            RunStatus::Failed
        };
        return (st, exit_reason(), Vec::new());
    }
    let Some(inside) = plan.results.path.as_deref() else {
        return (RunStatus::Error, Some("no results.path".into()), Vec::new());
    };
    let Some(host) = host_path(plan, dirs, inside) else {
        return (
            RunStatus::Error,
            Some(format!(
                "results.path {inside} is not in the workdir, /tmp or a writable mount"
            )),
            Vec::new(),
        );
    };
    match results::read_report(plan.results.format, &host, MAX_REPORT_BYTES) {
        Err(e) => {
            let msg = match &e {
                ReportError::Missing(_) => format!("report {inside} is missing"),
                other => other.to_string(),
            };
            let msg = String::from_utf8_lossy(&redactor.redact(msg.as_bytes())).into_owned();
            (RunStatus::Error, Some(msg), Vec::new())
        }
        Ok(tests) => {
            let failing = tests
                .iter()
                .filter(|t| matches!(t.status, TestStatus::Failed | TestStatus::Error))
                .count();
            if failing > 0 {
                (
                    RunStatus::Failed,
                    Some(format!("{failing} of {} tests failed", tests.len())),
                    tests,
                )
            } else if code != 0 || signal.is_some() {
                (RunStatus::Failed, exit_reason(), tests)
            } else {
                (RunStatus::Passed, None, tests)
            }
        }
    }
}

/// Host location of a path inside the sandbox, for the writable places the
/// engine reads back (workdir, /tmp, writable mounts).
fn host_path(plan: &Plan, dirs: &RunDirs, inside: &str) -> Option<PathBuf> {
    let under = |root: &str| -> Option<String> {
        let rest = inside.strip_prefix(root)?;
        if rest.is_empty() || rest.starts_with('/') {
            Some(rest.trim_start_matches('/').to_owned())
        } else {
            None
        }
    };
    if let Some(r) = under(&plan.workdir) {
        return Some(dirs.work().join(r));
    }
    if let Some(r) = under("/tmp") {
        return Some(dirs.tmp().join(r));
    }
    plan.mounts
        .iter()
        .filter(|m| !m.readonly)
        .find_map(|m| under(&m.target).map(|r| m.source.join(r)))
}

fn prepare_dirs(dirs: &RunDirs, (uid, gid): (u32, u32)) -> Result<(), EngineError> {
    use std::os::unix::fs::PermissionsExt;
    if dirs.root.exists() {
        return Err(EngineError::Io {
            what: format!("run folder {}", dirs.root.display()),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    // Not the bundle: a warm slot brings its own, and a cold helper mounts
    // a tmpfs there (creating the mount point) in its own namespace. Every
    // folder made here is journalled inode work on the state disk.
    for d in [dirs.work(), dirs.tmp()] {
        std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    if let Some(p) = dirs.container_dir.parent() {
        // With the folder warm slots mount their tmpfs on (they make
        // nothing on the disk themselves).
        for d in [p.to_owned(), job::slots_dir(p)] {
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
    }
    std::fs::set_permissions(&dirs.root, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", dirs.root.display())))?;
    // The container (host uid 100000) opens its staged rootfs and mounts
    // below the run folder: every ancestor must be searchable by others.
    let mut p = dirs.root.parent();
    while let Some(d) = p {
        if let Ok(m) = std::fs::metadata(d) {
            if m.permissions().mode() & 0o001 == 0 {
                return Err(EngineError::Io {
                    what: format!(
                        "state dir: {} is not searchable by others (mode {:o}); the sandbox's mapped ids must traverse it",
                        d.display(),
                        m.permissions().mode() & 0o7777
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                });
            }
        }
        p = d.parent();
    }
    // Owned by the workload's (mapped) user, so it can write there without
    // any capability.
    let owner = Some(nix::unistd::Uid::from_raw(ID_MAP.host_id + uid));
    let group = Some(nix::unistd::Gid::from_raw(ID_MAP.host_id + gid));
    for (d, mode) in [(dirs.work(), 0o755), (dirs.tmp(), 0o1777)] {
        nix::unistd::chown(&d, owner, group).map_err(|e| EngineError::Io {
            what: format!("chown {}", d.display()),
            source: e.into(),
        })?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("chmod {}", d.display())))?;
    }
    Ok(())
}

/// Which stream a descriptor carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Stdout,
    Stderr,
    Signals,
    Report,
    HelperStderr,
}

struct Reader {
    stream: Stream,
    fd: OwnedFd,
    splitter: LineSplitter,
    bytes: u64,
    dropped: u64,
    open: bool,
    buf: Vec<u8>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), EngineError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| EngineError::Io {
        what: "pipe".into(),
        source: e.into(),
    })
}

/// The write ends a helper gets, with the numbers it must find them at.
struct HelperFds {
    /// From `FIRST_CONTAINER_FD` on: the signals pipe, then secrets.
    container: Vec<OwnedFd>,
    stdout: (OwnedFd, i32),
    stderr: (OwnedFd, i32),
    report: (OwnedFd, i32),
}

/// The process running a job: forked by the warm fork server (watched
/// through its pidfd), or a helper spawned for this run (our child).
enum Helper {
    Forked(prefork::Forked),
    Spawned(std::process::Child),
}

impl Helper {
    fn signal(&self, sig: Signal) {
        match self {
            Helper::Forked(f) => {
                let _ = prefork::pidfd_signal(&f.pidfd, sig);
            }
            Helper::Spawned(c) => {
                let _ = kill(Pid::from_raw(c.id() as i32), sig);
            }
        }
    }

    /// `Some(description)` once it has exited.
    fn try_wait(&mut self) -> Option<String> {
        match self {
            Helper::Forked(f) => prefork::pidfd_exited(&f.pidfd, Some(Duration::ZERO))
                .then(|| format!("forked helper {} exited", f.pid)),
            Helper::Spawned(c) => c.try_wait().ok().flatten().map(|st| st.to_string()),
        }
    }

    fn wait(&mut self) -> std::io::Result<String> {
        match self {
            Helper::Forked(f) => {
                prefork::pidfd_exited(&f.pidfd, None);
                Ok(format!("forked helper {} exited", f.pid))
            }
            Helper::Spawned(c) => c.wait().map(|st| st.to_string()),
        }
    }
}

/// Starts the job: through the warm fork server when possible, else by
/// spawning a helper. Returns it and the read end of its diagnostics. Our
/// copies of the write ends are closed when this returns, so the pipes
/// reach EOF once the helper and the container are done.
fn start_helper(
    cfg: &EngineConfig,
    job_json: &[u8],
    fds: HelperFds,
) -> Result<(Helper, Option<OwnedFd>), EngineError> {
    use command_fds::{CommandFdExt, FdMapping};
    if prefork::enabled() {
        let (diag_r, diag_w) = pipe()?;
        let borrowed = prefork::JobFds {
            helper_stderr: diag_w.as_fd(),
            container: fds.container.iter().map(|f| f.as_fd()).collect(),
            stdout: fds.stdout.0.as_fd(),
            stderr: fds.stderr.0.as_fd(),
            report: fds.report.0.as_fd(),
        };
        match prefork::start_job(&cfg.helper, job_json, &borrowed) {
            Ok(forked) => {
                tracing::debug!(pid = %forked.pid, "job handed to the sandbox fork server");
                return Ok((Helper::Forked(forked), Some(diag_r)));
            }
            Err(e) => tracing::warn!("{e}; spawning a helper for this run instead"),
        }
    }
    let mut mappings: Vec<FdMapping> = fds
        .container
        .into_iter()
        .zip(SIGNALS_FD..)
        .map(|(parent_fd, child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    for (parent_fd, child_fd) in [fds.stdout, fds.stderr, fds.report] {
        mappings.push(FdMapping {
            parent_fd,
            child_fd,
        });
    }
    let mut cmd = Command::new(&cfg.helper);
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Ok(v) = std::env::var("LIMINAL_SANDBOX_LOG") {
        cmd.env("LIMINAL_SANDBOX_LOG", v);
    }
    cmd.fd_mappings(mappings).map_err(|e| EngineError::Io {
        what: "mapping descriptors for the helper".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut child = cmd.spawn().map_err(|source| EngineError::Helper {
        path: cfg.helper.clone(),
        source,
    })?;
    // The mapped write ends live on only in the helper now (command-fds keeps
    // them in `cmd`): drop it, or the pipes never reach EOF.
    drop(cmd);
    let helper_err = child.stderr.take().map(OwnedFd::from);
    if let Some(mut stdin) = child.stdin.take() {
        // The helper reads the whole job before anything else; a failed
        // write means it died, which the wait below reports.
        let _ = stdin.write_all(job_json);
    }
    Ok((Helper::Spawned(child), helper_err))
}

/// Spawns the helper and pumps its streams until it exits. `Err` means the
/// helper died without a report (the run is `error`).
#[allow(clippy::too_many_arguments)]
fn spawn_and_pump(
    cfg: &EngineConfig,
    plan: &Plan,
    rootfs: &Path,
    sealed: &[secrets::SealedSecret],
    dirs: &RunDirs,
    cid: &str,
    redactor: &Redactor,
    run_id: Ulid,
    variation: &SandboxVariation,
    sink: &mut dyn FnMut(FactBody),
    cancel: &CancelHandle,
) -> Result<JobReport, EngineError> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (sig_r, sig_w) = pipe()?;
    let (rep_r, rep_w) = pipe()?;

    // Container descriptors at their final numbers: signals, then secrets.
    let n_secrets = sealed.len() as i32;
    let mut container_fds = vec![sig_w];
    let mut secret_vars = Vec::new();
    for (i, s) in sealed.iter().enumerate() {
        let child_fd = SIGNALS_FD + 1 + i as i32;
        let dup =
            s.fd.try_clone()
                .map_err(io_err(format!("duplicating secret {}", s.name)))?;
        container_fds.push(dup);
        secret_vars.push((s.env_var.clone(), child_fd));
    }
    let stdout_fd = SIGNALS_FD + 1 + n_secrets;
    let (stderr_fd, report_fd) = (stdout_fd + 1, stdout_fd + 2);

    let mut mounts = vec![
        BindMount {
            source: dirs.work(),
            target: plan.workdir.clone(),
            readonly: false,
        },
        BindMount {
            source: dirs.tmp(),
            target: "/tmp".into(),
            readonly: false,
        },
    ];
    let mut writable = vec![plan.workdir.clone(), "/tmp".to_owned()];
    for m in &plan.mounts {
        mounts.push(BindMount {
            source: m.source.clone(),
            target: m.target.clone(),
            readonly: m.readonly,
        });
        if !m.readonly {
            writable.push(m.target.clone());
        }
    }
    let job = Job {
        version: job::PROTOCOL_VERSION,
        container_id: cid.to_owned(),
        state_root: cfg.state_dir.join("containers"),
        bundle: dirs.bundle(),
        rootfs: rootfs.to_owned(),
        args: plan.command.clone(),
        env: sandbox_env(plan, &secret_vars),
        cwd: plan.workdir.clone(),
        hostname: variation
            .hostname
            .clone()
            .unwrap_or_else(|| HOSTNAME.into()),
        domainname: variation
            .domainname
            .clone()
            .unwrap_or_else(|| DOMAINNAME.into()),
        umask: variation.umask.unwrap_or(UMASK),
        mounts,
        network: match plan.network {
            NetworkMode::None => Network::None,
            NetworkMode::Loopback => Network::Loopback,
        },
        id_map: ID_MAP,
        resources: Limits {
            memory_bytes: plan.resources.memory_bytes,
            pids: plan.resources.pids,
            cpus: plan.resources.cpus,
        },
        cgroup_path: dirs.cgroup_path.clone(),
        preserved_fds: 1 + n_secrets as u32,
        stdout_fd,
        stderr_fd,
        report_fd,
        timeout_ms: plan.timeout.as_millis().min(u64::MAX as u128) as u64,
        kill_grace_ms: KILL_GRACE.as_millis() as u64,
        rlimits: rlimits(),
        writable_paths: writable,
        reset_clocks: true,
        uid: variation.user.map_or(0, |u| u.0),
        gid: variation.user.map_or(0, |u| u.1),
        personality: variation.personality,
        clock_offset_secs: variation.clock_offset_secs,
    };
    let job_json = serde_json::to_vec(&job).map_err(|e| EngineError::Io {
        what: "encoding the job".into(),
        source: e.into(),
    })?;
    // Kept for post-mortem diagnosis of a helper that died; removed with the run.
    let _ = std::fs::write(dirs.root.join("job.json"), &job_json);

    let fds = HelperFds {
        container: container_fds,
        stdout: (out_w, stdout_fd),
        stderr: (err_w, stderr_fd),
        report: (rep_w, report_fd),
    };
    let (mut helper, helper_err) = start_helper(cfg, &job_json, fds)?;

    let mut readers = vec![
        reader(Stream::Stdout, out_r),
        reader(Stream::Stderr, err_r),
        reader(Stream::Signals, sig_r),
        reader(Stream::Report, rep_r),
    ];
    if let Some(fd) = helper_err {
        readers.push(reader(Stream::HelperStderr, fd));
    }
    for r in &readers {
        set_nonblocking(&r.fd);
    }

    let mut signal_lines = 0u64;
    let mut cancel_sent = false;
    // The helper enforces the timeout; this is the backstop if it hangs.
    let watchdog = Instant::now() + job_deadline(plan);
    let mut helper_status = None;
    let mut exited_at: Option<Instant> = None;
    let mut killed_helper = false;
    loop {
        if cancel.is_cancelled() && !cancel_sent {
            cancel_sent = true;
            helper.signal(Signal::SIGTERM);
        }
        if helper_status.is_none() {
            if let Some(st) = helper.try_wait() {
                helper_status = Some(st);
                exited_at = Some(Instant::now());
                // Helper gone without a report: the container may live on
                // and hold the pipes open. Kill it now.
                if !report_after_exit(&mut readers[3]) {
                    for e in job::teardown_cgroup(&dirs.cgroup_path) {
                        tracing::warn!("{e}");
                    }
                    if let Helper::Forked(prefork::Forked {
                        cgroup_path: Some(slot),
                        ..
                    }) = &helper
                    {
                        for e in job::teardown_cgroup(slot) {
                            tracing::warn!("{e}");
                        }
                    }
                }
            } else if Instant::now() > watchdog && !killed_helper {
                tracing::error!(
                    "sandbox helper overran its deadline; killing it and the container"
                );
                killed_helper = true;
                helper.signal(Signal::SIGKILL);
            }
        }
        if readers.iter().all(|r| !r.open) {
            if helper_status.is_some() {
                break;
            }
            // Every pipe hit EOF, the helper's stderr and report included:
            // it is exiting. Reap it without polling (a poll over no
            // descriptors would just sleep).
            helper_status = Some(helper.wait().map_err(|source| EngineError::Helper {
                path: cfg.helper.clone(),
                source,
            })?);
            break;
        }
        // A forked helper (a warm slot) writes its report last, after the
        // container is deleted and its cgroup removed, and closes it: with
        // the report in and the container's streams at EOF the run is over.
        // What the slot does after (exiting; its mount namespace and the
        // tmpfs holding its bundle going away) is the fork server's to reap
        // and, if the slot says it left something, to sweep; not waiting
        // for it takes the slot's exit off the run's path.
        if helper_status.is_none()
            && matches!(helper, Helper::Forked(_))
            && readers[..4].iter().all(|r| !r.open)
            && !readers[3].buf.is_empty()
        {
            if let Some(r) = readers.get_mut(4) {
                let chunk = read_available(r);
                r.buf.extend_from_slice(&chunk);
            }
            helper_status = Some("forked helper exiting after its report".to_owned());
            break;
        }
        if let Some(t) = exited_at {
            // Descendants that escaped the container's death cannot exist
            // (pid namespace), but never hang on a pipe someone still holds.
            if t.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        let mut pfds: Vec<nix::poll::PollFd> = readers
            .iter()
            .filter(|r| r.open)
            .map(|r| nix::poll::PollFd::new(r.fd.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        let _ = nix::poll::poll(&mut pfds, nix::poll::PollTimeout::from(50u16));
        drop(pfds);
        for r in readers.iter_mut().filter(|r| r.open) {
            let chunk = read_available(r);
            if chunk.is_empty() {
                continue;
            }
            match r.stream {
                Stream::Stdout | Stream::Stderr => {
                    let lines = r.splitter.push(&chunk);
                    for l in lines {
                        emit_output_line(r.stream, &l.bytes, l.truncated, redactor, run_id, sink);
                    }
                }
                Stream::Signals => {
                    for l in r.splitter.push(&chunk) {
                        signal_lines += 1;
                        if signal_lines <= MAX_SIGNAL_LINES {
                            emit_signal_line(&l.bytes, redactor, run_id, sink);
                        }
                    }
                }
                Stream::Report | Stream::HelperStderr => r.buf.extend_from_slice(&chunk),
            }
        }
    }
    let status = match helper_status {
        Some(s) => s,
        None => helper.wait().map_err(|source| EngineError::Helper {
            path: cfg.helper.clone(),
            source,
        })?,
    };
    for r in readers.iter_mut() {
        if let Some(l) = r.splitter.finish() {
            match r.stream {
                Stream::Stdout | Stream::Stderr => {
                    emit_output_line(r.stream, &l.bytes, l.truncated, redactor, run_id, sink)
                }
                Stream::Signals if signal_lines < MAX_SIGNAL_LINES => {
                    emit_signal_line(&l.bytes, redactor, run_id, sink)
                }
                _ => {}
            }
        }
        if r.dropped > 0 {
            let note = format!(
                "[liminal: {} bytes of {} dropped past the {} byte cap]",
                r.dropped,
                stream_name(r.stream),
                MAX_STREAM_BYTES
            );
            emit_output_line(r.stream, note.as_bytes(), false, redactor, run_id, sink);
        }
    }
    if signal_lines > MAX_SIGNAL_LINES {
        tracing::warn!(
            "{} signal lines over the cap of {MAX_SIGNAL_LINES} dropped",
            signal_lines - MAX_SIGNAL_LINES
        );
    }
    let helper_stderr =
        String::from_utf8_lossy(&redactor.redact(&readers[4.min(readers.len() - 1)].buf))
            .into_owned();
    if !helper_stderr.trim().is_empty() {
        tracing::debug!(helper_stderr = %helper_stderr.trim(), "sandbox helper diagnostics");
    }
    let report_bytes = &readers[3].buf;
    match serde_json::from_slice::<JobReport>(report_bytes) {
        Ok(r) => {
            let t = &r.timings;
            tracing::debug!(
                warm = t.warm,
                create_us = t.create_us,
                start_us = t.start_us,
                wait_us = t.wait_us,
                delete_us = t.delete_us,
                "sandbox timings"
            );
            Ok(r)
        }
        Err(e) => {
            let source = if report_bytes.is_empty() {
                std::io::Error::other("no report")
            } else {
                // Never seen in practice; if it is, the bytes say why.
                std::io::Error::other(format!(
                    "unreadable report ({e}, {} bytes: {:?})",
                    report_bytes.len(),
                    String::from_utf8_lossy(&report_bytes[..report_bytes.len().min(300)])
                ))
            };
            let tail: String = helper_stderr
                .trim()
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(EngineError::Io {
                what: format!(
                    "sandbox helper died without a report ({status}){}{}",
                    if tail.is_empty() { "" } else { ": " },
                    tail
                ),
                source,
            })
        }
    }
}

fn job_deadline(plan: &Plan) -> Duration {
    plan.timeout
        .saturating_add(KILL_GRACE)
        .saturating_add(Duration::from_secs(60))
}

fn reader(stream: Stream, fd: OwnedFd) -> Reader {
    Reader {
        stream,
        fd,
        splitter: LineSplitter::new(MAX_LINE),
        bytes: 0,
        dropped: 0,
        open: true,
        buf: Vec::new(),
    }
}

fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
        Stream::Signals => "signals",
        Stream::Report => "report",
        Stream::HelperStderr => "helper",
    }
}

fn set_nonblocking(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
        let _ = fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        );
    }
}

/// Reads what is there without blocking; marks EOF. Applies the byte cap.
/// The helper has exited: reads what the report pipe holds now into the
/// report's buffer and says whether there is a report. The helper writes it
/// just before it exits, so it is often still unread when the exit is seen;
/// dropping those bytes turned a good run into "died without a report"
/// (about one run in 300 back to back through warm sandboxes).
fn report_after_exit(report: &mut Reader) -> bool {
    if report.open && report.buf.is_empty() {
        let chunk = read_available(report);
        report.buf.extend_from_slice(&chunk);
    }
    !report.buf.is_empty()
}

fn read_available(r: &mut Reader) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match nix::unistd::read(r.fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from) {
            Ok(0) => {
                r.open = false;
                break;
            }
            Ok(n) => {
                let keep = if matches!(r.stream, Stream::Stdout | Stream::Stderr | Stream::Signals)
                {
                    let room = MAX_STREAM_BYTES.saturating_sub(r.bytes) as usize;
                    r.dropped += n.saturating_sub(room) as u64;
                    n.min(room)
                } else {
                    n
                };
                r.bytes += n as u64;
                out.extend_from_slice(&buf[..keep]);
                if out.len() >= 1 << 20 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => {
                r.open = false;
                break;
            }
        }
    }
    out
}

fn emit_output_line(
    stream: Stream,
    line: &[u8],
    truncated: bool,
    redactor: &Redactor,
    run_id: Ulid,
    sink: &mut dyn FnMut(FactBody),
) {
    let text = String::from_utf8_lossy(&redactor.redact(line)).into_owned();
    let mut attrs = BTreeMap::new();
    if truncated {
        attrs.insert("truncated".to_owned(), json!(true));
    }
    sink(FactBody::Signal(SignalFact {
        fact_id: new_id(),
        id: new_id(),
        run_id,
        test_result_id: None,
        kind: SignalKind::Log,
        name: stream_name(stream).to_owned(),
        at: Timestamp::now(),
        value: json!(text),
        attrs,
    }));
}

fn emit_signal_line(
    line: &[u8],
    redactor: &Redactor,
    run_id: Ulid,
    sink: &mut dyn FnMut(FactBody),
) {
    let line = redactor.redact(line);
    let fact = match signals::parse_signal_line(&line) {
        Ok(s) => SignalFact {
            fact_id: new_id(),
            id: new_id(),
            run_id,
            test_result_id: None,
            kind: s.kind,
            name: s.name,
            at: Timestamp::now(),
            value: s.value,
            attrs: s.attrs,
        },
        Err(e) => {
            tracing::warn!("malformed line on LIMINAL_SIGNALS_FD: {e}");
            SignalFact {
                fact_id: new_id(),
                id: new_id(),
                run_id,
                test_result_id: None,
                kind: SignalKind::Log,
                name: "signals".to_owned(),
                at: Timestamp::now(),
                value: json!(String::from_utf8_lossy(&line)),
                attrs: [("error".to_owned(), json!(e.to_string()))].into(),
            }
        }
    };
    sink(FactBody::Signal(fact));
}

/// Removes what runs of a crashed process left: cgroups named with this state
/// dir's [`cgroup_prefix`] under the cgroup parent, libcontainer state, run
/// folders. Call it before starting runs (it assumes no run of this state dir is in progress).
pub fn cleanup_orphans(cfg: &EngineConfig) -> Result<CleanupReport, EngineError> {
    let mut report = CleanupReport::default();
    // First the warm slots a running fork server made for this state dir:
    // one still making its container would write into folders removed
    // below (and, the folders gone, make them again).
    if let Err(e) = prefork::retire(&cfg.helper, &cfg.state_dir.join("containers")) {
        report.errors.push(format!("retiring warm sandboxes: {e}"));
    }
    let runs = cfg.state_dir.join("runs");
    if let Ok(rd) = std::fs::read_dir(&runs) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // The job file names the cgroup the run used.
            if let Ok(bytes) = std::fs::read(e.path().join("job.json")) {
                if let Ok(job) = serde_json::from_slice::<Job>(&bytes) {
                    let errs = job::teardown_cgroup(&job.cgroup_path);
                    if errs.is_empty() {
                        report.cgroups.push(job.cgroup_path.clone());
                    }
                    report.errors.extend(errs);
                    let _ = std::fs::remove_dir_all(job.state_root.join(&job.container_id));
                }
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => report.runs.push(name),
                Err(err) => report
                    .errors
                    .push(format!("removing {}: {err}", e.path().display())),
            }
        }
    }
    // Cgroups whose run folder is already gone.
    let parent = cgroup_parent(cfg);
    let prefix = cgroup_prefix(cfg);
    for h in job::cgroup_hierarchies() {
        let dir = h.join(parent.trim_start_matches('/'));
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && e.path().is_dir() {
                    let path = format!("{}/{}", parent.trim_end_matches('/'), name);
                    let errs = job::teardown_cgroup(&path);
                    if errs.is_empty() && !report.cgroups.contains(&path) {
                        report.cgroups.push(path);
                    }
                    report.errors.extend(errs);
                }
            }
        }
    }
    let containers = cfg.state_dir.join("containers");
    if let Ok(rd) = std::fs::read_dir(&containers) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("liminal-") {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    report
                        .errors
                        .push(format!("removing {}: {err}", e.path().display()));
                }
            }
        }
    }
    // Reproducibility checks' scratch folders, with the disorderfs views a
    // killed check left mounted in them (detached first: removing a folder
    // under a live FUSE mount would walk into the mounted tree).
    let repro = cfg.state_dir.join("repro");
    if repro.is_dir() {
        for m in mounts_under(&repro) {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                report
                    .errors
                    .push(format!("unmounting {}: {e}", m.display()));
            }
        }
        if let Ok(rd) = std::fs::read_dir(&repro) {
            for e in rd.flatten() {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => report
                        .runs
                        .push(e.file_name().to_string_lossy().into_owned()),
                    Err(err) => report
                        .errors
                        .push(format!("removing {}: {err}", e.path().display())),
                }
            }
        }
    }
    // The slots' folder (their cgroups carry this state dir's prefix and
    // went above). A slot keeps its bundle and state in a tmpfs of its own
    // mount namespace, so this is at most an empty folder, or what a helper
    // of an older version left on the disk.
    let warm = job::slots_dir(&cfg.state_dir.join("containers"));
    if warm.is_dir() && mounts_under(&warm).is_empty() {
        if let Err(err) = std::fs::remove_dir_all(&warm) {
            report
                .errors
                .push(format!("removing {}: {err}", warm.display()));
        }
    }
    Ok(report)
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo;
/// its octal escapes of spaces and the like are decoded).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report already written when the helper's exit is seen is kept.
    #[test]
    fn report_read_after_exit_is_kept() {
        let (r, w) = pipe().expect("pipe");
        set_nonblocking(&r);
        let mut report = reader(Stream::Report, r);
        nix::unistd::write(&w, br#"{"outcome":"x"}"#).expect("write");
        drop(w);
        assert!(report_after_exit(&mut report));
        assert_eq!(report.buf, br#"{"outcome":"x"}"#);
        // Nothing more arrives; a second look changes nothing.
        assert!(report_after_exit(&mut report));
        assert_eq!(report.buf.len(), 15);
    }

    /// No report: an empty pipe closed by the helper says so.
    #[test]
    fn no_report_after_exit() {
        let (r, w) = pipe().expect("pipe");
        set_nonblocking(&r);
        let mut report = reader(Stream::Report, r);
        drop(w);
        assert!(!report_after_exit(&mut report));
        assert!(!report.open);
    }
}
