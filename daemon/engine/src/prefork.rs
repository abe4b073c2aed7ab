//! The warm sandbox helper: one `liminal-sandbox --serve` fork server per
//! helper binary, started with the first run and kept for the next ones
//! (protocol in [`crate::job`]). A run hands it the job and descriptors and
//! gets back a pidfd of a freshly forked single-threaded child that runs the
//! job exactly as a helper spawned for it would: exec, dynamic loading and
//! process start-up leave the per-run path.
//!
//! libcontainer still never runs in this (multi-threaded) process, nor in a
//! multi-threaded one: the server and its children are single-threaded.
//!
//! Any failure to use the server (it died, refused, hung) is reported to the
//! runner, which then spawns a helper for the run as before. Set
//! `LIMINAL_SANDBOX_PREFORK=0` to always spawn.

use crate::job::{self, ServeReply, ServeRequest};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// How long a server may take to fork and answer before it counts as hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PreforkError {
    #[error("starting the fork server {}: {source}", helper.display())]
    Spawn {
        helper: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fork server: {0}")]
    Io(#[from] nix::errno::Errno),
    #[error("fork server: {0}")]
    Protocol(String),
    #[error("fork server refused the job: {0}")]
    Refused(String),
}

/// A job child forked by the server: not our child, so it is watched and
/// signalled through its pidfd.
pub struct Forked {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    /// A warm slot's container cgroup (not the job's), if the job went to one.
    pub cgroup_path: Option<String>,
}

/// The descriptors a job needs, borrowed: the caller closes its copies once
/// the child has them (or hands them to a spawned helper instead).
pub struct JobFds<'a> {
    /// Write end for the child's own diagnostics (becomes its stderr).
    pub helper_stderr: BorrowedFd<'a>,
    /// The container's descriptors, from `FIRST_CONTAINER_FD` on.
    pub container: Vec<BorrowedFd<'a>>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    pub report: BorrowedFd<'a>,
}

struct Server {
    process: Child,
    sock: OwnedFd,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Jobs it forked live on on their own; only the server goes.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

static SERVERS: Mutex<BTreeMap<PathBuf, Server>> = Mutex::new(BTreeMap::new());

/// Whether runs go through the fork server (`LIMINAL_SANDBOX_PREFORK=0`: no).
pub fn enabled() -> bool {
    std::env::var_os("LIMINAL_SANDBOX_PREFORK").is_none_or(|v| v != "0")
}

/// Hands one job to the fork server of `helper` (started if needed, and
/// restarted once if it died since the last run).
pub fn start_job(helper: &Path, job_json: &[u8], fds: &JobFds) -> Result<Forked, PreforkError> {
    let n = job::SERVE_FIXED_FDS + fds.container.len();
    if n > job::SERVE_MAX_FDS {
        return Err(PreforkError::Protocol(format!(
            "{n} descriptors do not fit one message"
        )));
    }
    let memfd = job_memfd(job_json)?;
    let mut raw: Vec<RawFd> = vec![memfd.as_raw_fd(), fds.helper_stderr.as_raw_fd()];
    raw.extend(fds.container.iter().map(|f| f.as_raw_fd()));
    raw.extend([
        fds.stdout.as_raw_fd(),
        fds.stderr.as_raw_fd(),
        fds.report.as_raw_fd(),
    ]);
    let request = serde_json::to_vec(&ServeRequest {
        version: job::PROTOCOL_VERSION,
        retire: None,
    })
    .map_err(|e| PreforkError::Protocol(e.to_string()))?;

    let mut servers = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..2 {
        let alive = match servers.get_mut(helper) {
            Some(s) => matches!(s.process.try_wait(), Ok(None)),
            None => false,
        };
        if !alive {
            servers.remove(helper);
            servers.insert(helper.to_owned(), spawn(helper)?);
        }
        let Some(server) = servers.get(helper) else {
            return Err(PreforkError::Protocol("no server".into()));
        };
        match exchange(server, &request, &raw).and_then(started) {
            Ok(forked) => return Ok(forked),
            // A refusal is about this job; another server would say the same.
            Err(e @ PreforkError::Refused(_)) => return Err(e),
            Err(e) => {
                tracing::warn!("fork server failed ({e}); restarting it");
                servers.remove(helper);
                if attempt == 1 {
                    return Err(e);
                }
            }
        }
    }
    Err(PreforkError::Protocol("unreachable".into()))
}

/// Asks the running fork server of `helper`, if any (none is started for
/// this), to drop the warm slots it made for jobs with `state_root`; returns
/// how many. Once it returns no slot is still making a container in that
/// state dir, so the dir can go.
pub fn retire(helper: &Path, state_root: &Path) -> Result<usize, PreforkError> {
    let mut servers = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(server) = servers.get_mut(helper) else {
        return Ok(0);
    };
    if !matches!(server.process.try_wait(), Ok(None)) {
        servers.remove(helper);
        return Ok(0);
    }
    let request = serde_json::to_vec(&ServeRequest {
        version: job::PROTOCOL_VERSION,
        retire: Some(state_root.to_owned()),
    })
    .map_err(|e| PreforkError::Protocol(e.to_string()))?;
    match exchange(server, &request, &[])? {
        (ServeReply::Retired { slots }, _) => Ok(slots),
        (ServeReply::Refused { message }, _) => Err(PreforkError::Refused(message)),
        (other, _) => Err(PreforkError::Protocol(format!(
            "unexpected reply to retire: {other:?}"
        ))),
    }
}

fn job_memfd(job_json: &[u8]) -> Result<OwnedFd, PreforkError> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"liminal-job", MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(job_json)
        .map_err(|e| PreforkError::Protocol(format!("writing the job memfd: {e}")))?;
    // The child reads it from the start through its own descriptor, which
    // shares this offset.
    nix::unistd::lseek(f.as_raw_fd(), 0, nix::unistd::Whence::SeekSet)?;
    Ok(OwnedFd::from(f))
}

