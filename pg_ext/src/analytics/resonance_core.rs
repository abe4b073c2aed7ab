//! Co-failure statistics, pure Rust (no PostgreSQL). `resonance.rs` feeds it
//! the failed-test sets of the counted runs (sparse: only failing tests).

use std::collections::HashMap;

/// One co-failing pair; `a < b` are test indexes (callers number tests in
/// name order, so index order is name order).
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub a: u32,
    pub b: u32,
    pub both: u64,
    pub lift: f64,
    /// None when undefined (one of the tests failed in every or no run).
    pub phi: Option<f64>,
}

/// lift = P(A∧B) / (P(A)·P(B)) = both·n / (fa·fb).
pub fn lift(both: u64, fa: u64, fb: u64, n: u64) -> f64 {
    both as f64 * n as f64 / (fa as f64 * fb as f64)
}

/// Phi coefficient of the 2×2 table (A failed?, B failed?) over n runs.
pub fn phi(both: u64, fa: u64, fb: u64, n: u64) -> Option<f64> {
    let (n11, n1x, nx1, n) = (both as f64, fa as f64, fb as f64, n as f64);
    let n10 = n1x - n11;
    let n01 = nx1 - n11;
    let n00 = n - n1x - nx1 + n11;
    let den = (n1x * (n - n1x) * nx1 * (n - nx1)).sqrt();
    if den == 0.0 || !den.is_finite() {
        None
    } else {
        Some((n11 * n00 - n10 * n01) / den)
    }
}

