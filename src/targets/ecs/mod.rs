//! AWS ECS: services rolled out by ECS itself and judged by Slipway. A
//! deploy pins `image:tag` to its digest in ECR when it is accepted; the
//! rollout registers a copy of the service's task definition with only
//! the service's container's image replaced by `image@sha256:…`, points
//! the service at it with the deployment circuit breaker on, and watches
//! the deployment until ECS calls it COMPLETED (success), FAILED or
//! rolled back by itself, or the health deadline passes; anything but
//! success puts the service back on the task definition it ran before and
//! ends `rolled_back` with ECS's own reason and events. A service's
//! `migrate` is a one-off task of the new task definition with the command
//! overridden, found again by its tags after a node's death (never started
//! twice). Design: docs/design/ecs.md.
//!
//! The runtime needs the AWS SDK (cargo feature `aws`, on by default);
//! without it the kind still reads its config, and refuses to be used.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Capabilities, ConfigTables, Key, KeyTable, NodeContext, Settings, Target, TargetError, TargetKind};

pub mod config;
#[cfg(feature = "aws")]
mod client;
#[cfg(feature = "aws")]
mod registry;
#[cfg(feature = "aws")]
mod rollout;
#[cfg(feature = "aws")]
mod task;

#[cfg(feature = "aws")]
pub use client::EcsTarget;

pub static KIND: Kind = Kind;

pub struct Kind;

#[async_trait]
impl TargetKind for Kind {
    fn name(&self) -> &'static str {
        "ecs"
    }

    fn about(&self) -> &'static str {
        "AWS ECS services (rolled out by ECS, judged and reverted by Slipway), images pinned in ECR"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { runs_jobs: true, uses_images: true, own_rollout: true, remote: true, resumes_jobs: true, own_registry: true, ..Capabilities::default() }
    }

    fn service_keys(&self) -> &'static [Key] {
        config::SERVICE_KEYS
    }

    fn service_settings(&self, table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        config::read_service(table)
    }

    fn job_settings(&self, table: &mut KeyTable<'_, '_>) -> Option<Settings> {
        config::read_job(table)
    }

    /// ECS's own deadline, then the revert (a few calls, each bounded).
    fn rollout_timeout(&self, spec: &crate::config::service::ServiceSpec) -> Option<std::time::Duration> {
        Some(spec.health.deadline + std::time::Duration::from_secs(120))
    }

    fn read_tables(&self, tables: &mut ConfigTables<'_, '_>) -> Option<Settings> {
        config::read_aws(tables)
    }

    #[cfg(feature = "aws")]
    async fn build(&self, node: &NodeContext) -> Result<Arc<dyn Target>, TargetError> {
        Ok(Arc::new(EcsTarget::new(node.installation.clone())))
    }

    #[cfg(not(feature = "aws"))]
    async fn build(&self, _node: &NodeContext) -> Result<Arc<dyn Target>, TargetError> {
        Err(TargetError::new(super::TargetErrorKind::Unsupported, "this Slipway was built without AWS support (cargo feature `aws`)"))
    }
}
