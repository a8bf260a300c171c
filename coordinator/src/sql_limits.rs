//! Limits on the SQL text, checked before any recursive pass over it.
//!
//! Parsing, planning and every later walk of an expression recurse on its depth. A chain of
//! a few thousand `OR`s or `+`s is parsed by a loop but builds a tree thousands of levels
//! deep, and the first recursive walk over it overflowed a worker thread's stack and
//! aborted the whole coordinator, for every researcher. So the text is first tokenized
//! (a loop, no recursion) and refused, with the limit named, when it is too long, nests
//! parentheses too deeply, or has too many operators (each binary or unary operator and each
//! `AND`, `OR`, `NOT`, `CASE`, … can add one level to an expression tree), or too many
//! `SELECT`s (each subquery or CTE adds a level to the plan). Within these
//! limits every tree is at most about [`MAX_SQL_OPERATORS`] + [`MAX_SQL_NESTING`] levels
//! deep, which the planner handles on a 2 MiB stack in a debug build (tested).

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::CoordinatorError;

/// Longest SQL text accepted, in bytes.
pub const MAX_SQL_BYTES: usize = 256 * 1024;

/// Most operators (`+ - * / % || = <> < > <= >=`, `AND`, `OR`, `NOT`, `IS`, `LIKE`,
/// `ILIKE`, `BETWEEN`, `IN`, `CASE`, `WHEN`, …) in one statement.
pub const MAX_SQL_OPERATORS: usize = 250;

/// Deepest nesting of parentheses.
pub const MAX_SQL_NESTING: usize = 40;

/// Most `SELECT`s (the query, its subqueries and CTEs) in one statement. A chain of CTEs,
/// each reading the one before, nests the plan one level per CTE without any parentheses,
/// and a chain of 100 overflowed a worker thread's stack in planning.
pub const MAX_SQL_SELECTS: usize = 24;

fn refuse(m: String) -> CoordinatorError {
    CoordinatorError::Refused(m)
}

/// Whether a token can add a level to an expression tree.
fn is_operator(t: &Token) -> bool {
    match t {
        Token::Word(w) => matches!(
            w.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::XOR
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::BETWEEN
                | Keyword::IN
                | Keyword::CASE
                | Keyword::WHEN
                | Keyword::COLLATE
                | Keyword::AT
        ),
        Token::Whitespace(_)
        | Token::Number(..)
        | Token::Char(_)
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::NationalStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::Comma
        | Token::Period
        | Token::SemiColon
        | Token::LParen
        | Token::RParen
        | Token::EOF => false,
        _ => true,
    }
}

/// Refuse `sql` if it is longer than [`MAX_SQL_BYTES`], nests parentheses deeper than
/// [`MAX_SQL_NESTING`] or has more than [`MAX_SQL_OPERATORS`] operators. Never recurses.
pub fn check(sql: &str) -> Result<(), CoordinatorError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(refuse(format!(
            "the query is {} bytes long; the limit is {MAX_SQL_BYTES}. Shorten it: a long list of values is an IN list, \
             a long OR of conditions on one column is `col IN (...)`",
            sql.len()
        )));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| CoordinatorError::InvalidSql(format!("the query cannot be read: {e}")))?;
    let (mut depth, mut deepest, mut operators, mut selects) = (0usize, 0usize, 0usize, 0usize);
    for t in &tokens {
        match t {
            Token::LParen => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            Token::RParen => depth = depth.saturating_sub(1),
            Token::Word(w) if w.keyword == Keyword::SELECT => selects += 1,
            t if is_operator(t) => operators += 1,
            _ => {}
        }
    }
    if selects > MAX_SQL_SELECTS {
        return Err(refuse(format!(
            "the query has {selects} SELECTs (the query, its subqueries and CTEs); the limit is {MAX_SQL_SELECTS}. \
             Use fewer steps: one CTE may compute several columns, and conditions on one table go in one subquery"
        )));
    }
    if deepest > MAX_SQL_NESTING {
        return Err(refuse(format!(
            "the query nests parentheses {deepest} deep; the limit is {MAX_SQL_NESTING}. \
             Flatten it: conditions joined by AND or OR need no parentheses of their own, and a CTE (WITH) names a subquery"
        )));
    }
    if operators > MAX_SQL_OPERATORS {
        return Err(refuse(format!(
            "the query has {operators} operators (+, -, =, AND, OR, CASE, ...); the limit is {MAX_SQL_OPERATORS}. \
             Shorten it: `code = 'A' OR code = 'B' OR ...` is `code IN ('A', 'B', ...)`, and a long CASE on one \
             column is often a bucket (`birth_year / 10`)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn or_chain(n: usize) -> String {
        let terms: Vec<String> = (0..n).map(|i| format!("birth_year = {i}")).collect();
        format!(
            "SELECT COUNT(*) FROM participants WHERE {}",
            terms.join(" OR ")
        )
    }

    #[test]
    fn long_chains_deep_nesting_and_huge_texts_are_refused_with_the_limit() {
        // n terms have 2n - 1 operators (n `=` and n - 1 `OR`).
        assert!(check(&or_chain(MAX_SQL_OPERATORS / 2)).is_ok());
        let e = check(&or_chain(MAX_SQL_OPERATORS / 2 + 1)).unwrap_err();
        assert!(e.to_string().contains("the limit is 250"), "{e}");
        assert!(e.to_string().contains("IN ("), "{e}");
        let deep = format!(
            "SELECT COUNT(*) FROM participants WHERE {}birth_year = 1{}",
            "(".repeat(MAX_SQL_NESTING + 1),
            ")".repeat(MAX_SQL_NESTING + 1)
        );
        let e = check(&deep).unwrap_err();
        assert!(e.to_string().contains("nests parentheses 41 deep"), "{e}");
        let minus = format!("SELECT {}1", "- ".repeat(100_000));
        assert!(check(&minus).is_err());
        let huge = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES));
        assert!(check(&huge).unwrap_err().to_string().contains("bytes long"));
        // Values, identifiers and commas are free: a long IN list is fine.
        let list: Vec<String> = (0..2_000).map(|i| format!("'c{i}'")).collect();
        let sql = format!(
            "SELECT COUNT(*) FROM diagnoses WHERE code IN ({})",
            list.join(", ")
        );
        assert!(check(&sql).is_ok());
        // A chain of CTEs, each reading the last, nests without parentheses.
        let chain = |n: usize| {
            let steps: Vec<String> = (1..n)
                .map(|i| format!("c{i} AS (SELECT pid, x FROM c{})", i - 1))
                .collect();
            format!(
                "WITH c0 AS (SELECT pid, birth_year AS x FROM participants), {} SELECT COUNT(*) FROM c{}",
                steps.join(", "),
                n - 1
            )
        };
        assert!(check(&chain(MAX_SQL_SELECTS - 1)).is_ok());
        let e = check(&chain(MAX_SQL_SELECTS)).unwrap_err();
        assert!(e.to_string().contains("25 SELECTs"), "{e}");
    }
}
