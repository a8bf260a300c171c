//! From SQL to a privacy-checked plan.
//!
//! The planner parses SQL with DataFusion against the catalog (tables registered as empty
//! tables: the coordinator never holds data), then checks the logical plan against the
//! privacy model:
//!
//! ```text
//!   [Limit] [Sort] Projection [Filter (HAVING)]      <- post-processing, run after noise
//!   Aggregate(group by public keys; COUNT/SUM/AVG)    <- becomes noisy statistics
//!   [Filter (WHERE)] [SubqueryAlias] TableScan        <- becomes the node request
//! ```
//!
//! Everything below the aggregate becomes one typed [`PartialAggregateRequest`]; the
//! aggregate becomes a list of [`Statistic`]s, each with an L1 sensitivity derived from
//! the catalog (R rows per participant, S sites per participant, clamp bounds), and its
//! share of ε. Everything above the aggregate is kept as a DataFusion plan and executed
//! over the noisy values only.

use std::sync::Arc;

use dashu::rational::RBig;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::common::{DFSchemaRef, ScalarValue};
use datafusion::datasource::empty::EmptyTable;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use fedq_common::catalog::Bounds;
use fedq_common::group_key::KeyDomain;
use fedq_common::quantile::{QuantileGrid, MAX_HISTOGRAM_CELLS, MAX_QUANTILE_CANDIDATES};
use fedq_common::{
    AggregateRequest, Catalog, ColumnRef, ColumnSpec, ColumnType, JoinSpec, Literal,
    PartialAggregateRequest, PublicValue, Side,
};

use crate::error::CoordinatorError;
use crate::noise::rational;
use crate::predicate::{to_predicate, Relation, Scope};
use crate::rename::{self, Rename};
use crate::selection::{PartitionSelection, SELECTION_SHARE_DENOMINATOR};

/// A GROUP BY key with its public domain, or without one (partition selection).
#[derive(Debug, Clone)]
pub struct GroupKey {
    /// How the key is shown: the column name (`table.column` in a join), or the bucketing
    /// expression.
    pub column: String,
    /// The key as the node request names it.
    pub key: fedq_common::GroupKey,
    /// Type of the key's values.
    pub ty: ColumnType,
    /// Public domain, released in full (empty when `public` is false).
    pub domain: Vec<PublicValue>,
    /// Whether `domain` is the key's public domain. A query with any key without one goes
    /// through partition selection, and then every key is treated as open (`false`): only
    /// observed key combinations that pass the threshold are released.
    pub public: bool,
}

/// What a released statistic measures, in integer units.
#[derive(Debug, Clone, PartialEq)]
pub enum StatisticKind {
    /// A count: the value of partial `partial`.
    Count { partial: usize },
    /// A fixed-point sum: the value of partial `partial`, in units of `precision`.
    Sum { partial: usize, precision: f64 },
    /// A sum centred on `mid_fp`: partial `sum` − `mid_fp` × partial `count`.
    CentredSum {
        sum: usize,
        count: usize,
        mid_fp: i128,
        precision: f64,
    },
    /// A sum of squares of values centred on their fixed-point midpoint, computed by the
    /// nodes (`SumSquaresFixed`): the value of partial `partial`, in units of `precision`².
    SumSquares { partial: usize, precision: f64 },
    /// The α-quantile (α = `alpha_num/alpha_den`) of the values binned by partial `partial`
    /// (`QuantileHistogram`), released by the exponential mechanism (see
    /// [`crate::quantile`]). Its `sensitivity` is the L∞ sensitivity of one group's score
    /// vector, R·S·max(α_num, α_den − α_num), in score units.
    Quantile {
        partial: usize,
        alpha_num: u64,
        alpha_den: u64,
    },
}

/// One noisy statistic, released for every group.
#[derive(Debug, Clone)]
pub struct Statistic {
    /// What it measures.
    pub kind: StatisticKind,
    /// L1 sensitivity of the whole vector over groups, in integer units.
    pub sensitivity: u128,
    /// Its share of the query's ε (exact).
    pub epsilon: RBig,
    /// Human description for EXPLAIN and logs, e.g. `SUM(value - 250) in 0.01 units`.
    pub label: String,
    /// How the sensitivity follows from the catalog, e.g. `R·S·half-width = 1·2·65`.
    pub formula: String,
    /// One unit of the statistic in the column's units (1 for counts, the precision for
    /// sums, the precision squared for sums of squares).
    pub unit: f64,
    /// Weight of this statistic's variance in the allocation objective (see
    /// [`Allocation::Balanced`]); the sum of its outputs' coefficients.
    pub cost: f64,
    /// Indices of the outputs (aggregate expressions) that use it.
    pub used_by: Vec<usize>,
}

/// How a query's ε is split across its statistics.
///
/// Every output (aggregate expression) has a delta-method variance that is a weighted sum
/// of its statistics' noise variances, `Var_o ≈ Σ_i w_{o,i} · 2(Δ_i/ε_i)²`. In each output's
/// own units, and with the unknown data replaced by its expectation under a uniform prior
/// within the declared bounds, the relative weights `c_{o,i}` are fixed numbers (normalised
/// to sum to 1 per output):
///
/// - `COUNT`: {count: 1}; `SUM` (no suppression): {sum: 1}.
/// - `AVG = mid + S/N` (S centred, Δ_S = R·S·H, Δ_N = R·S, a = mean − mid):
///   Var ≈ 2(Δ_S²/ε_S² + a²Δ_N²/ε_N²)/N² = 2(R·S·H)²/N² · (1/ε_S² + (a/H)²/ε_N²), and
///   E[(a/H)²] = 1/3 for a mean uniform in the bounds: {sum: 3/4, count: 1/4}. A `SUM`
///   that carries a count for small-cell suppression uses the same weights.
/// - `VAR`/`STDDEV` from N, S and the centred sum of squares Q (Δ_Q = R·S·H²):
///   Var(V̂) ≈ [σ_Q² + 4a²σ_S² + (V − a²)²σ_N²]/N², which in units of H⁴ has expected
///   weights {Q: 1, S: 4/3, N: 11/45} under a uniform mean a and, given a, a uniform V in
///   [0, H² − a²]; normalised: {Q: 45/116, S: 60/116, N: 11/116}. (STDDEV = √V has the same
///   relative weights, scaled by 1/(4V).)
///
/// - A percentile (`MEDIAN`, `PERCENTILE_CONT`, ...): {quantile: 1}. Its error is a rank
///   error of the exponential mechanism, ∝ 1/ε like a count's, so it is weighted as one
///   output like a `COUNT`; several percentiles at the same α of one column share it.
///
/// Statistics shared by several outputs add their coefficients: `c_i = Σ_o c_{o,i}`.
/// Minimising `Σ_o Var_o / scale_o = Σ_i c_i / ε_i²` subject to `Σ ε_i = ε` (Lagrange) gives
/// `ε_i = ε · c_i^{1/3} / Σ_j c_j^{1/3}`. For one AVG that is ε_S = 0.591ε, ε_N = 0.409ε.
/// The sensitivities need no extra weight: with centring Δ_S/Δ_N = H in value units, which
/// the per-output normalisation already absorbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Allocation {
    /// `ε_i ∝ c_i^{1/3}`, as above (the default).
    #[default]
    Balanced,
    /// Equal shares for every statistic: the naive split, kept for comparison.
    Even,
}

/// Share of every query's ε spent on its bounding report (1/20): the noisy number of
/// participants whose rows bounding truncated. The statistics share the rest.
pub const TRUNCATION_SHARE_DENOMINATOR: u32 = 20;

/// How the bounding report is named in EXPLAIN and in the audit log's ε split.
pub const TRUNCATION_LABEL: &str = "participants truncated by bounding (more than R rows)";

/// The bounding report of a query: how many participants had more than R rows after the
/// filter (each counted once per site), released with noise so researchers can tell
/// truncation bias from noise.
#[derive(Debug, Clone)]
pub struct TruncationReport {
    /// S: one participant is truncated at most once per site.
    pub sensitivity: u128,
    /// Its share of the query's ε (exact): ε / [`TRUNCATION_SHARE_DENOMINATOR`].
    pub epsilon: RBig,
}

/// Allocation weights of an AVG (and of a SUM with a suppression count): sum, count.
pub const AVG_WEIGHTS: (f64, f64) = (0.75, 0.25);
/// Allocation weights of VAR/STDDEV: sum of squares, centred sum, count.
pub const VAR_WEIGHTS: (f64, f64, f64) = (45.0 / 116.0, 60.0 / 116.0, 11.0 / 116.0);

/// How one aggregate of the SQL is computed from statistics.
#[derive(Debug, Clone)]
pub enum AggregateOutput {
    /// `COUNT(*)` or `COUNT(col)`.
    Count { stat: usize },
    /// `SUM(col)` of values clamped into `bounds`; with small-cell suppression on, the
    /// noisy count of non-null values that decides it.
    Sum {
        stat: usize,
        bounds: Bounds,
        count_stat: Option<usize>,
    },
    /// `AVG(col)` = mid + centred sum / count, clamped into [lower, upper].
    Avg {
        sum_stat: usize,
        count_stat: usize,
        bounds: Bounds,
        mid_fp: i128,
    },
    /// `VAR_SAMP`/`VAR_POP` (`sample`), and `STDDEV_*` (`sqrt`): from the noisy count N,
    /// centred sum S and centred sum of squares Q: V_pop = Q/N − (S/N)²,
    /// V_samp = V_pop · N/(N − 1), clamped into [0, half-width²·N/(N − 1)].
    Variance {
        count_stat: usize,
        sum_stat: usize,
        sq_stat: usize,
        bounds: Bounds,
        /// Half-width of the fixed-point bounds around their midpoint.
        half_fp: i128,
        sample: bool,
        sqrt: bool,
    },
    /// `MEDIAN`, `PERCENTILE_CONT`, `APPROX_PERCENTILE_CONT`: the candidate of `grid`
    /// (fixed point, in units of `bounds.precision`) chosen by the quantile statistic.
    Quantile {
        stat: usize,
        bounds: Bounds,
        grid: QuantileGrid,
        /// The quantile asked for, in [0, 1] (after `DESC` ordering is turned around).
        alpha: f64,
    },
}

impl AggregateOutput {
    /// The count statistic that decides small-cell suppression of this output, if any.
    pub fn count_stat(&self) -> Option<usize> {
        match self {
            AggregateOutput::Count { stat } => Some(*stat),
            AggregateOutput::Sum { count_stat, .. } => *count_stat,
            AggregateOutput::Avg { count_stat, .. }
            | AggregateOutput::Variance { count_stat, .. } => Some(*count_stat),
            AggregateOutput::Quantile { .. } => None,
        }
    }

    /// Statistics this output is computed from.
    pub fn stats(&self) -> Vec<usize> {
        match self {
            AggregateOutput::Count { stat } | AggregateOutput::Quantile { stat, .. } => {
                vec![*stat]
            }
            AggregateOutput::Sum {
                stat, count_stat, ..
            } => std::iter::once(*stat).chain(*count_stat).collect(),
            AggregateOutput::Avg {
                sum_stat,
                count_stat,
                ..
            } => vec![*sum_stat, *count_stat],
            AggregateOutput::Variance {
                count_stat,
                sum_stat,
                sq_stat,
                ..
            } => vec![*sq_stat, *sum_stat, *count_stat],
        }
    }
}

/// A checked, planned query.
#[derive(Debug, Clone)]
pub struct PlannedQuery {
    /// Query id shared with the nodes' logs.
    pub query_id: String,
    /// SQL text as received.
    pub sql: String,
    /// Catalog table read: the driving (`FROM`) table of a join, whose R applies.
    pub table: String,
    /// The tables joined to it on the privacy unit, in order.
    pub join_tables: Vec<String>,
    /// Request sent, unchanged, to every node.
    pub request: PartialAggregateRequest,
    /// Group keys in GROUP BY order.
    pub groups: Vec<GroupKey>,
    /// Noisy statistics.
    pub statistics: Vec<Statistic>,
    /// One entry per aggregate expression, in the aggregate's output order.
    pub outputs: Vec<AggregateOutput>,
    /// Output schema of the aggregate node (group keys, then aggregates).
    pub aggregate_schema: DFSchemaRef,
    /// The whole logical plan; the aggregate is replaced by noisy values at release.
    pub plan: LogicalPlan,
    /// ε the query spends.
    pub epsilon: f64,
    /// R of the table read (of the driving table in a join), or the smaller bound the query
    /// proves (1 for a set of participants counted from `FROM`).
    pub max_rows_per_unit: u32,
    /// Where R comes from, for EXPLAIN.
    pub row_bound_source: &'static str,
    /// S of the federation.
    pub max_sites_per_unit: u32,
    /// How ε was split.
    pub allocation: Allocation,
    /// The noisy report of how many participants bounding truncated.
    pub truncation: TruncationReport,
    /// DP partition selection, when a GROUP BY key has no public domain.
    pub selection: Option<PartitionSelection>,
    /// δ the query is charged: the policy's `delta_per_query` with partition selection,
    /// else 0 (every other mechanism is pure ε-DP).
    pub delta: f64,
}

/// Plans SQL against the catalog.
pub struct Planner {
    ctx: SessionContext,
    catalog: Catalog,
    min_reported_count: u64,
    allocation: Allocation,
    delta_per_query: f64,
}

fn refuse(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Refused(msg.into())
}

/// Schema of a catalog table as DataFusion sees it.
pub fn table_schema(spec: &fedq_common::TableSpec) -> Schema {
    Schema::new(
        spec.columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable))
            .collect::<Vec<_>>(),
    )
}

impl PlannedQuery {
    /// Every catalog table the query reads.
    pub fn tables(&self) -> Vec<&str> {
        std::iter::once(self.table.as_str())
            .chain(self.join_tables.iter().map(String::as_str))
            .collect()
    }

    /// What the request reads, as SQL says it: `labs`, `labs JOIN participants`,
    /// `participants LEFT JOIN diagnoses`.
    pub fn relation(&self) -> String {
        let mut out = self.table.clone();
        for (t, j) in self.join_tables.iter().zip(&self.request.joins) {
            out.push_str(match j.kind {
                fedq_common::JoinKind::Left => " LEFT JOIN ",
                fedq_common::JoinKind::Inner => " JOIN ",
            });
            out.push_str(t);
        }
        out
    }
}

impl Planner {
    /// A planner over the catalog's tables.
    pub fn new(catalog: &Catalog) -> Result<Planner, CoordinatorError> {
        let ctx = SessionContext::new();
        for f in crate::calendar::functions() {
            ctx.register_udf(f);
        }
        for (name, spec) in &catalog.tables {
            let provider: Arc<dyn TableProvider> =
                Arc::new(EmptyTable::new(Arc::new(table_schema(spec))));
            ctx.register_table(name.as_str(), provider).map_err(|e| {
                CoordinatorError::Config(format!("cannot register catalog table {name}: {e}"))
            })?;
        }
        Ok(Planner {
            ctx,
            catalog: catalog.clone(),
            min_reported_count: 0,
            allocation: Allocation::Balanced,
            delta_per_query: 0.0,
        })
    }

    /// With the policy's δ per query, which partition selection (GROUP BY keys without a
    /// public domain) spends; 0 (the default) refuses such queries.
    pub fn with_delta_per_query(mut self, delta: f64) -> Self {
        self.delta_per_query = delta;
        self
    }

    /// With small-cell suppression at `min_reported_count` (policy): every SUM then carries
    /// a noisy count of its non-null values, which decides its suppression.
    pub fn with_min_reported_count(mut self, min_reported_count: u64) -> Self {
        self.min_reported_count = min_reported_count;
        self
    }

