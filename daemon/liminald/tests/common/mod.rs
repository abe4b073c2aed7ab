//! Test fixtures: a private dbus-daemon and a liminald on it, both killed
//! when their guard drops (also when the test fails).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NAME: &str = "org.liminalqa.Liminal1";
pub const PATH: &str = "/org/liminalqa/Liminal1";
pub const IFACE: &str = "org.liminalqa.Liminal1.Manager";

/// A private bus: `dbus-daemon --config-file=... --print-address --nofork`.
pub struct Bus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
}

impl Bus {
    pub fn start() -> Bus {
        let dir = tempfile::Builder::new()
            .prefix("liminald-test-bus")
            .tempdir()
            .expect("tempdir");
        // Other users (nobody, the test member) must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("bus.sock");
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                sock.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon");
        die_with_test(&mut child);
        let mut child = child
            .arg(format!("--config-file={}", conf.display()))
            .args(["--print-address", "--nofork"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (apt: dbus-daemon)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // A guid in the address breaks reconnects after a bus restart.
        let address = line.trim().split(",guid=").next().unwrap().to_owned();
        assert!(address.starts_with("unix:path="), "bus address {address:?}");
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).ok();
        Bus {
            dir,
            address,
            child,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child gets SIGKILL when the test's thread ends, however it ends: a
/// test killed by a timeout or a signal runs no `Drop` and would otherwise
/// leave its daemons running.
pub fn die_with_test(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// A liminald process on a bus.
pub struct Daemon {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub log: PathBuf,
}

pub fn liminald_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liminald"))
}

/// Whether real runs can happen here: root (else the test says SKIP and
/// returns) and a built sandbox helper (else it fails, saying how to build).
pub fn require_runtime() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: real runs need root");
        return false;
    }
    assert!(
        sandbox_helper().exists(),
        "liminal-sandbox not found at {} (cargo build -p liminal-sandbox, or set LIMINAL_SANDBOX_HELPER)",
        sandbox_helper().display()
    );
    true
}

/// limctl, built beside liminald.
pub fn limctl() -> PathBuf {
    liminald_bin().parent().unwrap().join("limctl")
}

/// The sandbox helper built into the same target dir, if built.
pub fn sandbox_helper() -> PathBuf {
    std::env::var_os("LIMINAL_SANDBOX_HELPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| liminald_bin().parent().unwrap().join("liminal-sandbox"))
}

impl Daemon {
    pub fn start(bus: &Bus, state: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = state.with_extension("log");
        let d = Daemon::spawn(bus, state, args, env, &log);
        wait_for_name(bus, &d);
        d
    }

    pub fn spawn(
        bus: &Bus,
        state: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Daemon {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(liminald_bin());
        die_with_test(&mut cmd);
        cmd.arg("--bus-address")
            .arg(&bus.address)
            .arg("--state-dir")
            .arg(state)
            .arg("--sandbox-helper")
            .arg(sandbox_helper())
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env("LIMINAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: Some(cmd.spawn().expect("liminald")),
            state: state.to_owned(),
            log: log.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("liminald did not stop within 30 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_for_name(bus: &Bus, d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = busctl(
            bus,
            &[
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameHasOwner",
                "s",
                NAME,
            ],
        );
        if String::from_utf8_lossy(&out.stdout).trim() == "b true" {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("liminald never owned {NAME}; log:\n{}", d.log_text());
}

pub fn busctl(bus: &Bus, args: &[&str]) -> Output {
    Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(args)
        .output()
        .expect("busctl (apt: systemd)")
}

/// `busctl call` on the manager; (success, stdout, stderr).
pub fn call(bus: &Bus, method: &str, sig_and_args: &[&str]) -> (bool, String, String) {
    let mut args = vec!["call", NAME, PATH, IFACE, method];
    args.extend_from_slice(sig_and_args);
    let out = busctl(bus, &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plan folder with plan.toml written from `text`.
pub fn plan_dir(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

pub async fn client(bus: &Bus) -> zbus::Connection {
    zbus::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .build()
        .await
        .unwrap()
}

/// The busybox rootfs (oci/images/busybox.sh), built if missing.
pub fn busybox_rootfs() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("LIMINAL_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or("/root".into())).join(".cache/liminal")
        })
        .join("rootfs/busybox");
    if !dir.join("bin/sh").exists() {
        let st = Command::new("sh")
            .arg(root.join("oci/images/busybox.sh"))
            .arg(&dir)
            .status()
            .expect("busybox.sh");
        assert!(st.success(), "oci/images/busybox.sh failed");
    }
    dir
}
