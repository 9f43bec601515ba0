/*
 * sink.h - write mart rows to PostgreSQL (CONTRACT §3, §7, §8).
 *
 * The sink owns one libpq connection. Every call is blocking and must be made
 * from the flush thread only, never from the loop thread: the daemon runs the
 * sink on a worker so that Postgres never stalls ingestion. One snk_flush()
 * is one Postgres transaction holding every row of the batch, so the tables
 * only ever show a state that the daemon actually had at some set of offsets.
 */
#ifndef CLICKMART_SINK_H
#define CLICKMART_SINK_H

#include <stddef.h>
#include <stdint.h>

/* Error codes (negative). snk_strerror() explains them. */
#define SNK_ECONNECT (-1) /* could not connect, or the connection broke */
#define SNK_EQUERY (-2)   /* a statement failed (details in snk_last_error) */
#define SNK_ENOMEM (-3)
#define SNK_EINVAL (-4) /* bad argument, e.g. an invalid schema name */
/* A row taken for new was already there while parts were open (snk_flush,
 * snk_flush_part): all was rolled back; write the whole flush again. */
#define SNK_ERESTART (-5)
/* The commit gate of snk_flush_gated refused: everything was rolled back. */
#define SNK_EGATE (-6)

typedef struct snk_conn snk_conn_t;

/* A session row (CONTRACT §3 `sessions`). Timestamps are ms, money is cents. */
typedef struct snk_session_row {
    const char *session_id;
    const char *user_id;
    int64_t started_at, ended_at;
    int64_t events, page_views, product_views, add_to_carts, checkouts, purchases;
    int64_t revenue_cents;
    const char *device, *country;
    int funnel_stage;
    /* 1 when no earlier flush can have written this session_id (the session
     * was opened by an event of this flush's batches): the sink then COPYs
     * the row straight into the table instead of upserting it. If Postgres
     * holds the id after all, the whole flush is redone with upserts
     * (snk_flush_redone). 0 is always safe. */
    int is_new;
} snk_session_row_t;

/* A user row (CONTRACT §3 `users`). first/last_order_at < 0 means NULL. */
typedef struct snk_user_row {
    const char *user_id;
    int64_t first_seen, last_seen;
    const char *device, *country;
    int64_t events, sessions, orders, revenue_cents;
    int64_t first_order_at, last_order_at;
    /* 1 when no earlier flush can have written this user_id (the user's
     * first event is in this flush's batches): COPYed straight into the
     * table, redone with upserts if Postgres holds it after all, as for
     * snk_session_row_t.is_new. 0 is always safe. */
    int is_new;
} snk_user_row_t;

/* A funnel_daily row; day is days since 1970-01-01. All-zero counts = delete. */
typedef struct snk_funnel_row {
    int32_t day;
    const char *device, *country; /* "*" for the roll-ups */
    int64_t sessions_ge[5];       /* sessions with stage >= 1..5 */
    int64_t users_ge[5];          /* distinct users with a session of stage >= 1..5 */
    int64_t orders, revenue_cents;
} snk_funnel_row_t;

/* A partitions row. watermark < 0 means NULL (nothing accepted yet). */
typedef struct snk_partition_row {
    const char *topic;
    int32_t partition;
    int64_t next_offset, watermark, accepted, duplicates, rejected;
} snk_partition_row_t;

/* A rejected message (CONTRACT §7). payload: the first 4096 bytes, raw. */
typedef struct snk_reject_row {
    const char *topic;
    int32_t partition;
    int64_t offset;
    const char *reason, *detail;
    const char *payload;
    size_t payload_len;
    int64_t rejected_at; /* ms */
} snk_reject_row_t;

/*
 * The later marts share one generic row shape: an array of values, one per
 * column in the order docs/schema.md lists them. Which member of a value is
 * read depends on the column's type: text reads s; integers, counts,
 * timestamps (ms), days (days since 1970-01-01), money (cents) and booleans
 * read i; floating-point statistics read f. null = 1 writes SQL NULL (a NaN
 * or infinite f is written as NULL too, never as NaN).
 */
