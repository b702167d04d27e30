//! The ring's plan: which nodes serve, in which order, which layers each.
//!
//! Pure and deterministic: every node computes it from the same membership
//! view and gets the same answer. Integer arithmetic only (no float rounding
//! that could differ between machines).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use sovereign_inference::Footprint;

/// Every stage reserves KV cache for this many positions of its layers (for
/// example four requests of 2048 tokens); the entry node admits requests
/// within it.
pub const KV_POSITIONS: u64 = 8192;

/// A kernel instruction set, from the least to the most capable. A ring runs
/// the best one that every member supports, so no result depends on which
/// node runs which layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Portable code.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI.
    Avx512,
}

impl Isa {
    /// The kernels' instruction set.
    pub fn kernels(self) -> sovereign_kernels::Isa {
        match self {
            Isa::Scalar => sovereign_kernels::Isa::Scalar,
            Isa::Avx2 => sovereign_kernels::Isa::Avx2,
            Isa::Avx512 => sovereign_kernels::Isa::Avx512,
        }
    }

    /// The best instruction set of this CPU.
    pub fn detect() -> Self {
        match sovereign_kernels::Isa::detect() {
            sovereign_kernels::Isa::Scalar => Isa::Scalar,
            sovereign_kernels::Isa::Avx2 => Isa::Avx2,
            sovereign_kernels::Isa::Avx512 => Isa::Avx512,
        }
    }

    /// Its name in adverts: `scalar`, `avx2`, `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses an advert's name; `None` for one this build does not know.
    pub fn parse(name: &str) -> Option<Self> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|isa| isa.name() == name)
    }
}

/// What one member offers, from its advert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The node's name (unique in the cluster).
    pub name: String,
    /// Bytes it may use for weights and KV cache.
    pub memory_budget: u64,
    /// The versions it holds of the planned model (`1.0.0`, ...).
    pub versions: Vec<semver::Version>,
    /// Its best kernel instruction set.
    pub isa: Isa,
}

/// One node's part of the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The node.
    pub node: String,
    /// Its contiguous layer range.
    pub layers: Range<usize>,
}

/// The plan every member computes alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The model version all stages load.
    pub version: semver::Version,
    /// The instruction set every stage's kernels use.
    pub isa: Isa,
    /// The stages in ring order: the first embeds, the last applies the head.
    pub stages: Vec<Stage>,
    /// Members left out, with the reason.
    pub left_out: BTreeMap<String, String>,
}

impl Plan {
    /// The stage of `node`, if it serves.
    pub fn stage_of(&self, node: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.node == node)
    }

    /// The node after `node` in ring order (`None` for the last stage).
    pub fn next(&self, node: &str) -> Option<&str> {
        let at = self.stages.iter().position(|s| s.node == node)?;
        self.stages.get(at + 1).map(|s| s.node.as_str())
    }

    /// The first stage's node.
    pub fn first(&self) -> &str {
        &self.stages[0].node
    }

    /// The last stage's node.
    pub fn last(&self) -> &str {
        &self.stages[self.stages.len() - 1].node
    }

    /// A short name for this plan, the same on every node that computed it:
    /// frames carry it so that no stage runs a step of another plan.
    pub fn id(&self) -> u64 {
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        let hash = blake3::hash(&bytes);
        let mut id = [0u8; 8];
        id.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(id)
    }
}

/// Why no plan serves the model.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No member holds any version of the model.
    #[error("no member holds the model")]
    NoModel,
    /// The members that hold the model cannot hold all its layers together.
    #[error("the members' memory budgets cannot hold the model ({}); left out: {}", .short, .left_out.iter().map(|(n, r)| format!("{n}: {r}")).collect::<Vec<_>>().join("; "))]
    DoesNotFit {
        /// What is missing.
        short: String,
        /// Members left out and why.
        left_out: BTreeMap<String, String>,
    },
}

/// Bytes a stage of `layers` layers needs besides its fixed parts.
fn per_layer(f: &Footprint) -> u64 {
    f.layer_bytes + f.kv_bytes_per_position * KV_POSITIONS
}

struct Mib(u64);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0.div_ceil(1 << 20))
    }
}

/// Which version the ring serves: the one held by the most members, the
/// newest among equals.
pub fn choose_version(candidates: &[Candidate]) -> Option<semver::Version> {
    let mut holders: BTreeMap<&semver::Version, usize> = BTreeMap::new();
    for c in candidates {
        for v in &c.versions {
            *holders.entry(v).or_default() += 1;
        }
    }
    holders
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)))
        .map(|(v, _)| v.clone())
}

