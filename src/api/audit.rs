//! The audit log: every request that changes something (anything but GET
//! and HEAD), who sent it, from where, what it meant and what came of it,
//! refused ones included (a webhook with a bad signature, a bad deploy).
//! A handler says what a request meant with an [`AuditNote`] on its
//! response; an `ApiError` notes its own message.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use crate::store::AuditEntry;

/// What a request meant, for the audit log ("deploy web 1.4.0 in staging
/// → deployment 12").
#[derive(Debug, Clone)]
pub struct AuditNote(pub String);

/// The environment a request acted in, for the audit log's filter, where
/// the path does not say it (an event names it in its body).
#[derive(Debug, Clone)]
pub struct AuditEnvironment(pub String);

/// The environment a request's path names: `/services/{env}/…` and
/// `/environments/{env}/…` by name, `/deployments/{id}/…` by the
/// deployment's (a refused approval is found under its environment too).
async fn environment_of(s: &AppState, path: &str) -> Option<String> {
    let mut parts = path.strip_prefix("/api/v1/")?.split('/');
    match (parts.next(), parts.next()) {
        (Some("services" | "environments"), Some(env)) if crate::config::valid_name(env) => Some(env.to_string()),
        (Some("deployments"), Some(id)) => {
            let id = id.parse::<i64>().ok()?;
            s.store.deployment(id).await.ok().flatten().map(|d| d.environment)
        }
        _ => None,
    }
}

/// Refused requests that anyone can send in any number (a hook delivery
/// that is refused, a request with no valid token) are recorded one by
/// one only so far: per source address, endpoint and status, the first
/// [`Refusals::PER_WINDOW`] in a minute each get their audit row and log
/// warning; the rest of that minute are counted, and one summary row ("and
/// K more refused deliveries like this in the last minute") follows when
/// the minute ends (or the node stops). So the first ones are always
/// there, and a flood adds a bounded number of rows: at most
/// `PER_WINDOW + 1` per source, endpoint and status a minute, and sources
/// beyond [`Refusals::MAX_KEYS`] at once share one count. Per node.
#[derive(Default)]
pub struct Refusals {
    windows: std::sync::Mutex<std::collections::HashMap<RefusalKey, Window>>,
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefusalKey {
    address: String,
    action: String,
    status: i64,
}

struct Window {
    started: std::time::Instant,
    generation: u64,
    recorded: u64,
    more: u64,
    /// The latest refusal counted, for the summary's example.
    last: Option<AuditEntry>,
}

/// What to do with one refused request.
#[derive(Debug)]
pub struct Admission {
    /// Record it (and log it): among the first of its window.
    pub record: bool,
    /// Summaries of windows that ended, to record now.
    pub summaries: Vec<AuditEntry>,
    /// The first refusal counted in a window: flush it when the window
    /// ends (`key`, `generation`, in).
    pub flush: Option<(RefusalKey, u64, std::time::Duration)>,
}

impl Refusals {
    pub const PER_WINDOW: u64 = 10;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
    pub const MAX_KEYS: usize = 1024;

    /// Whether a request with this status on this path is bounded.
    pub fn bounded(path: &str, status: u16) -> bool {
        status >= 400 && (path.starts_with("/hooks/") || status == 401)
    }

    pub fn admit(&self, entry: &AuditEntry, now: std::time::Instant) -> Admission {
        let mut out = Admission { record: true, summaries: vec![], flush: None };
        let Ok(mut windows) = self.windows.lock() else { return out };
        let mut key = RefusalKey { address: entry.address.clone(), action: entry.action.clone(), status: entry.status };
        if !windows.contains_key(&key) && windows.len() >= Self::MAX_KEYS {
            // Windows with nothing counted leave no summary behind.
            windows.retain(|_, w| now.duration_since(w.started) < Self::WINDOW || w.more > 0);
            if windows.len() >= Self::MAX_KEYS {
                key.address = "many addresses".into();
            }
        }
        if let Some(w) = windows.get(&key)
            && now.duration_since(w.started) >= Self::WINDOW
        {
            // Ended, and its flush has not run yet: its summary now.
            if let Some(w) = windows.remove(&key)
                && let Some(summary) = summary(&key, &w, now)
            {
                out.summaries.push(summary);
            }
        }
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let w = windows.entry(key.clone()).or_insert(Window { started: now, generation, recorded: 0, more: 0, last: None });
        if w.recorded < Self::PER_WINDOW {
            w.recorded += 1;
        } else {
            out.record = false;
            w.more += 1;
            w.last = Some(entry.clone());
            if w.more == 1 {
                out.flush = Some((key, w.generation, Self::WINDOW.saturating_sub(now.duration_since(w.started))));
            }
        }
        out
    }

