//! Researcher authentication on the Flight SQL endpoint: handshake login with Argon2
//! password hashes in the ledger, short-lived bearer tokens, roles, and officer-managed
//! users. Each refusal must carry the right gRPC status code.

use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::FlightDescriptor;
use fedq::client::{login, FedqClient};
use fedq::federation::{FederationOptions, LocalFederation};
use fedq::CliError;
use fedq_coordinator::service::{
    ACTION_BUDGET_GRANT, ACTION_BUDGET_LIST, ACTION_USER_ADD, ACTION_USER_DISABLE,
    ACTION_USER_LIST, ACTION_USER_UNLOCK,
};
use fedq_coordinator::throttle::LoginPolicy;
use prost::Message;
use serde_json::json;
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<T, CliError>) -> (Code, String) {
    match r {
        Err(CliError::Server { code, message }) => (code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn federation(dir: &std::path::Path, ttl: Option<Duration>) -> LocalFederation {
    fedq_tests::synth(dir, 2, 400, 31);
    LocalFederation::start(
        dir,
        FederationOptions {
            token_ttl: ttl,
            ..Default::default()
        },
    )
    .await
    .expect("federation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logins_tokens_roles_and_user_management() {
    let tmp = tempfile::tempdir().unwrap();
    let fed = federation(tmp.path(), None).await;
    let url = fed.url();
    let alice_pw = fed.password("alice").unwrap();

    // The right password logs in and queries.
    let mut alice = fed.client("alice").await.unwrap();
    alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();

    // Wrong password, unknown user, empty password: UNAUTHENTICATED, same message.
    for (user, pw) in [
        ("alice", "not-her-password"),
        ("mallory", alice_pw.as_str()),
        ("alice", ""),
    ] {
        let (c, m) = code(FedqClient::connect(&url, user, pw).await.map(|_| ()));
        assert_eq!(c, Code::Unauthenticated, "{user}: {m}");
        assert!(m.contains("wrong user name or password"), "{m}");
    }

    // A made-up bearer token, and no credentials at all.
    let mut forged = FedqClient::connect_with_token(&url, &"ab".repeat(32))
        .await
        .unwrap();
    let (c, m) = code(forged.query("SELECT COUNT(*) FROM participants").await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let cmd = CommandStatementQuery {
        query: "SELECT COUNT(*) FROM participants".into(),
        transaction_id: None,
    };
    let desc = FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec());
    let s = FlightServiceClient::new(channel.clone())
        .get_flight_info(desc.clone())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());

    // Basic credentials are accepted only by the handshake, not on a query.
    let mut req = tonic::Request::new(desc);
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{alice_pw}"));
    req.metadata_mut()
        .insert("authorization", format!("Basic {basic}").parse().unwrap());
    let s = FlightServiceClient::new(channel.clone())
        .get_flight_info(req)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());

    // A researcher calling officer actions: PERMISSION_DENIED.
    let mut bob = fed.client("bob").await.unwrap();
    for (action, body) in [
        (
            ACTION_USER_ADD,
            json!({"name": "eve", "role": "officer", "password": "0123456789abcdef"}),
        ),
        (ACTION_USER_DISABLE, json!({"name": "alice"})),
        (ACTION_USER_LIST, json!({})),
        (
            ACTION_BUDGET_GRANT,
            json!({"name": "bob", "epsilon": 100.0}),
        ),
        (ACTION_BUDGET_LIST, json!({})),
    ] {
        let (c, m) = code(bob.action_with_body(action, Some(&body)).await);
        assert_eq!(c, Code::PermissionDenied, "{action}: {m}");
    }
    assert!(FedqClient::connect(&url, "eve", "0123456789abcdef")
        .await
        .is_err());

    // The officer adds carol; carol logs in with her password, gets a budget, queries.
    let mut olivia = fed.client("olivia").await.unwrap();
    let carol_pw = "carols-long-password";
    olivia
        .action_with_body(
            ACTION_USER_ADD,
            Some(&json!({"name": "carol", "role": "researcher", "password": carol_pw})),
        )
        .await
        .unwrap();
    let (c, m) = code(
        olivia
            .action_with_body(
                ACTION_USER_ADD,
                Some(&json!({"name": "dave", "role": "researcher", "password": "short"})),
            )
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    olivia
        .action_with_body(
            ACTION_BUDGET_GRANT,
            Some(&json!({"name": "carol", "epsilon": 3.0})),
        )
        .await
        .unwrap();
    let mut carol = FedqClient::connect(&url, "carol", carol_pw).await.unwrap();
    carol
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();
    // An officer's login runs no query.
    let (c, _) = code(olivia.query("SELECT COUNT(*) FROM participants").await);
    assert_eq!(c, Code::PermissionDenied);

    // Disabling bob: his live token stops working at once, and he cannot log in again.
    olivia
        .action_with_body(ACTION_USER_DISABLE, Some(&json!({"name": "bob"})))
        .await
        .unwrap();
    let (c, m) = code(bob.query("SELECT COUNT(*) FROM participants").await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    let bob_pw = fed.password("bob").unwrap();
    let (c, m) = code(FedqClient::connect(&url, "bob", &bob_pw).await.map(|_| ()));
    assert_eq!(c, Code::Unauthenticated, "{m}");
    assert!(m.contains("disabled"), "{m}");
    let users = olivia.action(ACTION_USER_LIST).await.unwrap();
    let bob_row = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "bob")
        .unwrap();
    assert_eq!(bob_row["disabled"], true);
    assert!(
        !users.to_string().contains("argon2"),
        "no hashes in the list"
    );

    // Audited; no password or token is ever written to the ledger.
    let ledger = fed.coordinator.engine.ledger();
    assert!(ledger.verify().unwrap().ok());
    let path = ledger.path().to_path_buf();
    fed.shutdown().await.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    for ext in ["-wal"] {
        if let Ok(b) = std::fs::read(format!("{}{ext}", path.display())) {
            bytes.extend(b);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    for secret in [alice_pw.as_str(), carol_pw, bob_pw.as_str()] {
        assert!(!text.contains(secret), "a password is in the ledger file");
    }
    assert!(text.contains("user.disabled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_and_a_new_login_works() {
    let tmp = tempfile::tempdir().unwrap();
    let fed = federation(tmp.path(), Some(Duration::from_secs(1))).await;
    let url = fed.url();
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = login(channel, "alice", &fed.password("alice").unwrap())
        .await
        .unwrap();
    let mut alice = FedqClient::connect_with_token(&url, &token).await.unwrap();
    alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (c, m) = code(alice.query("SELECT COUNT(*) FROM specimens").await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    assert!(m.contains("expired"), "{m}");
    let mut again = fed.client("alice").await.unwrap();
    again.query("SELECT COUNT(*) FROM specimens").await.unwrap();
    fed.shutdown().await.unwrap();
}

/// The audit entries of `kind` in the federation's ledger (read while it runs).
fn audited(dir: &std::path::Path, kind: &str) -> Vec<serde_json::Value> {
    let path = dir.join("ledger.sqlite");
    let conn = fedq_coordinator::audit::open_read_only(&path).unwrap();
    fedq_coordinator::audit::read_rows(&conn, &path)
        .unwrap()
        .into_iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.entry).unwrap())
        .filter(|e| e["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_guessing_is_held_back_then_locked_until_an_officer_unlocks_it_and_audited() {
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 400, 31);
    let policy = LoginPolicy {
        free_failures: 2,
        lockout_failures: 5,
        backoff_base_ms: 300,
        max_backoff_secs: 1,
    };
    let fed = LocalFederation::start(
        tmp.path(),
        FederationOptions {
            login: Some(policy),
            ..Default::default()
        },
    )
    .await
    .expect("federation");
    let url = fed.url();
    let pw = fed.password("alice").unwrap();
    let wrong = || async {
        code(
            FedqClient::connect(&url, "alice", "guess")
                .await
                .map(|_| ()),
        )
    };
    let right = || async { FedqClient::connect(&url, "alice", &pw).await.map(|_| ()) };
    let wait_out = || tokio::time::sleep(Duration::from_millis(1100));

    // Two free failures, then a counted one: the next attempt is held back, even with the
    // right password (it is not checked), and from this address for any name.
    for _ in 0..3 {
        let (c, m) = wrong().await;
        assert_eq!(c, Code::Unauthenticated);
        assert!(m.contains("wrong user name or password"), "{m}");
    }
    let (c, m) = code(right().await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    assert!(
        m.contains("too many failed logins") && m.contains("try again in"),
        "{m}"
    );
    let (c, m) = code(FedqClient::connect(&url, "bob", "x").await.map(|_| ()));
    assert_eq!(c, Code::Unauthenticated, "{m}");
    assert!(m.contains("too many failed logins"), "{m}");
    // After the back-off the right password works, and the counts start again.
    wait_out().await;
    right()
        .await
        .expect("the right password after the back-off");

    // Five failures in a row lock the name: the right password no longer opens it.
    for _ in 0..5 {
        wait_out().await;
        let (_, m) = wrong().await;
        assert!(m.contains("wrong user name or password"), "{m}");
    }
    wait_out().await;
    let (c, m) = code(right().await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    assert!(
        m.contains("locked") && m.contains("fedq user unlock --name alice"),
        "{m}"
    );

    // An officer lifts it; a researcher cannot.
    let mut alice_token_less = FedqClient::connect(&url, "bob", &fed.password("bob").unwrap())
        .await
        .unwrap();
    let (c, _) = code(
        alice_token_less
            .action_with_body(ACTION_USER_UNLOCK, Some(&json!({"name": "alice"})))
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    let mut olivia = fed.client("olivia").await.unwrap();
    let v = olivia
        .action_with_body(ACTION_USER_UNLOCK, Some(&json!({"name": "alice"})))
        .await
        .unwrap();
    assert_eq!(v["unlocked"], true);
    right().await.expect("the right password after the unlock");

    // A name with a newline and a terminal escape is audited escaped.
    let (c, _) = code(
        FedqClient::connect(&url, "eve\nINFO login ok\u{1b}[2J", "x")
            .await
            .map(|_| ()),
    );
    assert_eq!(c, Code::Unauthenticated);

    let failed = audited(tmp.path(), "login.failed");
    assert_eq!(
        failed.len(),
        3 + 5 + 1,
        "each checked failure is audited once"
    );
    assert!(failed.iter().all(|e| e["body"]["client"] == "127.0.0.1"));
    assert_eq!(failed[2]["body"]["held_back_secs"], 1);
    assert_eq!(failed[7]["body"]["locked"], true);
    assert_eq!(failed[7]["body"]["failures"], 5);
    let eve = failed[8]["body"]["user"].as_str().unwrap();
    assert_eq!(eve, "eve\\nINFO login ok\\u{1b}[2J");
    assert!(!eve.contains('\n') && !eve.contains('\u{1b}'));
    let unlocked = audited(tmp.path(), "login.unlocked");
    assert_eq!(unlocked.len(), 1);
    assert_eq!(unlocked[0]["actor"], "olivia");
    assert_eq!(unlocked[0]["body"]["lifted"], true);
    assert!(
        fedq_coordinator::audit::verify(&tmp.path().join("ledger.sqlite"), None)
            .unwrap()
            .ok()
    );
}
