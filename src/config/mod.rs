//! `slipway.toml`: parsing, validation and revisions.
//!
//! Loading a config runs four passes, and reports every problem each pass
//! finds before giving up: TOML syntax, unknown keys (walked over the
//! spanned document, so all of them are reported at once, with a "did you
//! mean"), types (serde, first error only: serde stops there), and the
//! semantic checks of [`validate`] (references, cycles, resource races).
//!
//! A [`Revision`](revision::Revision) is the immutable snapshot a
//! deployment runs against: see `revision.rs`.

pub mod diagnostic;
pub mod environment;
pub mod revision;
mod schema;
pub use schema::{json_schema, tables_named};
pub mod secret;
pub mod service;
pub mod validate;
pub mod workflow;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use diagnostic::{ConfigErrors, Problem, ProblemKind, ProblemReport, did_you_mean};
pub use environment::{Environment, GitSource, Window};

/// The file name looked for in a config directory.
pub const CONFIG_FILE: &str = "slipway.toml";

/// Default job timeout when a job does not set one. Every job has a
/// timeout: nothing may hang forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest duration a config accepts: keeps every deadline computable.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default environment name when a config declares none.
pub const DEFAULT_ENVIRONMENT: &str = "default";

#[derive(Debug, Clone)]
pub struct Config {
    pub project: Project,
    pub environments: Vec<Environment>,
    pub services: Vec<Service>,
    pub jobs: Vec<Job>,
    /// `[secret.NAME]`: where each secret is read from (never its value).
    pub secrets: BTreeMap<String, secret::SecretRef>,
    /// `[[registry]]`: credentials per registry host.
    pub registries: Vec<secret::RegistryAuth>,
    pub github: Option<Github>,
    pub registry_hook: Option<RegistryHook>,
    /// `[events]`: events signed with HMAC instead of a token.
    pub events: Option<EventsHook>,
    /// `[[notify]]`: outgoing webhooks about deployments.
    pub notify: Vec<Notify>,
    /// `[sqs]`: deploy requests read from an SQS queue.
    pub sqs: Option<Sqs>,
    /// `[aws]`: where the ECS target and the SQS trigger reach AWS.
    pub aws: crate::aws::Aws,
    /// What each target read from its own top-level tables (`[[hosts]]`),
    /// by target name.
    pub targets: BTreeMap<String, crate::targets::Settings>,
}

/// Where to tell about deployments, and which.
#[derive(Debug, Clone)]
pub struct Notify {
    /// The URL, or the secret holding it (a Slack webhook URL is a secret).
    pub url: NotifyUrl,
    pub slack: bool,
    /// Deployment states to tell about ("started" for a start).
    pub on: Vec<String>,
    /// Only these environments (empty: all).
    pub environments: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum NotifyUrl {
    Plain(String),
    Secret(secret::SecretRef),
}

/// What `[[notify]] on` may name.
pub const NOTIFY_ON: &[&str] = &["started", "succeeded", "failed", "rolled_back", "cancelled", "superseded", "waiting", "revision_rejected"];

/// `[events]`: `POST /api/v1/events` (and `/api/v1/published`) signed
/// with `X-Slipway-Signature-256: sha256=<hex HMAC-SHA256 of the body>`
/// instead of a token; such a caller may deploy in `environments`.
#[derive(Debug, Clone)]
pub struct EventsHook {
    pub hmac_secret: secret::SecretRef,
    /// Empty: every environment.
    pub environments: Vec<String>,
}

/// `[registry_hook]`: notifications from a Docker distribution registry
/// (`POST /hooks/registry`), which sends `Authorization: Bearer <token>`
/// as its endpoint config says.
#[derive(Debug, Clone)]
pub struct RegistryHook {
    pub token: secret::SecretRef,
    pub max_payload: usize,
    /// The names (`host[:port]`) the registry is known by in images. Set,
    /// a notification's images are named by these only, never by the
    /// Host header its pusher sent; empty, by that header and the event's
    /// URL.
    pub hosts: Vec<String>,
}

/// `[sqs]`: a queue whose messages are deploy requests
/// (`crate::trigger::sqs`), read by one node of the installation at a
/// time. Where AWS is (region, endpoint) is `[aws]`'s.
#[derive(Debug, Clone)]
pub struct Sqs {
    pub queue: crate::trigger::sqs::QueueUrl,
}

#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    /// Jobs one node runs at once.
    pub parallelism: Option<usize>,
    /// Store URL (`sqlite://…` or `postgres://…`); `--store` and
    /// `SLIPWAY_STORE` win over it.
    pub store: Option<String>,
    /// Lease of a claimed job or lock; a node that stops renewing it for
    /// this long is taken for dead.
    pub lease: Option<Duration>,
    /// Output kept per job attempt, in bytes.
    pub max_log_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub span: Range<usize>,
    pub target: String,
    /// Set when the service is managed (it has a `command`).
    pub spec: Option<service::ServiceSpec>,
    /// The image whose published versions are this service's versions (its
    /// own `image` on an image target, or `follows`).
    pub follows: Option<String>,
    /// Environments where a published version deploys by itself.
    pub auto_deploy: Vec<String>,
    /// Which published versions may deploy by themselves.
    pub tags: Option<service::TagFilter>,
    /// Retention: keep this many newest tags of `follows` in its registry
    /// (older ones nothing runs or could roll back to are deleted).
    pub keep_tags: Option<u32>,
    /// Deploy when this GitHub Actions workflow succeeds (`on_workflow`).
    pub on_workflow: Option<workflow::OnWorkflow>,
}

