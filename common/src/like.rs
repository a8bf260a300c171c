//! `LIKE` / `ILIKE` patterns: the one check both sides run before any row is read.
//!
//! A node evaluates `LIKE` with Arrow's kernel, which compiles the pattern into a regular
//! expression when a batch reaches it, and the regex engine refuses a pattern whose compiled
//! form is over its size limit. Whether a batch reaches the `LIKE` depends on the data (an
//! `AND` skips its right side when no row passes its left side, and `ILIKE` takes a
//! regex-free path when the text is ASCII), so a pattern that does not compile would make a
//! node fail or not depending on one participant's rows. [`check_like_pattern`] closes that:
//! it refuses patterns longer than [`MAX_LIKE_PATTERN_CHARS`] and compiles the pattern
//! exactly as Arrow does, in both the case-sensitive and the case-insensitive form, so a
//! pattern it accepts compiles on every batch, whatever the batch holds. The coordinator
//! calls it at plan time (a refusal that names the limit) and every node calls it in
//! validation.

/// Longest `LIKE` / `ILIKE` pattern accepted, in characters. Every pattern of at most this
/// length compiles within the regex engine's default size limit in both case modes (tested
/// on the worst cases: all `_`, and case-folding non-ASCII letters).
pub const MAX_LIKE_PATTERN_CHARS: usize = 256;

/// Whether `pattern` is a `LIKE` pattern every batch can evaluate: at most
/// [`MAX_LIKE_PATTERN_CHARS`] characters, and its regular expression (the translation Arrow
/// uses) compiles case-sensitively and case-insensitively. The error says what to write
/// instead; it depends on the pattern only.
pub fn check_like_pattern(pattern: &str) -> Result<(), String> {
    let n = pattern.chars().count();
    if n > MAX_LIKE_PATTERN_CHARS {
        return Err(format!(
            "the LIKE pattern has {n} characters, more than the {MAX_LIKE_PATTERN_CHARS} allowed; shorten it, or split it into several LIKEs joined by AND/OR"
        ));
    }
    for case_insensitive in [false, true] {
        like_regex(pattern, case_insensitive)
            .map_err(|e| format!("the LIKE pattern cannot be evaluated ({e}); simplify it"))?;
    }
    Ok(())
}

/// The regular expression Arrow's `like`/`ilike` kernels build for a pattern with
/// wildcards (`arrow-string`'s `regex_like`, same translation and builder settings), so
/// that compiling it here predicts exactly whether the kernel can.
fn like_regex(pattern: &str, case_insensitive: bool) -> Result<regex::Regex, regex::Error> {
    let mut result = String::with_capacity(pattern.len() * 2);
    let mut chars = pattern.chars().peekable();
    match chars.peek() {
        Some('%') => {
            chars.next();
        }
        _ => result.push('^'),
    }
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&next) => {
                    if regex_syntax::is_meta_character(next) {
                        result.push('\\');
                    }
                    result.push(next);
                    chars.next();
                }
                None => result.push_str("\\\\"),
            },
            '%' => result.push_str(".*"),
            '_' => result.push('.'),
            c => {
                if regex_syntax::is_meta_character(c) {
                    result.push('\\');
                }
                result.push(c);
            }
        }
    }
    if result.ends_with(".*") {
        result.truncate(result.len() - 2);
    } else {
        result.push('$');
    }
    regex::RegexBuilder::new(&result)
        .case_insensitive(case_insensitive)
        .dot_matches_new_line(true)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_up_to_the_limit_compiles_in_both_case_modes() {
        let worst = [
            "_".repeat(MAX_LIKE_PATTERN_CHARS),
            "%_".repeat(MAX_LIKE_PATTERN_CHARS / 2),
            // Letters with several case foldings each (K/k/Kelvin sign, S/s/long s, Greek).
            "kſσΣǅ".repeat(MAX_LIKE_PATTERN_CHARS / 5),
            "ǅ_".repeat(MAX_LIKE_PATTERN_CHARS / 2),
            "\\".repeat(MAX_LIKE_PATTERN_CHARS),
        ];
        for p in worst {
            assert!(p.chars().count() <= MAX_LIKE_PATTERN_CHARS);
            check_like_pattern(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        }
        for p in ["E11%", "%diab_tes%", "", "%", "a\\%b", "trailing\\"] {
            check_like_pattern(p).unwrap();
        }
    }

    #[test]
    fn a_pattern_over_the_limit_is_refused_with_the_limit_named() {
        let e = check_like_pattern(&"a".repeat(MAX_LIKE_PATTERN_CHARS + 1)).unwrap_err();
        assert!(e.contains(&MAX_LIKE_PATTERN_CHARS.to_string()), "{e}");
        // The attack of issue 13 used a pattern the regex engine refuses to compile.
        assert!(check_like_pattern(&"_".repeat(20_000)).is_err());
    }

    #[test]
    fn the_translation_is_arrows() {
        // Spot checks of the translation (it must match arrow-string's regex_like).
        let r = like_regex("a_c%", false).unwrap();
        assert!(r.is_match("abcdef") && !r.is_match("xabc"));
        let r = like_regex("%a.c", false).unwrap();
        assert!(r.is_match("xxa.c") && !r.is_match("xxabc"));
        let r = like_regex("A\\%", true).unwrap();
        assert!(r.is_match("a%") && !r.is_match("ab"));
    }
}
