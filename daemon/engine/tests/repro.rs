//! Reproducibility verification against real containers (as root) in the
//! busybox rootfs: the fixtures in `tests/fixtures/repro/`.
//!
//! The helper binary and rootfs are found as in `tests/hostile.rs`
//! (`LIMINAL_SANDBOX_HELPER`, `LIMINAL_TEST_ROOTFS`, else built). Not root:
//! every test says so and passes vacuously.
//!
//! Run: `cargo test -p liminal-engine --test repro`.

use liminal_engine::repro::{self, ReproError, Variation, Verdict, VerifyOptions};
use liminal_engine::runner::{self, CancelHandle, EngineConfig};
use liminal_facts::{FactBody, RunStatus};
use liminal_plan::Plan;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

static SERIAL: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    repo_root()
        .join("tests/fixtures/repro")
        .canonicalize()
        .expect("tests/fixtures/repro")
}

fn helper() -> PathBuf {
    static HELPER: OnceLock<PathBuf> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("LIMINAL_SANDBOX_HELPER") {
                return PathBuf::from(p);
            }
            let exe = std::env::current_exe().expect("test executable path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target layout");
            let candidate = profile_dir.join("liminal-sandbox");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "-p", "liminal-sandbox", "--bin", "liminal-sandbox"])
                .current_dir(repo_root());
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            if let Some(target) = profile_dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            let st = cmd.status().expect("running cargo build for the helper");
            assert!(st.success(), "building liminal-sandbox failed");
            candidate
        })
        .clone()
}

fn rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("LIMINAL_TEST_ROOTFS") {
                return PathBuf::from(p);
            }
            let out = std::process::Command::new("bash")
                .arg(repo_root().join("oci/images/busybox.sh"))
                .output()
                .expect("running oci/images/busybox.sh");
            assert!(out.status.success(), "busybox.sh failed");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

struct Case {
    dir: tempfile::TempDir,
    _guard: MutexGuard<'static, ()>,
}

