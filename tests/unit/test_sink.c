/*
 * test_sink.c - unit tests of the Postgres sink (sink/sink.c).
 *
 * The pure parts (binary COPY values, UTF-8 sanitising, row rendering, SQL
 * generation, conninfo redaction) are tested through the static helpers:
 * the test includes sink.c itself instead of widening sink.h for the sake
 * of tests. When CLICKMART_TEST_PG holds a conninfo, a live test also
 * migrates and flushes against that server in a throw-away schema (and
 * round-trips random values through binary COPY); without it that test is
 * skipped.
 */
/* Included, not linked: the tests call sink.c's static helpers (see above). */
#include "sink/sink.c" // NOLINT(bugprone-suspicious-include)
#include "unit_rng.h"

#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "unit_cmocka.h"

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* Renders s[0..n) through put_utf8 and compares with the expected bytes,
 * which may contain NUL, so lengths are explicit. */
static void check_utf8(const char *in, size_t n, const char *want, size_t wn)
{
    sbuf_t b = {0};
    put_utf8(&b, in, n);
    assert_false(b.oom);
    if (b.len != wn || memcmp(b.p, want, wn) != 0) {
        fprintf(stderr, "put_utf8: got %zu bytes:", b.len);
        for (size_t i = 0; i < b.len; i++)
            fprintf(stderr, " %02X", (unsigned char)b.p[i]);
        fprintf(stderr, "\n  want %zu bytes:", wn);
        for (size_t i = 0; i < wn; i++)
            fprintf(stderr, " %02X", (unsigned char)want[i]);
        fprintf(stderr, "\n");
        fail();
    }
    sb_free(&b);
}

#define SAN(in, want) check_utf8(in, sizeof(in) - 1, want, sizeof(want) - 1)
#define FFFD "\xEF\xBF\xBD"

static void check_redact(const char *in, const char *want)
{
    char out[512];
    snk_redact_conninfo(in, out, sizeof out);
    assert_string_equal(out, want);
}

/* ------------------------------------------------------------------------ */
/* A decoder of binary COPY fields, written from the format's documentation */
/* (the COPY page and the types' receive functions), to read back what the  */
/* writers produce.                                                         */
/* ------------------------------------------------------------------------ */

