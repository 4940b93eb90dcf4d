//! The keys each table of `slipway.toml` accepts. Walking the spanned
//! document (rather than `deny_unknown_fields`) reports every unknown key
//! at once, each at its own line and column.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Problem, ProblemKind, did_you_mean};

const TOP: &[&str] = &["project", "environment", "service", "job", "secret", "registry", "github", "registry_hook", "notify", "events", "sqs", "aws"];
const SQS: &[&str] = &["queue_url"];
const EVENTS: &[&str] = &["hmac_secret", "environments"];
const NOTIFY: &[&str] = &["url", "url_secret", "format", "on", "environments"];
const GITHUB: &[&str] = &["webhook_secret", "max_payload"];
const REGISTRY_HOOK: &[&str] = &["token", "max_payload", "hosts"];
const SECRET: &[&str] = &["env", "file"];
const REGISTRY: &[&str] = &["host", "username", "password", "token"];
const PROJECT: &[&str] = &["name", "parallelism", "store", "lease", "max_log_bytes"];
const ENVIRONMENT: &[&str] = &["name", "git", "promote_from", "soak", "approval", "windows", "timezone"];
const GIT: &[&str] = &["url", "branch", "path", "poll", "timeout", "username", "password"];
const SERVICE: &[&str] = &[
    "name",
    "target",
    "listen",
    "instances",
    "command",
    "env",
    "health",
    "rollout",
    "migrate",
    "bootstrap",
    "verify",
    "stop_grace",
    "artifact",
    "image",
    "secrets",
    "secret_files",
    "follows",
    "auto_deploy",
    "tags",
    "keep_tags",
    "on_workflow",
];
const ON_WORKFLOW: &[&str] = &["workflow", "branch", "version", "repository", "events"];
const ARTIFACT: &[&str] = &["url", "attempts", "timeout"];
const HEALTH: &[&str] = &["http", "status", "command", "interval", "timeout", "healthy_after", "deadline"];
const ROLLOUT: &[&str] = &["strategy", "max_surge", "max_unavailable", "drain"];
const STEP: &[&str] = &["command", "timeout", "idempotent"];
const JOB: &[&str] = &[
    "name",
    "command",
    "shell",
    "needs",
    "reads",
    "writes",
    "timeout",
    "kill_grace",
    "retry",
    "idempotent",
    "service",
    "environments",
    "env",
    "secrets",
    "files",
    "target",
];
const RETRY: &[&str] = &["attempts", "on", "backoff", "max_backoff"];

/// The keys a `[[service]]` may have: the common ones and every
/// registered target's own (which of those a service may use is checked
/// against its target when it is built).
fn service_keys() -> Vec<&'static str> {
    SERVICE.iter().copied().chain(crate::targets::kinds().iter().flat_map(|k| k.service_keys().iter().map(|key| key.name))).collect()
}

/// Each table named `name` of the document (one, or each element of an
/// array of tables), in order, spans kept. Elements of the wrong type read
/// as empty tables, so indexes match the typed pass's.
pub fn tables_named<'i>(doc: &Spanned<DeTable<'i>>, name: &str) -> Vec<Spanned<DeTable<'i>>> {
    let Some(v) = doc.get_ref().get(name) else { return vec![] };
    match v.get_ref() {
        DeValue::Table(t) => vec![Spanned::new(v.span(), t.clone())],
        DeValue::Array(a) => a
            .iter()
            .map(|t| match t.get_ref() {
                DeValue::Table(table) => Spanned::new(t.span(), table.clone()),
                _ => Spanned::new(t.span(), DeTable::default()),
            })
            .collect(),
        _ => vec![],
    }
}

/// The keys a `[[job]]` may have: the common ones and every registered
/// target's own.
fn job_keys() -> Vec<&'static str> {
    JOB.iter().copied().chain(crate::targets::kinds().iter().flat_map(|k| k.job_keys().iter().map(|key| key.name))).collect()
}

