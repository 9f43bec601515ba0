/*
 * store.h - the LMDB environment that holds all of the daemon's state.
 *
 * One environment, several named databases (see docs/store.md for the key
 * layout). The store translates LMDB's return codes into its own negative
 * error codes at this boundary; callers never see an MDB_* code.
 *
 * Threading: the environment is opened with MDB_NOTLS, so a read-only
 * transaction may be used by a thread other than the one that began it (the
 * flush worker does this). A write transaction belongs to the loop thread.
 */
#ifndef CLICKMART_STORE_H
#define CLICKMART_STORE_H

#include <lmdb.h>
#include <stddef.h>
#include <stdint.h>

#define ST_ENOTFOUND (-1) /* no such key (not a failure) */
#define ST_EMAPFULL (-2)  /* the map is full: abort, st_grow, retry */
#define ST_EIO (-3)       /* an I/O or corruption error from LMDB */
#define ST_ENOMEM (-4)
#define ST_EINVAL (-5)
#define ST_EVERSION (-6) /* the state was written by an incompatible layout */
#define ST_EBUSY (-7)    /* another process holds the state directory */
#define ST_ETXNFULL (-8) /* the transaction holds too many dirty pages: abort, commit less */

/* Fault injection for tests: with this environment variable set to N when
 * st_open runs, a put in a nested transaction fails with ST_ETXNFULL once the
 * outermost transaction holds N puts of its children (an aborted child's puts
 * do not count), as LMDB fails one that holds too many dirty pages. Logged
 * as a warning at open; never set it in production. */
#define ST_FAULT_TXN_FULL_ENV "CLICKMART_FAULT_TXN_FULL_PUTS"

/* Fault injection for tests: with this environment variable set to N when
 * st_open runs, the Nth commit of an outermost write transaction that holds
 * committed children (a checkpoint: agg_checkpoint) is rolled back and fails
 * with ST_EIO, as a failed write or fdatasync would. Logged as a warning at
 * open; never set it in production. */
#define ST_FAULT_CHECKPOINT_ENV "CLICKMART_FAULT_CHECKPOINT_FAIL"

enum st_db {
    ST_DB_META = 0, /* partition metadata, sequence, layout version */
    ST_DB_DEDUP,    /* (batch seq, chunk) -> the batch's new ids: ts, XXH3-128, partition */
    ST_DB_SESSIONS, /* (user, start ts) -> live session summary */
    ST_DB_USERS,    /* user -> lifetime summary */
    ST_DB_USTAGE,   /* (user, day) -> per (device, country): sessions per funnel stage */
    ST_DB_FUNNEL,   /* (day, device, country) -> funnel_daily counters */
    ST_DB_DIRTY,    /* (batch seq, chunk) -> the marks (tag, row key) of rows it changed */
    ST_DB_REJECTS,  /* (partition, offset) -> rejected message awaiting flush */
    ST_DB_PRODUCT,  /* (day, product_id) -> product_daily counters */
    ST_DB_PAIRS,    /* (product_a, product_b) -> orders holding both */
    ST_DB_BASKET,   /* day -> orders with items, units, revenue */
    ST_DB_COHORT,   /* (cohort week, week offset) -> users */
    ST_DB_XEVENTS,  /* (day, user, batch, n) -> a batch's events of one user and day */
    ST_DB_XUSER,    /* (user, experiment) -> assignment, exposure and window outcome */
    ST_DB_XVAR,     /* (experiment, variant) -> sufficient statistics */
    ST_DB_XCELL,    /* (experiment, variant, events) -> users, converters (regression) */
    ST_DB_XEXP,     /* experiment -> exposed users excluded for several variants */
    ST_DB__COUNT
};

typedef struct st_env st_env_t;
typedef struct st_txn st_txn_t;

typedef struct st_val {
    const void *p;
    size_t n;
} st_val_t;

typedef struct st_cursor {
    MDB_cursor *c;
} st_cursor_t;

enum st_sync { ST_SYNC_FULL = 0, ST_SYNC_META, ST_SYNC_NONE };

/*
 * Open (creating if needed) the state under `dir` with an initial map of
 * `map_size` bytes. Refuses a state directory already open in another
 * process (ST_EBUSY). On success *out is owned by the caller (st_close).
 */
int st_open(const char *dir, size_t map_size, enum st_sync sync, st_env_t **out);
void st_close(st_env_t *env);

/* Begin a transaction; read-only ones may be handed to another thread. */
int st_begin(st_env_t *env, int rdonly, st_txn_t **txn);

/*
 * Begin a write transaction nested in `parent`, an open write transaction of
 * the same environment (loop thread only). Its commit merges its changes
 * into the parent without any I/O; its abort discards only its own changes.
 * Until it ends, the parent may only be committed or aborted by LMDB's rules,
 * so callers leave it alone. Not with ST_SYNC_NONE (MDB_WRITEMAP has no
 * nested transactions: ST_EINVAL). Read transactions never see the child's
 * or the parent's changes before the parent commits.
 */
int st_begin_nested(st_env_t *env, st_txn_t *parent, st_txn_t **txn);
int st_commit(st_txn_t *txn);
void st_abort(st_txn_t *txn);

/*
 * Point lookups and updates. Values returned by st_get and the cursor calls
 * point into the map and are valid until the transaction ends or the next
 * update in it; copy what must outlive that.
 */
int st_get(st_txn_t *txn, st_env_t *env, enum st_db db, const void *k, size_t kn, st_val_t *v);
int st_put(st_txn_t *txn, st_env_t *env, enum st_db db, const void *k, size_t kn, const void *v,
           size_t vn);
int st_del(st_txn_t *txn, st_env_t *env, enum st_db db, const void *k, size_t kn);

/*
 * The first key >= k and its value (0, ST_ENOTFOUND or an error), through the
 * write transaction's own cursor on db, like st_get: seeks in key order then
 * mostly stay on the cursor's leaf page. A read transaction gets a cursor for
 * the call. key and val are valid as st_get's value is.
 */
int st_seek(st_txn_t *txn, st_env_t *env, enum st_db db, const void *k, size_t kn, st_val_t *key,
            st_val_t *val);

/* Cursors. seek: first key >= k. Each returns 0, ST_ENOTFOUND or an error. */
int st_cur_open(st_txn_t *txn, st_env_t *env, enum st_db db, st_cursor_t *cur);
int st_cur_seek(st_cursor_t *cur, const void *k, size_t kn, st_val_t *key, st_val_t *val);
int st_cur_next(st_cursor_t *cur, st_val_t *key, st_val_t *val);
int st_cur_prev(st_cursor_t *cur, st_val_t *key, st_val_t *val);
int st_cur_last(st_cursor_t *cur, st_val_t *key, st_val_t *val);
int st_cur_del(st_cursor_t *cur);
void st_cur_close(st_cursor_t *cur);

/* Number of entries in a database as seen by txn. */
int st_count(st_txn_t *txn, st_env_t *env, enum st_db db, uint64_t *n);

/*
 * Double the map size. Only when no transaction of this process is open
 * (LMDB's rule for mdb_env_set_mapsize). Loop thread only.
 */
int st_grow(st_env_t *env);

/* Bytes in use (last page number times page size) and the map size. */
void st_usage(st_env_t *env, uint64_t *used, uint64_t *map_size);

const char *st_strerror(int err);

#endif
