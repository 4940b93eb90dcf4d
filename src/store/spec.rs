//! How the store writes the job and service specs it keeps (`jobs.spec`,
//! `services.spec`): its own types, versioned and tagged, converted from
//! and to the config's types.
//!
//! A row holds JSON tagged with its format: `{"format": "job/2", …}` or
//! `{"format": "service/2", …}` as written today, `/1` rows (before the
//! target was explicit) still read. Rows written before formats existed
//! carry no tag and have exactly the `/1` shape, so they read as `/1`.
//!
//! Why: these rows outlive the build that wrote them (a waiting deployment
//! runs its jobs after an upgrade; a restarted node brings back a service
//! from its stored spec; a rollback reads the spec it deployed). Were they
//! the config's types serialized directly, renaming a config field would
//! silently change what old rows mean. Here a config refactor changes only
//! the conversions below; a new stored shape is a new format (as `job/2`
//! was), and the reader keeps every older one. The shapes are pinned by a test
//! against rows the build before formats wrote.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, secret, service};

/// A job spec as a row holds it.
pub fn encode_job(spec: &super::JobSpec) -> Result<String, String> {
    let job = v2::Job::try_from(spec)?;
    serde_json::to_string(&StoredJob::V2(job)).map_err(|e| format!("job spec: {e}"))
}

/// A row's job spec, whatever format of it this build knows.
pub fn decode_job(s: &str) -> Result<super::JobSpec, String> {
    let job: v2::Job = match tagged::<StoredJob>(s, "job")? {
        Tagged::Tagged(StoredJob::V2(j)) => j,
        Tagged::Tagged(StoredJob::V1(j)) => j.into(),
        Tagged::Legacy(v) => serde_json::from_value::<v1::Job>(v).map_err(|e| format!("job spec: {e}"))?.into(),
    };
    job.try_into()
}

/// A service spec as a row holds it (`ServiceRow::spec`).
pub fn encode_service(spec: &service::ServiceSpec) -> String {
    // Plain data (strings, numbers, maps with string keys): cannot fail.
    serde_json::to_string(&StoredService::V2(v2::Service::from(spec))).unwrap_or_default()
}

/// A row's service spec, whatever format of it this build knows.
pub fn decode_service(s: &str) -> Result<service::ServiceSpec, String> {
    let svc: v2::Service = match tagged::<StoredService>(s, "service")? {
        Tagged::Tagged(StoredService::V2(v)) => v,
        Tagged::Tagged(StoredService::V1(v)) => v.into(),
        Tagged::Legacy(v) => serde_json::from_value::<v1::Service>(v).map_err(|e| format!("service spec: {e}"))?.into(),
    };
    svc.try_into()
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "format")]
enum StoredJob {
    #[serde(rename = "job/1")]
    V1(v1::Job),
    #[serde(rename = "job/2")]
    V2(v2::Job),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "format")]
enum StoredService {
    #[serde(rename = "service/1")]
    V1(v1::Service),
    #[serde(rename = "service/2")]
    V2(v2::Service),
}

enum Tagged<T> {
    Tagged(T),
    /// Written before formats existed: the `/1` shape, untagged.
    Legacy(serde_json::Value),
}

fn tagged<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<Tagged<T>, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("{what} spec is not JSON: {e}"))?;
    let Some(format) = v.get("format").map(|f| f.as_str().unwrap_or("?").to_string()) else {
        return Ok(Tagged::Legacy(v));
    };
    serde_json::from_value::<T>(v).map(Tagged::Tagged).map_err(|e| {
        if format.starts_with(&format!("{what}/")) && !e.to_string().contains("unknown variant") {
            format!("{what} spec ({format}): {e}")
        } else {
            format!("{what} spec in format {format:?}, which this Slipway does not know (written by a newer one?)")
        }
    })
}

/// Format `/1`: the shapes as the build before formats wrote them. Never
/// change a field here; add a `v2` instead.
mod v1 {
    use super::*;

    #[derive(Serialize, Deserialize)]
    pub struct Job {
        pub command: Command,
        pub timeout_ms: u64,
        pub kill_grace_ms: u64,
        pub retry_attempts: u32,
        pub retry_any: bool,
        pub retry_exit_codes: Vec<i32>,
        pub retry_backoff_ms: u64,
        pub retry_max_backoff_ms: u64,
        pub idempotent: bool,
        pub env: BTreeMap<String, String>,
        #[serde(default)]
        pub artifact: Option<Artifact>,
        #[serde(default)]
        pub secrets: BTreeMap<String, Secret>,
        #[serde(default)]
        pub secret_files: BTreeMap<String, Secret>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Command {
        Argv(Vec<String>),
        Shell(String),
        Rollout(Box<Service>),
        Fetch(Box<ArtifactSource>),
        Pull(Box<Container>),
    }

