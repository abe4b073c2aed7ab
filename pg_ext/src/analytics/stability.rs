//! `liminal.test_stability(window)` and `liminal.test_stability_score(test_name, window)`.
//!
//! All tests: one streamed scan of the window's results in (test_name,
//! started_at) order (index test_result_versions_current_name, index-only),
//! counting each run's results and failures on the way; infrastructure
//! runs are known at the end of the scan, then each test's sequence is
//! evaluated by `stability_core`. One test: one query that also returns, per
//! run, the failure count and a LIMITed result count that decide the
//! infrastructure rule exactly (see `InfraRule::total_cap`).

use super::index_scan::{verified_index, Col, IndexScan};
use super::spi_stream::{stream, Row};
use super::stability_core::{evaluate, InfraRule, Obs, Stability};
use super::{bad_argument, infra_rule};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use std::collections::HashMap;

const RESULT_PASSED: u32 = 0;
const RESULT_FAILED: u32 = 1;
const RESULT_SKIPPED: u32 = 2;

fn outcome(status: &[u8]) -> u32 {
    match status.first() {
        Some(b'p') => RESULT_PASSED,
        Some(b's') => RESULT_SKIPPED,
        // failed, error
        _ => RESULT_FAILED,
    }
}

/// `now() - window`, refusing a window that is not positive.
fn cutoff(window: &Interval) -> TimestampWithTimeZone {
    let row = Spi::get_two_with_args::<TimestampWithTimeZone, bool>(
        "SELECT now() - $1, $1 > interval '0'",
        &[DatumWithOid::from(*window)],
    );
    match row {
        Ok((Some(ts), Some(true))) => ts,
        Ok((_, Some(false))) => bad_argument(
            "window must be positive",
            "Pass a window such as '30 days'.",
        ),
        Ok(_) => bad_argument("window is out of range", "Pass a window such as '30 days'."),
        Err(e) => error!("liminal.test_stability: {e}"),
    }
}

#[derive(Clone)]
struct RunInfo {
    status_infra: bool,
    digest: Option<u32>,
    total: u64,
    failed: u64,
}

/// Interns runs (by id bytes) and their digests.
#[derive(Default, Clone)]
struct Runs {
    index: HashMap<Box<[u8]>, u32>,
    ids: Vec<Box<[u8]>>,
    info: Vec<RunInfo>,
    digests: HashMap<String, u32>,
}

impl Runs {
    fn digest_id(&mut self, d: Option<&str>) -> Option<u32> {
        let d = d?;
        let n = self.digests.len() as u32;
        Some(*self.digests.entry(d.to_owned()).or_insert(n))
    }

    fn add(&mut self, id: &[u8], status: Option<&str>, digest: Option<&str>) -> u32 {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let digest = self.digest_id(digest);
        let i = self.info.len() as u32;
        self.info.push(RunInfo {
            status_infra: status.is_some_and(InfraRule::status_is_infra),
            digest,
            total: 0,
            failed: 0,
        });
        self.index.insert(id.into(), i);
        self.ids.push(id.into());
        i
    }
}

fn load_runs(runs: &mut Runs, sql: &str, args: &[DatumWithOid<'_>]) {
    stream(sql, args, 3, &mut |row: &Row<'_>| {
        if let Some(id) = row.text(0) {
            runs.add(id, row.str(1), row.str(2));
        }
    });
}

/// The window's results in (test_name, started_at) order, folded into
/// per-test sequences of (run, outcome) and per-run counts.
struct Scan {
    runs: Runs,
    /// (test name, start, end) into `entries`: run index << 2 | outcome.
    tests: Vec<(String, usize, usize)>,
    entries: Vec<u32>,
    unknown: Vec<Vec<u8>>,
    current: Vec<u8>,
    successor: Vec<u32>,
    first_run: u32,
    prev_run: u32,
}

const NONE: u32 = u32::MAX;

impl Scan {
    fn new(runs: Runs) -> Self {
        Scan {
            runs,
            tests: Vec::new(),
            entries: Vec::new(),
            unknown: Vec::new(),
            current: Vec::new(),
            successor: Vec::new(),
            first_run: NONE,
            prev_run: NONE,
        }
    }