    /// The summary of window `generation` of `key`, if it is still there
    /// (not summed up by a later refusal) and counted any.
    pub fn flush(&self, key: &RefusalKey, generation: u64, now: std::time::Instant) -> Option<AuditEntry> {
        let mut windows = self.windows.lock().ok()?;
        if windows.get(key).is_none_or(|w| w.generation != generation) {
            return None;
        }
        let w = windows.remove(key)?;
        summary(key, &w, now)
    }

    /// Every pending summary (the node stops).
    pub fn flush_all(&self, now: std::time::Instant) -> Vec<AuditEntry> {
        let Ok(mut windows) = self.windows.lock() else { return vec![] };
        windows.drain().filter_map(|(k, w)| summary(&k, &w, now)).collect()
    }
}

fn summary(key: &RefusalKey, w: &Window, now: std::time::Instant) -> Option<AuditEntry> {
    let last = w.last.as_ref().filter(|_| w.more > 0)?;
    let elapsed = now.duration_since(w.started);
    let span = if elapsed >= Refusals::WINDOW { "the last minute".to_string() } else { format!("the last {}s", elapsed.as_secs().max(1)) };
    let what = if key.action.contains(" /hooks/") { "deliveries" } else { "requests" };
    Some(AuditEntry {
        id: 0,
        at: crate::store::now_ms(),
        actor: last.actor.clone(),
        address: key.address.clone(),
        action: key.action.clone(),
        detail: format!("and {} more refused {what} like this in {span} (HTTP {} from {}); the last: {}", w.more, key.status, key.address, last.detail),
        status: key.status,
        environment: last.environment.clone(),
    })
}

async fn record(s: &AppState, entry: AuditEntry) {
    if let Err(e) = s.store.record_audit(entry).await {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
}

/// Record the summaries still pending (the node stops).
pub async fn flush_refusals(s: &AppState) {
    for entry in s.refusals.flush_all(std::time::Instant::now()) {
        tracing::warn!(action = %entry.action, address = %entry.address, status = entry.status, detail = ?entry.detail, "refusals summed up");
        record(s, entry).await;
    }
}

pub async fn layer(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let action = format!("{} {path}", req.method());
    // The bound counts refusals per route, not per raw path: a flood of
    // made-up paths (each its own key) would slip past it otherwise.
    let matched = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_string());
    let route = format!("{} {}", req.method(), matched.as_deref().unwrap_or("(no such endpoint)"));
    let address = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string()).unwrap_or_else(|| "unknown".into());
    // Until API tokens exist, only the hooks can say who they are (by the
    // secret they proved they hold).
    let actor = match path.as_str() {
        "/hooks/github" => "github webhook",
        "/hooks/registry" => "registry notifications",
        _ => "anonymous",
    };
    let res = next.run(req).await;
    let actor = res.extensions().get::<super::auth::Actor>().map(|a| a.0.clone()).unwrap_or_else(|| actor.to_string());
    let detail = res.extensions().get::<AuditNote>().map(|n| n.0.clone()).unwrap_or_default();
    let environment = res.extensions().get::<AuditEnvironment>().map(|e| e.0.clone());
    let mut entry = AuditEntry { id: 0, at: crate::store::now_ms(), actor, address, action, detail, status: i64::from(res.status().as_u16()), environment };
    // A request to no endpoint at all is refused in bulk as cheaply as a
    // bad hook delivery: bounded too, and so is a method a path does not
    // take (a POST to the dashboard's files).
    let status = res.status().as_u16();
    let no_endpoint = (matched.is_none() || status == 405) && status >= 400;
    if !(no_endpoint || Refusals::bounded(&path, status)) {
        // Only for a row that is written: a flood of bounded refusals
        // costs no store read.
        if entry.environment.is_none() {
            entry.environment = environment_of(&s, &path).await;
        }
        record(&s, entry).await;
        return res;
    }
    let keyed = AuditEntry { action: route, ..entry.clone() };
    let admission = s.refusals.admit(&keyed, std::time::Instant::now());
    for summary in admission.summaries {
        tracing::warn!(action = %summary.action, address = %summary.address, status = summary.status, detail = ?summary.detail, "refusals summed up");
        record(&s, summary).await;
    }
    if let Some((key, generation, after)) = admission.flush {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(summary) = s.refusals.flush(&key, generation, std::time::Instant::now()) {
                tracing::warn!(action = %summary.action, address = %summary.address, status = summary.status, detail = ?summary.detail, "refusals summed up");
                record(&s, summary).await;
            }
        });
    }
    if admission.record {
        tracing::warn!(action = %entry.action, address = %entry.address, status = entry.status, reason = ?entry.detail, "refused");
        record(&s, entry).await;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn refused(address: &str, status: i64, n: usize) -> AuditEntry {
        AuditEntry {
            id: 0,
            at: 0,
            actor: "github webhook".into(),
            address: address.into(),
            action: "POST /hooks/github".into(),
            detail: format!("refusal {n}"),
            status,
            environment: None,
        }
    }

    #[test]
    fn issue13_refusals_are_recorded_one_by_one_up_to_a_bound_then_summed_up_per_minute() {
        let r = Refusals::default();
        let t0 = Instant::now();
        let admitted: Vec<Admission> = (0..1000).map(|n| r.admit(&refused("10.0.0.1", 401, n), t0 + Duration::from_millis(n as u64))).collect();
        assert!(admitted[..10].iter().all(|a| a.record && a.flush.is_none()), "the first ones, one by one");
        assert!(admitted[10..].iter().all(|a| !a.record && a.summaries.is_empty()));
        let (key, generation, after) = admitted[10].flush.clone().expect("a flush when the minute ends");
        assert!(after <= Refusals::WINDOW && admitted[11..].iter().all(|a| a.flush.is_none()), "one flush per window");
        // Another sender, or another status, has its own bound.
        assert!(r.admit(&refused("10.0.0.2", 401, 0), t0).record);
        assert!(r.admit(&refused("10.0.0.1", 400, 0), t0).record);
        // The minute ends: one summary, the count and the last one.
        let end = t0 + Refusals::WINDOW;
        let summary = r.flush(&key, generation, end).expect("summary");
        assert_eq!(summary.detail, "and 990 more refused deliveries like this in the last minute (HTTP 401 from 10.0.0.1); the last: refusal 999");
        assert_eq!((summary.status, summary.address.as_str(), summary.action.as_str()), (401, "10.0.0.1", "POST /hooks/github"));
        assert!(r.flush(&key, generation, end).is_none(), "once");
        // A new minute records the first ones again.
        assert!(r.admit(&refused("10.0.0.1", 401, 1000), end).record);
        // A window summed up by the next refusal, before its flush ran.
        let r = Refusals::default();
        let mut flush = None;
        for n in 0..12 {
            flush = flush.or(r.admit(&refused("10.0.0.1", 401, n), t0).flush);
        }
        let late = r.admit(&refused("10.0.0.1", 401, 12), t0 + Refusals::WINDOW + Duration::from_secs(1));
        assert!(late.record && late.summaries.len() == 1 && late.summaries[0].detail.starts_with("and 2 more"), "{late:?}");
        let (key, generation, _) = flush.expect("flush");
        assert!(r.flush(&key, generation, t0 + Refusals::WINDOW * 2).is_none(), "not twice");
        // Stopping: what is pending is summed up.
        for n in 0..15 {
            r.admit(&refused("10.0.0.3", 413, n), t0 + Refusals::WINDOW * 2);
        }
        let pending = r.flush_all(t0 + Refusals::WINDOW * 2 + Duration::from_secs(5));
        assert_eq!(
            pending.iter().map(|p| p.detail.as_str()).collect::<Vec<_>>(),
            ["and 5 more refused deliveries like this in the last 5s (HTTP 413 from 10.0.0.3); the last: refusal 14"]
        );
        // Many senders at once share one count beyond the bound on keys.
        let r = Refusals::default();
        for n in 0..Refusals::MAX_KEYS + 50 {
            r.admit(&refused(&format!("10.1.{}.{}", n / 256, n % 256), 401, n), t0);
        }
        assert_eq!(r.windows.lock().map(|w| w.len()).unwrap_or(0), Refusals::MAX_KEYS + 1);
        assert!(Refusals::bounded("/hooks/registry", 400) && Refusals::bounded("/api/v1/events", 401));
        assert!(!Refusals::bounded("/api/v1/events", 403) && !Refusals::bounded("/hooks/github", 202));
    }
}
