//! limctl without a daemon: generated docs, plan errors, secrets syntax,
//! and an unreachable bus. (Runs through the daemon: liminald's tests.)

use std::process::Command;

fn limctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_limctl"));
    c.env_remove("LIMINAL_BUS_ADDRESS");
    c
}

#[test]
fn completions_and_man_page() {
    let out = limctl().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("limctl") && text.contains("--local"),
        "bash completion"
    );
    let out = limctl().arg("man").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(".TH limctl") && text.contains("run"),
        "man page"
    );
}

#[test]
fn local_plan_error_is_positioned_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.toml");
    std::fs::write(
        &p,
        "[run]\nname = \"x\"\nimage = \"img\"\ncommand = \"not a list\"\n",
    )
    .unwrap();
    let out = limctl().args(["run", "--local"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:", p.display())), "{err}");
}

#[test]
fn secret_values_never_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.toml");
    std::fs::write(
        &p,
        "[run]\nname = \"x\"\nimage = \"img\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let out = limctl()
        .args(["run", "--local", "--secret", "token=hunter2"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("expected @FILE or -") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn unreachable_daemon_is_exit_2() {
    let out = limctl()
        .args(["--bus-address", "unix:path=/nonexistent/bus.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
