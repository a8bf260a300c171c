//! Coordinator configuration (`coordinator.toml`).
//!
//! ```toml
//! listen = "127.0.0.1:50050"     # Flight SQL endpoint for researchers (loopback by default)
//! catalog = "catalog.toml"       # the privacy officer's catalog, relative to this file
//! node_timeout_secs = 60         # how long to wait for a node before failing the query
//!
//! [policy]
//! default_epsilon = 1.0
//! max_epsilon_per_query = 2.0
//! min_reported_count = 11
//!
//! [[nodes]]
//! site = "site01"
//! endpoint = "http://127.0.0.1:50101"
//!
//! [[researchers]]
//! name = "alice"
//! token_sha3_256 = "…"           # SHA3-256 (hex) of the researcher's bearer token
//! epsilon_budget = 10.0
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedq_common::{Catalog, Policy};
use serde::Deserialize;

use crate::error::CoordinatorError;

/// A node the coordinator fans out to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEndpoint {
    /// Site name, as reported to researchers ("sites answered").
    pub site: String,
    /// gRPC endpoint of the node, e.g. `http://127.0.0.1:50101`.
    pub endpoint: String,
}

/// A researcher allowed to query, with their ε budget.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResearcherConfig {
    /// Researcher name, used in budgets and logs.
    pub name: String,
    /// Lower-case hex SHA3-256 of the researcher's bearer token. The token itself is never
    /// stored in config.
    pub token_sha3_256: String,
    /// Total ε this researcher may spend.
    pub epsilon_budget: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    catalog: PathBuf,
    #[serde(default = "default_timeout")]
    node_timeout_secs: u64,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    nodes: Vec<NodeEndpoint>,
    #[serde(default)]
    researchers: Vec<ResearcherConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:50050".to_string()
}
fn default_timeout() -> u64 {
    60
}

/// Validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Address the Flight SQL server binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The catalog, loaded and validated.
    pub catalog: Catalog,
    /// Query policy.
    pub policy: Policy,
    /// Nodes of the federation.
    pub nodes: Vec<NodeEndpoint>,
    /// Researchers and their budgets.
    pub researchers: Vec<ResearcherConfig>,
    /// Per-node timeout for one query.
    pub node_timeout: Duration,
}

impl CoordinatorConfig {
    /// Load `coordinator.toml`; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, CoordinatorError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoordinatorError::Config(format!(
                "cannot read coordinator config {}: {e}; pass the right path with --config",
                path.display()
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base, &path.display().to_string())
    }

    /// Parse config text; `base_dir` resolves the relative catalog path.
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        origin: &str,
    ) -> Result<CoordinatorConfig, CoordinatorError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| CoordinatorError::Config(format!("{origin}: {e}")))?;
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            CoordinatorError::Config(format!(
                "{origin}: listen = {:?} is not an address like 127.0.0.1:50050",
                raw.listen
            ))
        })?;
        let catalog_path = if raw.catalog.is_absolute() {
            raw.catalog.clone()
        } else {
            base_dir.join(&raw.catalog)
        };
        let catalog = Catalog::load(&catalog_path)
            .map_err(|e| CoordinatorError::Config(format!("{origin}: {e}")))?;
        raw.policy
            .validate()
            .map_err(|e| CoordinatorError::Config(format!("{origin}: {e}")))?;
        if raw.node_timeout_secs == 0 {
            return Err(CoordinatorError::Config(format!(
                "{origin}: node_timeout_secs must be at least 1"
            )));
        }
        let cfg = CoordinatorConfig {
            listen,
            catalog,
            policy: raw.policy,
            nodes: raw.nodes,
            researchers: raw.researchers,
            node_timeout: Duration::from_secs(raw.node_timeout_secs),
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Check the parts that the type system does not.
    pub fn validate(&self, origin: &str) -> Result<(), CoordinatorError> {
        let bad = |m: String| Err(CoordinatorError::Config(format!("{origin}: {m}")));
        if self.nodes.is_empty() {
            return bad("no [[nodes]] declared; add one per hospital site".into());
        }
        let mut sites = std::collections::BTreeSet::new();
        for n in &self.nodes {
            if !sites.insert(n.site.as_str()) {
                return bad(format!("site {} is declared twice in [[nodes]]", n.site));
            }
            if !(n.endpoint.starts_with("http://") || n.endpoint.starts_with("https://")) {
                return bad(format!(
                    "node {}: endpoint {:?} must start with http:// or https://",
                    n.site, n.endpoint
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &self.researchers {
            if !names.insert(r.name.as_str()) {
                return bad(format!("researcher {} is declared twice", r.name));
            }
            if r.token_sha3_256.len() != 64
                || !r.token_sha3_256.chars().all(|c| c.is_ascii_hexdigit())
            {
                return bad(format!(
                    "researcher {}: token_sha3_256 must be 64 hex characters (the SHA3-256 of the token)",
                    r.name
                ));
            }
            if !(r.epsilon_budget.is_finite() && r.epsilon_budget >= 0.0) {
                return bad(format!(
                    "researcher {}: epsilon_budget must be a non-negative number",
                    r.name
                ));
            }
        }
        Ok(())
    }
}
