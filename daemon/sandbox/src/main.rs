//! `liminal-sandbox`: runs one job in an OCI sandbox with youki's libcontainer.
//!
//! libcontainer changes process-wide state (dumpable flag, cwd, raw clone3),
//! so it never runs inside the multi-threaded daemon: the engine spawns this
//! single-threaded helper per run. The protocol (job on stdin, report on a
//! descriptor, container descriptors inherited at fixed numbers) is documented
//! in `liminal_engine::job`, which this crate includes by path.
//!
//! Must stay single-threaded: it calls `unshare(CLONE_NEWNS)` and `setns`
//! on itself and relies on signalfd with a blocked signal mask.

#[path = "../../engine/src/job.rs"]
#[allow(dead_code)]
mod job;

mod serve;
mod spec;
mod warm;

use anyhow::{bail, Context, Result};
use job::{Job, JobReport, Outcome};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn main() {
    // Diagnostics go to our own stderr; the engine logs them.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIMINAL_SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,libcgroups=error")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    match real_main() {
        Ok(()) => std::process::exit(job::HELPER_EXIT_REPORTED),
        Err(e) => {
            eprintln!("liminal-sandbox: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> Result<()> {
    // First thing: a cancel (SIGTERM) that arrives while we set up must not
    // kill us before we can clean up; supervise() picks it up via signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("blocking SIGTERM/SIGINT")?;
    // PLATFORM-NOTES pitfall 2: libcontainer forwards LISTEN_FDS into every
    // container. Single-threaded here, so mutating the environment is sound.
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(job::SERVE_ARG) {
        return serve::serve();
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the job from stdin")?;
    let job: Job = serde_json::from_str(&text).context("parsing the job")?;
    if args.get(1).map(String::as_str) == Some("--bench-loop") {
        let n: usize = args
            .get(2)
            .and_then(|a| a.parse().ok())
            .context("--bench-loop N")?;
        let pace = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
        return bench_loop(&job, n, Duration::from_millis(pace));
    }
    run_one(&job)
}

/// The one-job path: the job's descriptors are in place (inherited from the
/// engine, or placed by the fork server's child).
fn run_one(job: &Job) -> Result<()> {
    if job.version != job::PROTOCOL_VERSION {
        bail!(
            "job protocol version {} (this helper speaks {})",
            job.version,
            job::PROTOCOL_VERSION
        );
    }
    // SAFETY: the engine hands us this descriptor for exactly this purpose.
    let mut report_file = unsafe { File::from_raw_fd(job.report_fd) };
    let _span = tracing::info_span!("job", container = %job.container_id).entered();

    let report = run_job(job);
    let json = serde_json::to_vec(&report).context("encoding the report")?;
    report_file.write_all(&json).context("writing the report")?;
    Ok(())
}

/// Runs the job and always returns a report; cleanup happens on every path.
fn run_job(job: &Job) -> JobReport {
    let mut report = JobReport::pending();
    let created_parents = job::missing_cgroup_parents(&job.cgroup_path);
    match supervise(job, &mut report) {
        Ok(outcome) => report.outcome = outcome,
        Err(e) => {
            tracing::warn!("sandbox setup failed: {e:#}");
            report.outcome = Outcome::SetupFailed {
                message: format!("{e:#}"),
            }
        }
    }
    let t = Instant::now();
    report.oom_killed = report.oom_killed || job::cgroup_oom_kills(&job.cgroup_path) > 0;
    cleanup(job, &created_parents, &mut report.cleanup_errors);
    report.timings.delete_us = t.elapsed().as_micros() as u64;
    report
}

fn supervise(job: &Job, report: &mut JobReport) -> Result<Outcome> {
    let sigfd = setup(job)?;
    // SAFETY: the engine passes these descriptors for the container's stdio.
    let stdout = unsafe { OwnedFd::from_raw_fd(job.stdout_fd) };
    let stderr = unsafe { OwnedFd::from_raw_fd(job.stderr_fd) };
    launch(job, &sigfd, report, stdout, stderr)
}

/// Once per helper: cancel signals, private mount namespace, staged rootfs
/// and mounts, config.json, descriptor ownership.
fn setup(job: &Job) -> Result<SignalFd> {
    let sigfd = cancel_signalfd()?;
    private_mount_ns(job, Scratch::PerJob)?;
    stage(job)?;
    own_container_fds(job.id_map, job.uid, job.gid, container_fd_numbers(job))?;
    Ok(sigfd)
}

/// Signals that mean "cancel" arrive through a signalfd. The mask is
/// inherited by the container, so the executor clears it before exec.
fn cancel_signalfd() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    SignalFd::new(&mask).context("signalfd")
}

/// A private mount namespace for the helper: the staged rootfs, binds and
/// overlay (if any) live only here and disappear with the last process using
/// it, even if this helper is killed. So do the job's bundle and
/// libcontainer's state, in tmpfs instances mounted here
/// ([`mount_scratch`]), as `scratch` says.
fn private_mount_ns(job: &Job, scratch: Scratch<'_>) -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private in the helper's mount namespace")?;
    let mkdir =
        |d: &Path| std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()));
    match scratch {
        Scratch::PerJob => {
            for d in [&job.bundle, &job.state_root] {
                mkdir(d)?;
                mount_scratch(d)?;
            }
        }
        Scratch::Slots(dir) => {
            mount_scratch(dir)?;
            // Inside that tmpfs: made in memory.
            mkdir(&job.state_root)?;
        }
    }
    trim_cgroup_hierarchies();
    Ok(())
}

