//! The SQS consumer (`[sqs] queue_url`): one long-polling reader per
//! installation, the node holding the store's `sqs` lease (renewed before
//! each receive, so another node takes over once the holder stops). The
//! lease saves work; it is not what makes a message deploy once: a
//! message is deleted only after its publication is recorded under an id
//! derived from the message, and the published path answers that id, and
//! each deployment's publication key, with what it started before.
//!
//! A malformed message is audited and left invisible for a growing
//! back-off ([`super::sqs::backoff`]): the queue's redrive policy moves it
//! to the dead-letter queue after its receive count, and the messages
//! behind it go on meanwhile. A message whose handling fails for a passing
//! reason (the store, an invalid config on disk) is treated the same way
//! without the audit row; the loop does not receive while the config on
//! disk is invalid, so such failures stay rare.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use tokio_util::sync::CancellationToken;

use super::sqs::{self, Message, What};
use crate::api::{AppState, Queued};
use crate::aws::Aws;
use crate::store::AuditEntry;

/// The store lease only one node holds.
pub const LEASE: &str = "sqs";

/// Connection, per attempt (a long poll is at most 20 s of it), whole call.
const CONNECT: Duration = Duration::from_secs(5);
const ATTEMPT: Duration = Duration::from_secs(40);
const OPERATION: Duration = Duration::from_secs(90);
/// How often the queue's visibility timeout is read again.
const VISIBILITY_FRESH: Duration = Duration::from_secs(300);

struct Queue {
    key: (Aws, String),
    client: aws_sdk_sqs::Client,
    /// The queue's visibility timeout (s), and when it was read.
    visibility: Option<(u32, tokio::time::Instant)>,
}

/// Run until `shutdown`: `node` is this node's id (the lease holder),
/// `lease` how long a holder that stops renewing keeps it.
pub async fn run(state: Arc<AppState>, node: String, lease: Duration, shutdown: CancellationToken) {
    let idle = (lease / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    // Shorter than the lease, so it is renewed in time between polls.
    let wait = (lease / 3).as_secs().clamp(1, 20) as i32;
    let mut queue: Option<Queue> = None;
    let mut holding = false;
    loop {
        // Cut short anywhere on shutdown: a message not deleted yet is
        // read again, and its publication's keys answer it then.
        let polled = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = poll_once(&state, &node, lease, wait, &mut queue, &mut holding) => r,
        };
        let pause = match polled {
            Ok(()) => None,
            Err(why) => {
                if let Some(w) = why {
                    tracing::warn!(queue = queue.as_ref().map(|q| q.key.1.as_str()).unwrap_or(""), "sqs: {w}");
                }
                Some(idle)
            }
        };
        if let Some(p) = pause {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(p) => {}
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    if holding {
        // Hand over now rather than when the lease lapses.
        let _ = tokio::time::timeout(Duration::from_secs(5), state.store.release_lease(LEASE, &node)).await;
    }
}

/// One receive and its messages. `Err(None)`: nothing to do now (no
/// `[sqs]`, another node holds the lease); `Err(Some(why))`: a failure
/// worth a warning. Either way the caller pauses.
async fn poll_once(state: &AppState, node: &str, lease: Duration, wait: i32, queue: &mut Option<Queue>, holding: &mut bool) -> Result<(), Option<String>> {
    // An invalid config on disk: no receive until it is fixed (a message
    // read now could only fail, and count towards the dead-letter queue).
    let loaded = state.submitter.config().await.map_err(|_| None)?;
    let Some(cfg) = loaded.config.sqs.clone() else {
        if std::mem::take(holding) {
            let _ = state.store.release_lease(LEASE, node).await;
        }
        return Err(None);
    };
    let aws: Aws = loaded.config.aws.clone();
    match state.store.try_lease(LEASE, node, lease).await {
        Ok(true) => {
            if !*holding {
                tracing::info!(queue = %cfg.queue.url, "sqs: this node reads the queue");
            }
            *holding = true;
        }
        Ok(false) => {
            *holding = false;
            return Err(None);
        }
        Err(e) => {
            *holding = false;
            return Err(Some(format!("cannot take the lease: {e}")));
        }
    }
    let key = (aws, cfg.queue.url.clone());
    if queue.as_ref().is_none_or(|q| q.key != key) {
        let client = client(&key.0, cfg.queue.region.as_deref()).await;
        *queue = Some(Queue { key, client, visibility: None });
    }
    let Some(q) = queue.as_mut() else { return Err(None) };
    let url = q.key.1.clone();
    let visibility = match q.visibility {
        Some((v, at)) if at.elapsed() < VISIBILITY_FRESH => v,
        _ => {
            let v = visibility_of(&q.client, &url).await.map_err(Some)?;
            q.visibility = Some((v, tokio::time::Instant::now()));
            v
        }
    };
    let receive = q
        .client
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .wait_time_seconds(wait)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .send();
    let got = receive.await.map_err(|e| Some(aws_error("ReceiveMessage", e)))?;
    let client = q.client.clone();
    for m in got.messages() {
        handle(state, &client, &url, visibility, m).await;
    }
    Ok(())
}

/// A client per region and endpoint: `[aws]`'s, else the queue URL's
/// region, else the standard chain's; credentials from the standard chain.
async fn client(aws: &Aws, queue_region: Option<&str>) -> aws_sdk_sqs::Client {
    let timeouts = crate::aws::Timeouts { connect: CONNECT, attempt: ATTEMPT, operation: OPERATION };
    aws_sdk_sqs::Client::new(&crate::aws::sdk_config(aws, queue_region, timeouts).await)
}

async fn visibility_of(client: &aws_sdk_sqs::Client, url: &str) -> Result<u32, String> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .send()
        .await
        .map_err(|e| aws_error("GetQueueAttributes", e))?;
    Ok(out.attributes().and_then(|a| a.get(&QueueAttributeName::VisibilityTimeout)).and_then(|v| v.parse().ok()).unwrap_or(30))
}

/// One message: deploy (then delete), ignore (delete), or leave it to
/// the redrive policy (malformed, or failed for a passing reason).
async fn handle(state: &AppState, client: &aws_sdk_sqs::Client, url: &str, visibility: u32, m: &aws_sdk_sqs::types::Message) {
    let (Some(id), Some(receipt)) = (m.message_id(), m.receipt_handle()) else { return };
    let body = m.body().unwrap_or_default();
    let count: u32 = m.attributes().and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount)).and_then(|c| c.parse().ok()).unwrap_or(1);
    let shown_id = if sqs::message_id_ok(id) { id } else { "(invalid id)" };
    let outcome = match sqs::parse(id, body) {
        Err(why) => Queued::Refused(why),
        Ok(Message::Ignored(why)) => {
            tracing::info!(message = shown_id, "sqs: nothing to deploy: {why}");
            Queued::Recorded(why)
        }
        Ok(Message::Deploy(r)) => {
            let (image, service) = match r.what {
                What::Image(i) => (Some(i.to_string()), None),
                What::Service(s) => (None, Some(s)),
            };
            let req = crate::api::wire::PublishedRequest {
                image,
                service,
                version: r.version.to_string(),
                digest: r.digest.map(|d| format!("sha256:{d}")),
                id: Some(r.id),
            };
            // Recorded, then deleted, the visibility extended meanwhile.
            let outcome = extending(client, url, receipt, visibility, crate::api::published_from_queue(state, req)).await;
            if let Queued::Recorded(note) = &outcome {
                audit(state, url, shown_id, 202, note.clone()).await;
            }
            outcome
        }
    };
    match outcome {
        Queued::Recorded(_) => {
            if let Err(e) = extending(client, url, receipt, visibility, client.delete_message().queue_url(url).receipt_handle(receipt).send()).await {
                // Read again later, and answered as a duplicate then.
                tracing::warn!(message = shown_id, "sqs: {}", aws_error("DeleteMessage", e));
            }
        }
        Queued::Refused(why) => {
            let detail =
                format!("malformed message {shown_id} (receive {count}), not deleted: the queue's redrive policy moves it to its dead-letter queue: {why}");
            tracing::warn!("sqs: {detail}");
            audit(state, url, shown_id, 400, detail).await;
            back_off(client, url, receipt, sqs::backoff(visibility, count), shown_id).await;
        }
        Queued::Later(why) => {
            tracing::warn!(message = shown_id, "sqs: not handled now (receive {count}), read again later: {why}");
            back_off(client, url, receipt, sqs::backoff(visibility, count), shown_id).await;
        }
    }
}

