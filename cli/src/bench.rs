//! `fedq bench`: the reference queries through a loopback federation and, in the same run,
//! the exact non-private query with DataFusion over the combined files. Prints medians and
//! their ratio.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedq_common::metrics::{
    phase_totals, NodePhase, QueryPhase, NODE_PHASE_METRIC, QUERY_PHASE_METRIC,
};

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
    /// Also print where each federated query's time went, from the coordinator's and the
    /// nodes' phase metrics.
    pub breakdown: bool,
    /// With `Some(n)`, measure throughput instead: `n` clients, each its own researcher,
    /// run distinct queries concurrently for [`BenchConfig::seconds`].
    pub clients: Option<usize>,
    /// How long the throughput run lasts.
    pub seconds: u64,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A fresh random hex string from OpenDP's byte source.
fn random_hex(bytes: usize, what: &str) -> Result<String, CliError> {
    let mut b = vec![0u8; bytes];
    opendp::traits::samplers::fill_bytes(&mut b)
        .map_err(|e| CliError::User(format!("no randomness for {what}: {e}")))?;
    Ok(hex::encode(b))
}

/// `n` researchers of their own for this run, with a password each: replays are per
/// researcher and survive in the ledger, so an earlier bench's answers must not be served
/// as free replays.
fn bench_researchers(n: usize) -> Result<Vec<(String, String, f64)>, CliError> {
    let run = random_hex(6, "a bench user")?;
    (0..n)
        .map(|i| {
            let password = random_hex(16, "a bench password")?;
            Ok((format!("bench-{run}-{i}"), password, 1e12))
        })
        .collect()
}

/// Run the benchmark and print a table.
pub async fn run(cfg: BenchConfig) -> Result<(), CliError> {
    if cfg.runs == 0 {
        return Err(CliError::User("--runs must be at least 1".into()));
    }
    if cfg.clients == Some(0) {
        return Err(CliError::User("--clients must be at least 1".into()));
    }
    let researchers = bench_researchers(cfg.clients.unwrap_or(1))?;
    let opts = FederationOptions {
        extra_researchers: researchers.clone(),
        ..Default::default()
    };
    let fed = LocalFederation::start(&cfg.dir, opts).await?;
    let queries: Vec<(String, String)> = if cfg.queries.is_empty() {
        BENCH_QUERIES
            .iter()
            .map(|(n, q)| (n.to_string(), q.to_string()))
            .collect()
    } else {
        cfg.queries.clone()
    };
    let result = match cfg.clients {
        Some(_) => throughput(&fed, &researchers, &queries, cfg.seconds).await,
        None => latency(&fed, &researchers[0], &queries, &cfg).await,
    };
    fed.shutdown().await?;
    result
}

/// `SET fedq.epsilon` to a value no earlier run of this researcher used: identical
/// queries are free replays served from the ledger, so a distinct ε makes every run a real
/// one (fan-out, bounding, noise, charge).
fn fresh_epsilon(base: f64, run: u64) -> String {
    format!("SET fedq.epsilon = {}", base * (1.0 + run as f64 * 1e-6))
}

