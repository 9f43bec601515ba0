/*
 * consumer.c - librdkafka consumer on the libuv loop. See consumer.h.
 */
#include "ingest/consumer.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/util.h"

#define BACKSTOP_MS 100

struct ing_consumer {
    uv_loop_t *loop;
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;
    int pipe_fds[2];
    uv_poll_t poll;
    uv_timer_t backstop;
    uv_idle_t more; /* runs while a full batch suggests more are queued */
    int open_handles;
    ing_msgs_fn on_msgs;
    ing_offset_fn offset_of;
    void *ud;
    char *topic;
    size_t batch_size;
    rd_kafka_message_t **buf;
    rd_kafka_topic_partition_list_t *assignment;
    /* Between ing_consumer_prepare and ing_consumer_assign: the group's
     * committed offsets (NULL when they could not be read). */
    rd_kafka_topic_partition_list_t *committed;
    int32_t n_partitions;
    int paused;
    int held;
    uv_work_t probe;   /* asks the cluster whether it is back while "down" */
    int probing;       /* a probe is running on the thread pool */
    int probe_ok;      /* its result */
    double last_probe; /* monotonic ms */
    int closing_probe; /* close waits for a running probe */
    int stopped;
    int broker_up;
    unsigned downs;       /* times marked down (any thread); a probe counts only if none came */
    unsigned probe_downs; /* downs when the running probe started */
    int closing;
    int close_timeout_ms;
};

static void set_err(char *err, size_t cap, const char *fmt, const char *a)
{
    if (err && cap)
        snprintf(err, cap, fmt, a);
}

static void on_more(uv_idle_t *h);

/* Mark the brokers down; any thread (librdkafka's error callback too). */
static void mark_down(ing_consumer_t *c)
{
    __atomic_add_fetch(&c->downs, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&c->broker_up, 0, __ATOMIC_RELAXED);
}

/*
 * Deliver one batch of what is queued. A full batch means more may be
 * waiting: the idle handle calls back on the next loop iteration, so the
 * queue is drained until empty while timers, flush completions and the
 * status socket still get their turn between batches.
 */
static void drain(ing_consumer_t *c)
{
    if (c->closing || c->held) {
        uv_idle_stop(&c->more);
        return;
    }
    {
        ssize_t n = rd_kafka_consume_batch_queue(c->q, 0, c->buf, c->batch_size);
        if ((size_t)(n < 0 ? 0 : n) < c->batch_size)
            uv_idle_stop(&c->more);
        else
            uv_idle_start(&c->more, on_more);
        if (n <= 0)
            return;
        size_t keep = 0;
        for (ssize_t i = 0; i < n; i++) {
            rd_kafka_message_t *m = c->buf[i];
            if (m->err) {
                if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
                    rd_kafka_message_destroy(m);
                    continue;
                }
                if (m->err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN ||
                    m->err == RD_KAFKA_RESP_ERR__TRANSPORT)
                    mark_down(c);
                cm_warn("kafka consumer error", "partition=%d error=\"%s\"", m->partition,
                        rd_kafka_message_errstr(m));
                rd_kafka_message_destroy(m);
                continue;
            }
            /* A delivered message does not prove a broker is up: it may have
             * waited in librdkafka's prefetch queue since before the outage.
             * Only the probe (on_backstop) marks the brokers up again. */
            if (c->stopped) {
                rd_kafka_message_destroy(m);
                continue;
            }
            c->buf[keep++] = m;
        }
        if (keep)
            c->on_msgs(c->ud, c->buf, keep);
    }
}

static void on_more(uv_idle_t *h)
{
    drain(h->data);
}

static void on_readable(uv_poll_t *h, int status, int events)
{
    (void)events;
    ing_consumer_t *c = h->data;
    if (status < 0)
        return;
    char tmp[256];
    while (read(c->pipe_fds[0], tmp, sizeof tmp) > 0) {
    }
    drain(c);
}

/*
 * librdkafka reports "all brokers down" but no "back up" event; an idle
 * topic delivers no message, and a delivered message proves nothing (it may
 * have waited in the prefetch queue since before the outage). While the
 * brokers are marked down, a metadata request on the thread pool (blocking,
 * off the loop) checks every few seconds whether the cluster answers again;
 * only that marks them up.
 */