    /// With another ε allocation rule (benchmarks compare [`Allocation::Even`]).
    pub fn with_allocation(mut self, allocation: Allocation) -> Self {
        self.allocation = allocation;
        self
    }

    /// Parse and plan SQL without checking it against the privacy model.
    pub async fn logical_plan(&self, sql: &str) -> Result<LogicalPlan, CoordinatorError> {
        // Before any recursive pass: a tree too deep for the stack is refused here.
        crate::sql_limits::check(sql)?;
        self.ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(|e| {
                let mut m = clean_df_error(&e.to_string());
                // DataFusion resolves a chain of four or more `USING` joins ambiguously.
                if m.starts_with("Ambiguous reference to unqualified field")
                    && sql.to_ascii_uppercase().contains("USING")
                {
                    m.push_str(
                        "; in a join of several tables, write each join condition with the table \
                         after FROM (`JOIN labs l ON l.pid = p.pid`) instead of USING, and qualify \
                         the participant column (`p.pid`)",
                    );
                }
                CoordinatorError::InvalidSql(m)
            })
    }

    /// Plan `sql` to spend `epsilon`, checking every rule of the privacy model.
    pub async fn plan(
        &self,
        sql: &str,
        epsilon: f64,
        query_id: &str,
    ) -> Result<PlannedQuery, CoordinatorError> {
        // Scalar subqueries over the query's own table become aggregates of it.
        let plan = crate::scalar::inline(self.logical_plan(sql).await?)?;
        // 1. Query shape: the DP aggregate, and the relation below it.
        let shape = self.shape(&plan)?;
        // 2. The participant-local part, typed as the node will run it.
        let local = self.local_plan(&shape)?;
        let scope = local.scope(&self.catalog)?;
        let keys = self.keys(&shape.group_expr, &local, &scope)?;
        // 3. Statistics: the partials each aggregate needs, and their sensitivities.
        let mut stats = self.statistics(&shape, &local, &scope, &keys)?;
        // 4. ε allocation: the bounding report, partition selection, then the statistics.
        let eps = rational(epsilon)?;
        let truncation = TruncationReport {
            sensitivity: u128::from(self.catalog.max_sites_per_unit),
            epsilon: eps.clone() / RBig::from(TRUNCATION_SHARE_DENOMINATOR),
        };
        let selection = match keys.max_groups {
            None => None,
            Some(g) => {
                let partial = stats.builder.partial(AggregateRequest::CountUnits);
                Some(PartitionSelection::new(
                    partial,
                    g,
                    local.spec.max_rows_per_unit,
                    self.catalog.max_sites_per_unit,
                    eps.clone() / RBig::from(SELECTION_SHARE_DENOMINATOR),
                    self.delta_per_query,
                )?)
            }
        };
        let selection_eps = selection.as_ref().map_or(RBig::ZERO, |s| s.epsilon.clone());
        allocate(
            &mut stats.builder.statistics,
            eps.clone() - truncation.epsilon.clone() - selection_eps,
            self.allocation,
        )?;
        // 5. The node request.
        let request = PartialAggregateRequest {
            query_id: query_id.to_string(),
            table: local.table.clone(),
            joins: local.joins.clone(),
            filter: local.predicate.clone(),
            group_by: keys.groups.iter().map(|g| g.key.clone()).collect(),
            aggregates: stats.builder.partials,
            max_rows_per_unit: local.max_rows_per_unit,
            max_groups_per_unit: keys.max_groups,
            derived: local.derived.clone(),
            computed: stats.builder.computed,
        };
        let leaves = request.set_leaf_count();
        if leaves > fedq_common::participant_set::MAX_SET_LEAVES {
            return Err(refuse(format!(
                "the query tests {leaves} participant subqueries; the limit is {}: combine conditions on the same table in one subquery (`pid IN (SELECT pid FROM diagnoses WHERE code IN ('E11', 'I10'))`)",
                fedq_common::participant_set::MAX_SET_LEAVES
            )));
        }
        // The nodes' structural limits, checked here too, so that a query over them is
        // refused with the limit rather than by every site.
        request.check_limits().map_err(|m| {
            refuse(format!(
                "the query is too large for the nodes: {m}. Simplify it: a long OR on one column is \
                 `col IN (...)`, and a long CASE on one column is often a bucket (`birth_year / 10`)"
            ))
        })?;
        let size = request
            .encode_ticket()
            .map_err(|e| CoordinatorError::internal(query_id, e.to_string()))?
            .len();
        if size > fedq_common::wire::MAX_REQUEST_BYTES {
            return Err(refuse(format!(
                "the query's node request is {size} bytes; the nodes accept {}. Shorten its IN lists",
                fedq_common::wire::MAX_REQUEST_BYTES
            )));
        }
        Ok(PlannedQuery {
            query_id: query_id.to_string(),
            sql: sql.to_string(),
            join_tables: local.joined.iter().map(|(t, _, _)| t.clone()).collect(),
            table: local.table.clone(),
            request,
            groups: keys.groups,
            statistics: stats.builder.statistics,
            outputs: stats.outputs,
            aggregate_schema: shape.agg.schema.clone(),
            plan: plan.clone(),
            epsilon,
            max_rows_per_unit: local.max_rows_per_unit,
            row_bound_source: local.row_bound_source,
            max_sites_per_unit: self.catalog.max_sites_per_unit,
            allocation: self.allocation,
            truncation,
            delta: if selection.is_some() {
                self.delta_per_query
            } else {
                0.0
            },
            selection,
        })
    }

    /// Phase 1: the DP aggregate and what is below it: a set of participants counted from
    /// `FROM`, or one table (or derived table), or several joined on the participant.
    fn shape<'p>(&self, plan: &'p LogicalPlan) -> Result<QueryShape<'p>, CoordinatorError> {
        let agg = find_aggregate(plan)?;
        if agg.aggr_expr.is_empty() {
            return Err(refuse(
                "the query has no aggregate, so it would list which values exist; add COUNT(*), SUM or AVG",
            ));
        }
        // `FROM (<a set of participants>) t`: the request reads a table every member has
        // rows in, keeps the set's members, and counts participants.
        let set = crate::cohort::set_source(&agg.input, &self.catalog)?;
        let source = match &set {
            Some((_, t)) => Source {
                left: Scan {
                    table: t.clone(),
                    qualifier: t.clone(),
                    derived: None,
                    first_row: None,
                },
                joins: Vec::new(),
                filters: Vec::new(),
                renames: Vec::new(),
            },
            None => source_below(&agg.input, &self.catalog)?,
        };
        let numbered = std::iter::once(&source.left).chain(source.joins.iter().map(|j| &j.scan));
        if let Some(rn) = numbered.filter_map(|s| s.first_row.as_ref()).next() {
            return Err(refuse(format!(
                "a numbered subquery is read as one row of each participant: keep the first with `WHERE {rn} = 1`, or the k-th \
                 with `WHERE {rn} = k` (other tests of the row number would count several rows per participant); \
                 for a LEFT JOIN, test it inside the joined subquery, `LEFT JOIN (SELECT * FROM latest WHERE {rn} = 1) l`"
            )));
        }
        if set.is_some() && !agg.group_expr.is_empty() {
            return Err(refuse(
                "a set of participants has only the participant column, so it cannot be grouped: \
                 group a table's rows instead, e.g. `SELECT sex, COUNT(*) FROM participants WHERE pid IN (<the set>) GROUP BY sex`",
            ));
        }
        let over = |exprs: &[Expr]| {
            exprs
                .iter()
                .map(|e| rename::substitute(e, &source.renames))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(QueryShape {
            agg,
            group_expr: over(&agg.group_expr)?,
            aggr_expr: over(&agg.aggr_expr)?,
            set: set.map(|(s, _)| s),
            source,
        })
    }

    /// Phase 2: the participant-local part: the driving relation and its declaration, the
    /// join, the filter as a wire predicate, and the row bound R with where it comes from.
    fn local_plan(&self, shape: &QueryShape<'_>) -> Result<LocalPlan, CoordinatorError> {
        let src = &shape.source;
        let lookup = |t: &str| {
            self.catalog.table(t).ok_or_else(|| {
                CoordinatorError::InvalidSql(format!("table `{t}` is not in the catalog"))
            })
        };
        // A derived table is declared from its source table's catalog entry (R = 1).
        let spec = match &src.left.derived {
            Some(d) => d.spec(&self.catalog).map_err(|e| refuse(e.0))?,
            None => lookup(&src.left.table)?.clone(),
        };
        let mut local = LocalPlan {
            table: src.left.table.clone(),
            qualifier: src.left.qualifier.clone(),
            joined: src
                .joins
                .iter()
                .map(|j| {
                    let spec = match &j.scan.derived {
                        Some(d) => d.spec(&self.catalog).map_err(|e| refuse(e.0))?,
                        None => lookup(&j.scan.table)?.clone(),
                    };
                    Ok((j.scan.table.clone(), j.scan.qualifier.clone(), spec))
                })
                .collect::<Result<_, CoordinatorError>>()?,
            joins: Vec::new(),
            filters: src.filters.clone(),
            predicate: None,
            derived: src.left.derived.clone(),
            // A set of participants needs one row per participant to be counted: the bound
            // R the query proves is 1, whatever the table's.
            max_rows_per_unit: if shape.set.is_some() {
                1
            } else {
                spec.max_rows_per_unit
            },
            row_bound_source: match (&shape.set, &src.left.derived) {
                (Some(_), _) => "proven by the query: a set of participants has one row per participant",
                (None, Some(_)) => "proven by the query: a derived table grouped by the participant has one row per participant",
                (None, None) => "the catalog's max_rows_per_unit of the table read",
            },
            spec,
        };
        let (joins, filters, predicate) = {
            let scope = local.scope(&self.catalog)?;
            let mut filters = local.filters.clone();
            let joins = join_specs(&scope, src, &mut filters)?;
            // WHERE (and an inner join's further conditions) -> wire predicate, with the
            // membership of a set counted from `FROM`.
            let mut parts = filters
                .iter()
                .map(|f| to_predicate(f, &scope))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(set) = &shape.set {
                parts.push(fedq_common::Predicate::InSet {
                    side: Side::LEFT,
                    set: Box::new(set.clone()),
                    negated: false,
                });
            }
            let predicate = parts
                .into_iter()
                .reduce(|a, b| fedq_common::Predicate::Binary {
                    op: fedq_common::BinaryOp::And,
                    left: Box::new(a),
                    right: Box::new(b),
                });
            (joins, filters, predicate)
        };
        local.joins = joins;
        local.filters = filters;
        local.predicate = predicate;
        Ok(local)
    }

    /// Phase 2, keys: each GROUP BY expression as a wire key with its released domain
    /// (public, narrowed by the WHERE, or listed by it), or open keys released through
    /// partition selection, which needs G and δ.
    fn keys(
        &self,
        group_expr: &[Expr],
        local: &LocalPlan,
        scope: &Scope<'_>,
    ) -> Result<Keys, CoordinatorError> {
        let (spec, table, filters) = (&local.spec, &local.table, &local.filters);
        // GROUP BY -> keys, public or (partition selection) not.
        let mut groups: Vec<GroupKey> = Vec::new();
        // Keys without a public domain: (label, what the officer could declare instead).
        let mut open_keys: Vec<(String, String)> = Vec::new();
        for g in group_expr {
            let g = strip_alias(g);
            let (mut key, label, col) = group_key(g, scope, spec)?;
            // A column without a public domain that the WHERE restricts to listed literals
            // (`code IN ('C50', 'C34')`): the list is in the query text, so it is public, and
            // exactly those groups are released, without partition selection.
            if let (fedq_common::GroupKey::Column { column }, Some(c)) = (&key, col) {
                if c.public_values.is_none() {
                    if let Some(values) = filters
                        .iter()
                        .find_map(|f| literal_set(f, column, scope))
                        .and_then(|set| listed_values(&set, c.ty))
                    {
                        key = fedq_common::GroupKey::Listed {
                            column: column.clone(),
                            values,
                        };
                    }
                }
            }
            let ty = key
                .output_type(col)
                .map_err(|e| refuse(format!("GROUP BY `{label}`: {}", e.0)))?;
            if let (
                fedq_common::GroupKey::Column { .. } | fedq_common::GroupKey::Listed { .. },
                Some(c),
            ) = (&key, col)
            {
                if !matches!(
                    c.ty,
                    ColumnType::Utf8 | ColumnType::Int32 | ColumnType::Int64 | ColumnType::Boolean
                ) {
                    return Err(refuse(format!(
                            "GROUP BY `{label}`: keys must be text, integer or boolean columns, not {}; \
                             bucket numbers with `column / n` or a CASE with literal labels",
                            c.ty
                        )));
                }
            }
            let domain = key
                .domain(col)
                .map_err(|e| refuse(format!("GROUP BY `{label}`: {}", e.0)))?;
            let (domain, public) = match domain {
                KeyDomain::Public(values) => (values, true),
                KeyDomain::Open => {
                    let declare = open_key_fix(&key, col, &label, scope);
                    open_keys.push((label.clone(), declare));
                    (Vec::new(), false)
                }
            };
            if groups.iter().any(|k| k.key == key) {
                return Err(CoordinatorError::InvalidSql(format!(
                    "`{label}` appears twice in GROUP BY"
                )));
            }
            groups.push(GroupKey {
                column: label,
                key,
                ty,
                domain,
                public,
            });
        }
        narrow_public_domains(&mut groups, filters, scope);
        // Keys without a public domain: DP partition selection, which needs G (of the
        // driving table, whose R applies too) and δ.
        let max_groups = match open_keys.first() {
            None => None,
            Some((label, declare)) => {
                let Some(g) = spec.max_groups_per_unit else {
                    return Err(refuse(format!(
                            "GROUP BY `{label}`: the key has no public domain, so its groups could reveal single participants. \
                             Such groups are released only through DP partition selection, which needs the privacy officer to declare \
                             `max_groups_per_unit` (G, the groups one participant may count in) for table `{table}`{join_note}; \
                             or {declare}. Columns you can group by now: {}",
                            public_columns(spec),
                            join_note = if !local.joined.is_empty() {
                                " (the driving table of the join, whose R and G apply)"
                            } else {
                                ""
                            },
                        )));
                };
                if self.delta_per_query.is_nan() || self.delta_per_query <= 0.0 {
                    return Err(refuse(format!(
                            "GROUP BY `{label}`: the column has no public domain, so its groups are released only through DP \
                             partition selection, which costs δ, and the policy's delta_per_query is 0. Ask the privacy officer \
                             to set `[policy] delta_per_query` (e.g. 1e-7) and to grant you a δ budget, or group by columns with \
                             a public domain: {}",
                            public_columns(spec)
                        )));
                }
                for k in &mut groups {
                    k.public = false;
                    k.domain.clear();
                }
                Some(g)
            }
        };
        let n_groups: usize = match max_groups {
            // A participant counts in at most G groups at a site.
            Some(g) => g as usize,
            None => groups.iter().map(|g| g.domain.len()).product(),
        };
        if max_groups.is_none() && n_groups > fedq_common::wire::MAX_GROUPS {
            return Err(refuse(format!(
                "the GROUP BY keys have {n_groups} combinations; the limit is {}",
                fedq_common::wire::MAX_GROUPS
            )));
        }
        Ok(Keys {
            groups,
            max_groups,
            n_groups,
        })
    }

    /// Phase 3: the partial aggregates and statistics of every output, with their
    /// sensitivities from R, S, the number of groups and the bounds.
    fn statistics(
        &self,
        shape: &QueryShape<'_>,
        local: &LocalPlan,
        scope: &Scope<'_>,
        keys: &Keys,
    ) -> Result<Statistics, CoordinatorError> {
        let n_groups = keys.n_groups;
        let mut b = StatBuilder {
            r: local.max_rows_per_unit,
            s: self.catalog.max_sites_per_unit,
            n_groups: n_groups as u128,
            suppression: self.min_reported_count > 0,
            ..Default::default()
        };
        let mut outputs = Vec::new();
        for (j, e) in shape.aggr_expr.iter().enumerate() {
            b.output = j;
            outputs.push(match &shape.set {
                // Each member is one participant: COUNT(*), COUNT(pid) and COUNT(DISTINCT
                // pid) over the set all count participants.
                Some(_) => b.set_count(strip_alias(e))?,
                None => b.aggregate(strip_alias(e), scope)?,
            });
        }
        let cells: usize = b
            .partials
            .iter()
            .map(|a| match a {
                AggregateRequest::QuantileHistogram { candidates, .. } => {
                    (2 * *candidates as usize - 1).saturating_mul(n_groups.max(1))
                }
                _ => 0,
            })
            .sum();
        if cells > MAX_HISTOGRAM_CELLS {
            return Err(refuse(format!(
                "the percentiles of this query need {cells} histogram cells over {n_groups} group(s); \
                 the nodes allow {MAX_HISTOGRAM_CELLS}: ask for percentiles of fewer columns or group by fewer keys"
            )));
        }
        Ok(Statistics {
            builder: b,
            outputs,
        })
    }
}

