//! Plans of request shapes seen before, so that a request like an earlier one is neither
//! validated nor optimised again.
//!
//! A request's plan is a function of the request without its query id, of whether rows
//! are read by position, and of the node's catalog, policy and configuration, which do not
//! change while it runs. So a request whose shape was planned before reuses that plan: the
//! bounding plan, the optimised DataFusion logical plan and, with partition selection, the
//! projected rows. Only what can change is checked again on every request: the query id,
//! and whether each table read still fits the memory limit.
//!
//! A plan's DataFusion physical plan is reused too where that is safe: when every operator
//! in it is one that keeps no state between executions (scans, filters, projections,
//! batching), and every table it reads is one Parquet file whose length, modification time
//! and inode are those it had when the plan was made (the plan lists the files and their
//! sizes). Each reuse starts from fresh operator instances
//! (`datafusion::physical_plan::execution_plan::reset_plan_states`), and a plan is made
//! afresh after [`MAX_PHYSICAL_REUSES`] uses, since DataFusion's scan adds its metrics on
//! each execution. Joins, partition selection, derived tables and participant sets are
//! planned afresh on every request.
//!
//! Only plans that passed validation are kept, so a hit is never a refusal. The cache
//! holds at most [`PLAN_CACHE_ENTRIES`] shapes and is emptied when full. Whether a shape
//! was planned before changes only how long planning takes, never what the request
//! returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::dataframe::DataFrame;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::ExecutionPlan;
use fedq_common::PartialAggregateRequest;

use crate::bounding::BoundingPlan;
use crate::engine::FileStamp;
use crate::selection::Selection;

/// Shapes kept at most.
pub(crate) const PLAN_CACHE_ENTRIES: usize = 128;

/// Executions of one kept physical plan before it is made afresh.
pub(crate) const MAX_PHYSICAL_REUSES: usize = 256;

/// DataFusion operators that keep no state from one execution to the next (beyond their
/// metrics), so that a plan made only of them can run again.
const STATELESS_OPERATORS: &[&str] = &[
    "DataSourceExec",
    "FilterExec",
    "ProjectionExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "RepartitionExec",
    "CooperativeExec",
];

/// A physical plan kept for the next requests of its shape.
#[derive(Debug)]
pub(crate) struct KeptPhysical {
    plan: Arc<dyn ExecutionPlan>,
    /// The file of each table read, and its stamp when the plan was made.
    files: Vec<(std::path::PathBuf, Option<FileStamp>)>,
    uses: usize,
}

/// Where a shape's physical plan is kept (shared by every copy of its [`CachedPlan`]).
pub(crate) type PhysicalSlot = Arc<Mutex<Option<KeptPhysical>>>;

/// Whether `plan` may be kept: only operators from [`STATELESS_OPERATORS`].
pub(crate) fn reusable(plan: &dyn ExecutionPlan) -> bool {
    STATELESS_OPERATORS.contains(&plan.name())
        && plan.children().into_iter().all(|c| reusable(c.as_ref()))
}

/// Keep `plan`, which reads `files` (each table's one file), in `slot`.
pub(crate) fn keep(
    slot: &PhysicalSlot,
    plan: &Arc<dyn ExecutionPlan>,
    files: Vec<std::path::PathBuf>,
) {
    let files = files
        .into_iter()
        .map(|f| {
            let stamp = FileStamp::of(&f);
            (f, stamp)
        })
        .collect();
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(KeptPhysical {
        plan: Arc::clone(plan),
        files,
        uses: 0,
    });
}

/// The kept physical plan of `slot`, with fresh operator instances, if its files are
/// unchanged and it has uses left; otherwise the slot is emptied and `None` returned.
pub(crate) fn reuse(slot: &PhysicalSlot) -> Option<Arc<dyn ExecutionPlan>> {
    let mut kept = slot.lock().unwrap_or_else(|p| p.into_inner());
    let k = kept.as_mut()?;
    let fresh = k.uses < MAX_PHYSICAL_REUSES
        && k.files
            .iter()
            .all(|(f, stamp)| stamp.is_some() && FileStamp::of(f) == *stamp);
    let plan = if fresh {
        reset_plan_states(Arc::clone(&k.plan)).ok()
    } else {
        None
    };
    match plan {
        Some(p) => {
            k.uses += 1;
            Some(p)
        }
        None => {
            *kept = None;
            None
        }
    }
}

/// What a plan depends on: the request without its query id, and whether it reads row
/// positions instead of participant ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ShapeKey {
    request: String,
    by_position: bool,
}

impl ShapeKey {
    /// The key of `req`; `None` if it cannot be serialised (then it is not cached).
    pub(crate) fn of(req: &PartialAggregateRequest, by_position: bool) -> Option<ShapeKey> {
        let mut shape = req.clone();
        shape.query_id.clear();
        serde_json::to_string(&shape).ok().map(|request| ShapeKey {
            request,
            by_position,
        })
    }
}

/// A validated request's plan, before any row is read.
#[derive(Debug, Clone)]
pub(crate) struct CachedPlan {
    pub(crate) plan: BoundingPlan,
    pub(crate) state: Arc<SessionState>,
    pub(crate) logical: LogicalPlan,
    pub(crate) selection: Option<(Selection, DataFrame, usize)>,
    /// Its physical plan, once made, if it may be reused.
    pub(crate) physical: PhysicalSlot,
}

/// The plans of recent request shapes.
#[derive(Debug, Default)]
pub(crate) struct PlanCache {
    plans: Mutex<HashMap<ShapeKey, Arc<CachedPlan>>>,
}

impl PlanCache {
    fn plans(&self) -> std::sync::MutexGuard<'_, HashMap<ShapeKey, Arc<CachedPlan>>> {
        // The map is only read and replaced whole under the lock, so a panicking holder
        // cannot leave it half-written.
        self.plans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plan of `key`'s shape, if it was planned before.
    pub(crate) fn get(&self, key: &ShapeKey) -> Option<Arc<CachedPlan>> {
        self.plans().get(key).cloned()
    }

    /// Keep `plan` for `key`'s shape.
    pub(crate) fn insert(&self, key: ShapeKey, plan: CachedPlan) {
        let mut plans = self.plans();
        if plans.len() >= PLAN_CACHE_ENTRIES && !plans.contains_key(&key) {
            plans.clear();
        }
        plans.insert(key, Arc::new(plan));
    }

    /// Shapes held (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.plans().len()
    }
}
