//! Shared fixtures for fedq's end-to-end tests: a synthetic federation on loopback, and
//! exact expected values computed with DataFusion over the union of the sites' files.

use std::collections::BTreeMap;
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
        base_port: 31050,
    })
    .expect("synth");
}

/// Rewrite `max_rows_per_unit` of every table in the catalog (e.g. to rule out truncation).
/// Synth leaves the nodes' own R caps commented out, so the nodes follow it.
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

/// Remove the declared date range (`earliest`/`latest`) of `table.column` from the catalog,
/// so that its calendar years have no public domain.
pub fn drop_date_range(dir: &Path, table: &str, column: &str) {
    set_date_range(dir, table, column, None);
}

/// Declare (or, with `None`, drop) the public date range of `table.column` in the catalog.
pub fn set_date_range(dir: &Path, table: &str, column: &str, range: Option<(&str, &str)>) {
    let p = dir.join("catalog.toml");
    let mut cat = fedq_common::Catalog::load(&p).expect("catalog");
    let c = cat
        .tables
        .get_mut(table)
        .and_then(|t| t.columns.iter_mut().find(|c| c.name == column))
        .expect("column in the catalog");
    c.earliest = range.map(|r| r.0.to_string());
    c.latest = range.map(|r| r.1.to_string());
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

/// Merged exact partials keyed by the display of their group key values, each row holding
/// the values of `partials` in that order (every one must be in `aggregates`). Groups whose
/// partials are all zero are left out: public domains include empty groups, which an exact
/// DataFusion answer never lists.
pub fn merged_rows(
    merged: &fedq_coordinator::fanout::MergedPartials,
    aggregates: &[fedq_common::AggregateRequest],
    partials: &[fedq_common::AggregateRequest],
) -> BTreeMap<Vec<String>, Vec<i128>> {
    let at: Vec<usize> = partials
        .iter()
        .map(|p| {
            aggregates
                .iter()
                .position(|a| a == p)
                .unwrap_or_else(|| panic!("no partial {p:?} in {aggregates:?}"))
        })
        .collect();
    merged
        .groups
        .iter()
        .map(|(k, v)| {
            (
                k.iter().map(|x| x.to_string()).collect(),
                at.iter().map(|&i| v[i]).collect::<Vec<i128>>(),
            )
        })
        .filter(|(_, v)| v.iter().any(|&x| x != 0))
        .collect()
}

/// DataFusion's answer to `sql`, keyed like [`merged_rows`]: its first `n_keys` columns are
/// the keys, the others integers.
pub async fn exact_rows(
    ctx: &SessionContext,
    sql: &str,
    n_keys: usize,
) -> BTreeMap<Vec<String>, Vec<i128>> {
    let mut out = BTreeMap::new();
    for b in ctx
        .sql(sql)
        .await
        .expect("plan the exact query")
        .collect()
        .await
        .expect("run the exact query")
    {
        for row in 0..b.num_rows() {
            out.insert(
                (0..n_keys).map(|c| key(&b, c, row)).collect(),
                (n_keys..b.num_columns())
                    .map(|c| cell(&b, c, row).expect("no NULL in an exact count") as i128)
                    .collect(),
            );
        }
    }
    out
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

/// A channel to a synth node at `addr` over mTLS, presenting the certificate `cert_name`
/// (`coordinator` is the one the generated nodes allow) from the federation in `dir`.
pub async fn node_channel(
    dir: &Path,
    addr: std::net::SocketAddr,
    site: &str,
    cert_name: &str,
) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    fedq_node::install_crypto_provider();
    let certs = dir.join("certs");
    let read = |n: &str| std::fs::read(certs.join(n)).expect("certificate file");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{cert_name}.pem")),
            read(&format!("{cert_name}.key")),
        ))
        .domain_name(site);
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect to the node")
}

/// The fault proxies of a federation, one per site, in the order the nodes started.
pub type Proxies = std::sync::Arc<std::sync::Mutex<Vec<(String, FaultProxy)>>>;

/// A `node_address` hook that puts a [`FaultProxy`] in front of every node and records it
/// in `proxies`.
pub fn behind_proxies(proxies: &Proxies) -> fedq::federation::NodeAddressHook {
    let p = proxies.clone();
    std::sync::Arc::new(move |site: &str, addr| {
        let proxy = FaultProxy::start(addr);
        let a = proxy.addr;
        p.lock().expect("proxies").push((site.to_string(), proxy));
        a
    })
}

/// Set the fault of `site`'s proxy.
pub fn set_fault(proxies: &Proxies, site: &str, fault: Fault) {
    let p = proxies.lock().expect("proxies");
    p.iter()
        .find(|(s, _)| s == site)
        .expect("a proxy for the site")
        .1
        .set(fault);
}

/// What a [`FaultProxy`] does with the bytes between the coordinator and a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Forward everything.
    Pass = 0,
    /// Hold every byte in both directions (a node that hangs).
    Stall = 1,
    /// Forward what the coordinator sends, then cut the connection: the node got the
    /// request and is gone before it answers (a node killed mid-query).
    Kill = 2,
    /// Forward everything until the coordinator has sent more than
    /// [`HANG_AFTER_BYTES`] since the fault was set, then hold everything the node sends
    /// back. The reachability probe is far smaller, so it is answered; a request with a
    /// larger ticket reaches the node, which runs it, and its answer never arrives (a node
    /// that hangs after it has read data).
    HangAfterLargeRequest = 3,
}

