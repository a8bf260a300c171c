//! Wire messages between coordinator and node.
//!
//! A node's Flight ticket is the JSON encoding of a [`TicketEnvelope`]. Nodes decode it with
//! [`PartialAggregateRequest::decode_ticket`], which checks size, structure and protocol
//! version, then validate it against their own catalog copy before running anything.

use serde::{Deserialize, Serialize};

use crate::catalog::ColumnType;
pub use crate::group_key::{DateField, GroupKey};
pub use crate::participant_set::{ParticipantSet, MAX_SET_LEAVES};

/// Version of the coordinator-node protocol. Bumped on any incompatible change.
///
/// v2: joins on the privacy unit ([`JoinSpec`]) and column references qualified by side
/// ([`ColumnRef`], [`Side`]); group keys are `ColumnRef`s.
/// v3: percentile histograms ([`AggregateRequest::QuantileHistogram`]) and partition
/// selection (`max_groups_per_unit`); a v2 node would refuse either as a malformed ticket,
/// so the bump turns that into a clear version mismatch.
/// v4: group keys are [`GroupKey`]s: columns, `CASE` labels, integer buckets and date parts.
/// v5: filters and `CASE` keys may test [`ParticipantSet`]s ([`Predicate::InSet`]), a key
/// may be a column with the values the query lists ([`GroupKey::Listed`]) or a never-NULL
/// condition ([`GroupKey::Condition`]), filters may take date parts ([`Predicate::DatePart`],
/// [`DateField::Day`]) and subtract dates (days), and a request may read a per-participant
/// derived table (`derived`).
/// v6: aggregates may read computed columns (`computed`, [`crate::computed::Computed`]),
/// expressions that may be a `CASE` ([`Predicate::Case`]); a join may be a `LEFT JOIN` with
/// its own `ON` condition, and may join a table with itself.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest ticket a node accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Deepest expression tree a node accepts.
pub const MAX_EXPR_DEPTH: usize = 32;
/// Most expression nodes in one filter.
pub const MAX_EXPR_NODES: usize = 2_000;
/// Most GROUP BY columns in one request.
pub const MAX_GROUP_COLUMNS: usize = 4;
/// Most partial aggregates in one request.
pub const MAX_AGGREGATES: usize = 64;
/// Most groups a request may produce (product of the public domain sizes).
pub const MAX_GROUPS: usize = 100_000;
/// Flight action that returns a node's [`NodeInfo`] as JSON.
pub const ACTION_NODE_INFO: &str = "fedq.node.info";

/// Errors decoding a wire message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("request is {0} bytes, more than the {MAX_REQUEST_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("request is not a valid fedq partial-aggregate request: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: peer speaks v{got}, this build speaks v{PROTOCOL_VERSION}; upgrade the older side")]
    Version { got: u32 },
}

/// What travels in a node's Flight ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketEnvelope {
    /// Protocol version of the sender; must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The request itself.
    pub request: PartialAggregateRequest,
}

