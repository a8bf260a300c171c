//! A failure is a release (issue 13): no outcome a researcher sees may depend on one
//! participant for free. Each test runs the attack or failure class through Flight SQL on
//! two neighbouring federations (identical but for one participant, chosen at the edge the
//! attack probes) and compares everything the researcher sees: success or failure, the
//! error's code and message, the sites that answered, and the charge.
//!
//! - a LIKE pattern a node could fail to compile on some batches: refused at plan time,
//!   identically, at no cost (the node's own check is tested in `node/src/tests`);
//! - a post-processing error after the noise (a division by a noisy zero): charged like an
//!   answer, and stored, so asking again returns the same outcome at no cost;
//! - a site that fails after it may have read data: the charge stays, and `allow_partial`
//!   does not turn it into a partial answer;
//! - a site that times out after it had the request: charged, never left out, with the
//!   same error whether or not the participant the query singles out exists;
//! - ε below 10⁻⁶ is refused at `SET`; the smallest accepted ε is charged exactly.

use std::path::Path;

use fedq::client::{FedqClient, QueryResult};
use fedq::federation::{FederationOptions, LocalFederation};
use fedq::CliError;
use fedq_common::like::MAX_LIKE_PATTERN_CHARS;
use fedq_coordinator::engine::{META_COVERAGE, META_SITES_FAILED};
use fedq_coordinator::release::{META_EPSILON_SPENT, META_SITES_ANSWERED};
use fedq_coordinator::service::ACTION_BUDGET;
use fedq_tests::{
    behind_proxies, copy_dir, participant_born, remove_participant, set_fault, synth, Fault,
    Proxies,
};
use tonic::Code;

const TOKEN: &str = "failure-test-token-0123456789abcdef";

/// Federation `a` (synthetic, two sites) and its neighbour `b` without participant `pid`,
/// born before 1966. Returns the participant.
fn neighbours(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let a = root.join("a");
    let b = root.join("b");
    synth(&a, 2, 300, 13);
    copy_dir(&a, &b);
    let pid = participant_born(&a, |y| y < 1966);
    assert!(
        remove_participant(&b, &pid) > 0,
        "the neighbour lacks {pid}"
    );
    (a, b, pid)
}

async fn start(dir: &Path, allow_partial: bool) -> (LocalFederation, FedqClient) {
    let fed = LocalFederation::start(
        dir,
        FederationOptions {
            min_reported_count: Some(0),
            allow_partial: Some(allow_partial),
            extra_researchers: vec![("eve".into(), TOKEN.into(), 1000.0)],
            ..Default::default()
        },
    )
    .await
    .expect("federation");
    let client = FedqClient::connect(&fed.url(), "eve", TOKEN)
        .await
        .expect("login");
    (fed, client)
}

async fn spent(c: &mut FedqClient) -> f64 {
    c.action(ACTION_BUDGET).await.expect("budget")["epsilon_spent"]
        .as_f64()
        .expect("epsilon_spent")
}

/// What a researcher sees of one query, with the per-query id taken out of messages.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Answer {
        values: Vec<String>,
        sites: String,
        coverage: String,
        epsilon: String,
    },
    Error {
        code: Code,
        message: String,
    },
}

fn seen(r: Result<QueryResult, CliError>) -> Seen {
    match r {
        Ok(r) => {
            let md = r.schema.metadata();
            let values = r
                .batches
                .iter()
                .flat_map(|b| (0..b.num_rows()).map(move |i| (b, i)))
                .flat_map(|(b, i)| (0..b.num_columns()).map(move |c| fedq_tests::key(b, c, i)))
                .collect();
            Seen::Answer {
                values,
                sites: md[META_SITES_ANSWERED].clone(),
                coverage: md[META_COVERAGE].clone(),
                epsilon: md[META_EPSILON_SPENT].clone(),
            }
        }
        Err(CliError::Server { code, message }) => Seen::Error {
            code,
            message: without_query_ids(&message),
        },
        Err(e) => panic!("not a server answer: {e}"),
    }
}

