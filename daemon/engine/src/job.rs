//! The protocol between the engine ([`crate::runner`]) and the single-threaded
//! `liminal-sandbox` helper that drives libcontainer.
//!
//! One helper process runs one job:
//! - the engine writes one [`Job`] as JSON on the helper's **stdin** and closes it;
//! - the helper inherits the container's extra descriptors **at their final
//!   numbers** `3 .. 3 + preserved_fds` (signals pipe, secret memfds), so they
//!   need no renumbering inside the container (libcontainer's `preserve_fds`);
//! - it inherits the container's stdout and stderr (pipe write ends) and its
//!   own report pipe at the numbers the job names;
//! - it writes exactly one [`JobReport`] as JSON to the report fd before it
//!   exits, and diagnostics (tracing) on its own stderr;
//! - SIGTERM or SIGINT to the helper means "cancel": it kills the container's
//!   cgroup (TERM, grace, KILL), cleans up and reports `cancelled`.
//!
//! The same job can also reach a **fork server** (`liminal-sandbox --serve`,
//! see [`SERVE_ARG`]): a long-lived single-threaded helper the engine keeps
//! ready, which forks a fresh single-threaded child per job. The child runs
//! exactly the one-job path above; only the way the job and its descriptors
//! arrive differs (one message on a socket, descriptors by SCM_RIGHTS, then
//! placed at the numbers the job names). This skips exec, dynamic loading
//! and process start-up per run.
//!
//! The helper crate includes this file by path (`#[path]`), so it must depend
//! on nothing but `serde`, `nix` and std. The cgroupfs helpers at the end are
//! shared for the same reason: the engine cleans up after a helper that died.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Bumped on any incompatible change; the helper refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// First descriptor number the helper inherits for the container (the
/// signals pipe); secrets follow.
pub const FIRST_CONTAINER_FD: i32 = 3;

/// Exit code of the helper when it wrote a report (whatever the container did).
pub const HELPER_EXIT_REPORTED: i32 = 0;

