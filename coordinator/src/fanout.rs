//! Fan-out to the nodes and merge of their partial aggregates.
//!
//! Every node gets the same typed request, in parallel. Nodes answer with small Arrow
//! batches of partial aggregates; the coordinator checks their shape, keeps only keys from
//! the public domain, and adds them up exactly (`i128`). If any node fails or times out the
//! whole query fails before anything is charged or released.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, Ticket};
use datafusion::arrow::array::{
    Array, AsArray, BooleanArray, Decimal128Array, Int32Array, Int64Array, RecordBatch,
};
use datafusion::arrow::datatypes::DataType;
use fedq_common::outcome::{FailureStage, FAILURE_STAGE_METADATA};
use fedq_common::quantile::QuantileGrid;
use fedq_common::wire::META_TRUNCATED_UNITS;
use fedq_common::{AggregateRequest, NodeInfo, PartialAggregateRequest, PublicValue};
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{NodeEndpoint, NodeTransport};
use crate::error::CoordinatorError;
use crate::planner::GroupKey;

/// Largest node answer accepted, in bytes.
const MAX_NODE_RESPONSE: usize = 64 * 1024 * 1024;

/// Exact merged partials, before any noise. Library-only: no network path returns these.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedPartials {
    /// Group key -> one exact value per requested partial aggregate.
    pub groups: BTreeMap<Vec<PublicValue>, Vec<i128>>,
    /// Sites that answered.
    pub sites_answered: Vec<String>,
    /// Participants whose rows bounding truncated, summed over sites (exact; released
    /// only with noise). `None` if a node did not report it.
    pub truncated_units: Option<i128>,
    /// Sites that failed or timed out (only non-empty with `allow_partial`).
    pub sites_failed: Vec<String>,
    /// Percentile histograms (`QuantileHistogram` partials): (group key, partial index) ->
    /// exact bin counts summed over sites. The partial's own entry in `groups` is the
    /// number of binned values.
    pub histograms: BTreeMap<(Vec<PublicValue>, usize), Vec<i128>>,
}

impl MergedPartials {
    /// Exact partials of one group (zeros if no site had rows in it).
    pub fn get(&self, key: &[PublicValue], n_partials: usize) -> Vec<i128> {
        self.groups
            .get(key)
            .cloned()
            .unwrap_or_else(|| vec![0; n_partials])
    }

    /// Exact bins of histogram partial `partial` in one group (zeros if no site had values).
    pub fn histogram(&self, key: &[PublicValue], partial: usize, bins: usize) -> Vec<i128> {
        self.histograms
            .get(&(key.to_vec(), partial))
            .cloned()
            .unwrap_or_else(|| vec![0; bins])
    }
}

/// A site that did not answer, and whether it proved it failed before reading data.
#[derive(Debug)]
pub struct SiteFailure {
    /// The site.
    pub site: String,
    /// [`FailureStage::BeforeData`] only when the node's status said so explicitly; any
    /// transport error, time-out or malformed answer is [`FailureStage::AfterData`].
    pub stage: FailureStage,
    /// What the researcher is told if this failure decides the query's outcome.
    pub error: CoordinatorError,
}

/// Why a gather produced no partials: the failure that decides the outcome (one after
/// data if any site failed after data, so the query stays charged).
#[derive(Debug)]
pub struct GatherFailure {
    /// The deciding site's failure.
    pub failure: SiteFailure,
}

/// Which sites a query goes to: those reachable before the request is sent. Reachability
/// is decided before any node sees the request, so it depends on no data.
#[derive(Debug, Default)]
pub struct Dispatch {
    /// Indexes (config order) of the sites that answered the probe.
    pub reachable: Vec<usize>,
    /// Sites that did not, with the error to report.
    pub unreachable: Vec<(String, CoordinatorError)>,
}

