//! Published versions from outside, checked and turned into deployments
//! (see `crate::trigger`): `POST /hooks/github` (GitHub's deliveries),
//! `POST /hooks/registry` (a registry's notifications) and
//! `POST /api/v1/published` (the generic event, with an API token).
//!
//! Order matters for "an event is stored before it is acknowledged" and
//! "the same event twice deploys once": the deployments a delivery starts
//! are submitted first, each under a key derived from what was published
//! (image, version, digest, environment, service: idempotent, whichever
//! delivery announces it), then the delivery itself is stored under its
//! own key (its event kind and body), and only then does the sender get
//! its answer. A redelivery, another event kind announcing the same push, or
//! a retry after a crash in between, finds every key taken and starts
//! nothing new. A published version older than what an environment runs
//! or has decided is held there, not deployed.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;

use super::audit::{AuditEnvironment, AuditNote};
use super::wire::{HookAnswer, HookResult};
use super::{ApiError, ApiResult, AppState};

/// What a delivery meant, for the audit log, and the environment it acted
/// in when all its deployments are in one.
type Noted = (axum::Extension<AuditNote>, Option<axum::Extension<AuditEnvironment>>);

fn note_of(a: &HookAnswer) -> Noted {
    let mut envs = a.results.iter().map(|r| r.environment.as_str());
    let first = envs.next();
    let environment = first.filter(|f| envs.all(|e| e == *f)).map(|e| axum::Extension(AuditEnvironment(e.to_string())));
    (axum::Extension(note_text(a)), environment)
}

fn note_text(a: &HookAnswer) -> AuditNote {
    let mut parts = vec![format!("{} {}{}", a.event, a.delivery, if a.duplicate { " (a redelivery)" } else { "" })];
    parts.extend(a.note.clone());
    for r in &a.results {
        parts.push(match (&r.deployment_id, &r.held, &r.error) {
            (Some(id), _, _) => format!("{} {} in {} → deployment {id}", r.service, r.version, r.environment),
            (_, Some(h), _) => format!("{} {} in {} held: {h}", r.service, r.version, r.environment),
            (_, _, Some(e)) => format!("{} {} in {} refused: {e}", r.service, r.version, r.environment),
            _ => format!("{} {} in {}", r.service, r.version, r.environment),
        });
    }
    AuditNote(parts.join("; "))
}
use crate::store::NewEvent;
use crate::submit::Request;
use crate::trigger::github::{self, Delivery};
use crate::trigger::{Decision, TriggerError, decide, decide_any};

/// The body, at most `max` bytes (413 beyond, naming the setting).
async fn read_limited(body: Body, max: usize, setting: &str) -> ApiResult<axum::body::Bytes> {
    // A sender that trickles its body must not hold a connection forever.
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), http_body_util::Limited::new(body, max).collect()).await;
    let Ok(read) = read else { return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", "the delivery's body did not arrive within 30s")) };
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("delivery larger than {setting} ({max} bytes)")))
        }
        Err(e) => Err(ApiError::bad_request(format!("cannot read the delivery: {e}"))),
    }
}

pub(super) use crate::submit::key_of;

/// Submit a deployment for every decision that deploys, each under its own
/// key below `key` (so a redelivery finds them taken). Also says whether a
/// submit failed for a reason that may pass (the store or the Engine
/// down): then the delivery must not be stored, and the sender must retry.
/// Decisions per environment, each from the config that environment runs
/// (an environment whose config is a git branch: its accepted commit's
/// services, `follows`, `auto_deploy` and `tags`).
async fn per_environment(s: &AppState, disk: &crate::config::Config, decide: impl Fn(&crate::config::Config) -> Vec<Decision>) -> Vec<Decision> {
    let from_disk = decide(disk);
    let mut out = Vec::new();
    for env in disk.environment_names() {
        if disk.environment(&env).is_some_and(|e| e.git.is_some()) {
            match s.submitter.config_for(&env).await {
                Ok(c) => out.extend(decide(&c).into_iter().filter(|d| d.environment == env)),
                Err(e) => tracing::warn!(environment = %env, "no decision for a published version: {e}"),
            }
        } else {
            out.extend(from_disk.iter().filter(|d| d.environment == env).cloned());
        }
    }
    crate::trigger::promotion_only(disk, &mut out);
    out
}

