//! Writing facts into the version tables. Runs on the worker's main thread
//! inside a transaction (pgrx asserts SPI is used from that thread).
//!
//! A batch is written in one transaction with its cursor row. Fast path:
//! every fact goes in as a new entity's first version with one
//! `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING` per kind; the
//! few the unique indexes turn away (progressions, corrections, an entity
//! repeated within the batch, a fact already stored) then go one by one, in
//! seq order, through [`make_room`]. The fast path runs in a subtransaction:
//! if anything in it fails, it is rolled back and every fact is retried in
//! its own subtransaction, so one bad fact lands in `liminal.ingest_errors`
//! instead of rolling back the batch. Every statement runs on a plan kept for
//! the backend's life ([`run_cached`]).

use liminal_facts::{FactBody, Timestamp};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

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

// The arrays are unnested in the select list (lockstep, streamed row by
// row) rather than with a multi-argument `unnest` in FROM, which
// materializes every array into a tuplestore first.
const INSERT_RUNS: &str = "INSERT INTO liminal.run_versions
    (fact_id, run_id, plan_name, status, exit_code, input_digest, image_digest, host,
     started_at, finished_at, reason, valid_from, valid_to, seq, source)
  SELECT unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::text[]),
     unnest($6::int[]), unnest($7::text[]), unnest($8::text[]), unnest($9::text[]),
     unnest($10::timestamptz[]), unnest($11::timestamptz[]), unnest($12::text[]),
     unnest($13::timestamptz[]), unnest($14::timestamptz[]), unnest($15::bigint[]), $1
  {conflict} RETURNING seq";

const INSERT_TESTS: &str = "INSERT INTO liminal.test_result_versions
    (fact_id, id, run_id, test_name, status, started_at, duration_ms, message,
     valid_from, valid_to, seq, source)
  SELECT unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::text[]),
     unnest($6::text[]), unnest($7::timestamptz[]), unnest($8::bigint[]), unnest($9::text[]),
     unnest($10::timestamptz[]), unnest($11::timestamptz[]), unnest($12::bigint[]), $1
  {conflict} RETURNING seq";

const INSERT_SIGNALS: &str = "INSERT INTO liminal.signal_versions
    (fact_id, id, run_id, test_result_id, kind, name, at, value, attrs, valid_from, valid_to, seq, source)
  SELECT unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::text[]),
     unnest($6::text[]), unnest($7::text[]), unnest($8::timestamptz[]), unnest($9::text[])::jsonb,
     unnest($10::text[])::jsonb, unnest($8::timestamptz[]), unnest($11::timestamptz[]),
     unnest($12::bigint[]), $1
  {conflict} RETURNING seq";

const INSERT_ARTIFACTS: &str = "INSERT INTO liminal.artifact_versions
    (fact_id, id, run_id, path, blake3, size, valid_from, valid_to, seq, source)
  SELECT unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::text[]),
     unnest($6::text[]), unnest($7::bigint[]), unnest($8::timestamptz[]), unnest($9::timestamptz[]),
     unnest($10::bigint[]), $1
  {conflict} RETURNING seq";

const INSERT_VERDICTS: &str = "INSERT INTO liminal.repro_verdict_versions
    (fact_id, run_id, input_digest, reproducible, variations, artifacts_compared, differing, culprit,
     valid_from, valid_to, seq, source)
  SELECT u.f, u.r, u.d, u.ok, ARRAY(SELECT jsonb_array_elements_text(u.va::jsonb)), u.n, u.di::jsonb,
     u.c, u.vf, u.vt, u.s, $1
  FROM unnest($2::text[], $3::text[], $4::text[], $5::bool[], $6::text[], $7::int[], $8::text[],
     $9::text[], $10::timestamptz[], $11::timestamptz[], $12::bigint[])
     AS u(f, r, d, ok, va, n, di, c, vf, vt, s)
  {conflict} RETURNING seq";

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

    /// Run one INSERT per non-empty kind. Returns the seqs of the rows
    /// inserted; a row that meets a conflict the `conflict` target names is
    /// left out (see [`Conflict`]).
    fn insert(
        self,
        client: &mut SpiClient<'_>,
        source: &str,
        conflict: Conflict,
    ) -> Result<Vec<i64>, pgrx::spi::Error> {
        let mut inserted = Vec::new();
        let src = || DatumWithOid::from(source.to_owned());
        let mut run = |sql: &str,
                       versioned: bool,
                       args: &[DatumWithOid<'_>]|
         -> Result<(), pgrx::spi::Error> {
            let sql = sql.replace("{conflict}", conflict.clause(versioned));
            for row in run_cached(client, &sql, args)? {
                if let Some(seq) = row.get::<i64>(1)? {
                    inserted.push(seq);
                }
            }
            Ok(())
        };
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
            run(INSERT_RUNS, true, &args)?;
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
            run(INSERT_TESTS, true, &args)?;
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
            run(INSERT_SIGNALS, false, &args)?;
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
            run(INSERT_ARTIFACTS, false, &args)?;
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
            run(INSERT_VERDICTS, true, &args)?;
        }
        Ok(inserted)
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

/// Which conflicts an INSERT of new versions skips instead of raising.
#[derive(Clone, Copy)]
enum Conflict {
    /// The fast path. Runs, test results and verdicts skip a conflict on any
    /// unique index: a repeated fact (its `fact_id`) or an entity that
    /// already has a current row (a progression); the rows skipped are then
    /// looked at one by one. Signals and artifacts are never restated by
    /// liminald, so they skip nothing: speculative insertion's extra index
    /// probes cost about a tenth of their insert, and should one conflict
    /// anyway the batch's fast path rolls back and every fact is retried on
    /// its own, which handles it.
    Fast,
    /// Only a repeated fact. Used after [`make_room`], where a conflict on
    /// the current row would mean a fact silently lost: it raises instead.
    FactId,
}

impl Conflict {
    /// `versioned`: the kind's entities get new versions from liminald.
    fn clause(self, versioned: bool) -> &'static str {
        match self {
            Conflict::Fast if versioned => "ON CONFLICT DO NOTHING",
            Conflict::Fast => "",
            Conflict::FactId => "ON CONFLICT (fact_id) DO NOTHING",
        }
    }
}