/// Bytes the coordinator may send after [`Fault::HangAfterLargeRequest`] is set before
/// the node's answers are held: more than a probe (and a TLS handshake), less than a
/// ticket with a few hundred literals.
pub const HANG_AFTER_BYTES: u64 = 12 * 1024;

/// A test-only TCP proxy in front of a node that injects faults. TLS passes through it
/// untouched, so the coordinator still verifies the node's certificate. It exists only in
/// this test crate: nothing in a production config can reach it.
pub struct FaultProxy {
    /// Address the coordinator dials instead of the node's.
    pub addr: std::net::SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// Bytes the coordinator has sent since the fault was last set.
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    /// Start forwarding to `upstream` (must be called inside a Tokio runtime).
    pub fn start(upstream: std::net::SocketAddr) -> FaultProxy {
        use std::sync::atomic::AtomicU8;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy address");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let mode = std::sync::Arc::new(AtomicU8::new(Fault::Pass as u8));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, n) = (mode.clone(), sent.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (m, n) = (m.clone(), n.clone());
                tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            _ = pump(ri, wo, m.clone(), n.clone(), true) => {}
                            _ = pump(ro, wi, m, n, false) => {}
                        }
                        // Dropping both halves closes both connections.
                    }
                });
            }
        });
        FaultProxy { addr, mode, sent }
    }

    /// Change what the proxy does from now on.
    pub fn set(&self, fault: Fault) {
        self.sent.store(0, std::sync::atomic::Ordering::SeqCst);
        self.mode
            .store(fault as u8, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    to_node: bool,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to_node {
            sent.fetch_add(n as u64, Ordering::SeqCst);
        }
        let hangs = |m: u8| {
            m == Fault::Stall as u8
                || (!to_node
                    && m == Fault::HangAfterLargeRequest as u8
                    && sent.load(Ordering::SeqCst) > HANG_AFTER_BYTES)
        };
        while hangs(mode.load(Ordering::SeqCst)) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let kill = mode.load(Ordering::SeqCst) == Fault::Kill as u8;
        if kill && !to_node {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if kill {
            return;
        }
    }
}

/// The `query.charged` entries of the audit log in `dir`'s ledger, oldest first (read after
/// the federation has shut down).
pub fn charged_entries(dir: &Path) -> Vec<serde_json::Value> {
    let path = dir.join("ledger.sqlite");
    let conn = fedq_coordinator::audit::open_read_only(&path).expect("open audit log");
    fedq_coordinator::audit::read_rows(&conn, &path)
        .expect("read audit log")
        .into_iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.entry).expect("audit entry is JSON"))
        .filter(|e| e["kind"] == "query.charged")
        .collect()
}

/// Copy a federation directory (configs, site files), so that a neighbouring federation can
/// be made from it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy file");
        }
    }
}

/// Every Parquet file of every site of the federation in `dir`.
fn site_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for site in std::fs::read_dir(dir.join("sites")).expect("sites dir") {
        let site = site.expect("site entry").path();
        for f in std::fs::read_dir(&site).expect("site dir") {
            let f = f.expect("file entry").path();
            if f.extension().is_some_and(|e| e == "parquet") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).expect("open parquet");
    datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .expect("parquet reader")
        .build()
        .expect("parquet reader")
        .map(|b| b.expect("parquet batch"))
        .collect()
}

/// Remove participant `pid` from every table at every site of the federation in `dir` (the
/// neighbouring federation of add/remove DP). Returns how many rows were removed.
pub fn remove_participant(dir: &Path, pid: &str) -> usize {
    use datafusion::arrow::array::{BooleanArray, StringArray};
    let mut removed = 0;
    for path in site_files(dir) {
        let batches = read_parquet(&path);
        let Some(schema) = batches.first().map(|b| b.schema()) else {
            continue;
        };
        let mut kept = Vec::new();
        for b in &batches {
            let ids = b
                .column_by_name("pid")
                .expect("pid column")
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("pid is utf8");
            let keep: BooleanArray = ids.iter().map(|v| Some(v != Some(pid))).collect();
            let k = datafusion::arrow::compute::filter_record_batch(b, &keep).expect("filter");
            removed += b.num_rows() - k.num_rows();
            kept.push(k);
        }
        let out = std::fs::File::create(&path).expect("rewrite parquet");
        let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(out, schema, None)
            .expect("parquet writer");
        for b in &kept {
            w.write(b).expect("write batch");
        }
        w.close().expect("close parquet");
    }
    removed
}

/// The first participant (in site and file order) whose `participants` row satisfies
/// `pred(birth_year)`.
pub fn participant_born(dir: &Path, pred: impl Fn(i32) -> bool) -> String {
    use datafusion::arrow::array::{Int32Array, StringArray};
    for path in site_files(dir) {
        if path.file_stem().is_none_or(|s| s != "participants") {
            continue;
        }
        for b in read_parquet(&path) {
            let ids = b.column_by_name("pid").expect("pid");
            let ids = ids
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8 pid");
            let years = b.column_by_name("birth_year").expect("birth_year");
            let years = years
                .as_any()
                .downcast_ref::<Int32Array>()
                .expect("int32 year");
            for i in 0..b.num_rows() {
                if years.is_valid(i) && pred(years.value(i)) {
                    return ids.value(i).to_string();
                }
            }
        }
    }
    panic!("no participant with such a birth year")
}

/// Log lines written while a test runs (a `tracing_subscriber` writer), for asserting what
/// a node or the coordinator logs.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Capture INFO and above on this thread until the guard is dropped. With a
    /// current-thread runtime the node's and coordinator's tasks run here too.
    pub fn install() -> (Captured, tracing::subscriber::DefaultGuard) {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}
