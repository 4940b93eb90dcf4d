//! A **scripted** AWS API server: the few ECS and ECR calls Slipway makes,
//! answered over HTTP (JSON 1.1, as AWS speaks them) from a small in-memory
//! model whose rollouts and one-off tasks end the way a test scripts them.
//! It exists for what moto's server cannot show (a deployment progressing,
//! failing, or rolled back by ECS's circuit breaker; a task exiting
//! non-zero; ECR's pagination, which moto ignores). Tests against it prove
//! Slipway's decisions, not AWS's behaviour; moto (tests/ecs_moto.rs,
//! tests/ecs_retention.rs) checks the calls' content against a real
//! implementation of the API.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "eu-west-1";

/// How the next rollout of the service goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// IN_PROGRESS for `polls` DescribeServices, then COMPLETED.
    Completes { polls: u32 },
    /// IN_PROGRESS for `polls`, then FAILED by the circuit breaker (the
    /// deployment stays listed, FAILED; the service keeps pointing at it).
    Fails { polls: u32 },
    /// IN_PROGRESS for `polls`, then ECS's circuit breaker rolls back by
    /// itself: the service points at the old task definition again, whose
    /// deployment is PRIMARY and COMPLETED, and ours is gone.
    RollsBackItself { polls: u32 },
    /// IN_PROGRESS forever.
    Hangs,
}

#[derive(Debug, Clone)]
struct Deployment {
    id: String,
    task_definition: String,
    status: &'static str,
    state: &'static str,
    reason: String,
    polls: u32,
    script: Option<Rollout>,
}

#[derive(Debug, Default)]
pub struct State {
    /// Every call: (operation, request body).
    pub calls: Vec<(String, Value)>,
    pub task_definitions: Vec<(String, Value, Vec<Value>)>,
    service_td: String,
    deployments: Vec<Deployment>,
    events: Vec<String>,
    pub next_rollout: Option<Rollout>,
    /// Exit code of the next one-off task, and DescribeTasks before it stops.
    pub task_exit: i32,
    pub task_polls: u32,
    tasks: BTreeMap<String, (Value, u32)>,
    /// DescribeServices calls after the next UpdateService that still
    /// answer the state before it (eventual consistency).
    pub lag_reads: u32,
    stale: Option<(String, Vec<Deployment>, u32)>,
    /// ECR: repository → (tag, digest hex).
    pub images: BTreeMap<String, Vec<(String, String)>>,
    /// ECR: digest hex → when it was pushed (epoch seconds), for images
    /// pushed by [`ScriptedAws::push_images`]; the others by their place.
    pub pushed_at: BTreeMap<String, i64>,
}

pub struct ScriptedAws {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _thread: std::thread::JoinHandle<()>,
}

pub fn digest_of(tag: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("image {tag}").as_bytes()))
}

