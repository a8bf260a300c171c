//! Per-participant contribution bounding and partial aggregation.
//!
//! Rows arrive from DataFusion already filtered, projected to
//! `[privacy unit, group keys…, aggregate inputs…]`. Rows with a NULL participant, or a
//! group key that is NULL or outside its public domain, are dropped first and never count
//! towards R. Each participant then contributes at most R rows, sampled uniformly at random
//! among its rows (randomness from OpenDP), to per-group accumulators: row counts, non-null
//! counts and exact fixed-point sums.
//!
//! Three paths give that same result:
//! - **direct**: a participant with at most R rows in the whole table (counted once when
//!   the node starts, [`ParticipantCounts`]) has at most R rows after any filter, so its
//!   rows go straight into the accumulators. Its rows are still counted during the query,
//!   and more than R (the files changed) stops the query, which the engine then reruns
//!   after recounting: counts are a shortcut, never a bound that is trusted.
//! - **sampled run**: a participant with more rows whose rows form one run strictly inside
//!   a batch, in a table the count saw grouped by participant, has all its rows in that run:
//!   R of them are chosen there (partial Fisher-Yates). A participant seen again after that
//!   stops the query, which the engine reruns with reservoirs (see [`Bounder`]).
//! - **reservoir**: every other participant keeps a reservoir of at most R rows (Algorithm
//!   R; group index and needed input values only) in one shared arena, folded in at the end.
//!
//! Files are usually sorted by participant, so rows come in runs: each run is looked up
//! once, the next participant in counting order is tried before any hash lookup, and text
//! read as Utf8View is compared by view. A table that is one file can instead be read by
//! row position: the counts then know which participant owns each stretch of rows
//! ([`RowOwners`]), and the participant-id column is not read at all. Kept rows are folded
//! per batch: row counts with COUNT and SUM of one column in one pass, other aggregates one
//! at a time ([`Bounder`]).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::builder::{make_view, ListBuilder};
use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Decimal128Array, Float64Array, Int32Array,
    Int32Builder, Int64Array, Int64Builder, StringArray, StringBuilder, StringViewArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use fedq_common::quantile::QuantileGrid;
use fedq_common::wire::META_TRUNCATED_UNITS;
use fedq_common::{ColumnType, PublicValue};
use opendp::traits::samplers::fill_bytes;
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};

/// Precision and scale of the fixed-point sums on the wire.
pub const SUM_PRECISION: u8 = 38;

/// A failure while bounding; turned into a generic internal error by the caller.
#[derive(Debug)]
pub(crate) struct BoundError(pub String);

type BResult<T> = Result<T, BoundError>;

/// Lookup from a group key value to its index in the column's public domain.
#[derive(Debug, Clone)]
enum DomainIndex {
    /// Up to [`SMALL_DOMAIN`] values: compared in turn, faster than hashing. With each
    /// value, its view if it is short enough to be inlined, else `u128::MAX` (whose length
    /// field is too long to be an inline view, so it never matches one).
    Utf8Small(Vec<(Box<[u8]>, u128)>),
    Utf8(FxHashMap<String, u32>),
    Int(FxHashMap<i64, u32>),
    Bool {
        f: Option<u32>,
        t: Option<u32>,
    },
}

/// Largest text domain looked up by comparison rather than by hash.
const SMALL_DOMAIN: usize = 16;

/// A GROUP BY column with its public domain.
#[derive(Debug, Clone)]
pub(crate) struct GroupCol {
    /// Output name (as requested).
    pub name: String,
    /// Catalog type (utf8, int32, int64 or boolean).
    pub ty: ColumnType,
    /// Public domain, deduplicated, in catalog order.
    pub values: Vec<PublicValue>,
    index: DomainIndex,
    /// With a small text domain whose values all fit inside a view: a hash table of the
    /// views, the fast path of [`group_indices`].
    views: Option<ViewTable>,
    /// Position in the projected batch.
    pub proj: usize,
}

/// A collision-free hash table from inline string views to domain indices: one multiply
/// and one comparison per row, without a branch. Equal inline views are equal strings
/// (length and zero-padded bytes), and a longer string's view has another length, so a
/// view matches a slot only if it is that domain value.
#[derive(Debug, Clone)]
struct ViewTable {
    /// `(view, index)`; `u128::MAX` (the view of no string) where empty.
    slots: Vec<(u128, u32)>,
    mul: u64,
    shift: u32,
}

impl ViewTable {
    /// A table for `views` (distinct inline views), found by trying multipliers; `None` if
    /// none is collision-free within 256 slots (never for up to 16 values in practice).
    fn new(views: &[u128]) -> Option<ViewTable> {
        let min_bits = (views.len() * 2)
            .next_power_of_two()
            .trailing_zeros()
            .max(1);
        for bits in min_bits..=8 {
            let mut mul: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..256 {
                let mut slots = vec![(u128::MAX, u32::MAX); 1 << bits];
                let shift = 64 - bits;
                let fits = views.iter().enumerate().all(|(k, &v)| {
                    let slot = &mut slots[Self::hash(v, mul, shift)];
                    if slot.0 == u128::MAX {
                        *slot = (v, k as u32);
                        true
                    } else {
                        slot.0 == v
                    }
                });
                if fits {
                    return Some(ViewTable { slots, mul, shift });
                }
                mul = mul.wrapping_add(0x6A09_E667_F3BC_C909) | 1;
            }
        }
        None
    }

    #[inline]
    fn hash(v: u128, mul: u64, shift: u32) -> usize {
        ((v as u64 ^ (v >> 64) as u64).wrapping_mul(mul) >> shift) as usize
    }

    /// The domain index of a view, or `u32::MAX`.
    #[inline]
    fn get(&self, v: u128) -> u32 {
        let (d, k) = self.slots[Self::hash(v, self.mul, self.shift)];
        if d == v {
            k
        } else {
            u32::MAX
        }
    }
}

