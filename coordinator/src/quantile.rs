//! Private quantiles: OpenDP's exponential mechanism over a public candidate grid.
//!
//! `MEDIAN(x)`, `PERCENTILE_CONT(α) WITHIN GROUP (ORDER BY x)` and
//! `APPROX_PERCENTILE_CONT(x, α)` are released as one of `k` public candidates evenly spaced
//! over the column's declared bounds ([`fedq_common::quantile::QuantileGrid`]), chosen by the
//! coordinator from the catalog only.
//!
//! **Data.** Each node clamps every kept value (after the filter, the join and bounding to
//! R rows per participant) into the bounds in fixed point, exactly as for sums, and counts
//! it in one of `2k − 1` bins (equal to a candidate, or strictly between two). Counts are
//! exact and add up across sites.
//!
//! **Score.** From the merged bins the coordinator computes, for every candidate c, OpenDP's
//! quantile score (`make_quantile_score_candidates`, Smith 2011) exactly as OpenDP 0.16
//! defines it for datasets of unknown size:
//!
//! ```text
//!   score(c) = | (α_den − α_num) · min(#(x < c), L) − α_num · min(#(x > c), L) |
//! ```
//!
//! with `α_num/α_den` the fraction OpenDP derives from α ([`alpha_fraction`]) and
//! `L = ⌊(2⁶⁴ − 1)/α_den⌋`. Lower is better. (Test: [`tests`] compares these scores with
//! OpenDP's own transformation on the same data.)
//!
//! **Sensitivity.** Adding or removing one value changes `#(x < c)` or `#(x > c)` (not both)
//! by at most 1, so each score by at most `m = max(α_num, α_den − α_num)`; OpenDP's
//! stability map says the same (`d_in · m` for symmetric distance `d_in`). One participant
//! contributes at most R rows per site at at most S sites, so the L∞ sensitivity of a
//! group's score vector is at most `Δ = R·S·m`.
//!
//! **Selection.** OpenDP's `make_noisy_max` (permute-and-flip, `MaxDivergence`,
//! non-monotonic `LInfDistance`, minimising) with `scale = 2Δ/ε_q`; its privacy map at
//! `d_in = Δ` is checked to be at most the statistic's ε share before anything is sampled.
//!
//! **GROUP BY.** One selection per group of the public domain, each with the same scale.
//! A participant's at most R·S rows are spread over the groups: if `d_g` of them fall in
//! group g (Σ_g d_g ≤ R·S), group g's scores move by at most `d_g·m` and, because the
//! mechanism's privacy loss is linear in that distance (`2·d_g·m/scale`), the groups
//! together lose at most `2·m·R·S/scale = ε_q`. So the quantile costs ε_q for all groups,
//! not ε_q per group (sequential composition over the groups, with the contributions summed).
//!
//! **Accuracy.** Permute-and-flip examines each candidate at most once and accepts it with
//! probability `exp(−(score(c) − OPT)/scale)`, so a candidate whose score is at least
//! `OPT + g` is released with probability at most `k·exp(−g/scale)`: with probability
//! `1 − β` the score is within `g_β = scale·ln(k/β)` of the best. A released candidate with
//! score `s` has at most `α·N + s/α_den` values below it and at most `(1 − α)·N + s/α_den`
//! above (N = values in the group), so its rank is within `(OPT + g_β)/α_den` rows of the
//! target rank α·N. `g_β/α_den = 2·R·S·(m/α_den)·ln(k/β)/ε_q` is known before any data is
//! read (EXPLAIN shows it at β = 5%); OPT/α_den is at most half the values in the grid cell
//! that holds the true quantile (0 for a grid on every fixed-point step when no values tie
//! at the quantile). The value itself is also off by the grid: at most one grid step.

use dashu::rational::RBig;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_noisy_max;
use opendp::measures::MaxDivergence;
use opendp::metrics::LInfDistance;

use crate::error::CoordinatorError;

/// OpenDP's default granularity of α for datasets of unknown size.
const ALPHA_DEN_APPROX: u64 = 10_000;