/// The top-level tables registered targets own, with their keys.
fn kind_tables() -> impl Iterator<Item = &'static crate::targets::TableKeys> {
    crate::targets::kinds().iter().flat_map(|k| k.tables().iter())
}

pub fn check_keys(doc: &DeTable<'_>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let top: Vec<&str> = TOP.iter().copied().chain(kind_tables().map(|t| t.name)).collect();
    check_table(doc, &top, "", &mut problems);
    for (key, value) in doc.iter() {
        let allowed = match key.get_ref().as_ref() {
            "project" => PROJECT,
            "environment" => ENVIRONMENT,
            "service" => &service_keys(),
            "job" => &job_keys(),
            "registry" => REGISTRY,
            "github" => GITHUB,
            "events" => EVENTS,
            "registry_hook" => REGISTRY_HOOK,
            "notify" => NOTIFY,
            "sqs" => SQS,
            "aws" => crate::aws::KEYS,
            "secret" => {
                // `[secret.NAME]`: one table per secret, under any name.
                for table in tables(value) {
                    for (name, v) in table.iter() {
                        for t in tables(v) {
                            check_table(t, SECRET, &format!("[secret.{}]", name.get_ref()), &mut problems);
                        }
                    }
                }
                continue;
            }
            other => match kind_tables().find(|t| t.name == other) {
                Some(t) => &t.keys.iter().map(|k| k.name).collect::<Vec<_>>(),
                None => continue,
            },
        };
        let name = key.get_ref().as_ref();
        let single = matches!(name, "project" | "github" | "registry_hook" | "events" | "sqs" | "aws") || kind_tables().any(|t| t.name == name && !t.array);
        let path = if single { format!("[{name}]") } else { format!("[[{name}]]") };
        for table in tables(value) {
            check_table(table, allowed, &path, &mut problems);
            for (k, v) in table.iter() {
                let sub = match (name, k.get_ref().as_ref()) {
                    ("job", "retry") => Some((RETRY, "job.retry")),
                    ("service", "health") => Some((HEALTH, "service.health")),
                    ("service", "rollout") => Some((ROLLOUT, "service.rollout")),
                    ("service", "migrate") => Some((STEP, "service.migrate")),
                    ("service", "bootstrap") => Some((STEP, "service.bootstrap")),
                    ("service", "verify") => Some((STEP, "service.verify")),
                    ("service", "artifact") => Some((ARTIFACT, "service.artifact")),
                    ("service", "on_workflow") => Some((ON_WORKFLOW, "service.on_workflow")),
                    ("environment", "git") => Some((GIT, "environment.git")),
                    _ => None,
                };
                if let Some((allowed, path)) = sub {
                    for t in tables(v) {
                        check_table(t, allowed, path, &mut problems);
                    }
                }
            }
        }
    }
    problems
}

/// The tables in a value: itself, or each element of an array of tables.
/// Values of the wrong type are left to the typed pass to report.
fn tables<'a, 'i>(value: &'a Spanned<DeValue<'i>>) -> Vec<&'a DeTable<'i>> {
    match value.get_ref() {
        DeValue::Table(t) => vec![t],
        DeValue::Array(a) => a
            .iter()
            .filter_map(|v| match v.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

fn check_table(table: &DeTable<'_>, allowed: &[&str], path: &str, problems: &mut Vec<Problem>) {
    for (key, _) in table.iter() {
        let k = key.get_ref().as_ref();
        if allowed.contains(&k) {
            continue;
        }
        let place = if path.is_empty() { "at the top level".to_string() } else { format!("in {path}") };
        let hint = match did_you_mean(k, allowed.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("known keys here: {}", allowed.join(", ")),
        };
        problems.push(Problem::new(ProblemKind::UnknownKey, Some(key.span()), format!("unknown key `{k}` {place}")).label("unknown key").hint(hint));
    }
}