/// Where a helper's scratch tmpfs instances go.
#[derive(Clone, Copy)]
enum Scratch<'a> {
    /// One on the job's bundle and one on libcontainer's state root, each
    /// made on the disk if missing (the empty mount points stay there; the
    /// engine removes them with the run folder).
    PerJob,
    /// A warm slot: one on the slots' folder, which must exist, holding the
    /// slot's bundle and state root. A slot makes nothing on the disk, not
    /// even a mount point, so one still being made when its state dir is
    /// removed (a test's temporary folder, say) fails instead of bringing
    /// the folder back.
    Slots(&'a Path),
}

/// Mounts a fresh tmpfs on the existing folder `dir` in the helper's
/// private mount namespace. A run writes and removes its bundle
/// (config.json, mount points, overlay folders) and libcontainer's state
/// (state.json, the notify socket) exactly once: on the state disk that is
/// journalled inode work, about 1 ms of CPU per run on ext4 (measured with
/// perf, `benches/sandbox-latency`); here it is memory, and it is gone with
/// the namespace whatever happens to the helper. On the disk only the empty
/// mount point remains, which the engine removes with the run folder.
/// Nothing of the run's own output lives here: its workdir and /tmp are
/// bind mounts of folders on the disk.
fn mount_scratch(dir: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("liminal"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        // Bundles are a few KiB; the limits only bound a runaway.
        Some("mode=0755,size=16m,nr_inodes=16384"),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dir.display()))
}

/// The bundle: staged rootfs and bind sources, config.json.
fn stage(job: &Job) -> Result<()> {
    std::fs::create_dir_all(&job.bundle)
        .with_context(|| format!("creating bundle {}", job.bundle.display()))?;
    let rootfs = spec::prepare_rootfs(job)?;
    let config = spec::build(job, &rootfs)?; // rootfs: staged paths
    std::fs::write(job.bundle.join("config.json"), serde_json::to_vec(&config)?)
        .context("writing config.json")?;
    Ok(())
}

/// The descriptors the job hands to the container: its extra ones, stdout
/// and stderr.
fn container_fd_numbers(job: &Job) -> impl Iterator<Item = RawFd> {
    (0..job.preserved_fds as RawFd)
        .map(|i| job::FIRST_CONTAINER_FD + i)
        .chain([job.stdout_fd, job.stderr_fd])
}