static void probe_work(uv_work_t *w)
{
    ing_consumer_t *c = w->data;
    /* A metadata request honours its timeout even with every broker down
     * (a watermark query was seen to wait far longer). */
    const struct rd_kafka_metadata *md = NULL;
    c->probe_ok = rd_kafka_metadata(c->rk, 0, NULL, &md, 2000) == RD_KAFKA_RESP_ERR_NO_ERROR;
    if (md)
        rd_kafka_metadata_destroy(md);
}

static void probe_after(uv_work_t *w, int status)
{
    ing_consumer_t *c = w->data;
    c->probing = 0;
    /* A down report that came while the probe ran wins over its answer. */
    if (status == 0 && c->probe_ok && !c->closing &&
        __atomic_load_n(&c->downs, __ATOMIC_RELAXED) == c->probe_downs) {
        __atomic_store_n(&c->broker_up, 1, __ATOMIC_RELAXED);
        cm_info("kafka brokers reachable again", "topic=%s", c->topic);
    }
    if (c->closing_probe)
        ing_consumer_close(c);
}

static void on_backstop(uv_timer_t *t)
{
    ing_consumer_t *c = t->data;
    drain(c);
    if (!c->closing && !c->probing && c->rk && !ing_consumer_broker_up(c) &&
        cm_mono_ms() - c->last_probe > 3000) {
        c->probing = 1;
        c->last_probe = cm_mono_ms();
        c->probe_downs = __atomic_load_n(&c->downs, __ATOMIC_RELAXED);
        c->probe.data = c;
        if (uv_queue_work(c->loop, &c->probe, probe_work, probe_after) != 0)
            c->probing = 0;
    }
}

/* librdkafka's error callback runs on its own thread: only set a flag. */
static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    (void)rk;
    ing_consumer_t *c = opaque;
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
        mark_down(c);
    cm_warn("kafka error", "code=%s reason=\"%s\"", rd_kafka_err2name(err), reason);
}

static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    cm_log(level <= 3   ? CM_LOG_ERROR
           : level <= 4 ? CM_LOG_WARN
                        : CM_LOG_DEBUG,
           "librdkafka", "facility=%s text=\"%s\"", fac, buf);
}

