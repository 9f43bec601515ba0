/*
 * sink.c - write mart rows to PostgreSQL (CONTRACT §3, §7, §8; docs/sink.md).
 *
 * A flush is one transaction: every table of the batch is COPYed in binary
 * format into a temporary staging table of this connection, then applied to
 * its target with one set-based statement (an upsert, a delete or an insert
 * that ignores conflicts). Rows are absolute values, so writing the same
 * batch twice leaves the same tables, which is what makes a retry after a
 * failure (or after a crash between the Postgres commit and the daemon's own
 * bookkeeping) harmless.
 *
 * Every value is encoded here exactly, in the binary form of its column's
 * type: timestamps from integer milliseconds, money from integer cents,
 * dates from day numbers. Nothing passes through floating point or through
 * the server's time zone.
 */
#include "sink/sink.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "daemon/util.h"

/* COPY data is sent whenever this much is buffered, so that a batch of any
 * size needs only a bounded buffer and few, large writes. */
#define COPY_CHUNK (256u * 1024u)

/* Rejected payloads are stored cut to this many bytes (CONTRACT §7). */
#define REJECT_PAYLOAD_MAX 4096u

/* The key of the transaction-level advisory lock that serialises migrations
 * of every clickmart schema in a database: the ASCII bytes "clickmar" read
 * as a big-endian 64-bit integer, a fixed number no other application is
 * likely to pick. */
#define MIGRATE_LOCK_KEY "7164216982964625778"

/* Passwords shorter than this are not scrubbed from error messages, since
 * replacing every occurrence of a few common characters would destroy the
 * message while protecting next to nothing. */
#define SCRUB_MIN_LEN 4

/* ------------------------------------------------------------------------ */
/* Growable buffer                                                          */
/* ------------------------------------------------------------------------ */

/*
 * A byte buffer whose allocation failure is sticky: appends after a failure
 * do nothing, so the row writers can append freely and the caller checks
 * `oom` once per row instead of after every field.
 */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf_t;

