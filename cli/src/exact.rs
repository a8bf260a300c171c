//! Exact, NON-PRIVATE answers over the union of all sites' files.
//!
//! This reads the synthetic files directly with DataFusion; it exists for the demo (printed
//! beside the noisy answers and labelled as such), the tests and the benchmark's
//! centralised baseline. No coordinator or network path uses it.

use std::path::Path;
use std::sync::Arc;

use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use fedq_common::Catalog;

use crate::federation::site_dirs;
use crate::CliError;

/// A DataFusion context with every catalog table registered as the union of the sites'
/// Parquet files.
pub async fn union_context(dir: &Path) -> Result<SessionContext, CliError> {
    let ctx = SessionContext::new();
    let catalog =
        Catalog::load(&dir.join("catalog.toml")).map_err(|e| CliError::User(e.to_string()))?;
    let sites = site_dirs(dir)?;
    for name in catalog.tables.keys() {
        let mut urls = Vec::new();
        for s in &sites {
            let p = s.join(format!("{name}.parquet"));
            if p.is_file() {
                let abs = p.canonicalize()?;
                urls.push(ListingTableUrl::parse(abs.to_string_lossy())?);
            }
        }
        if urls.is_empty() {
            continue;
        }
        let opts =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let cfg = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(opts)
            .infer_schema(&ctx.state())
            .await?;
        ctx.register_table(name.as_str(), Arc::new(ListingTable::try_new(cfg)?))?;
    }
    Ok(ctx)
}
