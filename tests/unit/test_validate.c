/*
 * test_validate.c - unit tests of ingest/validate.c against CONTRACT §1 and §1.1.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "unit_cmocka.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ingest/validate.h"
#include "unit_rng.h"

/* 2024-01-01T00:00:00Z, the ts of most test events. */
#define T0 1704067200000LL
/* The wall clock of the tests: one day after T0, so T0 is never in the future. */
#define NOW (T0 + 86400000LL)

#define BASE_IDS "\"event_id\":\"e1\",\"user_id\":\"u1\""
#define PAGE_VIEW "{" BASE_IDS ",\"event_type\":\"page_view\",\"ts\":1704067200000"
#define PURCHASE "{" BASE_IDS ",\"event_type\":\"purchase\",\"ts\":1704067200000"
#define ASSIGN "{" BASE_IDS ",\"event_type\":\"experiment_assignment\",\"ts\":1704067200000"

static const ing_limits_t LIMITS = {65536, 3600000};

/* The event is large (items), so it lives here rather than on each test's stack. */
static ing_event_t ev;
static char detail[64];

static ing_reason_t run_len(const char *buf, size_t len)
{
    memset(&ev, 0xAB, sizeof ev);
    memset(detail, 'X', sizeof detail);
    detail[sizeof detail - 1] = '\0';
    return ing_validate(buf, len, NOW, &LIMITS, &ev, detail, sizeof detail);
}

static ing_reason_t run(const char *json)
{
    return run_len(json, strlen(json));
}

/* Assert the reason and the detail of one payload, naming the payload when it fails. */
static void expect_len(const char *json, size_t len, ing_reason_t want, const char *want_detail)
{
    ing_reason_t got = run_len(json, len);
    if (got != want || strcmp(detail, want_detail) != 0) {
        print_error("payload %.*s: got %s/%s, want %s/%s\n", (int)len, json, ing_reason_name(got),
                    detail, ing_reason_name(want), want_detail);
        fail();
    }
}

static void expect(const char *json, ing_reason_t want, const char *want_detail)
{
    expect_len(json, strlen(json), want, want_detail);
}

static void expect_ok(const char *json)
{
    expect(json, ING_OK, "");
}

/* Build a JSON string literal body of n copies of c (no quotes), in a static buffer. */
static const char *rep(char c, size_t n)
{
    static char bufs[4][512];
    static int next;
    char *b = bufs[next++ % 4];
    assert_true(n < sizeof bufs[0]);
    memset(b, c, n);
    b[n] = '\0';
    return b;
}

/* Format a payload into a static buffer. */
static const char *fmt(const char *f, ...)
{
    static char bufs[4][200000];
    static int next;
    char *b = bufs[next++ % 4];
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(b, sizeof bufs[0], f, ap);
    va_end(ap);
    assert_true(n > 0 && (size_t)n < sizeof bufs[0]);
    return b;
}

/* Append formatted text to the string in buf (cap bytes); the test fails if it does not fit. */
static void appendf(char *buf, size_t cap, const char *f, ...)
    __attribute__((format(printf, 3, 4)));
static void appendf(char *buf, size_t cap, const char *f, ...)
{
    size_t n = strlen(buf);
    va_list ap;
    va_start(ap, f);
    int k = vsnprintf(buf + n, cap - n, f, ap);
    va_end(ap);
    assert_true(k >= 0 && (size_t)k < cap - n);
}

/* ---- names and codes ---- */

static void test_reason_names(void **state)
{
    (void)state;
    assert_string_equal(ing_reason_name(ING_OK), "ok");
    assert_string_equal(ing_reason_name(ING_R_PAYLOAD_TOO_LARGE), "payload_too_large");
    assert_string_equal(ing_reason_name(ING_R_INVALID_JSON), "invalid_json");
    assert_string_equal(ing_reason_name(ING_R_NOT_AN_OBJECT), "not_an_object");
    assert_string_equal(ing_reason_name(ING_R_MISSING_FIELD), "missing_field");
    assert_string_equal(ing_reason_name(ING_R_BAD_TYPE), "bad_type");
    assert_string_equal(ing_reason_name(ING_R_BAD_VALUE), "bad_value");
    assert_string_equal(ing_reason_name(ING_R_FUTURE_TIMESTAMP), "future_timestamp");
    assert_string_equal(ing_reason_name(ING_R_TOO_LATE), "too_late");
    assert_non_null(ing_reason_name(ING_R__COUNT));
    assert_non_null(ing_reason_name((ing_reason_t)999));
}

static void test_etype_from(void **state)
{
    (void)state;
    assert_int_equal(ing_etype_from("page_view", 9), ING_ET_PAGE_VIEW);
    assert_int_equal(ing_etype_from("product_view", 12), ING_ET_PRODUCT_VIEW);
    assert_int_equal(ing_etype_from("add_to_cart", 11), ING_ET_ADD_TO_CART);
    assert_int_equal(ing_etype_from("checkout", 8), ING_ET_CHECKOUT);
    assert_int_equal(ing_etype_from("purchase", 8), ING_ET_PURCHASE);
    assert_int_equal(ing_etype_from("experiment_assignment", 21), ING_ET_ASSIGNMENT);
    assert_int_equal(ing_etype_from("search", 6), ING_ET_OTHER);
    /* The length is what counts, not a NUL terminator. */
    assert_int_equal(ing_etype_from("purchases", 8), ING_ET_PURCHASE);
    assert_int_equal(ing_etype_from("purchase", 7), ING_ET_OTHER);
    assert_int_equal(ing_etype_from("", 0), ING_ET_OTHER);
    /* The lookup and the names agree for every type, and a name one byte
     * shorter, one byte off or with a different first byte is no type. */
    for (int t = ING_ET_OTHER + 1; t < ING_ET__COUNT; t++) {
        const char *name = ing_etype_name((ing_etype_t)t);
        assert_non_null(name);
        size_t n = strlen(name);
        assert_int_equal(ing_etype_from(name, n), t);
        assert_int_equal(ing_etype_from(name, n - 1), ING_ET_OTHER);
        char buf[32];
        snprintf(buf, sizeof buf, "%s", name);
        buf[n - 1] ^= 1;
        assert_int_equal(ing_etype_from(buf, n), ING_ET_OTHER);
        snprintf(buf, sizeof buf, "%s", name);
        buf[0] = 'x';
        assert_int_equal(ing_etype_from(buf, n), ING_ET_OTHER);
    }
}

/* ---- accepted events ---- */

static void test_valid_page_view(void **state)
{
    (void)state;
    expect_ok("{\"event_id\":\"evt-1\",\"user_id\":\"user-42\",\"event_type\":\"page_view\","
              "\"ts\":1704067200123,\"device\":\"mobile\",\"country\":\"DE\","
              "\"product_id\":\"sku-9\",\"unknown\":{\"a\":[1,2,{\"b\":null}]}}");
    assert_string_equal(ev.event_id, "evt-1");
    assert_int_equal(ev.event_id_len, 5);
    assert_string_equal(ev.user_id, "user-42");
    assert_int_equal(ev.user_id_len, 7);
    assert_string_equal(ev.event_type, "page_view");
    assert_int_equal(ev.event_type_len, 9);
    assert_int_equal(ev.type, ING_ET_PAGE_VIEW);
    assert_int_equal(ev.ts, 1704067200123LL);
    assert_string_equal(ev.device, "mobile");
    assert_int_equal(ev.device_len, 6);
    assert_string_equal(ev.country, "DE");
    assert_int_equal(ev.country_len, 2);
    assert_string_equal(ev.product_id, "sku-9");
    assert_int_equal(ev.product_id_len, 5);
    assert_int_equal(ev.amount_cents, 0);
    assert_int_equal(ev.experiment_len, 0);
    assert_int_equal(ev.variant_len, 0);
    assert_int_equal(ev.n_items, 0);
}

static void test_other_event_type(void **state)
{
    (void)state;
    expect_ok("{" BASE_IDS ",\"event_type\":\"search_2\",\"ts\":1704067200000}");
    assert_int_equal(ev.type, ING_ET_OTHER);
    assert_string_equal(ev.event_type, "search_2");
    assert_int_equal(ev.device_len, 0);
    assert_string_equal(ev.device, "");
    assert_int_equal(ev.country_len, 0);
    assert_int_equal(ev.product_id_len, 0);
}

static void test_valid_purchase(void **state)
{
    (void)state;
    expect_ok(PURCHASE ",\"amount\":59.97,\"product_id\":\"p0\",\"items\":["
                       "{\"product_id\":\"p1\",\"quantity\":2,\"price\":19.99},"
                       "{\"product_id\":\"p2\"},"
                       "{\"product_id\":\"p3\",\"quantity\":null,\"price\":null}]}");
    assert_int_equal(ev.type, ING_ET_PURCHASE);
    assert_int_equal(ev.amount_cents, 5997);
    assert_string_equal(ev.product_id, "p0");
    assert_int_equal(ev.n_items, 3);
    assert_string_equal(ev.items[0].product_id, "p1");
    assert_int_equal(ev.items[0].product_id_len, 2);
    assert_int_equal(ev.items[0].quantity, 2);
    assert_int_equal(ev.items[0].price_cents, 1999);
    assert_string_equal(ev.items[1].product_id, "p2");
    assert_int_equal(ev.items[1].quantity, 1);
    assert_int_equal(ev.items[1].price_cents, 0);
    assert_int_equal(ev.items[2].quantity, 1);
    assert_int_equal(ev.items[2].price_cents, 0);
}

