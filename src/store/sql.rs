//! [`Store`] over sqlx's `Any` driver, for SQLite and PostgreSQL.
//!
//! Placeholders are `$N` for both (sqlx-sqlite maps `$N` to index N).
//! Differences by dialect: DDL types, `FOR UPDATE [SKIP LOCKED]` (SQLite
//! has one writer, a pool of one connection, so its transactions never
//! interleave). The schema and its migrations: `super::migrate`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

pub struct SqlStore {
    inner: Arc<Inner>,
    /// Claims, finishes and log appends go through one task that commits
    /// whatever is queued in one transaction (group commit): on SQLite one
    /// WAL append for many jobs instead of one each; on PostgreSQL one
    /// commit (an fsync) and one hold of the deployment row's lock for
    /// many finishes instead of one each, which is what bounds a
    /// deployment's throughput there (its finishes serialize on that row).
    batch: mpsc::Sender<BatchOp>,
}

pub struct Inner {
    pool: AnyPool,
    dialect: Dialect,
    /// What a claim needs to know of a deployment (revision, environment,
    /// service, version, created_at). Immutable once stored, so cached.
    claim_info: std::sync::Mutex<HashMap<i64, ClaimInfo>>,
}

impl std::ops::Deref for SqlStore {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// One operation for the SQLite writer task, and where its answer goes.
struct BatchOp {
    work: Work,
    reply: oneshot::Sender<Result<BatchResult>>,
}

enum Work {
    Logs(Vec<NewLogLine>),
    Finish(FinishedAttempt),
    FinishClaim { done: FinishedAttempt, node: String, lease: Duration },
    Claim { node: String, lease: Duration, limit: i64 },
}

/// `$first, $first+1, …`: `n` numbered parameters for an `IN (…)` list.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// `($first, …), (…), …`: `rows` tuples of numbered parameters for a
/// multi-row `VALUES`, one per entry of `types`; a column with a type is
/// `CAST($n AS type)` (PostgreSQL cannot infer a parameter's type in a
/// bare `VALUES` list), one with `""` a bare `$n`.
fn value_rows(first: usize, rows: usize, types: &[&str]) -> String {
    let cols = types.len();
    (0..rows)
        .map(|r| {
            let row: Vec<String> = types
                .iter()
                .enumerate()
                .map(|(c, t)| {
                    let n = first + r * cols + c;
                    if t.is_empty() { format!("${n}") } else { format!("CAST(${n} AS {t})") }
                })
                .collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Work {
    /// The job a finish is about; claims and logs (no row lock on a
    /// deployment) sort first.
    fn job_id(&self) -> i64 {
        match self {
            Work::Finish(done) | Work::FinishClaim { done, .. } => done.job_id,
            Work::Logs(_) | Work::Claim { .. } => i64::MIN,
        }
    }
}

/// Most operations one transaction carries.
const MAX_BATCH: usize = 128;

async fn batcher(inner: Arc<Inner>, mut rx: mpsc::Receiver<BatchOp>) {
    let mut held = Held::default();
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        if inner.dialect == Dialect::Postgres {
            // A batch locks its finishes' deployment rows first, all at
            // once in id order (`lock_deployments_of`), then their job rows
            // in job id order, as a lease renewal does: two nodes' batches
            // never wait on each other in a circle. (If they ever did,
            // PostgreSQL would abort one, and its callers would be told.)
            ops.sort_by_key(|op| op.work.job_id());
        }
        let work: Vec<&Work> = ops.iter().map(|op| &op.work).collect();
        match inner.run_batch(&mut held, &work).await {
            // Answers go out only after the commit.
            Ok(results) => {
                for (op, result) in ops.into_iter().zip(results) {
                    let _ = op.reply.send(Ok(result));
                }
            }
            // Nothing to split, or the store could not answer at all (the
            // batch was not at fault, and running each alone would only
            // wait out the same timeout again per operation): every
            // caller gets the error, and retries as it does.
            Err(e) if ops.len() == 1 => {
                if let Some(op) = ops.into_iter().next() {
                    let _ = op.reply.send(Err(e));
                }
            }
            Err(StoreError::Unavailable(why)) => {
                for op in ops {
                    let _ = op.reply.send(Err(StoreError::Unavailable(why.clone())));
                }
            }
            // Something failed and the batch was rolled back: run each
            // alone, so one bad operation fails only itself.
            Err(_) => {
                for op in ops {
                    let result = inner.run_batch(&mut held, &[&op.work]).await.map(|mut r| r.remove(0));
                    let _ = op.reply.send(result);
                }
            }
        }
    }
}

impl SqlStore {
    /// Run `work` in the writer task's next group commit.
    async fn write(&self, work: Work) -> Result<BatchResult> {
        self.batched(&self.batch, work).await
    }

    /// Hand `work` to the SQLite writer task and wait for its committed answer.
    async fn batched(&self, batch: &mpsc::Sender<BatchOp>, work: Work) -> Result<BatchResult> {
        let stopped = || StoreError::Unavailable("store writer stopped".into());
        let (reply, rx) = oneshot::channel();
        batch.send(BatchOp { work, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn mismatch() -> StoreError {
    StoreError::Corrupt("store writer answered with the wrong kind of result".into())
}

enum BatchResult {
    Logs,
    FinishClaim(FinishEffect, Option<Box<ClaimedJob>>),
    Finish(FinishEffect),
    Claim(Vec<ClaimedJob>),
}

impl Inner {
    async fn append_logs_on(&self, tx: &mut sqlx::AnyConnection, lines: &[NewLogLine]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        for chunk in lines.chunks(100) {
            let q = format!("INSERT INTO logs (deployment_id, job_id, attempt, ts, stream, line, part) VALUES {}", value_rows(1, chunk.len(), &[""; 7]));
            let mut query = query_dyn(q);
            for l in chunk {
                query = query.bind(l.deployment_id).bind(l.job_id).bind(l.attempt).bind(l.ts).bind(l.stream).bind(l.line.clone()).bind(l.part.clone());
            }
            query.execute(&mut *tx).answered().await.map_err(StoreError::query("append logs"))?;
        }
        Ok(())
    }

    async fn claim_on(&self, conn: &mut sqlx::AnyConnection, node: &str, lease: Duration, limit: i64) -> Result<Vec<ClaimedJob>> {
        let now = now_ms();
        // The limit is written into the statement, not bound: SQLite
        // re-prepares a statement each time a bound LIMIT changes (its
        // planner may use the value), and a claim runs once per job. An
        // i64 formatted as digits cannot inject anything.
        let q = claim_update(&format!("id IN ({})", ready_select(&limit.max(0).to_string(), 3, self.for_update_skip())), 1, 2, 3);
        let rows = query_dyn(q).bind(node).bind(now + ms(lease)).bind(now).fetch_all(&mut *conn).answered().await.map_err(StoreError::query("claim"))?;
        self.claimed_jobs(conn, rows, now).await
    }

    /// The jobs of `claim_update`'s rows, with what each needs to know of
    /// its deployment (cached: it never changes).
    async fn claimed_jobs(&self, conn: &mut sqlx::AnyConnection, rows: Vec<AnyRow>, now: Millis) -> Result<Vec<ClaimedJob>> {
        let op = "claim";
        let mut rows: Vec<ClaimedRow> = rows.iter().map(ClaimedRow::of).collect::<std::result::Result<_, sqlx::Error>>().map_err(StoreError::query(op))?;
        // `RETURNING` comes in no set order; lowest id first, as claimed.
        rows.sort_by_key(|r| r.0);
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let dep = row.1;
            let cached = self.claim_info.lock().ok().and_then(|c| c.get(&dep).cloned());
            let info = match cached {
                Some(i) => i,
                None => {
                    let d = sqlx::query("SELECT revision, environment, service, version, created_at FROM deployments WHERE id = $1")
                        .bind(dep)
                        .fetch_one(&mut *conn)
                        .answered()
                        .await
                        .map_err(StoreError::query(op))?;
                    let f =
                        || -> std::result::Result<ClaimInfo, sqlx::Error> { Ok((d.try_get(0)?, d.try_get(1)?, d.try_get(2)?, d.try_get(3)?, d.try_get(4)?)) };
                    let info = f().map_err(StoreError::query(op))?;
                    self.remember(dep, &info);
                    info
                }
            };
            out.push(claimed_job(row, info, now));
        }
        Ok(out)
    }

    /// A job `slipway_write_batch` claimed, with its deployment's part.
    fn claimed_with_info(&self, (row, info): (ClaimedRow, ClaimInfo), now: Millis) -> ClaimedJob {
        self.remember(row.1, &info);
        claimed_job(row, info, now)
    }

    /// Cache what a claim needs of a deployment (it never changes).
    fn remember(&self, dep: i64, info: &ClaimInfo) {
        if let Ok(mut c) = self.claim_info.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(dep, info.clone());
        }
    }

    /// Runs inside the caller's transaction; on a stale fence it writes
    /// nothing and says so. What is common to many finishes is left to the
    /// caller (`run_ops_on`), which does it once for all of a transaction:
    /// the attempt's row goes to `attempts`; a job that became final is
    /// returned, so that its dependants can be made ready (if it
    /// succeeded) and its deployment checked for completion.
    async fn finish_on(&self, tx: &mut sqlx::AnyConnection, done: FinishedAttempt, attempts: &mut Vec<AttemptRecord>) -> Result<(FinishEffect, Option<Final>)> {
        // On PostgreSQL the caller has locked the deployment's row
        // (`lock_deployments_of`), so a cancel cannot slip between our
        // read of `cancel_requested` and our write. SQLite has one writer.
        if done.retry_at.is_some() {
            return self.finish_retry_on(tx, done, now_ms(), attempts).await;
        }
        let now = now_ms();
        let row = self.finish_many_on(tx, &[&done], now).await?.pop().flatten();
        self.finish_after(tx, &done, row, now, attempts).await
    }

    /// The common case of many finishes (none retried, each of a different
    /// job) in one statement: each job becomes final, fenced (another
    /// node's takeover matches nothing), and says what it was; `None` for
    /// a stale one. One round trip for a whole batch, not one per finish.
    async fn finish_many_on(&self, tx: &mut sqlx::AnyConnection, dones: &[&FinishedAttempt], now: Millis) -> Result<Vec<Option<FinishedRow>>> {
        let mut found: HashMap<i64, FinishedRow> = HashMap::with_capacity(dones.len());
        for chunk in dones.chunks(FINISH_CHUNK) {
            let q = format!("WITH {} {}", finish_values(chunk.len(), false), finish_update(self.for_update(), "NULL"));
            for r in bind_finishes(query_dyn(q).bind(now), chunk, false).fetch_all(&mut *tx).answered().await.map_err(StoreError::query("finish job"))? {
                let (id, row) = finished_row(&r)?;
                found.insert(id, row);
            }
        }
        Ok(dones.iter().map(|d| found.remove(&d.job_id)).collect())
    }

    /// PostgreSQL's `finish_many_on`, which also writes the attempts' rows
    /// and makes ready the dependants of the jobs that succeeded (in a
    /// deployment not being cancelled), in the same statement: three
    /// round trips of a batch in one (issue 19). Returns the rows, and how
    /// many jobs became ready by deployment. Its sub-statements share one
    /// snapshot, in which the finishing jobs are still running; the
    /// dependants' check counts those that succeeded as done. They touch
    /// different rows (running ones, pending ones), as PostgreSQL asks of
    /// data-modifying `WITH`. The deployments are locked before this
    /// statement starts (`lock_deployments_of`), so its snapshot already sees
    /// every other finish of the same deployments. `slipway_write_batch`
    /// (migration 6) runs the same statement for PostgreSQL's common batch:
    /// a change to one is a new migration for the other.
    async fn finish_many_released_on(
        &self,
        tx: &mut sqlx::AnyConnection,
        dones: &[&FinishedAttempt],
        now: Millis,
    ) -> Result<(Vec<Option<FinishedRow>>, HashMap<i64, u64>)> {
        let op = "finish job";
        let mut found: HashMap<i64, FinishedRow> = HashMap::with_capacity(dones.len());
        let mut ready: HashMap<i64, u64> = HashMap::new();
        for chunk in dones.chunks(FINISH_CHUNK) {
            let q = format!(
                "WITH {}, f AS ({}), \
                 a AS (INSERT INTO attempts (job_id, attempt, node, started_at, finished_at, outcome, exit_code, reason) \
                   SELECT f.id, f.attempt, v.node, v.started_at, $1, v.outcome, v.exit_code, v.reason FROM f JOIN v ON v.id = f.id ORDER BY f.id), \
                 r AS (UPDATE jobs SET state = 'ready', ready_at = $1 WHERE state = 'pending' \
                   AND id IN (SELECT n.job_id FROM job_needs n JOIN f ON f.id = n.need_id WHERE f.state = 'succeeded' AND f.cancel_requested = 0) \
                   AND NOT EXISTS (SELECT 1 FROM job_needs n JOIN jobs j2 ON j2.id = n.need_id WHERE n.job_id = jobs.id AND j2.state <> 'succeeded' \
                     AND j2.id NOT IN (SELECT id FROM f WHERE state = 'succeeded')) \
                   RETURNING deployment_id) \
                 SELECT id, deployment_id, name, attempt, state, cancel_requested, CAST(0 AS BIGINT) FROM f \
                 UNION ALL SELECT 0, deployment_id, '', 0, '', 0, CAST(1 AS BIGINT) FROM r",
                finish_values(chunk.len(), true),
                finish_update(self.for_update(), "NULL")
            );
            for r in bind_finishes(query_dyn(q).bind(now), chunk, true).fetch_all(&mut *tx).answered().await.map_err(StoreError::query(op))? {
                if r.try_get::<i64, _>(6).map_err(StoreError::query(op))? == 1 {
                    *ready.entry(r.try_get(1).map_err(StoreError::query(op))?).or_default() += 1;
                } else {
                    let (id, row) = finished_row(&r)?;
                    found.insert(id, row);
                }
            }
        }
        Ok((dones.iter().map(|d| found.remove(&d.job_id)).collect(), ready))
    }

    /// SQLite's `finish_many_released_on`, which also claims the next job
    /// for each finish that wants one (`next`: the claimer, and per finish
    /// whether it wants one), all in one query: one hand-off to sqlx's
    /// SQLite thread instead of one per statement (issue 19). SQLite has
    /// no data-modifying `WITH`, but the statements of one query run in
    /// order, each seeing what the ones before it wrote. So the jobs the
    /// first statement made final carry a mark (`FINISHED_MARK` as their
    /// lease) by which the later ones tell them from stale finishes, and
    /// the last statement clears it; SQLite has one writer, so nothing
    /// else ever sees it. The claim comes before `finish_after` cancels
    /// what a cancelled deployment has not started: there is none to
    /// claim, since `cancel` cancels those jobs in the transaction that
    /// sets the flag, and nothing makes a job of such a deployment ready
    /// after it. Returns the rows, how many jobs became ready by
    /// deployment, and the claimed jobs, lowest id first.
    async fn finish_many_released_sqlite_on(
        &self,
        tx: &mut sqlx::AnyConnection,
        dones: &[&FinishedAttempt],
        next: Option<(&str, Duration, &[bool])>,
        now: Millis,
    ) -> Result<(Vec<Option<FinishedRow>>, HashMap<i64, u64>, Vec<ClaimedJob>)> {
        let op = "finish job";
        let mark = FINISHED_MARK;
        let mut found: HashMap<i64, FinishedRow> = HashMap::with_capacity(dones.len());
        let mut ready: HashMap<i64, u64> = HashMap::new();
        let mut claimed = Vec::new();
        for (c, chunk) in dones.chunks(FINISH_CHUNK).enumerate() {
            let n = chunk.len();
            let ids: Vec<String> = (0..n).map(|k| format!("${}", 2 + FINISH_COLS * k)).collect();
            let all = ids.join(", ");
            let v = finish_values(n, true);
            let mut q = format!(
                "WITH {v} {}; \
                 WITH {v} INSERT INTO attempts (job_id, attempt, node, started_at, finished_at, outcome, exit_code, reason) \
                   SELECT j.id, j.attempt, v.node, v.started_at, $1, v.outcome, v.exit_code, v.reason FROM v JOIN jobs j ON j.id = v.id \
                   WHERE j.lease_until = {mark} ORDER BY j.id; \
                 UPDATE jobs SET state = 'ready', ready_at = $1 WHERE state = 'pending' \
                   AND id IN (SELECT n.job_id FROM job_needs n JOIN jobs f ON f.id = n.need_id JOIN deployments d ON d.id = f.deployment_id \
                     WHERE n.need_id IN ({all}) AND f.lease_until = {mark} AND f.state = 'succeeded' AND d.cancel_requested = 0) \
                   AND NOT EXISTS (SELECT 1 FROM job_needs n JOIN jobs j2 ON j2.id = n.need_id WHERE n.job_id = jobs.id AND j2.state <> 'succeeded') \
                   RETURNING deployment_id; ",
                finish_update("", mark)
            );
            // The id parameters of the chunk's finishes that want a next job.
            let wanting: Vec<&str> = match next {
                Some((_, _, wants)) => ids.iter().zip(&wants[c * FINISH_CHUNK..]).filter(|(_, w)| **w).map(|(id, _)| id.as_str()).collect(),
                None => Vec::new(),
            };
            if !wanting.is_empty() {
                let limit = format!("(SELECT count(*) FROM jobs f WHERE f.id IN ({}) AND f.lease_until = {mark})", wanting.join(", "));
                q.push_str(&claim_update(&format!("id IN ({})", ready_select(&limit, 1, "")), 2 + FINISH_COLS * n, 3 + FINISH_COLS * n, 1));
                q.push_str("; ");
            }
            q.push_str(&format!("UPDATE jobs SET lease_until = NULL WHERE id IN ({all}) AND lease_until = {mark}"));
            let mut query = bind_finishes(query_dyn(q).bind(now), chunk, true);
            if let (false, Some((node, lease, _))) = (wanting.is_empty(), next) {
                query = query.bind(node.to_string()).bind(now + ms(lease));
            }
            let mut claims = Vec::new();
            // Each statement's rows have their own width: 6 (the finishes),
            // 1 (the released), 7 (the claimed).
            for r in query.fetch_all(&mut *tx).answered().await.map_err(StoreError::query(op))? {
                match r.columns().len() {
                    6 => {
                        let (id, row) = finished_row(&r)?;
                        found.insert(id, row);
                    }
                    1 => *ready.entry(r.try_get(0).map_err(StoreError::query(op))?).or_default() += 1,
                    7 => claims.push(r),
                    _ => return Err(mismatch()),
                }
            }
            claimed.extend(self.claimed_jobs(tx, claims, now).await?);
        }
        Ok((dones.iter().map(|d| found.remove(&d.job_id)).collect(), ready, claimed))
    }

    /// What follows a finish that became final (`row`; `None`: stale):
    /// its attempt row for the caller to write, and what its outcome does
    /// to the rest of its deployment.
    async fn finish_after(
        &self,
        tx: &mut sqlx::AnyConnection,
        done: &FinishedAttempt,
        row: Option<FinishedRow>,
        now: Millis,
        attempts: &mut Vec<AttemptRecord>,
    ) -> Result<(FinishEffect, Option<Final>)> {
        let op = "finish job";
        let Some(FinishedRow { deployment_id: dep_id, name, attempt, state: new_state, cancel_requested }) = row else {
            return Ok((FinishEffect { stale: true, ..Default::default() }, None));
        };
        attempts.push(AttemptRecord::of(done, attempt, now));
        if cancel_requested {
            sqlx::query("UPDATE jobs SET state = 'cancelled', reason = 'deployment cancelled before the job started', finished_at = $1 WHERE deployment_id = $2 AND state IN ('pending', 'ready')")
                .bind(now)
                .bind(dep_id)
                .execute(&mut *tx)
                .answered().await
                .map_err(StoreError::query(op))?;
        } else if new_state == JobState::Succeeded.as_str() {
            // Its dependants: made ready by the caller.
        } else {
            // Everything downstream of a failure is skipped, and says why.
            sqlx::query(
                "WITH RECURSIVE down(id) AS (SELECT job_id FROM job_needs WHERE need_id = $1 \
                 UNION SELECT n.job_id FROM job_needs n JOIN down ON n.need_id = down.id) \
                 UPDATE jobs SET state = 'skipped', finished_at = $2, reason = $3 WHERE id IN (SELECT id FROM down) AND state IN ('pending', 'ready')",
            )
            .bind(done.job_id)
            .bind(now)
            .bind(format!("not run: it needs {name:?} (directly or through other jobs), which {new_state}"))
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        }
        let succeeded = !cancel_requested && new_state == JobState::Succeeded.as_str();
        Ok((FinishEffect::default(), Some(Final { job_id: done.job_id, deployment_id: dep_id, succeeded })))
    }

    /// A failed attempt that will be retried (unless its deployment is
    /// being cancelled, which makes it final). Rare: read, then write.
    async fn finish_retry_on(
        &self,
        tx: &mut sqlx::AnyConnection,
        done: FinishedAttempt,
        now: Millis,
        attempts: &mut Vec<AttemptRecord>,
    ) -> Result<(FinishEffect, Option<Final>)> {
        let op = "finish job";
        let r = sqlx::query(
            "SELECT j.attempt, j.fence, j.state, d.cancel_requested, j.lease_until FROM jobs j JOIN deployments d ON d.id = j.deployment_id WHERE j.id = $1",
        )
        .bind(done.job_id)
        .fetch_optional(&mut *tx)
        .answered()
        .await
        .map_err(StoreError::query(op))?
        .ok_or_else(|| StoreError::Corrupt(format!("no job with id {}", done.job_id)))?;
        let f = || -> std::result::Result<(i64, i64, String, bool, Option<i64>), sqlx::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get::<i64, _>(3)? != 0, r.try_get(4)?))
        };
        let (attempt, fence, state, cancel_requested, lease_until) = f().map_err(StoreError::query(op))?;
        let renewed = done.takeover && lease_until.is_none_or(|l| l >= now);
        if fence != done.fence || state != "running" || renewed {
            return Ok((FinishEffect { stale: true, ..Default::default() }, None));
        }
        if cancel_requested {
            // Not retried: final, through the common path.
            return Box::pin(self.finish_on(tx, FinishedAttempt { retry_at: None, ..done }, attempts)).await;
        }
        attempts.push(AttemptRecord::of(&done, attempt, now));
        sqlx::query(
            "UPDATE jobs SET state = 'ready', not_before = $1, ready_at = $1, node = NULL, lease_until = NULL, exit_code = $2, reason = $3 WHERE id = $4",
        )
        .bind(done.retry_at)
        .bind(done.exit_code.map(i64::from))
        .bind(done.reason.clone().map(|r| format!("attempt {attempt}: {r}; retrying")))
        .bind(done.job_id)
        .execute(&mut *tx)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        Ok((FinishEffect::default(), None))
    }

    /// Every attempt row of a transaction in one statement (per 100),
    /// without their parts (`insert_parts_on`).
    async fn insert_attempts_on(&self, tx: &mut sqlx::AnyConnection, rows: &[AttemptRecord]) -> Result<()> {
        for chunk in rows.chunks(100) {
            let q = format!(
                "INSERT INTO attempts (job_id, attempt, node, started_at, finished_at, outcome, exit_code, reason) VALUES {}",
                value_rows(1, chunk.len(), &[""; 8])
            );
            let mut query = query_dyn(q);
            for a in chunk {
                query = query
                    .bind(a.job_id)
                    .bind(a.attempt)
                    .bind(a.node.clone())
                    .bind(a.started_at)
                    .bind(a.finished_at)
                    .bind(a.outcome)
                    .bind(a.exit_code)
                    .bind(a.reason.clone());
            }
            query.execute(&mut *tx).answered().await.map_err(StoreError::query("record attempts"))?;
        }
        Ok(())
    }

    /// The rows of the parts (hosts) of `rows`' attempts, one statement per 100.
    async fn insert_parts_on(&self, tx: &mut sqlx::AnyConnection, rows: impl Iterator<Item = &AttemptRecord>) -> Result<()> {
        let parts: Vec<(i64, i64, &crate::store::PartResult)> = rows.flat_map(|a| a.parts.iter().map(|p| (a.job_id, a.attempt, p))).collect();
        for chunk in parts.chunks(100) {
            let q = format!(
                "INSERT INTO attempt_parts (job_id, attempt, part, started_at, finished_at, outcome, exit_code, reason) VALUES {}",
                value_rows(1, chunk.len(), &[""; 8])
            );
            let mut query = query_dyn(q);
            for (job_id, attempt, p) in chunk {
                query = query
                    .bind(*job_id)
                    .bind(*attempt)
                    .bind(p.part.clone())
                    .bind(p.started_at)
                    .bind(p.finished_at)
                    .bind(p.outcome.as_str())
                    .bind(p.exit_code)
                    .bind(p.reason.clone());
            }
            query.execute(&mut *tx).answered().await.map_err(StoreError::query("record the hosts of attempts"))?;
        }
        Ok(())
    }

    /// Make ready every pending job whose needs have all succeeded, among
    /// the dependants of `succeeded` (jobs that just succeeded). Returns
    /// how many became ready, by deployment.
    async fn release_dependants_on(&self, tx: &mut sqlx::AnyConnection, succeeded: &[i64], now: Millis) -> Result<HashMap<i64, u64>> {
        let mut ready: HashMap<i64, u64> = HashMap::new();
        for chunk in succeeded.chunks(500) {
            let list = placeholders(2, chunk.len());
            let q = format!(
                "UPDATE jobs SET state = 'ready', ready_at = $1 WHERE state = 'pending' \
                 AND id IN (SELECT job_id FROM job_needs WHERE need_id IN ({})) \
                 AND NOT EXISTS (SELECT 1 FROM job_needs n JOIN jobs j2 ON j2.id = n.need_id WHERE n.job_id = jobs.id AND j2.state <> 'succeeded') \
                 RETURNING deployment_id",
                list
            );
            let mut query = query_dyn(q).bind(now);
            for id in chunk {
                query = query.bind(*id);
            }
            for r in query.fetch_all(&mut *tx).answered().await.map_err(StoreError::query("release dependants"))? {
                let dep: i64 = r.try_get(0).map_err(StoreError::query("release dependants"))?;
                *ready.entry(dep).or_default() += 1;
            }
        }
        Ok(ready)
    }

    /// Runs `ops` in one transaction, in three steps: every finish (and
    /// log append) in order; then, once for all the finishes, the attempt
    /// rows, the dependants that became ready, one claim for every finish
    /// that wants a next job, then the plain claims; then the completion
    /// checks, skipped for a deployment that has a job just made ready or
    /// handed out. A chain of jobs thus costs about two statements per
    /// job. The plain finishes' statement also writes their attempts and
    /// releases their dependants, before the other finishes' statements:
    /// on PostgreSQL one statement (`finish_many_released_on`), on SQLite
    /// one query that also claims their next jobs
    /// (`finish_many_released_sqlite_on`).
    async fn run_ops_on(&self, tx: &mut sqlx::AnyConnection, ops: &[&Work]) -> Result<Vec<BatchResult>> {
        let mut results: Vec<BatchResult> = Vec::with_capacity(ops.len());
        let mut attempts = Vec::new();
        // With whether its dependants were released already.
        let mut finals: Vec<(usize, Final, bool)> = Vec::new();
        // Finishes that want a next job, by the (node, lease) they claim with.
        let mut want: Vec<(usize, &str, Duration)> = Vec::new();
        // Plain claims, run after those (a finished job's slot goes on
        // first; the rest of what the batch made ready is theirs).
        let mut claims: Vec<(usize, &str, Duration, i64)> = Vec::new();
        if self.dialect == Dialect::Postgres {
            let finishing: Vec<i64> = ops
                .iter()
                .filter_map(|op| match op {
                    Work::Finish(done) | Work::FinishClaim { done, .. } => Some(done.job_id),
                    Work::Logs(_) | Work::Claim { .. } => None,
                })
                .collect();
            self.lock_deployments_of(tx, &finishing).await?;
        }
        // The plain finishes (not retried) of distinct jobs, all in one
        // statement first; they touch only their own running rows, which
        // nothing else in the batch does (a claim takes ready jobs).
        // Another finish of the same job goes alone, below, and is stale.
        let now = now_ms();
        let mut seen = HashSet::new();
        let plain: Vec<(usize, &FinishedAttempt)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                Work::Finish(done) | Work::FinishClaim { done, .. } if done.retry_at.is_none() && seen.insert(done.job_id) => Some((i, done)),
                _ => None,
            })
            .collect();
        let plain_dones: Vec<&FinishedAttempt> = plain.iter().map(|(_, d)| *d).collect();
        // The plain finishes' attempts are written and their dependants
        // released by the same statement (PostgreSQL) or query (SQLite);
        // only their parts' rows are left (`recorded`).
        let pg = self.dialect == Dialect::Postgres;
        // On SQLite the same query also claims the next job of each plain
        // finish that wants one, if they all claim alike (one node's
        // scheduler: always) and no other finish in the batch could make a
        // job ready after it (a retry, a second finish of a job: rare);
        // else they claim below, after every finish, as on PostgreSQL.
        let claimers: Vec<(&str, Duration)> = plain
            .iter()
            .filter_map(|(i, _)| match ops[*i] {
                Work::FinishClaim { node, lease, .. } => Some((node.as_str(), *lease)),
                _ => None,
            })
            .collect();
        let finishes = ops.iter().filter(|op| matches!(op, Work::Finish(_) | Work::FinishClaim { .. })).count();
        let one_claimer = claimers.first().copied().filter(|c| finishes == plain.len() && claimers.iter().all(|x| x == c));
        let (rows, mut ready, mut next_jobs) = if pg {
            let (rows, ready) = self.finish_many_released_on(tx, &plain_dones, now).await?;
            (rows, ready, None)
        } else {
            let wants: Vec<bool> = plain.iter().map(|(i, _)| matches!(ops[*i], Work::FinishClaim { .. })).collect();
            let next = one_claimer.map(|(node, lease)| (node, lease, wants.as_slice()));
            let (rows, ready, claimed) = self.finish_many_released_sqlite_on(tx, &plain_dones, next, now).await?;
            (rows, ready, next.map(|_| claimed.into_iter()))
        };
        let mut handed_out = Vec::new();
        let mut recorded = Vec::new();
        let mut finished: HashMap<usize, Option<FinishedRow>> = plain.iter().map(|(i, _)| *i).zip(rows).collect();
        for (i, op) in ops.iter().enumerate() {
            results.push(match op {
                Work::Logs(lines) => {
                    self.append_logs_on(tx, lines).await?;
                    BatchResult::Logs
                }
                Work::Finish(done) | Work::FinishClaim { done, .. } => {
                    let row = finished.remove(&i);
                    // A plain finish's attempt is written and its dependants
                    // released already.
                    let released = row.is_some();
                    let (effect, fin) = match row {
                        Some(row) => self.finish_after(tx, done, row, now, &mut recorded).await?,
                        None => self.finish_on(tx, done.clone(), &mut attempts).await?,
                    };
                    if let Some(f) = fin {
                        finals.push((i, f, released));
                    }
                    match op {
                        // Its next job, claimed by the same query.
                        Work::FinishClaim { .. } if released && next_jobs.is_some() => {
                            let next = if effect.stale { None } else { next_jobs.as_mut().and_then(Iterator::next) };
                            handed_out.extend(next.as_ref().map(|j| j.deployment_id));
                            BatchResult::FinishClaim(effect, next.map(Box::new))
                        }
                        Work::FinishClaim { node, lease, .. } => {
                            if !effect.stale {
                                want.push((i, node.as_str(), *lease));
                            }
                            BatchResult::FinishClaim(effect, None)
                        }
                        _ => BatchResult::Finish(effect),
                    }
                }
                Work::Claim { node, lease, limit } => {
                    claims.push((i, node.as_str(), *lease, *limit));
                    BatchResult::Claim(Vec::new())
                }
            });
        }
        fn effect_of(r: &mut BatchResult) -> Option<&mut FinishEffect> {
            match r {
                BatchResult::Finish(e) | BatchResult::FinishClaim(e, _) => Some(e),
                _ => None,
            }
        }
        self.insert_attempts_on(tx, &attempts).await?;
        self.insert_parts_on(tx, recorded.iter().chain(&attempts)).await?;
        let succeeded: Vec<i64> = finals.iter().filter(|(_, f, released)| f.succeeded && !released).map(|(_, f, _)| f.job_id).collect();
        if !succeeded.is_empty() {
            for (dep, n) in self.release_dependants_on(tx, &succeeded, now).await? {
                *ready.entry(dep).or_default() += n;
            }
        }
        for (i, f, _) in &finals {
            if let (true, Some(n), Some(e)) = (f.succeeded, ready.get(&f.deployment_id), effect_of(&mut results[*i])) {
                e.newly_ready = *n;
            }
        }
        let mut busy: HashSet<i64> = ready.keys().copied().chain(handed_out).collect();
        while let Some(&(_, node, lease)) = want.first() {
            let (group, rest): (Vec<_>, Vec<_>) = want.into_iter().partition(|(_, n, l)| *n == node && *l == lease);
            want = rest;
            let claimed = self.claim_on(tx, node, lease, group.len() as i64).await?;
            for ((i, _, _), job) in group.into_iter().zip(claimed) {
                busy.insert(job.deployment_id);
                if let BatchResult::FinishClaim(_, next) = &mut results[i] {
                    *next = Some(Box::new(job));
                }
            }
        }
        for (i, node, lease, limit) in claims {
            let claimed = self.claim_on(tx, node, lease, limit).await?;
            busy.extend(claimed.iter().map(|j| j.deployment_id));
            results[i] = BatchResult::Claim(claimed);
        }
        for (i, f, _) in finals {
            // Checked once per deployment: the first check finishes it, a
            // second would find it finished already.
            if !busy.insert(f.deployment_id) {
                continue;
            }
            let finished = self.complete_if_done(tx, f.deployment_id, now).await?.map(|s| (f.deployment_id, s));
            if let Some(e) = effect_of(&mut results[i]) {
                e.deployment_finished = finished;
            }
        }
        Ok(results)
    }