/// Phase 1 of planning: the DP aggregate and the relation below it.
struct QueryShape<'p> {
    agg: &'p Aggregate,
    /// The aggregate's GROUP BY and aggregates, over the relations below it (a
    /// subquery's computed columns read by their definitions).
    group_expr: Vec<Expr>,
    aggr_expr: Vec<Expr>,
    /// `FROM (<a set of participants>) t`: the set, counted.
    set: Option<fedq_common::ParticipantSet>,
    source: Source,
}

/// Phase 2 of planning: the participant-local part, as the node request will carry it.
struct LocalPlan {
    table: String,
    qualifier: String,
    /// The driving relation's declaration: its catalog table's, or its derived table's.
    spec: fedq_common::TableSpec,
    /// The joined relations: table, qualifier and declaration (the catalog's, or their
    /// derived table's), in order.
    joined: Vec<(String, String, fedq_common::TableSpec)>,
    joins: Vec<JoinSpec>,
    /// The SQL conditions on the rows (a WHERE's listed values narrow key domains).
    filters: Vec<Expr>,
    /// Their wire form.
    predicate: Option<fedq_common::Predicate>,
    derived: Option<fedq_common::derived::PerParticipant>,
    /// R, and where it comes from (shown by EXPLAIN).
    max_rows_per_unit: u32,
    row_bound_source: &'static str,
}

impl LocalPlan {
    /// The tables its columns resolve against.
    fn scope<'a>(&'a self, catalog: &'a Catalog) -> Result<Scope<'a>, CoordinatorError> {
        let joined = self
            .joined
            .iter()
            .map(|(table, qualifier, spec)| Relation {
                table,
                qualifier,
                spec,
            })
            .collect();
        Ok(Scope {
            left: Relation {
                table: &self.table,
                qualifier: &self.qualifier,
                spec: &self.spec,
            },
            joined,
            catalog,
        })
    }
}

/// The GROUP BY keys of a plan.
struct Keys {
    groups: Vec<GroupKey>,
    /// G, when some key has no public domain (partition selection).
    max_groups: Option<u32>,
    /// Groups one participant can count in: the domains' product, or G.
    n_groups: usize,
}

/// Phase 3 of planning: the partials and statistics, and how each output reads them.
struct Statistics {
    builder: StatBuilder,
    outputs: Vec<AggregateOutput>,
}

/// A WHERE that admits only some values of a public key (`kind IN ('serum', 'plasma')`,
/// `test = 'HbA1c'`) narrows the released domain to them: the query text is public, and
/// the other groups would only ever be noise around zero.
fn narrow_public_domains(groups: &mut [GroupKey], filters: &[Expr], scope: &Scope<'_>) {
    for k in groups.iter_mut() {
        let fedq_common::GroupKey::Column { column } = &k.key else {
            continue;
        };
        for f in filters {
            let Some(allowed) = literal_set(f, column, scope) else {
                continue;
            };
            let narrowed: Vec<PublicValue> = k
                .domain
                .iter()
                .filter(|v| allowed.iter().any(|s| public_matches(v, s)))
                .cloned()
                .collect();
            // An empty intersection keeps the full domain: every group is then noise
            // around zero, which is the honest answer, and the shape stays the same.
            if !narrowed.is_empty() {
                k.domain = narrowed;
            }
        }
    }
}

/// What the privacy officer could declare (or the researcher write) so that a key without a
/// public domain gets one.
fn open_key_fix(
    key: &fedq_common::GroupKey,
    col: Option<&ColumnSpec>,
    label: &str,
    scope: &Scope<'_>,
) -> String {
    let qualified = |c: &ColumnRef| {
        let t = scope.relation(c.side).unwrap_or(scope.left).table;
        format!("{t}.{}", c.name)
    };
    match (key, key.column()) {
            (fedq_common::GroupKey::Column { .. }, Some(c)) => {
                let bucket = match col {
                    Some(spec)
                        if spec.bounds().is_some()
                            && matches!(
                                spec.ty,
                                ColumnType::Int32 | ColumnType::Int64
                            ) =>
                    {
                        format!(", or group by buckets such as `{label} / 10`")
                    }
                    _ => String::new(),
                };
                format!("declare `public_values` for {}{bucket}", qualified(c))
            }
            (fedq_common::GroupKey::IntBucket { .. }, Some(c)) => format!(
                "declare `lower` and `upper` bounds for {} (giving at most {} buckets)",
                qualified(c),
                fedq_common::group_key::MAX_DERIVED_DOMAIN
            ),
            (fedq_common::GroupKey::DatePart { .. }, Some(c)) => format!(
                "declare the date range of {} (`earliest` and `latest`, \"YYYY-MM-DD\") in the catalog, \
                 or group by a field whose domain is public (month, quarter, week, day of the week)",
                qualified(c)
            ),
            _ => "group by keys with a public domain".to_string(),
        }
}

/// Split `epsilon` exactly across `stats` by `rule` (see [`Allocation`]). The shares are
/// exact rationals summing to `epsilon`: weights are rounded to rationals first, then each
/// share is ε·w_i/Σw.
fn allocate(
    stats: &mut [Statistic],
    epsilon: RBig,
    rule: Allocation,
) -> Result<(), CoordinatorError> {
    let weights: Vec<RBig> = stats
        .iter()
        .map(|st| match rule {
            Allocation::Even => Ok(RBig::ONE),
            Allocation::Balanced => {
                // Round the cube root to 1e-9 so the rational stays small.
                let w = (st.cost.max(1e-9).cbrt() * 1e9).round();
                rational(w)
            }
        })
        .collect::<Result<_, _>>()?;
    let total = weights.iter().fold(RBig::ZERO, |a, w| a + w);
    if total <= RBig::ZERO {
        return Err(CoordinatorError::internal("-", "empty ε allocation"));
    }
    for (st, w) in stats.iter_mut().zip(weights) {
        st.epsilon = epsilon.clone() * w / total.clone();
    }
    Ok(())
}

/// Recognise one GROUP BY expression: a column, a `CASE` with literal labels, an integer
/// bucket (`column / n`, `column / n * n`) or a date part. Returns the wire key, its label
/// and its column's catalog entry (none for `CASE`).
fn group_key<'s>(
    g: &Expr,
    scope: &Scope<'s>,
    spec: &fedq_common::TableSpec,
) -> Result<(fedq_common::GroupKey, String, Option<&'s ColumnSpec>), CoordinatorError> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    let label = g.human_display().to_string();
    let unsupported = || {
        refuse(format!(
            "GROUP BY `{label}`: group by a column with a public domain (such as {}), a CASE with literal labels \
             (CASE WHEN birth_year < 1960 THEN 'before 1960' ELSE '1960 on' END), an integer column divided by a \
             number (birth_year / 10, or birth_year / 10 * 10), or a calendar field of a date column ({})",
            public_columns(spec),
            fedq_common::group_key::DATE_FIELD_SPELLINGS
        ))
    };
    // A column of the query, checked against the catalog and the privacy unit.
    let column = |e: &Expr| -> Result<(ColumnRef, String, &'s ColumnSpec), CoordinatorError> {
        let Expr::Column(c) = strip_alias(e) else {
            return Err(unsupported());
        };
        let (column_ref, rel) = scope.column_ref(c)?;
        let label = scope.label(&rel, &c.name);
        let col = rel.spec.column(&c.name).ok_or_else(|| {
            CoordinatorError::InvalidSql(format!(
                "column `{}` is not in table `{}`",
                c.name, rel.table
            ))
        })?;
        if c.name == rel.spec.privacy_unit {
            return Err(refuse(format!(
                "GROUP BY `{label}`: grouping by the privacy unit makes every group one participant; \
                 count participants with COUNT(DISTINCT {label}) instead"
            )));
        }
        Ok((column_ref, label, col))
    };
    let int_literal = |e: &Expr| match strip_alias(e) {
        Expr::Literal(v, _) => match crate::predicate::literal(v) {
            Ok(Literal::Int64(i)) => Some(i),
            _ => None,
        },
        _ => None,
    };
    let bucket = |e: &Expr, multiplier: i64| -> Result<_, CoordinatorError> {
        let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Divide,
            right,
        }) = strip_alias(e)
        else {
            return Err(unsupported());
        };
        let divisor = int_literal(right).ok_or_else(|| {
            refuse(format!(
                "GROUP BY `{label}`: an integer bucket divides by an integer literal, such as birth_year / 10"
            ))
        })?;
        let (column, _, col) = column(left)?;
        Ok((
            fedq_common::GroupKey::IntBucket {
                column,
                divisor,
                multiplier,
            },
            label.clone(),
            Some(col),
        ))
    };
    match g {
        Expr::Column(_) => {
            let (column, label, col) = column(g)?;
            Ok((fedq_common::GroupKey::Column { column }, label, Some(col)))
        }
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::Divide,
            ..
        }) => bucket(g, 1),
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Multiply,
            right,
        }) => match (int_literal(right), int_literal(left)) {
            (Some(m), _) => bucket(left, m),
            (None, Some(m)) => bucket(right, m),
            (None, None) => Err(unsupported()),
        },
        Expr::Case(case) => {
            let else_expr = case.else_expr.as_deref().ok_or_else(|| {
                refuse(format!(
                    "GROUP BY `{label}`: a CASE key needs an ELSE label, such as ELSE 'other': rows matching no WHEN would \
                     form a NULL group"
                ))
            })?;
            let label_of = |e: &Expr| {
                match strip_alias(e) {
                Expr::Literal(v, _) => match crate::predicate::literal(v) {
                    Ok(l @ (Literal::Utf8(_) | Literal::Int64(_))) => Ok(l),
                    _ => Err(refuse(format!(
                        "GROUP BY `{label}`: CASE labels must be text or integer literals, not `{e}`"
                    ))),
                },
                _ => Err(refuse(format!(
                    "GROUP BY `{label}`: CASE labels must be literals such as 'under 40', not `{e}`, so that the groups \
                     are known before the data is read"
                ))),
            }
            };
            let mut branches = Vec::with_capacity(case.when_then_expr.len());
            for (w, t) in &case.when_then_expr {
                let cond = match &case.expr {
                    // CASE x WHEN v THEN …: the condition is x = v.
                    Some(base) => fedq_common::Predicate::Binary {
                        op: fedq_common::BinaryOp::Eq,
                        left: Box::new(to_predicate(base, scope)?),
                        right: Box::new(to_predicate(w, scope)?),
                    },
                    None => to_predicate(w, scope)?,
                };
                branches.push(fedq_common::group_key::CaseBranch {
                    when: cond,
                    then: label_of(t)?,
                });
            }
            Ok((
                fedq_common::GroupKey::Case {
                    branches,
                    otherwise: label_of(else_expr)?,
                },
                label,
                None,
            ))
        }
        // A boolean key (`GROUP BY pid IN (SELECT …)`): accepted when it can never be NULL
        // (`GroupKey::domain` checks), so its groups are exactly true and false.
        Expr::InSubquery(_)
        | Expr::Exists(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::Not(_)
        | Expr::BinaryExpr(BinaryExpr {
            op: Operator::And | Operator::Or,
            ..
        }) => Ok((
            fedq_common::GroupKey::Condition {
                when: to_predicate(g, scope)?,
            },
            label,
            None,
        )),
        Expr::ScalarFunction(f) if crate::calendar::date_part_call(f).is_some() => {
            let Some((field, arg)) = crate::calendar::date_part_call(f) else {
                return Err(unsupported());
            };
            let field = field.ok_or_else(|| {
                refuse(format!(
                    "GROUP BY `{label}`: the date field must be a literal; write {}",
                    fedq_common::group_key::DATE_FIELD_SPELLINGS
                ))
            })?;
            let (column, _, col) = column(arg)?;
            Ok((
                fedq_common::GroupKey::DatePart { field, column },
                label,
                Some(col),
            ))
        }
        _ => Err(unsupported()),
    }
}

fn public_columns(spec: &fedq_common::TableSpec) -> String {
    let v: Vec<&str> = spec
        .columns
        .iter()
        .filter(|c| c.public_values.is_some())
        .map(|c| c.name.as_str())
        .collect();
    if v.is_empty() {
        "(none in this table)".into()
    } else {
        v.join(", ")
    }
}

/// DataFusion error texts start with "Error during planning: " and similar; keep the
/// useful part.
fn clean_df_error(s: &str) -> String {
    let s = s
        .trim_start_matches("SQL error: ")
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("Schema error: ");
    let s = s.trim_start_matches("Internal error: ");
    let s = s.split("\nbacktrace").next().unwrap_or(s);
    // DataFusion appends a bug-report hint to signature errors; it is not a bug here.
    let s = s
        .split(".\nThis issue was likely caused")
        .next()
        .unwrap_or(s);
    if s.contains("table") && s.contains("not found") {
        format!("{s}; run `SHOW TABLES` in fedq sql or see the catalog for available tables")
    } else {
        s.to_string()
    }
}

/// The expression under any number of aliases.
pub fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

