//! Schema and ingest-store tests, run inside PostgreSQL by
//! `cargo pgrx test pg15`. Facts go through the same code the worker uses
//! (`ingest::store::write_batch`), minus the bus.

#[pgrx::pg_schema]
mod tests {
    use crate::ingest::store::{write_batch, WireFact};
    use liminal_facts::Timestamp;
    use liminal_facts::*;
    use pgrx::prelude::*;

    const SRC: &str = "01TESTSP00LTESTSP00LTESTSP";

    fn t(sec: i64) -> Timestamp {
        // 2026-01-01T00:00:00Z + sec
        Timestamp::from_unix_micros(1_767_225_600_000_000 + sec * 1_000_000)
    }

    fn wire(seq: u64, b: &FactBody) -> WireFact {
        let (kind, json) = b.to_wire();
        WireFact {
            seq,
            kind: kind.into(),
            json,
        }
    }

    fn run(run_id: Ulid, status: RunStatus, valid: i64) -> FactBody {
        FactBody::Run(RunFact {
            fact_id: new_id(),
            run_id,
            plan_name: "unit".into(),
            status,
            exit_code: status.is_final().then_some(0),
            input_digest: "blake3:ab".into(),
            image_digest: None,
            host: "h1".into(),
            started_at: t(0),
            finished_at: status.is_final().then(|| t(valid)),
            reason: None,
            valid_at: t(valid),
        })
    }

    fn test_result(id: Ulid, run_id: Ulid, status: TestStatus, valid: i64) -> FactBody {
        FactBody::TestResult(TestResultFact {
            fact_id: new_id(),
            id,
            run_id,
            test_name: "suite::case".into(),
            status,
            started_at: t(1),
            duration_ms: 5,
            message: None,
            valid_at: t(valid),
        })
    }

    fn signal(id: Ulid, run_id: Ulid, at: i64, value: &str) -> FactBody {
        FactBody::Signal(SignalFact {
            fact_id: new_id(),
            id,
            run_id,
            test_result_id: None,
            kind: SignalKind::Log,
            name: "stdout".into(),
            at: t(at),
            value: serde_json::Value::String(value.into()),
            attrs: [("line".to_string(), serde_json::json!(value))].into(),
        })
    }

    fn count(q: &str) -> i64 {
        Spi::get_one::<i64>(q).expect("query").unwrap_or(0)
    }

    /// The first column of the first row; `None` for NULL or for no row at all.
    fn text(q: &str) -> Option<String> {
        match Spi::get_one::<String>(q) {
            Ok(v) => v,
            Err(pgrx::spi::SpiError::InvalidPosition) => None,
            Err(e) => panic!("query {q}: {e}"),
        }
    }

    #[pg_test]
    fn views_have_design_columns() {
        let cols = |v: &str| {
            text(&format!(
                "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns \
                 WHERE table_schema = 'liminal' AND table_name = '{v}'"
            ))
            .unwrap_or_default()
        };
        assert!(cols("runs")
            .starts_with("id,plan_name,status,input_digest,host,started_at,finished_at"));
        assert!(
            cols("test_results").starts_with("id,run_id,test_name,status,started_at,duration_ms")
        );
        assert_eq!(
            cols("signals"),
            "id,run_id,test_result_id,kind,name,at,value,attrs"
        );
        assert_eq!(cols("artifacts"), "id,run_id,path,blake3,size");
        assert_eq!(
            cols("ingest_status"),
            "source,last_seq,lag,last_error,connected,updated_at"
        );
    }

    #[pg_test]
    fn every_table_view_and_function_is_commented() {
        let missing = text(
            "SELECT string_agg(c.relname, ',') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'liminal' AND c.relkind IN ('r', 'v') AND obj_description(c.oid, 'pg_class') IS NULL",
        );
        assert_eq!(missing, None, "tables/views without COMMENT");
        let missing = text(
            "SELECT string_agg(p.proname, ',') FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'liminal' AND p.prolang <> (SELECT oid FROM pg_language WHERE lanname = 'c') \
             AND obj_description(p.oid, 'pg_proc') IS NULL",
        );
        assert_eq!(missing, None, "SQL functions without COMMENT");
    }

