-- The environment an audited request acted in (NULL: none, or an entry
-- from before this migration), so the audit log can be filtered by it.
ALTER TABLE audit ADD COLUMN environment TEXT;
CREATE INDEX IF NOT EXISTS audit_environment ON audit (environment, id);
