//! An in-process federation on loopback: every node of a `fedq synth` directory plus a
//! coordinator, each on a free port. Used by `fedq demo`, `fedq bench` and the tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedq_coordinator::config::{NodeEndpoint, ResearcherConfig};
use fedq_coordinator::{CoordinatorConfig, CoordinatorHandle};
use fedq_node::{NodeConfig, NodeHandle};

use crate::CliError;

/// A running federation.
pub struct LocalFederation {
    /// Directory written by `fedq synth`.
    pub dir: PathBuf,
    /// Running nodes, in site order.
    pub nodes: Vec<NodeHandle>,
    /// Their configs (with the bound address), to restart a node where it was.
    pub node_configs: Vec<NodeConfig>,
    /// Sites, in the same order.
    pub sites: Vec<String>,
    /// The running coordinator.
    pub coordinator: CoordinatorHandle,
    /// Researcher name -> password (read from `researchers/<name>.password`).
    pub passwords: BTreeMap<String, String>,
    /// Officer name -> password (read from `officers/<name>.password`).
    pub officer_passwords: BTreeMap<String, String>,
    /// Whether the coordinator's researcher endpoint uses TLS.
    pub researcher_tls: bool,
}

/// Maps a site and its node's address to the address the coordinator dials (tests put a
/// fault-injecting proxy there).
pub type NodeAddressHook = std::sync::Arc<dyn Fn(&str, SocketAddr) -> SocketAddr + Send + Sync>;

/// Options for [`LocalFederation::start`].
#[derive(Clone)]
pub struct FederationOptions {
    /// Coordinator listen address (port 0 for a free port).
    pub coordinator_listen: SocketAddr,
    /// Extra researchers as (name, password, ε budget), e.g. for benchmarks.
    pub extra_researchers: Vec<(String, String, f64)>,
    /// Override the policy's `min_reported_count`.
    pub min_reported_count: Option<u64>,
    /// Override the lifetime of login tokens.
    pub token_ttl: Option<std::time::Duration>,
    /// Override the failed-login throttle (`[login]`).
    pub login: Option<fedq_coordinator::throttle::LoginPolicy>,
    /// Override the per-node timeout of a query.
    pub node_timeout: Option<std::time::Duration>,
    /// Override `allow_partial`.
    pub allow_partial: Option<bool>,
    /// Where the coordinator dials each node (default: the node's own address).
    pub node_address: Option<NodeAddressHook>,
    /// Override every node's memory limit per query, in bytes (tests use limits far
    /// below the 1 MiB granularity of `max_query_memory_mb`).
    pub node_memory_limit: Option<usize>,
}

impl std::fmt::Debug for FederationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationOptions")
            .field("coordinator_listen", &self.coordinator_listen)
            .field("min_reported_count", &self.min_reported_count)
            .field("token_ttl", &self.token_ttl)
            .field("node_timeout", &self.node_timeout)
            .field("allow_partial", &self.allow_partial)
            .finish_non_exhaustive()
    }
}

