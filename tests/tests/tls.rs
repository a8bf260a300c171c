//! mTLS between the coordinator and the nodes: a node answers only a client whose
//! certificate chains to the federation CA and names an allowed coordinator; the
//! coordinator answers only from a node whose certificate chains to the CA and names the
//! site it meant to reach.

use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::Action;
use fedq_coordinator::config::{NodeEndpoint, NodeTransport};
use fedq_coordinator::fanout::NodePool;
use fedq_node::NodeConfig;
use fedq_synth::certs::DevCa;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Ask a node for its info over a channel built from `tls` (or plaintext if `None`).
/// The node's answer to `ListActions` (the action names), or its refusal.
async fn list_actions(addr: &str, tls: ClientTlsConfig) -> Result<Vec<String>, tonic::Status> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let mut s = FlightServiceClient::new(channel)
        .list_actions(arrow_flight::Empty {})
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(a) = s.message().await? {
        names.push(a.r#type);
    }
    Ok(names)
}

async fn node_info(addr: &str, tls: Option<ClientTlsConfig>) -> Result<String, tonic::Status> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(t) = tls {
        ep = ep.tls_config(t).unwrap();
    }
    let channel = ep
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let mut client = FlightServiceClient::new(channel);
    let mut s = client
        .do_action(Action::new(fedq_common::wire::ACTION_NODE_INFO, ""))
        .await?
        .into_inner();
    let first = s.message().await?.expect("an answer");
    Ok(String::from_utf8(first.body.to_vec()).unwrap())
}