/// One typed partial-aggregate request: "over `table` (joined with each of `joins` on
/// the privacy unit, in order), keep rows matching `filter`, bound each participant
/// to `max_rows_per_unit` rows, group by `group_by`, and return these
/// partial aggregates".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialAggregateRequest {
    /// Query id shared by coordinator and node logs.
    pub query_id: String,
    /// Catalog table name: the driving (left, `FROM`) table, whose R applies.
    pub table: String,
    /// Tables joined to the driving one on the privacy units, in order (at most
    /// [`MAX_JOINS`]). The columns of `joins[k]` are referenced with [`Side::joined`]`(k)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joins: Vec<JoinSpec>,
    /// Row filter, applied (after the join) before contribution bounding.
    #[serde(default)]
    pub filter: Option<Predicate>,
    /// Group keys: columns or bucketed columns whose public domain follows from the key and
    /// the catalog ([`GroupKey::domain`]), or, with `max_groups_per_unit` set, any groupable
    /// key (partition selection).
    #[serde(default)]
    pub group_by: Vec<GroupKey>,
    /// Partial aggregates, returned in this order.
    pub aggregates: Vec<AggregateRequest>,
    /// Rows per participant kept after the filter (and the join) (R). At most the
    /// catalog's value for `table`, the driving table.
    pub max_rows_per_unit: u32,
    /// G, for DP partition selection: the group keys have no public domain, so the node
    /// keeps each participant's rows in at most this many groups (before bounding to R
    /// rows) and returns only the groups it observed. At most the catalog's
    /// `max_groups_per_unit` of the driving table. The coordinator releases a group only if
    /// it passes a noisy threshold. Omitted (public domains only) when `None`, so tickets
    /// without it are unchanged; a node that predates it rejects it as an unknown field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u32>,
    /// When set, the driving relation is this per-participant derived table of `table`
    /// (one row per participant, so R is 1) instead of the table's rows; columns of the
    /// left side name its columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<crate::derived::PerParticipant>,
    /// Named expressions its aggregates read like columns of the driving side
    /// (`AVG(2026 - birth_year)`, `COUNT(*) FILTER (WHERE …)`), declared by
    /// [`crate::computed::Computed::spec`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub computed: Vec<crate::computed::Computed>,
}

/// An equi-join of the request's table with `table` on the privacy unit:
/// `<left>.<left_on> = <right>.<right_on>`, where both must be the tables' declared
/// `privacy_unit`s (the node checks). Rows then pair only rows of the same participant,
/// and R bounds each participant's joined rows. `table` may be the request's table itself
/// (a self-join: pairs of one participant's rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSpec {
    /// The joined (right) catalog table.
    pub table: String,
    /// Join column of the driving table (its privacy unit).
    pub left_on: String,
    /// Join column of the joined table (its privacy unit).
    pub right_on: String,
    /// Inner (the default, omitted) or left outer.
    #[serde(default, skip_serializing_if = "JoinKind::is_inner")]
    pub kind: JoinKind,
    /// Further `ON` conditions of a left join, over both sides: a driving row whose
    /// participant has no joined row meeting them is kept once, with NULLs on the right.
    /// (An inner join's further conditions are the request's filter.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Predicate>,
    /// When set, the joined relation is this per-participant derived table of `table`
    /// (one row per participant) instead of the table's rows, and columns of this side
    /// name its columns: `FROM (… GROUP BY pid) a JOIN (… GROUP BY pid) b USING (pid)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<crate::derived::PerParticipant>,
}

/// How a [`JoinSpec`] pairs rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinKind {
    /// Driving rows with a joined row of the same participant.
    #[default]
    Inner,
    /// Every driving row: with each joined row of the same participant that meets `on`,
    /// or once with NULLs when there is none.
    Left,
}

impl JoinKind {
    /// Whether this is [`JoinKind::Inner`] (omitted from the JSON).
    pub fn is_inner(&self) -> bool {
        *self == JoinKind::Inner
    }
}

/// Which table of a request a column belongs to: 0 is the driving table
/// (`PartialAggregateRequest::table`), the only side without a join; k ≥ 1 is the joined
/// table `joins[k - 1]`. On the wire, a number (omitted for the driving table).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Side(pub u8);

/// Most months a [`Predicate::ShiftDate`] moves a date (1,000 years).
pub const MAX_SHIFT_MONTHS: i32 = 12_000;
/// Most days a [`Predicate::ShiftDate`] moves a date (about 1,000 years).
pub const MAX_SHIFT_DAYS: i32 = 366_000;

/// Most tables a request may join to its driving table (so at most 5 tables in all).
pub const MAX_JOINS: usize = 4;

impl Side {
    /// The driving table.
    pub const LEFT: Side = Side(0);
    /// The first joined table (`joins[0]`).
    pub const RIGHT: Side = Side(1);

    /// The side of the joined table `joins[k]`.
    pub fn joined(k: usize) -> Side {
        Side(u8::try_from(k + 1).unwrap_or(u8::MAX))
    }