impl Default for FederationOptions {
    fn default() -> Self {
        FederationOptions {
            coordinator_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_researchers: vec![],
            min_reported_count: None,
            token_ttl: None,
            login: None,
            node_timeout: None,
            allow_partial: None,
            node_address: None,
            node_memory_limit: None,
        }
    }
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
        let mut node_configs = Vec::new();
        let mut sites = Vec::new();
        let mut endpoints = Vec::new();
        for sd in site_dirs(dir)? {
            let mut cfg = NodeConfig::load(&sd.join("node.toml"))?;
            cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            if let Some(bytes) = opts.node_memory_limit {
                cfg.limits.max_query_memory = bytes;
            }
            // Prometheus /metrics on a free loopback port (see `NodeHandle::metrics_addr`).
            cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            let site = cfg.site.clone();
            let scheme = match cfg.transport {
                fedq_node::NodeTransport::Tls { .. } => "https",
                fedq_node::NodeTransport::InsecureDev => "http",
            };
            let mut kept = cfg.clone();
            let h = fedq_node::start(cfg).await?;
            kept.listen = h.addr;
            let dial = match &opts.node_address {
                Some(hook) => hook(&site, h.addr),
                None => h.addr,
            };
            endpoints.push(NodeEndpoint {
                site: site.clone(),
                endpoint: format!("{scheme}://{dial}"),
                tls_name: None,
            });
            node_configs.push(kept);
            sites.push(site);
            nodes.push(h);
        }
        let mut cfg = CoordinatorConfig::load(&dir.join("coordinator.toml"))?;
        cfg.nodes = endpoints;
        cfg.listen = opts.coordinator_listen;
        cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        if let Some(m) = opts.min_reported_count {
            cfg.policy.min_reported_count = m;
        }
        for (name, password, budget) in &opts.extra_researchers {
            cfg.researchers.push(ResearcherConfig {
                name: name.clone(),
                password_argon2: Some(fedq_coordinator::auth::hash_password(password)?),
                epsilon_budget: *budget,
                delta_budget: fedq_synth::RESEARCHER_DELTA,
                renewal_days: None,
            });
        }
        if let Some(login) = opts.login {
            cfg.login = login;
        }
        if let Some(ttl) = opts.token_ttl {
            cfg.token_ttl = ttl;
        }
        if let Some(t) = opts.node_timeout {
            cfg.node_timeout = t;
        }
        if let Some(p) = opts.allow_partial {
            cfg.allow_partial = p;
        }
        let read = |p: PathBuf| {
            std::fs::read_to_string(p)
                .ok()
                .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
        };
        let mut passwords = BTreeMap::new();
        for r in &cfg.researchers {
            if let Some(t) = read(dir.join("researchers").join(format!("{}.password", r.name))) {
                passwords.insert(r.name.clone(), t);
            }
        }
        for (name, password, _) in &opts.extra_researchers {
            passwords.insert(name.clone(), password.clone());
        }
        let mut officer_passwords = BTreeMap::new();
        for o in &cfg.officers {
            if let Some(t) = read(dir.join("officers").join(format!("{}.password", o.name))) {
                officer_passwords.insert(o.name.clone(), t);
            }
        }
        let researcher_tls = cfg.researcher_tls.is_some();
        // The config's SQLite ledger (`ledger.sqlite` in the synth directory by default).
        let coordinator = fedq_coordinator::start(cfg).await?;
        Ok(LocalFederation {
            dir: dir.to_path_buf(),
            nodes,
            node_configs,
            sites,
            coordinator,
            passwords,
            officer_passwords,
            researcher_tls,
        })
    }

    /// The coordinator's Flight SQL URL (`https://` when `[researcher_tls]` is set).
    pub fn url(&self) -> String {
        let scheme = if self.researcher_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.coordinator.addr)
    }

    /// The federation CA (PEM), which issued the coordinator's certificate.
    pub fn ca(&self) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("certs").join("ca.pem")).ok()
    }

    /// Password of a researcher or officer.
    pub fn password(&self, user: &str) -> Result<String, CliError> {
        self.passwords
            .get(user)
            .or_else(|| self.officer_passwords.get(user))
            .cloned()
            .ok_or_else(|| CliError::User(format!("no password for user {user}")))
    }

    /// A client logged in as `user` (a researcher or an officer).
    pub async fn client(&self, user: &str) -> Result<crate::client::FedqClient, CliError> {
        let ca = self.ca();
        crate::client::FedqClient::connect_with_ca(
            &self.url(),
            ca.as_deref(),
            user,
            &self.password(user)?,
        )
        .await
    }

    /// Stop one node (to simulate a site going down). Returns its site name.
    pub async fn stop_node(&mut self, index: usize) -> Result<String, CliError> {
        if index >= self.nodes.len() {
            return Err(CliError::User(format!("no node #{index}")));
        }
        let h = self.nodes.remove(index);
        self.node_configs.remove(index);
        let site = self.sites.remove(index);
        h.shutdown().await?;
        Ok(site)
    }

    /// Stop node `index` and start it again on the same address, as a hospital restarting
    /// its node would; the coordinator keeps running.
    pub async fn restart_node(&mut self, index: usize) -> Result<(), CliError> {
        if index >= self.nodes.len() {
            return Err(CliError::User(format!("no node #{index}")));
        }
        let cfg = self.node_configs[index].clone();
        let old = self.nodes.remove(index);
        old.shutdown().await?;
        let h = fedq_node::start(cfg).await?;
        self.nodes.insert(index, h);
        Ok(())
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
