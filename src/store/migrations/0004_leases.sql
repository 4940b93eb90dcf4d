-- Named leases: one holder at a time per name, across the nodes of an
-- installation (the SQS consumer: one poller per queue). A holder that
-- stops renewing loses it once `expires_at` (ms) has passed.
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL);
