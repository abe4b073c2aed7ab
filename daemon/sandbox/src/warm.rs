//! Warm sandboxes: the container for a plan's next run, created before that
//! run asks for it.
//!
//! After each job the fork server ([`crate::serve`]) forks a *slot*: a
//! helper child that creates and starts a container with the job's sandbox
//! configuration (same image, limits, namespaces, mount points, clocks) but
//! nothing of the run itself. The container's init stops in
//! [`exec_on_request`], inside every namespace, under seccomp, in its
//! cgroup, and waits on a socket. When a job with the same [`key`] arrives,
//! the server hands it to the slot instead of forking a fresh helper, and
//! the slot
//! 1. mounts the job's own bind sources (workdir, /tmp, inputs) over the
//!    placeholders the container was created with, as the host sees them
//!    now ([`late_mounts`]: `open_tree` in the host's mount namespace,
//!    `move_mount` in the container's);
//! 2. sends init the process (args, env, cwd) and its descriptors (stdout,
//!    stderr, signals pipe, secrets); init places them, applies CPU
//!    affinity, personality and landlock exactly as a cold container's
//!    executor does, and execs;
//! 3. waits, cleans up and reports as the one-job path does.
//!
//! So the run's critical path is the exec, the wait and the deletion; the
//! creation (namespaces, rootfs, cgroup, seccomp: most of the sandbox's
//! cost) happened while the machine was otherwise idle, at a lower CPU
//! priority.
//!
//! What keeps this equal to a cold run:
//! - the key holds every part of the job that shapes the container; the
//!   parts that do not (ids, paths, descriptors, process, timeout) arrive
//!   with the job;
//! - bind sources are mounted at job time from the host's mount namespace,
//!   so a source replaced or mounted over since the slot was made is seen
//!   as it is now; the image root must still be the same inode;
//! - a slot lives [`SLOT_TTL`] at most, so the time namespace's clocks
//!   (set to start at zero when the slot was made) still start near zero;
//! - anything unexpected (the container died, the key differs, nested
//!   mount targets) sends the job down the ordinary cold path, in the same
//!   child.

use crate::job::{self, Job, JobReport, Outcome};
use anyhow::{bail, Context, Result};
use libcontainer::container::Container;
use libcontainer::workload::ExecutorError;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A slot older than this is replaced: the container's clocks started at
/// zero when it was made, and a run must still see uptime near zero.
pub const SLOT_TTL: Duration = Duration::from_secs(3);
/// Slots of a key are kept (replaced at [`SLOT_TTL`]) this long after the
/// key's last job; then the key goes cold.
pub const KEEP_WARM: Duration = Duration::from_secs(60);
/// A slot's exit code when it may have left something of its own behind
/// (its report, if it had a job, was written): the fork server sweeps. A
/// slot that exits with `HELPER_EXIT_REPORTED` removed everything itself.
pub const SLOT_EXIT_SWEEP: i32 = 3;
/// At most this many slots exist (least recently used key goes first).
pub const MAX_SLOTS: usize = 3;
/// A key whose runs arrive back to back (each within [`BURST_GAP`] of the
/// one before) gets this many slots at once, so that a slot is made while
/// the one before it is still being made instead of after it: one container
/// takes longer to make than a `/bin/true` run takes, and with one slot the
/// next run waits for it. Idle keys go back to one slot when theirs expire.
pub const BURST_DEPTH: usize = 2;
/// Runs of a key this close together (hand-over to hand-over) are a burst.
pub const BURST_GAP: Duration = Duration::from_millis(20);
/// Nice value while a slot is being made, so that it yields to runs.
const SLOT_NICE: i32 = 10;
/// The init's end of the slot socket, preserved into the container.
const INIT_SOCKET_FD: RawFd = job::FIRST_CONTAINER_FD;
/// Received descriptors are parked at or above this number in init.
const PARK_FD: RawFd = 512;

/// Whether the fork server keeps warm slots (`LIMINAL_SANDBOX_WARM=0`: no).
pub fn enabled() -> bool {
    std::env::var_os("LIMINAL_SANDBOX_WARM").is_none_or(|v| v != "0")
}

