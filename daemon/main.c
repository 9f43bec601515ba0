/*
 * main.c - clickmartd: the event loop that ties the modules together.
 *
 * One libuv loop thread consumes Kafka, validates, applies each batch to the
 * LMDB state in one write transaction (offsets included) and serves the
 * status socket. Flushes to Postgres run on libuv's thread pool, one at a
 * time, reading a committed LMDB snapshot, so Postgres never blocks intake.
 */
#include <jansson.h>
#ifdef __linux__
#include <sys/resource.h>
#endif
#include <errno.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "aggregator/agg.h"
#include "daemon/config.h"
#include "daemon/heap.h"
#include "daemon/metrics.h"
#include "daemon/notify.h"
#include "daemon/page.h"
#include "daemon/status.h"
#include "daemon/util.h"
#include "ingest/consumer.h"
#include "ingest/parser.h"
#include "ingest/validate.h"
#include "sink/sink.h"
#include "store/store.h"

#define CLICKMART_VERSION "0.1.0"

typedef struct dmn {
    uv_loop_t *loop;
    cfg_t cfg;
    st_env_t *env;
    agg_t *agg;
    ing_consumer_t *cons;
    sts_server_t *sts;
    ing_limits_t lim;
    ing_event_t *ev;
    int32_t n_parts;
    int64_t *ends, *lows; /* --exit-at-end targets */
    uv_timer_t flush_timer, stats_timer, grow_timer, ahead_timer;
    uv_signal_t sig_term, sig_int;
    int handles_open;

    /* Flush state. The work item touches pg, fl, fl_rc and fl_err only. */
    uv_work_t work;
    int inflight;
    agg_flush_t *fl;
    int fl_regression;      /* this flush refits the experiments' regressions */
    double last_regression; /* monotonic ms of the last refit */
    int fl_rc;
    double fl_collect_ms; /* of the running flush: reading the rows from LMDB (worker) */
    int fl_redone;        /* the running flush was redone with upserts (snk_flush_redone) */
    int fl_part;          /* the running work item writes a part ahead (--flush-ahead-ms) */
    int fl_users_later;   /* ... leaving the per-user rows to the flush (catching up) */
    int fl_restarted;     /* the parts were lost to SNK_ERESTART and the flush written whole */
    /* The latest part written ahead into the connection's open transaction
     * (agg_flush_collect_after) and how many parts it closes; the work item
     * sets and drops them, the loop thread reads them only between items. */
    agg_flush_t *ahead;
    int ahead_parts;
    char fl_err[512];
    double fl_t0;
    /* Where the loop thread's time goes (/status "loop", the "stopped" line):
     * in LMDB commits (fsync included), and with nothing to apply while intake
     * was not paused, waiting either for librdkafka to deliver messages or
     * for the thread pool to validate them. */
    double commit_ms, wait_kafka_ms, wait_validation_ms;
    double wait_t0; /* a wait for input began (0: none) */
    int wait_validating;
    snk_conn_t *pg;
    int pg_up;
    int64_t backoff_ms;
    double next_try;
    uint64_t batches, batches_at_flush, batches_flushed;
    uint64_t commits; /* LMDB transactions committed by intake (each one or more batches) */
    int flushed_once;

    /* Figures for /status, /metrics and the summary line. */
    int64_t last_flush_at;
    double last_flush_ms;
    size_t last_flush_rows;
    uint64_t flushes, flush_failures, rows_written;
    uint64_t flushes_redone; /* flushes redone with upserts (snk_flush_redone) */
    /* Writing ahead: per-table counts of the open parts' rows (added to the
     * totals when the flush commits them), parts written, failed. */
    mx_rows_t ahead_tally;
    uint64_t parts_ahead, parts_ahead_failed;
    int ahead_blocked;        /* a part failed: none until a flush has succeeded */
    uint64_t batches_at_send; /* batches when the last part or flush started */
    double last_send;         /* monotonic ms when the last part or flush started */
    uint64_t msgs, msgs_at_last_stats;
    double last_stats_t;
    double started;
    uint64_t pauses;
    /* Operator figures (daemon/metrics.h, daemon/page.h). */
    mx_hist_t flush_hist;   /* durations of successful flushes, seconds */
    mx_rows_t table_rows;   /* rows written / deleted per table by successful flushes */
    double last_flush_mono; /* monotonic ms of the last successful flush */
    page_hist_t hist;       /* rate and lag samples for the live page */
    double last_sample_t;   /* monotonic ms of the last history sample */
    char health[512];       /* why /healthz says unhealthy ("" when healthy) */

    int pause_backpressure;
    int rebuild; /* --allow-state-rebuild took effect: start from the earliest offsets */
    /* With an empty state, whether the tables already hold the topic
     * (fresh_needed, fresh_pg, fresh_decide). The Postgres side runs on a thread of its own;
     * when the consumer's start offsets do not depend on the answer, intake
     * starts meanwhile and nothing is applied or flushed until it is in
     * (fresh_pending). */
    uv_thread_t fresh_thread;
    uv_async_t fresh_async;
    int fresh_thread_on;                /* started and not joined yet */
    int fresh_pending;                  /* the loop waits for it (on_fresh_done) */
    int fresh_failed;                   /* it refused: stop without flushing */
    atomic_int fresh_cancel;            /* a signal or a failed start: stop retrying */
    int fresh_rc;                       /* the thread's outcome: 0, or 1 after logging why */
    int64_t fresh_rows, fresh_max_next; /* partitions rows of the topic, largest next_offset */
    double fresh_t0, fresh_ms;          /* when it started, and how long it took */
    ing_parser_t *parser;
/* Batches one transaction gathers at most (besides --txn-messages). */
#define TXN_BATCHES_MAX 16
/* Held: the open transaction's batches, plus those validated or being
 * validated meanwhile (parse_ahead() + 1, see in_flight). */
#define HELD_MAX (TXN_BATCHES_MAX + 8)
    ing_batch_t *held[HELD_MAX]; /* validated batches, in order, not yet committed */
    size_t n_held;
    size_t cur;                /* held[0..cur) are applied in the open transaction */
    size_t pos;                /* next message of held[cur] to apply */
    int txn_open;              /* an LMDB transaction is open (held[0..cur], from held[0]) */
    double txn_t0;             /* monotonic ms when the open transaction began */
    size_t txn_msgs;           /* messages of the batches applied in it */
    size_t txn_target;         /* messages after which it commits (txn_limit, cm_txn_target) */
    int txn_closing;           /* it became due: its updates are drained, then it commits */
    uint64_t txn_grows;        /* times the target doubled while catching up */
    uv_timer_t commit_timer;   /* commits a transaction left open to gather batches */
    int map_full;              /* the map filled up: intake paused until it grows */
    int storage_failed;        /* an LMDB write failed (disk full?): paused, retried */
    int txn_full;              /* with map_full: the checkpoint's dirty pages, not the map */
    double storage_retry_at;   /* monotonic ms of the next retry */
    uv_idle_t apply_idle;      /* continues applying on the next loop iteration */
    agg_flush_t *fl_clear;     /* a committed flush whose dirty marks wait for the txn */
    const char *huge_pages;    /* what cm_heap_start did, for the log (static string) */
    int flush_due;             /* a flush tick came while the previous flush or a part ran */
    int flush_due_part;        /* ... a part written ahead, begun within the interval */
    uint64_t flushes_due;      /* flushes started off the tick: the previous flush (or its
                                * marks' clearing) still ran, or a part older than an
                                * interval */
    uint64_t ticks_after_part; /* flushes started when the part their tick found was done */
    uint64_t ticks_before_end; /* ticks left to the final flush (leave_tick) */
    uint64_t ticks_behind;     /* ticks left to a later flush while behind (leave_tick) */
    int64_t tick_left;         /* messages left to the end offsets at the last tick */
    uint64_t tick_msgs;        /* messages committed at the last tick */
    double tick_t;             /* monotonic ms of the last tick (0: none yet) */
    int tick_end;              /* the last tick was left to the final flush */
    double flush_t0;           /* monotonic ms when the last flush (not a part) began */
    /* Checkpoints (--checkpoint-messages): transactions nest in a checkpoint
     * transaction that becomes durable before every flush and after that
     * many messages (agg_checkpoint). */
    int ckpt;              /* on */
    int ckpt_failed;       /* a checkpoint failed: stopping, nothing more is flushed */
    int ckpt_grow;         /* ... on a full map: grow it before the stop (grow_for_restart) */
    int ckpt_deferred;     /* a tick waits for the open transaction to checkpoint */
    uint64_t ckpt_msgs;    /* messages committed since the last checkpoint */
    uint64_t ckpt_limit;   /* messages after which it checkpoints (map_full, checkpoint) */
    uint64_t checkpoints;  /* checkpoints committed */
    uint64_t ckpt_shrinks; /* checkpoints too large for LMDB (ST_ETXNFULL): the limit halved */
    double ckpt_ms;        /* the loop thread's time in them (fsync included) */
    int fl_ready;          /* the work item's part was collected on the loop thread */
    /* The running part when the loop thread collected it (start_part): the
     * worker only reads it, and frees it on neither outcome, so the loop
     * thread may read it too until part_after. */
    const agg_flush_t *part_loop;
    /* A flush (not a part) collected on the loop thread (fl_ready) was read
     * from the open checkpoint transaction before its checkpoint
     * (start_flush): Postgres commits it only once the loop thread's
     * checkpoint is durable (ckpt_gate). */
    uv_mutex_t gate_mu; /* guards gate_state; with gate_cv */
    uv_cond_t gate_cv;
    int gate_state;         /* GATE_* */
    double fl_gate_ms;      /* the running flush's wait at the gate (worker) */
    uint64_t flushes_early; /* flushes collected before their checkpoint */
    double gate_wait_ms;    /* their workers' waits at the gate, summed */
    /* The final flush, collected on the loop thread while the last part
     * still runs in Postgres (continue_stop): it holds what changed after
     * that part, so it is used only if the part succeeds. */
    agg_flush_t *fl_final;
    uint64_t fl_final_batches; /* d->batches when it was collected */
    double fl_final_ms;        /* its collection */
    int fl_final_used;         /* the running flush is such a one */
    uint64_t finals_in_part;   /* final flushes collected that way */

    int stopping;
    int exit_code;
    double stop_deadline;
    int closed;
} dmn_t;

static void begin_stop(dmn_t *d, int code);
static void continue_stop(dmn_t *d);

/* ---------------------------------------------------------------------- */
/* Intake.                                                                 */

static int64_t state_offset(void *ud, int32_t p)
{
    dmn_t *d = ud;
    const agg_partition_t *pp = agg_partition(d->agg, p);
    if (pp && pp->known)
        return pp->next_offset;
    return d->rebuild ? ING_OFFSET_EARLIEST : -1;
}

/*
 * An empty state directory in front of tables that already hold this
 * topic's data (a wiped or lost state dir) would resume from the group's
 * offsets with no state behind them and write wrong totals. Refuse that,
 * unless --allow-state-rebuild asks to empty the tables and rebuild from
 * the earliest offsets. Runs at startup, before anything is consumed.
 */
/* The state remembers that it was started as a rebuild, so that a rebuild
 * interrupted by a crash resumes as one instead of falling back to the
 * group's offsets for the partitions it had not reached yet. */
static const char REBUILD_KEY[] = "rebuild";

static int rebuild_marked(dmn_t *d)
{
    st_txn_t *txn;
    st_val_t v;
    int marked = 0;
    if (st_begin(d->env, 1, &txn) == 0) {
        marked = st_get(txn, d->env, ST_DB_META, REBUILD_KEY, sizeof REBUILD_KEY - 1, &v) == 0;
        st_abort(txn);
    }
    return marked;
}

/* Record a one-byte flag under key in the state's meta database, in a write
 * transaction of its own: only where intake has none open (start-up, a
 * stop after a failed checkpoint). */
static int put_meta_flag(dmn_t *d, const char *key, size_t n)
{
    st_txn_t *txn;
    uint8_t one = 1;
    int r = st_begin(d->env, 0, &txn);
    if (r)
        return r;
    if ((r = st_put(txn, d->env, ST_DB_META, key, n, &one, 1)) != 0) {
        st_abort(txn);
        return r;
    }
    return st_commit(txn);
}

static int mark_rebuild(dmn_t *d)
{
    return put_meta_flag(d, REBUILD_KEY, sizeof REBUILD_KEY - 1);
}

/* Whether Postgres must be asked (the state knows no partition); sets
 * d->rebuild when the state records a rebuild under way. */
static int fresh_needed(dmn_t *d)
{
    int known = 0;
    for (int32_t p = 0; p < AGG_MAX_PARTITIONS; p++)
        known |= agg_partition(d->agg, p)->known;
    if (rebuild_marked(d))
        d->rebuild = 1; /* unknown partitions start at the earliest offset */
    return !known;
}

/*
 * The Postgres side of the check: connect and migrate, retrying for 30 s
 * while Postgres is away or busy, then read how far the tables hold the
 * topic into d->fresh_rows and d->fresh_max_next. d->fresh_rc is 0, or 1
 * after logging why not. Any one thread: it touches only d->pg (which the
 * caller may use once it is done) and the fresh_ fields.
 */
static void fresh_pg(dmn_t *d)
{
    int r = -1;
    char err[1024] = "";
    d->fresh_rc = 1;
    for (int attempt = 0; attempt < 30 && !atomic_load(&d->fresh_cancel); attempt++) {
        r = snk_open(d->cfg.pg, d->cfg.schema, &d->pg);
        if (r != 0) {
            snprintf(err, sizeof err, "%s", snk_last_error(NULL));
        } else if ((r = snk_migrate(d->pg)) != 0) {
            /* The message lives in the connection: keep it before closing. */
            snprintf(err, sizeof err, "%s", snk_last_error(d->pg));
            int transient = snk_transient(d->pg);
            snk_close(d->pg);
            d->pg = NULL;
            /* Postgres answered and refused a statement on the schema as it is
             * (say, an analyst's view on a column a migration changes): waiting
             * will not fix that. A deadlock or a lock timeout may pass. */
            if (!transient) {
                cm_err("cannot migrate the schema; see docs/operations.md", "error=\"%s\"", err);
                return;
            }
        }
        if (r == 0)
            break;
        cm_warn("empty state: waiting for Postgres to check the tables", "attempt=%d error=\"%s\"",
                attempt + 1, err);
        uv_sleep(1000);
    }
    if (r && atomic_load(&d->fresh_cancel)) {
        cm_warn("stopped before the tables were checked; nothing was applied", "error=\"%s\"", err);
        return;
    }
    if (r) {
        cm_err("empty state and Postgres unreachable or busy: cannot tell whether the tables "
               "already hold this topic; start Postgres and retry",
               "error=\"%s\"", err);
        return;
    }
    if (snk_topic_progress(d->pg, d->cfg.topic, &d->fresh_rows, &d->fresh_max_next) != 0) {
        cm_err("cannot read the partitions table", "error=\"%s\"", snk_last_error(d->pg));
        return;
    }
    d->fresh_rc = 0;
}

