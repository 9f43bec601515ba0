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

/* Bytes of a payload a batch keeps: the rejects table holds the first 4096
 * bytes of a rejected message's payload (CONTRACT §7), and an accepted
 * event may still turn out too late when it is applied. */
#define ING_PAYLOAD_KEEP 4096

/* One consumed message as a validated batch holds it: librdkafka's message is
 * destroyed once the batch is validated (its op and its share of the
 * decompressed message set took about 330 bytes, held until the commit). */
typedef struct ing_msg {
    const char *payload; /* the first len bytes; valid until ing_batch_free */
    int64_t offset;
    int64_t ts_ms; /* the message's timestamp, -1 when it has none */
    uint32_t len;  /* at most ING_PAYLOAD_KEEP */
    int32_t partition;
} ing_msg_t;

/* A validated batch. msgs and res are parallel arrays of n entries. */
typedef struct ing_batch {
    ing_msg_t *msgs;
    ing_parsed_t *res;
    size_t n;
    int64_t now_ms;          /* the wall clock the batch was validated against */
    void *arena;             /* private: holds the events the results point to */
    char *payloads;          /* private: holds the payloads msgs point to */
    rd_kafka_message_t **rk; /* private: librdkafka's messages not yet destroyed */
} ing_batch_t;

typedef struct ing_parser ing_parser_t;

/* Called on the loop thread with each validated batch, in submission order.
 * The callee owns the batch (ing_batch_free releases it). Its msgs hold
 * copies: librdkafka's messages were destroyed on the thread pool, unless
 * validation ran out of memory (every reason ING_R__COUNT), in which case
 * ing_batch_free destroys them. */
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

/* Free a delivered batch (and the messages it still holds). Any thread. */
void ing_batch_free(ing_batch_t *b);

/* Free the parser; only when ing_parser_pending() is 0. */
void ing_parser_free(ing_parser_t *p);

#endif
