/*
 * test_store.c - the LMDB wrapper (store/store.c): the key order every database uses,
 * which must be LMDB's default order exactly (the store sets its own, faster comparison
 * function), so that lookups, cursor walks and any tool that opens the state without
 * that function (mdb_dump, mdb_stat) agree; and the refusal of a second open.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unit_cmocka.h"
#include <lmdb.h>

#include "store/store.h"
#include "unit_rng.h"

#define NKEYS 4000
#define KEYMAX 40

typedef struct key {
    size_t n;
    uint8_t b[KEYMAX];
} tkey_t;

static uint64_t rng = 88172645463325252ULL;
static uint64_t rnd(void)
{
    return ut_xorshift(&rng);
}

/* LMDB's documented default: bytes as unsigned, then the shorter key first. */
static int ref_cmp(const void *x, const void *y)
{
    const tkey_t *a = x, *b = y;
    size_t m = a->n < b->n ? a->n : b->n;
    int c = memcmp(a->b, b->b, m);
    if (c)
        return c;
    return a->n < b->n ? -1 : a->n > b->n;
}

/*
 * Keys built to hit every branch of a word-at-a-time comparison: long shared
 * prefixes (the first difference in any byte of the first, second or a later
 * word), bytes 0x00, 0x7f, 0x80 and 0xff (a signed comparison orders them
 * wrongly), keys that are prefixes of others, and lengths around 8 and 16.
 * Distinct keys only (the database keeps one of equal keys).
 */
static size_t make_keys(tkey_t *k, size_t want)
{
    static const uint8_t alpha[] = {0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, 'a', 'u', '0'};
    size_t n = 0;
    while (n < want) {
        tkey_t *e = &k[n];
        if (n > 0 && rnd() % 3 != 0) {
            /* A neighbour of an earlier key: the same prefix, then a change. */
            const tkey_t *o = &k[rnd() % n];
            *e = *o;
            size_t at = o->n ? (size_t)(rnd() % o->n) : 0;
            switch (rnd() % 3) {
            case 0: /* one byte changed */
                e->b[at] = alpha[rnd() % sizeof alpha];
                break;
            case 1: /* cut: a proper prefix */
                e->n = at ? at : 1;
                break;
            default: /* extended */
                while (e->n < KEYMAX && rnd() % 4 != 0)
                    e->b[e->n++] = alpha[rnd() % sizeof alpha];
                break;
            }
        } else {
            e->n = 1 + (size_t)(rnd() % KEYMAX);
            for (size_t i = 0; i < e->n; i++)
                e->b[i] = alpha[rnd() % sizeof alpha];
        }
        int dup = 0;
        for (size_t i = 0; i < n && !dup; i++)
            dup = ref_cmp(&k[i], e) == 0;
        if (!dup)
            n++;
    }
    return n;
}

static void rm_rf(const char *dir)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

static void test_key_order_is_lmdb_default(void **state)
{
    (void)state;
    tkey_t *keys = calloc(NKEYS, sizeof *keys);
    assert_non_null(keys);
    size_t n = make_keys(keys, NKEYS);
    assert_true(n > 1);
    char dir[] = "/tmp/test_store_XXXXXX";
    assert_non_null(mkdtemp(dir));
    st_env_t *env;
    assert_int_equal(st_open(dir, 64 << 20, ST_SYNC_NONE, &env), 0);
    st_txn_t *txn;
    assert_int_equal(st_begin(env, 0, &txn), 0);
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)i;
        assert_int_equal(st_put(txn, env, ST_DB_SESSIONS, keys[i].b, keys[i].n, &v, sizeof v), 0);
    }
    assert_int_equal(st_commit(txn), 0);
    uint32_t *at = malloc(n * sizeof *at); /* the value of each key in sorted order */
    assert_non_null(at);
    qsort(keys, n, sizeof *keys, ref_cmp);

    /* Through the store: a walk in the reference order, and every lookup finds its key. */
    assert_int_equal(st_begin(env, 1, &txn), 0);
    st_cursor_t cur;
    st_val_t k, v;
    assert_int_equal(st_cur_open(txn, env, ST_DB_SESSIONS, &cur), 0);
    uint8_t zero = 0;
    int r = st_cur_seek(&cur, &zero, 1, &k, &v);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(r, 0);
        assert_int_equal(k.n, keys[i].n);
        assert_memory_equal(k.p, keys[i].b, k.n);
        memcpy(&at[i], v.p, sizeof at[i]);
        r = st_cur_next(&cur, &k, &v);
    }
    assert_int_equal(r, ST_ENOTFOUND);
    st_cur_close(&cur);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(st_get(txn, env, ST_DB_SESSIONS, keys[i].b, keys[i].n, &v), 0);
        uint32_t got;
        memcpy(&got, v.p, sizeof got);
        assert_int_equal(got, at[i]);
    }
    st_abort(txn);
    st_close(env);

    /* Through LMDB alone, with its default comparison: the same order and the same
     * lookups, so the state file is valid for any LMDB tool. */
    MDB_env *me;
    MDB_txn *mt;
    MDB_dbi dbi;
    MDB_cursor *mc;
    MDB_val mk, mv;
    assert_int_equal(mdb_env_create(&me), 0);
    assert_int_equal(mdb_env_set_maxdbs(me, 32), 0);
    assert_int_equal(mdb_env_open(me, dir, MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(me, NULL, MDB_RDONLY, &mt), 0);
    assert_int_equal(mdb_dbi_open(mt, "sessions", 0, &dbi), 0);
    assert_int_equal(mdb_cursor_open(mt, dbi, &mc), 0);
    r = mdb_cursor_get(mc, &mk, &mv, MDB_FIRST);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(r, 0);
        assert_int_equal(mk.mv_size, keys[i].n);
        assert_memory_equal(mk.mv_data, keys[i].b, mk.mv_size);
        r = mdb_cursor_get(mc, &mk, &mv, MDB_NEXT);
    }
    assert_int_equal(r, MDB_NOTFOUND);
    mdb_cursor_close(mc);
    for (size_t i = 0; i < n; i++) {
        mk.mv_size = keys[i].n;
        mk.mv_data = keys[i].b;
        assert_int_equal(mdb_get(mt, dbi, &mk, &mv), 0);
    }
    mdb_txn_abort(mt);
    mdb_env_close(me);
    free(at);
    free(keys);
    rm_rf(dir);
}