/// All pairs failing together in at least `min_support` of the `runs`
/// (each a sorted, deduplicated list of failed test indexes; `n_tests` bounds
/// the indexes), `n` the number of counted runs (≥ runs.len(): runs without
/// failures count too). Sorted strongest first: lift, then phi, then names.
///
/// Counts with per-test bitsets over runs (popcount of AND) when that is
/// cheaper than enumerating each run's pairs into a hash map; both give the
/// same counts.
pub fn pairs(runs: &[Vec<u32>], n_tests: usize, n: u64, min_support: u64) -> Vec<Pair> {
    let min_support = min_support.max(1);
    let mut fails = vec![0u64; n_tests];
    for r in runs {
        for &t in r {
            fails[t as usize] += 1;
        }
    }
    // Only tests failing at least min_support times can be in a pair.
    let eligible: Vec<u32> = (0..n_tests as u32)
        .filter(|&t| fails[t as usize] >= min_support)
        .collect();
    let mut slot = vec![u32::MAX; n_tests];
    for (i, &t) in eligible.iter().enumerate() {
        slot[t as usize] = i as u32;
    }
    let reduced: Vec<Vec<u32>> = runs
        .iter()
        .map(|r| {
            r.iter()
                .filter_map(|&t| (slot[t as usize] != u32::MAX).then_some(slot[t as usize]))
                .collect()
        })
        .filter(|r: &Vec<u32>| r.len() >= 2)
        .collect();
    let e = eligible.len() as f64;
    let words = reduced.len().div_ceil(64);
    let bitset_cost = e * e / 2.0 * words as f64;
    let hash_cost: f64 = reduced
        .iter()
        .map(|r| (r.len() * (r.len() - 1) / 2) as f64 * 20.0)
        .sum();
    let counts: Vec<(u32, u32, u64)> = if bitset_cost <= hash_cost {
        count_bitset(&reduced, eligible.len(), words, min_support)
    } else {
        count_hash(&reduced, min_support)
    };
    let mut out: Vec<Pair> = counts
        .into_iter()
        .map(|(i, j, both)| {
            let (a, b) = (eligible[i as usize], eligible[j as usize]);
            let (fa, fb) = (fails[a as usize], fails[b as usize]);
            Pair {
                a,
                b,
                both,
                lift: lift(both, fa, fb, n),
                phi: phi(both, fa, fb, n),
            }
        })
        .collect();
    out.sort_by(|x, y| {
        y.lift
            .total_cmp(&x.lift)
            .then_with(|| match (x.phi, y.phi) {
                (Some(p), Some(q)) => q.total_cmp(&p),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
            .then_with(|| (x.a, x.b).cmp(&(y.a, y.b)))
    });
    out
}

fn count_bitset(
    runs: &[Vec<u32>],
    e: usize,
    words: usize,
    min_support: u64,
) -> Vec<(u32, u32, u64)> {
    let mut bits = vec![0u64; e * words];
    for (r, tests) in runs.iter().enumerate() {
        for &t in tests {
            bits[t as usize * words + r / 64] |= 1u64 << (r % 64);
        }
    }
    let mut out = Vec::new();
    for i in 0..e {
        let bi = &bits[i * words..(i + 1) * words];
        for j in i + 1..e {
            let bj = &bits[j * words..(j + 1) * words];
            let both: u64 = bi
                .iter()
                .zip(bj)
                .map(|(x, y)| (x & y).count_ones() as u64)
                .sum();
            if both >= min_support {
                out.push((i as u32, j as u32, both));
            }
        }
    }
    out
}

fn count_hash(runs: &[Vec<u32>], min_support: u64) -> Vec<(u32, u32, u64)> {
    let mut m: HashMap<(u32, u32), u64> = HashMap::new();
    for r in runs {
        for (k, &i) in r.iter().enumerate() {
            for &j in &r[k + 1..] {
                *m.entry((i.min(j), i.max(j))).or_default() += 1;
            }
        }
    }
    m.into_iter()
        .filter(|&(_, c)| c >= min_support)
        .map(|((i, j), c)| (i, j, c))
        .collect()
}

/// Accumulates the heat map: (bucket, test) → (runs, failures).
#[derive(Default)]
pub struct HeatMap {
    cells: HashMap<(i64, u32), (u64, u64)>,
}

impl HeatMap {
    pub fn add(&mut self, bucket: i64, test: u32, failed: bool) {
        let c = self.cells.entry((bucket, test)).or_default();
        c.0 += 1;
        c.1 += failed as u64;
    }

    /// Cells sorted by bucket then test index.
    pub fn into_sorted(self) -> Vec<(i64, u32, u64, u64)> {
        let mut v: Vec<_> = self
            .cells
            .into_iter()
            .map(|((b, t), (r, f))| (b, t, r, f))
            .collect();
        v.sort_unstable_by_key(|&(b, t, _, _)| (b, t));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lift_and_phi_by_hand() {
        // 10 runs; A failed in 4, B in 4, both in 3.
        // lift = 3*10/(4*4) = 1.875; phi = (3*5 - 1*1)/sqrt(4*6*4*6) = 14/24.
        assert!((lift(3, 4, 4, 10) - 1.875).abs() < 1e-12);
        assert!((phi(3, 4, 4, 10).unwrap() - 14.0 / 24.0).abs() < 1e-12);
        assert_eq!(phi(3, 10, 4, 10), None, "A failed in every run");
    }

    fn fixture() -> Vec<Vec<u32>> {
        // tests 0,1 fail together 3 times, 2 fails with 0 once, 3 alone.
        vec![
            vec![0, 1],
            vec![0, 1, 2],
            vec![0, 1],
            vec![0],
            vec![3],
            vec![2, 3],
        ]
    }

    #[test]
    fn pairs_counts_and_orders() {
        let p = pairs(&fixture(), 4, 10, 1);
        // (0,1): both 3, fa 4, fb 3 → lift 30/12 = 2.5
        assert_eq!((p[0].a, p[0].b, p[0].both), (0, 1, 3));
        assert!((p[0].lift - 2.5).abs() < 1e-12);
        // min_support 2 keeps only (0,1).
        let p2 = pairs(&fixture(), 4, 10, 2);
        assert_eq!(p2.len(), 1);
        // lifts are non-increasing
        assert!(p.windows(2).all(|w| w[0].lift >= w[1].lift));
    }

    #[test]
    fn bitset_and_hash_agree() {
        // A pseudo-random sparse matrix.
        let mut x: u64 = 12345;
        let mut runs = Vec::new();
        for _ in 0..300 {
            let mut r = Vec::new();
            for t in 0..60u32 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if (x >> 33) % 10 < 2 {
                    r.push(t);
                }
            }
            runs.push(r);
        }
        let words = runs.len().div_ceil(64);
        let mut a = count_bitset(&runs, 60, words, 2);
        let mut b = count_hash(&runs, 2);
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert!(!a.is_empty());
    }

    #[test]
    fn heat_map_cells() {
        let mut h = HeatMap::default();
        h.add(1, 0, true);
        h.add(1, 0, false);
        h.add(0, 1, false);
        assert_eq!(h.into_sorted(), vec![(0, 1, 1, 0), (1, 0, 2, 1)]);
    }
}