/// Lazily connected clients for every node; a node that restarts is reconnected
/// automatically on the next query.
#[derive(Clone)]
pub struct NodePool {
    nodes: Vec<(NodeEndpoint, Channel)>,
    timeout: Duration,
    allow_partial: bool,
}

impl NodePool {
    /// Build the pool (no connection is made until the first query). With mTLS, each
    /// node's certificate must chain to the CA and carry the node's `tls_name` (its site by
    /// default), so a node cannot answer in another site's name.
    pub fn new(
        nodes: &[NodeEndpoint],
        timeout: Duration,
        transport: &NodeTransport,
    ) -> Result<NodePool, CoordinatorError> {
        let mut out = Vec::new();
        if let NodeTransport::InsecureDev = transport {
            tracing::warn!("{}", fedq_common::tls::INSECURE_DEV_WARNING);
        }
        for n in nodes {
            let mut ep = Endpoint::from_shared(n.endpoint.clone())
                .map_err(|e| {
                    CoordinatorError::Config(format!(
                        "node {}: invalid endpoint {:?}: {e}",
                        n.site, n.endpoint
                    ))
                })?
                // No per-request deadline here: `gather_from` times the whole answer out
                // itself (a typed `NodeTimedOut`), and the probe and info calls theirs.
                .connect_timeout(Duration::from_secs(5));
            if let NodeTransport::Tls(pem) = transport {
                // rustls uses the process-wide provider; make sure it is ring.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&pem.ca))
                    .identity(Identity::from_pem(&pem.cert, &pem.key))
                    .domain_name(n.tls_name().to_string());
                ep = ep.tls_config(tls).map_err(|e| {
                    CoordinatorError::Config(format!(
                        "node {}: TLS setup failed: {e}; check [tls] cert and key ({})",
                        n.site,
                        pem.cert_path.display()
                    ))
                })?;
            }
            out.push((n.clone(), ep.connect_lazy()));
        }
        Ok(NodePool {
            nodes: out,
            timeout,
            allow_partial: false,
        })
    }

    /// With `true`, a query is answered from the sites that responded (at least one);
    /// otherwise (the default) any failing or slow site fails the whole query.
    pub fn allow_partial(mut self, on: bool) -> NodePool {
        self.allow_partial = on;
        self
    }

    /// Site names, in config order.
    pub fn sites(&self) -> Vec<String> {
        self.nodes.iter().map(|(n, _)| n.site.clone()).collect()
    }

    /// Whether partial answers are allowed (`allow_partial`).
    pub fn allows_partial(&self) -> bool {
        self.allow_partial
    }

