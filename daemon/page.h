/*
 * page.h - the live page: GET / (HTML, embedded in the binary at build time
 * from daemon/page.html) and GET /api/snapshot (JSON the page polls).
 *
 * The snapshot joins three things: the /status object, the marts snapshot
 * of agg_snapshot_json (funnel, experiments) and a ring buffer of
 * ingest-rate and lag samples covering the last ~10 minutes, which the
 * daemon fills from its stats timer every PAGE_SAMPLE_MS. Loop thread only.
 */
#ifndef CLICKMART_DAEMON_PAGE_H
#define CLICKMART_DAEMON_PAGE_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define PAGE_SAMPLE_MS 2000
#define PAGE_HIST_CAP 300 /* 300 samples x 2 s = 10 minutes */

typedef struct page_sample {
    int64_t t_ms;         /* wall clock, ms since the epoch */
    double rate;          /* messages consumed per second since the previous sample */
    double accepted_rate; /* accepted events per second since the previous sample */
    int64_t lag;          /* messages behind the end offsets, summed over partitions */
    double lag_s;         /* largest now - watermark over partitions (s); < 0: unknown */
} page_sample_t;

typedef struct page_hist {
    page_sample_t s[PAGE_HIST_CAP];
    int head, n; /* oldest sample at s[(head - n) mod CAP] */
    int primed;
    double last_mono;
    uint64_t last_msgs;
    int64_t last_accepted;
} page_hist_t;

/*
 * Add a sample: `messages` and `accepted` are running totals; the rates are
 * computed against the previous call (the first call only primes them).
 * `mono_ms` is a monotonic clock, `now_ms` the wall clock.
 */
void page_hist_sample(page_hist_t *h, double mono_ms, int64_t now_ms, uint64_t messages,
                      int64_t accepted, int64_t lag, double lag_s);

/*
 * The /api/snapshot body: {"now": ms, "status": status (stolen reference),
 * "history": {"interval_ms", "t": [...], "rate": [...], "accepted_rate":
 * [...], "lag": [...], "lag_s": [...]}, plus every member of `marts_json`
 * (agg_snapshot_json's object: "funnel", "experiments", "confidence"), or
 * "marts_error" when marts_json is NULL}. malloc'ed; NULL without memory.
 */
char *page_snapshot_json(json_t *status, const char *marts_json, const char *marts_error,
                         const page_hist_t *h, int64_t now_ms);

/* The embedded page (daemon/page.html), not NUL-terminated. */
const char *page_html(size_t *len);

#endif
