//! Gates between environments: approvals, soak times, deploy windows, and
//! promotion (a version that succeeded in one environment deployed to the
//! next by rule) — the rules, with no IO.
//!
//! A gated deployment is stored `waiting` with a [`Hold`] (the submitter
//! words its first `waiting_for` with [`waits`]). The gate loop
//! (`submit::gates`, on every node) looks at the waiting ones each second
//! and acts on [`evaluate`]: one whose conditions all hold is released to
//! `queued` (a compare-and-set in the store, so one node wins); one whose
//! promoted version left its source environment is dropped; the others get
//! their `waiting_for` text updated, which `status`, the API and `why`
//! show. The same loop starts the automatic promotions [`due_promotions`]
//! names. Design notes: docs/design/gates.md.
//!
//! The rules know nothing of submitting or of the store's IO, so the
//! submitter (which computes holds) and the loop (which submits
//! promotions) both depend on them, and not on each other.

use std::time::Duration;

use crate::config::{Config, Environment};
use crate::store::{DeploymentRow, Hold, Millis};

/// What a waiting deployment should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Release,
    Wait(String),
    Drop(String),
}

/// What `hold` still waits for at `now`, in words; None when nothing.
pub fn waits(hold: &Hold, env: Option<&Environment>, now: Millis) -> Option<Vec<String>> {
    let mut w = Vec::new();
    let env_name = env.map(|e| e.name.as_str()).unwrap_or("this environment");
    // Times in the environment's zone, the one its windows are written in.
    let utc = crate::config::environment::Zone::default();
    let zone = env.map(|e| &e.timezone).unwrap_or(&utc);
    if hold.approval && hold.approved_by.is_none() {
        w.push(format!("approval by an approver of {env_name}"));
    }
    if hold.not_before > now {
        let left = Duration::from_millis((hold.not_before - now) as u64);
        let from = hold.source_environment.as_deref().unwrap_or("its source environment");
        w.push(format!("soak in {from} until {} ({} more)", zone.clock(hold.not_before), crate::plan::format_duration(left)));
    }
    if hold.window
        && let Some(env) = env
        && !env.window_open(now / 1000)
    {
        let next = env.next_window(now / 1000).map(|t| format!("; next opens {}", zone.clock(t * 1000))).unwrap_or_default();
        w.push(format!("the deploy window of {} ({}){next}", env.name, env.windows_text()));
    }
    (!w.is_empty()).then_some(w)
}

/// Decide on one waiting deployment.
pub fn evaluate(d: &DeploymentRow, hold: &Hold, env: Option<&Environment>, now: Millis, source_version: Option<&str>) -> Verdict {
    if let (Some(from), Some(v)) = (&hold.source_environment, &d.version)
        && source_version != Some(v.as_str())
    {
        return Verdict::Drop(format!("not promoted: {from} no longer runs {v} (it runs {})", source_version.unwrap_or("nothing")));
    }
    match waits(hold, env, now) {
        None => Verdict::Release,
        Some(w) => Verdict::Wait(format!("waiting for {}", w.join("; "))),
    }
}

