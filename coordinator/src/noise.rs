//! Noise, from OpenDP's samplers only.
//!
//! Every released statistic is an integer (a count, or a sum in fixed-point units), so the
//! mechanism is OpenDP's exact discrete Laplace sampler (`sample_discrete_laplace`, CKS20),
//! which is immune to floating-point attacks. Scales are exact rationals: for a statistic
//! with L1 sensitivity Δ (integer units) and budget share ε_s, scale = Δ / ε_s exactly, so
//! the mechanism is ε_s-DP exactly. OpenDP draws its randomness from OpenSSL
//! (`use-openssl`); there is no other RNG here.

use dashu::integer::IBig;
use dashu::rational::RBig;
use opendp::traits::samplers::sample_discrete_laplace;

use crate::error::CoordinatorError;

/// Discrete Laplace noise of an exact rational scale.
#[derive(Debug, Clone)]
pub struct DiscreteLaplace {
    scale: RBig,
    scale_f64: f64,
}

impl DiscreteLaplace {
    /// Mechanism for a statistic with integer L1 sensitivity `sensitivity` and budget share
    /// `epsilon` (given as an exact rational).
    pub fn new(sensitivity: u128, epsilon: &RBig) -> Result<Self, String> {
        if *epsilon <= RBig::ZERO {
            return Err("ε share must be positive".into());
        }
        let scale = RBig::from(IBig::from(sensitivity)) / epsilon.clone();
        let scale_f64 = scale.to_f64().value();
        Ok(DiscreteLaplace { scale, scale_f64 })
    }

    /// The noise scale b (in the statistic's integer units).
    pub fn scale(&self) -> f64 {
        self.scale_f64
    }

    /// Add noise to an exact value.
    pub fn release(&self, exact: i128) -> Result<i128, CoordinatorError> {
        let noise = sample_discrete_laplace(self.scale.clone())
            .map_err(|e| CoordinatorError::internal("-", format!("OpenDP sampler failed: {e}")))?;
        let noisy = IBig::from(exact) + noise;
        i128::try_from(noisy)
            .map_err(|_| CoordinatorError::internal("-", "noisy value overflows i128"))
    }

    /// Smallest integer t with P(|X| > t) <= alpha, for X ~ discrete Laplace(scale).
    ///
    /// P(|X| > t) = 2 e^{-(t+1)/b} / (1 + e^{-1/b}).
    pub fn half_width(&self, alpha: f64) -> f64 {
        discrete_laplace_half_width(self.scale_f64, alpha)
    }
}

/// See [`DiscreteLaplace::half_width`].
pub fn discrete_laplace_half_width(b: f64, alpha: f64) -> f64 {
    if b <= 0.0 {
        return 0.0;
    }
    let q = (-1.0 / b).exp();
    // Solve 2 q^{t+1} / (1+q) <= alpha for the smallest integer t >= 0.
    let t = (alpha * (1.0 + q) / 2.0).ln() / q.ln() - 1.0;
    t.ceil().max(0.0)
}

/// Tail probability P(|X| > t) of the discrete Laplace with scale b, for tests and bounds.
pub fn discrete_laplace_tail(b: f64, t: f64) -> f64 {
    if b <= 0.0 {
        return if t < 0.0 { 1.0 } else { 0.0 };
    }
    let q = (-1.0 / b).exp();
    (2.0 * q.powf(t.floor() + 1.0) / (1.0 + q)).min(1.0)
}

/// An f64 as an exact rational.
pub fn rational(x: f64) -> Result<RBig, CoordinatorError> {
    RBig::try_from(x)
        .map_err(|_| CoordinatorError::InvalidArgument(format!("{x} is not a finite number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_width_matches_tail() {
        for b in [0.5, 1.0, 3.7, 100.0, 12345.0] {
            let t = discrete_laplace_half_width(b, 0.05);
            assert!(discrete_laplace_tail(b, t) <= 0.05 + 1e-12, "b={b}");
            if t > 0.0 {
                assert!(discrete_laplace_tail(b, t - 1.0) > 0.05, "b={b}");
            }
        }
    }

    /// Kolmogorov-Smirnov-style check of the sampler against the exact discrete Laplace CDF.
    /// With n = 5000 the DKW inequality gives P(sup |F_n - F| > 0.0445) <= 2 e^{-2 n 0.0445^2}
    /// ≈ 5e-9, so this fails spuriously with probability below 1e-8 per scale.
    #[test]
    fn sampler_matches_discrete_laplace_cdf() {
        let eps = rational(0.5).unwrap();
        let m = DiscreteLaplace::new(2, &eps).unwrap();
        assert_eq!(m.scale(), 4.0);
        let n = 5000;
        let mut xs: Vec<i128> = (0..n).map(|_| m.release(0).unwrap()).collect();
        xs.sort();
        let b = m.scale();
        let q = (-1.0f64 / b).exp();
        let cdf = |x: i128| -> f64 {
            // P(X <= x) for the discrete Laplace.
            let xf = x as f64;
            if x < 0 {
                q.powf(-xf) / (1.0 + q)
            } else {
                1.0 - q.powf(xf + 1.0) / (1.0 + q)
            }
        };
        let mut d: f64 = 0.0;
        let mut i = 0;
        while i < xs.len() {
            let x = xs[i];
            let mut j = i;
            while j < xs.len() && xs[j] == x {
                j += 1;
            }
            let f = cdf(x);
            let f_below = cdf(x - 1);
            d = d.max((j as f64 / n as f64 - f).abs());
            d = d.max((i as f64 / n as f64 - f_below).abs());
            i = j;
        }
        assert!(d < 0.0445, "KS distance {d}");
    }
}