/// α as the fraction `α_num/α_den` OpenDP 0.16 uses for unknown dataset sizes
/// (`score_candidates_constants`): the exact fraction of the f64 if its denominator is
/// below 10 000 (0.5 = 1/2, 0.25 = 1/4), else `round(α·10 000)/10 000`. `None` outside
/// [0, 1].
pub fn alpha_fraction(alpha: f64) -> Option<(u64, u64)> {
    if !(0.0..=1.0).contains(&alpha) {
        return None;
    }
    let (num, den) = RBig::try_from(alpha).ok()?.into_parts();
    if den < dashu::integer::UBig::from(ALPHA_DEN_APPROX) {
        let num = u64::try_from(num.into_parts().1).ok()?;
        let den = u64::try_from(den).ok()?;
        return Some((num, den));
    }
    let num = (alpha * ALPHA_DEN_APPROX as f64).round() as u64;
    Some((num.min(ALPHA_DEN_APPROX), ALPHA_DEN_APPROX))
}

/// `max(α_num, α_den − α_num)`: how much one value moves a score.
pub fn score_step(alpha_num: u64, alpha_den: u64) -> u64 {
    alpha_num.max(alpha_den - alpha_num)
}

/// OpenDP's quantile score of every candidate from the `2k − 1` bins of a
/// [`fedq_common::quantile::QuantileGrid`] (bin `2i` = values equal to candidate i, bin
/// `2i + 1` = values strictly between candidates i and i + 1). Counts are clamped into
/// `[0, u64::MAX]` first (they are exact non-negative counts).
pub fn scores(bins: &[i128], alpha_num: u64, alpha_den: u64) -> Vec<u64> {
    let size_limit = u64::MAX / alpha_den;
    let bins: Vec<u64> = bins
        .iter()
        .map(|&b| u64::try_from(b.max(0)).unwrap_or(u64::MAX))
        .collect();
    let n: u64 = bins.iter().fold(0u64, |a, &b| a.saturating_add(b));
    let k = bins.len().div_ceil(2);
    let mut out = Vec::with_capacity(k);
    let mut lt: u64 = 0;
    for i in 0..k {
        let eq = bins[2 * i];
        let gt = n.saturating_sub(lt).saturating_sub(eq);
        let (lt_lim, gt_lim) = (lt.min(size_limit), gt.min(size_limit));
        out.push(((alpha_den - alpha_num) * lt_lim).abs_diff(alpha_num * gt_lim));
        lt = lt.saturating_add(eq);
        if let Some(between) = bins.get(2 * i + 1) {
            lt = lt.saturating_add(*between);
        }
    }
    out
}

/// `#(x < c_i)` and `#(x > c_i)` for candidate i, from the bins.
pub fn rank_of(bins: &[i128], i: usize) -> (i128, i128) {
    let below: i128 = bins[..2 * i].iter().sum();
    let above: i128 = bins[2 * i + 1..].iter().sum();
    (below, above)
}

/// The exponential mechanism of one quantile statistic: OpenDP's permute-and-flip noisy
/// max (minimising the score), calibrated so that its privacy map at the statistic's L∞
/// sensitivity is at most its ε share.
pub struct QuantileMechanism {
    scale: f64,
    candidates: usize,
    alpha_den: u64,
    measurement: opendp::core::Measurement<
        VectorDomain<AtomDomain<u64>>,
        LInfDistance<u64>,
        MaxDivergence,
        usize,
    >,
}

impl QuantileMechanism {
    /// For scores with L∞ sensitivity `sensitivity` (= R·S·max(α_num, α_den − α_num)),
    /// `candidates` candidates and the exact ε share `epsilon`.
    pub fn new(
        sensitivity: u128,
        epsilon: &RBig,
        candidates: usize,
        alpha_den: u64,
    ) -> Result<Self, String> {
        if *epsilon <= RBig::ZERO {
            return Err("ε share must be positive".into());
        }
        let delta = u64::try_from(sensitivity).map_err(|_| "score sensitivity overflows u64")?;
        // scale = 2Δ/ε (non-monotonic scores), nudged up so that f64 rounding can only
        // make the mechanism more private; the privacy map is checked below.
        let exact = RBig::from(2u8) * RBig::from(delta) / epsilon.clone();
        let scale = exact.to_f64().value() * (1.0 + 1e-9);
        let measurement = make_noisy_max(
            VectorDomain::new(AtomDomain::<u64>::default()),
            LInfDistance::<u64>::default(),
            MaxDivergence,
            scale,
            true,
        )
        .map_err(|e| format!("OpenDP noisy max: {e}"))?;
        let spent = measurement
            .map(&delta)
            .map_err(|e| format!("OpenDP privacy map: {e}"))?;
        let spent = RBig::try_from(spent).map_err(|_| "privacy map is not finite")?;
        if spent > *epsilon {
            return Err(format!(
                "noisy max would spend {spent} > its share {epsilon}"
            ));
        }
        Ok(QuantileMechanism {
            scale,
            candidates,
            alpha_den,
            measurement,
        })
    }

