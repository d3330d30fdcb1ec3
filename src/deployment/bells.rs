//! How an owner is told to look for queued turns: intake's in-memory nudge, a doorbell from
//! the thread queue (another daemon's intake), a fresh doorbell consumer, the sweep. A bell
//! may name the newest turn it rings for ([`Seq`]); an owner that already claimed that turn
//! ignores it, so a bell that arrives after the owner's commit took its turn in the same
//! statement costs no empty claim.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::store;
use crate::turn::{Epoch, Seq};

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

/// An idle owner's hand-off slot: intake claims the owner's next turn in the very statement
/// that arms it (`Store::arm_and_hand`) and hands it over here, where the owner would have
/// needed a claim of its own after the bell.
///
/// The owner opens it while idle with a live worker; intake reserves an open slot before its
/// arm statement and resolves the reservation after it (the claimed turn, or back to open);
/// the owner closes it on any wake. While intake holds it the owner neither claims nor stops
/// its worker: a turn claimed for it may be on its way.
#[derive(Debug, Default)]
pub(super) struct Slot(Mutex<SlotState>);

#[derive(Debug, Default)]
enum SlotState {
    #[default]
    Closed,
    /// Idle under this epoch: a turn may be claimed for it.
    Open(Epoch),
    /// Intake's arm statement may be claiming a turn for it.
    Reserved(Epoch),
    /// A turn claimed for it, running under its epoch.
    Given(Box<store::Claimed>),
}

/// What the owner found when it closed its slot.
#[derive(Debug)]
pub(super) enum Closing {
    Nothing,
    /// Intake holds a reservation: wait for its bell before claiming or stopping.
    Pending,
    Given(Box<store::Claimed>),
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Owner: idle, a turn may be claimed for it (a slot not closed stays as it is).
    pub(super) fn open(&self, epoch: Epoch) {
        let mut state = self.state();
        if matches!(*state, SlotState::Closed) {
            *state = SlotState::Open(epoch);
        }
    }

    /// Owner: takes no more hand-offs until opened again.
    pub(super) fn close(&self) -> Closing {
        let mut state = self.state();
        match std::mem::take(&mut *state) {
            SlotState::Closed | SlotState::Open(_) => Closing::Nothing,
            SlotState::Reserved(epoch) => {
                *state = SlotState::Reserved(epoch);
                Closing::Pending
            }
            SlotState::Given(claimed) => Closing::Given(claimed),
        }
    }

    pub(super) fn reserved(&self) -> bool {
        matches!(*self.state(), SlotState::Reserved(_))
    }

    /// Intake: reserves an open slot; the epoch to claim under.
    pub(super) fn reserve(&self) -> Option<Epoch> {
        let mut state = self.state();
        match *state {
            SlotState::Open(epoch) => {
                *state = SlotState::Reserved(epoch);
                Some(epoch)
            }
            _ => None,
        }
    }

    /// Intake: what its arm statement did for a reservation. The caller rings the owner.
    pub(super) fn resolve(&self, claimed: Option<store::Claimed>) {
        let mut state = self.state();
        if let SlotState::Reserved(epoch) = *state {
            *state = match claimed {
                Some(claimed) => SlotState::Given(Box::new(claimed)),
                None => SlotState::Open(epoch),
            };
        }
    }
}
