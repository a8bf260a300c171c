//! Group commit of charges: concurrent queries are charged in one ledger transaction and
//! one durable commit, instead of one each.
//!
//! The first query to arrive while no commit is running becomes the leader: on a blocking
//! thread (so no async worker waits on the disk), it takes every charge queued so far,
//! charges them together with [`Ledger::charge_many`], answers each, and repeats while
//! more arrived during its commit. Each query waits for its own answer, which comes only
//! after the commit that holds its charge: a query is still charged, durably, before any
//! node has its request. Charges in one transaction are checked in order against the
//! budgets the ones before them left, so a group never overspends.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{BudgetStatus, Charge, Ledger, QueryRecord};
use crate::error::CoordinatorError;

type Outcome = Result<(Charge, BudgetStatus), CoordinatorError>;

/// One queued charge and where its outcome goes.
struct Pending {
    query: QueryRecord,
    sites: Vec<String>,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// Whether a leader is committing (and will take what is queued).
    leading: bool,
}

/// The charges waiting for the next group commit.
pub struct ChargeQueue {
    ledger: Arc<Ledger>,
    queue: Mutex<Queue>,
}

impl std::fmt::Debug for ChargeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChargeQueue").finish_non_exhaustive()
    }
}

/// Ends a leader's turn however it ends: if it unwinds, the charges still queued are
/// dropped (each of their queries gets an error, none is charged) and the next query
/// leads.
struct Turn<'a>(&'a ChargeQueue);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // A turn that ends normally has handed over already (see `lead`).
        if std::thread::panicking() {
            let mut q = self.0.queue();
            q.leading = false;
            q.pending.clear();
        }
    }
}

impl ChargeQueue {
    /// A queue in front of `ledger`.
    pub fn new(ledger: Arc<Ledger>) -> Arc<ChargeQueue> {
        Arc::new(ChargeQueue {
            ledger,
            queue: Mutex::new(Queue::default()),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue is left consistent at every unlock, so a poisoned lock holds a usable
        // queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Charge `query` (as [`Ledger::charge`]) in the next group commit, and wait for it.
    pub async fn charge(self: &Arc<Self>, query: QueryRecord, sites: Vec<String>) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut q = self.queue();
            q.pending.push(Pending {
                query,
                sites,
                reply,
            });
            !std::mem::replace(&mut q.leading, true)
        };
        if lead {
            let this = Arc::clone(self);
            // The join handle is not awaited: the leader answers every query itself.
            drop(tokio::task::spawn_blocking(move || this.lead()));
        }
        answer.await.unwrap_or_else(|_| {
            Err(CoordinatorError::LedgerUnavailable(
                "the ledger's commit did not finish; nothing was charged for this query. Retry it"
                    .into(),
            ))
        })
    }

    /// Commit groups until the queue is empty.
    fn lead(&self) {
        let _turn = Turn(self);
        loop {
            let group = {
                let mut q = self.queue();
                if q.pending.is_empty() {
                    q.leading = false;
                    return;
                }
                std::mem::take(&mut q.pending)
            };
            let items: Vec<(&QueryRecord, &[String])> = group
                .iter()
                .map(|p| (&p.query, p.sites.as_slice()))
                .collect();
            let outcomes = self.ledger.charge_many(&items);
            drop(items);
            for (p, outcome) in group.into_iter().zip(outcomes) {
                // A query that stopped waiting (its client left) keeps its charge: the
                // ledger settles it as a crash would, spent and never refunded.
                let _ = p.reply.send(outcome);
            }
        }
    }
}
