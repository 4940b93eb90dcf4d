//! The ECS target's decisions (issue 16), through the real binary, against
//! a **scripted** AWS API server (tests/common/scripted_aws.rs): rollouts
//! that complete, fail, are rolled back by ECS itself or never finish;
//! migrations that exit non-zero or outlive a killed node. These prove what
//! Slipway decides from what ECS says, not what ECS does; the calls'
//! content is also checked against moto's server in tests/ecs_moto.rs.
#![cfg(feature = "aws")]

mod common;
#[path = "common/scripted_aws.rs"]
mod scripted_aws;

use std::time::Duration;

use scripted_aws::{Rollout, ScriptedAws, digest_of};
use serde_json::Value;

fn config(aws: &ScriptedAws, deadline: &str) -> tempfile::TempDir {
    config_with(aws, deadline, "")
}

fn config_with(aws: &ScriptedAws, deadline: &str, extra: &str) -> tempfile::TempDir {
    common::config_dir(
        &format!(
            r#"
[aws]
region = "eu-west-1"
endpoint = "{url}"

[[service]]
name = "api"
target = "ecs"
cluster = "prod"
container = "app"
image = "{repo}"
migrate = {{ command = ["bin/migrate", "--to", "{{version}}"] }}
health = {{ deadline = "{deadline}" }}
{extra}
"#,
            url = aws.url,
            repo = aws.repository()
        ),
        &[],
    )
}

const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIDSCRIPTED"),
    ("AWS_SECRET_ACCESS_KEY", "scripted-secret"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

fn serve(dir: &tempfile::TempDir, extra: &[&str]) -> common::Server {
    let store = common::sqlite_url(dir.path());
    common::Server::start_with_env(dir.path(), Some(&store), extra, AWS_ENV)
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn deploy(server: &common::Server, dir: &tempfile::TempDir, version: &str) -> std::process::Output {
    server.cli(dir.path(), &["deploy", "api", version])
}

/// `deploy api VERSION` in the background, once its migration's task has
/// started (the test then stops the node under it).
fn deploying_until_the_task_runs(server: &common::Server, dir: &tempfile::TempDir, aws: &ScriptedAws, version: &str) -> std::process::Child {
    let child = server
        .cli_command(dir.path(), &["deploy", "api", version])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("deploy");
    common::wait_for(Duration::from_secs(60), "the migration's task to start", || (!aws.calls_of("RunTask").is_empty()).then_some(()));
    child
}

/// A node killed while deployment 1's migration task runs; the task runs
/// on until the test lets it stop.
fn killed_while_the_migration_runs(aws: &ScriptedAws) -> tempfile::TempDir {
    aws.with(|s| s.task_polls = u32::MAX);
    let dir = config(aws, "60s");
    let mut server = serve(&dir, &["--lease", "3s"]);
    let mut deploy = deploying_until_the_task_runs(&server, &dir, aws, "1.1");
    server.kill9();
    let _ = deploy.kill();
    let _ = deploy.wait();
    dir
}

/// The newest deployment's state once it has finished, with the status.
fn finished(server: &common::Server, dir: &tempfile::TempDir) -> (String, Value) {
    common::wait_for(Duration::from_secs(120), "the deployment to finish", || {
        let v: Value = serde_json::from_slice(&server.cli(dir.path(), &["status", "--json"]).stdout).ok()?;
        let state = v["deployments"][0]["state"].as_str()?.to_string();
        (state != "running" && state != "pending" && state != "queued").then_some((state, v))
    })
}

fn image(aws: &ScriptedAws, tag: &str) -> String {
    format!("{}@sha256:{}", aws.repository(), digest_of(tag))
}

fn container<'a>(td: &'a Value, name: &str) -> &'a Value {
    td["containerDefinitions"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name)).unwrap_or(&Value::Null)
}

