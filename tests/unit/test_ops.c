/*
 * test_ops.c - the operator-facing helpers: the flush histogram and rows per table
 * (daemon/metrics.c), the live page's history ring and snapshot (daemon/page.c), and
 * the log line formats (daemon/util.c: JSON lines stay valid JSON, text lines stay one
 * line).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unit_cmocka.h"
#include <jansson.h>

#include "daemon/config.h"
#include "daemon/metrics.h"
#include "daemon/page.h"
#include "daemon/util.h"

static void test_hist(void **state)
{
    (void)state;
    mx_hist_t h = {0};
    mx_hist_observe(&h, 0.001); /* first bucket */
    mx_hist_observe(&h, 0.005); /* le is inclusive */
    mx_hist_observe(&h, 0.3);   /* 0.5 */
    mx_hist_observe(&h, 120.0); /* only +Inf */
    assert_int_equal(h.count, 4);
    assert_true(h.sum > 120.3 && h.sum < 120.31);
    assert_int_equal(mx_hist_cumulative(&h, 0), 2);
    int half = -1;
    for (int i = 0; i < MX_FLUSH_BUCKETS; i++)
        if (mx_flush_bucket_le[i] == 0.5)
            half = i;
    assert_true(half > 0);
    assert_int_equal(mx_hist_cumulative(&h, half - 1), 2);
    assert_int_equal(mx_hist_cumulative(&h, half), 3);
    assert_int_equal(mx_hist_cumulative(&h, MX_FLUSH_BUCKETS - 1), 3);
    for (int i = 1; i < MX_FLUSH_BUCKETS; i++)
        assert_true(mx_flush_bucket_le[i] > mx_flush_bucket_le[i - 1]);
}

static void test_rows(void **state)
{
    (void)state;
    mx_rows_t r = {0};
    snk_batch_t b;
    memset(&b, 0, sizeof b);
    b.n_sessions = 5;
    b.n_deleted_sessions = 2;
    b.n_users = 3;
    b.n_funnel = 7;
    b.n_partitions = 4;
    b.n_rejects = 1;
    b.gen[SNK_EXPERIMENTS].n = 2;
    b.gen[SNK_USER_OUTCOMES].n_del = 6;
    mx_rows_add(&r, &b);
    mx_rows_add(&r, &b);
    mx_rows_add(&r, NULL);
    assert_int_equal(r.written[MX_T_SESSIONS], 10);
    assert_int_equal(r.deleted[MX_T_SESSIONS], 4);
    assert_int_equal(r.written[MX_T_FUNNEL_DAILY], 14);
    assert_int_equal(r.written[MX_T_GEN + SNK_EXPERIMENTS], 4);
    assert_int_equal(r.deleted[MX_T_GEN + SNK_USER_OUTCOMES], 12);
    assert_string_equal(mx_table_name(MX_T_REJECTED_EVENTS), "rejected_events");
    assert_string_equal(mx_table_name(MX_T_GEN + SNK_EXPERIMENT_REGRESSION),
                        "experiment_regression");
    assert_string_equal(mx_table_name(MX_N_TABLES), "unknown");
    /* Every table has a distinct name: they are label values. */
    for (int i = 0; i < MX_N_TABLES; i++)
        for (int k = i + 1; k < MX_N_TABLES; k++)
            assert_string_not_equal(mx_table_name(i), mx_table_name(k));
}

