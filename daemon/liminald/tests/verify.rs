//! VerifyReproducible through a real liminald on a private dbus-daemon, with
//! real containers (root; build the helper first: `cargo build -p
//! liminal-sandbox`): limctl verify (readable and --json, exit codes),
//! busctl's typed errors, the verdict fact in the spool.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/repro")
        .canonicalize()
        .unwrap()
}

/// A fixture plan with the test rootfs and an absolute input folder.
fn fixture_plan(dir: &Path, kind: &str, rootfs: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join(format!("{kind}.toml"))).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("image = ") {
                format!("image = {:?}", rootfs.display().to_string())
            } else if l.starts_with("source = \".\"") {
                format!("source = {:?}", fixtures().display().to_string())
            } else {
                l.to_owned()
            }
        })
        .collect();
    let p = dir.join(format!("{kind}.toml"));
    std::fs::write(&p, text.join("\n")).unwrap();
    p
}

fn limctl_verify(bus: &Bus, plan: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(limctl())
        .args(["--bus-address", &bus.address, "verify"])
        .args(extra)
        .arg(plan)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_reproducible_over_the_bus() {
    if !require_runtime() {
        return;
    }
    let rootfs = busybox_rootfs();
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, &state.path().join("s"), &[], &[]);
    let plans = tempfile::tempdir().unwrap();

    // Reproducible: exit 0, the verdict in the run's JSON.
    let plan = fixture_plan(plans.path(), "reproducible", &rootfs);
    let (code, out, err) = limctl_verify(&bus, &plan, &["--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", d.log_text());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], "passed", "{v}");
    assert_eq!(v["repro"]["reproducible"], true, "{v}");
    assert_eq!(v["repro"]["artifacts_compared"], 1);
    assert_eq!(v["repro"]["input_digest"], v["input_digest"]);
    assert!(
        v["repro"]["variations"].as_array().unwrap().len() >= 14,
        "{v}"
    );
    assert_eq!(v["artifacts"][0]["path"], "out/fixture.tar.gz");

    // Not reproducible: exit 1, the readable verdict names the culprit and
    // both digests.
    let plan = fixture_plan(plans.path(), "hostname", &rootfs);
    let (code, out, err) = limctl_verify(&bus, &plan, &["--vary", "hostname,umask", "--runs", "2"]);
    assert_eq!(code, Some(1), "{out}\n{err}\n{}", d.log_text());
    assert!(out.contains("NOT REPRODUCIBLE"), "{out}");
    assert!(out.contains("differs: out/fixture.tar.gz"), "{out}");
    assert!(out.contains("culprit: hostname"), "{out}");
    assert_eq!(
        out.matches("    control ").count() + out.matches("    varied-1").count(),
        2,
        "{out}"
    );

    // The verdict fact is in the spool, after the control build's run facts.
    let facts = Command::new(limctl())
        .args([
            "--bus-address",
            &bus.address,
            "facts",
            "--since",
            "0",
            "--max",
            "10000",
        ])
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&facts.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdicts: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|f| f["kind"] == "repro_verdict")
        .collect();
    assert_eq!(verdicts.len(), 2, "{lines:?}");
    assert_eq!(verdicts[1]["body"]["culprit"], "hostname");
    assert_eq!(
        verdicts[1]["body"]["variations"],
        serde_json::json!(["hostname", "umask"])
    );
    let d0 = &verdicts[1]["body"]["differing"][0];
    assert_eq!(d0["path"], "out/fixture.tar.gz");
    assert_ne!(d0["digests"][0], d0["digests"][1]);

    // Typed errors: unknown variation, too few runs, a broken plan.
    let text = std::fs::read_to_string(&plan).unwrap();
    let plan_s = plan.to_str().unwrap();
    let (ok, _, err) = call(
        &bus,
        "VerifyReproducible",
        &[
            "sa{sh}a{sv}",
            &text,
            "0",
            "2",
            "plan_path",
            "s",
            plan_s,
            "vary",
            "as",
            "2",
            "hostname",
            "sunspots",
        ],
    );
    assert!(!ok);
    assert!(err.contains("sunspots"), "{err}");
    let names = busctl(
        &bus,
        &[
            "introspect",
            "org.liminalqa.Liminal1",
            "/org/liminalqa/Liminal1",
        ],
    );
    assert!(String::from_utf8_lossy(&names.stdout).contains(".VerifyReproducible"));
    let (code, _, err) = limctl_verify(&bus, &plan, &["--vary", "sunspots"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("InvalidArgument") && err.contains("sunspots"),
        "{err}"
    );
    let (code, _, err) = limctl_verify(&bus, &plan, &["--runs", "1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("InvalidArgument"), "{err}");
    let (ok, _, err) = call(
        &bus,
        "VerifyReproducible",
        &["sa{sh}a{sv}", "[run]\nname = 3\n", "0", "0"],
    );
    assert!(!ok);
    assert!(err.contains(":2:8: invalid type"), "{err}");
}