fn pem(dir: &std::path::Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join(format!("{name}.pem"))).unwrap(),
        std::fs::read(dir.join(format!("{name}.key"))).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_only_allowed_coordinators_with_a_federation_certificate() {
    fedq_node::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 300, 5);
    let certs = tmp.path().join("certs");
    let mut cfg = NodeConfig::load(&tmp.path().join("sites/site01/node.toml")).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    assert!(matches!(
        cfg.transport,
        fedq_node::NodeTransport::Tls { .. }
    ));
    let node = fedq_node::start(cfg).await.unwrap();
    let addr = node.addr.to_string();
    let ca = Certificate::from_pem(std::fs::read(certs.join("ca.pem")).unwrap());
    let with = |ident: Option<(Vec<u8>, Vec<u8>)>, ca: Certificate| {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name("site01");
        if let Some((c, k)) = ident {
            t = t.identity(Identity::from_pem(c, k));
        }
        t
    };

    // The real coordinator's certificate: answered.
    let info = node_info(
        &addr,
        Some(with(Some(pem(&certs, "coordinator")), ca.clone())),
    )
    .await
    .expect("the allowed coordinator is answered");
    assert!(info.contains("site01"), "{info}");

    // No client certificate: the TLS handshake fails.
    let e = node_info(&addr, Some(with(None, ca.clone())))
        .await
        .expect_err("no client certificate must be refused");
    assert_ne!(e.code(), tonic::Code::Ok);

    // Plaintext to a TLS node.
    node_info(&addr, None)
        .await
        .expect_err("plaintext must be refused");

    // A certificate named `coordinator` from another CA.
    let other = tempfile::tempdir().unwrap();
    let rogue = DevCa::generate("rogue CA").unwrap();
    rogue.issue_to(other.path(), "coordinator", &[]).unwrap();
    let e = node_info(
        &addr,
        Some(with(Some(pem(other.path(), "coordinator")), ca.clone())),
    )
    .await
    .expect_err("a certificate from another CA must be refused");
    assert_ne!(e.code(), tonic::Code::Ok);

    // A certificate from the federation CA whose name is not on the allow-list (here:
    // another site's certificate, and a freshly issued `intruder`).
    let fed_ca = DevCa::load(&certs).unwrap();
    fed_ca.issue_to(other.path(), "intruder", &[]).unwrap();
    for name in ["intruder"] {
        let e = node_info(&addr, Some(with(Some(pem(other.path(), name)), ca.clone())))
            .await
            .expect_err("a name that is not allowed must be refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
        assert!(
            e.message().contains("allowed_coordinators"),
            "{}",
            e.message()
        );
    }
    // Nothing else is answered either, not even the list of actions.
    let e = list_actions(&addr, with(Some(pem(other.path(), "intruder")), ca.clone()))
        .await
        .expect_err("ListActions is refused to a caller off the allow-list");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(!e.message().contains(fedq_common::wire::ACTION_NODE_INFO));
    let allowed = list_actions(&addr, with(Some(pem(&certs, "coordinator")), ca.clone()))
        .await
        .expect("the allowed coordinator may list the actions");
    assert_eq!(
        allowed,
        vec![fedq_common::wire::ACTION_NODE_INFO.to_string()]
    );
    let e = node_info(&addr, Some(with(Some(pem(&certs, "site02")), ca.clone())))
        .await
        .expect_err("another site's certificate is not a coordinator's");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());

    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_accepts_only_the_node_certificate_of_the_site_it_asked() {
    fedq_node::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 300, 6);
    let coord =
        fedq_coordinator::CoordinatorConfig::load(&tmp.path().join("coordinator.toml")).unwrap();
    assert!(matches!(coord.node_transport, NodeTransport::Tls(_)));

    // site02's node, reached as if it were site01: its certificate names site02.
    let mut cfg = NodeConfig::load(&tmp.path().join("sites/site02/node.toml")).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let site02 = fedq_node::start(cfg).await.unwrap();

    // site01's data served with a certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    let rogue = DevCa::generate("rogue CA").unwrap();
    rogue.issue_to(other.path(), "site01", &[]).unwrap();
    let mut cfg = NodeConfig::load(&tmp.path().join("sites/site01/node.toml")).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    if let fedq_node::NodeTransport::Tls { pem, .. } = &mut cfg.transport {
        pem.cert = std::fs::read(other.path().join("site01.pem")).unwrap();
        pem.key = std::fs::read(other.path().join("site01.key")).unwrap();
    }
    let rogue_node = fedq_node::start(cfg).await.unwrap();

    let ep = |site: &str, addr: std::net::SocketAddr| NodeEndpoint {
        site: site.into(),
        endpoint: format!("https://{addr}"),
        tls_name: None,
    };
    let pool = NodePool::new(
        &[
            ep("site01", site02.addr),
            ep("site02", site02.addr),
            // Named as the certificate is, so only the CA differs.
            NodeEndpoint {
                tls_name: Some("site01".into()),
                ..ep("site03", rogue_node.addr)
            },
        ],
        Duration::from_secs(10),
        &coord.node_transport,
    )
    .unwrap();
    let infos = pool.info().await;
    assert!(
        infos[0].1.is_err(),
        "site02's certificate accepted for site01: {:?}",
        infos[0]
    );
    assert_eq!(infos[1].1.as_ref().unwrap().site, "site02");
    assert!(
        infos[2].1.is_err(),
        "a certificate from another CA accepted: {:?}",
        infos[2]
    );
    // A refusal by TLS says so, naming what to check.
    for (site, r) in [&infos[0], &infos[2]] {
        let why = r.as_ref().unwrap_err();
        assert!(
            why.starts_with("TLS refused the connection"),
            "{site}: {why}"
        );
        assert!(why.contains("federation CA"), "{site}: {why}");
    }
    site02.shutdown().await.unwrap();
    rogue_node.shutdown().await.unwrap();
}

