//! API tokens and roles.
//!
//! A token is a random string shown once when it is created; the store
//! keeps only its SHA-256. Each token has a role per environment (`*` for
//! every one): `viewer` reads, `deployer` also deploys, runs, rolls back
//! and cancels, `approver` also approves, `admin` does everything,
//! including tokens and `gc`.
//!
//! Until the first token exists the API is open (a fresh install must be
//! usable to create it), approvals excepted; the first token must be an
//! admin token created from this host (loopback). From then on (revoked
//! tokens count: the API never opens again) a request without a valid
//! token gets 401, one whose token lacks the role 403. The last live admin
//! token for `*` cannot be revoked; `slipway token create --local` writes
//! one into the store when none is left. `/healthz`, `/metrics`,
//! the OpenAPI document and the hooks (which prove themselves with their
//! own secrets) need no token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{ApiError, AppState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Deployer,
    Approver,
    Admin,
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Deploy,
    Approve,
    Admin,
}

impl Role {
    pub fn allows(self, need: Need) -> bool {
        match self {
            Role::Admin => true,
            Role::Deployer => matches!(need, Need::Read | Need::Deploy),
            Role::Approver => matches!(need, Need::Read | Need::Approve),
            Role::Viewer => need == Need::Read,
        }
    }
}

/// Who sent a request. `name: None`: no token exists yet (open).
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: Option<String>,
    pub roles: BTreeMap<String, Role>,
}

impl Caller {
    /// May this caller do `need` in `environment` (`None`: something not
    /// tied to one environment, which needs the role for `*`)?
    pub fn may(&self, need: Need, environment: Option<&str>) -> bool {
        if self.name.is_none() {
            return true;
        }
        let for_all = self.roles.get("*").is_some_and(|r| r.allows(need));
        match environment {
            Some(env) => for_all || self.roles.get(env).is_some_and(|r| r.allows(need)),
            None => for_all,
        }
    }

    /// May this caller do `need` in at least one environment?
    pub fn may_somewhere(&self, need: Need) -> bool {
        self.name.is_none() || self.roles.values().any(|r| r.allows(need))
    }

    /// 403 unless [`Caller::may`]. An approval is never anonymous: while
    /// no token exists (the open API) it would be by nobody in particular.
    pub fn require(&self, need: Need, environment: Option<&str>) -> Result<(), ApiError> {
        if need == Need::Approve && self.name.is_none() {
            let role = environment.map(|e| format!(" for {e}")).unwrap_or_default();
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "approving needs a token, and none exists yet (an approval by nobody in particular is no approval): create the first admin token on the Slipway host with `slipway token create root --role '*=admin'`, then approve with a token that has the approver role{role} (not the one that asked for the deployment)"
                ),
            ));
        }
        if self.may(need, environment) {
            return Ok(());
        }
        let what = match need {
            Need::Read => "read",
            Need::Deploy => "deploy",
            Need::Approve => "approve",
            Need::Admin => "administer",
        };
        let place = environment.map(|e| format!(" in {e}")).unwrap_or_else(|| " (a role for every environment, \"*\", is needed)".into());
        Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("token {:?} may not {what}{place}", self.name.as_deref().unwrap_or(""))))
    }

    /// An event signed with `[events] hmac_secret`, not a token.
    pub fn is_signed(&self) -> bool {
        self.name.as_deref() == Some(HMAC_CALLER)
    }

    pub fn actor(&self) -> String {
        match &self.name {
            Some(n) if n == HMAC_CALLER => "an event signed with [events] hmac_secret".into(),
            Some(n) => format!("token {n}"),
            None => "anonymous".into(),
        }
    }
}

/// Refuse roles for environments the config does not define (a typo
/// would otherwise grant nothing, silently); `*` is always fine.
pub fn check_roles(roles: &BTreeMap<String, Role>, known: &[String]) -> Result<(), String> {
    let unknown: Vec<&str> = roles.keys().filter(|e| *e != "*" && !known.contains(e)).map(String::as_str).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(format!(
        "roles name environments the config does not define: {} (defined: {}; \"*\" means every environment)",
        unknown.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", "),
        known.join(", ")
    ))
}

/// Whether roles give admin for every environment (what the first token
/// must be, and what must remain among live tokens).
pub fn is_root_admin(roles: &BTreeMap<String, Role>) -> bool {
    roles.get("*") == Some(&Role::Admin)
}

/// The audit log's "who", set on the response by [`layer`].
#[derive(Debug, Clone)]
pub struct Actor(pub String);

pub fn hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A new token: 32 random bytes, hex, with a prefix that says what it is.
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("slw_{}", hex::encode(bytes))
}

fn public(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/api/v1/openapi.json") || path.starts_with("/hooks/") || crate::ui::is_public(path)
}

