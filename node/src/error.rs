//! Node errors and their one mapping to gRPC statuses.

use fedq_common::outcome::{FailureStage, FAILURE_STAGE_METADATA};
use fedq_common::{CatalogError, WireError};
use tonic::metadata::MetadataValue;
use tonic::Status;

/// Everything that can go wrong in a node.
///
/// Start-up errors ([`NodeError::ConfigRead`] … [`NodeError::Server`]) are for the operator and
/// name the file and the fix. Request errors split in two:
///
/// - refusals ([`NodeError::InvalidRequest`], [`NodeError::Refused`], [`NodeError::Wire`])
///   depend only on the request and the catalog, so their message is sent to the peer;
/// - failures while running a query ([`NodeError::Execution`], [`NodeError::Internal`]) may
///   depend on the data, so the peer only learns that the query failed; the details stay in
///   the node log.
///
/// Every error also says *when* it happened ([`NodeError::stage`]): refused before any row
/// was read (the coordinator may refund the query), or not (it stays charged: whether it
/// happened may depend on a participant).
///
/// The conversion to [`tonic::Status`] (`impl From<NodeError> for Status`) is the only place
/// where node errors are turned into what a peer sees, and it attaches the stage to every
/// status as metadata [`FAILURE_STAGE_METADATA`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node config file could not be read.
    #[error("cannot read node config {path}: {source}; check the path")]
    ConfigRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The node config is invalid.
    #[error("node config {origin}: {message}")]
    Config { origin: String, message: String },
    /// The catalog named by the node config could not be loaded or is invalid.
    #[error("node config {origin}: {source}")]
    Catalog {
        origin: String,
        #[source]
        source: CatalogError,
    },
    /// A configured data file or directory does not exist.
    #[error(
        "table `{table}`: data path {path} does not exist; fix `path` in [tables.{table}] of the node config"
    )]
    MissingFile { table: String, path: String },
    /// A data file could not be opened or its schema could not be read.
    #[error("table `{table}`: cannot read data file {path}: {message}")]
    DataFile {
        table: String,
        path: String,
        message: String,
    },
    /// A local file does not match the catalog schema. The message names the file, the
    /// column, the expected and the found type.
    #[error("{0}")]
    SchemaMismatch(String),
    /// The request is malformed or exceeds a limit (sent to the peer as `INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidRequest(String),
    /// The request is not allowed by this node's catalog (sent as `PERMISSION_DENIED`).
    #[error("{0}")]
    Refused(String),
    /// The ticket could not be decoded (sent as `INVALID_ARGUMENT`).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Running a validated query failed. Logged in full; the peer gets a generic message.
    #[error("node {site}: query {query_id:?} failed: {source}")]
    Execution {
        site: String,
        query_id: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
    /// Another failure while answering a query (sampling, encoding). Logged in full; the peer
    /// gets a generic message.
    #[error("node {site}: query {query_id:?} failed: {message}")]
    Internal {
        site: String,
        query_id: String,
        message: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; change `listen` in the node config or stop the process using it")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The caller is not a coordinator this node answers (sent as `PERMISSION_DENIED`).
    #[error("{0}")]
    NotAllowed(String),
    /// The node is running as many queries as it may (sent as `RESOURCE_EXHAUSTED`).
    #[error("node {site} is busy: {running} queries are running, its limit; retry shortly")]
    Busy { site: String, running: usize },
    /// A query ran past the node's `query_timeout_secs` and was stopped.
    #[error("node {site}: query {query_id} ran longer than {secs} s and was stopped")]
    TimedOut {
        site: String,
        query_id: String,
        secs: u64,
    },
    /// The TLS certificate or key could not be used.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The gRPC server failed.
    #[error("node server failed: {0}")]
    Server(String),
}

impl NodeError {
    /// Whether the error is a refusal that depends only on the request and the catalog.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            NodeError::InvalidRequest(_) | NodeError::Refused(_) | NodeError::Wire(_)
        )
    }

    /// When the error happened relative to reading data, as the coordinator's refund rule
    /// needs it (see [`fedq_common::outcome`]).
    ///
    /// [`FailureStage::BeforeData`] only for errors that depend on nothing but the request,
    /// the catalog, the node's policy and configuration and its load, and that the node
    /// raises before its first row is read: a ticket that does not decode, a request
    /// validation refuses, a caller not on the allow-list, no free query slot. Everything
    /// else — a failure while or after reading, a timeout, anything the node cannot prove
    /// happened before reading — is [`FailureStage::AfterData`], so only an explicit claim
    /// can be refunded. (`NodeService::answer` validates before it takes a slot or reads,
    /// and `NodeEngine::execute` turns a refusal raised after reading into
    /// [`NodeError::Internal`], so a `BeforeData` error never follows a read.)
    pub fn stage(&self) -> FailureStage {
        match self {
            NodeError::InvalidRequest(_)
            | NodeError::Refused(_)
            | NodeError::Wire(_)
            | NodeError::NotAllowed(_)
            | NodeError::Busy { .. } => FailureStage::BeforeData,
            NodeError::Execution { .. }
            | NodeError::Internal { .. }
            | NodeError::TimedOut { .. }
            | NodeError::ConfigRead { .. }
            | NodeError::Config { .. }
            | NodeError::Catalog { .. }
            | NodeError::MissingFile { .. }
            | NodeError::DataFile { .. }
            | NodeError::SchemaMismatch(_)
            | NodeError::Bind { .. }
            | NodeError::Tls(_)
            | NodeError::Server(_) => FailureStage::AfterData,
        }
    }
}

