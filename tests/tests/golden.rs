//! Golden tests of the SQL surface, as data: every query of `tests/golden/cohorts.sql` is
//! planned against the synthetic catalog at ε = 1, and its outcome, the EXPLAIN table of an
//! accepted query (node request, row bound R, sensitivities, ε shares) or the refusal with
//! its message, is compared with the insta snapshot in `tests/tests/snapshots/`. A change
//! to what fedq accepts, how it plans it, or what it tells a researcher shows up as a diff
//! to review (`cargo insta review`, or `INSTA_UPDATE=always` to rewrite).

use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::array_value_to_string;
use fedq_coordinator::explain::explain_batch;
use fedq_coordinator::planner::Planner;

/// The queries of a golden file, each with the `-- #` heading it is under.
fn queries(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut sql = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("-- #") {
            heading = h.trim().to_string();
        } else if line.trim() == ";" {
            out.push((heading.clone(), sql.trim().to_string()));
            sql.clear();
        } else if !line.starts_with("--") {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    assert!(
        sql.trim().is_empty(),
        "a query without its closing `;`: {sql}"
    );
    out
}

/// One cell of the EXPLAIN table as text; floats to 6 significant digits.
fn cell(a: &dyn Array, row: usize) -> Option<String> {
    if a.is_null(row) {
        return None;
    }
    if a.data_type() == &DataType::Float64 {
        let v = a
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Float64Array>()
            .expect("float column")
            .value(row);
        return Some(format!("{v:.6e}"));
    }
    Some(array_value_to_string(a, row).expect("displayable"))
}

#[tokio::test]
async fn cohort_sql_is_planned_or_refused_as_recorded() {
    let catalog = fedq_synth::reference_catalog();
    let planner = Planner::new(&catalog)
        .expect("planner")
        .with_delta_per_query(1e-7);
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/cohorts.sql"),
    )
    .expect("tests/golden/cohorts.sql");
    let qs = queries(&text);
    assert!(qs.len() >= 60, "{} queries", qs.len());
    let mut out = String::new();
    let mut last = String::new();
    let (mut accepted, mut refused) = (0, 0);
    for (heading, sql) in &qs {
        if *heading != last {
            out.push_str(&format!("\n# {heading}\n"));
            last = heading.clone();
        }
        out.push_str(&format!("\n{sql}\n"));
        match planner.plan(sql, 1.0, "golden").await {
            Ok(q) => {
                accepted += 1;
                let (schema, batches) = explain_batch(&q, 0).expect("explain");
                for b in &batches {
                    for row in 0..b.num_rows() {
                        let cells: Vec<String> = schema
                            .fields()
                            .iter()
                            .enumerate()
                            .filter_map(|(c, f)| {
                                cell(b.column(c).as_ref(), row).map(|v| match f.name().as_str() {
                                    "item" | "name" => v,
                                    n => format!("{n}={v}"),
                                })
                            })
                            .collect();
                        out.push_str(&format!("  {}\n", cells.join(" | ")));
                    }
                }
            }
            Err(e) => {
                refused += 1;
                let message = e.to_string();
                let code = tonic::Status::from(e).code();
                out.push_str(&format!("  REFUSED ({code:?}): {message}\n"));
            }
        }
    }
    out.insert_str(
        0,
        &format!(
            "{} queries: {accepted} accepted, {refused} refused\n",
            qs.len()
        ),
    );
    insta::assert_snapshot!("cohorts", out);
}
