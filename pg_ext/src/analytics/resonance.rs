//! `liminal.resonance_map(from_ts, to_ts, bucket)` and
//! `liminal.resonance_pairs(from_ts, to_ts, min_support)`.
//!
//! Both start from the runs that started in [from_ts, to_ts) and their
//! failed results only (index test_result_versions_current_failed_at:
//! failures are sparse), decide the infrastructure rule per run with a
//! LIMITed count of its results, then:
//! - pairs: co-failure counts from the per-run failed-test sets
//!   (`resonance_core::pairs`), never a self-join;
//! - map: the results of the tests that failed at least once, counted per
//!   (bucket of the run's start, test).

use super::resonance_core::{self as pair_core, HeatMap};
use super::spi_stream::{stream, Row, PG_EPOCH_OFFSET_US};
use super::stability_core::InfraRule;
use super::{bad_argument, infra_rule};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use std::collections::{BTreeSet, HashMap};

/// At most this many buckets in a map.
pub const MAX_BUCKETS: i64 = 100_000;
/// Results may start this long after their run (bounds the index range).
const RUN_SPAN: &str = "interval '1 day'";

struct Run {
    bucket: i64,
    infra: bool,
    failed: Vec<u32>,
    has_results: bool,
}

struct Range {
    from: TimestampWithTimeZone,
    to: TimestampWithTimeZone,
    from_us: i64,
}

fn range(from_ts: TimestampWithTimeZone, to_ts: TimestampWithTimeZone) -> Range {
    let (f, t): (i64, i64) = (from_ts.into(), to_ts.into());
    if f == i64::MIN || f == i64::MAX || t == i64::MIN || t == i64::MAX {
        bad_argument(
            "from_ts and to_ts must be finite",
            "Pass a bounded range, e.g. now() - interval '30 days', now().",
        );
    }
    if f > t {
        bad_argument(
            "from_ts is after to_ts",
            "Swap the arguments: the range is [from_ts, to_ts).",
        );
    }
    Range {
        from: from_ts,
        to: to_ts,
        from_us: f + PG_EPOCH_OFFSET_US,
    }
}

/// Runs in range, their failed tests (interned, name order), infra flags.
struct Facts {
    runs: Vec<Run>,
    run_index: HashMap<Box<[u8]>, usize>,
    tests: Vec<String>,
}