    /// Noise scale of the scores (in score units).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Index of the released candidate, from the exact scores of one group.
    pub fn select(&self, scores: &[u64]) -> Result<usize, CoordinatorError> {
        if scores.len() != self.candidates {
            return Err(CoordinatorError::internal(
                "-",
                format!("{} scores for {} candidates", scores.len(), self.candidates),
            ));
        }
        self.measurement
            .invoke(&scores.to_vec())
            .map_err(|e| CoordinatorError::internal("-", format!("OpenDP noisy max failed: {e}")))
    }

    /// Score gap `g` with P(score(released) ≥ OPT + g) ≤ β: `scale·ln(k/β)`.
    pub fn score_gap(&self, beta: f64) -> f64 {
        self.scale * (self.candidates as f64 / beta).ln()
    }

    /// Rank error in rows from the noise alone at failure probability β: `score_gap/α_den`
    /// (add OPT/α_den, the best candidate's own distance, for the total).
    pub fn rank_half_width(&self, beta: f64) -> f64 {
        self.score_gap(beta) / self.alpha_den as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_common::quantile::QuantileGrid;
    use opendp::metrics::SymmetricDistance;
    use opendp::transformations::make_quantile_score_candidates;

    #[test]
    fn alpha_fractions_follow_opendp() {
        assert_eq!(alpha_fraction(0.5), Some((1, 2)));
        assert_eq!(alpha_fraction(0.25), Some((1, 4)));
        assert_eq!(alpha_fraction(0.0), Some((0, 1)));
        assert_eq!(alpha_fraction(1.0), Some((1, 1)));
        assert_eq!(alpha_fraction(0.95), Some((9500, 10_000)));
        assert_eq!(alpha_fraction(0.1), Some((1000, 10_000)));
        assert_eq!(alpha_fraction(1.5), None);
        assert_eq!(alpha_fraction(-0.1), None);
        assert_eq!(alpha_fraction(f64::NAN), None);
    }

    /// The scores from binned counts equal OpenDP's own `make_quantile_score_candidates`
    /// on the same (clamped, fixed-point) values, for grids on every step and coarser ones.
    #[test]
    fn scores_from_bins_equal_opendp_scores() {
        let values: Vec<i64> = (0..500).map(|i| (i * i * 7 + i * 13) % 97 - 10).collect();
        for (lo, hi, k) in [(-10, 86, 97), (-10, 86, 12), (-5, 50, 2), (-10, 86, 30)] {
            let grid = QuantileGrid::new(lo, hi, k).unwrap();
            let clamped: Vec<i64> = values
                .iter()
                .map(|&v| v.clamp(lo as i64, hi as i64))
                .collect();
            let mut bins = vec![0i128; grid.bins()];
            for &v in &clamped {
                bins[grid.bin_of(v.into())] += 1;
            }
            let cands: Vec<i64> = grid.candidates().iter().map(|&c| c as i64).collect();
            for alpha in [0.5, 0.1, 0.95, 0.0, 1.0, 0.25] {
                let t = make_quantile_score_candidates(
                    VectorDomain::new(AtomDomain::<i64>::default()),
                    SymmetricDistance,
                    cands.clone(),
                    alpha,
                )
                .unwrap();
                let want = t.invoke(&clamped).unwrap();
                let (num, den) = alpha_fraction(alpha).unwrap();
                assert_eq!(scores(&bins, num, den), want, "{lo} {hi} {k} {alpha}");
                // OpenDP's stability map: one changed row moves a score by max(num, den − num).
                assert_eq!(t.map(&1).unwrap(), score_step(num, den));
            }
        }
    }

    #[test]
    fn the_privacy_map_meets_the_share_and_the_best_candidate_wins_without_noise_gaps() {
        let eps = RBig::from(1u8) / RBig::from(2u8);
        let m = QuantileMechanism::new(40, &eps, 5, 2).unwrap();
        assert!((m.scale() - 160.0).abs() < 1e-6);
        assert!(QuantileMechanism::new(40, &RBig::ZERO, 5, 2).is_err());
        // A gap of 10⁶ score units (6250 scales): the best candidate, except with
        // probability below 4·e^{-6250}.
        let idx = m
            .select(&[1_000_000, 1_000_000, 0, 1_000_000, 1_000_000])
            .unwrap();
        assert_eq!(idx, 2);
        assert!(m.select(&[1, 2]).is_err());
    }
}