static uint64_t rd_be(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* A binary numeric as a decimal string with its display scale. */
static void numeric_text(const unsigned char *p, size_t len, char *out, size_t cap)
{
    assert_true(len >= 8);
    int nd = (int16_t)rd_be(p, 2), weight = (int16_t)rd_be(p + 2, 2);
    unsigned sign = (unsigned)rd_be(p + 4, 2), dscale = (unsigned)rd_be(p + 6, 2);
    assert_int_equal(len, 8 + 2 * (size_t)nd);
    /* Whole part: digit groups with weight >= 0; fraction: the rest. */
    char whole[64] = "", frac[64] = "";
    for (int w = weight; w >= 0; w--) {
        int idx = weight - w;
        unsigned d = idx < nd ? (unsigned)rd_be(p + 8 + 2 * idx, 2) : 0;
        assert_true(d < 10000);
        snprintf(whole + strlen(whole), sizeof whole - strlen(whole), whole[0] ? "%04u" : "%u", d);
    }
    if (!whole[0])
        strcpy(whole, "0");
    for (int w = -1; (size_t)strlen(frac) < dscale; w--) {
        int idx = weight - w;
        unsigned d = idx >= 0 && idx < nd ? (unsigned)rd_be(p + 8 + 2 * idx, 2) : 0;
        snprintf(frac + strlen(frac), sizeof frac - strlen(frac), "%04u", d);
    }
    frac[dscale] = '\0';
    snprintf(out, cap, "%s%s%s%s", sign == 0x4000 ? "-" : "", whole, dscale ? "." : "", frac);
}

/*
 * Decodes one tuple at *pp (field count, then fields) into '|'-separated
 * text: text as is, integers in decimal, timestamptz as "ts:<ms since
 * 1970>", date as "d:<days since 1970>", numeric as a decimal, booleans as
 * t/f, doubles with %.17g, NULL as "N".
 */
static void decode_row(const unsigned char **pp, const uint32_t *types, size_t ncols, char *out,
                       size_t cap)
{
    const unsigned char *p = *pp;
    assert_int_equal(rd_be(p, 2), ncols);
    p += 2;
    out[0] = '\0';
    for (size_t k = 0; k < ncols; k++) {
        char v[4200];
        int32_t len = (int32_t)rd_be(p, 4);
        p += 4;
        if (len < 0) {
            strcpy(v, "N");
        } else {
            switch (types[k]) {
            case OID_TEXT:
                memcpy(v, p, (size_t)len);
                v[len] = '\0';
                break;
            case OID_INT8:
                assert_int_equal(len, 8);
                snprintf(v, sizeof v, "%" PRId64, (int64_t)rd_be(p, 8));
                break;
            case OID_INT4:
                assert_int_equal(len, 4);
                snprintf(v, sizeof v, "%" PRId32, (int32_t)rd_be(p, 4));
                break;
            case OID_INT2:
                assert_int_equal(len, 2);
                snprintf(v, sizeof v, "%d", (int16_t)rd_be(p, 2));
                break;
            case OID_TIMESTAMPTZ: {
                assert_int_equal(len, 8);
                int64_t us = (int64_t)rd_be(p, 8);
                assert_int_equal(us % 1000, 0);
                snprintf(v, sizeof v, "ts:%" PRId64, (int64_t)(us / 1000 + 946684800000LL));
                break;
            }
            case OID_DATE:
                assert_int_equal(len, 4);
                snprintf(v, sizeof v, "d:%" PRId64, (int64_t)(int32_t)rd_be(p, 4) + 10957);
                break;
            case OID_NUMERIC:
                numeric_text(p, (size_t)len, v, sizeof v);
                break;
            case OID_BOOL:
                assert_int_equal(len, 1);
                snprintf(v, sizeof v, "%s", p[0] ? "t" : "f");
                break;
            case OID_FLOAT8: {
                assert_int_equal(len, 8);
                uint64_t bits = rd_be(p, 8);
                double d;
                memcpy(&d, &bits, sizeof d);
                snprintf(v, sizeof v, "%.17g", d);
                break;
            }
            default:
                fail();
            }
            p += len;
        }
        snprintf(out + strlen(out), cap - strlen(out), "%s%s", k ? "|" : "", v);
    }
    *pp = p;
}

/* Column types of the staging tables, as the server reports them for the
 * schema (the live test checks these against a real server). */
static const uint32_t SESSION_T[] = {
    OID_TEXT, OID_TEXT, OID_TIMESTAMPTZ, OID_TIMESTAMPTZ, OID_INT8, OID_INT8, OID_INT8,
    OID_INT8, OID_INT8, OID_INT8,        OID_NUMERIC,     OID_TEXT, OID_TEXT, OID_INT2};
static const uint32_t USER_T[] = {OID_TEXT,    OID_TIMESTAMPTZ, OID_TIMESTAMPTZ, OID_TEXT,
                                  OID_TEXT,    OID_INT8,        OID_INT8,        OID_INT8,
                                  OID_NUMERIC, OID_TIMESTAMPTZ, OID_TIMESTAMPTZ};
static const uint32_t FUNNEL_T[] = {OID_DATE, OID_TEXT, OID_TEXT, OID_INT8, OID_INT8,
                                    OID_INT8, OID_INT8, OID_INT8, OID_INT8, OID_INT8,
                                    OID_INT8, OID_INT8, OID_INT8, OID_INT8, OID_NUMERIC};
static const uint32_t PARTITION_T[] = {OID_TEXT, OID_INT4, OID_INT8, OID_TIMESTAMPTZ,
                                       OID_INT8, OID_INT8, OID_INT8};
static const uint32_t REJECT_T[] = {OID_TEXT, OID_INT4, OID_INT8,       OID_TEXT,
                                    OID_TEXT, OID_TEXT, OID_TIMESTAMPTZ};

/* Renders one row with fn against the given column types and decodes it;
 * returns fn's verdict (0: the row belongs elsewhere, nothing written). */
static int render(row_fn fn, const void *rows, size_t i, const uint32_t *types, size_t ncols,
                  char *out, size_t cap)
{
    snk_conn_t c;
    memset(&c, 0, sizeof c);
    sbuf_t b = {0};
    cw_t w = {&b, types, ncols, 0, NULL};
    int r = copy_row(&c, &w, "test", rows, i, fn);
    assert_true(r >= 0);
    if (r == 0) {
        assert_int_equal(b.len, 0);
        out[0] = '\0';
    } else {
        const unsigned char *p = (const unsigned char *)b.p;
        decode_row(&p, types, ncols, out, cap);
        assert_ptr_equal(p, (const unsigned char *)b.p + b.len);
    }
    sb_free(&b);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Binary values                                                            */
/* ------------------------------------------------------------------------ */

static void check_cents_bytes(int64_t cents, const char *want, size_t wn)
{
    sbuf_t b = {0};
    bin_cents(&b, cents);
    assert_int_equal(b.len, wn);
    assert_memory_equal(b.p, want, wn);
    sb_free(&b);
}

static void check_cents(int64_t cents, const char *want)
{
    sbuf_t b = {0};
    bin_cents(&b, cents);
    char got[64];
    numeric_text((const unsigned char *)b.p + 4, b.len - 4, got, sizeof got);
    assert_int_equal(rd_be((const unsigned char *)b.p, 4), b.len - 4);
    assert_string_equal(got, want);
    sb_free(&b);
}

static void test_bin_cents(void **state)
{
    (void)state;
    /* Exact bytes: length, ndigits, weight, sign, dscale, digits. */
    check_cents_bytes(0,
                      "\0\0\0\x08"
                      "\0\0"
                      "\0\0"
                      "\0\0"
                      "\0\x02",
                      12);
    /* 123.45: one whole digit (123), one fraction digit (4500), weight 0. */
    check_cents_bytes(12345,
                      "\0\0\0\x0c"
                      "\0\x02"
                      "\0\0"
                      "\0\0"
                      "\0\x02"
                      "\0\x7b"
                      "\x11\x94",
                      16);
    /* -0.05: no whole digit, weight -1, negative. */
    check_cents_bytes(-5,
                      "\0\0\0\x0a"
                      "\0\x01"
                      "\xff\xff"
                      "\x40\0"
                      "\0\x02"
                      "\x01\xf4",
                      14);
    check_cents(5, "0.05");
    check_cents(50, "0.50");
    check_cents(100, "1.00");
    check_cents(-100, "-1.00");
    check_cents(-12345, "-123.45");
    check_cents(1000000, "10000.00");
    check_cents(100000000000000LL, "1000000000000.00");
    check_cents(INT64_MAX, "92233720368547758.07");
    check_cents(INT64_MIN, "-92233720368547758.08");
    /* Against printf over a spread of magnitudes. */
    uint64_t x = 88172645463325252ULL;
    for (int i = 0; i < 100000; i++) {
        ut_xorshift(&x);
        int64_t v = (int64_t)(x >> (x % 60));
        if (i % 2)
            v = -v;
        uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
        char want[64];
        snprintf(want, sizeof want, "%s%" PRIu64 ".%02u", v < 0 ? "-" : "", mag / 100,
                 (unsigned)(mag % 100));
        check_cents(v, want);
    }
}

static void test_bin_time(void **state)
{
    (void)state;
    int64_t us;
    assert_true(ts_micros(946684800000LL, &us));
    assert_int_equal(us, 0);
    assert_true(ts_micros(0, &us));
    assert_int_equal(us, -946684800000000LL);
    assert_true(ts_micros(1709296496789LL, &us));
    assert_int_equal(us, (1709296496789LL - 946684800000LL) * 1000);
    /* Year 1 BC and year 9999 are in range; the ends of int64 are not. */
    assert_true(ts_micros(-62198755200000LL, &us));
    assert_true(ts_micros(253402300799999LL, &us));
    assert_false(ts_micros(INT64_MAX, &us));
    assert_false(ts_micros(INT64_MIN, &us));

    snk_funnel_row_t f = {-1, "*", "*", {1}, {1}, 0, 0};
    char out[512];
    assert_int_equal(render(row_funnel_zero, &f, 0, FUNNEL_T, 3, out, sizeof out), 0);
    assert_int_equal(render(row_funnel, &f, 0, FUNNEL_T, 15, out, sizeof out), 1);
    assert_string_equal(out, "d:-1|*|*|1|0|0|0|0|1|0|0|0|0|0|0.00");
    f.day = 19783;
    render(row_funnel, &f, 0, FUNNEL_T, 15, out, sizeof out);
    assert_string_equal(out, "d:19783|*|*|1|0|0|0|0|1|0|0|0|0|0|0.00");
}

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                    */
/* ------------------------------------------------------------------------ */

static void test_utf8_valid(void **state)
{
    (void)state;
    SAN("", "");
    SAN("plain ascii", "plain ascii");
    SAN("\x01\x1f\x7f", "\x01\x1f\x7f");
    SAN("\xC2\x80 \xDF\xBF", "\xC2\x80 \xDF\xBF");                 /* U+0080, U+07FF */
    SAN("\xE0\xA0\x80 \xEF\xBF\xBF", "\xE0\xA0\x80 \xEF\xBF\xBF"); /* U+0800, U+FFFF */
    SAN("\xED\x9F\xBF \xEE\x80\x80", "\xED\x9F\xBF \xEE\x80\x80"); /* around the surrogates */
    SAN("\xF0\x90\x80\x80 \xF4\x8F\xBF\xBF", "\xF0\x90\x80\x80 \xF4\x8F\xBF\xBF");
    SAN("gr\xC3\xBC\xC3\x9F \xE2\x82\xAC \xF0\x9F\x98\x80",
        "gr\xC3\xBC\xC3\x9F \xE2\x82\xAC \xF0\x9F\x98\x80");
    SAN(FFFD, FFFD);
    /* Binary COPY needs no escaping: structural characters pass unchanged. */
    SAN("a\tb\\c\n\r\\N\\.", "a\tb\\c\n\r\\N\\.");
}

static void test_utf8_invalid(void **state)
{
    (void)state;
    /* NUL bytes. */
    check_utf8("a\0b", 3, "a" FFFD "b", 5);
    check_utf8("\0\0", 2, FFFD FFFD, 6);
    /* Stray continuation bytes and bytes that never occur. */
    SAN("\x80", FFFD);
    SAN("a\xBF\x80z", "a" FFFD FFFD "z");
    SAN("\xFE\xFF", FFFD FFFD);
    SAN("\xF5\x80\x80\x80", FFFD FFFD FFFD FFFD);
    /* Overlong forms: C0/C1 never start a sequence, E0 80..9F and F0 80..8F
     * are rejected at the second byte. */
    SAN("\xC0\x80", FFFD FFFD);
    SAN("\xC1\xBF", FFFD FFFD);
    SAN("\xE0\x80\x80", FFFD FFFD FFFD);
    SAN("\xE0\x9F\xBF", FFFD FFFD FFFD);
    SAN("\xF0\x80\x80\x80", FFFD FFFD FFFD FFFD);
    SAN("\xF0\x8F\xBF\xBF", FFFD FFFD FFFD FFFD);
    /* Surrogates D800..DFFF. */
    SAN("\xED\xA0\x80", FFFD FFFD FFFD);
    SAN("\xED\xBF\xBF", FFFD FFFD FFFD);
    SAN("\xED\xA0\x80\xED\xB0\x80", FFFD FFFD FFFD FFFD FFFD FFFD);
    /* Above U+10FFFF. */
    SAN("\xF4\x90\x80\x80", FFFD FFFD FFFD FFFD);
    SAN("\xF7\xBF\xBF\xBF", FFFD FFFD FFFD FFFD);
    /* Truncated sequences: a maximal valid prefix becomes one U+FFFD. */
    SAN("\xE2\x82", FFFD);
    SAN("\xE2\x82z", FFFD "z");
    SAN("\xF0\x9F\x98", FFFD);
    SAN("\xF0\x9F\x98\xE2\x82\xAC", FFFD "\xE2\x82\xAC");
    SAN("\xC3", FFFD);
    SAN("x\xC3", "x" FFFD);
    SAN("\xC3\xC3\xBC", FFFD "\xC3\xBC");
}

/* ------------------------------------------------------------------------ */
/* Rows and SQL                                                             */
/* ------------------------------------------------------------------------ */

static void test_rows(void **state)
{
    (void)state;
    char out[8192];

    snk_session_row_t s = {"s\t1", "u\\1", 1709296496789LL, 1709296500000LL, 5,    1, 2, 3,
                           4,      5,      -12345,          "mobile",        NULL, 5, 0};
    assert_int_equal(render(row_session, &s, 0, SESSION_T, 14, out, sizeof out), 1);
    assert_string_equal(out, "s\t1|u\\1|ts:1709296496789|ts:1709296500000|5|1|2|3|4|5|-123.45|"
                             "mobile||5");

    snk_user_row_t u = {"u1", 946684800000LL, 946684800001LL, "web", "DE", 3, 2, 0, 0, -1, -1, 0};
    render(row_user, &u, 0, USER_T, 11, out, sizeof out);
    assert_string_equal(out, "u1|ts:946684800000|ts:946684800001|web|DE|3|2|0|0.00|N|N");

    snk_partition_row_t p = {"t", 7, 100, -1, 1, 2, 3};
    render(row_partition, &p, 0, PARTITION_T, 7, out, sizeof out);
    assert_string_equal(out, "t|7|100|N|1|2|3");

    /* Funnel rows go to exactly one of the two stages. */
    snk_funnel_row_t f[2] = {
        {19783, "mobile", "*", {1, 1, 0, 0, 0}, {1, 1, 0, 0, 0}, 0, 0},
        {19783, "*", "*", {0}, {0}, 0, 0},
    };
    assert_int_equal(render(row_funnel, f, 0, FUNNEL_T, 15, out, sizeof out), 1);
    assert_string_equal(out, "d:19783|mobile|*|1|1|0|0|0|1|1|0|0|0|0|0.00");
    assert_int_equal(render(row_funnel, f, 1, FUNNEL_T, 15, out, sizeof out), 0);
    assert_int_equal(render(row_funnel_zero, f, 0, FUNNEL_T, 3, out, sizeof out), 0);
    assert_int_equal(render(row_funnel_zero, f, 1, FUNNEL_T, 3, out, sizeof out), 1);
    assert_string_equal(out, "d:19783|*|*");
    /* Revenue alone keeps a row alive. */
    f[1].revenue_cents = 1;
    assert_int_equal(funnel_is_zero(&f[1]), 0);

    /* Generic rows: every type letter, NULLs and a NaN (written as NULL). */
    static const uint32_t gt[] = {OID_TEXT,   OID_TIMESTAMPTZ, OID_DATE, OID_NUMERIC,
                                  OID_BOOL,   OID_FLOAT8,      OID_INT4, OID_INT8,
                                  OID_FLOAT8, OID_TIMESTAMPTZ};
    snk_val_t v[10] = {{.s = "x"}, {.i = 0},  {.i = 10957},     {.i = 1},   {.i = 1},
                       {.f = 0.1}, {.i = -7}, {.i = INT64_MIN}, {.f = NAN}, {.null = 1}};
    gen_rows_t g = {"tsdmbfiifs", 10, v};
    render(row_generic, &g, 0, gt, 10, out, sizeof out);
    assert_string_equal(out, "x|ts:0|d:10957|0.01|t|0.10000000000000001|-7|-9223372036854775808|"
                             "N|N");
}

/* A value that does not suit its column fails the row (and the flush) with
 * a message instead of sending bytes the server would misread. */
static void test_type_mismatch(void **state)
{
    (void)state;
    snk_conn_t c;
    memset(&c, 0, sizeof c);
    sbuf_t b = {0};
    snk_partition_row_t p = {"t", 7, 100, -1, 1, 2, 3};
    uint32_t types[7];
    memcpy(types, PARTITION_T, sizeof types);

    /* An int column gets 4 bytes, a smallint 2, and a value that does not fit fails. */
    cw_t w = {&b, types, 7, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &p, 0, row_partition), 1);
    types[1] = OID_INT2;
    p.partition = 40000;
    w = (cw_t){&b, types, 7, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &p, 0, row_partition), SNK_EQUERY);
    assert_non_null(strstr(c.err, "out of its column's range"));

    /* A timestamp for a text column. */
    memcpy(types, PARTITION_T, sizeof types);
    types[3] = OID_TEXT;
    p.partition = 1;
    p.watermark = 5;
    w = (cw_t){&b, types, 7, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &p, 0, row_partition), SNK_EQUERY);
    assert_non_null(strstr(c.err, "not timestamptz"));

    /* Too few and too many columns. */
    memcpy(types, PARTITION_T, sizeof types);
    w = (cw_t){&b, types, 6, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &p, 0, row_partition), SNK_EQUERY);
    assert_non_null(strstr(c.err, "more fields than columns"));
    snk_funnel_row_t f = {1, "*", "*", {0}, {0}, 0, 0};
    w = (cw_t){&b, FUNNEL_T, 4, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &f, 0, row_funnel_zero), SNK_EQUERY);
    assert_non_null(strstr(c.err, "fewer fields than columns"));

    /* Days shift by 10 957 to count from 2000; one that would leave int32 fails. */
    snk_funnel_row_t far = {0, "*", "*", {1}, {1}, 0, 0};
    far.day = INT32_MAX - 1; /* still an int32 after the shift to 2000 */
    w = (cw_t){&b, FUNNEL_T, 15, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &far, 0, row_funnel), 1);
    b.len = 0;
    far.day = INT32_MIN + 5;
    w = (cw_t){&b, FUNNEL_T, 15, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &far, 0, row_funnel), SNK_EQUERY);
    assert_non_null(strstr(c.err, "out of date's range"));

    /* A timestamp beyond timestamptz's range. */
    p.watermark = INT64_MAX;
    w = (cw_t){&b, types, 7, 0, NULL};
    assert_int_equal(copy_row(&c, &w, "t", &p, 0, row_partition), SNK_EQUERY);
    assert_non_null(strstr(c.err, "out of timestamptz's range"));
    sb_free(&b);
}

static void test_reject_payload(void **state)
{
    (void)state;
    char out[8192];
    /* 4095 'x' then a euro sign: the cut at 4096 leaves its first byte. */
    char big[5000];
    static const char tail[] = "\xE2\x82\xAC tail";
    memset(big, 'x', 4095);
    memcpy(big + 4095, tail, sizeof tail - 1); /* no NUL: the payload's length is explicit */
    snk_reject_row_t r = {"t", 0, 42, "invalid_json", NULL, big, 4103, 0};
    render(row_reject, &r, 0, REJECT_T, 7, out, sizeof out);
    const char *pre = "t|0|42|invalid_json||";
    assert_int_equal(strlen(out), strlen(pre) + 4095 + 3 + 5);
    assert_memory_equal(out, pre, strlen(pre));
    assert_string_equal(out + strlen(pre) + 4095, FFFD "|ts:0");

    static const char p2[] = "{\"a\":\"\xFF\0\n\"}";
    snk_reject_row_t r2 = {"t", 1, 7, "bad_value", "ts", p2, sizeof p2 - 1, 1000};
    render(row_reject, &r2, 0, REJECT_T, 7, out, sizeof out);
    assert_string_equal(out, "t|1|7|bad_value|ts|{\"a\":\"" FFFD FFFD "\n\"}|ts:1000");

    snk_reject_row_t r3 = {"t", 1, 8, "invalid_json", "", NULL, 5, 0};
    render(row_reject, &r3, 0, REJECT_T, 7, out, sizeof out);
    assert_string_equal(out, "t|1|8|invalid_json|||ts:0");
}