/// Like runc's fixStdioPermissions: the pipes belong to host root, which is
/// unmapped inside, so reopening them (`echo > /dev/stderr`, i.e.
/// /proc/self/fd/2) would fail with EACCES. Give them to the mapped root.
fn own_container_fds(
    id_map: job::IdMap,
    uid: u32,
    gid: u32,
    fds: impl Iterator<Item = RawFd>,
) -> Result<()> {
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(id_map.host_id + uid),
        nix::unistd::Gid::from_raw(id_map.host_id + gid),
    );
    for fd in fds {
        nix::unistd::fchown(fd, Some(uid), Some(gid))
            .with_context(|| format!("fchown of descriptor {fd}"))?;
    }
    Ok(())
}

/// v1 controllers the sandbox uses: memory, pids and cpu for the plan's
/// limits; devices for the deny-all device rules; freezer (and devices, whose
/// cgroup.procs libcontainer lists) to kill the container's cgroup as a whole.
const USED_V1_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "devices", "freezer"];

/// Detaches, in the helper's private mount namespace only, the cgroup v1
/// hierarchies whose controllers the sandbox sets nothing in (cpuacct,
/// cpuset, blkio, net_cls, perf_event, hugetlb, ...). libcgroups 0.7 creates,
/// joins and removes a cgroup in every v1 hierarchy it can see, which costs
/// milliseconds per run for no limit at all; the container simply stays in
/// its parent's cgroup of those hierarchies. Best effort: a hierarchy that
/// stays mounted is merely slower.
fn trim_cgroup_hierarchies() {
    // For the benchmark's comparison only (benches/sandbox-latency).
    if std::env::var_os("LIMINAL_SANDBOX_ALL_CGROUPS").is_some() {
        return;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some("cgroup"), Some(_), Some(opts)) = (post.next(), post.next(), post.next()) else {
            continue;
        };
        let opts: Vec<&str> = opts.split(',').collect();
        // Named hierarchies (name=systemd) carry no controller; libcgroups
        // ignores them, and so do we.
        if opts.iter().any(|o| o.starts_with("name="))
            || opts.iter().any(|o| USED_V1_CONTROLLERS.contains(o))
        {
            continue;
        }
        let Some(mount_point) = pre.split(' ').nth(4) else {
            continue;
        };
        // Cgroup mount points under /sys/fs/cgroup have no characters that
        // mountinfo escapes; anything else is left alone.
        if mount_point.contains('\\') {
            continue;
        }
        if let Err(e) = nix::mount::umount2(mount_point, nix::mount::MntFlags::MNT_DETACH) {
            tracing::debug!("detaching cgroup hierarchy {mount_point}: {e}");
        }
    }
}