impl GroupCol {
    /// Build from a deduplicated public domain. `ty` must be a supported key type.
    pub fn new(name: String, ty: ColumnType, values: Vec<PublicValue>, proj: usize) -> Self {
        let index = match ty {
            ColumnType::Utf8 if values.len() <= SMALL_DOMAIN => DomainIndex::Utf8Small(
                values
                    .iter()
                    .map(|v| match v {
                        PublicValue::Text(s) => {
                            let b = s.as_bytes();
                            let view = if b.len() <= INLINE as usize {
                                make_view(b, 0, 0)
                            } else {
                                u128::MAX
                            };
                            (Box::<[u8]>::from(b), view)
                        }
                        // Not UTF-8, so never equal to a text value: an impossible key.
                        _ => (Box::<[u8]>::from(&b"\xff\xfe not text"[..]), u128::MAX),
                    })
                    .collect(),
            ),
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
        let views = match &index {
            DomainIndex::Utf8Small(vals) if vals.iter().all(|(_, d)| *d != u128::MAX) => {
                ViewTable::new(&vals.iter().map(|(_, d)| *d).collect::<Vec<_>>())
            }
            _ => None,
        };
        GroupCol {
            name,
            ty,
            values,
            index,
            views,
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
#[derive(Debug, Clone)]
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
    /// Distinct participants with a kept row in the group (see [`Bounder::units_seen`]).
    CountUnits,
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
    /// Like `SumFixed`, then one count in the value's bin of `grid` (2k − 1 bins). The
    /// aggregate's own accumulator cell counts the binned values; the bins occupy
    /// `grid.bins()` cells from `offset` (after one cell per aggregate, see
    /// [`BoundingPlan::layout`]).
    Histogram {
        slot: usize,
        precision: f64,
        lo_fp: f64,
        hi_fp: f64,
        grid: QuantileGrid,
        offset: usize,
    },
}

impl AggPlan {
    /// The value slot the aggregate reads, if any.
    fn input(&self) -> Option<usize> {
        match *self {
            AggPlan::CountRows | AggPlan::CountUnits => None,
            AggPlan::CountNonNull { slot }
            | AggPlan::SumFixed { slot, .. }
            | AggPlan::SumSquaresFixed { slot, .. }
            | AggPlan::Histogram { slot, .. } => Some(slot),
        }
    }

    /// For aggregates of clamped fixed-point values: the slot, the precision and the
    /// bounds in fixed point.
    fn fixed_input(&self) -> Option<FixedInput> {
        match *self {
            AggPlan::SumFixed {
                slot,
                precision,
                lo_fp,
                hi_fp,
            }
            | AggPlan::SumSquaresFixed {
                slot,
                precision,
                lo_fp,
                hi_fp,
                ..
            }
            | AggPlan::Histogram {
                slot,
                precision,
                lo_fp,
                hi_fp,
                ..
            } => Some((slot, precision, lo_fp, hi_fp)),
            _ => None,
        }
    }
}

/// An aggregate's fixed-point input: slot, precision, and the bounds in fixed point.
type FixedInput = (usize, f64, f64, f64);

/// The shape of one bounding run.
#[derive(Debug, Clone)]
pub(crate) struct BoundingPlan {
    /// R: rows kept per participant.
    pub max_rows: usize,
    /// Position of the privacy unit in the projected batch.
    pub pid_proj: usize,
    /// Whether that column holds each row's position in the table's one file instead of
    /// the participant id: the owners are then looked up in [`ParticipantCounts::owners`].
    pub pid_rows: bool,
    pub groups: Vec<GroupCol>,
    pub slots: Vec<ValueSlot>,
    pub aggs: Vec<AggPlan>,
}

impl BoundingPlan {
    /// Lay out the accumulator cells of one group: one per aggregate, then each
    /// histogram's bins (so scalar aggregates keep their index as their cell). Sets the
    /// histograms' offsets and returns the number of cells per group.
    fn layout(&mut self) -> usize {
        let mut width = self.aggs.len();
        for a in &mut self.aggs {
            if let AggPlan::Histogram { grid, offset, .. } = a {
                *offset = width;
                width += grid.bins();
            }
        }
        width
    }
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

/// Rows kept for all participants, in one arena of parallel arrays (no allocation per
/// participant). Each participant owns a contiguous range `[off, off + cap)` of row slots,
/// of which the first `len` are used. Rows of one participant usually arrive together, so
/// its range is normally the last one and grows in place; otherwise it is moved to the end
/// with doubled capacity (at most `R` slots), which keeps copying amortised O(R) and the
/// arena under twice the kept rows.
#[derive(Debug, Default)]
struct Arena {
    /// Values per row (one per value slot).
    width: usize,
    /// Group index of each row slot.
    groups: Vec<u32>,
    /// NULL mask of each row slot (bit i = value slot i is NULL).
    nulls: Vec<u64>,
    /// Values, `width` per row slot.
    values: Vec<u64>,
}

impl Arena {
    fn rows(&self) -> usize {
        self.groups.len()
    }

    /// Append `n` unused row slots.
    fn grow(&mut self, n: usize) {
        let rows = self.rows() + n;
        self.groups.resize(rows, 0);
        self.nulls.resize(rows, 0);
        self.values.resize(rows * self.width, 0);
    }

    fn set(&mut self, row: usize, group: u32, nulls: u64, vals: &[u64]) {
        self.groups[row] = group;
        self.nulls[row] = nulls;
        let w = self.width;
        self.values[row * w..(row + 1) * w].copy_from_slice(vals);
    }

    /// Copy `len` rows from `from` to `to` (non-overlapping ranges).
    fn copy_rows(&mut self, from: usize, to: usize, len: usize) {
        self.groups.copy_within(from..from + len, to);
        self.nulls.copy_within(from..from + len, to);
        let w = self.width;
        self.values.copy_within(from * w..(from + len) * w, to * w);
    }
}

/// One participant's reservoir: its row range in the [`Arena`].
#[derive(Debug, Clone, Copy, Default)]
struct Unit {
    /// Rows of this participant seen so far (after the filter).
    seen: u64,
    /// First row slot.
    off: usize,
    /// Row slots in use (`min(seen, R)`).
    len: usize,
    /// Row slots owned.
    cap: usize,
}

/// Offer one row of participant `unit` (Algorithm R). Randomness is drawn only once the
/// reservoir is full.
fn offer(
    unit: &mut Unit,
    arena: &mut Arena,
    r: usize,
    group: u32,
    nulls: u64,
    vals: &[u64],
    rng: &mut RandomBytes,
) -> BResult<()> {
    unit.seen += 1;
    if unit.len < r {
        if unit.len == unit.cap {
            if unit.off + unit.cap == arena.rows() {
                // Last range in the arena: grow in place.
                arena.grow(1);
                unit.cap += 1;
            } else {
                let cap = (unit.cap * 2).max(4).min(r).max(unit.len + 1);
                let off = arena.rows();
                arena.grow(cap);
                arena.copy_rows(unit.off, off, unit.len);
                unit.off = off;
                unit.cap = cap;
            }
        }
        arena.set(unit.off + unit.len, group, nulls, vals);
        unit.len += 1;
        return Ok(());
    }
    let j = rng.below(unit.seen)?;
    if j < r as u64 {
        arena.set(unit.off + j as usize, group, nulls, vals);
    }
    Ok(())
}

/// Participant ids seen so far, mapped to dense indices without an allocation per
/// participant: the id bytes live in one buffer, and a 64-bit hash indexes them (ids whose
/// hash collides with an earlier id's go to an overflow map).
#[derive(Debug, Default)]
struct UnitIndex {
    bytes: Vec<u8>,
    /// End of each id in `bytes`.
    ends: Vec<usize>,
    by_hash: FxHashMap<u64, u32>,
    overflow: FxHashMap<Box<str>, u32>,
}

impl UnitIndex {
    fn id(&self, i: u32) -> &[u8] {
        let i = i as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    /// Whether id `i` exists and is `pid`.
    #[inline]
    fn is(&self, i: u32, pid: &str) -> bool {
        (i as usize) < self.ends.len() && self.id(i) == pid.as_bytes()
    }

    /// Index of `pid`, if present.
    fn get(&self, pid: &str) -> Option<u32> {
        let h = FxBuildHasher.hash_one(pid);
        match self.by_hash.get(&h) {
            Some(&i) if self.id(i) == pid.as_bytes() => Some(i),
            Some(_) => self.overflow.get(pid).copied(),
            None => None,
        }
    }

    /// Index of `pid`, and whether it is new.
    fn get_or_insert(&mut self, pid: &str) -> BResult<(u32, bool)> {
        let h = FxBuildHasher.hash_one(pid);
        let next = u32::try_from(self.ends.len())
            .map_err(|_| BoundError("too many participants".into()))?;
        match self.by_hash.get(&h) {
            Some(&i) if self.id(i) == pid.as_bytes() => return Ok((i, false)),
            Some(_) => {
                if let Some(&i) = self.overflow.get(pid) {
                    return Ok((i, false));
                }
                self.overflow.insert(pid.into(), next);
            }
            None => {
                self.by_hash.insert(h, next);
            }
        }
        self.bytes.extend_from_slice(pid.as_bytes());
        self.ends.push(self.bytes.len());
        Ok((next, true))
    }
}

/// Rows per participant in a table, counted over all its rows before any filter. A
/// participant with at most R rows in the table has at most R rows after any filter, so its
/// rows are aggregated directly; only the others go through a reservoir. The counts are
/// only a shortcut: every directly aggregated participant is still counted during the query,
/// and more than R rows (the files changed since the counts were taken) stops the query
/// (see [`Bounder::is_stale`]) rather than letting a participant contribute more than R.
///
/// The counting pass also notes whether each participant's rows came in one run (files
/// sorted or grouped by participant), which lets the bounder sample a participant's rows
/// as soon as its run ends (see [`Bounder`]). That too is only a shortcut: a participant
/// seen again after its run was sampled stops the query, which then runs without it.
#[derive(Debug, Default)]
pub(crate) struct ParticipantCounts {
    ids: UnitIndex,
    counts: Vec<u32>,
    /// Batches counted.
    batches: usize,
    /// Runs of a participant already seen in an earlier run.
    repeat_runs: usize,
    /// Set when a query found a participant's rows in more than one run.
    scattered: AtomicBool,
    /// With the rows' positions in their file (see [`ParticipantCounts::add_at`]): the runs
    /// found so far, as (first row, rows, participant or [`NO_OWNER`]).
    pieces: Option<Vec<(u64, u64, u32)>>,
    /// Which participant owns each row of the file, when the counts saw the rows' positions,
    /// the rows grouped by participant, and every row exactly once.
    owners: Option<RowOwners>,
}

impl ParticipantCounts {
    /// Count the non-NULL participant ids of one batch.
    pub fn add(&mut self, pids: &ArrayRef) -> BResult<()> {
        self.add_rows(pids, None)
    }

    /// Count the participant ids of one batch of a single-file table, and note which rows
    /// of the file they own: `rows` holds each row's position in the file
    /// (`file_row_index()`). Call [`ParticipantCounts::seal`] after the last batch.
    pub fn add_at(&mut self, pids: &ArrayRef, rows: &ArrayRef) -> BResult<()> {
        let rows = downcast::<Int64Array>(rows)?;
        if rows.null_count() > 0 || rows.len() != pids.len() {
            return Err(BoundError("row positions do not match the batch".into()));
        }
        self.add_rows(pids, Some(rows.values()))
    }

    fn add_rows(&mut self, pids: &ArrayRef, rows: Option<&[i64]>) -> BResult<()> {
        let arr = text_array(pids)?;
        let pids = Text::new(&arr)?;
        let n = arr.len();
        self.batches += 1;
        let mut pieces = rows.map(|_| self.pieces.get_or_insert_with(Vec::new));
        // A run also ends where the positions jump (they should not, without a filter).
        let next_to = |i: usize, j: usize| {
            rows.is_none_or(|r| r[i].checked_add((j - i) as i64) == Some(r[j]))
        };
        let mut i = 0;
        while i < n {
            if pids.is_null(i) {
                let mut end = i + 1;
                while end < n && pids.is_null(end) && next_to(i, end) {
                    end += 1;
                }
                if let (Some(p), Some(r)) = (pieces.as_mut(), rows) {
                    p.push((r[i] as u64, (end - i) as u64, NO_OWNER));
                }
                i = end;
                continue;
            }
            let pid = pids.value(i);
            let mut end = i + 1;
            while end < n && !pids.is_null(end) && pids.same(i, end) && next_to(i, end) {
                end += 1;
            }
            let (id, new) = self.ids.get_or_insert(pid)?;
            if let (Some(p), Some(r)) = (pieces.as_mut(), rows) {
                if r[i] < 0 || id == NO_OWNER {
                    return Err(BoundError("row position out of range".into()));
                }
                p.push((r[i] as u64, (end - i) as u64, id));
            }
            if new {
                self.counts.push(0);
            } else {
                self.repeat_runs += 1;
            }
            let c = &mut self.counts[id as usize];
            *c = c.saturating_add(u32::try_from(end - i).unwrap_or(u32::MAX));
            i = end;
        }
        Ok(())
    }

    /// Number of participants counted.
    pub fn participants(&self) -> usize {
        self.counts.len()
    }

    /// Whether each participant's rows seem to come in one run. A run split by a batch
    /// boundary counts as a repeat, so up to one repeat per batch is allowed.
    pub fn grouped_by_participant(&self) -> bool {
        self.repeat_runs <= self.batches && !self.scattered.load(Ordering::Relaxed)
    }

    /// After the last batch given to [`ParticipantCounts::add_at`]: keep the rows' owners if
    /// the rows are grouped by participant and their positions cover `0..rows` exactly once
    /// (else the owners would take as much memory as the rows, or be wrong). Returns whether
    /// they were kept.
    pub fn seal(&mut self, rows: u64) -> bool {
        self.owners = None;
        let Some(mut pieces) = self.pieces.take() else {
            return false;
        };
        if !self.grouped_by_participant() {
            return false;
        }
        pieces.sort_unstable_by_key(|p| p.0);
        let mut starts = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        let mut next = 0u64;
        for (start, len, id) in pieces {
            if start != next {
                return false;
            }
            next = start.saturating_add(len);
            if ids.last() != Some(&id) {
                starts.push(start);
                ids.push(id);
            }
        }
        if next != rows {
            return false;
        }
        starts.shrink_to_fit();
        ids.shrink_to_fit();
        self.owners = Some(RowOwners { starts, ids, rows });
        true
    }

    /// Which participant owns each row of the file, if known (see [`ParticipantCounts::seal`]).
    pub fn owners(&self) -> Option<&RowOwners> {
        self.owners.as_ref()
    }

    /// Record that a query found a participant's rows in more than one run: later queries
    /// on these counts send every participant with more than R rows through a reservoir.
    pub fn mark_scattered(&self) {
        self.scattered.store(true, Ordering::Relaxed);
    }
}

/// Owner of rows whose participant id is NULL (they are dropped).
const NO_OWNER: u32 = u32::MAX;

/// Which participant owns each row of a single-file table, as runs of row positions: run
/// `k` is rows `starts[k]..starts[k + 1]` (the last ends at `rows`), owned by participant
/// `ids[k]` of the [`ParticipantCounts`] (or nobody, [`NO_OWNER`]). With it a query reads
/// each row's position in the file (`file_row_index()`, which the Parquet reader makes up
/// without reading anything) instead of decoding the participant-id column, the largest
/// column the bounder reads. The engine uses it only while the file is the one that was
/// counted (same length, modification time and inode, checked before and after the scan).
#[derive(Debug)]
pub(crate) struct RowOwners {
    starts: Vec<u64>,
    ids: Vec<u32>,
    rows: u64,
}

impl RowOwners {
    /// The row after the last one of run `k`.
    #[inline]
    fn end(&self, k: usize) -> u64 {
        self.starts.get(k + 1).copied().unwrap_or(self.rows)
    }

    /// Run `k` or a later one that holds row `r` (`r` is below `self.rows`): the run after
    /// `k` is tried first, as a scan gives rows in order, else a binary search.
    #[inline]
    fn find(&self, k: usize, r: u64) -> usize {
        if self.starts.get(k).is_some_and(|&s| s <= r) && r < self.end(k) {
            k
        } else if r >= self.end(k) && r < self.end(k + 1) {
            k + 1
        } else {
            self.starts.partition_point(|&s| s <= r).saturating_sub(1)
        }
    }

    /// Split a batch by owner: `out` gets `(owner, end)` for each stretch of rows
    /// `previous end..end` that one participant (or nobody, [`NO_OWNER`]) owns, given
    /// each row's position in `rows`. Positions in ascending order (as a scan gives them)
    /// are split a whole run at a time; others row by row.
    fn runs_of(&self, rows: &[i64], out: &mut Vec<(u32, u32)>) -> BResult<()> {
        out.clear();
        let n = rows.len();
        if u32::try_from(n).is_err() {
            return Err(BoundError("batch too large".into()));
        }
        let ascending = rows.windows(2).all(|w| w[0] < w[1]);
        let (mut i, mut k) = (0usize, 0usize);
        while i < n {
            let r = u64::try_from(rows[i])
                .ok()
                .filter(|&r| r < self.rows)
                .ok_or_else(|| BoundError("row position out of range".into()))?;
            k = self.find(k, r);
            let Some(&id) = self.ids.get(k) else {
                return Err(BoundError("row position out of range".into()));
            };
            let j = if ascending {
                // Rows i.. are ascending from r >= 0; those below the run's end are its.
                let end = self.end(k);
                let guess = i + usize::try_from(end - r).unwrap_or(usize::MAX).min(n - i);
                // Consecutive positions up to the guess: exactly the run's rows.
                if rows[guess - 1] - rows[i] == (guess - 1 - i) as i64 {
                    guess
                } else {
                    i + rows[i..].partition_point(|&x| (x as u64) < end)
                }
            } else {
                i + 1
            };
            // Batches have far fewer than 2^32 rows (checked above the loop).
            let end = j as u32;
            match out.last_mut() {
                Some((last, e)) if *last == id => *e = end,
                _ => out.push((id, end)),
            }
            i = j;
        }
        Ok(())
    }
}

/// Where the rows of one participant go.
#[derive(Clone, Copy)]
enum Target {
    /// Known to have at most R rows: aggregated directly. Index into the counts.
    Direct(usize),
    /// Known to have more than R rows in the table, and not seen yet in this query. Index
    /// into the counts.
    Known(usize),
    /// Through the reservoir with this unit index.
    Reservoir(usize),
}

/// Mark in `direct_seen` of a participant whose run was sampled on the spot.
const SAMPLED: u32 = u32::MAX;

/// A text column of one batch: Utf8, or Utf8View (how Parquet text is read).
#[derive(Clone, Copy)]
enum Text<'a> {
    Utf8(&'a StringArray),
    View(&'a StringViewArray),
}

/// Longest string stored inside its view.
const INLINE: u32 = 12;

impl<'a> Text<'a> {
    fn new(a: &'a ArrayRef) -> BResult<Text<'a>> {
        match a.data_type() {
            DataType::Utf8 => Ok(Text::Utf8(downcast(a)?)),
            DataType::Utf8View => Ok(Text::View(downcast(a)?)),
            other => Err(BoundError(format!("expected text, found {other}"))),
        }
    }

    #[inline]
    fn is_null(&self, i: usize) -> bool {
        match self {
            Text::Utf8(a) => a.is_null(i),
            Text::View(a) => a.is_null(i),
        }
    }

    #[inline]
    fn value(&self, i: usize) -> &'a str {
        match self {
            Text::Utf8(a) => a.value(i),
            Text::View(a) => a.value(i),
        }
    }

    /// Whether rows `i` and `j` hold the same string (NULLs ignored). Views of strings up to
    /// 12 bytes hold the whole zero-padded string, and equal longer views point at the same
    /// bytes, so most comparisons need no memory access beyond the views.
    #[inline]
    fn same(&self, i: usize, j: usize) -> bool {
        match self {
            Text::Utf8(a) => a.value(i) == a.value(j),
            Text::View(a) => {
                let v = a.views();
                let (x, y) = (v[i], v[j]);
                if x == y {
                    return true;
                }
                let len = x as u32;
                if len <= INLINE || len != y as u32 {
                    return false;
                }
                a.value(i) == a.value(j)
            }
        }
    }
}

/// Typed view of a group key column of one batch.
enum KeyArray<'a> {
    Utf8(Text<'a>),
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

/// `a` itself if it is Utf8 or Utf8View, else cast to Utf8.
fn text_array(a: &ArrayRef) -> BResult<ArrayRef> {
    match a.data_type() {
        DataType::Utf8 | DataType::Utf8View => Ok(Arc::clone(a)),
        _ => as_type(a, &DataType::Utf8),
    }
}

fn downcast<T: 'static>(a: &ArrayRef) -> BResult<&T> {
    a.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| BoundError(format!("unexpected array type {}", a.data_type())))
}

/// Streaming bounder: feed batches with [`Bounder::push`], then [`Bounder::finish`].
///
/// Each batch is bounded in two passes. The first walks the participants' runs and decides
/// which rows are kept now: rows of direct participants, and every row of a participant
/// whose whole set of rows is one run inside this batch, sampled down to R on the spot
/// (uniformly, as a reservoir would). Rows that are dropped, or that go into a reservoir,
/// are sent to a spare "trash" group. The second pass folds the batch into the accumulators
/// without a branch per row: row counts with COUNT and SUM of one column (AVG) in one
/// pass, any other set of aggregates one aggregate at a time.
///
/// A run is known to hold all of a participant's rows when the table's counting pass saw
/// rows grouped by participant, the run lies strictly inside its batch (a row of someone
/// else before and after it), and the participant has not been seen before. Batches are
/// contiguous stretches of the table's rows, so the participant's rows cannot continue
/// elsewhere. That is checked rather than trusted: a participant seen again after its run
/// was sampled stops the query ([`Bounder::is_scattered`]), and the engine runs it again
/// with every participant of more than R rows in a reservoir.
pub(crate) struct Bounder {
    plan: BoundingPlan,
    /// Stride of each group column in the group index.
    strides: Vec<u32>,
    /// Rows per participant in the whole table, when known.
    counts: Arc<ParticipantCounts>,
    /// Per participant of `counts`: rows aggregated directly so far, or [`SAMPLED`] once
    /// its run was sampled on the spot.
    direct_seen: Vec<u32>,
    /// Whether complete runs may be sampled on the spot (see above).
    sample_runs: bool,
    /// Reservoir unit of each participant of `counts` that has one.
    known_units: FxHashMap<u32, u32>,
    /// Participants absent from `counts` (their reservoir unit has the same index).
    ids: UnitIndex,
    /// Reservoir unit of each participant in `ids`.
    other_units: Vec<u32>,
    units: Vec<Unit>,
    arena: Arena,
    accs: Accumulators,
    /// Group index of rows that are not folded in now (dropped, or kept in a reservoir).
    trash: u32,
    rng: RandomBytes,
    stale: bool,
    scattered: bool,
    /// Participants whose run was sampled on the spot and had more than R rows.
    truncated_runs: usize,
    /// The participant expected next: files are usually sorted by participant, in the order
    /// they were counted, so checking the next id first avoids most hash lookups.
    cursor: u32,
    /// Group index per row of the current batch (reused buffer).
    gidx: Vec<u32>,
    /// The current batch split by owner, from the rows' positions (reused buffer).
    owner_runs: Vec<(u32, u32)>,
    /// Row positions of the run being sampled (reused buffer).
    picks: Vec<u32>,
    /// Per input column, whether each row of the batch has a value (reused buffers).
    valid: Vec<Vec<bool>>,
    /// Fixed-point values of one input column in a chunk of rows, per-lane and per-group
    /// sums (reused buffers, see [`Bounder::fold_kept`]).
    fixed: Vec<i64>,
    lanes: Vec<i64>,
    /// Kept rows per group in a chunk (reused buffer).
    rows_per_group: Vec<i64>,
    /// One row's values as stored in a reservoir (reused buffer).
    row_vals: Vec<u64>,
    sums: Vec<i64>,
    /// Per group, non-null values of a chunk (see [`group_sums3`]).
    non_null: Vec<i64>,
    /// With a `CountUnits` aggregate: the (participant, group) pairs already counted, the
    /// participant as `(0, counts index)` for direct ones and `(1, unit)` for reservoirs.
    units_seen: Option<FxHashSet<(u32, u32, u32)>>,
}

impl Bounder {
    /// A bounder that sends every participant through a reservoir.
    #[cfg(test)]
    pub fn new(plan: BoundingPlan) -> Self {
        Self::with_counts(plan, Arc::new(ParticipantCounts::default()))
    }

    /// A bounder that aggregates participants with at most R rows in `counts` directly, and
    /// samples the others' runs on the spot when `counts` saw rows grouped by participant.
    pub fn with_counts(mut plan: BoundingPlan, counts: Arc<ParticipantCounts>) -> Self {
        let cells = plan.layout();
        let mut strides = vec![0u32; plan.groups.len()];
        let mut s: u32 = 1;
        for (k, g) in plan.groups.iter().enumerate().rev() {
            strides[k] = s;
            s = s.saturating_mul((g.values.len() as u32).max(1));
        }
        let width = plan.slots.len();
        let units_seen = plan
            .aggs
            .iter()
            .any(|a| matches!(a, AggPlan::CountUnits))
            .then(FxHashSet::default);
        let mut accs = Accumulators::new(&strides, &plan, cells);
        if plan.groups.is_empty() {
            accs.row(0);
        }
        Bounder {
            direct_seen: vec![0; counts.participants()],
            sample_runs: counts.grouped_by_participant(),
            counts,
            plan,
            strides,
            known_units: FxHashMap::default(),
            ids: UnitIndex::default(),
            other_units: Vec::new(),
            units: Vec::new(),
            arena: Arena {
                width,
                ..Arena::default()
            },
            trash: accs.trash(),
            accs,
            rng: RandomBytes::new(),
            stale: false,
            scattered: false,
            truncated_runs: 0,
            cursor: 0,
            gidx: Vec::new(),
            owner_runs: Vec::new(),
            picks: Vec::new(),
            valid: Vec::new(),
            fixed: Vec::new(),
            lanes: Vec::new(),
            rows_per_group: Vec::new(),
            row_vals: vec![0; width],
            sums: Vec::new(),
            non_null: Vec::new(),
            units_seen,
        }
    }

    /// Send every participant with more than R rows through a reservoir, whatever the
    /// counts saw: for inputs whose order is not the table's (partition selection).
    pub fn without_run_sampling(mut self) -> Self {
        self.sample_runs = false;
        self
    }

    /// Heap bytes held by the bounding state (reservoir arena, participant index,
    /// per-participant counters, group accumulators), from capacities: what the query's
    /// memory reservation is sized to after each batch.
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        fn map<K, V, S>(m: &std::collections::HashMap<K, V, S>) -> usize {
            m.capacity() * (size_of::<K>() + size_of::<V>() + 1)
        }
        let ids = self.ids.bytes.capacity()
            + self.ids.ends.capacity() * size_of::<usize>()
            + map(&self.ids.by_hash)
            + map(&self.ids.overflow)
            + self.ids.overflow.keys().map(|k| k.len()).sum::<usize>();
        let arena = self.arena.groups.capacity() * size_of::<u32>()
            + self.arena.nulls.capacity() * size_of::<u64>()
            + self.arena.values.capacity() * size_of::<u64>();
        let accs = match &self.accs {
            Accumulators::Dense {
                present, values, ..
            } => present.capacity() + values.capacity() * size_of::<i128>(),
            Accumulators::Sparse { naggs, map: m } => map(m) + m.len() * naggs * size_of::<i128>(),
        };
        let seen = self
            .units_seen
            .as_ref()
            .map_or(0, |s| s.capacity() * (size_of::<(u32, u32, u32)>() + 1));
        ids + arena
            + accs
            + seen
            + self.direct_seen.capacity() * size_of::<u32>()
            + map(&self.known_units)
            + self.other_units.capacity() * size_of::<u32>()
            + self.units.capacity() * size_of::<Unit>()
            + (self.gidx.capacity() + self.picks.capacity()) * size_of::<u32>()
            + self.owner_runs.capacity() * size_of::<(u32, u32)>()
            + self.valid.iter().map(Vec::capacity).sum::<usize>()
            + (self.fixed.capacity()
                + self.lanes.capacity()
                + self.sums.capacity()
                + self.rows_per_group.capacity()
                + self.non_null.capacity())
                * size_of::<i64>()
            + self.row_vals.capacity() * size_of::<u64>()
    }

    /// Whether the query stopped because a participant the counts said had at most R rows
    /// had more (the files changed). Recount and run the query again.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Whether the query stopped because a participant whose run was sampled on the spot
    /// had rows elsewhere too. Mark the counts ([`ParticipantCounts::mark_scattered`]) and
    /// run the query again.
    pub fn is_scattered(&self) -> bool {
        self.scattered
    }

    /// Number of participants seen so far.
    #[cfg(test)]
    pub fn participants(&self) -> usize {
        self.direct_seen.iter().filter(|&&c| c > 0).count() + self.units.len()
    }

    /// Where the rows of `pid` go.
    fn target(&mut self, pid: &str) -> BResult<Target> {
        let known = if self.counts.ids.is(self.cursor, pid) {
            Some(self.cursor)
        } else {
            self.counts.ids.get(pid)
        };
        if let Some(id) = known {
            self.cursor = id.saturating_add(1);
            return self.known_target(id);
        }
        let next = self.units.len();
        let (i, new) = self.ids.get_or_insert(pid)?;
        if !new {
            return Ok(Target::Reservoir(self.other_units[i as usize] as usize));
        }
        self.other_units.push(next as u32);
        self.new_unit()
    }

    /// Where the rows of participant `id` of the counts go.
    fn known_target(&mut self, id: u32) -> BResult<Target> {
        let r = self.plan.max_rows;
        let Some(&count) = self.counts.counts.get(id as usize) else {
            return Err(BoundError("participant missing from the counts".into()));
        };
        if count as usize <= r {
            return Ok(Target::Direct(id as usize));
        }
        if self.direct_seen[id as usize] == SAMPLED {
            self.scattered = true;
            return Err(BoundError(
                "a participant's rows came in more than one run".into(),
            ));
        }
        Ok(match self.known_units.get(&id) {
            Some(&u) => Target::Reservoir(u as usize),
            None => Target::Known(id as usize),
        })
    }

    /// A new, empty reservoir.
    fn new_unit(&mut self) -> BResult<Target> {
        let next = self.units.len();
        if u32::try_from(next).is_err() {
            return Err(BoundError("too many participants".into()));
        }
        self.units.push(Unit {
            off: self.arena.rows(),
            ..Unit::default()
        });
        Ok(Target::Reservoir(next))
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
        let pid_col = col(self.plan.pid_proj)?;

        let mut key_owned = Vec::with_capacity(self.plan.groups.len());
        for g in &self.plan.groups {
            let a = col(g.proj)?;
            key_owned.push(match g.ty {
                ColumnType::Utf8 => text_array(a)?,
                ty => as_type(a, &ty.arrow_type())?,
            });
        }
        let mut keys = Vec::with_capacity(key_owned.len());
        for (g, a) in self.plan.groups.iter().zip(&key_owned) {
            keys.push(match g.ty {
                ColumnType::Utf8 => KeyArray::Utf8(Text::new(a)?),
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

        // Group index of every row, column by column. Rows whose key is NULL or outside the
        // public domain (u32::MAX) are dropped before bounding: they never count towards R.
        let mut gidx = std::mem::take(&mut self.gidx);
        group_indices(&self.plan.groups, &self.strides, &keys, n, &mut gidx);
        let trash = self.trash;
        for g in gidx.iter_mut() {
            *g = (*g).min(trash);
        }

        let result = if self.plan.pid_rows {
            self.owned_runs(pid_col, n, &mut gidx, &vals)
        } else {
            self.id_runs(pid_col, n, &mut gidx, &vals)
        };
        if result.is_ok() {
            self.fold_kept(&gidx, &vals);
        }
        self.gidx = gidx;
        result
    }

    /// Bound a batch's runs of participants given by their ids.
    fn id_runs(
        &mut self,
        pid_col: &ArrayRef,
        n: usize,
        gidx: &mut [u32],
        vals: &[ValArray],
    ) -> BResult<()> {
        let pid_arr = text_array(pid_col)?;
        let pids = Text::new(&pid_arr)?;
        let mut i = 0;
        while i < n {
            if pids.is_null(i) {
                gidx[i] = self.trash;
                i += 1;
                continue;
            }
            // Rows of one participant are usually adjacent: find the run and look the
            // participant up once.
            let pid = pids.value(i);
            let mut end = i + 1;
            while end < n && !pids.is_null(end) && pids.same(i, end) {
                end += 1;
            }
            let target = self.target(pid)?;
            self.run(target, i..end, n, gidx, vals)?;
            i = end;
        }
        Ok(())
    }

    /// Bound a batch's runs of participants given by their rows' positions in the file.
    fn owned_runs(
        &mut self,
        pid_col: &ArrayRef,
        n: usize,
        gidx: &mut [u32],
        vals: &[ValArray],
    ) -> BResult<()> {
        let rows = downcast::<Int64Array>(pid_col)?;
        if rows.null_count() > 0 {
            return Err(BoundError("row positions with NULLs".into()));
        }
        let counts = Arc::clone(&self.counts);
        let owners = counts
            .owners()
            .ok_or_else(|| BoundError("row positions without their owners".into()))?;
        let mut runs = std::mem::take(&mut self.owner_runs);
        let result = owners.runs_of(rows.values(), &mut runs).and_then(|()| {
            let mut i = 0;
            for &(id, end) in &runs {
                let end = end as usize;
                if id == NO_OWNER {
                    gidx[i..end].fill(self.trash);
                } else {
                    let target = self.known_target(id)?;
                    self.run(target, i..end, n, gidx, vals)?;
                }
                i = end;
            }
            Ok(())
        });
        self.owner_runs = runs;
        result
    }

    /// Bound the rows `rows` of one participant, in a batch of `n` rows: leave the rows kept
    /// now in `gidx`, and send the others to the trash group.
    fn run(
        &mut self,
        target: Target,
        rows: std::ops::Range<usize>,
        n: usize,
        gidx: &mut [u32],
        vals: &[ValArray],
    ) -> BResult<()> {
        let r = self.plan.max_rows;
        let trash = self.trash;
        let inside = rows.start > 0 && rows.end < n;
        let target = match target {
            Target::Known(id) if self.sample_runs && inside => {
                self.direct_seen[id] = SAMPLED;
                self.sample_run(rows.clone(), gidx)?;
                self.count_units(0, id as u32, &gidx[rows]);
                return Ok(());
            }
            Target::Known(id) => {
                let unit = self.units.len() as u32;
                self.known_units.insert(id as u32, unit);
                self.new_unit()?
            }
            t => t,
        };
        match target {
            Target::Direct(id) => {
                let kept = gidx[rows.clone()].iter().filter(|&&g| g != trash).count();
                let seen = &mut self.direct_seen[id];
                *seen = seen.saturating_add(u32::try_from(kept).unwrap_or(u32::MAX));
                if *seen as usize > r {
                    self.stale = true;
                    return Err(BoundError(
                        "participant counts are stale: the table's files changed".into(),
                    ));
                }
                self.count_units(0, id as u32, &gidx[rows]);
            }
            Target::Reservoir(u) => {
                for row in rows {
                    let group = gidx[row];
                    if group == trash {
                        continue;
                    }
                    let nulls = row_values(vals, row, &mut self.row_vals);
                    offer(
                        &mut self.units[u],
                        &mut self.arena,
                        r,
                        group,
                        nulls,
                        &self.row_vals,
                        &mut self.rng,
                    )?;
                    gidx[row] = trash;
                }
            }
            Target::Known(_) => {
                return Err(BoundError("participant without a reservoir".into()));
            }
        }
        Ok(())
    }

    /// Keep R rows of a participant's complete run, chosen uniformly at random among its
    /// rows that are not dropped (a partial Fisher-Yates shuffle of their positions, with as
    /// many draws as the smaller of the kept and the dropped rows), and trash the others.
    fn sample_run(&mut self, rows: std::ops::Range<usize>, gidx: &mut [u32]) -> BResult<()> {
        let r = self.plan.max_rows;
        let trash = self.trash;
        self.picks.clear();
        self.picks
            .extend(rows.filter(|&row| gidx[row] != trash).map(|row| row as u32));
        let m = self.picks.len();
        if m <= r {
            return Ok(());
        }
        self.truncated_runs += 1;
        // After k steps, picks[..k] is a uniform random k-subset of the positions.
        let k = r.min(m - r);
        for step in 0..k {
            let j = step + self.rng.below((m - step) as u64)? as usize;
            self.picks.swap(step, j);
        }
        let dropped = if k == r {
            &self.picks[r..]
        } else {
            &self.picks[..k]
        };
        for &row in dropped {
            gidx[row as usize] = trash;
        }
        Ok(())
    }

    /// With a `CountUnits` aggregate, count participant `(kind, id)` once in each group of
    /// its kept rows `groups`.
    fn count_units(&mut self, kind: u32, id: u32, groups: &[u32]) {
        if let Some(seen) = &mut self.units_seen {
            for &g in groups {
                if g != self.trash && seen.insert((kind, id, g)) {
                    count_unit(&self.plan, self.accs.row(g));
                }
            }
        }
    }

    /// Fold the rows of a batch that are kept now (every row whose group is not the trash
    /// group) into the accumulators: in one pass when the aggregates read one column at
    /// most (see [`single_input`] and [`group_sums3`]), else one aggregate at a time.
    /// Counts and sums are added up per chunk of [`CHUNK`] rows in `i64` (see
    /// [`group_sums`]), then into the `i128` accumulators.
    fn fold_kept(&mut self, gidx: &[u32], vals: &[ValArray]) {
        let Accumulators::Dense {
            naggs,
            present,
            values,
        } = &mut self.accs
        else {
            // A sparse group space: row by row.
            for (row, &g) in gidx.iter().enumerate() {
                if g != self.trash {
                    let nulls = row_values(vals, row, &mut self.row_vals);
                    fold(&self.plan, self.accs.row(g), nulls, &self.row_vals);
                }
            }
            return;
        };
        let w = *naggs;
        let groups = present.len();
        let n = gidx.len();
        // Which values are neither NULL nor NaN, once per input column.
        let valid = &mut self.valid;
        valid.resize_with(vals.len(), Vec::new);
        for (v, out) in vals.iter().zip(valid.iter_mut()) {
            not_null(v, n, out);
        }
        let (lanes, sums, fixed) = (&mut self.lanes, &mut self.sums, &mut self.fixed);
        let (rows_per_group, non_null) = (&mut self.rows_per_group, &mut self.non_null);
        let single = single_input(&self.plan.aggs);
        for (c, chunk) in gidx.chunks(CHUNK).enumerate() {
            let rows = c * CHUNK..c * CHUNK + chunk.len();
            if let Some((slot, sum)) = single {
                // Row counts, and COUNT and SUM of one column: one pass folds them all.
                let ok = &valid[slot][rows.clone()];
                match sum {
                    Some((_, precision, lo_fp, hi_fp)) => {
                        fixed_column(&vals[slot], rows, precision, lo_fp, hi_fp, fixed);
                        group_sums3::<true>(chunk, groups, lanes, ok, fixed);
                    }
                    None => group_sums3::<false>(chunk, groups, lanes, ok, &[]),
                }
                rows_per_group.clear();
                non_null.clear();
                sums.clear();
                for cell in lanes.chunks_exact(3 * LANES) {
                    let total = |k: usize| (0..LANES).map(|l| cell[l * 3 + k]).sum::<i64>();
                    rows_per_group.push(total(0));
                    non_null.push(total(1));
                    sums.push(total(2));
                }
                for (p, &s) in present.iter_mut().zip(rows_per_group.iter()) {
                    *p |= s > 0;
                }
                for (i, a) in self.plan.aggs.iter().enumerate() {
                    let from: &[i64] = match a {
                        AggPlan::CountRows => rows_per_group,
                        AggPlan::CountNonNull { .. } => non_null,
                        AggPlan::SumFixed { .. } => sums,
                        // Counted once per participant and group while bounding; nothing
                        // else passes `single_input`.
                        _ => continue,
                    };
                    for (g, &s) in from.iter().enumerate() {
                        let c = &mut values[g * w + i];
                        *c = c.saturating_add(i128::from(s));
                    }
                }
                continue;
            }
            group_sums(chunk, groups, lanes, rows_per_group, |_| 1);
            for (p, &s) in present.iter_mut().zip(rows_per_group.iter()) {
                *p |= s > 0;
            }
            for (i, a) in self.plan.aggs.iter().enumerate() {
                let cell = |g: usize| g * w + i;
                // The aggregate's input column: which rows have a value, and, for sums and
                // histograms, their clamped fixed-point values.
                let ok: &[bool] = match a.input() {
                    Some(slot) => &valid[slot][rows.clone()],
                    None => &[],
                };
                if let Some((slot, precision, lo_fp, hi_fp)) = a.fixed_input() {
                    fixed_column(&vals[slot], rows.clone(), precision, lo_fp, hi_fp, fixed);
                }
                match *a {
                    AggPlan::CountRows => {
                        for (g, &s) in rows_per_group.iter().enumerate() {
                            values[cell(g)] += i128::from(s);
                        }
                    }
                    // Counted once per participant and group while bounding.
                    AggPlan::CountUnits => {}
                    AggPlan::CountNonNull { .. } => {
                        group_sums(chunk, groups, lanes, sums, |r| i64::from(ok[r]));
                        for (g, &s) in sums.iter().enumerate() {
                            values[cell(g)] += i128::from(s);
                        }
                    }
                    AggPlan::SumFixed { .. } => {
                        // |fp| <= 1e15, so a chunk's sum fits in i64.
                        group_sums(chunk, groups, lanes, sums, |r| fixed[r] & -i64::from(ok[r]));
                        for (g, &s) in sums.iter().enumerate() {
                            let c = &mut values[cell(g)];
                            *c = c.saturating_add(i128::from(s));
                        }
                    }
                    AggPlan::SumSquaresFixed { mid_fp, .. } => {
                        for (r, &g) in chunk.iter().enumerate() {
                            if ok[r] {
                                // |fp - mid| <= 2e12 (validated), so the square fits.
                                let d = i128::from(fixed[r]).saturating_sub(mid_fp);
                                let c = &mut values[cell(g as usize)];
                                *c = c.saturating_add(d.saturating_mul(d));
                            }
                        }
                    }
                    AggPlan::Histogram { grid, offset, .. } => {
                        for (r, &g) in chunk.iter().enumerate() {
                            if ok[r] {
                                let g = g as usize;
                                values[cell(g)] += 1;
                                values[g * w + offset + grid.bin_of(i128::from(fixed[r]))] += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Fold the reservoirs into the per-group accumulators and build the response batch.
    pub fn finish(self) -> BResult<RecordBatch> {
        let Bounder {
            plan,
            strides,
            units,
            arena,
            mut accs,
            mut units_seen,
            truncated_runs,
            ..
        } = self;
        let w = arena.width;
        for (u, unit) in units.iter().enumerate() {
            for row in unit.off..unit.off + unit.len {
                let vals = &arena.values[row * w..(row + 1) * w];
                let group = arena.groups[row];
                let acc = accs.row(group);
                fold(&plan, acc, arena.nulls[row], vals);
                if let Some(seen) = &mut units_seen {
                    if seen.insert((1, u as u32, group)) {
                        count_unit(&plan, acc);
                    }
                }
            }
        }
        let truncated = truncated_runs
            + units
                .iter()
                .filter(|u| u.seen > plan.max_rows as u64)
                .count();
        let (keys, values) = accs.into_sorted();
        let out = build_output(&plan, &strides, &keys, &values)?;
        let schema = out.schema().as_ref().clone().with_metadata(
            [(META_TRUNCATED_UNITS.to_string(), truncated.to_string())]
                .into_iter()
                .collect(),
        );
        out.with_schema(Arc::new(schema))
            .map_err(|e| BoundError(e.to_string()))
    }
}

/// The values of row `row` into `out` as stored in a reservoir (integers as i64 bits,
/// floats as f64 bits), and its NULL mask (bit k: slot k is NULL, or NaN).
#[inline]
fn row_values(vals: &[ValArray], row: usize, out: &mut [u64]) -> u64 {
    let mut nulls = 0u64;
    for (k, v) in vals.iter().enumerate() {
        let (is_null, bits) = match v {
            ValArray::Int32(a) => (a.is_null(row), a.value(row) as i64 as u64),
            ValArray::Int64(a) => (a.is_null(row), a.value(row) as u64),
            // NaN counts as NULL everywhere (COUNT(col) and SUM alike), so a NaN can never
            // be counted yet contribute nothing to a centred sum.
            ValArray::Float64(a) => {
                let x = a.value(row);
                (a.is_null(row) || x.is_nan(), x.to_bits())
            }
            ValArray::Any(a) => (a.is_null(row), 0),
        };
        if is_null {
            nulls |= 1 << k;
        }
        out[k] = bits;
    }
    nulls
}

/// Rows folded per chunk: with values within ±1e15, a chunk's sum fits in an `i64`.
const CHUNK: usize = 8192;

/// Interleaved copies of the per-group sums in [`group_sums`].
const LANES: usize = 4;

/// Per group `g`, the sum of `f(r)` over the rows `r` of `chunk` whose group is `g`, into
/// `out[g]`. Consecutive rows add into different copies of the groups (`LANES` of them),
/// so that rows of the same group do not each wait for the previous addition.
#[inline]
fn group_sums(
    chunk: &[u32],
    groups: usize,
    lanes: &mut Vec<i64>,
    out: &mut Vec<i64>,
    f: impl Fn(usize) -> i64,
) {
    lanes.clear();
    lanes.resize(groups * LANES, 0);
    let mut quads = chunk.chunks_exact(LANES);
    let mut base = 0;
    for quad in &mut quads {
        for (l, &g) in quad.iter().enumerate() {
            lanes[g as usize * LANES + l] += f(base + l);
        }
        base += LANES;
    }
    for (l, &g) in quads.remainder().iter().enumerate() {
        lanes[g as usize * LANES + l] += f(base + l);
    }
    out.clear();
    out.extend(lanes.chunks_exact(LANES).map(|c| c.iter().sum::<i64>()));
}

/// When every aggregate is a row count, a participant count, or a COUNT or SUM of one and
/// the same column (with the same bounds): that column's slot and, with a SUM, its
/// [`AggPlan::fixed_input`].
fn single_input(aggs: &[AggPlan]) -> Option<(usize, Option<FixedInput>)> {
    let mut slot = None;
    let mut sum = None;
    for a in aggs {
        match a {
            AggPlan::CountRows | AggPlan::CountUnits => continue,
            AggPlan::CountNonNull { .. } | AggPlan::SumFixed { .. } => {}
            _ => return None,
        }
        let s = a.input()?;
        if *slot.get_or_insert(s) != s {
            return None;
        }
        if let Some(f) = a.fixed_input() {
            if *sum.get_or_insert(f) != f {
                return None;
            }
        }
    }
    slot.map(|s| (s, sum))
}

/// Per group `g` of `chunk`, three sums at once, into `lanes` as [`group_sums`] lays them
/// out with three values per lane: rows, rows whose value is not NULL (`ok`), and, with
/// `SUM`, the sum of their `fixed` values (the third is 0 without).
#[inline]
fn group_sums3<const SUM: bool>(
    chunk: &[u32],
    groups: usize,
    lanes: &mut Vec<i64>,
    ok: &[bool],
    fixed: &[i64],
) {
    lanes.clear();
    lanes.resize(groups * LANES * 3, 0);
    let ok = &ok[..chunk.len()];
    let fixed = if SUM { &fixed[..chunk.len()] } else { &[] };
    let mut add = |r: usize, l: usize, g: u32| {
        let cell = &mut lanes[(g as usize * LANES + l) * 3..][..3];
        let o = i64::from(ok[r]);
        cell[0] += 1;
        cell[1] += o;
        if SUM {
            // |fp| <= 1e15, so a chunk's sum fits in i64.
            cell[2] += fixed[r] & -o;
        }
    };
    let mut quads = chunk.chunks_exact(LANES);
    let mut base = 0;
    for quad in &mut quads {
        for (l, &g) in quad.iter().enumerate() {
            add(base + l, l, g);
        }
        base += LANES;
    }
    for (l, &g) in quads.remainder().iter().enumerate() {
        add(base + l, l, g);
    }
}

/// Whether each of the first `n` values of `v` is neither NULL nor NaN, into `out`.
fn not_null(v: &ValArray, n: usize, out: &mut Vec<bool>) {
    out.clear();
    let nulls = match v {
        ValArray::Int32(a) => a.nulls(),
        ValArray::Int64(a) => a.nulls(),
        ValArray::Float64(a) => a.nulls(),
        // Only NULL-ness is kept: no value to sum.
        ValArray::Any(a) => a.nulls(),
    };
    match nulls {
        None => out.resize(n, true),
        Some(b) => {
            // 64 validity bits at a time, without a branch per row.
            let chunks = b.inner().bit_chunks();
            for c in chunks.iter() {
                out.extend((0..64).map(|k| (c >> k) & 1 == 1));
            }
            let rem = chunks.remainder_bits();
            out.extend((0..chunks.remainder_len()).map(|k| (rem >> k) & 1 == 1));
            out.resize(n, false);
        }
    }
    if let ValArray::Float64(a) = v {
        for (ok, x) in out.iter_mut().zip(a.values().iter()) {
            *ok &= !x.is_nan();
        }
    }
}

/// The clamped fixed-point value of each row of `rows` of `v` into `fixed`, as
/// [`fixed_value`] does row by row. NULL, NaN and a column with no values give some value
/// within the bounds, which the caller masks with [`not_null`].
fn fixed_column(
    v: &ValArray,
    rows: std::ops::Range<usize>,
    precision: f64,
    lo_fp: f64,
    hi_fp: f64,
    fixed: &mut Vec<i64>,
) {
    fixed.clear();
    let fp = |x: f64| round_clamp(x / precision, lo_fp, hi_fp);
    match v {
        ValArray::Int32(a) => fixed.extend(a.values()[rows].iter().map(|&x| fp(f64::from(x)))),
        ValArray::Int64(a) => fixed.extend(a.values()[rows].iter().map(|&x| fp(x as f64))),
        ValArray::Float64(a) => fixed.extend(a.values()[rows].iter().map(|&x| fp(x))),
        ValArray::Any(_) => fixed.resize(rows.len(), 0),
    }
}

/// Count a participant once in a group's `CountUnits` accumulators.
#[inline]
fn count_unit(plan: &BoundingPlan, acc: &mut [i128]) {
    for (a, slot_acc) in plan.aggs.iter().zip(acc.iter_mut()) {
        if matches!(a, AggPlan::CountUnits) {
            *slot_acc += 1;
        }
    }
}

/// The clamped fixed-point value of `slot` in a kept row; `None` if it is NULL (or NaN).
#[inline]
fn fixed_value(
    plan: &BoundingPlan,
    slot: usize,
    nulls: u64,
    vals: &[u64],
    precision: f64,
    lo_fp: f64,
    hi_fp: f64,
) -> Option<i128> {
    if nulls & (1 << slot) != 0 {
        return None;
    }
    let v = match plan.slots[slot].kind {
        SlotKind::Int => vals[slot] as i64 as f64,
        SlotKind::Float => f64::from_bits(vals[slot]),
        SlotKind::NullOnly => return None,
    };
    to_fixed(v, precision, lo_fp, hi_fp)
}

/// Add one kept row to its group's accumulators.
#[inline]
fn fold(plan: &BoundingPlan, acc: &mut [i128], nulls: u64, vals: &[u64]) {
    for (i, a) in plan.aggs.iter().enumerate() {
        let slot_acc = &mut acc[i];
        match *a {
            AggPlan::CountRows => *slot_acc += 1,
            // Counted once per participant and group by the caller.
            AggPlan::CountUnits => {}
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
                if let Some(fp) = fixed_value(plan, slot, nulls, vals, precision, lo_fp, hi_fp) {
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
                if let Some(fp) = fixed_value(plan, slot, nulls, vals, precision, lo_fp, hi_fp) {
                    // |fp - mid| <= 2e12 (validated), so the square fits.
                    let d = fp.saturating_sub(mid_fp);
                    *slot_acc = slot_acc.saturating_add(d.saturating_mul(d));
                }
            }
            AggPlan::Histogram {
                slot,
                precision,
                lo_fp,
                hi_fp,
                grid,
                offset,
            } => {
                if let Some(fp) = fixed_value(plan, slot, nulls, vals, precision, lo_fp, hi_fp) {
                    *slot_acc += 1;
                    acc[offset + grid.bin_of(fp)] += 1;
                }
            }
        }
    }
}

/// Per-group accumulators (`naggs` per group), dense when the group space is small.
enum Accumulators {
    Dense {
        naggs: usize,
        present: Vec<bool>,
        values: Vec<i128>,
    },
    Sparse {
        naggs: usize,
        map: FxHashMap<u32, Vec<i128>>,
    },
}

/// Largest dense accumulator table, in cells.
const DENSE_CELLS: usize = 1 << 20;

impl Accumulators {
    fn new(strides: &[u32], plan: &BoundingPlan, naggs: usize) -> Self {
        let n_groups = match (strides.first(), plan.groups.first()) {
            (Some(&s), Some(g)) => s as usize * g.values.len().max(1),
            _ => 1,
        };
        if n_groups.saturating_mul(naggs.max(1)) <= DENSE_CELLS {
            // One more group, the last: the trash group of rows not folded in.
            Accumulators::Dense {
                naggs,
                present: vec![false; n_groups + 1],
                values: vec![0; (n_groups + 1) * naggs],
            }
        } else {
            Accumulators::Sparse {
                naggs,
                map: FxHashMap::default(),
            }
        }
    }

    /// The group index of rows that are not folded in: one past the last group when dense
    /// (a spare row, never output), else `u32::MAX` (never folded).
    fn trash(&self) -> u32 {
        match self {
            Accumulators::Dense { present, .. } => {
                u32::try_from(present.len() - 1).unwrap_or(u32::MAX)
            }
            Accumulators::Sparse { .. } => u32::MAX,
        }
    }

    /// The accumulators of group `g`, created (zero) if absent.
    fn row(&mut self, g: u32) -> &mut [i128] {
        match self {
            Accumulators::Dense {
                naggs,
                present,
                values,
            } => {
                let g = g as usize;
                if g >= present.len() {
                    // Unreachable: group indices are below the product of the domains.
                    present.resize(g + 1, false);
                    values.resize((g + 1) * *naggs, 0);
                }
                present[g] = true;
                &mut values[g * *naggs..(g + 1) * *naggs]
            }
            Accumulators::Sparse { naggs, map } => map
                .entry(g)
                .or_insert_with(|| vec![0; *naggs])
                .as_mut_slice(),
        }
    }

    /// Present groups in increasing order, and their accumulators (flat, `naggs` per group).
    fn into_sorted(self) -> (Vec<u32>, Vec<i128>) {
        match self {
            Accumulators::Dense {
                naggs,
                present,
                values,
            } => {
                let mut keys = Vec::new();
                let mut out = Vec::new();
                let groups = present.len() - 1;
                for (g, &p) in present[..groups].iter().enumerate() {
                    if p {
                        keys.push(g as u32);
                        out.extend_from_slice(&values[g * naggs..(g + 1) * naggs]);
                    }
                }
                (keys, out)
            }
            Accumulators::Sparse { map, .. } => {
                let mut rows: Vec<(u32, Vec<i128>)> = map.into_iter().collect();
                rows.sort_unstable_by_key(|(g, _)| *g);
                let keys = rows.iter().map(|(g, _)| *g).collect();
                let out = rows.into_iter().flat_map(|(_, v)| v).collect();
                (keys, out)
            }
        }
    }
}

/// `clamp(round(v / precision), lo_fp, hi_fp)`, rounding half away from zero; `None` for
/// NaN (treated as NULL). `lo_fp` and `hi_fp` are integers within ±1e15.
pub(crate) fn to_fixed(v: f64, precision: f64, lo_fp: f64, hi_fp: f64) -> Option<i128> {
    to_fixed_i64(v, precision, lo_fp, hi_fp).map(i128::from)
}

/// [`to_fixed`] as an `i64` (the clamped value is within ±1e15).
#[inline]
fn to_fixed_i64(v: f64, precision: f64, lo_fp: f64, hi_fp: f64) -> Option<i64> {
    let q = v / precision;
    if q.is_nan() {
        return None;
    }
    Some(round_clamp(q, lo_fp, hi_fp))
}

/// `clamp(round(q), lo, hi)`, rounding half away from zero, without a branch, a libm
/// call or a float-to-integer conversion, so that a loop over a column is vectorised.
/// `lo` and `hi` are integers within ±1e15 (validated). NaN gives a value in `[lo, hi]`:
/// callers treat NaN as NULL before.
#[inline]
fn round_clamp(q: f64, lo: f64, hi: f64) -> i64 {
    // Clamping first changes nothing: the bounds are integers, so whatever rounds outside
    // them is clamped outside them too. NaN becomes `lo`.
    let q = q.max(lo).min(hi);
    // |q| <= 1e15 < 2^51, so `q + MAGIC` lies in [2^52, 2^53), where doubles are the
    // integers: the addition rounds `q` to the nearest integer (ties to even), which the
    // low bits of the sum hold in two's complement, and subtracting MAGIC again is exact.
    let sum = q + MAGIC;
    let nearest = sum.to_bits() as i64 - MAGIC.to_bits() as i64;
    // Exact (the operands are within 0.5 of each other, or one is 0).
    let diff = q - (sum - MAGIC);
    // Ties went to even; move those that went towards zero away from it.
    nearest + i64::from(diff == 0.5 && q > 0.0) - i64::from(diff == -0.5 && q < 0.0)
}

/// 1.5 × 2^52: added to a double of magnitude below 2^51, rounds it to an integer held in
/// the low bits of the sum (see [`round_clamp`]).
const MAGIC: f64 = 6_755_399_441_055_744.0;

/// Group index of each of the `n` rows into `out` (`u32::MAX` where a key is NULL or
/// outside its public domain), one key column at a time.
fn group_indices(
    groups: &[GroupCol],
    strides: &[u32],
    keys: &[KeyArray],
    n: usize,
    out: &mut Vec<u32>,
) {
    out.clear();
    out.resize(n, 0);
    for ((g, key), &stride) in groups.iter().zip(keys).zip(strides) {
        match (key, &g.index) {
            // The most common case, branch-free: no NULL keys and every domain value short
            // enough to be inlined in its view, looked up in the views' hash table (a
            // search would mispredict on every row).
            (KeyArray::Utf8(Text::View(arr)), _) if arr.null_count() == 0 && g.views.is_some() => {
                let Some(table) = &g.views else { continue };
                let views = &arr.views()[..n];
                for (idx, &v) in out.iter_mut().zip(views) {
                    let p = table.get(v);
                    *idx = if *idx == u32::MAX || p == u32::MAX {
                        u32::MAX
                    } else {
                        *idx + p * stride
                    };
                }
            }
            // Short text keys read as views.
            (KeyArray::Utf8(Text::View(arr)), DomainIndex::Utf8Small(vals)) => {
                let views = arr.views();
                for (row, idx) in out.iter_mut().enumerate() {
                    if *idx == u32::MAX {
                        continue;
                    }
                    let v = views[row];
                    let pos = if arr.is_null(row) {
                        None
                    } else if v as u32 <= INLINE {
                        vals.iter().position(|(_, d)| *d == v)
                    } else {
                        let b = arr.value(row).as_bytes();
                        vals.iter().position(|(d, _)| **d == *b)
                    };
                    *idx = match pos {
                        Some(p) => *idx + p as u32 * stride,
                        None => u32::MAX,
                    };
                }
            }
            _ => {
                let one = [g];
                let ks = std::slice::from_ref(key);
                for (row, idx) in out.iter_mut().enumerate() {
                    if *idx == u32::MAX {
                        continue;
                    }
                    *idx = match group_index(&one, &[1], ks, row) {
                        Some(p) => *idx + p * stride,
                        None => u32::MAX,
                    };
                }
            }
        }
    }
}

fn group_index(
    groups: &[&GroupCol],
    strides: &[u32],
    keys: &[KeyArray],
    row: usize,
) -> Option<u32> {
    let mut idx = 0u32;
    for ((g, key), stride) in groups.iter().zip(keys).zip(strides) {
        let pos = match (key, &g.index) {
            (KeyArray::Utf8(a), DomainIndex::Utf8Small(vals)) => {
                if a.is_null(row) {
                    return None;
                }
                match a {
                    Text::View(arr) => {
                        let view = arr.views()[row];
                        if view as u32 <= INLINE {
                            vals.iter().position(|(_, d)| *d == view)? as u32
                        } else {
                            let v = arr.value(row).as_bytes();
                            vals.iter().position(|(d, _)| **d == *v)? as u32
                        }
                    }
                    Text::Utf8(arr) => {
                        let v = arr.value(row).as_bytes();
                        vals.iter().position(|(d, _)| **d == *v)? as u32
                    }
                }
            }
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
            AggPlan::CountRows | AggPlan::CountNonNull { .. } | AggPlan::CountUnits => {
                DataType::Int64
            }
            AggPlan::SumFixed { .. } | AggPlan::SumSquaresFixed { .. } => {
                DataType::Decimal128(SUM_PRECISION, 0)
            }
            AggPlan::Histogram { .. } => {
                DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))
            }
        };
        fields.push(Field::new(format!("agg_{i}"), ty, false));
    }
    Schema::new(fields)
}

fn build_output(
    plan: &BoundingPlan,
    strides: &[u32],
    keys: &[u32],
    accs: &[i128],
) -> BResult<RecordBatch> {
    let width = plan
        .aggs
        .iter()
        .map(|a| match a {
            AggPlan::Histogram { grid, offset, .. } => offset + grid.bins(),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
        .max(plan.aggs.len());
    let cell = |row: usize, i: usize| accs[row * width + i];
    let schema = Arc::new(output_schema(plan));
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (k, g) in plan.groups.iter().enumerate() {
        let size = g.values.len() as u32;
        let pos = |gi: u32| -> usize { ((gi / strides[k]) % size.max(1)) as usize };
        let arr: ArrayRef = match g.ty {
            ColumnType::Utf8 => {
                let mut b = StringBuilder::new();
                for &gi in keys {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Text(s)) => b.append_value(s),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Int32 => {
                let mut b = Int32Builder::new();
                for &gi in keys {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Int(x)) => b.append_option(i32::try_from(*x).ok()),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Int64 => {
                let mut b = Int64Builder::new();
                for &gi in keys {
                    match g.values.get(pos(gi)) {
                        Some(PublicValue::Int(x)) => b.append_value(*x),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            ColumnType::Boolean => {
                let mut b = BooleanBuilder::new();
                for &gi in keys {
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
            AggPlan::CountRows | AggPlan::CountNonNull { .. } | AggPlan::CountUnits => {
                Arc::new(Int64Array::from_iter_values(
                    (0..keys.len()).map(|row| i64::try_from(cell(row, i)).unwrap_or(i64::MAX)),
                ))
            }
            AggPlan::SumFixed { .. } | AggPlan::SumSquaresFixed { .. } => Arc::new(
                Decimal128Array::from_iter_values((0..keys.len()).map(|row| cell(row, i)))
                    .with_precision_and_scale(SUM_PRECISION, 0)
                    .map_err(|e| BoundError(e.to_string()))?,
            ),
            AggPlan::Histogram { grid, offset, .. } => {
                let mut b = ListBuilder::new(Int64Builder::new());
                for row in 0..keys.len() {
                    for bin in 0..grid.bins() {
                        let c = cell(row, offset + bin);
                        b.values()
                            .append_value(i64::try_from(c).unwrap_or(i64::MAX));
                    }
                    b.append(true);
                }
                Arc::new(b.finish())
            }
        };
        columns.push(arr);
    }
    RecordBatch::try_new(schema, columns).map_err(|e| BoundError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array};

    /// Text keys read as views find their domain index the same way on every path: the
    /// branch-free one (no NULLs, an all-inline domain), the searching one (NULLs present,
    /// or a domain value too long to inline) and a plain Utf8 array. Values that are
    /// prefixes, extensions or longer than a view can hold never match.
    #[test]
    fn text_keys_find_their_domain_index_on_every_path() {
        let text = |v: &[&str]| {
            v.iter()
                .map(|s| PublicValue::Text(s.to_string()))
                .collect::<Vec<_>>()
        };
        let rows = [
            "HbA1c",
            "LDL",
            "a value longer than twelve bytes",
            "LDLx",
            "",
            "LD",
            "LDL",
            "HbA1c",
        ];
        for domain in [
            text(&["HbA1c", "LDL"]),
            text(&["HbA1c", "LDL", "a domain value longer than twelve"]),
        ] {
            let g = GroupCol::new("g".into(), ColumnType::Utf8, domain, 0);
            let want: Vec<u32> = rows
                .iter()
                .map(|r| match *r {
                    "HbA1c" => 0,
                    "LDL" => 1,
                    _ => u32::MAX,
                })
                .collect();
            let views = StringViewArray::from_iter_values(rows);
            let mut with_null: Vec<Option<&str>> = rows.iter().map(|r| Some(*r)).collect();
            with_null.push(None);
            let mut want_null = want.clone();
            want_null.push(u32::MAX);
            let nullable = StringViewArray::from(with_null.clone());
            let plain = StringArray::from(with_null);
            for (keys, want) in [
                (KeyArray::Utf8(Text::View(&views)), &want),
                (KeyArray::Utf8(Text::View(&nullable)), &want_null),
                (KeyArray::Utf8(Text::Utf8(&plain)), &want_null),
            ] {
                let mut out = Vec::new();
                group_indices(
                    std::slice::from_ref(&g),
                    &[1],
                    &[keys],
                    want.len(),
                    &mut out,
                );
                assert_eq!(&out, want);
            }
        }
    }

    /// The views' hash table finds every value of domains of up to 16 short, similar
    /// values, and nothing else (prefixes, extensions, other lengths, long strings).
    #[test]
    fn view_tables_find_exactly_their_domain() {
        for n in 1..=16 {
            let domain: Vec<String> = (0..n).map(|k| format!("v{k:02}")).collect();
            let views: Vec<u128> = domain
                .iter()
                .map(|s| make_view(s.as_bytes(), 0, 0))
                .collect();
            let table = ViewTable::new(&views).expect("a table for a small domain");
            for (k, v) in views.iter().enumerate() {
                assert_eq!(table.get(*v), k as u32);
            }
            for other in ["v", "v0", "v000", "v16", "w00", "", "a much longer string"] {
                let v = make_view(other.as_bytes(), 0, 0);
                if !domain.iter().any(|d| d == other) {
                    assert_eq!(table.get(v), u32::MAX, "{other}");
                }
            }
        }
    }

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
        assert_eq!(to_fixed(2.5, 1.0, -10.0, 10.0), Some(3));
        assert_eq!(to_fixed(2.49, 1.0, -10.0, 10.0), Some(2));
        assert_eq!(to_fixed(-2.49, 1.0, -10.0, 10.0), Some(-2));
        assert_eq!(to_fixed(-0.4, 1.0, -10.0, 10.0), Some(0));
        // Far beyond the bounds and beyond i64, both ways, and the widest bounds.
        assert_eq!(f(1e300), Some(10000));
        assert_eq!(f(-1e300), Some(0));
        assert_eq!(f(9.3e18 * 0.01), Some(10000));
        assert_eq!(f(-9.3e18 * 0.01), Some(0));
        let wide = |v| to_fixed(v, 1.0, -1e15, 1e15);
        assert_eq!(wide(999_999_999_999_999.4), Some(999_999_999_999_999));
        assert_eq!(wide(-999_999_999_999_999.5), Some(-1_000_000_000_000_000));
        assert_eq!(wide(4_503_599_627_370_497.0), Some(1_000_000_000_000_000));
        assert_eq!(wide(-1e16), Some(-1_000_000_000_000_000));
        // The column conversion gives the same values as the row one.
        let xs = Float64Array::from(vec![5.5, 3.333, -1.0, 1e300, -0.005, 0.005, 99.995]);
        let mut col = Vec::new();
        fixed_column(
            &ValArray::Float64(&xs),
            0..xs.len(),
            0.01,
            0.0,
            10000.0,
            &mut col,
        );
        let rows: Vec<i64> = xs.values().iter().map(|&x| f(x).unwrap() as i64).collect();
        assert_eq!(col, rows);
    }

    /// `round_clamp` against the standard library's rounding (half away from zero, through
    /// libm) followed by a clamp, on and around half-integers at every magnitude up to the
    /// bounds, on arbitrary bit patterns, and beyond the bounds.
    #[test]
    fn round_clamp_is_round_half_away_from_zero_then_clamp() {
        let next = |x: f64, k: i64| f64::from_bits((x.to_bits() as i64 + k) as u64);
        let mut qs = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999999999999994,
        ];
        let mut m = 1.0f64;
        while m <= 2e15 {
            for base in [
                m,
                m + 0.5,
                m - 0.5,
                m * 1.37 + 0.5,
                (m * 0.71).floor() + 0.5,
            ] {
                for b in [base, -base] {
                    for k in -3..=3 {
                        qs.push(next(b, k));
                    }
                }
            }
            m *= 1.9;
        }
        // Arbitrary doubles: a fixed sequence of bit patterns, finite and not NaN.
        let mut h: u64 = 0x243F_6A88_85A3_08D3;
        for _ in 0..200_000 {
            h = h
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(0x632B_E59B_D9B4_E019);
            let x = f64::from_bits(h);
            if x.is_finite() {
                qs.push(x);
                // And the same magnitude scaled into the bounds' range.
                qs.push(x % 3e15);
            }
        }
        qs.extend([
            1e300,
            -1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            5e-324,
            -5e-324,
        ]);
        for (lo, hi) in [(-1e15, 1e15), (0.0, 10000.0), (-7.0, 3.0), (5.0, 5.0)] {
            for &q in &qs {
                let want = q.round().clamp(lo, hi) as i64;
                assert_eq!(round_clamp(q, lo, hi), want, "q = {q:e} in [{lo}, {hi}]");
            }
            let nan = round_clamp(f64::NAN, lo, hi);
            assert!((lo as i64..=hi as i64).contains(&nan));
        }
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
            // Two interleaved participants, so that ranges also move within the arena.
            let mut arena = Arena::default();
            let mut units = [Unit::default(); 2];
            for row in 0..10u32 {
                for u in &mut units {
                    offer(u, &mut arena, 3, row, 0, &[], &mut rng).unwrap();
                }
            }
            for u in &units {
                assert_eq!(u.seen, 10);
                assert_eq!(u.len, 3);
            }
            for &g in &arena.groups[units[0].off..units[0].off + units[0].len] {
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

    impl BoundingPlan {
        fn clone_for_test(&self) -> BoundingPlan {
            BoundingPlan {
                max_rows: self.max_rows,
                pid_proj: self.pid_proj,
                pid_rows: self.pid_rows,
                groups: self
                    .groups
                    .iter()
                    .map(|g| GroupCol::new(g.name.clone(), g.ty, g.values.clone(), g.proj))
                    .collect(),
                slots: self
                    .slots
                    .iter()
                    .map(|s| ValueSlot {
                        ty: s.ty,
                        kind: s.kind,
                        proj: s.proj,
                    })
                    .collect(),
                aggs: self.aggs.clone(),
            }
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
            pid_rows: false,
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

    fn counts_of(batches: &[&RecordBatch]) -> Arc<ParticipantCounts> {
        let mut c = ParticipantCounts::default();
        for b in batches {
            c.add(b.column(0)).unwrap();
        }
        Arc::new(c)
    }

    /// `batch` with its participant ids replaced by the rows' positions in the file, from
    /// `first`: what the engine reads instead of the ids when it has the rows' owners.
    fn by_position(batch: &RecordBatch, first: i64) -> RecordBatch {
        let n = batch.num_rows() as i64;
        let mut cols = batch.columns().to_vec();
        cols[0] = Arc::new(Int64Array::from_iter_values(first..first + n));
        let mut fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[0] = Field::new("row", DataType::Int64, false);
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    fn positions(v: Vec<i64>) -> ArrayRef {
        Arc::new(Int64Array::from(v))
    }

    /// Counts of `batches`, read in this order from one file, with the rows' owners.
    fn owned_counts(batches: &[&RecordBatch]) -> Arc<ParticipantCounts> {
        let mut c = ParticipantCounts::default();
        let mut first = 0i64;
        for b in batches {
            let n = b.num_rows() as i64;
            c.add_at(b.column(0), &positions((first..first + n).collect()))
                .unwrap();
            first += n;
        }
        assert!(c.seal(first as u64));
        Arc::new(c)
    }

    #[test]
    fn row_owners_find_each_rows_participant() {
        // p1 p1 NULL p2 | p2 p2 p3 NULL NULL: p2's run crosses the batch boundary.
        let b1 = input(
            &[Some("p1"), Some("p1"), None, Some("p2")],
            &[Some("A"); 4],
            &[Some(1); 4],
        );
        let b2 = input(
            &[Some("p2"), Some("p2"), Some("p3"), None, None],
            &[Some("A"); 5],
            &[Some(1); 5],
        );
        let counts = owned_counts(&[&b1, &b2]);
        let owners = counts.owners().unwrap();
        assert_eq!(owners.starts, vec![0, 2, 3, 6, 7]);
        let p = |s: &str| counts.ids.get(s).unwrap();
        let (p1, p2, p3) = (p("p1"), p("p2"), p("p3"));
        let mut out = Vec::new();
        // Each row's owner, from the runs.
        let mut owners_of = |rows: &[i64]| -> Vec<u32> {
            owners.runs_of(rows, &mut out).unwrap();
            let mut ids = Vec::new();
            for &(id, end) in &out {
                ids.resize(end as usize, id);
            }
            assert_eq!(ids.len(), rows.len());
            ids
        };
        let all: Vec<i64> = (0..9).collect();
        assert_eq!(
            owners_of(&all),
            vec![p1, p1, NO_OWNER, p2, p2, p2, p3, NO_OWNER, NO_OWNER]
        );
        // Stretches of the file, as batches give them.
        assert_eq!(owners_of(&[3, 4, 5, 6]), vec![p2, p2, p2, p3]);
        assert_eq!(owners_of(&[1, 2, 3]), vec![p1, NO_OWNER, p2]);
        // After a filter: gaps, and jumps over several runs.
        assert_eq!(owners_of(&[1, 5, 6, 8]), vec![p1, p2, p3, NO_OWNER]);
        assert_eq!(owners_of(&[0, 1, 3, 5]), vec![p1, p1, p2, p2]);
        // Out of order (row by row): back to the start, and repeats.
        assert_eq!(
            owners_of(&[1, 6, 8, 0, 5, 3, 3]),
            vec![p1, p3, NO_OWNER, p1, p2, p2, p2]
        );
        // Positions the file does not have are refused.
        for bad in [&[9][..], &[-1], &[0, 9], &[7, 2, 9], &[i64::MIN, 0]] {
            assert!(owners.runs_of(bad, &mut out).is_err(), "{bad:?}");
        }
        assert_eq!(counts.counts[p2 as usize], 3);
    }

    #[test]
    fn row_owners_are_kept_only_for_an_exact_grouped_cover() {
        let b = input(&[Some("p1"), Some("p2")], &[Some("A"); 2], &[Some(1); 2]);
        let seal = |parts: &[Vec<i64>], rows: u64| {
            let mut c = ParticipantCounts::default();
            for v in parts {
                c.add_at(b.column(0), &positions(v.clone())).unwrap();
            }
            let kept = c.seal(rows);
            assert_eq!(kept, c.owners().is_some());
            kept
        };
        assert!(seal(&[vec![0, 1], vec![2, 3]], 4));
        assert!(!seal(&[vec![0, 2]], 3), "a row never read");
        assert!(!seal(&[vec![0, 1], vec![1, 2]], 3), "a row read twice");
        assert!(!seal(&[vec![0, 1]], 3), "fewer rows than the file");
        assert!(!seal(&[vec![0, 1]], 1), "more rows than the file");
        // Rows not grouped by participant: the owners would take as much memory as the rows.
        let s = input(
            &[Some("p1"), Some("p2"), Some("p1"), Some("p2"), Some("p1")],
            &[Some("A"); 5],
            &[Some(1); 5],
        );
        let mut c = ParticipantCounts::default();
        c.add_at(s.column(0), &positions((0..5).collect())).unwrap();
        assert!(!c.seal(5));
        // Counted without positions: nothing to keep.
        let mut c = ParticipantCounts::default();
        c.add(b.column(0)).unwrap();
        assert!(!c.seal(2));
        // Positions that do not fit the batch are refused.
        let mut c = ParticipantCounts::default();
        assert!(c.add_at(b.column(0), &positions(vec![0])).is_err());
        let nulls: ArrayRef = Arc::new(Int64Array::from(vec![Some(0), None]));
        assert!(c.add_at(b.column(0), &nulls).is_err());
    }

    /// The same rows bounded by participant id and by row position give the same answer:
    /// exactly with R above every participant's rows, and with R = 2, where sampling is
    /// random, in the counts and sums that do not depend on which rows are kept (each
    /// participant's rows are in one group, with one value).
    #[test]
    fn position_and_id_paths_agree() {
        // p1: 2 rows in A (2) and one in C (outside the domain, dropped before bounding);
        // p2: 1 in B (3); p3: 6 in A (1), across the batches; NULL id; p4: 3 in B (5);
        // p5: 1 in A with a NULL value.
        let b1 = input(
            &[
                Some("p1"),
                Some("p1"),
                Some("p1"),
                Some("p2"),
                Some("p3"),
                Some("p3"),
                Some("p3"),
                Some("p3"),
            ],
            &[
                Some("A"),
                Some("C"),
                Some("A"),
                Some("B"),
                Some("A"),
                Some("A"),
                Some("A"),
                Some("A"),
            ],
            &[
                Some(2),
                Some(9),
                Some(2),
                Some(3),
                Some(1),
                Some(1),
                Some(1),
                Some(1),
            ],
        );
        let b2 = input(
            &[
                Some("p3"),
                Some("p3"),
                None,
                Some("p4"),
                Some("p4"),
                Some("p4"),
                Some("p5"),
            ],
            &[
                Some("A"),
                Some("A"),
                Some("B"),
                Some("B"),
                Some("B"),
                Some("B"),
                Some("A"),
            ],
            &[Some(1), Some(1), Some(7), Some(5), Some(5), Some(5), None],
        );
        let by_id = counts_of(&[&b1, &b2]);
        let owned = owned_counts(&[&b1, &b2]);
        let (p1, p2) = (by_position(&b1, 0), by_position(&b2, 8));
        let cases = [
            (10, vec![("A".into(), 9, 8, 10), ("B".into(), 4, 4, 18)]),
            (2, vec![("A".into(), 5, 4, 6), ("B".into(), 3, 3, 13)]),
        ];
        for (r, expect) in cases {
            for _ in 0..20 {
                let mut ids = Bounder::with_counts(plan(r), Arc::clone(&by_id));
                ids.push(&b1).unwrap();
                ids.push(&b2).unwrap();
                assert_eq!(out_rows(&ids.finish().unwrap()), expect, "by id, R = {r}");
                let mut pos_plan = plan(r);
                pos_plan.pid_rows = true;
                let mut pos = Bounder::with_counts(pos_plan, Arc::clone(&owned));
                pos.push(&p1).unwrap();
                pos.push(&p2).unwrap();
                assert_eq!(
                    out_rows(&pos.finish().unwrap()),
                    expect,
                    "by position, R = {r}"
                );
            }
        }
        // Positions without owners are an error, never guessed.
        let mut pos_plan = plan(2);
        pos_plan.pid_rows = true;
        let mut pos = Bounder::with_counts(pos_plan, Arc::clone(&by_id));
        assert!(pos.push(&p1).is_err());
    }

    /// With counts, participants with at most R rows are aggregated directly and the others
    /// through a reservoir; the answer is the same as without counts.
    #[test]
    fn direct_and_reservoir_paths_agree() {
        let b1 = input(
            &[Some("p1"), Some("p1"), Some("p2"), Some("p3"), Some("p3")],
            &[Some("A"), Some("B"), Some("B"), Some("A"), Some("A")],
            &[Some(1), Some(2), Some(3), Some(4), Some(5)],
        );
        let b2 = input(
            &[Some("p3"), Some("p1"), Some("p4")],
            &[Some("B"), Some("A"), Some("A")],
            &[Some(6), Some(7), Some(8)],
        );
        // p1: 3 rows, p2: 1, p3: 3, p4: 1. R = 3 keeps everything either way.
        let counts = counts_of(&[&b1, &b2]);
        assert_eq!(counts.participants(), 4);
        let mut with = Bounder::with_counts(plan(3), Arc::clone(&counts));
        let mut without = Bounder::new(plan(3));
        for b in [&b1, &b2] {
            with.push(b).unwrap();
            without.push(b).unwrap();
        }
        assert_eq!(with.participants(), 4);
        // Everyone went the direct way.
        assert!(with.units.is_empty());
        let expect = vec![("A".into(), 5, 5, 25), ("B".into(), 3, 3, 11)];
        assert_eq!(out_rows(&with.finish().unwrap()), expect);
        assert_eq!(out_rows(&without.finish().unwrap()), expect);

        // R = 2: p1 and p3 (3 rows each) go through reservoirs and keep exactly 2 rows.
        for _ in 0..50 {
            let mut b = Bounder::with_counts(plan(2), Arc::clone(&counts));
            b.push(&b1).unwrap();
            b.push(&b2).unwrap();
            assert_eq!(b.units.len(), 2);
            let total: i64 = out_rows(&b.finish().unwrap()).iter().map(|r| r.1).sum();
            assert_eq!(total, 2 + 1 + 2 + 1);
        }
    }

    /// `CountUnits` counts each participant once per group with a kept row, on both paths.
    #[test]
    fn distinct_participants_per_group() {
        let mut p = plan(10);
        p.aggs = vec![AggPlan::CountUnits, AggPlan::CountRows];
        let b1 = input(
            &[Some("p1"), Some("p1"), Some("p2"), Some("p1")],
            &[Some("A"), Some("A"), Some("A"), Some("B")],
            &[Some(1), Some(1), Some(1), Some(1)],
        );
        let b2 = input(
            &[Some("p2"), Some("p1")],
            &[Some("A"), Some("A")],
            &[None, None],
        );
        let rows = |b: &RecordBatch| -> Vec<(i64, i64)> {
            let u = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            let c = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
            (0..b.num_rows())
                .map(|i| (u.value(i), c.value(i)))
                .collect()
        };
        // A: p1 (3 rows), p2 (2 rows): 2 participants, 5 rows. B: p1: 1, 1.
        let expect = vec![(2, 5), (1, 1)];
        let counts = counts_of(&[&b1, &b2]);
        for mut b in [
            Bounder::new(p.clone_for_test()),
            Bounder::with_counts(p.clone_for_test(), counts),
        ] {
            b.push(&b1).unwrap();
            b.push(&b2).unwrap();
            assert_eq!(rows(&b.finish().unwrap()), expect);
        }
        // R = 1: each participant keeps one row, so is counted in exactly one group.
        let mut p1 = p.clone_for_test();
        p1.max_rows = 1;
        for _ in 0..20 {
            let mut b = Bounder::new(p1.clone_for_test());
            b.push(&b1).unwrap();
            b.push(&b2).unwrap();
            let total: i64 = rows(&b.finish().unwrap()).iter().map(|r| r.0).sum();
            assert_eq!(total, 2);
        }
    }

    /// Counts that say a participant has at most R rows when it has more (the files changed)
    /// stop the bounder before it lets that participant contribute more than R rows.
    #[test]
    fn stale_counts_stop_the_bounder() {
        let before = input(&[Some("p1")], &[Some("A")], &[Some(1)]);
        let after = input(
            &[Some("p1"), Some("p1"), Some("p1")],
            &[Some("A"), Some("A"), Some("B")],
            &[Some(1), Some(2), Some(3)],
        );
        let mut b = Bounder::with_counts(plan(2), counts_of(&[&before]));
        assert!(b.push(&after).is_err());
        assert!(b.is_stale());
    }

    fn truncated(b: &RecordBatch) -> usize {
        b.schema().metadata()[META_TRUNCATED_UNITS].parse().unwrap()
    }

    /// The response says how many participants had rows dropped by bounding.
    #[test]
    fn reports_participants_with_more_than_r_rows() {
        let b1 = input(
            &[
                Some("p1"),
                Some("p1"),
                Some("p1"),
                Some("p2"),
                Some("p3"),
                Some("p3"),
            ],
            &[
                Some("A"),
                Some("A"),
                Some("B"),
                Some("B"),
                Some("A"),
                Some("C"),
            ],
            &[Some(1), Some(1), Some(1), Some(1), Some(1), Some(1)],
        );
        let counts = counts_of(&[&b1]);
        // R = 2: p1 (3 rows) is truncated; p3 has 2 rows in the domain ("C" is dropped).
        for mut b in [
            Bounder::new(plan(2)),
            Bounder::with_counts(plan(2), Arc::clone(&counts)),
        ] {
            b.push(&b1).unwrap();
            assert_eq!(truncated(&b.finish().unwrap()), 1);
        }
        // R = 1: still only p1; p3 has two rows in the table but one in the domain.
        let mut b = Bounder::with_counts(plan(1), counts);
        b.push(&b1).unwrap();
        assert_eq!(truncated(&b.finish().unwrap()), 1);
        let mut b = Bounder::new(plan(3));
        b.push(&b1).unwrap();
        assert_eq!(truncated(&b.finish().unwrap()), 0);
    }

    /// A participant absent from the counts goes through a reservoir.
    #[test]
    fn participants_missing_from_the_counts_are_bounded() {
        let rows = input(
            &[Some("new"), Some("new"), Some("new"), Some("new")],
            &[Some("A"), Some("A"), Some("B"), Some("B")],
            &[Some(1), Some(1), Some(1), Some(1)],
        );
        let other = input(&[Some("p1")], &[Some("A")], &[Some(1)]);
        let mut b = Bounder::with_counts(plan(3), counts_of(&[&other]));
        b.push(&rows).unwrap();
        assert!(!b.is_stale());
        let total: i64 = out_rows(&b.finish().unwrap()).iter().map(|r| r.1).sum();
        assert_eq!(total, 3);
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

    /// With R large enough to keep every row, the direct path and the reservoir path give the
    /// same partials for every aggregate and input type, with NULLs, NaN and values beyond
    /// the bounds, and with participants whose rows span batches.
    /// 300 rows of 43 participants (7 rows each, one run split across the two batches),
    /// with NULL participants, keys NULL or outside the domain {A, B}, and float, int32
    /// and int64 values with NULLs, NaN and values far beyond the bounds.
    fn mixed_batches() -> (RecordBatch, RecordBatch) {
        let n = 300;
        let pids: Vec<Option<String>> = (0..n)
            .map(|i| (i % 37 != 5).then(|| format!("p{:03}", i / 7)))
            .collect();
        let groups: Vec<Option<&str>> = (0..n)
            .map(|i| match i % 5 {
                0 => Some("A"),
                1 | 2 => Some("B"),
                3 => Some("C"),
                _ => (i % 11 != 0).then_some("A"),
            })
            .collect();
        let xs: Vec<Option<f64>> = (0..n)
            .map(|i| match i % 13 {
                0 => None,
                1 => Some(f64::NAN),
                2 => Some(1e300),
                _ => Some((i as f64) * 0.37 - 20.0),
            })
            .collect();
        let ys: Vec<Option<i32>> = (0..n)
            .map(|i| (i % 9 != 0).then_some((i * 7919) % 200 - 50))
            .collect();
        let zs: Vec<Option<i64>> = (0..n)
            .map(|i| (i % 4 != 0).then_some(i as i64 * 3 - 100))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("pid", DataType::Utf8, true),
            Field::new("g", DataType::Utf8, true),
            Field::new("x", DataType::Float64, true),
            Field::new("y", DataType::Int32, true),
            Field::new("z", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(pids)),
                Arc::new(StringArray::from(groups)),
                Arc::new(Float64Array::from(xs)),
                Arc::new(Int32Array::from(ys)),
                Arc::new(Int64Array::from(zs)),
            ],
        )
        .unwrap();
        // Two halves, so that a participant's run spans batches.
        (batch.slice(0, 150), batch.slice(150, 150))
    }

    /// A plan over [`mixed_batches`]: R = 50 (no participant is truncated), key `g` over
    /// {A, B}, slots x (0), y (1) and z (2).
    fn mixed_plan(aggs: Vec<AggPlan>) -> BoundingPlan {
        let values: Vec<PublicValue> = ["A", "B"]
            .iter()
            .map(|s| PublicValue::Text(s.to_string()))
            .collect();
        let slot = |ty: ColumnType, kind: SlotKind, proj: usize| ValueSlot { ty, kind, proj };
        BoundingPlan {
            max_rows: 50,
            pid_proj: 0,
            pid_rows: false,
            groups: vec![GroupCol::new("g".into(), ColumnType::Utf8, values, 1)],
            slots: vec![
                slot(ColumnType::Float64, SlotKind::Float, 2),
                slot(ColumnType::Int32, SlotKind::Int, 3),
                slot(ColumnType::Int64, SlotKind::Int, 4),
            ],
            aggs,
        }
    }

    /// [`mixed_batches`] through the column folds (every participant direct) and through
    /// the row folds (every participant in a reservoir, folded row by row at the end).
    fn column_and_row_folds(aggs: &[AggPlan]) -> (RecordBatch, RecordBatch) {
        let (b1, b2) = mixed_batches();
        let counts = counts_of(&[&b1, &b2]);
        let copy = || mixed_plan(aggs.to_vec());
        let mut direct = Bounder::with_counts(copy(), counts);
        let mut reservoir = Bounder::new(copy());
        for b in [&b1, &b2] {
            direct.push(b).unwrap();
            reservoir.push(b).unwrap();
        }
        assert!(direct.units.is_empty());
        assert_eq!(reservoir.units.len(), 43);
        (direct.finish().unwrap(), reservoir.finish().unwrap())
    }

    #[test]
    fn column_and_row_folds_agree_on_every_aggregate() {
        let aggs = vec![
            AggPlan::CountRows,
            AggPlan::CountUnits,
            AggPlan::CountNonNull { slot: 0 },
            AggPlan::CountNonNull { slot: 1 },
            AggPlan::SumFixed {
                slot: 0,
                precision: 0.1,
                lo_fp: -100.0,
                hi_fp: 500.0,
            },
            AggPlan::SumFixed {
                slot: 1,
                precision: 1.0,
                lo_fp: -10.0,
                hi_fp: 100.0,
            },
            AggPlan::SumSquaresFixed {
                slot: 0,
                precision: 0.1,
                lo_fp: -100.0,
                hi_fp: 500.0,
                mid_fp: 200,
            },
            AggPlan::SumSquaresFixed {
                slot: 2,
                precision: 1.0,
                lo_fp: -50.0,
                hi_fp: 700.0,
                mid_fp: 325,
            },
        ];
        assert_eq!(single_input(&aggs), None);
        let (d, r) = column_and_row_folds(&aggs);
        assert_eq!(d.num_rows(), 2);
        assert_eq!(d.columns(), r.columns());
        // Spot checks against values computed by hand from the generator.
        let rows = d.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        let kept = |g: &str| {
            (0..300)
                .filter(|&i| i % 37 != 5)
                .filter(|&i| match i % 5 {
                    0 => g == "A",
                    1 | 2 => g == "B",
                    3 => false,
                    _ => i % 11 != 0 && g == "A",
                })
                .count() as i64
        };
        assert_eq!(rows.value(0), kept("A"));
        assert_eq!(rows.value(1), kept("B"));
    }

    /// Row counts with COUNT and SUM of one column are folded in one pass; it must give
    /// what the row folds give, for each column type, with and without a SUM, in any order.
    #[test]
    fn one_pass_folds_of_one_column_agree_with_row_folds() {
        let sum = |slot, precision, lo_fp, hi_fp| AggPlan::SumFixed {
            slot,
            precision,
            lo_fp,
            hi_fp,
        };
        let cases = vec![
            vec![
                AggPlan::CountRows,
                AggPlan::CountNonNull { slot: 0 },
                sum(0, 0.1, -100.0, 500.0),
            ],
            vec![
                sum(1, 1.0, -10.0, 100.0),
                AggPlan::CountUnits,
                AggPlan::CountNonNull { slot: 1 },
            ],
            vec![AggPlan::CountNonNull { slot: 2 }, AggPlan::CountRows],
            vec![
                sum(2, 1.0, -50.0, 700.0),
                AggPlan::CountRows,
                sum(2, 1.0, -50.0, 700.0),
            ],
        ];
        for aggs in cases {
            assert!(
                single_input(&aggs).is_some(),
                "{aggs:?} takes the one-pass fold"
            );
            let (d, r) = column_and_row_folds(&aggs);
            assert_eq!(d.num_rows(), 2);
            assert_eq!(d.columns(), r.columns(), "{aggs:?}");
        }
        // Two bounds for one column, or two columns, take the general fold.
        assert_eq!(
            single_input(&[sum(0, 0.1, -100.0, 500.0), sum(0, 0.1, 0.0, 500.0)]),
            None
        );
        let two = [
            AggPlan::CountNonNull { slot: 0 },
            AggPlan::CountNonNull { slot: 1 },
        ];
        assert_eq!(single_input(&two), None);
    }

    #[test]
    fn quantile_histograms_count_clamped_values_per_bin_and_group() {
        // [0, 10] at 1 with 6 candidates 0, 2, 4, 6, 8, 10: 11 bins (= c_i, then between).
        // A: 4, -3 -> 0, NULL, 5; B: 20 -> 10, 2, 3.
        let grid = QuantileGrid::new(0, 10, 6).unwrap();
        let mut p = plan(10);
        p.aggs.insert(
            1,
            AggPlan::Histogram {
                slot: 0,
                precision: 1.0,
                lo_fp: 0.0,
                hi_fp: 10.0,
                grid,
                offset: 0,
            },
        );
        let rows = input(
            &[
                Some("p1"),
                Some("p2"),
                Some("p1"),
                Some("p2"),
                Some("p1"),
                Some("p2"),
                Some("p1"),
            ],
            &[
                Some("A"),
                Some("B"),
                Some("A"),
                Some("A"),
                Some("B"),
                Some("B"),
                Some("A"),
            ],
            &[Some(4), Some(20), Some(-3), None, Some(2), Some(3), Some(5)],
        );
        for mut b in [
            Bounder::new(p.clone_for_test()),
            Bounder::with_counts(p.clone_for_test(), counts_of(&[&rows])),
        ] {
            b.push(&rows).unwrap();
            let out = b.finish().unwrap();
            assert_eq!(out.num_columns(), 1 + 4);
            let lists = out.column(2).as_list::<i32>();
            let bins = |row: usize| -> Vec<i64> {
                lists
                    .value(row)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec()
            };
            //                 0  _  2  _  4  _  6  _  8  _  10
            assert_eq!(bins(0), [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
            assert_eq!(bins(1), [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1]);
            // The scalar aggregates around it are unchanged: rows, non-null, sum.
            let rows_out = out_rows(&out.project(&[0, 1, 3, 4]).unwrap());
            assert_eq!(rows_out[0], ("A".into(), 4, 3, 9));
            assert_eq!(rows_out[1], ("B".into(), 3, 3, 15));
        }
    }

    /// Validity read 64 bits at a time matches `is_null` row by row, on sliced arrays (a
    /// bit offset) of lengths around the chunk size, with NaN as not valid.
    #[test]
    fn validity_in_bit_chunks_matches_rows() {
        let xs: Vec<Option<f64>> = (0..300)
            .map(|i| match i % 7 {
                0 | 3 => None,
                5 => Some(f64::NAN),
                _ => Some(i as f64),
            })
            .collect();
        let all = Float64Array::from(xs);
        for (off, len) in [
            (0, 300),
            (3, 64),
            (5, 65),
            (13, 127),
            (1, 1),
            (70, 0),
            (9, 200),
        ] {
            let a = all.slice(off, len);
            let mut out = Vec::new();
            not_null(&ValArray::Float64(&a), len, &mut out);
            let want: Vec<bool> = (0..len)
                .map(|i| !a.is_null(i) && !a.value(i).is_nan())
                .collect();
            assert_eq!(out, want, "offset {off}, length {len}");
        }
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

    /// A batch `[q, p × 10, s]` with `x = 2^position` on p's rows (NULL on the others), so
    /// that the sum of `x` in the output says which of p's rows were kept.
    fn one_run_batch() -> RecordBatch {
        let mut pids = vec![Some("q")];
        pids.extend([Some("p"); 10]);
        pids.push(Some("s"));
        let mut xs = vec![None];
        xs.extend((0..10).map(|pos| Some(1i64 << pos)));
        xs.push(None);
        input(&pids, &[Some("A"); 12], &xs)
    }

    fn wide_sum_plan(r: usize) -> BoundingPlan {
        let mut p = plan(r);
        p.aggs = vec![
            AggPlan::CountRows,
            AggPlan::SumFixed {
                slot: 0,
                precision: 1.0,
                lo_fp: 0.0,
                hi_fp: 1e12,
            },
        ];
        p
    }

    /// A participant whose rows are one run inside a batch is sampled on the spot, without a
    /// reservoir, and keeps every position with probability R/10: 3/10 when R draws pick
    /// the kept rows, 7/10 when 10 − R draws pick the dropped ones. With T = 20000 trials
    /// per R, Hoeffding gives P(|p̂ − p| ≥ 0.025) ≤ 2 exp(−25) per position; with a union
    /// bound over the 20 positions the false-failure probability is below 6e-10.
    #[test]
    fn complete_runs_are_sampled_on_the_spot_uniformly() {
        const T: usize = 20_000;
        let batch = one_run_batch();
        let counts = counts_of(&[&batch]);
        assert!(counts.grouped_by_participant());
        for r in [3usize, 7] {
            let mut kept = [0usize; 10];
            for _ in 0..T {
                let mut b = Bounder::with_counts(wide_sum_plan(r), Arc::clone(&counts));
                b.push(&batch).unwrap();
                assert!(b.units.is_empty());
                let out = b.finish().unwrap();
                assert_eq!(out.schema().metadata()[META_TRUNCATED_UNITS], "1");
                let rows = out.column(1).as_primitive::<arrow::datatypes::Int64Type>();
                // q and s (one row each, direct) and R of p's rows.
                assert_eq!(rows.value(0), 2 + r as i64);
                let sum = out
                    .column(2)
                    .as_primitive::<arrow::datatypes::Decimal128Type>();
                let bits = sum.value(0);
                assert_eq!(bits.count_ones() as usize, r);
                for (pos, k) in kept.iter_mut().enumerate() {
                    *k += usize::from(bits & (1 << pos) != 0);
                }
            }
            let want = r as f64 / 10.0;
            for (pos, &k) in kept.iter().enumerate() {
                let p = k as f64 / T as f64;
                assert!(
                    (p - want).abs() < 0.025,
                    "R = {r}: position {pos} kept with frequency {p}"
                );
            }
        }
    }

    /// A participant seen again after its run was sampled stops the bounder as scattered;
    /// once the counts are marked, the same input goes through reservoirs and R holds.
    #[test]
    fn a_participant_seen_after_its_sampled_run_stops_the_bounder() {
        let b1 = one_run_batch();
        let b2 = input(
            &[Some("t"), Some("p"), Some("p"), Some("u")],
            &[Some("A"); 4],
            &[None, Some(1 << 10), Some(1 << 11), None],
        );
        let counts = counts_of(&[&b1, &b2]);
        // One repeat run (p) in two batches: still looks grouped by participant.
        assert!(counts.grouped_by_participant());
        let mut b = Bounder::with_counts(wide_sum_plan(3), Arc::clone(&counts));
        b.push(&b1).unwrap();
        assert!(b.push(&b2).is_err());
        assert!(b.is_scattered());
        assert!(!b.is_stale());

        counts.mark_scattered();
        assert!(!counts.grouped_by_participant());
        for _ in 0..50 {
            let mut b = Bounder::with_counts(wide_sum_plan(3), Arc::clone(&counts));
            b.push(&b1).unwrap();
            b.push(&b2).unwrap();
            assert_eq!(b.units.len(), 1);
            let out = b.finish().unwrap();
            let rows = out.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            // q, s, t and u (direct) and 3 of p's 12 rows.
            assert_eq!(rows.value(0), 4 + 3);
            let sum = out
                .column(2)
                .as_primitive::<arrow::datatypes::Decimal128Type>();
            assert_eq!(sum.value(0).count_ones(), 3);
        }
    }

    /// Counts of rows that interleave participants never let a run be sampled on the spot.
    #[test]
    fn interleaved_counts_keep_every_heavy_participant_in_a_reservoir() {
        let pids = [
            Some("a"),
            Some("p"),
            Some("q"),
            Some("p"),
            Some("q"),
            Some("b"),
        ];
        let batch = input(&pids, &[Some("A"); 6], &[Some(1); 6]);
        let counts = counts_of(&[&batch]);
        assert!(!counts.grouped_by_participant());
        let mut b = Bounder::with_counts(plan(1), counts);
        b.push(&batch).unwrap();
        assert_eq!(b.units.len(), 2);
        let out = b.finish().unwrap();
        assert_eq!(out_rows(&out)[0].1, 4);
    }

    /// Runs sampled on the spot with at most R kept rows (after the filter and the dropped
    /// keys) are aggregated exactly: the same answer as every participant in a reservoir.
    /// NULL and out-of-domain keys do not count towards R, and a NULL participant ends a run.
    #[test]
    fn sampled_runs_within_r_are_exact() {
        // Counted over the unfiltered table: p1, p2, p3 with 5 rows each, R = 3.
        let full_pids: Vec<Option<&str>> = ["p1", "p2", "p3"]
            .iter()
            .flat_map(|p| [Some(*p); 5])
            .collect();
        let full = input(&full_pids, &[Some("A"); 15], &[Some(1); 15]);
        let counts = counts_of(&[&full]);
        // After a filter: p1 at the start and p3 at the end (reservoirs), p2 inside with
        // five rows of which three have a key in the domain, then a NULL participant.
        let filtered = input(
            &[
                Some("p1"),
                Some("p1"),
                Some("p2"),
                Some("p2"),
                Some("p2"),
                Some("p2"),
                Some("p2"),
                None,
                Some("p3"),
            ],
            &[
                Some("A"),
                Some("B"),
                Some("A"),
                None,
                Some("C"),
                Some("B"),
                Some("A"),
                Some("A"),
                Some("B"),
            ],
            &[
                Some(1),
                Some(2),
                Some(3),
                Some(100),
                Some(100),
                None,
                Some(5),
                Some(100),
                Some(7),
            ],
        );
        let mut sampled = Bounder::with_counts(plan(3), counts);
        sampled.push(&filtered).unwrap();
        assert_eq!(sampled.units.len(), 2);
        let mut reservoir = Bounder::new(plan(3));
        reservoir.push(&filtered).unwrap();
        let (s, r) = (sampled.finish().unwrap(), reservoir.finish().unwrap());
        assert_eq!(s.schema().metadata()[META_TRUNCATED_UNITS], "0");
        assert_eq!(s.columns(), r.columns());
        // A: 1 + 3 + 5; B: 2 + NULL + 7.
        assert_eq!(
            out_rows(&s),
            vec![("A".into(), 3, 3, 9), ("B".into(), 3, 2, 9)]
        );
    }
}
