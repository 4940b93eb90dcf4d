//! The CLI's client of the HTTP API. Every request has a timeout; errors
//! say which server and what it answered.

use std::time::Duration;

use serde::de::DeserializeOwned;

use super::exit;
use crate::api::wire::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Slipway server at {url}: {reason}\nhint: start it with `slipway serve`, or point --server / SLIPWAY_SERVER at it")]
    Unreachable { url: String, reason: String },
    #[error(
        "cannot talk to the Slipway server at {url} over TLS: {reason}\nhint: a server with a certificate of its own CA needs --cacert FILE / SLIPWAY_CACERT with that CA"
    )]
    Untrusted { url: String, reason: String },
    #[error("{message}")]
    Api { status: u16, kind: String, message: String, problems: Vec<Problem> },
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } | ClientError::Untrusted { .. } => exit::UNAVAILABLE,
            ClientError::Api { status: 404, .. } => exit::NOT_FOUND,
            ClientError::Api { kind, .. } if kind == "invalid_config" => exit::INVALID_CONFIG,
            // As `plan` without `--env`: a usage mistake, whoever noticed.
            ClientError::Api { kind, .. } if kind == "environment_required" => exit::USAGE,
            ClientError::Api { status: 503, .. } => exit::UNAVAILABLE,
            ClientError::Api { status: 401 | 403, .. } => exit::NOT_ALLOWED,
            ClientError::Api { status, .. } if (400..500).contains(status) => exit::REJECTED,
            _ => exit::INTERNAL,
        }
    }
}

/// The certificates of a `--cacert` PEM file; an error names the file and
/// says what was wrong.
pub fn read_cacert(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--cacert {}: cannot read it: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&bytes)
        .map_err(|e| format!("--cacert {}: not readable as PEM certificates: {}", path.display(), crate::http::error_chain(&e)))?;
    if certs.is_empty() {
        return Err(format!("--cacert {}: found no certificate in it; expected PEM blocks starting -----BEGIN CERTIFICATE-----", path.display()));
    }
    Ok(certs)
}

pub struct Client {
    base: String,
    http: reqwest::Client,
    stream_http: reqwest::Client,
}

impl Client {
    /// `token`: sent as `Authorization: Bearer` on every request.
    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self::with_roots(base, token, None)
    }

    /// [`Client::new`] trusting only `roots` (from `--cacert`, see
    /// [`read_cacert`]) for an https server, instead of the system's.
    pub fn with_roots(base: &str, token: Option<&str>, roots: Option<&[reqwest::Certificate]>) -> Self {
        let base = base.trim_end_matches('/').to_string();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token
            && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
        {
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        // A connection idle for less than the server keeps one (30 s,
        // `api::serve::HEAD_READ`) is never reused just as it closes it.
        let trust = |b: reqwest::ClientBuilder| {
            let b = b.pool_idle_timeout(Duration::from_secs(20));
            match roots {
                Some(r) => b.tls_certs_only(r.iter().cloned()),
                None => b,
            }
        };
        let http = crate::http::client(|b| trust(b).default_headers(headers.clone()).connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(30)))
            .unwrap_or_default();
        // Streams stay open for long; the server sends keep-alives, so a
        // silent connection for a minute is a dead one.
        let stream_http =
            crate::http::client(|b| trust(b).default_headers(headers.clone()).connect_timeout(Duration::from_secs(5)).read_timeout(Duration::from_secs(60)))
                .unwrap_or_default();
        Client { base, http, stream_http }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn decode<T: DeserializeOwned>(&self, url: &str, resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable { url: url.into(), reason: e.to_string() })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol { url: url.into(), reason: e.to_string() });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => Err(ClientError::Api { status: status.as_u16(), kind: b.error.kind, message: b.error.message, problems: b.error.problems }),
            Err(_) => Err(ClientError::Api {
                status: status.as_u16(),
                kind: "http".into(),
                message: format!("{status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(500)])),
                problems: vec![],
            }),
        }
    }

    fn unreachable(&self, url: &str, e: reqwest::Error) -> ClientError {
        // A connect error's root cause says what failed: refused, no
        // route, or (https) the server's certificate.
        let reason = if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_connect() {
            let mut root: &dyn std::error::Error = &e;
            while let Some(next) = root.source() {
                root = next;
            }
            root.to_string()
        } else {
            e.to_string()
        };
        // TLS mistakes get their own hint: the server is up.
        let lower = reason.to_lowercase();
        if lower.contains("causedasendentity") {
            return ClientError::Untrusted {
                url: url.into(),
                reason: format!(
                    "{reason} (the server's certificate is a CA's, basicConstraints CA:TRUE, which clients refuse for a server; `openssl req -x509` makes one unless given -addext basicConstraints=critical,CA:FALSE)"
                ),
            };
        }
        if lower.contains("certificate") || lower.contains("unknownissuer") {
            return ClientError::Untrusted { url: url.into(), reason };
        }
        if lower.contains("corrupt message") || lower.contains("invalidcontenttype") {
            return ClientError::Untrusted { url: url.into(), reason: format!("{reason} (does the server speak plain http? then --server needs http://)") };
        }
        ClientError::Unreachable { url: url.into(), reason }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        let resp = self.http.get(&url).send().await.map_err(|e| self.unreachable(&url, e))?;
        self.decode(&url, resp).await
    }

    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        let url = self.url(path);
        let resp = self.http.post(&url).json(body).send().await.map_err(|e| self.unreachable(&url, e))?;
        self.decode(&url, resp).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        let resp = self.http.delete(&url).send().await.map_err(|e| self.unreachable(&url, e))?;
        self.decode(&url, resp).await
    }

    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        let resp = self.http.post(&url).send().await.map_err(|e| self.unreachable(&url, e))?;
        self.decode(&url, resp).await
    }

    /// Follow the SSE log stream, calling `on_line` per line, until the
    /// `end` event; reconnects (resuming after the last seq) if the
    /// connection drops. Returns the final deployment.
    pub async fn follow_logs(&self, id: i64, job: Option<&str>, mut on_line: impl FnMut(&LogLine)) -> Result<Deployment, ClientError> {
        use futures_util::StreamExt;
        let mut last: i64 = 0;
        let mut failures = 0;
        loop {
            let mut url = format!("{}/api/v1/deployments/{id}/logs/stream?after={last}", self.base);
            if let Some(j) = job {
                url.push_str(&format!("&job={j}"));
            }
            let resp = match self.stream_http.get(&url).send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => return self.decode(&url, r).await,
                Err(e) => {
                    failures += 1;
                    if failures > 5 {
                        return Err(self.unreachable(&url, e));
                    }
                    tokio::time::sleep(Duration::from_millis(500 * failures)).await;
                    continue;
                }
            };
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            let (mut event, mut data) = (String::new(), String::new());
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { break };
                failures = 0;
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(pos) = buf.find('\n') {
                    let line: String = buf.drain(..=pos).collect();
                    let line = line.trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        match event.as_str() {
                            "line" => {
                                if let Ok(l) = serde_json::from_str::<LogLine>(&data) {
                                    last = l.seq;
                                    on_line(&l);
                                }
                            }
                            "end" => {
                                return serde_json::from_str::<Deployment>(&data)
                                    .map_err(|e| ClientError::Protocol { url: url.clone(), reason: e.to_string() });
                            }
                            _ => {}
                        }
                        event.clear();
                        data.clear();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
            }
            failures += 1;
            if failures > 5 {
                return Err(ClientError::Unreachable { url, reason: "the log stream kept dropping".into() });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}
