//! Registry tag retention: per repository a service's versions come from
//! (the `image` of a service on an image target, or `follows`), keep the newest `keep_tags`
//! tags and delete the older ones through the registry API — never one
//! that an environment runs or could roll back to, nor one a queued or
//! running deployment is about to deploy. Only the tags the services
//! follow (their `tags` filters) count and can go.
//!
//! [`decide`] is the whole policy and does no IO; [`registry`] is the small
//! HTTP client that lists, resolves and deletes; [`run`] joins them with
//! what the store records. Images a service runs on a target with a
//! registry of its own (ECS: ECR) are listed and deleted through that
//! target instead, by the same policy: the seam is
//! [`Target::registry_images`] and [`Target::delete_registry_images`],
//! asked of a target whose kind has `Capabilities::own_registry`; this
//! module names no target. Deleting is by manifest digest (that is what a
//! registry deletes), so every tag pointing at a digest goes with it: a
//! digest is deleted only when none of its tags is kept.

pub mod registry;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::config::Config;
use crate::store::{DeploymentRow, ServiceRow, Store, StoreError};
use crate::targets::{Settings, Target, Targets};

pub use registry::{RegistryClient, RetentionError};

/// One repository under a retention policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `host[:port]/path`, lower case, without a tag.
    pub image: String,
    /// Tags kept by age. Services sharing an image keep the most any asks.
    pub keep: u32,
    /// The services whose versions are this image's tags (and set `keep_tags`).
    pub services: Vec<String>,
}

/// The repositories the config puts under retention, one policy each.
pub fn policies(config: &Config) -> Vec<Policy> {
    let mut by_image: BTreeMap<String, Policy> = BTreeMap::new();
    for s in &config.services {
        let (Some(image), Some(keep)) = (&s.follows, s.keep_tags) else { continue };
        let image = image.to_ascii_lowercase();
        let p = by_image.entry(image.clone()).or_insert_with(|| Policy { image, keep, services: vec![] });
        p.keep = p.keep.max(keep);
        p.services.push(s.name.clone());
    }
    by_image.into_values().collect()
}

/// A tag as the registry has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagInfo {
    pub tag: String,
    /// `sha256:…` of its manifest.
    pub digest: String,
    /// The image's `created` (Unix milliseconds), when its config says.
    pub created: Option<i64>,
}

/// What must not be deleted, and why: tag → reasons, digest → reasons.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protected {
    pub tags: BTreeMap<String, BTreeSet<String>>,
    pub digests: BTreeMap<String, BTreeSet<String>>,
    /// Tags no service of the policy follows (outside every `tags`
    /// filter): not ours to delete, and not counted in the newest N.
    pub outside: BTreeMap<String, String>,
}

impl Protected {
    pub fn tag(&mut self, tag: &str, reason: impl Into<String>) {
        self.tags.entry(tag.to_string()).or_default().insert(reason.into());
    }
    pub fn digest(&mut self, digest: &str, reason: impl Into<String>) {
        self.digests.entry(digest.to_string()).or_default().insert(reason.into());
    }
}

