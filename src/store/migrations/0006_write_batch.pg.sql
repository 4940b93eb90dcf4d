-- PostgreSQL only (SQLite runs nothing for this version).
--
-- The writer task's common batch in one call, so in one round trip
-- instead of three to six (BEGIN, the deployments' lock, the finishes,
-- the claims, COMMIT; issue 19): job output lines, plain successful
-- finishes (each recorded as an attempt, their dependants made ready, the
-- next job claimed for each that wants one), and plain claims. Called
-- outside a transaction: the call is one. Each statement of a volatile
-- function takes a new snapshot, so every statement after the
-- deployments' lock sees every other finish of those deployments, as the
-- general path's separate statements do.
--
-- `batch` is a JSON object: `now` (the node's clock, ms; the time the
-- call waited for the lock is added to it); `finishes` [{id, fence,
-- outcome, exit_code, reason, takeover, node, started_at, want}…] and, if
-- any wants a next job, `claimer` and `lease_ms`; `logs` [{deployment_id,
-- job_id, attempt, ts, stream, line, part}…] in order; `claims` [{node,
-- lease_ms, limit}…].
--
-- Returns NULL, having written nothing, for finishes that are not common:
-- one that did not succeed, a deployment being cancelled, or one this
-- batch may complete (no open job but its own). The caller then runs the
-- general path (src/store/sql.rs, `run_ops_on`). Otherwise a JSON object:
-- `finished` [[job, deployment]…] (a stale finish is absent), `released`
-- [deployment…] (one per job made ready), `next` (the jobs claimed for the
-- finishes that want one) and `claims` (one list per claim, in order):
-- lists of [[id, deployment, name, attempt, fence, spec, ready_at], [the
-- deployment's revision, environment, service, version, created_at]],
-- lowest id first: all the caller needs, so nothing it does after the
-- call (which has committed) can fail.
CREATE OR REPLACE FUNCTION slipway_write_batch(batch TEXT)
RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    b JSONB := batch::jsonb;
    now_ms BIGINT := (b->>'now')::bigint;
    -- The node's clock when the call arrived.
    called BIGINT := (b->>'now')::bigint;
    fin JSONB := coalesce(b->'finishes', '[]'::jsonb);
    ids BIGINT[];
    finished JSONB;
    released JSONB;
    wanting BIGINT := 0;
    next_jobs JSONB;
    claims JSONB := '[]'::jsonb;
    one JSONB;
    got JSONB;
BEGIN
    SELECT array_agg(x.id ORDER BY x.id) INTO ids FROM jsonb_to_recordset(fin) AS x(id BIGINT);
    IF ids IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM jsonb_to_recordset(fin) AS x(outcome TEXT) WHERE x.outcome IS DISTINCT FROM 'succeeded') THEN
            RETURN NULL;
        END IF;
        -- The deployments' rows, in id order, as every writer of a
        -- deployment takes them first (`lock_deployments_of`).
        PERFORM 1 FROM deployments WHERE id IN (SELECT deployment_id FROM jobs WHERE id = ANY (ids)) ORDER BY id FOR UPDATE;
        IF EXISTS (
            SELECT 1 FROM deployments d WHERE d.id IN (SELECT deployment_id FROM jobs WHERE id = ANY (ids))
            AND (d.cancel_requested <> 0 OR NOT EXISTS (
                SELECT 1 FROM jobs j WHERE j.deployment_id = d.id AND j.state IN ('pending', 'ready', 'running') AND j.id <> ALL (ids)))
        ) THEN
            RETURN NULL;
        END IF;
        now_ms := called + (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::bigint;
        -- The finishes (fenced: a stale one matches nothing; job rows
        -- locked in id order, as a lease renewal locks them), their
        -- attempts, and the dependants whose needs have all succeeded now.
        -- One snapshot, in which the finishing jobs are still running: the
        -- dependants' check counts those as succeeded.
        WITH v AS (
            SELECT * FROM jsonb_to_recordset(fin) AS x(id BIGINT, fence BIGINT, outcome TEXT, exit_code BIGINT, reason TEXT,
                takeover BIGINT, node TEXT, started_at BIGINT, want BOOLEAN)
        ), f AS (
            UPDATE jobs SET state = 'succeeded', finished_at = now_ms, exit_code = v.exit_code, reason = v.reason, lease_until = NULL
            FROM v WHERE jobs.id = v.id AND jobs.fence = v.fence AND jobs.state = 'running' AND (v.takeover = 0 OR jobs.lease_until < now_ms)
            AND jobs.id IN (SELECT id FROM jobs WHERE id = ANY (ids) ORDER BY id FOR UPDATE)
            RETURNING jobs.id, jobs.deployment_id, jobs.attempt
        ), a AS (
            INSERT INTO attempts (job_id, attempt, node, started_at, finished_at, outcome, exit_code, reason)
            SELECT f.id, f.attempt, v.node, v.started_at, now_ms, v.outcome, v.exit_code, v.reason FROM f JOIN v ON v.id = f.id ORDER BY f.id
        ), r AS (
            UPDATE jobs SET state = 'ready', ready_at = now_ms WHERE state = 'pending'
            AND id IN (SELECT n.job_id FROM job_needs n JOIN f ON f.id = n.need_id)
            AND NOT EXISTS (SELECT 1 FROM job_needs n JOIN jobs j2 ON j2.id = n.need_id WHERE n.job_id = jobs.id AND j2.state <> 'succeeded'
                AND j2.id NOT IN (SELECT id FROM f))
            RETURNING deployment_id
        )
        SELECT (SELECT jsonb_agg(jsonb_build_array(f.id, f.deployment_id)) FROM f),
            (SELECT jsonb_agg(r.deployment_id) FROM r),
            (SELECT count(*) FROM f JOIN v ON v.id = f.id WHERE v.want)
        INTO finished, released, wanting;
    END IF;
    INSERT INTO logs (deployment_id, job_id, attempt, ts, stream, line, part)
    SELECT x.deployment_id, x.job_id, x.attempt, x.ts, x.stream, x.line, x.part
    FROM jsonb_array_elements(coalesce(b->'logs', '[]'::jsonb)) WITH ORDINALITY AS e(line, n),
        jsonb_to_record(e.line) AS x(deployment_id BIGINT, job_id BIGINT, attempt BIGINT, ts BIGINT, stream TEXT, line TEXT, part TEXT)
    ORDER BY e.n;
    -- A next job for each finish that wants one, from what is ready now
    -- (what this batch released included), then the plain claims; another
    -- node's claim passes over what this one took.
    now_ms := called + (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::bigint;
    IF wanting > 0 THEN
        WITH c AS (
            UPDATE jobs SET state = 'running', node = b->>'claimer', lease_until = now_ms + (b->>'lease_ms')::bigint, fence = fence + 1,
                attempt = attempt + 1, started_at = now_ms
            WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' AND not_before <= now_ms ORDER BY id LIMIT wanting FOR UPDATE SKIP LOCKED)
            RETURNING id, deployment_id, name, attempt, fence, spec, ready_at
        )
        SELECT jsonb_agg(jsonb_build_array(jsonb_build_array(c.id, c.deployment_id, c.name, c.attempt, c.fence, c.spec, c.ready_at),
            jsonb_build_array(d.revision, d.environment, d.service, d.version, d.created_at)) ORDER BY c.id)
        INTO next_jobs FROM c JOIN deployments d ON d.id = c.deployment_id;
    END IF;
    FOR one IN SELECT value FROM jsonb_array_elements(coalesce(b->'claims', '[]'::jsonb)) LOOP
        WITH c AS (
            UPDATE jobs SET state = 'running', node = one->>'node', lease_until = now_ms + (one->>'lease_ms')::bigint, fence = fence + 1,
                attempt = attempt + 1, started_at = now_ms
            WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' AND not_before <= now_ms ORDER BY id
                LIMIT greatest((one->>'limit')::bigint, 0) FOR UPDATE SKIP LOCKED)
            RETURNING id, deployment_id, name, attempt, fence, spec, ready_at
        )
        SELECT coalesce(jsonb_agg(jsonb_build_array(jsonb_build_array(c.id, c.deployment_id, c.name, c.attempt, c.fence, c.spec, c.ready_at),
            jsonb_build_array(d.revision, d.environment, d.service, d.version, d.created_at)) ORDER BY c.id), '[]'::jsonb)
        INTO got FROM c JOIN deployments d ON d.id = c.deployment_id;
        claims := claims || jsonb_build_array(got);
    END LOOP;
    RETURN jsonb_build_object('finished', finished, 'released', released, 'next', next_jobs, 'claims', claims)::text;
END
$fn$;
