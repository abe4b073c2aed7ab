//! Test stability statistics, pure Rust (no PostgreSQL): unit-tested with
//! plain `#[test]`s. The SQL functions in `stability.rs` feed it the rows.
//!
//! The formulas are documented in `docs/sql/analytics.md`; keep both in step.

/// Half-life, in runs, of the weight of a pass↔fail transition in the flip
/// rate: the newest transition weighs 1, one 20 runs older weighs 1/2.
pub const FLIP_HALF_LIFE_RUNS: f64 = 20.0;
/// Below this many counted runs a test is `insufficient_data`.
pub const MIN_RUNS: u64 = 5;
/// `broken` when the 95% interval's upper end of the pass probability is
/// below this ...
pub const BROKEN_CI_HIGH: f64 = 0.2;
/// ... or when the last this-many counted runs all failed.
pub const BROKEN_LAST_K: usize = 5;
/// Two-sided credible interval mass.
pub const CI_LOW_Q: f64 = 0.025;
pub const CI_HIGH_Q: f64 = 0.975;

/// One counted run of a test, in `started_at` order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Obs {
    pub passed: bool,
    /// Interned input digest of the run (None when the run is unknown).
    pub digest: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classification {
    Healthy,
    Flaky,
    Broken,
    InsufficientData,
}

impl Classification {
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Healthy => "healthy",
            Classification::Flaky => "flaky",
            Classification::Broken => "broken",
            Classification::InsufficientData => "insufficient_data",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stability {
    pub runs: u64,
    pub passes: u64,
    pub failures: u64,
    pub pass_probability: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub flip_rate: f64,
    pub same_input_disagreements: u64,
    pub score: f64,
    pub classification: Classification,
}

/// Quantile `q` of Beta(a, b). Closed forms when one shape is 1 (the common
/// all-pass / all-fail cases: exact and cheap), statrs' AS 64 inversion
/// otherwise.
pub fn beta_quantile(a: f64, b: f64, q: f64) -> f64 {
    let x = if b == 1.0 {
        q.powf(1.0 / a)
    } else if a == 1.0 {
        1.0 - (1.0 - q).powf(1.0 / b)
    } else {
        statrs::function::beta::inv_beta_reg(a, b, q)
    };
    x.clamp(0.0, 1.0)
}

/// Exponentially weighted share of pass↔fail transitions: transition i
/// (between obs[i-1] and obs[i]) weighs 2^-((n-1-i)/H).
pub fn flip_rate(obs: &[Obs]) -> f64 {
    let n = obs.len();
    if n < 2 {
        return 0.0;
    }
    let decay = 0.5f64.powf(1.0 / FLIP_HALF_LIFE_RUNS);
    let (mut num, mut den, mut w) = (0.0, 0.0, 1.0);
    // Walk from the newest transition backwards, multiplying the weight.
    for i in (1..n).rev() {
        if obs[i].passed != obs[i - 1].passed {
            num += w;
        }
        den += w;
        w *= decay;
    }
    num / den
}

/// Number of input digests under which the test both passed and failed.
pub fn same_input_disagreements(obs: &[Obs]) -> u64 {
    let mut pairs: Vec<(u32, bool)> = obs
        .iter()
        .filter_map(|o| o.digest.map(|d| (d, o.passed)))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    // After dedup a digest appears twice exactly when both outcomes exist.
    pairs.windows(2).filter(|w| w[0].0 == w[1].0).count() as u64
}

/// Stability of one test from its counted runs (infrastructure-failure runs
/// and skipped results already removed), oldest first. None when empty.
pub fn evaluate(obs: &[Obs]) -> Option<Stability> {
    if obs.is_empty() {
        return None;
    }
    let runs = obs.len() as u64;
    let passes = obs.iter().filter(|o| o.passed).count() as u64;
    let failures = runs - passes;
    let (a, b) = (1.0 + passes as f64, 1.0 + failures as f64);
    let pass_probability = a / (a + b);
    let ci_low = beta_quantile(a, b, CI_LOW_Q);
    let ci_high = beta_quantile(a, b, CI_HIGH_Q);
    let mixed = passes > 0 && failures > 0;
    let flip = if mixed { flip_rate(obs) } else { 0.0 };
    let disagreements = if mixed {
        same_input_disagreements(obs)
    } else {
        0
    };
    let score = (pass_probability * (1.0 - flip)).clamp(0.0, 1.0);
    let last_k_failed =
        obs.len() >= BROKEN_LAST_K && obs[obs.len() - BROKEN_LAST_K..].iter().all(|o| !o.passed);
    let classification = if runs < MIN_RUNS {
        Classification::InsufficientData
    } else if ci_high < BROKEN_CI_HIGH || last_k_failed {
        Classification::Broken
    } else if flip > 0.0 || disagreements > 0 {
        Classification::Flaky
    } else {
        Classification::Healthy
    };
    Some(Stability {
        runs,
        passes,
        failures,
        pass_probability,
        ci_low,
        ci_high,
        flip_rate: flip,
        same_input_disagreements: disagreements,
        score,
        classification,
    })
}

/// When a run is an infrastructure failure (its results say nothing about
/// the tests): status error/timeout/interrupted, or at least `min_tests`
/// non-skipped results of which a share ≥ `threshold` failed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InfraRule {
    pub threshold: f64,
    pub min_tests: u64,
}

impl InfraRule {
    pub fn status_is_infra(status: &str) -> bool {
        matches!(status, "error" | "timeout" | "interrupted")
    }