/// A message with its 16-hex-digit query ids replaced by `<id>`.
fn without_query_ids(m: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    for c in m.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() {
            run.push(c);
            continue;
        }
        if run.len() == 16 {
            out.push_str("<id>");
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// Issue 13's first attack: `pid = X AND birth_year < 1966 AND pid LIKE <a pattern the
/// regex engine refuses>` failed at a node exactly when X existed with such a birth year,
/// and node failures were refunded. Now the pattern is refused at plan time, before any
/// node is asked, with the same message whether or not X exists; a pattern at the limit
/// compiles on every batch and is answered (and charged) in both federations alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_like_pattern_a_node_could_fail_on_is_refused_at_plan_time_with_or_without_the_participant(
) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, pid) = neighbours(tmp.path());
    let attack = format!(
        "SELECT COUNT(*) FROM participants WHERE pid = '{pid}' AND birth_year < 1966 AND pid LIKE '{}'",
        "_".repeat(20_000)
    );
    let at_limit = format!(
        "SELECT COUNT(*) FROM participants WHERE pid = '{pid}' AND birth_year < 1966 AND pid ILIKE '{}'",
        "ǅ_".repeat(MAX_LIKE_PATTERN_CHARS / 2)
    );
    let mut outcomes = Vec::new();
    for dir in [&a, &b] {
        let (fed, mut eve) = start(dir, false).await;
        let refused = seen(eve.query(&attack).await);
        let after_refusal = spent(&mut eve).await;
        let answered = seen(eve.query(&at_limit).await);
        let after_answer = spent(&mut eve).await;
        fed.shutdown().await.unwrap();
        outcomes.push((refused, after_refusal, answered, after_answer));
    }
    let (refused_a, spent_a, answered_a, charged_a) = &outcomes[0];
    let (refused_b, spent_b, answered_b, charged_b) = &outcomes[1];
    match refused_a {
        Seen::Error { code, message } => {
            assert_eq!(*code, Code::PermissionDenied, "{message}");
            assert!(
                message.contains(&MAX_LIKE_PATTERN_CHARS.to_string()),
                "the refusal names the limit: {message}"
            );
        }
        other => panic!("the attack was answered: {other:?}"),
    }
    assert_eq!(refused_a, refused_b, "identical refusal");
    assert_eq!((*spent_a, *spent_b), (0.0, 0.0), "refusals are free");
    // At the limit the pattern is answered in both; the values differ only by the noise.
    for answered in [answered_a, answered_b] {
        match answered {
            Seen::Answer {
                coverage, epsilon, ..
            } => {
                assert_eq!(coverage, "2/2");
                assert_eq!(epsilon, "1");
            }
            other => panic!("a pattern at the limit was not answered: {other:?}"),
        }
    }
    assert_eq!((*charged_a, *charged_b), (1.0, 1.0));
}

/// Issue 13's second attack: `COUNT(*) / (CASE WHEN COUNT(*) > T THEN 0 ELSE 1 END)` fails
/// after the noise exactly when the noisy count exceeds T. The failure was refunded and
/// not stored, so repeating it drew fresh noise for free. Now every outcome, answer or
/// error, costs ε once, and the identical query returns the stored outcome at no cost, in
/// both neighbouring federations. T is set 100 below and 100 above the count of `b` (the
/// smaller one), so one query fails and one answers in each: the COUNT's noise has scale
/// R·S/ε_count ≤ 2/0.95, so it reaches 100 with probability below e^{-47}, and the four
/// draws together fail this test falsely with probability below 1e-19.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_processing_error_after_the_noise_is_charged_and_replayed_for_free() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, _) = neighbours(tmp.path());
    let n_b = {
        let (fed, mut eve) = start(&b, false).await;
        let q = fed
            .coordinator
            .engine
            .plan("eve", "SELECT COUNT(*) FROM participants")
            .await
            .unwrap();
        let n = fed.coordinator.engine.gather(&q).await.unwrap().get(&[], 1)[0];
        assert_eq!(spent(&mut eve).await, 0.0);
        fed.shutdown().await.unwrap();
        n
    };
    for dir in [&a, &b] {
        let (fed, mut eve) = start(dir, false).await;
        let mut errors = 0;
        let mut answers = 0;
        let mut expected = 0.0;
        // T far below the count: a division by zero; far above: an answer.
        for (k, t) in [(0, n_b - 100), (1, n_b + 100)] {
            let sql = format!(
                "SELECT COUNT(*) / (CASE WHEN COUNT(*) > {t} THEN 0 ELSE 1 END) AS x FROM participants WHERE pid <> 'nobody-{k}'"
            );
            let first = seen(eve.query(&sql).await);
            expected += 1.0;
            assert_eq!(spent(&mut eve).await, expected, "every outcome is charged");
            let again = seen(eve.query(&sql).await);
            assert_eq!(
                spent(&mut eve).await,
                expected,
                "the stored outcome is free"
            );
            match (&first, &again) {
                (
                    Seen::Error { code, message },
                    Seen::Error {
                        code: c2,
                        message: m2,
                    },
                ) => {
                    errors += 1;
                    assert_eq!(*code, Code::InvalidArgument, "{message}");
                    assert_eq!(code, c2);
                    assert!(message.contains("Divide by zero"), "{message}");
                    assert!(message.contains("was charged"), "{message}");
                    assert!(m2.contains("at no cost"), "{m2}");
                    let head = |m: &str| m.split(". ").next().unwrap_or("").to_string();
                    assert_eq!(head(message), head(m2), "the same error, replayed");
                }
                (Seen::Answer { values, .. }, Seen::Answer { values: v2, .. }) => {
                    answers += 1;
                    assert_eq!(values, v2, "the same noisy answer, replayed");
                }
                other => panic!("the replay differs from the original: {other:?}"),
            }
        }
        assert_eq!((errors, answers), (1, 1));
        fed.shutdown().await.unwrap();
    }
}