    /// Probe every site before a request is sent: a site is reachable if it answers the
    /// node-info action within the probe time-out and speaks this protocol version. Only
    /// this may decide, with `allow_partial`, which sites a query goes to: it happens before
    /// any node has the request, so it depends on no data.
    pub async fn probe(&self) -> Dispatch {
        let limit = self.timeout.min(Duration::from_secs(5));
        let futs = self.nodes.iter().map(|(node, ch)| async move {
            let info = tokio::time::timeout(limit, node_info(ch.clone()))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "it did not answer within {} s before the query was sent",
                        limit.as_secs()
                    ))
                });
            let site = node.site.clone();
            match info {
                Ok(i) if i.protocol_version == fedq_common::PROTOCOL_VERSION => Ok(()),
                Ok(i) => Err(CoordinatorError::NodeIncompatible {
                    site,
                    detail: format!(
                        "protocol version mismatch: the site speaks v{}, this coordinator v{}",
                        i.protocol_version,
                        fedq_common::PROTOCOL_VERSION
                    ),
                }),
                Err(reason) => {
                    tracing::warn!(site = %site, reason = %fedq_common::escape_log(&reason), "site unreachable before dispatch");
                    Err(CoordinatorError::NodeUnavailable { site, reason })
                }
            }
        });
        let mut d = Dispatch::default();
        for (i, r) in futures::future::join_all(futs)
            .await
            .into_iter()
            .enumerate()
        {
            match r {
                Ok(()) => d.reachable.push(i),
                Err(e) => d.unreachable.push((self.nodes[i].0.site.clone(), e)),
            }
        }
        d
    }

    /// Probe, then ask every reachable site (all of them unless `allow_partial`) and merge.
    /// For tests and benchmarks, which want the exact partials of all sites.
    pub async fn gather(
        &self,
        req: &PartialAggregateRequest,
        groups: &[GroupKey],
    ) -> Result<MergedPartials, CoordinatorError> {
        let d = self.probe().await;
        if let Some((_, e)) = d.unreachable.into_iter().next() {
            if !self.allow_partial || d.reachable.is_empty() {
                return Err(e);
            }
        }
        self.gather_from(&d.reachable, req, groups)
            .await
            .map_err(|f| f.failure.error)
    }

    /// Ask the sites `sites` (indexes in config order), in parallel, and merge their
    /// partials exactly.
    ///
    /// Which sites answer must not depend on data, so only a failure the node proved
    /// happened before it read anything ([`FailureStage::BeforeData`]: a refusal on the
    /// request, its policy or its load) may leave a site out, and only with
    /// `allow_partial`. Any failure after data (or unproven) fails the query, with or
    /// without `allow_partial`, and is reported as such so that the caller keeps the
    /// charge. Sensitivities need no change for a partial answer: each site's contribution
    /// bound holds whichever sites answer.
    pub async fn gather_from(
        &self,
        sites: &[usize],
        req: &PartialAggregateRequest,
        groups: &[GroupKey],
    ) -> Result<MergedPartials, GatherFailure> {
        let ticket = req.encode_ticket().map_err(|e| GatherFailure {
            failure: SiteFailure {
                site: "coordinator".into(),
                stage: FailureStage::BeforeData,
                error: CoordinatorError::internal(&req.query_id, e.to_string()),
            },
        })?;
        let futs = sites
            .iter()
            .filter_map(|i| self.nodes.get(*i))
            .map(|(node, ch)| {
                let ticket = ticket.clone();
                async move {
                    let res = tokio::time::timeout(
                        self.timeout,
                        fetch(ch.clone(), ticket, &req.query_id, &node.site),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        // The node may have read data: unproven, so after data.
                        Err(SiteFailure {
                            site: node.site.clone(),
                            stage: FailureStage::AfterData,
                            error: CoordinatorError::NodeTimedOut {
                                site: node.site.clone(),
                                limit: format!(
                                    "no answer within {} s, the coordinator's node_timeout_secs",
                                    self.timeout.as_secs()
                                ),
                            },
                        })
                    });
                    (node.site.clone(), res)
                }
            });
        let results = futures::future::join_all(futs).await;
        let mut merged = MergedPartials {
            truncated_units: Some(0),
            ..Default::default()
        };
        let mut before_data: Vec<SiteFailure> = Vec::new();
        let mut after_data: Option<SiteFailure> = None;
        for (site, res) in results {
            // Merge each site on its own first, so a malformed answer leaves no trace.
            let site_merged = res.and_then(|batches| {
                merge_site(&batches, req, groups).map_err(|error| SiteFailure {
                    site: site.clone(),
                    stage: FailureStage::AfterData,
                    error,
                })
            });
            match site_merged {
                Ok(local) => {
                    add_site(&mut merged, local, &req.query_id).map_err(|error| GatherFailure {
                        failure: SiteFailure {
                            site: site.clone(),
                            stage: FailureStage::AfterData,
                            error,
                        },
                    })?;
                    merged.sites_answered.push(site);
                }
                Err(f) => {
                    tracing::warn!(query_id = %req.query_id, site = %f.site, stage = f.stage.as_str(), error = %fedq_common::escape_log(&f.error.to_string()), "site failed");
                    match f.stage {
                        FailureStage::AfterData => {
                            after_data.get_or_insert(f);
                        }
                        FailureStage::BeforeData => before_data.push(f),
                    }
                }
            }
        }
        if let Some(failure) = after_data {
            return Err(GatherFailure { failure });
        }
        if !before_data.is_empty() && (!self.allow_partial || merged.sites_answered.is_empty()) {
            let failure = before_data.remove(0);
            return Err(GatherFailure { failure });
        }
        merged
            .sites_failed
            .extend(before_data.into_iter().map(|f| f.site));
        if merged.sites_answered.is_empty() {
            return Err(GatherFailure {
                failure: SiteFailure {
                    site: "all".into(),
                    stage: FailureStage::BeforeData,
                    error: CoordinatorError::NodeUnavailable {
                        site: "all".into(),
                        reason: "no site was asked".into(),
                    },
                },
            });
        }
        Ok(merged)
    }

    /// Ask every node for its [`NodeInfo`]; `Err` holds the reason a node is unhealthy.
    pub async fn info(&self) -> Vec<(String, Result<NodeInfo, String>)> {
        let futs = self.nodes.iter().map(|(node, ch)| async move {
            let r = tokio::time::timeout(Duration::from_secs(5), node_info(ch.clone()))
                .await
                .unwrap_or_else(|_| Err("no answer within 5 s".into()));
            (node.site.clone(), r)
        });
        futures::future::join_all(futs).await
    }
}