fn spawn(helper: &Path) -> Result<Server, PreforkError> {
    use command_fds::{CommandFdExt, FdMapping};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let mut cmd = Command::new(helper);
    cmd.arg(job::SERVE_ARG)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its own diagnostics (a job child's go to the run's helper pipe).
        .stderr(Stdio::inherit());
    for var in ["LIMINAL_SANDBOX_LOG", "LIMINAL_SANDBOX_WARM"] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs,
        child_fd: job::SERVE_FD,
    }])
    .map_err(|e| PreforkError::Protocol(e.to_string()))?;
    let process = cmd.spawn().map_err(|source| PreforkError::Spawn {
        helper: helper.to_owned(),
        source,
    })?;
    // The server's end lives on only in the server.
    drop(cmd);
    tracing::debug!(pid = process.id(), "sandbox fork server started");
    Ok(Server {
        process,
        sock: ours,
    })
}

/// One request (with `raw` descriptors, if any) and its reply, with the
/// descriptor that rode along, if any.
fn exchange(
    server: &Server,
    request: &[u8],
    raw: &[RawFd],
) -> Result<(ServeReply, Option<OwnedFd>), PreforkError> {
    let rights = [ControlMessage::ScmRights(raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        server.sock.as_raw_fd(),
        &[IoSlice::new(request)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    let mut pfd = [nix::poll::PollFd::new(
        server.sock.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = REPLY_TIMEOUT.as_millis() as u16;
    loop {
        match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
            Ok(0) => return Err(PreforkError::Protocol("no reply in time".into())),
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        server.sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut pidfd = None;
    for c in msg
        .cmsgs()
        .map_err(|e| PreforkError::Protocol(e.to_string()))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed it for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                pidfd.get_or_insert(owned);
            }
        }
    }
    let len = msg.bytes;
    if len == 0 {
        return Err(PreforkError::Protocol("server hung up".into()));
    }
    serde_json::from_slice::<ServeReply>(&buf[..len])
        .map(|r| (r, pidfd))
        .map_err(|e| PreforkError::Protocol(format!("bad reply: {e}")))
}

/// The reply to a job: the child that runs it.
fn started((reply, pidfd): (ServeReply, Option<OwnedFd>)) -> Result<Forked, PreforkError> {
    match reply {
        ServeReply::Started { pid, cgroup_path } => match pidfd {
            Some(pidfd) => Ok(Forked {
                pid: Pid::from_raw(pid),
                pidfd,
                cgroup_path,
            }),
            None => Err(PreforkError::Protocol("reply without a pidfd".into())),
        },
        ServeReply::Refused { message } => Err(PreforkError::Refused(message)),
        other => Err(PreforkError::Protocol(format!(
            "unexpected reply to a job: {other:?}"
        ))),
    }
}

/// Sends `sig` to the process behind `pidfd` (never to a reused pid).
pub fn pidfd_signal(pidfd: &OwnedFd, sig: nix::sys::signal::Signal) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc_syscall_pidfd_send_signal(pidfd.as_raw_fd(), sig as i32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process behind `pidfd` has exited, waiting up to `timeout`
/// (`None`: forever).
pub fn pidfd_exited(pidfd: &OwnedFd, timeout: Option<Duration>) -> bool {
    let t = match timeout {
        None => nix::poll::PollTimeout::NONE,
        Some(d) => nix::poll::PollTimeout::try_from(d.as_millis().min(60_000) as i32)
            .unwrap_or(nix::poll::PollTimeout::MAX),
    };
    let mut pfd = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    loop {
        match nix::poll::poll(&mut pfd, t) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

unsafe fn libc_syscall_pidfd_send_signal(pidfd: RawFd, sig: i32) -> i64 {
    nix::libc::syscall(
        nix::libc::SYS_pidfd_send_signal,
        pidfd,
        sig,
        std::ptr::null::<nix::libc::siginfo_t>(),
        0u32,
    )
}