    /// Whether this is the driving table (omitted from the JSON).
    pub fn is_left(&self) -> bool {
        *self == Side::LEFT
    }

    /// The index in `joins` of this side's table, or `None` for the driving table.
    pub fn join_index(&self) -> Option<usize> {
        (self.0 as usize).checked_sub(1)
    }
}

/// A column of the request's table (`side` left, the default) or of the joined table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRef {
    /// Table side; omitted for the driving table.
    #[serde(default, skip_serializing_if = "Side::is_left")]
    pub side: Side,
    /// Catalog column name.
    pub name: String,
}

impl ColumnRef {
    /// A column of the driving table.
    pub fn left(name: impl Into<String>) -> Self {
        ColumnRef {
            side: Side::LEFT,
            name: name.into(),
        }
    }

    /// A column of the first joined table.
    pub fn right(name: impl Into<String>) -> Self {
        ColumnRef {
            side: Side::RIGHT,
            name: name.into(),
        }
    }
}

impl From<&str> for ColumnRef {
    fn from(name: &str) -> Self {
        ColumnRef::left(name)
    }
}

impl From<String> for ColumnRef {
    fn from(name: String) -> Self {
        ColumnRef::left(name)
    }
}

impl std::fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.side.0 {
            0 => f.write_str(&self.name),
            1 => write!(f, "right.{}", self.name),
            k => write!(f, "right{k}.{}", self.name),
        }
    }
}

/// A partial aggregate a node can compute. None of them returns a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregateRequest {
    /// Number of bounded rows in each group (`Int64`).
    CountRows,
    /// Number of bounded rows where `column` is not NULL (`Int64`).
    CountNonNull { column: ColumnRef },
    /// Number of distinct participants with at least one bounded row in each group
    /// (`Int64`): `COUNT(DISTINCT privacy_unit)`. After bounding, a participant has rows in
    /// at most `min(R, groups)` groups, so it adds at most that much across groups.
    CountUnits,
    /// Exact fixed-point sum of `column`, clamped to `[lower, upper]`, in units of
    /// `precision` (`Decimal128(38, 0)`). NULLs are skipped.
    SumFixed {
        column: ColumnRef,
        lower: f64,
        upper: f64,
        precision: f64,
    },
    /// Exact fixed-point sum of squares of the clamped value centred on the midpoint of its
    /// bounds, in units of `precision`² (`Decimal128(38, 0)`). NULLs are skipped. With
    /// `v = clamp(round(x / precision), lo, hi)`, `lo = ceil(lower / precision)`,
    /// `hi = floor(upper / precision)` and `mid = floor((lo + hi) / 2)`, each row adds
    /// `(v - mid)²`. Used with `SumFixed` and `CountNonNull` of the same column for VAR and
    /// STDDEV; centring keeps the sensitivity at R·S·half-width² rather than R·S·M².
    SumSquaresFixed {
        column: ColumnRef,
        lower: f64,
        upper: f64,
        precision: f64,
    },
    /// Histogram of `column`, clamped to `[lower, upper]` in units of `precision` exactly as
    /// for `SumFixed`, over the public grid of `candidates` quantile candidates
    /// ([`crate::quantile::QuantileGrid`]): `2·candidates − 1` counts (`List<Int64>`), bin
    /// `2i` = values equal to candidate i, bin `2i + 1` = values strictly between
    /// candidates i and i + 1. NULLs (and NaN) are skipped. Exact counts, merged across sites
    /// by addition; the coordinator scores the candidates from them (OpenDP's quantile score).
    QuantileHistogram {
        column: ColumnRef,
        lower: f64,
        upper: f64,
        precision: f64,
        candidates: u32,
    },
}

/// Schema metadata key of a node's response: how many participants had more than R rows
/// after the filter (each counted once), so that bounding dropped some of their rows. A
/// partial count like the others, released only with noise (sensitivity 1 per site).
pub const META_TRUNCATED_UNITS: &str = "fedq.truncated_units";

