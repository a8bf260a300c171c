//! Privacy budgets.
//!
//! [`BudgetLedger`] is the interface the coordinator charges through. Charging happens after
//! every node has answered and BEFORE any noisy value is sampled or released; a query that
//! fails after charging but before release is refunded through the [`Charge`] it got.
//!
//! This issue ships [`MemoryLedger`], which is atomic (one mutex) but not durable: budgets
//! reset when the coordinator restarts. The durable SQLite ledger implements the same trait.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::CoordinatorError;

/// A researcher's budget state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BudgetStatus {
    /// Researcher name.
    pub researcher: String,
    /// Total ε granted.
    pub epsilon_budget: f64,
    /// ε spent so far.
    pub epsilon_spent: f64,
    /// ε remaining.
    pub epsilon_remaining: f64,
}

/// Proof of a charge, used to refund a query that failed before release.
#[derive(Debug, PartialEq)]
#[must_use = "a charge must be released or refunded"]
pub struct Charge {
    /// Researcher charged.
    pub researcher: String,
    /// ε charged.
    pub epsilon: f64,
    /// Query id the charge belongs to.
    pub query_id: String,
}

/// Where budgets live. Implementations must make `charge` atomic: two concurrent charges
/// never both succeed if together they exceed the budget.
pub trait BudgetLedger: Send + Sync {
    /// Charge `epsilon` to `researcher`, or fail with [`CoordinatorError::BudgetExhausted`]
    /// without charging anything.
    fn charge(
        &self,
        researcher: &str,
        epsilon: f64,
        query_id: &str,
    ) -> Result<Charge, CoordinatorError>;
    /// Give back a charge whose query released nothing. Called at most once per charge.
    fn refund(&self, charge: Charge) -> Result<(), CoordinatorError>;
    /// Mark a charge as released (never refundable afterwards).
    fn released(&self, charge: Charge) -> Result<(), CoordinatorError>;
    /// Budget of one researcher.
    fn status(&self, researcher: &str) -> Result<BudgetStatus, CoordinatorError>;
}

/// In-memory ledger: atomic, not durable.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<HashMap<String, (f64, f64)>>,
}

impl MemoryLedger {
    /// A ledger with these (researcher, budget) grants.
    pub fn new(grants: impl IntoIterator<Item = (String, f64)>) -> Self {
        MemoryLedger {
            inner: Mutex::new(grants.into_iter().map(|(r, b)| (r, (b, 0.0))).collect()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (f64, f64)>> {
        // A poisoned lock only means another thread panicked mid-update of plain numbers;
        // the map is still consistent, so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unknown(researcher: &str) -> CoordinatorError {
    CoordinatorError::Unauthenticated(format!(
        "researcher {researcher} has no budget; ask your privacy officer to grant one"
    ))
}

impl BudgetLedger for MemoryLedger {
    fn charge(
        &self,
        researcher: &str,
        epsilon: f64,
        query_id: &str,
    ) -> Result<Charge, CoordinatorError> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "ε must be a positive number, got {epsilon}"
            )));
        }
        let mut map = self.lock();
        let (budget, spent) = map.get_mut(researcher).ok_or_else(|| unknown(researcher))?;
        // Compare with a tiny tolerance so that spending exactly the budget in steps that do
        // not add up exactly in binary floating point is still allowed.
        if *spent + epsilon > *budget * (1.0 + 1e-12) {
            return Err(CoordinatorError::BudgetExhausted {
                requested: epsilon,
                remaining: (*budget - *spent).max(0.0),
                total: *budget,
            });
        }
        *spent += epsilon;
        Ok(Charge {
            researcher: researcher.to_string(),
            epsilon,
            query_id: query_id.to_string(),
        })
    }

    fn refund(&self, charge: Charge) -> Result<(), CoordinatorError> {
        let mut map = self.lock();
        let (_, spent) = map
            .get_mut(&charge.researcher)
            .ok_or_else(|| unknown(&charge.researcher))?;
        *spent = (*spent - charge.epsilon).max(0.0);
        Ok(())
    }

    fn released(&self, _charge: Charge) -> Result<(), CoordinatorError> {
        Ok(())
    }

    fn status(&self, researcher: &str) -> Result<BudgetStatus, CoordinatorError> {
        let map = self.lock();
        let (budget, spent) = map.get(researcher).ok_or_else(|| unknown(researcher))?;
        Ok(BudgetStatus {
            researcher: researcher.to_string(),
            epsilon_budget: *budget,
            epsilon_spent: *spent,
            epsilon_remaining: (*budget - *spent).max(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn charges_refunds_and_refuses() {
        let l = MemoryLedger::new([("a".to_string(), 1.0)]);
        let c = l.charge("a", 0.6, "q1").unwrap();
        assert!(matches!(
            l.charge("a", 0.5, "q2"),
            Err(CoordinatorError::BudgetExhausted { .. })
        ));
        l.refund(c).unwrap();
        let c2 = l.charge("a", 1.0, "q3").unwrap();
        l.released(c2).unwrap();
        assert_eq!(l.status("a").unwrap().epsilon_remaining, 0.0);
        assert!(l.charge("nobody", 0.1, "q").is_err());
        assert!(l.charge("a", f64::NAN, "q").is_err());
    }

    #[test]
    fn concurrent_charges_never_overspend() {
        let l = Arc::new(MemoryLedger::new([("a".to_string(), 1.0)]));
        let ok: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..64)
                .map(|i| {
                    let l = l.clone();
                    s.spawn(move || l.charge("a", 0.1, &format!("q{i}")).is_ok() as usize)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(ok, 10);
        assert!(l.status("a").unwrap().epsilon_spent <= 1.0 + 1e-9);
    }
}
