//! GitHub webhooks: the signature check and the payloads Slipway acts on.
//! Pure: bytes and headers in, a decision out; the API layer does the IO.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Published, TriggerError};

/// Check `X-Hub-Signature-256` (`sha256=<hex>`) over the raw body with the
/// webhook secret. The comparison is constant-time (`Mac::verify_slice`).
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), TriggerError> {
    verify_named(secret, body, header, "X-Hub-Signature-256")
}

/// [`verify`] for a signature header of another name (Slipway's own
/// `X-Slipway-Signature-256` has the same shape).
pub fn verify_named(secret: &[u8], body: &[u8], header: Option<&str>, name: &'static str) -> Result<(), TriggerError> {
    let header = header.ok_or(TriggerError::Unauthenticated(match name {
        "X-Hub-Signature-256" => "no X-Hub-Signature-256 header",
        _ => "no signature header",
    }))?;
    let malformed = TriggerError::Unauthenticated(match name {
        "X-Hub-Signature-256" => "X-Hub-Signature-256 is not sha256=<hex>",
        _ => "the signature is not sha256=<hex>",
    });
    let hex_sig = header.trim().strip_prefix("sha256=").ok_or(malformed.clone())?;
    let sig = hex::decode(hex_sig).map_err(|_| malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| TriggerError::Unauthenticated("no usable webhook secret"))?;
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| {
        TriggerError::Unauthenticated(match name {
            "X-Hub-Signature-256" => "X-Hub-Signature-256 does not match the body",
            _ => "the signature does not match the body",
        })
    })
}

/// The signature GitHub would send for `body` (tests, and `slipway` users
/// checking their setup).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a delivery asks of Slipway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// `ping`, sent when a webhook is created.
    Ping,
    /// A container image version was published.
    Published(Published),
    /// A push to a branch: environments whose config follows that branch
    /// of one of these repositories fetch it and decide on the new head.
    Push { branch: String, commit: String, repositories: Vec<String> },
    /// Understood, but nothing to do, and why ("a push to refs/tags/x",
    /// "package event without a tag").
    Ignored(String),
}

/// Read a delivery of event `event` (`X-GitHub-Event`). Strings from the
/// payload are checked against strict patterns before anything uses them.
pub fn parse(event: &str, body: &[u8]) -> Result<Delivery, TriggerError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| TriggerError::BadPayload(format!("not JSON: {e}")))?;
    match event {
        "ping" => Ok(Delivery::Ping),
        "registry_package" | "package" => {
            let action = v["action"].as_str().unwrap_or("");
            if action != "published" {
                return Ok(Delivery::Ignored(format!("{event} action {action:?}: only \"published\" deploys")));
            }
            let p = if event == "package" { &v["package"] } else { &v["registry_package"] };
            let version = &p["package_version"];
            let url = version["package_url"].as_str().unwrap_or("");
            let tag = version["container_metadata"]["tag"]["name"].as_str().unwrap_or("");
            if url.is_empty() {
                return Ok(Delivery::Ignored(format!("{event}: no package_url (not a container image)")));
            }
            if tag.is_empty() {
                return Ok(Delivery::Ignored(format!("{event}: {url} was published without a tag")));
            }
            // package_url is "host/owner/name:tag"; image names are lowercase.
            let image = url.strip_suffix(&format!(":{tag}")).or_else(|| url.strip_suffix(':')).unwrap_or(url).to_ascii_lowercase();
            let image = crate::values::Image::parse(&image).map_err(|_| TriggerError::BadPayload(format!("{event}: {image:?} is not an image name")))?;
            let tagged = crate::values::Version::parse(tag)
                .map_err(|_| TriggerError::BadPayload(format!("{event}: tag {tag:?} is not a version (letters, digits, '.', '_', '-', '+'; at most 128)")))?;
            // A container package version is named by its digest: what
            // tells this push of the tag from another one.
            let digest = ["version", "name"]
                .iter()
                .filter_map(|k| version[*k].as_str())
                .find(|d| d.starts_with("sha256:"))
                .and_then(|d| crate::values::Digest::parse(d).ok());
            Ok(Delivery::Published(Published { image, version: tagged, digest }))
        }
        "push" => {
            let r = v["ref"].as_str().unwrap_or("");
            let Some(branch) = r.strip_prefix("refs/heads/") else {
                return Ok(Delivery::Ignored(format!("push to {r:?}: only branches carry config")));
            };
            if !crate::config::environment::valid_branch(branch) {
                return Err(TriggerError::BadPayload(format!(
                    "push: branch {branch:?} is not a branch name Slipway accepts (letters, digits, '.', '_', '-', '/'; no '..')"
                )));
            }
            let commit = v["after"].as_str().unwrap_or("");
            if v["deleted"].as_bool() == Some(true) || commit.chars().all(|c| c == '0') {
                return Ok(Delivery::Ignored(format!("push deleted branch {branch}")));
            }
            if !crate::git::valid_commit(commit) {
                return Err(TriggerError::BadPayload(format!("push: {commit:?} is not a commit id")));
            }
            let repo = &v["repository"];
            let repositories = ["clone_url", "ssh_url", "git_url", "html_url", "url"].iter().filter_map(|k| repo[*k].as_str()).map(str::to_string).collect();
            Ok(Delivery::Push { branch: branch.to_string(), commit: commit.to_string(), repositories })
        }
        other => Ok(Delivery::Ignored(format!("event {other:?} is not one Slipway acts on"))),
    }
}