static void test_second_open_refused(void **state)
{
    (void)state;
    char dir[] = "/tmp/test_store_XXXXXX";
    assert_non_null(mkdtemp(dir));
    st_env_t *a, *b = NULL;
    assert_int_equal(st_open(dir, 16 << 20, ST_SYNC_NONE, &a), 0);
    assert_int_equal(st_open(dir, 16 << 20, ST_SYNC_NONE, &b), ST_EBUSY);
    assert_null(b);
    st_close(a);
    assert_int_equal(st_open(dir, 16 << 20, ST_SYNC_NONE, &b), 0);
    st_close(b);
    rm_rf(dir);
}

/* v holds the one-byte value want (0: the key is absent). */
static void expect_byte(st_txn_t *txn, st_env_t *env, const char *k, int want)
{
    st_val_t v;
    int r = st_get(txn, env, ST_DB_META, k, strlen(k), &v);
    if (!want) {
        assert_int_equal(r, ST_ENOTFOUND);
        return;
    }
    assert_int_equal(r, 0);
    assert_int_equal(v.n, 1);
    assert_int_equal(((const uint8_t *)v.p)[0], want);
}

/* The same through a read snapshot of its own: what another thread sees. */
static void expect_read(st_env_t *env, const char *k1, int want1, const char *k2, int want2)
{
    st_txn_t *rd;
    assert_int_equal(st_begin(env, 1, &rd), 0);
    expect_byte(rd, env, k1, want1);
    expect_byte(rd, env, k2, want2);
    st_abort(rd);
}

/* A fresh environment in dir (a mkdtemp template) opened with the fault
 * injection variable `var` set to `val`, which is unset again. */
static st_env_t *open_with_fault(char *dir, const char *var, const char *val)
{
    assert_non_null(mkdtemp(dir));
    assert_int_equal(setenv(var, val, 1), 0);
    st_env_t *env = NULL;
    int r = st_open(dir, 16 << 20, ST_SYNC_META, &env);
    unsetenv(var);
    assert_int_equal(r, 0);
    return env;
}

/*
 * Nested write transactions (the aggregator's batches inside a checkpoint):
 * a child's commit shows in the parent only, an aborted child leaves the
 * parent as it was, readers see nothing before the parent commits, and
 * MDB_WRITEMAP (ST_SYNC_NONE) refuses them.
 */
