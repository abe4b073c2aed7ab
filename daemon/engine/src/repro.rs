//! Reproducibility verification: build the same plan several times under
//! variations of the environment, compare the artifacts by BLAKE3, and when
//! they differ, find which single variation is responsible (like reprotest's
//! auto mode: one variation at a time).
//!
//! Variations are named as Debian's reprotest names them where they apply
//! (see `docs/reproducibility.md`). The first build (the control) is the
//! plan exactly as a normal run would execute it: its facts go to the sink
//! under the verification's run id, its input digest is the verdict's key.
//!
//! Wall-clock time cannot be offset by a time namespace. The `time`
//! variation therefore (a) offsets CLOCK_MONOTONIC/CLOCK_BOOTTIME by a year,
//! (b) starts the varied build in a later wall-clock second than the build it
//! is compared with ended, so second-resolution timestamps always differ
//! (in the first comparison it starts at the next second beside the control
//! and is built again when the control ran past that second),
//! and (c) preloads libfaketime (`FAKETIME=+373d`) for dynamically linked
//! tools when the host has it. `SOURCE_DATE_EPOCH` is part of the plan's
//! inputs and is never varied.

use crate::artifacts::{Cas, CollectedArtifact};
use crate::runner::{self, CancelHandle, EngineConfig, EngineError, RunRequest, SandboxVariation};
use liminal_facts::{
    new_id, ArtifactDifference, FactBody, ReproVerdictFact, RunFact, RunStatus, Timestamp, Ulid,
};
use liminal_plan::{Mount, Plan};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// personality(2) flags.
const ADDR_NO_RANDOMIZE: u32 = 0x0040000;
const UNAME26: u32 = 0x0020000;
/// Where the host's libfaketime folder appears inside the sandbox.
const FAKETIME_TARGET: &str = "/.liminal-faketime";
const FAKETIME_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime",
    "/usr/lib/aarch64-linux-gnu/faketime",
    "/usr/lib/faketime",
];
/// How long a diffoscope report may take before it is abandoned.
const DIFFOSCOPE_TIMEOUT: Duration = Duration::from_secs(120);

/// One way the environment of a build can differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variation {
    BuildPath,
    Hostname,
    DomainName,
    Time,
    Umask,
    Locales,
    Timezone,
    UserGroup,
    NumCpus,
    Environment,
    Home,
    ExecPath,
    Aslr,
    Kernel,
    FileOrdering,
}

impl Variation {
    pub const ALL: [Variation; 15] = [
        Variation::BuildPath,
        Variation::Hostname,
        Variation::DomainName,
        Variation::Time,
        Variation::Umask,
        Variation::Locales,
        Variation::Timezone,
        Variation::UserGroup,
        Variation::NumCpus,
        Variation::Environment,
        Variation::Home,
        Variation::ExecPath,
        Variation::Aslr,
        Variation::Kernel,
        Variation::FileOrdering,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variation::BuildPath => "build_path",
            Variation::Hostname => "hostname",
            Variation::DomainName => "domain_name",
            Variation::Time => "time",
            Variation::Umask => "umask",
            Variation::Locales => "locales",
            Variation::Timezone => "timezone",
            Variation::UserGroup => "user_group",
            Variation::NumCpus => "num_cpus",
            Variation::Environment => "environment",
            Variation::Home => "home",
            Variation::ExecPath => "exec_path",
            Variation::Aslr => "aslr",
            Variation::Kernel => "kernel",
            Variation::FileOrdering => "fileordering",
        }
    }

    /// Names accepted for this variation: ours, then reprotest's spelling.
    fn lookup(name: &str) -> Option<Vec<Variation>> {
        if let Some(v) = Variation::ALL.iter().find(|v| v.name() == name) {
            return Some(vec![*v]);
        }
        match name {
            // reprotest varies both under one name.
            "domain_host" => Some(vec![Variation::Hostname, Variation::DomainName]),
            "domainname" => Some(vec![Variation::DomainName]),
            "file_ordering" => Some(vec![Variation::FileOrdering]),
            _ => None,
        }
    }
}

impl std::fmt::Display for Variation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReproError {
    #[error("unknown variation {name:?} (known: {known})")]
    UnknownVariation { name: String, known: String },
    #[error("runs must be at least 2 (got {0})")]
    Runs(u32),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the control build did not pass ({status}): {reason}")]
    ControlFailed { status: RunStatus, reason: String },
    #[error(
        "the control build produced no artifacts: the plan's [artifacts] paths matched nothing"
    )]
    NoArtifacts,
    #[error("cancelled")]
    Cancelled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses a variation list as reprotest's `--vary` does: comma-separated
