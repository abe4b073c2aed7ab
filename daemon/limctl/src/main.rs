//! limctl: the command-line client of liminald, and local runs without it.
//!
//! Exit codes: 0 the run passed; 1 it ran and failed (or timed out); 2 it
//! could not run (plan error, bad secret, daemon unreachable, engine error);
//! 3 cancelled or interrupted.

mod local;
mod output;
mod verify;

use anyhow::{anyhow, Context};
use clap::{CommandFactory, Parser, Subcommand};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zbus::zvariant::{self, OwnedObjectPath, Value};

const BUS_NAME: &str = "org.liminalqa.Liminal1";
const RUN_IFACE: &str = "org.liminalqa.Liminal1.Run";

#[derive(Debug, Parser)]
#[command(
    name = "limctl",
    version,
    about = "Run tests hermetically with Liminal and inspect runs"
)]
struct Cli {
    /// D-Bus address of liminald's bus (default: the system bus).
    #[arg(long, global = true, env = "LIMINAL_BUS_ADDRESS")]
    bus_address: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a plan (through liminald, or here with --local) and wait for it.
    Run {
        /// The plan file (TOML).
        plan: PathBuf,
        /// Run in this process without the daemon (state in
        /// ${LIMINAL_STATE_DIR:-$HOME/.cache/liminal/state}).
        #[arg(long)]
        local: bool,
        /// Print one JSON object for the run instead of a summary.
        #[arg(long)]
        json: bool,
        /// A secret for `from = "fd"`: NAME=@FILE reads a file, NAME=- stdin.
        #[arg(long = "secret", value_name = "NAME=@FILE|NAME=-")]
        secrets: Vec<String>,
    },
    /// Check that a plan's build reproduces bit for bit: build it N times
    /// under variations (reprotest's names), compare artifacts by BLAKE3,
    /// name the variation responsible. Exit 0 reproducible, 1 not.
    Verify {
        plan: PathBuf,
        /// Builds to compare (the control plus N-1 varied).
        #[arg(long, default_value_t = 2)]
        runs: u32,
        /// Variations, e.g. "hostname,umask" or "-time,-fileordering"
        /// (default: all).
        #[arg(long, value_name = "LIST")]
        vary: Vec<String>,
        /// In this process, without the daemon.
        #[arg(long)]
        local: bool,
        #[arg(long)]
        json: bool,
        /// Only compare; do not rebuild one variation at a time to find
        /// the culprit.
        #[arg(long)]
        no_culprit_search: bool,
        /// No diffoscope reports of the differing artifacts.
        #[arg(long)]
        no_diffoscope: bool,
    },
    /// List the runs the daemon knows.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one run.
    Show {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running run.
    Cancel { run: String },
    /// Print spooled facts after a sequence number, one JSON object a line.
    Facts {
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 1000)]
        max: u32,
    },
    /// Shell completions on stdout.
    Completions { shell: clap_complete::Shell },
    /// The man page (roff) on stdout.
    Man,
}

#[zbus::proxy(
    interface = "org.liminalqa.Liminal1.Manager",
    default_service = "org.liminalqa.Liminal1",
    default_path = "/org/liminalqa/Liminal1"
)]
trait Manager {
    fn start_run(
        &self,
        plan_toml: &str,
        secret_fds: HashMap<String, zvariant::OwnedFd>,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<(String, OwnedObjectPath)>;
    fn verify_reproducible(
        &self,
        plan_toml: &str,
        secret_fds: HashMap<String, zvariant::OwnedFd>,
        options: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<(String, OwnedObjectPath)>;
    fn cancel_run(&self, run_id: &str) -> zbus::Result<()>;
    fn list_runs(&self) -> zbus::Result<Vec<(String, String, String, String, u64)>>;
    fn get_run(&self, run_id: &str) -> zbus::Result<String>;
    fn facts_since(&self, after_seq: u64, max: u32) -> zbus::Result<Vec<(u64, String, String)>>;
}

/// An error with the exit code it deserves.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Fail {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Fail {
        code,
        message: message.into(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIMINAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e.downcast_ref::<Fail>().map(|f| f.code).unwrap_or(2);
            eprintln!("limctl: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "limctl", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(0)
        }
        Cmd::Run {
            plan,
            local: true,
            json,
            secrets,
        } => {
            let fds = open_secrets(&secrets)?;
            let run = local::run(&plan, fds)?;
            Ok(output::finish(&run, json))
        }
        Cmd::Verify {
            plan,
            runs,
            vary,
            local: true,
            json,
            no_culprit_search,
            no_diffoscope,
        } => verify::local(&verify::Args {
            plan: &plan,
            runs,
            vary,
            json,
            culprit_search: !no_culprit_search,
            diffoscope: !no_diffoscope,
        }),
        cmd => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(remote(cli.bus_address, cmd))
        }
    }
}

async fn connect(addr: Option<String>) -> anyhow::Result<zbus::Connection> {
    let conn = match addr {
        Some(a) => zbus::connection::Builder::address(a.as_str())
            .with_context(|| format!("bad bus address {a}"))?
            .build()
            .await
            .with_context(|| format!("cannot connect to the bus at {a}")),
        None => zbus::Connection::system()
            .await
            .context("cannot connect to the system bus"),
    };
    conn.map_err(|e| fail(2, format!("{e:#}")))
}

/// A D-Bus error reply as "Name: message" without zbus's decoration.
fn bus_err(e: zbus::Error) -> anyhow::Error {
    match &e {
        zbus::Error::MethodError(name, msg, _) => {
            let msg = msg.clone().unwrap_or_default();
            if name.as_str() == "org.liminalqa.Liminal1.Error.InvalidPlan" {
                // Already "file:line:col: message".
                fail(2, msg)
            } else {
                let short = name.rsplit('.').next().unwrap_or(name.as_str());
                fail(2, format!("{short}: {msg}"))
            }
        }
        _ => fail(2, e.to_string()),
    }
}

