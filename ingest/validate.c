/*
 * validate.c - check one Kafka message value against CONTRACT §1 and §1.1.
 *
 * The message is parsed with jansson and then every field the contract names is
 * given a fault (ING_OK, missing_field, bad_type or bad_value) in the contract's
 * field order. The reported reject is the smallest reason over all fields and,
 * among the fields with that reason, the first one in field order, so that a
 * missing field always wins over a badly typed one wherever they sit.
 */
#include "ingest/validate.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/util.h"

/* The defaults of CONTRACT §1.1, used when the caller passes no limits. */
#define DEFAULT_MAX_EVENT_BYTES 65536
#define DEFAULT_MAX_FUTURE_MS 3600000

/* The largest amount or item price the contract allows, in currency units. */
#define MONEY_MAX 1e12

#define QUANTITY_MIN 1
#define QUANTITY_MAX 1000000

#define MS_PER_SEC 1000LL
#define MS_PER_DAY 86400000LL

/* What one validation run carries along besides the JSON tree. */
typedef struct check {
    /* The reject chosen so far; ING_OK while every field checked so far is fine. */
    ing_reason_t reason;
    /* The name of the field that the chosen reject is about. */
    const char *field;
    /*
     * Set when the document had to be parsed with JSON_DECODE_INT_AS_REAL because
     * an integer literal did not fit int64 (see parse_payload). Every integer
     * literal is then a real, so an integral real stands in for an integer.
     */
    bool ints_as_real;
} check_t;

const char *ing_reason_name(ing_reason_t r)
{
    switch (r) {
    case ING_OK:
        return "ok";
    case ING_R_PAYLOAD_TOO_LARGE:
        return "payload_too_large";
    case ING_R_INVALID_JSON:
        return "invalid_json";
    case ING_R_NOT_AN_OBJECT:
        return "not_an_object";
    case ING_R_MISSING_FIELD:
        return "missing_field";
    case ING_R_BAD_TYPE:
        return "bad_type";
    case ING_R_BAD_VALUE:
        return "bad_value";
    case ING_R_FUTURE_TIMESTAMP:
        return "future_timestamp";
    case ING_R_TOO_LATE:
        return "too_late";
    case ING_R__COUNT:
        break;
    }
    /* A caller that passes a value outside the enum still gets a printable name. */
    return "unknown";
}

static bool bytes_equal(const char *s, size_t len, const char *lit)
{
    size_t n = strlen(lit);
    return len == n && memcmp(s, lit, n) == 0;
}

/* The names of the known event types, indexed by their code. */
static const char *const etype_names[ING_ET__COUNT] = {
    [ING_ET_PAGE_VIEW] = "page_view",     [ING_ET_PRODUCT_VIEW] = "product_view",
    [ING_ET_ADD_TO_CART] = "add_to_cart", [ING_ET_CHECKOUT] = "checkout",
    [ING_ET_PURCHASE] = "purchase",       [ING_ET_ASSIGNMENT] = "experiment_assignment",
};

ing_etype_t ing_etype_from(const char *s, size_t len)
{
    if (s == NULL) {
        return ING_ET_OTHER;
    }
    for (int t = ING_ET_OTHER + 1; t < ING_ET__COUNT; t++) {
        if (bytes_equal(s, len, etype_names[t])) {
            return (ing_etype_t)t;
        }
    }
    return ING_ET_OTHER;
}

const char *ing_etype_name(ing_etype_t t)
{
    return t > ING_ET_OTHER && t < ING_ET__COUNT ? etype_names[t] : NULL;
}

/*
 * Days from 1970-01-01 to the given proleptic Gregorian date (H. Hinnant's
 * days_from_civil). It is used instead of timegm because it needs no time zone,
 * no locale and no global state, which keeps the parser thread-safe.
 */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int64_t y, int m)
{
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : days[m - 1];
}

/*
 * Read exactly n decimal digits at s[*pos] into *val. Fixed widths are what
 * RFC 3339 prescribes, so "2024-1-01" is rejected rather than guessed at.
 */
static bool read_digits(const char *s, size_t len, size_t *pos, int n, int *val)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (*pos >= len || s[*pos] < '0' || s[*pos] > '9') {
            return false;
        }
        v = v * 10 + (s[*pos] - '0');
        (*pos)++;
    }
    *val = v;
    return true;
}

static bool read_char(const char *s, size_t len, size_t *pos, char c)
{
    if (*pos >= len || s[*pos] != c) {
        return false;
    }
    (*pos)++;
    return true;
}

