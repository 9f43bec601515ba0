-- tools/bench: how many rows of the batch baseline's marts equal the daemon's (not timed).
-- psql variables: bs (batch schema), ds (daemon schema).  Prints one line of JSON.
\set ON_ERROR_STOP 1
SET work_mem = '256MB';
WITH
 du AS (SELECT user_id, first_seen, last_seen, device, country, events, sessions, orders, revenue,
               first_order_at, last_order_at FROM :"ds".users),
 bu AS (SELECT user_id, first_seen, last_seen, device, country, events, sessions, orders, revenue,
               first_order_at, last_order_at FROM :"bs".users),
 ds AS (SELECT session_id, user_id, started_at, ended_at, events, page_views, product_views,
               add_to_carts, checkouts, purchases, revenue, device, country, funnel_stage
        FROM :"ds".sessions),
 bss AS (SELECT session_id, user_id, started_at, ended_at, events, page_views, product_views,
                add_to_carts, checkouts, purchases, revenue, device, country, funnel_stage
         FROM :"bs".sessions),
 df AS (SELECT day, device, country, sessions, sessions_product_view, sessions_add_to_cart,
               sessions_checkout, sessions_purchase, users, users_product_view, users_add_to_cart,
               users_checkout, users_purchase, orders, revenue FROM :"ds".funnel_daily),
 bf AS (SELECT day, device, country, sessions, sessions_product_view, sessions_add_to_cart,
               sessions_checkout, sessions_purchase, users, users_product_view, users_add_to_cart,
               users_checkout, users_purchase, orders, revenue FROM :"bs".funnel_daily)
SELECT json_build_object(
  'users', json_build_object('daemon_rows', (SELECT count(*) FROM du), 'batch_rows', (SELECT count(*) FROM bu),
     'identical', (SELECT count(*) FROM (SELECT * FROM du INTERSECT ALL SELECT * FROM bu) x)),
  'sessions', json_build_object('daemon_rows', (SELECT count(*) FROM ds), 'batch_rows', (SELECT count(*) FROM bss),
     'identical', (SELECT count(*) FROM (SELECT * FROM ds INTERSECT ALL SELECT * FROM bss) x)),
  'funnel_daily', json_build_object('daemon_rows', (SELECT count(*) FROM df), 'batch_rows', (SELECT count(*) FROM bf),
     'identical', (SELECT count(*) FROM (SELECT * FROM df INTERSECT ALL SELECT * FROM bf) x)));
