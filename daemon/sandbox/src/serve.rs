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
//!
//! After each job the server also forks a warm slot for the job's sandbox
//! configuration ([`crate::warm`]); the next job with the same key goes to
//! that slot instead of a fresh child. Slots live [`warm::SLOT_TTL`] and are
//! replaced while their key was used within [`warm::KEEP_WARM`].

use crate::job::{self, Job, ServeReply, ServeRequest};
use crate::warm;
use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Received descriptors are parked at or above this number while they are
/// moved to their final numbers (which are small: 2, 3, 4, ...).
const PARK_FD: RawFd = 512;

/// A warm slot waiting for a job with its key.
struct Slot {
    pid: Pid,
    pidfd: OwnedFd,
    /// Our end of the slot's socket; closing it discards the slot.
    sock: OwnedFd,
    keyed: warm::Keyed,
    template: Job,
    born: Instant,
    /// The last job with this key (slots are replaced until KEEP_WARM).
    last_used: Instant,
}

struct Server {
    sock: OwnedFd,
    sigfd: SignalFd,
    warm: bool,
    slots: Vec<Slot>,
    /// Slot children not reaped yet, idle or running a job: their slot job
    /// names what to sweep if one died without cleaning up.
    children: BTreeMap<i32, Job>,
    made: u64,
}

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
    let mut server = Server {
        sock,
        sigfd,
        warm: warm::enabled(),
        slots: Vec::new(),
        children: BTreeMap::new(),
        made: 0,
    };
    let result = server.serve_loop();
    server.shut_down();
    result
}

impl Server {
    fn serve_loop(&mut self) -> Result<()> {
        let server = self;
        loop {
            let timeout = server
                .slots
                .iter()
                .map(|s| (s.born + warm::SLOT_TTL).saturating_duration_since(Instant::now()))
                .min()
                .map_or(PollTimeout::NONE, |d| {
                    PollTimeout::try_from(d.as_millis().clamp(1, 60_000) as i32)
                        .unwrap_or(PollTimeout::MAX)
                });
            let mut fds = [
                PollFd::new(server.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(server.sigfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
            let request = fds[0].revents().unwrap_or(PollFlags::empty());
            let signalled = fds[1]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN));
            if signalled {
                while let Ok(Some(info)) = server.sigfd.read_signal() {
                    if info.ssi_signo != Signal::SIGCHLD as u32 {
                        tracing::info!("fork server stopping on signal {}", info.ssi_signo);
                        return Ok(());
                    }
                }
            }
            server.reap();
            if request.contains(PollFlags::POLLIN) {
                if !server.handle()? {
                    return Ok(());
                }
            } else if request.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return Ok(());
            }
            server.expire();
        }
    }