int ing_parse_rfc3339(const char *s, size_t len, int64_t *ms)
{
    size_t pos = 0;
    int year, month, day, hour, minute, second;

    if (s == NULL || ms == NULL) {
        return -1;
    }
    if (!read_digits(s, len, &pos, 4, &year) || !read_char(s, len, &pos, '-') ||
        !read_digits(s, len, &pos, 2, &month) || !read_char(s, len, &pos, '-') ||
        !read_digits(s, len, &pos, 2, &day)) {
        return -1;
    }
    if (month < 1 || month > 12 || day < 1 || day > days_in_month(year, month)) {
        return -1;
    }
    /* RFC 3339 allows a lowercase 't' and, by its note on readability, a space. */
    if (pos >= len || (s[pos] != 'T' && s[pos] != 't' && s[pos] != ' ')) {
        return -1;
    }
    pos++;
    if (!read_digits(s, len, &pos, 2, &hour) || !read_char(s, len, &pos, ':') ||
        !read_digits(s, len, &pos, 2, &minute) || !read_char(s, len, &pos, ':') ||
        !read_digits(s, len, &pos, 2, &second)) {
        return -1;
    }
    /*
     * Second 60 (a leap second) is rejected: the event would have to be mapped
     * onto the next second or the one before, and an ms count since the epoch
     * cannot represent it faithfully, so a producer gets a clear reject instead.
     */
    if (hour > 23 || minute > 59 || second > 59) {
        return -1;
    }

    /* The fraction is cut to milliseconds; digits beyond the third are read but dropped. */
    int64_t frac_ms = 0;
    if (pos < len && s[pos] == '.') {
        pos++;
        size_t start = pos;
        while (pos < len && s[pos] >= '0' && s[pos] <= '9') {
            if (pos - start < 3) {
                frac_ms = frac_ms * 10 + (s[pos] - '0');
            }
            pos++;
        }
        if (pos == start) {
            return -1;
        }
        for (size_t n = pos - start; n < 3; n++) {
            frac_ms *= 10;
        }
    }

    /* The offset is mandatory: a local time without one names no instant. */
    int64_t offset_min = 0;
    if (pos >= len) {
        return -1;
    }
    if (s[pos] == 'Z' || s[pos] == 'z') {
        pos++;
    } else if (s[pos] == '+' || s[pos] == '-') {
        int sign = s[pos] == '-' ? -1 : 1;
        int oh, om;
        pos++;
        if (!read_digits(s, len, &pos, 2, &oh) || !read_char(s, len, &pos, ':') ||
            !read_digits(s, len, &pos, 2, &om) || oh > 23 || om > 59) {
            return -1;
        }
        offset_min = (int64_t)sign * (oh * 60 + om);
    } else {
        return -1;
    }
    if (pos != len) {
        return -1;
    }

    int64_t days = days_from_civil(year, month, day);
    int64_t secs = (int64_t)hour * 3600 + (int64_t)minute * 60 + second - offset_min * 60;
    *ms = days * MS_PER_DAY + secs * MS_PER_SEC + frac_ms;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* A read-only view of a parsed document.                                  */

/*
 * Most messages are plain: an object of strings, integers, a few reals and
 * an array of small objects. jansson spends most of the validation time
 * building a tree of allocated nodes and hash tables for them, so such
 * messages are parsed by a strict, allocation-free parser into a flat array
 * of nodes instead. It accepts only a subset of JSON in which its reading
 * provably equals jansson's; on anything else (invalid UTF-8, an escape
 * jansson rejects such as a lone surrogate or \u0000, more escaped text than
 * its scratch buffer holds, a duplicate key, a big number, deep nesting, a
 * syntax error) it gives up and the message goes to jansson.
 * The field checks below read either tree through jv_t, so both paths apply
 * the same rules; tests/unit/test_validate.c and the fuzz harness
 * (tests/fuzz/fuzz_message.c) compare the two on every input they see.
 */
enum { FN_NULL, FN_TRUE, FN_FALSE, FN_INT, FN_REAL, FN_STRING, FN_ARRAY, FN_OBJECT };

typedef struct fnode {
    uint8_t type;
    uint32_t n;    /* string: bytes; array: elements; object: members */
    uint32_t size; /* nodes in this subtree, itself included (an object's
                      members are a key node followed by the value's subtree) */
    const char *s; /* string bytes, not NUL-terminated */
    union {
        int64_t i;
        double d;
    } num;
} fnode_t;

/* Limits of the fast path (beyond them jansson decides). */
#define FAST_MAX_NODES 512
#define FAST_MAX_DEPTH 4
#define FAST_MAX_MEMBERS 32
#define FAST_MAX_NUMBER 64
/* Bytes of decoded text for the strings with escapes of one message. */
#define FAST_SCRATCH 4096

typedef struct fparse {
    const char *p, *end;
    fnode_t *nodes;
    uint32_t n;
    char *out, *out_end; /* free part of the scratch buffer for decoded strings */
} fparse_t;

static void f_ws(fparse_t *fp)
{
    while (fp->p < fp->end &&
           (*fp->p == ' ' || *fp->p == '\t' || *fp->p == '\n' || *fp->p == '\r')) {
        fp->p++;
    }
}

static fnode_t *f_node(fparse_t *fp, uint8_t type)
{
    if (fp->n == FAST_MAX_NODES) {
        return NULL;
    }
    fnode_t *f = &fp->nodes[fp->n++];
    f->type = type;
    f->n = 0;
    f->size = 1;
    f->s = NULL;
    return f;
}

/* The four hex digits of a \u escape at p (jansson takes either case). */
static int f_hex4(const char *p, const char *end, uint32_t *v)
{
    if (end - p < 4) {
        return -1;
    }
    uint32_t r = 0;
    for (int i = 0; i < 4; i++) {
        char ch = p[i];
        uint32_t d;
        if (ch >= '0' && ch <= '9') {
            d = (uint32_t)(ch - '0');
        } else if (ch >= 'a' && ch <= 'f') {
            d = (uint32_t)(ch - 'a' + 10);
        } else if (ch >= 'A' && ch <= 'F') {
            d = (uint32_t)(ch - 'A' + 10);
        } else {
            return -1;
        }
        r = r << 4 | d;
    }
    *v = r;
    return 0;
}

/*
 * Decode the escape at fp->p (a backslash) into *o, as jansson's
 * lex_scan_string does, and step over it. -1 for what jansson rejects (an
 * unknown escape, a lone or unpaired surrogate, \u0000 since JSON_ALLOW_NUL
 * is not passed) or when the scratch buffer is full: jansson decides then.
 */
static int f_escape(fparse_t *fp, char **o)
{
    const char *p = fp->p;
    if (fp->end - p < 2 || fp->out_end - *o < 4) {
        return -1;
    }
    char c;
    switch (p[1]) {
    case '"':
    case '\\':
    case '/':
        c = p[1];
        break;
    case 'b':
        c = '\b';
        break;
    case 'f':
        c = '\f';
        break;
    case 'n':
        c = '\n';
        break;
    case 'r':
        c = '\r';
        break;
    case 't':
        c = '\t';
        break;
    case 'u': {
        uint32_t v, w;
        if (f_hex4(p + 2, fp->end, &v) != 0 || v == 0 || (v >= 0xDC00u && v <= 0xDFFFu)) {
            return -1;
        }
        p += 6;
        if (v >= 0xD800u && v <= 0xDBFFu) {
            /* A high surrogate counts only with a low one right after it. */
            if (fp->end - p < 2 || p[0] != '\\' || p[1] != 'u' || f_hex4(p + 2, fp->end, &w) != 0 ||
                w < 0xDC00u || w > 0xDFFFu) {
                return -1;
            }
            v = ((v - 0xD800u) << 10) + (w - 0xDC00u) + 0x10000u;
            p += 6;
        }
        unsigned char *t = (unsigned char *)*o;
        if (v < 0x80u) {
            t[0] = (unsigned char)v;
            *o += 1;
        } else if (v < 0x800u) {
            t[0] = (unsigned char)(0xC0u | v >> 6);
            t[1] = (unsigned char)(0x80u | (v & 0x3Fu));
            *o += 2;
        } else if (v < 0x10000u) {
            t[0] = (unsigned char)(0xE0u | v >> 12);
            t[1] = (unsigned char)(0x80u | (v >> 6 & 0x3Fu));
            t[2] = (unsigned char)(0x80u | (v & 0x3Fu));
            *o += 3;
        } else {
            t[0] = (unsigned char)(0xF0u | v >> 18);
            t[1] = (unsigned char)(0x80u | (v >> 12 & 0x3Fu));
            t[2] = (unsigned char)(0x80u | (v >> 6 & 0x3Fu));
            t[3] = (unsigned char)(0x80u | (v & 0x3Fu));
            *o += 4;
        }
        fp->p = p;
        return 0;
    }
    default:
        return -1;
    }
    *(*o)++ = c;
    fp->p = p + 2;
    return 0;
}

/* The bytes of w that are below n (n <= 128) get their top bit set, and
 * perhaps bytes above such a byte: never a miss, so a zero result is exact. */
static inline uint64_t f_swar_below(uint64_t w, uint8_t n)
{
    return (w - 0x0101010101010101ULL * n) & ~w & 0x8080808080808080ULL;
}

/* Likewise for the bytes of w equal to c. */
static inline uint64_t f_swar_equal(uint64_t w, uint8_t c)
{
    return f_swar_below(w ^ (0x0101010101010101ULL * c), 1);
}

/*
 * The first byte at or after p that ends a run of plain string bytes: a
 * quote, a backslash, a control character, a byte of 0x80 or above, or end.
 * Eight bytes at a time: a false alarm can only sit above a true one, so on
 * a little-endian machine the lowest flagged byte is the answer; elsewhere
 * the byte loop, which is exact, finds it.
 */
static const char *f_plain(const char *p, const char *end)
{
    while (end - p >= 8) {
        uint64_t w;
        memcpy(&w, p, sizeof w);
        uint64_t m = (w & 0x8080808080808080ULL) | f_swar_below(w, 0x20) | f_swar_equal(w, '"') |
                     f_swar_equal(w, '\\');
        if (m) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            return p + (__builtin_ctzll(m) >> 3);
#else
            break;
#endif
        }
        p += 8;
    }
    while (p < end) {
        unsigned char ch = (unsigned char)*p;
        if (ch < 0x20 || ch >= 0x80 || ch == '"' || ch == '\\') {
            break;
        }
        p++;
    }
    return p;
}

