//! Empirical privacy check of the whole pipeline, from the SQL to the released value.
//!
//! Two neighbouring federations differ in one participant who has the maximum allowed rows
//! (R lab results, R = 1000 so that bounding keeps everyone's rows and the exact sums are
//! fixed) at the value extreme (500, the upper bound), at one site, with S = 1, so that this
//! participant moves the exact sum by exactly the sensitivity. Each
//! federation answers the same query N times at ε = 1 (a no-op filter makes every run a new
//! query rather than a free replay). For threshold events {answer > t} and their complements
//! the test estimates both probabilities and checks that the privacy loss
//! ln(P_B(E) / P_A(E)) cannot exceed the claimed ε: it compares the lower confidence bound
//! of the larger probability with the upper confidence bound of the smaller one.
//!
//! Confidence: each of the 12 probability estimates is within its Hoeffding half-width
//! sqrt(ln(2/α)/(2N)) with probability 1 − α, α = 5e-11, so the whole test fails falsely
//! with probability below 12·5e-11 = 6e-10. The same bounds show the check is not vacuous:
//! at the midpoint threshold the loss is at least 0.3 (its expected value is about 0.8), so a
//! federation that added half the noise it claims (loss about 1.6) would fail.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Date32Array, Float64Array, RecordBatch, StringArray};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use fedq::client::FedqClient;
use fedq::federation::{FederationOptions, LocalFederation};
use fedq_tests::{cell, copy_dir, set_rows_per_unit, set_sites_per_unit, synth};

const N: usize = 2000;
const ALPHA: f64 = 5e-11;
const EPSILON: f64 = 1.0;

/// Add participant `pid` with `rows` HbA1c results of `value` to a labs file.
fn add_participant(labs: &Path, pid: &str, rows: usize, value: f64) {
    let f = std::fs::File::open(labs).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let cols: Vec<Arc<dyn datafusion::arrow::array::Array>> = schema
        .fields()
        .iter()
        .map(|f| -> Arc<dyn datafusion::arrow::array::Array> {
            match f.name().as_str() {
                "pid" => Arc::new(StringArray::from(vec![pid; rows])),
                "test" => Arc::new(StringArray::from(vec!["HbA1c"; rows])),
                "value" => Arc::new(Float64Array::from(vec![value; rows])),
                "measured_on" => Arc::new(Date32Array::from(vec![19000; rows])),
                other => panic!("unexpected labs column {other}"),
            }
        })
        .collect();
    batches.push(RecordBatch::try_new(schema.clone(), cols).unwrap());
    let out = std::fs::File::create(labs).unwrap();
    let mut w = ArrowWriter::try_new(out, schema, None).unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

async fn answers(dir: &Path) -> (Vec<f64>, f64) {
    let token = "privacy-test-token-0123456789abcdef".to_string();
    let fed = LocalFederation::start(
        dir,
        FederationOptions {
            min_reported_count: Some(0),
            extra_researchers: vec![("priv".into(), token.clone(), 1e5)],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let engine = fed.coordinator.engine.clone();
    let base = "SELECT SUM(value) AS s FROM labs WHERE test = 'HbA1c'";
    let q = engine.plan("priv", base).await.unwrap();
    let exact = engine.gather(&q).await.unwrap().get(&[], 1)[0] as f64 * 0.01;
    let mut client = FedqClient::connect(&fed.url(), "priv", &token)
        .await
        .unwrap();
    let mut out = Vec::with_capacity(N);
    for k in 0..N {
        let r = client
            .query(&format!("{base} AND pid <> 'nobody-{k}'"))
            .await
            .unwrap();
        out.push(cell(&r.batches[0], 0, 0).unwrap());
    }
    fed.shutdown().await.unwrap();
    (out, exact)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neighbouring_federations_are_epsilon_indistinguishable() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    synth(&a, 2, 400, 31);
    set_sites_per_unit(&a, 1);
    // R above everyone's row count: bounding keeps every row, so the exact sums are fixed
    // and differ by the neighbour's rows alone.
    set_rows_per_unit(&a, 1000);
    // Budgets large enough for N queries.
    let cfg = a.join("coordinator.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("epsilon_budget = 1000.0", "epsilon_budget = 100000.0"),
    )
    .unwrap();
    copy_dir(&a, &b);
    let cat = fedq_common::Catalog::load(&a.join("catalog.toml")).unwrap();
    let r = cat.table("labs").unwrap().max_rows_per_unit as usize;
    let upper = cat
        .table("labs")
        .unwrap()
        .column("value")
        .unwrap()
        .upper
        .unwrap();
    add_participant(
        &b.join("sites/site01/labs.parquet"),
        "pzz-neighbour",
        r,
        upper,
    );

    let (out_a, exact_a) = answers(&a).await;
    let (out_b, exact_b) = answers(&b).await;
    // The neighbour moves the exact sum by exactly R·upper, the sensitivity with S = 1.
    let delta = r as f64 * upper;
    assert!(
        (exact_b - exact_a - delta).abs() < 1e-6,
        "{exact_a} {exact_b}"
    );

    let h = ((2.0 / ALPHA).ln() / (2.0 * N as f64)).sqrt();
    let frac = |v: &[f64], t: f64| v.iter().filter(|&&x| x > t).count() as f64 / N as f64;
    let mut midpoint_loss = 0.0;
    for step in [0.25, 0.5, 0.75] {
        let t = exact_a + step * delta;
        let (pa, pb) = (frac(&out_a, t), frac(&out_b, t));
        // {answer > t} is likelier under B; its complement under A.
        for (hi, lo) in [(pb, pa), (1.0 - pa, 1.0 - pb)] {
            let lcb = (hi - h).max(0.0);
            let ucb = (lo + h).min(1.0);
            let loss_lower = (lcb / ucb).ln();
            assert!(
                loss_lower <= EPSILON,
                "threshold {t}: privacy loss at least {loss_lower} > ε = {EPSILON} \
                 (P = {hi} vs {lo}, N = {N})"
            );
        }
        eprintln!(
            "threshold exact_A + {step}Δ: P_A = {pa:.3}, P_B = {pb:.3}, estimated loss {:.3}",
            (pb / pa.max(1e-12)).ln()
        );
        if step == 0.5 {
            midpoint_loss = ((pb - h).max(1e-12) / (pa + h)).ln();
        }
    }
    assert!(
        midpoint_loss >= 0.3,
        "the neighbours should be distinguishable (loss ≥ 0.3), got {midpoint_loss}"
    );
}
