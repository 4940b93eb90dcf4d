//! A service's rollout across a group of hosts: batch by batch, each host
//! rolled by its own supervisor (the same health-gated start, switch and
//! drain as on a node, behind the host's own proxy). A host that fails
//! stops the rollout, and every host that already switched is rolled back
//! to what it ran before (its supervisor's own record, asked before it was
//! touched). Design: docs/design/ssh.md.

use std::time::Instant;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::config::{Host, JobSettings};
use super::session::{self, Chunk, Connection, Endpoint, Keys};
use super::{End, Packed, SshTarget, exchange, ship_to, short, supervisor};
use crate::service::RolloutRequest;
use crate::store::{Outcome, PartResult};
use crate::targets::{Line, OutputSink, RunResult, Stream};

/// What a host ran before this rollout touched it: enough to put it back.
#[derive(Debug, Clone)]
struct Before {
    /// The supervisor's status entry of the service, or None: it ran none.
    entry: Option<serde_json::Value>,
}

struct Rollout<'a> {
    target: &'a SshTarget,
    req: &'a RolloutRequest,
    settings: JobSettings,
    keys: Keys,
    packed: std::sync::Arc<Packed>,
    /// The spec as the host's supervisor runs it: on its own host.
    spec: String,
    output: &'a OutputSink,
    /// The rollout's stop (its timeout, a cancel): a host's own rollout
    /// then finishes or rolls itself back there; this one stops waiting.
    cancel: CancellationToken,
}

