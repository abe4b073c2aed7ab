//! Writing facts into the version tables. Runs on the worker's main thread
//! inside a transaction (pgrx asserts SPI is used from that thread).
//!
//! A batch is written in one transaction with its cursor row. Fast path: all
//! facts of a kind whose entity is new and appears once in the batch go in
//! with one `INSERT ... SELECT FROM unnest(...)`; the others (progressions,
//! corrections, repeats) go one by one through `liminal._make_room`. The fast
//! path runs in a subtransaction: if anything in it fails, it is rolled back
//! and every fact is retried in its own subtransaction, so one bad fact lands
//! in `liminal.ingest_errors` instead of rolling back the batch.

use liminal_facts::{FactBody, Timestamp};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::collections::{HashMap, HashSet};

/// A fact as it came over the bus: `(seq, kind, json)`.
#[derive(Debug, Clone)]
pub struct WireFact {
    pub seq: u64,
    pub kind: String,
    pub json: String,
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Facts with seq <= the committed cursor, skipped (already ingested).
    pub skipped: usize,
    pub stored: usize,
    pub rejected: usize,
    /// The cursor after the batch.
    pub last_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Wire(#[from] liminal_facts::WireError),
    #[error("{field} contains a NUL character, which PostgreSQL text cannot store")]
    Nul { field: &'static str },
    #[error("{field} = {value} is out of range for bigint")]
    Range { field: &'static str, value: u64 },
    #[error("{field}: timestamp {value} is out of PostgreSQL's range")]
    Time { field: &'static str, value: String },
}

/// Decode and check what PostgreSQL would refuse, so that most bad facts
/// never reach a statement.
pub fn decode(f: &WireFact) -> Result<FactBody, DecodeError> {
    let body = FactBody::from_wire(&f.kind, &f.json)?;
    // Valid JSON escapes every control character, so a NUL can only appear
    // in a string as \u0000; a raw "\\u0000" (escaped backslash) is a rare
    // false positive that still lands, verbatim, in ingest_errors.
    if f.json.contains("\\u0000") {
        return Err(DecodeError::Nul { field: "body" });
    }
    Ok(body)
}

fn ts(field: &'static str, t: Timestamp) -> Result<TimestampWithTimeZone, DecodeError> {
    TimestampWithTimeZone::try_from(t.pg_micros()).map_err(|_| DecodeError::Time {
        field,
        value: t.to_rfc3339(),
    })
}

fn big(field: &'static str, v: u64) -> Result<i64, DecodeError> {
    i64::try_from(v).map_err(|_| DecodeError::Range { field, value: v })
}

/// The table, entity key column and valid time of a fact.
fn placement(b: &FactBody) -> (&'static str, &'static str, String, Timestamp) {
    match b {
        FactBody::Run(f) => (
            "liminal.run_versions",
            "run_id",
            f.run_id.to_string(),
            f.valid_at,
        ),
        FactBody::TestResult(f) => (
            "liminal.test_result_versions",
            "id",
            f.id.to_string(),
            f.valid_at,
        ),
        FactBody::Signal(f) => ("liminal.signal_versions", "id", f.id.to_string(), f.at),
        FactBody::Artifact(f) => (
            "liminal.artifact_versions",
            "id",
            f.id.to_string(),
            f.valid_at,
        ),
        FactBody::ReproVerdict(f) => (
            "liminal.repro_verdict_versions",
            "run_id",
            f.run_id.to_string(),
            f.valid_at,
        ),
    }
}

fn fact_id(b: &FactBody) -> String {
    match b {
        FactBody::Run(f) => f.fact_id.to_string(),
        FactBody::TestResult(f) => f.fact_id.to_string(),
        FactBody::Signal(f) => f.fact_id.to_string(),
        FactBody::Artifact(f) => f.fact_id.to_string(),
        FactBody::ReproVerdict(f) => f.fact_id.to_string(),
    }
}

const INSERT_RUNS: &str = "INSERT INTO liminal.run_versions
    (fact_id, run_id, plan_name, status, exit_code, input_digest, image_digest, host,
     started_at, finished_at, reason, valid_from, valid_to, seq, source)
  SELECT u.*, $1 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[],
     $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[], $13::timestamptz[],
     $14::timestamptz[], $15::bigint[]) AS u
  ON CONFLICT (fact_id) DO NOTHING";

const INSERT_TESTS: &str = "INSERT INTO liminal.test_result_versions
    (fact_id, id, run_id, test_name, status, started_at, duration_ms, message,
     valid_from, valid_to, seq, source)
  SELECT u.*, $1 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
     $7::timestamptz[], $8::bigint[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::bigint[]) AS u
  ON CONFLICT (fact_id) DO NOTHING";

const INSERT_SIGNALS: &str = "INSERT INTO liminal.signal_versions
    (fact_id, id, run_id, test_result_id, kind, name, at, value, attrs, valid_from, valid_to, seq, source)
  SELECT u.f, u.i, u.r, u.t, u.k, u.n, u.a, u.v::jsonb, u.at::jsonb, u.a, u.vt, u.s, $1
  FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
     $8::timestamptz[], $9::text[], $10::text[], $11::timestamptz[], $12::bigint[])
     AS u(f, i, r, t, k, n, a, v, at, vt, s)
  ON CONFLICT (fact_id) DO NOTHING";

const INSERT_ARTIFACTS: &str = "INSERT INTO liminal.artifact_versions
    (fact_id, id, run_id, path, blake3, size, valid_from, valid_to, seq, source)
  SELECT u.*, $1 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
     $7::bigint[], $8::timestamptz[], $9::timestamptz[], $10::bigint[]) AS u
  ON CONFLICT (fact_id) DO NOTHING";

const INSERT_VERDICTS: &str = "INSERT INTO liminal.repro_verdict_versions
    (fact_id, run_id, input_digest, reproducible, variations, artifacts_compared, differing, culprit,
     valid_from, valid_to, seq, source)
  SELECT u.f, u.r, u.d, u.ok, ARRAY(SELECT jsonb_array_elements_text(u.va::jsonb)), u.n, u.di::jsonb,
     u.c, u.vf, u.vt, u.s, $1
  FROM unnest($2::text[], $3::text[], $4::text[], $5::bool[], $6::text[], $7::int[], $8::text[],
     $9::text[], $10::timestamptz[], $11::timestamptz[], $12::bigint[])
     AS u(f, r, d, ok, va, n, di, c, vf, vt, s)
  ON CONFLICT (fact_id) DO NOTHING";

#[derive(Default)]
struct RunCols {
    fact_id: Vec<String>,
    run_id: Vec<String>,
    plan_name: Vec<String>,
    status: Vec<String>,
    exit_code: Vec<Option<i32>>,
    input_digest: Vec<String>,
    image_digest: Vec<Option<String>>,
    host: Vec<String>,
    started_at: Vec<TimestampWithTimeZone>,
    finished_at: Vec<Option<TimestampWithTimeZone>>,
    reason: Vec<Option<String>>,
    valid_from: Vec<TimestampWithTimeZone>,
    valid_to: Vec<TimestampWithTimeZone>,
    seq: Vec<i64>,
}

#[derive(Default)]
struct TestCols {
    fact_id: Vec<String>,
    id: Vec<String>,
    run_id: Vec<String>,
    test_name: Vec<String>,
    status: Vec<String>,
    started_at: Vec<TimestampWithTimeZone>,
    duration_ms: Vec<i64>,
    message: Vec<Option<String>>,
    valid_from: Vec<TimestampWithTimeZone>,
    valid_to: Vec<TimestampWithTimeZone>,
    seq: Vec<i64>,
}

#[derive(Default)]
struct SignalCols {
    fact_id: Vec<String>,
    id: Vec<String>,
    run_id: Vec<String>,
    test_result_id: Vec<Option<String>>,
    kind: Vec<String>,
    name: Vec<String>,
    at: Vec<TimestampWithTimeZone>,
    value: Vec<String>,
    attrs: Vec<String>,
    valid_to: Vec<TimestampWithTimeZone>,
    seq: Vec<i64>,
}

#[derive(Default)]
struct ArtifactCols {
    fact_id: Vec<String>,
    id: Vec<String>,
    run_id: Vec<String>,
    path: Vec<String>,
    blake3: Vec<String>,
    size: Vec<i64>,
    valid_from: Vec<TimestampWithTimeZone>,
    valid_to: Vec<TimestampWithTimeZone>,
    seq: Vec<i64>,
}

#[derive(Default)]
struct VerdictCols {
    fact_id: Vec<String>,
    run_id: Vec<String>,
    input_digest: Vec<String>,
    reproducible: Vec<bool>,
    variations: Vec<String>,
    artifacts_compared: Vec<i32>,
    differing: Vec<String>,
    culprit: Vec<Option<String>>,
    valid_from: Vec<TimestampWithTimeZone>,
    valid_to: Vec<TimestampWithTimeZone>,
    seq: Vec<i64>,
}

/// Column vectors for one `INSERT ... unnest` per kind.
#[derive(Default)]
struct Columns {
    runs: RunCols,
    tests: TestCols,
    signals: SignalCols,
    artifacts: ArtifactCols,
    verdicts: VerdictCols,
}

impl Columns {
    fn push(
        &mut self,
        seq: u64,
        b: &FactBody,
        valid_to: TimestampWithTimeZone,
    ) -> Result<(), DecodeError> {
        let seq = big("seq", seq)?;
        match b {
            FactBody::Run(f) => {
                let c = &mut self.runs;
                c.started_at.push(ts("started_at", f.started_at)?);
                c.finished_at
                    .push(f.finished_at.map(|t| ts("finished_at", t)).transpose()?);
                c.valid_from.push(ts("valid_at", f.valid_at)?);
                c.fact_id.push(f.fact_id.to_string());
                c.run_id.push(f.run_id.to_string());
                c.plan_name.push(f.plan_name.clone());
                c.status.push(f.status.as_str().to_owned());
                c.exit_code.push(f.exit_code);
                c.input_digest.push(f.input_digest.clone());
                c.image_digest.push(f.image_digest.clone());
                c.host.push(f.host.clone());
                c.reason.push(f.reason.clone());
                c.valid_to.push(valid_to);
                c.seq.push(seq);
            }
            FactBody::TestResult(f) => {
                let c = &mut self.tests;
                c.started_at.push(ts("started_at", f.started_at)?);
                c.valid_from.push(ts("valid_at", f.valid_at)?);
                c.duration_ms.push(big("duration_ms", f.duration_ms)?);
                c.fact_id.push(f.fact_id.to_string());
                c.id.push(f.id.to_string());
                c.run_id.push(f.run_id.to_string());
                c.test_name.push(f.test_name.clone());
                c.status.push(f.status.as_str().to_owned());
                c.message.push(f.message.clone());
                c.valid_to.push(valid_to);
                c.seq.push(seq);
            }
            FactBody::Signal(f) => {
                let c = &mut self.signals;
                c.at.push(ts("at", f.at)?);
                c.fact_id.push(f.fact_id.to_string());
                c.id.push(f.id.to_string());
                c.run_id.push(f.run_id.to_string());
                c.test_result_id
                    .push(f.test_result_id.map(|u| u.to_string()));
                c.kind.push(f.kind.as_str().to_owned());
                c.name.push(f.name.clone());
                c.value.push(f.value.to_string());
                c.attrs.push(
                    serde_json::Value::Object(f.attrs.clone().into_iter().collect()).to_string(),
                );
                c.valid_to.push(valid_to);
                c.seq.push(seq);
            }
            FactBody::Artifact(f) => {
                let c = &mut self.artifacts;
                c.valid_from.push(ts("valid_at", f.valid_at)?);
                c.size.push(big("size", f.size)?);
                c.fact_id.push(f.fact_id.to_string());
                c.id.push(f.id.to_string());
                c.run_id.push(f.run_id.to_string());
                c.path.push(f.path.clone());
                c.blake3.push(f.blake3.clone());
                c.valid_to.push(valid_to);
                c.seq.push(seq);
            }
            FactBody::ReproVerdict(f) => {
                let c = &mut self.verdicts;
                c.valid_from.push(ts("valid_at", f.valid_at)?);
                c.artifacts_compared
                    .push(
                        i32::try_from(f.artifacts_compared).map_err(|_| DecodeError::Range {
                            field: "artifacts_compared",
                            value: u64::from(f.artifacts_compared),
                        })?,
                    );
                c.fact_id.push(f.fact_id.to_string());
                c.run_id.push(f.run_id.to_string());
                c.input_digest.push(f.input_digest.clone());
                c.reproducible.push(f.reproducible);
                c.variations
                    .push(serde_json::Value::from(f.variations.clone()).to_string());
                c.differing.push(
                    serde_json::to_string(&f.differing)
                        .map_err(|_| DecodeError::Nul { field: "differing" })?,
                );
                c.culprit.push(f.culprit.clone());
                c.valid_to.push(valid_to);
                c.seq.push(seq);
            }
        }
        Ok(())
    }