    /// PostgreSQL's common batch in one call of `slipway_write_batch`
    /// (migration 6), outside a transaction (the call is one): one round
    /// trip instead of three to six (docs/design/scheduler.md). `None`:
    /// the function found the batch's finishes uncommon and wrote nothing;
    /// the caller runs the general path.
    /// An error comes with whether the call may have committed: not when
    /// the server answered that it ended the connection (the call, its
    /// own transaction, was rolled back or never ran).
    async fn write_common_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        ops: &[&Work],
        common: &CommonBatch<'_>,
    ) -> std::result::Result<Option<Vec<BatchResult>>, (StoreError, bool)> {
        use serde_json::json;
        let op = "batch";
        let now = now_ms();
        let mut finishes = Vec::new();
        let mut logs = Vec::new();
        let mut claims = Vec::new();
        for op in ops {
            match op {
                Work::Finish(d) | Work::FinishClaim { done: d, .. } => finishes.push(json!({
                    "id": d.job_id, "fence": d.fence, "outcome": d.outcome.as_str(), "exit_code": d.exit_code, "reason": d.reason,
                    "takeover": i64::from(d.takeover), "node": d.node, "started_at": d.started_at, "want": matches!(op, Work::FinishClaim { .. }),
                })),
                Work::Logs(lines) => logs.extend(lines.iter().map(|l| {
                    json!({
                        "deployment_id": l.deployment_id, "job_id": l.job_id, "attempt": l.attempt, "ts": l.ts, "stream": l.stream,
                        "line": l.line, "part": l.part,
                    })
                })),
                Work::Claim { node, lease, limit } => claims.push(json!({ "node": node, "lease_ms": ms(*lease), "limit": (*limit).max(0) })),
            }
        }
        let mut batch = json!({ "now": now, "finishes": finishes, "logs": logs, "claims": claims });
        if let Some((node, lease)) = common.claimer {
            batch["claimer"] = json!(node);
            batch["lease_ms"] = json!(ms(lease));
        }
        let answer: Option<String> = match sqlx::query("SELECT slipway_write_batch($1)").bind(batch.to_string()).fetch_one(&mut *conn).answered().await {
            Ok(r) => r.try_get(0).map_err(|e| (StoreError::query(op)(e), true))?,
            Err(sqlx::Error::Database(d)) if d.code().is_some_and(|c| c.starts_with("57P0") || c.starts_with("08")) => {
                return Err((StoreError::query(op)(sqlx::Error::Database(d)), false));
            }
            Err(e) => return Err((StoreError::query(op)(e), true)),
        };
        let Some(answer) = answer else { return Ok(None) };
        #[derive(serde::Deserialize)]
        struct Answer {
            finished: Option<Vec<(i64, i64)>>,
            released: Option<Vec<i64>>,
            next: Option<Vec<(ClaimedRow, ClaimInfo)>>,
            claims: Vec<Vec<(ClaimedRow, ClaimInfo)>>,
        }
        let answer: Answer =
            serde_json::from_str(&answer).map_err(|e| (StoreError::Corrupt(format!("slipway_write_batch answered what this build cannot read: {e}")), true))?;
        let finished: HashMap<i64, i64> = answer.finished.unwrap_or_default().into_iter().collect();
        let mut ready: HashMap<i64, u64> = HashMap::new();
        for dep in answer.released.unwrap_or_default() {
            *ready.entry(dep).or_default() += 1;
        }
        // The finishes' next jobs, lowest id first: one for each finish that
        // wanted one and was not stale, in order.
        let mut next = answer.next.unwrap_or_default().into_iter().map(|c| self.claimed_with_info(c, now));
        let mut claims = answer.claims.into_iter();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                Work::Logs(_) => BatchResult::Logs,
                Work::Finish(done) | Work::FinishClaim { done, .. } => {
                    let effect = match finished.get(&done.job_id) {
                        Some(dep) => FinishEffect { newly_ready: ready.get(dep).copied().unwrap_or(0), ..Default::default() },
                        None => FinishEffect { stale: true, ..Default::default() },
                    };
                    match op {
                        Work::FinishClaim { .. } => {
                            let job = if effect.stale { None } else { next.next() };
                            BatchResult::FinishClaim(effect, job.map(Box::new))
                        }
                        _ => BatchResult::Finish(effect),
                    }
                }
                Work::Claim { .. } => {
                    BatchResult::Claim(claims.next().ok_or_else(|| (mismatch(), true))?.into_iter().map(|c| self.claimed_with_info(c, now)).collect())
                }
            });
        }
        Ok(Some(results))
    }

    async fn run_batch(&self, held: &mut Held, ops: &[&Work]) -> Result<Vec<BatchResult>> {
        if self.dialect == Dialect::Sqlite {
            // Its one connection serves the readers too: not kept.
            let mut tx = self.pool.begin().answered().await.map_err(StoreError::query("batch"))?;
            let results = self.run_ops_on(&mut tx, ops).await?;
            tx.commit().committed().await.map_err(StoreError::query("batch commit"))?;
            return Ok(results);
        }
        // A kept connection the server dropped while it sat idle fails at
        // BEGIN, before anything ran, or at the ping a connection idle for
        // a while gets before a common batch (which has no BEGIN): the
        // batch goes once more, on a connection the pool has tested (not
        // kept, so no third time).
        loop {
            let reused = held.conn.is_some();
            let mut conn = match held.conn.take() {
                Some(c) => c,
                None => {
                    let mut c = self.pool.acquire().await.map_err(StoreError::query("batch"))?;
                    // Generic plans on the writer's connection only: its
                    // statements are key lookups, one shape per batch size,
                    // and a custom plan made per batch cost more than running
                    // it (docs/design/scheduler.md). Never given back to the
                    // pool with this set (below).
                    let set = sqlx::Executor::execute(&mut *c, "SET plan_cache_mode = force_generic_plan");
                    match tokio::time::timeout(RELEASE_PING, set).await {
                        Ok(done) => done.map_err(StoreError::query("batch"))?,
                        Err(_) => {
                            // Closed, not pooled: the setting may have taken.
                            drop(c.detach());
                            return Err(StoreError::Unavailable("the store did not answer a new connection's first statement".into()));
                        }
                    };
                    c
                }
            };
            let common = CommonBatch::of(ops);
            // Under load batches follow each other and nothing is asked
            // twice; after a pause, one round trip tells a live connection
            // from one the server ended.
            if reused && common.is_some() && held.used.elapsed() > KEPT_IDLE_CHECK {
                let alive = tokio::time::timeout(Duration::from_secs(5), sqlx::Connection::ping(&mut *conn)).await;
                if !matches!(alive, Ok(Ok(()))) {
                    drop(conn.detach());
                    continue;
                }
            }
            let conn = held.conn.insert(conn);
            let mut began = false;
            let batch = async {
                if let Some(common) = &common {
                    // A failure that leaves it unknown whether the call
                    // committed (as one at COMMIT does) is not sent again.
                    match self.write_common_on(conn, ops, common).await {
                        Ok(Some(results)) => return Ok(results),
                        Ok(None) => {}
                        Err((e, may_have_committed)) => {
                            began = may_have_committed;
                            return Err(e);
                        }
                    }
                }
                let mut tx = sqlx::Connection::begin(&mut **conn).answered().await.map_err(StoreError::query("batch"))?;
                began = true;
                let results = self.run_ops_on(&mut tx, ops).await?;
                tx.commit().committed().await.map_err(StoreError::query("batch commit"))?;
                Ok(results)
            };
            // The server's own timeouts end a slow statement, but not a
            // connection whose server is gone without a reset (a host that
            // died, a failover, a cut path): sqlx sets no keepalive, and
            // the writer, with every finish and log line behind it, would
            // wait for an answer forever. Whether such a batch committed is
            // unknown, as at a lost COMMIT: its callers are told the store
            // is unavailable, and it is not sent again.
            let result = match tokio::time::timeout(BATCH_DEADLINE, batch).await {
                Ok(result) => result,
                Err(_) => {
                    began = true;
                    Err(StoreError::Unavailable(format!("the store did not answer a batch of writes within {} s", BATCH_DEADLINE.as_secs())))
                }
            };
            held.used = std::time::Instant::now();
            if result.is_err() {
                // Closed, not given back to the pool (it carries the
                // writer's plan setting): the pool opens a new one, and
                // the next batch takes it.
                if let Some(c) = held.conn.take() {
                    drop(c.detach());
                }
                if reused && !began {
                    continue;
                }
            }
            return result;
        }
    }
}