async fn back_off(client: &aws_sdk_sqs::Client, url: &str, receipt: &str, seconds: u32, id: &str) {
    let r = client.change_message_visibility().queue_url(url).receipt_handle(receipt).visibility_timeout(seconds as i32).send().await;
    if let Err(e) = r {
        tracing::warn!(message = id, "sqs: {}", aws_error("ChangeMessageVisibility", e));
    }
}

/// `work`, extending the message's visibility by its timeout every half
/// of it while `work` runs, so a slow store does not let another reader
/// take it meanwhile.
async fn extending<T>(client: &aws_sdk_sqs::Client, url: &str, receipt: &str, visibility: u32, work: impl std::future::Future<Output = T>) -> T {
    let every = sqs::extend_every(visibility);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                let r = client.change_message_visibility().queue_url(url).receipt_handle(receipt).visibility_timeout(visibility.max(1) as i32).send().await;
                if let Err(e) = r {
                    tracing::warn!("sqs: {}", aws_error("ChangeMessageVisibility", e));
                }
            }
        }
    }
}

async fn audit(state: &AppState, url: &str, id: &str, status: i64, detail: String) {
    // Which node read it: with several, only the lease holder does.
    let detail = format!("{detail} (read by node {})", state.node);
    let entry = AuditEntry {
        id: 0,
        at: crate::store::now_ms(),
        actor: "sqs".into(),
        address: url.to_string(),
        action: format!("SQS message {id}"),
        detail,
        status,
        environment: None,
    };
    if let Err(e) = state.store.record_audit(entry).await {
        tracing::warn!(error = %e, "cannot write the audit log");
    }
}

/// AWS's code and message, or why the call never reached AWS; never a
/// request's content.
fn aws_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    what: &str,
    e: SdkError<E, aws_sdk_sqs::config::http::HttpResponse>,
) -> String {
    crate::aws::call_error(what, e).message
}
