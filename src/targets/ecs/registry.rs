//! ECR for registry retention (`crate::retention`): a service's images
//! live in ECR, which the Docker Registry HTTP API with a static password
//! does not reach (ECR wants short-lived tokens from its own API), so
//! retention lists and deletes through the target
//! ([`crate::targets::Target::registry_images`]).
//!
//! Listing is DescribeImages (it gives the digest, the tags and
//! `imagePushedAt` in one call), 1,000 images a page, every page read by
//! its `nextToken`; deleting is BatchDeleteImage by digest, 100 a call
//! (ECR's limit), each call's `failures` reported per digest.
//!
//! Untagged images are left alone: retention keeps tags, and an untagged
//! image is no tag of anyone's (ECR's own lifecycle policies are the tool
//! for those). A digest is deleted with every tag it carries, which is why
//! the policy deletes a digest only when none of its tags is kept.

use aws_sdk_ecr::types::{DescribeImagesFilter, ImageIdentifier, TagStatus};

use super::client::{EcrImage, EcsTarget, aws_error};
use super::config::Aws;
use crate::targets::{RegistryDeletion, RegistryImage, Settings, TargetError, TargetErrorKind};

/// DescribeImages' largest page.
const PAGE: i32 = 1000;
/// BatchDeleteImage's most image ids per call.
const BATCH: usize = 100;
/// More images than ECR allows in one repository (100,000 by default,
/// adjustable): a listing past this many is taken for one that never ends.
const MAX_IMAGES: usize = 1_000_000;

/// The repository of `image` and the clients of its region; the endpoint
/// (tests, compatible services) is the service's `[aws]` one.
async fn reach(target: &EcsTarget, image: &str, settings: &Settings) -> Result<(EcrImage, aws_sdk_ecr::Client), TargetError> {
    let s = EcsTarget::settings(settings)?;
    let Some(ecr) = EcrImage::parse(image) else {
        return Err(TargetError::new(TargetErrorKind::Refused, format!("{image} is not in ECR (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY)")));
    };
    let aws = Aws { region: Some(ecr.region.clone()), ..s.aws };
    let client = target.clients(&aws).await.ecr;
    Ok((ecr, client))
}

/// Every tagged image of `image`'s repository.
pub(super) async fn images(target: &EcsTarget, image: &str, settings: &Settings) -> Result<Vec<RegistryImage>, TargetError> {
    let (ecr, client) = reach(target, image, settings).await?;
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut seen_tokens = std::collections::BTreeSet::new();
    loop {
        // A listing that never ends (a token given twice, or more pages
        // than any repository ECR allows) is an error, not a loop.
        if out.len() > MAX_IMAGES {
            return Err(TargetError::from(format!("listing the images of {image} in ECR: more than {MAX_IMAGES} images; not planned")));
        }
        let page = client
            .describe_images()
            .registry_id(&ecr.registry)
            .repository_name(&ecr.repository)
            .filter(DescribeImagesFilter::builder().tag_status(TagStatus::Tagged).build())
            .max_results(PAGE)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| aws_error(&format!("listing the images of {image} in ECR"), e))?;
        for d in page.image_details() {
            // Not every implementation honours the filter: skip untagged
            // images here too (see the module's comment).
            let (Some(digest), false) = (d.image_digest(), d.image_tags().is_empty()) else { continue };
            out.push(RegistryImage {
                digest: digest.to_string(),
                tags: d.image_tags().to_vec(),
                pushed: d.image_pushed_at().and_then(|t| t.to_millis().ok()),
            });
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => {
                if !seen_tokens.insert(t.to_string()) {
                    return Err(TargetError::from(format!("listing the images of {image} in ECR: ECR gave the same page token twice")));
                }
                token = Some(t.to_string())
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Delete `digests`, 100 a call. A call that fails stops there: the
/// next would meet the same answer (refused credentials, no network).
pub(super) async fn delete(target: &EcsTarget, image: &str, settings: &Settings, digests: &[String]) -> RegistryDeletion {
    let mut done = RegistryDeletion::default();
    let (ecr, client) = match reach(target, image, settings).await {
        Ok(r) => r,
        Err(e) => {
            done.errors.push(e.message);
            return done;
        }
    };
    for (i, batch) in digests.chunks(BATCH).enumerate() {
        let ids = batch.iter().map(|d| ImageIdentifier::builder().image_digest(d).build()).collect();
        let out = match client.batch_delete_image().registry_id(&ecr.registry).repository_name(&ecr.repository).set_image_ids(Some(ids)).send().await {
            Ok(out) => out,
            Err(e) => {
                let left = digests.len() - i * BATCH;
                done.errors.push(format!("{} ({left} digest(s) not deleted)", aws_error(&format!("deleting images of {image} in ECR"), e).message));
                return done;
            }
        };
        // ECR answers each id in `imageIds` (deleted) or in `failures`.
        let mut failed = std::collections::BTreeSet::new();
        let mut unnamed = false;
        for f in out.failures() {
            let digest = f.image_id().and_then(|id| id.image_digest()).unwrap_or("?");
            unnamed |= digest == "?";
            let code = f.failure_code().map(|c| c.as_str()).unwrap_or("error");
            // Gone already (deleted by someone else since the listing): as
            // the registry API's 404, that is what was wanted.
            if code == "ImageNotFound" {
                continue;
            }
            failed.insert(digest.to_string());
            done.errors.push(format!("ECR refused to delete {image}@{digest}: {code}: {}", f.failure_reason().unwrap_or("")));
        }
        // A failure that names no digest: none of the batch is known gone
        // but those ECR listed as deleted.
        if unnamed {
            let gone: std::collections::BTreeSet<&str> = out.image_ids().iter().filter_map(|id| id.image_digest()).collect();
            done.deleted.extend(batch.iter().filter(|d| gone.contains(d.as_str()) && !failed.contains(*d)).cloned());
        } else {
            done.deleted.extend(batch.iter().filter(|d| !failed.contains(*d)).cloned());
        }
    }
    done
}
