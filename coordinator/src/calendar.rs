//! `year(d)`, `quarter(d)`, `month(d)`, `week(d)`, `day(d)`, `dayofweek(d)`, `isodow(d)`,
//! `dayofyear(d)` and their aliases ([`DATE_FUNCTIONS`]), the DuckDB spellings of
//! `date_part('year', d)` and so on, so that researchers can write them as they would for
//! DuckDB. They exist only to plan SQL: the planner translates each call into a wire
//! `Predicate::DatePart` or `GroupKey::DatePart`, which the nodes evaluate. The coordinator
//! never runs them on data.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{exec_err, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use fedq_common::group_key::{DateField, DATE_FUNCTIONS};

/// One calendar function: a date in, the field as an integer out.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CalendarFunction {
    name: &'static str,
    field: DateField,
    signature: Signature,
}

impl CalendarFunction {
    fn new(name: &'static str, field: DateField) -> CalendarFunction {
        CalendarFunction {
            name,
            field,
            signature: Signature::exact(vec![DataType::Date32], Volatility::Immutable),
        }
    }

    /// The field it extracts.
    pub fn field(&self) -> DateField {
        self.field
    }
}

impl ScalarUDFImpl for CalendarFunction {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!(
            "{}() is evaluated by the nodes; the coordinator only plans it",
            self.name
        )
    }
}

/// The functions, to register in the planner's session.
pub fn functions() -> Vec<ScalarUDF> {
    DATE_FUNCTIONS
        .into_iter()
        .map(|(name, f)| ScalarUDF::new_from_shared_impl(Arc::new(CalendarFunction::new(name, f))))
        .collect()
}

/// The field of a call to `date_part` (with a literal field) or to one of these functions,
/// and the date argument.
pub fn date_part_call(
    f: &datafusion::logical_expr::expr::ScalarFunction,
) -> Option<(Option<DateField>, &datafusion::logical_expr::Expr)> {
    use datafusion::logical_expr::Expr;
    let name = f.name();
    if let Some(field) = DateField::of_function(name) {
        return match f.args.as_slice() {
            [arg] => Some((Some(field), arg)),
            _ => None,
        };
    }
    let parse: fn(&str) -> Option<DateField> = match name {
        "date_part" => DateField::parse,
        "date_trunc" => DateField::parse_trunc,
        _ => return None,
    };
    let [field, arg] = f.args.as_slice() else {
        return None;
    };
    let field = match field {
        Expr::Literal(v, _) => match crate::predicate::literal(v) {
            Ok(fedq_common::Literal::Utf8(s)) => parse(&s),
            _ => None,
        },
        _ => None,
    };
    // DataFusion's `date_trunc` takes a timestamp, so it casts a date argument to one.
    let arg = match arg {
        Expr::Cast(c) if name == "date_trunc" => c.expr.as_ref(),
        other => other,
    };
    Some((field, arg))
}
