//! `slipway why SERVICE --env ENV`: why a service runs the version it runs
//! and not the newest one seen, told from the record alone.
//!
//! Every version Slipway has seen for a service in an environment is a
//! *sighting*: a deployment asked for (by a person, a rollback, a
//! trigger), or a published version a trigger held back (not opted in,
//! filtered) or could not submit. [`explain`] orders them by time, takes
//! the newest, and says what became of it, next to what the `services`
//! record says runs. Pure: the API layer reads the store.

use crate::store::{DeploymentRow, DeploymentState, EventRow, ServiceRow};

/// What `why` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The recorded version (with its digest), if any.
    pub running: Option<String>,
    /// The newest version seen.
    pub newest: Option<String>,
    /// One sentence (or a few): the answer.
    pub verdict: String,
    /// What became of each version seen, newest first.
    pub history: Vec<String>,
}

#[derive(Debug, Clone)]
struct Sighting {
    at: i64,
    version: String,
    source: String,
    /// The deliveries that announced it (a deployment a publication
    /// started: each event kind that announced that publication).
    origins: Vec<String>,
    deployment: Option<DeploymentRow>,
    held: Option<String>,
    error: Option<String>,
}

/// Where a promotion came from: the source environment and deployment.
pub type Promoted = std::collections::BTreeMap<i64, (String, Option<i64>)>;

/// Deployments that were rollbacks (`slipway rollback`): a return to an
/// older version, not a sighting of a newer one.
pub type Rollbacks = std::collections::BTreeSet<i64>;

fn promoted_from(promoted: &Promoted, id: i64) -> Option<String> {
    promoted.get(&id).map(|(from, src)| format!("promoted from {from}{}", src.map(|s| format!(" #{s}")).unwrap_or_default()))
}

