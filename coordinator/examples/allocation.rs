//! Measures the error of AVG and STDDEV under fedq's balanced ε split against the naive even
//! split, with OpenDP's discrete Laplace noise on fixed exact values.
//!
//! Run: `cargo run -p fedq-coordinator --example allocation [-- TRIALS]`
//!
//! For each scenario (a query, a number N of values, their true mean and standard
//! deviation), the query is planned twice under the same catalog and ε = 1 — once with
//! `Allocation::Balanced`, once with `Allocation::Even` — and the released value is computed
//! TRIALS times (default 20000) from freshly noised statistics exactly as `release` does
//! (`avg_value`, `VarianceShape::value`). It prints the root-mean-square error and the
//! empirical 95th percentile of |error| of each, the fraction of releases whose reported
//! per-row 95% half-width (`fedq.ci95_half_width`, delta method) covers the truth, and the
//! MSE ratio balanced/even with its standard error (delta method over the trials).

use fedq_common::Catalog;
use fedq_coordinator::noise::DiscreteLaplace;
use fedq_coordinator::planner::{AggregateOutput, Allocation, Planner};
use fedq_coordinator::release::{avg_ci95, avg_value, VarianceShape};

const CATALOG: &str = r#"
max_sites_per_unit = 2
[tables.participants]
max_rows_per_unit = 1
columns = [
  { name = "pid", type = "utf8" },
  { name = "birth_year", type = "int32", lower = 1900, upper = 2030 },
]
[tables.labs]
max_rows_per_unit = 20
columns = [
  { name = "pid", type = "utf8" },
  { name = "value", type = "float64", nullable = true, lower = 0.0, upper = 500.0, precision = 0.01 },
]
"#;