static void test_valid_assignment(void **state)
{
    (void)state;
    expect_ok(ASSIGN ",\"experiment\":\"checkout_v2\",\"variant\":\"control\"}");
    assert_int_equal(ev.type, ING_ET_ASSIGNMENT);
    assert_string_equal(ev.experiment, "checkout_v2");
    assert_int_equal(ev.experiment_len, 11);
    assert_string_equal(ev.variant, "control");
    assert_int_equal(ev.variant_len, 7);
}

static void test_buffer_not_nul_terminated(void **state)
{
    (void)state;
    /* Only len bytes belong to the message; what follows in memory must not be read. */
    const char *msg = PAGE_VIEW "}GARBAGE";
    size_t len = strlen(PAGE_VIEW "}");
    char *copy = malloc(len);
    assert_non_null(copy);
    memcpy(copy, msg, len);
    expect_len(copy, len, ING_OK, "");
    free(copy);
    expect_len(msg, len + 1, ING_R_INVALID_JSON, "");
}

/* ---- payload_too_large ---- */

static void test_payload_too_large(void **state)
{
    (void)state;
    const char *json = PAGE_VIEW "} ";
    size_t len = strlen(json);
    ing_limits_t lim = {(int64_t)len - 1, 3600000};

    /* Exactly the limit is fine; one byte more is too large. */
    assert_int_equal(ing_validate(json, len - 1, NOW, &lim, &ev, detail, sizeof detail), ING_OK);
    assert_int_equal(ing_validate(json, len, NOW, &lim, &ev, detail, sizeof detail),
                     ING_R_PAYLOAD_TOO_LARGE);
    assert_string_equal(detail, "");

    /* The size is checked before parsing: garbage over the limit is still too large. */
    const char *junk = "{{{{{{";
    lim.max_event_bytes = 5;
    assert_int_equal(ing_validate(junk, 6, NOW, &lim, &ev, detail, sizeof detail),
                     ING_R_PAYLOAD_TOO_LARGE);
    assert_int_equal(ing_validate(junk, 5, NOW, &lim, &ev, detail, sizeof detail),
                     ING_R_INVALID_JSON);

    /* The default limit of 64 KiB, padded with an ignored field. */
    size_t pad = 65536 - strlen(PAGE_VIEW ",\"pad\":\"\"}");
    char *big = malloc(65536 + 2);
    assert_non_null(big);
    int n = snprintf(big, 65536 + 2, PAGE_VIEW ",\"pad\":\"%s", "");
    memset(big + n, 'x', pad);
    memcpy(big + n + pad, "\"}", 3);
    assert_int_equal(strlen(big), 65536);
    expect_len(big, 65536, ING_OK, "");
    memcpy(big + 65536, " ", 2);
    expect_len(big, 65537, ING_R_PAYLOAD_TOO_LARGE, "");
    free(big);
}

/* ---- invalid_json ---- */

static void test_invalid_json(void **state)
{
    (void)state;
    expect_len("", 0, ING_R_INVALID_JSON, "");
    expect_len(NULL, 0, ING_R_INVALID_JSON, "");
    expect("   ", ING_R_INVALID_JSON, "");
    expect("\n", ING_R_INVALID_JSON, "");
    /* Invalid UTF-8: a stray continuation byte, an overlong '/', an encoded surrogate. */
    expect(PAGE_VIEW ",\"x\":\"\x80\"}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":\"\xc0\xaf\"}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":\"\xed\xa0\x80\"}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":\"\xff\"}", ING_R_INVALID_JSON, "");
    expect("{\"\xe2\x82\":1}", ING_R_INVALID_JSON, "");
    /* Escapes that are no Unicode character. */
    expect(PAGE_VIEW ",\"x\":\"\\ud800\"}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":\"\\udc00\"}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":\"\\ud800\\u0041\"}", ING_R_INVALID_JSON, "");
    /* A well-formed surrogate pair is fine. */
    expect_ok(PAGE_VIEW ",\"x\":\"\\ud83d\\ude00\"}");
    /* Repeated keys, at the top and inside an ignored field. */
    expect(PAGE_VIEW ",\"ts\":1704067200000}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":{\"a\":1,\"a\":1}}", ING_R_INVALID_JSON, "");
    /* NUL in a string value or a key. */
    expect(PAGE_VIEW ",\"x\":\"a\\u0000b\"}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\\u0000\":1}", ING_R_INVALID_JSON, "");
    /* A raw NUL byte inside the payload. */
    expect_len("{\"x\":\"a\0\"}", 10, ING_R_INVALID_JSON, "");
    /* Numbers that fit no finite double, and non-JSON number spellings. */
    expect(PAGE_VIEW ",\"x\":1e999}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":-1e999}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":NaN}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":Infinity}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":01}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",\"x\":.5}", ING_R_INVALID_JSON, "");
    /* An underflowing real is a finite double (0), so it is valid. */
    expect_ok(PAGE_VIEW ",\"x\":1e-999}");
    /* Truncation, trailing data, other syntax errors. */
    expect(PAGE_VIEW, ING_R_INVALID_JSON, "");
    expect("{\"event_id\":\"e1", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW "}}", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW "} x", ING_R_INVALID_JSON, "");
    expect(PAGE_VIEW ",}", ING_R_INVALID_JSON, "");
    expect("{'event_id':'e1'}", ING_R_INVALID_JSON, "");
    expect("\xef\xbb\xbf{}", ING_R_INVALID_JSON, "");
}

static void test_every_prefix_is_invalid(void **state)
{
    (void)state;
    const char *json = PURCHASE ",\"amount\":1.5,\"items\":[{\"product_id\":\"p\",\"price\":0.5}],"
                                "\"device\":\"d\\u00e9\"}";
    size_t len = strlen(json);
    expect_ok(json);
    for (size_t i = 0; i < len; i++) {
        expect_len(json, i, ING_R_INVALID_JSON, "");
    }
}

/* ---- not_an_object ---- */

static void test_not_an_object(void **state)
{
    (void)state;
    expect("[]", ING_R_NOT_AN_OBJECT, "");
    expect("[" PAGE_VIEW "}]", ING_R_NOT_AN_OBJECT, "");
    expect("\"page_view\"", ING_R_NOT_AN_OBJECT, "");
    expect("42", ING_R_NOT_AN_OBJECT, "");
    expect("-1.5", ING_R_NOT_AN_OBJECT, "");
    expect("true", ING_R_NOT_AN_OBJECT, "");
    expect("null", ING_R_NOT_AN_OBJECT, "");
    expect(" 99999999999999999999 ", ING_R_NOT_AN_OBJECT, "");
    /* An empty object is an object: its fault is the first missing field. */
    expect("{}", ING_R_MISSING_FIELD, "event_id");
}

/* ---- integers that do not fit int64 ---- */

static void test_huge_integers(void **state)
{
    (void)state;
    /* A huge integer fits a finite double, so it is valid JSON; in an ignored field it is fine. */
    expect_ok(PAGE_VIEW ",\"x\":99999999999999999999}");
    assert_int_equal(ev.ts, T0);
    expect_ok(PAGE_VIEW ",\"x\":-99999999999999999999}");
    assert_int_equal(ev.ts, T0);
    /* In ints-as-real mode integer-typed fields still work and keep their exact value. */
    expect_ok(PURCHASE ",\"amount\":5,\"x\":[18446744073709551616],"
                       "\"items\":[{\"product_id\":\"p\",\"quantity\":1000000,\"price\":3}]}");
    assert_int_equal(ev.ts, T0);
    assert_int_equal(ev.amount_cents, 500);
    assert_int_equal(ev.items[0].quantity, 1000000);
    assert_int_equal(ev.items[0].price_cents, 300);
    /* In ts it is an integer out of range. */
    expect("{" BASE_IDS ",\"event_type\":\"page_view\",\"ts\":99999999999999999999}",
           ING_R_BAD_VALUE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"page_view\",\"ts\":-99999999999999999999}",
           ING_R_BAD_VALUE, "ts");
    /* A real ts stays a bad type even in ints-as-real mode. */
    expect("{" BASE_IDS ",\"event_type\":\"page_view\",\"ts\":1704067200000.5,"
           "\"x\":99999999999999999999}",
           ING_R_BAD_TYPE, "ts");
    /* A huge quantity is out of range, a huge amount too. */
    expect(PURCHASE ",\"amount\":1,\"items\":[{\"product_id\":\"p\",\"quantity\":"
                    "99999999999999999999}]}",
           ING_R_BAD_VALUE, "items");
    expect(PURCHASE ",\"amount\":99999999999999999999}", ING_R_BAD_VALUE, "amount");
    /* The edge of int64 is still an integer in the normal mode. */
    expect("{" BASE_IDS ",\"event_type\":\"page_view\",\"ts\":9223372036854775807}",
           ING_R_BAD_VALUE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"page_view\",\"ts\":-9223372036854775808}",
           ING_R_BAD_VALUE, "ts");
    /* An integer too big even for a double fits neither: invalid JSON. */
    expect(fmt(PAGE_VIEW ",\"x\":1%s}", rep('0', 400)), ING_R_INVALID_JSON, "");
    /* A later syntax error is still found after the retry. */
    expect(PAGE_VIEW ",\"x\":99999999999999999999,\"x\":1}", ING_R_INVALID_JSON, "");
}

/* ---- missing_field, bad_type, bad_value per field ---- */