/// Computes the plan for `version` of a model whose stages hold `footprint`.
///
/// Ring order is by node name. Each node's share of the layers is in
/// proportion to what its budget leaves for layers once the embedding (first
/// stage) and the head (last stage) are counted, by the largest-remainder
/// method, at least one layer each and never more than it can hold with its
/// share of KV cache ([`KV_POSITIONS`] per layer). A node that cannot hold one
/// layer, that lacks the version, or that is beyond one node per layer is left
/// out with the reason.
pub fn compute(
    version: &semver::Version,
    footprint: &Footprint,
    candidates: &[Candidate],
) -> Result<Plan, PlanError> {
    let mut left_out = BTreeMap::new();
    let mut members: Vec<&Candidate> = Vec::new();
    for c in candidates {
        if c.versions.contains(version) {
            members.push(c);
        } else {
            left_out.insert(c.name.clone(), format!("does not hold version {version}"));
        }
    }
    if members.is_empty() {
        return Err(PlanError::NoModel);
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let per_layer = per_layer(footprint);
    // Leave out, one at a time, the node that cannot hold one layer in its
    // place (first and last stages also hold the embedding and head); the
    // smallest budget goes first when there are more nodes than layers.
    loop {
        let n = members.len();
        if n > footprint.layers {
            let smallest = (0..n)
                .min_by(|&a, &b| {
                    members[a]
                        .memory_budget
                        .cmp(&members[b].memory_budget)
                        .then(members[b].name.cmp(&members[a].name))
                })
                .unwrap_or(0);
            let gone = members.remove(smallest);
            left_out.insert(
                gone.name.clone(),
                format!("the model has only {} layers", footprint.layers),
            );
            continue;
        }
        let short = (0..n).find(|&i| capacity(footprint, per_layer, members[i], i, n) == 0);
        match short {
            Some(i) => {
                let gone = members.remove(i);
                left_out.insert(
                    gone.name.clone(),
                    format!(
                        "a memory budget of {} cannot hold one layer with its KV cache ({}){}",
                        Mib(gone.memory_budget),
                        Mib(per_layer),
                        fixed_note(footprint, i, n)
                    ),
                );
                if members.is_empty() {
                    return Err(PlanError::DoesNotFit {
                        short: format!("{} layers", footprint.layers),
                        left_out,
                    });
                }
            }
            None => break,
        }
    }
    let n = members.len();
    let caps: Vec<u64> = (0..n)
        .map(|i| capacity(footprint, per_layer, members[i], i, n))
        .collect();
    let total_cap: u64 = caps.iter().sum();
    let layers = footprint.layers as u64;
    if total_cap < layers {
        return Err(PlanError::DoesNotFit {
            short: format!("room for {total_cap} of {layers} layers"),
            left_out,
        });
    }
    let room: Vec<u64> = (0..n)
        .map(|i| members[i].memory_budget - fixed(footprint, i, n))
        .collect();
    let counts = apportion(layers, &room, &caps);
    let mut start = 0usize;
    let stages = members
        .iter()
        .zip(&counts)
        .map(|(m, &count)| {
            let range = start..start + count as usize;
            start = range.end;
            Stage {
                node: m.name.clone(),
                layers: range,
            }
        })
        .collect();
    let isa = members.iter().map(|m| m.isa).min().unwrap_or(Isa::Scalar);
    Ok(Plan {
        version: version.clone(),
        isa,
        stages,
        left_out,
    })
}

/// Bytes of the embedding and head that position `i` of `n` holds.
fn fixed(f: &Footprint, i: usize, n: usize) -> u64 {
    let mut bytes = 0;
    if i == 0 {
        bytes += f.embed_bytes;
    }
    if i + 1 == n {
        bytes += f.head_bytes;
    }
    bytes
}

fn fixed_note(f: &Footprint, i: usize, n: usize) -> String {
    match (i == 0, i + 1 == n) {
        (true, true) => format!(" besides the embedding and head ({})", Mib(fixed(f, i, n))),
        (true, false) => format!(" besides the embedding ({})", Mib(f.embed_bytes)),
        (false, true) => format!(" besides the head ({})", Mib(f.head_bytes)),
        (false, false) => String::new(),
    }
}

/// Layers member `c` can hold at position `i` of `n`.
fn capacity(f: &Footprint, per_layer: u64, c: &Candidate, i: usize, n: usize) -> u64 {
    c.memory_budget.saturating_sub(fixed(f, i, n)) / per_layer.max(1)
}

/// Splits `total` into parts proportional to `weights` by the largest
/// remainder method (ties to the earlier part), with every part at least 1
/// and at most its cap: a part outside those bounds is pinned to the bound and
/// the rest is apportioned again among the others. Requires
/// `1 <= parts <= total <= sum(caps)` and every cap at least 1.
fn apportion(total: u64, weights: &[u64], caps: &[u64]) -> Vec<u64> {
    let n = weights.len();
    let mut pinned: Vec<Option<u64>> = vec![None; n];
    loop {
        let free: Vec<usize> = (0..n).filter(|&i| pinned[i].is_none()).collect();
        let rest = total - pinned.iter().flatten().sum::<u64>();
        if free.is_empty() {
            // Every part is pinned: what is left goes to parts with room.
            let mut counts: Vec<u64> = pinned.iter().map(|p| p.unwrap_or(0)).collect();
            let mut rest = rest;
            for i in 0..n {
                let more = rest.min(caps[i] - counts[i]);
                counts[i] += more;
                rest -= more;
            }
            return counts;
        }
        let shares = largest_remainder(rest, &free.iter().map(|&i| weights[i]).collect::<Vec<_>>());
        let over: Vec<usize> = free
            .iter()
            .zip(&shares)
            .filter(|&(&i, &c)| c > caps[i])
            .map(|(&i, _)| i)
            .collect();
        let zero: Vec<usize> = free
            .iter()
            .zip(&shares)
            .filter(|&(_, &c)| c == 0)
            .map(|(&i, _)| i)
            .collect();
        if !over.is_empty() {
            over.into_iter().for_each(|i| pinned[i] = Some(caps[i]));
        } else if !zero.is_empty() {
            zero.into_iter().for_each(|i| pinned[i] = Some(1));
        } else {
            let mut counts: Vec<u64> = pinned.iter().map(|p| p.unwrap_or(0)).collect();
            free.iter().zip(shares).for_each(|(&i, c)| counts[i] = c);
            return counts;
        }
    }
}

/// `total` split in proportion to `weights` (equally if they are all zero):
/// floors first, then one more to the largest remainders, ties to the earlier.
fn largest_remainder(total: u64, weights: &[u64]) -> Vec<u64> {
    let all_zero = weights.iter().all(|&w| w == 0);
    let w = |i: usize| if all_zero { 1 } else { u128::from(weights[i]) };
    let sum: u128 = (0..weights.len()).map(w).sum::<u128>().max(1);
    let mut counts = Vec::with_capacity(weights.len());
    let mut rems = Vec::with_capacity(weights.len());
    for i in 0..weights.len() {
        let exact = u128::from(total) * w(i);
        counts.push((exact / sum) as u64);
        rems.push((exact % sum, i));
    }
    let left = total - counts.iter().sum::<u64>();
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    rems.iter()
        .take(left as usize)
        .for_each(|&(_, i)| counts[i] += 1);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The demo model's numbers (SmolLM2-135M Q4_1, see `Footprint::of`).
    fn demo() -> Footprint {
        Footprint {
            layers: 30,
            layer_bytes: 2_270_000,
            embed_bytes: 49152 * 576 * 4,
            head_bytes: 576 * 4 + 49152 * 576 / 32 * 34,
            kv_bytes_per_position: 1536,
        }
    }

    fn v(s: &str) -> semver::Version {
        semver::Version::parse(s).unwrap()
    }

    fn node(name: &str, mib: u64) -> Candidate {
        Candidate {
            name: name.into(),
            memory_budget: mib * MIB,
            versions: vec![v("1.0.0")],
            isa: Isa::Avx2,
        }
    }

    fn ranges(plan: &Plan) -> Vec<(&str, Range<usize>)> {
        plan.stages
            .iter()
            .map(|s| (s.node.as_str(), s.layers.clone()))
            .collect()
    }

    fn check(nodes: &[Candidate], expected: &[(&str, Range<usize>)]) -> Plan {
        let plan = compute(&v("1.0.0"), &demo(), nodes).unwrap();
        assert_eq!(ranges(&plan), expected);
        plan
    }

    #[test]
    fn equal_budgets_split_what_is_left_after_embedding_and_head() {
        // per layer: 2.27 MB + 8192 * 1536 = 14.85 MB; the first holds the
        // 113 MiB f32 embedding, the last the 30 MiB head.
        check(&[node("a", 4096)], &[("a", 0..30)]);
        let plan = check(
            &[node("b", 400), node("a", 400), node("c", 400)],
            &[("a", 0..8), ("b", 8..19), ("c", 19..30)],
        );
        assert_eq!(plan.next("a"), Some("b"));
        assert_eq!(plan.next("c"), None);
        assert_eq!(plan.first(), "a");
        check(
            &[node("a", 400), node("b", 400)],
            &[("a", 0..13), ("b", 13..30)],
        );
    }

    #[test]
    fn shares_follow_budgets_and_caps_by_largest_remainder() {
        // Rooms 1892, 1000 and 971 MiB: shares 14.69, 7.77 and 7.54 layers;
        // floors 14, 7, 7 and the two left to the largest remainders (b, a).
        check(
            &[node("a", 2000), node("b", 1000), node("c", 1000)],
            &[("a", 0..15), ("b", 15..23), ("c", 23..30)],
        );
        // b's share rounds to none, but every member holds at least one layer.
        check(
            &[node("a", 4000), node("b", 90), node("c", 4000)],
            &[("a", 0..14), ("b", 14..15), ("c", 15..30)],
        );
        // The same view in any order gives the same plan.
        let mut nodes = vec![node("x", 700), node("y", 300), node("z", 512)];
        let first = compute(&v("1.0.0"), &demo(), &nodes).unwrap();
        nodes.reverse();
        assert_eq!(compute(&v("1.0.0"), &demo(), &nodes).unwrap(), first);
        let total: usize = first.stages.iter().map(|s| s.layers.len()).sum();
        assert_eq!(total, 30);
        assert!(first.stages.iter().all(|s| !s.layers.is_empty()));
    }

    #[test]
    fn a_node_that_cannot_hold_a_layer_is_left_out_with_the_reason() {
        // Rooms 492 and 571 MiB: 13.88 and 16.12 layers, the remainder to a.
        let plan = check(
            &[node("a", 600), node("b", 10), node("c", 600)],
            &[("a", 0..14), ("c", 14..30)],
        );
        let reason = &plan.left_out["b"];
        assert!(reason.contains("10 MiB cannot hold one layer"), "{reason}");
        // As last stage it would also need the head.
        let plan = check(&[node("a", 600), node("z", 40)], &[("a", 0..30)]);
        assert!(plan.left_out["z"].contains("besides the head"), "{plan:?}");
    }

    #[test]
    fn the_plan_refuses_when_the_ring_cannot_hold_the_model() {
        let err = compute(&v("1.0.0"), &demo(), &[node("a", 200), node("b", 200)]).unwrap_err();
        assert!(
            matches!(&err, PlanError::DoesNotFit { short, .. } if short.contains("of 30 layers")),
            "{err}"
        );
        let err = compute(&v("1.0.0"), &demo(), &[node("a", 5)]).unwrap_err();
        assert!(
            err.to_string().contains("a: a memory budget of 5 MiB"),
            "{err}"
        );
    }

    #[test]
    fn only_holders_of_the_version_serve_with_their_common_isa() {
        let mut old = node("b", 800);
        old.versions = vec![v("0.9.0")];
        let mut fast = node("c", 800);
        fast.isa = Isa::Avx512;
        let nodes = [node("a", 800), old.clone(), fast];
        assert_eq!(choose_version(&nodes), Some(v("1.0.0")));
        let plan = check(&nodes, &[("a", 0..14), ("c", 14..30)]);
        assert_eq!(plan.left_out["b"], "does not hold version 1.0.0");
        assert_eq!(plan.isa, Isa::Avx2);
        // With only the newer ones as Avx512 the ring runs Avx512.
        let mut d = node("d", 800);
        d.isa = Isa::Avx512;
        let mut e = d.clone();
        e.name = "e".into();
        assert_eq!(
            compute(&v("1.0.0"), &demo(), &[d, e]).unwrap().isa,
            Isa::Avx512
        );
        // Equal holders: the newest version wins.
        let mut new = node("n", 800);
        new.versions = vec![v("2.0.0")];
        assert_eq!(choose_version(&[old, new]), Some(v("2.0.0")));
        assert_eq!(choose_version(&[]), None);
    }

    #[test]
    fn more_nodes_than_layers_leaves_the_smallest_out() {
        let mut f = demo();
        f.layers = 2;
        let nodes = [node("a", 800), node("b", 300), node("c", 800)];
        let plan = compute(&v("1.0.0"), &f, &nodes).unwrap();
        assert_eq!(ranges(&plan), [("a", 0..1), ("c", 1..2)]);
        assert_eq!(plan.left_out["b"], "the model has only 2 layers");
    }

    #[test]
    fn apportion_is_largest_remainder_within_caps() {
        assert_eq!(apportion(10, &[1, 1, 1], &[10, 10, 10]), [4, 3, 3]);
        assert_eq!(apportion(10, &[5, 3, 2], &[10, 10, 10]), [5, 3, 2]);
        // 30 by 47:33:20 is 14.1, 9.9, 6: floors 14, 9, 6 and the remainder to 9.9.
        assert_eq!(apportion(30, &[47, 33, 20], &[30, 30, 30]), [14, 10, 6]);
        assert_eq!(apportion(7, &[100, 1], &[3, 10]), [3, 4]);
        assert_eq!(apportion(10, &[1000, 1, 1], &[10, 10, 10]), [8, 1, 1]);
        assert_eq!(apportion(6, &[0, 0], &[10, 10]), [3, 3]);
    }
}
