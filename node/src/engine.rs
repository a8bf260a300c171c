//! The query engine: local tables in DataFusion, request validation, bounded execution.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::{Column, JoinType};
use datafusion::dataframe::DataFrame;
use datafusion::execution::context::{SessionConfig, SessionContext, SessionState};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, UnboundedMemoryPool};
use datafusion::execution::options::{CsvReadOptions, ParquetReadOptions};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::TaskContext;
use datafusion::functions::core::expr_fn::file_row_index;
use datafusion::logical_expr::{ident, Expr, LogicalPlan};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::physical_plan::execute_stream;
use fedq_common::group_key::KeyDomain;
use fedq_common::metrics::NodePhase;
use fedq_common::quantile::{QuantileGrid, MAX_HISTOGRAM_CELLS};
use fedq_common::wire::{
    MAX_AGGREGATES, MAX_EXPR_DEPTH, MAX_EXPR_NODES, MAX_GROUPS, MAX_GROUP_COLUMNS, MAX_JOINS,
    MAX_SET_LEAVES,
};
use fedq_common::{
    AggregateRequest, Catalog, ColumnRef, ColumnType, GroupKey, NodeInfo, PartialAggregateRequest,
    PublicValue, Side, TableSpec, PROTOCOL_VERSION,
};
use futures::StreamExt;

use crate::bounding::{
    AggPlan, Bounder, BoundingPlan, GroupCol, ParticipantCounts, SlotKind, ValueSlot,
};
use crate::config::{NodeConfig, TableFormat, TableSource};
use crate::error::NodeError;
use crate::filter::{self, side_alias, Relation, Scope};
use crate::plan_cache::{self, CachedPlan, PhysicalSlot, PlanCache, ShapeKey};
use crate::selection::{self, OpenKey, Selection};
use crate::sets::{self, SetNames};

/// Longest query id a node accepts.
pub const MAX_QUERY_ID_CHARS: usize = 256;

/// Largest `max(|lower|, |upper|) / precision` of a fixed-point sum.
const MAX_FIXED_STEPS: f64 = 1e15;

/// Quote a peer-supplied name for a message: backticks, control characters escaped,
/// at most 64 characters.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::from("`");
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if c.is_control() || c == '`' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

/// Position of `col` in the projection, appending it if needed.
/// One projected column: a catalog column, or a bucketed group key's expression.
#[derive(Debug, Clone, PartialEq)]
enum ProjItem {
    Col(ColumnRef),
    Key(Expr),
}

fn proj_index(col: &ColumnRef, proj: &mut Vec<ProjItem>) -> usize {
    match proj.iter().position(|p| *p == ProjItem::Col(col.clone())) {
        Some(i) => i,
        None => {
            proj.push(ProjItem::Col(col.clone()));
            proj.len() - 1
        }
    }
}

/// Position of `item` in the projection: a column already there is reused, an expression
/// is always added.
fn proj_item(item: ProjItem, proj: &mut Vec<ProjItem>) -> usize {
    match item {
        ProjItem::Col(c) => proj_index(&c, proj),
        ProjItem::Key(_) => {
            proj.push(item);
            proj.len() - 1
        }
    }
}

/// A table served by this node.
pub(crate) struct ServedTable {
    pub(crate) spec: TableSpec,
    /// The node's own policy for this table (it narrows the catalog).
    pub(crate) policy: crate::config::TablePolicy,
    /// The table restricted to its catalog columns.
    pub(crate) df: DataFrame,
    /// The table's one Parquet file, when its `path` names a file: rows can then be told
    /// apart by their position in it (see [`crate::bounding::RowOwners`]).
    file: Option<PathBuf>,
    /// Rows per participant over the whole table, recounted when found stale.
    counts: RwLock<Counted>,
    /// Where the table's files are (to estimate its size again after a recount).
    source: TableSource,
    /// Estimated bytes of the table's catalog columns in memory ([`table_bytes`]), taken
    /// at start-up and after each recount.
    bytes: std::sync::atomic::AtomicU64,
    /// Whether every query over this table fits `max_query_memory_mb` by the worst case
    /// ([`MemoryBound`]). Checked at start-up (the node does not start otherwise); turns
    /// false only when a recount finds the table grown past it, and then every request
    /// on the table is refused in validation, before reading.
    fits: std::sync::atomic::AtomicBool,
}

/// A table's rows per participant, and the stamp of its one file when they were counted
/// (only when the counts know the owners of the file's rows, see [`count_participants`]).
#[derive(Debug, Clone)]
struct Counted {
    counts: Arc<ParticipantCounts>,
    stamp: Option<FileStamp>,
}

/// What identifies a file's contents cheaply: length, modification time and inode. A file
/// rewritten or replaced gets another stamp (within the file system's time resolution).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified: std::time::SystemTime,
    inode: u64,
}

impl FileStamp {
    /// The file's stamp now, or `None` if it cannot be read.
    pub(crate) fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileStamp {
            len: m.len(),
            modified: m.modified().ok()?,
            inode,
        })
    }
}

/// A validated request, ready to run.
struct Prepared<'a> {
    plan: BoundingPlan,
    state: Arc<SessionState>,
    logical: LogicalPlan,
    table: &'a ServedTable,
    /// With open group keys (partition selection): the keys and G, the unoptimised
    /// projected rows (`c0..`) and their column count.
    selection: Option<(Selection, DataFrame, usize)>,
    /// Where the physical plan of this request's shape is kept, if it may be reused.
    physical: PhysicalSlot,
}

/// The node's query engine: a DataFusion session over the local tables, restricted to the
/// catalog columns, that answers only validated partial-aggregate requests.
pub struct NodeEngine {
    site: String,
    catalog: Catalog,
    tables: BTreeMap<String, ServedTable>,
    /// Memory one query may use (bytes), see [`crate::config::NodeLimits`].
    max_query_memory: usize,
    /// Plans of request shapes seen before.
    plans: PlanCache,
}

