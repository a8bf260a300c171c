//! Node configuration (`node.toml`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedq_common::Catalog;
use serde::Deserialize;

use crate::error::NodeError;

/// Address a node listens on when the config does not say.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:31051";

/// Format of a local table's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// Apache Parquet (`.parquet`, `.parq`, `.pq`).
    Parquet,
    /// CSV with a header line (`.csv`).
    Csv,
}

impl TableFormat {
    /// File extension (with the dot) selected when the path is a directory.
    pub fn extension(self) -> &'static str {
        match self {
            TableFormat::Parquet => ".parquet",
            TableFormat::Csv => ".csv",
        }
    }

    /// Infer the format from a file name.
    pub fn from_path(path: &Path) -> Option<TableFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "parq" | "pq" => Some(TableFormat::Parquet),
            "csv" => Some(TableFormat::Csv),
            _ => None,
        }
    }
}

impl std::fmt::Display for TableFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableFormat::Parquet => "parquet",
            TableFormat::Csv => "csv",
        })
    }
}

/// Where a served table's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSource {
    /// Absolute path of a file, or of a directory whose files (with the format's extension)
    /// together make up the table. Relative paths in the config are resolved against the
    /// config file's directory.
    pub path: PathBuf,
    /// File format; inferred from the extension when the config does not say.
    pub format: TableFormat,
}

/// A node's configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Site name, reported in [`fedq_common::NodeInfo`] and in error messages.
    pub site: String,
    /// Address the Flight server binds (default `127.0.0.1:31051`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// The privacy officer's catalog, loaded and validated.
    pub catalog: Catalog,
    /// Absolute path of the catalog file.
    pub catalog_path: PathBuf,
    /// Catalog tables served at this site, by catalog table name. Catalog tables not listed
    /// here are not served.
    pub tables: BTreeMap<String, TableSource>,
    /// How coordinators connect: mTLS (the default and the only production mode) or
    /// plaintext for development.
    pub transport: NodeTransport,
    /// Resource limits of this node.
    pub limits: NodeLimits,
    /// Where to serve Prometheus `/metrics` (plain HTTP); `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// The node's own policy per served table (every served table has one): what it shares
    /// on top of the catalog, which it can only narrow.
    pub policy: BTreeMap<String, TablePolicy>,
}

/// What a node shares of one table, on top of the catalog (`[tables.NAME]` keys `columns`,
/// `max_rows_per_unit` and `[tables.NAME.clamp]` in `node.toml`). A hospital can narrow
/// what the catalog allows, never widen it: requests outside it are refused by the node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TablePolicy {
    /// Columns the node shares (the privacy unit is always used for bounding, never
    /// returned); `None`: every catalog column.
    pub columns: Option<BTreeSet<String>>,
    /// Largest R the node accepts; `None`: the catalog's.
    pub max_rows_per_unit: Option<u32>,
    /// Widest clamp `(lower, upper)` the node accepts for a sum over a column; columns
    /// not listed accept the catalog's bounds.
    pub clamp: BTreeMap<String, (f64, f64)>,
}

impl TablePolicy {
    /// Whether the node shares `column` (the privacy unit `unit` always is, for bounding).
    pub fn shares(&self, column: &str, unit: &str) -> bool {
        column == unit || self.columns.as_ref().is_none_or(|c| c.contains(column))
    }
}

/// How much of the hospital's server a node may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLimits {
    /// A query running longer is stopped and reported as timed out.
    pub query_timeout: std::time::Duration,
    /// Queries running at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_concurrent_queries: usize,
    /// Memory one query may use, in bytes (`max_query_memory_mb`). It is not enforced while
    /// a query runs: whether a query crosses a limit depends on its data (a WHERE
    /// calibrated to the threshold flips it with one participant), so no query is stopped
    /// on memory. Instead the node checks at start-up, and again when a table's files
    /// change, that the worst query over its tables fits it (the two largest tables
    /// joined, see `engine::WORST_CASE_FACTOR`, plus the largest accumulators a request can
    /// ask for): it refuses to start otherwise, naming the table, the estimate and the
    /// value to set, and refuses requests on a table that grew past it, before reading.
    pub max_query_memory: usize,
}

/// Default `max_query_memory_mb`.
pub const DEFAULT_MAX_QUERY_MEMORY_MB: usize = 512;

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            query_timeout: std::time::Duration::from_secs(120),
            max_concurrent_queries: 4,
            max_query_memory: DEFAULT_MAX_QUERY_MEMORY_MB * 1024 * 1024,
        }
    }
}