/// What the store says about services' versions, read once per delivery
/// (and only if something may deploy): what each environment runs or has
/// decided, and when each version was first seen (a deployment of it, or
/// a delivery's result naming it). The newest 1,000 deployments and
/// deliveries of each kind: a version seen only before that is taken as
/// never seen.
struct Sightings {
    services: Vec<crate::store::ServiceRow>,
    deployments: Vec<crate::store::DeploymentRow>,
    /// When each delivery came, and what it named.
    deliveries: Vec<(i64, Vec<Named>)>,
}

/// (service, environment, version) a delivery's result names.
type Named = (String, String, String);

impl Sightings {
    async fn load(s: &AppState) -> Result<Sightings, crate::store::StoreError> {
        let deliveries = s
            .store
            .events(&["github.", "registry.", "published"], 1000)
            .await?
            .into_iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
                let named = v["results"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| Some((r["service"].as_str()?.to_string(), r["environment"].as_str()?.to_string(), r["version"].as_str()?.to_string())))
                    .collect();
                (e.received_at, named)
            })
            .collect();
        Ok(Sightings { services: s.store.services().await?, deployments: s.store.deployments(1000, None).await?, deliveries })
    }

    fn first_seen(&self, environment: &str, service: &str, version: &str) -> Option<i64> {
        let deployed = self
            .deployments
            .iter()
            .filter(|d| d.environment == environment && d.service.as_deref() == Some(service) && d.version.as_deref() == Some(version))
            .map(|d| d.created_at);
        let announced =
            self.deliveries.iter().filter(|(_, named)| named.iter().any(|(s, e, v)| s == service && e == environment && v == version)).map(|(at, _)| *at);
        deployed.chain(announced).min()
    }

    /// What `service` runs in `environment` (or, if Slipway does not run
    /// it itself, its last successful deployment) and its deployments
    /// waiting, queued or running.
    fn standing(&self, environment: &str, service: &str) -> Vec<crate::trigger::Standing> {
        use crate::store::{DeploymentKind, DeploymentState};
        let mine = |d: &&crate::store::DeploymentRow| {
            d.environment == environment && d.service.as_deref() == Some(service) && d.kind == DeploymentKind::Deploy && d.version.is_some()
        };
        let standing = |version: &str, digest: Option<String>, what: String| crate::trigger::Standing {
            version: version.to_string(),
            digest,
            what,
            first_seen: self.first_seen(environment, service, version),
        };
        let mut out = Vec::new();
        match self.services.iter().find(|r| r.environment == environment && r.service == service) {
            Some(r) => out.push(standing(&r.version, r.sha256.clone(), format!("runs in {environment} (deployment #{})", r.deployment_id))),
            None => {
                if let Some(d) = self.deployments.iter().filter(mine).filter(|d| d.state == DeploymentState::Succeeded).max_by_key(|d| d.id) {
                    out.push(standing(d.version.as_deref().unwrap_or_default(), None, format!("was last deployed to {environment} (deployment #{})", d.id)));
                }
            }
        }
        for d in self.deployments.iter().filter(mine).filter(|d| !d.state.is_terminal()) {
            out.push(standing(d.version.as_deref().unwrap_or_default(), None, format!("is {} in {environment} (deployment #{})", d.state, d.id)));
        }
        out
    }
}