/// A job's warm key, and whether each bind source is a folder (the slot's
/// placeholders copy that; the job's folders may be gone by the time the
/// slot is made).
#[derive(Clone)]
pub struct Keyed {
    pub key: String,
    pub source_is_dir: Vec<bool>,
}

/// The parts of a job that shape its container. Jobs with equal keys can
/// use each other's slots. `None`: this job never uses a slot.
pub fn key(job: &Job) -> Option<Keyed> {
    #[derive(Serialize)]
    struct Key<'a> {
        version: u32,
        rootfs: &'a Path,
        state_root: &'a Path,
        cgroup_parent: &'a str,
        hostname: &'a str,
        domainname: &'a str,
        umask: u32,
        cwd: &'a str,
        /// Target, read-only, source is a folder.
        mounts: Vec<(&'a str, bool, bool)>,
        network: job::Network,
        id_map: job::IdMap,
        resources: job::Limits,
        rlimits: &'a [job::Rlimit],
        reset_clocks: bool,
        uid: u32,
        gid: u32,
        clock_offset_secs: i64,
    }
    let (cgroup_parent, _) = job.cgroup_path.rsplit_once('/')?;
    let mut mounts = Vec::new();
    for m in &job.mounts {
        let meta = std::fs::metadata(&m.source).ok()?;
        mounts.push((m.target.as_str(), m.readonly, meta.is_dir()));
    }
    // A mount inside another one would need its mount point created in the
    // outer source at run time; such jobs stay cold.
    for (a, _, _) in &mounts {
        for (b, _, _) in &mounts {
            if a != b && Path::new(b).starts_with(a) {
                return None;
            }
        }
    }
    let source_is_dir = mounts.iter().map(|m| m.2).collect();
    let key = serde_json::to_string(&Key {
        version: job::PROTOCOL_VERSION,
        rootfs: &job.rootfs,
        state_root: &job.state_root,
        cgroup_parent,
        hostname: &job.hostname,
        domainname: &job.domainname,
        umask: job.umask,
        cwd: &job.cwd,
        mounts,
        network: job.network,
        id_map: job.id_map,
        resources: job.resources,
        rlimits: &job.rlimits,
        reset_clocks: job.reset_clocks,
        uid: job.uid,
        gid: job.gid,
        clock_offset_secs: job.clock_offset_secs,
    })
    .ok()?;
    Some(Keyed { key, source_is_dir })
}

/// The slot's own job: the template's container configuration under the
/// slot's name, with placeholder bind sources in the slot's bundle.
pub fn slot_job(template: &Job, name: &str) -> Job {
    let mut j = template.clone();
    let parent = template.cgroup_path.rsplit_once('/').map_or("", |(p, _)| p);
    j.container_id = name.to_owned();
    j.cgroup_path = format!("{parent}/{name}");
    // Not in the engine's `containers` and `runs`, which hold only runs.
    j.state_root = warm_dir(template).join("state");
    j.bundle = warm_dir(template).join(name);
    for (i, m) in j.mounts.iter_mut().enumerate() {
        m.source = j.bundle.join("placeholder").join(i.to_string());
    }
    j.preserved_fds = 1;
    j
}

/// Where slot bundles live: [`job::slots_dir`].
pub fn warm_dir(template: &Job) -> PathBuf {
    job::slots_dir(&template.state_root)
}

/// A slot's name: the run cgroups' prefix (so the engine's orphan sweep
/// knows it), `warm`, the server's pid and a counter.
pub fn slot_name(template: &Job, server: u32, n: u64) -> String {
    let last = template
        .cgroup_path
        .rsplit_once('/')
        .map_or(template.cgroup_path.as_str(), |(_, l)| l);
    let base = last.rsplit_once('-').map_or(last, |(b, _)| b);
    format!("{base}-warm{server}x{n}")
}

/// What init needs to become the job's process.
#[derive(Debug, Serialize, Deserialize)]
struct ExecRequest {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: String,
    writable: Vec<String>,
    cpus: Vec<usize>,
    personality: u32,
    /// Descriptors for `3 ..` (after stdout and stderr in the message).
    container_fds: u32,
}

