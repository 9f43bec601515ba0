/*
 * fuzz_message.c - libFuzzer harness for the message path (docs/fuzzing.md).
 *
 * One fuzz input is one Kafka message value, or several separated by the byte
 * 0x1e (ASCII RS, never part of valid JSON). Each message goes through
 *
 *   1. ing_validate() with a fixed wall clock and the contract's default limits,
 *      and ing_validate_reference() (jansson only): reason, detail and the event read
 *      must be identical, which is what allows the fast parser (ingest/validate.c);
 *   2. an independent oracle written here from CONTRACT §1 / §1.1 (jansson for the
 *      JSON syntax, everything else re-implemented): validation must return exactly
 *      the oracle's reason and detail, and an accepted event must carry exactly the
 *      oracle's values;
 *   3. rule checks on the accepted ing_event_t itself (lengths, pattern, ranges,
 *      NUL-terminated valid UTF-8 strings, fields only on the types that carry them);
 *   4. the aggregator (acceptance, CONTRACT §2): accepted events through
 *      agg_apply_event, rejects through agg_apply_reject, one batch per input, on a
 *      small LMDB state created once. The partition counters are checked against a
 *      model of §2 (too_late, duplicates, watermark), and every few dozen inputs a
 *      flush is collected, sanity-checked and acknowledged. The state is wiped every
 *      RESET_EVERY inputs so that it stays small. One state in four runs with the
 *      contract's allowed lateness (48 h); the others with one wider than the ts
 *      range, since one fuzzed ts near the clock would otherwise make nearly every
 *      later event too_late and keep them from the marts.
 *
 * Any violated invariant prints one line and ends in __builtin_trap(), which
 * libFuzzer reports as a crash and saves the input for.
 *
 * Because the aggregator state carries over from input to input, a crash in the
 * aggregator may need the inputs before it. When CLICKMART_FUZZ_HISTORY_DIR is set
 * (tests/fuzz/run.sh sets it), every input since the last reset is also written to
 * a memory-mapped file history-<pid>.bin there; the file survives any crash, and
 * CLICKMART_FUZZ_REPLAY=<file> replays it input by input (docs/fuzzing.md).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "aggregator/agg.h"
#include "daemon/util.h"
#include "ingest/validate.h"
#include "store/store.h"

#if defined(__has_include)
#if __has_include(<sanitizer/asan_interface.h>)
#include <sanitizer/asan_interface.h>
#define HAVE_ASAN_CALLBACK 1
#endif
#endif

/* ---------------------------------------------------------------------- */
/* Fixed parameters: the contract's defaults and a fixed wall clock.      */

#define NOW_MS 1735689600000LL /* 2025-01-01T00:00:00Z */
#define MAX_EVENT_BYTES 65536
#define MAX_FUTURE_MS 3600000LL
#define SESSION_GAP_MS 1800000LL
#define CONTRACT_LATENESS_MS (48LL * 3600000LL)
/* Wider than the whole ts range: nothing is too_late, nothing is compacted. */
#define WIDE_LATENESS_MS 100000000000000LL
#define TS_MIN 946684800000LL  /* 2000-01-01T00:00:00Z */
#define TS_END 4102444800000LL /* 2100-01-01T00:00:00Z */
#define MONEY_MAX 1e12
#define CENTS_MAX 100000000000000LL /* 1e12 * 100 */

#define RESET_EVERY 2048        /* inputs between two wipes of the LMDB state */
#define MESSAGES_PER_STATE 4096 /* messages between two wipes, at most */
#define SEP '\x1e'              /* separates the messages of one input (ASCII RS) */
#define MAX_PARTS 64            /* messages taken from one input, at most */
#define FLUSH_EVERY 64          /* inputs between two flush collections */
#define MAP_SIZE (64u << 20)    /* LMDB map; wiped long before it fills */
#define HIST_BYTES (8u << 20)

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void history_flush_note(void);

static bool g_verbose; /* CLICKMART_FUZZ_VERBOSE: one line per input */
static const uint8_t *g_cur_data;
static size_t g_cur_size;

/* Report a violated invariant and crash, so that libFuzzer keeps the input. */
__attribute__((noreturn, format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "\nclickmart-fuzz: invariant violated: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (g_cur_data != NULL) {
        fprintf(stderr, "\nclickmart-fuzz: message (%zu bytes): ", g_cur_size);
        size_t shown = g_cur_size < 400 ? g_cur_size : 400;
        for (size_t i = 0; i < shown; i++) {
            unsigned char ch = g_cur_data[i];
            if (ch >= 0x20 && ch < 0x7f && ch != '\\')
                fputc(ch, stderr);
            else
                fprintf(stderr, "\\x%02x", ch);
        }
        fprintf(stderr, "%s\n", shown < g_cur_size ? "..." : "");
    } else {
        fprintf(stderr, "\nclickmart-fuzz: (in the flush after this input)\n");
    }
    history_flush_note();
    __builtin_trap();
}

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond))                                                                               \
            fail(__VA_ARGS__);                                                                     \
    } while (0)

/* ---------------------------------------------------------------------- */
/* Independent helpers: UTF-8, event_type pattern, RFC 3339, money.        */

/* Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t more;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) {
            more = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            more = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            more = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (n - i <= more)
            return false;
        for (size_t k = 1; k <= more; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += more + 1;
    }
    return true;
}

/* ^[a-z][a-z0-9_]{0,63}$ */
static bool event_type_ok(const char *s, size_t n)
{
    if (n < 1 || n > 64 || s[0] < 'a' || s[0] > 'z')
        return false;
    for (size_t i = 1; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return false;
    }
    return true;
}

