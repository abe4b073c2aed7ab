//! `liminal.causality_walk(test_result_id, max_depth, window)`.
//!
//! Queries: the failed result; the candidate signals of the host (every
//! signal in the window before the failure, plus, for deeper hops, the
//! signals carrying attributes further back — partial index
//! signal_versions_current_attrs); unresolved declared causes, if any; the
//! baseline runs and presence counts for rarity. The walk and the ranking
//! are `causality_core`'s.

use super::bad_argument;
use super::causality_core::{self as walk_core, Candidate, WalkParams};
use super::index_scan::{text_datum, verified_index, Col, IndexScan, Step};
use super::spi_stream::{stream, stream_cached, Row, PG_EPOCH_OFFSET_US};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;

pub const MAX_DEPTH: i32 = 20;
/// Longest window: a day. Depth × window bounds how far back the walk looks.
pub const MAX_WINDOW_US: i64 = 86_400_000_000;
/// Candidate signals fetched at most (memory/time bound).
pub const MAX_CANDIDATES: i64 = 200_000;
/// Rows returned at most.
pub const MAX_ROWS: usize = 1000;
/// Baseline: the most recent runs, before the failure, in which the same
/// test passed.
pub const BASELINE_RUNS: i64 = 20;

fn ts(us_unix: i64) -> TimestampWithTimeZone {
    match TimestampWithTimeZone::try_from(us_unix - PG_EPOCH_OFFSET_US) {
        Ok(t) => t,
        Err(_) => bad_argument("timestamp out of range", "Check the result's started_at."),
    }
}

fn candidate(row: &Row<'_>) -> Option<Candidate> {
    let id = row.str(0)?.to_owned();
    let kind = row.str(1)?.to_owned();
    let name = row.str(2)?.to_owned();
    let at = row.ts_unix_us(3)?;
    let mut attrs = Vec::new();
    let mut cause = None;
    if let Some(text) = row.str(4) {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text)
        {
            for (k, v) in map {
                if k == walk_core::CAUSE_KEY {
                    if let serde_json::Value::String(c) = &v {
                        cause = Some(c.clone());
                    }
                    continue;
                }
                attrs.push((k, v.to_string()));
            }
        }
    }
    Some(Candidate {
        id,
        kind,
        name,
        at,
        attrs,
        cause,
    })
}

struct Failure {
    run_id: String,
    test_name: String,
    host: Option<String>,
    /// When the failed run started: other runs on the host count when they
    /// overlapped [run_started_at, ended_at].
    run_started_at: i64,
    ended_at: i64,
}

fn load_failure(id: &str) -> Failure {
    type Found = (
        String,
        String,
        String,
        i64,
        i64,
        Option<String>,
        Option<i64>,
    );
    let mut found: Option<Found> = None;
    stream_cached(
        "SELECT r.run_id, r.test_name, r.status, r.started_at, r.duration_ms, ru.host, ru.started_at
         FROM liminal.test_result_versions r
         LEFT JOIN liminal.run_versions ru
                ON ru.run_id = r.run_id AND ru.tx_to = 'infinity' AND ru.valid_to = 'infinity'
         WHERE r.id = $1 AND r.tx_to = 'infinity' AND r.valid_to = 'infinity'",
        &[DatumWithOid::from(id)],
        7,
        &mut |row: &Row<'_>| {
            if let (Some(run), Some(name), Some(status), Some(at), Some(dur)) = (
                row.str(0),
                row.str(1),
                row.str(2),
                row.ts_unix_us(3),
                row.i64(4),
            ) {
                found = Some((
                    run.into(),
                    name.into(),
                    status.into(),
                    at,
                    dur,
                    row.str(5).map(Into::into),
                    row.ts_unix_us(6),
                ));
            }
        },
    );
    let Some((run_id, test_name, status, started, dur, host, run_started)) = found else {
        bad_argument(
            format!("no test result with id {id:?}"),
            "Pass the id of a row of liminal.test_results, e.g. SELECT id FROM liminal.test_results WHERE status = 'failed' ORDER BY started_at DESC LIMIT 1.",
        );
    };
    if status != "failed" && status != "error" {
        bad_argument(
            format!("test result {id} did not fail (status {status})"),
            "causality_walk explains failures: pass the id of a result with status failed or error.",
        );
    }
    Failure {
        run_id,
        test_name,
        host,
        // A result older than its run's record (clock skew, a correction):
        // the overlap starts at the earlier of the two.
        run_started_at: run_started.unwrap_or(started).min(started),
        ended_at: started.saturating_add(dur.saturating_mul(1000)),
    }
}

