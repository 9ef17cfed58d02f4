//! Replica placement: weighted rendezvous hashing (HRW) of a volume id over the replica
//! daemons, spreading replicas across zones, then nodes.
//!
//! Pure functions, no I/O, so the properties that matter are unit- and property-tested:
//! * deterministic: the same candidates (in any order) and volume id give the same set;
//! * every replica on a distinct node, and on distinct zones as far as zones allow;
//! * a daemon's chance to be picked is proportional to its free bytes (the weight);
//! * adding a daemon to N moves only about 1/(N+1) of new placements.
//!
//! Score of daemon `d` for volume `v`: `-w / ln(u)` where `w` is the free bytes and
//! `u` in (0, 1) comes from sha256(`v` NUL `d`). The highest score wins; for a set of
//! daemons the probability of winning is `w_i / sum(w)`. The hash is fixed (not std's
//! randomised hasher), so every controller instance and every restart agrees.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};

/// One replica daemon that could hold a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Stable identity of the daemon, hashed with the volume id.
    pub daemon_id: String,
    /// Node the daemon runs on; at most one replica per node.
    pub node_id: String,
    /// Zone of the node; `""` when the cluster has no zones.
    pub zone: String,
    /// Free bytes, the placement weight.
    pub free_bytes: u64,
}

/// What to place.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    /// Volume id, the hash key.
    pub volume_id: &'a str,
    /// Bytes each replica needs.
    pub size_bytes: u64,
    /// Number of replicas.
    pub replication_factor: usize,
    /// Zones the replicas must be in (from requisite topology); `None` = any.
    pub allowed_zones: Option<&'a BTreeSet<String>>,
    /// Node that should get one replica if a daemon there fits (data locality).
    pub preferred_node: Option<&'a str>,
    /// Daemons (by `daemon_id`) to take before others wherever zone spreading allows:
    /// the holders of the snapshot a restore or clone is populated from, which share
    /// their sealed layers with the new volume instead of copying them.
    pub preferred_daemons: &'a [String],
}

/// Why no replica set could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Not enough distinct nodes with enough free space (OUT_OF_RANGE).
    #[error("only {fit} node(s) have a live replica daemon with {size_bytes} bytes free, replicationFactor is {rf}")]
    NotEnoughNodes {
        /// Distinct nodes with a fitting daemon.
        fit: usize,
        /// Replicas wanted.
        rf: usize,
        /// Bytes per replica.
        size_bytes: u64,
    },
    /// Enough nodes exist, but the topology requirement excluded them
    /// (RESOURCE_EXHAUSTED).
    #[error(
        "only {fit_in_topology} node(s) in the requested zones have a live replica daemon with {size_bytes} bytes free \
         ({fit} in all zones), replicationFactor is {rf}"
    )]
    TopologyExcluded {
        /// Fitting nodes within the allowed zones.
        fit_in_topology: usize,
        /// Fitting nodes anywhere.
        fit: usize,
        /// Replicas wanted.
        rf: usize,
        /// Bytes per replica.
        size_bytes: u64,
    },
}

/// The placement identity of the daemon serving `control_address` on `node_id`.
pub fn daemon_id(node_id: &str, control_address: &str) -> String {
    format!("{node_id}@{control_address}")
}

/// The HRW score of `daemon_id` for `volume_id` with weight `weight`.
pub fn score(volume_id: &str, daemon_id: &str, weight: u64) -> f64 {
    if weight == 0 {
        return 0.0;
    }
    let mut h = Sha256::new();
    h.update(volume_id.as_bytes());
    h.update([0u8]);
    h.update(daemon_id.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 random bits, shifted by half a step so u is strictly inside (0, 1).
    let bits = u64::from_be_bytes(first) >> 11;
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight as f64) / u.ln()
}

