//! The ECS target's runtime: its AWS clients (one per region and
//! endpoint, built on first use from the standard credential chain, on
//! the ring TLS stack), ECR pinning, and the seam's entry points.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use tokio_util::sync::CancellationToken;

use super::config::{Aws, ServiceSettings};
use crate::config::secret::Credentials as RegistryCredentials;
use crate::targets::{JobRequest, OutputSink, RegistryDeletion, RegistryImage, RunResult, Settings, Target, TargetError, TargetErrorKind};

/// How long one AWS call may take, connection included, retries included.
const CONNECT: Duration = Duration::from_secs(5);
const ATTEMPT: Duration = Duration::from_secs(30);
const OPERATION: Duration = Duration::from_secs(90);
/// How often a rollout or a one-off task is asked how it is.
pub(super) const POLL: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(super) struct Clients {
    pub ecs: aws_sdk_ecs::Client,
    pub ecr: aws_sdk_ecr::Client,
}

pub struct EcsTarget {
    pub(super) installation: String,
    clients: tokio::sync::Mutex<HashMap<Aws, Clients>>,
}

impl EcsTarget {
    pub fn new(installation: String) -> Self {
        EcsTarget { installation, clients: Default::default() }
    }

    pub(super) async fn clients(&self, aws: &Aws) -> Clients {
        let mut cache = self.clients.lock().await;
        if let Some(c) = cache.get(aws) {
            return c.clone();
        }
        let timeouts = crate::aws::Timeouts { connect: CONNECT, attempt: ATTEMPT, operation: OPERATION };
        let sdk = crate::aws::sdk_config(aws, None, timeouts).await;
        let c = Clients { ecs: aws_sdk_ecs::Client::new(&sdk), ecr: aws_sdk_ecr::Client::new(&sdk) };
        cache.insert(aws.clone(), c.clone());
        c
    }

    pub(super) fn settings(settings: &Settings) -> Result<ServiceSettings, TargetError> {
        settings.get::<ServiceSettings>().map_err(|e| TargetError::new(TargetErrorKind::Refused, format!("a service on ECS needs its cluster: {}", e.message)))
    }
}

/// An AWS error for people: the call, AWS's code and message, or why the
/// call never reached AWS. Missing things are `NotFound`, refused
/// credentials `Refused`, a network failure `Unavailable`.
pub(super) fn aws_error<E>(what: &str, e: SdkError<E, aws_sdk_ecs::config::http::HttpResponse>) -> TargetError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let e = crate::aws::call_error(what, e);
    let kind = match e.code.as_deref() {
        Some(code) if code.ends_with("NotFoundException") => TargetErrorKind::NotFound,
        Some("AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException" | "ExpiredTokenException" | "ClientException") => {
            TargetErrorKind::Refused
        }
        Some(code) if code.starts_with("InvalidParameter") => TargetErrorKind::Refused,
        Some(_) => TargetErrorKind::Failed,
        None if e.no_credentials => TargetErrorKind::Refused,
        None if e.unanswered => TargetErrorKind::Unavailable,
        None => TargetErrorKind::Failed,
    };
    TargetError::new(kind, e.message)
}

/// An ECR image name: `ACCOUNT.dkr.ecr.REGION.amazonaws.com/repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EcrImage {
    pub registry: String,
    pub region: String,
    pub repository: String,
}

impl EcrImage {
    /// `reference` without its tag or digest; `None`: not an ECR image.
    pub fn parse(reference: &str) -> Option<EcrImage> {
        let name = reference.split('@').next().unwrap_or(reference);
        let (host, path) = name.split_once('/')?;
        // A tag after the last '/' only.
        let path = match path.rsplit_once(':') {
            Some((p, tag)) if !tag.contains('/') => p,
            _ => path,
        };
        let mut parts = host.split('.');
        let (registry, dkr, ecr, region) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let rest: Vec<&str> = parts.collect();
        let aws_domain = rest.first().is_some_and(|d| d.starts_with("amazonaws"));
        if dkr != "dkr" || !ecr.starts_with("ecr") || !aws_domain || registry.is_empty() || !registry.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(EcrImage { registry: registry.to_string(), region: region.to_string(), repository: path.to_string() })
    }
}