const CANDIDATES_SQL: &str = "
WITH r AS (
    SELECT run_id FROM liminal.run_versions
    WHERE tx_to = 'infinity' AND valid_to = 'infinity'
      AND (run_id = $1 OR (host = $2 AND started_at <= $4 AND coalesce(finished_at, 'infinity') >= $7))
)
SELECT * FROM (
    SELECT s.id, s.kind, s.name, s.at,
           CASE WHEN s.attrs = '{}'::jsonb THEN NULL ELSE s.attrs::text END
    FROM r JOIN liminal.signal_versions s ON s.run_id = r.run_id
    WHERE s.tx_to = 'infinity' AND s.valid_to = 'infinity' AND s.at >= $5 AND s.at <= $4
    UNION ALL
    SELECT s.id, s.kind, s.name, s.at, s.attrs::text
    FROM r JOIN liminal.signal_versions s ON s.run_id = r.run_id
    WHERE s.tx_to = 'infinity' AND s.valid_to = 'infinity' AND s.attrs <> '{}'::jsonb
      AND s.at >= $3 AND s.at < $5
) x
LIMIT $6";

const CAUSES_SQL: &str = "
SELECT s.id, s.kind, s.name, s.at, CASE WHEN s.attrs = '{}'::jsonb THEN NULL ELSE s.attrs::text END
FROM liminal.run_versions ru
JOIN liminal.signal_versions s ON s.run_id = ru.run_id
WHERE ru.tx_to = 'infinity' AND ru.valid_to = 'infinity'
  AND (ru.run_id = $1 OR (ru.host = $2 AND ru.started_at <= $4 AND coalesce(ru.finished_at, 'infinity') >= $6))
  AND s.tx_to = 'infinity' AND s.valid_to = 'infinity'
  AND s.at >= $3 AND s.at <= $4 AND (s.id = ANY($5) OR s.name = ANY($5))
LIMIT 10000";

const RARITY_SQL: &str = "
WITH b AS (
    SELECT run_id FROM liminal.test_result_versions
    WHERE tx_to = 'infinity' AND valid_to = 'infinity'
      AND test_name = $1 AND status = 'passed' AND started_at < $2 AND run_id <> $3
    ORDER BY started_at DESC LIMIT $4
)
SELECT u.k, u.n, (SELECT count(*) FROM b), (
    SELECT count(*) FROM b WHERE EXISTS (
        SELECT 1 FROM liminal.signal_versions s
        WHERE s.tx_to = 'infinity' AND s.valid_to = 'infinity'
          AND s.kind = u.k AND s.name = u.n AND s.run_id = b.run_id))
FROM unnest($5::text[], $6::text[]) AS u(k, n)";

/// The baseline: run ids of the most recent results (at most
/// BASELINE_RUNS, before `before`, not in `failed_run`) in which the test
/// passed, one per result (as RARITY_SQL's `b`).
fn baseline_runs(test_name: &str, before: i64, failed_run: &str) -> Vec<String> {
    let mut out = Vec::new();
    stream_cached(
        "SELECT run_id FROM liminal.test_result_versions
         WHERE tx_to = 'infinity' AND valid_to = 'infinity'
           AND test_name = $1 AND status = 'passed' AND started_at < $2 AND run_id <> $3
         ORDER BY started_at DESC LIMIT $4",
        &[
            DatumWithOid::from(test_name),
            DatumWithOid::from(ts(before)),
            DatumWithOid::from(failed_run),
            DatumWithOid::from(BASELINE_RUNS),
        ],
        1,
        &mut |row: &Row<'_>| {
            if let Some(r) = row.str(0) {
                out.push(r.to_owned());
            }
        },
    );
    out
}