/// What the store says must stay for `policy`: the versions (and, for
/// services on image targets, the pinned digests) each environment runs and could
/// roll back to, and the versions of deployments still queued or running.
pub fn protected(policy: &Policy, config: &Config, rows: &[ServiceRow], deployments: &[DeploymentRow]) -> Protected {
    let follows_image =
        |service: &str| config.services.iter().any(|s| s.name == service && s.follows.as_deref().is_some_and(|f| f.eq_ignore_ascii_case(&policy.image)));
    let mut p = Protected::default();
    for row in rows {
        // A service on an image target pins a digest: what it runs is that
        // digest, whatever its tag points at today. Its recorded spec says
        // which image, even if the config has changed since.
        let image = crate::store::spec::decode_service(&row.spec).ok().and_then(|s| s.image);
        let pinned_here = image.as_ref().is_some_and(|c| c.repository.as_str().eq_ignore_ascii_case(&policy.image));
        // A service gone from the config may still run a version of this
        // image, and nothing says which image it was: keep its versions.
        let unknown = image.is_none() && !config.services.iter().any(|s| s.name == row.service);
        if !pinned_here && !unknown && !follows_image(&row.service) {
            continue;
        }
        let env = &row.environment;
        let whose = if unknown { format!(" (service {}, no longer in the config)", row.service) } else { String::new() };
        p.tag(&row.version, format!("{env} runs it{whose}"));
        if let Some(v) = &row.previous_version {
            p.tag(v, format!("{env} could roll back to it{whose}"));
        }
        // Only an image service's sha256 is an image digest (a tarball
        // service's is its release's checksum).
        if pinned_here {
            if let Some(h) = &row.sha256 {
                p.digest(&format!("sha256:{h}"), format!("{env} runs it ({} by digest)", row.version));
            }
            if let (Some(h), Some(v)) = (&row.previous_sha256, &row.previous_version) {
                p.digest(&format!("sha256:{h}"), format!("{env} could roll back to it ({v} by digest)"));
            }
        }
    }
    for d in deployments.iter().filter(|d| !d.state.is_terminal()) {
        if let (Some(service), Some(version)) = (&d.service, &d.version)
            && follows_image(service)
        {
            p.tag(version, format!("deployment {} ({}) deploys it to {}", d.id, d.state, d.environment));
        }
    }
    p
}

/// Mark the tags outside the `tags` filters of every service following
/// the policy's image (with `keep_tags` or not). A service without a
/// filter follows every tag, and then none is outside.
pub fn mark_outside(policy: &Policy, config: &Config, tags: &[TagInfo], protect: &mut Protected) {
    let mut filters = Vec::new();
    for s in config.services.iter().filter(|s| s.follows.as_deref().is_some_and(|f| f.eq_ignore_ascii_case(&policy.image))) {
        match &s.tags {
            Some(f) => filters.push(f),
            None => return,
        }
    }
    let described = filters.iter().map(|f| f.describe()).collect::<Vec<_>>().join(", ");
    for t in tags.iter().filter(|t| !filters.iter().any(|f| f.allows(&t.tag))) {
        protect.outside.insert(t.tag.clone(), format!("outside the tags filter ({described}): not followed"));
    }
}

/// A tag that stays, with every reason it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub tag: String,
    pub digest: String,
    pub reasons: Vec<String>,
}

/// A manifest to delete, and the tags that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub digest: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Newest first.
    pub kept: Vec<Kept>,
    /// Newest first (by their newest tag).
    pub delete: Vec<Doomed>,
}

/// Newest first: by the image's `created`, then (when absent or equal) by
/// semver precedence (`1.10.0` > `1.10.0-rc.10` > `1.10.0-rc.9`; a tag
/// that is not semver below every one that is), then by name. A tag
/// without a date sorts below every dated one.
pub fn order_newest_first(tags: &mut [TagInfo]) {
    let semver = |t: &TagInfo| crate::values::semver(&t.tag);
    tags.sort_by(|a, b| {
        b.created
            .is_some()
            .cmp(&a.created.is_some())
            .then(b.created.cmp(&a.created))
            .then_with(|| match (semver(b), semver(a)) {
                (Some(vb), Some(va)) => vb.cmp_precedence(&va),
                (vb, va) => vb.is_some().cmp(&va.is_some()),
            })
            .then_with(|| b.tag.cmp(&a.tag))
    });
}

