//! `on_workflow` on a `[[service]]`: deploy when a GitHub Actions workflow
//! run concludes with success (a `workflow_run` delivery to
//! `/hooks/github`), the version rendered from the run by a template.
//!
//! ```toml
//! on_workflow = { workflow = "CI", branch = "main", version = "sha-{head_sha:7}" }
//! ```
//!
//! The template's placeholders expand only to hexadecimal digits (the
//! head commit) or decimal numbers (the run's id and number), and its
//! literal text is checked here against the version alphabet, so what it
//! renders is a valid version whatever the payload says.

use serde::Deserialize;
use toml::Spanned;

use super::{Problem, ProblemKind};

/// Where a service deploys from a workflow run.
#[derive(Debug, Clone)]
pub struct OnWorkflow {
    /// The workflow's name (`name:` in its file, as GitHub shows it), or
    /// its file's path in the repository (`.github/workflows/ci.yml`).
    pub workflow: String,
    /// The branch the run's head commit is on (`head_branch`).
    pub branch: String,
    /// `owner/name`: only runs in that repository (any, if unset).
    pub repository: Option<String>,
    /// What triggered the run (`push`, `schedule`, …): only these deploy.
    /// Default `["push"]`: a pull request's run names its own head branch
    /// (a fork's `main` too), never what was merged.
    pub events: Vec<String>,
    pub version: VersionTemplate,
}

/// What a run says about itself, as far as a template or a filter reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFacts<'a> {
    /// 40 (or 64) lowercase hexadecimal digits, already checked.
    pub head_sha: &'a str,
    pub run_id: u64,
    pub run_number: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// The head commit, its first `n` digits (all of it when `None`).
    HeadSha(Option<usize>),
    RunId,
    RunNumber,
}

/// `version = "…"`: literal text and `{head_sha}`, `{head_sha:N}`,
/// `{run_number}`, `{run_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionTemplate {
    text: String,
    parts: Vec<Part>,
}

pub const PLACEHOLDERS: &str = "{head_sha}, {head_sha:N} (its first N digits, 4 to 40), {run_number}, {run_id}";

impl VersionTemplate {
    pub fn parse(text: &str) -> Result<VersionTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest.find('}').ok_or_else(|| format!("`{{` without `}}` in {text:?}"))?;
                    let name = &rest[1..end];
                    parts.push(match name.split_once(':') {
                        None if name == "head_sha" => Part::HeadSha(None),
                        None if name == "run_id" => Part::RunId,
                        None if name == "run_number" => Part::RunNumber,
                        Some(("head_sha", n)) => match n.parse::<usize>() {
                            Ok(n) if (4..=40).contains(&n) => Part::HeadSha(Some(n)),
                            _ => return Err(format!("{{head_sha:{n}}}: the number of digits is 4 to 40")),
                        },
                        _ => return Err(format!("unknown placeholder {{{name}}}")),
                    });
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let lit = &rest[..end];
                    if let Some(c) = lit.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))) {
                        return Err(format!("{c:?} cannot be part of a version (letters, digits, '.', '_', '-', '+')"));
                    }
                    parts.push(Part::Literal(lit.to_string()));
                    rest = &rest[end..];
                }
            }
        }
        if !parts.iter().any(|p| !matches!(p, Part::Literal(_))) {
            return Err("no placeholder: every run would deploy the same version, so only the first would deploy".into());
        }
        let t = VersionTemplate { text: text.to_string(), parts };
        // The longest it can render must still be a version.
        let longest = t.render(&RunFacts { head_sha: &"f".repeat(40), run_id: u64::MAX, run_number: u64::MAX });
        crate::values::Version::parse(&longest).map_err(|e| format!("it renders {longest:?} for some runs, which is not a version: {e}"))?;
        Ok(t)
    }

    pub fn render(&self, run: &RunFacts<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::HeadSha(None) => out.push_str(run.head_sha),
                Part::HeadSha(Some(n)) => out.push_str(&run.head_sha[..(*n).min(run.head_sha.len())]),
                Part::RunId => out.push_str(&run.run_id.to_string()),
                Part::RunNumber => out.push_str(&run.run_number.to_string()),
            }
        }
        out
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[derive(Deserialize)]
pub(super) struct RawOnWorkflow {
    workflow: Spanned<String>,
    branch: Spanned<String>,
    version: Spanned<String>,
    repository: Option<Spanned<String>>,
    events: Option<Vec<Spanned<String>>>,
}

