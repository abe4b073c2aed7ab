//! liminald: runs plans in sandboxes, spools facts, serves them on D-Bus.

mod auth;
mod daemon;
mod delegate;
mod engine_glue;
mod error;
mod fault;
mod notify;
mod service;
mod spooler;
use liminal_facts::record as state;

use anyhow::Context;
use clap::Parser;
use daemon::{OnStop, Settings, Shared};
use engine_glue::EngineConfig;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
#[command(
    name = "liminald",
    version,
    about = "Liminal daemon: hermetic test runs, facts over D-Bus"
)]
struct Args {
    /// D-Bus address to serve on (default: the system bus).
    #[arg(long, env = "LIMINAL_BUS_ADDRESS")]
    bus_address: Option<String>,
    /// State directory (spool, run state). Default: $STATE_DIRECTORY (systemd) or /var/lib/liminal.
    #[arg(long, env = "LIMINAL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Image cache. Default: $CACHE_DIRECTORY or STATE_DIR/cache.
    #[arg(long, env = "LIMINAL_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Runs executing at once.
    #[arg(long, env = "LIMINAL_MAX_CONCURRENT", default_value_t = 2)]
    max_concurrent: usize,
    /// Runs waiting for a slot before StartRun answers QueueFull.
    #[arg(long, env = "LIMINAL_QUEUE_DEPTH", default_value_t = 256)]
    queue_depth: u32,
    /// Finished runs kept in memory (and as D-Bus objects) at most; the
    /// oldest go first. Their facts stay in the spool until acknowledged
    /// and in the database for good.
    #[arg(long, env = "LIMINAL_KEEP_RUNS", default_value_t = 1000)]
    keep_runs: usize,
    /// On SIGTERM: let running runs finish, or cancel them.
    #[arg(long, env = "LIMINAL_ON_STOP", value_enum, default_value = "finish")]
    on_stop: OnStop,
    /// The liminal-sandbox helper. Default: next to this executable.
    #[arg(long, env = "LIMINAL_SANDBOX_HELPER")]
    sandbox_helper: Option<PathBuf>,
    /// cgroup under which run cgroups are created (default: liminald's own).
    #[arg(long, env = "LIMINAL_CGROUP_PARENT", default_value = "")]
    cgroup_parent: String,
    /// Group allowed to call when polkit is not on the bus.
    #[arg(long, env = "LIMINAL_ACCESS_GROUP", default_value = "liminal")]
    access_group: String,
    /// Never ask polkit, even when it is on the bus (group rule only).
    #[arg(long, env = "LIMINAL_NO_POLKIT")]
    no_polkit: bool,
    /// Spool quota in bytes.
    #[arg(long, env = "LIMINAL_SPOOL_QUOTA", default_value_t = 1 << 30)]
    spool_quota: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::from(1);
        }
    };
    let result = rt.block_on(serve(args));
    // Don't wait for blocking tasks stuck on a full channel or a slow read.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "liminald failed");
            eprintln!("liminald: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// journald when our stderr *is* the journal stream (systemd sets
/// JOURNAL_STREAM=dev:inode of it; sd_journal_stream_fd(3) documents this
/// check), so redirected stderr under systemd still gets plain text; plain
/// stderr otherwise.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIMINAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            // No prefix: span/event fields land as RUN_ID, PLAN, TEST_NAME.
            let layer = layer.with_field_prefix(None);
            tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .init();
            return;
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

fn default_helper() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("liminal-sandbox")))
        .unwrap_or_else(|| PathBuf::from("/usr/libexec/liminal-sandbox"))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn env_dir(var: &str) -> Option<PathBuf> {
    // systemd may list several directories separated by ':'; the first is ours.
    std::env::var_os(var).and_then(|v| {
        v.to_str()
            .and_then(|s| s.split(':').next())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // LISTEN_FDS would leak fd 3 into every container (PLATFORM-NOTES).
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let state_dir = args
        .state_dir
        .or_else(|| env_dir("STATE_DIRECTORY"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/liminal"));
    let cache_dir = args
        .cache_dir
        .or_else(|| env_dir("CACHE_DIRECTORY"))
        .unwrap_or_else(|| state_dir.join("cache"));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    // Before any run: the delegated cgroup root must hold no process.
    let cgroup_parent = if args.cgroup_parent.is_empty() {
        delegate::enter_leaf().unwrap_or_default()
    } else {
        args.cgroup_parent
    };
    let engine = EngineConfig {
        state_dir: state_dir.join("engine"),
        cache_dir,
        helper: args.sandbox_helper.unwrap_or_else(default_helper),
        host: hostname(),
        cgroup_parent,
        credentials_dir: env_dir("CREDENTIALS_DIRECTORY"),
    };
    let engine = Arc::new(engine);
    match tokio::task::spawn_blocking({
        let engine = Arc::clone(&engine);
        move || engine_glue::cleanup_orphans(&engine)
    })
    .await?
    {
        Ok(report) => tracing::info!(report = ?report, "orphan cleanup done"),
        Err(e) => tracing::warn!(error = %e, "orphan cleanup failed"),
    }

    let (spool, recovery) = open_spool(&state_dir.join("spool"), args.spool_quota)?;
    let spool = Arc::new(spool);
    tracing::info!(spool_id = %recovery.spool_id, last_seq = recovery.last_seq, torn = recovery.torn_tail.is_some(), "spool open");
    let (runs, interrupted) = {
        let spool = Arc::clone(&spool);
        tokio::task::spawn_blocking(move || daemon::recover(&spool)).await??
    };
    let (facts_tx, facts_rx) = std::sync::mpsc::sync_channel(spooler::CHANNEL_DEPTH);
    let (ann_tx, ann_rx) = mpsc::unbounded_channel();
    let spool_full = Arc::new(AtomicBool::new(false));
    let spooler_thread = spooler::spawn(
        Arc::clone(&spool),
        facts_rx,
        ann_tx,
        Arc::clone(&spool_full),
    )?;
    let settings = Settings {
        max_concurrent: args.max_concurrent.max(1),
        queue_depth: args.queue_depth,
        keep_runs: args.keep_runs,
        on_stop: args.on_stop,
        engine,
        auth: auth::Authorizer {
            group: args.access_group,
            use_polkit: !args.no_polkit,
        },
    };
    let shared = Arc::new(Shared::new(
        settings,
        Arc::clone(&spool),
        spool_full,
        facts_tx.clone(),
        runs,
    ));

    let builder = match &args.bus_address {
        Some(addr) => zbus::connection::Builder::address(addr.as_str())
            .with_context(|| format!("bad bus address {addr}"))?,
        None => zbus::connection::Builder::system().context("system bus")?,
    };
    let conn = builder
        .serve_at(
            service::MANAGER_PATH,
            service::Manager {
                shared: Arc::clone(&shared),
            },
        )?
        .build()
        .await
        .context("connecting to the bus")?;
    let _ = shared.conn.set(conn.clone());
    // Records recovered from the spool obey the same bound as live ones.
    let _ = shared.evict_finished();
    service::export_runs(&shared, &conn).await;
    tokio::spawn(daemon::announcer(Arc::clone(&shared), ann_rx));
    // Interrupted runs: spooled before we take the name, so a client that
    // sees us ready also sees them.
    let n_interrupted = interrupted.len();
    for fact in interrupted {
        let tx = facts_tx.clone();
        let _sent: bool = tokio::task::spawn_blocking(move || {
            tx.send(spooler::SpoolMsg::Fact(fact, None)).is_ok()
        })
        .await?;
    }
    spooler::flush(&facts_tx).await;
    if n_interrupted > 0 {
        tracing::warn!(
            runs = n_interrupted,
            "marked runs interrupted by the previous stop"
        );
    }
    // Not queued behind another owner: a second liminald fails instead of
    // reporting ready while the first one still serves.
    let reply = conn
        .request_name_with_flags(
            service::BUS_NAME,
            zbus::fdo::RequestNameFlags::DoNotQueue.into(),
        )
        .await
        .with_context(|| format!("owning {}", service::BUS_NAME))?;
    if !matches!(
        reply,
        zbus::fdo::RequestNameReply::PrimaryOwner | zbus::fdo::RequestNameReply::AlreadyOwner
    ) {
        anyhow::bail!(
            "{} is already owned by another process ({reply:?})",
            service::BUS_NAME
        );
    }
    notify::ready(&shared.status_line());
    tracing::info!(name = service::BUS_NAME, state_dir = %state_dir.display(), "liminald ready");
    if let Some(every) = notify::watchdog_interval() {
        match fault::stop_watchdog_after() {
            // Test-only (see fault.rs).
            Some(after) => {
                tracing::warn!(
                    fault = fault::STOP_WATCHDOG_AFTER,
                    after_s = after.as_secs_f64(),
                    "test fault armed: the watchdog will stop"
                );
                tokio::spawn(fault::watchdog_loop_then_hang(every, after));
            }
            None => {
                tokio::spawn(notify::watchdog_loop(every));
            }
        }
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping");
    notify::stopping();
    shared.shutdown().await;
    let _ = conn.release_name(service::BUS_NAME).await;
    // Everything is durable and announced (shutdown flushed); the spooler
    // thread ends with the process.
    drop(spooler_thread);
    tracing::info!("stopped");
    Ok(())
}

fn open_spool(
    dir: &Path,
    quota: u64,
) -> anyhow::Result<(liminal_spool::Spool, liminal_spool::RecoveryReport)> {
    let cfg = liminal_spool::SpoolConfig {
        quota_bytes: quota.max(1 << 20),
        segment_bytes: (quota / 16).clamp(1024, 64 << 20),
        ..liminal_spool::SpoolConfig::default()
    };
    liminal_spool::Spool::open(dir, cfg).with_context(|| format!("opening spool {}", dir.display()))
}