int ing_consumer_open(uv_loop_t *loop, const ing_consumer_conf_t *cf, ing_msgs_fn on_msgs,
                      ing_offset_fn offset_of, void *ud, ing_consumer_t **out, char *err,
                      size_t errcap)
{
    ing_consumer_t *c = calloc(1, sizeof *c);
    if (!c)
        return ING_ENOMEM;
    c->loop = loop;
    c->on_msgs = on_msgs;
    c->offset_of = offset_of;
    c->ud = ud;
    c->batch_size = cf->batch_size ? cf->batch_size : 1000;
    c->close_timeout_ms = cf->close_timeout_ms;
    c->topic = strdup(cf->topic);
    c->buf = calloc(c->batch_size, sizeof *c->buf);
    c->broker_up = 1;
    c->pipe_fds[0] = c->pipe_fds[1] = -1;
    if (!c->topic || !c->buf) {
        free(c->topic);
        free(c->buf);
        free(c);
        return ING_ENOMEM;
    }
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* Offsets live in LMDB with the state; the group's offsets are only a
     * fallback and a courtesy to monitoring tools, so nothing is auto-committed.
     * fetch.wait.max.ms bounds how long a broker may hold a Fetch that found
     * no data. Kafka answers as soon as data arrives, so there it only sets how
     * often an idle consumer asks (10 times a second instead of 2); librdkafka's
     * mock broker (the dev broker) holds such a Fetch for the whole time even
     * when data arrives meanwhile, which at librdkafka's 500 ms added about
     * 0.2 s to the median freshness of the bench's steady runs (docs/devbroker.md).
     * queued.min.messages: librdkafka stops fetching once its consumer queue
     * holds that many messages (100 000 by default), and librdkafka 2.0 (Debian
     * 12's) looks again only up to a second later (2.1 made that
     * fetch.queue.backoff.ms, 1000 ms by default). While clickmartd holds
     * intake for its own bound (batches being validated or applied), the queue
     * reaches 100 000 messages, and at 150 000-200 000 events/s it was drained
     * before fetching resumed: the loop waited 0.4-1.6 s for messages in a
     * 1 M run (docs/benchmarks.md, "Intake waiting for librdkafka"). The memory
     * bound remains queued.max.messages.kbytes (64 MB by default), which takes
     * precedence and holds more than a second of messages at these rates. */
    const char *defaults[][2] = {
        {"bootstrap.servers", cf->brokers}, {"group.id", cf->group},
        {"enable.auto.commit", "false"},    {"enable.auto.offset.store", "false"},
        {"auto.offset.reset", "earliest"},  {"enable.partition.eof", "false"},
        {"client.id", "clickmartd"},        {"fetch.wait.max.ms", "100"},
        {"queued.min.messages", "1000000"},
    };
    for (size_t i = 0; i < sizeof defaults / sizeof defaults[0]; i++) {
        if (rd_kafka_conf_set(conf, defaults[i][0], defaults[i][1], errstr, sizeof errstr) !=
            RD_KAFKA_CONF_OK) {
            set_err(err, errcap, "%s", errstr);
            goto fail_conf;
        }
    }
    for (int i = 0; i < cf->n_props; i++) {
        if (rd_kafka_conf_set(conf, cf->prop_names[i], cf->prop_values[i], errstr, sizeof errstr) !=
            RD_KAFKA_CONF_OK) {
            set_err(err, errcap, "%s", errstr);
            goto fail_conf;
        }
    }
    /* The settings that shape intake, as they end up after -X: what an
     * operator tuning memory or latency needs to see. */
    {
        const char *shown[] = {"fetch.wait.max.ms", "queued.min.messages",
                               "queued.max.messages.kbytes"};
        char val[sizeof shown / sizeof shown[0]][64];
        for (size_t i = 0; i < sizeof shown / sizeof shown[0]; i++) {
            size_t vn = sizeof val[i];
            if (rd_kafka_conf_get(conf, shown[i], val[i], &vn) != RD_KAFKA_CONF_OK)
                snprintf(val[i], sizeof val[i], "?");
        }
        cm_info("kafka consumer settings",
                "fetch.wait.max.ms=%s queued.min.messages=%s queued.max.messages.kbytes=%s", val[0],
                val[1], val[2]);
    }
    rd_kafka_conf_set_opaque(conf, c);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_log_cb(conf, log_cb);
    c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!c->rk) {
        set_err(err, errcap, "%s", errstr);
        goto fail_conf;
    }
    rd_kafka_poll_set_consumer(c->rk);
    c->q = rd_kafka_queue_get_consumer(c->rk);
    if (pipe2(c->pipe_fds, O_NONBLOCK | O_CLOEXEC) != 0) {
        set_err(err, errcap, "pipe: %s", strerror(errno));
        ing_consumer_close(c);
        return ING_ESYS;
    }
    rd_kafka_queue_io_event_enable(c->q, c->pipe_fds[1], "1", 1);
    uv_poll_init(loop, &c->poll, c->pipe_fds[0]);
    c->poll.data = c;
    uv_poll_start(&c->poll, UV_READABLE, on_readable);
    uv_timer_init(loop, &c->backstop);
    c->backstop.data = c;
    uv_timer_start(&c->backstop, on_backstop, BACKSTOP_MS, BACKSTOP_MS);
    uv_idle_init(loop, &c->more);
    c->more.data = c;
    c->open_handles = 3;
    *out = c;
    return 0;
fail_conf:
    if (!c->rk)
        rd_kafka_conf_destroy(conf);
    free(c->topic);
    free(c->buf);
    free(c);
    return ING_ECONF;
}

static int query_ends(ing_consumer_t *c, int64_t *ends, int64_t *lows, int32_t n, int timeout_ms);

/* Partitions 0..n-1 of the topic, each with `offset`, in partition order. */
static rd_kafka_topic_partition_list_t *partition_list(const ing_consumer_t *c, int32_t n,
                                                       int64_t offset)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n);
    for (int32_t p = 0; p < n; p++)
        rd_kafka_topic_partition_list_add(l, c->topic, p)->offset = offset;
    return l;
}