    #[inline]
    fn push(&mut self, name: &[u8], status: &[u8], run_id: &[u8]) {
        let new_test = self.tests.is_empty() || name != self.current.as_slice();
        if new_test {
            let n = self.entries.len();
            if let Some(last) = self.tests.last_mut() {
                last.2 = n;
            }
            self.current.clear();
            self.current.extend_from_slice(name);
            self.tests
                .push((String::from_utf8_lossy(name).into_owned(), n, 0));
        }
        // Tests mostly run in the same runs in the same order: predict the
        // run from the previous test's sequence (a memcmp) before hashing.
        let predicted = if new_test {
            self.first_run
        } else {
            self.successor
                .get(self.prev_run as usize)
                .copied()
                .unwrap_or(NONE)
        };
        let runs = &mut self.runs;
        let run = if predicted != NONE && &*runs.ids[predicted as usize] == run_id {
            predicted
        } else {
            match runs.index.get(run_id) {
                Some(&i) => i,
                None => {
                    self.unknown.push(run_id.to_vec());
                    runs.add(run_id, None, None)
                }
            }
        };
        if new_test {
            self.first_run = run;
        } else {
            let prev = self.prev_run as usize;
            if self.successor.len() <= prev {
                self.successor.resize(runs.ids.len().max(prev + 1), NONE);
            }
            self.successor[prev] = run;
        }
        self.prev_run = run;
        let o = outcome(status);
        let info = &mut runs.info[run as usize];
        info.total += 1;
        info.failed += (o == RESULT_FAILED) as u64;
        self.entries.push(run << 2 | o);
    }

    fn finish(&mut self) {
        let n = self.entries.len();
        if let Some(last) = self.tests.last_mut() {
            last.2 = n;
        }
    }
}

/// The window's results read straight from the index
/// test_result_versions_current_name (see `index_scan`): false when the
/// index is not as the schema defines it (the caller then uses SQL).
fn scan_index(scan: &mut Scan, cutoff: TimestampWithTimeZone) -> bool {
    let Some(oid) = verified_index(
        "test_result_versions_current_name",
        "test_result_versions",
        &[
            ("test_name", "text"),
            ("started_at", "timestamp with time zone"),
            ("status", "text"),
            ("run_id", "text"),
        ],
        2,
    ) else {
        return false;
    };
    let cutoff_pg = cutoff.into_inner();
    let mut ix = IndexScan::open(oid, &[Col::Text, Col::Int8, Col::Text, Col::Text]);
    // The leaves are read in Rust (IndexScan::scan_leaves); entries before
    // the cutoff are skipped there at the cost of one comparison (scan
    // keys, or descending per test to (name, cutoff), cost more: btree
    // evaluates keys on every entry).
    let done = ix.scan_leaves(
        2,
        |e| e.i64(1).is_some_and(|at| at >= cutoff_pg),
        |e| {
            if let (Some(name), Some(status), Some(run_id)) = (e.text(0), e.text(2), e.text(3)) {
                scan.push(name, status, run_id);
            }
        },
    );
    if let Err(why) = done {
        debug1!(
            "liminal.test_stability: reading the index directly failed ({}), using SQL",
            why.0
        );
        return false;
    }
    true
}

/// Stability of every test with a non-skipped, non-infrastructure result in
/// the window, in test name order.
pub(crate) fn all_tests(cutoff: TimestampWithTimeZone) -> Vec<(String, Stability)> {
    let rule = infra_rule();
    let mut runs = Runs::default();
    // Runs that can own results in the window; stragglers are looked up
    // after the scan.
    load_runs(
        &mut runs,
        "SELECT run_id, status, input_digest FROM liminal.run_versions
         WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND started_at >= $1 - interval '7 days'",
        &[DatumWithOid::from(cutoff)],
    );
    let mut scan = Scan::new(runs.clone());
    if !scan_index(&mut scan, cutoff) {
        // Nothing read by a direct scan that gave up counts.
        scan = Scan::new(runs);
        stream(
            "SELECT test_name, status, run_id FROM liminal.test_result_versions
             WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND started_at >= $1
             ORDER BY test_name, started_at",
            &[DatumWithOid::from(cutoff)],
            3,
            &mut |row: &Row<'_>| {
                if let (Some(name), Some(status), Some(run_id)) =
                    (row.text(0), row.text(1), row.text(2))
                {
                    scan.push(name, status, run_id);
                }
            },
        );
    }
    scan.finish();
    let Scan {
        mut runs,
        tests,
        entries,
        unknown,
        ..
    } = scan;
    if !unknown.is_empty() {
        // Runs that started long before their results: fetch their status
        // and digest (results without any run row stay "unknown").
        let ids: Vec<String> = unknown
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        stream(
            "SELECT run_id, status, input_digest FROM liminal.run_versions
             WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND run_id = ANY($1)",
            &[DatumWithOid::from(ids)],
            3,
            &mut |row: &Row<'_>| {
                let Some(&i) = row.text(0).and_then(|id| runs.index.get(id)) else {
                    return;
                };
                let digest = runs.digest_id(row.str(2));
                let info = &mut runs.info[i as usize];
                info.status_infra = row.str(1).is_some_and(InfraRule::status_is_infra);
                info.digest = digest;
            },
        );
    }
    let excluded: Vec<bool> = runs
        .info
        .iter()
        .map(|r| r.status_infra || rule.share_is_infra(r.failed, r.total))
        .collect();
    let mut out = Vec::with_capacity(tests.len());
    let mut obs: Vec<Obs> = Vec::new();
    for (name, start, end) in tests {
        obs.clear();
        for &e in &entries[start..end] {
            let (run, o) = ((e >> 2) as usize, e & 3);
            if o == RESULT_SKIPPED || excluded[run] {
                continue;
            }
            obs.push(Obs {
                passed: o == RESULT_PASSED,
                digest: runs.info[run].digest,
            });
        }
        if let Some(s) = evaluate(&obs) {
            out.push((name, s));
        }
    }
    out
}

