//! Registry retention of ECR repositories (issue 16), through the real
//! binary: a service on ECS with `keep_tags` has its images listed and
//! deleted through the ECS target (DescribeImages, BatchDeleteImage) by
//! the same policy as any registry's — newest `keep_tags` kept by push
//! time, never a digest an environment runs or could roll back to.
//!
//! Against moto's server: the dry run (`plan`, `retention`) deletes
//! nothing, `--apply` deletes exactly the right digests (DescribeImages
//! asked afterwards). moto ignores `maxResults`, so pagination and the
//! 100-a-call batches are checked against the **scripted** AWS server
//! (tests/common/scripted_aws.rs) only.
//!
//! moto comes from PyPI (`scripts/test.sh` installs it and sets
//! `SLIPWAY_MOTO` to its virtualenv's bin directory); without it the moto
//! test is skipped with a note, unless `SLIPWAY_REQUIRE_MOTO=1`.
#![cfg(feature = "aws")]

mod common;

use common::moto::Moto;
#[path = "common/scripted_aws.rs"]
mod scripted_aws;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;
use slipway::store::ServiceRow;

fn fixture(m: &Moto, what: &str) -> Value {
    m.fixture("moto_ecr.py", what)
}

/// digest → its tags, as moto lists them.
fn images(v: &Value) -> BTreeMap<String, Vec<String>> {
    v.as_object()
        .expect("digest → tags")
        .iter()
        .map(|(d, tags)| (d.clone(), tags.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()))
        .collect()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

fn config(endpoint: &str, image: &str, keep: u32) -> tempfile::TempDir {
    common::config_dir(
        &format!(
            r#"
[aws]
region = "eu-west-1"
endpoint = "{endpoint}"

[[environment]]
name = "staging"
[[environment]]
name = "production"

[[service]]
name = "api"
target = "ecs"
cluster = "prod"
container = "app"
image = "{image}"
keep_tags = {keep}
"#
        ),
        &[],
    )
}

/// The store of the config in `dir` (the one `serve` and `plan` use).
fn store_url(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join(".slipway")).expect("mkdir");
    slipway::cli::serve::store_url(None, None, dir)
}

/// What a finished rollout of the image service records: the version and
/// the digest it pinned (the store keeps the row before as the version and
/// digest to roll back to).
fn row(dir: &Path, env: &str, version: &str, digest: &str) -> ServiceRow {
    let loaded = slipway::config::load(&dir.join("slipway.toml")).expect("config");
    let spec = loaded.config.services[0].spec.as_ref().expect("the service's spec");
    ServiceRow {
        environment: env.into(),
        service: "api".into(),
        version: version.into(),
        previous_version: None,
        spec: slipway::store::spec::encode_service(spec),
        revision: "r".into(),
        deployment_id: 1,
        updated_at: 0,
        artifact_dir: None,
        sha256: Some(digest.trim_start_matches("sha256:").to_string()),
        previous_sha256: None,
        target_ref: None,
    }
}

/// Record `rows` in order, as rollouts one after another record them.
fn record(dir: &Path, rows: Vec<ServiceRow>) {
    let url = store_url(dir);
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
        let store = slipway::store::open(&url).await.expect("store");
        for r in rows {
            store.set_service(r).await.expect("record");
        }
    });
}