/// Largest `max(|lower|, |upper|) / precision` of a fixed-point sum of squares: its square
/// (2·10¹² steps)² per row leaves room for more than 10¹³ rows in an `i128`.
pub const MAX_SQUARES_STEPS: f64 = 1e12;

/// The fixed-point midpoint `floor((lo + hi) / 2)` of `[ceil(lower / precision),
/// floor(upper / precision)]`, shared by coordinator and node so both centre identically.
pub fn fixed_midpoint(lower: f64, upper: f64, precision: f64) -> i128 {
    let lo = (lower / precision).ceil() as i128;
    let hi = (upper / precision).floor() as i128;
    (lo + hi).div_euclid(2)
}

impl AggregateRequest {
    /// Column the aggregate reads, if any.
    pub fn column(&self) -> Option<&ColumnRef> {
        match self {
            AggregateRequest::CountRows | AggregateRequest::CountUnits => None,
            AggregateRequest::CountNonNull { column }
            | AggregateRequest::SumFixed { column, .. }
            | AggregateRequest::SumSquaresFixed { column, .. }
            | AggregateRequest::QuantileHistogram { column, .. } => Some(column),
        }
    }
}

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Literal {
    Null,
    Boolean(bool),
    Int64(i64),
    Float64(f64),
    Utf8(String),
    /// Days since 1970-01-01.
    Date32(i32),
}

/// Binary operators allowed in filters. All are total on their inputs (integer arithmetic
/// wraps; division is only allowed by a literal other than 0 and -1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
    Plus,
    Minus,
    Multiply,
    Divide,
}

/// The restricted, total expression language for filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "expr", rename_all = "snake_case", deny_unknown_fields)]
pub enum Predicate {
    /// A column of the driving table, or of the joined table (`side` right).
    Column {
        name: String,
        #[serde(default, skip_serializing_if = "Side::is_left")]
        side: Side,
    },
    Literal {
        value: Literal,
    },
    Binary {
        op: BinaryOp,
        left: Box<Predicate>,
        right: Box<Predicate>,
    },
    Not {
        input: Box<Predicate>,
    },
    IsNull {
        input: Box<Predicate>,
    },
    IsNotNull {
        input: Box<Predicate>,
    },
    InList {
        input: Box<Predicate>,
        list: Vec<Predicate>,
        negated: bool,
    },
    Between {
        input: Box<Predicate>,
        low: Box<Predicate>,
        high: Box<Predicate>,
        negated: bool,
    },
    Like {
        input: Box<Predicate>,
        pattern: String,
        negated: bool,
        case_insensitive: bool,
    },
    /// `TRY_CAST(input AS to)`: NULL instead of an error when the cast fails.
    TryCast {
        input: Box<Predicate>,
        to: ColumnType,
    },
    /// `date_part(field, input)` (`EXTRACT(field FROM input)`, `year(input)`) of a date, as
    /// an integer; NULL for a NULL date.
    DatePart {
        field: DateField,
        input: Box<Predicate>,
    },
    /// `input + INTERVAL '…'` of a date: moved by `months` (the day of the month clamped to
    /// the new month's last, as PostgreSQL does), then by `days`. NULL for a NULL date and
    /// for a date outside the years 1 to 9999, so it never overflows. At most
    /// [`MAX_SHIFT_MONTHS`] months and [`MAX_SHIFT_DAYS`] days either way.
    ShiftDate {
        input: Box<Predicate>,
        months: i32,
        days: i32,
    },
    /// `CASE WHEN b₁.when THEN b₁.then … [ELSE otherwise] END`: the value of the first
    /// branch whose condition is true (a NULL condition is not true), else `otherwise`,
    /// else NULL. Used for values (`SUM(CASE WHEN … THEN 1 ELSE 0 END)`, an aggregate's
    /// `FILTER (WHERE …)`), see [`crate::computed`].
    Case {
        branches: Vec<ValueBranch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        otherwise: Option<Box<Predicate>>,
    },
    /// `unit [NOT] IN set`: whether the row's participant (the privacy unit of `side`'s
    /// table) is in a [`ParticipantSet`] decided from that participant's own rows at this
    /// site (`IN`/`EXISTS` subqueries, `INTERSECT`, `EXCEPT`). Never NULL.
    InSet {
        #[serde(default, skip_serializing_if = "Side::is_left")]
        side: Side,
        set: Box<ParticipantSet>,
        negated: bool,
    },
}