/// How a node accepts coordinator connections.
#[derive(Debug, Clone)]
pub enum NodeTransport {
    /// mTLS: the coordinator's client certificate must chain to the CA and name a
    /// coordinator on the allow-list.
    Tls {
        /// The federation CA, this node's certificate and key.
        pem: fedq_common::tls::TlsPem,
        /// Names (certificate common name or DNS subject-alternative name) of the
        /// coordinators this node answers.
        allowed_coordinators: Vec<String>,
    },
    /// Plaintext, anyone who can connect is served (`insecure_dev = true`; logs a warning).
    InsecureDev,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: String,
    #[serde(default)]
    listen: Option<String>,
    catalog: String,
    #[serde(default)]
    tables: BTreeMap<String, RawTable>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    insecure_dev: bool,
    #[serde(default)]
    query_timeout_secs: Option<u64>,
    #[serde(default)]
    max_concurrent_queries: Option<usize>,
    #[serde(default)]
    max_query_memory_mb: Option<usize>,
    #[serde(default)]
    metrics_listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    allowed_coordinators: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    path: String,
    #[serde(default)]
    format: Option<TableFormat>,
    #[serde(default)]
    columns: Option<Vec<String>>,
    #[serde(default)]
    max_rows_per_unit: Option<u32>,
    #[serde(default)]
    clamp: BTreeMap<String, RawClamp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClamp {
    lower: f64,
    upper: f64,
}

impl NodeConfig {
    /// Load a node config file: parse it, resolve relative paths against its directory, and
    /// load and validate the catalog it names.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::ConfigRead {
            path: path.display().to_string(),
            source: e,
        })?;
        let abs = absolute(path);
        let base = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        parse(&text, &base, &path.display().to_string())
    }

    /// Parse a node config from TOML text; relative paths are resolved against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<NodeConfig, NodeError> {
        let origin = format!("(text, paths relative to {})", base_dir.display());
        parse(text, &absolute(base_dir), &origin)
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn parse(text: &str, base: &Path, origin: &str) -> Result<NodeConfig, NodeError> {
    let bad = |message: String| NodeError::Config {
        origin: origin.to_string(),
        message,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        bad(format!(
            "not a valid node config (expected keys: site, listen, catalog, insecure_dev, query_timeout_secs, max_concurrent_queries, max_query_memory_mb, metrics_listen, a [tls] section with ca, cert, key and allowed_coordinators, and [tables.NAME] sections with path, format, columns, max_rows_per_unit and [tables.NAME.clamp] COLUMN = {{ lower, upper }}): {}",
            e.to_string().trim_end()
        ))
    })?;
    if raw.site.trim().is_empty() {
        return Err(bad("`site` is empty; give this node a site name".into()));
    }
    let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        bad(format!(
            "`listen = \"{listen_text}\"` is not an IP address with a port; write e.g. \"127.0.0.1:31051\""
        ))
    })?;
    let catalog_path = absolute(&base.join(&raw.catalog));
    let catalog = Catalog::load(&catalog_path).map_err(|e| NodeError::Catalog {
        origin: origin.to_string(),
        source: e,
    })?;
    if raw.tables.is_empty() {
        return Err(bad(
            "no tables configured; add a [tables.NAME] section with the `path` of each catalog table served here".into(),
        ));
    }
    let mut tables = BTreeMap::new();
    let mut policy = BTreeMap::new();
    for (name, t) in raw.tables {
        if let Some(spec) = catalog.table(&name) {
            policy.insert(
                name.clone(),
                table_policy(&name, spec, t.columns, t.max_rows_per_unit, &t.clamp).map_err(bad)?,
            );
        } else {
            let known: Vec<&str> = catalog.tables.keys().map(String::as_str).collect();
            return Err(bad(format!(
                "[tables.{name}] is not a table of the catalog {} (catalog tables: {}); rename the section or ask the privacy officer to declare it",
                catalog_path.display(),
                known.join(", ")
            )));
        }
        let path = absolute(&base.join(&t.path));
        if !path.exists() {
            return Err(NodeError::MissingFile {
                table: name,
                path: path.display().to_string(),
            });
        }
        let format = match t.format {
            Some(f) => f,
            None => TableFormat::from_path(&path).ok_or_else(|| {
                bad(format!(
                    "[tables.{name}]: cannot infer the format of {}; add `format = \"parquet\"` or `format = \"csv\"`",
                    path.display()
                ))
            })?,
        };
        tables.insert(name, TableSource { path, format });
    }
    let transport = match (raw.tls, raw.insecure_dev) {
        (Some(_), true) => {
            return Err(bad(
                "both [tls] and insecure_dev = true are set; remove insecure_dev to use mTLS".into(),
            ))
        }
        (None, false) => {
            return Err(bad(
                "no [tls] section: a node accepts coordinators only over mutual TLS. Add [tls] with ca, cert, key and allowed_coordinators (create development certificates with `fedq certs init` and `fedq certs issue`), or, on a development machine only, set insecure_dev = true".into(),
            ))
        }
        (None, true) => NodeTransport::InsecureDev,
        (Some(t), false) => {
            if t.allowed_coordinators.is_empty()
                || t.allowed_coordinators.iter().any(|n| n.trim().is_empty())
            {
                return Err(bad(
                    "[tls] allowed_coordinators is empty or has an empty name; list the name in your coordinator's certificate, e.g. [\"coordinator\"]".into(),
                ));
            }
            let pem = fedq_common::tls::TlsPem::load(base, &t.ca, &t.cert, &t.key).map_err(bad)?;
            NodeTransport::Tls {
                pem,
                allowed_coordinators: t.allowed_coordinators,
            }
        }
    };
    let metrics_listen = match &raw.metrics_listen {
        None => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            bad(format!(
                "`metrics_listen = \"{text}\"` is not an IP address with a port; write e.g. \"127.0.0.1:9101\""
            ))
        })?),
    };
    let mut limits = NodeLimits::default();
    if let Some(mb) = raw.max_query_memory_mb {
        if mb == 0 || mb > 1024 * 1024 {
            return Err(bad(format!(
                "max_query_memory_mb = {mb} must be between 1 and 1048576 (1 TiB)"
            )));
        }
        limits.max_query_memory = mb * 1024 * 1024;
    }
    if let Some(t) = raw.query_timeout_secs {
        if t == 0 || t > 86_400 {
            return Err(bad(format!(
                "query_timeout_secs = {t} must be between 1 and 86400"
            )));
        }
        limits.query_timeout = std::time::Duration::from_secs(t);
    }
    if let Some(n) = raw.max_concurrent_queries {
        if n == 0 || n > 1024 {
            return Err(bad(format!(
                "max_concurrent_queries = {n} must be between 1 and 1024"
            )));
        }
        limits.max_concurrent_queries = n;
    }
    Ok(NodeConfig {
        limits,
        policy,
        metrics_listen,
        site: raw.site,
        listen,
        catalog,
        catalog_path,
        tables,
        transport,
    })
}

