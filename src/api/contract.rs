//! What every operation of the OpenAPI document has in common, added to
//! what each handler's annotation says: how it authenticates and the
//! answers that come from the layers around the handlers (auth, body
//! limits, extractors, the store) rather than from the handler itself.
//! Kept here so that a new operation gets them without repeating them.

use utoipa::Modify;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

use super::wire::ErrorBody;

/// Operations that need no API token (the hooks prove themselves with
/// their own secrets, declared on them).
fn public(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/api/v1/openapi.json") || path.starts_with("/hooks/")
}

/// Operations a body signed with `[events] hmac_secret` may call instead
/// of sending a token.
fn signable(path: &str) -> bool {
    matches!(path, "/api/v1/events" | "/api/v1/published")
}

const TOKEN: &str = "An API token (`slipway token create`), sent as `Authorization: Bearer TOKEN`. Until the first token exists the API is open, so that a fresh install can create one (an admin token for \"*\", asked for from the Slipway host itself); from then on every operation that names this scheme needs a token: none, an unknown or a revoked one is 401, one without the role for what it asks 403.";
const SIGNATURE: &str = "Instead of a token, for POST /api/v1/events (kind = \"published\" only) and POST /api/v1/published: `sha256=` and the hexadecimal HMAC-SHA256 of the body with the secret named by `[events] hmac_secret`, sent without an Authorization header. The signer may deploy in `[events] environments` (every one when empty).";
const GITHUB: &str = "`sha256=` and the hexadecimal HMAC-SHA256 of the body with the secret named by `[github] webhook_secret`, as GitHub sends it.";
const REGISTRY: &str = "The secret named by `[registry_hook] token`, as the registry's endpoint configuration sends it (`Authorization: Bearer …`).";

/// The shared answers, each a reusable response of the document.
const SHARED: &[(&str, &str, &str)] = &[
    ("BadRequest", "400", "The request is malformed: a path or query parameter, or a body that is not the JSON this operation takes (`kind`: bad_request)"),
    ("Unauthenticated", "401", "No token while tokens exist, an unknown or revoked token, or (signed events) a wrong signature (`kind`: unauthenticated)"),
    ("Forbidden", "403", "The token has no role for what this asks, where it asks it (`kind`: forbidden)"),
    ("Timeout", "408", "A signed event's body did not arrive within 30 s (`kind`: timeout)"),
    ("TooLarge", "413", "The body is larger than 64 KiB (`kind`: payload_too_large)"),
    ("UnsupportedMediaType", "415", "The body is not sent as `Content-Type: application/json` (`kind`: bad_request)"),
    ("Unavailable", "503", "The store does not answer (`kind`: store_unavailable or unavailable); nothing was changed that the answer does not say: try again"),
];

/// Which answers name what other operations take (OpenAPI links): the
/// deployment an event, a rollback or a promotion started, the token just
/// created. (operation, status, link name, target operation, parameter,
/// runtime expression.)
const LINKS: &[(&str, &str, &str, &str, &str, &str)] = &[
    ("post_event", "202", "deployment", "get_deployment", "id", "$response.body#/deployment_id"),
    ("post_event", "202", "logs", "get_logs", "id", "$response.body#/deployment_id"),
    ("post_event", "202", "cancel", "cancel_deployment", "id", "$response.body#/deployment_id"),
    ("post_event", "200", "deployment", "get_deployment", "id", "$response.body#/deployment_id"),
    ("rollback_service", "202", "deployment", "get_deployment", "id", "$response.body#/deployment_id"),
    ("promote", "202", "deployment", "get_deployment", "id", "$response.body#/deployment_id"),
    ("promote", "202", "approve", "approve", "id", "$response.body#/deployment_id"),
    ("promote", "202", "cancel", "cancel_deployment", "id", "$response.body#/deployment_id"),
    ("cancel_deployment", "202", "deployment", "get_deployment", "id", "$response.body#/id"),
    ("cancel_deployment", "202", "jobs", "list_jobs", "id", "$response.body#/id"),
    ("cancel_deployment", "202", "stream", "stream_logs", "id", "$response.body#/id"),
    ("approve", "200", "deployment", "get_deployment", "id", "$response.body#/deployment/id"),
    ("approve", "200", "cancel", "cancel_deployment", "id", "$response.body#/deployment/id"),
    ("create_token", "201", "revoke", "revoke_token", "name", "$response.body#/name"),
];

pub struct Contract;