static ing_etype_t type_code(const char *s)
{
    static const struct {
        const char *name;
        ing_etype_t code;
    } map[] = {{"page_view", ING_ET_PAGE_VIEW},     {"product_view", ING_ET_PRODUCT_VIEW},
               {"add_to_cart", ING_ET_ADD_TO_CART}, {"checkout", ING_ET_CHECKOUT},
               {"purchase", ING_ET_PURCHASE},       {"experiment_assignment", ING_ET_ASSIGNMENT}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcmp(s, map[i].name) == 0)
            return map[i].code;
    return ING_ET_OTHER;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* The value of s[i .. i+n), which the caller has checked to be digits. */
static int dnum(const char *s, size_t i, size_t n)
{
    int v = 0;
    for (size_t k = 0; k < n; k++)
        v = v * 10 + (s[i + k] - '0');
    return v;
}

static bool leap(int y)
{
    return y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
}

static int mdays(int y, int m)
{
    if (m == 2)
        return leap(y) ? 29 : 28;
    return (m == 4 || m == 6 || m == 9 || m == 11) ? 30 : 31;
}

/*
 * RFC 3339 as CONTRACT §1 reads it:
 *   DDDD-DD-DD[Tt ]DD:DD:DD(.D+)?([Zz]|[+-]DD:DD), second <= 59, offset <= 23:59.
 * Returns false when unparseable. Years outside 1999..2100 give a ts far out of
 * [TS_MIN, TS_END) whatever the offset, so they are mapped to -1 (also out of
 * range) instead of being counted out.
 */
static bool rfc3339(const char *s, size_t n, int64_t *ms)
{
    static const char tmpl[] = "DDDD-DD-DD?DD:DD:DD";
    if (n < 20)
        return false;
    for (size_t i = 0; i < 19; i++) {
        char t = tmpl[i];
        if (t == 'D' && !is_digit(s[i]))
            return false;
        if (t == '-' && s[i] != '-')
            return false;
        if (t == ':' && s[i] != ':')
            return false;
        if (t == '?' && s[i] != 'T' && s[i] != 't' && s[i] != ' ')
            return false;
    }
    int y = dnum(s, 0, 4), mo = dnum(s, 5, 2), d = dnum(s, 8, 2);
    int h = dnum(s, 11, 2), mi = dnum(s, 14, 2), sec = dnum(s, 17, 2);
    size_t i = 19;
    int frac = 0;
    if (s[i] == '.') {
        size_t j = i + 1;
        while (j < n && is_digit(s[j]))
            j++;
        if (j == i + 1)
            return false;
        for (size_t k = 0; k < 3; k++)
            frac = frac * 10 + (i + 1 + k < j ? s[i + 1 + k] - '0' : 0);
        i = j;
    }
    if (i >= n)
        return false;
    int off_min = 0;
    if (s[i] == 'Z' || s[i] == 'z') {
        i++;
    } else if (s[i] == '+' || s[i] == '-') {
        if (n - i < 6 || !is_digit(s[i + 1]) || !is_digit(s[i + 2]) || s[i + 3] != ':' ||
            !is_digit(s[i + 4]) || !is_digit(s[i + 5]))
            return false;
        int oh = dnum(s, i + 1, 2), om = dnum(s, i + 4, 2);
        if (oh > 23 || om > 59)
            return false;
        off_min = (oh * 60 + om) * (s[i] == '-' ? -1 : 1);
        i += 6;
    } else {
        return false;
    }
    if (i != n)
        return false;
    if (mo < 1 || mo > 12 || d < 1 || d > mdays(y, mo) || h > 23 || mi > 59 || sec > 59)
        return false;
    if (y < 1999 || y > 2100) {
        *ms = -1;
        return true;
    }
    int64_t days = 0;
    for (int yy = 1970; yy < y; yy++)
        days += leap(yy) ? 366 : 365;
    for (int mm = 1; mm < mo; mm++)
        days += mdays(y, mm);
    days += d - 1;
    *ms = ((days * 24 + h) * 60 + mi) * 60000LL + sec * 1000LL + frac - off_min * 60000LL;
    return true;
}

/* llround(x * 100.0) for 0 <= x <= 1e12, written as floor-and-compare. */
static int64_t cents_of(double x)
{
    double p = x * 100.0;
    double f = floor(p);
    return (int64_t)(p - f >= 0.5 ? f + 1 : f);
}

/* ---------------------------------------------------------------------- */
/* The oracle: CONTRACT §1.1 field by field.                              */

typedef struct want_item {
    const char *pid;
    size_t pid_len;
    int64_t quantity, price_cents;
} want_item_t;

typedef struct want {
    ing_reason_t reason;
    const char *detail;
    /* Valid when reason == ING_OK; strings point into the jansson tree. */
    const char *eid, *uid, *etype, *device, *country, *pid, *exp, *var;
    size_t eid_n, uid_n, etype_n, device_n, country_n, pid_n, exp_n, var_n;
    ing_etype_t type;
    int64_t ts, cents;
    size_t n_items;
    want_item_t items[ING_ITEMS_MAX];
} want_t;

typedef struct fault_list {
    ing_reason_t reason;
    const char *field;
} fault_list_t;

/* Keep the worst fault; among equal ones the first in field order. */
static void fault(fault_list_t *f, ing_reason_t r, const char *field)
{
    if (r == ING_OK)
        return;
    if (f->reason == ING_OK || r < f->reason) {
        f->reason = r;
        f->field = field;
    }
}

static ing_reason_t worse(ing_reason_t a, ing_reason_t b)
{
    if (a == ING_OK)
        return b;
    if (b == ING_OK)
        return a;
    return a < b ? a : b;
}

static bool absent(const json_t *v)
{
    return v == NULL || json_is_null(v);
}

static ing_reason_t req_string(const json_t *v, size_t lo, size_t hi, const char **s, size_t *n)
{
    if (absent(v))
        return ING_R_MISSING_FIELD;
    if (!json_is_string(v))
        return ING_R_BAD_TYPE;
    size_t len = json_string_length(v);
    if (len < lo || len > hi)
        return ING_R_BAD_VALUE;
    *s = json_string_value(v);
    *n = len;
    return ING_OK;
}

static ing_reason_t opt_string(const json_t *v, size_t hi, const char **s, size_t *n)
{
    *s = "";
    *n = 0;
    if (absent(v))
        return ING_OK;
    if (!json_is_string(v))
        return ING_R_BAD_TYPE;
    size_t len = json_string_length(v);
    if (len == 0)
        return ING_OK;
    if (len > hi)
        return ING_R_BAD_VALUE;
    *s = json_string_value(v);
    *n = len;
    return ING_OK;
}

/*
 * An integer field. When the document had an integer literal outside int64,
 * jansson can only read it with every integer as a real; an integral real then
 * stands for an integer (ingest/validate.c documents this as the price of that
 * rare case; docs/fuzzing.md lists it among the known deviations).
 */
static ing_reason_t integer_in(const json_t *v, bool ints_as_real, double lo, double hi,
                               int64_t *out)
{
    if (json_is_integer(v)) {
        json_int_t i = json_integer_value(v);
        if ((double)i < lo || (double)i > hi)
            return ING_R_BAD_VALUE;
        /* Bounds are below 2^53: an in-range i converts back and forth exactly. */
        *out = (int64_t)i;
        return ING_OK;
    }
    if (ints_as_real && json_is_real(v)) {
        double d = json_real_value(v);
        if (trunc(d) != d)
            return ING_R_BAD_TYPE;
        if (d < lo || d > hi)
            return ING_R_BAD_VALUE;
        *out = (int64_t)d;
        return ING_OK;
    }
    return ING_R_BAD_TYPE;
}

static ing_reason_t money(const json_t *v, int64_t *cents)
{
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v))
        d = json_real_value(v);
    else
        return ING_R_BAD_TYPE;
    if (!(d >= 0.0 && d <= MONEY_MAX))
        return ING_R_BAD_VALUE;
    *cents = cents_of(d);
    return ING_OK;
}

