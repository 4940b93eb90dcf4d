//! Triggers: events from outside (a forge, a registry) that start
//! deployments by themselves.
//!
//! A trigger reads a delivery into a [`Published`] artifact (`github.rs`:
//! signature check and payload parsing, pure), and [`decide`] says, from
//! the config alone, what that means per service and environment: deploy
//! where the service opts in (`auto_deploy`) and its tag filter lets the
//! version through; elsewhere the version is recorded as available, not
//! deployed, with the reason. The API layer stores the delivery and
//! submits the deployments.
//!
//! **Architecture Invariant:** no string from a payload is used before it
//! has passed a strict pattern (image names, versions, delivery ids); none
//! ever reaches a shell.

pub mod github;
pub mod poll;
pub mod registry;
pub mod sqs;
#[cfg(feature = "aws")]
pub mod sqs_consumer;

use crate::config::Config;

/// A version of an image that a registry says was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// `registry/repository`, lowercase, without tag.
    pub image: crate::values::Image,
    /// The tag: the version to deploy.
    pub version: crate::values::Version,
    /// The published manifest's digest, when the sender names one: part
    /// of what identifies the publication, not a pin.
    pub digest: Option<crate::values::Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// 401: the delivery is not from whom it claims.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// 400: signed, but not something Slipway can read.
    #[error("{0}")]
    BadPayload(String),
}

/// What a published version means for one service in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub service: String,
    pub environment: String,
    /// `None`: deploy. `Some(why)`: available, not deployed.
    pub held: Option<String>,
}

/// For every service that follows `p.image` (the `image` of a service on
/// an image target, or a service's `follows`), in every environment:
/// deploy or hold.
pub fn decide(config: &Config, p: &Published) -> Vec<Decision> {
    decide_for(config, &p.version, |s| s.follows.as_deref() == Some(p.image.as_str()))
}

/// [`decide`] for one service named directly (a generic "published"
/// event that names the service, not an image).
pub fn decide_service(config: &Config, service: &str, version: &str) -> Vec<Decision> {
    decide_for(config, version, |s| s.name == service)
}

fn decide_for(config: &Config, version: &str, follows: impl Fn(&crate::config::Service) -> bool) -> Vec<Decision> {
    let mut out = Vec::new();
    for s in &config.services {
        if !follows(s) {
            continue;
        }
        for env in config.environment_names() {
            let held = if !s.auto_deploy.contains(&env) {
                Some(format!("auto_deploy is off for {env} (the service's auto_deploy lists {})", list(&s.auto_deploy)))
            } else if let Some(f) = &s.tags
                && !f.allows(version)
            {
                Some(format!("tag {version} does not pass the service's tag filter ({})", f.describe()))
            } else {
                None
            };
            out.push(Decision { service: s.name.clone(), environment: env, held });
        }
    }
    out
}

/// A GitHub Actions workflow run that concluded with success (a
/// `workflow_run` delivery, `github::parse`). Every string is only compared
/// with the config or shown in a note; `head_sha` has passed
/// `git::valid_commit`, so a version rendered from it is hexadecimal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowRun {
    /// `workflow_run.name`: the workflow's name.
    pub workflow: String,
    /// The workflow's file (`.github/workflows/ci.yml`).
    pub path: String,
    /// `head_branch` (empty when the run has none).
    pub branch: String,
    pub head_sha: String,
    pub run_id: u64,
    pub run_number: u64,
    pub run_attempt: u64,
    /// What triggered the run: `push`, `pull_request`, `schedule`, …
    pub event: String,
    /// `repository.full_name`.
    pub repository: String,
}

impl WorkflowRun {
    /// "CI" run 30433642 (attempt 2) of 6113728 on main
    pub fn describe(&self) -> String {
        format!(
            "workflow {:?} run {} (attempt {}) of {} on {:?}",
            self.workflow,
            self.run_id,
            self.run_attempt,
            &self.head_sha[..self.head_sha.len().min(7)],
            self.branch
        )
    }

