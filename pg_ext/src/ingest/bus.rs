//! The worker's D-Bus side: a std thread (PostgreSQL's signals blocked)
//! running a current-thread tokio runtime with zbus. It never touches
//! PostgreSQL: it sends [`Event`]s to the main thread over a channel and
//! wakes it with `SetLatch`; the main thread answers with [`Command`]s.

use super::store::WireFact;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::sync::mpsc as tmpsc;
use zbus::proxy::CacheProperties;

pub const BUS_NAME: &str = "org.liminalqa.Liminal1";
pub const OBJECT_PATH: &str = "/org/liminalqa/Liminal1";
pub const MANAGER_IFACE: &str = "org.liminalqa.Liminal1.Manager";
/// FactsSince's cap (CONTRACTS).
pub const REPLAY_MAX: u32 = 10_000;

#[derive(Debug)]
pub enum Event {
    /// A (re)connection: the spool id keys the cursor.
    Connected { spool_id: String, last_seq: u64 },
    /// Facts announced by FactsAppended (`replay == false`) or returned by FactsSince.
    Facts {
        facts: Vec<WireFact>,
        #[allow(dead_code)]
        replay: bool,
    },
    /// A replay ran until FactsSince returned nothing; `last_seq` is the daemon's LastSeq then.
    ReplayDone { last_seq: Option<u64> },
    /// The facts after `after` were trimmed from the spool; the first available is `first`.
    Trimmed {
        after: u64,
        first: u64,
        message: String,
    },
    /// The session ended; the thread reconnects after a backoff.
    Disconnected { error: String },
}

#[derive(Debug)]
pub enum Command {
    /// Fetch everything after `after` with FactsSince until it returns nothing.
    Replay { after: u64 },
    /// The database committed everything up to this seq.
    Ack(u64),
}

unsafe extern "C" {
    // Declared here because pgrx's wrapper asserts it runs on the main
    // thread; SetLatch itself is safe to call from any thread or process.
    fn SetLatch(latch: *mut pgrx::pg_sys::Latch);
}

/// Wakes the worker's main thread.
#[derive(Clone, Copy)]
pub struct Waker(usize);

impl Waker {
    /// Must be called on the main thread (reads `MyLatch`).
    pub fn for_my_latch() -> Self {
        // SAFETY: MyLatch is set up before a background worker's main runs
        // and lives as long as the process.
        Waker(unsafe { pgrx::pg_sys::MyLatch } as usize)
    }

    fn wake(self) {
        // SAFETY: the latch belongs to this process and outlives the thread.
        unsafe { SetLatch(self.0 as *mut pgrx::pg_sys::Latch) }
    }
}

#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<Event>,
    waker: Waker,
    /// The cursor the main thread has committed: a replay pauses while it
    /// is more than [`REPLAY_AHEAD`] facts ahead of it (flow control).
    committed: Arc<AtomicU64>,
}

/// How far a replay may run ahead of the committed cursor.
const REPLAY_AHEAD: u64 = 2 * REPLAY_MAX as u64;

impl Out {
    fn send(&self, e: Event) -> Result<(), Stop> {
        self.tx.send(e).map_err(|_| Stop)?;
        self.waker.wake();
        Ok(())
    }
}

/// The main thread is gone: stop.
struct Stop;

enum SessionEnd {
    Stop,
    Error(String),
}

impl From<zbus::Error> for SessionEnd {
    fn from(e: zbus::Error) -> Self {
        SessionEnd::Error(e.to_string())
    }
}

impl From<Stop> for SessionEnd {
    fn from(_: Stop) -> Self {
        SessionEnd::Stop
    }
}

/// Strip `,guid=...`: a reconnect to a restarted bus would otherwise fail
/// with "Server GUID mismatch".
pub fn normalize_address(addr: &str) -> String {
    addr.split(',')
        .filter(|part| !part.starts_with("guid="))
        .collect::<Vec<_>>()
        .join(",")
}

/// Spawn the bus thread with every signal blocked (PostgreSQL's handlers
/// must only run on the main thread).
pub fn spawn(
    address: Option<String>,
    waker: Waker,
    committed: Arc<AtomicU64>,
) -> std::io::Result<(mpsc::Receiver<Event>, tmpsc::UnboundedSender<Command>)> {
    let (tx, rx) = mpsc::channel();
    let (ctx, crx) = tmpsc::unbounded_channel();
    // SAFETY: plain sigset manipulation of the calling thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = std::thread::Builder::new()
            .name("liminal-bus".into())
            .spawn(move || {
                run(
                    address,
                    Out {
                        tx,
                        waker,
                        committed,
                    },
                    crx,
                )
            });
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r?;
    }
    Ok((rx, ctx))
}

