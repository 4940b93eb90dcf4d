//! The HTTP API under `/api/v1`, plus `/healthz` and `/metrics`.
//!
//! **Architecture Invariant:** only this module (with [`wire`]) decides
//! what goes over the wire; store rows are converted to wire types here.
//! Every error is JSON `{"error": {"kind", "message"}}` with the matching
//! status: 400 bad input, 404 unknown id, 413 too large, 422 invalid
//! config, 503 store down.

pub mod audit;
pub mod auth;
pub mod changes;
mod contract;
mod gates;
mod hooks;
pub use hooks::{Queued, published_from_queue};
pub mod metrics;
pub mod serve;
pub mod tls;
pub mod wire;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use utoipa::OpenApi;

use crate::store::{DeploymentState, Store, StoreError};
use crate::submit::{Request, SubmitError, Submitter};
use contract::Contract;
use wire::*;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub submitter: Arc<Submitter>,
    pub metrics: Arc<metrics::Metrics>,
    pub node: String,
    /// This node's running services (live instances for `/services`).
    pub services: Option<Arc<crate::service::ServiceManager>>,
    /// How many refused requests the audit log records one by one.
    pub refusals: audit::Refusals,
    /// What long polls of a deployment wait on.
    pub changes: Arc<changes::Changes>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    problems: Vec<Problem>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), problems: vec![] }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()),
            _ => {
                tracing::error!(error = %e, "store error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Config(errors) => {
                let problems = errors
                    .reports()
                    .into_iter()
                    .map(|r| Problem { kind: r.kind_str(), file: r.file, line: r.line, column: r.column, message: r.message, hint: r.hint })
                    .collect();
                ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    kind: "invalid_config",
                    message: format!("the config on disk is invalid ({} problems); nothing was started", errors.problems.len()),
                    problems,
                }
            }
            SubmitError::Plan(p) => Self::bad_request(p.to_string()),
            SubmitError::Invalid(m) | SubmitError::Unpinned(m) => Self::bad_request(m),
            SubmitError::EnvironmentRequired(m) => Self::new(StatusCode::BAD_REQUEST, "environment_required", m),
            SubmitError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            SubmitError::Unavailable(m) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            SubmitError::Revision(r) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", r.to_string()),
            SubmitError::Store(s) => s.into(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE { format!("request body larger than {MAX_BODY_BYTES} bytes") } else { r.body_text() };
        // Unprocessable JSON is still the client's mistake: say 400.
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { status };
        Self::new(status, kind, message)
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::bad_request(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let note = audit::AuditNote(self.message.clone());
        let mut res =
            (self.status, Json(ErrorBody { error: ErrorDetail { kind: self.kind.into(), message: self.message, problems: self.problems } })).into_response();
        res.extensions_mut().insert(note);
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(OpenApi)]
#[openapi(
    info(title = "Slipway API", description = "Deployments, jobs and logs of a Slipway cluster."),
    paths(post_event, list_deployments, get_deployment, list_jobs, get_logs, stream_logs, cancel_deployment, list_nodes, list_services, rollback_service, service_events, why_service, list_audit, whoami, create_token, list_tokens, revoke_token, gc_plan, gc_apply, list_hosts, drain_host, undrain_host, retention_plan, retention_apply, gates::list_environments, gates::list_approvals, gates::approve, gates::promote, gates::list_revisions, gates::check_revision, hooks::github, hooks::registry, hooks::published, healthz, metrics_text, openapi),
    components(schemas(EventRequestSchema, EventAccepted, Deployment, DeploymentDetail, Job, Attempt, LogLine, Node, ServiceInfo, InstanceInfo, ServiceEventInfo, GarbageInfo, GarbageItemInfo, HostInfo, HostServiceInfo, HostDrained, RetentionInfo, RetentionRepositoryInfo, RetentionKeptInfo, RetentionDeleteInfo, HookAnswer, HookResult, PublishedRequest, RegistryEnvelope, WhyInfo, AuditInfo, WhoAmI, TokenRequest, TokenCreated, TokenInfo, ApprovalInfo, EnvironmentInfo, PromoteRequest, RevisionInfo, TouchedJob, auth::Role, Health, ErrorBody, EventAnswer, TokenRevoked, SseEventInfo, Name, NameFilter, HostName, Version, EventId, PublishedId, Digest, Image)),
    modifiers(&Contract)
)]
pub struct ApiDoc;

pub fn router(state: Arc<AppState>) -> Router {
    let audit = axum::middleware::from_fn_with_state(state.clone(), audit::layer);
    let auth = axum::middleware::from_fn_with_state(state.clone(), auth::layer);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/events", post(post_event))
        .route("/api/v1/published", post(hooks::published))
        .route("/api/v1/deployments", get(list_deployments))
        .route("/api/v1/deployments/{id}", get(get_deployment))
        .route("/api/v1/deployments/{id}/jobs", get(list_jobs))
        .route("/api/v1/deployments/{id}/logs", get(get_logs))
        .route("/api/v1/deployments/{id}/logs/stream", get(stream_logs))
        .route("/api/v1/deployments/{id}/cancel", post(cancel_deployment))
        .route("/api/v1/deployments/{id}/approve", post(gates::approve))
        .route("/api/v1/approvals", get(gates::list_approvals))
        .route("/api/v1/services/{environment}/{service}/promote", post(gates::promote))
        .route("/api/v1/environments", get(gates::list_environments))
        .route("/api/v1/environments/{environment}/revisions", get(gates::list_revisions))
        .route("/api/v1/environments/{environment}/revisions/check", post(gates::check_revision))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/services", get(list_services))
        .route("/api/v1/services/{environment}/{service}/rollback", post(rollback_service))
        .route("/api/v1/services/{environment}/{service}/events", get(service_events))
        .route("/api/v1/services/{environment}/{service}/why", get(why_service))
        .route("/api/v1/gc", get(gc_plan).post(gc_apply))
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/{host}/drain", post(drain_host))
        .route("/api/v1/hosts/{host}/undrain", post(undrain_host))
        .route("/api/v1/retention", get(retention_plan).post(retention_apply))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint; see /api/v1/openapi.json") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(declared_body_limit))
        // After the limit layers: a hook reads its body under its own,
        // configured limit.
        .route("/hooks/github", post(hooks::github))
        .route("/hooks/registry", post(hooks::registry))
        // Outermost last: the audit log sees who auth said it was.
        .layer(auth)
        .layer(audit)
        .with_state(state)
}

