//! # fedq-common
//!
//! The contract between fedq processes, and nothing else: no engine logic lives here.
//!
//! - [`wire`]: the typed partial-aggregate request a coordinator sends to a node, the
//!   restricted expression language for filters, and the protocol version.
//! - [`derived`]: per-participant derived tables (`GROUP BY pid` with MIN, MAX, COUNT),
//!   one row per participant, declared from their source table for both sides.
//! - [`catalog`]: the privacy officer's catalog (tables, columns, bounds, public domains)
//!   and the query policy. Both coordinator and node load the same catalog file; the node
//!   uses it to check its local files and to validate every request it receives.
//! - [`group_key`]: GROUP BY keys (columns, `CASE` labels, integer buckets, date parts)
//!   and the public domain each derives from the catalog, shared so that coordinator and
//!   node agree on the released groups.
//! - [`quantile`]: the public candidate grid of private quantiles and its histogram bins,
//!   shared so that coordinator and node bin values identically.
//! - [`like`]: the check of `LIKE`/`ILIKE` patterns both sides run before any row is read,
//!   so a pattern never fails on a batch.
//! - [`participant_set`]: the sets of participants that `IN`/`EXISTS` subqueries,
//!   `INTERSECT` and `EXCEPT` test, each decided from a participant's own rows, and the
//!   check both sides run on them.
//! - [`outcome`]: the [`outcome::FailureStage`] a node's error carries: refused before
//!   reading data (refundable) or not.
//! - [`tls`]: reading the `[tls]` PEM files both sides use for mTLS.
//! - [`metrics`]: the Prometheus `/metrics` HTTP endpoint both sides serve (each with its
//!   own registry).
//!
//! Rules that the types encode:
//! - A request names a table, a filter, public group keys and partial aggregates. There
//!   is no way to express "return rows" in the wire format.
//! - Every numeric aggregate carries explicit clamp bounds and a fixed-point precision.
//! - Decoding is strict (`deny_unknown_fields`) and bounded in size
//!   ([`wire::MAX_REQUEST_BYTES`]); semantic validation is the node's job.

pub mod catalog;
pub mod computed;
pub mod derived;
pub mod group_key;
pub mod like;
pub mod metrics;
pub mod outcome;
pub mod participant_set;
pub mod quantile;
pub mod tls;
pub mod wire;

pub use catalog::{Catalog, CatalogError, ColumnSpec, ColumnType, Policy, PublicValue, TableSpec};
pub use wire::{
    AggregateRequest, BinaryOp, ColumnRef, GroupKey, JoinKind, JoinSpec, Literal, NodeInfo,
    PartialAggregateRequest, ParticipantSet, Predicate, Side, WireError, PROTOCOL_VERSION,
};

/// An untrusted string (an error message that quotes SQL, a peer's message) made safe to
/// log: control characters, quotes and backslashes written out (`\n`, `\u{1b}`), so a log
/// line never holds a forged newline or a terminal escape.
pub fn escape_log(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).collect()
}

/// An untrusted name (a user name as given at login, a certificate's names) made safe to
/// log as [`escape_log`] does, and cut to 64 characters with `…`.
pub fn log_safe(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod log_safe_tests {
    use super::log_safe;

    #[test]
    fn log_safe_writes_out_newlines_and_escape_codes_and_cuts_long_strings() {
        assert_eq!(log_safe("alice"), "alice");
        assert_eq!(log_safe("a\nINFO forged line"), "a\\nINFO forged line");
        assert_eq!(log_safe("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(log_safe(&"x".repeat(100)), format!("{}…", "x".repeat(64)));
        assert_eq!(super::escape_log("no\rreturn"), "no\\rreturn");
    }
}
