//! `[[service]]`: what Slipway deploys and keeps running.
//!
//! A service with a `command` is *managed*: Slipway runs its instances,
//! health-checks them and moves traffic between versions through a proxy
//! on the service's stable `listen` address. Deploying it runs two jobs
//! that the config gets for free, `<service>.migrate` (when the service
//! declares `migrate`) and `<service>.rollout` after it, so the planner,
//! the scheduler and the record treat them as any other job: a completed
//! migration never runs again, an interrupted one is retried only when
//! declared idempotent.
//!
//! A service without `command` only names a group of jobs (`service = …`
//! on a job).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::secret::{RegistryAuth, SecretRef};
use super::{Command, Job, JobSpans, Problem, ProblemKind, Retry, check_name, duration, positive};

/// Largest `keep_tags`: far above any registry's per-repository limit.
pub const MAX_KEEP_TAGS: i64 = 10_000;

/// Placeholders a service's command (and its health/migrate/verify
/// commands) may use. `{port}` is the instance's own port.
pub const SERVICE_PLACEHOLDERS: &[&str] = &["{port}", "{version}", "{service}", "{env}", "{deployment}", "{revision}"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// The proxy's stable address: what clients connect to.
    pub listen: SocketAddr,
    pub instances: u32,
    /// Argv template; `{port}` and `{version}` are filled per instance.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub health: HealthSpec,
    pub rollout: RolloutSpec,
    /// Run after the new instances take traffic; failing it rolls back.
    pub verify: Option<StepSpec>,
    /// SIGTERM, then SIGKILL after this.
    pub stop_grace: Duration,
    /// A release tarball to fetch per version; the service's commands
    /// then run in its unpacked directory.
    pub artifact: Option<ArtifactSpec>,
    /// Where instances run: a registered target's name (`local` unless
    /// the service names one).
    #[serde(default = "default_target")]
    pub target: String,
    /// Targets that run images: the image (its versions are its tags) and
    /// the credentials for its registry.
    #[serde(default)]
    pub image: Option<ImageSpec>,
    /// Targets that place files: files written into each instance before
    /// it starts (mode 0444): absolute path in the instance → secret.
    #[serde(default)]
    pub secret_files: BTreeMap<String, SecretRef>,
    /// The target's own settings ([`crate::targets::TargetKind::service_settings`]).
    #[serde(default, skip_serializing_if = "crate::targets::Settings::is_empty")]
    pub settings: crate::targets::Settings,
    /// Environment variables whose values are secrets, read on the node
    /// when an instance (or the migration) starts: name → secret.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRef>,
    /// `listen = { staging = "…", production = "…" }`: the address per
    /// environment (one node can run both). Empty: `listen` everywhere.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub listen_in: BTreeMap<String, SocketAddr>,
}

impl ServiceSpec {
    /// Every secret the service's processes are given, as variables or
    /// files: what their output is masked with.
    pub fn secret_refs(&self) -> impl Iterator<Item = &SecretRef> {
        self.secrets.values().chain(self.secret_files.values())
    }

    /// The spec as deployed to `environment` (its own `listen`).
    pub fn for_environment(&self, environment: &str) -> ServiceSpec {
        let mut s = self.clone();
        if let Some(a) = self.listen_in.get(environment) {
            s.listen = *a;
        }
        s
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawListen {
    One(String),
    PerEnvironment(BTreeMap<String, String>),
}

fn default_target() -> String {
    crate::targets::DEFAULT.to_string()
}

/// The image a service on an image target runs. The deploy's version is
/// the image tag (`image:version`), pinned to its digest when the deploy
/// is accepted; `command`, when set, replaces the image's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// `registry/repository`, without a tag.
    pub repository: crate::values::Image,
    /// Credentials for the image's registry (the `[[registry]]` whose
    /// host the image names), if any.
    #[serde(default)]
    pub auth: Option<RegistryAuth>,
}

/// Which published versions may deploy by themselves: `"semver"`
/// (`1.2.3`, `v1.2.3`, with an optional pre-release or build part), or a
/// regular expression matched against the whole tag.
#[derive(Debug, Clone)]
pub enum TagFilter {
    Semver,
    Regex(regex::Regex),
}

impl TagFilter {
    pub fn parse(s: &str) -> Result<TagFilter, String> {
        if s == "semver" {
            return Ok(TagFilter::Semver);
        }
        regex::RegexBuilder::new(&format!("^(?:{s})$"))
            .size_limit(1 << 20)
            .build()
            .map(TagFilter::Regex)
            .map_err(|e| e.to_string().lines().last().unwrap_or("invalid").trim().to_string())
    }

