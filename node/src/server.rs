//! The node's Arrow Flight service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use fedq_common::wire::ACTION_NODE_INFO;
use fedq_common::PartialAggregateRequest;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{NodeConfig, NodeTransport};
use crate::engine::NodeEngine;
use crate::error::NodeError;
use fedq_common::metrics::NodePhase;
use tracing::Instrument;

/// Largest gRPC message the server decodes. Tickets are at most
/// [`fedq_common::wire::MAX_REQUEST_BYTES`]; anything far larger is cut off by the transport.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 1024 * 1024;

/// Who may call this node.
#[derive(Debug, Clone)]
pub enum Access {
    /// Anyone who can connect (`insecure_dev = true`): there is no identity to check.
    InsecureDev,
    /// Callers whose (already CA-verified) client certificate names one of these.
    AllowList(Arc<std::collections::BTreeSet<String>>),
}

impl Access {
    /// The access rule of a node transport.
    pub fn of(transport: &NodeTransport) -> Access {
        match transport {
            NodeTransport::InsecureDev => Access::InsecureDev,
            NodeTransport::Tls {
                allowed_coordinators,
                ..
            } => Access::AllowList(Arc::new(allowed_coordinators.iter().cloned().collect())),
        }
    }
}

/// Names a certificate is issued to: its subject common names and DNS alternative names.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable client certificate: {e}"))?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::DNSName(d) = gn {
                names.push(d.to_string());
            }
        }
    }
    Ok(names)
}

/// The Flight service: `do_get` with a partial-aggregate ticket, and the node-info action.
#[derive(Debug, Clone)]
pub struct NodeService {
    engine: Arc<NodeEngine>,
    access: Access,
    limits: crate::config::NodeLimits,
    slots: Arc<tokio::sync::Semaphore>,
    metrics: crate::metrics::NodeMetrics,
}

impl NodeService {
    /// A service answering with `engine` to the callers `access` allows.
    pub fn new(engine: Arc<NodeEngine>, access: Access) -> Self {
        Self::with_limits(engine, access, crate::config::NodeLimits::default())
    }