    /// Idle slots are discarded (their sockets closed) and reaped, so none
    /// outlives the server as an orphan; children running jobs are left to
    /// finish them.
    fn shut_down(&mut self) {
        let idle: Vec<Pid> = self.slots.drain(..).map(|s| s.pid).collect();
        let deadline = Instant::now() + std::time::Duration::from_secs(3);
        for pid in idle {
            while Instant::now() < deadline {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {
                        std::thread::sleep(std::time::Duration::from_millis(2))
                    }
                    _ => break,
                }
            }
        }
    }

    /// Reaps every finished child (the engine watches them through pidfds)
    /// and sweeps what a slot child that died uncleanly left.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let Some(pid) = st.pid() else { continue };
                    self.slots.retain(|s| s.pid != pid);
                    if let Some(slot) = self.children.remove(&pid.as_raw()) {
                        // Exit 0: the slot removed all it made itself; the
                        // sweep would redo the cgroup walks on the server's
                        // path, between two hand-overs.
                        if st != WaitStatus::Exited(pid, job::HELPER_EXIT_REPORTED) {
                            tracing::debug!(slot = %slot.container_id, status = ?st, "sweeping after the slot");
                            sweep(&slot);
                        }
                    }
                }
            }
        }
    }

    /// Replaces slots past their time while their key is in use; drops the
    /// others.
    fn expire(&mut self) {
        let now = Instant::now();
        let (old, keep): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.slots)
            .into_iter()
            .partition(|s| now >= s.born + warm::SLOT_TTL);
        self.slots = keep;
        for s in old {
            let Slot {
                keyed,
                template,
                last_used,
                ..
            } = s;
            // A burst's extra slot is not replaced: one per key while idle.
            let another = self.slots.iter().any(|s| s.keyed.key == keyed.key);
            if !another && now.duration_since(last_used) < warm::KEEP_WARM {
                self.spawn_slot(template, keyed, last_used);
            }
        }
    }

    /// One request: receive, hand to a warm slot or fork, reply.
    /// `Ok(false)`: the engine hung up.
    fn handle(&mut self) -> Result<bool> {
        let sock = &self.sock;
        let mut buf = [0u8; 4096];
        let (len, received) = match warm::receive_with_fds(sock.as_raw_fd(), &mut buf) {
            Ok(warm::Received::Eof) => return Ok(false),
            Ok(warm::Received::Message {
                truncated: true, ..
            }) => return reply(sock, &refused("too many descriptors"), None).map(|_| true),
            Ok(warm::Received::Message { len, fds, .. }) => (len, fds),
            Err(e) => return Err(e).context("recvmsg"),
        };
        let req: ServeRequest = match serde_json::from_slice(&buf[..len]) {
            Ok(r) => r,
            Err(e) => {
                return reply(sock, &refused(&format!("bad request: {e}")), None).map(|_| true)
            }
        };
        if req.version != job::PROTOCOL_VERSION {
            let msg = format!(
                "job protocol version {} (this helper speaks {})",
                req.version,
                job::PROTOCOL_VERSION
            );
            return reply(sock, &refused(&msg), None).map(|_| true);
        }
        if let Some(state_root) = &req.retire {
            drop(received);
            let slots = self.retire(state_root);
            return reply(&self.sock, &ServeReply::Retired { slots }, None).map(|_| true);
        }
        if received.len() < job::SERVE_FIXED_FDS {
            let msg = format!("{} descriptors in the request", received.len());
            return reply(sock, &refused(&msg), None).map(|_| true);
        }
        // The job itself, for its warm key (read without moving the memfd's
        // offset: the child reads it from the start).
        let warm_job = if self.warm {
            job_from_memfd(&received[0])
                .ok()
                .and_then(|j| warm::key(&j).map(|k| (j, k)))
        } else {
            None
        };
        if let Some((job, keyed)) = &warm_job {
            // The oldest slot of the key: the likeliest to be ready.
            if let Some(i) = self.slots.iter().position(|s| s.keyed.key == keyed.key) {
                let slot = self.slots.remove(i);
                let raw: Vec<RawFd> = received.iter().map(|f| f.as_raw_fd()).collect();
                match warm::send_with_fds(slot.sock.as_raw_fd(), &buf[..len], &raw) {
                    Ok(()) => {
                        drop(received);
                        let cgroup_path = self
                            .children
                            .get(&slot.pid.as_raw())
                            .map(|j| j.cgroup_path.clone());
                        reply(
                            &self.sock,
                            &ServeReply::Started {
                                pid: slot.pid.as_raw(),
                                cgroup_path,
                            },
                            Some(&slot.pidfd),
                        )?;
                        // Closed before the forks below, or the new slots
                        // would hold the taken one's socket and pidfd.
                        let previous_job = slot.last_used;
                        drop(slot);
                        let now = Instant::now();
                        let depth = if now.duration_since(previous_job) < warm::BURST_GAP {
                            warm::BURST_DEPTH
                        } else {
                            1
                        };
                        let left = self
                            .slots
                            .iter()
                            .filter(|s| s.keyed.key == keyed.key)
                            .count();
                        for _ in left..depth {
                            self.spawn_slot(job.clone(), keyed.clone(), now);
                        }
                        return Ok(true);
                    }
                    // Gone (reaped on the next round); fork as usual.
                    Err(e) => tracing::debug!("warm slot {}: {e}", slot.pid),
                }
            }
        }
        // SAFETY: single-threaded (the whole helper is), so the child may run
        // arbitrary code after fork.
        match unsafe { fork() } {
            Err(e) => reply(&self.sock, &refused(&format!("fork: {e}")), None).map(|_| true),
            Ok(ForkResult::Child) => {
                self.close_in_child();
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
                        &self.sock,
                        &ServeReply::Started {
                            pid: child.as_raw(),
                            cgroup_path: None,
                        },
                        Some(&pidfd),
                    )?,
                    Err(e) => {
                        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        reply(&self.sock, &refused(&format!("pidfd_open: {e}")), None)?
                    }
                }
                if let Some((job, keyed)) = warm_job {
                    self.spawn_slot(job, keyed, Instant::now());
                }
                Ok(true)
            }
        }
    }

    /// Kills, reaps and sweeps the idle slots made for jobs with this state
    /// root (children running a job are left alone): none is still making
    /// a container in that state dir once this returns, and none is made
    /// again for it until a job with it comes.
    fn retire(&mut self, state_root: &Path) -> usize {
        let (gone, keep): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.slots)
            .into_iter()
            .partition(|s| s.template.state_root == state_root);
        self.slots = keep;
        for s in &gone {
            let _ = nix::sys::signal::kill(s.pid, Signal::SIGKILL);
            // Only this loop reaps, so the pid is still this child.
            let _ = waitpid(s.pid, None);
            if let Some(slot) = self.children.remove(&s.pid.as_raw()) {
                sweep(&slot);
            }
        }
        gone.len()
    }

    /// Forks a slot child that makes a warm container for `key`.
    fn spawn_slot(&mut self, template: Job, keyed: warm::Keyed, last_used: Instant) {
        while self.slots.len() >= warm::MAX_SLOTS {
            let oldest = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => drop(self.slots.remove(i)),
                None => break,
            }
        }
        let (ours, theirs) = match crate::seqpacket_pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("warm slot: {e:#}");
                return;
            }
        };
        self.made += 1;
        let name = warm::slot_name(&template, std::process::id(), self.made);
        // SAFETY: single-threaded, as above.
        match unsafe { fork() } {
            Err(e) => tracing::warn!("warm slot: fork: {e}"),
            Ok(ForkResult::Child) => {
                self.close_in_child();
                let _ = nix::unistd::close(ours.as_raw_fd());
                let mut chld = SigSet::empty();
                chld.add(Signal::SIGCHLD);
                let _ = chld.thread_unblock();
                std::process::exit(warm::slot_main(
                    &template,
                    &keyed.source_is_dir,
                    &name,
                    theirs,
                ));
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                let slot_job = warm::slot_job(&template, &name);
                self.children.insert(child.as_raw(), slot_job);
                match crate::pidfd_open(child) {
                    Ok(pidfd) => self.slots.push(Slot {
                        pid: child,
                        pidfd,
                        sock: ours,
                        keyed,
                        template,
                        born: Instant::now(),
                        last_used,
                    }),
                    // Without a pidfd it cannot be handed out; closing our
                    // end makes it discard itself.
                    Err(e) => tracing::warn!("warm slot: pidfd_open: {e}"),
                }
            }
        }
    }

    /// In a forked child: the server's descriptors are not its own. No
    /// destructor may run on them (the child exits without returning), so
    /// they are closed by number.
    fn close_in_child(&self) {
        let _ = nix::unistd::close(self.sock.as_raw_fd());
        let _ = nix::unistd::close(self.sigfd.as_raw_fd());
        for s in &self.slots {
            let _ = nix::unistd::close(s.sock.as_raw_fd());
            let _ = nix::unistd::close(s.pidfd.as_raw_fd());
        }
    }
}