static void test_required_fields(void **state)
{
    (void)state;
    expect("{\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":1704067200000}", ING_R_MISSING_FIELD,
           "event_id");
    expect("{\"event_id\":null,\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_MISSING_FIELD, "event_id");
    expect("{\"event_id\":\"e\",\"event_type\":\"a\",\"ts\":1704067200000}", ING_R_MISSING_FIELD,
           "user_id");
    expect("{" BASE_IDS ",\"ts\":1704067200000}", ING_R_MISSING_FIELD, "event_type");
    expect("{" BASE_IDS ",\"event_type\":null,\"ts\":1704067200000}", ING_R_MISSING_FIELD,
           "event_type");
    expect("{" BASE_IDS ",\"event_type\":\"a\"}", ING_R_MISSING_FIELD, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":null}", ING_R_MISSING_FIELD, "ts");
    /* Key names are matched byte-wise: "Event_id" is another (ignored) field. */
    expect("{\"Event_id\":\"e\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_MISSING_FIELD, "event_id");

    /* Wrong JSON types. */
    expect("{\"event_id\":1,\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_BAD_TYPE, "event_id");
    expect("{\"event_id\":\"e\",\"user_id\":[],\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_BAD_TYPE, "user_id");
    expect("{" BASE_IDS ",\"event_type\":true,\"ts\":1704067200000}", ING_R_BAD_TYPE, "event_type");

    /* Lengths: "" is not absent for a required field, it breaks the 1-128 rule. */
    expect("{\"event_id\":\"\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_BAD_VALUE, "event_id");
    expect("{\"event_id\":\"e\",\"user_id\":\"\",\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_BAD_VALUE, "user_id");
    expect_ok(fmt("{\"event_id\":\"%s\",\"user_id\":\"%s\",\"event_type\":\"a\",\"ts\":"
                  "1704067200000}",
                  rep('e', 128), rep('u', 128)));
    assert_int_equal(ev.event_id_len, 128);
    assert_int_equal(strlen(ev.event_id), 128);
    assert_int_equal(ev.user_id_len, 128);
    expect(fmt("{\"event_id\":\"%s\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":"
               "1704067200000}",
               rep('e', 129)),
           ING_R_BAD_VALUE, "event_id");
    expect(fmt("{\"event_id\":\"e\",\"user_id\":\"%s\",\"event_type\":\"a\",\"ts\":"
               "1704067200000}",
               rep('u', 129)),
           ING_R_BAD_VALUE, "user_id");
    /* Lengths are bytes: 64 two-byte characters are 128 bytes, 65 are too many. */
    char id[300] = "";
    for (int i = 0; i < 64; i++) {
        appendf(id, sizeof id, "\xc3\xa9");
    }
    expect_ok(fmt("{\"event_id\":\"%s\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":"
                  "1704067200000}",
                  id));
    assert_int_equal(ev.event_id_len, 128);
    appendf(id, sizeof id, "\xc3\xa9");
    expect(fmt("{\"event_id\":\"%s\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":"
               "1704067200000}",
               id),
           ING_R_BAD_VALUE, "event_id");
    /* An escape counts as the bytes it stands for. */
    expect_ok("{\"event_id\":\"\\u00e9\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":"
              "1704067200000}");
    assert_int_equal(ev.event_id_len, 2);
    assert_string_equal(ev.event_id, "\xc3\xa9");
}

static void test_event_type_pattern(void **state)
{
    (void)state;
    static const char *const bad[] = {"",    "Page_view", "1abc",     "_abc",      "a-b",
                                      "a b", "a.b",       "\xc3\xa9", "page_viewZ"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        expect(fmt("{" BASE_IDS ",\"event_type\":\"%s\",\"ts\":1704067200000}", bad[i]),
               ING_R_BAD_VALUE, "event_type");
    }
    expect_ok("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":1704067200000}");
    expect_ok("{" BASE_IDS ",\"event_type\":\"a0_9z\",\"ts\":1704067200000}");
    expect_ok(fmt("{" BASE_IDS ",\"event_type\":\"%s\",\"ts\":1704067200000}", rep('a', 64)));
    assert_int_equal(ev.event_type_len, 64);
    expect(fmt("{" BASE_IDS ",\"event_type\":\"%s\",\"ts\":1704067200000}", rep('a', 65)),
           ING_R_BAD_VALUE, "event_type");
}

/* ---- precedence ---- */

static void test_precedence(void **state)
{
    (void)state;
    /* A missing field wins over an earlier bad value. */
    expect(fmt("{\"event_id\":\"%s\",\"user_id\":\"u\",\"event_type\":\"a\"}", rep('e', 129)),
           ING_R_MISSING_FIELD, "ts");
    /* A missing field wins over an earlier bad type. */
    expect("{\"event_id\":5,\"user_id\":\"u\",\"ts\":1704067200000}", ING_R_MISSING_FIELD,
           "event_type");
    /* A bad type in a later field wins over a bad value in an earlier one. */
    expect("{\"event_id\":\"\",\"user_id\":\"u\",\"event_type\":\"a\",\"ts\":1704067200000,"
           "\"device\":5}",
           ING_R_BAD_TYPE, "device");
    expect("{\"event_id\":\"e\",\"user_id\":\"u\",\"event_type\":\"A\",\"ts\":1.5}", ING_R_BAD_TYPE,
           "ts");
    /* Among equal reasons the first field in contract order wins, whatever the key order. */
    expect(fmt("{\"device\":\"%s\",\"event_id\":\"e\",\"user_id\":\"\",\"event_type\":\"a\","
               "\"ts\":1704067200000}",
               rep('d', 33)),
           ING_R_BAD_VALUE, "user_id");
    expect("{\"ts\":\"x\",\"event_type\":\"A\",\"event_id\":\"e\",\"user_id\":\"u\"}",
           ING_R_BAD_VALUE, "event_type");
    expect("{\"user_id\":1,\"event_id\":2,\"event_type\":\"a\",\"ts\":1704067200000}",
           ING_R_BAD_TYPE, "event_id");
    expect("{\"ts\":null,\"user_id\":null,\"event_id\":\"e\",\"event_type\":\"a\"}",
           ING_R_MISSING_FIELD, "user_id");
    /* Type-specific fields come before the optional ones. */
    expect(fmt(PURCHASE ",\"device\":\"%s\",\"amount\":-1}", rep('d', 33)), ING_R_BAD_VALUE,
           "amount");
    expect(PURCHASE ",\"device\":1,\"country\":2,\"amount\":\"1\"}", ING_R_BAD_TYPE, "amount");
    expect(PURCHASE ",\"product_id\":1,\"amount\":1,\"items\":[{}]}", ING_R_MISSING_FIELD, "items");
    /* A missing field inside items wins over an earlier bad value (amount). */
    expect(PURCHASE ",\"amount\":-1,\"items\":[{\"quantity\":2}]}", ING_R_MISSING_FIELD, "items");
    /* Experiment before variant before the optional fields. */
    expect(fmt(ASSIGN ",\"variant\":\"%s\",\"experiment\":\"%s\"}", rep('v', 65), rep('x', 65)),
           ING_R_BAD_VALUE, "experiment");
    expect(ASSIGN ",\"device\":1,\"experiment\":\"x\"}", ING_R_MISSING_FIELD, "variant");
}

/* ---- ts ---- */

static void test_ts_integer(void **state)
{
    (void)state;
    /* Now far in the future so the upper range edge is not a future timestamp. */
    ing_limits_t lim = LIMITS;
    int64_t now = ING_TS_END + 1000000;
    const char *f = "{" BASE_IDS ",\"event_type\":\"a\",\"ts\":%lld}";
    ing_reason_t r;

    r = ing_validate(fmt(f, ING_TS_MIN), strlen(fmt(f, ING_TS_MIN)), now, &lim, &ev, detail,
                     sizeof detail);
    assert_int_equal(r, ING_OK);
    assert_int_equal(ev.ts, ING_TS_MIN);
    r = ing_validate(fmt(f, ING_TS_END - 1), strlen(fmt(f, ING_TS_END - 1)), now, &lim, &ev, detail,
                     sizeof detail);
    assert_int_equal(r, ING_OK);
    assert_int_equal(ev.ts, ING_TS_END - 1);
    r = ing_validate(fmt(f, ING_TS_MIN - 1), strlen(fmt(f, ING_TS_MIN - 1)), now, &lim, &ev, detail,
                     sizeof detail);
    assert_int_equal(r, ING_R_BAD_VALUE);
    assert_string_equal(detail, "ts");
    r = ing_validate(fmt(f, ING_TS_END), strlen(fmt(f, ING_TS_END)), now, &lim, &ev, detail,
                     sizeof detail);
    assert_int_equal(r, ING_R_BAD_VALUE);
    assert_string_equal(detail, "ts");

    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":0}", ING_R_BAD_VALUE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":-1704067200000}", ING_R_BAD_VALUE, "ts");
    /* Seconds instead of ms land in 1970 and are out of range. */
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":1704067200}", ING_R_BAD_VALUE, "ts");

    /* An integer is a literal without fraction or exponent: anything else is a bad type. */
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":1704067200000.0}", ING_R_BAD_TYPE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":1.7040672e12}", ING_R_BAD_TYPE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":true}", ING_R_BAD_TYPE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":[1704067200000]}", ING_R_BAD_TYPE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":{}}", ING_R_BAD_TYPE, "ts");
    /* A string is an RFC 3339 date-time; digits in a string are not. */
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":\"1704067200000\"}", ING_R_BAD_VALUE, "ts");
    expect("{" BASE_IDS ",\"event_type\":\"a\",\"ts\":\"\"}", ING_R_BAD_VALUE, "ts");
}

static int64_t parse(const char *s)
{
    int64_t ms = -12345;
    if (ing_parse_rfc3339(s, strlen(s), &ms) != 0) {
        return -1;
    }
    return ms;
}

static void test_rfc3339_parser(void **state)
{
    (void)state;
    assert_int_equal(parse("2024-01-01T00:00:00Z"), T0);
    assert_int_equal(parse("2024-01-01T00:00:00z"), T0);
    assert_int_equal(parse("2024-01-01t00:00:00Z"), T0);
    assert_int_equal(parse("2024-01-01 00:00:00Z"), T0);
    assert_int_equal(parse("2024-01-01T00:00:00+00:00"), T0);
    assert_int_equal(parse("2024-01-01T00:00:00-00:00"), T0);
    assert_int_equal(parse("2024-01-01T05:30:00+05:30"), T0);
    assert_int_equal(parse("2023-12-31T16:00:00-08:00"), T0);
    assert_int_equal(parse("2024-01-01T01:00:00+01:00"), T0);
    assert_int_equal(parse("2024-06-01T12:34:56.789Z"), 1717245296789LL);
    assert_int_equal(parse("1970-01-01T00:00:00Z"), 0);
    assert_int_equal(parse("2000-01-01T00:00:00Z"), ING_TS_MIN);
    assert_int_equal(parse("2100-01-01T00:00:00Z"), ING_TS_END);
    assert_int_equal(parse("2099-12-31T23:59:59.999Z"), ING_TS_END - 1);
    assert_int_equal(parse("1969-12-31T23:59:59Z"), -1000);
    assert_int_equal(parse("2024-01-01T23:59:59+23:59"), T0 + 59000);

    /* Fractions of 1 to 9 and more digits, cut (never rounded) to ms. */
    assert_int_equal(parse("2024-01-01T00:00:00.5Z"), T0 + 500);
    assert_int_equal(parse("2024-01-01T00:00:00.12Z"), T0 + 120);
    assert_int_equal(parse("2024-01-01T00:00:00.123Z"), T0 + 123);
    assert_int_equal(parse("2024-01-01T00:00:00.1239Z"), T0 + 123);
    assert_int_equal(parse("2024-01-01T00:00:00.12399Z"), T0 + 123);
    assert_int_equal(parse("2024-01-01T00:00:00.999999Z"), T0 + 999);
    assert_int_equal(parse("2024-01-01T00:00:00.0009999Z"), T0);
    assert_int_equal(parse("2024-01-01T00:00:00.99999999Z"), T0 + 999);
    assert_int_equal(parse("2024-01-01T00:00:00.123456789Z"), T0 + 123);
    assert_int_equal(parse("2024-01-01T00:00:00.123456789012345678901234567890Z"), T0 + 123);
    assert_int_equal(parse("2024-01-01T00:00:00.000+05:30"), T0 - 19800000);

    /* Leap years: 2024 and 2000 have Feb 29, 2023 and 2100 do not. */
    assert_int_equal(parse("2024-02-29T00:00:00Z"), 1709164800000LL);
    assert_int_equal(parse("2000-02-29T00:00:00Z"), 951782400000LL);
    assert_int_equal(parse("2023-02-29T00:00:00Z"), -1);
    assert_int_equal(parse("2100-02-29T00:00:00Z"), -1);
    assert_int_equal(parse("2024-02-30T00:00:00Z"), -1);

    static const char *const bad[] = {
        "",
        "2024-01-01",
        "2024-01-01T00:00:00",        /* no offset */
        "2024-01-01T00:00:00.123",    /* no offset */
        "2024-01-01T00:00Z",          /* no seconds */
        "2024-01-01X00:00:00Z",       /* bad separator */
        "2024-01-01_00:00:00Z",       /* bad separator */
        "2024-01-01T00:00:00.Z",      /* empty fraction */
        "2024-01-01T00:00:00,5Z",     /* comma fraction */
        "2024-01-01T00:00:00ZZ",      /* trailing data */
        "2024-01-01T00:00:00Z ",      /* trailing data */
        " 2024-01-01T00:00:00Z",      /* leading data */
        "2024-01-01T00:00:00+0530",   /* offset without colon */
        "2024-01-01T00:00:00+05",     /* short offset */
        "2024-01-01T00:00:00+24:00",  /* offset hour */
        "2024-01-01T00:00:00+05:60",  /* offset minute */
        "2024-01-01T00:00:00+05:30Z", /* two offsets */
        "2024-01-01T00:00:00UTC",
        "2024-00-01T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-01-00T00:00:00Z",
        "2024-01-32T00:00:00Z",
        "2024-04-31T00:00:00Z",
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:60:00Z",
        "2024-01-01T23:59:60Z", /* leap second */
        "2016-12-31T23:59:60Z", /* a real leap second, still rejected */
        "24-01-01T00:00:00Z",
        "2024-1-01T00:00:00Z",
        "2024-01-1T00:00:00Z",
        "2024-01-01T0:00:00Z",
        "+2024-01-01T00:00:00Z",
        "2024/01/01T00:00:00Z",
        "2024-01-01T00:00:00\xc2\xa0Z",
        "abcd-ef-ghTij:kl:mnZ",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t ms = 7;
        if (ing_parse_rfc3339(bad[i], strlen(bad[i]), &ms) != -1) {
            print_error("accepted bad date-time '%s'\n", bad[i]);
            fail();
        }
    }

    /* The length bounds the string: the parser must not read past it. */
    const char *s = "2024-01-01T00:00:00Zjunk";
    int64_t ms = 0;
    assert_int_equal(ing_parse_rfc3339(s, 20, &ms), 0);
    assert_int_equal(ms, T0);
    assert_int_equal(ing_parse_rfc3339(s, 19, &ms), -1);
    assert_int_equal(ing_parse_rfc3339(NULL, 0, &ms), -1);
}

static void test_ts_string(void **state)
{
    (void)state;
    const char *f = "{" BASE_IDS ",\"event_type\":\"a\",\"ts\":\"%s\"}";
    expect_ok(fmt(f, "2024-01-01T00:00:00Z"));
    assert_int_equal(ev.ts, T0);
    expect_ok(fmt(f, "2024-01-01 05:30:00.123456+05:30"));
    assert_int_equal(ev.ts, T0 + 123);
    expect_ok(fmt(f, "2023-12-31t16:00:00.9-08:00"));
    assert_int_equal(ev.ts, T0 + 900);
    expect_ok(fmt(f, "2020-02-29T00:00:00z"));
    assert_int_equal(ev.ts, 1582934400000LL);
    expect(fmt(f, "2023-02-29T00:00:00Z"), ING_R_BAD_VALUE, "ts");
    expect(fmt(f, "2024-01-01T00:00:00"), ING_R_BAD_VALUE, "ts");
    expect(fmt(f, "2024-01-01T23:59:60Z"), ING_R_BAD_VALUE, "ts");
    expect(fmt(f, "yesterday"), ING_R_BAD_VALUE, "ts");
    /* The range [2000, 2100) applies to strings, after the offset is applied. */
    expect_ok(fmt(f, "2000-01-01T00:00:00Z"));
    assert_int_equal(ev.ts, ING_TS_MIN);
    expect_ok(fmt(f, "2000-01-01T05:00:00+05:00"));
    assert_int_equal(ev.ts, ING_TS_MIN);
    expect(fmt(f, "1999-12-31T23:59:59.999Z"), ING_R_BAD_VALUE, "ts");
    expect(fmt(f, "2000-01-01T00:30:00+01:00"), ING_R_BAD_VALUE, "ts");
    expect(fmt(f, "1970-01-01T00:00:00Z"), ING_R_BAD_VALUE, "ts");

    ing_limits_t lim = LIMITS;
    int64_t now = ING_TS_END + 86400000LL;
    const char *last = fmt(f, "2099-12-31T23:59:59.999Z");
    assert_int_equal(ing_validate(last, strlen(last), now, &lim, &ev, detail, sizeof detail),
                     ING_OK);
    assert_int_equal(ev.ts, ING_TS_END - 1);
    const char *end = fmt(f, "2100-01-01T00:00:00Z");
    assert_int_equal(ing_validate(end, strlen(end), now, &lim, &ev, detail, sizeof detail),
                     ING_R_BAD_VALUE);
    assert_string_equal(detail, "ts");
    const char *end2 = fmt(f, "2099-12-31T23:00:00-01:00");
    assert_int_equal(ing_validate(end2, strlen(end2), now, &lim, &ev, detail, sizeof detail),
                     ING_R_BAD_VALUE);
}

/* ---- purchase: amount ---- */

static int64_t amount_cents(const char *amount)
{
    const char *json = fmt(PURCHASE ",\"amount\":%s}", amount);
    assert_int_equal(run(json), ING_OK);
    return ev.amount_cents;
}

static void test_amount(void **state)
{
    (void)state;
    /* 19.99 is 1998.9999999999998 after * 100.0, which rounds to 1999. */
    assert_int_equal(amount_cents("19.99"), 1999);
    assert_int_equal(amount_cents("19.99"), llround(19.99 * 100.0));
    /* 0.005 * 100.0 is exactly 0.5, and llround rounds half away from zero. */
    assert_int_equal(amount_cents("0.005"), 1);
    assert_int_equal(amount_cents("0.005"), llround(0.005 * 100.0));
    /* 1.005 is just below 1.005, so * 100.0 gives 100.49999999999999 and rounds down. */
    volatile double a = 1.005;
    assert_int_equal(amount_cents("1.005"), llround(a * 100.0));
    assert_int_equal(amount_cents("1.005"), 100);
    assert_int_equal(amount_cents("0.015"), llround(0.015 * 100.0));
    assert_int_equal(amount_cents("0"), 0);
    assert_int_equal(amount_cents("-0"), 0);
    assert_int_equal(amount_cents("0.0"), 0);
    assert_int_equal(amount_cents("20"), 2000);
    assert_int_equal(amount_cents("2e1"), 2000);
    assert_int_equal(amount_cents("0.004"), 0);
    assert_int_equal(amount_cents("1e12"), 100000000000000LL);
    assert_int_equal(amount_cents("1000000000000"), 100000000000000LL);
    assert_int_equal(amount_cents("1e-999"), 0);

    expect(PURCHASE ",\"amount\":1000000000000.01}", ING_R_BAD_VALUE, "amount");
    expect(PURCHASE ",\"amount\":1000000000001}", ING_R_BAD_VALUE, "amount");
    expect(PURCHASE ",\"amount\":-0.01}", ING_R_BAD_VALUE, "amount");
    expect(PURCHASE ",\"amount\":-1}", ING_R_BAD_VALUE, "amount");
    expect(PURCHASE "}", ING_R_MISSING_FIELD, "amount");
    expect(PURCHASE ",\"amount\":null}", ING_R_MISSING_FIELD, "amount");
    expect(PURCHASE ",\"amount\":\"\"}", ING_R_BAD_TYPE, "amount");
    expect(PURCHASE ",\"amount\":\"19.99\"}", ING_R_BAD_TYPE, "amount");
    expect(PURCHASE ",\"amount\":true}", ING_R_BAD_TYPE, "amount");
    expect(PURCHASE ",\"amount\":[1]}", ING_R_BAD_TYPE, "amount");
}

/* ---- purchase: items ---- */

static void test_items(void **state)
{
    (void)state;
    /* Absent, null, "" and [] are all no items. */
    expect_ok(PURCHASE ",\"amount\":1}");
    assert_int_equal(ev.n_items, 0);
    expect_ok(PURCHASE ",\"amount\":1,\"items\":null}");
    assert_int_equal(ev.n_items, 0);
    expect_ok(PURCHASE ",\"amount\":1,\"items\":\"\"}");
    assert_int_equal(ev.n_items, 0);
    expect_ok(PURCHASE ",\"amount\":1,\"items\":[]}");
    assert_int_equal(ev.n_items, 0);

    expect_ok(PURCHASE ",\"amount\":1,\"items\":[{\"product_id\":\"p\",\"price\":2.5,"
                       "\"quantity\":3,\"extra\":{}}]}");
    assert_int_equal(ev.n_items, 1);
    assert_int_equal(ev.items[0].price_cents, 250);
    assert_int_equal(ev.items[0].quantity, 3);
    expect_ok(PURCHASE ",\"amount\":1,\"items\":[{\"product_id\":\"p\",\"price\":1e12,"
                       "\"quantity\":1}]}");
    assert_int_equal(ev.items[0].price_cents, 100000000000000LL);
    expect_ok(PURCHASE ",\"amount\":1,\"items\":[{\"product_id\":\"p\",\"price\":0.005}]}");
    assert_int_equal(ev.items[0].price_cents, 1);
    expect_ok(fmt(PURCHASE ",\"amount\":1,\"items\":[{\"product_id\":\"%s\"}]}", rep('p', 128)));
    assert_int_equal(ev.items[0].product_id_len, 128);

    static const char *const faults[][2] = {
        {"\"x\"", "bad_type"},
        {"{}", "bad_type"},
        {"1", "bad_type"},
        {"true", "bad_type"},
        {"[1]", "bad_type"},
        {"[\"p\"]", "bad_type"},
        {"[null]", "bad_type"},
        {"[[]]", "bad_type"},
        {"[{}]", "missing_field"},
        {"[{\"product_id\":null}]", "missing_field"},
        {"[{\"product_id\":1}]", "bad_type"},
        {"[{\"product_id\":\"\"}]", "bad_value"},
        {"[{\"product_id\":\"p\",\"quantity\":0}]", "bad_value"},
        {"[{\"product_id\":\"p\",\"quantity\":-1}]", "bad_value"},
        {"[{\"product_id\":\"p\",\"quantity\":1000001}]", "bad_value"},
        {"[{\"product_id\":\"p\",\"quantity\":1.5}]", "bad_type"},
        {"[{\"product_id\":\"p\",\"quantity\":2.0}]", "bad_type"},
        {"[{\"product_id\":\"p\",\"quantity\":1e2}]", "bad_type"},
        {"[{\"product_id\":\"p\",\"quantity\":\"2\"}]", "bad_type"},
        {"[{\"product_id\":\"p\",\"quantity\":\"\"}]", "bad_type"},
        {"[{\"product_id\":\"p\",\"price\":-0.01}]", "bad_value"},
        {"[{\"product_id\":\"p\",\"price\":1000000000000.5}]", "bad_value"},
        {"[{\"product_id\":\"p\",\"price\":\"1\"}]", "bad_type"},
        {"[{\"product_id\":\"p\",\"price\":false}]", "bad_type"},
        /* The reason of items is the smallest over its elements. */
        {"[{\"product_id\":\"p\",\"quantity\":0},{\"product_id\":5},{}]", "missing_field"},
        {"[{\"product_id\":\"p\",\"quantity\":0},{\"product_id\":5}]", "bad_type"},
        {"[{\"product_id\":\"p\"},{\"product_id\":\"q\",\"price\":-1}]", "bad_value"},
    };
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        const char *json = fmt(PURCHASE ",\"amount\":1,\"items\":%s}", faults[i][0]);
        ing_reason_t r = run(json);
        if (strcmp(ing_reason_name(r), faults[i][1]) != 0 || strcmp(detail, "items") != 0) {
            print_error("items %s: got %s/%s, want %s/items\n", faults[i][0], ing_reason_name(r),
                        detail, faults[i][1]);
            fail();
        }
    }
    expect(fmt(PURCHASE ",\"amount\":1,\"items\":[{\"product_id\":\"%s\"}]}", rep('p', 129)),
           ING_R_BAD_VALUE, "items");
}