    /// A service that runs at most `limits.max_concurrent_queries` queries at once, each
    /// for at most `limits.query_timeout`.
    pub fn with_limits(
        engine: Arc<NodeEngine>,
        access: Access,
        limits: crate::config::NodeLimits,
    ) -> Self {
        let metrics = crate::metrics::NodeMetrics::new(engine.site());
        NodeService {
            engine,
            access,
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_queries)),
            metrics,
        }
    }

    /// The node's metrics (served at `/metrics` when `metrics_listen` is set).
    pub fn metrics(&self) -> &crate::metrics::NodeMetrics {
        &self.metrics
    }

    /// A slot to run one query. A request waits for one at most `query_timeout`, then gets
    /// `Busy`, so the node queues briefly but never runs more than its limit at once.
    pub async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, NodeError> {
        let busy = || NodeError::Busy {
            site: self.engine.site().to_string(),
            running: self.limits.max_concurrent_queries,
        };
        match tokio::time::timeout(
            self.limits.query_timeout,
            Arc::clone(&self.slots).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(busy()),
        }
    }

    /// The calling coordinator's identity, or a refusal (logged here, with what the
    /// certificate names, for the hospital's own audit).
    fn caller<T>(&self, req: &Request<T>, what: &str) -> Result<String, Status> {
        let allowed = match &self.access {
            Access::InsecureDev => return Ok("(insecure-dev, unauthenticated)".to_string()),
            Access::AllowList(a) => a,
        };
        let site = self.engine.site();
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        let refuse = |names: String, reason: &str| {
            tracing::warn!(site, peer = %peer, coordinator = %fedq_common::log_safe(&names), request = what, outcome = "refused", reason, "caller refused");
            Status::from(NodeError::NotAllowed(format!(
                "node {site} does not answer this caller: {reason}; the node's operator must add the coordinator's certificate name to allowed_coordinators"
            )))
        };
        let Some(certs) = req.peer_certs() else {
            return Err(refuse("(no certificate)".into(), "no client certificate"));
        };
        let Some(leaf) = certs.first() else {
            return Err(refuse("(no certificate)".into(), "no client certificate"));
        };
        let names = certificate_names(leaf.as_ref())
            .map_err(|e| refuse("(unparseable certificate)".into(), &e))?;
        match names.iter().find(|n| allowed.contains(n.as_str())) {
            Some(n) => Ok(n.clone()),
            None => Err(refuse(
                names.join(","),
                "the certificate names no allowed coordinator",
            )),
        }
    }

    /// Answer one `DoGet`: check the caller, decode, validate, then take a slot and run the
    /// request. Every error status carries its [`fedq_common::outcome::FailureStage`] (see
    /// `impl From<NodeError> for Status`); a failure while encoding the response is
    /// [`NodeError::Internal`], after data.
    async fn answer(
        &self,
        request: Request<Ticket>,
        started: Instant,
    ) -> Result<Response<BoxedStream<FlightData>>, Status> {
        let who = self.caller(&request, "DoGet")?;
        let ticket = request.into_inner();
        let site = self.engine.site().to_string();
        let req = match PartialAggregateRequest::decode_ticket(&ticket.ticket) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    site = %site,
                    coordinator = %who,
                    outcome = "refused",
                    error = %e,
                    "undecodable ticket"
                );
                return Err(NodeError::from(e).into());
            }
        };
        // Every log line about the request, here and in the engine, carries its query id.
        let span = tracing::info_span!("request", query_id = %fedq_common::log_safe(&req.query_id));
        self.answer_request(who, req, started)
            .instrument(span)
            .await
    }

    /// [`NodeService::answer`] for a decoded request.
    async fn answer_request(
        &self,
        who: String,
        req: PartialAggregateRequest,
        started: Instant,
    ) -> Result<Response<BoxedStream<FlightData>>, Status> {
        let site = self.engine.site().to_string();
        // Everything that can refuse the request is checked here, before it waits for a
        // slot or reads a row: a refusal then depends only on the request, the catalog and
        // the node's policy and configuration, and says so (`FailureStage::BeforeData`), so
        // the coordinator may refund it. What fails later is after data and stays charged.
        if let Err(e) = self.engine.validate(&req) {
            tracing::warn!(
                site = %site,
                coordinator = %who,
                query_id = ?req.query_id,
                table = ?req.table,
                outcome = "refused",
                error = %e,
                "request refused"
            );
            return Err(e.into());
        }
        self.metrics.phase(NodePhase::Validate, started.elapsed());
        let queued = Instant::now();
        let _slot = match self.slot().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(site = %site, coordinator = %who, query_id = ?req.query_id, outcome = "busy", "request refused: node busy");
                return Err(e.into());
            }
        };
        self.metrics.phase(NodePhase::Queue, queued.elapsed());
        let timeout = self.limits.query_timeout;
        let metrics = &self.metrics;
        let phase = move |p: NodePhase, d: std::time::Duration| metrics.phase(p, d);
        let executed = tokio::time::timeout(timeout, self.engine.execute_validated(&req, &phase))
            .await
            .unwrap_or_else(|_| {
                Err(NodeError::TimedOut {
                    site: site.clone(),
                    query_id: req.query_id.clone(),
                    secs: timeout.as_secs(),
                })
            });
        let batches = match executed {
            Ok(b) => b,
            Err(e) => {
                let ms = started.elapsed().as_millis() as u64;
                if e.is_refusal() {
                    tracing::warn!(
                        site = %site,
                        coordinator = %who,
                        query_id = ?req.query_id,
                        table = ?req.table,
                        duration_ms = ms,
                        outcome = "refused",
                        error = %e,
                        "request refused"
                    );
                } else {
                    tracing::error!(
                        site = %site,
                        coordinator = %who,
                        query_id = ?req.query_id,
                        table = ?req.table,
                        duration_ms = ms,
                        outcome = "failed",
                        error = %e,
                        "request failed"
                    );
                }
                return Err(e.into());
            }
        };
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        tracing::info!(
            site = %site,
            coordinator = %who,
            query_id = ?req.query_id,
            table = ?req.table,
            groups = rows,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome = "ok",
            "partial aggregate answered"
        );
        let query_id = req.query_id;
        let encoded = FlightDataEncoderBuilder::new()
            .build(stream::iter(batches.into_iter().map(Ok)))
            .map_err(move |e| {
                let err = NodeError::Internal {
                    site: site.clone(),
                    query_id: query_id.clone(),
                    message: format!("encoding the response failed: {e}"),
                };
                tracing::error!(error = %err, outcome = "failed", "response encoding failed");
                Status::from(err)
            });
        Ok(Response::new(encoded.boxed()))
    }

    /// The tonic server wrapper, with the message size limit set.
    pub fn into_server(self) -> FlightServiceServer<NodeService> {
        FlightServiceServer::new(self).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
    }
}

