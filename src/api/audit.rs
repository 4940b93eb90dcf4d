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

pub async fn layer(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let action = format!("{} {}", req.method(), req.uri().path());
    let address = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string()).unwrap_or_else(|| "unknown".into());
    // Until API tokens exist, only the hooks can say who they are (by the
    // secret they proved they hold).
    let actor = match req.uri().path() {
        "/hooks/github" => "github webhook",
        "/hooks/registry" => "registry notifications",
        _ => "anonymous",
    };
    let res = next.run(req).await;
    let actor = res.extensions().get::<super::auth::Actor>().map(|a| a.0.clone()).unwrap_or_else(|| actor.to_string());
    let detail = res.extensions().get::<AuditNote>().map(|n| n.0.clone()).unwrap_or_default();
    let entry = AuditEntry { id: 0, at: crate::store::now_ms(), actor, address, action, detail, status: i64::from(res.status().as_u16()) };
    if let Err(e) = s.store.record_audit(entry).await {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
    res
}