/// Argument that starts the helper as a fork server. Its socket (a
/// `SOCK_SEQPACKET` unix socket, the engine holds the other end) is
/// descriptor [`SERVE_FD`]; EOF on it (the engine is gone) or SIGTERM ends
/// the server, never the jobs already forked.
///
/// One request = one message whose bytes are a JSON [`ServeRequest`] and
/// whose SCM_RIGHTS carry, in order: a memfd holding the [`Job`] JSON, the
/// write end for the child's own diagnostics (its stderr), the
/// `preserved_fds` container descriptors, then stdout, stderr and report.
/// One reply per request: a JSON [`ServeReply`]; `Started` carries a pidfd
/// of the child (the engine polls it for exit and signals through it, so a
/// reused pid is never hit).
pub const SERVE_ARG: &str = "--serve";
/// The fork server's socket descriptor.
pub const SERVE_FD: i32 = 3;
/// Descriptors in one request besides the container's (job memfd, child
/// stderr, stdout, stderr, report).
pub const SERVE_FIXED_FDS: usize = 5;
/// SCM_RIGHTS carries at most this many descriptors (the kernel's SCM_MAX_FD).
pub const SERVE_MAX_FDS: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeRequest {
    pub version: u32,
    /// Instead of a job (no descriptors): drop every warm slot made for
    /// jobs with this state root, killed, reaped and swept before the
    /// reply ([`ServeReply::Retired`]), so that the state dir can be removed
    /// without a slot still being made in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServeReply {
    /// The child runs the job; a pidfd of it rides along. A warm slot
    /// (the helper's `warm` module) runs it in a container made earlier,
    /// in `cgroup_path` rather than the job's: the engine sweeps that one
    /// too if the child dies without a report.
    Started {
        pid: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup_path: Option<String>,
    },
    /// Nothing was forked (bad request, fork failed).
    Refused { message: String },
    /// The answer to a `retire` request: how many slots were dropped.
    Retired { slots: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub version: u32,
    /// libcontainer container id (also the last cgroup path component).
    pub container_id: String,
    /// libcontainer state root (`<state_dir>/containers`).
    pub state_root: PathBuf,
    /// Per-run folder the helper may write (`config.json`, overlay dirs).
    pub bundle: PathBuf,
    /// The image's root filesystem on the host; never written.
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    /// The complete environment of the container process.
    pub env: BTreeMap<String, String>,
    /// Working directory inside (the plan's workdir).
    pub cwd: String,
    pub hostname: String,
    pub domainname: String,
    pub umask: u32,
    /// Bind mounts, in order (workdir, /tmp, then the plan's inputs).
    pub mounts: Vec<BindMount>,
    pub network: Network,
    /// Container uid/gid 0 maps to host `id_map.host_id` (`size` ids).
    pub id_map: IdMap,
    pub resources: Limits,
    /// Absolute cgroup path (relative to each hierarchy's root).
    pub cgroup_path: String,
    /// Container descriptors inherited at `3 .. 3 + preserved_fds`.
    pub preserved_fds: u32,
    pub stdout_fd: i32,
    pub stderr_fd: i32,
    pub report_fd: i32,
    pub timeout_ms: u64,
    /// Between SIGTERM and SIGKILL on timeout or cancel.
    pub kill_grace_ms: u64,
    pub rlimits: Vec<Rlimit>,
    /// Paths (inside) where the workload may write: landlock allows writes
    /// beneath them and nowhere else (besides writing to existing devices).
    pub writable_paths: Vec<String>,
    /// Offset CLOCK_MONOTONIC and CLOCK_BOOTTIME in a time namespace so they
    /// start near zero.
    pub reset_clocks: bool,
    /// Container uid and gid of the workload process (0: the container's
    /// root). Reproducibility checks vary them (`user_group`).
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Extra `personality(2)` flags set just before exec, e.g.
    /// `ADDR_NO_RANDOMIZE` (0x0040000) or `UNAME26` (0x0020000).
    #[serde(default)]
    pub personality: u32,
    /// Seconds added to CLOCK_MONOTONIC and CLOCK_BOOTTIME inside the time
    /// namespace (with `reset_clocks`), e.g. to make uptime differ.
    #[serde(default)]
    pub clock_offset_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A fresh network namespace with loopback down: no traffic at all.
    None,
    /// A fresh network namespace with its own loopback up.
    Loopback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_id: u32,
    pub size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    pub cpus: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// OCI name, e.g. `RLIMIT_NOFILE`.
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

/// What happened, written once by the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub outcome: Outcome,
    pub timed_out: bool,
    pub cancelled: bool,
    /// The kernel's OOM killer killed a process in the container's cgroup.
    pub oom_killed: bool,
    /// Problems removing the container, cgroups or state; the engine retries.
    pub cleanup_errors: Vec<String>,
    pub timings: Timings,
}

impl JobReport {
    /// The report before anything happened: setup failed (the message comes
    /// later), nothing else; the helper fills it in as the job goes.
    pub fn pending() -> JobReport {
        JobReport {
            outcome: Outcome::SetupFailed {
                message: String::new(),
            },
            timed_out: false,
            cancelled: false,
            oom_killed: false,
            cleanup_errors: Vec::new(),
            timings: Timings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// The container's init process exited with this code.
    Exited { code: i32 },
    /// It was killed by this signal.
    Signaled { signal: i32 },
    /// The sandbox could not be set up; the command never ran.
    SetupFailed { message: String },
}

/// Microseconds spent in each phase, for diagnostics and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub create_us: u64,
    pub start_us: u64,
    pub wait_us: u64,
    pub delete_us: u64,
    /// The job ran in a warm sandbox, created before the job arrived
    /// (`create_us` is then 0; see the helper's `warm` module).
    #[serde(default)]
    pub warm: bool,
}

/// The folder warm slots live in, beside libcontainer's state root
/// (`<state>/warm` for `<state>/containers`). The engine makes it; a slot
/// only mounts its tmpfs on it, in its own mount namespace.
pub fn slots_dir(state_root: &std::path::Path) -> PathBuf {
    state_root
        .parent()
        .map_or_else(|| state_root.join("warm"), |p| p.join("warm"))
}

// ---------------------------------------------------------------------------
// cgroupfs housekeeping shared by the helper and the engine (which must clean
// up after a helper that crashed or was killed, without libcontainer).

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Every mounted cgroup hierarchy: the v2 root alone on a unified host, else
/// each v1 controller folder plus `unified` (hybrid layout).
///
/// Cached per mount namespace and re-read only when its mount table changed
/// (`/proc/thread-self/mountinfo` polls POLLPRI after any mount or unmount,
/// see proc(5)): the listing is a dozen stats, and the engine and the helper ask
/// for it several times per run (about 0.4 ms of CPU per run, measured with
/// perf in `benches/sandbox-latency`). The check itself is one stat and one
/// poll.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, RawFd};
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;
    struct Cached {
        /// Inode of the calling thread's mount namespace when listed: a
        /// thread that moved to another one (the helper's `unshare`) lists
        /// again.
        mnt_ns: u64,
        /// That namespace's `mountinfo`, opened before listing, held by
        /// number: the helper moves descriptors to fixed numbers with dup2,
        /// which can silently replace this one, so it is used, and closed,
        /// only while it is still the file opened (`id`).
        mountinfo: RawFd,
        id: (u64, u64),
        /// Who opened it: a forked child shares the open file, and polling
        /// it would take the change event from its parent.
        pid: u32,
        list: Vec<PathBuf>,
    }
    impl Cached {
        /// The descriptor, if it still is the file this cache opened.
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            let st = nix::sys::stat::fstat(self.mountinfo).ok()?;
            ((st.st_dev, st.st_ino) == self.id)
                // SAFETY: open, and ours (checked just above).
                .then(|| unsafe { BorrowedFd::borrow_raw(self.mountinfo) })
        }
        /// Closes the descriptor if it is still ours; else leaves the number
        /// to whoever has it now.
        fn release(self) {
            if self.fd().is_some() {
                let _ = nix::unistd::close(self.mountinfo);
            }
        }
    }
    static CACHE: Mutex<Option<Cached>> = Mutex::new(None);
    let mnt_ns = std::fs::metadata("/proc/thread-self/ns/mnt")
        .map(|m| m.ino())
        .ok();
    // A poisoned lock only means another thread panicked mid-listing; the
    // cache is rebuilt below in that case anyway.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(ns), Some(c)) = (mnt_ns, cache.as_ref()) {
        if c.mnt_ns == ns && c.pid == std::process::id() {
            if let Some(fd) = c.fd() {
                if !mount_table_changed(fd) {
                    return c.list.clone();
                }
            }
        }
    }
    if let Some(old) = cache.take() {
        old.release();
    }
    // Opened first, so a mount made while listing shows on the next call.
    let mountinfo = std::fs::File::open("/proc/thread-self/mountinfo");
    let list = list_cgroup_hierarchies();
    if let (Some(mnt_ns), Ok(f)) = (mnt_ns, mountinfo) {
        if let Ok(st) = nix::sys::stat::fstat(f.as_raw_fd()) {
            *cache = Some(Cached {
                mnt_ns,
                id: (st.st_dev, st.st_ino),
                mountinfo: f.into_raw_fd(),
                pid: std::process::id(),
                list: list.clone(),
            });
        }
    }
    list
}

