//! Shared fixtures for fedq's end-to-end tests: a synthetic federation on loopback, and
//! exact expected values computed with DataFusion over the union of the sites' files.

use std::path::Path;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::prelude::SessionContext;
use fedq::federation::{FederationOptions, LocalFederation};

/// Generate a small synthetic federation into `dir`.
pub fn synth(dir: &Path, sites: usize, participants: usize, seed: u64) {
    fedq_synth::generate(&fedq_synth::SynthConfig {
        sites,
        participants,
        seed,
        out_dir: dir.to_path_buf(),
        base_port: 50050,
    })
    .expect("synth");
}

/// Rewrite `max_rows_per_unit` of every table in the catalog (e.g. to rule out truncation).
pub fn set_rows_per_unit(dir: &Path, r: u32) {
    let p = dir.join("catalog.toml");
    let mut cat = fedq_common::Catalog::load(&p).expect("catalog");
    for t in cat.tables.values_mut() {
        t.max_rows_per_unit = r;
    }
    std::fs::write(&p, toml::to_string(&cat).expect("toml")).expect("write catalog");
}

/// Rewrite the catalog's `max_sites_per_unit` (S).
pub fn set_sites_per_unit(dir: &Path, s: u32) {
    let p = dir.join("catalog.toml");
    let mut cat = fedq_common::Catalog::load(&p).expect("catalog");
    cat.max_sites_per_unit = s;
    std::fs::write(&p, toml::to_string(&cat).expect("toml")).expect("write catalog");
}

/// Start a federation with suppression off (so every noisy value can be checked).
pub async fn start(dir: &Path) -> LocalFederation {
    LocalFederation::start(
        dir,
        FederationOptions {
            min_reported_count: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("federation")
}

/// A cell as f64 (NULL -> None).
pub fn cell(b: &RecordBatch, col: usize, row: usize) -> Option<f64> {
    let a = b.column(col);
    if a.is_null(row) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Int64 => a.as_primitive::<Int64Type>().value(row) as f64,
        DataType::Float64 => a.as_primitive::<Float64Type>().value(row),
        DataType::Decimal128(_, _) => a
            .as_primitive::<datafusion::arrow::datatypes::Decimal128Type>()
            .value(row) as f64,
        other => panic!("unexpected type {other}"),
    })
}

/// A cell as a string key.
pub fn key(b: &RecordBatch, col: usize, row: usize) -> String {
    let a = b.column(col);
    datafusion::arrow::util::display::ArrayFormatter::try_new(a.as_ref(), &Default::default())
        .expect("fmt")
        .value(row)
        .to_string()
}

/// Every catalog table as the union of the sites' files, with the site's index as an
/// extra `fedq_site` column, so that joins can pair only rows of the same site.
pub async fn site_context(dir: &Path) -> SessionContext {
    let ctx = SessionContext::new();
    let catalog = fedq_common::Catalog::load(&dir.join("catalog.toml")).expect("catalog");
    let sites = fedq::federation::site_dirs(dir).expect("site directories");
    for name in catalog.tables.keys() {
        let mut parts = Vec::new();
        for (i, site) in sites.iter().enumerate() {
            let file = site.join(format!("{name}.parquet"));
            let part = format!("{name}_{i}");
            ctx.register_parquet(&part, file.to_str().expect("path"), Default::default())
                .await
                .expect("register site file");
            parts.push(format!("SELECT {i} AS fedq_site, * FROM {part}"));
        }
        ctx.sql(&format!(
            "CREATE VIEW {name} AS {}",
            parts.join(" UNION ALL ")
        ))
        .await
        .expect("create view");
    }
    ctx
}
