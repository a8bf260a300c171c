//! Accuracy: no budget is wasted. Over repeated runs at ε = 1 through the whole pipeline
//! (SQL → nodes → merge → noise → Flight SQL), the mean absolute error of each directly
//! released statistic matches the error its noise scale predicts, within 10%.
//!
//! The query reads `participants` (exactly one row per participant, R = 1), so bounding keeps
//! every row, the exact pre-noise values are fixed, and they come from the coordinator's
//! own gather. The counts and sums are far from the bounds the release clamps to (0 and
//! the largest possible sum), so clamping never hides noise. Each run changes a no-op
//! filter (`pid <> 'nobody-k'`) so that it is a new query, not a free replay. Each sample is
//! `|noisy − exact| / E|X|`, with `E|X| = 2q/(1 − q²)`, `q = e^{−1/b}` the exact mean absolute
//! value of discrete Laplace noise of scale `b` (read from the answer's metadata). The
//! samples are independent with mean 1; the test computes a Chernoff bound on the chance
//! that their mean leaves [0.9, 1.1] from their exact moment-generating functions and asserts
//! that this false-failure probability is below 1e-9 before checking.

use fedq::client::FedqClient;
use fedq::federation::{FederationOptions, LocalFederation};
use fedq_coordinator::release::META_NOISE_SCALE;
use fedq_tests::{cell, key, synth};

/// `E|X|` for discrete Laplace noise of scale `b`.
fn mean_abs(b: f64) -> f64 {
    let q = (-1.0 / b).exp();
    2.0 * q / (1.0 - q * q)
}

/// `ln E[exp(λ|X|)]` for discrete Laplace of scale `b` (finite for λ < 1/b).
fn log_mgf_abs(b: f64, lambda: f64) -> f64 {
    let q = (-1.0 / b).exp();
    let z = q * lambda.exp();
    assert!(z < 1.0);
    ((1.0 - q) / (1.0 + q)).ln() + (1.0 + 2.0 * z / (1.0 - z)).ln()
}

/// Chernoff bound on P(mean of Y_i = |X_i|/μ_i leaves [1 − δ, 1 + δ]).
fn chernoff(scales: &[f64], delta: f64) -> f64 {
    let n = scales.len() as f64;
    let bound = |sign: f64| -> f64 {
        // P(sign·Σ(Y_i − 1) ≥ nδ) ≤ exp(−t·n·δ + Σ ln E exp(t·sign·(Y_i − 1))), t > 0.
        let mut best = f64::INFINITY;
        for k in 1..400 {
            let t = k as f64 * 0.005;
            let mut log_sum = -t * n * delta;
            let mut ok = true;
            for &b in scales {
                let mu = mean_abs(b);
                let lambda = sign * t / mu;
                if lambda >= 1.0 / b {
                    ok = false;
                    break;
                }
                log_sum += log_mgf_abs(b, lambda) - sign * t;
            }
            if ok {
                best = best.min(log_sum.exp());
            }
        }
        best
    };
    bound(1.0) + bound(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mean_absolute_error_matches_the_noise_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 21);
    let token = "accuracy-test-token-0123456789abcdef".to_string();
    let fed = LocalFederation::start(
        dir,
        FederationOptions {
            min_reported_count: Some(0),
            extra_researchers: vec![("acc".into(), token.clone(), 1e6)],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let engine = fed.coordinator.engine.clone();
    let mut client = FedqClient::connect(&fed.url(), "acc", &token)
        .await
        .unwrap();

    // COUNT(*) and SUM(birth_year) are released directly from one statistic each.
    let base =
        "SELECT sex, participant_type, COUNT(*) AS n, SUM(birth_year) AS s FROM participants";
    let q = engine
        .plan("acc", &format!("{base} GROUP BY sex, participant_type"))
        .await
        .unwrap();
    let merged = engine.gather(&q).await.unwrap();
    let exact = |sex: &str, kind: &str| -> (f64, f64) {
        let k = vec![
            fedq_common::PublicValue::Text(sex.to_string()),
            fedq_common::PublicValue::Text(kind.to_string()),
        ];
        let p = merged.get(&k, q.request.aggregates.len());
        // Partials: CountRows, SumFixed(birth_year) in units of 1. Far from 0 (noise scales
        // are about 5 and 10^4 here), so the release never clamps.
        assert!(p[0] > 60 && p[1] > 60 * 1900, "{p:?}");
        (p[0] as f64, p[1] as f64)
    };

    const RUNS: usize = 450;
    let mut scales = Vec::new();
    let mut normalised = Vec::new();
    for run in 0..RUNS {
        let sql = format!("{base} WHERE pid <> 'nobody-{run}' GROUP BY sex, participant_type");
        let r = client.query(&sql).await.unwrap();
        let b_n: f64 = r.schema.field(2).metadata()[META_NOISE_SCALE]
            .parse()
            .unwrap();
        // The SUM's scale is in value units; birth_year's precision is 1.
        let b_s_units: f64 = r.schema.field(3).metadata()[META_NOISE_SCALE]
            .parse()
            .unwrap();
        for batch in &r.batches {
            for row in 0..batch.num_rows() {
                let (n, s) = exact(&key(batch, 0, row), &key(batch, 1, row));
                let noisy_n = cell(batch, 2, row).unwrap();
                let noisy_s = cell(batch, 3, row).unwrap();
                normalised.push((noisy_n - n).abs() / mean_abs(b_n));
                scales.push(b_n);
                normalised.push((noisy_s - s).abs() / mean_abs(b_s_units));
                scales.push(b_s_units);
            }
        }
    }
    let p_fail = chernoff(&scales, 0.1);
    assert!(
        p_fail < 1e-9,
        "{} samples give a false-failure bound of {p_fail:e}; use more runs",
        scales.len()
    );
    let mean = normalised.iter().sum::<f64>() / normalised.len() as f64;
    let half = (normalised.len() / 2) as f64;
    let mc = normalised.iter().step_by(2).sum::<f64>() / half;
    let ms = normalised.iter().skip(1).step_by(2).sum::<f64>() / half;
    eprintln!("MAE / predicted: COUNT {mc:.4}, SUM {ms:.4}, both {mean:.4}");
    assert!(
        (mean - 1.0).abs() <= 0.1,
        "mean absolute error / predicted = {mean} over {} samples",
        normalised.len()
    );
    fed.shutdown().await.unwrap();
}