/// The policy. Keeps the newest `keep` followed tags, every tag outside
/// the services' filters, every protected tag, every tag whose digest is
/// protected, and every tag sharing a digest with a kept one (deleting
/// that digest would take the kept tag with it); deletes the digests of
/// all the others.
pub fn decide(tags: &[TagInfo], protected: &Protected, keep: u32) -> Decision {
    let mut tags = tags.to_vec();
    order_newest_first(&mut tags);
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); tags.len()];
    let mut followed = 0;
    for (i, t) in tags.iter().enumerate() {
        if let Some(why) = protected.outside.get(&t.tag) {
            reasons[i].push(why.clone());
        } else {
            if followed < keep as usize {
                reasons[i].push(format!("newest {keep}"));
            }
            followed += 1;
        }
        reasons[i].extend(protected.tags.get(&t.tag).into_iter().flatten().cloned());
        reasons[i].extend(protected.digests.get(&t.digest).into_iter().flatten().cloned());
    }
    // The first kept tag of each digest names why its siblings stay.
    let mut kept_digest: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, t) in tags.iter().enumerate() {
        if !reasons[i].is_empty() {
            kept_digest.entry(t.digest.as_str()).or_insert(t.tag.as_str());
        }
    }
    let mut decision = Decision::default();
    let mut doomed: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, t) in tags.iter().enumerate() {
        let mut why = std::mem::take(&mut reasons[i]);
        if why.is_empty()
            && let Some(sibling) = kept_digest.get(t.digest.as_str())
        {
            why.push(format!("shares its digest with kept tag {sibling}"));
        }
        if why.is_empty() {
            match doomed.get(t.digest.as_str()) {
                Some(&at) => decision.delete[at].tags.push(t.tag.clone()),
                None => {
                    doomed.insert(&t.digest, decision.delete.len());
                    decision.delete.push(Doomed { digest: t.digest.clone(), tags: vec![t.tag.clone()] });
                }
            }
        } else {
            decision.kept.push(Kept { tag: t.tag.clone(), digest: t.digest.clone(), reasons: why });
        }
    }
    decision
}

/// One repository's outcome.
#[derive(Debug, Clone, Default)]
pub struct RepositoryReport {
    pub image: String,
    pub keep: u32,
    pub services: Vec<String>,
    pub kept: Vec<Kept>,
    /// What the policy deletes (with `apply`: what it tried to).
    pub delete: Vec<Doomed>,
    /// Digests actually deleted (apply only).
    pub deleted: Vec<String>,
    /// Why this repository was not (entirely) handled: the registry could
    /// not be reached, refused the credentials, refused a delete…
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub applied: bool,
    pub repositories: Vec<RepositoryReport>,
}

/// Where a repository's tags are listed and its manifests deleted: the
/// registry's HTTP API, or — for an image a service runs on a target with
/// a registry of its own (ECS: ECR, which that API does not reach with a
/// static password) — that target, through the seam
/// ([`Target::registry_images`], [`Target::delete_registry_images`]). The
/// policy is the same for both; only the listing and the deletes differ.
enum Backend {
    Api(RegistryClient),
    Target { target: Arc<dyn Target>, settings: Settings },
}

/// A service on a target with [`Capabilities::own_registry`] that runs
/// `image`: its target (built on first use) and its settings.
///
/// [`Capabilities::own_registry`]: crate::targets::Capabilities::own_registry
async fn owner(image: &str, config: &Config, targets: &Targets) -> Option<Result<(Arc<dyn Target>, Settings), String>> {
    let s = config.services.iter().find(|s| {
        s.follows.as_deref().is_some_and(|f| f.eq_ignore_ascii_case(image))
            && s.spec.is_some()
            && crate::targets::kind(&s.target).is_some_and(|k| k.capabilities().own_registry)
    })?;
    let settings = s.spec.as_ref().map(|spec| spec.settings.clone()).unwrap_or_default();
    Some(targets.get(&s.target).await.map(|t| (t, settings)).map_err(|e| format!("{image}: target {:?} cannot be used: {}", s.target, e.message)))
}

/// The repository's tags and where to delete them.
async fn list(policy: &Policy, config: &Config, targets: &Targets) -> Result<(Vec<TagInfo>, Backend), String> {
    if let Some(owner) = owner(&policy.image, config, targets).await {
        let (target, settings) = owner?;
        if let Some(images) = target.registry_images(&policy.image, &settings).await {
            let images = images.map_err(|e| e.message)?;
            // One TagInfo per tag, dated by the push (a target's registry
            // need not read the image's config for its `created`).
            let tags =
                images.into_iter().flat_map(|i| i.tags.into_iter().map(move |tag| TagInfo { tag, digest: i.digest.clone(), created: i.pushed })).collect();
            return Ok((tags, Backend::Target { target, settings }));
        }
    }
    let client = RegistryClient::for_image(&policy.image, &config.registries).map_err(|e| e.to_string())?;
    let tags = client.resolve_all(&policy.image).await.map_err(|e| e.to_string())?;
    Ok((tags, Backend::Api(client)))
}

