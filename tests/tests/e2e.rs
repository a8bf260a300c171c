//! End-to-end suites of a fedq federation, one module per file, linked into one test binary
//! (see `tests/Cargo.toml`). Run one suite with `cargo test --workspace --test e2e -- ledger::`.

mod accuracy;
mod auth;
mod bucketed_keys;
mod cohorts;
mod failures;
mod faults;
mod federation;
mod golden;
mod hostile_requests;
mod hostile_sql;
mod ledger;
mod partition_selection;
mod privacy;
mod quantiles;
mod sql_features;
mod tls;
