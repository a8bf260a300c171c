//! Nodes that fail before the query is sent: killed, stalled past the time-out, restarted.
//! The proxy faults here also cut or hold the reachability probe, so the coordinator finds
//! the site unreachable before any node has the request: by default the query fails and
//! charges nothing; with `allow_partial` the answer comes from the sites that responded and
//! says so. Budgets are checked after every step. (Failures after the request was sent are
//! charged: `failures.rs`.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedq::client::FedqClient;
use fedq::federation::{FederationOptions, LocalFederation};
use fedq::CliError;
use fedq_common::metrics::{NodePhase, QueryPhase};
use fedq_coordinator::engine::{META_COVERAGE, META_SITES_FAILED};
use fedq_coordinator::release::{META_EPSILON_SPENT, META_SITES_ANSWERED};
use fedq_coordinator::service::ACTION_BUDGET;
use fedq_tests::{behind_proxies, set_fault, Fault, Proxies};
use tonic::Code;

const TIMEOUT: Duration = Duration::from_secs(2);

async fn federation(dir: &std::path::Path, allow_partial: bool) -> (LocalFederation, Proxies) {
    fedq_tests::synth(dir, 3, 900, 41);
    let proxies: Proxies = Arc::new(Mutex::new(Vec::new()));
    let fed = LocalFederation::start(
        dir,
        FederationOptions {
            node_timeout: Some(TIMEOUT),
            allow_partial: Some(allow_partial),
            node_address: Some(behind_proxies(&proxies)),
            ..Default::default()
        },
    )
    .await
    .expect("federation");
    (fed, proxies)
}

fn set(proxies: &Proxies, site: &str, fault: Fault) {
    set_fault(proxies, site, fault);
}

async fn spent(c: &mut FedqClient) -> f64 {
    c.action(ACTION_BUDGET).await.unwrap()["epsilon_spent"]
        .as_f64()
        .unwrap()
}

/// A query no earlier one equals (no free replay).
fn sql(k: u32) -> String {
    format!(
        "SELECT COUNT(*) FROM participants WHERE birth_year >= {}",
        1900 + k
    )
}

