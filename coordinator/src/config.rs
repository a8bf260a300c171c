//! Coordinator configuration (`coordinator.toml`).
//!
//! ```toml
//! listen = "127.0.0.1:31050"     # Flight SQL endpoint for researchers (loopback by default)
//! catalog = "catalog.toml"       # the privacy officer's catalog, relative to this file
//! node_timeout_secs = 60         # how long to wait for a node before failing the query
//! token_ttl_secs = 3600          # lifetime of the bearer token a login returns
//! allow_partial = false          # true: answer from the sites that responded, stating coverage
//! metrics_listen = "127.0.0.1:9100"  # optional: Prometheus /metrics over plain HTTP
//!
//! stored_answer_retention_days = 365  # optional: delete stored answers older than this at start
//!
//! [login]                        # optional: failed-login throttle (these are the defaults)
//! free_failures = 3              # failures in a row that cost nothing
//! backoff_base_ms = 1000         # then 1 s, 2 s, 4 s, ... per user name and per address
//! max_backoff_secs = 900
//! lockout_failures = 10          # then the name is locked until `fedq user unlock`
//!
//! [researcher_tls]               # optional: TLS on the Flight SQL endpoint (grpc+tls://)
//! cert = "certs/coordinator.pem"
//! key = "certs/coordinator.key"
//! max_concurrent_queries_per_researcher = 2
//!
//! [policy]
//! default_epsilon = 1.0
//! max_epsilon_per_query = 2.0
//! min_reported_count = 11
//!
//! [tls]                          # mTLS to the nodes (or `insecure_dev = true`, development only)
//! ca = "certs/ca.pem"
//! cert = "certs/coordinator.pem"
//! key = "certs/coordinator.key"
//!
//! [[nodes]]
//! site = "site01"
//! endpoint = "https://127.0.0.1:31101"
//! # tls_name = "site01"         # name in the node's certificate (default: the site)
//!
//! ledger = "ledger.sqlite"       # budgets, stored answers and the audit log (SQLite)
//!
//! [[researchers]]
//! name = "alice"
//! password_argon2 = "$argon2id$…" # initial password hash (`fedq user hash-password`)
//! epsilon_budget = 10.0          # initial grant; the ledger is authoritative afterwards
//! delta_budget = 0.0             # optional
//! renewal_days = 365             # optional: the budget renews every period
//!
//! [[datasets]]                   # optional global budgets against collusion
//! name = "biobank"
//! tables = ["participants", "labs"]
//! epsilon_budget = 100.0
//!
//! [[officers]]                   # privacy officers: budget and policy controls
//! name = "olivia"
//! password_argon2 = "$argon2id$…"
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
    /// gRPC endpoint of the node, e.g. `https://127.0.0.1:31101` (`http://` only with
    /// `insecure_dev = true`).
    pub endpoint: String,
    /// Name the node's certificate must carry (default: the site name).
    #[serde(default)]
    pub tls_name: Option<String>,
}

impl NodeEndpoint {
    /// The name the node's TLS certificate must carry.
    pub fn tls_name(&self) -> &str {
        self.tls_name.as_deref().unwrap_or(&self.site)
    }
}

/// How the coordinator connects to the nodes.
#[derive(Debug, Clone)]
pub enum NodeTransport {
    /// mTLS (the only production mode): the coordinator presents its certificate and
    /// checks that each node's certificate chains to the CA and names the node's site.
    Tls(fedq_common::tls::TlsPem),
    /// Plaintext (`insecure_dev = true`; logs a warning at start).
    InsecureDev,
}