/// The CLI with AWS's environment (`plan` asks ECR itself).
fn cli(server: &common::Server, dir: &Path, args: &[&str]) -> (Value, String) {
    let out = server.cli_command(dir, args).envs(AWS_ENV.iter().copied()).output().expect("run slipway");
    assert!(out.status.success(), "slipway {args:?}: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("slipway {args:?}: {e}: {}", text(&out)));
    (v, text(&out))
}

fn repo_of(v: &Value) -> &Value {
    assert_eq!(v["repositories"].as_array().map(|r| r.len()), Some(1), "{v:#}");
    let repo = &v["repositories"][0];
    assert!(repo["errors"].as_array().is_some_and(|e| e.is_empty()), "{v:#}");
    repo
}

fn to_delete(v: &Value) -> BTreeSet<String> {
    repo_of(v)["delete"].as_array().unwrap().iter().map(|d| d["digest"].as_str().unwrap().to_string()).collect()
}

fn deleted(v: &Value) -> BTreeSet<String> {
    repo_of(v)["delete"].as_array().unwrap().iter().filter(|d| d["deleted"] == true).map(|d| d["digest"].as_str().unwrap().to_string()).collect()
}

/// tag → its reasons, joined.
fn kept(v: &Value) -> BTreeMap<String, String> {
    repo_of(v)["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["tag"].as_str().unwrap().to_string(), k["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect::<Vec<_>>().join("; ")))
        .collect()
}

// moto: six images, 1.0.0 … 1.5.0 pushed in that order; `candidate` was
// on 1.2.0's image when staging pinned it, and has moved on to 1.5.0's.
// keep_tags = 1 keeps 1.5.0 (newest: moto dates pushes to the second, and
// between equal dates semver orders, a tag that is not semver below);
// staging runs `candidate`, now 1.5.0's, and 1.2.0's digest though no tag
// of it says so; production runs 1.1.0 and could roll back to 1.0.0.
// Only 1.3.0 and 1.4.0 go, and only with --apply.
#[test]
fn issue16_moto_ecr_retention_deletes_exactly_what_nothing_runs_or_could_roll_back_to() {
    let Some(m) = common::moto::start() else { return };
    let set = fixture(&m, "setup");
    let repo = set["repository"].as_str().unwrap().to_string();
    let digest = |tag: &str| set["digests"][tag].as_str().unwrap().to_string();
    let before = images(&set["images"]);
    assert_eq!(before.len(), 6, "{before:?}");
    assert_eq!(before[&digest("1.2.0")], vec!["1.2.0"], "candidate moved on (as ECR moves a tag): {before:?}");
    assert_eq!(before[&digest("1.5.0")], vec!["1.5.0", "candidate"], "{before:?}");

    let dir = config(&m.url, &repo, 1);
    record(
        dir.path(),
        vec![
            row(dir.path(), "production", "1.0.0", &digest("1.0.0")),
            row(dir.path(), "production", "1.1.0", &digest("1.1.0")),
            row(dir.path(), "staging", "candidate", &digest("candidate")),
        ],
    );
    let server = common::Server::start_with_env(dir.path(), Some(&store_url(dir.path())), &[], AWS_ENV);
    let doomed = BTreeSet::from([digest("1.3.0"), digest("1.4.0")]);

    // `plan` shows the dry run, listed from ECR by the CLI itself.
    let (plan, out) = cli(&server, dir.path(), &["--json", "plan", "--env", "production"]);
    assert_eq!(plan["retention"]["applied"], false, "{out}");
    assert_eq!(to_delete(&plan["retention"]), doomed, "{out}");

    // The API's dry run: the same, for the right reasons, nothing gone.
    let (dry, out) = cli(&server, dir.path(), &["--json", "retention"]);
    assert_eq!(dry["applied"], false, "{out}");
    assert_eq!(to_delete(&dry), doomed, "{out}");
    assert!(deleted(&dry).is_empty(), "{out}");
    let k = kept(&dry);
    assert_eq!(k.keys().map(String::as_str).collect::<Vec<_>>(), vec!["1.0.0", "1.1.0", "1.2.0", "1.5.0", "candidate"], "{out}");
    assert_eq!(k["1.5.0"], "newest 1", "{out}");
    assert!(k["candidate"].contains("staging runs it"), "{out}");
    assert!(k["1.1.0"].contains("production runs it"), "{out}");
    assert!(k["1.0.0"].contains("production could roll back to it"), "{out}");
    assert_eq!(k["1.2.0"], "staging runs it (candidate by digest)", "kept for its digest alone: {out}");
    assert_eq!(images(&fixture(&m, "images")), before, "the dry run deleted something");

    // Apply: exactly those two are gone, everything else is as it was.
    let (applied, out) = cli(&server, dir.path(), &["--json", "retention", "--apply"]);
    assert_eq!(applied["applied"], true, "{out}");
    assert_eq!(deleted(&applied), doomed, "{out}");
    let mut after = before.clone();
    after.retain(|d, _| !doomed.contains(d));
    assert_eq!(images(&fixture(&m, "images")), after, "{out}");

    // Again: nothing left to delete.
    let (again, out) = cli(&server, dir.path(), &["--json", "retention", "--apply"]);
    assert!(to_delete(&again).is_empty(), "{out}");
}

