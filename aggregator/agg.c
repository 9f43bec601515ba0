/*
 * agg.c - exact incremental sessions, users and funnel_daily. See agg.h and
 * docs/aggregator.md.
 *
 * Sessions are kept as summaries keyed by (user, start ts). A summary is a
 * monoid: two sessions merge by adding their counters and taking the
 * earliest (ts, event_id) for the session id, the device and the country.
 * Because events are only ever added, a new event can only extend one
 * session, start a new one, or bridge two neighbours into one, and those
 * neighbours are found with one cursor seek: the cost of an event does not
 * depend on how many events its user has.
 */
#include "aggregator/agg.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "aggregator/stats.h"
#include "daemon/heap.h"
#include "daemon/util.h"

#define DAY_MS 86400000LL
#define TS_NONE INT64_MAX
#define KEY_MAX 400
#define REC_MAX 1200

/* ---------------------------------------------------------------------- */
/* Byte encoding helpers: big-endian in keys so that LMDB orders them.     */

/* Room for one more element of a growable array (doubling; returns AGG_ENOMEM). */
#define GROW(arr, n, cap)                                                                          \
    do {                                                                                           \
        if ((n) == (cap)) {                                                                        \
            size_t nc_ = (cap) ? (cap)*2 : 256;                                                    \
            void *np_ = realloc((arr), nc_ * sizeof *(arr));                                       \
            if (!np_)                                                                              \
                return AGG_ENOMEM;                                                                 \
            (arr) = np_;                                                                           \
            (cap) = nc_;                                                                           \
        }                                                                                          \
    } while (0)

/* Room for `need` bytes in a growable byte buffer (doubling from 1 MiB). */
static int bytes_reserve(uint8_t **b, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap * 2 : (size_t)1 << 20;
    while (nc < need)
        nc *= 2;
    uint8_t *nb = realloc(*b, nc);
    if (!nb)
        return AGG_ENOMEM;
    *b = nb;
    *cap = nc;
    cm_heap_advise(nb, nc);
    return 0;
}

/* Room for n int32 in *b (capacity *cap); the same for any int32 array. */
static int i32_reserve(int32_t **b, size_t *cap, size_t n)
{
    if (n <= *cap)
        return 0;
    size_t nc = n * 2 + 8;
    int32_t *nb = realloc(*b, nc * sizeof *nb);
    if (!nb)
        return AGG_ENOMEM;
    *b = nb;
    *cap = nc;
    return 0;
}

static void be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void be64(uint8_t *p, uint64_t v)
{
    be32(p, (uint32_t)(v >> 32));
    be32(p + 4, (uint32_t)v);
}

static uint32_t rd_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t rd_be64(const uint8_t *p)
{
    return (uint64_t)rd_be32(p) << 32 | rd_be32(p + 4);
}

/* The first 16 bytes of key k (n bytes), zero-padded, as two big-endian
 * words: comparing the words orders keys as their first 16 bytes do, so
 * sorts compare integers and read the keys only on ties. */
static void prefix_words(const uint8_t *k, size_t n, uint64_t w[2])
{
    uint8_t b[16] = {0};
    memcpy(b, k, n < sizeof b ? n : sizeof b);
    w[0] = rd_be64(b);
    w[1] = rd_be64(b + 8);
}

/* Record writer and reader. Records never leave the host; integers are
 * varints (w_i64), other bytes are copied as they are. */
typedef struct wr {
    uint8_t *p;
    size_t n, cap;
    int overflow;
} wr_t;

static void w_bytes(wr_t *w, const void *src, size_t n)
{
    if (w->n + n > w->cap) {
        w->overflow = 1;
        return;
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}

/* Integers are written as zigzag LEB128 varints: most fields of the state
 * (counts, cents, partitions, differences of timestamps) are small, and
 * every byte saved is a byte the per-user databases do not rewrite at each
 * commit (a batch of random users touches most of their leaf pages). */
static void w_i64(wr_t *w, int64_t v)
{
    uint64_t z = ((uint64_t)v << 1) ^ (v < 0 ? UINT64_MAX : 0);
    /* About 40 varints per event are written: with room for the longest
     * one, write in place (w->n never exceeds cap, see w_bytes). */
    uint8_t tmp[10];
    int direct = w->cap - w->n >= sizeof tmp;
    uint8_t *p0 = direct ? w->p + w->n : tmp, *p = p0;
    while (z >= 0x80) {
        *p++ = (uint8_t)(z | 0x80);
        z >>= 7;
    }
    *p++ = (uint8_t)z;
    if (direct)
        w->n += (size_t)(p - p0);
    else
        w_bytes(w, tmp, (size_t)(p - p0));
}

static void w_i32(wr_t *w, int32_t v)
{
    w_i64(w, v);
}

static void w_str(wr_t *w, const char *s, uint8_t n)
{
    w_bytes(w, &n, 1);
    w_bytes(w, s, n);
}

typedef struct rd {
    const uint8_t *p;
    size_t n, off;
    int bad;
} rd_t;

static void r_bytes(rd_t *r, void *dst, size_t n)
{
    if (r->off + n > r->n) {
        r->bad = 1;
        memset(dst, 0, n);
        return;
    }
    memcpy(dst, r->p + r->off, n);
    r->off += n;
}

static int64_t r_i64(rd_t *r)
{
    /* Most fields fit in one byte (small counts, partitions, deltas). */
    if (r->off < r->n && r->p[r->off] < 0x80) {
        uint8_t b = r->p[r->off++];
        return (int64_t)(b >> 1) ^ -(int64_t)(b & 1);
    }
    uint64_t z = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
        if (r->off >= r->n)
            break;
        uint8_t b = r->p[r->off++];
        z |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
    }
    r->bad = 1; /* truncated, or longer than ten bytes */
    return 0;
}

static int32_t r_i32(rd_t *r)
{
    int64_t v = r_i64(r);
    if (v < INT32_MIN || v > INT32_MAX) {
        r->bad = 1;
        return 0;
    }
    return (int32_t)v;
}

static uint8_t r_str(rd_t *r, char *dst, size_t cap)
{
    uint8_t n = 0;
    r_bytes(r, &n, 1);
    if (n >= cap) {
        r->bad = 1;
        n = 0;
    }
    r_bytes(r, dst, n);
    dst[n] = '\0';
    return n;
}

/* ---------------------------------------------------------------------- */
/* Order-independent "earliest event that has one" tracker (§3).          */

typedef struct attr {
    int64_t ts; /* TS_NONE while no event had the attribute */
    uint8_t eid_len, len;
    char eid[ING_ID_MAX + 1];
    char val[ING_ATTR_MAX + 1];
} attr_t;

/* (ts, event_id) order, event ids compared byte by byte. */
static int ev_less(int64_t ts1, const char *e1, size_t n1, int64_t ts2, const char *e2, size_t n2)
{
    if (ts1 != ts2)
        return ts1 < ts2;
    size_t m = n1 < n2 ? n1 : n2;
    int c = memcmp(e1, e2, m);
    if (c != 0)
        return c < 0;
    return n1 < n2;
}

static void attr_none(attr_t *a)
{
    a->ts = TS_NONE;
    a->eid_len = a->len = 0;
    a->eid[0] = a->val[0] = '\0';
}

static void attr_offer(attr_t *a, int64_t ts, const char *eid, uint8_t eid_len, const char *val,
                       uint8_t len)
{
    if (len == 0)
        return;
    if (a->ts != TS_NONE && !ev_less(ts, eid, eid_len, a->ts, a->eid, a->eid_len))
        return;
    a->ts = ts;
    a->eid_len = eid_len;
    memcpy(a->eid, eid, eid_len);
    a->eid[eid_len] = '\0';
    a->len = len;
    memcpy(a->val, val, len);
    a->val[len] = '\0';
}

static void attr_merge(attr_t *a, const attr_t *b)
{
    if (b->ts != TS_NONE)
        attr_offer(a, b->ts, b->eid, b->eid_len, b->val, b->len);
}

/* A timestamp as its difference to base, a nearby timestamp of the same
 * record (a few bytes instead of six). The arithmetic wraps, so any pair
 * round-trips exactly. */
static void w_delta(wr_t *w, int64_t v, int64_t base)
{
    w_i64(w, (int64_t)((uint64_t)v - (uint64_t)base));
}

static int64_t r_delta(rd_t *r, int64_t base)
{
    return (int64_t)((uint64_t)r_i64(r) + (uint64_t)base);
}

/* How an attribute is stored: absent, or present with its event id inline
 * or equal to the record's reference id (a session's first event, which in
 * most sessions is the one that carries device and country). */
enum { ATTR_NONE = 0, ATTR_EID, ATTR_EID_REF };

/* Writes a: its ts relative to base, its event id as ATTR_EID_REF when it
 * equals ref (ref may be NULL). */
static void w_attr(wr_t *w, const attr_t *a, int64_t base, const char *ref, uint8_t ref_len)
{
    uint8_t how = ATTR_NONE;
    if (a->ts != TS_NONE)
        how = ref && a->eid_len == ref_len && memcmp(a->eid, ref, ref_len) == 0 ? ATTR_EID_REF
                                                                                : ATTR_EID;
    w_bytes(w, &how, 1);
    if (how == ATTR_NONE)
        return;
    w_delta(w, a->ts, base);
    if (how == ATTR_EID)
        w_str(w, a->eid, a->eid_len);
    w_str(w, a->val, a->len);
}

static void r_attr(rd_t *r, attr_t *a, int64_t base, const char *ref, uint8_t ref_len)
{
    uint8_t how = ATTR_NONE;
    r_bytes(r, &how, 1);
    attr_none(a);
    if (how == ATTR_NONE)
        return;
    a->ts = r_delta(r, base);
    if (how == ATTR_EID_REF && ref) {
        a->eid_len = ref_len;
        memcpy(a->eid, ref, ref_len);
        a->eid[ref_len] = '\0';
    } else if (how == ATTR_EID) {
        a->eid_len = r_str(r, a->eid, sizeof a->eid);
    } else {
        r->bad = 1;
    }
    a->len = r_str(r, a->val, sizeof a->val);
}

/* Device or country for output: 'unknown' when no event had one (§3). */
static const char *attr_value(const attr_t *a)
{
    return a->ts == TS_NONE ? "unknown" : a->val;
}

/* ---------------------------------------------------------------------- */
/* Sessions and users.                                                     */

enum { C_EVENTS = 0, C_PAGE_VIEWS, C_PRODUCT_VIEWS, C_ADD_TO_CARTS, C_CHECKOUTS, C_PURCHASES, C_N };

typedef struct sess {
    int64_t start, end;
    int64_t c[C_N];
    int64_t revenue;
    int32_t partition;
    uint8_t sid_len;
    char sid[ING_ID_MAX + 1]; /* event_id of the first event: the session id */
    attr_t dev, ctry;
} sess_t;

typedef struct user {
    int64_t first_seen, last_seen;
    int64_t events, sessions, orders, revenue;
    int64_t first_order, last_order; /* -1 without orders */
    int32_t partition;
    attr_t dev, ctry;
    /* Start of the user's latest session: where an in-order event belongs,
     * found with one lookup instead of a cursor walk. */
    int64_t latest;
    /* The ISO weeks (day number of the Monday) the user had a clickstream
     * event in, ascending: their cohort is the first. weeks points into
     * the record just read (nweeks int32 in host order, unaligned). */
    uint32_t nweeks;
    const uint8_t *weeks;
} user_t;

static size_t sess_encode(const sess_t *s, uint8_t *buf, size_t cap)
{
    wr_t w = {buf, 0, cap, 0};
    w_i64(&w, s->start);
    w_delta(&w, s->end, s->start);
    for (int i = 0; i < C_N; i++)
        w_i64(&w, s->c[i]);
    w_i64(&w, s->revenue);
    w_i32(&w, s->partition);
    w_str(&w, s->sid, s->sid_len);
    w_attr(&w, &s->dev, s->start, s->sid, s->sid_len);
    w_attr(&w, &s->ctry, s->start, s->sid, s->sid_len);
    return w.overflow ? 0 : w.n;
}

static int sess_decode(const st_val_t *v, sess_t *s)
{
    rd_t r = {v->p, v->n, 0, 0};
    s->start = r_i64(&r);
    s->end = r_delta(&r, s->start);
    for (int i = 0; i < C_N; i++)
        s->c[i] = r_i64(&r);
    s->revenue = r_i64(&r);
    s->partition = r_i32(&r);
    s->sid_len = r_str(&r, s->sid, sizeof s->sid);
    r_attr(&r, &s->dev, s->start, s->sid, s->sid_len);
    r_attr(&r, &s->ctry, s->start, s->sid, s->sid_len);
    return r.bad ? AGG_ESTATE : 0;
}

/* The end and partition of an encoded session, without its strings: what
 * the compactor needs of the many sessions it looks at and keeps (a full
 * sess_decode was 2.7 % of the loop thread's instructions there). */
static int sess_peek(const st_val_t *v, int64_t *end, int32_t *partition)
{
    rd_t r = {v->p, v->n, 0, 0};
    int64_t start = r_i64(&r);
    *end = r_delta(&r, start);
    for (int i = 0; i <= C_N; i++) /* the counters and the revenue */
        (void)r_i64(&r);
    *partition = r_i32(&r);
    return r.bad ? AGG_ESTATE : 0;
}

static size_t user_encode(const user_t *u, const int32_t *weeks, uint8_t *buf, size_t cap)
{
    wr_t w = {buf, 0, cap, 0};
    w_i64(&w, u->first_seen);
    w_delta(&w, u->last_seen, u->first_seen);
    w_i64(&w, u->events);
    w_i64(&w, u->sessions);
    w_i64(&w, u->orders);
    w_i64(&w, u->revenue);
    w_i64(&w, u->first_order);
    w_i64(&w, u->last_order);
    w_i32(&w, u->partition);
    w_attr(&w, &u->dev, u->first_seen, NULL, 0);
    w_attr(&w, &u->ctry, u->first_seen, NULL, 0);
    w_delta(&w, u->latest, u->first_seen);
    w_i32(&w, (int32_t)u->nweeks);
    w_bytes(&w, weeks, (size_t)u->nweeks * 4);
    return w.overflow ? 0 : w.n;
}

static int user_decode(const st_val_t *v, user_t *u)
{
    rd_t r = {v->p, v->n, 0, 0};
    u->first_seen = r_i64(&r);
    u->last_seen = r_delta(&r, u->first_seen);
    u->events = r_i64(&r);
    u->sessions = r_i64(&r);
    u->orders = r_i64(&r);
    u->revenue = r_i64(&r);
    u->first_order = r_i64(&r);
    u->last_order = r_i64(&r);
    u->partition = r_i32(&r);
    r_attr(&r, &u->dev, u->first_seen, NULL, 0);
    r_attr(&r, &u->ctry, u->first_seen, NULL, 0);
    u->latest = r_delta(&r, u->first_seen);
    int32_t nw = r_i32(&r);
    if (r.bad || nw < 0 || (size_t)nw * 4 != r.n - r.off)
        return AGG_ESTATE;
    u->nweeks = (uint32_t)nw;
    u->weeks = r.p + r.off;
    return 0;
}

/* Funnel stage of a session (§3): presence of each step, in order. */
static int sess_stage(const sess_t *s)
{
    if (s->c[C_PRODUCT_VIEWS] == 0)
        return 1;
    if (s->c[C_ADD_TO_CARTS] == 0)
        return 2;
    if (s->c[C_CHECKOUTS] == 0)
        return 3;
    if (s->c[C_PURCHASES] == 0)
        return 4;
    return 5;
}

static void sess_init(sess_t *s, int32_t partition)
{
    memset(s->c, 0, sizeof s->c);
    s->start = TS_NONE;
    s->end = INT64_MIN;
    s->revenue = 0;
    s->partition = partition;
    s->sid_len = 0;
    s->sid[0] = '\0';
    attr_none(&s->dev);
    attr_none(&s->ctry);
}

static void sess_add_event(sess_t *s, const ing_event_t *ev)
{
    /* The session id is the earliest event by (ts, event_id); compare before
     * moving start, which is the ts of that event. */
    if (s->sid_len == 0 ||
        ev_less(ev->ts, ev->event_id, ev->event_id_len, s->start, s->sid, s->sid_len)) {
        s->sid_len = ev->event_id_len;
        memcpy(s->sid, ev->event_id, ev->event_id_len + 1);
    }
    if (ev->ts < s->start)
        s->start = ev->ts;
    if (ev->ts > s->end)
        s->end = ev->ts;
    s->c[C_EVENTS]++;
    switch (ev->type) {
    case ING_ET_PAGE_VIEW:
        s->c[C_PAGE_VIEWS]++;
        break;
    case ING_ET_PRODUCT_VIEW:
        s->c[C_PRODUCT_VIEWS]++;
        break;
    case ING_ET_ADD_TO_CART:
        s->c[C_ADD_TO_CARTS]++;
        break;
    case ING_ET_CHECKOUT:
        s->c[C_CHECKOUTS]++;
        break;
    case ING_ET_PURCHASE:
        s->c[C_PURCHASES]++;
        s->revenue += ev->amount_cents;
        break;
    default:
        break;
    }
    attr_offer(&s->dev, ev->ts, ev->event_id, ev->event_id_len, ev->device, ev->device_len);
    attr_offer(&s->ctry, ev->ts, ev->event_id, ev->event_id_len, ev->country, ev->country_len);
}

static void sess_merge(sess_t *a, const sess_t *b)
{
    if (ev_less(b->start, b->sid, b->sid_len, a->start, a->sid, a->sid_len)) {
        a->sid_len = b->sid_len;
        memcpy(a->sid, b->sid, b->sid_len + 1);
    }
    if (b->start < a->start)
        a->start = b->start;
    if (b->end > a->end)
        a->end = b->end;
    for (int i = 0; i < C_N; i++)
        a->c[i] += b->c[i];
    a->revenue += b->revenue;
    attr_merge(&a->dev, &b->dev);
    attr_merge(&a->ctry, &b->ctry);
}

/* What a session adds to funnel_daily: its group, stage and order totals. */
typedef struct contrib {
    int32_t day;
    int stage;
    int64_t orders, revenue;
    uint8_t dev_len, ctry_len;
    char dev[ING_ATTR_MAX + 1];
    char ctry[ING_ATTR_MAX + 1];
} contrib_t;

static int64_t day_of(int64_t ts)
{
    return ts >= 0 ? ts / DAY_MS : -((-ts + DAY_MS - 1) / DAY_MS);
}

static void sess_contrib(const sess_t *s, contrib_t *c)
{
    c->day = (int32_t)day_of(s->start);
    c->stage = sess_stage(s);
    c->orders = s->c[C_PURCHASES];
    c->revenue = s->revenue;
    const char *d = attr_value(&s->dev), *k = attr_value(&s->ctry);
    c->dev_len = (uint8_t)strlen(d);
    memcpy(c->dev, d, c->dev_len + 1);
    c->ctry_len = (uint8_t)strlen(k);
    memcpy(c->ctry, k, c->ctry_len + 1);
}

static int contrib_eq(const contrib_t *a, const contrib_t *b)
{
    return a->day == b->day && a->stage == b->stage && a->orders == b->orders &&
           a->revenue == b->revenue && a->dev_len == b->dev_len && a->ctry_len == b->ctry_len &&
           memcmp(a->dev, b->dev, a->dev_len) == 0 && memcmp(a->ctry, b->ctry, a->ctry_len) == 0;
}

/* ---------------------------------------------------------------------- */
/* The per-batch set of dirty row keys (written once per batch).          */

#define KSET_RECENT 4
/* Keys kset_add_packed hashes and fetches ahead of adding them. */
#define KSET_GROUP 16

/* The length of a packed key (2-byte big-endian length, then the bytes): the
 * form of a set's arena, of a dirty-log record and of a dirty mark. */
static size_t packed_len(const uint8_t *e)
{
    return (size_t)e[0] << 8 | e[1];
}

/* A slot of a set's table: where the key is in the arena (offset+1, 0 =
 * empty) and the high half of its hash (the low half picks the slot). One
 * array of 8-byte slots instead of one of hashes and one of offsets: a
 * probe into a table larger than the caches then costs one miss, not two,
 * and a probe for a key the set does not hold (most of the compactor's
 * questions and of the unflushed set's additions) touches nothing else. */
typedef struct kslot {
    uint32_t off;
    uint32_t tag;
} kslot_t;

typedef struct kset {
    kslot_t *slot;
    size_t cap, n;
    uint8_t *arena;
    size_t alen, acap;
    /* The last keys added (offset+1 into arena, 0 = none). Events are applied
     * sorted by user, so a user's and a session's marks repeat many times in
     * a row, interleaved with a few other tags; comparing with these few skips
     * the hash and the probe into a table too large for the caches. */
    uint32_t recent[KSET_RECENT];
    unsigned next_recent;
} kset_t;

static void kset_reset(kset_t *s)
{
    if (s->slot)
        memset(s->slot, 0, s->cap * sizeof *s->slot);
    s->n = 0;
    s->alen = 0;
    /* Element by element rather than with memset (the compiler makes the
     * same code of both): after the memset, clang-tidy 14's analyzer did not
     * know the recent keys were gone on the path through agg_flush_done, and
     * reported one read from a set whose arena was never allocated. */
    for (int i = 0; i < KSET_RECENT; i++)
        s->recent[i] = 0;
}

/* Whether k is one of the keys added last (then it is in the set). */
static int kset_recent(const kset_t *s, const uint8_t *k, size_t n)
{
    for (int i = 0; i < KSET_RECENT; i++) {
        if (!s->recent[i])
            continue;
        const uint8_t *e = s->arena + s->recent[i] - 1;
        if (packed_len(e) == n && memcmp(e + 2, k, n) == 0)
            return 1;
    }
    return 0;
}

static void kset_remember(kset_t *s, uint32_t off1)
{
    s->recent[s->next_recent++ % KSET_RECENT] = off1;
}

static void kset_free(kset_t *s)
{
    free(s->slot);
    free(s->arena);
    memset(s, 0, sizeof *s);
}

/* The slot a key of hash h probes first in a table of cap slots: where the
 * probes (kset_place, kset_slot) start and what kset_add_packed fetches. */
static size_t kset_home(size_t cap, uint64_t h)
{
    return (size_t)(h & (cap - 1));
}

/* Put a key known to be absent into the empty slot its hash leads to. */
static void kset_place(kslot_t *slot, size_t cap, uint64_t h, uint32_t off1)
{
    size_t j = kset_home(cap, h);
    while (slot[j].off)
        j = (j + 1) & (cap - 1);
    slot[j] = (kslot_t){off1, (uint32_t)(h >> 32)};
}

static int kset_grow(kset_t *s)
{
    size_t ncap = s->cap ? s->cap * 2 : 4096;
    kslot_t *ns = calloc(ncap, sizeof *ns);
    if (!ns)
        return AGG_ENOMEM;
    cm_heap_advise(ns, ncap * sizeof *ns);
    /* The slots keep half of each hash only: the keys are hashed again, in
     * the arena's order, which reads it front to back. */
    for (size_t off = 0; off < s->alen; off += 2 + packed_len(s->arena + off))
        kset_place(ns, ncap, XXH3_64bits(s->arena + off + 2, packed_len(s->arena + off)),
                   (uint32_t)(off + 1));
    free(s->slot);
    s->slot = ns;
    s->cap = ncap;
    return 0;
}

/* The slot of key k (hash h) in a set with room: its own slot when the set
 * holds it, else the empty slot where it would go. */
static size_t kset_slot(const kset_t *s, const uint8_t *k, size_t n, uint64_t h)
{
    size_t j = kset_home(s->cap, h);
    uint32_t tag = (uint32_t)(h >> 32);
    for (; s->slot[j].off; j = (j + 1) & (s->cap - 1)) {
        if (s->slot[j].tag != tag)
            continue;
        const uint8_t *e = s->arena + s->slot[j].off - 1;
        if (packed_len(e) == n && memcmp(e + 2, k, n) == 0)
            break;
    }
    return j;
}

