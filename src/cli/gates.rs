//! `slipway approve`, `promote`, `revisions`, and `plan --from/--to`.

use super::client::Client;
use super::{CliError, exit, print_json};
use crate::api::wire::{ApprovalInfo, Deployment, EnvironmentInfo, EventAccepted, PromoteRequest, RevisionInfo};
use crate::config;
use crate::plan::{self, Selection};

pub(super) async fn approve(client: &Client, deployment: i64, json: bool) -> Result<u8, CliError> {
    let a: ApprovalInfo = client.post_empty(&format!("/api/v1/deployments/{deployment}/approve")).await?;
    if json {
        print_json(&a);
    } else {
        let d = &a.deployment;
        let what = what(d);
        match &a.waiting_for {
            Some(w) => println!("deployment {} ({what} in {}) approved by {}; still {w}", d.id, d.environment, a.approved_by.as_deref().unwrap_or("?")),
            None => println!("deployment {} ({what} in {}) approved by {}; it starts now", d.id, d.environment, a.approved_by.as_deref().unwrap_or("?")),
        }
    }
    Ok(exit::OK)
}

pub(super) async fn promote(client: &Client, service: &str, from: &str, to: &str, json: bool) -> Result<u8, CliError> {
    let r: EventAccepted = client.post(&format!("/api/v1/services/{to}/{service}/promote"), &PromoteRequest { from: from.to_string() }).await?;
    let d: crate::api::wire::Deployment =
        client.get(&format!("/api/v1/deployments/{}", r.deployment_id)).await.map(|x: crate::api::wire::DeploymentDetail| x.deployment)?;
    if json {
        print_json(&d);
    } else {
        println!(
            "deployment {}: {service} {} from {from} to {to}, {}{}",
            d.id,
            d.version.as_deref().unwrap_or("?"),
            d.state,
            d.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        );
    }
    Ok(exit::OK)
}

pub(super) async fn revisions(client: &Client, env: &str, check: bool, json: bool) -> Result<u8, CliError> {
    if check {
        let r: RevisionInfo = client.post_empty(&format!("/api/v1/environments/{env}/revisions/check")).await?;
        if json {
            print_json(&r);
        } else {
            print_revision(&r);
        }
        return Ok(if r.state == "accepted" { exit::OK } else { exit::INVALID_CONFIG });
    }
    let list: Vec<RevisionInfo> = client.get(&format!("/api/v1/environments/{env}/revisions")).await?;
    if json {
        print_json(&list);
        return Ok(exit::OK);
    }
    // A branch that cannot be fetched is the first thing to know.
    let envs: Vec<EnvironmentInfo> = client.get("/api/v1/environments").await.unwrap_or_default();
    if let Some(line) = envs.iter().find(|e| e.name == env).and_then(fetch_failure) {
        println!("{line}");
    }
    if list.is_empty() {
        println!("no commit of {env}'s config branch has been decided on yet");
    }
    for r in &list {
        print_revision(r);
    }
    Ok(exit::OK)
}

fn print_revision(r: &RevisionInfo) {
    let short = config::revision::short(&r.commit);
    match r.state.as_str() {
        "accepted" => {
            let ran = match (&r.deployment, r.jobs.is_empty()) {
                (_, true) if r.previous.is_none() => "the first commit seen: the baseline, nothing run".to_string(),
                (_, true) => format!("{} path(s) changed, no job's `files` match", r.changed.len()),
                (Some(d), false) => format!("deployment {d} runs {}", r.jobs.iter().map(|j| j.job.as_str()).collect::<Vec<_>>().join(", ")),
                (None, false) => "jobs not submitted".into(),
            };
            println!("{short} {} accepted: {ran}", r.branch);
            for j in &r.jobs {
                println!("    {:<24} {}", j.job, j.why);
            }
            for svc in &r.redeploy {
                println!("    {svc:<24} its definition changed: redeployed at the version it runs");
            }
        }
        _ => {
            println!(
                "{short} {} REJECTED; {} stays on its last good revision{}",
                r.branch,
                r.environment,
                r.previous.as_deref().map(|p| format!(" ({})", config::revision::short(p))).unwrap_or_default()
            );
            for line in r.errors.as_deref().unwrap_or("").lines() {
                println!("    {line}");
            }
        }
    }
}

pub(super) async fn print_gates(client: &Client) -> Result<(), CliError> {
    let waiting: Vec<ApprovalInfo> = client.get("/api/v1/approvals").await?;
    let envs: Vec<EnvironmentInfo> = client.get("/api/v1/environments").await.unwrap_or_default();
    for e in envs.iter().filter(|e| e.git.is_some()) {
        let at = e.revision.as_ref().map(|r| format!("at {}", config::revision::short(&r.commit))).unwrap_or_else(|| "no commit accepted yet".into());
        println!("config of {}: {} {at}", e.name, e.git.as_deref().unwrap_or(""));
        if let Some(line) = fetch_failure(e) {
            println!("  {line}");
        }
        if let Some(r) = &e.rejected {
            // The report's first problem, without its diagnostic code line.
            let first = r
                .errors
                .as_deref()
                .unwrap_or("")
                .lines()
                .find_map(|l| l.trim().strip_prefix("× ").or_else(|| (!l.trim().is_empty() && !l.contains("::")).then_some(l.trim())))
                .unwrap_or("");
            println!("  newer commit {} was REJECTED (slipway revisions {}): {first}", config::revision::short(&r.commit), e.name);
        }
    }
    if !envs.iter().any(|e| e.git.is_some()) && waiting.is_empty() {
        return Ok(());
    }
    if !waiting.is_empty() {
        println!("waiting at a gate:");
        for a in &waiting {
            let d = &a.deployment;
            println!(
                "  {:>5}  {} in {}{}: {}",
                d.id,
                what(d),
                d.environment,
                a.source_environment.as_deref().map(|s| format!(" (from {s})")).unwrap_or_default(),
                a.waiting_for.as_deref().unwrap_or("waiting")
            );
        }
    }
    println!();
    Ok(())
}

