//! Gates and config revisions over HTTP: pending approvals, approving,
//! promoting, and an environment's commits from git.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::audit::AuditNote;
use super::wire::{ApprovalInfo, EnvironmentInfo, ErrorBody, EventAccepted, Name, PromoteRequest, RevisionInfo};
use super::{ApiError, ApiResult, AppState, auth, deployment_or_404};

/// Deployments waiting at a gate (approval, soak, deploy window), oldest
/// first.
#[utoipa::path(get, path = "/api/v1/approvals", responses((status = 200, description = "Those in environments the token may read", body = Vec<ApprovalInfo>)))]
pub(super) async fn list_approvals(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> ApiResult<Json<Vec<ApprovalInfo>>> {
    let mut holds = s.store.holds().await?;
    holds.retain(|(d, _)| caller.may(auth::Need::Read, Some(&d.environment)));
    Ok(Json(holds.into_iter().map(ApprovalInfo::from).collect()))
}

/// Approve a waiting deployment. Needs the approver (or admin) role for
/// its environment; it starts once its other gates pass too.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/approve", params(("id" = i64, Path, description = "The deployment")),
    responses((status = 200, description = "Approved: what it still waits for", body = ApprovalInfo),
              (status = 403, description = "No approver role there, the approver asked for the deployment, or no token at all (an approval is never anonymous)", body = ErrorBody),
              (status = 404, description = "No such deployment", body = ErrorBody),
              (status = 409, description = "It does not wait for an approval (none needed, already approved, or not waiting)", body = ErrorBody),
              (status = 422, description = "The config on disk is invalid", body = ErrorBody)))]
pub(super) async fn approve(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let d = deployment_or_404(&s, id).await?;
    caller.require(auth::Need::Approve, Some(&d.environment))?;
    let by = caller.actor();
    // Four eyes: whoever asked for a deployment does not approve it.
    if caller.name.is_some() && s.store.hold(id).await?.and_then(|h| h.requested_by).is_some_and(|r| r == by) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("{by} asked for deployment {id}: another approver must approve it")));
    }
    if !s.store.approve(id, &by).await? {
        let hold = s.store.hold(id).await?;
        let why = match (d.state, hold) {
            (crate::store::DeploymentState::Waiting, Some(h)) if h.approved_by.is_some() => {
                format!("deployment {id} was already approved by {}", h.approved_by.unwrap_or_default())
            }
            (crate::store::DeploymentState::Waiting, _) => {
                format!("deployment {id} needs no approval ({})", d.reason.as_deref().unwrap_or("it waits for other gates"))
            }
            (state, _) => format!("deployment {id} is {state}, not waiting for an approval"),
        };
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", why));
    }
    let mut hold = s.store.hold(id).await?.unwrap_or_default();
    // Say at once what it still waits for (the gate loop would, within a
    // second): an approval that was the last gate releases it there.
    let config = s.submitter.config().await?.config;
    if let Some(w) = crate::gate::waits(&hold, config.environment(&d.environment), crate::store::now_ms()) {
        let text = format!("waiting for {}", w.join("; "));
        s.store.set_waiting_for(id, &text).await?;
        hold.waiting_for = Some(text);
    } else {
        hold.waiting_for = None;
    }
    let d = deployment_or_404(&s, id).await?;
    let note =
        AuditNote(format!("approve deployment {id} ({} {} in {})", d.service.as_deref().unwrap_or("jobs"), d.version.as_deref().unwrap_or(""), d.environment));
    Ok((StatusCode::OK, axum::Extension(note), Json(ApprovalInfo::from((d, hold)))))
}

/// Deploy the version (and digest) a service runs in `from` to this
/// environment. Needs the deployer role here; gates of this environment
/// apply (soak, approval, windows).
#[utoipa::path(post, path = "/api/v1/services/{environment}/{service}/promote", params(("environment" = Name, Path), ("service" = Name, Path)), request_body = PromoteRequest,
    responses((status = 202, description = "The promotion's deployment", body = EventAccepted),
              (status = 400, description = "Bad names, an unknown environment, or one that promotes from elsewhere", body = ErrorBody),
              (status = 409, description = "The service has never been deployed to `from`", body = ErrorBody),
              (status = 422, description = "The config on disk is invalid", body = ErrorBody)))]