    #[pg_test]
    fn progression_closes_valid_time_and_restates() {
        let r = new_id();
        let out = write_batch(SRC, &[wire(1, &run(r, RunStatus::Running, 0))], None).unwrap();
        assert_eq!((out.stored, out.last_seq), (1, 1));
        let out = write_batch(SRC, &[wire(2, &run(r, RunStatus::Passed, 60))], None).unwrap();
        assert_eq!((out.stored, out.last_seq), (1, 2));
        let q = |w: &str| {
            count(&format!(
                "SELECT count(*) FROM liminal.run_versions WHERE run_id = '{r}' AND {w}"
            ))
        };
        assert_eq!(
            q("true"),
            3,
            "old belief, its re-statement, the new version"
        );
        assert_eq!(
            q("tx_to = 'infinity' AND valid_to = 'infinity' AND status = 'passed'"),
            1
        );
        assert_eq!(q("tx_to = 'infinity' AND valid_to < 'infinity' AND status = 'running' AND restated_from IS NOT NULL AND fact_id IS NULL"), 1);
        assert_eq!(
            q("tx_to < 'infinity' AND status = 'running' AND valid_to = 'infinity'"),
            1
        );
        assert_eq!(
            text(&format!("SELECT status FROM liminal.runs WHERE id = '{r}'")).as_deref(),
            Some("passed")
        );
        // AS-OF on valid time.
        let as_of = |sec: i64| {
            text(&format!(
                "SELECT status FROM liminal.runs_as_of('2026-01-01T00:00:00Z'::timestamptz + interval '{sec} seconds') WHERE id = '{r}'"
            ))
        };
        assert_eq!(as_of(-1), None, "not started yet");
        assert_eq!(as_of(30).as_deref(), Some("running"));
        assert_eq!(as_of(60).as_deref(), Some("passed"));
        assert_eq!(as_of(3600).as_deref(), Some("passed"));
    }