/// One container: create, start, wait (with timeout and cancel).
fn launch(
    job: &Job,
    sigfd: &SignalFd,
    report: &mut JobReport,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Outcome> {
    let t = Instant::now();
    let net = if job.network == job::Network::Loopback {
        Some(seqpacket_pair()?)
    } else {
        None
    };
    let executor = LiminalExecutor {
        writable: job.writable_paths.clone(),
        cpus: spec::first_cpus(job.resources.cpus)?,
        personality: job.personality,
        warm_socket: None,
        net_socket: net.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
    };
    let (mut container, pid) = create(job, executor, stdout, stderr)?;
    // Init has its copy; without ours, its exit reads as end of file.
    let net = net.map(|(ours, _)| ours);
    report.timings.create_us = t.elapsed().as_micros() as u64;

    let t = Instant::now();
    container.start().context("starting the container")?;
    if let Some(ours) = &net {
        loopback_handshake(ours).context("bringing loopback up")?;
    }
    report.timings.start_us = t.elapsed().as_micros() as u64;

    let t = Instant::now();
    let status = wait_with_deadline(job, &mut container, pid, sigfd, report)?;
    report.timings.wait_us = t.elapsed().as_micros() as u64;
    Ok(outcome_of(status))
}

fn outcome_of(status: WaitStatus) -> Outcome {
    match status {
        WaitStatus::Exited(_, code) => Outcome::Exited { code },
        WaitStatus::Signaled(_, sig, _) => Outcome::Signaled { signal: sig as i32 },
        other => Outcome::SetupFailed {
            message: format!("unexpected wait status {other:?}"),
        },
    }
}

/// Creates the container (libcontainer `create`: namespaces, rootfs,
/// cgroup, seccomp; init then waits for `start`) and hands it the job's
/// descriptors `3 .. 3 + preserved_fds`.
fn create(
    job: &Job,
    executor: LiminalExecutor,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<(Container, Pid)> {
    let devnull = File::open("/dev/null").context("opening /dev/null")?;
    let container = ContainerBuilder::new(job.container_id.clone(), SyscallType::default())
        .with_root_path(&job.state_root)
        .context("state root")?
        .with_preserved_fds(job.preserved_fds as i32)
        .with_executor(executor)
        .with_stdin(OwnedFd::from(devnull))
        .with_stdout(stdout)
        .with_stderr(stderr)
        .validate_id()
        .context("container id")?
        .as_init(&job.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .context("creating the container")?;
    // The container has its copies; ours would keep the engine's pipes open.
    for fd in 0..job.preserved_fds as RawFd {
        let _ = nix::unistd::close(job::FIRST_CONTAINER_FD + fd);
    }
    let pid = container.pid().context("created container has no pid")?;
    Ok((container, pid))
}

/// Waits for the init process; on timeout or cancel kills the whole cgroup
/// (TERM, grace, KILL) and still reaps it.
fn wait_with_deadline(
    job: &Job,
    container: &mut Container,
    pid: Pid,
    sigfd: &SignalFd,
    report: &mut JobReport,
) -> Result<WaitStatus> {
    let pidfd = pidfd_open(pid).context("pidfd_open")?;
    let deadline = Instant::now() + Duration::from_millis(job.timeout_ms);
    let mut kill_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let next = match kill_at {
            Some(k) => k,
            None => deadline,
        };
        let wait_ms = next.saturating_duration_since(now).as_millis().min(60_000) as u16 as i32;
        let wait_ms = if next <= now { 0 } else { wait_ms.max(1) };
        let mut fds = [
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(
            &mut fds,
            PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let exited = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        let signalled = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if exited {
            return waitpid(pid, None).context("waitpid");
        }
        if signalled {
            let _ = sigfd.read_signal();
            if !report.cancelled && !report.timed_out {
                tracing::info!("cancelled: stopping the container");
                report.cancelled = true;
                kill_all(container, Signal::SIGTERM);
                kill_at = Some(Instant::now() + Duration::from_millis(job.kill_grace_ms));
            }
            continue;
        }
        let now = Instant::now();
        match kill_at {
            None if now >= deadline => {
                tracing::info!(
                    "timeout after {} ms: stopping the container",
                    job.timeout_ms
                );
                report.timed_out = true;
                kill_all(container, Signal::SIGTERM);
                kill_at = Some(now + Duration::from_millis(job.kill_grace_ms));
            }
            Some(k) if now >= k => {
                kill_all(container, Signal::SIGKILL);
                // Init is gone after SIGKILL; poll again only to reap it.
                kill_at = Some(now + Duration::from_secs(3600));
            }
            _ => {}
        }
    }
}

fn kill_all(container: &mut Container, sig: Signal) {
    if let Err(e) = container.kill(sig, true) {
        tracing::warn!("kill {sig} to the container's cgroup: {e}");
    }
}

/// Deletes the container (state dir, cgroups) and anything setup left behind.
///
/// Not through libcontainer's `delete`: for a container without hooks that
/// is a kill of its cgroup, the removal of the cgroup in every hierarchy and
/// of its state folder, which [`job::teardown_cgroup`] (the sweep the engine
/// also uses after a crash: thaw, SIGKILL until empty, rmdir) and a
/// `remove_dir_all` do as well, without libcgroups re-reading mountinfo and
/// /proc/self/cgroup once per controller (2–3 ms per run on a loaded
/// machine). Every process of the container is in its cgroup, so nothing
/// survives either way.
fn cleanup(job: &Job, created_parents: &[PathBuf], errors: &mut Vec<String>) {
    errors.extend(job::teardown_cgroup(&job.cgroup_path));
    let dir = job.state_root.join(&job.container_id);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    job::remove_empty_dirs(created_parents);
}

#[derive(Clone)]
struct LiminalExecutor {
    writable: Vec<String>,
    /// Pinned before exec: `nproc` and thread pools see exactly `cpus` CPUs.
    cpus: Vec<usize>,
    /// Extra personality flags (ASLR off, 2.6 uname); 0 leaves it alone.
    personality: u32,
    /// A warm sandbox's init: the process to run (and everything above)
    /// arrives on this socket when a job takes the sandbox ([`warm`]).
    warm_socket: Option<RawFd>,
    /// `loopback` network, cold path: init sends its network namespace on
    /// this socket and waits until the helper has set `lo` up
    /// ([`loopback_handshake`]). Inherited from the helper (libcontainer
    /// keeps descriptors above the preserved ones open, close-on-exec,
    /// until exec).
    net_socket: Option<RawFd>,
}

impl Executor for LiminalExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        if let Some(sock) = self.warm_socket {
            return warm::exec_on_request(sock);
        }
        if let Some(sock) = self.net_socket {
            send_netns_and_wait(sock)?;
        }
        prepare_exec(&self.cpus, self.personality, &self.writable)?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        if self.warm_socket.is_some() {
            // The spec's process is a placeholder; the real one is checked
            // when it arrives.
            return Ok(());
        }
        DefaultExecutor {}.validate(spec)
    }
}

/// The last steps in the container before exec, on both paths: signal
/// state, CPU affinity, personality, landlock.
fn prepare_exec(
    cpus: &[usize],
    personality: u32,
    writable: &[String],
) -> Result<(), ExecutorError> {
    // The helper's blocked mask and Rust's ignored SIGPIPE would survive exec.
    let _ = SigSet::empty().thread_set_mask();
    let _ =
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // SAFETY: restoring a default disposition just before exec.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl);
    }
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)
            .map_err(|e| ExecutorError::Other(format!("cpu {c}: {e}")))?;
    }
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| ExecutorError::Other(format!("sched_setaffinity: {e}")))?;
    if personality != 0 {
        // Inherited across exec (ADDR_NO_RANDOMIZE is only cleared for
        // set-id programs, which the sandbox cannot gain anyway).
        let persona = nix::sys::personality::Persona::from_bits_retain(personality as i32);
        nix::sys::personality::set(persona)
            .map_err(|e| ExecutorError::Other(format!("personality: {e}")))?;
    }
    spec::restrict_writes(writable).map_err(|e| ExecutorError::Other(format!("landlock: {e}")))?;
    Ok(())
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A connected pair of close-on-exec SOCK_SEQPACKET sockets (message
/// boundaries kept, descriptors passed with SCM_RIGHTS).
pub(crate) fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("socketpair")
}