typedef struct snk_val {
    int64_t i;
    double f;
    const char *s;
    int null;
} snk_val_t;

enum snk_table {
    SNK_PRODUCT_DAILY = 0,  /* day, product_id | views, add_to_carts, orders, units, revenue */
    SNK_PRODUCT_PAIRS,      /* product_a, product_b | orders */
    SNK_BASKET_DAILY,       /* day | orders_with_items, units, revenue */
    SNK_COHORT_RETENTION,   /* cohort_week, week_offset | users */
    SNK_USER_EXPOSURE,      /* experiment, user_id | variant, assigned_at, exposed_at, excluded */
    SNK_USER_OUTCOMES,      /* experiment, user_id | variant, exposed_at, converted, orders,
                               revenue, events, added_to_cart, reached_checkout */
    SNK_EXPERIMENTS,        /* experiment | control_variant, variants, users, excluded_users,
                               srm_chi2, srm_p, srm_detected, chi2, chi2_p, window_days */
    SNK_EXPERIMENT_RESULTS, /* experiment, variant | users ... rpu_p_value (docs/schema.md) */
    SNK_EXPERIMENT_REGRESSION, /* experiment, term | coef, std_err, z, p_value, n */
    SNK_TABLE__COUNT
};

/* Rows of one generic table: n rows of ncols values to upsert, n_del keys
 * (nkey values each) whose rows are deleted before the upsert, and n_new
 * rows no earlier flush can have written, which the sink COPYs straight
 * into the table (redone with upserts if Postgres holds one after all, as
 * for snk_session_row_t.is_new). A key is in at most one of the lists;
 * putting a row among new_vals is an optimisation, never needed. */
typedef struct snk_rows {
    const snk_val_t *vals;
    size_t n;
    const snk_val_t *del_keys;
    size_t n_del;
    const snk_val_t *new_vals;
    size_t n_new;
} snk_rows_t;

/* Number of columns and of key columns of a generic table. */
int snk_table_ncols(enum snk_table t);
int snk_table_nkey(enum snk_table t);

/* Everything one flush writes. The sink reads the arrays, never keeps them. */
typedef struct snk_batch {
    const snk_session_row_t *sessions;
    size_t n_sessions;
    const char *const *deleted_sessions; /* session_ids merged away */
    size_t n_deleted_sessions;
    const snk_user_row_t *users;
    size_t n_users;
    const snk_funnel_row_t *funnel;
    size_t n_funnel;
    const snk_partition_row_t *partitions;
    size_t n_partitions;
    const snk_reject_row_t *rejects;
    size_t n_rejects;
    snk_rows_t gen[SNK_TABLE__COUNT];
} snk_batch_t;

/*
 * Connect with a libpq conninfo string (libpq's environment variables and
 * service files apply as usual). `schema` must match [a-z_][a-z0-9_]{0,62};
 * it is also quoted in every statement. On success *out owns the connection
 * (free with snk_close). Flush thread only.
 */
int snk_open(const char *conninfo, const char *schema, snk_conn_t **out);

/*
 * What snk_open checks before it connects: SNK_EINVAL when `schema` is not a
 * valid name or `conninfo` does not parse (the reason in
 * snk_last_error(NULL), without the string's values), SNK_ENOMEM, or 0.
 * Retrying cannot fix either, so a daemon checks at start. Flush thread, or
 * before it starts (it shares snk_last_error(NULL) with snk_open).
 */
int snk_check_conf(const char *conninfo, const char *schema);

/* Create or migrate the schema and its tables (idempotent, versioned in
 * <schema>.schema_version, serialized with an advisory lock). */
int snk_migrate(snk_conn_t *c);