    /// Run one INSERT per non-empty kind. Returns rows inserted.
    fn insert(self, client: &mut SpiClient<'_>, source: &str) -> Result<u64, pgrx::spi::Error> {
        let mut n = 0u64;
        let src = || DatumWithOid::from(source.to_owned());
        let c = self.runs;
        if !c.fact_id.is_empty() {
            let args = [
                src(),
                c.fact_id.into(),
                c.run_id.into(),
                c.plan_name.into(),
                c.status.into(),
                c.exit_code.into(),
                c.input_digest.into(),
                c.image_digest.into(),
                c.host.into(),
                c.started_at.into(),
                c.finished_at.into(),
                c.reason.into(),
                c.valid_from.into(),
                c.valid_to.into(),
                c.seq.into(),
            ];
            n += client.update(INSERT_RUNS, None, &args)?.len() as u64;
        }
        let c = self.tests;
        if !c.fact_id.is_empty() {
            let args = [
                src(),
                c.fact_id.into(),
                c.id.into(),
                c.run_id.into(),
                c.test_name.into(),
                c.status.into(),
                c.started_at.into(),
                c.duration_ms.into(),
                c.message.into(),
                c.valid_from.into(),
                c.valid_to.into(),
                c.seq.into(),
            ];
            n += client.update(INSERT_TESTS, None, &args)?.len() as u64;
        }
        let c = self.signals;
        if !c.fact_id.is_empty() {
            let args = [
                src(),
                c.fact_id.into(),
                c.id.into(),
                c.run_id.into(),
                c.test_result_id.into(),
                c.kind.into(),
                c.name.into(),
                c.at.into(),
                c.value.into(),
                c.attrs.into(),
                c.valid_to.into(),
                c.seq.into(),
            ];
            n += client.update(INSERT_SIGNALS, None, &args)?.len() as u64;
        }
        let c = self.artifacts;
        if !c.fact_id.is_empty() {
            let args = [
                src(),
                c.fact_id.into(),
                c.id.into(),
                c.run_id.into(),
                c.path.into(),
                c.blake3.into(),
                c.size.into(),
                c.valid_from.into(),
                c.valid_to.into(),
                c.seq.into(),
            ];
            n += client.update(INSERT_ARTIFACTS, None, &args)?.len() as u64;
        }
        let c = self.verdicts;
        if !c.fact_id.is_empty() {
            let args = [
                src(),
                c.fact_id.into(),
                c.run_id.into(),
                c.input_digest.into(),
                c.reproducible.into(),
                c.variations.into(),
                c.artifacts_compared.into(),
                c.differing.into(),
                c.culprit.into(),
                c.valid_from.into(),
                c.valid_to.into(),
                c.seq.into(),
            ];
            n += client.update(INSERT_VERDICTS, None, &args)?.len() as u64;
        }
        Ok(n)
    }
}

fn infinity() -> TimestampWithTimeZone {
    TimestampWithTimeZone::positive_infinity()
}

/// Run `f` in a subtransaction; a PostgreSQL error inside rolls back only
/// the subtransaction and comes back as `Err(message)`.
pub fn in_subtransaction<R>(
    f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> Result<R, String> {
    // SAFETY: we are inside a transaction on the backend's main thread; the
    // memory context and resource owner are restored on both paths, as
    // PL/pgSQL does for its exception blocks.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);
        PgTryBuilder::new(move || {
            let r = f();
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
            Ok(r)
        })
        .catch_others(move |e| {
            pg_sys::MemoryContextSwitchTo(ctx);
            let msg = match &e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r) => match r.detail() {
                    Some(d) => format!("{}: {}", r.message(), d),
                    None => r.message().to_owned(),
                },
                pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                    ereport.message().to_owned()
                }
            };
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
            Err(msg)
        })
        .execute()
    }
}

