//! `slipway hosts`: every host of every group, asked now (reachable, its
//! host key, what its supervisor runs, whether it is drained), and
//! draining a host: its supervisor's proxies stop taking connections and
//! rollouts pass it by (a server being replaced).

use std::collections::BTreeMap;

use futures_util::future::join_all;

use super::config::{Group, Host};
use super::session::{self, Endpoint, Keys};
use super::supervisor::Request;
use super::{SshTarget, UPLOAD, exchange, short};
use crate::targets::{Machine, MachineService, Settings, TargetError, TargetErrorKind};

fn groups(tables: &Settings) -> BTreeMap<String, Group> {
    super::config::Groups::of(tables).groups
}

fn keys(g: &Group) -> Result<Keys, String> {
    Ok(Keys { private_key: g.key.read()?, known_hosts: g.known_hosts.read()?.expose().to_string() })
}

fn endpoint(g: &Group, h: &Host) -> Endpoint {
    Endpoint { name: h.name.clone(), address: h.address.clone(), user: g.user.clone(), connect_timeout: g.connect_timeout() }
}

/// One request to a host's agent (`verb`: `service` asks its supervisor).
async fn ask<R: serde::Serialize>(target: &SshTarget, g: &Group, h: &Host, verb: &str, request: R) -> Result<(serde_json::Value, String), String> {
    let keys = keys(g)?;
    let (conn, key) = target.connection(&endpoint(g, h), &keys).await.map_err(|e| short(&e.message))?;
    let r = async {
        let agent = session::ensure_agent_with(&conn, target.agent_binary(), &g.dir, UPLOAD).await.map_err(|e| short(&e.message))?;
        exchange(&conn, &agent, verb, &request, &[]).await.map_err(|e| super::rollout::end_message(&e))
    }
    .await;
    if r.is_err() {
        target.forget(&key);
    }
    r.map(|v| (v, conn.fingerprint().to_string()))
}

pub(super) async fn machines(target: &SshTarget, tables: &Settings) -> Vec<Machine> {
    let groups = groups(tables);
    let all: Vec<(&Group, &Host)> = groups.values().flat_map(|g| g.hosts.iter().map(move |h| (g, h))).collect();
    join_all(all.into_iter().map(|(g, h)| machine(target, g, h))).await
}

/// Look after the groups whose `check_every` has passed since their last
/// check: every host's supervisor asked for its status, which starts one
/// where services are kept but no supervisor answers (killed, or the host
/// rebooted): it adopts what still runs and brings back the rest. A host
/// that stops answering, and one that answers again, is logged once.
pub(super) async fn tend(target: &SshTarget, tables: &Settings) {
    let groups = groups(tables);
    let now = std::time::Instant::now();
    let due: Vec<&Group> = {
        let mut last = target.tended.lock().unwrap_or_else(|e| e.into_inner());
        let due: Vec<&Group> = groups.values().filter(|g| last.get(&g.name).is_none_or(|t| now.duration_since(*t) >= g.check_every())).collect();
        for g in &due {
            last.insert(g.name.clone(), now);
        }
        due
    };
    let all: Vec<(&Group, &Host)> = due.iter().flat_map(|g| g.hosts.iter().map(move |h| (*g, h))).collect();
    for m in join_all(all.into_iter().map(|(g, h)| check(target, g, h))).await {
        let key = format!("{}/{}", m.group, m.name);
        let was = target.answered.lock().unwrap_or_else(|e| e.into_inner()).insert(key, m.reachable);
        match (was, &m.error) {
            (Some(true) | None, Some(e)) => tracing::warn!(group = m.group, host = m.name, error = %e, "a host does not answer"),
            (Some(false), None) => tracing::info!(group = m.group, host = m.name, "a host answers again"),
            _ => {}
        }
    }
}

/// One host's check: how it is ([`machine`]) and, when it answers, a
/// sweep of this installation's job processes whose agent died there
/// (killed with the connection it served): nothing else would end them.
async fn check(target: &SshTarget, g: &Group, h: &Host) -> Machine {
    let m = machine(target, g, h).await;
    if m.reachable {
        let request = super::agent::SweepRequest { dir: g.dir.clone(), installation: target.installation.clone() };
        match ask(target, g, h, "sweep", request).await {
            Ok((answer, _)) => {
                if let Some(n) = answer["ended"].as_u64().filter(|n| *n > 0) {
                    tracing::warn!(group = g.name, host = h.name, ended = n, "ended job processes on a host whose agent had died");
                }
            }
            Err(e) => tracing::warn!(group = g.name, host = h.name, error = %e, "cannot sweep a host's leftover job processes"),
        }
    }
    m
}

/// One host, asked now.
async fn machine(target: &SshTarget, g: &Group, h: &Host) -> Machine {
    {
        let mut m = Machine { group: g.name.clone(), name: h.name.clone(), address: h.address.clone(), ..Machine::default() };
        let request = Request { dir: g.dir.clone(), installation: target.installation.clone(), op: "status".into(), ..Request::default() };
        match ask(target, g, h, "service", request).await {
            Ok((answer, fingerprint)) => {
                m.reachable = true;
                m.fingerprint = Some(fingerprint);
                let status = &answer["status"];
                m.drained = status["drained"].as_bool() == Some(true);
                for s in status["services"].as_array().into_iter().flatten() {
                    m.drained |= s["drained"].as_bool() == Some(true);
                    m.services.push(MachineService {
                        environment: s["environment"].as_str().unwrap_or_default().to_string(),
                        service: s["service"].as_str().unwrap_or_default().to_string(),
                        version: s["version"].as_str().unwrap_or_default().to_string(),
                        instances: s["instances"].as_u64().unwrap_or(0) as u32,
                        healthy: s["healthy"].as_u64().unwrap_or(0) as u32,
                        ids: s["pids"].as_array().into_iter().flatten().filter_map(|p| p.as_i64()).map(|p| format!("pid {p}")).collect(),
                    });
                }
            }
            Err(e) => m.error = Some(e),
        }
        m
    }
}

pub(super) async fn drain(target: &SshTarget, tables: &Settings, name: &str, drained: bool) -> Result<String, TargetError> {
    let groups = groups(tables);
    let found = groups.values().find_map(|g| g.hosts.iter().find(|h| h.name == name || h.address == name || h.name.split('.').next() == Some(name)).map(|h| (g, h)));
    let Some((g, h)) = found else {
        return Err(TargetError::new(TargetErrorKind::NotFound, format!("no host {name:?} in any [[hosts]] group")));
    };
    let op = if drained { "drain" } else { "undrain" };
    let request = Request { dir: g.dir.clone(), installation: target.installation.clone(), op: op.into(), service: "*".into(), ..Request::default() };
    match ask(target, g, h, "service", request).await {
        Ok((answer, _)) if answer["result"]["outcome"] == "succeeded" => {
            Ok(format!("{} ({}) {}", h.name, g.name, if drained { "drained: no new deploys, no new connections" } else { "back in service" }))
        }
        Ok((answer, _)) => Err(TargetError::new(TargetErrorKind::Failed, format!("{}: {}", h.name, answer["result"]["reason"].as_str().unwrap_or("the supervisor refused")))),
        Err(e) => Err(TargetError::new(TargetErrorKind::Unavailable, format!("{}: {e}", h.name))),
    }
}