#[async_trait]
impl Target for EcsTarget {
    /// `image:tag` → its digest in ECR, in the image's own region.
    async fn resolve(&self, reference: &str, settings: &Settings, _auth: Option<&RegistryCredentials>) -> Result<Option<String>, TargetError> {
        let s = Self::settings(settings)?;
        let Some(image) = EcrImage::parse(reference) else {
            return Err(TargetError::new(
                TargetErrorKind::Refused,
                format!("{reference} is not in ECR: a service on ECS pins its image through ECR (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY)"),
            ));
        };
        let tag = reference.rsplit_once(':').map(|(_, t)| t).filter(|t| !t.contains('/')).unwrap_or("latest");
        let aws = Aws { region: Some(image.region.clone()), ..s.aws };
        let c = self.clients(&aws).await;
        let out = c
            .ecr
            .describe_images()
            .registry_id(&image.registry)
            .repository_name(&image.repository)
            .image_ids(aws_sdk_ecr::types::ImageIdentifier::builder().image_tag(tag).build())
            .send()
            .await
            .map_err(|e| aws_error(&format!("asking ECR for {reference}"), e))?;
        let digest = out.image_details().first().and_then(|d| d.image_digest()).map(str::to_string);
        match digest.as_deref().and_then(|d| d.strip_prefix("sha256:")) {
            Some(hex) => Ok(Some(hex.to_string())),
            None => Err(TargetError::new(TargetErrorKind::NotFound, format!("ECR has no image {reference}"))),
        }
    }

    /// A service's `migrate`: a one-off task of the new task definition.
    async fn run(&self, request: JobRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        super::task::run(self, request, output, cancel).await
    }

    async fn rollout(&self, request: &crate::service::RolloutRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
        super::rollout::run(self, request, output, cancel).await
    }

    /// The service's task definition ARN, as ECS says now.
    async fn running_ref(&self, spec: &crate::config::service::ServiceSpec) -> Option<String> {
        let s = Self::settings(&spec.settings).ok()?;
        let c = self.clients(&s.aws).await;
        super::rollout::describe_service(&c, &s).await.ok()?.task_definition().map(str::to_string)
    }

    /// Retention of a service's images in ECR (see `registry.rs`).
    async fn registry_images(&self, image: &str, settings: &Settings) -> Option<Result<Vec<RegistryImage>, TargetError>> {
        // Not an ECR name (pinning refuses those anyway): the registry
        // API's way, as for any other target.
        EcrImage::parse(image)?;
        Some(super::registry::images(self, image, settings).await)
    }

    async fn delete_registry_images(&self, image: &str, settings: &Settings, digests: &[String]) -> RegistryDeletion {
        super::registry::delete(self, image, settings, digests).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_image_names_are_read_and_others_refused() {
        let i = EcrImage::parse("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/api:1.4.0").unwrap();
        assert_eq!(i, EcrImage { registry: "123456789012".into(), region: "eu-west-1".into(), repository: "team/api".into() });
        let d = EcrImage::parse("123456789012.dkr.ecr.us-east-1.amazonaws.com/api@sha256:abcd").unwrap();
        assert_eq!((d.region.as_str(), d.repository.as_str()), ("us-east-1", "api"));
        let cn = EcrImage::parse("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/api").unwrap();
        assert_eq!(cn.region, "cn-north-1");
        for not in ["docker.io/library/nginx:1", "registry.example.org:5000/api", "api", "abc.dkr.ecr.eu-west-1.amazonaws.com/api", "123.dkr.ecr.eu-west-1.example.com/api"] {
            assert_eq!(EcrImage::parse(not), None, "{not}");
        }
    }
}
