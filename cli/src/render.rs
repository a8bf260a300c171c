//! Text rendering of fedq results: an aligned table with a `±95%` column after each noisy
//! column, then the ε spent and remaining and the sites that answered.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use fedq_coordinator::explain::META_EXPLAIN;
use fedq_coordinator::release::{
    META_CI95, META_DELTA_SPENT, META_EPSILON_REMAINING, META_EPSILON_SPENT, META_MAX_ROWS,
    META_SELECTION_THRESHOLD, META_SITES_ANSWERED, META_SITES_ASKED, META_TRUNCATED,
    META_TRUNCATED_CI95,
};

use crate::CliError;

fn fmt_f(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Render a result as text. An EXPLAIN answer shows its table without the long `detail`
/// column, then each row's detail as a numbered note.
pub fn render(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String, CliError> {
    if schema.metadata().get(META_EXPLAIN).map(String::as_str) == Some("true") {
        if let Ok(i) = schema.index_of("detail") {
            let keep: Vec<usize> = (0..schema.fields().len()).filter(|&c| c != i).collect();
            let short = std::sync::Arc::new(schema.project(&keep)?);
            let mut projected = Vec::with_capacity(batches.len());
            let mut notes = Vec::new();
            for b in batches {
                projected.push(b.project(&keep)?);
                let fmt = ArrayFormatter::try_new(b.column(i).as_ref(), &FormatOptions::default())?;
                let names = ArrayFormatter::try_new(
                    b.column(schema.index_of("name")?).as_ref(),
                    &FormatOptions::default(),
                )?;
                for r in 0..b.num_rows() {
                    let d = fmt.value(r).to_string();
                    if !d.is_empty() {
                        notes.push(format!("[{}] {}: {d}", notes.len() + 1, names.value(r)));
                    }
                }
            }
            let mut out = render_table(&short, &projected)?;
            out.push('\n');
            for n in notes {
                out.push_str(&n);
                out.push('\n');
            }
            return Ok(out);
        }
    }
    render_table(schema, batches)
}

fn render_table(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String, CliError> {
    let opts = FormatOptions::default().with_null("NULL");
    let nrows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut headers: Vec<String> = Vec::new();
    let mut cols: Vec<Vec<String>> = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let mut vals = Vec::with_capacity(nrows);
        for b in batches {
            let fmt = ArrayFormatter::try_new(b.column(i).as_ref(), &opts)?;
            for r in 0..b.num_rows() {
                let v = fmt.value(r).to_string();
                vals.push(match b.column(i).data_type() {
                    datafusion::arrow::datatypes::DataType::Float64 => {
                        v.parse::<f64>().map(fmt_f).unwrap_or(v)
                    }
                    _ => v,
                });
            }
        }
        headers.push(f.name().clone());
        cols.push(vals);
        if let Some(ci) = f.metadata().get(META_CI95) {
            let per_row: Vec<String> = match serde_json::from_str::<serde_json::Value>(ci) {
                Ok(serde_json::Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_f64()
                            .map(|x| format!("±{}", fmt_f(x)))
                            .unwrap_or_default()
                    })
                    .collect(),
                Ok(serde_json::Value::Number(n)) => {
                    let s = format!("±{}", fmt_f(n.as_f64().unwrap_or(0.0)));
                    vec![s; nrows]
                }
                _ => vec![String::new(); nrows],
            };
            headers.push("±95%".into());
            cols.push(per_row);
        }
    }
    let widths: Vec<usize> = headers
        .iter()
        .zip(&cols)
        .map(|(h, c)| {
            c.iter()
                .map(|s| s.chars().count())
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}", w = *w))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    let hs: Vec<&str> = headers.iter().map(String::as_str).collect();
    line(&mut out, &hs);
    let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let seps: Vec<&str> = sep.iter().map(String::as_str).collect();
    line(&mut out, &seps);
    for r in 0..nrows {
        let row: Vec<&str> = cols
            .iter()
            .map(|c| c.get(r).map(String::as_str).unwrap_or(""))
            .collect();
        line(&mut out, &row);
    }
    let md = schema.metadata();
    if let Some(spent) = md.get(META_EPSILON_SPENT) {
        let remaining = md.get(META_EPSILON_REMAINING).cloned().unwrap_or_default();
        out.push_str(&format!("ε spent: {spent}   ε remaining: {remaining}"));
        if md.get("fedq.replay").map(String::as_str) == Some("true") {
            out.push_str("   (replay: the stored answer to your identical earlier query, free)");
        }
        out.push('\n');
    }
    if let Some(ans) = md.get(META_SITES_ANSWERED) {
        let n_ans = ans.split(',').filter(|s| !s.is_empty()).count();
        let n_ask = md
            .get(META_SITES_ASKED)
            .map(|a| a.split(',').filter(|s| !s.is_empty()).count())
            .unwrap_or(n_ans);
        out.push_str(&format!("sites answered: {n_ans}/{n_ask} ({ans})\n"));
    }
    if let Some(t) = md.get(META_SELECTION_THRESHOLD) {
        let d = md.get(META_DELTA_SPENT).map(String::as_str).unwrap_or("?");
        out.push_str(&format!(
            "groups: only those whose noisy number of participants is at least {t} are shown (partition selection; δ spent: {d})\n"
        ));
    }
    if let (Some(t), Some(ci)) = (md.get(META_TRUNCATED), md.get(META_TRUNCATED_CI95)) {
        let r = md.get(META_MAX_ROWS).map(String::as_str).unwrap_or("R");
        let ci = ci
            .parse::<f64>()
            .map(|c| format!("{c:.0}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "bounding: ~{t} ± {ci} participants had more than R = {r} rows, so some of their rows were left out\n"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_coordinator::planner::Planner;

    #[tokio::test]
    async fn explain_renders_a_table_and_numbered_notes() {
        let cat = fedq_common::Catalog::from_toml(
            r#"
max_sites_per_unit = 2
[tables.participants]
max_rows_per_unit = 1
columns = [
  { name = "pid", type = "utf8" },
  { name = "birth_year", type = "int32", lower = 1900, upper = 2030 },
]
"#,
            "test",
        )
        .unwrap();
        let q = Planner::new(&cat)
            .unwrap()
            .plan("SELECT AVG(birth_year) AS a FROM participants", 1.0, "q")
            .await
            .unwrap();
        let (schema, batches) = fedq_coordinator::explain::explain_batch(&q, 11).unwrap();
        let out = render(&schema, &batches).unwrap();
        let header = out.lines().next().unwrap();
        assert!(header.contains("sensitivity") && header.contains("ci95_half_width"));
        assert!(!header.contains("detail"), "{header}");
        assert!(out.contains("R·S·half-width/precision = 1·2·65"), "{out}");
        assert!(out.contains("[2] participants: {"), "{out}");
        assert!(out.contains("a: AVG = midpoint"), "{out}");
    }
}