/// One `WHEN … THEN …` of a [`Predicate::Case`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueBranch {
    /// Condition.
    pub when: Predicate,
    /// Value of the rows for which it is the first true condition.
    pub then: Predicate,
}

impl Predicate {
    /// Depth of the tree (a leaf has depth 1).
    pub fn depth(&self) -> usize {
        1 + self.children().iter().map(|c| c.depth()).max().unwrap_or(0)
    }

    /// Number of nodes in the tree.
    pub fn node_count(&self) -> usize {
        1 + self
            .children()
            .iter()
            .map(|c| c.node_count())
            .sum::<usize>()
    }

    /// Direct children.
    pub fn children(&self) -> Vec<&Predicate> {
        match self {
            Predicate::Column { .. } | Predicate::Literal { .. } => vec![],
            Predicate::Binary { left, right, .. } => vec![left, right],
            Predicate::Not { input }
            | Predicate::IsNull { input }
            | Predicate::IsNotNull { input }
            | Predicate::Like { input, .. }
            | Predicate::DatePart { input, .. }
            | Predicate::ShiftDate { input, .. }
            | Predicate::TryCast { input, .. } => vec![input],
            Predicate::InList { input, list, .. } => {
                let mut v: Vec<&Predicate> = vec![input];
                v.extend(list.iter());
                v
            }
            Predicate::Between {
                input, low, high, ..
            } => vec![input, low, high],
            Predicate::InSet { set, .. } => set.filters(),
            Predicate::Case {
                branches,
                otherwise,
            } => {
                let mut v: Vec<&Predicate> = Vec::new();
                for b in branches {
                    v.push(&b.when);
                    v.push(&b.then);
                }
                v.extend(otherwise.as_deref());
                v
            }
        }
    }

    /// Whether it is never NULL, whatever the row: a participant-set test, `IS [NOT]
    /// NULL`, a boolean literal, and `NOT`/`AND`/`OR` of such.
    pub fn never_null(&self) -> bool {
        match self {
            Predicate::InSet { .. } | Predicate::IsNull { .. } | Predicate::IsNotNull { .. } => {
                true
            }
            Predicate::Literal {
                value: Literal::Boolean(_),
            } => true,
            Predicate::Not { input } => input.never_null(),
            Predicate::Binary {
                op: BinaryOp::And | BinaryOp::Or,
                left,
                right,
            } => left.never_null() && right.never_null(),
            _ => false,
        }
    }

    /// The participant sets it tests, outermost first (not those nested in their filters).
    pub fn participant_sets(&self) -> Vec<&ParticipantSet> {
        let mut out = Vec::new();
        self.collect_sets(&mut out);
        out
    }