    fn matches(&self, w: &crate::config::workflow::OnWorkflow) -> bool {
        let workflow = w.workflow == self.workflow || (!self.path.is_empty() && w.workflow.trim_start_matches("./") == self.path);
        workflow && w.branch == self.branch && w.events.contains(&self.event) && w.repository.as_ref().is_none_or(|r| r.eq_ignore_ascii_case(&self.repository))
    }
}

/// For every service whose `on_workflow` names this run's workflow,
/// branch, event (and repository, if it names one), in every
/// environment: deploy or hold, as [`decide`] does, each with the version
/// its template renders from the run.
pub fn decide_workflow(config: &Config, run: &WorkflowRun) -> Vec<(Decision, String)> {
    let facts = crate::config::workflow::RunFacts { head_sha: &run.head_sha, run_id: run.run_id, run_number: run.run_number };
    let mut out = Vec::new();
    for s in &config.services {
        let Some(w) = s.on_workflow.as_ref().filter(|w| run.matches(w)) else { continue };
        let version = w.version.render(&facts);
        out.extend(decide_for(config, &version, |x| x.name == s.name).into_iter().map(|d| (d, version.clone())));
    }
    out
}

/// Why no service deploys on `run`: what each `on_workflow` waits for.
pub fn workflow_unmatched(config: &Config, run: &WorkflowRun) -> String {
    let waiting: Vec<String> = config
        .services
        .iter()
        .filter_map(|s| {
            let w = s.on_workflow.as_ref()?;
            let repo = w.repository.as_ref().map(|r| format!(" in {r}")).unwrap_or_default();
            Some(format!("{} waits for {:?} on {:?}{repo} from {}", s.name, w.workflow, w.branch, w.events.join("/")))
        })
        .collect();
    format!(
        "no service's on_workflow matches {} from a {:?} event in {} ({})",
        run.describe(),
        run.event,
        run.repository,
        if waiting.is_empty() { "no service has on_workflow".to_string() } else { waiting.join("; ") }
    )
}

/// [`decide`] for a version known under several image names (a registry
/// reached by more than one host name): each service and environment once.
pub fn decide_any(config: &Config, images: &[crate::values::Image], version: &str) -> Vec<Decision> {
    decide_for(config, version, |s| s.follows.as_ref().is_some_and(|f| images.iter().any(|i| i == f.as_str())))
}

/// An environment that takes its versions by promotion (`promote_from`)
/// never gets a published version directly, even where `auto_deploy`
/// names it: there, `auto_deploy` means "promote here by itself", and a
/// direct deploy would reach production beside staging instead of after
/// it. `gates` is the node's config (gates are never read from a
/// repository).
pub fn promotion_only(gates: &Config, decisions: &mut [Decision]) {
    let before = decisions.to_vec();
    for d in decisions.iter_mut().filter(|d| d.held.is_none()) {
        let Some(from) = gates.environment(&d.environment).and_then(|e| e.promote_from.as_deref()) else { continue };
        // Held in the source too: no promotion will come by itself, and the
        // reason must not promise one.
        let source = before.iter().find(|s| s.service == d.service && s.environment == from).and_then(|s| s.held.as_deref());
        d.held = Some(match source {
            None => format!("{} takes versions by promotion from {from}: promoted there once it has succeeded in {from}", d.environment),
            Some(why) => format!(
                "{} takes versions by promotion from {from}, and {from} holds this version too ({why}): deploy it to {from} first, or to {} by hand",
                d.environment, d.environment
            ),
        });
    }
}

/// The key a publication deploys under in one environment: what was
/// published (the image a service follows, or the service named; the
/// version; the digest if the sender named one), not the delivery that
/// announced it. GitHub's `package` and `registry_package` deliveries of
/// one push, a registry's retries, and a `/published` event for the same
/// image and version all find it taken: one deployment.
pub fn publication_key(what: &str, version: &str, digest: Option<&str>, environment: &str, service: &str) -> String {
    crate::submit::key_of("published", &["publication", what, version, digest.unwrap_or(""), environment, service])
}