/*
 * What the check decides, once fresh_pg is done: 0 to go on, 1 to stop.
 * Tables that already hold the topic are refused, or with
 * --allow-state-rebuild emptied for a rebuild from the earliest offsets.
 * Loop thread, before anything is applied.
 */
static int fresh_decide(dmn_t *d)
{
    if (d->fresh_rc)
        return 1;
    int64_t rows = d->fresh_rows, max_next = d->fresh_max_next;
    if (!d->rebuild && (rows == 0 || max_next == 0))
        return 0;
    if (!d->rebuild && !d->cfg.allow_state_rebuild) {
        cm_err("the state directory is empty but the tables already hold this topic up to "
               "an offset; refusing to start (restore the state dir, or pass "
               "--allow-state-rebuild to empty the tables and rebuild from the earliest offsets)",
               "state_dir=%s topic=%s partitions=%lld max_next_offset=%lld", d->cfg.state_dir,
               d->cfg.topic, (long long)rows, (long long)max_next);
        return 1;
    }
    /* Mark first: if the daemon dies after the truncation, the restart
     * still knows the empty tables are a rebuild in progress. */
    int r = mark_rebuild(d);
    if (r != 0) {
        cm_err("cannot record the rebuild in the state", "error=\"%s\"", st_strerror(r));
        return 1;
    }
    /* Nothing of the state has reached the tables yet (no partition is
     * known), so emptying them again after an interrupted rebuild is safe. */
    if (snk_truncate_marts(d->pg) != 0) {
        cm_err("cannot empty the tables for the rebuild", "error=\"%s\"", snk_last_error(d->pg));
        return 1;
    }
    cm_warn("state rebuild: tables emptied, consuming from the earliest offsets", "topic=%s",
            d->cfg.topic);
    d->rebuild = 1;
    return 0;
}

static void fresh_main(void *arg)
{
    dmn_t *d = arg;
    fresh_pg(d);
    d->fresh_ms = cm_mono_ms() - d->fresh_t0;
    uv_async_send(&d->fresh_async);
}

static void on_fresh_done(uv_async_t *h);

/* Start the check's Postgres side on its own thread (setup). */
static int fresh_start(dmn_t *d)
{
    int r = uv_async_init(d->loop, &d->fresh_async, on_fresh_done);
    if (r == 0) {
        d->fresh_async.data = d;
        d->fresh_t0 = cm_mono_ms();
        r = uv_thread_create(&d->fresh_thread, fresh_main, d);
        if (r)
            uv_close((uv_handle_t *)&d->fresh_async, NULL);
    }
    if (r) {
        cm_err("cannot start the check of the tables", "error=\"%s\"", uv_strerror(r));
        return 1;
    }
    d->fresh_thread_on = 1;
    return 0;
}

/* Wait for the check's thread (setup, on_fresh_done, a failed start). */
static void fresh_join(dmn_t *d)
{
    if (!d->fresh_thread_on)
        return;
    uv_thread_join(&d->fresh_thread);
    d->fresh_thread_on = 0;
    uv_close((uv_handle_t *)&d->fresh_async, NULL);
}

static void update_pause(dmn_t *d)
{
    int want =
        d->pause_backpressure || d->map_full || d->storage_failed || d->stopping || d->ckpt_failed;
    if (want != ing_consumer_paused(d->cons)) {
        ing_consumer_pause(d->cons, want);
        if (want)
            d->pauses++;
    }
}

/* A batch keeps every payload byte a reject may record. */
_Static_assert(ING_PAYLOAD_KEEP >= AGG_REJECT_PAYLOAD_MAX, "batches keep too little of a payload");

/* Apply one message of a validated batch inside the open transaction. */
static int apply_msg(dmn_t *d, const ing_batch_t *b, size_t i)
{
    const ing_msg_t *msg = &b->msgs[i];
    const ing_parsed_t *res = &b->res[i];
    const agg_partition_t *pp = agg_partition(d->agg, msg->partition);
    /* A message the state already holds (e.g. the group's offset lagged
     * behind LMDB's) is skipped, never applied twice. */
    if (pp && pp->known && msg->offset < pp->next_offset)
        return 0;
    if (res->reason == ING_OK)
        return agg_apply_packed(d->agg, msg->partition, msg->offset, res->ev, msg->payload,
                                msg->len, b->now_ms);
    return agg_apply_reject(d->agg, msg->partition, msg->offset, res->reason, res->detail,
                            msg->payload, msg->len, b->now_ms);
}

/* Messages left before the end offsets of --exit-at-end (0 at the end;
 * -1 without them). */
static int64_t left_to_end(dmn_t *d)
{
    if (!d->ends)
        return -1;
    int64_t left = 0;
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        /* A partition without state starts where it was assigned (the
         * group's committed offset, or the earliest one). */
        int64_t next = pp && pp->known ? pp->next_offset : ing_consumer_start_offset(d->cons, p);
        /* Messages below the low watermark are gone (retention): there is
         * nothing left to consume under it. */
        if (next < d->lows[p])
            next = d->lows[p];
        if (next < d->ends[p])
            left += d->ends[p] - next;
    }
    return left;
}

static int all_at_end(dmn_t *d)
{
    return left_to_end(d) == 0;
}

static void after_batch(dmn_t *d)
{
    uint64_t pending = agg_pending_rows(d->agg);
    if (!d->pause_backpressure && pending > (uint64_t)d->cfg.max_dirty_rows) {
        d->pause_backpressure = 1;
        cm_warn("intake paused: too many unflushed rows", "pending_rows=%llu max_dirty_rows=%lld",
                (unsigned long long)pending, (long long)d->cfg.max_dirty_rows);
    }
    update_pause(d);
    if (d->cfg.exit_at_end && !d->stopping && all_at_end(d)) {
        cm_info("reached the end offsets seen at start", "messages=%llu",
                (unsigned long long)d->msgs);
        begin_stop(d, 0);
    }
}

/* At most this many batches are validated ahead of the one being applied:
 * enough to keep the second core busy, bounded in memory. */
#define PARSE_AHEAD 2

static size_t txn_limit(const dmn_t *d);
static size_t txn_base(const dmn_t *d);

/* Batches validated ahead now: PARSE_AHEAD, and one more per batch a grown
 * transaction holds beyond --txn-messages. Its sorted updates take the loop
 * thread longer just before the commit, and without these the thread pool
 * would sit idle for most of that time once PARSE_AHEAD batches wait. */
static size_t parse_ahead(const dmn_t *d)
{
    size_t n = PARSE_AHEAD + (txn_limit(d) - txn_base(d)) / (size_t)d->cfg.batch_size;
    return n < HELD_MAX - TXN_BATCHES_MAX - 1 ? n : HELD_MAX - TXN_BATCHES_MAX - 1;
}

/* Batches between the consumer and the state not applied yet: being
 * validated, or validated and waiting (the first of them may be half
 * applied). Intake goes on while fewer than parse_ahead() + 1 are, so that
 * the next batches are validated on the thread pool while the loop thread
 * applies the current one. Batches applied in the open transaction do not
 * count: they wait only for its commit (--txn-messages bounds them). */
static size_t in_flight(dmn_t *d)
{
    return ing_parser_pending(d->parser) + (d->n_held - d->cur);
}

static void on_msgs(void *ud, rd_kafka_message_t **m, size_t n)
{
    dmn_t *d = ud;
    if (ing_parser_submit(d->parser, m, n) != 0) {
        /* The messages were not applied: a restart consumes them again. */
        cm_err("out of memory queueing a batch for validation; stopping", "messages=%zu", n);
        for (size_t i = 0; i < n; i++)
            rd_kafka_message_destroy(m[i]);
        begin_stop(d, 1);
        return;
    }
    if (in_flight(d) >= parse_ahead(d) + 1)
        ing_consumer_hold(d->cons, 1);
}

/* Drop the batches not applied yet (shutdown, fatal errors); a restart
 * consumes them again from LMDB's offsets. */
static void drop_held(dmn_t *d)
{
    if (d->txn_open) {
        agg_batch_abort(d->agg);
        d->txn_open = 0;
    }
    for (size_t i = 0; i < d->n_held; i++)
        ing_batch_free(d->held[i]);
    d->n_held = 0;
    d->cur = d->pos = 0;
}

/* Retry a batch whose LMDB write failed after this long. */
#define STORAGE_RETRY_MS 5000.0

static void apply_failed(dmn_t *d, int r)
{
    if (r == ST_EIO) {
        /* A failed write (a full disk shows up as a short write, which LMDB
         * reports as EIO) rolled the batch back: nothing was applied, the
         * last commit is intact. Pause and apply the batch again later
         * rather than stop; the state is never left half-written. */
        d->txn_open = 0;
        d->cur = d->pos = 0;
        if (!d->storage_failed)
            cm_err("state write failed (disk full?): intake paused, retrying every 5 s",
                   "state_dir=%s error=\"%s\"", d->cfg.state_dir, agg_strerror(r));
        d->storage_failed = 1;
        d->storage_retry_at = cm_mono_ms() + STORAGE_RETRY_MS;
        update_pause(d);
        return;
    }
    cm_err("cannot apply batch; stopping (nothing of it was applied)", "error=\"%s\"",
           agg_strerror(r));
    drop_held(d);
    begin_stop(d, 1);
}

/* The transaction was rolled back because the map is full (ST_EMAPFULL),
 * or because the checkpoint transaction holds as many dirty pages as LMDB
 * allows (ST_ETXNFULL, checkpoints only): apply the batch again from its
 * start once the map has grown, or the checkpoint is committed
 * (on_grow_timer). Without checkpoints a transaction that is too large is
 * treated as a full map, as before. */
static void map_full(dmn_t *d, int r)
{
    d->txn_open = 0;
    d->cur = d->pos = 0;
    d->txn_full = r == ST_ETXNFULL && d->ckpt;
    if (d->txn_full) {
        /* LMDB keeps a transaction's dirty pages in memory, at most about
         * 131 000 of them (512 MiB), and a nested transaction cannot write
         * its parent's out early: on a state whose users spread over many
         * more pages than that, a checkpoint of --checkpoint-messages does
         * not fit. Checkpoint after half as many from now on; the limit
         * creeps back up at every checkpoint that fits (checkpoint). */
        uint64_t half = (d->ckpt_msgs + d->txn_msgs) / 2;
        d->ckpt_limit = half > txn_base(d) ? half : txn_base(d);
        d->ckpt_shrinks++;
    }
    if (!d->map_full) {
        if (d->txn_full)
            cm_warn("state checkpoint transaction full: intake paused until it is committed",
                    "messages=%zu", d->held[0]->n);
        else
            cm_warn("state map full: intake paused until the map grows", "messages=%zu",
                    d->held[0]->n);
    }
    d->map_full = 1;
    update_pause(d);
}

static void clear_flushed(dmn_t *d);
static void start_due_flush(dmn_t *d);
static void start_flush(dmn_t *d);
static void pump(dmn_t *d);

/* Longest stretch the loop spends applying before it serves timers, flush
 * completions and the status socket again. */
#define APPLY_SLICE_MS 20.0

/* How many messages ahead the apply loop asks the aggregator to fetch a
 * message's slot of the duplicate index: the index is far larger than the
 * caches and each lookup is otherwise one wait for memory. */
#define APPLY_PREFETCH 8

/* Queued mart updates applied between two looks at the clock. */
#define DRAIN_STEP 256

static void on_apply_idle(uv_idle_t *h);

/* --txn-messages, and never fewer than a batch. */
static size_t txn_base(const dmn_t *d)
{
    return (size_t)(d->cfg.txn_messages > d->cfg.batch_size ? d->cfg.txn_messages
                                                            : d->cfg.batch_size);
}

/* Messages after which the open transaction commits: txn_base, or more
 * (up to --txn-messages-max) while intake catches up on a large state
 * (txn_adapt). */
static size_t txn_limit(const dmn_t *d)
{
    return d->txn_target > txn_base(d) ? d->txn_target : txn_base(d);
}

static int catching_up(dmn_t *d);

/* How long the open transaction may wait for more batches: --commit-interval-ms,
 * capped by --catchup-commit-interval-ms while intake catches up. At steady rates a
 * longer interval means fewer commits, each of which copies the pages it touches
 * from the checkpoint transaction and walks the compactor's slice (100 000
 * events/s, 10 pairs, 300 ms against 100: clickmartd's cores -2.6 %, better in 9,
 * freshness p99 better in 8; docs/benchmarks.md, thirty-fourth session); while
 * catching up, 300 ms left the loop thread waiting for the pool (1 M, 6 pairs:
 * its waits for validation 0.19 -> 0.34 s, 6 of 6). */
static double commit_interval(dmn_t *d)
{
    int64_t ms = d->cfg.commit_interval_ms;
    if (ms > d->cfg.catchup_commit_interval_ms && catching_up(d))
        ms = d->cfg.catchup_commit_interval_ms;
    return (double)ms;
}

/* Transactions may grow: --txn-messages-max above --txn-messages, and not
 * --commit-interval-ms 0, which promises a commit per batch. */
static int txn_growth_on(const dmn_t *d)
{
    /* With checkpoints a commit writes nothing; the checkpoints gather the
     * pages instead (--checkpoint-messages). */
    return !d->ckpt && d->cfg.commit_interval_ms != 0 &&
           (size_t)d->cfg.txn_messages_max > txn_base(d);
}

static void start_part(dmn_t *d);

/*
 * A checkpoint found the map full: LMDB rolled it back. Once no flush holds
 * a snapshot either (callers check), double the map and record its size
 * with a small commit, so that the restart that follows (the in-memory
 * state is ahead of the durable one) opens the larger map instead of
 * filling the same one again.
 */
static void grow_for_restart(dmn_t *d)
{
    static const char key[] = "map_grown";
    d->ckpt_grow = 0;
    int r = st_grow(d->env);
    if (r == 0)
        r = put_meta_flag(d, key, sizeof key - 1);
    if (r)
        cm_err("cannot grow the state map for the restart", "error=\"%s\"", st_strerror(r));
}

/*
 * Make the batches committed so far durable (agg_checkpoint). 0, or the
 * error: then the durable state is behind the in-memory one, so the daemon
 * stops without flushing again; a restart resumes from the last checkpoint.
 * Loop thread, outside a transaction.
 */