static ing_reason_t ts_field(const json_t *v, bool ints_as_real, int64_t *ts)
{
    if (absent(v))
        return ING_R_MISSING_FIELD;
    if (json_is_string(v)) {
        int64_t ms;
        if (!rfc3339(json_string_value(v), json_string_length(v), &ms))
            return ING_R_BAD_VALUE;
        if (ms < TS_MIN || ms >= TS_END)
            return ING_R_BAD_VALUE;
        *ts = ms;
        return ING_OK;
    }
    return integer_in(v, ints_as_real, (double)TS_MIN, (double)(TS_END - 1), ts);
}

static ing_reason_t item(const json_t *el, bool ints_as_real, want_item_t *w)
{
    if (!json_is_object(el))
        return ING_R_BAD_TYPE;
    want_item_t tmp = {NULL, 0, 1, 0};
    ing_reason_t r = req_string(json_object_get(el, "product_id"), 1, 128, &tmp.pid, &tmp.pid_len);
    const json_t *q = json_object_get(el, "quantity");
    if (!absent(q))
        r = worse(r, integer_in(q, ints_as_real, 1, 1000000, &tmp.quantity));
    const json_t *p = json_object_get(el, "price");
    if (!absent(p))
        r = worse(r, money(p, &tmp.price_cents));
    if (r == ING_OK && w != NULL)
        *w = tmp;
    return r;
}

static ing_reason_t items_field(const json_t *v, bool ints_as_real, want_t *w)
{
    w->n_items = 0;
    if (absent(v) || (json_is_string(v) && json_string_length(v) == 0))
        return ING_OK;
    if (!json_is_array(v))
        return ING_R_BAD_TYPE;
    size_t n = json_array_size(v);
    ing_reason_t r = n > ING_ITEMS_MAX ? ING_R_BAD_VALUE : ING_OK;
    for (size_t i = 0; i < n; i++)
        r = worse(
            r, item(json_array_get(v, i), ints_as_real, i < ING_ITEMS_MAX ? &w->items[i] : NULL));
    if (r == ING_OK)
        w->n_items = n;
    return r;
}

/*
 * Parse as the contract says: strict JSON, duplicate keys and \u0000 rejected
 * (jansson's defaults plus JSON_REJECT_DUPLICATES), and a number invalid only when
 * it fits neither int64 nor a finite double. The second parse succeeds exactly when
 * the first failed on an integer literal outside int64 that fits a double.
 */
static json_t *parse(const uint8_t *data, size_t size, bool *ints_as_real)
{
    json_error_t err;
    *ints_as_real = false;
    json_t *root =
        json_loadb((const char *)data, size, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &err);
    if (root == NULL) {
        root = json_loadb((const char *)data, size,
                          JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_DECODE_INT_AS_REAL, &err);
        *ints_as_real = root != NULL;
    }
    return root;
}

