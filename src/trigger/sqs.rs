//! Deploy requests read from an SQS queue (`[sqs] queue_url`): what a
//! message body means, pure. Two shapes are read:
//! - Slipway's own, the body of `POST /api/v1/published`
//!   ([`crate::api::wire::PublishedRequest`]: `image` or `service`,
//!   `version`, optional `digest` and `id`);
//! - EventBridge's "ECR Image Action" event (a rule on `aws.ecr` whose
//!   target is the queue): a successful tagged push names the image
//!   `ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY`.
//!
//! Every string is checked against a strict pattern here, before anything
//! uses it. The consumer (`sqs_consumer.rs`, with the `aws` feature) hands
//! a [`Request`] to the same path as `/api/v1/published`.

use serde::Deserialize;

use crate::values::{Digest, Image, Version};

/// The largest body read (SQS allows 1 MiB; a deploy request is small).
pub const MAX_BODY: usize = 256 * 1024;

/// A queue URL, checked: `http(s)://HOST/ACCOUNT/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUrl {
    pub url: String,
    pub name: String,
    /// The region AWS's own host names (`sqs.REGION.amazonaws.com`).
    pub region: Option<String>,
}

impl QueueUrl {
    pub fn parse(s: &str) -> Result<QueueUrl, String> {
        let bad = |why: &str| format!("{s:?} is not an SQS queue URL ({why}); e.g. \"https://sqs.eu-west-1.amazonaws.com/123456789012/deploys\"");
        let u = reqwest::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(bad("not http(s)"));
        }
        let host = u.host_str().ok_or_else(|| bad("no host"))?.to_ascii_lowercase();
        if !u.username().is_empty() || u.password().is_some() || u.query().is_some() || u.fragment().is_some() {
            return Err(bad("credentials, a query or a fragment"));
        }
        let parts: Vec<&str> = u.path().trim_matches('/').split('/').collect();
        let [account, name] = parts[..] else { return Err(bad("the path is not /ACCOUNT/QUEUE")) };
        if account.is_empty() || account.len() > 12 || !account.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad("the account is not 12 digits"));
        }
        if !queue_name_ok(name) {
            return Err(bad("a queue name is 1 to 80 letters, digits, '-' and '_', optionally ending in .fifo"));
        }
        let region = host.strip_prefix("sqs.").and_then(|h| h.strip_suffix(".amazonaws.com")).filter(|r| region_ok(r)).map(str::to_string);
        Ok(QueueUrl { url: s.trim_end_matches('/').to_string(), name: name.to_string(), region })
    }
}

fn queue_name_ok(n: &str) -> bool {
    let base = n.strip_suffix(".fifo").unwrap_or(n);
    !base.is_empty() && n.len() <= 80 && base.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn region_ok(r: &str) -> bool {
    !r.is_empty() && r.len() <= 32 && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// An SQS message id (a UUID from AWS; letters, digits and '-').
pub fn message_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 100 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// What a message asks for: the fields of `PublishedRequest`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub what: What,
    pub version: Version,
    pub digest: Option<Digest>,
    /// The publication's id: the sender's, or one derived from the
    /// message (its id and the digest), so a redelivery of the message is
    /// the same publication to the published path's key dedup.
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Image(Image),
    Service(String),
}

/// What a body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Deploy(Request),
    /// Well-formed, nothing to deploy (an ECR delete, a failed or untagged
    /// push): deleted, with the reason logged.
    Ignored(String),
}

/// Slipway's own shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Own {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    service: Option<String>,
    version: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

/// EventBridge's envelope (only what is read).
#[derive(Deserialize)]
struct Envelope {
    id: Option<String>,
    #[serde(rename = "detail-type")]
    detail_type: String,
    source: String,
    account: Option<String>,
    region: Option<String>,
    detail: serde_json::Value,
}

#[derive(Deserialize)]
struct EcrDetail {
    #[serde(rename = "action-type")]
    action_type: String,
    result: String,
    #[serde(rename = "repository-name")]
    repository_name: String,
    #[serde(rename = "image-digest")]
    image_digest: Option<String>,
    #[serde(rename = "image-tag")]
    image_tag: Option<String>,
}