/// 413 for a body declared larger than [`MAX_BODY_BYTES`], whatever the
/// endpoint: those that read no body (a DELETE, a GET) would otherwise
/// take any size. A body that does not declare its length is cut off at
/// the limit by [`DefaultBodyLimit`] where one is read.
async fn declared_body_limit(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use http_body_util::BodyExt;
    /// Up to this much of a refused body is read and dropped first: a
    /// client still sending it would otherwise meet a closed connection
    /// instead of the answer.
    const DRAIN: u64 = 1 << 20;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_BODY_BYTES as u64) {
        if n <= DRAIN {
            let mut body = req.into_body();
            let _ = tokio::time::timeout(Duration::from_secs(10), async { while let Some(Ok(_)) = body.frame().await {} }).await;
        }
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body larger than {MAX_BODY_BYTES} bytes (64 KiB, the API's limit)"),
        )
        .into_response();
    }
    next.run(req).await
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "The OpenAPI document of this API", body = Object)))]
async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], ApiDoc::openapi().to_pretty_json().unwrap_or_default())
}

/// Liveness and store reachability.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The node runs and its store answers", body = Health), (status = 503, description = "The store does not answer", body = Health)))]
async fn healthz(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    let store = tokio::time::timeout(Duration::from_secs(3), s.store.ping()).await;
    let (status, store_state) = match store {
        // A full disk still answers reads: what a recent write met counts.
        Ok(Ok(())) => match crate::store::disk_trouble() {
            Some(trouble) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store unavailable: a write failed within the last {}s: {trouble}", crate::store::DISK_TROUBLE_SHOWN.as_secs()),
            ),
            None => (StatusCode::OK, "ok".to_string()),
        },
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store did not answer within 3s".to_string()),
    };
    let body = Health {
        status: if status == StatusCode::OK { "ok" } else { "degraded" }.into(),
        store: store_state,
        node: s.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    (status, Json(body))
}

/// Prometheus metrics of this node and the store's counts.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus' text format", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")))]
async fn metrics_text(State(s): State<Arc<AppState>>) -> ApiResult<impl IntoResponse> {
    let counts = s.store.counts().await?;
    // The classic text format, as served (see `metrics::classic_text`).
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], s.metrics.render(&counts)))
}

/// Submit an event; the deployment is stored before the answer.
#[utoipa::path(post, path = "/api/v1/events", request_body = EventRequestSchema,
    responses((status = 202, description = "Stored: a deployment (deploy, run), or what a publication did (published)", body = EventAnswer),
              (status = 200, description = "An event id seen before: its deployment, nothing new started", body = EventAccepted),
              (status = 403, description = "The token may not deploy there, or a signed event that is not kind = \"published\"", body = ErrorBody),
              (status = 409, description = "Nothing to start: e.g. an environment whose config comes from git has no accepted commit yet", body = ErrorBody),
              (status = 422, description = "The config on disk is invalid: nothing was started", body = ErrorBody)))]