fn contains_subquery(e: &Expr) -> bool {
    let mut found = false;
    let _ = e.apply(|x| {
        if matches!(
            x,
            Expr::Exists(_) | Expr::InSubquery(_) | Expr::ScalarSubquery(_)
        ) {
            found = true;
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}

use datafusion::common::tree_node::TreeNode;

/// Whether `plan` is a node the coordinator runs after the noise, above the aggregate.
pub(crate) fn is_post_processing(plan: &LogicalPlan) -> bool {
    matches!(
        plan,
        LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Distinct(_)
    )
}

/// Walk the post-processing part of the plan down to the single aggregate.
fn find_aggregate(plan: &LogicalPlan) -> Result<&Aggregate, CoordinatorError> {
    match plan {
        LogicalPlan::Aggregate(a) => Ok(a),
        p if is_post_processing(p) => {
            if plan.expressions().iter().any(contains_subquery) {
                return Err(refuse(
                    "this subquery is not supported above the aggregate (in the select list, HAVING or ORDER BY): \
                     only scalar subqueries that aggregate the query's own table are. \
                     A share or a prevalence is also one average over the denominator's rows: \
                     `SELECT AVG(CASE WHEN pid IN (SELECT pid FROM diagnoses WHERE code = 'E11') THEN 1000.0 ELSE 0 END) FROM participants` \
                     (per 1,000 participants), or with `GROUP BY sex` for a share per group; \
                     a count among a subset is `COUNT(*) FILTER (WHERE ...)`, beside `COUNT(*)` in the same query",
                ));
            }
            let inputs = plan.inputs();
            match inputs.as_slice() {
                [one] => find_aggregate(one),
                _ => Err(refuse("unexpected query shape")),
            }
        }
        LogicalPlan::TableScan(_) | LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
            Err(refuse(
                "fedq only answers aggregate queries, never rows. Ask for COUNT(*), COUNT(col), SUM(col) or AVG(col), \
                 optionally with GROUP BY on public columns, e.g. SELECT sex, COUNT(*) FROM participants GROUP BY sex",
            ))
        }
        LogicalPlan::Window(_) => Err(refuse(
            "window functions are not supported: they can output values row by row",
        )),
        LogicalPlan::Join(_) => Err(refuse(
            "fedq only answers aggregate queries, never rows: aggregate the joined rows, e.g. \
             SELECT p.sex, COUNT(*) FROM labs l JOIN participants p USING (pid) GROUP BY p.sex",
        )),
        LogicalPlan::Union(_) => Err(refuse("UNION is not supported; run each part as its own query")),
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => {
            Err(refuse("EXPLAIN is not supported yet"))
        }
        LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) => Err(refuse(
            "fedq is read-only: only SELECT aggregates and SET fedq.epsilon are accepted",
        )),
        LogicalPlan::Statement(_) => Err(refuse(
            "only `SET fedq.epsilon = <number>` is supported among session statements",
        )),
        other => Err(refuse(format!(
            "unsupported query construct ({}); fedq answers SELECT aggregates over one table",
            other.display()
        ))),
    }
}

/// A catalog table scanned below the aggregate, with the name its columns carry.
#[derive(Debug, Clone)]
struct Scan {
    table: String,
    qualifier: String,
    /// A per-participant derived table of `table` read instead of its rows.
    derived: Option<fedq_common::derived::PerParticipant>,
    /// The row-number column of a numbered subquery (`ROW_NUMBER() … AS rn`) whose
    /// `WHERE rn = 1` is still to be found above it.
    first_row: Option<String>,
}

/// What is below the aggregate: one table, or tables joined to it on the participant, with
/// the filters that apply to the rows (WHERE, and an inner join's other ON conditions).
#[derive(Debug, Clone)]
struct Source {
    left: Scan,
    /// The tables joined to the driving one, in order (at most [`fedq_common::wire::MAX_JOINS`]).
    joins: Vec<JoinedScan>,
    filters: Vec<Expr>,
    /// The columns of a subquery's select list read above it (`t.age` of `(SELECT …,
    /// 2026 - birth_year AS age …) t`), by their definitions (see `crate::rename`).
    renames: Vec<Rename>,
}

impl Source {
    /// One table (or derived table), with `filters`.
    fn scan(left: Scan, filters: Vec<Expr>) -> Source {
        Source {
            left,
            joins: Vec::new(),
            filters,
            renames: Vec::new(),
        }
    }
}

/// A table joined to the driving one, with its equality conditions `on`.
#[derive(Debug, Clone)]
struct JoinedScan {
    scan: Scan,
    on: Vec<(Expr, Expr)>,
    /// Inner or left outer.
    kind: fedq_common::JoinKind,
    /// A left join's further `ON` conditions (and the joined side's own filters), which
    /// decide which joined rows pair with a driving row rather than which rows count.
    join_on: Vec<Expr>,
}

/// Whether the columns of `e` are unqualified or qualified with `qualifier`.
fn names_scan(e: &Expr, qualifier: &str) -> bool {
    e.column_refs()
        .iter()
        .all(|c| c.relation.as_ref().is_none_or(|r| r.table() == qualifier))
}

const JOIN_HINT: &str = "join tables on the privacy unit, e.g. \
    `SELECT p.sex, COUNT(*), AVG(l.value) FROM labs l JOIN participants p USING (pid) GROUP BY p.sex`";

/// Below the aggregate: filters, aliases and plain-column projections over the scan of one
/// catalog table, or over a join of several on the participant.
fn source_below(plan: &LogicalPlan, catalog: &Catalog) -> Result<Source, CoordinatorError> {
    match plan {
        LogicalPlan::TableScan(t) => {
            let table = t.table_name.table().to_string();
            Ok(Source::scan(
                Scan {
                    qualifier: table.clone(),
                    table,
                    derived: None,
                    first_row: None,
                },
                t.filters.clone(),
            ))
        }
        LogicalPlan::Filter(f) => {
            // Subqueries in WHERE are translated with the rest of the filter: only those
            // that test the participant against a participant set are accepted
            // (`crate::cohort`).
            let mut s = source_below(&f.input, catalog)?;
            let predicate = rename::substitute(&f.predicate, &s.renames)?;
            // `WHERE rn = 1` over a numbered subquery is what makes it a derived table (of
            // the driving side, or of an inner-joined one).
            for c in datafusion::logical_expr::utils::split_conjunction(&predicate) {
                let numbered = std::iter::once(&mut s.left).chain(
                    s.joins
                        .iter_mut()
                        .filter(|j| j.kind == fedq_common::JoinKind::Inner)
                        .map(|j| &mut j.scan),
                );
                let mut tested = false;
                for scan in numbered {
                    let row = scan.first_row.as_deref().and_then(|rn| {
                        crate::cohort::row_number_test(c, rn)
                            .filter(|_| names_scan(c, &scan.qualifier))
                    });
                    if let (Some(k), Some(d)) = (row, scan.derived.as_mut()) {
                        // Row k of participants with at least k rows.
                        crate::cohort::read_row(d, k, catalog)?;
                        scan.first_row = None;
                        tested = true;
                        break;
                    }
                }
                if !tested {
                    s.filters.push(c.clone());
                }
            }
            Ok(s)
        }
        LogicalPlan::SubqueryAlias(a) => {
            // `(SELECT pid, MIN(d) AS first_d … GROUP BY pid) alias`: one row per participant.
            if let Some(d) = crate::cohort::derived_table(&a.input, catalog)? {
                return Ok(Source::scan(
                    Scan {
                        table: d.table.clone(),
                        qualifier: a.alias.table().to_string(),
                        derived: Some(d),
                        first_row: None,
                    },
                    Vec::new(),
                ));
            }
            // `(SELECT pid, value, ROW_NUMBER() OVER (PARTITION BY pid ORDER BY …) AS rn …) t`:
            // the first row per participant, once the query tests `rn = 1`.
            if let Some((d, rn)) = crate::cohort::first_row_table(&a.input, catalog)? {
                return Ok(Source::scan(
                    Scan {
                        table: d.table.clone(),
                        qualifier: a.alias.table().to_string(),
                        derived: Some(d),
                        first_row: Some(rn),
                    },
                    Vec::new(),
                ));
            }
            let mut s = source_below(&a.input, catalog)?;
            // A subquery with a select list: its columns are read by their definitions,
            // over the relations below (which keep their own names).
            if !s.renames.is_empty() {
                for r in &mut s.renames {
                    r.qualifier = Some(a.alias.table().to_string());
                }
                return Ok(s);
            }
            if !s.joins.is_empty() {
                return Err(refuse(format!(
                    "a join inside a subquery is not supported; {JOIN_HINT}"
                )));
            }
            s.left.qualifier = a.alias.table().to_string();
            Ok(s)
        }
        // A select list of the columns below, under their own names.
        LogicalPlan::Projection(p) if p.expr.iter().all(rename::keeps_name) => {
            let mut s = source_below(&p.input, catalog)?;
            // Over a join (or a select list below), the columns are renamed so that an
            // alias above can name them.
            if !s.renames.is_empty() || !s.joins.is_empty() {
                s.renames = rename::select_list(p, &s.renames)?;
            }
            Ok(s)
        }
        // Computed or renamed columns (`2026 - birth_year AS age`, `birth_year AS y`):
        // each output row is one input row, so the query is planned over their
        // definitions.
        LogicalPlan::Projection(p) => {
            if p.expr.iter().any(contains_subquery) {
                return Err(refuse(
                    "a subquery in a subquery's select list is not supported; test participants in WHERE, \
                     or use `pid IN (SELECT …)` as a key of the outer query",
                ));
            }
            let mut s = source_below(&p.input, catalog)?;
            s.renames = rename::select_list(p, &s.renames)?;
            Ok(s)
        }
        LogicalPlan::Join(j) => {
            use datafusion::logical_expr::JoinType;
            let kind = match j.join_type {
                JoinType::Inner => fedq_common::JoinKind::Inner,
                JoinType::Left => fedq_common::JoinKind::Left,
                JoinType::Right => {
                    return Err(refuse(format!(
                        "RIGHT joins are not supported: write a LEFT JOIN with the tables swapped (the table after FROM drives the join, and its R applies); {JOIN_HINT}"
                    )))
                }
                other => {
                    return Err(refuse(format!(
                        "{} joins are not supported: use an inner JOIN, or a LEFT JOIN to keep every row of the table after FROM, on the privacy unit; {JOIN_HINT}",
                        other.to_string().to_uppercase()
                    )))
                }
            };
            if j.on.is_empty() && j.filter.is_none() {
                return Err(refuse(format!(
                    "cross joins (FROM a, b or CROSS JOIN) are not supported: they pair rows of different participants; {JOIN_HINT}"
                )));
            }
            // SQL `ON` conditions arrive as a filter: equalities of two columns are join
            // keys (checked by `join_spec`), the rest filters the joined rows.
            let mut on = j.on.clone();
            let mut rest = Vec::new();
            if let Some(f) = &j.filter {
                if contains_subquery(f) {
                    return Err(refuse("subqueries are not supported in ON"));
                }
                for c in datafusion::logical_expr::utils::split_conjunction(f) {
                    match strip_alias(c) {
                        Expr::BinaryExpr(b)
                            if b.op == datafusion::logical_expr::Operator::Eq
                                && matches!(strip_alias(&b.left), Expr::Column(_))
                                && matches!(strip_alias(&b.right), Expr::Column(_)) =>
                        {
                            on.push((b.left.as_ref().clone(), b.right.as_ref().clone()))
                        }
                        other => rest.push(other.clone()),
                    }
                }
            }
            let l = source_below(&j.left, catalog)?;
            let r = source_below(&j.right, catalog)?;
            // The columns of subqueries with select lists, on either side, by their
            // definitions.
            let renames: Vec<Rename> = l.renames.iter().chain(&r.renames).cloned().collect();
            let on = on
                .iter()
                .map(|(a, b)| {
                    Ok((
                        rename::substitute(a, &renames)?,
                        rename::substitute(b, &renames)?,
                    ))
                })
                .collect::<Result<Vec<_>, CoordinatorError>>()?;
            let rest = rest
                .iter()
                .map(|e| rename::substitute(e, &renames))
                .collect::<Result<Vec<_>, _>>()?;
            if !r.joins.is_empty() {
                return Err(refuse(format!(
                    "a join nested on the right of another is not supported: write the joins one after another, \
                     `FROM participants p JOIN diagnoses d USING (pid) JOIN labs l USING (pid)`; {JOIN_HINT}"
                )));
            }
            if l.joins.len() >= fedq_common::wire::MAX_JOINS {
                return Err(refuse(format!(
                    "a query joins at most {} tables: test the other tables' participants with a subquery instead \
                     (`WHERE pid IN (SELECT pid FROM diagnoses WHERE code = 'E11')`)",
                    fedq_common::wire::MAX_JOINS + 1
                )));
            }
            let mut filters = l.filters;
            let mut join_on = Vec::new();
            match kind {
                fedq_common::JoinKind::Inner => {
                    filters.extend(r.filters);
                    filters.extend(rest);
                }
                // In a left join, conditions on the joined side choose the rows that pair
                // with each driving row; a driving row without such a partner stays.
                fedq_common::JoinKind::Left => {
                    if r.filters.iter().any(contains_subquery) {
                        return Err(refuse(
                            "subqueries are not supported on the joined side of a LEFT JOIN; test participants in WHERE",
                        ));
                    }
                    join_on.extend(r.filters);
                    join_on.extend(rest);
                }
            }
            let mut joins = l.joins;
            joins.push(JoinedScan {
                scan: r.left,
                on,
                kind,
                join_on,
            });
            Ok(Source {
                left: l.left,
                joins,
                filters,
                renames,
            })
        }
        LogicalPlan::Aggregate(_) => Err(refuse(
            "a derived table must be grouped by the participant alone and named, e.g. \
             `FROM (SELECT pid, MIN(diagnosed_on) AS first_on FROM diagnoses WHERE code = 'I21' GROUP BY pid) f`: \
             an aggregate over several participants' rows below the DP aggregate would mix participants",
        )),
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => Err(refuse(
            "the query reads no catalog table; name a table in FROM",
        )),
        other => Err(refuse(format!(
            "unsupported construct below the aggregate ({}); use WHERE on one table or on tables joined on the privacy unit",
            other.display()
        ))),
    }
}

/// The wire joins of `src`'s tables, from their equality conditions.
fn join_specs(
    scope: &Scope<'_>,
    src: &Source,
    filters: &mut Vec<Expr>,
) -> Result<Vec<JoinSpec>, CoordinatorError> {
    (0..src.joins.len())
        .map(|k| join_spec(scope, src, k, filters))
        .collect()
}

/// The wire join of joined table `k` from its equality conditions. One condition must pair
/// its privacy unit with the driving table's, or with that of a table inner-joined before
/// it (equal to the driving one's on every row the join keeps); other equalities of
/// columns only narrow the pairs of one participant's rows, so they become filters (or,
/// in a left join, further `ON` conditions).
fn join_spec(
    scope: &Scope<'_>,
    src: &Source,
    k: usize,
    filters: &mut Vec<Expr>,
) -> Result<JoinSpec, CoordinatorError> {
    let joined = &src.joins[k];
    let side = Side::joined(k);
    let Some(right) = scope.relation(side) else {
        return Err(CoordinatorError::internal("-", "join without its table"));
    };
    let mut join_on = joined.join_on.clone();
    let left = scope.left;
    let off_unit = |what: String| {
        refuse(format!(
            "joins must be on the privacy unit: `{}.{}` = `{}.{}` pairs only rows of the same participant, so R can bound each participant's joined rows. \
             {what} could pair one participant's rows with another's; write `JOIN {} USING ({})` or `ON {}.{} = {}.{}`",
            left.table,
            left.spec.privacy_unit,
            right.table,
            right.spec.privacy_unit,
            right.table,
            left.spec.privacy_unit,
            left.qualifier,
            left.spec.privacy_unit,
            right.qualifier,
            right.spec.privacy_unit
        ))
    };
    // The sides whose participant column equals the driving table's on every joined row.
    let unit_side = |s: Side| match s.join_index() {
        None => true,
        Some(i) => i < k && src.joins[i].kind == fedq_common::JoinKind::Inner,
    };
    let is_unit = |s: Side, c: &datafusion::common::Column| {
        scope
            .relation(s)
            .is_some_and(|r| r.spec.privacy_unit == c.name)
    };
    let mut on_unit = false;
    for (a, b) in &joined.on {
        let (Expr::Column(ca), Expr::Column(cb)) = (strip_alias(a), strip_alias(b)) else {
            return Err(off_unit(format!("Joining on `{a} = {b}`")));
        };
        let (sa, _) = scope.resolve(ca)?;
        let (sb, _) = scope.resolve(cb)?;
        let pairs_units = is_unit(sa, ca)
            && is_unit(sb, cb)
            && ((sa == side && unit_side(sb)) || (sb == side && unit_side(sa)));
        if pairs_units {
            on_unit = true;
        } else {
            match joined.kind {
                fedq_common::JoinKind::Inner => filters.push(a.clone().eq(b.clone())),
                fedq_common::JoinKind::Left => join_on.push(a.clone().eq(b.clone())),
            }
        }
    }
    if !on_unit {
        let shown: Vec<String> = joined
            .on
            .iter()
            .map(|(a, b)| format!("{a} = {b}"))
            .collect();
        return Err(off_unit(format!("Joining on `{}`", shown.join(" AND "))));
    }
    Ok(JoinSpec {
        table: right.table.to_string(),
        left_on: left.spec.privacy_unit.clone(),
        right_on: right.spec.privacy_unit.clone(),
        kind: joined.kind,
        derived: joined.scan.derived.clone(),
        on: join_on
            .iter()
            .map(|e| to_predicate(e, scope))
            .reduce(|a, b| {
                Ok(fedq_common::Predicate::Binary {
                    op: fedq_common::BinaryOp::And,
                    left: Box::new(a?),
                    right: Box::new(b?),
                })
            })
            .transpose()?,
    })
}

/// Collects node partials and statistics, sharing identical ones.
#[derive(Default)]
struct StatBuilder {
    partials: Vec<AggregateRequest>,
    statistics: Vec<Statistic>,
    /// R of the table.
    r: u32,
    /// S of the federation.
    s: u32,
    /// Number of groups (product of the key domains; 1 without GROUP BY).
    n_groups: u128,
    /// Whether SUMs need a count for small-cell suppression.
    suppression: bool,
    /// Index of the output being planned.
    output: usize,
    /// Expressions its aggregates read, as the request's computed columns.
    computed: Vec<fedq_common::computed::Computed>,
}

/// What an aggregate reads: a catalog column, or a computed column of the request.
struct AggregateInput {
    /// The wire reference.
    column: ColumnRef,
    /// Its declaration (the catalog's, or derived by interval arithmetic).
    spec: fedq_common::ColumnSpec,
    /// How the query names it, in labels and messages.
    shown: String,
    /// Where its bounds come from, for messages: "column labs.value", "the expression …".
    origin: String,
    /// What to declare when it has no bounds.
    fix: String,
    /// Whether it is the privacy unit.
    is_unit: bool,
}

/// Aggregates answered as private quantiles (DataFusion's names; `quantile_cont` is
/// `percentile_cont`'s alias, `approx_median` is `approx_percentile_cont(0.5)`).
const QUANTILE_FUNCTIONS: &[&str] = &[
    "median",
    "approx_median",
    "percentile_cont",
    "quantile_cont",
    "approx_percentile_cont",
];

/// The percentile argument of a quantile aggregate: a numeric literal, possibly negated.
fn percentile_literal(e: &Expr) -> Option<f64> {
    match strip_alias(e) {
        Expr::Literal(v, _) => match v {
            ScalarValue::Float64(Some(x)) => Some(*x),
            ScalarValue::Float32(Some(x)) => Some(f64::from(*x)),
            ScalarValue::Int64(Some(x)) => Some(*x as f64),
            ScalarValue::Int32(Some(x)) => Some(f64::from(*x)),
            ScalarValue::Decimal128(Some(x), _, scale) => {
                Some(*x as f64 / 10f64.powi(i32::from(*scale)))
            }
            _ => None,
        },
        Expr::Negative(inner) => percentile_literal(inner).map(|x| -x),
        Expr::Cast(c) => percentile_literal(&c.expr),
        Expr::TryCast(c) => percentile_literal(&c.expr),
        _ => None,
    }
}

/// Name of an aggregate function as researchers write it.
fn sql_name(name: &str) -> String {
    match name {
        "var" => "VAR_SAMP".into(),
        "stddev" => "STDDEV_SAMP".into(),
        other => other.to_uppercase(),
    }
}

impl StatBuilder {
    fn rs(&self) -> u128 {
        u128::from(self.r) * u128::from(self.s)
    }

    fn partial(&mut self, p: AggregateRequest) -> usize {
        if let Some(i) = self.partials.iter().position(|q| *q == p) {
            return i;
        }
        self.partials.push(p);
        self.partials.len() - 1
    }

    /// The statistic `kind` (shared if already present), used by the current output with
    /// allocation weight `cost`. `per_unit` is one participant's largest contribution per
    /// row in integer units, `per_unit_text` how it follows from the bounds.
    fn stat(
        &mut self,
        kind: StatisticKind,
        per_unit: u128,
        per_unit_text: &str,
        unit: f64,
        label: String,
        cost: f64,
    ) -> Result<usize, CoordinatorError> {
        let i = match self.statistics.iter().position(|s| s.kind == kind) {
            Some(i) => i,
            None => {
                let sensitivity = self.rs().checked_mul(per_unit).ok_or_else(|| {
                    refuse(format!(
                        "{label}: the sensitivity R·S·{per_unit_text} overflows; the declared bounds are too wide for their precision"
                    ))
                })?;
                let formula = if per_unit_text.is_empty() {
                    format!("R·S = {}·{}", self.r, self.s)
                } else {
                    format!("R·S·{per_unit_text} = {}·{}·{per_unit}", self.r, self.s)
                };
                self.statistics.push(Statistic {
                    kind,
                    sensitivity,
                    epsilon: RBig::ZERO,
                    label,
                    formula,
                    unit,
                    cost: 0.0,
                    used_by: Vec::new(),
                });
                self.statistics.len() - 1
            }
        };
        let st = &mut self.statistics[i];
        st.cost += cost;
        if !st.used_by.contains(&self.output) {
            st.used_by.push(self.output);
        }
        Ok(i)
    }

    /// `COUNT(DISTINCT privacy_unit)`: after bounding, one participant has rows in at most
    /// `min(R, groups)` groups at each of at most S sites, adding 1 to each.
    /// An aggregate over a set of participants ([`crate::cohort::set_source`]): only counts,
    /// each the number of participants in the set.
    fn set_count(&mut self, e: &Expr) -> Result<AggregateOutput, CoordinatorError> {
        let Expr::AggregateFunction(f) = e else {
            return Err(refuse(format!("unsupported aggregate expression `{e}`")));
        };
        if !f.func.name().eq_ignore_ascii_case("count") || f.params.filter.is_some() {
            return Err(refuse(format!(
                "a set of participants can only be counted (COUNT(*)), not `{e}`: to aggregate values, \
                 read their table with the set as a filter, e.g. `SELECT AVG(value) FROM labs WHERE pid IN (<the set>)`"
            )));
        }
        let stat = self.units_stat("COUNT(*) of the participant set".into())?;
        Ok(AggregateOutput::Count { stat })
    }

    fn units_stat(&mut self, label: String) -> Result<usize, CoordinatorError> {
        let partial = self.partial(AggregateRequest::CountUnits);
        let kind = StatisticKind::Count { partial };
        let i = match self.statistics.iter().position(|s| s.kind == kind) {
            Some(i) => i,
            None => {
                let per_site = u128::from(self.r).min(self.n_groups.max(1));
                self.statistics.push(Statistic {
                    kind,
                    sensitivity: per_site * u128::from(self.s),
                    epsilon: RBig::ZERO,
                    label,
                    formula: format!(
                        "min(R, groups)·S = min({}, {})·{}",
                        self.r,
                        self.n_groups.max(1),
                        self.s
                    ),
                    unit: 1.0,
                    cost: 0.0,
                    used_by: Vec::new(),
                });
                self.statistics.len() - 1
            }
        };
        let st = &mut self.statistics[i];
        st.cost += 1.0;
        if !st.used_by.contains(&self.output) {
            st.used_by.push(self.output);
        }
        Ok(i)
    }

    fn count_stat(
        &mut self,
        partial: AggregateRequest,
        label: String,
        cost: f64,
    ) -> Result<usize, CoordinatorError> {
        let partial = self.partial(partial);
        self.stat(StatisticKind::Count { partial }, 1, "", 1.0, label, cost)
    }

    /// `MEDIAN(x)`, `PERCENTILE_CONT(α) WITHIN GROUP (ORDER BY x)`,
    /// `APPROX_PERCENTILE_CONT(x, α)` (DataFusion passes the WITHIN GROUP column as the first
    /// argument): the nodes' histogram of x over a public grid of candidates within x's
    /// bounds, and one exponential-mechanism selection per group (see [`crate::quantile`]).
    fn quantile(
        &mut self,
        name: &str,
        p: &datafusion::logical_expr::expr::AggregateFunctionParams,
        scope: &Scope<'_>,
    ) -> Result<AggregateOutput, CoordinatorError> {
        let shown_fn = name.to_uppercase();
        if p.filter.is_some() {
            return Err(refuse(
                "aggregate FILTER (WHERE ...) is not supported; put the condition in WHERE",
            ));
        }
        let usage = "write MEDIAN(col), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY col) or \
                     APPROX_PERCENTILE_CONT(col, 0.9)";
        let (arg, mut alpha) = match (name, p.args.as_slice()) {
            ("median" | "approx_median", [x]) => (strip_alias(x), 0.5),
            ("median" | "approx_median", _) => {
                return Err(CoordinatorError::InvalidSql(format!(
                    "{shown_fn}() takes exactly one argument; {usage}"
                )))
            }
            (_, [x, q]) => {
                let Some(a) = percentile_literal(q) else {
                    return Err(refuse(format!(
                        "{shown_fn}: the percentile must be a literal number between 0 and 1 (e.g. 0.9), \
                         not `{q}`: the candidates and the noise are fixed before any data is read; {usage}"
                    )));
                };
                (strip_alias(x), a)
            }
            (_, [_, _, c]) => {
                return Err(refuse(format!(
                    "{shown_fn}: the number of t-digest centroids (`{c}`) does not apply: fedq computes \
                     percentiles with the exponential mechanism over a public grid; drop the third argument"
                )))
            }
            _ => {
                return Err(CoordinatorError::InvalidSql(format!(
                    "{shown_fn} needs a column and a percentile; {usage}"
                )))
            }
        };
        if !(0.0..=1.0).contains(&alpha) {
            return Err(refuse(format!(
                "{shown_fn}: percentile {alpha} is outside [0, 1]; use e.g. 0.5 for the median or 0.95 \
                 for the 95th percentile"
            )));
        }
        match p.order_by.as_slice() {
            [] => {}
            [sort] if !sort.asc => alpha = 1.0 - alpha,
            [_] => {}
            _ => {
                return Err(refuse(format!(
                    "{shown_fn}: order by exactly one column; {usage}"
                )))
            }
        }
        // A column, or an expression as a computed column with its interval bounds.
        let input = match arg {
            Expr::Column(c) => self.column_input(c, scope)?,
            other => self.computed_input(other, false, None, scope)?,
        };
        let shown = input.shown.clone();
        if input.is_unit {
            return Err(refuse(format!(
                "`{shown}` is the privacy unit and cannot be aggregated"
            )));
        }
        if !input.spec.ty.is_numeric() {
            return Err(CoordinatorError::InvalidSql(format!(
                "{shown_fn}({shown}): {} is {}, not a number",
                input.origin, input.spec.ty
            )));
        }
        let Some(bounds) = input.spec.bounds() else {
            return Err(refuse(format!(
                "{shown_fn}({shown}): {} has no declared bounds, so there is no public range to \
                 take candidates from. {}",
                input.origin, input.fix
            )));
        };
        let prec = bounds.precision;
        // Every group's histogram must fit the nodes' cell limit, so many groups get a
        // coarser grid: at most 1024 candidates, at most one per fixed-point step.
        let per_group = MAX_HISTOGRAM_CELLS / self.n_groups.max(1) as usize;
        let max_k = per_group.div_ceil(2).min(MAX_QUANTILE_CANDIDATES as usize) as u32;
        let k = QuantileGrid::default_candidates(bounds.lower, bounds.upper, prec, max_k);
        let grid = QuantileGrid::for_bounds(bounds.lower, bounds.upper, prec, k).map_err(|e| {
            refuse(format!(
                "{shown_fn}({shown}): no grid of candidates fits the bounds [{}, {}] at precision {prec} \
                 with {} group(s) ({e}); group by fewer keys",
                bounds.lower, bounds.upper, self.n_groups
            ))
        })?;
        let Some((alpha_num, alpha_den)) = crate::quantile::alpha_fraction(alpha) else {
            return Err(refuse(format!(
                "{shown_fn}: percentile {alpha} is outside [0, 1]"
            )));
        };
        let partial = self.partial(AggregateRequest::QuantileHistogram {
            column: input.column,
            lower: bounds.lower,
            upper: bounds.upper,
            precision: prec,
            candidates: k,
        });
        let step = crate::quantile::score_step(alpha_num, alpha_den);
        let label = format!(
            "quantile {alpha} of {shown} over {k} candidates in [{}, {}] (score units)",
            grid.candidate(0) as f64 * prec,
            grid.candidate(grid.len() - 1) as f64 * prec
        );
        let stat = self.stat(
            StatisticKind::Quantile {
                partial,
                alpha_num,
                alpha_den,
            },
            u128::from(step),
            &format!("max(α_num, α_den − α_num) with α = {alpha_num}/{alpha_den}"),
            1.0,
            label,
            1.0,
        )?;
        Ok(AggregateOutput::Quantile {
            stat,
            bounds,
            grid,
            alpha,
        })
    }

    /// A catalog column as an aggregate's input: its own table gives its bounds; R is the
    /// driving table's (see `plan`).
    fn column_input(
        &self,
        c: &datafusion::common::Column,
        scope: &Scope<'_>,
    ) -> Result<AggregateInput, CoordinatorError> {
        let (column, rel) = scope.column_ref(c)?;
        let spec = rel.spec.column(&c.name).cloned().ok_or_else(|| {
            CoordinatorError::InvalidSql(format!(
                "column `{}` is not in table `{}`",
                c.name, rel.table
            ))
        })?;
        Ok(AggregateInput {
            shown: scope.label(&rel, &c.name),
            is_unit: c.name == rel.spec.privacy_unit,
            origin: format!("column {}.{}", rel.table, c.name),
            fix: "The privacy officer must declare `lower`, `upper` (and `precision` for non-integers) for it in the catalog".into(),
            column,
            spec,
        })
    }

    /// An expression, or an aggregate with `FILTER (WHERE f)`, as an aggregate's input: a
    /// computed column of the request ([`fedq_common::computed::Computed`]), with bounds
    /// by interval arithmetic over its columns' declared bounds. `FILTER (WHERE f)` reads
    /// `CASE WHEN f THEN x END` (`COUNT(*) FILTER` counts `CASE WHEN f THEN 1 END`).
    fn computed_input(
        &mut self,
        arg: &Expr,
        count_star: bool,
        filter: Option<&Expr>,
        scope: &Scope<'_>,
    ) -> Result<AggregateInput, CoordinatorError> {
        let mut value = if count_star {
            fedq_common::Predicate::Literal {
                value: fedq_common::Literal::Int64(1),
            }
        } else {
            crate::predicate::to_value(arg, scope)?
        };
        let mut shown = if count_star {
            "1".to_string()
        } else {
            arg.human_display().to_string()
        };
        if let Some(f) = filter {
            value = fedq_common::Predicate::Case {
                branches: vec![fedq_common::wire::ValueBranch {
                    when: to_predicate(f, scope)?,
                    then: value,
                }],
                otherwise: None,
            };
            shown = format!("CASE WHEN {} THEN {shown} END", f.human_display());
        }
        let name = match self.computed.iter().position(|c| c.value == value) {
            Some(i) => self.computed[i].name.clone(),
            None => {
                let name = format!("fedq_expr_{}", self.computed.len() + 1);
                self.computed.push(fedq_common::computed::Computed {
                    name: name.clone(),
                    value,
                });
                name
            }
        };
        let lookup = |side: Side, n: &str| scope.relation(side).and_then(|r| r.spec.column(n));
        let Some(computed) = self.computed.iter().find(|c| c.name == name) else {
            return Err(CoordinatorError::internal("-", "computed column lost"));
        };
        let spec = computed
            .spec(&lookup)
            .map_err(|e| refuse(format!("`{shown}`: {}", e.0)))?;
        Ok(AggregateInput {
            column: ColumnRef::left(name),
            spec,
            origin: format!("the expression `{shown}`"),
            fix: "Every column it sums needs declared `lower` and `upper` bounds (a date needs `earliest` and `latest` for its year or a difference of days)".into(),
            shown,
            is_unit: false,
        })
    }

    fn aggregate(
        &mut self,
        e: &Expr,
        scope: &Scope<'_>,
    ) -> Result<AggregateOutput, CoordinatorError> {
        let Expr::AggregateFunction(f) = e else {
            return Err(refuse(format!("unsupported aggregate expression `{e}`")));
        };
        let name = f.func.name().to_ascii_lowercase();
        let p = &f.params;
        if p.distinct {
            // The privacy unit of either side: an inner join on it pairs only rows of the
            // same participant, whose rows the node bounds by the driving table's unit.
            let unit_name = scope.left.spec.privacy_unit.as_str();
            let unit = match p.args.as_slice() {
                [a] => match strip_alias(a) {
                    Expr::Column(c) => scope
                        .resolve(c)
                        .map(|(_, rel)| c.name == rel.spec.privacy_unit)
                        .unwrap_or(false),
                    _ => false,
                },
                _ => false,
            };
            if name != "count" || !unit {
                return Err(refuse(format!(
                    "{}(DISTINCT ...) is supported only as COUNT(DISTINCT {unit_name}), the number of \
                     distinct participants; distinct values of other columns can be single \
                     participants' values. Use COUNT(*) or COUNT(col) instead",
                    sql_name(&name),
                )));
            }
            if p.filter.is_some() {
                return Err(refuse(
                    "aggregate FILTER (WHERE ...) is not supported; put the condition in WHERE",
                ));
            }
            let stat = self.units_stat(format!("COUNT(DISTINCT {unit_name})"))?;
            return Ok(AggregateOutput::Count { stat });
        }
        if QUANTILE_FUNCTIONS.contains(&name.as_str()) {
            if p.filter.is_some() {
                return Err(refuse(
                    "FILTER (WHERE ...) on a percentile is not supported; put the condition in WHERE",
                ));
            }
            return self.quantile(&name, p, scope);
        }
        if !p.order_by.is_empty() {
            return Err(refuse("ordered aggregates are not supported"));
        }
        match name.as_str() {
            "count" | "sum" | "avg" | "mean" | "var" | "var_pop" | "stddev" | "stddev_pop" => {}
            "min" | "max" => {
                return Err(refuse(format!(
                    "{}() reveals one participant's value and has no useful private version; \
                     use a private percentile instead: MEDIAN(col), APPROX_PERCENTILE_CONT(col, 0.95) \
                     or PERCENTILE_CONT(0.95) WITHIN GROUP (ORDER BY col) (0.05 for a low end), or AVG/STDDEV",
                    name.to_uppercase()
                )))
            }
            other => {
                return Err(refuse(format!(
                    "aggregate {}() is not supported; use COUNT(*), COUNT(col), SUM(col), AVG(col), \
                     VAR_SAMP/VAR_POP(col), STDDEV_SAMP/STDDEV_POP(col), MEDIAN(col) or \
                     PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY col)",
                    other.to_uppercase()
                )))
            }
        }
        let arg = match p.args.as_slice() {
            [a] => strip_alias(a),
            _ => {
                return Err(CoordinatorError::InvalidSql(format!(
                    "{}() takes exactly one argument",
                    sql_name(&name)
                )))
            }
        };
        let count_star = name == "count" && matches!(arg, Expr::Literal(..));
        if count_star {
            if let Expr::Literal(v, _) = arg {
                if v.is_null() {
                    return Err(CoordinatorError::InvalidSql(
                        "COUNT(NULL) is always 0; use COUNT(*)".into(),
                    ));
                }
            }
            if p.filter.is_none() {
                let stat = self.count_stat(AggregateRequest::CountRows, "COUNT(*)".into(), 1.0)?;
                return Ok(AggregateOutput::Count { stat });
            }
        }
        let input = match (arg, p.filter.as_deref()) {
            (Expr::Column(c), None) => self.column_input(c, scope)?,
            (_, filter) => self.computed_input(arg, count_star, filter, scope)?,
        };
        let (cref, col, shown) = (input.column, &input.spec, input.shown);
        let count_nn = AggregateRequest::CountNonNull {
            column: cref.clone(),
        };
        let count_label = format!("COUNT({shown})");
        if name == "count" {
            let stat = self.count_stat(count_nn, count_label, 1.0)?;
            return Ok(AggregateOutput::Count { stat });
        }
        if input.is_unit {
            return Err(refuse(format!(
                "`{shown}` is the privacy unit and cannot be aggregated"
            )));
        }
        let Some(bounds) = col.bounds() else {
            return Err(refuse(format!(
                "{}({shown}): {} has no declared bounds, so its sensitivity is unbounded. {}",
                sql_name(&name),
                input.origin,
                input.fix
            )));
        };
        let prec = bounds.precision;
        let lo_fp = (bounds.lower / prec).ceil() as i128;
        let hi_fp = (bounds.upper / prec).floor() as i128;
        let sum_partial = self.partial(AggregateRequest::SumFixed {
            column: cref.clone(),
            lower: bounds.lower,
            upper: bounds.upper,
            precision: prec,
        });
        if name == "sum" {
            let m = lo_fp.unsigned_abs().max(hi_fp.unsigned_abs());
            let (w_sum, w_count) = if self.suppression {
                AVG_WEIGHTS
            } else {
                (1.0, 0.0)
            };
            let stat = self.stat(
                StatisticKind::Sum {
                    partial: sum_partial,
                    precision: prec,
                },
                m,
                "max(|lower|, |upper|)/precision",
                prec,
                format!("SUM({shown}) in units of {prec}"),
                w_sum,
            )?;
            let count_stat = if self.suppression {
                Some(self.count_stat(count_nn, count_label, w_count)?)
            } else {
                None
            };
            return Ok(AggregateOutput::Sum {
                stat,
                bounds,
                count_stat,
            });
        }
        // AVG, VAR, STDDEV: a centred sum and the count of non-null values.
        let count_partial = self.partial(count_nn.clone());
        let mid_fp = fedq_common::wire::fixed_midpoint(bounds.lower, bounds.upper, prec);
        let half = (hi_fp - mid_fp)
            .unsigned_abs()
            .max((mid_fp - lo_fp).unsigned_abs());
        let is_avg = name == "avg" || name == "mean";
        let (w_sq, w_sum, w_count) = if is_avg {
            (0.0, AVG_WEIGHTS.0, AVG_WEIGHTS.1)
        } else {
            VAR_WEIGHTS
        };
        let count_stat = self.count_stat(count_nn, count_label, w_count)?;
        let sum_stat = self.stat(
            StatisticKind::CentredSum {
                sum: sum_partial,
                count: count_partial,
                mid_fp,
                precision: prec,
            },
            half,
            "half-width/precision",
            prec,
            format!("SUM({shown} - {}) in units of {prec}", mid_fp as f64 * prec),
            w_sum,
        )?;
        if is_avg {
            return Ok(AggregateOutput::Avg {
                sum_stat,
                count_stat,
                bounds,
                mid_fp,
            });
        }
        let steps = bounds.lower.abs().max(bounds.upper.abs()) / prec;
        if steps > fedq_common::wire::MAX_SQUARES_STEPS {
            return Err(refuse(format!(
                "{}({shown}): the bounds of {} span {steps:e} steps of its precision {prec}; \
                 sums of squares allow at most {:e}. Ask the privacy officer for a coarser precision",
                sql_name(&name),
                input.origin,
                fedq_common::wire::MAX_SQUARES_STEPS
            )));
        }
        let sq_partial = self.partial(AggregateRequest::SumSquaresFixed {
            column: cref.clone(),
            lower: bounds.lower,
            upper: bounds.upper,
            precision: prec,
        });
        let sq_stat = self.stat(
            StatisticKind::SumSquares {
                partial: sq_partial,
                precision: prec,
            },
            half * half,
            "(half-width/precision)²",
            prec * prec,
            format!(
                "SUM(({shown} - {})²) in units of {}",
                mid_fp as f64 * prec,
                prec * prec
            ),
            w_sq,
        )?;
        Ok(AggregateOutput::Variance {
            count_stat,
            sum_stat,
            sq_stat,
            bounds,
            half_fp: half as i128,
            sample: name == "var" || name == "stddev",
            sqrt: name.starts_with("stddev"),
        })
    }
}

/// The literals a WHERE condition restricts `key` to, if it does: `key = lit`,
/// `key IN (lit, …)` (not negated), an OR of those on the same key, or an AND with one of
/// them on either side. Casts around the column are looked through.
fn literal_set(f: &Expr, key: &ColumnRef, scope: &Scope) -> Option<Vec<ScalarValue>> {
    fn is_key(e: &Expr, key: &ColumnRef, scope: &Scope) -> bool {
        match e {
            Expr::Column(c) => scope.column_ref(c).is_ok_and(|(r, _)| &r == key),
            Expr::Cast(c) => is_key(&c.expr, key, scope),
            Expr::TryCast(c) => is_key(&c.expr, key, scope),
            _ => false,
        }
    }
    fn literal(e: &Expr) -> Option<ScalarValue> {
        match e {
            Expr::Literal(v, _) => Some(v.clone()),
            Expr::Cast(c) => literal(&c.expr),
            _ => None,
        }
    }
    use datafusion::logical_expr::{BinaryExpr, Operator};
    match f {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            if is_key(left, key, scope) {
                literal(right).map(|v| vec![v])
            } else if is_key(right, key, scope) {
                literal(left).map(|v| vec![v])
            } else {
                None
            }
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let mut l = literal_set(left, key, scope)?;
            l.extend(literal_set(right, key, scope)?);
            Some(l)
        }
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => match (
            literal_set(left, key, scope),
            literal_set(right, key, scope),
        ) {
            (Some(a), Some(b)) => Some(a.into_iter().filter(|x| b.contains(x)).collect()),
            (a, b) => a.or(b),
        },
        Expr::InList(il) if !il.negated && is_key(&il.expr, key, scope) => {
            il.list.iter().map(literal).collect()
        }
        _ => None,
    }
}