type BoxedStream<T> = BoxStream<'static, Result<T, Status>>;

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not supported by a fedq node; use DoGet with a partial-aggregate ticket"
    )))
}

#[tonic::async_trait]
impl FlightService for NodeService {
    type HandshakeStream = BoxedStream<HandshakeResponse>;
    type ListFlightsStream = BoxedStream<FlightInfo>;
    type DoGetStream = BoxedStream<FlightData>;
    type DoPutStream = BoxedStream<PutResult>;
    type DoExchangeStream = BoxedStream<FlightData>;
    type DoActionStream = BoxedStream<arrow_flight::Result>;
    type ListActionsStream = BoxedStream<ActionType>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        // A caller off the allow-list learns nothing, not even what is implemented.
        self.caller(&request, "Handshake")?;
        unimplemented("Handshake")
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.caller(&request, "ListFlights")?;
        unimplemented("ListFlights")
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request, "GetFlightInfo")?;
        unimplemented("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.caller(&request, "PollFlightInfo")?;
        unimplemented("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.caller(&request, "GetSchema")?;
        unimplemented("GetSchema")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let started = Instant::now();
        let result = self.answer(request, started).await;
        self.metrics.record(
            result.as_ref().map(|_| ()).map_err(Status::code),
            started.elapsed(),
        );
        result
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.caller(&request, "DoPut")?;
        unimplemented("DoPut")
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.caller(&request, "DoExchange")?;
        unimplemented("DoExchange")
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.caller(&request, "DoAction")?;
        let action = request.into_inner();
        if action.r#type != ACTION_NODE_INFO {
            return Err(Status::unimplemented(format!(
                "unknown action; this node supports only {ACTION_NODE_INFO}"
            )));
        }
        let body = serde_json::to_vec(&self.engine.info()).map_err(|e| {
            Status::from(NodeError::Internal {
                site: self.engine.site().to_string(),
                query_id: ACTION_NODE_INFO.to_string(),
                message: e.to_string(),
            })
        })?;
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(stream::iter([Ok(result)]).boxed()))
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.caller(&request, "ListActions")?;
        let t = ActionType {
            r#type: ACTION_NODE_INFO.to_string(),
            description: "site, protocol version, fedq version and served tables, as JSON"
                .to_string(),
        };
        Ok(Response::new(stream::iter([Ok(t)]).boxed()))
    }
}

/// A running node. Dropping the handle also stops the server (without waiting).
#[derive(Debug)]
pub struct NodeHandle {
    /// Address the server is listening on (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// Address of the `/metrics` endpoint, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The node's metrics, for in-process readers (`fedq bench --breakdown`).
    pub metrics: crate::metrics::NodeMetrics,
    _metrics: Option<fedq_common::metrics::MetricsServer>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl NodeHandle {
    /// Stop accepting connections, let in-flight requests finish, and wait for the server.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(tx) = self.shutdown.take() {
            // The server may already have stopped; then there is no one to tell.
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NodeError::Server(e.to_string())),
            Err(e) => Err(NodeError::Server(format!(
                "server task ended abnormally: {e}"
            ))),
        }
    }
}

