-- Example queries on the bonexray tables, for psql or sqlite3.
-- `:job_id` is a parameter: psql `\set job_id 3`; sqlite3 `.parameter set :job_id 3`.
-- tests/db/test_sql_examples.py runs every query here on SQLite and PostgreSQL.

-- name: abnormal_by_body_part
-- Scored studies of a job per body part: how many, how many abnormal, the mean score.
SELECT body_part,
       COUNT(*) AS scored,
       SUM(CASE WHEN prediction = 'abnormal' THEN 1 ELSE 0 END) AS abnormal,
       AVG(CASE WHEN prediction = 'abnormal' THEN 1.0 ELSE 0.0 END) AS abnormal_share,
       AVG(score) AS mean_score
FROM studies
WHERE job_id = :job_id AND status = 'done'
GROUP BY body_part
ORDER BY body_part;

-- name: inference_by_worker
-- Where a job's time went, per worker and execution provider (from batch_stats).
SELECT worker,
       provider,
       COUNT(*) AS batches,
       SUM(n_views) AS views,
       SUM(n_views) * 1000.0 / SUM(infer_ms) AS views_per_infer_s,
       SUM(decode_ms) / 1000.0 AS waited_for_decode_s
FROM batch_stats
WHERE job_id = :job_id
GROUP BY worker, provider
ORDER BY worker, provider;

-- name: job_throughput (postgresql)
-- Studies and views per second of wall-clock time, from the job's creation to its last
-- finished study.
SELECT j.id AS job_id,
       COUNT(s.id) AS studies,
       SUM(s.n_views) AS views,
       EXTRACT(EPOCH FROM MAX(s.finished_at) - j.created_at) AS seconds,
       SUM(s.n_views) / NULLIF(EXTRACT(EPOCH FROM MAX(s.finished_at) - j.created_at), 0)
           AS views_per_s
FROM jobs j
JOIN studies s ON s.job_id = j.id AND s.status IN ('done', 'failed')
GROUP BY j.id, j.created_at
ORDER BY j.id;

-- name: job_throughput (sqlite)
SELECT j.id AS job_id,
       COUNT(s.id) AS studies,
       SUM(s.n_views) AS views,
       (julianday(MAX(s.finished_at)) - julianday(j.created_at)) * 86400.0 AS seconds,
       SUM(s.n_views)
           / NULLIF((julianday(MAX(s.finished_at)) - julianday(j.created_at)) * 86400.0, 0)
           AS views_per_s
FROM jobs j
JOIN studies s ON s.job_id = j.id AND s.status IN ('done', 'failed')
GROUP BY j.id, j.created_at
ORDER BY j.id;

-- name: latest_evaluation
-- The figures of a job's latest `bonexray evaluate` run: overall first, then body parts.
SELECT COALESCE(body_part, 'overall') AS grp, n, unscored, auroc, kappa, accuracy,
       sensitivity, specificity
FROM evaluations
WHERE job_id = :job_id
  AND run = (SELECT MAX(run) FROM evaluations WHERE job_id = :job_id)
ORDER BY body_part IS NOT NULL, body_part;