/// names, `+name` adds, `-name` removes, `all`/`-all` add or clear all. An
/// empty list, or one starting with a removal, starts from all variations.
pub fn parse_vary(items: &[String]) -> Result<Vec<Variation>, ReproError> {
    let tokens: Vec<&str> = items
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut set: BTreeSet<Variation> = BTreeSet::new();
    if tokens.first().is_none_or(|t| t.starts_with('-')) {
        set.extend(Variation::ALL);
    }
    for t in tokens {
        let (add, name) = match t.as_bytes()[0] {
            b'-' => (false, &t[1..]),
            b'+' => (true, &t[1..]),
            _ => (true, t),
        };
        let vs = if name == "all" {
            Variation::ALL.to_vec()
        } else {
            Variation::lookup(name).ok_or_else(|| ReproError::UnknownVariation {
                name: name.to_owned(),
                known: Variation::ALL
                    .iter()
                    .map(|v| v.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
        };
        for v in vs {
            if add {
                set.insert(v);
            } else {
                set.remove(&v);
            }
        }
    }
    Ok(set.into_iter().collect())
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Builds in the first comparison (control + runs-1 varied), at least 2.
    pub runs: u32,
    pub vary: Vec<Variation>,
    /// Search for the responsible variation when the builds differ.
    pub culprit_search: bool,
    /// Store a diffoscope report per differing artifact, when installed.
    pub diffoscope: bool,
    /// Builds run at the same time.
    pub parallel: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            runs: 2,
            vary: Variation::ALL.to_vec(),
            culprit_search: true,
            diffoscope: true,
            parallel: default_parallel(),
        }
    }
}

/// Two builds at a time per core: a build is mostly container setup and
/// waiting, and the machines this runs on are small.
pub fn default_parallel() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(2)
        .clamp(2, 8)
}

/// One build of the verification.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildSummary {
    pub run_id: Ulid,
    /// What was varied ("control" for none; "reference" for the extra
    /// unvaried builds of the culprit search).
    pub role: String,
    pub variations: Vec<String>,
    pub status: RunStatus,
    pub input_digest: String,
    pub duration_ms: u64,
    pub artifacts: Vec<CollectedArtifact>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    pub path: String,
    /// One per build of the first comparison, in order; `"absent"` when a
    /// build did not produce it.
    pub digests: Vec<String>,
    /// BLAKE3 (hex, in the CAS) of diffoscope's text report, when installed.
    pub report_blake3: Option<String>,
    pub culprits: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub run_id: Ulid,
    pub input_digest: String,
    pub reproducible: bool,
    pub runs: u32,
    pub variations: Vec<String>,
    /// Requested variations that could not be applied, with the reason.
    pub skipped: Vec<String>,
    pub artifacts_compared: u32,
    pub differing: Vec<Difference>,
    pub culprit: Option<String>,
    pub culprits: Vec<String>,
    pub nondeterministic: bool,
    /// diffoscope missing, culprit search inconclusive, a build that failed.
    pub notes: Vec<String>,
    pub builds: Vec<BuildSummary>,
    pub duration_ms: u64,
}

impl Verdict {
    /// The verdict in one line (the run's reason).
    pub fn summary(&self) -> String {
        if self.reproducible {
            return format!(
                "reproducible: {} artifact(s) identical in {} builds",
                self.artifacts_compared, self.runs
            );
        }
        let paths: Vec<&str> = self.differing.iter().map(|d| d.path.as_str()).collect();
        let why = match (&self.culprit, self.nondeterministic) {
            (Some(c), _) => format!("culprit {c}"),
            (None, true) => "nondeterministic (differs with nothing varied)".to_owned(),
            (None, false) if !self.culprits.is_empty() => {
                format!("culprits {}", self.culprits.join(", "))
            }
            (None, false) if paths.is_empty() => "a varied build did not pass".to_owned(),
            (None, false) => "no single culprit found".to_owned(),
        };
        if paths.is_empty() {
            format!("not reproducible: {why}")
        } else {
            format!("not reproducible: {} differ; {why}", paths.join(", "))
        }
    }

    pub fn to_fact(&self) -> ReproVerdictFact {
        ReproVerdictFact {
            fact_id: new_id(),
            run_id: self.run_id,
            input_digest: self.input_digest.clone(),
            reproducible: self.reproducible,
            variations: self.variations.clone(),
            artifacts_compared: self.artifacts_compared,
            differing: self
                .differing
                .iter()
                .map(|d| ArtifactDifference {
                    path: d.path.clone(),
                    digests: d.digests.clone(),
                    report_blake3: d.report_blake3.clone(),
                    culprits: d.culprits.clone(),
                })
                .collect(),
            culprit: self.culprit.clone(),
            culprits: self.culprits.clone(),
            nondeterministic: self.nondeterministic,
            skipped: self.skipped.clone(),
            valid_at: Timestamp::now(),
        }
    }
}

