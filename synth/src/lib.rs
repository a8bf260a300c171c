//! # fedq-synth
//!
//! A deterministic synthetic biobank federation for demos, tests and benchmarks. It follows
//! the reference schema (`shared/biobank-schema.md`): five tables (`participants`,
//! `diagnoses`, `labs`, `specimens`, `variants`) at every site, keyed by the privacy unit
//! `pid`, plus the config files needed to run a coordinator and one node per site.
//!
//! ## How it generates
//!
//! 1. **Global pre-pass** (one ChaCha8 stream of the seed, serial and cheap): site sizes
//!    follow Zipf weights 1/rank, so a few large tertiary hospitals dominate (site01 is the
//!    largest) and every site gets at least one participant. Participants get the global
//!    id `pid = p{index:07}` in site order, so pids are unique across sites. Each
//!    participant's profile is drawn here: sex, birth year (1930–2010), type (about 8%
//!    rare-disease, 27% severe-disease, 65% general, with 2–3 rare-disease referral
//!    centres — sites 2 and 3, plus site 5 in large federations — holding most
//!    rare-disease participants), chronic conditions (diabetes `E11` and hypertension `I10`
//!    become more common with age), an index disease, the enrolment date, and whether the
//!    participant transferred (about 3%) to exactly one other site.
//! 2. **Sites, in parallel**: site *i* has its own ChaCha8 stream of the seed, and walks its
//!    own participants merged with those transferred in, in pid order. It writes every
//!    table grouped and sorted by `pid` with Arrow builders streamed into Parquet (ZSTD,
//!    row groups of 128 Ki rows). Output is byte-identical for a seed whatever the number
//!    of threads. A transferred participant has `diagnoses`, `labs` and `specimens` rows at
//!    the second site but no second `participants` row, and never appears at a third site
//!    (the catalog declares `max_sites_per_unit = 2`).
//!
//! Realism the privacy machinery must cope with: chronic codes repeat (0–15 diagnoses per
//! participant), lab counts are heavy-tailed (lognormal, median about 6, some participants
//! with hundreds, capped at 400, so R = 20 truncates), lab values have clinical ranges plus
//! about 0.5% NULLs, 0.3% values in the wrong unit, 0.2% sentinel codes (-1, 9999) and
//! 0.5% outliers, 1–4 specimens, and 0–20 variants (mostly 0–3, BRCA1/2 enriched among
//! breast-cancer patients).
//!
//! The seeded generator is for synthetic data only; it lives in this crate and no privacy
//! code can reach it. Passwords and certificate keys are credentials and come from the operating
//! system's RNG, never from the seed.
//!
//! ## Output layout
//!
//! ```text
//! <out>/catalog.toml                the privacy officer's catalog (reference_catalog())
//! <out>/coordinator.toml            listen on base_port, one [[nodes]] per site, researchers
//! <out>/researchers/<name>.password alice (ε budget 50) and bob (ε budget 5), mode 0600
//! <out>/officers/<name>.password    the privacy officer olivia's password, mode 0600
//!                                   (coordinator.toml holds only their Argon2 hashes)
//! <out>/certs/ca.pem, ca.key       a fresh development CA (keys mode 0600, directory 0700)
//! <out>/certs/coordinator.{pem,key} the coordinator's certificate (name `coordinator`)
//! <out>/certs/siteNN.{pem,key}      each node's certificate (name = site)
//! <out>/ledger.sqlite               (created by the coordinator at first start)
//! <out>/sites/siteNN/node.toml      site NN listens on base_port + NN
//! <out>/sites/siteNN/{participants,diagnoses,labs,specimens,variants}.parquet
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub mod certs;
mod configs;
mod plan;
mod reference;
mod sink;
mod site;

pub use reference::{
    arrow_schema, reference_catalog, GENES, LAB_TESTS, PARTICIPANT_TYPES, SEXES, SPECIMEN_KINDS,
    SPECIMEN_STATUSES, TABLES, ZYGOSITIES,
};

/// Number of sites of the full-scale federation.
pub const FULL_SCALE_SITES: usize = 38;
/// Number of participants of the full-scale federation.
pub const FULL_SCALE_PARTICIPANTS: usize = 772_000;
/// Most sites a federation may have.
pub const MAX_SITES: usize = 999;
/// Most participants (pids are `p` followed by 7 digits).
pub const MAX_PARTICIPANTS: usize = 10_000_000;

/// The researchers written to the coordinator config, with their ε budgets.
pub const RESEARCHERS: [(&str, f64); 2] = [("alice", 50.0), ("bob", 5.0)];