/* Fill *w from the message; returns the jansson tree (or NULL) for the caller to free. */
static json_t *oracle(const uint8_t *data, size_t size, want_t *w)
{
    memset(w, 0, offsetof(want_t, items));
    w->detail = "";
    if (size > MAX_EVENT_BYTES) {
        w->reason = ING_R_PAYLOAD_TOO_LARGE;
        return NULL;
    }
    /*
     * Checked here rather than left to jansson: the value must be UTF-8, and no
     * JSON text holds a raw NUL byte (jansson 2.14 skips one that directly follows
     * a number or a literal, e.g. {"a":1<NUL>}).
     */
    if (size == 0 || memchr(data, '\0', size) != NULL || !utf8_valid(data, size)) {
        w->reason = ING_R_INVALID_JSON;
        return NULL;
    }
    bool iar;
    json_t *root = parse(data, size, &iar);
    if (root == NULL) {
        w->reason = ING_R_INVALID_JSON;
        return NULL;
    }
    if (!json_is_object(root)) {
        w->reason = ING_R_NOT_AN_OBJECT;
        return root;
    }
    fault_list_t f = {ING_OK, ""};
    fault(&f, req_string(json_object_get(root, "event_id"), 1, 128, &w->eid, &w->eid_n),
          "event_id");
    fault(&f, req_string(json_object_get(root, "user_id"), 1, 128, &w->uid, &w->uid_n), "user_id");
    const json_t *et = json_object_get(root, "event_type");
    ing_reason_t r = absent(et)            ? ING_R_MISSING_FIELD
                     : !json_is_string(et) ? ING_R_BAD_TYPE
                                           : ING_OK;
    if (r == ING_OK) {
        w->etype = json_string_value(et);
        w->etype_n = json_string_length(et);
        if (!event_type_ok(w->etype, w->etype_n))
            r = ING_R_BAD_VALUE;
    }
    fault(&f, r, "event_type");
    bool type_ok = r == ING_OK;
    w->type = type_ok ? type_code(w->etype) : ING_ET_OTHER;
    fault(&f, ts_field(json_object_get(root, "ts"), iar, &w->ts), "ts");
    if (type_ok && w->type == ING_ET_PURCHASE) {
        const json_t *amount = json_object_get(root, "amount");
        fault(&f, absent(amount) ? ING_R_MISSING_FIELD : money(amount, &w->cents), "amount");
        fault(&f, items_field(json_object_get(root, "items"), iar, w), "items");
    } else if (type_ok && w->type == ING_ET_ASSIGNMENT) {
        fault(&f, req_string(json_object_get(root, "experiment"), 1, 64, &w->exp, &w->exp_n),
              "experiment");
        fault(&f, req_string(json_object_get(root, "variant"), 1, 64, &w->var, &w->var_n),
              "variant");
    }
    fault(&f, opt_string(json_object_get(root, "device"), 32, &w->device, &w->device_n), "device");
    fault(&f, opt_string(json_object_get(root, "country"), 32, &w->country, &w->country_n),
          "country");
    fault(&f, opt_string(json_object_get(root, "product_id"), 128, &w->pid, &w->pid_n),
          "product_id");
    if (f.reason != ING_OK) {
        w->reason = f.reason;
        w->detail = f.field;
    } else if (w->ts > NOW_MS + MAX_FUTURE_MS) {
        w->reason = ING_R_FUTURE_TIMESTAMP;
    } else {
        w->reason = ING_OK;
    }
    return root;
}

/* ---------------------------------------------------------------------- */
/* Rules on the accepted event itself, and equality with the oracle.      */

static void check_str(const char *name, const char *buf, size_t cap, unsigned len, size_t lo,
                      size_t hi, const char *want, size_t want_n)
{
    CHECK(len >= lo && len <= hi, "%s: length %u outside %zu..%zu", name, len, lo, hi);
    CHECK(len < cap, "%s: length %u does not fit its buffer (%zu)", name, len, cap);
    CHECK(buf[len] == '\0', "%s: not NUL-terminated at its length %u", name, len);
    CHECK(memchr(buf, '\0', len) == NULL, "%s: holds a NUL byte", name);
    CHECK(utf8_valid((const unsigned char *)buf, len), "%s: not valid UTF-8", name);
    CHECK(len == want_n && (len == 0 || memcmp(buf, want, len) == 0),
          "%s: differs from the JSON value (%u vs %zu bytes)", name, len, want_n);
}

static void check_event(const uint8_t *data, size_t size, const ing_event_t *ev, const want_t *w)
{
    CHECK(utf8_valid(data, size), "accepted a message that is not valid UTF-8");
    CHECK(memchr(data, '\0', size) == NULL, "accepted a message with a NUL byte");

    check_str("event_id", ev->event_id, sizeof ev->event_id, ev->event_id_len, 1, 128, w->eid,
              w->eid_n);
    check_str("user_id", ev->user_id, sizeof ev->user_id, ev->user_id_len, 1, 128, w->uid,
              w->uid_n);
    check_str("event_type", ev->event_type, sizeof ev->event_type, ev->event_type_len, 1, 64,
              w->etype, w->etype_n);
    CHECK(event_type_ok(ev->event_type, ev->event_type_len), "event_type: breaks the pattern");
    CHECK(ev->type == type_code(ev->event_type), "event_type: code %d, expected %d", (int)ev->type,
          (int)type_code(ev->event_type));

    CHECK(ev->ts >= TS_MIN && ev->ts < TS_END, "ts %lld outside 2000..2099", (long long)ev->ts);
    CHECK(ev->ts <= NOW_MS + MAX_FUTURE_MS, "ts %lld in the future", (long long)ev->ts);
    CHECK(ev->ts == w->ts, "ts %lld, the JSON says %lld", (long long)ev->ts, (long long)w->ts);

    check_str("device", ev->device, sizeof ev->device, ev->device_len, 0, 32, w->device,
              w->device_n);
    check_str("country", ev->country, sizeof ev->country, ev->country_len, 0, 32, w->country,
              w->country_n);
    check_str("product_id", ev->product_id, sizeof ev->product_id, ev->product_id_len, 0, 128,
              w->pid, w->pid_n);

    if (ev->type == ING_ET_PURCHASE) {
        CHECK(ev->amount_cents >= 0 && ev->amount_cents <= CENTS_MAX,
              "amount_cents %lld out of range", (long long)ev->amount_cents);
        CHECK(ev->amount_cents == w->cents, "amount_cents %lld, llround(amount*100) is %lld",
              (long long)ev->amount_cents, (long long)w->cents);
        CHECK(ev->n_items >= 0 && ev->n_items <= ING_ITEMS_MAX, "n_items %d", ev->n_items);
        CHECK((size_t)ev->n_items == w->n_items, "n_items %d, the JSON has %zu", ev->n_items,
              w->n_items);
        for (int i = 0; i < ev->n_items; i++) {
            const ing_item_t *it = &ev->items[i];
            const want_item_t *wi = &w->items[i];
            check_str("items[].product_id", it->product_id, sizeof it->product_id,
                      it->product_id_len, 1, 128, wi->pid, wi->pid_len);
            CHECK(it->quantity >= 1 && it->quantity <= 1000000, "items[%d].quantity %lld", i,
                  (long long)it->quantity);
            CHECK(it->quantity == wi->quantity, "items[%d].quantity %lld, the JSON says %lld", i,
                  (long long)it->quantity, (long long)wi->quantity);
            CHECK(it->price_cents >= 0 && it->price_cents <= CENTS_MAX,
                  "items[%d].price_cents %lld", i, (long long)it->price_cents);
            CHECK(it->price_cents == wi->price_cents, "items[%d].price_cents %lld, expected %lld",
                  i, (long long)it->price_cents, (long long)wi->price_cents);
        }
    } else {
        CHECK(ev->amount_cents == 0, "amount_cents %lld on a non-purchase",
              (long long)ev->amount_cents);
        CHECK(ev->n_items == 0, "%d items on a non-purchase", ev->n_items);
    }
    if (ev->type == ING_ET_ASSIGNMENT) {
        check_str("experiment", ev->experiment, sizeof ev->experiment, ev->experiment_len, 1, 64,
                  w->exp, w->exp_n);
        check_str("variant", ev->variant, sizeof ev->variant, ev->variant_len, 1, 64, w->var,
                  w->var_n);
    } else {
        check_str("experiment", ev->experiment, sizeof ev->experiment, ev->experiment_len, 0, 0, "",
                  0);
        check_str("variant", ev->variant, sizeof ev->variant, ev->variant_len, 0, 0, "", 0);
    }
}