/// Each query federated and centralised, interleaved; medians and their ratio.
async fn latency(
    fed: &LocalFederation,
    (user, password, _): &(String, String, f64),
    queries: &[(String, String)],
    cfg: &BenchConfig,
) -> Result<(), CliError> {
    let mut client = FedqClient::connect(&fed.url(), user, password).await?;
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
    let mut run_no = 0u64;
    let mut breakdowns = Vec::new();
    for (name, sql) in queries {
        // Warm-up both sides (file metadata caches, connections, reused plans).
        run_no += 1;
        client.query(&fresh_epsilon(1.0, run_no)).await?;
        client.query(sql).await?;
        ctx.sql(sql).await?.collect().await?;
        let before = PhaseSnapshot::take(fed);
        let mut fed_t = Vec::new();
        let mut cen_t = Vec::new();
        for _ in 0..cfg.runs {
            run_no += 1;
            client.query(&fresh_epsilon(1.0, run_no)).await?;
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
        let client_mean = fed_t.iter().sum::<Duration>() / fed_t.len() as u32;
        breakdowns.push((
            name.clone(),
            client_mean,
            PhaseSnapshot::take(fed).since(&before),
        ));
        let (f, c) = (median(fed_t), median(cen_t));
        println!(
            "{:<26} {:>14.1} {:>16.1} {:>8.2}",
            name,
            f.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            f.as_secs_f64() / c.as_secs_f64()
        );
    }
    if cfg.breakdown {
        print_breakdown(&breakdowns, fed.nodes.len());
    }
    Ok(())
}

/// Phase totals (seconds, count) of the coordinator and of all nodes at one moment.
#[derive(Debug, Clone, Default)]
struct PhaseSnapshot {
    query: BTreeMap<String, (f64, u64)>,
    node: BTreeMap<String, (f64, u64)>,
}

impl PhaseSnapshot {
    fn take(fed: &LocalFederation) -> PhaseSnapshot {
        let query = phase_totals(
            &fed.coordinator.engine.metrics().registry,
            QUERY_PHASE_METRIC,
        );
        let mut node = BTreeMap::new();
        for n in &fed.nodes {
            for (phase, (sum, count)) in phase_totals(&n.metrics.registry, NODE_PHASE_METRIC) {
                let e = node.entry(phase).or_insert((0.0, 0));
                e.0 += sum;
                e.1 += count;
            }
        }
        PhaseSnapshot { query, node }
    }

    /// What was added since `earlier`.
    fn since(&self, earlier: &PhaseSnapshot) -> PhaseSnapshot {
        let diff = |now: &BTreeMap<String, (f64, u64)>, then: &BTreeMap<String, (f64, u64)>| {
            now.iter()
                .map(|(k, (s, c))| {
                    let (s0, c0) = then.get(k).copied().unwrap_or((0.0, 0));
                    (k.clone(), (s - s0, c - c0))
                })
                .collect()
        };
        PhaseSnapshot {
            query: diff(&self.query, &earlier.query),
            node: diff(&self.node, &earlier.node),
        }
    }
}

/// Mean milliseconds per occurrence of `phase` in `totals`.
fn mean_ms(totals: &BTreeMap<String, (f64, u64)>, phase: &str) -> f64 {
    match totals.get(phase) {
        Some((sum, count)) if *count > 0 => sum / *count as f64 * 1e3,
        _ => 0.0,
    }
}

fn print_breakdown(rows: &[(String, Duration, PhaseSnapshot)], sites: usize) {
    println!();
    println!("where a federated query's time goes (mean ms per query over the timed runs; `other` is the client's time not in a coordinator phase: Flight SQL calls, login checks, encoding)");
    let mut header = format!("{:<26} {:>7}", "query", "client");
    for p in QueryPhase::ALL {
        header.push_str(&format!(" {:>7}", p.as_str()));
    }
    header.push_str(&format!(" {:>7}", "other"));
    println!("{header}");
    for (name, client, snap) in rows {
        let client_ms = client.as_secs_f64() * 1e3;
        let mut line = format!("{name:<26} {client_ms:>7.2}");
        let mut covered = 0.0;
        for p in QueryPhase::ALL {
            let ms = mean_ms(&snap.query, p.as_str());
            covered += ms;
            line.push_str(&format!(" {ms:>7.2}"));
        }
        line.push_str(&format!(" {:>7.2}", client_ms - covered));
        println!("{line}");
    }
    println!();
    println!("inside the gather, at each of the {sites} sites (mean ms per request; in parentheses, summed over the sites)");
    let mut header = format!("{:<26}", "query");
    for p in NodePhase::ALL {
        header.push_str(&format!(" {:>17}", p.as_str()));
    }
    println!("{header}");
    for (name, _, snap) in rows {
        let mut line = format!("{name:<26}");
        let queries = snap
            .query
            .get(QueryPhase::Gather.as_str())
            .map(|(_, c)| *c)
            .unwrap_or(0)
            .max(1) as f64;
        for p in NodePhase::ALL {
            let per_site = mean_ms(&snap.node, p.as_str());
            let summed = snap.node.get(p.as_str()).map(|(s, _)| *s).unwrap_or(0.0) * 1e3 / queries;
            line.push_str(&format!(" {:>17}", format!("{per_site:.2} ({summed:.1})")));
        }
        println!("{line}");
    }
}

/// `clients` concurrent clients, each its own researcher, run the queries round-robin with
/// a fresh ε each (so every one is distinct and really runs) for `seconds`; prints queries
/// per second and latency percentiles.
async fn throughput(
    fed: &LocalFederation,
    researchers: &[(String, String, f64)],
    queries: &[(String, String)],
    seconds: u64,
) -> Result<(), CliError> {
    let url = fed.url();
    let mut clients = Vec::new();
    for (user, password, _) in researchers {
        clients.push(FedqClient::connect(&url, user, password).await?);
    }
    // Warm-up: each query once.
    if let Some(c) = clients.first_mut() {
        for (i, (_, sql)) in queries.iter().enumerate() {
            c.query(&fresh_epsilon(0.01, i as u64)).await?;
            c.query(sql).await?;
        }
    }
    let n = clients.len();
    println!(
        "fedq bench: {n} concurrent clients, {} nodes on loopback, {} queries round-robin with a fresh ε each, {seconds} s",
        fed.nodes.len(),
        queries.len()
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks = clients.into_iter().enumerate().map(|(k, mut client)| {
        let queries = queries.to_vec();
        async move {
            let mut lat = Vec::new();
            // Each client's ε sequence starts where the warm-up's left off.
            let mut run = 1_000 + k as u64 * 1_000_000;
            let mut i = k;
            while Instant::now() < deadline {
                run += 1;
                client.query(&fresh_epsilon(0.01, run)).await?;
                let (_, sql) = &queries[i % queries.len()];
                i += 1;
                let t = Instant::now();
                let r = client.query(sql).await?;
                if r.schema.metadata().get("fedq.replay").map(String::as_str) == Some("true") {
                    return Err(CliError::User("bench: a run was served as a replay".into()));
                }
                lat.push(t.elapsed());
            }
            Ok::<_, CliError>(lat)
        }
    });
    let mut lat: Vec<Duration> = Vec::new();
    for r in futures::future::join_all(tasks).await {
        lat.extend(r?);
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    println!(
        "{:>9} {:>10} {:>9} {:>9} {:>9}",
        "queries", "queries/s", "p50 ms", "p90 ms", "p99 ms"
    );
    println!(
        "{:>9} {:>10.1} {:>9.1} {:>9.1} {:>9.1}",
        lat.len(),
        lat.len() as f64 / wall,
        pct(0.50),
        pct(0.90),
        pct(0.99)
    );
    Ok(())
}
