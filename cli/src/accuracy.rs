//! `fedq accuracy`: per query and output, the bias that contribution bounding introduces and
//! the error of the noisy answer at ε = 1, both relative to the exact non-private answer
//! (DataFusion over the union of the sites' files, no bounding).
//!
//! - *bounded* is the pre-noise value the federation computes (the coordinator's own gather,
//!   then COUNT/SUM/AVG from the exact partials); *bias* = bounded / exact − 1. Truncation
//!   makes it negative for counts; for `COUNT(DISTINCT pid)` a participant at two sites is
//!   counted at both, which makes it positive.
//! - *error* is the mean absolute difference between the noisy answers of `--runs` real
//!   queries (each charged, ε ≈ 1) and the exact answer, as a percentage of the exact answer.
//!
//! The exact values are printed for measurement only; no coordinator or network path uses
//! them.

use std::collections::HashMap;
use std::path::PathBuf;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::ArrayFormatter;
use fedq_common::PublicValue;
use fedq_coordinator::planner::{AggregateOutput, StatisticKind};

use crate::client::FedqClient;
use crate::exact::union_context;
use crate::federation::{FederationOptions, LocalFederation};
use crate::CliError;

/// Reference query shapes for the accuracy report.
pub const ACCURACY_QUERIES: &[(&str, &str)] = &[
    (
        "labs_by_test",
        "SELECT test, COUNT(*), AVG(value) FROM labs GROUP BY test",
    ),
    (
        "labs_recent_hba1c",
        "SELECT COUNT(*), AVG(value) FROM labs WHERE test = 'HbA1c' AND measured_on >= DATE '2020-01-01'",
    ),
    (
        "diagnoses_e11",
        "SELECT COUNT(*) FROM diagnoses WHERE code = 'E11'",
    ),
    (
        "e11_patients",
        "SELECT COUNT(DISTINCT pid) FROM diagnoses WHERE code = 'E11'",
    ),
    (
        "participants_by_sex",
        "SELECT sex, COUNT(*), AVG(birth_year) FROM participants GROUP BY sex",
    ),
    (
        "specimens_stored_volume",
        "SELECT kind, SUM(volume_ml) FROM specimens WHERE status = 'stored' GROUP BY kind",
    ),
    (
        "hba1c_by_sex_join",
        "SELECT p.sex, COUNT(*), AVG(l.value) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' GROUP BY p.sex",
    ),
    (
        "creatinine_median_type",
        "SELECT p.participant_type, MEDIAN(l.value) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'creatinine' GROUP BY p.participant_type",
    ),
    (
        "birth_year_p90_by_sex",
        "SELECT sex, APPROX_PERCENTILE_CONT(birth_year, 0.9) FROM participants GROUP BY sex",
    ),
    (
        "participants_by_decade",
        "SELECT birth_year / 10 * 10, COUNT(*) FROM participants GROUP BY 1",
    ),
    (
        "hba1c_by_cohort_case",
        "SELECT CASE WHEN p.birth_year < 1960 THEN 'before 1960' WHEN p.birth_year < 1980 THEN '1960-1979' ELSE '1980 on' END, \
         COUNT(*), COUNT(DISTINCT l.pid) FROM labs l JOIN participants p USING (pid) WHERE l.test = 'HbA1c' GROUP BY 1",
    ),
    (
        "hba1c_by_month",
        "SELECT date_part('month', measured_on), COUNT(*) FROM labs WHERE test = 'HbA1c' GROUP BY 1",
    ),
    (
        "brca2_codes_selected",
        "SELECT code, COUNT(*) FROM diagnoses JOIN variants USING (pid) WHERE gene = 'BRCA2' GROUP BY code",
    ),
];

/// Settings of `fedq accuracy`.
#[derive(Debug, Clone)]
pub struct AccuracyConfig {
    /// Directory written by `fedq synth`.
    pub dir: PathBuf,
    /// Noisy runs per query.
    pub runs: usize,
}

fn cell_f64(b: &RecordBatch, col: usize, row: usize) -> Option<f64> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{
        DataType, Decimal128Type, Float64Type, Int32Type, Int64Type,
    };
    let a = b.column(col);
    if a.is_null(row) {
        return None;
    }
    match a.data_type() {
        DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(row) as f64),
        DataType::Int32 => Some(f64::from(a.as_primitive::<Int32Type>().value(row))),
        DataType::Float64 => Some(a.as_primitive::<Float64Type>().value(row)),
        DataType::Decimal128(_, s) => {
            Some(a.as_primitive::<Decimal128Type>().value(row) as f64 / 10f64.powi(*s as i32))
        }
        _ => None,
    }
}

fn key_of(b: &RecordBatch, nk: usize, row: usize) -> Result<Vec<String>, CliError> {
    (0..nk)
        .map(|c| {
            let f = ArrayFormatter::try_new(b.column(c).as_ref(), &Default::default())?;
            Ok(f.value(row).to_string())
        })
        .collect()
}

/// `group key -> output values` of an answer with `nk` key columns then the outputs.
fn table_of(
    batches: &[RecordBatch],
    nk: usize,
    n_out: usize,
) -> Result<HashMap<Vec<String>, Vec<Option<f64>>>, CliError> {
    let mut out = HashMap::new();
    for b in batches {
        for row in 0..b.num_rows() {
            let vals = (nk..nk + n_out).map(|c| cell_f64(b, c, row)).collect();
            out.insert(key_of(b, nk, row)?, vals);
        }
    }
    Ok(out)
}