async fn post_event(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    body: Result<Json<EventRequest>, JsonRejection>,
) -> ApiResult<axum::response::Response> {
    let Json(req) = body?;
    // A signature proves only that the body came from whoever holds the
    // secret: such a caller may announce artifacts, never pick what runs.
    if caller.is_signed() && req.kind != EventKind::Published {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an event signed with [events] hmac_secret may only be kind = \"published\"; deploys and runs need a token",
        ));
    }
    if req.kind == EventKind::Published {
        if !req.jobs.is_empty() || req.environment.is_some() {
            return Err(ApiError::bad_request(
                "a published event takes `image` or `service`, `version`, `digest` and `id`: where it deploys is decided by the services' auto_deploy",
            ));
        }
        let version = req.version.ok_or_else(|| ApiError::bad_request("a published event needs `version`"))?;
        let p = PublishedRequest { image: req.image, service: req.service, version, digest: req.digest, id: req.id };
        return Ok(hooks::published_event(&s, &caller, p).await?.into_response());
    }
    if req.image.is_some() {
        return Err(ApiError::bad_request("`image` belongs to published events (kind = \"published\")"));
    }
    let environment = match &req.environment {
        Some(e) => e.clone(),
        // The only environment, as the submit will resolve it.
        None => s.submitter.config().await?.config.environment_names().into_iter().next().unwrap_or_default(),
    };
    caller.require(auth::Need::Deploy, Some(&environment))?;
    // Keys under these prefixes are the triggers' own: a caller could
    // otherwise take a key a future delivery will use, and stop it.
    if req.id.as_deref().is_some_and(|k| crate::submit::RESERVED_KEY_PREFIXES.iter().any(|p| k.starts_with(p))) {
        return Err(ApiError::bad_request(format!(
            "event ids starting with {} are reserved for Slipway's triggers",
            crate::submit::RESERVED_KEY_PREFIXES.join(", ")
        )));
    }
    let payload = serde_json::to_string(&req).unwrap_or_default();
    let request = match req.kind {
        EventKind::Deploy => {
            let service = req.service.ok_or_else(|| ApiError::bad_request("a deploy event needs `service`"))?;
            let version = req.version.ok_or_else(|| ApiError::bad_request("a deploy event needs `version`"))?;
            if !req.jobs.is_empty() {
                return Err(ApiError::bad_request("a deploy event takes no `jobs`; use kind = \"run\""));
            }
            // Checked here, once: the submitter takes typed values.
            let version = crate::values::Version::parse(&version).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let digest = req.digest.as_deref().map(crate::values::Digest::parse).transpose().map_err(|e| ApiError::bad_request(e.to_string()))?;
            Request::Deploy { service, version, environment: req.environment, digest }
        }
        EventKind::Run => {
            if req.service.is_some() || req.version.is_some() || req.digest.is_some() {
                return Err(ApiError::bad_request("a run event takes `jobs`, not `service` or `version`"));
            }
            Request::Run { jobs: req.jobs, environment: req.environment }
        }
        EventKind::Published => unreachable!("handled above"),
    };
    let what = match &request {
        Request::Deploy { service, version, environment, .. } => {
            format!("deploy {service} {version} in {}", environment.as_deref().unwrap_or("the only environment"))
        }
        Request::Run { jobs, environment } => format!("run {} in {}", jobs.join(", "), environment.as_deref().unwrap_or("the only environment")),
        Request::Rollback { service, .. } => format!("roll {service} back"),
    };
    let sub = s.submitter.submit_by(request, req.id, payload, caller.name.as_ref().map(|_| caller.actor())).await?;
    let status = if sub.duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
    let note = audit::AuditNote(format!("{what} → deployment {}{}", sub.deployment_id, if sub.duplicate { " (a repeated request)" } else { "" }));
    // The event is accepted: a failed read here only leaves the audit
    // row without its environment.
    let environment = s.store.deployment(sub.deployment_id).await.ok().flatten().map(|d| audit::AuditEnvironment(d.environment));
    Ok((
        status,
        axum::Extension(note),
        environment.map(axum::Extension),
        Json(EventAccepted { event_id: sub.event_id, deployment_id: sub.deployment_id, duplicate: sub.duplicate, superseded: sub.superseded }),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// At most this many, newest first (default 50, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only deployments in this state.
    #[param(value_type = Option<DeploymentState>)]
    state: Option<String>,
}

/// Deployments, newest first.
#[utoipa::path(get, path = "/api/v1/deployments", params(ListQuery), responses((status = 200, description = "Those the token may read, of the newest `limit`", body = Vec<Deployment>)))]
async fn list_deployments(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Deployment>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let state = match q.state.as_deref() {
        None => None,
        Some(st) => Some(DeploymentState::parse(st).ok_or_else(|| {
            ApiError::bad_request(format!("unknown state {st:?}; one of: {}", DeploymentState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")))
        })?),
    };
    // Of the newest `limit`, those in environments the caller may read.
    let rows = s.store.deployments(limit, state).await?;
    let rows: Vec<_> = rows.into_iter().filter(|d| caller.may(auth::Need::Read, Some(&d.environment))).collect();
    Ok(Json(with_causes(&s, rows).await?))
}

/// Deployments with what each was, where not a plain deploy or run
/// (`Deployment::cause`), read from the event each came from: one query
/// for the lot (the dashboard polls this).
async fn with_causes(s: &AppState, rows: Vec<crate::store::DeploymentRow>) -> ApiResult<Vec<Deployment>> {
    let ids: Vec<i64> = rows.iter().map(|d| d.event_id).collect();
    let events: std::collections::HashMap<i64, crate::store::EventRow> = s.store.events_by_id(&ids).await?.into_iter().map(|e| (e.id, e)).collect();
    let mut out = Vec::with_capacity(rows.len());
    for d in rows {
        let mut cause = events.get(&d.event_id).and_then(cause_of);
        // A deployment submitted again at a newer revision carries its
        // promotion in its hold, not in its event.
        if cause.is_none() && events.get(&d.event_id).is_some_and(|e| e.kind == crate::submit::RESUBMIT_EVENT) {
            cause = s.store.hold(d.id).await?.and_then(|h| h.source_environment).map(|from| format!("promotion from {from}"));
        }
        let mut w = Deployment::from(d);
        w.cause = cause;
        out.push(w);
    }
    Ok(out)
}

/// What a deployment's event says it was: a rollback, a promotion (by the
/// gate loop, or asked for), a config change; None for a plain request.
fn cause_of(e: &crate::store::EventRow) -> Option<String> {
    let payload: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
    if e.kind == crate::submit::ROLLBACK_EVENT || payload["kind"] == "rollback" {
        return Some("rollback".into());
    }
    if e.kind.starts_with("revision:") {
        return Some("config change".into());
    }
    if e.kind.starts_with("promote:") || payload["kind"] == "promote" {
        return Some(format!("promotion from {}", payload["from"].as_str().unwrap_or("another environment")));
    }
    None
}

/// A deployment the caller may read (404 if none, 403 if its environment
/// is not the caller's).
async fn readable(s: &AppState, caller: &auth::Caller, id: i64) -> ApiResult<crate::store::DeploymentRow> {
    let d = deployment_or_404(s, id).await?;
    caller.require(auth::Need::Read, Some(&d.environment))?;
    Ok(d)
}

async fn deployment_or_404(s: &AppState, id: i64) -> ApiResult<crate::store::DeploymentRow> {
    s.store.deployment(id).await?.ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DetailQuery {
    /// With `after`: answer as soon as the deployment changes after that
    /// point, or after this many milliseconds (at most 2000), whichever
    /// comes first. Changes made on another node are seen only then.
    #[param(minimum = 0, maximum = 2000)]
    wait_ms: Option<i64>,
    /// The `seq` of the detail the caller has.
    #[param(minimum = 0)]
    after: Option<i64>,
}

/// One deployment with its jobs and every attempt.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", params(("id" = i64, Path, description = "The deployment"), DetailQuery),
    responses((status = 200, description = "The deployment, its jobs and their attempts", body = DeploymentDetail), (status = 400, description = "A bad query", body = ErrorBody), (status = 404, description = "No such deployment", body = ErrorBody)))]
async fn get_deployment(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    id: Result<Path<i64>, PathRejection>,
    query: Result<Query<DetailQuery>, QueryRejection>,
) -> ApiResult<Json<DeploymentDetail>> {
    let Path(id) = id?;
    let Query(q) = query?;
    // int64 in the document (a larger number is refused when parsed);
    // the range is checked here.
    let max_wait = changes::MAX_WAIT.as_millis();
    let wait_ms = q
        .wait_ms
        .map(|w| {
            u64::try_from(w)
                .ok()
                .filter(|w| u128::from(*w) <= max_wait)
                .ok_or_else(|| ApiError::bad_request(format!("wait_ms: between 0 and {max_wait} (milliseconds), not {w}")))
        })
        .transpose()?;
    let after = q
        .after
        .map(|a| u64::try_from(a).map_err(|_| ApiError::bad_request(format!("after: a `seq` from an earlier answer (0 or more), not {a}"))))
        .transpose()?;
    // The number is read before the rows: a change after it may or may
    // not be in them, and the next wait then answers at once (never the
    // reverse: a change in no answer and not waited for).
    let mut seq = s.changes.seq();
    let mut d = readable(&s, &caller, id).await?;
    if let (Some(wait), Some(after)) = (wait_ms, after)
        && !d.state.is_terminal()
    {
        s.changes.wait(id, after, Duration::from_millis(wait)).await;
        seq = s.changes.seq();
        d = readable(&s, &caller, id).await?;
    }
    let jobs = s.store.jobs(id).await?.into_iter().map(Job::from).collect();
    let attempts = s.store.attempts(id).await?.into_iter().map(Attempt::from).collect();
    let d = with_causes(&s, vec![d]).await?.pop().ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
    Ok(Json(DeploymentDetail { seq, ..DeploymentDetail::new(d, jobs, attempts) }))
}

/// The jobs of a deployment.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/jobs", params(("id" = i64, Path, description = "The deployment")),
    responses((status = 200, description = "Its jobs", body = Vec<Job>), (status = 404, description = "No such deployment", body = ErrorBody)))]
