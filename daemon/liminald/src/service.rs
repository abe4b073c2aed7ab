//! The D-Bus surface (CONTRACTS: Manager at /org/liminalqa/Liminal1, run
//! objects under /org/liminalqa/Liminal1/run/<id>).

use crate::auth::Action;
use crate::daemon::Shared;
use crate::error::{BusError, INVALID_ARGS, INVALID_PLAN, SECRET_REJECTED, TRIMMED};
use crate::spooler::Spooled;
use crate::state::Changed;
use liminal_facts::Ulid;
use liminal_plan::{Plan, PlanSource, SecretSource};
use liminal_spool::SpoolError;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{self, OwnedObjectPath, OwnedValue, Value};
use zbus::{interface, Connection};

pub const BUS_NAME: &str = "org.liminalqa.Liminal1";
pub const MANAGER_PATH: &str = "/org/liminalqa/Liminal1";
pub const MANAGER_IFACE: &str = "org.liminalqa.Liminal1.Manager";
pub const RUN_IFACE: &str = "org.liminalqa.Liminal1.Run";
/// FactsSince returns at most this many facts per call.
pub const FACTS_CAP: u32 = 10_000;
/// FactsAppended carries at most this many facts per signal.
pub const SIGNAL_BATCH: usize = 512;

pub fn run_path(id: &Ulid) -> String {
    format!("{MANAGER_PATH}/run/{id}")
}

fn parse_run_id(s: &str) -> Result<Ulid, BusError> {
    Ulid::from_string(s).map_err(|_| BusError::not_found(s))
}

pub struct Manager {
    pub shared: Arc<Shared>,
}

#[interface(name = "org.liminalqa.Liminal1.Manager")]
impl Manager {
    /// Validates and queues a plan; secrets declared `from = "fd"` come as
    /// descriptors keyed by secret name.
    #[zbus(out_args("run_id", "run_path"))]
    async fn start_run(
        &self,
        plan_toml: String,
        secret_fds: HashMap<String, zvariant::OwnedFd>,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, OwnedObjectPath), BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::StartRun)
            .await?;
        let (plan, fd_secrets) = self.admit(&plan_toml, secret_fds, &options).await?;
        let run_id = self.shared.start_run(plan, fd_secrets).await?;
        let path = OwnedObjectPath::try_from(run_path(&run_id))
            .map_err(|e| BusError::failed(format!("object path: {e}")))?;
        Ok((run_id.to_string(), path))
    }

    /// Builds the plan `runs` times (default 2) under variations (`vary`,
    /// reprotest's names; default all) and compares the artifacts: a run
    /// like StartRun's whose facts end with a `repro_verdict`.
    #[zbus(out_args("run_id", "run_path"))]
    async fn verify_reproducible(
        &self,
        plan_toml: String,
        secret_fds: HashMap<String, zvariant::OwnedFd>,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(String, OwnedObjectPath), BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::StartRun)
            .await?;
        let verify = crate::daemon::verify::options(&options)?;
        let (plan, fd_secrets) = self.admit(&plan_toml, secret_fds, &options).await?;
        let run_id = self
            .shared
            .start_run_or_verify(plan, fd_secrets, Some(verify))
            .await?;
        let path = OwnedObjectPath::try_from(run_path(&run_id))
            .map_err(|e| BusError::failed(format!("object path: {e}")))?;
        Ok((run_id.to_string(), path))
    }

    async fn cancel_run(
        &self,
        run_id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::CancelRun)
            .await?;
        let id = parse_run_id(&run_id)?;
        self.shared.cancel_run(&id, "cancelled by request").await?;
        Ok(())
    }

    /// (run_id, plan_name, status, input_digest, started_at_us)
    async fn list_runs(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, String, String, u64)>, BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::Read)
            .await?;
        Ok(self.shared.list_runs())
    }

    /// The run as `limctl --json` prints it.
    async fn get_run(
        &self,
        run_id: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::Read)
            .await?;
        let id = parse_run_id(&run_id)?;
        self.shared
            .with_run(&id, |r| r.to_json().to_string())
            .ok_or_else(|| BusError::not_found(&run_id))
    }

    /// Facts with seq > after_seq, in order, at most `max` (0 or more than
    /// 10000 mean 10000).
    async fn facts_since(
        &self,
        after_seq: u64,
        max: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(u64, String, String)>, BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::Read)
            .await?;
        let max = if max == 0 || max > FACTS_CAP {
            FACTS_CAP
        } else {
            max
        };
        let spool = Arc::clone(&self.shared.spool);
        tokio::task::spawn_blocking(move || spool.read_since(after_seq, max as usize))
            .await
            .map_err(|e| BusError::failed(e.to_string()))?
            .map_err(spool_error)
    }

    /// The consumer committed every fact up to `seq`: the spool may drop them.
    async fn ack_facts(
        &self,
        seq: u64,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.shared
            .settings
            .auth
            .check(conn, &hdr, Action::Read)
            .await?;
        let spool = Arc::clone(&self.shared.spool);
        tokio::task::spawn_blocking(move || spool.ack(seq))
            .await
            .map_err(|e| BusError::failed(e.to_string()))?
            .map_err(spool_error)
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    #[zbus(property)]
    fn spool_id(&self) -> String {
        self.shared.spool.spool_id().to_string()
    }

    #[zbus(property)]
    fn active_runs(&self) -> u32 {
        self.shared.active.load(Ordering::Relaxed)
    }

    #[zbus(property)]
    fn queued_runs(&self) -> u32 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    #[zbus(property)]
    fn last_seq(&self) -> u64 {
        self.shared.spool.last_seq()
    }

    /// Facts made durable, in batches of at most 512.
    #[zbus(signal)]
    async fn facts_appended(
        emitter: &SignalEmitter<'_>,
        facts: &[(u64, &str, &str)],
    ) -> zbus::Result<()>;
}