/// Run the report and print it.
pub async fn run(cfg: AccuracyConfig) -> Result<(), CliError> {
    if cfg.runs == 0 {
        return Err(CliError::User("--runs must be at least 1".into()));
    }
    let mut tok = [0u8; 16];
    opendp::traits::samplers::fill_bytes(&mut tok)
        .map_err(|e| CliError::User(format!("no randomness for a token: {e}")))?;
    let token = hex::encode(tok);
    let researcher = format!("accuracy-{}", &token[..12]);
    let fed = LocalFederation::start(
        &cfg.dir,
        FederationOptions {
            extra_researchers: vec![(researcher.clone(), token.clone(), 1e12)],
            min_reported_count: Some(0),
            ..Default::default()
        },
    )
    .await?;
    let engine = fed.coordinator.engine.clone();
    let mut client = FedqClient::connect(&fed.url(), &researcher, &token).await?;
    let ctx = union_context(&cfg.dir).await?;
    println!(
        "fedq accuracy: {} nodes, {} noisy runs per query at ε ≈ 1; exact = DataFusion over all files, no bounding (measurement only)",
        fed.nodes.len(),
        cfg.runs
    );
    println!(
        "{:<24} {:<22} {:<14} {:>14} {:>14} {:>9} {:>12} {:>9}",
        "query", "output", "group", "exact", "bounded", "bias %", "MAE", "MAE %"
    );
    let mut run_no = 0u32;
    for (name, sql) in ACCURACY_QUERIES {
        let q = engine.plan(&researcher, sql).await?;
        let nk = q.groups.len();
        let n_out = q.outputs.len();
        let merged = engine.gather(&q).await?;
        // Exact, non-private.
        let exact_batches = ctx.sql(sql).await?.collect().await?;
        let exact = table_of(&exact_batches, nk, n_out)?;
        // Bounded, pre-noise: each output from the exact merged partials.
        let mut bounded: HashMap<Vec<String>, Vec<Option<f64>>> = HashMap::new();
        for (k, p) in &merged.groups {
            let ks: Vec<String> = k.iter().map(PublicValue::to_string).collect();
            let vals = q
                .outputs
                .iter()
                .map(|out| match out {
                    AggregateOutput::Count { stat } => match q.statistics[*stat].kind {
                        StatisticKind::Count { partial } => Some(p[partial] as f64),
                        _ => None,
                    },
                    AggregateOutput::Sum { stat, .. } => match q.statistics[*stat].kind {
                        StatisticKind::Sum { partial, precision } => {
                            Some(p[partial] as f64 * precision)
                        }
                        _ => None,
                    },
                    AggregateOutput::Avg {
                        sum_stat, bounds, ..
                    } => match q.statistics[*sum_stat].kind {
                        StatisticKind::CentredSum { sum, count, .. } if p[count] > 0 => {
                            Some(p[sum] as f64 * bounds.precision / p[count] as f64)
                        }
                        _ => None,
                    },
                    AggregateOutput::Variance { .. } | AggregateOutput::Quantile { .. } => None,
                })
                .collect();
            bounded.insert(ks, vals);
        }
        // Noisy runs.
        let mut abs_err: HashMap<(Vec<String>, usize), (f64, usize)> = HashMap::new();
        for _ in 0..cfg.runs {
            run_no += 1;
            client
                .query(&format!(
                    "SET fedq.epsilon = {}",
                    1.0 + f64::from(run_no) * 1e-6
                ))
                .await?;
            let r = client.query(sql).await?;
            let noisy = table_of(&r.batches, nk, n_out)?;
            for (k, vals) in &noisy {
                for (j, v) in vals.iter().enumerate() {
                    let (Some(v), Some(Some(e))) = (v, exact.get(k).map(|x| x[j])) else {
                        continue;
                    };
                    let a = abs_err.entry((k.clone(), j)).or_insert((0.0, 0));
                    a.0 += (v - e).abs();
                    a.1 += 1;
                }
            }
        }
        let mut keys: Vec<&Vec<String>> = exact.keys().collect();
        keys.sort();
        for k in keys {
            for j in 0..n_out {
                let Some(e) = exact[k][j] else { continue };
                let b = bounded.get(k).and_then(|v| v[j]);
                let (mae, n) = abs_err.get(&(k.clone(), j)).copied().unwrap_or((0.0, 0));
                let mae = if n > 0 { mae / n as f64 } else { f64::NAN };
                let out_name = q.aggregate_schema.field(nk + j).name().clone();
                println!(
                    "{:<24} {:<22} {:<14} {:>14.2} {:>14} {:>9} {:>12.3} {:>9.3}",
                    name,
                    out_name.chars().take(22).collect::<String>(),
                    if k.is_empty() {
                        "-".to_string()
                    } else {
                        k.join(",")
                    },
                    e,
                    b.map(|b| format!("{b:.2}")).unwrap_or_else(|| "-".into()),
                    b.map(|b| format!("{:+.2}", (b / e - 1.0) * 100.0))
                        .unwrap_or_else(|| "-".into()),
                    mae,
                    mae / e.abs() * 100.0
                );
            }
        }
    }
    fed.shutdown().await?;
    Ok(())
}
