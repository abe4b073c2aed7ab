//! What limctl prints: JSON (DESIGN.md's object) or a human summary, and
//! progress while a run goes.

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::io::IsTerminal;
use std::time::Duration;

/// Exit code for a final run status (see main.rs).
pub fn exit_code(status: &str) -> u8 {
    match status {
        "passed" => 0,
        "failed" | "timeout" => 1,
        "cancelled" | "interrupted" => 3,
        _ => 2,
    }
}

/// Prints the run and returns the exit code.
pub fn finish(run: &Value, json: bool) -> u8 {
    show(run, json);
    exit_code(run["status"].as_str().unwrap_or("error"))
}

pub fn show(run: &Value, json: bool) {
    if json {
        println!("{run}");
        return;
    }
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    println!(
        "run {}  plan {}  status {}{}",
        s(&run["run_id"]),
        s(&run["plan_name"]),
        s(&run["status"]),
        run["exit_code"]
            .as_i64()
            .map(|c| format!("  exit {c}"))
            .unwrap_or_default()
    );
    if let Some(d) = run["input_digest"].as_str().filter(|d| !d.is_empty()) {
        println!("input {d}");
    }
    if let Some(r) = run["reason"].as_str() {
        println!("reason: {r}");
    }
    let tests = run["tests"].as_array().cloned().unwrap_or_default();
    if !tests.is_empty() {
        let width = tests
            .iter()
            .map(|t| s(&t["name"]).len())
            .max()
            .unwrap_or(4)
            .max(4);
        println!("\n{:<width$}  {:<7}  {:>9}", "TEST", "STATUS", "MS");
        for t in &tests {
            println!(
                "{:<width$}  {:<7}  {:>9}",
                s(&t["name"]),
                s(&t["status"]),
                t["duration_ms"].as_u64().unwrap_or(0)
            );
        }
        let passed = tests.iter().filter(|t| t["status"] == "passed").count();
        let failed: Vec<&Value> = tests
            .iter()
            .filter(|t| t["status"] == "failed" || t["status"] == "error")
            .collect();
        println!(
            "\n{passed} passed, {} failed, {} total",
            failed.len(),
            tests.len()
        );
        for t in failed {
            println!("\nFAILED {}", s(&t["name"]));
            if let Some(m) = t["message"].as_str() {
                for line in m.lines() {
                    println!("    {line}");
                }
            }
        }
    }
    let artifacts = run["artifacts"].as_array().cloned().unwrap_or_default();
    if !artifacts.is_empty() {
        println!("\nartifacts:");
        for a in artifacts {
            println!(
                "  {}  {} bytes  blake3:{}",
                s(&a["path"]),
                a["size"].as_u64().unwrap_or(0),
                s(&a["blake3"])
            );
        }
    }
}

pub fn list(runs: &[(String, String, String, String, u64)], json: bool) {
    if json {
        for (id, plan, status, digest, started) in runs {
            println!(
                "{}",
                serde_json::json!({"run_id": id, "plan_name": plan, "status": status, "input_digest": digest, "started_at_us": started})
            );
        }
        return;
    }
    println!("{:<26}  {:<24}  {:<11}  INPUT", "RUN", "PLAN", "STATUS");
    for (id, plan, status, digest, _) in runs {
        println!("{id:<26}  {plan:<24}  {status:<11}  {digest}");
    }
}

/// A bar on a terminal; plain state lines on stderr otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    run_id: String,
    last: std::cell::RefCell<String>,
}

impl Progress {
    pub fn new(run_id: &str, json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            run_id: run_id.to_owned(),
            last: Default::default(),
        }
    }

    pub fn update(&self, state: &str, passed: u32, failed: u32) {
        let line = format!("{state}: {passed} passed, {failed} failed");
        if *self.last.borrow() == line {
            return;
        }
        match &self.bar {
            Some(bar) => bar.set_message(format!("run {} {line}", self.run_id)),
            None => eprintln!("run {} {line}", self.run_id),
        }
        *self.last.borrow_mut() = line;
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
