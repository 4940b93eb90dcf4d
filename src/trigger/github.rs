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
    /// A GitHub Actions workflow run that concluded with success: services
    /// whose `on_workflow` names it deploy (`trigger::decide_workflow`).
    WorkflowRun(super::WorkflowRun),
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
        "workflow_run" => workflow_run(&v),
        other => Ok(Delivery::Ignored(format!("event {other:?} is not one Slipway acts on"))),
    }
}

/// A `workflow_run` delivery: only `completed` with conclusion `success`
/// deploys (as GitHub Actions' own `if: github.event.workflow_run.conclusion
/// == 'success'`); every other action and conclusion is acknowledged with
/// the reason. A run of a fork's commit never deploys.
fn workflow_run(v: &serde_json::Value) -> Result<Delivery, TriggerError> {
    let run = &v["workflow_run"];
    let action = v["action"].as_str().unwrap_or("");
    let name = run["name"].as_str().or_else(|| v["workflow"]["name"].as_str()).unwrap_or("");
    let branch = run["head_branch"].as_str().unwrap_or("");
    let id = run["id"].as_u64();
    let attempt = run["run_attempt"].as_u64().unwrap_or(1);
    let what = format!("workflow {name:?} run {} (attempt {attempt}) on {branch:?}", id.map(|i| i.to_string()).unwrap_or_else(|| "?".into()));
    if action != "completed" {
        return Ok(Delivery::Ignored(format!("workflow_run action {action:?} for {what}: only a completed run deploys")));
    }
    match run["conclusion"].as_str() {
        Some("success") => {}
        Some(c) => return Ok(Delivery::Ignored(format!("{what} concluded {c:?}: only a successful run deploys"))),
        None => return Ok(Delivery::Ignored(format!("{what} completed without a conclusion: only a successful run deploys"))),
    }
    let Some(run_id) = id else { return Err(TriggerError::BadPayload("workflow_run: no workflow_run.id".into())) };
    let head_sha = run["head_sha"].as_str().unwrap_or("");
    if !crate::git::valid_commit(head_sha) {
        return Err(TriggerError::BadPayload(format!("workflow_run: head_sha {head_sha:?} is not a commit id")));
    }
    let repository = v["repository"]["full_name"].as_str().unwrap_or("");
    if let Some(head) = run["head_repository"]["full_name"].as_str()
        && !repository.is_empty()
        && !head.eq_ignore_ascii_case(repository)
    {
        return Ok(Delivery::Ignored(format!("{what} ran on a commit of {head:?}, not of {repository:?}: a fork's commit never deploys")));
    }
    Ok(Delivery::WorkflowRun(super::WorkflowRun {
        workflow: name.to_string(),
        path: v["workflow"]["path"].as_str().or_else(|| run["path"].as_str()).unwrap_or("").to_string(),
        branch: branch.to_string(),
        head_sha: head_sha.to_string(),
        run_id,
        run_number: run["run_number"].as_u64().unwrap_or(0),
        run_attempt: attempt,
        event: run["event"].as_str().unwrap_or("").to_string(),
        repository: repository.to_string(),
    }))
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

    /// A copy of a workflow_run fixture with `f` applied.
    fn run_with(name: &str, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&fixture(name)).expect("json");
        f(&mut v);
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn issue18_only_a_completed_successful_workflow_run_deploys_and_every_other_says_why() {
        match parse("workflow_run", &fixture("workflow-run-completed.json")) {
            Ok(Delivery::WorkflowRun(run)) => assert_eq!(
                run,
                super::super::WorkflowRun {
                    workflow: "CI".into(),
                    path: ".github/workflows/ci.yml".into(),
                    branch: "main".into(),
                    head_sha: "acb5820ced9479c074f688cc328bf03f341a511d".into(),
                    run_id: 30433642,
                    run_number: 562,
                    run_attempt: 1,
                    event: "push".into(),
                    repository: "octo-org/octo-repo".into(),
                }
            ),
            other => panic!("{other:?}"),
        }
        for (fixture_name, action) in [("workflow-run-requested.json", "requested"), ("workflow-run-in-progress.json", "in_progress")] {
            match parse("workflow_run", &fixture(fixture_name)) {
                Ok(Delivery::Ignored(why)) => {
                    assert!(why.starts_with(&format!("workflow_run action {action:?}")) && why.ends_with("only a completed run deploys"), "{why}")
                }
                other => panic!("{action}: {other:?}"),
            }
        }
        for conclusion in ["failure", "cancelled", "skipped", "timed_out", "action_required", "neutral", "stale", "startup_failure"] {
            let body = run_with("workflow-run-completed.json", |v| v["workflow_run"]["conclusion"] = conclusion.into());
            match parse("workflow_run", &body) {
                Ok(Delivery::Ignored(why)) => {
                    assert_eq!(why, format!("workflow \"CI\" run 30433642 (attempt 1) on \"main\" concluded {conclusion:?}: only a successful run deploys"))
                }
                other => panic!("{conclusion}: {other:?}"),
            }
        }
        let null = run_with("workflow-run-completed.json", |v| v["workflow_run"]["conclusion"] = serde_json::Value::Null);
        assert!(matches!(parse("workflow_run", &null), Ok(Delivery::Ignored(why)) if why.contains("without a conclusion")));
    }

    #[test]
    fn issue18_a_workflow_run_of_a_fork_or_with_a_bad_commit_never_deploys() {
        let fork = run_with("workflow-run-completed.json", |v| v["workflow_run"]["head_repository"]["full_name"] = "mallory/octo-repo".into());
        assert!(matches!(parse("workflow_run", &fork), Ok(Delivery::Ignored(why)) if why.contains("a fork's commit never deploys")), "fork");
        for sha in ["$(touch x)", "acb5820", "ACB5820CED9479C074F688CC328BF03F341A511D", ""] {
            let body = run_with("workflow-run-completed.json", |v| v["workflow_run"]["head_sha"] = sha.into());
            assert!(matches!(parse("workflow_run", &body), Err(TriggerError::BadPayload(m)) if m.contains("is not a commit id")), "{sha:?}");
        }
    }
}
