//! Hostile SQL at the coordinator (issue 15): a chain of a few thousand `OR`s used to
//! overflow a worker thread's stack and abort the coordinator for every researcher, even
//! inside a free `EXPLAIN`. Each shape below (long, deep, wide and huge) now gets a refusal
//! that names the limit, costs nothing, and the coordinator keeps answering. (The
//! coordinator runs in this test's process: a stack overflow would abort the test.)

use fedq::federation::{FederationOptions, LocalFederation};
use fedq::CliError;
use fedq_coordinator::service::ACTION_BUDGET;
use tonic::Code;

fn chain(n: usize, term: &str, op: &str) -> String {
    (0..n)
        .map(|i| term.replace("{i}", &i.to_string()))
        .collect::<Vec<_>>()
        .join(op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sql_is_refused_with_its_limit_and_the_coordinator_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 200, 61);
    let fed = LocalFederation::start(tmp.path(), FederationOptions::default())
        .await
        .expect("federation");
    let mut alice = fed.client("alice").await.unwrap();
    let q = |w: String| format!("SELECT COUNT(*) FROM participants WHERE {w}");
    let hostile = [
        // The reported crash: about 2,000 OR terms.
        q(chain(2_000, "birth_year = {i}", " OR ")),
        q(chain(100_000, "birth_year = {i}", " OR ")),
        q(format!("{} > 1", chain(20_000, "birth_year", " + "))),
        q(format!("{}birth_year > 1", "NOT ".repeat(50_000))),
        format!("SELECT {}1 FROM participants", "- ".repeat(50_000)),
        q(format!(
            "{}birth_year > 1{}",
            "(".repeat(5_000),
            ")".repeat(5_000)
        )),
        format!(
            "SELECT {}1{}, COUNT(*) FROM participants GROUP BY 1",
            "CASE WHEN birth_year > 1 THEN ".repeat(3_000),
            " ELSE 0 END".repeat(3_000)
        ),
        format!(
            "SELECT COUNT(*) FROM participants WHERE sex = '{}'",
            "x".repeat(1 << 20)
        ),
    ];
    for sql in &hostile {
        for text in [sql.clone(), format!("EXPLAIN {sql}")] {
            match alice.query(&text).await {
                Err(CliError::Server { code, message }) => {
                    // Texts over gRPC's 1 MiB message limit are refused by the transport.
                    assert!(
                        matches!(
                            code,
                            Code::PermissionDenied | Code::InvalidArgument | Code::OutOfRange
                        ),
                        "{code:?}: {message}"
                    );
                    assert!(message.contains("the limit is"), "{message}");
                }
                Err(e) => panic!("not a refusal: {e}"),
                Ok(_) => panic!("answered: {}", &text[..80]),
            }
        }
    }
    // A chain of CTEs, each computing from the last, nests the plan one level per CTE
    // without parentheses: 100 of them overflowed a worker's stack. The longest chain
    // allowed is answered (on this test's 2 MiB worker stacks, in a debug build), and
    // one more is refused with the limit.
    let cte_chain = |n: usize| {
        let steps: Vec<String> = (1..n)
            .map(|i| format!("c{i} AS (SELECT pid, x + 1 AS x FROM c{})", i - 1))
            .collect();
        format!(
            "WITH c0 AS (SELECT pid, birth_year AS x FROM participants), {} SELECT COUNT(*), AVG(x) FROM c{}",
            steps.join(", "),
            n - 1
        )
    };
    let longest = fedq_coordinator::sql_limits::MAX_SQL_SELECTS - 1;
    let r = alice.query(&cte_chain(longest)).await.unwrap();
    assert_eq!(r.batches[0].num_rows(), 1);
    for n in [longest + 1, 100, 2_000] {
        match alice.query(&cte_chain(n)).await {
            Err(CliError::Server { code, message }) => {
                assert_eq!(code, Code::PermissionDenied, "{message}");
                assert!(message.contains("the limit is 24"), "{message}");
            }
            other => panic!("not a refusal: {:?}", other.map(|r| r.batches.len())),
        }
    }
    // Still serving, and the refusals were free.
    let r = alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();
    assert_eq!(r.batches[0].num_rows(), 1);
    let spent = alice.action(ACTION_BUDGET).await.unwrap()["epsilon_spent"]
        .as_f64()
        .unwrap();
    assert_eq!(
        spent, 2.0,
        "two answers charged (ε = 1 each), refusals free"
    );
    fed.shutdown().await.unwrap();
}