/// A site that fails after it may have read data (here its participants file was
/// corrupted after start-up): the failure could depend on data, so the charge stays, in both
/// neighbouring federations alike; with `allow_partial` the site is not left out either,
/// because which sites answer may depend only on reachability before the request is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_failing_after_reading_data_keeps_the_charge_and_is_never_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, _) = neighbours(tmp.path());
    let mut outcomes = Vec::new();
    for dir in [&a, &b] {
        for allow_partial in [false, true] {
            let (fed, mut eve) = start(dir, allow_partial).await;
            // Reachable, and answering other tables.
            eve.query("SELECT COUNT(*) FROM labs").await.unwrap();
            let file = dir.join("sites/site02/participants.parquet");
            let saved = std::fs::read(&file).unwrap();
            // Overwritten in place (same inode) with bytes that are not Parquet: a disk
            // fault the node finds only when it reads.
            std::fs::write(&file, b"not a parquet file").unwrap();
            let before = spent(&mut eve).await;
            let failed = seen(eve.query("SELECT COUNT(*) FROM participants").await);
            let charged = spent(&mut eve).await - before;
            std::fs::write(&file, saved).unwrap();
            fed.shutdown().await.unwrap();
            match &failed {
                Seen::Error { code, message } => {
                    assert_eq!(*code, Code::Aborted, "{message}");
                    assert!(message.contains("site02"), "{message}");
                    assert!(message.contains("stays charged"), "{message}");
                }
                other => panic!("expected a charged failure, got {other:?}"),
            }
            assert_eq!(charged, 1.0, "the failed query stays charged");
            outcomes.push(failed);
        }
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "{outcomes:?}");
}