async fn remote(addr: Option<String>, cmd: Cmd) -> anyhow::Result<u8> {
    let conn = connect(addr).await?;
    let mgr = ManagerProxy::new(&conn).await?;
    match cmd {
        Cmd::Run {
            plan,
            json,
            secrets,
            ..
        } => run_remote(&conn, &mgr, &plan, &secrets, json).await,
        Cmd::Verify {
            plan,
            runs,
            vary,
            json,
            no_culprit_search,
            no_diffoscope,
            ..
        } => {
            let args = verify::Args {
                plan: &plan,
                runs,
                vary,
                json,
                culprit_search: !no_culprit_search,
                diffoscope: !no_diffoscope,
            };
            verify::remote(&conn, &mgr, &args).await
        }
        Cmd::List { json } => {
            let runs = mgr.list_runs().await.map_err(bus_err)?;
            output::list(&runs, json);
            Ok(0)
        }
        Cmd::Show { run, json } => {
            let text = mgr.get_run(&run).await.map_err(bus_err)?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            output::show(&v, json);
            Ok(0)
        }
        Cmd::Cancel { run } => {
            mgr.cancel_run(&run).await.map_err(bus_err)?;
            Ok(0)
        }
        Cmd::Facts { since, max } => {
            let facts = mgr.facts_since(since, max).await.map_err(bus_err)?;
            for (seq, kind, json) in facts {
                let body: serde_json::Value =
                    serde_json::from_str(&json).unwrap_or(serde_json::Value::String(json));
                println!(
                    "{}",
                    serde_json::json!({"seq": seq, "kind": kind, "body": body})
                );
            }
            Ok(0)
        }
        Cmd::Completions { .. } | Cmd::Man => Err(anyhow!("not a remote command")),
    }
}

async fn run_remote(
    conn: &zbus::Connection,
    mgr: &ManagerProxy<'_>,
    plan: &Path,
    secrets: &[String],
    json: bool,
) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(plan)
        .map_err(|e| fail(2, format!("{}:1:1: cannot read plan: {e}", plan.display())))?;
    let abs = std::path::absolute(plan).unwrap_or_else(|_| plan.to_path_buf());
    let fds = open_secrets(secrets)?
        .into_iter()
        .map(|(k, v)| (k, zvariant::OwnedFd::from(v)))
        .collect();
    let plan_path = abs.to_string_lossy().into_owned();
    let mut options = HashMap::new();
    options.insert("plan_path", Value::from(plan_path.as_str()));
    let (run_id, path) = mgr.start_run(&text, fds, options).await.map_err(bus_err)?;
    let v = follow_run(conn, mgr, &run_id, &path, json).await?;
    Ok(output::finish(&v, json))
}

/// Shows the run's progress until its state is final, then returns its
/// `GetRun` JSON.
pub(crate) async fn follow_run(
    conn: &zbus::Connection,
    mgr: &ManagerProxy<'_>,
    run_id: &str,
    path: &zvariant::OwnedObjectPath,
    json: bool,
) -> anyhow::Result<serde_json::Value> {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(BUS_NAME)?
        .path(path.clone())?
        .build()
        .await?;
    let mut changes = props.receive_properties_changed().await?;
    let progress = output::Progress::new(run_id, json);
    loop {
        // Read the state after subscribing, so no change is missed.
        let all = props
            .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                RUN_IFACE,
            ))
            .await
            .map_err(|e| fail(2, format!("run {run_id}: {e}")))?;
        let state = prop_str(&all, "State");
        progress.update(&state, prop_u32(&all, "Passed"), prop_u32(&all, "Failed"));
        if !matches!(state.as_str(), "queued" | "running" | "") {
            break;
        }
        // Wake on a change, or poll now and then in case a signal was lost.
        let _ = tokio::time::timeout(Duration::from_secs(2), changes.next()).await;
    }
    progress.done();
    let text = mgr.get_run(run_id).await.map_err(bus_err)?;
    Ok(serde_json::from_str(&text)?)
}

fn prop_str(all: &HashMap<String, zvariant::OwnedValue>, name: &str) -> String {
    all.get(name)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| String::try_from(v).ok())
        .unwrap_or_default()
}

fn prop_u32(all: &HashMap<String, zvariant::OwnedValue>, name: &str) -> u32 {
    all.get(name)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0)
}

/// `NAME=@FILE` opens the file, `NAME=-` takes stdin: only descriptors
/// travel, never the bytes.
fn open_secrets(specs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, OwnedFd>> {
    let mut out = std::collections::BTreeMap::new();
    for spec in specs {
        let (name, src) = spec.split_once('=').ok_or_else(|| {
            fail(
                2,
                format!("--secret {spec:?}: expected NAME=@FILE or NAME=-"),
            )
        })?;
        let fd: OwnedFd = if src == "-" {
            std::io::stdin()
                .lock()
                .as_fd_owned()
                .map_err(|e| fail(2, format!("--secret {name}: stdin: {e}")))?
        } else if let Some(file) = src.strip_prefix('@') {
            std::fs::File::open(file)
                .map_err(|e| fail(2, format!("--secret {name}: {file}: {e}")))?
                .into()
        } else {
            return Err(fail(
                2,
                format!("--secret {name}: expected @FILE or - after '=' (values never go on the command line)"),
            ));
        };
        out.insert(name.to_owned(), fd);
    }
    Ok(out)
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd>;
}
impl<T: std::os::fd::AsFd> AsFdOwned for T {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }
}