#[test]
fn issue16_scripted_a_completed_rollout_pins_the_digest_keeps_the_rest_and_migrates_first() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.next_rollout = Some(Rollout::Completes { polls: 2 }));
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(out.status.success(), "{}", text(&out));

    // The new revision: only the app container's image changed, to the digest.
    let registered = aws.calls_of("RegisterTaskDefinition");
    assert_eq!(registered.len(), 1, "one new revision: {registered:?}");
    let td = &registered[0];
    assert_eq!(container(td, "app")["image"], image(&aws, "1.1"));
    assert_eq!(container(td, "app")["environment"][0]["value"], "web", "the container's other settings are kept");
    assert_eq!(container(td, "app")["portMappings"][0]["containerPort"], 8080);
    assert_eq!(container(td, "log-router")["image"], "public.ecr.aws/aws-observability/aws-for-fluent-bit:2");
    assert_eq!((td["family"].as_str(), td["cpu"].as_str(), td["memory"].as_str()), (Some("api"), Some("256"), Some("512")));
    assert!(td["executionRoleArn"].as_str().is_some_and(|r| r.ends_with("role/exec")), "{td}");
    let tags: Vec<(String, String)> =
        td["tags"].as_array().unwrap().iter().map(|t| (t["key"].as_str().unwrap().to_string(), t["value"].as_str().unwrap().to_string())).collect();
    assert!(tags.contains(&("team".into(), "web".into())), "the definition's own tags are kept: {tags:?}");
    assert!(tags.iter().any(|(k, v)| k == "slipway:deployment" && v.parse::<i64>().is_ok()), "{tags:?}");
    assert!(tags.contains(&("slipway:image".into(), image(&aws, "1.1"))), "{tags:?}");

    // The migration: a one-off task of that revision, before the service moved.
    let ops = aws.ops();
    let run = ops.iter().position(|o| o == "RunTask").expect("a one-off task");
    let update = ops.iter().position(|o| o == "UpdateService").expect("the service updated");
    assert!(run < update, "the migration runs before the rollout: {ops:?}");
    let task = &aws.calls_of("RunTask")[0];
    let new_arn = "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:2";
    assert_eq!(task["taskDefinition"], new_arn);
    assert_eq!(task["overrides"]["containerOverrides"][0]["name"], "app");
    assert_eq!(task["overrides"]["containerOverrides"][0]["command"], serde_json::json!(["bin/migrate", "--to", "1.1"]));
    assert_eq!(task["networkConfiguration"]["awsvpcConfiguration"]["subnets"][0], "subnet-1", "where the service's tasks run");
    assert_eq!(task["launchType"], "FARGATE");

    // The service: pointed at it, circuit breaker on, its other settings kept.
    let updates = aws.calls_of("UpdateService");
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(updates[0]["taskDefinition"], new_arn);
    assert_eq!(updates[0]["deploymentConfiguration"]["deploymentCircuitBreaker"], serde_json::json!({"enable": true, "rollback": true}));
    assert_eq!(updates[0]["deploymentConfiguration"]["maximumPercent"], 200);
    assert_eq!(aws.service_task_definition(), new_arn);

    // Status and why name it too.
    let status = text(&server.cli(dir.path(), &["status"]));
    assert!(status.contains(&format!("runs {new_arn}")), "{status}");
    let status: Value = serde_json::from_slice(&server.cli(dir.path(), &["status", "--json"]).stdout).expect("status --json");
    assert_eq!(status["services"][0]["runs"], new_arn, "{status}");
    let why = text(&server.cli(dir.path(), &["why", "api"]));
    assert!(why.contains(new_arn), "{why}");
    // The record names the task definition.
    let logs = server.cli(dir.path(), &["logs", "1"]);
    assert!(text(&logs).contains(new_arn), "{}", text(&logs));
    assert!(text(&logs).contains("COMPLETED"), "{}", text(&logs));
}

#[test]
fn issue16_scripted_an_unknown_tag_is_refused_when_the_deploy_is_asked_for() {
    let aws = ScriptedAws::start();
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "9.9");
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(text(&out).contains("9.9"), "{}", text(&out));
    let ops = aws.ops();
    assert!(!ops.iter().any(|o| o == "RegisterTaskDefinition" || o == "UpdateService" || o == "RunTask"), "{ops:?}");
}

#[test]
fn issue16_scripted_a_circuit_breaker_failure_is_reverted_with_ecs_reason() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.next_rollout = Some(Rollout::Fails { polls: 1 }));
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("circuit breaker"), "ECS's own reason: {t}");
    let updates = aws.calls_of("UpdateService");
    assert_eq!(updates.len(), 2, "the rollout, then the revert: {updates:?}");
    assert_eq!(updates[1]["taskDefinition"], "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:1");
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:1");
    let status: Value = serde_json::from_slice(&server.cli(dir.path(), &["status", "--json"]).stdout).expect("status --json");
    assert_eq!(status["deployments"][0]["state"], "rolled_back", "{status}");
    assert!(status["services"].as_array().unwrap().iter().all(|s| s["version"] != "1.1"), "1.1 is not recorded as running: {status}");
}