/// The literals of a `WHERE` list as the values of a column of type `ty`, deduplicated
/// and without NULL (a NULL key is in no group); `None` if one is not such a value, or if
/// there are none or more than `MAX_DERIVED_DOMAIN`.
fn listed_values(set: &[ScalarValue], ty: ColumnType) -> Option<Vec<PublicValue>> {
    let mut out: Vec<PublicValue> = Vec::new();
    for s in set.iter().filter(|s| !s.is_null()) {
        let v = match (s, ty) {
            (
                ScalarValue::Utf8(Some(t))
                | ScalarValue::Utf8View(Some(t))
                | ScalarValue::LargeUtf8(Some(t)),
                ColumnType::Utf8,
            ) => PublicValue::Text(t.clone()),
            (ScalarValue::Boolean(Some(b)), ColumnType::Boolean) => PublicValue::Bool(*b),
            (s, ColumnType::Int32 | ColumnType::Int64) => {
                match crate::predicate::literal(s).ok()? {
                    Literal::Int64(i) if ty == ColumnType::Int64 || i32::try_from(i).is_ok() => {
                        PublicValue::Int(i)
                    }
                    _ => return None,
                }
            }
            _ => return None,
        };
        if !out.contains(&v) {
            out.push(v);
        }
    }
    (!out.is_empty() && out.len() <= fedq_common::group_key::MAX_DERIVED_DOMAIN).then_some(out)
}