pub(super) async fn promote(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<PromoteRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path((environment, service)) = p?;
    let Json(req) = body?;
    caller.require(auth::Need::Deploy, Some(&environment))?;
    let payload = serde_json::json!({ "kind": "promote", "service": service, "from": req.from, "to": environment, "by": caller.actor() }).to_string();
    let origin = crate::submit::Origin { payload, actor: caller.name.as_ref().map(|_| caller.actor()), ..Default::default() };
    let sub = s.submitter.promote(&service, &req.from, &environment, origin).await?;
    let d = s.store.deployment(sub.deployment_id).await?;
    let note = AuditNote(format!(
        "promote {service} {} from {} to {environment} → deployment {}{}",
        d.as_ref().and_then(|d| d.version.clone()).unwrap_or_default(),
        req.from,
        sub.deployment_id,
        d.as_ref().and_then(|d| d.reason.clone()).map(|r| format!(" ({r})")).unwrap_or_default()
    ));
    Ok((
        StatusCode::ACCEPTED,
        axum::Extension(note),
        Json(EventAccepted { event_id: sub.event_id, deployment_id: sub.deployment_id, duplicate: sub.duplicate, superseded: sub.superseded }),
    ))
}

/// The commits of an environment's config branch Slipway has decided on,
/// newest first (accepted ones run their touched jobs; rejected ones say
/// why).
#[utoipa::path(get, path = "/api/v1/environments/{environment}/revisions", params(("environment" = Name, Path)),
    responses((status = 200, description = "At most 100, newest first (none for an environment whose config is not from git)", body = Vec<RevisionInfo>)))]
pub(super) async fn list_revisions(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Vec<RevisionInfo>>> {
    let Path(environment) = p?;
    caller.require(auth::Need::Read, Some(&environment))?;
    if !crate::config::valid_name(&environment) {
        return Err(ApiError::bad_request("invalid environment name"));
    }
    Ok(Json(s.submitter.revisions(&environment, 100).await?.into_iter().map(RevisionInfo::from).collect()))
}

/// Fetch the environment's branch now and decide on its head (what a
/// push webhook or a poll does).
#[utoipa::path(post, path = "/api/v1/environments/{environment}/revisions/check", params(("environment" = Name, Path)),
    responses((status = 200, description = "What became of the branch's head", body = RevisionInfo),
              (status = 400, description = "A bad name, or an environment that does not take its config from git", body = ErrorBody),
              (status = 409, description = "The head is older than the accepted commit", body = ErrorBody),
              (status = 422, description = "The config on disk is invalid", body = ErrorBody),
              (status = 503, description = "The store, or the git fetch, failed: try again", body = ErrorBody)))]
pub(super) async fn check_revision(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(environment) = p?;
    caller.require(auth::Need::Deploy, Some(&environment))?;
    if !crate::config::valid_name(&environment) {
        return Err(ApiError::bad_request("invalid environment name"));
    }
    let r = s.submitter.check_revision(&environment).await?;
    let note = AuditNote(format!(
        "check config of {environment}: {} {}{}",
        r.short(),
        r.state,
        r.deployment.map(|d| format!(" → deployment {d}")).unwrap_or_default()
    ));
    Ok((axum::Extension(note), Json(RevisionInfo::from(r))))
}

/// The environments of the node's config: config source, gates, and the
/// commit each git-configured one runs.
#[utoipa::path(get, path = "/api/v1/environments", responses((status = 200, description = "Those the token may read", body = Vec<EnvironmentInfo>), (status = 422, description = "The config on disk is invalid", body = ErrorBody)))]
pub(super) async fn list_environments(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> ApiResult<Json<Vec<EnvironmentInfo>>> {
    let config = s.submitter.config().await?.config;
    let mut out = Vec::new();
    for e in config.environments.iter().filter(|e| caller.may(auth::Need::Read, Some(&e.name))) {
        let mut info = EnvironmentInfo {
            name: e.name.clone(),
            git: e.git.as_ref().map(|g| format!("{} {}", g.shown(), g.branch)),
            promote_from: e.promote_from.clone(),
            soak_secs: e.soak.as_secs(),
            approval: e.approval,
            windows: e.windows.iter().map(|w| w.text.clone()).collect(),
            ..EnvironmentInfo::default()
        };
        if e.git.is_some() {
            let records = s.submitter.revisions(&e.name, 1000).await?;
            let accepted = records.iter().position(|r| r.accepted());
            info.rejected = records.iter().take(accepted.unwrap_or(records.len())).find(|r| !r.accepted()).cloned().map(RevisionInfo::from);
            info.revision = accepted.map(|i| RevisionInfo::from(records[i].clone()));
            if let Some(f) = e.git.as_ref().and_then(|g| s.submitter.fetch_failure(&e.name, g)) {
                info.fetch_failed_at = Some(f.at);
                info.fetch_error = Some(f.error);
            }
        }
        out.push(info);
    }
    Ok(Json(out))
}