pub(super) fn build(raw: &Spanned<RawOnWorkflow>, problems: &mut Vec<Problem>) -> Option<OnWorkflow> {
    let r = raw.get_ref();
    let before = problems.len();
    if r.workflow.get_ref().trim().is_empty() {
        problems.push(
            Problem::new(ProblemKind::InvalidValue, Some(r.workflow.span()), "`on_workflow.workflow` is empty")
                .label("no workflow")
                .hint("the workflow's name (its `name:`), e.g. workflow = \"CI\", or its file, e.g. workflow = \".github/workflows/ci.yml\""),
        );
    }
    if !super::environment::valid_branch(r.branch.get_ref()) {
        problems.push(
            Problem::new(ProblemKind::InvalidValue, Some(r.branch.span()), format!("`on_workflow.branch` {:?} is not a branch name", r.branch.get_ref()))
                .label("not a branch")
                .hint("letters, digits, '.', '_', '-', '/'; e.g. branch = \"main\""),
        );
    }
    let version = match VersionTemplate::parse(r.version.get_ref()) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(r.version.span()), format!("`on_workflow.version` is not a version template: {e}"))
                    .label("bad template")
                    .hint(format!("placeholders: {PLACEHOLDERS}; e.g. version = \"{{head_sha:7}}\" or \"sha-{{head_sha:7}}\"")),
            );
            None
        }
    };
    if let Some(repo) = &r.repository {
        let ok = repo.get_ref().split_once('/').is_some_and(|(o, n)| {
            let part = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            part(o) && part(n)
        });
        if !ok {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(repo.span()), format!("`on_workflow.repository` {:?} is not owner/name", repo.get_ref()))
                    .label("not owner/name")
                    .hint("e.g. repository = \"acme/web\""),
            );
        }
    }
    let mut events = Vec::new();
    for e in r.events.iter().flatten() {
        if e.get_ref().is_empty() || !e.get_ref().chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidValue,
                    Some(e.span()),
                    format!("`on_workflow.events` has {:?}, which is not a GitHub event name", e.get_ref()),
                )
                .label("not an event")
                .hint("e.g. events = [\"push\", \"workflow_dispatch\"]"),
            );
        } else {
            events.push(e.get_ref().clone());
        }
    }
    if r.events.is_none() {
        events.push("push".into());
    }
    if problems.len() > before {
        return None;
    }
    Some(OnWorkflow {
        workflow: r.workflow.get_ref().clone(),
        branch: r.branch.get_ref().clone(),
        repository: r.repository.as_ref().map(|x| x.get_ref().clone()),
        events,
        version: version?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue18_a_version_template_renders_only_checked_parts() {
        let sha = "6113728f27ae82c7b1a177c8d03f9e96e0adf247";
        let run = RunFacts { head_sha: sha, run_id: 30433642, run_number: 562 };
        let render = |t: &str| VersionTemplate::parse(t).map(|t| t.render(&run));
        assert_eq!(render("{head_sha:7}").as_deref(), Ok("6113728"));
        assert_eq!(render("sha-{head_sha:12}").as_deref(), Ok("sha-6113728f27ae"));
        assert_eq!(render("{head_sha}").as_deref(), Ok(sha));
        assert_eq!(render("1.0.{run_number}+{head_sha:7}").as_deref(), Ok("1.0.562+6113728"));
        assert_eq!(render("run-{run_id}").as_deref(), Ok("run-30433642"));
        for (bad, why) in [
            ("{branch}", "unknown placeholder {branch}"),
            ("{head_sha:3}", "4 to 40"),
            ("{head_sha:x}", "4 to 40"),
            ("{head_sha", "without `}`"),
            ("v/{head_sha:7}", "'/' cannot be part of a version"),
            ("$(id){head_sha:7}", "'$' cannot be part"),
            ("latest", "no placeholder"),
            ("-{head_sha:7}", "not a version"),
        ] {
            let e = render(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
