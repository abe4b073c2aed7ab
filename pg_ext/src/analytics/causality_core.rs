//! The causality walk, pure Rust (no PostgreSQL). `causality.rs` fetches the
//! candidate signals (same host, the horizon before the failure) in one
//! query, runs `walk`, asks for rarity, then `rank`s.
//!
//! Edges (B is a possible cause of A, B before A):
//! - depth 1: every candidate within `window` before the failure;
//! - shared attribute: B and A have the same value under the same `attrs`
//!   key (except `cause`), and A.at - window <= B.at <= A.at;
//! - declared cause: A's `attrs.cause` equals B's id, or B's name (then the
//!   latest such B at or before A.at).

use std::collections::HashMap;

/// Keys that never link signals by equality (a declared cause is an edge of
/// its own; two effects of the same cause are not causes of each other).
pub const CAUSE_KEY: &str = "cause";

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub kind: String,
    pub name: String,
    /// Microseconds since the Unix epoch.
    pub at: i64,
    /// (key, canonical JSON text of the value), the `cause` key excluded.
    pub attrs: Vec<(String, String)>,
    /// `attrs.cause` when it is a string.
    pub cause: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WalkParams {
    /// When the failed test ended (µs): started_at + duration.
    pub failed_at: i64,
    pub window_us: i64,
    pub max_depth: u32,
    /// Stop discovering after this many signals (memory/time bound).
    pub max_nodes: usize,
}

/// A reached signal: candidate index, depth, how it was reached.
#[derive(Clone, Debug, PartialEq)]
pub struct Reached {
    pub idx: usize,
    pub depth: u32,
    pub parent: Option<usize>,
    /// Time from this signal to what it explains (µs, ≥ 0).
    pub gap_us: i64,
    pub declared: bool,
}