fn unavailable(r: Result<fedq::client::QueryResult, CliError>, site: &str) {
    match r {
        Err(CliError::Server { code, message }) => {
            assert_eq!(code, Code::Unavailable, "{message}");
            assert!(message.contains(site), "{message}");
            assert!(message.contains("no budget was charged"), "{message}");
        }
        Err(e) => panic!("expected UNAVAILABLE, got {e}"),
        Ok(_) => panic!("expected UNAVAILABLE, the query was answered"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_a_failing_node_fails_the_query_and_charges_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut fed, proxies) = federation(tmp.path(), false).await;
    let mut alice = fed.client("alice").await.unwrap();
    let mut expected = 0.0;
    alice.query(&sql(1)).await.unwrap();
    expected += 1.0;
    assert_eq!(spent(&mut alice).await, expected);

    // Killed mid-query: site02 receives the request and its connection dies.
    set(&proxies, "site02", Fault::Kill);
    unavailable(alice.query(&sql(2)).await, "site02");
    assert_eq!(spent(&mut alice).await, expected, "nothing charged");

    // It comes back: the next query works without restarting the coordinator.
    set(&proxies, "site02", Fault::Pass);
    let r = alice.query(&sql(3)).await.unwrap();
    expected += 1.0;
    assert_eq!(
        r.schema.metadata()[META_SITES_ANSWERED],
        "site01,site02,site03"
    );
    assert_eq!(spent(&mut alice).await, expected);

    // Stalled past the per-node timeout.
    set(&proxies, "site02", Fault::Stall);
    let t = Instant::now();
    unavailable(alice.query(&sql(4)).await, "site02");
    let took = t.elapsed();
    assert!(
        took >= TIMEOUT,
        "gave up after {took:?}, before the timeout"
    );
    assert!(took < TIMEOUT * 10, "took {took:?}");
    assert_eq!(spent(&mut alice).await, expected, "nothing charged");

    // The hospital restarts its node (same address); the coordinator was never restarted.
    set(&proxies, "site02", Fault::Pass);
    fed.restart_node(1).await.unwrap();
    let r = alice.query(&sql(5)).await.unwrap();
    expected += 1.0;
    assert_eq!(
        r.schema.metadata()[META_SITES_ANSWERED],
        "site01,site02,site03"
    );
    assert_eq!(r.schema.metadata()[META_COVERAGE], "3/3");
    assert_eq!(spent(&mut alice).await, expected);

    // The ledger agrees: three released charges, no refund, failures audited.
    let ledger = fed.coordinator.engine.ledger();
    let charges = ledger.charges().unwrap();
    assert_eq!(charges.len(), 3);
    assert!(charges.iter().all(|c| c.state == "released"));
    assert!(ledger.verify().unwrap().ok());
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_allow_partial_the_answer_states_its_coverage() {
    let tmp = tempfile::tempdir().unwrap();
    let (fed, proxies) = federation(tmp.path(), true).await;
    let mut alice = fed.client("alice").await.unwrap();

    set(&proxies, "site02", Fault::Stall);
    let r = alice.query(&sql(1)).await.unwrap();
    let md = r.schema.metadata();
    assert_eq!(md[META_SITES_ANSWERED], "site01,site03");
    assert_eq!(md[META_SITES_FAILED], "site02");
    assert_eq!(md[META_COVERAGE], "2/3");
    assert_eq!(md[META_EPSILON_SPENT], "1");
    assert_eq!(
        spent(&mut alice).await,
        1.0,
        "charged once, as for a full answer"
    );

    set(&proxies, "site03", Fault::Kill);
    let r = alice.query(&sql(2)).await.unwrap();
    assert_eq!(r.schema.metadata()[META_SITES_ANSWERED], "site01");
    assert_eq!(r.schema.metadata()[META_COVERAGE], "1/3");
    assert_eq!(spent(&mut alice).await, 2.0);

    // No site answers: the query fails and nothing is charged.
    set(&proxies, "site01", Fault::Stall);
    set(&proxies, "site03", Fault::Stall);
    match alice.query(&sql(3)).await {
        Err(CliError::Server { code, message }) => {
            assert_eq!(code, Code::Unavailable, "{message}")
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert_eq!(spent(&mut alice).await, 2.0);
    for s in ["site01", "site02", "site03"] {
        set(&proxies, s, Fault::Pass);
    }
    let r = alice.query(&sql(4)).await.unwrap();
    assert_eq!(r.schema.metadata()[META_COVERAGE], "3/3");
    assert_eq!(r.schema.metadata()[META_SITES_FAILED], "");
    fed.shutdown().await.unwrap();
}

/// A node's memory limit is not enforced while a query runs (whether a query crosses it
/// would depend on its data, a bit one participant can flip): a node whose worst query
/// over its tables (the two largest joined) does not fit `max_query_memory_mb` refuses to
/// start, naming the tables, the estimate and the fix; with a limit that fits, the join the
/// old per-query limit stopped answers, and the nodes keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_worst_query_exceeds_its_memory_limit_refuses_to_start_and_queries_are_never_stopped(
) {
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 400, 43);
    let refused = LocalFederation::start(
        tmp.path(),
        FederationOptions {
            node_memory_limit: Some(8 * 1024),
            ..Default::default()
        },
    )
    .await;
    match refused {
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("max_query_memory_mb = 1"), "{message}");
            assert!(
                message.contains("raise max_query_memory_mb to at least"),
                "{message}"
            );
            assert!(message.contains("joined with table `"), "{message}");
        }
        Ok(_) => panic!("a node started with 8 KiB for its worst query"),
    }
    let fed = LocalFederation::start(tmp.path(), FederationOptions::default())
        .await
        .expect("federation");
    let mut alice = fed.client("alice").await.unwrap();
    // The join that stopped at the old limit of 8 KiB per query answers.
    let r = alice
        .query("SELECT COUNT(*) FROM labs JOIN participants USING (pid)")
        .await
        .expect("the join answers");
    assert_eq!(r.schema.metadata()[META_EPSILON_SPENT], "1");
    let r = alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .expect("a small query runs");
    assert_eq!(r.schema.metadata()[META_EPSILON_SPENT], "1");
    assert_eq!(spent(&mut alice).await, 2.0);
    // A planner refusal, for the metrics below.
    assert!(alice.query("SELECT pid FROM participants").await.is_err());

    // Prometheus /metrics moved with each query, and ε matches the ledger.
    let m = scrape(fed.coordinator.metrics_addr.expect("coordinator metrics")).await;
    assert_eq!(
        metric(&m, "fedq_queries_total", &[("outcome", "ok")]),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "fedq_queries_total", &[("outcome", "error")]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "fedq_queries_total", &[("outcome", "refused")]),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "fedq_refusals_total", &[]), 1.0, "{m}");
    assert_eq!(
        metric(&m, "fedq_query_duration_seconds_count", &[]),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "fedq_epsilon_spent_total", &[("researcher", "alice")]),
        spent(&mut alice).await,
        "{m}"
    );
    // Where the time went: every query is planned (the refusal too), and each answered one
    // passes through every later phase once.
    for phase in QueryPhase::ALL {
        let want = if phase == QueryPhase::Plan { 3.0 } else { 2.0 };
        assert_eq!(
            metric(
                &m,
                "fedq_query_phase_seconds_count",
                &[("phase", phase.as_str())]
            ),
            want,
            "{phase:?}: {m}"
        );
    }
    for (site, node) in fed.sites.iter().zip(&fed.nodes) {
        let n = scrape(node.metrics_addr.expect("node metrics")).await;
        let l = |o| [("outcome", o), ("site", site.as_str())];
        assert_eq!(
            metric(&n, "fedq_node_requests_total", &l("over_limit")),
            0.0,
            "{n}"
        );
        assert_eq!(metric(&n, "fedq_node_requests_total", &l("ok")), 2.0, "{n}");
        assert_eq!(
            metric(
                &n,
                "fedq_node_request_duration_seconds_count",
                &[("site", site.as_str())]
            ),
            2.0,
            "{n}"
        );
        for phase in NodePhase::ALL {
            assert_eq!(
                metric(
                    &n,
                    "fedq_node_phase_seconds_count",
                    &[("phase", phase.as_str()), ("site", site.as_str())]
                ),
                2.0,
                "{phase:?}: {n}"
            );
        }
        // Counts and durations only: no participant id or other data value.
        assert!(!n.contains("p00"), "{n}");
    }
    fed.shutdown().await.unwrap();
}