/// A researcher allowed to query, with their ε budget.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResearcherConfig {
    /// Researcher name, used in budgets and logs.
    pub name: String,
    /// Argon2 hash (PHC string) of the researcher's initial password, seeded into the
    /// ledger's users at first start (officers manage users afterwards with `fedq user`).
    /// Without it, the researcher has a budget but cannot log in until an officer adds them.
    #[serde(default)]
    pub password_argon2: Option<String>,
    /// Total ε first granted to this researcher (the ledger is authoritative afterwards).
    pub epsilon_budget: f64,
    /// Total δ first granted.
    #[serde(default)]
    pub delta_budget: f64,
    /// Renewal period in days, if the budget renews.
    #[serde(default)]
    pub renewal_days: Option<f64>,
}

/// A dataset: a named set of catalog tables with a global budget shared by all researchers,
/// which bounds what colluding researchers learn together.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Dataset name.
    pub name: String,
    /// Catalog tables in the dataset.
    pub tables: Vec<String>,
    /// Total ε first granted to the dataset.
    pub epsilon_budget: f64,
    /// Total δ first granted.
    #[serde(default)]
    pub delta_budget: f64,
    /// Renewal period in days, if the budget renews.
    #[serde(default)]
    pub renewal_days: Option<f64>,
}

/// A privacy officer: may grant and revoke budgets, manage users and read the policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfficerConfig {
    /// Officer name, recorded as the actor of their audit entries.
    pub name: String,
    /// Argon2 hash (PHC string) of the officer's initial password, seeded into the ledger
    /// at first start.
    pub password_argon2: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    catalog: PathBuf,
    #[serde(default = "default_timeout")]
    node_timeout_secs: u64,
    #[serde(default = "default_token_ttl")]
    token_ttl_secs: u64,
    #[serde(default)]
    allow_partial: bool,
    #[serde(default = "default_per_researcher")]
    max_concurrent_queries_per_researcher: usize,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    nodes: Vec<NodeEndpoint>,
    #[serde(default)]
    researchers: Vec<ResearcherConfig>,
    #[serde(default = "default_ledger")]
    ledger: PathBuf,
    #[serde(default)]
    datasets: Vec<DatasetConfig>,
    #[serde(default)]
    officers: Vec<OfficerConfig>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    insecure_dev: bool,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    researcher_tls: Option<RawResearcherTls>,
    #[serde(default)]
    login: crate::throttle::LoginPolicy,
    #[serde(default)]
    stored_answer_retention_days: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResearcherTls {
    cert: PathBuf,
    key: PathBuf,
}

/// TLS on the researcher-facing Flight SQL endpoint: the coordinator's certificate chain
/// and key (PEM). Researchers verify it with the CA that issued it.
#[derive(Clone)]
pub struct ResearcherTls {
    /// Certificate chain (PEM).
    pub cert: Vec<u8>,
    /// Private key (PEM).
    pub key: Vec<u8>,
    /// Where the certificate was read from, for messages.
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for ResearcherTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResearcherTls")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn default_ledger() -> PathBuf {
    PathBuf::from("ledger.sqlite")
}

fn default_listen() -> String {
    "127.0.0.1:31050".to_string()
}
fn default_timeout() -> u64 {
    60
}
fn default_per_researcher() -> usize {
    2
}
fn default_token_ttl() -> u64 {
    crate::auth::DEFAULT_TOKEN_TTL.as_secs()
}

/// Validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Address the Flight SQL server binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where to serve Prometheus `/metrics` (plain HTTP); `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the researcher endpoint (`[researcher_tls]`); `None`: plaintext gRPC.
    pub researcher_tls: Option<ResearcherTls>,
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
    /// The ledger file (SQLite).
    pub ledger: PathBuf,
    /// Datasets with global budgets.
    pub datasets: Vec<DatasetConfig>,
    /// Privacy officers.
    pub officers: Vec<OfficerConfig>,
    /// mTLS to the nodes, or plaintext for development.
    pub node_transport: NodeTransport,
    /// Lifetime of a bearer token issued at login.
    pub token_ttl: Duration,
    /// Answer from the sites that responded when some fail or time out (coverage is
    /// stated in the result metadata); by default any failure fails the query.
    pub allow_partial: bool,
    /// Queries one researcher may have running at once; more get `RESOURCE_EXHAUSTED`.
    pub max_concurrent_queries_per_researcher: usize,
    /// Failed-login back-off and lockout (`[login]`).
    pub login: crate::throttle::LoginPolicy,
    /// Stored answers older than this many days are deleted at start-up (audited); the
    /// same query is then answered, and charged, afresh. `None`: kept for ever.
    pub stored_answer_retention_days: Option<f64>,
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
                "{origin}: listen = {:?} is not an address like 127.0.0.1:31050",
                raw.listen
            ))
        })?;
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                CoordinatorError::Config(format!(
                    "{origin}: metrics_listen = {text:?} is not an address like 127.0.0.1:9100"
                ))
            })?),
        };
        let researcher_tls = match &raw.researcher_tls {
            None => None,
            Some(t) => {
                let read = |p: &PathBuf, what: &str| {
                    let path = if p.is_absolute() {
                        p.clone()
                    } else {
                        base_dir.join(p)
                    };
                    std::fs::read(&path)
                        .map(|b| (b, path.clone()))
                        .map_err(|e| {
                            CoordinatorError::Config(format!(
                                "{origin}: [researcher_tls] {what} {}: {e}; fix the path",
                                path.display()
                            ))
                        })
                };
                let (cert, cert_path) = read(&t.cert, "cert")?;
                let (key, _) = read(&t.key, "key")?;
                Some(ResearcherTls {
                    cert,
                    key,
                    cert_path,
                })
            }
        };
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
        let ledger = if raw.ledger.is_absolute() {
            raw.ledger.clone()
        } else {
            base_dir.join(&raw.ledger)
        };
        let node_transport = match (raw.tls, raw.insecure_dev) {
            (Some(_), true) => {
                return Err(CoordinatorError::Config(format!(
                    "{origin}: both [tls] and insecure_dev = true are set; remove insecure_dev to use mTLS"
                )))
            }
            (None, false) => {
                return Err(CoordinatorError::Config(format!(
                    "{origin}: no [tls] section: the coordinator talks to nodes only over mutual TLS. Add [tls] with ca, cert and key (create development certificates with `fedq certs init` and `fedq certs issue`), or, on a development machine only, set insecure_dev = true"
                )))
            }
            (None, true) => NodeTransport::InsecureDev,
            (Some(t), false) => NodeTransport::Tls(
                fedq_common::tls::TlsPem::load(base_dir, &t.ca, &t.cert, &t.key)
                    .map_err(|e| CoordinatorError::Config(format!("{origin}: {e}")))?,
            ),
        };
        if raw.token_ttl_secs == 0 || raw.token_ttl_secs > 7 * 86_400 {
            return Err(CoordinatorError::Config(format!(
                "{origin}: token_ttl_secs must be between 1 and 604800 (a week); tokens should be short-lived"
            )));
        }
        if !(1..=64).contains(&raw.max_concurrent_queries_per_researcher) {
            return Err(CoordinatorError::Config(format!(
                "{origin}: max_concurrent_queries_per_researcher must be between 1 and 64"
            )));
        }
        raw.login
            .validate()
            .map_err(|m| CoordinatorError::Config(format!("{origin}: {m}")))?;
        if let Some(d) = raw.stored_answer_retention_days {
            if !(d.is_finite() && (1.0..=36_500.0).contains(&d)) {
                return Err(CoordinatorError::Config(format!(
                    "{origin}: stored_answer_retention_days = {d} must be between 1 and 36500 days (or left out: kept for ever)"
                )));
            }
        }
        let cfg = CoordinatorConfig {
            stored_answer_retention_days: raw.stored_answer_retention_days,
            login: raw.login,
            max_concurrent_queries_per_researcher: raw.max_concurrent_queries_per_researcher,
            allow_partial: raw.allow_partial,
            token_ttl: Duration::from_secs(raw.token_ttl_secs),
            node_transport,
            ledger,
            datasets: raw.datasets,
            officers: raw.officers,
            listen,
            catalog,
            policy: raw.policy,
            nodes: raw.nodes,
            researchers: raw.researchers,
            node_timeout: Duration::from_secs(raw.node_timeout_secs),
            metrics_listen,
            researcher_tls,
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
            match &self.node_transport {
                NodeTransport::Tls(_) if !n.endpoint.starts_with("https://") => {
                    return bad(format!(
                        "node {}: endpoint {:?} must start with https:// (nodes are reached over mTLS)",
                        n.site, n.endpoint
                    ));
                }
                NodeTransport::InsecureDev if !n.endpoint.starts_with("http://") => {
                    return bad(format!(
                        "node {}: endpoint {:?} must start with http:// with insecure_dev = true",
                        n.site, n.endpoint
                    ));
                }
                _ => {}
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for r in &self.researchers {
            if !names.insert(r.name.as_str()) {
                return bad(format!("researcher {} is declared twice", r.name));
            }
            if let Some(h) = &r.password_argon2 {
                crate::auth::check_password_hash(h)
                    .or_else(|e| bad(format!("researcher {}: password_argon2: {e}", r.name)))?;
            }
            check_budget(
                &format!("researcher {}", r.name),
                r.epsilon_budget,
                r.delta_budget,
                r.renewal_days,
            )
            .or_else(&bad)?;
        }
        let mut officers = std::collections::BTreeSet::new();
        for o in &self.officers {
            if !officers.insert(o.name.as_str()) {
                return bad(format!("officer {} is declared twice", o.name));
            }
            if names.contains(o.name.as_str()) {
                return bad(format!(
                    "officer {} is also a researcher; a person has one role, so give the officer account its own name",
                    o.name
                ));
            }
            crate::auth::check_password_hash(&o.password_argon2)
                .or_else(|e| bad(format!("officer {}: password_argon2: {e}", o.name)))?;
        }
        let mut datasets = std::collections::BTreeSet::new();
        for d in &self.datasets {
            if !datasets.insert(d.name.as_str()) {
                return bad(format!("dataset {} is declared twice", d.name));
            }
            if d.tables.is_empty() {
                return bad(format!(
                    "dataset {}: list its catalog tables in `tables`",
                    d.name
                ));
            }
            for t in &d.tables {
                if self.catalog.table(t).is_none() {
                    return bad(format!(
                        "dataset {}: table {t} is not in the catalog (tables: {})",
                        d.name,
                        self.catalog
                            .tables
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            check_budget(
                &format!("dataset {}", d.name),
                d.epsilon_budget,
                d.delta_budget,
                d.renewal_days,
            )
            .or_else(&bad)?;
        }
        Ok(())
    }

    /// Datasets that contain `table`.
    pub fn datasets_of(&self, table: &str) -> Vec<String> {
        self.datasets
            .iter()
            .filter(|d| d.tables.iter().any(|t| t == table))
            .map(|d| d.name.clone())
            .collect()
    }
}

fn check_budget(who: &str, eps: f64, delta: f64, renewal: Option<f64>) -> Result<(), String> {
    if !(eps.is_finite() && (0.0..=crate::ledger::MAX_EPSILON).contains(&eps)) {
        return Err(format!(
            "{who}: epsilon_budget must be a number between 0 and {}",
            crate::ledger::MAX_EPSILON
        ));
    }
    if !(delta.is_finite() && (0.0..1.0).contains(&delta)) {
        return Err(format!("{who}: delta_budget must be in [0, 1)"));
    }
    if let Some(d) = renewal {
        if !(d.is_finite() && d > 0.0 && d <= 36_500.0) {
            return Err(format!(
                "{who}: renewal_days must be a positive number of days"
            ));
        }
    }
    Ok(())
}
