//! How an owner is told to look for queued turns: intake's in-memory nudge, a doorbell from
//! the thread queue (another daemon's intake), a fresh doorbell consumer, the sweep. A bell
//! may name the newest turn it rings for ([`Seq`]); an owner that already claimed that turn
//! ignores it, so a bell that arrives after the owner's commit took its turn in the same
//! statement costs no empty claim.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::turn::Seq;

/// Bells rung since the owner last looked, and the wake-up.
#[derive(Debug, Default)]
pub(super) struct Bells {
    rung: Mutex<Rung>,
    notify: Notify,
}

/// What rang since the owner last took them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Rung {
    /// A bell that names no turn (or too many named ones to keep): look in any case.
    pub(super) plain: bool,
    pub(super) seqs: Vec<Seq>,
}

/// Named bells kept between two looks; more make the next look unconditional.
const MAX_NAMED: usize = 64;

impl Bells {
    /// Rings for `seq` (None: whatever is queued).
    pub(super) fn ring(&self, seq: Option<Seq>) {
        {
            let mut rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
            match seq {
                Some(seq) if !rung.plain && rung.seqs.len() < MAX_NAMED => rung.seqs.push(seq),
                _ => {
                    rung.plain = true;
                    rung.seqs.clear();
                }
            }
        }
        self.notify.notify_one();
    }

    /// Resolves once a bell rang (at once when one rang since the last wait).
    pub(super) async fn rang(&self) {
        self.notify.notified().await
    }

    /// Takes what rang.
    pub(super) fn take(&self) -> Rung {
        std::mem::take(&mut *self.rung.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The turns an owner claimed lately, to tell a stale bell from one it must answer.
#[derive(Debug, Default)]
pub(super) struct Claimed {
    recent: VecDeque<Seq>,
}

/// Claims remembered: far more than the bells that can be in flight for one deployment (one
/// per intake batch that held its turns); one forgotten costs a look that finds nothing.
const REMEMBERED: usize = 256;

impl Claimed {
    pub(super) fn push(&mut self, seq: Seq) {
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back(seq);
    }

    /// Whether `rung` may name a turn this owner has not claimed (then it must look).
    pub(super) fn must_look(&self, rung: &Rung) -> bool {
        rung.plain || rung.seqs.iter().any(|s| !self.recent.contains(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bell_for_a_turn_already_claimed_needs_no_look() {
        let bells = Bells::default();
        let mut claimed = Claimed::default();
        claimed.push(Seq::new(7));
        bells.ring(Some(Seq::new(7)));
        bells.rang().await; // the permit was stored
        let rung = bells.take();
        assert_eq!(rung, Rung { plain: false, seqs: vec![Seq::new(7)] });
        assert!(!claimed.must_look(&rung));
        // A turn it did not claim, or a bell naming none, needs a look.
        bells.ring(Some(Seq::new(8)));
        assert!(claimed.must_look(&bells.take()));
        bells.ring(None);
        assert!(claimed.must_look(&bells.take()));
        assert!(!claimed.must_look(&bells.take()), "taken: nothing rang since");
    }

    #[test]
    fn too_many_named_bells_become_a_plain_one_and_old_claims_are_forgotten() {
        let bells = Bells::default();
        for s in 0..=MAX_NAMED as i64 {
            bells.ring(Some(Seq::new(s)));
        }
        let rung = bells.take();
        assert!(rung.plain && rung.seqs.is_empty());
        let mut claimed = Claimed::default();
        for s in 0..=REMEMBERED as i64 {
            claimed.push(Seq::new(s));
        }
        let oldest = Rung { plain: false, seqs: vec![Seq::new(0)] };
        assert!(claimed.must_look(&oldest), "forgotten: look rather than miss it");
        let newest = Rung { plain: false, seqs: vec![Seq::new(REMEMBERED as i64)] };
        assert!(!claimed.must_look(&newest));
    }
}