#[test]
fn issue16_scripted_ecs_rolling_back_by_itself_is_never_reported_as_success() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.next_rollout = Some(Rollout::RollsBackItself { polls: 1 }));
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("by itself"), "{t}");
    assert!(t.contains("rolling back to the previous deployment"), "ECS's events are in the reason: {t}");
    // ECS is back already: no second update.
    assert_eq!(aws.calls_of("UpdateService").len(), 1);
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:1");
}

#[test]
fn issue16_scripted_a_rollout_past_its_deadline_is_reverted() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.next_rollout = Some(Rollout::Hangs));
    let dir = config(&aws, "5s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not COMPLETED within the health deadline"), "{}", text(&out));
    assert_eq!(aws.calls_of("UpdateService").len(), 2);
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:1");
}

#[test]
fn issue16_scripted_a_migration_exiting_3_fails_the_deploy_and_leaves_the_service_alone() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.task_exit = 3);
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("exit code 3"), "{}", text(&out));
    assert_eq!(aws.calls_of("RunTask").len(), 1);
    assert!(aws.calls_of("UpdateService").is_empty(), "the service is untouched: {:?}", aws.ops());
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:1");
}

#[test]
fn issue16_scripted_rollback_returns_to_the_task_definition_that_ran_before() {
    let aws = ScriptedAws::start();
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    for v in ["1.1", "1.2"] {
        let out = deploy(&server, &dir, v);
        assert!(out.status.success(), "{v}: {}", text(&out));
    }
    let before = aws.calls_of("RegisterTaskDefinition").len();
    let out = server.cli(dir.path(), &["rollback", "api"]);
    assert!(out.status.success(), "{}", text(&out));
    // 1.1's own revision again, not a new one.
    assert_eq!(aws.calls_of("RegisterTaskDefinition").len(), before, "{:?}", aws.ops());
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:2");
    assert_eq!(container(&aws.task_definition("arn:aws:ecs:eu-west-1:123456789012:task-definition/api:2"), "app")["image"], image(&aws, "1.1"));
}

#[test]
fn issue16_scripted_a_migration_outlives_a_killed_node_and_runs_once() {
    let aws = ScriptedAws::start();
    let dir = killed_while_the_migration_runs(&aws);
    // It runs on while no node watches it: the next node follows it.
    aws.tasks_stop_after(3);
    let server = serve(&dir, &["--lease", "3s"]);
    let out = finished(&server, &dir);
    assert_eq!(out.0, "succeeded", "{}", out.1);
    assert_eq!(aws.calls_of("RunTask").len(), 1, "the migration ran once: {:?}", aws.ops());
    let logs = text(&server.cli(dir.path(), &["logs", "1"]));
    assert!(logs.contains("still runs: following it"), "the next attempt followed the running task: {logs}");
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:2");
}