/* ---------------------------------------------------------------------- */
/* History of the inputs since the last reset (for replaying a crash).    */

typedef struct hist_hdr {
    char magic[8];    /* "CMFZHIS2" */
    int64_t lateness; /* the state's allowed lateness */
    uint32_t count;
    uint32_t bytes;
    uint32_t off[RESET_EVERY + 1];
} hist_hdr_t;

static hist_hdr_t *g_hist;   /* mmap of history-<pid>.bin, or NULL */
static uint8_t *g_hist_data; /* just after the header */
static char g_hist_path[PATH_MAX];

static void history_open(void)
{
    const char *dir = getenv("CLICKMART_FUZZ_HISTORY_DIR");
    if (dir == NULL || *dir == '\0')
        return;
    snprintf(g_hist_path, sizeof g_hist_path, "%s/history-%ld.bin", dir, (long)getpid());
    int fd = open(g_hist_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    size_t total = sizeof(hist_hdr_t) + HIST_BYTES;
    if (fd < 0 || ftruncate(fd, (off_t)total) != 0) {
        fprintf(stderr, "clickmart-fuzz: cannot create %s: %s (no history)\n", g_hist_path,
                strerror(errno));
        if (fd >= 0)
            close(fd);
        g_hist_path[0] = '\0';
        return;
    }
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        unlink(g_hist_path);
        g_hist_path[0] = '\0';
        return;
    }
    g_hist = p;
    g_hist_data = (uint8_t *)p + sizeof(hist_hdr_t);
    memcpy(g_hist->magic, "CMFZHIS2", 8);
}

static void history_reset(int64_t lateness)
{
    if (g_hist != NULL) {
        g_hist->lateness = lateness;
        g_hist->count = 0;
        g_hist->bytes = 0;
    }
}

static void history_add(const uint8_t *data, size_t size)
{
    if (g_hist == NULL)
        return;
    /* The caller resets before either limit is reached. */
    memcpy(g_hist_data + g_hist->bytes, data, size);
    g_hist->off[g_hist->count] = g_hist->bytes;
    g_hist->bytes += (uint32_t)size;
    g_hist->off[g_hist->count + 1] = g_hist->bytes;
    g_hist->count++;
}

static void history_flush_note(void)
{
    if (g_hist != NULL)
        fprintf(stderr,
                "clickmart-fuzz: the %u inputs since the last state reset are in %s;\n"
                "clickmart-fuzz: replay them with CLICKMART_FUZZ_REPLAY=%s <fuzzer binary>\n",
                g_hist->count, g_hist_path, g_hist_path);
}

#ifdef HAVE_ASAN_CALLBACK
static void on_asan_report(const char *report)
{
    (void)report;
    history_flush_note();
}
#endif

static void history_close(void)
{
    if (g_hist == NULL)
        return;
    munmap(g_hist, sizeof(hist_hdr_t) + HIST_BYTES);
    g_hist = NULL;
    unlink(g_hist_path);
}

/* ---------------------------------------------------------------------- */
/* The aggregator under test and a model of CONTRACT §2 beside it.        */

typedef struct id_slot {
    uint8_t used, len;
    char id[ING_ID_MAX];
    int64_t ts; /* ts of the copy that was accepted */
} id_slot_t;

#define ID_SLOTS (2 * MESSAGES_PER_STATE)

static struct {
    char root[PATH_MAX]; /* mkdtemp dir, removed at exit */
    char dir[PATH_MAX];  /* root/state */
    st_env_t *env;
    agg_t *agg;
    unsigned since_reset; /* inputs since the last reset */
    unsigned messages;    /* messages applied since the last reset */
    uint64_t epoch;       /* resets so far */
    int64_t lateness;     /* allowed lateness of this state */
    int64_t offset;       /* next offset of partition 0 */
    int64_t watermark;    /* model: largest accepted ts, -1 before the first */
    agg_partition_t last; /* counters after the previous input */
    id_slot_t ids[ID_SLOTS];
} S;

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ULL;
    return h;
}

static id_slot_t *id_find(const char *id, size_t n, bool insert)
{
    size_t i = (size_t)(fnv1a(id, n) % ID_SLOTS);
    for (;;) {
        id_slot_t *s = &S.ids[i];
        if (!s->used) {
            if (!insert)
                return NULL;
            s->used = 1;
            s->len = (uint8_t)n;
            memcpy(s->id, id, n);
            return s;
        }
        if (s->len == n && memcmp(s->id, id, n) == 0)
            return s;
        i = (i + 1) % ID_SLOTS;
    }
}

static void rm_dir_files(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return;
    struct dirent *e;
    char path[PATH_MAX + 256];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
}

static void state_close(void)
{
    agg_close(S.agg);
    S.agg = NULL;
    st_close(S.env);
    S.env = NULL;
    rm_dir_files(S.dir);
}

