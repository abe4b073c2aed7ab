//! Tests of the reproducibility SQL (liminal.reproducibility,
//! liminal.repro_regressions; in `sql/liminal--0.1.0--0.2.0.sql`),
//! run inside PostgreSQL by `cargo pgrx test pg15`; facts go through the
//! worker's store (`ingest::store::write_batch`).

#[pgrx::pg_schema]
mod tests {
    use crate::ingest::store::{write_batch, WireFact};
    use liminal_facts::Timestamp;
    use liminal_facts::*;
    use pgrx::prelude::*;

    const SRC: &str = "01REPR0TESTSP00LREPR0TESTS";

    fn t(sec: i64) -> Timestamp {
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

    /// One verification: its run (the control build), its artifact, its verdict.
    fn verification(
        seq: u64,
        at: i64,
        digest: &str,
        culprit: Option<&str>,
    ) -> (Ulid, Vec<WireFact>) {
        let run_id = new_id();
        let run = FactBody::Run(RunFact {
            fact_id: new_id(),
            run_id,
            plan_name: "pkg".into(),
            status: RunStatus::Passed,
            exit_code: Some(0),
            input_digest: digest.into(),
            image_digest: None,
            host: "h".into(),
            started_at: t(at),
            finished_at: Some(t(at + 1)),
            reason: None,
            valid_at: t(at + 1),
        });
        let art = FactBody::Artifact(ArtifactFact {
            fact_id: new_id(),
            id: new_id(),
            run_id,
            path: "out/pkg.tar.gz".into(),
            blake3: "aa".into(),
            size: 10,
            valid_at: t(at + 1),
        });
        let differing = culprit
            .map(|c| {
                vec![ArtifactDifference {
                    path: "out/pkg.tar.gz".into(),
                    digests: vec!["aa".into(), "bb".into()],
                    report_blake3: None,
                    culprits: vec![c.into()],
                }]
            })
            .unwrap_or_default();
        let verdict = FactBody::ReproVerdict(ReproVerdictFact {
            fact_id: new_id(),
            run_id,
            input_digest: digest.into(),
            reproducible: culprit.is_none(),
            variations: vec!["hostname".into(), "time".into()],
            artifacts_compared: 1,
            differing,
            culprit: culprit.map(str::to_owned),
            culprits: culprit.map(|c| vec![c.to_owned()]).unwrap_or_default(),
            nondeterministic: false,
            skipped: vec![],
            valid_at: t(at + 2),
        });
        (
            run_id,
            vec![
                wire(seq, &run),
                wire(seq + 1, &art),
                wire(seq + 2, &verdict),
            ],
        )
    }

    fn text(q: &str) -> Option<String> {
        match Spi::get_one::<String>(q) {
            Ok(v) => v,
            Err(pgrx::spi::SpiError::InvalidPosition) => None,
            Err(e) => panic!("query {q}: {e}"),
        }
    }

    fn count(q: &str) -> i64 {
        Spi::get_one::<i64>(q).expect("query").unwrap_or(0)
    }

    #[pg_test]
    fn reproducibility_shows_the_latest_verdict_per_input() {
        let (_, a) = verification(1, 0, "blake3:in1", None);
        let (_, b) = verification(4, 100, "blake3:in1", Some("hostname"));
        let (_, c) = verification(7, 50, "blake3:in2", None);
        for batch in [a, b, c] {
            write_batch(SRC, &batch, None).expect("store");
        }
        assert_eq!(count("SELECT count(*) FROM liminal.reproducibility"), 2);
        let q = |col: &str, d: &str| {
            text(&format!(
                "SELECT {col}::text FROM liminal.reproducibility WHERE input_digest = '{d}'"
            ))
        };
        assert_eq!(q("reproducible", "blake3:in1").as_deref(), Some("false"));
        assert_eq!(q("culprit", "blake3:in1").as_deref(), Some("hostname"));
        assert_eq!(q("verifications", "blake3:in1").as_deref(), Some("2"));
        assert_eq!(
            q("reproducible_verifications", "blake3:in1").as_deref(),
            Some("1")
        );
        assert_eq!(
            q("differing_paths", "blake3:in1").as_deref(),
            Some("{out/pkg.tar.gz}")
        );
        assert_eq!(q("plan_name", "blake3:in1").as_deref(), Some("pkg"));
        assert_eq!(q("reproducible", "blake3:in2").as_deref(), Some("true"));
        assert_eq!(
            q("variations", "blake3:in2").as_deref(),
            Some("{hostname,time}")
        );
    }

    #[pg_test]
    fn regressions_list_artifacts_that_stopped_reproducing() {
        // Reproduced at 0, broke at 100 (umask), still broken at 200 (not a
        // new regression), reproduced again at 300, broke at 400 (time).
        let (r0, a) = verification(1, 0, "blake3:v1", None);
        let (r1, b) = verification(4, 100, "blake3:v2", Some("umask"));
        let (_, c) = verification(7, 200, "blake3:v3", Some("umask"));
        let (r3, d) = verification(10, 300, "blake3:v4", None);
        let (r4, e) = verification(13, 400, "blake3:v5", Some("time"));
        for batch in [a, b, c, d, e] {
            write_batch(SRC, &batch, None).expect("store");
        }
        assert_eq!(count("SELECT count(*) FROM liminal.repro_regressions()"), 2);
        let row = |broke: &Ulid, col: &str| {
            text(&format!(
                "SELECT {col}::text FROM liminal.repro_regressions() WHERE broke_run_id = '{broke}'"
            ))
        };
        assert_eq!(row(&r1, "reproduced_run_id"), Some(r0.to_string()));
        assert_eq!(row(&r1, "culprit").as_deref(), Some("umask"));
        assert_eq!(row(&r1, "culprits").as_deref(), Some("{umask}"));
        assert_eq!(row(&r1, "digests").as_deref(), Some("{aa,bb}"));
        assert_eq!(row(&r1, "path").as_deref(), Some("out/pkg.tar.gz"));
        assert_eq!(row(&r4, "reproduced_run_id"), Some(r3.to_string()));
        assert_eq!(row(&r4, "broke_input_digest").as_deref(), Some("blake3:v5"));
        // since: only the later one.
        let since = "2026-01-01 00:05:00+00";
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM liminal.repro_regressions('{since}')"
            )),
            1
        );
    }
}