    fn collect_sets<'a>(&'a self, out: &mut Vec<&'a ParticipantSet>) {
        if let Predicate::InSet { set, .. } = self {
            out.push(set);
            return;
        }
        for c in self.children() {
            c.collect_sets(out);
        }
    }

    /// Whether it reads a column of a side for which `which` holds (outside the
    /// participant sets it tests, whose filters read their own tables).
    pub fn reads_side_where(&self, which: &impl Fn(Side) -> bool) -> bool {
        match self {
            Predicate::Column { side: s, .. } => which(*s),
            Predicate::InSet { side: s, .. } => which(*s),
            _ => self.children().iter().any(|c| c.reads_side_where(which)),
        }
    }

    /// Whether it reads a column of `side`.
    pub fn reads_side(&self, side: Side) -> bool {
        self.reads_side_where(&|s| s == side)
    }

    /// Whether it reads a column of any joined table (any side but the driving one).
    pub fn reads_joined(&self) -> bool {
        self.reads_side_where(&|s| !s.is_left())
    }

    /// Every column the tree reads.
    pub fn columns(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_columns(&mut out);
        out
    }

    /// A column of the driving table.
    pub fn column(name: impl Into<String>) -> Predicate {
        Predicate::Column {
            name: name.into(),
            side: Side::LEFT,
        }
    }

    fn collect_columns<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Predicate::Column { name, .. } => out.push(name),
            // The set's filters read its own table.
            Predicate::InSet { .. } => return,
            _ => {}
        }
        for c in self.children() {
            c.collect_columns(out);
        }
    }
}

impl PartialAggregateRequest {
    /// Every participant set its filter and group keys test (outermost ones; nested sets
    /// are inside their filters).
    pub fn participant_sets(&self) -> Vec<&ParticipantSet> {
        let mut out = self.outer_participant_sets();
        for d in self.derived_tables() {
            if let Some(f) = &d.filter {
                out.extend(f.participant_sets());
            }
        }
        out
    }

    /// The derived tables it reads: the driving one's, then each joined one's.
    pub fn derived_tables(&self) -> impl Iterator<Item = &crate::derived::PerParticipant> {
        self.derived
            .iter()
            .chain(self.joins.iter().filter_map(|j| j.derived.as_ref()))
    }

    /// The participant sets its filter and group keys test, not those of its derived
    /// table's filter (which are joined inside the derived table).
    pub fn outer_participant_sets(&self) -> Vec<&ParticipantSet> {
        let mut out: Vec<&ParticipantSet> = Vec::new();
        if let Some(f) = &self.filter {
            out.extend(f.participant_sets());
        }
        for k in &self.group_by {
            for p in k.predicates() {
                out.extend(p.participant_sets());
            }
        }
        for c in &self.computed {
            out.extend(c.value.participant_sets());
        }
        out
    }

    /// How many `Rows` leaves its participant sets have, nested ones included (at most
    /// [`MAX_SET_LEAVES`]).
    pub fn set_leaf_count(&self) -> usize {
        self.participant_sets().iter().map(|s| s.leaf_count()).sum()
    }