/// `digest` is the caller's, for either kind of artifact; `image_digest`
/// the manifest digest a registry announced, for container services only
/// (a tarball that follows the tags has its own checksum); `announced`
/// the digest that identifies the publication (whatever its sender
/// named), pinning nothing by itself.
///
/// Each decision that deploys is keyed by the publication
/// ([`crate::trigger::publication_key`]): announced again, by another
/// event kind or a retry, it answers with the deployment it started. It
/// deploys only if it is newer than what the environment runs or has
/// decided ([`crate::trigger::not_newer`]); otherwise it is held, saying
/// why (`why` shows it, and a deploy by hand can still take it).
async fn act(
    s: &AppState,
    decisions: Vec<Decision>,
    version: &str,
    digest: Option<&str>,
    image_digest: Option<&str>,
    announced: Option<&str>,
) -> (Vec<HookResult>, bool) {
    let mut transient = false;
    let mut results = Vec::new();
    let mut sightings: Option<Sightings> = None;
    for d in decisions {
        let mut r = HookResult {
            service: d.service.clone(),
            environment: d.environment.clone(),
            version: version.to_string(),
            deployment_id: None,
            held: d.held.clone(),
            error: None,
        };
        let config = s.submitter.config_for(&d.environment).await;
        let service = config.as_ref().ok().and_then(|c| c.services.iter().find(|x| x.name == d.service).cloned());
        // A digest pins an image or checks a tarball; a service that runs
        // neither (it only follows the tags) deploys the version alone.
        let digest = match (digest, image_digest) {
            (None, None) => None,
            _ => match (&config, service.as_ref().and_then(|x| x.spec.as_ref())) {
                (Err(_), _) => digest,
                (_, Some(sp)) if sp.image.is_some() => image_digest.or(digest),
                (_, Some(sp)) if sp.artifact.is_some() => digest,
                _ => None,
            },
        };
        let what = service.as_ref().and_then(|x| x.follows.clone()).unwrap_or_else(|| format!("service {}", d.service));
        let key = crate::trigger::publication_key(&what, version, announced, &d.environment, &d.service);
        // Held for this delivery (the config, or a token that may not
        // deploy there), but another delivery of the publication, by a
        // token that may, can have started it there: that answers, as a
        // retry's would. A lookup that fails is an error, as a held
        // delivery's re-check below: a hold would be answered as final.
        if d.held.is_some() {
            transient |= answer_from_started(s, &key, &mut r).await;
        }
        if d.held.is_none() {
            // Announced before: what that started. Else: newer than what
            // stands, or held.
            let known = match s.store.event_by_key(&key).await {
                Ok(Some(e)) => Ok(Some(e.deployment_id)),
                Ok(None) if sightings.is_some() => Ok(None),
                Ok(None) => Sightings::load(s).await.map(|x| {
                    sightings = Some(x);
                    None
                }),
                Err(e) => Err(e),
            };
            match (known, &sightings) {
                (Ok(Some(Some(id))), _) => r.deployment_id = Some(id),
                // (Never so: a publication's key is recorded with the
                // deployment it started, in one transaction.)
                (Ok(Some(None)), _) => r.held = Some(format!("{version} was announced before, and nothing was deployed for it")),
                (Ok(None), Some(seen)) => {
                    let first_seen = seen.first_seen(&d.environment, &d.service, version);
                    r.held = crate::trigger::not_newer(
                        service.as_ref().and_then(|x| x.tags.as_ref()),
                        version,
                        announced,
                        first_seen,
                        &seen.standing(&d.environment, &d.service),
                    );
                    // What it is held behind may be this very publication,
                    // started by a delivery of it that arrived at the same
                    // time (its deployment and key are one transaction).
                    if r.held.is_some() {
                        transient |= answer_from_started(s, &key, &mut r).await;
                    }
                }
                (Ok(None), None) => {}
                (Err(e), _) => {
                    let e = ApiError::from(e);
                    transient |= e.status == StatusCode::SERVICE_UNAVAILABLE;
                    r.error = Some(e.message);
                }
            }
        }
        if r.held.is_none() && r.deployment_id.is_none() && r.error.is_none() {
            let payload = serde_json::json!({ "kind": "deploy", "service": d.service, "version": version, "environment": d.environment, "digest": announced })
                .to_string();
            // The trigger checked both against the same rules; a value that
            // still fails them is refused here, never submitted unchecked.
            let typed = crate::values::Version::parse(version)
                .and_then(|v| Ok((v, digest.map(crate::values::Digest::parse).transpose()?)))
                .map(|(version, digest)| Request::Deploy { service: d.service.clone(), version, environment: Some(d.environment.clone()), digest });
            let submitted = match typed {
                Ok(request) => s.submitter.submit(request, Some(key), payload).await,
                Err(e) => Err(crate::submit::SubmitError::Invalid(e.to_string())),
            };
            match submitted {
                Ok(sub) => r.deployment_id = Some(sub.deployment_id),
                Err(e) => {
                    // The sender just announced this tag: a pin that fails
                    // now (registry slow, not yet consistent) is retried by
                    // the sender rather than lost.
                    let unpinned = matches!(e, crate::submit::SubmitError::Unpinned(_));
                    let e = ApiError::from(e);
                    transient |= unpinned || e.status == StatusCode::SERVICE_UNAVAILABLE;
                    r.error = Some(e.message);
                }
            }
        }
        results.push(r);
    }
    (results, transient)
}

