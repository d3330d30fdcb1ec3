//! Fairness between organizations: which waiting deployment gets the next worker slot.
//!
//! Deployments that cannot be owned now (every slot of `worker.max_workers` busy, or their
//! organization at `worker.max_workers_per_org` here or `worker.max_workers_per_org_cluster`
//! in the cluster) wait here, in one queue per organization, and are admitted round-robin
//! across organizations as slots free: one flooding tenant's thousand conversations wait behind
//! each other, not in front of a second tenant's few. The record stays in PostgreSQL: this is
//! only the order; a daemon that dies loses it and adoption takes over.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Bound;

use super::*;

/// An organization as fairness counts it (`None`: turns without an organizationId).
pub(super) type Org = Option<String>;

/// Deployments remembered as waiting per daemon at most; past it they are left to adoption
/// (whose sweep offers them again). Bounds memory under a flood of new conversations at a
/// few bytes each.
const MAX_WAITING: usize = 10_000;

#[derive(Debug, Default)]
pub(super) struct Waiting {
    queues: BTreeMap<Org, VecDeque<DeploymentName>>,
    members: HashSet<DeploymentName>,
    /// The organization admitted last: the next admission looks at the ones after it first.
    last: Option<Org>,
    /// Organizations the cluster-wide cap refused: not tried again until a worker of theirs
    /// stops here or the next sweep round (else each refusal would be retried at once).
    blocked: HashSet<Org>,
}

impl Waiting {
    pub(super) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub(super) fn push(&mut self, org: Org, name: DeploymentName) {
        if self.members.len() >= MAX_WAITING || !self.members.insert(name.clone()) {
            return;
        }
        self.queues.entry(org).or_default().push_back(name);
    }

    /// Puts back one just taken (no room after all): first in line again.
    pub(super) fn push_front(&mut self, org: Org, name: DeploymentName) {
        if self.members.insert(name.clone()) {
            self.queues.entry(org).or_default().push_front(name);
        }
    }

    /// The next deployment, round-robin across the organizations that are not blocked and
    /// that `admissible` lets in.
    pub(super) fn next(
        &mut self,
        admissible: impl Fn(&Org) -> bool,
    ) -> Option<(Org, DeploymentName)> {
        let org = self.order().into_iter().find(|o| !self.blocked.contains(o) && admissible(o))?;
        let queue = self.queues.get_mut(&org)?;
        let name = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&org);
        }
        self.members.remove(&name);
        self.last = Some(org.clone());
        Some((org, name))
    }

    /// The organizations with waiting deployments, starting after the one admitted last.
    fn order(&self) -> Vec<Org> {
        match &self.last {
            Some(last) => self
                .queues
                .range((Bound::Excluded(last.clone()), Bound::Unbounded))
                .chain(self.queues.range(..=last.clone()))
                .map(|(o, _)| o.clone())
                .collect(),
            None => self.queues.keys().cloned().collect(),
        }
    }

    /// Whether some organization that is not blocked and satisfies `pred` has one waiting.
    pub(super) fn any(&self, pred: impl Fn(&Org) -> bool) -> bool {
        self.queues.keys().any(|o| !self.blocked.contains(o) && pred(o))
    }

    pub(super) fn contains(&self, name: &DeploymentName) -> bool {
        self.members.contains(name)
    }

    /// Whether one of `org` waits, blocked or not.
    pub(super) fn has(&self, org: &Org) -> bool {
        self.queues.contains_key(org)
    }

    /// Every deployment waiting, in no particular order.
    pub(super) fn into_names(self) -> Vec<DeploymentName> {
        self.members.into_iter().collect()
    }

    pub(super) fn orgs(&self) -> Vec<Org> {
        self.queues.keys().cloned().collect()
    }

    pub(super) fn block(&mut self, org: Org) {
        self.blocked.insert(org);
    }

    pub(super) fn unblock(&mut self, org: &Org) {
        self.blocked.remove(org);
    }

    pub(super) fn unblock_all(&mut self) {
        self.blocked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DeploymentName {
        DeploymentName::from_trusted(s.to_owned())
    }

    #[test]
    fn admission_goes_round_robin_across_organizations() {
        let mut w = Waiting::default();
        for i in 0..5 {
            w.push(Some("flood".into()), name(&format!("f{i}")));
        }
        w.push(Some("small".into()), name("s0"));
        w.push(Some("small".into()), name("s1"));
        w.push(None, name("n0"));
        w.push(Some("small".into()), name("s0")); // already waiting: once
        let order: Vec<String> =
            std::iter::from_fn(|| w.next(|_| true)).map(|(_, n)| n.as_str().to_owned()).collect();
        assert_eq!(order, ["n0", "f0", "s0", "f1", "s1", "f2", "f3", "f4"]);
        assert!(w.is_empty());
    }

    #[test]
    fn a_blocked_or_capped_organization_is_skipped_not_lost() {
        let mut w = Waiting::default();
        w.push(Some("a".into()), name("a0"));
        w.push(Some("b".into()), name("b0"));
        w.block(Some("a".into()));
        assert!(w.any(|_| true));
        let (_, n) = w.next(|_| true).unwrap();
        assert_eq!(n.as_str(), "b0");
        assert!(w.next(|_| true).is_none(), "a is blocked");
        assert!(!w.any(|_| true));
        w.unblock_all();
        assert!(w.next(|o| o.as_deref() != Some("a")).is_none(), "a is at its cap");
        let (org, n) = w.next(|_| true).unwrap();
        w.push_front(org, n);
        assert_eq!(w.next(|_| true).unwrap().1.as_str(), "a0");
    }
}