/// Why `service` in `environment` runs what it runs. `deployments` and
/// `events` may hold other services' and environments' rows; `promoted`
/// says which deployments were promotions, and from where.
pub fn explain(
    environment: &str,
    service: &str,
    running: Option<&ServiceRow>,
    deployments: &[DeploymentRow],
    events: &[EventRow],
    promoted: &Promoted,
    rollbacks: &Rollbacks,
) -> Explanation {
    let mine = |d: &&DeploymentRow| d.environment == environment && d.service.as_deref() == Some(service) && d.version.is_some();
    let mut seen: Vec<Sighting> = Vec::new();
    for d in deployments.iter().filter(mine) {
        let how = promoted_from(promoted, d.id).map(|p| format!(", {p}")).unwrap_or_default();
        let kind = if rollbacks.contains(&d.id) { "a rollback".to_string() } else { d.kind.to_string() };
        seen.push(Sighting {
            at: d.created_at,
            version: d.version.clone().unwrap_or_default(),
            source: format!("deployment #{} ({kind}{how})", d.id),
            origins: vec![],
            deployment: Some(d.clone()),
            held: None,
            error: None,
        });
    }
    for e in events {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&e.payload) else { continue };
        let source = if let Some(event) = e.kind.strip_prefix("github.") {
            format!("a GitHub {event} delivery")
        } else if e.kind == "published" {
            "a published event".to_string()
        } else {
            "a registry push".to_string()
        };
        for r in v["results"].as_array().into_iter().flatten() {
            if r["service"] != service || r["environment"] != environment {
                continue;
            }
            // A delivery that started a deployment is that deployment.
            if let Some(id) = r["deployment_id"].as_i64() {
                if let Some(s) = seen.iter_mut().find(|s| s.deployment.as_ref().is_some_and(|d| d.id == id))
                    && !s.origins.contains(&source)
                {
                    s.origins.push(source.clone());
                }
                continue;
            }
            seen.push(Sighting {
                at: e.received_at,
                version: r["version"].as_str().unwrap_or("?").to_string(),
                source: source.clone(),
                origins: vec![],
                deployment: None,
                held: r["held"].as_str().map(String::from),
                error: r["error"].as_str().map(String::from),
            });
        }
    }
    seen.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| b.deployment.as_ref().map(|d| d.id).cmp(&a.deployment.as_ref().map(|d| d.id))));

    // A service Slipway does not run itself (its jobs deploy it) has no
    // `services` record: its last successful deployment is what it runs.
    let last_ok = deployments.iter().filter(mine).filter(|d| d.state == DeploymentState::Succeeded).max_by_key(|d| d.id);
    let derived = running.is_none().then_some(last_ok).flatten().map(|d| ServiceRow {
        environment: environment.to_string(),
        service: service.to_string(),
        version: d.version.clone().unwrap_or_default(),
        previous_version: None,
        spec: String::new(),
        revision: d.revision.clone(),
        deployment_id: d.id,
        updated_at: d.finished_at.unwrap_or(d.created_at),
        artifact_dir: None,
        sha256: None,
        previous_sha256: None,
        target_ref: None,
    });
    let running = running.or(derived.as_ref());
    let running_text = running.map(|r| {
        let v = match &r.sha256 {
            Some(h) => format!("{} (sha256:{})", r.version, &h[..h.len().min(12)]),
            None => r.version.clone(),
        };
        // What the target itself runs (an ECS task definition).
        match &r.target_ref {
            Some(t) => format!("{v}, as {t}"),
            None => v,
        }
    });
    let history = seen
        .iter()
        .take(12)
        .map(|s| {
            // Events come newest first: the first announcement first.
            let from = if s.origins.is_empty() { String::new() } else { format!(" (from {})", s.origins.iter().rev().cloned().collect::<Vec<_>>().join(", ")) };
            format!("{} {} from {}{from}: {}", when(s.at), s.version, s.source, fate(s))
        })
        .collect();
    // The newest version seen: a rollback returns to an older one.
    let is_rollback = |s: &Sighting| s.deployment.as_ref().is_some_and(|d| rollbacks.contains(&d.id));
    let Some(newest) = seen.iter().find(|s| !is_rollback(s)).or(seen.first()) else {
        let verdict = match &running_text {
            Some(v) => format!("{service} runs {v} in {environment}; no other version has been seen"),
            None => format!("{service} has never been deployed to {environment}, and no version of it has been seen"),
        };
        return Explanation { running: running_text, newest: None, verdict, history };
    };
    let runs = |v: &str| running.is_some_and(|r| r.version == v);
    let verdict = if runs(&newest.version) {
        let by = running
            .map(|r| {
                format!(
                    ", {} deployment #{}{}",
                    if rollbacks.contains(&r.deployment_id) { "rolled back to by" } else { "deployed by" },
                    r.deployment_id,
                    promoted_from(promoted, r.deployment_id).map(|p| format!(", {p}")).unwrap_or_default()
                )
            })
            .unwrap_or_default();
        format!("{service} runs {}, the newest version seen{by}", running_text.clone().unwrap_or_default())
    } else {
        let now = match &running_text {
            Some(v) => format!("{service} runs {v}, not {}: ", newest.version),
            None => format!("{service} runs nothing in {environment} yet; the newest version seen is {}: ", newest.version),
        };
        let mut why = format!("{now}{}", fate(newest));
        // Queued: what it waits for is the service's lock.
        if let Some(d) = &newest.deployment
            && d.state == DeploymentState::Queued
            && let Some(holder) =
                deployments.iter().find(|o| o.environment == environment && o.service.as_deref() == Some(service) && o.state == DeploymentState::Running)
        {
            why.push_str(&format!("; it waits for deployment #{} ({}), which holds the service's lock", holder.id, holder.version.as_deref().unwrap_or("?")));
        }
        // Deployed, then left: say what came after.
        if let Some(d) = &newest.deployment
            && d.state == DeploymentState::Succeeded
            && let Some(r) = running
            && r.deployment_id != d.id
        {
            let by = if rollbacks.contains(&r.deployment_id) { "a rollback" } else { "deployment" };
            why.push_str(&format!("; {by} #{} has since put {} back", r.deployment_id, r.version));
        }
        why
    };
    Explanation { running: running_text, newest: Some(newest.version.clone()), verdict, history }
}