static void test_sql(void **state)
{
    (void)state;
    snk_conn_t c;
    memset(&c, 0, sizeof c);
    char q[] = "\"cm\"";
    c.schema_q = q;

    assert_string_equal(sql_apply(&c, &TABLES[T_SESSIONS_DEL]),
                        "DELETE FROM \"cm\".sessions WHERE session_id = ANY (ARRAY(SELECT "
                        "session_id FROM pg_temp.cm_stage_sessions_del))");
    assert_string_equal(sql_apply(&c, &TABLES[T_FUNNEL_DEL]),
                        "DELETE FROM \"cm\".funnel_daily t USING pg_temp.cm_stage_funnel_del d "
                        "WHERE t.day = d.day AND t.device = d.device AND t.country = d.country");
    assert_string_equal(
        sql_apply(&c, &TABLES[T_PARTITIONS]),
        "INSERT INTO \"cm\".partitions (topic, partition, next_offset, watermark, accepted, "
        "duplicates, rejected, flushed_at) SELECT topic, partition, next_offset, watermark, "
        "accepted, duplicates, rejected, now() FROM pg_temp.cm_stage_partitions ORDER BY topic, "
        "partition ON CONFLICT (topic, partition) DO UPDATE SET next_offset = "
        "EXCLUDED.next_offset, watermark = "
        "EXCLUDED.watermark, accepted = EXCLUDED.accepted, duplicates = EXCLUDED.duplicates, "
        "rejected = EXCLUDED.rejected, flushed_at = EXCLUDED.flushed_at");
    assert_string_equal(sql_apply(&c, &TABLES[T_REJECTS]),
                        "INSERT INTO \"cm\".rejected_events (topic, partition, kafka_offset, "
                        "reason, detail, payload, rejected_at) SELECT topic, partition, "
                        "kafka_offset, reason, detail, payload, rejected_at FROM "
                        "pg_temp.cm_stage_rejects ORDER BY topic, partition, kafka_offset ON "
                        "CONFLICT (topic, partition, kafka_offset) DO NOTHING");
    const char *up = sql_apply(&c, &TABLES[T_SESSIONS]);
    /* Staged rows go in key order (the primary key's B-tree is then filled leaf by leaf). */
    assert_non_null(strstr(up, "FROM pg_temp.cm_stage_sessions ORDER BY session_id ON CONFLICT "));
    assert_non_null(strstr(up, "ON CONFLICT (session_id) DO UPDATE SET user_id = "
                               "EXCLUDED.user_id, started_at = EXCLUDED.started_at"));
    assert_non_null(strstr(up, "funnel_stage = EXCLUDED.funnel_stage"));
    assert_null(strstr(up, "session_id = EXCLUDED"));
    /* An unchanged row is not written again; partitions (flushed_at) always is. */
    assert_non_null(strstr(up, "INSERT INTO \"cm\".sessions AS t (session_id, user_id, "));
    assert_non_null(strstr(up, "funnel_stage = EXCLUDED.funnel_stage WHERE (t.user_id, "
                               "t.started_at, "));
    assert_non_null(strstr(up, ", t.funnel_stage) IS DISTINCT FROM (EXCLUDED.user_id, "
                               "EXCLUDED.started_at, "));
    const char *tail = ", EXCLUDED.funnel_stage)";
    assert_true(strlen(up) > strlen(tail));
    assert_string_equal(up + strlen(up) - strlen(tail), tail);

    /* Migrations are strictly increasing so that "apply the missing ones in
     * order" is well defined. */
    for (size_t m = 1; m < sizeof MIGRATIONS / sizeof MIGRATIONS[0]; m++)
        assert_true(MIGRATIONS[m].version > MIGRATIONS[m - 1].version);
    assert_int_equal(MIGRATIONS[0].version, 1);

    sbuf_t b = {0};
    sb_sql(&b, "A {S}.x {S}{S} z", "\"s\"");
    assert_string_equal(sb_cstr(&b), "A \"s\".x \"s\"\"s\" z");
    sb_free(&b);
    sb_free(&c.sql);
}

/* ------------------------------------------------------------------------ */
/* Conninfo, schema names, errors                                           */
/* ------------------------------------------------------------------------ */

static void test_redact_kv(void **state)
{
    (void)state;
    check_redact("host=db password=secret dbname=x", "host=db password=*** dbname=x");
    check_redact("password=secret", "password=***");
    check_redact("  host = db   password =  secret  ", "  host = db   password =  ***  ");
    check_redact("password='sec ret' user=u", "password=*** user=u");
    check_redact("password='it\\'s secret' user=u", "password=*** user=u");
    check_redact("password=sec\\ ret user=u", "password=*** user=u");
    check_redact("user=u sslpassword=keypass sslmode=require",
                 "user=u sslpassword=*** sslmode=require");
    check_redact("host=db user=u", "host=db user=u");
    check_redact("host='my host' user=u", "host='my host' user=u");
    check_redact("", "");
    /* An unterminated quote or a missing '=' hides the rest. */
    check_redact("user=u password='secret", "user=u password=***");
    check_redact("user=u secretword", "user=u ***");
    /* Keywords are whole words: these are not passwords. */
    check_redact("passwordx=a xpassword=b", "passwordx=a xpassword=b");

    char small[12];
    snk_redact_conninfo("password=secretsecret", small, sizeof small);
    assert_string_equal(small, "password=**");
    snk_redact_conninfo("host=x", small, 1);
    assert_string_equal(small, "");
    snk_redact_conninfo(NULL, small, sizeof small);
    assert_string_equal(small, "");
}

static void test_redact_uri(void **state)
{
    (void)state;
    check_redact("postgresql://u:secret@db:5432/x", "postgresql://u:***@db:5432/x");
    check_redact("postgres://u:secret@db/x?sslmode=require",
                 "postgres://u:***@db/x?sslmode=require");
    check_redact("postgresql://u@db/x", "postgresql://u@db/x");
    check_redact("postgresql://db/x", "postgresql://db/x");
    check_redact("postgresql://", "postgresql://");
    check_redact("postgresql://u:@db", "postgresql://u:***@db");
    check_redact("postgresql://u:p%40ss@h1:5432,h2:5433/x", "postgresql://u:***@h1:5432,h2:5433/x");
    check_redact("postgresql://db/x?user=u&password=secret&sslmode=require",
                 "postgresql://db/x?user=u&password=***&sslmode=require");
    check_redact("postgresql://db?password=secret", "postgresql://db?password=***");
    check_redact("postgresql://u:secret@db?sslpassword=kp",
                 "postgresql://u:***@db?sslpassword=***");
    /* A raw '@' in the password: everything up to the last '@' is hidden. */
    check_redact("postgresql://u:se@cret@db/x", "postgresql://u:***@db/x");
}

static void test_schema_names(void **state)
{
    (void)state;
    assert_true(valid_schema("clickmart"));
    assert_true(valid_schema("_"));
    assert_true(valid_schema("a1_b2"));
    char max[64];
    memset(max, 'a', 63);
    max[63] = '\0';
    assert_true(valid_schema(max));

    const char *bad[] = {"", "Clickmart", "1abc", "a-b", "a b", "a.b", "a\"b", "ü", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snk_conn_t *c = (snk_conn_t *)&c;
        /* The conninfo points nowhere: validation must fail before connecting. */
        assert_int_equal(snk_open("host=/nonexistent port=1", bad[i], &c), SNK_EINVAL);
        assert_null(c);
        assert_non_null(strstr(snk_last_error(NULL), "schema"));
    }
    char toolong[65];
    memset(toolong, 'a', 64);
    toolong[64] = '\0';
    snk_conn_t *c = NULL;
    assert_int_equal(snk_open("", toolong, &c), SNK_EINVAL);
    assert_null(c);
    assert_int_equal(snk_open("", "ok", NULL), SNK_EINVAL);
}

static void test_open_errors(void **state)
{
    (void)state;
    snk_conn_t *c = NULL;
    /* A malformed conninfo is rejected without echoing its text. */
    assert_int_equal(snk_open("host=x hunter2secret", "cm", &c), SNK_EINVAL);
    assert_null(c);
    assert_null(strstr(snk_last_error(NULL), "hunter2secret"));
    assert_non_null(strstr(snk_last_error(NULL), "invalid connection string"));
    /* The same check without connecting, as the daemon makes it at start. */
    assert_int_equal(snk_check_conf("host='x password=hunter2secret", "cm"), SNK_EINVAL);
    assert_null(strstr(snk_last_error(NULL), "hunter2secret"));
    assert_non_null(strstr(snk_last_error(NULL), "invalid connection string"));
    assert_int_equal(snk_check_conf("host=/nowhere port=1", "Bad"), SNK_EINVAL);
    assert_non_null(strstr(snk_last_error(NULL), "invalid schema name"));
    assert_int_equal(snk_check_conf("host=/nowhere port=1", "cm"), 0);
    assert_int_equal(snk_check_conf(NULL, "cm"), 0);
    assert_string_equal(snk_last_error(NULL), "");

    /* A server that is not there: ECONNECT, with libpq's reason. */
    assert_int_equal(
        snk_open("host=/nonexistent-dir port=1 password=hunter2secret connect_timeout=2", "cm", &c),
        SNK_ECONNECT);
    assert_null(c);
    assert_true(strlen(snk_last_error(NULL)) > 0);
    assert_null(strstr(snk_last_error(NULL), "hunter2secret"));
    assert_null(strchr(snk_last_error(NULL), '\n'));

    assert_int_equal(snk_flush(NULL, NULL), SNK_EINVAL);
    assert_int_equal(snk_flush_part(NULL, NULL), SNK_EINVAL);
    assert_int_equal(snk_migrate(NULL), SNK_EINVAL);
    assert_int_equal(snk_ok(NULL), 0);
    snk_close(NULL);
}

static void test_store_err(void **state)
{
    (void)state;
    char out[64];
    store_err(out, sizeof out, "s3cret", "step", "ERROR:  bad s3cret here\nDETAIL: x\n");
    assert_string_equal(out, "step: ERROR: bad *** here DETAIL: x");
    store_err(out, 8, NULL, "step", "message");
    assert_string_equal(out, "step: m");
    char safe[64];
    hide_quoted("missing \"=\" after \"pw\" in connection info string", safe, sizeof safe);
    assert_string_equal(safe, "missing \"=\" after \"***\" in connection info string");
    hide_quoted("unterminated \"quote", safe, sizeof safe);
    assert_string_equal(safe, "unterminated \"quote");
    hide_quoted("\"longsecret\" tail", safe, 4);
    assert_string_equal(safe, "\"**");
}