/// How long one statement, `BEGIN`, `COMMIT` or `ROLLBACK` may wait for
/// the store's answer before the store counts as unavailable for it.
/// On PostgreSQL the server's own `statement_timeout` (30 s) and
/// `lock_timeout` (20 s) end a slow statement before this; what reaches
/// it is a connection that will never answer: its server gone without a
/// reset (a host that died, a failover, a cut path), which sqlx, setting
/// no TCP keepalive, would wait on for ever, and with it the API request
/// or the node's loop behind it. The future is dropped, and with it the
/// connection: a pooled one is pinged before it is pooled again
/// (`after_release`), and fails that. On SQLite it is reached only by a
/// disk that stalls: sqlx's SQLite thread goes on with the statement, so
/// a write given up may still be made, as one whose `COMMIT` got no
/// answer on PostgreSQL.
const ANSWER_DEADLINE: Duration = Duration::from_secs(40);

/// `.answered()`: a store call bounded by [`ANSWER_DEADLINE`], failing
/// as a lost connection does (`StoreError::Unavailable` through
/// `StoreError::query`, a 503 at the API). `.committed()`: the same for
/// a `COMMIT`, whose answer says that what it commits may have been made.
pub(super) trait Answered<T>: std::future::Future<Output = Result<T, sqlx::Error>> + Sized {
    async fn answered(self) -> Result<T, sqlx::Error> {
        bounded_by(self, ANSWER_DEADLINE, "").await
    }