// Scripted: 1,100 images in one repository. Every page of DescribeImages
// is read (the newest images are on the last page), and the 1,100 − 10
// (keep_tags) − 2 (production runs one, could roll back to another)
// digests go in BatchDeleteImage calls of at most 100.
#[test]
fn issue16_scripted_ecr_retention_reads_every_page_and_deletes_in_batches_of_100() {
    use scripted_aws::{ACCOUNT, REGION, ScriptedAws, digest_of};
    let aws = ScriptedAws::start();
    let tags: Vec<String> = (0..1100).map(|i| format!("2.{i}.0")).collect();
    aws.push_images("big", tags.clone());
    let image = format!("{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/big");
    let dir = config(&aws.url, &image, 10);
    let sha = |t: &str| format!("sha256:{}", digest_of(t));
    record(dir.path(), vec![row(dir.path(), "production", "2.4.0", &sha("2.4.0")), row(dir.path(), "production", "2.5.0", &sha("2.5.0"))]);
    let server = common::Server::start_with_env(dir.path(), Some(&store_url(dir.path())), &[], AWS_ENV);

    let newest: BTreeSet<String> = tags[1090..].iter().map(|t| sha(t)).collect();
    let spared: BTreeSet<String> = newest.iter().cloned().chain([sha("2.5.0"), sha("2.4.0")]).collect();
    let doomed: BTreeSet<String> = tags.iter().map(|t| sha(t)).filter(|d| !spared.contains(d)).collect();
    assert_eq!(doomed.len(), 1088);

    let (dry, out) = cli(&server, dir.path(), &["--json", "retention"]);
    assert_eq!(to_delete(&dry), doomed, "every page read: {}", &out[..out.len().min(2000)]);
    let listed = aws.calls_of("DescribeImages");
    let listed: Vec<&Value> = listed.iter().filter(|c| c.get("imageIds").is_none()).collect();
    assert_eq!(listed.len(), 2, "1,100 images are two pages of 1,000: {listed:?}");
    assert!(listed.iter().all(|c| c["maxResults"].as_i64().is_some_and(|n| (1..=1000).contains(&n))), "{listed:?}");
    assert_eq!(listed[0].get("nextToken"), None);
    assert_eq!(listed[1]["nextToken"], "scripted-1000");
    assert!(aws.calls_of("BatchDeleteImage").is_empty(), "the dry run deleted");
    assert_eq!(aws.images_of("big").len(), 1100);

    let (applied, out) = cli(&server, dir.path(), &["--json", "retention", "--apply"]);
    assert_eq!(deleted(&applied), doomed, "{}", &out[..out.len().min(2000)]);
    let batches = aws.calls_of("BatchDeleteImage");
    assert_eq!(batches.len(), 11, "1,088 digests, 100 a call");
    let mut asked = BTreeSet::new();
    for b in &batches {
        let ids = b["imageIds"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 100, "{} ids in one call", ids.len());
        assert_eq!(b["repositoryName"], "big");
        assert_eq!(b["registryId"], ACCOUNT);
        for id in ids {
            assert!(asked.insert(id["imageDigest"].as_str().unwrap().to_string()), "{id} asked twice");
        }
    }
    assert_eq!(asked, doomed);
    let left: BTreeSet<String> = aws.images_of("big").into_iter().map(|(_, d)| format!("sha256:{d}")).collect();
    assert_eq!(left, spared);
}