/// A held `r` answered by what another delivery of its publication
/// started there (its key), as a retry's would be. A lookup that fails is
/// `r`'s error, not a hold (which the sender would take as final);
/// whether that error is a passing one.
async fn answer_from_started(s: &AppState, key: &str, r: &mut HookResult) -> bool {
    match s.store.event_by_key(key).await {
        Ok(Some(e)) if e.deployment_id.is_some() => {
            (r.deployment_id, r.held) = (e.deployment_id, None);
            false
        }
        Ok(_) => false,
        Err(e) => {
            let e = ApiError::from(e);
            (r.error, r.held) = (Some(e.message), None);
            e.status == StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// The results a caller may see, and how many were left out: a deployment
/// in an environment its token may not read (a retry of another sender's
/// publication names what that one started) is not named. The record
/// keeps them all.
fn readable(caller: &super::auth::Caller, results: Vec<HookResult>) -> (Vec<HookResult>, usize) {
    let before = results.len();
    let shown: Vec<HookResult> =
        results.into_iter().filter(|r| r.deployment_id.is_none() || caller.may(super::auth::Need::Read, Some(&r.environment))).collect();
    let unseen = before - shown.len();
    (shown, unseen)
}

/// 503 for a delivery whose deployments could not all be submitted for a
/// passing reason: nothing of it is recorded as handled, the sender
/// retries, and what was submitted is not submitted twice.
fn retry_later(results: &[HookResult]) -> ApiError {
    let why: Vec<String> = results.iter().filter_map(|r| r.error.as_ref().map(|e| format!("{} in {}: {e}", r.service, r.environment))).collect();
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("not every deployment could be submitted; send it again: {}", why.join("; ")))
}

/// How long a push waits for its decision before answering (it goes on
/// in the background; `slipway revisions` shows it).
const DECIDE_WAIT: std::time::Duration = std::time::Duration::from_secs(8);

/// A repository URL compared loosely: GitHub names one repository by
/// several URLs, with or without `.git` and a trailing slash.
fn normal_repo(u: &str) -> String {
    // Credentials in the configured URL are not part of its identity.
    let u = match u.trim().split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, path)) => format!("{scheme}://{}/{path}", authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority)),
            None => u.trim().to_string(),
        },
        None => u.trim().to_string(),
    };
    let u = u.trim_end_matches('/');
    u.strip_suffix(".git").unwrap_or(u).to_ascii_lowercase()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A delivery from GitHub (`push`, `registry_package`, `package`,
/// `workflow_run`, `ping`).
#[utoipa::path(post, path = "/hooks/github", request_body(content = Object, content_type = "application/json", description = "GitHub's payload, as GitHub signed it"),
    params(("X-GitHub-Event" = String, Header, pattern = "^[a-z_]{1,64}$", description = "The event"), ("X-GitHub-Delivery" = String, Header, pattern = "^[0-9A-Fa-f-]{1,64}$", description = "The delivery's id")),
    security(("github_signature" = [])),
    responses((status = 200, description = "A ping", body = HookAnswer), (status = 202, description = "Handled (or ignored, saying why)", body = HookAnswer),
        (status = 400, description = "Missing or malformed headers or payload", body = super::wire::ErrorBody), (status = 401, description = "No or a wrong X-Hub-Signature-256", body = super::wire::ErrorBody),
        (status = 404, description = "[github] is not configured here", body = super::wire::ErrorBody), (status = 408, description = "The body did not arrive within 30 s", body = super::wire::ErrorBody),
        (status = 413, description = "Larger than [github] max_payload", body = super::wire::ErrorBody), (status = 422, description = "The config on disk is invalid", body = super::wire::ErrorBody),
        (status = 503, description = "Not every deployment or decision could be made now (store, registry, git): send it again", body = super::wire::ErrorBody)))]