/// A query time-out after dispatch (issue 13's last failure class). Whether a node answers
/// within the time-out depends on its work, which one participant changes by their own
/// rows (see ARCHITECTURE.md, "Timing"), so the outcome of a time-out must not depend on
/// who is in the data: the query singles out one participant (`pid = X AND birth_year <
/// 1966`), site02 has the request and runs it, and its answer never arrives. In both
/// neighbouring federations, with and without `allow_partial`, the researcher sees the
/// same error (`DEADLINE_EXCEEDED`, a message naming only the site and the time-out), the
/// site is not left out of a partial answer, and the charge stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_timing_out_after_dispatch_gives_the_same_charged_error_with_or_without_the_participant(
) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, pid) = neighbours(tmp.path());
    // A ticket larger than fedq_tests::HANG_AFTER_BYTES, so that the proxy lets the probe
    // through and holds the answer to this request only.
    let absent: Vec<String> = (0..800).map(|i| format!("'absent-{i:05}'")).collect();
    let attack = format!(
        "SELECT COUNT(*) FROM participants WHERE pid = '{pid}' AND birth_year < 1966 AND pid NOT IN ({})",
        absent.join(", ")
    );
    let mut outcomes = Vec::new();
    for dir in [&a, &b] {
        for allow_partial in [false, true] {
            let proxies: Proxies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let fed = LocalFederation::start(
                dir,
                FederationOptions {
                    min_reported_count: Some(0),
                    allow_partial: Some(allow_partial),
                    node_timeout: Some(std::time::Duration::from_secs(2)),
                    extra_researchers: vec![("eve".into(), TOKEN.into(), 1000.0)],
                    node_address: Some(behind_proxies(&proxies)),
                    ..Default::default()
                },
            )
            .await
            .expect("federation");
            let mut eve = FedqClient::connect(&fed.url(), "eve", TOKEN)
                .await
                .expect("login");
            let set = |fault| set_fault(&proxies, "site02", fault);
            // Both sites reachable and answering, with the ticket at its full size.
            let warm = seen(eve.query(&format!("{attack} AND pid <> 'warm'")).await);
            assert!(
                matches!(&warm, Seen::Answer { coverage, .. } if coverage == "2/2"),
                "{warm:?}"
            );
            set(Fault::HangAfterLargeRequest);
            let before = spent(&mut eve).await;
            let t = std::time::Instant::now();
            let timed_out = seen(eve.query(&attack).await);
            let waited = t.elapsed();
            let charged = spent(&mut eve).await - before;
            set(Fault::Pass);
            fed.shutdown().await.unwrap();
            match &timed_out {
                Seen::Error { code, message } => {
                    // A time-out says so, with its limit: configuration, not data.
                    assert_eq!(*code, Code::DeadlineExceeded, "{message}");
                    assert!(message.contains("site02"), "{message}");
                    assert!(
                        message.contains(
                            "timed out on query <id> (no answer within 2 s, the coordinator's node_timeout_secs)"
                        ),
                        "{message}"
                    );
                    assert!(message.contains("stays charged"), "{message}");
                }
                other => panic!("expected a charged time-out, got {other:?}"),
            }
            assert!(
                waited >= std::time::Duration::from_secs(2),
                "the coordinator gave up after {waited:?}, before its time-out: not a time-out"
            );
            assert_eq!(charged, 1.0, "the timed-out query stays charged");
            outcomes.push(timed_out);
        }
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "{outcomes:?}");
}

/// A site that cannot be reached before the request is sent is left out with
/// `allow_partial` (reachability is public), and the answer says so; nothing that depends
/// on data decides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_unreachable_before_dispatch_is_the_only_kind_left_out_of_a_partial_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _, _) = neighbours(tmp.path());
    let (mut fed, mut eve) = start(&a, true).await;
    let site = fed.stop_node(1).await.unwrap();
    let r = seen(eve.query("SELECT COUNT(*) FROM participants").await);
    match r {
        Seen::Answer {
            sites, coverage, ..
        } => {
            assert_eq!(sites, "site01");
            assert_eq!(coverage, "1/2");
        }
        other => panic!("expected a partial answer, got {other:?}"),
    }
    let again = eve.query("SELECT COUNT(*) FROM diagnoses").await.unwrap();
    assert_eq!(again.schema.metadata()[META_SITES_FAILED], site);
    assert_eq!(spent(&mut eve).await, 2.0);
    fed.shutdown().await.unwrap();
}

/// The ledger counts in units of 10⁻⁹ ε and used to round a charge to the nearest unit,
/// so `SET fedq.epsilon = 1e-16` released an answer charged 0. Such an ε is now refused at
/// `SET`, before anything runs, and the smallest accepted ε is charged exactly; the
/// answer's metadata says what the ledger charged. (Rounding a tiny charge up to one unit
/// is `ledger::tests::any_positive_charge_costs_at_least_one_ledger_unit`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epsilon_below_the_minimum_is_refused_at_set_and_the_minimum_is_charged_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    synth(&dir, 1, 100, 5);
    let (fed, mut eve) = start(&dir, false).await;
    match eve.query("SET fedq.epsilon = 1e-16").await {
        Err(CliError::Server { code, message }) => {
            assert_eq!(code, Code::InvalidArgument, "{message}");
            assert!(
                message.contains("smallest accepted value 0.000001"),
                "{message}"
            );
        }
        other => panic!("1e-16 must be refused at SET: {other:?}"),
    }
    assert_eq!(spent(&mut eve).await, 0.0);
    eve.query("SET fedq.epsilon = 0.000001").await.unwrap();
    let r = eve
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();
    assert_eq!(r.schema.metadata()[META_EPSILON_SPENT], "0.000001");
    assert_eq!(spent(&mut eve).await, 1e-6);
    fed.shutdown().await.unwrap();
}
