-- tools/bench's batch baseline: rebuild the users, sessions and funnel_daily marts of
-- CONTRACT §3 from the raw topic with SQL, the way a nightly batch job would.
--
-- Input: :"bs".raw(part int, off bigint, payload text), COPY'd from the topic (payloads
-- that are not valid UTF-8 or hold NUL bytes were left out: they are rejects anyway).
-- psql variables: bs (schema), now_ms (the wall clock for the future-timestamp rule).
--
-- This is a COST baseline, not a second reference implementation: it does the same kind
-- of work as clickmartd (parse every payload as JSON, check the §1.1 rules that matter
-- for these marts, the per-partition watermark and lateness, dedup by event_id keeping
-- the first copy in partition order, sessionize per user with lag() and a running sum,
-- build the three marts with GROUPING SETS and distinct users) but it does not reproduce
-- every rule exactly: no duplicate-key check, no 1e999 / lone-surrogate subtleties
-- beyond what jsonb itself rejects, no dedup horizon, numeric rounding of amounts.
-- tools/bench compares its rows with the daemon's and prints the agreement.
\set ON_ERROR_STOP 1
\timing on
SET work_mem = '256MB';
SET maintenance_work_mem = '256MB';

-- JSON that jsonb refuses (truncated, NaN, \u0000, lone surrogates, ...) becomes NULL.
-- (A plain t::jsonb would abort the whole statement on the first bad payload; the
-- exception block costs a subtransaction per call, part of the baseline's price.)
CREATE FUNCTION :"bs".try_jsonb(t text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
BEGIN
  RETURN t::jsonb;
EXCEPTION WHEN others THEN
  RETURN NULL;
END $f$;

-- RFC 3339 string -> ms (fraction cut to ms), NULL when it is not one.  The fields are
-- range-checked first so that the cast never raises (no exception block needed); the
-- fields are cut out by position (a regex with capture groups costs ~0.2 ms a call).
CREATE FUNCTION :"bs".ts_ms(s text) RETURNS bigint LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
DECLARE
  y int; mo int; d int; off text; fr text;
BEGIN
  IF s !~ '^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$' THEN
    RETURN NULL;
  END IF;
  y := substr(s, 1, 4)::int; mo := substr(s, 6, 2)::int; d := substr(s, 9, 2)::int;
  IF right(s, 1) IN ('Z', 'z') THEN
    off := '+00:00'; fr := substr(s, 20, length(s) - 20);
  ELSE
    off := right(s, 6); fr := substr(s, 20, length(s) - 25);
  END IF;
  IF y < 1 OR mo NOT BETWEEN 1 AND 12 OR d < 1
     OR d > (CASE WHEN mo IN (4, 6, 9, 11) THEN 30
                  WHEN mo <> 2 THEN 31
                  WHEN (y % 4 = 0 AND y % 100 <> 0) OR y % 400 = 0 THEN 29
                  ELSE 28 END)
     OR substr(s, 12, 2)::int > 23 OR substr(s, 15, 2)::int > 59 OR substr(s, 18, 2)::int > 59
     OR substr(off, 2, 2)::int > 15 OR substr(off, 5, 2)::int > 59 THEN
    RETURN NULL;
  END IF;
  RETURN (extract(epoch FROM (substr(s, 1, 10) || ' ' || substr(s, 12, 8) || substr(fr, 1, 4) || off)::timestamptz)
          * 1000)::bigint;
END $f$;

-- 1. Parse and type every message (§1, §1.1, approximately).
\echo @step typed
CREATE UNLOGGED TABLE :"bs".typed AS
WITH p AS MATERIALIZED (
  SELECT part, off, :"bs".try_jsonb(payload) AS j
  FROM :"bs".raw WHERE octet_length(payload) <= 65536
), g AS MATERIALIZED (  -- each field extracted once per row, ts parsed once
  SELECT part, off,
         j ->> 'event_id' AS event_id, j ->> 'user_id' AS user_id, j ->> 'event_type' AS event_type,
         jsonb_typeof(j -> 'event_id') AS te, jsonb_typeof(j -> 'user_id') AS tu,
         jsonb_typeof(j -> 'event_type') AS ty,
         CASE jsonb_typeof(j -> 'ts')
           WHEN 'number' THEN CASE WHEN j ->> 'ts' ~ '^-?[0-9]+$' AND length(j ->> 'ts') <= 18
                                   THEN (j ->> 'ts')::bigint END
           WHEN 'string' THEN :"bs".ts_ms(j ->> 'ts')
         END AS ms,
         nullif(nullif(j -> 'device', 'null'), '""') AS dv,
         nullif(nullif(j -> 'country', 'null'), '""') AS co,
         nullif(nullif(j -> 'product_id', 'null'), '""') AS pr,
         j -> 'amount' AS am, nullif(j -> 'items', 'null') AS it,
         j -> 'experiment' AS ex, j -> 'variant' AS va
  FROM p WHERE jsonb_typeof(j) = 'object'
)
SELECT part, off, event_id, user_id, event_type, ms,
       dv #>> '{}' AS device, co #>> '{}' AS country,
       CASE WHEN event_type = 'purchase' THEN round((am #>> '{}')::numeric * 100)::bigint END AS cents
FROM g
WHERE te = 'string' AND tu = 'string' AND ty = 'string'
  AND octet_length(event_id) BETWEEN 1 AND 128
  AND octet_length(user_id) BETWEEN 1 AND 128
  AND event_type ~ '^[a-z][a-z0-9_]*$' AND octet_length(event_type) <= 64  -- (a bounded
                                                    -- repetition is slow in PG's regex engine)
  AND ms >= 946684800000 AND ms < 4102444800000
  AND ms <= :now_ms + 3600000
  AND (dv IS NULL OR (jsonb_typeof(dv) = 'string' AND octet_length(dv #>> '{}') <= 32))
  AND (co IS NULL OR (jsonb_typeof(co) = 'string' AND octet_length(co #>> '{}') <= 32))
  AND (pr IS NULL OR (jsonb_typeof(pr) = 'string' AND octet_length(pr #>> '{}') <= 128))
  AND (event_type <> 'purchase' OR (
        jsonb_typeof(am) = 'number' AND (am #>> '{}')::numeric BETWEEN 0 AND 1e12
        AND (it IS NULL OR (jsonb_typeof(it) = 'array' AND jsonb_array_length(it) <= 100
             AND NOT EXISTS (
               SELECT 1 FROM jsonb_array_elements(it) i
               WHERE jsonb_typeof(i) <> 'object'
                  OR jsonb_typeof(i -> 'product_id') IS DISTINCT FROM 'string'
                  OR octet_length(i ->> 'product_id') NOT BETWEEN 1 AND 128
                  OR (nullif(i -> 'quantity', 'null') IS NOT NULL AND (
                        jsonb_typeof(i -> 'quantity') <> 'number'
                        OR (i ->> 'quantity') !~ '^[0-9]+$'
                        OR (i ->> 'quantity')::numeric NOT BETWEEN 1 AND 1000000))
                  OR (nullif(i -> 'price', 'null') IS NOT NULL AND (
                        jsonb_typeof(i -> 'price') <> 'number'
                        OR (i ->> 'price')::numeric NOT BETWEEN 0 AND 1e12)))))))
  AND (event_type <> 'experiment_assignment' OR (
        jsonb_typeof(ex) = 'string' AND octet_length(ex #>> '{}') BETWEEN 1 AND 64 AND
        jsonb_typeof(va) = 'string' AND octet_length(va #>> '{}') BETWEEN 1 AND 64));

-- 2. Acceptance (§2): the partition's watermark is the running max of the ts before the
-- message; too late below watermark - 48 h; the first copy of an event_id wins.
\echo @step accepted
CREATE UNLOGGED TABLE :"bs".accepted AS
SELECT user_id, ms, event_id, event_type, device, country, cents
FROM (
  SELECT *, row_number() OVER (PARTITION BY event_id ORDER BY part, off) AS copy
  FROM (
    SELECT *, max(ms) OVER (PARTITION BY part ORDER BY off
                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS wm
    FROM :"bs".typed
  ) w
  WHERE wm IS NULL OR ms >= wm - 172800000
) d
WHERE copy = 1;

-- 3. Sessionize the clickstream events (§3): a gap over 30 min starts a new session.
\echo @step cs
CREATE UNLOGGED TABLE :"bs".cs AS
SELECT user_id, ms, event_id, event_type, device, country, cents,
       sum(brk) OVER (PARTITION BY user_id ORDER BY ms, event_id COLLATE "C" ROWS UNBOUNDED PRECEDING) AS sn
FROM (
  SELECT *, CASE WHEN ms - lag(ms) OVER (PARTITION BY user_id ORDER BY ms, event_id COLLATE "C") <= 1800000
                 THEN 0 ELSE 1 END AS brk
  FROM :"bs".accepted WHERE event_type <> 'experiment_assignment'
) x;

-- 4. The marts.
\echo @step sessions
CREATE TABLE :"bs".sessions AS
SELECT (array_agg(event_id ORDER BY ms, event_id COLLATE "C"))[1] AS session_id, user_id,
       timestamptz 'epoch' + min(ms) * interval '1 millisecond' AS started_at,
       timestamptz 'epoch' + max(ms) * interval '1 millisecond' AS ended_at,
       count(*) AS events,
       count(*) FILTER (WHERE event_type = 'page_view') AS page_views,
       count(*) FILTER (WHERE event_type = 'product_view') AS product_views,
       count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
       count(*) FILTER (WHERE event_type = 'checkout') AS checkouts,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
       (coalesce(sum(cents), 0)::numeric / 100)::numeric(20,2) AS revenue,
       coalesce((array_agg(device ORDER BY ms, event_id COLLATE "C") FILTER (WHERE device IS NOT NULL))[1],
                'unknown') AS device,
       coalesce((array_agg(country ORDER BY ms, event_id COLLATE "C") FILTER (WHERE country IS NOT NULL))[1],
                'unknown') AS country,
       (CASE WHEN NOT bool_or(event_type = 'product_view') THEN 1
             WHEN NOT bool_or(event_type = 'add_to_cart') THEN 2
             WHEN NOT bool_or(event_type = 'checkout') THEN 3
             WHEN NOT bool_or(event_type = 'purchase') THEN 4
             ELSE 5 END)::smallint AS funnel_stage
FROM :"bs".cs
GROUP BY user_id, sn;

\echo @step users
CREATE TABLE :"bs".users AS
SELECT user_id,
       timestamptz 'epoch' + min(ms) * interval '1 millisecond' AS first_seen,
       timestamptz 'epoch' + max(ms) * interval '1 millisecond' AS last_seen,
       coalesce((array_agg(device ORDER BY ms, event_id COLLATE "C") FILTER (WHERE device IS NOT NULL))[1],
                'unknown') AS device,
       coalesce((array_agg(country ORDER BY ms, event_id COLLATE "C") FILTER (WHERE country IS NOT NULL))[1],
                'unknown') AS country,
       count(*) AS events, max(sn) AS sessions,
       count(*) FILTER (WHERE event_type = 'purchase') AS orders,
       (coalesce(sum(cents), 0)::numeric / 100)::numeric(20,2) AS revenue,
       timestamptz 'epoch' + min(ms) FILTER (WHERE event_type = 'purchase') * interval '1 millisecond'
         AS first_order_at,
       timestamptz 'epoch' + max(ms) FILTER (WHERE event_type = 'purchase') * interval '1 millisecond'
         AS last_order_at
FROM :"bs".cs
GROUP BY user_id;

\echo @step funnel_daily
CREATE TABLE :"bs".funnel_daily AS
SELECT day,
       CASE WHEN grouping(device) = 1 THEN '*' ELSE device END AS device,
       CASE WHEN grouping(country) = 1 THEN '*' ELSE country END AS country,
       count(*) AS sessions,
       count(*) FILTER (WHERE funnel_stage >= 2) AS sessions_product_view,
       count(*) FILTER (WHERE funnel_stage >= 3) AS sessions_add_to_cart,
       count(*) FILTER (WHERE funnel_stage >= 4) AS sessions_checkout,
       count(*) FILTER (WHERE funnel_stage >= 5) AS sessions_purchase,
       count(DISTINCT user_id) AS users,
       count(DISTINCT user_id) FILTER (WHERE funnel_stage >= 2) AS users_product_view,
       count(DISTINCT user_id) FILTER (WHERE funnel_stage >= 3) AS users_add_to_cart,
       count(DISTINCT user_id) FILTER (WHERE funnel_stage >= 4) AS users_checkout,
       count(DISTINCT user_id) FILTER (WHERE funnel_stage >= 5) AS users_purchase,
       sum(purchases) AS orders, sum(revenue) AS revenue
FROM (SELECT (started_at AT TIME ZONE 'UTC')::date AS day, device, country, user_id,
             funnel_stage, purchases, revenue
      FROM :"bs".sessions) s
GROUP BY GROUPING SETS ((day, device, country), (day, device), (day, country), (day));