/*
 * A string. Without escapes its bytes (printable ASCII, or UTF-8 that
 * jansson accepts) are its value and the node points into the message; from
 * the first escape on, the value is built in the scratch buffer: the plain
 * runs copied, the escapes decoded. Control characters are left to jansson,
 * which rejects them.
 */
static int f_string(fparse_t *fp)
{
    fnode_t *f = f_node(fp, FN_STRING);
    if (f == NULL) {
        return -1;
    }
    const char *start = ++fp->p, *p = start, *run = start;
    char *o = NULL; /* the end of the decoded value, once there is one */
    for (;;) {
        p = f_plain(p, fp->end);
        if (p >= fp->end) {
            return -1;
        }
        unsigned char ch = (unsigned char)*p;
        if (ch >= 0x80) {
            /* jansson checks every byte of its input the same way (its
             * utf8_check_first and utf8_check_full): shortest forms, no
             * surrogate halves, nothing above U+10FFFF. */
            size_t bad;
            size_t k = cm_utf8_seq((const unsigned char *)p, (size_t)(fp->end - p), &bad);
            if (k == 0) {
                return -1;
            }
            p += k;
            continue;
        }
        if (ch != '"' && ch != '\\') {
            return -1; /* a control character */
        }
        if (ch == '"' && o == NULL) {
            f->s = start;
            f->n = (uint32_t)(p - start);
            fp->p = p + 1;
            return 0;
        }
        if (o == NULL) {
            o = fp->out;
        }
        size_t n = (size_t)(p - run);
        if ((size_t)(fp->out_end - o) < n) {
            return -1;
        }
        memcpy(o, run, n);
        o += n;
        if (ch == '"') {
            f->s = fp->out;
            f->n = (uint32_t)(o - fp->out);
            fp->out = o;
            fp->p = p + 1;
            return 0;
        }
        fp->p = p;
        if (f_escape(fp, &o) != 0) {
            return -1;
        }
        p = run = fp->p;
    }
}

static bool f_digit(const fparse_t *fp)
{
    return fp->p < fp->end && *fp->p >= '0' && *fp->p <= '9';
}

/*
 * A number in JSON's grammar. Without fraction and exponent it is an
 * integer, taken exactly when it has at most 18 digits (so it fits int64);
 * otherwise it is converted with strtod like jansson does, and an overflow
 * to infinity (jansson's "real number overflow") is left to jansson.
 */
