/*
 * agg.h - exact incremental marts over the accepted events (CONTRACT §2, §3).
 *
 * The aggregator applies validated events to the state in LMDB: the
 * watermark and duplicate checks of §2, then sessions, users and funnel_daily
 * of §3. Every mart row is a sum of per-session or per-user contributions;
 * when an event changes a session, the session's old contribution is
 * retracted and its new one added, so the counters equal a recompute from
 * scratch whatever the arrival order (docs/aggregator.md explains why).
 *
 * All calls except agg_flush_collect and the agg_flush_* accessors are loop
 * thread only. agg_flush_collect may run on a worker thread concurrently with
 * a batch on the loop thread: it reads a committed LMDB snapshot only.
 */
#ifndef CLICKMART_AGGREGATOR_AGG_H
#define CLICKMART_AGGREGATOR_AGG_H

#include <stddef.h>
#include <stdint.h>

#include "ingest/validate.h"
#include "sink/sink.h"
#include "store/store.h"

#define AGG_MAX_PARTITIONS 4096

#define AGG_ENOMEM (-100)
#define AGG_ESTATE (-101)     /* a state record could not be decoded */
#define AGG_EPARTITION (-102) /* partition number out of range */
#define AGG_EINVAL (-103)     /* invalid argument */
/* Store errors (ST_E*) are passed through unchanged. */

typedef struct agg agg_t;

/* Settings of one experiment (the config file's [experiment.NAME] sections).
 * Unset fields fall back to the defaults in agg_conf_t. */
typedef struct agg_exp_conf {
    const char *name;
    const char *control; /* NULL: 'control' if it is a variant, else the smallest */
    int n_weights;       /* expected split; 0: equal across the variants */
    const char *const *weight_names;
    const double *weights;
    const char *exposure_event; /* NULL: agg_conf_t.exposure_event */
    int window_days;            /* 0: agg_conf_t.window_days */
} agg_exp_conf_t;

typedef struct agg_conf {
    const char *topic;
    int64_t session_gap_ms;
    int64_t allowed_lateness_ms;
    int64_t sweep_per_batch; /* state entries examined by the compactor per batch */
    /* Experiments (CONTRACT §5, §6). NULL/0 fields take the contract's defaults. */
    const agg_exp_conf_t *experiments;
    int n_experiments;
    const char *exposure_event; /* default "product_view" */
    int window_days;            /* default 7 */
    double confidence;          /* default 0.95 */
    double sequential_tuning;   /* N*, default 5000 */
    /* 1: batches commit into an open checkpoint transaction, which only
     * agg_checkpoint makes durable and visible to read transactions (see
     * there); 0: every batch commit is durable. Needs nested transactions,
     * so not with ST_SYNC_NONE. */
    int checkpoints;
} agg_conf_t;

/* Per-partition progress, as kept in the state. */
typedef struct agg_partition {
    int known;           /* 1 once the partition has consumed a message */
    int64_t next_offset; /* every message before it is applied */
    int64_t watermark;   /* largest accepted ts, -1 before the first */
    int64_t accepted, duplicates, rejected;
    int64_t rejects_by_reason[ING_R__COUNT];
} agg_partition_t;

/* Open the aggregator on an open store. The conf strings are copied. */
int agg_open(st_env_t *env, const agg_conf_t *conf, agg_t **out);
void agg_close(agg_t *a);

/* The state's progress for a partition (known == 0 when it has none). Valid
 * until the next batch. */
const agg_partition_t *agg_partition(const agg_t *a, int32_t partition);

/* Begin a batch: one LMDB write transaction for every message until commit. */
int agg_batch_begin(agg_t *a);

/*
 * Accept one validated event from (partition, offset): checks too_late and
 * duplicates (§2) in arrival order and records the partition's progress at
 * once; a too_late event is recorded as a reject (the message's payload is
 * needed only for that). The event's mart updates are queued (ev is copied,
 * the caller keeps ownership) and applied by agg_batch_drain or at commit,
 * sorted by user.
 */
int agg_apply_event(agg_t *a, int32_t partition, int64_t offset, const ing_event_t *ev,
                    const char *payload, size_t len, int64_t now_ms);

/* A hint, loop thread only: start loading the duplicate index's slot for
 * ev's id into the cache, so that agg_apply_packed for ev, called a few
 * events later, does not wait for memory. ev is only read during the call. */
void agg_prefetch_packed(const agg_t *a, const ing_packed_t *ev);

/* The same for an event already packed (ing_pack; the daemon's batches hold
 * this form): ev is copied as it is, the caller keeps ownership. */
int agg_apply_packed(agg_t *a, int32_t partition, int64_t offset, const ing_packed_t *ev,
                     const char *payload, size_t len, int64_t now_ms);

/*
 * Apply up to max_events (0: all) of the batch's queued mart updates: 0 when none is
 * left, 1 when some are, or an error (then abort the batch; ST_EMAPFULL as
 * for agg_batch_commit). Lets the caller cut a large batch's work into
 * slices; agg_batch_commit applies whatever is left.
 */
int agg_batch_drain(agg_t *a, size_t max_events);

/* A reject keeps the first this many bytes of its payload (§7); callers may
 * pass no more than that. */
#define AGG_REJECT_PAYLOAD_MAX 4096

/* Record a message that validation rejected (§1.1, §7). detail may be "". */
int agg_apply_reject(agg_t *a, int32_t partition, int64_t offset, ing_reason_t reason,
                     const char *detail, const char *payload, size_t len, int64_t now_ms);

/*
 * Commit the batch: partition progress, dirty marks and the compactor's work
 * go into the same transaction as the state changes. On ST_EMAPFULL the batch
 * is rolled back (nothing of it is applied): grow the map and apply the same
 * messages again.
 */