/// `X-GitHub-Delivery`: a GUID. Checked, since it becomes part of stored keys.
pub fn valid_delivery(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/github/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
    }

    #[test]
    fn a_good_signature_passes_and_a_bad_or_missing_one_does_not() {
        let body = br#"{"zen":"x"}"#;
        let good = sign(b"s3cret", body);
        assert!(verify(b"s3cret", body, Some(&good)).is_ok());
        assert!(verify(b"other", body, Some(&good)).is_err());
        assert!(verify(b"s3cret", b"{\"zen\":\"y\"}", Some(&good)).is_err());
        assert!(verify(b"s3cret", body, None).is_err());
        assert!(verify(b"s3cret", body, Some("sha1=abc")).is_err());
        assert!(verify(b"s3cret", body, Some("sha256=zz")).is_err());
    }

    #[test]
    fn the_fixtures_parse() {
        let pkg = fixture("registry-package-published-docker.json");
        // GitHub's sample has an empty tag name: nothing to deploy.
        assert!(matches!(parse("registry_package", &pkg), Ok(Delivery::Ignored(why)) if why.contains("without a tag")));
        let tagged = String::from_utf8_lossy(&pkg).replacen(r#""name": """#, r#""name": "1.4.0""#, 1);
        assert_eq!(
            parse("registry_package", tagged.as_bytes()).unwrap(),
            Delivery::Published(Published {
                image: "ghcr.io/codertocat/hello-world".parse().expect("image"),
                version: "1.4.0".parse().expect("version"),
                digest: Some("3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498".parse().expect("digest"))
            })
        );
        assert!(matches!(parse("push", &fixture("push.json")), Ok(Delivery::Ignored(why)) if why.contains("refs/tags/simple-tag")));
        let branch = String::from_utf8_lossy(&fixture("push.json"))
            .replace("refs/tags/simple-tag", "refs/heads/main")
            .replace("0000000000000000000000000000000000000000", "6113728f27ae82c7b1a177c8d03f9e96e0adf247")
            .replace("\"deleted\": true", "\"deleted\": false");
        match parse("push", branch.as_bytes()) {
            Ok(Delivery::Push { branch, commit, repositories }) => {
                assert_eq!(branch, "main");
                assert_eq!(commit, "6113728f27ae82c7b1a177c8d03f9e96e0adf247");
                assert!(repositories.contains(&"https://github.com/Codertocat/Hello-World.git".to_string()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn injection_in_a_tag_is_refused() {
        for tag in ["$(touch x)", "../../etc", "a b", "-rf", ""] {
            let body = serde_json::json!({"action": "published", "registry_package": {"package_version": {
                "package_url": format!("ghcr.io/o/web:{tag}"), "container_metadata": {"tag": {"name": tag}}}}});
            let r = parse("registry_package", body.to_string().as_bytes());
            assert!(!matches!(r, Ok(Delivery::Published(_))), "{tag:?} → {r:?}");
        }
        assert!(parse("registry_package", b"not json").is_err());
        for branch in ["$(touch x)", "../../etc", "-rf", "a..b", "x y"] {
            let body = serde_json::json!({"ref": format!("refs/heads/{branch}"), "after": "a".repeat(40), "repository": {"clone_url": "x"}});
            assert!(matches!(parse("push", body.to_string().as_bytes()), Err(TriggerError::BadPayload(_))), "{branch:?}");
        }
        let body = serde_json::json!({"ref": "refs/heads/main", "after": "$(id)"});
        assert!(parse("push", body.to_string().as_bytes()).is_err());
    }
}