/// The TLS error behind a failed call, if TLS is why it failed (a certificate refused by
/// either side): rustls's own error, found in the error's source chain.
fn tls_failure(s: &tonic::Status) -> Option<String> {
    let mut e: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(x) = e {
        if let Some(r) = x.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(r) = x
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r.to_string());
        }
        e = x.source();
    }
    None
}

/// Why a site did not answer the reachability probe, in words for the researcher: a
/// refusal by TLS or by the site's allow-list says so (both depend only on configuration).
fn probe_failure(s: &tonic::Status) -> String {
    if let Some(tls) = tls_failure(s) {
        return format!(
            "TLS refused the connection: {tls}; the site's and the coordinator's certificates must come from the federation CA, the site's must name the site (`tls_name`), and the site must allow the coordinator's name"
        );
    }
    if s.code() == tonic::Code::PermissionDenied {
        return format!(
            "it refuses this coordinator: {}",
            s.message().chars().take(300).collect::<String>()
        );
    }
    "it did not answer before the query was sent".into()
}

/// One node's [`NodeInfo`] (Flight action [`fedq_common::wire::ACTION_NODE_INFO`]).
async fn node_info(ch: Channel) -> Result<NodeInfo, String> {
    let mut client = FlightServiceClient::new(ch);
    let action = Action::new(fedq_common::wire::ACTION_NODE_INFO, "");
    let mut stream = client
        .do_action(action)
        .await
        .map_err(|s| probe_failure(&s))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| probe_failure(&s))?
        .ok_or_else(|| "empty answer".to_string())?;
    serde_json::from_slice::<NodeInfo>(&first.body).map_err(|e| e.to_string())
}

/// One site's answer merged on its own, with its bounding report.
fn merge_site(
    batches: &[RecordBatch],
    req: &PartialAggregateRequest,
    groups: &[GroupKey],
) -> Result<MergedPartials, CoordinatorError> {
    let mut local = MergedPartials::default();
    for b in batches {
        merge_batch(&mut local, b, req, groups).map_err(|detail| {
            tracing::error!(query_id = %req.query_id, %detail, "malformed node answer");
            CoordinatorError::internal(&req.query_id, "a site sent a malformed answer")
        })?;
    }
    // The site's bounding report (participants with more than R rows).
    local.truncated_units = batches
        .first()
        .and_then(|b| b.schema().metadata().get(META_TRUNCATED_UNITS).cloned())
        .and_then(|v| v.parse::<i128>().ok())
        .filter(|v| *v >= 0);
    if local.truncated_units.is_none() {
        tracing::warn!(query_id = %req.query_id, "node sent no bounding report");
    }
    Ok(local)
}