    /// The structural limits every node enforces (expression depth and size, group,
    /// aggregate, join and computed-column counts, participant subqueries), as a message
    /// naming the limit. Shared: the node checks a decoded ticket, the coordinator the
    /// request it plans, so a researcher gets a refusal rather than a node's.
    pub fn check_limits(&self) -> Result<(), String> {
        if let Some(f) = &self.filter {
            if f.depth() > MAX_EXPR_DEPTH {
                return Err(format!(
                    "filter is nested {} levels deep; the limit is {MAX_EXPR_DEPTH}",
                    f.depth()
                ));
            }
            if f.node_count() > MAX_EXPR_NODES {
                return Err(format!(
                    "filter has {} nodes; the limit is {MAX_EXPR_NODES}",
                    f.node_count()
                ));
            }
        }
        if self.group_by.len() > MAX_GROUP_COLUMNS {
            return Err(format!(
                "{} group columns; the limit is {MAX_GROUP_COLUMNS}",
                self.group_by.len()
            ));
        }
        let key_nodes: usize = self.group_by.iter().map(GroupKey::node_count).sum();
        let key_depth = self.group_by.iter().map(GroupKey::depth).max().unwrap_or(0);
        if key_depth > MAX_EXPR_DEPTH || key_nodes > MAX_EXPR_NODES {
            return Err(format!(
                "group key conditions exceed the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)"
            ));
        }
        if self.aggregates.is_empty() || self.aggregates.len() > MAX_AGGREGATES {
            return Err(format!(
                "{} aggregates; between 1 and {MAX_AGGREGATES} are allowed",
                self.aggregates.len()
            ));
        }
        for d in self.derived_tables() {
            for f in d.predicates() {
                if f.depth() > MAX_EXPR_DEPTH || f.node_count() > MAX_EXPR_NODES {
                    return Err(format!(
                        "a derived table's condition exceeds the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)"
                    ));
                }
            }
        }
        if self.joins.len() > MAX_JOINS {
            return Err(format!(
                "{} joined tables; the limit is {MAX_JOINS}",
                self.joins.len()
            ));
        }
        for on in self.joins.iter().filter_map(|j| j.on.as_ref()) {
            if on.depth() > MAX_EXPR_DEPTH || on.node_count() > MAX_EXPR_NODES {
                return Err(format!(
                    "a join's ON condition exceeds the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)"
                ));
            }
        }
        if self.computed.len() > crate::computed::MAX_COMPUTED {
            return Err(format!(
                "{} computed columns; the limit is {}",
                self.computed.len(),
                crate::computed::MAX_COMPUTED
            ));
        }
        let computed_nodes: usize = self.computed.iter().map(|c| c.value.node_count()).sum();
        let computed_depth = self
            .computed
            .iter()
            .map(|c| c.value.depth())
            .max()
            .unwrap_or(0);
        if computed_depth > MAX_EXPR_DEPTH || computed_nodes > MAX_EXPR_NODES {
            return Err(format!(
                "computed columns exceed the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)"
            ));
        }
        let leaves = self.set_leaf_count();
        if leaves > MAX_SET_LEAVES {
            return Err(format!(
                "the request tests {leaves} participant subqueries; the limit is {MAX_SET_LEAVES}"
            ));
        }
        Ok(())
    }

    /// Encode as a Flight ticket for the current protocol version.
    pub fn encode_ticket(&self) -> Result<Vec<u8>, WireError> {
        let env = TicketEnvelope {
            protocol_version: PROTOCOL_VERSION,
            request: self.clone(),
        };
        serde_json::to_vec(&env).map_err(|e| WireError::Malformed(e.to_string()))
    }

    /// Decode a Flight ticket: size limit, strict structure, protocol version, and the
    /// structural limits (expression depth and size, group and aggregate counts).
    /// Semantic checks against the catalog are the node's.
    pub fn decode_ticket(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        // Read the version first so a newer peer gets a version error, not a parse error.
        #[derive(Deserialize)]
        struct VersionOnly {
            protocol_version: u32,
        }
        let v: VersionOnly =
            serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if v.protocol_version != PROTOCOL_VERSION {
            return Err(WireError::Version {
                got: v.protocol_version,
            });
        }
        // serde_json limits recursion to 128 levels, so a deeply nested ticket fails here
        // rather than overflowing the stack.
        let env: TicketEnvelope =
            serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        let req = env.request;
        req.check_limits().map_err(WireError::Malformed)?;
        Ok(req)
    }
}

