/*
 * clickmart-gen: a deterministic synthetic e-commerce clickstream for clickmart.
 *
 * It simulates a population of users over a window of days: each user has a stable country,
 * a main device (sometimes a second one), an activity level, and visits the shop in sessions
 * that walk down a purchase funnel (page views, product views, carts, checkouts, purchases).
 * A share of users is assigned to an A/B experiment whose non-control variants lift the
 * purchase probability.  On top of that clean stream it adds the dirt the daemon must handle:
 * late (out-of-order) deliveries, exact re-sends, and malformed messages cycling over every
 * reject reason of CONTRACT.md section 1.1.
 *
 * Everything is a function of the flags: the users and their timelines come from per-user
 * xoshiro256** streams seeded from --seed, and all other decisions from one global stream
 * consumed in emission order, so the same flags always give the same bytes (the default
 * --end-ms is the only input taken from the wall clock).
 *
 * The stream is produced by merging the users' timelines in event-time order with a heap;
 * delayed events and re-sends wait in a second heap keyed by their delivery time.  Only the
 * session currently in progress is held per user, so memory grows with users, not events.
 *
 * Output is either "key<TAB>value" lines (what `kcat -P -K$'\t'` reads) or messages produced
 * straight to Kafka, keyed by user_id.  See docs/gen.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#define MS_PER_SEC INT64_C(1000)
#define MS_PER_MIN INT64_C(60000)
#define MS_PER_HOUR INT64_C(3600000)
#define MS_PER_DAY INT64_C(86400000)
#define SESSION_GAP INT64_C(1800000)
/* The contract's range of ts: from 2000-01-01T00:00:00Z up to, not including, 2100-01-01. */
#define TS_MIN INT64_C(946684800000)
#define TS_MAX INT64_C(4102444800000)
#define MAX_EVENT_BYTES 65536
#define ALLOWED_LATENESS (48 * MS_PER_HOUR)
#define NO_PRODUCT UINT32_MAX
#define MAX_ITEMS 8
#define MAX_VARIANTS 16
#define MAX_XPROPS 64
#define MAXF 40

/* Share of good messages that come from bots. */
#define BOT_SHARE 0.02