/// Whether a mount or unmount happened in the namespace `mountinfo` was
/// opened in since it was opened (or since the last call that said so).
fn mount_table_changed(mountinfo: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(mountinfo, PollFlags::POLLPRI)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        // POLLPRI|POLLERR: changed; an error: do not trust the cache.
        _ => true,
    }
}

fn list_cgroup_hierarchies() -> Vec<PathBuf> {
    let root = std::path::Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_owned()];
    }
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path();
            // Symlinks like cpu -> cpu,cpuacct would list a hierarchy twice.
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && p.join("cgroup.procs").exists()
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Parent folders of `cgroup_path` that do not exist yet in some hierarchy:
/// whoever creates the cgroup also removes these afterwards (when empty).
pub fn missing_cgroup_parents(cgroup_path: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let parents: Vec<&str> = {
        let r = rel(cgroup_path);
        let mut v = Vec::new();
        let mut cur = r;
        while let Some((p, _)) = cur.rsplit_once('/') {
            v.push(p);
            cur = p;
        }
        v
    };
    for h in cgroup_hierarchies() {
        // Deepest first, so removing in order works; the first one that
        // exists has every ancestor too.
        for p in &parents {
            let d = h.join(p);
            if d.exists() {
                break;
            }
            out.push(d);
        }
    }
    out
}