pub(super) async fn run(target: &SshTarget, req: &RolloutRequest, output: OutputSink, cancel: CancellationToken) -> RunResult {
    let settings: JobSettings = match req.spec.settings.get() {
        Ok(s) => s,
        Err(e) => return RunResult::failed(format!("a service on SSH hosts needs its hosts: {e}")),
    };
    let keys = match (settings.group.key.read(), settings.group.known_hosts.read()) {
        (Ok(k), Ok(kh)) => Keys { private_key: k, known_hosts: kh.expose().to_string() },
        (Err(e), _) | (_, Err(e)) => return RunResult::failed(e),
    };
    let packed = match target.pack(&req.workdir).await {
        Ok(p) => p,
        Err(e) => return RunResult::failed(e),
    };
    let mut on_host = req.spec.clone();
    on_host.target = crate::targets::DEFAULT.to_string();
    on_host.settings = Default::default();
    let spec = crate::store::spec::encode_service(&on_host);
    let r = Rollout { target, req, settings, keys, packed, spec, output: &output, cancel: cancel.clone() };
    let hosts = r.settings.group.hosts.clone();
    let batch = r.settings.batch.map(|b| b.batch_of(hosts.len())).unwrap_or(1);
    let mut parts: Vec<PartResult> = Vec::new();
    let mut switched: Vec<(Host, Before)> = Vec::new();
    let mut failure: Option<String> = None;
    for (i, chunk) in hosts.chunks(batch).enumerate() {
        if cancel.is_cancelled() {
            failure = Some("stopped on request".into());
        }
        if failure.is_some() {
            let now = crate::store::now_ms();
            parts.extend(chunk.iter().map(|h| PartResult {
                part: h.name.clone(),
                started_at: now,
                finished_at: now,
                outcome: Outcome::Skipped,
                exit_code: None,
                reason: Some("not rolled out: the rollout stopped".into()),
            }));
            continue;
        }
        say(&output, format!("hosts {} of {}: {}", i * batch + 1, hosts.len(), chunk.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "))).await;
        let results = join_all(chunk.iter().map(|h| r.host(h))).await;
        for (h, (part, before)) in chunk.iter().zip(results) {
            if let Some(b) = before {
                // Touched: rolled out, or rolled back by its supervisor
                // (then putting the old spec back is a no-op there).
                switched.push((h.clone(), b));
            }
            if !matches!(part.outcome, Outcome::Succeeded | Outcome::Skipped) && failure.is_none() {
                failure = Some(format!("{}: {}", part.part, part.reason.clone().unwrap_or_else(|| part.outcome.to_string())));
            }
            parts.push(part);
        }
    }
    let Some(why) = failure else {
        return RunResult { outcome: Outcome::Succeeded, exit_code: None, reason: None, parts };
    };
    say(&output, format!("rollout failed ({why}); rolling back {} host(s)", switched.len())).await;
    let reverted = join_all(switched.iter().map(|(h, b)| r.revert(h, b))).await;
    let not_back: Vec<String> = switched.iter().zip(&reverted).filter_map(|((h, _), ok)| ok.as_ref().err().map(|e| format!("{} ({e})", h.name))).collect();
    let reason = if not_back.is_empty() {
        format!("{why}; every host that was touched runs what it ran before")
    } else {
        format!("{why}; NOT rolled back: {}", not_back.join(", "))
    };
    let outcome = if not_back.is_empty() { Outcome::RolledBack } else { Outcome::Failed };
    RunResult { outcome, exit_code: None, reason: Some(reason), parts }
}

async fn say(output: &OutputSink, line: String) {
    let _ = output.send((Stream::Stdout, format!("[rollout] {line}")).into()).await;
}

impl Rollout<'_> {
    async fn connect(&self, host: &Host) -> Result<Connection, End> {
        let group = &self.settings.group;
        let ep = Endpoint { name: host.name.clone(), address: host.address.clone(), user: group.user.clone(), connect_timeout: group.connect_timeout() };
        session::connect(&ep, &self.keys).await.map_err(|e| End::Unreached(short(&e.message)))
    }

    /// Roll one host; its part, and what it ran before if it was touched.
    async fn host(&self, host: &Host) -> (PartResult, Option<Before>) {
        let started_at = crate::store::now_ms();
        let started = Instant::now();
        let mut before = None;
        let result = tokio::select! {
            r = async {
                let conn = self.connect(host).await?;
                let r = self.roll(&conn, host, &mut before).await;
                conn.close().await;
                r
            } => r,
            _ = self.cancel.cancelled() => Err(End::Cancelled),
        };

        let (outcome, reason) = match result {
            Ok((outcome, reason)) => (outcome, reason),
            Err(End::Cancelled) => (Outcome::Cancelled, Some("stopped on request".into())),
            Err(End::TimedOut) => (Outcome::TimedOut, Some("timed out".into())),
            Err(End::Failed(w)) | Err(End::Unreached(w)) => (Outcome::Failed, Some(w)),
        };
        let line = match &reason {
            Some(r) => format!("[rollout] {}: {} ({r})", host.name, outcome.as_str()),
            None => format!("[rollout] {}: {} in {:.1?}", host.name, outcome.as_str(), started.elapsed()),
        };
        let _ = self.output.send(Line { stream: Stream::Stdout, text: line, part: Some(host.name.clone()), cut: false }).await;
        (PartResult { part: host.name.clone(), started_at, finished_at: crate::store::now_ms(), outcome, exit_code: None, reason }, before)
    }

    fn request(&self, op: &str) -> supervisor::Request {
        supervisor::Request {
            dir: self.settings.group.dir.clone(),
            installation: self.target.installation.clone(),
            op: op.into(),
            environment: self.req.environment.clone(),
            service: self.req.spec.name.clone(),
            ..supervisor::Request::default()
        }
    }

    async fn roll(&self, conn: &Connection, host: &Host, before: &mut Option<Before>) -> Result<(Outcome, Option<String>), End> {
        let dir = &self.settings.group.dir;
        let agent = session::ensure_agent_with(conn, self.target.agent_binary(), dir, super::UPLOAD).await?;
        let workdir = ship_to(conn, &agent, dir, &self.packed).await?;
        let status = exchange(conn, &agent, "service", &self.request("status"), &[]).await?;
        let entry = status["status"]["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["environment"] == self.req.environment.as_str() && s["service"] == self.req.spec.name.as_str()))
            .cloned();
        if entry.as_ref().is_some_and(|e| e["drained"].as_bool() == Some(true)) {
            // Taken out of service: it gets no new deploys.
            return Ok((Outcome::Skipped, Some("drained: not deployed to".into())));
        }
        *before = Some(Before { entry });
        let ask = supervisor::Request {
            spec: Some(self.spec.clone()),
            version: Some(self.req.version.clone()),
            deployment_id: Some(self.req.deployment_id),
            revision: Some(self.req.revision.clone()),
            workdir: Some(workdir),
            sha256: self.req.sha256.clone(),
            ..self.request("rollout")
        };
        self.service(conn, &agent, host, &ask).await
    }

    /// One `service` request, its progress lines relayed with the host.
    async fn service(&self, conn: &Connection, agent: &str, host: &Host, ask: &supervisor::Request) -> Result<(Outcome, Option<String>), End> {
        let mut process = conn.spawn(&session::agent_command(agent, "service")).await?;
        let mut first = serde_json::to_vec(ask).map_err(|e| End::Failed(e.to_string()))?;
        first.push(b'\n');
        process.write(&first).await?;
        process.close_stdin().await?;
        let mut buf = Vec::new();
        let mut result = None;
        let mut stderr = Vec::new();
        while let Some(chunk) = process.next().await {
            match chunk {
                Chunk::Stdout(b) => {
                    buf.extend_from_slice(&b);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
                        if let Some(l) = v.get("line").and_then(|l| l.as_str()) {
                            let _ = self.output.send(Line { stream: Stream::Stdout, text: l.to_string(), part: Some(host.name.clone()), cut: false }).await;
                        } else if let Some(r) = v.get("result") {
                            result = Some(r.clone());
                        } else if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                            return Err(End::Failed(format!("the host's supervisor: {e}")));
                        }
                    }
                }
                Chunk::Stderr(b) => stderr.extend_from_slice(&b),
                Chunk::Exit(_) => {}
            }
        }
        let Some(r) = result else {
            return Err(match process.lost() {
                Some(lost) => End::Failed(short(&lost.message)),
                None => End::Failed(format!("the host's supervisor gave no result: {}", String::from_utf8_lossy(&stderr).trim())),
            });
        };
        let outcome = r["outcome"].as_str().and_then(Outcome::parse).unwrap_or(Outcome::Failed);
        Ok((outcome, r["reason"].as_str().map(str::to_string)))
    }

    /// Put a host back to what it ran before.
    async fn revert(&self, host: &Host, before: &Before) -> Result<(), String> {
        let conn = self.connect(host).await.map_err(|e| end_message(&e))?;
        let r = async {
            let agent = session::ensure_agent_with(&conn, self.target.agent_binary(), &self.settings.group.dir, super::UPLOAD).await?;
            let ask = match &before.entry {
                None => self.request("stop"),
                // What the host's status said it ran: its own words back.
                Some(e) => supervisor::Request {
                    spec: e["spec"].as_str().map(str::to_string),
                    version: e["version"].as_str().map(str::to_string),
                    deployment_id: e["deployment_id"].as_i64(),
                    revision: e["revision"].as_str().map(str::to_string),
                    workdir: e["workdir"].as_str().map(str::to_string),
                    sha256: e["sha256"].as_str().map(str::to_string),
                    ..self.request("rollout")
                },
            };
            self.service(&conn, &agent, host, &ask).await
        }
        .await;
        conn.close().await;
        match r {
            Ok((Outcome::Succeeded, _)) => Ok(()),
            Ok((o, reason)) => Err(reason.unwrap_or_else(|| o.to_string())),
            Err(e) => Err(end_message(&e)),
        }
    }
}

pub(super) fn end_message(e: &End) -> String {
    match e {
        End::Cancelled => "stopped".into(),
        End::TimedOut => "timed out".into(),
        End::Failed(w) | End::Unreached(w) => w.clone(),
    }
}