impl Case {
    fn new() -> Option<Case> {
        if !is_root() {
            eprintln!("skipped: the sandbox tests need root");
            return None;
        }
        let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("liminal-repro")
            .tempdir()
            .expect("tempdir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Some(Case { dir, _guard: guard })
    }

    fn config(&self) -> EngineConfig {
        EngineConfig {
            state_dir: self.dir.path().join("state"),
            cache_dir: self.dir.path().join("cache"),
            helper: helper(),
            host: "test-host".into(),
            cgroup_parent: String::new(),
            credentials_dir: None,
        }
    }

    /// The fixture plan with the test rootfs as its image and the fixture
    /// folder as its input.
    fn plan(&self, kind: &str) -> Plan {
        let text =
            std::fs::read_to_string(fixtures().join(format!("{kind}.toml"))).expect("fixture plan");
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("image = ") {
                    format!("image = {:?}", rootfs().display().to_string())
                } else if l.starts_with("source = \".\"") {
                    format!("source = {:?}", fixtures().display().to_string())
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let p = self.dir.path().join(format!("{kind}.toml"));
        std::fs::write(&p, text).expect("writing plan");
        Plan::load(&p).unwrap_or_else(|e| panic!("plan: {e}"))
    }

    fn verify(&self, kind: &str, vary: &str) -> (Verdict, Vec<FactBody>) {
        let opts = VerifyOptions {
            vary: repro::parse_vary(&[vary.to_owned()]).expect("vary"),
            ..VerifyOptions::default()
        };
        let mut facts = Vec::new();
        let run_id = liminal_facts::new_id();
        let verdict = repro::verify(
            &self.config(),
            run_id,
            self.plan(kind),
            BTreeMap::new(),
            &opts,
            &mut |f| facts.push(f),
            &CancelHandle::new(),
        )
        .unwrap_or_else(|e| panic!("verify {kind}: {e}"));
        eprintln!(
            "{kind}: {}",
            serde_json::to_string_pretty(&verdict).unwrap_or_default()
        );
        // Why a build ended in error is in its run fact, not the verdict.
        for f in &facts {
            if let FactBody::Run(r) = f {
                if let Some(reason) = &r.reason {
                    eprintln!("{kind}: run {} {:?}: {reason}", r.run_id, r.status);
                }
            }
        }
        self.assert_clean();
        (verdict, facts)
    }

    fn assert_clean(&self) {
        let state = self.dir.path().join("state");
        for sub in ["runs", "containers", "repro"] {
            let left: Vec<_> = std::fs::read_dir(state.join(sub))
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left in {sub}: {left:?}");
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        assert!(
            !mounts.contains(&*self.dir.path().to_string_lossy()),
            "mounts left under {}",
            self.dir.path().display()
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = runner::cleanup_orphans(&self.config());
    }
}

/// Not reproducible, and the one culprit named is `want`.
fn assert_culprit(kind: &str, want: &str) {
    let Some(case) = Case::new() else { return };
    let (v, facts) = case.verify(kind, "");
    assert!(!v.reproducible, "{kind} reproduced");
    assert_eq!(v.differing.len(), 1);
    let d = &v.differing[0];
    assert_eq!(d.path, "out/fixture.tar.gz");
    assert_eq!(d.digests.len(), 2);
    assert_ne!(d.digests[0], d.digests[1]);
    assert!(!v.nondeterministic, "{kind}: blamed on nondeterminism");
    assert_eq!(
        v.culprit.as_deref(),
        Some(want),
        "culprits {:?}",
        v.culprits
    );
    assert_eq!(d.culprits, vec![want.to_owned()]);
    // diffoscope's report is in the CAS when diffoscope is installed.
    let has_diffoscope = std::process::Command::new("diffoscope")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if has_diffoscope {
        let hex = d.report_blake3.as_deref().expect("a diffoscope report");
        let cas = case.dir.path().join("state/cas").join(&hex[..2]).join(hex);
        let report = std::fs::read_to_string(&cas).expect("report in the CAS");
        assert!(report.contains("fixture.tar"), "{report}");
    } else {
        assert!(
            v.notes.iter().any(|n| n.contains("diffoscope")),
            "{:?}",
            v.notes
        );
    }
    // The run ends failed, right after the verdict fact, which says the same.
    match facts.last() {
        Some(FactBody::Run(r)) => {
            assert_eq!(r.status, RunStatus::Failed);
            let reason = r.reason.as_deref().unwrap_or("");
            assert!(
                reason.contains(want) && reason.contains("not reproducible"),
                "{reason}"
            );
        }
        other => panic!("last fact {other:?}"),
    }
    match facts.iter().rev().nth(1) {
        Some(FactBody::ReproVerdict(f)) => {
            assert!(!f.reproducible);
            assert_eq!(f.culprit.as_deref(), Some(want));
            assert_eq!(f.differing[0].digests, d.digests);
            assert_eq!(f.input_digest, v.input_digest);
            assert_eq!(f.run_id, v.builds[0].run_id);
        }
        other => panic!("last fact {other:?}"),
    }
}

#[test]
fn reproducible_build_passes_under_all_variations() {
    let Some(case) = Case::new() else { return };
    let (v, facts) = case.verify("reproducible", "");
    assert!(v.reproducible, "{:?}", v.differing);
    assert_eq!(v.artifacts_compared, 1);
    assert!(v.differing.is_empty() && v.culprit.is_none());
    assert_eq!(v.builds.len(), 2, "no culprit search when reproducible");
    // Every variation applied or said why not.
    for var in Variation::ALL {
        let named = v.variations.iter().any(|n| n == var.name())
            || v.skipped.iter().any(|s| s.starts_with(var.name()));
        assert!(named, "{var} neither applied nor skipped");
    }
    assert!(
        v.variations.len() >= 14,
        "{:?} skipped {:?}",
        v.variations,
        v.skipped
    );
    // The control build is the run: its facts under the run id, then the verdict.
    let run_id = v.builds[0].run_id;
    let finals: Vec<_> = facts
        .iter()
        .filter_map(|f| match f {
            FactBody::Run(r) if r.finished_at.is_some() => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(finals.len(), 1, "one final run fact per verification");
    assert!(matches!(facts.last(), Some(FactBody::Run(r)) if r.status == RunStatus::Passed));
    assert_eq!(finals[0].run_id, run_id);
    assert_eq!(finals[0].status, RunStatus::Passed);
    assert!(
        matches!(facts.iter().rev().nth(1), Some(FactBody::ReproVerdict(f)) if f.reproducible && f.run_id == run_id)
    );
    // Varied builds really differ in their inputs.
    assert_ne!(v.builds[0].input_digest, v.builds[1].input_digest);
}

#[test]
fn three_runs_compare_three_builds() {
    let Some(case) = Case::new() else { return };
    let (v, _) = case.verify("reproducible", "-all,+hostname,+umask");
    let opts_runs = v.runs;
    assert_eq!(opts_runs, 2);
    let opts = VerifyOptions {
        runs: 3,
        vary: vec![Variation::Hostname, Variation::Umask],
        ..VerifyOptions::default()
    };
    let v = repro::verify(
        &case.config(),
        liminal_facts::new_id(),
        case.plan("reproducible"),
        BTreeMap::new(),
        &opts,
        &mut |_| {},
        &CancelHandle::new(),
    )
    .expect("verify");
    assert!(v.reproducible);
    assert_eq!(v.builds.len(), 3);
    assert_eq!(v.variations, vec!["hostname", "umask"]);
    case.assert_clean();
}

#[test]
fn date_is_blamed_on_time() {
    assert_culprit("date", "time");
}

#[test]
fn hostname_is_blamed_on_hostname() {
    assert_culprit("hostname", "hostname");
}

#[test]
fn build_path_is_blamed_on_build_path() {
    assert_culprit("build_path", "build_path");
}

#[test]
fn umask_is_blamed_on_umask() {
    assert_culprit("umask", "umask");
}

#[test]
fn cpu_count_is_blamed_on_num_cpus() {
    assert_culprit("num_cpus", "num_cpus");
}

#[test]
fn random_value_is_nondeterministic() {
    let Some(case) = Case::new() else { return };
    let (v, _) = case.verify("random", "");
    assert!(!v.reproducible);
    assert!(v.nondeterministic);
    assert!(v.culprit.is_none(), "{:?}", v.culprit);
    assert_eq!(v.differing[0].culprits, vec!["nondeterministic".to_owned()]);
}

#[test]
fn narrowed_variations_miss_what_they_do_not_vary() {
    // Hostname embedded, hostname not varied: the builds agree.
    let Some(case) = Case::new() else { return };
    let (v, _) = case.verify("hostname", "-all,+umask,+build_path");
    assert!(v.reproducible);
}

#[test]
fn unknown_variation_is_a_typed_error() {
    match repro::parse_vary(&["hostname,-sunspots".into()]) {
        Err(ReproError::UnknownVariation { name, known }) => {
            assert_eq!(name, "sunspots");
            assert!(known.contains("build_path"));
        }
        other => panic!("{other:?}"),
    }
    let opts = VerifyOptions {
        runs: 1,
        ..VerifyOptions::default()
    };
    let Some(case) = Case::new() else { return };
    let r = repro::verify(
        &case.config(),
        liminal_facts::new_id(),
        case.plan("reproducible"),
        BTreeMap::new(),
        &opts,
        &mut |_| {},
        &CancelHandle::new(),
    );
    assert!(matches!(r, Err(ReproError::Runs(1))), "{r:?}");
}

#[test]
fn every_variation_changes_what_it_names() {
    // probe: one file per variation; each must be blamed on its own one.
    let Some(case) = Case::new() else { return };
    let (v, _) = case.verify("probe", "");
    assert!(!v.reproducible);
    assert!(!v.nondeterministic, "{:?}", v.differing);
    let blamed: BTreeMap<&str, &Vec<String>> = v
        .differing
        .iter()
        .map(|d| (d.path.trim_start_matches("out/probe/"), &d.culprits))
        .collect();
    for var in Variation::ALL {
        let name = var.name();
        if var == Variation::FileOrdering && v.skipped.iter().any(|s| s.starts_with("fileordering"))
        {
            continue;
        }
        let got = blamed
            .get(name)
            .unwrap_or_else(|| panic!("{name}: the probe file did not change: {blamed:?}"));
        if var == Variation::Aslr {
            // /proc/self/personality also shows kernel's UNAME26.
            assert!(got.contains(&"aslr".to_owned()), "{name}: {got:?}");
        } else {
            assert_eq!(*got, &vec![name.to_owned()], "{name}");
        }
    }
}