/* Write one batch in one transaction (COPY into temporary staging tables,
 * then one upsert / delete per table; new session rows are COPYed into
 * their table directly). On error the transaction is rolled back and nothing
 * is written; the caller retries the same rows later. */
int snk_flush(snk_conn_t *c, const snk_batch_t *b);

/*
 * A commit gate: called on the flush thread once every row of a flush is
 * written, right before its COMMIT. 0 lets the transaction commit; anything
 * else rolls it back. It may block, e.g. until the rows' source is durable
 * (docs/sink.md "A gate before the commit").
 */
typedef int (*snk_gate_fn)(void *arg);

/* snk_flush with a gate before the commit (NULL: none). A flush redone with
 * upserts asks the gate again before its own commit; a flush with nothing
 * to write commits nothing and does not ask. When the gate refuses, the
 * result is SNK_EGATE with nothing written. Flush thread only. */
int snk_flush_gated(snk_conn_t *c, const snk_batch_t *b, snk_gate_fn gate, void *arg);

/*
 * Writing a flush ahead, in parts (docs/sink.md "Writing ahead"):
 * snk_flush_part writes b into the connection's open transaction (it begins
 * one if no part is open) and leaves it uncommitted; nobody else sees the
 * rows yet. The next snk_flush on the connection writes its batch into the
 * same transaction and commits them all, or fails with everything rolled
 * back (SNK_ERESTART when a row taken for new was already there: write the
 * flush again whole, it is then redone with upserts). Every key of a part may
 * appear again in a later part or the final batch (the later row wins); the
 * lists of one batch still hold each key once. On any error of a part the
 * transaction is rolled back and no part is open. Flush thread only.
 */
int snk_flush_part(snk_conn_t *c, const snk_batch_t *b);

/* Parts written into the open transaction (0: none, e.g. after an error or
 * on a new connection). */
int snk_flush_parts(const snk_conn_t *c);

/* Roll back the open transaction of parts, if any. */
void snk_flush_discard(snk_conn_t *c);

/* How many flushes on this connection found a row marked is_new already in
 * Postgres and were therefore redone, in a second transaction, with every
 * session row upserted. This happens after a crash between a flush's commit
 * in Postgres and the daemon's record of it; the result is the same. Flush
 * thread only. */
uint64_t snk_flush_redone(const snk_conn_t *c);

/*
 * What the tables already hold for a topic: *n_partitions rows in
 * `partitions` and the largest next_offset among them (0 when none). Used at
 * startup to notice an empty state directory in front of populated tables.
 * Call after snk_migrate.
 */
int snk_topic_progress(snk_conn_t *c, const char *topic, int64_t *n_partitions,
                       int64_t *max_next_offset);

/* Empty every mart table and the topic's pipeline rows in one transaction,
 * before a rebuild from the earliest offsets (--allow-state-rebuild). */
int snk_truncate_marts(snk_conn_t *c);

/* 1 while the connection is usable, 0 after it broke (reopen with snk_open). */
int snk_ok(const snk_conn_t *c);

/* The last libpq error message of this connection ("" if none); valid until
 * the next call on c. Passwords never appear in it. */
const char *snk_last_error(const snk_conn_t *c);

/* 1 if the last failure on c may pass if the same work is tried again: the
 * connection broke, or Postgres gave up on the statement for a reason of the
 * moment (SQLSTATE class 08 connection, 40 serialization or deadlock, 53
 * resources, 57 operator intervention such as a statement timeout, 55P03 a
 * lock timeout, 25006 a read-only standby during a failover). 0 for
 * everything else, such as a statement Postgres refuses on the schema as it
 * is. c may be NULL (a failed open: 1). */
int snk_transient(const snk_conn_t *c);

void snk_close(snk_conn_t *c);
const char *snk_strerror(int err);

/* Redact the password in a conninfo string (key=value or URI form) for logs:
 * writes at most cap bytes (NUL-terminated) into out. Thread-safe. */
void snk_redact_conninfo(const char *conninfo, char *out, size_t cap);

#endif