static int checkpoint(dmn_t *d)
{
    if (!d->ckpt || d->ckpt_failed)
        return d->ckpt_failed ? AGG_EINVAL : 0;
    uint64_t batches = agg_checkpoint_batches(d->agg);
    double t0 = cm_mono_ms();
    int r = agg_checkpoint(d->agg);
    double ms = cm_mono_ms() - t0;
    d->ckpt_ms += ms;
    if (r == 0)
        return 0; /* nothing was open */
    if (r < 0) {
        d->ckpt_failed = 1;
        cm_err("state checkpoint failed; stopping without flushing again (a restart resumes "
               "from the last checkpoint)",
               "error=\"%s\"", agg_strerror(r));
        /* A full map: the restart must open a larger one (grow_for_restart,
         * once no flush holds a snapshot). */
        d->ckpt_grow = r == ST_EMAPFULL;
        /* Callers are deep in the apply and flush paths: intake pauses and
         * nothing is applied or flushed from here on, and the stop begins
         * on the next turn of the loop (on_grow_timer). */
        d->exit_code = 1;
        if (d->cons && !d->closed)
            update_pause(d);
        return r;
    }
    d->checkpoints++;
    cm_debug("checkpointed", "batches=%llu messages=%llu checkpoint_ms=%.1f limit=%llu",
             (unsigned long long)batches, (unsigned long long)d->ckpt_msgs, ms,
             (unsigned long long)d->ckpt_limit);
    d->ckpt_msgs = 0;
    /* Back towards --checkpoint-messages after a transaction too large
     * (map_full) halved the limit: a quarter more per checkpoint. */
    uint64_t max = (uint64_t)d->cfg.checkpoint_messages;
    if (d->ckpt_limit < max && !d->txn_full)
        d->ckpt_limit =
            d->ckpt_limit + d->ckpt_limit / 4 < max ? d->ckpt_limit + d->ckpt_limit / 4 : max;
    return 0;
}

/*
 * After a commit that passed `bytes` to write calls: the next transactions'
 * size (cm_txn_target). A commit rewrites every page its transaction
 * touched; once the users outnumber what a transaction's pages hold, the
 * touched users each bring pages of their own and the commit's writes grow
 * per message (0.3 kB per event over a 1 M run, 0.9 kB in the tenth million
 * of a 10 M run). A transaction of more messages then touches many of those
 * pages again and writes them once (docs/operations.md, "Transactions that
 * grow with the state"). Only while catching up: at steady rates the
 * interval decides, and a larger transaction would only delay the rows.
 */
static void txn_adapt(dmn_t *d, uint64_t bytes)
{
    size_t old = txn_limit(d);
    int catching = catching_up(d);
    /* A transaction cut short (the interval, a stop, the last batches)
     * spreads its pages over fewer messages: no evidence either way. */
    if (catching && d->txn_msgs < txn_base(d))
        return;
    size_t next = cm_txn_target(old, txn_base(d), (size_t)d->cfg.txn_messages_max, d->txn_msgs,
                                bytes, catching);
    if (next == old)
        return;
    d->txn_target = next;
    if (next > old)
        d->txn_grows++;
    cm_info(next > old ? "transactions grow: commits write much per message"
                       : "transactions shrink",
            "messages=%zu was=%zu last_commit_bytes_per_message=%.0f", next, old,
            d->txn_msgs ? (double)bytes / (double)d->txn_msgs : 0.0);
}

/*
 * Commit the open transaction, which holds held[0..cur), and release those
 * batches. 0 or the error (already handled: paused or stopping).
 */
static int commit_open(dmn_t *d)
{
    uv_timer_stop(&d->commit_timer);
    /* The commit's write calls decide whether transactions grow, and the
     * debug line shows them; otherwise /proc is not read. */
    uint64_t w0 = 0, w1 = 0;
    int grow = txn_growth_on(d);
    int wok = (grow || cm_log_enabled(CM_LOG_DEBUG)) && cm_write_bytes(&w0) == 0;
    double t0 = cm_mono_ms();
    int r = agg_batch_commit(d->agg);
    double t1 = cm_mono_ms();
    d->commit_ms += t1 - t0;
    d->txn_open = 0;
    if (r == ST_EMAPFULL || r == ST_ETXNFULL) {
        map_full(d, r);
        return r;
    }
    if (r) {
        apply_failed(d, r);
        return r;
    }
    d->commits++;
    /* The prefault helper works while catching up, when the loop thread
     * bounds intake; decided once per transaction, not per slice of work
     * (the lag reads every partition's watermarks). */
    cm_heap_prefault_active(catching_up(d));
    if (!wok || cm_write_bytes(&w1) != 0 || w1 < w0)
        w1 = w0;
    else if (grow)
        txn_adapt(d, w1 - w0);
    if (cm_log_enabled(CM_LOG_DEBUG) && d->cur > 0 && d->held[0]->n > 0) {
        /* How long the transaction's oldest and newest messages took from
         * their producer to this commit (intake latency, for tuning). */
        int64_t now = cm_now_ms();
        const ing_batch_t *f = d->held[0], *l = d->held[d->cur - 1];
        cm_debug("committed",
                 "messages=%zu oldest_ms=%lld newest_ms=%lld commit_ms=%.1f txn_ms=%.1f "
                 "write_bytes=%llu",
                 d->txn_msgs, (long long)(now - f->msgs[0].ts_ms),
                 (long long)(now - l->msgs[l->n - 1].ts_ms), t1 - t0, t1 - d->txn_t0,
                 (unsigned long long)(w1 - w0));
    }
    for (size_t i = 0; i < d->cur; i++) {
        d->batches++;
        d->msgs += d->held[i]->n;
        ing_batch_free(d->held[i]);
    }
    memmove(d->held, d->held + d->cur, (d->n_held - d->cur) * sizeof *d->held);
    d->n_held -= d->cur;
    d->cur = d->pos = 0;
    d->ckpt_msgs += d->txn_msgs;
    d->txn_msgs = 0;
    /* A flush checkpoints first; without one for long (Postgres away, a
     * long interval), the checkpoint transaction is bounded here. */
    if (d->ckpt && d->ckpt_msgs >= d->ckpt_limit && checkpoint(d) != 0)
        return AGG_EINVAL;
    if (d->cons && !d->closed && in_flight(d) < parse_ahead(d) + 1)
        ing_consumer_hold(d->cons, 0);
    clear_flushed(d);
    start_due_flush(d);
    /* With checkpoints a part reads the open checkpoint transaction, which
     * it can only between two transactions: this is where one is due. */
    if (d->ckpt)
        start_part(d);
    after_batch(d);
    return 0;
}

/* Roll back the open transaction after an apply error r: the batches are
 * applied again from their start once the map has grown (ST_EMAPFULL) or
 * the storage recovers; other errors stop the daemon (apply_failed). */
static void abort_open(dmn_t *d, int r)
{
    agg_batch_abort(d->agg);
    if (r == ST_EMAPFULL || r == ST_ETXNFULL) {
        map_full(d, r);
    } else {
        d->txn_open = 0;
        apply_failed(d, r);
    }
}

static void on_commit_timer(uv_timer_t *t)
{
    pump(t->data);
}

/*
 * Apply the queued batches in order. Applying is cut into slices of about
 * APPLY_SLICE_MS; the open transaction simply waits across loop iterations
 * in between, so a large batch never blocks the loop for long. A transaction
 * commits once it holds --txn-messages messages or TXN_BATCHES_MAX batches,
 * or has been open for --commit-interval-ms, checked between batches: at
 * steady lower rates the small batches arriving meanwhile join the open one;
 * while catching up, the batches already validated join it until the
 * interval has passed (accepting a batch of 40 000 takes well under it, so
 * a transaction gathers two or three). Either way the commits (each an fsync
 * and a rewrite of every page it touched) do not multiply with the number
 * of drains, and a page many users share is written once for all of them.
 */
static void pump(dmn_t *d)
{
    /* Nothing is applied before the check of the tables is in. */
    if (d->fresh_pending)
        return;
    double t0 = cm_mono_ms();
    /* The loop thread's heap grows with the state: advise what it took. */
    cm_heap_grown();
    while (!d->map_full && !d->storage_failed && !d->ckpt_failed && !d->closed) {
        int r;
        /* Between batches, an open transaction commits when it is full, old
         * enough or the daemon stops; with nothing more to apply it waits
         * for that on the commit timer. */
        if (d->txn_open && d->pos == 0) {
            double age = cm_mono_ms() - d->txn_t0;
            int grown = txn_limit(d) > txn_base(d);
            /* A transaction grown past --txn-messages is not cut by the
             * interval while validated batches wait for it. */
            double interval = commit_interval(d);
            int aged = age >= interval && (!grown || d->cur == d->n_held);
            /* Once due, it stays due: a batch arriving while its updates are
             * drained in slices waits for the next transaction. With
             * --exit-at-end, nothing is left to gather once the open
             * transaction reaches the end offsets. --txn-messages at or
             * below --batch-size means a batch per transaction, also for a
             * batch librdkafka handed over short. */
            int one_batch = d->cfg.txn_messages <= d->cfg.batch_size && !grown;
            int due = d->txn_closing || d->txn_msgs >= txn_limit(d) || d->cur >= TXN_BATCHES_MAX ||
                      one_batch || d->stopping || aged ||
                      (d->cfg.exit_at_end && d->cur == d->n_held && all_at_end(d));
            d->txn_closing = due;
            if (!due && d->cur == d->n_held) {
                uv_timer_start(&d->commit_timer, on_commit_timer, (uint64_t)(interval - age) + 1,
                               0);
                break;
            }
            if (due) {
                /* The batch's mart updates run sorted by user once all of
                 * its messages are in; in slices, like the messages. */
                while ((r = agg_batch_drain(d->agg, DRAIN_STEP)) == 1)
                    if (cm_mono_ms() - t0 > APPLY_SLICE_MS) {
                        uv_idle_start(&d->apply_idle, on_apply_idle);
                        return;
                    }
                if (r != 0) {
                    abort_open(d, r);
                    return;
                }
                if (commit_open(d) != 0)
                    return;
                if (d->n_held && cm_mono_ms() - t0 > APPLY_SLICE_MS) {
                    uv_idle_start(&d->apply_idle, on_apply_idle);
                    return;
                }
                continue;
            }
        }
        if (d->cur == d->n_held)
            break;
        ing_batch_t *b = d->held[d->cur];
        if (d->pos == 0)
            for (size_t i = 0; i < b->n; i++)
                if (b->res[i].reason == ING_R__COUNT) {
                    apply_failed(d, AGG_ENOMEM); /* validation ran out of memory */
                    return;
                }
        if (!d->txn_open) {
            if ((r = agg_batch_begin(d->agg)) != 0) {
                apply_failed(d, r);
                return;
            }
            d->txn_open = 1;
            d->txn_closing = 0;
            d->txn_t0 = cm_mono_ms();
            d->txn_msgs = 0;
        }
        while (d->pos < b->n) {
            size_t ahead = d->pos + APPLY_PREFETCH;
            if (ahead < b->n && b->res[ahead].reason == ING_OK)
                agg_prefetch_packed(d->agg, b->res[ahead].ev);
            if ((r = apply_msg(d, b, d->pos)) != 0) {
                abort_open(d, r);
                return;
            }
            d->pos++;
            if ((d->pos & 255) == 0 && cm_mono_ms() - t0 > APPLY_SLICE_MS) {
                uv_idle_start(&d->apply_idle, on_apply_idle);
                return;
            }
        }
        d->cur++;
        d->pos = 0;
        d->txn_msgs += b->n;
    }
    uv_idle_stop(&d->apply_idle);
    if (d->cons && !d->closed && in_flight(d) < parse_ahead(d) + 1)
        ing_consumer_hold(d->cons, 0);
    if (!d->wait_t0 && d->cur == d->n_held && d->cons && !ing_consumer_paused(d->cons)) {
        d->wait_t0 = cm_mono_ms();
        d->wait_validating = ing_parser_pending(d->parser) > 0;
    }
    if (d->stopping)
        continue_stop(d);
}

static void on_apply_idle(uv_idle_t *h)
{
    pump(h->data);
}

/* A validated batch, in consumption order. */
static void on_parsed(void *ud, ing_batch_t *b)
{
    dmn_t *d = ud;
    if (d->n_held == HELD_MAX || d->closed) {
        /* Cannot happen with parse_ahead() batches in flight; never apply out
         * of order. Not applied: a restart consumes it again. */
        size_t n = b->n; /* logged below, after the batch is gone */
        ing_batch_free(b);
        if (!d->closed) {
            cm_err("too many batches waiting; stopping", "messages=%zu", n);
            begin_stop(d, 1);
        }
        return;
    }
    d->held[d->n_held++] = b;
    if (d->wait_t0) {
        double w = cm_mono_ms() - d->wait_t0;
        *(d->wait_validating ? &d->wait_validation_ms : &d->wait_kafka_ms) += w;
        d->wait_t0 = 0;
        if (w >= 20.0)
            cm_debug("waited for input", "ms=%.1f for=%s messages=%zu", w,
                     d->wait_validating ? "validation" : "kafka", b->n);
    }
    pump(d);
}

/* Grow the map once no flush holds a read transaction, then apply the held
 * batches again. */
static void on_grow_timer(uv_timer_t *t)
{
    dmn_t *d = t->data;
    if (d->ckpt_failed) {
        /* The map's growth for the restart waits for the flush's snapshot. */
        if (d->ckpt_grow && !d->inflight)
            grow_for_restart(d);
        if (!d->stopping)
            begin_stop(d, 1);
        else
            continue_stop(d);
        return;
    }
    if (d->storage_failed && cm_mono_ms() >= d->storage_retry_at && !d->stopping) {
        d->storage_failed = 0;
        update_pause(d);
        pump(d); /* fails again (and pauses again) while the disk is still full */
        if (!d->storage_failed && !d->map_full)
            cm_info("state writes succeed again: intake resumed", "%s", "");
    }
    if (!d->map_full || d->inflight)
        return;
    /* The map cannot change under an open transaction: the batches
     * committed into the checkpoint transaction become durable first. */
    if (d->ckpt && checkpoint(d) != 0) {
        drop_held(d);
        d->map_full = 0;
        return;
    }
    if (d->txn_full) {
        /* The committed checkpoint took the dirty pages with it. */
        d->map_full = d->txn_full = 0;
        cm_info("intake resumed after a checkpoint", "%s", "");
        update_pause(d);
        pump(d);
        return;
    }
    int r = st_grow(d->env);
    if (r) {
        cm_err("cannot grow the state map; stopping", "error=\"%s\"", st_strerror(r));
        drop_held(d);
        d->map_full = 0;
        begin_stop(d, 1);
        return;
    }
    d->map_full = 0;
    cm_info("intake resumed after the map grew", "%s", "");
    update_pause(d);
    pump(d);
}

/* ---------------------------------------------------------------------- */
/* Flushing (thread pool).                                                 */

/* Forget the parts written ahead (their transaction is gone or going). */
static void drop_ahead(dmn_t *d)
{
    agg_flush_free(d->ahead);
    d->ahead = NULL;
    d->ahead_parts = 0;
}

/* Forget a final flush collected during the last part (continue_stop). */
static void drop_final(dmn_t *d)
{
    agg_flush_free(d->fl_final);
    d->fl_final = NULL;
}