/// Store one fact through `_make_room` (progressions, corrections, repeats).
/// Returns false when the fact was already stored (same fact_id).
fn apply_one(
    client: &mut SpiClient<'_>,
    source: &str,
    seq: u64,
    b: &FactBody,
) -> Result<bool, String> {
    let (table, key_col, key, valid_at) = placement(b);
    let fid = fact_id(b);
    let exists = client
        .select(
            &format!("SELECT 1 FROM {table} WHERE fact_id = $1"),
            Some(1),
            &[fid.into()],
        )
        .map_err(|e| e.to_string())?
        .len()
        > 0;
    if exists {
        return Ok(false);
    }
    let at = ts("valid time", valid_at).map_err(|e| e.to_string())?;
    let valid_to = client
        .update(
            "SELECT liminal._make_room($1::regclass, $2, $3, $4)",
            Some(1),
            &[table.into(), key_col.into(), key.into(), at.into()],
        )
        .map_err(|e| e.to_string())?
        .first()
        .get_one::<TimestampWithTimeZone>()
        .map_err(|e| e.to_string())?
        .unwrap_or_else(infinity);
    let mut cols = Columns::default();
    cols.push(seq, b, valid_to).map_err(|e| e.to_string())?;
    cols.insert(client, source).map_err(|e| e.to_string())?;
    Ok(true)
}