/// Whether public value `v` equals literal `s` (text, integer or boolean).
fn public_matches(v: &PublicValue, s: &ScalarValue) -> bool {
    match (v, s) {
        (
            PublicValue::Text(t),
            ScalarValue::Utf8(Some(x))
            | ScalarValue::Utf8View(Some(x))
            | ScalarValue::LargeUtf8(Some(x)),
        ) => t == x,
        (PublicValue::Int(i), s) => match s {
            ScalarValue::Int8(Some(x)) => *i == i64::from(*x),
            ScalarValue::Int16(Some(x)) => *i == i64::from(*x),
            ScalarValue::Int32(Some(x)) => *i == i64::from(*x),
            ScalarValue::Int64(Some(x)) => i == x,
            ScalarValue::UInt8(Some(x)) => *i == i64::from(*x),
            ScalarValue::UInt16(Some(x)) => *i == i64::from(*x),
            ScalarValue::UInt32(Some(x)) => *i == i64::from(*x),
            ScalarValue::UInt64(Some(x)) => i64::try_from(*x).is_ok_and(|x| x == *i),
            _ => false,
        },
        (PublicValue::Bool(b), ScalarValue::Boolean(Some(x))) => b == x,
        _ => false,
    }
}

/// The value of a public domain entry as a DataFusion scalar of `ty`.
pub fn public_scalar(v: &PublicValue, ty: &DataType) -> ScalarValue {
    match (v, ty) {
        (PublicValue::Text(s), _) => ScalarValue::Utf8(Some(s.clone())),
        (PublicValue::Int(i), DataType::Int32) => ScalarValue::Int32(i32::try_from(*i).ok()),
        // A `date_trunc` key: days since 1970-01-01, cast to the plan's date or timestamp.
        (PublicValue::Int(i), DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)) => {
            ScalarValue::Date32(i32::try_from(*i).ok())
        }
        (PublicValue::Int(i), _) => ScalarValue::Int64(Some(*i)),
        (PublicValue::Bool(b), _) => ScalarValue::Boolean(Some(*b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_common::{BinaryOp, Predicate};

    const CATALOG: &str = r#"
max_sites_per_unit = 2
[tables.labs]
max_rows_per_unit = 20
columns = [
  { name = "pid", type = "utf8" },
  { name = "test", type = "utf8", public_values = ["HbA1c", "glucose", "LDL", "creatinine"] },
  { name = "value", type = "float64", nullable = true, lower = 0.0, upper = 500.0, precision = 0.01 },
  { name = "measured_on", type = "date32" },
  { name = "raw", type = "float64", nullable = true },
]
[tables.participants]
max_rows_per_unit = 1
columns = [
  { name = "pid", type = "utf8" },
  { name = "sex", type = "utf8", public_values = ["F", "M"] },
  { name = "birth_year", type = "int32", lower = 1900, upper = 2030 },
]
[tables.instruments]
max_rows_per_unit = 1
columns = [
  { name = "pid", type = "utf8" },
  { name = "fine", type = "float64", nullable = true, lower = 0.0, upper = 1000000.0, precision = 0.0000001 },
]
[tables.diagnoses]
max_rows_per_unit = 15
columns = [
  { name = "pid", type = "utf8" },
  { name = "code", type = "utf8" },
]
"#;

    fn planner() -> Planner {
        Planner::new(&Catalog::from_toml(CATALOG, "test").unwrap()).unwrap()
    }

    async fn plan(sql: &str) -> Result<PlannedQuery, CoordinatorError> {
        planner().plan(sql, 1.0, "q").await
    }

    /// The nodes' limits are the planner's too (issue 15): a sum nested deeper than a node
    /// accepts is refused at plan time with the limit and the rewrite. A chain of ANDs or
    /// ORs is sent balanced, so 100 ORed conditions are planned (a tree 8 levels deep).
    #[tokio::test]
    async fn a_request_over_the_node_limits_is_refused_at_plan_time() {
        let sum = vec!["value"; 40].join(" + ");
        refused(
            &format!("SELECT COUNT(*) FROM labs WHERE {sum} > 1"),
            "filter is nested 41 levels deep; the limit is 32",
        )
        .await;
        let ors = (0..100)
            .map(|i| format!("value = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let q = plan(&format!("SELECT COUNT(*) FROM labs WHERE {ors}"))
            .await
            .unwrap();
        assert_eq!(q.request.filter.unwrap().depth(), 9);
    }

    /// Issue 15: a chain of a few thousand terms overflowed a worker's stack and aborted
    /// the coordinator. Every shape at the operator limit (an OR chain, a sum, NOTs, unary
    /// minuses, nested CASEs) is planned, or refused with a message, on a 2 MiB stack (a
    /// Tokio worker's) in this debug build; one operator more is refused before parsing.
    #[test]
    fn the_deepest_queries_within_the_sql_limits_plan_on_a_worker_stack() {
        use crate::sql_limits::MAX_SQL_OPERATORS as N;
        let or_chain = (0..N / 2 + 1)
            .map(|i| format!("value = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let sum = vec!["value"; N + 1].join(" + ");
        let shapes = [
            format!("SELECT COUNT(*) FROM labs WHERE {or_chain}"),
            format!("SELECT COUNT(*) FROM labs WHERE {sum} > 1"),
            format!("SELECT SUM({sum}) FROM labs"),
            format!(
                "SELECT COUNT(*) FROM labs WHERE {}value > 1",
                "NOT ".repeat(N)
            ),
            format!(
                "SELECT COUNT(*) FROM labs WHERE {}value > 1",
                "- ".repeat(N - 1)
            ),
            format!(
                "SELECT {}1{} AS x, COUNT(*) FROM labs GROUP BY 1",
                "CASE WHEN value > 1 THEN ".repeat(N / 3),
                " ELSE 0 END".repeat(N / 3)
            ),
        ];
        for sql in shapes {
            let sql2 = sql.clone();
            let outcome = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    rt.block_on(plan(&sql2)).map(|_| ())
                })
                .unwrap()
                .join()
                .expect("planning within the limits must not overflow the stack");
            // Within the limits: planned, or refused for its own reasons, never a crash.
            let over = format!("{sql} AND value > 2 AND value > 3 AND value > 4");
            let e = crate::sql_limits::check(&over);
            assert!(
                matches!(e, Err(CoordinatorError::Refused(ref m)) if m.contains("the limit is")),
                "{outcome:?} {e:?}"
            );
        }
    }

    async fn refused(sql: &str, needle: &str) {
        match plan(sql).await {
            Err(e @ CoordinatorError::Refused(_)) => {
                assert!(e.to_string().contains(needle), "{sql}: {e}")
            }
            other => panic!("{sql}: expected refusal containing {needle:?}, got {other:?}"),
        }
    }

    /// A WHERE that admits only some values of a public key narrows the released domain
    /// to them (in catalog order), and the sensitivity of a per-group statistic follows.
    #[tokio::test]
    async fn where_on_a_public_key_narrows_its_domain() {
        let domain = |q: &PlannedQuery| -> Vec<String> {
            q.groups[0].domain.iter().map(|v| v.to_string()).collect()
        };
        let all = ["HbA1c", "glucose", "LDL", "creatinine"];
        for (sql, want) in [
            (
                "SELECT test, COUNT(*) FROM labs WHERE test IN ('LDL', 'HbA1c') GROUP BY test",
                vec!["HbA1c", "LDL"],
            ),
            (
                "SELECT test, COUNT(*) FROM labs WHERE value > 1 AND (test = 'glucose' OR test = 'LDL') GROUP BY test",
                vec!["glucose", "LDL"],
            ),
            (
                "SELECT test, COUNT(*) FROM labs WHERE 'creatinine' = test GROUP BY test",
                vec!["creatinine"],
            ),
            // Not a restriction to listed values: the whole domain.
            (
                "SELECT test, COUNT(*) FROM labs WHERE test NOT IN ('LDL') GROUP BY test",
                all.to_vec(),
            ),
            (
                "SELECT test, COUNT(*) FROM labs WHERE test = 'LDL' OR value > 3 GROUP BY test",
                all.to_vec(),
            ),
            // Values outside the domain only: the whole domain (noise around zero).
            (
                "SELECT test, COUNT(*) FROM labs WHERE test = 'nope' GROUP BY test",
                all.to_vec(),
            ),
        ] {
            let q = plan(sql).await.unwrap();
            assert_eq!(domain(&q), want, "{sql}");
        }
    }

    async fn invalid(sql: &str, needle: &str) {
        match plan(sql).await {
            Err(e @ CoordinatorError::InvalidSql(_)) => {
                assert!(e.to_string().contains(needle), "{sql}: {e}")
            }
            other => panic!("{sql}: expected invalid SQL containing {needle:?}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn refuses_what_the_privacy_model_forbids() {
        refused("SELECT * FROM labs", "never rows").await;
        refused("SELECT value FROM labs WHERE value > 3", "never rows").await;
        refused("SELECT DISTINCT test FROM labs", "never rows").await;
        refused("SELECT test FROM labs GROUP BY test", "no aggregate").await;
        refused("SELECT SUM(raw) FROM labs", "no declared bounds").await;
        refused("SELECT AVG(raw) FROM labs", "no declared bounds").await;
        invalid("SELECT SUM(measured_on) FROM labs", "sum").await;
        refused(
            "SELECT code, COUNT(*) FROM diagnoses GROUP BY code",
            "public_values",
        )
        .await;
        refused(
            "SELECT pid, COUNT(*) FROM labs GROUP BY pid",
            "privacy unit",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs WHERE CAST(value AS INT) > 3",
            "TRY_CAST",
        )
        .await;
        refused("SELECT COUNT(*) FROM labs WHERE value / 0 > 1", "division").await;
        refused("SELECT COUNT(*) FROM labs WHERE 10 / value > 1", "division").await;
        refused("SELECT MAX(value) FROM labs", "percentile").await;
        refused("SELECT MIN(value) FROM labs", "percentile").await;
        refused("SELECT MIN(value) FROM labs", "MEDIAN(col)").await;
        refused("SELECT MAX(value) FROM labs", "APPROX_PERCENTILE_CONT").await;
        refused("SELECT VAR_SAMP(raw) FROM labs", "no declared bounds").await;
        refused("SELECT STDDEV(raw) FROM labs", "no declared bounds").await;
        refused(
            "SELECT MIN(value) FROM labs",
            "PERCENTILE_CONT(0.95) WITHIN GROUP",
        )
        .await;
        refused("SELECT MEDIAN(raw) FROM labs", "no declared bounds").await;
        // 10¹³ fixed-point steps: a sum is fine, squares could overflow.
        assert!(plan("SELECT SUM(fine) FROM instruments").await.is_ok());
        refused("SELECT VAR_POP(fine) FROM instruments", "coarser precision").await;
        refused(
            "SELECT COUNT(DISTINCT test) FROM labs",
            "COUNT(DISTINCT pid)",
        )
        .await;
        refused(
            "SELECT SUM(DISTINCT value) FROM labs",
            "COUNT(DISTINCT pid)",
        )
        .await;
        refused("SELECT COUNT(*) OVER () FROM labs", "window").await;
        refused(
            "SELECT COUNT(*) FROM labs WHERE value > (SELECT AVG(value) FROM labs)",
            "scalar subqueries are not supported",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs WHERE upper(test) = 'LDL'",
            "function",
        )
        .await;
        refused(
            "INSERT INTO labs VALUES ('a', 'LDL', 1.0, DATE '2020-01-01', 2.0)",
            "read-only",
        )
        .await;
        refused("DROP TABLE labs", "read-only").await;
    }

    #[tokio::test]
    async fn joins_on_the_privacy_unit_become_one_typed_join() {
        let q = plan(
            "SELECT p.sex, COUNT(*), AVG(l.value) FROM labs l JOIN participants p USING (pid) GROUP BY p.sex",
        )
        .await
        .unwrap();
        assert_eq!(q.tables(), vec!["labs", "participants"]);
        // A LEFT JOIN's further ON conditions decide the pairs, not the rows that count.
        let left = plan(
            "SELECT COUNT(*), COUNT(l.value) FROM participants p LEFT JOIN labs l ON l.pid = p.pid AND l.test = 'HbA1c'",
        )
        .await
        .unwrap();
        let j = left.request.joins[0].clone();
        assert_eq!(j.kind, fedq_common::JoinKind::Left);
        assert_eq!(
            j.on,
            Some(Predicate::Binary {
                op: BinaryOp::Eq,
                left: Box::new(Predicate::Column {
                    name: "test".into(),
                    side: Side::RIGHT
                }),
                right: Box::new(Predicate::Literal {
                    value: Literal::Utf8("HbA1c".into())
                }),
            })
        );
        assert_eq!(left.request.filter, None);
        assert_eq!(left.relation(), "participants LEFT JOIN labs");
        // A self-join: both sides are the same table, told apart by alias.
        let pairs = plan(
            "SELECT COUNT(*) FROM labs a JOIN labs b USING (pid) WHERE a.test = 'HbA1c' AND b.test = 'glucose'",
        )
        .await
        .unwrap();
        assert_eq!(pairs.tables(), vec!["labs", "labs"]);
        let f = pairs.request.filter.clone().unwrap();
        assert!(
            f.reads_side(Side::LEFT) && f.reads_side(Side::RIGHT),
            "{f:?}"
        );
        let r = &q.request;
        assert_eq!(r.table, "labs");
        assert_eq!(
            r.joins,
            vec![JoinSpec {
                table: "participants".into(),
                left_on: "pid".into(),
                right_on: "pid".into(),
                kind: Default::default(),
                on: None,
                derived: None,
            }]
        );
        assert_eq!(r.group_by, vec![ColumnRef::right("sex").into()]);
        assert!(r.aggregates.contains(&AggregateRequest::SumFixed {
            column: ColumnRef::left("value"),
            lower: 0.0,
            upper: 500.0,
            precision: 0.01,
        }));
        // R of the driving table (labs: 20) bounds the joined rows; S = 2; value bounds from
        // the column's own table.
        assert_eq!(r.max_rows_per_unit, 20);
        assert_eq!(q.max_rows_per_unit, 20);
        let sens: Vec<u128> = q.statistics.iter().map(|s| s.sensitivity).collect();
        assert_eq!(sens, vec![40, 40, 40 * 25_000]);
        assert!(
            q.statistics[2].label.contains("labs.value"),
            "{}",
            q.statistics[2].label
        );
        assert_eq!(q.groups[0].column, "participants.sex");

        // The other way round, with ON: participants drives (R = 1); the birth year's
        // half-width 65 comes from participants, the lab value's bounds from labs.
        let q = plan(
            "SELECT COUNT(*), AVG(l.value), SUM(birth_year) FROM participants p JOIN labs l ON p.pid = l.pid \
             AND l.test = 'LDL' WHERE p.birth_year > 1950 AND l.value IS NOT NULL",
        )
        .await
        .unwrap();
        assert_eq!(q.request.table, "participants");
        assert_eq!(q.request.max_rows_per_unit, 1);
        let sens: Vec<u128> = q.statistics.iter().map(|s| s.sensitivity).collect();
        assert_eq!(sens, vec![2, 2, 2 * 25_000, 2 * 2030]);
        assert!(q.request.aggregates.contains(&AggregateRequest::SumFixed {
            column: ColumnRef::right("value"),
            lower: 0.0,
            upper: 500.0,
            precision: 0.01,
        }));
        // Both WHERE and the extra ON condition become the filter, with sides.
        let json = serde_json::to_string(&q.request.filter).unwrap();
        for needle in [
            r#"{"expr":"column","name":"birth_year"}"#,
            r#"{"expr":"column","name":"test","side":1}"#,
            r#"{"expr":"column","name":"value","side":1}"#,
        ] {
            assert!(json.contains(needle), "{needle} not in {json}");
        }

        // diagnoses JOIN participants ON ...pid, unqualified columns resolved by table.
        let q = plan(
            "SELECT sex, COUNT(*) FROM diagnoses JOIN participants ON diagnoses.pid = participants.pid \
             WHERE code LIKE 'E11%' GROUP BY sex",
        )
        .await
        .unwrap();
        assert_eq!(q.request.max_rows_per_unit, 15);
        assert_eq!(q.request.group_by, vec![ColumnRef::right("sex").into()]);

        // A side may be a filtered subquery.
        let q = plan(
            "SELECT p.sex, COUNT(*) FROM (SELECT * FROM labs WHERE test = 'LDL') l \
             JOIN participants p USING (pid) GROUP BY p.sex",
        )
        .await
        .unwrap();
        let json = serde_json::to_string(&q.request.filter).unwrap();
        assert!(
            json.contains(r#"{"expr":"column","name":"test"}"#),
            "{json}"
        );
    }

    #[tokio::test]
    async fn joins_that_break_the_bound_are_refused() {
        let on_unit = "joins must be on the privacy unit";
        refused(
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.test = p.sex",
            on_unit,
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.test = p.sex",
            "USING (pid)",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs l JOIN participants p ON l.pid = l.pid",
            on_unit,
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs l RIGHT JOIN participants p USING (pid)",
            "LEFT JOIN with the tables swapped",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs l FULL OUTER JOIN participants p USING (pid)",
            "or a LEFT JOIN to keep every row",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM participants p LEFT JOIN labs l ON l.test = p.sex",
            on_unit,
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs CROSS JOIN participants",
            "cross joins",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs, participants WHERE labs.pid = participants.pid",
            "cross joins",
        )
        .await;
        refused(
            "SELECT COUNT(*) FROM labs l JOIN participants p USING (pid) JOIN diagnoses d ON d.pid = p.pid \
             JOIN labs m ON m.pid = l.pid JOIN diagnoses e ON e.pid = l.pid JOIN participants q ON q.pid = l.pid",
            "at most 5 tables",
        )
        .await;
        // An unbounded column from either side, named with its table.
        refused(
            "SELECT p.sex, SUM(l.raw) FROM participants p JOIN labs l USING (pid) GROUP BY p.sex",
            "labs.raw has no declared bounds",
        )
        .await;
        refused(
            "SELECT AVG(l.raw) FROM labs l JOIN participants p USING (pid)",
            "labs.raw has no declared bounds",
        )
        .await;
        refused(
            "SELECT d.code, COUNT(*) FROM labs l JOIN diagnoses d USING (pid) GROUP BY d.code",
            "public_values` for diagnoses.code",
        )
        .await;
        refused(
            "SELECT p.pid, COUNT(*) FROM labs l JOIN participants p USING (pid) GROUP BY p.pid",
            "privacy unit",
        )
        .await;
        refused(
            "SELECT * FROM labs l JOIN participants p USING (pid)",
            "never rows",
        )
        .await;
        invalid(
            "SELECT COUNT(*) FROM labs l JOIN participants p USING (pid) WHERE l.sex = 'F'",
            "sex",
        )
        .await;
    }

    #[tokio::test]
    async fn quantiles_plan_a_histogram_and_one_exponential_mechanism() {
        // labs.value in [0, 500] at 0.01: 50001 steps, so 1024 candidates; R = 20, S = 2.
        let q = plan(
            "SELECT test, MEDIAN(value) AS m, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY value) AS p90, \
             APPROX_PERCENTILE_CONT(value, 0.9) AS a90, COUNT(*) FROM labs WHERE value > 1 GROUP BY test",
        )
        .await
        .unwrap();
        let hist = AggregateRequest::QuantileHistogram {
            column: "value".into(),
            lower: 0.0,
            upper: 500.0,
            precision: 0.01,
            candidates: 1024,
        };
        // One histogram shared by all three percentiles, and the row count.
        assert_eq!(
            q.request.aggregates,
            vec![hist, AggregateRequest::CountRows]
        );
        let quantiles: Vec<&Statistic> = q
            .statistics
            .iter()
            .filter(|s| matches!(s.kind, StatisticKind::Quantile { .. }))
            .collect();
        // MEDIAN: α = 1/2, Δ = R·S·max(1, 1) = 40; p90 and a90 share α = 9000/10000:
        // Δ = 40·9000. The two 0.9 quantiles are one statistic (one selection, one ε).
        assert_eq!(quantiles.len(), 2);
        assert_eq!(
            quantiles[0].kind,
            StatisticKind::Quantile {
                partial: 0,
                alpha_num: 1,
                alpha_den: 2
            }
        );
        assert_eq!(quantiles[0].sensitivity, 40);
        assert_eq!(quantiles[1].sensitivity, 40 * 9000);
        assert_eq!(quantiles[1].used_by, vec![1, 2]);
        assert!(quantiles[1]
            .formula
            .contains("R·S·max(α_num, α_den − α_num)"));
        match &q.outputs[1] {
            AggregateOutput::Quantile { grid, alpha, .. } => {
                assert_eq!(grid.len(), 1024);
                assert_eq!(*alpha, 0.9);
            }
            other => panic!("{other:?}"),
        }
        // The shares, with the bounding report's twentieth, still sum to ε.
        assert_eq!(total(&q), RBig::ONE);

        // DESC turns the percentile around; integers get a grid on every step.
        let q = plan(
            "SELECT PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY birth_year DESC) FROM participants",
        )
        .await
        .unwrap();
        assert_eq!(
            q.request.aggregates,
            vec![AggregateRequest::QuantileHistogram {
                column: "birth_year".into(),
                lower: 1900.0,
                upper: 2030.0,
                precision: 1.0,
                candidates: 131,
            }]
        );
        assert!(matches!(q.outputs[0], AggregateOutput::Quantile { alpha, .. } if alpha == 0.75));
        // A join: the column's own bounds, the driving table's R.
        let q = plan("SELECT p.sex, MEDIAN(l.value) FROM labs l JOIN participants p USING (pid) GROUP BY p.sex")
            .await
            .unwrap();
        assert_eq!(q.statistics[0].sensitivity, 40);
        assert!(plan("SELECT APPROX_MEDIAN(birth_year) FROM participants")
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn quantile_refusals_say_what_to_write() {
        refused(
            "SELECT PERCENTILE_CONT(1.5) WITHIN GROUP (ORDER BY value) FROM labs",
            "outside [0, 1]",
        )
        .await;
        refused(
            "SELECT APPROX_PERCENTILE_CONT(value, -0.1) FROM labs",
            "outside [0, 1]",
        )
        .await;
        refused(
            "SELECT APPROX_PERCENTILE_CONT(value, value) FROM labs",
            "must be a literal number",
        )
        .await;
        refused(
            "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY raw) FROM labs",
            "no declared bounds",
        )
        .await;
        refused("SELECT MEDIAN(raw) FROM labs", "`lower`, `upper`").await;
        refused(
            "SELECT APPROX_PERCENTILE_CONT(value, 0.5, 100) FROM labs",
            "centroids",
        )
        .await;
        // An expression needs bounds from its columns, like a SUM of it.
        refused("SELECT MEDIAN(raw * 2) FROM labs", "no declared bounds").await;
        let q = plan("SELECT MEDIAN(value * 2) FROM labs").await.unwrap();
        assert!(matches!(
            q.request.aggregates[..],
            [AggregateRequest::QuantileHistogram {
                lower: 0.0,
                upper: 1000.0,
                ..
            }]
        ));
        // DataFusion itself refuses a text column.
        invalid("SELECT MEDIAN(pid) FROM labs", "median").await;
    }

    #[tokio::test]
    async fn unknown_names_are_invalid_sql() {
        invalid("SELECT COUNT(*) FROM labz", "labz").await;
        invalid("SELECT COUNT(*) FROM labs WHERE valu > 1", "valu").await;
        invalid("SELEC COUNT(*) FROM labs", "SELEC").await;
    }

    #[tokio::test]
    async fn sensitivities_follow_the_catalog() {
        let q = planner()
            .with_allocation(Allocation::Even)
            .plan(
                "SELECT test, COUNT(*), AVG(value) FROM labs GROUP BY test",
                1.0,
                "q",
            )
            .await
            .unwrap();
        // R = 20 rows per participant, S = 2 sites.
        assert_eq!(q.request.max_rows_per_unit, 20);
        assert_eq!(q.request.group_by, vec![ColumnRef::left("test").into()]);
        assert_eq!(q.statistics.len(), 3);
        assert_eq!(q.statistics[0].sensitivity, 40); // COUNT(*)
        assert_eq!(q.statistics[1].sensitivity, 40); // COUNT(value)
                                                     // Centred sum: [0, 500] in 0.01 units is [0, 50000], mid 25000, half-width 25000.
        assert_eq!(q.statistics[2].sensitivity, 40 * 25_000);
        // Even split of what the bounding report leaves: (1 − 1/20) / 3 each.
        for s in &q.statistics {
            assert_eq!(s.epsilon, RBig::from(19u8) / RBig::from(60u8));
        }

        let q = plan("SELECT SUM(value) FROM labs").await.unwrap();
        assert_eq!(q.statistics[0].sensitivity, 40 * 50_000);

        // A birth year in [1900, 2030] costs noise for a half-width of 65, not 2030.
        let q = plan("SELECT AVG(birth_year) FROM participants")
            .await
            .unwrap();
        let centred = q
            .statistics
            .iter()
            .find(|s| matches!(s.kind, StatisticKind::CentredSum { .. }))
            .unwrap();
        assert_eq!(centred.sensitivity, 2 * 65);
    }

    /// The bounding report takes 1/20 of ε with sensitivity S; the statistics share the
    /// rest, and everything sums to ε exactly.
    #[tokio::test]
    async fn bounding_report_takes_a_twentieth_of_epsilon() {
        let q = plan("SELECT test, COUNT(*), AVG(value) FROM labs GROUP BY test")
            .await
            .unwrap();
        assert_eq!(q.truncation.sensitivity, 2);
        assert_eq!(q.truncation.epsilon, RBig::ONE / RBig::from(20u8));
        let total = q
            .statistics
            .iter()
            .fold(q.truncation.epsilon.clone(), |a, s| a + s.epsilon.clone());
        assert_eq!(total, RBig::ONE);
    }

    #[tokio::test]
    async fn distinct_participants_cost_min_r_groups_per_site() {
        // No GROUP BY: each participant adds 1 at each of S = 2 sites.
        let q = plan("SELECT COUNT(DISTINCT pid) FROM labs WHERE test = 'LDL'")
            .await
            .unwrap();
        assert_eq!(q.request.aggregates, vec![AggregateRequest::CountUnits]);
        assert_eq!(q.statistics[0].sensitivity, 2);
        // Four groups, R = 20: at most 4 groups per participant.
        let q = plan("SELECT test, COUNT(DISTINCT pid) AS n FROM labs GROUP BY test")
            .await
            .unwrap();
        assert_eq!(q.statistics[0].sensitivity, 4 * 2);
        assert!(q.statistics[0].formula.contains("min(20, 4)"));
        // R = 1 bounds it below the number of groups.
        let q = plan("SELECT sex, COUNT(DISTINCT pid) FROM participants GROUP BY sex")
            .await
            .unwrap();
        assert_eq!(q.statistics[0].sensitivity, 2);
        // Shared with nothing else: COUNT(*) is a different statistic.
        let q = plan("SELECT COUNT(*), COUNT(DISTINCT pid) FROM labs")
            .await
            .unwrap();
        assert_eq!(q.statistics.len(), 2);
        assert_eq!(q.statistics[0].sensitivity, 40);
        assert_eq!(q.statistics[1].sensitivity, 2);
    }

    fn eps(q: &PlannedQuery, kind: impl Fn(&StatisticKind) -> bool) -> RBig {
        q.statistics
            .iter()
            .find(|s| kind(&s.kind))
            .map(|s| s.epsilon.clone())
            .unwrap()
    }

    fn total(q: &PlannedQuery) -> RBig {
        q.statistics
            .iter()
            .fold(q.truncation.epsilon.clone(), |a, s| a + s.epsilon.clone())
    }

    #[tokio::test]
    async fn balanced_allocation_minimises_the_avg_variance() {
        // One AVG: weights 3/4 (sum) and 1/4 (count), so ε_S/ε_N = 3^{1/3}.
        let q = plan("SELECT AVG(birth_year) FROM participants")
            .await
            .unwrap();
        assert_eq!(q.allocation, Allocation::Balanced);
        assert_eq!(
            total(&q),
            RBig::ONE,
            "the shares, with the bounding report's, add up to ε exactly"
        );
        // Shares of what the bounding report leaves to the statistics.
        let avail = 1.0 - 1.0 / f64::from(TRUNCATION_SHARE_DENOMINATOR);
        let es = eps(&q, |k| matches!(k, StatisticKind::CentredSum { .. }))
            .to_f64()
            .value()
            / avail;
        let ec = eps(&q, |k| matches!(k, StatisticKind::Count { .. }))
            .to_f64()
            .value()
            / avail;
        assert!((es / ec - 3f64.cbrt()).abs() < 1e-6, "{es} / {ec}");
        assert!((es - 0.590541).abs() < 1e-5, "{es}");
        // It is the minimiser of 1/ε_S² + (1/3)/ε_N² on ε_S + ε_N = 1: nudging either way is worse.
        let f = |s: f64| 1.0 / (s * s) + 1.0 / (3.0 * (1.0 - s) * (1.0 - s));
        assert!(f(es) < f(es + 1e-3) && f(es) < f(es - 1e-3));
        assert!(f(es) < f(0.5));

        // A shared count gets the weights of both its users: COUNT(value) (1) and AVG (1/4).
        let q = plan("SELECT COUNT(value), AVG(value), COUNT(*) FROM labs")
            .await
            .unwrap();
        assert_eq!(total(&q), RBig::ONE);
        let w: Vec<f64> = q.statistics.iter().map(|s| s.cost).collect();
        assert_eq!(w, vec![1.25, 0.75, 1.0]);
        for s in &q.statistics {
            let want = avail * s.cost.cbrt() / w.iter().map(|c| c.cbrt()).sum::<f64>();
            assert!((s.epsilon.to_f64().value() - want).abs() < 1e-8);
        }

        // Even split on request, for comparison.
        let q = planner()
            .with_allocation(Allocation::Even)
            .plan("SELECT AVG(birth_year) FROM participants", 0.5, "q")
            .await
            .unwrap();
        // 0.5 − 0.5/20 = 19/40, halved.
        for s in &q.statistics {
            assert_eq!(s.epsilon, RBig::from(19u8) / RBig::from(80u8));
        }
    }

    #[tokio::test]
    async fn sites_per_participant_scale_every_sensitivity() {
        let with_s = |s: u32| {
            let cat = CATALOG.replace(
                "max_sites_per_unit = 2",
                &format!("max_sites_per_unit = {s}"),
            );
            Planner::new(&Catalog::from_toml(&cat, "test").unwrap()).unwrap()
        };
        let sql =
            "SELECT test, COUNT(*), SUM(value), AVG(value), VAR_POP(value) FROM labs GROUP BY test";
        let q1 = with_s(1).plan(sql, 1.0, "q").await.unwrap();
        let q3 = with_s(3).plan(sql, 1.0, "q").await.unwrap();
        assert_eq!(q1.statistics.len(), 5);
        assert_eq!(q1.max_sites_per_unit, 1);
        assert_eq!(q3.max_sites_per_unit, 3);
        for (a, b) in q1.statistics.iter().zip(&q3.statistics) {
            assert_eq!(a.kind, b.kind);
            assert_eq!(b.sensitivity, 3 * a.sensitivity, "{}", a.label);
            assert_eq!(a.epsilon, b.epsilon);
            let scale = |s: &Statistic| {
                crate::noise::DiscreteLaplace::new(s.sensitivity, &s.epsilon)
                    .unwrap()
                    .scale()
            };
            assert!((scale(b) - 3.0 * scale(a)).abs() < 1e-9 * scale(b));
        }
        // R = 20, S = 1: counts 20, the sum 20·50000 (0.01 units), the centred sum 20·25000
        // and the centred sum of squares 20·25000².
        let sens: Vec<u128> = q1.statistics.iter().map(|s| s.sensitivity).collect();
        assert_eq!(
            sens,
            vec![20, 20 * 50_000, 20, 20 * 25_000, 20 * 25_000 * 25_000]
        );
        assert_eq!(q3.statistics[0].formula, "R·S = 20·3");
    }

    #[tokio::test]
    async fn variance_uses_centred_sums_and_shares_them_with_avg() {
        let q = plan(
            "SELECT AVG(birth_year), VAR_SAMP(birth_year) AS v, STDDEV_POP(birth_year),              STDDEV(birth_year), VAR_POP(birth_year) FROM participants",
        )
        .await
        .unwrap();
        // COUNT, centred SUM, centred SUM of squares: shared by all five outputs.
        assert_eq!(q.statistics.len(), 3);
        assert_eq!(q.request.aggregates.len(), 3);
        assert_eq!(total(&q), RBig::ONE);
        let sens: Vec<u128> = q.statistics.iter().map(|s| s.sensitivity).collect();
        // R = 1, S = 2, half-width 65: 2, 2·65 and 2·65².
        assert_eq!(sens, vec![2, 2 * 65, 2 * 65 * 65]);
        assert!(q
            .request
            .aggregates
            .contains(&AggregateRequest::SumSquaresFixed {
                column: "birth_year".into(),
                lower: 1900.0,
                upper: 2030.0,
                precision: 1.0,
            }));
        let kinds: Vec<(bool, bool)> = q
            .outputs
            .iter()
            .filter_map(|o| match o {
                AggregateOutput::Variance {
                    sample,
                    sqrt,
                    half_fp,
                    ..
                } => {
                    assert_eq!(*half_fp, 65);
                    Some((*sample, *sqrt))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            vec![(true, false), (false, true), (true, true), (false, false)]
        );
    }

    #[tokio::test]
    async fn suppression_gives_every_sum_a_count() {
        let cat = Catalog::from_toml(CATALOG, "test").unwrap();
        let p = Planner::new(&cat).unwrap().with_min_reported_count(11);
        let q = p
            .plan("SELECT SUM(value) FROM labs", 1.0, "q")
            .await
            .unwrap();
        assert_eq!(q.statistics.len(), 2);
        match &q.outputs[0] {
            AggregateOutput::Sum {
                count_stat: Some(c),
                ..
            } => assert!(matches!(q.statistics[*c].kind, StatisticKind::Count { .. })),
            other => panic!("{other:?}"),
        }
        let q = plan("SELECT SUM(value) FROM labs").await.unwrap();
        assert_eq!(q.statistics.len(), 1);
    }

    #[tokio::test]
    async fn shared_statistics_are_not_charged_twice() {
        let q = plan("SELECT COUNT(*), COUNT(*) AS n2, COUNT(value), AVG(value) FROM labs")
            .await
            .unwrap();
        // COUNT(*), COUNT(value) (shared with AVG), centred SUM(value).
        assert_eq!(q.statistics.len(), 3);
        assert_eq!(q.request.aggregates.len(), 3);
    }

    #[tokio::test]
    async fn filters_become_typed_predicates() {
        let q = plan(
            "SELECT COUNT(*) FROM labs l WHERE l.test IN ('LDL', 'HbA1c') AND value BETWEEN 1 AND 2 \
             AND measured_on >= DATE '2020-01-01' AND test LIKE 'L%' AND value IS NOT NULL \
             AND TRY_CAST(test AS INT) IS NULL AND value * 2 > -1",
        )
        .await
        .unwrap();
        let f = q.request.filter.unwrap();
        let cols = f.columns();
        assert!(cols.contains(&"test") && cols.contains(&"value") && cols.contains(&"measured_on"));
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"date32\""), "{json}");
        assert!(json.contains("try_cast"), "{json}");
    }
}