/* Which failures are worth the same work again (snk_transient). */
static void test_transient(void **state)
{
    (void)state;
    assert_true(snk_transient(NULL));
    snk_conn_t c;
    memset(&c, 0, sizeof c);
    assert_false(snk_transient(&c));
    static const char *again[] = {"55P03", "40P01", "40001", "57014",
                                  "57P01", "08006", "25006", "53300"};
    for (size_t i = 0; i < sizeof again / sizeof again[0]; i++) {
        snprintf(c.sqlstate, sizeof c.sqlstate, "%s", again[i]);
        assert_true(snk_transient(&c));
    }
    /* A column a view reads (0A000), a duplicate key, a syntax error, a
     * missing privilege: the same statement fails again. */
    static const char *not_again[] = {"0A000", "23505", "42601", "42501", "55000"};
    for (size_t i = 0; i < sizeof not_again / sizeof not_again[0]; i++) {
        snprintf(c.sqlstate, sizeof c.sqlstate, "%s", not_again[i]);
        assert_false(snk_transient(&c));
    }
    c.sqlstate[0] = '\0';
    c.broken = 1;
    assert_true(snk_transient(&c));
}

static void test_strerror(void **state)
{
    (void)state;
    const int codes[] = {0,          SNK_ECONNECT, SNK_EQUERY, SNK_ENOMEM,
                         SNK_EINVAL, SNK_ERESTART, SNK_EGATE,  -99};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        assert_non_null(snk_strerror(codes[i]));
        assert_true(strlen(snk_strerror(codes[i])) > 0);
    }
    assert_string_not_equal(snk_strerror(SNK_EQUERY), snk_strerror(SNK_ECONNECT));
}

/* ------------------------------------------------------------------------ */
/* Live test against Postgres (CLICKMART_TEST_PG)                           */
/* ------------------------------------------------------------------------ */

static char live_schema[64];

/* Runs a query on the checking connection and returns the single value of
 * its single row as a static string ("<NULL>" for NULL, "<none>" for no
 * row); the length of binary-unsafe text is in *len. */
static const char *q1(PGconn *pg, const char *fmt, ...)
{
    static char val[65536];
    char sql[4096];
    char tmpl[4096];
    /* "{S}" is the test schema, as in sink.c. */
    const char *p = fmt;
    size_t o = 0;
    while (*p && o + 70 < sizeof tmpl) {
        if (strncmp(p, "{S}", 3) == 0) {
            o += (size_t)snprintf(tmpl + o, sizeof tmpl - o, "%s", live_schema);
            p += 3;
        } else {
            tmpl[o++] = *p++;
        }
    }
    tmpl[o] = '\0';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, tmpl, ap);
    va_end(ap);
    PGresult *res = PQexec(pg, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "query failed: %s\n%s", sql, PQresultErrorMessage(res));
        PQclear(res);
        fail();
    }
    if (PQntuples(res) == 0)
        snprintf(val, sizeof val, "<none>");
    else if (PQgetisnull(res, 0, 0))
        snprintf(val, sizeof val, "<NULL>");
    else
        snprintf(val, sizeof val, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    return val;
}

static void exec_or_fail(PGconn *pg, const char *sql)
{
    PGresult *res = PQexec(pg, sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "statement failed: %s\n%s", sql, PQresultErrorMessage(res));
        PQclear(res);
        fail();
    }
    PQclear(res);
}

/* Append s to the string in buf (cap bytes); the test fails if it does not fit. */
static void append(char *buf, size_t cap, const char *s)
{
    size_t n = strlen(buf), k = strlen(s);
    assert_true(n + k < cap);
    memcpy(buf + n, s, k + 1);
}

/* A digest of every table except the flush time, to compare flushes. */
static char *snapshot(PGconn *pg)
{
    char buf[1024] = "";
    const char *tables[] = {"sessions", "users", "funnel_daily", "rejected_events"};
    for (size_t i = 0; i < 4; i++) {
        append(buf, sizeof buf,
               q1(pg,
                  "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY "
                  "t::text)), '') FROM {S}.%s t",
                  tables[i]));
        append(buf, sizeof buf, " ");
    }
    append(buf, sizeof buf,
           q1(pg, "SELECT string_agg(concat_ws(',', topic, partition, next_offset, "
                  "watermark, accepted, duplicates, rejected), '|' ORDER BY topic, "
                  "partition) FROM {S}.partitions"));
    return strdup(buf);
}

static int64_t live_ms(const char *val)
{
    return strtoll(val, NULL, 10);
}

/* Flushes b, which must succeed without an error left behind; then
 * snk_flush_redone(c) must be `redone`, the query q (a q1 template: "{S}"
 * for the schema, "%%" for "%") must return `want`, and partition 0's
 * next_offset be `next` (unless NULL). */
static void flush_check(snk_conn_t *c, PGconn *adm, const snk_batch_t *b, uint64_t redone,
                        const char *q, const char *want, const char *next)
{
    assert_int_equal(snk_flush(c, b), 0);
    assert_int_equal(snk_flush_redone(c), redone);
    assert_string_equal(snk_last_error(c), "");
    assert_string_equal(q1(adm, q), want);
    if (next)
        assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                            next);
}

/* A batch of n session rows and one partition row. */
static snk_batch_t session_batch(const snk_session_row_t *s, size_t n, const snk_partition_row_t *p)
{
    snk_batch_t b = {0};
    b.sessions = s;
    b.n_sessions = n;
    b.partitions = p;
    b.n_partitions = 1;
    return b;
}

/* The checking connection of a live test, whose schema (live_schema) is
 * named prefix_<pid>, and in *ci the server's conninfo. Without a server
 * (CLICKMART_TEST_PG unset) the test is skipped: cmocka's skip() leaves it. */
static PGconn *live_admin(const char *prefix, const char **ci)
{
    *ci = getenv("CLICKMART_TEST_PG");
    if (!*ci || !**ci) {
        skip();
        return NULL;
    }
    snprintf(live_schema, sizeof live_schema, "%s_%ld", prefix, (long)getpid());
    PGconn *adm = PQconnectdb(*ci);
    assert_int_equal(PQstatus(adm), CONNECTION_OK);
    PQsetNoticeProcessor(adm, notice_ignore, NULL);
    return adm;
}

/* A commit gate for the live test: counts its calls, looks whether a row
 * of the flush is already visible to another session, and answers. */
typedef struct {
    PGconn *adm;
    int calls;
    int answer;
    char seen[16];
} gate_t;