impl ScriptedAws {
    /// A cluster `prod` with service `api` on task definition `api:1`
    /// (containers `app`, running `image:1.0`, and `log-router`), and
    /// ECR repository `api` with tags 1.0, 1.1 and 1.2.
    pub fn start() -> ScriptedAws {
        let repo = format!("{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/api");
        let mut state = State { task_exit: 0, task_polls: 2, ..State::default() };
        let td = json!({
            "family": "api",
            "networkMode": "awsvpc",
            "requiresCompatibilities": ["FARGATE"],
            "cpu": "256",
            "memory": "512",
            "executionRoleArn": format!("arn:aws:iam::{ACCOUNT}:role/exec"),
            "containerDefinitions": [
                {"name": "app", "image": format!("{repo}:1.0"), "essential": true, "environment": [{"name": "MODE", "value": "web"}], "portMappings": [{"containerPort": 8080}]},
                {"name": "log-router", "image": "public.ecr.aws/aws-observability/aws-for-fluent-bit:2", "essential": false}
            ]
        });
        let arn = format!("arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/api:1");
        let mut first = td.clone();
        first["taskDefinitionArn"] = json!(arn);
        first["revision"] = json!(1);
        state.task_definitions.push((arn.clone(), first, vec![json!({"key": "team", "value": "web"})]));
        state.service_td = arn.clone();
        state.deployments.push(Deployment {
            id: "ecs-svc/1".into(),
            task_definition: arn,
            status: "PRIMARY",
            state: "COMPLETED",
            reason: String::new(),
            polls: 0,
            script: None,
        });
        state.images.insert("api".into(), ["1.0", "1.1", "1.2"].iter().map(|t| (t.to_string(), digest_of(t))).collect());
        let state = Arc::new(Mutex::new(state));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: String| {
                    let st = st.clone();
                    async move {
                        let op = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").rsplit('.').next().unwrap_or("").to_string();
                        let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let (status, body) = handle(&mut st.lock().unwrap(), &op, req);
                        (axum::http::StatusCode::from_u16(status).unwrap(), [("content-type", "application/x-amz-json-1.1")], body.to_string())
                    }
                });
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ScriptedAws { url, state, _stop: stop, _thread: thread }
    }

    /// Push `tags` to ECR repository `repo` (created if new), one image
    /// each, after the images it has: each newer than the one before.
    pub fn push_images(&self, repo: &str, tags: impl IntoIterator<Item = String>) {
        self.with(|s| {
            for t in tags {
                let d = digest_of(&t);
                let at = FIRST_PUSH + s.pushed_at.len() as i64 + 1_000;
                s.pushed_at.entry(d.clone()).or_insert(at);
                s.images.entry(repo.to_string()).or_default().push((t, d));
            }
        })
    }

    /// The tags ECR repository `repo` holds now, with their digests' hex.
    pub fn images_of(&self, repo: &str) -> Vec<(String, String)> {
        self.with(|s| s.images.get(repo).cloned().unwrap_or_default())
    }

    pub fn repository(&self) -> String {
        format!("{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/api")
    }

    /// Every one-off task still running stops (exit code `task_exit`)
    /// after `n` more DescribeTasks of it.
    pub fn tasks_stop_after(&self, n: u32) {
        self.with(|s| {
            s.task_polls = n;
            for (_, seen) in s.tasks.values_mut() {
                *seen = 0;
            }
        })
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// The operations called, in order.
    pub fn ops(&self) -> Vec<String> {
        self.with(|s| s.calls.iter().map(|(op, _)| op.clone()).collect())
    }

    pub fn calls_of(&self, op: &str) -> Vec<Value> {
        self.with(|s| s.calls.iter().filter(|(o, _)| o == op).map(|(_, b)| b.clone()).collect())
    }

    /// The service's task definition now.
    pub fn service_task_definition(&self) -> String {
        self.with(|s| s.service_td.clone())
    }

    pub fn task_definition(&self, arn: &str) -> Value {
        self.with(|s| s.task_definitions.iter().find(|(a, _, _)| a == arn).map(|(_, td, _)| td.clone()).unwrap_or(Value::Null))
    }
}

fn service_json(td: &str, deployments: Vec<Value>, events: Vec<Value>) -> Value {
    json!({"services": [{
        "serviceName": "api", "status": "ACTIVE", "taskDefinition": td, "desiredCount": 2,
        "launchType": "FARGATE", "platformVersion": "LATEST",
        "deploymentConfiguration": {"maximumPercent": 200, "minimumHealthyPercent": 100},
        "networkConfiguration": {"awsvpcConfiguration": {"subnets": ["subnet-1"], "securityGroups": ["sg-1"], "assignPublicIp": "DISABLED"}},
        "deployments": deployments, "events": events
    }], "failures": []})
}

fn error(kind: &str, message: &str) -> (u16, Value) {
    (400, json!({"__type": kind, "message": message}))
}

fn deployment_json(d: &Deployment) -> Value {
    let running = if d.state == "COMPLETED" { 2 } else { 1 };
    json!({
        "id": d.id, "status": d.status, "taskDefinition": d.task_definition,
        "desiredCount": 2, "runningCount": running, "pendingCount": 2 - running, "failedTasks": if d.state == "FAILED" { 3 } else { 0 },
        "rolloutState": d.state, "rolloutStateReason": d.reason, "launchType": "FARGATE"
    })
}