/*
 * At the stop, once intake has ended and the checkpoint is taken, the last
 * part often still runs in Postgres (in a 1 M backfill for 250-400 ms) and
 * the loop thread has nothing else to do. It collects the final flush then,
 * after that part, from a snapshot of the durable state, so that the flush
 * starts writing the moment the part is done; collected on the pool after
 * the part, as before, it kept Postgres idle for 40-70 ms at the very end of
 * the run. It is the flush start_flush would collect (nothing is applied
 * after the checkpoint: no batch is held or being validated); start_flush
 * checks that still holds and otherwise collects anew.
 */
static void collect_final(dmn_t *d)
{
    if (d->fl_final || !d->part_loop || d->ckpt_failed || d->txn_open || d->closed ||
        d->cur != d->n_held || (d->ckpt && agg_checkpoint_batches(d->agg) > 0))
        return;
    double t0 = cm_mono_ms();
    int r = agg_flush_collect_after(d->agg, AGG_FLUSH_REGRESSION, d->part_loop, &d->fl_final);
    if (r) {
        d->fl_final = NULL;
        cm_warn("cannot collect the final flush during the last part; collecting it after",
                "error=\"%s\"", agg_strerror(r));
        return;
    }
    d->fl_final_ms = cm_mono_ms() - t0;
    d->fl_final_batches = d->batches;
}

/* States of the commit gate (dmn_t.gate_state). */
enum { GATE_WAIT, GATE_DURABLE, GATE_FAILED };

/* The loop thread sets the gate (start_flush). */
static void gate_set(dmn_t *d, int state)
{
    uv_mutex_lock(&d->gate_mu);
    d->gate_state = state;
    uv_cond_broadcast(&d->gate_cv);
    uv_mutex_unlock(&d->gate_mu);
}

/*
 * The commit gate of a flush collected before its checkpoint: Postgres
 * commits the rows only once the checkpoint that holds them is durable, so
 * the tables are never ahead of what a restart resumes from. The loop thread
 * sets the gate right after the checkpoint, which it takes just after
 * queueing the flush, so the wait is bounded by that one checkpoint. Flush
 * thread (snk_flush_gated).
 */
static int ckpt_gate(void *arg)
{
    dmn_t *d = arg;
    double t0 = cm_mono_ms();
    uv_mutex_lock(&d->gate_mu);
    while (d->gate_state == GATE_WAIT)
        uv_cond_wait(&d->gate_cv, &d->gate_mu);
    int durable = d->gate_state == GATE_DURABLE;
    uv_mutex_unlock(&d->gate_mu);
    d->fl_gate_ms += cm_mono_ms() - t0;
    return durable ? 0 : -1;
}

static void flush_work(uv_work_t *w)
{
    dmn_t *d = w->data;
    /* A part collected on the loop thread (start_part, checkpoints) comes
     * with its rows; anything else is collected here. */
    int ready = d->fl_ready;
    d->fl_ready = 0;
    if (!ready)
        d->fl = NULL;
    d->fl_err[0] = '\0';
    int r = 0;
    if (d->pg && !snk_ok(d->pg)) {
        snk_close(d->pg);
        d->pg = NULL;
    }
    if (!d->pg) {
        r = snk_open(d->cfg.pg, d->cfg.schema, &d->pg);
        if (r == 0 && (r = snk_migrate(d->pg)) != 0)
            snprintf(d->fl_err, sizeof d->fl_err, "migrate: %s", snk_last_error(d->pg));
        else if (r)
            snprintf(d->fl_err, sizeof d->fl_err, "connect: %s",
                     snk_last_error(d->pg)); /* NULL: why the last open failed */
        if (r && d->pg) {
            snk_close(d->pg);
            d->pg = NULL;
        }
        if (r) {
            d->fl_rc = r;
            return;
        }
    }
    /* The parts written ahead live in the connection's open transaction: a
     * new connection or an error since has lost them. */
    if (d->ahead && snk_flush_parts(d->pg) != d->ahead_parts) {
        drop_ahead(d);
        if (ready) {
            /* It holds only what changed since the parts just lost: it
             * cannot stand alone. The flush at the tick writes it all. */
            agg_flush_free(d->fl);
            d->fl = NULL;
            snprintf(d->fl_err, sizeof d->fl_err, "the connection lost the parts written ahead");
            d->fl_rc = SNK_ECONNECT;
            return;
        }
    }
    if (!d->ahead)
        snk_flush_discard(d->pg);
    int flags = d->fl_part ? AGG_FLUSH_PART | (d->fl_users_later ? AGG_FLUSH_USERS_LATER : 0)
                : d->fl_regression ? AGG_FLUSH_REGRESSION
                                   : 0;
    if (!ready) {
        r = agg_flush_collect_after(d->agg, flags, d->ahead, &d->fl);
        d->fl_collect_ms = cm_mono_ms() - d->fl_t0;
    }
    if (r) {
        snprintf(d->fl_err, sizeof d->fl_err, "collect: %s", agg_strerror(r));
        drop_ahead(d);
        snk_flush_discard(d->pg);
        d->fl_rc = r;
        return;
    }
    uint64_t redone = snk_flush_redone(d->pg);
    if (d->fl_part) {
        r = snk_flush_part(d->pg, agg_flush_batch(d->fl));
        if (r == 0) {
            agg_flush_free(d->ahead);
            d->ahead = d->fl;
            d->fl = NULL;
            d->ahead_parts++;
        } else {
            drop_ahead(d);
        }
    } else {
        /* Collected on the loop thread, a flush was read before its
         * checkpoint and waits for it (start_flush). */
        r = ready ? snk_flush_gated(d->pg, agg_flush_batch(d->fl), ckpt_gate, d)
                  : snk_flush(d->pg, agg_flush_batch(d->fl));
        if (r == SNK_ERESTART) {
            /* Collected again from a snapshot: durable state only, so no
             * gate (a snapshot taken before the checkpoint is durable just
             * the same, only older). */
            /* A row taken for new was there already (a crash after an
             * earlier commit): the parts were rolled back with the
             * transaction, so the flush is written whole, with the redo. */
            d->fl_restarted = 1;
            drop_ahead(d);
            agg_flush_free(d->fl);
            d->fl = NULL;
            if ((r = agg_flush_collect_after(d->agg, flags, NULL, &d->fl)) != 0) {
                snprintf(d->fl_err, sizeof d->fl_err, "collect: %s", agg_strerror(r));
                d->fl_rc = r;
                return;
            }
            r = snk_flush(d->pg, agg_flush_batch(d->fl));
        } else if (r) {
            drop_ahead(d);
        }
    }
    d->fl_redone = snk_flush_redone(d->pg) != redone;
    if (r)
        snprintf(d->fl_err, sizeof d->fl_err, "%s", snk_last_error(d->pg));
    d->fl_rc = r;
}

/* Clear the dirty marks of a committed flush (loop thread, outside a batch). */
static void clear_flushed(dmn_t *d)
{
    if (!d->fl_clear || d->txn_open)
        return;
    int r = agg_flush_done(d->agg, d->fl_clear);
    if (r) {
        /* Rows stay dirty and are simply written again: harmless. */
        cm_warn("cannot clear flushed rows", "error=\"%s\"", agg_strerror(r));
    }
    agg_flush_free(d->fl_clear);
    d->fl_clear = NULL;
    if (d->pause_backpressure && agg_pending_rows(d->agg) <= (uint64_t)d->cfg.max_dirty_rows / 2) {
        d->pause_backpressure = 0;
        cm_info("intake resumed", "pending_rows=%llu",
                (unsigned long long)agg_pending_rows(d->agg));
        update_pause(d);
    }
}

/*
 * Start the flush a tick asked for while the previous one ran (start_flush).
 * Called only once the previous flush is wholly done with (the end of
 * flush_after, or the commit that cleared its marks): the worker of the new
 * flush writes d->fl, which flush_after of the old one still frees and resets.
 */
static void start_due_flush(dmn_t *d)
{
    if (!d->flush_due || d->stopping || d->inflight || d->fl_clear)
        return;
    int after_part = d->flush_due_part, deferred = d->ckpt_deferred;
    start_flush(d);
    /* A tick that only waited for the open transaction to commit before its
     * checkpoint started on time. */
    if (d->inflight && after_part)
        d->ticks_after_part++;
    else if (d->inflight && !deferred)
        d->flushes_due++;
}

/* A part written ahead is done (loop thread). */
static void part_after(dmn_t *d, int r, double ms)
{
    d->part_loop = NULL;
    if (r != 0 || !d->ahead)
        drop_final(d); /* it follows a part Postgres does not hold */
    if (r == 0 && d->ahead) {
        d->parts_ahead++;
        mx_rows_add(&d->ahead_tally, agg_flush_batch(d->ahead));
        cm_debug("wrote ahead", "rows=%zu duration_ms=%.1f collect_ms=%.1f parts=%d users_later=%d",
                 agg_flush_rows(d->ahead), ms, d->fl_collect_ms, d->ahead_parts, d->fl_users_later);
    } else {
        /* The flush at the tick writes every row itself; no part is tried
         * before a flush has succeeded (after SNK_ERESTART a part would meet
         * the same row; otherwise Postgres is in trouble, and the flush
         * owns the retries, their back-off and the failure counts). */
        d->parts_ahead_failed++;
        memset(&d->ahead_tally, 0, sizeof d->ahead_tally);
        d->ahead_blocked = 1;
        if (r == SNK_ERESTART)
            cm_info("postgres already held a row a part written ahead took for new; "
                    "the flush at the tick writes everything (expected once after a crash)",
                    "%s", "");
        else
            cm_warn("postgres: writing ahead failed; the next flush writes every row",
                    "error=\"%s\"", d->fl_err[0] ? d->fl_err : snk_strerror(r));
    }
    agg_flush_free(d->fl);
    d->fl = NULL;
}

static void flush_after(uv_work_t *w, int status)
{
    dmn_t *d = w->data;
    d->inflight = 0;
    double ms = cm_mono_ms() - d->fl_t0;
    int r = status ? status : d->fl_rc;
    if (d->fl_part) {
        d->fl_part = 0;
        part_after(d, r, ms);
        if (d->stopping)
            continue_stop(d);
        else
            start_due_flush(d);
        return;
    }
    d->gate_wait_ms += d->fl_gate_ms; /* 0 unless it was gated */
    if (d->fl_restarted) {
        d->fl_restarted = 0;
        cm_info("postgres already held a row the parts written ahead took for new; "
                "the flush was written again whole",
                "ok=%d", r == 0);
    }
    if (d->fl_redone) {
        d->fl_redone = 0;
        d->flushes_redone++;
        cm_info("postgres already held rows this flush took for new; it was redone with "
                "upserts (expected once after a crash between a flush's commit and the state's)",
                "ok=%d", r == 0);
    }
    if (r == 0 && d->fl) {
        size_t rows = agg_flush_rows(d->fl);
        mx_rows_add(&d->table_rows, agg_flush_batch(d->fl));
        mx_hist_observe(&d->flush_hist, ms / 1000.0);
        d->last_flush_mono = cm_mono_ms();
        /* Group offsets are a courtesy to monitoring tools (LMDB's win):
         * commit what this flush put into Postgres. */
        const snk_batch_t *fb = agg_flush_batch(d->fl);
        int64_t offs[AGG_MAX_PARTITIONS];
        int32_t n = d->n_parts < AGG_MAX_PARTITIONS ? d->n_parts : AGG_MAX_PARTITIONS;
        for (int32_t p = 0; p < n; p++)
            offs[p] = -1;
        for (size_t i = 0; i < fb->n_partitions; i++)
            if (fb->partitions[i].partition >= 0 && fb->partitions[i].partition < n)
                offs[fb->partitions[i].partition] = fb->partitions[i].next_offset;
        if (d->cons && !d->stopping)
            ing_consumer_commit(d->cons, offs, n);
        /* Clearing the dirty marks needs the write transaction: while a
         * batch holds it, the flush waits for the batch's commit. */
        d->fl_clear = d->fl;
        d->fl = NULL;
        clear_flushed(d);
        d->batches_flushed = d->batches_at_flush;
        if (d->fl_regression)
            d->last_regression = d->fl_t0;
        d->flushed_once = 1;
        d->last_flush_at = cm_now_ms();
        d->last_flush_ms = ms;
        d->last_flush_rows = rows;
        d->flushes++;
        d->rows_written += rows;
        if (d->ahead) {
            /* The commit made the parts written ahead visible too. */
            for (int t = 0; t < MX_N_TABLES; t++) {
                d->table_rows.written[t] += d->ahead_tally.written[t];
                d->table_rows.deleted[t] += d->ahead_tally.deleted[t];
                d->rows_written += d->ahead_tally.written[t] + d->ahead_tally.deleted[t];
            }
        }
        if (!d->pg_up)
            cm_info("postgres flush succeeded", "rows=%zu", rows);
        d->pg_up = 1;
        d->backoff_ms = 0;
        cm_debug("flushed",
                 "rows=%zu duration_ms=%.1f collect_ms=%.1f gate_ms=%.1f collected_during_part=%d",
                 rows, ms, d->fl_collect_ms, d->fl_gate_ms, d->fl_final_used);
    } else if (r == SNK_EGATE) {
        /* The checkpoint failed (checkpoint() logged why): the daemon stops
         * without flushing again, and a restart resumes from the last one. */
        d->flush_failures++;
        cm_warn("flush rolled back: the checkpoint holding its rows failed", "rows=%zu",
                d->fl ? agg_flush_rows(d->fl) : (size_t)0);
    } else {
        d->flush_failures++;
        d->pg_up = 0;
        d->backoff_ms = d->backoff_ms ? d->backoff_ms * 2 : 250;
        if (d->backoff_ms > d->cfg.pg_retry_max_ms)
            d->backoff_ms = d->cfg.pg_retry_max_ms;
        d->next_try = cm_mono_ms() + (double)d->backoff_ms;
        cm_warn("postgres flush failed; will retry", "retry_in_ms=%lld error=\"%s\"",
                (long long)d->backoff_ms, d->fl_err[0] ? d->fl_err : snk_strerror(r));
    }
    agg_flush_free(d->fl);
    d->fl = NULL;
    /* Committed or rolled back: either way no part is open any more. */
    drop_ahead(d);
    if (r == 0)
        d->ahead_blocked = 0;
    memset(&d->ahead_tally, 0, sizeof d->ahead_tally);
    if (d->stopping)
        continue_stop(d);
    else
        start_due_flush(d);
}

static int flush_needed(dmn_t *d)
{
    return !d->flushed_once || agg_pending_rows(d->agg) > 0 || d->batches != d->batches_flushed;
}

