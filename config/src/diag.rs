//! Diagnostics: one problem in the user's config, located by file, line, column and the
//! field path inside its document.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a config directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Display name of the file: its name relative to the config directory.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Field path inside the document, e.g. `spec.rules[0].backendRefs[1].weight`; empty
    /// when the problem is not about a field (a YAML syntax error).
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Sorts diagnostics in file/line/column order, keeping the emission order for ties so
/// that related messages stay together.
pub(crate) fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
}

/// A 1-based source position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Loc {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Collects diagnostics for one file.
#[derive(Debug)]
pub(crate) struct Sink<'a> {
    pub file: &'a str,
    pub diags: &'a mut Vec<Diagnostic>,
}

impl Sink<'_> {
    pub fn error(&mut self, loc: Loc, path: &str, message: impl Into<String>) {
        self.push(Severity::Error, loc, path, message.into());
    }

    pub fn warn(&mut self, loc: Loc, path: &str, message: impl Into<String>) {
        self.push(Severity::Warning, loc, path, message.into());
    }

    fn push(&mut self, severity: Severity, loc: Loc, path: &str, message: String) {
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            line: loc.line,
            column: loc.column,
            path: path.to_string(),
            message,
        });
    }
}
