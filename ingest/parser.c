/*
 * parser.c - validation on libuv's thread pool. See parser.h.
 */
#include "ingest/parser.h"

#include <stdlib.h>
#include <string.h>

#include "daemon/util.h"

typedef struct job {
    uv_work_t work;
    struct job *next;
    ing_parser_t *p;
    ing_batch_t *b;
    char *arena; /* compact copies of the accepted events */
    int done;
} job_t;

struct ing_parser {
    uv_loop_t *loop;
    ing_limits_t lim;
    ing_parsed_fn fn;
    void *ud;
    job_t *head, *tail; /* submission order */
    size_t pending;
};

/* Validate a batch on the thread pool: each accepted event is packed
 * (ing_pack) into the batch's arena. */
static void work_cb(uv_work_t *w)
{
    job_t *j = w->data;
    ing_batch_t *b = j->b;
    ing_event_t *scratch = malloc(sizeof *scratch);
    /* Packed events (ing_pack) are about 120 bytes; the arena doubles when a
     * batch of larger ones needs it. */
    size_t cap = b->n * 192 + 4096, used = 0;
    j->arena = malloc(cap);
    if (!scratch || !j->arena) {
        /* Without memory nothing is validated: every result says so and the
         * loop thread refuses the batch (see daemon). */
        for (size_t i = 0; i < b->n; i++)
            b->res[i].reason = ING_R__COUNT;
        free(scratch);
        return;
    }
    /* The payloads' kept bytes, copied as they are validated, so that each
     * librdkafka message can be destroyed here instead of at the commit. */
    size_t pbytes = 0;
    for (size_t i = 0; i < b->n; i++)
        if (b->rk[i]->payload)
            pbytes += b->rk[i]->len < ING_PAYLOAD_KEEP ? b->rk[i]->len : ING_PAYLOAD_KEEP;
    b->payloads = malloc(pbytes ? pbytes : 1);
    /* Offsets first: the arena may move while it grows. */
    size_t *offs = b->payloads ? malloc((b->n ? b->n : 1) * sizeof *offs) : NULL;
    for (size_t i = 0, pused = 0; offs && i < b->n; i++) {
        rd_kafka_message_t *m = b->rk[i];
        const char *payload = m->payload ? (const char *)m->payload : "";
        size_t len = m->payload ? m->len : 0;
        ing_msg_t *c = &b->msgs[i];
        c->partition = m->partition;
        c->offset = m->offset;
        c->ts_ms = rd_kafka_message_timestamp(m, NULL);
        c->len = (uint32_t)(len < ING_PAYLOAD_KEEP ? len : ING_PAYLOAD_KEEP);
        c->payload = c->len ? b->payloads + pused : "";
        if (c->len)
            memcpy(b->payloads + pused, payload, c->len);
        pused += c->len;
        ing_parsed_t *r = &b->res[i];
        r->reason =
            ing_validate(payload, len, b->now_ms, &j->p->lim, scratch, r->detail, sizeof r->detail);
        rd_kafka_message_destroy(m);
        b->rk[i] = NULL;
        offs[i] = SIZE_MAX;
        if (r->reason != ING_OK)
            continue;
        size_t need = ing_pack_size(scratch);
        if (used + need > cap) {
            size_t nc = cap * 2 + need;
            char *na = realloc(j->arena, nc);
            if (!na) {
                r->reason = ING_R__COUNT;
                continue;
            }
            j->arena = na;
            cap = nc;
        }
        ing_pack(scratch, j->arena + used);
        offs[i] = used;
        used += need;
    }
    for (size_t i = 0; offs && i < b->n; i++)
        b->res[i].ev =
            offs[i] == SIZE_MAX ? NULL : (const ing_packed_t *)(void *)(j->arena + offs[i]);
    if (!offs)
        for (size_t i = 0; i < b->n; i++)
            b->res[i].reason = ING_R__COUNT;
    free(offs);
    free(scratch);
}

static void after_cb(uv_work_t *w, int status)
{
    job_t *j = w->data;
    ing_parser_t *p = j->p;
    (void)status;
    j->done = 1;
    /* Deliver from the head while the oldest batches are done: a batch
     * that finished early waits for its predecessors. */
    while (p->head && p->head->done) {
        job_t *h = p->head;
        p->head = h->next;
        if (!p->head)
            p->tail = NULL;
        p->pending--;
        ing_batch_t *b = h->b;
        /* The arena travels with the batch (it holds the events). */
        b->arena = h->arena;
        free(h);
        p->fn(p->ud, b);
    }
}

int ing_parser_new(uv_loop_t *loop, const ing_limits_t *lim, ing_parsed_fn fn, void *ud,
                   ing_parser_t **out)
{
    ing_parser_t *p = calloc(1, sizeof *p);
    if (!p)
        return ING_PARSER_ENOMEM;
    p->loop = loop;
    p->lim = *lim;
    p->fn = fn;
    p->ud = ud;
    *out = p;
    return 0;
}

int ing_parser_submit(ing_parser_t *p, rd_kafka_message_t **msgs, size_t n)
{
    job_t *j = calloc(1, sizeof *j);
    ing_batch_t *b = calloc(1, sizeof *b);
    rd_kafka_message_t **copy = b ? malloc((n ? n : 1) * sizeof *copy) : NULL;
    ing_msg_t *m = copy ? calloc(n ? n : 1, sizeof *m) : NULL;
    ing_parsed_t *res = m ? calloc(n ? n : 1, sizeof *res) : NULL;
    if (!j || !b || !copy || !m || !res) {
        free(j);
        free(b);
        free(copy);
        free(m);
        free(res);
        return ING_PARSER_ENOMEM;
    }
    memcpy(copy, msgs, n * sizeof *copy);
    b->rk = copy;
    b->msgs = m;
    b->res = res;
    b->n = n;
    b->now_ms = cm_now_ms();
    j->p = p;
    j->b = b;
    j->work.data = j;
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    p->pending++;
    int r = uv_queue_work(p->loop, &j->work, work_cb, after_cb);
    if (r) {
        /* The thread pool refused (never expected): validate inline. */
        work_cb(&j->work);
        after_cb(&j->work, 0);
    }
    return 0;
}

size_t ing_parser_pending(const ing_parser_t *p)
{
    return p->pending;
}

void ing_batch_free(ing_batch_t *b)
{
    if (!b)
        return;
    for (size_t i = 0; i < b->n; i++)
        if (b->rk[i])
            rd_kafka_message_destroy(b->rk[i]);
    free(b->arena);
    free(b->payloads);
    free(b->rk);
    free(b->msgs);
    free(b->res);
    free(b);
}

void ing_parser_free(ing_parser_t *p)
{
    free(p);
}
