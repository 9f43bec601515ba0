/*
 * store.c - LMDB environment wrapper. See store.h and docs/store.md.
 */
#include "store/store.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/util.h"

/* Bumped whenever the key layout or a record format changes incompatibly. */
#define ST_LAYOUT_VERSION 8

static const char *const db_names[ST_DB__COUNT] = {
    "meta",  "dedup",  "sessions", "users",   "ustage", "funnel", "dirty", "rejects", "product",
    "pairs", "basket", "cohort",   "xevents", "xuser",  "xvar",   "xcell", "xexp",
};

struct st_env {
    int lock_fd;
    MDB_env *env;
    MDB_dbi dbi[ST_DB__COUNT];
    size_t map_size;
    /* Fault injection for tests (ST_FAULT_TXN_FULL_ENV): puts a nested
     * transaction may add to its outermost one before they fail as
     * ST_ETXNFULL (0: off), and the puts made since that one began. */
    uint64_t fault_puts;
    uint64_t puts;
    /* ST_FAULT_CHECKPOINT_ENV: the checkpoint that fails (0: off), the
     * checkpoints committed so far, and the children committed into the
     * open outermost write transaction. */
    uint64_t fault_ckpt;
    uint64_t ckpts;
    uint64_t kids;
};

/*
 * A transaction. A write transaction keeps one cursor per database for the
 * point lookups and updates: LMDB's cursor search first checks whether the
 * key lies on the leaf page the cursor is already on and descends from the
 * root only when it does not, so updates that arrive in key order (the
 * aggregator applies each batch sorted by user) skip most of the descents.
 * Read transactions use plain lookups: they may run on another thread and
 * are mostly scans.
 */
struct st_txn {
    MDB_txn *t;
    int rw;
    int nested;
    st_env_t *env;
    uint64_t puts_at_begin; /* env->puts when it began: restored on abort */
    MDB_cursor *cur[ST_DB__COUNT];
};

/*
 * The key order of every database: bytes compared as unsigned, then the
 * shorter key first. That is exactly LMDB's default order (mdb_cmp_memn),
 * so a database stays readable by anything that opens it without this
 * function (mdb_dump, mdb_stat). It is faster because the default calls
 * memcmp for keys that are mostly 8 to 24 bytes: a callgrind profile of a
 * 200 000-event run counted 39 instructions per comparison, 4.3 million
 * comparisons, 6.6 % of the loop thread. Eight bytes are compared at a
 * time as big-endian words (the first differing byte decides either way).
 */
static int key_cmp(const MDB_val *a, const MDB_val *b)
{
    const unsigned char *p = a->mv_data, *q = b->mv_data;
    size_t n = a->mv_size < b->mv_size ? a->mv_size : b->mv_size;
    for (; n >= 8; n -= 8, p += 8, q += 8) {
        uint64_t x, y;
        memcpy(&x, p, 8);
        memcpy(&y, q, 8);
        if (x != y) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            x = __builtin_bswap64(x);
            y = __builtin_bswap64(y);
#endif
            return x < y ? -1 : 1;
        }
    }
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return a->mv_size < b->mv_size ? -1 : a->mv_size > b->mv_size;
}

/* Translate an LMDB return code into the store's codes at the boundary. */
static int xlate(int rc)
{
    switch (rc) {
    case MDB_SUCCESS:
        return 0;
    case MDB_NOTFOUND:
        return ST_ENOTFOUND;
    case MDB_MAP_FULL:
        return ST_EMAPFULL;
    case MDB_TXN_FULL:
        return ST_ETXNFULL;
    case ENOMEM:
        return ST_ENOMEM;
    case EINVAL:
        return ST_EINVAL;
    case EAGAIN:
    case EBUSY:
        return ST_EBUSY;
    default:
        cm_err("lmdb error", "code=%d error=\"%s\"", rc, mdb_strerror(rc));
        return ST_EIO;
    }
}