async fn list_jobs(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Vec<Job>>> {
    let Path(id) = id?;
    readable(&s, &caller, id).await?;
    Ok(Json(s.store.jobs(id).await?.into_iter().map(Job::from).collect()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Only this job's lines.
    #[param(value_type = Option<Name>)]
    job: Option<String>,
    /// Lines after this `seq` (default 0: from the start).
    after: Option<i64>,
    /// At most this many lines (default 1000, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// Stored output of a deployment's jobs.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/logs", params(("id" = i64, Path, description = "The deployment"), LogQuery),
    responses((status = 200, description = "Its stored output, oldest first", body = Vec<LogLine>), (status = 404, description = "No such deployment", body = ErrorBody)))]
async fn get_logs(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    id: Result<Path<i64>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<LogLine>>> {
    let Path(id) = id?;
    let Query(q) = q?;
    check_job_filter(q.job.as_deref())?;
    readable(&s, &caller, id).await?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 10000"));
    }
    let lines = s.store.logs(id, q.job.as_deref(), q.after.unwrap_or(0), limit).await?;
    Ok(Json(lines.into_iter().map(LogLine::from).collect()))
}

/// A `job` filter that cannot name a job is bad input, not a query: a
/// NUL byte in it would fail PostgreSQL's query (found by schemathesis).
fn check_job_filter(job: Option<&str>) -> Result<(), ApiError> {
    match job {
        Some(j) if !crate::config::valid_name(j) => {
            Err(ApiError::bad_request(format!("job {j:?} is not a job name (letters, digits, '-', '_', '.'; at most 64)")))
        }
        _ => Ok(()),
    }
}

/// Follow a deployment's output as server-sent events: `line` events
/// (data: a LogLine, id: its seq), then one `end` event (data: the
/// deployment) once it is over and every line was sent.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/logs/stream",
    params(("id" = i64, Path, description = "The deployment"), ("job" = Option<Name>, Query, description = "Only this job's lines"),
           ("after" = Option<i64>, Query, description = "Lines after this `seq` (default 0: from the start)"),
           ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "A reconnecting client resumes after this `seq` (before `after`); anything but an integer is ignored")),
    responses((status = 200, description = "Server-sent events: `line` (data: a LogLine, id: its seq), `error` (data: why the store could not be read; the stream goes on), and last `end` (data: the Deployment)",
               content_type = "text/event-stream", body = SseEventInfo),
              (status = 404, description = "No such deployment", body = ErrorBody)))]