static int test_gate(void *arg)
{
    gate_t *g = arg;
    g->calls++;
    snprintf(g->seen, sizeof g->seen, "%s",
             q1(g->adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's11'"));
    return g->answer;
}

static void test_live(void **state)
{
    (void)state;
    const char *ci;
    PGconn *adm = live_admin("cm_sink_test", &ci);
    char sql[512];
    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE", live_schema);
    exec_or_fail(adm, sql);

    /* The caller's client_encoding cannot override UTF8. */
    char ci2[1024];
    snprintf(ci2, sizeof ci2, "%s client_encoding=LATIN1", ci);
    snk_conn_t *c = NULL;
    int rc = snk_open(ci2, live_schema, &c);
    if (rc != 0)
        fprintf(stderr, "snk_open: %s\n", snk_last_error(NULL));
    assert_int_equal(rc, 0);
    assert_true(snk_ok(c));
    assert_string_equal(PQparameterStatus(c->pg, "client_encoding"), "UTF8");
    assert_string_equal(PQparameterStatus(c->pg, "TimeZone"), "UTC");
    assert_string_equal(PQparameterStatus(c->pg, "application_name"), "clickmartd");

    /* Migration is idempotent, also from a second connection. */
    assert_int_equal(snk_migrate(c), 0);
    assert_int_equal(snk_migrate(c), 0);
    snk_conn_t *c2 = NULL;
    assert_int_equal(snk_open(ci, live_schema, &c2), 0);
    assert_int_equal(snk_migrate(c2), 0);
    snk_close(c2);
    /* Every migration applied once, in order. */
    char want[256] = "";
    for (size_t m = 0; m < sizeof MIGRATIONS / sizeof MIGRATIONS[0]; m++)
        snprintf(want + strlen(want), sizeof want - strlen(want), "%s%d", m ? "," : "",
                 MIGRATIONS[m].version);
    assert_string_equal(q1(adm, "SELECT string_agg(version::text, ',' ORDER BY version) "
                                "FROM {S}.schema_version"),
                        want);
    /* schema_version, the 5 tables of migration 1, the 4 of migration 2 and
     * the 5 of migration 3. */
    assert_string_equal(q1(adm, "SELECT count(*) FROM pg_tables WHERE schemaname = '{S}'"), "15");
    /* Migration 5: the tables whose rows every flush rewrites leave room on
     * each page for HOT updates. */
    assert_string_equal(q1(adm,
                           "SELECT string_agg(c.relname || ':' || array_to_string(c.reloptions, "
                           "','), ' ' ORDER BY c.relname) FROM pg_class c JOIN pg_namespace n "
                           "ON n.oid = c.relnamespace WHERE n.nspname = '{S}' AND "
                           "c.reloptions IS NOT NULL"),
                        "user_outcomes:fillfactor=80 users:fillfactor=80");

    /* --- A batch touching every table. --- */
    const int64_t t0 = 1709296496789LL; /* 2024-03-01 12:34:56.789 */
    snk_session_row_t sessions[] = {
        {"s1", "u1", t0, t0 + 60000, 3, 1, 1, 1, 0, 0, 0, "mobile", "DE", 3, 0},
        {"s2", "u\xC3\xBC\t\\2\n", t0 + 1, t0 + 2, 2, 0, 1, 1, 1, 1, 12345, "web", "FR", 5, 0},
    };
    snk_user_row_t users[] = {
        {"u1", t0, t0 + 60000, "mobile", "DE", 3, 1, 0, 0, -1, -1, 0},
        {"u\xC3\xBC\t\\2\n", t0 + 1, t0 + 2, "web", "FR", 2, 1, 1, 12345, t0 + 2, t0 + 2, 0},
    };
    snk_funnel_row_t funnel[] = {
        {19783, "mobile", "DE", {1, 1, 1, 0, 0}, {1, 1, 1, 0, 0}, 0, 0},
        {19783, "*", "*", {2, 2, 2, 1, 1}, {2, 2, 2, 1, 1}, 1, 12345},
        /* A zero row for a key that does not exist: deleting it is a no-op. */
        {19784, "*", "*", {0}, {0}, 0, 0},
    };
    snk_partition_row_t parts[] = {
        {"clickmart.events", 0, 100, t0 + 2, 90, 5, 5},
        {"clickmart.events", 1, 0, -1, 0, 0, 0},
    };
    static char big[6000];
    memset(big, 'y', sizeof big);
    static const char bad_payload[] = "{\"a\":\"\xFF\xC0\x80\0z\xE2\x82\"}";
    snk_reject_row_t rejects[] = {
        {"clickmart.events", 0, 3, "invalid_json", "", bad_payload, sizeof bad_payload - 1, t0},
        {"clickmart.events", 0, 4, "payload_too_large", "", big, sizeof big, t0 + 1},
    };
    snk_batch_t b1 = {0};
    b1.sessions = sessions;
    b1.n_sessions = 2;
    b1.users = users;
    b1.n_users = 2;
    b1.funnel = funnel;
    b1.n_funnel = 3;
    b1.partitions = parts;
    b1.n_partitions = 2;
    b1.rejects = rejects;
    b1.n_rejects = 2;
    rc = snk_flush(c, &b1);
    if (rc != 0)
        fprintf(stderr, "snk_flush: %s\n", snk_last_error(c));
    assert_int_equal(rc, 0);

    /* Values arrive exactly. */
    assert_int_equal(live_ms(q1(adm, "SELECT (extract(epoch FROM started_at) * 1000)::bigint FROM "
                                     "{S}.sessions WHERE session_id = 's1'")),
                     t0);
    assert_string_equal(
        q1(adm, "SELECT started_at::text FROM {S}.sessions WHERE session_id = 's1'"),
        "2024-03-01 12:34:56.789+00");
    assert_string_equal(q1(adm, "SELECT concat_ws('|', user_id, revenue, device, country, "
                                "funnel_stage, events, purchases) FROM {S}.sessions WHERE "
                                "session_id = 's2'"),
                        "u\xC3\xBC\t\\2\n|123.45|web|FR|5|2|1");
    assert_string_equal(q1(adm, "SELECT coalesce(first_order_at::text, 'null') || '|' || revenue "
                                "FROM {S}.users WHERE user_id = 'u1'"),
                        "null|0.00");
    assert_string_equal(q1(adm, "SELECT first_order_at::text FROM {S}.users WHERE orders = 1"),
                        "2024-03-01 12:34:56.791+00");
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.funnel_daily"), "2");
    assert_string_equal(q1(adm, "SELECT concat_ws('|', day, sessions, sessions_product_view, "
                                "sessions_add_to_cart, sessions_checkout, sessions_purchase, "
                                "users, users_purchase, orders, revenue) FROM {S}.funnel_daily "
                                "WHERE device = '*'"),
                        "2024-03-01|2|2|2|1|1|2|1|1|123.45");
    assert_string_equal(q1(adm, "SELECT coalesce(watermark::text, 'null') FROM {S}.partitions "
                                "WHERE partition = 1"),
                        "null");
    assert_string_equal(q1(adm, "SELECT watermark::text || '|' || next_offset FROM {S}.partitions "
                                "WHERE partition = 0"),
                        "2024-03-01 12:34:56.791+00|100");
    assert_string_equal(q1(adm, "SELECT payload FROM {S}.rejected_events WHERE kafka_offset = 3"),
                        "{\"a\":\"" FFFD FFFD FFFD FFFD "z" FFFD "\"}");
    assert_string_equal(q1(adm, "SELECT octet_length(payload) || '|' || rejected_at FROM "
                                "{S}.rejected_events WHERE kafka_offset = 4"),
                        "4096|2024-03-01 12:34:56.79+00");

    /* The same batch again changes nothing but flushed_at. */
    char *snap1 = snapshot(adm);
    char *fl1 = strdup(q1(adm, "SELECT max(flushed_at)::text FROM {S}.partitions"));
    usleep(2000);
    assert_int_equal(snk_flush(c, &b1), 0);
    char *snap2 = snapshot(adm);
    assert_string_equal(snap1, snap2);
    assert_string_not_equal(fl1, q1(adm, "SELECT max(flushed_at)::text FROM {S}.partitions"));
    free(snap1);
    free(snap2);
    free(fl1);

    /* --- A session merged away and a funnel row that fell to zero. --- */
    const char *gone[] = {"s1"};
    snk_funnel_row_t zero = {19783, "mobile", "DE", {0}, {0}, 0, 0};
    snk_partition_row_t p2 = {"clickmart.events", 0, 110, t0 + 2, 95, 5, 10};
    snk_batch_t b2 = {0};
    b2.deleted_sessions = gone;
    b2.n_deleted_sessions = 1;
    b2.funnel = &zero;
    b2.n_funnel = 1;
    b2.partitions = &p2;
    b2.n_partitions = 1;
    assert_int_equal(snk_flush(c, &b2), 0);
    assert_string_equal(q1(adm, "SELECT string_agg(session_id, ',') FROM {S}.sessions"), "s2");
    assert_string_equal(q1(adm, "SELECT string_agg(device, ',') FROM {S}.funnel_daily"), "*");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "110");

    /* Deletes run before upserts: an id deleted and written in one batch stays. */
    snk_session_row_t s3 = {"s3", "u1", t0, t0, 1, 1, 0, 0, 0, 0, 0, "mobile", "DE", 1, 0};
    const char *gone3[] = {"s3", "no-such-session"};
    snk_batch_t b3 = {0};
    b3.sessions = &s3;
    b3.n_sessions = 1;
    b3.deleted_sessions = gone3;
    b3.n_deleted_sessions = 2;
    assert_int_equal(snk_flush(c, &b3), 0);
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's3'"), "1");

    /* A failing statement rolls back the whole batch and leaves the
     * connection usable: two rows with one key make the upsert fail. */
    snk_session_row_t dup[] = {
        {"s4", "u1", t0, t0, 1, 1, 0, 0, 0, 0, 0, "mobile", "DE", 1, 0},
        {"s4", "u1", t0, t0, 2, 1, 0, 0, 0, 0, 0, "mobile", "DE", 1, 0},
    };
    snk_partition_row_t p3 = {"clickmart.events", 0, 999, t0 + 2, 95, 5, 10};
    snk_batch_t b4 = {0};
    b4.sessions = dup;
    b4.n_sessions = 2;
    b4.partitions = &p3;
    b4.n_partitions = 1;
    b4.deleted_sessions = gone3;
    b4.n_deleted_sessions = 1;
    assert_int_equal(snk_flush(c, &b4), SNK_EQUERY);
    assert_true(strlen(snk_last_error(c)) > 0);
    assert_true(snk_ok(c));
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "110");
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id IN ('s3', "
                                "'s4')"),
                        "1");
    b4.n_sessions = 1;
    assert_int_equal(snk_flush(c, &b4), 0);
    assert_string_equal(snk_last_error(c), "");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "999");

    /* --- New sessions are COPYed straight into the table. --- */
    snk_session_row_t fresh[] = {
        {"s5", "u1", t0 + 5, t0 + 6, 2, 2, 0, 0, 0, 0, 0, "web", "DE", 1, 1},
        {"s2", "u1", t0 + 1, t0 + 9, 3, 1, 1, 1, 0, 0, 0, "web", "FR", 3, 0},
        {"s3", "u1", t0, t0 + 3, 2, 2, 0, 0, 0, 0, 0, "mobile", "DE", 1, 1},
    };
    snk_partition_row_t pn5 = {"clickmart.events", 0, 1000, t0 + 9, 96, 5, 10};
    snk_batch_t bn5 = session_batch(fresh, 2, &pn5);
    flush_check(c, adm, &bn5, 0,
                "SELECT string_agg(concat_ws('|', session_id, user_id, events, "
                "ended_at = started_at + interval '1 ms'), ',' ORDER BY "
                "session_id) FROM {S}.sessions WHERE session_id IN ('s2', 's5')",
                "s2|u1|3|f,s5|u1|2|t", NULL);
    /* A new id that a merge deleted in the same batch: the deletes run first. */
    bn5.sessions = fresh + 2;
    bn5.n_sessions = 1;
    bn5.deleted_sessions = gone3;
    bn5.n_deleted_sessions = 1;
    flush_check(c, adm, &bn5, 0, "SELECT events FROM {S}.sessions WHERE session_id = 's3'", "2",
                NULL);
    /* Rows taken for new that Postgres already holds (a flush committed
     * there whose commit the state never recorded): the flush is redone
     * with upserts and writes the same result. */
    snk_session_row_t again[] = {
        {"s5", "u1", t0 + 5, t0 + 7, 4, 3, 1, 0, 0, 0, 0, "web", "DE", 2, 1},
        {"s6", "u1", t0 + 8, t0 + 8, 1, 1, 0, 0, 0, 0, 0, "web", "DE", 1, 1},
    };
    snk_partition_row_t pn6 = {"clickmart.events", 0, 1001, t0 + 9, 97, 5, 10};
    snk_batch_t bn6 = session_batch(again, 2, &pn6);
    flush_check(c, adm, &bn6, 1,
                "SELECT string_agg(session_id || '|' || events, ',' ORDER BY "
                "session_id) FROM {S}.sessions WHERE session_id IN ('s5', 's6')",
                "s5|4,s6|1", "1001");
    /* A key repeated among the new rows also violates the primary key; the
     * redo then fails on the repeated key (keys must be unique within a
     * list), and nothing of the flush is written. */
    again[1].session_id = "s7";
    snk_session_row_t twice[] = {again[1], again[1]};
    pn6.next_offset = 1002;
    bn6.sessions = twice;
    assert_int_equal(snk_flush(c, &bn6), SNK_EQUERY);
    assert_int_equal(snk_flush_redone(c), 2);
    assert_non_null(strstr(snk_last_error(c), "second time"));
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's7'"), "0");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1001");

    /* --- New users too are COPYed straight into the table, beside an
     * update of a known one. --- */
    snk_user_row_t nus[] = {
        {"nu1", t0, t0 + 1, "web", "DE", 2, 1, 0, 0, -1, -1, 1},
        {"u1", t0, t0 + 70000, "mobile", "DE", 4, 1, 0, 0, -1, -1, 0},
    };
    snk_partition_row_t pn7 = {"clickmart.events", 0, 1002, t0 + 9, 98, 5, 10};
    snk_batch_t bn7 = {0};
    bn7.users = nus;
    bn7.n_users = 2;
    bn7.partitions = &pn7;
    bn7.n_partitions = 1;
    const char *uq = "SELECT string_agg(user_id || '|' || events, ',' ORDER BY user_id) FROM "
                     "{S}.users WHERE user_id IN ('nu1', 'nu2', 'u1')";
    flush_check(c, adm, &bn7, 2, uq, "nu1|2,u1|4", "1002");
    /* A user taken for new that Postgres already holds: redone with
     * upserts, like the sessions. */
    nus[0].events = 5;
    nus[1].is_new = 1;
    nus[1].user_id = "nu2";
    pn7.next_offset = 1003;
    flush_check(c, adm, &bn7, 3, uq, "nu1|5,nu2|4,u1|4", "1003");

    /* --- New rows of a generic table: COPYed straight into user_exposure
     * beside an upsert; one that Postgres already holds makes the flush
     * redone with upserts. --- */
    snk_val_t xup[6] = {{.s = "exp"}, {.s = "xu1"}, {.s = "a"}, {.i = t0}, {.null = 1}, {.i = 0}};
    snk_val_t xnew[12] = {{.s = "exp"},  {.s = "xu2"},  {.s = "b"},   {.i = t0 + 1},
                          {.i = t0 + 2}, {.i = 0},      {.s = "exp"}, {.s = "xu3"},
                          {.s = "a"},    {.i = t0 + 3}, {.null = 1},  {.i = 1}};
    snk_partition_row_t pn8 = {"clickmart.events", 0, 1004, t0 + 9, 99, 5, 10};
    snk_batch_t bn8 = {0};
    bn8.partitions = &pn8;
    bn8.n_partitions = 1;
    bn8.gen[SNK_USER_EXPOSURE].vals = xup;
    bn8.gen[SNK_USER_EXPOSURE].n = 1;
    bn8.gen[SNK_USER_EXPOSURE].new_vals = xnew;
    bn8.gen[SNK_USER_EXPOSURE].n_new = 2;
    const char *xq = "SELECT string_agg(concat_ws('|', user_id, variant, exposed_at IS NULL, "
                     "excluded), ',' ORDER BY user_id) FROM {S}.user_exposure WHERE user_id "
                     "LIKE 'xu%%'";
    flush_check(c, adm, &bn8, 3, xq, "xu1|a|t|f,xu2|b|f|f,xu3|a|t|t", "1004");
    xup[2].s = "b";
    xnew[8].s = "b";
    pn8.next_offset = 1005;
    bn8.gen[SNK_USER_EXPOSURE].new_vals = xnew + 6;
    bn8.gen[SNK_USER_EXPOSURE].n_new = 1;
    flush_check(c, adm, &bn8, 4, xq, "xu1|b|t|f,xu2|b|f|f,xu3|b|t|t", "1005");

    /* --- Parts written ahead into one open transaction. --- */
    snk_session_row_t p1s[] = {
        {"s8", "u1", t0 + 20, t0 + 20, 1, 1, 0, 0, 0, 0, 0, "web", "DE", 1, 1},
        {"s5", "u1", t0 + 5, t0 + 7, 5, 3, 1, 0, 0, 0, 0, "web", "DE", 2, 0},
    };
    snk_user_row_t pu = {"pu1", t0, t0 + 1, "web", "DE", 1, 1, 0, 0, -1, -1, 0};
    snk_batch_t bp = session_batch(p1s, 2, NULL);
    bp.n_partitions = 0;
    bp.users = &pu;
    bp.n_users = 1;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    assert_int_equal(snk_flush_parts(c), 1);
    /* Nobody sees a part before the commit. */
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's8'"), "0");
    /* A later part writes the same keys again (the staging tables are
     * emptied in between, or the upsert would touch a row twice). */
    snk_session_row_t p2s[] = {
        {"s8", "u1", t0 + 20, t0 + 21, 2, 2, 0, 0, 0, 0, 0, "web", "DE", 1, 0},
        {"s9", "u1", t0 + 30, t0 + 30, 1, 1, 0, 0, 0, 0, 0, "web", "DE", 1, 1},
    };
    pu.events = 2;
    bp.sessions = p2s;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    assert_int_equal(snk_flush_parts(c), 2);
    /* The final batch commits the parts with its own rows. */
    snk_partition_row_t pp = {"clickmart.events", 0, 1003, t0 + 30, 99, 5, 10};
    pu.events = 3;
    snk_batch_t bf = session_batch(NULL, 0, &pp);
    bf.users = &pu;
    bf.n_users = 1;
    assert_int_equal(snk_flush(c, &bf), 0);
    assert_int_equal(snk_flush_parts(c), 0);
    assert_string_equal(q1(adm, "SELECT string_agg(session_id || '|' || events, ',' ORDER BY "
                                "session_id) FROM {S}.sessions WHERE session_id IN ('s5', 's8', "
                                "'s9')"),
                        "s5|5,s8|2,s9|1");
    assert_string_equal(q1(adm, "SELECT events FROM {S}.users WHERE user_id = 'pu1'"), "3");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1003");
    /* A row taken for new that is already there, in the final batch: all
     * is rolled back, the parts too, and the caller must write it whole. */
    snk_session_row_t p3s[] = {
        {"s10", "u1", t0 + 40, t0 + 40, 1, 1, 0, 0, 0, 0, 0, "web", "DE", 1, 1}};
    bp.sessions = p3s;
    bp.n_sessions = 1;
    bp.n_users = 0;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    pp.next_offset = 1004;
    bf = session_batch(p2s + 1, 1, &pp);
    assert_int_equal(snk_flush(c, &bf), SNK_ERESTART);
    assert_int_equal(snk_flush_parts(c), 0);
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's10'"), "0");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1003");
    /* The same in a part. */
    bp.sessions = p2s + 1;
    assert_int_equal(snk_flush_part(c, &bp), SNK_ERESTART);
    assert_int_equal(snk_flush_parts(c), 0);
    /* Discarded parts leave nothing; the next flush is a transaction of its own. */
    bp.sessions = p3s;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    snk_flush_discard(c);
    assert_int_equal(snk_flush_parts(c), 0);
    /* A batch the sink refuses also rolls the open parts back, and its
     * message stays. */
    snk_batch_t bad = {0};
    bad.n_users = 1;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    assert_int_equal(snk_flush_part(c, &bad), SNK_EINVAL);
    assert_int_equal(snk_flush_parts(c), 0);
    assert_non_null(strstr(snk_last_error(c), "no array"));
    assert_int_equal(snk_flush_part(c, &bp), 0);
    assert_int_equal(snk_flush(c, &bad), SNK_EINVAL);
    assert_int_equal(snk_flush_parts(c), 0);
    bf = session_batch(NULL, 0, &pp);
    assert_int_equal(snk_flush(c, &bf), 0);
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's10'"), "0");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1004");

    /* --- A gate before the commit (snk_flush_gated). --- */
    gate_t g = {adm, 0, -1, ""};
    snk_session_row_t gs[] = {
        {"s11", "u1", t0 + 50, t0 + 50, 1, 1, 0, 0, 0, 0, 0, "web", "DE", 1, 1}};
    bp.sessions = gs;
    bp.n_sessions = 1;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    pp.next_offset = 1005;
    bf = session_batch(NULL, 0, &pp);
    /* Refused: the parts and the batch are rolled back. */
    assert_int_equal(snk_flush_gated(c, &bf, test_gate, &g), SNK_EGATE);
    assert_int_equal(g.calls, 1);
    assert_string_equal(g.seen, "0"); /* asked with the rows written, not yet visible */
    assert_int_equal(snk_flush_parts(c), 0);
    assert_non_null(strstr(snk_last_error(c), "gate"));
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's11'"), "0");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1004");
    /* Let through: committed, asked once. */
    g.calls = 0;
    g.answer = 0;
    assert_int_equal(snk_flush_part(c, &bp), 0);
    assert_int_equal(snk_flush_gated(c, &bf, test_gate, &g), 0);
    assert_int_equal(g.calls, 1);
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.sessions WHERE session_id = 's11'"), "1");
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1005");
    /* A flush redone with upserts asks before the commit it reaches; a
     * refusal there leaves nothing either. */
    uint64_t redone = snk_flush_redone(c);
    g.calls = 0;
    g.answer = -1;
    pp.next_offset = 1006;
    bf = session_batch(gs, 1, &pp); /* s11 taken for new again */
    assert_int_equal(snk_flush_gated(c, &bf, test_gate, &g), SNK_EGATE);
    assert_int_equal(g.calls, 1);
    assert_int_equal(snk_flush_redone(c), redone + 1);
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1005");
    /* Nothing to write: no transaction, no question. */
    g.calls = 0;
    snk_batch_t empty = {0};
    assert_int_equal(snk_flush_gated(c, &empty, test_gate, &g), 0);
    assert_int_equal(g.calls, 0);
    /* The gate is for that one call: a plain flush after it is not gated. */
    assert_int_equal(snk_flush(c, &bf), 0);
    assert_int_equal(g.calls, 0);
    assert_string_equal(q1(adm, "SELECT next_offset FROM {S}.partitions WHERE partition = 0"),
                        "1006");

    /* --- A large batch goes through in chunks. --- */
    enum { NBIG = 200000 };
    snk_user_row_t *many = calloc(NBIG, sizeof *many);
    char(*ids)[16] = calloc(NBIG, sizeof *ids);
    assert_non_null(many);
    assert_non_null(ids);
    for (int i = 0; i < NBIG; i++) {
        snprintf(ids[i], sizeof ids[i], "big%07d", i);
        many[i] = (snk_user_row_t){ids[i],
                                   t0,
                                   t0 + i,
                                   "web",
                                   "US",
                                   i,
                                   1,
                                   i % 3,
                                   i * 7LL,
                                   i % 3 ? t0 : -1,
                                   i % 3 ? t0 + i : -1,
                                   0};
    }
    snk_batch_t b5 = {0};
    b5.users = many;
    b5.n_users = NBIG;
    struct timespec a, z;
    clock_gettime(CLOCK_MONOTONIC, &a);
    assert_int_equal(snk_flush(c, &b5), 0);
    clock_gettime(CLOCK_MONOTONIC, &z);
    double secs = (double)(z.tv_sec - a.tv_sec) + (double)(z.tv_nsec - a.tv_nsec) / 1e9;
    print_message("flush of %d new users took %.2f s\n", NBIG, secs);
    clock_gettime(CLOCK_MONOTONIC, &a);
    assert_int_equal(snk_flush(c, &b5), 0);
    clock_gettime(CLOCK_MONOTONIC, &z);
    secs = (double)(z.tv_sec - a.tv_sec) + (double)(z.tv_nsec - a.tv_nsec) / 1e9;
    print_message("flush of %d updated users took %.2f s\n", NBIG, secs);
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.users WHERE user_id LIKE 'big%%'"),
                        "200000");
    assert_string_equal(q1(adm, "SELECT revenue || '|' || coalesce(first_order_at::text, 'null') "
                                "FROM {S}.users WHERE user_id = 'big0199999'"),
                        "13999.93|2024-03-01 12:34:56.789+00");
    free(many);
    free(ids);

    /* --- Random values round-trip exactly through binary COPY. --- */
    /* The staging tables' types are the ones the row tests above assume. */
    assert_memory_equal(c->types[T_SESSIONS], SESSION_T, sizeof SESSION_T);
    assert_memory_equal(c->types[T_USERS], USER_T, sizeof USER_T);
    assert_memory_equal(c->types[T_FUNNEL], FUNNEL_T, sizeof FUNNEL_T);
    assert_memory_equal(c->types[T_PARTITIONS], PARTITION_T, sizeof PARTITION_T);
    assert_memory_equal(c->types[T_REJECTS], REJECT_T, sizeof REJECT_T);
    enum { NRND = 3000 };
    snk_user_row_t *ru = calloc(NRND, sizeof *ru);
    snk_funnel_row_t *rf = calloc(NRND, sizeof *rf);
    char(*rid)[16] = calloc(NRND, sizeof *rid);
    assert_non_null(ru);
    assert_non_null(rf);
    assert_non_null(rid);
    uint64_t x = 0x9E3779B97F4A7C15ULL;
