//! Analytics inside PostgreSQL (owner: helper "analytics"):
//! `test_stability[_score]`, `causality_walk`, `resonance_map`,
//! `resonance_pairs`. Each reads the current rows with as few SPI queries as
//! possible (rows sorted as the algorithm needs, streamed, see
//! `spi_stream`), then computes in Rust. The algorithms live in the
//! `*_core` modules, free of PostgreSQL, with plain unit tests.
//! Formulas and examples: docs/sql/analytics.md.

pub mod causality_core;
pub mod resonance_core;
pub mod stability_core;

mod causality;
mod index_scan;
mod resonance;
mod spi_stream;
mod stability;

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::sync::Once;

/// `liminal.infra_failure_threshold`: a run in which at least this share of
/// its (non-skipped) test results failed is an infrastructure failure.
pub static INFRA_FAILURE_THRESHOLD: GucSetting<f64> = GucSetting::<f64>::new(0.5);
/// `liminal.infra_min_tests`: the share rule applies only to runs with at
/// least this many non-skipped results.
pub static INFRA_MIN_TESTS: GucSetting<i32> = GucSetting::<i32>::new(10);

static GUCS: Once = Once::new();

/// Registers the analytics GUCs. Idempotent; `_PG_init` may call it, and
/// every analytics function does before reading a setting (so a backend
/// that loaded the library without `_PG_init` calling it still validates).
pub fn init() {
    GUCS.call_once(|| {
        GucRegistry::define_float_guc(
            c"liminal.infra_failure_threshold",
            c"Share of failed tests at which a run counts as an infrastructure failure.",
            c"Runs with at least liminal.infra_min_tests non-skipped results of which this share or more failed are left out of the analytics, like runs with status error, timeout or interrupted.",
            &INFRA_FAILURE_THRESHOLD,
            0.01,
            1.0,
            GucContext::Userset,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"liminal.infra_min_tests",
            c"Minimum number of results in a run for the infrastructure-failure share rule.",
            c"Runs with fewer non-skipped results are never classified as infrastructure failures by share (status error/timeout/interrupted still is).",
            &INFRA_MIN_TESTS,
            1,
            1_000_000,
            GucContext::Userset,
            GucFlags::default(),
        );
    });
}

pub(crate) fn infra_rule() -> stability_core::InfraRule {
    init();
    stability_core::InfraRule {
        threshold: INFRA_FAILURE_THRESHOLD.get(),
        min_tests: INFRA_MIN_TESTS.get().max(1) as u64,
    }
}

/// Raises `invalid_parameter_value` with a hint; never returns.
pub(crate) fn bad_argument(message: impl Into<String>, hint: impl Into<String>) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message.into(),
        "liminal analytics",
    )
    .set_hint(hint.into())
    .report(PgLogLevel::ERROR);
    unreachable!("ERROR-level reports do not return")
}

/// An interval's length in µs, refusing months (their length depends on the
/// calendar, and a window or bucket must be a fixed duration).
pub(crate) fn interval_us(name: &str, iv: &pgrx::datum::Interval) -> i64 {
    if iv.months() != 0 {
        bad_argument(
            format!("{name} must be a fixed duration, not months or years"),
            format!("Write {name} in days, hours or minutes, e.g. '30 days'."),
        );
    }
    iv.days() as i64 * 86_400_000_000 + iv.micros()
}

// Indexes the analytics rely on, beside the schema's own
// (test_result_versions_current_name covers the stability scan).
pgrx::extension_sql!(
    r#"
-- Failed results by time: resonance's sparse scan (only failing tests).
CREATE INDEX test_result_versions_current_failed_at ON liminal.test_result_versions (started_at)
    INCLUDE (run_id, test_name)
    WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND status IN ('failed', 'error');
-- Failures per run: the single-test stability query's infrastructure check.
CREATE INDEX test_result_versions_current_failed_run ON liminal.test_result_versions (run_id)
    WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND status IN ('failed', 'error');
-- Runs on a host by time: causality_walk's overlapping runs.
CREATE INDEX run_versions_current_host ON liminal.run_versions (host, started_at)
    WHERE tx_to = 'infinity' AND valid_to = 'infinity';
-- Signals carrying attributes by run and time: causality_walk's deeper hops.
CREATE INDEX signal_versions_current_attrs ON liminal.signal_versions (run_id, at)
    WHERE tx_to = 'infinity' AND valid_to = 'infinity' AND attrs <> '{}'::jsonb;
-- Is a (kind, name) present in a run: causality_walk's rarity.
CREATE INDEX signal_versions_current_kind_name ON liminal.signal_versions (kind, name, run_id)
    WHERE tx_to = 'infinity' AND valid_to = 'infinity';
"#,
    name = "liminal_analytics_indexes",
    requires = ["liminal_schema"]
);
