/*
 * parser.h - validation off the loop thread, results delivered in order.
 *
 * Validation (JSON parsing above all) is a pure function of each message, so
 * batches are validated on libuv's thread pool while the loop thread applies
 * the previous batch to the state. Batches are delivered back to the loop
 * thread strictly in the order they were submitted, which keeps every
 * partition's messages in order. Loop thread only, except where noted.
 */
#ifndef CLICKMART_INGEST_PARSER_H
#define CLICKMART_INGEST_PARSER_H

#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "ingest/validate.h"

#define ING_PDETAIL_MAX 32

/* The outcome of validating one message. */
/* reason is ING_R__COUNT when the message could not be validated at all
 * (out of memory): such a batch must not be applied. */
typedef struct ing_parsed {
    ing_reason_t reason;
    char detail[ING_PDETAIL_MAX];
    const ing_packed_t *ev; /* valid when reason == ING_OK (ing_unpack reads it) */
} ing_parsed_t;

/* A validated batch. msgs and res are parallel arrays of n entries. */
typedef struct ing_batch {
    rd_kafka_message_t **msgs;
    ing_parsed_t *res;
    size_t n;
    int64_t now_ms; /* the wall clock the batch was validated against */
    void *arena;    /* private: holds the events the results point to */
} ing_batch_t;

typedef struct ing_parser ing_parser_t;

/* Called on the loop thread with each validated batch, in submission order.
 * The callee owns the batch (ing_batch_free releases it and its messages). */
typedef void (*ing_parsed_fn)(void *ud, ing_batch_t *b);

int ing_parser_new(uv_loop_t *loop, const ing_limits_t *lim, ing_parsed_fn fn, void *ud,
                   ing_parser_t **out);

/*
 * Validate msgs[0..n) off the loop thread. Takes ownership of the messages
 * (not of the array, which is copied). Returns 0 or ING_PARSER_ENOMEM, in
 * which case the messages are still the caller's.
 */
#define ING_PARSER_ENOMEM (-1)
int ing_parser_submit(ing_parser_t *p, rd_kafka_message_t **msgs, size_t n);

/* Batches submitted and not yet delivered. */
size_t ing_parser_pending(const ing_parser_t *p);

/* Free a delivered batch and destroy its messages. Any thread. */
void ing_batch_free(ing_batch_t *b);

/* Free the parser; only when ing_parser_pending() is 0. */
void ing_parser_free(ing_parser_t *p);

#endif