int ing_consumer_prepare(ing_consumer_t *c, int timeout_ms, int32_t *n_partitions, int64_t **ends,
                         int64_t **lows)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(c->rk, c->topic, NULL);
    if (!rkt)
        return ING_EKAFKA;
    const struct rd_kafka_metadata *md = NULL;
    double deadline = cm_mono_ms() + timeout_ms;
    int rc = ING_ETIMEOUT;
    /* The topic may still be being created: ask again until the deadline. */
    while (cm_mono_ms() < deadline) {
        rd_kafka_resp_err_t e = rd_kafka_metadata(c->rk, 0, rkt, &md, 5000);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR && md->topic_cnt == 1 &&
            md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR && md->topics[0].partition_cnt > 0) {
            rc = 0;
            break;
        }
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR) {
            cm_warn("topic not available yet", "topic=%s error=%s", c->topic,
                    rd_kafka_err2name(md->topic_cnt ? md->topics[0].err : e));
            rc = ING_ENOTOPIC;
            rd_kafka_metadata_destroy(md);
            md = NULL;
        } else {
            cm_warn("metadata request failed", "error=%s", rd_kafka_err2name(e));
            rc = ING_ETIMEOUT;
        }
        usleep(500 * 1000);
    }
    rd_kafka_topic_destroy(rkt);
    if (rc)
        return rc;
    int32_t n = md->topics[0].partition_cnt;
    rd_kafka_metadata_destroy(md);
    c->n_partitions = n;
    *n_partitions = n;
    rd_kafka_topic_partition_list_t *l = partition_list(c, n, RD_KAFKA_OFFSET_INVALID);
    /* The group's committed offsets are the fallback when LMDB has none.
     * Asked before the end offsets: the group coordinator's connection,
     * made meanwhile, held a ListOffsets answer up by 40 ms on the mock. */
    rd_kafka_resp_err_t e = rd_kafka_committed(c->rk, l, timeout_ms);
    if (e) {
        cm_warn("cannot read committed group offsets", "error=%s", rd_kafka_err2name(e));
        rd_kafka_topic_partition_list_destroy(l);
        l = NULL;
    }
    if (c->committed)
        rd_kafka_topic_partition_list_destroy(c->committed);
    c->committed = l;
    if (ends && lows) {
        /* Before the assignment: once fetches run, each query waits behind
         * a fetch of its partition (up to fetch.wait.max.ms each on the mock). */
        *ends = calloc((size_t)n, sizeof **ends);
        *lows = calloc((size_t)n, sizeof **lows);
        int r = *ends && *lows ? query_ends(c, *ends, *lows, n, timeout_ms) : ING_ENOMEM;
        if (r)
            return r;
    }
    return 0;
}

/* The group's committed offset of partition p, or -1. */
static int64_t group_offset(const ing_consumer_t *c, int32_t p)
{
    if (!c->committed || p < 0 || p >= c->committed->cnt)
        return -1;
    const rd_kafka_topic_partition_t *tp = &c->committed->elems[p];
    return tp->err == 0 && tp->offset >= 0 ? tp->offset : -1;
}

int ing_consumer_group_offsets(const ing_consumer_t *c)
{
    int k = 0;
    for (int32_t p = 0; p < c->n_partitions; p++)
        k += group_offset(c, p) >= 0;
    return k;
}

int ing_consumer_assign(ing_consumer_t *c)
{
    int32_t n = c->n_partitions;
    if (n <= 0)
        return ING_EKAFKA;
    rd_kafka_topic_partition_list_t *l = partition_list(c, n, RD_KAFKA_OFFSET_INVALID);
    for (int32_t p = 0; p < n; p++) {
        int64_t off = c->offset_of(c->ud, p), group = group_offset(c, p);
        rd_kafka_topic_partition_t *tp = &l->elems[p];
        const char *from = "state";
        if (off >= 0) {
            tp->offset = off;
        } else if (off != ING_OFFSET_EARLIEST && group >= 0) {
            tp->offset = group;
            from = "group";
        } else {
            tp->offset = RD_KAFKA_OFFSET_BEGINNING;
            from = "earliest";
        }
        cm_info("assign partition", "topic=%s partition=%d offset=%lld from=%s", c->topic, p,
                (long long)tp->offset, from);
    }
    rd_kafka_resp_err_t e = rd_kafka_assign(c->rk, l);
    if (e) {
        rd_kafka_topic_partition_list_destroy(l);
        cm_err("assign failed", "error=%s", rd_kafka_err2name(e));
        return ING_EKAFKA;
    }
    if (c->assignment)
        rd_kafka_topic_partition_list_destroy(c->assignment);
    c->assignment = l;
    return 0;
}

/*
 * Every partition's offset at one end of the log (RD_KAFKA_OFFSET_END or
 * RD_KAFKA_OFFSET_BEGINNING) in one ListOffsets request per broker: the
 * special offsets travel as the request's timestamps, which Kafka answers
 * with the high watermark or the log start. 0, or -1 when any partition
 * failed (the caller then asks partition by partition).
 */
