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

-- RFC 3339 string -> ms (fraction cut to ms), NULL when it is not one.
CREATE FUNCTION :"bs".ts_ms(s text) RETURNS bigint LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
DECLARE m text[];
BEGIN
  m := regexp_match(s, '^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$');
  IF m IS NULL THEN RETURN NULL; END IF;
  RETURN (extract(epoch FROM (m[1] || ' ' || m[2] || coalesce(substr(m[3], 1, 4), '') ||
                              CASE WHEN m[4] IN ('Z', 'z') THEN '+00:00' ELSE m[4] END)::timestamptz)
          * 1000)::bigint;
EXCEPTION WHEN others THEN
  RETURN NULL;  -- e.g. February 30th
END $f$;

-- 1. Parse and type every message (§1, §1.1, approximately).
\echo @step parsed
CREATE UNLOGGED TABLE :"bs".parsed AS
SELECT part, off, j
FROM (SELECT part, off, :"bs".try_jsonb(payload) AS j
      FROM :"bs".raw WHERE octet_length(payload) <= 65536) x
WHERE jsonb_typeof(j) = 'object';

\echo @step typed
CREATE UNLOGGED TABLE :"bs".typed AS
WITH f AS (
  SELECT part, off,
         j -> 'event_id' AS e, j -> 'user_id' AS u, j -> 'event_type' AS y, j -> 'ts' AS t,
         nullif(nullif(j -> 'device', 'null'), '""') AS dv,
         nullif(nullif(j -> 'country', 'null'), '""') AS co,
         nullif(nullif(j -> 'product_id', 'null'), '""') AS pr,
         j -> 'amount' AS am, nullif(j -> 'items', 'null') AS it,
         j -> 'experiment' AS ex, j -> 'variant' AS va
  FROM :"bs".parsed
), g AS (
  SELECT part, off, e ->> 0 AS event_id, u ->> 0 AS user_id, y ->> 0 AS event_type,
         CASE jsonb_typeof(t)
           WHEN 'number' THEN CASE WHEN t::text ~ '^-?[0-9]{1,18}$' THEN t::text::bigint END
           WHEN 'string' THEN :"bs".ts_ms(t ->> 0)
         END AS ms,
         dv, co, pr, am, it, ex, va, e, u, y, t
  FROM f
  WHERE jsonb_typeof(e) = 'string' AND jsonb_typeof(u) = 'string' AND jsonb_typeof(y) = 'string'
)
SELECT part, off, event_id, user_id, event_type, ms,
       dv ->> 0 AS device, co ->> 0 AS country,
       CASE WHEN event_type = 'purchase' THEN round((am ->> 0)::numeric * 100)::bigint END AS cents
FROM g
WHERE octet_length(event_id) BETWEEN 1 AND 128
  AND octet_length(user_id) BETWEEN 1 AND 128
  AND event_type ~ '^[a-z][a-z0-9_]{0,63}$'
  AND ms >= 946684800000 AND ms < 4102444800000
  AND ms <= :now_ms + 3600000
  AND (dv IS NULL OR (jsonb_typeof(dv) = 'string' AND octet_length(dv ->> 0) <= 32))
  AND (co IS NULL OR (jsonb_typeof(co) = 'string' AND octet_length(co ->> 0) <= 32))
  AND (pr IS NULL OR (jsonb_typeof(pr) = 'string' AND octet_length(pr ->> 0) <= 128))
  AND (event_type <> 'purchase' OR (
        jsonb_typeof(am) = 'number' AND (am ->> 0)::numeric BETWEEN 0 AND 1e12
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
        jsonb_typeof(ex) = 'string' AND octet_length(ex ->> 0) BETWEEN 1 AND 64 AND
        jsonb_typeof(va) = 'string' AND octet_length(va ->> 0) BETWEEN 1 AND 64));

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
       sum(brk) OVER (PARTITION BY user_id ORDER BY ms, event_id ROWS UNBOUNDED PRECEDING) AS sn
FROM (
  SELECT *, CASE WHEN ms - lag(ms) OVER (PARTITION BY user_id ORDER BY ms, event_id) <= 1800000
                 THEN 0 ELSE 1 END AS brk
  FROM :"bs".accepted WHERE event_type <> 'experiment_assignment'
) x;

-- 4. The marts.
\echo @step sessions
CREATE TABLE :"bs".sessions AS
SELECT (array_agg(event_id ORDER BY ms, event_id))[1] AS session_id, user_id,
       timestamptz 'epoch' + min(ms) * interval '1 millisecond' AS started_at,
       timestamptz 'epoch' + max(ms) * interval '1 millisecond' AS ended_at,
       count(*) AS events,
       count(*) FILTER (WHERE event_type = 'page_view') AS page_views,
       count(*) FILTER (WHERE event_type = 'product_view') AS product_views,
       count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
       count(*) FILTER (WHERE event_type = 'checkout') AS checkouts,
       count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
       (coalesce(sum(cents), 0)::numeric / 100)::numeric(20,2) AS revenue,
       coalesce((array_agg(device ORDER BY ms, event_id) FILTER (WHERE device IS NOT NULL))[1],
                'unknown') AS device,
       coalesce((array_agg(country ORDER BY ms, event_id) FILTER (WHERE country IS NOT NULL))[1],
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
       coalesce((array_agg(device ORDER BY ms, event_id) FILTER (WHERE device IS NOT NULL))[1],
                'unknown') AS device,
       coalesce((array_agg(country ORDER BY ms, event_id) FILTER (WHERE country IS NOT NULL))[1],
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