static void test_items_count(void **state)
{
    (void)state;
    size_t cap = 100000;
    char *arr = malloc(cap);
    assert_non_null(arr);
    /* 100 items are the most a purchase may hold. */
    arr[0] = '\0';
    appendf(arr, cap, "[");
    for (int i = 0; i < 100; i++)
        appendf(arr, cap, "%s{\"product_id\":\"p%d\",\"quantity\":%d}", i ? "," : "", i, i + 1);
    appendf(arr, cap, "]");
    expect_ok(fmt(PURCHASE ",\"amount\":1,\"items\":%s}", arr));
    assert_int_equal(ev.n_items, 100);
    assert_string_equal(ev.items[99].product_id, "p99");
    assert_int_equal(ev.items[99].quantity, 100);

    /* 101 are a bad value. */
    arr[strlen(arr) - 1] = '\0';
    appendf(arr, cap, ",{\"product_id\":\"p100\"}]");
    expect(fmt(PURCHASE ",\"amount\":1,\"items\":%s}", arr), ING_R_BAD_VALUE, "items");

    /* A badly typed element past the 100th still wins over the count. */
    arr[strlen(arr) - 1] = '\0';
    appendf(arr, cap, ",7]");
    expect(fmt(PURCHASE ",\"amount\":1,\"items\":%s}", arr), ING_R_BAD_TYPE, "items");
    free(arr);
}