static void test_history_ring(void **state)
{
    (void)state;
    static page_hist_t h; /* zeroed */
    /* First sample primes the rates: 0. Then 1000 messages per 2 s = 500/s. */
    for (int i = 0; i < PAGE_HIST_CAP + 10; i++)
        page_hist_sample(&h, 2000.0 * i, 1000 * (int64_t)i, 1000u * (uint64_t)i, 900 * (int64_t)i,
                         i, i % 2 ? 1.5 : -1);
    assert_int_equal(h.n, PAGE_HIST_CAP);
    char *s = page_snapshot_json(json_pack("{s:i}", "accepted", 42),
                                 "{\"funnel\":[],\"experiments\":[]}", NULL, &h, 123);
    assert_non_null(s);
    json_error_t err;
    json_t *o = json_loads(s, 0, &err);
    free(s);
    assert_non_null(o);
    assert_int_equal(json_integer_value(json_object_get(o, "now")), 123);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(o, "status"), "accepted")),
                     42);
    assert_true(json_is_array(json_object_get(o, "funnel")));
    json_t *hist = json_object_get(o, "history");
    json_t *t = json_object_get(hist, "t"), *rate = json_object_get(hist, "rate");
    json_t *lag_s = json_object_get(hist, "lag_s");
    assert_int_equal(json_array_size(t), PAGE_HIST_CAP);
    /* Oldest first: the 10 oldest samples were overwritten. */
    assert_int_equal(json_integer_value(json_array_get(t, 0)), 10 * 1000);
    assert_int_equal(json_integer_value(json_array_get(t, PAGE_HIST_CAP - 1)),
                     (PAGE_HIST_CAP + 9) * 1000);
    assert_true(json_real_value(json_array_get(rate, 5)) == 500.0);
    assert_true(json_real_value(json_array_get(json_object_get(hist, "accepted_rate"), 5)) ==
                450.0);
    assert_true(json_is_null(json_array_get(lag_s, 0))); /* sample 10: unknown */
    assert_true(json_real_value(json_array_get(lag_s, 1)) == 1.5);
    json_decref(o);

    /* Without marts, the snapshot says why. */
    s = page_snapshot_json(json_object(), NULL, "state busy", &h, 1);
    o = json_loads(s, 0, &err);
    free(s);
    assert_string_equal(json_string_value(json_object_get(o, "marts_error")), "state busy");
    json_decref(o);

    size_t n = 0;
    const char *html = page_html(&n);
    assert_true(n > 1000);
    assert_non_null(memmem(html, n, "api/snapshot", 12));
    assert_non_null(memmem(html, n, "id=\"chart-rate\"", 15));
}

/* Log to a temp file in place of stderr and return its content. */
static char *capture(int json, void (*emit)(void))
{
    char path[] = "/tmp/test_ops_log.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    cm_log_set_json(json);
    emit();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    cm_log_set_json(0);
    FILE *f = fdopen(fd, "r");
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    rewind(f);
    char *buf = calloc(1, (size_t)len + 1);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    unlink(path);
    return buf;
}

static void emit_tricky(void)
{
    cm_info("starting", "pg=\"host=/tmp/x port=5432 user=a b\" schema=clickmart");
    cm_warn("postgres flush failed; will retry",
            "retry_in_ms=250 error=\"connect: socket \"/tmp/.s.PGSQL.5432\" failed\n\tIs the "
            "server running?\"");
    cm_err("odd bytes", "detail=%s n=%d", "bad\xff\xfe utf8 \xe2\x82 cut", 3);
    cm_info("utf8", "name=%s", "pé€😀");
    cm_info("empty", "%s", "");
    cm_info("ctl", "x=\x01\x7f y=2");
}

static void test_json_log_lines(void **state)
{
    (void)state;
    char *out = capture(1, emit_tricky);
    int lines = 0;
    for (char *line = out, *nl; (nl = strchr(line, '\n')) != NULL; line = nl + 1) {
        *nl = '\0';
        json_error_t err;
        json_t *o = json_loads(line, 0, &err);
        if (!o)
            fail_msg("not JSON: %s (%s)", line, err.text);
        assert_non_null(json_object_get(o, "ts"));
        assert_non_null(json_object_get(o, "level"));
        const char *msg = json_string_value(json_object_get(o, "msg"));
        if (!strcmp(msg, "starting")) {
            assert_string_equal(json_string_value(json_object_get(o, "pg")),
                                "host=/tmp/x port=5432 user=a b");
            assert_string_equal(json_string_value(json_object_get(o, "schema")), "clickmart");
        } else if (!strcmp(msg, "postgres flush failed; will retry")) {
            assert_string_equal(json_string_value(json_object_get(o, "retry_in_ms")), "250");
            const char *e = json_string_value(json_object_get(o, "error"));
            assert_non_null(e);
            assert_true(strncmp(e, "connect: socket", 15) == 0);
            assert_non_null(strstr(e, "Is the server running?"));
        } else if (!strcmp(msg, "utf8")) {
            assert_string_equal(json_string_value(json_object_get(o, "name")), "pé€😀");
        } else if (!strcmp(msg, "odd bytes")) {
            assert_non_null(
                strstr(json_string_value(json_object_get(o, "detail")), "\xef\xbf\xbd"));
            assert_string_equal(json_string_value(json_object_get(o, "n")), "3");
        }
        json_decref(o);
        lines++;
    }
    assert_int_equal(lines, 6);
    free(out);
}