/// The plan for every policy of the config, given what the store records
/// (`slipway plan` passes nothing when there is no store yet). A
/// registry's failure is that repository's error, never the whole run's.
/// `targets`: the node's (or, for `plan`, a fresh set), for images kept
/// in a target's own registry.
pub async fn dry_run(config: &Config, rows: &[ServiceRow], deployments: &[DeploymentRow], targets: &Targets) -> Report {
    plan(config, rows, deployments, targets).await.0
}

/// The dry run, and per repository where to delete.
async fn plan(config: &Config, rows: &[ServiceRow], deployments: &[DeploymentRow], targets: &Targets) -> (Report, Vec<Option<Backend>>) {
    let mut report = Report { applied: false, repositories: vec![] };
    let mut backends = Vec::new();
    for policy in policies(config) {
        let mut repo = RepositoryReport { image: policy.image.clone(), keep: policy.keep, services: policy.services.clone(), ..Default::default() };
        let mut protect = protected(&policy, config, rows, deployments);
        match list(&policy, config, targets).await {
            Err(e) => {
                repo.errors.push(e);
                backends.push(None);
            }
            Ok((tags, backend)) => {
                mark_outside(&policy, config, &tags, &mut protect);
                let decision = decide(&tags, &protect, policy.keep);
                repo.kept = decision.kept;
                repo.delete = decision.delete;
                backends.push(Some(backend));
            }
        }
        report.repositories.push(repo);
    }
    (report, backends)
}

/// The plan (or, with `apply`, its execution) for every policy of the
/// config. Only the store failing fails the whole run.
pub async fn run(config: &Config, store: &dyn Store, apply: bool, targets: &Targets) -> Result<Report, StoreError> {
    let (mut report, backends) = plan(config, &store.services().await?, &in_flight(store).await?, targets).await;
    if !apply {
        return Ok(report);
    }
    report.applied = true;
    let policies = policies(config);
    for (repo, backend) in report.repositories.iter_mut().zip(backends) {
        let Some(backend) = backend else { continue };
        if repo.delete.is_empty() {
            continue;
        }
        let Some(policy) = policies.iter().find(|p| p.image == repo.image) else { continue };
        // A deploy accepted since the store was read may name one of
        // these: read again just before deleting, and spare it.
        let now = protected(policy, config, &store.services().await?, &in_flight(store).await?);
        let mut doomed = Vec::new();
        for d in std::mem::take(&mut repo.delete) {
            let spared: Vec<String> =
                d.tags.iter().flat_map(|t| now.tags.get(t).into_iter().flatten()).chain(now.digests.get(&d.digest).into_iter().flatten()).cloned().collect();
            if spared.is_empty() {
                doomed.push(d);
            } else {
                for t in &d.tags {
                    repo.kept.push(Kept { tag: t.clone(), digest: d.digest.clone(), reasons: spared.clone() });
                }
            }
        }
        match backend {
            Backend::Api(client) => {
                let mut stopped = false;
                for d in doomed {
                    if !stopped {
                        match client.delete(&repo.image, &d.digest).await {
                            Ok(()) => repo.deleted.push(d.digest.clone()),
                            // The next delete would meet the same answer: say it once.
                            Err(e @ (RetentionError::Refused { .. } | RetentionError::DeleteDisabled { .. } | RetentionError::Unreachable { .. })) => {
                                repo.errors.push(e.to_string());
                                stopped = true;
                            }
                            Err(e) => repo.errors.push(e.to_string()),
                        }
                    }
                    repo.delete.push(d);
                }
            }
            // The target deletes them all at once (ECR: 100 a call) and
            // says which went and what it refused.
            Backend::Target { target, settings } => {
                let digests: Vec<String> = doomed.iter().map(|d| d.digest.clone()).collect();
                let done = target.delete_registry_images(&repo.image, &settings, &digests).await;
                repo.deleted.extend(done.deleted);
                repo.errors.extend(done.errors);
                repo.delete.extend(doomed);
            }
        }
    }
    Ok(report)
}

