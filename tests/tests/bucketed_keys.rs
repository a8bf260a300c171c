//! Bucketed GROUP BY keys end to end: `CASE` labels, integer buckets (`birth_year / 10`,
//! `birth_year / 10 * 10`), date parts (`date_part`, `EXTRACT`) and `date_trunc`.
//!
//! - The pre-noise merged partials of each shape (one table, a join, and a date part that
//!   falls back to partition selection) equal DataFusion over the union of the site files.
//!   R is raised so that row bounding truncates nothing, which makes them exact. Years of a
//!   date with a declared range are public; without one they fall back to partition
//!   selection.
//! - Through Flight SQL, a bucketed query releases every bucket of the derived public
//!   domain (empty ones included), under the researcher's alias, and each noisy count lies
//!   within its discrete Laplace tail bound at 1e-12 of the exact count: 14 bounds, so a
//!   spurious failure has probability below 1e-10. EXPLAIN lists the buckets.
//! - Refusals: a CASE without ELSE, with a non-literal label or a non-total condition;
//!   division by a column; a float column; an unsupported date field; the privacy unit; and
//!   a key with no public domain and no G. Each message says what to write instead.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use fedq_common::group_key::{DateField, GroupKey};
use fedq_common::AggregateRequest;
use fedq_coordinator::noise::discrete_laplace_half_width;
use fedq_coordinator::planner::StatisticKind;
use fedq_coordinator::CoordinatorError;
use fedq_tests::{
    drop_date_range, exact_rows, key, merged_rows, set_date_range, set_rows_per_unit, site_context,
    start, synth,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bucketed_partials_equal_datafusion_over_the_union() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 29);
    // No row truncation, so that the expected values are exact.
    set_rows_per_unit(dir, 10_000);
    // Diagnosis dates without a declared range: their years have no public domain.
    drop_date_range(dir, "diagnoses", "diagnosed_on");
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;

    // (researcher's SQL, the partial besides COUNT(*), DataFusion's SQL, key count)
    let units = AggregateRequest::CountUnits;
    let by_sum = AggregateRequest::SumFixed {
        column: "birth_year".into(),
        lower: 1900.0,
        upper: 2030.0,
        precision: 1.0,
    };
    let non_null = AggregateRequest::CountNonNull {
        column: "value".into(),
    };
    let shapes: Vec<(&str, AggregateRequest, &str, usize)> = vec![
        (
            "SELECT birth_year / 10 * 10 AS decade, COUNT(*), SUM(birth_year) FROM participants \
             GROUP BY birth_year / 10 * 10",
            by_sum.clone(),
            "SELECT CAST(birth_year / 10 * 10 AS BIGINT), COUNT(*), SUM(birth_year) FROM participants GROUP BY 1",
            1,
        ),
        (
            "SELECT CASE WHEN birth_year < 1960 THEN 'before 1960' WHEN birth_year < 1990 THEN '1960 to 1989' \
             ELSE '1990 on' END AS cohort, sex, COUNT(*), SUM(birth_year) FROM participants GROUP BY 1, sex",
            by_sum.clone(),
            "SELECT CASE WHEN birth_year < 1960 THEN 'before 1960' WHEN birth_year < 1990 THEN '1960 to 1989' \
             ELSE '1990 on' END, sex, COUNT(*), SUM(birth_year) FROM participants GROUP BY 1, 2",
            2,
        ),
        (
            "SELECT CASE test WHEN 'HbA1c' THEN 'glycaemic' WHEN 'glucose' THEN 'glycaemic' ELSE 'other' END AS kind, \
             COUNT(*), COUNT(value) FROM labs GROUP BY 1",
            non_null.clone(),
            "SELECT CASE test WHEN 'HbA1c' THEN 'glycaemic' WHEN 'glucose' THEN 'glycaemic' ELSE 'other' END, \
             COUNT(*), COUNT(value) FROM labs GROUP BY 1",
            1,
        ),
        (
            "SELECT EXTRACT(MONTH FROM measured_on) AS month, COUNT(*), COUNT(DISTINCT pid) FROM labs \
             WHERE test = 'HbA1c' GROUP BY 1",
            units.clone(),
            // Distinct participants per month and site, summed over sites.
            "SELECT m, CAST(SUM(n) AS BIGINT), CAST(SUM(u) AS BIGINT) FROM (SELECT fedq_site, \
             CAST(date_part('month', measured_on) AS BIGINT) AS m, COUNT(*) AS n, COUNT(DISTINCT pid) AS u \
             FROM labs WHERE test = 'HbA1c' GROUP BY 1, 2) GROUP BY m",
            1,
        ),
        (
            // Years of a date column with a declared range (2000 to 2026): public.
            "SELECT date_part('year', measured_on) AS y, COUNT(*), COUNT(DISTINCT pid) FROM labs GROUP BY 1",
            units.clone(),
            "SELECT y, CAST(SUM(n) AS BIGINT), CAST(SUM(u) AS BIGINT) FROM (SELECT fedq_site, \
             CAST(date_part('year', measured_on) AS BIGINT) AS y, COUNT(*) AS n, COUNT(DISTINCT pid) AS u \
             FROM labs GROUP BY 1, 2) GROUP BY y",
            1,
        ),
        (
            "SELECT date_part('quarter', diagnosed_on) AS q, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses GROUP BY 1",
            units.clone(),
            "SELECT q, CAST(SUM(n) AS BIGINT), CAST(SUM(u) AS BIGINT) FROM (SELECT fedq_site, \
             CAST(date_part('quarter', diagnosed_on) AS BIGINT) AS q, COUNT(*) AS n, COUNT(DISTINCT pid) AS u \
             FROM diagnoses GROUP BY 1, 2) GROUP BY q",
            1,
        ),
        (
            // `date_trunc` keys: the first day of each month, in a year that `date_trunc`
            // in WHERE picks (as days since 1970-01-01 in the partials).
            "SELECT date_trunc('month', measured_on) AS m, COUNT(*), COUNT(DISTINCT pid) FROM labs \
             WHERE test = 'HbA1c' AND date_trunc('year', measured_on) = DATE '2020-01-01' GROUP BY 1",
            units.clone(),
            "SELECT m, CAST(SUM(n) AS BIGINT), CAST(SUM(u) AS BIGINT) FROM (SELECT fedq_site, \
             CAST(CAST(CAST(date_trunc('month', measured_on) AS DATE) AS INT) AS BIGINT) AS m, COUNT(*) AS n, \
             COUNT(DISTINCT pid) AS u FROM labs WHERE test = 'HbA1c' AND date_part('year', measured_on) = 2020 \
             GROUP BY 1, 2) GROUP BY m",
            1,
        ),
        (
            // A bucket of the joined table's column.
            "SELECT p.birth_year / 10 AS decade, COUNT(*), COUNT(l.value) FROM labs l JOIN participants p \
             USING (pid) WHERE l.test = 'HbA1c' GROUP BY 1",
            AggregateRequest::CountNonNull {
                column: "value".into(),
            },
            "SELECT CAST(p.birth_year / 10 AS BIGINT), COUNT(*), COUNT(l.value) FROM labs l JOIN participants p \
             ON l.pid = p.pid AND l.fedq_site = p.fedq_site WHERE l.test = 'HbA1c' GROUP BY 1",
            1,
        ),
    ];
    for (sql, second, want_sql, n_keys) in shapes {
        let q = engine.plan("alice", sql).await.unwrap();
        assert!(q.selection.is_none(), "{sql}: a public domain");
        let merged = engine.gather(&q).await.unwrap();
        let got = merged_rows(
            &merged,
            &q.request.aggregates,
            &[AggregateRequest::CountRows, second],
        );
        let want = exact_rows(&ctx, want_sql, n_keys).await;
        assert!(!want.is_empty(), "{sql}");
        assert_eq!(got, want, "{sql}");
    }

    // The derived domains the coordinator planned.
    let q = engine
        .plan(
            "alice",
            "SELECT birth_year / 10 * 10, COUNT(*) FROM participants GROUP BY 1",
        )
        .await
        .unwrap();
    assert_eq!(
        q.request.group_by,
        vec![GroupKey::IntBucket {
            column: "birth_year".into(),
            divisor: 10,
            multiplier: 10
        }]
    );
    let decades: Vec<String> = q.groups[0].domain.iter().map(|v| v.to_string()).collect();
    assert_eq!(decades.first().map(String::as_str), Some("1900"));
    assert_eq!(decades.last().map(String::as_str), Some("2030"));
    assert_eq!(decades.len(), 14);

    // The calendar year of a date without a declared range has no public domain: it falls
    // back to partition selection, with each participant's rows at a site kept in its G = 5
    // years with the most rows (ties by the earliest year).
    let q = engine
        .plan(
            "alice",
            "SELECT date_part('year', diagnosed_on) AS y, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses GROUP BY 1",
        )
        .await
        .unwrap();
    assert!(q.selection.is_some(), "partition selection");
    assert_eq!(
        q.request.group_by,
        vec![GroupKey::DatePart {
            field: DateField::Year,
            column: "diagnosed_on".into()
        }]
    );
    let merged = engine.gather(&q).await.unwrap();
    let got = merged_rows(
        &merged,
        &q.request.aggregates,
        &[AggregateRequest::CountRows, units],
    );
    let want = exact_rows(
        &ctx,
        "WITH per AS (SELECT fedq_site, pid, CAST(date_part('year', diagnosed_on) AS BIGINT) AS y, COUNT(*) AS n \
                      FROM diagnoses GROUP BY 1, 2, 3), \
              ranked AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY fedq_site, pid ORDER BY n DESC, y ASC) AS rn FROM per) \
         SELECT y, CAST(SUM(n) AS BIGINT), CAST(COUNT(*) AS BIGINT) FROM ranked WHERE rn <= 5 GROUP BY y",
        1,
    )
    .await;
    assert!(want.len() > 5, "the test needs more years than G");
    assert_eq!(got, want);
}