static void start_flush(dmn_t *d)
{
    if (d->fresh_pending)
        return; /* on_fresh_done starts it */
    if (d->inflight || d->fl_clear) {
        /* The previous flush is still running (or its marks wait for the
         * batch's commit): start as soon as it is done instead of skipping a
         * whole interval, so a row waits at most one interval plus the flushes
         * in between (start_due_flush). */
        d->flush_due = 1;
        /* Waiting for a part that began within the interval is the normal
         * way a part and the tick meet (start_part); every tick decides
         * again, so a part that has run for a whole interval (Postgres
         * slow or blocked) makes it a late start like a slow flush. */
        d->flush_due_part =
            d->inflight && d->fl_part && cm_mono_ms() - d->fl_t0 < (double)d->cfg.flush_interval_ms;
        return;
    }
    /* A late request is served here, or there is nothing to serve (no rows
     * left, Postgres backing off, the map growing): the next tick decides. */
    int after_part = d->flush_due_part;
    d->flush_due = 0;
    d->flush_due_part = 0;
    d->ckpt_deferred = 0;
    if (d->map_full || d->ckpt_failed || cm_mono_ms() < d->next_try)
        return;
    if (d->ckpt && d->txn_open) {
        /* Postgres may only commit what a checkpoint holds: the open
         * transaction commits at the next batch boundary (pump), and its
         * commit starts this flush again (commit_open, start_due_flush). */
        d->flush_due = 1;
        d->flush_due_part = after_part;
        d->ckpt_deferred = 1;
        d->txn_closing = 1;
        uv_idle_start(&d->apply_idle, on_apply_idle);
        return;
    }
    if (!flush_needed(d)) {
        checkpoint(d);
        return;
    }
    double t0 = cm_mono_ms();
    int regression = d->stopping || t0 - d->last_regression >= (double)d->cfg.stats_interval_ms;
    /* With batches waiting in the checkpoint transaction, the rows are read
     * from it here and Postgres writes them while the loop thread takes the
     * checkpoint (its commit and fdatasync, 100-200 ms on the benchmark
     * machine); only the COMMIT waits for it (ckpt_gate). Taking the
     * checkpoint first and collecting from its snapshot on the pool kept
     * Postgres idle for that long at every tick, and after the last message
     * of a backfill, with nothing else to do, both cores waited for the
     * disk. Not at a tick while catching up: the loop thread, which then
     * bounds intake, would pay for the collection (100 ms and more at the
     * ticks of a 10 M backfill) so that Postgres, which has no reader
     * waiting, could start sooner. */
    int early = 0;
    if (d->ckpt && !d->ckpt_failed && agg_checkpoint_batches(d->agg) > 0 &&
        (d->stopping || !catching_up(d))) {
        int flags = AGG_FLUSH_LOOP | (regression ? AGG_FLUSH_REGRESSION : 0);
        int r = agg_flush_collect_after(d->agg, flags, d->ahead, &d->fl);
        if (r == 0) {
            early = 1;
        } else {
            d->fl = NULL;
            cm_warn("cannot collect the flush before its checkpoint; collecting it after",
                    "error=\"%s\"", agg_strerror(r));
        }
    }
    if (!early && checkpoint(d) != 0)
        return;
    /* The final flush collected while the last part ran (collect_final),
     * if no batch was committed after it. part_after dropped it if that
     * part failed, so the part it follows is the last one Postgres holds. */
    int final = 0;
    if (d->fl_final) {
        final = !early && d->stopping && d->batches == d->fl_final_batches;
        if (final) {
            d->fl = d->fl_final;
            d->fl_final = NULL;
        } else {
            drop_final(d);
        }
    }
    d->inflight = 1;
    d->fl_t0 = t0;
    d->flush_t0 = t0;
    d->fl_regression = regression;
    d->batches_at_flush = d->batches;
    d->batches_at_send = d->batches;
    d->last_send = t0;
    d->fl_ready = early || final;
    d->fl_final_used = final;
    d->fl_gate_ms = 0;
    if (early) {
        d->fl_collect_ms = cm_mono_ms() - t0;
        gate_set(d, GATE_WAIT);
    } else if (final) {
        /* Collected from the durable state: nothing to wait for. */
        d->fl_collect_ms = d->fl_final_ms;
        gate_set(d, GATE_DURABLE);
    }
    d->work.data = d;
    int r = uv_queue_work(d->loop, &d->work, flush_work, flush_after);
    if (r == 0 && final)
        d->finals_in_part++;
    if (r) {
        d->inflight = 0;
        if (early || final) {
            d->fl_ready = 0;
            agg_flush_free(d->fl);
            d->fl = NULL;
        }
        cm_err("cannot queue flush", "error=\"%s\"", uv_strerror(r));
    }
    if (early) {
        /* Nothing is applied between the collection and this checkpoint,
         * so it holds exactly the rows the flush writes. */
        int c = checkpoint(d);
        gate_set(d, c == 0 ? GATE_DURABLE : GATE_FAILED);
        if (r == 0)
            d->flushes_early++;
    }
}

/* How often the loop looks whether a part is due (start_part decides). */
#define AHEAD_POLL_MS 20

static int64_t part_end(dmn_t *d, int32_t p)
{
    int64_t e = d->cons ? ing_consumer_cached_end(d->cons, p) : -1;
    if (e < 0 && d->ends)
        e = d->ends[p];
    return e;
}

/* Messages between the partitions' end offsets (librdkafka's cached high
 * watermarks, or the end offsets of --exit-at-end) and the state's
 * progress. */
static int64_t consumer_lag(dmn_t *d)
{
    int64_t lag = 0;
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        int64_t end = part_end(d, p), next = pp && pp->known ? pp->next_offset : 0;
        if (end > next)
            lag += end - next;
    }
    return lag;
}

/*
 * Intake is catching up: --exit-at-end (a backfill that stops once it has
 * caught up), or a backlog of at least a transaction's worth of messages.
 * How fresh the tables are is then set by the backlog, and a user active
 * all along changes again before the tick, so parts leave the per-user rows
 * to the flush (start_part).
 */
static int catching_up(dmn_t *d)
{
    return d->cfg.exit_at_end || consumer_lag(d) >= (int64_t)txn_base(d);
}

/*
 * Write the rows changed since the last part or flush into the open
 * transaction (--flush-ahead-ms; docs/operations.md "Writing ahead"), so
 * that the flush at the tick has only the rest to write. At most one part
 * per --flush-ahead-ms; none while a flush is due, Postgres is backing off
 * or anything else holds the flush slot.
 */
static void start_part(dmn_t *d)
{
    double now = cm_mono_ms();
    if (d->inflight || d->fl_clear || d->flush_due || d->stopping || d->map_full ||
        d->ahead_blocked || now < d->next_try || d->batches == d->batches_at_send ||
        d->fresh_pending)
        return;
    /* A part may still run at the tick: the flush then starts when it is
     * done and writes only what changed since the part collected its rows.
     * Keeping parts clear of the tick (before the seventeenth session) left
     * the flush everything changed since the last part, 1.25 part lengths
     * plus up to --flush-ahead-ms before the tick, and rows waited longer
     * for it than for the rest of a part (docs/operations.md, "Writing
     * ahead"). */
    if (now - d->last_send < (double)d->cfg.flush_ahead_ms)
        return;
    /* With checkpoints the rows are read from the open checkpoint
     * transaction, here, between two transactions (commit_open calls again
     * after each commit). */
    if (d->ckpt && (d->txn_open || d->ckpt_failed))
        return;
    d->inflight = 1;
    d->fl_part = 1;
    /* While catching up, a user active all along changes again before the
     * tick, so a part would write the same users, exposures and outcomes
     * over and over (27 % of the rows of a 1 M catch-up were written twice
     * or more): the parts leave those rows to the flush. Nobody sees a part
     * before the flush commits, so this changes only when Postgres does
     * the work. */
    d->fl_users_later = catching_up(d);
    d->fl_t0 = now;
    d->last_send = now;
    d->batches_at_send = d->batches;
    if (d->ckpt) {
        int flags =
            AGG_FLUSH_PART | AGG_FLUSH_LOOP | (d->fl_users_later ? AGG_FLUSH_USERS_LATER : 0);
        int r = agg_flush_collect_after(d->agg, flags, d->ahead, &d->fl);
        d->fl_collect_ms = cm_mono_ms() - now;
        if (r) {
            /* Like a part whose collection failed on the pool (part_after). */
            d->inflight = 0;
            d->fl_part = 0;
            d->fl = NULL;
            d->parts_ahead_failed++;
            d->ahead_blocked = 1;
            cm_warn("cannot collect a part to write ahead; the next flush writes every row",
                    "error=\"%s\"", agg_strerror(r));
            return;
        }
        d->fl_ready = 1;
        d->part_loop = d->fl;
    }
    d->work.data = d;
    int r = uv_queue_work(d->loop, &d->work, flush_work, flush_after);
    if (r) {
        d->inflight = 0;
        d->fl_part = 0;
        d->part_loop = NULL;
        if (d->fl_ready) {
            d->fl_ready = 0;
            agg_flush_free(d->fl);
            d->fl = NULL;
        }
        cm_err("cannot queue a part of the flush", "error=\"%s\"", uv_strerror(r));
    }
}

static void on_ahead_timer(uv_timer_t *t)
{
    start_part(t->data);
}

/* The share of an interval within which the end must be due: a margin
 * for a pace that varies from one interval to the next. */
#define END_TICK_SHARE 0.8

/*
 * Whether this tick starts no flush, leaving its rows to a later one (parts
 * go on writing ahead meanwhile):
 *
 * - Intake is behind, and the last flush began less than
 *   --catchup-flush-interval-ms ago (off by default). Behind means by more
 *   than an interval at the pace of the interval just past; with
 *   --exit-at-end, short of the end offsets (cm_tick_behind). How fresh the tables
 *   are is then set by the backlog, and each flush rewrites every user,
 *   exposure and outcome row active since the one before (a third of the
 *   rows a 10 M backfill wrote); but the loop thread then collects many more
 *   parts, and that backfill ran 17 % slower (docs/operations.md "Writing
 *   ahead").
 * - With --exit-at-end, the end offsets come within END_TICK_SHARE of an
 *   interval: the final flush writes the rows sooner than the next tick
 *   would, and this one would only write the per-user rows twice. Never two
 *   ticks in a row for this, so a stall near the end delays the rows by at
 *   most one interval.
 *
 * Never while intake is paused for unflushed rows, at the first tick or
 * before the first flush; by the pace only with a pace to go by.
 */
static int leave_tick(dmn_t *d)
{
    double now = cm_mono_ms();
    int64_t left = left_to_end(d), lag = 0;
    uint64_t moved = d->msgs - d->tick_msgs;
    double dt = now - d->tick_t, interval = (double)d->cfg.flush_interval_ms;
    int end = 0, behind = 0;
    if (!d->stopping && !d->pause_backpressure && d->flushed_once && d->tick_t > 0) {
        end = d->cfg.exit_at_end && !d->tick_end &&
              cm_end_within(d->tick_left, left, dt, interval, END_TICK_SHARE);
        if (!end && (double)d->cfg.catchup_flush_interval_ms > interval &&
            now - d->flush_t0 < (double)d->cfg.catchup_flush_interval_ms) {
            lag = left >= 0 ? left : consumer_lag(d);
            behind = cm_tick_behind(left, lag, moved, dt, interval);
        }
    }
    d->tick_left = left;
    d->tick_msgs = d->msgs;
    d->tick_t = now;
    d->tick_end = end;
    if (end) {
        d->ticks_before_end++;
        cm_debug("tick left to the final flush: the end offsets come first", "messages_left=%lld",
                 (long long)left);
    } else if (behind) {
        d->ticks_behind++;
        cm_debug("tick left to a later flush: intake is behind", "lag=%lld since_flush_ms=%.0f",
                 (long long)lag, now - d->flush_t0);
    }
    return end || behind;
}

static void on_flush_timer(uv_timer_t *t)
{
    dmn_t *d = t->data;
    if (d->stopping)
        continue_stop(d);
    else if (!leave_tick(d))
        start_flush(d);
}

/* ---------------------------------------------------------------------- */
/* Status, metrics, health.                                                */

static int64_t total(dmn_t *d, int what)
{
    int64_t s = 0;
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        if (!pp)
            continue;
        s += what == 0 ? pp->accepted : what == 1 ? pp->duplicates : pp->rejected;
    }
    return s;
}

/* --health-max-flush-age-ms, or its default: 5 flush intervals (or one
 * catch-up interval, when longer) plus 30 s. */
static int64_t max_flush_age_ms(const dmn_t *d)
{
    int64_t wait = 5 * d->cfg.flush_interval_ms;
    if (d->cfg.catchup_flush_interval_ms > wait)
        wait = d->cfg.catchup_flush_interval_ms;
    return d->cfg.health_max_flush_age_ms > 0 ? d->cfg.health_max_flush_age_ms : wait + 30000;
}

/* Every reason to be unhealthy, "; "-separated, in d->health; NULL when healthy. */
static const char *health_problem(dmn_t *d)
{
    char *h = d->health;
    size_t cap = sizeof d->health, n = 0;
    h[0] = '\0';
#define HP_ADD(...)                                                                                \
    do {                                                                                           \
        if (n < cap)                                                                               \
            n += (size_t)snprintf(h + n, cap - n, "%s", n ? "; " : "");                            \
        if (n < cap)                                                                               \
            n += (size_t)snprintf(h + n, cap - n, __VA_ARGS__);                                    \
    } while (0)
    if (d->flush_failures && !d->pg_up)
        HP_ADD("postgres unavailable: last flush failed");
    if (d->cons && !ing_consumer_broker_up(d->cons))
        HP_ADD("kafka brokers unreachable");
    if (d->map_full)
        HP_ADD("state map full: intake paused");
    if (d->storage_failed)
        HP_ADD("state write failed (disk full?): intake paused");
    /* Rows waiting and no flush for too long (stuck or very slow Postgres). */
    double since = (d->flushed_once ? d->last_flush_mono : d->started);
    double age = cm_mono_ms() - since;
    if (flush_needed(d) && age > (double)max_flush_age_ms(d))
        HP_ADD("no successful flush for %.0f s with rows pending (limit %.0f s)", age / 1000.0,
               (double)max_flush_age_ms(d) / 1000.0);
#undef HP_ADD
    return h[0] ? h : NULL;
}

/* Event-time lag of a partition: now - watermark in seconds (never negative);
 * -1 before the partition accepted anything. */
static double part_lag_s(dmn_t *d, int32_t p, int64_t now_ms)
{
    const agg_partition_t *pp = agg_partition(d->agg, p);
    if (!pp || pp->watermark < 0)
        return -1;
    return now_ms > pp->watermark ? (double)(now_ms - pp->watermark) / 1000.0 : 0.0;
}