int st_open(const char *dir, size_t map_size, enum st_sync sync, st_env_t **out)
{
    if (mkdir(dir, 0750) != 0 && errno != EEXIST) {
        cm_err("cannot create state dir", "dir=%s error=\"%s\"", dir, strerror(errno));
        return ST_EIO;
    }
    st_env_t *e = calloc(1, sizeof *e);
    if (!e)
        return ST_ENOMEM;
    /* LMDB's limit of dirty pages (about 131 000, 512 MiB) is far beyond a
     * test's state, so the tests reach the daemon's ST_ETXNFULL path this
     * way (tests/integration/test_group_commit.sh). */
    const char *fault = getenv(ST_FAULT_TXN_FULL_ENV);
    if (fault && *fault) {
        e->fault_puts = strtoull(fault, NULL, 10);
        cm_warn("fault injection: puts in nested transactions fail as transaction full",
                "env=%s puts=%llu", ST_FAULT_TXN_FULL_ENV, (unsigned long long)e->fault_puts);
    }
    const char *fck = getenv(ST_FAULT_CHECKPOINT_ENV);
    if (fck && *fck) {
        e->fault_ckpt = strtoull(fck, NULL, 10);
        cm_warn("fault injection: a checkpoint's commit fails", "env=%s checkpoint=%llu",
                ST_FAULT_CHECKPOINT_ENV, (unsigned long long)e->fault_ckpt);
    }
    /* LMDB itself allows several processes on one environment; two daemons
     * applying the same partitions would double-count, so a lock file makes
     * the state directory exclusive to one process. */
    char lock_path[4096];
    snprintf(lock_path, sizeof lock_path, "%s/clickmartd.lock", dir);
    e->lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (e->lock_fd < 0 || flock(e->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        cm_err("state directory is in use by another process", "dir=%s error=\"%s\"", dir,
               strerror(errno));
        if (e->lock_fd >= 0)
            close(e->lock_fd);
        free(e);
        return ST_EBUSY;
    }
    int rc = mdb_env_create(&e->env);
    if (rc)
        goto fail;
    mdb_env_set_maxdbs(e->env, ST_DB__COUNT + 4);
    mdb_env_set_mapsize(e->env, map_size);
    mdb_env_set_maxreaders(e->env, 64);
    /* Without fsync there is no reason to keep LMDB's malloc'ed copies of
     * dirty pages and their pwrite at commit: MDB_WRITEMAP writes them in
     * place (about twice as fast here). Copy-on-write still protects the last
     * committed snapshot, so a killed process loses nothing; an OS crash may
     * (MDB_NOSYNC's documented risk). With fsync, WRITEMAP would msync the
     * whole map at every commit, which is slower, so it stays off. */
    /* MDB_NORDAHEAD: the accesses are random, and with MDB_WRITEMAP every
     * fault on a page the file has not written yet read ahead (zero-filled)
     * a whole window of them: 9 % of the loop thread in a profile. */
    unsigned flags = MDB_NOTLS | MDB_NORDAHEAD | (sync == ST_SYNC_NONE ? MDB_WRITEMAP : 0);
    if (sync == ST_SYNC_META)
        flags |= MDB_NOMETASYNC;
    else if (sync == ST_SYNC_NONE)
        flags |= MDB_NOSYNC;
    rc = mdb_env_open(e->env, dir, flags, 0640);
    if (rc) {
        cm_err("cannot open state", "dir=%s error=\"%s\"", dir, mdb_strerror(rc));
        goto fail;
    }
    MDB_envinfo info;
    mdb_env_info(e->env, &info);
    e->map_size = info.me_mapsize;

    MDB_txn *txn;
    rc = mdb_txn_begin(e->env, NULL, 0, &txn);
    if (rc)
        goto fail;
    for (int i = 0; i < ST_DB__COUNT; i++) {
        rc = mdb_dbi_open(txn, db_names[i], MDB_CREATE, &e->dbi[i]);
        if (rc == 0)
            rc = mdb_set_compare(txn, e->dbi[i], key_cmp);
        if (rc) {
            mdb_txn_abort(txn);
            goto fail;
        }
    }
    /* The layout version guards against reading state written by an
     * incompatible build: such state is refused, never misread. */
    MDB_val k = {7, "version"}, v;
    rc = mdb_get(txn, e->dbi[ST_DB_META], &k, &v);
    if (rc == MDB_NOTFOUND) {
        uint32_t ver = ST_LAYOUT_VERSION;
        MDB_val nv = {sizeof ver, &ver};
        rc = mdb_put(txn, e->dbi[ST_DB_META], &k, &nv, 0);
    } else if (rc == 0) {
        uint32_t ver = 0;
        if (v.mv_size == sizeof ver)
            memcpy(&ver, v.mv_data, sizeof ver);
        if (ver != ST_LAYOUT_VERSION) {
            cm_err("state layout version mismatch", "dir=%s found=%u expected=%u", dir, ver,
                   ST_LAYOUT_VERSION);
            mdb_txn_abort(txn);
            mdb_env_close(e->env);
            close(e->lock_fd);
            free(e);
            return ST_EVERSION;
        }
    }
    if (rc) {
        mdb_txn_abort(txn);
        goto fail;
    }
    rc = mdb_txn_commit(txn);
    if (rc)
        goto fail;
    *out = e;
    return 0;
fail:
    if (e->env)
        mdb_env_close(e->env);
    close(e->lock_fd);
    free(e);
    return xlate(rc);
}

void st_close(st_env_t *e)
{
    if (!e)
        return;
    mdb_env_close(e->env);
    close(e->lock_fd);
    free(e);
}

/* st_begin and st_begin_nested: a transaction, a child of parent (NULL: none). */
static int txn_begin(st_env_t *e, MDB_txn *parent, int rdonly, st_txn_t **txn)
{
    st_txn_t *x = calloc(1, sizeof *x);
    if (!x)
        return ST_ENOMEM;
    int rc = mdb_txn_begin(e->env, parent, rdonly ? MDB_RDONLY : 0, &x->t);
    if (rc) {
        free(x);
        return xlate(rc);
    }
    x->rw = !rdonly;
    x->nested = parent != NULL;
    x->env = e;
    if (x->rw && !parent)
        e->puts = e->kids = 0;
    x->puts_at_begin = e->puts;
    *txn = x;
    return 0;
}

int st_begin(st_env_t *e, int rdonly, st_txn_t **txn)
{
    return txn_begin(e, NULL, rdonly, txn);
}

int st_begin_nested(st_env_t *e, st_txn_t *parent, st_txn_t **txn)
{
    unsigned flags = 0;
    /* LMDB refuses a child of a MDB_WRITEMAP transaction as a bad one. */
    if (!parent || !parent->rw || mdb_env_get_flags(e->env, &flags) != 0 || (flags & MDB_WRITEMAP))
        return ST_EINVAL;
    return txn_begin(e, parent->t, 0, txn);
}

/* A write transaction's cursors end with it (LMDB closes them). */
int st_commit(st_txn_t *txn)
{
    st_env_t *e = txn->env;
    if (txn->nested) {
        e->kids++;
    } else if (txn->rw && e->fault_ckpt && e->kids && ++e->ckpts == e->fault_ckpt) {
        mdb_txn_abort(txn->t);
        free(txn);
        return ST_EIO;
    }
    int rc = mdb_txn_commit(txn->t);
    free(txn);
    return xlate(rc);
}

void st_abort(st_txn_t *txn)
{
    if (!txn)
        return;
    /* An aborted child's pages leave its parent as they were. */
    if (txn->nested)
        txn->env->puts = txn->puts_at_begin;
    mdb_txn_abort(txn->t);
    free(txn);
}

/* The write transaction's cursor on db, opened on first use; NULL for a
 * read transaction or without memory (then a plain call is used). */
static MDB_cursor *wcur(st_txn_t *txn, st_env_t *e, enum st_db db)
{
    if (!txn->rw)
        return NULL;
    if (!txn->cur[db] && mdb_cursor_open(txn->t, e->dbi[db], &txn->cur[db]) != 0)
        txn->cur[db] = NULL;
    return txn->cur[db];
}

int st_get(st_txn_t *txn, st_env_t *e, enum st_db db, const void *k, size_t kn, st_val_t *v)
{
    MDB_val mk = {kn, (void *)k}, mv;
    MDB_cursor *c = wcur(txn, e, db);
    int rc = c ? mdb_cursor_get(c, &mk, &mv, MDB_SET) : mdb_get(txn->t, e->dbi[db], &mk, &mv);
    if (rc == 0) {
        v->p = mv.mv_data;
        v->n = mv.mv_size;
    }
    return xlate(rc);
}

int st_put(st_txn_t *txn, st_env_t *e, enum st_db db, const void *k, size_t kn, const void *v,
           size_t vn)
{
    MDB_val mk = {kn, (void *)k}, mv = {vn, (void *)v};
    if (e->fault_puts && txn->nested && e->puts++ >= e->fault_puts)
        return ST_ETXNFULL;
    MDB_cursor *c = wcur(txn, e, db);
    return xlate(c ? mdb_cursor_put(c, &mk, &mv, 0) : mdb_put(txn->t, e->dbi[db], &mk, &mv, 0));
}

int st_del(st_txn_t *txn, st_env_t *e, enum st_db db, const void *k, size_t kn)
{
    MDB_val mk = {kn, (void *)k}, mv;
    MDB_cursor *c = wcur(txn, e, db);
    if (!c)
        return xlate(mdb_del(txn->t, e->dbi[db], &mk, NULL));
    int rc = mdb_cursor_get(c, &mk, &mv, MDB_SET);
    return xlate(rc ? rc : mdb_cursor_del(c, 0));
}

int st_cur_open(st_txn_t *txn, st_env_t *e, enum st_db db, st_cursor_t *cur)
{
    return xlate(mdb_cursor_open(txn->t, e->dbi[db], &cur->c));
}

static int cur_get(st_cursor_t *cur, MDB_val *mk, MDB_cursor_op op, st_val_t *key, st_val_t *val)
{
    MDB_val mv;
    int rc = mdb_cursor_get(cur->c, mk, &mv, op);
    if (rc == 0) {
        if (key) {
            key->p = mk->mv_data;
            key->n = mk->mv_size;
        }
        if (val) {
            val->p = mv.mv_data;
            val->n = mv.mv_size;
        }
    }
    return xlate(rc);
}

int st_cur_seek(st_cursor_t *cur, const void *k, size_t kn, st_val_t *key, st_val_t *val)
{
    MDB_val mk = {kn, (void *)k};
    return cur_get(cur, &mk, MDB_SET_RANGE, key, val);
}

int st_seek(st_txn_t *txn, st_env_t *e, enum st_db db, const void *k, size_t kn, st_val_t *key,
            st_val_t *val)
{
    st_cursor_t cur = {wcur(txn, e, db)};
    int own = cur.c == NULL;
    if (own) {
        int rc = mdb_cursor_open(txn->t, e->dbi[db], &cur.c);
        if (rc)
            return xlate(rc);
    }
    int r = st_cur_seek(&cur, k, kn, key, val);
    if (own)
        mdb_cursor_close(cur.c);
    return r;
}

int st_cur_next(st_cursor_t *cur, st_val_t *key, st_val_t *val)
{
    MDB_val mk = {0, NULL};
    return cur_get(cur, &mk, MDB_NEXT, key, val);
}

int st_cur_prev(st_cursor_t *cur, st_val_t *key, st_val_t *val)
{
    MDB_val mk = {0, NULL};
    return cur_get(cur, &mk, MDB_PREV, key, val);
}

int st_cur_last(st_cursor_t *cur, st_val_t *key, st_val_t *val)
{
    MDB_val mk = {0, NULL};
    return cur_get(cur, &mk, MDB_LAST, key, val);
}

int st_cur_del(st_cursor_t *cur)
{
    return xlate(mdb_cursor_del(cur->c, 0));
}

void st_cur_close(st_cursor_t *cur)
{
    if (cur->c)
        mdb_cursor_close(cur->c);
    cur->c = NULL;
}

int st_count(st_txn_t *txn, st_env_t *e, enum st_db db, uint64_t *n)
{
    MDB_stat s;
    int rc = mdb_stat(txn->t, e->dbi[db], &s);
    if (rc == 0)
        *n = s.ms_entries;
    return xlate(rc);
}

int st_grow(st_env_t *e)
{
    size_t next = e->map_size * 2;
    int rc = mdb_env_set_mapsize(e->env, next);
    if (rc)
        return xlate(rc);
    MDB_envinfo info;
    mdb_env_info(e->env, &info);
    e->map_size = info.me_mapsize;
    cm_warn("state map grown", "map_size=%zu", e->map_size);
    return 0;
}

void st_usage(st_env_t *e, uint64_t *used, uint64_t *map_size)
{
    MDB_envinfo info;
    MDB_stat st;
    mdb_env_info(e->env, &info);
    mdb_env_stat(e->env, &st);
    *used = (uint64_t)(info.me_last_pgno + 1) * st.ms_psize;
    *map_size = info.me_mapsize;
}

const char *st_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case ST_ENOTFOUND:
        return "not found";
    case ST_EMAPFULL:
        return "state map is full";
    case ST_EIO:
        return "state I/O error";
    case ST_ENOMEM:
        return "out of memory";
    case ST_EINVAL:
        return "invalid argument";
    case ST_EVERSION:
        return "state written by an incompatible version";
    case ST_EBUSY:
        return "state directory busy";
    case ST_ETXNFULL:
        return "state transaction too large (LMDB's dirty pages)";
    default:
        return "unknown store error";
    }
}