/// Authenticate every request (see the module header); reads need a role
/// somewhere, anything else is checked by its handler against the
/// environment it acts in.
pub async fn layer(State(s): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    if public(req.uri().path()) {
        return next.run(req).await;
    }
    let header = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let signature = req.headers().get("x-slipway-signature-256").and_then(|v| v.to_str().ok()).map(str::to_string);
    if header.is_none() && signature.is_some() && matches!(req.uri().path(), "/api/v1/events" | "/api/v1/published") && req.method() == Method::POST {
        return match signed(&s, req, signature.as_deref()).await {
            Ok((caller, req)) => {
                let actor = caller.actor();
                let mut req = req;
                req.extensions_mut().insert(caller);
                let mut res = next.run(req).await;
                res.extensions_mut().insert(Actor(actor));
                res
            }
            Err(e) => refuse(e, "a signed event"),
        };
    }
    let caller = match header.as_deref().and_then(|h| h.strip_prefix("Bearer ")) {
        Some(token) => match s.store.token_by_hash(&hash(token)).await {
            Ok(Some(t)) => Caller { name: Some(t.name), roles: serde_json::from_str(&t.roles).unwrap_or_default() },
            Ok(None) => return refuse(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown or revoked token"), "an unknown token"),
            Err(e) => return ApiError::from(e).into_response(),
        },
        None => match s.store.tokens().await {
            // Open only while no token was ever created.
            Ok(all) if all.is_empty() => Caller { name: None, roles: BTreeMap::new() },
            Ok(_) => {
                return refuse(
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthenticated",
                        "this API needs a token: Authorization: Bearer TOKEN (slipway --token, or SLIPWAY_TOKEN)",
                    ),
                    "no token",
                );
            }
            Err(e) => return ApiError::from(e).into_response(),
        },
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) && caller.name.is_some() && !caller.roles.values().any(|r| r.allows(Need::Read)) {
        return refuse(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this token has no role"), &caller.actor());
    }
    let actor = caller.actor();
    req.extensions_mut().insert(caller);
    let mut res = next.run(req).await;
    res.extensions_mut().insert(Actor(actor));
    res
}

/// The caller of a signed event (not a valid token name, so no token can
/// pass for it).
const HMAC_CALLER: &str = "(hmac)";

/// Largest signed event body: events are small JSON documents.
const MAX_SIGNED_BODY: usize = 1 << 20;

/// An event signed with `[events] hmac_secret` instead of a token: its
/// caller may deploy in `[events] environments` (all when empty). The
/// body is read here to check it, then handed on unchanged.
async fn signed(s: &AppState, req: Request, signature: Option<&str>) -> Result<(Caller, Request), ApiError> {
    use http_body_util::BodyExt;
    let config = s.submitter.config().await?.config;
    let Some(events) = config.events else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "signed events are not configured here: add [events] hmac_secret = \"SECRET-NAME\" to slipway.toml, or send a token",
        ));
    };
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), http_body_util::Limited::new(body, MAX_SIGNED_BODY).collect()).await;
    let bytes = match read {
        Err(_) => return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", "the event's body did not arrive within 30s")),
        Ok(Err(_)) => return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("a signed event is at most {MAX_SIGNED_BODY} bytes"))),
        Ok(Ok(c)) => c.to_bytes(),
    };
    let secret = events.hmac_secret.read().map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    crate::trigger::github::verify_named(secret.expose().as_bytes(), &bytes, signature, "X-Slipway-Signature-256").map_err(|e| {
        tracing::warn!(reason = %e, "refused a signed event");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", format!("X-Slipway-Signature-256: {e}"))
    })?;
    let envs = if events.environments.is_empty() { vec!["*".to_string()] } else { events.environments };
    let caller = Caller { name: Some(HMAC_CALLER.into()), roles: envs.into_iter().map(|e| (e, Role::Deployer)).collect() };
    Ok((caller, Request::from_parts(parts, axum::body::Body::from(bytes))))
}

fn refuse(e: ApiError, who: &str) -> Response {
    let mut res = e.into_response();
    res.extensions_mut().insert(Actor(who.to_string()));
    res
}

/// Whether a request came from this host (the first token's bootstrap).
/// A request a proxy forwarded says so in a header; it came from
/// wherever the proxy's client is, so it does not count, though the
/// connection is from loopback.
pub fn from_loopback(req_addr: Option<&ConnectInfo<SocketAddr>>, headers: &axum::http::HeaderMap) -> bool {
    const FORWARDED: [&str; 4] = ["forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host"];
    req_addr.is_some_and(|c| c.0.ip().is_loopback()) && !FORWARDED.iter().any(|h| headers.contains_key(*h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_they_say_per_environment() {
        let c = Caller { name: Some("ci".into()), roles: BTreeMap::from([("staging".into(), Role::Deployer), ("*".into(), Role::Viewer)]) };
        assert!(c.may(Need::Deploy, Some("staging")));
        assert!(!c.may(Need::Deploy, Some("production")));
        assert!(c.may(Need::Read, Some("production")));
        assert!(!c.may(Need::Approve, Some("staging")));
        assert!(!c.may(Need::Admin, None));
        let open = Caller { name: None, roles: BTreeMap::new() };
        assert!(open.may(Need::Admin, None));
        assert_ne!(hash("a"), hash("b"));
        assert!(generate().starts_with("slw_") && generate() != generate());
    }

    // Issue 13: no approval by nobody in particular; roles only for
    // environments that exist.
    #[test]
    fn issue13_no_anonymous_approval_and_no_roles_for_unknown_environments() {
        let open = Caller { name: None, roles: BTreeMap::new() };
        let anonymous_approval = open.require(Need::Approve, Some("production")).expect_err("no anonymous approval");
        assert!(anonymous_approval.message.contains("slipway token create root --role '*=admin'"), "{anonymous_approval:?}");
        let roles = BTreeMap::from([("stagin".to_string(), Role::Deployer), ("*".to_string(), Role::Viewer)]);
        let known = ["staging".to_string(), "production".to_string()];
        let e = check_roles(&roles, &known).expect_err("unknown environment");
        assert!(e.contains("\"stagin\"") && e.contains("staging, production"), "{e}");
        assert!(check_roles(&BTreeMap::from([("*".to_string(), Role::Admin), ("staging".to_string(), Role::Viewer)]), &known).is_ok());
    }
}
