//! Hand-crafted requests sent straight to a synthetic hospital node, bypassing the
//! coordinator: the node refuses each one itself and never returns a row.

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::Ticket;
use fedq_node::NodeConfig;
use serde_json::json;
use tonic::Code;

fn ticket(request: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({ "protocol_version": fedq_common::PROTOCOL_VERSION, "request": request }),
    )
    .unwrap()
}

fn base() -> serde_json::Value {
    json!({
        "query_id": "hostile-1",
        "table": "labs",
        "group_by": [],
        "aggregates": [{ "kind": "count_rows" }],
        "max_rows_per_unit": 20
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_crafted_requests_and_never_returns_rows() {
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 500, 3);
    let mut cfg = NodeConfig::load(&tmp.path().join("sites/site01/node.toml")).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let node = fedq_node::start(cfg).await.unwrap();
    // Even with the coordinator's valid certificate, crafted requests are refused.
    let channel = fedq_tests::node_channel(tmp.path(), node.addr, "site01", "coordinator").await;
    let mut client = FlightServiceClient::new(channel);

    let mut cases: Vec<(&str, Vec<u8>, Code, &str)> = Vec::new();
    let mut r = base();
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "name": "value" }, "lower": -1e12, "upper": 1e12, "precision": 0.01 }]);
    cases.push((
        "clamp wider than the catalog (unbounded sum)",
        ticket(r),
        Code::PermissionDenied,
        "bound",
    ));
    let mut r = base();
    r["table"] = json!("diagnoses");
    r["max_rows_per_unit"] = json!(15);
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "name": "code" }, "lower": 0.0, "upper": 1.0, "precision": 1.0 }]);
    cases.push((
        "sum of a text column without bounds",
        ticket(r),
        Code::InvalidArgument,
        "code",
    ));
    let mut r = base();
    r["aggregates"] = json!([{ "kind": "raw_values", "column": "value" }]);
    cases.push((
        "raw column values",
        ticket(r),
        Code::InvalidArgument,
        "raw_values",
    ));
    let mut r = base();
    r["return_rows"] = json!(true);
    cases.push((
        "an extra 'return rows' field",
        ticket(r),
        Code::InvalidArgument,
        "return_rows",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "column", "column": { "name": "pid" } }]);
    cases.push((
        "group by the participant id",
        ticket(r),
        Code::PermissionDenied,
        "pid",
    ));
    // Joins: only on both privacy units, at most MAX_JOINS tables, R of the driving table.
    let join = |table: &str, left_on: &str, right_on: &str| {
        let mut r = base();
        r["joins"] = json!([{ "table": table, "left_on": left_on, "right_on": right_on }]);
        r
    };
    cases.push((
        "a join off the privacy unit",
        ticket(join("participants", "test", "sex")),
        Code::PermissionDenied,
        "privacy units",
    ));
    let mut r = join("participants", "pid", "pid");
    r["joins"][0]["on"] = json!({ "expr": "in_set", "side": 1, "negated": false,
        "set": { "set": "rows", "table": "diagnoses", "min_rows": 1 } });
    cases.push((
        "a participant set in a join's ON",
        ticket(r),
        Code::InvalidArgument,
        "ON condition cannot test participant sets",
    ));
    let mut r = base();
    r["computed"] = json!([{ "name": "value", "value": { "expr": "literal", "value": { "type": "int64", "value": 1 } } }]);
    cases.push((
        "a computed column named like a catalog column",
        ticket(r),
        Code::InvalidArgument,
        "has the name of another column",
    ));
    let mut r = base();
    r["computed"] = json!([{ "name": "e", "value": { "expr": "column", "name": "test" } }]);
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "name": "e" }, "lower": 0.0, "upper": 1.0, "precision": 1.0 }]);
    cases.push((
        "a computed column of text",
        ticket(r),
        Code::InvalidArgument,
        "not a number",
    ));
    let mut r = base();
    r["computed"] = json!([{ "name": "e", "value": { "expr": "binary", "op": "multiply",
        "left": { "expr": "column", "name": "value" }, "right": { "expr": "literal", "value": { "type": "int64", "value": 2 } } } }]);
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "name": "e" }, "lower": 0.0, "upper": 2000.0, "precision": 0.01 }]);
    cases.push((
        "a computed sum with bounds wider than the expression's",
        ticket(r),
        Code::PermissionDenied,
        "wider than the catalog",
    ));
    let mut r = join("participants", "pid", "pid");
    r["group_by"] = json!([{ "key": "column", "column": { "side": 1, "name": "pid" } }]);
    cases.push((
        "group by the joined table's participant id",
        ticket(r),
        Code::PermissionDenied,
        "pid",
    ));
    let mut r = join("participants", "pid", "pid");
    r["max_rows_per_unit"] = json!(21);
    cases.push((
        "R above the driving table's",
        ticket(r),
        Code::PermissionDenied,
        "max_rows_per_unit",
    ));
    let mut r = join("participants", "pid", "pid");
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "side": 1, "name": "birth_year" }, "lower": 0.0, "upper": 1e6, "precision": 1.0 }]);
    cases.push((
        "a joined column clamped wider than the catalog",
        ticket(r),
        Code::PermissionDenied,
        "wider than the catalog",
    ));
    let mut r = join("participants", "pid", "pid");
    r["joins"] = json!([
        { "table": "participants", "left_on": "pid", "right_on": "pid" },
        { "table": "participants", "left_on": "pid", "right_on": "pid" },
        { "table": "participants", "left_on": "pid", "right_on": "pid" },
        { "table": "participants", "left_on": "pid", "right_on": "pid" },
        { "table": "participants", "left_on": "pid", "right_on": "pid" }
    ]);
    cases.push((
        "more joined tables than MAX_JOINS",
        ticket(r),
        Code::InvalidArgument,
        "joined tables; the limit is 4",
    ));
    let mut r = join("participants", "pid", "pid");
    r["filter"] =
        json!({ "expr": "is_null", "input": { "expr": "column", "name": "sex", "side": 2 } });
    cases.push((
        "a column of a side the request does not join",
        ticket(r),
        Code::InvalidArgument,
        "which joins 1",
    ));
    cases.push((
        "an old protocol version",
        serde_json::to_vec(&json!({ "protocol_version": 1, "request": base() })).unwrap(),
        Code::InvalidArgument,
        // Names both versions.
        &*Box::leak(
            format!(
                "protocol version mismatch: peer speaks v1, this build speaks v{}",
                fedq_common::PROTOCOL_VERSION
            )
            .into_boxed_str(),
        ),
    ));
    let mut r = base();
    r["max_rows_per_unit"] = json!(1_000_000);
    cases.push((
        "excessive max_rows_per_unit",
        ticket(r),
        Code::PermissionDenied,
        "max_rows_per_unit",
    ));
    let mut r = base();
    r["table"] = json!("patients_raw");
    cases.push((
        "unknown table",
        ticket(r),
        Code::PermissionDenied,
        "patients_raw",
    ));
    cases.push((
        "SQL text instead of a typed request",
        b"SELECT * FROM labs".to_vec(),
        Code::InvalidArgument,
        "not a valid",
    ));
    let mut r = base();
    r["max_rows_per_unit"] = json!(u32::MAX);
    cases.push((
        "unbounded max_rows_per_unit",
        ticket(r),
        Code::PermissionDenied,
        "max_rows_per_unit",
    ));
    let mut r = base();
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "name": "value" }, "lower": 0.0, "upper": 501.0, "precision": 0.01 }]);
    cases.push((
        "clamp slightly wider than the catalog",
        ticket(r),
        Code::PermissionDenied,
        "bound",
    ));
    let mut r = base();
    r["aggregates"] = json!([{ "kind": "count_non_null", "column": { "name": "secret_notes" } }]);
    cases.push((
        "a column the catalog does not share",
        ticket(r),
        Code::PermissionDenied,
        "secret_notes",
    ));
    let mut r = base();
    r["group_by"] = json!(vec![
        json!({ "key": "column", "column": { "name": "test" } });
        5
    ]);
    cases.push((
        "too many group columns",
        ticket(r),
        Code::InvalidArgument,
        "group columns",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "column", "column": { "name": "value" } }]);
    cases.push((
        "a group key without a public domain (one group per value)",
        ticket(r),
        Code::PermissionDenied,
        "value",
    ));
    // Bucketed keys: the node derives the domain itself and refuses what it cannot bound.
    let mut r = base();
    r["group_by"] = json!([{ "key": "int_bucket", "column": { "name": "pid" }, "divisor": 10, "multiplier": 1 }]);
    cases.push((
        "a bucket of the participant id",
        ticket(r),
        Code::PermissionDenied,
        "privacy unit",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "int_bucket", "column": { "name": "value" }, "divisor": 10, "multiplier": 1 }]);
    cases.push((
        "an integer bucket of a float column",
        ticket(r),
        Code::InvalidArgument,
        "integer column",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "int_bucket", "column": { "name": "birth_year" }, "divisor": 10, "multiplier": 11 }]);
    r["table"] = json!("participants");
    r["max_rows_per_unit"] = json!(1);
    cases.push((
        "a bucket multiplier above its divisor (could overflow)",
        ticket(r),
        Code::InvalidArgument,
        "multiplier",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "case", "branches": [{ "when": { "expr": "column", "name": "value" }, "then": { "type": "utf8", "value": "x" } }], "otherwise": { "type": "utf8", "value": "y" } }]);
    cases.push((
        "a CASE whose condition is not boolean",
        ticket(r),
        Code::InvalidArgument,
        "boolean",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "case", "branches": [{ "when": { "expr": "literal", "value": { "type": "boolean", "value": true } }, "then": { "type": "utf8", "value": "x" } }], "otherwise": { "type": "null" } }]);
    cases.push((
        "a CASE with a NULL label",
        ticket(r),
        Code::InvalidArgument,
        "ELSE",
    ));
    let mut r = base();
    r["group_by"] = json!([{ "key": "column", "column": { "name": "test" } }, { "key": "sql", "text": "SELECT pid FROM labs" }]);
    cases.push((
        "a group key of an unknown form (SQL text)",
        ticket(r),
        Code::InvalidArgument,
        "not a valid",
    ));
    let mut r = base();
    r["aggregates"] = json!(vec![json!({ "kind": "count_rows" }); 65]);
    cases.push((
        "too many aggregates",
        ticket(r),
        Code::InvalidArgument,
        "aggregates",
    ));
    // A filter nested 40 levels (over the limit of 32) and one nested 2000 levels (past
    // the JSON decoder's recursion limit, still under the size limit): both refused,
    // neither overflows the node's stack. The tickets are written as text: a deep
    // serde_json::Value would overflow this test's own stack.
    for (what, depth, needle) in [
        ("a filter nested 40 levels", 40usize, "nested"),
        ("a filter nested 2000 levels", 2000, "recursion limit"),
    ] {
        let f = format!(
            "{}{}{}",
            r#"{"expr":"not","input":"#.repeat(depth),
            r#"{"expr":"column","name":"value"}"#,
            "}".repeat(depth)
        );
        let t = format!(
            r#"{{"protocol_version":{},"request":{{"query_id":"hostile-1","table":"labs","filter":{f},"group_by":[],"aggregates":[{{"kind":"count_rows"}}],"max_rows_per_unit":20}}}}"#,
            fedq_common::PROTOCOL_VERSION
        );
        assert!(
            t.len() < fedq_common::wire::MAX_REQUEST_BYTES,
            "{what}: too long to test depth"
        );
        cases.push((what, t.into_bytes(), Code::InvalidArgument, needle));
    }
    // Oversized tickets: above the wire limit, and far above the transport's.
    let mut r = base();
    r["query_id"] = json!("x".repeat(fedq_common::wire::MAX_REQUEST_BYTES));
    cases.push((
        "a ticket above the request size limit",
        ticket(r),
        Code::InvalidArgument,
        "limit",
    ));

    // Far larger than the node's gRPC message limit: cut off by the transport.
    let huge = vec![b' '; 4 * fedq_node::MAX_DECODING_MESSAGE_BYTES];
    match client.do_get(Ticket::new(huge)).await {
        Err(s) => assert!(
            matches!(
                s.code(),
                Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
            ),
            "oversized message: {s:?}"
        ),
        Ok(_) => panic!("an oversized message was answered"),
    }

    for (what, t, code, needle) in cases {
        match client.do_get(Ticket::new(t)).await {
            Err(s) => {
                assert_eq!(s.code(), code, "{what}: {}", s.message());
                assert!(s.message().contains(needle), "{what}: {}", s.message());
            }
            Ok(resp) => {
                // The status may arrive on the stream instead: it must carry no data.
                let mut stream = resp.into_inner();
                let first = stream.message().await;
                match first {
                    Err(s) => assert_eq!(s.code(), code, "{what}: {}", s.message()),
                    Ok(m) => panic!("{what}: node answered with data: {m:?}"),
                }
            }
        }
    }
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_catalog_table_it_does_not_share() {
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 2, 300, 4);
    // This hospital shares only `labs`, although the catalog declares five tables.
    let p = tmp.path().join("sites/site01/node.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let cut = text.find("\n[tables.").unwrap();
    let shared = format!("{}\n[tables.labs]\npath = \"labs.parquet\"\n", &text[..cut]);
    std::fs::write(&p, shared).unwrap();
    let mut cfg = NodeConfig::load(&p).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    assert_eq!(cfg.tables.keys().collect::<Vec<_>>(), vec!["labs"]);
    let node = fedq_node::start(cfg).await.unwrap();
    let channel = fedq_tests::node_channel(tmp.path(), node.addr, "site01", "coordinator").await;
    let mut client = FlightServiceClient::new(channel);
    let mut r = base();
    r["table"] = json!("participants");
    r["max_rows_per_unit"] = json!(1);
    let s = match client.do_get(Ticket::new(ticket(r))).await {
        Err(s) => s,
        Ok(resp) => match resp.into_inner().message().await {
            Err(s) => s,
            Ok(m) => panic!("an unshared table was answered: {m:?}"),
        },
    };
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(s.message().contains("participants"), "{}", s.message());
    node.shutdown().await.unwrap();
}

/// The node's own policy (node.toml) narrows the catalog: `labs` shares only `test` and
/// `value`, R up to 10 (catalog 20), sums of `value` within [0, 300] (catalog [0, 500]).
/// Requests outside it are refused even though the catalog allows them, and each
/// refusal is logged with the coordinator's certificate name, the query id and the
/// reason. Current-thread runtime: the node's tasks run on this thread, so the
/// thread-local log capture sees them.
#[tokio::test]
async fn the_node_policy_refuses_what_the_hospital_does_not_share_and_logs_who_asked() {
    let tmp = tempfile::tempdir().unwrap();
    fedq_tests::synth(tmp.path(), 1, 300, 5);
    let node_toml = tmp.path().join("sites/site01/node.toml");
    let mut doc: toml::Table =
        toml::from_str(&std::fs::read_to_string(&node_toml).unwrap()).unwrap();
    let labs = doc["tables"]["labs"].as_table().cloned().unwrap();
    let mut labs = labs;
    labs.insert(
        "columns".into(),
        toml::Value::try_from(["test", "value"]).unwrap(),
    );
    labs.insert("max_rows_per_unit".into(), toml::Value::Integer(10));
    let clamp: toml::Table = toml::from_str("value = { lower = 0.0, upper = 300.0 }").unwrap();
    labs.insert("clamp".into(), toml::Value::Table(clamp));
    doc["tables"]
        .as_table_mut()
        .unwrap()
        .insert("labs".into(), toml::Value::Table(labs));
    std::fs::write(&node_toml, toml::to_string(&doc).unwrap()).unwrap();

    let (logs, _guard) = fedq_tests::Captured::install();

    let mut cfg = NodeConfig::load(&node_toml).unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let node = fedq_node::start(cfg).await.unwrap();
    let channel = fedq_tests::node_channel(tmp.path(), node.addr, "site01", "coordinator").await;
    let mut client = FlightServiceClient::new(channel);

    let mut cases: Vec<(&str, serde_json::Value, &str)> = Vec::new();
    let mut r = base();
    r["query_id"] = json!("policy-column");
    r["max_rows_per_unit"] = json!(10);
    r["aggregates"] = json!([{ "kind": "count_non_null", "column": { "name": "measured_on" } }]);
    cases.push((
        "a catalog column the node does not share",
        r,
        "column `measured_on` of table `labs` (in COUNT) is not shared by this node",
    ));
    let mut r = base();
    r["query_id"] = json!("policy-filter");
    r["max_rows_per_unit"] = json!(10);
    r["filter"] =
        json!({ "expr": "is_null", "input": { "expr": "column", "name": "measured_on" } });
    cases.push((
        "an unshared column in the filter",
        r,
        "`measured_on` of table `labs` (in the filter",
    ));
    let mut r = base();
    r["query_id"] = json!("policy-clamp");
    r["max_rows_per_unit"] = json!(10);
    r["aggregates"] = json!([{ "kind": "sum_fixed", "column": { "name": "value" }, "lower": 0.0, "upper": 400.0, "precision": 0.01 }]);
    cases.push((
        "a clamp within the catalog but wider than the node accepts",
        r,
        "bounds [0, 400] are wider than this node accepts, [0, 300]",
    ));
    let mut r = base();
    r["query_id"] = json!("policy-r");
    r["max_rows_per_unit"] = json!(15);
    cases.push((
        "R within the catalog's 20 but above the node's cap",
        r,
        "max_rows_per_unit 15 exceeds this node's cap of 10",
    ));
    for (what, req, needle) in &cases {
        let query_id = req["query_id"].as_str().unwrap();
        let logged = |text: &str| {
            text.lines()
                .find(|l| l.contains(&format!("query_id=\"{query_id}\"")))
                .map(str::to_string)
        };
        // Twice at most: this test's subscriber is scoped to its thread, and another test
        // thread registering the same log call site at the same moment can leave the call
        // site's cached interest stale (tracing's interest cache); rebuilt, it is current.
        let mut line = None;
        for _attempt in 0..2 {
            let status = match client.do_get(Ticket::new(ticket(req.clone()))).await {
                Ok(resp) => {
                    let mut s = resp.into_inner();
                    match futures::StreamExt::next(&mut s).await {
                        Some(Err(status)) => status,
                        other => panic!("{what}: the node answered ({other:?})"),
                    }
                }
                Err(status) => status,
            };
            assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{what}: {:?} lacks {needle:?}",
                status.message()
            );
            line = logged(&logs.text());
            if line.is_some() {
                break;
            }
            tracing::callsite::rebuild_interest_cache();
        }
        // The hospital's own record: who asked (the certificate's name), which query, why.
        let text = logs.text();
        let line = line.unwrap_or_else(|| panic!("{what}: no log line for {query_id} in:\n{text}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains("coordinator=coordinator"),
            "{what}: no caller identity: {line}"
        );
        assert!(line.contains("outcome=\"refused\""), "{line}");
        assert!(line.contains(needle), "{what}: no reason: {line}");
    }
    // Within the node's policy the same node answers.
    let mut r = base();
    r["max_rows_per_unit"] = json!(10);
    r["group_by"] = json!([{ "key": "column", "column": { "name": "test" } }]);
    r["aggregates"] = json!([{ "kind": "count_rows" }, { "kind": "sum_fixed", "column": { "name": "value" }, "lower": 0.0, "upper": 300.0, "precision": 0.01 }]);
    let resp = client.do_get(Ticket::new(ticket(r))).await.unwrap();
    let batches: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(resp.into_inner())
        .await
        .unwrap();
    assert!(!batches.is_empty());
    node.shutdown().await.unwrap();
}
