//! A run folded from its facts: what liminald knows about each run (and
//! `limctl run --local` about its one run). [`RunRecord::to_json`] is the
//! object of `GetRun` and `limctl --json` (DESIGN.md), so both print it
//! from this one fold.
//!
//! The same fold serves live runs (facts as they are announced) and recovery
//! (facts replayed from the spool at start), so `GetRun` after a restart
//! answers exactly as before it.

use crate::{FactBody, RunFact, RunStatus, TestStatus, Timestamp, Ulid};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct TestEntry {
    pub name: String,
    pub status: TestStatus,
    pub duration_ms: u64,
    pub message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ArtifactEntry {
    pub path: String,
    pub blake3: String,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run_id: Ulid,
    pub plan_name: String,
    pub status: RunStatus,
    pub exit_code: Option<i32>,
    pub input_digest: String,
    pub image_digest: Option<String>,
    pub host: String,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub reason: Option<String>,
    pub tests: Vec<TestEntry>,
    pub artifacts: Vec<ArtifactEntry>,
    /// The plan's timeout, for `Progress` (unknown for recovered runs).
    pub timeout: Option<Duration>,
    /// Facts seen for this run (progress while running).
    pub facts_seen: u64,
    /// The reproducibility verdict of a VerifyReproducible run.
    pub repro: Option<serde_json::Value>,
}

/// Which Run properties a fact moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Changed {
    pub state: bool,
    pub progress: bool,
    pub passed: bool,
    pub failed: bool,
    pub input_digest: bool,
}

impl RunRecord {
    pub fn new(run_id: Ulid, plan_name: String, host: String, timeout: Option<Duration>) -> Self {
        RunRecord {
            run_id,
            plan_name,
            status: RunStatus::Queued,
            exit_code: None,
            input_digest: String::new(),
            image_digest: None,
            host,
            started_at: Timestamp::now(),
            finished_at: None,
            reason: None,
            tests: Vec::new(),
            artifacts: Vec::new(),
            timeout,
            facts_seen: 0,
            repro: None,
        }
    }

    pub fn from_run_fact(f: &RunFact) -> Self {
        let mut r = RunRecord::new(f.run_id, f.plan_name.clone(), f.host.clone(), None);
        r.apply_run(f);
        r
    }

    /// A run fact with this record's identity and the given status.
    pub fn run_fact(&self, status: RunStatus, reason: Option<String>) -> RunFact {
        let now = Timestamp::now();
        RunFact {
            fact_id: crate::new_id(),
            run_id: self.run_id,
            plan_name: self.plan_name.clone(),
            status,
            exit_code: None,
            input_digest: self.input_digest.clone(),
            image_digest: self.image_digest.clone(),
            host: self.host.clone(),
            started_at: self.started_at,
            finished_at: status.is_final().then_some(now),
            reason,
            valid_at: now,
        }
    }

    fn apply_run(&mut self, f: &RunFact) -> Changed {
        let mut c = Changed::default();
        if self.status != f.status {
            c.state = true;
            c.progress = true;
        }
        // A final status is never overwritten by a late non-final one.
        if !self.status.is_final() || f.status.is_final() {
            self.status = f.status;
        }
        if !f.input_digest.is_empty() && f.input_digest != self.input_digest {
            self.input_digest = f.input_digest.clone();
            c.input_digest = true;
        }
        self.plan_name = f.plan_name.clone();
        self.host = f.host.clone();
        self.started_at = f.started_at;
        self.exit_code = f.exit_code.or(self.exit_code);
        self.image_digest = f.image_digest.clone().or(self.image_digest.take());
        self.finished_at = f.finished_at.or(self.finished_at);
        if f.reason.is_some() {
            self.reason = f.reason.clone();
        }
        c
    }

    pub fn apply(&mut self, fact: &FactBody) -> Changed {
        self.facts_seen += 1;
        match fact {
            FactBody::Run(f) => self.apply_run(f),
            FactBody::TestResult(t) => {
                let entry = TestEntry {
                    name: t.test_name.clone(),
                    status: t.status,
                    duration_ms: t.duration_ms,
                    message: t.message.clone(),
                };
                // A correction of the same test result replaces it.
                match self.tests.iter_mut().find(|e| e.name == t.test_name) {
                    Some(e) => *e = entry,
                    None => self.tests.push(entry),
                }
                Changed {
                    passed: t.status == TestStatus::Passed,
                    failed: matches!(t.status, TestStatus::Failed | TestStatus::Error),
                    progress: true,
                    ..Changed::default()
                }
            }
            FactBody::Artifact(a) => {
                self.artifacts.push(ArtifactEntry {
                    path: a.path.clone(),
                    blake3: a.blake3.clone(),
                    size: a.size,
                });
                Changed::default()
            }
            FactBody::ReproVerdict(v) => {
                self.repro = serde_json::to_value(v).ok();
                Changed::default()
            }
            FactBody::Signal(_) => Changed {
                progress: self.status == RunStatus::Running,
                ..Changed::default()
            },
        }
    }

    pub fn passed(&self) -> u32 {
        count(&self.tests, |s| s == TestStatus::Passed)
    }

    pub fn failed(&self) -> u32 {
        count(&self.tests, |s| {
            matches!(s, TestStatus::Failed | TestStatus::Error)
        })
    }

    /// 0 while queued, 1 once final; while running, the share of the plan's
    /// timeout already used, capped at 0.95 (a run's length is unknown
    /// beforehand, so this is an upper-bound clock, not a test count).
    pub fn progress(&self) -> f64 {
        match self.status {
            RunStatus::Queued => 0.0,
            s if s.is_final() => 1.0,
            _ => {
                let Some(timeout) = self.timeout.filter(|t| !t.is_zero()) else {
                    return 0.5;
                };
                let elapsed_us = Timestamp::now().unix_micros() - self.started_at.unix_micros();
                let share = elapsed_us.max(0) as f64 / timeout.as_micros() as f64;
                share.clamp(0.01, 0.95)
            }
        }
    }

    /// DESIGN.md's `limctl --json` object (plus `plan_name`, `reason` and
    /// per-test `message`, additive).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "run_id": self.run_id.to_string(),
            "plan_name": self.plan_name,
            "status": self.status.as_str(),
            "exit_code": self.exit_code,
            "input_digest": self.input_digest,
            "reason": self.reason,
            "started_at": self.started_at.to_rfc3339(),
            "finished_at": self.finished_at.map(|t| t.to_rfc3339()),
            "tests": self.tests.iter().map(|t| {
                let mut v = json!({"name": t.name, "status": t.status.as_str(), "duration_ms": t.duration_ms});
                if let Some(m) = &t.message { v["message"] = json!(m); }
                v
            }).collect::<Vec<_>>(),
            "artifacts": self.artifacts.iter().map(|a| json!({"path": a.path, "blake3": a.blake3, "size": a.size})).collect::<Vec<_>>(),
            "repro": self.repro,
        })
    }
}

fn count(tests: &[TestEntry], pred: impl Fn(TestStatus) -> bool) -> u32 {
    u32::try_from(tests.iter().filter(|t| pred(t.status)).count()).unwrap_or(u32::MAX)
}