/// Weeks, days of the week and of the year, and `date_trunc` to a quarter, week or day,
/// as keys and in WHERE, in PostgreSQL's and DuckDB's spellings: the pre-noise partials
/// equal DataFusion's own `date_part` and `date_trunc` over the union of the site files.
/// Lab dates are declared to span 2020 only, so their weeks (53) and days (366) have a
/// public domain; the queries keep to that year, so the node's clamp changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weeks_weekdays_and_truncations_equal_datafusion_over_the_union() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 3000, 31);
    set_rows_per_unit(dir, 10_000);
    set_date_range(
        dir,
        "labs",
        "measured_on",
        Some(("2020-01-01", "2020-12-31")),
    );
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let ctx = site_context(dir).await;
    let units = AggregateRequest::CountUnits;
    let in_2020 = "measured_on BETWEEN DATE '2020-01-01' AND DATE '2020-12-31'";
    // DataFusion's first day of a period, as days since 1970-01-01.
    let trunc = |unit: &str, c: &str| {
        format!("CAST(CAST(CAST(date_trunc('{unit}', {c}) AS DATE) AS INT) AS BIGINT)")
    };
    let per_site = |key: &str, from_where: &str| {
        format!(
            "SELECT k, CAST(SUM(n) AS BIGINT), CAST(SUM(u) AS BIGINT) FROM (SELECT fedq_site, {key} AS k, \
             COUNT(*) AS n, COUNT(DISTINCT pid) AS u FROM {from_where} GROUP BY 1, 2) GROUP BY k"
        )
    };
    let part = |f: &str, c: &str| format!("CAST(date_part('{f}', {c}) AS BIGINT)");
    let shapes: Vec<(String, String, Option<usize>)> = vec![
        (
            "SELECT date_part('week', diagnosed_on) AS w, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses GROUP BY 1".into(),
            per_site(&part("week", "diagnosed_on"), "diagnoses"),
            Some(53),
        ),
        (
            "SELECT dayofweek(diagnosed_on) AS dow, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses GROUP BY 1".into(),
            per_site(&part("dow", "diagnosed_on"), "diagnoses"),
            Some(7),
        ),
        (
            "SELECT EXTRACT(ISODOW FROM diagnosed_on) AS d, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses \
             WHERE code = 'E11' GROUP BY 1".into(),
            per_site(&part("isodow", "diagnosed_on"), "diagnoses WHERE code = 'E11'"),
            Some(7),
        ),
        (
            "SELECT dayofyear(diagnosed_on) AS d, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses GROUP BY 1".into(),
            per_site(&part("doy", "diagnosed_on"), "diagnoses"),
            Some(366),
        ),
        (
            "SELECT date_trunc('quarter', diagnosed_on) AS q, COUNT(*), COUNT(DISTINCT pid) FROM diagnoses GROUP BY 1".into(),
            per_site(&trunc("quarter", "diagnosed_on"), "diagnoses"),
            Some(27 * 4),
        ),
        (
            format!("SELECT date_trunc('week', measured_on) AS w, COUNT(*), COUNT(DISTINCT pid) FROM labs WHERE {in_2020} GROUP BY 1"),
            per_site(&trunc("week", "measured_on"), &format!("labs WHERE {in_2020}")),
            Some(53),
        ),
        (
            format!("SELECT date_trunc('day', measured_on) AS d, COUNT(*), COUNT(DISTINCT pid) FROM labs WHERE {in_2020} GROUP BY 1"),
            per_site(&trunc("day", "measured_on"), &format!("labs WHERE {in_2020}")),
            Some(366),
        ),
        (
            // Truncations and weekdays in WHERE, grouped by a public column.
            "SELECT sex, COUNT(*), COUNT(DISTINCT pid) FROM participants \
             WHERE date_trunc('quarter', enrolled_on) = DATE '2015-04-01' OR week(enrolled_on) = 1 \
             OR (date_trunc('week', enrolled_on) = DATE '2018-06-04' AND isodow(enrolled_on) <= 5) GROUP BY sex".into(),
            per_site(
                "sex",
                &format!(
                    "participants WHERE {} = {} OR date_part('week', enrolled_on) = 1 \
                     OR ({} = {} AND date_part('isodow', enrolled_on) <= 5)",
                    trunc("quarter", "enrolled_on"),
                    "CAST(CAST(DATE '2015-04-01' AS INT) AS BIGINT)",
                    trunc("week", "enrolled_on"),
                    "CAST(CAST(DATE '2018-06-04' AS INT) AS BIGINT)",
                ),
            ),
            None,
        ),
    ];
    for (sql, want_sql, domain) in shapes {
        let q = engine.plan("alice", &sql).await.unwrap();
        assert!(q.selection.is_none(), "{sql}: a public domain");
        if let Some(n) = domain {
            assert_eq!(q.groups[0].domain.len(), n, "{sql}");
        }
        let merged = engine.gather(&q).await.unwrap();
        let got = merged_rows(
            &merged,
            &q.request.aggregates,
            &[AggregateRequest::CountRows, units.clone()],
        );
        let want = exact_rows(&ctx, &want_sql, 1).await;
        assert!(want.len() > 1, "{sql}: the test needs several groups");
        assert_eq!(got, want, "{sql}");
    }
    // Days of a range longer than 1,000 days have no public domain: partition selection.
    let q = engine
        .plan(
            "alice",
            "SELECT date_trunc('day', diagnosed_on) AS d, COUNT(*) FROM diagnoses GROUP BY 1",
        )
        .await
        .unwrap();
    assert!(
        q.selection.is_some(),
        "days of 27 years: partition selection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decades_are_released_in_full_under_the_alias_within_their_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 3, 2000, 31);
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let mut alice = fed.client("alice").await.unwrap();

    let sql = "SELECT birth_year / 10 * 10 AS decade, COUNT(*) AS n FROM participants \
               GROUP BY birth_year / 10 * 10 ORDER BY decade";
    // Participants have one row each (R = 1), so the exact partials are deterministic.
    let q = engine.plan("alice", sql).await.unwrap();
    let merged = engine.gather(&q).await.unwrap();
    let st = &q.statistics[0];
    let StatisticKind::Count { partial } = st.kind else {
        panic!("COUNT(*) is a count: {:?}", st.kind)
    };
    let t = discrete_laplace_half_width(st.sensitivity as f64 / st.epsilon.to_f64().value(), 1e-12);

    let r = alice.query(sql).await.unwrap();
    let names: Vec<&str> = r
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(&names[..2], ["decade", "n"]);
    let mut decades = Vec::new();
    for b in &r.batches {
        let n = b.column(1).as_primitive::<Int64Type>();
        for row in 0..b.num_rows() {
            let decade: i64 = key(b, 0, row).parse().unwrap();
            decades.push(decade);
            let exact = merged.get(
                &[fedq_common::PublicValue::Int(decade)],
                q.request.aggregates.len(),
            )[partial];
            assert!(
                (n.value(row) as f64 - exact as f64).abs() <= t,
                "decade {decade}: noisy {} vs exact {exact}, bound {t}",
                n.value(row)
            );
        }
    }
    // Every decade of the bounds [1900, 2030], empty ones included, in order.
    assert_eq!(decades, (190..=203).map(|d| d * 10).collect::<Vec<i64>>());

    // EXPLAIN says which groups the answer will have, before any data is read.
    let detail = explain_detail(&mut alice, sql).await;
    assert!(
        detail.contains("14 group(s), every one released (empty ones as noise): participants.birth_year / 10 * 10: 14 buckets of the column's bounds (1900, 1910,"),
        "{detail}"
    );
    // A `date_trunc` key comes back as dates: every year of the declared range, in order.
    let r = alice
        .query("SELECT date_trunc('year', enrolled_on) AS y, COUNT(*) AS n FROM participants GROUP BY 1 ORDER BY 1")
        .await
        .unwrap();
    let years: Vec<String> = r
        .batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(move |row| key(b, 0, row)))
        .collect();
    assert_eq!(years.len(), 27, "{years:?}");
    assert!(years[0].starts_with("2000-01-01"), "{years:?}");
    assert!(years[26].starts_with("2026-01-01"), "{years:?}");
    let detail = explain_detail(
        &mut alice,
        "SELECT date_trunc('year', enrolled_on) AS y, COUNT(*) FROM participants GROUP BY 1",
    )
    .await;
    assert!(
        detail.contains("27 calendar values (2000-01-01, 2001-01-01,"),
        "{detail}"
    );
}

