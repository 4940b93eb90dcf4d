-- Migration 1: the schema as it stood before numbered migrations (the
-- build of commit d43299a). IF NOT EXISTS, so that a store made by that
-- build takes this migration as already done and keeps its data.
-- {serial} and {blob} are filled per dialect (src/store/migrate.rs).

CREATE TABLE IF NOT EXISTS revisions (id TEXT PRIMARY KEY, created_at BIGINT NOT NULL, config_text TEXT NOT NULL, archive {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS events (id {serial}, key TEXT UNIQUE, kind TEXT NOT NULL, payload TEXT NOT NULL, received_at BIGINT NOT NULL, deployment_id BIGINT);
CREATE TABLE IF NOT EXISTS deployments (id {serial}, event_id BIGINT NOT NULL, kind TEXT NOT NULL, environment TEXT NOT NULL, service TEXT, version TEXT, lock_key TEXT NOT NULL, revision TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, superseded_by BIGINT, cancel_requested BIGINT NOT NULL DEFAULT 0, created_at BIGINT NOT NULL, started_at BIGINT, finished_at BIGINT);
CREATE INDEX IF NOT EXISTS deployments_state ON deployments (state, id);
CREATE TABLE IF NOT EXISTS jobs (id {serial}, deployment_id BIGINT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL, attempt BIGINT NOT NULL DEFAULT 0, fence BIGINT NOT NULL DEFAULT 0, node TEXT, lease_until BIGINT, ready_at BIGINT, not_before BIGINT NOT NULL DEFAULT 0, started_at BIGINT, finished_at BIGINT, exit_code BIGINT, reason TEXT, spec TEXT NOT NULL, UNIQUE (deployment_id, name));
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, not_before);
CREATE INDEX IF NOT EXISTS jobs_deployment_state ON jobs (deployment_id, state);
CREATE TABLE IF NOT EXISTS job_needs (job_id BIGINT NOT NULL, need_id BIGINT NOT NULL, PRIMARY KEY (job_id, need_id));
CREATE INDEX IF NOT EXISTS job_needs_need ON job_needs (need_id);
CREATE TABLE IF NOT EXISTS attempts (id {serial}, job_id BIGINT NOT NULL, attempt BIGINT NOT NULL, node TEXT NOT NULL, started_at BIGINT NOT NULL, finished_at BIGINT NOT NULL, outcome TEXT NOT NULL, exit_code BIGINT, reason TEXT);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts (job_id);
CREATE TABLE IF NOT EXISTS logs (id {serial}, deployment_id BIGINT NOT NULL, job_id BIGINT NOT NULL, attempt BIGINT NOT NULL, ts BIGINT NOT NULL, stream TEXT NOT NULL, line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS logs_deployment ON logs (deployment_id, id);
CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, deployment_id BIGINT NOT NULL, node TEXT NOT NULL, lease_until BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, started_at BIGINT NOT NULL, heartbeat_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS service_events (id {serial}, environment TEXT NOT NULL, service TEXT NOT NULL, at BIGINT NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS service_events_service ON service_events (environment, service, id);
CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, roles TEXT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT);
CREATE TABLE IF NOT EXISTS audit (id {serial}, at BIGINT NOT NULL, actor TEXT NOT NULL, address TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL, status BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, id);
CREATE TABLE IF NOT EXISTS holds (deployment_id BIGINT PRIMARY KEY, approval BIGINT NOT NULL, approved_by TEXT, approved_at BIGINT, not_before BIGINT NOT NULL, in_window BIGINT NOT NULL, source_environment TEXT, source_deployment BIGINT, waiting_for TEXT, requested_by TEXT, digest TEXT);
CREATE TABLE IF NOT EXISTS services (environment TEXT NOT NULL, service TEXT NOT NULL, version TEXT NOT NULL, previous_version TEXT, spec TEXT NOT NULL, revision TEXT NOT NULL, deployment_id BIGINT NOT NULL, updated_at BIGINT NOT NULL, artifact_dir TEXT, sha256 TEXT, previous_sha256 TEXT, PRIMARY KEY (environment, service));