/// Host tools that some variations need.
#[derive(Debug, Clone, Default)]
pub struct HostTools {
    pub disorderfs: Option<PathBuf>,
    pub faketime_dir: Option<PathBuf>,
    pub diffoscope: Option<PathBuf>,
}

impl HostTools {
    pub fn detect() -> Self {
        Self {
            disorderfs: which("disorderfs"),
            faketime_dir: FAKETIME_DIRS
                .iter()
                .map(PathBuf::from)
                .find(|d| d.join("libfaketime.so.1").is_file()),
            diffoscope: which("diffoscope"),
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// CPUs this process may use.
fn available_cpus() -> u32 {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&i| set.is_set(i).unwrap_or(false))
                .count() as u32
        })
        .unwrap_or(1)
}

/// A prepared build: the plan and sandbox changes for one set of variations.
struct BuildSpec {
    role: String,
    variations: Vec<Variation>,
    plan: Plan,
    sandbox: SandboxVariation,
    /// Not before this wall-clock instant (the `time` variation).
    not_before: Option<SystemTime>,
    /// disorderfs mounts standing in for the plan's input mounts.
    _fuse: Vec<FuseMount>,
}

/// Which variations can be applied here; the others with the reason.
fn applicable(vary: &[Variation], plan: &Plan, tools: &HostTools) -> (Vec<Variation>, Vec<String>) {
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    for &v in vary {
        match v {
            Variation::NumCpus if plan.resources.cpus <= 1 && available_cpus() < 2 => {
                skipped.push("num_cpus: only one CPU is available".into())
            }
            Variation::FileOrdering if tools.disorderfs.is_none() => skipped.push(
                "fileordering: disorderfs is not installed (apt-get install disorderfs)".into(),
            ),
            Variation::FileOrdering if plan.mounts.iter().all(|m| !m.source.is_dir()) => {
                skipped.push("fileordering: the plan has no input folder to reorder".into())
            }
            _ => ok.push(v),
        }
    }
    (ok, skipped)
}

/// Applies `vary` to a copy of the plan; `k` (>= 1) makes each varied build's
/// values distinct.
fn make_spec(
    role: &str,
    base: &Plan,
    vary: &[Variation],
    k: u32,
    tools: &HostTools,
    scratch: &Path,
) -> Result<BuildSpec, ReproError> {
    let mut plan = base.clone();
    let mut sb = SandboxVariation::default();
    let mut fuse = Vec::new();
    for &v in vary {
        match v {
            Variation::BuildPath => {
                let new = format!("/liminal-build-{k}{}", plan.workdir);
                if let Some(p) = plan.results.path.as_mut() {
                    if let Some(rest) = p.strip_prefix(&plan.workdir) {
                        if rest.is_empty() || rest.starts_with('/') {
                            *p = format!("{new}{rest}");
                        }
                    }
                }
                plan.workdir = new;
            }
            Variation::Hostname => {
                let h = format!("liminal-varied-{k}");
                plan.env.insert("HOSTNAME".into(), h.clone());
                sb.hostname = Some(h);
            }
            Variation::DomainName => sb.domainname = Some(format!("varied-{k}.invalid")),
            Variation::Time => {
                sb.clock_offset_secs = i64::from(k) * 373 * 86_400;
                if let Some(dir) = &tools.faketime_dir {
                    plan.mounts.push(Mount {
                        source: dir.clone(),
                        target: FAKETIME_TARGET.into(),
                        readonly: true,
                    });
                    plan.env.insert(
                        "LD_PRELOAD".into(),
                        format!("{FAKETIME_TARGET}/libfaketime.so.1"),
                    );
                    plan.env.insert("FAKETIME".into(), format!("+{}d", 373 * k));
                }
            }
            Variation::Umask => sb.umask = Some(0o002),
            Variation::Locales => {
                for var in ["LANG", "LC_ALL"] {
                    plan.env.insert(var.into(), "fr_CH.UTF-8".into());
                }
                plan.env.insert("LANGUAGE".into(), "fr_CH:fr".into());
            }
            Variation::Timezone => {
                let tz = if k % 2 == 1 { "GMT-14" } else { "GMT+12" };
                plan.env.insert("TZ".into(), tz.into());
            }
            Variation::UserGroup => {
                let id = 1000 + k;
                sb.user = Some((id, id));
                plan.env.insert("USER".into(), format!("builder{k}"));
            }
            Variation::NumCpus => {
                let cpus = plan.resources.cpus;
                plan.resources.cpus = if cpus > 1 { cpus - 1 } else { 2 };
            }
            Variation::Environment => {
                plan.env.insert(
                    "LIMINAL_REPRO_CAPTURE_ENVIRONMENT".into(),
                    format!("i_capture_the_environment_{k}"),
                );
            }
            Variation::Home => {
                plan.env
                    .insert("HOME".into(), format!("/nonexistent/liminal-home-{k}"));
            }
            Variation::ExecPath => {
                let path = plan
                    .env
                    .get("PATH")
                    .cloned()
                    .unwrap_or_else(|| runner::DEFAULT_PATH.to_owned());
                plan.env
                    .insert("PATH".into(), format!("{path}:/i_capture_the_path"));
            }
            Variation::Aslr => sb.personality |= ADDR_NO_RANDOMIZE,
            Variation::Kernel => sb.personality |= UNAME26,
            Variation::FileOrdering => {
                if let Some(bin) = &tools.disorderfs {
                    for (i, m) in plan.mounts.iter_mut().enumerate() {
                        if m.source.is_dir() {
                            let at = scratch.join(format!("disorder-{role}-{k}-{i}"));
                            let mount = FuseMount::mount(bin, &m.source, &at)?;
                            m.source = at;
                            fuse.push(mount);
                        }
                    }
                }
            }
        }
    }
    Ok(BuildSpec {
        role: role.to_owned(),
        variations: vary.to_vec(),
        plan,
        sandbox: sb,
        not_before: None,
        _fuse: fuse,
    })
}