// ---------------------------------------------------------------------------
// In the container's init (the executor of a warm container).

/// Waits for the job's process, then becomes it. Returns only on failure;
/// the failure is also sent back on the socket for the slot to report.
pub fn exec_on_request(sock: RawFd) -> Result<(), ExecutorError> {
    // First, our mount namespace for the slot's late mounts and our network
    // namespace for `lo`: opening /proc/<pid>/ns/* from outside needs ptrace
    // access to this process (CAP_SYS_PTRACE, which liminald.service does
    // not grant).
    let open = |kind: &str| {
        File::open(format!("/proc/self/ns/{kind}"))
            .map_err(|e| ExecutorError::Other(format!("warm sandbox: own {kind} namespace: {e}")))
    };
    let (mnt, net) = (open("mnt")?, open("net")?);
    send_with_fds(sock, b"ns", &[mnt.as_raw_fd(), net.as_raw_fd()])
        .map_err(|e| ExecutorError::Other(format!("warm sandbox: sending the namespaces: {e}")))?;
    drop((mnt, net));
    let received = match receive(sock) {
        Ok(Some(r)) => r,
        // The slot is being discarded: nothing ran, nothing to say.
        Ok(None) => std::process::exit(0),
        Err(e) => return Err(ExecutorError::Other(format!("warm sandbox: {e:#}"))),
    };
    let err = match become_job(sock, received) {
        Ok(never) => match never {},
        Err(e) => format!("{e:#}"),
    };
    Err(ExecutorError::Other(err))
}

enum Never {}

fn become_job(sock: RawFd, mut fds: Vec<OwnedFd>) -> Result<Never> {
    if fds.is_empty() {
        bail!("no request descriptor");
    }
    let mut text = String::new();
    File::from(fds.remove(0))
        .read_to_string(&mut text)
        .context("reading the process request")?;
    let req: ExecRequest = serde_json::from_str(&text).context("parsing the process request")?;
    let n = req.container_fds as usize;
    if fds.len() != 2 + n {
        bail!("{} descriptors for {} container descriptors", fds.len(), n);
    }
    // Park everything high (the socket too: failures go back on it), then
    // place: no move may overwrite a descriptor still to move.
    let park = |fd: RawFd| -> Result<OwnedFd> {
        let high = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(PARK_FD))
            .context("parking a descriptor")?;
        // SAFETY: fresh from F_DUPFD_CLOEXEC.
        Ok(unsafe { OwnedFd::from_raw_fd(high) })
    };
    let sock_high = park(sock)?;
    let parked: Vec<OwnedFd> = fds
        .iter()
        .map(|f| park(f.as_raw_fd()))
        .collect::<Result<_>>()?;
    drop(fds);
    let _ = nix::unistd::close(sock);
    let mut targets = vec![1, 2];
    targets.extend((0..n as RawFd).map(|i| job::FIRST_CONTAINER_FD + i));
    for (fd, &t) in parked.iter().zip(&targets) {
        nix::unistd::dup2(fd.as_raw_fd(), t).with_context(|| format!("placing descriptor {t}"))?;
    }
    // The parked copies and the socket are close-on-exec: the socket's EOF
    // tells the slot that exec happened.
    std::mem::forget(parked);
    std::mem::forget(sock_high);

    for (k, _) in std::env::vars_os() {
        // SAFETY: init is single-threaded.
        unsafe { std::env::remove_var(k) };
    }
    for (k, v) in &req.env {
        // SAFETY: as above.
        unsafe { std::env::set_var(k, v) };
    }
    nix::unistd::chdir(req.cwd.as_str()).with_context(|| format!("chdir to {}", req.cwd))?;
    crate::prepare_exec(&req.cpus, req.personality, &req.writable)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let args: Vec<std::ffi::CString> = req
        .args
        .iter()
        .map(|a| std::ffi::CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("an argument holds a NUL byte")?;
    let Some(program) = args.first() else {
        bail!("no command");
    };
    let e = nix::unistd::execvp(program, &args).unwrap_err();
    if e == nix::errno::Errno::ENOENT {
        bail!("executable '{}' not found in $PATH", req.args[0]);
    }
    bail!("executing '{}': {e}", req.args[0])
}