    #[derive(Serialize, Deserialize)]
    pub struct Artifact {
        pub url: String,
        pub sha256: String,
        #[serde(default)]
        pub kind: ArtifactKind,
    }

    #[derive(Serialize, Deserialize, Default)]
    #[serde(rename_all = "snake_case")]
    pub enum ArtifactKind {
        #[default]
        Tarball,
        Image,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Secret {
        pub name: String,
        #[serde(flatten)]
        pub source: SecretSource,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum SecretSource {
        Env(String),
        File(PathBuf),
    }

    #[derive(Serialize, Deserialize)]
    pub struct Service {
        pub name: String,
        pub listen: SocketAddr,
        pub instances: u32,
        pub command: Vec<String>,
        pub env: BTreeMap<String, String>,
        pub health: Health,
        pub rollout: Rollout,
        pub verify: Option<Step>,
        pub stop_grace: Duration,
        pub artifact: Option<ArtifactSource>,
        #[serde(default)]
        pub container: Option<Container>,
        #[serde(default)]
        pub secrets: BTreeMap<String, Secret>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub listen_in: BTreeMap<String, SocketAddr>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Container {
        pub image: String,
        pub port: u16,
        pub memory_bytes: Option<u64>,
        pub millicpus: Option<u32>,
        #[serde(default)]
        pub auth: Option<RegistryAuth>,
        #[serde(default)]
        pub secret_files: BTreeMap<String, Secret>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct RegistryAuth {
        pub host: String,
        pub username: Option<String>,
        pub password: Option<Secret>,
        pub token: Option<Secret>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct ArtifactSource {
        pub url: String,
        pub attempts: u32,
        pub timeout: Duration,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum HealthCheck {
        Http { path: String, status: u16 },
        Command { argv: Vec<String> },
        Tcp,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Health {
        pub check: HealthCheck,
        pub interval: Duration,
        pub timeout: Duration,
        pub healthy_after: u32,
        pub deadline: Duration,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Strategy {
        Rolling { max_surge: u32, max_unavailable: u32 },
        BlueGreen,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Rollout {
        pub strategy: Strategy,
        pub drain: Duration,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Step {
        pub command: Vec<String>,
        pub timeout: Duration,
        pub idempotent: bool,
    }
}

/// Format `/2` (issue 14): the target is explicit. A service names its
/// target, its image (on image targets), its secret files and the
/// target's own settings (opaque here: the target's kind wrote them); a
/// job names the target it runs on. Never change a field here; add a `v3`.
mod v2 {
    pub use super::v1::{Artifact, ArtifactSource, Health, RegistryAuth, Rollout, Secret, Step};
    use super::*;

    #[derive(Serialize, Deserialize)]
    pub struct Job {
        pub command: Command,
        pub timeout_ms: u64,
        pub kill_grace_ms: u64,
        pub retry_attempts: u32,
        pub retry_any: bool,
        pub retry_exit_codes: Vec<i32>,
        pub retry_backoff_ms: u64,
        pub retry_max_backoff_ms: u64,
        pub idempotent: bool,
        pub env: BTreeMap<String, String>,
        pub artifact: Option<Artifact>,
        pub secrets: BTreeMap<String, Secret>,
        pub secret_files: BTreeMap<String, Secret>,
        /// `None`: the default target.
        pub target: Option<String>,
        /// The target's own settings of the job, as its kind wrote them
        /// (absent: none; rows written before jobs had any read so).
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        pub settings: serde_json::Value,
        /// Absent (false) in rows of builds before `bootstrap`; builds
        /// before it ignore it (and would run such a job again).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub once_per_environment: bool,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Command {
        Argv(Vec<String>),
        Shell(String),
        Rollout(Box<Service>),
        Fetch(Box<ArtifactSource>),
        Pull(Box<Image>),
    }

    #[derive(Serialize, Deserialize)]
    pub struct Image {
        pub repository: String,
        pub auth: Option<RegistryAuth>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Service {
        pub name: String,
        pub target: String,
        pub listen: SocketAddr,
        pub instances: u32,
        pub command: Vec<String>,
        pub env: BTreeMap<String, String>,
        pub health: Health,
        pub rollout: Rollout,
        pub verify: Option<Step>,
        pub stop_grace: Duration,
        pub artifact: Option<ArtifactSource>,
        pub image: Option<Image>,
        pub secrets: BTreeMap<String, Secret>,
        pub secret_files: BTreeMap<String, Secret>,
        /// The target's own settings, as its kind wrote them.
        #[serde(default)]
        pub settings: serde_json::Value,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub listen_in: BTreeMap<String, SocketAddr>,
    }
}

/// Format `/1` predates targets in specs: a `container` there always
/// meant the docker target, whose settings are the container's port and
/// limits under the same names. (The one place outside `targets/docker/`
/// that names it: old rows must keep meaning what they meant.)
const V1_CONTAINER_TARGET: &str = "docker";

/// The service as format 1 wrote it, for a spec format 1 can hold (local,
/// or docker with its container): the exact JSON the builds before issue
/// 14 serialized their spec to. Digests of it stay what they were, so
/// instances labelled by an older build are still recognised.
pub fn legacy_service_json(spec: &service::ServiceSpec) -> Option<String> {
    let s = v2::Service::from(spec);
    let container = match (s.target.as_str(), s.image) {
        (crate::targets::DEFAULT, None) if s.secret_files.is_empty() => None,
        (V1_CONTAINER_TARGET, Some(image)) => {
            let settings = &s.settings;
            Some(v1::Container {
                image: image.repository,
                port: settings.get("port")?.as_u64().and_then(|p| u16::try_from(p).ok())?,
                memory_bytes: settings.get("memory_bytes").and_then(|m| m.as_u64()),
                millicpus: settings.get("millicpus").and_then(|m| m.as_u64()).and_then(|m| u32::try_from(m).ok()),
                auth: image.auth,
                secret_files: s.secret_files,
            })
        }
        _ => return None,
    };
    let old = v1::Service {
        name: s.name,
        listen: s.listen,
        instances: s.instances,
        command: s.command,
        env: s.env,
        health: s.health,
        rollout: s.rollout,
        verify: s.verify,
        stop_grace: s.stop_grace,
        artifact: s.artifact,
        container,
        secrets: s.secrets,
        listen_in: s.listen_in,
    };
    serde_json::to_string(&old).ok()
}

impl From<v1::Service> for v2::Service {
    fn from(s: v1::Service) -> Self {
        let (target, image, secret_files, settings) = match s.container {
            Some(c) => (
                V1_CONTAINER_TARGET.to_string(),
                Some(v2::Image { repository: c.image, auth: c.auth }),
                c.secret_files,
                serde_json::json!({ "port": c.port, "memory_bytes": c.memory_bytes, "millicpus": c.millicpus }),
            ),
            None => (crate::targets::DEFAULT.to_string(), None, BTreeMap::new(), serde_json::Value::Null),
        };
        v2::Service {
            name: s.name,
            target,
            listen: s.listen,
            instances: s.instances,
            command: s.command,
            env: s.env,
            health: s.health,
            rollout: s.rollout,
            verify: s.verify,
            stop_grace: s.stop_grace,
            artifact: s.artifact,
            image,
            secrets: s.secrets,
            secret_files,
            settings,
            listen_in: s.listen_in,
        }
    }
}

impl From<v1::Job> for v2::Job {
    fn from(j: v1::Job) -> Self {
        // A job of an image (a docker service's migration, its pull) ran
        // on the container target.
        let on_image = j.artifact.as_ref().is_some_and(|a| matches!(a.kind, v1::ArtifactKind::Image)) || matches!(j.command, v1::Command::Pull(_));
        let command = match j.command {
            v1::Command::Argv(a) => v2::Command::Argv(a),
            v1::Command::Shell(c) => v2::Command::Shell(c),
            v1::Command::Rollout(s) => v2::Command::Rollout(Box::new((*s).into())),
            v1::Command::Fetch(a) => v2::Command::Fetch(a),
            v1::Command::Pull(c) => v2::Command::Pull(Box::new(v2::Image { repository: c.image, auth: c.auth })),
        };
        v2::Job {
            command,
            timeout_ms: j.timeout_ms,
            kill_grace_ms: j.kill_grace_ms,
            retry_attempts: j.retry_attempts,
            retry_any: j.retry_any,
            retry_exit_codes: j.retry_exit_codes,
            retry_backoff_ms: j.retry_backoff_ms,
            retry_max_backoff_ms: j.retry_max_backoff_ms,
            idempotent: j.idempotent,
            env: j.env,
            artifact: j.artifact,
            secrets: j.secrets,
            secret_files: j.secret_files,
            target: on_image.then(|| V1_CONTAINER_TARGET.to_string()),
            settings: serde_json::Value::Null,
            once_per_environment: false,
        }
    }
}

// ---- conversions: the only place that knows both shapes ----------------

fn secrets_to(m: &BTreeMap<String, secret::SecretRef>) -> BTreeMap<String, v1::Secret> {
    m.iter().map(|(k, v)| (k.clone(), v.into())).collect()
}

fn secrets_from(m: BTreeMap<String, v1::Secret>) -> BTreeMap<String, secret::SecretRef> {
    m.into_iter().map(|(k, v)| (k, v.into())).collect()
}

impl TryFrom<&super::JobSpec> for v2::Job {
    type Error = String;
    fn try_from(s: &super::JobSpec) -> Result<Self, String> {
        let command = match &s.command {
            config::Command::Argv(a) => v2::Command::Argv(a.clone()),
            config::Command::Shell(c) => v2::Command::Shell(c.clone()),
            config::Command::Rollout(svc) => v2::Command::Rollout(Box::new(svc.as_ref().into())),
            config::Command::Fetch(a) => v2::Command::Fetch(Box::new(a.as_ref().into())),
            config::Command::Pull(i) => v2::Command::Pull(Box::new(i.as_ref().into())),
            // What an unreadable row reads as: never written back.
            config::Command::Unreadable(why) => return Err(format!("an unreadable job spec is not stored again ({why})")),
        };
        Ok(v2::Job {
            command,
            timeout_ms: s.timeout_ms,
            kill_grace_ms: s.kill_grace_ms,
            retry_attempts: s.retry_attempts,
            retry_any: s.retry_any,
            retry_exit_codes: s.retry_exit_codes.clone(),
            retry_backoff_ms: s.retry_backoff_ms,
            retry_max_backoff_ms: s.retry_max_backoff_ms,
            idempotent: s.idempotent,
            env: s.env.clone(),
            artifact: s.artifact.as_ref().map(|a| v1::Artifact {
                url: a.url.clone(),
                sha256: a.sha256.clone(),
                kind: match a.kind {
                    super::ArtifactKind::Tarball => v1::ArtifactKind::Tarball,
                    super::ArtifactKind::Image => v1::ArtifactKind::Image,
                },
            }),
            secrets: secrets_to(&s.secrets),
            secret_files: secrets_to(&s.secret_files),
            target: s.target.clone(),
            settings: if s.settings.is_empty() { serde_json::Value::Null } else { serde_json::to_value(&s.settings).unwrap_or_default() },
            once_per_environment: s.once_per_environment,
        })
    }
}

impl TryFrom<v2::Job> for super::JobSpec {
    type Error = String;
    fn try_from(j: v2::Job) -> Result<Self, String> {
        let command = match j.command {
            v2::Command::Argv(a) => config::Command::Argv(a),
            v2::Command::Shell(c) => config::Command::Shell(c),
            v2::Command::Rollout(s) => config::Command::Rollout(Box::new((*s).try_into()?)),
            v2::Command::Fetch(a) => config::Command::Fetch(Box::new((*a).into())),
            v2::Command::Pull(i) => config::Command::Pull(Box::new((*i).try_into()?)),
        };
        Ok(super::JobSpec {
            command,
            timeout_ms: j.timeout_ms,
            kill_grace_ms: j.kill_grace_ms,
            retry_attempts: j.retry_attempts,
            retry_any: j.retry_any,
            retry_exit_codes: j.retry_exit_codes,
            retry_backoff_ms: j.retry_backoff_ms,
            retry_max_backoff_ms: j.retry_max_backoff_ms,
            idempotent: j.idempotent,
            env: j.env,
            artifact: j.artifact.map(|a| super::ArtifactRef {
                url: a.url,
                sha256: a.sha256,
                kind: match a.kind {
                    v1::ArtifactKind::Tarball => super::ArtifactKind::Tarball,
                    v1::ArtifactKind::Image => super::ArtifactKind::Image,
                },
            }),
            secrets: secrets_from(j.secrets),
            secret_files: secrets_from(j.secret_files),
            target: j.target,
            settings: if j.settings.is_null() {
                Default::default()
            } else {
                serde_json::from_value(j.settings).map_err(|e| format!("unreadable target settings: {e}"))?
            },
            once_per_environment: j.once_per_environment,
        })
    }
}

impl From<&secret::SecretRef> for v1::Secret {
    fn from(s: &secret::SecretRef) -> Self {
        let source = match &s.source {
            secret::SecretSource::Env(v) => v1::SecretSource::Env(v.clone()),
            secret::SecretSource::File(p) => v1::SecretSource::File(p.clone()),
        };
        v1::Secret { name: s.name.clone(), source }
    }
}

impl From<v1::Secret> for secret::SecretRef {
    fn from(s: v1::Secret) -> Self {
        let source = match s.source {
            v1::SecretSource::Env(v) => secret::SecretSource::Env(v),
            v1::SecretSource::File(p) => secret::SecretSource::File(p),
        };
        secret::SecretRef { name: s.name, source }
    }
}

impl From<&service::ServiceSpec> for v2::Service {
    fn from(s: &service::ServiceSpec) -> Self {
        v2::Service {
            name: s.name.clone(),
            target: s.target.clone(),
            listen: s.listen,
            instances: s.instances,
            command: s.command.clone(),
            env: s.env.clone(),
            health: v1::Health {
                check: match &s.health.check {
                    service::HealthCheck::Http { path, status } => v1::HealthCheck::Http { path: path.clone(), status: *status },
                    service::HealthCheck::Command { argv } => v1::HealthCheck::Command { argv: argv.clone() },
                    service::HealthCheck::Tcp => v1::HealthCheck::Tcp,
                },
                interval: s.health.interval,
                timeout: s.health.timeout,
                healthy_after: s.health.healthy_after,
                deadline: s.health.deadline,
            },
            rollout: v1::Rollout {
                strategy: match s.rollout.strategy {
                    service::Strategy::Rolling { max_surge, max_unavailable } => v1::Strategy::Rolling { max_surge, max_unavailable },
                    service::Strategy::BlueGreen => v1::Strategy::BlueGreen,
                },
                drain: s.rollout.drain,
            },
            verify: s.verify.as_ref().map(|v| v1::Step { command: v.command.clone(), timeout: v.timeout, idempotent: v.idempotent }),
            stop_grace: s.stop_grace,
            artifact: s.artifact.as_ref().map(Into::into),
            image: s.image.as_ref().map(Into::into),
            secrets: secrets_to(&s.secrets),
            secret_files: secrets_to(&s.secret_files),
            settings: serde_json::to_value(&s.settings).unwrap_or_default(),
            listen_in: s.listen_in.clone(),
        }
    }
}

impl TryFrom<v2::Service> for service::ServiceSpec {
    type Error = String;
    fn try_from(s: v2::Service) -> Result<Self, String> {
        Ok(service::ServiceSpec {
            name: s.name,
            target: s.target,
            listen: s.listen,
            instances: s.instances,
            command: s.command,
            env: s.env,
            health: service::HealthSpec {
                check: match s.health.check {
                    v1::HealthCheck::Http { path, status } => service::HealthCheck::Http { path, status },
                    v1::HealthCheck::Command { argv } => service::HealthCheck::Command { argv },
                    v1::HealthCheck::Tcp => service::HealthCheck::Tcp,
                },
                interval: s.health.interval,
                timeout: s.health.timeout,
                healthy_after: s.health.healthy_after,
                deadline: s.health.deadline,
            },
            rollout: service::RolloutSpec {
                strategy: match s.rollout.strategy {
                    v1::Strategy::Rolling { max_surge, max_unavailable } => service::Strategy::Rolling { max_surge, max_unavailable },
                    v1::Strategy::BlueGreen => service::Strategy::BlueGreen,
                },
                drain: s.rollout.drain,
            },
            verify: s.verify.map(|v| service::StepSpec { command: v.command, timeout: v.timeout, idempotent: v.idempotent }),
            stop_grace: s.stop_grace,
            artifact: s.artifact.map(Into::into),
            image: s.image.map(TryInto::try_into).transpose()?,
            secrets: secrets_from(s.secrets),
            secret_files: secrets_from(s.secret_files),
            settings: serde_json::from_value(s.settings).unwrap_or_default(),
            listen_in: s.listen_in,
        })
    }
}

impl From<&service::ArtifactSpec> for v1::ArtifactSource {
    fn from(a: &service::ArtifactSpec) -> Self {
        v1::ArtifactSource { url: a.url.clone(), attempts: a.attempts, timeout: a.timeout }
    }
}

impl From<v1::ArtifactSource> for service::ArtifactSpec {
    fn from(a: v1::ArtifactSource) -> Self {
        service::ArtifactSpec { url: a.url, attempts: a.attempts, timeout: a.timeout }
    }
}

impl From<&service::ImageSpec> for v2::Image {
    fn from(i: &service::ImageSpec) -> Self {
        v2::Image {
            repository: i.repository.to_string(),
            auth: i.auth.as_ref().map(|a| v1::RegistryAuth {
                host: a.host.clone(),
                username: a.username.clone(),
                password: a.password.as_ref().map(Into::into),
                token: a.token.as_ref().map(Into::into),
            }),
        }
    }
}

impl TryFrom<v2::Image> for service::ImageSpec {
    type Error = String;
    fn try_from(i: v2::Image) -> Result<Self, String> {
        // Checked again on the way in: a row is input like any other.
        Ok(service::ImageSpec {
            repository: crate::values::Image::parse(&i.repository).map_err(|e| format!("stored spec: {e}"))?,
            auth: i.auth.map(|a| secret::RegistryAuth {
                host: a.host,
                username: a.username,
                password: a.password.map(Into::into),
                token: a.token.map(Into::into),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows exactly as the build before formats (d43299a) wrote them, in
    /// tests/fixtures/upgrade: they must keep reading the same.
    const OLD_ROLLOUT_JOB: &str = r#"{"command":{"rollout":{"name":"web","listen":"127.0.0.1:39411","instances":1,"command":["slipway-demo","serve","--port","{port}","--version","{version}"],"env":{},"health":{"check":{"http":{"path":"/healthz","status":200}},"interval":{"secs":0,"nanos":100000000},"timeout":{"secs":2,"nanos":0},"healthy_after":1,"deadline":{"secs":10,"nanos":0}},"rollout":{"strategy":{"rolling":{"max_surge":1,"max_unavailable":0}},"drain":{"secs":0,"nanos":200000000}},"verify":null,"stop_grace":{"secs":10,"nanos":0},"artifact":null,"container":null,"secrets":{}}},"timeout_ms":140800,"kill_grace_ms":10000,"retry_attempts":1,"retry_any":false,"retry_exit_codes":[],"retry_backoff_ms":1000,"retry_max_backoff_ms":60000,"idempotent":false,"env":{},"artifact":null,"secrets":{},"secret_files":{}}"#;

    fn full_service() -> service::ServiceSpec {
        let secret = |n: &str| secret::SecretRef { name: n.into(), source: secret::SecretSource::Env(format!("{}_VAR", n.to_uppercase())) };
        service::ServiceSpec {
            name: "shop".into(),
            listen: "127.0.0.1:8080".parse().expect("addr"),
            instances: 3,
            command: vec!["shop".into(), "--port".into(), "{port}".into()],
            env: BTreeMap::from([("MODE".into(), "prod".into())]),
            health: service::HealthSpec {
                check: service::HealthCheck::Command { argv: vec!["check".into()] },
                interval: Duration::from_millis(250),
                timeout: Duration::from_secs(2),
                healthy_after: 2,
                deadline: Duration::from_secs(30),
            },
            rollout: service::RolloutSpec { strategy: service::Strategy::BlueGreen, drain: Duration::from_secs(1) },
            verify: Some(service::StepSpec { command: vec!["smoke".into()], timeout: Duration::from_secs(5), idempotent: true }),
            stop_grace: Duration::from_secs(9),
            artifact: Some(service::ArtifactSpec {
                url: "https://example.invalid/shop-{version}.tar.gz".into(),
                attempts: 3,
                timeout: Duration::from_secs(60),
            }),
            target: "docker".into(),
            image: Some(service::ImageSpec {
                repository: crate::values::Image::parse("registry.example.invalid/shop").expect("an image"),
                auth: Some(secret::RegistryAuth {
                    host: "registry.example.invalid".into(),
                    username: Some("ci".into()),
                    password: Some(secret("registry_password")),
                    token: None,
                }),
            }),
            secret_files: BTreeMap::from([(
                "/run/key".into(),
                secret::SecretRef { name: "key".into(), source: secret::SecretSource::File("/etc/key".into()) },
            )]),
            settings: crate::targets::Settings::of(&serde_json::json!({ "port": 8000, "memory_bytes": 1 << 26, "millicpus": 500 })),
            secrets: BTreeMap::from([("DB_PASSWORD".into(), secret("db"))]),
            listen_in: BTreeMap::from([("staging".into(), "127.0.0.1:8081".parse().expect("addr"))]),
        }
    }

    #[test]
    fn issue13_rows_written_before_formats_read_as_format_1() {
        let job = decode_job(OLD_ROLLOUT_JOB).expect("an old row decodes");
        let config::Command::Rollout(svc) = &job.command else { panic!("a rollout job: {:?}", job.command) };
        assert_eq!(svc.listen.port(), 39411);
        assert_eq!(svc.health.interval, Duration::from_millis(100));
        assert_eq!(job.timeout_ms, 140_800);
        assert_eq!((svc.target.as_str(), &svc.image, &job.target), ("local", &None, &None), "format 1 without a container: the default target");
        // Written again, it is format 2 (issue 14), and reads back the same.
        let again = encode_job(&job).expect("encodes");
        assert!(again.contains("\"format\":\"job/2\""), "{again}");
        assert_eq!(decode_job(&again).expect("decodes"), job);
    }

    #[test]
    fn issue13_every_field_survives_a_round_trip_and_the_shape_is_pinned() {
        let svc = full_service();
        let encoded = encode_service(&svc);
        assert_eq!(decode_service(&encoded).expect("decodes"), svc);
        let job = super::super::JobSpec {
            command: config::Command::Rollout(Box::new(svc)),
            ..super::super::JobSpec::verify(&service::StepSpec { command: vec!["x".into()], timeout: Duration::from_secs(1), idempotent: false })
        };
        let job_encoded = encode_job(&job).expect("encodes");
        assert_eq!(decode_job(&job_encoded).expect("decodes"), job);
        // The stored shape is a contract with every store already written:
        // a change here must be a new format, never an edit of format 2.
        let pretty: serde_json::Value = serde_json::from_str(&encoded).expect("json");
        insta::assert_snapshot!("service_format_2", serde_json::to_string_pretty(&pretty).expect("json"));
    }

    #[test]
    // Digests of a spec (container labels) must not change with the
    // config's shape: a spec format 1 can hold serializes as format 1 did,
    // byte for byte (here: the rollout spec inside a row the build before
    // formats wrote).
    fn issue14_a_spec_serializes_for_its_digest_as_the_old_build_did() {
        let job = decode_job(OLD_ROLLOUT_JOB).expect("decodes");
        let config::Command::Rollout(svc) = &job.command else { panic!("rollout") };
        let old = OLD_ROLLOUT_JOB
            .split_once(r#"{"command":{"rollout":"#)
            .and_then(|(_, rest)| rest.split_once(r#"},"timeout_ms""#))
            .map(|(svc, _)| svc)
            .expect("the rollout object");
        assert_eq!(legacy_service_json(svc).as_deref(), Some(old));
        // A docker spec keeps its container, in the order format 1 wrote it.
        let json = legacy_service_json(&full_service()).expect("format 1 holds a docker spec");
        assert!(
            json.contains(r#""container":{"image":"registry.example.invalid/shop","port":8000,"memory_bytes":67108864,"millicpus":500,"auth":{"#),
            "{json}"
        );
        // A target format 1 never knew has no format 1 form.
        assert_eq!(legacy_service_json(&service::ServiceSpec { target: "elsewhere".into(), ..full_service() }), None);
    }

    #[test]
    // A row is input too: an image name that breaks the rule is refused
    // when the row is read, with what it was, not carried on unchecked.
    fn issue14_a_stored_image_is_checked_when_read() {
        let mut v: serde_json::Value = serde_json::from_str(&encode_service(&full_service())).expect("json");
        v["image"]["repository"] = "Shop; rm -rf /".into();
        let e = decode_service(&v.to_string()).expect_err("refused");
        assert!(e.contains("invalid image \"Shop; rm -rf /\""), "{e}");
    }

    #[test]
    // Which target a format 1 job ran on: a job of an image (a docker
    // service's migration) on docker; anything else on the default target.
    fn issue14_format_1_jobs_keep_their_target() {
        let base = r#""timeout_ms":1,"kill_grace_ms":1,"retry_attempts":1,"retry_any":false,"retry_exit_codes":[],"retry_backoff_ms":1,"retry_max_backoff_ms":1,"idempotent":false,"env":{}"#;
        let migrate =
            format!(r#"{{"format":"job/1","command":{{"argv":["bin/migrate"]}},{base},"artifact":{{"url":"r.example/api:1","sha256":"ab","kind":"image"}}}}"#);
        assert_eq!(decode_job(&migrate).expect("decodes").target.as_deref(), Some("docker"));
        let plain = format!(r#"{{"format":"job/1","command":{{"argv":["./deploy.sh"]}},{base}}}"#);
        assert_eq!(decode_job(&plain).expect("decodes").target, None);
        let tarball = format!(r#"{{"command":{{"argv":["bin/migrate"]}},{base},"artifact":{{"url":"https://x/a.tgz","sha256":"ab","kind":"tarball"}}}}"#);
        assert_eq!(decode_job(&tarball).expect("decodes").target, None, "an untagged row with a tarball");
    }

    #[test]
    // A format 1 docker row with no limits reads as the settings a config
    // without limits parses to: the git drift check compares the two.
    fn issue14_format_1_settings_equal_the_configs() {
        let row = r#"{"name":"web","listen":"127.0.0.1:8080","instances":1,"command":[],"env":{},"health":{"check":"tcp","interval":{"secs":1,"nanos":0},"timeout":{"secs":1,"nanos":0},"healthy_after":1,"deadline":{"secs":9,"nanos":0}},"rollout":{"strategy":"blue_green","drain":{"secs":0,"nanos":0}},"verify":null,"stop_grace":{"secs":1,"nanos":0},"artifact":null,"container":{"image":"r.example/web","port":8080,"memory_bytes":null,"millicpus":null,"auth":null,"secret_files":{}},"secrets":{}}"#;
        let read = decode_service(row).expect("an untagged docker row");
        let parsed = crate::config::parse(
            "slipway.toml",
            "[[service]]\nname = \"web\"\ntarget = \"docker\"\nimage = \"r.example/web\"\nport = 8080\nlisten = \"127.0.0.1:8080\"\n",
        )
        .expect("valid");
        let spec = parsed.services[0].spec.as_ref().expect("managed");
        assert_eq!((&read.target, &read.image, &read.settings), (&spec.target, &spec.image, &spec.settings));
    }

    #[test]
    // Format 1, as the builds before issue 14 wrote it (the snapshot that
    // pinned it then): its container means the docker target, with the
    // same image, credentials, files and settings.
    fn issue14_a_format_1_row_with_a_container_reads_as_the_docker_target() {
        let snap = include_str!("snapshots/slipway__store__spec__tests__service_format_1.snap");
        let row = snap.splitn(3, "---").nth(2).expect("snapshot body").trim();
        assert!(row.contains("\"format\": \"service/1\""), "{row}");
        let read = decode_service(row).expect("format 1 reads");
        assert_eq!(read, full_service());
        let job = format!(
            r#"{{"format":"job/1","command":{{"pull":{}}},"timeout_ms":1,"kill_grace_ms":1,"retry_attempts":1,"retry_any":false,"retry_exit_codes":[],"retry_backoff_ms":1,"retry_max_backoff_ms":1,"idempotent":true,"env":{{}},"artifact":{{"url":"registry.example.invalid/shop:1","sha256":"ab","kind":"image"}}}}"#,
            serde_json::to_string(&serde_json::from_str::<serde_json::Value>(row).expect("json")["container"]).expect("json")
        );
        let job = decode_job(&job).expect("format 1 job reads");
        assert_eq!(job.target.as_deref(), Some("docker"));
        assert_eq!(job.command, config::Command::Pull(Box::new(full_service().image.expect("image"))));
    }

    #[test]
    fn issue13_unknown_formats_and_garbage_are_refused_with_what_they_are() {
        let newer = decode_service(r#"{"format":"service/9","name":"web"}"#).expect_err("a format from the future");
        assert!(newer.contains("service/9") && newer.contains("newer"), "{newer}");
        let bad = decode_job(r#"{"format":"job/1","command":{"argv":"not a list"}}"#).expect_err("a broken row");
        assert!(bad.contains("job/1"), "{bad}");
        assert!(decode_job("not json").expect_err("not json").contains("not JSON"));
    }
}