static int list_offsets(ing_consumer_t *c, int64_t which, int64_t *out, int32_t n, int timeout_ms)
{
    rd_kafka_topic_partition_list_t *l = partition_list(c, n, which);
    int ok = rd_kafka_offsets_for_times(c->rk, l, timeout_ms) == RD_KAFKA_RESP_ERR_NO_ERROR;
    for (int i = 0; ok && i < l->cnt; i++) {
        const rd_kafka_topic_partition_t *tp = &l->elems[i];
        if (tp->err || tp->offset < 0 || tp->partition < 0 || tp->partition >= n)
            ok = 0;
        else
            out[tp->partition] = tp->offset;
    }
    ok = ok && l->cnt == n;
    rd_kafka_topic_partition_list_destroy(l);
    return ok ? 0 : -1;
}

static int query_ends(ing_consumer_t *c, int64_t *ends, int64_t *lows, int32_t n, int timeout_ms)
{
    /* One request for all partitions: asked one by one (two round trips
     * each), 64 partitions took 50 ms of the start on the benchmark
     * machine. */
    if (list_offsets(c, RD_KAFKA_OFFSET_END, ends, n, timeout_ms) == 0 &&
        (!lows || list_offsets(c, RD_KAFKA_OFFSET_BEGINNING, lows, n, timeout_ms) == 0))
        return 0;
    cm_info("the end offsets in one request failed; asking partition by partition", "partitions=%d",
            n);
    for (int32_t p = 0; p < n; p++) {
        int64_t lo = 0, hi = 0;
        rd_kafka_resp_err_t e =
            rd_kafka_query_watermark_offsets(c->rk, c->topic, p, &lo, &hi, timeout_ms);
        if (e) {
            cm_err("cannot query end offset", "partition=%d error=%s", p, rd_kafka_err2name(e));
            return ING_ETIMEOUT;
        }
        ends[p] = hi;
        if (lows)
            lows[p] = lo;
    }
    return 0;
}

int64_t ing_consumer_start_offset(const ing_consumer_t *c, int32_t partition)
{
    if (!c->assignment || partition < 0 || partition >= c->assignment->cnt)
        return -1;
    int64_t off = c->assignment->elems[partition].offset;
    return off >= 0 ? off : -1;
}

int64_t ing_consumer_cached_end(ing_consumer_t *c, int32_t partition)
{
    int64_t lo = -1, hi = -1;
    if (rd_kafka_get_watermark_offsets(c->rk, c->topic, partition, &lo, &hi) != 0)
        return -1;
    return hi;
}

void ing_consumer_pause(ing_consumer_t *c, int paused)
{
    if (!c->assignment || paused == c->paused)
        return;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_copy(c->assignment);
    rd_kafka_resp_err_t e =
        paused ? rd_kafka_pause_partitions(c->rk, l) : rd_kafka_resume_partitions(c->rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (e) {
        cm_err("pause/resume failed", "paused=%d error=%s", paused, rd_kafka_err2name(e));
        return;
    }
    c->paused = paused;
}

int ing_consumer_paused(const ing_consumer_t *c)
{
    return c->paused;
}

void ing_consumer_hold(ing_consumer_t *c, int hold)
{
    c->held = hold;
    if (!hold && !c->closing)
        uv_idle_start(&c->more, on_more);
}

void ing_consumer_stop(ing_consumer_t *c)
{
    c->stopped = 1;
}

int ing_consumer_broker_up(const ing_consumer_t *c)
{
    return __atomic_load_n(&c->broker_up, __ATOMIC_RELAXED);
}

void ing_consumer_commit(ing_consumer_t *c, const int64_t *next_offsets, int32_t n)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n);
    for (int32_t p = 0; p < n; p++)
        if (next_offsets[p] >= 0)
            rd_kafka_topic_partition_list_add(l, c->topic, p)->offset = next_offsets[p];
    if (l->cnt)
        rd_kafka_commit(c->rk, l, 1);
    rd_kafka_topic_partition_list_destroy(l);
}

/* Release what is left once librdkafka and every handle are gone. */
static void consumer_free(ing_consumer_t *c)
{
    if (c->pipe_fds[0] >= 0)
        close(c->pipe_fds[0]);
    if (c->pipe_fds[1] >= 0)
        close(c->pipe_fds[1]);
    free(c->topic);
    free(c->buf);
    free(c);
}

static void on_handle_closed(uv_handle_t *h)
{
    ing_consumer_t *c = h->data;
    if (--c->open_handles == 0)
        consumer_free(c);
}

/*
 * librdkafka's teardown, run on a thread of its own so that the closer can
 * stop waiting for it. Whichever of the two lets go last frees the record.
 */