thread_local! {
    /// The ingest statements' plans, prepared on first use and kept for the
    /// backend's life: parsing and planning them per batch (and per fact on
    /// the slow path) cost more than the inserts. PostgreSQL's plan cache
    /// re-plans them itself when the tables change.
    static PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Execute `sql` through a kept plan prepared with the types of `args`.
fn run_cached<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &str,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'conn>, pgrx::spi::Error> {
    let plan = match PLANS.with(|p| p.borrow().get(sql).cloned()) {
        Some(plan) => plan,
        None => {
            let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
            let plan = Rc::new(client.prepare_mut(sql, &types)?.keep());
            PLANS.with(|p| p.borrow_mut().insert(sql.to_owned(), plan.clone()));
            plan
        }
    };
    client.update(&*plan, None, args)
}

/// Before a version of entity `key` valid from `at` is inserted into
/// `table`: close (tx_to = now()) the transaction-current version covering
/// `at`, re-state its earlier part when it started before `at`, and return
/// the valid_to the new version must take.
///
/// The same steps as `liminal._make_room` (schema.sql), which corrections
/// use; this copy runs on kept plans (the SQL function's dynamic EXECUTEs
/// are parsed and planned on every call, which made progressions the
/// ingest's most expensive facts). The store's pg_tests pin the resulting
/// versions, and `ingest_and_make_room_agree` compares the two directly.
fn make_room(
    client: &mut SpiClient<'_>,
    table: &str,
    key_col: &str,
    key: &str,
    at: TimestampWithTimeZone,
) -> Result<TimestampWithTimeZone, pgrx::spi::Error> {
    // The key is matched as a range and the rows ordered by it: the same
    // rows as `key = $1`, but only an index on the key can deliver that order
    // without a sort. With `=` (which makes the ORDER BY redundant) the
    // planner, on young tables whose statistics are not in yet, costed every
    // partial index with the "current" predicate alike and picked the
    // analytics' index of runs by host: a scan of every current row per
    // lookup, which made progressions the ingest's most expensive facts.
    let cover_sql = [
        // Usually the current row, through its unique partial index.
        format!(
            "SELECT version_id, valid_to, valid_from < $2 FROM {table} \
             WHERE {key_col} BETWEEN $1 AND $1 \
             AND tx_to = 'infinity' AND valid_to = 'infinity' AND valid_from <= $2 \
             ORDER BY {key_col} FOR UPDATE"
        ),
        format!(
            "SELECT version_id, valid_to, valid_from < $2 FROM {table} \
             WHERE {key_col} BETWEEN $1 AND $1 \
             AND tx_to = 'infinity' AND valid_from <= $2 AND $2 < valid_to \
             ORDER BY {key_col} FOR UPDATE"
        ),
    ];
    let mut cover = None;
    for sql in &cover_sql {
        let rows = run_cached(client, sql, &[key.into(), at.into()])?;
        if let Some(row) = rows.into_iter().next() {
            let id = row.get::<i64>(1)?;
            let to = row.get::<TimestampWithTimeZone>(2)?;
            let earlier = row.get::<bool>(3)?;
            if let (Some(id), Some(to), Some(earlier)) = (id, to, earlier) {
                cover = Some((id, to, earlier));
                break;
            }
        }
    }
    let Some((cover_id, cover_to, started_earlier)) = cover else {
        // Earlier than anything known (or a new entity): valid until the
        // first known version, or forever.
        let sql = format!(
            "SELECT min(valid_from) FROM {table} WHERE {key_col} = $1 AND tx_to = 'infinity'"
        );
        let next = run_cached(client, &sql, &[key.into()])?
            .first()
            .get_one::<TimestampWithTimeZone>()?;
        return Ok(next.unwrap_or_else(infinity));
    };
    run_cached(
        client,
        &format!("UPDATE {table} SET tx_to = now() WHERE version_id = $1"),
        &[cover_id.into()],
    )?;
    if started_earlier {
        // Progression: the old state held until `at`; re-state it so. The
        // column list comes from the catalog, as `_make_room` copies every
        // column through jsonb.
        let cols = run_cached(
            client,
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
             WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
               AND attname NOT IN ('version_id', 'valid_to', 'tx_from', 'tx_to', 'fact_id', 'restated_from')",
            &[table.into()],
        )?
        .first()
        .get_one::<String>()?
        .unwrap_or_default();
        run_cached(
            client,
            &format!(
                "INSERT INTO {table} ({cols}, valid_to, tx_from, tx_to, restated_from) \
                 SELECT {cols}, $2, now(), 'infinity', version_id FROM {table} WHERE version_id = $1"
            ),
            &[cover_id.into(), at.into()],
        )?;
    }
    // Correction (same valid time) or progression: the new version takes
    // over the rest of the covered range.
    Ok(cover_to)
}