async fn stream_logs(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    id: Result<Path<i64>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let Path(id) = id?;
    let Query(q) = q?;
    check_job_filter(q.job.as_deref())?;
    readable(&s, &caller, id).await?;
    // A reconnecting EventSource resumes where it stopped.
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let mut after = resume.or(q.after).unwrap_or(0);
    let job = q.job.clone();
    let store = s.store.clone();
    let stream = async_stream(move |tx| async move {
        // Set once the deployment is over: one more read (the last output
        // is flushed shortly after the last job ends), then the end event.
        let mut ended = None;
        loop {
            // A client that left is noticed even while nothing is sent.
            if tx.is_closed() {
                return;
            }
            let lines = match store.logs(id, job.as_deref(), after, 500).await {
                Ok(l) => l,
                Err(e) => {
                    if tx.send(SseEvent::default().event("error").data(e.to_string())).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let got = lines.len();
            for l in lines {
                after = l.seq;
                let data = serde_json::to_string(&LogLine::from(l)).unwrap_or_default();
                if tx.send(SseEvent::default().event("line").id(after.to_string()).data(data)).await.is_err() {
                    return;
                }
            }
            if got == 500 {
                continue;
            }
            if let Some(d) = ended.take() {
                let data = serde_json::to_string(&Deployment::from(d)).unwrap_or_default();
                let _ = tx.send(SseEvent::default().event("end").data(data)).await;
                return;
            }
            match store.deployment(id).await {
                Ok(Some(d)) if d.state.is_terminal() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    ended = Some(d);
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A stream fed by a task through a small channel; the task stops when the
/// client goes away (its sends fail).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

/// Cancel a deployment: queued ones end at once, running jobs are stopped
/// (their process groups killed), pending jobs never start.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/cancel", params(("id" = i64, Path, description = "The deployment")),
    responses((status = 202, description = "Cancelled (queued, waiting) or being cancelled (running)", body = Deployment), (status = 404, description = "No such deployment", body = ErrorBody),
              (status = 409, description = "It has already ended", body = ErrorBody)))]
async fn cancel_deployment(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let before = deployment_or_404(&s, id).await?;
    caller.require(auth::Need::Deploy, Some(&before.environment))?;
    if before.state.is_terminal() {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("deployment {id} is already {}; nothing to cancel", before.state)));
    }
    let d = s.store.cancel(id).await?.ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
    if let Some(w) = &s.submitter.wake {
        w.work_changed();
    }
    // Ended by the cancel itself (it was queued or waiting, or nothing of
    // it was running): no scheduler will report its end, so this does.
    if d.state.is_terminal()
        && let Some(bus) = &s.submitter.events
    {
        bus.emit(crate::events::Event::DeploymentFinished { deployment: id, state: d.state }).await;
    }
    Ok((StatusCode::ACCEPTED, axum::Extension(audit::AuditNote(format!("cancel deployment {id}"))), Json(Deployment::from(d))))
}

/// Every service with a recorded version, per environment, with its live
/// instances on this node and its newest deployment.
#[utoipa::path(get, path = "/api/v1/services", responses((status = 200, description = "Those in environments the token may read", body = Vec<ServiceInfo>)))]
async fn list_services(State(s): State<Arc<AppState>>, axum::Extension(caller): axum::Extension<auth::Caller>) -> ApiResult<Json<Vec<ServiceInfo>>> {
    let mut rows = s.store.services().await?;
    rows.retain(|r| caller.may(auth::Need::Read, Some(&r.environment)));
    let live = match &s.services {
        Some(m) => m.status().await,
        None => vec![],
    };
    let recent = s.store.deployments(500, None).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| {
                let here = live.iter().find(|l| l.environment == r.environment && l.service == r.service);
                let last =
                    recent.iter().find(|d| d.environment == r.environment && d.service.as_deref() == Some(r.service.as_str())).cloned().map(Deployment::from);
                ServiceInfo {
                    listen: here.map(|h| h.listen.to_string()),
                    instances: here
                        .map(|h| {
                            h.instances.iter().map(|(a, id, running)| InstanceInfo { address: a.to_string(), id: id.clone(), running: *running }).collect()
                        })
                        .unwrap_or_default(),
                    restarts: here.map(|h| h.restarts).unwrap_or(0),
                    last_deployment: last,
                    environment: r.environment,
                    service: r.service,
                    version: r.version,
                    previous_version: r.previous_version,
                    digest: r.sha256.map(|h| format!("sha256:{h}")),
                    runs: r.target_ref,
                    revision: r.revision,
                    deployment_id: r.deployment_id,
                    updated_at: r.updated_at,
                }
            })
            .collect(),
    ))
}

/// Return a service to the version it ran before its current one (only
/// its rollout runs; migrations go forward only).
#[utoipa::path(post, path = "/api/v1/services/{environment}/{service}/rollback", params(("environment" = Name, Path), ("service" = Name, Path)),
    responses((status = 202, description = "The rollback's deployment", body = EventAccepted), (status = 400, description = "Bad names, or the service has no recorded version there", body = ErrorBody),
              (status = 409, description = "No earlier version to return to", body = ErrorBody), (status = 422, description = "The config on disk is invalid: nothing was started", body = ErrorBody)))]
async fn rollback_service(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path((environment, service)) = p?;
    caller.require(auth::Need::Deploy, Some(&environment))?;
    if !crate::config::valid_name(&environment) || !crate::config::valid_name(&service) {
        return Err(ApiError::bad_request("invalid environment or service name"));
    }
    let payload = serde_json::json!({ "kind": "rollback", "service": service, "environment": environment }).to_string();
    let note = audit::AuditNote(format!("roll {service} back in {environment}"));
    let sub = s.submitter.submit(Request::Rollback { service, environment: Some(environment) }, None, payload).await?;
    let note = audit::AuditNote(format!("{} → deployment {}", note.0, sub.deployment_id));
    Ok((
        StatusCode::ACCEPTED,
        axum::Extension(note),
        Json(EventAccepted { event_id: sub.event_id, deployment_id: sub.deployment_id, duplicate: sub.duplicate, superseded: sub.superseded }),
    ))
}

/// A service's events outside deployments (crashes, restarts, restores),
/// newest first.
#[utoipa::path(get, path = "/api/v1/services/{environment}/{service}/events", params(("environment" = Name, Path), ("service" = Name, Path)),
    responses((status = 200, description = "At most 200, newest first", body = Vec<ServiceEventInfo>)))]