impl std::fmt::Debug for NodeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEngine")
            .field("site", &self.site)
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl NodeEngine {
    /// Register the configured tables, after checking every file against the catalog
    /// schema. Only catalog columns are registered; extra file columns are never queryable.
    pub async fn new(config: &NodeConfig) -> Result<NodeEngine, NodeError> {
        // No round-robin repartitioning: one bounder consumes each query's rows, so spreading
        // a single-file scan's batches over tasks only to merge them again costs channels
        // and task switches on every request (measured with `fedq bench`: about 8 ms of the
        // filtered lab query over 38 nodes). Large files are still split into byte ranges
        // and read in parallel.
        let session = SessionConfig::new().with_round_robin_repartition(false);
        let ctx = SessionContext::new_with_config(session);
        let mut tables = BTreeMap::new();
        for (name, source) in &config.tables {
            let spec = config
                .catalog
                .table(name)
                .ok_or_else(|| NodeError::Config {
                    origin: config.catalog_path.display().to_string(),
                    message: format!("[tables.{name}] is not a table of the catalog"),
                })?;
            let df = load_table(&ctx, name, spec, source).await?;
            let file = (source.format == TableFormat::Parquet && source.path.is_file())
                .then(|| source.path.clone());
            let counts = count_participants(&df, spec, file.as_deref())
                .await
                .map_err(|e| NodeError::DataFile {
                    table: name.clone(),
                    path: source.path.display().to_string(),
                    message: format!("cannot count rows per participant: {e}"),
                })?;
            let bytes = table_bytes(name, spec, source)?;
            tables.insert(
                name.clone(),
                ServedTable {
                    spec: spec.clone(),
                    policy: config.policy.get(name).cloned().unwrap_or_default(),
                    df,
                    file,
                    counts: RwLock::new(counts),
                    source: source.clone(),
                    bytes: std::sync::atomic::AtomicU64::new(bytes),
                    fits: std::sync::atomic::AtomicBool::new(true),
                },
            );
        }
        let engine = NodeEngine {
            site: config.site.clone(),
            catalog: config.catalog.clone(),
            tables,
            max_query_memory: config.limits.max_query_memory,
            plans: PlanCache::default(),
        };
        // No query can fail on memory at run time, so the node refuses to start unless the
        // worst query over its tables fits the limit.
        if let Some(bound) = engine.worst_query() {
            if bound.bytes() > engine.max_query_memory as u64 {
                return Err(NodeError::Config {
                    origin: format!("site {}", engine.site),
                    message: bound.refusal(engine.max_query_memory),
                });
            }
            tracing::info!(site = %engine.site, worst_query_bytes = bound.bytes(), limit_bytes = engine.max_query_memory, "the worst query over the served tables fits max_query_memory_mb");
        }
        Ok(engine)
    }

    /// The memory bound of the worst query over this node's tables: the two largest
    /// tables joined (or the only one).
    fn worst_query(&self) -> Option<MemoryBound> {
        let mut sizes: Vec<(String, u64)> = self
            .tables
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.bytes.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect();
        sizes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut it = sizes.into_iter();
        let largest = it.next()?;
        Some(MemoryBound {
            largest,
            other: it.next(),
        })
    }

    /// The memory bound of the worst query reading `name`: the table joined with the
    /// largest other served table.
    fn worst_query_over(&self, name: &str) -> Option<MemoryBound> {
        let own = self.tables.get(name)?;
        let other = self
            .tables
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.bytes.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        Some(MemoryBound {
            largest: (
                name.to_string(),
                own.bytes.load(std::sync::atomic::Ordering::Relaxed),
            ),
            other,
        })
    }

    /// A refusal, before reading, of a request on a table that no longer fits the memory
    /// limit (its files grew since the node started). The message depends only on the
    /// configuration: the table, the site and the limit.
    fn check_fits(&self, name: &str, table: &ServedTable) -> Result<(), NodeError> {
        if table.fits.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        Err(NodeError::Refused(format!(
            "table {} no longer fits this node's memory limit for one query (max_query_memory_mb = {}) since its files changed; the operator of site {} must raise max_query_memory_mb and restart the node",
            shown(name),
            self.max_query_memory.div_ceil(1024 * 1024),
            self.site
        )))
    }

    /// A served catalog table, or the refusal (before reading) of a request that names a
    /// table outside the catalog, not served here, or grown past the memory limit.
    pub(crate) fn served(&self, name: &str) -> Result<&ServedTable, NodeError> {
        if self.catalog.table(name).is_none() {
            return Err(NodeError::Refused(format!(
                "unknown table {}: it is not in the catalog",
                shown(name)
            )));
        }
        let Some(table) = self.tables.get(name) else {
            return Err(NodeError::Refused(format!(
                "table {} is not served at site {}",
                shown(name),
                self.site
            )));
        };
        self.check_fits(name, table)?;
        Ok(table)
    }

    /// Site name.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// What the node reports about itself.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            site: self.site.clone(),
            protocol_version: PROTOCOL_VERSION,
            fedq_version: env!("CARGO_PKG_VERSION").to_string(),
            tables: self.tables.keys().cloned().collect(),
        }
    }

    /// Check a request against the catalog and the served tables, and plan it, without
    /// reading any data.
    pub fn validate(&self, req: &PartialAggregateRequest) -> Result<(), NodeError> {
        self.prepared(req, false, true).map(|_| ())
    }

    /// Validate and run a request. Returns one record batch (several, of at most
    /// `MAX_GROUPS` rows each, when partition selection observed more groups): the group
    /// columns, then `agg_0`, `agg_1`, … (see the crate docs).
    ///
    /// Every refusal it returns is raised before any row is read: validation comes first,
    /// and a refusal after a read (a retry after a recount) is turned into
    /// [`NodeError::Internal`]. No error depends on how much memory the query needs (its
    /// pool never refuses); see [`WORST_CASE_FACTOR`] for how the limit is kept instead.
    pub async fn execute(
        &self,
        req: &PartialAggregateRequest,
    ) -> Result<Vec<RecordBatch>, NodeError> {
        self.validate(req)?;
        self.execute_validated(req, &|_, _| {}).await
    }

    /// [`NodeEngine::execute`] for a request the caller has just validated
    /// ([`NodeEngine::validate`]), as the Flight service does before it waits for a slot.
    /// `phase` is told how long planning and execution took.
    pub(crate) async fn execute_validated(
        &self,
        req: &PartialAggregateRequest,
        phase: &(dyn Fn(NodePhase, std::time::Duration) + Sync),
    ) -> Result<Vec<RecordBatch>, NodeError> {
        let failed = |e| NodeError::Execution {
            site: self.site.clone(),
            query_id: req.query_id.clone(),
            source: e,
        };
        let internal = |e: crate::bounding::BoundError| NodeError::Internal {
            site: self.site.clone(),
            query_id: req.query_id.clone(),
            message: e.0,
        };
        let exec_err = failed;
        // Whether data may have been read already (a recount, an earlier attempt): from then
        // on no error may claim to be a refusal before reading (see `NodeError::stage`).
        let mut read_any = false;
        // A stale count (the files changed since they were taken) is retried once, after
        // recounting rows per participant; a participant found in more than one run is
        // retried with every participant of more than R rows in a reservoir (see
        // `Bounder`). Each can happen once per set of counts.
        let mut recounted = false;
        // Set when a plan could not read row positions in the scan (see below).
        let mut positions_unusable = false;
        // Derived tables and the joins of participant sets do not keep the table's row
        // order, so neither the start-up counts nor run sampling apply.
        let reorders_rows = req.derived.is_some() || !req.participant_sets().is_empty();
        for _attempt in 0..5 {
            // A joined participant can have up to (rows on the left) × (rows on the right)
            // rows, so the driving table's start-up counts do not bound its joined rows.
            // Joined requests use no counts: every participant goes through a reservoir of
            // R rows, whatever its counts say.
            let served = self.tables.get(&req.table);
            let Counted { counts, stamp } = match served {
                Some(t) if req.joins.is_empty() && !reorders_rows => t
                    .counts
                    .read()
                    .map(|c| c.clone())
                    .map_err(|_| internal(crate::bounding::BoundError("counts lock".into())))?,
                _ => Counted {
                    counts: Arc::new(ParticipantCounts::default()),
                    stamp: None,
                },
            };
            // Rows are told apart by their position in the file only while the file is the
            // one that was counted; a changed file is recounted first.
            let file = served.and_then(|t| t.file.as_deref());
            let current = file.and_then(FileStamp::of);
            if stamp.is_some() && stamp != current && !recounted {
                if let (Some(t), Some(_)) = (served, file) {
                    recounted = true;
                    read_any = true;
                    tracing::warn!(site = %self.site, table = %req.table, "the table's file changed since its rows were counted; recounting");
                    self.recount(t).await.map_err(exec_err)?;
                    continue;
                }
            }
            let by_position = stamp.is_some()
                && stamp == current
                && counts.owners().is_some()
                && !positions_unusable;
            let planning = std::time::Instant::now();
            // Validation depends only on the request, the catalog, the node's policy and
            // configuration, so a request that passed it once passes it again; should it
            // not after data was read, the error must not pass for a refusal before reading.
            let prepared = match self.prepared(req, by_position, !read_any) {
                Ok(p) => p,
                Err(e) if read_any => {
                    return Err(internal(crate::bounding::BoundError(format!(
                        "the request was refused after data was read: {e}"
                    ))))
                }
                Err(e) => return Err(e),
            };
            read_any = true;
            let Prepared {
                mut plan,
                state,
                logical,
                table,
                selection,
                physical: kept,
            } = prepared;
            phase(NodePhase::Plan, planning.elapsed());
            // Choosing the groups of open keys reads data: it counts as execution.
            let selecting = std::time::Instant::now();
            // Open group keys: bound each participant to G groups first (see `selection`);
            // the bounder then sees one Int64 key numbering the observed groups.
            // Partition selection reorders rows: no run is sampled on the spot.
            // So do the joins of participant sets.
            let in_table_order = selection.is_none() && !reorders_rows;
            // `prepare` optimised the request's own plan; partition selection builds another.
            let (state, logical, dict) = match selection {
                None => (state, logical, None),
                Some((sel, df, n_cols)) => {
                    let (rows, dict) = selection::bound_groups(df, &sel, n_cols)
                        .await
                        .map_err(exec_err)?;
                    plan.groups = vec![GroupCol::new(
                        selection::GIDX.to_string(),
                        ColumnType::Int64,
                        (0..dict.len() as i64).map(PublicValue::Int).collect(),
                        1,
                    )];
                    for slot in &mut plan.slots {
                        slot.proj = selection::shifted(slot.proj);
                    }
                    let (state, logical) = rows.into_parts();
                    let logical = state.optimize(&logical).map_err(exec_err)?;
                    (Arc::new(state), logical, Some((sel, dict)))
                }
            };
            let selected = selecting.elapsed();
            let planning = std::time::Instant::now();
            // The plan of partition selection depends on the groups it observed: never kept.
            let reused = match dict {
                None => plan_cache::reuse(&kept),
                Some(_) => None,
            };
            let physical = match reused {
                Some(p) => p,
                None => {
                    // The logical plan is optimised already: `SessionState::create_physical_plan`
                    // would run every optimiser rule over it a second time, on every request.
                    let physical = state
                        .query_planner()
                        .create_physical_plan(&logical, state.as_ref())
                        .await
                        .map_err(exec_err)?;
                    // A row's position exists only inside the Parquet scan: if the planner
                    // kept `file_row_index()` in an operator above it (some filters stop the
                    // projection from being pushed into the scan), that operator would fail
                    // on its first non-empty batch, so whether the query fails would depend
                    // on the data. Plan again with the participant id instead. Decided from
                    // the plan only.
                    if plan.pid_rows && row_index_outside_scan(physical.as_ref()) {
                        positions_unusable = true;
                        continue;
                    }
                    if dict.is_none() && plan_cache::reusable(physical.as_ref()) {
                        if let Some(files) = self.single_files(req) {
                            plan_cache::keep(&kept, &physical, files);
                        }
                    }
                    physical
                }
            };
            phase(NodePhase::Physical, planning.elapsed());
            let executing = std::time::Instant::now();
            // A memory pool of its own for this query, which never refuses: how much memory
            // a query needs depends on its data (a WHERE calibrated to a threshold moves
            // it by one participant's rows), so a query stopped at a limit would release a
            // bit that one participant can flip. The limit is instead checked against the
            // worst case of every query when the node starts and when a table is recounted
            // (see `MemoryBound`), so a query's outcome never depends on how much it used.
            // The pool only tracks what DataFusion's operators and the bounder reserve, for
            // the node log.
            let pool: Arc<dyn MemoryPool> = Arc::new(UnboundedMemoryPool::default());
            let mut peak_reserved = 0usize;
            let runtime = RuntimeEnvBuilder::from_runtime_env(state.runtime_env())
                .with_memory_pool(Arc::clone(&pool))
                .build_arc()
                .map_err(exec_err)?;
            // The task context takes the query's runtime directly: rebuilding a whole
            // session state for it would re-register every function on every request.
            let task = Arc::new(TaskContext::from(state.as_ref()).with_runtime(runtime));
            let mut stream = execute_stream(physical, task).map_err(exec_err)?;
            let reservation = MemoryConsumer::new("fedq bounding").register(&pool);
            let used_positions = plan.pid_rows;
            let mut bounder = Bounder::with_counts(plan, Arc::clone(&counts));
            if !in_table_order {
                bounder = bounder.without_run_sampling();
            }
            let mut stale = false;
            let mut scattered = false;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(exec_err)?;
                if let Err(e) = bounder.push(&batch) {
                    if bounder.is_stale() && !recounted {
                        stale = true;
                        break;
                    }
                    if bounder.is_scattered() {
                        scattered = true;
                        break;
                    }
                    return Err(internal(e));
                }
                reservation.resize(bounder.memory_bytes());
                peak_reserved = peak_reserved.max(pool.reserved());
            }
            tracing::debug!(site = %self.site, query_id = %req.query_id, peak_reserved_bytes = peak_reserved, "query memory");
            if scattered {
                tracing::info!(
                    site = %self.site,
                    table = %req.table,
                    "a participant's rows are not in one run; rerunning with reservoirs"
                );
                counts.mark_scattered();
                continue;
            }
            // Row positions name their owners only if the file did not change during the
            // scan either.
            if used_positions && file.and_then(FileStamp::of) != stamp {
                if recounted {
                    return Err(internal(crate::bounding::BoundError(
                        "the table's file kept changing during the query".into(),
                    )));
                }
                stale = true;
            }
            if stale {
                recounted = true;
                tracing::warn!(
                    site = %self.site,
                    table = %req.table,
                    "rows per participant changed since they were counted; recounting"
                );
                self.recount(table).await.map_err(exec_err)?;
                continue;
            }
            let out = bounder.finish().map_err(internal)?;
            let out = match &dict {
                None => out,
                Some((sel, dict)) => selection::expand_keys(out, sel, dict)
                    .map_err(|e| internal(crate::bounding::BoundError(e)))?,
            };
            phase(NodePhase::Execute, selected + executing.elapsed());
            return Ok(in_batches(out));
        }
        Err(internal(crate::bounding::BoundError(
            "rows per participant kept changing during the query".into(),
        )))
    }

    /// Count the rows per participant of `table` again (its files changed).
    async fn recount(&self, table: &ServedTable) -> Result<(), datafusion::error::DataFusionError> {
        let fresh = count_participants(&table.df, &table.spec, table.file.as_deref()).await?;
        if let Ok(mut c) = table.counts.write() {
            *c = fresh;
        }
        // The files changed: estimate the table's size again. A table grown past the memory
        // limit is refused from the next request on, in validation (the query running now
        // finishes: it must not fail on its data).
        let name = self
            .tables
            .iter()
            .find(|(_, t)| std::ptr::eq(*t, table))
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        match table_bytes(&name, &table.spec, &table.source) {
            Ok(bytes) => table
                .bytes
                .store(bytes, std::sync::atomic::Ordering::Relaxed),
            Err(e) => {
                tracing::error!(site = %self.site, table = %name, error = %e, "cannot estimate the table's size after its files changed; refusing its requests");
                table
                    .fits
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        }
        if let Some(bound) = self.worst_query_over(&name) {
            let fits = bound.bytes() <= self.max_query_memory as u64;
            if !fits {
                tracing::error!(site = %self.site, table = %name, "{}", bound.refusal(self.max_query_memory));
            }
            table.fits.store(fits, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`NodeEngine::prepare`], reusing the plan of an earlier request of the same shape
    /// (see [`crate::plan_cache`]): only the query id and whether each table read still
    /// fits the memory limit are checked again.
    fn prepared(
        &self,
        req: &PartialAggregateRequest,
        by_position: bool,
        check_fits: bool,
    ) -> Result<Prepared<'_>, NodeError> {
        let key = ShapeKey::of(req, by_position);
        let hit = key.as_ref().and_then(|k| self.plans.get(k));
        let table = self.tables.get(&req.table);
        if let (Some(c), Some(table)) = (hit, table) {
            check_query_id(req)?;
            if check_fits {
                for name in tables_read(req) {
                    if let Some(t) = self.tables.get(name) {
                        self.check_fits(name, t)?;
                    }
                }
            }
            let c = c.as_ref().clone();
            return Ok(Prepared {
                plan: c.plan,
                state: c.state,
                logical: c.logical,
                table,
                selection: c.selection,
                physical: c.physical,
            });
        }
        let p = self.prepare(req, by_position, check_fits)?;
        if let Some(key) = key {
            self.plans.insert(
                key,
                CachedPlan {
                    plan: p.plan.clone(),
                    state: Arc::clone(&p.state),
                    logical: p.logical.clone(),
                    selection: p.selection.clone(),
                    physical: Arc::clone(&p.physical),
                },
            );
        }
        Ok(p)
    }

    /// The one file of each table `req` reads, if every one of them is a single file.
    fn single_files(&self, req: &PartialAggregateRequest) -> Option<Vec<PathBuf>> {
        tables_read(req)
            .into_iter()
            .map(|name| self.tables.get(name).and_then(|t| t.file.clone()))
            .collect()
    }

    /// Request shapes whose plans are kept (tests).
    #[cfg(test)]
    pub(crate) fn cached_plans(&self) -> usize {
        self.plans.len()
    }

    /// Validate `req` and plan it. With `by_position`, the plan reads each row's position
    /// in the table's file instead of the participant id when it can (one table, no open
    /// group keys): the caller has checked that the counts' row owners match the file.
    ///
    /// With `check_fits`, a table that grew past the memory limit since the node started is
    /// refused (before reading); without, as for a query already reading, it is not: a
    /// query that started must not fail on what it read.
    fn prepare(
        &self,
        req: &PartialAggregateRequest,
        by_position: bool,
        check_fits: bool,
    ) -> Result<Prepared<'_>, NodeError> {
        let invalid = |m: String| NodeError::InvalidRequest(m);
        let refused = |m: String| NodeError::Refused(m);

        // Structural limits (already checked by decode_ticket; repeated for direct callers).
        check_query_id(req)?;
        if req.group_by.len() > MAX_GROUP_COLUMNS {
            return Err(invalid(format!(
                "{} group columns; the limit is {MAX_GROUP_COLUMNS}",
                req.group_by.len()
            )));
        }
        if req.aggregates.is_empty() || req.aggregates.len() > MAX_AGGREGATES {
            return Err(invalid(format!(
                "{} aggregates; between 1 and {MAX_AGGREGATES} are allowed",
                req.aggregates.len()
            )));
        }
        if req.group_by.iter().map(GroupKey::depth).max().unwrap_or(0) > MAX_EXPR_DEPTH
            || req.group_by.iter().map(GroupKey::node_count).sum::<usize>() > MAX_EXPR_NODES
        {
            return Err(invalid(format!(
                "group key conditions exceed the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)"
            )));
        }
        if let Some(f) = &req.filter {
            if f.depth() > MAX_EXPR_DEPTH || f.node_count() > MAX_EXPR_NODES {
                return Err(invalid(format!(
                    "filter exceeds the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)"
                )));
            }
        }

        // Table.
        let tname = &req.table;
        if self.catalog.table(tname).is_none() {
            return Err(refused(format!(
                "unknown table {}: it is not in the catalog",
                shown(tname)
            )));
        }
        let Some(table) = self.tables.get(tname) else {
            return Err(refused(format!(
                "table {} is not served at site {}",
                shown(tname),
                self.site
            )));
        };
        if check_fits {
            self.check_fits(tname, table)?;
        }
        // A per-participant derived table of the table, when the request reads one: it is
        // declared from the table's catalog entry (R = 1) and built from its rows here.
        let derived = match &req.derived {
            None => None,
            Some(d) => {
                if d.table != *tname {
                    return Err(invalid(format!(
                        "the derived table reads {}, not the request's table {}",
                        shown(&d.table),
                        shown(tname)
                    )));
                }
                Some(crate::derived::view(d, &self.catalog, &table.policy)?)
            }
        };
        let (spec, policy) = match &derived {
            Some(v) => (&v.spec, &v.policy),
            None => (&table.spec, &table.policy),
        };

        // Joins: other served catalog tables, each joined on both privacy units.
        if req.joins.len() > MAX_JOINS {
            return Err(invalid(format!(
                "{} joined tables; the limit is {MAX_JOINS}",
                req.joins.len()
            )));
        }
        let mut joined_tables: Vec<&ServedTable> = Vec::with_capacity(req.joins.len());
        for j in &req.joins {
            let rname = &j.table;
            if self.catalog.table(rname).is_none() {
                return Err(refused(format!(
                    "unknown table {} in the join: it is not in the catalog",
                    shown(rname)
                )));
            }
            let Some(rt) = self.tables.get(rname) else {
                return Err(refused(format!(
                    "table {} is not served at site {}",
                    shown(rname),
                    self.site
                )));
            };
            if j.left_on != spec.privacy_unit || j.right_on != rt.spec.privacy_unit {
                return Err(refused(format!(
                    "joins must be on the privacy units ({}.{} = {}.{}), not on {} = {}: a join on another column can pair one participant's rows with another participant's, so R could not bound what one participant contributes",
                    shown(tname),
                    shown(&spec.privacy_unit),
                    shown(rname),
                    shown(&rt.spec.privacy_unit),
                    shown(&j.left_on),
                    shown(&j.right_on)
                )));
            }
            if check_fits {
                self.check_fits(rname, rt)?;
            }
            joined_tables.push(rt);
        }
        // A joined derived table is declared like the driving one, from its own table.
        let joined_views: Vec<Option<crate::derived::DerivedView>> = req
            .joins
            .iter()
            .zip(&joined_tables)
            .map(|(j, rt)| match &j.derived {
                None => Ok(None),
                Some(d) if d.table != j.table => Err(invalid(format!(
                    "the joined derived table reads {}, not the joined table {}",
                    shown(&d.table),
                    shown(&j.table)
                ))),
                Some(d) => crate::derived::view(d, &self.catalog, &rt.policy).map(Some),
            })
            .collect::<Result<_, _>>()?;
        // Participant sets (`IN`/`EXISTS` subqueries, `INTERSECT`, `EXCEPT`): checked
        // against the catalog like the coordinator checks them, then each distinct one gets
        // a column in the frame (see `crate::sets`).
        let mut set_names = SetNames::default();
        let tested = req.participant_sets();
        let leaves: usize = tested.iter().map(|s| s.leaf_count()).sum();
        if leaves > MAX_SET_LEAVES {
            return Err(invalid(format!(
                "the request tests {leaves} participant subqueries; the limit is {MAX_SET_LEAVES}"
            )));
        }
        for s in &tested {
            s.check(&self.catalog).map_err(|e| refused(e.0))?;
        }
        // The derived table's own sets are joined inside its frame (`crate::derived`).
        let set_cols = sets::set_columns(req.outer_participant_sets(), &mut set_names);
        let joined: Vec<Relation> = req
            .joins
            .iter()
            .zip(&joined_tables)
            .zip(&joined_views)
            .map(|((j, rt), view)| match view {
                Some(v) => Relation {
                    policy: &v.policy,
                    name: j.table.as_str(),
                    spec: &v.spec,
                },
                None => Relation {
                    policy: &rt.policy,
                    name: j.table.as_str(),
                    spec: &rt.spec,
                },
            })
            .collect();
        let base = Scope {
            left: Relation {
                name: tname,
                spec,
                policy,
            },
            joined: &joined,
            sets: &set_cols,
            computed: &[],
        };
        // Computed columns (`AVG(2026 - birth_year)`, `COUNT(*) FILTER (WHERE …)`): checked
        // and declared here from the catalog and this node's policy, then read like columns.
        let computed = crate::computed::columns(req, &base)?;
        let scope = Scope {
            computed: &computed,
            ..base
        };
        let column = |c: &ColumnRef, role: &str| scope.column(c.side, &c.name, role).map(|x| x.1);
        let privacy_unit = |c: &ColumnRef| {
            scope
                .relation(c.side)
                .map(|r| r.spec.privacy_unit == c.name)
        };

        // R: the driving table's. After a join, each participant keeps at most R of its
        // joined rows, so one participant still adds at most R rows to the result.
        if req.max_rows_per_unit == 0 {
            return Err(invalid("max_rows_per_unit must be at least 1".into()));
        }
        if req.max_rows_per_unit > spec.max_rows_per_unit {
            return Err(refused(format!(
                "max_rows_per_unit {} exceeds the catalog's {} for table {}",
                req.max_rows_per_unit,
                spec.max_rows_per_unit,
                shown(tname)
            )));
        }

        if let Some(cap) = policy.max_rows_per_unit {
            if req.max_rows_per_unit > cap {
                return Err(refused(format!(
                    "max_rows_per_unit {} exceeds this node's cap of {cap} for table {} (its node policy: max_rows_per_unit in [tables.{tname}] of node.toml)",
                    req.max_rows_per_unit,
                    shown(tname)
                )));
            }
        }
        // G: with open group keys (partition selection), each participant's rows are kept
        // in at most G groups, at most the catalog's G of the driving table.
        let max_groups = match req.max_groups_per_unit {
            None => None,
            Some(0) => return Err(invalid("max_groups_per_unit must be at least 1".into())),
            Some(g) => match spec.max_groups_per_unit {
                None => {
                    return Err(refused(format!(
                        "cannot group by keys without a public domain over table {}: the catalog declares no max_groups_per_unit (G) for it",
                        shown(tname)
                    )))
                }
                Some(cat) if g > cat => {
                    return Err(refused(format!(
                        "max_groups_per_unit {g} exceeds the catalog's {cat} for table {}",
                        shown(tname)
                    )))
                }
                Some(_) => Some(g),
            },
        };
        if max_groups.is_some() && req.group_by.is_empty() {
            return Err(invalid(
                "max_groups_per_unit is only meaningful with GROUP BY keys".into(),
            ));
        }
        let mut open_keys = Vec::new();

        // Projection: privacy unit first, then group keys, then aggregate inputs (deduped).
        let mut proj: Vec<ProjItem> =
            vec![ProjItem::Col(ColumnRef::left(spec.privacy_unit.clone()))];

        // Group keys: columns, or bucketed columns computed by an expression. The node
        // derives each key's domain itself, from the key and its catalog ([`GroupKey::domain`]).
        let mut groups = Vec::with_capacity(req.group_by.len());
        let mut n_groups: usize = 1;
        for (i, g) in req.group_by.iter().enumerate() {
            let gname = match g {
                GroupKey::Column { column } | GroupKey::Listed { column, .. } => column.to_string(),
                _ => format!("key{i}"),
            };
            if req.group_by[..i].contains(g) {
                return Err(invalid(format!("GROUP BY lists {} twice", shown(&gname))));
            }
            let col_spec = match g.column() {
                Some(c) => {
                    if privacy_unit(c)? {
                        return Err(refused(format!(
                            "cannot group by the privacy unit column {}: each group would be one participant",
                            shown(&c.to_string())
                        )));
                    }
                    Some(column(c, "GROUP BY")?)
                }
                None => None,
            };
            if let (GroupKey::Column { .. } | GroupKey::Listed { .. }, Some(c)) = (g, col_spec) {
                if !matches!(
                    c.ty,
                    ColumnType::Utf8 | ColumnType::Int32 | ColumnType::Int64 | ColumnType::Boolean
                ) {
                    return Err(refused(format!(
                        "cannot group by {} of type {}: group keys must be utf8, int32, int64 or boolean",
                        shown(&gname),
                        c.ty
                    )));
                }
            }
            let key_err = |e: fedq_common::group_key::KeyError| {
                invalid(format!("GROUP BY key {}: {}", i + 1, e.0))
            };
            let ty = g.output_type(col_spec).map_err(key_err)?;
            let domain = g.domain(col_spec).map_err(key_err)?;
            let item = match g {
                GroupKey::Column { column } | GroupKey::Listed { column, .. } => {
                    ProjItem::Col(column.clone())
                }
                _ => ProjItem::Key(filter::group_key_expr(g, &scope, g.clamp_range(col_spec))?),
            };
            if max_groups.is_some() {
                // Any value may be a group; only the coordinator's threshold releases one.
                let p = proj_item(item, &mut proj);
                if p != open_keys.len() + 1 {
                    return Err(invalid(format!("GROUP BY lists {} twice", shown(&gname))));
                }
                open_keys.push(OpenKey { name: gname, ty });
                continue;
            }
            let KeyDomain::Public(values) = domain else {
                return Err(refused(match g {
                    GroupKey::Column { .. } => format!(
                        "cannot group by {}: the catalog declares no public domain (public_values) for it",
                        shown(&gname)
                    ),
                    _ => format!(
                        "cannot group by key {}: no public domain follows from the catalog's bounds of its column",
                        i + 1
                    ),
                }));
            };
            n_groups = n_groups.saturating_mul(values.len());
            if n_groups > MAX_GROUPS {
                return Err(invalid(format!(
                    "the GROUP BY columns have more than {MAX_GROUPS} combinations of public values"
                )));
            }
            let p = proj_item(item, &mut proj);
            groups.push(GroupCol::new(gname, ty, values, p));
        }

        // Aggregates.
        let mut slots: Vec<ValueSlot> = Vec::new();
        let mut slot_names: Vec<ColumnRef> = Vec::new();
        let mut aggs = Vec::with_capacity(req.aggregates.len());
        let mut histogram_cells = 0usize;
        for a in &req.aggregates {
            let mut slot_for =
                |name: &ColumnRef, ty: ColumnType, proj: &mut Vec<ProjItem>| -> usize {
                    if let Some(i) = slot_names.iter().position(|s| s == name) {
                        return i;
                    }
                    let kind = match ty {
                        ColumnType::Int32 | ColumnType::Int64 => SlotKind::Int,
                        ColumnType::Float64 => SlotKind::Float,
                        _ => SlotKind::NullOnly,
                    };
                    let p = proj_index(name, proj);
                    slot_names.push(name.clone());
                    slots.push(ValueSlot { ty, kind, proj: p });
                    slots.len() - 1
                };
            match a {
                AggregateRequest::CountRows => aggs.push(AggPlan::CountRows),
                AggregateRequest::CountUnits => aggs.push(AggPlan::CountUnits),
                AggregateRequest::CountNonNull { column: name } => {
                    let c = column(name, "COUNT")?;
                    let slot = slot_for(name, c.ty, &mut proj);
                    aggs.push(AggPlan::CountNonNull { slot });
                }
                AggregateRequest::SumFixed {
                    column: name,
                    lower,
                    upper,
                    precision,
                }
                | AggregateRequest::SumSquaresFixed {
                    column: name,
                    lower,
                    upper,
                    precision,
                }
                | AggregateRequest::QuantileHistogram {
                    column: name,
                    lower,
                    upper,
                    precision,
                    ..
                } => {
                    // Sums of squares and percentile histograms are validated exactly like
                    // sums (squares with a tighter step limit so that they cannot overflow).
                    let squares = matches!(a, AggregateRequest::SumSquaresFixed { .. });
                    let max_steps = if squares {
                        fedq_common::wire::MAX_SQUARES_STEPS
                    } else {
                        MAX_FIXED_STEPS
                    };
                    let c = column(name, "SUM")?;
                    let (lower, upper, precision) = (*lower, *upper, *precision);
                    if !c.ty.is_numeric() {
                        return Err(invalid(format!(
                            "cannot sum {} of type {}: only numeric columns can be summed",
                            shown(&name.to_string()),
                            c.ty
                        )));
                    }
                    let Some(b) = c.bounds() else {
                        return Err(refused(format!(
                            "cannot sum {}: the catalog declares no clamp bounds (lower, upper, precision) for it",
                            shown(&name.to_string())
                        )));
                    };
                    if !(lower.is_finite() && upper.is_finite()) || lower >= upper {
                        return Err(invalid(format!(
                            "SUM({}) needs finite bounds with lower < upper, got [{lower}, {upper}]",
                            shown(&name.to_string())
                        )));
                    }
                    if !(precision.is_finite() && precision > 0.0) {
                        return Err(invalid(format!(
                            "SUM({}) needs a positive precision, got {precision}",
                            shown(&name.to_string())
                        )));
                    }
                    if lower < b.lower || upper > b.upper {
                        return Err(refused(format!(
                            "SUM({}) bounds [{lower}, {upper}] are wider than the catalog's [{}, {}]",
                            shown(&name.to_string()),
                            b.lower,
                            b.upper
                        )));
                    }
                    let rel = scope.relation(name.side)?;
                    if let Some(&(lo, hi)) = rel.policy.clamp.get(&name.name) {
                        if lower < lo || upper > hi {
                            return Err(refused(format!(
                                "SUM({}) bounds [{lower}, {upper}] are wider than this node accepts, [{lo}, {hi}] (its node policy: [tables.{}.clamp] in node.toml)",
                                shown(&name.to_string()),
                                rel.name
                            )));
                        }
                    }
                    if precision < b.precision {
                        return Err(refused(format!(
                            "SUM({}) precision {precision} is finer than the catalog's {}",
                            shown(&name.to_string()),
                            b.precision
                        )));
                    }
                    let steps = lower.abs().max(upper.abs()) / precision;
                    if steps.is_nan() || steps > max_steps {
                        return Err(invalid(format!(
                            "SUM({}): bounds/precision = {steps:e} steps exceeds the limit of {max_steps:e}",
                            shown(&name.to_string())
                        )));
                    }
                    let lo_fp = (lower / precision).ceil();
                    let hi_fp = (upper / precision).floor();
                    if lo_fp > hi_fp {
                        return Err(invalid(format!(
                            "SUM({}): precision {precision} is coarser than the bounds [{lower}, {upper}]",
                            shown(&name.to_string())
                        )));
                    }
                    let slot = slot_for(name, c.ty, &mut proj);
                    if let AggregateRequest::QuantileHistogram { candidates, .. } = a {
                        // The grid must be strictly increasing within the bounds, and the
                        // histograms of all groups must fit the cell limit.
                        let grid = QuantileGrid::new(lo_fp as i128, hi_fp as i128, *candidates)
                            .map_err(|e| {
                                invalid(format!(
                                    "percentile histogram of {}: {e}",
                                    shown(&name.to_string())
                                ))
                            })?;
                        histogram_cells = histogram_cells
                            .saturating_add(grid.bins().saturating_mul(n_groups.max(1)));
                        if histogram_cells > MAX_HISTOGRAM_CELLS {
                            return Err(invalid(format!(
                                "percentile histograms need more than {MAX_HISTOGRAM_CELLS} cells \
                                 (bins × groups); ask for fewer candidates or fewer groups"
                            )));
                        }
                        aggs.push(AggPlan::Histogram {
                            slot,
                            precision,
                            lo_fp,
                            hi_fp,
                            grid,
                            offset: 0,
                        });
                        continue;
                    }
                    aggs.push(if squares {
                        AggPlan::SumSquaresFixed {
                            slot,
                            precision,
                            lo_fp,
                            hi_fp,
                            mid_fp: fedq_common::wire::fixed_midpoint(lower, upper, precision),
                        }
                    } else {
                        AggPlan::SumFixed {
                            slot,
                            precision,
                            lo_fp,
                            hi_fp,
                        }
                    });
                }
            }
        }
        if slots.len() > 64 {
            return Err(invalid("too many distinct aggregate columns".into()));
        }

        // Filter: only the request's. Rows with a NULL participant, or a group key that is
        // NULL or outside its public domain, are dropped by the bounder before they count
        // towards R (see `bounding`), which is cheaper than a filter kernel here.
        let predicate = match &req.filter {
            Some(f) => Some(filter::translate(f, &scope)?),
            None => None,
        };
        let mut proj_exprs = proj
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let e = match item {
                    ProjItem::Col(c) => scope.column(c.side, &c.name, "the projection")?.0,
                    // Bucketed keys are computed, so they need a name in any case.
                    ProjItem::Key(e) => return Ok(e.clone().alias(selection::proj_name(i))),
                };
                // Joined columns are qualified by side; name them by position so that equal
                // names on both sides cannot clash (the bounder reads by position). Open
                // group keys are bounded by name (`selection`), so they need it too, and
                // computed columns have no name of their own.
                let computed = matches!(item, ProjItem::Col(c) if c.side.is_left() && scope.computed.iter().any(|k| k.name == c.name));
                Ok(if scope.is_join() || max_groups.is_some() || computed {
                    e.alias(selection::proj_name(i))
                } else {
                    e
                })
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        // The participant id is read only to tell participants apart. When the caller has
        // the owners of the file's rows, read each row's position instead: the Parquet
        // reader makes it up without decoding anything, and the id column is the widest
        // one the bounder reads. Not with a join or open keys (their plans need the id),
        // nor when the id is also a group key or an aggregate input.
        let pid_rows = by_position
            && req.joins.is_empty()
            && req.derived.is_none()
            && set_cols.is_empty()
            && max_groups.is_none()
            && groups.iter().all(|g| g.proj != 0)
            && slots.iter().all(|s| s.proj != 0);
        if pid_rows {
            proj_exprs[0] = file_row_index().alias("row");
        }

        let plan_err = |e: datafusion::error::DataFusionError| {
            tracing::info!(
                query_id = ?req.query_id,
                table = %tname,
                error = %e,
                "refused: filter could not be planned"
            );
            invalid(
                "the filter could not be planned; check that its operands have compatible types"
                    .into(),
            )
        };
        let mut df = match &req.derived {
            Some(d) => crate::derived::frame(self, d, &mut set_names)?,
            None => table.df.clone(),
        };
        if !req.joins.is_empty() {
            // Each joined relation: the table's rows, or its derived table built here.
            let rights = req
                .joins
                .iter()
                .zip(&joined_tables)
                .map(|(j, rt)| match &j.derived {
                    Some(d) => crate::derived::frame(self, d, &mut set_names),
                    None => Ok(rt.df.clone()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            df = join_all(df, req, rights, &scope)?;
        }
        if !set_cols.is_empty() {
            let unit = scope
                .column(Side::LEFT, &spec.privacy_unit, "the participant subqueries")?
                .0;
            df = sets::attach(self, df, unit, &set_cols, &mut set_names)?;
        }
        if let Some(predicate) = predicate {
            df = df.filter(predicate).map_err(plan_err)?;
        }
        let n_cols = proj_exprs.len();
        let df = df.select(proj_exprs).map_err(plan_err)?;
        let (state, logical) = df.clone().into_parts();
        let logical = state.optimize(&logical).map_err(plan_err)?;
        let selection = max_groups.map(|g| {
            (
                Selection {
                    keys: open_keys,
                    max_groups: g,
                },
                df,
                n_cols,
            )
        });

        Ok(Prepared {
            plan: BoundingPlan {
                max_rows: req.max_rows_per_unit as usize,
                pid_proj: 0,
                pid_rows,
                groups,
                slots,
                aggs,
            },
            state: Arc::new(state),
            logical,
            table,
            selection,
            physical: PhysicalSlot::default(),
        })
    }
}

/// The query id's own limits (it is not part of a request's shape, see
/// [`crate::plan_cache`]).
fn check_query_id(req: &PartialAggregateRequest) -> Result<(), NodeError> {
    if req.query_id.is_empty()
        || req.query_id.chars().count() > MAX_QUERY_ID_CHARS
        || req.query_id.chars().any(char::is_control)
    {
        return Err(NodeError::InvalidRequest(format!(
            "query_id must be 1 to {MAX_QUERY_ID_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

/// Every table a request reads: its own, the joined ones and those of its participant
/// subqueries (a derived table reads the request's own table).
fn tables_read(req: &PartialAggregateRequest) -> BTreeSet<&str> {
    let mut out = BTreeSet::from([req.table.as_str()]);
    out.extend(req.joins.iter().map(|j| j.table.as_str()));
    for s in req.participant_sets() {
        out.extend(s.tables());
    }
    out
}

/// The driving frame `df` joined with each of the request's tables in turn, all in
/// DataFusion: an equi-join of the table's privacy unit with the driving table's (NULL ids
/// never match), inner or left with the join's own `ON` condition, under the aliases of
/// [`side_alias`]. The filter, which may read every side, comes after; bounding to R rows
/// per participant after that, in the bounder.
fn join_all(
    df: DataFrame,
    req: &PartialAggregateRequest,
    rights: Vec<DataFrame>,
    scope: &Scope<'_>,
) -> Result<DataFrame, NodeError> {
    let invalid = NodeError::InvalidRequest;
    let join_err = |e: datafusion::error::DataFusionError| {
        tracing::warn!(query_id = ?req.query_id, error = %e, "join could not be planned");
        invalid("the join could not be planned".into())
    };
    let driving = side_alias(Side::LEFT);
    let mut df = df.alias(&driving).map_err(join_err)?;
    for (k, (j, right)) in req.joins.iter().zip(rights).enumerate() {
        let alias = side_alias(Side::joined(k));
        let right = right.alias(alias.as_str()).map_err(join_err)?;
        let mut on = vec![
            Expr::Column(Column::new(Some(driving.as_str()), j.left_on.as_str()))
                .eq(Expr::Column(Column::new(Some(alias), j.right_on.as_str()))),
        ];
        if let Some(extra) = &j.on {
            if extra.reads_side_where(&|s| s.0 as usize > k + 1) {
                return Err(invalid(format!(
                    "the ON condition of joined table {} reads a table joined after it",
                    k + 1
                )));
            }
            if !extra.participant_sets().is_empty() {
                return Err(invalid(
                    "a join's ON condition cannot test participant sets; test them in the filter"
                        .into(),
                ));
            }
            on.push(filter::translate(extra, scope)?);
        }
        let kind = match j.kind {
            fedq_common::JoinKind::Inner => JoinType::Inner,
            fedq_common::JoinKind::Left => JoinType::Left,
        };
        df = df.join_on(right, kind, on).map_err(join_err)?;
    }
    Ok(df)
}

#[cfg(test)]
impl NodeEngine {
    /// For tests: whether `table` is one file, whether its counts know its rows' owners,
    /// and how many participants they counted.
    pub(crate) fn counted(&self, table: &str) -> (bool, bool, usize) {
        let t = &self.tables[table];
        let c = t.counts.read().unwrap();
        (
            t.file.is_some(),
            c.counts.owners().is_some() && c.stamp.is_some(),
            c.counts.participants(),
        )
    }

    /// For tests: the memory bound of the worst query over the served tables.
    pub(crate) fn worst_query_bytes(&self) -> u64 {
        self.worst_query().map_or(0, |b| b.bytes())
    }

    /// For tests: whether `req` would read row positions instead of participant ids.
    pub(crate) fn plans_by_position(&self, req: &PartialAggregateRequest) -> bool {
        self.prepare(req, true, true).unwrap().plan.pid_rows
    }
}

/// How many times the in-memory size of the tables a query reads bounds the memory the
/// query holds (besides its accumulators, [`ACCUMULATOR_BYTES`]). A query holds at most:
///
/// 1. the build side of a join: the projected columns of one table, at most that table
///    (1×), and its hash table, a hash and a link per row (16 bytes, no more than the
///    participant id's 16-byte view or CSV text already counted per row: ≤ 1×);
/// 2. the bounder's state: the participant index (each id once: ≤ the id column) and the
///    reservoirs, at most R rows per participant of the rows it reads, each a group number,
///    a null mask and one 8-byte value per input column — no wider than the Arrow values
///    it read plus 12 bytes a row (≤ 1×);
/// 3. with partition selection, the rows per (participant, group), their ranks and the
///    kept pairs, each at most one row per input row of the key and id columns (≤ 1×);
///
/// plus one batch in flight per operator. 4 × (the two largest tables) covers 1–3 together.
/// The factor is an estimate of DataFusion's and the bounder's own overheads, not a proof;
/// what makes a query's outcome independent of its data is that no query is stopped on
/// memory at all (its pool never refuses), and this start-up check only keeps the worst
/// case within what the operator allowed. Not covered: a joined participant with a rows on
/// one side and b on the other can keep up to min(R, a·b) joined rows, more than a + b
/// when R is large; and with partition selection, one accumulator row (every requested
/// aggregate, and every percentile histogram's bins) per observed group, which is at most
/// one per row read.
pub(crate) const WORST_CASE_FACTOR: u64 = 4;

/// Bytes of the largest accumulators any request can ask for with public group keys: at
/// most [`MAX_GROUPS`] groups × [`MAX_AGGREGATES`] `i128` cells, plus
/// [`MAX_HISTOGRAM_CELLS`] histogram bins, plus a map entry per group (64 bytes).
pub(crate) const ACCUMULATOR_BYTES: u64 =
    ((MAX_GROUPS * MAX_AGGREGATES + MAX_HISTOGRAM_CELLS) * 16 + MAX_GROUPS * 64) as u64;

/// The worst case of one query's memory over a pair of tables (or one table): what no
/// query over them can exceed, from the tables' estimated sizes and public constants only.
#[derive(Debug, Clone)]
struct MemoryBound {
    /// The table the bound is for (the largest), with its estimated bytes.
    largest: (String, u64),
    /// The largest other table it can be joined with, if any.
    other: Option<(String, u64)>,
}

impl MemoryBound {
    /// [`WORST_CASE_FACTOR`] × (both tables) + [`ACCUMULATOR_BYTES`].
    fn bytes(&self) -> u64 {
        let tables = self
            .largest
            .1
            .saturating_add(self.other.as_ref().map_or(0, |o| o.1));
        WORST_CASE_FACTOR
            .saturating_mul(tables)
            .saturating_add(ACCUMULATOR_BYTES)
    }

    /// What the operator reads when the bound exceeds `limit` bytes: the table(s), the
    /// estimate and the fix.
    fn refusal(&self, limit: usize) -> String {
        let mib = |b: u64| b.div_ceil(1024 * 1024);
        let (name, bytes) = &self.largest;
        let pair = match &self.other {
            Some((o, ob)) => format!(
                "table `{name}` (about {} MiB in memory) joined with table `{o}` (about {} MiB)",
                mib(*bytes),
                mib(*ob)
            ),
            None => format!("table `{name}` (about {} MiB in memory)", mib(*bytes)),
        };
        format!(
            "{pair} can need up to {} MiB for one query ({WORST_CASE_FACTOR} × the tables + {} MiB of accumulators), more than max_query_memory_mb = {}; a query is never stopped at the limit (that would make its outcome depend on the data), so the node must allow the worst case: raise max_query_memory_mb to at least {} in the node config, or serve smaller tables",
            mib(self.bytes()),
            mib(ACCUMULATOR_BYTES),
            limit.div_ceil(1024 * 1024),
            mib(self.bytes())
        )
    }
}

/// Estimated bytes of a table's catalog columns once read into Arrow arrays. Parquet: from
/// each file's footer, per row group and catalog column, the larger of the column chunk's
/// uncompressed size and its rows × the type's width (dictionary and run-length encodings
/// are smaller on disk than in memory), plus for text the 16-byte `Utf8View` view of each
/// row on top of the string bytes, plus a validity bit per row. CSV: the files' size (the
/// text holds every value). Reads no row.
fn table_bytes(name: &str, spec: &TableSpec, source: &TableSource) -> Result<u64, NodeError> {
    let files = data_files(name, source)?;
    let err = |f: &Path, m: String| NodeError::DataFile {
        table: name.to_string(),
        path: f.display().to_string(),
        message: m,
    };
    let mut total: u64 = 0;
    for f in &files {
        match source.format {
            TableFormat::Csv => {
                let len = std::fs::metadata(f)
                    .map_err(|e| err(f, e.to_string()))?
                    .len();
                total = total.saturating_add(len);
            }
            TableFormat::Parquet => {
                let file = std::fs::File::open(f).map_err(|e| err(f, e.to_string()))?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| err(f, format!("not a readable Parquet file: {e}")))?;
                for rg in builder.metadata().row_groups() {
                    let rows = rg.num_rows().max(0) as u64;
                    for c in &spec.columns {
                        let on_disk: u64 = rg
                            .columns()
                            .iter()
                            .filter(|cc| cc.column_path().parts().first() == Some(&c.name))
                            .map(|cc| cc.uncompressed_size().max(0) as u64)
                            .sum();
                        let in_memory = match c.ty {
                            ColumnType::Utf8 => on_disk.saturating_add(16 * rows),
                            ColumnType::Boolean => on_disk.max(rows.div_ceil(8)),
                            ColumnType::Int32 | ColumnType::Date32 => on_disk.max(4 * rows),
                            ColumnType::Int64 | ColumnType::Float64 => on_disk.max(8 * rows),
                        };
                        total = total
                            .saturating_add(in_memory)
                            .saturating_add(rows.div_ceil(8));
                    }
                }
            }
        }
    }
    Ok(total)
}

/// Whether an operator other than the scan itself evaluates `file_row_index()`, which only
/// the Parquet scan can produce.
fn row_index_outside_scan(plan: &dyn datafusion::physical_plan::ExecutionPlan) -> bool {
    if plan.name() != "DataSourceExec" {
        let line = datafusion::physical_plan::displayable(plan)
            .one_line()
            .to_string();
        if line.contains("file_row_index") {
            return true;
        }
    }
    plan.children()
        .into_iter()
        .any(|c| row_index_outside_scan(c.as_ref()))
}

/// A response as batches of at most [`MAX_GROUPS`] rows each (one batch, possibly empty,
/// when it has fewer), each with the response's schema and metadata. Only partition
/// selection can observe more groups than that; the coordinator merges every batch.
fn in_batches(out: RecordBatch) -> Vec<RecordBatch> {
    let n = out.num_rows();
    if n <= MAX_GROUPS {
        return vec![out];
    }
    (0..n)
        .step_by(MAX_GROUPS)
        .map(|off| out.slice(off, MAX_GROUPS.min(n - off)))
        .collect()
}

/// Count rows per participant over the whole table (no filter), streaming only the
/// privacy-unit column. For a table that is one Parquet `file`, also note which rows each
/// participant owns ([`ParticipantCounts::seal`]) and the file's stamp, if it did not change
/// while it was read.
async fn count_participants(
    df: &DataFrame,
    spec: &TableSpec,
    file: Option<&Path>,
) -> Result<Counted, datafusion::error::DataFusionError> {
    let before = file.and_then(FileStamp::of);
    let mut cols = vec![ident(spec.privacy_unit.clone())];
    if before.is_some() {
        cols.push(file_row_index().alias("row"));
    }
    let mut stream = df.clone().select(cols)?.execute_stream().await?;
    let mut counts = ParticipantCounts::default();
    let mut rows = 0u64;
    let bound_err =
        |e: crate::bounding::BoundError| datafusion::error::DataFusionError::Execution(e.0);
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        if before.is_some() {
            counts
                .add_at(batch.column(0), batch.column(1))
                .map_err(bound_err)?;
        } else {
            counts.add(batch.column(0)).map_err(bound_err)?;
        }
    }
    let stamp = match (before, file.and_then(FileStamp::of)) {
        (Some(b), Some(a)) if a == b && counts.seal(rows) => Some(b),
        _ => None,
    };
    Ok(Counted {
        counts: Arc::new(counts),
        stamp,
    })
}

/// The files that make up a table: the file itself, or the directory's files with the
/// format's extension.
fn data_files(name: &str, source: &TableSource) -> Result<Vec<PathBuf>, NodeError> {
    let path = &source.path;
    if !path.exists() {
        return Err(NodeError::MissingFile {
            table: name.to_string(),
            path: path.display().to_string(),
        });
    }
    if !path.is_dir() {
        return Ok(vec![path.clone()]);
    }
    let ext = source.format.extension();
    let read_err = |e: std::io::Error| NodeError::DataFile {
        table: name.to_string(),
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        if p.is_file() && p.to_string_lossy().ends_with(ext) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(NodeError::DataFile {
            table: name.to_string(),
            path: path.display().to_string(),
            message: format!(
                "the directory has no {ext} files; fix `path` or `format` in [tables.{name}]"
            ),
        });
    }
    Ok(files)
}

fn fix_hint() -> &'static str {
    "convert the column or ask the privacy officer to fix the catalog"
}

/// Check a file schema against the catalog: every catalog column present with exactly the
/// catalog type.
fn check_schema(file: &Path, found: &Schema, spec: &TableSpec) -> Result<(), NodeError> {
    for c in &spec.columns {
        let want = c.ty.arrow_type();
        match found.field_with_name(&c.name) {
            Err(_) => {
                return Err(NodeError::SchemaMismatch(format!(
                    "{}: column `{}` is missing, the catalog declares it as {}; add it to the file or ask the privacy officer to fix the catalog",
                    file.display(),
                    c.name,
                    c.ty
                )))
            }
            Ok(f) if f.data_type() != &want => {
                return Err(NodeError::SchemaMismatch(format!(
                    "{}: column `{}` is {}, the catalog declares {}; {}",
                    file.display(),
                    c.name,
                    f.data_type(),
                    c.ty,
                    fix_hint()
                )))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

fn parquet_schema(table: &str, file: &Path) -> Result<Schema, NodeError> {
    let err = |m: String| NodeError::DataFile {
        table: table.to_string(),
        path: file.display().to_string(),
        message: m,
    };
    let f = std::fs::File::open(file).map_err(|e| err(e.to_string()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
    Ok(builder.schema().as_ref().clone())
}

/// Header names of a CSV file.
fn csv_header(table: &str, file: &Path) -> Result<Vec<String>, NodeError> {
    let err = |m: String| NodeError::DataFile {
        table: table.to_string(),
        path: file.display().to_string(),
        message: m,
    };
    let f = std::fs::File::open(file).map_err(|e| err(e.to_string()))?;
    let (schema, _) = arrow::csv::reader::Format::default()
        .with_header(true)
        .infer_schema(f, Some(0))
        .map_err(|e| err(format!("cannot read the CSV header: {e}")))?;
    Ok(schema.fields().iter().map(|f| f.name().clone()).collect())
}

/// The catalog schema with text as Utf8View, for reading Parquet.
fn scan_schema(spec: &TableSpec) -> Schema {
    Schema::new(
        spec.columns
            .iter()
            .map(|c| {
                let ty = match c.ty.arrow_type() {
                    DataType::Utf8 => DataType::Utf8View,
                    other => other,
                };
                Field::new(&c.name, ty, true)
            })
            .collect::<Vec<_>>(),
    )
}

async fn load_table(
    ctx: &SessionContext,
    name: &str,
    spec: &TableSpec,
    source: &TableSource,
) -> Result<DataFrame, NodeError> {
    let files = data_files(name, source)?;
    let path_str = source.path.to_str().ok_or_else(|| NodeError::DataFile {
        table: name.to_string(),
        path: source.path.display().to_string(),
        message: "the path is not valid UTF-8; rename it".into(),
    })?;
    // A single file is read whatever its extension; a directory by extension.
    let ext = if source.path.is_dir() {
        source.format.extension()
    } else {
        ""
    };
    let read_err = |e: datafusion::error::DataFusionError| NodeError::DataFile {
        table: name.to_string(),
        path: source.path.display().to_string(),
        message: e.to_string(),
    };
    let df = match source.format {
        TableFormat::Parquet => {
            for f in &files {
                check_schema(f, &parquet_schema(name, f)?, spec)?;
            }
            // Text is read as Utf8View: decoding Parquet strings into views copies no bytes
            // for short strings (such as participant ids), and the bounder compares views.
            let schema = scan_schema(spec);
            let opts = ParquetReadOptions {
                file_extension: ext,
                schema: Some(&schema),
                ..Default::default()
            };
            ctx.read_parquet(path_str, opts).await.map_err(read_err)?
        }
        TableFormat::Csv => {
            // CSV columns are read by position, so every file must have the same header.
            let Some((first, rest)) = files.split_first() else {
                return Err(NodeError::MissingFile {
                    table: name.to_string(),
                    path: source.path.display().to_string(),
                });
            };
            let header = csv_header(name, first)?;
            for f in rest {
                if csv_header(name, f)? != header {
                    return Err(NodeError::SchemaMismatch(format!(
                        "{}: the header differs from that of {}; all CSV files of table `{name}` must have the same columns in the same order",
                        f.display(),
                        first.display()
                    )));
                }
            }
            let mut fields = Vec::with_capacity(header.len());
            let mut seen = BTreeSet::new();
            for h in &header {
                if !seen.insert(h.as_str()) {
                    return Err(NodeError::SchemaMismatch(format!(
                        "{}: the header names column `{h}` twice",
                        first.display()
                    )));
                }
                let ty = spec.column(h).map_or(DataType::Utf8, |c| c.ty.arrow_type());
                fields.push(Field::new(h, ty, true));
            }
            let file_schema = Schema::new(fields);
            check_schema(first, &file_schema, spec)?;
            let opts = CsvReadOptions::new()
                .has_header(true)
                .schema(&file_schema)
                .file_extension(ext);
            ctx.read_csv(path_str, opts).await.map_err(read_err)?
        }
    };
    // Register only the catalog columns.
    let df = df
        .select(spec.columns.iter().map(|c| ident(c.name.clone())))
        .map_err(read_err)?;
    if source.format == TableFormat::Csv {
        // CSV values are parsed while a query runs, so a value that does not parse as its
        // catalog type would make some queries fail depending on the data. Read every
        // value once now and refuse to serve the table instead.
        let bad = |e: datafusion::error::DataFusionError| {
            NodeError::SchemaMismatch(format!(
                "{}: a value cannot be read as its catalog type ({e}); fix the file or ask the privacy officer to fix the catalog",
                source.path.display()
            ))
        };
        let mut stream = df.clone().execute_stream().await.map_err(bad)?;
        while let Some(batch) = stream.next().await {
            batch.map_err(bad)?;
        }
    }
    Ok(df)
}

// The engine is shared between server tasks.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<NodeEngine>();
};