/// For each (kind, name): how many of the `baseline` entries name a run
/// that has a visible signal of that kind and name, read from the index
/// signal_versions_current_kind_name (kind, name, run_id). None when the
/// leaves cannot be read directly (the caller then uses SQL).
///
/// Per pair, the baseline runs are probed in byte order: a probe descends
/// to (kind, name, run) and decides that run (its entries come first); the
/// entries after it are read on for a while, marking the other baseline
/// runs they show present, so a pair found in few runs costs one descent
/// instead of one per run. Only the first probe of each run decides its
/// absence; the reading on only ever adds presence, so the order (bytes vs
/// the index's collation) affects the cost, never the answer.
fn presence_counts(
    oid: pg_sys::Oid,
    kinds: &[String],
    names: &[String],
    baseline: &[String],
) -> Option<Vec<u64>> {
    /// Entries read on past the probed run without finding another
    /// baseline run before giving up (a descent costs about this much).
    /// A pair whose read-on found nothing once is dense (many entries per
    /// run): its remaining runs are only probed.
    const READ_ON: u32 = 48;
    let mut runs: Vec<&str> = baseline.iter().map(String::as_str).collect();
    runs.sort_unstable();
    runs.dedup();
    let run_args: Vec<pg_sys::Datum> = runs.iter().map(|r| text_datum(r)).collect();
    let mut ix = IndexScan::open(oid, &[Col::Text, Col::Text, Col::Text]);
    let mut counts = Vec::with_capacity(kinds.len());
    let mut found = vec![false; runs.len()];
    for (k, n) in kinds.iter().zip(names) {
        let (kd, nd) = (text_datum(k), text_datum(n));
        found.iter_mut().for_each(|x| *x = false);
        let mut left = runs.len();
        let mut read_on = READ_ON;
        for j in 0..runs.len() {
            if found[j] {
                continue;
            }
            let mut decided = false;
            let mut idle = 0u32;
            let mut gained = false;
            let walked = ix.walk_from(&[kd, nd, run_args[j]], |e, ntids, vis| {
                if e.text(0) != Some(k.as_bytes()) || e.text(1) != Some(n.as_bytes()) {
                    return Step::Stop; // past the pair's entries
                }
                let Some(run) = e.text(2) else {
                    return Step::Continue;
                };
                let at = if run == runs[j].as_bytes() {
                    Some(j)
                } else {
                    // Past the probed run's entries: absent unless found.
                    decided = true;
                    runs.binary_search_by(|r| r.as_bytes().cmp(run)).ok()
                };
                match at {
                    Some(i) if !found[i] && (0..ntids).any(|t| vis(t)) => {
                        found[i] = true;
                        left -= 1;
                        if i == j {
                            decided = true;
                        } else {
                            gained = true;
                            idle = 0;
                        }
                    }
                    _ => {
                        if decided {
                            idle += 1;
                        }
                    }
                }
                if left == 0 || (decided && idle >= read_on) {
                    Step::Stop
                } else {
                    Step::Continue
                }
            });
            if walked.is_err() {
                return None;
            }
            if left == 0 {
                break;
            }
            if !gained {
                read_on = 0;
            }
        }
        counts.push(
            baseline
                .iter()
                .filter(|b| runs.binary_search(&b.as_str()).is_ok_and(|i| found[i]))
                .count() as u64,
        );
    }
    super::index_scan::DIRECT_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(counts)
}

type WalkRow = (
    name!(depth, i32),
    name!(signal_id, String),
    name!(kind, String),
    name!(name, String),
    name!(at, TimestampWithTimeZone),
    name!(weight, f64),
    name!(path, Vec<String>),
);

/// The signals that may explain a failed test result, strongest cause
/// first (formula: docs/sql/analytics.md).
#[pg_extern(stable, parallel_safe)]
fn causality_walk(
    test_result_id: &str,
    max_depth: default!(i32, 5),
    window: default!(Interval, "'5 minutes'"),
) -> TableIterator<
    'static,
    (
        name!(depth, i32),
        name!(signal_id, String),
        name!(kind, String),
        name!(name, String),
        name!(at, TimestampWithTimeZone),
        name!(weight, f64),
        name!(path, Vec<String>),
    ),