#[test]
fn issue16_scripted_bootstrap_runs_once_per_environment_before_the_first_migration() {
    let aws = ScriptedAws::start();
    let dir = config_with(&aws, "60s", r#"bootstrap = { command = ["bin/setup", "{env}"] }"#);
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(out.status.success(), "{}", text(&out));
    let commands =
        |aws: &ScriptedAws| -> Vec<Value> { aws.calls_of("RunTask").iter().map(|t| t["overrides"]["containerOverrides"][0]["command"].clone()).collect() };
    assert_eq!(
        commands(&aws),
        vec![serde_json::json!(["bin/setup", "default"]), serde_json::json!(["bin/migrate", "--to", "1.1"])],
        "bootstrap, then the migration"
    );

    let out = deploy(&server, &dir, "1.2");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(commands(&aws).len(), 3, "the second deploy migrates only: {:?}", commands(&aws));
    assert_eq!(commands(&aws)[2], serde_json::json!(["bin/migrate", "--to", "1.2"]));
    let logs = text(&server.cli(dir.path(), &["logs", "2"]));
    assert!(logs.contains("api.bootstrap already ran in default (deployment 1)"), "{logs}");
}

#[test]
fn issue16_scripted_a_node_killed_mid_rollout_is_followed_by_one_that_brings_back_the_recorded_version() {
    let aws = ScriptedAws::start();
    let dir = config(&aws, "60s");
    let mut server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(out.status.success(), "{}", text(&out));
    // 1.2's rollout never completes; the node dies while it watches.
    aws.with(|s| s.next_rollout = Some(Rollout::Hangs));
    let mut deploying = server
        .cli_command(dir.path(), &["deploy", "api", "1.2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("deploy");
    common::wait_for(Duration::from_secs(60), "the service to move to 1.2's revision", || aws.service_task_definition().ends_with("api:3").then_some(()));
    server.kill9();
    let _ = deploying.kill();
    let _ = deploying.wait();
    // The next node finds 1.1 recorded and puts the service back on its
    // own revision (the next rollout there completes).
    let server = serve(&dir, &[]);
    common::wait_for(Duration::from_secs(60), "the service back on 1.1's revision", || aws.service_task_definition().ends_with("api:2").then_some(()));
    assert_eq!(aws.calls_of("RegisterTaskDefinition").len(), 2, "1.1's revision is reused, not registered again: {:?}", aws.ops());
    let status: Value = serde_json::from_slice(&server.cli(dir.path(), &["status", "--json"]).stdout).expect("status --json");
    assert_eq!(status["services"][0]["version"], "1.1", "{status}");
    // The cut-off deployment says so.
    let cut = status["deployments"].as_array().unwrap().iter().find(|d| d["id"] == 2).cloned().unwrap_or_default();
    assert!(cut["state"] != "succeeded" && cut["reason"].as_str().is_some_and(|r| r.contains("interrupted")), "{cut}");
}

#[test]
fn issue16_scripted_a_read_lagging_behind_the_update_is_not_taken_for_ecs_going_back() {
    let aws = ScriptedAws::start();
    // The next three DescribeServices still show the service before it.
    aws.with(|s| {
        s.lag_reads = 3;
        s.next_rollout = Some(Rollout::Completes { polls: 1 });
    });
    let dir = config(&aws, "60s");
    let server = serve(&dir, &[]);
    let out = deploy(&server, &dir, "1.1");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(aws.calls_of("UpdateService").len(), 1, "no revert: {:?}", aws.ops());
}

#[test]
fn issue16_scripted_a_node_stopping_leaves_a_migration_running_for_the_next_to_follow() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.task_polls = u32::MAX);
    let dir = config(&aws, "60s");
    let mut server = serve(&dir, &["--shutdown-grace", "1s"]);
    let mut deploying = deploying_until_the_task_runs(&server, &dir, &aws, "1.1");
    // A graceful stop: SIGTERM, the grace passes, the job is handed over.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = common::wait_for(Duration::from_secs(30), "the node to stop", || server.child.try_wait().ok().flatten());
    assert!(status.success() || status.code().is_some(), "{status:?}");
    let _ = deploying.kill();
    let _ = deploying.wait();
    assert!(aws.calls_of("StopTask").is_empty(), "the task is left running: {:?}", aws.ops());
    aws.tasks_stop_after(3);
    let server = serve(&dir, &["--shutdown-grace", "1s"]);
    let (state, _) = finished(&server, &dir);
    assert_eq!(state, "succeeded");
    assert_eq!(aws.calls_of("RunTask").len(), 1, "the migration ran once: {:?}", aws.ops());
}

#[test]
fn issue16_scripted_a_migration_that_failed_while_no_node_watched_is_not_run_again() {
    let aws = ScriptedAws::start();
    let dir = killed_while_the_migration_runs(&aws);
    // It exits 3 before any node looks again.
    aws.with(|s| s.task_exit = 3);
    aws.tasks_stop_after(0);
    let server = serve(&dir, &["--lease", "3s"]);
    let (state, status) = finished(&server, &dir);
    assert_eq!(state, "failed", "{status}");
    assert_eq!(aws.calls_of("RunTask").len(), 1, "the failed migration is not run a second time: {:?}", aws.ops());
    assert!(aws.calls_of("UpdateService").is_empty(), "the service is untouched");
    let logs = text(&server.cli(dir.path(), &["logs", "1"]));
    assert!(logs.contains("ended while no node watched it: its result stands") && logs.contains("exit code 3"), "{logs}");
}

#[test]
fn issue16_scripted_a_cancelled_rollout_is_reverted() {
    let aws = ScriptedAws::start();
    aws.with(|s| s.next_rollout = Some(Rollout::Hangs));
    let dir = config(&aws, "10m");
    let server = serve(&dir, &[]);
    let mut deploying = server
        .cli_command(dir.path(), &["deploy", "api", "1.1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("deploy");
    common::wait_for(Duration::from_secs(60), "the service to move to 1.1's revision", || aws.service_task_definition().ends_with("api:2").then_some(()));
    let out = server.cli(dir.path(), &["cancel", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let _ = deploying.wait();
    let (state, status) = finished(&server, &dir);
    assert_ne!(state, "succeeded", "{status}");
    assert_eq!(aws.calls_of("UpdateService").len(), 2, "the rollout, then the revert: {:?}", aws.ops());
    assert_eq!(aws.service_task_definition(), "arn:aws:ecs:eu-west-1:123456789012:task-definition/api:1");
}