fn load(r: &Range, bucket_us: i64) -> Facts {
    let rule = infra_rule();
    let mut runs: Vec<Run> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut run_index: HashMap<Box<[u8]>, usize> = HashMap::new();
    stream(
        "SELECT run_id, status, started_at FROM liminal.run_versions
         WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND started_at >= $1 AND started_at < $2",
        &[DatumWithOid::from(r.from), DatumWithOid::from(r.to)],
        3,
        &mut |row: &Row<'_>| {
            let (Some(id), Some(at)) = (row.text(0), row.ts_unix_us(2)) else { return };
            let bucket = (at - r.from_us).div_euclid(bucket_us);
            run_index.insert(id.into(), runs.len());
            ids.push(String::from_utf8_lossy(id).into_owned());
            runs.push(Run {
                bucket,
                infra: row.str(1).is_some_and(InfraRule::status_is_infra),
                failed: Vec::new(),
                has_results: false,
            });
        },
    );
    // Failed results of those runs (by time: results start after their run).
    let mut names: HashMap<Box<[u8]>, u32> = HashMap::new();
    stream(
        &format!(
            "SELECT run_id, test_name FROM liminal.test_result_versions
             WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND status IN ('failed', 'error')
               AND started_at >= $1 AND started_at < $2 + {RUN_SPAN}"
        ),
        &[DatumWithOid::from(r.from), DatumWithOid::from(r.to)],
        2,
        &mut |row: &Row<'_>| {
            let (Some(id), Some(name)) = (row.text(0), row.text(1)) else {
                return;
            };
            let Some(&i) = run_index.get(id) else { return };
            let n = names.len() as u32;
            let t = *names.entry(name.into()).or_insert(n);
            runs[i].failed.push(t);
        },
    );
    // Renumber tests in name order so that index order is name order.
    let mut sorted: Vec<(Box<[u8]>, u32)> = names.into_iter().collect();
    sorted.sort();
    let mut remap = vec![0u32; sorted.len()];
    for (new, (_, old)) in sorted.iter().enumerate() {
        remap[*old as usize] = new as u32;
    }
    let tests: Vec<String> = sorted
        .into_iter()
        .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
        .collect();
    for run in &mut runs {
        for t in &mut run.failed {
            *t = remap[*t as usize];
        }
        run.failed.sort_unstable();
        run.failed.dedup();
    }
    // Count each run's results up to what decides the infrastructure rule
    // (1 for a run without failures: does it have results at all).
    if !runs.is_empty() {
        let caps: Vec<i64> = runs
            .iter()
            .map(|r| {
                // Already excluded by status, or no failures: only "has results?".
                if r.failed.is_empty() || r.infra {
                    1
                } else {
                    rule.total_cap(r.failed.len() as u64) as i64
                }
            })
            .collect();
        stream(
            "SELECT u.i, (SELECT count(*) FROM (
                 SELECT 1 FROM liminal.test_result_versions x
                 WHERE x.tx_to = 'infinity' AND x.valid_to = 'infinity' AND x.run_id = u.id
                 LIMIT u.cap) c)
             FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS u(id, cap, i)",
            &[DatumWithOid::from(ids), DatumWithOid::from(caps.clone())],
            2,
            &mut |row: &Row<'_>| {
                let (Some(i), Some(counted)) = (row.i64(0), row.i64(1)) else {
                    return;
                };
                let Some(run) = runs.get_mut((i - 1) as usize) else {
                    return;
                };
                let counted = counted.max(0) as u64;
                let cap = caps[(i - 1) as usize] as u64;
                run.has_results = counted > 0;
                if !run.failed.is_empty()
                    && counted < cap
                    && rule.share_is_infra(run.failed.len() as u64, counted)
                {
                    run.infra = true;
                }
            },
        );
    }
    Facts {
        runs,
        run_index,
        tests,
    }
}

fn check_bucket(r: &Range, bucket: &Interval) -> i64 {
    let bucket_us = super::interval_us("bucket", bucket);
    if bucket_us <= 0 {
        bad_argument("bucket must be positive", "Use e.g. '1 hour' or '1 day'.");
    }
    let span = i64::from(r.to) as i128 - (r.from_us - PG_EPOCH_OFFSET_US) as i128;
    let n = (span + bucket_us as i128 - 1) / bucket_us as i128;
    if n > MAX_BUCKETS as i128 {
        bad_argument(
            format!("{n} buckets is too many (at most {MAX_BUCKETS})"),
            "Use a larger bucket or a shorter range.",
        );
    }
    bucket_us
}

type MapRow = (
    name!(bucket, TimestampWithTimeZone),
    name!(test_name, String),
    name!(runs, i64),
    name!(failures, i64),
    name!(fail_rate, f64),
);

/// Per time bucket (of the run's start, buckets from from_ts) and test:
/// counted runs, failures, fail rate — for the tests that failed at least
/// once in counted runs of the range; infrastructure-failure runs excluded.
#[pg_extern(stable, parallel_safe)]
fn resonance_map(
    from_ts: TimestampWithTimeZone,
    to_ts: TimestampWithTimeZone,
    bucket: default!(Interval, "'1 hour'"),
) -> TableIterator<
    'static,
    (
        name!(bucket, TimestampWithTimeZone),
        name!(test_name, String),
        name!(runs, i64),
        name!(failures, i64),
        name!(fail_rate, f64),
    ),
