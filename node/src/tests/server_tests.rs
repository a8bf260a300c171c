//! Tests through the real Flight server on 127.0.0.1:0.

use std::net::SocketAddr;

use arrow_flight::client::FlightClient;
use arrow_flight::error::FlightError;
use arrow_flight::{Action, FlightDescriptor, Ticket};
use fedq_common::wire::ACTION_NODE_INFO;
use fedq_common::{AggregateRequest, BinaryOp, Literal, NodeInfo};
use futures::{StreamExt, TryStreamExt};
use tonic::{Code, Status};

use super::*;
use crate::{start, NodeEngine};

async fn client(addr: SocketAddr) -> FlightClient {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    FlightClient::new(channel)
}

fn status_of(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

/// DoGet a raw ticket; returns the batches received and the error status, if any.
async fn get(addr: SocketAddr, ticket: Vec<u8>) -> (Vec<RecordBatch>, Option<Status>) {
    let mut c = client(addr).await;
    let mut stream = match c.do_get(Ticket::new(ticket)).await {
        Ok(s) => s,
        Err(e) => return (vec![], Some(status_of(e))),
    };
    let mut got = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => got.push(b),
            Err(e) => return (got, Some(status_of(e))),
        }
    }
    (got, None)
}

async fn expect_status(addr: SocketAddr, ticket: Vec<u8>, code: Code, needle: &str) {
    let (batches, status) = get(addr, ticket).await;
    assert!(batches.is_empty(), "a refused request returned batches");
    let s = status.expect("expected an error status");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(needle),
        "{needle:?} not in {:?}",
        s.message()
    );
}

#[tokio::test]
async fn flight_do_get_answers_and_refuses_with_status_codes() {
    let fx = Fixture::new();
    let config = fx.config();
    let engine = NodeEngine::new(&config).await.unwrap();
    let node = start(config).await.unwrap();
    assert_ne!(node.addr.port(), 0);
    let addr = node.addr;

    // A good request returns the same answer as the engine.
    let req = request(
        "labs",
        &["test"],
        vec![AggregateRequest::CountRows, sum("value", 0.0, 100.0, 0.01)],
        100,
        None,
    );
    let (batches, status) = get(addr, req.encode_ticket().unwrap()).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        rows(&batches, 1),
        rows(&engine.execute(&req).await.unwrap(), 1)
    );
    assert_eq!(
        rows(&batches, 1),
        vec![
            keyed(&["HbA1c"], &[3, 11175]),
            keyed(&["LDL"], &[2, 10333]),
            keyed(&["glucose"], &[2, 0]),
        ]
    );

    // Malformed bytes.
    expect_status(
        addr,
        b"SELECT * FROM labs".to_vec(),
        Code::InvalidArgument,
        "not a valid",
    )
    .await;
    // Wrong protocol version.
    let mut v: serde_json::Value = serde_json::from_slice(&req.encode_ticket().unwrap()).unwrap();
    v["protocol_version"] = 99.into();
    expect_status(
        addr,
        serde_json::to_vec(&v).unwrap(),
        Code::InvalidArgument,
        "protocol version",
    )
    .await;
    // Unknown fields (e.g. an attempt to ask for rows).
    let mut v: serde_json::Value = serde_json::from_slice(&req.encode_ticket().unwrap()).unwrap();
    v["request"]["return_rows"] = true.into();
    expect_status(
        addr,
        serde_json::to_vec(&v).unwrap(),
        Code::InvalidArgument,
        "return_rows",
    )
    .await;
    // Over the ticket size limit, and over the transport limit.
    expect_status(addr, vec![b' '; 100 * 1024], Code::InvalidArgument, "limit").await;
    let (batches, status) = get(addr, vec![b' '; 2 * 1024 * 1024]).await;
    assert!(batches.is_empty());
    assert!(status.is_some());

    let count = || vec![AggregateRequest::CountRows];
    let t = |r: PartialAggregateRequest| r.encode_ticket().unwrap();
    expect_status(
        addr,
        t(request("nope", &[], count(), 1, None)),
        Code::PermissionDenied,
        "unknown table",
    )
    .await;
    expect_status(
        addr,
        t(request("labs", &[], vec![count_nn("weight")], 1, None)),
        Code::PermissionDenied,
        "unknown column",
    )
    .await;
    expect_status(
        addr,
        t(request("labs", &[], count(), 1000, None)),
        Code::PermissionDenied,
        "max_rows_per_unit",
    )
    .await;
    expect_status(
        addr,
        t(request(
            "labs",
            &[],
            vec![sum("value", 0.0, 1e6, 0.01)],
            1,
            None,
        )),
        Code::PermissionDenied,
        "wider",
    )
    .await;
    expect_status(
        addr,
        t(request("labs", &["code"], count(), 1, None)),
        Code::PermissionDenied,
        "public domain",
    )
    .await;
    expect_status(
        addr,
        t(request("labs", &["pid"], count(), 1, None)),
        Code::PermissionDenied,
        "privacy unit",
    )
    .await;
    let div0 = bin(
        BinaryOp::Gt,
        bin(BinaryOp::Divide, col("year"), lit(Literal::Int64(0))),
        lit(Literal::Int64(1)),
    );
    expect_status(
        addr,
        t(request("labs", &[], count(), 1, Some(div0))),
        Code::InvalidArgument,
        "division",
    )
    .await;

    // A data-dependent failure (the file changed under the node): generic message, no
    // data, no batch.
    fx.break_csv();
    let (batches, status) = get(
        addr,
        t(request(
            "broken",
            &[],
            vec![sum("n", 0.0, 10.0, 1.0)],
            1,
            None,
        )),
    )
    .await;
    assert!(batches.is_empty());
    let s = status.expect("expected an error");
    assert_eq!(s.code(), Code::Internal);
    assert_eq!(
        s.message(),
        "node site01 could not execute query q-test; details are in the node log"
    );
    assert!(!s.message().contains("oops"));

    // Node info and the action list.
    let mut c = client(addr).await;
    let bodies: Vec<_> = c
        .do_action(Action::new(ACTION_NODE_INFO, ""))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(bodies.len(), 1);
    let info: NodeInfo = serde_json::from_slice(&bodies[0]).unwrap();
    assert_eq!(info, engine.info());
    assert_eq!(info.fedq_version, env!("CARGO_PKG_VERSION"));
    let actions: Vec<_> = c.list_actions().await.unwrap().try_collect().await.unwrap();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].r#type, ACTION_NODE_INFO);

    // Everything else is unimplemented.
    let e = c
        .get_flight_info(FlightDescriptor::new_cmd("SELECT * FROM labs"))
        .await
        .unwrap_err();
    assert_eq!(status_of(e).code(), Code::Unimplemented);
    let e = match c.do_action(Action::new("drop_table", "")).await {
        Ok(mut s) => s.next().await.unwrap().unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(status_of(e).code(), Code::Unimplemented);
    drop(c);

    node.shutdown().await.unwrap();
    assert!(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .is_err(),
        "the server still accepts connections after shutdown"
    );
}