/// Breadth-first walk over `cands` (any order). Each signal is reached once,
/// at its smallest depth; among several parents at that depth the closest in
/// time wins (declared causes beat shared attributes), ties by lower index.
pub fn walk(cands: &[Candidate], p: &WalkParams) -> Vec<Reached> {
    let n = cands.len();
    let mut reached: Vec<Option<Reached>> = vec![None; n];
    let mut order: Vec<usize> = Vec::new();
    let lo = p.failed_at - p.window_us;
    let mut frontier: Vec<usize> = (0..n)
        .filter(|&i| cands[i].at >= lo && cands[i].at <= p.failed_at)
        .collect();
    frontier.sort_by_key(|&i| (cands[i].at, i));
    frontier.truncate(p.max_nodes);
    for &i in &frontier {
        reached[i] = Some(Reached {
            idx: i,
            depth: 1,
            parent: None,
            gap_us: p.failed_at - cands[i].at,
            declared: false,
        });
        order.push(i);
    }
    if p.max_depth < 2 || frontier.is_empty() {
        return order
            .into_iter()
            .filter_map(|i| reached[i].take())
            .collect();
    }

    // Indexes over all candidates, each list sorted by (at, idx).
    let mut by_attr: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut sorted: Vec<usize> = (0..n).collect();
    sorted.sort_by_key(|&i| (cands[i].at, i));
    for &i in &sorted {
        let c = &cands[i];
        for (k, v) in &c.attrs {
            by_attr.entry((k.as_str(), v.as_str())).or_default().push(i);
        }
        by_name.entry(c.name.as_str()).or_default().push(i);
        by_id.entry(c.id.as_str()).or_insert(i);
    }

    for depth in 2..=p.max_depth {
        if order.len() >= p.max_nodes {
            break;
        }
        // best[b] = (declared, gap, parent): smaller is better for the key.
        let mut best: HashMap<usize, (bool, i64, usize)> = HashMap::new();
        let offer = |b: usize,
                     declared: bool,
                     gap: i64,
                     parent: usize,
                     best: &mut HashMap<usize, (bool, i64, usize)>| {
            // Sort key: declared first, then smaller gap, then lower parent.
            let key = (!declared, gap, parent);
            match best.get(&b) {
                Some(&(d, g, pa)) if (!d, g, pa) <= key => {}
                _ => {
                    best.insert(b, (declared, gap, parent));
                }
            }
        };
        // Shared attributes: per (key, value), the frontier signals holding
        // it, swept against the candidates holding it.
        let mut front_by_attr: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for &a in &frontier {
            for (k, v) in &cands[a].attrs {
                front_by_attr
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(a);
            }
        }
        for (kv, mut fs) in front_by_attr {
            fs.sort_by_key(|&i| (cands[i].at, i));
            let Some(list) = by_attr.get(&kv) else {
                continue;
            };
            for &b in list {
                if reached[b].is_some() {
                    continue;
                }
                let bt = cands[b].at;
                // First frontier signal at or after b (not b itself).
                let pos = fs.partition_point(|&a| cands[a].at < bt);
                if let Some(&a) = fs[pos..].iter().find(|&&a| a != b) {
                    let gap = cands[a].at - bt;
                    if gap <= p.window_us {
                        offer(b, false, gap, a, &mut best);
                    }
                }
            }
        }
        // Declared causes.
        for &a in &frontier {
            let Some(cause) = cands[a].cause.as_deref() else {
                continue;
            };
            let at = cands[a].at;
            let target = match by_id.get(cause) {
                Some(&b) if cands[b].at <= at && b != a => Some(b),
                Some(_) => None,
                None => by_name.get(cause).and_then(|list| {
                    let pos = list.partition_point(|&b| cands[b].at <= at);
                    list[..pos].iter().rev().copied().find(|&b| b != a)
                }),
            };
            if let Some(b) = target {
                if reached[b].is_none() {
                    offer(b, true, at - cands[b].at, a, &mut best);
                }
            }
        }
        let mut next: Vec<usize> = best.keys().copied().collect();
        next.sort_by_key(|&i| (cands[i].at, i));
        next.truncate(p.max_nodes.saturating_sub(order.len()));
        for &b in &next {
            let (declared, gap, parent) = best[&b];
            reached[b] = Some(Reached {
                idx: b,
                depth,
                parent: Some(parent),
                gap_us: gap,
                declared,
            });
            order.push(b);
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    order
        .into_iter()
        .filter_map(|i| reached[i].take())
        .collect()
}

/// Declared-cause references of the reached signals that point at no
/// candidate (by id or name): the caller may fetch them and walk again.
pub fn unresolved_causes(cands: &[Candidate], reached: &[Reached]) -> Vec<String> {
    let mut names: Vec<String> = reached
        .iter()
        .filter_map(|r| cands[r.idx].cause.clone())
        .filter(|c| !cands.iter().any(|x| &x.id == c || &x.name == c))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// recency = exp(-3·gap/window): 1 right before, about 0.05 a window away;
/// a declared cause has recency 1 whatever its distance.
pub fn recency(gap_us: i64, window_us: i64, declared: bool) -> f64 {
    if declared {
        1.0
    } else {
        (-3.0 * gap_us.max(0) as f64 / window_us as f64).exp()
    }
}

/// rarity = ln((n + 2) / (c + 1)): c of the n baseline (passing) runs had a
/// signal of the same (kind, name). Seen in none: ln(n + 2), the maximum;
/// seen in all: ln((n + 2)/(n + 1)), near 0.
pub fn rarity(c: u64, n: u64) -> f64 {
    ((n as f64 + 2.0) / (c.min(n) as f64 + 1.0)).ln()
}

pub const HOP_DECAY: f64 = 0.5;

/// A ranked cause.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub idx: usize,
    pub depth: u32,
    pub weight: f64,
    /// Candidate indexes from the depth-1 signal down to this one.
    pub path: Vec<usize>,
}

/// weight = recency × rarity × HOP_DECAY^(depth-1); strongest first (ties:
/// shallower, later, then id), at most `max_rows`.
pub fn rank(
    cands: &[Candidate],
    reached: &[Reached],
    window_us: i64,
    rarity_of: impl Fn(&str, &str) -> f64,
    max_rows: usize,
) -> Vec<Ranked> {
    let parent: HashMap<usize, Option<usize>> = reached.iter().map(|r| (r.idx, r.parent)).collect();
    let mut out: Vec<Ranked> = reached
        .iter()
        .map(|r| {
            let c = &cands[r.idx];
            let weight = recency(r.gap_us, window_us, r.declared)
                * rarity_of(&c.kind, &c.name)
                * HOP_DECAY.powi(r.depth as i32 - 1);
            Ranked {
                idx: r.idx,
                depth: r.depth,
                weight,
                path: Vec::new(),
            }
        })
        .collect();
    out.sort_by(|x, y| {
        y.weight
            .total_cmp(&x.weight)
            .then(x.depth.cmp(&y.depth))
            .then(cands[y.idx].at.cmp(&cands[x.idx].at))
            .then_with(|| cands[x.idx].id.cmp(&cands[y.idx].id))
    });
    out.truncate(max_rows);
    for r in &mut out {
        let mut path = vec![r.idx];
        let mut cur = r.idx;
        // Depth bounds the chain; the guard is against a malformed map.
        while let Some(Some(p)) = parent.get(&cur) {
            if path.len() > 64 {
                break;
            }
            path.push(*p);
            cur = *p;
        }
        path.reverse();
        r.path = path;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn c(
        id: &str,
        name: &str,
        at_s: i64,
        attrs: &[(&str, &str)],
        cause: Option<&str>,
    ) -> Candidate {
        Candidate {
            id: id.into(),
            kind: "event".into(),
            name: name.into(),
            at: at_s * S,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cause: cause.map(str::to_string),
        }
    }

    fn params(depth: u32) -> WalkParams {
        WalkParams {
            failed_at: 1000 * S,
            window_us: 60 * S,
            max_depth: depth,
            max_nodes: 10_000,
        }
    }

    #[test]
    fn depth_one_is_the_window() {
        let cands = vec![
            c("a", "x", 990, &[], None),
            c("b", "y", 930, &[], None),  // 70 s before: outside
            c("c", "z", 1001, &[], None), // after the failure
            c("d", "w", 940, &[], None),  // exactly at the edge
        ];
        let r = walk(&cands, &params(5));
        let ids: Vec<&str> = r.iter().map(|x| cands[x.idx].id.as_str()).collect();
        assert_eq!(ids, vec!["d", "a"]);
        assert!(r.iter().all(|x| x.depth == 1));
    }

    #[test]
    fn multi_hop_by_attribute_and_cause_is_cycle_safe() {
        let cands = vec![
            c("a", "db.slow", 990, &[("db", "\"main\"")], None),
            // shares db=main 55 s before a (outside the depth-1 window): depth 2
            c(
                "b",
                "db.lock",
                935,
                &[("db", "\"main\""), ("host", "\"h\"")],
                Some("deploy"),
            ),
            // declared cause of b by name: depth 3
            c("d", "deploy", 500, &[], None),
            // an older deploy: the latest one before b wins
            c("d0", "deploy", 100, &[], None),
            // shares host with b but 135 s earlier than b: too far
            c("e", "x", 800, &[("host", "\"h\"")], None),
            // cycle: f's cause is a (later than f) → not a cause
            c("f", "loop", 880, &[("db", "\"main\"")], Some("a")),
        ];
        let r = walk(&cands, &params(5));
        let get = |id: &str| r.iter().find(|x| cands[x.idx].id == id);
        assert_eq!(get("a").unwrap().depth, 1);
        let b = get("b").unwrap();
        assert_eq!((b.depth, b.parent), (2, Some(0)));
        assert_eq!(b.gap_us, 55 * S);
        let d = get("d").unwrap();
        assert_eq!((d.depth, d.declared), (3, true));
        assert!(get("d0").is_none());
        assert!(get("e").is_none());
        // f shares db=main with b (55 s before b): depth 3 via b.
        let f = get("f").unwrap();
        assert_eq!((f.depth, f.parent), (3, Some(1)));
        // Depth bound.
        let r2 = walk(&cands, &params(2));
        assert!(r2.iter().all(|x| x.depth <= 2));
        assert_eq!(r2.len(), 2);

        let ranked = rank(
            &cands,
            &r,
            60 * S,
            |_, n| if n == "deploy" { 4.0 } else { 1.0 },
            100,
        );
        // d: declared (recency 1) × rarity 4 × 0.5² = 1 beats a: e^-0.5 × 1.
        assert_eq!(cands[ranked[0].idx].id, "d");
        assert_eq!(cands[ranked[1].idx].id, "a");
        let dp = ranked.iter().find(|x| cands[x.idx].id == "d").unwrap();
        let ids: Vec<&str> = dp.path.iter().map(|&i| cands[i].id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "d"]);
        // weight of d: declared (recency 1) × 4 × 0.25 = 1
        assert!((dp.weight - 1.0).abs() < 1e-12);
        assert!(ranked.windows(2).all(|w| w[0].weight >= w[1].weight));
    }

    #[test]
    fn rare_signal_ranks_first() {
        let cands = vec![
            c("common", "stdout", 999, &[], None),
            c("rare", "oom", 970, &[], None),
        ];
        let r = walk(&cands, &params(1));
        let ranked = rank(
            &cands,
            &r,
            60 * S,
            |_, n| {
                if n == "oom" {
                    rarity(0, 20)
                } else {
                    rarity(20, 20)
                }
            },
            10,
        );
        assert_eq!(cands[ranked[0].idx].id, "rare");
        assert!((rarity(0, 20) - 22f64.ln()).abs() < 1e-12);
        assert!((recency(0, 60 * S, false) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn node_cap_bounds_the_walk() {
        let cands: Vec<Candidate> = (0..100)
            .map(|i| c(&format!("s{i}"), "n", 990 - i, &[("k", "1")], None))
            .collect();
        let mut p = params(5);
        p.max_nodes = 10;
        assert_eq!(walk(&cands, &p).len(), 10);
        let unresolved = unresolved_causes(&cands, &walk(&cands, &p));
        assert!(unresolved.is_empty());
    }
}
