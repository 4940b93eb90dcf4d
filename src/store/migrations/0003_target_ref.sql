-- What a target that runs its own rollout says runs for a service, in its
-- own names (an ECS task definition ARN): shown by status and why.
ALTER TABLE services ADD COLUMN target_ref TEXT;