/// The privacy officers written to the coordinator config.
pub const OFFICERS: [&str; 1] = ["olivia"];

/// Name in the coordinator's certificate, on every generated node's `allowed_coordinators`.
pub const COORDINATOR_CERT_NAME: &str = "coordinator";

/// Global ε budget of the `biobank` dataset (all tables) in the generated config.
pub const DATASET_EPSILON: f64 = 1000.0;

/// `[policy] delta_per_query` of the generated config: the δ a query with GROUP BY keys
/// without a public domain (partition selection) spends. Well below 1/n for the full-scale
/// federation (772,000 participants).
pub const DELTA_PER_QUERY: f64 = 1e-7;

/// δ budget of each generated researcher: 100 partition-selected queries.
pub const RESEARCHER_DELTA: f64 = 1e-5;

/// Global δ budget of the `biobank` dataset.
pub const DATASET_DELTA: f64 = 1e-3;

/// What to generate, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthConfig {
    /// Number of sites (1..=999).
    pub sites: usize,
    /// Number of participants over all sites (at least one per site).
    pub participants: usize,
    /// Seed of the synthetic data; the same seed gives byte-identical Parquet files.
    pub seed: u64,
    /// Output directory (created if missing; existing files are overwritten).
    pub out_dir: PathBuf,
    /// The coordinator listens on `base_port`, site *i* (1-based) on `base_port + i`.
    pub base_port: u16,
}

impl SynthConfig {
    /// Check the config; errors say which value to change.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::InvalidConfig(m));
        if self.sites == 0 {
            return bad("sites must be at least 1".into());
        }
        if self.sites > MAX_SITES {
            return bad(format!(
                "sites must be at most {MAX_SITES}, got {}",
                self.sites
            ));
        }
        if self.participants < self.sites {
            return bad(format!(
                "participants ({}) must be at least the number of sites ({}): every site needs a participant",
                self.participants, self.sites
            ));
        }
        if self.participants > MAX_PARTICIPANTS {
            return bad(format!(
                "participants must be at most {MAX_PARTICIPANTS}, got {}",
                self.participants
            ));
        }
        if self.base_port == 0 {
            return bad("base_port must be at least 1 (the coordinator listens on it)".into());
        }
        if usize::from(self.base_port) + self.sites > usize::from(u16::MAX) {
            return bad(format!(
                "base_port {} + {} sites exceeds the largest port 65535; choose a base_port of at most {}",
                self.base_port,
                self.sites,
                usize::from(u16::MAX) - self.sites
            ));
        }
        Ok(())
    }
}

/// What was written for one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSummary {
    /// Site name, `siteNN`.
    pub site: String,
    /// Directory holding the site's Parquet files and `node.toml`.
    pub dir: PathBuf,
    /// The node config.
    pub node_config_path: PathBuf,
    /// Rows written per table (transferred-in participants included).
    pub rows: BTreeMap<String, usize>,
    /// Address the node listens on, `127.0.0.1:<base_port + i>`.
    pub listen: String,
    /// Participants enrolled at this site (rows of `participants`).
    pub participants: usize,
    /// Participants enrolled elsewhere who also have rows here.
    pub transfers_in: usize,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// One entry per site, in site order.
    pub sites: Vec<SiteSummary>,
    /// `catalog.toml`.
    pub catalog_path: PathBuf,
    /// `coordinator.toml`.
    pub coordinator_config_path: PathBuf,
    /// `(researcher name, password file)`.
    pub researcher_password_paths: Vec<(String, PathBuf)>,
    /// `(officer name, password file)`.
    pub officer_password_paths: Vec<(String, PathBuf)>,
    /// Address the coordinator listens on.
    pub coordinator_listen: String,
    /// Participants over all sites.
    pub participants: usize,
    /// Participants with rows at a second site.
    pub transferred_participants: usize,
    /// Rows per table over all sites.
    pub total_rows: BTreeMap<String, usize>,
}

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synth config: {0}")]
    InvalidConfig(String),
    #[error("cannot create output directory {}: {source}; choose a writable --out", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}; check free disk space and permissions of --out", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write Parquet file {}: {source}", .path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot build an Arrow batch for {}: {source}", .path.display())]
    Arrow {
        path: PathBuf,
        source: arrow::error::ArrowError,
    },
    #[error("{} is a site directory left by an earlier run that fedq synth will not remove ({reason}); choose an empty --out or remove it", .path.display())]
    StaleOutput { path: PathBuf, reason: String },
    #[error("cannot render the catalog as TOML: {0}")]
    Catalog(String),
    #[error("cannot read random bytes from the operating system for passwords and keys: {0}")]
    Random(String),
    #[error("certificate error: {0}")]
    Certificate(String),
    #[error("internal error in the synthetic data generator: {0}")]
    Internal(String),
}