/// Add one site's partials to the merged ones, exactly.
fn add_site(
    merged: &mut MergedPartials,
    local: MergedPartials,
    query_id: &str,
) -> Result<(), CoordinatorError> {
    merged.truncated_units = match (merged.truncated_units, local.truncated_units) {
        (Some(a), Some(b)) => a.checked_add(b),
        _ => None,
    };
    for (key, values) in local.groups {
        let entry = merged
            .groups
            .entry(key)
            .or_insert_with(|| vec![0; values.len()]);
        for (acc, v) in entry.iter_mut().zip(values) {
            *acc = acc.checked_add(v).ok_or_else(|| {
                CoordinatorError::internal(query_id, "partial sum overflows i128")
            })?;
        }
    }
    for (key, bins) in local.histograms {
        let entry = merged
            .histograms
            .entry(key)
            .or_insert_with(|| vec![0; bins.len()]);
        for (acc, v) in entry.iter_mut().zip(bins) {
            *acc = acc.checked_add(v).ok_or_else(|| {
                CoordinatorError::internal(query_id, "histogram count overflows i128")
            })?;
        }
    }
    Ok(())
}

/// What a node's error status means for the query (logged here with the node's message).
/// Only a status that says it was refused before data ([`FAILURE_STAGE_METADATA`]) keeps
/// its code's meaning and message; anything else is a failure after data.
fn node_status_error(s: tonic::Status, query_id: &str, site: &str) -> SiteFailure {
    let stage = FailureStage::from_metadata(
        s.metadata()
            .get(FAILURE_STAGE_METADATA)
            .and_then(|v| v.to_str().ok()),
    );
    tracing::warn!(query_id, site, code = ?s.code(), stage = stage.as_str(), message = %s.message(), "node error");
    let error = match stage {
        // The site stopped the query at its own `query_timeout_secs`.
        FailureStage::AfterData if s.code() == tonic::Code::DeadlineExceeded => {
            CoordinatorError::NodeTimedOut {
                site: site.to_string(),
                limit: "stopped at the site's query_timeout_secs".into(),
            }
        }
        FailureStage::AfterData => CoordinatorError::NodeFailed {
            site: site.to_string(),
            query_id: query_id.to_string(),
        },
        FailureStage::BeforeData => refusal_error(&s, query_id, site),
    };
    SiteFailure {
        site: site.to_string(),
        stage,
        error,
    }
}

/// The error of a node's refusal before data. Its text depends only on the request, the
/// node's policy and its limits, so it is passed on (shortened) to say what to change.
fn refusal_error(s: &tonic::Status, query_id: &str, site: &str) -> CoordinatorError {
    if s.code() == tonic::Code::InvalidArgument && s.message().contains("protocol version mismatch")
    {
        // The node's message names only the two protocol versions.
        return CoordinatorError::NodeIncompatible {
            site: site.to_string(),
            detail: s.message().to_string(),
        };
    }
    let detail = || s.message().chars().take(400).collect::<String>();
    match s.code() {
        tonic::Code::PermissionDenied => CoordinatorError::NodeRefused {
            site: site.to_string(),
            detail: detail(),
        },
        tonic::Code::ResourceExhausted => CoordinatorError::NodeOverLimit {
            site: site.to_string(),
            detail: detail(),
        },
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            CoordinatorError::NodeUnavailable {
                site: site.to_string(),
                reason: "connection failed".into(),
            }
        }
        _ => CoordinatorError::NodeFailed {
            site: site.to_string(),
            query_id: query_id.to_string(),
        },
    }
}

