//! An in-process federation on loopback: every node of a `fedq synth` directory plus a
//! coordinator, each on a free port. Used by `fedq demo`, `fedq bench` and the tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedq_coordinator::config::{NodeEndpoint, ResearcherConfig};
use fedq_coordinator::{CoordinatorConfig, CoordinatorHandle};
use fedq_node::{NodeConfig, NodeHandle};
use sha3::{Digest, Sha3_256};

use crate::CliError;

/// A running federation.
pub struct LocalFederation {
    /// Directory written by `fedq synth`.
    pub dir: PathBuf,
    /// Running nodes, in site order.
    pub nodes: Vec<NodeHandle>,
    /// Sites, in the same order.
    pub sites: Vec<String>,
    /// The running coordinator.
    pub coordinator: CoordinatorHandle,
    /// Researcher name -> bearer token (read from `researchers/<name>.token`).
    pub tokens: BTreeMap<String, String>,
    /// Officer name -> bearer token (read from `officers/<name>.token`).
    pub officer_tokens: BTreeMap<String, String>,
}

/// Options for [`LocalFederation::start`].
#[derive(Debug, Clone)]
pub struct FederationOptions {
    /// Coordinator listen address (port 0 for a free port).
    pub coordinator_listen: SocketAddr,
    /// Extra researchers with (token, budget), e.g. for benchmarks.
    pub extra_researchers: Vec<(String, String, f64)>,
    /// Override the policy's `min_reported_count`.
    pub min_reported_count: Option<u64>,
}

impl Default for FederationOptions {
    fn default() -> Self {
        FederationOptions {
            coordinator_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_researchers: vec![],
            min_reported_count: None,
        }
    }
}

/// SHA3-256 of a token, lower-case hex, as stored in `coordinator.toml`.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha3_256::digest(token.as_bytes()))
}

/// The site directories of a synth output, sorted.
pub fn site_dirs(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let sites = dir.join("sites");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&sites)
        .map_err(|e| {
            CliError::User(format!(
                "cannot read {}: {e}; generate a federation first with `fedq synth --out {}`",
                sites.display(),
                dir.display()
            ))
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("node.toml").is_file())
        .collect();
    out.sort();
    Ok(out)
}

impl LocalFederation {
    /// Start every node of `dir` and a coordinator on loopback.
    pub async fn start(dir: &Path, opts: FederationOptions) -> Result<LocalFederation, CliError> {
        let mut nodes = Vec::new();
        let mut sites = Vec::new();
        let mut endpoints = Vec::new();
        for sd in site_dirs(dir)? {
            let mut cfg = NodeConfig::load(&sd.join("node.toml"))?;
            cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            let site = cfg.site.clone();
            let h = fedq_node::start(cfg).await?;
            endpoints.push(NodeEndpoint {
                site: site.clone(),
                endpoint: format!("http://{}", h.addr),
            });
            sites.push(site);
            nodes.push(h);
        }
        let mut cfg = CoordinatorConfig::load(&dir.join("coordinator.toml"))?;
        cfg.nodes = endpoints;
        cfg.listen = opts.coordinator_listen;
        if let Some(m) = opts.min_reported_count {
            cfg.policy.min_reported_count = m;
        }
        for (name, token, budget) in &opts.extra_researchers {
            cfg.researchers.push(ResearcherConfig {
                name: name.clone(),
                token_sha3_256: token_hash(token),
                epsilon_budget: *budget,
                delta_budget: 0.0,
                renewal_days: None,
            });
        }
        let mut tokens = BTreeMap::new();
        for r in &cfg.researchers {
            let p = dir.join("researchers").join(format!("{}.token", r.name));
            if let Ok(t) = std::fs::read_to_string(&p) {
                tokens.insert(r.name.clone(), t.trim().to_string());
            }
        }
        for (name, token, _) in &opts.extra_researchers {
            tokens.insert(name.clone(), token.clone());
        }
        let mut officer_tokens = BTreeMap::new();
        for o in &cfg.officers {
            let p = dir.join("officers").join(format!("{}.token", o.name));
            if let Ok(t) = std::fs::read_to_string(&p) {
                officer_tokens.insert(o.name.clone(), t.trim().to_string());
            }
        }
        // The config's SQLite ledger (`ledger.sqlite` in the synth directory by default).
        let coordinator = fedq_coordinator::start(cfg).await?;
        Ok(LocalFederation {
            dir: dir.to_path_buf(),
            nodes,
            sites,
            coordinator,
            tokens,
            officer_tokens,
        })
    }

    /// The coordinator's Flight SQL URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.coordinator.addr)
    }

    /// Token of a researcher.
    pub fn token(&self, researcher: &str) -> Result<String, CliError> {
        self.tokens
            .get(researcher)
            .cloned()
            .ok_or_else(|| CliError::User(format!("no token for researcher {researcher}")))
    }

    /// Stop one node (to simulate a site going down). Returns its site name.
    pub async fn stop_node(&mut self, index: usize) -> Result<String, CliError> {
        if index >= self.nodes.len() {
            return Err(CliError::User(format!("no node #{index}")));
        }
        let h = self.nodes.remove(index);
        let site = self.sites.remove(index);
        h.shutdown().await?;
        Ok(site)
    }

    /// Stop everything.
    pub async fn shutdown(self) -> Result<(), CliError> {
        self.coordinator.shutdown().await?;
        for n in self.nodes {
            n.shutdown().await?;
        }
        Ok(())
    }
}
