//! # fedq-node
//!
//! A fedq node runs beside one hospital's data. It answers one kind of request: a typed
//! partial aggregate ([`fedq_common::PartialAggregateRequest`]) sent by the coordinator as
//! an Arrow Flight `DoGet` ticket. Only aggregates leave the node.
//!
//! ## Rules the node keeps, whoever sends the request
//!
//! 1. **Typed requests only.** The node decodes the ticket itself
//!    ([`fedq_common::PartialAggregateRequest::decode_ticket`]) and validates it against its own copy of
//!    the catalog before reading any data. It never runs SQL text from the wire and never
//!    returns rows.
//! 2. **Contribution bounding at the node.** After the filter, each participant (the
//!    table's privacy-unit column) keeps at most `max_rows_per_unit` rows (R, at most the
//!    catalog's value), chosen uniformly at random by reservoir sampling per participant.
//!    The randomness comes from OpenDP (`fill_bytes`, OpenSSL-backed, buffered; uniform draws by
//!    the same rejection rule as OpenDP's `sample_uniform_uint_below`); there is
//!    no other RNG and no seed. Rows whose group key is NULL or outside the key's public
//!    domain, or whose participant is NULL, are dropped before bounding.
//! 3. **Clamped, exact fixed-point sums.** For `SumFixed { lower, upper, precision }`:
//!    `lo = ceil(lower / precision)`, `hi = floor(upper / precision)` and each value
//!    contributes `clamp(round(v / precision), lo, hi)` as an `i128` (NULL and NaN are
//!    skipped, ±∞ clamp; NaN counts as NULL for `CountNonNull` too, so a centred sum never
//!    sees a counted row without a value). Sums are exact `i128` sums, sent as `Decimal128(38, 0)`.
//!    `SumSquaresFixed` (for VAR/STDDEV) is validated the same way (with a tighter step
//!    limit) and sums `(v - mid)²` with `mid = floor((lo + hi) / 2)`, exactly.
//! 4. **Errors do not leak data.** Validation refusals depend only on the request and the
//!    catalog and say why (`INVALID_ARGUMENT` for malformed requests and limits,
//!    `PERMISSION_DENIED` for what the catalog does not allow). Failures while running a
//!    query may depend on the data: they are logged in full at the node and the peer only
//!    gets "node SITE could not execute query ID; details are in the node log". The
//!    mapping happens in one place, `impl From<NodeError> for tonic::Status`.
//! 5. **Nothing more than needed is materialised.** Filtered rows are streamed from
//!    DataFusion, projected to the participant, the group keys and the aggregate inputs;
//!    the node keeps only the per-participant reservoirs (≤ R rows of those columns) and
//!    the per-group accumulators.
//!
//! 6. **Joins only on the privacy unit, bounded after the join.** A request may name a
//!    second served catalog table (`join`). The node checks that it is not the same table
//!    and that the join is `left.privacy_unit = right.privacy_unit`, then runs the whole
//!    inner equi-join in DataFusion, filters (the filter may read both sides), projects
//!    `[left pid, keys…, inputs…]`, and bounds each participant to R of its *joined* rows,
//!    with R at most the driving (left) table's `max_rows_per_unit`. A participant with
//!    `a` rows on the left and `b` on the right has up to `a·b` joined rows, so the left
//!    table's start-up rows-per-participant counts say nothing about them: joined
//!    requests use no counts and every participant goes through a reservoir. The hash
//!    join materialises its build side (the projected columns of one table).
//!
//! 7. **Groups without a public domain are bounded to G per participant.** A request with
//!    `max_groups_per_unit` (G, at most the driving table's catalog G; refused when the
//!    catalog declares none) may group by columns without `public_values`. Rows with a
//!    NULL key are dropped, then each participant keeps its rows in at most G groups (the
//!    G in which it has the most rows, ties by the smallest key: a rule that reads only
//!    that participant's rows), then at most R rows. The response lists only the groups
//!    observed after that. It is the one data-dependent key output of a node, and goes only
//!    to the coordinator, which releases a group only through DP partition selection
//!    (`selection.rs`).
//!
//! Filters are total by construction: the node type-checks them so
//! that no implicit cast can fail on a row; conversions must be `TRY_CAST`, division only by
//! a numeric literal other than 0 and -1, `LIKE` only on text.
//!
//! ## Response
//!
//! One record batch: the GROUP BY columns (named as requested, `right.` before a joined
//! table's column, catalog Arrow types,
//! nullable), then one column per requested aggregate, in order, named `agg_0`, `agg_1`, …:
//! `Int64` for `CountRows` and `CountNonNull`, `Decimal128(38, 0)` (fixed-point units) for
//! `SumFixed`. Only groups with at least one bounded row are returned, in public-domain
//! order; without GROUP BY there is exactly one row (zeros when nothing matched).
//!
//! ## Configuration
//!
//! ```toml
//! site = "site01"
//! listen = "127.0.0.1:31101"        # optional, default 127.0.0.1:31051
//! catalog = "../../catalog.toml"    # relative to this file
//! max_query_memory_mb = 512         # optional: the worst query must fit (checked at start-up)
//!
//! [tables.participants]
//! path = "participants.parquet"     # relative to this file; a file or a directory
//! format = "parquet"                # optional: parquet | csv (inferred from the extension)
//! # The node's own policy (optional; it can only narrow the catalog):
//! columns = ["sex", "birth_year"]   # columns shared (the privacy unit is always used)
//! max_rows_per_unit = 1             # largest R accepted
//! [tables.participants.clamp]
//! birth_year = { lower = 1900, upper = 2030 }   # widest clamp accepted for a sum
//! ```
//!
//! A request outside the node's policy is refused (`PERMISSION_DENIED`) and logged with
//! the coordinator's certificate name, the query id and the reason. No query is stopped on
//! memory: how much a query needs depends on its data, so stopping it at a limit would be
//! a bit one participant can flip. Instead the node refuses to start unless the worst query
//! over its tables fits `max_query_memory_mb` (the two largest tables joined, times a
//! documented factor, plus the largest accumulators a request can ask for; the tables'
//! sizes are estimated from the Parquet footers or the CSV file sizes), and a table that
//! grows past it while the node runs is refused before reading, with a message naming only
//! the table, the site and the limit.
//!
//! Every error status carries metadata `fedq-failure-stage`: `before-data` for a refusal
//! raised before any row was read (an undecodable or invalid request, the node's policy, a
//! caller not allowed, no free slot), which the coordinator may refund, and `after-data`
//! for everything else.
//!
//! At start-up every configured file is checked against the catalog: each catalog column
//! must exist with exactly the catalog type (Parquet: the file's Arrow schema; CSV: the
//! header names, and every value is read once with the catalog types so that a value that
//! does not parse is a start-up error rather than a data-dependent query failure). Extra
//! file columns are allowed but are not registered, so they can never be queried. Catalog
//! tables not configured here are not served.
//!
//! ## Flight surface
//!
//! - `DoGet(ticket)`: decode, validate, execute, stream the response batch.
//! - `DoAction("fedq.node.info")`: one result whose body is the JSON
//!   [`fedq_common::NodeInfo`]; `ListActions` lists it.
//! - Everything else: `UNIMPLEMENTED`.

mod bounding;
mod computed;
mod config;
mod derived;
mod engine;
mod error;
mod filter;
mod metrics;
mod plan_cache;
mod selection;
mod server;
mod sets;
mod tls_listener;

#[cfg(test)]
mod tests;

pub use bounding::SUM_PRECISION;
pub use config::NodeTransport;
pub use config::{
    NodeConfig, NodeLimits, TableFormat, TablePolicy, TableSource, DEFAULT_LISTEN,
    DEFAULT_MAX_QUERY_MEMORY_MB,
};
pub use engine::{NodeEngine, MAX_QUERY_ID_CHARS};
pub use error::NodeError;
pub use metrics::NodeMetrics;
pub use server::{
    certificate_names, install_crypto_provider, start, Access, NodeHandle, NodeService,
    MAX_DECODING_MESSAGE_BYTES,
};