static void state_open(int64_t lateness)
{
    int r = st_open(S.dir, MAP_SIZE, ST_SYNC_NONE, &S.env);
    if (r != 0) {
        fprintf(stderr, "clickmart-fuzz: st_open(%s): %s\n", S.dir, st_strerror(r));
        abort();
    }
    /* Designated: every setting not named here takes the contract's default. */
    agg_conf_t conf = {.topic = "fuzz",
                       .session_gap_ms = SESSION_GAP_MS,
                       .allowed_lateness_ms = lateness,
                       .sweep_per_batch = 16};
    r = agg_open(S.env, &conf, &S.agg);
    if (r != 0) {
        fprintf(stderr, "clickmart-fuzz: agg_open: %s\n", agg_strerror(r));
        abort();
    }
    S.lateness = lateness;
    S.since_reset = 0;
    S.messages = 0;
    S.offset = 0;
    S.watermark = -1;
    memset(&S.last, 0, sizeof S.last);
    memset(S.ids, 0, sizeof S.ids);
    history_reset(lateness);
}

static void state_reset(void)
{
    S.epoch++;
    state_close();
    state_open(S.epoch % 4 == 3 ? CONTRACT_LATENESS_MS : WIDE_LATENESS_MS);
}

static void at_exit(void)
{
    history_close();
    if (S.env != NULL)
        state_close();
    if (S.root[0] != '\0') {
        rmdir(S.dir);
        rmdir(S.root);
    }
}

static bool known_reason(const char *s)
{
    for (int r = ING_R_PAYLOAD_TOO_LARGE; r < ING_R__COUNT; r++)
        if (strcmp(s, ing_reason_name((ing_reason_t)r)) == 0)
            return true;
    return false;
}

/* Collect a flush of the committed state, check what it can be checked for, ack it. */
static void flush_and_check(bool regression)
{
    agg_flush_t *f = NULL;
    int r = agg_flush_collect(S.agg, regression, &f);
    CHECK(r == 0, "agg_flush_collect: %s", agg_strerror(r));
    const snk_batch_t *b = agg_flush_batch(f);
    const agg_partition_t *p = agg_partition(S.agg, 0);
    for (size_t i = 0; i < b->n_partitions; i++) {
        const snk_partition_row_t *row = &b->partitions[i];
        CHECK(row->partition == 0, "flush: a row for partition %d", (int)row->partition);
        CHECK(row->next_offset == S.offset && row->accepted == p->accepted &&
                  row->duplicates == p->duplicates && row->rejected == p->rejected &&
                  row->watermark == p->watermark,
              "flush: partition row differs from the partition's progress");
    }
    for (size_t i = 0; i < b->n_sessions; i++) {
        const snk_session_row_t *s = &b->sessions[i];
        size_t sid = strlen(s->session_id), uid = strlen(s->user_id);
        CHECK(sid >= 1 && sid <= 128 && uid >= 1 && uid <= 128, "flush: session id lengths");
        CHECK(strlen(s->device) <= 32 && strlen(s->country) <= 32 && (strcmp(s->device, "") != 0) &&
                  (strcmp(s->country, "") != 0),
              "flush: session device/country '%s'/'%s'", s->device, s->country);
        CHECK(s->started_at >= TS_MIN && s->started_at <= s->ended_at &&
                  s->ended_at <= NOW_MS + MAX_FUTURE_MS,
              "flush: session %s spans %lld..%lld", s->session_id, (long long)s->started_at,
              (long long)s->ended_at);
        CHECK(s->events >= 1 && s->page_views >= 0 && s->product_views >= 0 &&
                  s->add_to_carts >= 0 && s->checkouts >= 0 && s->purchases >= 0 &&
                  s->page_views + s->product_views + s->add_to_carts + s->checkouts +
                          s->purchases <=
                      s->events,
              "flush: session %s counts", s->session_id);
        CHECK(s->revenue_cents >= 0 && s->revenue_cents <= s->purchases * CENTS_MAX,
              "flush: session %s revenue %lld", s->session_id, (long long)s->revenue_cents);
        int stage =
            1 + (s->product_views > 0) + (s->product_views > 0 && s->add_to_carts > 0) +
            (s->product_views > 0 && s->add_to_carts > 0 && s->checkouts > 0) +
            (s->product_views > 0 && s->add_to_carts > 0 && s->checkouts > 0 && s->purchases > 0);
        CHECK(s->funnel_stage == stage, "flush: session %s stage %d, its counts give %d",
              s->session_id, s->funnel_stage, stage);
        CHECK(s->ended_at - s->started_at <= (s->events - 1) * SESSION_GAP_MS,
              "flush: session %s longer than its events allow", s->session_id);
    }
    for (size_t i = 0; i < b->n_users; i++) {
        const snk_user_row_t *u = &b->users[i];
        CHECK(u->first_seen >= TS_MIN && u->first_seen <= u->last_seen &&
                  u->last_seen <= NOW_MS + MAX_FUTURE_MS,
              "flush: user %s seen %lld..%lld", u->user_id, (long long)u->first_seen,
              (long long)u->last_seen);
        CHECK(u->events >= 1 && u->sessions >= 1 && u->sessions <= u->events && u->orders >= 0 &&
                  u->orders <= u->events && u->revenue_cents >= 0,
              "flush: user %s counts", u->user_id);
        if (u->orders == 0)
            CHECK(u->first_order_at < 0 && u->last_order_at < 0 && u->revenue_cents == 0,
                  "flush: user %s has order times without orders", u->user_id);
        else
            CHECK(u->first_order_at >= u->first_seen && u->first_order_at <= u->last_order_at &&
                      u->last_order_at <= u->last_seen,
                  "flush: user %s order times", u->user_id);
        CHECK(strcmp(u->device, "") != 0 && strcmp(u->country, "") != 0,
              "flush: user %s device/country empty", u->user_id);
    }
    for (size_t i = 0; i < b->n_funnel; i++) {
        const snk_funnel_row_t *fr = &b->funnel[i];
        for (int k = 0; k < 5; k++) {
            CHECK(fr->sessions_ge[k] >= 0 && fr->users_ge[k] >= 0 &&
                      fr->users_ge[k] <= fr->sessions_ge[k],
                  "flush: funnel row day %d counts at stage %d", (int)fr->day, k + 1);
            if (k > 0)
                CHECK(fr->sessions_ge[k] <= fr->sessions_ge[k - 1] &&
                          fr->users_ge[k] <= fr->users_ge[k - 1],
                      "flush: funnel row day %d not monotone at stage %d", (int)fr->day, k + 1);
        }
        CHECK(fr->orders >= 0 && fr->revenue_cents >= 0, "flush: funnel row day %d money",
              (int)fr->day);
        CHECK(fr->day >= TS_MIN / 86400000 && fr->day <= (NOW_MS + MAX_FUTURE_MS) / 86400000,
              "flush: funnel row day %d", (int)fr->day);
    }
    for (size_t i = 0; i < b->n_rejects; i++) {
        const snk_reject_row_t *rj = &b->rejects[i];
        CHECK(rj->partition == 0 && rj->offset >= 0 && rj->offset < S.offset,
              "flush: reject at %d/%lld", (int)rj->partition, (long long)rj->offset);
        CHECK(known_reason(rj->reason), "flush: reject reason '%s'", rj->reason);
        CHECK(rj->payload_len <= 4096, "flush: reject payload of %zu bytes", rj->payload_len);
    }
    r = agg_flush_done(S.agg, f);
    CHECK(r == 0, "agg_flush_done: %s", agg_strerror(r));
    agg_flush_free(f);
    /* Without `regression` the regression marks stay dirty on purpose (agg.h). */
    if (regression)
        CHECK(agg_pending_rows(S.agg) == 0, "%llu rows pending right after a full flush",
              (unsigned long long)agg_pending_rows(S.agg));
}

