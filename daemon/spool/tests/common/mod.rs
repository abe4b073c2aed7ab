//! Helpers shared by the spool's integration tests.
#![allow(dead_code)]

use liminal_facts::{FactBody, SignalFact, SignalKind, Timestamp, Ulid};
use liminal_spool::{Spool, SpoolConfig};
use std::path::Path;

/// A realistic log-line signal fact (about 300 bytes of wire JSON) whose
/// name carries `tag`, so a test can tell facts apart after a read.
pub fn signal(tag: &str) -> FactBody {
    FactBody::Signal(SignalFact {
        fact_id: Ulid::new(),
        id: Ulid::new(),
        run_id: Ulid::new(),
        test_result_id: Some(Ulid::new()),
        kind: SignalKind::Log,
        name: tag.to_string(),
        at: Timestamp::from_unix_micros(1_763_800_000_000_000),
        value: serde_json::json!("connection pool: 4 of 16 connections busy, waiting 12ms"),
        attrs: [
            ("stream".to_string(), serde_json::json!("stdout")),
            ("line".to_string(), serde_json::json!(42)),
        ]
        .into(),
    })
}

/// Bytes one record of this fact takes on disk.
pub fn record_len(fact: &FactBody) -> u64 {
    let (kind, json) = fact.to_wire();
    (8 + 9 + kind.len() + json.len()) as u64
}

/// The `name` of a signal fact read back as wire JSON.
pub fn tag_of(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("stored body is JSON");
    v["name"].as_str().expect("signal has a name").to_string()
}

pub fn small_segments() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 4096,
        quota_bytes: 64 * 1024 * 1024,
        ..SpoolConfig::default()
    }
}

pub fn open(dir: &Path, cfg: SpoolConfig) -> (Spool, liminal_spool::RecoveryReport) {
    Spool::open(dir, cfg).expect("spool opens")
}

/// A tiny deterministic RNG (splitmix64) so failures are reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