static int sb_reserve(sbuf_t *b, size_t extra)
{
    if (b->oom)
        return -1;
    if (b->cap - b->len >= extra)
        return 0;
    size_t need = b->len + extra;
    if (need < b->len) {
        b->oom = 1;
        return -1;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void sb_put(sbuf_t *b, const void *s, size_t n)
{
    if (n == 0 || sb_reserve(b, n) < 0)
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void sb_putc(sbuf_t *b, char ch)
{
    if (sb_reserve(b, 1) < 0)
        return;
    b->p[b->len++] = ch;
}

static void sb_puts(sbuf_t *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

/* NUL-terminates without counting the terminator, so that SQL text can be
 * handed to libpq and the buffer still be appended to afterwards. */
static const char *sb_cstr(sbuf_t *b)
{
    if (sb_reserve(b, 1) < 0)
        return NULL;
    b->p[b->len] = '\0';
    return b->p;
}

static void sb_free(sbuf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Appends a template, replacing every "{S}" with the quoted schema, so that
 * migrations and statements can be written as readable SQL. */
static void sb_sql(sbuf_t *b, const char *tmpl, const char *schema_q)
{
    const char *p = tmpl;
    for (;;) {
        const char *m = strstr(p, "{S}");
        if (!m) {
            sb_puts(b, p);
            return;
        }
        sb_put(b, p, (size_t)(m - p));
        sb_puts(b, schema_q);
        p = m + 3;
    }
}

/* ------------------------------------------------------------------------ */
/* Exact binary values                                                      */
/* ------------------------------------------------------------------------ */

/*
 * COPY runs in binary format: every value goes in the form the server's
 * receive function reads (big-endian integers, timestamps as microseconds
 * and dates as days since 2000-01-01, numeric as base-10000 digits). Parsing
 * text timestamps and decimals was a fifth of the server's time in a flush,
 * and the binary forms need no escaping and carry the values exactly.
 */

/* Type OIDs of the built-in types the staging tables use (pg_type.dat); they
 * are fixed across Postgres versions. */
#define OID_BOOL 16u
#define OID_INT8 20u
#define OID_INT2 21u
#define OID_INT4 23u
#define OID_TEXT 25u
#define OID_FLOAT8 701u
#define OID_DATE 1082u
#define OID_TIMESTAMPTZ 1184u
#define OID_NUMERIC 1700u

/* Postgres counts timestamps and dates from 2000-01-01 00:00 UTC. */
#define PG_EPOCH_MS 946684800000LL
#define PG_EPOCH_DAYS 10957

static void sb_be16(sbuf_t *b, uint16_t v)
{
    uint8_t x[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    sb_put(b, x, 2);
}

/* Stores v big-endian at p (4 bytes). */
static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void sb_be32(sbuf_t *b, uint32_t v)
{
    uint8_t x[4];
    put_be32(x, v);
    sb_put(b, x, 4);
}

static void sb_be64(sbuf_t *b, uint64_t v)
{
    sb_be32(b, (uint32_t)(v >> 32));
    sb_be32(b, (uint32_t)v);
}

/*
 * Appends integer cents as a binary numeric with scale 2 (length word
 * included): base-10000 digits of the whole part, then the cents as the
 * first fraction digit (cents * 100). Exact for every int64; numeric(20,2)
 * holds all of them.
 */
static void bin_cents(sbuf_t *b, int64_t cents)
{
    uint64_t mag = cents < 0 ? (uint64_t)0 - (uint64_t)cents : (uint64_t)cents;
    uint64_t whole = mag / 100;
    uint16_t digits[8];
    int nd = 0, nwhole = 0;
    uint16_t rev[6];
    for (; whole; whole /= 10000)
        rev[nwhole++] = (uint16_t)(whole % 10000);
    for (int k = nwhole - 1; k >= 0; k--)
        digits[nd++] = rev[k];
    if (mag % 100)
        digits[nd++] = (uint16_t)(mag % 100 * 100);
    int16_t weight = nd ? (int16_t)(nwhole - 1) : 0;
    sb_be32(b, (uint32_t)(8 + 2 * nd));
    sb_be16(b, (uint16_t)nd);
    sb_be16(b, (uint16_t)weight);
    sb_be16(b, cents < 0 ? 0x4000 : 0x0000);
    sb_be16(b, 2); /* display scale */
    for (int k = 0; k < nd; k++)
        sb_be16(b, digits[k]);
}

/* Milliseconds since 1970 as timestamptz microseconds since 2000; 0 when
 * the value is outside what timestamptz holds (or would read as infinity). */
static int ts_micros(int64_t ms, int64_t *out)
{
    /* timestamptz ends in 294276 AD and begins in 4714 BC; the bounds below
     * are a little inside both, far beyond anything an event carries. */
    if (ms < -210000000000000LL || ms > 9200000000000000LL)
        return 0;
    *out = (ms - PG_EPOCH_MS) * 1000;
    return 1;
}

/* ------------------------------------------------------------------------ */
/* UTF-8 sanitising                                                         */
/* ------------------------------------------------------------------------ */

static const char REPLACEMENT[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/*
 * Appends s[0..n) as valid UTF-8 without NUL bytes. Every text value goes
 * through here, not only rejected payloads, because one bad byte anywhere
 * would make Postgres refuse the whole COPY and so the flush, again and
 * again.
 */
static void put_utf8(sbuf_t *b, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    /* Worst case: every byte becomes U+FFFD (3 bytes); reserving it up front
     * keeps the inner loop free of capacity checks. */
    if (n > (SIZE_MAX - 16) / 3 || sb_reserve(b, 3 * n + 1) < 0) {
        b->oom = 1;
        return;
    }
    char *o = b->p + b->len;
    while (i < n) {
        unsigned c = s[i];
        if (c >= 0x01 && c < 0x80) {
            *o++ = (char)c;
            i++;
            continue;
        }
        size_t bad;
        size_t k = cm_utf8_seq(s + i, n - i, &bad);
        if (k == 0) {
            memcpy(o, REPLACEMENT, 3);
            o += 3;
            i += bad;
            continue;
        }
        memcpy(o, s + i, k);
        o += k;
        i += k;
    }
    b->len = (size_t)(o - b->p);
}

/* ------------------------------------------------------------------------ */
/* COPY row fields                                                          */
/* ------------------------------------------------------------------------ */

/* Most columns of any staging table. */
#define MAX_COLS 32

/*
 * A COPY writer: the buffer, the column types of the staging table (read
 * from the server when the stages are created) and the column the next
 * field goes to. Each field writer checks that its value suits the column's
 * type and appends it as a length word and the bytes; the first mismatch is
 * kept in `bad` and fails the flush (a programming error, never input).
 */
typedef struct cw {
    sbuf_t *b;
    const uint32_t *types;
    size_t ncols, col;
    const char *bad;
} cw_t;

/* The type of the next column, or 0 (and `bad` set) past the last one. */
static uint32_t cw_next(cw_t *w)
{
    if (w->col >= w->ncols) {
        if (!w->bad)
            w->bad = "more fields than columns";
        return 0;
    }
    return w->types[w->col++];
}

static void cw_mismatch(cw_t *w, const char *what)
{
    if (!w->bad)
        w->bad = what;
}

static void f_null(cw_t *w)
{
    cw_next(w);
    sb_be32(w->b, 0xFFFFFFFFu);
}

static void f_text_n(cw_t *w, const char *s, size_t n)
{
    if (cw_next(w) != OID_TEXT)
        cw_mismatch(w, "a text value for a column that is not text");
    sbuf_t *b = w->b;
    sb_be32(b, 0);
    size_t at = b->len;
    put_utf8(b, s, n);
    if (b->oom)
        return;
    size_t len = b->len - at;
    if (len > 0x3FFFFFFF) {
        cw_mismatch(w, "a text value over 1 GB");
        return;
    }
    put_be32((uint8_t *)b->p + at - 4, (uint32_t)len);
}

static void f_text(cw_t *w, const char *s)
{
    /* A missing string is stored as '' rather than NULL: every text column is
     * NOT NULL, and a NULL would fail the batch forever. */
    f_text_n(w, s ? s : "", s ? strlen(s) : 0);
}

/* An integer for a bigint, int or smallint column. */
static void f_i64(cw_t *w, int64_t v)
{
    switch (cw_next(w)) {
    case OID_INT8:
        sb_be32(w->b, 8);
        sb_be64(w->b, (uint64_t)v);
        return;
    case OID_INT4:
        if (v < INT32_MIN || v > INT32_MAX)
            break;
        sb_be32(w->b, 4);
        sb_be32(w->b, (uint32_t)(int32_t)v);
        return;
    case OID_INT2:
        if (v < INT16_MIN || v > INT16_MAX)
            break;
        sb_be32(w->b, 2);
        sb_be16(w->b, (uint16_t)(int16_t)v);
        return;
    default:
        cw_mismatch(w, "an integer for a column that is not an integer");
        return;
    }
    cw_mismatch(w, "an integer out of its column's range");
}

static void f_ts(cw_t *w, int64_t ms)
{
    int64_t us;
    if (cw_next(w) != OID_TIMESTAMPTZ) {
        cw_mismatch(w, "a timestamp for a column that is not timestamptz");
    } else if (!ts_micros(ms, &us)) {
        cw_mismatch(w, "a timestamp out of timestamptz's range");
    } else {
        sb_be32(w->b, 8);
        sb_be64(w->b, (uint64_t)us);
    }
}

/* A timestamp that may be absent: negative means NULL (sink.h). */
static void f_ts_opt(cw_t *w, int64_t ms)
{
    if (ms < 0)
        f_null(w);
    else
        f_ts(w, ms);
}

static void f_cents(cw_t *w, int64_t cents)
{
    if (cw_next(w) != OID_NUMERIC)
        cw_mismatch(w, "money for a column that is not numeric");
    else
        bin_cents(w->b, cents);
}

/* A day number (days since 1970-01-01) for a date column. */
static void f_day(cw_t *w, int64_t day)
{
    int64_t d = day - PG_EPOCH_DAYS;
    if (cw_next(w) != OID_DATE) {
        cw_mismatch(w, "a day for a column that is not a date");
    } else if (d <= INT32_MIN || d >= INT32_MAX) {
        /* INT32_MIN and INT32_MAX would read as -infinity and infinity. */
        cw_mismatch(w, "a day out of date's range");
    } else {
        sb_be32(w->b, 4);
        sb_be32(w->b, (uint32_t)(int32_t)d);
    }
}

static void f_bool(cw_t *w, int v)
{
    if (cw_next(w) != OID_BOOL) {
        cw_mismatch(w, "a boolean for a column that is not boolean");
        return;
    }
    sb_be32(w->b, 1);
    sb_putc(w->b, v ? 1 : 0);
}

static void f_f64(cw_t *w, double v)
{
    /* NaN and infinities never reach SQL: they are written as NULL. */
    if (!isfinite(v)) {
        f_null(w);
        return;
    }
    if (cw_next(w) != OID_FLOAT8) {
        cw_mismatch(w, "a double for a column that is not double precision");
        return;
    }
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    sb_be32(w->b, 8);
    sb_be64(w->b, bits);
}

/* A row writer appends row i of `rows` in its table's column order and
 * returns 1, or returns 0 when the row belongs to another staging table
 * (funnel rows are split into upserts and deletes). */
typedef int (*row_fn)(cw_t *w, const void *rows, size_t i);

static int row_session(cw_t *w, const void *rows, size_t i)
{
    const snk_session_row_t *r = (const snk_session_row_t *)rows + i;
    f_text(w, r->session_id);
    f_text(w, r->user_id);
    f_ts(w, r->started_at);
    f_ts(w, r->ended_at);
    f_i64(w, r->events);
    f_i64(w, r->page_views);
    f_i64(w, r->product_views);
    f_i64(w, r->add_to_carts);
    f_i64(w, r->checkouts);
    f_i64(w, r->purchases);
    f_cents(w, r->revenue_cents);
    f_text(w, r->device);
    f_text(w, r->country);
    f_i64(w, r->funnel_stage);
    return 1;
}

/* The sessions a flush upserts: those that Postgres may already hold. */
static int row_session_known(cw_t *w, const void *rows, size_t i)
{
    return ((const snk_session_row_t *)rows)[i].is_new ? 0 : row_session(w, rows, i);
}

/* The sessions a flush COPYs straight into the table (snk_session_row_t.is_new). */
static int row_session_new(cw_t *w, const void *rows, size_t i)
{
    return ((const snk_session_row_t *)rows)[i].is_new ? row_session(w, rows, i) : 0;
}

static int row_deleted_session(cw_t *w, const void *rows, size_t i)
{
    const char *const *ids = rows;
    f_text(w, ids[i]);
    return 1;
}

static int row_user(cw_t *w, const void *rows, size_t i)
{
    const snk_user_row_t *r = (const snk_user_row_t *)rows + i;
    f_text(w, r->user_id);
    f_ts(w, r->first_seen);
    f_ts(w, r->last_seen);
    f_text(w, r->device);
    f_text(w, r->country);
    f_i64(w, r->events);
    f_i64(w, r->sessions);
    f_i64(w, r->orders);
    f_cents(w, r->revenue_cents);
    f_ts_opt(w, r->first_order_at);
    f_ts_opt(w, r->last_order_at);
    return 1;
}

/* The users a flush upserts: those that Postgres may already hold. */
static int row_user_known(cw_t *w, const void *rows, size_t i)
{
    return ((const snk_user_row_t *)rows)[i].is_new ? 0 : row_user(w, rows, i);
}

/* The users a flush COPYs straight into the table (snk_user_row_t.is_new). */
static int row_user_new(cw_t *w, const void *rows, size_t i)
{
    return ((const snk_user_row_t *)rows)[i].is_new ? row_user(w, rows, i) : 0;
}

/* A funnel row whose counts have all fallen to zero no longer describes any
 * session, so it is deleted rather than kept as a row of zeros. */
static int funnel_is_zero(const snk_funnel_row_t *r)
{
    for (int k = 0; k < 5; k++)
        if (r->sessions_ge[k] != 0 || r->users_ge[k] != 0)
            return 0;
    return r->orders == 0 && r->revenue_cents == 0;
}

static int row_funnel(cw_t *w, const void *rows, size_t i)
{
    const snk_funnel_row_t *r = (const snk_funnel_row_t *)rows + i;
    if (funnel_is_zero(r))
        return 0;
    f_day(w, r->day);
    f_text(w, r->device);
    f_text(w, r->country);
    for (int k = 0; k < 5; k++)
        f_i64(w, r->sessions_ge[k]);
    for (int k = 0; k < 5; k++)
        f_i64(w, r->users_ge[k]);
    f_i64(w, r->orders);
    f_cents(w, r->revenue_cents);
    return 1;
}

static int row_funnel_zero(cw_t *w, const void *rows, size_t i)
{
    const snk_funnel_row_t *r = (const snk_funnel_row_t *)rows + i;
    if (!funnel_is_zero(r))
        return 0;
    f_day(w, r->day);
    f_text(w, r->device);
    f_text(w, r->country);
    return 1;
}

static int row_partition(cw_t *w, const void *rows, size_t i)
{
    const snk_partition_row_t *r = (const snk_partition_row_t *)rows + i;
    f_text(w, r->topic);
    f_i64(w, r->partition);
    f_i64(w, r->next_offset);
    f_ts_opt(w, r->watermark);
    f_i64(w, r->accepted);
    f_i64(w, r->duplicates);
    f_i64(w, r->rejected);
    return 1;
}

static int row_reject(cw_t *w, const void *rows, size_t i)
{
    const snk_reject_row_t *r = (const snk_reject_row_t *)rows + i;
    f_text(w, r->topic);
    f_i64(w, r->partition);
    f_i64(w, r->offset);
    f_text(w, r->reason);
    f_text(w, r->detail);
    size_t n = r->payload ? r->payload_len : 0;
    if (n > REJECT_PAYLOAD_MAX)
        n = REJECT_PAYLOAD_MAX;
    /* The cut may split a multi-byte character; put_utf8 turns the stump
     * into U+FFFD like any other truncated sequence. */
    f_text_n(w, n ? r->payload : "", n);
    f_ts(w, r->rejected_at);
    return 1;
}

/* A generic list: its table's column types and its values. */
typedef struct gen_rows {
    const char *types;
    size_t ncols;
    const snk_val_t *vals;
} gen_rows_t;

/* The type letter says which member of the value to read (sink.h). */
static void gen_value(cw_t *w, char type, const snk_val_t *v)
{
    if (v->null) {
        f_null(w);
        return;
    }
    switch (type) {
    case 't':
        f_text(w, v->s);
        break;
    case 's':
        f_ts(w, v->i);
        break;
    case 'd':
        f_day(w, v->i);
        break;
    case 'm':
        f_cents(w, v->i);
        break;
    case 'b':
        f_bool(w, v->i != 0);
        break;
    case 'f':
        f_f64(w, v->f);
        break;
    default:
        f_i64(w, v->i);
        break;
    }
}

static int row_generic(cw_t *w, const void *rows, size_t i)
{
    const gen_rows_t *g = rows;
    const snk_val_t *v = g->vals + i * g->ncols;
    for (size_t k = 0; k < g->ncols; k++)
        gen_value(w, g->types[k], &v[k]);
    return 1;
}

/* Two lists of one generic table read as one: the first n_first rows from
 * `first`, the rest from `then` (a redone flush upserts the new rows too). */
typedef struct gen_pair {
    gen_rows_t first, then;
    size_t n_first;
} gen_pair_t;

static int row_generic_pair(cw_t *w, const void *rows, size_t i)
{
    const gen_pair_t *p = rows;
    return i < p->n_first ? row_generic(w, &p->first, i) : row_generic(w, &p->then, i - p->n_first);
}

/* ------------------------------------------------------------------------ */
/* Tables                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum apply_kind {
    APPLY_UPSERT,      /* INSERT ... ON CONFLICT (key) DO UPDATE SET every other column */
    APPLY_INSERT_ONLY, /* INSERT ... ON CONFLICT DO NOTHING: rejects never change */
    APPLY_DELETE,      /* DELETE the target rows whose keys were staged */
    APPLY_DIRECT,      /* COPY into the table itself: rows no earlier flush wrote */
} apply_kind_t;

/*
 * How one staged list reaches its table. The staged columns are `cols`, in
 * the order the row writer emits them; the first `nkey` of them are the
 * table's primary key. `extra_col` is set by the server instead of being
 * sent (partitions.flushed_at = now()).
 */
typedef struct table_spec {
    const char *table;
    const char *stage;
    const char *const *cols;
    size_t ncols, nkey;
    apply_kind_t kind;
    const char *extra_col, *extra_expr;
    /* Generic tables only: one type letter per column (see gen_value). */
    const char *types;
} table_spec_t;

static const char *const SESSION_COLS[] = {
    "session_id",   "user_id",   "started_at", "ended_at", "events", "page_views", "product_views",
    "add_to_carts", "checkouts", "purchases",  "revenue",  "device", "country",    "funnel_stage"};
static const char *const USER_COLS[] = {"user_id", "first_seen",     "last_seen",    "device",
                                        "country", "events",         "sessions",     "orders",
                                        "revenue", "first_order_at", "last_order_at"};
static const char *const FUNNEL_COLS[] = {"day",
                                          "device",
                                          "country",
                                          "sessions",
                                          "sessions_product_view",
                                          "sessions_add_to_cart",
                                          "sessions_checkout",
                                          "sessions_purchase",
                                          "users",
                                          "users_product_view",
                                          "users_add_to_cart",
                                          "users_checkout",
                                          "users_purchase",
                                          "orders",
                                          "revenue"};
static const char *const PARTITION_COLS[] = {"topic",    "partition",  "next_offset", "watermark",
                                             "accepted", "duplicates", "rejected"};
static const char *const REJECT_COLS[] = {"topic",  "partition", "kafka_offset", "reason",
                                          "detail", "payload",   "rejected_at"};

#define NCOLS(a) (sizeof(a) / sizeof((a)[0]))

/* Generic tables (snk_rows_t). Type letters: t text, i integer, s timestamp
 * from ms, d date from days, m money from cents, b boolean, f double. */
static const char *const PRODUCT_DAILY_COLS[] = {"day",    "product_id", "views",  "add_to_carts",
                                                 "orders", "units",      "revenue"};
static const char *const PRODUCT_PAIRS_COLS[] = {"product_a", "product_b", "orders"};
static const char *const BASKET_DAILY_COLS[] = {"day", "orders_with_items", "units", "revenue"};
static const char *const COHORT_COLS[] = {"cohort_week", "week_offset", "users"};
static const char *const EXPOSURE_COLS[] = {"experiment",  "user_id",    "variant",
                                            "assigned_at", "exposed_at", "excluded"};
static const char *const OUTCOME_COLS[] = {
    "experiment", "user_id", "variant", "exposed_at",    "converted",
    "orders",     "revenue", "events",  "added_to_cart", "reached_checkout"};
static const char *const EXPERIMENT_COLS[] = {
    "experiment", "control_variant", "variants", "users",  "excluded_users", "srm_chi2",
    "srm_p",      "srm_detected",    "chi2",     "chi2_p", "window_days"};
static const char *const RESULT_COLS[] = {
    "experiment",      "variant",         "users",       "converters",
    "conversion_rate", "orders",          "revenue",     "revenue_per_user",
    "revenue_sd",      "events_per_user", "cart_rate",   "checkout_rate",
    "is_control",      "abs_lift",        "rel_lift",    "diff_ci_low",
    "diff_ci_high",    "rel_ci_low",      "rel_ci_high", "z",
    "p_value",         "seq_ci_low",      "seq_ci_high", "seq_p_value",
    "chance_to_win",   "rpu_diff",        "rpu_ci_low",  "rpu_ci_high",
    "rpu_p_value"};
static const char *const REGRESSION_COLS[] = {"experiment", "term",    "coef", "std_err",
                                              "z",          "p_value", "n"};

/* The order of this array is the order of a flush: the deletes of merged
 * sessions run before the sessions upsert, so a session id that is both
 * deleted and written in one batch ends up present. */
enum {
    T_SESSIONS_DEL,
    T_SESSIONS,
    T_SESSIONS_NEW,
    T_USERS,
    T_USERS_NEW,
    T_FUNNEL_DEL,
    T_FUNNEL,
    T_PARTITIONS,
    T_REJECTS,
    /* Generic tables: the delete stage of each, its upsert stage and its
     * direct COPY of new rows (T_GEN_DEL, T_GEN_UP, T_GEN_NEW). */
    T_GEN_FIRST,
    T__COUNT = T_GEN_FIRST + 3 * SNK_TABLE__COUNT
};
_Static_assert(T__COUNT <= 64, "staged_mask has a bit per table");

/* The TABLES entries of generic table t: its deletes, its upserts and its
 * direct COPY. */
#define T_GEN_DEL(t) (T_GEN_FIRST + 3 * (t))
#define T_GEN_UP(t) (T_GEN_FIRST + 3 * (t) + 1)
#define T_GEN_NEW(t) (T_GEN_FIRST + 3 * (t) + 2)

static const table_spec_t TABLES[T__COUNT] = {
    [T_SESSIONS_DEL] = {"sessions", "cm_stage_sessions_del", SESSION_COLS, 1, 1, APPLY_DELETE, NULL,
                        NULL, NULL},
    [T_SESSIONS] = {"sessions", "cm_stage_sessions", SESSION_COLS, NCOLS(SESSION_COLS), 1,
                    APPLY_UPSERT, NULL, NULL, NULL},
    /* No staging table of its own: the stage named here only lends its
     * column types (load_stage_types). */
    [T_SESSIONS_NEW] = {"sessions", "cm_stage_sessions", SESSION_COLS, NCOLS(SESSION_COLS), 1,
                        APPLY_DIRECT, NULL, NULL, NULL},
    [T_USERS] = {"users", "cm_stage_users", USER_COLS, NCOLS(USER_COLS), 1, APPLY_UPSERT, NULL,
                 NULL, NULL},
    [T_USERS_NEW] = {"users", "cm_stage_users", USER_COLS, NCOLS(USER_COLS), 1, APPLY_DIRECT, NULL,
                     NULL, NULL},
    [T_FUNNEL_DEL] = {"funnel_daily", "cm_stage_funnel_del", FUNNEL_COLS, 3, 3, APPLY_DELETE, NULL,
                      NULL, NULL},
    [T_FUNNEL] = {"funnel_daily", "cm_stage_funnel", FUNNEL_COLS, NCOLS(FUNNEL_COLS), 3,
                  APPLY_UPSERT, NULL, NULL, NULL},
    [T_PARTITIONS] = {"partitions", "cm_stage_partitions", PARTITION_COLS, NCOLS(PARTITION_COLS), 2,
                      APPLY_UPSERT, "flushed_at", "now()", NULL},
    [T_REJECTS] = {"rejected_events", "cm_stage_rejects", REJECT_COLS, NCOLS(REJECT_COLS), 3,
                   APPLY_INSERT_ONLY, NULL, NULL, NULL},
#define GEN(id, tbl, stage, cols, nkey, types)                                                     \
    [T_GEN_DEL(id)] = {tbl, stage "_del", cols, nkey, nkey, APPLY_DELETE, NULL, NULL, types},      \
    [T_GEN_UP(id)] = {tbl, stage, cols, NCOLS(cols), nkey, APPLY_UPSERT, NULL, NULL, types},       \
    [T_GEN_NEW(id)] = {tbl, stage, cols, NCOLS(cols), nkey, APPLY_DIRECT, NULL, NULL, types}
    GEN(SNK_PRODUCT_DAILY, "product_daily", "cm_stage_product_daily", PRODUCT_DAILY_COLS, 2,
        "dtiiiim"),
    GEN(SNK_PRODUCT_PAIRS, "product_pairs", "cm_stage_product_pairs", PRODUCT_PAIRS_COLS, 2, "tti"),
    GEN(SNK_BASKET_DAILY, "basket_daily", "cm_stage_basket_daily", BASKET_DAILY_COLS, 1, "diim"),
    GEN(SNK_COHORT_RETENTION, "cohort_retention", "cm_stage_cohort", COHORT_COLS, 2, "dii"),
    GEN(SNK_USER_EXPOSURE, "user_exposure", "cm_stage_user_exposure", EXPOSURE_COLS, 2, "tttssb"),
    GEN(SNK_USER_OUTCOMES, "user_outcomes", "cm_stage_user_outcomes", OUTCOME_COLS, 2,
        "tttsbimibb"),
    GEN(SNK_EXPERIMENTS, "experiments", "cm_stage_experiments", EXPERIMENT_COLS, 1, "ttiiiffbffi"),
    GEN(SNK_EXPERIMENT_RESULTS, "experiment_results", "cm_stage_experiment_results", RESULT_COLS, 2,
        "ttiifim"
        "fffff"
        "b"
        "ffffffffffffffff"),
    GEN(SNK_EXPERIMENT_REGRESSION, "experiment_regression", "cm_stage_experiment_regression",
        REGRESSION_COLS, 2, "ttffffi"),
#undef GEN
};

int snk_table_ncols(enum snk_table t)
{
    return t < SNK_TABLE__COUNT ? (int)TABLES[T_GEN_UP(t)].ncols : -1;
}

int snk_table_nkey(enum snk_table t)
{
    return t < SNK_TABLE__COUNT ? (int)TABLES[T_GEN_UP(t)].nkey : -1;
}

/* ------------------------------------------------------------------------ */
/* Migrations                                                               */
/* ------------------------------------------------------------------------ */

/*
 * The schema's history. Each entry is applied once, in order, inside the
 * migration transaction, and its version is then recorded in
 * {S}.schema_version. To change the schema, append an entry with the next
 * version; never edit an entry that may have been applied somewhere, since
 * databases that already have it would never see the edit. "{S}" stands for
 * the quoted schema name.
 */
typedef struct migration {
    int version;
    const char *sql;
} migration_t;

/* The table of applied migrations, created before the first of them. */
static const char SCHEMA_VERSION_SQL[] = "CREATE TABLE IF NOT EXISTS {S}.schema_version ("
                                         "  version    int PRIMARY KEY,"
                                         "  applied_at timestamptz NOT NULL DEFAULT now()"
                                         ")";

/* The body of the daily_kpis view, the same in migrations 2 and 6. */
#define VIEW_DAILY_KPIS                                                                            \
    "  SELECT f.day,"                                                                              \
    "         f.users AS active_users,"                                                            \
    "         coalesce(n.new_users, 0) AS new_users,"                                              \
    "         f.users - coalesce(n.new_users, 0) AS returning_users,"                              \
    "         f.sessions, f.orders, f.revenue,"                                                    \
    "         round(f.revenue / NULLIF(f.orders, 0), 2) AS avg_order_value,"                       \
    "         f.users_purchase::float8 / NULLIF(f.users, 0) AS user_conversion_rate,"              \
    "         f.sessions_add_to_cart - f.sessions_purchase AS abandoned_cart_sessions,"            \
    "         (f.sessions_add_to_cart - f.sessions_purchase)::float8"                              \
    "           / NULLIF(f.sessions_add_to_cart, 0) AS cart_abandonment_rate"                      \
    "  FROM {S}.funnel_daily f"                                                                    \
    "  LEFT JOIN (SELECT (first_seen AT TIME ZONE 'UTC')::date AS day, count(*) AS new_users"      \
    "             FROM {S}.users GROUP BY 1) n ON n.day = f.day"                                   \
    "  WHERE f.device = '*' AND f.country = '*';"

/* product_affinity (migration 2, recreated by migration 6 with its pair
 * columns in the database's collation): the per-product orders and the
 * total its measures divide by, */
#define VIEW_AFFINITY_FROM                                                                         \
    "  WITH po AS (SELECT product_id, sum(orders) AS orders"                                       \
    "              FROM {S}.product_daily GROUP BY product_id),"                                   \
    "       t AS (SELECT coalesce(sum(orders_with_items), 0) AS total FROM {S}.basket_daily)"

/* ... and, after the select list's pair columns, its measures. */
#define VIEW_AFFINITY_MEASURES                                                                     \
    "         t.total AS total_orders,"                                                            \
    "         p.orders::float8 / NULLIF(t.total, 0) AS support,"                                   \
    "         p.orders::float8 / NULLIF(a.orders, 0) AS confidence_ab,"                            \
    "         p.orders::float8 / NULLIF(b.orders, 0) AS confidence_ba,"                            \
    "         p.orders::float8 * t.total / NULLIF(a.orders * b.orders, 0) AS lift"                 \
    "  FROM {S}.product_pairs p"                                                                   \
    "  JOIN po a ON a.product_id = p.product_a"                                                    \
    "  JOIN po b ON b.product_id = p.product_b"                                                    \
    "  CROSS JOIN t;"

/* The scoring and segments of rfm_segments from migration 4 on, where ties
 * break by user_id in byte order; migration 6 keeps it as it recreates
 * the view. */
#define VIEW_RFM_SCORED                                                                            \
    "  scored AS ("                                                                                \
    "    SELECT b.*,"                                                                              \
    "           ntile(5) OVER (ORDER BY recency_days DESC, user_id COLLATE \"C\") AS r_score,"     \
    "           ntile(5) OVER (ORDER BY frequency, user_id COLLATE \"C\") AS f_score,"             \
    "           ntile(5) OVER (ORDER BY monetary, user_id COLLATE \"C\") AS m_score"               \
    "    FROM base b)"                                                                             \
    "  SELECT s.*, r_score::text || f_score::text || m_score::text AS rfm,"                        \
    "         CASE"                                                                                \
    "           WHEN r_score >= 4 AND f_score >= 4 AND m_score >= 4 THEN 'Champions'"              \
    "           WHEN r_score >= 3 AND f_score >= 4 THEN 'Loyal'"                                   \
    "           WHEN r_score >= 4 AND f_score <= 1 THEN 'New Customers'"                           \
    "           WHEN r_score >= 4 THEN 'Potential Loyalists'"                                      \
    "           WHEN r_score = 3 THEN 'Need Attention'"                                            \
    "           WHEN r_score <= 2 AND f_score >= 4 THEN 'At Risk'"                                 \
    "           WHEN r_score = 2 THEN 'Hibernating'"                                               \
    "           ELSE 'Lost'"                                                                       \
    "         END AS segment"                                                                      \
    "  FROM scored s;"

/* The collation of the text columns that hold the contract's strings, from
 * migration 6 on. */
#define C_COLL "\"C\""

static const migration_t MIGRATIONS[] = {
    {1, "CREATE TABLE {S}.sessions ("
        "  session_id    text PRIMARY KEY,"
        "  user_id       text NOT NULL,"
        "  started_at    timestamptz NOT NULL,"
        "  ended_at      timestamptz NOT NULL,"
        "  events        bigint NOT NULL,"
        "  page_views    bigint NOT NULL,"
        "  product_views bigint NOT NULL,"
        "  add_to_carts  bigint NOT NULL,"
        "  checkouts     bigint NOT NULL,"
        "  purchases     bigint NOT NULL,"
        "  revenue       numeric(20,2) NOT NULL,"
        "  device        text NOT NULL,"
        "  country       text NOT NULL,"
        "  funnel_stage  smallint NOT NULL"
        ");"
        "CREATE INDEX ON {S}.sessions (user_id, started_at);"
        "CREATE TABLE {S}.users ("
        "  user_id        text PRIMARY KEY,"
        "  first_seen     timestamptz NOT NULL,"
        "  last_seen      timestamptz NOT NULL,"
        "  device         text NOT NULL,"
        "  country        text NOT NULL,"
        "  events         bigint NOT NULL,"
        "  sessions       bigint NOT NULL,"
        "  orders         bigint NOT NULL,"
        "  revenue        numeric(20,2) NOT NULL,"
        "  first_order_at timestamptz,"
        "  last_order_at  timestamptz"
        ");"
        "CREATE TABLE {S}.funnel_daily ("
        "  day                   date NOT NULL,"
        "  device                text NOT NULL,"
        "  country               text NOT NULL,"
        "  sessions              bigint NOT NULL,"
        "  sessions_product_view bigint NOT NULL,"
        "  sessions_add_to_cart  bigint NOT NULL,"
        "  sessions_checkout     bigint NOT NULL,"
        "  sessions_purchase     bigint NOT NULL,"
        "  users                 bigint NOT NULL,"
        "  users_product_view    bigint NOT NULL,"
        "  users_add_to_cart     bigint NOT NULL,"
        "  users_checkout        bigint NOT NULL,"
        "  users_purchase        bigint NOT NULL,"
        "  orders                bigint NOT NULL,"
        "  revenue               numeric(20,2) NOT NULL,"
        "  PRIMARY KEY (day, device, country)"
        ");"
        "CREATE TABLE {S}.partitions ("
        "  topic       text NOT NULL,"
        "  partition   int NOT NULL,"
        "  next_offset bigint NOT NULL,"
        "  watermark   timestamptz,"
        "  accepted    bigint NOT NULL,"
        "  duplicates  bigint NOT NULL,"
        "  rejected    bigint NOT NULL,"
        "  flushed_at  timestamptz NOT NULL,"
        "  PRIMARY KEY (topic, partition)"
        ");"
        "CREATE TABLE {S}.rejected_events ("
        "  topic        text NOT NULL,"
        "  partition    int NOT NULL,"
        "  kafka_offset bigint NOT NULL,"
        "  reason       text NOT NULL,"
        "  detail       text NOT NULL,"
        "  payload      text NOT NULL,"
        "  rejected_at  timestamptz NOT NULL,"
        "  PRIMARY KEY (topic, partition, kafka_offset)"
        ");"},
    {2, "CREATE TABLE {S}.product_daily ("
        "  day          date NOT NULL,"
        "  product_id   text NOT NULL,"
        "  views        bigint NOT NULL,"
        "  add_to_carts bigint NOT NULL,"
        "  orders       bigint NOT NULL,"
        "  units        bigint NOT NULL,"
        "  revenue      numeric(20,2) NOT NULL,"
        "  PRIMARY KEY (day, product_id)"
        ");"
        "CREATE TABLE {S}.product_pairs ("
        "  product_a text NOT NULL,"
        "  product_b text NOT NULL,"
        "  orders    bigint NOT NULL,"
        "  PRIMARY KEY (product_a, product_b)"
        ");"
        "CREATE TABLE {S}.basket_daily ("
        "  day               date PRIMARY KEY,"
        "  orders_with_items bigint NOT NULL,"
        "  units             bigint NOT NULL,"
        "  revenue           numeric(20,2) NOT NULL"
        ");"
        "CREATE TABLE {S}.cohort_retention ("
        "  cohort_week date NOT NULL,"
        "  week_offset int NOT NULL,"
        "  users       bigint NOT NULL,"
        "  PRIMARY KEY (cohort_week, week_offset)"
        ");"
        "CREATE VIEW {S}.product_affinity AS" VIEW_AFFINITY_FROM
        "  SELECT p.product_a, p.product_b, p.orders,"
        " a.orders AS orders_a, b.orders AS orders_b," VIEW_AFFINITY_MEASURES
        "CREATE VIEW {S}.daily_kpis AS" VIEW_DAILY_KPIS "CREATE VIEW {S}.rfm_segments AS"
        "  WITH ref AS (SELECT max(last_seen) AS at FROM {S}.users),"
        "  base AS ("
        "    SELECT u.user_id,"
        "           floor(extract(epoch FROM (ref.at - u.last_order_at)) / 86400)::int"
        "             AS recency_days,"
        "           u.orders AS frequency, u.revenue AS monetary"
        "    FROM {S}.users u CROSS JOIN ref WHERE u.orders > 0),"
        "  scored AS ("
        "    SELECT b.*,"
        "           ntile(5) OVER (ORDER BY recency_days DESC, user_id) AS r_score,"
        "           ntile(5) OVER (ORDER BY frequency, user_id) AS f_score,"
        "           ntile(5) OVER (ORDER BY monetary, user_id) AS m_score"
        "    FROM base b)"
        "  SELECT s.*, r_score::text || f_score::text || m_score::text AS rfm,"
        "         CASE"
        "           WHEN r_score >= 4 AND f_score >= 4 AND m_score >= 4 THEN 'Champions'"
        "           WHEN r_score >= 3 AND f_score >= 4 THEN 'Loyal'"
        "           WHEN r_score >= 4 AND f_score <= 1 THEN 'New Customers'"
        "           WHEN r_score >= 4 THEN 'Potential Loyalists'"
        "           WHEN r_score = 3 THEN 'Need Attention'"
        "           WHEN r_score <= 2 AND f_score >= 4 THEN 'At Risk'"
        "           WHEN r_score = 2 THEN 'Hibernating'"
        "           ELSE 'Lost'"
        "         END AS segment"
        "  FROM scored s;"},
    {3, "CREATE TABLE {S}.user_exposure ("
        "  experiment  text NOT NULL,"
        "  user_id     text NOT NULL,"
        "  variant     text NOT NULL,"
        "  assigned_at timestamptz NOT NULL,"
        "  exposed_at  timestamptz,"
        "  excluded    boolean NOT NULL,"
        "  PRIMARY KEY (experiment, user_id)"
        ");"
        "CREATE TABLE {S}.user_outcomes ("
        "  experiment       text NOT NULL,"
        "  user_id          text NOT NULL,"
        "  variant          text NOT NULL,"
        "  exposed_at       timestamptz NOT NULL,"
        "  converted        boolean NOT NULL,"
        "  orders           bigint NOT NULL,"
        "  revenue          numeric(20,2) NOT NULL,"
        "  events           bigint NOT NULL,"
        "  added_to_cart    boolean NOT NULL,"
        "  reached_checkout boolean NOT NULL,"
        "  PRIMARY KEY (experiment, user_id)"
        ");"
        "CREATE TABLE {S}.experiments ("
        "  experiment      text PRIMARY KEY,"
        "  control_variant text NOT NULL,"
        "  variants        int NOT NULL,"
        "  users           bigint NOT NULL,"
        "  excluded_users  bigint NOT NULL,"
        "  srm_chi2        float8,"
        "  srm_p           float8,"
        "  srm_detected    boolean,"
        "  chi2            float8,"
        "  chi2_p          float8,"
        "  window_days     int NOT NULL"
        ");"
        "CREATE TABLE {S}.experiment_results ("
        "  experiment       text NOT NULL,"
        "  variant          text NOT NULL,"
        "  users            bigint NOT NULL,"
        "  converters       bigint NOT NULL,"
        "  conversion_rate  float8,"
        "  orders           bigint NOT NULL,"
        "  revenue          numeric(20,2) NOT NULL,"
        "  revenue_per_user float8,"
        "  revenue_sd       float8,"
        "  events_per_user  float8,"
        "  cart_rate        float8,"
        "  checkout_rate    float8,"
        "  is_control       boolean NOT NULL,"
        "  abs_lift float8, rel_lift float8, diff_ci_low float8, diff_ci_high float8,"
        "  rel_ci_low float8, rel_ci_high float8, z float8, p_value float8,"
        "  seq_ci_low float8, seq_ci_high float8, seq_p_value float8, chance_to_win float8,"
        "  rpu_diff float8, rpu_ci_low float8, rpu_ci_high float8, rpu_p_value float8,"
        "  PRIMARY KEY (experiment, variant)"
        ");"
        "CREATE TABLE {S}.experiment_regression ("
        "  experiment text NOT NULL,"
        "  term       text NOT NULL,"
        "  coef       float8,"
        "  std_err    float8,"
        "  z          float8,"
        "  p_value    float8,"
        "  n          bigint NOT NULL,"
        "  PRIMARY KEY (experiment, term)"
        ");"},
    /* 4: strings order byte-wise (CONTRACT): the RFM tie-break by user_id
     * must not depend on the database's collation. */
    {4, "CREATE OR REPLACE VIEW {S}.rfm_segments AS"
        "  WITH ref AS (SELECT max(last_seen) AS at FROM {S}.users),"
        "  base AS ("
        "    SELECT u.user_id,"
        "           floor(extract(epoch FROM (ref.at - u.last_order_at)) / 86400)::int"
        "             AS recency_days,"
        "           u.orders AS frequency, u.revenue AS monetary"
        "    FROM {S}.users u CROSS JOIN ref WHERE u.orders > 0)," VIEW_RFM_SCORED},
    /* 5: every flush rewrites the rows of the active users and of their
     * experiment outcomes. With room left on each page, Postgres keeps the new
     * row version on the same page and adds no index entry (a HOT update):
     * 20-25 % less time for those upserts and no index bloat from them
     * (docs/sink.md). It applies to pages written from now on. */
    {5, "ALTER TABLE {S}.users SET (fillfactor = 80);"
        "ALTER TABLE {S}.user_outcomes SET (fillfactor = 80);"},
    /* 6: the text columns that hold the contract's strings (identifiers and
     * dimensions) compare byte by byte, as the contract says, whatever the
     * database's default collation: an analyst's ORDER BY on a table then gives
     * the contract's order, and the keys' B-trees compare with memcmp instead
     * of the locale's rules (in an en_US.UTF-8 database that made a 1 M-event
     * run 24 % faster end to end, in an ICU one 10 %; docs/sink.md). The free
     * text of rejected_events (detail, payload) keeps the database's rules, so
     * case-insensitive searches in it still work on non-ASCII letters.
     *
     * Postgres cannot change the collation of a column a view reads, and a
     * dropped view would take its owner, privileges, options, comments and the
     * analysts' views built on it along. So each of the three views is first
     * replaced by a placeholder of the same columns that reads nothing, then
     * given its definition back, with its text columns still in the database's
     * collation (CREATE OR REPLACE VIEW cannot change a column's collation),
     * and its options (security_barrier and the like, which CREATE OR REPLACE
     * VIEW resets) set again.
     * ALTER COLUMN TYPE keeps the rows but rebuilds the indexes and drops the
     * columns' statistics, hence the ANALYZE. An analyst's own view, policy or
     * publication filter on one of these columns makes the migration fail with
     * Postgres' message naming it (docs/operations.md). */
    {6, "CREATE TEMP TABLE cm_m6_views ON COMMIT DROP AS"
        "  SELECT c.oid, c.relname::text AS relname, c.reloptions FROM pg_catalog.pg_class c"
        "  WHERE c.relnamespace = '{S}'::regnamespace AND c.relkind = 'v'"
        "    AND c.relname IN ('product_affinity', 'daily_kpis', 'rfm_segments');"
        "DO $$"
        " DECLARE v record; cols text;"
        " BEGIN"
        "  FOR v IN SELECT * FROM pg_temp.cm_m6_views LOOP"
        "    SELECT string_agg(format('NULL::%s AS %I',"
        "                             pg_catalog.format_type(a.atttypid, a.atttypmod), a.attname),"
        "                      ', ' ORDER BY a.attnum)"
        "      INTO cols FROM pg_catalog.pg_attribute a"
        "      WHERE a.attrelid = v.oid AND a.attnum > 0 AND NOT a.attisdropped;"
        "    EXECUTE format('CREATE OR REPLACE VIEW {S}.%I AS SELECT %s WHERE false',"
        "                   v.relname, cols);"
        "  END LOOP;"
        " END $$;"
        "ALTER TABLE {S}.sessions"
        "  ALTER COLUMN session_id TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN user_id TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN device TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN country TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.users"
        "  ALTER COLUMN user_id TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN device TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN country TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.funnel_daily"
        "  ALTER COLUMN device TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN country TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.partitions"
        "  ALTER COLUMN topic TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.rejected_events"
        "  ALTER COLUMN topic TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN reason TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.product_daily"
        "  ALTER COLUMN product_id TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.product_pairs"
        "  ALTER COLUMN product_a TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN product_b TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.user_exposure"
        "  ALTER COLUMN experiment TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN user_id TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN variant TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.user_outcomes"
        "  ALTER COLUMN experiment TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN user_id TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN variant TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.experiments"
        "  ALTER COLUMN experiment TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN control_variant TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.experiment_results"
        "  ALTER COLUMN experiment TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN variant TYPE text COLLATE " C_COLL ";"
        "ALTER TABLE {S}.experiment_regression"
        "  ALTER COLUMN experiment TYPE text COLLATE " C_COLL ","
        "  ALTER COLUMN term TYPE text COLLATE " C_COLL ";"
        "CREATE OR REPLACE VIEW {S}.product_affinity AS" VIEW_AFFINITY_FROM
        "  SELECT p.product_a COLLATE \"default\" AS product_a,"
        "         p.product_b COLLATE \"default\" AS product_b,"
        "         p.orders, a.orders AS orders_a, b.orders AS orders_b," VIEW_AFFINITY_MEASURES
        "CREATE OR REPLACE VIEW {S}.daily_kpis AS" VIEW_DAILY_KPIS
        "CREATE OR REPLACE VIEW {S}.rfm_segments AS"
        "  WITH ref AS (SELECT max(last_seen) AS at FROM {S}.users),"
        "  base AS ("
        "    SELECT u.user_id COLLATE \"default\" AS user_id,"
        "           floor(extract(epoch FROM (ref.at - u.last_order_at)) / 86400)::int"
        "             AS recency_days,"
        "           u.orders AS frequency, u.revenue AS monetary"
        "    FROM {S}.users u CROSS JOIN ref WHERE u.orders > 0)," VIEW_RFM_SCORED "DO $$"
        " DECLARE v record;"
        " BEGIN"
        "  FOR v IN SELECT * FROM pg_temp.cm_m6_views WHERE reloptions IS NOT NULL LOOP"
        "    EXECUTE format('ALTER VIEW {S}.%I SET (%s)', v.relname,"
        "                   array_to_string(v.reloptions, ', '));"
        "  END LOOP;"
        " END $$;"
        "ANALYZE {S}.sessions, {S}.users, {S}.funnel_daily, {S}.partitions, {S}.rejected_events, "
        "{S}.product_daily, {S}.product_pairs, {S}.user_exposure, {S}.user_outcomes, "
        "{S}.experiments, {S}.experiment_results, {S}.experiment_regression;"},
};

/* ------------------------------------------------------------------------ */
/* Connection                                                               */
/* ------------------------------------------------------------------------ */

struct snk_conn {
    PGconn *pg;
    char schema[64]; /* the schema name as given (valid_schema) */
    char *schema_q;  /* the schema as a quoted identifier (PQescapeIdentifier) */
    char *secret;    /* the password in use, scrubbed from every message */
    int staged;      /* the staging tables exist in this session */
    int broken;      /* the connection failed; only snk_close remains */
    sbuf_t sql;      /* statement text, reused across calls */
    sbuf_t data;     /* COPY data, reused across flushes */
    /* Column types (OIDs) of each staging table, read when they are created. */
    uint32_t types[T__COUNT][MAX_COLS];
    char sqlstate[6];     /* SQLSTATE of the last failed statement ("" if none) */
    uint64_t redone;      /* flushes redone with upserts (snk_flush_redone) */
    int parts;            /* parts written into the open transaction (snk_flush_part) */
    uint64_t staged_mask; /* staging tables holding rows in the open transaction */
    snk_gate_fn gate;     /* asked before a flush's COMMIT (snk_flush_gated) */
    void *gate_arg;
    char err[1024];
};

/* The message of the last failed snk_open on this thread: a failed open
 * returns no connection that could carry it, so snk_last_error(NULL) reads
 * it from here. Thread-local, so concurrent opens do not mix messages. */
static _Thread_local char open_err[1024];

/* Swallows server notices ("relation already exists, skipping" and the
 * like): libpq's default processor would print them to stderr. */
static void notice_ignore(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/*
 * Stores "<step>: <message>" as one line in dst: newlines become spaces and
 * runs of blanks one blank, so the message fits a log line, and the password, if known, is replaced
 * with
 * "***" in case a server or libpq message ever quotes it.
 */
static void store_err(char *dst, size_t cap, const char *secret, const char *step, const char *msg)
{
    size_t o = 0, slen = secret ? strlen(secret) : 0;
    const char *parts[3] = {step, step && *step ? ": " : "", msg ? msg : ""};
    for (int k = 0; k < 3; k++) {
        const char *p = parts[k] ? parts[k] : "";
        while (*p && o + 1 < cap) {
            if (secret && slen >= SCRUB_MIN_LEN && strncmp(p, secret, slen) == 0) {
                for (const char *r = "***"; *r && o + 1 < cap; r++)
                    dst[o++] = *r;
                p += slen;
                continue;
            }
            char ch = *p++;
            if (ch == '\n' || ch == '\r' || ch == '\t')
                ch = ' ';
            /* libpq pads its LINE/caret context with runs of blanks. */
            if (ch == ' ' && o > 0 && dst[o - 1] == ' ')
                continue;
            dst[o++] = ch;
        }
    }
    /* Trailing blanks come from libpq's final newline and carry nothing. */
    while (o > 0 && dst[o - 1] == ' ')
        o--;
    dst[o] = '\0';
}

static void set_err(snk_conn_t *c, const char *step, const char *msg)
{
    store_err(c->err, sizeof c->err, c->secret, step, msg);
}

/* Records a failed statement and says whether the connection survived. */
static int fail_res(snk_conn_t *c, const char *step, const PGresult *res)
{
    const char *msg = res ? PQresultErrorMessage(res) : "";
    if (!msg || !*msg)
        msg = PQerrorMessage(c->pg);
    set_err(c, step, msg);
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    snprintf(c->sqlstate, sizeof c->sqlstate, "%s", state ? state : "");
    if (PQstatus(c->pg) != CONNECTION_OK) {
        c->broken = 1;
        return SNK_ECONNECT;
    }
    return SNK_EQUERY;
}

/* Runs one statement (or several, separated by ';') and checks its status. */
static int exec_cmd(snk_conn_t *c, const char *step, const char *sql, ExecStatusType want)
{
    if (!sql) {
        set_err(c, step, "out of memory");
        return SNK_ENOMEM;
    }
    PGresult *res = PQexec(c->pg, sql);
    if (!res || PQresultStatus(res) != want) {
        int rc = fail_res(c, step, res);
        PQclear(res);
        return rc;
    }
    PQclear(res);
    return 0;
}

/* Builds c->sql from a template with "{S}" for the schema and runs it. */
static int exec_tmpl(snk_conn_t *c, const char *step, const char *tmpl)
{
    c->sql.len = 0;
    sb_sql(&c->sql, tmpl, c->schema_q);
    return exec_cmd(c, step, sb_cstr(&c->sql), PGRES_COMMAND_OK);
}

/*
 * Ends a failed transaction: rolls back if the connection still works, and
 * classifies the failure. The first error message is kept; the rollback's
 * own outcome matters only in that a dead connection turns the result into
 * SNK_ECONNECT.
 */
static int fail_tx(snk_conn_t *c, int rc)
{
    if (PQstatus(c->pg) == CONNECTION_OK && PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
        PGresult *res = PQexec(c->pg, "ROLLBACK");
        PQclear(res);
    }
    if (PQstatus(c->pg) != CONNECTION_OK) {
        c->broken = 1;
        if (!c->err[0])
            set_err(c, "connection", PQerrorMessage(c->pg));
        return SNK_ECONNECT;
    }
    return rc;
}

/* Commits and checks that the server really committed: COMMIT of a
 * transaction that failed earlier answers "ROLLBACK" with success status. */
static int commit(snk_conn_t *c)
{
    PGresult *res = PQexec(c->pg, "COMMIT");
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        int rc = fail_res(c, "COMMIT", res);
        PQclear(res);
        return rc;
    }
    int ok = strcmp(PQcmdStatus(res), "COMMIT") == 0;
    PQclear(res);
    if (!ok) {
        set_err(c, "COMMIT", "the server rolled the transaction back");
        return SNK_EQUERY;
    }
    return 0;
}

/* Whether s matches ^[a-z_][a-z0-9_]{0,62}$: the names that need no quoting
 * and fit Postgres's 63-byte identifier limit. */
static int valid_schema(const char *s)
{
    if (!s || !((*s >= 'a' && *s <= 'z') || *s == '_'))
        return 0;
    size_t n = 0;
    for (const char *p = s; *p; p++, n++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_'))
            return 0;
    return n <= 63;
}

/*
 * Copies a libpq parse error for a connection string that could not be
 * parsed into out[cap]: libpq quotes the offending text, which may be (part
 * of) the password, so every quoted span except the literal "=" is hidden.
 */
static void hide_quoted(const char *in, char *out, size_t cap)
{
    size_t o = 0;
    for (const char *p = in; *p && o + 1 < cap;) {
        const char *q = *p == '"' ? strchr(p + 1, '"') : NULL;
        const char *rep = NULL;
        size_t n = 1;
        if (q) {
            int is_eq = q == p + 2 && p[1] == '=';
            rep = is_eq ? "\"=\"" : "\"***\"";
            n = (size_t)(q + 1 - p);
        }
        if (!rep) {
            out[o++] = *p;
        } else {
            for (; *rep && o + 1 < cap; rep++)
                out[o++] = *rep;
        }
        p += n;
    }
    out[o] = '\0';
}

static void conn_free(snk_conn_t *c)
{
    if (!c)
        return;
    if (c->pg)
        PQfinish(c->pg);
    if (c->schema_q)
        PQfreemem(c->schema_q);
    if (c->secret) {
        /* The password should not linger in freed memory. */
        volatile char *v = c->secret;
        while (*v)
            *v++ = 0;
        free(c->secret);
    }
    sb_free(&c->sql);
    sb_free(&c->data);
    free(c);
}

int snk_check_conf(const char *conninfo, const char *schema)
{
    open_err[0] = '\0';
    if (!valid_schema(schema)) {
        store_err(open_err, sizeof open_err, NULL, "invalid schema name",
                  "it must match ^[a-z_][a-z0-9_]{0,62}$");
        return SNK_EINVAL;
    }
    if (!conninfo)
        conninfo = "";

    /* Parsing first separates a malformed string (SNK_EINVAL, with a message
     * that must not quote it) from a failure to reach the server. */
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &perr);
    if (!opts) {
        if (perr) {
            char safe[sizeof open_err];
            hide_quoted(perr, safe, sizeof safe);
            store_err(open_err, sizeof open_err, NULL, "invalid connection string", safe);
            PQfreemem(perr);
        } else {
            store_err(open_err, sizeof open_err, NULL, "snk_open", "out of memory");
            return SNK_ENOMEM;
        }
        return SNK_EINVAL;
    }
    PQconninfoFree(opts);
    return 0;
}

int snk_open(const char *conninfo, const char *schema, snk_conn_t **out)
{
    if (!out)
        return SNK_EINVAL;
    *out = NULL;
    int r = snk_check_conf(conninfo, schema);
    if (r)
        return r;
    if (!conninfo)
        conninfo = "";

    snk_conn_t *c = calloc(1, sizeof *c);
    if (!c) {
        store_err(open_err, sizeof open_err, NULL, "snk_open", "out of memory");
        return SNK_ENOMEM;
    }

    /*
     * The caller's string is expanded in place of "dbname" (expand_dbname),
     * and libpq keeps the last value of a repeated keyword: the defaults
     * before it can be overridden by the caller, the client encoding after
     * it cannot, because the COPY data is UTF-8. The keepalive and connect
     * timeouts make a vanished server show up as an error within about a
     * minute instead of a flush thread blocked for the kernel's two hours.
     */
    const char *const keys[] = {"fallback_application_name",
                                "connect_timeout",
                                "keepalives",
                                "keepalives_idle",
                                "keepalives_interval",
                                "keepalives_count",
                                "dbname",
                                "client_encoding",
                                NULL};
    const char *const vals[] = {"clickmartd", "10", "1", "30", "10", "3", conninfo, "UTF8", NULL};
    c->pg = PQconnectdbParams(keys, vals, 1);
    if (!c->pg) {
        store_err(open_err, sizeof open_err, NULL, "connect", "out of memory");
        conn_free(c);
        return SNK_ENOMEM;
    }
    const char *pw = PQpass(c->pg);
    if (pw && *pw) {
        size_t n = strlen(pw) + 1;
        if (!(c->secret = malloc(n))) {
            conn_free(c);
            store_err(open_err, sizeof open_err, NULL, "snk_open", "out of memory");
            return SNK_ENOMEM;
        }
        memcpy(c->secret, pw, n);
    }
    PQsetNoticeProcessor(c->pg, notice_ignore, NULL);
    if (PQstatus(c->pg) != CONNECTION_OK) {
        store_err(open_err, sizeof open_err, c->secret, "connect", PQerrorMessage(c->pg));
        conn_free(c);
        return SNK_ECONNECT;
    }

    memcpy(c->schema, schema, strlen(schema) + 1);
    c->schema_q = PQescapeIdentifier(c->pg, schema, strlen(schema));
    if (!c->schema_q) {
        store_err(open_err, sizeof open_err, c->secret, "snk_open", PQerrorMessage(c->pg));
        conn_free(c);
        return SNK_ENOMEM;
    }

    /* Timestamps are sent with an explicit +00 offset; a UTC session makes
     * anything the server renders or computes (now(), casts) UTC as well. */
    int rc = exec_cmd(c, "session setup", "SET TIME ZONE 'UTC'", PGRES_COMMAND_OK);
    if (rc < 0) {
        store_err(open_err, sizeof open_err, NULL, NULL, c->err);
        conn_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Migration                                                                */
/* ------------------------------------------------------------------------ */

/* Appends "DROP TABLE IF EXISTS" for every staging table, so that a
 * migration that changes a table also changes the shape of its stage. */
static void sql_drop_stages(sbuf_t *b)
{
    for (int t = 0; t < T__COUNT; t++) {
        sb_puts(b, "DROP TABLE IF EXISTS pg_temp.");
        sb_puts(b, TABLES[t].stage);
        sb_puts(b, ";");
    }
}

int snk_migrate(snk_conn_t *c)
{
    if (!c)
        return SNK_EINVAL;
    c->err[0] = '\0';
    c->sqlstate[0] = '\0'; /* snk_transient reads this migration's failure only */
    if (!snk_ok(c)) {
        set_err(c, "snk_migrate", "the connection is not usable");
        return SNK_ECONNECT;
    }
    int rc = exec_cmd(c, "BEGIN", "BEGIN", PGRES_COMMAND_OK);
    if (rc < 0)
        return fail_tx(c, rc);

    /* Concurrent daemons would otherwise race on CREATE and on the version
     * rows; the lock ends with the transaction. */
    rc = exec_cmd(c, "advisory lock", "SELECT pg_advisory_xact_lock(" MIGRATE_LOCK_KEY ")",
                  PGRES_TUPLES_OK);
    if (rc < 0)
        return fail_tx(c, rc);

    /* A migration may rebuild indexes on large tables: a statement timeout set
     * for the role must not cancel it halfway, every time. Its exclusive locks,
     * though, must not queue every query on the tables behind a long analyst
     * query for ever: after 10 s it gives up (SQLSTATE 55P03, snk_transient)
     * and the caller tries again later. Both end with the transaction. */
    rc = exec_cmd(c, "migration timeouts",
                  "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '10s'",
                  PGRES_COMMAND_OK);
    if (rc < 0)
        return fail_tx(c, rc);

    /* CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege on the
     * database, which a role that only owns an existing schema may lack, so
     * the schema is created only when it is really missing. */
    const char *params[1] = {c->schema};
    PGresult *res = PQexecParams(c->pg, "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
                                 1, NULL, params, NULL, NULL, 0);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = fail_res(c, "look up schema", res);
        PQclear(res);
        return fail_tx(c, rc);
    }
    int have_schema = PQntuples(res) > 0;
    PQclear(res);
    if (!have_schema && (rc = exec_tmpl(c, "create schema", "CREATE SCHEMA IF NOT EXISTS {S}")) < 0)
        return fail_tx(c, rc);

    rc = exec_tmpl(c, "create schema_version", SCHEMA_VERSION_SQL);
    if (rc < 0)
        return fail_tx(c, rc);

    c->sql.len = 0;
    sb_sql(&c->sql, "SELECT version FROM {S}.schema_version", c->schema_q);
    const char *sqlp = sb_cstr(&c->sql);
    if (!sqlp)
        return fail_tx(c, SNK_ENOMEM);
    res = PQexec(c->pg, sqlp);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = fail_res(c, "read schema_version", res);
        PQclear(res);
        return fail_tx(c, rc);
    }
    size_t nmig = sizeof MIGRATIONS / sizeof MIGRATIONS[0];
    unsigned char applied[sizeof MIGRATIONS / sizeof MIGRATIONS[0]] = {0};
    for (int r = 0; r < PQntuples(res); r++) {
        int v = atoi(PQgetvalue(res, r, 0));
        for (size_t m = 0; m < nmig; m++)
            if (MIGRATIONS[m].version == v)
                applied[m] = 1;
    }
    PQclear(res);

    int changed = 0;
    for (size_t m = 0; m < nmig; m++) {
        if (applied[m])
            continue;
        char step[48];
        snprintf(step, sizeof step, "migration %d", MIGRATIONS[m].version);
        c->sql.len = 0;
        sb_sql(&c->sql, MIGRATIONS[m].sql, c->schema_q);
        char ins[96];
        snprintf(ins, sizeof ins, ";INSERT INTO {S}.schema_version (version) VALUES (%d)",
                 MIGRATIONS[m].version);
        sb_sql(&c->sql, ins, c->schema_q);
        if ((rc = exec_cmd(c, step, sb_cstr(&c->sql), PGRES_COMMAND_OK)) < 0)
            return fail_tx(c, rc);
        changed = 1;
    }
    if (changed && c->staged) {
        c->sql.len = 0;
        sql_drop_stages(&c->sql);
        if ((rc = exec_cmd(c, "drop staging tables", sb_cstr(&c->sql), PGRES_COMMAND_OK)) < 0)
            return fail_tx(c, rc);
    }
    if ((rc = commit(c)) < 0)
        return fail_tx(c, rc);
    if (changed)
        c->staged = 0;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Flush                                                                    */
/* ------------------------------------------------------------------------ */

static void sql_cols(sbuf_t *b, const table_spec_t *t, const char *prefix, size_t from, size_t to)
{
    for (size_t k = from; k < to; k++) {
        if (k > from)
            sb_puts(b, ", ");
        sb_puts(b, prefix);
        sb_puts(b, t->cols[k]);
    }
}

/*
 * Reads the column types of the staging tables, which binary COPY must match
 * exactly (a bigint is 8 bytes, an int 4). They come from the server rather
 * than from a list here, so a target column's type is the only place a type
 * is written down.
 */
static int load_stage_types(snk_conn_t *c)
{
    static const char *step = "read staging column types";
    for (int i = 0; i < T__COUNT; i++)
        if (TABLES[i].ncols > MAX_COLS) {
            set_err(c, step, "a staging table has more columns than MAX_COLS");
            return SNK_EINVAL;
        }
    memset(c->types, 0, sizeof c->types);
    PGresult *res = PQexec(c->pg, "SELECT c.relname, a.attnum, a.atttypid FROM "
                                  "pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON "
                                  "c.oid = a.attrelid WHERE c.relnamespace = "
                                  "pg_catalog.pg_my_temp_schema() AND c.relname LIKE "
                                  "'cm\\_stage\\_%' AND a.attnum > 0 AND NOT a.attisdropped");
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        int rc = fail_res(c, step, res);
        PQclear(res);
        return rc;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        const char *rel = PQgetvalue(res, r, 0);
        long col = strtol(PQgetvalue(res, r, 1), NULL, 10);
        unsigned long oid = strtoul(PQgetvalue(res, r, 2), NULL, 10);
        for (int i = 0; i < T__COUNT; i++)
            if (strcmp(rel, TABLES[i].stage) == 0 && col >= 1 && col <= (long)TABLES[i].ncols)
                c->types[i][col - 1] = (uint32_t)oid;
    }
    PQclear(res);
    for (int i = 0; i < T__COUNT; i++)
        for (size_t k = 0; k < TABLES[i].ncols; k++)
            if (c->types[i][k] == 0) {
                char msg[160];
                snprintf(msg, sizeof msg, "no type for column %s of %s", TABLES[i].cols[k],
                         TABLES[i].stage);
                set_err(c, step, msg);
                return SNK_EQUERY;
            }
    return 0;
}

/*
 * Creates the staging tables once per session. They are temporary tables
 * with ON COMMIT DELETE ROWS, so every flush starts with them empty (a
 * rollback empties them too) and the catalog is not churned by creating and
 * dropping seven tables per flush. CREATE TABLE AS ... WITH NO DATA copies
 * the column types of the target and none of its constraints, which lets
 * partitions be staged without flushed_at.
 */
static int create_stages(snk_conn_t *c)
{
    sbuf_t *b = &c->sql;
    b->len = 0;
    for (int i = 0; i < T__COUNT; i++) {
        const table_spec_t *t = &TABLES[i];
        if (t->kind == APPLY_DIRECT)
            continue;
        sb_puts(b, "CREATE TEMP TABLE IF NOT EXISTS pg_temp.");
        sb_puts(b, t->stage);
        sb_puts(b, " ON COMMIT DELETE ROWS AS SELECT ");
        sql_cols(b, t, "", 0, t->ncols);
        sb_puts(b, " FROM ");
        sb_puts(b, c->schema_q);
        sb_putc(b, '.');
        sb_puts(b, t->table);
        sb_puts(b, " WITH NO DATA;");
    }
    int rc = exec_cmd(c, "create staging tables", sb_cstr(b), PGRES_COMMAND_OK);
    return rc ? rc : load_stage_types(c);
}

/* Sends the buffered COPY data to the server and empties the buffer. */
static int copy_send(snk_conn_t *c, const char *step)
{
    if (c->data.len == 0)
        return 0;
    if (c->data.len > (size_t)0x7fffffff) {
        set_err(c, step, "COPY chunk too large");
        return SNK_EQUERY;
    }
    if (PQputCopyData(c->pg, c->data.p, (int)c->data.len) != 1) {
        set_err(c, step, PQerrorMessage(c->pg));
        return PQstatus(c->pg) == CONNECTION_OK ? SNK_EQUERY : SNK_ECONNECT;
    }
    c->data.len = 0;
    return 0;
}

/*
 * Reads the results that follow a COPY until libpq has none left, keeping
 * the first error; the connection is idle (in the transaction) afterwards.
 * With `record` clear the caller already holds the real cause (the COPY was
 * aborted on purpose), so the server's echo of the abort is not stored.
 */
static int copy_finish(snk_conn_t *c, const char *step, int record)
{
    int rc = 0;
    PGresult *res;
    while ((res = PQgetResult(c->pg)) != NULL) {
        ExecStatusType st = PQresultStatus(res);
        if (rc == 0 && st != PGRES_COMMAND_OK)
            rc = record ? fail_res(c, step, res) : SNK_EQUERY;
        PQclear(res);
        /* A result still in COPY_IN state means the end message was not
         * accepted; without this the loop would never end. */
        if (st == PGRES_COPY_IN || st == PGRES_COPY_BOTH)
            break;
    }
    if (rc == 0 && PQstatus(c->pg) != CONNECTION_OK)
        rc = record ? fail_res(c, step, NULL) : SNK_ECONNECT;
    return rc;
}

/* The binary COPY header: signature, flags, header extension length. */
static const char COPY_SIGNATURE[11] = {'P',  'G',        'C',  'O',  'P', 'Y',
                                        '\n', (char)0xFF, '\r', '\n', 0};

/*
 * Renders row i as a binary COPY tuple (field count, then the fields) if
 * `fn` accepts it: 1 if it did, 0 if the row belongs elsewhere (nothing is
 * left in the buffer), or a negative SNK_* code.
 */
static int copy_row(snk_conn_t *c, cw_t *w, const char *step, const void *rows, size_t i, row_fn fn)
{
    size_t at = w->b->len;
    sb_be16(w->b, (uint16_t)w->ncols);
    w->col = 0;
    if (!fn(w, rows, i)) {
        w->b->len = at;
        return 0;
    }
    if (!w->bad && w->col != w->ncols)
        w->bad = "fewer fields than columns";
    if (w->bad) {
        char msg[200];
        snprintf(msg, sizeof msg, "column %zu: %s", w->col, w->bad);
        set_err(c, step, msg);
        return SNK_EQUERY;
    }
    if (w->b->oom) {
        set_err(c, step, "out of memory");
        return SNK_ENOMEM;
    }
    return 1;
}

/*
 * COPYs the rows that `fn` accepts into the stage of t (binary format), in
 * chunks of about COPY_CHUNK bytes. Returns the number of rows sent
 * (possibly 0, in which case no COPY was started) or a negative SNK_* code.
 */
static int64_t copy_rows(snk_conn_t *c, int which, const void *rows, size_t n, row_fn fn)
{
    const table_spec_t *t = &TABLES[which];
    int direct = t->kind == APPLY_DIRECT;
    char step[64];
    snprintf(step, sizeof step, "COPY %s", direct ? t->table : t->stage);
    cw_t w = {&c->data, c->types[which], t->ncols, 0, NULL};

    /* Render rows until the first one that belongs here before starting the
     * COPY, so that a list whose rows all go elsewhere costs no round trip. */
    c->data.len = 0;
    c->data.oom = 0;
    sb_put(&c->data, COPY_SIGNATURE, sizeof COPY_SIGNATURE);
    sb_be32(&c->data, 0);
    sb_be32(&c->data, 0);
    size_t i = 0;
    int64_t sent = 0;
    int rc = 0;
    for (; i < n && sent == 0 && rc == 0; i++)
        sent += (rc = copy_row(c, &w, step, rows, i, fn)) > 0;
    if (rc < 0 || sent == 0) {
        c->data.len = 0;
        return rc;
    }

    sbuf_t *b = &c->sql;
    b->len = 0;
    if (direct) {
        sb_puts(b, "COPY ");
        sb_puts(b, c->schema_q);
        sb_putc(b, '.');
        sb_puts(b, t->table);
    } else {
        sb_puts(b, "COPY pg_temp.");
        sb_puts(b, t->stage);
    }
    sb_puts(b, " (");
    sql_cols(b, t, "", 0, t->ncols);
    sb_puts(b, ") FROM STDIN (FORMAT binary)");
    const char *sql = sb_cstr(b);
    if (!sql) {
        set_err(c, step, "out of memory");
        return SNK_ENOMEM;
    }
    PGresult *res = PQexec(c->pg, sql);
    if (!res || PQresultStatus(res) != PGRES_COPY_IN) {
        rc = fail_res(c, step, res);
        PQclear(res);
        return rc;
    }
    PQclear(res);

    rc = 0;
    for (; i < n; i++) {
        int one = copy_row(c, &w, step, rows, i, fn);
        if (one < 0) {
            rc = one;
            break;
        }
        sent += one;
        if (c->data.len >= COPY_CHUNK && (rc = copy_send(c, step)) < 0)
            break;
    }
    if (rc == 0) {
        sb_be16(&c->data, 0xFFFFu); /* the trailer: a field count of -1 */
        rc = c->data.oom ? (set_err(c, step, "out of memory"), SNK_ENOMEM) : copy_send(c, step);
    }

    /* Ending the COPY with an error message makes the server abort it, so a
     * local failure never leaves half a list staged as if it were whole. */
    if (PQputCopyEnd(c->pg, rc == 0 ? NULL : "clickmart sink aborted the COPY") != 1 && rc == 0) {
        set_err(c, step, PQerrorMessage(c->pg));
        rc = PQstatus(c->pg) == CONNECTION_OK ? SNK_EQUERY : SNK_ECONNECT;
    }
    int frc = copy_finish(c, step, rc == 0);
    if (rc == 0)
        rc = frc;
    c->data.len = 0;
    return rc < 0 ? rc : sent;
}

/* Builds the statement that applies the staged rows of t to its table. */
static const char *sql_apply(snk_conn_t *c, const table_spec_t *t)
{
    sbuf_t *b = &c->sql;
    b->len = 0;
    if (t->kind == APPLY_DELETE) {
        sb_puts(b, "DELETE FROM ");
        sb_puts(b, c->schema_q);
        sb_putc(b, '.');
        sb_puts(b, t->table);
        if (t->nkey == 1) {
            /* "= ANY (ARRAY(...))" makes the planner probe the primary key
             * for each staged id instead of considering a scan of the whole
             * table for a stage it has no statistics about. */
            sb_puts(b, " WHERE ");
            sb_puts(b, t->cols[0]);
            sb_puts(b, " = ANY (ARRAY(SELECT ");
            sb_puts(b, t->cols[0]);
            sb_puts(b, " FROM pg_temp.");
            sb_puts(b, t->stage);
            sb_puts(b, "))");
        } else {
            sb_puts(b, " t USING pg_temp.");
            sb_puts(b, t->stage);
            sb_puts(b, " d WHERE ");
            for (size_t k = 0; k < t->nkey; k++) {
                if (k)
                    sb_puts(b, " AND ");
                sb_puts(b, "t.");
                sb_puts(b, t->cols[k]);
                sb_puts(b, " = d.");
                sb_puts(b, t->cols[k]);
            }
        }
        return sb_cstr(b);
    }

    /* A row a flush sends again unchanged (a user's exposure when only their
     * outcomes moved, a product row whose day total stayed) is left alone:
     * the WHERE below skips the new row version, its WAL and index entries,
     * which made such an update about 2.3 times cheaper (docs/sink.md). The
     * partitions table is exempt: its flushed_at is meant to move. */
    int guard = t->kind == APPLY_UPSERT && !t->extra_col && t->ncols > t->nkey;
    sb_puts(b, "INSERT INTO ");
    sb_puts(b, c->schema_q);
    sb_putc(b, '.');
    sb_puts(b, t->table);
    if (guard)
        sb_puts(b, " AS t");
    sb_puts(b, " (");
    sql_cols(b, t, "", 0, t->ncols);
    if (t->extra_col) {
        sb_puts(b, ", ");
        sb_puts(b, t->extra_col);
    }
    sb_puts(b, ") SELECT ");
    sql_cols(b, t, "", 0, t->ncols);
    if (t->extra_col) {
        sb_puts(b, ", ");
        sb_puts(b, t->extra_expr);
    }
    sb_puts(b, " FROM pg_temp.");
    sb_puts(b, t->stage);
    /* Rows in key order reach the primary key's B-tree leaf by leaf instead of
     * at random: on a flush of ~100 k new sessions this cut the statement's
     * time by about a fifth, the sort included (docs/sink.md). */
    sb_puts(b, " ORDER BY ");
    sql_cols(b, t, "", 0, t->nkey);
    sb_puts(b, " ON CONFLICT (");
    sql_cols(b, t, "", 0, t->nkey);
    if (t->kind == APPLY_INSERT_ONLY) {
        sb_puts(b, ") DO NOTHING");
        return sb_cstr(b);
    }
    sb_puts(b, ") DO UPDATE SET ");
    for (size_t k = t->nkey; k < t->ncols; k++) {
        if (k > t->nkey)
            sb_puts(b, ", ");
        sb_puts(b, t->cols[k]);
        sb_puts(b, " = EXCLUDED.");
        sb_puts(b, t->cols[k]);
    }
    if (t->extra_col) {
        sb_puts(b, ", ");
        sb_puts(b, t->extra_col);
        sb_puts(b, " = EXCLUDED.");
        sb_puts(b, t->extra_col);
    }
    if (guard) {
        sb_puts(b, " WHERE (");
        sql_cols(b, t, "t.", t->nkey, t->ncols);
        sb_puts(b, ") IS DISTINCT FROM (");
        sql_cols(b, t, "EXCLUDED.", t->nkey, t->ncols);
        sb_putc(b, ')');
    }
    return sb_cstr(b);
}

/* Stages one list and applies it; an empty list costs nothing. */
static int stage_apply(snk_conn_t *c, int which, const void *rows, size_t n, row_fn fn)
{
    if (n == 0)
        return 0;
    const table_spec_t *t = &TABLES[which];
    int64_t sent = copy_rows(c, which, rows, n, fn);
    if (sent > 0 && t->kind != APPLY_DIRECT)
        c->staged_mask |= (uint64_t)1 << which;
    if (sent <= 0 || t->kind == APPLY_DIRECT)
        return sent < 0 ? (int)sent : 0;
    char step[96];
    if (t->kind == APPLY_DELETE && t->nkey > 1) {
        /* The delete joins the stage with its table on a composite key. A
         * staging table has no statistics, so the planner took it for about
         * a thousand rows and hashed the whole target table for every flush
         * that deleted anything: 15 ms for 4 of 40 000 user_outcomes rows,
         * growing with the table. Analysed (well under a millisecond for a
         * few rows), it probes the primary key for each staged key, and
         * still hashes when a flush deletes many. */
        snprintf(step, sizeof step, "analyze %s", t->stage);
        sbuf_t *b = &c->sql;
        b->len = 0;
        sb_puts(b, "ANALYZE pg_temp.");
        sb_puts(b, t->stage);
        int rc = exec_cmd(c, step, sb_cstr(b), PGRES_COMMAND_OK);
        if (rc)
            return rc;
    }
    snprintf(step, sizeof step, "%s %s", t->kind == APPLY_DELETE ? "delete from" : "write",
             t->table);
    return exec_cmd(c, step, sql_apply(c, t), PGRES_COMMAND_OK);
}

/*
 * One attempt at writing the batch in one transaction. With `direct` the
 * session rows marked is_new are COPYed into the table itself, which skips
 * the staging table and the upsert's conflict check: on the bench's flushes
 * of ~36 000 new sessions into ~330 000 that took 215-269 ms against
 * 371-467 ms (docs/sink.md). *conflict tells whether such a row was already
 * there.
 */
/* Begins a transaction. No part is open: every way out of a transaction
 * (tx_fail, tx_commit) clears parts and staged_mask. */
static int tx_begin(snk_conn_t *c)
{
    /* A transaction left open by an earlier failure would swallow this one. */
    if (PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
        PGresult *res = PQexec(c->pg, "ROLLBACK");
        PQclear(res);
    }
    int rc = exec_cmd(c, "BEGIN", "BEGIN", PGRES_COMMAND_OK);
    if (rc == 0 && !c->staged)
        rc = create_stages(c);
    return rc;
}

/* The open transaction failed with rc: roll it back, parts and all. */
static int tx_fail(snk_conn_t *c, int rc)
{
    /* The next flush re-runs the (IF NOT EXISTS) creation of the staging
     * tables: it costs one statement and recovers from whatever may have
     * removed them from the session (a DISCARD by a pooler, say). */
    c->staged = 0;
    c->parts = 0;
    c->staged_mask = 0;
    return fail_tx(c, rc);
}

/* Empties the staging tables an earlier part of the open transaction
 * filled: ON COMMIT DELETE ROWS empties them only at the commit. One
 * statement for all of them. */
static int stages_empty(snk_conn_t *c)
{
    if (!c->staged_mask)
        return 0;
    sbuf_t *b = &c->sql;
    b->len = 0;
    sb_puts(b, "TRUNCATE ");
    int first = 1;
    for (int i = 0; i < T__COUNT; i++) {
        if (!(c->staged_mask & ((uint64_t)1 << i)))
            continue;
        if (!first)
            sb_puts(b, ", ");
        first = 0;
        sb_puts(b, "pg_temp.");
        sb_puts(b, TABLES[i].stage);
    }
    int rc = exec_cmd(c, "empty the staging tables", sb_cstr(b), PGRES_COMMAND_OK);
    if (rc == 0)
        c->staged_mask = 0;
    return rc;
}

/* stage_apply of a direct COPY (APPLY_DIRECT). A unique_violation means
 * that Postgres already holds a row this flush took for new, written by a
 * flush whose commit the state never recorded: *conflict is then set. */
static int direct_apply(snk_conn_t *c, int which, const void *rows, size_t n, row_fn fn,
                        int *conflict)
{
    int rc = stage_apply(c, which, rows, n, fn);
    if (rc == SNK_EQUERY && strcmp(c->sqlstate, "23505") == 0)
        *conflict = 1;
    return rc;
}

/* Writes the batch's rows into the open transaction (see flush_tx). */
static int tx_write(snk_conn_t *c, const snk_batch_t *b, int direct, int *conflict)
{
    *conflict = 0;
    c->sqlstate[0] = '\0';
    int rc = stages_empty(c);
    if (rc)
        return rc;
    rc = stage_apply(c, T_SESSIONS_DEL, b->deleted_sessions, b->n_deleted_sessions,
                     row_deleted_session);
    if (rc == 0)
        rc = stage_apply(c, T_SESSIONS, b->sessions, b->n_sessions,
                         direct ? row_session_known : row_session);
    if (rc == 0 && direct)
        rc = direct_apply(c, T_SESSIONS_NEW, b->sessions, b->n_sessions, row_session_new, conflict);
    if (rc == 0)
        rc = stage_apply(c, T_USERS, b->users, b->n_users, direct ? row_user_known : row_user);
    if (rc == 0 && direct)
        rc = direct_apply(c, T_USERS_NEW, b->users, b->n_users, row_user_new, conflict);
    if (rc == 0)
        rc = stage_apply(c, T_FUNNEL_DEL, b->funnel, b->n_funnel, row_funnel_zero);
    if (rc == 0)
        rc = stage_apply(c, T_FUNNEL, b->funnel, b->n_funnel, row_funnel);
    if (rc == 0)
        rc = stage_apply(c, T_PARTITIONS, b->partitions, b->n_partitions, row_partition);
    if (rc == 0)
        rc = stage_apply(c, T_REJECTS, b->rejects, b->n_rejects, row_reject);
    for (int g = 0; rc == 0 && g < SNK_TABLE__COUNT; g++) {
        const snk_rows_t *r = &b->gen[g];
        const table_spec_t *tu = &TABLES[T_GEN_UP(g)];
        gen_rows_t del = {tu->types, tu->nkey, r->del_keys};
        gen_pair_t up = {
            {tu->types, tu->ncols, r->vals}, {tu->types, tu->ncols, r->new_vals}, r->n};
        rc = stage_apply(c, T_GEN_DEL(g), &del, r->n_del, row_generic);
        if (rc == 0)
            rc =
                stage_apply(c, T_GEN_UP(g), &up, direct ? r->n : r->n + r->n_new, row_generic_pair);
        if (rc == 0 && direct)
            rc = direct_apply(c, T_GEN_NEW(g), &up.then, r->n_new, row_generic, conflict);
    }
    return rc;
}

/* Commits the open transaction; on failure rolls it back. */
static int tx_commit(snk_conn_t *c, int rc)
{
    if (rc == 0 && c->gate && c->gate(c->gate_arg) != 0) {
        set_err(c, "commit", "the commit gate refused: the flush was rolled back");
        rc = SNK_EGATE;
    }
    if (rc == 0)
        rc = commit(c);
    if (rc < 0)
        return tx_fail(c, rc);
    /* Only a committed flush proves that the staging tables exist. */
    c->staged = 1;
    c->parts = 0;
    c->staged_mask = 0;
    return 0;
}

static int flush_tx(snk_conn_t *c, const snk_batch_t *b, int direct, int *conflict)
{
    *conflict = 0;
    int rc = tx_begin(c);
    if (rc == 0)
        rc = tx_write(c, b, direct, conflict);
    return tx_commit(c, rc);
}

/*
 * Keys must be unique within each list of a batch: an upsert cannot touch
 * one row twice, so a repeated key fails the flush with SNK_EQUERY ("ON
 * CONFLICT DO UPDATE command cannot affect row a second time") instead of
 * silently picking one of the rows. Deleted ids and rejects may repeat.
 * The callers have checked that c is not NULL.
 */
static int check_batch(snk_conn_t *c, const snk_batch_t *b, size_t *total)
{
    if (!b)
        return SNK_EINVAL;
    c->err[0] = '\0';
    if (!snk_ok(c)) {
        set_err(c, "snk_flush", "the connection is not usable");
        return SNK_ECONNECT;
    }
    if ((b->n_sessions && !b->sessions) || (b->n_deleted_sessions && !b->deleted_sessions) ||
        (b->n_users && !b->users) || (b->n_funnel && !b->funnel) ||
        (b->n_partitions && !b->partitions) || (b->n_rejects && !b->rejects)) {
        set_err(c, "snk_flush", "a batch list has rows but no array");
        return SNK_EINVAL;
    }
    size_t n_gen = 0;
    for (int g = 0; g < SNK_TABLE__COUNT; g++) {
        if ((b->gen[g].n && !b->gen[g].vals) || (b->gen[g].n_del && !b->gen[g].del_keys) ||
            (b->gen[g].n_new && !b->gen[g].new_vals)) {
            set_err(c, "snk_flush", "a batch list has rows but no array");
            return SNK_EINVAL;
        }
        n_gen += b->gen[g].n + b->gen[g].n_del + b->gen[g].n_new;
    }
    *total = b->n_sessions + b->n_deleted_sessions + b->n_users + b->n_funnel + b->n_partitions +
             b->n_rejects + n_gen;
    return 0;
}

/* Rolls back the open parts, if any, keeping the error message. */
static void parts_rollback(snk_conn_t *c)
{
    if (c && c->parts)
        tx_fail(c, 0);
}

int snk_flush_part(snk_conn_t *c, const snk_batch_t *b)
{
    if (!c)
        return SNK_EINVAL;
    size_t total;
    int rc = check_batch(c, b, &total);
    if (rc) {
        parts_rollback(c); /* no part stays open after an error */
        return rc;
    }
    if (c->parts == 0 && (rc = tx_begin(c)) != 0)
        return tx_fail(c, rc);
    int conflict;
    if ((rc = tx_write(c, b, 1, &conflict)) != 0)
        return tx_fail(c, conflict ? SNK_ERESTART : rc);
    c->parts++;
    return 0;
}

int snk_flush_parts(const snk_conn_t *c)
{
    return c ? c->parts : 0;
}

void snk_flush_discard(snk_conn_t *c)
{
    if (c && c->parts) {
        c->err[0] = '\0';
        parts_rollback(c);
    }
}

int snk_flush_gated(snk_conn_t *c, const snk_batch_t *b, snk_gate_fn gate, void *arg)
{
    if (!c)
        return SNK_EINVAL;
    c->gate = gate;
    c->gate_arg = arg;
    int rc = snk_flush(c, b);
    c->gate = NULL;
    c->gate_arg = NULL;
    return rc;
}

int snk_flush(snk_conn_t *c, const snk_batch_t *b)
{
    if (!c)
        return SNK_EINVAL;
    size_t total;
    int rc = check_batch(c, b, &total);
    if (rc) {
        parts_rollback(c); /* the parts are rolled back on any error */
        return rc;
    }
    int conflict;
    if (c->parts) {
        /* The final part: it commits the parts written ahead with it. A row
         * taken for new that Postgres already held cannot be redone here,
         * since the parts' rows are rolled back with the transaction. */
        rc = tx_write(c, b, 1, &conflict);
        return tx_commit(c, rc && conflict ? SNK_ERESTART : rc);
    }
    if (total == 0)
        return 0;

    rc = flush_tx(c, b, 1, &conflict);
    if (rc == SNK_EQUERY && conflict) {
        /* Rows are absolute values, so upserting every session writes the
         * same result; nothing of the first attempt was kept. */
        c->redone++;
        c->err[0] = '\0';
        rc = flush_tx(c, b, 0, &conflict);
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Small accessors                                                          */
/* ------------------------------------------------------------------------ */

int snk_topic_progress(snk_conn_t *c, const char *topic, int64_t *n_partitions,
                       int64_t *max_next_offset)
{
    if (!c || !topic)
        return SNK_EINVAL;
    c->err[0] = '\0';
    c->sql.len = 0;
    sb_sql(&c->sql,
           "SELECT count(*), coalesce(max(next_offset), 0) FROM {S}.partitions WHERE topic = $1",
           c->schema_q);
    const char *sql = sb_cstr(&c->sql);
    if (!sql)
        return SNK_ENOMEM;
    const char *params[1] = {topic};
    PGresult *res = PQexecParams(c->pg, sql, 1, NULL, params, NULL, NULL, 0);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        int rc = fail_res(c, "read partitions", res);
        PQclear(res);
        return rc;
    }
    *n_partitions = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    *max_next_offset = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    PQclear(res);
    return 0;
}

int snk_truncate_marts(snk_conn_t *c)
{
    if (!c)
        return SNK_EINVAL;
    c->err[0] = '\0';
    /* One statement, so the tables are emptied together or not at all. */
    int rc = exec_tmpl(c, "truncate marts",
                       "TRUNCATE {S}.sessions, {S}.users, {S}.funnel_daily, {S}.partitions,"
                       " {S}.rejected_events, {S}.product_daily, {S}.product_pairs,"
                       " {S}.basket_daily, {S}.cohort_retention, {S}.user_exposure,"
                       " {S}.user_outcomes, {S}.experiments, {S}.experiment_results,"
                       " {S}.experiment_regression");
    return rc;
}

uint64_t snk_flush_redone(const snk_conn_t *c)
{
    return c ? c->redone : 0;
}

int snk_ok(const snk_conn_t *c)
{
    return c && c->pg && !c->broken && PQstatus(c->pg) == CONNECTION_OK;
}

const char *snk_last_error(const snk_conn_t *c)
{
    return c ? c->err : open_err;
}

int snk_transient(const snk_conn_t *c)
{
    if (!c || c->broken)
        return 1;
    const char *st = c->sqlstate;
    if (!st[0])
        return 0;
    return strncmp(st, "08", 2) == 0 || strncmp(st, "40", 2) == 0 || strncmp(st, "53", 2) == 0 ||
           strncmp(st, "57", 2) == 0 || strcmp(st, "55P03") == 0 || strcmp(st, "25006") == 0;
}

void snk_close(snk_conn_t *c)
{
    conn_free(c);
}

const char *snk_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case SNK_ECONNECT:
        return "could not connect to Postgres, or the connection broke";
    case SNK_EQUERY:
        return "a Postgres statement failed";
    case SNK_ENOMEM:
        return "out of memory";
    case SNK_EINVAL:
        return "invalid argument";
    case SNK_ERESTART:
        return "a row taken for new was already in Postgres; the parts written ahead were rolled "
               "back, write the flush again whole";
    case SNK_EGATE:
        return "the flush's commit gate refused; nothing was written";
    default:
        return "unknown sink error";
    }
}

/* ------------------------------------------------------------------------ */
/* Conninfo redaction                                                       */
/* ------------------------------------------------------------------------ */

/* A bounded writer that always leaves room for the terminating NUL. */
typedef struct bw {
    char *p;
    size_t cap, len;
} bw_t;

static void bw_put(bw_t *w, const char *s, size_t n)
{
    while (n-- > 0 && w->len + 1 < w->cap)
        w->p[w->len++] = *s++;
}

/* The keywords whose values are secrets: the server password and the
 * passphrase of the client's SSL key. */
static int secret_key(const char *k, size_t n)
{
    return (n == 8 && memcmp(k, "password", 8) == 0) ||
           (n == 11 && memcmp(k, "sslpassword", 11) == 0);
}

static int is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
}

/*
 * Redacts a postgresql:// or postgres:// URI: the password of the
 * user-info part and any password= / sslpassword= query parameter. The
 * user-info is taken to end at the last '@' before the query, which covers
 * libpq's reading (the first '@' before any '/') and errs on the side of
 * hiding more when the two differ.
 */
static void redact_uri(bw_t *w, const char *s, size_t scheme_len)
{
    const char *end = s + strlen(s);
    const char *q = strchr(s, '?');
    const char *auth = s + scheme_len;
    const char *lim = q ? q : end;
    const char *at = NULL;
    for (const char *p = auth; p < lim; p++)
        if (*p == '@')
            at = p;
    bw_put(w, s, (size_t)(auth - s));
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        if (colon) {
            bw_put(w, auth, (size_t)(colon + 1 - auth));
            bw_put(w, "***", 3);
        } else {
            bw_put(w, auth, (size_t)(at - auth));
        }
        bw_put(w, at, (size_t)(lim - at));
    } else {
        bw_put(w, auth, (size_t)(lim - auth));
    }
    if (!q)
        return;
    bw_put(w, "?", 1);
    for (const char *p = q + 1; p < end;) {
        const char *amp = strchr(p, '&');
        const char *pe = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(pe - p));
        if (eq && secret_key(p, (size_t)(eq - p))) {
            bw_put(w, p, (size_t)(eq + 1 - p));
            bw_put(w, "***", 3);
        } else {
            bw_put(w, p, (size_t)(pe - p));
        }
        if (amp)
            bw_put(w, "&", 1);
        p = amp ? amp + 1 : end;
    }
}

/*
 * Redacts a key=value connection string, following libpq's own grammar
 * (conninfo_parse): keywords and values separated by '=' with optional
 * blanks around it, values bare (backslash escapes the next character) or
 * single-quoted (backslash escapes inside too). Everything else is copied
 * as written. If the string does not parse, the rest of it is hidden, since
 * there is no telling where a password would end.
 */
static void redact_kv(bw_t *w, const char *s)
{
    const char *p = s;
    while (*p) {
        const char *seg = p;
        while (is_space(*p))
            p++;
        if (!*p) {
            bw_put(w, seg, (size_t)(p - seg));
            return;
        }
        const char *key = p;
        while (*p && *p != '=' && !is_space(*p))
            p++;
        size_t klen = (size_t)(p - key);
        while (is_space(*p))
            p++;
        if (*p != '=') {
            bw_put(w, seg, (size_t)(key - seg));
            bw_put(w, "***", 3);
            return;
        }
        p++;
        while (is_space(*p))
            p++;
        const char *val = p;
        if (*p == '\'') {
            p++;
            while (*p && *p != '\'') {
                if (*p == '\\' && p[1])
                    p++;
                p++;
            }
            if (*p != '\'') {
                bw_put(w, seg, (size_t)(val - seg));
                bw_put(w, "***", 3);
                return;
            }
            p++;
        } else {
            while (*p && !is_space(*p)) {
                if (*p == '\\' && p[1])
                    p++;
                p++;
            }
        }
        bw_put(w, seg, (size_t)(val - seg));
        if (secret_key(key, klen))
            bw_put(w, "***", 3);
        else
            bw_put(w, val, (size_t)(p - val));
    }
}

void snk_redact_conninfo(const char *conninfo, char *out, size_t cap)
{
    if (!out || cap == 0)
        return;
    bw_t w = {out, cap, 0};
    if (conninfo) {
        if (strncmp(conninfo, "postgresql://", 13) == 0)
            redact_uri(&w, conninfo, 13);
        else if (strncmp(conninfo, "postgres://", 11) == 0)
            redact_uri(&w, conninfo, 11);
        else
            redact_kv(&w, conninfo);
    }
    out[w.len] = '\0';
}