fn run(address: Option<String>, out: Out, mut cmds: tmpsc::UnboundedReceiver<Command>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = out.send(Event::Disconnected {
                error: format!("tokio runtime: {e}"),
            });
            return;
        }
    };
    rt.block_on(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            match session(address.as_deref(), &out, &mut cmds).await {
                SessionEnd::Stop => return,
                SessionEnd::Error(error) => {
                    if out.send(Event::Disconnected { error }).is_err() {
                        return;
                    }
                }
            }
            // A session that lived a while resets the backoff.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            // Commands sent for the dead session are moot.
            while cmds.try_recv().is_ok() {}
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

async fn connect(address: Option<&str>) -> zbus::Result<zbus::Connection> {
    match address {
        Some(a) => {
            zbus::connection::Builder::address(normalize_address(a).as_str())?
                .build()
                .await
        }
        None => zbus::Connection::system().await,
    }
}

async fn session(
    address: Option<&str>,
    out: &Out,
    cmds: &mut tmpsc::UnboundedReceiver<Command>,
) -> SessionEnd {
    match session_inner(address, out, cmds).await {
        Ok(()) => SessionEnd::Stop,
        Err(e) => e,
    }
}

async fn session_inner(
    address: Option<&str>,
    out: &Out,
    cmds: &mut tmpsc::UnboundedReceiver<Command>,
) -> Result<(), SessionEnd> {
    let conn = connect(address).await?;
    let proxy: zbus::Proxy<'_> = zbus::proxy::Builder::new(&conn)
        .destination(BUS_NAME)?
        .path(OBJECT_PATH)?
        .interface(MANAGER_IFACE)?
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    // Subscribe before reading the cursor's source so nothing announced in
    // between is missed; the replay covers what came before.
    let mut owner_changes = dbus
        .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
        .await?;
    let mut appended = proxy.receive_signal("FactsAppended").await?;
    let spool_id: String = proxy.get_property("SpoolId").await?;
    let last_seq: u64 = proxy.get_property("LastSeq").await?;
    out.send(Event::Connected { spool_id, last_seq })?;
    // Drain FactsAppended in its own task: its sends never block, so the
    // socket reader never waits on a full signal queue while a FactsSince
    // reply is awaited below (that would deadlock).
    let fwd = out.clone();
    let mut forwarder = tokio::spawn(async move {
        while let Some(msg) = appended.next().await {
            match msg.body().deserialize::<Vec<(u64, String, String)>>() {
                Ok(facts) => {
                    let facts = facts
                        .into_iter()
                        .map(|(seq, kind, json)| WireFact { seq, kind, json })
                        .collect();
                    if fwd
                        .send(Event::Facts {
                            facts,
                            replay: false,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                // A malformed signal is not a fact; the replay after the gap
                // it leaves fetches the facts themselves.
                Err(e) => eprintln!(
                    "liminal ingest: ignoring a FactsAppended signal with a bad body: {e}"
                ),
            }
        }
    });
    let result = loop {
        tokio::select! {
            _ = &mut forwarder => {
                break Err(SessionEnd::Error("the bus connection closed".into()));
            }
            change = owner_changes.next() => {
                if change.is_none() {
                    break Err(SessionEnd::Error("the bus connection closed".into()));
                }
                break Err(SessionEnd::Error(format!("{BUS_NAME} changed owner (daemon restarted or left)")));
            }
            cmd = cmds.recv() => match cmd {
                None => break Ok(()),
                Some(Command::Ack(seq)) => {
                    if let Err(e) = proxy.call::<_, _, ()>("AckFacts", &(seq,)).await {
                        break Err(e.into());
                    }
                }
                Some(Command::Replay { after }) => {
                    if let Err(e) = replay(&proxy, out, after).await {
                        break Err(e);
                    }
                }
            },
        }
    };
    forwarder.abort();
    result
}

async fn replay(proxy: &zbus::Proxy<'_>, out: &Out, mut after: u64) -> Result<(), SessionEnd> {
    loop {
        let r = proxy
            .call::<_, _, Vec<(u64, String, String)>>("FactsSince", &(after, REPLAY_MAX))
            .await;
        let facts = match r {
            Ok(f) => f,
            Err(zbus::Error::MethodError(name, msg, _))
                if name.as_str().ends_with(".Error.Trimmed") =>
            {
                let message = msg.unwrap_or_default();
                // The message names the first available seq: take the last number in it.
                let first = message
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| s.parse::<u64>().ok())
                    .next_back();
                match first {
                    Some(first) if first > after + 1 => {
                        out.send(Event::Trimmed {
                            after,
                            first,
                            message,
                        })?;
                        return Ok(());
                    }
                    _ => {
                        return Err(SessionEnd::Error(format!(
                            "FactsSince({after}): trimmed: {message}"
                        )))
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        let Some(last) = facts.last().map(|f| f.0) else {
            let last_seq = proxy.get_property::<u64>("LastSeq").await.ok();
            out.send(Event::ReplayDone { last_seq })?;
            return Ok(());
        };
        if last <= after {
            return Err(SessionEnd::Error(format!(
                "FactsSince({after}) went backwards (last seq {last})"
            )));
        }
        after = last;
        // Flow control; give up (the main thread asks again) if the cursor
        // stops moving, e.g. after it dropped its buffer on a failed write.
        let mut seen = out.committed.load(Ordering::Relaxed);
        let mut since = tokio::time::Instant::now();
        while after.saturating_sub(out.committed.load(Ordering::Relaxed)) > REPLAY_AHEAD {
            let now = out.committed.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = tokio::time::Instant::now();
            } else if since.elapsed() > Duration::from_secs(5) {
                out.send(Event::ReplayDone { last_seq: None })?;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let facts = facts
            .into_iter()
            .map(|(seq, kind, json)| WireFact { seq, kind, json })
            .collect();
        out.send(Event::Facts {
            facts,
            replay: true,
        })?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guid_is_stripped() {
        assert_eq!(
            super::normalize_address("unix:path=/tmp/b,guid=0123abcd"),
            "unix:path=/tmp/b"
        );
        assert_eq!(
            super::normalize_address("unix:abstract=x"),
            "unix:abstract=x"
        );
    }
}