/// `GET /metrics` over plain HTTP.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: fedq\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the sample `name` with (at least) these labels; 0 if absent.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map_or(0.0, |(_, v)| v.parse().unwrap())
}

/// Every log line about a query carries its id: the coordinator's (a refusal at planning, a
/// site unreachable before dispatch, a release) and the node's (the answered request).
#[tokio::test]
async fn every_log_line_about_a_query_carries_its_id() {
    let (logs, _guard) = fedq_tests::Captured::install();
    tracing::callsite::rebuild_interest_cache();
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 300, 44);
    let mut fed = LocalFederation::start(tmp.path(), FederationOptions::default())
        .await
        .expect("federation");
    let mut alice = fed.client("alice").await.unwrap();
    let answered = alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .expect("answered");
    let id = answered.schema.metadata()[fedq_coordinator::release::META_QUERY_ID].clone();
    assert!(alice.query("SELECT pid FROM participants").await.is_err());
    fed.stop_node(1).await.unwrap();
    assert!(alice
        .query("SELECT COUNT(*) FROM participants WHERE birth_year > 1950")
        .await
        .is_err());
    let text = logs.text();
    let lines = |what: &str| -> Vec<&str> { text.lines().filter(|l| l.contains(what)).collect() };
    let released = lines("query released");
    assert_eq!(released.len(), 1, "{text}");
    assert!(released[0].contains(&format!("query_id={id}")), "{text}");
    let answered = lines("partial aggregate answered");
    assert_eq!(answered.len(), 2, "{text}");
    for l in &answered {
        assert!(l.contains(&format!("query_id={id}")), "{l}");
    }
    for what in [
        "query refused at planning",
        "site unreachable before dispatch",
    ] {
        let found = lines(what);
        assert!(!found.is_empty(), "no {what:?} in {text}");
        for l in found {
            let after = l.split("query_id=").nth(1).unwrap_or_else(|| panic!("{l}"));
            let qid: String = after.chars().take_while(char::is_ascii_hexdigit).collect();
            assert_eq!(qid.len(), 16, "{l}");
            assert_ne!(qid, id, "{l}");
        }
    }
    fed.shutdown().await.unwrap();
}