static int f_number(fparse_t *fp)
{
    fnode_t *f = f_node(fp, FN_INT);
    if (f == NULL) {
        return -1;
    }
    const char *start = fp->p;
    bool neg = *fp->p == '-';
    if (neg) {
        fp->p++;
    }
    if (!f_digit(fp)) {
        return -1;
    }
    int digits = 0;
    int64_t v = 0;
    if (*fp->p == '0') {
        fp->p++;
        if (f_digit(fp)) {
            return -1;
        }
    } else {
        while (f_digit(fp)) {
            if (++digits > 18) {
                return -1;
            }
            v = v * 10 + (*fp->p++ - '0');
        }
    }
    bool real = false;
    if (fp->p < fp->end && *fp->p == '.') {
        real = true;
        fp->p++;
        if (!f_digit(fp)) {
            return -1;
        }
        while (f_digit(fp)) {
            fp->p++;
        }
    }
    if (fp->p < fp->end && (*fp->p == 'e' || *fp->p == 'E')) {
        real = true;
        fp->p++;
        if (fp->p < fp->end && (*fp->p == '+' || *fp->p == '-')) {
            fp->p++;
        }
        if (!f_digit(fp)) {
            return -1;
        }
        while (f_digit(fp)) {
            fp->p++;
        }
    }
    if (!real) {
        f->num.i = neg ? -v : v;
        return 0;
    }
    size_t n = (size_t)(fp->p - start);
    char text[FAST_MAX_NUMBER + 1];
    if (n > FAST_MAX_NUMBER) {
        return -1;
    }
    memcpy(text, start, n);
    text[n] = '\0';
    errno = 0;
    char *stop;
    double d = strtod(text, &stop);
    if (stop != text + n || ((d == HUGE_VAL || d == -HUGE_VAL) && errno == ERANGE)) {
        return -1;
    }
    f->type = FN_REAL;
    f->num.d = d;
    return 0;
}

static int f_literal(fparse_t *fp, const char *lit, uint8_t type)
{
    size_t n = strlen(lit);
    if ((size_t)(fp->end - fp->p) < n || memcmp(fp->p, lit, n) != 0) {
        return -1;
    }
    fp->p += n;
    return f_node(fp, type) != NULL ? 0 : -1;
}

static int f_value(fparse_t *fp, int depth);

static int f_object(fparse_t *fp, int depth)
{
    uint32_t at = fp->n;
    fnode_t *f = f_node(fp, FN_OBJECT);
    if (f == NULL || depth > FAST_MAX_DEPTH) {
        return -1;
    }
    uint32_t keys[FAST_MAX_MEMBERS] = {0};
    fp->p++;
    f_ws(fp);
    if (fp->p < fp->end && *fp->p == '}') {
        fp->p++;
        return 0;
    }
    for (;;) {
        if (fp->p >= fp->end || *fp->p != '"' || fp->nodes[at].n == FAST_MAX_MEMBERS) {
            return -1;
        }
        uint32_t k = fp->n;
        if (f_string(fp) != 0) {
            return -1;
        }
        /* jansson is asked to reject duplicate keys; leave them to it. */
        const fnode_t *key = &fp->nodes[k];
        for (uint32_t i = 0; i < fp->nodes[at].n; i++) {
            const fnode_t *o = &fp->nodes[keys[i]];
            if (o->n == key->n && memcmp(o->s, key->s, key->n) == 0) {
                return -1;
            }
        }
        keys[fp->nodes[at].n++] = k;
        f_ws(fp);
        if (fp->p >= fp->end || *fp->p != ':') {
            return -1;
        }
        fp->p++;
        f_ws(fp);
        if (f_value(fp, depth + 1) != 0) {
            return -1;
        }
        f_ws(fp);
        if (fp->p < fp->end && *fp->p == ',') {
            fp->p++;
            f_ws(fp);
            continue;
        }
        if (fp->p < fp->end && *fp->p == '}') {
            fp->p++;
            fp->nodes[at].size = fp->n - at;
            return 0;
        }
        return -1;
    }
}

static int f_array(fparse_t *fp, int depth)
{
    uint32_t at = fp->n;
    fnode_t *f = f_node(fp, FN_ARRAY);
    if (f == NULL || depth > FAST_MAX_DEPTH) {
        return -1;
    }
    fp->p++;
    f_ws(fp);
    if (fp->p < fp->end && *fp->p == ']') {
        fp->p++;
        return 0;
    }
    for (;;) {
        if (f_value(fp, depth + 1) != 0) {
            return -1;
        }
        fp->nodes[at].n++;
        f_ws(fp);
        if (fp->p < fp->end && *fp->p == ',') {
            fp->p++;
            f_ws(fp);
            continue;
        }
        if (fp->p < fp->end && *fp->p == ']') {
            fp->p++;
            fp->nodes[at].size = fp->n - at;
            return 0;
        }
        return -1;
    }
}

static int f_value(fparse_t *fp, int depth)
{
    if (fp->p >= fp->end) {
        return -1;
    }
    switch (*fp->p) {
    case '{':
        return f_object(fp, depth);
    case '[':
        return f_array(fp, depth);
    case '"':
        return f_string(fp);
    case 't':
        return f_literal(fp, "true", FN_TRUE);
    case 'f':
        return f_literal(fp, "false", FN_FALSE);
    case 'n':
        return f_literal(fp, "null", FN_NULL);
    default:
        return f_number(fp);
    }
}

/* Parse an object of the fast path's subset into nodes[0..); -1: ask jansson. */
static int fast_parse(const char *buf, size_t len, fnode_t *nodes, char *scratch)
{
    fparse_t fp = {buf, buf + len, nodes, 0, scratch, scratch + FAST_SCRATCH};
    f_ws(&fp);
    if (fp.p >= fp.end || *fp.p != '{' || f_object(&fp, 0) != 0) {
        return -1;
    }
    f_ws(&fp);
    return fp.p == fp.end ? 0 : -1;
}

/* A value of either tree; both pointers NULL: the value is absent. */
typedef struct jv {
    const json_t *j;
    const fnode_t *f;
} jv_t;

static const jv_t JV_ABSENT = {NULL, NULL};