fn handle(s: &mut State, op: &str, req: Value) -> (u16, Value) {
    s.calls.push((op.to_string(), req.clone()));
    match op {
        "DescribeImages" => {
            let repo = req["repositoryName"].as_str().unwrap_or("");
            let Some(images) = s.images.get(repo) else {
                return error("RepositoryNotFoundException", &format!("The repository with name '{repo}' does not exist"));
            };
            if req.get("imageIds").is_none() {
                return list_images(repo, images, &s.pushed_at, &req);
            }
            let tag = req["imageIds"][0]["imageTag"].as_str().unwrap_or("");
            match images.iter().find(|(t, _)| t == tag) {
                Some((t, d)) => (200, json!({"imageDetails": [{"repositoryName": repo, "imageDigest": format!("sha256:{d}"), "imageTags": [t]}]})),
                None => error(
                    "ImageNotFoundException",
                    &format!("The image with imageId {{imageTag:'{tag}'}} does not exist within the repository with name '{repo}'"),
                ),
            }
        }
        "BatchDeleteImage" => {
            let repo = req["repositoryName"].as_str().unwrap_or("").to_string();
            let ids = req["imageIds"].as_array().cloned().unwrap_or_default();
            if ids.is_empty() || ids.len() > 100 {
                return error("InvalidParameterException", &format!("imageIds: {} ids; between 1 and 100 are allowed", ids.len()));
            }
            let Some(images) = s.images.get_mut(&repo) else {
                return error("RepositoryNotFoundException", &format!("The repository with name '{repo}' does not exist"));
            };
            let (mut deleted, mut failures) = (Vec::new(), Vec::new());
            for id in ids {
                let digest = id["imageDigest"].as_str().unwrap_or("").to_string();
                let hex = digest.trim_start_matches("sha256:");
                let tags: Vec<String> = images.iter().filter(|(_, d)| d == hex).map(|(t, _)| t.clone()).collect();
                if tags.is_empty() {
                    failures.push(json!({"imageId": {"imageDigest": digest}, "failureCode": "ImageNotFound", "failureReason": "Requested image not found"}));
                    continue;
                }
                images.retain(|(_, d)| d != hex);
                deleted.extend(tags.into_iter().map(|t| json!({"imageDigest": digest, "imageTag": t})));
            }
            (200, json!({"imageIds": deleted, "failures": failures}))
        }
        "DescribeServices" => {
            if req["services"][0].as_str() != Some("api") || req["cluster"].as_str() != Some("prod") {
                return (200, json!({"services": [], "failures": [{"arn": req["services"][0], "reason": "MISSING"}]}));
            }
            // An eventually consistent read: the state before the update.
            if let Some((td, deployments, left)) = &mut s.stale
                && *left > 0
            {
                *left -= 1;
                let (td, deployments) = (td.clone(), deployments.clone());
                return (200, service_json(&td, deployments.iter().map(deployment_json).collect(), vec![]));
            }
            advance(s);
            let deployments: Vec<Value> = s.deployments.iter().map(deployment_json).collect();
            let events: Vec<Value> = s.events.iter().rev().map(|m| json!({"id": "e", "message": m})).collect();
            (200, service_json(&s.service_td, deployments, events))
        }
        "DescribeTaskDefinition" => {
            let want = req["taskDefinition"].as_str().unwrap_or("");
            match s.task_definitions.iter().find(|(a, _, _)| a == want || a.ends_with(&format!("/{want}"))) {
                Some((_, td, tags)) => (200, json!({"taskDefinition": td, "tags": tags})),
                None => error("ClientException", "Unable to describe task definition."),
            }
        }
        "ListTaskDefinitions" => {
            let arns: Vec<&String> = s.task_definitions.iter().map(|(a, _, _)| a).rev().collect();
            (200, json!({"taskDefinitionArns": arns}))
        }
        "RegisterTaskDefinition" => {
            let family = req["family"].as_str().unwrap_or("").to_string();
            let revision = s.task_definitions.len() + 1;
            let arn = format!("arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/{family}:{revision}");
            let mut td = req.clone();
            let tags = td.as_object_mut().and_then(|o| o.remove("tags")).and_then(|t| t.as_array().cloned()).unwrap_or_default();
            td["taskDefinitionArn"] = json!(arn);
            td["revision"] = json!(revision);
            s.task_definitions.push((arn, td.clone(), tags.clone()));
            (200, json!({"taskDefinition": td, "tags": tags}))
        }
        "UpdateService" => {
            let td = req["taskDefinition"].as_str().unwrap_or("").to_string();
            let Some(arn) = s.task_definitions.iter().map(|(a, _, _)| a.clone()).find(|a| *a == td || a.ends_with(&format!("/{td}"))) else {
                return error("ClientException", "TaskDefinition not found.");
            };
            for d in &mut s.deployments {
                if d.status == "PRIMARY" {
                    d.status = "ACTIVE";
                }
            }
            let script = s.next_rollout.take().unwrap_or(Rollout::Completes { polls: 1 });
            let id = format!("ecs-svc/{}", s.deployments.len() + 1);
            s.events.push(format!("(service api) has started 2 tasks: {id}."));
            s.deployments.insert(
                0,
                Deployment { id, task_definition: arn.clone(), status: "PRIMARY", state: "IN_PROGRESS", reason: String::new(), polls: 0, script: Some(script) },
            );
            if s.lag_reads > 0 {
                let before: Vec<Deployment> = s
                    .deployments
                    .iter()
                    .skip(1)
                    .cloned()
                    .map(|mut d| {
                        if d.status == "ACTIVE" {
                            d.status = "PRIMARY";
                        }
                        d
                    })
                    .collect();
                s.stale = Some((s.service_td.clone(), before, s.lag_reads));
            }
            s.service_td = arn;
            // As ECS answers: the service with its new PRIMARY deployment.
            let deployments: Vec<Value> = s.deployments.iter().map(deployment_json).collect();
            (200, json!({"service": {"serviceName": "api", "taskDefinition": s.service_td, "deployments": deployments}}))
        }
        "RunTask" => {
            // ECS's documented limit on startedBy.
            if let Some(by) = req["startedBy"].as_str()
                && (by.len() > 36 || !by.chars().all(|c| c.is_ascii_alphanumeric() || "-/_".contains(c)))
            {
                return error("InvalidParameterException", "startedBy: at most 36 letters, numbers, hyphens, forward slashes and underscores");
            }
            let n = s.tasks.len() + 1;
            let arn = format!("arn:aws:ecs:{REGION}:{ACCOUNT}:task/prod/task{n}");
            let container = req["overrides"]["containerOverrides"][0]["name"].as_str().unwrap_or("app").to_string();
            let task = json!({
                "taskArn": arn, "lastStatus": "PROVISIONING", "startedBy": req["startedBy"], "tags": req["tags"],
                "taskDefinitionArn": req["taskDefinition"], "overrides": req["overrides"],
                "containers": [{"name": container}]
            });
            s.tasks.insert(arn, (task.clone(), 0));
            (200, json!({"tasks": [task], "failures": []}))
        }
        "ListTasks" => {
            let by = req["startedBy"].as_str();
            // As ECS documents it: startedBy is the only filter when given.
            if by.is_some() && (req.get("desiredStatus").is_some() || req.get("family").is_some() || req.get("serviceName").is_some()) {
                return error("InvalidParameterException", "startedBy must be the only filter when it is given");
            }
            // Without desiredStatus: the running ones.
            let want_stopped = req["desiredStatus"].as_str() == Some("STOPPED");
            let family = req["family"].as_str();
            let arns: Vec<&String> = s
                .tasks
                .iter()
                .filter(|(_, (t, _))| by.is_none() || t["startedBy"].as_str() == by)
                .filter(|(_, (t, _))| family.is_none_or(|f| t["taskDefinitionArn"].as_str().is_some_and(|d| d.contains(&format!("/{f}:")))))
                .filter(|(_, (t, _))| (t["lastStatus"] == "STOPPED") == want_stopped)
                .map(|(a, _)| a)
                .collect();
            (200, json!({"taskArns": arns}))
        }
        "DescribeTasks" => {
            let (exit, polls) = (s.task_exit, s.task_polls);
            let mut out = Vec::new();
            for a in req["tasks"].as_array().cloned().unwrap_or_default() {
                if let Some((t, seen)) = s.tasks.get_mut(a.as_str().unwrap_or("")) {
                    *seen += 1;
                    if t["lastStatus"] != "STOPPED" {
                        if *seen >= polls {
                            t["lastStatus"] = json!("STOPPED");
                            t["stoppedReason"] = json!("Essential container in task exited");
                            t["containers"][0]["exitCode"] = json!(exit);
                        } else {
                            t["lastStatus"] = json!("RUNNING");
                        }
                    }
                    out.push(t.clone());
                }
            }
            (200, json!({"tasks": out, "failures": []}))
        }
        "StopTask" => {
            let a = req["task"].as_str().unwrap_or("");
            if let Some((t, _)) = s.tasks.get_mut(a) {
                t["lastStatus"] = json!("STOPPED");
                t["stoppedReason"] = req["reason"].clone();
            }
            (200, json!({"task": {"taskArn": a}}))
        }
        other => error("UnknownOperationException", &format!("the scripted server does not answer {other}")),
    }
}

