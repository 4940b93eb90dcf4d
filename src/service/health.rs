//! Slipway's own health checks (not a target's: their timing is ours to
//! state). An instance is healthy after `healthy_after` consecutive
//! passes, checked every `interval`, each check bounded by `timeout`; it
//! fails when it exits or is not healthy by `deadline`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use tokio_util::sync::CancellationToken;

use crate::config::service::{HealthCheck, HealthSpec};
use crate::process::{program_path, substitute};
use crate::targets::Instance;

/// One check: Ok(what it saw) or Err(what went wrong), both for people.
pub async fn check_once(
    client: &reqwest::Client,
    spec: &HealthSpec,
    instance: &dyn Instance,
    workdir: &Path,
    values: &BTreeMap<&'static str, String>,
) -> Result<String, String> {
    let addr = instance.addr();
    match &spec.check {
        HealthCheck::Tcp => match tokio::time::timeout(spec.timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(format!("TCP {addr} accepts connections")),
            Ok(Err(e)) => Err(format!("TCP {addr}: {e}")),
            Err(_) => Err(format!("TCP {addr}: no answer within {}", humantime::format_duration(spec.timeout))),
        },
        HealthCheck::Http { path, status } => {
            let url = format!("http://{addr}{path}");
            match client.get(&url).timeout(spec.timeout).send().await {
                Ok(resp) => {
                    let got = resp.status().as_u16();
                    let body = resp.text().await.unwrap_or_default();
                    let body: String = body.trim().chars().take(200).collect();
                    let seen = format!("GET {path} → {got} {body:?}");
                    if got == *status { Ok(seen) } else { Err(format!("{seen}, expected {status}")) }
                }
                Err(e) if e.is_timeout() => Err(format!("GET {path}: no answer within {}", humantime::format_duration(spec.timeout))),
                Err(e) => Err(format!("GET {path}: {}", crate::http::error_chain(&e))),
            }
        }
        HealthCheck::Command { argv } => {
            let argv: Vec<String> = argv.iter().map(|a| substitute(a, values)).collect();
            let Some(program) = argv.first() else { return Err("empty health command".into()) };
            let mut cmd = tokio::process::Command::new(program_path(program, workdir));
            crate::process::hide_secret_sources(cmd.as_std_mut());
            cmd.args(&argv[1..]).current_dir(workdir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
            match tokio::time::timeout(spec.timeout, cmd.output()).await {
                Err(_) => Err(format!("{program}: no answer within {}", humantime::format_duration(spec.timeout))),
                Ok(Err(e)) => Err(format!("cannot run {program:?}: {e}")),
                Ok(Ok(out)) => {
                    let text =
                        String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).trim().chars().take(200).collect::<String>();
                    if out.status.success() { Ok(format!("{program} → ok {text:?}")) } else { Err(format!("{program} → {} {text:?}", out.status)) }
                }
            }
        }
    }
}

/// Wait until `instance` is healthy. The error explains why not: the
/// last check's result, or how it exited and its last output.
pub async fn wait_healthy(
    client: &reqwest::Client,
    spec: &HealthSpec,
    instance: &dyn Instance,
    workdir: &Path,
    values: &BTreeMap<&'static str, String>,
    cancel: &CancellationToken,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + spec.deadline;
    let mut passes = 0;
    let mut last: String;
    loop {
        if let Some(why) = instance.exit() {
            return Err(exited(instance, &why));
        }
        match check_once(client, spec, instance, workdir, values).await {
            Ok(seen) => {
                passes += 1;
                if passes >= spec.healthy_after {
                    return Ok(seen);
                }
                last = seen;
            }
            Err(e) => {
                passes = 0;
                last = e;
            }
        }
        let next = tokio::time::Instant::now() + spec.interval;
        if next > deadline {
            return Err(format!(
                "instance {} ({}) was not healthy within {}: last check: {last}{}",
                instance.addr(),
                instance.id(),
                humantime::format_duration(spec.deadline),
                output_tail(instance)
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = instance.exited() => {}
            _ = cancel.cancelled() => return Err("stopped on request".into()),
        }
    }
}

pub fn exited(instance: &dyn Instance, why: &str) -> String {
    format!("instance {} ({}) exited: {why}{}", instance.addr(), instance.id(), output_tail(instance))
}

/// "; its last output: …" with the instance's last lines, if any.
pub fn output_tail(instance: &dyn Instance) -> String {
    let lines = instance.last_output();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&String> = lines.iter().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
    format!("; its last output: {}", tail.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(" | "))
}