/* Add key k whose hash is h to a set with room for it. */
static int kset_add_hashed(kset_t *s, const uint8_t *k, size_t n, uint64_t h)
{
    size_t j = kset_slot(s, k, n, h);
    if (s->slot[j].off) {
        kset_remember(s, s->slot[j].off);
        return 0;
    }
    if (s->alen + n + 2 > s->acap) {
        size_t ncap = s->acap ? s->acap * 2 : 1 << 16;
        while (ncap < s->alen + n + 2)
            ncap *= 2;
        uint8_t *na = realloc(s->arena, ncap);
        if (!na)
            return AGG_ENOMEM;
        s->arena = na;
        s->acap = ncap;
    }
    uint8_t *e = s->arena + s->alen;
    e[0] = (uint8_t)(n >> 8);
    e[1] = (uint8_t)n;
    memcpy(e + 2, k, n);
    s->slot[j] = (kslot_t){(uint32_t)(s->alen + 1), (uint32_t)(h >> 32)};
    kset_remember(s, s->slot[j].off);
    s->alen += n + 2;
    s->n++;
    return 0;
}

/* Add a key (stored as a 2-byte length and the bytes); duplicates are ignored. */
static int kset_add(kset_t *s, const uint8_t *k, size_t n)
{
    if (kset_recent(s, k, n))
        return 0;
    if ((s->n + 1) * 2 > s->cap) {
        int r = kset_grow(s);
        if (r)
            return r;
    }
    return kset_add_hashed(s, k, n, XXH3_64bits(k, n));
}

/* Whether the set holds the key. */
static int kset_has(const kset_t *s, const uint8_t *k, size_t n)
{
    return s->cap && s->slot[kset_slot(s, k, n, XXH3_64bits(k, n))].off != 0;
}

/* Add every mark of a packed list (2-byte length, then the bytes: the form
 * of a set's arena and of a dirty-log record) to s. */
static int kset_add_packed(kset_t *s, const uint8_t *p, size_t len)
{
    size_t off = 0;
    while (off + 2 <= len) {
        /* A list of marks is added in groups: the group's keys are hashed
         * and their slots fetched first, then added, so that the group's
         * cache misses overlap instead of each add waiting for its own.
         * Room for the whole group first, so that no growth moves the
         * table between the fetch and the add. */
        while ((s->n + KSET_GROUP) * 2 > s->cap) {
            int r = kset_grow(s);
            if (r)
                return r;
        }
        size_t ko[KSET_GROUP], kn[KSET_GROUP];
        uint64_t kh[KSET_GROUP];
        size_t g = 0;
        for (; g < KSET_GROUP && off + 2 <= len; g++) {
            size_t n = packed_len(p + off);
            if (n == 0 || off + 2 + n > len)
                return AGG_ESTATE;
            ko[g] = off + 2;
            kn[g] = n;
            kh[g] = XXH3_64bits(p + off + 2, n);
            __builtin_prefetch(&s->slot[kset_home(s->cap, kh[g])]);
            off += 2 + n;
        }
        for (size_t i = 0; i < g; i++) {
            int r = kset_add_hashed(s, p + ko[i], kn[i], kh[i]);
            if (r)
                return r;
        }
    }
    return off == len ? 0 : AGG_ESTATE;
}

/* ---------------------------------------------------------------------- */
/* The batch's write-back cache of aggregate rows.                        */

/*
 * The aggregate rows (funnel groups, products, pairs, baskets, cohorts and
 * the experiments' statistics) are few and hot: most events of a batch
 * update the same rows. A batch therefore reads each such row from LMDB at
 * most once, changes it in memory and writes it back once, just before it
 * commits. Nothing else reads these databases inside the write transaction,
 * and flushes read them only after the commit, so the cache needs no
 * invalidation beyond being dropped when a batch ends or aborts.
 */
#define CVAL_MAX 96
_Static_assert(sizeof(stx_suff_t) <= CVAL_MAX, "a variant's statistics fit a cache entry");

typedef struct centry {
    uint64_t h;
    uint16_t kn;
    uint8_t db;
    uint8_t vn;      /* 0: the row is absent */
    uint8_t changed; /* written back at commit */
    uint8_t tag;     /* the dirty mark the row gets at commit (0: none) */
    uint8_t xmarked; /* x_contrib marked this variant's experiment in this batch */
    uint8_t v[CVAL_MAX];
    uint8_t k[KEY_MAX];
} centry_t;

typedef struct ccache {
    centry_t *e;
    size_t n, cap;
    uint32_t *idx; /* entry index + 1; 0 = empty slot */
    size_t icap;
} ccache_t;

static void cache_reset(ccache_t *c)
{
    if (c->n && c->idx)
        memset(c->idx, 0, c->icap * sizeof *c->idx);
    c->n = 0;
}

static void cache_free(ccache_t *c)
{
    free(c->e);
    free(c->idx);
    memset(c, 0, sizeof *c);
}

static int cache_grow_index(ccache_t *c)
{
    size_t ncap = c->icap ? c->icap * 2 : 4096;
    uint32_t *ni = calloc(ncap, sizeof *ni);
    if (!ni)
        return AGG_ENOMEM;
    for (size_t i = 0; i < c->n; i++) {
        size_t j = c->e[i].h & (ncap - 1);
        while (ni[j])
            j = (j + 1) & (ncap - 1);
        ni[j] = (uint32_t)i + 1;
    }
    free(c->idx);
    c->idx = ni;
    c->icap = ncap;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* The duplicate index: event ids of the horizon, in memory.              */

/*
 * Every accepted event_id (as XXH3-128) with its ts stays in this table
 * until its ts falls behind the horizon. It answers every duplicate check;
 * LMDB only keeps a log of the same entries to rebuild it at start and to
 * know when they may go. The log holds one record per batch (split into
 * chunks of DLOG_CHUNK entries) keyed by the batch's sequence: a batch holds
 * events of many partitions whose ts spread over days, so one LMDB entry per
 * event keyed by ts landed on random pages, whereas the chunks of a batch are
 * a few puts that append at the end of the tree. Open addressing with linear
 * probing; deletion shifts the following entries back, so there are no
 * tombstones.
 */
typedef struct dent {
    uint64_t hi, lo; /* hi == 0 && lo == 0 marks an empty slot */
    int64_t ts;
} dent_t;

typedef struct dset {
    dent_t *t;
    size_t cap, n;
    /* The next table (twice cap, zero), allocated before the growth and
     * faulted in meanwhile by the heap's helper (dset_ahead). */
    dent_t *ahead;
    size_t ahead_for; /* the cap an ahead table was last tried for */
    uint64_t grown, grown_ahead;
} dset_t;

static void dkey_fix(uint64_t *hi, uint64_t *lo)
{
    /* The all-zero hash is the empty marker: move it (a 2^-128 event). */
    if (*hi == 0 && *lo == 0)
        *lo = 1;
}

static size_t dset_slot(const dset_t *d, uint64_t hi, uint64_t lo)
{
    (void)hi;
    return (size_t)(lo ^ (lo >> 29)) & (d->cap - 1);
}

/* Start loading the slot where (hi, lo) is or would be (an entry may span
 * two cache lines). Always inlined: GCC 12 at -O1 and -O2 (CMake's default
 * RelWithDebInfo) found this function free of side effects before inlining
 * it and deleted its calls, so only -O3 builds fetched ahead (tests/prefetch.sh). */
static inline __attribute__((always_inline)) void dset_prefetch(const dset_t *d, uint64_t hi,
                                                                uint64_t lo)
{
    if (!d->cap)
        return;
    const dent_t *e = &d->t[dset_slot(d, hi, lo)];
    __builtin_prefetch(e);
    __builtin_prefetch((const char *)(e + 1) - 1);
}

/* Entries ahead whose slots a walk over many ids fetches. */
#define DSET_AHEAD 8

static dent_t *dset_find(const dset_t *d, uint64_t hi, uint64_t lo)
{
    if (!d->cap)
        return NULL;
    for (size_t i = dset_slot(d, hi, lo);; i = (i + 1) & (d->cap - 1)) {
        dent_t *e = &d->t[i];
        if (e->hi == 0 && e->lo == 0)
            return NULL;
        if (e->hi == hi && e->lo == lo)
            return e;
    }
}

static int dset_put(dset_t *d, uint64_t hi, uint64_t lo, int64_t ts);

/* Tables from this size on are allocated ahead of their growth. */
#define DSET_AHEAD_MIN ((size_t)8 << 20)

/*
 * Allocate the next table while this one still has room, and have the heap's
 * helper fault it in (cm_heap_prefault_range). The rehash writes the new
 * table at random right after its allocation, so the kernel zeroed its
 * pages on the loop thread, page fault by page fault: 0.7-5.3 % of the loop
 * thread's samples in a 1 M catch-up (docs/benchmarks.md, thirty-fourth
 * session). Tried once per size; without the helper (steady rates, or not
 * started) nothing is allocated early.
 */
static void dset_ahead(dset_t *d)
{
    size_t bytes = d->cap * 2 * sizeof(dent_t);
    d->ahead_for = d->cap;
    if (bytes < DSET_AHEAD_MIN)
        return;
    dent_t *t = calloc(d->cap * 2, sizeof(dent_t));
    if (!t)
        return; /* the growth tries again, and reports */
    cm_heap_advise(t, bytes);
    if (cm_heap_prefault_range(t, bytes) != 0) {
        free(t);
        return;
    }
    d->ahead = t;
}

static int dset_grow(dset_t *d)
{
    size_t cap = d->cap ? d->cap * 2 : 1 << 16;
    dset_t nd = {.t = d->ahead ? d->ahead : calloc(cap, sizeof(dent_t)),
                 .cap = cap,
                 .grown = d->grown + 1,
                 .grown_ahead = d->grown_ahead + (d->ahead != NULL)};
    if (!nd.t)
        return AGG_ENOMEM;
    /* Probed at random for every message: huge pages spare TLB misses. */
    if (!d->ahead)
        cm_heap_advise(nd.t, nd.cap * sizeof(dent_t));
    for (size_t i = 0; i < d->cap; i++)
        if (d->t[i].hi || d->t[i].lo)
            dset_put(&nd, d->t[i].hi, d->t[i].lo, d->t[i].ts);
    free(d->t);
    *d = nd;
    return 0;
}

static int dset_put(dset_t *d, uint64_t hi, uint64_t lo, int64_t ts)
{
    /* Seven eighths of the way to the growth, ids still arrive for a while
     * (a 1 M catch-up: 0.2-0.4 s for a 48 MB table) before it is needed. */
    if (d->ahead_for != d->cap && (d->n + 1) * 16 > d->cap * 7)
        dset_ahead(d);
    if ((d->n + 1) * 2 > d->cap) {
        int r = dset_grow(d);
        if (r)
            return r;
    }
    size_t i = dset_slot(d, hi, lo);
    while (d->t[i].hi || d->t[i].lo) {
        if (d->t[i].hi == hi && d->t[i].lo == lo) {
            d->t[i].ts = ts;
            return 0;
        }
        i = (i + 1) & (d->cap - 1);
    }
    d->t[i] = (dent_t){hi, lo, ts};
    d->n++;
    return 0;
}

/* Empty slot i; backward-shift deletion keeps every probe chain unbroken. */
static void dset_del_at(dset_t *d, size_t i)
{
    size_t j = i;
    for (;;) {
        j = (j + 1) & (d->cap - 1);
        dent_t *e = &d->t[j];
        if (e->hi == 0 && e->lo == 0)
            break;
        size_t home = dset_slot(d, e->hi, e->lo);
        /* Move e into the hole at i unless its home lies cyclically in (i, j]. */
        int in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            d->t[i] = *e;
            i = j;
        }
    }
    d->t[i] = (dent_t){0, 0, 0};
    d->n--;
}

static void dset_del(dset_t *d, uint64_t hi, uint64_t lo)
{
    dent_t *e = dset_find(d, hi, lo);
    if (e)
        dset_del_at(d, (size_t)(e - d->t));
}

/*
 * Remove an id only if the index still holds it with this ts: the compactor
 * drops the entries of a log record, and an id that had been forgotten and
 * accepted again at another ts belongs to a newer record and must stay.
 */
static void dset_del_ts(dset_t *d, uint64_t hi, uint64_t lo, int64_t ts)
{
    dent_t *e = dset_find(d, hi, lo);
    if (e && e->ts == ts)
        dset_del_at(d, (size_t)(e - d->t));
}

/*
 * Entries of the duplicate log in their stored form: ts (i64), hash high and
 * low (u64 each) and partition (i32), host order, DLOG_REC bytes each. A
 * batch collects its new ids here (written at commit, undone on abort), and
 * the compactor copies the records it deletes (removed from memory once the
 * batch commits).
 */
#define DLOG_REC 28
/* Entries per LMDB record: a large value needs that many contiguous pages,
 * and LMDB searches its free list for such a run, so a big batch is split
 * into chunks of about 28 pages instead of one value of megabytes. */
#define DLOG_CHUNK 4096

typedef struct dlog {
    uint8_t *b;
    size_t n, cap; /* entries */
} dlog_t;

static int dlog_reserve(dlog_t *l, size_t more)
{
    if (l->n + more <= l->cap)
        return 0;
    size_t nc = l->cap ? l->cap : 1024;
    while (nc < l->n + more)
        nc *= 2;
    void *np = realloc(l->b, nc * DLOG_REC);
    if (!np)
        return AGG_ENOMEM;
    l->b = np;
    l->cap = nc;
    return 0;
}

static int dlog_add(dlog_t *l, int64_t ts, uint64_t hi, uint64_t lo, int32_t p)
{
    int r = dlog_reserve(l, 1);
    if (r)
        return r;
    uint8_t *e = l->b + l->n * DLOG_REC;
    memcpy(e, &ts, 8);
    memcpy(e + 8, &hi, 8);
    memcpy(e + 16, &lo, 8);
    memcpy(e + 24, &p, 4);
    l->n++;
    return 0;
}

/* Append n stored records (a log value about to be deleted) unchanged. */
static int dlog_append(dlog_t *l, const void *recs, size_t n)
{
    int r = dlog_reserve(l, n);
    if (r)
        return r;
    memcpy(l->b + l->n * DLOG_REC, recs, n * DLOG_REC);
    l->n += n;
    return 0;
}

static void dlog_get(const uint8_t *e, int64_t *ts, uint64_t *hi, uint64_t *lo, int32_t *p)
{
    memcpy(ts, e, 8);
    memcpy(hi, e + 8, 8);
    memcpy(lo, e + 16, 8);
    memcpy(p, e + 24, 4);
}

/* Key of a record of the duplicate or the dirty log: the batch's sequence,
 * then the chunk (both big-endian, so a log sorts by batch and a batch's
 * chunks append). */
static size_t log_key(uint8_t *k, uint64_t seq, uint32_t chunk)
{
    be64(k, seq);
    be32(k + 8, chunk);
    return 12;
}

/* ---------------------------------------------------------------------- */
/* The aggregator.                                                         */

enum {
    TAG_SESSION = 'S',
    /* A session row no flush can have written: its id is the id of the event
     * that opened it (or moved its start), so the sink may COPY it straight
     * into the table. An 'S' mark of the same key beside it is skipped. */
    TAG_SESSION_NEW = 'N',
    TAG_DELETE = 'D',
    TAG_USER = 'U',
    /* A user row no flush can have written: the user's first event is in a
     * batch since the last flush (user records never leave the state), so
     * the sink may COPY it straight into the table. A 'U' mark of the same
     * key beside it is skipped. */
    TAG_USER_NEW = 'I',
    TAG_FUNNEL = 'F',
    TAG_PRODUCT = 'P',
    TAG_PAIR = 'A',
    TAG_BASKET = 'B',
    TAG_COHORT = 'C',
    TAG_EXPOSURE = 'E', /* user_exposure and user_outcomes rows of (user, experiment) */
    TAG_OUTCOME = 'O',  /* only the user_outcomes row: the window outcome moved */
    /* Both rows of a (user, experiment) no completed flush has written: its
     * record was created since the last flush (experiment records never
     * leave the state). The sink may COPY them straight into the tables (a
     * unique_violation redoes the flush with upserts). A user_outcomes row
     * that must not exist is still deleted: a flush committed in Postgres
     * but not in the state may have written it. 'E' and 'O' marks of the
     * same key beside it are skipped. */
    TAG_EXPOSURE_NEW = 'W',
    TAG_EXPERIMENT = 'X', /* experiments and experiment_results rows */
    TAG_REGRESSION = 'G'  /* experiment_regression rows, refitted on the stats interval */
};

/* A user's funnel stages in one group (device, country) of one day: how
 * many of their sessions there reached each stage. */
typedef struct ugroup {
    uint8_t dn, cn;
    char dev[ING_ATTR_MAX + 1], ctry[ING_ATTR_MAX + 1];
    int32_t n[5];
} ugroup_t;

/* All of a user's groups of one day: one USTAGE record, read and written
 * once per session change instead of once per grouping level. */
typedef struct uday {
    int32_t day, partition;
    size_t n, cap;
    ugroup_t *g;
} uday_t;

/* One experiment's settings, copied from agg_conf_t. */
typedef struct xconf {
    char *name;
    char *control;
    int n_weights;
    char **weight_names;
    double *weights;
    char *exposure;
    int window_days;
} xconf_t;

/* ---------------------------------------------------------------------- */
/* Write-behind of one record per database (docs/aggregator.md, "Runs of one user").  */

/*
 * The batch applies its events sorted by user, so a user's events of one
 * batch come in a run (about nine in the 1 M bench, in one or two sessions),
 * and each event of the run reads and rewrites the same user record, the same
 * latest session and the same day of funnel stages. A slot holds the newest
 * value of one such record, or its deletion, instead of handing it to LMDB at
 * once: a put costs a B-tree descent and a page copy, the slot a memcpy.
 * The slot's record goes to the transaction when the slot is needed for
 * another key, before anything walks its database with a cursor, and when a
 * drain returns, so the compactor, the commit and the flushes never see the
 * difference. Reads by exact key go through wslot_get, which answers from
 * the slot first.
 */
typedef struct wslot {
    uint8_t db;
    uint8_t del;  /* the record is to be deleted */
    uint8_t kind; /* WK_BYTES: v holds the record; WK_USER, WK_SESS: u or s does */
    size_t kn;    /* 0: the slot is empty */
    size_t vn, cap;
    uint8_t *v;
    uint8_t k[KEY_MAX];
    /* The user and session slots keep their record decoded: a run reads it
     * back at every event, and it is encoded once, when it is written. */
    user_t u;
    int32_t *weeks; /* u's weeks (u.weeks is unused here) */
    size_t weeks_cap;
    sess_t s;
} wslot_t;

enum { WK_BYTES = 0, WK_USER, WK_SESS };

enum { WS_USERS = 0, WS_SESSIONS, WS_USTAGE, WS_N };

struct agg {
    st_env_t *env;
    char *topic;
    int64_t gap, lateness, sweep_per_batch;
    st_txn_t *txn;          /* the open batch, or NULL */
    int checkpoints;        /* conf.checkpoints */
    st_txn_t *outer;        /* the open checkpoint transaction (batches nest in it), or NULL */
    uint64_t outer_batches; /* batches committed into it */
    uint64_t seq;           /* sequence of the last committed batch */
    uint64_t pending;
    agg_partition_t parts[AGG_MAX_PARTITIONS];
    uint8_t touched[AGG_MAX_PARTITIONS];
    kset_t dirty;     /* the open batch's dirty marks */
    kset_t pend;      /* the marks of every committed batch not yet flushed */
    ccache_t cache;   /* the open batch's aggregate rows */
    wslot_t ws[WS_N]; /* the open batch's held-back user, session and stage records */
    kset_t xusers;    /* user keys with at least one experiment record */
    uday_t ud[2];     /* scratch: a session's old and new day of funnel stages */
    uint8_t *ubuf;    /* scratch: an encoded day of funnel stages */
    size_t ubuf_cap;
    int32_t *weeks; /* scratch: the weeks of the user being updated */
    size_t weeks_cap;
    dset_t dedup; /* event ids of the horizon (in memory) */
    dlog_t fresh; /* ids added by the open batch: logged on commit, undone on abort */
    dlog_t swept; /* ids the open batch's compactor dropped, applied on commit */
    /* The open batch's accepted events, queued for their mart updates
     * (agg_batch_drain): packed copies in evbuf (ing_pack), sorted by user
     * before applying, each unpacked into uev for its turn. */
    struct pev *pev;
    size_t n_pev, cap_pev, pev_done;
    int pev_sorted;
    uint8_t *evbuf;
    size_t evlen, evcap;
    ing_event_t *uev; /* scratch: the event being applied, unpacked */
    uint64_t *pack;   /* scratch: agg_apply_event's packed copy (ING_PACKED_MAX) */
    /* The batch's retained-event puts, written sorted by key (xq_write). */
    uint8_t *xq;
    size_t xq_len, xq_cap;
    size_t *xq_off;
    size_t xq_n, xq_offcap;
    const uint8_t **xq_sorted;
    size_t xq_sortcap;
    uint8_t *xrec; /* scratch: a record of retained events */
    size_t xrec_cap;
    uint32_t xq_rec;      /* retained-event records the open batch wrote (their keys' last part) */
    int64_t batch_events; /* events accepted by the open batch (sizes the compactor) */
    /* Where the compactor stopped in each database, so that every batch
     * examines a bounded slice and the whole state is covered in turn. */
    uint8_t sweep_key[4][KEY_MAX];
    size_t sweep_len[4];
    /* Experiment settings (read-only after agg_open, so the flush thread may
     * read them too). */
    xconf_t *xconf;
    int n_xconf;
    char *exposure_default;
    int window_default;
    double alpha, n_star;
};

static const uint8_t META_SEQ[] = "seq";

static size_t part_key(uint8_t *k, int32_t p)
{
    k[0] = 'p';
    be32(k + 1, (uint32_t)p);
    return 5;
}

/*
 * The dirty log (marks log): each batch writes its marks (sorted, each a 2-byte length
 * and the tag + row key) as records of at most MLOG_CHUNK bytes under
 * (be64 batch seq, be32 chunk) in ST_DB_DIRTY: a few sequential puts per
 * batch instead of one random put per row. A flush collects the union of
 * the records its snapshot holds and then deletes exactly those records
 * (all with seq <= the snapshot's); marks of later batches stay for the
 * next flush. The union of the remaining records is kept in memory (pend)
 * for the compactor and the pending-row count.
 */
#define MLOG_CHUNK 65536

/* Fill s with the marks of every dirty record after seq `after`. */
static int mlog_load(agg_t *a, st_txn_t *txn, uint64_t after, kset_t *s)
{
    kset_reset(s);
    st_cursor_t cur = {0};
    st_val_t k, v;
    uint8_t from[12];
    log_key(from, after + 1, 0);
    int r = st_cur_open(txn, a->env, ST_DB_DIRTY, &cur);
    if (r)
        return r;
    for (r = st_cur_seek(&cur, from, sizeof from, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v))
        if (k.n != 12 || (r = kset_add_packed(s, v.p, v.n)))
            break;
    st_cur_close(&cur);
    if (r == 0 && k.n != 12)
        r = AGG_ESTATE;
    return r == ST_ENOTFOUND ? 0 : r;
}

/*
 * A stable merge sort specialised for one element type, so that its
 * comparison cmp(ctx, a, b) (< 0: *a goes first) is inlined. glibc's qsort
 * calls the comparison through a pointer, and for elements over 32 bytes
 * sorts pointers to them and moves the elements afterwards. On a 200 000
 * event run (callgrind) the batch's sorts took 238 M of the loop thread's
 * 2 602 M instructions that way and 173 M of 2 538 M with this one.
 * name(v, n, tmp, ctx) sorts v[0..n) with tmp[0..n/2 + 1) as scratch.
 */