/// `plan --env E --from A --to B`: what a new commit of E's config branch
/// would run, decided as the server decides it.
pub(super) async fn plan_change(
    path: &std::path::Path,
    env: Option<String>,
    from: &str,
    to: &str,
    parallelism: Option<usize>,
    json: bool,
) -> Result<u8, CliError> {
    let loaded = config::load(path).map_err(CliError::config)?;
    let env = crate::submit::resolve_environment(&loaded.config, env).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let Some(git) = loaded.config.environment(&env).and_then(|e| e.git.clone()) else {
        return Err(CliError::new(
            exit::USAGE,
            format!("environment {env} does not take its config from git: --from/--to compare commits of its [environment.git] branch"),
        ));
    };
    let mirror = crate::git::Mirror::new(&loaded.dir.join(".slipway"), &git);
    let unavailable = |e: crate::git::GitError| match e {
        crate::git::GitError::Invalid(m) => CliError::new(exit::USAGE, m),
        e => CliError::new(exit::UNAVAILABLE, e.to_string()),
    };
    mirror.fetch().await.map_err(unavailable)?;
    let (a, b) = (mirror.resolve(from).await.map_err(unavailable)?, mirror.resolve(to).await.map_err(unavailable)?);
    let changed = mirror.changed(&a, &b).await.map_err(unavailable)?;
    let dir = loaded.dir.join(".slipway").join(format!("plan.{}", rand::random::<u32>()));
    let checked = mirror.checkout(&b, &dir).await;
    let text = checked.map_err(unavailable).and_then(|_| {
        std::fs::read_to_string(dir.join(config::CONFIG_FILE))
            .map_err(|e| CliError::new(exit::INVALID_CONFIG, format!("no {} at {}: {e}", config::CONFIG_FILE, config::revision::short(&b))))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let text = text?;
    let name = format!("{}@{}", config::CONFIG_FILE, config::revision::short(&b));
    let config = crate::submit::parse_for(&env, &loaded.config.environment_names(), &name, &text).map_err(|e| {
        CliError::new(
            exit::INVALID_CONFIG,
            format!("{} would be REJECTED: {env} would stay on its last good revision\n{}", config::revision::short(&b), e.render(false)),
        )
    })?;
    let touched = plan::changes::touched(&config, &env, &changed);
    let parallelism = parallelism.or(config.project.parallelism).unwrap_or(8);
    let p = (!touched.is_empty())
        .then(|| plan::build(&config, &env, &Selection::Exactly { jobs: touched.iter().map(|t| t.job.clone()).collect() }, parallelism, &Default::default()))
        .transpose()
        .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    if json {
        print_json(&serde_json::json!({ "environment": env, "from": a, "to": b, "changed": changed, "jobs": touched, "plan": p }));
        return Ok(exit::OK);
    }
    println!(
        "{} → {} on {} ({} path{} changed):",
        config::revision::short(&a),
        config::revision::short(&b),
        git.branch,
        changed.len(),
        if changed.len() == 1 { "" } else { "s" }
    );
    for c in changed.iter().take(20) {
        println!("    {c}");
    }
    if changed.len() > 20 {
        println!("    … and {} more", changed.len() - 20);
    }
    let skipped: Vec<&str> = config
        .jobs
        .iter()
        .filter(|j| j.environments.as_ref().is_none_or(|e| e.contains(&env)) && !touched.iter().any(|t| t.job == j.name) && j.service.is_none())
        .map(|j| j.name.as_str())
        .collect();
    if touched.is_empty() {
        println!("\nno job runs: no job's `files` match a changed path");
    } else {
        println!("\nruns:");
        for t in &touched {
            println!("  {:<24} {}", t.job, t.why);
        }
    }
    if !skipped.is_empty() {
        println!("does not run (unchanged): {}", skipped.join(", "));
    }
    if let Some(p) = p {
        println!();
        print!("{}", p.render_text());
    }
    Ok(exit::OK)
}

/// A deployment in a few words: "web 1.4.0", or "run" for named jobs.
fn what(d: &Deployment) -> String {
    match (&d.service, &d.version) {
        (Some(s), Some(v)) => format!("{s} {v}"),
        (Some(s), None) => s.clone(),
        _ => d.kind.as_str().to_string(),
    }
}

/// "the last fetch failed 12s ago: …" for an environment whose branch the
/// server could not fetch (and has not fetched since).
fn fetch_failure(e: &EnvironmentInfo) -> Option<String> {
    let (at, error) = (e.fetch_failed_at?, e.fetch_error.as_deref()?);
    let ago = std::time::Duration::from_secs(((crate::store::now_ms() - at).max(0) / 1000) as u64);
    Some(format!("the last fetch of its branch failed {} ago: {error}", humantime::format_duration(ago)))
}