/// Chooses `replication_factor` daemons; returns indexes into `candidates`, the first
/// being the preferred node's daemon when data locality applied, otherwise the
/// highest-scoring one.
pub fn place(
    candidates: &[Candidate],
    req: &PlacementRequest<'_>,
) -> Result<Vec<usize>, PlacementError> {
    let rf = req.replication_factor;
    let fitting: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].free_bytes >= req.size_bytes)
        .collect();
    let in_zone: Vec<usize> = match req.allowed_zones {
        Some(zones) => fitting
            .iter()
            .copied()
            .filter(|&i| zones.contains(&candidates[i].zone))
            .collect(),
        None => fitting.clone(),
    };
    let per_node = best_per_node(candidates, &in_zone, req);
    if per_node.len() < rf {
        let fit = distinct_nodes(candidates, &fitting);
        if req.allowed_zones.is_some() && fit >= rf {
            return Err(PlacementError::TopologyExcluded {
                fit_in_topology: per_node.len(),
                fit,
                rf,
                size_bytes: req.size_bytes,
            });
        }
        return Err(PlacementError::NotEnoughNodes {
            fit,
            rf,
            size_bytes: req.size_bytes,
        });
    }

    let mut chosen: Vec<usize> = Vec::with_capacity(rf);
    let mut zone_use: HashMap<&str, usize> = HashMap::new();
    let mut remaining = per_node;
    if let Some(pref) = req.preferred_node {
        if let Some(pos) = remaining
            .iter()
            .position(|s| candidates[s.index].node_id == pref)
        {
            let s = remaining.remove(pos);
            *zone_use
                .entry(candidates[s.index].zone.as_str())
                .or_default() += 1;
            chosen.push(s.index);
        }
    }
    while chosen.len() < rf {
        // Least-used zone first, then highest score; ties by daemon id for determinism.
        let mut best: Option<usize> = None;
        for (pos, s) in remaining.iter().enumerate() {
            let better = match best {
                None => true,
                Some(b) => {
                    let o = &remaining[b];
                    let (zs, zo) = (
                        zone_use
                            .get(candidates[s.index].zone.as_str())
                            .copied()
                            .unwrap_or(0),
                        zone_use
                            .get(candidates[o.index].zone.as_str())
                            .copied()
                            .unwrap_or(0),
                    );
                    zs < zo || (zs == zo && s.ranks_above(o, candidates))
                }
            };
            if better {
                best = Some(pos);
            }
        }
        let Some(pos) = best else { break };
        let s = remaining.remove(pos);
        *zone_use
            .entry(candidates[s.index].zone.as_str())
            .or_default() += 1;
        chosen.push(s.index);
    }
    Ok(chosen)
}

