//! Per-participant contribution bounding and partial aggregation.
//!
//! Rows arrive from DataFusion already filtered, projected to
//! `[privacy unit, group keys…, aggregate inputs…]`. For each participant we keep a
//! reservoir of at most R rows, sampled uniformly at random among that participant's rows
//! (Algorithm R, randomness from OpenDP). Only the group index and the needed input values
//! are kept. When the stream ends, the reservoirs are folded into per-group accumulators:
//! row counts, non-null counts and exact fixed-point sums.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Decimal128Array, Float64Array, Int32Array,
    Int32Builder, Int64Array, Int64Builder, StringArray, StringBuilder,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use fedq_common::{ColumnType, PublicValue};
use opendp::traits::samplers::fill_bytes;
use rustc_hash::FxHashMap;

/// Precision and scale of the fixed-point sums on the wire.
pub const SUM_PRECISION: u8 = 38;

/// A failure while bounding; turned into a generic internal error by the caller.
#[derive(Debug)]
pub(crate) struct BoundError(pub String);

type BResult<T> = Result<T, BoundError>;

/// Lookup from a group key value to its index in the column's public domain.
#[derive(Debug)]
enum DomainIndex {
    Utf8(FxHashMap<String, u32>),
    Int(FxHashMap<i64, u32>),
    Bool { f: Option<u32>, t: Option<u32> },
}

/// A GROUP BY column with its public domain.
#[derive(Debug)]
pub(crate) struct GroupCol {
    /// Output name (as requested).
    pub name: String,
    /// Catalog type (utf8, int32, int64 or boolean).
    pub ty: ColumnType,
    /// Public domain, deduplicated, in catalog order.
    pub values: Vec<PublicValue>,
    index: DomainIndex,
    /// Position in the projected batch.
    pub proj: usize,
}

impl GroupCol {
    /// Build from a deduplicated public domain. `ty` must be a supported key type.
    pub fn new(name: String, ty: ColumnType, values: Vec<PublicValue>, proj: usize) -> Self {
        let index = match ty {
            ColumnType::Utf8 => DomainIndex::Utf8(
                values
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| match v {
                        PublicValue::Text(s) => Some((s.clone(), i as u32)),
                        _ => None,
                    })
                    .collect(),
            ),
            ColumnType::Boolean => {
                let pos = |b: bool| {
                    values
                        .iter()
                        .position(|v| *v == PublicValue::Bool(b))
                        .map(|i| i as u32)
                };
                DomainIndex::Bool {
                    f: pos(false),
                    t: pos(true),
                }
            }
            _ => DomainIndex::Int(
                values
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| match v {
                        PublicValue::Int(x) => Some((*x, i as u32)),
                        _ => None,
                    })
                    .collect(),
            ),
        };
        GroupCol {
            name,
            ty,
            values,
            index,
            proj,
        }
    }
}

/// How a kept input value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotKind {
    /// Integer column (int32/int64), stored as i64 bits.
    Int,
    /// Float64 column, stored as f64 bits.
    Float,
    /// Only NULL-ness is needed.
    NullOnly,
}

/// An aggregate input column kept in the reservoirs.
#[derive(Debug)]
pub(crate) struct ValueSlot {
    pub ty: ColumnType,
    pub kind: SlotKind,
    /// Position in the projected batch.
    pub proj: usize,
}

/// A validated partial aggregate.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AggPlan {
    CountRows,
    CountNonNull {
        slot: usize,
    },
    /// Clamp to `[lo_fp, hi_fp]` after `round(v / precision)`.
    SumFixed {
        slot: usize,
        precision: f64,
        lo_fp: f64,
        hi_fp: f64,
    },
    /// Like `SumFixed`, then `(v - mid_fp)²` summed exactly in `i128`.
    SumSquaresFixed {
        slot: usize,
        precision: f64,
        lo_fp: f64,
        hi_fp: f64,
        mid_fp: i128,
    },
}