async fn service_events(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<Vec<ServiceEventInfo>>> {
    let Path((environment, service)) = p?;
    if !crate::config::valid_name(&environment) || !crate::config::valid_name(&service) {
        return Err(ApiError::bad_request("invalid environment or service name"));
    }
    caller.require(auth::Need::Read, Some(&environment))?;
    let events = s.store.service_events(&environment, &service, 200).await?;
    Ok(Json(events.into_iter().map(|e| ServiceEventInfo { at: e.at, kind: e.kind, message: e.message }).collect()))
}

/// What `slipway gc` would remove: orphaned containers and unused images
/// (a dry run).
#[utoipa::path(get, path = "/api/v1/gc", responses((status = 200, description = "What would go", body = GarbageInfo), (status = 503, description = "The store, or this node's targets (the Docker Engine), cannot be asked; or this node runs no services", body = ErrorBody)))]
async fn gc_plan(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<GarbageInfo>)> {
    caller.require(auth::Need::Read, None)?;
    gc(&s, false).await
}

/// Remove what `GET /api/v1/gc` lists; answers with what is gone.
#[utoipa::path(post, path = "/api/v1/gc", responses((status = 200, description = "What is gone", body = GarbageInfo), (status = 503, description = "The store, or this node's targets (the Docker Engine), cannot be asked; or this node runs no services", body = ErrorBody)))]
async fn gc_apply(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<GarbageInfo>)> {
    caller.require(auth::Need::Admin, None)?;
    gc(&s, true).await
}

async fn gc(s: &AppState, apply: bool) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<GarbageInfo>)> {
    let Some(m) = &s.services else { return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "this node runs no services")) };
    // In its own task: a client that gives up must not cut a removal short.
    let m = m.clone();
    let report = tokio::spawn(async move { m.garbage(apply).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("gc stopped: {e}")))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    let note = audit::AuditNote(format!(
        "gc{}: {} container(s), {} image(s)",
        if apply { " --apply" } else { "" },
        report.garbage.containers.len(),
        report.garbage.images.len()
    ));
    Ok((axum::Extension(note), Json(report.into())))
}

/// What registry tag retention would delete (a dry run): per repository
/// under `keep_tags`, the tags kept and why, the manifests to delete.
#[utoipa::path(get, path = "/api/v1/retention", responses((status = 200, description = "What would be deleted, per repository (a registry's failure is in its `errors`)", body = RetentionInfo), (status = 422, description = "The config on disk is invalid", body = ErrorBody)))]
async fn retention_plan(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<RetentionInfo>)> {
    // It spans every environment's records.
    caller.require(auth::Need::Read, None)?;
    retention(&s, false).await
}

/// Delete what `GET /api/v1/retention` lists, from the registries;
/// answers with what is gone. Needs admin for `*`.
#[utoipa::path(post, path = "/api/v1/retention", responses((status = 200, description = "What was deleted, per repository (a registry's failure is in its `errors`)", body = RetentionInfo), (status = 422, description = "The config on disk is invalid", body = ErrorBody)))]
async fn retention_apply(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<RetentionInfo>)> {
    caller.require(auth::Need::Admin, None)?;
    retention(&s, true).await
}

async fn retention(s: &AppState, apply: bool) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<RetentionInfo>)> {
    let loaded = s.submitter.config().await?;
    let store = s.store.clone();
    // Images kept in a target's own registry (ECR) are reached through
    // that target: this node's, or (a node running no services) one built
    // for the call.
    let targets = match &s.services {
        Some(m) => m.targets().clone(),
        None => Arc::new(crate::targets::Targets::new(crate::targets::NodeContext::default())),
    };
    // In its own task: a client that gives up must not cut deletes short.
    let report = tokio::spawn(async move { crate::retention::run(&loaded.config, store.as_ref(), apply, &targets).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("retention stopped: {e}")))??;
    let deleted: usize = report.repositories.iter().map(|r| r.deleted.len()).sum();
    let planned: usize = report.repositories.iter().map(|r| r.delete.len()).sum();
    let errors: usize = report.repositories.iter().map(|r| r.errors.len()).sum();
    let note = if apply {
        format!("retention --apply: {deleted} of {planned} manifest(s) deleted in {} repositories, {errors} error(s)", report.repositories.len())
    } else {
        format!("retention: {planned} manifest(s) to delete in {} repositories, {errors} error(s)", report.repositories.len())
    };
    Ok((axum::Extension(audit::AuditNote(note)), Json(report.into())))
}

/// Why the service runs the version it runs and not the newest seen.
#[utoipa::path(get, path = "/api/v1/services/{environment}/{service}/why", params(("environment" = Name, Path), ("service" = Name, Path)),
    responses((status = 200, description = "The answer", body = WhyInfo)))]