pub async fn github(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> ApiResult<(StatusCode, Noted, Json<HookAnswer>)> {
    let loaded = s.submitter.config().await?;
    let Some(gh) = loaded.config.github.clone() else {
        return Err(ApiError::not_found("GitHub webhooks are not configured here: add [github] webhook_secret = \"SECRET-NAME\" to slipway.toml"));
    };
    let bytes = read_limited(body, gh.max_payload, "[github] max_payload").await?;
    let secret = gh.webhook_secret.read().map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    // Refusals are logged (and audited) by the audit layer, within a
    // bound: a flood of bad deliveries must not flood the log.
    github::verify(secret.expose().as_bytes(), &bytes, header(&headers, "x-hub-signature-256"))
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()))?;
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| github::valid_delivery(d))
        .ok_or_else(|| ApiError::bad_request("missing or malformed X-GitHub-Delivery"))?;
    let event = header(&headers, "x-github-event")
        .filter(|e| !e.is_empty() && e.len() <= 64 && e.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .ok_or_else(|| ApiError::bad_request("missing or malformed X-GitHub-Event"))?;
    let parsed = github::parse(event, &bytes).map_err(|e| match e {
        TriggerError::BadPayload(m) => ApiError::bad_request(m),
        TriggerError::Unauthenticated(m) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", m),
    })?;
    // The event and its body, not the delivery id (which the signature
    // does not cover): a redelivery and a replay under a new id are both
    // the same event; the same body as another kind of event is another
    // delivery (`package` and `registry_package` of one push), recorded as
    // such. What they announce deploys once by its own key (see `act`).
    let key = key_of("github", &[event, &String::from_utf8_lossy(&bytes)]);
    let mut answer = HookAnswer { delivery: delivery.to_string(), event: event.to_string(), duplicate: false, note: None, results: vec![], revisions: vec![] };
    let status = match parsed {
        Delivery::Ping => {
            answer.note = Some("pong".into());
            StatusCode::OK
        }
        Delivery::Ignored(why) => {
            answer.note = Some(why);
            StatusCode::ACCEPTED
        }
        Delivery::Push { branch, commit, repositories } => {
            let same = |a: &str, b: &str| normal_repo(a) == normal_repo(b);
            let envs: Vec<String> = loaded
                .config
                .environments
                .iter()
                .filter(|e| e.git.as_ref().is_some_and(|g| g.branch == branch.as_str() && repositories.iter().any(|r| same(r, &g.url))))
                .map(|e| e.name.clone())
                .collect();
            answer.note = Some(if envs.is_empty() {
                format!("push of {} to {branch}: no environment follows that branch of that repository", crate::config::revision::short(&commit))
            } else {
                format!("push of {} to {branch}: config of {}", crate::config::revision::short(&commit), envs.join(", "))
            });
            for env in envs {
                // The branch head is fetched and decided on: the payload's
                // commit is only a hint (a later push may have moved it).
                // In its own task: GitHub waits 10 s for an answer, and a
                // decision cut short when it hangs up would be lost.
                let submitter = s.submitter.clone();
                let name = env.clone();
                let task = tokio::spawn(async move { submitter.check_revision(&name).await });
                match tokio::time::timeout(DECIDE_WAIT, task).await {
                    Ok(Ok(Ok(r))) => answer.revisions.push(r.into()),
                    Ok(Ok(Err(e))) if matches!(e, crate::submit::SubmitError::Conflict(_)) => {
                        answer.note = Some(format!("{}; {env}: {e}", answer.note.take().unwrap_or_default()))
                    }
                    Ok(Ok(Err(e))) => {
                        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("config of {env} not decided; send it again: {e}")));
                    }
                    Ok(Err(e)) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("config of {env} not decided: {e}"))),
                    Err(_) => answer.note = Some(format!("{}; {env}: still deciding (slipway revisions {env})", answer.note.take().unwrap_or_default())),
                }
            }
            StatusCode::ACCEPTED
        }
        Delivery::WorkflowRun(run) => {
            // Each service renders its own version from the run, from the
            // config each environment runs.
            let versions = std::sync::Mutex::new(std::collections::BTreeMap::<(String, String), String>::new());
            let decisions = per_environment(&s, &loaded.config, |c| {
                let decided = crate::trigger::decide_workflow(c, &run);
                let mut v = versions.lock().unwrap_or_else(|e| e.into_inner());
                for (d, version) in &decided {
                    v.insert((d.service.clone(), d.environment.clone()), version.clone());
                }
                decided.into_iter().map(|(d, _)| d).collect()
            })
            .await;
            let versions = versions.into_inner().unwrap_or_else(|e| e.into_inner());
            answer.note =
                Some(if decisions.is_empty() { crate::trigger::workflow_unmatched(&loaded.config, &run) } else { format!("{} succeeded", run.describe()) });
            let mut by_version = std::collections::BTreeMap::<String, Vec<Decision>>::new();
            for d in decisions {
                let Some(version) = versions.get(&(d.service.clone(), d.environment.clone())) else { continue };
                by_version.entry(version.clone()).or_default().push(d);
            }
            // Keyed by what is published (service, version), as any other
            // trigger: a redelivery, a re-run of the run and a
            // `/published` event of the same version deploy once.
            for (version, decisions) in by_version {
                let (results, transient) = act(&s, decisions, &version, None, None, None).await;
                if transient {
                    return Err(retry_later(&results));
                }
                answer.results.extend(results);
            }
            StatusCode::ACCEPTED
        }
        Delivery::Published(p) => {
            answer.note = Some(format!("{}:{} published", p.image, p.version));
            let (results, transient) = act(&s, per_environment(&s, &loaded.config, |c| decide(c, &p)).await, &p.version, None, None, p.digest.as_deref()).await;
            if transient {
                return Err(retry_later(&results));
            }
            answer.results = results;
            StatusCode::ACCEPTED
        }
    };
    // The delivery itself, with what it meant: the record of a version
    // that is available but not deployed, and the redelivery guard.
    let payload = serde_json::json!({ "event": event, "note": answer.note, "results": answer.results, "revisions": answer.revisions }).to_string();
    let (_, duplicate) = s.store.record_event(NewEvent { key: Some(key), kind: format!("github.{event}"), payload }).await?;
    answer.duplicate = duplicate;
    Ok((status, note_of(&answer), Json(answer)))
}

