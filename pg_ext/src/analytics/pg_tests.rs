//! `#[pg_test]`s of the analytics against values computed by hand on a small
//! fixture inserted with SQL (see `FIXTURE`).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// 11 tests × runs 1..12 (host h1, one an hour, digests d0 d0 d0 d0 d1 ...),
    /// run 13 an infrastructure failure by share (10 of 11 failed), run 14 by
    /// status (error), runs 15 (h1, overlapping run 11), 16 (h2) and 17 (h1,
    /// ended 100 s before run 11 started) carry signals only. Outcomes (runs 1..12):
    ///   t.stable   P everywhere
    ///   t.flaky    F in runs 2 and 5 (digests d0, d1 disagree; d2 not)
    ///   t.broken   F everywhere
    ///   t.pair_a   F in runs 2, 5, 8, 11
    ///   t.pair_b   F in runs 2, 5, 8
    ///   t.f1..t.f6 P (t.f1 skipped in run 3)
    /// Run r starts at now() - (13 - r) h; test i of a run starts 1200 + i s
    /// later and lasts 0.5 s.
    const FIXTURE: &str = r#"
CREATE TEMP TABLE fx_tests(i int, name text);
INSERT INTO fx_tests VALUES (0,'t.stable'),(1,'t.flaky'),(2,'t.broken'),(3,'t.pair_a'),(4,'t.pair_b'),
  (5,'t.f1'),(6,'t.f2'),(7,'t.f3'),(8,'t.f4'),(9,'t.f5'),(10,'t.f6');
CREATE FUNCTION pg_temp.rid(r int) RETURNS text LANGUAGE sql IMMUTABLE RETURN 'RUN' || lpad(r::text, 23, '0');
CREATE FUNCTION pg_temp.tid(r int, i int) RETURNS text LANGUAGE sql IMMUTABLE RETURN 'TR' || lpad((r * 100 + i)::text, 24, '0');
CREATE FUNCTION pg_temp.rstart(r int) RETURNS timestamptz LANGUAGE sql STABLE
  RETURN date_trunc('second', now()) - (13 - r) * interval '1 hour';
INSERT INTO liminal.run_versions (run_id, plan_name, status, input_digest, host, started_at, finished_at, valid_from)
SELECT pg_temp.rid(r), 'fx', CASE WHEN r = 14 THEN 'error' ELSE 'failed' END,
       'd' || ((r - 1) / 4), 'h1', pg_temp.rstart(r), pg_temp.rstart(r) + interval '1300 s', pg_temp.rstart(r)
FROM generate_series(1, 12) r
UNION ALL SELECT pg_temp.rid(13), 'fx', 'failed', 'd9', 'h1', now() - interval '50 min', now() - interval '40 min', now() - interval '50 min'
UNION ALL SELECT pg_temp.rid(14), 'fx', 'error', 'd9', 'h1', now() - interval '35 min', now() - interval '30 min', now() - interval '35 min'
UNION ALL SELECT pg_temp.rid(15), 'fx', 'passed', 'd8', 'h1', pg_temp.rstart(11) + interval '100 s', pg_temp.rstart(11) + interval '1250 s', pg_temp.rstart(11)
UNION ALL SELECT pg_temp.rid(16), 'fx', 'passed', 'd8', 'h2', pg_temp.rstart(11), pg_temp.rstart(11) + interval '1300 s', pg_temp.rstart(11)
UNION ALL SELECT pg_temp.rid(17), 'fx', 'passed', 'd8', 'h1', pg_temp.rstart(11) - interval '500 s', pg_temp.rstart(11) - interval '100 s', pg_temp.rstart(11);
INSERT INTO liminal.test_result_versions (id, run_id, test_name, status, started_at, duration_ms, valid_from)
SELECT pg_temp.tid(r, t.i), pg_temp.rid(r), t.name, s.status, st, 500, st
FROM generate_series(1, 14) r CROSS JOIN fx_tests t
CROSS JOIN LATERAL (SELECT CASE WHEN r <= 12 THEN pg_temp.rstart(r) ELSE (SELECT started_at FROM liminal.run_versions WHERE run_id = pg_temp.rid(r)) END
                           + interval '1200 s' + t.i * interval '1 s' AS st) x
