-- Jobs that run in parts (a job on a group of SSH hosts): each part's
-- result of each attempt, and which part wrote each output line.
ALTER TABLE logs ADD COLUMN part TEXT;
CREATE TABLE IF NOT EXISTS attempt_parts (id {serial}, job_id BIGINT NOT NULL, attempt BIGINT NOT NULL, part TEXT NOT NULL, started_at BIGINT NOT NULL, finished_at BIGINT NOT NULL, outcome TEXT NOT NULL, exit_code BIGINT, reason TEXT);
CREATE INDEX IF NOT EXISTS attempt_parts_job ON attempt_parts (job_id, attempt);