static bool jv_absent(jv_t v)
{
    return v.j == NULL && v.f == NULL;
}

static bool jv_is(jv_t v, uint8_t type)
{
    return v.f != NULL && v.f->type == type;
}

static bool jv_is_null(jv_t v)
{
    return v.j != NULL ? json_is_null(v.j) : jv_is(v, FN_NULL);
}

static bool jv_is_string(jv_t v)
{
    return v.j != NULL ? json_is_string(v.j) : jv_is(v, FN_STRING);
}

static size_t jv_string_length(jv_t v)
{
    return v.j != NULL ? json_string_length(v.j) : v.f->n;
}

/* The string's bytes (jv_string_length of them; not NUL-terminated on the fast path). */
static const char *jv_string_value(jv_t v)
{
    return v.j != NULL ? json_string_value(v.j) : v.f->s;
}

static bool jv_is_integer(jv_t v)
{
    return v.j != NULL ? json_is_integer(v.j) : jv_is(v, FN_INT);
}

static int64_t jv_integer_value(jv_t v)
{
    return v.j != NULL ? (int64_t)json_integer_value(v.j) : v.f->num.i;
}

static bool jv_is_real(jv_t v)
{
    return v.j != NULL ? json_is_real(v.j) : jv_is(v, FN_REAL);
}

static double jv_real_value(jv_t v)
{
    return v.j != NULL ? json_real_value(v.j) : v.f->num.d;
}

static bool jv_is_number(jv_t v)
{
    return jv_is_integer(v) || jv_is_real(v);
}

/* As json_number_value: an integer converted to double, or the real. */
static double jv_number_value(jv_t v)
{
    return jv_is_integer(v) ? (double)jv_integer_value(v) : jv_real_value(v);
}

static bool jv_is_object(jv_t v)
{
    return v.j != NULL ? json_is_object(v.j) : jv_is(v, FN_OBJECT);
}

static bool jv_is_array(jv_t v)
{
    return v.j != NULL ? json_is_array(v.j) : jv_is(v, FN_ARRAY);
}

/* The member key of an object, JV_ABSENT when it has none. */
static jv_t jv_object_get(jv_t o, const char *key)
{
    if (o.j != NULL) {
        jv_t r = {json_object_get(o.j, key), NULL};
        return r;
    }
    if (o.f == NULL) {
        return JV_ABSENT;
    }
    size_t kn = strlen(key);
    const fnode_t *k = o.f + 1;
    for (uint32_t i = 0; i < o.f->n; i++) {
        const fnode_t *val = k + 1;
        if (k->n == kn && memcmp(k->s, key, kn) == 0) {
            jv_t r = {NULL, val};
            return r;
        }
        k = val + val->size;
    }
    return JV_ABSENT;
}

static size_t jv_array_size(jv_t a)
{
    return a.j != NULL ? json_array_size(a.j) : a.f->n;
}

/* Element i of array a, given element i - 1 as prev (ignored for i == 0). */
static jv_t jv_array_step(jv_t a, size_t i, jv_t prev)
{
    if (a.j != NULL) {
        jv_t r = {json_array_get(a.j, i), NULL};
        return r;
    }
    jv_t r = {NULL, i == 0 ? a.f + 1 : prev.f + prev.f->size};
    return r;
}

/*
 * Remember a field's fault. A smaller reason replaces the one held; an equal
 * reason does not, because fields are visited in the contract's order and the
 * first field with the winning reason is the one to report.
 */
static void note(check_t *c, ing_reason_t r, const char *field)
{
    if (r != ING_OK && (c->reason == ING_OK || r < c->reason)) {
        c->reason = r;
        c->field = field;
    }
}

/* The smaller of two faults, ING_OK counting as no fault at all. */
static ing_reason_t min_fault(ing_reason_t a, ing_reason_t b)
{
    if (a == ING_OK) {
        return b;
    }
    if (b == ING_OK) {
        return a;
    }
    return a < b ? a : b;
}

/*
 * Check a string field. A required field that is absent or null is missing;
 * an optional one that is absent, null or "" is absent and yields *len = 0.
 * On ING_OK *s and *len describe the string (jansson's byte length).
 */
static ing_reason_t check_string(jv_t v, bool required, size_t max, const char **s, size_t *len)
{
    *s = NULL;
    *len = 0;
    if (jv_absent(v) || jv_is_null(v)) {
        return required ? ING_R_MISSING_FIELD : ING_OK;
    }
    if (!jv_is_string(v)) {
        return ING_R_BAD_TYPE;
    }
    size_t n = jv_string_length(v);
    if (n == 0) {
        return required ? ING_R_BAD_VALUE : ING_OK;
    }
    if (n > max) {
        return ING_R_BAD_VALUE;
    }
    *s = jv_string_value(v);
    *len = n;
    return ING_OK;
}

/*
 * Check a value that must be a JSON integer in [lo, hi]. An integer is a number
 * literal without fraction or exponent, so 1.0 is a real and a bad type. The one
 * exception is ints-as-real mode, where jansson turned every integer literal
 * into a real: there an integral real is taken as the integer it was written as.
 * All bounds used here are below 2^53, so comparing them as doubles is exact.
 */
static ing_reason_t check_integer(const check_t *c, jv_t v, int64_t lo, int64_t hi, int64_t *out)
{
    if (jv_is_integer(v)) {
        int64_t i = jv_integer_value(v);
        if (i < lo || i > hi) {
            return ING_R_BAD_VALUE;
        }
        *out = (int64_t)i;
        return ING_OK;
    }
    if (c->ints_as_real && jv_is_real(v)) {
        double d = jv_real_value(v);
        if (d != floor(d)) {
            return ING_R_BAD_TYPE;
        }
        if (d < (double)lo || d > (double)hi) {
            return ING_R_BAD_VALUE;
        }
        *out = (int64_t)d;
        return ING_OK;
    }
    return ING_R_BAD_TYPE;
}