/// A version an environment runs, or has decided on (a deployment of it
/// waiting, queued or running): what a published version must be newer
/// than to deploy by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub version: String,
    /// Its digest, when known (what runs).
    pub digest: Option<String>,
    /// "runs in staging (deployment #3)", "is queued in staging
    /// (deployment #4)".
    pub what: String,
    /// When a version was first seen (a deployment or a delivery of it).
    pub first_seen: Option<crate::store::Millis>,
}

/// Why a published `version` is not deployed by itself: it is not newer
/// than something in `standing` by the service's tag rule. `semver`:
/// semantic version precedence (`1.10.0` > `1.9.0` > `1.9.0-rc.1`). A
/// regular expression (or no rule) orders nothing by the tags
/// themselves, so versions go by when each was first seen (a late retry
/// of an older publication was seen before what replaced it); so does a
/// pair semver cannot order (a version deployed by hand that is not
/// semver). The same version is not newer, unless both digests are known
/// and differ (a tag pushed again with new content). `None`: it is newer
/// than all of them (or nothing stands), and deploys.
pub fn not_newer(
    rule: Option<&crate::config::service::TagFilter>,
    version: &str,
    digest: Option<&str>,
    first_seen: Option<crate::store::Millis>,
    standing: &[Standing],
) -> Option<String> {
    use std::cmp::Ordering;
    for st in standing {
        let by_semver = matches!(rule, Some(crate::config::service::TagFilter::Semver)).then(|| semver_cmp(version, &st.version)).flatten();
        let order = match by_semver {
            Some(o) => Some(o),
            None if version == st.version => Some(Ordering::Equal),
            // Never seen before: the newest. A standing version whose
            // first sighting is beyond what the store lists cannot be
            // ordered, and does not hold anything back.
            None => match (first_seen, st.first_seen) {
                (Some(c), Some(s)) if c < s => Some(Ordering::Less),
                _ => Some(Ordering::Greater),
            },
        };
        let how = if by_semver.is_some() { "by semver" } else { "by when each was first seen" };
        match order {
            Some(Ordering::Equal) => {
                if let (Some(a), Some(b)) = (digest, st.digest.as_deref())
                    && a != b
                {
                    continue;
                }
                return Some(format!(
                    "{} {}: a published version deploys only if it is newer than what the environment runs or has decided",
                    st.version, st.what
                ));
            }
            Some(Ordering::Less) => {
                return Some(format!(
                    "older than {}, which {} ({how}): a published version deploys only if it is newer than what the environment runs or has decided; deploy {version} by hand to go back to it",
                    st.version, st.what
                ));
            }
            _ => {}
        }
    }
    None
}

/// Semantic version precedence (semver.org §11), `v` prefix allowed,
/// build metadata ignored; `None` if either is not a semantic version.
pub fn semver_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    Some(crate::values::semver(a)?.cmp_precedence(&crate::values::semver(b)?))
}