/// The shape of one bounding run.
#[derive(Debug)]
pub(crate) struct BoundingPlan {
    /// R: rows kept per participant.
    pub max_rows: usize,
    /// Position of the privacy unit in the projected batch.
    pub pid_proj: usize,
    pub groups: Vec<GroupCol>,
    pub slots: Vec<ValueSlot>,
    pub aggs: Vec<AggPlan>,
}

/// Uniform integers from OpenDP's CSPRNG (`fill_bytes`, OpenSSL-backed), fetched 4 KiB at a
/// time so that a heavy participant costs one OpenSSL call per 512 draws instead of one
/// per draw. It holds only unused random bytes: no generator state, no seed. Each draw is
/// consumed once.
pub(crate) struct RandomBytes {
    buf: Vec<u8>,
    pos: usize,
}

impl RandomBytes {
    pub(crate) fn new() -> Self {
        RandomBytes {
            buf: vec![0; 4096],
            pos: 4096,
        }
    }

    fn next_u64(&mut self) -> BResult<u64> {
        if self.pos + 8 > self.buf.len() {
            fill_bytes(&mut self.buf).map_err(|e| BoundError(format!("sampling failed: {e}")))?;
            self.pos = 0;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
        self.pos += 8;
        Ok(u64::from_ne_bytes(b))
    }

    /// Uniform on `[0, upper)`, by rejection exactly as OpenDP's `sample_uniform_uint_below`.
    pub(crate) fn below(&mut self, upper: u64) -> BResult<u64> {
        if upper == 0 {
            return Err(BoundError("empty sampling range".into()));
        }
        let threshold = u64::MAX - u64::MAX % upper;
        loop {
            let x = self.next_u64()?;
            if x < threshold {
                return Ok(x % upper);
            }
        }
    }
}

/// Kept rows of one participant.
#[derive(Debug, Default)]
struct Reservoir {
    /// Rows of this participant seen so far (after the filter).
    seen: u64,
    /// Group index of each kept row.
    groups: Vec<u32>,
    /// NULL mask of each kept row (bit i = slot i is NULL).
    nulls: Vec<u64>,
    /// Values of each kept row, `slots` per row.
    values: Vec<u64>,
}

impl Reservoir {
    /// Offer one row (Algorithm R). Randomness is drawn only once the reservoir is full.
    fn offer(
        &mut self,
        r: usize,
        group: u32,
        nulls: u64,
        vals: &[u64],
        rng: &mut RandomBytes,
    ) -> BResult<()> {
        self.seen += 1;
        let len = self.groups.len();
        if len < r {
            self.groups.push(group);
            self.nulls.push(nulls);
            self.values.extend_from_slice(vals);
            return Ok(());
        }
        let j = rng.below(self.seen)?;
        if j < r as u64 {
            let j = j as usize;
            self.groups[j] = group;
            self.nulls[j] = nulls;
            let w = vals.len();
            self.values[j * w..(j + 1) * w].copy_from_slice(vals);
        }
        Ok(())
    }
}

/// Typed view of a group key column of one batch.
enum KeyArray<'a> {
    Utf8(&'a StringArray),
    Int32(&'a Int32Array),
    Int64(&'a Int64Array),
    Bool(&'a BooleanArray),
}

/// Typed view of an aggregate input column of one batch.
enum ValArray<'a> {
    Int32(&'a Int32Array),
    Int64(&'a Int64Array),
    Float64(&'a Float64Array),
    Any(&'a dyn Array),
}

/// Cast `a` to `want` if it has another type (e.g. a view type); errors if impossible.
fn as_type(a: &ArrayRef, want: &DataType) -> BResult<ArrayRef> {
    if a.data_type() == want {
        Ok(Arc::clone(a))
    } else {
        cast(a, want).map_err(|e| {
            BoundError(format!(
                "column has type {}, expected {want}: {e}",
                a.data_type()
            ))
        })
    }
}

fn downcast<T: 'static>(a: &ArrayRef) -> BResult<&T> {
    a.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| BoundError(format!("unexpected array type {}", a.data_type())))
}

/// Streaming bounder: feed batches with [`Bounder::push`], then [`Bounder::finish`].
pub(crate) struct Bounder {
    plan: BoundingPlan,
    /// Stride of each group column in the group index.
    strides: Vec<u32>,
    reservoirs: FxHashMap<Box<str>, Reservoir>,
    rng: RandomBytes,
}

impl Bounder {
    pub fn new(plan: BoundingPlan) -> Self {
        let mut strides = vec![0u32; plan.groups.len()];
        let mut s: u32 = 1;
        for (k, g) in plan.groups.iter().enumerate().rev() {
            strides[k] = s;
            s = s.saturating_mul((g.values.len() as u32).max(1));
        }
        Bounder {
            plan,
            strides,
            reservoirs: FxHashMap::default(),
            rng: RandomBytes::new(),
        }
    }

    /// Number of participants seen so far.
    #[cfg(test)]
    pub fn participants(&self) -> usize {
        self.reservoirs.len()
    }

    /// Consume one batch of filtered, projected rows.
    pub fn push(&mut self, batch: &RecordBatch) -> BResult<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let col = |i: usize| -> BResult<&ArrayRef> {
            if i < batch.num_columns() {
                Ok(batch.column(i))
            } else {
                Err(BoundError(format!("batch has no column {i}")))
            }
        };
        let pid_arr = as_type(col(self.plan.pid_proj)?, &DataType::Utf8)?;
        let pids: &StringArray = downcast(&pid_arr)?;

        let mut key_owned = Vec::with_capacity(self.plan.groups.len());
        for g in &self.plan.groups {
            key_owned.push(as_type(col(g.proj)?, &g.ty.arrow_type())?);
        }
        let mut keys = Vec::with_capacity(key_owned.len());
        for (g, a) in self.plan.groups.iter().zip(&key_owned) {
            keys.push(match g.ty {
                ColumnType::Utf8 => KeyArray::Utf8(downcast(a)?),
                ColumnType::Int32 => KeyArray::Int32(downcast(a)?),
                ColumnType::Int64 => KeyArray::Int64(downcast(a)?),
                ColumnType::Boolean => KeyArray::Bool(downcast(a)?),
                other => {
                    return Err(BoundError(format!("unsupported group key type {other}")));
                }
            });
        }

        let mut val_owned = Vec::with_capacity(self.plan.slots.len());
        for s in &self.plan.slots {
            val_owned.push(as_type(col(s.proj)?, &s.ty.arrow_type())?);
        }
        let mut vals = Vec::with_capacity(val_owned.len());
        for (s, a) in self.plan.slots.iter().zip(&val_owned) {
            vals.push(match (s.kind, s.ty) {
                (SlotKind::Int, ColumnType::Int32) => ValArray::Int32(downcast(a)?),
                (SlotKind::Int, _) => ValArray::Int64(downcast(a)?),
                (SlotKind::Float, _) => ValArray::Float64(downcast(a)?),
                (SlotKind::NullOnly, _) => ValArray::Any(a.as_ref()),
            });
        }

        let r = self.plan.max_rows;
        let mut row_vals = vec![0u64; vals.len()];
        let mut i = 0;
        while i < n {
            if pids.is_null(i) {
                i += 1;
                continue;
            }
            // Rows of one participant are usually adjacent: find the run and look the
            // participant up once.
            let pid = pids.value(i);
            let mut end = i + 1;
            while end < n && !pids.is_null(end) && pids.value(end) == pid {
                end += 1;
            }
            if !self.reservoirs.contains_key(pid) {
                self.reservoirs.insert(pid.into(), Reservoir::default());
            }
            let res = self
                .reservoirs
                .get_mut(pid)
                .ok_or_else(|| BoundError("participant vanished".into()))?;
            for row in i..end {
                // Rows whose key is NULL or outside the public domain are dropped before
                // bounding (the filter already removes them; this is a second line).
                let Some(group) = group_index(&self.plan.groups, &self.strides, &keys, row) else {
                    continue;
                };
                let mut nulls = 0u64;
                for (k, v) in vals.iter().enumerate() {
                    let (is_null, bits) = match v {
                        ValArray::Int32(a) => (a.is_null(row), a.value(row) as i64 as u64),
                        ValArray::Int64(a) => (a.is_null(row), a.value(row) as u64),
                        // NaN is NULL for every aggregate: counted by none, summed by none.
                        // (Counting it but summing nothing would put a centred sum's row
                        // at 0, outside bounds that exclude 0, beyond its sensitivity.)
                        ValArray::Float64(a) => (
                            a.is_null(row) || a.value(row).is_nan(),
                            a.value(row).to_bits(),
                        ),
                        ValArray::Any(a) => (a.is_null(row), 0),
                    };
                    if is_null {
                        nulls |= 1 << k;
                    }
                    row_vals[k] = bits;
                }
                res.offer(r, group, nulls, &row_vals, &mut self.rng)?;
            }
            i = end;
        }
        Ok(())
    }

    /// Fold the reservoirs into per-group accumulators and build the response batch.
    pub fn finish(self) -> BResult<RecordBatch> {
        let plan = &self.plan;
        let w = plan.slots.len();
        let naggs = plan.aggs.len();
        // group index -> per-aggregate accumulators; a group is present once it has a row.
        let mut accs: BTreeMap<u32, Vec<i128>> = BTreeMap::new();
        if plan.groups.is_empty() {
            accs.insert(0, vec![0; naggs]);
        }
        for res in self.reservoirs.values() {
            for (row, &g) in res.groups.iter().enumerate() {
                let nulls = res.nulls[row];
                let vals = &res.values[row * w..(row + 1) * w];
                let acc = accs.entry(g).or_insert_with(|| vec![0; naggs]);
                for (a, slot_acc) in plan.aggs.iter().zip(acc.iter_mut()) {
                    match *a {
                        AggPlan::CountRows => *slot_acc += 1,
                        AggPlan::CountNonNull { slot } => {
                            if nulls & (1 << slot) == 0 {
                                *slot_acc += 1;
                            }
                        }
                        AggPlan::SumFixed {
                            slot,
                            precision,
                            lo_fp,
                            hi_fp,
                        } => {
                            if nulls & (1 << slot) != 0 {
                                continue;
                            }
                            let v = match plan.slots[slot].kind {
                                SlotKind::Int => vals[slot] as i64 as f64,
                                SlotKind::Float => f64::from_bits(vals[slot]),
                                SlotKind::NullOnly => continue,
                            };
                            if let Some(fp) = to_fixed(v, precision, lo_fp, hi_fp) {
                                *slot_acc = slot_acc.saturating_add(fp);
                            }
                        }
                        AggPlan::SumSquaresFixed {
                            slot,
                            precision,
                            lo_fp,
                            hi_fp,
                            mid_fp,
                        } => {
                            if nulls & (1 << slot) != 0 {
                                continue;
                            }
                            let v = match plan.slots[slot].kind {
                                SlotKind::Int => vals[slot] as i64 as f64,
                                SlotKind::Float => f64::from_bits(vals[slot]),
                                SlotKind::NullOnly => continue,
                            };
                            if let Some(fp) = to_fixed(v, precision, lo_fp, hi_fp) {
                                // |fp - mid| <= 2e12 (validated), so the square fits.
                                let d = fp.saturating_sub(mid_fp);
                                *slot_acc = slot_acc.saturating_add(d.saturating_mul(d));
                            }
                        }
                    }
                }
            }
        }
        build_output(plan, &self.strides, &accs)
    }
}

/// `clamp(round(v / precision), lo_fp, hi_fp)`; `None` for NaN (treated as NULL).
pub(crate) fn to_fixed(v: f64, precision: f64, lo_fp: f64, hi_fp: f64) -> Option<i128> {
    if v.is_nan() {
        return None;
    }
    let q = (v / precision).round();
    // `max`/`min` rather than `clamp` so that this can never panic; ±inf clamps naturally.
    let c = q.max(lo_fp).min(hi_fp);
    if c.is_nan() {
        return None;
    }
    Some(c as i128)
}

fn group_index(groups: &[GroupCol], strides: &[u32], keys: &[KeyArray], row: usize) -> Option<u32> {
    let mut idx = 0u32;
    for ((g, key), stride) in groups.iter().zip(keys).zip(strides) {
        let pos = match (key, &g.index) {
            (KeyArray::Utf8(a), DomainIndex::Utf8(m)) => {
                if a.is_null(row) {
                    return None;
                }
                *m.get(a.value(row))?
            }
            (KeyArray::Int32(a), DomainIndex::Int(m)) => {
                if a.is_null(row) {
                    return None;
                }
                *m.get(&(a.value(row) as i64))?
            }
            (KeyArray::Int64(a), DomainIndex::Int(m)) => {
                if a.is_null(row) {
                    return None;
                }
                *m.get(&a.value(row))?
            }
            (KeyArray::Bool(a), DomainIndex::Bool { f, t }) => {
                if a.is_null(row) {
                    return None;
                }
                if a.value(row) {
                    (*t)?
                } else {
                    (*f)?
                }
            }
            _ => return None,
        };
        idx += pos * stride;
    }
    Some(idx)
}

/// Schema of a response: group columns (catalog types, nullable), then `agg_0`, `agg_1`, …
pub(crate) fn output_schema(plan: &BoundingPlan) -> Schema {
    let mut fields = Vec::new();
    for g in &plan.groups {
        fields.push(Field::new(&g.name, g.ty.arrow_type(), true));
    }
    for (i, a) in plan.aggs.iter().enumerate() {
        let ty = match a {
            AggPlan::CountRows | AggPlan::CountNonNull { .. } => DataType::Int64,
            AggPlan::SumFixed { .. } | AggPlan::SumSquaresFixed { .. } => {
                DataType::Decimal128(SUM_PRECISION, 0)
            }
        };
        fields.push(Field::new(format!("agg_{i}"), ty, false));
    }
    Schema::new(fields)
}

fn build_output(
    plan: &BoundingPlan,
    strides: &[u32],
    accs: &BTreeMap<u32, Vec<i128>>,
) -> BResult<RecordBatch> {
    let schema = Arc::new(output_schema(plan));
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (k, g) in plan.groups.iter().enumerate() {
        let size = g.values.len() as u32;
        let pos = |gi: u32| -> usize { ((gi / strides[k]) % size.max(1)) as usize };
        let arr: ArrayRef = match g.ty {
            ColumnType::Utf8 => {
                let mut b = StringBuilder::new();
                for &gi in accs.keys() {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Text(s)) => b.append_value(s),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Int32 => {
                let mut b = Int32Builder::new();
                for &gi in accs.keys() {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Int(x)) => b.append_option(i32::try_from(*x).ok()),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Int64 => {
                let mut b = Int64Builder::new();
                for &gi in accs.keys() {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Int(x)) => b.append_value(*x),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Boolean => {
                let mut b = BooleanBuilder::new();
                for &gi in accs.keys() {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Bool(x)) => b.append_value(*x),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            other => return Err(BoundError(format!("unsupported group key type {other}"))),
        };
        columns.push(arr);
    }
    for (i, a) in plan.aggs.iter().enumerate() {
        let arr: ArrayRef = match a {
            AggPlan::CountRows | AggPlan::CountNonNull { .. } => {
                Arc::new(Int64Array::from_iter_values(
                    accs.values()
                        .map(|v| i64::try_from(v[i]).unwrap_or(i64::MAX)),
                ))
            }
            AggPlan::SumFixed { .. } | AggPlan::SumSquaresFixed { .. } => Arc::new(
                Decimal128Array::from_iter_values(accs.values().map(|v| v[i]))
                    .with_precision_and_scale(SUM_PRECISION, 0)
                    .map_err(|e| BoundError(e.to_string()))?,
            ),
        };
        columns.push(arr);
    }
    RecordBatch::try_new(schema, columns).map_err(|e| BoundError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    #[test]
    fn fixed_point_conversion() {
        // [0, 100] at 0.01 -> [0, 10000].
        let f = |v| to_fixed(v, 0.01, 0.0, 10000.0);
        assert_eq!(f(5.5), Some(550));
        assert_eq!(f(3.333), Some(333));
        assert_eq!(f(9999.0), Some(10000));
        assert_eq!(f(-1.0), Some(0));
        assert_eq!(f(f64::INFINITY), Some(10000));
        assert_eq!(f(f64::NEG_INFINITY), Some(0));
        assert_eq!(f(f64::NAN), None);
        // Rounding is half away from zero.
        assert_eq!(to_fixed(-2.5, 1.0, -10.0, 10.0), Some(-3));
    }

    /// Each of n = 10 rows offered to a reservoir of R = 3 must be kept with probability
    /// 3/10. With T = 20000 trials, Hoeffding gives P(|p̂ - 0.3| >= 0.025) <= 2 exp(-25)
    /// per position; with a union bound over the 10 positions the false-failure probability
    /// is below 3e-10.
    #[test]
    fn reservoir_keeps_every_position_with_equal_probability() {
        const T: usize = 20_000;
        let mut kept = [0usize; 10];
        let mut rng = RandomBytes::new();
        for _ in 0..T {
            let mut res = Reservoir::default();
            for row in 0..10u32 {
                res.offer(3, row, 0, &[], &mut rng).unwrap();
            }
            assert_eq!(res.seen, 10);
            assert_eq!(res.groups.len(), 3);
            for &g in &res.groups {
                kept[g as usize] += 1;
            }
        }
        for (pos, &k) in kept.iter().enumerate() {
            let p = k as f64 / T as f64;
            assert!(
                (p - 0.3).abs() < 0.025,
                "position {pos} kept with frequency {p}"
            );
        }
    }

    fn plan(r: usize) -> BoundingPlan {
        let values: Vec<PublicValue> = ["A", "B"]
            .iter()
            .map(|s| PublicValue::Text(s.to_string()))
            .collect();
        BoundingPlan {
            max_rows: r,
            pid_proj: 0,
            groups: vec![GroupCol::new("g".into(), ColumnType::Utf8, values, 1)],
            slots: vec![ValueSlot {
                ty: ColumnType::Int64,
                kind: SlotKind::Int,
                proj: 2,
            }],
            aggs: vec![
                AggPlan::CountRows,
                AggPlan::CountNonNull { slot: 0 },
                AggPlan::SumFixed {
                    slot: 0,
                    precision: 1.0,
                    lo_fp: 0.0,
                    hi_fp: 10.0,
                },
            ],
        }
    }

    fn input(pids: &[Option<&str>], groups: &[Option<&str>], xs: &[Option<i64>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("pid", DataType::Utf8, true),
            Field::new("g", DataType::Utf8, true),
            Field::new("x", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(pids.to_vec())),
                Arc::new(StringArray::from(groups.to_vec())),
                Arc::new(Int64Array::from(xs.to_vec())),
            ],
        )
        .unwrap()
    }

    fn out_rows(b: &RecordBatch) -> Vec<(String, i64, i64, i128)> {
        let g = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let c0 = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        let c1 = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
        let s = b
            .column(3)
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .unwrap();
        (0..b.num_rows())
            .map(|i| (g.value(i).to_string(), c0.value(i), c1.value(i), s.value(i)))
            .collect()
    }

    #[test]
    fn interleaved_participants_across_batches() {
        let b1 = input(
            &[Some("p1"), Some("p2"), Some("p1"), None, Some("p2")],
            &[Some("A"), Some("B"), Some("C"), Some("A"), None],
            &[Some(4), Some(20), Some(1), Some(1), Some(1)],
        );
        let b2 = input(
            &[Some("p2"), Some("p1"), Some("p1")],
            &[Some("A"), Some("A"), Some("B")],
            &[None, Some(-3), Some(2)],
        );
        // R large: exact. A: p1 4, p2 NULL, p1 -3 -> 0. B: p2 20 -> 10, p1 2.
        let mut b = Bounder::new(plan(10));
        b.push(&b1).unwrap();
        b.push(&b2).unwrap();
        assert_eq!(b.participants(), 2);
        let out = b.finish().unwrap();
        assert_eq!(
            out_rows(&out),
            vec![("A".into(), 3, 2, 4), ("B".into(), 2, 2, 12)]
        );

        // R = 1: exactly one row per participant; the NULL pid, the out-of-domain key "C"
        // and the NULL key never count.
        for _ in 0..50 {
            let mut b = Bounder::new(plan(1));
            b.push(&b1).unwrap();
            b.push(&b2).unwrap();
            let out = b.finish().unwrap();
            let total: i64 = out_rows(&out).iter().map(|r| r.1).sum();
            assert_eq!(total, 2);
        }
    }

    #[test]
    fn centred_sum_of_squares_is_exact() {
        // [0, 10] at 1: mid 5. A: 4, -3 -> 0 (clamped), NULL; B: 20 -> 10, 2.
        let mut p = plan(10);
        p.aggs.push(AggPlan::SumSquaresFixed {
            slot: 0,
            precision: 1.0,
            lo_fp: 0.0,
            hi_fp: 10.0,
            mid_fp: 5,
        });
        let mut b = Bounder::new(p);
        b.push(&input(
            &[Some("p1"), Some("p2"), Some("p1"), Some("p2"), Some("p1")],
            &[Some("A"), Some("B"), Some("A"), Some("A"), Some("B")],
            &[Some(4), Some(20), Some(-3), None, Some(2)],
        ))
        .unwrap();
        let out = b.finish().unwrap();
        let sq = out
            .column(4)
            .as_any()
            .downcast_ref::<Decimal128Array>()
            .unwrap();
        // A: (4-5)² + (0-5)² = 26; B: (10-5)² + (2-5)² = 34.
        assert_eq!(sq.value(0), 26);
        assert_eq!(sq.value(1), 34);
    }

    #[test]
    fn nan_is_null_for_counts_and_sums() {
        let mut p = plan(10);
        p.slots[0] = ValueSlot {
            ty: ColumnType::Float64,
            kind: SlotKind::Float,
            proj: 2,
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("pid", DataType::Utf8, true),
            Field::new("g", DataType::Utf8, true),
            Field::new("x", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["p1", "p2", "p3"])),
                Arc::new(StringArray::from(vec!["A", "A", "A"])),
                Arc::new(Float64Array::from(vec![Some(f64::NAN), Some(3.0), None])),
            ],
        )
        .unwrap();
        let mut b = Bounder::new(p);
        b.push(&batch).unwrap();
        // Rows 3, non-null 1 (NaN and NULL excluded), sum 3.
        assert_eq!(out_rows(&b.finish().unwrap()), vec![("A".into(), 3, 1, 3)]);
    }

    #[test]
    fn empty_input_without_groups_gives_one_zero_row() {
        let mut p = plan(3);
        p.groups.clear();
        let b = Bounder::new(p);
        let out = b.finish().unwrap();
        assert_eq!(out.num_rows(), 1);
        assert_eq!(out.num_columns(), 3);
    }
}