/// Check one table's node policy against the catalog: it may only narrow it.
fn table_policy(
    table: &str,
    spec: &fedq_common::TableSpec,
    columns: Option<Vec<String>>,
    max_rows_per_unit: Option<u32>,
    clamp: &BTreeMap<String, RawClamp>,
) -> Result<TablePolicy, String> {
    let known = || {
        spec.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let columns = match columns {
        None => None,
        Some(list) => {
            let mut set = BTreeSet::new();
            for c in list {
                if spec.column(&c).is_none() {
                    return Err(format!(
                        "[tables.{table}] columns lists `{c}`, which the catalog does not declare for this table (catalog columns: {}); remove it",
                        known()
                    ));
                }
                set.insert(c);
            }
            Some(set)
        }
    };
    if let Some(r) = max_rows_per_unit {
        if r == 0 || r > spec.max_rows_per_unit {
            return Err(format!(
                "[tables.{table}] max_rows_per_unit = {r} must be between 1 and the catalog's {}; a node can only lower it",
                spec.max_rows_per_unit
            ));
        }
    }
    let mut clamps = BTreeMap::new();
    for (c, b) in clamp {
        let Some(col) = spec.column(c) else {
            return Err(format!(
                "[tables.{table}.clamp] names `{c}`, which the catalog does not declare for this table (catalog columns: {})",
                known()
            ));
        };
        let Some(cat) = col.bounds() else {
            return Err(format!(
                "[tables.{table}.clamp] `{c}`: the catalog declares no bounds for it, so it cannot be summed; remove it"
            ));
        };
        if !columns.as_ref().is_none_or(|s| s.contains(c)) {
            return Err(format!(
                "[tables.{table}.clamp] `{c}` is not in this table's `columns`, so it is not shared; remove the clamp or share the column"
            ));
        }
        if !(b.lower.is_finite() && b.upper.is_finite()) || b.lower >= b.upper {
            return Err(format!(
                "[tables.{table}.clamp] `{c}` = [{}, {}] needs finite bounds with lower < upper",
                b.lower, b.upper
            ));
        }
        if b.lower < cat.lower || b.upper > cat.upper {
            return Err(format!(
                "[tables.{table}.clamp] `{c}` = [{}, {}] is wider than the catalog's [{}, {}]; a node can only narrow it",
                b.lower, b.upper, cat.lower, cat.upper
            ));
        }
        clamps.insert(c.clone(), (b.lower, b.upper));
    }
    Ok(TablePolicy {
        columns,
        max_rows_per_unit,
        clamp: clamps,
    })
}