typedef struct destroyer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rd_kafka_t *rk;
    int done;
    int refs;
} destroyer_t;

static void destroyer_release(destroyer_t *d)
{
    pthread_mutex_lock(&d->mu);
    int last = --d->refs == 0;
    pthread_mutex_unlock(&d->mu);
    if (last) {
        pthread_cond_destroy(&d->cv);
        pthread_mutex_destroy(&d->mu);
        free(d);
    }
}

static void *destroy_thread(void *arg)
{
    destroyer_t *d = arg;
    rd_kafka_destroy_flags(d->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    pthread_mutex_lock(&d->mu);
    d->done = 1;
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
    destroyer_release(d);
    return NULL;
}

/* Start a destroyer for rk; NULL when no thread could be started. */
static destroyer_t *destroyer_start(rd_kafka_t *rk)
{
    destroyer_t *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
    d->rk = rk;
    d->refs = 2;
    pthread_t t;
    if (pthread_create(&t, NULL, destroy_thread, d) != 0) {
        pthread_cond_destroy(&d->cv);
        pthread_mutex_destroy(&d->mu);
        free(d);
        return NULL;
    }
    pthread_detach(t);
    return d;
}

/* Wait up to timeout_ms for the destroyer; 1 when librdkafka is gone. */
static int destroyer_wait(destroyer_t *d, int timeout_ms)
{
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&d->mu);
    while (!d->done && pthread_cond_timedwait(&d->cv, &d->mu, &until) != ETIMEDOUT)
        ;
    int done = d->done;
    pthread_mutex_unlock(&d->mu);
    return done;
}

/*
 * Partitions are assigned, not subscribed, and offsets are committed
 * explicitly: there is no group to leave. librdkafka's teardown still waits
 * for outstanding requests, and with every broker down, or with a group
 * coordinator connection that hangs after the brokers came back, that is
 * minutes. The state and the tables are already safe and the commits are
 * advisory, so the wait is bounded: with the brokers down it is skipped,
 * otherwise it lasts at most close_timeout_ms.
 */
static void destroy_rk(ing_consumer_t *c)
{
    int wait_ms = ing_consumer_broker_up(c) ? c->close_timeout_ms : 0;
    destroyer_t *d = destroyer_start(c->rk);
    if (!d) {
        rd_kafka_destroy_flags(c->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
        return;
    }
    double t0 = cm_mono_ms();
    if (!destroyer_wait(d, wait_ms)) {
        if (wait_ms == 0)
            cm_warn("kafka brokers down at shutdown: not waiting for librdkafka to close",
                    "topic=%s", c->topic);
        else
            cm_warn("librdkafka did not close in time: not waiting for it (the state holds "
                    "the offsets)",
                    "topic=%s waited_ms=%.0f", c->topic, cm_mono_ms() - t0);
    }
    destroyer_release(d);
}

void ing_consumer_close(ing_consumer_t *c)
{
    if (!c)
        return;
    c->closing = 1;
    if (c->probing) {
        /* The probe uses the handle: finish closing when it returns. */
        c->closing_probe = 1;
        return;
    }
    c->closing_probe = 0;
    if (c->q) {
        rd_kafka_queue_io_event_enable(c->q, -1, NULL, 0);
        rd_kafka_queue_destroy(c->q);
        c->q = NULL;
    }
    if (c->rk) {
        destroy_rk(c);
        c->rk = NULL;
    }
    if (c->assignment) {
        rd_kafka_topic_partition_list_destroy(c->assignment);
        c->assignment = NULL;
    }
    if (c->committed) {
        rd_kafka_topic_partition_list_destroy(c->committed);
        c->committed = NULL;
    }
    if (c->open_handles) {
        uv_close((uv_handle_t *)&c->poll, on_handle_closed);
        uv_close((uv_handle_t *)&c->backstop, on_handle_closed);
        uv_close((uv_handle_t *)&c->more, on_handle_closed);
    } else {
        consumer_free(c);
    }
}

const char *ing_consumer_strerror(int err)
{
    switch (err) {
    case ING_ECONF:
        return "invalid librdkafka configuration";
    case ING_EKAFKA:
        return "librdkafka error";
    case ING_ENOTOPIC:
        return "topic does not exist";
    case ING_ETIMEOUT:
        return "Kafka cluster did not answer in time";
    case ING_ENOMEM:
        return "out of memory";
    case ING_ESYS:
        return "system error";
    default:
        return "unknown consumer error";
    }
}
