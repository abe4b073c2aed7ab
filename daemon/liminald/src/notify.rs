//! sd_notify(3): READY/STATUS/STOPPING/WATCHDOG. All no-ops without
//! NOTIFY_SOCKET (the crate checks), so the daemon runs the same outside
//! systemd.

use sd_notify::NotifyState;
use std::time::Duration;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Tells systemd why the daemon is about to exit with a failure
/// (STATUS and ERRNO, as systemctl status shows them).
pub fn failing(status: &str, errno: u32) {
    send(&[NotifyState::Status(status), NotifyState::Errno(errno)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The ping interval when systemd watches us (half of WATCHDOG_USEC, as
/// sd_watchdog_enabled(3) recommends), `None` otherwise.
///
/// Same rule as libsystemd: WATCHDOG_USEC set, and WATCHDOG_PID, when set,
/// naming this process (the sd-notify crate insists on WATCHDOG_PID).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings from a task on the daemon's runtime: if the runtime wedges, the
/// pings stop and systemd restarts us.
pub async fn watchdog_loop(every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}
