//! Docker distribution registry notifications (Debian's docker-registry,
//! CNCF distribution): an envelope of events, of which only manifest
//! pushes with a tag mean a new version. Pulls, blob pushes, deletes and
//! untagged pushes are ignored. Pure, like `github.rs`.

use super::TriggerError;

/// One push of a tagged manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The registry's id of the event: the same event delivered again
    /// (the registry retries) has the same id.
    pub id: String,
    /// Image names it may be known by: `host/repository` for the host the
    /// pusher used and the one in the event's URL.
    pub images: Vec<crate::values::Image>,
    pub version: crate::values::Version,
    /// The pushed manifest's digest, when the event gives a well-formed
    /// `sha256:` one: what the deploy is pinned to.
    pub digest: Option<crate::values::Digest>,
}

/// The tagged manifest pushes in an envelope, and how many events were
/// ignored. `hosts`, when not empty, are the registry's own names: images
/// are named by them, not by the hosts the payload carries (which the
/// pusher's Host header decides).
pub fn parse(body: &[u8], hosts: &[String]) -> Result<(Vec<Pushed>, usize), TriggerError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| TriggerError::BadPayload(format!("not JSON: {e}")))?;
    let events = v["events"].as_array().ok_or_else(|| TriggerError::BadPayload("no \"events\" array: not a registry notification envelope".into()))?;
    let mut out = Vec::new();
    let mut ignored = 0;
    for e in events {
        let target = &e["target"];
        let tag = target["tag"].as_str().unwrap_or("");
        let media = target["mediaType"].as_str().unwrap_or("");
        let is_manifest = media.contains("manifest") || media.contains("image.index");
        if e["action"].as_str() != Some("push") || tag.is_empty() || !is_manifest {
            ignored += 1;
            continue;
        }
        let id = e["id"].as_str().unwrap_or("");
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(TriggerError::BadPayload(format!("event id {id:?} is not an id")));
        }
        let version = crate::values::Version::parse(tag)
            .map_err(|_| TriggerError::BadPayload(format!("tag {tag:?} is not a version (letters, digits, '.', '_', '-', '+'; at most 128)")))?;
        let repo = target["repository"].as_str().unwrap_or("").to_ascii_lowercase();
        let url_host = target["url"].as_str().and_then(|u| u.split_once("://")).and_then(|(_, rest)| rest.split('/').next()).unwrap_or("");
        let request_host = e["request"]["host"].as_str().unwrap_or("");
        let from_payload = [request_host, url_host];
        let named_by: Vec<&str> = if hosts.is_empty() { from_payload.to_vec() } else { hosts.iter().map(String::as_str).collect() };
        let mut images: Vec<crate::values::Image> =
            named_by.iter().filter(|h| !h.is_empty()).filter_map(|h| crate::values::Image::parse(&format!("{}/{repo}", h.to_ascii_lowercase())).ok()).collect();
        images.dedup();
        if images.is_empty() {
            let on = if hosts.is_empty() { format!("host {request_host:?}") } else { format!("hosts {hosts:?}") };
            return Err(TriggerError::BadPayload(format!("repository {repo:?} on {on} is not an image name")));
        }
        let digest = target["digest"].as_str().filter(|d| d.starts_with("sha256:")).and_then(|d| crate::values::Digest::parse(d).ok());
        out.push(Pushed { id: id.to_string(), images, version, digest });
    }
    Ok((out, ignored))
}

/// `Authorization: Bearer <token>` against the configured token, in
/// constant time.
pub fn verify(token: &[u8], header: Option<&str>) -> Result<(), TriggerError> {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).ok_or(TriggerError::Unauthenticated("no Authorization: Bearer header"))?;
    // Compare HMACs of both under a fixed key: equal length, constant time.
    use hmac::Mac;
    let mut a = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"slipway token compare").map_err(|_| TriggerError::Unauthenticated("no usable token"))?;
    a.update(token);
    let expected = a.finalize().into_bytes();
    let mut b = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"slipway token compare").map_err(|_| TriggerError::Unauthenticated("no usable token"))?;
    b.update(given.as_bytes());
    b.verify_slice(&expected).map_err(|_| TriggerError::Unauthenticated("the bearer token does not match"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(action: &str, tag: &str, media: &str) -> Vec<u8> {
        serde_json::json!({"events": [{
            "id": "320678d8-ca14-430f-8bb6-4ca139cd83f7", "timestamp": "2026-11-26T10:00:00Z", "action": action,
            "target": {"mediaType": media, "digest": "sha256:fc6a51919cfeb2e6763f62b6d9e8815acbf7cd2e476ea353743570610737b752",
                "repository": "team/Web", "url": "http://registry.example.org:5000/v2/team/web/manifests/sha256:fc6a", "tag": tag},
            "request": {"host": "127.0.0.1:5000", "method": "PUT"}}]})
        .to_string()
        .into_bytes()
    }

    const MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

    #[test]
    fn a_tagged_manifest_push_is_a_version_and_the_rest_is_ignored() {
        let (pushed, ignored) = parse(&envelope("push", "1.4.0", MANIFEST), &[]).unwrap();
        assert_eq!(ignored, 0);
        assert_eq!(pushed[0].images, ["127.0.0.1:5000/team/web", "registry.example.org:5000/team/web"]);
        // With the registry's own names configured, the payload's hosts
        // (the pusher's Host header) name nothing.
        let (pushed, _) = parse(&envelope("push", "1.4.0", MANIFEST), &["registry.internal:5000".to_string()]).unwrap();
        assert_eq!(pushed[0].images, ["registry.internal:5000/team/web"]);
        assert_eq!(pushed[0].version, "1.4.0");
        assert_eq!(pushed[0].digest.as_deref(), Some("fc6a51919cfeb2e6763f62b6d9e8815acbf7cd2e476ea353743570610737b752"), "the deploy is pinned to it");
        let short = String::from_utf8(envelope("push", "1.4.0", MANIFEST))
            .unwrap()
            .replace("sha256:fc6a51919cfeb2e6763f62b6d9e8815acbf7cd2e476ea353743570610737b752", "sha256:fc6a");
        assert_eq!(parse(short.as_bytes(), &[]).unwrap().0[0].digest, None, "a malformed digest is not used: the tag is resolved instead");
        for (action, tag, media) in
            [("pull", "1.4.0", MANIFEST), ("push", "", MANIFEST), ("push", "1.4.0", "application/octet-stream"), ("delete", "1.4.0", MANIFEST)]
        {
            assert_eq!(parse(&envelope(action, tag, media), &[]).unwrap(), (vec![], 1), "{action} {tag:?} {media}");
        }
        assert!(parse(&envelope("push", "$(touch x)", MANIFEST), &[]).is_err());
        assert!(parse(b"{}", &[]).is_err());
    }

    #[test]
    fn the_bearer_token_must_match() {
        assert!(verify(b"tok", Some("Bearer tok")).is_ok());
        assert!(verify(b"tok", Some("Bearer tok2")).is_err());
        assert!(verify(b"tok", Some("tok")).is_err());
        assert!(verify(b"tok", None).is_err());
    }
}