static void test_nested_transactions(void **state)
{
    (void)state;
    char dir[] = "/tmp/test_store_XXXXXX";
    assert_non_null(mkdtemp(dir));
    st_env_t *env;
    assert_int_equal(st_open(dir, 16 << 20, ST_SYNC_META, &env), 0);
    st_txn_t *outer, *child, *rd;
    uint8_t one = 1, two = 2;
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "a", 1, &one, 1), 0);
    assert_int_equal(st_commit(child), 0);
    expect_byte(outer, env, "a", 1);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "a", 1, &two, 1), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "b", 1, &two, 1), 0);
    expect_byte(child, env, "a", 2);
    st_abort(child);
    expect_byte(outer, env, "a", 1);
    expect_byte(outer, env, "b", 0);
    /* A reader (another thread's snapshot) sees the last commit only. */
    expect_read(env, "a", 0, "b", 0);
    /* A read transaction is no parent. */
    assert_int_equal(st_begin(env, 1, &rd), 0);
    assert_int_equal(st_begin_nested(env, rd, &child), ST_EINVAL);
    st_abort(rd);
    assert_int_equal(st_commit(outer), 0);
    expect_read(env, "a", 1, "b", 0);
    st_close(env);
    /* Durable across a reopen; and none with MDB_WRITEMAP. */
    assert_int_equal(st_open(dir, 16 << 20, ST_SYNC_NONE, &env), 0);
    expect_read(env, "a", 1, "b", 0);
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), ST_EINVAL);
    st_abort(outer);
    st_close(env);
    rm_rf(dir);
}

/*
 * The injected transaction-full fault (ST_FAULT_TXN_FULL_ENV): with N = 3, the
 * children of one outermost transaction may put three times; an aborted
 * child's puts do not count, a committed child's do, and the next outermost
 * transaction starts from none. Puts outside a child are not limited.
 */
static void test_fault_txn_full(void **state)
{
    (void)state;
    char dir[] = "/tmp/test_store_XXXXXX";
    st_env_t *env = open_with_fault(dir, ST_FAULT_TXN_FULL_ENV, "3");
    st_txn_t *outer, *child;
    uint8_t v = 1;
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_put(outer, env, ST_DB_META, "o1", 2, &v, 1), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "a", 1, &v, 1), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "b", 1, &v, 1), 0);
    assert_int_equal(st_commit(child), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "c", 1, &v, 1), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "d", 1, &v, 1), ST_ETXNFULL);
    st_abort(child);
    /* The aborted child's one put is given back: one more fits, not two. */
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "c", 1, &v, 1), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "d", 1, &v, 1), ST_ETXNFULL);
    st_abort(child);
    assert_int_equal(st_put(outer, env, ST_DB_META, "o2", 2, &v, 1), 0);
    assert_int_equal(st_commit(outer), 0);
    expect_read(env, "a", 1, "c", 0);
    /* A new outermost transaction: three puts again. */
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(st_put(child, env, ST_DB_META, "e", 1, &v, 1), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "f", 1, &v, 1), ST_ETXNFULL);
    st_abort(child);
    st_abort(outer);
    st_close(env);
    rm_rf(dir);
}

/* A checkpoint of one child that puts `key`: the outermost commit's result. */
static int checkpoint_one(st_env_t *env, const char *key)
{
    st_txn_t *outer, *child;
    uint8_t v = 1;
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, key, strlen(key), &v, 1), 0);
    assert_int_equal(st_commit(child), 0);
    return st_commit(outer);
}

/* CLICKMART_FAULT_CHECKPOINT_FAIL: the Nth commit of an outermost write
 * transaction holding committed children fails as an I/O error and leaves
 * nothing; commits without children do not count. */
static void test_fault_checkpoint(void **state)
{
    (void)state;
    char dir[] = "/tmp/test_store_XXXXXX";
    st_env_t *env = open_with_fault(dir, ST_FAULT_CHECKPOINT_ENV, "2");
    st_txn_t *outer, *child;
    uint8_t v = 1;
    /* No children: not a checkpoint. */
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_put(outer, env, ST_DB_META, "a", 1, &v, 1), 0);
    assert_int_equal(st_commit(outer), 0);
    assert_int_equal(checkpoint_one(env, "b"), 0); /* the first */
    /* An aborted child is not a committed one. */
    assert_int_equal(st_begin(env, 0, &outer), 0);
    assert_int_equal(st_begin_nested(env, outer, &child), 0);
    assert_int_equal(st_put(child, env, ST_DB_META, "x", 1, &v, 1), 0);
    st_abort(child);
    assert_int_equal(st_put(outer, env, ST_DB_META, "c", 1, &v, 1), 0);
    assert_int_equal(st_commit(outer), 0);
    /* The second checkpoint fails and leaves nothing; only that one. */
    assert_int_equal(checkpoint_one(env, "d"), ST_EIO);
    assert_int_equal(checkpoint_one(env, "e"), 0);
    expect_read(env, "a", 1, "b", 1);
    expect_read(env, "c", 1, "d", 0);
    expect_read(env, "e", 1, "x", 0);
    st_close(env);
    rm_rf(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_order_is_lmdb_default),
        cmocka_unit_test(test_second_open_refused),
        cmocka_unit_test(test_nested_transactions),
        cmocka_unit_test(test_fault_txn_full),
        cmocka_unit_test(test_fault_checkpoint),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