/// One message with descriptors; `None` on EOF.
fn receive(sock: RawFd) -> Result<Option<Vec<OwnedFd>>> {
    let mut buf = [0u8; 64];
    match receive_with_fds(sock, &mut buf).context("recvmsg")? {
        Received::Eof => Ok(None),
        Received::Message {
            truncated: true, ..
        } => bail!("too many descriptors"),
        Received::Message { fds, .. } => Ok(Some(fds)),
    }
}

/// What one `recvmsg` on a SOCK_SEQPACKET socket brought.
pub(crate) enum Received {
    /// The other end is closed (an empty message without descriptors).
    Eof,
    Message {
        len: usize,
        fds: Vec<OwnedFd>,
        /// Some descriptors did not fit (MSG_CTRUNC; the kernel closed them).
        truncated: bool,
    },
}

/// Receives one message into `buf`, with up to SCM_MAX_FD descriptors
/// (close-on-exec); retried on EINTR.
pub(crate) fn receive_with_fds(sock: RawFd, buf: &mut [u8]) -> nix::Result<Received> {
    let mut cmsg = nix::cmsg_space!([RawFd; job::SERVE_MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(Received::Eof);
    }
    Ok(Received::Message {
        len: msg.bytes,
        truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
        fds,
    })
}

/// Sends one message with descriptors (none: no control message).
pub(crate) fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    sendmsg::<()>(
        sock,
        &[IoSlice::new(bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
}

fn memfd_with(bytes: &[u8]) -> Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"liminal-exec", MemFdCreateFlag::MFD_CLOEXEC).context("memfd")?;
    let mut f = File::from(fd);
    f.write_all(bytes).context("writing a memfd")?;
    nix::unistd::lseek(f.as_raw_fd(), 0, nix::unistd::Whence::SeekSet).context("lseek")?;
    Ok(OwnedFd::from(f))
}

// ---------------------------------------------------------------------------
// In the slot (a child of the fork server).

/// A made slot, waiting for its job.
struct Made {
    slot: Job,
    created_parents: Vec<PathBuf>,
    container: Container,
    pid: Pid,
    pidfd: OwnedFd,
    /// Our end of init's socket.
    init: OwnedFd,
    sigfd: SignalFd,
    /// The slot's private mount namespace, and the container's (from init).
    slot_ns: File,
    container_ns: OwnedFd,
    /// Made at a lower priority, which the run must not keep.
    niced: bool,
    /// The image root's (device, inode) when the slot was made.
    rootfs_id: (u64, u64),
}

/// The slot child's whole life: make the container, wait for a job on
/// `server` (EOF: discarded), run it warm, or cold if the slot cannot take
/// it. Returns the process's exit code.
pub fn slot_main(template: &Job, source_is_dir: &[bool], name: &str, server: OwnedFd) -> i32 {
    let slot = slot_job(template, name);
    // Init's socket goes to this number later; hold it until then so that
    // nothing opened meanwhile lands there.
    let reserved = File::open("/dev/null").map(|f| {
        use std::os::fd::IntoRawFd;
        let fd = f.into_raw_fd();
        if fd == INIT_SOCKET_FD {
            return Ok(());
        }
        let moved = nix::unistd::dup2(fd, INIT_SOCKET_FD).map(|_| ());
        let _ = nix::unistd::close(fd);
        moved
    });
    if let Err(e) = reserved
        .map_err(anyhow::Error::from)
        .and_then(|r| r.map_err(anyhow::Error::from))
    {
        tracing::warn!("warm sandbox {name}: reserving descriptor 3: {e}");
        return 2;
    }
    let host_ns = match File::open("/proc/self/ns/mnt") {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("warm sandbox {name}: own mount namespace: {e}");
            return 2;
        }
    };
    let made = match make(source_is_dir, &slot) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!("warm sandbox {name}: {e:#}");
            back_to(&host_ns);
            discard_paths(&slot);
            None
        }
    };
    let received = match &made {
        Some(m) => idle(m, &server),
        None => receive(server.as_raw_fd()).ok().flatten(),
    };
    drop(server);
    // Whether everything the slot made is gone (its container, cgroup,
    // bundle): then the server has nothing to sweep.
    let mut clean = made.is_some();
    let Some(received) = received else {
        if let Some(m) = made {
            clean &= discard(m, &host_ns);
        }
        return if clean {
            job::HELPER_EXIT_REPORTED
        } else {
            SLOT_EXIT_SWEEP
        };
    };
    match take_job(made, &host_ns, received) {
        Ok(c) if c && clean => job::HELPER_EXIT_REPORTED,
        Ok(_) => SLOT_EXIT_SWEEP,
        Err(e) => {
            eprintln!("liminal-sandbox: {e:#}");
            2
        }
    }
}