/// How long init may take from `start` to sending its network namespace.
const NETNS_TIMEOUT_MS: u16 = 10_000;

/// `loopback` network, helper side: receives init's network namespace,
/// sets `lo` up in it and lets init go on to exec. Init sends the namespace
/// itself because opening `/proc/<pid>/ns/net` of a process in another user
/// namespace needs ptrace access (CAP_SYS_PTRACE), which liminald.service
/// does not grant; a pidfd `setns` is refused the same way.
fn loopback_handshake(sock: &OwnedFd) -> Result<()> {
    let mut pfd = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    match poll(&mut pfd, PollTimeout::from(NETNS_TIMEOUT_MS)) {
        Ok(n) if n > 0 => {}
        Ok(_) => bail!("init sent no network namespace within 10 s"),
        Err(e) => return Err(e).context("poll"),
    }
    let mut buf = [0u8; 16];
    let netns = match warm::receive_with_fds(sock.as_raw_fd(), &mut buf).context("recvmsg")? {
        warm::Received::Message { mut fds, .. } if fds.len() == 1 => fds.remove(0),
        warm::Received::Eof => bail!("init exited before sending its network namespace"),
        warm::Received::Message { fds, .. } => {
            bail!(
                "init sent {} descriptors, not its network namespace",
                fds.len()
            )
        }
    };
    loopback_up(&netns)?;
    nix::sys::socket::send(sock.as_raw_fd(), b"up", nix::sys::socket::MsgFlags::empty())
        .context("telling init loopback is up")?;
    Ok(())
}