/// What a slot child that died uncleanly (killed, say) can leave: its
/// container's processes and cgroup, libcontainer state, bundle. A no-op
/// after a clean exit.
fn sweep(slot: &Job) {
    for e in job::teardown_cgroup(&slot.cgroup_path) {
        tracing::warn!("warm slot: {e}");
    }
    let state = slot.state_root.join(&slot.container_id);
    if state.exists() {
        let _ = std::fs::remove_dir_all(&state);
    }
    warm::discard_paths(slot);
}

fn refused(message: &str) -> ServeReply {
    ServeReply::Refused {
        message: message.to_owned(),
    }
}

fn reply(sock: &OwnedFd, r: &ServeReply, fd: Option<&OwnedFd>) -> Result<()> {
    let bytes = serde_json::to_vec(r).context("encoding the reply")?;
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    warm::send_with_fds(sock.as_raw_fd(), &bytes, &raw).context("sending the reply")
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
    let job = job_from_memfd(&received.next().context("no job descriptor")?)?;
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

/// The job in a request's memfd, read in place (the offset does not move:
/// the server reads it for the warm key, then its child reads it again).
pub(crate) fn job_from_memfd(memfd: &OwnedFd) -> Result<Job> {
    let f = std::fs::File::from(memfd.try_clone().context("dup of the job memfd")?);
    let len = f.metadata().context("size of the job memfd")?.len() as usize;
    let mut bytes = vec![0u8; len];
    f.read_exact_at(&mut bytes, 0)
        .context("reading the job from its memfd")?;
    serde_json::from_slice(&bytes).context("parsing the job")
}

/// Moves each descriptor to its target number (without CLOEXEC). Parking
/// them high first means no move overwrites a descriptor still to move.
pub(crate) fn place(fds: Vec<OwnedFd>, targets: &[RawFd]) -> Result<()> {
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