async fn fetch(
    ch: Channel,
    ticket: Vec<u8>,
    query_id: &str,
    site: &str,
) -> Result<Vec<RecordBatch>, SiteFailure> {
    let mut client = FlightServiceClient::new(ch).max_decoding_message_size(MAX_NODE_RESPONSE);
    let status_err = |s: tonic::Status| node_status_error(s, query_id, site);
    let resp = client
        .do_get(Ticket::new(ticket))
        .await
        .map_err(status_err)?;
    let stream = FlightRecordBatchStream::new_from_flight_data(
        resp.into_inner()
            .map_err(|s| FlightError::Tonic(Box::new(s))),
    );
    stream.try_collect().await.map_err(|e| match e {
        FlightError::Tonic(s) => status_err(*s),
        other => {
            tracing::warn!(query_id, site, error = %fedq_common::escape_log(&other.to_string()), "undecodable node answer");
            SiteFailure {
                site: site.to_string(),
                stage: FailureStage::AfterData,
                error: CoordinatorError::NodeFailed {
                    site: site.to_string(),
                    query_id: query_id.to_string(),
                },
            }
        }
    })
}

fn key_value(col: &dyn Array, row: usize) -> Result<Option<PublicValue>, String> {
    if col.is_null(row) {
        return Ok(None);
    }
    Ok(Some(match col.data_type() {
        DataType::Utf8 => PublicValue::Text(col.as_string::<i32>().value(row).to_string()),
        DataType::Utf8View => PublicValue::Text(col.as_string_view().value(row).to_string()),
        DataType::Int32 => PublicValue::Int(
            col.as_any()
                .downcast_ref::<Int32Array>()
                .ok_or("bad int32")?
                .value(row)
                .into(),
        ),
        DataType::Int64 => PublicValue::Int(
            col.as_any()
                .downcast_ref::<Int64Array>()
                .ok_or("bad int64")?
                .value(row),
        ),
        DataType::Boolean => PublicValue::Bool(
            col.as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or("bad bool")?
                .value(row),
        ),
        other => return Err(format!("unsupported key type {other}")),
    }))
}