/*
 * Read the value of key in one logfmt line the way logfmt readers do: a
 * bare value runs to the next space, a quoted one to the first quote that
 * no backslash escapes, and \" and \\ stand for the characters. Fails the
 * test on a line that does not read as key=value pairs to its end.
 */
static int logfmt_get(const char *line, const char *key, char *val, size_t cap)
{
    int found = 0;
    const char *p = line;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *eq = strchr(p, '=');
        if (!eq)
            fail_msg("no key=value at \"%s\" in: %s", p, line);
        for (const char *k = p; k < eq; k++)
            if (*k == ' ' || *k == '"')
                fail_msg("bad key before \"%s\" in: %s", eq, line);
        int mine = (size_t)(eq - p) == strlen(key) && strncmp(p, key, strlen(key)) == 0;
        size_t n = 0;
        p = eq + 1;
        if (*p == '"') {
            for (p++; *p != '"'; p++) {
                if (!*p)
                    fail_msg("unterminated quoted value in: %s", line);
                if (*p == '\\' && (p[1] == '"' || p[1] == '\\'))
                    p++;
                if (mine && n + 1 < cap)
                    val[n++] = *p;
            }
            p++;
            if (*p && *p != ' ')
                fail_msg("text right after a closing quote in: %s", line);
        } else {
            for (; *p && *p != ' '; p++) {
                if (*p == '"')
                    fail_msg("a quote inside a bare value in: %s", line);
                if (mine && n + 1 < cap)
                    val[n++] = *p;
            }
        }
        if (mine) {
            val[n] = '\0';
            found = 1;
        }
    }
    return found;
}

static void test_text_log_one_line(void **state)
{
    (void)state;
    char *out = capture(0, emit_tricky);
    int lines = 0;
    for (char *p = out; *p; p++) {
        if (*p == '\n')
            lines++;
        else
            assert_true((unsigned char)*p >= 0x20);
    }
    assert_int_equal(lines, 6);
    assert_non_null(strstr(out, "msg=\"starting\" pg=\"host=/tmp/x port=5432 user=a b\""));

    /* Every line reads back as logfmt, and a value holding quotes of its
     * own (libpq quotes the socket it cannot reach) comes back whole. */
    char v[512];
    int flush_failed = 0;
    for (char *line = out, *nl; (nl = strchr(line, '\n')) != NULL; line = nl + 1) {
        *nl = '\0';
        assert_true(logfmt_get(line, "ts", v, sizeof v));
        assert_true(logfmt_get(line, "msg", v, sizeof v));
        if (strcmp(v, "postgres flush failed; will retry") == 0) {
            flush_failed = 1;
            assert_true(logfmt_get(line, "error", v, sizeof v));
            assert_string_equal(
                v, "connect: socket \"/tmp/.s.PGSQL.5432\" failed  Is the server running?");
            assert_true(logfmt_get(line, "retry_in_ms", v, sizeof v));
            assert_string_equal(v, "250");
        } else if (strcmp(v, "starting") == 0) {
            assert_true(logfmt_get(line, "pg", v, sizeof v));
            assert_string_equal(v, "host=/tmp/x port=5432 user=a b");
            assert_true(logfmt_get(line, "schema", v, sizeof v));
            assert_string_equal(v, "clickmart");
        }
    }
    assert_true(flush_failed);
    free(out);
}

/* Whether --exit-at-end's end offsets come before the next tick
 * (cm_end_within), at the pace of the last interval. */