/// TLS on the researcher endpoint (`[researcher_tls]` in coordinator.toml): `fedq`'s client
/// connects with the federation CA over `https://` or ADBC's `grpc+tls://`; plaintext,
/// a missing CA and another CA are each refused before any credentials are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_researcher_endpoint_serves_tls_with_the_configured_certificate() {
    use fedq::client::FedqClient;
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 1, 300, 6);
    let coordinator_toml = tmp.path().join("coordinator.toml");
    let mut text = std::fs::read_to_string(&coordinator_toml).unwrap();
    text.push_str(
        "\n[researcher_tls]\ncert = \"certs/coordinator.pem\"\nkey = \"certs/coordinator.key\"\n",
    );
    std::fs::write(&coordinator_toml, text).unwrap();
    let fed = fedq_tests::start(tmp.path()).await;
    assert!(fed.url().starts_with("https://"), "{}", fed.url());

    let mut alice = fed.client("alice").await.unwrap();
    let r = alice
        .query("SELECT COUNT(*) FROM participants")
        .await
        .unwrap();
    assert_eq!(r.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);

    let ca = fed.ca().unwrap();
    let password = fed.password("alice").unwrap();
    let addr = fed.coordinator.addr;
    let grpc_tls = format!("grpc+tls://{addr}");
    FedqClient::connect_with_ca(&grpc_tls, Some(&ca), "alice", &password)
        .await
        .expect("grpc+tls:// with the CA");

    let err = |r: Result<FedqClient, fedq::CliError>| match r {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    // Plaintext to a TLS endpoint.
    let e = err(FedqClient::connect(&format!("http://{addr}"), "alice", &password).await);
    assert!(!e.is_empty());
    // TLS without a CA: says what to pass.
    let e = err(FedqClient::connect_with_ca(&grpc_tls, None, "alice", &password).await);
    assert!(e.contains("--ca"), "{e}");
    // A certificate from another CA is not trusted.
    let rogue = DevCa::generate("rogue CA").unwrap();
    let e = err(FedqClient::connect_with_ca(
        &grpc_tls,
        Some(rogue.cert_pem.as_bytes()),
        "alice",
        &password,
    )
    .await);
    assert!(!e.is_empty());
    fed.shutdown().await.unwrap();
}

/// A caller that TLS itself refuses (a certificate from another CA, or none) never reaches
/// the service; the node logs the refusal with the caller's address. Current-thread
/// runtime: the node's tasks run on this thread, so the test's log subscriber sees them.
#[tokio::test]
async fn a_caller_refused_by_tls_is_logged_with_its_address() {
    fedq_node::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 1, 300, 5);
    let certs = tmp.path().join("certs");
    let other = tempfile::tempdir().unwrap();
    let rogue = DevCa::generate("rogue CA").unwrap();
    rogue.issue_to(other.path(), "coordinator", &[]).unwrap();

    let (logs, _guard) = fedq_tests::Captured::install();
    tracing::callsite::rebuild_interest_cache();

    let mut cfg = NodeConfig::load(&tmp.path().join("sites/site01/node.toml")).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let node = fedq_node::start(cfg).await.unwrap();
    let addr = node.addr.to_string();
    let ca = Certificate::from_pem(std::fs::read(certs.join("ca.pem")).unwrap());
    let tls = |ident: Option<(Vec<u8>, Vec<u8>)>| {
        let t = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("site01");
        match ident {
            Some((c, k)) => t.identity(Identity::from_pem(c, k)),
            None => t,
        }
    };
    for (what, ident) in [
        ("another CA", Some(pem(other.path(), "coordinator"))),
        ("no certificate", None),
    ] {
        let before = logs.text().matches("caller refused by TLS").count();
        let e = node_info(&addr, Some(tls(ident))).await.expect_err(what);
        assert_ne!(e.code(), tonic::Code::Ok, "{what}");
        let mut text = logs.text();
        for _ in 0..50 {
            if text.matches("caller refused by TLS").count() > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            text = logs.text();
        }
        let line = text
            .lines()
            .filter(|l| l.contains("caller refused by TLS"))
            .nth(before)
            .unwrap_or_else(|| panic!("{what}: no TLS refusal logged in:\n{text}"));
        assert!(
            line.contains("peer=127.0.0.1:"),
            "{what}: no address: {line}"
        );
        assert!(line.contains("outcome=\"refused\""), "{line}");
        assert!(
            line.contains("site=\"site01\"") || line.contains("site=site01"),
            "{line}"
        );
    }
    // The real coordinator still gets through the same listener.
    node_info(&addr, Some(tls(Some(pem(&certs, "coordinator")))))
        .await
        .expect("the allowed coordinator is answered");
    node.shutdown().await.unwrap();
}
