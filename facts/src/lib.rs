//! Liminal's facts: what a run produced, as typed values, and how they travel.
//!
//! This crate is the contract between `liminald` (which produces and spools
//! facts) and the PostgreSQL extension `liminal` (which ingests them). It has
//! no heavy dependencies on purpose: the extension links it into every
//! PostgreSQL backend.
//!
//! # Wire format
//! On D-Bus a batch of facts is an array of `(tss)`: the spool sequence number,
//! the fact kind (`run`, `test_result`, `signal`, `artifact`,
//! `repro_verdict`) and the fact's JSON body ([`FactBody`] serialized without
//! its kind tag). Keeping the body JSON lets a consumer store a fact it cannot
//! parse verbatim (in `liminal.ingest_errors`) instead of losing it, and lets
//! `busctl` show facts readably.

pub mod record;
mod time_fmt;

pub use time_fmt::{Timestamp, TimestampError};
pub use ulid::Ulid;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A fact with its place in the daemon's spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fact {
    /// Spool sequence number: strictly increasing per source, starting at 1.
    pub seq: u64,
    pub body: FactBody,
}

/// The kinds of facts. Each names the entity it describes by a ULID; a later
/// fact about the same entity (a run that finished, a re-classified failure)
/// is a new version of it, never an overwrite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FactBody {
    Run(RunFact),
    TestResult(TestResultFact),
    Signal(SignalFact),
    Artifact(ArtifactFact),
    ReproVerdict(ReproVerdictFact),
}

impl FactBody {
    /// The kind string used on the wire.
    pub fn kind(&self) -> FactKind {
        match self {
            FactBody::Run(_) => FactKind::Run,
            FactBody::TestResult(_) => FactKind::TestResult,
            FactBody::Signal(_) => FactKind::Signal,
            FactBody::Artifact(_) => FactKind::Artifact,
            FactBody::ReproVerdict(_) => FactKind::ReproVerdict,
        }
    }

    /// The run this fact belongs to.
    pub fn run_id(&self) -> Ulid {
        match self {
            FactBody::Run(f) => f.run_id,
            FactBody::TestResult(f) => f.run_id,
            FactBody::Signal(f) => f.run_id,
            FactBody::Artifact(f) => f.run_id,
            FactBody::ReproVerdict(f) => f.run_id,
        }
    }

    /// Encode for the wire: `(kind, json)`; the JSON carries no kind tag.
    pub fn to_wire(&self) -> (&'static str, String) {
        let json = match self {
            FactBody::Run(f) => serde_json::to_string(f),
            FactBody::TestResult(f) => serde_json::to_string(f),
            FactBody::Signal(f) => serde_json::to_string(f),
            FactBody::Artifact(f) => serde_json::to_string(f),
            FactBody::ReproVerdict(f) => serde_json::to_string(f),
        }
        // Serializing these plain structs into a String cannot fail: no maps
        // with non-string keys, no failing Serialize impls.
        .expect("fact bodies always serialize");
        (self.kind().as_str(), json)
    }

    /// Decode a `(kind, json)` pair from the wire.
    pub fn from_wire(kind: &str, json: &str) -> Result<Self, WireError> {
        let kind: FactKind = kind.parse()?;
        let parsed = match kind {
            FactKind::Run => serde_json::from_str(json).map(FactBody::Run),
            FactKind::TestResult => serde_json::from_str(json).map(FactBody::TestResult),
            FactKind::Signal => serde_json::from_str(json).map(FactBody::Signal),
            FactKind::Artifact => serde_json::from_str(json).map(FactBody::Artifact),
            FactKind::ReproVerdict => serde_json::from_str(json).map(FactBody::ReproVerdict),
        };
        parsed.map_err(|e| WireError::Body { kind, source: e })
    }
}

/// The D-Bus signature of one fact on the wire.
pub const WIRE_SIGNATURE: &str = "(tss)";

/// Errors decoding a fact from the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(
        "unknown fact kind {0:?} (expected run, test_result, signal, artifact or repro_verdict)"
    )]
    UnknownKind(String),
    #[error("malformed {kind} fact: {source}")]
    Body {
        kind: FactKind,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    Run,
    TestResult,
    Signal,
    Artifact,
    ReproVerdict,
}

impl FactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FactKind::Run => "run",
            FactKind::TestResult => "test_result",
            FactKind::Signal => "signal",
            FactKind::Artifact => "artifact",
            FactKind::ReproVerdict => "repro_verdict",
        }
    }
}

impl std::fmt::Display for FactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FactKind {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "run" => FactKind::Run,
            "test_result" => FactKind::TestResult,
            "signal" => FactKind::Signal,
            "artifact" => FactKind::Artifact,
            "repro_verdict" => FactKind::ReproVerdict,
            other => return Err(WireError::UnknownKind(other.to_owned())),
        })
    }
}