/// `loopback` network, init side (in the executor, before landlock and
/// exec): sends our network namespace and waits for the helper's word.
fn send_netns_and_wait(sock: RawFd) -> Result<(), ExecutorError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        ExecutorError::Other(format!("loopback: {what}: {e}"))
    };
    let ns = File::open("/proc/self/ns/net").map_err(|e| fail("own network namespace", &e))?;
    warm::send_with_fds(sock, b"net", &[ns.as_raw_fd()])
        .map_err(|e| fail("sending the network namespace", &e))?;
    drop(ns);
    let mut ack = [0u8; 4];
    match nix::sys::socket::recv(sock, &mut ack, nix::sys::socket::MsgFlags::empty()) {
        Ok(2) if &ack[..2] == b"up" => Ok(()),
        Ok(_) => Err(ExecutorError::Other(
            "loopback: the helper did not set lo up".into(),
        )),
        Err(e) => Err(fail("waiting for the helper", &e)),
    }
}

/// Enters a container's network namespace, sets `lo` up, comes back. Host
/// root owns the container's user namespace, so this needs no capability
/// inside the container.
pub(crate) fn loopback_up(netns: &OwnedFd) -> Result<()> {
    let own = File::open("/proc/self/ns/net").context("own netns")?;
    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    let result = set_lo_up();
    nix::sched::setns(own.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .context("returning to the host netns")?;
    result
}

fn set_lo_up() -> Result<()> {
    // SAFETY: a socket used only for the two interface ioctls below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain data; the name is NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
    }
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
    }
    Ok(())
}

/// `liminal-sandbox --bench-loop N [PACE_MS] < job.json`: the raw helper
/// loop for `benches/sandbox-latency`: setup once, then N times (after a
/// pause of PACE_MS) create, start, wait and delete in this process; one
/// JSON line of timings per run on stdout. The job's report fd is not used.
fn bench_loop(job: &Job, n: usize, pace: Duration) -> Result<()> {
    let sigfd = setup(job)?;
    let created_parents = job::missing_cgroup_parents(&job.cgroup_path);
    let mut out = std::io::stdout().lock();
    for _ in 0..n {
        std::thread::sleep(pace);
        let t = Instant::now();
        let mut report = JobReport::pending();
        let stdout = nix::unistd::dup(job.stdout_fd).context("dup stdout")?;
        let stderr = nix::unistd::dup(job.stderr_fd).context("dup stderr")?;
        // SAFETY: fresh descriptors from dup.
        let (stdout, stderr) =
            unsafe { (OwnedFd::from_raw_fd(stdout), OwnedFd::from_raw_fd(stderr)) };
        let outcome = launch(job, &sigfd, &mut report, stdout, stderr)?;
        let d = Instant::now();
        let mut errors = Vec::new();
        cleanup(job, &[], &mut errors);
        report.timings.delete_us = d.elapsed().as_micros() as u64;
        if outcome != (Outcome::Exited { code: 0 }) || !errors.is_empty() {
            bail!("bench run failed: {outcome:?} {errors:?}");
        }
        writeln!(
            out,
            "{{\"total_us\":{},\"create_us\":{},\"start_us\":{},\"wait_us\":{},\"delete_us\":{}}}",
            t.elapsed().as_micros(),
            report.timings.create_us,
            report.timings.start_us,
            report.timings.wait_us,
            report.timings.delete_us
        )?;
    }
    job::remove_empty_dirs(&created_parents);
    Ok(())
}