/// When the scripted repository's first image was pushed (epoch seconds);
/// each later one a second after the one before (those of
/// [`ScriptedAws::push_images`] from 1,000 s later on, and for good).
pub const FIRST_PUSH: i64 = 1_700_000_000;

/// DescribeImages without `imageIds`: the repository's images (tags
/// sharing a digest are one image), pushed in their order in the model,
/// `maxResults` a page (100 unless asked, at most 1,000, as ECR), the
/// next page's offset as `nextToken`.
fn list_images(repo: &str, images: &[(String, String)], pushed_at: &BTreeMap<String, i64>, req: &Value) -> (u16, Value) {
    let max = req["maxResults"].as_i64().unwrap_or(100);
    if !(1..=1000).contains(&max) {
        return error("InvalidParameterException", &format!("maxResults {max}: between 1 and 1000"));
    }
    let start = match req["nextToken"].as_str() {
        None => 0,
        Some(t) => match t.strip_prefix("scripted-").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return error("InvalidParameterException", "Invalid parameter at 'nextToken'"),
        },
    };
    let mut order: Vec<(&str, Vec<&str>)> = Vec::new();
    for (t, d) in images {
        match order.iter_mut().find(|(od, _)| od == d) {
            Some((_, tags)) => tags.push(t),
            None => order.push((d, vec![t])),
        }
    }
    let page: Vec<Value> = order
        .iter()
        .enumerate()
        .skip(start)
        .take(max as usize)
        .map(|(i, (d, tags))| json!({"repositoryName": repo, "imageDigest": format!("sha256:{d}"), "imageTags": tags, "imagePushedAt": pushed_at.get(*d).copied().unwrap_or(FIRST_PUSH + i as i64)}))
        .collect();
    let next = start + page.len();
    let mut out = json!({ "imageDetails": page });
    if next < order.len() {
        out["nextToken"] = json!(format!("scripted-{next}"));
    }
    (200, out)
}

