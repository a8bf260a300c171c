//! `fedq bench`: the reference queries through a loopback federation and, in the same run,
//! the exact non-private query with DataFusion over the combined files. Prints medians and
//! their ratio.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client::FedqClient;
use crate::exact::union_context;
use crate::federation::{FederationOptions, LocalFederation};
use crate::CliError;

/// Reference queries (scan-heavy first).
pub const BENCH_QUERIES: &[(&str, &str)] = &[
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
        "participants_by_sex",
        "SELECT sex, COUNT(*), AVG(birth_year) FROM participants GROUP BY sex",
    ),
    (
        "specimens_stored_volume",
        "SELECT kind, SUM(volume_ml) FROM specimens WHERE status = 'stored' GROUP BY kind",
    ),
    // Cohorts (participant sets and derived tables).
    (
        "cohort_three_tables",
        "SELECT COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') \
         AND pid IN (SELECT pid FROM labs WHERE test = 'HbA1c' GROUP BY pid HAVING COUNT(*) >= 3)",
    ),
    (
        "cohort_join_three_tables",
        "SELECT COUNT(DISTINCT p.pid) FROM participants p JOIN diagnoses d ON d.pid = p.pid \
         JOIN labs l ON l.pid = p.pid WHERE d.code = 'E11' AND l.test = 'HbA1c' AND l.value >= 6.5",
    ),
    (
        "cohort_anti_join",
        "SELECT sex, COUNT(*) FROM participants WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') \
         AND pid NOT IN (SELECT pid FROM diagnoses WHERE code = 'I10') GROUP BY sex",
    ),
    (
        "cohort_first_event",
        "SELECT p.sex, COUNT(*) FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses \
         WHERE code = 'E11' GROUP BY pid) f JOIN participants p USING (pid) \
         WHERE f.first_on >= DATE '2015-01-01' GROUP BY p.sex",
    ),
];

/// Bench settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Directory written by `fedq synth`.
    pub dir: PathBuf,
    /// Timed runs per query and side (after one warm-up each).
    pub runs: usize,
    /// `(name, sql)` to run instead of [`BENCH_QUERIES`]; empty for the reference set.
    pub queries: Vec<(String, String)>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Run the benchmark and print a table.
pub async fn run(cfg: BenchConfig) -> Result<(), CliError> {
    if cfg.runs == 0 {
        return Err(CliError::User("--runs must be at least 1".into()));
    }
    let mut tok = [0u8; 16];
    opendp::traits::samplers::fill_bytes(&mut tok)
        .map_err(|e| CliError::User(format!("no randomness for a bench password: {e}")))?;
    let password = hex::encode(tok);
    let mut id = [0u8; 6];
    opendp::traits::samplers::fill_bytes(&mut id)
        .map_err(|e| CliError::User(format!("no randomness for a bench user: {e}")))?;
    let user = format!("bench-{}", hex::encode(id));
    let opts = FederationOptions {
        // A researcher of its own per run: replays are per researcher and survive in the
        // ledger, so an earlier bench's answers must not be served as free replays.
        extra_researchers: vec![(user.clone(), password.clone(), 1e12)],
        ..Default::default()
    };
    let fed = LocalFederation::start(&cfg.dir, opts).await?;
    let mut client = FedqClient::connect(&fed.url(), &user, &password).await?;
    let ctx = union_context(&cfg.dir).await?;
    println!(
        "fedq bench: {} nodes on loopback, {} runs per query and side, interleaved",
        fed.nodes.len(),
        cfg.runs
    );
    println!(
        "{:<26} {:>14} {:>16} {:>8}",
        "query", "federated ms", "centralised ms", "ratio"
    );
    // Identical queries are free replays served from the ledger; a distinct ε per run makes
    // every federated run a real one (fan-out, bounding, noise, charge).
    let mut run_no = 0u32;
    let set_fresh_epsilon =
        |run: u32| format!("SET fedq.epsilon = {}", 1.0 + f64::from(run) * 1e-4);
    let queries: Vec<(String, String)> = if cfg.queries.is_empty() {
        BENCH_QUERIES
            .iter()
            .map(|(n, q)| (n.to_string(), q.to_string()))
            .collect()
    } else {
        cfg.queries.clone()
    };
    for (name, sql) in &queries {
        // Warm-up both sides (file metadata caches, connections).
        run_no += 1;
        client.query(&set_fresh_epsilon(run_no)).await?;
        client.query(sql).await?;
        ctx.sql(sql).await?.collect().await?;
        let mut fed_t = Vec::new();
        let mut cen_t = Vec::new();
        for _ in 0..cfg.runs {
            run_no += 1;
            client.query(&set_fresh_epsilon(run_no)).await?;
            let t = Instant::now();
            let r = client.query(sql).await?;
            if r.schema.metadata().get("fedq.replay").map(String::as_str) == Some("true") {
                return Err(CliError::User("bench: a run was served as a replay".into()));
            }
            fed_t.push(t.elapsed());
            let t = Instant::now();
            ctx.sql(sql).await?.collect().await?;
            cen_t.push(t.elapsed());
        }
        let (f, c) = (median(fed_t), median(cen_t));
        println!(
            "{:<26} {:>14.1} {:>16.1} {:>8.2}",
            name,
            f.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            f.as_secs_f64() / c.as_secs_f64()
        );
    }
    fed.shutdown().await?;
    Ok(())
}