/*
 * Check a money value (amount or item price): any JSON number, finite, in
 * [0, 1e12], held as llround(value * 100.0) cents as CONTRACT §1 prescribes.
 * jansson never yields a non-finite real, but the check costs nothing.
 */
static ing_reason_t check_money(jv_t v, int64_t *cents)
{
    if (!jv_is_number(v)) {
        return ING_R_BAD_TYPE;
    }
    double d = jv_number_value(v);
    if (!isfinite(d) || d < 0.0 || d > MONEY_MAX) {
        return ING_R_BAD_VALUE;
    }
    *cents = (int64_t)llround(d * 100.0);
    return ING_OK;
}

static ing_reason_t check_ts(const check_t *c, jv_t v, int64_t *ts)
{
    if (jv_absent(v) || jv_is_null(v)) {
        return ING_R_MISSING_FIELD;
    }
    if (jv_is_string(v)) {
        int64_t ms;
        if (ing_parse_rfc3339(jv_string_value(v), jv_string_length(v), &ms) != 0) {
            return ING_R_BAD_VALUE;
        }
        if (ms < ING_TS_MIN || ms >= ING_TS_END) {
            return ING_R_BAD_VALUE;
        }
        *ts = ms;
        return ING_OK;
    }
    return check_integer(c, v, ING_TS_MIN, ING_TS_END - 1, ts);
}

static bool valid_event_type(const char *s, size_t len)
{
    if (len < 1 || len > ING_TYPE_MAX || s[0] < 'a' || s[0] > 'z') {
        return false;
    }
    for (size_t i = 1; i < len; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_')) {
            return false;
        }
    }
    return true;
}

/* Copy a checked string into a fixed buffer; the caller has bounded len already. */
static void copy_str(char *dst, uint8_t *dst_len, const char *s, size_t len)
{
    if (len > 0) {
        memcpy(dst, s, len);
    }
    dst[len] = '\0';
    *dst_len = (uint8_t)len;
}

/* Check one element of items and, when it is fine, fill *item. */
static ing_reason_t check_item(const check_t *c, jv_t el, ing_item_t *item)
{
    if (!jv_is_object(el)) {
        return ING_R_BAD_TYPE;
    }
    const char *pid;
    size_t pid_len;
    jv_t id = jv_object_get(el, "product_id");
    ing_reason_t fault = check_string(id, true, ING_ID_MAX, &pid, &pid_len);

    int64_t quantity = 1;
    jv_t q = jv_object_get(el, "quantity");
    if (!jv_absent(q) && !jv_is_null(q)) {
        fault = min_fault(fault, check_integer(c, q, QUANTITY_MIN, QUANTITY_MAX, &quantity));
    }

    int64_t price_cents = 0;
    jv_t p = jv_object_get(el, "price");
    if (!jv_absent(p) && !jv_is_null(p)) {
        fault = min_fault(fault, check_money(p, &price_cents));
    }

    if (fault == ING_OK && item != NULL) {
        copy_str(item->product_id, &item->product_id_len, pid, pid_len);
        item->quantity = quantity;
        item->price_cents = price_cents;
    }
    return fault;
}

/*
 * Check items of a purchase. Absent, null and "" mean no items. Every element is
 * checked, even past the 100th, so that the reason reported for items follows
 * the same precedence as across fields: a badly typed element wins over the
 * array being too long.
 */
static ing_reason_t check_items(const check_t *c, jv_t v, ing_event_t *out)
{
    if (jv_absent(v) || jv_is_null(v) || (jv_is_string(v) && jv_string_length(v) == 0)) {
        return ING_OK;
    }
    if (!jv_is_array(v)) {
        return ING_R_BAD_TYPE;
    }
    size_t n = jv_array_size(v);
    ing_reason_t fault = n > ING_ITEMS_MAX ? ING_R_BAD_VALUE : ING_OK;
    jv_t el = JV_ABSENT;
    for (size_t i = 0; i < n; i++) {
        ing_item_t *item = i < ING_ITEMS_MAX ? &out->items[i] : NULL;
        el = jv_array_step(v, i, el);
        fault = min_fault(fault, check_item(c, el, item));
    }
    if (fault == ING_OK) {
        out->n_items = (int)n;
    }
    return fault;
}

/*
 * Parse the payload. jansson is given the exact length because buf is not
 * NUL-terminated. It already rejects everything CONTRACT §1.1 calls invalid
 * JSON (bad UTF-8, lone surrogates, duplicate keys, \u0000 since
 * JSON_ALLOW_NUL is not passed, NaN/Infinity, reals that overflow a double).
 *
 * One case needs help: jansson fails on an integer literal that does not fit
 * int64 ("too big integer"), but the contract only calls a number invalid when
 * it fits neither int64 nor a finite double. Such a document is parsed again
 * with JSON_DECODE_INT_AS_REAL; if that succeeds, validation continues in
 * ints-as-real mode, where every integer literal of the document is a real and
 * an integral real is accepted where an integer is required (see
 * check_integer). The price of this rare case is that a literal such as 1.0
 * in ts is then also taken as an integer, since the two can no longer be told
 * apart.
 */
static json_t *parse_payload(const char *buf, size_t len, bool *ints_as_real)
{
    const size_t flags = JSON_DECODE_ANY | JSON_REJECT_DUPLICATES;
    json_error_t err;

    *ints_as_real = false;
    json_t *root = json_loadb(buf, len, flags, &err);
    if (root != NULL) {
        return root;
    }
    if (json_error_code(&err) == json_error_numeric_overflow &&
        strncmp(err.text, "too big ", strlen("too big ")) == 0) {
        root = json_loadb(buf, len, flags | JSON_DECODE_INT_AS_REAL, &err);
        if (root != NULL) {
            *ints_as_real = true;
        }
    }
    return root;
}