/* ------------------------------------------------------------------------------------------
 * Small helpers
 * ---------------------------------------------------------------------------------------- */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("clickmart-gen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        die("out of memory (%zu bytes)", n);
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        die("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        die("out of memory (%zu bytes)", n);
    return q;
}

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------------------------------
 * Growable byte buffer.  Messages are assembled by hand rather than with snprintf because the
 * generator must write several hundred thousand events per second.
 * ---------------------------------------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

static void buf_grow(struct buf *b, size_t need)
{
    if (b->len + need <= b->cap)
        return;
    size_t nc = b->cap ? b->cap : 256;
    while (nc < b->len + need)
        nc *= 2;
    b->p = xrealloc(b->p, nc);
    b->cap = nc;
}

static inline void buf_add(struct buf *b, const void *s, size_t n)
{
    buf_grow(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static inline void buf_addc(struct buf *b, char c)
{
    buf_grow(b, 1);
    b->p[b->len++] = c;
}

static inline void buf_adds(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_fill(struct buf *b, char c, size_t n)
{
    buf_grow(b, n);
    memset(b->p + b->len, c, n);
    b->len += n;
}

static void buf_u64(struct buf *b, uint64_t v)
{
    char t[24];
    int i = 24;
    do {
        t[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    buf_add(b, t + i, (size_t)(24 - i));
}

static void buf_i64(struct buf *b, int64_t v)
{
    if (v < 0) {
        buf_addc(b, '-');
        buf_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        buf_u64(b, (uint64_t)v);
    }
}

/* Writes v zero-padded to width digits, for dates and times. */
static void buf_pad(struct buf *b, unsigned v, int width)
{
    char t[12];
    for (int i = width - 1; i >= 0; i--) {
        t[i] = (char)('0' + v % 10);
        v /= 10;
    }
    buf_add(b, t, (size_t)width);
}

static void buf_hex(struct buf *b, uint64_t v, int digits)
{
    static const char hx[] = "0123456789abcdef";
    char t[16];
    for (int i = digits - 1; i >= 0; i--) {
        t[i] = hx[v & 15];
        v >>= 4;
    }
    buf_add(b, t, (size_t)digits);
}

/* ------------------------------------------------------------------------------------------
 * PRNG: splitmix64 for seeding and hashing, xoshiro256** for the streams.  rand() is never
 * used because its sequence differs between C libraries and would break determinism.
 * ---------------------------------------------------------------------------------------- */

__extension__ typedef unsigned __int128 u128;

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t splitmix64(uint64_t *x)
{
    *x += 0x9e3779b97f4a7c15ULL;
    return mix64(*x);
}

struct rng {
    uint64_t s[4];
};

static void rng_seed(struct rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t rng_next(struct rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static inline double rng_unit(struct rng *r)
{
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

static inline bool rng_chance(struct rng *r, double p)
{
    return rng_unit(r) < p;
}

/* Uniform in [0, n) by a multiply-high, which has no modulo bias worth speaking of. */
static inline uint64_t rng_below(struct rng *r, uint64_t n)
{
    return (uint64_t)(((u128)rng_next(r) * n) >> 64);
}

/* Uniform in [lo, hi], both inclusive. */
static inline int64_t rng_range(struct rng *r, int64_t lo, int64_t hi)
{
    if (hi <= lo)
        return lo;
    return lo + (int64_t)rng_below(r, (uint64_t)(hi - lo) + 1);
}

static double rng_exp(struct rng *r, double mean)
{
    return -mean * log1p(-rng_unit(r));
}

static double rng_normal(struct rng *r)
{
    double u1 = rng_unit(r);
    double u2 = rng_unit(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Number of failures before the first success with probability p_stop, capped at max. */
static uint32_t rng_geom(struct rng *r, double p_stop, uint32_t max)
{
    uint32_t n = 0;
    while (n < max && !rng_chance(r, p_stop))
        n++;
    return n;
}

static int rng_weighted(struct rng *r, const double *w, int n)
{
    double total = 0;
    for (int i = 0; i < n; i++)
        total += w[i];
    double x = rng_unit(r) * total;
    for (int i = 0; i < n; i++) {
        if (x < w[i])
            return i;
        x -= w[i];
    }
    return n - 1;
}

/* ------------------------------------------------------------------------------------------
 * Calendar arithmetic (Howard Hinnant's algorithms) for RFC 3339 timestamps.
 * ---------------------------------------------------------------------------------------- */

static void civil_from_days(int64_t z, int *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t yy = (int64_t)yoe + era * 400;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int)(yy + (*m <= 2));
}

static int64_t days_from_civil(int y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

/* Plain "YYYY-MM-DDTHH:MM:SS.mmmZ", for log lines and the summary. */
static void fmt_iso(char *out, size_t n, int64_t ms)
{
    int y;
    unsigned mo, d;
    int64_t days = ms >= 0 ? ms / MS_PER_DAY : -((-ms + MS_PER_DAY - 1) / MS_PER_DAY);
    int64_t rem = ms - days * MS_PER_DAY;
    civil_from_days(days, &y, &mo, &d);
    snprintf(out, n, "%04d-%02u-%02uT%02u:%02u:%02u.%03uZ", y, mo, d, (unsigned)(rem / MS_PER_HOUR),
             (unsigned)(rem / MS_PER_MIN % 60), (unsigned)(rem / MS_PER_SEC % 60),
             (unsigned)(rem % 1000));
}

/* ------------------------------------------------------------------------------------------
 * Static reference data
 * ---------------------------------------------------------------------------------------- */

enum evtype {
    T_PAGE_VIEW,
    T_PRODUCT_VIEW,
    T_ADD_TO_CART,
    T_CHECKOUT,
    T_PURCHASE,
    T_SEARCH,
    T_LOGIN,
    T_LOGOUT,
    T_SIGN_UP,
    T_WISHLIST_ADD,
    T_SHARE,
    T_VIDEO_PLAY,
    T_ASSIGN,
    NTYPES
};

static const char *const type_names[NTYPES] = {
    "page_view",
    "product_view",
    "add_to_cart",
    "checkout",
    "purchase",
    "search",
    "login",
    "logout",
    "sign_up",
    "wishlist_add",
    "share",
    "video_play_v2",
    "experiment_assignment",
};

static const char *const devices[] = {"desktop", "mobile", "tablet"};
static const double device_w[] = {45, 45, 10};
#define NDEVICES 3

struct country {
    const char *code;
    double weight;
    int offset_min; /* A typical local UTC offset, used for RFC 3339 strings and night hours. */
};

static const struct country countries[] = {
    {"US", 30, -300}, {"GB", 10, 0},   {"DE", 10, 60}, {"FR", 7, 60},
    {"IN", 10, 330},  {"BR", 6, -180}, {"JP", 6, 540}, {"CA", 5, -300},
    {"AU", 4, 600},   {"ES", 4, 60},   {"IT", 4, 60},  {"NL", 4, 60},
};
#define NCOUNTRIES ((int)(sizeof countries / sizeof countries[0]))

static const char *const pages[] = {
    "/",     "/home",    "/category/shoes", "/category/kitchen", "/deals",
    "/cart", "/account", "/help/shipping",  "/blog/summer-sale", "/search?q=lamp&page=2",
};
#define NPAGES ((int)(sizeof pages / sizeof pages[0]))

/* Search queries deliberately include quotes, backslashes, control characters and non-ASCII
 * text, so that the JSON strings exercise every escape the daemon's parser must decode. */
static const char *const queries[] = {
    "red shoes",
    "wireless headphones",
    "caf\xc3\xa9 table",
    "\"quoted\" lamp",
    "back\\slash",
    "\xe6\x97\xa5\xe6\x9c\xac tea",
    "mug \xf0\x9f\x99\x82",
    "tab\there",
    "line\nbreak",
    "50% off",
    "<script>alert(1)</script>",
    "",
};
#define NQUERIES ((int)(sizeof queries / sizeof queries[0]))

static const char *const user_agents[] = {
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/119.0 Mobile",
};

/* Suffixes that give about 1% of users a non-ASCII id: 2-, 3- and 4-byte UTF-8. */
static const char *const unicode_suffix[] = {"", "-\xc3\xb8", "-\xe6\x97\xa5\xe6\x9c\xac",
                                             "-\xf0\x9f\x99\x82"};

/* ------------------------------------------------------------------------------------------
 * Malformed message catalogue.  Every reject reason of CONTRACT.md section 1.1 with its
 * sub-cases; the generator cycles through the table so that even short runs cover all of it.
 * ---------------------------------------------------------------------------------------- */

enum kind {
    K_TOO_LARGE,
    K_INVALID_JSON,
    K_NOT_OBJECT,
    K_MISSING,
    K_BAD_TYPE,
    K_BAD_VALUE,
    K_FUTURE,
    K_TOO_LATE,
    K_VALID_EDGE, /* Not a reject: a valid boundary case that lives in the same cycle. */
    NKINDS
};

static const char *const kind_names[NKINDS] = {
    "payload_too_large", "invalid_json",     "not_an_object", "missing_field",        "bad_type",
    "bad_value",         "future_timestamp", "too_late",      "valid_edge(accepted)",
};

enum bc {
    BC_LARGE_VALID,
    BC_LARGE_INVALID,
    BC_LARGE_65537,
    BC_EDGE_65536,
    BC_JSON_TRUNCATED,
    BC_JSON_BAD_UTF8,
    BC_JSON_OVERLONG_UTF8,
    BC_JSON_UTF8_SURROGATE,
    BC_JSON_LONE_HIGH,
    BC_JSON_LONE_LOW,
    BC_JSON_HIGH_THEN_ASCII,
    BC_JSON_DUP_KEY,
    BC_JSON_DUP_KEY_ESCAPED,
    BC_JSON_DUP_KEY_NESTED,
    BC_JSON_NUL_ESCAPE,
    BC_JSON_NUM_OVERFLOW,
    BC_JSON_NUM_NEG_OVERFLOW,
    BC_JSON_EMPTY,
    BC_JSON_WHITESPACE,
    BC_JSON_TRAILING_GARBAGE,
    BC_JSON_TWO_OBJECTS,
    BC_JSON_SINGLE_QUOTES,
    BC_JSON_TRAILING_COMMA,
    BC_JSON_NAN,
    BC_JSON_CONTROL_CHAR,
    BC_JSON_UNTERMINATED,
    BC_OBJ_ARRAY,
    BC_OBJ_STRING,
    BC_OBJ_NUMBER,
    BC_OBJ_NULL,
    BC_OBJ_TRUE,
    BC_OBJ_WRAPPED,
    BC_MISS_EVENT_ID,
    BC_MISS_USER_ID,
    BC_MISS_USER_ID_NULL,
    BC_MISS_EVENT_TYPE,
    BC_MISS_TS,
    BC_MISS_TS_NULL,
    BC_MISS_AMOUNT,
    BC_MISS_AMOUNT_NULL,
    BC_MISS_EXPERIMENT,
    BC_MISS_VARIANT,
    BC_MISS_EMPTY_OBJECT,
    BC_TYPE_EVENT_ID,
    BC_TYPE_USER_ID,
    BC_TYPE_EVENT_TYPE,
    BC_TYPE_TS_FLOAT_EXP,
    BC_TYPE_TS_FLOAT_FRAC,
    BC_TYPE_TS_BOOL,
    BC_TYPE_AMOUNT_STRING,
    BC_TYPE_ITEMS_OBJECT,
    BC_TYPE_ITEMS_ELEMENT,
    BC_TYPE_QUANTITY_STRING,
    BC_TYPE_PRICE_STRING,
    BC_TYPE_ITEM_PRODUCT_NUMBER,
    BC_TYPE_EXPERIMENT,
    BC_TYPE_VARIANT,
    BC_TYPE_DEVICE,
    BC_TYPE_COUNTRY,
    BC_TYPE_PRODUCT_ID,
    BC_VAL_EVENT_TYPE_PATTERN,
    BC_VAL_EVENT_TYPE_DIGIT,
    BC_VAL_EVENT_TYPE_LONG,
    BC_VAL_EVENT_ID_EMPTY,
    BC_VAL_EVENT_ID_LONG,
    BC_VAL_USER_ID_LONG,
    BC_VAL_TS_NO_OFFSET,
    BC_VAL_TS_GARBAGE,
    BC_VAL_TS_BAD_DATE,
    BC_VAL_TS_1999,
    BC_VAL_TS_STRING_1999,
    BC_VAL_TS_2100,
    BC_VAL_TS_NEGATIVE,
    BC_VAL_AMOUNT_NEGATIVE,
    BC_VAL_AMOUNT_HUGE,
    BC_VAL_QUANTITY_ZERO,
    BC_VAL_QUANTITY_HUGE,
    BC_VAL_PRICE_NEGATIVE,
    BC_VAL_ITEMS_101,
    BC_VAL_ITEM_PRODUCT_EMPTY,
    BC_VAL_DEVICE_LONG,
    BC_VAL_COUNTRY_LONG,
    BC_VAL_PRODUCT_ID_LONG,
    BC_VAL_EXPERIMENT_LONG,
    BC_VAL_VARIANT_LONG,
    BC_FUTURE_DAY,
    BC_FUTURE_DAY_STRING,
    BC_FUTURE_2099,
    BC_LATE_INT,
    BC_LATE_STRING,
    NBC
};

struct badcase {
    uint8_t kind;
    uint8_t every; /* Emitted only on every n-th pass over the table, to make big ones rare. */
    const char *name;
    uint8_t times; /* Emitted this many times per pass (0 means once). */
};

static const struct badcase badcases[NBC] = {
    [BC_LARGE_VALID] = {K_TOO_LARGE, 4, "valid_json_70000_bytes", 0},
    [BC_LARGE_INVALID] = {K_TOO_LARGE, 4, "invalid_json_70000_bytes", 0},
    [BC_LARGE_65537] = {K_TOO_LARGE, 4, "exactly_65537_bytes", 0},
    [BC_EDGE_65536] = {K_VALID_EDGE, 4, "exactly_65536_bytes", 0},
    [BC_JSON_TRUNCATED] = {K_INVALID_JSON, 1, "truncated", 0},
    [BC_JSON_BAD_UTF8] = {K_INVALID_JSON, 1, "invalid_utf8_byte", 0},
    [BC_JSON_OVERLONG_UTF8] = {K_INVALID_JSON, 1, "overlong_utf8", 0},
    [BC_JSON_UTF8_SURROGATE] = {K_INVALID_JSON, 1, "utf8_encoded_surrogate", 0},
    [BC_JSON_LONE_HIGH] = {K_INVALID_JSON, 1, "lone_surrogate_ud800", 0},
    [BC_JSON_LONE_LOW] = {K_INVALID_JSON, 1, "lone_surrogate_udc00", 0},
    [BC_JSON_HIGH_THEN_ASCII] = {K_INVALID_JSON, 1, "high_surrogate_then_ascii", 0},
    [BC_JSON_DUP_KEY] = {K_INVALID_JSON, 1, "duplicate_key", 0},
    [BC_JSON_DUP_KEY_ESCAPED] = {K_INVALID_JSON, 1, "duplicate_key_escaped", 0},
    [BC_JSON_DUP_KEY_NESTED] = {K_INVALID_JSON, 1, "duplicate_key_nested", 0},
    [BC_JSON_NUL_ESCAPE] = {K_INVALID_JSON, 1, "nul_escape_in_string", 0},
    [BC_JSON_NUM_OVERFLOW] = {K_INVALID_JSON, 1, "number_1e999", 0},
    [BC_JSON_NUM_NEG_OVERFLOW] = {K_INVALID_JSON, 1, "number_minus_1e999", 0},
    [BC_JSON_EMPTY] = {K_INVALID_JSON, 1, "empty_value", 0},
    [BC_JSON_WHITESPACE] = {K_INVALID_JSON, 1, "whitespace_only", 0},
    [BC_JSON_TRAILING_GARBAGE] = {K_INVALID_JSON, 1, "trailing_garbage", 0},
    [BC_JSON_TWO_OBJECTS] = {K_INVALID_JSON, 1, "two_objects", 0},
    [BC_JSON_SINGLE_QUOTES] = {K_INVALID_JSON, 1, "single_quotes", 0},
    [BC_JSON_TRAILING_COMMA] = {K_INVALID_JSON, 1, "trailing_comma", 0},
    [BC_JSON_NAN] = {K_INVALID_JSON, 1, "nan_literal", 0},
    [BC_JSON_CONTROL_CHAR] = {K_INVALID_JSON, 1, "raw_control_char_in_string", 0},
    [BC_JSON_UNTERMINATED] = {K_INVALID_JSON, 1, "unterminated_string", 0},
    [BC_OBJ_ARRAY] = {K_NOT_OBJECT, 1, "array", 0},
    [BC_OBJ_STRING] = {K_NOT_OBJECT, 1, "string", 0},
    [BC_OBJ_NUMBER] = {K_NOT_OBJECT, 1, "number", 0},
    [BC_OBJ_NULL] = {K_NOT_OBJECT, 1, "null", 0},
    [BC_OBJ_TRUE] = {K_NOT_OBJECT, 1, "true", 0},
    [BC_OBJ_WRAPPED] = {K_NOT_OBJECT, 1, "event_inside_array", 0},
    [BC_MISS_EVENT_ID] = {K_MISSING, 1, "event_id", 0},
    [BC_MISS_USER_ID] = {K_MISSING, 1, "user_id", 0},
    [BC_MISS_USER_ID_NULL] = {K_MISSING, 1, "user_id_null", 0},
    [BC_MISS_EVENT_TYPE] = {K_MISSING, 1, "event_type", 0},
    [BC_MISS_TS] = {K_MISSING, 1, "ts", 0},
    [BC_MISS_TS_NULL] = {K_MISSING, 1, "ts_null", 0},
    [BC_MISS_AMOUNT] = {K_MISSING, 1, "purchase_amount", 0},
    [BC_MISS_AMOUNT_NULL] = {K_MISSING, 1, "purchase_amount_null", 0},
    [BC_MISS_EXPERIMENT] = {K_MISSING, 1, "assignment_experiment", 0},
    [BC_MISS_VARIANT] = {K_MISSING, 1, "assignment_variant", 0},
    [BC_MISS_EMPTY_OBJECT] = {K_MISSING, 1, "empty_object", 0},
    [BC_TYPE_EVENT_ID] = {K_BAD_TYPE, 1, "event_id_number", 0},
    [BC_TYPE_USER_ID] = {K_BAD_TYPE, 1, "user_id_number", 0},
    [BC_TYPE_EVENT_TYPE] = {K_BAD_TYPE, 1, "event_type_array", 0},
    [BC_TYPE_TS_FLOAT_EXP] = {K_BAD_TYPE, 1, "ts_float_exponent", 0},
    [BC_TYPE_TS_FLOAT_FRAC] = {K_BAD_TYPE, 1, "ts_float_fraction", 0},
    [BC_TYPE_TS_BOOL] = {K_BAD_TYPE, 1, "ts_bool", 0},
    [BC_TYPE_AMOUNT_STRING] = {K_BAD_TYPE, 1, "amount_string", 0},
    [BC_TYPE_ITEMS_OBJECT] = {K_BAD_TYPE, 1, "items_object", 0},
    [BC_TYPE_ITEMS_ELEMENT] = {K_BAD_TYPE, 1, "items_element_number", 0},
    [BC_TYPE_QUANTITY_STRING] = {K_BAD_TYPE, 1, "item_quantity_string", 0},
    [BC_TYPE_PRICE_STRING] = {K_BAD_TYPE, 1, "item_price_string", 0},
    [BC_TYPE_ITEM_PRODUCT_NUMBER] = {K_BAD_TYPE, 1, "item_product_id_number", 0},
    [BC_TYPE_EXPERIMENT] = {K_BAD_TYPE, 1, "experiment_number", 0},
    [BC_TYPE_VARIANT] = {K_BAD_TYPE, 1, "variant_bool", 0},
    [BC_TYPE_DEVICE] = {K_BAD_TYPE, 1, "device_number", 0},
    [BC_TYPE_COUNTRY] = {K_BAD_TYPE, 1, "country_array", 0},
    [BC_TYPE_PRODUCT_ID] = {K_BAD_TYPE, 1, "product_id_number", 0},
    [BC_VAL_EVENT_TYPE_PATTERN] = {K_BAD_VALUE, 1, "event_type_Page-View", 0},
    [BC_VAL_EVENT_TYPE_DIGIT] = {K_BAD_VALUE, 1, "event_type_leading_digit", 0},
    [BC_VAL_EVENT_TYPE_LONG] = {K_BAD_VALUE, 1, "event_type_65_chars", 0},
    [BC_VAL_EVENT_ID_EMPTY] = {K_BAD_VALUE, 1, "event_id_empty", 0},
    [BC_VAL_EVENT_ID_LONG] = {K_BAD_VALUE, 1, "event_id_129_bytes", 0},
    [BC_VAL_USER_ID_LONG] = {K_BAD_VALUE, 1, "user_id_129_bytes", 0},
    [BC_VAL_TS_NO_OFFSET] = {K_BAD_VALUE, 1, "ts_string_without_offset", 0},
    [BC_VAL_TS_GARBAGE] = {K_BAD_VALUE, 1, "ts_string_garbage", 0},
    [BC_VAL_TS_BAD_DATE] = {K_BAD_VALUE, 1, "ts_string_feb_30", 0},
    [BC_VAL_TS_1999] = {K_BAD_VALUE, 1, "ts_1999", 0},
    [BC_VAL_TS_STRING_1999] = {K_BAD_VALUE, 1, "ts_string_1999", 0},
    [BC_VAL_TS_2100] = {K_BAD_VALUE, 1, "ts_2100", 0},
    [BC_VAL_TS_NEGATIVE] = {K_BAD_VALUE, 1, "ts_negative", 0},
    [BC_VAL_AMOUNT_NEGATIVE] = {K_BAD_VALUE, 1, "amount_negative", 0},
    [BC_VAL_AMOUNT_HUGE] = {K_BAD_VALUE, 1, "amount_above_1e12", 0},
    [BC_VAL_QUANTITY_ZERO] = {K_BAD_VALUE, 1, "item_quantity_0", 0},
    [BC_VAL_QUANTITY_HUGE] = {K_BAD_VALUE, 1, "item_quantity_1000001", 0},
    [BC_VAL_PRICE_NEGATIVE] = {K_BAD_VALUE, 1, "item_price_negative", 0},
    [BC_VAL_ITEMS_101] = {K_BAD_VALUE, 1, "items_101", 0},
    [BC_VAL_ITEM_PRODUCT_EMPTY] = {K_BAD_VALUE, 1, "item_product_id_empty", 0},
    [BC_VAL_DEVICE_LONG] = {K_BAD_VALUE, 1, "device_33_bytes", 0},
    [BC_VAL_COUNTRY_LONG] = {K_BAD_VALUE, 1, "country_33_bytes", 0},
    [BC_VAL_PRODUCT_ID_LONG] = {K_BAD_VALUE, 1, "product_id_129_bytes", 0},
    [BC_VAL_EXPERIMENT_LONG] = {K_BAD_VALUE, 1, "experiment_65_bytes", 0},
    [BC_VAL_VARIANT_LONG] = {K_BAD_VALUE, 1, "variant_65_bytes", 0},
    [BC_FUTURE_DAY] = {K_FUTURE, 1, "one_day_ahead", 0},
    [BC_FUTURE_DAY_STRING] = {K_FUTURE, 1, "one_day_ahead_string", 0},
    [BC_FUTURE_2099] = {K_FUTURE, 1, "year_2099", 0},
    /* Ten of the about 95 per pass make too_late about 0.1% of all messages at the defaults. */
    [BC_LATE_INT] = {K_TOO_LATE, 1, "5_days_old", 5},
    [BC_LATE_STRING] = {K_TOO_LATE, 1, "5_days_old_string", 5},
};

/* ------------------------------------------------------------------------------------------
 * Options
 * ---------------------------------------------------------------------------------------- */

struct opts {
    uint64_t seed;
    uint64_t events;
    uint64_t users;
    bool users_set;
    int days;
    int64_t end_ms;
    bool end_set;
    uint32_t products;
    double dup_rate, late_rate, bad_rate;
    int64_t max_delay_ms;
    const char *experiment;
    const char *variants;
    double effect;
    const char *out;
    const char *brokers;
    const char *topic;
    double rate;
    bool quiet;
    char *xkey[MAX_XPROPS];
    char *xval[MAX_XPROPS];
    int nx;
};

static void usage(FILE *f)
{
    fprintf(
        f,
        "Usage: clickmart-gen [options]\n"
        "\n"
        "Writes a deterministic synthetic e-commerce clickstream, one message per event,\n"
        "keyed by user_id: as key<TAB>value lines (for kcat -P -K$'\\t') or straight to Kafka.\n"
        "\n"
        "Data:\n"
        "  --seed N            PRNG seed; same flags + seed = same bytes (default 1)\n"
        "  --events N          number of messages to emit, incl. duplicates and malformed\n"
        "                      ones; exact unless the simulated window runs dry first\n"
        "                      (default 100000)\n"
        "  --users N           simulated users (default events/25)\n"
        "  --days N            days of history (default 7)\n"
        "  --end-ms MS         event time of the end of the window, ms since the epoch\n"
        "                      (default: wall-clock now minus 2 hours)\n"
        "  --products N        catalogue size, ids p00001.., zipf-like popularity (default 500)\n"
        "\n"
        "Dirt:\n"
        "  --dup-rate F        share of messages that are exact re-sends (default 0.02)\n"
        "  --late-rate F       share of events delivered out of order (default 0.03)\n"
        "  --max-delay-ms MS   largest delivery delay of a late event (default 3600000)\n"
        "  --bad-rate F        share of malformed messages, cycling over every reject\n"
        "                      reason of CONTRACT.md 1.1 (default 0.01)\n"
        "\n"
        "Experiment:\n"
        "  --experiment NAME   experiment name (default \"checkout_redesign\")\n"
        "  --variants SPEC     names and split weights (default \"control:50,treatment:50\")\n"
        "  --effect F          relative lift of the purchase probability in the non-control\n"
        "                      variants (default 0.10)\n"
        "\n"
        "Output:\n"
        "  --out FILE          write key<TAB>value lines to FILE, '-' = stdout (default '-'\n"
        "                      when --brokers is not given)\n"
        "  --brokers B         produce to Kafka at bootstrap servers B instead\n"
        "  --topic T           Kafka topic (default \"clickmart.events\")\n"
        "  -X prop=value       librdkafka producer property, repeatable (defaults:\n"
        "                      compression.codec=zstd linger.ms=50 batch.num.messages=10000\n"
        "                      queue.buffering.max.messages=1000000\n"
        "                      enable.idempotence=true)\n"
        "  --rate EPS          limit output to EPS messages per second (default: unlimited)\n"
        "  --quiet             no progress lines and no summary on stderr\n"
        "  --help              show this help and exit\n");
}

static int parse_u64(const char *flag, const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-') {
        fprintf(stderr, "clickmart-gen: %s wants a non-negative integer, got \"%s\"\n", flag, s);
        return -1;
    }
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        fprintf(stderr,
                "clickmart-gen: %s wants an integer in %" PRIu64 "..%" PRIu64 ", got \"%s\"\n",
                flag, min, max, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_i64(const char *flag, const char *s, int64_t min, int64_t max, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        fprintf(stderr,
                "clickmart-gen: %s wants an integer in %" PRId64 "..%" PRId64 ", got \"%s\"\n",
                flag, min, max, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_double(const char *flag, const char *s, double min, double max, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !(v >= min && v <= max)) {
        fprintf(stderr, "clickmart-gen: %s wants a number in %g..%g, got \"%s\"\n", flag, min, max,
                s);
        return -1;
    }
    *out = v;
    return 0;
}

static int add_xprop(struct opts *o, const char *kv)
{
    const char *eq = strchr(kv, '=');
    if (eq == NULL || eq == kv) {
        fprintf(stderr, "clickmart-gen: -X wants prop=value, got \"%s\"\n", kv);
        return -1;
    }
    if (o->nx >= MAX_XPROPS) {
        fprintf(stderr, "clickmart-gen: at most %d -X properties\n", MAX_XPROPS);
        return -1;
    }
    size_t klen = (size_t)(eq - kv);
    char *k = xmalloc(klen + 1);
    memcpy(k, kv, klen);
    k[klen] = '\0';
    o->xkey[o->nx] = k;
    o->xval[o->nx] = strdup(eq + 1);
    if (o->xval[o->nx] == NULL)
        die("out of memory");
    o->nx++;
    return 0;
}

/* Returns 0 to run, 1 after --help, -1 on a usage error. */
static int parse_args(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof *o);
    o->seed = 1;
    o->events = 100000;
    o->days = 7;
    o->products = 500;
    o->dup_rate = 0.02;
    o->late_rate = 0.03;
    o->bad_rate = 0.01;
    o->max_delay_ms = 3600000;
    o->experiment = "checkout_redesign";
    o->variants = "control:50,treatment:50";
    o->effect = 0.10;
    o->topic = "clickmart.events";

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        char name[64];
        const char *val = NULL;

        if (strcmp(a, "-X") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "clickmart-gen: -X needs prop=value\n");
                return -1;
            }
            if (add_xprop(o, argv[++i]) != 0)
                return -1;
            continue;
        }
        if (strncmp(a, "-X", 2) == 0) {
            if (add_xprop(o, a + 2) != 0)
                return -1;
            continue;
        }
        /* Both "--flag value" and "--flag=value" are accepted. */
        const char *eq = strchr(a, '=');
        if (strncmp(a, "--", 2) == 0 && eq != NULL && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
            val = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", a);
        }

        if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
            usage(stdout);
            return 1;
        }
        if (strcmp(name, "--quiet") == 0 || strcmp(name, "-q") == 0) {
            o->quiet = true;
            continue;
        }

        static const char *const valued[] = {
            "--seed",       "--events",   "--users",     "--days",     "--end-ms",
            "--products",   "--dup-rate", "--late-rate", "--bad-rate", "--max-delay-ms",
            "--experiment", "--variants", "--effect",    "--out",      "--brokers",
            "--topic",      "--rate",     NULL,
        };
        bool known = false;
        for (int k = 0; valued[k] != NULL; k++)
            if (strcmp(name, valued[k]) == 0)
                known = true;
        if (!known) {
            fprintf(stderr, "clickmart-gen: unknown option \"%s\" (see --help)\n", a);
            return -1;
        }
        if (val == NULL) {
            if (i + 1 >= argc) {
                fprintf(stderr, "clickmart-gen: %s needs a value\n", name);
                return -1;
            }
            val = argv[++i];
        }

        int rc = 0;
        uint64_t u;
        int64_t s;
        if (strcmp(name, "--seed") == 0) {
            rc = parse_u64(name, val, 0, UINT64_MAX, &o->seed);
        } else if (strcmp(name, "--events") == 0) {
            rc = parse_u64(name, val, 0, 10000000000ULL, &o->events);
        } else if (strcmp(name, "--users") == 0) {
            rc = parse_u64(name, val, 1, 100000000ULL, &o->users);
            o->users_set = true;
        } else if (strcmp(name, "--days") == 0) {
            rc = parse_u64(name, val, 1, 3650, &u);
            o->days = (int)u;
        } else if (strcmp(name, "--end-ms") == 0) {
            rc = parse_i64(name, val, TS_MIN, TS_MAX - 1, &o->end_ms);
            o->end_set = true;
        } else if (strcmp(name, "--products") == 0) {
            rc = parse_u64(name, val, 1, 1000000, &u);
            o->products = (uint32_t)u;
        } else if (strcmp(name, "--dup-rate") == 0) {
            rc = parse_double(name, val, 0, 0.5, &o->dup_rate);
        } else if (strcmp(name, "--late-rate") == 0) {
            rc = parse_double(name, val, 0, 0.5, &o->late_rate);
        } else if (strcmp(name, "--bad-rate") == 0) {
            rc = parse_double(name, val, 0, 0.5, &o->bad_rate);
        } else if (strcmp(name, "--max-delay-ms") == 0) {
            rc = parse_i64(name, val, 0, ALLOWED_LATENESS - MS_PER_HOUR, &s);
            o->max_delay_ms = s;
        } else if (strcmp(name, "--experiment") == 0) {
            size_t n = strlen(val);
            if (n < 1 || n > 64 || strchr(val, '"') || strchr(val, '\\')) {
                fprintf(stderr, "clickmart-gen: --experiment wants 1..64 bytes without quotes "
                                "or backslashes\n");
                rc = -1;
            }
            o->experiment = val;
        } else if (strcmp(name, "--variants") == 0) {
            o->variants = val;
        } else if (strcmp(name, "--effect") == 0) {
            rc = parse_double(name, val, -0.99, 10, &o->effect);
        } else if (strcmp(name, "--out") == 0) {
            o->out = val;
        } else if (strcmp(name, "--brokers") == 0) {
            o->brokers = val;
        } else if (strcmp(name, "--topic") == 0) {
            o->topic = val;
        } else if (strcmp(name, "--rate") == 0) {
            rc = parse_double(name, val, 0.001, 1e9, &o->rate);
        }
        if (rc != 0)
            return -1;
    }

    if (o->dup_rate + o->bad_rate > 0.8) {
        fprintf(stderr, "clickmart-gen: --dup-rate plus --bad-rate must stay below 0.8\n");
        return -1;
    }
    if (o->out != NULL && o->brokers != NULL) {
        fprintf(stderr, "clickmart-gen: give either --out or --brokers, not both\n");
        return -1;
    }
    if (o->brokers == NULL && o->out == NULL)
        o->out = "-";
    if (o->brokers == NULL && o->nx > 0)
        fprintf(stderr, "clickmart-gen: warning: -X only applies with --brokers; ignored\n");
    if (o->topic[0] == '\0') {
        fprintf(stderr, "clickmart-gen: --topic must not be empty\n");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Simulation state
 * ---------------------------------------------------------------------------------------- */

struct item {
    uint32_t product;
    uint16_t qty;
};

/* Flags on a planned event; they drive delivery and the summary. */
enum {
    EVF_GAP_EXACT = 1,  /* Exactly SESSION_GAP after the previous event: same session. */
    EVF_GAP_PLUS1 = 2,  /* SESSION_GAP + 1 after the previous session: a new session. */
    EVF_PRESESSION = 4, /* Placed before a session's first event and delivered after it. */
    EVF_CONTAM = 8,     /* A second assignment to a different variant. */
    EVF_REASSIGN = 16,  /* A repeated assignment to the same variant. */
};

struct ev {
    int64_t ts;
    int64_t deliver; /* 0, or the forced delivery time of a planned late event. */
    uint32_t product;
    uint8_t type;
    uint8_t nitems;
    uint8_t device;
    uint8_t variant;
    uint8_t flags;
    struct item items[MAX_ITEMS];
};

enum {
    UF_BOT = 1,
    UF_ASSIGN_PLANNED = 2,
    UF_ASSIGNED = 4,
    UF_SEEN_PV = 8,
};

struct user {
    struct rng rng;
    int64_t next_ts; /* Heap key: the next event's ts, or the next session's start. */
    int64_t last_ts; /* ts of the previous session's last event, INT64_MIN before. */
    double mean_gap; /* Mean time between the sessions' starts, ms. */
    double mult;     /* Activity multiplier of the base visit rate. */
    struct ev *sess; /* The session in progress, NULL between sessions. */
    uint32_t sess_len, sess_pos, sess_cap;
    uint32_t nsessions;
    uint32_t emitted;
    uint8_t flags;
    uint8_t device, device2, country;
    uint8_t variant;
    uint8_t
        assign_mode; /* 0 just before the first product view, 1 same ms, 2 after, 3 at landing. */
    uint8_t extra_assign; /* 0 none, 1 contaminate at the next session, 2 repeat same variant. */
    uint8_t unicode;
    uint8_t next_flags; /* Flags for the first event of the next session. */
    uint8_t ncart;
    struct item cart[MAX_ITEMS];
};

/* A message waiting for its delivery time: a late event or a re-send. */
enum { PEND_LATE = 1, PEND_DUP = 2, PEND_BRIDGE = 4, PEND_PRESESSION = 8 };

struct pend {
    int64_t deliver;
    uint64_t seq; /* Ties are broken by insertion order, which keeps the output deterministic. */
    uint32_t user;
    uint32_t len;
    uint8_t flags;
    uint8_t type;
    char *val;
};

struct field {
    const char *key;
    uint32_t off, len;
};

/* An object under construction: keys with their raw JSON values, rendered at the end.  The
 * indirection is what lets the malformed cases delete, replace and repeat fields easily. */
struct fields {
    struct field f[MAXF];
    int n;
    struct buf v;
};

struct stats {
    uint64_t msgs, good, clickstream, assignments, dups, late, bridges, presession;
    uint64_t string_ts, gap_exact, gap_plus1, contam, reassign, device_anomaly;
    uint64_t bad[NKINDS];
    uint64_t badcase[NBC];
    uint64_t type_count[NTYPES];
    int64_t first_ts, last_ts;
};

struct gen {
    struct opts o;
    struct rng rng;
    int64_t start_ms, end_ms;
    int64_t future_ms; /* Base of the "one day ahead" future_timestamp cases. */
    uint64_t id_salt, next_id;
    uint64_t target;

    /* Catalogue. */
    uint32_t nproducts;
    int64_t *price;
    double *cdf;
    uint32_t *rank_product;

    /* Experiment. */
    int nvariants, control;
    char *vname[MAX_VARIANTS];
    double vweight[MAX_VARIANTS];

    /* Users and the two heaps. */
    struct user *users;
    uint32_t nusers, nbots;
    uint32_t *heap;
    uint32_t heap_len;
    struct pend *pend;
    size_t pend_len, pend_cap;
    uint64_t pend_seq;

    /* Probabilities derived from the flags. */
    double p_late, p_dup, p_bad, p_bridge, p_pre, p_assign_late;
    double bot_gap;

    /* Malformed-message cursor. */
    int bad_idx;
    unsigned bad_rep;
    uint64_t bad_round;

    /* Scratch. */
    struct fields F;
    struct buf msg, key, out, tmp;

    /* Sinks. */
    FILE *fp;
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt;
    uint64_t dr_ok, dr_failed;
    bool produce_failed;

    /* Progress and rate limiting. */
    double t0, last_progress;
    bool done;

    struct stats st;
};

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    /* A second signal also abandons the final flush. */
    g_stop = g_stop + 1;
}

/* ------------------------------------------------------------------------------------------
 * Catalogue and experiment configuration
 * ---------------------------------------------------------------------------------------- */

static void build_catalog(struct gen *g)
{
    struct rng r;
    rng_seed(&r, mix64(g->o.seed ^ 0xca7a1065ULL));
    uint32_t n = g->o.products;
    g->nproducts = n;
    g->price = xmalloc(sizeof *g->price * n);
    g->cdf = xmalloc(sizeof *g->cdf * n);
    g->rank_product = xmalloc(sizeof *g->rank_product * n);

    for (uint32_t i = 0; i < n; i++) {
        /* Log-normal prices around 25.00 with shop-like endings: .99, .00, .49 or any. */
        double dollars = exp(log(25.0) + 0.9 * rng_normal(&r));
        if (dollars < 1)
            dollars = 1;
        if (dollars > 2000)
            dollars = 2000;
        int64_t whole = (int64_t)dollars;
        double e = rng_unit(&r);
        int64_t cents;
        if (e < 0.6)
            cents = whole * 100 + 99;
        else if (e < 0.8)
            cents = whole * 100;
        else if (e < 0.9)
            cents = whole * 100 + 49;
        else
            cents = whole * 100 + (int64_t)rng_below(&r, 100);
        g->price[i] = cents;
        g->rank_product[i] = i;
    }
    /* Shuffle which product holds which popularity rank, so p00001 is not always the star. */
    for (uint32_t i = n; i > 1; i--) {
        uint32_t j = (uint32_t)rng_below(&r, i);
        uint32_t t = g->rank_product[i - 1];
        g->rank_product[i - 1] = g->rank_product[j];
        g->rank_product[j] = t;
    }
    double total = 0;
    for (uint32_t i = 0; i < n; i++) {
        total += 1.0 / pow((double)i + 1.0, 1.07);
        g->cdf[i] = total;
    }
    for (uint32_t i = 0; i < n; i++)
        g->cdf[i] /= total;
}

static uint32_t pick_product(const struct gen *g, struct rng *r)
{
    double x = rng_unit(r);
    uint32_t lo = 0, hi = g->nproducts - 1;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (g->cdf[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return g->rank_product[lo];
}

/* A product of the same block of ten ("category"), so that baskets have real affinities. */
static uint32_t related_product(const struct gen *g, struct rng *r, uint32_t p)
{
    uint32_t base = p / 10 * 10;
    uint32_t q = base + (uint32_t)rng_below(r, 10);
    return q < g->nproducts ? q : p;
}

static int parse_variants(struct gen *g)
{
    const char *s = g->o.variants;
    g->nvariants = 0;
    while (*s != '\0') {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        const char *colon = memchr(s, ':', len);
        size_t nlen = colon ? (size_t)(colon - s) : len;
        double w = 1.0;
        if (colon != NULL) {
            char wb[32];
            size_t wl = len - nlen - 1;
            if (wl == 0 || wl >= sizeof wb) {
                fprintf(stderr, "clickmart-gen: --variants: bad weight in \"%.*s\"\n", (int)len, s);
                return -1;
            }
            memcpy(wb, colon + 1, wl);
            wb[wl] = '\0';
            if (parse_double("--variants weight", wb, 1e-9, 1e9, &w) != 0)
                return -1;
        }
        if (nlen < 1 || nlen > 64 || memchr(s, '"', nlen) || memchr(s, '\\', nlen)) {
            fprintf(stderr, "clickmart-gen: --variants: names must be 1..64 bytes without quotes "
                            "or backslashes\n");
            return -1;
        }
        if (g->nvariants >= MAX_VARIANTS) {
            fprintf(stderr, "clickmart-gen: --variants: at most %d variants\n", MAX_VARIANTS);
            return -1;
        }
        char *name = xmalloc(nlen + 1);
        memcpy(name, s, nlen);
        name[nlen] = '\0';
        for (int i = 0; i < g->nvariants; i++) {
            if (strcmp(g->vname[i], name) == 0) {
                fprintf(stderr, "clickmart-gen: --variants: \"%s\" given twice\n", name);
                free(name);
                return -1;
            }
        }
        g->vname[g->nvariants] = name;
        g->vweight[g->nvariants] = w;
        g->nvariants++;
        s += len;
        if (*s == ',')
            s++;
    }
    if (g->nvariants < 1) {
        fprintf(stderr, "clickmart-gen: --variants needs at least one name\n");
        return -1;
    }
    /* The lift goes to every variant but the control, chosen as the contract does by default:
     * "control" when it exists, else the first one listed. */
    g->control = 0;
    for (int i = 0; i < g->nvariants; i++)
        if (strcmp(g->vname[i], "control") == 0)
            g->control = i;
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Session planning.  These functions touch only the user and its own PRNG, so a user's
 * timeline does not depend on how it interleaves with the others.
 * ---------------------------------------------------------------------------------------- */

static struct ev *sess_push(struct user *u, int64_t ts, uint8_t type, uint32_t product)
{
    if (u->sess_len == u->sess_cap) {
        u->sess_cap = u->sess_cap ? u->sess_cap * 2 : 16;
        u->sess = xrealloc(u->sess, sizeof *u->sess * u->sess_cap);
    }
    struct ev *e = &u->sess[u->sess_len++];
    memset(e, 0, sizeof *e);
    e->ts = ts;
    e->type = type;
    e->product = product;
    return e;
}

/* Time to the next event within a session, mostly seconds, with the boundary cases. */
static int64_t intra_gap(struct rng *r, uint8_t *flags)
{
    double x = rng_unit(r);
    if (x < 0.004) {
        *flags |= EVF_GAP_EXACT;
        return SESSION_GAP;
    }
    if (x < 0.005)
        return SESSION_GAP - 1;
    if (x < 0.02)
        return 0; /* Two events in the same millisecond: order then falls to event_id. */
    if (x < 0.05)
        return rng_range(r, 5 * MS_PER_MIN, 25 * MS_PER_MIN);
    double s = exp(log(15000.0) + 1.0 * rng_normal(r));
    if (s < 300)
        s = 300;
    if (s > 10 * MS_PER_MIN)
        s = 10 * MS_PER_MIN;
    return (int64_t)s;
}

static double purchase_prob(const struct gen *g, const struct user *u)
{
    double p = 0.70;
    if ((u->flags & UF_ASSIGNED) && u->variant != g->control)
        p *= 1.0 + g->o.effect;
    if (p > 0.99)
        p = 0.99;
    if (p < 0)
        p = 0;
    return p;
}

static void cart_add(struct user *u, uint32_t product, uint16_t qty)
{
    if (u->ncart == MAX_ITEMS) {
        memmove(u->cart, u->cart + 1, sizeof u->cart[0] * (MAX_ITEMS - 1));
        u->ncart--;
    }
    u->cart[u->ncart].product = product;
    u->cart[u->ncart].qty = qty;
    u->ncart++;
}

/* A purchase takes the cart; sometimes one line is split in two lines of the same product. */
static void add_purchase(struct user *u, int64_t ts, uint8_t device)
{
    struct ev *e = sess_push(u, ts, T_PURCHASE, NO_PRODUCT);
    e->device = device;
    for (uint8_t i = 0; i < u->ncart && e->nitems < MAX_ITEMS; i++)
        e->items[e->nitems++] = u->cart[i];
    if (e->nitems > 0 && e->nitems < MAX_ITEMS && rng_chance(&u->rng, 0.1)) {
        struct item it = e->items[rng_below(&u->rng, e->nitems)];
        e->items[e->nitems++] = it;
    }
    u->ncart = 0;
}

static void add_assignment(struct user *u, int64_t ts, uint8_t variant, uint8_t flags,
                           uint8_t device)
{
    struct ev *e = sess_push(u, ts, T_ASSIGN, NO_PRODUCT);
    e->variant = variant;
    e->flags |= flags;
    e->device = device;
}

static void pick_variant(const struct gen *g, struct user *u)
{
    u->variant = (uint8_t)rng_weighted(&u->rng, g->vweight, g->nvariants);
}

/* A product view; the user's first one may bring the experiment assignment with it. */
static void add_product_view(const struct gen *g, struct user *u, int64_t ts, uint32_t product,
                             uint8_t device)
{
    struct ev *e = sess_push(u, ts, T_PRODUCT_VIEW, product);
    e->device = device;
    if ((u->flags & UF_SEEN_PV) == 0) {
        u->flags |= UF_SEEN_PV;
        if ((u->flags & UF_ASSIGN_PLANNED) && !(u->flags & UF_ASSIGNED)) {
            int64_t ats;
            if (u->assign_mode == 1)
                ats = ts;
            else if (u->assign_mode == 2)
                ats = ts + rng_range(&u->rng, 1000, 60000);
            else
                ats = ts - rng_range(&u->rng, 1, 3000);
            pick_variant(g, u);
            u->flags |= UF_ASSIGNED;
            add_assignment(u, ats, u->variant, 0, device);
        }
    }
}

static void sort_session(struct user *u)
{
    /* Insertion sort: sessions are short and nearly sorted, and it is stable. */
    for (uint32_t i = 1; i < u->sess_len; i++) {
        struct ev t = u->sess[i];
        uint32_t j = i;
        while (j > 0 && u->sess[j - 1].ts > t.ts) {
            u->sess[j] = u->sess[j - 1];
            j--;
        }
        u->sess[j] = t;
    }
}

static void gen_bot_session(const struct gen *g, struct user *u, int64_t start)
{
    struct rng *r = &u->rng;
    int64_t t = start;
    int64_t stop = start + (int64_t)rng_exp(r, 2.0 * MS_PER_HOUR) + MS_PER_MIN;
    while (t <= stop) {
        double x = rng_unit(r);
        uint8_t type = x < 0.55 ? T_PAGE_VIEW : x < 0.95 ? T_PRODUCT_VIEW : T_SEARCH;
        uint32_t product =
            type == T_PRODUCT_VIEW ? (uint32_t)rng_below(r, g->nproducts) : NO_PRODUCT;
        struct ev *e = sess_push(u, t, type, product);
        e->device = u->device;
        t += (int64_t)(g->bot_gap * (0.5 + rng_unit(r)));
    }
}

static void gen_user_session(const struct gen *g, struct user *u, int64_t start)
{
    struct rng *r = &u->rng;
    int64_t t = start;
    uint8_t dev = u->device;
    if (u->device2 != u->device && rng_chance(r, 0.25))
        dev = u->device2;
    bool first = u->nsessions == 0;

    /* Extra assignments ride on the session after the first one was made. */
    if (u->extra_assign != 0 && (u->flags & UF_ASSIGNED)) {
        uint8_t v = u->variant;
        uint8_t fl = EVF_REASSIGN;
        if (u->extra_assign == 1 && g->nvariants > 1) {
            v = (uint8_t)((u->variant + 1 + rng_below(r, (uint64_t)g->nvariants - 1)) %
                          (uint64_t)g->nvariants);
            fl = EVF_CONTAM;
        }
        add_assignment(u, start + rng_range(r, 1000, 10000), v, fl, dev);
        u->extra_assign = 0;
    }
    if (first && (u->flags & UF_ASSIGN_PLANNED) && u->assign_mode == 3) {
        pick_variant(g, u);
        u->flags |= UF_ASSIGNED;
        add_assignment(u, start - rng_range(r, 1, 2000), u->variant, 0, dev);
    }

    /* Landing. */
    double x = rng_unit(r);
    uint8_t landing = x < 0.70 ? T_PAGE_VIEW : x < 0.85 ? T_SEARCH : x < 0.95 ? T_LOGIN : 0xff;
    if (first && landing == T_LOGIN)
        landing = T_SIGN_UP;
    if (landing == 0xff) {
        /* A deep link straight onto a product page. */
        add_product_view(g, u, t, pick_product(g, r), dev);
    } else {
        uint32_t prod =
            landing == T_PAGE_VIEW && rng_chance(r, 0.05) ? pick_product(g, r) : NO_PRODUCT;
        sess_push(u, t, landing, prod)->device = dev;
    }

    uint8_t gf = 0;
    uint32_t browse = rng_geom(r, 0.45, 6);
    for (uint32_t i = 0; i < browse; i++) {
        gf = 0;
        t += intra_gap(r, &gf);
        uint8_t type = rng_chance(r, 0.75) ? T_PAGE_VIEW : T_SEARCH;
        if (rng_chance(r, 0.03))
            type = (uint8_t)(T_WISHLIST_ADD + rng_below(r, 3));
        struct ev *e = sess_push(u, t, type, NO_PRODUCT);
        e->device = dev;
        e->flags |= gf;
    }

    if (u->ncart > 0 && rng_chance(r, 0.10)) {
        /* A returning user goes straight to checkout with the cart of an earlier visit: a
         * session whose funnel stage stays 1 although it holds a purchase. */
        gf = 0;
        t += intra_gap(r, &gf);
        sess_push(u, t, T_CHECKOUT, NO_PRODUCT)->device = dev;
        if (rng_chance(r, purchase_prob(g, u))) {
            t += rng_range(r, 2000, 90000);
            add_purchase(u, t, dev);
        }
    } else if (rng_chance(r, 0.60)) {
        uint32_t nviews = 1 + rng_geom(r, 0.45, 9);
        uint32_t viewed[10] = {0};
        uint32_t last = pick_product(g, r);
        for (uint32_t i = 0; i < nviews; i++) {
            gf = 0;
            t += intra_gap(r, &gf);
            if (rng_chance(r, 0.3)) {
                struct ev *pv =
                    sess_push(u, t, rng_chance(r, 0.7) ? T_PAGE_VIEW : T_SEARCH, NO_PRODUCT);
                pv->device = dev;
                pv->flags |= gf;
                gf = 0;
                t += intra_gap(r, &gf);
            }
            uint32_t p =
                i > 0 && rng_chance(r, 0.35) ? related_product(g, r, last) : pick_product(g, r);
            viewed[i] = p;
            last = p;
            size_t before = u->sess_len;
            add_product_view(g, u, t, p, dev);
            if (rng_chance(r, 0.005))
                u->sess[before].product = NO_PRODUCT; /* A product view without a product. */
            u->sess[before].flags |= gf;
        }
        if (rng_chance(r, 0.25)) {
            uint32_t nadd = 1 + rng_geom(r, 0.6, 3);
            for (uint32_t i = 0; i < nadd; i++) {
                gf = 0;
                t += intra_gap(r, &gf);
                uint32_t p =
                    rng_chance(r, 0.7) ? viewed[rng_below(r, nviews)] : related_product(g, r, last);
                uint16_t qty = rng_chance(r, 0.8) ? 1 : (uint16_t)rng_range(r, 2, 3);
                struct ev *e = sess_push(u, t, T_ADD_TO_CART, p);
                e->device = dev;
                e->flags |= gf;
                cart_add(u, p, qty);
            }
            if (rng_chance(r, 0.5)) {
                bool skip_checkout = rng_chance(r, 0.02);
                if (!skip_checkout) {
                    t += rng_range(r, 5000, 120000);
                    sess_push(u, t, T_CHECKOUT, NO_PRODUCT)->device = dev;
                }
                if (skip_checkout || rng_chance(r, purchase_prob(g, u))) {
                    t += rng_range(r, 5000, 180000);
                    add_purchase(u, t, dev);
                }
            }
        }
    }

    uint32_t tail = rng_geom(r, 0.6, 4);
    for (uint32_t i = 0; i < tail; i++) {
        gf = 0;
        t += intra_gap(r, &gf);
        struct ev *e = sess_push(u, t, T_PAGE_VIEW, NO_PRODUCT);
        e->device = dev;
        e->flags |= gf;
    }
    if (rng_chance(r, 0.05)) {
        t += rng_range(r, 1000, 30000);
        sess_push(u, t, T_LOGOUT, NO_PRODUCT)->device = dev;
    }
}

/* Plans the session starting at start into u->sess, sorted by ts and cut at the window's end. */
static void gen_session(const struct gen *g, struct user *u, int64_t start, int64_t end_ms,
                        double p_pre, int64_t max_delay)
{
    u->sess_len = 0;
    u->sess_pos = 0;
    if (u->flags & UF_BOT)
        gen_bot_session(g, u, start);
    else
        gen_user_session(g, u, start);

    /* Sometimes an event before the session's first one arrives only after it: the session
     * then gets a new first event and therefore a new session_id. */
    if (p_pre > 0 && u->sess_len > 0 && rng_chance(&u->rng, p_pre)) {
        int64_t room =
            u->last_ts == INT64_MIN ? 20 * MS_PER_MIN : start - u->last_ts - SESSION_GAP - 1;
        if (room > 20 * MS_PER_MIN)
            room = 20 * MS_PER_MIN;
        if (room >= 1000) {
            int64_t ts = start - rng_range(&u->rng, 1000, room);
            int64_t deliver = start + rng_range(&u->rng, 1000, 3 * MS_PER_MIN);
            if (deliver - ts <= max_delay) {
                struct ev *e = sess_push(u, ts, T_PAGE_VIEW, NO_PRODUCT);
                e->device = u->device;
                e->deliver = deliver;
                e->flags |= EVF_PRESESSION;
            }
        }
    }

    sort_session(u);
    while (u->sess_len > 0 && u->sess[u->sess_len - 1].ts > end_ms)
        u->sess_len--;
    u->nsessions++;
}

/* Start of the next session after one that ended at last, or INT64_MAX when there is none. */
static int64_t next_session_start(struct user *u, int64_t last, uint8_t *flags)
{
    struct rng *r = &u->rng;
    int64_t gap;
    double x = rng_unit(r);
    if (u->flags & UF_BOT) {
        gap = SESSION_GAP + 1 + (int64_t)rng_exp(r, u->mean_gap);
    } else if (x < 0.01) {
        *flags |= EVF_GAP_PLUS1;
        gap = SESSION_GAP + 1;
    } else if (x < 0.05) {
        gap = rng_range(r, SESSION_GAP + 2, 2 * SESSION_GAP);
    } else {
        if (!isfinite(u->mean_gap))
            return INT64_MAX;
        gap = SESSION_GAP + 1 + (int64_t)rng_exp(r, u->mean_gap);
    }
    if (gap < 0 || last > INT64_MAX - gap)
        return INT64_MAX;
    int64_t start = last + gap;
    /* Fewer visits at night: most sessions that would start between 01:00 and 06:00 local
     * time are pushed into the morning. */
    if (gap > 2 * SESSION_GAP && !(u->flags & UF_BOT)) {
        int64_t local = start + (int64_t)countries[u->country].offset_min * MS_PER_MIN;
        int64_t hour = (local % MS_PER_DAY + MS_PER_DAY) % MS_PER_DAY / MS_PER_HOUR;
        if (hour >= 1 && hour < 6 && rng_chance(r, 0.7))
            start += (6 - hour) * MS_PER_HOUR + rng_range(r, 0, 3 * MS_PER_HOUR);
    }
    return start;
}

/* ------------------------------------------------------------------------------------------
 * Heaps
 * ---------------------------------------------------------------------------------------- */

static inline bool user_less(const struct gen *g, uint32_t a, uint32_t b)
{
    int64_t ta = g->users[a].next_ts, tb = g->users[b].next_ts;
    return ta < tb || (ta == tb && a < b);
}

static void uheap_down(struct gen *g, uint32_t i)
{
    uint32_t n = g->heap_len;
    uint32_t x = g->heap[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && user_less(g, g->heap[c + 1], g->heap[c]))
            c++;
        if (!user_less(g, g->heap[c], x))
            break;
        g->heap[i] = g->heap[c];
        i = c;
    }
    g->heap[i] = x;
}

static void uheap_pop(struct gen *g)
{
    g->heap[0] = g->heap[--g->heap_len];
    if (g->heap_len > 0)
        uheap_down(g, 0);
}

static inline bool pend_less(const struct pend *a, const struct pend *b)
{
    return a->deliver < b->deliver || (a->deliver == b->deliver && a->seq < b->seq);
}

static void pend_push(struct gen *g, int64_t deliver, uint32_t user, uint8_t flags, uint8_t type,
                      const char *val, size_t len)
{
    if (g->pend_len == g->pend_cap) {
        g->pend_cap = g->pend_cap ? g->pend_cap * 2 : 1024;
        g->pend = xrealloc(g->pend, sizeof *g->pend * g->pend_cap);
    }
    struct pend p = {deliver, g->pend_seq++, user, (uint32_t)len, flags, type, xmalloc(len)};
    memcpy(p.val, val, len);
    size_t i = g->pend_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!pend_less(&p, &g->pend[parent]))
            break;
        g->pend[i] = g->pend[parent];
        i = parent;
    }
    g->pend[i] = p;
}

static struct pend pend_pop(struct gen *g)
{
    struct pend top = g->pend[0];
    struct pend x = g->pend[--g->pend_len];
    size_t n = g->pend_len, i = 0;
    if (n > 0) {
        for (;;) {
            size_t c = 2 * i + 1;
            if (c >= n)
                break;
            if (c + 1 < n && pend_less(&g->pend[c + 1], &g->pend[c]))
                c++;
            if (!pend_less(&g->pend[c], &x))
                break;
            g->pend[i] = g->pend[c];
            i = c;
        }
        g->pend[i] = x;
    }
    return top;
}

/* ------------------------------------------------------------------------------------------
 * JSON writing
 * ---------------------------------------------------------------------------------------- */

static void put_utf16(struct buf *b, unsigned cu)
{
    buf_adds(b, "\\u");
    buf_hex(b, cu, 4);
}

/* Writes a JSON string.  With ascii_only every non-ASCII character becomes a \u escape
 * (surrogate pairs above U+FFFF), which must decode to the very same bytes as the raw form. */
static void put_jstr(struct buf *b, const char *s, size_t n, bool ascii_only)
{
    buf_addc(b, '"');
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        if (c == '"' || c == '\\') {
            buf_addc(b, '\\');
            buf_addc(b, (char)c);
            i++;
        } else if (c < 0x20) {
            if (c == '\n')
                buf_adds(b, "\\n");
            else if (c == '\t')
                buf_adds(b, "\\t");
            else if (c == '\r')
                buf_adds(b, "\\r");
            else
                put_utf16(b, c);
            i++;
        } else if (c < 0x80 || !ascii_only) {
            buf_addc(b, (char)c);
            i++;
        } else {
            /* The strings here are known-valid UTF-8, so a plain decoder is enough. */
            unsigned cp;
            size_t len;
            if (c >= 0xf0) {
                cp = c & 0x07;
                len = 4;
            } else if (c >= 0xe0) {
                cp = c & 0x0f;
                len = 3;
            } else {
                cp = c & 0x1f;
                len = 2;
            }
            for (size_t k = 1; k < len && i + k < n; k++)
                cp = (cp << 6) | (p[i + k] & 0x3f);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                put_utf16(b, 0xd800 + (cp >> 10));
                put_utf16(b, 0xdc00 + (cp & 0x3ff));
            } else {
                put_utf16(b, cp);
            }
            i += len;
        }
    }
    buf_addc(b, '"');
}

static void put_jstrz(struct buf *b, const char *s)
{
    put_jstr(b, s, strlen(s), false);
}

/* Money as a JSON number from integer cents, in the spellings producers actually use:
 * "12.30", "12.3", "12", and now and then an exponent form of the same value. */
static void put_money(struct buf *b, int64_t cents, struct rng *r)
{
    double x = rng_unit(r);
    int64_t whole = cents / 100, frac = cents % 100;
    if (x < 0.01 && cents > 0) {
        char digits[24];
        int n = snprintf(digits, sizeof digits, "%" PRId64, cents);
        buf_addc(b, digits[0]);
        if (n > 1) {
            buf_addc(b, '.');
            buf_add(b, digits + 1, (size_t)(n - 1));
        }
        buf_addc(b, 'e');
        buf_i64(b, n - 1 - 2);
        return;
    }
    buf_i64(b, whole);
    if (x < 0.5 || frac % 10 != 0) {
        buf_addc(b, '.');
        buf_pad(b, (unsigned)frac, 2);
    } else if (frac != 0) {
        buf_addc(b, '.');
        buf_pad(b, (unsigned)(frac / 10), 1);
    }
}

/* An RFC 3339 string for ts in one of the spellings the contract accepts.  Fractions may
 * carry digits below the millisecond, which the contract cuts off. */
static void put_ts_string(struct buf *b, int64_t ts, int offset_min, struct rng *r)
{
    double x = rng_unit(r);
    int off = 0;
    int zmode; /* 0 'Z', 1 'z', 2 numeric offset, 3 "-00:00". */
    if (x < 0.45) {
        zmode = 0;
    } else if (x < 0.55) {
        zmode = 1;
    } else if (x < 0.97) {
        zmode = 2;
        off = rng_chance(r, 0.8) ? offset_min : (int)rng_range(r, -12, 14) * 60;
    } else {
        zmode = 3;
    }
    int64_t local = ts + (int64_t)off * MS_PER_MIN;
    int64_t days = local / MS_PER_DAY;
    int64_t rem = local % MS_PER_DAY;
    int y;
    unsigned mo, d;
    civil_from_days(days, &y, &mo, &d);
    buf_pad(b, (unsigned)y, 4);
    buf_addc(b, '-');
    buf_pad(b, mo, 2);
    buf_addc(b, '-');
    buf_pad(b, d, 2);
    double sx = rng_unit(r);
    buf_addc(b, sx < 0.8 ? 'T' : sx < 0.9 ? ' ' : 't');
    buf_pad(b, (unsigned)(rem / MS_PER_HOUR), 2);
    buf_addc(b, ':');
    buf_pad(b, (unsigned)(rem / MS_PER_MIN % 60), 2);
    buf_addc(b, ':');
    buf_pad(b, (unsigned)(rem / MS_PER_SEC % 60), 2);

    unsigned ms = (unsigned)(rem % 1000);
    double fx = rng_unit(r);
    if (fx < 0.5) {
        buf_addc(b, '.');
        buf_pad(b, ms, 3);
    } else if (fx < 0.75) {
        /* Shortest exact fraction: ".5" for 500 ms, nothing for a whole second. */
        if (ms != 0) {
            unsigned v = ms;
            int w = 3;
            while (v % 10 == 0) {
                v /= 10;
                w--;
            }
            buf_addc(b, '.');
            buf_pad(b, v, w);
        }
    } else {
        /* Micro- or nanoseconds that must be cut, not rounded. */
        buf_addc(b, '.');
        buf_pad(b, ms, 3);
        if (rng_chance(r, 0.5))
            buf_pad(b, (unsigned)rng_below(r, 1000), 3);
        else
            buf_pad(b, (unsigned)rng_below(r, 1000000), 6);
    }

    if (zmode == 0) {
        buf_addc(b, 'Z');
    } else if (zmode == 1) {
        buf_addc(b, 'z');
    } else if (zmode == 3) {
        buf_adds(b, "-00:00");
    } else {
        buf_addc(b, off < 0 ? '-' : '+');
        int a = off < 0 ? -off : off;
        buf_pad(b, (unsigned)(a / 60), 2);
        buf_addc(b, ':');
        buf_pad(b, (unsigned)(a % 60), 2);
    }
}

/* Field list handling. */

static inline struct buf *f_begin(struct fields *F, const char *key)
{
    F->f[F->n].key = key;
    F->f[F->n].off = (uint32_t)F->v.len;
    return &F->v;
}

static inline void f_end(struct fields *F)
{
    F->f[F->n].len = (uint32_t)(F->v.len - F->f[F->n].off);
    if (F->n < MAXF - 1)
        F->n++;
}

static void f_raw(struct fields *F, const char *key, const char *raw)
{
    buf_adds(f_begin(F, key), raw);
    f_end(F);
}

static int f_find(const struct fields *F, const char *key)
{
    for (int i = 0; i < F->n; i++)
        if (strcmp(F->f[i].key, key) == 0)
            return i;
    return -1;
}

static void f_del(struct fields *F, const char *key)
{
    int i;
    while ((i = f_find(F, key)) >= 0) {
        memmove(&F->f[i], &F->f[i + 1], sizeof F->f[0] * (size_t)(F->n - i - 1));
        F->n--;
    }
}

/* Replaces the value of key (keeping its position), or appends the field when absent. */
static void f_set(struct fields *F, const char *key, const char *raw)
{
    int i = f_find(F, key);
    if (i < 0) {
        f_raw(F, key, raw);
        return;
    }
    F->f[i].off = (uint32_t)F->v.len;
    buf_adds(&F->v, raw);
    F->f[i].len = (uint32_t)(F->v.len - F->f[i].off);
}

/* Style bits: 1 spaces after ':' and ',', 2 reversed field order. */
static void render(struct buf *o, const struct fields *F, unsigned style)
{
    bool sp = style & 1, rev = style & 2;
    buf_addc(o, '{');
    if (sp)
        buf_addc(o, ' ');
    for (int k = 0; k < F->n; k++) {
        const struct field *f = &F->f[rev ? F->n - 1 - k : k];
        if (k > 0)
            buf_add(o, sp ? ", " : ",", sp ? 2 : 1);
        buf_addc(o, '"');
        buf_adds(o, f->key);
        buf_add(o, sp ? "\": " : "\":", sp ? 3 : 2);
        buf_add(o, F->v.p + f->off, f->len);
    }
    if (sp)
        buf_addc(o, ' ');
    buf_addc(o, '}');
}

/* ------------------------------------------------------------------------------------------
 * Building messages
 * ---------------------------------------------------------------------------------------- */

static void user_key(const struct gen *g, uint32_t idx, struct buf *b)
{
    const struct user *u = &g->users[idx];
    b->len = 0;
    buf_addc(b, 'u');
    buf_pad(b, idx + 1, idx + 1 >= 10000000 ? 10 : 7);
    if (u->unicode)
        buf_adds(b, unicode_suffix[u->unicode]);
}

/* A fresh event id.  XOR with a salt and the splitmix finaliser are both bijections, so
 * distinct counters give distinct ids while the ids still look random. */
static void put_event_id(struct gen *g, struct buf *b)
{
    uint64_t v = mix64(g->next_id++ ^ g->id_salt);
    buf_addc(b, '"');
    if ((v & 0xff) < 26) {
        uint64_t w = mix64(v + 1);
        buf_hex(b, v >> 32, 8);
        buf_addc(b, '-');
        buf_hex(b, v >> 16, 4);
        buf_addc(b, '-');
        buf_hex(b, v, 4);
        buf_addc(b, '-');
        buf_hex(b, w >> 48, 4);
        buf_addc(b, '-');
        buf_hex(b, w, 12);
    } else {
        buf_addc(b, 'e');
        buf_hex(b, v, 16);
    }
    buf_addc(b, '"');
}

static void put_product_id(struct buf *b, uint32_t product)
{
    buf_adds(b, "\"p");
    buf_pad(b, product + 1, product + 1 >= 100000 ? 7 : 5);
    buf_addc(b, '"');
}

static void put_items(struct gen *g, struct buf *b, const struct ev *e, int64_t *amount)
{
    *amount = 0;
    buf_addc(b, '[');
    for (int i = 0; i < e->nitems; i++) {
        const struct item *it = &e->items[i];
        int64_t price = g->price[it->product];
        if (rng_chance(&g->rng, 0.1))
            price = price * 9 / 10; /* A discounted line. */
        bool free_gift = rng_chance(&g->rng, 0.01);
        if (free_gift)
            price = 0;
        *amount += price * it->qty;
        if (i > 0)
            buf_addc(b, ',');
        buf_adds(b, "{\"product_id\":");
        put_product_id(b, it->product);
        if (it->qty != 1 || rng_chance(&g->rng, 0.7)) {
            buf_adds(b, ",\"quantity\":");
            buf_u64(b, it->qty);
        }
        if (!free_gift || rng_chance(&g->rng, 0.5)) {
            buf_adds(b, ",\"price\":");
            put_money(b, price, &g->rng);
        }
        buf_addc(b, '}');
    }
    buf_addc(b, ']');
}

/* The fields of a well-formed event for user idx.  Decisions about spelling come from the
 * global stream, which is consumed in emission order and therefore deterministic. */
static void build_event(struct gen *g, uint32_t idx, const struct ev *e, struct fields *F)
{
    struct user *u = &g->users[idx];
    struct rng *r = &g->rng;
    F->n = 0;
    F->v.len = 0;

    put_event_id(g, f_begin(F, "event_id"));
    f_end(F);

    user_key(g, idx, &g->tmp);
    put_jstr(f_begin(F, "user_id"), g->tmp.p, g->tmp.len, u->unicode && rng_chance(r, 0.5));
    f_end(F);

    struct buf *b = f_begin(F, "event_type");
    buf_addc(b, '"');
    buf_adds(b, type_names[e->type]);
    buf_addc(b, '"');
    f_end(F);

    b = f_begin(F, "ts");
    if (rng_chance(r, 0.10)) {
        buf_addc(b, '"');
        put_ts_string(b, e->ts, countries[u->country].offset_min, r);
        buf_addc(b, '"');
        g->st.string_ts++;
    } else {
        buf_i64(b, e->ts);
    }
    f_end(F);

    /* About 3% of events lack a device or a country, or send null or ""; a user's first
     * event more often, so the "earliest event that has one" rule has work to do. */
    const char *dev_raw = NULL, *cty_raw = NULL;
    bool omit_dev = false, omit_cty = false;
    if (rng_chance(r, u->emitted == 0 ? 0.10 : 0.03)) {
        g->st.device_anomaly++;
        static const char *const forms[] = {NULL, "null", "\"\""};
        unsigned which = (unsigned)rng_below(r, 3); /* 0 device, 1 country, 2 both. */
        const char *form = forms[rng_below(r, 3)];
        if (which != 1) {
            omit_dev = form == NULL;
            dev_raw = form;
        }
        if (which != 0) {
            omit_cty = form == NULL;
            cty_raw = form;
        }
    }
    if (!omit_dev && (e->type != T_ASSIGN || rng_chance(r, 0.5))) {
        /* Rarely the key itself is spelled with an escape; it still means "device". */
        b = f_begin(F, rng_chance(r, 0.001) ? "\\u0064evice" : "device");
        if (dev_raw != NULL) {
            buf_adds(b, dev_raw);
        } else {
            buf_addc(b, '"');
            buf_adds(b, devices[e->device]);
            buf_addc(b, '"');
        }
        f_end(F);
    }
    if (!omit_cty && (e->type != T_ASSIGN || rng_chance(r, 0.5))) {
        b = f_begin(F, "country");
        if (cty_raw != NULL) {
            buf_adds(b, cty_raw);
        } else {
            buf_addc(b, '"');
            buf_adds(b, countries[u->country].code);
            buf_addc(b, '"');
        }
        f_end(F);
    }

    if (e->product != NO_PRODUCT) {
        put_product_id(f_begin(F, "product_id"), e->product);
        f_end(F);
    }

    if (e->type == T_PURCHASE) {
        int64_t amount = 0;
        double x = rng_unit(r);
        if (x < 0.015 || e->nitems == 0) {
            for (int i = 0; i < e->nitems; i++)
                amount += g->price[e->items[i].product] * e->items[i].qty;
        } else if (x < 0.02) {
            f_raw(F, "items", "[]");
            for (int i = 0; i < e->nitems; i++)
                amount += g->price[e->items[i].product] * e->items[i].qty;
        } else {
            put_items(g, f_begin(F, "items"), e, &amount);
            f_end(F);
        }
        if (rng_chance(r, 0.05)) {
            amount -= amount / 10; /* A coupon: the order total differs from its items. */
            f_raw(F, "coupon", "\"SAVE10\"");
        }
        put_money(f_begin(F, "amount"), amount, r);
        f_end(F);
        f_raw(F, "currency", "\"USD\"");
    } else if (e->type == T_ASSIGN) {
        b = f_begin(F, "experiment");
        put_jstrz(b, g->o.experiment);
        f_end(F);
        b = f_begin(F, "variant");
        put_jstrz(b, g->vname[e->variant]);
        f_end(F);
    }

    /* Fields the contract ignores, from harmless context to look-alikes of real fields. */
    if (e->type == T_PAGE_VIEW && rng_chance(r, 0.2)) {
        put_jstrz(f_begin(F, "page"), pages[rng_below(r, NPAGES)]);
        f_end(F);
    }
    if (e->type == T_SEARCH) {
        const char *q = queries[rng_below(r, NQUERIES)];
        put_jstr(f_begin(F, "query"), q, strlen(q), rng_chance(r, 0.3));
        f_end(F);
    }
    double x = rng_unit(r);
    if (x < 0.05) {
        put_jstrz(f_begin(F, "ua"), user_agents[rng_below(r, 3)]);
        f_end(F);
    } else if (x < 0.08) {
        f_raw(F, "ctx",
              "{\"app\":\"web\",\"build\":1234,\"flags\":[1,2.5,null,true],"
              "\"ts\":\"not checked\"}");
    } else if (x < 0.09) {
        b = f_begin(F, "client_ts");
        buf_i64(b, e->ts - (int64_t)rng_below(r, 5000));
        f_end(F);
    } else if (x < 0.093) {
        f_raw(F, "Ts", "\"a different key than ts\"");
    } else if (x < 0.096 && e->type != T_PURCHASE) {
        /* amount, items, experiment and variant are read only on their own event types. */
        static const char *const look[][2] = {
            {"amount", "\"n/a\""},
            {"items", "5"},
            {"experiment", "7"},
            {"variant", "null"},
        };
        unsigned k = (unsigned)rng_below(r, 4);
        if (e->type != T_ASSIGN || k < 2)
            f_raw(F, look[k][0], look[k][1]);
    } else if (x < 0.10) {
        f_raw(F, "session_id", "\"s-ignored\"");
    }
}

static unsigned pick_style(struct rng *r)
{
    double x = rng_unit(r);
    return x < 0.03 ? 1u : x < 0.06 ? 2u : x < 0.07 ? 3u : 0u;
}

/* ------------------------------------------------------------------------------------------
 * Sinks
 * ---------------------------------------------------------------------------------------- */

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    struct gen *g = opaque;
    if (m->err) {
        if (g->dr_failed < 5)
            fprintf(stderr, "clickmart-gen: delivery failed: %s\n", rd_kafka_err2str(m->err));
        g->dr_failed++;
    } else {
        g->dr_ok++;
    }
}

static void flush_file(struct gen *g)
{
    if (g->out.len == 0)
        return;
    if (fwrite(g->out.p, 1, g->out.len, g->fp) != g->out.len)
        die("write error on %s: %s", g->o.out, strerror(errno));
    g->out.len = 0;
}

static void progress(struct gen *g, bool final)
{
    double t = mono_now();
    if (!final && t - g->last_progress < 1.0)
        return;
    g->last_progress = t;
    if (g->o.quiet)
        return;
    double el = t - g->t0;
    double pct = g->target ? 100.0 * (double)g->st.msgs / (double)g->target : 100.0;
    fprintf(stderr, "gen: %" PRIu64 "/%" PRIu64 " events (%.0f%%) %.0f ev/s\n", g->st.msgs,
            g->target, pct, el > 0 ? (double)g->st.msgs / el : 0.0);
}

/* Sends one message; returns false when the target count is reached (nothing sent). */
static bool emit(struct gen *g, uint32_t uidx, const char *val, size_t vlen)
{
    if (g->st.msgs >= g->target || g_stop) {
        g->done = true;
        return false;
    }
    user_key(g, uidx, &g->key);
    if (g->fp != NULL) {
        buf_grow(&g->out, g->key.len + vlen + 2);
        buf_add(&g->out, g->key.p, g->key.len);
        buf_addc(&g->out, '\t');
        buf_add(&g->out, val, vlen);
        buf_addc(&g->out, '\n');
        if (g->out.len >= (1u << 20))
            flush_file(g);
    } else {
        for (;;) {
            rd_kafka_resp_err_t err = rd_kafka_producev(
                g->rk, RD_KAFKA_V_RKT(g->rkt), RD_KAFKA_V_KEY(g->key.p, g->key.len),
                RD_KAFKA_V_VALUE((void *)val, vlen), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                RD_KAFKA_V_END);
            if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
                break;
            if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                /* The local queue is full: serve delivery reports until there is room. */
                rd_kafka_poll(g->rk, 100);
                if (g_stop)
                    return false;
                continue;
            }
            fprintf(stderr, "clickmart-gen: produce failed: %s\n", rd_kafka_err2str(err));
            g->produce_failed = true;
            break;
        }
        if ((g->st.msgs & 1023) == 0)
            rd_kafka_poll(g->rk, 0);
    }
    g->st.msgs++;

    if (g->o.rate > 0) {
        /* Sleep whenever we are more than a millisecond ahead of the schedule. */
        double due = g->t0 + (double)g->st.msgs / g->o.rate;
        double ahead = due - mono_now();
        if (ahead > 0.001) {
            if (g->fp != NULL)
                flush_file(g);
            struct timespec ts = {(time_t)ahead, (long)((ahead - (double)(time_t)ahead) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    if ((g->st.msgs & 4095) == 0)
        progress(g, false);
    return true;
}

/* ------------------------------------------------------------------------------------------
 * Malformed messages
 * ---------------------------------------------------------------------------------------- */

static const struct badcase *next_badcase(struct gen *g, int *id)
{
    for (;;) {
        int i = g->bad_idx;
        const struct badcase *c = &badcases[i];
        unsigned times = c->times ? c->times : 1;
        if (g->bad_round % c->every == 0 && g->bad_rep < times) {
            g->bad_rep++;
            *id = i;
            return c;
        }
        g->bad_rep = 0;
        if (++g->bad_idx == NBC) {
            g->bad_idx = 0;
            g->bad_round++;
        }
    }
}

/* A well-formed template of the given type for user idx at ts, compact and in canonical order,
 * which the malformed cases then break in exactly one way. */
static void template_event(struct gen *g, uint32_t idx, uint8_t type, int64_t ts)
{
    struct user *u = &g->users[idx];
    struct fields *F = &g->F;
    F->n = 0;
    F->v.len = 0;
    put_event_id(g, f_begin(F, "event_id"));
    f_end(F);
    user_key(g, idx, &g->tmp);
    put_jstr(f_begin(F, "user_id"), g->tmp.p, g->tmp.len, false);
    f_end(F);
    struct buf *b = f_begin(F, "event_type");
    buf_addc(b, '"');
    buf_adds(b, type_names[type]);
    buf_addc(b, '"');
    f_end(F);
    buf_i64(f_begin(F, "ts"), ts);
    f_end(F);
    b = f_begin(F, "device");
    put_jstrz(b, devices[u->device]);
    f_end(F);
    b = f_begin(F, "country");
    put_jstrz(b, countries[u->country].code);
    f_end(F);
    if (type == T_PRODUCT_VIEW || type == T_PAGE_VIEW) {
        put_product_id(f_begin(F, "product_id"), pick_product(g, &g->rng));
        f_end(F);
    } else if (type == T_PURCHASE) {
        uint32_t p = pick_product(g, &g->rng);
        b = f_begin(F, "items");
        buf_adds(b, "[{\"product_id\":");
        put_product_id(b, p);
        buf_adds(b, ",\"quantity\":2,\"price\":");
        put_money(b, g->price[p], &g->rng);
        buf_adds(b, "}]");
        f_end(F);
        put_money(f_begin(F, "amount"), g->price[p] * 2, &g->rng);
        f_end(F);
    } else if (type == T_ASSIGN) {
        put_jstrz(f_begin(F, "experiment"), g->o.experiment);
        f_end(F);
        put_jstrz(f_begin(F, "variant"), g->vname[g->control]);
        f_end(F);
    }
}

/* Replaces every occurrence of a byte, for the single-quoted "JSON". */
static void replace_byte(struct buf *b, size_t from, char a, char c)
{
    for (size_t i = from; i < b->len; i++)
        if (b->p[i] == a)
            b->p[i] = c;
}

static void ts_string_into(struct gen *g, char *out, size_t n, int64_t ts)
{
    struct buf b = {0};
    buf_addc(&b, '"');
    put_ts_string(&b, ts, 0, &g->rng);
    buf_addc(&b, '"');
    snprintf(out, n, "%.*s", (int)b.len, b.p);
    free(b.p);
}

/* Pads the rendered template with an ignored string field so the whole value has exactly
 * total bytes; the filler is compressible, which keeps the broker's log small. */
static void pad_to(struct gen *g, struct buf *o, size_t total)
{
    struct fields *F = &g->F;
    render(o, F, 0);
    size_t base = o->len;
    size_t overhead = strlen(",\"pad\":\"\"");
    o->len = 0;
    if (base + overhead > total) {
        render(o, F, 0);
        return;
    }
    struct buf *b = f_begin(F, "pad");
    buf_addc(b, '"');
    buf_fill(b, 'x', total - base - overhead);
    buf_addc(b, '"');
    f_end(F);
    render(o, F, 0);
}

/* Builds one malformed (or boundary) message for user idx at stream time now into g->msg. */
static void make_bad(struct gen *g, uint32_t idx, int id, int64_t now)
{
    struct fields *F = &g->F;
    struct buf *o = &g->msg;
    struct rng *r = &g->rng;
    char tmp[160];
    o->len = 0;

    uint8_t type = T_PAGE_VIEW;
    switch (id) {
    case BC_MISS_AMOUNT:
    case BC_MISS_AMOUNT_NULL:
    case BC_TYPE_AMOUNT_STRING:
    case BC_TYPE_ITEMS_OBJECT:
    case BC_TYPE_ITEMS_ELEMENT:
    case BC_TYPE_QUANTITY_STRING:
    case BC_TYPE_PRICE_STRING:
    case BC_TYPE_ITEM_PRODUCT_NUMBER:
    case BC_VAL_AMOUNT_NEGATIVE:
    case BC_VAL_AMOUNT_HUGE:
    case BC_VAL_QUANTITY_ZERO:
    case BC_VAL_QUANTITY_HUGE:
    case BC_VAL_PRICE_NEGATIVE:
    case BC_VAL_ITEMS_101:
    case BC_VAL_ITEM_PRODUCT_EMPTY:
    case BC_JSON_NUM_OVERFLOW:
        type = T_PURCHASE;
        break;
    case BC_MISS_EXPERIMENT:
    case BC_MISS_VARIANT:
    case BC_TYPE_EXPERIMENT:
    case BC_TYPE_VARIANT:
    case BC_VAL_EXPERIMENT_LONG:
    case BC_VAL_VARIANT_LONG:
        type = T_ASSIGN;
        break;
    default:
        type = rng_chance(r, 0.5) ? T_PAGE_VIEW : T_PRODUCT_VIEW;
        break;
    }
    template_event(g, idx, type, now);

    switch (id) {
    case BC_LARGE_VALID:
        pad_to(g, o, 70000);
        return;
    case BC_LARGE_INVALID:
        buf_adds(o, "{\"event_id\":\"");
        buf_fill(o, 'z', 70000);
        return;
    case BC_LARGE_65537:
        pad_to(g, o, MAX_EVENT_BYTES + 1);
        return;
    case BC_EDGE_65536:
        pad_to(g, o, MAX_EVENT_BYTES);
        return;

    case BC_JSON_TRUNCATED:
        render(o, F, 0);
        o->len = o->len * 3 / 5;
        return;
    case BC_JSON_BAD_UTF8:
        f_set(F, "note", "\"caf\xe9 latin-1\"");
        break;
    case BC_JSON_OVERLONG_UTF8:
        f_set(F, "device", "\"mob\xc0\xafile\"");
        break;
    case BC_JSON_UTF8_SURROGATE:
        f_set(F, "note", "\"\xed\xa0\x80\"");
        break;
    case BC_JSON_LONE_HIGH:
        f_set(F, "note", "\"x\\ud800y\"");
        break;
    case BC_JSON_LONE_LOW:
        f_set(F, "device", "\"\\udc00\"");
        break;
    case BC_JSON_HIGH_THEN_ASCII:
        f_set(F, "note", "\"\\ud800\\u0041\"");
        break;
    case BC_JSON_DUP_KEY:
        /* Both values are valid timestamps: only the repetition makes it invalid. */
        buf_i64(f_begin(F, "ts"), now + 1);
        f_end(F);
        break;
    case BC_JSON_DUP_KEY_ESCAPED:
        f_raw(F, "\\u0063ountry", "\"FR\"");
        break;
    case BC_JSON_DUP_KEY_NESTED:
        f_raw(F, "ctx", "{\"app\":\"web\",\"app\":\"ios\"}");
        break;
    case BC_JSON_NUL_ESCAPE:
        f_set(F, "device", "\"mob\\u0000ile\"");
        break;
    case BC_JSON_NUM_OVERFLOW:
        f_set(F, "amount", "1e999");
        break;
    case BC_JSON_NUM_NEG_OVERFLOW:
        f_raw(F, "score", "-1e999");
        break;
    case BC_JSON_EMPTY:
        return;
    case BC_JSON_WHITESPACE:
        buf_adds(o, "   ");
        return;
    case BC_JSON_TRAILING_GARBAGE:
        render(o, F, 0);
        buf_adds(o, " x");
        return;
    case BC_JSON_TWO_OBJECTS:
        render(o, F, 0);
        render(o, F, 0);
        return;
    case BC_JSON_SINGLE_QUOTES:
        render(o, F, 0);
        replace_byte(o, 0, '"', '\'');
        return;
    case BC_JSON_TRAILING_COMMA:
        render(o, F, 0);
        o->len--;
        buf_adds(o, ",}");
        return;
    case BC_JSON_NAN:
        f_raw(F, "score", "NaN");
        break;
    case BC_JSON_CONTROL_CHAR:
        f_set(F, "note", "\"bell\x01here\"");
        break;
    case BC_JSON_UNTERMINATED:
        buf_adds(o, "{\"event_id\":\"e0000000000000000}");
        return;

    case BC_OBJ_ARRAY:
        buf_adds(o, "[1,2,3]");
        return;
    case BC_OBJ_STRING:
        buf_adds(o, "\"page_view\"");
        return;
    case BC_OBJ_NUMBER:
        buf_adds(o, "42");
        return;
    case BC_OBJ_NULL:
        buf_adds(o, "null");
        return;
    case BC_OBJ_TRUE:
        buf_adds(o, "true");
        return;
    case BC_OBJ_WRAPPED:
        buf_addc(o, '[');
        render(o, F, 0);
        buf_addc(o, ']');
        return;

    case BC_MISS_EVENT_ID:
        f_del(F, "event_id");
        break;
    case BC_MISS_USER_ID:
        f_del(F, "user_id");
        break;
    case BC_MISS_USER_ID_NULL:
        f_set(F, "user_id", "null");
        break;
    case BC_MISS_EVENT_TYPE:
        f_del(F, "event_type");
        break;
    case BC_MISS_TS:
        f_del(F, "ts");
        break;
    case BC_MISS_TS_NULL:
        f_set(F, "ts", "null");
        break;
    case BC_MISS_AMOUNT:
        f_del(F, "amount");
        break;
    case BC_MISS_AMOUNT_NULL:
        f_set(F, "amount", "null");
        break;
    case BC_MISS_EXPERIMENT:
        f_del(F, "experiment");
        break;
    case BC_MISS_VARIANT:
        f_del(F, "variant");
        break;
    case BC_MISS_EMPTY_OBJECT:
        buf_adds(o, "{}");
        return;

    case BC_TYPE_EVENT_ID:
        f_set(F, "event_id", "12345");
        break;
    case BC_TYPE_USER_ID:
        f_set(F, "user_id", "42");
        break;
    case BC_TYPE_EVENT_TYPE:
        f_set(F, "event_type", "[\"page_view\"]");
        break;
    case BC_TYPE_TS_FLOAT_EXP:
        snprintf(tmp, sizeof tmp, "%.6e", (double)now);
        f_set(F, "ts", tmp);
        break;
    case BC_TYPE_TS_FLOAT_FRAC:
        snprintf(tmp, sizeof tmp, "%" PRId64 ".5", now);
        f_set(F, "ts", tmp);
        break;
    case BC_TYPE_TS_BOOL:
        f_set(F, "ts", "true");
        break;
    case BC_TYPE_AMOUNT_STRING:
        f_set(F, "amount", "\"12.50\"");
        break;
    case BC_TYPE_ITEMS_OBJECT:
        f_set(F, "items", "{\"product_id\":\"p00001\",\"quantity\":1,\"price\":1.00}");
        break;
    case BC_TYPE_ITEMS_ELEMENT:
        f_set(F, "items", "[{\"product_id\":\"p00001\",\"quantity\":1,\"price\":1.00},7]");
        break;
    case BC_TYPE_QUANTITY_STRING:
        f_set(F, "items", "[{\"product_id\":\"p00001\",\"quantity\":\"2\",\"price\":1.00}]");
        break;
    case BC_TYPE_PRICE_STRING:
        f_set(F, "items", "[{\"product_id\":\"p00001\",\"quantity\":1,\"price\":\"9.99\"}]");
        break;
    case BC_TYPE_ITEM_PRODUCT_NUMBER:
        f_set(F, "items", "[{\"product_id\":17,\"quantity\":1,\"price\":1.00}]");
        break;
    case BC_TYPE_EXPERIMENT:
        f_set(F, "experiment", "7");
        break;
    case BC_TYPE_VARIANT:
        f_set(F, "variant", "false");
        break;
    case BC_TYPE_DEVICE:
        f_set(F, "device", "5");
        break;
    case BC_TYPE_COUNTRY:
        f_set(F, "country", "[\"DE\"]");
        break;
    case BC_TYPE_PRODUCT_ID:
        f_set(F, "product_id", "42");
        break;

    case BC_VAL_EVENT_TYPE_PATTERN:
        f_set(F, "event_type", "\"Page-View\"");
        break;
    case BC_VAL_EVENT_TYPE_DIGIT:
        f_set(F, "event_type", "\"1click\"");
        break;
    case BC_VAL_EVENT_TYPE_LONG:
        f_set(F, "event_type",
              "\"a1234567890123456789012345678901234567890123456789012345678901234\"");
        break;
    case BC_VAL_EVENT_ID_EMPTY:
        f_set(F, "event_id", "\"\"");
        break;
    case BC_VAL_EVENT_ID_LONG:
    case BC_VAL_USER_ID_LONG:
    case BC_VAL_PRODUCT_ID_LONG: {
        struct buf *b = &g->tmp;
        b->len = 0;
        buf_addc(b, '"');
        buf_fill(b, id == BC_VAL_EVENT_ID_LONG ? 'e' : id == BC_VAL_USER_ID_LONG ? 'u' : 'p', 129);
        buf_addc(b, '"');
        buf_addc(b, '\0');
        f_set(F,
              id == BC_VAL_EVENT_ID_LONG  ? "event_id"
              : id == BC_VAL_USER_ID_LONG ? "user_id"
                                          : "product_id",
              b->p);
        break;
    }
    case BC_VAL_TS_NO_OFFSET:
        ts_string_into(g, tmp, sizeof tmp, now);
        /* Cut the zone designator off the end (Z, z or an offset) and close the quote. */
        {
            size_t n = strlen(tmp) - 1;
            if (tmp[n - 1] == 'Z' || tmp[n - 1] == 'z')
                n -= 1;
            else
                n -= 6;
            tmp[n] = '"';
            tmp[n + 1] = '\0';
        }
        f_set(F, "ts", tmp);
        break;
    case BC_VAL_TS_GARBAGE:
        f_set(F, "ts", "\"yesterday\"");
        break;
    case BC_VAL_TS_BAD_DATE:
        f_set(F, "ts", "\"2025-02-30T10:00:00Z\"");
        break;
    case BC_VAL_TS_1999:
        snprintf(tmp, sizeof tmp, "%" PRId64, TS_MIN - 1 - (int64_t)rng_below(r, MS_PER_DAY));
        f_set(F, "ts", tmp);
        break;
    case BC_VAL_TS_STRING_1999:
        f_set(F, "ts", "\"1999-12-31T23:59:59.999Z\"");
        break;
    case BC_VAL_TS_2100:
        snprintf(tmp, sizeof tmp, "%" PRId64, TS_MAX);
        f_set(F, "ts", tmp);
        break;
    case BC_VAL_TS_NEGATIVE:
        f_set(F, "ts", "-1");
        break;
    case BC_VAL_AMOUNT_NEGATIVE:
        f_set(F, "amount", "-5.00");
        break;
    case BC_VAL_AMOUNT_HUGE:
        f_set(F, "amount", "1000000000000.01");
        break;
    case BC_VAL_QUANTITY_ZERO:
        f_set(F, "items", "[{\"product_id\":\"p00001\",\"quantity\":0,\"price\":1.00}]");
        break;
    case BC_VAL_QUANTITY_HUGE:
        f_set(F, "items", "[{\"product_id\":\"p00001\",\"quantity\":1000001,\"price\":1.00}]");
        break;
    case BC_VAL_PRICE_NEGATIVE:
        f_set(F, "items", "[{\"product_id\":\"p00001\",\"quantity\":1,\"price\":-1.00}]");
        break;
    case BC_VAL_ITEMS_101: {
        struct buf *b = &g->tmp;
        b->len = 0;
        buf_addc(b, '[');
        for (int i = 0; i < 101; i++) {
            if (i > 0)
                buf_addc(b, ',');
            buf_adds(b, "{\"product_id\":");
            put_product_id(b, (uint32_t)i % g->nproducts);
            buf_adds(b, ",\"quantity\":1,\"price\":1.00}");
        }
        buf_addc(b, ']');
        buf_addc(b, '\0');
        f_set(F, "items", b->p);
        f_set(F, "amount", "101.00");
        break;
    }
    case BC_VAL_ITEM_PRODUCT_EMPTY:
        f_set(F, "items", "[{\"product_id\":\"\",\"quantity\":1,\"price\":1.00}]");
        break;
    case BC_VAL_DEVICE_LONG:
        f_set(F, "device", "\"desktop-with-a-very-long-name-xyz\"");
        break;
    case BC_VAL_COUNTRY_LONG:
        f_set(F, "country", "\"The United Kingdom of Great Brita\"");
        break;
    case BC_VAL_EXPERIMENT_LONG:
        f_set(F, "experiment",
              "\"x1234567890123456789012345678901234567890123456789012345678901234\"");
        break;
    case BC_VAL_VARIANT_LONG:
        f_set(F, "variant",
              "\"v1234567890123456789012345678901234567890123456789012345678901234\"");
        break;

    case BC_FUTURE_DAY:
        snprintf(tmp, sizeof tmp, "%" PRId64, g->future_ms + (int64_t)rng_below(r, MS_PER_HOUR));
        f_set(F, "ts", tmp);
        break;
    case BC_FUTURE_DAY_STRING:
        ts_string_into(g, tmp, sizeof tmp, g->future_ms + (int64_t)rng_below(r, MS_PER_HOUR));
        f_set(F, "ts", tmp);
        break;
    case BC_FUTURE_2099:
        snprintf(tmp, sizeof tmp, "%" PRId64,
                 days_from_civil(2099, 6, 1) * MS_PER_DAY + (int64_t)rng_below(r, MS_PER_DAY));
        f_set(F, "ts", tmp);
        break;

    case BC_LATE_INT:
        snprintf(tmp, sizeof tmp, "%" PRId64,
                 now - 5 * MS_PER_DAY - (int64_t)rng_below(r, 6 * MS_PER_HOUR));
        f_set(F, "ts", tmp);
        break;
    case BC_LATE_STRING:
        ts_string_into(g, tmp, sizeof tmp,
                       now - 5 * MS_PER_DAY - (int64_t)rng_below(r, 6 * MS_PER_HOUR));
        f_set(F, "ts", tmp);
        break;
    default:
        break;
    }
    render(o, F, 0);
}

/* ------------------------------------------------------------------------------------------
 * The stream
 * ---------------------------------------------------------------------------------------- */

static int64_t dup_delay(struct rng *r)
{
    double x = rng_unit(r);
    if (x < 0.85)
        return rng_range(r, 0, MS_PER_MIN);
    if (x < 0.98)
        return rng_range(r, MS_PER_MIN, 30 * MS_PER_MIN);
    return rng_range(r, 30 * MS_PER_MIN, 6 * MS_PER_HOUR);
}

static int64_t late_delay(const struct gen *g, struct rng *r)
{
    int64_t d;
    if (rng_chance(r, 0.8))
        d = 1000 + (int64_t)rng_exp(r, 2.0 * MS_PER_MIN);
    else
        d = rng_range(r, 1000, g->o.max_delay_ms);
    return d > g->o.max_delay_ms ? g->o.max_delay_ms : d;
}

/* Emits a first copy of a good message and, by chance, schedules its re-send; after an
 * on-time message it may also add one malformed message for the same key. */
static void emit_original(struct gen *g, uint32_t uidx, const char *val, size_t len, int64_t now,
                          uint8_t pflags, uint8_t evtype, bool on_time)
{
    if (!emit(g, uidx, val, len))
        return;
    g->st.good++;
    g->st.type_count[evtype < NTYPES ? evtype : T_PAGE_VIEW]++;
    if (evtype == T_ASSIGN)
        g->st.assignments++;
    else
        g->st.clickstream++;
    if (pflags & PEND_LATE)
        g->st.late++;
    if (pflags & PEND_BRIDGE)
        g->st.bridges++;
    if (pflags & PEND_PRESESSION)
        g->st.presession++;
    g->users[uidx].emitted++;

    /* The per-message probabilities may exceed 1 for extreme flags: the integer part then
     * gives that many copies for sure and the fraction one more by chance. The double counts
     * down by whole copies and p - 1.0 is exact for any p >= 1 here, so rounding cannot change
     * the number of passes (the float loop counter check is about loops where it can). */
    // NOLINTNEXTLINE(clang-analyzer-security.FloatLoopCounter)
    for (double p = g->p_dup; p > 0; p -= 1.0)
        if (p >= 1.0 || rng_chance(&g->rng, p))
            pend_push(g, now + dup_delay(&g->rng), uidx, PEND_DUP, evtype, val, len);

    /* Malformed messages follow on-time events only: the event just sent set the watermark of
     * this key's partition to now, which is what makes the too_late cases reliably late. The
     * double counts down by whole messages, exactly, as above. */
    if (!on_time)
        return;
    // NOLINTNEXTLINE(clang-analyzer-security.FloatLoopCounter)
    for (double p = g->p_bad; p > 0; p -= 1.0) {
        if (p < 1.0 && !rng_chance(&g->rng, p))
            break;
        int id;
        const struct badcase *c = next_badcase(g, &id);
        make_bad(g, uidx, id, now);
        if (emit(g, uidx, g->msg.p, g->msg.len)) {
            g->st.bad[c->kind]++;
            g->st.badcase[id]++;
        }
    }
}

/* Serialises a planned event and sends it now or parks it until its delivery time. */
static void handle_event(struct gen *g, uint32_t uidx, const struct ev *e)
{
    struct user *u = &g->users[uidx];
    build_event(g, uidx, e, &g->F);
    g->msg.len = 0;
    render(&g->msg, &g->F, pick_style(&g->rng));

    if (e->flags & EVF_GAP_EXACT)
        g->st.gap_exact++;
    if (e->flags & EVF_GAP_PLUS1)
        g->st.gap_plus1++;
    if (e->flags & EVF_CONTAM)
        g->st.contam++;
    if (e->flags & EVF_REASSIGN)
        g->st.reassign++;
    if (e->ts < g->st.first_ts)
        g->st.first_ts = e->ts;
    if (e->ts > g->st.last_ts)
        g->st.last_ts = e->ts;

    uint8_t pf = 0;
    int64_t deliver = 0;
    if (e->deliver > 0) {
        deliver = e->deliver;
        pf |= PEND_LATE | PEND_PRESESSION;
    } else if (g->p_late > 0 &&
               rng_chance(&g->rng, e->type == T_ASSIGN ? g->p_assign_late : g->p_late)) {
        deliver = e->ts + late_delay(g, &g->rng);
        pf |= PEND_LATE;
    }
    if (deliver > 0) {
        pend_push(g, deliver, uidx, pf, e->type, g->msg.p, g->msg.len);
        u->emitted++;
        return;
    }
    emit_original(g, uidx, g->msg.p, g->msg.len, e->ts, pf, e->type, true);
}

/* After a session that ended at last: plans the next visit into u, and returns true when a
 * bridge event (ts in *bridge_ts, delivery in *deliver) closes the gap between the two.  The
 * dry run of the calibration calls it too, so it may touch only the user and its PRNG. */
static bool plan_after_session(const struct gen *g, struct user *u, int64_t last,
                               int64_t *bridge_ts, int64_t *deliver)
{
    uint8_t flags = 0;
    int64_t next = next_session_start(u, last, &flags);
    u->last_ts = last;
    u->next_ts = next;
    /* The next session's first event carries the gap flag, so remember it on the user. */
    u->next_flags = flags;

    /* A gap of 30 to 60 minutes can be closed by one event in its middle.  Sent late, after
     * the next session has begun, it merges the two sessions into one. */
    int64_t gap = next - last;
    if (next <= g->end_ms && gap > SESSION_GAP + 1 && gap <= 2 * SESSION_GAP && g->p_bridge > 0 &&
        rng_chance(&u->rng, g->p_bridge)) {
        *bridge_ts = last + gap / 2;
        *deliver = next + rng_range(&u->rng, 1000, 2 * MS_PER_MIN);
        return *deliver - *bridge_ts <= g->o.max_delay_ms;
    }
    return false;
}

static void end_session(struct gen *g, uint32_t uidx)
{
    struct user *u = &g->users[uidx];
    int64_t last = u->sess[u->sess_len - 1].ts;
    free(u->sess);
    u->sess = NULL;
    u->sess_len = u->sess_pos = u->sess_cap = 0;

    int64_t bts = 0, deliver = 0;
    if (plan_after_session(g, u, last, &bts, &deliver)) {
        struct ev e;
        memset(&e, 0, sizeof e);
        e.ts = bts;
        e.type = T_PAGE_VIEW;
        e.product = NO_PRODUCT;
        e.device = u->device;
        build_event(g, uidx, &e, &g->F);
        g->msg.len = 0;
        render(&g->msg, &g->F, 0);
        pend_push(g, deliver, uidx, PEND_LATE | PEND_BRIDGE, T_PAGE_VIEW, g->msg.p, g->msg.len);
        u->emitted++;
    }
}

static void step_user(struct gen *g)
{
    uint32_t idx = g->heap[0];
    struct user *u = &g->users[idx];

    if (u->sess_pos >= u->sess_len) {
        if (u->next_ts > g->end_ms) {
            uheap_pop(g);
            return;
        }
        bool plus1 = (u->next_flags & EVF_GAP_PLUS1) != 0;
        u->next_flags = 0;
        gen_session(g, u, u->next_ts, g->end_ms, g->p_pre, g->o.max_delay_ms);
        if (u->sess_len == 0) {
            free(u->sess);
            u->sess = NULL;
            u->sess_cap = 0;
            uheap_pop(g);
            return;
        }
        if (plus1) {
            for (uint32_t i = 0; i < u->sess_len; i++) {
                if (u->sess[i].type != T_ASSIGN && !(u->sess[i].flags & EVF_PRESESSION)) {
                    u->sess[i].flags |= EVF_GAP_PLUS1;
                    break;
                }
            }
        }
        /* The first event may precede the planned start (an assignment, a pre-session
         * event); a smaller key at the root keeps the heap valid. */
        u->next_ts = u->sess[0].ts;
        uheap_down(g, 0);
        return;
    }

    struct ev e = u->sess[u->sess_pos++];
    handle_event(g, idx, &e);
    if (u->sess_pos < u->sess_len)
        u->next_ts = u->sess[u->sess_pos].ts;
    else
        end_session(g, idx);
    uheap_down(g, 0);
}

static void step_pending(struct gen *g)
{
    struct pend p = pend_pop(g);
    if (p.flags & PEND_DUP) {
        if (emit(g, p.user, p.val, p.len))
            g->st.dups++;
    } else {
        emit_original(g, p.user, p.val, p.len, p.deliver, p.flags, p.type, false);
    }
    free(p.val);
}

static void run(struct gen *g)
{
    while (!g->done && !g_stop) {
        int64_t tu = g->heap_len > 0 ? g->users[g->heap[0]].next_ts : INT64_MAX;
        int64_t tp = g->pend_len > 0 ? g->pend[0].deliver : INT64_MAX;
        if (g->heap_len == 0 && g->pend_len == 0)
            break;
        if (g->pend_len > 0 && tp <= tu)
            step_pending(g);
        else
            step_user(g);
    }
}

/* ------------------------------------------------------------------------------------------
 * Set-up: users and calibration
 * ---------------------------------------------------------------------------------------- */

/* Average events per session (assignments included), measured on throw-away users with a
 * fixed seed; it only gives the first guess of the visit rate. */
static double events_per_session(const struct gen *g)
{
    uint64_t events = 0, sessions = 0;
    for (uint32_t k = 0; k < 200; k++) {
        struct user u;
        memset(&u, 0, sizeof u);
        rng_seed(&u.rng, 0xca11b4a7ULL + k);
        u.last_ts = INT64_MIN;
        if (rng_chance(&u.rng, 0.6)) {
            u.flags |= UF_ASSIGN_PLANNED;
            u.assign_mode = (uint8_t)rng_below(&u.rng, 4);
        }
        int64_t t = INT64_C(1700000000000);
        for (int s = 0; s < 5; s++) {
            gen_session(g, &u, t, INT64_MAX, 0, 0);
            events += u.sess_len;
            sessions++;
            t += MS_PER_DAY;
        }
        free(u.sess);
    }
    return (double)events / (double)sessions;
}

static double mean_gap_for(double base_rate, double mult)
{
    double rate = base_rate * mult;
    return rate > 0 ? 1.0 / rate : INFINITY;
}

/* Replays the whole timeline of a copy of user src, exactly as the stream will play it, and
 * returns its number of good messages.  Timelines depend only on the user's own PRNG, which
 * is what makes this exact. */
static uint64_t dry_run_user(const struct gen *g, const struct user *src, double base_rate)
{
    struct user u = *src;
    u.sess = NULL;
    u.sess_len = u.sess_pos = u.sess_cap = 0;
    if (!(u.flags & UF_BOT))
        u.mean_gap = mean_gap_for(base_rate, u.mult);
    uint64_t n = 0;
    while (u.next_ts <= g->end_ms) {
        gen_session(g, &u, u.next_ts, g->end_ms, g->p_pre, g->o.max_delay_ms);
        if (u.sess_len == 0)
            break;
        n += u.sess_len;
        int64_t bts, deliver;
        if (plan_after_session(g, &u, u.sess[u.sess_len - 1].ts, &bts, &deliver))
            n++;
    }
    free(u.sess);
    return n;
}

/* Good messages of the whole population at a base visit rate, from every human user when
 * there are few and from an evenly spread sample of them otherwise; bots are added exactly. */
static double population_events(const struct gen *g, double base_rate, uint32_t stride,
                                double bot_events)
{
    uint64_t n = 0, sampled = 0, humans = 0;
    for (uint32_t i = 0; i < g->nusers; i++) {
        if (g->users[i].flags & UF_BOT)
            continue;
        if (humans++ % stride == 0) {
            n += dry_run_user(g, &g->users[i], base_rate);
            sampled++;
        }
    }
    return sampled > 0 ? (double)n * (double)humans / (double)sampled + bot_events : bot_events;
}

/* Chooses the base visit rate so that the good messages, plus the re-sends and malformed
 * messages they bring, come out a little above --events; the cap then makes the count exact. */
static void calibrate(struct gen *g)
{
    uint32_t humans = g->nusers - g->nbots;
    if (humans == 0)
        return;
    uint32_t stride = humans <= 20000 ? 1 : (humans + 19999) / 20000;
    double overshoot = stride == 1 ? 1.005 : 1.02;
    double goods = (double)g->o.events * (1.0 - g->o.dup_rate - g->o.bad_rate) * overshoot;

    double bot_events = 0;
    for (uint32_t i = 0; i < g->nusers; i++)
        if (g->users[i].flags & UF_BOT)
            bot_events += (double)dry_run_user(g, &g->users[i], 0);

    double W = (double)(g->end_ms - g->start_ms);
    double per_user = (goods - bot_events) / humans / events_per_session(g);
    double f0 = population_events(g, 0, stride, bot_events);
    double rate = 0;
    if (f0 < goods) {
        /* The count is a step function of the rate (every user's path changes with it), so
         * search for the smallest rate found whose replay reaches the goal: first grow a guess
         * until it overshoots, then bisect.  With every user replayed the result is exact. */
        double lo = 0, hi = -1, fhi = 0;
        double r = per_user > 1 ? (per_user - 1.0) / (W / 2.0) : 1.0 / W;
        for (int it = 0; it < 40; it++) {
            double f = population_events(g, r, stride, bot_events);
            if (f >= goods) {
                if (hi < 0 || f < fhi) {
                    hi = r;
                    fhi = f;
                }
            } else if (r > lo) {
                lo = r;
            }
            if (hi >= 0 && fhi <= goods * 1.003)
                break;
            if (hi < 0)
                r *= fmin(8.0, fmax(1.05, goods / fmax(f, 1.0) * 1.05));
            else
                r = (fmin(lo, hi) + fmax(lo, hi)) / 2;
        }
        rate = hi >= 0 ? hi : r;
    } else if (f0 > goods * 1.05 && !g->o.quiet) {
        fprintf(stderr,
                "clickmart-gen: warning: %u users give more than --events even with one visit "
                "each; the window is cut short at %" PRIu64 " messages\n",
                humans, g->o.events);
    }
    for (uint32_t i = 0; i < g->nusers; i++)
        if (!(g->users[i].flags & UF_BOT))
            g->users[i].mean_gap = mean_gap_for(rate, g->users[i].mult);
}

static void init_users(struct gen *g)
{
    uint64_t n = g->o.users_set ? g->o.users : g->o.events / 25;
    if (n < 1)
        n = 1;
    if (n > UINT32_MAX - 1)
        n = UINT32_MAX - 1;
    g->nusers = (uint32_t)n;
    g->nbots = g->nusers >= 20 ? (uint32_t)(g->nusers / 2000) : 0;
    if (g->nusers >= 20 && g->nbots < 1)
        g->nbots = 1;
    if (g->nbots > 25)
        g->nbots = 25;

    double W = (double)(g->end_ms - g->start_ms);
    if (g->nbots > 0) {
        /* Bots are active about a third of the time; their event gap follows from that. */
        double goods = (double)g->o.events * (1.0 - g->o.dup_rate - g->o.bad_rate);
        double per_bot = goods * BOT_SHARE / g->nbots;
        g->bot_gap = per_bot > 0 ? W * 0.35 / per_bot : (double)MS_PER_HOUR;
        if (g->bot_gap < 50)
            g->bot_gap = 50;
        if (g->bot_gap > 20.0 * MS_PER_MIN)
            g->bot_gap = 20.0 * MS_PER_MIN;
    }

    g->users = xcalloc(g->nusers, sizeof *g->users);
    g->heap = xmalloc(sizeof *g->heap * g->nusers);
    uint32_t bot_stride = g->nbots > 0 ? g->nusers / g->nbots : 0;
    double cw[NCOUNTRIES];
    for (int k = 0; k < NCOUNTRIES; k++)
        cw[k] = countries[k].weight;
    for (uint32_t i = 0; i < g->nusers; i++) {
        struct user *u = &g->users[i];
        rng_seed(&u->rng, mix64(g->o.seed * 0x9e3779b97f4a7c15ULL + i + 1));
        struct rng *r = &u->rng;
        u->last_ts = INT64_MIN;
        u->device = (uint8_t)rng_weighted(r, device_w, NDEVICES);
        u->device2 = u->device;
        if (rng_chance(r, 0.10))
            u->device2 = (uint8_t)((u->device + 1 + rng_below(r, NDEVICES - 1)) % NDEVICES);
        u->country = (uint8_t)rng_weighted(r, cw, NCOUNTRIES);
        if (rng_chance(r, 0.01))
            u->unicode = (uint8_t)(1 + rng_below(r, 3));

        if (bot_stride > 0 && i % bot_stride == bot_stride / 2 && i / bot_stride < g->nbots) {
            u->flags |= UF_BOT;
            u->device = u->device2 = 0;
            u->unicode = 0;
            u->mean_gap = 2.0 * MS_PER_HOUR * (1 - 0.35) / 0.35;
            u->next_ts = g->start_ms + rng_range(r, 0, 6 * MS_PER_HOUR);
        } else {
            /* Heavy-tailed activity: a log-normal multiplier with mean 1. */
            u->mult = exp(0.9 * rng_normal(r) - 0.405);
            u->next_ts = g->start_ms + (int64_t)(rng_unit(r) * W);
            if (rng_chance(r, 0.6)) {
                u->flags |= UF_ASSIGN_PLANNED;
                double x = rng_unit(r);
                u->assign_mode = x < 0.75 ? 0 : x < 0.78 ? 1 : x < 0.90 ? 2 : 3;
                double y = rng_unit(r);
                u->extra_assign = y < 0.005 ? 1 : y < 0.025 ? 2 : 0;
            }
        }
        g->heap[i] = i;
    }
    calibrate(g);
    g->heap_len = g->nusers;
    for (uint32_t i = g->heap_len / 2; i-- > 0;)
        uheap_down(g, i);
}

/* ------------------------------------------------------------------------------------------
 * Kafka
 * ---------------------------------------------------------------------------------------- */

static int kafka_open(struct gen *g)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* Retries after a dropped connection must neither reorder nor repeat messages, or the
     * topic would no longer hold exactly the deterministic stream: hence idempotence. */
    static const char *const defaults[][2] = {
        {"compression.codec", "zstd"},   {"linger.ms", "50"},
        {"batch.num.messages", "10000"}, {"queue.buffering.max.messages", "1000000"},
        {"enable.idempotence", "true"},  {"client.id", "clickmart-gen"},
    };
    if (rd_kafka_conf_set(conf, "bootstrap.servers", g->o.brokers, errstr, sizeof errstr) !=
        RD_KAFKA_CONF_OK) {
        fprintf(stderr, "clickmart-gen: bootstrap.servers: %s\n", errstr);
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; i++) {
        if (rd_kafka_conf_set(conf, defaults[i][0], defaults[i][1], errstr, sizeof errstr) !=
            RD_KAFKA_CONF_OK) {
            fprintf(stderr, "clickmart-gen: %s: %s\n", defaults[i][0], errstr);
            rd_kafka_conf_destroy(conf);
            return -1;
        }
    }
    for (int i = 0; i < g->o.nx; i++) {
        if (rd_kafka_conf_set(conf, g->o.xkey[i], g->o.xval[i], errstr, sizeof errstr) !=
            RD_KAFKA_CONF_OK) {
            fprintf(stderr, "clickmart-gen: -X %s=%s: %s\n", g->o.xkey[i], g->o.xval[i], errstr);
            rd_kafka_conf_destroy(conf);
            return -1;
        }
    }
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_conf_set_opaque(conf, g);
    g->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (g->rk == NULL) {
        fprintf(stderr, "clickmart-gen: cannot create the Kafka producer: %s\n", errstr);
        return -1;
    }
    g->rkt = rd_kafka_topic_new(g->rk, g->o.topic, NULL);
    if (g->rkt == NULL) {
        fprintf(stderr, "clickmart-gen: topic %s: %s\n", g->o.topic,
                rd_kafka_err2str(rd_kafka_last_error()));
        return -1;
    }
    return 0;
}

static int kafka_close(struct gen *g)
{
    double last = 0;
    while (rd_kafka_outq_len(g->rk) > 0) {
        rd_kafka_flush(g->rk, 500);
        if (g_stop >= 2)
            break;
        double t = mono_now();
        if (!g->o.quiet && t - last >= 1.0 && rd_kafka_outq_len(g->rk) > 0) {
            fprintf(stderr, "gen: waiting for %d deliveries\n", rd_kafka_outq_len(g->rk));
            last = t;
        }
    }
    int left = rd_kafka_outq_len(g->rk);
    rd_kafka_topic_destroy(g->rkt);
    rd_kafka_destroy(g->rk);
    if (left > 0) {
        fprintf(stderr, "clickmart-gen: %d messages not delivered\n", left);
        return -1;
    }
    if (g->dr_failed > 0 || g->produce_failed) {
        fprintf(stderr, "clickmart-gen: %" PRIu64 " deliveries failed\n", g->dr_failed);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Summary
 * ---------------------------------------------------------------------------------------- */

static void summary(const struct gen *g)
{
    const struct stats *s = &g->st;
    char a[40], b[40];
    fmt_iso(a, sizeof a, s->first_ts == INT64_MAX ? g->start_ms : s->first_ts);
    fmt_iso(b, sizeof b, s->last_ts == INT64_MIN ? g->end_ms : s->last_ts);
    fprintf(stderr, "gen: summary (seed %" PRIu64 ")\n", g->o.seed);
    fprintf(stderr, "  messages        %" PRIu64 "\n", s->msgs);
    fprintf(stderr,
            "  good (first copies) %" PRIu64 ": clickstream %" PRIu64 ", assignments %" PRIu64 "\n",
            s->good, s->clickstream, s->assignments);
    fprintf(stderr, "  duplicates      %" PRIu64 "\n", s->dups);
    fprintf(stderr,
            "  late            %" PRIu64 " (of which %" PRIu64 " session bridges, %" PRIu64
            " before a session's first event)\n",
            s->late, s->bridges, s->presession);
    uint64_t bad = 0;
    for (int k = 0; k < NKINDS; k++)
        if (k != K_VALID_EDGE)
            bad += s->bad[k];
    fprintf(stderr, "  bad             %" PRIu64 "\n", bad);
    for (int k = 0; k < NKINDS; k++) {
        if (s->bad[k] == 0)
            continue;
        fprintf(stderr, "    %-22s %" PRIu64 " :", kind_names[k], s->bad[k]);
        for (int i = 0; i < NBC; i++)
            if (badcases[i].kind == k && s->badcase[i] > 0)
                fprintf(stderr, " %s=%" PRIu64, badcases[i].name, s->badcase[i]);
        fputc('\n', stderr);
    }
    fprintf(stderr, "  event types    ");
    for (int t = 0; t < NTYPES; t++)
        if (s->type_count[t] > 0)
            fprintf(stderr, " %s=%" PRIu64, type_names[t], s->type_count[t]);
    fputc('\n', stderr);
    fprintf(stderr, "  users %u (bots %u), products %u, window %s .. %s\n", g->nusers, g->nbots,
            g->nproducts, a, b);
    fprintf(stderr,
            "  edge cases: ts strings %" PRIu64 ", gaps of exactly %lld ms %" PRIu64
            ", session gaps of %lld ms %" PRIu64 ", device/country missing %" PRIu64
            ", contaminated assignments %" PRIu64 ", repeated assignments %" PRIu64 "\n",
            s->string_ts, (long long)SESSION_GAP, s->gap_exact, (long long)SESSION_GAP + 1,
            s->gap_plus1, s->device_anomaly, s->contam, s->reassign);
}

/* ------------------------------------------------------------------------------------------
 * main
 * ---------------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    static struct gen G;
    struct gen *g = &G;
    int rc = parse_args(argc, argv, &g->o);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    if (parse_variants(g) != 0)
        return 2;

    g->end_ms = g->o.end_set ? g->o.end_ms : wall_ms() - 2 * MS_PER_HOUR;
    g->start_ms = g->end_ms - (int64_t)g->o.days * MS_PER_DAY;
    if (g->start_ms < TS_MIN + 10 * MS_PER_DAY) {
        fprintf(stderr, "clickmart-gen: the window must start after 2000-01-11; move --end-ms "
                        "or use fewer --days\n");
        return 2;
    }
    if (g->end_ms + 2 * MS_PER_DAY >= TS_MAX) {
        fprintf(stderr, "clickmart-gen: --end-ms must be before 2099-12-30\n");
        return 2;
    }

    /*
     * A future_timestamp case one day after the stream's end is only in the future while the
     * stream is recent.  With an --end-ms long past it would be accepted and drag its
     * partition's watermark a day ahead, so then every future case uses the year 2099.  The
     * choice depends only on whether end-ms is within a day of now, which keeps a fixed old
     * --end-ms deterministic.
     */
    int64_t wall = wall_ms();
    g->future_ms = g->end_ms >= wall - MS_PER_DAY ? g->end_ms + MS_PER_DAY
                                                  : days_from_civil(2099, 6, 1) * MS_PER_DAY;

    rng_seed(&g->rng, mix64(g->o.seed ^ 0x67656e2d676c6f62ULL));
    g->id_salt = mix64(g->o.seed + 0x1d5a17ULL);
    g->target = g->o.events;
    g->st.first_ts = INT64_MAX;
    g->st.last_ts = INT64_MIN;

    /* Per good first copy: p_dup re-sends and p_bad malformed messages give the requested
     * shares of the whole output. */
    double d = g->o.dup_rate, b = g->o.bad_rate;
    g->p_dup = d / (1.0 - d - b);
    bool late_ok = g->o.late_rate > 0 && g->o.max_delay_ms >= 1000;
    /* Malformed messages follow on-time events only, hence the division by their share. */
    g->p_bad = b / (1.0 - d - b) / (1.0 - (late_ok ? g->o.late_rate : 0));
    g->p_late = late_ok ? g->o.late_rate * 0.9 : 0;
    g->p_bridge = late_ok ? fmin(1.0, g->o.late_rate * 10) : 0;
    g->p_pre = late_ok ? g->o.late_rate * 0.3 : 0;
    g->p_assign_late = late_ok ? fmax(0.05, g->o.late_rate) : 0;

    build_catalog(g);
    init_users(g);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    if (g->o.brokers != NULL) {
        if (kafka_open(g) != 0)
            return 1;
    } else if (strcmp(g->o.out, "-") == 0) {
        g->fp = stdout;
    } else {
        g->fp = fopen(g->o.out, "wb");
        if (g->fp == NULL) {
            fprintf(stderr, "clickmart-gen: cannot open %s: %s\n", g->o.out, strerror(errno));
            return 1;
        }
    }

    g->t0 = mono_now();
    g->last_progress = g->t0;
    run(g);

    int exit_code = 0;
    if (g->fp != NULL) {
        flush_file(g);
        if (fflush(g->fp) != 0 || ferror(g->fp)) {
            fprintf(stderr, "clickmart-gen: write error on %s: %s\n", g->o.out, strerror(errno));
            exit_code = 1;
        }
        if (g->fp != stdout && fclose(g->fp) != 0) {
            fprintf(stderr, "clickmart-gen: cannot close %s: %s\n", g->o.out, strerror(errno));
            exit_code = 1;
        }
    } else if (kafka_close(g) != 0) {
        exit_code = 1;
    }
    if (g_stop) {
        fprintf(stderr, "clickmart-gen: interrupted after %" PRIu64 " messages\n", g->st.msgs);
        exit_code = 1;
    }
    if (!g->o.quiet) {
        progress(g, true);
        summary(g);
    }

    for (size_t i = 0; i < g->pend_len; i++)
        free(g->pend[i].val);
    free(g->pend);
    for (uint32_t i = 0; i < g->nusers; i++)
        free(g->users[i].sess);
    free(g->users);
    free(g->heap);
    free(g->price);
    free(g->cdf);
    free(g->rank_product);
    for (int i = 0; i < g->nvariants; i++)
        free(g->vname[i]);
    for (int i = 0; i < g->o.nx; i++) {
        free(g->o.xkey[i]);
        free(g->o.xval[i]);
    }
    free(g->F.v.p);
    free(g->msg.p);
    free(g->key.p);
    free(g->out.p);
    free(g->tmp.p);
    return exit_code;
}