> {
    if !(1..=MAX_DEPTH).contains(&max_depth) {
        bad_argument(
            format!("max_depth must be between 1 and {MAX_DEPTH}, got {max_depth}"),
            "Use the default 5, or 1 for the direct predecessors only.",
        );
    }
    let window_us = super::interval_us("window", &window);
    if window_us <= 0 || window_us > MAX_WINDOW_US {
        bad_argument(
            "window must be positive and at most 1 day",
            "Use the default '5 minutes', or e.g. '30 seconds' or '1 hour'.",
        );
    }
    let f = load_failure(test_result_id);
    let t = f.ended_at;
    let lo = t.saturating_sub(window_us.saturating_mul(max_depth as i64));
    let w_lo = t - window_us;
    let host = f.host.clone().unwrap_or_default();
    let mut cands: Vec<Candidate> = Vec::new();
    stream_cached(
        CANDIDATES_SQL,
        &[
            DatumWithOid::from(f.run_id.as_str()),
            DatumWithOid::from(host.as_str()),
            DatumWithOid::from(ts(lo)),
            DatumWithOid::from(ts(t)),
            DatumWithOid::from(ts(w_lo)),
            DatumWithOid::from(MAX_CANDIDATES),
            DatumWithOid::from(ts(f.run_started_at)),
        ],
        5,
        &mut |row: &Row<'_>| {
            if let Some(c) = candidate(row) {
                cands.push(c);
            }
        },
    );
    let params = WalkParams {
        failed_at: t,
        window_us,
        max_depth: max_depth as u32,
        max_nodes: MAX_CANDIDATES as usize,
    };
    let mut reached = walk_core::walk(&cands, &params);
    // Declared causes naming signals outside the fetched set (they carry no
    // attributes and lie before the depth-1 window): fetch and walk again.
    for _ in 1..max_depth {
        let missing = walk_core::unresolved_causes(&cands, &reached);
        if missing.is_empty() {
            break;
        }
        let before = cands.len();
        let mut seen: std::collections::HashSet<String> =
            cands.iter().map(|c| c.id.clone()).collect();
        stream(
            CAUSES_SQL,
            &[
                DatumWithOid::from(f.run_id.as_str()),
                DatumWithOid::from(host.as_str()),
                DatumWithOid::from(ts(lo)),
                DatumWithOid::from(ts(t)),
                DatumWithOid::from(missing),
                DatumWithOid::from(ts(f.run_started_at)),
            ],
            5,
            &mut |row: &Row<'_>| {
                if let Some(c) = candidate(row) {
                    if seen.insert(c.id.clone()) {
                        cands.push(c);
                    }
                }
            },
        );
        if cands.len() == before {
            break;
        }
        reached = walk_core::walk(&cands, &params);
    }

    // Rarity of each (kind, name) reached.
    let mut pairs: Vec<(String, String)> = reached
        .iter()
        .map(|r| (cands[r.idx].kind.clone(), cands[r.idx].name.clone()))
        .collect();
    pairs.sort();
    pairs.dedup();
    let (kinds, names): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    let mut rarity: HashMap<(String, String), f64> = HashMap::new();
    if !kinds.is_empty() {
        let baseline = baseline_runs(&f.test_name, t, &f.run_id);
        let direct = verified_index(
            "signal_versions_current_kind_name",
            "signal_versions",
            &[("kind", "text"), ("name", "text"), ("run_id", "text")],
            3,
        )
        .and_then(|oid| presence_counts(oid, &kinds, &names, &baseline));
        match direct {
            Some(counts) => {
                let total = baseline.len() as u64;
                for ((k, n), c) in kinds.into_iter().zip(names).zip(counts) {
                    rarity.insert((k, n), walk_core::rarity(c, total));
                }
            }
            None => stream(
                RARITY_SQL,
                &[
                    DatumWithOid::from(f.test_name.as_str()),
                    DatumWithOid::from(ts(t)),
                    DatumWithOid::from(f.run_id.as_str()),
                    DatumWithOid::from(BASELINE_RUNS),
                    DatumWithOid::from(kinds),
                    DatumWithOid::from(names),
                ],
                4,
                &mut |row: &Row<'_>| {
                    if let (Some(k), Some(n), Some(total), Some(c)) =
                        (row.str(0), row.str(1), row.i64(2), row.i64(3))
                    {
                        rarity.insert(
                            (k.to_owned(), n.to_owned()),
                            walk_core::rarity(c.max(0) as u64, total.max(0) as u64),
                        );
                    }
                },
            ),
        }
    }
    let ranked = walk_core::rank(
        &cands,
        &reached,
        window_us,
        |k, n| {
            rarity
                .get(&(k.to_owned(), n.to_owned()))
                .copied()
                .unwrap_or(std::f64::consts::LN_2)
        },
        MAX_ROWS,
    );
    let rows: Vec<WalkRow> = ranked
        .into_iter()
        .map(|r| {
            let c = &cands[r.idx];
            (
                r.depth as i32,
                c.id.clone(),
                c.kind.clone(),
                c.name.clone(),
                ts(c.at),
                r.weight,
                r.path.iter().map(|&i| cands[i].id.clone()).collect(),
            )
        })
        .collect();
    TableIterator::new(rows)
}
