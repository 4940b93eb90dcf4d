//! A small Docker distribution (registry v2) client: what retention needs
//! and nothing more — list a repository's tags, resolve each to its
//! manifest digest and its image's `created`, delete a manifest by digest.
//!
//! Every request has a timeout. Credentials are the `[[registry]]` entry of
//! the image's host, read when the client is made and sent as basic auth
//! (or, for a registry that answers with a bearer challenge, exchanged at
//! its token service); they are never part of an error or a log line.
//! Plain HTTP is used only for a registry on the loopback host, as the
//! Docker Engine does; anything else is HTTPS.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{ACCEPT, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use sha2::Digest as _;

use super::TagInfo;
use crate::config::secret::{Credentials, RegistryAuth, registry_host};

/// One request (connect, send, read) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Tag lists are paged; a bound keeps a misbehaving registry from looping us.
const MAX_PAGES: usize = 1000;
const PAGE_SIZE: usize = 100;
/// Manifests, configs and tag pages are small JSON documents.
const MAX_DOCUMENT: usize = 8 << 20;
/// Tags resolved at once.
const PARALLEL: usize = 8;

/// What a registry can send back for a manifest. Without this `Accept`
/// the registry answers 404 (or a converted schema 1) for modern images.
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("registry {host} cannot be reached: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("registry {host} refused {who} (HTTP {status}) {what}")]
    Refused { host: String, who: String, status: u16, what: String },
    #[error("registry {host} does not allow deletes (HTTP 405 for {what}): set storage.delete.enabled in its config")]
    DeleteDisabled { host: String, what: String },
    #[error("registry {host} answered HTTP {status} {what}{detail}")]
    Status { host: String, what: String, status: u16, detail: String },
    #[error("registry {host} sent something unexpected {what}: {detail}")]
    Invalid { host: String, what: String, detail: String },
    #[error("registry {host}: {detail}")]
    Credentials { host: String, detail: String },
    #[error("{image:?} is not a repository retention can handle: {detail}")]
    BadImage { image: String, detail: String },
}

pub struct RegistryClient {
    http: reqwest::Client,
    /// As written in image names (`host[:port]`): how errors name it.
    host: String,
    /// `scheme://host[:port]` of the API.
    base: String,
    creds: Option<Credentials>,
    bearer: tokio::sync::Mutex<Option<String>>,
}

/// Whether `host[:port]` is this machine (plain HTTP allowed).
fn loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') { rest.split(']').next().unwrap_or("") } else { host.split(':').next().unwrap_or("") };
    name == "localhost" || name == "::1" || name.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// The repository path of `image` inside its registry (`team/web`).
fn repository(image: &str) -> Result<String, RetentionError> {
    let host = registry_host(image);
    let path = if host == "docker.io" {
        let p = image.strip_prefix("docker.io/").unwrap_or(image);
        if p.contains('/') { p.to_string() } else { format!("library/{p}") }
    } else {
        image[host.len()..].trim_start_matches('/').to_string()
    };
    // The path goes into URLs: only the registry's own grammar passes.
    let ok = !path.is_empty()
        && path.split('/').all(|c| {
            !c.is_empty() && c != "." && c != ".." && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok { Ok(path) } else { Err(RetentionError::BadImage { image: image.to_string(), detail: "not a lower-case registry/repository name".into() }) }
}

/// `sha256:` and 64 lower-case hex digits: the only digests used in a URL.
pub fn valid_digest(d: &str) -> bool {
    // Lower-case only: a digest in a URL is used exactly as the registry wrote it.
    d.strip_prefix("sha256:").is_some_and(|h| !h.bytes().any(|b| b.is_ascii_uppercase()) && crate::values::Digest::parse(h).is_ok())
}

/// The registry's tag grammar.
fn valid_tag(t: &str) -> bool {
    (1..=128).contains(&t.len()) && t.bytes().enumerate().all(|(i, b)| b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'.' | b'-')))
}

