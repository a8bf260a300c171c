//! GROUP BY keys without a public domain: per-participant group bounding (G) for DP
//! partition selection.
//!
//! The coordinator releases such a group only if a noisy count passes a threshold, and that
//! is (ε, δ)-DP only if one participant can touch a bounded number of groups. The node
//! enforces it here, whatever the request says, before bounding rows to R:
//!
//! 1. rows with a NULL key are dropped (there is no public NULL group to put them in);
//! 2. each participant keeps its rows in at most G of its groups: **the G groups in which it
//!    has the most rows, ties broken by the smallest key** (text by byte order). The rule
//!    depends only on that participant's own rows, so adding or removing one participant
//!    changes no other participant's choice;
//! 3. the observed groups (after step 2) are numbered `0..n` in key order; the kept rows
//!    carry their group's number as a single Int64 key `fedq_gidx`, whose domain `0..n` the
//!    ordinary [`crate::bounding::Bounder`] then treats like a public one (R rows per
//!    participant, clamping, exact sums);
//! 4. the response maps the numbers back to the key values. There is no cap on the number
//!    of observed groups (a cap that fails the query would be a deterministic bit one
//!    participant can flip); a response with more than `MAX_GROUPS` groups is sent as
//!    several batches.
//!
//! The observed keys are the only data-dependent key output of a node. They go to the
//! coordinator only, which never releases a group without the noisy threshold.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::JoinType;
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{col, lit, ExprFunctionExt};
use datafusion::prelude::SessionContext;
use fedq_common::ColumnType;

/// Name of the group-number column the bounder sees.
pub(crate) const GIDX: &str = "fedq_gidx";

/// An open (non-public) group key of a request.
#[derive(Debug, Clone)]
pub(crate) struct OpenKey {
    /// Output name, as requested (`ColumnRef` display).
    pub name: String,
    /// Catalog type of the key.
    pub ty: ColumnType,
}

/// The open keys of a request and its G.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    pub keys: Vec<OpenKey>,
    pub max_groups: u32,
}

/// Projected column `i` (the engine names every projected column `c{i}` for selection
/// requests: `c0` the privacy unit, `c1..=ck` the keys, then the aggregate inputs).
pub(crate) fn proj_name(i: usize) -> String {
    format!("c{i}")
}

/// Position of projected column `p` in the G-bounded rows `[c0, fedq_gidx, c1, …]`.
pub(crate) fn shifted(p: usize) -> usize {
    if p == 0 {
        0
    } else {
        p + 1
    }
}

/// The observed groups of a G-bounded request: one array per key (catalog types), row `i`
/// being group number `i`.
#[derive(Debug)]
pub(crate) struct Dictionary {
    pub keys: Vec<ArrayRef>,
}

impl Dictionary {
    /// Number of observed groups.
    pub fn len(&self) -> usize {
        self.keys.first().map_or(0, |k| k.len())
    }
}

