/*
 * metrics.c - flush duration histogram and rows per table. See metrics.h.
 */
#include "daemon/metrics.h"

const double mx_flush_bucket_le[MX_FLUSH_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                     1,     2.5,  5,     10,   30,  60};

void mx_hist_observe(mx_hist_t *h, double v)
{
    h->count++;
    h->sum += v;
    for (int i = 0; i < MX_FLUSH_BUCKETS; i++) {
        if (v <= mx_flush_bucket_le[i]) {
            h->bucket[i]++;
            return;
        }
    }
    /* Above the largest bound: only in +Inf, which is `count`. */
}

uint64_t mx_hist_cumulative(const mx_hist_t *h, int i)
{
    uint64_t s = 0;
    for (int k = 0; k <= i && k < MX_FLUSH_BUCKETS; k++)
        s += h->bucket[k];
    return s;
}

static const char *const names[MX_N_TABLES] = {
    [MX_T_SESSIONS] = "sessions",
    [MX_T_USERS] = "users",
    [MX_T_FUNNEL_DAILY] = "funnel_daily",
    [MX_T_PARTITIONS] = "partitions",
    [MX_T_REJECTED_EVENTS] = "rejected_events",
    [MX_T_GEN + SNK_PRODUCT_DAILY] = "product_daily",
    [MX_T_GEN + SNK_PRODUCT_PAIRS] = "product_pairs",
    [MX_T_GEN + SNK_BASKET_DAILY] = "basket_daily",
    [MX_T_GEN + SNK_COHORT_RETENTION] = "cohort_retention",
    [MX_T_GEN + SNK_USER_EXPOSURE] = "user_exposure",
    [MX_T_GEN + SNK_USER_OUTCOMES] = "user_outcomes",
    [MX_T_GEN + SNK_EXPERIMENTS] = "experiments",
    [MX_T_GEN + SNK_EXPERIMENT_RESULTS] = "experiment_results",
    [MX_T_GEN + SNK_EXPERIMENT_REGRESSION] = "experiment_regression",
};

const char *mx_table_name(int t)
{
    return t >= 0 && t < MX_N_TABLES && names[t] ? names[t] : "unknown";
}

void mx_rows_add(mx_rows_t *r, const snk_batch_t *b)
{
    if (!b)
        return;
    r->written[MX_T_SESSIONS] += b->n_sessions;
    r->deleted[MX_T_SESSIONS] += b->n_deleted_sessions;
    r->written[MX_T_USERS] += b->n_users;
    r->written[MX_T_FUNNEL_DAILY] += b->n_funnel;
    r->written[MX_T_PARTITIONS] += b->n_partitions;
    r->written[MX_T_REJECTED_EVENTS] += b->n_rejects;
    for (int t = 0; t < SNK_TABLE__COUNT; t++) {
        r->written[MX_T_GEN + t] += b->gen[t].n + b->gen[t].n_new;
        r->deleted[MX_T_GEN + t] += b->gen[t].n_del;
    }
}