/// Site name of a 0-based site index: `site01`, `site02`, ...
pub fn site_name(index: usize) -> String {
    format!("site{:02}", index + 1)
}

fn create_dir(path: &Path) -> Result<(), SynthError> {
    fs::create_dir_all(path).map_err(|source| SynthError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Remove site directories left by an earlier run with more sites into the same
/// directory, so that tools which list `sites/` do not pick up stale data. Only
/// directories that hold nothing but files this generator writes are removed; anything
/// else is an error rather than a deletion.
fn remove_stale_sites(sites_dir: &Path, sites: usize) -> Result<(), SynthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Write { path, source }
    };
    let entries = match fs::read_dir(sites_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(sites_dir)(e)),
    };
    let generated: Vec<String> = TABLES
        .iter()
        .map(|t| format!("{t}.parquet"))
        .chain(["node.toml".to_string()])
        .collect();
    for entry in entries {
        let entry = entry.map_err(io(sites_dir))?;
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let current = (0..sites).any(|i| site_name(i) == name);
        if current || !name.starts_with("site") || !dir.is_dir() {
            continue;
        }
        let stale = |reason: String| SynthError::StaleOutput {
            path: dir.clone(),
            reason,
        };
        let mut files = Vec::new();
        for f in fs::read_dir(&dir).map_err(io(&dir))? {
            let f = f.map_err(io(&dir))?;
            let fname = f.file_name().to_string_lossy().into_owned();
            if !generated.contains(&fname) || !f.path().is_file() {
                return Err(stale(format!("it holds {fname}")));
            }
            files.push(f.path());
        }
        let node = dir.join("node.toml");
        let ours = fs::read_to_string(&node)
            .map(|t| t.starts_with("# fedq node config for"))
            .unwrap_or(false);
        if !ours {
            return Err(stale("it has no node.toml written by fedq synth".into()));
        }
        for f in &files {
            fs::remove_file(f).map_err(io(f))?;
        }
        fs::remove_dir(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

/// Generate the federation described by `cfg`, using up to the available parallelism.
pub fn generate(cfg: &SynthConfig) -> Result<SynthSummary, SynthError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    generate_with_threads(cfg, threads)
}

/// [`generate`] with an explicit number of worker threads (at least 1). The output does
/// not depend on it.
pub fn generate_with_threads(
    cfg: &SynthConfig,
    threads: usize,
) -> Result<SynthSummary, SynthError> {
    cfg.validate()?;
    let out = &cfg.out_dir;
    create_dir(out)?;
    let sites_dir = out.join("sites");
    remove_stale_sites(&sites_dir, cfg.sites)?;
    let site_dirs: Vec<PathBuf> = (0..cfg.sites)
        .map(|i| sites_dir.join(site_name(i)))
        .collect();
    for d in &site_dirs {
        create_dir(d)?;
    }
    let researchers_dir = out.join("researchers");
    create_dir(&researchers_dir)?;
    configs::restrict_dir(&researchers_dir)?;

    // mTLS between the coordinator and the nodes: a fresh development CA per federation.
    let certs_dir = out.join("certs");
    let ca = certs::DevCa::generate("fedq development CA")?;
    ca.write(&certs_dir)?;
    configs::restrict_dir(&certs_dir)?;
    ca.issue_to(&certs_dir, COORDINATOR_CERT_NAME, &[])?;

    let catalog = reference_catalog();
    let catalog_path = out.join("catalog.toml");
    configs::write_file(&catalog_path, &configs::catalog_toml(&catalog)?)?;

    let plan = plan::build(cfg.seed, cfg.sites, cfg.participants);
    let outputs = run_sites(&plan, &catalog, cfg.seed, &site_dirs, threads)?;

    let mut sites = Vec::with_capacity(cfg.sites);
    let mut total_rows: BTreeMap<String, usize> = BTreeMap::new();
    let mut ports = Vec::with_capacity(cfg.sites);
    for (i, (o, dir)) in outputs.into_iter().zip(site_dirs).enumerate() {
        let name = site_name(i);
        // validate() guarantees base_port + sites <= 65535.
        let port = cfg.base_port.saturating_add(i as u16 + 1);
        let node_config_path = dir.join("node.toml");
        configs::write_file(
            &node_config_path,
            &configs::node_toml(&name, port, &catalog),
        )?;
        ca.issue_to(&certs_dir, &name, &[])?;
        for (t, n) in &o.rows {
            *total_rows.entry(t.clone()).or_default() += n;
        }
        ports.push((name.clone(), port));
        sites.push(SiteSummary {
            site: name,
            dir,
            node_config_path,
            rows: o.rows,
            listen: format!("127.0.0.1:{port}"),
            participants: o.participants,
            transfers_in: o.transfers_in,
        });
    }

    let mut researchers = Vec::new();
    let mut researcher_password_paths = Vec::new();
    for (name, budget) in RESEARCHERS {
        let password = configs::new_password()?;
        let path = researchers_dir.join(format!("{name}.password"));
        configs::write_secret(&path, &format!("{password}\n"))?;
        researchers.push(configs::Researcher {
            name,
            password_argon2: configs::argon2_hash(&password)?,
            epsilon_budget: budget,
        });
        researcher_password_paths.push((name.to_string(), path));
    }
    let officers_dir = out.join("officers");
    create_dir(&officers_dir)?;
    configs::restrict_dir(&officers_dir)?;
    let mut officers = Vec::new();
    let mut officer_password_paths = Vec::new();
    for name in OFFICERS {
        let password = configs::new_password()?;
        let path = officers_dir.join(format!("{name}.password"));
        configs::write_secret(&path, &format!("{password}\n"))?;
        officers.push((name, configs::argon2_hash(&password)?));
        officer_password_paths.push((name.to_string(), path));
    }
    let coordinator_config_path = out.join("coordinator.toml");
    configs::write_file(
        &coordinator_config_path,
        &configs::coordinator_toml(cfg.base_port, &ports, &researchers, &officers),
    )?;

    Ok(SynthSummary {
        sites,
        catalog_path,
        coordinator_config_path,
        researcher_password_paths,
        officer_password_paths,
        coordinator_listen: format!("127.0.0.1:{}", cfg.base_port),
        participants: cfg.participants,
        transferred_participants: plan.transferred(),
        total_rows,
    })
}

/// Generate every site on up to `threads` workers; results come back in site order.
fn run_sites(
    plan: &plan::Plan,
    catalog: &fedq_common::Catalog,
    seed: u64,
    dirs: &[PathBuf],
    threads: usize,
) -> Result<Vec<site::SiteOutput>, SynthError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let workers = threads.clamp(1, plan.sites());
    let mut results: Vec<(usize, Result<site::SiteOutput, SynthError>)> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        // Sites are taken in order, so the largest (site01) starts first.
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= plan.sites() || failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = site::generate_site(plan, catalog, seed, i, &dirs[i]);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(done) => results.extend(done),
                Err(_) => results.push((
                    usize::MAX,
                    Err(SynthError::Internal(
                        "a site generator thread panicked".into(),
                    )),
                )),
            }
        }
    });
    results.sort_by_key(|(i, _)| *i);
    let mut outputs = Vec::with_capacity(plan.sites());
    for (_, r) in results {
        outputs.push(r?);
    }
    if outputs.len() != plan.sites() {
        return Err(SynthError::Internal(format!(
            "generated {} of {} sites",
            outputs.len(),
            plan.sites()
        )));
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sites: usize, participants: usize, base_port: u16) -> SynthConfig {
        SynthConfig {
            sites,
            participants,
            seed: 1,
            out_dir: PathBuf::from("unused"),
            base_port,
        }
    }

    #[test]
    fn validation() {
        for (c, needle) in [
            (cfg(0, 10, 7000), "at least 1"),
            (cfg(1000, 5000, 7000), "at most 999"),
            (cfg(5, 4, 7000), "at least the number of sites"),
            (cfg(38, 772_000, 65_500), "65535"),
            (cfg(1, 1, 0), "base_port"),
            (cfg(1, MAX_PARTICIPANTS + 1, 7000), "at most"),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        cfg(1, 1, 65_534).validate().unwrap();
        cfg(999, 999, 1).validate().unwrap();
        cfg(38, 772_000, 65_497).validate().unwrap();
        assert!(cfg(38, 772_000, 65_498).validate().is_err());
    }

    #[test]
    fn site_names() {
        assert_eq!(site_name(0), "site01");
        assert_eq!(site_name(37), "site38");
        assert_eq!(site_name(99), "site100");
    }
}