#define MSORT_DEFINE(name, T, cmp)                                                                 \
    static void name(T *v, size_t n, T *tmp, const void *ctx)                                      \
    {                                                                                              \
        if (n <= 12) {                                                                             \
            for (size_t i = 1; i < n; i++) {                                                       \
                T x = v[i];                                                                        \
                size_t j = i;                                                                      \
                for (; j > 0 && cmp(ctx, &x, &v[j - 1]) < 0; j--)                                  \
                    v[j] = v[j - 1];                                                               \
                v[j] = x;                                                                          \
            }                                                                                      \
            return;                                                                                \
        }                                                                                          \
        size_t h = n / 2, i = 0, j = h, k = 0;                                                     \
        name(v, h, tmp, ctx);                                                                      \
        name(v + h, n - h, tmp, ctx);                                                              \
        if (cmp(ctx, &v[h], &v[h - 1]) >= 0)                                                       \
            return; /* the halves are in order already (runs of one user) */                       \
        /* The left half moves out; the merge never overtakes the right one. */                    \
        memcpy(tmp, v, h * sizeof *v);                                                             \
        while (i < h && j < n)                                                                     \
            v[k++] = cmp(ctx, &v[j], &tmp[i]) < 0 ? v[j++] : tmp[i++];                             \
        while (i < h)                                                                              \
            v[k++] = tmp[i++];                                                                     \
    }

/*
 * Sorting records by a byte-string key, as LMDB orders keys (byte-wise, a
 * key before its own extensions). The commit sorts every batch's dirty marks
 * and retained events this way: a hundred thousand strings or more, and most
 * keys differ within their first 16 bytes (a tag or a day, then the user
 * key), so the comparison looks at those as two big-endian words, zero-padded,
 * and reads the strings only when both words are equal. Zero padding keeps the
 * order exact: a key and its extension by zero bytes tie on the words and are
 * told apart by the rest of the bytes and then by length.
 */
typedef struct skey {
    uint64_t w[2];
    const uint8_t *k; /* the key's bytes */
    size_t n;
} skey_t;

static void skey_set(skey_t *s, const uint8_t *k, size_t n)
{
    prefix_words(k, n, s->w);
    s->k = k;
    s->n = n;
}

/* Order of two pointers to skey_t: the keys stay put and only their
 * pointers move. */
static inline int skey_cmp(const void *ctx, const skey_t *const *x, const skey_t *const *y)
{
    (void)ctx;
    const skey_t *a = *x, *b = *y;
    for (int i = 0; i < 2; i++)
        if (a->w[i] != b->w[i])
            return a->w[i] < b->w[i] ? -1 : 1;
    size_t m = a->n < b->n ? a->n : b->n;
    if (m > 16) {
        int c = memcmp(a->k + 16, b->k + 16, m - 16);
        if (c)
            return c;
    }
    return (a->n > b->n) - (a->n < b->n);
}

MSORT_DEFINE(skey_sort, const skey_t *, skey_cmp)

/* Sort recs[0..n) by their keys: record i's key starts hdr bytes into it and
 * is len(record) bytes long. 0 or AGG_ENOMEM (recs unchanged). Any thread. */
static int sort_by_key(const uint8_t **recs, size_t n, size_t hdr,
                       size_t (*len)(const uint8_t *rec))
{
    if (n < 2)
        return 0;
    skey_t *sk = malloc(n * sizeof *sk);
    const skey_t **ps = malloc((n + n / 2 + 1) * sizeof *ps);
    if (!sk || !ps) {
        free(sk);
        free(ps);
        return AGG_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        skey_set(&sk[i], recs[i] + hdr, len(recs[i]));
        ps[i] = &sk[i];
    }
    skey_sort(ps, n, ps + n, NULL);
    for (size_t i = 0; i < n; i++)
        recs[i] = ps[i]->k - hdr;
    free(ps);
    free(sk);
    return 0;
}

/* Sorted pointers to the marks held in s (2-byte length, then the bytes);
 * *out is NULL for an empty set. */
static int marks_sorted(const kset_t *s, const uint8_t ***out, size_t *n)
{
    *out = NULL;
    *n = 0;
    if (!s->n)
        return 0;
    const uint8_t **m = malloc(s->n * sizeof *m);
    if (!m)
        return AGG_ENOMEM;
    size_t nm = 0;
    for (size_t off = 0; off < s->alen; nm++) {
        m[nm] = s->arena + off;
        off += packed_len(m[nm]) + 2;
    }
    int r = sort_by_key(m, nm, 2, packed_len);
    if (r) {
        free(m);
        return r;
    }
    *out = m;
    *n = nm;
    return 0;
}

/* Begin a write transaction: nested in the checkpoint transaction (opened
 * on demand) with conf.checkpoints, else a durable one of its own. */
static int wtxn_begin(agg_t *a, st_txn_t **txn)
{
    if (!a->checkpoints)
        return st_begin(a->env, 0, txn);
    if (!a->outer) {
        int r = st_begin(a->env, 0, &a->outer);
        if (r)
            return r;
        a->outer_batches = 0;
    }
    return st_begin_nested(a->env, a->outer, txn);
}

/* A transaction to read the latest state on the loop thread outside a
 * batch: the open checkpoint transaction (*own 0: the caller must not end
 * it), else a read snapshot of its own (*own 1). */
static int rtxn_begin(agg_t *a, st_txn_t **txn, int *own)
{
    if (a->outer && !a->txn) {
        *txn = a->outer;
        *own = 0;
        return 0;
    }
    *own = 1;
    return st_begin(a->env, 1, txn);
}

static int load_partitions(agg_t *a)
{
    st_txn_t *txn;
    int own;
    int r = rtxn_begin(a, &txn, &own);
    if (r)
        return r;
    memset(a->parts, 0, sizeof a->parts);
    for (int i = 0; i < AGG_MAX_PARTITIONS; i++)
        a->parts[i].watermark = -1;
    st_cursor_t cur = {0};
    st_val_t k, v;
    r = st_cur_open(txn, a->env, ST_DB_META, &cur);
    if (r)
        goto out;
    uint8_t pk[5];
    part_key(pk, 0);
    for (r = st_cur_seek(&cur, pk, 1, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v)) {
        const uint8_t *kp = k.p;
        if (k.n != 5 || kp[0] != 'p')
            break;
        uint32_t p = rd_be32(kp + 1);
        if (p >= AGG_MAX_PARTITIONS || v.n != sizeof(agg_partition_t)) {
            r = AGG_ESTATE;
            goto out;
        }
        memcpy(&a->parts[p], v.p, sizeof(agg_partition_t));
    }
    if (r == ST_ENOTFOUND)
        r = 0;
    a->seq = 0;
    if (r == 0 && st_get(txn, a->env, ST_DB_META, META_SEQ, 3, &v) == 0 && v.n == 8)
        memcpy(&a->seq, v.p, 8);
    uint64_t nr = 0;
    if (r == 0 && (r = mlog_load(a, txn, 0, &a->pend)) == 0)
        r = st_count(txn, a->env, ST_DB_REJECTS, &nr);
    a->pending = a->pend.n + nr;
out:
    st_cur_close(&cur);
    if (own)
        st_abort(txn);
    return r;
}

/* Call fn on every entry of db, in key order, in a read transaction: the
 * loaders that rebuild in-memory indexes at start. */
static int walk_db(agg_t *a, enum st_db db,
                   int (*fn)(agg_t *a, const st_val_t *k, const st_val_t *v))
{
    st_txn_t *txn;
    int r = st_begin(a->env, 1, &txn);
    if (r)
        return r;
    st_cursor_t cur = {0};
    st_val_t k, v;
    if ((r = st_cur_open(txn, a->env, db, &cur)) == 0) {
        uint8_t zero = 0;
        for (r = st_cur_seek(&cur, &zero, 1, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v))
            if ((r = fn(a, &k, &v)))
                break;
        st_cur_close(&cur);
    }
    st_abort(txn);
    return r == ST_ENOTFOUND ? 0 : r;
}

/* An experiment record: its key starts with the user's key. */
static int load_xuser(agg_t *a, const st_val_t *k, const st_val_t *v)
{
    (void)v;
    const uint8_t *kp = k->p;
    if (k->n < 1 || (size_t)kp[0] + 1 > k->n)
        return AGG_ESTATE;
    return kset_add(&a->xusers, kp, (size_t)kp[0] + 1);
}

/* A chunk of the duplicate log: every id a committed batch logged and the
 * compactor has not deleted is known again. Chunks are read in batch order,
 * so should an id ever sit in two of them, the newer ts wins, as it did in
 * memory. */
static int load_dedup(agg_t *a, const st_val_t *k, const st_val_t *v)
{
    if (k->n != 12 || v->n == 0 || v->n % DLOG_REC != 0)
        return AGG_ESTATE;
    int r = 0;
    for (const uint8_t *e = v->p; r == 0 && e < (const uint8_t *)v->p + v->n; e += DLOG_REC) {
        int64_t ts;
        uint64_t hi, lo;
        int32_t p;
        dlog_get(e, &ts, &hi, &lo, &p);
        r = dset_put(&a->dedup, hi, lo, ts);
    }
    return r;
}

int agg_open(st_env_t *env, const agg_conf_t *conf, agg_t **out)
{
    agg_t *a = calloc(1, sizeof *a);
    if (!a)
        return AGG_ENOMEM;
    a->env = env;
    a->checkpoints = conf->checkpoints != 0;
    a->topic = strdup(conf->topic ? conf->topic : "");
    a->gap = conf->session_gap_ms;
    a->ws[WS_USERS].db = ST_DB_USERS;
    a->ws[WS_SESSIONS].db = ST_DB_SESSIONS;
    a->ws[WS_USTAGE].db = ST_DB_USTAGE;
    a->lateness = conf->allowed_lateness_ms;
    a->sweep_per_batch = conf->sweep_per_batch;
    a->exposure_default = strdup(conf->exposure_event ? conf->exposure_event : "product_view");
    a->window_default = conf->window_days > 0 ? conf->window_days : 7;
    a->alpha = 1.0 - (conf->confidence > 0 && conf->confidence < 1 ? conf->confidence : 0.95);
    a->n_star = conf->sequential_tuning > 0 ? conf->sequential_tuning : 5000.0;
    int r = a->topic && a->exposure_default ? 0 : AGG_ENOMEM;
    if (r == 0 && conf->n_experiments > 0) {
        a->xconf = calloc((size_t)conf->n_experiments, sizeof *a->xconf);
        if (!a->xconf)
            r = AGG_ENOMEM;
        for (int i = 0; r == 0 && i < conf->n_experiments; i++) {
            const agg_exp_conf_t *e = &conf->experiments[i];
            xconf_t *x = &a->xconf[a->n_xconf++];
            x->name = strdup(e->name);
            x->control = e->control ? strdup(e->control) : NULL;
            x->exposure = e->exposure_event ? strdup(e->exposure_event) : NULL;
            x->window_days = e->window_days;
            x->n_weights = e->n_weights;
            if (e->n_weights > 0) {
                x->weight_names = calloc((size_t)e->n_weights, sizeof *x->weight_names);
                x->weights = calloc((size_t)e->n_weights, sizeof *x->weights);
                if (!x->weight_names || !x->weights)
                    r = AGG_ENOMEM;
                for (int k = 0; r == 0 && k < e->n_weights; k++) {
                    x->weight_names[k] = strdup(e->weight_names[k]);
                    x->weights[k] = e->weights[k];
                    if (!x->weight_names[k])
                        r = AGG_ENOMEM;
                }
            }
            if (!x->name || (e->control && !x->control) || (e->exposure_event && !x->exposure))
                r = AGG_ENOMEM;
        }
    }
    if (r == 0)
        r = load_partitions(a);
    if (r == 0)
        r = walk_db(a, ST_DB_DEDUP, load_dedup);
    if (r == 0)
        r = walk_db(a, ST_DB_XUSER, load_xuser);
    if (r) {
        agg_close(a);
        return r;
    }
    *out = a;
    return 0;
}

void agg_close(agg_t *a)
{
    if (!a)
        return;
    if (a->txn)
        agg_batch_abort(a);
    /* Not checkpointed: lost as in a crash (the caller checkpoints first
     * when it stops cleanly). */
    st_abort(a->outer);
    free(a->pev);
    free(a->evbuf);
    free(a->uev);
    free(a->pack);
    free(a->xq);
    free(a->xq_off);
    free(a->xq_sorted);
    free(a->xrec);
    kset_free(&a->dirty);
    kset_free(&a->pend);
    cache_free(&a->cache);
    for (int i = 0; i < WS_N; i++) {
        free(a->ws[i].v);
        free(a->ws[i].weeks);
    }
    kset_free(&a->xusers);
    free(a->ud[0].g);
    free(a->ud[1].g);
    free(a->ubuf);
    free(a->weeks);
    free(a->dedup.t);
    free(a->dedup.ahead);
    free(a->fresh.b);
    free(a->swept.b);
    for (int i = 0; i < a->n_xconf; i++) {
        xconf_t *x = &a->xconf[i];
        free(x->name);
        free(x->control);
        free(x->exposure);
        for (int k = 0; k < x->n_weights; k++)
            free(x->weight_names ? x->weight_names[k] : NULL);
        free(x->weight_names);
        free(x->weights);
    }
    free(a->xconf);
    free(a->exposure_default);
    free(a->topic);
    free(a);
}

const agg_partition_t *agg_partition(const agg_t *a, int32_t partition)
{
    if (partition < 0 || partition >= AGG_MAX_PARTITIONS)
        return NULL;
    return &a->parts[partition];
}

/* Hand the slot's record to the transaction and empty the slot. */
static int wslot_write(agg_t *a, wslot_t *s)
{
    if (!s->kn)
        return 0;
    size_t kn = s->kn;
    s->kn = 0;
    if (s->del) {
        int r = st_del(a->txn, a->env, (enum st_db)s->db, s->k, kn);
        return r == ST_ENOTFOUND ? 0 : r;
    }
    if (s->kind != WK_BYTES) {
        size_t need = REC_MAX + (s->kind == WK_USER ? (size_t)s->u.nweeks * 4 : 0);
        int r = bytes_reserve(&s->v, &s->cap, need);
        if (r)
            return r;
        s->vn = s->kind == WK_USER ? user_encode(&s->u, s->weeks, s->v, s->cap)
                                   : sess_encode(&s->s, s->v, s->cap);
        if (!s->vn)
            return AGG_ESTATE;
    }
    return st_put(a->txn, a->env, (enum st_db)s->db, s->k, kn, s->v, s->vn);
}

/* Every slot's record into the transaction (a drain returns). */
static int wslots_write(agg_t *a)
{
    int r = 0;
    for (int i = 0; r == 0 && i < WS_N; i++)
        r = wslot_write(a, &a->ws[i]);
    return r;
}

/* Forget the slots' records (the batch ends or aborts). */
static void wslots_drop(agg_t *a)
{
    for (int i = 0; i < WS_N; i++)
        a->ws[i].kn = 0;
}

/* wslot_get: the slot holds k's record decoded (s->u or s->s). */
#define WSLOT_HELD 1

/* st_get of the slot's database, answered by the slot when it holds k:
 * WSLOT_HELD for a decoded record, else as st_get. A value or record from
 * the slot is valid until the slot is next set. */
static int wslot_get(agg_t *a, const wslot_t *s, const uint8_t *k, size_t kn, st_val_t *v)
{
    if (s->kn == kn && memcmp(s->k, k, kn) == 0) {
        if (s->del)
            return ST_ENOTFOUND;
        if (s->kind != WK_BYTES)
            return WSLOT_HELD;
        v->p = s->v;
        v->n = s->vn;
        return 0;
    }
    return st_get(a->txn, a->env, (enum st_db)s->db, k, kn, v);
}

/* Make the slot hold key k: a record of another key it held goes to the
 * transaction first. */
static int wslot_take(agg_t *a, wslot_t *s, const uint8_t *k, size_t kn)
{
    if (kn > KEY_MAX || kn == 0)
        return AGG_ESTATE;
    if (s->kn && (s->kn != kn || memcmp(s->k, k, kn) != 0)) {
        int r = wslot_write(a, s);
        if (r)
            return r;
    }
    return 0;
}

/* The slot now holds key k, with a record of this kind (or its deletion). */
static void wslot_hold(wslot_t *s, const uint8_t *k, size_t kn, uint8_t kind, int del)
{
    memcpy(s->k, k, kn);
    s->kn = kn;
    s->kind = kind;
    s->del = (uint8_t)(del != 0);
}

/* Hold back a put of the user record (u, weeks) under k. */
static int wslot_set_user(agg_t *a, wslot_t *s, const uint8_t *k, size_t kn, const user_t *u,
                          const int32_t *weeks)
{
    int r = wslot_take(a, s, k, kn);
    if (r)
        return r;
    if ((r = i32_reserve(&s->weeks, &s->weeks_cap, u->nweeks)))
        return r;
    memcpy(s->weeks, weeks, (size_t)u->nweeks * sizeof *weeks);
    s->u = *u;
    s->u.weeks = NULL;
    wslot_hold(s, k, kn, WK_USER, 0);
    return 0;
}

/* Hold back a put of the session record ss under k. */
static int wslot_set_sess(agg_t *a, wslot_t *s, const uint8_t *k, size_t kn, const sess_t *ss)
{
    int r = wslot_take(a, s, k, kn);
    if (r)
        return r;
    s->s = *ss;
    wslot_hold(s, k, kn, WK_SESS, 0);
    return 0;
}

/* Hold back a put of (k, v) (del: a delete of k) in the slot; a record of
 * another key the slot held goes to the transaction first. */
static int wslot_set(agg_t *a, wslot_t *s, const uint8_t *k, size_t kn, const void *v, size_t vn,
                     int del)
{
    int r0 = wslot_take(a, s, k, kn);
    if (r0)
        return r0;
    if (!del) {
        int r = bytes_reserve(&s->v, &s->cap, vn);
        if (r)
            return r;
        memcpy(s->v, v, vn);
    }
    s->vn = del ? 0 : vn;
    wslot_hold(s, k, kn, WK_BYTES, del);
    return 0;
}

uint64_t agg_pending_rows(const agg_t *a)
{
    return a->pending;
}

void agg_dedup_index(const agg_t *a, agg_dedup_index_t *out)
{
    const dset_t *d = &a->dedup;
    out->ids = d->n;
    out->slots = d->cap;
    out->bytes = (d->cap + (d->ahead ? d->cap * 2 : 0)) * sizeof(dent_t);
    out->grown = d->grown;
    out->grown_ahead = d->grown_ahead;
}

/* The open batch's ids were never committed, so they leave the index; the
 * compactor's deletes rolled back with it, so its ids stay. */
static void forget_fresh(agg_t *a)
{
    for (size_t i = 0; i < a->fresh.n; i++) {
        int64_t ts;
        uint64_t hi, lo;
        int32_t p;
        dlog_get(a->fresh.b + i * DLOG_REC, &ts, &hi, &lo, &p);
        dset_del(&a->dedup, hi, lo);
    }
    a->fresh.n = a->swept.n = 0;
}

int agg_batch_begin(agg_t *a)
{
    kset_reset(&a->dirty);
    cache_reset(&a->cache);
    wslots_drop(a);
    a->xq_rec = 0;
    a->fresh.n = a->swept.n = 0;
    a->batch_events = 0;
    memset(a->touched, 0, sizeof a->touched);
    return wtxn_begin(a, &a->txn);
}

void agg_batch_abort(agg_t *a)
{
    st_abort(a->txn);
    a->txn = NULL;
    kset_reset(&a->dirty);
    cache_reset(&a->cache);
    wslots_drop(a);
    a->n_pev = a->pev_done = a->evlen = 0;
    a->xq_n = a->xq_len = 0;
    a->xq_rec = 0;
    forget_fresh(a);
    /* Forget the in-memory progress of the aborted batch. */
    if (load_partitions(a) != 0)
        cm_err("cannot reload partition progress after abort", "%s", "");
}

static int mark_dirty(agg_t *a, uint8_t tag, const uint8_t *k, size_t n)
{
    uint8_t buf[KEY_MAX + 1];
    buf[0] = tag;
    memcpy(buf + 1, k, n);
    return kset_add(&a->dirty, buf, n + 1);
}

static int get_part(agg_t *a, int32_t p, agg_partition_t **out)
{
    if (p < 0 || p >= AGG_MAX_PARTITIONS)
        return AGG_EPARTITION;
    agg_partition_t *pp = &a->parts[p];
    if (!pp->known) {
        pp->known = 1;
        pp->watermark = -1;
    }
    a->touched[p] = 1;
    *out = pp;
    return 0;
}

/*
 * The aggregate row (db, k) of the open batch, read from LMDB on first use.
 * The entry stays valid until the next cache_row call (the entries may
 * move when the cache grows); set vn, v and changed to update the row.
 */
static int cache_row(agg_t *a, enum st_db db, const uint8_t *k, size_t kn, centry_t **out)
{
    ccache_t *c = &a->cache;
    uint64_t h = XXH3_64bits_withSeed(k, kn, (XXH64_hash_t)db);
    if (c->icap) {
        for (size_t j = h & (c->icap - 1); c->idx[j]; j = (j + 1) & (c->icap - 1)) {
            centry_t *e = &c->e[c->idx[j] - 1];
            if (e->h == h && e->db == db && e->kn == kn && memcmp(e->k, k, kn) == 0) {
                *out = e;
                return 0;
            }
        }
    }
    if (kn > KEY_MAX)
        return AGG_ESTATE;
    st_val_t v;
    int r = st_get(a->txn, a->env, db, k, kn, &v);
    if (r != 0 && r != ST_ENOTFOUND)
        return r;
    if (r == 0 && v.n > CVAL_MAX)
        return AGG_ESTATE;
    if ((c->n + 1) * 2 > c->icap && cache_grow_index(c) != 0)
        return AGG_ENOMEM;
    if (c->n == c->cap) {
        size_t nc = c->cap ? c->cap * 2 : 1024;
        centry_t *ne = realloc(c->e, nc * sizeof *ne);
        if (!ne)
            return AGG_ENOMEM;
        c->e = ne;
        c->cap = nc;
    }
    centry_t *e = &c->e[c->n];
    e->h = h;
    e->db = (uint8_t)db;
    e->kn = (uint16_t)kn;
    memcpy(e->k, k, kn);
    e->vn = r == 0 ? (uint8_t)v.n : 0;
    if (e->vn)
        memcpy(e->v, v.p, e->vn);
    e->changed = 0;
    e->tag = 0;
    e->xmarked = 0;
    size_t j = h & (c->icap - 1);
    while (c->idx[j])
        j = (j + 1) & (c->icap - 1);
    c->idx[j] = (uint32_t)c->n + 1;
    c->n++;
    *out = e;
    return 0;
}

/*
 * Write the batch's changed aggregate rows into its transaction, and mark
 * them dirty. The marks wait for this point because most events of a batch
 * update the same few hot rows: one mark per row and batch instead of one
 * per update. Nothing reads the open batch's marks of these rows before the
 * commit (the compactor asks only about sessions), and the dirty set is a
 * set, so the commit logs exactly the marks it logged before.
 */
static int cache_writeback(agg_t *a)
{
    ccache_t *c = &a->cache;
    for (size_t i = 0; i < c->n; i++) {
        const centry_t *e = &c->e[i];
        if (!e->changed)
            continue;
        int r = e->vn ? st_put(a->txn, a->env, (enum st_db)e->db, e->k, e->kn, e->v, e->vn)
                      : st_del(a->txn, a->env, (enum st_db)e->db, e->k, e->kn);
        if (r && r != ST_ENOTFOUND)
            return r;
        if (e->tag && (r = mark_dirty(a, e->tag, e->k, e->kn)))
            return r;
    }
    cache_reset(c);
    return 0;
}

/* ---- keys ---- */