/// How a run ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Passed,
    Failed,
    /// The run could not run: bad image, missing report, sandbox failure.
    Error,
    Timeout,
    Cancelled,
    /// The daemon died while the run was going; set on recovery.
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Passed => "passed",
            RunStatus::Failed => "failed",
            RunStatus::Error => "error",
            RunStatus::Timeout => "timeout",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run: emitted when it starts and again, as a new version, when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFact {
    /// Identity of this fact version.
    pub fact_id: Ulid,
    pub run_id: Ulid,
    pub plan_name: String,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Hex BLAKE3 of the run's inputs; equal digests mean "the same inputs".
    pub input_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    pub host: String,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Why the run is `error`, `timeout`, or was killed (OOM), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Valid time: when this state became true.
    pub valid_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    Passed,
    Failed,
    Skipped,
    Error,
}

impl TestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TestStatus::Passed => "passed",
            TestStatus::Failed => "failed",
            TestStatus::Skipped => "skipped",
            TestStatus::Error => "error",
        }
    }
}

impl std::fmt::Display for TestStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One test case's outcome within a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResultFact {
    pub fact_id: Ulid,
    /// Identity of the test result (stable across corrections).
    pub id: Ulid,
    pub run_id: Ulid,
    /// Fully qualified: `suite::class::case` as the report names it.
    pub test_name: String,
    pub status: TestStatus,
    pub started_at: Timestamp,
    pub duration_ms: u64,
    /// The failure or skip message, if the report had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub valid_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    Event,
    Metric,
    Log,
}

impl SignalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::Event => "event",
            SignalKind::Metric => "metric",
            SignalKind::Log => "log",
        }
    }
}

/// Something observed during a run: a log line, an event or a metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalFact {
    pub fact_id: Ulid,
    pub id: Ulid,
    pub run_id: Ulid,
    /// The test this signal belongs to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_result_id: Option<Ulid>,
    pub kind: SignalKind,
    /// `stdout`/`stderr` for captured lines; the payload's name otherwise.
    pub name: String,
    /// When it was written in the sandbox (valid time).
    pub at: Timestamp,
    #[serde(default)]
    pub value: serde_json::Value,
    #[serde(default)]
    pub attrs: BTreeMap<String, serde_json::Value>,
}

/// A file the run produced, by content digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactFact {
    pub fact_id: Ulid,
    pub id: Ulid,
    pub run_id: Ulid,
    /// Relative to the sandbox workdir.
    pub path: String,
    /// Hex BLAKE3 of the content; the key in the content-addressed store.
    pub blake3: String,
    pub size: u64,
    pub valid_at: Timestamp,
}

/// The verdict of a reproducibility check over one input digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReproVerdictFact {
    pub fact_id: Ulid,
    /// The verification run that produced the verdict.
    pub run_id: Ulid,
    pub input_digest: String,
    pub reproducible: bool,
    pub variations: Vec<String>,
    pub artifacts_compared: u32,
    #[serde(default)]
    pub differing: Vec<ArtifactDifference>,
    /// The single variation found responsible, when the search found one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub culprit: Option<String>,
    /// Every variation found to change some artifact (several when more than
    /// one is responsible; `culprit` is set only when exactly one is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub culprits: Vec<String>,
    /// Artifacts differed between two builds with no variation at all.
    #[serde(default)]
    pub nondeterministic: bool,
    /// Requested variations that could not be applied, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    pub valid_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactDifference {
    pub path: String,
    pub digests: Vec<String>,
    /// BLAKE3 of the stored diffoscope report, when diffoscope was available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_blake3: Option<String>,
    /// The variations that changed this artifact on their own, or
    /// `["nondeterministic"]` when it differs with none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub culprits: Vec<String>,
}

/// A new fact id: ULIDs sort by creation time.
pub fn new_id() -> Ulid {
    Ulid::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_signal() -> FactBody {
        FactBody::Signal(SignalFact {
            fact_id: new_id(),
            id: new_id(),
            run_id: new_id(),
            test_result_id: None,
            kind: SignalKind::Event,
            name: "db.reconnect".into(),
            at: Timestamp::from_unix_micros(1_700_000_000_123_456),
            value: serde_json::json!(3),
            attrs: [("host".to_string(), serde_json::json!("db1"))].into(),
        })
    }

    #[test]
    fn wire_round_trip_keeps_every_field() {
        let fact = sample_signal();
        let (kind, json) = fact.to_wire();
        assert_eq!(kind, "signal");
        assert!(
            !json.contains("\"kind\":\"signal\""),
            "kind travels beside the body"
        );
        let back = FactBody::from_wire(kind, &json).unwrap();
        assert_eq!(back, fact);
    }

    #[test]
    fn unknown_kind_and_bad_body_are_typed_errors() {
        assert!(matches!(
            FactBody::from_wire("bogus", "{}"),
            Err(WireError::UnknownKind(k)) if k == "bogus"
        ));
        let err = FactBody::from_wire("run", "{\"run_id\": 3}").unwrap_err();
        assert!(matches!(
            err,
            WireError::Body {
                kind: FactKind::Run,
                ..
            }
        ));
        assert!(err.to_string().starts_with("malformed run fact"));
    }

    #[test]
    fn run_status_finality() {
        assert!(!RunStatus::Running.is_final());
        assert!(RunStatus::Timeout.is_final());
        assert_eq!(
            serde_json::to_string(&RunStatus::Cancelled).unwrap(),
            "\"cancelled\""
        );
    }
}