    pub fn allows(&self, tag: &str) -> bool {
        match self {
            TagFilter::Semver => crate::values::semver(tag).is_some(),
            TagFilter::Regex(r) => r.is_match(tag),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TagFilter::Semver => "semver".into(),
            TagFilter::Regex(r) => r.as_str().trim_start_matches("^(?:").trim_end_matches(")$").to_string(),
        }
    }
}

/// "256m", "1g", "512k", or bytes.
pub fn memory(s: &Spanned<String>, problems: &mut Vec<Problem>) -> Option<u64> {
    let t = s.get_ref().trim().to_ascii_lowercase();
    let (digits, mult) = match t.strip_suffix(['k', 'm', 'g']) {
        Some(d) => (
            d,
            match t.chars().last() {
                Some('k') => 1u64 << 10,
                Some('m') => 1 << 20,
                _ => 1 << 30,
            },
        ),
        None => (t.as_str(), 1),
    };
    match digits.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).filter(|n| *n >= 6 << 20) {
        Some(n) => Some(n),
        None => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(s.span()), format!("`memory` {:?} is not a size of at least 6m", s.get_ref()))
                    .label("not a size")
                    .hint("write e.g. \"256m\" or \"1g\" (the Docker Engine refuses less than 6m)"),
            );
            None
        }
    }
}

/// Where a service's release tarballs come from. The SHA-256 of each comes
/// with the deploy request (`--sha256`): a tarball is never run unchecked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSpec {
    /// `http(s)://…`, with `{version}` (and `{service}`) filled per deploy.
    pub url: String,
    /// Tries before the fetch fails (timeouts and 5xx answers retry with
    /// backoff; 4xx answers and a wrong checksum do not).
    pub attempts: u32,
    /// The whole download, per try.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheck {
    /// GET this path on the instance; healthy when the status matches.
    Http { path: String, status: u16 },
    /// Run this argv (placeholders filled); healthy on exit code 0.
    Command { argv: Vec<String> },
    /// Healthy when the instance accepts a TCP connection on its port
    /// (the default when a service declares no check).
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub check: HealthCheck,
    pub interval: Duration,
    /// One check's own timeout.
    pub timeout: Duration,
    /// Consecutive passes that make an instance healthy.
    pub healthy_after: u32,
    /// An instance not healthy by then fails the rollout.
    pub deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Replace instances a few at a time: at most `max_surge` above the
    /// desired count, at most `max_unavailable` below it.
    Rolling { max_surge: u32, max_unavailable: u32 },
    /// Start a whole new set, switch all traffic at once.
    BlueGreen,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub strategy: Strategy,
    /// How long a replaced instance keeps serving its in-flight requests
    /// after it stops receiving new ones (it stops earlier when idle).
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    pub command: Vec<String>,
    pub timeout: Duration,
    pub idempotent: bool,
}

// ---- the serde shape -------------------------------------------------------

#[derive(Deserialize)]
pub(super) struct RawService {
    pub name: Spanned<String>,
    pub target: Option<Spanned<String>>,
    pub listen: Option<Spanned<RawListen>>,
    pub instances: Option<Spanned<i64>>,
    pub command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub health: Option<Spanned<RawHealth>>,
    pub rollout: Option<Spanned<RawRollout>>,
    pub migrate: Option<Spanned<RawStep>>,
    pub bootstrap: Option<Spanned<RawStep>>,
    pub verify: Option<Spanned<RawStep>>,
    pub stop_grace: Option<Spanned<String>>,
    pub artifact: Option<Spanned<RawArtifact>>,
    pub image: Option<Spanned<String>>,
    pub secrets: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub secret_files: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub follows: Option<Spanned<String>>,
    pub auto_deploy: Option<Vec<Spanned<String>>>,
    pub tags: Option<Spanned<String>>,
    pub keep_tags: Option<Spanned<i64>>,
    pub on_workflow: Option<Spanned<super::workflow::RawOnWorkflow>>,
}

#[derive(Deserialize)]
pub(super) struct RawArtifact {
    url: Spanned<String>,
    attempts: Option<Spanned<i64>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawHealth {
    http: Option<Spanned<String>>,
    status: Option<Spanned<i64>>,
    command: Option<Spanned<Vec<String>>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    healthy_after: Option<Spanned<i64>>,
    deadline: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawRollout {
    strategy: Option<Spanned<String>>,
    max_surge: Option<Spanned<i64>>,
    max_unavailable: Option<Spanned<i64>>,
    drain: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawStep {
    command: Spanned<Vec<String>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    idempotent: bool,
}

/// A built service: its name and, when managed, its spec and the jobs a
/// deploy of it runs.
pub(super) struct Built {
    pub spec: Option<ServiceSpec>,
    pub jobs: Vec<Job>,
}

fn argv(v: &Spanned<Vec<String>>, what: &str, problems: &mut Vec<Problem>) -> Vec<String> {
    if v.get_ref().first().is_none_or(|p| p.is_empty()) {
        problems.push(
            Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("`{what}` is empty"))
                .label("empty")
                .hint("the first element is the program to run"),
        );
    }
    for arg in v.get_ref() {
        for p in placeholders_in(arg) {
            if !SERVICE_PLACEHOLDERS.contains(&p.as_str()) {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("unknown placeholder {p} in `{what}`"))
                        .label("here")
                        .hint(format!("known placeholders: {}", SERVICE_PLACEHOLDERS.join(", "))),
                );
            }
        }
    }
    v.get_ref().clone()
}