/// Store one fact that is a new version of a known entity (a progression, a
/// correction, a repeat of the entity within the batch) or a repeat of a
/// stored fact. Returns false for the latter (same fact_id: nothing to do).
fn apply_one(
    client: &mut SpiClient<'_>,
    source: &str,
    seq: u64,
    b: &FactBody,
) -> Result<bool, String> {
    let (table, key_col, key, valid_at) = placement(b);
    let fid = fact_id(b);
    let exists = !run_cached(
        client,
        &format!("SELECT 1 FROM {table} WHERE fact_id = $1"),
        &[fid.into()],
    )
    .map_err(|e| e.to_string())?
    .is_empty();
    if exists {
        return Ok(false);
    }
    let at = ts("valid time", valid_at).map_err(|e| e.to_string())?;
    let valid_to = make_room(client, table, key_col, &key, at).map_err(|e| e.to_string())?;
    let mut cols = Columns::default();
    cols.push(seq, b, valid_to).map_err(|e| e.to_string())?;
    let stored = cols
        .insert(client, source, Conflict::FactId)
        .map_err(|e| e.to_string())?;
    Ok(!stored.is_empty())
}

/// The fast path for a batch of decoded facts, in seq order: every fact
/// goes into one INSERT per kind as a new entity's first version; the few
/// that conflict (a known entity, or a repeated fact) then go one by one
/// through [`apply_one`], still in seq order, so a later fact about an
/// entity always lands after an earlier one.
fn apply_all(
    client: &mut SpiClient<'_>,
    source: &str,
    facts: &[(u64, FactBody)],
) -> Result<usize, String> {
    let mut fresh = Columns::default();
    for (seq, b) in facts {
        fresh.push(*seq, b, infinity()).map_err(|e| e.to_string())?;
    }
    let inserted: HashSet<i64> = fresh
        .insert(client, source, Conflict::Fast)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let mut stored = inserted.len();
    if stored == facts.len() {
        return Ok(stored);
    }
    for (seq, b) in facts {
        let s = big("seq", *seq).map_err(|e| e.to_string())?;
        if !inserted.contains(&s) && apply_one(client, source, *seq, b)? {
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
        let v = run_cached(
            client,
            "SELECT last_seq FROM liminal.ingest_cursor WHERE source = $1 FOR UPDATE",
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
        run_cached(
            client,
            "INSERT INTO liminal.ingest_cursor (source, last_seq, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (source) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated_at = now()",
            &[source.into(), last_i.into()],
        )?;
        let daemon = daemon_last_seq.map(|d| i64::try_from(d.max(last)).unwrap_or(i64::MAX));
        run_cached(
            client,
            "INSERT INTO liminal.ingest_state (source, connected, daemon_last_seq, updated_at)
             VALUES ($1, true, $2, now())
             ON CONFLICT (source) DO UPDATE SET daemon_last_seq = greatest(EXCLUDED.daemon_last_seq, ingest_state.daemon_last_seq),
                 updated_at = now()",
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