async fn why_service(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<WhyInfo>> {
    let Path((environment, service)) = p?;
    if !crate::config::valid_name(&environment) || !crate::config::valid_name(&service) {
        return Err(ApiError::bad_request("invalid environment or service name"));
    }
    caller.require(auth::Need::Read, Some(&environment))?;
    let rows = s.store.services().await?;
    let running = rows.iter().find(|r| r.environment == environment && r.service == service);
    let deployments = s.store.deployments(1000, None).await?;
    let events = s.store.events(&["github.", "registry.", "published"], 1000).await?;
    // Which of its deployments were promotions: the automatic ones by
    // their events, gated ones (a manual promote too) by their holds.
    let mut promoted = crate::why::Promoted::new();
    for e in s.store.events_of_kind(&format!("promote:{environment}:{service}:"), 100).await? {
        let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
        if let (Some(d), Some(from)) = (e.deployment_id, v["from"].as_str()) {
            promoted.insert(d, (from.to_string(), v["source_deployment"].as_i64()));
        }
    }
    for d in deployments.iter().filter(|d| d.environment == environment && d.service.as_deref() == Some(service.as_str())).take(20) {
        if !promoted.contains_key(&d.id)
            && let Some(h) = s.store.hold(d.id).await?
            && let Some(from) = h.source_environment
        {
            promoted.insert(d.id, (from, h.source_deployment));
        }
    }
    let rollbacks: crate::why::Rollbacks =
        s.store.events_of_kind(crate::submit::ROLLBACK_EVENT, 1000).await?.into_iter().filter_map(|e| e.deployment_id).collect();
    let e = crate::why::explain(&environment, &service, running, &deployments, &events, &promoted, &rollbacks);
    Ok(Json(WhyInfo { environment, service, running: e.running, newest: e.newest, verdict: e.verdict, history: e.history }))
}

/// The audit log, newest first: every request that changed something (or
/// tried to), who sent it, from where, what it meant, what came of it.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery),
    responses((status = 200, description = "Entries, newest first", body = Vec<AuditInfo>), (status = 400, description = "A bad environment name", body = ErrorBody)))]
async fn list_audit(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<AuditInfo>>> {
    let Query(q) = q?;
    // It spans every environment (and names tokens and addresses).
    caller.require(auth::Need::Read, None)?;
    // An empty value filters nothing (a form left blank).
    let environment = q.environment.filter(|e| !e.is_empty());
    if let Some(env) = environment.as_deref().filter(|e| !crate::config::valid_name(e)) {
        return Err(ApiError::bad_request(format!("environment {env:?} is not a valid name")));
    }
    let filter = crate::store::AuditFilter { environment, actor: q.actor.filter(|a| !a.is_empty()) };
    let rows = s.store.audit_filtered(&filter, q.limit.unwrap_or(50).clamp(1, 1000)).await?;
    Ok(Json(
        rows.into_iter()
            .map(|a| AuditInfo {
                id: a.id,
                at: a.at,
                actor: a.actor,
                address: a.address,
                action: a.action,
                detail: a.detail,
                status: a.status as u16,
                environment: a.environment,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// At most this many, newest first (default 50; below 1 counts as 1, above 1000 as 1000).
    limit: Option<i64>,
    /// Only entries that acted in this environment (empty: every one).
    #[param(value_type = Option<NameFilter>)]
    environment: Option<String>,
    /// Only entries of this actor, as the log names it ("token alice").
    actor: Option<String>,
}

/// Who the API takes the caller for: the token's name and roles, or an
/// open API (no token exists yet). The dashboard shows the buttons these
/// roles allow; the API checks them again on every request.
#[utoipa::path(get, path = "/api/v1/whoami", responses((status = 200, description = "The caller", body = WhoAmI), (status = 401, description = "No token, or an unknown one", body = ErrorBody)))]
async fn whoami(axum::Extension(caller): axum::Extension<auth::Caller>) -> Json<WhoAmI> {
    Json(WhoAmI { open: caller.name.is_none(), actor: caller.actor(), name: caller.name.clone(), roles: caller.roles.clone() })
}

/// Create an API token; the answer holds the token, shown this once. The
/// very first token (none exists yet) must be an admin token for every
/// environment, asked for from this host.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = TokenRequest,
    responses((status = 201, description = "The token, shown this once", body = TokenCreated),
              (status = 400, description = "A bad name or roles (roles for environments the config does not define included), or a first token that is not an admin token for \"*\"", body = ErrorBody),
              (status = 403, description = "Not an admin token for \"*\", or a first token asked for from elsewhere than this host", body = ErrorBody),
              (status = 409, description = "A token of that name exists (revoked ones included)", body = ErrorBody)))]
async fn create_token(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    addr: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body?;
    if caller.name.is_none() {
        if !auth::from_loopback(addr.as_ref().map(|a| &a.0), &headers) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the first token can only be created from the Slipway host itself, not through a proxy (`slipway token create` on it)",
            ));
        }
        if req.roles.get("*") != Some(&auth::Role::Admin) {
            return Err(ApiError::bad_request("the first token must be an admin token for every environment: --role '*=admin'"));
        }
    } else {
        caller.require(auth::Need::Admin, None)?;
    }
    if !crate::config::valid_name(&req.name) {
        return Err(ApiError::bad_request(format!("invalid token name {:?}", req.name)));
    }
    if req.roles.is_empty() || req.roles.keys().any(|e| e != "*" && !crate::config::valid_name(e)) {
        return Err(ApiError::bad_request("a token needs roles: environment (or \"*\") → viewer, deployer, approver or admin"));
    }
    if req.roles.keys().any(|e| e != "*") {
        let known = s.submitter.config().await?.config.environment_names();
        auth::check_roles(&req.roles, &known).map_err(ApiError::bad_request)?;
    }
    let token = auth::generate();
    let row = crate::store::TokenRow {
        name: req.name.clone(),
        hash: auth::hash(&token),
        roles: serde_json::to_string(&req.roles).unwrap_or_default(),
        created_at: crate::store::now_ms(),
        revoked_at: None,
    };
    if !s.store.create_token(row).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("a token named {:?} exists", req.name)));
    }
    let note = audit::AuditNote(format!("create token {} with roles {}", req.name, serde_json::to_string(&req.roles).unwrap_or_default()));
    Ok((StatusCode::CREATED, axum::Extension(note), Json(TokenCreated { name: req.name, token, roles: req.roles })))
}

