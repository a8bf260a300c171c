//! End to end with the SQLite ledger: free replays, refunds when a node is down (audited),
//! 64 researchers at once against one global dataset budget, officer controls and their
//! role check, and catalog changes audited at start-up.

use std::path::Path;

use fedq::client::FedqClient;
use fedq::federation::{FederationOptions, LocalFederation};
use fedq::CliError;
use fedq_coordinator::audit;
use fedq_coordinator::release::{META_EPSILON_SPENT, META_QUERY_ID};
use fedq_coordinator::service::{
    ACTION_BUDGET, ACTION_BUDGET_GRANT, ACTION_BUDGET_LIST, ACTION_POLICY_SHOW,
};
use fedq_tests::{set_rows_per_unit, synth};
use serde_json::{json, Value};
use tonic::Code;

fn entries(dir: &Path) -> Vec<Value> {
    let path = dir.join("ledger.sqlite");
    let conn = audit::open_read_only(&path).unwrap();
    audit::read_rows(&conn, &path)
        .unwrap()
        .into_iter()
        .map(|r| serde_json::from_str(&r.entry).unwrap())
        .collect()
}

fn of_kind<'a>(es: &'a [Value], kind: &str) -> Vec<&'a Value> {
    es.iter().filter(|e| e["kind"] == kind).collect()
}