> {
    let r = range(from_ts, to_ts);
    let bucket_us = check_bucket(&r, &bucket);
    let facts = load(&r, bucket_us);
    let failing: BTreeSet<u32> = facts
        .runs
        .iter()
        .filter(|run| !run.infra)
        .flat_map(|run| run.failed.iter().copied())
        .collect();
    if failing.is_empty() {
        return TableIterator::new(Vec::new());
    }
    let names: Vec<String> = failing
        .iter()
        .map(|&t| facts.tests[t as usize].clone())
        .collect();
    let name_index: HashMap<&[u8], u32> = failing
        .iter()
        .map(|&t| (facts.tests[t as usize].as_bytes(), t))
        .collect();
    let mut heat = HeatMap::default();
    stream(
        &format!(
            "SELECT test_name, run_id, status FROM liminal.test_result_versions
             WHERE tx_to = 'infinity' AND valid_to = 'infinity'
               AND test_name = ANY($1) AND started_at >= $2 AND started_at < $3 + {RUN_SPAN}"
        ),
        &[
            DatumWithOid::from(names),
            DatumWithOid::from(r.from),
            DatumWithOid::from(r.to),
        ],
        3,
        &mut |row: &Row<'_>| {
            let (Some(name), Some(run_id), Some(status)) = (row.text(0), row.text(1), row.text(2))
            else {
                return;
            };
            let (Some(&t), Some(&ri)) = (name_index.get(name), facts.run_index.get(run_id)) else {
                return;
            };
            let run = &facts.runs[ri];
            if run.infra || status.first() == Some(&b's') {
                return;
            }
            heat.add(run.bucket, t, status.first() != Some(&b'p'));
        },
    );
    let rows: Vec<MapRow> = heat
        .into_sorted()
        .into_iter()
        .map(|(b, t, runs, fails)| {
            let start = r.from_us - PG_EPOCH_OFFSET_US + b * bucket_us;
            (
                TimestampWithTimeZone::try_from(start).unwrap_or(r.from),
                facts.tests[t as usize].clone(),
                runs as i64,
                fails as i64,
                fails as f64 / runs as f64,
            )
        })
        .collect();
    TableIterator::new(rows)
}

type PairRow = (
    name!(test_a, String),
    name!(test_b, String),
    name!(both_failed, i64),
    name!(lift, f64),
    name!(phi, Option<f64>),
);

/// Pairs of tests that failed in the same counted runs at least
/// `min_support` times, strongest first (lift, then phi).
#[pg_extern(stable, parallel_safe)]
fn resonance_pairs(
    from_ts: TimestampWithTimeZone,
    to_ts: TimestampWithTimeZone,
    min_support: default!(i32, 3),
) -> TableIterator<
    'static,
    (
        name!(test_a, String),
        name!(test_b, String),
        name!(both_failed, i64),
        name!(lift, f64),
        name!(phi, Option<f64>),
    ),
> {
    if min_support < 1 {
        bad_argument(
            format!("min_support must be at least 1, got {min_support}"),
            "Use the default 3: pairs seen failing together at least 3 times.",
        );
    }
    let r = range(from_ts, to_ts);
    // Buckets are irrelevant here; one bucket per microsecond would do.
    let facts = load(&r, 1);
    let counted: Vec<&Run> = facts
        .runs
        .iter()
        .filter(|x| !x.infra && x.has_results)
        .collect();
    let n = counted.len() as u64;
    let all: Vec<Vec<u32>> = counted
        .iter()
        .filter(|x| !x.failed.is_empty())
        .map(|x| x.failed.clone())
        .collect();
    let rows: Vec<PairRow> = pair_core::pairs(&all, facts.tests.len(), n, min_support as u64)
        .into_iter()
        .map(|p| {
            (
                facts.tests[p.a as usize].clone(),
                facts.tests[p.b as usize].clone(),
                p.both as i64,
                p.lift,
                p.phi,
            )
        })
        .collect();
    TableIterator::new(rows)
}
