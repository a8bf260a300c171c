//! DP partition selection for GROUP BY keys without a public domain.
//!
//! When a key has no declared `public_values`, which groups exist is itself private: a
//! group seen only because one participant has a row in it reveals that participant. Such
//! a query releases a group only if a noisy count of the group's **participants** passes a
//! threshold, with OpenDP's `make_laplace_threshold` (discrete Laplace noise, then
//! "keep the keys whose noisy count is at least T"), which is (ε, δ)-DP.
//!
//! **The count.** The count used for selection is the number of distinct participants with a
//! kept row in the group (the nodes' `CountUnits`), summed over sites, not the row count:
//! one participant changes it by at most 1 per site, whatever R is, so its L∞ sensitivity
//! is S rather than R·S, and the threshold reads directly as "about T participants".
//!
//! **Sensitivities** (one participant added or removed). Each node keeps a participant's rows
//! in at most G groups, then at most R rows, so it touches at most `min(G, R)` groups at
//! one site, adding 1 to each group's participant count; over at most S sites:
//! - L0 (groups changed) ≤ `min(G, R)·S`,
//! - L∞ (change of one group's count) ≤ S,
//! - L1 (total change) ≤ `min(G, R)·S`.
//!
//! **Scale and threshold.** With ε_sel the selection's share of ε, the noise scale is
//! `b = L1/ε_sel` (rounded up until OpenDP's privacy map gives at most ε_sel), and the
//! threshold T is the smallest integer for which OpenDP's map gives δ at most the policy's
//! `delta_per_query`: roughly T ≈ L∞ + b·ln(L0/δ). OpenDP computes both ε and δ from
//! `(L0, L1, L∞)`; fedq only searches T and checks the result.
//!
//! **Composition.** The other statistics (COUNT, SUM, AVG, …) get their own discrete
//! Laplace noise, released only for the selected groups. Their L1 sensitivities over all
//! groups are those of public domains (R·S rows in total, and so on), so the query is
//! (ε_sel + ε_rest, δ)-DP: conditioned on no group of one neighbour alone being selected
//! (probability ≥ 1 − δ), every released group exists in both neighbours.

use std::collections::HashMap;

use dashu::rational::RBig;
use opendp::domains::{AtomDomain, MapDomain};
use opendp::measurements::make_laplace_threshold;
use opendp::measures::{Approximate, MaxDivergence};
use opendp::metrics::{AbsoluteDistance, L01InfDistance};

use crate::error::CoordinatorError;

/// Share of a partition-selected query's ε spent on selection (1/2): the threshold, and so
/// the smallest group that can be released, scales with 1/ε_sel, while every released
/// group is large by construction, so its statistics need less of the budget.
pub const SELECTION_SHARE_DENOMINATOR: u32 = 2;

/// How partition selection is named in EXPLAIN and the audit log's ε split.
pub const SELECTION_LABEL: &str = "partition selection: participants per group, thresholded";

/// Largest threshold searched (a δ or ε needing more is refused).
const MAX_THRESHOLD: i64 = 1 << 40;

type Measurement = opendp::core::Measurement<
    MapDomain<AtomDomain<u32>, AtomDomain<i64>>,
    L01InfDistance<AbsoluteDistance<i64>>,
    Approximate<MaxDivergence>,
    HashMap<u32, i64>,
>;

/// The planned selection of a query whose GROUP BY keys have no public domain.
#[derive(Debug, Clone)]
pub struct PartitionSelection {
    /// Index of the `CountUnits` partial counted for selection.
    pub partial: usize,
    /// G of the driving table.
    pub max_groups_per_unit: u32,
    /// Groups one participant can change: min(G, R)·S.
    pub l0: u32,
    /// Largest change of one group's count: S.
    pub linf: i64,
    /// Largest total change: min(G, R)·S.
    pub l1: i64,
    /// ε share (exact).
    pub epsilon: RBig,
    /// δ charged (the policy's `delta_per_query`).
    pub delta: f64,
    /// Discrete Laplace scale of the selection noise.
    pub scale: f64,
    /// Groups whose noisy participant count is at least this are released.
    pub threshold: i64,
    /// ε and δ from OpenDP's privacy map at (L0, L1, L∞); at most the share and δ.
    pub map_epsilon: f64,
    pub map_delta: f64,
}

fn opendp_err(e: opendp::error::Error) -> CoordinatorError {
    CoordinatorError::internal("-", format!("OpenDP partition selection: {e}"))
}

fn measurement(scale: f64, threshold: i64) -> Result<Measurement, CoordinatorError> {
    make_laplace_threshold(
        MapDomain::new(AtomDomain::<u32>::default(), AtomDomain::<i64>::default()),
        L01InfDistance::default(),
        scale,
        threshold,
        None,
    )
    .map_err(opendp_err)
}

