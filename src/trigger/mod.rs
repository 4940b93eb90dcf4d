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

use crate::config::Config;

/// A version of an image that a registry says was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// `registry/repository`, lowercase, without tag.
    pub image: String,
    /// The tag: the version to deploy.
    pub version: String,
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

/// For every service that follows `p.image` (a docker service's own
/// image, or a service's `follows`), in every environment: deploy or hold.
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

/// [`decide`] for a version known under several image names (a registry
/// reached by more than one host name): each service and environment once.
pub fn decide_any(config: &Config, images: &[String], version: &str) -> Vec<Decision> {
    decide_for(config, version, |s| s.follows.as_ref().is_some_and(|f| images.contains(f)))
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
            Some(why) => format!("{} takes versions by promotion from {from}, and {from} holds this version too ({why}): deploy it to {from} first, or to {} by hand", d.environment, d.environment),
        });
    }
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
        let mut d = decide(&config, &Published { image: "ghcr.io/o/web".into(), version: "1.2.0".into() });
        promotion_only(&config, &mut d);
        let held = |env: &str| d.iter().find(|d| d.environment == env).expect("decided").held.clone();
        assert_eq!(held("staging"), None);
        assert_eq!(held("production").as_deref(), Some("production takes versions by promotion from staging: promoted there once it has succeeded in staging"));

        // Opted in only where it must be promoted to: no promise of one.
        let mut d = decide(&config, &Published { image: "ghcr.io/o/web".into(), version: "latest".into() });
        for x in d.iter_mut().filter(|x| x.environment == "staging") {
            x.held = Some("filtered".into());
        }
        promotion_only(&config, &mut d);
        let production = d.iter().find(|d| d.environment == "production").and_then(|d| d.held.clone()).expect("held");
        assert_eq!(production, "production takes versions by promotion from staging, and staging holds this version too (filtered): deploy it to staging first, or to production by hand");
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
        let d = decide(&config, &Published { image: "ghcr.io/o/web".into(), version: "1.4.0".into() });
        let deployed: Vec<_> = d.iter().filter(|d| d.held.is_none()).map(|d| format!("{}@{}", d.service, d.environment)).collect();
        assert_eq!(deployed, ["web@staging", "web@production", "worker@staging"]);
        let held = d.iter().find(|d| d.service == "worker" && d.environment == "production").and_then(|d| d.held.clone()).unwrap_or_default();
        assert!(held.contains("auto_deploy is off for production"), "{held}");

        let latest = decide(&config, &Published { image: "ghcr.io/o/web".into(), version: "latest".into() });
        let web: Vec<_> = latest.iter().filter(|d| d.service == "web").collect();
        assert!(web.iter().all(|d| d.held.as_deref().is_some_and(|h| h.contains("tag filter (semver)"))), "{web:?}");
        assert!(decide(&config, &Published { image: "ghcr.io/o/other".into(), version: "1.0.0".into() }).is_empty());
    }
}
