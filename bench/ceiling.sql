-- The PostgreSQL ceiling for a SKIP LOCKED queue: insert a job, claim it, complete it.
-- One job per transaction; pgbench runs it from several clients at once.
INSERT INTO ceiling_jobs (payload) VALUES ('{}');
WITH next AS (
    SELECT id FROM ceiling_jobs WHERE status = 'ready' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE ceiling_jobs j SET status = 'running' FROM next WHERE j.id = next.id RETURNING j.id
)
SELECT COALESCE(max(id), 0) AS job_id FROM claimed \gset
UPDATE ceiling_jobs SET status = 'done' WHERE id = :job_id;
