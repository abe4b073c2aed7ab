//! The delegated cgroup subtree on a pure cgroup v2 host (systemd
//! `Delegate=yes`, liminald.service).
//!
//! systemd starts liminald in its unit's cgroup root, and runs nest below the
//! daemon's own cgroup. libcgroups enables the controllers on every parent of
//! a run cgroup; on a *populated* cgroup only the threaded ones (cpu, cpuset,
//! pids) take, which turns it "domain threaded" and every run cgroup below it
//! "domain invalid": moving a container in then fails with EOPNOTSUPP (seen on
//! Debian 12 in tests/vm). So, as systemd's delegation rules ask ("no
//! processes in inner nodes"), the daemon moves itself into the leaf
//! `<unit>/daemon` and runs nest under the now empty unit root.

use std::path::Path;

const ROOT: &str = "/sys/fs/cgroup";
const LEAF: &str = "daemon";

/// Moves this process into `<own cgroup>/daemon` when that is needed and
/// possible; returns the cgroup runs must nest under (the unit root), or
/// `None` to keep the default (hybrid or v1 hosts, not a systemd service,
/// other processes in the unit's cgroup, or the move failed: logged).
pub fn enter_leaf() -> Option<String> {
    // Started by systemd as a unit (not a test, not a shell).
    std::env::var_os("INVOCATION_ID")?;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // Pure v2: one "0::/path" line. On hybrid hosts libcgroups uses v1.
    let mut lines = text.lines();
    let own = lines.next()?.strip_prefix("0::")?.to_owned();
    if lines.next().is_some() || !Path::new(ROOT).join("cgroup.subtree_control").exists() {
        return None;
    }
    if !own.ends_with(".service") {
        return None;
    }
    let unit = Path::new(ROOT).join(own.trim_start_matches('/'));
    // Only when the unit is ours alone: moving out must leave its root empty
    // (not, say, a CI runner's service whose other processes stay there).
    let me = std::process::id().to_string();
    let procs = std::fs::read_to_string(unit.join("cgroup.procs")).ok()?;
    if procs.lines().any(|p| p.trim() != me) {
        return None;
    }
    let leaf = unit.join(LEAF);
    let moved = std::fs::create_dir_all(&leaf)
        .and_then(|()| std::fs::write(leaf.join("cgroup.procs"), "0"));
    match moved {
        Ok(()) => {
            tracing::info!(cgroup = %own, leaf = LEAF, "moved into the delegated subtree's leaf; runs nest under the unit's cgroup");
            Some(own)
        }
        Err(e) => {
            tracing::warn!(cgroup = %own, error = %e, "cannot move into a leaf cgroup; runs may fail to get cgroups");
            None
        }
    }
}