    async fn committed(self) -> Result<T, sqlx::Error> {
        bounded_by(self, ANSWER_DEADLINE, " to a COMMIT: whether it was made is not known").await
    }
}

/// `call`, or after `limit` the error of a connection lost.
async fn bounded_by<T>(call: impl std::future::Future<Output = Result<T, sqlx::Error>>, limit: Duration, what: &str) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => {
            Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the store did not answer within {} s{what}", limit.as_secs()))))
        }
    }
}

impl<T, F: std::future::Future<Output = Result<T, sqlx::Error>>> Answered<T> for F {}

/// How long the PostgreSQL writer waits for a batch's answer: past the
/// server's own `statement_timeout` (30 s, per statement; a batch's are
/// key lookups, far below it). A connection that will never answer
/// reaches it; so, rarely, would a batch of several statements each kept
/// near the limit by locks, whose callers are then told the store is
/// unavailable and retry.
const BATCH_DEADLINE: Duration = Duration::from_secs(40);

/// How long a PostgreSQL connection given back to the pool may take to
/// answer its ping (`after_release`).
const RELEASE_PING: Duration = Duration::from_secs(5);

/// How long the PostgreSQL writer's kept connection may sit unused before
/// a common batch asks whether it is still alive (`run_batch`).
const KEPT_IDLE_CHECK: Duration = Duration::from_millis(100);

/// Whether `slipway_write_batch` can run a batch (`write_common_on`):
/// its finishes each successful, not retried, of its own job and without
/// parts, and those that want a next job all claiming alike (one node's
/// scheduler: always); any logs and plain claims. Anything else takes the
/// general path.
struct CommonBatch<'a> {
    /// Who the finishes that want a next job claim it for, if any do.
    claimer: Option<(&'a str, Duration)>,
}

impl<'a> CommonBatch<'a> {
    fn of(ops: &[&'a Work]) -> Option<Self> {
        let mut seen = HashSet::with_capacity(ops.len());
        let mut common = CommonBatch { claimer: None };
        for op in ops {
            let (done, claimer) = match op {
                Work::Finish(done) => (done, None),
                Work::FinishClaim { done, node, lease } => (done, Some((node.as_str(), *lease))),
                Work::Logs(_) | Work::Claim { .. } => continue,
            };
            if done.outcome != Outcome::Succeeded || done.retry_at.is_some() || !done.parts.is_empty() || !seen.insert(done.job_id) {
                return None;
            }
            if let Some(c) = claimer
                && *common.claimer.get_or_insert(c) != c
            {
                return None;
            }
        }
        Some(common)
    }
}

/// The PostgreSQL writer's connection, kept from one batch to the next.
/// sqlx tests a pooled connection with a round trip when it is taken
/// and again when it comes back; on a batch of a few statements those
/// two were a large share of its round trips (issue 19). It plans with
/// generic plans (`plan_cache_mode`), so it is closed after any error
/// rather than given back to the pool for others.
struct Held {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    /// When the connection last ran a batch.
    used: std::time::Instant,
}

impl Default for Held {
    fn default() -> Self {
        Held { conn: None, used: std::time::Instant::now() }
    }
}

/// A job's row as a finish left it (`finish_many_on`).
struct FinishedRow {
    deployment_id: i64,
    name: String,
    attempt: i64,
    state: String,
    cancel_requested: bool,
}

/// The `UPDATE` of a batch's plain finishes, over `v` (`finish_values`),
/// `$1` the time; `lock` is the dialect's `FOR UPDATE`. The job rows are
/// locked in id order first (on PostgreSQL), as a lease renewal locks
/// them: a join would lock them in whatever order its plan meets them,
/// and the two could wait on each other. `lease` is what the finished
/// jobs' `lease_until` becomes: `NULL`, or SQLite's mark (`FINISHED_MARK`).
fn finish_update(lock: &str, lease: &str) -> String {
    format!(
        "UPDATE jobs SET state = CASE WHEN v.outcome = 'succeeded' THEN 'succeeded' WHEN v.outcome = 'rolled_back' THEN 'rolled_back' \
   WHEN v.outcome = 'cancelled' OR (SELECT cancel_requested FROM deployments d WHERE d.id = jobs.deployment_id) <> 0 THEN 'cancelled' ELSE 'failed' END, \
 finished_at = $1, exit_code = v.exit_code, reason = v.reason, lease_until = {lease} \
 FROM v WHERE jobs.id = v.id AND jobs.fence = v.fence AND jobs.state = 'running' AND (v.takeover = 0 OR jobs.lease_until < $1) \
 AND jobs.id IN (SELECT id FROM jobs WHERE id IN (SELECT id FROM v) ORDER BY id{lock}) \
 RETURNING jobs.id, jobs.deployment_id, jobs.name, jobs.attempt, jobs.state, \
 (SELECT cancel_requested FROM deployments d WHERE d.id = jobs.deployment_id) AS cancel_requested"
    )
}

/// `v (…) AS (VALUES …)` for `n` finishes from `$2` on; with the
/// attempt's node and start when the same statement writes attempts.
fn finish_values(n: usize, attempts: bool) -> String {
    let mut types = vec!["BIGINT", "BIGINT", "TEXT", "BIGINT", "TEXT", "BIGINT"];
    let mut cols = "id, fence, outcome, exit_code, reason, takeover".to_string();
    if attempts {
        types.extend(["TEXT", "BIGINT"]);
        cols.push_str(", node, started_at");
    }
    format!("v ({cols}) AS (VALUES {})", value_rows(2, n, &types))
}

/// Bind `finish_values`' parameters.
fn bind_finishes<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    dones: &[&FinishedAttempt],
    attempts: bool,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for done in dones {
        query = query
            .bind(done.job_id)
            .bind(done.fence)
            .bind(done.outcome.as_str())
            .bind(done.exit_code.map(i64::from))
            .bind(done.reason.clone())
            .bind(i64::from(done.takeover));
        if attempts {
            query = query.bind(done.node.clone()).bind(done.started_at);
        }
    }
    query
}

/// The claim: the jobs `which` selects (SQL over `jobs`) become running on
/// `$node` until `$lease`, started at `$now` (the numbers of those
/// parameters). Its rows are read by `claimed_jobs`.
fn claim_update(which: &str, node: usize, lease: usize, now: usize) -> String {
    format!(
        "UPDATE jobs SET state = 'running', node = ${node}, lease_until = ${lease}, fence = fence + 1, attempt = attempt + 1, started_at = ${now} \
         WHERE {which} RETURNING id, deployment_id, name, attempt, fence, spec, ready_at"
    )
}

/// Up to `limit` ready jobs (SQL: digits, or a count the same query makes),
/// lowest id first; `skip` is the dialect's `FOR UPDATE SKIP LOCKED`.
fn ready_select(limit: &str, now: usize, skip: &str) -> String {
    format!("SELECT id FROM jobs WHERE state = 'ready' AND not_before <= ${now} ORDER BY id LIMIT {limit}{skip}")
}

/// Finishes per statement of a batch, and the parameters of each in
/// `finish_values(_, true)` (its job's id the first).
const FINISH_CHUNK: usize = 100;
const FINISH_COLS: usize = 8;

/// What SQLite's one-query batch (`finish_many_released_sqlite_on`) sets a
/// finished job's `lease_until` to until its last statement: a lease is a
/// time in milliseconds, never negative.
const FINISHED_MARK: &str = "-1";

/// A row of `finish_update`'s `RETURNING`, by its job id.
fn finished_row(r: &AnyRow) -> Result<(i64, FinishedRow)> {
    let f = || -> std::result::Result<(i64, FinishedRow), sqlx::Error> {
        Ok((
            r.try_get(0)?,
            FinishedRow {
                deployment_id: r.try_get(1)?,
                name: r.try_get(2)?,
                attempt: r.try_get(3)?,
                state: r.try_get(4)?,
                cancel_requested: r.try_get::<i64, _>(5)? != 0,
            },
        ))
    };
    f().map_err(StoreError::query("finish job"))
}

/// A job that became final (not retried), as `run_ops_on` needs it.
struct Final {
    job_id: i64,
    deployment_id: i64,
    /// Succeeded in a deployment not being cancelled: its dependants may
    /// become ready.
    succeeded: bool,
}

/// An attempt's row, written with the others of its transaction.
struct AttemptRecord {
    job_id: i64,
    attempt: i64,
    node: String,
    started_at: Millis,
    finished_at: Millis,
    outcome: &'static str,
    exit_code: Option<i64>,
    reason: Option<String>,
    parts: Vec<crate::store::PartResult>,
}

impl AttemptRecord {
    fn of(done: &FinishedAttempt, attempt: i64, now: Millis) -> Self {
        AttemptRecord {
            job_id: done.job_id,
            attempt,
            node: done.node.clone(),
            started_at: done.started_at,
            finished_at: now,
            outcome: done.outcome.as_str(),
            exit_code: done.exit_code.map(i64::from),
            reason: done.reason.clone(),
            parts: done.parts.clone(),
        }
    }
}

type ClaimInfo = (String, String, Option<String>, Option<String>, i64);

/// A claimed job's row as `claim_update` returns it: id, deployment, name,
/// attempt, fence, spec, ready_at.
#[derive(serde::Deserialize)]
struct ClaimedRow(i64, i64, String, i64, i64, String, Option<i64>);

impl ClaimedRow {
    fn of(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(ClaimedRow(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?, r.try_get(5)?, r.try_get(6)?))
    }
}

/// The job of a claimed row and its deployment's part.
fn claimed_job(row: ClaimedRow, info: ClaimInfo, now: Millis) -> ClaimedJob {
    let ClaimedRow(job_id, deployment_id, name, attempt, fence, spec, ready_at) = row;
    let (revision, environment, service, version, event_at) = info;
    ClaimedJob {
        job_id,
        deployment_id,
        name,
        attempt,
        fence,
        spec: spec_or_unreadable(&spec),
        revision,
        environment,
        service,
        version,
        ready_at: ready_at.unwrap_or(now),
        event_at,
    }
}

/// Text as the store keeps it: PostgreSQL's text (and JSON) cannot hold a
/// NUL byte, which a job may print (in its output, and so in a reason
/// quoting it) and a client may send (in an idempotency key, and so in the
/// audit entry quoting it); it becomes U+FFFD, as invalid UTF-8 already
/// does. The same on SQLite, so both stores keep and find the same text.
fn make_storable(text: &mut String) {
    if let std::borrow::Cow::Owned(kept) = storable(text) {
        *text = kept;
    }
}

/// [`make_storable`] of a borrowed text; for a key or filter, what the
/// store kept of it, so that a lookup finds it (and does not fail on
/// PostgreSQL).
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') { std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}")) } else { std::borrow::Cow::Borrowed(text) }
}

/// An event with its texts `make_storable`.
fn make_event_storable(e: &mut NewEvent) {
    e.key.iter_mut().for_each(make_storable);
    make_storable(&mut e.kind);
    make_storable(&mut e.payload);
}

/// A finish with its texts `make_storable`.
fn storable_finish(mut done: FinishedAttempt) -> FinishedAttempt {
    done.reason.iter_mut().for_each(make_storable);
    for p in &mut done.parts {
        make_storable(&mut p.part);
        p.reason.iter_mut().for_each(make_storable);
    }
    done
}

/// SQL assembled at run time, only ever from constants in this file
/// (never from input: values are always bound).
fn query_dyn(sql: String) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
}

/// Milliseconds of a duration, capped at a century so `now + ms(d)` can
/// never overflow, whatever a flag or config said.
fn ms(d: Duration) -> i64 {
    d.as_millis().min(100 * 365 * 24 * 3600 * 1000) as i64
}

impl SqlStore {
    /// Connect, and migrate the schema to this build's version (refusing
    /// a store whose schema is newer than this build knows).
    pub async fn open(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (dialect, conn_url, pool) = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::BadUrl { url: url.into(), reason: "no file path after sqlite://".into() });
            }
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", parent.display())))?;
            }
            let opts = AnyPoolOptions::new()
                // One connection: SQLite has one writer anyway, and this
                // way no transaction ever meets SQLITE_BUSY half-way.
                .max_connections(1)
                // No ping before each use: the file cannot have gone away,
                // and the ping is a round trip to sqlx's SQLite thread (two
                // thread wake-ups) on every transaction.
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        use sqlx::Executor;
                        conn.execute("PRAGMA journal_mode=WAL").answered().await?;
                        conn.execute("PRAGMA synchronous=NORMAL").answered().await?;
                        conn.execute("PRAGMA busy_timeout=5000").answered().await?;
                        Ok(())
                    })
                });
            (Dialect::Sqlite, format!("sqlite://{path}?mode=rwc"), opts)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = AnyPoolOptions::new()
                .max_connections(8)
                // A store that is down answers within this: the API says
                // 503 rather than keeping a client waiting.
                .acquire_timeout(Duration::from_secs(5))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        use sqlx::Executor;
                        // No statement may hang: a stuck query fails instead.
                        conn.execute("SET statement_timeout = 30000").answered().await?;
                        conn.execute("SET lock_timeout = 20000").answered().await?;
                        // A transaction whose client is gone without a reset
                        // (a timeout below gave it up) must not keep its row
                        // locks until the server's keepalive notices.
                        conn.execute("SET idle_in_transaction_session_timeout = 60000").answered().await?;
                        Ok(())
                    })
                })
                // A connection given back after its caller gave up on it
                // (a timeout) is tested with a ping before it is pooled
                // again, which sqlx does not bound: on a connection gone
                // silent it would wait forever and hold its slot. Bounded
                // here: one that does not answer is closed.
                .after_release(|conn, _| {
                    Box::pin(async move {
                        match tokio::time::timeout(RELEASE_PING, sqlx::Connection::ping(conn)).await {
                            Ok(Ok(())) => Ok(true),
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(sqlx::Error::PoolTimedOut),
                        }
                    })
                });
            let (conn_url, ignored) = without_unknown_params(url);
            for parameter in ignored {
                tracing::warn!(%parameter, "the store URL's parameter is not supported and is ignored (its value is not shown)");
            }
            (Dialect::Postgres, conn_url, opts)
        } else {
            return Err(StoreError::BadUrl { url: redact_url(url), reason: "expected sqlite://PATH or postgres://USER@HOST:PORT/DB".into() });
        };
        let pool = tokio::time::timeout(Duration::from_secs(15), pool.connect(&conn_url))
            .await
            .map_err(|_| StoreError::Unavailable(format!("connecting to {} timed out", redact_url(url))))?
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to {}: {e}", redact_url(url))))?;
        let inner = Arc::new(Inner { pool, dialect, claim_info: Default::default() });
        let (batch, rx) = mpsc::channel(1024);
        tokio::spawn(batcher(inner.clone(), rx));
        let store = SqlStore { inner, batch };
        store.migrate().await?;
        Ok(store)
    }

    /// Bring the schema up to date: numbered migrations (`super::migrate`).
    async fn migrate(&self) -> Result<()> {
        super::migrate::run(&self.pool, self.dialect).await
    }
}