/// `{word}` sequences in an argument.
fn placeholders_in(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else { break };
        let word = &rest[start..start + len + 1];
        if word.len() > 2 && word[1..word.len() - 1].chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(word.to_string());
        }
        rest = &rest[start + len + 1..];
    }
    out
}

fn nonneg(v: &Spanned<i64>, what: &str, max: i64, problems: &mut Vec<Problem>) -> Option<u32> {
    let n = *v.get_ref();
    if !(0..=max).contains(&n) {
        problems.push(Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("`{what}` must be between 0 and {max}, not {n}")).label("out of range"));
        None
    } else {
        Some(n as u32)
    }
}

pub(super) fn build(
    raw: RawService,
    table: &Spanned<toml::de::DeTable<'_>>,
    kind_tables: &BTreeMap<String, crate::targets::Settings>,
    secrets: &BTreeMap<String, SecretRef>,
    registries: &[RegistryAuth],
    environments: &[String],
    problems: &mut Vec<Problem>,
) -> (super::Service, Built) {
    check_name(&raw.name, "service", problems);
    let name = raw.name.get_ref().clone();
    let known = || crate::targets::kinds().iter().map(|k| format!("{:?} ({})", k.name(), k.about())).collect::<Vec<_>>().join("; ");
    let (target, kind) = match &raw.target {
        Some(t) => match crate::targets::kind(t.get_ref()) {
            Some(k) => (k.name().to_string(), Some(k)),
            None => {
                let hint = match super::diagnostic::did_you_mean(t.get_ref(), crate::targets::kinds().iter().map(|k| k.name())) {
                    Some(s) => format!("did you mean {s:?}? targets: {}", known()),
                    None => format!("targets: {}", known()),
                };
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(t.span()), format!("unknown target {:?}", t.get_ref())).label("unknown target").hint(hint),
                );
                (t.get_ref().clone(), None)
            }
        },
        None => (crate::targets::DEFAULT.to_string(), crate::targets::kind(crate::targets::DEFAULT)),
    };
    let caps = kind.map(|k| k.capabilities()).unwrap_or_default();
    // A service on an image target is versioned by its image's tags.
    let images = caps.uses_images;
    let follows = match (&raw.follows, &raw.image) {
        (Some(f), _) if images => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(f.span()), format!("a service on target {target:?} follows its own `image`"))
                    .label("not needed")
                    .hint("remove `follows`"),
            );
            None
        }
        (Some(f), _) if !crate::config::valid_image(f.get_ref()) => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(f.span()), format!("`follows` {:?} is not an image name without a tag", f.get_ref()))
                    .label("not registry/repository")
                    .hint("e.g. follows = \"ghcr.io/team/web\""),
            );
            None
        }
        (Some(f), _) => Some(f.get_ref().clone()),
        (None, Some(i)) if images => Some(i.get_ref().to_ascii_lowercase()),
        _ => None,
    };
    let mut auto_deploy = Vec::new();
    for e in raw.auto_deploy.iter().flatten() {
        if !environments.contains(e.get_ref()) {
            let hint = match super::diagnostic::did_you_mean(e.get_ref(), environments.iter().map(String::as_str)) {
                Some(s) => format!("did you mean {s:?}?"),
                None => format!("environments: {}", environments.join(", ")),
            };
            problems.push(
                Problem::new(ProblemKind::UnknownReference, Some(e.span()), format!("unknown environment {:?} in `auto_deploy`", e.get_ref()))
                    .label("no such environment")
                    .hint(hint),
            );
        } else {
            auto_deploy.push(e.get_ref().clone());
        }
    }
    let on_workflow = raw.on_workflow.as_ref().and_then(|w| super::workflow::build(w, problems));
    if let Some(a) = raw.auto_deploy.as_ref().and_then(|a| a.first())
        && follows.is_none()
        && raw.on_workflow.is_none()
    {
        problems.push(
            Problem::new(ProblemKind::MissingKey, Some(a.span()), format!("service {name:?} has `auto_deploy` but follows no image"))
                .label("nothing to follow")
                .hint("add follows = \"registry/repository\" (a service on an image target follows its `image`), or on_workflow = { workflow = \"CI\", branch = \"main\", version = \"{head_sha:7}\" }"),
        );
    }
    let tags = raw.tags.as_ref().and_then(|t| match TagFilter::parse(t.get_ref()) {
        Ok(f) => Some(f),
        Err(e) => {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(t.span()), format!("`tags` is not \"semver\" or a regular expression: {e}"))
                    .label("bad filter")
                    .hint("e.g. tags = \"semver\" or tags = \"^v?[0-9]+[.][0-9]+$\" (matched against the whole tag)"),
            );
            None
        }
    });
    // Retention deletes tags from a registry: only meaningful where the
    // service's versions are an image's tags.
    let keep_tags = raw.keep_tags.as_ref().and_then(|k| {
        let n = positive(k, "keep_tags", MAX_KEEP_TAGS, problems)?;
        if follows.is_none() && raw.follows.is_none() && !(images && raw.image.is_some()) {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidValue,
                    Some(k.span()),
                    format!("service {name:?} has `keep_tags` but no registry image whose tags it could keep"),
                )
                .label("no image")
                .hint("keep_tags is for the `image` of a service on an image target, or a service that `follows` an image"),
            );
            return None;
        }
        Some(n as u32)
    });
    let service =
        super::Service { span: raw.name.span(), name: name.clone(), target: target.clone(), spec: None, follows, auto_deploy, tags, keep_tags, on_workflow };
    // Keys this service's target does not take: the common ones its
    // capabilities rule out, and every other target's own.
    let able = |on: fn(&crate::targets::Capabilities) -> bool| {
        crate::targets::kinds().iter().filter(|k| on(&k.capabilities())).map(|k| format!("{:?}", k.name())).collect::<Vec<_>>().join(", ")
    };
    for (present, key, allowed, what) in [
        (raw.image.as_ref().map(|s| s.span()), "image", images, "targets that run images"),
        (raw.secret_files.as_ref().map(|s| s.span()), "secret_files", caps.secret_files, "targets that place files in instances"),
    ] {
        if let (Some(span), false, Some(_)) = (present, allowed, kind) {
            let on = if key == "image" { able(|c| c.uses_images) } else { able(|c| c.secret_files) };
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(span), format!("`{key}` is for {what}, and service {name:?} runs on target {target:?}"))
                    .label(format!("not for {target}"))
                    .hint(format!("set target to one of {on}, or remove the key")),
            );
        }
    }
    if let Some(kind) = kind {
        let own: Vec<&str> = kind.service_keys().iter().map(|k| k.name).collect();
        for (key, _) in table.get_ref().iter() {
            let k = key.get_ref().as_ref();
            if own.contains(&k) {
                continue;
            }
            let owners: Vec<&str> = crate::targets::kinds().iter().filter(|o| o.service_keys().iter().any(|x| x.name == k)).map(|o| o.name()).collect();
            if let Some(first) = owners.first() {
                problems.push(
                    Problem::new(
                        ProblemKind::InvalidValue,
                        Some(key.span()),
                        format!("`{k}` is a key of target {first:?}, and service {name:?} runs on target {target:?}"),
                    )
                    .label(format!("{} only", owners.join("/")))
                    .hint(format!("add target = {first:?} to the service, or remove the key")),
                );
            }
        }
    }
    let managed = raw.command.is_some() || (images && raw.image.is_some());
    if !managed {
        // Not managed: every managed-only key is a mistake worth naming.
        for (present, key) in [
            (raw.listen.as_ref().map(|s| s.span()), "listen"),
            (raw.health.as_ref().map(|s| s.span()), "health"),
            (raw.rollout.as_ref().map(|s| s.span()), "rollout"),
            (raw.migrate.as_ref().map(|s| s.span()), "migrate"),
            (raw.bootstrap.as_ref().map(|s| s.span()), "bootstrap"),
            (raw.verify.as_ref().map(|s| s.span()), "verify"),
            (raw.instances.as_ref().map(|s| s.span()), "instances"),
            (raw.artifact.as_ref().map(|s| s.span()), "artifact"),
            (raw.secrets.as_ref().map(|s| s.span()), "secrets"),
        ] {
            if let Some(span) = present {
                let (missing, hint) = if images {
                    ("image", "add image = \"registry.example.org/team/web\" to the service")
                } else {
                    ("command", "add command = [\"./bin/server\", \"--port\", \"{port}\"] to the service")
                };
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(span), format!("service {name:?} sets `{key}` but has no `{missing}` to run"))
                        .label(format!("needs `{missing}`"))
                        .hint(hint),
                );
            }
        }
        return (service, Built { spec: None, jobs: vec![] });
    }
    // What the target cannot do is refused here, not when it is deployed.
    if let Some(k) = kind {
        // A target that runs its own rollout needs no instances of Slipway's.
        let cannot = if !caps.own_rollout && !caps.runs_instances { Some("does not run service instances") } else { None };
        if let Some(why) = cannot {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidValue,
                    raw.target.as_ref().map(|t| t.span()).or(Some(raw.name.span())),
                    format!("target {:?} {why}", k.name()),
                )
                .label("this target")
                .hint("`slipway targets` lists what each target can do"),
            );
        }
        // `verify` runs on the node against the proxy's address, or on each
        // host behind its own; a target whose own load balancer serves
        // the service has neither (not built there yet).
        if let (Some(v), true) = (&raw.verify, caps.own_rollout && !caps.proxied) {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("`verify` is not supported on target {:?} yet", k.name()))
                    .label("not on this target")
                    .hint("ECS judges the rollout by its own health checks; a smoke test can be a [[job]] that needs the service's rollout job"),
            );
        }
        for (step, key) in [(&raw.migrate, "migrate"), (&raw.bootstrap, "bootstrap")] {
            if let (Some(m), false) = (step, caps.runs_jobs) {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(m.span()), format!("target {:?} does not run jobs, so it cannot run `{key}`", k.name()))
                        .label("no jobs on this target")
                        .hint("`slipway targets` lists what each target can do"),
                );
            }
        }
    }
    let command_span = raw.command.as_ref().map(|c| c.span()).unwrap_or_else(|| raw.name.span());
    let command = raw.command.as_ref().map(|c| argv(c, "command", problems)).unwrap_or_default();
    // The target's own keys, read by the target's kind.
    let owner = format!("service {name:?}");
    let no_tables = crate::targets::Settings::default();
    let settings = kind.and_then(|k| {
        let kind = kind_tables.get(k.name()).unwrap_or(&no_tables);
        k.service_settings(&mut crate::targets::KeyTable { owner: &owner, table, kind, problems })
    });
    let image = if images {
        let image = match &raw.image {
            Some(i) if let Ok(image) = crate::values::Image::parse(i.get_ref()) => Some(image),
            Some(i) => {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(i.span()), format!("`image` {:?} is not an image name without a tag", i.get_ref()))
                        .label("not registry/repository")
                        .hint("e.g. image = \"registry.example.org:5000/team/web\"; the deploy's version is the tag"),
                );
                None
            }
            None => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(raw.name.span()), format!("service {name:?} on target {target:?} has no `image`"))
                        .label("this service")
                        .hint("add image = \"registry.example.org/team/web\""),
                );
                None
            }
        };
        if let Some(a) = &raw.artifact {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidValue,
                    Some(a.span()),
                    format!("a service on target {target:?} runs its image: `artifact` tarballs are for targets that run commands"),
                )
                .label(format!("not for {target}"))
                .hint("remove `artifact`; the deploy's version is the image tag"),
            );
        }
        image.map(|repository| {
            let auth = registries.iter().find(|r| r.host == super::secret::registry_host(repository.as_str())).cloned();
            ImageSpec { repository, auth }
        })
    } else {
        None
    };
    let mut secret_files = BTreeMap::new();
    if caps.secret_files {
        for (path, secret) in raw.secret_files.iter().flat_map(|m| m.get_ref().iter()) {
            if let Some(other) = raw.secret_files.iter().flat_map(|m| m.get_ref().keys()).find(|other| *other != path && path.starts_with(&format!("{other}/")))
            {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(secret.span()), format!("secret file {path:?} would be inside secret file {other:?}"))
                        .label("under another file"),
                );
            } else if !path.starts_with('/') || path.len() < 2 || path.ends_with('/') || path[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(secret.span()), format!("secret file {path:?} is not an absolute file path in the instance"))
                        .label("not /path/to/file")
                        .hint("e.g. secret_files = { \"/run/secrets/api_key\" = \"api_key\" }"),
                );
            }
            if let Some(r) = super::secret::lookup(secret, secrets, problems) {
                secret_files.insert(path.clone(), r);
            }
        }
    }
    if !images && !command.iter().any(|a| a.contains("{port}")) && !raw.env.values().any(|v| v.contains("{port}")) {
        problems.push(
            Problem::new(ProblemKind::InvalidValue, Some(command_span.clone()), format!("service {name:?}: its command never receives {{port}}"))
                .label("no {port}")
                .hint("each instance gets a fresh port: pass it, e.g. [\"./server\", \"--port\", \"{port}\"] or env = { PORT = \"{port}\" }"),
        );
    }
    let mut listen_in = BTreeMap::new();
    let listen = if kind.is_some() && !caps.proxied {
        // Served by the target's own load balancer: no proxy of Slipway's
        // binds it (the address is never used).
        if let Some(l) = &raw.listen {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidValue,
                    Some(l.span()),
                    format!("a service on target {target:?} is reached through its own load balancer, not Slipway's proxy"),
                )
                .label("not for this target")
                .hint("remove `listen`"),
            );
        }
        Some(SocketAddr::from(([0, 0, 0, 0], 0)))
    } else {
        match &raw.listen {
            None => {
                problems.push(
                    Problem::new(ProblemKind::MissingKey, Some(raw.name.span()), format!("managed service {name:?} has no `listen` address"))
                        .label("this service")
                        .hint("add listen = \"127.0.0.1:8080\": the stable address Slipway's proxy serves the service on"),
                );
                None
            }
            Some(l) => {
                let span = l.span();
                let addr = |text: &str, problems: &mut Vec<Problem>| match text.parse::<SocketAddr>() {
                    Ok(a) if a.port() != 0 => Some(a),
                    Ok(_) => {
                        problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(span.clone()), "`listen` needs a fixed port, not 0")
                                .label("port 0")
                                .hint("clients must know where to connect"),
                        );
                        None
                    }
                    Err(e) => {
                        problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(span.clone()), format!("`listen` is not an address: {e}"))
                                .label("not ip:port")
                                .hint("write e.g. \"127.0.0.1:8080\" or \"0.0.0.0:80\""),
                        );
                        None
                    }
                };
                match l.get_ref() {
                    RawListen::One(text) => addr(text, problems),
                    RawListen::PerEnvironment(map) => {
                        for (env, text) in map {
                            if !environments.contains(env) {
                                problems.push(
                                    Problem::new(ProblemKind::UnknownReference, Some(span.clone()), format!("`listen` names unknown environment {env:?}"))
                                        .label("no such environment")
                                        .hint(format!("declared environments: {}", environments.join(", "))),
                                );
                            }
                            if let Some(a) = addr(text, problems) {
                                listen_in.insert(env.clone(), a);
                            }
                        }
                        if let Some(missing) = environments.iter().find(|e| !map.contains_key(*e)) {
                            problems.push(
                                Problem::new(ProblemKind::MissingKey, Some(span.clone()), format!("`listen` has no address for environment {missing:?}"))
                                    .label("per environment")
                                    .hint("name every environment, e.g. listen = { staging = \"127.0.0.1:8081\", production = \"127.0.0.1:8080\" }"),
                            );
                        }
                        listen_in.values().next().copied()
                    }
                }
            }
        }
    };
    let instances = raw.instances.as_ref().and_then(|v| positive(v, "instances", 64, problems)).unwrap_or(1) as u32;

    // A target whose own load balancer serves the service (ECS) judges
    // its own health: only the deadline is Slipway's, and ECS completes a
    // deployment only after the old tasks drain (an ALB's deregistration
    // delay alone is 5 minutes by default).
    let own_balancer = kind.is_some() && caps.own_rollout && !caps.proxied;
    let mut health = HealthSpec {
        check: HealthCheck::Tcp,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        healthy_after: 1,
        deadline: if own_balancer { Duration::from_secs(30 * 60) } else { Duration::from_secs(60) },
    };
    if own_balancer {
        // What such a target never reads is refused, not ignored.
        let health_keys = raw.health.as_ref().map(|h| {
            let h = h.get_ref();
            [
                (h.http.as_ref().map(|x| x.span()), "health.http"),
                (h.command.as_ref().map(|x| x.span()), "health.command"),
                (h.status.as_ref().map(|x| x.span()), "health.status"),
                (h.interval.as_ref().map(|x| x.span()), "health.interval"),
                (h.timeout.as_ref().map(|x| x.span()), "health.timeout"),
                (h.healthy_after.as_ref().map(|x| x.span()), "health.healthy_after"),
            ]
        });
        let top = [
            (raw.command.as_ref().map(|x| x.span()), "command"),
            (raw.instances.as_ref().map(|x| x.span()), "instances"),
            (raw.rollout.as_ref().map(|x| x.span()), "rollout"),
            (raw.stop_grace.as_ref().map(|x| x.span()), "stop_grace"),
            (raw.secrets.as_ref().map(|x| x.span()), "secrets"),
        ];
        for (span, key) in top.into_iter().chain(health_keys.into_iter().flatten()) {
            let Some(span) = span else { continue };
            let hint = match key {
                "secrets" => {
                    "give the task definition its own `secrets` (SSM Parameter Store or Secrets Manager): ECS would show values passed by Slipway in the task's description"
                }
                "command" => "the task definition's container says what runs; `migrate` and `bootstrap` override it for one-off tasks",
                "instances" => "the ECS service's desired count says how many tasks run",
                _ => {
                    "ECS's own deployment settings and health checks (the task definition's, the load balancer's) judge the tasks; Slipway waits for ECS's verdict until `health.deadline`"
                }
            };
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(span), format!("`{key}` means nothing for a service on target {target:?}"))
                    .label("not for this target")
                    .hint(hint),
            );
        }
    }
    if let Some(h) = &raw.health {
        let span = h.span();
        let h = h.get_ref();
        health.check = match (&h.http, &h.command) {
            (Some(_), Some(c)) => {
                problems.push(Problem::new(ProblemKind::InvalidValue, Some(c.span()), "a health check is `http` or `command`, not both").label("second check"));
                HealthCheck::Tcp
            }
            (Some(p), None) => {
                if !p.get_ref().starts_with('/') {
                    problems.push(
                        Problem::new(ProblemKind::InvalidValue, Some(p.span()), "`health.http` is a path starting with '/'")
                            .label("not a path")
                            .hint("e.g. http = \"/healthz\""),
                    );
                }
                let status = match &h.status {
                    Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref() as u16,
                    Some(s) => {
                        problems.push(
                            Problem::new(ProblemKind::InvalidValue, Some(s.span()), format!("`health.status` {} is not an HTTP status", s.get_ref()))
                                .label("100–599"),
                        );
                        200
                    }
                    None => 200,
                };
                HealthCheck::Http { path: p.get_ref().clone(), status }
            }
            (None, Some(c)) => HealthCheck::Command { argv: argv(c, "health.command", problems) },
            (None, None) => {
                if let Some(s) = &h.status {
                    problems.push(
                        Problem::new(ProblemKind::InvalidValue, Some(s.span()), "`health.status` without `health.http`")
                            .label("no http check")
                            .hint("add http = \"/healthz\""),
                    );
                }
                let _ = span;
                HealthCheck::Tcp
            }
        };
        if let Some(d) = h.interval.as_ref().and_then(|d| duration(d, "health.interval", problems)) {
            health.interval = d;
        }
        if let Some(d) = h.timeout.as_ref().and_then(|d| duration(d, "health.timeout", problems)) {
            health.timeout = d;
        }
        if let Some(n) = h.healthy_after.as_ref().and_then(|n| positive(n, "health.healthy_after", 100, problems)) {
            health.healthy_after = n as u32;
        }
        if let Some(d) = h.deadline.as_ref().and_then(|d| duration(d, "health.deadline", problems)) {
            health.deadline = d;
        }
    }

    let mut rollout = RolloutSpec { strategy: Strategy::Rolling { max_surge: 1, max_unavailable: 0 }, drain: Duration::from_secs(2) };
    if let Some(r) = &raw.rollout {
        let r = r.get_ref();
        let surge = r.max_surge.as_ref().and_then(|v| nonneg(v, "rollout.max_surge", 64, problems));
        let unavailable = r.max_unavailable.as_ref().and_then(|v| nonneg(v, "rollout.max_unavailable", 64, problems));
        match r.strategy.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("rolling") => {
                let (s, u) = (surge.unwrap_or(1), unavailable.unwrap_or(0));
                if s == 0 && u == 0 {
                    let span = r.max_surge.as_ref().or(r.max_unavailable.as_ref()).map(|v| v.span());
                    problems.push(
                        Problem::new(
                            ProblemKind::InvalidValue,
                            span,
                            "a rolling rollout with max_surge = 0 and max_unavailable = 0 can never replace an instance",
                        )
                        .label("both zero")
                        .hint("allow one extra instance (max_surge = 1) or one fewer (max_unavailable = 1)"),
                    );
                }
                rollout.strategy = Strategy::Rolling { max_surge: s, max_unavailable: u };
            }
            Some("blue-green") | Some("blue_green") => {
                if let Some(v) = r.max_surge.as_ref().or(r.max_unavailable.as_ref()) {
                    problems.push(
                        Problem::new(ProblemKind::InvalidValue, Some(v.span()), "max_surge and max_unavailable belong to the rolling strategy")
                            .label("not for blue-green"),
                    );
                }
                rollout.strategy = Strategy::BlueGreen;
            }
            Some(other) => {
                let span = r.strategy.as_ref().map(|s| s.span());
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, span, format!("unknown rollout strategy {other:?}"))
                        .label("unknown")
                        .hint("use \"rolling\" or \"blue-green\""),
                );
            }
        }
        if let Some(d) = r.drain.as_ref().and_then(|d| duration(d, "rollout.drain", problems)) {
            rollout.drain = d;
        }
    }
    let step = |s: &Spanned<RawStep>, what: &str, problems: &mut Vec<Problem>| {
        let s = s.get_ref();
        StepSpec {
            command: argv(&s.command, &format!("{what}.command"), problems),
            timeout: s.timeout.as_ref().and_then(|d| duration(d, &format!("{what}.timeout"), problems)).unwrap_or(Duration::from_secs(600)),
            idempotent: s.idempotent,
        }
    };
    let migrate = raw.migrate.as_ref().map(|m| (m.span(), step(m, "migrate", problems)));
    let bootstrap = raw.bootstrap.as_ref().map(|b| step(b, "bootstrap", problems));
    let verify = raw.verify.as_ref().map(|v| step(v, "verify", problems));
    let stop_grace = raw.stop_grace.as_ref().and_then(|d| duration(d, "stop_grace", problems)).unwrap_or(Duration::from_secs(10));
    let artifact = raw.artifact.as_ref().map(|a| {
        let a = a.get_ref();
        let url = a.url.get_ref();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(a.url.span()), "`artifact.url` must be an http:// or https:// URL")
                    .label("not a URL")
                    .hint("e.g. url = \"https://releases.example.org/web-{version}.tar.gz\""),
            );
        }
        for p in placeholders_in(url) {
            if !["{version}", "{service}"].contains(&p.as_str()) {
                problems.push(
                    Problem::new(ProblemKind::InvalidValue, Some(a.url.span()), format!("unknown placeholder {p} in `artifact.url`"))
                        .label("here")
                        .hint("an artifact URL may use {version} and {service}"),
                );
            }
        }
        ArtifactSpec {
            url: url.clone(),
            attempts: a.attempts.as_ref().and_then(|n| positive(n, "artifact.attempts", 20, problems)).unwrap_or(4) as u32,
            timeout: a.timeout.as_ref().and_then(|d| duration(d, "artifact.timeout", problems)).unwrap_or(Duration::from_secs(600)),
        }
    });

    let Some(listen) = listen else {
        return (service, Built { spec: None, jobs: vec![] });
    };
    let (Some(settings), false) = (settings, images && image.is_none()) else {
        return (service, Built { spec: None, jobs: vec![] });
    };
    let secret_env = super::secret::env_secrets(raw.secrets.as_ref(), &raw.env, secrets, problems);
    let spec = ServiceSpec {
        name: name.clone(),
        listen,
        instances,
        command,
        env: raw.env,
        health,
        rollout,
        verify,
        stop_grace,
        artifact,
        target: target.clone(),
        image,
        secret_files,
        settings,
        secrets: secret_env,
        listen_in,
    };
    let job = |job_name: String, command: Command, timeout: Duration, idempotent: bool, needs: Vec<String>| Job {
        name: job_name,
        spans: JobSpans { name: raw.name.span(), needs: needs.iter().map(|_| raw.name.span()).collect(), ..JobSpans::default() },
        command,
        needs,
        reads: vec![],
        writes: vec![format!("service/{name}")],
        timeout,
        timeout_declared: true,
        kill_grace: Duration::from_secs(10),
        retry: Retry::default(),
        idempotent,
        service: Some(name.clone()),
        environments: None,
        env: BTreeMap::new(),
        secrets: BTreeMap::new(),
        secret_files: BTreeMap::new(),
        target: Some(target.clone()),
        // A service's jobs (its migration) reach the hosts the service runs on.
        settings: spec.settings.clone(),
        once_per_environment: false,
        files: vec![],
    };
    let mut jobs = Vec::new();
    let mut rollout_needs = Vec::new();
    // fetch → migrate → rollout: nothing runs before the tarball is
    // downloaded and its checksum verified.
    let mut migrate_needs = Vec::new();
    // Pulled before instances start; a target that runs no instances of
    // Slipway's (ECS) pulls by itself.
    if let (Some(i), true) = (&spec.image, caps.runs_instances) {
        let n = fetch_job(&name);
        jobs.push(job(n.clone(), Command::Pull(Box::new(i.clone())), Duration::from_secs(1860), true, vec![]));
        migrate_needs.push(n.clone());
        rollout_needs.push(n);
    } else if let Some(a) = &spec.artifact {
        let n = fetch_job(&name);
        let per_try = a.timeout + Duration::from_secs(30);
        jobs.push(job(n.clone(), Command::Fetch(Box::new(a.clone())), (per_try * a.attempts).min(super::MAX_DURATION), true, vec![]));
        migrate_needs.push(n.clone());
        rollout_needs.push(n);
    }
    // A target that finds a cut-off step again (and never runs it twice)
    // may resume it after a node's death.
    let resumable = crate::targets::kind(&target).is_some_and(|k| k.capabilities().resumes_jobs);
    // fetch → bootstrap (once per environment, ever) → migrate → rollout.
    if let Some(b) = &bootstrap {
        let n = bootstrap_job(&name);
        let mut bootstrap = job(n.clone(), Command::Argv(b.command.clone()), b.timeout, b.idempotent || resumable, migrate_needs);
        bootstrap.once_per_environment = true;
        bootstrap.secrets = spec.secrets.clone();
        bootstrap.secret_files = spec.secret_files.clone();
        jobs.push(bootstrap);
        migrate_needs = vec![n.clone()];
        rollout_needs = vec![n];
    }
    if let Some((_, m)) = &migrate {
        let n = migrate_job(&name);
        let mut migrate = job(n.clone(), Command::Argv(m.command.clone()), m.timeout, m.idempotent || resumable, migrate_needs);
        // The migration sees what the service sees.
        migrate.secrets = spec.secrets.clone();
        migrate.secret_files = spec.secret_files.clone();
        jobs.push(migrate);
        rollout_needs = vec![n];
    }
    let rollout_timeout = rollout_timeout(&spec);
    // Not retried after an interruption (a node died mid-rollout): the
    // restarted node brings the service back on its recorded version, the
    // new one only if it had taken all traffic, and the deployment says
    // it was interrupted. Deploying again is one command.
    jobs.push(job(rollout_job(&name), Command::Rollout(Box::new(spec.clone())), rollout_timeout, false, rollout_needs));
    (service, Built { spec: Some(spec), jobs })
}

