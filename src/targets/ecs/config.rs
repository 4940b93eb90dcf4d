//! The ecs target's part of `slipway.toml`: a service's `cluster`,
//! `ecs_service` and `container`, with the `[aws]` table (`crate::aws`). A service's settings carry
//! the `[aws]` table too, so a deployment talks to the AWS its pinned
//! revision names, whatever the config says later. Builds without the
//! `aws` feature read the same keys (the config stays valid for them to
//! check) and refuse the target with one problem.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::{Problem, ProblemKind};
pub use crate::aws::Aws;
use crate::targets::{ConfigTables, Key, KeyTable, Settings};

pub const SERVICE_KEYS: &[Key] = &[
    Key { name: "cluster", kind: "string", doc: "the ECS cluster the service runs in" },
    Key { name: "ecs_service", kind: "string", doc: "the ECS service's name (default: the service's name)" },
    Key { name: "container", kind: "string", doc: "the container of the task definition that runs `image` (default: the service's name)" },
];

/// What a service on ECS runs against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSettings {
    #[serde(default)]
    pub aws: Aws,
    pub cluster: String,
    pub ecs_service: String,
    pub container: String,
}

#[derive(Deserialize)]
struct RawService {
    cluster: Option<Spanned<String>>,
    ecs_service: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
}

/// `[aws]`, handed to each service's settings (a deployment talks to
/// the AWS its pinned revision names). The config checks the table itself
/// (`crate::aws`) and reports its mistakes; it is read quietly here.
pub fn read_aws(cx: &mut ConfigTables<'_, '_>) -> Option<Settings> {
    let table = cx.tables("aws").into_iter().next()?;
    let raw = crate::aws::RawAws::deserialize(toml::de::Deserializer::from(table)).ok()?;
    Some(Settings::of(&crate::aws::read(raw, &mut Vec::new())))
}

fn name_ok(s: &str) -> bool {
    // ECS names: letters, digits, hyphens and underscores, up to 255.
    !s.is_empty() && s.len() <= 255 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A service's `cluster`, `ecs_service` and `container`.
pub fn read_service(table: &mut KeyTable<'_, '_>) -> Option<Settings> {
    let raw: RawService = table.read()?;
    let service_name = table.owner.trim_start_matches("service ").trim_matches('"').to_string();
    let aws: Aws = table.kind.get().unwrap_or_default();
    let mut ok = true;
    let mut named = |key: &str, value: Option<Spanned<String>>, table: &mut KeyTable<'_, '_>| -> Option<String> {
        let v = value?;
        if name_ok(v.get_ref()) {
            Some(v.get_ref().clone())
        } else {
            ok = false;
            table.problem(
                Problem::new(ProblemKind::InvalidValue, Some(v.span()), format!("`{key}` {:?} is not an ECS name", v.get_ref()))
                    .label("letters, digits, - and _ only")
                    .hint(format!("{key} = \"prod\"")),
            );
            None
        }
    };
    let cluster = named("cluster", raw.cluster, table);
    let ecs_service = named("ecs_service", raw.ecs_service, table);
    let container = named("container", raw.container, table);
    if !ok {
        return None;
    }
    let Some(cluster) = cluster else {
        table.problem(
            Problem::new(ProblemKind::MissingKey, Some(table.table.span()), format!("{} runs on ECS but says not in which cluster", table.owner))
                .label("this service")
                .hint("add cluster = \"prod\""),
        );
        return None;
    };
    if cfg!(not(feature = "aws")) {
        table.problem(
            Problem::new(ProblemKind::InvalidValue, Some(table.table.span()), format!("{} runs on ECS, and this Slipway was built without AWS support", table.owner))
                .label("target \"ecs\"")
                .hint("build Slipway with its default features (cargo feature `aws`)"),
        );
        return None;
    }
    Some(Settings::of(&ServiceSettings {
        aws,
        cluster,
        ecs_service: ecs_service.unwrap_or_else(|| service_name.clone()),
        container: container.unwrap_or(service_name),
    }))
}

/// Jobs on ECS are a service's own steps (its `migrate`): a `[[job]]`
/// naming the target has no task definition to run.
pub fn read_job(table: &mut KeyTable<'_, '_>) -> Option<Settings> {
    table.problem(
        Problem::new(ProblemKind::InvalidValue, Some(table.table.span()), format!("{} runs on target \"ecs\", which runs only a service's own steps", table.owner))
            .label("this job")
            .hint("give the ECS service a `migrate = { command = [...] }`: it runs as a one-off task of the new task definition"),
    );
    None
}