static void test_end_within(void **state)
{
    (void)state;
    /* 1 M run, 2 s ticks: 400 000 left after 600 000 in 2 s comes in 1.33 s,
     * within 0.8 of an interval (1.6 s); 500 000 left would take 1.67 s. */
    assert_true(cm_end_within(1000000, 400000, 2000, 2000, 0.8));
    assert_false(cm_end_within(1000000, 500000, 2000, 2000, 0.8));
    /* The pace is the last interval's: half the messages in the same time
     * doubles the wait. */
    assert_false(cm_end_within(700000, 400000, 2000, 2000, 0.8));
    assert_true(cm_end_within(700000, 200000, 2000, 2000, 0.8));
    /* At the end, without a pace (nothing moved, first tick, no time) or
     * with more left than before (cannot happen; no guess): never. */
    assert_false(cm_end_within(400000, 0, 2000, 2000, 0.8));
    assert_false(cm_end_within(400000, 400000, 2000, 2000, 0.8));
    assert_false(cm_end_within(0, 400000, 2000, 2000, 0.8));
    assert_false(cm_end_within(400000, 500000, 2000, 2000, 0.8));
    assert_false(cm_end_within(1000000, 10, 0, 2000, 0.8));
    /* A stall: one message in an interval, a hundred left. */
    assert_false(cm_end_within(101, 100, 2000, 2000, 0.8));
}

/* Whether intake is behind by more than an interval (cm_behind), at the
 * pace of the last interval. */
static void test_behind(void **state)
{
    (void)state;
    /* A 10 M backfill: 9 M behind at 200 000 events/s is 45 s. */
    assert_true(cm_behind(9000000, 400000, 2000, 2000));
    /* Steady 100 000 events/s with 50 000 in flight: 0.5 s, not behind. */
    assert_false(cm_behind(50000, 200000, 2000, 2000));
    /* Exactly one interval behind is not more than one. */
    assert_false(cm_behind(200000, 200000, 2000, 2000));
    assert_true(cm_behind(200001, 200000, 2000, 2000));
    /* No lag, or no pace (intake stalled or paused, the first tick): never. */
    assert_false(cm_behind(0, 200000, 2000, 2000));
    assert_false(cm_behind(9000000, 0, 2000, 2000));
    assert_false(cm_behind(9000000, 400000, 0, 2000));
}

/* Whether a tick counts intake as behind for --catchup-flush-interval-ms
 * (cm_tick_behind): with --exit-at-end, while anything is left to the end
 * offsets, whatever the pace. */
static void test_tick_behind(void **state)
{
    (void)state;
    /* The CI failure: 100 messages left 57 ms after 220 were, a 50 ms
     * interval. At that pace the end is 47.5 ms away: less than an interval
     * (not behind by the pace) but more than the end rule's 0.8 of one, so
     * that tick flushed shortly before the final flush. */
    assert_false(cm_behind(100, 120, 57, 50));
    assert_false(cm_end_within(220, 100, 57, 50, 0.8));
    assert_true(cm_tick_behind(100, 100, 120, 57, 50));
    /* A stalled interval near the end: no pace, still behind. */
    assert_true(cm_tick_behind(5, 5, 0, 50, 50));
    assert_true(cm_tick_behind(1, 1, 0, 0, 50));
    /* At the end: not behind. */
    assert_false(cm_tick_behind(0, 0, 400000, 2000, 2000));
    /* Without --exit-at-end (left < 0), the pace decides, as cm_behind. */
    assert_true(cm_tick_behind(-1, 9000000, 400000, 2000, 2000));
    assert_false(cm_tick_behind(-1, 50000, 200000, 2000, 2000));
    assert_false(cm_tick_behind(-1, 9000000, 0, 2000, 2000));
}

/* The size of the next LMDB transaction (cm_txn_target): it doubles while
 * catching up on commits that write much per message, up to the maximum,
 * halves on cheap ones down to --txn-messages, and is --txn-messages at
 * steady rates or when growing is off. */