/// One DescribeServices further along the scripted rollout.
fn advance(s: &mut State) {
    let Some(i) = s.deployments.iter().position(|d| d.state == "IN_PROGRESS" && d.script.is_some()) else { return };
    let d = &mut s.deployments[i];
    d.polls += 1;
    match d.script {
        Some(Rollout::Completes { polls }) if d.polls > polls => {
            d.state = "COMPLETED";
            s.events.push("(service api) has reached a steady state.".into());
            s.deployments.retain(|d| d.status == "PRIMARY");
        }
        Some(Rollout::Fails { polls }) if d.polls > polls => {
            d.state = "FAILED";
            d.reason = "ECS deployment circuit breaker: tasks failed to start.".into();
            s.events.push("(service api) deployment failed: tasks failed to start.".into());
        }
        Some(Rollout::RollsBackItself { polls }) if d.polls > polls => {
            let ours = d.id.clone();
            s.deployments.retain(|d| d.id != ours);
            if let Some(old) = s.deployments.first_mut() {
                old.status = "PRIMARY";
                old.state = "COMPLETED";
                s.service_td = old.task_definition.clone();
            }
            s.events.push(format!("(service api) rolling back to the previous deployment: {ours} failed (circuit breaker)."));
        }
        _ => {}
    }
}