fn merge_batch(
    merged: &mut MergedPartials,
    b: &RecordBatch,
    req: &PartialAggregateRequest,
    groups: &[GroupKey],
) -> Result<(), String> {
    let nk = groups.len();
    let na = req.aggregates.len();
    if b.num_columns() != nk + na {
        return Err(format!(
            "expected {} columns, got {}",
            nk + na,
            b.num_columns()
        ));
    }
    for row in 0..b.num_rows() {
        let mut key = Vec::with_capacity(nk);
        let mut in_domain = true;
        for (k, g) in groups.iter().enumerate() {
            match key_value(b.column(k).as_ref(), row)? {
                // Open keys (partition selection) take any observed value: nothing is
                // released for a group unless it passes the threshold.
                Some(v) if !g.public || g.domain.contains(&v) => key.push(v),
                _ => in_domain = false,
            }
        }
        if !in_domain {
            // Nodes drop such rows themselves; never release a key outside the domain.
            continue;
        }
        for (i, a) in req.aggregates.iter().enumerate() {
            let col = b.column(nk + i);
            if col.is_null(row) {
                return Err(format!("NULL partial in column {}", nk + i));
            }
            let v: i128 = match a {
                AggregateRequest::QuantileHistogram {
                    lower,
                    upper,
                    precision,
                    candidates,
                    ..
                } => {
                    let grid = QuantileGrid::for_bounds(*lower, *upper, *precision, *candidates)
                        .map_err(|e| e.to_string())?;
                    let list = col
                        .as_list_opt::<i32>()
                        .ok_or("histogram partial is not a list")?
                        .value(row);
                    let bins = list
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .ok_or("histogram bins are not Int64")?;
                    if bins.len() != grid.bins() || bins.null_count() > 0 {
                        return Err(format!(
                            "histogram has {} bins, expected {}",
                            bins.len(),
                            grid.bins()
                        ));
                    }
                    let entry = merged
                        .histograms
                        .entry((key.clone(), i))
                        .or_insert_with(|| vec![0; grid.bins()]);
                    let mut total: i128 = 0;
                    for (acc, &c) in entry.iter_mut().zip(bins.values().iter()) {
                        if c < 0 {
                            return Err("negative histogram count".into());
                        }
                        *acc = acc
                            .checked_add(c.into())
                            .ok_or("histogram overflows i128")?;
                        total += i128::from(c);
                    }
                    total
                }
                AggregateRequest::CountRows
                | AggregateRequest::CountNonNull { .. }
                | AggregateRequest::CountUnits => col
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .ok_or("count partial is not Int64")?
                    .value(row)
                    .into(),
                AggregateRequest::SumFixed { .. } | AggregateRequest::SumSquaresFixed { .. } => col
                    .as_any()
                    .downcast_ref::<Decimal128Array>()
                    .ok_or("sum partial is not Decimal128")?
                    .value(row),
            };
            let entry = merged
                .groups
                .entry(key.clone())
                .or_insert_with(|| vec![0; na]);
            entry[i] = entry[i]
                .checked_add(v)
                .ok_or("partial sum overflows i128")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod status_tests {
    use super::*;

    /// What the researcher sees when a node answers with an error: a version mismatch
    /// names both versions (FAILED_PRECONDITION), a node-policy refusal says what the
    /// site does not share (PERMISSION_DENIED), a node limit names the limit
    /// (RESOURCE_EXHAUSTED), anything else is generic.
    #[test]
    fn node_errors_become_precise_statuses() {
        let before = |mut s: tonic::Status| {
            s.metadata_mut().insert(
                FAILURE_STAGE_METADATA,
                tonic::metadata::MetadataValue::from_static(FailureStage::BeforeData.as_str()),
            );
            s
        };
        let mismatch = fedq_common::WireError::Version {
            got: fedq_common::PROTOCOL_VERSION + 1,
        };
        let cases = [
            (
                before(tonic::Status::invalid_argument(mismatch.to_string())),
                tonic::Code::FailedPrecondition,
                format!(
                    "site site02 runs an incompatible fedq (protocol version mismatch: peer speaks v{}, this build speaks v{}",
                    fedq_common::PROTOCOL_VERSION + 1,
                    fedq_common::PROTOCOL_VERSION
                ),
            ),
            (
                before(tonic::Status::permission_denied("column `x` of table `labs` (in COUNT) is not shared by this node")),
                tonic::Code::PermissionDenied,
                "site site02 refused the query under its own policy: column `x` of table `labs` (in COUNT) is not shared by this node; no budget was charged".to_string(),
            ),
            (
                before(tonic::Status::resource_exhausted("node site02 is busy: 4 queries are running, its limit; retry shortly")),
                tonic::Code::ResourceExhausted,
                "site site02 stopped the query at its resource limits: node site02 is busy".to_string(),
            ),
        ];
        for (status, code, needle) in cases {
            let f = node_status_error(status, "q", "site02");
            assert_eq!(f.stage, FailureStage::BeforeData);
            let e = tonic::Status::from(f.error);
            assert_eq!(e.code(), code, "{}", e.message());
            assert!(
                e.message().contains(&needle),
                "{:?} lacks {needle:?}",
                e.message()
            );
        }
    }

    #[test]
    fn a_node_status_without_a_before_data_claim_is_a_failure_after_data() {
        // Whatever its code and text: a transport error, a time-out, an old node, or a
        // node's own failure. Its message is never passed on.
        for status in [
            tonic::Status::internal("node site02 could not execute query q"),
            tonic::Status::unavailable("tcp connect error"),
            tonic::Status::permission_denied("looks like a refusal, but claims no stage"),
            tonic::Status::resource_exhausted("memory limit"),
        ] {
            let f = node_status_error(status, "q", "site02");
            assert_eq!(f.stage, FailureStage::AfterData);
            assert!(matches!(f.error, CoordinatorError::NodeFailed { .. }));
        }
    }
}
