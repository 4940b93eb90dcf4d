//! Outgoing webhooks about deployments (`[[notify]]`): started, succeeded,
//! failed, rolled back, cancelled, superseded, waiting for approval; and
//! about rejected config revisions.
//!
//! A consumer of the node's event bus ([`crate::events`]). It never holds the
//! stream up: each event is turned into deliveries at once, and the
//! deliveries (each retried with backoff) run in their own tasks, at most
//! [`IN_FLIGHT`] at a time; beyond [`QUEUE`] waiting ones, new ones are
//! dropped with a warning rather than growing without bound. A
//! deployment never waits for a notification.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::config::{Notify, NotifyUrl};
use crate::events::Event;
use crate::store::{DeploymentRow, Store};

/// Deliveries sent at once.
pub const IN_FLIGHT: usize = 8;
/// Deliveries waiting for a slot before new ones are dropped.
pub const QUEUE: usize = 1000;
/// Tries of one delivery, with backoff from 1 s doubling.
pub const ATTEMPTS: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The JSON sent (`format = "json"`).
pub fn json_body(what: &str, d: &DeploymentRow) -> serde_json::Value {
    serde_json::json!({
        "event": format!("deployment.{what}"),
        "deployment": {
            "id": d.id,
            "kind": d.kind.as_str(),
            "environment": d.environment,
            "service": d.service,
            "version": d.version,
            "state": d.state.as_str(),
            "reason": d.reason,
        },
    })
}

/// The Slack-compatible shape (`format = "slack"`): `{"text": …}`.
pub fn slack_body(what: &str, d: &DeploymentRow) -> serde_json::Value {
    let subject = match (&d.service, &d.version) {
        (Some(s), Some(v)) => format!("{s} {v}"),
        _ => format!("{} deployment", d.kind.as_str()),
    };
    let mark = match what {
        "succeeded" => ":white_check_mark:",
        "started" => ":arrow_forward:",
        "waiting" => ":hourglass:",
        "rolled_back" => ":leftwards_arrow_with_hook:",
        _ => ":x:",
    };
    let reason = d.reason.as_deref().map(|r| format!(" — {}", r.chars().take(300).collect::<String>())).unwrap_or_default();
    serde_json::json!({ "text": format!("{mark} {subject} in {}: deployment #{} {}{reason}", d.environment, d.id, what.replace('_', " ")) })
}

/// The deliveries' client (https checked against the system's roots).
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    crate::http::client(|b| b.timeout(TIMEOUT).connect_timeout(Duration::from_secs(5)))
}

/// Consume the event stream until it ends.
pub async fn run(store: Arc<dyn Store>, config_path: PathBuf, mut rx: crate::events::Subscription) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let http = http_client().unwrap_or_default();
    while let Some(ev) = rx.recv().await {
        let (id, what) = match &*ev {
            Event::DeploymentStarted { deployment, .. } => (*deployment, "started".to_string()),
            Event::DeploymentFinished { deployment, state } => (*deployment, state.as_str().to_string()),
            Event::DeploymentWaiting { deployment } => (*deployment, "waiting".to_string()),
            Event::RevisionRejected { environment, commit, errors } => {
                let (path, http, slots) = (config_path.clone(), http.clone(), slots.clone());
                let (environment, commit, errors) = (environment.clone(), commit.clone(), errors.clone());
                tokio::spawn(async move {
                    let Ok(Ok(loaded)) = tokio::task::spawn_blocking(move || crate::config::load(&path)).await else { return };
                    for n in loaded
                        .config
                        .notify
                        .into_iter()
                        .filter(|n| n.on.iter().any(|o| o == "revision_rejected") && (n.environments.is_empty() || n.environments.contains(&environment)))
                    {
                        let body = if n.slack {
                            serde_json::json!({ "text": format!(":no_entry: config {} for {environment} was rejected; {environment} stays on its last good revision:\n{}", crate::config::revision::short(&commit), errors.chars().take(1500).collect::<String>()) })
                        } else {
                            serde_json::json!({ "event": "revision.rejected", "revision": { "environment": environment, "commit": commit, "errors": errors } })
                        };
                        let (http, slots) = (http.clone(), slots.clone());
                        tokio::spawn(async move {
                            let _slot = slots.acquire_owned().await;
                            deliver(&http, &n, &body, 0, "revision_rejected").await;
                        });
                    }
                });
                continue;
            }
            _ => continue,
        };
        // Reading the config and the row happens off the stream, too.
        let (store, path, http, slots, waiting) = (store.clone(), config_path.clone(), http.clone(), slots.clone(), waiting.clone());
        tokio::spawn(async move {
            let targets = match tokio::task::spawn_blocking(move || crate::config::load(&path)).await {
                Ok(Ok(loaded)) => loaded.config.notify,
                _ => return, // an invalid config on disk notifies no one (the API says why)
            };
            if targets.is_empty() {
                return;
            }
            let Ok(Some(d)) = store.deployment(id).await else { return };
            for n in targets.into_iter().filter(|n| wants(n, &what, &d)) {
                if waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= QUEUE {
                    waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    tracing::warn!(deployment = id, "notification dropped: {QUEUE} are already waiting");
                    continue;
                }
                let body = if n.slack { slack_body(&what, &d) } else { json_body(&what, &d) };
                let (http, slots, waiting, what) = (http.clone(), slots.clone(), waiting.clone(), what.clone());
                tokio::spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    deliver(&http, &n, &body, id, &what).await;
                });
            }
        });
    }
}