/// Deployments still waiting at a gate, queued or running: a deploy
/// waiting all weekend for its window still needs its tag.
pub async fn in_flight(store: &dyn Store) -> Result<Vec<DeploymentRow>, StoreError> {
    let mut v = store.deployments(10_000, Some(crate::store::DeploymentState::Waiting)).await?;
    v.extend(store.deployments(10_000, Some(crate::store::DeploymentState::Queued)).await?);
    v.extend(store.deployments(10_000, Some(crate::store::DeploymentState::Running)).await?);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(tag: &str, digest: &str, created: Option<i64>) -> TagInfo {
        TagInfo { tag: tag.into(), digest: digest.into(), created }
    }

    fn tags_of(d: &Decision) -> (Vec<&str>, Vec<Vec<&str>>) {
        (d.kept.iter().map(|k| k.tag.as_str()).collect(), d.delete.iter().map(|d| d.tags.iter().map(String::as_str).collect()).collect())
    }

    #[test]
    fn keeps_the_newest_n_and_deletes_the_rest_newest_first() {
        let tags = [t("1.0.0", "a", Some(1)), t("1.1.0", "b", Some(2)), t("1.2.0", "c", Some(3)), t("1.3.0", "d", Some(4))];
        let d = decide(&tags, &Protected::default(), 2);
        assert_eq!(tags_of(&d), (vec!["1.3.0", "1.2.0"], vec![vec!["1.1.0"], vec!["1.0.0"]]));
        assert_eq!(d.kept[0].reasons, vec!["newest 2"]);
        assert_eq!(d.delete[0].digest, "b");
    }

    #[test]
    fn protected_tags_and_digests_stay_with_their_reasons() {
        let tags = [t("1.0.0", "a", Some(1)), t("1.1.0", "b", Some(2)), t("1.2.0", "c", Some(3)), t("1.3.0", "d", Some(4))];
        let mut p = Protected::default();
        p.tag("1.0.0", "production runs it");
        p.digest("b", "staging could roll back to it (1.1.0 by digest)");
        let d = decide(&tags, &p, 1);
        assert_eq!(tags_of(&d), (vec!["1.3.0", "1.1.0", "1.0.0"], vec![vec!["1.2.0"]]));
        assert_eq!(d.kept[1].reasons, vec!["staging could roll back to it (1.1.0 by digest)"]);
        assert_eq!(d.kept[2].reasons, vec!["production runs it"]);
    }

    #[test]
    fn a_digest_shared_with_a_kept_tag_is_never_deleted() {
        // "stable" is old by name but points at the kept 1.0.0's manifest;
        // "1.1" and "1.1.1" share one that nothing keeps: one delete.
        let tags = [t("1.0.0", "a", Some(1)), t("stable", "a", Some(1)), t("1.1.1", "b", Some(2)), t("1.1", "b", Some(2)), t("1.2.0", "c", Some(3))];
        let mut p = Protected::default();
        p.tag("1.0.0", "production runs it");
        let d = decide(&tags, &p, 1);
        assert_eq!(tags_of(&d), (vec!["1.2.0", "1.0.0", "stable"], vec![vec!["1.1.1", "1.1"]]));
        assert_eq!(d.kept[2].reasons, vec!["shares its digest with kept tag 1.0.0"]);
        for doomed in &d.delete {
            assert!(d.kept.iter().all(|k| k.digest != doomed.digest));
        }
    }

    #[test]
    fn without_dates_semver_then_name_orders() {
        let mut tags = vec![
            t("abc", "1", None),
            t("1.10.0", "2", None),
            t("1.9.0", "3", None),
            t("1.10.0-rc.1", "4", None),
            t("v2.0.0", "5", None),
            t("zzz", "6", None),
            t("0.1.0", "7", Some(5)),
        ];
        order_newest_first(&mut tags);
        let order: Vec<&str> = tags.iter().map(|t| t.tag.as_str()).collect();
        assert_eq!(order, vec!["0.1.0", "v2.0.0", "1.10.0", "1.10.0-rc.1", "1.9.0", "zzz", "abc"]);
    }

    #[test]
    fn issue14_rc_10_sorts_after_rc_9_and_a_release_after_its_pre_releases() {
        // The hand-written parser compared pre-release parts as strings,
        // so rc.10 sorted below rc.9 and keep_tags = 1 kept rc.9.
        let mut tags =
            vec![t("1.0.0-rc.9", "a", None), t("v1.0.0", "b", None), t("1.0.0-rc.10", "c", None), t("1.0.0-alpha", "d", None), t("1.0.0-rc.2", "e", None)];
        order_newest_first(&mut tags);
        let order: Vec<&str> = tags.iter().map(|t| t.tag.as_str()).collect();
        assert_eq!(order, vec!["v1.0.0", "1.0.0-rc.10", "1.0.0-rc.9", "1.0.0-rc.2", "1.0.0-alpha"]);
        let pre = [t("1.0.0-rc.9", "a", None), t("1.0.0-rc.10", "c", None)];
        assert_eq!(tags_of(&decide(&pre, &Protected::default(), 1)), (vec!["1.0.0-rc.10"], vec![vec!["1.0.0-rc.9"]]));
        // The tag filter reads versions the same way, a leading v included.
        let semver = crate::config::service::TagFilter::parse("semver").expect("rule");
        for ok in ["1.0.0-rc.10", "v1.2.3", "1.2.3+build.5", "10.20.30-alpha.1+x"] {
            assert!(semver.allows(ok), "{ok}");
        }
        for not in ["1.0", "latest", "v", "1.2.3.4", "1.2.x", "01.2.3", "1.2.3-"] {
            assert!(!semver.allows(not), "{not}");
        }
    }

    #[test]
    fn keep_larger_than_the_tags_deletes_nothing_and_odd_input_does_not_panic() {
        let tags = [t("1.0.0", "a", Some(1))];
        assert!(decide(&tags, &Protected::default(), 5).delete.is_empty());
        // Tags outside the filters stay and do not count towards N; one
        // sharing a digest with a followed old tag keeps that digest.
        let tags = [
            t("main-1", "m1", Some(9)),
            t("main-2", "m2", Some(8)),
            t("1.0.0", "a", Some(1)),
            t("1.1.0", "b", Some(2)),
            t("1.2.0", "c", Some(3)),
            t("latest", "a", Some(1)),
        ];
        let mut p = Protected::default();
        for o in ["main-1", "main-2", "latest"] {
            p.outside.insert(o.into(), "outside".into());
        }
        let d = decide(&tags, &p, 1);
        assert_eq!(d.delete, vec![Doomed { digest: "b".into(), tags: vec!["1.1.0".into()] }], "{d:?}");
        let kept: Vec<&str> = d.kept.iter().map(|k| k.tag.as_str()).collect();
        assert_eq!(kept, ["main-1", "main-2", "1.2.0", "1.0.0", "latest"]);
        assert_eq!(decide(&[], &Protected::default(), 1), Decision::default());
        let odd =
            [t("", "", None), t("1..2", "x", Some(i64::MIN)), t("v", "x", Some(i64::MAX)), t("1.2.3.4", "y", None), t("99999999999999999999.0.0", "z", None)];
        let d = decide(&odd, &Protected::default(), 1);
        assert_eq!(d.kept.len() + d.delete.iter().map(|d| d.tags.len()).sum::<usize>(), odd.len());
    }

    fn config() -> Config {
        crate::config::parse(
            "slipway.toml",
            r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"
[[service]]
name = "worker"
follows = "reg.example.org/team/worker"
keep_tags = 3
[[service]]
name = "worker-b"
follows = "reg.example.org/team/worker"
keep_tags = 5
[[service]]
name = "shop"
target = "docker"
image = "reg.example.org/team/shop"
port = 8080
listen = "127.0.0.1:8090"
keep_tags = 2
[[service]]
name = "other"
follows = "reg.example.org/team/other"
"#,
        )
        .expect("valid config")
    }

    #[test]
    fn policies_group_services_by_image_and_keep_the_most_asked() {
        let p = policies(&config());
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].image.as_str(), p[0].keep), ("reg.example.org/team/shop", 2));
        assert_eq!(
            (p[1].image.as_str(), p[1].keep, p[1].services.clone()),
            ("reg.example.org/team/worker", 5, vec!["worker".to_string(), "worker-b".to_string()])
        );
    }

    #[test]
    fn only_tags_outside_every_services_filter_are_outside() {
        let tags = [t("1.0.0", "a", None), t("main-7", "b", None), t("rc-1", "c", None), t("latest", "d", None)];
        let text = |b_tags: &str| {
            format!(
                "[[service]]\nname = \"a\"\nfollows = \"reg.example.org/w\"\ntags = \"semver\"\nkeep_tags = 1\n[[service]]\nname = \"b\"\nfollows = \"reg.example.org/w\"\n{b_tags}\n"
            )
        };
        let outside = |text: String| {
            let config = crate::config::parse("slipway.toml", &text).expect("valid");
            let mut p = Protected::default();
            mark_outside(&policies(&config)[0], &config, &tags, &mut p);
            p.outside.keys().cloned().collect::<Vec<_>>()
        };
        assert_eq!(outside(text("tags = \"main-.*\"")), ["latest", "rc-1"]);
        assert_eq!(outside(text("tags = \"semver\"")), ["latest", "main-7", "rc-1"]);
        assert!(outside(text("")).is_empty(), "b follows every tag");
    }

    fn row(env: &str, service: &str, version: &str, previous: Option<&str>, spec: String, sha: Option<&str>, prev_sha: Option<&str>) -> ServiceRow {
        ServiceRow {
            environment: env.into(),
            service: service.into(),
            version: version.into(),
            previous_version: previous.map(Into::into),
            spec,
            revision: "r".into(),
            deployment_id: 1,
            updated_at: 0,
            artifact_dir: None,
            sha256: sha.map(Into::into),
            previous_sha256: prev_sha.map(Into::into),
            target_ref: None,
        }
    }

    #[test]
    fn protection_comes_from_what_runs_could_roll_back_and_is_in_flight() {
        let c = config();
        let ps = policies(&c);
        // A docker service's spec as a deploy records it.
        let spec =
            c.services.iter().find(|s| s.name == "shop").and_then(|s| s.spec.clone()).map(|s| crate::store::spec::encode_service(&s)).expect("shop is managed");
        let rows = vec![
            row("production", "shop", "1.0.0", Some("0.9.0"), spec, Some("aa"), Some("bb")),
            row("staging", "worker", "2.0.0", Some("1.9.0"), "{}".into(), Some("tarball-checksum"), None),
            row("staging", "other", "7.0.0", None, "{}".into(), None, None),
            row("dev", "removed", "0.1.0", None, "{}".into(), None, None),
        ];
        let dep = |id, state, service: &str, version: &str| DeploymentRow {
            id,
            event_id: id,
            kind: crate::store::DeploymentKind::Deploy,
            environment: "production".into(),
            service: Some(service.into()),
            version: Some(version.into()),
            revision: "r".into(),
            state,
            reason: None,
            superseded_by: None,
            cancel_requested: false,
            created_at: 0,
            started_at: None,
            finished_at: None,
        };
        let deps =
            vec![dep(7, crate::store::DeploymentState::Queued, "worker-b", "1.5.0"), dep(8, crate::store::DeploymentState::Succeeded, "worker", "1.4.0")];
        let shop = protected(&ps[0], &c, &rows, &deps);
        assert_eq!(shop.tags.keys().collect::<Vec<_>>(), vec!["0.1.0", "0.9.0", "1.0.0"]);
        assert!(shop.tags["1.0.0"].contains("production runs it"));
        assert!(shop.tags["0.9.0"].contains("production could roll back to it"));
        assert!(shop.digests["sha256:aa"].contains("production runs it (1.0.0 by digest)"));
        assert!(shop.digests["sha256:bb"].contains("production could roll back to it (0.9.0 by digest)"));
        let worker = protected(&ps[1], &c, &rows, &deps);
        assert_eq!(worker.tags.keys().collect::<Vec<_>>(), vec!["0.1.0", "1.5.0", "1.9.0", "2.0.0"]);
        assert!(worker.tags["0.1.0"].contains("dev runs it (service removed, no longer in the config)"));
        assert!(worker.tags["1.5.0"].contains("deployment 7 (queued) deploys it to production"));
        // A tarball service's checksum is no image digest.
        assert!(worker.digests.is_empty());
    }

    /// A target with a registry of its own, answering from a list and
    /// recording what it is asked to delete.
    struct OwnRegistry {
        images: Vec<crate::targets::RegistryImage>,
        asked: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Target for OwnRegistry {
        async fn run(
            &self,
            _r: crate::targets::JobRequest,
            _o: crate::targets::OutputSink,
            _c: tokio_util::sync::CancellationToken,
        ) -> crate::targets::RunResult {
            crate::targets::RunResult::failed("not here")
        }
        async fn registry_images(&self, image: &str, _s: &Settings) -> Option<Result<Vec<crate::targets::RegistryImage>, crate::targets::TargetError>> {
            image.contains(".dkr.ecr.").then(|| Ok(self.images.clone()))
        }
        async fn delete_registry_images(&self, _image: &str, _s: &Settings, digests: &[String]) -> crate::targets::RegistryDeletion {
            self.asked.lock().unwrap().extend(digests.iter().cloned());
            // The registry refuses one.
            let (refused, deleted): (Vec<String>, Vec<String>) = digests.iter().cloned().partition(|d| d == "sha256:b");
            crate::targets::RegistryDeletion { deleted, errors: refused.iter().map(|d| format!("refused {d}")).collect() }
        }
    }

    #[tokio::test]
    async fn issue16_images_in_a_targets_own_registry_are_listed_and_deleted_through_the_target() {
        let image = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/api";
        let config = crate::config::parse(
            "slipway.toml",
            &format!("[[service]]\nname = \"api\"\ntarget = \"ecs\"\ncluster = \"prod\"\nimage = \"{image}\"\nkeep_tags = 1\n"),
        )
        .expect("valid config");
        let img = |digest: &str, tags: &[&str], pushed: i64| crate::targets::RegistryImage {
            digest: digest.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            pushed: Some(pushed),
        };
        let target = Arc::new(OwnRegistry {
            images: vec![img("sha256:a", &["1.0"], 1), img("sha256:b", &["1.1", "old"], 2), img("sha256:c", &["1.2"], 3), img("sha256:d", &["1.3"], 4)],
            asked: Default::default(),
        });
        let name = config.services[0].target.clone();
        let targets = Targets::exactly(&name, target.clone());
        // Production runs 1.0's digest (recorded under a tag since moved).
        let spec = crate::store::spec::encode_service(config.services[0].spec.as_ref().expect("spec"));
        let rows = [row("production", "api", "moved", None, spec, Some("a"), None)];

        let report = dry_run(&config, &rows, &[], &targets).await;
        let repo = &report.repositories[0];
        assert!(repo.errors.is_empty(), "{:?}", repo.errors);
        assert_eq!(
            repo.delete.iter().map(|d| (d.digest.as_str(), d.tags.clone())).collect::<Vec<_>>(),
            [
                ("sha256:c", vec!["1.2".to_string()]),
                // Same push: by name, newest first.
                ("sha256:b", vec!["old".to_string(), "1.1".to_string()])
            ]
        );
        let kept: Vec<(&str, &[String])> = repo.kept.iter().map(|k| (k.tag.as_str(), k.reasons.as_slice())).collect();
        assert_eq!(kept, [("1.3", &["newest 1".to_string()][..]), ("1.0", &["production runs it (moved by digest)".to_string()][..])]);
        assert!(target.asked.lock().unwrap().is_empty(), "a dry run deletes nothing");

        // Apply, through the target; what it refused is the repository's error.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::open(&format!("sqlite://{}", dir.path().join("s.db").display())).await.expect("store");
        store.set_service(rows[0].clone()).await.expect("record");
        let report = run(&config, store.as_ref(), true, &targets).await.expect("run");
        let repo = &report.repositories[0];
        assert_eq!(*target.asked.lock().unwrap(), ["sha256:c", "sha256:b"]);
        assert_eq!(repo.deleted, ["sha256:c"]);
        assert_eq!(repo.errors, ["refused sha256:b"]);

        // An image the target does not keep goes to the registry API.
        let other = crate::config::parse(
            "slipway.toml",
            "[[service]]\nname = \"api\"\ntarget = \"ecs\"\ncluster = \"prod\"\nimage = \"127.0.0.1:9/api\"\nkeep_tags = 1\n",
        )
        .expect("valid config");
        let report = dry_run(&other, &[], &[], &targets).await;
        assert!(report.repositories[0].errors.iter().any(|e| e.contains("127.0.0.1:9")), "{:?}", report.repositories[0].errors);
    }
}