/// The failure stage a status carries (`fedq-failure-stage`).
fn stage(s: &Status) -> Option<String> {
    s.metadata()
        .get(fedq_common::outcome::FAILURE_STAGE_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Every error status says whether the node had read data: refusals of the request itself
/// (undecodable, invalid, outside the catalog, a LIKE pattern that cannot compile) are
/// `before-data`, which the coordinator may refund; a failure while reading is
/// `after-data`.
#[tokio::test]
async fn every_error_status_says_whether_the_node_had_read_data() {
    let fx = Fixture::new();
    let node = start(fx.config()).await.unwrap();
    let addr = node.addr;
    let t = |r: PartialAggregateRequest| r.encode_ticket().unwrap();
    let count = || vec![AggregateRequest::CountRows];
    let long_like = Predicate::Like {
        input: Box::new(col("code")),
        pattern: "_".repeat(20_000),
        negated: false,
        case_insensitive: true,
    };
    let refusals = [
        (b"SELECT * FROM labs".to_vec(), Code::InvalidArgument),
        (
            t(request("nope", &[], count(), 1, None)),
            Code::PermissionDenied,
        ),
        (
            t(request("labs", &[], count(), 1000, None)),
            Code::PermissionDenied,
        ),
        (
            t(request("labs", &[], count(), 1, Some(long_like))),
            Code::InvalidArgument,
        ),
    ];
    for (ticket, code) in refusals {
        let (batches, status) = get(addr, ticket).await;
        assert!(batches.is_empty());
        let s = status.expect("a refusal");
        assert_eq!(s.code(), code, "{s:?}");
        assert_eq!(stage(&s).as_deref(), Some("before-data"), "{s:?}");
    }
    // A failure while reading (the file changed under the node and a value no longer
    // parses): after data.
    fx.break_csv();
    let (batches, status) = get(
        addr,
        t(request(
            "broken",
            &[],
            vec![sum("n", 0.0, 10.0, 1.0)],
            1,
            None,
        )),
    )
    .await;
    assert!(batches.is_empty());
    let s = status.expect("a failure");
    assert_eq!(s.code(), Code::Internal);
    assert_eq!(stage(&s).as_deref(), Some("after-data"), "{s:?}");
    node.shutdown().await.unwrap();
}

/// A node with no free query slot refuses with `RESOURCE_EXHAUSTED`, before reading; an
/// invalid request is refused at once, even while the node is busy, since validation runs
/// before a request waits for a slot.
#[tokio::test]
async fn a_busy_node_refuses_before_reading_and_validates_before_waiting() {
    use crate::config::NodeLimits;
    use crate::server::{Access, NodeService};
    let fx = Fixture::new();
    let engine = std::sync::Arc::new(NodeEngine::new(&fx.config()).await.unwrap());
    let limits = NodeLimits {
        query_timeout: std::time::Duration::from_secs(1),
        max_concurrent_queries: 1,
        ..NodeLimits::default()
    };
    let svc = NodeService::with_limits(engine, Access::InsecureDev, limits);
    let held = svc.slot().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.clone().into_server())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let ok = request("labs", &[], vec![AggregateRequest::CountRows], 100, None);
    let (_, status) = get(addr, ok.encode_ticket().unwrap()).await;
    let s = status.expect("busy");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("busy"), "{}", s.message());
    assert_eq!(stage(&s).as_deref(), Some("before-data"));
    let bad = request("nope", &[], vec![AggregateRequest::CountRows], 1, None);
    let started = std::time::Instant::now();
    let (_, status) = get(addr, bad.encode_ticket().unwrap()).await;
    let s = status.expect("refused");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(stage(&s).as_deref(), Some("before-data"));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(900),
        "the invalid request waited for a slot"
    );
    drop(held);
    let (batches, status) = get(addr, ok.encode_ticket().unwrap()).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(rows(&batches, 0), vec![keyed(&[], &[9])]);
    server.abort();
}