fn wants(n: &Notify, what: &str, d: &DeploymentRow) -> bool {
    n.on.iter().any(|o| o == what) && (n.environments.is_empty() || n.environments.contains(&d.environment))
}

/// POST with retries; a 2xx ends it, a 4xx other than 408/429 too (it will
/// not change), anything else is tried again after 1 s, 2 s, 4 s…
async fn deliver(http: &reqwest::Client, n: &Notify, body: &serde_json::Value, id: i64, what: &str) {
    let url = match &n.url {
        NotifyUrl::Plain(u) => u.clone(),
        NotifyUrl::Secret(s) => match s.read() {
            Ok(v) => v.expose().to_string(),
            Err(e) => {
                tracing::warn!(deployment = id, "notification not sent: {e}");
                return;
            }
        },
    };
    // Never the URL in a log line: it may be the secret.
    let shown = match &n.url {
        NotifyUrl::Plain(u) => crate::http::shown_url(u, false),
        NotifyUrl::Secret(s) => format!("[secret {}]", s.name),
    };
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=ATTEMPTS {
        let why = match http.post(&url).json(body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 429) => {
                tracing::warn!(deployment = id, event = what, to = %shown, status = %r.status(), "notification refused; not retried");
                return;
            }
            Ok(r) => format!("HTTP {}", r.status()),
            // Without the URL: reqwest's own spelling of it may differ.
            Err(e) => crate::http::error_chain(&e.without_url()),
        };
        if attempt == ATTEMPTS {
            tracing::warn!(deployment = id, event = what, to = %shown, "notification failed after {ATTEMPTS} tries: {why}");
            return;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

#[cfg(test)]
mod tests {
    // Issue 19 (an audit of where secrets go): a plain URL was logged up to
    // its query, with its user, password and the token in its path.
    #[test]
    fn issue19_a_notification_url_is_logged_as_its_host_only() {
        let shown_url = |u| crate::http::shown_url(u, false);
        assert_eq!(shown_url("http://bot:pw123@127.0.0.1:1/services/T0AAA/B0BBB/XXXXSECRET?x=1"), "http://127.0.0.1:1/…");
        assert_eq!(shown_url("https://hooks.slack.com/services/T0/B0/tok"), "https://hooks.slack.com/…");
        assert_eq!(shown_url("https://chat.example.org"), "https://chat.example.org");
        assert_eq!(shown_url("https://u@chat.example.org?token=t"), "https://chat.example.org/…");
        assert_eq!(shown_url("http://bot:pa%2Fss@127.0.0.1:8080/x"), "http://127.0.0.1:8080/…");
        assert!(!shown_url("http://bot:pa/ss@127.0.0.1/x").contains("pa"));
        assert_eq!(shown_url("not a url"), "[a URL that is not one]");
    }
}
