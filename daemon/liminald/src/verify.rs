//! `VerifyReproducible`: a run whose work is a reproducibility verification
//! (`liminal_engine::repro`) instead of a single build. It goes through the
//! same authorization, queue, spool and run objects as `StartRun`; the
//! control build's facts are the run's, followed by a `repro_verdict` fact,
//! which `GetRun` shows under `"repro"`.
//!
//! Declared from `daemon.rs` (by path) so that `main.rs` stays untouched.

use crate::engine_glue::{CancelHandle, EngineConfig};
use crate::error::{BusError, INVALID_ARGS};
use liminal_engine::repro;
pub use liminal_engine::repro::VerifyOptions;
use liminal_facts::{FactBody, RunStatus, Ulid};
use liminal_plan::Plan;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use zbus::zvariant::OwnedValue;

/// D-Bus error for a variation name the engine does not know.
pub const INVALID_ARGUMENT: &str = "org.liminalqa.Liminal1.Error.InvalidArgument";

/// Reads `runs` (u), `vary` (as), `culprit_search` (b) and `diffoscope` (b)
/// from the call's options; other keys (`plan_path`) are the caller's business.
pub fn options(options: &HashMap<String, OwnedValue>) -> Result<VerifyOptions, BusError> {
    let mut opts = VerifyOptions::default();
    if let Some(v) = options.get("runs") {
        let runs = u32::try_from(v).map_err(|_| {
            BusError::new(INVALID_ARGS, "option runs must be an unsigned integer (u)")
        })?;
        if runs < 2 {
            return Err(BusError::new(
                INVALID_ARGUMENT,
                format!("runs must be at least 2 (got {runs})"),
            ));
        }
        if runs > 16 {
            return Err(BusError::new(
                INVALID_ARGUMENT,
                format!("runs must be at most 16 (got {runs})"),
            ));
        }
        opts.runs = runs;
    }
    for (key, slot) in [
        ("culprit_search", &mut opts.culprit_search),
        ("diffoscope", &mut opts.diffoscope),
    ] {
        if let Some(v) = options.get(key) {
            *slot = bool::try_from(v).map_err(|_| {
                BusError::new(INVALID_ARGS, format!("option {key} must be a boolean (b)"))
            })?;
        }
    }
    if let Some(v) = options.get("vary") {
        let v = v
            .try_clone()
            .map_err(|e| BusError::new(INVALID_ARGS, format!("vary: {e}")))?;
        let list = Vec::<String>::try_from(v).map_err(|_| {
            BusError::new(INVALID_ARGS, "option vary must be a list of strings (as)")
        })?;
        opts.vary =
            repro::parse_vary(&list).map_err(|e| BusError::new(INVALID_ARGUMENT, e.to_string()))?;
    }
    Ok(opts)
}

/// Runs the verification on a blocking thread: `Ok((status, exit_code,
/// None))` (the engine emitted the final fact), `Ok((cancelled, _,
/// Some(reason)))` for a final fact still to add, or `Err(reason)` when it
/// could not complete.
pub fn execute(
    cfg: &EngineConfig,
    run_id: Ulid,
    plan: Plan,
    fd_secrets: BTreeMap<String, OwnedFd>,
    opts: &VerifyOptions,
    sink: &mut dyn FnMut(FactBody),
    cancel: &CancelHandle,
) -> Result<(RunStatus, Option<i32>, Option<String>), String> {
    match repro::verify(cfg, run_id, plan, fd_secrets, opts, sink, cancel) {
        // The engine already emitted the verdict and the run's final fact.
        Ok(v) => {
            tracing::info!(reproducible = v.reproducible, culprit = ?v.culprit, "verification finished");
            let status = if v.reproducible {
                RunStatus::Passed
            } else {
                RunStatus::Failed
            };
            Ok((status, Some(i32::from(!v.reproducible)), None))
        }
        Err(_) if cancel.is_cancelled() => {
            Ok((RunStatus::Cancelled, None, Some("cancelled".into())))
        }
        Err(e) => Err(format!("verification failed: {e}")),
    }
}