static void test_type_specific_fields_ignored(void **state)
{
    (void)state;
    /* amount and items are read on purchases only. */
    expect_ok(PAGE_VIEW ",\"amount\":\"lots\",\"items\":[{},5],\"experiment\":7}");
    assert_int_equal(ev.amount_cents, 0);
    assert_int_equal(ev.n_items, 0);
    assert_int_equal(ev.experiment_len, 0);
    expect_ok("{" BASE_IDS ",\"event_type\":\"checkout\",\"ts\":1704067200000,\"amount\":5,"
              "\"items\":[{\"product_id\":\"p\"}]}");
    assert_int_equal(ev.type, ING_ET_CHECKOUT);
    assert_int_equal(ev.amount_cents, 0);
    assert_int_equal(ev.n_items, 0);
    expect_ok(ASSIGN ",\"experiment\":\"e\",\"variant\":\"v\",\"amount\":-5,\"items\":{}}");
    assert_int_equal(ev.amount_cents, 0);
    assert_int_equal(ev.n_items, 0);

    /* experiment and variant are read on assignments only. */
    expect_ok(PURCHASE ",\"amount\":1,\"experiment\":null,\"variant\":[]}");
    assert_int_equal(ev.experiment_len, 0);
    assert_int_equal(ev.variant_len, 0);

    /* When event_type is faulty no type-specific field is checked. */
    expect("{" BASE_IDS ",\"event_type\":\"Purchase\",\"ts\":1704067200000}", ING_R_BAD_VALUE,
           "event_type");
    expect("{" BASE_IDS ",\"event_type\":\"purchase \",\"ts\":1704067200000,\"amount\":\"x\"}",
           ING_R_BAD_VALUE, "event_type");
    expect("{" BASE_IDS ",\"event_type\":1,\"ts\":1704067200000,\"items\":[{}]}", ING_R_BAD_TYPE,
           "event_type");
    expect("{" BASE_IDS ",\"ts\":1704067200000,\"experiment\":1}", ING_R_MISSING_FIELD,
           "event_type");
}