/// Notifications from a Docker distribution registry: tagged manifest
/// pushes deploy (as a published version, like GitHub's package events in
/// [`github()`]); pulls, blobs
/// and deletes are ignored. Each event is handled once, by its id.
#[utoipa::path(post, path = "/hooks/registry", request_body(content = super::wire::RegistryEnvelope, content_type = "application/json", description = "The registry's notification envelope (`events`)"),
    security(("registry_token" = [])),
    responses((status = 200, description = "Every event handled or deliberately ignored", body = HookAnswer), (status = 400, description = "Not a notification envelope", body = super::wire::ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = super::wire::ErrorBody), (status = 404, description = "[registry_hook] is not configured here", body = super::wire::ErrorBody),
        (status = 408, description = "The body did not arrive within 30 s", body = super::wire::ErrorBody), (status = 413, description = "Larger than [registry_hook] max_payload", body = super::wire::ErrorBody),
        (status = 422, description = "The config on disk is invalid", body = super::wire::ErrorBody),
        (status = 503, description = "Not every deployment could be submitted now: the registry sends it again", body = super::wire::ErrorBody)))]
pub async fn registry(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> ApiResult<(StatusCode, Noted, Json<HookAnswer>)> {
    let loaded = s.submitter.config().await?;
    let Some(hook) = loaded.config.registry_hook.clone() else {
        return Err(ApiError::not_found("registry notifications are not configured here: add [registry_hook] token = \"SECRET-NAME\" to slipway.toml"));
    };
    let bytes = read_limited(body, hook.max_payload, "[registry_hook] max_payload").await?;
    let token = hook.token.read().map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    crate::trigger::registry::verify(token.expose().as_bytes(), header(&headers, "authorization"))
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()))?;
    let (pushed, ignored) = crate::trigger::registry::parse(&bytes, &hook.hosts).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut answer = HookAnswer {
        delivery: String::new(),
        event: "registry".into(),
        duplicate: false,
        note: Some(format!("{} tagged push(es), {ignored} event(s) ignored", pushed.len())),
        results: vec![],
        revisions: vec![],
    };
    let mut all_duplicates = !pushed.is_empty();
    for p in pushed {
        let key = key_of("registry", &[&p.id]);
        // The pushed manifest's own digest: no tag to resolve, no race with
        // the registry's consistency, the very bytes that were pushed.
        let (results, transient) = act(
            &s,
            per_environment(&s, &loaded.config, |c| decide_any(c, &p.images, &p.version)).await,
            &p.version,
            None,
            p.digest.as_deref(),
            p.digest.as_deref(),
        )
        .await;
        if transient {
            return Err(retry_later(&results));
        }
        let payload = serde_json::json!({ "images": p.images, "version": p.version, "digest": p.digest, "results": results }).to_string();
        let (_, mut duplicate) = s.store.record_event(NewEvent { key: Some(key.clone()), kind: "registry.push".into(), payload: payload.clone() }).await?;
        // A registry sends an event again under its id, but an id seen
        // with another push (another registry, one that reuses ids) is
        // that other push: recorded under a key of its own, and not a
        // duplicate (`act` above deployed it if it deploys).
        if duplicate && !same_push(s.store.event_by_key(&key).await?.map(|e| e.payload), &p) {
            let digest = p.digest.as_ref().map_or("", |d| d.as_str());
            let key = key_of("registry", &[&p.id, p.version.as_str(), digest]);
            duplicate = s.store.record_event(NewEvent { key: Some(key), kind: "registry.push".into(), payload }).await?.1;
        }
        all_duplicates &= duplicate;
        answer.results.extend(results);
    }
    answer.duplicate = all_duplicates;
    // The registry retries anything but a 2xx: every event it sent is
    // either handled or deliberately ignored by now.
    Ok((StatusCode::OK, note_of(&answer), Json(answer)))
}

