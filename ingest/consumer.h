/*
 * consumer.h - the Kafka consumer, integrated into the libuv loop.
 *
 * librdkafka signals new messages by writing to a non-blocking pipe
 * (rd_kafka_queue_io_event_enable); a uv_poll watches the pipe and the
 * consumer drains the queue until it is empty. A backstop timer drains it
 * too, so nothing waits on a lost wake-up and errors are seen while every
 * partition is paused.
 *
 * The daemon assigns itself every partition of its topic (rd_kafka_assign)
 * and resumes each from the offset kept in LMDB, else from the group's
 * committed offset, else from the earliest one.
 *
 * Loop thread only, except where noted.
 */
#ifndef CLICKMART_INGEST_CONSUMER_H
#define CLICKMART_INGEST_CONSUMER_H

#include <librdkafka/rdkafka.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define ING_ECONF (-1)    /* a librdkafka property was refused */
#define ING_EKAFKA (-2)   /* librdkafka could not be created or refused a call */
#define ING_ENOTOPIC (-3) /* the topic does not exist (or has no partitions) */
#define ING_ETIMEOUT (-4) /* the cluster did not answer in time */
#define ING_ENOMEM (-5)
#define ING_ESYS (-6)

typedef struct ing_consumer ing_consumer_t;

/*
 * Delivers a batch of messages (never error events) in partition order. The
 * callee takes ownership of every message and must rd_kafka_message_destroy
 * each one, now or later.
 */
typedef void (*ing_msgs_fn)(void *ud, rd_kafka_message_t **msgs, size_t n);

/* Returns the next offset kept in the state for a partition, -1 when the
 * state has none (the group's offset, else the earliest, is used), or
 * ING_OFFSET_EARLIEST to start from the earliest offset regardless. */
#define ING_OFFSET_EARLIEST (-2)
typedef int64_t (*ing_offset_fn)(void *ud, int32_t partition);

typedef struct ing_consumer_conf {
    const char *brokers;
    const char *topic;
    const char *group;
    int n_props; /* librdkafka properties, applied last (they win) */
    char *const *prop_names;
    char *const *prop_values;
    size_t batch_size;    /* most messages per delivered batch */
    int close_timeout_ms; /* longest wait for librdkafka's teardown at close */
} ing_consumer_conf_t;

/* Create the consumer and hook it into the loop; no partition is assigned
 * yet. The message for a failure is written into err. */
int ing_consumer_open(uv_loop_t *loop, const ing_consumer_conf_t *conf, ing_msgs_fn on_msgs,
                      ing_offset_fn offset_of, void *ud, ing_consumer_t **out, char *err,
                      size_t errcap);

/*
 * Look the topic up and read the group's committed offsets (kept for
 * ing_consumer_assign). Blocks for at most timeout_ms per step (startup
 * only). *n_partitions receives the partition count. When ends and lows are
 * not NULL, every partition's high and low watermark is asked for too
 * (before any fetch competes with the queries) into malloc'ed arrays of
 * *n_partitions entries. Loop thread, before the loop runs.
 */
int ing_consumer_prepare(ing_consumer_t *c, int timeout_ms, int32_t *n_partitions, int64_t **ends,
                         int64_t **lows);

/* After ing_consumer_prepare: how many partitions the group has a
 * committed offset for. */
int ing_consumer_group_offsets(const ing_consumer_t *c);

/*
 * Assign every partition from its resume offset: the offset_of callback's
 * (called here, once per partition), else the group's committed offset,
 * else the earliest. Fetching starts. After ing_consumer_prepare; loop
 * thread, before the loop runs.
 */
int ing_consumer_assign(ing_consumer_t *c);

/* The offset a partition was assigned from (its state, the group's
 * committed offset) or -1 when it starts from the earliest offset. */
int64_t ing_consumer_start_offset(const ing_consumer_t *c, int32_t partition);

/* Last high watermark seen in fetch responses (non-blocking); -1 if unknown. */
int64_t ing_consumer_cached_end(ing_consumer_t *c, int32_t partition);

/* Pause or resume fetching of every assigned partition. Already fetched,
 * undelivered messages are discarded by librdkafka and fetched again on
 * resume, so nothing is skipped. */
void ing_consumer_pause(ing_consumer_t *c, int paused);
int ing_consumer_paused(const ing_consumer_t *c);

/* Hold (1) or release (0) delivery without pausing the partitions: while
 * held, fetched messages wait in librdkafka's queue (bounded by its
 * queued.max.messages.kbytes), e.g. while earlier batches are still being
 * validated. Releasing resumes the drain on the next loop iteration. */
void ing_consumer_hold(ing_consumer_t *c, int hold);

/* Stop delivering messages (shutdown); the backstop keeps serving events. */
void ing_consumer_stop(ing_consumer_t *c);

/* 0 from "all brokers down" until a probe of the cluster (a metadata request
 * every 3 s while down) is answered, 1 otherwise. Any thread. */
int ing_consumer_broker_up(const ing_consumer_t *c);

/* Commit offsets to the group (asynchronous, for monitoring tools). */
void ing_consumer_commit(ing_consumer_t *c, const int64_t *next_offsets, int32_t n);

/*
 * Close the consumer and its handles; *c is freed once libuv closed them.
 * Loop thread only; blocks for at most the conf's close_timeout_ms while
 * librdkafka tears down (it waits for outstanding requests such as the
 * advisory offset commits). When that takes longer, e.g. because its group
 * coordinator connection hangs after an outage, the teardown is left to a
 * detached thread and the process does not wait for it: the state already
 * holds the offsets.
 */
void ing_consumer_close(ing_consumer_t *c);

const char *ing_consumer_strerror(int err);

#endif