struct Scenario {
    what: &'static str,
    sql: &'static str,
    n: i128,
    mean: f64,
    sd: f64,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        what: "birth year, mean near the midpoint 1965",
        sql: "SELECT AVG(birth_year) FROM participants",
        n: 300,
        mean: 1962.0,
        sd: 17.0,
    },
    Scenario {
        what: "birth year, mean 30 years off the midpoint",
        sql: "SELECT AVG(birth_year) FROM participants",
        n: 300,
        mean: 1995.0,
        sd: 17.0,
    },
    Scenario {
        what: "LDL (mg/dL) in [0, 500]: mean 130",
        sql: "SELECT AVG(value) FROM labs",
        n: 5_000,
        mean: 130.0,
        sd: 35.0,
    },
    Scenario {
        what: "HbA1c (%) in [0, 500]: mean 6, at the lower bound",
        sql: "SELECT AVG(value) FROM labs",
        n: 5_000,
        mean: 6.0,
        sd: 1.0,
    },
    Scenario {
        what: "birth year, STDDEV",
        sql: "SELECT STDDEV(birth_year) FROM participants",
        n: 1_000,
        mean: 1962.0,
        sd: 17.0,
    },
    Scenario {
        what: "LDL, STDDEV",
        sql: "SELECT STDDEV(value) FROM labs",
        n: 5_000,
        mean: 130.0,
        sd: 35.0,
    },
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trials: usize = match std::env::args().nth(1) {
        Some(t) => t.parse()?,
        None => 20_000,
    };
    let catalog = Catalog::from_toml(CATALOG, "allocation example")?;
    println!("ε = 1 per query, {trials} trials per row; errors in the column's units\n");
    println!(
        "{:<72} {:>8} {:>7} {:>7} {:>7} {:>9} {:>9} {:>8}",
        "scenario", "split", "ε_sum", "ε_count", "ε_sq", "RMSE", "95% |err|", "covered"
    );
    for sc in SCENARIOS {
        let mut mse = Vec::new();
        for rule in [Allocation::Balanced, Allocation::Even] {
            let planner = Planner::new(&catalog)?.with_allocation(rule);
            let q = planner.plan(sc.sql, 1.0, "bench").await?;
            let mechs: Vec<DiscreteLaplace> = q
                .statistics
                .iter()
                .map(|s| DiscreteLaplace::new(s.sensitivity, &s.epsilon))
                .collect::<Result<_, _>>()?;
            let eps = |i: usize| q.statistics[i].epsilon.to_f64().value();
            let mut errs: Vec<f64> = Vec::with_capacity(trials);
            // How often the per-row 95% half-width the release reports covers the truth.
            let mut covered = 0usize;
            let (shares, truth): ((f64, f64, f64), f64);
            match &q.outputs[0] {
                AggregateOutput::Avg {
                    sum_stat,
                    count_stat,
                    bounds,
                    mid_fp,
                } => {
                    let p = bounds.precision;
                    let s_exact = ((sc.mean / p).round() as i128 - mid_fp) * sc.n;
                    truth = sc.mean;
                    shares = (eps(*sum_stat), eps(*count_stat), 0.0);
                    for _ in 0..trials {
                        let s = mechs[*sum_stat].release(s_exact)?;
                        let c = mechs[*count_stat].release(sc.n)?;
                        let v = avg_value(s, c, *mid_fp, bounds).unwrap_or(bounds.lower);
                        let hw = avg_ci95(
                            mechs[*sum_stat].scale() * p,
                            mechs[*count_stat].scale(),
                            s as f64 * p / c as f64,
                            c as f64,
                        );
                        covered += usize::from((v - truth).abs() <= hw);
                        errs.push(v - truth);
                    }
                }
                AggregateOutput::Variance {
                    count_stat,
                    sum_stat,
                    sq_stat,
                    bounds,
                    half_fp,
                    sample,
                    sqrt,
                } => {
                    let p = bounds.precision;
                    let mid = fedq_common::wire::fixed_midpoint(bounds.lower, bounds.upper, p);
                    let a = (sc.mean / p).round() - mid as f64;
                    let s_exact = (a * sc.n as f64).round() as i128;
                    let q_exact = (sc.n as f64
                        * ((sc.sd / p).powi(2) * (sc.n as f64 - 1.0) / sc.n as f64 + a * a))
                        .round() as i128;
                    let shape = VarianceShape {
                        half: *half_fp as f64 * p,
                        precision: p,
                        sample: *sample,
                        sqrt: *sqrt,
                    };
                    truth = shape.value(sc.n, s_exact, q_exact).unwrap_or(0.0);
                    shares = (eps(*sum_stat), eps(*count_stat), eps(*sq_stat));
                    for _ in 0..trials {
                        let n = mechs[*count_stat].release(sc.n)?;
                        let s = mechs[*sum_stat].release(s_exact)?;
                        let sq = mechs[*sq_stat].release(q_exact)?;
                        let v = shape.value(n, s, sq).unwrap_or(0.0);
                        let hw = shape.ci95(
                            v,
                            mechs[*sq_stat].scale() * p * p,
                            mechs[*sum_stat].scale() * p,
                            mechs[*count_stat].scale(),
                            n,
                            s,
                            sq,
                        );
                        covered += usize::from((v - truth).abs() <= hw);
                        errs.push(v - truth);
                    }
                }
                other => return Err(format!("unexpected output {other:?}").into()),
            }
            let sq: Vec<f64> = errs.iter().map(|e| e * e).collect();
            let m = sq.iter().sum::<f64>() / trials as f64;
            let var_sq = sq.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (trials as f64 - 1.0);
            mse.push((m, var_sq / trials as f64));
            let mut abs: Vec<f64> = errs.iter().map(|e| e.abs()).collect();
            abs.sort_by(|a, b| a.total_cmp(b));
            let q95 = abs[(0.95 * trials as f64) as usize];
            println!(
                "{:<72} {:>8} {:>7.3} {:>7.3} {:>7.3} {:>9.4} {:>9.4} {:>8.4}",
                format!("{} (N={}, truth {:.2})", sc.what, sc.n, truth),
                match rule {
                    Allocation::Balanced => "balanced",
                    Allocation::Even => "even",
                },
                shares.0,
                shares.1,
                shares.2,
                m.sqrt(),
                q95,
                covered as f64 / trials as f64
            );
        }
        // MSE ratio and its standard error (delta method, independent runs).
        let (mb, vb) = mse[0];
        let (me, ve) = mse[1];
        let r = mb / me;
        let se = r * (vb / (mb * mb) + ve / (me * me)).sqrt();
        println!("{:<72} MSE balanced/even = {r:.3} ± {se:.3}\n", "");
    }
    Ok(())
}