/// Read one message body. `message_id` is SQS's id of the message (the
/// same on every redelivery). An `Err` is a malformed message, saying what
/// is wrong: it is left to the queue's redrive policy.
pub fn parse(message_id: &str, body: &str) -> Result<Message, String> {
    if !message_id_ok(message_id) {
        return Err(format!("message id {:?} is not an SQS message id", cut(message_id)));
    }
    if body.len() > MAX_BODY {
        return Err(format!("body of {} bytes, more than {MAX_BODY}", body.len()));
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("detail-type").is_some() || v.get("source").is_some() {
        return ecr_event(message_id, v);
    }
    let own: Own = serde_json::from_value(v).map_err(|e| format!("not a deploy request (image or service, version, optional digest and id): {e}"))?;
    let version = Version::parse(&own.version).map_err(|e| e.to_string())?;
    let what = match (own.image, own.service) {
        (Some(i), None) => What::Image(Image::parse(&i.to_ascii_lowercase()).map_err(|e| e.to_string())?),
        (None, Some(s)) if crate::config::valid_name(&s) => What::Service(s),
        (None, Some(s)) => return Err(format!("service {:?} is not a service name", cut(&s))),
        _ => return Err("name either `image` or `service`".into()),
    };
    let digest = own.digest.as_deref().map(Digest::parse).transpose().map_err(|e| e.to_string())?;
    let id = match own.id {
        Some(id) if id_ok(&id) => id,
        Some(id) => return Err(format!("id {:?}: 1 to 256 printable characters", cut(&id))),
        None => derived_id(message_id, digest.as_ref()),
    };
    Ok(Message::Deploy(Request { what, version, digest, id }))
}

fn ecr_event(message_id: &str, v: serde_json::Value) -> Result<Message, String> {
    let e: Envelope = serde_json::from_value(v).map_err(|e| format!("not an EventBridge event: {e}"))?;
    if e.source != "aws.ecr" || e.detail_type != "ECR Image Action" {
        return Err(format!("an EventBridge event of {:?} from {:?}: only ECR Image Action events from aws.ecr are read", cut(&e.detail_type), cut(&e.source)));
    }
    let d: EcrDetail = serde_json::from_value(e.detail).map_err(|e| format!("not an ECR Image Action's detail: {e}"))?;
    if d.action_type != "PUSH" {
        return Ok(Message::Ignored(format!("ECR {} of {}", cut(&d.action_type), cut(&d.repository_name))));
    }
    if d.result != "SUCCESS" {
        return Ok(Message::Ignored(format!("ECR push of {} did not succeed ({})", cut(&d.repository_name), cut(&d.result))));
    }
    let Some(tag) = d.image_tag.filter(|t| !t.is_empty()) else {
        return Ok(Message::Ignored(format!("untagged ECR push of {}", cut(&d.repository_name))));
    };
    let account = e.account.ok_or("an ECR event without `account`")?;
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("account {:?} is not 12 digits", cut(&account)));
    }
    let region = e.region.ok_or("an ECR event without `region`")?;
    if !region_ok(&region) {
        return Err(format!("region {:?} is not an AWS region", cut(&region)));
    }
    let image = Image::parse(&format!("{account}.dkr.ecr.{region}.amazonaws.com/{}", d.repository_name)).map_err(|e| e.to_string())?;
    let version = Version::parse(&tag).map_err(|e| e.to_string())?;
    let digest = d.image_digest.as_deref().map(Digest::parse).transpose().map_err(|e| e.to_string())?;
    // EventBridge's own id names the event across its retries; SQS's the
    // message across redeliveries.
    let from = match e.id.filter(|i| message_id_ok(i)) {
        Some(event) => format!("ecr:{event}"),
        None => message_id.to_string(),
    };
    let id = derived_id(&from, digest.as_ref());
    Ok(Message::Deploy(Request { what: What::Image(image), version, digest, id }))
}