/// Stability of one test (None without counted runs in the window).
pub(crate) fn one_test(test_name: &str, cutoff: TimestampWithTimeZone) -> Option<Stability> {
    let rule = infra_rule();
    let mut obs: Vec<Obs> = Vec::new();
    let mut digests: HashMap<String, u32> = HashMap::new();
    stream(
        "WITH t AS (
             SELECT r.run_id, r.status, r.started_at FROM liminal.test_result_versions r
             WHERE r.tx_to = 'infinity' AND r.valid_to = 'infinity'
               AND r.test_name = $1 AND r.started_at >= $2 AND r.status <> 'skipped'
         )
         SELECT t.status, ru.status, ru.input_digest, f.failed, f.cap,
                CASE WHEN coalesce(f.failed, 0) = 0 THEN 0 ELSE (
                    SELECT count(*) FROM (
                        SELECT 1 FROM liminal.test_result_versions x
                        WHERE x.tx_to = 'infinity' AND x.valid_to = 'infinity' AND x.run_id = t.run_id
                        LIMIT f.cap) c) END
         FROM t
         LEFT JOIN liminal.run_versions ru
                ON ru.run_id = t.run_id AND ru.tx_to = 'infinity' AND ru.valid_to = 'infinity'
         LEFT JOIN LATERAL (
             SELECT n AS failed, greatest(floor(n::float8 / $3)::bigint + 1, $4::bigint, 1) AS cap
             FROM (SELECT count(*) AS n FROM liminal.test_result_versions y
                   WHERE y.tx_to = 'infinity' AND y.valid_to = 'infinity'
                     AND y.status IN ('failed', 'error') AND y.run_id = t.run_id) k
             -- Runs excluded by status need no counting.
             WHERE coalesce(ru.status, '') NOT IN ('error', 'timeout', 'interrupted')
         ) f ON true
         ORDER BY t.started_at",
        &[
            DatumWithOid::from(test_name),
            DatumWithOid::from(cutoff),
            DatumWithOid::from(rule.threshold),
            DatumWithOid::from(rule.min_tests as i64),
        ],
        6,
        &mut |row: &Row<'_>| {
            let Some(status) = row.text(0) else { return };
            if row.str(1).is_some_and(InfraRule::status_is_infra) {
                return;
            }
            let failed = row.i64(3).unwrap_or(0).max(0) as u64;
            let cap = row.i64(4).unwrap_or(1).max(1) as u64;
            let counted = row.i64(5).unwrap_or(0).max(0) as u64;
            // Fewer than `cap` results: `counted` is the run's exact total.
            if counted < cap && rule.share_is_infra(failed, counted) {
                return;
            }
            let digest = row.str(2).map(|d| {
                let n = digests.len() as u32;
                *digests.entry(d.to_owned()).or_insert(n)
            });
            obs.push(Obs {
                passed: outcome(status) == RESULT_PASSED,
                digest,
            });
        },
    );
    evaluate(&obs)
}

/// Stability score of one test over the window ending now: 1 perfectly
/// stable, 0 never stable; NULL when the test has no counted run in the
/// window. See docs/sql/analytics.md for the formula.
#[pg_extern(stable, parallel_safe)]
fn test_stability_score(test_name: &str, window: default!(Interval, "'30 days'")) -> Option<f64> {
    let cutoff = cutoff(&window);
    one_test(test_name, cutoff).map(|s| s.score)
}

/// Stability of every test with a counted run in the window, by name.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::type_complexity)]
fn test_stability(
    window: default!(Interval, "'30 days'"),
) -> TableIterator<
    'static,
    (
        name!(test_name, String),
        name!(score, f64),
        name!(classification, String),
        name!(runs, i64),
        name!(pass_probability, f64),
        name!(ci_low, f64),
        name!(ci_high, f64),
        name!(flip_rate, f64),
        name!(same_input_disagreements, i64),
    ),
> {
    let cutoff = cutoff(&window);
    let rows: Vec<_> = all_tests(cutoff)
        .into_iter()
        .map(|(name, s)| {
            (
                name,
                s.score,
                s.classification.as_str().to_owned(),
                s.runs as i64,
                s.pass_probability,
                s.ci_low,
                s.ci_high,
                s.flip_rate,
                s.same_input_disagreements as i64,
            )
        })
        .collect();
    TableIterator::new(rows)
}