/// A disorderfs view of a folder (directory entries shuffled), unmounted on drop.
struct FuseMount {
    at: PathBuf,
}

impl FuseMount {
    fn mount(bin: &Path, source: &Path, at: &Path) -> Result<Self, ReproError> {
        std::fs::create_dir_all(at).map_err(|source| ReproError::Io {
            what: format!("creating {}", at.display()),
            source,
        })?;
        let out = Command::new(bin)
            .args([
                "--shuffle-dirents=yes",
                "--multi-user=yes",
                "-o",
                "allow_other,ro",
            ])
            .arg(source)
            .arg(at)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ReproError::Io {
                what: "running disorderfs".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(ReproError::Io {
                what: format!(
                    "disorderfs {}: {}",
                    source.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                source: std::io::Error::other("mount failed"),
            });
        }
        Ok(Self { at: at.to_owned() })
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        // Lazy: a build's helper may still hold it for a moment.
        if let Err(e) = nix::mount::umount2(&self.at, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting disorderfs at {}: {e}", self.at.display());
        }
        let _ = std::fs::remove_dir(&self.at);
    }
}

struct Built {
    summary: BuildSummary,
    started: SystemTime,
    ended: SystemTime,
}

impl Built {
    fn digests(&self) -> BTreeMap<&str, &str> {
        self.summary
            .artifacts
            .iter()
            .map(|a| (a.path.as_str(), a.blake3.as_str()))
            .collect()
    }
    fn digest_of(&self, path: &str) -> String {
        self.digests()
            .get(path)
            .map_or_else(|| "absent".to_owned(), |d| (*d).to_owned())
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Sleeps until the wall clock is past `t`'s second.
fn sleep_past_second_of(t: SystemTime) {
    let next = UNIX_EPOCH + Duration::from_secs(unix_secs(t) + 1) + Duration::from_millis(5);
    if let Ok(d) = next.duration_since(SystemTime::now()) {
        std::thread::sleep(d);
    }
}

fn build_one(
    cfg: &EngineConfig,
    spec: &BuildSpec,
    run_id: Ulid,
    fd_secrets: BTreeMap<String, OwnedFd>,
    sink: &mut dyn FnMut(FactBody),
    cancel: &CancelHandle,
) -> Result<Built, ReproError> {
    if let Some(t) = spec.not_before {
        if let Ok(d) = t.duration_since(SystemTime::now()) {
            std::thread::sleep(d);
        }
    }
    let span = tracing::info_span!("build", %run_id, role = %spec.role);
    let _e = span.enter();
    let t = Instant::now();
    let started = SystemTime::now();
    let outcome = runner::run_varied(
        cfg,
        RunRequest {
            run_id,
            plan: spec.plan.clone(),
            fd_secrets,
        },
        &spec.sandbox,
        sink,
        cancel,
    )?;
    let ended = SystemTime::now();
    Ok(Built {
        summary: BuildSummary {
            run_id,
            role: spec.role.clone(),
            variations: spec
                .variations
                .iter()
                .map(|v| v.name().to_owned())
                .collect(),
            status: outcome.status,
            input_digest: outcome.input_digest,
            duration_ms: t.elapsed().as_millis() as u64,
            artifacts: outcome.artifacts,
        },
        started,
        ended,
    })
}

/// Fresh descriptors for the plan's `fd` secrets, one set per build: each
/// build reads its own open file description of the same sealed memfd.
struct FdSecrets {
    sealed: Vec<crate::secrets::SealedSecret>,
}

impl FdSecrets {
    fn load(
        plan: &Plan,
        passed: BTreeMap<String, OwnedFd>,
        cfg: &EngineConfig,
    ) -> Result<Self, ReproError> {
        if passed.is_empty() {
            return Ok(Self { sealed: Vec::new() });
        }
        let fd_only: Vec<_> = plan
            .secrets
            .iter()
            .filter(|s| passed.contains_key(&s.name))
            .cloned()
            .collect();
        let sealed = crate::secrets::load(&fd_only, passed, cfg.credentials_dir.as_deref())
            .map_err(EngineError::from)?;
        Ok(Self { sealed })
    }
    fn fresh(&self) -> Result<BTreeMap<String, OwnedFd>, ReproError> {
        use std::os::fd::AsRawFd;
        let mut out = BTreeMap::new();
        for s in &self.sealed {
            let path = format!("/proc/self/fd/{}", s.fd.as_raw_fd());
            let f = std::fs::File::open(&path).map_err(|source| ReproError::Io {
                what: format!("reopening secret {}", s.name),
                source,
            })?;
            out.insert(s.name.clone(), OwnedFd::from(f));
        }
        Ok(out)
    }
}

/// Runs `specs` with at most `parallel` at a time; results in order.
fn build_all(
    cfg: &EngineConfig,
    specs: &[BuildSpec],
    secrets: &FdSecrets,
    parallel: usize,
    cancel: &CancelHandle,
) -> Vec<Result<Built, ReproError>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Built, ReproError>>>> =
        Mutex::new((0..specs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1).min(specs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(spec) = specs.get(i) else { break };
                let r = if cancel.is_cancelled() {
                    Err(ReproError::Cancelled)
                } else {
                    secrets
                        .fresh()
                        .and_then(|fds| build_one(cfg, spec, new_id(), fds, &mut |_| {}, cancel))
                };
                if let Ok(mut g) = results.lock() {
                    g[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or(Err(ReproError::Cancelled)))
        .collect()
}

/// Builds the plan `opts.runs` times (the control plus varied builds, at the
/// same time), compares artifacts, searches the culprit, and emits through
/// `sink` the control build's facts under `run_id`, then the verdict, then
/// the run's final fact: `passed` when reproducible, else `failed`, with the
/// verdict in words as its reason. (The control's own final fact is held
/// back until then, so a watcher never sees the run end before its verdict;
/// when the verification fails it is released as it was.)
pub fn verify(
    cfg: &EngineConfig,
    run_id: Ulid,
    plan: Plan,
    fd_secrets: BTreeMap<String, OwnedFd>,
    opts: &VerifyOptions,
    sink: &mut dyn FnMut(FactBody),
    cancel: &CancelHandle,
) -> Result<Verdict, ReproError> {
    let span = tracing::info_span!("verify", %run_id, plan = %plan.name);
    let _e = span.enter();
    let mut held: Option<RunFact> = None;
    let result = verify_inner(cfg, run_id, plan, fd_secrets, opts, sink, &mut held, cancel);
    match (&result, held) {
        (Ok(v), Some(mut last)) => {
            sink(FactBody::ReproVerdict(v.to_fact()));
            let now = Timestamp::now();
            last.fact_id = new_id();
            last.status = if v.reproducible {
                RunStatus::Passed
            } else {
                RunStatus::Failed
            };
            last.reason = Some(v.summary());
            last.finished_at = Some(now);
            last.valid_at = now;
            sink(FactBody::Run(last));
        }
        (Ok(v), None) => sink(FactBody::ReproVerdict(v.to_fact())),
        (Err(_), Some(last)) => sink(FactBody::Run(last)),
        (Err(_), None) => {}
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn verify_inner(
    cfg: &EngineConfig,
    run_id: Ulid,
    plan: Plan,
    fd_secrets: BTreeMap<String, OwnedFd>,
    opts: &VerifyOptions,
    sink: &mut dyn FnMut(FactBody),
    held: &mut Option<RunFact>,
    cancel: &CancelHandle,
) -> Result<Verdict, ReproError> {
    if opts.runs < 2 {
        return Err(ReproError::Runs(opts.runs));
    }
    let t0 = Instant::now();
    let tools = HostTools::detect();
    let (vary, skipped) = applicable(&opts.vary, &plan, &tools);
    let mut notes = Vec::new();
    if vary.contains(&Variation::Time) && tools.faketime_dir.is_none() {
        notes.push("time: libfaketime not installed; wall-clock time varied by running in a later second only".into());
    }
    let secrets = FdSecrets::load(&plan, fd_secrets, cfg)?;
    let scratch = cfg.state_dir.join("repro").join(run_id.to_string());
    std::fs::create_dir_all(&scratch).map_err(|source| ReproError::Io {
        what: format!("creating {}", scratch.display()),
        source,
    })?;
    let _scratch_guard = RemoveOnDrop(scratch.clone());
    let (mut vary, mut skipped) = (vary, skipped);
    if vary.contains(&Variation::FileOrdering) {
        // A FUSE mount can be refused (no /dev/fuse in a confined service):
        // then say so instead of failing the whole verification.
        let probe = tools.disorderfs.as_deref().and_then(|bin| {
            let src = plan.mounts.iter().find(|m| m.source.is_dir())?;
            Some(FuseMount::mount(
                bin,
                &src.source,
                &scratch.join("disorder-probe"),
            ))
        });
        if let Some(Err(e)) = probe {
            vary.retain(|v| *v != Variation::FileOrdering);
            skipped.push(format!("fileordering: disorderfs could not mount: {e}"));
        }
    }

    // First comparison: the control here (its facts are the run's), the
    // varied builds beside it.
    let control_spec = make_spec("control", &plan, &[], 0, &tools, &scratch)?;
    let mut varied = Vec::new();
    for k in 1..opts.runs {
        varied.push(make_spec(
            &format!("varied-{k}"),
            &plan,
            &vary,
            k,
            &tools,
            &scratch,
        )?);
    }
    let time_varied = vary.contains(&Variation::Time);
    if time_varied {
        // The varied builds start at the next wall-clock second, beside the
        // control: when the control is over by then (checked below), no
        // second it could read is one they can (see the module doc).
        let next = UNIX_EPOCH + Duration::from_secs(unix_secs(SystemTime::now()) + 1);
        for spec in &mut varied {
            spec.not_before = Some(next + Duration::from_millis(5));
        }
    }
    let (control, others) = std::thread::scope(|s| {
        let handle = s.spawn(|| {
            build_all(
                cfg,
                &varied,
                &secrets,
                opts.parallel.saturating_sub(1).max(1),
                cancel,
            )
        });
        let control = secrets.fresh().and_then(|fds| {
            let mut control_sink = |f: FactBody| match f {
                FactBody::Run(r) if r.finished_at.is_some() => *held = Some(r),
                other => sink(other),
            };
            build_one(cfg, &control_spec, run_id, fds, &mut control_sink, cancel)
        });
        let others = handle.join().ok();
        (control, others)
    });
    let control = control?;
    if control.summary.status != RunStatus::Passed {
        return Err(ReproError::ControlFailed {
            status: control.summary.status,
            reason: "see the run's log".into(),
        });
    }
    if control.summary.artifacts.is_empty() {
        return Err(ReproError::NoArtifacts);
    }
    let same_second = |others: &[Result<Built, ReproError>]| {
        others.iter().any(|b| {
            b.as_ref()
                .is_ok_and(|b| unix_secs(b.started) <= unix_secs(control.ended))
        })
    };
    let others = match others {
        Some(o) if !(time_varied && same_second(&o)) => o,
        _ => {
            // The control ran into the varied builds' second (or their
            // thread died): build them again once its last second is over.
            for spec in &mut varied {
                spec.not_before = None;
            }
            sleep_past_second_of(control.ended);
            build_all(cfg, &varied, &secrets, opts.parallel, cancel)
        }
    };
    drop(varied);
    let mut builds = vec![control];
    for r in others {
        builds.push(r?);
    }
    for b in &builds[1..] {
        if b.summary.status != RunStatus::Passed {
            notes.push(format!(
                "build {} ({}) ended {}",
                b.summary.run_id, b.summary.role, b.summary.status
            ));
        }
    }

    // Compare by BLAKE3.
    let mut paths: BTreeSet<String> = BTreeSet::new();
    for b in &builds {
        paths.extend(b.summary.artifacts.iter().map(|a| a.path.clone()));
    }
    let mut differing: Vec<Difference> = Vec::new();
    for p in &paths {
        let digests: Vec<String> = builds.iter().map(|b| b.digest_of(p)).collect();
        if digests.iter().any(|d| d != &digests[0]) {
            differing.push(Difference {
                path: p.clone(),
                digests,
                report_blake3: None,
                culprits: Vec::new(),
            });
        }
    }
    let failed_build = builds.iter().any(|b| b.summary.status != RunStatus::Passed);
    let reproducible = differing.is_empty() && !failed_build;

    // Diffoscope reports, stored in the CAS.
    if !differing.is_empty() && opts.diffoscope {
        match (&tools.diffoscope, Cas::open(&cfg.state_dir.join("cas"))) {
            (Some(bin), Ok(cas)) => {
                for d in differing.iter_mut() {
                    let other = d.digests.iter().find(|x| *x != &d.digests[0]);
                    if let (Some(other), false) = (other, d.digests[0] == "absent") {
                        if other != "absent" {
                            d.report_blake3 =
                                diffoscope(bin, &cas, &d.path, &d.digests[0], other, &mut notes);
                        }
                    }
                }
            }
            (None, _) => notes.push("diffoscope is not installed: no difference reports".into()),
            (_, Err(e)) => notes.push(format!("opening the CAS for diffoscope reports: {e}")),
        }
    }

    // Culprit search: one variation at a time.
    let mut nondeterministic = false;
    let mut culprits: BTreeSet<String> = BTreeSet::new();
    if !differing.is_empty() && opts.culprit_search {
        let search = search_culprits(
            cfg, &plan, &vary, &tools, &scratch, &secrets, opts, cancel, &differing, &mut notes,
        )?;
        for (d, found) in differing.iter_mut().zip(search.per_artifact) {
            d.culprits = found;
        }
        nondeterministic = search.nondeterministic;
        for d in &differing {
            for c in &d.culprits {
                if c != "nondeterministic" {
                    culprits.insert(c.clone());
                }
            }
        }
        builds.extend(search.builds);
    }
    let culprits: Vec<String> = culprits.into_iter().collect();
    let culprit = (culprits.len() == 1 && !nondeterministic).then(|| culprits[0].clone());
    let verdict = Verdict {
        run_id,
        input_digest: builds[0].summary.input_digest.clone(),
        reproducible,
        runs: opts.runs,
        variations: vary.iter().map(|v| v.name().to_owned()).collect(),
        skipped,
        artifacts_compared: paths.len() as u32,
        differing,
        culprit,
        culprits,
        nondeterministic,
        notes,
        builds: builds.into_iter().map(|b| b.summary).collect(),
        duration_ms: t0.elapsed().as_millis() as u64,
    };
    tracing::info!(
        reproducible = verdict.reproducible,
        culprit = ?verdict.culprit,
        "verification finished"
    );
    Ok(verdict)
}

struct Search {
    per_artifact: Vec<Vec<String>>,
    nondeterministic: bool,
    builds: Vec<Built>,
}

/// Two unvaried reference builds and one build per variation, all started
/// together just after a wall-clock second begins (so none but `time`'s sees
/// another second); `time`'s build starts after the references' second.
#[allow(clippy::too_many_arguments)]
fn search_culprits(
    cfg: &EngineConfig,
    plan: &Plan,
    vary: &[Variation],
    tools: &HostTools,
    scratch: &Path,
    secrets: &FdSecrets,
    opts: &VerifyOptions,
    cancel: &CancelHandle,
    differing: &[Difference],
    notes: &mut Vec<String>,
) -> Result<Search, ReproError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut specs = vec![
            make_spec("reference", plan, &[], 0, tools, scratch)?,
            make_spec("reference", plan, &[], 0, tools, scratch)?,
        ];
        for &v in vary.iter().filter(|v| **v != Variation::Time) {
            specs.push(make_spec(
                &format!("only {v}"),
                plan,
                &[v],
                1,
                tools,
                scratch,
            )?);
        }
        sleep_past_second_of(SystemTime::now());
        let mut built = Vec::new();
        for r in build_all(cfg, &specs, secrets, opts.parallel, cancel) {
            built.push(r?);
        }
        drop(specs);
        let time_build = if vary.contains(&Variation::Time) {
            let mut spec = make_spec("only time", plan, &[Variation::Time], 1, tools, scratch)?;
            let refs_end = built[..2]
                .iter()
                .map(|b| b.ended)
                .max()
                .unwrap_or_else(SystemTime::now);
            spec.not_before = Some(UNIX_EPOCH + Duration::from_secs(unix_secs(refs_end) + 1));
            Some(build_one(
                cfg,
                &spec,
                new_id(),
                secrets.fresh()?,
                &mut |_| {},
                cancel,
            )?)
        } else {
            None
        };
        let reference = &built[0];
        // Two builds saw the same wall-clock second throughout.
        let one_second = |a: &Built, b: &Built| {
            let s = unix_secs(a.started);
            [a.ended, b.started, b.ended]
                .iter()
                .all(|t| unix_secs(*t) == s)
        };
        let mut per_artifact = Vec::new();
        let mut nondeterministic = false;
        let mut inconclusive = false;
        let mut unattributable = 0;
        for d in differing {
            let want = reference.digest_of(&d.path);
            // Changes with the wall clock alone (its build ran seconds later).
            let time_sensitive = time_build
                .as_ref()
                .is_some_and(|t| t.digest_of(&d.path) != want);
            if built[1].digest_of(&d.path) != want {
                if one_second(reference, &built[1]) || !time_sensitive {
                    nondeterministic = true;
                    per_artifact.push(vec!["nondeterministic".to_owned()]);
                } else {
                    inconclusive = true;
                    per_artifact.push(Vec::new());
                }
                continue;
            }
            let mut found = Vec::new();
            if time_sensitive {
                found.push(Variation::Time.name().to_owned());
            }
            for b in &built[2..] {
                if b.digest_of(&d.path) == want {
                    continue;
                }
                if time_sensitive && !one_second(reference, b) {
                    // A timestamp of another second explains it as well.
                    unattributable += 1;
                    continue;
                }
                found.extend(b.summary.variations.iter().cloned());
            }
            per_artifact.push(found);
        }
        if inconclusive && attempt < 2 {
            tracing::info!("culprit search references straddled a second boundary; repeating it");
            continue;
        }
        if inconclusive {
            notes.push("culprit search: the two reference builds differ but ran in different wall-clock seconds of a time-sensitive build; no culprit named".into());
        }
        if unattributable > 0 {
            notes.push(format!("culprit search: {unattributable} single-variation build(s) of a time-sensitive artifact ran in another wall-clock second than the reference and were not blamed"));
        }
        built.extend(time_build);
        return Ok(Search {
            per_artifact,
            nondeterministic,
            builds: built,
        });
    }
}

fn diffoscope(
    bin: &Path,
    cas: &Cas,
    path: &str,
    a: &str,
    b: &str,
    notes: &mut Vec<String>,
) -> Option<String> {
    // Named like the artifact, so diffoscope recognises the format.
    let dir = tempfile::tempdir().ok()?;
    let name = Path::new(path)
        .file_name()
        .map_or_else(|| "artifact".into(), |n| n.to_owned());
    let (da, db) = (dir.path().join("control"), dir.path().join("varied"));
    std::fs::create_dir_all(&da).ok()?;
    std::fs::create_dir_all(&db).ok()?;
    let (fa, fb) = (da.join(&name), db.join(&name));
    std::fs::copy(cas.path_of(a), &fa).ok()?;
    std::fs::copy(cas.path_of(b), &fb).ok()?;
    let mut child = Command::new(bin)
        .args(["--text", "-", "--no-progress"])
        .arg(&fa)
        .arg(&fb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut out = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut buf);
        buf
    });
    let deadline = Instant::now() + DIFFOSCOPE_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                notes.push(format!("diffoscope on {path} timed out"));
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
    let report = reader.join().ok()?;
    match cas.put_bytes(&report) {
        Ok((hex, _)) => Some(hex),
        Err(e) => {
            notes.push(format!("storing the diffoscope report of {path}: {e}"));
            None
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Result<Vec<Variation>, ReproError> {
        parse_vary(&[s.to_owned()])
    }

    #[test]
    fn vary_lists() {
        assert_eq!(v("").unwrap(), Variation::ALL.to_vec());
        assert_eq!(
            v("hostname,umask").unwrap(),
            vec![Variation::Hostname, Variation::Umask]
        );
        assert_eq!(v("-all,+time").unwrap(), vec![Variation::Time]);
        assert_eq!(v("-time").unwrap().len(), Variation::ALL.len() - 1);
        assert_eq!(
            v("domain_host").unwrap(),
            vec![Variation::Hostname, Variation::DomainName]
        );
        match v("hostname,bogus") {
            Err(ReproError::UnknownVariation { name, .. }) => assert_eq!(name, "bogus"),
            other => panic!("{other:?}"),
        }
    }
}