/* now + limit would overflow for absurd limits; saturate so the comparison stays defined. */
static int64_t add_saturating(int64_t a, int64_t b)
{
    if (b > 0 && a > INT64_MAX - b) {
        return INT64_MAX;
    }
    if (b < 0 && a < INT64_MIN - b) {
        return INT64_MIN;
    }
    return a + b;
}

static void set_detail(char *detail, size_t cap, const char *field)
{
    if (detail == NULL || cap == 0) {
        return;
    }
    size_t n = field != NULL ? strlen(field) : 0;
    if (n >= cap) {
        n = cap - 1;
    }
    if (n > 0) {
        memcpy(detail, field, n);
    }
    detail[n] = '\0';
}

/* Check every field of the top-level object in the contract's order and fill *out. */
static void check_fields(check_t *c, jv_t root, ing_event_t *out)
{
    const char *s;
    size_t len;
    ing_reason_t r;

    r = check_string(jv_object_get(root, "event_id"), true, ING_ID_MAX, &s, &len);
    if (r == ING_OK) {
        copy_str(out->event_id, &out->event_id_len, s, len);
    }
    note(c, r, "event_id");

    r = check_string(jv_object_get(root, "user_id"), true, ING_ID_MAX, &s, &len);
    if (r == ING_OK) {
        copy_str(out->user_id, &out->user_id_len, s, len);
    }
    note(c, r, "user_id");

    /* The pattern bounds the length to 64 bytes, so a longer string is a bad value. */
    r = check_string(jv_object_get(root, "event_type"), true, SIZE_MAX, &s, &len);
    if (r == ING_OK && !valid_event_type(s, len)) {
        r = ING_R_BAD_VALUE;
    }
    bool type_ok = r == ING_OK;
    if (type_ok) {
        copy_str(out->event_type, &out->event_type_len, s, len);
        out->type = ing_etype_from(s, len);
    }
    note(c, r, "event_type");

    note(c, check_ts(c, jv_object_get(root, "ts"), &out->ts), "ts");

    /* Type-specific fields are read only when event_type itself is sound. */
    if (type_ok && out->type == ING_ET_PURCHASE) {
        jv_t amount = jv_object_get(root, "amount");
        if (jv_absent(amount) || jv_is_null(amount)) {
            r = ING_R_MISSING_FIELD;
        } else {
            r = check_money(amount, &out->amount_cents);
        }
        note(c, r, "amount");
        note(c, check_items(c, jv_object_get(root, "items"), out), "items");
    } else if (type_ok && out->type == ING_ET_ASSIGNMENT) {
        r = check_string(jv_object_get(root, "experiment"), true, ING_EXP_MAX, &s, &len);
        if (r == ING_OK) {
            copy_str(out->experiment, &out->experiment_len, s, len);
        }
        note(c, r, "experiment");

        r = check_string(jv_object_get(root, "variant"), true, ING_EXP_MAX, &s, &len);
        if (r == ING_OK) {
            copy_str(out->variant, &out->variant_len, s, len);
        }
        note(c, r, "variant");
    }

    r = check_string(jv_object_get(root, "device"), false, ING_ATTR_MAX, &s, &len);
    if (r == ING_OK) {
        copy_str(out->device, &out->device_len, s, len);
    }
    note(c, r, "device");

    r = check_string(jv_object_get(root, "country"), false, ING_ATTR_MAX, &s, &len);
    if (r == ING_OK) {
        copy_str(out->country, &out->country_len, s, len);
    }
    note(c, r, "country");

    r = check_string(jv_object_get(root, "product_id"), false, ING_ID_MAX, &s, &len);
    if (r == ING_OK) {
        copy_str(out->product_id, &out->product_id_len, s, len);
    }
    note(c, r, "product_id");
}

static ing_reason_t validate(const char *buf, size_t len, int64_t now_ms, const ing_limits_t *lim,
                             ing_event_t *out, char *detail, size_t detail_cap, bool fast)
{
    int64_t max_bytes = lim != NULL ? lim->max_event_bytes : DEFAULT_MAX_EVENT_BYTES;
    int64_t max_future = lim != NULL ? lim->max_future_ms : DEFAULT_MAX_FUTURE_MS;
    check_t c = {ING_OK, NULL, false};

    set_detail(detail, detail_cap, "");
    /*
     * out is required by the API; a NULL one is a caller bug, answered with a
     * reject rather than a crash because this function must never abort.
     */
    if (out == NULL) {
        return ING_R_INVALID_JSON;
    }
    /*
     * Only the scalar part of the event is cleared: the items array is 15 KB and
     * n_items says how much of it is meaningful.
     */
    memset(out, 0, offsetof(ing_event_t, items));

    /*
     * The size check comes before parsing so that an oversized payload costs
     * nothing. A negative limit is taken as no limit rather than as "reject all".
     */
    if (max_bytes >= 0 && len > (uint64_t)max_bytes) {
        return ING_R_PAYLOAD_TOO_LARGE;
    }
    if (buf == NULL || len == 0) {
        return ING_R_INVALID_JSON;
    }
    /* No valid JSON text holds a raw NUL byte, yet jansson 2.14 skips one
     * that directly follows a number or a literal ({"a":1<NUL>} parses).
     * Found by the fuzzer (tests/fuzz). */
    if (memchr(buf, '\0', len) != NULL) {
        return ING_R_INVALID_JSON;
    }
    fnode_t nodes[FAST_MAX_NODES];
    char scratch[FAST_SCRATCH];
    if (fast && fast_parse(buf, len, nodes, scratch) == 0) {
        jv_t root = {NULL, &nodes[0]};
        check_fields(&c, root, out);
    } else {
        json_t *doc = parse_payload(buf, len, &c.ints_as_real);
        if (doc == NULL) {
            return ING_R_INVALID_JSON;
        }
        if (!json_is_object(doc)) {
            json_decref(doc);
            return ING_R_NOT_AN_OBJECT;
        }
        jv_t root = {doc, NULL};
        check_fields(&c, root, out);
        json_decref(doc);
    }

    if (c.reason != ING_OK) {
        set_detail(detail, detail_cap, c.field);
        return c.reason;
    }
    if (out->ts > add_saturating(now_ms, max_future)) {
        return ING_R_FUTURE_TIMESTAMP;
    }
    return ING_OK;
}

