//! # fedq-coordinator
//!
//! The coordinator plans a researcher's SQL across the hospital nodes, merges their partial
//! aggregates, charges the researcher's privacy budget, adds differential-privacy noise and
//! releases the result over Arrow Flight SQL.
//!
//! ## Code map
//! - [`config`]: `coordinator.toml`, validated.
//! - [`planner`]: SQL → checked plan: one typed node request, the noisy statistics with
//!   their sensitivities and ε shares, and the post-processing plan.
//! - [`predicate`]: WHERE → the wire's total expression language.
//! - [`fanout`]: parallel requests to nodes and exact merge of partials.
//! - [`ledger`]: the SQLite [`Ledger`]: budgets (per researcher and per dataset), atomic
//!   charges, refunds, stored answers for free replays.
//! - [`audit`]: the SHA3-256 hash chain of audit entries in the ledger file; verify, export.
//! - [`noise`]: OpenDP's discrete Laplace sampler, confidence half-widths.
//! - [`quantile`]: private quantiles (MEDIAN, PERCENTILE_CONT): OpenDP's quantile score from
//!   the nodes' exact histograms and its exponential mechanism (noisy max) per group.
//! - [`selection`]: DP partition selection (OpenDP `make_laplace_threshold`) for GROUP BY
//!   keys without a public domain.
//! - [`release`]: noise, AVG, VAR/STDDEV, small-cell suppression (the `fedq_suppressed`
//!   column), post-processing, Arrow metadata.
//! - [`explain`]: `EXPLAIN <query>`: sensitivities, ε split, noise scales and expected errors,
//!   free of charge.
//! - [`engine`]: [`Coordinator`], the whole pipeline without a network front end.
//! - [`auth`]: users (Argon2 hashes in the ledger), handshake login, short-lived bearer
//!   tokens and the interceptor that checks them.
//! - [`service`]: the Flight SQL service and officer actions.
//! - [`error`]: the one error enum and its single mapping to `tonic::Status`.
//!
//! ## Rules this crate enforces
//! - Only aggregates over one catalog table (or up to five joined on the privacy unit) are
//!   answered; anything that would return rows or aggregate an unbounded column is refused
//!   with a reason (fail closed). A GROUP BY key without a public domain is answered only
//!   through DP partition selection, which needs the table's G and the policy's δ.
//! - Sensitivities come only from the catalog: R (rows per participant), S (sites per
//!   participant), clamp bounds and precision.
//! - The budget is charged after every node answered and before any noise is drawn, in one
//!   SQLite transaction with its audit entry; noise comes only from OpenDP. An identical
//!   query (same canonical plan) from the same researcher gets the stored answer for free.
//! - Node and internal errors reach researchers only as generic messages with a query id.

pub mod audit;
pub mod auth;
pub mod calendar;
pub mod cohort;
pub mod config;
pub mod engine;
pub mod error;
pub mod explain;
pub mod fanout;
pub mod ledger;
pub mod metrics;
pub mod noise;
pub mod planner;
pub mod predicate;
pub mod quantile;
pub mod release;
pub mod rename;
pub mod scalar;
pub mod selection;
pub mod service;
pub mod sql_limits;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;

pub use auth::{AuthInterceptor, Officer, Researcher, Role, Sessions};
pub use config::CoordinatorConfig;
pub use engine::Coordinator;
pub use error::CoordinatorError;
pub use ledger::{BudgetKind, BudgetStatus, Charge, Grant, Ledger};
pub use service::FedqFlightSqlService;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::sync::oneshot;

/// Largest request a researcher may send, in bytes.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// A running coordinator.
pub struct CoordinatorHandle {
    /// Address the Flight SQL server is bound to.
    pub addr: SocketAddr,
    /// The engine, for in-process use (tests, demo).
    pub engine: Arc<Coordinator>,
    /// Address of the `/metrics` endpoint, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    _metrics: Option<fedq_common::metrics::MetricsServer>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl CoordinatorHandle {
    /// Stop serving and wait for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), CoordinatorError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Wait until the server stops.
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CoordinatorError::Config(format!("server error: {e}"))),
            Err(e) => Err(CoordinatorError::internal("-", format!("server task: {e}"))),
        }
    }
}

/// Open the config's SQLite ledger, bring it up to date with the config (seed new budgets,
/// audit a changed catalog or policy) and start serving.
pub async fn start(config: CoordinatorConfig) -> Result<CoordinatorHandle, CoordinatorError> {
    let ledger = Arc::new(Ledger::open(&config.ledger)?);
    start_with_ledger(config, ledger).await
}

/// Start a coordinator over an open ledger (synced with the config first). Binds
/// `config.listen` (port 0 picks a free port; see [`CoordinatorHandle::addr`]).
pub async fn start_with_ledger(
    config: CoordinatorConfig,
    ledger: Arc<Ledger>,
) -> Result<CoordinatorHandle, CoordinatorError> {
    ledger.sync_config(&config)?;
    let engine = Arc::new(Coordinator::new(&config, ledger)?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            CoordinatorError::Config(format!(
                "cannot listen on {}: {e}; choose another address with `listen`",
                config.listen
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Config(format!("cannot read bound address: {e}")))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "coordinator listens on a non-loopback address");
    }
    let sessions = Arc::new(Sessions::new(config.token_ttl));
    let service = FedqFlightSqlService::new(engine.clone(), sessions.clone(), config.login)?;
    let server = FlightServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let intercepted = tonic::service::interceptor::InterceptedService::new(
        server,
        AuthInterceptor::new(sessions),
    );
    let metrics = match config.metrics_listen {
        Some(a) => Some(
            fedq_common::metrics::serve(a, engine.metrics().registry.clone())
                .await
                .map_err(|e| {
                    CoordinatorError::Config(format!(
                        "cannot serve /metrics on {a}: {e}; choose another address with `metrics_listen`"
                    ))
                })?,
        ),
        None => None,
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &config.researcher_tls {
        // Fails only if a provider is already installed, which is what we want.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&t.cert, &t.key))
            .timeout(std::time::Duration::from_secs(10));
        builder = builder.tls_config(tls).map_err(|e| {
            CoordinatorError::Config(format!(
                "{}: {e}; check [researcher_tls] cert and key",
                t.cert_path.display()
            ))
        })?;
        tracing::info!(%addr, "researcher endpoint: TLS (grpc+tls://)");
    }
    let (tx, rx) = oneshot::channel::<()>();
    // TCP_NODELAY: without it, Nagle's algorithm and delayed ACKs hold small response frames
    // back for tens of milliseconds.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        builder
            .add_service(intercepted)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, "coordinator listening");
    Ok(CoordinatorHandle {
        addr,
        engine,
        metrics_addr: metrics.as_ref().map(|m| m.addr),
        _metrics: metrics,
        shutdown: Some(tx),
        task,
    })
}