#define NEXT() (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x)
    /* Instants from 1 BC to the end of 9999, days over the same years, and
     * money over the whole int64 range in every magnitude. */
    const int64_t lo = -62198755200000LL, hi = 253402300799999LL;
    for (int i = 0; i < NRND; i++) {
        snprintf(rid[i], sizeof rid[i], "rnd%05d", i);
        int64_t a = lo + (int64_t)(NEXT() % (uint64_t)(hi - lo + 1));
        int64_t z = lo + (int64_t)(NEXT() % (uint64_t)(hi - lo + 1));
        uint64_t r = NEXT();
        int64_t cents = (int64_t)(r >> (r % 64));
        if (r & 1)
            cents = -cents;
        ru[i] = (snk_user_row_t){rid[i], a, z, "web", "US", i, 1, 1, cents, i % 3 ? z : -1, -1, 0};
        int64_t day = -719893 + (int64_t)(NEXT() % 3652425);
        rf[i] = (snk_funnel_row_t){(int32_t)day, rid[i], "ZZ", {1}, {1}, 0, -cents};
    }
    snk_batch_t b6 = {0};
    b6.users = ru;
    b6.n_users = NRND;
    b6.funnel = rf;
    b6.n_funnel = NRND;
    rc = snk_flush(c, &b6);
    if (rc != 0)
        fprintf(stderr, "snk_flush: %s\n", snk_last_error(c));
    assert_int_equal(rc, 0);
    char qs[512];
    snprintf(qs, sizeof qs,
             "SELECT u.user_id, (extract(epoch FROM u.first_seen) * 1000)::bigint, "
             "(extract(epoch FROM u.last_seen) * 1000)::bigint, (u.revenue * 100)::bigint, "
             "coalesce((extract(epoch FROM u.first_order_at) * 1000)::bigint, -1), "
             "f.day - date '1970-01-01', (f.revenue * 100)::bigint FROM %s.users u JOIN "
             "%s.funnel_daily f ON f.device = u.user_id WHERE u.user_id LIKE 'rnd%%' ORDER BY 1",
             live_schema, live_schema);
    PGresult *res = PQexec(adm, qs);
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    assert_int_equal(PQntuples(res), NRND);
    for (int i = 0; i < NRND; i++) {
        char want[256], got[256];
        snprintf(want, sizeof want, "%s %lld %lld %lld %lld %lld %lld", rid[i],
                 (long long)ru[i].first_seen, (long long)ru[i].last_seen,
                 (long long)ru[i].revenue_cents,
                 (long long)(ru[i].first_order_at < 0 ? -1 : ru[i].first_order_at),
                 (long long)rf[i].day, (long long)rf[i].revenue_cents);
        snprintf(got, sizeof got, "%s %s %s %s %s %s %s", PQgetvalue(res, i, 0),
                 PQgetvalue(res, i, 1), PQgetvalue(res, i, 2), PQgetvalue(res, i, 3),
                 PQgetvalue(res, i, 4), PQgetvalue(res, i, 5), PQgetvalue(res, i, 6));
        assert_string_equal(got, want);
    }
    PQclear(res);