/// Whether the registry event recorded under a push's id (its payload)
/// was this push: the same version of the same images, and the same
/// digest where the record has one (records from before it was kept have
/// none).
fn same_push(recorded: Option<String>, p: &crate::trigger::registry::Pushed) -> bool {
    let Some(v) = recorded.and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok()) else { return true };
    let images: Vec<&str> = v["images"].as_array().into_iter().flatten().filter_map(|i| i.as_str()).collect();
    let digest = p.digest.as_ref().map(|d| d.as_str());
    v["version"].as_str() == Some(p.version.as_str())
        && images.len() == p.images.len()
        && p.images.iter().all(|i| images.contains(&i.as_str()))
        && v.get("digest").is_none_or(|d| d.is_null() || d.as_str() == digest)
}

/// The kind of the claim of a publication's `id` (and the first part of
/// its key): not `published…`, so that lists of deliveries do not take it
/// for one.
const PUBLICATION_ID: &str = "publication-id";

/// The generic "artifact published" event: an image (its followers) or a
/// service, and a version. Deploys where `auto_deploy` opts in, the tag
/// filter passes and the caller's token may deploy; holds it elsewhere.
#[utoipa::path(post, path = "/api/v1/published", request_body = super::wire::PublishedRequest,
    responses((status = 202, description = "Recorded: what it did per service and environment (deployed, held and why, refused and why)", body = HookAnswer),
        (status = 403, description = "The caller may not deploy anywhere", body = super::wire::ErrorBody),
        (status = 409, description = "Its `id` was used before for another publication (named in the message)", body = super::wire::ErrorBody),
        (status = 422, description = "The config on disk is invalid", body = super::wire::ErrorBody)))]
pub async fn published(
    State(s): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    body: Result<Json<super::wire::PublishedRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Noted, Json<HookAnswer>)> {
    let Json(req) = body?;
    published_event(&s, &caller, req).await
}

/// What became of a deploy request read from the SQS queue.
pub enum Queued {
    /// Recorded (deployments submitted, held or none): the message may go.
    Recorded(String),
    /// The request itself is wrong (400, 409): a malformed message.
    Refused(String),
    /// A passing reason (store, config, a pin): the message is read again.
    Later(String),
}

/// A deploy request from the SQS queue (`crate::trigger::sqs_consumer`):
/// the same path as `/api/v1/published`, on the installation's own
/// authority (the queue's IAM policy says who may send).
pub async fn published_from_queue(s: &AppState, req: super::wire::PublishedRequest) -> Queued {
    let caller = super::auth::Caller { name: None, roles: Default::default() };
    match published_event(s, &caller, req).await {
        Ok((_, (axum::Extension(note), _), _)) => Queued::Recorded(note.0),
        // 422 is the config on disk, not the message: it waits for a fix.
        Err(e) if matches!(e.status, StatusCode::BAD_REQUEST | StatusCode::CONFLICT) => Queued::Refused(e.message),
        Err(e) => Queued::Later(e.message),
    }
}

/// What is wrong with a publication's id, if anything (the document states
/// the rule as [`super::wire::PUBLISHED_ID_PATTERN`]).
pub(super) fn published_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.chars().count() > 256 {
        return Some("`id` must be 1 to 256 characters".into());
    }
    // Keys are hashed from NUL-separated parts: a NUL in an id could spell
    // another key's parts (the one a publication deploys under).
    id.chars().any(char::is_control).then(|| format!("`id` {id:?} holds a control character: use printable characters only"))
}