/// `[github]`: webhooks from GitHub (`POST /hooks/github`).
#[derive(Debug, Clone)]
pub struct Github {
    /// The webhook's secret: deliveries are checked against it.
    pub webhook_secret: secret::SecretRef,
    /// Larger deliveries are refused (413).
    pub max_payload: usize,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    /// Where each part was written, for diagnostics.
    pub spans: JobSpans,
    pub command: Command,
    pub needs: Vec<String>,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
    pub timeout: Duration,
    /// Whether `timeout` was written in the file (plan estimates say so).
    pub timeout_declared: bool,
    pub kill_grace: Duration,
    pub retry: Retry,
    /// Safe to run again after an interruption (a node died mid-run).
    pub idempotent: bool,
    pub service: Option<String>,
    /// Environments the job runs in; `None` means all.
    pub environments: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values are secrets, read when it runs.
    pub secrets: BTreeMap<String, secret::SecretRef>,
    /// Jobs on targets that place files (a service's migration there):
    /// secret files.
    pub secret_files: BTreeMap<String, secret::SecretRef>,
    /// Where the job runs: a registered target's name; `None`, the default
    /// target. A service's migration runs on the service's target.
    pub target: Option<String>,
    /// Globs over the paths of a config repository: on a new git
    /// revision the job runs when a changed path matches (see
    /// `plan::changes`). Empty: not run by a change of its own.
    pub files: Vec<String>,
    /// The target's own settings of the job (`hosts`, `batch`, ...).
    pub settings: crate::targets::Settings,
    /// Runs once per environment, ever: later deployments there skip it
    /// (a service's `bootstrap`).
    pub once_per_environment: bool,
}

#[derive(Debug, Clone, Default)]
pub struct JobSpans {
    pub name: Range<usize>,
    pub needs: Vec<Range<usize>>,
    pub reads: Vec<Range<usize>>,
    pub writes: Vec<Range<usize>>,
    pub service: Option<Range<usize>>,
    pub environments: Vec<Range<usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Executed directly; `{version}`-style placeholders are substituted
    /// per argument, so a value can never split into two arguments.
    Argv(Vec<String>),
    /// Run by `/bin/sh -c`, only when the job says `shell = true`.
    /// Placeholders are refused here: payload values reach it only as
    /// environment variables.
    Shell(String),
    /// Roll the service out to the deployment's version: run by the
    /// service manager, not as a process (`<service>.rollout` jobs).
    Rollout(Box<service::ServiceSpec>),
    /// Download and verify the deployment's release tarball (run by the
    /// node, not as a process: `<service>.fetch` jobs).
    Fetch(Box<service::ArtifactSpec>),
    /// Make the deployment's image (by the digest pinned at submit)
    /// available on the job's target (`<service>.fetch` of services on
    /// image targets), with the registry credentials the image names.
    Pull(Box<service::ImageSpec>),
    /// Never from a config: a stored job spec this binary cannot read
    /// (written by another version of Slipway). Running it fails with
    /// this reason instead of stalling every claim.
    Unreadable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Total attempts, the first included (1 = no retry).
    pub attempts: u32,
    pub on: RetryOn,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 1, on: RetryOn::ExitCodes(vec![]), backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(60) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOn {
    /// Any failure: non-zero exit, signal, timeout.
    Any,
    /// Only these exit codes.
    ExitCodes(Vec<i32>),
}

impl Retry {
    /// Whether a failure with this exit code (None: signal or timeout) is
    /// worth another attempt under this policy.
    pub fn retryable(&self, exit_code: Option<i32>) -> bool {
        match &self.on {
            RetryOn::Any => true,
            RetryOn::ExitCodes(codes) => exit_code.is_some_and(|c| codes.contains(&c)),
        }
    }
}

impl Config {
    pub fn job(&self, name: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// Environment names, or the implicit default one.
    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments.iter().find(|e| e.name == name)
    }

    pub fn environment_names(&self) -> Vec<String> {
        if self.environments.is_empty() { vec![DEFAULT_ENVIRONMENT.to_string()] } else { self.environments.iter().map(|e| e.name.clone()).collect() }
    }
}

/// A config read from disk, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    /// The config file.
    pub path: PathBuf,
    /// The directory whose content makes the revision.
    pub dir: PathBuf,
    pub text: Arc<String>,
}