#undef NEXT
    free(ru);
    free(rf);
    free(rid);

    /* A flush's deletes from a table with a composite key probe its primary key for the
     * few keys staged. The stage has no statistics of its own, and without them the
     * planner hashed the whole table for each such delete, a cost that grew with the
     * table. 20 000 user_outcomes rows; a flush deletes 3 of them: the stage must have
     * been analysed on the way (3 rows in pg_class), those 3 rows must be gone, and
     * with the stage so analysed the delete's plan must use the primary key. */
    snprintf(sql, sizeof sql,
             "INSERT INTO %s.user_outcomes SELECT 'exp', 'u' || g, 'a', now(), false, 0, 0, 1, "
             "false, false FROM generate_series(1, 20000) g",
             live_schema);
    exec_or_fail(adm, sql);
    snk_val_t dk[6] = {{.s = "exp"},  {.s = "u7"},  {.s = "exp"},
                       {.s = "u700"}, {.s = "exp"}, {.s = "u7000"}};
    snk_batch_t bd = {0};
    bd.gen[SNK_USER_OUTCOMES].del_keys = dk;
    bd.gen[SNK_USER_OUTCOMES].n_del = 3;
    assert_int_equal(snk_flush(c, &bd), 0);
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.user_outcomes"), "19997");
    assert_string_equal(q1(c->pg, "SELECT reltuples FROM pg_class WHERE oid = "
                                  "'pg_temp.cm_stage_user_outcomes_del'::regclass"),
                        "3");
    exec_or_fail(c->pg, "BEGIN");
    exec_or_fail(c->pg, "INSERT INTO pg_temp.cm_stage_user_outcomes_del (experiment, user_id) "
                        "VALUES ('exp', 'u8'), ('exp', 'u800'), ('exp', 'u8000')");
    snprintf(sql, sizeof sql, "EXPLAIN (ANALYZE, COSTS OFF) %s",
             sql_apply(c, &TABLES[T_GEN_DEL(SNK_USER_OUTCOMES)]));
    res = PQexec(c->pg, sql);
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    char plan[4096] = "";
    for (int i = 0; i < PQntuples(res); i++)
        snprintf(plan + strlen(plan), sizeof plan - strlen(plan), "%s\n", PQgetvalue(res, i, 0));
    PQclear(res);
    if (!strstr(plan, "Index Scan using user_outcomes_pkey"))
        fprintf(stderr, "the delete does not probe the primary key:\n%s", plan);
    assert_non_null(strstr(plan, "Index Scan using user_outcomes_pkey"));
    assert_null(strstr(plan, "Seq Scan on user_outcomes"));
    exec_or_fail(c->pg, "ROLLBACK");

    /* A connection killed under the sink is reported as ECONNECT. With a
     * timeout, pg_terminate_backend (Postgres 14+) returns once the backend
     * has exited, so its socket is closed before the flush: no sleep to
     * guess at. */
    snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d, 10000)", PQbackendPID(c->pg));
    exec_or_fail(adm, sql);
    rc = snk_flush(c, &b3);
    assert_int_equal(rc, SNK_ECONNECT);
    assert_false(snk_ok(c));
    assert_true(strlen(snk_last_error(c)) > 0);
    assert_int_equal(snk_flush(c, &b3), SNK_ECONNECT);
    snk_close(c);

    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE", live_schema);
    exec_or_fail(adm, sql);
    PQfinish(adm);
}

/* Runs one of sink.c's statement templates ("{S}" for the schema) on pg,
 * for live_schema. */
static void exec_tmpl_or_fail(PGconn *pg, const char *tmpl)
{
    char quoted[80];
    snprintf(quoted, sizeof quoted, "\"%s\"", live_schema);
    sbuf_t b = {0};
    sb_sql(&b, tmpl, quoted);
    exec_or_fail(pg, sb_cstr(&b));
    free(b.p);
}

/* Applies migrations 1..upto to the schema live_schema by hand, as an older
 * daemon would have left it: the table snk_migrate creates first, then each
 * migration and its version row. */
static void migrate_upto(PGconn *pg, int upto)
{
    char sql[256];
    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s", live_schema,
             live_schema);
    exec_or_fail(pg, sql);
    exec_tmpl_or_fail(pg, SCHEMA_VERSION_SQL);
    for (size_t m = 0; m < sizeof MIGRATIONS / sizeof MIGRATIONS[0]; m++) {
        if (MIGRATIONS[m].version > upto)
            break;
        exec_tmpl_or_fail(pg, MIGRATIONS[m].sql);
        snprintf(sql, sizeof sql, "INSERT INTO %s.schema_version (version) VALUES (%d)",
                 live_schema, MIGRATIONS[m].version);
        exec_or_fail(pg, sql);
    }
}

/* The text columns of the schema's tables whose collation is not "C". */
static const char *non_c_columns(PGconn *pg)
{
    return q1(pg, "SELECT coalesce(string_agg(c.relname || '.' || a.attname, ' ' ORDER BY "
                  "c.relname, a.attnum), '') FROM pg_attribute a JOIN pg_class c ON c.oid = "
                  "a.attrelid JOIN pg_collation k ON k.oid = a.attcollation WHERE "
                  "c.relnamespace = '{S}'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 "
                  "AND a.atttypid = 'text'::regtype AND k.collname <> 'C'");
}

/* The schema's indexes with a key column whose collation is not "C": an
 * index follows its column when the column's collation changes. */
static const char *non_c_indexes(PGconn *pg)
{
    return q1(pg, "SELECT coalesce(string_agg(DISTINCT c.relname, ' '), '') FROM pg_index i "
                  "JOIN pg_class c ON c.oid = i.indexrelid CROSS JOIN "
                  "unnest(i.indcollation::oid[]) u(k) WHERE c.relnamespace = "
                  "'{S}'::regnamespace AND u.k <> 0 AND u.k <> 'pg_catalog.\"C\"'::regcollation");
}

/* snk_migrate on c is refused by Postgres in migration 6, for a reason
 * waiting does not fix, with a message holding `why` (and `what`, unless
 * NULL); the schema stays at version 5. */
static void expect_m6_refused(snk_conn_t *c, PGconn *adm, const char *why, const char *what)
{
    assert_int_equal(snk_migrate(c), SNK_EQUERY);
    assert_false(snk_transient(c));
    const char *err = snk_last_error(c);
    if (!strstr(err, why))
        fprintf(stderr, "unexpected error: %s\n", err);
    assert_non_null(strstr(err, "migration 6"));
    assert_non_null(strstr(err, why));
    if (what)
        assert_non_null(strstr(err, what));
    assert_string_equal(q1(adm, "SELECT max(version) FROM {S}.schema_version"), "5");
}

/* The OIDs of the three views, to tell that migration 6 kept the objects. */
static char *view_oids(PGconn *pg)
{
    return strdup(q1(pg, "SELECT string_agg(c.oid::text, ',' ORDER BY c.relname) FROM pg_class c "
                         "WHERE c.relnamespace = '{S}'::regnamespace AND c.relkind = 'v' AND "
                         "c.relname IN ('product_affinity', 'daily_kpis', 'rfm_segments')"));
}

/*
 * Migration 6 (the contract's strings COLLATE "C") on a schema an older
 * daemon left at version 5. Rows survive, and the three views stay the same
 * objects: their privileges (a revoked default privilege included), options,
 * comments and the views analysts built on them are kept. An analyst's view
 * on a table's column stops it with a message naming the view and leaves the
 * schema as it was. Then the same upgrade in a database whose default
 * collation is ICU's en-US, where the rebuilt indexes must order keys byte by
 * byte: ORDER BY, an index range scan and the flush's upsert all agree.
 */
