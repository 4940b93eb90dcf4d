//! The keys each table of `slipway.toml` accepts, with the type of each
//! value, in one place. Walking the spanned document with them (rather
//! than `deny_unknown_fields` and serde's first error) reports every
//! unknown key and every value of the wrong type at once, each at its own
//! line and column and in the user's words ("a whole number of
//! instances", not `expected i64`). `slipway schema` prints the same
//! definitions as a JSON Schema for editors ([`json_schema`]).

use std::ops::Range;

use serde_json::{Value, json};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Problem, ProblemKind, did_you_mean};

/// What a key's value must be.
#[derive(Clone, Copy)]
pub enum Ty {
    Text,
    /// A whole number of the noun ("instances"); "" for a bare number.
    Int(&'static str),
    Bool,
    Float,
    /// Text humantime reads: "30s", "5m", "1h 30m".
    Duration,
    TextList,
    /// A table of text values: `{ KEY = "value" }`.
    TextMap,
    /// A list of arguments (or, for a job, one line with `shell = true`).
    Command {
        line: bool,
    },
    /// `"any"` or a list of exit codes.
    RetryOn,
    /// An address, or a table of addresses per environment.
    Listen,
    IntOrText,
    /// Anything (a target's own list, checked by the target).
    Any,
    Table(&'static [K]),
}

/// One key of a table.
#[derive(Clone, Copy)]
pub struct K {
    pub name: &'static str,
    pub ty: Ty,
    pub required: bool,
    pub doc: &'static str,
}

const fn k(name: &'static str, ty: Ty, doc: &'static str) -> K {
    K { name, ty, required: false, doc }
}

const fn req(name: &'static str, ty: Ty, doc: &'static str) -> K {
    K { name, ty, required: true, doc }
}

const PROJECT: &[K] = &[
    k("name", Ty::Text, "the project's name"),
    k("parallelism", Ty::Int("jobs at once"), "how many jobs a node runs at once"),
    k("store", Ty::Text, "the store: sqlite://PATH or postgres://…"),
    k("lease", Ty::Duration, "a node silent this long is taken for dead"),
    k("max_log_bytes", Ty::Int("bytes"), "output kept per job attempt"),
];
const GIT: &[K] = &[
    req("url", Ty::Text, "the repository: a path, https://…, ssh://… or git@host:path"),
    k("branch", Ty::Text, "the branch followed (default main)"),
    k("path", Ty::Text, "the config's directory in the repository"),
    k("poll", Ty::Duration, "how often the branch is fetched"),
    k("timeout", Ty::Duration, "a fetch that takes longer fails"),
    k("username", Ty::Text, "user for https (default x-access-token)"),
    k("password", Ty::Text, "the [secret.*] holding the https token"),
];
const ENVIRONMENT: &[K] = &[
    req("name", Ty::Text, "the environment's name"),
    k("git", Ty::Table(GIT), "take this environment's config from a git branch"),
    k("promote_from", Ty::Text, "the environment whose versions are promoted here"),
    k("soak", Ty::Duration, "how long a version runs there before it is promoted here"),
    k("approval", Ty::Bool, "a deploy here waits for an approver"),
    k("windows", Ty::TextList, "deploy windows, e.g. [\"Mon-Fri 09:00-17:00\"]"),
    k("timezone", Ty::Text, "the windows' time zone (default UTC)"),
];
const ARTIFACT: &[K] = &[
    req("url", Ty::Text, "the release tarball's URL, with {version}"),
    k("attempts", Ty::Int("attempts"), "tries of a download"),
    k("timeout", Ty::Duration, "a download that takes longer fails"),
];
const HEALTH: &[K] = &[
    k("http", Ty::Text, "the path checked over HTTP, e.g. \"/healthz\""),
    k("status", Ty::Int("HTTP status"), "the status a healthy instance answers"),
    k("command", Ty::Command { line: false }, "a command that exits 0 when healthy"),
    k("interval", Ty::Duration, "time between checks"),
    k("timeout", Ty::Duration, "a check that takes longer fails"),
    k("healthy_after", Ty::Int("passed checks"), "checks in a row that make an instance healthy"),
    k("deadline", Ty::Duration, "a rollout not healthy by then is rolled back"),
];
const ROLLOUT: &[K] = &[
    k("strategy", Ty::Text, "\"rolling\" or \"blue-green\""),
    k("max_surge", Ty::Int("instances"), "extra instances during a rollout"),
    k("max_unavailable", Ty::Int("instances"), "instances that may be down during a rollout"),
    k("drain", Ty::Duration, "how long old instances finish their requests"),
];
const STEP: &[K] = &[
    req("command", Ty::Command { line: false }, "the command, as a list of arguments"),
    k("timeout", Ty::Duration, "the step fails after this long"),
    k("idempotent", Ty::Bool, "safe to run again after a node died mid-run"),
];
const SERVICE: &[K] = &[
    req("name", Ty::Text, "the service's name"),
    k("target", Ty::Text, "where it runs: local, docker, ssh, ecs"),
    k("listen", Ty::Listen, "its stable address, or one per environment"),
    k("instances", Ty::Int("instances"), "how many instances run"),
    k("command", Ty::Command { line: false }, "what an instance runs; {port} and {version} are filled in"),
    k("env", Ty::TextMap, "environment variables of its instances"),
    k("health", Ty::Table(HEALTH), "how an instance is health-checked"),
    k("rollout", Ty::Table(ROLLOUT), "how a new version replaces the old"),
    k("migrate", Ty::Table(STEP), "run once per deployment before the rollout"),
    k("bootstrap", Ty::Table(STEP), "run once per environment before its first deploy"),
    k("verify", Ty::Table(STEP), "run after the rollout; failing rolls back"),
    k("stop_grace", Ty::Duration, "time between SIGTERM and SIGKILL"),
    k("artifact", Ty::Table(ARTIFACT), "a release tarball per version"),
    k("image", Ty::Text, "the container image, without a tag"),
    k("secrets", Ty::TextMap, "environment variables from [secret.*]: { VAR = \"secret\" }"),
    k("secret_files", Ty::TextMap, "files from [secret.*]: { \"/path\" = \"secret\" }"),
    k("follows", Ty::Text, "the image whose pushes it follows"),
    k("auto_deploy", Ty::TextList, "environments a new version deploys to by itself"),
    k("tags", Ty::Text, "which tags count as versions: a glob, or \"semver\""),
    k("keep_tags", Ty::Int("tags"), "retention: the newest tags kept"),
    k("on_workflow", Ty::Table(ON_WORKFLOW), "deploy when a GitHub Actions workflow succeeds on a branch"),
];
const ON_WORKFLOW: &[K] = &[
    req("workflow", Ty::Text, "the workflow's name or file path"),
    req("branch", Ty::Text, "the branch whose successful runs deploy"),
    req("version", Ty::Text, "the version, from {head_sha}, {head_sha:7}, {run_number}, {run_id}"),
    k("repository", Ty::Text, "only runs of this repository (owner/name)"),
    k("events", Ty::TextList, "the events whose runs count (default [\"push\"])"),
];
const RETRY: &[K] = &[
    k("attempts", Ty::Int("attempts"), "tries in all"),
    k("on", Ty::RetryOn, "\"any\" or the exit codes retried"),
    k("backoff", Ty::Duration, "the first wait between tries"),
    k("max_backoff", Ty::Duration, "the longest wait between tries"),
];
const JOB: &[K] = &[
    req("name", Ty::Text, "the job's name"),
    k("command", Ty::Command { line: true }, "what it runs: a list of arguments, or a line with shell = true"),
    k("shell", Ty::Bool, "run `command` as one line through /bin/sh"),
    k("needs", Ty::TextList, "jobs that must succeed first"),
    k("reads", Ty::TextList, "resources it reads (jobs writing them do not run at once)"),
    k("writes", Ty::TextList, "resources it writes"),
    k("timeout", Ty::Duration, "the job is stopped after this long"),
    k("kill_grace", Ty::Duration, "time between SIGTERM and SIGKILL"),
    k("retry", Ty::Table(RETRY), "when and how often it is tried again"),
    k("idempotent", Ty::Bool, "safe to run again after a node died mid-run"),
    k("service", Ty::Text, "the service it belongs to"),
    k("environments", Ty::TextList, "the environments it runs in (default all)"),
    k("env", Ty::TextMap, "environment variables"),
    k("secrets", Ty::TextMap, "environment variables from [secret.*]"),
    k("files", Ty::TextList, "globs of config files whose changes run it"),
    k("target", Ty::Text, "where it runs (default: on the node)"),
];
const SECRET: &[K] = &[k("env", Ty::Text, "read from this variable of Slipway's environment"), k("file", Ty::Text, "read from this file on the Slipway host")];
const REGISTRY: &[K] = &[
    req("host", Ty::Text, "the registry's host"),
    k("username", Ty::Text, "user name"),
    k("password", Ty::Text, "the [secret.*] holding the password"),
    k("token", Ty::Text, "the [secret.*] holding a bearer token"),
];
const GITHUB: &[K] =
    &[req("webhook_secret", Ty::Text, "the [secret.*] deliveries are signed with"), k("max_payload", Ty::Int("bytes"), "larger deliveries get 413")];
const REGISTRY_HOOK: &[K] = &[
    req("token", Ty::Text, "the [secret.*] notifications carry"),
    k("max_payload", Ty::Int("bytes"), "larger notifications get 413"),
    k("hosts", Ty::TextList, "registry hosts whose notifications are read"),
];
const NOTIFY: &[K] = &[
    k("url", Ty::Text, "where notifications are POSTed"),
    k("url_secret", Ty::Text, "the [secret.*] holding the URL"),
    k("format", Ty::Text, "\"json\" or \"slack\""),
    k("on", Ty::TextList, "the states notified"),
    k("environments", Ty::TextList, "only these environments"),
];
const EVENTS: &[K] =
    &[req("hmac_secret", Ty::Text, "the [secret.*] signed events are signed with"), k("environments", Ty::TextList, "where signed events may deploy")];
const SQS: &[K] = &[req("queue_url", Ty::Text, "the queue deploy requests come from")];
const AWS: &[K] = &[k("region", Ty::Text, "the AWS region"), k("endpoint", Ty::Text, "one URL for every AWS API (tests, compatible services)")];

/// The top level's own tables: (name, keys, an array of tables).
const TOP: &[(&str, &[K], bool, &str)] = &[
    ("project", PROJECT, false, "the project"),
    ("environment", ENVIRONMENT, true, "an environment"),
    ("service", SERVICE, true, "a service"),
    ("job", JOB, true, "a job"),
    ("registry", REGISTRY, true, "credentials for a registry"),
    ("github", GITHUB, false, "GitHub webhooks"),
    ("registry_hook", REGISTRY_HOOK, false, "registry notifications"),
    ("notify", NOTIFY, true, "an outgoing webhook"),
    ("events", EVENTS, false, "signed events"),
    ("sqs", SQS, false, "deploy requests from an SQS queue"),
    ("aws", AWS, false, "AWS"),
];

/// A target's keys as typed keys.
fn from_target(keys: &'static [crate::targets::Key]) -> impl Iterator<Item = K> {
    keys.iter().map(|key| K {
        name: key.name,
        ty: match key.kind {
            "integer" => Ty::Int(""),
            "float" => Ty::Float,
            "string" => Ty::Text,
            "integer or string" => Ty::IntOrText,
            _ => Ty::Any,
        },
        required: false,
        doc: key.doc,
    })
}

/// The keys a table of `name` (a top-level table) may have, registered
/// targets' own included.
fn keys_of(name: &str) -> Option<Vec<K>> {
    let own = |keys: &'static [K]| keys.iter().copied();
    let kinds = crate::targets::kinds();
    match name {
        "service" => Some(own(SERVICE).chain(kinds.iter().flat_map(|k| from_target(k.service_keys()))).collect()),
        "job" => Some(own(JOB).chain(kinds.iter().flat_map(|k| from_target(k.job_keys()))).collect()),
        _ => match TOP.iter().find(|t| t.0 == name) {
            Some(t) => Some(own(t.1).collect()),
            None => kind_tables().find(|t| t.name == name).map(|t| from_target(t.keys).collect()),
        },
    }
}

/// The top-level tables registered targets own, with their keys.
fn kind_tables() -> impl Iterator<Item = &'static crate::targets::TableKeys> {
    crate::targets::kinds().iter().flat_map(|k| k.tables().iter())
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

/// What the walk found: every problem, and the places (from a key to the
/// end of its value) holding a value of the wrong type, which the typed
/// pass reads as absent (see `super::without`).
#[derive(Default)]
pub struct Checked {
    pub problems: Vec<Problem>,
    pub wrong: Vec<Range<usize>>,
}

pub fn check_keys(doc: &DeTable<'_>) -> Checked {
    let mut out = Checked::default();
    let top: Vec<&str> = TOP.iter().map(|t| t.0).chain(["secret"]).chain(kind_tables().map(|t| t.name)).collect();
    for (key, value) in doc.iter() {
        let name = key.get_ref().as_ref();
        if !top.contains(&name) {
            unknown(key, &top, "", &mut out.problems);
            continue;
        }
        if name == "secret" {
            // `[secret.NAME]`: one table per secret, under any name.
            let DeValue::Table(secrets) = value.get_ref() else {
                out.problems.push(wrong_type("secret", &Ty::Table(SECRET), value));
                continue;
            };
            for (secret, v) in secrets.iter() {
                check_value(format!("`{}`", secret.get_ref()), "[secret]", &Ty::Table(SECRET), secret, v, &mut out);
            }
            continue;
        }
        let Some(keys) = keys_of(name) else { continue };
        let array = TOP.iter().find(|t| t.0 == name).map(|t| t.2).unwrap_or_else(|| kind_tables().any(|t| t.name == name && t.array));
        let path = if array { format!("[[{name}]]") } else { format!("[{name}]") };
        match (value.get_ref(), array) {
            (DeValue::Table(t), false) => check_table(t, &keys, &path, value.span(), &mut out),
            (DeValue::Array(items), true) => {
                for item in items {
                    match item.get_ref() {
                        DeValue::Table(t) => check_table(t, &keys, &path, item.span(), &mut out),
                        _ => out.problems.push(
                            Problem::new(
                                ProblemKind::WrongType,
                                Some(item.span()),
                                format!("each `{name}` is a table ([[{name}]]), not {}", found(item.get_ref())),
                            )
                            .label("not a table"),
                        ),
                    }
                }
            }
            _ => out.problems.push(
                Problem::new(
                    ProblemKind::WrongType,
                    Some(value.span()),
                    format!(
                        "`{name}` is {}, not {}",
                        if array { format!("a list of tables ([[{name}]])") } else { format!("a table ([{name}])") },
                        found(value.get_ref())
                    ),
                )
                .label("wrong type"),
            ),
        }
    }
    out
}

fn unknown(key: &Spanned<toml::de::DeString<'_>>, allowed: &[&str], path: &str, problems: &mut Vec<Problem>) {
    let k = key.get_ref().as_ref();
    let place = if path.is_empty() { "at the top level".to_string() } else { format!("in {path}") };
    let hint = match did_you_mean(k, allowed.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("known keys here: {}", allowed.join(", ")),
    };
    problems.push(Problem::new(ProblemKind::UnknownKey, Some(key.span()), format!("unknown key `{k}` {place}")).label("unknown key").hint(hint));
}

fn check_table(table: &DeTable<'_>, keys: &[K], path: &str, span: Range<usize>, out: &mut Checked) {
    let names: Vec<&str> = keys.iter().map(|k| k.name).collect();
    for (key, value) in table.iter() {
        match keys.iter().find(|k| k.name == key.get_ref().as_ref()) {
            Some(k) => check_value(format!("`{}`", k.name), path, &k.ty, key, value, out),
            None => unknown(key, &names, path, &mut out.problems),
        }
    }
    for k in keys.iter().filter(|k| k.required && table.get(k.name).is_none()) {
        out.problems.push(
            Problem::new(
                ProblemKind::MissingKey,
                Some(span.start..span.start.max(span.end.min(span.start + 1))),
                format!("{path} needs `{}` ({})", k.name, k.doc),
            )
            .label(format!("no `{}`", k.name))
            .hint(format!("add `{} = …`: {}", k.name, words(&k.ty))),
        );
    }
}

/// Check one value against its type; a wrong one is a problem, and its
/// key-to-value range is noted in `out.wrong`.
fn check_value(what: String, parent: &str, ty: &Ty, key: &Spanned<toml::de::DeString<'_>>, value: &Spanned<DeValue<'_>>, out: &mut Checked) {
    let v = value.get_ref();
    let ok = match (ty, v) {
        (Ty::Any, _) => true,
        (Ty::Text | Ty::Duration, DeValue::String(_)) => true,
        (Ty::Int(_), DeValue::Integer(_)) | (Ty::Bool, DeValue::Boolean(_)) | (Ty::Float, DeValue::Float(_) | DeValue::Integer(_)) => true,
        (Ty::IntOrText, DeValue::Integer(_) | DeValue::String(_)) => true,
        (Ty::TextList, DeValue::Array(a)) => all_text(a),
        (Ty::Command { .. }, DeValue::Array(a)) => all_text(a),
        (Ty::Command { line: true }, DeValue::String(_)) => true,
        (Ty::TextMap, DeValue::Table(t)) => t.iter().all(|(_, v)| matches!(v.get_ref(), DeValue::String(_))),
        (Ty::Listen, DeValue::String(_)) => true,
        (Ty::Listen, DeValue::Table(t)) => t.iter().all(|(_, v)| matches!(v.get_ref(), DeValue::String(_))),
        (Ty::RetryOn, DeValue::String(_)) => true,
        (Ty::RetryOn, DeValue::Array(a)) => a.iter().all(|v| matches!(v.get_ref(), DeValue::Integer(_))),
        (Ty::Table(keys), DeValue::Table(t)) => {
            // `[[job]]` and `retry`: "job.retry"; `[secret]` and `db`: "[secret.db]".
            let path = match parent.trim_matches(|c| c == '[' || c == ']') {
                "secret" => format!("[secret.{}]", what.trim_matches('`')),
                p => format!("{p}.{}", what.trim_matches('`')),
            };
            check_table(t, keys, &path, value.span(), out);
            true
        }
        _ => false,
    };
    if !ok {
        let name = what.trim_matches('`');
        let mut p = wrong_type(name, ty, value);
        p.message = format!("{what} takes {}, not {}", words(ty), found(v));
        if let Some(h) = fix_hint(ty, v) {
            p.hint = Some(h);
        }
        out.problems.push(p);
        out.wrong.push(key.span().start..value.span().end);
    }
}

fn all_text(a: &[Spanned<DeValue<'_>>]) -> bool {
    a.iter().all(|v| matches!(v.get_ref(), DeValue::String(_)))
}

fn wrong_type(name: &str, ty: &Ty, value: &Spanned<DeValue<'_>>) -> Problem {
    Problem::new(ProblemKind::WrongType, Some(value.span()), format!("`{name}` takes {}, not {}", words(ty), found(value.get_ref()))).label("wrong type")
}

/// What a type is, for people.
pub fn words(ty: &Ty) -> String {
    match ty {
        Ty::Text => "text in quotes".into(),
        Ty::Int("") => "a whole number".into(),
        Ty::Int(noun) => format!("a whole number of {noun}"),
        Ty::Bool => "true or false".into(),
        Ty::Float => "a number".into(),
        Ty::Duration => "a duration in quotes, like \"30s\", \"5m\" or \"1h 30m\"".into(),
        Ty::TextList => "a list of texts, like [\"a\", \"b\"]".into(),
        Ty::TextMap => "a table of texts, like { NAME = \"value\" }".into(),
        Ty::Command { line: false } => "a list of arguments, like [\"./deploy.sh\", \"--fast\"]".into(),
        Ty::Command { line: true } => "a list of arguments, like [\"./deploy.sh\", \"--fast\"] (or one line in quotes with `shell = true`)".into(),
        Ty::RetryOn => "\"any\" or a list of exit codes, like [75, 111]".into(),
        Ty::Listen => "an address in quotes, like \"127.0.0.1:8080\", or a table of them per environment".into(),
        Ty::IntOrText => "a whole number or text".into(),
        Ty::Any => "anything".into(),
        Ty::Table(_) => "a table, like { key = value }".into(),
    }
}

/// What a value is, for people.
fn found(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("text ({:?})", s.as_ref()),
        DeValue::Integer(i) => format!("a whole number ({})", i.as_str()),
        DeValue::Float(f) => format!("a number ({})", f.as_str()),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(_) => "a date".into(),
        DeValue::Array(a) if a.iter().any(|v| !matches!(v.get_ref(), DeValue::String(_))) && a.iter().any(|v| matches!(v.get_ref(), DeValue::String(_))) => {
            "a list mixing texts and other values".into()
        }
        DeValue::Array(a) => match a.iter().find(|v| !matches!(v.get_ref(), DeValue::String(_))) {
            Some(other) => format!("a list holding {}", found(other.get_ref())),
            None => "a list of texts".into(),
        },
        DeValue::Table(t) => match t.iter().find(|(_, v)| !matches!(v.get_ref(), DeValue::String(_))) {
            Some((k, other)) => format!("a table whose `{}` is {}", k.get_ref().as_ref(), found(other.get_ref())),
            None => "a table".into(),
        },
    }
}

/// A hint where the fix is plain: a number in quotes, a bare number where
/// a duration is wanted.
fn fix_hint(ty: &Ty, v: &DeValue<'_>) -> Option<String> {
    match (ty, v) {
        (Ty::Int(_), DeValue::String(s)) if s.as_ref().trim().parse::<i64>().is_ok() => Some(format!("write {} without the quotes", s.as_ref().trim())),
        (Ty::Bool, DeValue::String(s)) if matches!(s.as_ref(), "true" | "false") => Some(format!("write {} without the quotes", s.as_ref())),
        (Ty::Duration, DeValue::Integer(i)) => Some(format!("a number alone has no unit: write \"{}s\" for seconds", i.as_str())),
        (Ty::Text, DeValue::Integer(i)) => Some(format!("put it in quotes: \"{}\"", i.as_str())),
        (Ty::TextList, DeValue::String(s)) => Some(format!("a list of one: [{:?}]", s.as_ref())),
        _ => None,
    }
}

// ---- the same definitions as a JSON Schema ----

/// A JSON Schema (draft 2020-12) of `slipway.toml`, for editors (taplo,
/// Even Better TOML): every key, its type and what it is for. Validation
/// of values beyond their type (names, references, windows) is
/// `slipway validate`'s.
pub fn json_schema() -> Value {
    let mut props = serde_json::Map::new();
    for (name, _, array, doc) in TOP {
        let keys = keys_of(name).unwrap_or_default();
        props.insert(name.to_string(), top_schema(&keys, *array, doc));
    }
    props.insert(
        "secret".into(),
        json!({"type": "object", "description": "secrets by name: where each value is read from", "additionalProperties": table_schema(SECRET, "a secret")}),
    );
    for t in kind_tables() {
        let keys: Vec<K> = from_target(t.keys).collect();
        props.insert(t.name.to_string(), top_schema(&keys, t.array, t.doc));
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://slipway.dev/slipway.schema.json",
        "title": "slipway.toml",
        "description": format!("Slipway {}'s config: services, jobs, environments. `slipway validate` checks the rest.", env!("CARGO_PKG_VERSION")),
        "type": "object",
        "additionalProperties": false,
        "properties": props,
    })
}

fn top_schema(keys: &[K], array: bool, doc: &str) -> Value {
    let table = table_schema(keys, doc);
    if array { json!({"type": "array", "description": doc, "items": table}) } else { table }
}

fn table_schema(keys: &[K], doc: &str) -> Value {
    let mut props = serde_json::Map::new();
    for key in keys {
        let mut s = ty_schema(&key.ty);
        if let Some(o) = s.as_object_mut() {
            o.insert("description".into(), json!(key.doc));
        }
        props.insert(key.name.to_string(), s);
    }
    let required: Vec<&str> = keys.iter().filter(|k| k.required).map(|k| k.name).collect();
    json!({"type": "object", "description": doc, "additionalProperties": false, "properties": props, "required": required})
}

fn ty_schema(ty: &Ty) -> Value {
    let texts = json!({"type": "array", "items": {"type": "string"}});
    let text_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    match ty {
        Ty::Text => json!({"type": "string"}),
        Ty::Int(_) => json!({"type": "integer"}),
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Float => json!({"type": "number"}),
        Ty::Duration => json!({"type": "string", "examples": ["30s", "5m", "1h 30m"]}),
        Ty::TextList | Ty::Command { line: false } => texts,
        Ty::TextMap => text_map,
        Ty::Command { line: true } => json!({"anyOf": [texts, {"type": "string"}]}),
        Ty::RetryOn => json!({"anyOf": [{"const": "any"}, {"type": "array", "items": {"type": "integer"}}]}),
        Ty::Listen => json!({"anyOf": [{"type": "string"}, text_map]}),
        Ty::IntOrText => json!({"type": ["integer", "string"]}),
        Ty::Any => json!({}),
        Ty::Table(keys) => table_schema(keys, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Checked {
        let doc = DeTable::parse(text).expect("toml");
        check_keys(doc.get_ref())
    }

    #[test]
    fn every_wrong_type_is_reported_in_words() {
        let c = check(
            "[[service]]\nname = \"web\"\ninstances = \"3\"\nstop_grace = 5\nhealth = { healthy_after = true }\n\n[[job]]\nname = 7\nneeds = \"build\"\n",
        );
        let messages: Vec<&str> = c.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(c.problems.len(), 5, "{messages:#?}");
        assert!(messages.contains(&"`instances` takes a whole number of instances, not text (\"3\")"), "{messages:#?}");
        assert!(messages.iter().any(|m| m.starts_with("`stop_grace` takes a duration in quotes")), "{messages:#?}");
        assert!(messages.contains(&"`healthy_after` takes a whole number of passed checks, not true"), "{messages:#?}");
        assert!(messages.contains(&"`name` takes text in quotes, not a whole number (7)"), "{messages:#?}");
        assert!(messages.iter().all(|m| !m.contains("i64") && !m.contains("expected")), "{messages:#?}");
        let instances = c.problems.iter().find(|p| p.message.starts_with("`instances`")).expect("instances");
        assert_eq!(instances.hint.as_deref(), Some("write 3 without the quotes"));
        assert_eq!(c.wrong.len(), 5);
    }

    #[test]
    fn the_schema_names_every_key_the_walk_knows() {
        let schema = json_schema();
        let service = &schema["properties"]["service"]["items"]["properties"];
        for key in SERVICE.iter().map(|k| k.name).chain(["port"]) {
            assert!(service.get(key).is_some(), "service key {key} missing from the schema");
        }
        assert_eq!(schema["properties"]["job"]["items"]["required"], json!(["name"]));
        assert_eq!(schema["properties"]["service"]["items"]["properties"]["health"]["properties"]["deadline"]["type"], "string");
    }
}