    pub fn share_is_infra(&self, failed: u64, total: u64) -> bool {
        total >= self.min_tests && total > 0 && failed as f64 >= self.threshold * total as f64
    }

    /// How many non-skipped results of a run with `failed` failures must be
    /// counted to decide `share_is_infra`: once a run has more than this
    /// many, the share is below the threshold. Lets the single-test query
    /// count a run's results with a LIMIT instead of all of them.
    pub fn total_cap(&self, failed: u64) -> u64 {
        let by_share = (failed as f64 / self.threshold).floor() as u64 + 1;
        by_share.max(self.min_tests).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(s: &str) -> Vec<Obs> {
        s.chars()
            .map(|c| Obs {
                passed: c == 'P',
                digest: None,
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn beta_quantiles_match_closed_forms_and_known_values() {
        // Beta(1, 6): 1 - (1-q)^(1/6).
        assert!(close(
            beta_quantile(1.0, 6.0, 0.975),
            1.0 - 0.025f64.powf(1.0 / 6.0)
        ));
        // Beta(11, 1): q^(1/11).
        assert!(close(
            beta_quantile(11.0, 1.0, 0.025),
            0.025f64.powf(1.0 / 11.0)
        ));
        // Beta(1, 1) is uniform.
        assert!(close(beta_quantile(1.0, 1.0, 0.3), 0.3));
        // Reference values by bisection on a numerically integrated CDF.
        let m = beta_quantile(5.0, 3.0, 0.5);
        assert!((m - 0.6358839).abs() < 1e-5, "{m}");
        assert!((beta_quantile(8.0, 4.0, 0.025) - 0.3902574).abs() < 1e-5);
        assert!((beta_quantile(8.0, 4.0, 0.975) - 0.8907366).abs() < 1e-5);
        // Symmetry: q(a,b,p) = 1 - q(b,a,1-p).
        let x = beta_quantile(7.0, 3.0, 0.1);
        let y = beta_quantile(3.0, 7.0, 0.9);
        assert!((x - (1.0 - y)).abs() < 1e-9);
    }

    #[test]
    fn stable_test_is_healthy() {
        let s = evaluate(&seq("PPPPPPPPPP")).unwrap();
        assert_eq!(s.runs, 10);
        assert!(close(s.pass_probability, 11.0 / 12.0));
        assert!(close(s.flip_rate, 0.0));
        assert!(close(s.score, 11.0 / 12.0));
        assert!(close(s.ci_high, 0.975f64.powf(1.0 / 11.0)));
        assert!(close(s.ci_low, 0.025f64.powf(1.0 / 11.0)));
        assert_eq!(s.classification, Classification::Healthy);
    }

    #[test]
    fn flip_rate_weights_recent_transitions() {
        // PPF: transitions (P,P)=0 weight d, (P,F)=1 weight 1.
        let d = 0.5f64.powf(1.0 / 20.0);
        assert!(close(flip_rate(&seq("PPF")), 1.0 / (1.0 + d)));
        // FPP: the flip is the older one.
        assert!(close(flip_rate(&seq("FPP")), d / (1.0 + d)));
        assert!(close(flip_rate(&seq("PFPF")), 1.0));
        assert!(close(flip_rate(&seq("P")), 0.0));
    }

    #[test]
    fn flaky_and_broken() {
        let s = evaluate(&seq("PFPPFPPFPP")).unwrap();
        assert_eq!(s.classification, Classification::Flaky);
        assert_eq!((s.passes, s.failures), (7, 3));
        assert!(close(s.pass_probability, 8.0 / 12.0));
        assert!(close(s.score, s.pass_probability * (1.0 - s.flip_rate)));

        let b = evaluate(&seq("PPPPPFFFFF")).unwrap();
        assert_eq!(b.classification, Classification::Broken, "last 5 failed");
        let b = evaluate(&seq("FFFFFFFFFFFFFFFFFFFF")).unwrap();
        assert!(b.ci_high < BROKEN_CI_HIGH);
        assert_eq!(b.classification, Classification::Broken);
        assert!(close(b.score, 1.0 / 22.0));

        let i = evaluate(&seq("PFPF")).unwrap();
        assert_eq!(i.classification, Classification::InsufficientData);
        assert!(evaluate(&[]).is_none());
    }

    #[test]
    fn disagreements_count_digests_with_both_outcomes() {
        let o = |passed, d| Obs {
            passed,
            digest: Some(d),
        };
        let v = vec![
            o(true, 1),
            o(false, 1),
            o(true, 1),
            o(true, 2),
            o(true, 2),
            o(false, 3),
            o(true, 3),
        ];
        assert_eq!(same_input_disagreements(&v), 2);
        let s = evaluate(&v).unwrap();
        assert_eq!(s.same_input_disagreements, 2);
    }

    #[test]
    fn infra_rule() {
        let r = InfraRule {
            threshold: 0.5,
            min_tests: 10,
        };
        assert!(r.share_is_infra(5, 10));
        assert!(!r.share_is_infra(4, 10));
        assert!(!r.share_is_infra(5, 9), "too few tests");
        assert!(InfraRule::status_is_infra("timeout"));
        assert!(!InfraRule::status_is_infra("failed"));
        // Counting at most total_cap results decides the rule exactly.
        for failed in 0..40u64 {
            for total in failed.max(1)..200u64 {
                let cap = r.total_cap(failed);
                let counted = total.min(cap);
                let decided = counted < cap && r.share_is_infra(failed, counted);
                assert_eq!(
                    decided,
                    r.share_is_infra(failed, total),
                    "f={failed} t={total}"
                );
            }
        }
    }
}