fn list(v: &[String]) -> String {
    if v.is_empty() { "no environment".into() } else { v.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue6_a_published_version_reaches_a_promoted_environment_only_by_promotion() {
        let config = crate::config::parse(
            "t.toml",
            r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"
promote_from = "staging"

[[service]]
name = "web"
follows = "ghcr.io/o/web"
auto_deploy = ["staging", "production"]
"#,
        )
        .expect("valid");
        let mut d = decide(&config, &Published { image: "ghcr.io/o/web".parse().expect("image"), version: "1.2.0".parse().expect("version"), digest: None });
        promotion_only(&config, &mut d);
        let held = |env: &str| d.iter().find(|d| d.environment == env).expect("decided").held.clone();
        assert_eq!(held("staging"), None);
        assert_eq!(held("production").as_deref(), Some("production takes versions by promotion from staging: promoted there once it has succeeded in staging"));

        // Opted in only where it must be promoted to: no promise of one.
        let mut d = decide(&config, &Published { image: "ghcr.io/o/web".parse().expect("image"), version: "latest".parse().expect("version"), digest: None });
        for x in d.iter_mut().filter(|x| x.environment == "staging") {
            x.held = Some("filtered".into());
        }
        promotion_only(&config, &mut d);
        let production = d.iter().find(|d| d.environment == "production").and_then(|d| d.held.clone()).expect("held");
        assert_eq!(
            production,
            "production takes versions by promotion from staging, and staging holds this version too (filtered): deploy it to staging first, or to production by hand"
        );
    }

    #[test]
    fn issue13_semver_precedence_orders_releases_pre_releases_and_numbers() {
        use std::cmp::Ordering::*;
        for (a, b, o) in [
            ("1.10.0", "1.9.0", Greater),
            ("v1.2.3", "1.2.3", Equal),
            ("1.2.3+build.5", "1.2.3", Equal),
            ("1.0.0", "1.0.0-rc.1", Greater),
            ("1.0.0-rc.2", "1.0.0-rc.10", Less),
            ("1.0.0-alpha", "1.0.0-1", Greater),
            ("1.0.0-alpha.1", "1.0.0-alpha", Greater),
            ("2.0.0", "10.0.0", Less),
        ] {
            assert_eq!(semver_cmp(a, b), Some(o), "{a} vs {b}");
        }
        assert_eq!(semver_cmp("latest", "1.0.0"), None);
        assert_eq!(semver_cmp("1.0", "1.0.0"), None);
    }

    #[test]
    fn issue13_a_published_version_not_newer_than_what_stands_is_held_with_the_reason() {
        let semver = crate::config::service::TagFilter::parse("semver").expect("rule");
        let runs = |v: &str, seen: i64| Standing {
            version: v.into(),
            digest: Some("a".repeat(64)),
            what: "runs in staging (deployment #3)".into(),
            first_seen: Some(seen),
        };
        // semver: older is held (and says how to go back), newer deploys.
        let held = not_newer(Some(&semver), "4.1.0", None, Some(100), &[runs("4.2.0", 50)]).expect("held");
        assert!(held.starts_with("older than 4.2.0, which runs in staging (deployment #3) (by semver)") && held.contains("deploy 4.1.0 by hand"), "{held}");
        assert_eq!(not_newer(Some(&semver), "4.10.0", None, None, &[runs("4.9.0", 50)]), None);
        // Newer than what runs but not than a queued deploy: held.
        let queued =
            Standing { version: "4.3.0".parse().expect("version"), digest: None, what: "is queued in staging (deployment #5)".into(), first_seen: Some(60) };
        assert!(not_newer(Some(&semver), "4.2.5", None, None, &[runs("4.2.0", 50), queued]).is_some_and(|w| w.contains("4.3.0, which is queued")));
        // The same version again: held, unless its content changed.
        assert!(not_newer(Some(&semver), "4.2.0", None, None, &[runs("4.2.0", 50)]).is_some_and(|w| w.starts_with("4.2.0 runs in staging")));
        assert_eq!(not_newer(Some(&semver), "4.2.0", Some(&"b".repeat(64)), None, &[runs("4.2.0", 50)]), None, "a tag pushed again with new content");
        // A regular expression: by first sighting. A version never seen
        // is the newest; one seen before what runs is older.
        let regex = crate::config::service::TagFilter::parse("main-[0-9a-f]+").expect("rule");
        assert_eq!(not_newer(Some(&regex), "main-aaa", None, None, &[runs("main-fff", 50)]), None);
        let w = not_newer(Some(&regex), "main-aaa", None, Some(10), &[runs("main-fff", 50)]).expect("held");
        assert!(w.contains("(by when each was first seen)"), "{w}");
        assert_eq!(not_newer(None, "x", None, Some(60), &[runs("y", 50)]), None);
        assert_eq!(not_newer(Some(&semver), "1.0.0", None, None, &[]), None, "nothing stands: it deploys");
    }

    #[test]
    fn only_opted_in_environments_deploy_and_the_tag_filter_holds_the_rest() {
        let config = crate::config::parse(
            "t.toml",
            r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"

[[service]]
name = "web"
target = "docker"
image = "ghcr.io/o/web"
port = 8080
listen = "127.0.0.1:8080"
auto_deploy = ["staging", "production"]
tags = "semver"

[[service]]
name = "worker"
command = ["./worker", "--port", "{port}"]
listen = "127.0.0.1:8081"
follows = "ghcr.io/o/web"
auto_deploy = ["staging"]
"#,
        )
        .expect("valid");
        let d = decide(&config, &Published { image: "ghcr.io/o/web".parse().expect("image"), version: "1.4.0".parse().expect("version"), digest: None });
        let deployed: Vec<_> = d.iter().filter(|d| d.held.is_none()).map(|d| format!("{}@{}", d.service, d.environment)).collect();
        assert_eq!(deployed, ["web@staging", "web@production", "worker@staging"]);
        let held = d.iter().find(|d| d.service == "worker" && d.environment == "production").and_then(|d| d.held.clone()).unwrap_or_default();
        assert!(held.contains("auto_deploy is off for production"), "{held}");

        let latest = decide(&config, &Published { image: "ghcr.io/o/web".parse().expect("image"), version: "latest".parse().expect("version"), digest: None });
        let web: Vec<_> = latest.iter().filter(|d| d.service == "web").collect();
        assert!(web.iter().all(|d| d.held.as_deref().is_some_and(|h| h.contains("tag filter (semver)"))), "{web:?}");
        assert!(
            decide(&config, &Published { image: "ghcr.io/o/other".parse().expect("image"), version: "1.0.0".parse().expect("version"), digest: None })
                .is_empty()
        );
    }

    fn run(workflow: &str, branch: &str, event: &str) -> WorkflowRun {
        WorkflowRun {
            workflow: workflow.into(),
            path: ".github/workflows/ci.yml".into(),
            branch: branch.into(),
            head_sha: "acb5820ced9479c074f688cc328bf03f341a511d".into(),
            run_id: 30433642,
            run_number: 562,
            run_attempt: 1,
            event: event.into(),
            repository: "octo-org/octo-repo".into(),
        }
    }

    #[test]
    fn issue18_a_successful_workflow_run_deploys_where_on_workflow_matches_and_auto_deploy_opts_in() {
        let config = crate::config::parse(
            "t.toml",
            r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"
promote_from = "staging"

[[service]]
name = "web"
on_workflow = { workflow = "CI", branch = "main", version = "sha-{head_sha:7}" }
auto_deploy = ["staging", "production"]

[[service]]
name = "worker"
on_workflow = { workflow = ".github/workflows/ci.yml", branch = "main", version = "{run_number}.{head_sha:7}", repository = "Octo-Org/octo-repo" }
auto_deploy = ["staging"]

[[service]]
name = "nightly"
on_workflow = { workflow = "CI", branch = "main", version = "{head_sha}", events = ["schedule"] }
auto_deploy = ["staging"]

[[service]]
name = "other"
on_workflow = { workflow = "CI", branch = "main", version = "{head_sha:7}", repository = "octo-org/elsewhere" }
auto_deploy = ["staging"]
"#,
        )
        .expect("valid");
        let mut d: Vec<Decision> = Vec::new();
        let mut versions = Vec::new();
        for (x, v) in decide_workflow(&config, &run("CI", "main", "push")) {
            versions.push(format!("{}@{}={v}", x.service, x.environment));
            d.push(x);
        }
        assert_eq!(versions, ["web@staging=sha-acb5820", "web@production=sha-acb5820", "worker@staging=562.acb5820", "worker@production=562.acb5820"]);
        promotion_only(&config, &mut d);
        let deployed: Vec<_> = d.iter().filter(|d| d.held.is_none()).map(|d| format!("{}@{}", d.service, d.environment)).collect();
        assert_eq!(deployed, ["web@staging", "worker@staging"], "production only by promotion, worker only where opted in");
        assert!(d.iter().any(|d| d.service == "worker" && d.held.as_deref().is_some_and(|h| h.contains("auto_deploy is off for production"))));

        // Another branch, another workflow, a pull request's run: nothing,
        // and the note says what each service waits for.
        for r in [run("CI", "feature/x", "push"), run("Lint", "main", "push"), run("CI", "main", "pull_request")] {
            let mut r = r;
            r.path = ".github/workflows/other.yml".into();
            assert!(decide_workflow(&config, &r).is_empty(), "{r:?}");
            let why = workflow_unmatched(&config, &r);
            assert!(why.contains("web waits for \"CI\" on \"main\" from push") && why.contains("nightly waits for \"CI\" on \"main\" from schedule"), "{why}");
        }
        let scheduled: Vec<_> = decide_workflow(&config, &run("CI", "main", "schedule")).into_iter().map(|(d, v)| format!("{}={v}", d.service)).collect();
        assert_eq!(scheduled, ["nightly=acb5820ced9479c074f688cc328bf03f341a511d", "nightly=acb5820ced9479c074f688cc328bf03f341a511d"]);

        // Ordered by run: a semantic version from the run number, filtered
        // by semver. An older run that first succeeds late (a re-run of an
        // old commit) is held, not deployed over a newer one.
        let config = crate::config::parse(
            "t.toml",
            r#"
[[service]]
name = "web"
on_workflow = { workflow = "CI", branch = "main", version = "1.0.{run_number}+{head_sha:7}" }
auto_deploy = ["default"]
tags = "semver"
"#,
        )
        .expect("valid");
        let (d, version) = decide_workflow(&config, &run("CI", "main", "push")).pop().expect("decided");
        assert_eq!((d.held, version.as_str()), (None, "1.0.562+acb5820"));
        let rule = config.services[0].tags.as_ref();
        let stands = Standing { version: "1.0.570+c0ffee1".into(), digest: None, what: "runs in default (deployment #9)".into(), first_seen: Some(1) };
        let held = not_newer(rule, &version, None, None, &[stands]).expect("held");
        assert!(held.starts_with("older than 1.0.570+c0ffee1, which runs in default (deployment #9) (by semver)"), "{held}");
    }

    #[test]
    fn issue18_on_workflow_mistakes_are_reported_at_their_place() {
        let text = r#"[[service]]
name = "web"
on_workflow = { workflow = "", branch = "../x", version = "{branch}", repository = "nope", events = ["Push"], branches = ["main"] }
auto_deploy = ["default"]

[[service]]
name = "api"
auto_deploy = ["default"]
"#;
        let e = crate::config::parse("t.toml", text).expect_err("invalid");
        let problems: Vec<(String, usize, usize)> = e
            .problems
            .iter()
            .map(|p| {
                let at = p.span.clone().expect("a place").start;
                let line = text[..at].matches('\n').count() + 1;
                let col = at - text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                (p.message.clone(), line, col)
            })
            .collect();
        let find = |m: &str| problems.iter().find(|(x, _, _)| x.contains(m)).unwrap_or_else(|| panic!("{m}: {problems:?}")).clone();
        let col = |needle: &str| text.lines().nth(2).expect("line 3").find(needle).expect("needle") + 1;
        assert_eq!(find("unknown key `branches` in service.on_workflow"), ("unknown key `branches` in service.on_workflow".into(), 3, col("branches")));
        assert_eq!(find("`on_workflow.workflow` is empty").1, 3);
        assert_eq!(find("`on_workflow.workflow` is empty").2, col("\"\""));
        assert_eq!(find("`on_workflow.branch` \"../x\" is not a branch name").2, col("\"../x\""));
        assert_eq!(find("`on_workflow.version` is not a version template: unknown placeholder {branch}").2, col("\"{branch}\""));
        assert_eq!(find("`on_workflow.repository` \"nope\" is not owner/name").2, col("\"nope\""));
        assert_eq!(find("\"Push\", which is not a GitHub event name").2, col("\"Push\""));
        // auto_deploy needs something to follow: an image or a workflow.
        let (m, line, _) = find("service \"api\" has `auto_deploy` but follows no image");
        assert_eq!(line, 8, "{m}");
        assert!(!problems.iter().any(|(m, _, _)| m.contains("service \"web\" has `auto_deploy`")), "{problems:?}");
    }
}
