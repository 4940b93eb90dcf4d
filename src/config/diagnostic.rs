//! Config problems as `miette` diagnostics: each carries its span in the
//! source text, a kind (a stable code scripts can match) and a hint.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};
use serde::Serialize;

/// What kind of mistake a problem is. The string form is the stable code
/// printed as `slipway::config::<kind>` and in `--json` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    Syntax,
    UnknownKey,
    WrongType,
    MissingKey,
    InvalidValue,
    Duplicate,
    UnknownReference,
    Cycle,
    WriteRace,
    ReadRace,
    Io,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Syntax => "syntax",
            ProblemKind::UnknownKey => "unknown-key",
            ProblemKind::WrongType => "wrong-type",
            ProblemKind::MissingKey => "missing-key",
            ProblemKind::InvalidValue => "invalid-value",
            ProblemKind::Duplicate => "duplicate",
            ProblemKind::UnknownReference => "unknown-reference",
            ProblemKind::Cycle => "cycle",
            ProblemKind::WriteRace => "write-race",
            ProblemKind::ReadRace => "read-race",
            ProblemKind::Io => "io",
        }
    }
}

/// One mistake in a config file.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
    /// Byte range in the source; `None` when the problem has no place
    /// (the file cannot be read).
    pub span: Option<Range<usize>>,
    pub label: String,
    pub hint: Option<String>,
}

impl Problem {
    pub fn new(kind: ProblemKind, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        Problem { kind, message: message.into(), span, label: String::new(), hint: None }
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Every problem found in one file, with the text they point into.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: String,
    pub source: Arc<String>,
    pub problems: Vec<Problem>,
}

/// A problem in machine-readable form, with 1-based line and column.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemReport {
    pub kind: ProblemKind,
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub hint: Option<String>,
}

impl ProblemReport {
    pub fn kind_str(&self) -> String {
        self.kind.as_str().to_string()
    }
}

impl ConfigErrors {
    /// Line and column (1-based) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        line_col(&self.source, offset)
    }

    pub fn reports(&self) -> Vec<ProblemReport> {
        self.problems
            .iter()
            .map(|p| {
                let (line, column) = match &p.span {
                    Some(s) => {
                        let (l, c) = self.line_col(s.start);
                        (Some(l), Some(c))
                    }
                    None => (None, None),
                };
                ProblemReport { kind: p.kind, file: self.file.clone(), line, column, message: p.message.clone(), hint: p.hint.clone() }
            })
            .collect()
    }

    /// Human rendering of every problem, with source excerpts.
    pub fn render(&self, color: bool) -> String {
        let handler =
            if color { miette::GraphicalReportHandler::new() } else { miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor()) };
        let mut out = String::new();
        for p in &self.problems {
            let d = RenderedProblem {
                problem: p,
                source: NamedSource::new(&self.file, self.source.clone()),
                location: p.span.as_ref().map(|s| {
                    let (l, c) = self.line_col(s.start);
                    format!("{}:{}:{}", self.file, l, c)
                }),
            };
            let _ = handler.render_report(&mut out, &d);
            out.push('\n');
        }
        out.push_str(&format!("{}: {} problem{} found\n", self.file, self.problems.len(), if self.problems.len() == 1 { "" } else { "s" }));
        out
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in self.reports() {
            match (r.line, r.column) {
                (Some(l), Some(c)) => writeln!(f, "{}:{}:{}: {}", r.file, l, c, r.message)?,
                _ => writeln!(f, "{}: {}", r.file, r.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

struct RenderedProblem<'a> {
    problem: &'a Problem,
    source: NamedSource<Arc<String>>,
    location: Option<String>,
}

impl fmt::Debug for RenderedProblem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderedProblem").field("problem", self.problem).finish()
    }
}

impl fmt::Display for RenderedProblem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: {}", self.problem.message),
            None => write!(f, "{}", self.problem.message),
        }
    }
}

impl std::error::Error for RenderedProblem<'_> {}

impl Diagnostic for RenderedProblem<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        Some(Box::new(format!("slipway::config::{}", self.problem.kind.as_str())))
    }
    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.problem.hint.as_ref().map(|h| Box::new(h.clone()) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.problem.span.as_ref().map(|_| &self.source as &dyn SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.problem.span.clone()?;
        let len = span.end.saturating_sub(span.start).max(1);
        let label = if self.problem.label.is_empty() { None } else { Some(self.problem.label.clone()) };
        Some(Box::new(std::iter::once(LabeledSpan::new(label, span.start, len))))
    }
}

/// The closest candidate to `word`, for "did you mean" hints.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates.into_iter().map(|c| (strsim::damerau_levenshtein(word, c), c)).filter(|(d, c)| *d <= 2.max(c.len() / 3)).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}