static json_t *status_obj(dmn_t *d)
{
    json_t *o = json_object();
    int64_t now_ms = cm_now_ms();
    double lag_s_max = -1;
    json_object_set_new(o, "version", json_string(CLICKMART_VERSION));
    json_object_set_new(o, "uptime_s", json_real((cm_mono_ms() - d->started) / 1000.0));
    json_object_set_new(o, "topic", json_string(d->cfg.topic));
    json_object_set_new(o, "paused", json_boolean(d->cons && ing_consumer_paused(d->cons)));
    json_object_set_new(o, "paused_backpressure", json_boolean(d->pause_backpressure));
    json_object_set_new(o, "pg_connected", json_boolean(d->pg_up));
    json_object_set_new(o, "broker_up", json_boolean(d->cons && ing_consumer_broker_up(d->cons)));
    json_object_set_new(o, "stopping", json_boolean(d->stopping));
    json_object_set_new(o, "messages", json_integer((json_int_t)d->msgs));
    json_object_set_new(o, "accepted", json_integer(total(d, 0)));
    json_object_set_new(o, "duplicates", json_integer(total(d, 1)));
    json_object_set_new(o, "rejected", json_integer(total(d, 2)));
    json_t *rb = json_object();
    for (int r = ING_R_PAYLOAD_TOO_LARGE; r < ING_R__COUNT; r++) {
        int64_t s = 0;
        for (int32_t p = 0; p < d->n_parts; p++)
            s += agg_partition(d->agg, p)->rejects_by_reason[r];
        json_object_set_new(rb, ing_reason_name((ing_reason_t)r), json_integer(s));
    }
    json_object_set_new(o, "rejects_by_reason", rb);
    json_t *parts = json_array();
    int64_t lag_total = 0;
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        json_t *j = json_object();
        int64_t end = part_end(d, p);
        int64_t next = pp->known ? pp->next_offset : 0;
        json_object_set_new(j, "partition", json_integer(p));
        json_object_set_new(j, "next_offset", json_integer(next));
        json_object_set_new(j, "end_offset", end >= 0 ? json_integer(end) : json_null());
        int64_t lag = end >= 0 && end > next ? end - next : 0;
        lag_total += lag;
        json_object_set_new(j, "lag", end >= 0 ? json_integer(lag) : json_null());
        json_object_set_new(j, "watermark",
                            pp->watermark >= 0 ? json_integer(pp->watermark) : json_null());
        double ls = part_lag_s(d, p, now_ms);
        json_object_set_new(j, "lag_seconds", ls >= 0 ? json_real(ls) : json_null());
        if (ls > lag_s_max)
            lag_s_max = ls;
        json_object_set_new(j, "accepted", json_integer(pp->accepted));
        json_object_set_new(j, "duplicates", json_integer(pp->duplicates));
        json_object_set_new(j, "rejected", json_integer(pp->rejected));
        json_array_append_new(parts, j);
    }
    json_object_set_new(o, "partitions", parts);
    json_object_set_new(o, "lag", json_integer(lag_total));
    json_object_set_new(o, "lag_seconds", lag_s_max >= 0 ? json_real(lag_s_max) : json_null());
    json_t *fl = json_object();
    json_object_set_new(fl, "rows_written", json_integer((json_int_t)d->rows_written));
    json_object_set_new(fl, "last_at", d->flushes ? json_integer(d->last_flush_at) : json_null());
    json_object_set_new(fl, "last_duration_ms", json_real(d->last_flush_ms));
    json_object_set_new(fl, "last_rows", json_integer((json_int_t)d->last_flush_rows));
    json_object_set_new(fl, "flushes", json_integer((json_int_t)d->flushes));
    json_object_set_new(fl, "failures", json_integer((json_int_t)d->flush_failures));
    json_object_set_new(fl, "last_error",
                        !d->pg_up && d->fl_err[0] ? json_string(d->fl_err) : json_null());
    json_object_set_new(fl, "in_flight", json_boolean(d->inflight));
    json_object_set_new(fl, "late_starts", json_integer((json_int_t)d->flushes_due));
    json_object_set_new(fl, "ticks_after_part", json_integer((json_int_t)d->ticks_after_part));
    json_object_set_new(fl, "ticks_before_end", json_integer((json_int_t)d->ticks_before_end));
    json_object_set_new(fl, "ticks_behind", json_integer((json_int_t)d->ticks_behind));
    json_object_set_new(fl, "redone", json_integer((json_int_t)d->flushes_redone));
    json_object_set_new(fl, "parts_ahead", json_integer((json_int_t)d->parts_ahead));
    json_object_set_new(fl, "parts_ahead_failed", json_integer((json_int_t)d->parts_ahead_failed));
    json_object_set_new(fl, "before_checkpoint", json_integer((json_int_t)d->flushes_early));
    json_object_set_new(fl, "final_during_part", json_integer((json_int_t)d->finals_in_part));
    json_object_set_new(fl, "checkpoint_wait_s", json_real(d->gate_wait_ms / 1000.0));
    json_object_set_new(o, "flush", fl);
    uint64_t used = 0, map = 0;
    st_usage(d->env, &used, &map);
    json_t *st = json_object();
    json_object_set_new(st, "bytes", json_integer((json_int_t)used));
    json_object_set_new(st, "map_size", json_integer((json_int_t)map));
    json_object_set_new(st, "dirty_rows", json_integer((json_int_t)agg_pending_rows(d->agg)));
    agg_dedup_index_t di;
    agg_dedup_index(d->agg, &di);
    json_t *dj = json_object();
    json_object_set_new(dj, "ids", json_integer((json_int_t)di.ids));
    json_object_set_new(dj, "slots", json_integer((json_int_t)di.slots));
    json_object_set_new(dj, "bytes", json_integer((json_int_t)di.bytes));
    json_object_set_new(dj, "grown", json_integer((json_int_t)di.grown));
    json_object_set_new(dj, "grown_ahead", json_integer((json_int_t)di.grown_ahead));
    json_object_set_new(st, "dedup_index", dj);
    json_object_set_new(o, "state", st);
    json_t *lp = json_object();
    json_object_set_new(lp, "idle_s", json_real((double)uv_metrics_idle_time(d->loop) / 1e9));
    json_object_set_new(lp, "commit_s", json_real(d->commit_ms / 1000.0));
    json_object_set_new(lp, "checkpoint_s", json_real(d->ckpt_ms / 1000.0));
    json_object_set_new(lp, "checkpoints", json_integer((json_int_t)d->checkpoints));
    json_object_set_new(lp, "checkpoint_messages", json_integer((json_int_t)d->ckpt_limit));
    json_object_set_new(lp, "checkpoint_shrinks", json_integer((json_int_t)d->ckpt_shrinks));
    json_object_set_new(lp, "heap_prefaulted_mb",
                        json_real((double)cm_heap_prefaulted() / 1048576.0));
    json_object_set_new(lp, "txn_messages", json_integer((json_int_t)txn_limit(d)));
    json_object_set_new(lp, "txn_grows", json_integer((json_int_t)d->txn_grows));
    json_object_set_new(lp, "input_wait_kafka_s", json_real(d->wait_kafka_ms / 1000.0));
    json_object_set_new(lp, "input_wait_validation_s", json_real(d->wait_validation_ms / 1000.0));
    json_object_set_new(o, "loop", lp);
    const char *hp = health_problem(d);
    json_object_set_new(o, "healthy", json_boolean(hp == NULL));
    json_object_set_new(o, "health", hp ? json_string(hp) : json_null());
    return o;
}

static char *status_json(dmn_t *d)
{
    json_t *o = status_obj(d);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

/* A growable text buffer for /metrics. */
typedef struct tb {
    char *p;
    size_t n, cap;
} tb_t;

static void tb_printf(tb_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(tb_t *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0)
            return;
        if (b->p && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        size_t nc = b->cap ? b->cap * 2 : 8192;
        while (nc < b->n + (size_t)k + 1)
            nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np)
            return;
        b->p = np;
        b->cap = nc;
    }
}

static void metric_head(tb_t *b, const char *name, const char *type, const char *help)
{
    tb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static char *metrics_text(dmn_t *d, size_t *len)
{
    tb_t b = {0};
    static const char *const what[] = {"accepted", "duplicates", "rejected"};
    metric_head(&b, "clickmart_events_total", "counter",
                "Messages consumed, by partition and outcome.");
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        int64_t v[3] = {pp->accepted, pp->duplicates, pp->rejected};
        for (int k = 0; k < 3; k++)
            tb_printf(&b, "clickmart_events_total{partition=\"%d\",outcome=\"%s\"} %lld\n", p,
                      what[k], (long long)v[k]);
    }
    metric_head(&b, "clickmart_rejects_total", "counter", "Rejected messages by reason.");
    for (int r = ING_R_PAYLOAD_TOO_LARGE; r < ING_R__COUNT; r++) {
        int64_t s = 0;
        for (int32_t p = 0; p < d->n_parts; p++)
            s += agg_partition(d->agg, p)->rejects_by_reason[r];
        tb_printf(&b, "clickmart_rejects_total{reason=\"%s\"} %lld\n",
                  ing_reason_name((ing_reason_t)r), (long long)s);
    }
    metric_head(&b, "clickmart_consumer_lag_messages", "gauge",
                "Messages between the partition's end and the next offset to apply.");
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        int64_t end = part_end(d, p), next = pp->known ? pp->next_offset : 0;
        if (end < 0)
            continue; /* end offset not known yet: no sample rather than a wrong 0 */
        tb_printf(&b, "clickmart_consumer_lag_messages{partition=\"%d\"} %lld\n", p,
                  (long long)(end > next ? end - next : 0));
    }
    metric_head(&b, "clickmart_consumer_lag_seconds", "gauge",
                "Event-time lag per partition: now minus the watermark (the largest accepted "
                "event time), in seconds.");
    int64_t now_ms = cm_now_ms();
    for (int32_t p = 0; p < d->n_parts; p++) {
        double ls = part_lag_s(d, p, now_ms);
        if (ls >= 0)
            tb_printf(&b, "clickmart_consumer_lag_seconds{partition=\"%d\"} %.3f\n", p, ls);
    }
    metric_head(&b, "clickmart_watermark_seconds", "gauge",
                "Largest accepted event time per partition (Unix seconds).");
    for (int32_t p = 0; p < d->n_parts; p++) {
        const agg_partition_t *pp = agg_partition(d->agg, p);
        if (pp->watermark >= 0)
            tb_printf(&b, "clickmart_watermark_seconds{partition=\"%d\"} %.3f\n", p,
                      (double)pp->watermark / 1000.0);
    }
    metric_head(&b, "clickmart_batches_applied_total", "counter",
                "Validated batches applied to the state.");
    tb_printf(&b, "clickmart_batches_applied_total %llu\n", (unsigned long long)d->batches);
    metric_head(&b, "clickmart_state_commits_total", "counter",
                "LMDB transactions committed by intake (each holds one or more batches).");
    tb_printf(&b, "clickmart_state_commits_total %llu\n", (unsigned long long)d->commits);
    metric_head(&b, "clickmart_state_checkpoints_total", "counter",
                "Checkpoints: the transactions committed since the last one made durable in one "
                "LMDB commit (--checkpoint-messages).");
    tb_printf(&b, "clickmart_state_checkpoints_total %llu\n", (unsigned long long)d->checkpoints);
    metric_head(&b, "clickmart_flushes_total", "counter", "Successful Postgres flushes.");
    tb_printf(&b, "clickmart_flushes_total %llu\n", (unsigned long long)d->flushes);
    metric_head(&b, "clickmart_flush_failures_total", "counter", "Failed Postgres flushes.");
    tb_printf(&b, "clickmart_flush_failures_total %llu\n", (unsigned long long)d->flush_failures);
    metric_head(&b, "clickmart_flushes_redone_total", "counter",
                "Flushes redone with upserts: Postgres already held a row taken for new.");
    tb_printf(&b, "clickmart_flushes_redone_total %llu\n", (unsigned long long)d->flushes_redone);
    metric_head(&b, "clickmart_flush_parts_ahead_total", "counter",
                "Parts of a flush written ahead into its open transaction (--flush-ahead-ms).");
    tb_printf(&b, "clickmart_flush_parts_ahead_total %llu\n", (unsigned long long)d->parts_ahead);
    metric_head(&b, "clickmart_flush_late_starts_total", "counter",
                "Flushes started off the tick: the previous flush, or a part older than an "
                "interval, still ran.");
    tb_printf(&b, "clickmart_flush_late_starts_total %llu\n", (unsigned long long)d->flushes_due);
    metric_head(&b, "clickmart_flush_ticks_after_part_total", "counter",
                "Flushes whose tick found a part written ahead running; started when it was done.");
    tb_printf(&b, "clickmart_flush_ticks_after_part_total %llu\n",
              (unsigned long long)d->ticks_after_part);
    metric_head(&b, "clickmart_flush_rows_total", "counter", "Rows written by flushes.");
    tb_printf(&b, "clickmart_flush_rows_total %llu\n", (unsigned long long)d->rows_written);
    metric_head(&b, "clickmart_rows_written_total", "counter",
                "Rows upserted by successful flushes, per Postgres table.");
    for (int t = 0; t < MX_N_TABLES; t++)
        tb_printf(&b, "clickmart_rows_written_total{table=\"%s\"} %llu\n", mx_table_name(t),
                  (unsigned long long)d->table_rows.written[t]);
    metric_head(&b, "clickmart_rows_deleted_total", "counter",
                "Rows deleted by successful flushes (merged sessions, retracted rows), per table.");
    for (int t = 0; t < MX_N_TABLES; t++)
        tb_printf(&b, "clickmart_rows_deleted_total{table=\"%s\"} %llu\n", mx_table_name(t),
                  (unsigned long long)d->table_rows.deleted[t]);
    metric_head(&b, "clickmart_flush_duration_seconds", "histogram",
                "Duration of successful Postgres flushes (collect and write).");
    for (int i = 0; i < MX_FLUSH_BUCKETS; i++)
        tb_printf(&b, "clickmart_flush_duration_seconds_bucket{le=\"%g\"} %llu\n",
                  mx_flush_bucket_le[i], (unsigned long long)mx_hist_cumulative(&d->flush_hist, i));
    tb_printf(&b, "clickmart_flush_duration_seconds_bucket{le=\"+Inf\"} %llu\n",
              (unsigned long long)d->flush_hist.count);
    tb_printf(&b, "clickmart_flush_duration_seconds_sum %.6f\n", d->flush_hist.sum);
    tb_printf(&b, "clickmart_flush_duration_seconds_count %llu\n",
              (unsigned long long)d->flush_hist.count);
    metric_head(&b, "clickmart_last_flush_duration_seconds", "gauge",
                "Duration of the last successful flush.");
    tb_printf(&b, "clickmart_last_flush_duration_seconds %.6f\n", d->last_flush_ms / 1000.0);
    metric_head(&b, "clickmart_last_flush_success_timestamp_seconds", "gauge",
                "Time of the last successful flush (Unix seconds).");
    tb_printf(&b, "clickmart_last_flush_success_timestamp_seconds %.3f\n",
              (double)d->last_flush_at / 1000.0);
    metric_head(&b, "clickmart_pending_rows", "gauge", "Rows waiting for the next flush.");
    tb_printf(&b, "clickmart_pending_rows %llu\n", (unsigned long long)agg_pending_rows(d->agg));
    uint64_t used = 0, map = 0;
    st_usage(d->env, &used, &map);
    metric_head(&b, "clickmart_state_bytes", "gauge", "LMDB bytes in use.");
    tb_printf(&b, "clickmart_state_bytes %llu\n", (unsigned long long)used);
    metric_head(&b, "clickmart_state_map_bytes", "gauge", "LMDB map size.");
    tb_printf(&b, "clickmart_state_map_bytes %llu\n", (unsigned long long)map);
    metric_head(&b, "clickmart_paused", "gauge", "1 while intake is paused.");
    tb_printf(&b, "clickmart_paused %d\n", d->cons && ing_consumer_paused(d->cons));
    metric_head(&b, "clickmart_intake_pauses_total", "counter", "Times intake was paused.");
    tb_printf(&b, "clickmart_intake_pauses_total %llu\n", (unsigned long long)d->pauses);
    metric_head(&b, "clickmart_postgres_up", "gauge", "1 while the last flush succeeded.");
    tb_printf(&b, "clickmart_postgres_up %d\n", d->pg_up);
    metric_head(&b, "clickmart_broker_up", "gauge", "1 while a Kafka broker answers.");
    tb_printf(&b, "clickmart_broker_up %d\n", d->cons && ing_consumer_broker_up(d->cons));
    metric_head(&b, "clickmart_state_map_used_ratio", "gauge",
                "Fraction of the LMDB map in use (the map doubles when full).");
    tb_printf(&b, "clickmart_state_map_used_ratio %.6f\n", map ? (double)used / (double)map : 0.0);
    metric_head(&b, "clickmart_healthy", "gauge", "1 while /healthz answers 200.");
    tb_printf(&b, "clickmart_healthy %d\n", health_problem(d) == NULL);
    metric_head(&b, "clickmart_health_max_flush_age_seconds", "gauge",
                "Longest time without a successful flush while rows are pending before "
                "/healthz fails.");
    tb_printf(&b, "clickmart_health_max_flush_age_seconds %.3f\n",
              (double)max_flush_age_ms(d) / 1000.0);
    metric_head(&b, "clickmart_build_info", "gauge", "Always 1; the version as a label.");
    tb_printf(&b, "clickmart_build_info{version=\"%s\"} 1\n", CLICKMART_VERSION);
    metric_head(&b, "clickmart_start_time_seconds", "gauge",
                "Time the daemon started (Unix seconds).");
    tb_printf(&b, "clickmart_start_time_seconds %.3f\n",
              ((double)now_ms - (cm_mono_ms() - d->started)) / 1000.0);
    *len = b.n;
    return b.p;
}