impl Inner {
    fn for_update(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// A claim's lock: another node's claim passes over what this one took.
    fn for_update_skip(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Lock the rows of the deployments `jobs` belong to (PostgreSQL), in
    /// id order, in one statement for a whole batch of finishes: what
    /// `lock_deployment` does for one, without a round trip per finish.
    async fn lock_deployments_of(&self, conn: &mut sqlx::AnyConnection, jobs: &[i64]) -> Result<()> {
        for chunk in jobs.chunks(500) {
            let list = placeholders(1, chunk.len());
            let q = format!("SELECT id FROM deployments WHERE id IN (SELECT deployment_id FROM jobs WHERE id IN ({})) ORDER BY id{}", list, self.for_update());
            let mut query = query_dyn(q);
            for id in chunk {
                query = query.bind(*id);
            }
            query.fetch_all(&mut *conn).answered().await.map_err(StoreError::query("lock deployments"))?;
        }
        Ok(())
    }

    /// Serialize writers of one deployment (PostgreSQL): without it, two
    /// jobs finishing at once on two nodes could each miss the other's
    /// success and leave a dependant pending forever.
    async fn lock_deployment(&self, conn: &mut sqlx::AnyConnection, id: i64) -> Result<Option<AnyRow>> {
        let q = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1{}", self.for_update());
        query_dyn(q.clone()).bind(id).fetch_optional(&mut *conn).answered().await.map_err(StoreError::query("lock deployment"))
    }

    /// If every job of the deployment is terminal, finish the deployment
    /// and free its lock.
    async fn complete_if_done(&self, tx: &mut sqlx::AnyConnection, id: i64, now: Millis) -> Result<Option<DeploymentState>> {
        // Any open job at all? (Stops at the first; a COUNT would walk them all.)
        let open = sqlx::query("SELECT 1 FROM jobs WHERE deployment_id = $1 AND state IN ('pending', 'ready', 'running') LIMIT 1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query("count open jobs"))?;
        if open.is_some() {
            return Ok(None);
        }
        let dep = sqlx::query("SELECT state, cancel_requested FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query("read deployment"))?;
        let state: String = dep.try_get(0).map_err(StoreError::query("read deployment"))?;
        if state != "running" {
            return Ok(None);
        }
        let cancel: i64 = dep.try_get(1).map_err(StoreError::query("read deployment"))?;
        // A rolled-back rollout names the deployment's outcome first.
        let failed = sqlx::query(
            "SELECT name, reason, state FROM jobs WHERE deployment_id = $1 AND state IN ('failed', 'rolled_back') \
             ORDER BY CASE WHEN state = 'rolled_back' THEN 0 ELSE 1 END, id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .answered()
        .await
        .map_err(StoreError::query("read failed jobs"))?;
        let (final_state, reason) = if cancel != 0 {
            (DeploymentState::Cancelled, Some("cancelled on request".to_string()))
        } else if let Some(first) = failed.first() {
            let name: String = first.try_get(0).map_err(StoreError::query("read failed jobs"))?;
            let why: Option<String> = first.try_get(1).map_err(StoreError::query("read failed jobs"))?;
            let state: String = first.try_get(2).map_err(StoreError::query("read failed jobs"))?;
            let more = if failed.len() > 1 { format!(" (and {} more)", failed.len() - 1) } else { String::new() };
            if state == "rolled_back" {
                (DeploymentState::RolledBack, Some(format!("job {name:?} {}{more}", why.unwrap_or_default())))
            } else {
                (DeploymentState::Failed, Some(format!("job {name:?} failed: {}{more}", why.unwrap_or_default())))
            }
        } else {
            (DeploymentState::Succeeded, None)
        };
        sqlx::query("UPDATE deployments SET state = $1, reason = $2, finished_at = $3 WHERE id = $4")
            .bind(final_state.as_str())
            .bind(reason)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query("finish deployment"))?;
        sqlx::query("DELETE FROM locks WHERE deployment_id = $1").bind(id).execute(&mut *tx).answered().await.map_err(StoreError::query("release lock"))?;
        Ok(Some(final_state))
    }
}

/// Never print a password from a store URL: the one after the user
/// (`postgres://user:PASSWORD@host/db`), nor one given as a parameter
/// (`?password=`, or `sslpassword=`, which sqlx does not read).
pub fn redact_url(url: &str) -> String {
    // Everything up to the last '@' may be the password (a '?' or '/' in
    // it included); what follows is host, database and parameters.
    let (head, rest) = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = match creds.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?']) => format!("{user}:***"),
                None if !creds.contains(['/', '?']) => creds.to_string(),
                _ => "***".to_string(),
            };
            (format!("{}{user}", &url[..scheme + 3]), &url[at..])
        }
        _ => (String::new(), url),
    };
    let Some((base, query)) = rest.split_once('?') else { return format!("{head}{rest}") };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if secret_param(k) => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{head}{base}?{}", params.join("&"))
}

/// The connection parameters sqlx's PostgreSQL driver reads (sqlx 0.9,
/// `PgConnectOptions::parse_from_url`).
const PG_PARAMS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The URL without the parameters sqlx does not read, and their names.
/// sqlx ignores such a parameter but logs it at WARN with its value, which
/// may be a secret (`sslpassword`, which it does not support): they are
/// taken out before it sees them and named here without their value.
fn without_unknown_params(url: &str) -> (String, Vec<String>) {
    let Ok(mut parsed) = reqwest::Url::parse(url) else { return (url.to_string(), Vec::new()) };
    let pairs: Vec<(String, String)> = parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let (known, unknown): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| PG_PARAMS.contains(&k.as_str()) || k.starts_with("options["));
    if unknown.is_empty() {
        return (url.to_string(), Vec::new());
    }
    if known.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(known);
    }
    (parsed.to_string(), unknown.into_iter().map(|(k, _)| k).collect())
}

/// A URL parameter that may hold a password, however its name is spelt
/// (case, percent-encoding).
fn secret_param(key: &str) -> bool {
    let mut name = Vec::with_capacity(key.len());
    let mut bytes = key.bytes();
    while let Some(b) = bytes.next() {
        let decoded = match b {
            b'%' => bytes.next().zip(bytes.next()).and_then(|(h, l)| u8::from_str_radix(std::str::from_utf8(&[h, l]).ok()?, 16).ok()),
            _ => Some(b),
        };
        name.push(decoded.unwrap_or(b'?').to_ascii_lowercase());
    }
    name.ends_with(b"password")
}

const DEPLOYMENT_COLUMNS: &str =
    "id, event_id, kind, environment, service, version, revision, state, reason, superseded_by, cancel_requested, created_at, started_at, finished_at";

const HOLD_COLUMNS: &str =
    "h.approval, h.approved_by, h.approved_at, h.not_before, h.in_window, h.source_environment, h.source_deployment, h.waiting_for, h.requested_by, h.digest";

fn hold_row(r: &AnyRow) -> Result<Hold> {
    let get = |r: &AnyRow| -> std::result::Result<Hold, sqlx::Error> {
        Ok(Hold {
            approval: r.try_get::<i64, _>("approval")? != 0,
            approved_by: r.try_get("approved_by")?,
            approved_at: r.try_get("approved_at")?,
            not_before: r.try_get("not_before")?,
            window: r.try_get::<i64, _>("in_window")? != 0,
            source_environment: r.try_get("source_environment")?,
            source_deployment: r.try_get("source_deployment")?,
            waiting_for: r.try_get("waiting_for")?,
            requested_by: r.try_get("requested_by")?,
            digest: r.try_get("digest")?,
        })
    };
    get(r).map_err(StoreError::query("decode hold"))
}

fn deployment_row(r: &AnyRow) -> Result<DeploymentRow> {
    let e = StoreError::query("decode deployment");
    let get = |r: &AnyRow| -> std::result::Result<DeploymentRow, sqlx::Error> {
        let kind: String = r.try_get("kind")?;
        let state: String = r.try_get("state")?;
        Ok(DeploymentRow {
            id: r.try_get("id")?,
            event_id: r.try_get("event_id")?,
            kind: DeploymentKind::parse(&kind).unwrap_or(DeploymentKind::Run),
            environment: r.try_get("environment")?,
            service: r.try_get("service")?,
            version: r.try_get("version")?,
            revision: r.try_get("revision")?,
            state: DeploymentState::parse(&state).unwrap_or(DeploymentState::Failed),
            reason: r.try_get("reason")?,
            superseded_by: r.try_get("superseded_by")?,
            cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
        })
    };
    get(r).map_err(e)
}

fn token_row(r: &sqlx::any::AnyRow) -> std::result::Result<TokenRow, sqlx::Error> {
    Ok(TokenRow { name: r.try_get(0)?, hash: r.try_get(1)?, roles: r.try_get(2)?, created_at: r.try_get(3)?, revoked_at: r.try_get(4)? })
}

fn spec_of(s: &str) -> Result<JobSpec> {
    spec::decode_job(s).map_err(StoreError::Corrupt)
}

