//! Pushing images to a registry over its HTTP API (no Docker Engine):
//! blobs, a config with `created`, a v2 manifest under tags.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest as _;

use super::dockerkit;

pub const MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Pushes images to a registry over its HTTP API.
pub struct Pusher {
    http: reqwest::Client,
    base: String,
    pub repo: String,
    auth: Option<(String, String)>,
}

impl Pusher {
    pub fn new(reg: &dockerkit::Registry) -> Pusher {
        let http = slipway::http::builder().timeout(Duration::from_secs(20)).build().expect("client");
        Pusher { http, base: format!("http://127.0.0.1:{}", reg.port), repo: "demo".into(), auth: reg.auth.clone() }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    async fn blob(&self, bytes: &[u8]) -> String {
        let digest = sha(bytes);
        let r = self.req(reqwest::Method::POST, &format!("{}/v2/{}/blobs/uploads/", self.base, self.repo)).send().await.expect("start upload");
        assert_eq!(r.status().as_u16(), 202, "start upload: {:?}", r.text().await);
        let loc = r.headers()["location"].to_str().expect("location").to_string();
        let loc = if loc.starts_with('/') { format!("{}{loc}", self.base) } else { loc };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = self
            .req(reqwest::Method::PUT, &format!("{loc}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("upload");
        assert_eq!(r.status().as_u16(), 201, "upload: {:?}", r.text().await);
        digest
    }

    /// One image (its config says `created`), under each of `tags`;
    /// returns its manifest digest.
    pub async fn image(&self, created: &str, tags: &[&str]) -> String {
        let layer = format!("layer of the image created {created}").into_bytes();
        let layer_digest = self.blob(&layer).await;
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "created": created,
            "config": {}, "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
        }))
        .expect("json");
        let config_digest = self.blob(&config).await;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST_V2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": config_digest},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": layer_digest}]
        }))
        .expect("json");
        for tag in tags {
            let r = self
                .req(reqwest::Method::PUT, &format!("{}/v2/{}/manifests/{tag}", self.base, self.repo))
                .header("content-type", MANIFEST_V2)
                .body(manifest.clone())
                .send()
                .await
                .expect("put manifest");
            assert_eq!(r.status().as_u16(), 201, "put manifest {tag}: {:?}", r.text().await);
        }
        sha(&manifest)
    }

    /// The registry's answer to a manifest GET by digest (200 or 404).
    pub async fn manifest_status(&self, digest: &str) -> u16 {
        self.req(reqwest::Method::GET, &format!("{}/v2/{}/manifests/{digest}", self.base, self.repo))
            .header("accept", MANIFEST_V2)
            .send()
            .await
            .expect("get manifest")
            .status()
            .as_u16()
    }

    pub async fn tags(&self) -> BTreeSet<String> {
        let v: Value =
            self.req(reqwest::Method::GET, &format!("{}/v2/{}/tags/list", self.base, self.repo)).send().await.expect("tags").json().await.expect("json");
        v["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(str::to_string)).collect()
    }
}
