//! The engine path of `benches/sandbox-latency`: `liminal_engine::run` of a
//! `/bin/true` plan in the busybox rootfs, N times, as liminald runs it
//! (input digest incl. the image tree digest, helper spawn, facts, cleanup).
//!
//! `sandbox-latency --helper BIN --rootfs DIR --state DIR --runs N`
//! prints one JSON object: per-run milliseconds for the whole engine run
//! through the warm fork server (`engine_ms`), with a helper spawned per run
//! (`spawn_ms`, `LIMINAL_SANDBOX_PREFORK=0`), and for the image resolution
//! (the rootfs tree digest) inside a run. The two modes alternate run by run,
//! so a change in the machine's load hits both alike.
//!
//! `--modes sandbox --job FILE` measures the sandbox layer alone as the
//! engine drives it (`sandbox_ms`): the raw loop's job handed to the fork
//! server (warm slots on unless `LIMINAL_SANDBOX_WARM=0`), timed from the
//! hand-over to the helper's report (create, start, wait, delete), without
//! the engine's own per-run work (input digest, run folders, facts).

use liminal_engine::runner::{self, CancelHandle, EngineConfig, RunRequest};
use liminal_facts::RunStatus;
use liminal_plan::{Plan, PlanSource};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("sandbox-latency: {e}");
        std::process::exit(2);
    }
}

fn arg(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name}"))
}

fn real_main() -> Result<(), String> {
    if let Ok(filter) = std::env::var("LIMINAL_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    let helper = PathBuf::from(arg(&args, "--helper")?);
    let rootfs = arg(&args, "--rootfs")?;
    let state = PathBuf::from(arg(&args, "--state")?);
    let runs: usize = arg(&args, "--runs")?
        .parse()
        .map_err(|e| format!("--runs: {e}"))?;
    let text =
        format!("[run]\nname = \"bench\"\nimage = \"{rootfs}\"\ncommand = [\"/bin/true\"]\n");
    let plan = Plan::parse(
        &text,
        &PlanSource {
            file: Path::new("<bench>"),
            base_dir: Path::new("/"),
        },
    )
    .map_err(|e| e.to_string())?;
    let cfg = EngineConfig {
        state_dir: state.clone(),
        cache_dir: state.join("cache"),
        helper,
        host: "bench".into(),
        cgroup_parent: String::new(),
        credentials_dir: None,
    };
    // `--modes server,spawn` (default): which engine modes to measure;
    // `--pace-ms N`: pause N ms before each run (runs arriving one by one
    // rather than back to back).
    let modes: Vec<String> = arg(&args, "--modes")
        .unwrap_or_else(|_| "server,spawn".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let pace = std::time::Duration::from_millis(
        arg(&args, "--pace-ms")
            .unwrap_or_else(|_| "0".into())
            .parse()
            .map_err(|e| format!("--pace-ms: {e}"))?,
    );
    if modes == ["sandbox"] {
        let job = std::fs::read(arg(&args, "--job")?).map_err(|e| format!("--job: {e}"))?;
        let sandbox_ms = sandbox_runs(&cfg.helper, &job, runs, pace)?;
        println!("{}", serde_json::json!({ "sandbox_ms": sandbox_ms }));
        return Ok(());
    }
    let mut engine_ms = Vec::new();
    let mut spawn_ms = Vec::new();
    let mut image_ms = Vec::new();
    let m = modes.len();
    for i in 0..m * (runs + 5) {
        let spawn = modes[i % m] == "spawn";
        // Read by the engine at each run; this program has no other thread
        // that reads the environment.
        std::env::set_var("LIMINAL_SANDBOX_PREFORK", if spawn { "0" } else { "1" });
        std::thread::sleep(pace);
        let t = Instant::now();
        liminal_engine::image::resolve(&plan.image, &cfg.cache_dir).map_err(|e| e.to_string())?;
        let image = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let out = runner::run(
            &cfg,
            RunRequest {
                run_id: liminal_facts::new_id(),
                plan: plan.clone(),
                fd_secrets: BTreeMap::new(),
            },
            &mut |_| {},
            &CancelHandle::new(),
        )
        .map_err(|e| e.to_string())?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if out.status != RunStatus::Passed {
            return Err(format!("run {i}: {:?} {:?}", out.status, out.reason));
        }
        // The first five of each mode are warm-up.
        if i >= 5 * m {
            if spawn {
                spawn_ms.push(ms);
            } else {
                engine_ms.push(ms);
            }
            image_ms.push(image);
        }
    }
    println!(
        "{}",
        serde_json::json!({ "engine_ms": engine_ms, "spawn_ms": spawn_ms, "image_resolve_ms": image_ms })
    );
    Ok(())
}

/// `runs` (+5 warm-up) jobs through the fork server, one after another.
fn sandbox_runs(
    helper: &Path,
    job: &[u8],
    runs: usize,
    pace: std::time::Duration,
) -> Result<Vec<f64>, String> {
    use liminal_engine::job::{JobReport, Outcome};
    use liminal_engine::prefork::{self, JobFds};
    use std::io::Read;
    use std::os::fd::AsFd;
    let devnull = |what: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| format!("{what}: {e}"))
    };
    let (out, err) = (devnull("stdout")?, devnull("stderr")?);
    let helper_stderr = std::io::stderr();
    let mut ms = Vec::new();
    for i in 0..runs + 5 {
        std::thread::sleep(pace);
        let (rep_r, rep_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let t = Instant::now();
        let fds = JobFds {
            helper_stderr: helper_stderr.as_fd(),
            container: Vec::new(),
            stdout: out.as_fd(),
            stderr: err.as_fd(),
            report: rep_w.as_fd(),
        };
        prefork::start_job(helper, job, &fds).map_err(|e| format!("run {i}: {e}"))?;
        drop(rep_w);
        let mut text = Vec::new();
        std::fs::File::from(rep_r)
            .read_to_end(&mut text)
            .map_err(|e| format!("run {i}: report: {e}"))?;
        let elapsed = t.elapsed().as_secs_f64() * 1e3;
        let report: JobReport =
            serde_json::from_slice(&text).map_err(|e| format!("run {i}: report: {e}"))?;
        if report.outcome != (Outcome::Exited { code: 0 }) || !report.cleanup_errors.is_empty() {
            return Err(format!(
                "run {i}: {:?} {:?}",
                report.outcome, report.cleanup_errors
            ));
        }
        if i >= 5 {
            ms.push(elapsed);
        }
    }
    Ok(ms)
}