impl Modify for Contract {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("slw_ and 64 hexadecimal digits").description(Some(TOKEN)).build(),
            ),
        );
        components
            .add_security_scheme("signature", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description("X-Slipway-Signature-256", SIGNATURE))));
        components
            .add_security_scheme("github_signature", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description("X-Hub-Signature-256", GITHUB))));
        components
            .add_security_scheme("registry_token", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(REGISTRY)).build()));
        let error = || ContentBuilder::new().schema(Some(Ref::from_schema_name(<ErrorBody as utoipa::ToSchema>::name()))).build();
        for (name, _, description) in SHARED {
            components
                .responses
                .insert(name.to_string(), RefOr::T(ResponseBuilder::new().description(*description).content("application/json", error()).build()));
        }
        let shared = |status: &str| RefOr::Ref(Ref::from_response_name(SHARED.iter().find(|(_, s, _)| *s == status).map(|(n, _, _)| *n).unwrap_or_default()));
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
                &mut item.query,
            ];
            for op in operations.into_iter().filter_map(Option::as_mut) {
                let id = op.operation_id.clone().unwrap_or_default();
                let responses = &mut op.responses.responses;
                for (_, status, name, target, parameter, expression) in LINKS.iter().filter(|l| l.0 == id) {
                    if let Some(RefOr::T(r)) = responses.get_mut(*status) {
                        let mut link = LinkBuilder::new().operation_id(*target).parameter(*parameter, *expression);
                        if id == "post_event" {
                            link = link.description("For a deploy or run event (a published one names its deployments in `results`)");
                        }
                        r.links.insert(name.to_string(), RefOr::T(link.build()));
                    }
                }
                let mut add = |status: &str| {
                    responses.entry(status.to_string()).or_insert_with(|| shared(status));
                };
                let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let json_body = match &op.request_body {
                    Some(RefOr::T(b)) => b.content.contains_key("application/json"),
                    _ => false,
                };
                if !public(path) {
                    let mut security = vec![SecurityRequirement::new("token", Vec::<String>::new())];
                    if signable(path) {
                        security.push(SecurityRequirement::new("signature", Vec::<String>::new()));
                        add("408");
                    }
                    op.security.get_or_insert(security);
                    add("401");
                    add("403");
                }
                if has_params || json_body {
                    add("400");
                }
                if json_body && !path.starts_with("/hooks/") {
                    add("413");
                    add("415");
                }
                if path != "/api/v1/openapi.json" {
                    add("503");
                }
                // A response must say what it is: the status's own name
                // where an annotation said nothing more.
                for (status, response) in responses.iter_mut() {
                    if let RefOr::T(r) = response
                        && r.description.is_empty()
                    {
                        r.description = status
                            .parse::<u16>()
                            .ok()
                            .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
                            .and_then(|s| s.canonical_reason())
                            .unwrap_or("Answer")
                            .to_string();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi as _;
    use utoipa::openapi::RefOr;
    use utoipa::openapi::path::ParameterIn;

    #[test]
    fn issue13_every_operation_states_its_auth_and_the_answers_around_it() {
        let doc = super::super::ApiDoc::openapi();
        let mut operations = 0;
        for (path, item) in &doc.paths.paths {
            for (method, op) in [("get", &item.get), ("post", &item.post), ("delete", &item.delete), ("put", &item.put), ("patch", &item.patch)] {
                let Some(op) = op else { continue };
                operations += 1;
                let what = format!("{method} {path}");
                let statuses: Vec<&str> = op.responses.responses.keys().map(String::as_str).collect();
                for (status, r) in &op.responses.responses {
                    if let RefOr::T(r) = r {
                        assert!(!r.description.is_empty(), "{what}: response {status} says nothing");
                    }
                }
                assert!(statuses.iter().any(|s| s.starts_with('2')), "{what}: no success answer");
                if super::public(path) {
                    assert!(!statuses.contains(&"403"), "{what} needs no token");
                } else {
                    assert!(op.security.as_ref().is_some_and(|s| !s.is_empty()), "{what}: no security requirement");
                    for s in ["401", "403", "503"] {
                        assert!(statuses.contains(&s), "{what}: no {s}");
                    }
                }
                // Path parameters are exactly the template's.
                let template: Vec<&str> = path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
                let declared: Vec<String> = op
                    .parameters
                    .iter()
                    .flatten()
                    .filter_map(|p| match p {
                        RefOr::T(p) if p.parameter_in == ParameterIn::Path => Some(p.name.clone()),
                        _ => None,
                    })
                    .collect();
                assert_eq!(declared, template, "{what}: path parameters");
                let json_body = matches!(&op.request_body, Some(RefOr::T(b)) if b.content.contains_key("application/json"));
                if json_body && !path.starts_with("/hooks/") {
                    for s in ["400", "413", "415"] {
                        assert!(statuses.contains(&s), "{what}: no {s}");
                    }
                }
            }
        }
        assert!(operations >= 30, "the document lists every operation ({operations})");
    }
}