fn back_to(ns: &File) {
    if let Err(e) = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS) {
        tracing::warn!("setns back to a mount namespace: {e}");
    }
}

/// Whether this process may raise a priority back (CAP_SYS_NICE, bit 23
/// of the effective set; liminald.service's bounding set lacks it).
fn can_renice() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 23) != 0)
}

fn make(source_is_dir: &[bool], slot: &Job) -> Result<Made> {
    // Made at a lower priority only where the run can get the normal one
    // back (the container's processes inherit it).
    let niced = can_renice();
    if niced {
        // SAFETY: plain syscall on ourselves.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SLOT_NICE) };
    }
    let rootfs_id = {
        let m = std::fs::metadata(&slot.rootfs)
            .with_context(|| format!("image {}", slot.rootfs.display()))?;
        (m.dev(), m.ino())
    };
    if source_is_dir.len() != slot.mounts.len() {
        bail!(
            "{} mount kinds for {} mounts",
            source_is_dir.len(),
            slot.mounts.len()
        );
    }
    let created_parents = job::missing_cgroup_parents(&slot.cgroup_path);
    let sigfd = crate::cancel_signalfd()?;
    // The bundle, placeholders included, is in a tmpfs of this namespace
    // mounted on the slots' folder: nothing of it is on the disk, not even
    // its mount point (an inode made and removed per run, journalled).
    let slots_dir = slot
        .bundle
        .parent()
        .context("slot bundle without a parent")?;
    crate::private_mount_ns(slot, crate::Scratch::Slots(slots_dir))?;
    // Placeholders of the template's kinds (folder or file: in the key).
    for (&is_dir, m) in source_is_dir.iter().zip(&slot.mounts) {
        let p = &m.source;
        std::fs::create_dir_all(p.parent().context("placeholder parent")?)
            .with_context(|| format!("creating {}", p.display()))?;
        if is_dir {
            std::fs::create_dir_all(p)
        } else {
            File::create(p).map(|_| ())
        }
        .with_context(|| format!("creating {}", p.display()))?;
    }
    crate::stage(slot)?;
    let slot_ns = File::open("/proc/self/ns/mnt").context("slot mount namespace")?;

    let (ours, theirs) = crate::seqpacket_pair()?;
    // libcontainer preserves 3 .. 3 + preserved_fds (= 1) into init.
    nix::unistd::dup2(theirs.as_raw_fd(), INIT_SOCKET_FD).context("placing init's socket")?;
    drop(theirs);
    let out = File::options()
        .write(true)
        .open("/dev/null")
        .context("/dev/null")?;
    let err = out.try_clone().context("/dev/null")?;
    let executor = crate::LiminalExecutor {
        writable: Vec::new(),
        cpus: Vec::new(),
        personality: 0,
        warm_socket: Some(INIT_SOCKET_FD),
        net_socket: None,
    };
    let (mut container, pid) = crate::create(slot, executor, out.into(), err.into())?;
    container.start().context("starting the warm container")?;
    let pidfd = crate::pidfd_open(pid).context("pidfd_open")?;
    // Init's first message: its mount and network namespaces.
    let container_ns = {
        let mut pfd = [PollFd::new(ours.as_fd(), PollFlags::POLLIN)];
        match poll(&mut pfd, PollTimeout::from(10_000u16)) {
            Ok(n) if n > 0 => {}
            _ => bail!("the warm container's init did not answer"),
        }
        let (mnt, net) = match receive(ours.as_raw_fd())? {
            Some(fds) if fds.len() == 2 => {
                let mut fds = fds.into_iter();
                (fds.next(), fds.next())
            }
            _ => bail!("the warm container's init sent no namespaces"),
        };
        if slot.network == job::Network::Loopback {
            if let Some(net) = &net {
                crate::loopback_up(net).context("bringing loopback up")?;
            }
        }
        mnt.context("the warm container's mount namespace")?
    };
    if niced {
        // SAFETY: as above.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) };
    }
    Ok(Made {
        slot: slot.clone(),
        created_parents,
        container,
        pid,
        pidfd,
        init: ours,
        sigfd,
        slot_ns,
        container_ns,
        niced,
        rootfs_id,
    })
}