/// A claimed or expired job's spec; one that does not decode (stored by
/// another version of Slipway) becomes a job that fails saying so, rather
/// than an error that would stop every claim of the node.
fn spec_or_unreadable(s: &str) -> JobSpec {
    spec_of(s).unwrap_or_else(|e| JobSpec {
        command: crate::config::Command::Unreadable(format!(
            "this Slipway cannot read the job's stored spec ({e}); it was probably stored by another version: deploy again"
        )),
        timeout_ms: 1000,
        kill_grace_ms: 1000,
        retry_attempts: 1,
        retry_any: false,
        retry_exit_codes: vec![],
        retry_backoff_ms: 1000,
        retry_max_backoff_ms: 1000,
        idempotent: false,
        env: Default::default(),
        artifact: None,
        secrets: Default::default(),
        secret_files: Default::default(),
        target: None,
        settings: Default::default(),
        once_per_environment: false,
    })
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    fn single_node(&self) -> bool {
        self.dialect == Dialect::Sqlite
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).answered().await.map_err(StoreError::query("ping"))?;
        Ok(())
    }

    async fn put_revision(&self, rev: &Revision) -> Result<()> {
        sqlx::query("INSERT INTO revisions (id, created_at, config_text, archive) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING")
            .bind(&rev.id)
            .bind(now_ms())
            .bind(&rev.config_text)
            .bind(rev.archive.clone())
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("store revision"))?;
        Ok(())
    }

    async fn revision(&self, id: &str) -> Result<Option<Revision>> {
        let row = sqlx::query("SELECT id, config_text, archive FROM revisions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("read revision"))?;
        row.map(|r| {
            Ok(Revision {
                id: r.try_get(0).map_err(StoreError::query("read revision"))?,
                config_text: r.try_get(1).map_err(StoreError::query("read revision"))?,
                archive: r.try_get(2).map_err(StoreError::query("read revision"))?,
            })
        })
        .transpose()
    }

    async fn submit(&self, mut new: NewDeployment) -> Result<Submitted> {
        let now = now_ms();
        make_event_storable(&mut new.event);
        if let Some(h) = &mut new.hold {
            for text in [&mut h.approved_by, &mut h.waiting_for, &mut h.requested_by, &mut h.source_environment, &mut h.digest] {
                text.iter_mut().for_each(make_storable);
            }
        }
        let op = "submit";
        if new.jobs.is_empty() {
            // It would run forever holding its lock.
            return Err(StoreError::Corrupt("a deployment needs at least one job".into()));
        }
        let mut tx = self.pool.begin().answered().await.map_err(StoreError::query(op))?;
        if self.dialect == Dialect::Postgres {
            // Submits on one lock key in id order = commit order, so a
            // newer deploy always supersedes the older queued ones (and
            // never the reverse) even when webhooks arrive in a burst.
            sqlx::query("SELECT pg_advisory_xact_lock(7467234, hashtext($1))")
                .bind(&new.lock_key)
                .execute(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
        }
        if let Some(ran) = new.only_after {
            // Under the lock key's lock (PostgreSQL) or the one connection
            // (SQLite): no submit on this key can slip in between.
            let busy = sqlx::query("SELECT id FROM deployments WHERE lock_key = $1 AND state IN ('waiting', 'queued', 'running') LIMIT 1")
                .bind(&new.lock_key)
                .fetch_optional(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?
                .is_some();
            let recorded: Option<i64> = sqlx::query("SELECT deployment_id FROM services WHERE environment = $1 AND service = $2")
                .bind(&new.environment)
                .bind(new.service.clone().unwrap_or_default())
                .fetch_optional(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(StoreError::query(op))?;
            if busy || recorded != Some(ran) {
                tx.rollback().answered().await.map_err(StoreError::query(op))?;
                return Ok(Submitted { event_id: 0, deployment_id: 0, duplicate: false, superseded: vec![], busy: true });
            }
        }
        let inserted = sqlx::query("INSERT INTO events (key, kind, payload, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING RETURNING id")
            .bind(new.event.key.clone())
            .bind(&new.event.kind)
            .bind(&new.event.payload)
            .bind(now)
            .fetch_optional(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        let Some(row) = inserted else {
            // Seen before: answer with what the first delivery created.
            let row = sqlx::query("SELECT id, deployment_id FROM events WHERE key = $1")
                .bind(new.event.key.clone())
                .fetch_one(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
            tx.commit().committed().await.map_err(StoreError::query(op))?;
            return Ok(Submitted {
                event_id: row.try_get(0).map_err(StoreError::query(op))?,
                deployment_id: row.try_get::<Option<i64>, _>(1).map_err(StoreError::query(op))?.unwrap_or(0),
                duplicate: true,
                superseded: vec![],
                busy: false,
            });
        };
        let event_id: i64 = row.try_get(0).map_err(StoreError::query(op))?;
        let dep_id: i64 = sqlx::query(
            "INSERT INTO deployments (event_id, kind, environment, service, version, lock_key, revision, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $8) RETURNING id",
        )
        .bind(event_id)
        .bind(new.kind.as_str())
        .bind(&new.environment)
        .bind(new.service.clone())
        .bind(new.version.clone())
        .bind(&new.lock_key)
        .bind(&new.revision)
        .bind(now)
        .bind(if new.hold.is_some() { "waiting" } else { "queued" })
        .fetch_one(&mut *tx)
        .answered()
        .await
        .map_err(StoreError::query(op))?
        .try_get(0)
        .map_err(StoreError::query(op))?;
        if let Some(h) = &new.hold {
            sqlx::query(
                "INSERT INTO holds (deployment_id, approval, not_before, in_window, source_environment, source_deployment, waiting_for, requested_by, digest, approved_by, approved_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(dep_id)
            .bind(h.approval as i64)
            .bind(h.not_before)
            .bind(h.window as i64)
            .bind(h.source_environment.clone())
            .bind(h.source_deployment)
            .bind(h.waiting_for.clone())
            .bind(h.requested_by.clone())
            .bind(h.digest.clone())
            .bind(h.approved_by.clone())
            .bind(h.approved_at)
            .execute(&mut *tx)
            .answered().await
            .map_err(StoreError::query(op))?;
            // The reason of a waiting deployment is what it waits for.
            sqlx::query("UPDATE deployments SET reason = $1 WHERE id = $2")
                .bind(h.waiting_for.clone())
                .bind(dep_id)
                .execute(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
        }
        sqlx::query("UPDATE events SET deployment_id = $1 WHERE id = $2")
            .bind(dep_id)
            .bind(event_id)
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        // Many rows per statement: a 1,000-job graph is a few dozen
        // statements, not 3,000. Ids come back matched by name (unique in
        // a deployment): RETURNING promises no order.
        let mut by_name: HashMap<String, i64> = HashMap::with_capacity(new.jobs.len());
        for chunk in new.jobs.chunks(100) {
            let mut q = String::from("INSERT INTO jobs (deployment_id, name, state, spec) VALUES ");
            for i in 0..chunk.len() {
                if i > 0 {
                    q.push_str(", ");
                }
                q.push_str(&format!("($1, ${}, 'pending', ${})", 2 * i + 2, 2 * i + 3));
            }
            q.push_str(" RETURNING id, name");
            let mut query = query_dyn(q).bind(dep_id);
            for job in chunk {
                let spec = spec::encode_job(&job.spec).map_err(StoreError::Corrupt)?;
                query = query.bind(job.name.clone()).bind(spec);
            }
            for r in query.fetch_all(&mut *tx).answered().await.map_err(StoreError::query(op))? {
                let f = || -> std::result::Result<(i64, String), sqlx::Error> { Ok((r.try_get(0)?, r.try_get(1)?)) };
                let (id, name) = f().map_err(StoreError::query(op))?;
                by_name.insert(name, id);
            }
        }
        let ids: Vec<i64> = new
            .jobs
            .iter()
            .map(|j| by_name.get(&j.name).copied().ok_or_else(|| StoreError::Corrupt(format!("job {} was not stored", j.name))))
            .collect::<Result<_>>()?;
        let mut edges: Vec<(i64, i64)> = Vec::new();
        for (i, job) in new.jobs.iter().enumerate() {
            for &n in &job.needs {
                let need = *ids.get(n).ok_or_else(|| StoreError::Corrupt(format!("job {} needs index {n}", job.name)))?;
                edges.push((ids[i], need));
            }
        }
        for chunk in edges.chunks(400) {
            let q = format!("INSERT INTO job_needs (job_id, need_id) VALUES {}", value_rows(1, chunk.len(), &[""; 2]));
            let mut query = query_dyn(q);
            for (job, need) in chunk {
                query = query.bind(*job).bind(*need);
            }
            query.execute(&mut *tx).answered().await.map_err(StoreError::query(op))?;
        }
        let mut superseded = Vec::new();
        if new.kind == DeploymentKind::Deploy {
            let rows = sqlx::query(
                "UPDATE deployments SET state = 'superseded', superseded_by = $1, finished_at = $2, reason = $3 \
                 WHERE lock_key = $4 AND kind = 'deploy' AND state IN ('queued', 'waiting') AND id < $1 RETURNING id",
            )
            .bind(dep_id)
            .bind(now)
            .bind(format!("superseded by deployment {dep_id} before it started"))
            .bind(&new.lock_key)
            .fetch_all(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
            for r in rows {
                let old: i64 = r.try_get(0).map_err(StoreError::query(op))?;
                sqlx::query("UPDATE jobs SET state = 'cancelled', reason = $1, finished_at = $2 WHERE deployment_id = $3 AND state = 'pending'")
                    .bind(format!("deployment superseded by {dep_id}"))
                    .bind(now)
                    .bind(old)
                    .execute(&mut *tx)
                    .answered()
                    .await
                    .map_err(StoreError::query(op))?;
                superseded.push(old);
            }
        }
        tx.commit().committed().await.map_err(StoreError::query(op))?;
        Ok(Submitted { event_id, deployment_id: dep_id, duplicate: false, superseded, busy: false })
    }

    async fn deployments(&self, limit: i64, state: Option<DeploymentState>) -> Result<Vec<DeploymentRow>> {
        let rows = match state {
            Some(s) => {
                query_dyn(format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE state = $1 ORDER BY id DESC LIMIT $2"))
                    .bind(s.as_str())
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .answered()
                    .await
            }
            None => {
                query_dyn(format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY id DESC LIMIT $1")).bind(limit).fetch_all(&self.pool).answered().await
            }
        }
        .map_err(StoreError::query("list deployments"))?;
        rows.iter().map(deployment_row).collect()
    }

    async fn deployment(&self, id: i64) -> Result<Option<DeploymentRow>> {
        query_dyn(format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("read deployment"))?
            .as_ref()
            .map(deployment_row)
            .transpose()
    }

    async fn jobs(&self, deployment: i64) -> Result<Vec<JobRow>> {
        let op = "list jobs";
        let rows = sqlx::query(
            "SELECT id, deployment_id, name, state, attempt, node, started_at, finished_at, exit_code, reason FROM jobs WHERE deployment_id = $1 ORDER BY id",
        )
        .bind(deployment)
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        let needs = sqlx::query("SELECT n.job_id, j.name FROM job_needs n JOIN jobs j ON j.id = n.need_id WHERE j.deployment_id = $1 ORDER BY j.id")
            .bind(deployment)
            .fetch_all(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        let mut by_job: HashMap<i64, Vec<String>> = HashMap::new();
        for n in needs {
            by_job.entry(n.try_get(0).map_err(StoreError::query(op))?).or_default().push(n.try_get(1).map_err(StoreError::query(op))?);
        }
        rows.iter()
            .map(|r| {
                let f = || -> std::result::Result<JobRow, sqlx::Error> {
                    let id: i64 = r.try_get("id")?;
                    let state: String = r.try_get("state")?;
                    Ok(JobRow {
                        id,
                        deployment_id: r.try_get("deployment_id")?,
                        name: r.try_get("name")?,
                        state: JobState::parse(&state).unwrap_or(JobState::Failed),
                        attempt: r.try_get("attempt")?,
                        node: r.try_get("node")?,
                        needs: by_job.get(&id).cloned().unwrap_or_default(),
                        started_at: r.try_get("started_at")?,
                        finished_at: r.try_get("finished_at")?,
                        exit_code: r.try_get("exit_code")?,
                        reason: r.try_get("reason")?,
                    })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }

    async fn attempts(&self, deployment: i64) -> Result<Vec<AttemptRow>> {
        let op = "list attempts";
        let rows = sqlx::query(
            "SELECT a.job_id, j.name, a.attempt, a.node, a.started_at, a.finished_at, a.outcome, a.exit_code, a.reason \
             FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.deployment_id = $1 ORDER BY a.id",
        )
        .bind(deployment)
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        let part_rows = sqlx::query(
            "SELECT p.job_id, p.attempt, p.part, p.started_at, p.finished_at, p.outcome, p.exit_code, p.reason \
             FROM attempt_parts p JOIN jobs j ON j.id = p.job_id WHERE j.deployment_id = $1 ORDER BY p.id",
        )
        .bind(deployment)
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        let mut parts: HashMap<(i64, i64), Vec<crate::store::PartResult>> = HashMap::new();
        for r in &part_rows {
            let f = || -> std::result::Result<((i64, i64), crate::store::PartResult), sqlx::Error> {
                let outcome: String = r.try_get(5)?;
                Ok((
                    (r.try_get(0)?, r.try_get(1)?),
                    crate::store::PartResult {
                        part: r.try_get(2)?,
                        started_at: r.try_get(3)?,
                        finished_at: r.try_get(4)?,
                        outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Failed),
                        exit_code: r.try_get(6)?,
                        reason: r.try_get(7)?,
                    },
                ))
            };
            let (key, part) = f().map_err(StoreError::query(op))?;
            parts.entry(key).or_default().push(part);
        }
        rows.iter()
            .map(|r| {
                let mut f = || -> std::result::Result<AttemptRow, sqlx::Error> {
                    let outcome: String = r.try_get(6)?;
                    let key: (i64, i64) = (r.try_get(0)?, r.try_get(2)?);
                    Ok(AttemptRow {
                        job_id: r.try_get(0)?,
                        job: r.try_get(1)?,
                        attempt: r.try_get(2)?,
                        node: r.try_get(3)?,
                        started_at: r.try_get(4)?,
                        finished_at: r.try_get(5)?,
                        outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Failed),
                        exit_code: r.try_get(7)?,
                        reason: r.try_get(8)?,
                        parts: parts.remove(&key).unwrap_or_default(),
                    })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }

    async fn cancel(&self, id: i64) -> Result<Option<DeploymentRow>> {
        let op = "cancel";
        let now = now_ms();
        let mut tx = self.pool.begin().answered().await.map_err(StoreError::query(op))?;
        let Some(row) = self.lock_deployment(&mut tx, id).await? else {
            return Ok(None);
        };
        let dep = deployment_row(&row)?;
        if dep.state.is_terminal() {
            tx.commit().committed().await.map_err(StoreError::query(op))?;
            return Ok(Some(dep));
        }
        sqlx::query("UPDATE deployments SET cancel_requested = 1 WHERE id = $1").bind(id).execute(&mut *tx).answered().await.map_err(StoreError::query(op))?;
        sqlx::query("UPDATE jobs SET state = 'cancelled', reason = 'deployment cancelled before the job started', finished_at = $1 WHERE deployment_id = $2 AND state IN ('pending', 'ready')")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .answered().await
            .map_err(StoreError::query(op))?;
        if matches!(dep.state, DeploymentState::Queued | DeploymentState::Waiting) {
            sqlx::query("UPDATE deployments SET state = 'cancelled', reason = $3, finished_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .bind(if dep.state == DeploymentState::Queued { "cancelled while queued" } else { "cancelled while waiting" })
                .execute(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
        } else {
            self.complete_if_done(&mut tx, id, now).await?;
        }
        let row = self.lock_deployment(&mut tx, id).await?;
        tx.commit().committed().await.map_err(StoreError::query(op))?;
        row.as_ref().map(deployment_row).transpose()
    }

    async fn holds(&self) -> Result<Vec<(DeploymentRow, Hold)>> {
        let op = "list holds";
        let cols = DEPLOYMENT_COLUMNS.split(", ").map(|c| format!("d.{c}")).collect::<Vec<_>>().join(", ");
        let rows = query_dyn(format!(
            "SELECT {cols}, {HOLD_COLUMNS} FROM deployments d JOIN holds h ON h.deployment_id = d.id WHERE d.state = 'waiting' ORDER BY d.id"
        ))
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        rows.iter().map(|r| Ok((deployment_row(r)?, hold_row(r)?))).collect()
    }

    async fn hold(&self, deployment: i64) -> Result<Option<Hold>> {
        let row = query_dyn(format!("SELECT {HOLD_COLUMNS} FROM holds h WHERE h.deployment_id = $1"))
            .bind(deployment)
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("read hold"))?;
        row.as_ref().map(hold_row).transpose()
    }

    async fn approve(&self, deployment: i64, by: &str) -> Result<bool> {
        let by = &*storable(by);
        let n = sqlx::query(
            "UPDATE holds SET approved_by = $1, approved_at = $2 WHERE deployment_id = $3 AND approval = 1 AND approved_by IS NULL \
             AND EXISTS (SELECT 1 FROM deployments d WHERE d.id = $3 AND d.state = 'waiting')",
        )
        .bind(by)
        .bind(now_ms())
        .bind(deployment)
        .execute(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query("approve"))?
        .rows_affected();
        Ok(n > 0)
    }

    async fn set_waiting_for(&self, deployment: i64, what: &str) -> Result<()> {
        let what = &*storable(what);
        for q in ["UPDATE holds SET waiting_for = $1 WHERE deployment_id = $2", "UPDATE deployments SET reason = $1 WHERE id = $2 AND state = 'waiting'"] {
            sqlx::query(q).bind(what).bind(deployment).execute(&self.pool).answered().await.map_err(StoreError::query("set waiting_for"))?;
        }
        Ok(())
    }

    async fn release(&self, deployment: i64) -> Result<bool> {
        let n = sqlx::query("UPDATE deployments SET state = 'queued', reason = NULL WHERE id = $1 AND state = 'waiting'")
            .bind(deployment)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("release"))?
            .rows_affected();
        if n > 0 {
            let _ = sqlx::query("UPDATE holds SET waiting_for = NULL WHERE deployment_id = $1").bind(deployment).execute(&self.pool).answered().await;
        }
        Ok(n > 0)
    }

    async fn in_flight_on(&self, lock_key: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT id FROM deployments WHERE lock_key = $1 AND state IN ('waiting', 'queued', 'running') LIMIT 1")
            .bind(lock_key)
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("in flight on a lock"))?
            .is_some())
    }

    async fn queued_in_windows(&self) -> Result<Vec<(DeploymentRow, Hold)>> {
        let op = "list queued deployments in windows";
        let cols = DEPLOYMENT_COLUMNS.split(", ").map(|c| format!("d.{c}")).collect::<Vec<_>>().join(", ");
        let rows = query_dyn(format!(
            "SELECT {cols}, {HOLD_COLUMNS} FROM deployments d JOIN holds h ON h.deployment_id = d.id WHERE d.state = 'queued' AND h.in_window = 1 ORDER BY d.id"
        ))
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        rows.iter().map(|r| Ok((deployment_row(r)?, hold_row(r)?))).collect()
    }

    async fn hold_back(&self, deployment: i64, waiting_for: &str) -> Result<bool> {
        let waiting_for = &*storable(waiting_for);
        let op = "hold back a queued deployment";
        let mut tx = self.pool.begin().answered().await.map_err(StoreError::query(op))?;
        let n = sqlx::query("UPDATE deployments SET state = 'waiting', reason = $1 WHERE id = $2 AND state = 'queued'")
            .bind(waiting_for)
            .bind(deployment)
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?
            .rows_affected();
        if n > 0 {
            sqlx::query("UPDATE holds SET waiting_for = $1 WHERE deployment_id = $2")
                .bind(waiting_for)
                .bind(deployment)
                .execute(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
        }
        tx.commit().committed().await.map_err(StoreError::query(op))?;
        Ok(n > 0)
    }

    async fn drop_waiting(&self, deployment: i64, reason: &str, replaced_by: Option<i64>) -> Result<bool> {
        let reason = &*storable(reason);
        let op = "drop waiting deployment";
        let now = now_ms();
        let state = if replaced_by.is_some() { DeploymentState::Superseded } else { DeploymentState::Cancelled };
        let mut tx = self.pool.begin().answered().await.map_err(StoreError::query(op))?;
        let n = sqlx::query("UPDATE deployments SET state = $1, superseded_by = $2, reason = $3, finished_at = $4 WHERE id = $5 AND state = 'waiting'")
            .bind(state.as_str())
            .bind(replaced_by)
            .bind(reason)
            .bind(now)
            .bind(deployment)
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?
            .rows_affected();
        if n > 0 {
            sqlx::query("UPDATE jobs SET state = 'cancelled', reason = $1, finished_at = $2 WHERE deployment_id = $3 AND state = 'pending'")
                .bind(reason)
                .bind(now)
                .bind(deployment)
                .execute(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
        }
        tx.commit().committed().await.map_err(StoreError::query(op))?;
        Ok(n > 0)
    }

    async fn register_node(&self, node: &str) -> Result<()> {
        let now = now_ms();
        sqlx::query("INSERT INTO nodes (id, started_at, heartbeat_at) VALUES ($1, $2, $2) ON CONFLICT (id) DO UPDATE SET heartbeat_at = $2")
            .bind(node)
            .bind(now)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("register node"))?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query("SELECT id, started_at, heartbeat_at FROM nodes ORDER BY heartbeat_at DESC LIMIT 100")
            .fetch_all(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("list nodes"))?;
        rows.iter()
            .map(|r| {
                Ok(NodeRow {
                    id: r.try_get(0).map_err(StoreError::query("list nodes"))?,
                    started_at: r.try_get(1).map_err(StoreError::query("list nodes"))?,
                    heartbeat_at: r.try_get(2).map_err(StoreError::query("list nodes"))?,
                })
            })
            .collect()
    }

    async fn activate(&self, node: &str, lease: Duration) -> Result<Vec<i64>> {
        let op = "activate";
        let queued = sqlx::query("SELECT id, lock_key FROM deployments WHERE state = 'queued' ORDER BY id LIMIT 100")
            .fetch_all(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        let mut tried = HashSet::new();
        let mut activated = Vec::new();
        for r in queued {
            let id: i64 = r.try_get(0).map_err(StoreError::query(op))?;
            let key: String = r.try_get(1).map_err(StoreError::query(op))?;
            // Oldest first: a younger deployment never overtakes an older
            // one on the same lock.
            if !tried.insert(key.clone()) {
                continue;
            }
            let mut tx = self.pool.begin().answered().await.map_err(StoreError::query(op))?;
            // Read the clock here, not once for the batch: the deployment
            // holding this lock may have finished (and released it) since,
            // and a start stamped before that finish would look like two
            // deployments of one lock overlapping.
            let now = now_ms();
            let got =
                sqlx::query("INSERT INTO locks (key, deployment_id, node, lease_until) VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING RETURNING key")
                    .bind(&key)
                    .bind(id)
                    .bind(node)
                    .bind(now + ms(lease))
                    .fetch_optional(&mut *tx)
                    .answered()
                    .await
                    .map_err(StoreError::query(op))?;
            if got.is_none() {
                tx.rollback().answered().await.map_err(StoreError::query(op))?;
                continue;
            }
            // After the lock is ours (on PostgreSQL the insert waited for
            // the previous holder's release to commit).
            let now = now_ms();
            let started = sqlx::query("UPDATE deployments SET state = 'running', started_at = $1 WHERE id = $2 AND state = 'queued'")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .answered()
                .await
                .map_err(StoreError::query(op))?
                .rows_affected();
            if started == 0 {
                tx.rollback().answered().await.map_err(StoreError::query(op))?;
                continue;
            }
            sqlx::query(
                "UPDATE jobs SET state = 'ready', ready_at = $1 WHERE deployment_id = $2 AND state = 'pending' \
                 AND NOT EXISTS (SELECT 1 FROM job_needs n WHERE n.job_id = jobs.id)",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
            tx.commit().committed().await.map_err(StoreError::query(op))?;
            activated.push(id);
        }
        Ok(activated)
    }

    async fn claim(&self, node: &str, lease: Duration, limit: i64) -> Result<Vec<ClaimedJob>> {
        match self.write(Work::Claim { node: node.to_string(), lease, limit }).await? {
            BatchResult::Claim(jobs) => Ok(jobs),
            _ => Err(mismatch()),
        }
    }

    async fn renew(&self, node: &str, held: &[(i64, i64)], lease: Duration) -> Result<Vec<Renewal>> {
        let op = "renew leases";
        let now = now_ms();
        let until = now + ms(lease);
        sqlx::query("UPDATE nodes SET heartbeat_at = $1 WHERE id = $2")
            .bind(now)
            .bind(node)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        sqlx::query("UPDATE locks SET lease_until = $1 WHERE node = $2")
            .bind(until)
            .bind(node)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        if held.is_empty() {
            return Ok(vec![]);
        }
        // Only the attempts this process holds: jobs left under the same
        // node id by a previous process must expire and be reaped. (A job
        // row has one current attempt, so its id names it.) One statement
        // per 500 jobs, not one per job.
        // On PostgreSQL the rows are locked in id order first, the order a
        // batch of finishes locks them in: an UPDATE alone locks them in
        // the order its scan meets them (a sequential or bitmap scan:
        // where each row version lies), and a batch finishing two of them
        // the other way round deadlocked with it, stalling both for
        // PostgreSQL's deadlock_timeout (issue 19, found by the bench).
        let mut ordered = held.to_vec();
        ordered.sort_unstable();
        for chunk in ordered.chunks(500) {
            let ids = placeholders(3, chunk.len());
            let q = format!(
                "UPDATE jobs SET lease_until = $1 WHERE id IN \
                 (SELECT id FROM jobs WHERE node = $2 AND state = 'running' AND id IN ({}) ORDER BY id{})",
                ids,
                self.for_update()
            );
            let mut query = query_dyn(q).bind(until).bind(node);
            for (job, _) in chunk {
                query = query.bind(*job);
            }
            query.execute(&self.pool).answered().await.map_err(StoreError::query(op))?;
        }
        let rows = sqlx::query(
            "SELECT j.id, j.fence, d.cancel_requested FROM jobs j JOIN deployments d ON d.id = j.deployment_id WHERE j.node = $1 AND j.state = 'running'",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        let mut mine: HashMap<i64, (i64, bool)> = HashMap::new();
        for r in rows {
            mine.insert(
                r.try_get(0).map_err(StoreError::query(op))?,
                (r.try_get(1).map_err(StoreError::query(op))?, r.try_get::<i64, _>(2).map_err(StoreError::query(op))? != 0),
            );
        }
        Ok(held
            .iter()
            .map(|(job, fence)| match mine.get(job) {
                Some((f, cancel)) if f == fence => Renewal { job_id: *job, held: true, cancel: *cancel },
                _ => Renewal { job_id: *job, held: false, cancel: false },
            })
            .collect())
    }

    async fn finish(&self, done: FinishedAttempt) -> Result<FinishEffect> {
        match self.write(Work::Finish(storable_finish(done))).await? {
            BatchResult::Finish(effect) => Ok(effect),
            _ => Err(mismatch()),
        }
    }

    async fn finish_and_claim(&self, done: FinishedAttempt, node: &str, lease: Duration) -> Result<(FinishEffect, Option<ClaimedJob>)> {
        match self.write(Work::FinishClaim { done: storable_finish(done), node: node.to_string(), lease }).await? {
            BatchResult::FinishClaim(effect, next) => Ok((effect, next.map(|n| *n))),
            _ => Err(mismatch()),
        }
    }

    async fn expired(&self) -> Result<Vec<Expired>> {
        let op = "find expired leases";
        let rows = sqlx::query("SELECT id, deployment_id, name, fence, node, attempt, started_at, spec FROM jobs WHERE state = 'running' AND lease_until < $1 ORDER BY id LIMIT 500")
            .bind(now_ms())
            .fetch_all(&self.pool)
            .answered().await
            .map_err(StoreError::query(op))?;
        rows.iter()
            .map(|r| {
                let spec: String = r.try_get(7).map_err(StoreError::query(op))?;
                let spec = spec_or_unreadable(&spec);
                Ok(Expired {
                    job_id: r.try_get(0).map_err(StoreError::query(op))?,
                    deployment_id: r.try_get(1).map_err(StoreError::query(op))?,
                    name: r.try_get(2).map_err(StoreError::query(op))?,
                    fence: r.try_get(3).map_err(StoreError::query(op))?,
                    node: r.try_get(4).map_err(StoreError::query(op))?,
                    attempt: r.try_get(5).map_err(StoreError::query(op))?,
                    started_at: r.try_get::<Option<i64>, _>(6).map_err(StoreError::query(op))?.unwrap_or(0),
                    spec,
                })
            })
            .collect()
    }

    async fn reap_locks(&self, node: &str, lease: Duration) -> Result<u64> {
        let op = "reap locks";
        let now = now_ms();
        let dropped = query_dyn(
            "DELETE FROM locks WHERE lease_until < $1 AND deployment_id IN (SELECT id FROM deployments WHERE state NOT IN ('queued', 'running'))".to_string(),
        )
        .bind(now)
        .execute(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?
        .rows_affected();
        // A running deployment keeps its lock; whoever notices the holder
        // is gone carries the lease on.
        let taken = sqlx::query("UPDATE locks SET node = $1, lease_until = $2 WHERE lease_until < $3")
            .bind(node)
            .bind(now + ms(lease))
            .bind(now)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?
            .rows_affected();
        Ok(dropped + taken)
    }

    async fn expire_all_leases(&self) -> Result<()> {
        sqlx::query("UPDATE jobs SET lease_until = 0 WHERE state = 'running'")
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("expire leases"))?;
        sqlx::query("UPDATE locks SET lease_until = 0").execute(&self.pool).answered().await.map_err(StoreError::query("expire leases"))?;
        Ok(())
    }

    async fn append_logs(&self, lines: &[NewLogLine]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut lines = lines.to_vec();
        for l in &mut lines {
            make_storable(&mut l.line);
            l.part.iter_mut().for_each(make_storable);
        }
        self.write(Work::Logs(lines)).await.map(|_| ())
    }

    async fn logs(&self, deployment: i64, job: Option<&str>, after: i64, limit: i64) -> Result<Vec<LogRecord>> {
        let op = "read logs";
        let base = "SELECT l.id, j.name, l.attempt, l.ts, l.stream, l.line, l.part FROM logs l JOIN jobs j ON j.id = l.job_id WHERE l.deployment_id = $1 AND l.id > $2";
        let rows = match job {
            Some(name) => {
                query_dyn(format!("{base} AND j.name = $3 ORDER BY l.id LIMIT $4"))
                    .bind(deployment)
                    .bind(after)
                    .bind(name)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .answered()
                    .await
            }
            None => query_dyn(format!("{base} ORDER BY l.id LIMIT $3")).bind(deployment).bind(after).bind(limit).fetch_all(&self.pool).answered().await,
        }
        .map_err(StoreError::query(op))?;
        rows.iter()
            .map(|r| {
                let f = || -> std::result::Result<LogRecord, sqlx::Error> {
                    Ok(LogRecord {
                        seq: r.try_get(0)?,
                        job: r.try_get(1)?,
                        attempt: r.try_get(2)?,
                        ts: r.try_get(3)?,
                        stream: r.try_get(4)?,
                        line: r.try_get(5)?,
                        part: r.try_get(6)?,
                    })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }

    async fn history(&self, environment: &str) -> Result<HashMap<String, Duration>> {
        let op = "read history";
        let rows = sqlx::query(
            "SELECT j.name, a.finished_at - a.started_at FROM attempts a JOIN jobs j ON j.id = a.job_id JOIN deployments d ON d.id = j.deployment_id \
             WHERE a.outcome = 'succeeded' AND d.environment = $1 ORDER BY a.id DESC LIMIT 5000",
        )
        .bind(environment)
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        let mut samples: HashMap<String, Vec<i64>> = HashMap::new();
        for r in rows {
            let name: String = r.try_get(0).map_err(StoreError::query(op))?;
            let d: i64 = r.try_get(1).map_err(StoreError::query(op))?;
            let v = samples.entry(name).or_default();
            if v.len() < 5 {
                v.push(d.max(0));
            }
        }
        Ok(samples
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_unstable();
                (k, Duration::from_millis(v[v.len() / 2] as u64))
            })
            .collect())
    }

    async fn counts(&self) -> Result<Counts> {
        let op = "count";
        let mut counts = Counts::default();
        for r in sqlx::query("SELECT state, COUNT(*) FROM deployments GROUP BY state").fetch_all(&self.pool).answered().await.map_err(StoreError::query(op))? {
            let s: String = r.try_get(0).map_err(StoreError::query(op))?;
            let n: i64 = r.try_get(1).map_err(StoreError::query(op))?;
            if let Some(s) = DeploymentState::parse(&s) {
                if s == DeploymentState::Queued {
                    counts.queued_deployments = n;
                }
                counts.deployments.push((s, n));
            }
        }
        for r in sqlx::query("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetch_all(&self.pool).answered().await.map_err(StoreError::query(op))? {
            let s: String = r.try_get(0).map_err(StoreError::query(op))?;
            let n: i64 = r.try_get(1).map_err(StoreError::query(op))?;
            if let Some(s) = JobState::parse(&s) {
                if s == JobState::Ready {
                    counts.ready = n;
                }
                counts.jobs.push((s, n));
            }
        }
        Ok(counts)
    }

    async fn set_service(&self, row: ServiceRow) -> Result<()> {
        // Same version again (a re-run rollout) keeps the older previous.
        sqlx::query(
            "INSERT INTO services (environment, service, version, previous_version, spec, revision, deployment_id, updated_at, artifact_dir, sha256, previous_sha256, target_ref) \
             VALUES ($1, $2, $3, NULL, $4, $5, $6, $7, $8, $9, NULL, $10) \
             ON CONFLICT (environment, service) DO UPDATE SET \
               previous_version = CASE WHEN services.version = excluded.version THEN services.previous_version ELSE services.version END, \
               previous_sha256 = CASE WHEN services.version = excluded.version THEN services.previous_sha256 ELSE services.sha256 END, \
               sha256 = excluded.sha256, \
               version = excluded.version, spec = excluded.spec, revision = excluded.revision, \
               deployment_id = excluded.deployment_id, updated_at = excluded.updated_at, artifact_dir = excluded.artifact_dir, \
               target_ref = excluded.target_ref",
        )
        .bind(&row.environment)
        .bind(&row.service)
        .bind(&row.version)
        .bind(&row.spec)
        .bind(&row.revision)
        .bind(row.deployment_id)
        .bind(row.updated_at)
        .bind(row.artifact_dir.clone())
        .bind(row.sha256.clone())
        .bind(row.target_ref.clone())
        .execute(&self.pool)
        .answered().await
        .map_err(StoreError::query("record service version"))?;
        Ok(())
    }

    async fn services(&self) -> Result<Vec<ServiceRow>> {
        let op = "list services";
        let rows = sqlx::query("SELECT environment, service, version, previous_version, spec, revision, deployment_id, updated_at, artifact_dir, sha256, previous_sha256, target_ref FROM services ORDER BY environment, service")
            .fetch_all(&self.pool)
            .answered().await
            .map_err(StoreError::query(op))?;
        rows.iter()
            .map(|r| {
                let f = || -> std::result::Result<ServiceRow, sqlx::Error> {
                    Ok(ServiceRow {
                        environment: r.try_get(0)?,
                        service: r.try_get(1)?,
                        version: r.try_get(2)?,
                        previous_version: r.try_get(3)?,
                        spec: r.try_get(4)?,
                        revision: r.try_get(5)?,
                        deployment_id: r.try_get(6)?,
                        updated_at: r.try_get(7)?,
                        artifact_dir: r.try_get(8)?,
                        sha256: r.try_get(9)?,
                        previous_sha256: r.try_get(10)?,
                        target_ref: r.try_get(11)?,
                    })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }

    async fn record_event(&self, mut e: NewEvent) -> Result<(i64, bool)> {
        make_event_storable(&mut e);
        let op = "record an event";
        let inserted = sqlx::query("INSERT INTO events (key, kind, payload, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING RETURNING id")
            .bind(e.key.clone())
            .bind(&e.kind)
            .bind(&e.payload)
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        match inserted {
            Some(row) => Ok((row.try_get(0).map_err(StoreError::query(op))?, false)),
            None => {
                let row = sqlx::query("SELECT id FROM events WHERE key = $1")
                    .bind(e.key.clone())
                    .fetch_one(&self.pool)
                    .answered()
                    .await
                    .map_err(StoreError::query(op))?;
                Ok((row.try_get(0).map_err(StoreError::query(op))?, true))
            }
        }
    }

    async fn event_by_key(&self, key: &str) -> Result<Option<EventRow>> {
        let key = &*storable(key);
        let op = "read an event by its key";
        let row = sqlx::query("SELECT id, kind, payload, received_at, deployment_id FROM events WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        row.map(|r| {
            let f = || -> std::result::Result<EventRow, sqlx::Error> {
                Ok(EventRow { id: r.try_get(0)?, kind: r.try_get(1)?, payload: r.try_get(2)?, received_at: r.try_get(3)?, deployment_id: r.try_get(4)? })
            };
            f().map_err(StoreError::query(op))
        })
        .transpose()
    }

    async fn events_of_kind(&self, kind: &str, limit: i64) -> Result<Vec<EventRow>> {
        let kind = &*storable(kind);
        let op = "list events of a kind";
        let rows = sqlx::query("SELECT id, kind, payload, received_at, deployment_id FROM events WHERE kind = $1 ORDER BY id DESC LIMIT $2")
            .bind(kind)
            .bind(limit.clamp(0, 10_000))
            .fetch_all(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        rows.iter()
            .map(|r| {
                let f = || -> std::result::Result<EventRow, sqlx::Error> {
                    Ok(EventRow { id: r.try_get(0)?, kind: r.try_get(1)?, payload: r.try_get(2)?, received_at: r.try_get(3)?, deployment_id: r.try_get(4)? })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }

    async fn events_by_id(&self, ids: &[i64]) -> Result<Vec<EventRow>> {
        let op = "read events by id";
        let mut out = Vec::with_capacity(ids.len());
        // At most 500 ids a query: well within either database's limit on
        // bound parameters.
        for chunk in ids.chunks(500) {
            let sql = format!("SELECT id, kind, payload, received_at, deployment_id FROM events WHERE id IN ({})", placeholders(1, chunk.len()));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&self.pool).answered().await.map_err(StoreError::query(op))? {
                let f = || -> std::result::Result<EventRow, sqlx::Error> {
                    Ok(EventRow { id: r.try_get(0)?, kind: r.try_get(1)?, payload: r.try_get(2)?, received_at: r.try_get(3)?, deployment_id: r.try_get(4)? })
                };
                out.push(f().map_err(StoreError::query(op))?);
            }
        }
        Ok(out)
    }

    async fn events(&self, prefixes: &[&str], limit: i64) -> Result<Vec<EventRow>> {
        let op = "list events";
        let mut out = Vec::new();
        for prefix in prefixes {
            let prefix = &*storable(prefix);
            // LIKE narrows it down; the exact prefix test is below ('_'
            // is a LIKE wildcard).
            let rows = sqlx::query("SELECT id, kind, payload, received_at, deployment_id FROM events WHERE kind LIKE $1 ORDER BY id DESC LIMIT 1000")
                .bind(format!("{prefix}%"))
                .fetch_all(&self.pool)
                .answered()
                .await
                .map_err(StoreError::query(op))?;
            for r in &rows {
                let f = || -> std::result::Result<EventRow, sqlx::Error> {
                    Ok(EventRow { id: r.try_get(0)?, kind: r.try_get(1)?, payload: r.try_get(2)?, received_at: r.try_get(3)?, deployment_id: r.try_get(4)? })
                };
                let e = f().map_err(StoreError::query(op))?;
                if e.kind.starts_with(prefix) {
                    out.push(e);
                }
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.id));
        out.truncate(limit.clamp(0, 1000) as usize);
        Ok(out)
    }

    async fn create_token(&self, mut t: TokenRow) -> Result<bool> {
        make_storable(&mut t.name);
        let r = sqlx::query("INSERT INTO tokens (name, hash, roles, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind(&t.name)
            .bind(&t.hash)
            .bind(&t.roles)
            .bind(t.created_at)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("create a token"))?;
        Ok(r.rows_affected() == 1)
    }

    async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let op = "list tokens";
        let rows = sqlx::query("SELECT name, hash, roles, created_at, revoked_at FROM tokens ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        rows.iter().map(|r| token_row(r).map_err(StoreError::query(op))).collect()
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        let op = "find a token";
        let row = sqlx::query("SELECT name, hash, roles, created_at, revoked_at FROM tokens WHERE hash = $1 AND revoked_at IS NULL")
            .bind(hash)
            .fetch_optional(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        row.as_ref().map(|r| token_row(r).map_err(StoreError::query(op))).transpose()
    }

    async fn revoke_token(&self, name: &str) -> Result<Revoked> {
        let name = &*storable(name);
        let op = "revoke a token";
        let mut tx = self.pool.begin().answered().await.map_err(StoreError::query(op))?;
        // The live tokens, locked (PostgreSQL): a concurrent revoke waits
        // here and then sees this one's result. On SQLite a writer that
        // committed since this read makes the UPDATE fail (busy snapshot)
        // rather than act on what it read.
        let q = format!("SELECT name, hash, roles, created_at, revoked_at FROM tokens WHERE revoked_at IS NULL{}", self.for_update());
        let rows = query_dyn(q).fetch_all(&mut *tx).answered().await.map_err(StoreError::query(op))?;
        let live = rows.iter().map(token_row).collect::<std::result::Result<Vec<_>, _>>().map_err(StoreError::query(op))?;
        let Some(target) = live.iter().find(|t| t.name == name) else { return Ok(Revoked::NoSuchToken) };
        if target.is_root_admin() && !live.iter().any(|t| t.name != name && t.is_root_admin()) {
            return Ok(Revoked::LastAdmin);
        }
        sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(name)
            .execute(&mut *tx)
            .answered()
            .await
            .map_err(StoreError::query(op))?;
        tx.commit().committed().await.map_err(StoreError::query(op))?;
        Ok(Revoked::Revoked)
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let now = now_ms();
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2));
        // The conditional upsert decides in the database: the row changes
        // only for its holder or once it has expired.
        let taken = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(expires)
        .bind(now)
        .execute(&self.pool)
        .answered().await
        .map_err(StoreError::query("take a lease"))?
        .rows_affected();
        Ok(taken == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("release a lease"))?;
        Ok(())
    }

    async fn record_audit(&self, mut a: AuditEntry) -> Result<()> {
        for text in [&mut a.actor, &mut a.address, &mut a.action, &mut a.detail] {
            make_storable(text);
        }
        a.environment.iter_mut().for_each(make_storable);
        sqlx::query("INSERT INTO audit (at, actor, address, action, detail, status, environment) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(a.at)
            .bind(&a.actor)
            .bind(&a.address)
            .bind(&a.action)
            .bind(&a.detail)
            .bind(a.status)
            .bind(&a.environment)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("record an audit entry"))?;
        Ok(())
    }

    async fn audit_filtered(&self, filter: &AuditFilter, limit: i64) -> Result<Vec<AuditEntry>> {
        let op = "list the audit log";
        // A filter left out matches everything: `$1 IS NULL OR ...`.
        let rows = sqlx::query(
            "SELECT id, at, actor, address, action, detail, status, environment FROM audit \
             WHERE ($1 IS NULL OR environment = $1) AND ($2 IS NULL OR actor = $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(filter.environment.as_deref().map(|e| storable(e).into_owned()))
        .bind(filter.actor.as_deref().map(|a| storable(a).into_owned()))
        .bind(limit.clamp(0, 1000))
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        rows.iter()
            .map(|r| {
                let f = || -> std::result::Result<AuditEntry, sqlx::Error> {
                    Ok(AuditEntry {
                        id: r.try_get(0)?,
                        at: r.try_get(1)?,
                        actor: r.try_get(2)?,
                        address: r.try_get(3)?,
                        action: r.try_get(4)?,
                        detail: r.try_get(5)?,
                        status: r.try_get(6)?,
                        environment: r.try_get(7)?,
                    })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }

    async fn record_service_event(&self, mut e: ServiceEvent) -> Result<()> {
        for text in [&mut e.environment, &mut e.service, &mut e.kind, &mut e.message] {
            make_storable(text);
        }
        sqlx::query("INSERT INTO service_events (environment, service, at, kind, message) VALUES ($1, $2, $3, $4, $5)")
            .bind(&e.environment)
            .bind(&e.service)
            .bind(e.at)
            .bind(&e.kind)
            .bind(&e.message)
            .execute(&self.pool)
            .answered()
            .await
            .map_err(StoreError::query("record service event"))?;
        Ok(())
    }

    async fn service_events(&self, environment: &str, service: &str, limit: i64) -> Result<Vec<ServiceEvent>> {
        let (environment, service) = (&*storable(environment), &*storable(service));
        let op = "list service events";
        let rows = sqlx::query(
            "SELECT environment, service, at, kind, message FROM service_events WHERE environment = $1 AND service = $2 ORDER BY id DESC LIMIT 1000",
        )
        .bind(environment)
        .bind(service)
        .fetch_all(&self.pool)
        .answered()
        .await
        .map_err(StoreError::query(op))?;
        rows.iter()
            .take(limit.clamp(0, 1000) as usize)
            .map(|r| {
                let f = || -> std::result::Result<ServiceEvent, sqlx::Error> {
                    Ok(ServiceEvent { environment: r.try_get(0)?, service: r.try_get(1)?, at: r.try_get(2)?, kind: r.try_get(3)?, message: r.try_get(4)? })
                };
                f().map_err(StoreError::query(op))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{placeholders, value_rows};

    #[test]
    fn numbered_parameters_for_lists_and_value_rows() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(value_rows(1, 2, &["", ""]), "($1, $2), ($3, $4)");
        assert_eq!(value_rows(2, 2, &["BIGINT", ""]), "(CAST($2 AS BIGINT), $3), (CAST($4 AS BIGINT), $5)");
        assert_eq!(value_rows(1, 0, &[""]), "");
    }

    // Issue 19 (an audit of where secrets go): a password given as a
    // parameter was printed as given.
    #[test]
    fn issue19_a_store_url_is_printed_without_any_password() {
        use super::redact_url;
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db?password=s3cret&sslmode=require"), "postgres://u@h/db?password=***&sslmode=require");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db?PassWord=x&sslpassword=y&application_name=a"),
            "postgres://u:***@h/db?PassWord=***&sslpassword=***&application_name=a"
        );
        assert_eq!(redact_url("postgres://u:pa?ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db?%70assword=x"), "postgres://u@h/db?%70assword=***");
        // An '@' in a parameter: the host is hidden too, never the password shown.
        assert!(!redact_url("postgres://u:secret@h/db?options=a@b").contains("secret"));
        assert!(!redact_url("postgres://h/db?password=secret&options=a@b").contains("secret"));
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db?password=%"), "postgres://h/db?password=***");
        assert_eq!(redact_url("sqlite:///var/lib/slipway/store.db"), "sqlite:///var/lib/slipway/store.db");
    }

    // Issue 19 (left by the twelfth session): sqlx logged a parameter it
    // does not know (`sslpassword`) at WARN with its value.
    #[test]
    fn issue19_a_parameter_sqlx_does_not_know_is_taken_out_and_named_without_its_value() {
        use super::without_unknown_params;
        let (url, ignored) = without_unknown_params("postgres://u@h:5432/db?sslmode=disable&sslpassword=key-pw-7&connect_timeout=10&options[search_path]=s");
        assert_eq!(ignored, ["sslpassword", "connect_timeout"]);
        assert!(!url.contains("key-pw-7") && url.contains("sslmode=disable") && url.contains("search_path"), "{url}");
        assert_eq!(without_unknown_params("postgres://u:pw@h/db?sslmode=require").0, "postgres://u:pw@h/db?sslmode=require");
        assert_eq!(without_unknown_params("postgres://u@h/db?sslpassword=x").0, "postgres://u@h/db");
    }
}