/// Resolve `path` (a file or a directory holding `slipway.toml`) and load it.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
    let file = if path.is_dir() { path.join(CONFIG_FILE) } else { path.to_path_buf() };
    let display = file.display().to_string();
    let text = std::fs::read_to_string(&file).map_err(|e| ConfigErrors {
        file: display.clone(),
        source: Arc::new(String::new()),
        problems: vec![Problem::new(ProblemKind::Io, None, format!("cannot read {display}: {e}")).hint("pass the config file or its directory with --config")],
    })?;
    let config = parse(&display, &text)?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    // The config directory is the revision: stored and shipped to every
    // node. A secret's file must not be in it.
    let root = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    let inside: Vec<Problem> = config
        .secrets
        .values()
        .filter_map(|s| match &s.source {
            secret::SecretSource::File(p) => {
                let real =
                    p.parent().and_then(|d| std::fs::canonicalize(d).ok()).map(|d| d.join(p.file_name().unwrap_or_default())).unwrap_or_else(|| p.clone());
                real.starts_with(&root).then(|| {
                    let quoted = format!("{:?}", p.display().to_string());
                    let span = text.find(&quoted).map(|at| at..at + quoted.len());
                    Problem::new(
                        ProblemKind::InvalidValue,
                        span,
                        format!("secret {:?}: {} is inside the config directory {}", s.name, p.display(), root.display()),
                    )
                    .label("inside the revision")
                    .hint("the config directory is stored and shipped to every node as the revision: keep secret files elsewhere, e.g. /etc/slipway/secrets/")
                })
            }
            secret::SecretSource::Env(_) => None,
        })
        .collect();
    if !inside.is_empty() {
        return Err(ConfigErrors { file: display, source: Arc::new(text), problems: inside });
    }
    ignore_file(&dir)?;
    Ok(LoadedConfig { config, path: file, dir, text: Arc::new(text) })
}

/// `.slipwayignore` beside the config, checked as a revision will read it:
/// a pattern the matcher refuses is reported at its line and column in
/// that file.
fn ignore_file(dir: &Path) -> Result<(), ConfigErrors> {
    match revision::ignore_rules(dir) {
        Ok(_) => Ok(()),
        Err(revision::RevisionError::Ignore { path, line, column, message }) => {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let start: usize = text.split_inclusive('\n').take(line - 1).map(str::len).sum::<usize>() + column - 1;
            let end = text[start.min(text.len())..].find('\n').map(|n| start + n).unwrap_or(text.len());
            Err(ConfigErrors {
                file: path.display().to_string(),
                source: Arc::new(text),
                problems: vec![
                    Problem::new(ProblemKind::InvalidValue, Some(start..end), message)
                        .label("invalid pattern")
                        .hint("gitignore syntax: one pattern a line, `#` comments, `!` takes a match back, `\\` escapes a special character"),
                ],
            })
        }
        Err(e) => Err(ConfigErrors {
            file: dir.join(revision::IGNORE_FILE).display().to_string(),
            source: Arc::new(String::new()),
            problems: vec![Problem::new(ProblemKind::Io, None, e.to_string())],
        }),
    }
}

/// Parse and validate config text. `file` is only used in messages.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    parse_in(file, text, &[])
}

/// [`parse`] a config that lives in a repository an environment follows:
/// if it declares no environments, it has the node's (`environments`),
/// so it may name them (`auto_deploy`, a `listen` per environment).
pub fn parse_in(file: &str, text: &str, environments: &[String]) -> Result<Config, ConfigErrors> {
    let errors = |problems: Vec<Problem>| ConfigErrors { file: file.to_string(), source: Arc::new(text.to_string()), problems };
    let doc = match toml::de::DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            return Err(errors(vec![
                Problem::new(ProblemKind::Syntax, e.span(), first_line(e.message())).label("here").hint("see https://toml.io for the TOML syntax"),
            ]));
        }
    };
    let checked = schema::check_keys(doc.get_ref());
    let mut problems = checked.problems;
    // Values of the wrong type were reported (all of them); the typed pass
    // reads the file as if they were not there, so the other checks still
    // run and every problem is reported in one go.
    let typed = if checked.wrong.is_empty() { text.to_string() } else { without(text, &checked.wrong) };
    let raw: Raw = match toml::from_str(&typed) {
        Ok(raw) => raw,
        Err(e) => {
            // serde's own complaint only when the walk had none (a wrong
            // type it took away may leave a required key missing).
            if !problems.iter().any(|p| matches!(p.kind, ProblemKind::WrongType | ProblemKind::MissingKey)) {
                problems.push(type_problem(&e));
            }
            problems.sort_by_key(|p| p.span.as_ref().map(|s| s.start).unwrap_or(0));
            return Err(errors(problems));
        }
    };
    // Semantic checks run even when values were wrong: a bad timeout and
    // an unknown `needs` are independent mistakes, both worth reporting.
    let mut later = Vec::new();
    let config = build(raw, &doc, environments, &mut later);
    validate::check(&config, &mut later);
    // What reads the document itself (a target's own keys) may find a
    // wrong value again: said once.
    later.retain(|p| !p.span.as_ref().is_some_and(|s| checked.wrong.iter().any(|w| w.start <= s.start && s.end <= w.end)));
    problems.extend(later);
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by_key(|p| p.span.as_ref().map(|s| s.start).unwrap_or(0));
        Err(errors(problems))
    }
}