static void on_http(void *ud, const char *method, const char *path, sts_response_t *resp)
{
    dmn_t *d = ud;
    (void)method;
    if (!strcmp(path, "/status")) {
        resp->status = 200;
        resp->content_type = "application/json";
        resp->body = status_json(d);
        resp->body_len = resp->body ? strlen(resp->body) : 0;
    } else if (!strcmp(path, "/metrics")) {
        resp->status = 200;
        resp->content_type = "text/plain; version=0.0.4";
        resp->body = metrics_text(d, &resp->body_len);
    } else if (!strcmp(path, "/healthz")) {
        const char *hp = health_problem(d);
        resp->status = hp ? 503 : 200;
        resp->content_type = "text/plain";
        size_t n = strlen(hp ? hp : "ok") + 2;
        resp->body = malloc(n);
        if (resp->body)
            snprintf(resp->body, n, "%s\n", hp ? hp : "ok");
        resp->body_len = resp->body ? n - 1 : 0;
    } else if (!strcmp(path, "/") || !strcmp(path, "/index.html")) {
        size_t n;
        const char *html = page_html(&n);
        resp->status = 200;
        resp->content_type = "text/html; charset=utf-8";
        resp->body = malloc(n ? n : 1);
        if (resp->body)
            memcpy(resp->body, html, n);
        resp->body_len = resp->body ? n : 0;
    } else if (!strcmp(path, "/api/snapshot")) {
        char *marts = NULL;
        int r = agg_snapshot_json(d->agg, 14, &marts);
        resp->status = 200;
        resp->content_type = "application/json";
        resp->body = page_snapshot_json(status_obj(d), r ? NULL : marts, r ? agg_strerror(r) : NULL,
                                        &d->hist, cm_now_ms());
        free(marts);
        resp->body_len = resp->body ? strlen(resp->body) : 0;
    } else {
        resp->status = 404;
        resp->content_type = "text/plain";
        resp->body = strdup("not found\n");
        resp->body_len = resp->body ? strlen(resp->body) : 0;
    }
}

/* The stats timer's period: it samples the live page's history every
 * PAGE_SAMPLE_MS and logs the summary line every --stats-log-interval-ms. */
static uint64_t stats_tick_ms(const dmn_t *d)
{
    int64_t t = PAGE_SAMPLE_MS;
    if (d->cfg.stats_log_interval_ms > 0 && d->cfg.stats_log_interval_ms < t)
        t = d->cfg.stats_log_interval_ms;
    return (uint64_t)t;
}

static void on_stats_timer(uv_timer_t *t)
{
    dmn_t *d = t->data;
    double now = cm_mono_ms();
    double slack = (double)stats_tick_ms(d) / 2.0; /* timers fire a little early or late */
    int64_t now_ms = cm_now_ms();
    int64_t lag = consumer_lag(d);
    double lag_s = -1;
    for (int32_t p = 0; p < d->n_parts; p++) {
        double ls = part_lag_s(d, p, now_ms);
        if (ls > lag_s)
            lag_s = ls;
    }
    if (now - d->last_sample_t >= (double)PAGE_SAMPLE_MS - slack) {
        d->last_sample_t = now;
        int64_t accepted = total(d, 0);
        page_hist_sample(&d->hist, now, now_ms, d->msgs, accepted, lag, lag_s);
        notify_status("%s: accepted %lld, lag %lld messages, %llu flushes, %s",
                      d->stopping ? "stopping" : "consuming", (long long)accepted, (long long)lag,
                      (unsigned long long)d->flushes, health_problem(d) ? d->health : "healthy");
    }
    if (d->cfg.stats_log_interval_ms <= 0 ||
        now - d->last_stats_t < (double)d->cfg.stats_log_interval_ms - slack)
        return;
    double dt = (now - d->last_stats_t) / 1000.0;
    double rate = dt > 0 ? (double)(d->msgs - d->msgs_at_last_stats) / dt : 0;
    cm_info("progress",
            "messages=%llu rate=%.0f/s accepted=%lld duplicates=%lld rejected=%lld lag=%lld "
            "pending_rows=%llu flushes=%llu flush_failures=%llu paused=%d",
            (unsigned long long)d->msgs, rate, (long long)total(d, 0), (long long)total(d, 1),
            (long long)total(d, 2), (long long)lag, (unsigned long long)agg_pending_rows(d->agg),
            (unsigned long long)d->flushes, (unsigned long long)d->flush_failures,
            d->cons && ing_consumer_paused(d->cons));
    d->last_stats_t = now;
    d->msgs_at_last_stats = d->msgs;
}

/* ---------------------------------------------------------------------- */
/* Shutdown.                                                               */

static void on_closed(uv_handle_t *h)
{
    (void)h;
}

static void close_all(dmn_t *d)
{
    if (d->closed)
        return;
    d->closed = 1;
    uv_timer_stop(&d->flush_timer);
    uv_timer_stop(&d->stats_timer);
    uv_timer_stop(&d->grow_timer);
    uv_timer_stop(&d->ahead_timer);
    uv_timer_stop(&d->commit_timer);
    uv_close((uv_handle_t *)&d->commit_timer, on_closed);
    uv_close((uv_handle_t *)&d->flush_timer, on_closed);
    uv_close((uv_handle_t *)&d->stats_timer, on_closed);
    uv_close((uv_handle_t *)&d->grow_timer, on_closed);
    uv_close((uv_handle_t *)&d->ahead_timer, on_closed);
    uv_idle_stop(&d->apply_idle);
    uv_close((uv_handle_t *)&d->apply_idle, on_closed);
    uv_close((uv_handle_t *)&d->sig_term, on_closed);
    uv_close((uv_handle_t *)&d->sig_int, on_closed);
    notify_close();
    if (d->sts) {
        sts_stop(d->sts);
        d->sts = NULL;
    }
    if (d->cons) {
        ing_consumer_close(d->cons);
        d->cons = NULL;
    }
}

static void continue_stop(dmn_t *d)
{
    /* Batches still being validated come back through on_parsed, which
     * applies them and calls here again. */
    if (d->closed || (d->parser && ing_parser_pending(d->parser)) || d->fresh_pending)
        return;
    if (d->inflight) {
        /* A part or flush still runs in Postgres and the loop has nothing
         * else to do: the whole batches commit and the checkpoint is taken
         * now, not after it, so the final flush starts as soon as Postgres
         * is free (a checkpoint of a 1 M backfill's last batches takes
         * 70-220 ms). Later state than a flush in flight collected may be
         * durable: its rows stay marked until that flush commits. */
        if (!d->ckpt_failed && d->txn_open && d->pos == 0 && d->cur > 0 && commit_open(d) != 0)
            return;
        if (!d->closed && !d->txn_open && checkpoint(d) == 0 && d->fl_part)
            collect_final(d);
        return;
    }
    if (d->ckpt_failed || d->fresh_failed) {
        /* Nothing the checkpoint lost may reach Postgres; nor anything at
         * all when the tables already held the topic. */
        drop_held(d);
        if (d->ckpt_grow)
            grow_for_restart(d);
        close_all(d);
        return;
    }
    /* Whole batches waiting in an open transaction are committed; a batch
     * cut off midway and the ones not applied are dropped: a restart
     * consumes them again from LMDB's offsets. */
    if (d->txn_open && d->pos == 0 && d->cur > 0 && commit_open(d) == 0 && d->closed)
        return;
    drop_held(d);
    clear_flushed(d);
    if (flush_needed(d)) {
        if (cm_mono_ms() < d->stop_deadline) {
            start_flush(d); /* retried by the flush timer while backing off */
            return;
        }
        cm_err("final flush did not succeed before the shutdown timeout; the state is kept "
               "and flushed on the next start",
               "pending_rows=%llu", (unsigned long long)agg_pending_rows(d->agg));
        if (d->exit_code == 0)
            d->exit_code = 1;
    } else {
        cm_info("final flush done", "rows_written=%llu", (unsigned long long)d->rows_written);
    }
    /* What came after the final flush's checkpoint (its marks cleared, or
     * everything when the flush did not succeed) is kept too. */
    if (!d->txn_open)
        checkpoint(d);
    close_all(d);
}

/* The check of the tables that ran beside intake is done (loop thread). */
static void on_fresh_done(uv_async_t *h)
{
    dmn_t *d = h->data;
    /* The sync path and a failed start close the handle before any wake-up;
     * this keeps a stray one from deciding twice. */
    if (!d->fresh_pending)
        return;
    fresh_join(d);
    d->fresh_pending = 0;
    if (fresh_decide(d) != 0) {
        /* A SIGTERM during the check started the stop with exit code 0. */
        d->fresh_failed = 1;
        d->exit_code = 1;
        begin_stop(d, 1);
        continue_stop(d);
        return;
    }
    cm_debug("tables checked beside intake", "ms=%.1f held_batches=%zu", d->fresh_ms,
             d->n_held - d->cur);
    notify_ready();
    if (d->stopping) {
        continue_stop(d);
        return;
    }
    start_flush(d); /* the flush at start the first tick could not run */
    pump(d);
}

static void begin_stop(dmn_t *d, int code)
{
    if (d->stopping)
        return;
    d->stopping = 1;
    /* A failure recorded before the stop (a checkpoint's) is not lowered. */
    if (!d->exit_code)
        d->exit_code = code;
    notify_stopping();
    d->stop_deadline = cm_mono_ms() + (double)d->cfg.shutdown_timeout_ms;
    if (d->cons) {
        ing_consumer_stop(d->cons);
        update_pause(d);
    }
    /* The final flush should not wait for a back-off meant for steady state. */
    d->next_try = 0;
    continue_stop(d);
}

static void on_signal(uv_signal_t *s, int signum)
{
    dmn_t *d = s->data;
    cm_info("signal received: stopping intake and flushing", "signal=%d", signum);
    /* A check of the tables still waiting for Postgres stops retrying (a
     * stop for other reasons, such as nothing to consume, lets it finish:
     * the schema is still created). */
    atomic_store(&d->fresh_cancel, 1);
    begin_stop(d, 0);
}

/* ---------------------------------------------------------------------- */