/// The detail of the first row (the query's) of `EXPLAIN sql`.
async fn explain_detail(c: &mut fedq::client::FedqClient, sql: &str) -> String {
    let r = c.query(&format!("EXPLAIN {sql}")).await.unwrap();
    let b = &r.batches[0];
    b.column(b.schema().index_of("detail").unwrap())
        .as_string::<i32>()
        .value(0)
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bucketed_keys_that_cannot_be_bounded_are_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synth(dir, 2, 300, 37);
    drop_date_range(dir, "participants", "enrolled_on");
    let fed = start(dir).await;
    let engine = fed.coordinator.engine.clone();
    let cases = [
        (
            "SELECT CASE WHEN birth_year < 1960 THEN 'old' END, COUNT(*) FROM participants GROUP BY 1",
            "ELSE 'other'",
        ),
        (
            "SELECT CASE WHEN birth_year < 1960 THEN sex ELSE 'x' END, COUNT(*) FROM participants GROUP BY 1",
            "CASE labels must be literals",
        ),
        (
            "SELECT birth_year / birth_year, COUNT(*) FROM participants GROUP BY 1",
            "divides by an integer literal",
        ),
        (
            "SELECT volume_ml / 10, COUNT(*) FROM specimens GROUP BY 1",
            "integer column",
        ),
        (
            "SELECT birth_year / 10 * 100, COUNT(*) FROM participants GROUP BY 1",
            "multiplier 100 must be between 1 and the divisor 10",
        ),
        (
            "SELECT date_part('epoch', measured_on), COUNT(*) FROM labs GROUP BY 1",
            "'year', 'quarter', 'month', 'week', 'day', 'dow', 'isodow' or 'doy'",
        ),
        (
            "SELECT date_part('month', birth_year), COUNT(*) FROM participants GROUP BY 1",
            "",
        ),
        (
            // A CASE condition must be total, like a WHERE.
            "SELECT CASE WHEN CAST(volume_ml AS INT) > 10 THEN 'big' ELSE 'small' END, COUNT(*) FROM specimens GROUP BY 1",
            "TRY_CAST",
        ),
        (
            "SELECT birth_year % 10, COUNT(*) FROM participants GROUP BY 1",
            "birth_year / 10 * 10",
        ),
        (
            // No public domain (no declared date range) and participants declare no G.
            "SELECT date_part('year', enrolled_on), COUNT(*) FROM participants GROUP BY 1",
            "max_groups_per_unit",
        ),
    ];
    for (sql, needle) in cases {
        match engine.plan("alice", sql).await {
            Err(e @ (CoordinatorError::Refused(_) | CoordinatorError::InvalidSql(_))) => {
                assert!(e.to_string().contains(needle), "{sql}: {e}")
            }
            other => panic!("{sql}: expected a refusal containing {needle:?}, got {other:?}"),
        }
    }
}