/// `text` with each range (a key and its wrong value) blanked out, line
/// breaks kept so every other span stays where it was; a comma that
/// separated it in an inline table or list goes with it.
fn without(text: &str, ranges: &[std::ops::Range<usize>]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for r in ranges {
        let (mut start, mut end) = (r.start.min(bytes.len()), r.end.min(bytes.len()));
        let mut after = end;
        while after < bytes.len() && matches!(bytes[after], b' ' | b'\t') {
            after += 1;
        }
        if after < bytes.len() && bytes[after] == b',' {
            end = after + 1;
        } else {
            let mut before = start;
            while before > 0 && matches!(bytes[before - 1], b' ' | b'\t') {
                before -= 1;
            }
            if before > 0 && bytes[before - 1] == b',' {
                start = before - 1;
            }
        }
        for b in &mut bytes[start..end] {
            if *b != b'\n' && *b != b'\r' {
                *b = b' ';
            }
        }
    }
    // Only ASCII bytes were replaced, each by a space, and never inside a
    // multi-byte character unless the whole character went: valid UTF-8.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

pub(crate) fn type_problem(e: &toml::de::Error) -> Problem {
    let msg = first_line(e.message());
    let (kind, hint) = if msg.starts_with("missing field") {
        (ProblemKind::MissingKey, Some("add the key; see README.md for the config reference".to_string()))
    } else if msg.contains("untagged enum RawCommand") {
        (ProblemKind::WrongType, Some("`command` is an array of arguments, e.g. [\"./deploy.sh\", \"--fast\"], or a string with `shell = true`".to_string()))
    } else if msg.contains("expected a sequence") {
        (ProblemKind::WrongType, Some("this key takes a list, e.g. [\"name\"]".to_string()))
    } else if msg.contains("untagged enum RawRetryOn") {
        (ProblemKind::WrongType, Some("`on` is \"any\" or an array of exit codes, e.g. [75, 111]".to_string()))
    } else {
        (ProblemKind::WrongType, None)
    };
    let msg = msg
        .replace("data did not match any variant of untagged enum RawCommand", "invalid `command`")
        .replace("data did not match any variant of untagged enum RawRetryOn", "invalid `retry.on`")
        .replace("expected i64", "expected a whole number")
        .replace("expected a string", "expected text in quotes")
        .replace("expected a sequence", "expected a list");
    let mut p = Problem::new(kind, e.span(), msg).label("here");
    p.hint = hint;
    p
}

// ---- the serde shape of the file; unknown keys were reported by `schema` ----

#[derive(Deserialize)]
struct Raw {
    project: Option<Spanned<RawProject>>,
    #[serde(default)]
    environment: Vec<Spanned<environment::RawEnvironment>>,
    #[serde(default)]
    service: Vec<Spanned<service::RawService>>,
    #[serde(default)]
    job: Vec<Spanned<RawJob>>,
    #[serde(default)]
    secret: BTreeMap<Spanned<String>, Spanned<secret::RawSecret>>,
    #[serde(default)]
    registry: Vec<Spanned<secret::RawRegistry>>,
    github: Option<Spanned<RawGithub>>,
    registry_hook: Option<Spanned<RawRegistryHook>>,
    #[serde(default)]
    notify: Vec<Spanned<RawNotify>>,
    events: Option<Spanned<RawEvents>>,
    sqs: Option<Spanned<RawSqs>>,
    aws: Option<Spanned<crate::aws::RawAws>>,
}

#[derive(Deserialize)]
struct RawSqs {
    queue_url: Spanned<String>,
}

#[derive(Deserialize)]
struct RawEvents {
    hmac_secret: Spanned<String>,
    #[serde(default)]
    environments: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawNotify {
    url: Option<Spanned<String>>,
    url_secret: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    on: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    environments: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawRegistryHook {
    token: Spanned<String>,
    max_payload: Option<Spanned<i64>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawGithub {
    webhook_secret: Spanned<String>,
    max_payload: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
struct RawProject {
    name: Option<String>,
    parallelism: Option<Spanned<i64>>,
    store: Option<String>,
    lease: Option<Spanned<String>>,
    max_log_bytes: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Argv(Vec<String>),
    Line(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRetryOn {
    Word(String),
    Codes(Vec<i64>),
}

#[derive(Deserialize)]
struct RawRetry {
    attempts: Option<Spanned<i64>>,
    on: Option<Spanned<RawRetryOn>>,
    backoff: Option<Spanned<String>>,
    max_backoff: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawJob {
    name: Spanned<String>,
    command: Option<Spanned<RawCommand>>,
    #[serde(default)]
    shell: bool,
    #[serde(default)]
    needs: Vec<Spanned<String>>,
    #[serde(default)]
    reads: Vec<Spanned<String>>,
    #[serde(default)]
    writes: Vec<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    kill_grace: Option<Spanned<String>>,
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    idempotent: bool,
    service: Option<Spanned<String>>,
    environments: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    secrets: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
    target: Option<Spanned<String>>,
}

pub(crate) fn duration(s: &Spanned<String>, what: &str, problems: &mut Vec<Problem>) -> Option<Duration> {
    match humantime::parse_duration(s.get_ref()) {
        Ok(d) if d.is_zero() => {
            problems.push(Problem::new(ProblemKind::InvalidValue, Some(s.span()), format!("`{what}` must be longer than zero")).label("zero"));
            None
        }
        Ok(d) if d > MAX_DURATION => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(s.span()), format!("`{what}` is longer than a year"))
                    .label("too long")
                    .hint("durations are at most 365 days"),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(s.span()), format!("`{what}` is not a duration: {e}"))
                    .label("not a duration")
                    .hint("write a duration such as \"90s\", \"5m\" or \"1h 30m\""),
            );
            None
        }
    }
}

fn positive(v: &Spanned<i64>, what: &str, max: i64, problems: &mut Vec<Problem>) -> Option<i64> {
    let n = *v.get_ref();
    if n < 1 || n > max {
        problems.push(Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("`{what}` must be between 1 and {max}, not {n}")).label("out of range"));
        None
    } else {
        Some(n)
    }
}

/// An image reference without a tag or digest: `[registry[:port]/]path`,
/// lowercase path components of letters, digits, `.`, `_`, `-`.
pub fn valid_image(s: &str) -> bool {
    crate::values::Image::parse(s).is_ok()
}

/// Names of jobs, services, environments and resources: kept to a plain
/// alphabet so they are safe in URLs, file names and log lines.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) && !s.starts_with('.')
}

pub(crate) fn check_name(s: &Spanned<String>, what: &str, problems: &mut Vec<Problem>) {
    if !valid_name(s.get_ref()) {
        problems.push(
            Problem::new(ProblemKind::InvalidValue, Some(s.span()), format!("invalid {what} name {:?}", s.get_ref()))
                .label("invalid name")
                .hint("names use letters, digits, '-', '_' and '.', at most 64 characters, not starting with '.'"),
        );
    }
}

fn build(raw: Raw, doc: &Spanned<toml::de::DeTable<'_>>, inherited: &[String], problems: &mut Vec<Problem>) -> Config {
    let service_tables = tables_named(doc, "service");
    let job_tables = tables_named(doc, "job");
    let mut project = Project { name: String::from("slipway"), parallelism: None, store: None, lease: None, max_log_bytes: None };
    if let Some(p) = raw.project {
        let p = p.into_inner();
        if let Some(n) = p.name {
            project.name = n;
        }
        project.parallelism = p.parallelism.as_ref().and_then(|v| positive(v, "parallelism", 4096, problems)).map(|n| n as usize);
        project.store = p.store;
        project.lease = p.lease.as_ref().and_then(|l| duration(l, "lease", problems));
        project.max_log_bytes = p.max_log_bytes.as_ref().and_then(|v| positive(v, "max_log_bytes", 1 << 32, problems)).map(|n| n as u64);
    }
    let secrets = secret::build_secrets(raw.secret, problems);
    let environments: Vec<Environment> = raw.environment.into_iter().map(|e| environment::build(e.into_inner(), &secrets, problems)).collect();
    let environments = if environments.is_empty() { inherited.iter().map(|n| Environment::named(n)).collect() } else { environments };

    let registries = secret::build_registries(raw.registry, &secrets, problems);
    // Each target reads its own top-level tables (`[[hosts]]`) once.
    let mut targets = BTreeMap::new();
    for k in crate::targets::kinds() {
        let read = k.read_tables(&mut crate::targets::ConfigTables { doc, secrets: &secrets, problems });
        targets.insert(k.name().to_string(), read.unwrap_or_default());
    }
    let github = raw.github.map(|g| {
        let g = g.into_inner();
        Github {
            webhook_secret: secret::lookup(&g.webhook_secret, &secrets, problems)
                .unwrap_or(secret::SecretRef { name: g.webhook_secret.get_ref().clone(), source: secret::SecretSource::Env(String::new()) }),
            max_payload: g.max_payload.as_ref().and_then(|v| positive(v, "github.max_payload", 64 << 20, problems)).unwrap_or(1 << 20) as usize,
        }
    });
    let registry_hook = raw.registry_hook.map(|g| {
        let g = g.into_inner();
        RegistryHook {
            token: secret::lookup(&g.token, &secrets, problems)
                .unwrap_or(secret::SecretRef { name: g.token.get_ref().clone(), source: secret::SecretSource::Env(String::new()) }),
            max_payload: g.max_payload.as_ref().and_then(|v| positive(v, "registry_hook.max_payload", 64 << 20, problems)).unwrap_or(1 << 20) as usize,
            hosts: g
                .hosts
                .iter()
                .filter_map(|h| {
                    let host = h.get_ref().to_ascii_lowercase();
                    // A bare name ("myregistry/team/web") is Docker Hub's.
                    let registry_like = host.contains('.') || host.contains(':') || host == "localhost";
                    if valid_image(&format!("{host}/x")) && !host.contains('/') && registry_like {
                        Some(host)
                    } else {
                        problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(h.span()), format!("{:?} is not a registry host", h.get_ref()))
                                .label("not host[:port]")
                                .hint("the name images of this registry start with, with a '.' or a port (or localhost), e.g. \"registry.internal:5000\""),
                        );
                        None
                    }
                })
                .fold(Vec::new(), |mut v, h| {
                    if !v.contains(&h) {
                        v.push(h);
                    }
                    v
                }),
        }
    });
    let events = raw.events.map(|e| {
        let e = e.into_inner();
        EventsHook {
            hmac_secret: secret::lookup(&e.hmac_secret, &secrets, problems)
                .unwrap_or(secret::SecretRef { name: e.hmac_secret.get_ref().clone(), source: secret::SecretSource::Env(String::new()) }),
            environments: e.environments.iter().map(|x| x.get_ref().clone()).collect(),
        }
    });
    let aws = raw.aws.map(|a| crate::aws::read(a.into_inner(), problems)).unwrap_or_default();
    let sqs = raw.sqs.and_then(|q| {
        let span = q.span();
        let u = q.into_inner().queue_url;
        if cfg!(not(feature = "aws")) {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(span), "[sqs] needs AWS support, and this Slipway was built without it (cargo feature `aws`)")
                    .label("needs the `aws` feature")
                    .hint("use a build with the default features, or remove [sqs]"),
            );
            return None;
        }
        match crate::trigger::sqs::QueueUrl::parse(u.get_ref()) {
            Ok(queue) => Some(Sqs { queue }),
            Err(e) => {
                problems.push(Problem::new(ProblemKind::InvalidValue, Some(u.span()), e).label("not a queue URL"));
                None
            }
        }
    });
    let mut notify = Vec::new();
    for n in raw.notify {
        let span = n.span();
        let n = n.into_inner();
        let url = match (&n.url, &n.url_secret) {
            (Some(u), None) => {
                if !(u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://")) {
                    problems
                        .push(Problem::new(ProblemKind::InvalidValue, Some(u.span()), "`notify.url` must be an http:// or https:// URL").label("not a URL"));
                }
                Some(NotifyUrl::Plain(u.get_ref().clone()))
            }
            (None, Some(s)) => secret::lookup(s, &secrets, problems).map(NotifyUrl::Secret),
            _ => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(span.clone()), "a [[notify]] takes `url` or `url_secret` (one of them)")
                        .label("this notify")
                        .hint("url_secret names a [secret.*]: a Slack webhook URL is itself a secret"),
                );
                None
            }
        };
        let slack = match n.format.as_ref().map(|f| f.get_ref().as_str()) {
            None | Some("json") => false,
            Some("slack") => true,
            Some(other) => {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, n.format.as_ref().map(|f| f.span()), format!("unknown notify format {other:?}"))
                        .label("unknown")
                        .hint("\"json\" or \"slack\""),
                );
                false
            }
        };
        let on: Vec<String> = match &n.on {
            None => NOTIFY_ON.iter().map(|s| s.to_string()).collect(),
            Some(v) => v
                .iter()
                .filter(|o| {
                    let ok = NOTIFY_ON.contains(&o.get_ref().as_str());
                    if !ok {
                        problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(o.span()), format!("unknown deployment event {:?}", o.get_ref()))
                                .label("unknown")
                                .hint(format!("one of {}", NOTIFY_ON.join(", "))),
                        );
                    }
                    ok
                })
                .map(|o| o.get_ref().clone())
                .collect(),
        };
        if let Some(url) = url {
            notify.push(Notify { url, slack, on, environments: n.environments.iter().map(|e| e.get_ref().clone()).collect() });
        }
    }
    let env_names: Vec<String> =
        if environments.is_empty() { vec![DEFAULT_ENVIRONMENT.to_string()] } else { environments.iter().map(|e: &Environment| e.name.clone()).collect() };
    let mut services = Vec::new();
    let mut service_jobs = Vec::new();
    let empty = Spanned::new(0..0, toml::de::DeTable::default());
    for (i, s) in raw.service.into_iter().enumerate() {
        // The same table, as the document walk saw it: a target reads its
        // own keys from it.
        let table = service_tables.get(i).unwrap_or(&empty);
        let (mut svc, built) = service::build(s.into_inner(), table, &targets, &secrets, &registries, &env_names, problems);
        svc.spec = built.spec;
        services.push(svc);
        service_jobs.extend(built.jobs);
    }
    let mut jobs = Vec::new();
    for (i, j) in raw.job.into_iter().enumerate() {
        let j = j.into_inner();
        let (target, settings) = job_target(&j, job_tables.get(i).unwrap_or(&empty), &targets, problems);
        check_name(&j.name, "job", problems);
        let command = match j.command {
            None => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(j.name.span()), format!("job {:?} has no `command`", j.name.get_ref()))
                        .label("this job")
                        .hint("add command = [\"program\", \"arg\"]"),
                );
                Command::Argv(vec![])
            }
            Some(c) => {
                let span = c.span();
                match (c.into_inner(), j.shell) {
                    (RawCommand::Argv(v), false) if v.is_empty() || v[0].is_empty() => {
                        problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(span), "`command` is empty")
                                .label("empty")
                                .hint("the first element is the program to run"),
                        );
                        Command::Argv(v)
                    }
                    (RawCommand::Argv(v), false) => Command::Argv(v),
                    (RawCommand::Line(s), true) => {
                        if let Some(p) = PLACEHOLDERS.iter().find(|p| s.contains(*p)) {
                            problems.push(
                                Problem::new(ProblemKind::InvalidValue, Some(span), format!("placeholder {p} in a shell command"))
                                    .label("placeholder")
                                    .hint("values from events never reach a shell: use the environment variable instead, quoted, e.g. \"$SLIPWAY_VERSION\""),
                            );
                        }
                        Command::Shell(s)
                    }
                    (RawCommand::Line(s), false) => {
                        problems.push(
                            Problem::new(ProblemKind::WrongType, Some(span), "`command` is a string but the job does not say `shell = true`")
                                .label("a string")
                                .hint(format!(
                                    "write the arguments as an array, e.g. {:?}, or add `shell = true` to run it with /bin/sh",
                                    s.split_whitespace().collect::<Vec<_>>()
                                )),
                        );
                        Command::Shell(s)
                    }
                    (RawCommand::Argv(v), true) => {
                        problems.push(
                            Problem::new(ProblemKind::WrongType, Some(span), "`shell = true` needs `command` as one string")
                                .label("an array")
                                .hint(format!("write command = {:?}", v.join(" "))),
                        );
                        Command::Argv(v)
                    }
                }
            }
        };
        let timeout = j.timeout.as_ref().and_then(|t| duration(t, "timeout", problems));
        for f in &j.files {
            if let Err(e) = globset::Glob::new(f.get_ref()) {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(f.span()), format!("invalid `files` pattern {:?}: {}", f.get_ref(), e.kind()))
                        .label("invalid glob")
                        .hint("globs over repository paths, e.g. \"nginx/**\" or \"db/migrations/*.sql\""),
                );
            }
        }
        let kill_grace = j.kill_grace.as_ref().and_then(|t| duration(t, "kill_grace", problems));
        let mut retry = Retry::default();
        if let Some(r) = j.retry {
            let r = r.into_inner();
            if let Some(a) = r.attempts.as_ref().and_then(|a| positive(a, "retry.attempts", 100, problems)) {
                retry.attempts = a as u32;
            }
            if let Some(b) = r.backoff.as_ref().and_then(|b| duration(b, "retry.backoff", problems)) {
                retry.backoff = b;
            }
            if let Some(b) = r.max_backoff.as_ref().and_then(|b| duration(b, "retry.max_backoff", problems)) {
                retry.max_backoff = b;
            }
            match r.on {
                None => retry.on = RetryOn::Any,
                Some(on) => {
                    let span = on.span();
                    match on.into_inner() {
                        RawRetryOn::Word(w) if w == "any" => retry.on = RetryOn::Any,
                        RawRetryOn::Word(w) => problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(span), format!("unknown retry condition {w:?}"))
                                .label("unknown")
                                .hint("use \"any\" or an array of exit codes, e.g. [75, 111]"),
                        ),
                        RawRetryOn::Codes(c) => {
                            if let Some(bad) = c.iter().find(|c| !(1..=255).contains(*c)) {
                                problems.push(
                                    Problem::new(ProblemKind::InvalidValue, Some(span), format!("exit code {bad} cannot be retried"))
                                        .label("out of range")
                                        .hint("retryable exit codes are between 1 and 255"),
                                );
                            }
                            retry.on = RetryOn::ExitCodes(c.into_iter().map(|c| c as i32).collect());
                        }
                    }
                }
            }
        }
        jobs.push(Job {
            name: j.name.get_ref().clone(),
            spans: JobSpans {
                name: j.name.span(),
                needs: j.needs.iter().map(|n| n.span()).collect(),
                reads: j.reads.iter().map(|n| n.span()).collect(),
                writes: j.writes.iter().map(|n| n.span()).collect(),
                service: j.service.as_ref().map(|s| s.span()),
                environments: j.environments.iter().flatten().map(|n| n.span()).collect(),
            },
            command,
            needs: j.needs.iter().map(|n| n.get_ref().clone()).collect(),
            reads: j.reads.iter().map(|r| r.get_ref().clone()).collect(),
            writes: j.writes.iter().map(|r| r.get_ref().clone()).collect(),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            timeout_declared: timeout.is_some(),
            kill_grace: kill_grace.unwrap_or(Duration::from_secs(5)),
            retry,
            idempotent: j.idempotent,
            service: j.service.as_ref().map(|s| s.get_ref().clone()),
            environments: j.environments.as_ref().map(|v| v.iter().map(|e| e.get_ref().clone()).collect()),
            secrets: secret::env_secrets(j.secrets.as_ref(), &j.env, &secrets, problems),
            env: j.env,
            secret_files: BTreeMap::new(),
            target,
            settings,
            once_per_environment: false,
            files: j.files.iter().map(|f| f.get_ref().clone()).collect(),
        });
    }
    // A deploy's own jobs come after the config's, so `plan` lists the
    // user's jobs in file order first.
    jobs.extend(service_jobs);
    Config { project, environments, services, jobs, secrets, registries, github, registry_hook, events, notify, sqs, aws, targets }
}

