//! TEST-ONLY fault injection, for the VM test's watchdog check
//! (tests/vm/run.sh applies it with a systemd drop-in). Never set in
//! production: nothing here runs unless the variable is set.
//!
//! `LIMINAL_FAULT_STOP_WATCHDOG_AFTER=SECS`: SECS after start the watchdog
//! task stops pinging and wedges its runtime worker thread, the way a stuck
//! event loop would; systemd's WatchdogSec= must then kill and restart us.

use std::time::Duration;

pub const STOP_WATCHDOG_AFTER: &str = "LIMINAL_FAULT_STOP_WATCHDOG_AFTER";

/// The configured fault delay; `None` when unset or not a number of seconds
/// (a bad value is logged and ignored: a fault switch must not stop a start).
pub fn stop_watchdog_after() -> Option<Duration> {
    let raw = std::env::var(STOP_WATCHDOG_AFTER).ok()?;
    match raw.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Some(Duration::from_secs_f64(secs)),
        _ => {
            tracing::warn!(value = %raw, "{STOP_WATCHDOG_AFTER}: not a number of seconds, ignored");
            None
        }
    }
}

/// The watchdog loop, cut off after `after`; then this worker thread hangs.
pub async fn watchdog_loop_then_hang(every: Duration, after: Duration) {
    tokio::select! {
        _ = crate::notify::watchdog_loop(every) => {}
        _ = tokio::time::sleep(after) => {}
    }
    tracing::error!(
        fault = STOP_WATCHDOG_AFTER,
        after_s = after.as_secs_f64(),
        "test fault: watchdog pings stopped, event loop thread hangs"
    );
    // Blocks the worker thread (not just this task), like a wedged loop.
    loop {
        std::thread::park();
    }
}