/// Removes these folders if they are empty cgroups (deepest listed first);
/// a concurrent run still using one keeps it. Known race: a run whose
/// libcgroups is between creating a shared parent and its own leaf can see
/// the parent vanish and fail to start (an `error` run, nothing leaked).
/// Setting `EngineConfig::cgroup_parent` to a folder that exists in every
/// hierarchy avoids creating parents at all.
pub fn remove_empty_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

/// How many processes the OOM killer killed in this cgroup (v1
/// `memory.oom_control`'s `oom_kill`, v2 `memory.events`' `oom_kill`).
pub fn cgroup_oom_kills(cgroup_path: &str) -> u64 {
    let mut total = 0;
    for h in cgroup_hierarchies() {
        let d = h.join(rel(cgroup_path));
        for f in ["memory.oom_control", "memory.events"] {
            if let Ok(text) = std::fs::read_to_string(d.join(f)) {
                for line in text.lines() {
                    if let Some(n) = line.strip_prefix("oom_kill ") {
                        total += n.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
    }
    total
}

fn collect_pids(dir: &std::path::Path, out: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_tree(dir: &std::path::Path) -> std::io::Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// SIGKILLs every process in the cgroup (until none is left: a fork bomb is
/// bounded by its pids limit) and removes its folder in every hierarchy.
/// Returns problems in words; empty means the cgroup is gone.
pub fn teardown_cgroup(cgroup_path: &str) -> Vec<String> {
    use std::time::{Duration, Instant};
    let mut errors = Vec::new();
    if rel(cgroup_path).is_empty() {
        return vec!["refusing to tear down the root cgroup".to_owned()];
    }
    // Where it exists, listed once: after a helper that cleaned up that is
    // nowhere, told by one stat per hierarchy.
    let dirs: Vec<PathBuf> = cgroup_hierarchies()
        .iter()
        .map(|h| h.join(rel(cgroup_path)))
        .filter(|d| d.exists())
        .collect();
    if dirs.is_empty() {
        return errors;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        for d in &dirs {
            collect_pids(d, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            errors.push(format!(
                "cgroup {cgroup_path}: processes {pids:?} survive SIGKILL"
            ));
            break;
        }
        for d in &dirs {
            // Frozen tasks (a helper killed mid-kill) ignore SIGKILL until thawed.
            let _ = std::fs::write(d.join("freezer.state"), "THAWED");
            let _ = std::fs::write(d.join("cgroup.freeze"), "0");
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for d in &dirs {
        // Removal fails with EBUSY while killed tasks are still exiting.
        let mut last = None;
        for _ in 0..200 {
            match remove_tree(d) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(e) = last {
            errors.push(format!("removing {}: {e}", d.display()));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The cache follows mounts in the caller's own mount namespace. Runs in
    /// a thread with a private mount namespace (root only; the host's mount
    /// table is never touched), with a tmpfs as its /sys/fs/cgroup.
    #[test]
    fn cgroup_hierarchies_follow_mounts_in_the_callers_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to unshare a mount namespace");
            return;
        }
        let host = cgroup_hierarchies();
        std::thread::spawn(|| {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make / private");
            let tmpfs = |dir: &str| {
                mount(
                    Some("t"),
                    dir,
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .expect("tmpfs")
            };
            tmpfs(CGROUP_ROOT);
            assert_eq!(
                cgroup_hierarchies(),
                Vec::<PathBuf>::new(),
                "a new mount is seen"
            );
            // A folder that looks like a hierarchy but was not mounted: the
            // cached list stands until the mount table changes.
            let root = Path::new(CGROUP_ROOT);
            for d in ["a", "b"] {
                std::fs::create_dir(root.join(d)).unwrap();
            }
            std::fs::write(root.join("a/cgroup.procs"), "").unwrap();
            assert_eq!(cgroup_hierarchies(), Vec::<PathBuf>::new());
            tmpfs(&format!("{CGROUP_ROOT}/b"));
            std::fs::write(root.join("b/cgroup.procs"), "").unwrap();
            assert_eq!(cgroup_hierarchies(), vec![root.join("a"), root.join("b")]);
        })
        .join()
        .expect("the namespace thread");
        assert_eq!(
            cgroup_hierarchies(),
            host,
            "the host's namespace lists its own again"
        );
    }
}