/// The target a `[[job]]` runs on and that target's settings of it: the
/// one it names, else the one whose own keys it uses (`hosts = "web"`),
/// else the default. Keys of another target than its own are refused,
/// each at its place.
fn job_target(
    j: &RawJob,
    table: &Spanned<toml::de::DeTable<'_>>,
    kind_tables: &BTreeMap<String, crate::targets::Settings>,
    problems: &mut Vec<Problem>,
) -> (Option<String>, crate::targets::Settings) {
    let name = j.name.get_ref();
    let owner_of = |key: &str| crate::targets::kinds().iter().copied().find(|k| k.job_keys().iter().any(|x| x.name == key));
    let used: Vec<(&Spanned<std::borrow::Cow<'_, str>>, &'static dyn crate::targets::TargetKind)> =
        table.get_ref().iter().filter_map(|(k, _)| owner_of(k.get_ref()).map(|o| (k, o))).collect();
    let kind = match &j.target {
        Some(t) => match crate::targets::kind(t.get_ref()) {
            Some(k) if k.capabilities().runs_jobs => Some(k),
            Some(k) => {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(t.span()), format!("target {:?} does not run jobs", k.name()))
                        .label("no jobs on this target")
                        .hint("`slipway targets` lists what each target can do"),
                );
                return (None, Default::default());
            }
            None => {
                let names: Vec<&str> = crate::targets::kinds().iter().map(|k| k.name()).collect();
                let hint = match diagnostic::did_you_mean(t.get_ref(), names.iter().copied()) {
                    Some(s) => format!("did you mean {s:?}?"),
                    None => format!("targets: {}", names.join(", ")),
                };
                problems.push(Problem::new(ProblemKind::InvalidValue, Some(t.span()), format!("unknown target {:?}", t.get_ref())).label("unknown").hint(hint));
                return (None, Default::default());
            }
        },
        None => used.first().map(|(_, k)| *k),
    };
    let Some(kind) = kind else { return (None, Default::default()) };
    let mut foreign = false;
    for (key, owner) in &used {
        if owner.name() != kind.name() {
            foreign = true;
            problems.push(
                Problem::new(
                    ProblemKind::InvalidValue,
                    Some(key.span()),
                    format!("`{}` is a key of target {:?}, and job {name:?} runs on target {:?}", key.get_ref(), owner.name(), kind.name()),
                )
                .label(format!("{} only", owner.name()))
                .hint("a job runs on one target: split it in two jobs"),
            );
        }
    }
    let empty = crate::targets::Settings::default();
    let owner = format!("job {name:?}");
    let settings = kind.job_settings(&mut crate::targets::KeyTable { owner: &owner, table, kind: kind_tables.get(kind.name()).unwrap_or(&empty), problems });
    if foreign {
        return (Some(kind.name().to_string()), Default::default());
    }
    (Some(kind.name().to_string()), settings.unwrap_or_default())
}

/// Placeholders substituted into argv commands at run time.
pub const PLACEHOLDERS: &[&str] = &["{version}", "{service}", "{env}", "{deployment}", "{revision}"];