/// The fast path for a batch of decoded facts (see the module doc).
fn apply_all(
    client: &mut SpiClient<'_>,
    source: &str,
    facts: &[(u64, FactBody)],
) -> Result<usize, String> {
    // Entities already stored, per table.
    let mut keys: HashMap<&'static str, (&'static str, Vec<String>)> = HashMap::new();
    let mut seen: HashMap<(&'static str, String), usize> = HashMap::new();
    for (_, b) in facts {
        let (table, key_col, key, _) = placement(b);
        *seen.entry((table, key.clone())).or_default() += 1;
        keys.entry(table)
            .or_insert((key_col, Vec::new()))
            .1
            .push(key);
    }
    let mut existing: HashSet<(&'static str, String)> = HashSet::new();
    for (table, (key_col, ks)) in keys {
        let rows = client
            .select(
                // Every stored entity has exactly one current row: the unique
                // partial index answers this.
                &format!(
                    "SELECT {key_col} FROM {table} WHERE {key_col} = ANY($1) \
                     AND tx_to = 'infinity' AND valid_to = 'infinity'"
                ),
                None,
                &[ks.into()],
            )
            .map_err(|e| e.to_string())?;
        for row in rows {
            if let Ok(Some(k)) = row.get::<String>(1) {
                existing.insert((table, k));
            }
        }
    }
    let mut fresh = Columns::default();
    let mut slow = Vec::new();
    for (seq, b) in facts {
        let (table, _, key, _) = placement(b);
        let k = (table, key);
        if existing.contains(&k) || seen.get(&k).copied().unwrap_or(0) > 1 {
            slow.push((*seq, b));
        } else {
            fresh.push(*seq, b, infinity()).map_err(|e| e.to_string())?;
        }
    }
    let mut stored = fresh.insert(client, source).map_err(|e| e.to_string())? as usize;
    for (seq, b) in slow {
        if apply_one(client, source, seq, b)? {
            stored += 1;
        }
    }
    Ok(stored)
}

fn record_error(
    client: &mut SpiClient<'_>,
    source: &str,
    f: &WireFact,
    reason: &str,
) -> Result<(), pgrx::spi::Error> {
    let seq = i64::try_from(f.seq).unwrap_or(i64::MAX);
    // PostgreSQL text cannot hold NUL; keep everything else verbatim.
    let clean = |s: &str| s.replace('\0', "\u{FFFD}");
    client.update(
        "INSERT INTO liminal.ingest_errors (source, seq, kind, payload, reason) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (source, seq) DO NOTHING",
        None,
        &[
            source.into(),
            seq.into(),
            clean(&f.kind).into(),
            clean(&f.json).into(),
            clean(reason).into(),
        ],
    )?;
    Ok(())
}

/// The committed cursor of `source` (0 when none), locked for this
/// transaction so the filter below cannot race another writer.
pub fn cursor_for_update(source: &str) -> Result<u64, pgrx::spi::Error> {
    Spi::connect_mut(|client| {
        let v = client
            .update(
                "SELECT last_seq FROM liminal.ingest_cursor WHERE source = $1 FOR UPDATE",
                Some(1),
                &[source.into()],
            )?
            .first()
            .get_one::<i64>()
            .unwrap_or(None);
        Ok(v.map(|v| v.max(0) as u64).unwrap_or(0))
    })
}

/// Write one batch (sorted by seq, contiguous from the cursor or not — facts
/// at or below the committed cursor are skipped) with its cursor row. Must
/// run inside a transaction.
pub fn write_batch(
    source: &str,
    facts: &[WireFact],
    daemon_last_seq: Option<u64>,
) -> Result<BatchOutcome, String> {
    let cursor = cursor_for_update(source).map_err(|e| e.to_string())?;
    let mut out = BatchOutcome {
        last_seq: cursor,
        ..Default::default()
    };
    let mut expected = cursor + 1;
    let mut todo: Vec<&WireFact> = Vec::with_capacity(facts.len());
    for f in facts {
        if f.seq < expected {
            out.skipped += 1;
            continue;
        }
        if f.seq > expected {
            // Never write past a gap: the caller replays the missing facts.
            break;
        }
        todo.push(f);
        expected += 1;
    }
    if todo.is_empty() {
        return Ok(out);
    }
    let mut good: Vec<(u64, FactBody)> = Vec::with_capacity(todo.len());
    let mut bad: Vec<(&WireFact, String)> = Vec::new();
    for f in &todo {
        match decode(f) {
            Ok(b) => good.push((f.seq, b)),
            Err(e) => bad.push((f, e.to_string())),
        }
    }
    // An Err inside is raised as an ERROR so the subtransaction rolls back
    // whole (nothing half-written survives into the retry).
    let fast = in_subtransaction(std::panic::AssertUnwindSafe(|| {
        Spi::connect_mut(|client| apply_all(client, source, &good))
            .unwrap_or_else(|e| pgrx::error!("{e}"))
    }));
    match fast {
        Ok(n) => out.stored += n,
        Err(_) => {
            // Something in the batch is refused: find it fact by fact.
            for (seq, b) in &good {
                let r = in_subtransaction(std::panic::AssertUnwindSafe(|| {
                    Spi::connect_mut(|client| apply_one(client, source, *seq, b))
                        .unwrap_or_else(|e| pgrx::error!("{e}"))
                }));
                match r {
                    Ok(true) => out.stored += 1,
                    Ok(false) => {}
                    Err(e) => {
                        if let Some(f) = todo.iter().find(|f| f.seq == *seq) {
                            bad.push((f, e));
                        }
                    }
                }
            }
        }
    }
    let last = todo.last().map(|f| f.seq).unwrap_or(cursor);
    out.rejected = bad.len();
    out.last_seq = last;
    Spi::connect_mut(|client| -> Result<(), pgrx::spi::Error> {
        for (f, reason) in &bad {
            record_error(client, source, f, reason)?;
        }
        let last_i = i64::try_from(last).unwrap_or(i64::MAX);
        client.update(
            "INSERT INTO liminal.ingest_cursor (source, last_seq, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (source) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated_at = now()",
            None,
            &[source.into(), last_i.into()],
        )?;
        let daemon = daemon_last_seq.map(|d| i64::try_from(d.max(last)).unwrap_or(i64::MAX));
        client.update(
            "INSERT INTO liminal.ingest_state (source, connected, daemon_last_seq, updated_at)
             VALUES ($1, true, $2, now())
             ON CONFLICT (source) DO UPDATE SET daemon_last_seq = greatest(EXCLUDED.daemon_last_seq, ingest_state.daemon_last_seq),
                 updated_at = now()",
            None,
            &[source.into(), daemon.into()],
        )?;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Is the extension's schema there (the worker may start before
/// `CREATE EXTENSION liminal`)?
pub fn schema_ready() -> bool {
    Spi::get_one::<bool>("SELECT to_regclass('liminal.ingest_cursor') IS NOT NULL AND to_regprocedure('liminal._make_room(regclass,text,text,timestamptz)') IS NOT NULL")
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Record the worker's connection state for `liminal.ingest_status`.
pub fn set_state(
    source: &str,
    connected: bool,
    error: Option<&str>,
    daemon_last_seq: Option<u64>,
) -> Result<(), pgrx::spi::Error> {
    let daemon = daemon_last_seq.map(|d| i64::try_from(d).unwrap_or(i64::MAX));
    Spi::connect_mut(|client| {
        client.update(
            "INSERT INTO liminal.ingest_state (source, connected, last_error, daemon_last_seq, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (source) DO UPDATE SET connected = EXCLUDED.connected,
                 last_error = coalesce(EXCLUDED.last_error, CASE WHEN EXCLUDED.connected THEN NULL ELSE ingest_state.last_error END),
                 daemon_last_seq = coalesce(EXCLUDED.daemon_last_seq, ingest_state.daemon_last_seq),
                 updated_at = now()",
            None,
            &[source.into(), connected.into(), error.map(|e| e.replace('\0', "")).into(), daemon.into()],
        )?;
        Ok(())
    })
}

/// Facts `gap.seq..=to` were trimmed from the spool before they were
/// ingested: note the loss in `ingest_errors` and move the cursor past it.
pub fn record_gap(source: &str, gap: &WireFact, to: u64, reason: &str) -> Result<(), String> {
    Spi::connect_mut(|client| -> Result<(), pgrx::spi::Error> {
        record_error(client, source, gap, reason)?;
        let to = i64::try_from(to).unwrap_or(i64::MAX);
        client.update(
            "INSERT INTO liminal.ingest_cursor (source, last_seq, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (source) DO UPDATE SET last_seq = greatest(EXCLUDED.last_seq, ingest_cursor.last_seq), updated_at = now()",
            None,
            &[source.into(), to.into()],
        )?;
        Ok(())
    })
    .map_err(|e| e.to_string())
}