static void test_assignment_fields(void **state)
{
    (void)state;
    expect(ASSIGN "}", ING_R_MISSING_FIELD, "experiment");
    expect(ASSIGN ",\"experiment\":\"e\"}", ING_R_MISSING_FIELD, "variant");
    expect(ASSIGN ",\"experiment\":null,\"variant\":\"v\"}", ING_R_MISSING_FIELD, "experiment");
    expect(ASSIGN ",\"experiment\":\"e\",\"variant\":null}", ING_R_MISSING_FIELD, "variant");
    expect(ASSIGN ",\"experiment\":5,\"variant\":\"v\"}", ING_R_BAD_TYPE, "experiment");
    expect(ASSIGN ",\"experiment\":\"e\",\"variant\":{}}", ING_R_BAD_TYPE, "variant");
    expect(ASSIGN ",\"experiment\":\"\",\"variant\":\"v\"}", ING_R_BAD_VALUE, "experiment");
    expect(ASSIGN ",\"experiment\":\"e\",\"variant\":\"\"}", ING_R_BAD_VALUE, "variant");
    expect_ok(fmt(ASSIGN ",\"experiment\":\"%s\",\"variant\":\"%s\"}", rep('e', 64), rep('v', 64)));
    assert_int_equal(ev.experiment_len, 64);
    assert_int_equal(ev.variant_len, 64);
    assert_int_equal(strlen(ev.variant), 64);
    expect(fmt(ASSIGN ",\"experiment\":\"%s\",\"variant\":\"v\"}", rep('e', 65)), ING_R_BAD_VALUE,
           "experiment");
    expect(fmt(ASSIGN ",\"experiment\":\"e\",\"variant\":\"%s\"}", rep('v', 65)), ING_R_BAD_VALUE,
           "variant");
    /* Assignments need no amount. */
    expect_ok(ASSIGN ",\"experiment\":\"e\",\"variant\":\"v\"}");
}

/* ---- optional fields ---- */

static void test_optional_fields(void **state)
{
    (void)state;
    expect_ok(PAGE_VIEW ",\"device\":null,\"country\":\"\",\"product_id\":null}");
    assert_int_equal(ev.device_len, 0);
    assert_string_equal(ev.device, "");
    assert_int_equal(ev.country_len, 0);
    assert_string_equal(ev.country, "");
    assert_int_equal(ev.product_id_len, 0);
    expect_ok(PAGE_VIEW ",\"device\":\"\",\"country\":null,\"product_id\":\"\"}");
    assert_int_equal(ev.device_len, 0);
    assert_int_equal(ev.country_len, 0);
    assert_int_equal(ev.product_id_len, 0);

    expect_ok(fmt(PAGE_VIEW ",\"device\":\"%s\",\"country\":\"%s\",\"product_id\":\"%s\"}",
                  rep('d', 32), rep('c', 32), rep('p', 128)));
    assert_int_equal(ev.device_len, 32);
    assert_int_equal(strlen(ev.device), 32);
    assert_int_equal(ev.country_len, 32);
    assert_int_equal(ev.product_id_len, 128);
    expect(fmt(PAGE_VIEW ",\"device\":\"%s\"}", rep('d', 33)), ING_R_BAD_VALUE, "device");
    expect(fmt(PAGE_VIEW ",\"country\":\"%s\"}", rep('c', 33)), ING_R_BAD_VALUE, "country");
    expect(fmt(PAGE_VIEW ",\"product_id\":\"%s\"}", rep('p', 129)), ING_R_BAD_VALUE, "product_id");
    /* 16 two-byte characters fit 32 bytes; 17 do not. */
    char dev[80] = "";
    for (int i = 0; i < 16; i++) {
        appendf(dev, sizeof dev, "\xc3\xbc");
    }
    expect_ok(fmt(PAGE_VIEW ",\"device\":\"%s\"}", dev));
    assert_int_equal(ev.device_len, 32);
    appendf(dev, sizeof dev, "\xc3\xbc");
    expect(fmt(PAGE_VIEW ",\"device\":\"%s\"}", dev), ING_R_BAD_VALUE, "device");

    expect(PAGE_VIEW ",\"device\":1}", ING_R_BAD_TYPE, "device");
    expect(PAGE_VIEW ",\"country\":false}", ING_R_BAD_TYPE, "country");
    expect(PAGE_VIEW ",\"product_id\":[]}", ING_R_BAD_TYPE, "product_id");
    expect(PAGE_VIEW ",\"product_id\":{}}", ING_R_BAD_TYPE, "product_id");

    /* product_id is read on every event type. */
    expect_ok(ASSIGN ",\"experiment\":\"e\",\"variant\":\"v\",\"product_id\":\"sku\"}");
    assert_string_equal(ev.product_id, "sku");
    expect(ASSIGN ",\"experiment\":\"e\",\"variant\":\"v\",\"product_id\":1}", ING_R_BAD_TYPE,
           "product_id");
    expect_ok("{" BASE_IDS ",\"event_type\":\"product_view\",\"ts\":1704067200000,"
              "\"product_id\":\"sku-1\"}");
    assert_int_equal(ev.type, ING_ET_PRODUCT_VIEW);
    assert_string_equal(ev.product_id, "sku-1");
}

/* ---- future_timestamp ---- */

static void test_future_timestamp(void **state)
{
    (void)state;
    ing_limits_t lim = {65536, 3600000};
    const char *f = "{" BASE_IDS ",\"event_type\":\"a\",\"ts\":%lld}";
    const char *at = fmt(f, T0 + 3600000LL);
    const char *after = fmt(f, T0 + 3600001LL);

    assert_int_equal(ing_validate(at, strlen(at), T0, &lim, &ev, detail, sizeof detail), ING_OK);
    assert_int_equal(ing_validate(after, strlen(after), T0, &lim, &ev, detail, sizeof detail),
                     ING_R_FUTURE_TIMESTAMP);
    assert_string_equal(detail, "");

    /* A string ts is compared the same way. */
    const char *s = "{" BASE_IDS ",\"event_type\":\"a\",\"ts\":\"2024-01-01T02:00:00+01:00\"}";
    assert_int_equal(ing_validate(s, strlen(s), T0, &lim, &ev, detail, sizeof detail), ING_OK);
    assert_int_equal(ev.ts, T0 + 3600000LL);
    assert_int_equal(ing_validate(s, strlen(s), T0 - 1, &lim, &ev, detail, sizeof detail),
                     ING_R_FUTURE_TIMESTAMP);

    /* Field faults come first. */
    const char *both = "{" BASE_IDS ",\"event_type\":\"a\",\"ts\":1704067200000,\"device\":1}";
    assert_int_equal(ing_validate(both, strlen(both), ING_TS_MIN, &lim, &ev, detail, sizeof detail),
                     ING_R_BAD_TYPE);
    assert_string_equal(detail, "device");

    /* A limit of zero means no ts after now; absurd limits do not overflow. */
    lim.max_future_ms = 0;
    assert_int_equal(ing_validate(at, strlen(at), T0 + 3600000LL, &lim, &ev, detail, sizeof detail),
                     ING_OK);
    assert_int_equal(ing_validate(at, strlen(at), T0 + 3599999LL, &lim, &ev, detail, sizeof detail),
                     ING_R_FUTURE_TIMESTAMP);
    lim.max_future_ms = INT64_MAX;
    assert_int_equal(ing_validate(at, strlen(at), INT64_MAX, &lim, &ev, detail, sizeof detail),
                     ING_OK);
    lim.max_future_ms = INT64_MIN;
    assert_int_equal(ing_validate(at, strlen(at), INT64_MIN, &lim, &ev, detail, sizeof detail),
                     ING_R_FUTURE_TIMESTAMP);
}

/* ---- the detail buffer and odd arguments ---- */

static void test_detail_buffer(void **state)
{
    (void)state;
    const char *json = "{" BASE_IDS ",\"event_type\":\"a\",\"ts\":1704067200000,\"country\":1}";
    char small[4];
    assert_int_equal(ing_validate(json, strlen(json), NOW, &LIMITS, &ev, small, sizeof small),
                     ING_R_BAD_TYPE);
    assert_string_equal(small, "cou");
    assert_int_equal(ing_validate(json, strlen(json), NOW, &LIMITS, &ev, NULL, 0), ING_R_BAD_TYPE);
    char one[1] = {'x'};
    assert_int_equal(ing_validate(json, strlen(json), NOW, &LIMITS, &ev, one, 1), ING_R_BAD_TYPE);
    assert_int_equal(one[0], '\0');

    /* Without limits the contract's defaults apply. */
    assert_int_equal(ing_validate(json, strlen(json), NOW, NULL, &ev, detail, sizeof detail),
                     ING_R_BAD_TYPE);
    const char *ok = PAGE_VIEW "}";
    assert_int_equal(ing_validate(ok, strlen(ok), T0 - 3600000LL, NULL, &ev, detail, sizeof detail),
                     ING_OK);
    assert_int_equal(ing_validate(ok, strlen(ok), T0 - 3600001LL, NULL, &ev, detail, sizeof detail),
                     ING_R_FUTURE_TIMESTAMP);

    /* A reused event is fully reset: nothing of the last event leaks into the next. */
    expect_ok(PURCHASE ",\"amount\":3,\"device\":\"d\",\"items\":[{\"product_id\":\"p\"}]}");
    assert_int_equal(ing_validate(ok, strlen(ok), NOW, &LIMITS, &ev, detail, sizeof detail),
                     ING_OK);
    assert_int_equal(ev.amount_cents, 0);
    assert_int_equal(ev.device_len, 0);
    assert_int_equal(ev.n_items, 0);
    assert_string_equal(ev.device, "");
}