/// Promotions due into `target` (an environment with `promote_from`):
/// for each service of `services` (the config `target` runs) that opts
/// `target` into `auto_deploy`, the version the source runs, if the target
/// has never run it. Returns (service, from, source deployment id).
pub fn due_promotions(target: &Environment, services: &Config, rows: &[crate::store::ServiceRow]) -> Vec<(String, String, i64)> {
    let Some(from) = &target.promote_from else { return vec![] };
    let mut out = Vec::new();
    for s in services.services.iter().filter(|s| s.auto_deploy.contains(&target.name)) {
        let Some(src) = rows.iter().find(|r| &r.environment == from && r.service == s.name) else { continue };
        let here = rows.iter().find(|r| r.environment == target.name && r.service == s.name);
        // Never back to what it came from: a rollback in the source is
        // not a new version to promote.
        if here.is_some_and(|h| h.version == src.version || h.previous_version.as_deref() == Some(src.version.as_str())) {
            continue;
        }
        out.push((s.name.clone(), from.clone(), src.deployment_id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeploymentKind, DeploymentState};

    const MONDAY_NOON: Millis = (1_795_392_000 + 12 * 3600) * 1000;

    fn dep(version: &str) -> DeploymentRow {
        DeploymentRow {
            id: 7,
            event_id: 1,
            kind: DeploymentKind::Deploy,
            environment: "production".into(),
            service: Some("api".into()),
            version: Some(version.into()),
            revision: "r".into(),
            state: DeploymentState::Waiting,
            reason: None,
            superseded_by: None,
            cancel_requested: false,
            created_at: 0,
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn every_gate_must_pass() {
        let mut env = Environment::named("production");
        env.windows = vec![crate::config::Window::parse("mon-fri 09:00-17:00").unwrap()];
        let mut hold = Hold {
            approval: true,
            not_before: MONDAY_NOON + 60_000,
            window: true,
            source_environment: Some("staging".into()),
            source_deployment: Some(3),
            ..Hold::default()
        };
        let d = dep("1.4.0");
        let v = evaluate(&d, &hold, Some(&env), MONDAY_NOON, Some("1.4.0"));
        assert_eq!(v, Verdict::Wait("waiting for approval by an approver of production; soak in staging until Mon 12:01:00 UTC (1m00s more)".into()));
        hold.approved_by = Some("alice".into());
        assert!(matches!(evaluate(&d, &hold, Some(&env), MONDAY_NOON, Some("1.4.0")), Verdict::Wait(w) if w.starts_with("waiting for soak")));
        assert_eq!(evaluate(&d, &hold, Some(&env), MONDAY_NOON + 60_000, Some("1.4.0")), Verdict::Release);
        let evening = MONDAY_NOON + 6 * 3600 * 1000;
        assert_eq!(
            evaluate(&d, &hold, Some(&env), evening, Some("1.4.0")),
            Verdict::Wait("waiting for the deploy window of production (mon-fri 09:00-17:00 UTC); next opens Tue 09:00:00 UTC".into())
        );
        assert_eq!(
            evaluate(&d, &hold, Some(&env), MONDAY_NOON + 60_000, Some("1.5.0")),
            Verdict::Drop("not promoted: staging no longer runs 1.4.0 (it runs 1.5.0)".into())
        );
    }

    #[test]
    fn promotions_are_due_once_per_new_version() {
        let config = crate::config::parse(
            "t",
            r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"
promote_from = "staging"
soak = "10m"
[[service]]
name = "api"
follows = "ghcr.io/o/api"
auto_deploy = ["staging", "production"]
[[service]]
name = "worker"
follows = "ghcr.io/o/worker"
auto_deploy = ["staging"]
"#,
        )
        .unwrap();
        let row = |env: &str, svc: &str, v: &str, prev: Option<&str>, dep: i64| crate::store::ServiceRow {
            environment: env.into(),
            service: svc.into(),
            version: v.into(),
            previous_version: prev.map(Into::into),
            deployment_id: dep,
            ..crate::store::ServiceRow::default()
        };
        let production = config.environment("production").unwrap();
        let rows = vec![row("staging", "api", "2.0", Some("1.0"), 5), row("staging", "worker", "2.0", None, 6), row("production", "api", "1.0", None, 2)];
        assert_eq!(due_promotions(production, &config, &rows), vec![("api".into(), "staging".into(), 5)]);
        assert!(due_promotions(config.environment("staging").unwrap(), &config, &rows).is_empty(), "staging promotes from nowhere");
        let rows = vec![row("staging", "api", "1.0", Some("2.0"), 8), row("production", "api", "2.0", Some("1.0"), 7)];
        assert!(due_promotions(production, &config, &rows).is_empty(), "staging rolled back to what production came from");
    }
}