static int setup(dmn_t *d)
{
    char err[512];
    int r;
    int level = cm_log_level_from(d->cfg.log_level);
    if (level < 0) {
        fprintf(stderr, "clickmartd: --log-level must be error, warn, info or debug\n");
        return 2;
    }
    cm_log_set_level(level);
    if (strcmp(d->cfg.log_format, "text") && strcmp(d->cfg.log_format, "json")) {
        fprintf(stderr, "clickmartd: --log-format must be text or json\n");
        return 2;
    }
    cm_log_set_json(!strcmp(d->cfg.log_format, "json"));
    /* glibc's allocator, before any other thread allocates (a thread takes
     * its arena at its first malloc and keeps it). The pad: every batch
     * frees and allocates again megabytes of scratch, which with glibc's
     * default pad of 128 KiB went back to the kernel and was faulted in
     * again, about a quarter of the CPU per event on the benchmark's virtual
     * machine. The pad freezes the mmap threshold at 128 KiB, where
     * librdkafka's fetch and zstd buffers were fresh mappings every time;
     * and with arenas of their own its broker thread faulted in heaps of its
     * own for them (docs/benchmarks.md, thirtieth session). Each call is
     * made, whatever the others return. */
    int refused = cm_heap_pad(d->cfg.heap_pad_mb) != 0;
    refused += cm_heap_mmap_threshold(d->cfg.heap_mmap_threshold_mb) != 0;
    refused += cm_heap_arenas(d->cfg.heap_arenas) != 0;
    if (refused)
        cm_info("heap settings not applied: the allocator does not take mallopt (a sanitizer "
                "build?)",
                "heap_pad_mb=%lld heap_mmap_threshold_mb=%lld heap_arenas=%lld",
                (long long)d->cfg.heap_pad_mb, (long long)d->cfg.heap_mmap_threshold_mb,
                (long long)d->cfg.heap_arenas);
    const char *prefault = "off";
    if (d->cfg.heap_prefault) {
        int pr = cm_heap_prefault_start();
        prefault = pr == 0 ? "on" : pr == -EINVAL ? "off (kernel before 5.14)" : "off (failed)";
    }
    cm_info("heap",
            "huge_pages=\"%s\" transparent_hugepage=\"%s\" prefault=\"%s\" pad_mb=%lld "
            "mmap_threshold_mb=%lld arenas=%lld",
            d->huge_pages, cm_heap_thp_mode(), prefault, (long long)d->cfg.heap_pad_mb,
            (long long)d->cfg.heap_mmap_threshold_mb, (long long)d->cfg.heap_arenas);
    enum st_sync sync;
    if (!strcmp(d->cfg.state_sync, "full"))
        sync = ST_SYNC_FULL;
    else if (!strcmp(d->cfg.state_sync, "meta"))
        sync = ST_SYNC_META;
    else if (!strcmp(d->cfg.state_sync, "none"))
        sync = ST_SYNC_NONE;
    else {
        fprintf(stderr, "clickmartd: --state-sync must be full, meta or none\n");
        return 2;
    }
    if (!d->cfg.topic[0]) {
        fprintf(stderr, "clickmartd: --topic must not be empty\n");
        return 2;
    }
    /* A connection string that does not parse, or a bad schema name, is a
     * mistake in the configuration: retrying the connection (at start, and
     * at every flush after) would only repeat it. */
    if (snk_check_conf(d->cfg.pg, d->cfg.schema) != 0) {
        fprintf(stderr, "clickmartd: --pg or --schema: %s\n", snk_last_error(NULL));
        return 2;
    }
    char red[1024];
    snk_redact_conninfo(d->cfg.pg, red, sizeof red);
    cm_info("starting", "version=%s brokers=%s topic=%s state_dir=%s pg=\"%s\" schema=%s",
            CLICKMART_VERSION, d->cfg.brokers, d->cfg.topic, d->cfg.state_dir, red, d->cfg.schema);

    d->lim.max_event_bytes = d->cfg.max_event_bytes;
    d->lim.max_future_ms = d->cfg.max_future_ms;
    d->ev = malloc(sizeof *d->ev);
    if (!d->ev)
        return 1;
    double t_state = cm_mono_ms();
    r = st_open(d->cfg.state_dir, (size_t)d->cfg.state_map_size_mb << 20, sync, &d->env);
    if (r) {
        cm_err("cannot open state", "dir=%s error=\"%s\"", d->cfg.state_dir, st_strerror(r));
        return 1;
    }
    agg_exp_conf_t xc[CFG_MAX_EXPERIMENTS];
    for (int i = 0; i < d->cfg.n_experiments; i++) {
        const cfg_experiment_t *e = &d->cfg.experiments[i];
        xc[i] = (agg_exp_conf_t){
            e->name,    e->control,        e->n_weights,  (const char *const *)e->weight_names,
            e->weights, e->exposure_event, e->window_days};
    }
    agg_conf_t ac = {d->cfg.topic,
                     d->cfg.session_gap_ms,
                     d->cfg.allowed_lateness_ms,
                     d->cfg.sweep_per_batch,
                     xc,
                     d->cfg.n_experiments,
                     d->cfg.exposure_event,
                     (int)d->cfg.window_days,
                     d->cfg.confidence,
                     d->cfg.sequential_tuning,
                     0};
    /* MDB_WRITEMAP (--state-sync none) has no nested transactions, and its
     * commits write nothing anyway. */
    d->ckpt = d->cfg.checkpoint_messages > 0 && sync != ST_SYNC_NONE;
    d->ckpt_limit = (uint64_t)d->cfg.checkpoint_messages;
    ac.checkpoints = d->ckpt;
    cm_info("state commits", "checkpoints=%s checkpoint_messages=%lld state_sync=%s",
            d->ckpt ? "on" : "off", (long long)d->cfg.checkpoint_messages, d->cfg.state_sync);
    r = agg_open(d->env, &ac, &d->agg);
    if (r) {
        cm_err("cannot open aggregator", "error=\"%s\"", agg_strerror(r));
        return 1;
    }
    double t_kafka = cm_mono_ms();
    /* With an empty state, Postgres is asked whether the tables already
     * hold the topic (fresh_pg: on a new database, creating the schema took
     * about 0.1 s) on a thread of its own, while the consumer starts (10 to
     * over 100 ms on the benchmark machine). */
    int fresh = fresh_needed(d);
    if (fresh && fresh_start(d) != 0)
        return 1;
    if (ing_parser_new(d->loop, &d->lim, on_parsed, d, &d->parser) != 0)
        return 1;
    ing_consumer_conf_t cc = {d->cfg.brokers,
                              d->cfg.topic,
                              d->cfg.group,
                              d->cfg.n_kafka_props,
                              d->cfg.kafka_prop_names,
                              d->cfg.kafka_prop_values,
                              (size_t)d->cfg.batch_size,
                              (int)d->cfg.kafka_close_timeout_ms};
    r = ing_consumer_open(d->loop, &cc, on_msgs, state_offset, d, &d->cons, err, sizeof err);
    if (r) {
        cm_err("cannot create Kafka consumer", "error=\"%s\"", err);
        return 2;
    }
    r = ing_consumer_prepare(d->cons, 30000, &d->n_parts, d->cfg.exit_at_end ? &d->ends : NULL,
                             d->cfg.exit_at_end ? &d->lows : NULL);
    const char *pg_check = fresh ? "beside intake" : "none (the state knows the topic)";
    if (r == 0 && fresh && ing_consumer_group_offsets(d->cons) > 0) {
        /* A rebuild would start these partitions from the earliest offsets
         * instead of the group's: the answer comes first. */
        fresh_join(d);
        if (fresh_decide(d) != 0)
            return 1;
        pg_check = "before intake (the group has offsets)";
    } else if (r == 0 && fresh) {
        /* Every partition starts from the earliest offset whatever the
         * answer: intake starts, and nothing is applied or flushed until
         * the answer is in (on_fresh_done). */
        d->fresh_pending = 1;
    }
    if (r == 0)
        r = ing_consumer_assign(d->cons);
    if (r) {
        cm_err("cannot start consuming", "topic=%s error=\"%s\"", d->cfg.topic,
               ing_consumer_strerror(r));
        return 1;
    }
    if (d->n_parts > AGG_MAX_PARTITIONS) {
        cm_err("too many partitions", "partitions=%d max=%d", d->n_parts, AGG_MAX_PARTITIONS);
        return 1;
    }
    /* Kafka never removes partitions of a live topic; fewer partitions than
     * the state knows means the topic was recreated, and its offsets no
     * longer match the state. */
    for (int32_t p = d->n_parts; p < AGG_MAX_PARTITIONS; p++) {
        if (agg_partition(d->agg, p)->known) {
            cm_err("the state knows a partition the topic no longer has (was the topic "
                   "recreated?); refusing to start",
                   "topic=%s partitions=%d state_partition=%d", d->cfg.topic, d->n_parts, p);
            return 1;
        }
    }
    double t_end = cm_mono_ms();
    cm_debug("start-up", "state_ms=%.1f kafka_ms=%.1f pg_check=\"%s\" pg_check_ms=%.1f",
             t_kafka - t_state, t_end - t_kafka, pg_check, d->fresh_thread_on ? 0.0 : d->fresh_ms);
    if (d->cfg.exit_at_end) {
        int64_t sum = 0;
        for (int32_t p = 0; p < d->n_parts; p++)
            sum += d->ends[p];
        cm_info("exit-at-end: consuming up to the current end offsets",
                "partitions=%d "
                "end_offsets_total=%lld",
                d->n_parts, (long long)sum);
    }
    if (d->cfg.status_socket[0] || d->cfg.http_listen[0]) {
        r = sts_start(d->loop, d->cfg.status_socket[0] ? d->cfg.status_socket : NULL,
                      d->cfg.http_listen[0] ? d->cfg.http_listen : NULL, on_http, d, &d->sts);
        if (r) {
            cm_err("cannot start the status server", "socket=%s error=\"%s\"", d->cfg.status_socket,
                   sts_strerror(r));
            return 1;
        }
    }
    uv_timer_init(d->loop, &d->flush_timer);
    uv_timer_init(d->loop, &d->stats_timer);
    uv_timer_init(d->loop, &d->grow_timer);
    uv_timer_init(d->loop, &d->commit_timer);
    uv_timer_init(d->loop, &d->ahead_timer);
    d->flush_timer.data = d->stats_timer.data = d->grow_timer.data = d->commit_timer.data = d;
    d->ahead_timer.data = d;
    uv_timer_start(&d->flush_timer, on_flush_timer, 0, (uint64_t)d->cfg.flush_interval_ms);
    /* Parts only make sense well inside an interval. */
    if (d->cfg.flush_ahead_ms > 0 && d->cfg.flush_ahead_ms < d->cfg.flush_interval_ms)
        uv_timer_start(&d->ahead_timer, on_ahead_timer, AHEAD_POLL_MS, AHEAD_POLL_MS);
    uv_timer_start(&d->stats_timer, on_stats_timer, 0, stats_tick_ms(d));
    uv_timer_start(&d->grow_timer, on_grow_timer, 50, 50);
    uv_idle_init(d->loop, &d->apply_idle);
    d->apply_idle.data = d;
    notify_watchdog_start(d->loop);
    uv_signal_init(d->loop, &d->sig_term);
    uv_signal_init(d->loop, &d->sig_int);
    d->sig_term.data = d->sig_int.data = d;
    uv_signal_start(&d->sig_term, on_signal, SIGTERM);
    uv_signal_start(&d->sig_int, on_signal, SIGINT);
    d->last_stats_t = cm_mono_ms();
    /* Type=notify: state open, consumer and status server up, and the
     * tables checked (on_fresh_done, when that runs beside intake). */
    if (!d->fresh_pending)
        notify_ready();
    if (d->cfg.exit_at_end && all_at_end(d)) {
        cm_info("nothing to consume: already at the end offsets", "%s", "");
        begin_stop(d, 0);
    }
    return 0;
}

int main(int argc, char **argv)
{
    static dmn_t d;
    char err[512] = "";
    cfg_defaults(&d.cfg);
    int r = cfg_parse(&d.cfg, argc, argv, err, sizeof err);
    if (r == CFG_HELP) {
        cfg_print_help(stdout, "clickmartd");
        cfg_free(&d.cfg);
        return 0;
    }
    if (r == CFG_VERSION) {
        printf("clickmartd %s (librdkafka %s, libuv %s, %s, jansson %s)\n", CLICKMART_VERSION,
               rd_kafka_version_str(), uv_version_string(), MDB_VERSION_STRING, JANSSON_VERSION);
        cfg_free(&d.cfg);
        return 0;
    }
    if (r) {
        fprintf(stderr, "clickmartd: %s\n", err);
        cfg_free(&d.cfg);
        return 2;
    }
    if (d.cfg.print_config) {
        cfg_dump(&d.cfg, stdout);
        cfg_free(&d.cfg);
        return 0;
    }
    int huge = cm_heap_mode_from(d.cfg.heap_huge_pages);
    if (huge < 0) {
        fprintf(stderr, "clickmartd: --heap-huge-pages must be auto, loop, all or off\n");
        cfg_free(&d.cfg);
        return 2;
    }
    d.huge_pages = cm_heap_start(huge, argv);
    signal(SIGPIPE, SIG_IGN);
    d.loop = uv_default_loop();
    /* Idle time (waiting in the poll for input) tells a loop starved of
     * input from one busy or blocked; reported when it stops. */
    uv_loop_configure(d.loop, UV_METRICS_IDLE_TIME);
    d.started = cm_mono_ms();
    if (uv_mutex_init(&d.gate_mu) != 0 || uv_cond_init(&d.gate_cv) != 0) {
        fprintf(stderr, "clickmartd: cannot create the flush's commit gate\n");
        cfg_free(&d.cfg);
        return 1;
    }
    int rc = setup(&d);
    if (rc == 0) {
        uv_run(d.loop, UV_RUN_DEFAULT);
        rc = d.exit_code;
    } else {
        /* A check of the tables may still run (setup failed after it started). */
        atomic_store(&d.fresh_cancel, 1);
        fresh_join(&d);
        if (d.cons) {
            ing_consumer_close(d.cons);
            d.cons = NULL;
        }
        uv_run(d.loop, UV_RUN_NOWAIT);
    }
    if (d.pg)
        snk_close(d.pg);
    if (d.parser) {
        drop_held(&d);
        ing_parser_free(d.parser);
    }
    agg_flush_free(d.fl_clear);
    drop_final(&d);
    agg_dedup_index_t di = {0};
    if (d.agg)
        agg_dedup_index(d.agg, &di);
    agg_close(d.agg);
    st_close(d.env);
    free(d.ev);
    free(d.ends);
    free(d.lows);
    double loop_idle = (double)uv_metrics_idle_time(d.loop) / 1e9;
    uv_loop_close(d.loop);
    cm_heap_prefault_stop();
    uv_cond_destroy(&d.gate_cv);
    uv_mutex_destroy(&d.gate_mu);
    /* The loop thread's own CPU time: the part of the process's CPU that one
     * core bounds (the parsers, librdkafka and the flush worker run beside
     * it), which the bench reports per event. The time it was runnable but
     * waited for a core (schedstat's second field, where the kernel keeps
     * it) tells a loop starved of CPU from one waiting for input. */
    struct rusage ru;
    double loop_cpu = 0, loop_wait = -1;
    if (getrusage(RUSAGE_THREAD, &ru) == 0)
        loop_cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
                   ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
    FILE *ss = fopen("/proc/thread-self/schedstat", "r");
    if (ss) {
        unsigned long long run_ns, wait_ns;
        if (fscanf(ss, "%llu %llu", &run_ns, &wait_ns) == 2)
            loop_wait = (double)wait_ns / 1e9;
        fclose(ss);
    }
    cm_info("stopped",
            "exit_code=%d run_s=%.3f loop_cpu_s=%.3f loop_runqueue_wait_s=%.3f loop_idle_s=%.3f "
            "commit_s=%.3f checkpoint_s=%.3f input_wait_kafka_s=%.3f input_wait_validation_s=%.3f "
            "batches=%llu commits=%llu checkpoints=%llu prefaulted_mb=%.0f dedup_slots=%llu "
            "dedup_grown=%llu dedup_grown_ahead=%llu",
            rc, (cm_mono_ms() - d.started) / 1000.0, loop_cpu, loop_wait, loop_idle,
            d.commit_ms / 1000.0, d.ckpt_ms / 1000.0, d.wait_kafka_ms / 1000.0,
            d.wait_validation_ms / 1000.0, (unsigned long long)d.batches,
            (unsigned long long)d.commits, (unsigned long long)d.checkpoints,
            (double)cm_heap_prefaulted() / 1048576.0, (unsigned long long)di.slots,
            (unsigned long long)di.grown, (unsigned long long)di.grown_ahead);
    cfg_free(&d.cfg);
    return rc;
}