/// The single place where node errors become what a peer sees.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let stage = e.stage();
        let mut status = match e {
            NodeError::InvalidRequest(m) => Status::invalid_argument(m),
            NodeError::Wire(w) => Status::invalid_argument(w.to_string()),
            NodeError::Refused(m) | NodeError::NotAllowed(m) => Status::permission_denied(m),
            e @ NodeError::Busy { .. } => Status::resource_exhausted(e.to_string()),
            // Whether a query is slow can depend on the data: only the limit is reported.
            e @ NodeError::TimedOut { .. } => Status::deadline_exceeded(e.to_string()),
            NodeError::Execution { site, query_id, .. }
            | NodeError::Internal { site, query_id, .. } => Status::internal(format!(
                "node {site} could not execute query {query_id}; details are in the node log"
            )),
            NodeError::ConfigRead { .. }
            | NodeError::Config { .. }
            | NodeError::Catalog { .. }
            | NodeError::MissingFile { .. }
            | NodeError::DataFile { .. }
            | NodeError::SchemaMismatch(_)
            | NodeError::Bind { .. }
            | NodeError::Tls(_)
            | NodeError::Server(_) => Status::internal(
                "the node could not serve this request; details are in the node log",
            ),
        };
        status.metadata_mut().insert(
            FAILURE_STAGE_METADATA,
            MetadataValue::from_static(stage.as_str()),
        );
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage_of(status: &Status) -> Option<&str> {
        status
            .metadata()
            .get(FAILURE_STAGE_METADATA)
            .and_then(|v| v.to_str().ok())
    }

    #[test]
    fn every_status_says_whether_the_node_had_read_data() {
        let site = || "s".to_string();
        let q = || "q".to_string();
        let before = [
            NodeError::InvalidRequest("bad".into()),
            NodeError::Refused("no".into()),
            NodeError::Wire(WireError::Malformed("x".into())),
            NodeError::NotAllowed("who".into()),
            NodeError::Busy {
                site: site(),
                running: 1,
            },
        ];
        let after = [
            NodeError::Internal {
                site: site(),
                query_id: q(),
                message: "m".into(),
            },
            NodeError::Execution {
                site: site(),
                query_id: q(),
                source: datafusion::error::DataFusionError::Execution("e".into()),
            },
            NodeError::TimedOut {
                site: site(),
                query_id: q(),
                secs: 1,
            },
            NodeError::SchemaMismatch("m".into()),
            NodeError::Server("down".into()),
        ];
        for e in before {
            assert_eq!(e.stage(), FailureStage::BeforeData, "{e:?}");
            assert_eq!(stage_of(&Status::from(e)), Some("before-data"));
        }
        for e in after {
            assert_eq!(e.stage(), FailureStage::AfterData, "{e:?}");
            assert_eq!(stage_of(&Status::from(e)), Some("after-data"));
        }
    }
}