    /// The ingest makes room for a new version in Rust, on kept plans; the
    /// corrections use the SQL function `liminal._make_room`. The same facts
    /// through both must leave the same versions.
    #[pg_test]
    fn ingest_and_make_room_agree() {
        // (status, valid second): a start, a progression, an out-of-order
        // backfill before everything, a correction at the same valid time
        // as the progression, a progression after all of it.
        let steps = [
            (RunStatus::Running, 10),
            (RunStatus::Failed, 70),
            (RunStatus::Running, 0),
            (RunStatus::Passed, 70),
            (RunStatus::Cancelled, 90),
        ];
        let by_ingest = new_id();
        for (i, (status, valid)) in steps.iter().enumerate() {
            // One fact per batch (each goes through the slow path but the
            // first), then all of them again in one batch for another run.
            write_batch(
                SRC,
                &[wire(i as u64 + 1, &run(by_ingest, *status, *valid))],
                None,
            )
            .unwrap();
        }
        let by_batch = new_id();
        let batch: Vec<WireFact> = steps
            .iter()
            .enumerate()
            .map(|(i, (s, v))| wire(i as u64 + 6, &run(by_batch, *s, *v)))
            .collect();
        assert_eq!(write_batch(SRC, &batch, None).unwrap().stored, steps.len());
        let by_sql = new_id();
        for (status, valid) in steps {
            Spi::run(&format!(
                "WITH room AS (SELECT liminal._make_room('liminal.run_versions', 'run_id', '{by_sql}',
                     '2026-01-01T00:00:00Z'::timestamptz + interval '{valid} seconds') AS vt)
                 INSERT INTO liminal.run_versions (run_id, plan_name, status, input_digest, host,
                     started_at, valid_from, valid_to, fact_id)
                 SELECT '{by_sql}', 'unit', '{}', 'blake3:ab', 'h1', '2026-01-01T00:00:00Z',
                     '2026-01-01T00:00:00Z'::timestamptz + interval '{valid} seconds', vt, liminal.new_ulid()
                 FROM room",
                status.as_str()
            ))
            .unwrap();
        }
        let shape = |r: Ulid| {
            text(&format!(
                "SELECT string_agg(format('%s %s..%s tx_current=%s restated=%s', status,
                     extract(epoch FROM valid_from - '2026-01-01T00:00:00Z')::int,
                     CASE WHEN valid_to = 'infinity' THEN 'inf'
                          ELSE extract(epoch FROM valid_to - '2026-01-01T00:00:00Z')::int::text END,
                     tx_to = 'infinity', restated_from IS NOT NULL), '; '
                     ORDER BY valid_from, valid_to, status, tx_to, restated_from IS NOT NULL)
                 FROM liminal.run_versions WHERE run_id = '{r}'"
            ))
            .unwrap_or_default()
        };
        let expected = shape(by_sql);
        assert!(
            expected.contains("cancelled 90..inf tx_current=t"),
            "{expected}"
        );
        assert_eq!(shape(by_ingest), expected);
        assert_eq!(shape(by_batch), expected);
    }

    #[pg_test]
    fn out_of_order_fact_is_backfilled() {
        let r = new_id();
        write_batch(SRC, &[wire(1, &run(r, RunStatus::Passed, 60))], None).unwrap();
        write_batch(SRC, &[wire(2, &run(r, RunStatus::Running, 0))], None).unwrap();
        assert_eq!(
            text(&format!("SELECT status FROM liminal.runs WHERE id = '{r}'")).as_deref(),
            Some("passed")
        );
        assert_eq!(
            text(&format!("SELECT valid_to::text FROM liminal.run_versions WHERE run_id = '{r}' AND status = 'running'")).as_deref(),
            Some("2026-01-01 00:01:00+00"),
            "the late 'running' fact holds until the known 'passed'"
        );
    }

    #[pg_test]
    fn correction_closes_only_transaction_time() {
        let r = new_id();
        let id = new_id();
        write_batch(
            SRC,
            &[wire(1, &test_result(id, r, TestStatus::Failed, 10))],
            None,
        )
        .unwrap();
        // Pretend the database learned it an hour ago (one transaction here).
        Spi::run("UPDATE liminal.test_result_versions SET tx_from = now() - interval '1 hour'")
            .unwrap();
        let v = Spi::get_one::<i64>(&format!(
            "SELECT liminal.correct_test_result('{id}', 'passed', 'infrastructure: OOM of the runner')"
        ))
        .unwrap();
        assert!(v.is_some());
        assert_eq!(
            count(&format!("SELECT count(DISTINCT valid_from) FROM liminal.test_result_versions WHERE id = '{id}'")),
            1,
            "same valid time"
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.test_result_versions WHERE id = '{id}'"
            )),
            2
        );
        assert_eq!(
            text(&format!("SELECT status || '/' || correction_reason FROM liminal.test_results WHERE id = '{id}'")).as_deref(),
            Some("passed/infrastructure: OOM of the runner")
        );
        let known = |ago: &str| {
            text(&format!(
                "SELECT status FROM liminal.test_results_as_of('2026-01-01T00:00:30Z', now() - interval '{ago}') WHERE id = '{id}'"
            ))
        };
        assert_eq!(
            known("30 minutes").as_deref(),
            Some("failed"),
            "as first believed"
        );
        assert_eq!(known("0 seconds").as_deref(), Some("passed"));
        assert_eq!(known("2 hours"), None, "not yet known");
    }

    #[pg_test(error = "invalid test status 'greenish'")]
    fn correction_rejects_unknown_status() {
        let id = new_id();
        write_batch(
            SRC,
            &[wire(1, &test_result(id, new_id(), TestStatus::Failed, 10))],
            None,
        )
        .unwrap();
        Spi::run(&format!(
            "SELECT liminal.correct_test_result('{id}', 'greenish', 'x')"
        ))
        .unwrap();
    }

    #[pg_test(error = "no test result '01AAAAAAAAAAAAAAAAAAAAAAAA'")]
    fn correction_of_unknown_result_fails() {
        Spi::run("SELECT liminal.correct_test_result('01AAAAAAAAAAAAAAAAAAAAAAAA', 'passed', 'x')")
            .unwrap();
    }

    #[pg_test(error = "duplicate key value violates unique constraint \"run_versions_current\"")]
    fn at_most_one_current_row_per_entity() {
        let r = new_id();
        write_batch(SRC, &[wire(1, &run(r, RunStatus::Running, 0))], None).unwrap();
        Spi::run(&format!(
            "INSERT INTO liminal.run_versions (run_id, plan_name, status, input_digest, host, started_at, valid_from)
             VALUES ('{r}', 'x', 'passed', 'd', 'h', now(), now())"
        ))
        .unwrap();
    }

    #[pg_test]
    fn cursor_skips_duplicates_and_stops_at_gaps() {
        let r = new_id();
        let facts: Vec<WireFact> = (1..=5)
            .map(|i| wire(i, &signal(new_id(), r, i as i64, "x")))
            .collect();
        let out = write_batch(SRC, &facts[..3], None).unwrap();
        assert_eq!((out.stored, out.last_seq), (3, 3));
        // Replayed overlap: 1..3 skipped, 4..5 stored.
        let out = write_batch(SRC, &facts, None).unwrap();
        assert_eq!((out.skipped, out.stored, out.last_seq), (3, 2, 5));
        // A gap (7 without 6): nothing written past it.
        let later = wire(7, &signal(new_id(), r, 7, "y"));
        let out = write_batch(SRC, &[later], None).unwrap();
        assert_eq!((out.stored, out.last_seq), (0, 5));
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.signals WHERE run_id = '{r}'"
            )),
            5
        );
        assert_eq!(
            count(&format!(
                "SELECT last_seq FROM liminal.ingest_cursor WHERE source = '{SRC}'"
            )),
            5
        );
    }

    #[pg_test]
    fn repeated_entity_in_one_batch_is_versioned() {
        let r = new_id();
        let batch = [
            wire(1, &run(r, RunStatus::Running, 0)),
            wire(2, &run(r, RunStatus::Failed, 9)),
        ];
        let out = write_batch(SRC, &batch, None).unwrap();
        assert_eq!(out.stored, 2);
        assert_eq!(
            text(&format!("SELECT status FROM liminal.runs WHERE id = '{r}'")).as_deref(),
            Some("failed")
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.run_versions WHERE run_id = '{r}'"
            )),
            3
        );
    }

    #[pg_test]
    fn malformed_facts_go_to_ingest_errors_and_the_batch_goes_on() {
        let r = new_id();
        let mut big = match test_result(new_id(), r, TestStatus::Passed, 3) {
            FactBody::TestResult(f) => f,
            _ => unreachable!(),
        };
        big.duration_ms = u64::MAX; // decodes, but no bigint can hold it
        let batch = vec![
            wire(1, &signal(new_id(), r, 1, "ok 1")),
            WireFact {
                seq: 2,
                kind: "signal".into(),
                json: "{\"broken\": ".into(),
            },
            WireFact {
                seq: 3,
                kind: "no_such_kind".into(),
                json: "{}".into(),
            },
            wire(4, &signal(new_id(), r, 4, "nul \u{0} inside")),
            wire(5, &FactBody::TestResult(big)),
            wire(6, &signal(new_id(), r, 6, "ok 6")),
        ];
        let out = write_batch(SRC, &batch, None).unwrap();
        assert_eq!((out.stored, out.rejected, out.last_seq), (2, 4, 6));
        assert_eq!(count("SELECT count(*) FROM liminal.ingest_errors"), 4);
        assert_eq!(
            text("SELECT string_agg(seq::text, ',' ORDER BY seq) FROM liminal.ingest_errors")
                .as_deref(),
            Some("2,3,4,5")
        );
        assert!(
            text("SELECT reason FROM liminal.ingest_errors WHERE seq = 3")
                .unwrap()
                .contains("unknown fact kind")
        );
        assert!(
            text("SELECT reason FROM liminal.ingest_errors WHERE seq = 5")
                .unwrap()
                .contains("out of range")
        );
        assert_eq!(
            text("SELECT payload FROM liminal.ingest_errors WHERE seq = 2").as_deref(),
            Some("{\"broken\": ")
        );
    }

    #[pg_test]
    fn database_error_in_one_fact_rolls_back_only_that_fact() {
        // A trigger stands in for any refusal PostgreSQL may raise mid-batch.
        // pg_tests run concurrently: take the lock DROP TRIGGER needs first,
        // so this DDL waits for other inserters instead of deadlocking with
        // them (CREATE TRIGGER's weaker lock would be escalated later).
        Spi::run("LOCK TABLE liminal.signal_versions IN ACCESS EXCLUSIVE MODE").unwrap();
        Spi::run(
            "CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.value = '\"boom\"' THEN RAISE EXCEPTION 'refused by test trigger'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON liminal.signal_versions FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse();",
        )
        .unwrap();
        let r = new_id();
        let batch: Vec<WireFact> = ["a", "boom", "c"]
            .iter()
            .enumerate()
            .map(|(i, v)| wire(i as u64 + 1, &signal(new_id(), r, i as i64, v)))
            .collect();
        let out = write_batch(SRC, &batch, None).unwrap();
        assert_eq!((out.stored, out.rejected, out.last_seq), (2, 1, 3));
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.signals WHERE run_id = '{r}'"
            )),
            2
        );
        assert!(
            text("SELECT reason FROM liminal.ingest_errors WHERE seq = 2")
                .unwrap()
                .contains("refused by test trigger")
        );
        Spi::run("DROP TRIGGER refuse ON liminal.signal_versions").unwrap();
    }

    #[pg_test]
    fn as_of_signals_and_artifacts() {
        let r = new_id();
        let a = FactBody::Artifact(ArtifactFact {
            fact_id: new_id(),
            id: new_id(),
            run_id: r,
            path: "out/x.tar.gz".into(),
            blake3: "ab".repeat(32),
            size: 42,
            valid_at: t(50),
        });
        write_batch(
            SRC,
            &[
                wire(1, &signal(new_id(), r, 10, "early")),
                wire(2, &a),
                wire(3, &signal(new_id(), r, 40, "late")),
            ],
            None,
        )
        .unwrap();
        let sig = |sec: i64| {
            count(&format!(
                "SELECT count(*) FROM liminal.signals_as_of('2026-01-01T00:00:00Z'::timestamptz + interval '{sec} s') WHERE run_id = '{r}'"
            ))
        };
        assert_eq!((sig(5), sig(20), sig(45)), (0, 1, 2));
        let art = |sec: i64| {
            count(&format!(
                "SELECT count(*) FROM liminal.artifacts_as_of('2026-01-01T00:00:00Z'::timestamptz + interval '{sec} s', now()) WHERE run_id = '{r}'"
            ))
        };
        assert_eq!((art(49), art(50)), (0, 1));
        assert_eq!(
            count(&format!(
                "SELECT size FROM liminal.artifacts WHERE run_id = '{r}'"
            )),
            42
        );
    }

    #[pg_test]
    fn erase_secret_from_every_version() {
        let r = new_id();
        let id = new_id();
        let leaked = signal(id, r, 5, "token=hunter2-SECRET");
        // The same signal again at the same time: a correction, two versions.
        let again = signal(id, r, 5, "token=hunter2-SECRET again");
        write_batch(
            SRC,
            &[
                wire(1, &leaked),
                wire(2, &again),
                wire(3, &signal(new_id(), r, 6, "clean")),
            ],
            None,
        )
        .unwrap();
        Spi::run(&format!(
            "INSERT INTO liminal.ingest_errors (source, seq, kind, payload, reason) VALUES ('{SRC}', 99, 'signal', '{{\"v\": \"hunter2-SECRET\"}}', 'x')"
        ))
        .unwrap();
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.signal_versions WHERE id = '{id}'"
            )),
            2
        );
        let touched = text(
            "SELECT string_agg(table_name || '=' || rows, ',' ORDER BY table_name) FROM liminal.erase(secret => 'hunter2-SECRET')",
        );
        assert_eq!(
            touched.as_deref(),
            Some("ingest_errors=1,run_versions=0,signal_versions=2,test_result_versions=0")
        );
        assert_eq!(
            count("SELECT count(*) FROM liminal.signal_versions WHERE value::text || attrs::text || name LIKE '%hunter2%'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM liminal.ingest_errors WHERE payload LIKE '%hunter2%'"),
            0
        );
        assert_eq!(
            text(&format!(
                "SELECT value #>> '{{}}' FROM liminal.signals WHERE id = '{id}'"
            ))
            .as_deref(),
            Some("token=*** again")
        );
        assert_eq!(
            text(&format!(
                "SELECT attrs->>'line' FROM liminal.signals WHERE id = '{id}'"
            ))
            .as_deref(),
            Some("token=*** again")
        );
    }

    #[pg_test]
    fn erase_run_removes_every_version() {
        let r = new_id();
        let other = new_id();
        write_batch(
            SRC,
            &[
                wire(1, &run(r, RunStatus::Running, 0)),
                wire(2, &signal(new_id(), r, 1, "x")),
                wire(3, &test_result(new_id(), r, TestStatus::Passed, 2)),
                wire(4, &run(r, RunStatus::Passed, 3)),
                wire(5, &run(other, RunStatus::Running, 0)),
            ],
            None,
        )
        .unwrap();
        let touched = text(
            &format!("SELECT string_agg(table_name || '=' || rows, ',' ORDER BY table_name) FROM liminal.erase(run_id => '{r}')"),
        );
        assert_eq!(
            touched.as_deref(),
            Some("artifact_versions=0,repro_verdict_versions=0,run_versions=3,signal_versions=1,test_result_versions=1")
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.run_versions WHERE run_id = '{r}'"
            )),
            0
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.runs WHERE id = '{other}'"
            )),
            1
        );
    }

    #[pg_test(error = "liminal.erase needs exactly one of run_id, secret")]
    fn erase_needs_a_target() {
        Spi::run("SELECT * FROM liminal.erase()").unwrap();
    }
}