/// Start a node: check the tables, bind `config.listen` and serve Flight in a background task.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    let engine = Arc::new(NodeEngine::new(&config).await?);
    // TLS is terminated by `tls_listener` (so refused handshakes are logged), not by tonic.
    let tls = match &config.transport {
        NodeTransport::Tls {
            pem,
            allowed_coordinators,
        } => {
            install_crypto_provider();
            let tls = crate::tls_listener::server_config(pem)?;
            tracing::info!(site = %config.site, allowed = ?allowed_coordinators, "mTLS on: only allowed coordinators with a certificate from the federation CA");
            Some(tls)
        }
        NodeTransport::InsecureDev => {
            tracing::warn!(site = %config.site, "{}", fedq_common::tls::INSECURE_DEV_WARNING);
            None
        }
    };
    if !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "node listens on a non-loopback address; make sure only the coordinator can reach it"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| NodeError::Bind {
            addr: config.listen.to_string(),
            source: e,
        })?;
    let addr = listener.local_addr().map_err(|e| NodeError::Bind {
        addr: config.listen.to_string(),
        source: e,
    })?;
    let (tx, rx) = oneshot::channel::<()>();
    let service = NodeService::with_limits(
        Arc::clone(&engine),
        Access::of(&config.transport),
        config.limits,
    );
    let node_metrics = service.metrics().clone();
    let metrics = match config.metrics_listen {
        Some(a) => Some(
            fedq_common::metrics::serve(a, service.metrics().registry.clone())
                .await
                .map_err(|e| NodeError::Bind {
                    addr: a.to_string(),
                    source: e,
                })?,
        ),
        None => None,
    };
    let service = service.into_server();
    let shutdown = async move {
        // Stop on an explicit shutdown or when the handle is dropped.
        let _ = rx.await;
    };
    let router = tonic::transport::Server::builder().add_service(service);
    let task = match tls {
        Some(tls) => {
            let incoming = crate::tls_listener::incoming(listener, tls, config.site.clone());
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
        None => {
            // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold small response
            // frames back for tens of milliseconds.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    tracing::info!(
        site = %config.site,
        %addr,
        tables = ?engine.info().tables,
        "fedq node listening"
    );
    Ok(NodeHandle {
        addr,
        metrics_addr: metrics.as_ref().map(|m| m.addr),
        metrics: node_metrics,
        _metrics: metrics,
        shutdown: Some(tx),
        task,
    })
}

/// Make rustls use the ring provider (the one fedq is built with), once per process.
pub fn install_crypto_provider() {
    // Fails only if a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use crate::config::NodeLimits;

    #[tokio::test]
    async fn limits_parse_and_a_full_node_refuses_with_resource_exhausted() {
        let fx = crate::tests::Fixture::new();
        let text = format!(
            "query_timeout_secs = 1\nmax_concurrent_queries = 1\n{}",
            crate::tests::NODE_TOML
        );
        let cfg = NodeConfig::from_toml_str(&text, fx.dir.path()).unwrap();
        assert_eq!(
            cfg.limits,
            NodeLimits {
                query_timeout: std::time::Duration::from_secs(1),
                max_concurrent_queries: 1,
                ..NodeLimits::default()
            }
        );
        for bad in ["query_timeout_secs = 0\n", "max_concurrent_queries = 0\n"] {
            let text = format!("{bad}{}", crate::tests::NODE_TOML);
            let e = NodeConfig::from_toml_str(&text, fx.dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains("between 1"), "{e}");
        }
        let engine = Arc::new(NodeEngine::new(&cfg).await.unwrap());
        let svc = NodeService::with_limits(engine, Access::of(&cfg.transport), cfg.limits);
        let first = svc.slot().await.unwrap();
        // The second request waits the query timeout for a slot, then is refused.
        let busy = svc.slot().await.unwrap_err();
        let status = Status::from(busy);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("busy"), "{}", status.message());
        drop(first);
        let _again = svc.slot().await.unwrap();
    }
}