static void test_txn_target(void **state)
{
    (void)state;
    const size_t base = 160000, max = 320000;
    /* The 1 M benchmark's full transactions wrote 250-350 bytes per message: no change. */
    assert_int_equal(cm_txn_target(base, base, max, 160000, 160000 * 350ull, 1), base);
    /* The 10 M benchmark's later ones wrote ~900: doubled, then held at the maximum. */
    assert_int_equal(cm_txn_target(base, base, max, 160000, 160000 * 900ull, 1), max);
    assert_int_equal(cm_txn_target(max, base, max, 320000, 320000 * 900ull, 1), max);
    assert_int_equal(cm_txn_target(max, base, 4 * max, 320000, 320000 * 601ull, 1), 2 * max);
    /* Between the two thresholds it stays; below the lower one it halves. */
    assert_int_equal(cm_txn_target(max, base, max, 320000, 320000 * 400ull, 1), max);
    assert_int_equal(cm_txn_target(max, base, max, 320000, 320000 * 199ull, 1), base);
    assert_int_equal(cm_txn_target(base, base, max, 160000, 160000 * 100ull, 1), base);
    /* Not catching up, growing off (max <= base), or nothing committed: --txn-messages. */
    assert_int_equal(cm_txn_target(max, base, max, 320000, 320000 * 900ull, 0), base);
    assert_int_equal(cm_txn_target(base, base, 1, 160000, 160000 * 900ull, 1), base);
    assert_int_equal(cm_txn_target(base, base, base, 160000, 160000 * 900ull, 1), base);
    assert_int_equal(cm_txn_target(max, base, max, 0, 1000, 1), base);
    /* A maximum that is not a power of two of the base is reached, not passed. */
    assert_int_equal(cm_txn_target(base, base, 250000, 160000, 160000 * 900ull, 1), 250000);
    /* This process's write calls are counted, and a write adds its bytes. */
    uint64_t w0 = 0, w1 = 0;
    assert_int_equal(cm_write_bytes(&w0), 0);
    FILE *f = tmpfile();
    assert_non_null(f);
    char buf[4096] = {0};
    assert_int_equal(fwrite(buf, 1, sizeof buf, f), sizeof buf);
    assert_int_equal(fflush(f), 0);
    fclose(f);
    assert_int_equal(cm_write_bytes(&w1), 0);
    assert_true(w1 >= w0 + sizeof buf);
}

/* Load path with cfg_parse into c; the return code. */
static int load_config(cfg_t *c, const char *path, char *eb, size_t ecap)
{
    char a0[] = "clickmartd", a1[] = "--config";
    char *argv[] = {a0, a1, (char *)path, NULL};
    cfg_defaults(c);
    return cfg_parse(c, 3, argv, eb, ecap);
}

/* A config file's lines of any length: a comment longer than inih's line
 * buffer is ignored whole (its tail once came back as a continuation of the
 * setting above it and failed the sample config), a setting that long is
 * refused with its line number. */
static void test_config_long_lines(void **state)
{
    (void)state;
    char path[] = "/tmp/clickmart-test-cfg.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fprintf(f, "batch-size = 1234\n# ");
    for (int i = 0; i < 60; i++)
        fprintf(f, "words, ");
    fprintf(f, "more words [1..4000000].\n; ");
    for (int i = 0; i < 80; i++)
        fprintf(f, "x");
    fprintf(f, "\ntxn-messages = 4321\n");
    fclose(f);
    cfg_t c;
    char eb[512] = "";
    assert_int_equal(load_config(&c, path, eb, sizeof eb), 0);
    assert_int_equal(c.batch_size, 1234);
    assert_int_equal(c.txn_messages, 4321);
    cfg_free(&c);

    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "batch-size = 1234\npg = host=");
    for (int i = 0; i < 300; i++)
        fprintf(f, "h");
    fprintf(f, "\n");
    fclose(f);
    assert_int_equal(load_config(&c, path, eb, sizeof eb), CFG_EFILE);
    assert_non_null(strstr(eb, "line 2 is too long"));
    cfg_free(&c);
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hist),
        cmocka_unit_test(test_rows),
        cmocka_unit_test(test_history_ring),
        cmocka_unit_test(test_json_log_lines),
        cmocka_unit_test(test_text_log_one_line),
        cmocka_unit_test(test_end_within),
        cmocka_unit_test(test_behind),
        cmocka_unit_test(test_tick_behind),
        cmocka_unit_test(test_txn_target),
        cmocka_unit_test(test_config_long_lines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