/// Waits for the job's message. `None`: discard (the server is gone or done
/// with us, a cancel signal, or the container died).
fn idle(m: &Made, server: &OwnedFd) -> Option<Vec<OwnedFd>> {
    loop {
        let mut fds = [
            PollFd::new(server.as_fd(), PollFlags::POLLIN),
            PollFd::new(m.pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(m.sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
        let ready = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        // A job first: a cancel signal pending with it is that job's (the
        // wait sees it, still unread, and stops the run).
        if ready(0).contains(PollFlags::POLLIN) {
            return match receive(server.as_raw_fd()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("warm sandbox {}: {e:#}", m.slot.container_id);
                    None
                }
            };
        }
        if !ready(0).is_empty() || !ready(1).is_empty() || !ready(2).is_empty() {
            tracing::debug!(
                "warm sandbox {}: discarded (server {:?}, container {:?}, signal {:?})",
                m.slot.container_id,
                ready(0),
                ready(1),
                ready(2)
            );
            return None;
        }
    }
}

fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Kills and removes the slot's container; ends in the host's namespace.
/// Whether all of it went.
fn discard(m: Made, host_ns: &File) -> bool {
    let mut errors = Vec::new();
    let slot = m.slot.clone();
    remove_container(m, host_ns, &mut errors);
    // No run waits on this: the server may be gone, so clean up here.
    discard_paths(&slot);
    for e in &errors {
        tracing::warn!("warm sandbox: {e}");
    }
    errors.is_empty() && !slot.bundle.exists()
}

fn remove_container(m: Made, host_ns: &File, errors: &mut Vec<String>) {
    let Made {
        slot,
        created_parents,
        container,
        init,
        ..
    } = m;
    drop(init);
    drop(container);
    crate::cleanup(&slot, &created_parents, errors);
    back_to(host_ns);
}

/// Removes a slot's bundle (from outside the slot's mount namespace).
pub fn discard_paths(slot: &Job) {
    if let Err(e) = remove_unmounted(&slot.bundle) {
        tracing::warn!("warm sandbox {}: {e:#}", slot.container_id);
    }
}

/// `remove_dir_all`, refusing if anything is mounted beneath `dir` in this
/// mount namespace: in the slot's own, the image is bind-mounted there.
fn remove_unmounted(dir: &Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("mountinfo")?;
    for line in info.lines() {
        if let Some(point) = line.split(' ').nth(4) {
            if Path::new(point).starts_with(dir) {
                bail!("not removing {}: {point} is mounted", dir.display());
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The job arrived, with its descriptors as the fork server receives them
/// (job memfd, child stderr, container descriptors, stdout, stderr, report).
/// `Ok(true)`: run warm, and everything the slot made is gone.
fn take_job(made: Option<Made>, host_ns: &File, received: Vec<OwnedFd>) -> Result<bool> {
    let mut received = received.into_iter();
    let memfd = received.next().context("no job descriptor")?;
    let child_stderr = received.next().context("no stderr descriptor")?;
    nix::unistd::dup2(child_stderr.as_raw_fd(), 2).context("placing stderr")?;
    drop(child_stderr);
    let job = crate::serve::job_from_memfd(&memfd)?;
    drop(memfd);
    if job.version != job::PROTOCOL_VERSION {
        bail!(
            "job protocol version {} (this helper speaks {})",
            job.version,
            job::PROTOCOL_VERSION
        );
    }
    let mut rest: Vec<OwnedFd> = received.collect();
    let n = job.preserved_fds as usize;
    if rest.len() != n + 3 {
        bail!(
            "{} descriptors for a job with {} container descriptors",
            rest.len() + 2,
            n
        );
    }
    let report_fd = rest.pop().context("no report descriptor")?;

    // The server matched the job's key (computed in the host's namespace)
    // against this slot's before handing it over; it can still have died.
    let fits = |m: &Made| !exited(&m.pidfd);
    match made {
        Some(m) if fits(&m) => {
            let _span = tracing::info_span!("job", container = %job.container_id, warm = %m.slot.container_id).entered();
            let bundle = m.slot.bundle.clone();
            let report = run_warm(&job, m, host_ns, rest);
            let json = serde_json::to_vec(&report).context("encoding the report")?;
            File::from(report_fd)
                .write_all(&json)
                .context("writing the report")?;
            // The bundle was in a tmpfs of our namespace, so on the disk
            // there is nothing to remove; if there is (a bug), remove it or
            // let the server sweep.
            let bundle_gone = match std::fs::remove_dir(&bundle) {
                Ok(()) => true,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            if !(report.cleanup_errors.is_empty() && bundle_gone) {
                tracing::debug!(errors = ?report.cleanup_errors, bundle_gone, "the slot leaves something to sweep");
            }
            Ok(report.cleanup_errors.is_empty() && bundle_gone)
        }
        other => {
            if let Some(m) = other {
                discard(m, host_ns);
            }
            // Cold, from the host's mount namespace: the descriptors at the
            // job's numbers and the one-job path, as a forked child does.
            back_to(host_ns);
            rest.push(report_fd);
            let mut targets: Vec<RawFd> = (0..n as RawFd)
                .map(|i| job::FIRST_CONTAINER_FD + i)
                .collect();
            targets.extend([job.stdout_fd, job.stderr_fd, job.report_fd]);
            crate::serve::place(rest, &targets)?;
            crate::run_one(&job)?;
            // The slot's own leftovers, if any, are the server's to sweep.
            Ok(false)
        }
    }
}

/// The job in the made container; always returns a report, cleanup done.
fn run_warm(job: &Job, mut m: Made, host_ns: &File, mut fds: Vec<OwnedFd>) -> JobReport {
    let mut report = JobReport::pending();
    report.timings.warm = true;
    let t = Instant::now();
    let started = hand_over(job, &m, host_ns, &mut fds);
    // Ours would keep the engine's pipes open after the container is gone.
    drop(fds);
    let outcome = started.and_then(|()| {
        report.timings.start_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let status =
            crate::wait_with_deadline(job, &mut m.container, m.pid, &m.sigfd, &mut report)?;
        report.timings.wait_us = t.elapsed().as_micros() as u64;
        Ok(crate::outcome_of(status))
    });
    report.outcome = outcome.unwrap_or_else(|e| {
        tracing::warn!("warm sandbox: {e:#}");
        Outcome::SetupFailed {
            message: format!("{e:#}"),
        }
    });
    let t = Instant::now();
    report.oom_killed = report.oom_killed || job::cgroup_oom_kills(&m.slot.cgroup_path) > 0;
    remove_container(m, host_ns, &mut report.cleanup_errors);
    report.timings.delete_us = t.elapsed().as_micros() as u64;
    tracing::debug!(
        "warm run: start {} us, wait {} us, delete {} us",
        report.timings.start_us,
        report.timings.wait_us,
        report.timings.delete_us
    );
    report
}

/// Mounts, descriptors and process to init; returns once init has exec'd.
fn hand_over(job: &Job, m: &Made, host_ns: &File, fds: &mut [OwnedFd]) -> Result<()> {
    let n = job.preserved_fds as usize;
    let (container_fds, stdio) = fds.split_at(n);
    let raw: Vec<RawFd> = stdio
        .iter()
        .chain(container_fds)
        .map(|f| f.as_raw_fd())
        .collect();
    crate::own_container_fds(job.id_map, job.uid, job.gid, raw.iter().copied())?;
    late_mounts(job, m, host_ns)?;
    // Made at a lower priority; the run gets the normal one. (Without
    // CAP_SYS_NICE it was made at the normal one: init runs as another uid,
    // which setpriority refuses even for an unchanged value.)
    // SAFETY: plain syscall on our container's init.
    if m.niced
        && unsafe { libc::setpriority(libc::PRIO_PROCESS, m.pid.as_raw() as libc::id_t, 0) } != 0
    {
        return Err(std::io::Error::last_os_error()).context("restoring the container's priority");
    }
    let req = ExecRequest {
        args: job.args.clone(),
        env: job.env.clone(),
        cwd: job.cwd.clone(),
        writable: job.writable_paths.clone(),
        cpus: crate::spec::first_cpus(job.resources.cpus)?,
        personality: job.personality,
        container_fds: job.preserved_fds,
    };
    let memfd = memfd_with(&serde_json::to_vec(&req).context("encoding the process")?)?;
    let mut all = vec![memfd.as_raw_fd()];
    all.extend(raw);
    send_with_fds(m.init.as_raw_fd(), b"job", &all).context("handing the job to the container")?;
    // EOF: init exec'd (its end is close-on-exec) or died (the wait tells).
    let mut buf = vec![0u8; 8192];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let got = loop {
        match recvmsg::<()>(m.init.as_raw_fd(), &mut iov, None, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.context("waiting for the container's exec")?.bytes,
        }
    };
    if got > 0 {
        bail!("{}", String::from_utf8_lossy(&buf[..got]));
    }
    Ok(())
}

/// Mounts the job's bind sources over the container's placeholders: each
/// source cloned (`open_tree`) in the host's mount namespace as it is now,
/// then attached (`move_mount`) in the container's.
fn late_mounts(job: &Job, m: &Made, host_ns: &File) -> Result<()> {
    use nix::sched::{setns, CloneFlags};
    setns(host_ns.as_fd(), CloneFlags::CLONE_NEWNS)
        .context("entering the host's mount namespace")?;
    let result = (|| -> Result<()> {
        let meta = std::fs::metadata(&job.rootfs)
            .with_context(|| format!("image {}", job.rootfs.display()))?;
        if (meta.dev(), meta.ino()) != m.rootfs_id {
            bail!("the image root {} was replaced", job.rootfs.display());
        }
        let trees = job
            .mounts
            .iter()
            .map(|b| clone_tree(&b.source, b.readonly))
            .collect::<Result<Vec<_>>>()?;
        let ns = &m.container_ns;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNS)
            .context("entering the container's mount namespace")?;
        for (b, tree) in job.mounts.iter().zip(&trees) {
            attach(tree, &b.target)?;
        }
        Ok(())
    })();
    setns(m.slot_ns.as_fd(), CloneFlags::CLONE_NEWNS)
        .context("back to the slot's mount namespace")?;
    result
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached, private, recursive copy of `source` (nosuid, nodev, and
/// read-only if asked, as the cold path's bind options).
fn clone_tree(source: &Path, readonly: bool) -> Result<OwnedFd> {
    let path = std::ffi::CString::new(source.as_os_str().as_encoded_bytes())
        .context("a mount source holds a NUL byte")?;
    // SAFETY: plain syscall; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("open_tree {}", source.display()));
    }
    // SAFETY: just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: attr outlives the call; its size is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount_setattr {}", source.display()));
    }
    Ok(fd)
}

fn attach(tree: &OwnedFd, target: &str) -> Result<()> {
    let to = std::ffi::CString::new(target).context("a mount target holds a NUL byte")?;
    // SAFETY: plain syscall with valid strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("move_mount to {target}"));
    }
    Ok(())
}
