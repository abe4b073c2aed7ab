//! `limctl run --local`: the engine in this process, no daemon, no bus.

use crate::fail;
use liminal_engine::{CancelHandle, EngineConfig, RunRequest};
use liminal_facts::record::RunRecord;
use liminal_facts::FactBody;
use liminal_plan::Plan;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

fn home_cache() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".cache/liminal")
}

/// Default state and cache folders. The sandbox's mapped ids must traverse
/// them, and root's home is 0700 on Debian, so root (who runs sandboxes)
/// gets system folders of its own, apart from liminald's /var/lib/liminal.
fn default_dirs() -> (PathBuf, PathBuf) {
    if nix::unistd::Uid::effective().is_root() {
        (
            PathBuf::from("/var/lib/limctl"),
            PathBuf::from("/var/cache/limctl"),
        )
    } else {
        (home_cache().join("state"), home_cache())
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

pub fn config() -> EngineConfig {
    let (default_state, default_cache) = default_dirs();
    let state_dir = env_path("LIMINAL_STATE_DIR").unwrap_or(default_state);
    let cache_dir = env_path("LIMINAL_CACHE_DIR").unwrap_or(default_cache);
    // Beside limctl in a build tree; in /usr/libexec/liminal where the
    // Debian package puts it.
    let helper = env_path("LIMINAL_SANDBOX_HELPER").unwrap_or_else(|| {
        let beside = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("liminal-sandbox")));
        let packaged = PathBuf::from("/usr/libexec/liminal/liminal-sandbox");
        match beside {
            Some(p) if p.exists() => p,
            _ if packaged.exists() => packaged,
            _ => PathBuf::from("liminal-sandbox"),
        }
    });
    EngineConfig {
        state_dir,
        cache_dir,
        helper,
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
        cgroup_parent: std::env::var("LIMINAL_CGROUP_PARENT").unwrap_or_default(),
        credentials_dir: env_path("CREDENTIALS_DIRECTORY"),
    }
}

pub fn run(
    plan_path: &Path,
    fd_secrets: BTreeMap<String, OwnedFd>,
) -> anyhow::Result<serde_json::Value> {
    let plan = Plan::load(plan_path).map_err(|e| fail(2, e.to_string()))?;
    let cfg = config();
    let run_id = liminal_facts::new_id();
    let mut record = RunRecord::new(
        run_id,
        plan.name.clone(),
        cfg.host.clone(),
        Some(plan.timeout),
    );
    let span = tracing::info_span!("run", run_id = %run_id, plan = %plan.name);
    let _entered = span.enter();
    let mut sink = |fact: FactBody| {
        record.apply(&fact);
    };
    let cancel = CancelHandle::new();
    let req = RunRequest {
        run_id,
        plan,
        fd_secrets,
    };
    let outcome = liminal_engine::run(&cfg, req, &mut sink, &cancel)
        .map_err(|e| fail(2, format!("run could not start: {e}")))?;
    if !record.status.is_final() {
        record.status = outcome.status;
        record.exit_code = outcome.exit_code;
    }
    Ok(record.to_json())
}
