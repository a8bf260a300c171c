//! # fedq (command line and in-process federation)
//!
//! The `fedq` binary is thin: each subcommand parses its arguments into a validated config
//! and calls a library. This crate holds the pieces the binary, the demo, the benchmark and
//! the end-to-end tests share:
//!
//! - [`federation`]: start a whole federation (nodes + coordinator) in-process on loopback,
//!   on free ports, from a directory written by `fedq synth`.
//! - [`client`]: a small Arrow Flight SQL client with bearer-token auth, that keeps gRPC
//!   status codes intact.
//! - [`render`]: aligned text tables with `±` error columns from fedq's Arrow metadata.
//! - [`exact`]: the exact, non-private answer over the union of the site files, for the demo
//!   (clearly labelled), tests and the benchmark. It reads the files directly; it is never a
//!   path through the coordinator.
//! - [`admin`]: `fedq budget`, `fedq policy` and `fedq audit` (budgets through the
//!   coordinator's Flight actions; audit verification and export straight from the ledger).
//! - [`demo`] and [`bench`]: the `fedq demo` and `fedq bench` commands.

pub mod accuracy;
pub mod admin;
pub mod bench;
pub mod client;
pub mod demo;
pub mod exact;
pub mod federation;
pub mod render;

/// Errors of the command line tools.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A user-fixable problem, already phrased for the user.
    #[error("{0}")]
    User(String),
    /// An error returned by the server, with its gRPC status code.
    #[error("{message}")]
    Server { code: tonic::Code, message: String },
    #[error(transparent)]
    Node(#[from] fedq_node::NodeError),
    #[error(transparent)]
    Coordinator(#[from] fedq_coordinator::CoordinatorError),
    #[error(transparent)]
    Synth(#[from] fedq_synth::SynthError),
    #[error("data error: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("arrow error: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Server {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}
