//! Fork-server mode (`liminal-sandbox --serve`, protocol in
//! `liminal_engine::job`): stays single-threaded, waits for jobs on its
//! socket and forks a fresh child per job. The child places the received
//! descriptors at the numbers the job names and runs the one-job path, so a
//! job behaves exactly as in a helper spawned for it, minus exec, dynamic
//! loading and start-up.
//!
//! The server itself touches no mounts, cgroups or containers: it stays in
//! the engine's mount namespace, so each child's private namespace copies
//! the host's mounts as they are when the job arrives (a mount the engine
//! made a moment ago, say a reproducibility check's file-order view, is
//! there).

use crate::job::{self, Job, ServeReply, ServeRequest};
use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Received descriptors are parked at or above this number while they are
/// moved to their final numbers (which are small: 2, 3, 4, ...).
const PARK_FD: RawFd = 512;

/// Serves until the engine closes its end or SIGTERM/SIGINT arrives.
/// SIGTERM and SIGINT are already blocked (`real_main`).
pub fn serve() -> Result<()> {
    // SAFETY: the engine spawns us with the socket at this number.
    let sock = unsafe { OwnedFd::from_raw_fd(job::SERVE_FD) };
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGCHLD);
    mask.thread_block().context("blocking SIGCHLD")?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("signalfd")?;
    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let request = fds[0].revents().unwrap_or(PollFlags::empty());
        let signalled = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if signalled {
            while let Ok(Some(info)) = sigfd.read_signal() {
                if info.ssi_signo != Signal::SIGCHLD as u32 {
                    tracing::info!("fork server stopping on signal {}", info.ssi_signo);
                    return Ok(());
                }
            }
        }
        reap();
        if request.contains(PollFlags::POLLIN) {
            if !handle(&sock, &sigfd)? {
                return Ok(());
            }
        } else if request.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            return Ok(());
        }
    }
}

/// Reaps every finished child (the engine watches them through pidfds).
fn reap() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// One request: receive, fork, reply. `Ok(false)`: the engine hung up.
fn handle(sock: &OwnedFd, sigfd: &SignalFd) -> Result<bool> {
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; job::SERVE_MAX_FDS]);
    let (len, received) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => return Ok(true),
            Err(e) => return Err(e).context("recvmsg"),
        };
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return reply(sock, &refused("too many descriptors"), None).map(|_| true);
        }
        let mut received = Vec::new();
        for c in msg.cmsgs().context("control messages")? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                received.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, received)
    };
    if len == 0 && received.is_empty() {
        return Ok(false);
    }
    let req: ServeRequest = match serde_json::from_slice(&buf[..len]) {
        Ok(r) => r,
        Err(e) => return reply(sock, &refused(&format!("bad request: {e}")), None).map(|_| true),
    };
    if req.version != job::PROTOCOL_VERSION {
        let msg = format!(
            "job protocol version {} (this helper speaks {})",
            req.version,
            job::PROTOCOL_VERSION
        );
        return reply(sock, &refused(&msg), None).map(|_| true);
    }
    if received.len() < job::SERVE_FIXED_FDS {
        let msg = format!("{} descriptors in the request", received.len());
        return reply(sock, &refused(&msg), None).map(|_| true);
    }
    // SAFETY: single-threaded (the whole helper is), so the child may run
    // arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => reply(sock, &refused(&format!("fork: {e}")), None).map(|_| true),
        Ok(ForkResult::Child) => {
            // Not ours in the child: no destructor may run on these (exit
            // below never returns), close them by number.
            let _ = nix::unistd::close(sock.as_raw_fd());
            let _ = nix::unistd::close(sigfd.as_raw_fd());
            let code = match child(received) {
                Ok(()) => job::HELPER_EXIT_REPORTED,
                Err(e) => {
                    eprintln!("liminal-sandbox: {e:#}");
                    2
                }
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(received);
            // Opened before the child can be reaped (only this loop reaps),
            // so the pid still names our child.
            let pidfd = crate::pidfd_open(child);
            match pidfd {
                Ok(pidfd) => reply(
                    sock,
                    &ServeReply::Started {
                        pid: child.as_raw(),
                    },
                    Some(&pidfd),
                )?,
                Err(e) => {
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    reply(sock, &refused(&format!("pidfd_open: {e}")), None)?
                }
            }
            Ok(true)
        }
    }
}

fn refused(message: &str) -> ServeReply {
    ServeReply::Refused {
        message: message.to_owned(),
    }
}

fn reply(sock: &OwnedFd, r: &ServeReply, fd: Option<&OwnedFd>) -> Result<()> {
    let bytes = serde_json::to_vec(r).context("encoding the reply")?;
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .context("sending the reply")?;
    Ok(())
}

/// In the forked child: the job from its memfd, descriptors to their
/// numbers, then the one-job path.
fn child(received: Vec<OwnedFd>) -> Result<()> {
    // Only TERM and INT stay blocked (for the job's signalfd); a SIGCHLD
    // pending in the server is not inherited.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_unblock().context("unblocking SIGCHLD")?;
    let mut received = received.into_iter();
    let mut memfd = std::fs::File::from(received.next().context("no job descriptor")?);
    let mut text = String::new();
    memfd
        .read_to_string(&mut text)
        .context("reading the job from its memfd")?;
    drop(memfd);
    let job: Job = serde_json::from_str(&text).context("parsing the job")?;
    let rest: Vec<OwnedFd> = received.collect();
    let n = job.preserved_fds as usize;
    if rest.len() != 1 + n + 3 {
        bail!(
            "{} descriptors for a job with {} container descriptors",
            rest.len() + 1,
            n
        );
    }
    let mut targets = vec![2];
    targets.extend((0..n as RawFd).map(|i| job::FIRST_CONTAINER_FD + i));
    targets.extend([job.stdout_fd, job.stderr_fd, job.report_fd]);
    place(rest, &targets)?;
    crate::run_one(&job)
}

/// Moves each descriptor to its target number (without CLOEXEC). Parking
/// them high first means no move overwrites a descriptor still to move.
fn place(fds: Vec<OwnedFd>, targets: &[RawFd]) -> Result<()> {
    let mut sorted = targets.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != targets.len() || sorted.iter().any(|&t| !(0..PARK_FD).contains(&t)) {
        bail!("bad descriptor numbers {targets:?}");
    }
    let mut parked = Vec::new();
    for fd in fds {
        let high = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(PARK_FD),
        )
        .context("parking a descriptor")?;
        // SAFETY: fresh from F_DUPFD_CLOEXEC.
        parked.push(unsafe { OwnedFd::from_raw_fd(high) });
    }
    for (fd, &target) in parked.iter().zip(targets) {
        nix::unistd::dup2(fd.as_raw_fd(), target)
            .with_context(|| format!("moving a descriptor to {target}"))?;
    }
    Ok(())
}