/// An "artifact published" event from `/api/v1/published` or
/// `/api/v1/events` (`kind = "published"`).
pub(super) async fn published_event(
    s: &AppState,
    caller: &super::auth::Caller,
    req: super::wire::PublishedRequest,
) -> ApiResult<(StatusCode, Noted, Json<HookAnswer>)> {
    if let Some(d) = &req.digest
        && crate::service::artifact::parse_sha256(d).is_none()
    {
        return Err(ApiError::bad_request(format!("invalid digest {d:?}: sha256: and 64 hexadecimal digits")));
    }
    if !caller.may_somewhere(super::auth::Need::Deploy) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("{} may not deploy anywhere", caller.actor())));
    }
    let version = crate::values::Version::parse(&req.version)
        .map_err(|_| ApiError::bad_request(format!("version {:?} is not a version (letters, digits, '.', '_', '-', '+'; at most 128)", req.version)))?;
    let loaded = s.submitter.config().await?;
    let (what, decisions) = match (&req.image, &req.service) {
        (Some(i), None) => {
            let image = crate::values::Image::parse(&i.to_ascii_lowercase())
                .map_err(|_| ApiError::bad_request(format!("image {i:?} is not registry/repository without a tag")))?;
            let published = crate::trigger::Published { image: image.clone(), version: version.clone(), digest: None };
            let d = per_environment(s, &loaded.config, |c| decide(c, &published)).await;
            (image.to_string(), d)
        }
        (None, Some(svc)) if crate::config::valid_name(svc) => {
            (svc.clone(), per_environment(s, &loaded.config, |c| crate::trigger::decide_service(c, svc, &req.version)).await)
        }
        _ => return Err(ApiError::bad_request("name either `image` or `service` (a valid name)")),
    };
    let id = req.id.clone().unwrap_or_else(|| format!("{what}:{}", req.version));
    if let Some(problem) = published_id_problem(&id) {
        return Err(ApiError::bad_request(problem));
    }
    // What the token may not deploy is held, saying so.
    let decisions: Vec<Decision> = decisions
        .into_iter()
        .map(|mut d| {
            if d.held.is_none() && !caller.may(super::auth::Need::Deploy, Some(&d.environment)) {
                d.held = Some(format!("{} may not deploy in {}", caller.actor(), d.environment));
            }
            d
        })
        .collect();
    let key = key_of("published", &[&id]);
    let digest = req.digest.as_deref().and_then(crate::service::artifact::parse_sha256);
    // An id names one publication: the same again is a retry (answered
    // from what it started), another one under it is refused, naming it.
    // The id is claimed first, under a key of its own, in one statement:
    // of publications sent at once under one id, only the claimer and its
    // retries act (each deployment has its own key, so a retry starts
    // nothing twice), the others are refused. What it started is recorded
    // after, under `key`, by the first to finish, and is what a later one
    // is judged by (so an id used before the claims, by an older Slipway,
    // keeps its publication). The claim's key is in `published:`, which
    // callers' deploy and run ids may not use, and an id holds no NUL, so
    // no other key can be spelt to match it.
    let claim_key = key_of("published", &[PUBLICATION_ID, &id]);
    let claim = serde_json::json!({ "what": what, "version": req.version, "digest": digest }).to_string();
    let (_, claimed_before) = s.store.record_event(NewEvent { key: Some(claim_key.clone()), kind: PUBLICATION_ID.into(), payload: claim }).await?;
    let recorded = s.store.event_by_key(&key).await?;
    let first = match (&recorded, claimed_before) {
        (Some(r), _) => Some(r.clone()),
        (None, true) => s.store.event_by_key(&claim_key).await?,
        (None, false) => None,
    };
    if let Some(first) = first {
        let v: serde_json::Value = serde_json::from_str(&first.payload).unwrap_or_default();
        let same = v["what"].as_str() == Some(what.as_str())
            && v["version"].as_str() == Some(req.version.as_str())
            && v.get("digest").is_none_or(|d| d.as_str() == digest.as_deref());
        if !same {
            let results: serde_json::Value = recorded.map(|r| serde_json::from_str(&r.payload).unwrap_or_default()).unwrap_or_default();
            let results: Vec<HookResult> = serde_json::from_value(results["results"].clone()).unwrap_or_default();
            let (shown, unseen) = readable(caller, results);
            let mut started: Vec<String> = shown.iter().filter_map(|r| Some(format!("deployment {} in {}", r.deployment_id?, r.environment))).collect();
            if unseen > 0 {
                started.push(format!("{unseen} in environments {} may not read", caller.actor()));
            }
            let started = if started.is_empty() { "no deployment recorded yet".to_string() } else { started.join(", ") };
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "event id {id:?} was already used for {} {} published ({started}); this one ({what} {}) is a different publication: give it its own id",
                    v["what"].as_str().unwrap_or("?"),
                    v["version"].as_str().unwrap_or("?"),
                    req.version
                ),
            ));
        }
    }
    let (results, transient) = act(s, decisions, &req.version, req.digest.as_deref(), None, digest.as_deref()).await;
    if transient {
        return Err(retry_later(&readable(caller, results).0));
    }
    let payload = serde_json::json!({ "what": what, "version": req.version, "digest": digest, "results": results }).to_string();
    // A duplicate once what it started was recorded (a retry after a 503
    // may still start what the first could not).
    let (_, duplicate) = s.store.record_event(NewEvent { key: Some(key), kind: "published".into(), payload }).await?;
    let (results, unseen) = readable(caller, results);
    let mut note = format!("{what} {} published", req.version);
    if unseen > 0 {
        note.push_str(&format!("; {unseen} deployment(s) it started in environments {} may not read are not shown", caller.actor()));
    }
    let answer = HookAnswer { delivery: id, event: "published".into(), duplicate, note: Some(note), results, revisions: vec![] };
    Ok((StatusCode::ACCEPTED, note_of(&answer), Json(answer)))
}