CROSS JOIN LATERAL (SELECT CASE
    WHEN r = 14 THEN 'failed'
    WHEN r = 13 THEN CASE WHEN t.name = 't.f6' THEN 'passed' ELSE 'failed' END
    WHEN t.name = 't.flaky' AND r IN (2, 5) THEN 'failed'
    WHEN t.name = 't.broken' THEN 'failed'
    WHEN t.name = 't.pair_a' AND r IN (2, 5, 8, 11) THEN 'failed'
    WHEN t.name = 't.pair_b' AND r IN (2, 5, 8) THEN 'failed'
    WHEN t.name = 't.f1' AND r = 3 THEN 'skipped'
    ELSE 'passed' END AS status) s;
-- Signals. The failure to explain: t.pair_a in run 11, ended at T = start + 1203.5 s.
CREATE TEMP TABLE fx_t AS SELECT pg_temp.rstart(11) + interval '1203.5 s' AS t;
INSERT INTO liminal.signal_versions (id, run_id, kind, name, at, attrs, valid_from)
SELECT 'SG' || lpad((r * 10)::text, 24, '0'), pg_temp.rid(r), 'log', 'stdout', pg_temp.rstart(r) + interval '1193.5 s', '{}'::jsonb, pg_temp.rstart(r)
FROM generate_series(1, 12) r
UNION ALL
SELECT 'SG' || lpad((r * 10 + 1)::text, 24, '0'), pg_temp.rid(r), 'log', 'stderr', pg_temp.rstart(r) + interval '1173.5 s', '{}'::jsonb, pg_temp.rstart(r)
FROM generate_series(1, 12) r
UNION ALL SELECT 'SGDISKFULL0000000000000000', pg_temp.rid(11), 'event', 'disk.full', t - interval '60 s', '{"device":"sda"}'::jsonb, t FROM fx_t
UNION ALL SELECT 'SGIORETRY00000000000000000', pg_temp.rid(11), 'event', 'io.retry', t - interval '330 s', '{"device":"sda","cause":"deploy.start"}'::jsonb, t FROM fx_t
UNION ALL SELECT 'SGDEPLOY000000000000000000', pg_temp.rid(11), 'event', 'deploy.start', t - interval '1000 s', '{}'::jsonb, t FROM fx_t
UNION ALL SELECT 'SGOTHERRUN0000000000000000', pg_temp.rid(15), 'log', 'stderr', t - interval '30 s', '{}'::jsonb, t FROM fx_t
UNION ALL SELECT 'SGOTHERHOST000000000000000', pg_temp.rid(16), 'event', 'elsewhere', t - interval '5 s', '{}'::jsonb, t FROM fx_t
UNION ALL SELECT 'SGAFTER0000000000000000000', pg_temp.rid(11), 'event', 'after', t + interval '5 s', '{}'::jsonb, t FROM fx_t
UNION ALL SELECT 'SGEARLIERRUN00000000000000', pg_temp.rid(17), 'event', 'earlier', pg_temp.rstart(11) - interval '200 s', '{}'::jsonb, t FROM fx_t;
SET LOCAL liminal.infra_min_tests = 5;
"#;

    fn fixture() {
        Spi::run(FIXTURE).expect("fixture");
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    type StabRow = (String, f64, String, i64, f64, f64, f64, f64, i64);

    fn stability_rows() -> Vec<StabRow> {
        Spi::connect(|c| {
            c.select("SELECT * FROM liminal.test_stability('1 day')", None, &[])
                .expect("select")
                .map(|r| {
                    (
                        r.get::<String>(1).unwrap().unwrap(),
                        r.get::<f64>(2).unwrap().unwrap(),
                        r.get::<String>(3).unwrap().unwrap(),
                        r.get::<i64>(4).unwrap().unwrap(),
                        r.get::<f64>(5).unwrap().unwrap(),
                        r.get::<f64>(6).unwrap().unwrap(),
                        r.get::<f64>(7).unwrap().unwrap(),
                        r.get::<f64>(8).unwrap().unwrap(),
                        r.get::<i64>(9).unwrap().unwrap(),
                    )
                })
                .collect()
        })
    }

    #[pg_test]
    fn analytics_stability_by_hand() {
        fixture();
        let rows = stability_rows();
        let get = |n: &str| rows.iter().find(|r| r.0 == n).cloned().unwrap();
        assert_eq!(rows.len(), 11);

        // Stable: 12 passes (runs 13, 14 are infrastructure failures).
        let s = get("t.stable");
        assert_eq!((s.2.as_str(), s.3), ("healthy", 12));
        assert!(close(s.4, 13.0 / 14.0));
        assert!(close(s.1, 13.0 / 14.0));
        assert!(close(s.5, 0.025f64.powf(1.0 / 13.0)));
        assert!(close(s.6, 0.975f64.powf(1.0 / 13.0)));
        assert!(close(s.7, 0.0));
        assert_eq!(s.8, 0);

        // Flaky: P F P P F P P P P P P P; transitions at i = 1, 2, 4, 5
        // weigh d^10, d^9, d^7, d^6 of sum d^0..d^10, d = 2^(-1/20).
        let f = get("t.flaky");
        let d = 0.5f64.powf(1.0 / 20.0);
        let den: f64 = (0..=10).map(|j| d.powi(j)).sum();
        let flip = (d.powi(10) + d.powi(9) + d.powi(7) + d.powi(6)) / den;
        assert_eq!((f.2.as_str(), f.3), ("flaky", 12));
        assert!(close(f.4, 11.0 / 14.0));
        assert!(close(f.7, flip), "{} vs {flip}", f.7);
        assert!(close(f.1, 11.0 / 14.0 * (1.0 - flip)));
        assert_eq!(f.8, 2, "digests d0 and d1 disagree");

        // Broken: 12 failures.
        let b = get("t.broken");
        assert_eq!((b.2.as_str(), b.3), ("broken", 12));
        assert!(close(b.4, 1.0 / 14.0));
        assert!(close(b.6, 1.0 - 0.025f64.powf(1.0 / 13.0)));

        // The skipped result is left out.
        assert_eq!(get("t.f1").3, 11);

        // The single-test function agrees with the table.
        for r in &rows {
            let one = Spi::get_one_with_args::<f64>(
                "SELECT liminal.test_stability_score($1, '1 day')",
                &[r.0.as_str().into()],
            )
            .unwrap()
            .unwrap();
            assert!(close(one, r.1), "{}: {one} vs {}", r.0, r.1);
        }
        let none = Spi::get_one::<f64>("SELECT liminal.test_stability_score('t.nope')").unwrap();
        assert_eq!(none, None);
        let null = Spi::get_one::<f64>("SELECT liminal.test_stability_score(NULL)").unwrap();
        assert_eq!(null, None);
    }

    #[pg_test]
    fn analytics_infra_threshold_is_configurable() {
        fixture();
        // With the share rule effectively off for this run size, run 13
        // counts: t.stable then has 13 runs, one failed.
        Spi::run("SET LOCAL liminal.infra_min_tests = 1000").unwrap();
        let rows = stability_rows();
        let s = rows.iter().find(|r| r.0 == "t.stable").unwrap();
        assert_eq!(s.3, 13);
        assert!(close(s.4, 13.0 / 15.0));
        // Run 14 (status error) stays out whatever the share.
        Spi::run("SET LOCAL liminal.infra_failure_threshold = 1.0").unwrap();
        let v = Spi::get_one::<String>("SHOW liminal.infra_failure_threshold").unwrap();
        assert_eq!(v.as_deref(), Some("1"));
    }

    #[pg_test]
    fn analytics_resonance_pairs_by_hand() {
        fixture();
        let rows: Vec<(String, String, i64, f64, Option<f64>)> = Spi::connect(|c| {
            c.select(
                "SELECT * FROM liminal.resonance_pairs(now() - interval '13 hours', now())",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<String>(1).unwrap().unwrap(),
                    r.get::<String>(2).unwrap().unwrap(),
                    r.get::<i64>(3).unwrap().unwrap(),
                    r.get::<f64>(4).unwrap().unwrap(),
                    r.get::<f64>(5).unwrap(),
                )
            })
            .collect()
        });
        // N = 12 counted runs. pair_a failed 4, pair_b 3, both 3:
        // lift = 3·12/(4·3) = 3; phi = (3·8 − 1·0)/sqrt(4·8·3·9) = 24/sqrt(864).
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(
            (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2),
            ("t.pair_a", "t.pair_b", 3)
        );
        assert!(close(rows[0].3, 3.0));
        assert!(close(rows[0].4.unwrap(), 24.0 / 864f64.sqrt()));
        // t.broken fails in every counted run: lift 1, phi undefined.
        assert_eq!(
            (rows[1].0.as_str(), rows[1].1.as_str(), rows[1].2),
            ("t.broken", "t.pair_a", 4)
        );
        assert!(close(rows[1].3, 1.0));
        assert_eq!(rows[1].4, None);
        assert_eq!(
            (rows[2].0.as_str(), rows[2].1.as_str(), rows[2].2),
            ("t.broken", "t.pair_b", 3)
        );
        // min_support 4 keeps only (broken, pair_a).
        let n = Spi::get_one::<i64>(
            "SELECT count(*) FROM liminal.resonance_pairs(now() - interval '13 hours', now(), 4)",
        )
        .unwrap();
        assert_eq!(n, Some(1));
    }

    #[pg_test]
    fn analytics_resonance_map_by_hand() {
        fixture();
        // from = run 1's start - 30 min: run r falls in bucket r - 1.
        let q = "SELECT * FROM liminal.resonance_map(date_trunc('second', now()) - interval '12 hours 30 minutes', now())";
        let (n, runs, fails) = Spi::get_three::<i64, i64, i64>(&format!(
            "SELECT count(*), sum(runs)::bigint, sum(failures)::bigint FROM ({q}) m"
        ))
        .unwrap();
        // Tests with a counted failure: flaky, broken, pair_a, pair_b; 12 buckets each.
        assert_eq!(n, Some(48));
        assert_eq!(runs, Some(48));
        assert_eq!(fails, Some(2 + 12 + 4 + 3));
        let r = Spi::get_three::<i64, i64, f64>(&format!(
            "SELECT runs, failures, fail_rate FROM ({q}) m
             WHERE test_name = 't.pair_a' AND bucket = date_trunc('second', now()) - interval '11 hours 30 minutes'"
        ))
        .unwrap();
        assert_eq!(r, (Some(1), Some(1), Some(1.0)));
        // Empty range: no rows.
        let e = Spi::get_one::<i64>("SELECT count(*) FROM liminal.resonance_map(now(), now())")
            .unwrap();
        assert_eq!(e, Some(0));
    }

    #[pg_test]
    fn analytics_causality_rare_signal_first() {
        fixture();
        let rows: Vec<(i32, String, f64, Vec<String>)> = Spi::connect(|c| {
            c.select(
                "SELECT depth, signal_id, weight, path FROM liminal.causality_walk('TR000000000000000000001103')",
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<i32>(1).unwrap().unwrap(),
                    r.get::<String>(2).unwrap().unwrap(),
                    r.get::<f64>(3).unwrap().unwrap(),
                    r.get::<Vec<String>>(4).unwrap().unwrap(),
                )
            })
            .collect()
        });
        let ids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        // Baseline: the 7 earlier runs where t.pair_a passed (1 3 4 6 7 9 10).
        // disk.full: recency e^(-3·60/300) × ln(9/1)            = 1.2058
        // deploy.start (declared cause of io.retry, depth 3): 1 × ln 9 × 0.25 = 0.5493
        // stderr of the overlapping run 15: e^(-0.3) × ln(9/8)   = 0.0873
        // stdout:  e^(-3·10/300) × ln(9/8)                       = 0.1066
        // stderr of run 11 at T-30 s: e^(-0.3) × ln(9/8)         = 0.0873
        // io.retry (depth 2, 270 s before disk.full): e^(-2.7) × ln 9 × 0.5 = 0.0741
        assert_eq!(ids[0], "SGDISKFULL0000000000000000", "{rows:?}");
        assert!(close(rows[0].2, (-0.6f64).exp() * 9f64.ln()));
        assert_eq!(rows[0].0, 1);
        assert_eq!(ids[1], "SGDEPLOY000000000000000000");
        assert_eq!(rows[1].0, 3);
        assert!(close(rows[1].2, 9f64.ln() * 0.25));
        assert_eq!(
            rows[1].3,
            vec![
                "SGDISKFULL0000000000000000",
                "SGIORETRY00000000000000000",
                "SGDEPLOY000000000000000000"
            ]
        );
        let retry = rows
            .iter()
            .find(|r| r.1 == "SGIORETRY00000000000000000")
            .unwrap();
        assert_eq!(retry.0, 2);
        assert!(close(retry.2, (-2.7f64).exp() * 9f64.ln() * 0.5));
        assert!(
            ids.contains(&"SGOTHERRUN0000000000000000"),
            "overlapping run on the same host"
        );
        assert!(!ids.contains(&"SGOTHERHOST000000000000000"), "other host");
        assert!(
            !ids.contains(&"SGAFTER0000000000000000000"),
            "after the failure"
        );
        assert!(rows.windows(2).all(|w| w[0].2 >= w[1].2), "strongest first");
        // Depth 1 only: no io.retry, no deploy.
        let n = Spi::get_one::<i64>(
            "SELECT count(*) FROM liminal.causality_walk('TR000000000000000000001103', 1) WHERE depth > 1",
        )
        .unwrap();
        assert_eq!(n, Some(0));
        // A run on the same host that had ended before the failed run began
        // is no candidate, even when the window reaches back to its signals.
        let wide: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT signal_id FROM liminal.causality_walk('TR000000000000000000001103', 1, '30 minutes')",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        assert!(
            wide.iter().any(|i| i == "SGOTHERRUN0000000000000000"),
            "{wide:?}"
        );
        assert!(
            wide.iter().any(|i| i == "SGDEPLOY000000000000000000"),
            "{wide:?}"
        );
        assert!(
            !wide.iter().any(|i| i == "SGEARLIERRUN00000000000000"),
            "{wide:?}"
        );
    }

    /// The direct index scans (index_scan.rs) give what the SQL they
    /// replace gives, with windows that cut through runs (so the stability
    /// scan skips entries) and with a corrected result, whose superseded
    /// version is still in the index but no longer current (so visibility
    /// comes from the heap: nothing here is all-visible).
    #[pg_test]
    fn analytics_direct_scans_match_sql() {
        use crate::analytics::index_scan::{DIRECT_READS, FORCE_SQL};
        use std::sync::atomic::Ordering;
        fixture();
        Spi::run(
            "SELECT liminal.correct_test_result('TR000000000000000000001001', 'failed', 'misfiled');
             SELECT liminal.correct_test_result('TR000000000000000000000901', 'failed', 'misfiled')",
        )
        .unwrap();
        // Enough results for hundreds of leaf pages of each index (the
        // stability scan walks them by right-links), some in runs without
        // a run row.
        Spi::run(
            "INSERT INTO liminal.test_result_versions (id, run_id, test_name, status, started_at, duration_ms, valid_from)
             SELECT 'BK' || lpad((r * 1000 + i)::text, 24, '0'), 'BULKRUN' || lpad(r::text, 19, '0'),
                    'bulk.' || lpad(i::text, 4, '0'),
                    CASE WHEN (r * 7 + i * 13) % 17 = 0 THEN 'failed' WHEN i % 29 = 0 THEN 'skipped' ELSE 'passed' END,
                    now() - interval '20 hours' + r * interval '6 minutes' + i * interval '10 ms', 10,
                    now() - interval '20 hours' + r * interval '6 minutes'
             FROM generate_series(1, 150) r, generate_series(1, 200) i",
        )
        .unwrap();
        let both = |sql: &str| -> (Vec<String>, Vec<String>, bool) {
            let rows = || -> Vec<String> {
                Spi::connect(|c| {
                    c.select(&format!("SELECT x::text FROM ({sql}) x"), None, &[])
                        .unwrap()
                        .map(|r| r.get::<String>(1).unwrap().unwrap())
                        .collect()
                })
            };
            FORCE_SQL.store(true, Ordering::Relaxed);
            let before = DIRECT_READS.load(Ordering::Relaxed);
            let by_sql = rows();
            assert_eq!(DIRECT_READS.load(Ordering::Relaxed), before);
            FORCE_SQL.store(false, Ordering::Relaxed);
            let direct = rows();
            let used = DIRECT_READS.load(Ordering::Relaxed) > before;
            (direct, by_sql, used)
        };
        for window in [
            "1 day",
            "10 hours",
            "6 hours",
            "150 minutes",
            "61 minutes",
            "1 minute",
        ] {
            let (direct, by_sql, used) =
                both(&format!("SELECT * FROM liminal.test_stability('{window}')"));
            assert!(used, "the direct path did not run");
            assert_eq!(direct, by_sql, "window {window}");
            if window == "1 day" {
                assert_eq!(direct.len(), 211);
                // The corrections count: t.flaky now failed in runs 2, 5, 9, 10.
                let flaky = direct.iter().find(|r| r.starts_with("(t.flaky,")).unwrap();
                assert!(flaky.contains(",12,0.642857"), "{flaky}");
            }
        }
        let failures: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT id FROM liminal.test_results WHERE status IN ('failed', 'error') AND id LIKE 'TR%' ORDER BY id",
                None,
                &[],
            )
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
        });
        assert!(failures.len() > 20);
        let mut direct_walks = 0;
        for id in failures {
            for args in ["", ", 1", ", 3, '20 minutes'"] {
                let (direct, by_sql, used) = both(&format!(
                    "SELECT * FROM liminal.causality_walk('{id}'{args})"
                ));
                assert_eq!(direct, by_sql, "{id}{args}");
                direct_walks += used as usize;
            }
        }
        // A walk that reaches no signal asks no rarity.
        assert!(direct_walks > 20, "{direct_walks}");
    }

    /// Message and hint of the error a statement raises (NULLs if none).
    fn error_of(sql: &str) -> (Option<String>, Option<String>) {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.err_of(q text, OUT msg text, OUT hint text) LANGUAGE plpgsql AS $$
             BEGIN EXECUTE q; EXCEPTION WHEN others THEN
               GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT; END $$",
        )
        .unwrap();
        Spi::get_two_with_args::<String, String>("SELECT * FROM pg_temp.err_of($1)", &[sql.into()])
            .unwrap()
    }

    #[pg_test]
    fn analytics_bad_arguments_raise_errors_with_hints() {
        fixture();
        let cases = [
            ("SELECT * FROM liminal.causality_walk('NOPE')", "no test result"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001100')", "did not fail"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 0)", "max_depth"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 21)", "max_depth"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 2147483647)", "max_depth"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 5, '0 s')", "window"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 5, '-1 min')", "window"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 5, '2 days')", "window"),
            ("SELECT * FROM liminal.causality_walk('TR000000000000000000001103', 5, '1 month')", "window"),
            ("SELECT * FROM liminal.resonance_map(now(), now() - interval '1 day')", "after"),
            ("SELECT * FROM liminal.resonance_map(now() - interval '30 days', now(), '1 second')", "buckets"),
            ("SELECT * FROM liminal.resonance_map(now() - interval '1 day', now(), '0 s')", "bucket"),
            ("SELECT * FROM liminal.resonance_map('-infinity', now())", "finite"),
            ("SELECT * FROM liminal.resonance_pairs(now() - interval '1 day', now(), 0)", "min_support"),
            ("SELECT * FROM liminal.resonance_pairs(now(), now() - interval '1 day')", "after"),
            ("SELECT * FROM liminal.test_stability('-1 day')", "window"),
            ("SELECT liminal.test_stability_score('t.stable', '0 s')", "window"),
        ];
        for (sql, expect) in cases {
            let (msg, hint) = error_of(sql);
            let msg = msg.unwrap_or_else(|| panic!("no error from {sql}"));
            assert!(msg.contains(expect), "{sql}: {msg}");
            assert!(hint.is_some_and(|h| !h.is_empty()), "{sql}: no hint");
        }
        // NULL arguments give NULL / no rows, never a crash.
        let n = Spi::get_one::<i64>("SELECT count(*) FROM liminal.causality_walk(NULL)").unwrap();
        assert_eq!(n, Some(0));
        let n =
            Spi::get_one::<i64>("SELECT count(*) FROM liminal.resonance_map(NULL, now())").unwrap();
        assert_eq!(n, Some(0));
    }
}
