//! Membership and routing from link-state reports: every member floods a
//! report of its authenticated neighbours; each node keeps the newest report
//! per member, and the members are those reachable from itself over links
//! both ends report. Routes are shortest paths, ties broken by name, so a
//! closed ring that loses a cable routes the other way.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::Advert;

/// A member's report of itself, flooded over the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The member.
    pub origin: String,
    /// When the member's process started (µs since the epoch): a restart
    /// supersedes every report of the previous run.
    pub incarnation: u64,
    /// Counts the member's reports within one incarnation.
    pub seq: u64,
    /// What the member offers.
    pub advert: Advert,
    /// The members it has an authenticated link to.
    pub neighbours: BTreeSet<String>,
}

impl Report {
    fn version(&self) -> (u64, u64) {
        (self.incarnation, self.seq)
    }
}

/// One member of the ring as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// What the member offers.
    pub advert: Advert,
    /// Its neighbours that are members too (links both ends report).
    pub neighbours: BTreeSet<String>,
}

/// The live, authenticated members of the ring, this node included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Counts this node's changes of the view (local: nodes' epochs differ;
    /// compare `members`, which every node of one ring computes alike).
    pub epoch: u64,
    /// The members by node name.
    pub members: BTreeMap<String, Member>,
}

/// The newest report of every member this node has heard of.
#[derive(Debug)]
pub(crate) struct Topology {
    me: String,
    reports: BTreeMap<String, Report>,
}

/// Members and, for every other member, the neighbour to send through.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct View {
    pub members: BTreeMap<String, Member>,
    pub next_hop: BTreeMap<String, String>,
}

impl Topology {
    /// A topology holding only `own`, this node's report.
    pub fn new(own: Report) -> Self {
        let me = own.origin.clone();
        Topology {
            me,
            reports: BTreeMap::from([(own.origin.clone(), own)]),
        }
    }

    /// This node's current report.
    pub fn own(&self) -> &Report {
        &self.reports[&self.me]
    }

    /// Replaces this node's report with a newer one (sequence number bumped).
    pub fn update_own(&mut self, advert: Advert, neighbours: BTreeSet<String>) -> Report {
        let own = self.reports.get_mut(&self.me).expect("own report");
        own.seq += 1;
        own.advert = advert;
        own.neighbours = neighbours;
        own.clone()
    }

    /// Takes a report heard from a neighbour; whether it was new (then it is
    /// passed on). Reports about this node itself are never taken.
    pub fn accept(&mut self, report: Report) -> bool {
        if report.origin == self.me {
            return false;
        }
        match self.reports.get(&report.origin) {
            Some(known) if known.version() >= report.version() => false,
            _ => {
                self.reports.insert(report.origin.clone(), report);
                true
            }
        }
    }

    /// Every report held, for a new neighbour.
    pub fn reports(&self) -> impl Iterator<Item = &Report> {
        self.reports.values()
    }

    fn linked(&self, a: &str, b: &str) -> bool {
        let reports = |x: &str, y: &str| {
            self.reports
                .get(x)
                .is_some_and(|r| r.neighbours.contains(y))
        };
        reports(a, b) && reports(b, a)
    }

    /// The members reachable from this node and the routes to them; reports
    /// of members no longer reachable are forgotten.
    pub fn view(&mut self) -> View {
        let mut next_hop: BTreeMap<String, String> = BTreeMap::new();
        let mut seen = BTreeSet::from([self.me.clone()]);
        let mut queue = VecDeque::from([self.me.clone()]);
        while let Some(node) = queue.pop_front() {
            let neighbours = self.reports[&node].neighbours.clone();
            for next in neighbours {
                if seen.contains(&next)
                    || !self.reports.contains_key(&next)
                    || !self.linked(&node, &next)
                {
                    continue;
                }
                let hop = if node == self.me {
                    next.clone()
                } else {
                    next_hop[&node].clone()
                };
                next_hop.insert(next.clone(), hop);
                seen.insert(next.clone());
                queue.push_back(next);
            }
        }
        self.reports.retain(|name, _| seen.contains(name));
        let members = self
            .reports
            .values()
            .map(|r| {
                let neighbours = r
                    .neighbours
                    .iter()
                    .filter(|n| seen.contains(*n) && self.linked(&r.origin, n))
                    .cloned()
                    .collect();
                (
                    r.origin.clone(),
                    Member {
                        advert: r.advert.clone(),
                        neighbours,
                    },
                )
            })
            .collect();
        View { members, next_hop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(origin: &str, seq: u64, neighbours: &[&str]) -> Report {
        Report {
            origin: origin.into(),
            incarnation: 1,
            seq,
            advert: Advert::default(),
            neighbours: neighbours.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn topology(me: &str, reports: &[Report]) -> Topology {
        let mut t = Topology::new(reports.iter().find(|r| r.origin == me).unwrap().clone());
        for r in reports {
            t.accept(r.clone());
        }
        t
    }

    #[test]
    fn a_chain_routes_through_the_middle() {
        let mut t = topology(
            "a",
            &[
                report("a", 1, &["b"]),
                report("b", 1, &["a", "c"]),
                report("c", 1, &["b"]),
            ],
        );
        let view = t.view();
        assert_eq!(view.members.len(), 3);
        assert_eq!(view.next_hop["c"], "b");
        assert_eq!(view.next_hop["b"], "b");
    }

    #[test]
    fn a_ring_with_one_cut_cable_routes_the_other_way() {
        let ring = [
            report("a", 1, &["b", "d"]),
            report("b", 1, &["a", "c"]),
            report("c", 1, &["b", "d"]),
            report("d", 1, &["c", "a"]),
        ];
        assert_eq!(topology("a", &ring).view().next_hop["b"], "b");
        // the a-b cable is cut: a's and b's new reports drop each other
        let mut t = topology("a", &ring);
        t.update_own(Advert::default(), ["d".to_string()].into());
        assert!(t.accept(report("b", 2, &["c"])));
        let view = t.view();
        assert_eq!(view.members.len(), 4);
        assert_eq!(view.next_hop["b"], "d");
        assert_eq!(view.next_hop["c"], "d");
    }

    #[test]
    fn a_link_only_one_end_reports_is_not_used_and_unreachable_members_are_forgotten() {
        let mut t = topology(
            "a",
            &[
                report("a", 1, &["b"]),
                report("b", 1, &[]),
                report("c", 1, &["b"]),
            ],
        );
        let view = t.view();
        assert_eq!(view.members.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(t.reports().count(), 1);
    }

    #[test]
    fn older_and_repeated_reports_are_ignored_and_a_restart_supersedes() {
        let mut t = topology("a", &[report("a", 1, &["b"]), report("b", 5, &["a"])]);
        assert!(!t.accept(report("b", 5, &[])));
        assert!(!t.accept(report("b", 4, &[])));
        let mut restarted = report("b", 1, &["a"]);
        restarted.incarnation = 2;
        assert!(t.accept(restarted));
        assert!(
            !t.accept(report("a", 9, &[])),
            "nobody speaks for this node"
        );
    }
}