static void test_nesting(void **state)
{
    (void)state;
    /* Nested values in ignored fields are fine. */
    char *deep = malloc(2000);
    assert_non_null(deep);
    memset(deep, '[', 500);
    memset(deep + 500, ']', 500);
    deep[1000] = '\0';
    expect_ok(fmt(PAGE_VIEW ",\"x\":%s}", deep));
    free(deep);
}

/* Regression test: jansson 2.14 accepts a raw NUL right after a number or
 * a literal; the contract says invalid_json (found by the fuzzer). */
static void test_raw_nul_after_number(void **state)
{
    (void)state;
    static const char a[] = "{\"event_id\":\"x\",\"user_id\":\"u\",\"event_type\":\"page_view\","
                            "\"ts\":1718000000000\0}";
    static const char b[] = "-0\0";
    static const char c[] = "{\"event_id\":\"x\",\"user_id\":\"u\",\"event_type\":\"page_view\","
                            "\"ts\":1718000000000,\"x\":true\0}";
    ing_limits_t lim = {65536, 3600000};
    ing_event_t *ev = malloc(sizeof *ev);
    char detail[64];
    assert_int_equal(
        ing_validate(a, sizeof a - 1, 1718000000000LL, &lim, ev, detail, sizeof detail),
        ING_R_INVALID_JSON);
    assert_int_equal(
        ing_validate(b, sizeof b - 1, 1718000000000LL, &lim, ev, detail, sizeof detail),
        ING_R_INVALID_JSON);
    assert_int_equal(
        ing_validate(c, sizeof c - 1, 1718000000000LL, &lim, ev, detail, sizeof detail),
        ING_R_INVALID_JSON);
    free(ev);
}

/* ---- the fast parser against jansson ---- */

/*
 * Pack ev, unpack it again and compare: the scalar part byte for byte (both
 * are cleared first), each item up to its NUL, and the packed record's own
 * accessors. Returns the packed size.
 */
static size_t pack_round_trip(const ing_event_t *e)
{
    static uint64_t packed[ING_PACKED_MAX / 8 + 1];
    static ing_event_t back;
    memset(packed, 0xCD, sizeof packed);
    memset(&back, 0xEF, sizeof back);
    size_t want = ing_pack_size(e);
    size_t got = ing_pack(e, packed);
    const ing_packed_t *p = (const ing_packed_t *)(void *)packed;
    assert_int_equal(got, want);
    assert_int_equal(p->size, got);
    assert_int_equal(got % 8, 0);
    assert_true(got <= ING_PACKED_MAX);
    /* The padding is written (zeroed), so packed buffers compare and hash alike. */
    size_t used = sizeof *p;
    for (int f = 0; f < ING_PF__COUNT; f++)
        used += p->len[f];
    for (int i = 0; i < e->n_items; i++)
        used += 1 + e->items[i].product_id_len + 16;
    for (size_t i = used; i < got; i++)
        assert_int_equal(((const uint8_t *)packed)[i], 0);
    assert_int_equal(p->len[ING_PF_USER_ID], e->user_id_len);
    assert_memory_equal(ing_packed_str(p, ING_PF_USER_ID), e->user_id, e->user_id_len);
    assert_int_equal(p->len[ING_PF_EVENT_ID], e->event_id_len);
    assert_memory_equal(ing_packed_str(p, ING_PF_EVENT_ID), e->event_id, e->event_id_len);
    ing_unpack(p, &back);
    assert_memory_equal(&back, e, offsetof(ing_event_t, items));
    for (int i = 0; i < e->n_items; i++) {
        const ing_item_t *x = &e->items[i], *y = &back.items[i];
        assert_int_equal(y->product_id_len, x->product_id_len);
        assert_memory_equal(y->product_id, x->product_id, (size_t)x->product_id_len + 1);
        assert_int_equal(y->quantity, x->quantity);
        assert_int_equal(y->price_cents, x->price_cents);
    }
    return got;
}

/* Validate buf both ways; the reasons, details and events must be identical,
 * and the accepted event must survive packing (pack_round_trip). */
static void diff_one(const char *buf, size_t len)
{
    static ing_event_t a, b;
    char da[64], db[64];
    memset(&a, 0xAB, sizeof a);
    memset(&b, 0xAB, sizeof b);
    ing_reason_t ra = ing_validate(buf, len, NOW, &LIMITS, &a, da, sizeof da);
    ing_reason_t rb = ing_validate_reference(buf, len, NOW, &LIMITS, &b, db, sizeof db);
    int same = ra == rb && strcmp(da, db) == 0;
    if (same && ra == ING_OK)
        same = memcmp(&a, &b, offsetof(ing_event_t, items)) == 0 &&
               memcmp(a.items, b.items, (size_t)a.n_items * sizeof a.items[0]) == 0;
    if (!same) {
        print_error("payload %.*s: fast path %s/%s, jansson %s/%s (or the events differ)\n",
                    (int)len, buf, ing_reason_name(ra), da, ing_reason_name(rb), db);
        fail();
    }
    if (ra == ING_OK)
        pack_round_trip(&a);
}

/* The packed form at both ends: a plain page view packs into a small record,
 * and an event with every string and item at the contract's longest packs
 * within ING_PACKED_MAX and unpacks to itself. */
static void test_pack_round_trip(void **state)
{
    (void)state;
    assert_int_equal(run(PAGE_VIEW ",\"device\":\"mobile\",\"country\":\"DE\"}"), ING_OK);
    size_t small = pack_round_trip(&ev);
    assert_true(small <= 64);
    assert_true(small < offsetof(ing_event_t, items) / 8);

    char items[120000];
    size_t n = 0;
    for (int i = 0; i < ING_ITEMS_MAX; i++)
        n += (size_t)snprintf(items + n, sizeof items - n,
                              "%s{\"product_id\":\"%s%03d\",\"quantity\":%d,\"price\":%d.%02d}",
                              i ? "," : "", rep('p', ING_ID_MAX - 3), i, i + 1, i * 7, i);
    const char *big = fmt("{\"event_id\":\"%s\",\"user_id\":\"%s\",\"event_type\":\"purchase\","
                          "\"ts\":1704067200000,\"device\":\"%s\",\"country\":\"%s\","
                          "\"amount\":123.45,\"items\":[%s]}",
                          rep('e', ING_ID_MAX), rep('u', ING_ID_MAX), rep('d', ING_ATTR_MAX),
                          rep('c', ING_ATTR_MAX), items);
    assert_int_equal(run_len(big, strlen(big)), ING_OK);
    assert_int_equal(ev.n_items, ING_ITEMS_MAX);
    assert_int_equal(ev.items[ING_ITEMS_MAX - 1].product_id_len, ING_ID_MAX);
    pack_round_trip(&ev);

    assert_int_equal(run(ASSIGN ",\"experiment\":\"checkout-v2\",\"variant\":\"treatment\"}"),
                     ING_OK);
    pack_round_trip(&ev);
}

static const char *const DIFF_SEEDS[] = {
    PAGE_VIEW ",\"device\":\"mobile\",\"country\":\"DE\",\"session_id\":\"s1\"}",
    PURCHASE ",\"amount\":59.97,\"items\":[{\"product_id\":\"p1\",\"quantity\":3,\"price\":19.99},"
             "{\"product_id\":\"p2\",\"price\":0}]}",
    PURCHASE ",\"amount\":1e2,\"items\":[{\"product_id\":\"p1\",\"quantity\":1,\"price\":-0.0}]}",
    PURCHASE ",\"amount\":12,\"items\":\"\"}",
    PURCHASE ",\"amount\":0.005,\"items\":null,\"currency\":\"EUR\"}",
    ASSIGN ",\"experiment\":\"exp1\",\"variant\":\"treatment\",\"extra\":{\"a\":[1,2,{}]}}",
    "{\"event_id\":\"e2\",\"user_id\":\"u2\",\"event_type\":\"product_view\","
    "\"ts\":\"2024-01-01T00:00:00.123+01:00\",\"product_id\":\"p9\",\"device\":null,"
    "\"country\":\"\"}",
    "{ \"event_id\" : \"e3\" ,\n\t\"user_id\":\"u3\",\r\"event_type\":\"add_to_cart\","
    "\"ts\":1704067200000 , \"product_id\":\"p\\u0041\", \"ok\":true, \"no\":false }",
    PAGE_VIEW ",\"x\":123456789012345678,\"y\":1234567890123456789,\"z\":-0,\"w\":2.5E-3}",
    PAGE_VIEW ",\"device\":\"caf\xc3\xa9\"}",
    PAGE_VIEW ",\"event_id\":\"dup\"}",
    "{\"event_id\":\"e1\",\"user_id\":\"u1\",\"event_type\":\"page_view\",\"ts\":1.704067200e12}",
    "{\"event_id\":1,\"user_id\":[],\"event_type\":\"Bad\",\"ts\":1e400,\"amount\":1e-400}",
    "[1,2,3]",
    "  {}  ",
    /* Escapes and UTF-8, which the fast path decodes itself. */
    PAGE_VIEW ",\"query\":\"line\\nbreak \\\"q\\\" \\\\ \\/ \\b\\f\\r\\t \\u00e9\\u20AC"
              "\\ud83d\\ude00 caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\x7f\"}",
    "{\"event_id\":\"e\\u0031\",\"user_id\":\"\\u00fcser\",\"event_type\":\"page_view\","
    "\"ts\":1704067200000,\"country\":\"\xc3\x85land\",\"devic\\u0065\":\"m\\/n\"}",
    PAGE_VIEW ",\"q\":\"\\uD800\\uDBFF\\udc00\\u0000\\x\\u12G4\"}",
    PAGE_VIEW
    ",\"q\":\"\xc0\x80\xed\xa0\x80\xf4\x90\x80\x80\xe0\x80\x80\xf0\x80\x80\x80\xf5\xc3\"}",
    PAGE_VIEW ",\"event\\u005fid\":\"dup\"}",
};