impl Manager {
    /// What StartRun and VerifyReproducible share before a run is queued:
    /// the plan parsed (relative paths against the `plan_path` option) and
    /// the passed secret descriptors checked.
    async fn admit(
        &self,
        plan_toml: &str,
        secret_fds: HashMap<String, zvariant::OwnedFd>,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<(Plan, BTreeMap<String, OwnedFd>), BusError> {
        let plan_path = match options.get("plan_path") {
            Some(v) => Some(PathBuf::from(
                String::try_from(
                    v.try_clone()
                        .map_err(|e| BusError::new(INVALID_ARGS, format!("plan_path: {e}")))?,
                )
                .map_err(|_| {
                    BusError::new(INVALID_ARGS, "option plan_path must be a string (s)")
                })?,
            )),
            None => None,
        };
        let plan = parse_plan(plan_toml, plan_path.as_deref())?;
        let passed: BTreeMap<String, OwnedFd> = secret_fds
            .into_iter()
            .map(|(k, v)| (k, OwnedFd::from(v)))
            .collect();
        let fd_secrets = check_secrets(
            &plan,
            passed,
            self.shared.settings.engine.credentials_dir.clone(),
        )
        .await?;
        Ok((plan, fd_secrets))
    }
}

fn spool_error(e: SpoolError) -> BusError {
    match e {
        SpoolError::Trimmed { .. } => BusError::new(TRIMMED, e.to_string()),
        SpoolError::AckBeyondEnd { .. } => BusError::new(INVALID_ARGS, e.to_string()),
        SpoolError::Full { .. } => BusError::new(crate::error::SPOOL_FULL, e.to_string()),
        other => BusError::failed(other.to_string()),
    }
}

fn parse_plan(text: &str, plan_path: Option<&Path>) -> Result<Plan, BusError> {
    let (file, base) = match plan_path {
        Some(p) => {
            let base = p
                .parent()
                .filter(|b| !b.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (p.to_path_buf(), base)
        }
        // Without a path, relative host paths resolve against "/".
        None => (PathBuf::from("<dbus>"), PathBuf::from("/")),
    };
    Plan::parse(
        text,
        &PlanSource {
            file: &file,
            base_dir: &base,
        },
    )
    .map_err(|e| BusError::new(INVALID_PLAN, e.to_string()))
}

/// Runs the engine's secret checks now, so a bad descriptor fails StartRun
/// instead of the run; returns sealed copies of the `fd` secrets (the
/// caller's descriptors are closed here).
async fn check_secrets(
    plan: &Plan,
    passed: BTreeMap<String, OwnedFd>,
    creds: Option<PathBuf>,
) -> Result<BTreeMap<String, OwnedFd>, BusError> {
    let secrets = plan.secrets.clone();
    let sealed = tokio::task::spawn_blocking(move || {
        liminal_engine::secrets::load(&secrets, passed, creds.as_deref())
    })
    .await
    .map_err(|e| BusError::failed(e.to_string()))?
    .map_err(|e| BusError::new(SECRET_REJECTED, e.to_string()))?;
    Ok(sealed
        .into_iter()
        .filter(|s| {
            plan.secrets
                .iter()
                .any(|p| p.name == s.name && matches!(p.from, SecretSource::Fd))
        })
        .map(|s| (s.name, s.fd))
        .collect())
}

/// A run's live view.
pub struct RunObject {
    pub shared: Arc<Shared>,
    pub run_id: Ulid,
}

#[interface(name = "org.liminalqa.Liminal1.Run")]
impl RunObject {
    #[zbus(property)]
    fn run_id(&self) -> String {
        self.run_id.to_string()
    }

    #[zbus(property)]
    fn state(&self) -> String {
        self.shared
            .with_run(&self.run_id, |r| r.status.as_str().to_owned())
            .unwrap_or_default()
    }

    #[zbus(property)]
    fn progress(&self) -> f64 {
        self.shared
            .with_run(&self.run_id, |r| r.progress())
            .unwrap_or(0.0)
    }

    #[zbus(property)]
    fn passed(&self) -> u32 {
        self.shared
            .with_run(&self.run_id, |r| r.passed())
            .unwrap_or(0)
    }

    #[zbus(property)]
    fn failed(&self) -> u32 {
        self.shared
            .with_run(&self.run_id, |r| r.failed())
            .unwrap_or(0)
    }

    #[zbus(property)]
    fn input_digest(&self) -> String {
        self.shared
            .with_run(&self.run_id, |r| r.input_digest.clone())
            .unwrap_or_default()
    }

    #[zbus(property)]
    fn plan_name(&self) -> String {
        self.shared
            .with_run(&self.run_id, |r| r.plan_name.clone())
            .unwrap_or_default()
    }
}

pub async fn emit_facts(conn: &Connection, batch: &[Spooled]) {
    let Ok(emitter) = SignalEmitter::new(conn, MANAGER_PATH) else {
        return;
    };
    for chunk in batch.chunks(SIGNAL_BATCH) {
        let wire: Vec<(u64, &str, &str)> = chunk
            .iter()
            .map(|s| (s.seq, s.kind, s.json.as_str()))
            .collect();
        if let Err(e) = Manager::facts_appended(&emitter, &wire).await {
            tracing::warn!(error = %e, "cannot emit FactsAppended");
        }
    }
}

async fn properties_changed(
    conn: &Connection,
    path: &str,
    iface: &'static str,
    changed: HashMap<&str, Value<'_>>,
) {
    if changed.is_empty() {
        return;
    }
    let Ok(emitter) = SignalEmitter::new(conn, path.to_owned()) else {
        return;
    };
    let name = InterfaceName::from_static_str_unchecked(iface);
    if let Err(e) =
        zbus::fdo::Properties::properties_changed(&emitter, name, changed, Cow::Borrowed(&[])).await
    {
        tracing::debug!(error = %e, path, "cannot emit PropertiesChanged");
    }
}

pub async fn emit_run_changes(shared: &Shared, conn: &Connection, id: &Ulid, c: Changed) {
    let Some(changed) = shared.with_run(id, |r| {
        let mut m: HashMap<&str, Value<'static>> = HashMap::new();
        if c.state {
            m.insert("State", Value::from(r.status.as_str().to_owned()));
        }
        if c.progress {
            m.insert("Progress", Value::from(r.progress()));
        }
        if c.passed {
            m.insert("Passed", Value::from(r.passed()));
        }
        if c.failed {
            m.insert("Failed", Value::from(r.failed()));
        }
        if c.input_digest {
            m.insert("InputDigest", Value::from(r.input_digest.clone()));
        }
        m
    }) else {
        return;
    };
    properties_changed(conn, &run_path(id), RUN_IFACE, changed).await;
}

pub async fn emit_manager_counters(conn: &Connection, active: u32, queued: u32) {
    let mut m = HashMap::new();
    m.insert("ActiveRuns", Value::from(active));
    m.insert("QueuedRuns", Value::from(queued));
    properties_changed(conn, MANAGER_PATH, MANAGER_IFACE, m).await;
}

pub async fn emit_last_seq(conn: &Connection, last_seq: u64) {
    let mut m = HashMap::new();
    m.insert("LastSeq", Value::from(last_seq));
    properties_changed(conn, MANAGER_PATH, MANAGER_IFACE, m).await;
}

/// Exports an object for every run known at start (recovered from the spool).
/// Removes the D-Bus object of a run whose record was evicted.
pub async fn unexport_run(conn: &Connection, id: &Ulid) {
    if let Err(e) = conn
        .object_server()
        .remove::<RunObject, _>(run_path(id))
        .await
    {
        tracing::debug!(run_id = %id, error = %e, "run object already gone");
    }
}

pub async fn export_runs(shared: &Arc<Shared>, conn: &Connection) {
    for run_id in shared.run_ids() {
        let obj = RunObject {
            shared: Arc::clone(shared),
            run_id,
        };
        if let Err(e) = conn.object_server().at(run_path(&run_id), obj).await {
            tracing::warn!(run_id = %run_id, error = %e, "cannot export run object");
        }
    }
}