static size_t user_key(uint8_t *k, const char *user, uint8_t n)
{
    k[0] = n;
    memcpy(k + 1, user, n);
    return (size_t)n + 1;
}

static size_t sess_key(uint8_t *k, const uint8_t *uk, size_t ukn, int64_t start)
{
    memcpy(k, uk, ukn);
    be64(k + ukn, (uint64_t)start);
    return ukn + 8;
}

static size_t group_key(uint8_t *k, int32_t day, const char *dev, uint8_t dn, const char *ctry,
                        uint8_t cn)
{
    be32(k, (uint32_t)day);
    k[4] = dn;
    memcpy(k + 5, dev, dn);
    k[5 + dn] = cn;
    memcpy(k + 6 + dn, ctry, cn);
    return (size_t)6 + dn + cn;
}

/* ---- funnel_daily counters ---- */

enum { F_SESS = 0, F_USERS = 5, F_ORDERS = 10, F_REVENUE = 11, F_N = 12 };

static int max_stage(const int32_t *n)
{
    for (int k = 4; k >= 0; k--)
        if (n[k] > 0)
            return k + 1;
    return 0;
}

/* The USTAGE key of a user's day. */
static size_t uday_key(uint8_t *k, const uint8_t *uk, size_t ukn, int32_t day)
{
    memcpy(k, uk, ukn);
    be32(k + ukn, (uint32_t)day);
    return ukn + 4;
}

/* A new group at the end of day d (contents unset); NULL without memory. */
static ugroup_t *uday_push(uday_t *d)
{
    if (d->n == d->cap) {
        size_t nc = d->cap ? d->cap * 2 : 8;
        ugroup_t *ng = realloc(d->g, nc * sizeof *ng);
        if (!ng)
            return NULL;
        d->g = ng;
        d->cap = nc;
    }
    return &d->g[d->n++];
}

/*
 * Read a user's funnel stages of one day. The record is the user's
 * partition, then per group: device and country (length-prefixed) and five
 * session counts (integers as varints, see w_i64).
 */
static int uday_load(agg_t *a, uday_t *d, const uint8_t *uk, size_t ukn, int32_t day)
{
    uint8_t k[KEY_MAX];
    size_t kn = uday_key(k, uk, ukn, day);
    d->day = day;
    d->partition = 0;
    d->n = 0;
    st_val_t v;
    int r = wslot_get(a, &a->ws[WS_USTAGE], k, kn, &v);
    if (r == ST_ENOTFOUND)
        return 0;
    if (r)
        return r;
    rd_t rd = {v.p, v.n, 0, 0};
    d->partition = r_i32(&rd);
    while (!rd.bad && rd.off < rd.n) {
        ugroup_t *g = uday_push(d);
        if (!g)
            return AGG_ENOMEM;
        g->dn = r_str(&rd, g->dev, sizeof g->dev);
        g->cn = r_str(&rd, g->ctry, sizeof g->ctry);
        for (int i = 0; i < 5; i++)
            g->n[i] = r_i32(&rd);
    }
    return rd.bad ? AGG_ESTATE : 0;
}

/* Write a user's day back; a day without sessions leaves the state. */
static int uday_store(agg_t *a, const uday_t *d, const uint8_t *uk, size_t ukn)
{
    uint8_t k[KEY_MAX];
    size_t kn = uday_key(k, uk, ukn, d->day);
    if (d->n == 0)
        return wslot_set(a, &a->ws[WS_USTAGE], k, kn, NULL, 0, 1);
    /* Varints: at most 5 bytes for an int32. */
    size_t need = 5 + d->n * (2 + 2 * ING_ATTR_MAX + 5 * 5);
    if (need > a->ubuf_cap) {
        uint8_t *nb = realloc(a->ubuf, need);
        if (!nb)
            return AGG_ENOMEM;
        a->ubuf = nb;
        a->ubuf_cap = need;
    }
    wr_t w = {a->ubuf, 0, a->ubuf_cap, 0};
    w_i32(&w, d->partition);
    for (size_t i = 0; i < d->n; i++) {
        const ugroup_t *g = &d->g[i];
        w_str(&w, g->dev, g->dn);
        w_str(&w, g->ctry, g->cn);
        for (int j = 0; j < 5; j++)
            w_i32(&w, g->n[j]);
    }
    if (w.overflow)
        return AGG_ESTATE;
    return wslot_set(a, &a->ws[WS_USTAGE], k, kn, a->ubuf, w.n, 0);
}

/* The user's group (dev, ctry) in day d, added with zero counts if new;
 * NULL without memory. */
static ugroup_t *uday_group(uday_t *d, const char *dev, uint8_t dn, const char *ctry, uint8_t cn)
{
    for (size_t i = 0; i < d->n; i++) {
        ugroup_t *g = &d->g[i];
        if (g->dn == dn && g->cn == cn && memcmp(g->dev, dev, dn) == 0 &&
            memcmp(g->ctry, ctry, cn) == 0)
            return g;
    }
    ugroup_t *g = uday_push(d);
    if (!g)
        return NULL;
    memset(g, 0, sizeof *g);
    g->dn = dn;
    g->cn = cn;
    memcpy(g->dev, dev, dn);
    memcpy(g->ctry, ctry, cn);
    return g;
}

/*
 * Move one funnel group from a session's old contribution to its new one
 * (either may be NULL; both, when given, fall into this group and day d):
 * the group's counters change in the batch's cache, and its distinct-user
 * counts follow the user's highest stage there, kept exact by the user's
 * multiset of session stages in the group.
 */
static int apply_group(agg_t *a, uday_t *d, const contrib_t *old, const contrib_t *nw,
                       const char *dev, uint8_t dn, const char *ctry, uint8_t cn)
{
    const contrib_t *any = nw ? nw : old;
    uint8_t gk[KEY_MAX];
    size_t gkn = group_key(gk, any->day, dev, dn, ctry, cn);
    int64_t f[F_N] = {0};
    centry_t *e;
    int r = cache_row(a, ST_DB_FUNNEL, gk, gkn, &e);
    if (r)
        return r;
    if (e->vn == sizeof f)
        memcpy(f, e->v, sizeof f);
    ugroup_t *g = uday_group(d, dev, dn, ctry, cn);
    if (!g)
        return AGG_ENOMEM;
    int old_max = max_stage(g->n);
    const contrib_t *cs[2] = {old, nw};
    for (int i = 0; i < 2; i++) {
        const contrib_t *c = cs[i];
        int sign = i == 0 ? -1 : 1;
        if (!c)
            continue;
        g->n[c->stage - 1] += sign;
        for (int k = 0; k < c->stage; k++)
            f[F_SESS + k] += sign;
        f[F_ORDERS] += sign * c->orders;
        f[F_REVENUE] += sign * c->revenue;
    }
    int new_max = max_stage(g->n);
    for (int k = 0; k < old_max; k++)
        f[F_USERS + k]--;
    for (int k = 0; k < new_max; k++)
        f[F_USERS + k]++;
    if (new_max == 0)
        *g = d->g[--d->n];
    memcpy(e->v, f, sizeof f);
    e->vn = sizeof f;
    e->changed = 1;
    e->tag = TAG_FUNNEL; /* marked at commit (cache_writeback) */
    return 0;
}

/* The device and country of a contribution at one of the four grouping
 * levels (level bit 1: device rolled up, bit 0: country rolled up). */
static void group_of(const contrib_t *c, int level, const char **dev, uint8_t *dn,
                     const char **ctry, uint8_t *cn)
{
    *dev = level & 2 ? "*" : c->dev;
    *dn = level & 2 ? 1 : c->dev_len;
    *ctry = level & 1 ? "*" : c->ctry;
    *cn = level & 1 ? 1 : c->ctry_len;
}

/* Replace a session's contribution old by nw (either may be NULL) in all
 * four grouping sets; a group both fall into is updated once, and each day
 * of the user's stages is read and written once. */
static int apply_contrib(agg_t *a, const uint8_t *uk, size_t ukn, int32_t partition,
                         const contrib_t *old, const contrib_t *nw)
{
    uday_t *dnew = NULL, *dold = NULL;
    int r = 0;
    if (nw) {
        dnew = &a->ud[0];
        r = uday_load(a, dnew, uk, ukn, nw->day);
    }
    if (r == 0 && old) {
        if (dnew && old->day == nw->day) {
            dold = dnew;
        } else {
            dold = &a->ud[1];
            r = uday_load(a, dold, uk, ukn, old->day);
        }
    }
    for (int level = 0; r == 0 && level < 4; level++) {
        const char *od = NULL, *oc = NULL, *nd = NULL, *nc = NULL;
        uint8_t odn = 0, ocn = 0, ndn = 0, ncn = 0;
        if (old)
            group_of(old, level, &od, &odn, &oc, &ocn);
        if (nw)
            group_of(nw, level, &nd, &ndn, &nc, &ncn);
        if (old && nw && old->day == nw->day && odn == ndn && ocn == ncn &&
            memcmp(od, nd, odn) == 0 && memcmp(oc, nc, ocn) == 0) {
            r = apply_group(a, dnew, old, nw, nd, ndn, nc, ncn);
        } else {
            r = old ? apply_group(a, dold, old, NULL, od, odn, oc, ocn) : 0;
            if (r == 0 && nw)
                r = apply_group(a, dnew, NULL, nw, nd, ndn, nc, ncn);
        }
    }
    /* The users' stage multisets are per user, so the partition of either
     * side is the user's. */
    if (r == 0 && dnew) {
        dnew->partition = partition;
        r = uday_store(a, dnew, uk, ukn);
    }
    if (r == 0 && dold && dold != dnew) {
        dold->partition = partition;
        r = uday_store(a, dold, uk, ukn);
    }
    return r;
}

/* ---- sessions ---- */

/* Store the summary s and mark its row: as new when `fresh` (see
 * TAG_SESSION_NEW), else as changed. */
static int put_session(agg_t *a, const uint8_t *uk, size_t ukn, const sess_t *s, int fresh)
{
    uint8_t k[KEY_MAX];
    size_t kn = sess_key(k, uk, ukn, s->start);
    int r = wslot_set_sess(a, &a->ws[WS_SESSIONS], k, kn, s);
    if (r)
        return r;
    return mark_dirty(a, fresh ? TAG_SESSION_NEW : TAG_SESSION, k, kn);
}

/*
 * Find the user's sessions around ts: pred is the last one starting at or
 * before ts, succ the first one starting after it.
 */
static int find_neighbours(agg_t *a, const uint8_t *uk, size_t ukn, const user_t *u, int64_t ts,
                           sess_t *pred, int *has_pred, sess_t *succ, int *has_succ)
{
    uint8_t k[KEY_MAX];
    size_t kn;
    st_cursor_t cur = {0};
    st_val_t ck, cv;
    *has_pred = *has_succ = 0;
    /* A new user has no sessions; an event at or after the start of the
     * user's latest session belongs to it or follows it, so there is no
     * successor. The latest session may have been compacted: then the
     * walk below decides. */
    if (!u)
        return 0;
    if (ts >= u->latest) {
        kn = sess_key(k, uk, ukn, u->latest);
        int r = wslot_get(a, &a->ws[WS_SESSIONS], k, kn, &cv);
        if (r == WSLOT_HELD) {
            *has_pred = 1;
            *pred = a->ws[WS_SESSIONS].s;
            return 0;
        }
        if (r == 0) {
            *has_pred = 1;
            return sess_decode(&cv, pred);
        }
        if (r != ST_ENOTFOUND)
            return r;
    }
    /* The walk reads the database itself, so a held-back session goes in. */
    int r = wslot_write(a, &a->ws[WS_SESSIONS]);
    if (r)
        return r;
    kn = sess_key(k, uk, ukn, ts);
    r = st_cur_open(a->txn, a->env, ST_DB_SESSIONS, &cur);
    if (r)
        return r;
    r = st_cur_seek(&cur, k, kn, &ck, &cv);
    if (r == 0) {
        if (ck.n == kn && memcmp(ck.p, k, ukn) == 0) {
            if (memcmp(ck.p, k, kn) == 0) {
                *has_pred = 1;
                r = sess_decode(&cv, pred);
                if (r == 0) {
                    int r2 = st_cur_next(&cur, &ck, &cv);
                    if (r2 == 0 && ck.n == kn && memcmp(ck.p, k, ukn) == 0) {
                        *has_succ = 1;
                        r = sess_decode(&cv, succ);
                    } else if (r2 != 0 && r2 != ST_ENOTFOUND) {
                        r = r2;
                    }
                }
                goto out;
            }
            *has_succ = 1;
            r = sess_decode(&cv, succ);
            if (r)
                goto out;
        }
        r = st_cur_prev(&cur, &ck, &cv);
    } else if (r == ST_ENOTFOUND) {
        r = st_cur_last(&cur, &ck, &cv);
    }
    if (r == 0 && ck.n == kn && memcmp(ck.p, k, ukn) == 0) {
        *has_pred = 1;
        r = sess_decode(&cv, pred);
    } else if (r == ST_ENOTFOUND || r == 0) {
        r = 0;
    }
out:
    st_cur_close(&cur);
    return r;
}

/*
 * Retire an old session that the new summary s replaces: retract its
 * contribution, drop its state key if the start moved, and delete its row
 * in Postgres if the session id changed.
 */
static int retire_session(agg_t *a, const uint8_t *uk, size_t ukn, const sess_t *old,
                          const sess_t *s)
{
    int r;
    if (old->start != s->start) {
        uint8_t k[KEY_MAX];
        size_t kn = sess_key(k, uk, ukn, old->start);
        if ((r = wslot_set(a, &a->ws[WS_SESSIONS], k, kn, NULL, 0, 1)))
            return r;
    }
    if (old->sid_len != s->sid_len || memcmp(old->sid, s->sid, s->sid_len) != 0) {
        if ((r = mark_dirty(a, TAG_DELETE, (const uint8_t *)old->sid, old->sid_len)))
            return r;
    }
    return 0;
}

/* Fold the event into the user's sessions. u is the user's record (NULL
 * for a new user); *latest receives the start of their latest session. */
static int apply_session(agg_t *a, const uint8_t *uk, size_t ukn, int32_t partition,
                         const ing_event_t *ev, const user_t *u, int64_t *latest,
                         int64_t *session_delta)
{
    sess_t pred, succ, s;
    int has_pred, has_succ;
    int r = find_neighbours(a, uk, ukn, u, ev->ts, &pred, &has_pred, &succ, &has_succ);
    if (r)
        return r;
    const sess_t *old[2];
    int n_old = 0;
    if (has_pred && ev->ts <= pred.end + a->gap) {
        s = pred;
        int extends = ev->ts > pred.end;
        sess_add_event(&s, ev);
        old[n_old++] = &pred;
        if (extends && has_succ && succ.start - s.end <= a->gap) {
            sess_merge(&s, &succ);
            old[n_old++] = &succ;
        }
    } else {
        sess_init(&s, partition);
        sess_add_event(&s, ev);
        if (has_succ && succ.start - ev->ts <= a->gap) {
            sess_merge(&s, &succ);
            old[n_old++] = &succ;
        }
    }
    s.partition = partition;
    *session_delta = 1 - n_old;
    /* Sessions are disjoint, so the new summary is the latest one if it
     * starts later or absorbed the latest one. */
    int64_t prev = u ? u->latest : INT64_MIN;
    *latest = s.start > prev ? s.start : prev;
    for (int i = 0; i < n_old; i++)
        if (old[i]->start == prev)
            *latest = s.start;

    contrib_t cnew, cold[2];
    sess_contrib(&s, &cnew);
    for (int i = 0; i < n_old; i++)
        sess_contrib(old[i], &cold[i]);
    /* The common case, an event that changes neither the session's group
     * nor its stage nor its orders, leaves funnel_daily alone. */
    int same = n_old == 1 && contrib_eq(&cold[0], &cnew);
    for (int i = 0; i < n_old; i++)
        if ((r = retire_session(a, uk, ukn, old[i], &s)))
            return r;
    if (!same) {
        /* The first old session's contribution turns into the new one;
         * a second (merged) one is only retracted. The users' stage
         * multisets are per user, so the partition of either side is the
         * user's. */
        if ((r = apply_contrib(a, uk, ukn, partition, n_old ? &cold[0] : NULL, &cnew)))
            return r;
        if (n_old == 2 && (r = apply_contrib(a, uk, ukn, partition, &cold[1], NULL)))
            return r;
    }
    /* A session's id is the id of its first event, so the merged summary
     * keeps the id of one of the sessions it replaces or takes this event's.
     * The event was never accepted before (the duplicate check), so in the
     * second case no flush can have written a row with that id. */
    int fresh = 1;
    for (int i = 0; i < n_old; i++)
        if (old[i]->sid_len == s.sid_len && memcmp(old[i]->sid, s.sid, s.sid_len) == 0)
            fresh = 0;
    return put_session(a, uk, ukn, &s, fresh);
}

/* ---- users ---- */

/* Room for n weeks in the scratch a->weeks. */
static int weeks_reserve(agg_t *a, size_t n)
{
    return i32_reserve(&a->weeks, &a->weeks_cap, n);
}

/* Read the user's record into u; *found = 0 for a new user. The weeks are
 * copied into a->weeks (room for one more), since the record itself is
 * valid only until the transaction writes again. */
static int load_user(agg_t *a, const uint8_t *uk, size_t ukn, user_t *u, int *found)
{
    st_val_t v;
    const wslot_t *slot = &a->ws[WS_USERS];
    int r = wslot_get(a, slot, uk, ukn, &v);
    if (r == WSLOT_HELD) {
        *found = 1;
        *u = slot->u;
        if ((r = weeks_reserve(a, (size_t)u->nweeks + 1)))
            return r;
        memcpy(a->weeks, slot->weeks, (size_t)u->nweeks * sizeof *a->weeks);
        return 0;
    }
    *found = r == 0;
    if (r == ST_ENOTFOUND)
        return 0;
    if (r || (r = user_decode(&v, u)) || (r = weeks_reserve(a, (size_t)u->nweeks + 1)))
        return r;
    memcpy(a->weeks, u->weeks, (size_t)u->nweeks * 4);
    u->weeks = NULL;
    return 0;
}

static int cohort_add(agg_t *a, int32_t cohort, int32_t week, int64_t delta);
static int32_t week_of(int64_t ts);

/* A user's cohort is the week of their first event; when a late event opens
 * an earlier week, every week the user was active in moves to the new
 * cohort (bounded by the user's active weeks, not their events). The weeks
 * are u->nweeks entries of a->weeks, which has room for one more. */
static int apply_cohort(agg_t *a, user_t *u, const ing_event_t *ev)
{
    int32_t w = week_of(ev->ts);
    int32_t *weeks = a->weeks;
    size_t n = u->nweeks, pos = 0;
    while (pos < n && weeks[pos] < w)
        pos++;
    if (pos < n && weeks[pos] == w)
        return 0;
    int r = 0;
    if (n == 0) {
        r = cohort_add(a, w, w, 1);
    } else if (pos > 0) {
        r = cohort_add(a, weeks[0], w, 1);
    } else {
        for (size_t i = 0; r == 0 && i < n; i++)
            r = cohort_add(a, weeks[0], weeks[i], -1);
        for (size_t i = 0; r == 0 && i < n; i++)
            r = cohort_add(a, w, weeks[i], 1);
        if (r == 0)
            r = cohort_add(a, w, w, 1);
    }
    if (r)
        return r;
    memmove(weeks + pos + 1, weeks + pos, (n - pos) * sizeof *weeks);
    weeks[pos] = w;
    u->nweeks++;
    return 0;
}

/* Fold a clickstream event into the user's record (found: the record
 * existed) and their cohort, and write the record once. */
static int apply_user(agg_t *a, const uint8_t *uk, size_t ukn, int32_t partition,
                      const ing_event_t *ev, int64_t session_delta, user_t *u, int found)
{
    if (!found) {
        int64_t latest = u->latest;
        memset(u, 0, sizeof *u);
        u->first_seen = u->last_seen = ev->ts;
        u->first_order = u->last_order = -1;
        u->latest = latest;
        attr_none(&u->dev);
        attr_none(&u->ctry);
        int r = weeks_reserve(a, 1);
        if (r)
            return r;
    }
    if (ev->ts < u->first_seen)
        u->first_seen = ev->ts;
    if (ev->ts > u->last_seen)
        u->last_seen = ev->ts;
    u->events++;
    u->sessions += session_delta;
    u->partition = partition;
    if (ev->type == ING_ET_PURCHASE) {
        u->orders++;
        u->revenue += ev->amount_cents;
        if (u->first_order < 0 || ev->ts < u->first_order)
            u->first_order = ev->ts;
        if (ev->ts > u->last_order)
            u->last_order = ev->ts;
    }
    attr_offer(&u->dev, ev->ts, ev->event_id, ev->event_id_len, ev->device, ev->device_len);
    attr_offer(&u->ctry, ev->ts, ev->event_id, ev->event_id_len, ev->country, ev->country_len);
    int r = apply_cohort(a, u, ev);
    if (r)
        return r;
    if ((r = wslot_set_user(a, &a->ws[WS_USERS], uk, ukn, u, a->weeks)))
        return r;
    return mark_dirty(a, found ? TAG_USER : TAG_USER_NEW, uk, ukn);
}

/* ---- products, baskets and cohorts (CONTRACT §3 cohort_retention, §4) ---- */

/* Add delta[0..n) to the int64 counters stored under k; a row whose counters
 * all reach zero leaves the state (its Postgres row is then deleted). */
static int add_counters(agg_t *a, enum st_db db, uint8_t tag, const uint8_t *k, size_t kn,
                        const int64_t *delta, int n)
{
    int64_t v[8] = {0};
    centry_t *e;
    int r = cache_row(a, db, k, kn, &e);
    if (r)
        return r;
    if (e->vn == (size_t)n * 8)
        memcpy(v, e->v, e->vn);
    int zero = 1;
    for (int i = 0; i < n; i++) {
        /* Saturate instead of overflowing on absurd but valid inputs
         * (1e6 units at 1e12 each): never undefined behaviour. */
        if (__builtin_add_overflow(v[i], delta[i], &v[i]))
            v[i] = delta[i] > 0 ? INT64_MAX : INT64_MIN;
        zero &= v[i] == 0;
    }
    e->vn = zero ? 0 : (uint8_t)(n * 8);
    memcpy(e->v, v, (size_t)n * 8);
    e->changed = 1;
    if (tag)
        e->tag = tag; /* marked at commit (cache_writeback); one tag per database */
    return 0;
}

static size_t str_key(uint8_t *k, const char *s, uint8_t n)
{
    k[0] = n;
    memcpy(k + 1, s, n);
    return (size_t)n + 1;
}

static int cmp_bytes(const char *a, size_t an, const char *b, size_t bn)
{
    size_t m = an < bn ? an : bn;
    int c = memcmp(a, b, m);
    return c ? c : (an < bn ? -1 : an > bn);
}