/// What a node reports about itself (Flight action [`ACTION_NODE_INFO`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Site name from the node config.
    pub site: String,
    /// Protocol version the node speaks.
    pub protocol_version: u32,
    /// fedq version of the node binary.
    pub fedq_version: String,
    /// Catalog tables the node serves.
    pub tables: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PartialAggregateRequest {
        PartialAggregateRequest {
            query_id: "q1".into(),
            table: "labs".into(),
            joins: Vec::new(),
            filter: Some(Predicate::Binary {
                op: BinaryOp::Eq,
                left: Box::new(Predicate::column("test")),
                right: Box::new(Predicate::Literal {
                    value: Literal::Utf8("HbA1c".into()),
                }),
            }),
            group_by: vec!["test".into()],
            aggregates: vec![
                AggregateRequest::CountRows,
                AggregateRequest::SumFixed {
                    column: "value".into(),
                    lower: 0.0,
                    upper: 20.0,
                    precision: 0.01,
                },
            ],
            max_rows_per_unit: 10,
            max_groups_per_unit: None,
            derived: None,
            computed: Vec::new(),
        }
    }

    #[test]
    fn ticket_roundtrip() {
        let r = sample();
        let t = r.encode_ticket().unwrap();
        assert_eq!(PartialAggregateRequest::decode_ticket(&t).unwrap(), r);
    }

    #[test]
    fn rejects_version_mismatch_and_unknown_fields() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample().encode_ticket().unwrap()).unwrap();
        v["protocol_version"] = 99.into();
        let e =
            PartialAggregateRequest::decode_ticket(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, WireError::Version { got: 99 }));
        v["protocol_version"] = PROTOCOL_VERSION.into();
        v["request"]["return_rows"] = true.into();
        let e =
            PartialAggregateRequest::decode_ticket(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, WireError::Malformed(_)), "{e}");
    }

    #[test]
    fn joined_requests_roundtrip_and_single_table_json_is_unqualified() {
        // Without a join, no `join` key and no `side` anywhere: columns are the table's.
        let json = String::from_utf8(sample().encode_ticket().unwrap()).unwrap();
        assert!(!json.contains("join") && !json.contains("side"), "{json}");
        assert!(
            json.contains(r#""group_by":[{"key":"column","column":{"name":"test"}}]"#),
            "{json}"
        );
        let mut r = sample();
        r.joins = vec![JoinSpec {
            table: "participants".into(),
            left_on: "pid".into(),
            right_on: "pid".into(),
            kind: Default::default(),
            on: None,
            derived: None,
        }];
        r.group_by = vec![ColumnRef::right("sex").into()];
        r.filter = Some(Predicate::Column {
            name: "birth_year".into(),
            side: Side::RIGHT,
        });
        let t = r.encode_ticket().unwrap();
        let json = String::from_utf8(t.clone()).unwrap();
        assert!(json.contains(r#"{"side":1,"name":"sex"}"#), "{json}");
        assert_eq!(PartialAggregateRequest::decode_ticket(&t).unwrap(), r);
        // More than MAX_JOINS joined tables are malformed.
        let mut five = r.clone();
        five.joins = vec![r.joins[0].clone(); MAX_JOINS + 1];
        let e = PartialAggregateRequest::decode_ticket(&five.encode_ticket().unwrap()).unwrap_err();
        assert!(e.to_string().contains("joined tables"), "{e}");
        // A v1 peer gets a version error naming both versions, not a parse error.
        let mut v: serde_json::Value = serde_json::from_slice(&t).unwrap();
        v["protocol_version"] = 1.into();
        let e =
            PartialAggregateRequest::decode_ticket(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, WireError::Version { got: 1 }));
        assert!(
            e.to_string().contains("v1") && e.to_string().contains(&format!("v{PROTOCOL_VERSION}")),
            "{e}"
        );
    }

    #[test]
    fn open_group_requests_carry_g_and_public_ones_omit_it() {
        let json = String::from_utf8(sample().encode_ticket().unwrap()).unwrap();
        assert!(!json.contains("max_groups_per_unit"), "{json}");
        let mut r = sample();
        r.max_groups_per_unit = Some(5);
        let t = r.encode_ticket().unwrap();
        let json = String::from_utf8(t.clone()).unwrap();
        assert!(json.contains(r#""max_groups_per_unit":5"#), "{json}");
        assert_eq!(PartialAggregateRequest::decode_ticket(&t).unwrap(), r);
    }

    #[test]
    fn rejects_oversized_and_deep() {
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(matches!(
            PartialAggregateRequest::decode_ticket(&big),
            Err(WireError::TooLarge(_))
        ));
        let mut p = Predicate::column("x");
        for _ in 0..40 {
            p = Predicate::Not { input: Box::new(p) };
        }
        let mut r = sample();
        r.filter = Some(p);
        let t = r.encode_ticket().unwrap();
        assert!(matches!(
            PartialAggregateRequest::decode_ticket(&t),
            Err(WireError::Malformed(_))
        ));
    }
}
