//! The consumer that stores job output: batches [`Event::JobOutput`] lines
//! and appends them to the store, and writes what it holds when the
//! stream ends.

use std::sync::Arc;
use std::time::Duration;

use super::Event;
use crate::store::{NewLogLine, Store};

/// Lines kept in memory while the store does not answer; past this the
/// oldest are dropped (and counted) rather than growing without bound.
const MAX_BUFFERED: usize = 50_000;

/// When the stream ends (the node stops), how long a store that refuses
/// the last lines is asked again. The node's own stop deadline is longer.
const LAST_FLUSH: Duration = Duration::from_secs(5);

pub async fn run(store: Arc<dyn Store>, mut events: super::Subscription) {
    let mut buf: Vec<NewLogLine> = Vec::new();
    let mut dropped = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut flush_now = tokio::select! {
            ev = events.recv() => match ev {
                None => { last_flush(&*store, &mut buf, &mut dropped).await; return; }
                Some(ev) => take(&ev, &mut buf),
            },
            _ = tick.tick() => true,
        };
        // Take everything already queued before writing: one transaction
        // for many lines and many finished jobs, not one per job.
        while let Some(ev) = events.try_recv() {
            flush_now |= take(&ev, &mut buf);
        }
        if flush_now || buf.len() >= 1000 {
            flush(&*store, &mut buf, &mut dropped).await;
        }
    }
}

/// Ends when the stream does (every sender gone): what is held is written
/// before it returns, which the node awaits.
async fn last_flush(store: &dyn Store, buf: &mut Vec<NewLogLine>, dropped: &mut u64) {
    let until = tokio::time::Instant::now() + LAST_FLUSH;
    flush(store, buf, dropped).await;
    while !buf.is_empty() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        flush(store, buf, dropped).await;
    }
    if !buf.is_empty() {
        tracing::error!(lines = buf.len(), "store unavailable while stopping: job output lines not stored");
    }
}

/// Buffer an output line; true when the buffer should be written soon (a
/// job finished: its output should be readable at once).
fn take(ev: &Event, buf: &mut Vec<NewLogLine>) -> bool {
    match ev {
        Event::JobOutput { deployment, job_id, attempt, ts, stream, line, part } => {
            buf.push(NewLogLine { deployment_id: *deployment, job_id: *job_id, attempt: *attempt, ts: *ts, stream, line: line.clone(), part: part.clone() });
            false
        }
        Event::JobFinished { .. } => true,
        _ => false,
    }
}

async fn flush(store: &dyn Store, buf: &mut Vec<NewLogLine>, dropped: &mut u64) {
    if buf.is_empty() {
        return;
    }
    match store.append_logs(buf).await {
        Ok(()) => buf.clear(),
        Err(e) => {
            tracing::warn!(error = %e, lines = buf.len(), "cannot store job output yet; keeping it in memory");
            if buf.len() > MAX_BUFFERED {
                let excess = buf.len() - MAX_BUFFERED;
                buf.drain(..excess);
                *dropped += excess as u64;
                tracing::error!(dropped = *dropped, "store unavailable too long: dropped oldest job output lines");
            }
        }
    }
}