ing_reason_t ing_validate(const char *buf, size_t len, int64_t now_ms, const ing_limits_t *lim,
                          ing_event_t *out, char *detail, size_t detail_cap)
{
    return validate(buf, len, now_ms, lim, out, detail, detail_cap, true);
}

ing_reason_t ing_validate_reference(const char *buf, size_t len, int64_t now_ms,
                                    const ing_limits_t *lim, ing_event_t *out, char *detail,
                                    size_t detail_cap)
{
    return validate(buf, len, now_ms, lim, out, detail, detail_cap, false);
}

int ing_validate_fast_path(const char *buf, size_t len)
{
    fnode_t nodes[FAST_MAX_NODES];
    char scratch[FAST_SCRATCH];
    return buf != NULL && len > 0 && memchr(buf, '\0', len) == NULL &&
           fast_parse(buf, len, nodes, scratch) == 0;
}

/* ---------------------------------------------------------------------- */
/* The packed form (validate.h, ing_packed_t).                            */

/* Where each ING_PF_* string of an ing_event_t and its length live: one
 * table for packing and unpacking, so the two cannot disagree. */
static const struct {
    size_t str, len;
} PACKED_FIELDS[ING_PF__COUNT] = {
    [ING_PF_EVENT_ID] = {offsetof(ing_event_t, event_id), offsetof(ing_event_t, event_id_len)},
    [ING_PF_USER_ID] = {offsetof(ing_event_t, user_id), offsetof(ing_event_t, user_id_len)},
    [ING_PF_EVENT_TYPE] = {offsetof(ing_event_t, event_type),
                           offsetof(ing_event_t, event_type_len)},
    [ING_PF_DEVICE] = {offsetof(ing_event_t, device), offsetof(ing_event_t, device_len)},
    [ING_PF_COUNTRY] = {offsetof(ing_event_t, country), offsetof(ing_event_t, country_len)},
    [ING_PF_PRODUCT_ID] = {offsetof(ing_event_t, product_id),
                           offsetof(ing_event_t, product_id_len)},
    [ING_PF_EXPERIMENT] = {offsetof(ing_event_t, experiment),
                           offsetof(ing_event_t, experiment_len)},
    [ING_PF_VARIANT] = {offsetof(ing_event_t, variant), offsetof(ing_event_t, variant_len)},
};

/* The length of string field f of ev. */
static uint8_t packed_len(const ing_event_t *ev, int f)
{
    return *((const uint8_t *)ev + PACKED_FIELDS[f].len);
}

/* The items that count: n_items, clamped to the array (never negative). */
static size_t packed_items(const ing_event_t *ev)
{
    return ev->n_items <= 0 ? 0 : ev->n_items > ING_ITEMS_MAX ? ING_ITEMS_MAX : (size_t)ev->n_items;
}

size_t ing_pack_size(const ing_event_t *ev)
{
    size_t n = sizeof(ing_packed_t);
    for (int f = 0; f < ING_PF__COUNT; f++)
        n += packed_len(ev, f);
    for (size_t i = 0; i < packed_items(ev); i++)
        n += 1 + ev->items[i].product_id_len + 2 * sizeof(int64_t);
    return (n + 7) & ~(size_t)7;
}

size_t ing_pack(const ing_event_t *ev, void *out)
{
    ing_packed_t *p = out;
    p->ts = ev->ts;
    p->amount_cents = ev->amount_cents;
    p->type = (uint8_t)ev->type;
    p->n_items = (uint8_t)packed_items(ev);
    p->pad_[0] = p->pad_[1] = 0;
    char *w = (char *)(p + 1);
    for (int f = 0; f < ING_PF__COUNT; f++) {
        p->len[f] = packed_len(ev, f);
        memcpy(w, (const char *)ev + PACKED_FIELDS[f].str, p->len[f]);
        w += p->len[f];
    }
    for (size_t i = 0; i < p->n_items; i++) {
        const ing_item_t *it = &ev->items[i];
        *w++ = (char)it->product_id_len;
        memcpy(w, it->product_id, it->product_id_len);
        w += it->product_id_len;
        memcpy(w, &it->quantity, sizeof it->quantity);
        w += sizeof it->quantity;
        memcpy(w, &it->price_cents, sizeof it->price_cents);
        w += sizeof it->price_cents;
    }
    size_t n = (size_t)(w - (char *)out);
    size_t size = (n + 7) & ~(size_t)7;
    memset(w, 0, size - n);
    p->size = (uint32_t)size;
    return size;
}

void ing_unpack(const ing_packed_t *p, ing_event_t *out)
{
    memset(out, 0, offsetof(ing_event_t, items));
    const char *r = (const char *)(p + 1);
    for (int f = 0; f < ING_PF__COUNT; f++) {
        /* The scalar part was cleared, so the string stays NUL-terminated. */
        memcpy((char *)out + PACKED_FIELDS[f].str, r, p->len[f]);
        *((uint8_t *)out + PACKED_FIELDS[f].len) = p->len[f];
        r += p->len[f];
    }
    out->ts = p->ts;
    out->amount_cents = p->amount_cents;
    out->type = (ing_etype_t)p->type;
    out->n_items = p->n_items;
    for (size_t i = 0; i < p->n_items; i++) {
        ing_item_t *it = &out->items[i];
        it->product_id_len = (uint8_t)*r++;
        memcpy(it->product_id, r, it->product_id_len);
        it->product_id[it->product_id_len] = '\0';
        r += it->product_id_len;
        memcpy(&it->quantity, r, sizeof it->quantity);
        r += sizeof it->quantity;
        memcpy(&it->price_cents, r, sizeof it->price_cents);
        r += sizeof it->price_cents;
    }
}