/// Largest block-aligned size for which [`place`] would succeed with `rf` replicas
/// within `allowed_zones`: the rf-th largest per-node free space.
pub fn max_placeable_size(
    candidates: &[Candidate],
    rf: usize,
    allowed_zones: Option<&BTreeSet<String>>,
    block: u64,
) -> u64 {
    if rf == 0 {
        return 0;
    }
    let mut per_node: BTreeMap<&str, u64> = BTreeMap::new();
    for c in candidates {
        if allowed_zones.is_some_and(|z| !z.contains(&c.zone)) {
            continue;
        }
        let e = per_node.entry(c.node_id.as_str()).or_default();
        *e = (*e).max(c.free_bytes);
    }
    let mut frees: Vec<u64> = per_node.into_values().collect();
    frees.sort_unstable_by(|a, b| b.cmp(a));
    frees.get(rf - 1).map(|f| f / block * block).unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
struct Scored {
    index: usize,
    /// One of the request's preferred daemons: ranks above every other.
    preferred: bool,
    score: f64,
}

impl Scored {
    fn ranks_above(&self, other: &Scored, candidates: &[Candidate]) -> bool {
        if self.preferred != other.preferred {
            return self.preferred;
        }
        self.score > other.score
            || (self.score == other.score
                && candidates[self.index].daemon_id < candidates[other.index].daemon_id)
    }
}

/// The best daemon of every node among `indexes` (a preferred one, else the
/// highest-scoring), ordered by node id.
fn best_per_node(
    candidates: &[Candidate],
    indexes: &[usize],
    req: &PlacementRequest<'_>,
) -> Vec<Scored> {
    let mut best: BTreeMap<&str, Scored> = BTreeMap::new();
    for &i in indexes {
        let c = &candidates[i];
        let s = Scored {
            index: i,
            preferred: req.preferred_daemons.contains(&c.daemon_id),
            score: score(req.volume_id, &c.daemon_id, c.free_bytes),
        };
        match best.get(c.node_id.as_str()) {
            Some(cur) if !s.ranks_above(cur, candidates) => {}
            _ => {
                best.insert(c.node_id.as_str(), s);
            }
        }
    }
    best.into_values().collect()
}

fn distinct_nodes(candidates: &[Candidate], indexes: &[usize]) -> usize {
    indexes
        .iter()
        .map(|&i| candidates[i].node_id.as_str())
        .collect::<BTreeSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(id: &str, node: &str, zone: &str, free: u64) -> Candidate {
        Candidate {
            daemon_id: id.into(),
            node_id: node.into(),
            zone: zone.into(),
            free_bytes: free,
        }
    }

    fn uniform(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| cand(&format!("d{i}"), &format!("n{i}"), "", 1 << 40))
            .collect()
    }

    fn req(volume_id: &str, rf: usize) -> PlacementRequest<'_> {
        PlacementRequest {
            volume_id,
            size_bytes: 1 << 30,
            replication_factor: rf,
            allowed_zones: None,
            preferred_node: None,
            preferred_daemons: &[],
        }
    }

    fn nodes(c: &[Candidate], idx: &[usize]) -> Vec<String> {
        idx.iter().map(|&i| c[i].node_id.clone()).collect()
    }

    #[test]
    fn score_is_stable_and_positive() {
        let a = score("tv-1", "d1", 100);
        assert_eq!(a, score("tv-1", "d1", 100));
        assert!(a > 0.0 && a.is_finite());
        assert_ne!(a, score("tv-2", "d1", 100));
        assert_eq!(score("tv-1", "d1", 0), 0.0);
        // Double the weight, double the score.
        assert!((score("tv-1", "d1", 200) / a - 2.0).abs() < 1e-9);
    }

    #[test]
    fn picks_distinct_nodes_even_with_several_daemons_per_node() {
        let c = vec![
            cand("a1", "a", "", 100 << 30),
            cand("a2", "a", "", 100 << 30),
            cand("b1", "b", "", 100 << 30),
            cand("c1", "c", "", 100 << 30),
        ];
        for v in 0..200 {
            let id = format!("tv-{v}");
            let got = place(&c, &req(&id, 3)).unwrap();
            let mut n = nodes(&c, &got);
            n.sort();
            assert_eq!(n, vec!["a", "b", "c"]);
        }
    }

    #[test]
    fn not_enough_nodes_is_reported_with_counts() {
        let c = vec![
            cand("a", "a", "", 100 << 30),
            cand("b", "b", "", 1 << 20),
            cand("c", "c", "", 100 << 30),
        ];
        let err = place(&c, &req("tv-x", 3)).unwrap_err();
        assert_eq!(
            err,
            PlacementError::NotEnoughNodes {
                fit: 2,
                rf: 3,
                size_bytes: 1 << 30
            }
        );
        assert!(err.to_string().contains("only 2 node(s)"));
        assert_eq!(place(&c, &req("tv-x", 2)).map(|v| v.len()), Ok(2));
    }

    #[test]
    fn zone_restriction_that_excludes_is_topology_error() {
        let c = vec![
            cand("a", "a", "z1", 100 << 30),
            cand("b", "b", "z2", 100 << 30),
            cand("c", "c", "z2", 100 << 30),
        ];
        let zones: BTreeSet<String> = ["z2".to_string()].into();
        let mut r = req("tv-x", 3);
        r.allowed_zones = Some(&zones);
        assert!(matches!(
            place(&c, &r),
            Err(PlacementError::TopologyExcluded {
                fit_in_topology: 2,
                fit: 3,
                rf: 3,
                ..
            })
        ));
        r.replication_factor = 2;
        let got = place(&c, &r).unwrap();
        assert!(got.iter().all(|&i| c[i].zone == "z2"));
    }

    #[test]
    fn spreads_across_zones_first() {
        // Zone z1 has four nodes, z2 and z3 one each: all three zones must be used.
        let mut c: Vec<Candidate> = (0..4)
            .map(|i| cand(&format!("d{i}"), &format!("n{i}"), "z1", 1 << 40))
            .collect();
        c.push(cand("e", "e", "z2", 1 << 30));
        c.push(cand("f", "f", "z3", 1 << 30));
        for v in 0..200 {
            let id = format!("tv-{v}");
            let got = place(&c, &req(&id, 3)).unwrap();
            let zones: BTreeSet<&str> = got.iter().map(|&i| c[i].zone.as_str()).collect();
            assert_eq!(zones.len(), 3, "{id}: {got:?}");
        }
    }

    #[test]
    fn preferred_node_comes_first_when_it_fits() {
        let c = uniform(6);
        for v in 0..50 {
            let id = format!("tv-{v}");
            let mut r = req(&id, 3);
            r.preferred_node = Some("n4");
            let got = place(&c, &r).unwrap();
            assert_eq!(c[got[0]].node_id, "n4");
            assert_eq!(nodes(&c, &got).iter().collect::<BTreeSet<_>>().len(), 3);
        }
        // A preferred node without room is ignored.
        let mut small = uniform(4);
        small[2].free_bytes = 10;
        let mut r = req("tv-1", 3);
        r.preferred_node = Some("n2");
        let got = place(&small, &r).unwrap();
        assert!(!nodes(&small, &got).contains(&"n2".to_string()));
    }

    #[test]
    fn preferred_daemons_are_taken_first_within_zone_spreading() {
        // Six daemons on six nodes; the snapshot's holders are d1, d3 (and d5, full).
        let mut c = uniform(6);
        c[5].free_bytes = 10;
        let holders = vec!["d1".to_string(), "d3".to_string(), "d5".to_string()];
        for v in 0..50 {
            let id = format!("tv-{v}");
            let mut r = req(&id, 3);
            r.preferred_daemons = &holders;
            let got = place(&c, &r).unwrap();
            let ids: BTreeSet<&str> = got.iter().map(|&i| c[i].daemon_id.as_str()).collect();
            assert!(ids.contains("d1") && ids.contains("d3"), "{id}: {ids:?}");
            assert!(!ids.contains("d5"), "a holder without room is skipped");
            assert_eq!(ids.len(), 3);
        }
        // On a node with two daemons, the holder is the one taken.
        let two = vec![
            cand("a1", "a", "", 1 << 40),
            cand("a2", "a", "", 1 << 40),
            cand("b1", "b", "", 1 << 40),
        ];
        let holders = vec!["a2".to_string()];
        for v in 0..50 {
            let id = format!("tv-{v}");
            let mut r = req(&id, 2);
            r.preferred_daemons = &holders;
            let got = place(&two, &r).unwrap();
            assert!(got.iter().any(|&i| two[i].daemon_id == "a2"), "{id}");
        }
        // Zone spreading still comes first: two holders in one zone, RF 2, two zones.
        let zoned = vec![
            cand("x1", "n1", "z1", 1 << 40),
            cand("x2", "n2", "z1", 1 << 40),
            cand("y1", "n3", "z2", 1 << 40),
        ];
        let holders = vec!["x1".to_string(), "x2".to_string()];
        let mut r = req("tv-z", 2);
        r.preferred_daemons = &holders;
        let got = place(&zoned, &r).unwrap();
        let zones: BTreeSet<&str> = got.iter().map(|&i| zoned[i].zone.as_str()).collect();
        assert_eq!(zones.len(), 2);
    }

    #[test]
    fn weights_bias_selection_proportionally() {
        // Weights 1:2:3:4 -> expected primary share 10%, 20%, 30%, 40%.
        let c: Vec<Candidate> = (1..=4)
            .map(|w| cand(&format!("d{w}"), &format!("n{w}"), "", w * (10 << 30)))
            .collect();
        let trials = 20_000;
        let mut wins = [0usize; 4];
        for v in 0..trials {
            let id = format!("tv-{v}");
            wins[place(&c, &req(&id, 1)).unwrap()[0]] += 1;
        }
        for (i, &w) in wins.iter().enumerate() {
            let expected = trials as f64 * (i + 1) as f64 / 10.0;
            let rel = (w as f64 - expected).abs() / expected;
            assert!(rel < 0.1, "daemon {i}: {w} wins, expected ~{expected}");
        }
    }

    #[test]
    fn adding_a_daemon_moves_about_one_in_n_plus_one() {
        let ids: Vec<String> = (0..6000).map(|v| format!("tv-{v:08}")).collect();
        for n in [3usize, 5, 8, 12] {
            let before = uniform(n);
            let after = uniform(n + 1);
            let moved = ids
                .iter()
                .filter(|id| {
                    let a = place(&before, &req(id, 1)).unwrap()[0];
                    let b = place(&after, &req(id, 1)).unwrap()[0];
                    before[a].daemon_id != after[b].daemon_id
                })
                .count();
            let expected = ids.len() as f64 / (n + 1) as f64;
            let rel = (moved as f64 - expected).abs() / expected;
            assert!(rel < 0.3, "n={n}: moved {moved}, expected ~{expected}");
        }
    }

    #[test]
    fn moved_placements_only_go_to_the_new_daemon() {
        let before = uniform(5);
        let after = uniform(6);
        for v in 0..2000 {
            let id = format!("tv-{v}");
            let a = place(&before, &req(&id, 1)).unwrap()[0];
            let b = place(&after, &req(&id, 1)).unwrap()[0];
            if before[a].daemon_id != after[b].daemon_id {
                assert_eq!(after[b].daemon_id, "d5");
            }
        }
    }

    #[test]
    fn max_placeable_size_is_rf_th_largest_node() {
        let c = vec![
            cand("a1", "a", "z1", 10 << 30),
            cand("a2", "a", "z1", 50 << 30),
            cand("b", "b", "z2", 20 << 30),
            cand("c", "c", "z2", (30 << 30) + 5),
        ];
        assert_eq!(max_placeable_size(&c, 1, None, 4096), 50 << 30);
        assert_eq!(max_placeable_size(&c, 2, None, 4096), 30 << 30);
        assert_eq!(max_placeable_size(&c, 3, None, 4096), 20 << 30);
        assert_eq!(max_placeable_size(&c, 4, None, 4096), 0);
        let z2: BTreeSet<String> = ["z2".to_string()].into();
        assert_eq!(max_placeable_size(&c, 2, Some(&z2), 4096), 20 << 30);
        // The bound is tight: rf=3 at that size places, one block more does not.
        let mut r = req("tv-1", 3);
        r.size_bytes = 20 << 30;
        assert!(place(&c, &r).is_ok());
        r.size_bytes += 4096;
        assert!(place(&c, &r).is_err());
    }

    /// Random daemons on up to 12 nodes; a node's zone is a function of the node, as in
    /// a real cluster.
    fn arb_candidates() -> impl Strategy<Value = Vec<Candidate>> {
        (1u8..5, prop::collection::vec((0u8..12, 1u64..1000), 1..24)).prop_map(|(zones, v)| {
            v.into_iter()
                .enumerate()
                .map(|(i, (node, free))| {
                    cand(
                        &format!("d{i}"),
                        &format!("n{node}"),
                        &format!("z{}", node % zones),
                        free << 30,
                    )
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn placement_properties(cands in arb_candidates(), vol in "[a-f0-9]{8}", rf in 1usize..5, size_gib in 1u64..600) {
            let r = PlacementRequest { volume_id: &vol, size_bytes: size_gib << 30, replication_factor: rf, allowed_zones: None, preferred_node: None, preferred_daemons: &[] };
            let fitting: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].free_bytes >= r.size_bytes).collect();
            let fit_nodes = distinct_nodes(&cands, &fitting);
            match place(&cands, &r) {
                Ok(got) => {
                    prop_assert_eq!(got.len(), rf);
                    let node_set: BTreeSet<&str> = got.iter().map(|&i| cands[i].node_id.as_str()).collect();
                    prop_assert_eq!(node_set.len(), rf);
                    prop_assert!(got.iter().all(|&i| cands[i].free_bytes >= r.size_bytes));
                    // Zones: as many distinct as possible.
                    let zones_avail: BTreeSet<&str> = fitting.iter().map(|&i| cands[i].zone.as_str()).collect();
                    let zones_used: BTreeSet<&str> = got.iter().map(|&i| cands[i].zone.as_str()).collect();
                    prop_assert_eq!(zones_used.len(), zones_avail.len().min(rf));
                    // Deterministic and independent of candidate order.
                    prop_assert_eq!(place(&cands, &r).unwrap(), got.clone());
                    let mut rev = cands.clone();
                    rev.reverse();
                    let got_rev = place(&rev, &r).unwrap();
                    let a: Vec<&str> = got.iter().map(|&i| cands[i].daemon_id.as_str()).collect();
                    let b: Vec<&str> = got_rev.iter().map(|&i| rev[i].daemon_id.as_str()).collect();
                    prop_assert_eq!(a, b);
                    prop_assert!(fit_nodes >= rf);
                }
                Err(PlacementError::NotEnoughNodes { fit, .. }) => {
                    prop_assert!(fit_nodes < rf);
                    prop_assert_eq!(fit, fit_nodes);
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