/// `sqs:MESSAGE[:DIGEST]`.
fn derived_id(from: &str, digest: Option<&Digest>) -> String {
    match digest {
        Some(d) => format!("sqs:{from}:sha256:{d}"),
        None => format!("sqs:{from}"),
    }
}

fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control)
}

/// A value quoted in a reason, cut to a readable length.
fn cut(s: &str) -> String {
    if s.chars().count() > 80 { format!("{}…", s.chars().take(80).collect::<String>()) } else { s.to_string() }
}

/// How long a malformed message stays invisible after its `receive_count`th
/// receive: the queue's visibility timeout, doubled each time, at most an
/// hour. It comes back only to be counted by the redrive policy, never
/// blocking the messages behind it.
pub fn backoff(visibility: u32, receive_count: u32) -> u32 {
    let base = visibility.max(1);
    base.saturating_mul(1 << receive_count.clamp(1, 12).saturating_sub(1)).min(3600)
}

/// When to extend a message's visibility while it is handled: at half its
/// visibility timeout (at least one second in).
pub fn extend_every(visibility: u32) -> std::time::Duration {
    std::time::Duration::from_millis((u64::from(visibility) * 500).max(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MID: &str = "6a7e1d55-2d9b-4ef3-9a4c-0e3f0f3f2a11";
    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn deploy(body: &str) -> Request {
        match parse(MID, body) {
            Ok(Message::Deploy(r)) => r,
            other => panic!("{body}: {other:?}"),
        }
    }

    fn ecr(detail: serde_json::Value) -> String {
        serde_json::json!({
            "version": "0", "id": "e1b2c3d4-0000-1111-2222-333344445555", "detail-type": "ECR Image Action", "source": "aws.ecr",
            "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "eu-west-1", "resources": [], "detail": detail
        })
        .to_string()
    }

    #[test]
    fn issue16_sqs_reads_slipways_own_shape() {
        let r = deploy(r#"{"image": "Registry.example.com/Team/web", "version": "1.4.0"}"#);
        assert_eq!(r.what, What::Image(Image::parse("registry.example.com/team/web").unwrap()));
        assert_eq!((r.version.as_str(), r.digest.clone(), r.id.as_str()), ("1.4.0", None, format!("sqs:{MID}").as_str()));

        let r = deploy(&format!(r#"{{"service": "api", "version": "2.0.0", "digest": "{D}"}}"#));
        assert_eq!(r.what, What::Service("api".into()));
        assert_eq!(r.id, format!("sqs:{MID}:{D}"), "the message and the digest");
        assert_eq!(r.digest.unwrap().as_str(), &D[7..]);

        let r = deploy(r#"{"service": "api", "version": "2.0.0", "id": "release-77"}"#);
        assert_eq!(r.id, "release-77", "the sender's own id wins");
    }

    #[test]
    fn issue16_sqs_reads_ecr_image_action_events() {
        let d = serde_json::json!({"action-type": "PUSH", "result": "SUCCESS", "repository-name": "team/web", "image-digest": D, "image-tag": "1.4.0"});
        let r = deploy(&ecr(d));
        assert_eq!(r.what, What::Image(Image::parse("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/web").unwrap()));
        assert_eq!(r.version.as_str(), "1.4.0");
        assert_eq!(r.id, format!("sqs:ecr:e1b2c3d4-0000-1111-2222-333344445555:{D}"), "EventBridge's event id and the digest");

        for (detail, why) in [
            (serde_json::json!({"action-type": "DELETE", "result": "SUCCESS", "repository-name": "web", "image-tag": "1"}), "ECR DELETE"),
            (serde_json::json!({"action-type": "PUSH", "result": "FAILURE", "repository-name": "web", "image-tag": "1"}), "did not succeed"),
            (serde_json::json!({"action-type": "PUSH", "result": "SUCCESS", "repository-name": "web", "image-digest": D}), "untagged"),
        ] {
            match parse(MID, &ecr(detail)) {
                Ok(Message::Ignored(w)) => assert!(w.contains(why), "{w}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn issue16_sqs_malformed_bodies_say_what_is_wrong() {
        let ok_detail = serde_json::json!({"action-type": "PUSH", "result": "SUCCESS", "repository-name": "web", "image-tag": "1.0"});
        let mut other_source: serde_json::Value = serde_json::from_str(&ecr(ok_detail.clone())).unwrap();
        other_source["source"] = "aws.s3".into();
        let mut bad_account: serde_json::Value = serde_json::from_str(&ecr(ok_detail)).unwrap();
        bad_account["account"] = "12; rm -rf /".into();
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not JSON"),
            ("[]".into(), "not a deploy request"),
            (r#"{"version": "1.0"}"#.into(), "either `image` or `service`"),
            (r#"{"image": "a/b", "service": "x", "version": "1.0"}"#.into(), "either `image` or `service`"),
            (r#"{"image": "a/b", "version": "1.0", "colour": "blue"}"#.into(), "unknown field"),
            (r#"{"image": "a/b", "version": "1.0 --rm"}"#.into(), "invalid version"),
            (r#"{"image": "a/b", "version": "-x"}"#.into(), "invalid version"),
            (r#"{"image": "a b/../c", "version": "1.0"}"#.into(), "invalid image"),
            (r#"{"service": "$(id)", "version": "1.0"}"#.into(), "not a service name"),
            (r#"{"image": "a/b", "version": "1.0", "digest": "sha256:abc"}"#.into(), "invalid digest"),
            (r#"{"image": "a/b", "version": "1.0", "id": ""}"#.into(), "id"),
            (other_source.to_string(), "only ECR Image Action"),
            (bad_account.to_string(), "not 12 digits"),
            (ecr(serde_json::json!({"action-type": "PUSH", "result": "SUCCESS", "repository-name": "web", "image-tag": "1.0;reboot"})), "invalid version"),
            (ecr(serde_json::json!({"action-type": "PUSH", "result": "SUCCESS", "repository-name": "../x", "image-tag": "1.0"})), "invalid image"),
            (ecr(serde_json::json!({"result": "SUCCESS"})), "detail"),
            (format!(r#"{{"image": "a/b", "version": "1.0", "id": "{}"}}"#, "x".repeat(300)), "id"),
            (" ".repeat(MAX_BODY + 1), "more than"),
        ];
        for (body, why) in cases {
            match parse(MID, &body) {
                Err(e) => assert!(e.contains(why), "{}: {e} (expected {why:?})", cut(&body)),
                Ok(m) => panic!("{} was read: {m:?}", cut(&body)),
            }
        }
        assert!(parse("x/../y", r#"{"image": "a/b", "version": "1.0"}"#).is_err(), "a message id with other characters");
    }

    #[test]
    fn issue16_sqs_queue_urls_are_checked() {
        let q = QueueUrl::parse("https://sqs.eu-west-1.amazonaws.com/123456789012/deploys").unwrap();
        assert_eq!((q.name.as_str(), q.region.as_deref()), ("deploys", Some("eu-west-1")));
        let q = QueueUrl::parse("http://127.0.0.1:5000/123456789012/deploys.fifo").unwrap();
        assert_eq!((q.name.as_str(), q.region), ("deploys.fifo", None));
        for bad in [
            "sqs.eu-west-1.amazonaws.com/123/q",
            "ftp://h/123456789012/q",
            "https://h/123456789012",
            "https://h/123456789012/q/x",
            "https://h/abc/q",
            "https://h/123456789012/q%20x",
            "https://u:p@h/123456789012/q",
            "https://h/123456789012/q?x=1",
        ] {
            assert!(QueueUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issue16_sqs_backoff_grows_and_is_capped() {
        assert_eq!((backoff(30, 1), backoff(30, 2), backoff(30, 3)), (30, 60, 120));
        assert_eq!(backoff(0, 1), 1);
        assert_eq!(backoff(30, 1000), 3600);
        assert_eq!(extend_every(30), std::time::Duration::from_secs(15));
        assert_eq!(extend_every(1), std::time::Duration::from_secs(1));
    }
}