pub fn fetch_job(service: &str) -> String {
    format!("{service}.fetch")
}

pub fn bootstrap_job(service: &str) -> String {
    format!("{service}.bootstrap")
}

pub fn migrate_job(service: &str) -> String {
    format!("{service}.migrate")
}

pub fn rollout_job(service: &str) -> String {
    format!("{service}.rollout")
}

/// Long enough for every instance to be replaced one by one, each waiting
/// its full health deadline and drain, plus verify and a margin.
fn rollout_timeout(s: &ServiceSpec) -> Duration {
    if let Some(t) = crate::targets::kind(&s.target).and_then(|k| k.rollout_timeout(s)) {
        return t.min(super::MAX_DURATION);
    }
    let per = s.health.deadline + s.rollout.drain + s.stop_grace;
    let verify = s.verify.as_ref().map(|v| v.timeout).unwrap_or_default();
    // A target that rolls out in rounds (hosts batch by batch) takes one
    // node's rollout per round, and as many again to roll back.
    let rounds = crate::targets::kind(&s.target).map(|k| k.rollout_rounds(&s.settings)).unwrap_or(1).max(1);
    let factor = if rounds > 1 { 2 * rounds } else { 1 };
    ((per * (2 * s.instances + 2) + verify + Duration::from_secs(60)) * factor).min(super::MAX_DURATION)
}
