/*
 * metrics.h - the figures /metrics needs that no other module keeps: a
 * Prometheus-style histogram (flush durations) and the rows written and
 * deleted per Postgres table. Plain counters, loop thread only.
 */
#ifndef CLICKMART_DAEMON_METRICS_H
#define CLICKMART_DAEMON_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "sink/sink.h"

/* Upper bounds (seconds) of the flush duration buckets; +Inf is implied. */
#define MX_FLUSH_BUCKETS 13
extern const double mx_flush_bucket_le[MX_FLUSH_BUCKETS];

typedef struct mx_hist {
    uint64_t bucket[MX_FLUSH_BUCKETS]; /* non-cumulative: observations in (le[i-1], le[i]] */
    uint64_t count;
    double sum;
} mx_hist_t;

void mx_hist_observe(mx_hist_t *h, double v);
/* Cumulative count of observations <= mx_flush_bucket_le[i]. */
uint64_t mx_hist_cumulative(const mx_hist_t *h, int i);

/* The Postgres tables a flush writes, in a fixed order: the five core tables,
 * then the generic ones in enum snk_table order. */
enum {
    MX_T_SESSIONS = 0,
    MX_T_USERS,
    MX_T_FUNNEL_DAILY,
    MX_T_PARTITIONS,
    MX_T_REJECTED_EVENTS,
    MX_T_GEN, /* + enum snk_table */
    MX_N_TABLES = MX_T_GEN + SNK_TABLE__COUNT
};

typedef struct mx_rows {
    uint64_t written[MX_N_TABLES];
    uint64_t deleted[MX_N_TABLES];
} mx_rows_t;

/* The table's name as in docs/schema.md (used as the `table` label). */
const char *mx_table_name(int t);

/* Count the rows of a batch that Postgres committed. */
void mx_rows_add(mx_rows_t *r, const snk_batch_t *b);

#endif