/// Every token (never the token itself), revoked ones included.
#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, description = "Every token, revoked ones included", body = Vec<TokenInfo>)))]
async fn list_tokens(State(s): State<Arc<AppState>>, axum::Extension(caller): axum::Extension<auth::Caller>) -> ApiResult<Json<Vec<TokenInfo>>> {
    caller.require(auth::Need::Admin, None)?;
    let rows = s.store.tokens().await?;
    Ok(Json(
        rows.into_iter()
            .map(|t| TokenInfo { name: t.name, roles: serde_json::from_str(&t.roles).unwrap_or_default(), created_at: t.created_at, revoked_at: t.revoked_at })
            .collect(),
    ))
}

/// Revoke a token: requests with it get 401 from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", params(("name" = String, Path, description = "The token's name")),
    responses((status = 200, description = "Revoked", body = TokenRevoked), (status = 404, description = "No live token of that name", body = ErrorBody),
              (status = 409, description = "The last live admin token for every environment (\"*\"): create another one first", body = ErrorBody)))]
async fn revoke_token(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(name) = name?;
    caller.require(auth::Need::Admin, None)?;
    match s.store.revoke_token(&name).await? {
        crate::store::Revoked::Revoked => {}
        crate::store::Revoked::NoSuchToken => return Err(ApiError::not_found(format!("no live token named {name:?}"))),
        crate::store::Revoked::LastAdmin => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "token {name:?} is the last live admin token for every environment (\"*\"): without it no token could be created or revoked again. Create another admin token first (`slipway token create NAME --role '*=admin'`), then revoke this one"
                ),
            ));
        }
    }
    Ok((axum::Extension(audit::AuditNote(format!("revoke token {name}"))), Json(TokenRevoked { revoked: name })))
}

/// Every host of every target's groups (`[[hosts]]`), asked now: reachable
/// or why not, its host key, whether it is drained, what runs on it.
#[utoipa::path(get, path = "/api/v1/hosts", responses((status = 200, description = "The hosts, by group", body = Vec<HostInfo>), (status = 422, description = "The config on disk is invalid", body = ErrorBody)))]
async fn list_hosts(State(s): State<Arc<AppState>>) -> ApiResult<Json<Vec<HostInfo>>> {
    let Some(m) = &s.services else { return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "this node runs no targets")) };
    let loaded = s.submitter.config().await?;
    let mut hosts = Vec::new();
    for kind in crate::targets::kinds() {
        let Some(tables) = loaded.config.targets.get(kind.name()).filter(|t| !t.is_empty()) else { continue };
        let target = m.targets().get(kind.name()).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.message))?;
        hosts.extend(target.machines(tables).await.into_iter().map(|h| HostInfo::of(kind.name(), h)));
    }
    Ok(Json(hosts))
}

/// Take a host out of service: rollouts pass it by and its proxies take
/// no new connections (in-flight requests finish).
#[utoipa::path(post, path = "/api/v1/hosts/{host}/drain", params(("host" = HostName, Path, description = "The host's name or address")),
    responses((status = 200, description = "Drained", body = HostDrained), (status = 404, description = "No such host", body = ErrorBody), (status = 503, description = "The host cannot be reached", body = ErrorBody)))]
async fn drain_host(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    Path(host): Path<String>,
) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<HostDrained>)> {
    set_drained(&s, &caller, host, true).await
}

/// Put a drained host back in service.
#[utoipa::path(post, path = "/api/v1/hosts/{host}/undrain", params(("host" = HostName, Path, description = "The host's name or address")),
    responses((status = 200, description = "Back in service", body = HostDrained), (status = 404, description = "No such host", body = ErrorBody), (status = 503, description = "The host cannot be reached", body = ErrorBody)))]
async fn undrain_host(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    Path(host): Path<String>,
) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<HostDrained>)> {
    set_drained(&s, &caller, host, false).await
}

/// A host named in a path: the characters a host's name or address in the
/// config may hold (the document states it as [`HOST_PATTERN`]).
fn valid_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= 255 && host.chars().all(|c| c.is_ascii_alphanumeric() || "-._:[]".contains(c))
}

async fn set_drained(s: &AppState, caller: &auth::Caller, host: String, drained: bool) -> ApiResult<(axum::Extension<audit::AuditNote>, Json<HostDrained>)> {
    caller.require(auth::Need::Deploy, None)?;
    if !valid_host(&host) {
        return Err(ApiError::bad_request("invalid host name"));
    }
    let Some(m) = &s.services else { return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "this node runs no targets")) };
    let loaded = s.submitter.config().await?;
    let mut last = None;
    for kind in crate::targets::kinds() {
        let Some(tables) = loaded.config.targets.get(kind.name()).filter(|t| !t.is_empty()) else { continue };
        let target = m.targets().get(kind.name()).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.message))?;
        match target.drain(tables, &host, drained).await {
            Ok(said) => {
                let note = audit::AuditNote(format!("{} host {host}", if drained { "drain" } else { "undrain" }));
                return Ok((axum::Extension(note), Json(HostDrained { host, drained, message: said })));
            }
            Err(e) if e.kind == crate::targets::TargetErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.message)),
        }
    }
    Err(ApiError::not_found(last.map(|e| e.message).unwrap_or_else(|| format!("no host {host:?} in any [[hosts]] group"))))
}

/// Nodes that share this store, most recently seen first.
#[utoipa::path(get, path = "/api/v1/nodes", responses((status = 200, description = "The nodes", body = Vec<Node>)))]
async fn list_nodes(State(s): State<Arc<AppState>>) -> ApiResult<Json<Vec<Node>>> {
    Ok(Json(s.store.nodes().await?.into_iter().map(|n| Node { id: n.id, started_at: n.started_at, heartbeat_at: n.heartbeat_at }).collect()))
}