static void test_live_collation(void **state)
{
    (void)state;
    const char *ci;
    PGconn *adm = live_admin("cm_coll_test", &ci);
    char role[64], role2[64], sql[4096];
    snprintf(role, sizeof role, "cm_coll_reader_%ld", (long)getpid());
    snprintf(role2, sizeof role2, "cm_coll_other_%ld", (long)getpid());

    migrate_upto(adm, 5);
    assert_string_equal(
        non_c_columns(adm),
        "experiment_regression.experiment experiment_regression.term "
        "experiment_results.experiment experiment_results.variant "
        "experiments.experiment experiments.control_variant "
        "funnel_daily.device funnel_daily.country partitions.topic "
        "product_daily.product_id product_pairs.product_a "
        "product_pairs.product_b rejected_events.topic rejected_events.reason "
        "rejected_events.detail rejected_events.payload sessions.session_id "
        "sessions.user_id sessions.device sessions.country user_exposure.experiment "
        "user_exposure.user_id user_exposure.variant user_outcomes.experiment "
        "user_outcomes.user_id user_outcomes.variant users.user_id users.device "
        "users.country");
    assert_string_not_equal(non_c_indexes(adm), "");
    snprintf(sql, sizeof sql,
             "INSERT INTO %s.users VALUES ('u1', now(), now(), 'web', 'DE', 3, 1, 1, 9.5, now(), "
             "now()), ('u2', now(), now(), 'app', 'FR', 1, 1, 0, 0, NULL, NULL)",
             live_schema);
    exec_or_fail(adm, sql);
    /* What an operator may have set on the views. */
    snprintf(sql, sizeof sql,
             "DROP ROLE IF EXISTS %s; CREATE ROLE %s NOLOGIN; DROP ROLE IF EXISTS %s; CREATE ROLE "
             "%s NOLOGIN; GRANT USAGE ON SCHEMA %s TO %s, %s; GRANT SELECT ON %s.daily_kpis TO "
             "%s; GRANT SELECT ON %s.product_affinity TO %s WITH GRANT OPTION; GRANT SELECT ON "
             "%s.rfm_segments TO PUBLIC; ALTER DEFAULT PRIVILEGES IN SCHEMA %s GRANT SELECT ON "
             "TABLES TO %s; COMMENT ON VIEW %s.daily_kpis IS 'KPIs, it''s daily'; COMMENT ON "
             "COLUMN %s.product_affinity.lift IS 'lift'; ALTER VIEW %s.rfm_segments SET "
             "(security_barrier = true); CREATE VIEW %s.my_pairs AS SELECT product_a, lift FROM "
             "%s.product_affinity",
             role, role, role2, role2, live_schema, role, role2, live_schema, role, live_schema,
             role, live_schema, live_schema, role2, live_schema, live_schema, live_schema,
             live_schema, live_schema);
    exec_or_fail(adm, sql);
    char *oids = view_oids(adm);

    /* An analyst's view on a column the migration changes stops it. */
    snprintf(sql, sizeof sql, "CREATE VIEW %s.my_users AS SELECT user_id FROM %s.users",
             live_schema, live_schema);
    exec_or_fail(adm, sql);
    snk_conn_t *c = NULL;
    assert_int_equal(snk_open(ci, live_schema, &c), 0);
    expect_m6_refused(c, adm, "my_users", NULL);
    snprintf(sql, sizeof sql, "DROP VIEW %s.my_users", live_schema);
    exec_or_fail(adm, sql);

    /* Without it the migration runs. */
    assert_int_equal(snk_migrate(c), 0);
    assert_string_equal(q1(adm, "SELECT string_agg(version::text, ',' ORDER BY version) FROM "
                                "{S}.schema_version"),
                        "1,2,3,4,5,6");
    /* The free text of the rejects keeps the database's rules. */
    assert_string_equal(non_c_columns(adm), "rejected_events.detail rejected_events.payload");
    assert_string_equal(non_c_indexes(adm), "");
    assert_string_equal(q1(adm, "SELECT string_agg(user_id || ':' || revenue, ',' ORDER BY "
                                "user_id) FROM {S}.users"),
                        "u1:9.50,u2:0.00");
    assert_string_equal(q1(adm, "SELECT string_agg(user_id || ':' || segment, ',' ORDER BY "
                                "user_id) FROM {S}.rfm_segments"),
                        /* One buyer: every score is 1. */
                        "u1:Lost");
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.daily_kpis"), "0");
    assert_string_equal(q1(adm, "SELECT count(*) FROM {S}.my_pairs"), "0");
    /* The same view objects, with what was set on them. */
    char *oids2 = view_oids(adm);
    assert_string_equal(oids2, oids);
    free(oids);
    free(oids2);
    assert_string_equal(
        q1(adm, "SELECT has_table_privilege('%s', '{S}.daily_kpis', 'SELECT')", role), "t");
    assert_string_equal(q1(adm,
                           "SELECT has_table_privilege('%s', '{S}.product_affinity', 'SELECT "
                           "WITH GRANT OPTION')",
                           role),
                        "t");
    assert_string_equal(q1(adm,
                           "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid "
                           "= '{S}.rfm_segments'::regclass AND a.grantee = 0 AND "
                           "a.privilege_type = 'SELECT'"),
                        "1");
    /* A view created now would get the default privileges; these did not. */
    assert_string_equal(
        q1(adm, "SELECT has_table_privilege('%s', '{S}.daily_kpis', 'SELECT')", role2), "f");
    assert_string_equal(q1(adm, "SELECT obj_description('{S}.daily_kpis'::regclass, 'pg_class')"),
                        "KPIs, it's daily");
    assert_string_equal(q1(adm, "SELECT col_description('{S}.product_affinity'::regclass, 10)"),
                        "lift");
    assert_string_equal(q1(adm, "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid "
                                "= '{S}.rfm_segments'::regclass"),
                        "security_barrier=true");
    /* The views' text columns keep the database's collation (CREATE OR
     * REPLACE VIEW cannot change it). */
    assert_string_equal(q1(adm, "SELECT k.collname FROM pg_attribute a JOIN pg_collation k ON "
                                "k.oid = a.attcollation WHERE a.attrelid = "
                                "'{S}.rfm_segments'::regclass AND a.attname = 'user_id'"),
                        "default");
    assert_int_equal(snk_migrate(c), 0);
    snk_close(c);
    snprintf(sql, sizeof sql, "DROP SCHEMA %s CASCADE", live_schema);
    exec_or_fail(adm, sql);

    /* The same upgrade in a database ordering text by ICU's en-US rules
     * (Postgres 15 and later). */
    char db[64];
    snprintf(db, sizeof db, "cm_icu_test_%ld", (long)getpid());
    if (PQserverVersion(adm) < 150000 ||
        strcmp(q1(adm, "SELECT count(*) > 0 FROM pg_collation WHERE collprovider = 'i'"), "t")) {
        fprintf(stderr, "no ICU in this Postgres: the ICU database part is not run\n");
    } else {
        snprintf(sql, sizeof sql,
                 "DROP DATABASE IF EXISTS %s; CREATE DATABASE %s TEMPLATE template0 ENCODING "
                 "'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'",
                 db, db);
        /* CREATE DATABASE cannot run in the implicit transaction of a
         * multi-statement string. */
        char *semi = strchr(sql, ';');
        *semi = '\0';
        exec_or_fail(adm, sql);
        exec_or_fail(adm, semi + 1);
        char ci2[1024];
        snprintf(ci2, sizeof ci2, "%s dbname=%s", ci, db);
        PGconn *chk = PQconnectdb(ci2);
        assert_int_equal(PQstatus(chk), CONNECTION_OK);
        PQsetNoticeProcessor(chk, notice_ignore, NULL);
        assert_string_equal(q1(chk, "SELECT string_agg(x, ',' ORDER BY x) FROM (VALUES ('a'), "
                                    "('B'), ('\xC3\xA9'), ('Z')) v(x)"),
                            "a,B,\xC3\xA9,Z");
        migrate_upto(chk, 5);
        snprintf(sql, sizeof sql,
                 "INSERT INTO %s.users SELECT x, now(), now(), 'web', 'DE', 1, 1, 0, 0, NULL, "
                 "NULL FROM (VALUES ('a'), ('B'), ('\xC3\xA9'), ('Z')) v(x)",
                 live_schema);
        exec_or_fail(chk, sql);
        assert_string_equal(q1(chk, "SELECT string_agg(user_id, ',' ORDER BY user_id) FROM "
                                    "{S}.users"),
                            "a,B,\xC3\xA9,Z");
        assert_int_equal(snk_open(ci2, live_schema, &c), 0);
        assert_int_equal(snk_migrate(c), 0);
        assert_string_equal(non_c_indexes(chk), "");
        assert_string_equal(q1(chk, "SELECT string_agg(user_id, ',' ORDER BY user_id) FROM "
                                    "{S}.users"),
                            "B,Z,a,\xC3\xA9");
        /* The primary key was rebuilt in byte order: a range scan on it finds
         * exactly the keys from 'a' on (in en-US order it would be all four). */
        exec_or_fail(chk, "SET enable_seqscan = off; SET enable_bitmapscan = off");
        assert_string_equal(q1(chk, "SELECT string_agg(user_id, ',') FROM {S}.users WHERE "
                                    "user_id >= 'a'"),
                            "a,\xC3\xA9");
        /* The flush's upsert finds the existing rows through it. */
        const int64_t t0 = 1709296496789LL;
        snk_user_row_t users[] = {
            {"B", t0, t0, "web", "DE", 7, 1, 0, 0, -1, -1, 0},
            {"c", t0, t0, "web", "DE", 1, 1, 0, 0, -1, -1, 0},
        };
        snk_partition_row_t part = {"clickmart.events", 0, 4, t0, 4, 0, 0};
        snk_batch_t b = {0};
        b.users = users;
        b.n_users = 2;
        b.partitions = &part;
        b.n_partitions = 1;
        int rc = snk_flush(c, &b);
        if (rc != 0)
            fprintf(stderr, "snk_flush: %s\n", snk_last_error(c));
        assert_int_equal(rc, 0);
        assert_string_equal(q1(chk, "SELECT string_agg(user_id || ':' || events, ',' ORDER BY "
                                    "user_id) FROM {S}.users"),
                            "B:7,Z:1,a:1,c:1,\xC3\xA9:1");
        snk_close(c);
        PQfinish(chk);
        snprintf(sql, sizeof sql, "DROP DATABASE %s", db);
        exec_or_fail(adm, sql);
    }
    snprintf(sql, sizeof sql, "DROP OWNED BY %s, %s; DROP ROLE %s; DROP ROLE %s", role, role2, role,
             role2);
    exec_or_fail(adm, sql);
    PQfinish(adm);
}

/*
 * Migration 6 replaces the definitions of clickmart's three views, which
 * needs their owner: a daemon role that is not a superuser meets a view an
 * operator gave to another role with "must be owner", a refusal that
 * waiting does not fix, and the schema stays at version 5. With the view
 * given back, the same role migrates (docs/operations.md, "Upgrading to
 * schema version 6").
 */
static void test_live_view_owner(void **state)
{
    (void)state;
    const char *ci;
    PGconn *adm = live_admin("cm_owner_test", &ci);
    char me[64], other[64], sql[2048], dci[1024];
    snprintf(me, sizeof me, "cm_owner_daemon_%ld", (long)getpid());
    snprintf(other, sizeof other, "cm_owner_other_%ld", (long)getpid());
    migrate_upto(adm, 5);
    /* The schema and everything in it belong to the daemon's role, as when
     * that role created them; one view then goes to another role. */
    snprintf(sql, sizeof sql,
             "DROP ROLE IF EXISTS %s; CREATE ROLE %s LOGIN; DROP ROLE IF EXISTS %s; CREATE ROLE "
             "%s NOLOGIN; ALTER SCHEMA %s OWNER TO %s; DO $$ DECLARE r record; BEGIN FOR r IN "
             "SELECT c.oid::regclass AS t FROM pg_class c WHERE c.relnamespace = "
             "'%s'::regnamespace AND c.relkind IN ('r', 'v') LOOP EXECUTE format('ALTER TABLE "
             "%%s OWNER TO %s', r.t); END LOOP; END $$; ALTER VIEW %s.product_affinity OWNER TO "
             "%s",
             me, me, other, other, live_schema, me, live_schema, me, live_schema, other);
    exec_or_fail(adm, sql);
    snprintf(dci, sizeof dci, "%s user=%s", ci, me);
    snk_conn_t *c = NULL;
    assert_int_equal(snk_open(dci, live_schema, &c), 0);
    /* Not a superuser: ownership checks apply to it. */
    snprintf(sql, sizeof sql, "SELECT rolsuper FROM pg_roles WHERE rolname = '%s'", me);
    assert_string_equal(q1(adm, sql), "f");
    expect_m6_refused(c, adm, "must be owner", "product_affinity");
    assert_string_not_equal(non_c_columns(adm), "rejected_events.detail rejected_events.payload");

    /* Given back, the view no longer stops the same role. */
    snprintf(sql, sizeof sql, "ALTER VIEW %s.product_affinity OWNER TO %s", live_schema, me);
    exec_or_fail(adm, sql);
    assert_int_equal(snk_migrate(c), 0);
    assert_string_equal(q1(adm, "SELECT max(version) FROM {S}.schema_version"), "6");
    assert_string_equal(non_c_columns(adm), "rejected_events.detail rejected_events.payload");
    snk_close(c);
    snprintf(sql, sizeof sql, "DROP SCHEMA %s CASCADE; DROP ROLE %s; DROP ROLE %s", live_schema, me,
             other);
    exec_or_fail(adm, sql);
    PQfinish(adm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bin_cents),      cmocka_unit_test(test_bin_time),
        cmocka_unit_test(test_utf8_valid),     cmocka_unit_test(test_utf8_invalid),
        cmocka_unit_test(test_rows),           cmocka_unit_test(test_type_mismatch),
        cmocka_unit_test(test_reject_payload), cmocka_unit_test(test_sql),
        cmocka_unit_test(test_redact_kv),      cmocka_unit_test(test_redact_uri),
        cmocka_unit_test(test_schema_names),   cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_store_err),      cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_transient),      cmocka_unit_test(test_live),
        cmocka_unit_test(test_live_collation), cmocka_unit_test(test_live_view_owner),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