/* Byte-level mutations of the seeds with a fixed PRNG: every result is compared. */
static void test_fast_path_equals_jansson(void **state)
{
    (void)state;
    uint64_t rng = 0x9E3779B97F4A7C15ULL;
    static const char alphabet[] = "{}[]\":,\\ \t\n0123456789eE.-+tfnulasrx_TZ\x80\xff\x01\x7f"
                                   "udcDCAb\xc3\xa9\xe2\x82\xed\xa0\xbf\xf0\x9f\xf4\x90\xc0";
    char buf[1024];
    size_t nseeds = sizeof DIFF_SEEDS / sizeof DIFF_SEEDS[0], fast = 0, total = 0;
    for (size_t i = 0; i < nseeds; i++) {
        diff_one(DIFF_SEEDS[i], strlen(DIFF_SEEDS[i]));
        fast += (size_t)ing_validate_fast_path(DIFF_SEEDS[i], strlen(DIFF_SEEDS[i]));
    }
    assert_true(fast >= 8); /* the plain seeds do take the fast path */
    fast = 0;
    for (int round = 0; round < 200000; round++) {
        const char *seed = DIFF_SEEDS[round % nseeds];
        size_t len = strlen(seed);
        memcpy(buf, seed, len);
        int edits = 1 + (int)(round % 3);
        for (int e = 0; e < edits && len > 0; e++) {
            ut_xorshift(&rng);
            size_t at = (size_t)(rng % len);
            char ch = alphabet[(rng >> 32) % (sizeof alphabet - 1)];
            switch ((rng >> 20) % 4) {
            case 0: /* replace */
                buf[at] = ch;
                break;
            case 1: /* insert */
                if (len + 1 < sizeof buf) {
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = ch;
                    len++;
                }
                break;
            case 2: /* delete */
                memmove(buf + at, buf + at + 1, len - at - 1);
                len--;
                break;
            default: /* truncate */
                len = at + 1;
                break;
            }
        }
        diff_one(buf, len);
        fast += (size_t)ing_validate_fast_path(buf, len);
        total++;
    }
    /* Many mutants stay plain enough for the fast path, so it is exercised. */
    assert_true(fast > total / 20);
}

/* Strings with escapes or UTF-8 are read by the fast path itself, with
 * jansson's values; what jansson rejects in them is left to it. */
static void test_fast_path_escapes_and_utf8(void **state)
{
    (void)state;
    static const struct {
        const char *user_id; /* the JSON text between the quotes */
        const char *value;   /* what jansson reads, or NULL: invalid JSON */
    } cases[] = {
        {"plain", "plain"},
        {"caf\xc3\xa9", "caf\xc3\xa9"},
        {"\xe2\x82\xac\xf0\x9f\x98\x80\xef\xbf\xbf\xf4\x8f\xbf\xbf",
         "\xe2\x82\xac\xf0\x9f\x98\x80\xef\xbf\xbf\xf4\x8f\xbf\xbf"},
        {"a\\\"b\\\\c\\/d", "a\"b\\c/d"},
        {"\\b\\f\\n\\r\\tx", "\b\f\n\r\tx"},
        {"\\u0041\\u00e9\\u00E9\\u07ff\\u0800\\uffff",
         "A\xc3\xa9\xc3\xa9\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf"},
        {"\\ud83d\\ude00\\uDBFF\\uDFFF", "\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf"},
        {"x\xc3\xa9\\n\xc3\xa9", "x\xc3\xa9\n\xc3\xa9"},
        {"\\u0000", NULL}, /* JSON_ALLOW_NUL is not passed */
        {"\\ud800", NULL}, /* a lone high surrogate */
        {"\\ud800x", NULL},
        {"\\ud800\\u0041", NULL}, /* not followed by a low one */
        {"\\udc00", NULL},        /* a lone low surrogate */
        {"\\u12g4", NULL},
        {"\\u12", NULL},
        {"\\x", NULL},
        {"\xc0\x80", NULL},     /* overlong */
        {"\xe0\x9f\xbf", NULL}, /* overlong */
        {"\xf0\x8f\xbf\xbf", NULL},
        {"\xed\xa0\x80", NULL},     /* a surrogate half in UTF-8 */
        {"\xf4\x90\x80\x80", NULL}, /* above U+10FFFF */
        {"\xf5\x80\x80\x80", NULL},
        {"\xc3", NULL}, /* cut short by the quote */
        {"\xc3(", NULL},
        {"\x80", NULL}, /* a continuation byte first */
        {"a\tb", NULL}, /* a raw control character */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *msg = fmt("{\"event_id\":\"e1\",\"user_id\":\"%s\",\"event_type\":"
                              "\"page_view\",\"ts\":1704067200000}",
                              cases[i].user_id);
        diff_one(msg, strlen(msg));
        assert_int_equal(ing_validate_fast_path(msg, strlen(msg)), cases[i].value != NULL);
        if (cases[i].value == NULL) {
            expect(msg, ING_R_INVALID_JSON, "");
        } else {
            expect_ok(msg);
            assert_int_equal(ev.user_id_len, strlen(cases[i].value));
            assert_memory_equal(ev.user_id, cases[i].value, ev.user_id_len);
        }
    }
    /* An escaped key is the key it decodes to: a duplicate for jansson too. */
    const char *dup = PAGE_VIEW ",\"event\\u005fid\":\"e2\"}";
    diff_one(dup, strlen(dup));
    expect(dup, ING_R_INVALID_JSON, "");
    const char *key = "{\"event_id\":\"e1\",\"user_\\u0069d\":\"u\\u00e9\",\"event_type\":"
                      "\"page_view\",\"ts\":1704067200000}";
    assert_true(ing_validate_fast_path(key, strlen(key)));
    expect_ok(key);
    assert_string_equal(ev.user_id, "u\xc3\xa9");
    /* Escaped text beyond the scratch buffer goes to jansson, with the same result. */
    static char big[20000];
    size_t n = (size_t)snprintf(big, sizeof big, "%s", PAGE_VIEW ",\"q\":\"");
    while (n + 10 < sizeof big - 8)
        n += (size_t)snprintf(big + n, sizeof big - n, "\\u00e9");
    n += (size_t)snprintf(big + n, sizeof big - n, "\"}");
    assert_false(ing_validate_fast_path(big, n));
    diff_one(big, n);
    expect_len(big, n, ING_OK, "");
}

/* Every input of the committed fuzz corpus, compared both ways. */
static void test_fast_path_corpus(void **state)
{
    (void)state;
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "ls %s/tests/fuzz/corpus", CM_SOURCE_DIR);
    FILE *ls = popen(cmd, "r");
    assert_non_null(ls);
    char name[512];
    int files = 0;
    static char data[70000];
    while (fgets(name, sizeof name, ls)) {
        name[strcspn(name, "\n")] = '\0';
        char path[4096 + 600];
        snprintf(path, sizeof path, "%s/tests/fuzz/corpus/%s", CM_SOURCE_DIR, name);
        FILE *f = fopen(path, "rb");
        if (!f)
            continue;
        size_t n = fread(data, 1, sizeof data, f);
        fclose(f);
        /* A corpus input may hold several messages separated by 0x1e. */
        size_t start = 0;
        for (size_t i = 0; i <= n; i++) {
            if (i == n || data[i] == '\x1e') {
                diff_one(data + start, i - start);
                start = i + 1;
            }
        }
        files++;
    }
    pclose(ls);
    assert_true(files > 100);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reason_names),
        cmocka_unit_test(test_fast_path_equals_jansson),
        cmocka_unit_test(test_fast_path_escapes_and_utf8),
        cmocka_unit_test(test_fast_path_corpus),
        cmocka_unit_test(test_pack_round_trip),
        cmocka_unit_test(test_etype_from),
        cmocka_unit_test(test_valid_page_view),
        cmocka_unit_test(test_other_event_type),
        cmocka_unit_test(test_valid_purchase),
        cmocka_unit_test(test_valid_assignment),
        cmocka_unit_test(test_buffer_not_nul_terminated),
        cmocka_unit_test(test_payload_too_large),
        cmocka_unit_test(test_invalid_json),
        cmocka_unit_test(test_raw_nul_after_number),
        cmocka_unit_test(test_every_prefix_is_invalid),
        cmocka_unit_test(test_not_an_object),
        cmocka_unit_test(test_huge_integers),
        cmocka_unit_test(test_required_fields),
        cmocka_unit_test(test_event_type_pattern),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_ts_integer),
        cmocka_unit_test(test_rfc3339_parser),
        cmocka_unit_test(test_ts_string),
        cmocka_unit_test(test_amount),
        cmocka_unit_test(test_items),
        cmocka_unit_test(test_items_count),
        cmocka_unit_test(test_type_specific_fields_ignored),
        cmocka_unit_test(test_assignment_fields),
        cmocka_unit_test(test_optional_fields),
        cmocka_unit_test(test_future_timestamp),
        cmocka_unit_test(test_detail_buffer),
        cmocka_unit_test(test_nesting),
    };
    return cmocka_run_group_tests_name("validate", tests, NULL, NULL);
}