/* Apply one message (validated as `reason`) and check the partition against the model. */
/* The batch of the current input: begun at its first message, committed after its last. */
static bool g_in_batch;
static bool g_batch_lost; /* the map filled up: the state was wiped, skip the rest */

static void batch_end(void)
{
    if (!g_in_batch)
        return;
    g_in_batch = false;
    int r = agg_batch_commit(S.agg);
    if (r == ST_EMAPFULL) {
        /* Not a bug: the map is deliberately small. Start over. */
        state_reset();
        return;
    }
    CHECK(r == 0, "agg_batch_commit: %s", agg_strerror(r));
}

static void apply(const uint8_t *data, size_t size, ing_reason_t reason, const char *detail,
                  const ing_event_t *ev)
{
    if (g_batch_lost)
        return;
    int r;
    if (!g_in_batch) {
        r = agg_batch_begin(S.agg);
        CHECK(r == 0, "agg_batch_begin: %s", agg_strerror(r));
        g_in_batch = true;
    }
    int64_t off = S.offset;
    if (reason == ING_OK)
        r = agg_apply_event(S.agg, 0, off, ev, (const char *)data, size, NOW_MS);
    else
        r = agg_apply_reject(S.agg, 0, off, reason, detail, (const char *)data, size, NOW_MS);
    if (r == ST_EMAPFULL) {
        agg_batch_abort(S.agg);
        g_in_batch = false;
        g_batch_lost = true;
        state_reset();
        return;
    }
    CHECK(r == 0, "applying offset %lld: %s", (long long)off, agg_strerror(r));
    S.offset++;

    const agg_partition_t *p = agg_partition(S.agg, 0);
    agg_partition_t was = S.last;
    CHECK(p->known && p->next_offset == S.offset, "next_offset %lld after offset %lld",
          (long long)p->next_offset, (long long)off);
    int64_t d_acc = p->accepted - was.accepted, d_dup = p->duplicates - was.duplicates,
            d_rej = p->rejected - was.rejected;
    if (reason != ING_OK) {
        CHECK(d_acc == 0 && d_dup == 0 && d_rej == 1 &&
                  p->rejects_by_reason[reason] == was.rejects_by_reason[reason] + 1,
              "a %s reject was not counted as one", ing_reason_name(reason));
    } else if (S.watermark >= 0 && ev->ts < S.watermark - S.lateness) {
        CHECK(d_acc == 0 && d_dup == 0 && d_rej == 1 &&
                  p->rejects_by_reason[ING_R_TOO_LATE] == was.rejects_by_reason[ING_R_TOO_LATE] + 1,
              "ts %lld with watermark %lld is too_late but was not rejected as such",
              (long long)ev->ts, (long long)S.watermark);
    } else {
        CHECK(d_rej == 0 && d_acc + d_dup == 1, "an event counted %lld/%lld/%lld", (long long)d_acc,
              (long long)d_dup, (long long)d_rej);
        id_slot_t *seen = id_find(ev->event_id, ev->event_id_len, false);
        if (seen == NULL)
            CHECK(d_acc == 1, "event_id '%s' seen for the first time but counted a duplicate",
                  ev->event_id);
        else if (seen->ts >= S.watermark - S.lateness)
            /* Never past any horizon so far, so it cannot have been forgotten. */
            CHECK(d_dup == 1, "event_id '%s' accepted twice", ev->event_id);
        if (d_acc == 1) {
            id_slot_t *s = seen != NULL ? seen : id_find(ev->event_id, ev->event_id_len, true);
            s->ts = ev->ts;
            if (ev->ts > S.watermark)
                S.watermark = ev->ts;
        }
    }
    CHECK(p->watermark == S.watermark, "watermark %lld, the accepted events give %lld",
          (long long)p->watermark, (long long)S.watermark);
    S.last = *p;
}

/* ---------------------------------------------------------------------- */
/* libFuzzer entry points.                                                */

static void replay(const char *path);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cm_log_set_level(CM_LOG_ERROR);
    const char *verbose = getenv("CLICKMART_FUZZ_VERBOSE");
    g_verbose = verbose != NULL && *verbose != '\0' && strcmp(verbose, "0") != 0;
    const char *tmp = getenv("TMPDIR");
    snprintf(S.root, sizeof S.root, "%s/clickmart-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(S.root) == NULL) {
        fprintf(stderr, "clickmart-fuzz: mkdtemp(%s): %s\n", S.root, strerror(errno));
        abort();
    }
    snprintf(S.dir, sizeof S.dir, "%s/state", S.root);
    history_open();
