//! The ECS target's calls against moto's server (issue 16), through the
//! real binary: pinning in ECR, the registered task definition (the digest
//! in one container, everything else kept), the service pointed at it, the
//! migration's one-off task and its override, and the revert. moto keeps a
//! service's old deployment listed whatever UpdateService says, so a
//! rollout there never reaches COMPLETED: it runs to its deadline and is
//! reverted, which this test checks too. What moto cannot show (rollouts
//! that complete or fail, non-zero exits) is in tests/ecs_scripted.rs.
//!
//! moto comes from PyPI (`scripts/test.sh` installs it and sets
//! `SLIPWAY_MOTO` to its virtualenv's bin directory); without it the test
//! is skipped with a note, unless `SLIPWAY_REQUIRE_MOTO=1`.
#![cfg(feature = "aws")]

mod common;

use common::moto::Moto;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

fn fixture(m: &Moto, what: &str) -> Value {
    m.fixture("moto_ecs.py", what)
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn issue16_moto_pins_in_ecr_registers_the_pinned_revision_migrates_and_reverts() {
    let Some(m) = common::moto::start() else { return };
    let set = fixture(&m, "setup");
    let repo = set["repository"].as_str().unwrap().to_string();
    let digest = set["digests"]["1.4.0"].as_str().unwrap().to_string();
    let dir = common::config_dir(
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
migrate = {{ command = ["bin/migrate", "{{version}}"] }}
health = {{ deadline = "15s" }}
"#,
            url = m.url
        ),
        &[],
    );
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_CONFIG_FILE", "/dev/null")];
    let server = common::Server::start_with_env(dir.path(), Some(&common::sqlite_url(dir.path())), &[], &env);

    let out = server.cli(dir.path(), &["deploy", "api", "9.9.9"]);
    assert_eq!(out.status.code(), Some(6), "an unknown tag is refused at once: {}", text(&out));

    let deploy = server.cli_command(dir.path(), &["deploy", "api", "1.4.0"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("deploy");
    // While the rollout runs: the service points at the new revision.
    let during = common::wait_for_diag(
        Duration::from_secs(60),
        "the service to point at a new revision",
        || text(&server.cli(dir.path(), &["logs", "1"])),
        || {
            let v = fixture(&m, "show");
            v["service"]["taskDefinition"].as_str().is_some_and(|t| t.ends_with("api:2")).then_some(v)
        },
    );
    let out = deploy.wait_with_output().expect("deploy");
    assert!(!out.status.success(), "moto never completes a deployment: {}", text(&out));
    assert!(text(&out).contains("not COMPLETED within the health deadline"), "{}", text(&out));

    let tds = during["task_definitions"].as_array().unwrap();
    let new = tds.iter().find(|t| t["arn"].as_str().unwrap().ends_with("api:2")).expect("revision 2");
    let containers = new["definition"]["containerDefinitions"].as_array().unwrap();
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    assert_eq!(app["image"], format!("{repo}@{digest}"), "the digest ECR named for 1.4.0");
    assert_eq!(app["environment"][0]["value"], "web");
    let router = containers.iter().find(|c| c["name"] == "log-router").unwrap();
    assert_eq!(router["image"], "public.ecr.aws/aws-observability/aws-for-fluent-bit:2");
    assert_eq!((new["definition"]["cpu"].as_str(), new["definition"]["memory"].as_str()), (Some("256"), Some("512")));
    assert_eq!(new["definition"]["executionRoleArn"], "arn:aws:iam::123456789012:role/exec");
    let tags: Vec<(&str, &str)> = new["tags"].as_array().unwrap().iter().map(|t| (t["key"].as_str().unwrap(), t["value"].as_str().unwrap())).collect();
    assert!(tags.contains(&("team", "web")) && tags.iter().any(|(k, _)| *k == "slipway:deployment"), "{tags:?}");

    // The migration ran as a one-off task of revision 2, with its override.
    let tasks = during["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert!(tasks[0]["taskDefinitionArn"].as_str().unwrap().ends_with("api:2"));
    assert_eq!(tasks[0]["overrides"]["containerOverrides"][0]["command"], serde_json::json!(["bin/migrate", "1.4.0"]));
    assert!(tasks[0]["startedBy"].as_str().unwrap().starts_with("sw-"));

    // And the revert: the service is back on revision 1.
    let after = fixture(&m, "show");
    assert!(after["service"]["taskDefinition"].as_str().unwrap().ends_with("api:1"), "{}", after["service"]);
}