static int64_t mul_sat(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

static int apply_products(agg_t *a, const ing_event_t *ev)
{
    int32_t day = (int32_t)day_of(ev->ts);
    uint8_t k[KEY_MAX];
    int r;
    if ((ev->type == ING_ET_PRODUCT_VIEW || ev->type == ING_ET_ADD_TO_CART) && ev->product_id_len) {
        be32(k, (uint32_t)day);
        memcpy(k + 4, ev->product_id, ev->product_id_len);
        int64_t d[5] = {ev->type == ING_ET_PRODUCT_VIEW, ev->type == ING_ET_ADD_TO_CART, 0, 0, 0};
        if ((r = add_counters(a, ST_DB_PRODUCT, TAG_PRODUCT, k, 4 + ev->product_id_len, d, 5)))
            return r;
    }
    if (ev->type != ING_ET_PURCHASE || ev->n_items == 0)
        return 0;
    /* Sort the items by product id (insertion sort: at most 100) so that a
     * product repeated in one order counts once and pairs come out as
     * product_a < product_b byte-wise. */
    int idx[ING_ITEMS_MAX];
    int n = ev->n_items;
    for (int i = 0; i < n; i++) {
        int j = i;
        while (j > 0) {
            const ing_item_t *x = &ev->items[idx[j - 1]], *y = &ev->items[i];
            if (cmp_bytes(x->product_id, x->product_id_len, y->product_id, y->product_id_len) <= 0)
                break;
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
    int uniq[ING_ITEMS_MAX];
    int nu = 0;
    int64_t units_total = 0, rev_total = 0;
    for (int i = 0; i < n;) {
        const ing_item_t *it = &ev->items[idx[i]];
        int64_t units = 0, rev = 0;
        int j = i;
        for (; j < n; j++) {
            const ing_item_t *y = &ev->items[idx[j]];
            if (cmp_bytes(it->product_id, it->product_id_len, y->product_id, y->product_id_len))
                break;
            units += y->quantity;
            int64_t line = mul_sat(y->quantity, y->price_cents);
            rev = __builtin_add_overflow(rev, line, &rev) ? INT64_MAX : rev;
        }
        uniq[nu++] = idx[i];
        units_total += units;
        rev_total = __builtin_add_overflow(rev_total, rev, &rev_total) ? INT64_MAX : rev_total;
        be32(k, (uint32_t)day);
        memcpy(k + 4, it->product_id, it->product_id_len);
        int64_t d[5] = {0, 0, 1, units, rev};
        if ((r = add_counters(a, ST_DB_PRODUCT, TAG_PRODUCT, k, 4 + it->product_id_len, d, 5)))
            return r;
        i = j;
    }
    be32(k, (uint32_t)day);
    int64_t b[3] = {1, units_total, rev_total};
    if ((r = add_counters(a, ST_DB_BASKET, TAG_BASKET, k, 4, b, 3)))
        return r;
    for (int i = 0; i < nu; i++) {
        const ing_item_t *x = &ev->items[uniq[i]];
        for (int j = i + 1; j < nu; j++) {
            const ing_item_t *y = &ev->items[uniq[j]];
            size_t kn = str_key(k, x->product_id, x->product_id_len);
            kn += str_key(k + kn, y->product_id, y->product_id_len);
            int64_t one = 1;
            if ((r = add_counters(a, ST_DB_PAIRS, TAG_PAIR, k, kn, &one, 1)))
                return r;
        }
    }
    return 0;
}

/* The ISO week of a ms as the day number of its Monday (1970-01-01 was a
 * Thursday, so day 0 is 3 days after a Monday). */
static int32_t week_of(int64_t ts)
{
    int64_t d = day_of(ts);
    int64_t dow = ((d + 3) % 7 + 7) % 7;
    return (int32_t)(d - dow);
}

static int cohort_add(agg_t *a, int32_t cohort, int32_t week, int64_t delta)
{
    uint8_t k[8];
    be32(k, (uint32_t)cohort);
    be32(k + 4, (uint32_t)((week - cohort) / 7));
    return add_counters(a, ST_DB_COHORT, TAG_COHORT, k, 8, &delta, 1);
}

/* ---- experiments (CONTRACT §5) ---- */

static const xconf_t *xconf_of(const agg_t *a, const char *name, size_t n)
{
    for (int i = 0; i < a->n_xconf; i++)
        if (strlen(a->xconf[i].name) == n && memcmp(a->xconf[i].name, name, n) == 0)
            return &a->xconf[i];
    return NULL;
}

static const char *x_exposure(const agg_t *a, const xconf_t *x)
{
    return x && x->exposure ? x->exposure : a->exposure_default;
}

static int64_t x_window_ms(const agg_t *a, const xconf_t *x)
{
    return (int64_t)(x && x->window_days > 0 ? x->window_days : a->window_default) * DAY_MS;
}

/* A user's state in one experiment. */
typedef struct xuser {
    int64_t assigned_at; /* earliest assignment ts */
    int64_t exposed_at;  /* -1 while the user has no exposure */
    int32_t partition;
    uint8_t multi; /* assignments to two or more variants: excluded */
    uint8_t aeid_len, var_len;
    char aeid[ING_ID_MAX + 1]; /* event_id of the earliest assignment */
    char var[ING_EXP_MAX + 1]; /* its variant */
    /* The outcome over [exposed_at, exposed_at + window). */
    int64_t orders, revenue, events;
    uint8_t cart, checkout;
} xuser_t;

static size_t xuser_encode(const xuser_t *x, uint8_t *buf, size_t cap)
{
    wr_t w = {buf, 0, cap, 0};
    w_i64(&w, x->assigned_at);
    w_i64(&w, x->exposed_at);
    w_i32(&w, x->partition);
    w_bytes(&w, &x->multi, 1);
    w_str(&w, x->aeid, x->aeid_len);
    w_str(&w, x->var, x->var_len);
    w_i64(&w, x->orders);
    w_i64(&w, x->revenue);
    w_i64(&w, x->events);
    w_bytes(&w, &x->cart, 1);
    w_bytes(&w, &x->checkout, 1);
    return w.overflow ? 0 : w.n;
}

static int xuser_decode(const st_val_t *v, xuser_t *x)
{
    rd_t r = {v->p, v->n, 0, 0};
    x->assigned_at = r_i64(&r);
    x->exposed_at = r_i64(&r);
    x->partition = r_i32(&r);
    r_bytes(&r, &x->multi, 1);
    x->aeid_len = r_str(&r, x->aeid, sizeof x->aeid);
    x->var_len = r_str(&r, x->var, sizeof x->var);
    x->orders = r_i64(&r);
    x->revenue = r_i64(&r);
    x->events = r_i64(&r);
    r_bytes(&r, &x->cart, 1);
    r_bytes(&r, &x->checkout, 1);
    return r.bad ? AGG_ESTATE : 0;
}

/*
 * Retained clickstream events: what exposure and outcome windows need. One
 * record holds the events of one user and one UTC day that one batch
 * applied, keyed by the day, the user key, the batch's sequence and a
 * number within the batch (so that keys never collide and a write needs
 * no read first). The value is the partition of the user's event
 * applied last (for the horizon), then per event the ms of its ts within
 * the day, the amount and the event type as its code, followed by the name
 * only for a type without one (w_i32/w_i64 varints). A batch writes about
 * one record per user and day instead of one per event: a user's events of
 * a batch come in a run (docs/aggregator.md, "Runs of one user"). With the day first, a
 * batch's inserts land in the few days its events fall into, the compactor
 * deletes old days as contiguous ranges, and a user's events are read by one
 * seek per day that holds any (scan_xevents). Duplicates never reach this
 * database (the duplicate index comes first), so no event id is kept.
 */
#define XEV_DAY_LEN 4
#define XEV_SUFFIX_LEN 12 /* be64 batch sequence, be32 record number */

/* The key prefix (day, user) of a user's retained events of one day. */
static size_t xevent_prefix(uint8_t *k, const uint8_t *uk, size_t ukn, int64_t day)
{
    be32(k, (uint32_t)day);
    memcpy(k + XEV_DAY_LEN, uk, ukn);
    return XEV_DAY_LEN + ukn;
}

/* The user key length of an xevents key, 0 when it is malformed. */
static size_t xevent_ukn(const st_val_t *k)
{
    const uint8_t *p = k->p;
    if (k->n < XEV_DAY_LEN + 1)
        return 0;
    size_t ukn = (size_t)p[XEV_DAY_LEN] + 1;
    return k->n == XEV_DAY_LEN + ukn + XEV_SUFFIX_LEN ? ukn : 0;
}

/*
 * The retained events of a batch are queued as the batch's events are
 * applied and written once they are (xq_write), grouped by day and user:
 * the events are applied in user order, but xevents is keyed by day first,
 * so writing them as they come would jump between the days a batch spans.
 * A queue entry is the prefix length, the entry length, the event's
 * partition (4 bytes, host order), the prefix (day, user) and the event's
 * entry of the record.
 */
#define XQ_HDR 6

static int xq_push(agg_t *a, const uint8_t *k, size_t kn, int32_t part, const uint8_t *v, size_t vn)
{
    size_t need = XQ_HDR + kn + vn;
    int r = bytes_reserve(&a->xq, &a->xq_cap, a->xq_len + need);
    if (r)
        return r;
    GROW(a->xq_off, a->xq_n, a->xq_offcap);
    uint8_t *p = a->xq + a->xq_len;
    p[0] = (uint8_t)kn;
    p[1] = (uint8_t)vn;
    memcpy(p + 2, &part, 4);
    memcpy(p + XQ_HDR, k, kn);
    memcpy(p + XQ_HDR + kn, v, vn);
    a->xq_off[a->xq_n++] = a->xq_len;
    a->xq_len += need;
    return 0;
}

/* Whether two queue entries have the same prefix (day, user). */
static int xq_same(const uint8_t *p, const uint8_t *q)
{
    return p[0] == q[0] && memcmp(p + XQ_HDR, q + XQ_HDR, p[0]) == 0;
}

/*
 * Write the queue entries e[0..n) as records, one per run of entries with
 * the same prefix; a record keeps the partition of its last entry.
 */
static int xq_put_groups(agg_t *a, const uint8_t *const *e, size_t n)
{
    for (size_t i = 0; i < n;) {
        const uint8_t *p = e[i];
        size_t j = i + 1, vlen = 5;
        while (j < n && xq_same(e[j], p))
            j++;
        for (size_t m = i; m < j; m++)
            vlen += e[m][1];
        int r = bytes_reserve(&a->xrec, &a->xrec_cap, vlen);
        if (r)
            return r;
        int32_t part;
        memcpy(&part, e[j - 1] + 2, 4);
        wr_t w = {a->xrec, 0, a->xrec_cap, 0};
        w_i32(&w, part);
        for (size_t m = i; m < j; m++)
            w_bytes(&w, e[m] + XQ_HDR + e[m][0], e[m][1]);
        if (w.overflow)
            return AGG_ESTATE;
        uint8_t k[XEV_DAY_LEN + KEY_MAX + XEV_SUFFIX_LEN];
        memcpy(k, p + XQ_HDR, p[0]);
        be64(k + p[0], a->seq + 1);
        be32(k + p[0] + 8, a->xq_rec++);
        if ((r = st_put(a->txn, a->env, ST_DB_XEVENTS, k, p[0] + XEV_SUFFIX_LEN, a->xrec, w.n)))
            return r;
        i = j;
    }
    return 0;
}

/* Room for n pointers in a->xq_sorted. */
static int xq_sorted_reserve(agg_t *a, size_t n)
{
    if (n <= a->xq_sortcap)
        return 0;
    const uint8_t **ns = realloc(a->xq_sorted, n * sizeof *ns);
    if (!ns)
        return AGG_ENOMEM;
    a->xq_sorted = ns;
    a->xq_sortcap = n;
    return 0;
}

/*
 * Before a user's retained events are read: write the user's queued ones.
 * The events are applied sorted by user and then ts, so they are the
 * queue's tail, already grouped by day.
 */
static int xq_write_user(agg_t *a, const uint8_t *uk, size_t ukn)
{
    size_t first = a->xq_n;
    while (first) {
        const uint8_t *p = a->xq + a->xq_off[first - 1];
        if (p[0] != XEV_DAY_LEN + ukn || memcmp(p + XQ_HDR + XEV_DAY_LEN, uk, ukn) != 0)
            break;
        first--;
    }
    size_t n = a->xq_n - first;
    if (n == 0)
        return 0;
    int r = xq_sorted_reserve(a, n);
    if (r)
        return r;
    for (size_t i = 0; i < n; i++)
        a->xq_sorted[i] = a->xq + a->xq_off[first + i];
    if ((r = xq_put_groups(a, a->xq_sorted, n)))
        return r;
    a->xq_len = a->xq_off[first];
    a->xq_n = first;
    return 0;
}

/* The key length of a queued retained event (XQ_HDR bytes, then the key). */
static size_t xq_key_len(const uint8_t *e)
{
    return e[0];
}

/* Write every queued retained event, one record per day and user. */
static int xq_write(agg_t *a)
{
    if (!a->xq_n)
        return 0;
    int r = xq_sorted_reserve(a, a->xq_n);
    if (r)
        return r;
    for (size_t i = 0; i < a->xq_n; i++)
        a->xq_sorted[i] = a->xq + a->xq_off[i];
    if ((r = sort_by_key(a->xq_sorted, a->xq_n, XQ_HDR, xq_key_len)))
        return r;
    if ((r = xq_put_groups(a, a->xq_sorted, a->xq_n)))
        return r;
    a->xq_n = a->xq_len = 0;
    return 0;
}

static int store_xevent(agg_t *a, const uint8_t *uk, size_t ukn, int32_t partition,
                        const ing_event_t *ev)
{
    uint8_t k[XEV_DAY_LEN + KEY_MAX], buf[128];
    int64_t day = day_of(ev->ts);
    size_t kn = xevent_prefix(k, uk, ukn, day);
    wr_t w = {buf, 0, sizeof buf, 0};
    w_i32(&w, (int32_t)(ev->ts - day * DAY_MS));
    w_i64(&w, ev->type == ING_ET_PURCHASE ? ev->amount_cents : 0);
    /* The code of the name itself, so that a decoded name is always the
     * stored one. */
    uint8_t code = (uint8_t)ing_etype_from(ev->event_type, ev->event_type_len);
    w_bytes(&w, &code, 1);
    if (code == ING_ET_OTHER)
        w_str(&w, ev->event_type, ev->event_type_len);
    return xq_push(a, k, kn, partition, buf, w.n);
}

typedef struct xev {
    int64_t ts, cents;
    char type[ING_TYPE_MAX + 1];
    uint8_t type_len;
} xev_t;

/* The next event of a record of day `day` being read by r; 1 when there
 * is one, 0 at the end, AGG_ESTATE when the record is malformed. */
static int xev_next(rd_t *r, int64_t day, xev_t *e)
{
    if (r->off >= r->n)
        return 0;
    int32_t ms = r_i32(r);
    e->ts = day * DAY_MS + ms;
    e->cents = r_i64(r);
    uint8_t code = ING_ET_OTHER;
    r_bytes(r, &code, 1);
    if (code == ING_ET_OTHER) {
        e->type_len = r_str(r, e->type, sizeof e->type);
    } else {
        const char *name = ing_etype_name((ing_etype_t)code);
        e->type_len = name ? (uint8_t)strlen(name) : 0;
        if (!name)
            r->bad = 1;
        else
            memcpy(e->type, name, e->type_len + 1u);
    }
    return r->bad || ms < 0 || ms >= DAY_MS ? AGG_ESTATE : 1;
}

static void outcome_add(xuser_t *x, const char *type, size_t tn, int64_t cents)
{
    x->events++;
    if (tn == 8 && memcmp(type, "purchase", 8) == 0) {
        x->orders++;
        x->revenue += cents;
    } else if (tn == 11 && memcmp(type, "add_to_cart", 11) == 0) {
        x->cart = 1;
    } else if (tn == 8 && memcmp(type, "checkout", 8) == 0) {
        x->checkout = 1;
    }
}

/*
 * Read the user's retained events in [from, before). With `found` set,
 * return in *found the ts of the earliest event of type `exposure` (-1 when
 * none); otherwise (x set) recompute the outcome over the range. Every
 * event an accepted event can still reach is retained (docs/aggregator.md),
 * so this sees the whole window. A record's events are in no particular
 * order, so a day is read whole; the days are read in ascending order, so
 * the first day with an exposure holds the earliest.
 */
static int scan_xevents(agg_t *a, const uint8_t *uk, size_t ukn, int64_t from, int64_t before,
                        const char *exposure, xuser_t *x, int64_t *found)
{
    uint8_t k[XEV_DAY_LEN + KEY_MAX];
    st_cursor_t cur = {0};
    st_val_t ck, cv;
    size_t expn = exposure ? strlen(exposure) : 0;
    if (found)
        *found = -1;
    else if (x) {
        x->orders = x->revenue = x->events = 0;
        x->cart = x->checkout = 0;
    }
    if (before <= from)
        return 0;
    int r = xq_write_user(a, uk, ukn);
    if (r == 0)
        r = st_cur_open(a->txn, a->env, ST_DB_XEVENTS, &cur);
    if (r)
        return r;
    /* A skip-scan over the days: seek (day, user); a hit on a later day
     * jumps there, a hit on another user moves to the next day. */
    int64_t day = day_of(from), last = day_of(before - 1);
    while (day <= last) {
        size_t pn = xevent_prefix(k, uk, ukn, day);
        r = st_cur_seek(&cur, k, pn, &ck, &cv);
        if (r)
            break;
        int64_t kday = (int64_t)(int32_t)rd_be32(ck.p);
        if (kday > day) {
            day = kday;
            continue;
        }
        for (; r == 0; r = st_cur_next(&cur, &ck, &cv)) {
            if (xevent_ukn(&ck) != ukn || memcmp(ck.p, k, pn) != 0)
                break;
            rd_t rd = {cv.p, cv.n, 0, 0};
            (void)r_i32(&rd); /* the partition */
            xev_t e;
            int more;
            while ((more = xev_next(&rd, day, &e)) == 1) {
                if (e.ts < from || e.ts >= before)
                    continue;
                if (found) {
                    if (exposure && e.type_len == expn && memcmp(e.type, exposure, expn) == 0 &&
                        (*found < 0 || e.ts < *found))
                        *found = e.ts;
                } else if (x) {
                    outcome_add(x, e.type, e.type_len, e.cents);
                }
            }
            if (more < 0) {
                r = more;
                break;
            }
        }
        if (r && r != ST_ENOTFOUND)
            break;
        r = 0;
        if (found && *found >= 0)
            break;
        day++;
    }
    st_cur_close(&cur);
    return r == ST_ENOTFOUND ? 0 : r;
}

static size_t exp_key(uint8_t *k, const char *name, uint8_t n)
{
    return str_key(k, name, n);
}

/* Add (sign 1) or retract (sign -1) a user's contribution to the
 * experiment's aggregates: the variant's sufficient statistics, the
 * regression cell (variant, window events) and the excluded count. */
static int x_contrib(agg_t *a, const uint8_t *ek, size_t ekn, const xuser_t *x, int sign)
{
    if (x->exposed_at < 0)
        return 0;
    int r;
    if (x->multi) {
        int64_t d = sign;
        return add_counters(a, ST_DB_XEXP, TAG_EXPERIMENT, ek, ekn, &d, 1);
    }
    uint8_t vk[KEY_MAX];
    memcpy(vk, ek, ekn);
    size_t vkn = ekn + str_key(vk + ekn, x->var, x->var_len);
    stx_suff_t sf;
    memset(&sf, 0, sizeof sf);
    centry_t *e;
    if ((r = cache_row(a, ST_DB_XVAR, vk, vkn, &e)))
        return r;
    if (e->vn == sizeof sf)
        memcpy(&sf, e->v, sizeof sf);
    stx_user_t u = {x->orders > 0, x->orders, x->revenue, x->events, x->cart, x->checkout};
    if (stx_suff_apply(&sf, &u, sign) != 0)
        return AGG_ESTATE;
    /* Variant records stay at zero users, so that a flush can still find
     * and delete the rows of a variant that lost its last user. */
    memcpy(e->v, &sf, sizeof sf);
    e->vn = sizeof sf;
    e->changed = 1;
    /* The experiment's marks go into the dirty set once per variant and
     * batch (the cache and the set both live for the batch); add_counters
     * may move the cache's entries, so e is not used after it. */
    int mark = !e->xmarked;
    e->xmarked = 1;
    uint8_t ck[KEY_MAX];
    memcpy(ck, vk, vkn);
    int64_t ev = x->events > INT32_MAX ? INT32_MAX : x->events;
    be32(ck + vkn, (uint32_t)ev);
    int64_t d[2] = {sign, (int64_t)sign * (x->orders > 0)};
    if ((r = add_counters(a, ST_DB_XCELL, 0, ck, vkn + 4, d, 2)))
        return r;
    if (!mark)
        return 0;
    if ((r = mark_dirty(a, TAG_REGRESSION, ek, ekn)))
        return r;
    return mark_dirty(a, TAG_EXPERIMENT, ek, ekn);
}

/*
 * Whether the user_exposure row of old and x differ (and with it whether the
 * user_outcomes row is there at all): variant, assignment, exposure and the
 * several-variants flag. A new record (old NULL) always does.
 */
static int exposure_moved(const xuser_t *old, const xuser_t *x)
{
    return !old || old->assigned_at != x->assigned_at || old->exposed_at != x->exposed_at ||
           old->multi != x->multi || old->var_len != x->var_len ||
           memcmp(old->var, x->var, x->var_len) != 0;
}

/*
 * Writes the record and marks its rows. When only the window outcome moved,
 * only the user_outcomes row is marked: a flush then does not send the
 * exposure row again for nothing (docs/aggregator.md, "Flushes").
 */
static int put_xuser(agg_t *a, const uint8_t *k, size_t kn, const xuser_t *old, const xuser_t *x)
{
    uint8_t buf[REC_MAX];
    size_t n = xuser_encode(x, buf, sizeof buf);
    if (!n)
        return AGG_ESTATE;
    int r = st_put(a->txn, a->env, ST_DB_XUSER, k, kn, buf, n);
    uint8_t tag = !old ? TAG_EXPOSURE_NEW : exposure_moved(old, x) ? TAG_EXPOSURE : TAG_OUTCOME;
    return r ? r : mark_dirty(a, tag, k, kn);
}

/* Replace a user's contribution old -> x (either may be "absent": exposed_at < 0). */
static int x_update(agg_t *a, const uint8_t *k, size_t kn, size_t ukn, const xuser_t *old,
                    const xuser_t *x)
{
    int r;
    const uint8_t *ek = k + ukn;
    size_t ekn = kn - ukn;
    if (old && (r = x_contrib(a, ek, ekn, old, -1)))
        return r;
    if ((r = x_contrib(a, ek, ekn, x, 1)))
        return r;
    /* The experiment row exists once any user is assigned. */
    if ((r = mark_dirty(a, TAG_EXPERIMENT, ek, ekn)))
        return r;
    return put_xuser(a, k, kn, old, x);
}

static int apply_assignment(agg_t *a, const uint8_t *uk, size_t ukn, int32_t partition,
                            const ing_event_t *ev)
{
    uint8_t k[KEY_MAX];
    memcpy(k, uk, ukn);
    size_t kn = ukn + exp_key(k + ukn, ev->experiment, ev->experiment_len);
    xuser_t x, old;
    st_val_t v;
    int r = st_get(a->txn, a->env, ST_DB_XUSER, k, kn, &v);
    int fresh = r == ST_ENOTFOUND;
    if (r == 0)
        r = xuser_decode(&v, &x);
    else if (fresh)
        r = 0;
    if (r)
        return r;
    if (fresh) {
        memset(&x, 0, sizeof x);
        x.exposed_at = -1;
        x.assigned_at = TS_NONE;
    }
    old = x;
    x.partition = partition;
    if (!fresh && (x.var_len != ev->variant_len || memcmp(x.var, ev->variant, x.var_len) != 0))
        x.multi = 1;
    if (fresh ||
        ev_less(ev->ts, ev->event_id, ev->event_id_len, x.assigned_at, x.aeid, x.aeid_len)) {
        x.aeid_len = ev->event_id_len;
        memcpy(x.aeid, ev->event_id, ev->event_id_len + 1);
        x.var_len = ev->variant_len;
        memcpy(x.var, ev->variant, ev->variant_len + 1);
        int moved = ev->ts < x.assigned_at;
        if (moved)
            x.assigned_at = ev->ts;
        if (moved) {
            /* An earlier assignment can make an earlier exposure eligible. */
            const xconf_t *xc = xconf_of(a, ev->experiment, ev->experiment_len);
            int64_t found;
            int64_t before = x.exposed_at >= 0 ? x.exposed_at : TS_NONE;
            if ((r = scan_xevents(a, uk, ukn, x.assigned_at, before, x_exposure(a, xc), NULL,
                                  &found)))
                return r;
            if (found >= 0) {
                x.exposed_at = found;
                if ((r = scan_xevents(a, uk, ukn, found, found + x_window_ms(a, xc), NULL, &x,
                                      NULL)))
                    return r;
            }
        }
    }
    if ((r = x_update(a, k, kn, ukn, fresh ? NULL : &old, &x)))
        return r;
    /* Kept on abort too: a stale member only costs one walk. */
    return fresh ? kset_add(&a->xusers, uk, ukn) : 0;
}

/* A clickstream event may expose the user in their experiments, move an
 * exposure earlier, or fall into an outcome window. */
static int apply_xclick(agg_t *a, const uint8_t *uk, size_t ukn, int32_t partition,
                        const ing_event_t *ev)
{
    int r = store_xevent(a, uk, ukn, partition, ev);
    if (r)
        return r;
    /* Most users are in no experiment: skip the database walk for them. */
    if (!kset_has(&a->xusers, uk, ukn))
        return 0;
    /* Collect the user's experiment keys first: updating while a cursor
     * walks the same database is avoided on purpose. */
    uint8_t keys[16][KEY_MAX];
    size_t kns[16];
    int nk = 0;
    st_cursor_t cur = {0};
    st_val_t ck, cv;
    if ((r = st_cur_open(a->txn, a->env, ST_DB_XUSER, &cur)))
        return r;
    int more = 0;
    for (r = st_cur_seek(&cur, uk, ukn, &ck, &cv); r == 0; r = st_cur_next(&cur, &ck, &cv)) {
        if (ck.n <= ukn || memcmp(ck.p, uk, ukn) != 0 || ck.n > KEY_MAX)
            break;
        if (nk == 16) {
            more = 1;
            break;
        }
        memcpy(keys[nk], ck.p, ck.n);
        kns[nk++] = ck.n;
    }
    st_cur_close(&cur);
    if (r && r != ST_ENOTFOUND)
        return r;
    if (more)
        cm_warn("user in more than 16 experiments: only the first 16 are updated", "user=%.*s",
                (int)ev->user_id_len, ev->user_id);
    for (int i = 0; i < nk; i++) {
        st_val_t v;
        xuser_t x, old;
        if ((r = st_get(a->txn, a->env, ST_DB_XUSER, keys[i], kns[i], &v)) ||
            (r = xuser_decode(&v, &x)))
            return r;
        old = x;
        const uint8_t *ek = keys[i] + ukn;
        const xconf_t *xc = xconf_of(a, (const char *)ek + 1, ek[0]);
        const char *exposure = x_exposure(a, xc);
        int64_t win = x_window_ms(a, xc);
        int changed = 0;
        if (ev->event_type_len == strlen(exposure) &&
            memcmp(ev->event_type, exposure, ev->event_type_len) == 0 && ev->ts >= x.assigned_at &&
            (x.exposed_at < 0 || ev->ts < x.exposed_at)) {
            x.exposed_at = ev->ts;
            if ((r = scan_xevents(a, uk, ukn, ev->ts, ev->ts + win, NULL, &x, NULL)))
                return r;
            changed = 1;
        } else if (x.exposed_at >= 0 && ev->ts >= x.exposed_at && ev->ts < x.exposed_at + win) {
            outcome_add(&x, ev->event_type, ev->event_type_len,
                        ev->type == ING_ET_PURCHASE ? ev->amount_cents : 0);
            changed = 1;
        }
        if (changed && (r = x_update(a, keys[i], kns[i], ukn, &old, &x)))
            return r;
    }
    return 0;
}

/* ---- events and rejects ---- */

static int store_reject(agg_t *a, int32_t partition, int64_t offset, ing_reason_t reason,
                        const char *detail, const char *payload, size_t len, int64_t now_ms)
{
    uint8_t k[12];
    be32(k, (uint32_t)partition);
    be64(k + 4, (uint64_t)offset);
    size_t dn = strlen(detail);
    if (dn > 255)
        dn = 255;
    size_t pn = len > AGG_REJECT_PAYLOAD_MAX ? AGG_REJECT_PAYLOAD_MAX : len;
    uint8_t buf[AGG_REJECT_PAYLOAD_MAX + 300];
    wr_t w = {buf, 0, sizeof buf, 0};
    w_i32(&w, (int32_t)reason);
    w_i64(&w, now_ms);
    w_str(&w, detail, (uint8_t)dn);
    w_i32(&w, (int32_t)pn);
    w_bytes(&w, payload ? payload : "", pn);
    return st_put(a->txn, a->env, ST_DB_REJECTS, k, sizeof k, buf, w.n);
}

int agg_apply_reject(agg_t *a, int32_t partition, int64_t offset, ing_reason_t reason,
                     const char *detail, const char *payload, size_t len, int64_t now_ms)
{
    agg_partition_t *p;
    int r = get_part(a, partition, &p);
    if (r)
        return r;
    if ((r = store_reject(a, partition, offset, reason, detail, payload, len, now_ms)))
        return r;
    p->rejected++;
    if (reason > 0 && reason < ING_R__COUNT)
        p->rejects_by_reason[reason]++;
    p->next_offset = offset + 1;
    return 0;
}

/*
 * The mart updates of a batch are queued and applied sorted by user key (then
 * ts): every per-user database is keyed by user first, so consecutive updates
 * land on the same or the next leaf page, which the store's write cursors
 * reach without descending from the root, and which are still in the CPU's
 * caches. The marts are a function of the set of accepted events, not of
 * their order (CONTRACT §3), so the order of application is free; the
 * acceptance checks (watermark, duplicates) stay in arrival order.
 */
/* Bytes of the user key held in a queued event's sort key (two words). */
#define PEV_KEY_LEN 16

typedef struct pev {
    uint64_t k[2]; /* the first 16 bytes of the user key, big-endian, 0-padded */
    int64_t ts;
    size_t off; /* the event's packed copy in evbuf */
    int32_t partition;
    uint32_t seq; /* arrival order, the last tie-break */
} pev_t;

static const ing_packed_t *pev_event(const uint8_t *evbuf, const pev_t *q)
{
    return (const ing_packed_t *)(const void *)(evbuf + q->off);
}

/* Order of two queued events; arg is the arena of the event copies. The
 * sort key holds user ids of up to 15 bytes whole, so most comparisons never
 * read the copies (a cache miss each). */
static inline int pev_cmp(const void *arg, const pev_t *p, const pev_t *q)
{
    for (int i = 0; i < 2; i++)
        if (p->k[i] != q->k[i])
            return p->k[i] < q->k[i] ? -1 : 1;
    /* Equal first 16 bytes: the same length byte and first 15 id bytes. */
    const ing_packed_t *ea = pev_event(arg, p);
    size_t ulen = ea->len[ING_PF_USER_ID];
    if (ulen >= PEV_KEY_LEN) {
        const ing_packed_t *eb = pev_event(arg, q);
        int c =
            memcmp(ing_packed_str(ea, ING_PF_USER_ID) + PEV_KEY_LEN - 1,
                   ing_packed_str(eb, ING_PF_USER_ID) + PEV_KEY_LEN - 1, ulen - (PEV_KEY_LEN - 1));
        if (c)
            return c;
    }
    if (p->ts != q->ts)
        return p->ts < q->ts ? -1 : 1;
    return p->seq < q->seq ? -1 : p->seq > q->seq;
}

MSORT_DEFINE(pev_sort, pev_t, pev_cmp)

/* Queue an accepted event: a copy of its packed form. */
static int pev_push(agg_t *a, int32_t partition, const ing_packed_t *ev)
{
    size_t n = ev->size;
    int r = bytes_reserve(&a->evbuf, &a->evcap, a->evlen + n);
    if (r)
        return r;
    GROW(a->pev, a->n_pev, a->cap_pev);
    memcpy(a->evbuf + a->evlen, ev, n);
    pev_t *q = &a->pev[a->n_pev];
    uint8_t uk[KEY_MAX];
    size_t ukn = user_key(uk, ing_packed_str(ev, ING_PF_USER_ID), ev->len[ING_PF_USER_ID]);
    prefix_words(uk, ukn, q->k);
    q->ts = ev->ts;
    q->off = a->evlen;
    q->partition = partition;
    q->seq = (uint32_t)a->n_pev;
    a->evlen += n;
    a->n_pev++;
    a->pev_sorted = 0;
    return 0;
}

/* The mart updates of one accepted event (§3-§6). */
static int apply_marts(agg_t *a, int32_t partition, const ing_event_t *ev)
{
    int r;
    uint8_t uk[KEY_MAX];
    size_t ukn = user_key(uk, ev->user_id, ev->user_id_len);
    if (ev->type == ING_ET_ASSIGNMENT)
        return apply_assignment(a, uk, ukn, partition, ev);
    int64_t session_delta = 0;
    user_t u;
    int found;
    if ((r = load_user(a, uk, ukn, &u, &found)) ||
        (r = apply_session(a, uk, ukn, partition, ev, found ? &u : NULL, &u.latest,
                           &session_delta)) ||
        (r = apply_user(a, uk, ukn, partition, ev, session_delta, &u, found)) ||
        (r = apply_products(a, ev)))
        return r;
    return apply_xclick(a, uk, ukn, partition, ev);
}

/* How many events ahead agg_batch_drain prefetches an event's copy. */
#define PEV_PREFETCH 2

int agg_batch_drain(agg_t *a, size_t max_events)
{
    if (!a->pev_sorted && a->n_pev > a->pev_done) {
        /* Events queued after a partial drain: the users' queued retained
         * events are no longer the queue's tail when their turn comes. */
        int r = a->pev_done ? xq_write(a) : 0;
        if (r)
            return r;
        size_t n = a->n_pev - a->pev_done;
        pev_t *tmp = malloc((n / 2 + 1) * sizeof *tmp);
        if (!tmp)
            return AGG_ENOMEM;
        pev_sort(a->pev + a->pev_done, n, tmp, a->evbuf);
        free(tmp);
        a->pev_sorted = 1;
    }
    if (a->pev_done < a->n_pev && !a->uev && !(a->uev = malloc(sizeof *a->uev)))
        return AGG_ENOMEM;
    for (size_t n = 0; a->pev_done < a->n_pev; n++) {
        if (max_events && n == max_events) {
            int r = wslots_write(a);
            return r ? r : 1;
        }
        const pev_t *q = &a->pev[a->pev_done];
        if (a->pev_done + PEV_PREFETCH < a->n_pev) {
            /* The sorted order visits the copies at random: fetch the one
             * applied a few events from now (its fixed part) ahead of time. */
            const ing_packed_t *p = pev_event(a->evbuf, q + PEV_PREFETCH);
            __builtin_prefetch(p);
            __builtin_prefetch((const char *)p + 64);
        }
        ing_unpack(pev_event(a->evbuf, q), a->uev);
        int r = apply_marts(a, q->partition, a->uev);
        if (r)
            return r;
        a->pev_done++;
    }
    a->n_pev = a->pev_done = a->evlen = 0;
    int r = wslots_write(a);
    return r ? r : xq_write(a);
}

int agg_apply_event(agg_t *a, int32_t partition, int64_t offset, const ing_event_t *ev,
                    const char *payload, size_t len, int64_t now_ms)
{
    if (!a->pack && !(a->pack = malloc(ING_PACKED_MAX)))
        return AGG_ENOMEM;
    ing_pack(ev, a->pack);
    return agg_apply_packed(a, partition, offset, (const ing_packed_t *)(void *)a->pack, payload,
                            len, now_ms);
}

/* The duplicate index's key of ev's event_id (the check and the prefetch
 * must agree on it). */
static XXH128_hash_t id_key(const ing_packed_t *ev)
{
    XXH128_hash_t h = XXH3_128bits(ing_packed_str(ev, ING_PF_EVENT_ID), ev->len[ING_PF_EVENT_ID]);
    dkey_fix(&h.high64, &h.low64);
    return h;
}

void agg_prefetch_packed(const agg_t *a, const ing_packed_t *ev)
{
    XXH128_hash_t h = id_key(ev);
    dset_prefetch(&a->dedup, h.high64, h.low64);
}

int agg_apply_packed(agg_t *a, int32_t partition, int64_t offset, const ing_packed_t *ev,
                     const char *payload, size_t len, int64_t now_ms)
{
    agg_partition_t *p;
    int r = get_part(a, partition, &p);
    if (r)
        return r;
    /* §2: the watermark check comes before the duplicate check. */
    if (p->watermark >= 0 && ev->ts < p->watermark - a->lateness)
        return agg_apply_reject(a, partition, offset, ING_R_TOO_LATE, "", payload, len, now_ms);

    XXH128_hash_t h = id_key(ev);
    if (dset_find(&a->dedup, h.high64, h.low64)) {
        p->duplicates++;
        p->next_offset = offset + 1;
        return 0;
    }
    /* The log gets the id at commit, with the rest of the batch's ids. */
    if ((r = dset_put(&a->dedup, h.high64, h.low64, ev->ts)) ||
        (r = dlog_add(&a->fresh, ev->ts, h.high64, h.low64, partition)))
        return r;

    if ((r = pev_push(a, partition, ev)))
        return r;
    p->accepted++;
    a->batch_events++;
    if (ev->ts > p->watermark)
        p->watermark = ev->ts;
    p->next_offset = offset + 1;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Compaction past the horizon (docs/aggregator.md, "Horizon").           */

/* The oldest ts a partition can still accept; INT64_MIN when it has none. */
static int64_t horizon(const agg_t *a, int32_t p)
{
    if (p < 0 || p >= AGG_MAX_PARTITIONS || a->parts[p].watermark < 0)
        return INT64_MIN;
    return a->parts[p].watermark - a->lateness;
}

static int is_dirty(agg_t *a, uint8_t tag, const void *k, size_t n)
{
    uint8_t buf[KEY_MAX + 1];
    buf[0] = tag;
    memcpy(buf + 1, k, n);
    return kset_has(&a->pend, buf, n + 1) || kset_has(&a->dirty, buf, n + 1);
}

/* Whether the user of ustage key k still has a live session starting on day. */
static int has_session_on_day(agg_t *a, const uint8_t *uk, size_t ukn, int64_t day)
{
    uint8_t k[KEY_MAX];
    size_t kn = sess_key(k, uk, ukn, day * DAY_MS);
    st_val_t ck, cv;
    /* The compactor asks in user order: the transaction's sessions cursor
     * mostly finds the key on the page it stands on. */
    int r = st_seek(a->txn, a->env, ST_DB_SESSIONS, k, kn, &ck, &cv);
    if (r == ST_ENOTFOUND)
        return 0;
    if (r != 0)
        return 1; /* unsure: keep the stages */
    if (ck.n != kn || memcmp(ck.p, k, ukn) != 0)
        return 0;
    int64_t start = (int64_t)rd_be64((const uint8_t *)ck.p + ukn);
    return start < (day + 1) * DAY_MS;
}

enum { SW_SESSIONS = 0, SW_USTAGE, SW_DEDUP, SW_XEVENTS };

/* Decide whether one entry is final and may leave the state. */
/*
 * Whether the entry (k, v) of database `which` is final and may go: 1 yes,
 * 0 no, negative on error. *weight is how many entries it counts for
 * against the compactor's budget (a duplicate-log chunk: its ids).
 */
static int sweep_final(agg_t *a, int which, const st_val_t *k, const st_val_t *v, int64_t *weight)
{
    const uint8_t *kp = k->p;
    *weight = 1;
    if (which == SW_DEDUP) {
        /* A chunk of the duplicate log goes once every id in it lies behind
         * its partition's horizon; its ids leave memory when the batch
         * commits. A chunk with an id still inside stays whole. */
        size_t n = v->n / DLOG_REC;
        *weight = n ? (int64_t)n : 1;
        int final = k->n == 12 && n > 0 && v->n % DLOG_REC == 0;
        for (size_t i = 0; final && i < n; i++) {
            int64_t ts;
            uint64_t hi, lo;
            int32_t p;
            dlog_get((const uint8_t *)v->p + i * DLOG_REC, &ts, &hi, &lo, &p);
            final = ts < horizon(a, p);
        }
        /* The value points into the map: copy the ids before the delete. */
        if (final) {
            int r = dlog_append(&a->swept, v->p, n);
            if (r)
                return r;
        }
        return final;
    }
    if (which == SW_XEVENTS) {
        /* A retained event older than the horizon can no longer fall into
         * a window that may still move (docs/aggregator.md); a record goes
         * when all of its events are. */
        rd_t r = {v->p, v->n, 0, 0};
        int32_t p = r_i32(&r);
        if (r.bad || !xevent_ukn(k))
            return 0;
        int64_t day = (int32_t)rd_be32(kp), h = horizon(a, p), n = 0;
        xev_t e;
        int more, final = 1;
        while ((more = xev_next(&r, day, &e)) == 1) {
            n++;
            final = final && e.ts < h;
        }
        *weight = n ? n : 1;
        return more == 0 && final;
    }
    if (which == SW_SESSIONS) {
        int64_t end;
        int32_t part;
        sess_t s;
        /* No accepted event can reach a session that ended more than a
         * gap before the horizon; its row in Postgres is final. A record
         * that does not decode whole is never final. */
        if (sess_peek(v, &end, &part) != 0 || !(end + a->gap < horizon(a, part)) ||
            is_dirty(a, TAG_SESSION, k->p, k->n) || is_dirty(a, TAG_SESSION_NEW, k->p, k->n))
            return 0;
        return sess_decode(v, &s) == 0;
    }
    /* A user's day of funnel stages: final once the day lies behind the
     * horizon and none of the user's sessions that day is still live. */
    rd_t r = {v->p, v->n, 0, 0};
    int32_t part = r_i32(&r);
    if (r.bad || k->n < 1)
        return 0;
    size_t ukn = (size_t)kp[0] + 1;
    if (k->n != ukn + 4)
        return 0;
    int64_t day = (int32_t)rd_be32(kp + ukn);
    if ((day + 1) * DAY_MS > horizon(a, part))
        return 0;
    return !has_session_on_day(a, kp, ukn, day);
}

static int sweep_db(agg_t *a, int which, enum st_db db, int64_t budget)
{
    st_cursor_t cur = {0};
    st_val_t k, v;
    int r = st_cur_open(a->txn, a->env, db, &cur);
    if (r)
        return r;
    uint8_t zero = 0;
    if (a->sweep_len[which])
        r = st_cur_seek(&cur, a->sweep_key[which], a->sweep_len[which], &k, &v);
    else
        r = st_cur_seek(&cur, &zero, 1, &k, &v);
    /* Retained events are keyed by day first: past the day of the latest
     * horizon nothing can be final, so the walk wraps there. */
    int64_t hmax = INT64_MIN;
    if (which == SW_XEVENTS)
        for (int32_t p = 0; p < AGG_MAX_PARTITIONS; p++)
            if (a->parts[p].known && horizon(a, p) > hmax)
                hmax = horizon(a, p);
    int64_t seen = 0;
    while (seen < budget) {
        if (r == 0 && which == SW_XEVENTS && k.n >= XEV_DAY_LEN &&
            (hmax == INT64_MIN || (int64_t)rd_be32(k.p) * DAY_MS > hmax))
            r = ST_ENOTFOUND;
        if (r == ST_ENOTFOUND) {
            /* Wrap around: the next batch starts again at the beginning. */
            a->sweep_len[which] = 0;
            r = 0;
            break;
        }
        if (r)
            break;
        int64_t weight;
        int fin = sweep_final(a, which, &k, &v, &weight);
        if (fin < 0) {
            r = fin;
            break;
        }
        seen += weight;
        if (fin) {
            if ((r = st_cur_del(&cur)))
                break;
            /* After a delete LMDB's cursor already stands on the next entry. */
            r = st_cur_next(&cur, &k, &v);
            if (r == 0 && k.n <= KEY_MAX) {
                memcpy(a->sweep_key[which], k.p, k.n);
                a->sweep_len[which] = k.n;
            }
            continue;
        }
        r = st_cur_next(&cur, &k, &v);
        if (r == 0 && k.n <= KEY_MAX) {
            memcpy(a->sweep_key[which], k.p, k.n);
            a->sweep_len[which] = k.n;
        }
    }
    st_cur_close(&cur);
    return r == ST_ENOTFOUND ? 0 : r;
}

/* Write the open batch's new ids to the duplicate log under its sequence. */
static int log_fresh(agg_t *a, uint64_t seq)
{
    int r = 0;
    for (size_t i = 0; r == 0 && i < a->fresh.n; i += DLOG_CHUNK) {
        size_t n = a->fresh.n - i < DLOG_CHUNK ? a->fresh.n - i : DLOG_CHUNK;
        uint8_t k[12];
        size_t kn = log_key(k, seq, (uint32_t)(i / DLOG_CHUNK));
        r = st_put(a->txn, a->env, ST_DB_DEDUP, k, kn, a->fresh.b + i * DLOG_REC, n * DLOG_REC);
    }
    return r;
}

static int sweep(agg_t *a)
{
    if (a->sweep_per_batch <= 0)
        return 0;
    /* Each accepted event adds one entry to the dedup log and about one to
     * xevents, so the compactor examines at least twice the batch's events:
     * it then keeps pace with intake and the state stays bounded by the
     * horizon, at a constant cost per event. */
    int64_t budget = a->sweep_per_batch;
    if (budget < 2 * a->batch_events)
        budget = 2 * a->batch_events;
    int r;
    if ((r = sweep_db(a, SW_SESSIONS, ST_DB_SESSIONS, budget)) ||
        (r = sweep_db(a, SW_USTAGE, ST_DB_USTAGE, budget)) ||
        (r = sweep_db(a, SW_DEDUP, ST_DB_DEDUP, budget)) ||
        (r = sweep_db(a, SW_XEVENTS, ST_DB_XEVENTS, budget)))
        return r;
    return 0;
}

int agg_batch_commit(agg_t *a)
{
    uint64_t seq = a->seq + 1;
    int r = agg_batch_drain(a, 0);
    if (r == 0)
        r = cache_writeback(a);
    if (r == 0)
        r = st_put(a->txn, a->env, ST_DB_META, META_SEQ, 3, &seq, sizeof seq);
    /* The batch's marks, sorted, as a few records of the dirty log. */
    const uint8_t **marks = NULL;
    size_t nm = 0;
    if (r == 0)
        r = marks_sorted(&a->dirty, &marks, &nm);
    uint8_t *chunk = nm ? malloc(MLOG_CHUNK) : NULL;
    if (nm && !chunk)
        r = AGG_ENOMEM;
    size_t used = 0;
    uint32_t nchunk = 0;
    for (size_t i = 0; r == 0 && i <= nm; i++) {
        size_t n = i < nm ? packed_len(marks[i]) + 2 : 0;
        if (used && (i == nm || used + n > MLOG_CHUNK)) {
            uint8_t k[12];
            r = st_put(a->txn, a->env, ST_DB_DIRTY, k, log_key(k, seq, nchunk++), chunk, used);
            used = 0;
        }
        if (i < nm) {
            memcpy(chunk + used, marks[i], n);
            used += n;
        }
    }
    free(chunk);
    free(marks);
    for (int p = 0; r == 0 && p < AGG_MAX_PARTITIONS; p++) {
        if (!a->touched[p])
            continue;
        uint8_t k[5];
        part_key(k, p);
        r = st_put(a->txn, a->env, ST_DB_META, k, sizeof k, &a->parts[p], sizeof a->parts[p]);
    }
    /* The batch's ids join the log in the transaction that holds its state,
     * before the sweep, which may then already drop a chunk whose ids all
     * fell behind the horizon while the batch moved the watermarks. */
    if (r == 0)
        r = log_fresh(a, seq);
    if (r == 0)
        r = sweep(a);
    uint64_t nr = 0;
    if (r == 0)
        r = st_count(a->txn, a->env, ST_DB_REJECTS, &nr);
    if (r == 0) {
        r = st_commit(a->txn);
        a->txn = NULL;
        if (r == 0) {
            a->seq = seq;
            a->outer_batches += a->outer != NULL;
            /* The batch's marks join the unflushed set; without memory for
             * them the set is read back from the log. */
            int pr = kset_add_packed(&a->pend, a->dirty.arena, a->dirty.alen);
            if (pr)
                cm_err("cannot track the unflushed rows", "error=\"%s\"", agg_strerror(pr));
            a->pending = a->pend.n + nr;
            kset_reset(&a->dirty);
            for (size_t i = 0; i < a->swept.n; i++) {
                int64_t ts;
                uint64_t hi, lo;
                int32_t p;
                if (i + DSET_AHEAD < a->swept.n) {
                    /* The ids lie at random in an index larger than the
                     * caches: fetch the slot of one a few entries on. */
                    dlog_get(a->swept.b + (i + DSET_AHEAD) * DLOG_REC, &ts, &hi, &lo, &p);
                    dset_prefetch(&a->dedup, hi, lo);
                }
                dlog_get(a->swept.b + i * DLOG_REC, &ts, &hi, &lo, &p);
                dset_del_ts(&a->dedup, hi, lo, ts);
            }
            a->fresh.n = a->swept.n = 0;
            return 0;
        }
        kset_reset(&a->dirty);
        cache_reset(&a->cache);
        forget_fresh(a);
        load_partitions(a);
        return r;
    }
    agg_batch_abort(a);
    return r;
}

/* ---------------------------------------------------------------------- */
/* Flush collection (any thread) and completion (loop thread).            */

typedef struct chunk {
    struct chunk *next;
    size_t used, cap;
    char data[];
} chunk_t;

/* The lists of a generic table in a flush. */
enum gen_kind { GEN_UPSERT, GEN_DEL, GEN_NEW, GEN__COUNT };

struct agg_flush {
    uint64_t seq;
    int regression;
    chunk_t *chunks;
    snk_session_row_t *sessions;
    size_t n_sessions, cap_sessions;
    const char **deleted;
    size_t n_deleted, cap_deleted;
    snk_user_row_t *users;
    size_t n_users, cap_users;
    snk_funnel_row_t *funnel;
    size_t n_funnel, cap_funnel;
    snk_partition_row_t *parts;
    size_t n_parts, cap_parts;
    snk_reject_row_t *rejects;
    size_t n_rejects, cap_rejects;
    /* Marks this flush leaves dirty (a regression not refitted yet). */
    kset_t kept;
    int part;        /* written ahead (AGG_FLUSH_PART): its rows commit with the final flush */
    int users_later; /* a part that keeps the per-user marks (AGG_FLUSH_USERS_LATER) */
    uint8_t (*reject_keys)[12];
    size_t n_reject_keys, cap_reject_keys;
    /* The rejects (their 12-byte keys) that the parts of the open
     * transaction wrote, up to and including this one when it is a part: a
     * later part skips them, and the final flush takes only their keys, so
     * that agg_flush_done deletes them from the state with its own. A
     * reject never changes, so the row a part wrote is the row. */
    kset_t rej_ahead;
    /* Generic tables, per table: rows to upsert, keys to delete and rows
     * new to Postgres (snk_rows_t), each a list of gen_kind. */
    struct gen_list {
        snk_val_t *v[GEN__COUNT];
        size_t n[GEN__COUNT], cap[GEN__COUNT];
    } gen[SNK_TABLE__COUNT];
    snk_batch_t batch;
};

/* Room for one more generic row (a key for GEN_DEL) of table t in the list
 * of that kind; NULL without memory. */
static snk_val_t *gen_row(agg_flush_t *f, enum snk_table t, enum gen_kind kind)
{
    struct gen_list *g = &f->gen[t];
    size_t w = (size_t)(kind == GEN_DEL ? snk_table_nkey(t) : snk_table_ncols(t));
    snk_val_t **arr = &g->v[kind];
    size_t *n = &g->n[kind], *cap = &g->cap[kind];
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        snk_val_t *np = realloc(*arr, nc * w * sizeof *np);
        if (!np)
            return NULL;
        *arr = np;
        *cap = nc;
    }
    snk_val_t *row = *arr + (*n)++ * w;
    memset(row, 0, w * sizeof *row);
    return row;
}

static void v_int(snk_val_t *v, int64_t i)
{
    v->i = i;
}

static void *arena_alloc(agg_flush_t *f, size_t n)
{
    chunk_t *c = f->chunks;
    if (!c || c->used + n > c->cap) {
        size_t cap = n > (1u << 20) ? n : (1u << 20);
        c = malloc(sizeof *c + cap);
        if (!c)
            return NULL;
        c->cap = cap;
        c->used = 0;
        c->next = f->chunks;
        f->chunks = c;
    }
    void *p = c->data + c->used;
    c->used += (n + 7) & ~(size_t)7;
    if (c->used > c->cap)
        c->used = c->cap;
    return p;
}

static char *arena_str(agg_flush_t *f, const void *s, size_t n)
{
    char *p = arena_alloc(f, n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- experiment rows (flush thread) ---- */

#define XMAX_VARIANTS 64

typedef struct xvariants {
    int n; /* variants ever seen */
    char name[XMAX_VARIANTS][ING_EXP_MAX + 1];
    stx_suff_t suff[XMAX_VARIANTS];
    int live[XMAX_VARIANTS]; /* indices of variants with users, byte order */
    int n_live;
    int control; /* index into name, or -1 */
} xvariants_t;

static int load_variants(agg_t *a, st_txn_t *txn, const uint8_t *ek, size_t ekn, xvariants_t *xv)
{
    xv->n = xv->n_live = 0;
    xv->control = -1;
    st_cursor_t cur = {0};
    st_val_t k, v;
    int r = st_cur_open(txn, a->env, ST_DB_XVAR, &cur);
    if (r)
        return r;
    for (r = st_cur_seek(&cur, ek, ekn, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v)) {
        const uint8_t *kp = k.p;
        if (k.n <= ekn || memcmp(kp, ek, ekn) != 0)
            break;
        if (xv->n == XMAX_VARIANTS)
            break;
        size_t vn = kp[ekn];
        if (ekn + 1 + vn != k.n || vn > ING_EXP_MAX || v.n != sizeof(stx_suff_t)) {
            r = AGG_ESTATE;
            break;
        }
        memcpy(xv->name[xv->n], kp + ekn + 1, vn);
        xv->name[xv->n][vn] = '\0';
        memcpy(&xv->suff[xv->n], v.p, sizeof(stx_suff_t));
        if (xv->suff[xv->n].users > 0)
            xv->live[xv->n_live++] = xv->n;
        xv->n++;
    }
    st_cur_close(&cur);
    if (r && r != ST_ENOTFOUND)
        return r;
    /* The control (§5): the configured variant if it is one of them, else
     * 'control' if it is one of them, else the smallest. */
    const xconf_t *xc = xconf_of(a, (const char *)ek + 1, ek[0]);
    const char *want[2] = {xc && xc->control ? xc->control : NULL, "control"};
    for (int w = 0; w < 2 && xv->control < 0; w++)
        for (int i = 0; want[w] && i < xv->n_live; i++)
            if (!strcmp(xv->name[xv->live[i]], want[w]))
                xv->control = xv->live[i];
    if (xv->control < 0 && xv->n_live > 0)
        xv->control = xv->live[0];
    return 0;
}

/* The expected split of the live variants (§5): the configured weights, or
 * NULL for an equal split, which is also the fallback when the
 * configuration does not weigh every variant. */
static const double *expected_split(const agg_t *a, const uint8_t *ek, const xvariants_t *xv,
                                    double *weights)
{
    const xconf_t *xc = xconf_of(a, (const char *)ek + 1, ek[0]);
    if (!xc || xc->n_weights <= 0)
        return NULL;
    for (int i = 0; i < xv->n_live; i++) {
        int found = 0;
        for (int w = 0; w < xc->n_weights; w++)
            if (!strcmp(xc->weight_names[w], xv->name[xv->live[i]])) {
                weights[i] = xc->weights[w];
                found = 1;
            }
        if (!found)
            return NULL;
    }
    return weights;
}

static void v_f(snk_val_t *v, stx_val_t x)
{
    v->f = x.v;
    v->null = !x.ok;
}

static int exp_rows(agg_t *a, agg_flush_t *f, st_txn_t *txn, const uint8_t *ek, size_t ekn)
{
    xvariants_t *xv = malloc(sizeof *xv);
    if (!xv)
        return AGG_ENOMEM;
    int r = load_variants(a, txn, ek, ekn, xv);
    if (r) {
        free(xv);
        return r;
    }
    const char *exp = arena_str(f, ek + 1, ek[0]);
    if (!exp) {
        free(xv);
        return AGG_ENOMEM;
    }
    const xconf_t *xc = xconf_of(a, exp, ek[0]);
    /* Rows of variants without users (and all rows without any) go. */
    for (int i = 0; i < xv->n; i++) {
        if (xv->suff[i].users > 0)
            continue;
        snk_val_t *d = gen_row(f, SNK_EXPERIMENT_RESULTS, GEN_DEL);
        if (!d || !(d[1].s = arena_str(f, xv->name[i], strlen(xv->name[i])))) {
            free(xv);
            return AGG_ENOMEM;
        }
        d[0].s = exp;
    }
    if (xv->n_live == 0) {
        snk_val_t *d = gen_row(f, SNK_EXPERIMENTS, GEN_DEL);
        if (!d) {
            free(xv);
            return AGG_ENOMEM;
        }
        d[0].s = exp;
        free(xv);
        return 0;
    }
    int k = xv->n_live;
    int64_t users[XMAX_VARIANTS], conv[XMAX_VARIANTS], notconv[XMAX_VARIANTS], total = 0;
    double weights[XMAX_VARIANTS];
    for (int i = 0; i < k; i++) {
        const stx_suff_t *sf = &xv->suff[xv->live[i]];
        users[i] = sf->users;
        conv[i] = sf->converters;
        notconv[i] = sf->users - sf->converters;
        total += sf->users;
    }
    stx_val_t srm_chi2, srm_p, chi2, chi2_p;
    int srm_detected = 0;
    stx_srm(users, expected_split(a, ek, xv, weights), k, &srm_chi2, &srm_p, &srm_detected);
    stx_chi2_independence(conv, notconv, k, &chi2, &chi2_p);
    int64_t excluded = 0;
    st_val_t v;
    if (st_get(txn, a->env, ST_DB_XEXP, ek, ekn, &v) == 0 && v.n == 8)
        memcpy(&excluded, v.p, 8);
    snk_val_t *e = gen_row(f, SNK_EXPERIMENTS, GEN_UPSERT);
    const char *ctl = arena_str(f, xv->name[xv->control], strlen(xv->name[xv->control]));
    if (!e || !ctl) {
        free(xv);
        return AGG_ENOMEM;
    }
    e[0].s = exp;
    e[1].s = ctl;
    e[2].i = k;
    e[3].i = total;
    e[4].i = excluded;
    v_f(&e[5], srm_chi2);
    v_f(&e[6], srm_p);
    e[7].i = srm_detected;
    e[7].null = !srm_p.ok;
    v_f(&e[8], chi2);
    v_f(&e[9], chi2_p);
    e[10].i = (int64_t)(x_window_ms(a, xc) / DAY_MS);

    const stx_suff_t *c = &xv->suff[xv->control];
    for (int i = 0; i < k; i++) {
        int vi = xv->live[i];
        const stx_suff_t *sf = &xv->suff[vi];
        snk_val_t *row = gen_row(f, SNK_EXPERIMENT_RESULTS, GEN_UPSERT);
        const char *vname = arena_str(f, xv->name[vi], strlen(xv->name[vi]));
        if (!row || !vname) {
            free(xv);
            return AGG_ENOMEM;
        }
        stx_variant_t sv;
        stx_variant_summary(sf, &sv);
        row[0].s = exp;
        row[1].s = vname;
        row[2].i = sf->users;
        row[3].i = sf->converters;
        v_f(&row[4], sv.conversion_rate);
        row[5].i = sf->orders;
        row[6].i = sf->revenue_cents;
        v_f(&row[7], sv.revenue_per_user);
        v_f(&row[8], sv.revenue_sd);
        v_f(&row[9], sv.events_per_user);
        v_f(&row[10], sv.cart_rate);
        v_f(&row[11], sv.checkout_rate);
        row[12].i = vi == xv->control;
        stx_compare_t cmp;
        memset(&cmp, 0, sizeof cmp); /* every statistic NULL on the control row */
        if (vi != xv->control)
            stx_compare(sf, c, a->alpha, a->n_star, &cmp);
        stx_val_t cols[16] = {cmp.abs_lift,   cmp.rel_lift,    cmp.diff_ci_low, cmp.diff_ci_high,
                              cmp.rel_ci_low, cmp.rel_ci_high, cmp.z,           cmp.p_value,
                              cmp.seq_ci_low, cmp.seq_ci_high, cmp.seq_p_value, cmp.chance_to_win,
                              cmp.rpu_diff,   cmp.rpu_ci_low,  cmp.rpu_ci_high, cmp.rpu_p_value};
        for (int j = 0; j < 16; j++)
            v_f(&row[13 + j], cols[j]);
    }
    free(xv);
    return 0;
}

/* The logistic regression of §5 over the experiment's (variant, events)
 * cells: grouped data give the same fit as the user rows. */
static int regression_rows(agg_t *a, agg_flush_t *f, st_txn_t *txn, const uint8_t *ek, size_t ekn)
{
    xvariants_t *xv = malloc(sizeof *xv);
    if (!xv)
        return AGG_ENOMEM;
    int r = load_variants(a, txn, ek, ekn, xv);
    const char *exp = r ? NULL : arena_str(f, ek + 1, ek[0]);
    if (r || !exp) {
        free(xv);
        return r ? r : AGG_ENOMEM;
    }
    /* Columns: intercept, one indicator per non-control variant, ln(1+events). */
    int col_of[XMAX_VARIANTS];
    int p = 1;
    for (int i = 0; i < xv->n; i++)
        col_of[i] = -1;
    for (int i = 0; i < xv->n_live; i++)
        if (xv->live[i] != xv->control && p < STX_LOGIT_MAX_P - 1)
            col_of[xv->live[i]] = p++;
    int p_total = p + 1;
    size_t cap = 256, n = 0;
    double *X = malloc(cap * (size_t)p_total * sizeof *X);
    int64_t *succ = malloc(cap * sizeof *succ), *trials = malloc(cap * sizeof *trials);
    int64_t total = 0;
    st_cursor_t cur = {0};
    st_val_t k, v;
    if (!X || !succ || !trials)
        r = AGG_ENOMEM;
    if (r == 0)
        r = st_cur_open(txn, a->env, ST_DB_XCELL, &cur);
    for (r = r ? r : st_cur_seek(&cur, ek, ekn, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v)) {
        const uint8_t *kp = k.p;
        if (k.n <= ekn || memcmp(kp, ek, ekn) != 0)
            break;
        size_t vn = kp[ekn];
        if (ekn + 1 + vn + 4 != k.n || v.n != 16) {
            r = AGG_ESTATE;
            break;
        }
        int vi = -1;
        for (int i = 0; i < xv->n; i++)
            if (strlen(xv->name[i]) == vn && memcmp(xv->name[i], kp + ekn + 1, vn) == 0)
                vi = i;
        int64_t cell[2];
        memcpy(cell, v.p, 16);
        if (vi < 0 || cell[0] <= 0)
            continue;
        if (n == cap) {
            cap *= 2;
            double *nx = realloc(X, cap * (size_t)p_total * sizeof *X);
            int64_t *ns = realloc(succ, cap * sizeof *succ);
            int64_t *nt = ns ? realloc(trials, cap * sizeof *trials) : NULL;
            if (nx)
                X = nx;
            if (ns)
                succ = ns;
            if (nt)
                trials = nt;
            if (!nx || !ns || !nt) {
                r = AGG_ENOMEM;
                break;
            }
        }
        double *row = X + n * (size_t)p_total;
        memset(row, 0, (size_t)p_total * sizeof *row);
        row[0] = 1.0;
        if (col_of[vi] > 0)
            row[col_of[vi]] = 1.0;
        row[p_total - 1] = log1p((double)rd_be32(kp + ekn + 1 + vn));
        succ[n] = cell[1];
        trials[n] = cell[0];
        total += cell[0];
        n++;
    }
    st_cur_close(&cur);
    if (r == ST_ENOTFOUND)
        r = 0;
    stx_logit_t fit;
    int ok = r == 0 && n > 0 &&
             stx_logit_grouped(X, succ, trials, n, p_total, STX_LOGIT_MAX_ITER, &fit) == 0;
    /* Terms that are not in this fit (or every term, when the fit is
     * undefined) are deleted: the variant names cover every term a previous
     * fit can have written. */
    for (int i = 0; r == 0 && i < xv->n + 2; i++) {
        const char *term = i == xv->n       ? "intercept"
                           : i == xv->n + 1 ? "log_engagement"
                                            : xv->name[i];
        int in_fit = ok && (i >= xv->n || col_of[i] > 0);
        if (in_fit)
            continue;
        snk_val_t *d = gen_row(f, SNK_EXPERIMENT_REGRESSION, GEN_DEL);
        if (!d || !(d[1].s = arena_str(f, term, strlen(term)))) {
            r = AGG_ENOMEM;
            break;
        }
        d[0].s = exp;
    }
    for (int j = 0; r == 0 && ok && j < p_total; j++) {
        const char *term = j == 0 ? "intercept" : j == p_total - 1 ? "log_engagement" : NULL;
        for (int i = 0; !term && i < xv->n; i++)
            if (col_of[i] == j)
                term = xv->name[i];
        snk_val_t *row = gen_row(f, SNK_EXPERIMENT_REGRESSION, GEN_UPSERT);
        if (!row || !(row[1].s = arena_str(f, term, strlen(term)))) {
            r = AGG_ENOMEM;
            break;
        }
        row[0].s = exp;
        row[2].f = fit.coef[j];
        row[3].f = fit.std_err[j];
        row[4].f = fit.z[j];
        row[5].f = fit.p_value[j];
        row[6].i = total;
    }
    free(X);
    free(succ);
    free(trials);
    free(xv);
    return r;
}

/* Whether the flush's marks hold row key rk under tag as well. */
static int marked_as(const kset_t *marked, uint8_t tag, const uint8_t *rk, size_t rkn)
{
    uint8_t k[KEY_MAX + 1];
    if (rkn >= KEY_MAX)
        return 0;
    k[0] = tag;
    memcpy(k + 1, rk, rkn);
    return kset_has(marked, k, rkn + 1);
}

/* The new mark whose rows include those of change mark `tag` (0: none). A
 * change mark beside the new mark of its key adds nothing: the new mark
 * writes the rows, and a list must not hold a key twice. */
static uint8_t new_twin(uint8_t tag)
{
    switch (tag) {
    case TAG_SESSION:
        return TAG_SESSION_NEW;
    case TAG_USER:
        return TAG_USER_NEW;
    case TAG_EXPOSURE:
    case TAG_OUTCOME:
        return TAG_EXPOSURE_NEW;
    default:
        return 0;
    }
}

/* The row(s) of mark k into f; `marked` is every mark the flush collects. */
static int collect_dirty(agg_t *a, agg_flush_t *f, st_txn_t *txn, const kset_t *marked,
                         const st_val_t *k)
{
    const uint8_t *kp = k->p;
    uint8_t tag = kp[0];
    const uint8_t *rk = kp + 1;
    size_t rkn = k->n - 1;
    st_val_t v;
    int r;
    /* While catching up a user active all along changes again before the
     * tick: such a part leaves the per-user rows to the flush, which writes
     * each once instead of once per part. */
    if (f->users_later && (tag == TAG_USER || tag == TAG_USER_NEW || tag == TAG_EXPOSURE ||
                           tag == TAG_OUTCOME || tag == TAG_EXPOSURE_NEW))
        return kset_add(&f->kept, k->p, k->n);
    uint8_t twin = new_twin(tag);
    if (twin && marked_as(marked, twin, rk, rkn))
        return 0;
    if (tag == TAG_SESSION || tag == TAG_SESSION_NEW) {
        r = st_get(txn, a->env, ST_DB_SESSIONS, rk, rkn, &v);
        if (r == ST_ENOTFOUND)
            return 0; /* merged away since: its id is deleted by a 'D' mark */
        if (r)
            return r;
        sess_t s;
        if ((r = sess_decode(&v, &s)))
            return r;
        GROW(f->sessions, f->n_sessions, f->cap_sessions);
        snk_session_row_t *row = &f->sessions[f->n_sessions];
        row->session_id = arena_str(f, s.sid, s.sid_len);
        row->user_id = arena_str(f, rk + 1, rk[0]);
        row->started_at = s.start;
        row->ended_at = s.end;
        row->events = s.c[C_EVENTS];
        row->page_views = s.c[C_PAGE_VIEWS];
        row->product_views = s.c[C_PRODUCT_VIEWS];
        row->add_to_carts = s.c[C_ADD_TO_CARTS];
        row->checkouts = s.c[C_CHECKOUTS];
        row->purchases = s.c[C_PURCHASES];
        row->revenue_cents = s.revenue;
        row->device = arena_str(f, attr_value(&s.dev), strlen(attr_value(&s.dev)));
        row->country = arena_str(f, attr_value(&s.ctry), strlen(attr_value(&s.ctry)));
        row->funnel_stage = sess_stage(&s);
        row->is_new = tag == TAG_SESSION_NEW;
        if (!row->session_id || !row->user_id || !row->device || !row->country)
            return AGG_ENOMEM;
        f->n_sessions++;
    } else if (tag == TAG_DELETE) {
        GROW(f->deleted, f->n_deleted, f->cap_deleted);
        if (!(f->deleted[f->n_deleted++] = arena_str(f, rk, rkn)))
            return AGG_ENOMEM;
    } else if (tag == TAG_USER || tag == TAG_USER_NEW) {
        r = st_get(txn, a->env, ST_DB_USERS, rk, rkn, &v);
        if (r == ST_ENOTFOUND)
            return 0;
        if (r)
            return r;
        user_t u;
        if ((r = user_decode(&v, &u)))
            return r;
        GROW(f->users, f->n_users, f->cap_users);
        snk_user_row_t *row = &f->users[f->n_users];
        row->user_id = arena_str(f, rk + 1, rk[0]);
        row->first_seen = u.first_seen;
        row->last_seen = u.last_seen;
        row->device = arena_str(f, attr_value(&u.dev), strlen(attr_value(&u.dev)));
        row->country = arena_str(f, attr_value(&u.ctry), strlen(attr_value(&u.ctry)));
        row->events = u.events;
        row->sessions = u.sessions;
        row->orders = u.orders;
        row->revenue_cents = u.revenue;
        row->first_order_at = u.first_order;
        row->last_order_at = u.last_order;
        row->is_new = tag == TAG_USER_NEW;
        if (!row->user_id || !row->device || !row->country)
            return AGG_ENOMEM;
        f->n_users++;
    } else if (tag == TAG_PRODUCT || tag == TAG_PAIR || tag == TAG_BASKET || tag == TAG_COHORT) {
        enum st_db db = tag == TAG_PRODUCT  ? ST_DB_PRODUCT
                        : tag == TAG_PAIR   ? ST_DB_PAIRS
                        : tag == TAG_BASKET ? ST_DB_BASKET
                                            : ST_DB_COHORT;
        enum snk_table t = tag == TAG_PRODUCT  ? SNK_PRODUCT_DAILY
                           : tag == TAG_PAIR   ? SNK_PRODUCT_PAIRS
                           : tag == TAG_BASKET ? SNK_BASKET_DAILY
                                               : SNK_COHORT_RETENTION;
        int64_t c[8] = {0};
        r = st_get(txn, a->env, db, rk, rkn, &v);
        if (r != 0 && r != ST_ENOTFOUND)
            return r;
        int found = r == 0 && v.n <= sizeof c;
        if (found)
            memcpy(c, v.p, v.n);
        snk_val_t *row = gen_row(f, t, found ? GEN_UPSERT : GEN_DEL);
        if (!row)
            return AGG_ENOMEM;
        /* The key columns come first, then the counters. */
        int nk = 0;
        if (tag == TAG_PAIR) {
            if (rkn < 2 || (size_t)rk[0] + 2 > rkn || (size_t)rk[0] + 2 + rk[rk[0] + 1] > rkn)
                return AGG_ESTATE;
            row[0].s = arena_str(f, rk + 1, rk[0]);
            row[1].s = arena_str(f, rk + 2 + rk[0], rk[rk[0] + 1]);
            if (!row[0].s || !row[1].s)
                return AGG_ENOMEM;
            nk = 2;
        } else {
            if (rkn < 4)
                return AGG_ESTATE;
            v_int(&row[0], (int32_t)rd_be32(rk));
            nk = 1;
            if (tag == TAG_PRODUCT) {
                row[1].s = arena_str(f, rk + 4, rkn - 4);
                if (!row[1].s)
                    return AGG_ENOMEM;
                nk = 2;
            } else if (tag == TAG_COHORT) {
                if (rkn < 8)
                    return AGG_ESTATE;
                v_int(&row[1], (int32_t)rd_be32(rk + 4));
                nk = 2;
            }
        }
        if (found) {
            int w = snk_table_ncols(t);
            for (int i = nk; i < w; i++)
                v_int(&row[i], c[i - nk]);
        }
    } else if (tag == TAG_EXPOSURE || tag == TAG_OUTCOME || tag == TAG_EXPOSURE_NEW) {
        /* An outcome mark next to an exposure mark of the same key adds
         * nothing: the exposure mark writes both rows (and a list must not
         * hold a key twice). */
        if (tag == TAG_OUTCOME && marked_as(marked, TAG_EXPOSURE, rk, rkn))
            return 0;
        int fresh = tag == TAG_EXPOSURE_NEW;
        r = st_get(txn, a->env, ST_DB_XUSER, rk, rkn, &v);
        if (r == ST_ENOTFOUND)
            return 0;
        if (r)
            return r;
        xuser_t x;
        if ((r = xuser_decode(&v, &x)))
            return r;
        size_t ukn = (size_t)rk[0] + 1;
        if (ukn + 1 > rkn || ukn + 1 + rk[ukn] != rkn)
            return AGG_ESTATE;
        const char *user = arena_str(f, rk + 1, rk[0]);
        const char *exp = arena_str(f, rk + ukn + 1, rk[ukn]);
        const char *var = arena_str(f, x.var, x.var_len);
        if (!user || !exp || !var)
            return AGG_ENOMEM;
        if (tag != TAG_OUTCOME) {
            snk_val_t *e = gen_row(f, SNK_USER_EXPOSURE, fresh ? GEN_NEW : GEN_UPSERT);
            if (!e)
                return AGG_ENOMEM;
            e[0].s = exp;
            e[1].s = user;
            e[2].s = var;
            e[3].i = x.assigned_at;
            e[4].i = x.exposed_at;
            e[4].null = x.exposed_at < 0;
            e[5].i = x.multi;
        }
        /* A user_outcomes row that must not exist is deleted even for a new
         * pair: a flush that Postgres committed but the state never
         * recorded (a crash between the two) may have written it while the
         * pair was still included, and the new mark survives that crash. */
        int included = x.exposed_at >= 0 && !x.multi;
        snk_val_t *o = gen_row(f, SNK_USER_OUTCOMES,
                               !included ? GEN_DEL
                               : fresh   ? GEN_NEW
                                         : GEN_UPSERT);
        if (!o)
            return AGG_ENOMEM;
        o[0].s = exp;
        o[1].s = user;
        if (included) {
            o[2].s = var;
            o[3].i = x.exposed_at;
            o[4].i = x.orders > 0;
            o[5].i = x.orders;
            o[6].i = x.revenue;
            o[7].i = x.events;
            o[8].i = x.cart;
            o[9].i = x.checkout;
        }
    } else if (tag == TAG_EXPERIMENT) {
        if (rkn < 1 || (size_t)rk[0] + 1 != rkn)
            return AGG_ESTATE;
        if ((r = exp_rows(a, f, txn, rk, rkn)))
            return r;
    } else if (tag == TAG_REGRESSION) {
        if (!f->regression) /* stays dirty until a flush refits */
            return kset_add(&f->kept, k->p, k->n);
        if (rkn >= 1 && (size_t)rk[0] + 1 == rkn) {
            if ((r = regression_rows(a, f, txn, rk, rkn)))
                return r;
        }
        /* Cell keys are longer: they only mark their experiment. */
    } else if (tag == TAG_FUNNEL) {
        int64_t c[F_N] = {0};
        r = st_get(txn, a->env, ST_DB_FUNNEL, rk, rkn, &v);
        if (r == 0 && v.n == sizeof c)
            memcpy(c, v.p, sizeof c);
        else if (r != ST_ENOTFOUND && r != 0)
            return r;
        if (rkn < 6)
            return AGG_ESTATE;
        GROW(f->funnel, f->n_funnel, f->cap_funnel);
        snk_funnel_row_t *row = &f->funnel[f->n_funnel];
        row->day = (int32_t)rd_be32(rk);
        uint8_t dn = rk[4];
        if ((size_t)dn + 6 > rkn || (size_t)dn + 6 + rk[5 + dn] > rkn)
            return AGG_ESTATE;
        row->device = arena_str(f, rk + 5, dn);
        row->country = arena_str(f, rk + 6 + dn, rk[5 + dn]);
        for (int i = 0; i < 5; i++) {
            row->sessions_ge[i] = c[F_SESS + i];
            row->users_ge[i] = c[F_USERS + i];
        }
        row->orders = c[F_ORDERS];
        row->revenue_cents = c[F_REVENUE];
        if (!row->device || !row->country)
            return AGG_ENOMEM;
        f->n_funnel++;
    }
    return 0;
}

/* The flush deletes reject key kp (12 bytes) from the state when it is done. */
static int reject_key(agg_flush_t *f, const uint8_t *kp)
{
    GROW(f->reject_keys, f->n_reject_keys, f->cap_reject_keys);
    memcpy(f->reject_keys[f->n_reject_keys++], kp, 12);
    return 0;
}

static int collect_reject(agg_t *a, agg_flush_t *f, const st_val_t *k, const st_val_t *v)
{
    if (k->n != 12)
        return AGG_ESTATE;
    rd_t r = {v->p, v->n, 0, 0};
    int32_t reason = r_i32(&r);
    int64_t at = r_i64(&r);
    char detail[256];
    r_str(&r, detail, sizeof detail);
    int32_t pn = r_i32(&r);
    if (r.bad || pn < 0 || r.off + (size_t)pn > v->n)
        return AGG_ESTATE;
    GROW(f->rejects, f->n_rejects, f->cap_rejects);
    const uint8_t *kp = k->p;
    snk_reject_row_t *row = &f->rejects[f->n_rejects];
    row->topic = a->topic;
    row->partition = (int32_t)rd_be32(kp);
    row->offset = (int64_t)rd_be64(kp + 4);
    row->reason = ing_reason_name((ing_reason_t)reason);
    row->detail = arena_str(f, detail, strlen(detail));
    row->payload = arena_str(f, (const uint8_t *)v->p + r.off, (size_t)pn);
    row->payload_len = (size_t)pn;
    row->rejected_at = at;
    if (!row->detail || !row->payload)
        return AGG_ENOMEM;
    f->n_rejects++;
    return reject_key(f, kp);
}

/*
 * The marks whose rows the parts up to prev have not written in their
 * current version: every mark a batch after prev's snapshot set (each batch
 * logs every key it marks, so a row changed since is among them), and the
 * marks prev left dirty. Nothing else: each part wrote or left dirty every
 * mark up to its snapshot, and only the marks a part chose not to write are
 * left dirty (a regression, which a part never refits, and with
 * AGG_FLUSH_USERS_LATER the per-user rows), each kept in its `kept` set, so
 * by induction every mark up to prev's snapshot was written, in its current
 * version unless marked again since, or is among prev's.
 */
static int marks_since(agg_t *a, st_txn_t *txn, const agg_flush_t *prev, kset_t *marked)
{
    int r = mlog_load(a, txn, prev->seq, marked);
    return r ? r : kset_add_packed(marked, prev->kept.arena, prev->kept.alen);
}

int agg_flush_collect(agg_t *a, int regression, agg_flush_t **out)
{
    return agg_flush_collect_after(a, regression ? AGG_FLUSH_REGRESSION : 0, NULL, out);
}

int agg_flush_collect_after(agg_t *a, int flags, const agg_flush_t *prev, agg_flush_t **out)
{
    if (prev && !prev->part)
        return AGG_EINVAL;
    agg_flush_t *f = calloc(1, sizeof *f);
    if (!f)
        return AGG_ENOMEM;
    f->part = (flags & AGG_FLUSH_PART) != 0;
    f->users_later = f->part && (flags & AGG_FLUSH_USERS_LATER) != 0;
    f->regression = !f->part && (flags & AGG_FLUSH_REGRESSION) != 0;
    st_txn_t *txn;
    int own = 1;
    int r = (flags & AGG_FLUSH_LOOP) ? rtxn_begin(a, &txn, &own) : st_begin(a->env, 1, &txn);
    if (r) {
        free(f);
        return r;
    }
    st_val_t k, v;
    if (st_get(txn, a->env, ST_DB_META, META_SEQ, 3, &v) == 0 && v.n == 8)
        memcpy(&f->seq, v.p, 8);
    st_cursor_t cur = {0};
    /* Every row marked by a batch of the snapshot, once, in key order. */
    kset_t marked = {0};
    const uint8_t **marks = NULL;
    size_t nm = 0;
    r = prev ? marks_since(a, txn, prev, &marked) : mlog_load(a, txn, 0, &marked);
    if (r == 0 && (r = marks_sorted(&marked, &marks, &nm)) == 0) {
        for (size_t i = 0; r == 0 && i < nm; i++) {
            st_val_t mk = {marks[i] + 2, packed_len(marks[i])};
            if (mk.n > 1)
                r = collect_dirty(a, f, txn, &marked, &mk);
        }
    }
    free(marks);
    kset_free(&marked);
    /* The rejects that no earlier part of the transaction wrote (prev's
     * set holds them all). A part writes them too: they never change, and
     * the flush at the tick, which rows wait for, then has fewer to write
     * (at 100 000 events/s about 2 000, 25-30 ms of its statements). A part
     * carries prev's set and its own rejects on to the next. */
    const kset_t *ahead = prev ? &prev->rej_ahead : NULL;
    if ((r == 0 || r == ST_ENOTFOUND) && ahead && f->part)
        r = kset_add_packed(&f->rej_ahead, ahead->arena, ahead->alen);
    if ((r == 0 || r == ST_ENOTFOUND) && (r = st_cur_open(txn, a->env, ST_DB_REJECTS, &cur)) == 0) {
        uint8_t zero = 0;
        for (r = st_cur_seek(&cur, &zero, 1, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v)) {
            if (k.n == 12 && ahead && kset_has(ahead, k.p, k.n))
                r = f->part ? 0 : reject_key(f, k.p);
            else if ((r = collect_reject(a, f, &k, &v)) == 0 && f->part)
                r = kset_add(&f->rej_ahead, k.p, k.n);
            if (r)
                break;
        }
        st_cur_close(&cur);
    }
    /* A part leaves the partitions' progress to the final flush, which
     * commits it with everything the parts wrote. */
    if ((r == 0 || r == ST_ENOTFOUND) && !f->part &&
        (r = st_cur_open(txn, a->env, ST_DB_META, &cur)) == 0) {
        uint8_t pk[5];
        part_key(pk, 0);
        for (r = st_cur_seek(&cur, pk, 1, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v)) {
            const uint8_t *kp = k.p;
            if (k.n != 5 || kp[0] != 'p')
                break;
            agg_partition_t p;
            if (v.n != sizeof p) {
                r = AGG_ESTATE;
                break;
            }
            memcpy(&p, v.p, sizeof p);
            if (f->n_parts == f->cap_parts) {
                size_t nc = f->cap_parts ? f->cap_parts * 2 : 64;
                void *np = realloc(f->parts, nc * sizeof *f->parts);
                if (!np) {
                    r = AGG_ENOMEM;
                    break;
                }
                f->parts = np;
                f->cap_parts = nc;
            }
            snk_partition_row_t *row = &f->parts[f->n_parts++];
            row->topic = a->topic;
            row->partition = (int32_t)rd_be32(kp + 1);
            row->next_offset = p.next_offset;
            row->watermark = p.watermark;
            row->accepted = p.accepted;
            row->duplicates = p.duplicates;
            row->rejected = p.rejected;
        }
        st_cur_close(&cur);
    }
    if (own)
        st_abort(txn);
    if (r != 0 && r != ST_ENOTFOUND) {
        agg_flush_free(f);
        return r;
    }
    snk_batch_t *b = &f->batch;
    b->sessions = f->sessions;
    b->n_sessions = f->n_sessions;
    b->deleted_sessions = f->deleted;
    b->n_deleted_sessions = f->n_deleted;
    b->users = f->users;
    b->n_users = f->n_users;
    b->funnel = f->funnel;
    b->n_funnel = f->n_funnel;
    b->partitions = f->parts;
    b->n_partitions = f->n_parts;
    b->rejects = f->rejects;
    b->n_rejects = f->n_rejects;
    for (int t = 0; t < SNK_TABLE__COUNT; t++) {
        b->gen[t].vals = f->gen[t].v[GEN_UPSERT];
        b->gen[t].n = f->gen[t].n[GEN_UPSERT];
        b->gen[t].del_keys = f->gen[t].v[GEN_DEL];
        b->gen[t].n_del = f->gen[t].n[GEN_DEL];
        b->gen[t].new_vals = f->gen[t].v[GEN_NEW];
        b->gen[t].n_new = f->gen[t].n[GEN_NEW];
    }
    *out = f;
    return 0;
}

const snk_batch_t *agg_flush_batch(const agg_flush_t *f)
{
    return &f->batch;
}

size_t agg_flush_rows(const agg_flush_t *f)
{
    size_t n = f->n_sessions + f->n_deleted + f->n_users + f->n_funnel + f->n_rejects + f->n_parts;
    for (int t = 0; t < SNK_TABLE__COUNT; t++)
        for (int k = 0; k < GEN__COUNT; k++)
            n += f->gen[t].n[k];
    return n;
}

int agg_flush_done(agg_t *a, agg_flush_t *f)
{
    if (f->part)
        return AGG_EINVAL; /* its rows are committed by the final flush */
    st_txn_t *txn;
    int r = wtxn_begin(a, &txn);
    if (r)
        return r;
    /* The snapshot held exactly the dirty records up to its seq: those are
     * in Postgres now. Later batches' records stay for the next flush. */
    st_cursor_t cur = {0};
    st_val_t k, v;
    if ((r = st_cur_open(txn, a->env, ST_DB_DIRTY, &cur)) == 0) {
        uint8_t zero = 0;
        r = st_cur_seek(&cur, &zero, 1, &k, &v);
        while (r == 0 && k.n == 12 && rd_be64(k.p) <= f->seq) {
            if ((r = st_cur_del(&cur)))
                break;
            /* After a delete MDB_NEXT yields the entry that followed. */
            r = st_cur_next(&cur, &k, &v);
        }
        st_cur_close(&cur);
        if (r == ST_ENOTFOUND)
            r = 0;
    }
    for (size_t i = 0; r == 0 && i < f->n_reject_keys; i++) {
        r = st_del(txn, a->env, ST_DB_REJECTS, f->reject_keys[i], 12);
        if (r == ST_ENOTFOUND)
            r = 0;
    }
    /* Marks the flush left dirty go back into the log, after the records
     * just deleted and before any later batch's. */
    if (r == 0 && f->kept.n) {
        uint8_t kk[12];
        r = st_put(txn, a->env, ST_DB_DIRTY, kk, log_key(kk, f->seq, UINT32_MAX), f->kept.arena,
                   f->kept.alen);
    }
    kset_t left = {0};
    uint64_t nr = 0;
    if (r == 0 && (r = mlog_load(a, txn, f->seq, &left)) == 0)
        r = st_count(txn, a->env, ST_DB_REJECTS, &nr);
    if (r == 0)
        r = kset_add_packed(&left, f->kept.arena, f->kept.alen);
    if (r) {
        kset_free(&left);
        st_abort(txn);
        return r;
    }
    r = st_commit(txn);
    if (r == 0) {
        kset_free(&a->pend);
        a->pend = left;
        a->pending = a->pend.n + nr;
    } else {
        kset_free(&left);
    }
    return r;
}

int agg_checkpoint(agg_t *a)
{
    if (a->txn)
        return AGG_EINVAL;
    if (!a->outer)
        return 0;
    int r = st_commit(a->outer);
    a->outer = NULL;
    a->outer_batches = 0;
    return r ? r : 1;
}

uint64_t agg_checkpoint_batches(const agg_t *a)
{
    return a->outer ? a->outer_batches : 0;
}

void agg_flush_free(agg_flush_t *f)
{
    if (!f)
        return;
    kset_free(&f->kept);
    kset_free(&f->rej_ahead);
    while (f->chunks) {
        chunk_t *n = f->chunks->next;
        free(f->chunks);
        f->chunks = n;
    }
    free(f->sessions);
    free(f->deleted);
    free(f->users);
    free(f->funnel);
    free(f->parts);
    free(f->rejects);
    free(f->reject_keys);
    for (int t = 0; t < SNK_TABLE__COUNT; t++) {
        for (int k = 0; k < GEN__COUNT; k++)
            free(f->gen[t].v[k]);
    }
    free(f);
}

static json_t *jval(stx_val_t v)
{
    return v.ok ? json_real(v.v) : json_null();
}

static json_t *snapshot_experiment(agg_t *a, st_txn_t *txn, const uint8_t *ek, size_t ekn)
{
    xvariants_t *xv = malloc(sizeof *xv);
    if (!xv || load_variants(a, txn, ek, ekn, xv) != 0 || xv->n_live == 0) {
        free(xv);
        return NULL;
    }
    json_t *e = json_object();
    json_object_set_new(e, "experiment", json_stringn((const char *)ek + 1, ek[0]));
    json_object_set_new(e, "control", json_string(xv->name[xv->control]));
    int64_t users[XMAX_VARIANTS], total = 0;
    for (int i = 0; i < xv->n_live; i++) {
        users[i] = xv->suff[xv->live[i]].users;
        total += users[i];
    }
    double weights[XMAX_VARIANTS];
    stx_val_t chi2, p;
    int srm = 0;
    stx_srm(users, expected_split(a, ek, xv, weights), xv->n_live, &chi2, &p, &srm);
    json_object_set_new(e, "users", json_integer(total));
    json_object_set_new(e, "srm_p", jval(p));
    json_object_set_new(e, "srm_detected", json_boolean(srm));
    json_t *vars = json_array();
    const stx_suff_t *c = &xv->suff[xv->control];
    for (int i = 0; i < xv->n_live; i++) {
        int vi = xv->live[i];
        const stx_suff_t *sf = &xv->suff[vi];
        stx_variant_t sv;
        stx_variant_summary(sf, &sv);
        json_t *v = json_object();
        json_object_set_new(v, "variant", json_string(xv->name[vi]));
        json_object_set_new(v, "users", json_integer(sf->users));
        json_object_set_new(v, "conversion_rate", jval(sv.conversion_rate));
        json_object_set_new(v, "is_control", json_boolean(vi == xv->control));
        if (vi != xv->control) {
            stx_compare_t cmp;
            stx_compare(sf, c, a->alpha, a->n_star, &cmp);
            json_object_set_new(v, "abs_lift", jval(cmp.abs_lift));
            json_object_set_new(v, "diff_ci_low", jval(cmp.diff_ci_low));
            json_object_set_new(v, "diff_ci_high", jval(cmp.diff_ci_high));
            json_object_set_new(v, "seq_ci_low", jval(cmp.seq_ci_low));
            json_object_set_new(v, "seq_ci_high", jval(cmp.seq_ci_high));
            json_object_set_new(v, "p_value", jval(cmp.p_value));
            json_object_set_new(v, "chance_to_win", jval(cmp.chance_to_win));
        }
        json_array_append_new(vars, v);
    }
    json_object_set_new(e, "variants", vars);
    free(xv);
    return e;
}

int agg_snapshot_json(agg_t *a, int days, char **out)
{
    st_txn_t *txn;
    int r = st_begin(a->env, 1, &txn);
    if (r)
        return r;
    json_t *root = json_object(), *funnel = json_array(), *exps = json_array();
    st_cursor_t cur = {0};
    st_val_t k, v;
    /* The ('*','*') rows of the last `days` days, newest last. */
    if (st_cur_open(txn, a->env, ST_DB_FUNNEL, &cur) == 0) {
        json_t *all = json_array();
        for (r = st_cur_last(&cur, &k, &v); r == 0 && (int)json_array_size(all) < days;
             r = st_cur_prev(&cur, &k, &v)) {
            const uint8_t *kp = k.p;
            int64_t c[F_N];
            if (k.n != 8 || kp[4] != 1 || kp[5] != '*' || kp[6] != 1 || kp[7] != '*' ||
                v.n != sizeof c)
                continue;
            memcpy(c, v.p, sizeof c);
            if (c[F_SESS] == 0)
                continue;
            char day[16];
            int64_t ms = (int64_t)(int32_t)rd_be32(kp) * DAY_MS;
            char ts[40];
            cm_fmt_ts(ms, ts, sizeof ts);
            snprintf(day, sizeof day, "%.10s", ts);
            json_t *row = json_object();
            json_object_set_new(row, "day", json_string(day));
            static const char *const names[5] = {"sessions", "product_view", "add_to_cart",
                                                 "checkout", "purchase"};
            for (int i = 0; i < 5; i++)
                json_object_set_new(row, names[i], json_integer(c[F_SESS + i]));
            json_object_set_new(row, "users", json_integer(c[F_USERS]));
            json_object_set_new(row, "orders", json_integer(c[F_ORDERS]));
            json_object_set_new(row, "revenue", json_real((double)c[F_REVENUE] / 100.0));
            json_array_insert_new(all, 0, row);
        }
        json_array_extend(funnel, all);
        json_decref(all);
        st_cur_close(&cur);
    }
    /* Every experiment: the XEXP/XVAR prefixes name them; walk XVAR once. */
    if (st_cur_open(txn, a->env, ST_DB_XVAR, &cur) == 0) {
        uint8_t last[KEY_MAX];
        size_t last_n = 0;
        uint8_t zero = 0;
        for (r = st_cur_seek(&cur, &zero, 1, &k, &v); r == 0; r = st_cur_next(&cur, &k, &v)) {
            const uint8_t *kp = k.p;
            size_t ekn = (size_t)kp[0] + 1;
            if (ekn > k.n || (ekn == last_n && memcmp(kp, last, ekn) == 0))
                continue;
            memcpy(last, kp, ekn);
            last_n = ekn;
            json_t *e = snapshot_experiment(a, txn, last, last_n);
            if (e)
                json_array_append_new(exps, e);
        }
        st_cur_close(&cur);
    }
    st_abort(txn);
    json_object_set_new(root, "funnel", funnel);
    json_object_set_new(root, "experiments", exps);
    json_object_set_new(root, "confidence", json_real(1.0 - a->alpha));
    *out = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return *out ? 0 : AGG_ENOMEM;
}

const char *agg_strerror(int err)
{
    switch (err) {
    case AGG_ENOMEM:
        return "out of memory";
    case AGG_ESTATE:
        return "a state record could not be decoded";
    case AGG_EPARTITION:
        return "partition number out of range";
    case AGG_EINVAL:
        return "invalid argument";
    default:
        return st_strerror(err);
    }
}