impl PartitionSelection {
    /// Plan the selection: scale from ε_sel, the smallest threshold that keeps δ.
    pub fn new(
        partial: usize,
        g: u32,
        r: u32,
        s: u32,
        epsilon: RBig,
        delta: f64,
    ) -> Result<PartitionSelection, CoordinatorError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(CoordinatorError::internal("-", "selection needs 0 < δ < 1"));
        }
        let groups = g.min(r);
        let l0 = groups
            .checked_mul(s)
            .ok_or_else(|| CoordinatorError::Refused("G·S is too large".into()))?;
        let l1 = i64::from(l0);
        let linf = i64::from(s);
        let d_in = (l0, l1, linf);
        let eps_f = epsilon.to_f64().value();
        if eps_f.is_nan() || eps_f <= 0.0 {
            return Err(CoordinatorError::internal("-", "selection needs ε > 0"));
        }
        // Scale: L1/ε, nudged up until OpenDP's (rounded-up) ε is at most the exact share.
        let mut scale = l1 as f64 / eps_f;
        let within = |x: f64| RBig::try_from(x).map(|x| x <= epsilon).unwrap_or(false);
        let mut tries = 0;
        loop {
            let (e, _) = measurement(scale, MAX_THRESHOLD)?
                .map(&d_in)
                .map_err(opendp_err)?;
            if within(e) {
                break;
            }
            scale *= 1.0 + 1e-12;
            tries += 1;
            if tries > 100 {
                return Err(CoordinatorError::internal(
                    "-",
                    "no selection scale within the ε share",
                ));
            }
        }
        // Threshold: the smallest T ≥ L∞ with δ(T) ≤ δ (δ falls as T grows).
        let delta_at = |t: i64| -> Result<(f64, f64), CoordinatorError> {
            measurement(scale, t)?.map(&d_in).map_err(opendp_err)
        };
        let floor = delta_at(MAX_THRESHOLD)?.1;
        if floor > delta {
            // OpenDP's accounting is in f64 and rounds δ up: it cannot certify a δ this small.
            return Err(CoordinatorError::Refused(format!(
                "partition selection cannot certify δ = {delta:e} (the smallest OpenDP's accounting gives for one participant \
                 changing up to {l0} groups is {floor:e}); the privacy officer should set [policy] delta_per_query to at least that"
            )));
        }
        let mut hi = linf.max(1);
        while delta_at(hi)?.1 > delta {
            hi = hi.saturating_mul(2).min(MAX_THRESHOLD);
        }
        let mut lo = linf;
        // delta_at(lo - 1) may exceed δ; binary search on [lo, hi] for the first T that keeps δ.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if delta_at(mid)?.1 <= delta {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let threshold = hi;
        let (map_epsilon, map_delta) = delta_at(threshold)?;
        if !within(map_epsilon) || map_delta > delta {
            return Err(CoordinatorError::internal(
                "-",
                "partition selection exceeds its ε share or δ",
            ));
        }
        Ok(PartitionSelection {
            partial,
            max_groups_per_unit: g,
            l0,
            linf,
            l1,
            epsilon,
            delta,
            scale,
            threshold,
            map_epsilon,
            map_delta,
        })
    }

    /// How the sensitivities follow from the catalog.
    pub fn formula(&self, r: u32, s: u32) -> String {
        format!(
            "L0 = L1 = min(G, R)·S = min({}, {r})·{s} = {}, L∞ = S = {s}",
            self.max_groups_per_unit, self.l0
        )
    }

    /// Run the selection on exact participant counts (group index → count): the indices of
    /// the released groups. Noise from OpenDP's sampler inside the measurement.
    pub fn select(&self, counts: &HashMap<u32, i64>) -> Result<Vec<u32>, CoordinatorError> {
        let m = measurement(self.scale, self.threshold)?;
        let kept = m.invoke(counts).map_err(opendp_err)?;
        let mut out: Vec<u32> = kept.into_keys().collect();
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::rational;

    #[test]
    fn threshold_is_the_smallest_that_keeps_delta() {
        let sel = PartitionSelection::new(0, 5, 15, 2, rational(0.5).unwrap(), 1e-7).unwrap();
        assert_eq!((sel.l0, sel.l1, sel.linf), (10, 10, 2));
        assert!((sel.scale - 20.0).abs() < 1e-6, "{}", sel.scale);
        assert!(sel.map_delta <= 1e-7 && sel.map_epsilon <= 0.5);
        let below = measurement(sel.scale, sel.threshold - 1)
            .unwrap()
            .map(&(10, 10, 2))
            .unwrap();
        assert!(below.1 > 1e-7, "{below:?}");
        // Roughly L∞ + b·ln(L0/δ) for a one-sided Laplace tail.
        let approx = 2.0 + 20.0 * (10.0f64 / 1e-7).ln();
        assert!(
            (sel.threshold as f64 - approx).abs() < 0.1 * approx,
            "{} vs {approx}",
            sel.threshold
        );
        // G above R: R bounds the groups touched.
        let sel = PartitionSelection::new(0, 5, 1, 1, rational(1.0).unwrap(), 1e-9).unwrap();
        assert_eq!((sel.l0, sel.l1, sel.linf), (1, 1, 1));
    }
}