fn code(r: Result<impl std::fmt::Debug, CliError>) -> Code {
    match r {
        Err(CliError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn start(dir: &Path, extra: Vec<(String, String, f64)>) -> LocalFederation {
    LocalFederation::start(
        dir,
        FederationOptions {
            extra_researchers: extra,
            min_reported_count: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("federation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_are_free_and_node_failures_are_refunded_and_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 1200, 21);
    let mut fed = start(dir, vec![]).await;
    let mut alice = fed.client("alice").await.unwrap();
    let budget = |v: Value| v["epsilon_spent"].as_f64().unwrap();

    let first = alice
        .query("SELECT sex, COUNT(*) AS n, AVG(birth_year) FROM participants GROUP BY sex")
        .await
        .unwrap();
    let spent = budget(alice.action(ACTION_BUDGET).await.unwrap());
    assert_eq!(spent, 1.0);
    assert_eq!(first.schema.metadata()["fedq.replay"], "false");
    // Same plan, different text: case and whitespace do not matter.
    let again = alice
        .query("select   SEX, count(*) as n,\n avg(BIRTH_YEAR)\nfrom PARTICIPANTS group by sex")
        .await
        .unwrap();
    let md = again.schema.metadata();
    assert_eq!(md["fedq.replay"], "true");
    assert_eq!(md[META_EPSILON_SPENT], "0");
    assert_eq!(md["fedq.replay_of"], first.schema.metadata()[META_QUERY_ID]);
    let cols = |r: &fedq::client::QueryResult| {
        r.batches
            .iter()
            .map(|b| b.columns().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cols(&again),
        cols(&first),
        "a replay returns the same values"
    );
    assert_eq!(budget(alice.action(ACTION_BUDGET).await.unwrap()), spent);
    // A different ε is a different query, and is charged.
    alice.query("SET fedq.epsilon = 0.5").await.unwrap();
    let other = alice
        .query("SELECT sex, COUNT(*) AS n, AVG(birth_year) FROM participants GROUP BY sex")
        .await
        .unwrap();
    assert_eq!(other.schema.metadata()["fedq.replay"], "false");
    assert_eq!(budget(alice.action(ACTION_BUDGET).await.unwrap()), 1.5);

    // A node down: nothing charged, and the failure is in the audit log.
    let site = fed.stop_node(0).await.unwrap();
    assert_eq!(
        code(
            alice
                .query("SELECT COUNT(*) FROM labs WHERE value > 100")
                .await
        ),
        Code::Unavailable
    );
    assert_eq!(budget(alice.action(ACTION_BUDGET).await.unwrap()), 1.5);
    // A planning refusal is audited too.
    assert_eq!(
        code(alice.query("SELECT * FROM labs").await),
        Code::PermissionDenied
    );
    fed.shutdown().await.unwrap();

    let es = entries(dir);
    let failed = of_kind(&es, "query.failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["body"]["epsilon_charged"], 0.0);
    assert_eq!(failed[0]["body"]["site_failed"], json!(site));
    assert_eq!(
        failed[0]["body"]["sites_asked"].as_array().unwrap().len(),
        3
    );
    assert!(failed[0]["body"]["plan_hash"].as_str().unwrap().len() == 64);
    assert_eq!(of_kind(&es, "query.charged").len(), 2);
    assert_eq!(of_kind(&es, "query.released").len(), 2);
    assert_eq!(of_kind(&es, "query.replayed").len(), 1);
    let refused = of_kind(&es, "query.refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["body"]["sql"], "SELECT * FROM labs");
    let charged = of_kind(&es, "query.charged")[0];
    for key in [
        "researcher",
        "sql",
        "plan_hash",
        "epsilon",
        "delta",
        "sites_asked",
        "sites_dispatched",
        "outcome",
    ] {
        assert!(
            charged["body"].get(key).is_some(),
            "charged entry lacks {key}"
        );
    }
    assert!(charged["ts"].as_str().unwrap().ends_with('Z'));
    assert!(audit::verify(&dir.join("ledger.sqlite"), None)
        .unwrap()
        .ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_researchers_never_overspend_a_global_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 600, 22);
    // A global budget of ε = 10 over all tables.
    let p = dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replace(
        &format!("epsilon_budget = {:?}", fedq_synth::DATASET_EPSILON),
        "epsilon_budget = 10.0",
    );
    std::fs::write(&p, text).unwrap();
    let extra: Vec<_> = (0..64)
        .map(|i| (format!("r{i:02}"), format!("password-of-r{i:02}"), 100.0))
        .collect();
    let fed = start(dir, extra).await;
    let url = fed.url();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c =
                    FedqClient::connect(&url, &format!("r{i:02}"), &format!("password-of-r{i:02}"))
                        .await
                        .unwrap();
                match c.query("SELECT COUNT(*) FROM participants").await {
                    Ok(r) => Ok(r.schema.metadata()[META_QUERY_ID].clone()),
                    Err(CliError::Server { code, message }) => Err((code, message)),
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let mut released = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(qid) => released.push(qid),
            Err((code, message)) => {
                assert_eq!(code, Code::ResourceExhausted, "{message}");
                assert!(message.contains("biobank"), "{message}");
            }
        }
    }
    assert_eq!(released.len(), 10, "exactly the global budget's worth");
    let ledger = fed.coordinator.engine.ledger();
    let ds = ledger
        .status(fedq_coordinator::BudgetKind::Dataset, "biobank")
        .unwrap();
    assert_eq!(ds.epsilon_spent, 10.0);
    let charges = ledger.charges().unwrap();
    let mut charged: Vec<_> = charges
        .iter()
        .filter(|c| c.state != "refunded")
        .map(|c| c.query_id.clone())
        .collect();
    assert!(charges.iter().all(|c| c.state == "released"));
    charged.sort();
    released.sort();
    assert_eq!(charged, released, "answers released match charges exactly");
    assert!(ledger.verify().unwrap().ok());
    fed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn officers_control_budgets_and_changes_are_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 600, 23);
    let fed = start(dir, vec![]).await;
    let mut officer = fed.client("olivia").await.unwrap();
    let mut bob = fed.client("bob").await.unwrap();

    // A researcher cannot grant, list or read the policy; the attempt is audited.
    let grant = json!({"kind": "researcher", "name": "bob", "epsilon": 100.0});
    assert_eq!(
        code(
            bob.action_with_body(ACTION_BUDGET_GRANT, Some(&grant))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(bob.action(ACTION_BUDGET_LIST).await),
        Code::PermissionDenied
    );
    // Bob sees only his own budget.
    let own = bob.action(ACTION_BUDGET).await.unwrap();
    assert_eq!(own["name"], "bob");
    assert_eq!(own["epsilon_budget"], 5.0);

    // The officer grants, lists, and reads the policy; an officer token runs no query.
    let g = json!({"kind": "researcher", "name": "bob", "epsilon": 3.0});
    let st = officer
        .action_with_body(ACTION_BUDGET_GRANT, Some(&g))
        .await
        .unwrap();
    assert_eq!(st["epsilon_budget"], 8.0);
    assert_eq!(
        bob.action(ACTION_BUDGET).await.unwrap()["epsilon_budget"],
        8.0
    );
    let list = officer.action(ACTION_BUDGET_LIST).await.unwrap();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"alice".to_string()) && names.contains(&"biobank".to_string()));
    let policy = officer.action(ACTION_POLICY_SHOW).await.unwrap();
    assert_eq!(policy["policy_hash"].as_str().unwrap().len(), 64);
    assert_eq!(
        code(officer.query("SELECT COUNT(*) FROM participants").await),
        Code::PermissionDenied
    );
    // Bad input: NaN and negative ε, unknown budget, a grant of nothing, a grant to a
    // researcher or dataset that does not exist (a typo would otherwise create a budget
    // nobody can use).
    for bad in [
        json!({"name": "bob", "epsilon": -1.0}),
        json!({"name": "bob", "epsilon": "NaN"}),
        json!({"name": "bob"}),
        json!({"kind": "researcher", "name": "bob", "epsilon": 0.0}),
        json!({"kind": "researcher", "name": "bbo", "epsilon": 1.0}),
        json!({"kind": "researcher", "name": "olivia", "epsilon": 1.0}),
        json!({"kind": "dataset", "name": "bioban", "epsilon": 1.0}),
    ] {
        assert_eq!(
            code(
                officer
                    .action_with_body(ACTION_BUDGET_GRANT, Some(&bad))
                    .await
            ),
            Code::InvalidArgument,
            "{bad}"
        );
    }
    let revoke = json!({"kind": "researcher", "name": "nobody"});
    assert_eq!(
        code(
            officer
                .action_with_body(
                    fedq_coordinator::service::ACTION_BUDGET_REVOKE,
                    Some(&revoke)
                )
                .await
        ),
        Code::PermissionDenied
    );
    // Revoke bob entirely: his next query is refused.
    let revoke = json!({"kind": "researcher", "name": "bob"});
    officer
        .action_with_body(
            fedq_coordinator::service::ACTION_BUDGET_REVOKE,
            Some(&revoke),
        )
        .await
        .unwrap();
    assert_eq!(
        code(bob.query("SELECT COUNT(*) FROM participants").await),
        Code::PermissionDenied
    );
    fed.shutdown().await.unwrap();

    // Restart unchanged: no policy change. Restart with a changed bound: audited.
    let fed = start(dir, vec![]).await;
    fed.shutdown().await.unwrap();
    set_rows_per_unit(dir, 7);
    let fed = start(dir, vec![]).await;
    // The ledger kept the officer's grant across restarts (it is authoritative).
    let alice_budget = fed
        .coordinator
        .engine
        .ledger()
        .status(fedq_coordinator::BudgetKind::Researcher, "bob")
        .unwrap();
    assert_eq!(alice_budget.epsilon_budget, 8.0);
    assert!(alice_budget.revoked);
    fed.shutdown().await.unwrap();

    let es = entries(dir);
    assert_eq!(of_kind(&es, "officer.denied").len(), 2);
    let granted: Vec<_> = of_kind(&es, "budget.granted")
        .into_iter()
        .filter(|e| e["actor"] == "olivia")
        .collect();
    assert_eq!(granted.len(), 1);
    assert_eq!(of_kind(&es, "budget.revoked").len(), 1);
    let changes = of_kind(&es, "policy.changed");
    assert_eq!(changes.len(), 2, "first start and the changed catalog");
    assert_eq!(
        changes[1]["body"]["previous_hash"],
        changes[0]["body"]["hash"]
    );
    assert_eq!(of_kind(&es, "coordinator.started").len(), 3);
    assert!(audit::verify(&dir.join("ledger.sqlite"), None)
        .unwrap()
        .ok());
}

/// A joined query reads two tables, so it spends the budget of every dataset holding either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_spends_the_datasets_of_both_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 600, 23);
    let path = dir.join("coordinator.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start_at = text.find("[[datasets]]").unwrap();
    let end_at = start_at + text[start_at..].find("epsilon_budget").unwrap();
    let end_at = end_at + text[end_at..].find('\n').unwrap();
    let text = format!(
        "{}[[datasets]]\nname = \"clinical\"\ntables = [\"labs\", \"participants\", \"specimens\"]\nepsilon_budget = 100.0\n\n\
         [[datasets]]\nname = \"genomic\"\ntables = [\"diagnoses\", \"variants\"]\nepsilon_budget = 100.0\n{}",
        &text[..start_at],
        &text[end_at..]
    );
    std::fs::write(&path, text).unwrap();
    let fed = start(dir, vec![]).await;
    let mut alice = fed.client("alice").await.unwrap();
    alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();
    alice
        .query("SELECT p.sex, COUNT(*) FROM diagnoses d JOIN participants p USING (pid) GROUP BY p.sex")
        .await
        .unwrap();
    let es = entries(dir);
    let charged: Vec<Value> = of_kind(&es, "query.charged")
        .into_iter()
        .map(|e| e["body"]["datasets"].clone())
        .collect();
    assert_eq!(
        charged,
        vec![json!(["clinical"]), json!(["clinical", "genomic"])]
    );
    fed.shutdown().await.unwrap();
}