/// From the projected rows `df` (`c0..cm`), the G-bounded rows `[c0, fedq_gidx, c1..cm]`
/// and the dictionary of observed groups. `n_cols` is `m + 1`.
pub(crate) async fn bound_groups(
    df: DataFrame,
    sel: &Selection,
    n_cols: usize,
) -> Result<(DataFrame, Dictionary), DataFusionError> {
    let k = sel.keys.len();
    let keys: Vec<String> = (1..=k).map(proj_name).collect();
    let mut base = df;
    for key in &keys {
        base = base.filter(col(key).is_not_null())?;
    }
    // Rows per (participant, group); each participant's top G groups by rows, ties by key.
    let mut by = vec![col("c0")];
    by.extend(keys.iter().map(col));
    let per = base
        .clone()
        .aggregate(by, vec![count(lit(1)).alias("fedq_n")])?;
    let mut order = vec![col("fedq_n").sort(false, true)];
    order.extend(keys.iter().map(|c| col(c).sort(true, true)));
    let rank = row_number()
        .partition_by(vec![col("c0")])
        .order_by(order)
        .build()?
        .alias("fedq_rank");
    let kept = per
        .window(vec![rank])?
        .filter(col("fedq_rank").lt_eq(lit(u64::from(sel.max_groups))))?;

    // The observed groups, numbered in key order.
    let dkeys: Vec<String> = (1..=k).map(|i| format!("d{i}")).collect();
    let distinct = kept
        .clone()
        .select(
            keys.iter()
                .zip(&dkeys)
                .map(|(c, d)| col(c).alias(d))
                .collect::<Vec<_>>(),
        )?
        .distinct()?
        .sort(dkeys.iter().map(|d| col(d).sort(true, true)).collect())?;
    let (state, _) = distinct.clone().into_parts();
    let batches = distinct.collect().await?;
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => Arc::new(Schema::new(
            sel.keys
                .iter()
                .zip(&dkeys)
                .map(|(key, d)| Field::new(d, key.ty.arrow_type(), true))
                .collect::<Vec<_>>(),
        )),
    };
    let all = concat_batches(&schema, &batches)?;
    // Every observed group is kept, however many there are: failing the query above some
    // number of groups would be a bit one participant can flip (one more group at the
    // threshold). The response is split into batches of at most `MAX_GROUPS` rows instead
    // (`NodeEngine::execute`), and the coordinator merges any number of them.
    let n = all.num_rows();
    let mut dict_cols: Vec<ArrayRef> = all.columns().to_vec();
    dict_cols.push(Arc::new(Int64Array::from_iter_values(0..n as i64)));
    let mut dict_fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    dict_fields.push(Field::new(GIDX, DataType::Int64, false));
    let dict_batch = RecordBatch::try_new(Arc::new(Schema::new(dict_fields)), dict_cols)?;
    let ctx = SessionContext::new_with_state(state);
    let dict_df = ctx.read_batch(dict_batch)?;

    // Kept (participant, group) pairs with their number, then the rows in them.
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let dkey_refs: Vec<&str> = dkeys.iter().map(String::as_str).collect();
    let kcols: Vec<String> = (0..=k).map(|i| format!("k{i}")).collect();
    let kept_idx = kept
        .join(dict_df, JoinType::Inner, &key_refs, &dkey_refs, None)?
        .select(
            std::iter::once(col("c0").alias("k0"))
                .chain(keys.iter().zip(&kcols[1..]).map(|(c, kc)| col(c).alias(kc)))
                .chain(std::iter::once(col(GIDX)))
                .collect::<Vec<_>>(),
        )?;
    let left: Vec<String> = (0..=k).map(proj_name).collect();
    let left_refs: Vec<&str> = left.iter().map(String::as_str).collect();
    let kcol_refs: Vec<&str> = kcols.iter().map(String::as_str).collect();
    let rows = base
        .join(kept_idx, JoinType::Inner, &left_refs, &kcol_refs, None)?
        .select(
            std::iter::once(col("c0"))
                .chain(std::iter::once(col(GIDX)))
                .chain((1..n_cols).map(|i| col(proj_name(i))))
                .collect::<Vec<_>>(),
        )?;
    let keys = all
        .columns()
        .iter()
        .zip(&sel.keys)
        .map(|(a, key)| cast(a, &key.ty.arrow_type()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rows, Dictionary { keys }))
}

/// Replace the bounder's `fedq_gidx` column (the first) by the key values it numbers.
pub(crate) fn expand_keys(
    out: RecordBatch,
    sel: &Selection,
    dict: &Dictionary,
) -> Result<RecordBatch, String> {
    let gidx = out
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or("group numbers are not Int64")?;
    let n = dict.len() as i64;
    let idx: UInt32Array = gidx
        .iter()
        .map(|g| match g {
            Some(g) if (0..n).contains(&g) => Ok(g as u32),
            _ => Err("group number outside the dictionary"),
        })
        .collect::<Result<_, _>>()?;
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (key, arr) in sel.keys.iter().zip(&dict.keys) {
        fields.push(Field::new(&key.name, key.ty.arrow_type(), true));
        columns.push(take(arr.as_ref(), &idx, None).map_err(|e| e.to_string())?);
    }
    let schema = out.schema();
    for (f, c) in schema.fields().iter().zip(out.columns()).skip(1) {
        fields.push(f.as_ref().clone());
        columns.push(Arc::clone(c));
    }
    let schema = Schema::new(fields).with_metadata(schema.metadata().clone());
    RecordBatch::try_new(Arc::new(schema), columns).map_err(|e| e.to_string())
}