/// A bearer challenge's parameters (`realm`, `service`, `scope`).
fn challenge(headers: &HeaderMap) -> Option<HashMap<String, String>> {
    let v = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?;
    let rest = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))?;
    // key="value" pairs; a quoted value may hold commas (scope lists).
    let mut out = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let (v, tail) = match after.strip_prefix('"') {
            Some(q) => {
                let end = q.find('"')?;
                (&q[..end], &q[end + 1..])
            }
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.insert(k.trim().to_ascii_lowercase(), v.to_string());
        rest = tail.trim_start_matches([',', ' ']);
    }
    out.contains_key("realm").then_some(out)
}

impl RegistryClient {
    /// A client for `image`'s registry, with the credentials of the
    /// `[[registry]]` whose host it names (read now).
    pub fn for_image(image: &str, registries: &[RegistryAuth]) -> Result<RegistryClient, RetentionError> {
        let host = registry_host(image).to_string();
        repository(image)?;
        let creds = match registries.iter().find(|r| r.host == host) {
            Some(r) => Some(r.credentials().map_err(|detail| RetentionError::Credentials { host: host.clone(), detail })?),
            None => None,
        };
        let api = if host == "docker.io" { "registry-1.docker.io" } else { host.as_str() };
        let scheme = if loopback(&host) { "http" } else { "https" };
        let http = crate::http::client(|b| b.timeout(REQUEST_TIMEOUT).connect_timeout(CONNECT_TIMEOUT))
            .map_err(|e| RetentionError::Unreachable { host: host.clone(), detail: crate::http::error_chain(&e) })?;
        Ok(RegistryClient { http, base: format!("{scheme}://{api}"), host, creds, bearer: tokio::sync::Mutex::new(None) })
    }

    fn unreachable(&self, e: reqwest::Error) -> RetentionError {
        // reqwest's message names the URL; ours names the registry.
        RetentionError::Unreachable { host: self.host.clone(), detail: crate::http::error_chain(&e.without_url()) }
    }

    fn who(&self) -> String {
        match self.creds.as_ref().and_then(|c| c.username.as_deref()) {
            Some(u) => format!("the credentials of user {u:?}"),
            None if self.creds.as_ref().is_some_and(|c| c.token.is_some()) => "the configured token".into(),
            None => "anonymous access (no [[registry]] credentials for this host)".into(),
        }
    }

    /// Send, answering one bearer challenge by fetching a token.
    async fn send(&self, method: Method, url: &str, accept: Option<&str>) -> Result<reqwest::Response, RetentionError> {
        let mut challenged = false;
        loop {
            let mut req = self.http.request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let bearer = self.bearer.lock().await.clone();
            req = match (bearer, &self.creds) {
                (Some(t), _) => req.bearer_auth(t),
                (None, Some(Credentials { username: Some(u), password: Some(p), .. })) => req.basic_auth(u, Some(p.expose())),
                (None, Some(Credentials { token: Some(t), .. })) => req.bearer_auth(t.expose()),
                (None, _) => req,
            };
            let resp = req.send().await.map_err(|e| self.unreachable(e))?;
            if resp.status() == StatusCode::UNAUTHORIZED
                && !challenged
                && let Some(c) = challenge(resp.headers())
            {
                challenged = true;
                self.fetch_token(&c).await?;
                continue;
            }
            return Ok(resp);
        }
    }

