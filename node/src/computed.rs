//! Computed columns of a request ([`fedq_common::computed::Computed`]): validated, declared
//! from the catalog narrowed by this node's policy, and translated to DataFusion
//! expressions that its aggregates read like columns.

use datafusion::logical_expr::try_cast;
use fedq_common::computed::MAX_COMPUTED;
use fedq_common::wire::{MAX_EXPR_DEPTH, MAX_EXPR_NODES};
use fedq_common::{ColumnSpec, PartialAggregateRequest, Side};

use crate::engine::shown;
use crate::error::NodeError;
use crate::filter::{ComputedColumn, Scope};

/// Longest name of a computed column.
const MAX_NAME_CHARS: usize = 64;

/// The request's computed columns over `scope` (which has none yet).
pub(crate) fn columns(
    req: &PartialAggregateRequest,
    scope: &Scope<'_>,
) -> Result<Vec<ComputedColumn>, NodeError> {
    let invalid = |m: String| NodeError::InvalidRequest(m);
    if req.computed.is_empty() {
        return Ok(Vec::new());
    }
    if req.computed.len() > MAX_COMPUTED {
        return Err(invalid(format!(
            "{} computed columns; the limit is {MAX_COMPUTED}",
            req.computed.len()
        )));
    }
    // The columns as this node declares them: the catalog's, with the node's own clamps,
    // so that an expression of a column is bounded as tightly as the column itself.
    let narrowed = |side: Side| -> Vec<ColumnSpec> {
        let Ok(rel) = scope.relation(side) else {
            return Vec::new();
        };
        rel.spec
            .columns
            .iter()
            .map(|c| {
                let mut c = c.clone();
                if let Some(&(lo, hi)) = rel.policy.clamp.get(&c.name) {
                    c.lower = Some(c.lower.map_or(lo, |l| l.max(lo)));
                    c.upper = Some(c.upper.map_or(hi, |u| u.min(hi)));
                }
                c
            })
            .collect()
    };
    let sides: Vec<Vec<ColumnSpec>> = (0..=scope.joined.len())
        .map(|k| narrowed(Side(k as u8)))
        .collect();
    let lookup = |side: Side, name: &str| -> Option<&ColumnSpec> {
        sides
            .get(side.0 as usize)
            .and_then(|cols| cols.iter().find(|c| c.name == name))
    };
    let mut out: Vec<ComputedColumn> = Vec::with_capacity(req.computed.len());
    for c in &req.computed {
        let name_ok = !c.name.is_empty()
            && c.name.chars().count() <= MAX_NAME_CHARS
            && c.name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !name_ok {
            return Err(invalid(format!(
                "computed column names are 1 to {MAX_NAME_CHARS} letters, digits or underscores, not {}",
                shown(&c.name)
            )));
        }
        let clashes = sides.iter().flatten().any(|s| s.name == c.name)
            || out.iter().any(|o| o.name == c.name);
        if clashes {
            return Err(invalid(format!(
                "computed column {} has the name of another column",
                shown(&c.name)
            )));
        }
        if c.value.depth() > MAX_EXPR_DEPTH || c.value.node_count() > MAX_EXPR_NODES {
            return Err(invalid(format!(
                "computed column {} exceeds the limits ({MAX_EXPR_DEPTH} levels, {MAX_EXPR_NODES} nodes)",
                shown(&c.name)
            )));
        }
        // Translating checks every column (known, shared by this node) and every type.
        let expr = crate::filter::translate_value(&c.value, scope)?;
        let spec = c.spec(&lookup).map_err(|e| {
            NodeError::Refused(format!("computed column {}: {}", shown(&c.name), e.0))
        })?;
        // The declared type exactly (an int32 column gives int64); a cast between numbers
        // of these types cannot fail, and `try_cast` would give NULL rather than fail.
        let expr = try_cast(expr, spec.ty.arrow_type());
        out.push(ComputedColumn {
            name: c.name.clone(),
            expr,
            spec,
        });
    }
    Ok(out)
}
