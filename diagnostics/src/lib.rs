//! Located error messages for limitlab's inputs: where a file went wrong
//! (`FILE:LINE:COLUMN`), the line itself, and the valid name a typo was closest to.
//! Shared by every crate that reads a user's file; none of it is limit logic.

/// A TOML reading error as `FILE:LINE:COLUMN: message`, followed by the offending
/// line, so the user sees the field and value in question.
pub fn describe_toml_error(path: &str, text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let message = match suggestion(message) {
        Some(name) => format!("{message}; did you mean `{name}`?"),
        None => message.to_owned(),
    };
    let Some(span) = error.span() else { return format!("{path}: {message}") };
    let (line, column) = line_column(text, span.start);
    let source = text.lines().nth(line - 1).unwrap_or("").trim_end();
    format!("{path}:{line}:{column}: {message}\n    {source}")
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" (or variant), the
/// expected name closest to the misspelt one, when it is close enough to be a typo.
pub fn suggestion(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `").or_else(|| message.strip_prefix("unknown variant `"))?;
    let (given, expected) = rest.split_once('`')?;
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let (distance, best) = names.iter().map(|n| (edit_distance(given, n), *n)).min()?;
    (distance <= given.len().div_ceil(3).max(1)).then(|| best.to_owned())
}

/// Levenshtein distance, for suggesting the closest valid name.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(previous + usize::from(ca != *cb));
            previous = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The 1-based line and column of a byte offset in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}