    /// The token service of a bearer challenge (Docker Hub, GHCR…).
    async fn fetch_token(&self, c: &HashMap<String, String>) -> Result<(), RetentionError> {
        let realm = c.get("realm").cloned().unwrap_or_default();
        if !(realm.starts_with("https://") || (realm.starts_with("http://") && loopback(realm.trim_start_matches("http://").split('/').next().unwrap_or("")))) {
            return Err(RetentionError::Invalid {
                host: self.host.clone(),
                what: "in its auth challenge".into(),
                detail: "a token service that is not https".into(),
            });
        }
        let query: Vec<(&str, &str)> = ["service", "scope"].into_iter().filter_map(|k| c.get(k).map(|v| (k, v.as_str()))).collect();
        let url = reqwest::Url::parse_with_params(&realm, &query).map_err(|e| RetentionError::Invalid {
            host: self.host.clone(),
            what: "in its auth challenge".into(),
            detail: e.to_string(),
        })?;
        let mut req = self.http.get(url);
        if let Some(Credentials { username: Some(u), password: Some(p), .. }) = &self.creds {
            req = req.basic_auth(u, Some(p.expose()));
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(RetentionError::Refused {
                host: self.host.clone(),
                who: self.who(),
                status: resp.status().as_u16(),
                what: "at its token service".into(),
            });
        }
        let v: serde_json::Value = serde_json::from_slice(&self.body(resp, "from its token service").await?).map_err(|e| RetentionError::Invalid {
            host: self.host.clone(),
            what: "from its token service".into(),
            detail: e.to_string(),
        })?;
        let token = v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str()).filter(|t| !t.is_empty());
        match token {
            Some(t) => {
                *self.bearer.lock().await = Some(t.to_string());
                Ok(())
            }
            None => Err(RetentionError::Invalid { host: self.host.clone(), what: "from its token service".into(), detail: "no token in the answer".into() }),
        }
    }

    /// A body, read up to [`MAX_DOCUMENT`].
    async fn body(&self, resp: reqwest::Response, what: &str) -> Result<Vec<u8>, RetentionError> {
        let mut out = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| self.unreachable(e))?;
            if out.len() + chunk.len() > MAX_DOCUMENT {
                return Err(RetentionError::Invalid { host: self.host.clone(), what: what.into(), detail: format!("more than {MAX_DOCUMENT} bytes") });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// An error for an answer that is not the expected one.
    async fn status_error(&self, resp: reqwest::Response, what: String) -> RetentionError {
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RetentionError::Refused { host: self.host.clone(), who: self.who(), status: status.as_u16(), what };
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            return RetentionError::DeleteDisabled { host: self.host.clone(), what };
        }
        // The registry's own error message, bounded.
        let text = self.body(resp, &what).await.map(|b| String::from_utf8_lossy(&b).chars().take(300).collect::<String>()).unwrap_or_default();
        let detail = if text.trim().is_empty() { String::new() } else { format!(": {}", text.trim()) };
        RetentionError::Status { host: self.host.clone(), what, status: status.as_u16(), detail }
    }

    fn json(&self, bytes: &[u8], what: &str) -> Result<serde_json::Value, RetentionError> {
        serde_json::from_slice(bytes).map_err(|e| RetentionError::Invalid { host: self.host.clone(), what: what.into(), detail: e.to_string() })
    }

    /// Every tag of the repository (the `Link` header pages through them).
    pub async fn tags(&self, image: &str) -> Result<Vec<String>, RetentionError> {
        let repo = repository(image)?;
        let what = format!("listing the tags of {repo}");
        let mut url = format!("{}/v2/{repo}/tags/list?n={PAGE_SIZE}", self.base);
        let mut tags = Vec::new();
        for _ in 0..MAX_PAGES {
            let resp = self.send(Method::GET, &url, None).await?;
            // A repository nothing was ever pushed to has no tags.
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(tags);
            }
            if !resp.status().is_success() {
                return Err(self.status_error(resp, what).await);
            }
            let next = resp.headers().get(reqwest::header::LINK).and_then(|l| l.to_str().ok()).and_then(|l| {
                let (target, rel) = l.split_once(';')?;
                rel.contains("rel=\"next\"").then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_string())
            });
            let v = self.json(&self.body(resp, &what).await?, &what)?;
            for t in v.get("tags").and_then(|t| t.as_array()).into_iter().flatten() {
                match t.as_str() {
                    Some(t) if valid_tag(t) => tags.push(t.to_string()),
                    // Not deleting what one cannot name safely is not
                    // enough: its digest might be shared. Stop here.
                    other => {
                        return Err(RetentionError::Invalid {
                            host: self.host.clone(),
                            what,
                            detail: format!("a tag that is not a valid tag name: {other:?}"),
                        });
                    }
                }
            }
            match next {
                // Only links on this registry are followed.
                Some(n) if n.starts_with("/v2/") => url = format!("{}{n}", self.base),
                Some(n) if n.starts_with(&format!("{}/v2/", self.base)) => url = n,
                Some(n) => return Err(RetentionError::Invalid { host: self.host.clone(), what, detail: format!("a next page elsewhere: {n:?}") }),
                None => return Ok(tags),
            }
        }
        Err(RetentionError::Invalid { host: self.host.clone(), what, detail: format!("more than {MAX_PAGES} pages of tags") })
    }

    /// A manifest: its digest and its JSON. `None` when the registry has
    /// no such manifest (a tag whose manifest is gone).
    async fn manifest(&self, repo: &str, reference: &str) -> Result<Option<(String, serde_json::Value)>, RetentionError> {
        let what = format!("for manifest {repo}:{reference}");
        let resp = self.send(Method::GET, &format!("{}/v2/{repo}/manifests/{reference}", self.base), Some(MANIFEST_TYPES)).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.status_error(resp, what).await);
        }
        let header = resp.headers().get("docker-content-digest").and_then(|d| d.to_str().ok()).map(str::to_string);
        let bytes = self.body(resp, &what).await?;
        // The digest is that of the bytes; the header only saves hashing.
        let digest = header.filter(|d| valid_digest(d)).unwrap_or_else(|| format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))));
        Ok(Some((digest, self.json(&bytes, &what)?)))
    }

    /// The `created` of an image config blob, in Unix milliseconds.
    async fn created(&self, repo: &str, config_digest: &str) -> Result<Option<i64>, RetentionError> {
        if !valid_digest(config_digest) {
            return Ok(None);
        }
        let what = format!("for config blob {config_digest} of {repo}");
        let resp = self.send(Method::GET, &format!("{}/v2/{repo}/blobs/{config_digest}", self.base), None).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp, what).await);
        }
        let v = self.json(&self.body(resp, &what).await?, &what)?;
        Ok(v.get("created")
            .and_then(|c| c.as_str())
            .and_then(|c| humantime::parse_rfc3339_weak(c).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis().min(i64::MAX as u128) as i64))
    }

    /// A tag's digest and date. `None` for a tag whose manifest is gone.
    async fn resolve(&self, repo: &str, tag: &str) -> Result<Option<TagInfo>, RetentionError> {
        let Some((digest, m)) = self.manifest(repo, tag).await? else { return Ok(None) };
        let config = match m.get("manifests").and_then(|l| l.as_array()) {
            // An index: date it by its first image (they are built together).
            Some(list) => match list.first().and_then(|e| e.get("digest")).and_then(|d| d.as_str()).filter(|d| valid_digest(d)) {
                Some(child) => self.manifest(repo, child).await?.and_then(|(_, c)| c.pointer("/config/digest").and_then(|d| d.as_str()).map(str::to_string)),
                None => None,
            },
            None => m.pointer("/config/digest").and_then(|d| d.as_str()).map(str::to_string),
        };
        let created = match config {
            Some(c) => self.created(repo, &c).await?,
            None => None,
        };
        Ok(Some(TagInfo { tag: tag.to_string(), digest, created }))
    }

    /// Every tag with its digest and date. Any failure fails the whole
    /// repository: a tag whose digest is unknown could share one with a
    /// tag the policy would delete.
    pub async fn resolve_all(&self, image: &str) -> Result<Vec<TagInfo>, RetentionError> {
        let repo = repository(image)?;
        let tags = self.tags(image).await?;
        // Owned arguments: a borrowing closure here makes the future not
        // `Send` for the API's spawned task.
        let lookups: Vec<_> = tags
            .into_iter()
            .map(|t| {
                let repo = repo.clone();
                async move { self.resolve(&repo, &t).await }
            })
            .collect();
        let results: Vec<Result<Option<TagInfo>, RetentionError>> = futures_util::stream::iter(lookups).buffered(PARALLEL).collect().await;
        let mut out = Vec::new();
        for r in results {
            if let Some(t) = r? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Delete a manifest (and so every tag on it). Already gone is fine.
    pub async fn delete(&self, image: &str, digest: &str) -> Result<(), RetentionError> {
        let repo = repository(image)?;
        if !valid_digest(digest) {
            return Err(RetentionError::Invalid { host: self.host.clone(), what: format!("for {repo}"), detail: format!("not a sha256 digest: {digest:?}") });
        }
        let resp = self.send(Method::DELETE, &format!("{}/v2/{repo}/manifests/{digest}", self.base), Some(MANIFEST_TYPES)).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(self.status_error(resp, format!("deleting {repo}@{digest}")).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_speak_http() {
        for h in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.3.4.5", "[::1]:5000"] {
            assert!(loopback(h), "{h}");
        }
        for h in ["registry.example.org", "10.0.0.1:5000", "localhost.example.org", "[::2]:5000", ""] {
            assert!(!loopback(h), "{h}");
        }
    }

    #[test]
    fn repository_paths_follow_the_registry_grammar() {
        assert_eq!(repository("127.0.0.1:5000/team/web").unwrap(), "team/web");
        assert_eq!(repository("nginx").unwrap(), "library/nginx");
        assert_eq!(repository("team/web").unwrap(), "team/web");
        for bad in ["reg.example.org/../x", "reg.example.org/Team", "reg.example.org/", "reg.example.org/a//b", "reg.example.org/a?b"] {
            assert!(repository(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_and_tags_are_checked_before_use() {
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!valid_digest("sha256:../../x"));
        assert!(valid_tag("1.4.0") && valid_tag("latest") && valid_tag("v1_2-rc.1"));
        assert!(!valid_tag("") && !valid_tag(".x") && !valid_tag("a/b") && !valid_tag("$(touch x)") && !valid_tag(&"a".repeat(129)));
    }

    /// An https registry is spoken to over TLS: what reaches the socket
    /// is a TLS ClientHello (record type 22), and a failure names the
    /// registry, not "scheme is not http". tests/tls.rs has the full
    /// handshake with a real certificate.
    #[tokio::test]
    async fn an_https_registry_gets_a_tls_client_hello() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut head = [0u8; 3];
            sock.read_exact(&mut head).await.expect("read");
            head // dropped: the handshake ends here
        });
        let mut c = RegistryClient::for_image("registry.example.org/team/web", &[]).expect("client");
        assert_eq!(c.base, "https://registry.example.org");
        c.base = format!("https://127.0.0.1:{port}");
        let e = c.tags("registry.example.org/team/web").await.expect_err("the server hangs up");
        let head = server.await.expect("server");
        assert!(head[0] == 0x16 && head[1] == 0x03, "not a TLS handshake record: {head:?}");
        assert!(matches!(e, RetentionError::Unreachable { .. }) && e.to_string().starts_with("registry registry.example.org cannot be reached: "), "{e}");
        assert!(!e.to_string().contains("scheme is not http"), "{e}");
    }

    #[test]
    fn bearer_challenges_are_read() {
        let mut h = HeaderMap::new();
        h.insert(
            WWW_AUTHENTICATE,
            "Bearer realm=\"https://auth.example.org/token\",service=\"reg\",scope=\"repository:team/web:pull,delete\"".parse().unwrap(),
        );
        let c = challenge(&h).unwrap();
        assert_eq!(c["realm"], "https://auth.example.org/token");
        assert_eq!(c["service"], "reg");
        assert_eq!(c["scope"], "repository:team/web:pull,delete");
        h.insert(WWW_AUTHENTICATE, "Basic realm=\"x\"".parse().unwrap());
        assert!(challenge(&h).is_none());
    }
}
