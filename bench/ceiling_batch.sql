-- The same ceiling with 100 jobs per statement: insert 100, claim 100, complete those 100.
INSERT INTO ceiling_jobs (payload) SELECT '{}' FROM generate_series(1, 100);
WITH next AS (
    SELECT id FROM ceiling_jobs WHERE status = 'ready' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE ceiling_jobs j SET status = 'running' FROM next WHERE j.id = next.id RETURNING j.id
)
SELECT count(*) FROM claimed;
UPDATE ceiling_jobs SET status = 'done' WHERE id IN (SELECT id FROM ceiling_jobs WHERE status = 'running' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED);