/// What became of one sighting.
fn fate(s: &Sighting) -> String {
    if let Some(h) = &s.held {
        return format!("available, not deployed: {h}");
    }
    if let Some(e) = &s.error {
        return format!("the deployment was refused: {e}");
    }
    let Some(d) = &s.deployment else { return "no deployment".into() };
    let reason = d.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    match d.state {
        DeploymentState::Waiting => format!("deployment #{} is {}", d.id, d.reason.as_deref().unwrap_or("waiting")),
        DeploymentState::Queued => format!("deployment #{} is queued", d.id),
        DeploymentState::Running => format!("deployment #{} is running now", d.id),
        DeploymentState::Succeeded => format!("deployed by #{}", d.id),
        DeploymentState::Failed => format!("deployment #{} failed{reason}", d.id),
        DeploymentState::RolledBack => format!("deployment #{} was rolled back{reason}", d.id),
        DeploymentState::Cancelled => format!("deployment #{} was cancelled{reason}", d.id),
        DeploymentState::Superseded => match d.superseded_by {
            Some(n) => format!("deployment #{} was superseded by #{n} before it started", d.id),
            None => format!("deployment #{} was superseded before it started", d.id),
        },
    }
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeploymentKind;

    fn dep(id: i64, version: &str, state: DeploymentState, reason: Option<&str>, at: i64) -> DeploymentRow {
        DeploymentRow {
            id,
            event_id: id,
            kind: DeploymentKind::Deploy,
            environment: "production".into(),
            service: Some("web".into()),
            version: Some(version.into()),
            revision: "r".into(),
            state,
            reason: reason.map(String::from),
            superseded_by: None,
            cancel_requested: false,
            created_at: at,
            started_at: None,
            finished_at: None,
        }
    }

    fn row(version: &str, deployment_id: i64) -> ServiceRow {
        ServiceRow {
            environment: "production".into(),
            service: "web".into(),
            version: version.into(),
            previous_version: None,
            spec: "{}".into(),
            revision: "r".into(),
            deployment_id,
            updated_at: 0,
            artifact_dir: None,
            sha256: None,
            previous_sha256: None,
            target_ref: None,
        }
    }

    fn held(version: &str, why: &str, at: i64) -> EventRow {
        let payload = serde_json::json!({"results": [{"service": "web", "environment": "production", "version": version, "deployment_id": null, "held": why, "error": null}]});
        EventRow { id: at, kind: "registry.push".into(), payload: payload.to_string(), received_at: at, deployment_id: None }
    }

    #[test]
    fn a_held_version_says_why_and_a_rolled_back_one_says_what_failed() {
        let deps = [dep(1, "1.0", DeploymentState::Succeeded, None, 100), dep(2, "1.1", DeploymentState::RolledBack, Some("GET /healthz → 500"), 200)];
        let e = explain("production", "web", Some(&row("1.0", 1)), &deps, &[], &Promoted::new(), &Rollbacks::new());
        assert_eq!(e.newest.as_deref(), Some("1.1"));
        assert!(e.verdict.starts_with("web runs 1.0, not 1.1: deployment #2 was rolled back: GET /healthz → 500"), "{}", e.verdict);

        let events = [held("1.2", "auto_deploy is off for production", 300)];
        let e = explain("production", "web", Some(&row("1.0", 1)), &deps, &events, &Promoted::new(), &Rollbacks::new());
        assert!(e.verdict.contains("not 1.2: available, not deployed: auto_deploy is off for production"), "{}", e.verdict);
        assert_eq!(e.history.len(), 3);
        assert!(e.history[0].contains("1.2 from a registry push"), "{:?}", e.history);
    }

    // Issue 18: after `slipway rollback` from 1.1 to 1.0, 1.0 is not "the
    // newest version seen": 1.1 is, and the rollback put 1.0 back.
    #[test]
    fn issue18_a_rollback_is_named_and_is_no_newer_version() {
        let deps = [
            dep(3, "1.0", DeploymentState::Succeeded, None, 300),
            dep(2, "1.1", DeploymentState::Succeeded, None, 200),
            dep(1, "1.0", DeploymentState::Succeeded, None, 100),
        ];
        let rollbacks = Rollbacks::from([3]);
        let e = explain("production", "web", Some(&row("1.0", 3)), &deps, &[], &Promoted::new(), &rollbacks);
        assert_eq!(e.newest.as_deref(), Some("1.1"));
        assert!(e.verdict.starts_with("web runs 1.0, not 1.1: "), "{}", e.verdict);
        assert!(e.verdict.ends_with("; a rollback #3 has since put 1.0 back"), "{}", e.verdict);
        assert!(e.history[0].contains("deployment #3 (a rollback)"), "{:?}", e.history);
        // Without the rollback's mark, it read as the newest version.
        let plain = explain("production", "web", Some(&row("1.0", 3)), &deps, &[], &Promoted::new(), &Rollbacks::new());
        assert!(plain.verdict.contains("the newest version seen"), "{}", plain.verdict);
    }

    #[test]
    fn the_newest_running_and_a_queued_one_waiting_for_the_lock() {
        let deps = [dep(1, "1.0", DeploymentState::Succeeded, None, 100)];
        assert!(
            explain("production", "web", Some(&row("1.0", 1)), &deps, &[], &Promoted::new(), &Rollbacks::new())
                .verdict
                .contains("runs 1.0, the newest version seen, deployed by deployment #1")
        );
        let promoted = Promoted::from([(1, ("staging".to_string(), Some(7)))]);
        let e = explain("production", "web", Some(&row("1.0", 1)), &deps, &[], &promoted, &Rollbacks::new());
        assert!(e.verdict.ends_with("deployed by deployment #1, promoted from staging #7"), "{}", e.verdict);
        assert!(e.history.iter().any(|h| h.contains("from deployment #1 (deploy, promoted from staging #7)")), "{:?}", e.history);
        let deps = [
            dep(1, "1.0", DeploymentState::Succeeded, None, 100),
            dep(2, "1.1", DeploymentState::Running, None, 200),
            dep(3, "1.2", DeploymentState::Queued, None, 300),
        ];
        let v = explain("production", "web", Some(&row("1.0", 1)), &deps, &[], &Promoted::new(), &Rollbacks::new()).verdict;
        assert!(v.contains("deployment #3 is queued; it waits for deployment #2 (1.1), which holds the service's lock"), "{v}");
        let other = explain("staging", "web", None, &deps, &[], &Promoted::new(), &Rollbacks::new());
        assert!(other.verdict.contains("never been deployed to staging"), "{}", other.verdict);
    }
}
