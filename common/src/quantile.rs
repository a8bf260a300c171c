//! The public candidate grid of private quantiles, shared by coordinator and node.
//!
//! A quantile (`MEDIAN`, `PERCENTILE_CONT`, `APPROX_PERCENTILE_CONT`) is released by
//! OpenDP's exponential mechanism over a public list of candidates. fedq's candidates are
//! an evenly spaced grid over the column's declared bounds in fixed point: with
//! `lo = ceil(lower / precision)`, `hi = floor(upper / precision)`, `span = hi − lo` and
//! `k` candidates (`2 ≤ k ≤ span + 1`),
//!
//! ```text
//!   c_i = lo + floor(i · span / (k − 1)),   i = 0 … k − 1
//! ```
//!
//! so `c_0 = lo`, `c_{k−1} = hi`, and the grid is strictly increasing. It depends only on
//! the catalog and `k`, never on data.
//!
//! A node clamps each kept value into `[lo, hi]` (the same fixed-point value the sums use)
//! and counts it in one of `2k − 1` bins: bin `2i` holds values equal to `c_i`, bin
//! `2i + 1` values strictly between `c_i` and `c_{i+1}`. These counts are exactly what
//! OpenDP's quantile score needs for every candidate: `#(x < c_i)` is the sum of bins
//! below `2i`, `#(x > c_i)` the sum of bins above it.

/// Most candidates a quantile may have.
pub const MAX_QUANTILE_CANDIDATES: u32 = 1024;

/// Most histogram cells (bins × groups, summed over a request's histograms) a node builds
/// for one request: bounds its memory (16 bytes a cell) and its answer (8 bytes a cell).
pub const MAX_HISTOGRAM_CELLS: usize = 1 << 20;

/// Errors constructing a grid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GridError {
    #[error("a quantile grid needs at least 2 candidates, got {0}")]
    TooFew(u32),
    #[error("a quantile grid has at most {MAX_QUANTILE_CANDIDATES} candidates, got {0}")]
    TooMany(u32),
    #[error("{candidates} candidates do not fit in {steps} fixed-point steps of the bounds")]
    TooFine { candidates: u32, steps: i128 },
}

/// An evenly spaced grid of `k` fixed-point candidates over `[lo, lo + span]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantileGrid {
    lo: i128,
    span: i128,
    k: u32,
}

impl QuantileGrid {
    /// The grid of `k` candidates over the fixed-point interval `[lo, hi]`.
    pub fn new(lo: i128, hi: i128, k: u32) -> Result<Self, GridError> {
        if k < 2 {
            return Err(GridError::TooFew(k));
        }
        if k > MAX_QUANTILE_CANDIDATES {
            return Err(GridError::TooMany(k));
        }
        let span = hi - lo;
        if span < i128::from(k) - 1 {
            return Err(GridError::TooFine {
                candidates: k,
                steps: span.max(0) + 1,
            });
        }
        Ok(QuantileGrid { lo, span, k })
    }

    /// The grid for bounds `[lower, upper]` at `precision` (fixed point as for sums).
    pub fn for_bounds(lower: f64, upper: f64, precision: f64, k: u32) -> Result<Self, GridError> {
        let lo = (lower / precision).ceil() as i128;
        let hi = (upper / precision).floor() as i128;
        Self::new(lo, hi, k)
    }

    /// The default number of candidates for `[lower, upper]` at `precision`: every
    /// fixed-point step if there are at most `max` of them, else `max` (at least 2).
    pub fn default_candidates(lower: f64, upper: f64, precision: f64, max: u32) -> u32 {
        let steps = ((upper / precision).floor() - (lower / precision).ceil() + 1.0).max(0.0);
        (steps.min(f64::from(max.min(MAX_QUANTILE_CANDIDATES)))) as u32
    }

    /// Number of candidates k.
    pub fn len(&self) -> usize {
        self.k as usize
    }

    /// Never empty (k ≥ 2); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of histogram bins, 2k − 1.
    pub fn bins(&self) -> usize {
        2 * self.k as usize - 1
    }

    /// Candidate `i` in fixed-point units.
    pub fn candidate(&self, i: usize) -> i128 {
        self.lo + (i as i128 * self.span) / (i128::from(self.k) - 1)
    }

    /// Every candidate, increasing.
    pub fn candidates(&self) -> Vec<i128> {
        (0..self.len()).map(|i| self.candidate(i)).collect()
    }

    /// The bin of a clamped fixed-point value `v` (values outside `[lo, hi]` are clamped).
    pub fn bin_of(&self, v: i128) -> usize {
        let d = (v - self.lo).clamp(0, self.span);
        let km1 = i128::from(self.k) - 1;
        // The largest i with floor(i·span/(k−1)) ≤ d, i.e. i·span < (d + 1)(k − 1).
        let i = (((d + 1) * km1 - 1) / self.span).min(km1) as usize;
        if self.candidate(i) == self.lo + d {
            2 * i
        } else {
            2 * i + 1
        }
    }

    /// Largest gap between neighbouring candidates, in fixed-point steps.
    pub fn max_step(&self) -> i128 {
        let km1 = i128::from(self.k) - 1;
        (self.span + km1 - 1) / km1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_match_a_direct_search_for_every_value() {
        for (lo, hi, k) in [
            (0, 1, 2),
            (-5, 5, 11),
            (0, 130, 131),
            (0, 50_000, 1024),
            (3, 100, 7),
        ] {
            let g = QuantileGrid::new(lo, hi, k).unwrap();
            let c = g.candidates();
            assert_eq!(c[0], lo);
            assert_eq!(*c.last().unwrap(), hi);
            assert!(c.windows(2).all(|w| w[0] < w[1]));
            assert!(c.windows(2).all(|w| w[1] - w[0] <= g.max_step()));
            for v in lo..=hi {
                let i = c.partition_point(|&x| x < v);
                let want = if c[i] == v { 2 * i } else { 2 * i - 1 };
                assert_eq!(g.bin_of(v), want, "{lo} {hi} {k} {v}");
            }
            assert_eq!(g.bin_of(lo - 10), 0);
            assert_eq!(g.bin_of(hi + 10), g.bins() - 1);
        }
    }

    #[test]
    fn grids_are_refused_when_they_cannot_be_strictly_increasing() {
        assert_eq!(QuantileGrid::new(0, 10, 1), Err(GridError::TooFew(1)));
        assert_eq!(
            QuantileGrid::new(0, 1 << 20, 1025),
            Err(GridError::TooMany(1025))
        );
        assert!(matches!(
            QuantileGrid::new(0, 5, 7),
            Err(GridError::TooFine { .. })
        ));
        assert_eq!(
            QuantileGrid::default_candidates(1900.0, 2030.0, 1.0, 1024),
            131
        );
        assert_eq!(
            QuantileGrid::default_candidates(0.0, 500.0, 0.01, 1024),
            1024
        );
    }
}