#ifdef HAVE_ASAN_CALLBACK
    __asan_set_error_report_callback(on_asan_report);
#endif
    state_open(WIDE_LATENESS_MS);
    atexit(at_exit);
    const char *rp = getenv("CLICKMART_FUZZ_REPLAY");
    if (rp != NULL && *rp != '\0')
        replay(rp);
    return 0;
}

/*
 * One message: validation against the oracle and the event rules, then (with
 * to_agg) acceptance. The message gets a heap copy of its own, so that ASan sees
 * any read past its end even when it is a part of a bigger input.
 */
static void message(const uint8_t *msg, size_t size, bool to_agg)
{
    uint8_t *data = malloc(size ? size : 1);
    if (data == NULL)
        abort();
    memcpy(data, msg, size);
    g_cur_data = data;
    g_cur_size = size;

    static ing_event_t ev; /* 15 KB: static rather than on the stack */
    static const ing_limits_t lim = {MAX_EVENT_BYTES, MAX_FUTURE_MS};
    char detail[64];
    ing_reason_t got =
        ing_validate((const char *)data, size, NOW_MS, &lim, &ev, detail, sizeof detail);

    /* The fast parser's path must read exactly what jansson's reads. */
    static ing_event_t ref;
    char ref_detail[64];
    ing_reason_t ref_got = ing_validate_reference((const char *)data, size, NOW_MS, &lim, &ref,
                                                  ref_detail, sizeof ref_detail);
    CHECK(got == ref_got && strcmp(detail, ref_detail) == 0,
          "ing_validate says %s/'%s', its jansson-only path %s/'%s'", ing_reason_name(got), detail,
          ing_reason_name(ref_got), ref_detail);
    if (got == ING_OK)
        CHECK(memcmp(&ev, &ref, offsetof(ing_event_t, items)) == 0 &&
                  memcmp(ev.items, ref.items, (size_t)ev.n_items * sizeof ev.items[0]) == 0,
              "the fast path read the event differently from jansson");

    static want_t w;
    json_t *root = oracle(data, size, &w);
    CHECK(got == w.reason && strcmp(detail, w.detail) == 0,
          "ing_validate says %s/'%s', the contract says %s/'%s'", ing_reason_name(got), detail,
          ing_reason_name(w.reason), w.detail);
    if (got == ING_OK)
        check_event(data, size, &ev, &w);
    json_decref(root);

    if (to_agg) {
        S.messages++;
        apply(data, size, got, detail, &ev);
    }
    if (g_verbose) {
        const agg_partition_t *p = agg_partition(S.agg, 0);
        fprintf(stderr,
                "clickmart-fuzz: %zu bytes: %s%s%s%s; partition 0: %lld accepted, %lld "
                "duplicates, %lld rejected\n",
                size, ing_reason_name(got), *detail ? " " : "", detail,
                to_agg ? "" : " (whole input, not applied)", (long long)p->accepted,
                (long long)p->duplicates, (long long)p->rejected);
    }
    free(data);
    g_cur_data = NULL;
    g_cur_size = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (S.since_reset >= RESET_EVERY || S.messages + MAX_PARTS > MESSAGES_PER_STATE ||
        (g_hist != NULL && (size_t)g_hist->bytes + size > HIST_BYTES))
        state_reset();
    S.since_reset++;
    history_add(data, size);

    const uint8_t *sep = memchr(data, SEP, size);
    if (sep == NULL) {
        message(data, size, true);
    } else {
        /*
         * Several messages in one input, so that the fuzzer can build the event
         * sequences that sessions, exposures and conversions need. SEP (ASCII RS)
         * cannot occur in valid JSON, so no valid message is ever cut; the whole
         * input is still validated as one message first.
         */
        message(data, size, false);
        const uint8_t *p = data, *end = data + size;
        for (int part = 0; part < MAX_PARTS && p <= end; part++) {
            const uint8_t *q = p < end ? memchr(p, SEP, (size_t)(end - p)) : NULL;
            size_t n = q != NULL ? (size_t)(q - p) : (size_t)(end - p);
            message(p, n, true);
            if (q == NULL)
                break;
            p = q + 1;
        }
    }
    batch_end();
    g_batch_lost = false;
    if (S.since_reset % FLUSH_EVERY == 0)
        flush_and_check(S.since_reset % (4 * FLUSH_EVERY) == 0);
    return 0;
}

/* Run every input of a history file in order, from a fresh state, then exit. */
static void replay(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        fprintf(stderr, "clickmart-fuzz: cannot open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    static hist_hdr_t h;
    if (fread(&h, sizeof h, 1, fp) != 1 || memcmp(h.magic, "CMFZHIS2", 8) != 0 ||
        h.count > RESET_EVERY || h.bytes > HIST_BYTES || h.off[h.count] != h.bytes) {
        fprintf(stderr, "clickmart-fuzz: %s is not a history file\n", path);
        exit(2);
    }
    uint8_t *buf = malloc(h.bytes ? h.bytes : 1);
    if (buf == NULL || fread(buf, 1, h.bytes, fp) != h.bytes) {
        fprintf(stderr, "clickmart-fuzz: %s is truncated\n", path);
        exit(2);
    }
    fclose(fp);
    fprintf(stderr, "clickmart-fuzz: replaying %u inputs from %s (allowed lateness %lld ms)\n",
            h.count, path, (long long)h.lateness);
    state_close();
    state_open(h.lateness);
    for (uint32_t i = 0; i < h.count; i++) {
        size_t n = h.off[i + 1] - h.off[i];
        /* A copy of its own, so that ASan sees reads past the input's end. */
        uint8_t *in = malloc(n ? n : 1);
        memcpy(in, buf + h.off[i], n);
        LLVMFuzzerTestOneInput(in, n);
        free(in);
    }
    free(buf);
    fprintf(stderr, "clickmart-fuzz: replayed %u inputs without a failure\n", h.count);
    exit(0);
}
