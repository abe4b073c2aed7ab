//! The daemon's view of the engine (CONTRACTS: `liminal_engine::run`,
//! `cleanup_orphans`, `EngineConfig`, `CancelHandle`).
//!
//! TEMPORARY stand-in until the engine runner lands: same signatures,
//! every run fails to start.

use liminal_facts::{FactBody, RunStatus, Ulid};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct EngineConfig {
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub helper: PathBuf,
    pub host: String,
    pub cgroup_parent: String,
    pub credentials_dir: Option<PathBuf>,
}

pub struct RunRequest {
    pub run_id: Ulid,
    pub plan: liminal_plan::Plan,
    pub fd_secrets: BTreeMap<String, OwnedFd>,
}

#[derive(Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);
impl CancelHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct RunOutcome {
    pub status: RunStatus,
    pub exit_code: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(String);

pub fn run(
    _cfg: &EngineConfig,
    _req: RunRequest,
    _sink: &mut dyn FnMut(FactBody),
    _cancel: &CancelHandle,
) -> Result<RunOutcome, EngineError> {
    Err(EngineError(
        "the engine runner is not built into this liminald yet".into(),
    ))
}

pub fn cleanup_orphans(_cfg: &EngineConfig) -> Result<(), EngineError> {
    Ok(())
}