int agg_batch_commit(agg_t *a);
void agg_batch_abort(agg_t *a);

/*
 * With conf.checkpoints, a batch is a transaction nested in a checkpoint
 * transaction that stays open across batches: agg_batch_commit merges the
 * batch into it without any I/O (an abort still discards exactly the
 * batch), and this call commits it, durably, in one LMDB commit. A page
 * that many batches changed is then written once per checkpoint instead of
 * once per batch. Until then the batches are invisible to read
 * transactions (flush snapshots on the pool, agg_snapshot_json) and lost
 * by a crash, which then resumes from the checkpoint's offsets; collect
 * what Postgres commits only after a checkpoint that holds it (the daemon
 * checkpoints before every flush it commits). 1 when it committed, 0 when
 * nothing was open, or an error: then the checkpoint transaction is rolled back and the
 * in-memory state is ahead of the durable one, so the caller must stop
 * without collecting again (a restart resumes from the last checkpoint).
 * Loop thread, outside a batch.
 */
int agg_checkpoint(agg_t *a);

/* Batches committed into the open checkpoint transaction (0: none open). */
uint64_t agg_checkpoint_batches(const agg_t *a);

/* Rows waiting for a flush (dirty marks plus rejects), as of the last commit. */
uint64_t agg_pending_rows(const agg_t *a);

/* The in-memory duplicate index (docs/aggregator.md, "Horizon and
 * compaction"). */
typedef struct agg_dedup_index {
    uint64_t ids;         /* event ids it holds */
    uint64_t slots;       /* its table's slots (it doubles at half load) */
    uint64_t bytes;       /* the table's memory, and the next one's when allocated ahead */
    uint64_t grown;       /* doublings since start */
    uint64_t grown_ahead; /* of which into a table allocated ahead and faulted in off the loop
                             thread (cm_heap_prefault_range) */
} agg_dedup_index_t;

/* Fill *out. Loop thread only (the thread that applies batches). */
void agg_dedup_index(const agg_t *a, agg_dedup_index_t *out);

/* One flush: the rows of a committed snapshot, ready for snk_flush. */
typedef struct agg_flush agg_flush_t;

/*
 * Collect every dirty row of the latest committed state into *out (owned by
 * the caller; agg_flush_free). With `regression` set, the experiments'
 * logistic regressions are refitted too (they are dearer, so the daemon
 * asks for them at most every --stats-interval-ms and at shutdown). Any
 * thread; reads a snapshot only.
 */
int agg_flush_collect(agg_t *a, int regression, agg_flush_t **out);

/* Flags of agg_flush_collect_after. */
#define AGG_FLUSH_REGRESSION 1  /* refit the regressions (as `regression` above) */
#define AGG_FLUSH_PART 2        /* a part written ahead of the flush (below) */
#define AGG_FLUSH_USERS_LATER 4 /* with AGG_FLUSH_PART: leave the per-user rows (below) */
#define AGG_FLUSH_LOOP 8        /* read the open checkpoint transaction (below) */

/*
 * A flush in parts (docs/aggregator.md, "Writing ahead"). While a flush
 * interval runs, the daemon writes the rows changed so far into an open
 * Postgres transaction without committing it, so that the flush at the tick
 * has only the rest to write. Each call collects the rows of the latest
 * committed snapshot that the parts up to `prev` (NULL: none; the latest
 * part, which must stay alive until this call returns) did not write in
 * their current version: the rows marked since prev's snapshot and the
 * marks prev left dirty, and the rejects no part up to prev wrote. With
 * AGG_FLUSH_PART the result is another part: no partition progress, no
 * regression refit (the regression marks stay dirty with it, for the next
 * part or the final). Without it, the result is the final flush that
 * commits them all: complete it with agg_flush_done as usual (its snapshot
 * covers every part's). With AGG_FLUSH_USERS_LATER a part also leaves the
 * rows of users, user_exposure and user_outcomes dirty, for the final
 * flush: while intake catches up, a
 * user active all along changes again before the tick, and every part would
 * write the row again. A part is never passed to agg_flush_done. If the
 * transaction is lost, drop the parts and collect again with prev NULL. Any
 * thread, like agg_flush_collect. With AGG_FLUSH_LOOP and a checkpoint
 * transaction open, the rows are read from it instead of a snapshot, so the
 * result holds the batches not yet checkpointed: loop thread only, outside a
 * batch. Postgres may commit such rows only once a checkpoint holds them.
 * For a part that is the final flush's checkpoint, taken after it; for a
 * final flush collected this way, the caller checkpoints before it applies
 * another batch and gates Postgres' commit on that checkpoint (the daemon's
 * start_flush, snk_flush_gated).
 */
int agg_flush_collect_after(agg_t *a, int flags, const agg_flush_t *prev, agg_flush_t **out);
const snk_batch_t *agg_flush_batch(const agg_flush_t *f);
size_t agg_flush_rows(const agg_flush_t *f);

/*
 * After Postgres committed the batch: clear the dirty marks that were not
 * changed again since the snapshot, and the flushed rejects. Loop thread,
 * outside a batch.
 */
int agg_flush_done(agg_t *a, agg_flush_t *f);
void agg_flush_free(agg_flush_t *f);

/*
 * A JSON snapshot of the marts for the live page (from the latest committed
 * state, not from Postgres): {"funnel": the last `days` days of the
 * ('*','*') funnel_daily rows, "experiments": each experiment with its
 * control, users, SRM verdict and, per variant, users, conversion and the
 * comparison with the control (lift, fixed and sequential intervals)}.
 * *out is malloc'ed. Any thread.
 */
int agg_snapshot_json(agg_t *a, int days, char **out);

const char *agg_strerror(int err);

#endif
