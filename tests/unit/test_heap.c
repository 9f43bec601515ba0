/*
 * test_heap.c - daemon/heap.c: the --heap-huge-pages values, that the loop
 * mode advises what it should and nothing else, and the auto mode's probe
 * and rule. The advice is read back
 * from /proc/self/smaps, where a range advised with MADV_HUGEPAGE carries
 * the "hg" VmFlag.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "unit_cmocka.h"

#include "daemon/heap.h"

/* 1 when the mapping holding `p` carries the hg flag, 0 when not, -1 when
 * smaps does not say. */
static int advised(const void *p)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        return -1;
    char line[512];
    int inside = 0, r = -1;
    uintptr_t a = (uintptr_t)p;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            inside = a >= lo && a < hi;
            continue;
        }
        if (inside && !strncmp(line, "VmFlags:", 8)) {
            r = strstr(line, " hg") != NULL;
            break;
        }
    }
    fclose(f);
    return r;
}

/* THP built into the kernel and not off: otherwise madvise refuses or the
 * flag means nothing, and the advice tests have nothing to check. */
static int thp_usable(void)
{
    const char *m = cm_heap_thp_mode();
    return !strcmp(m, "madvise") || !strcmp(m, "always");
}

static void test_mode_from(void **state)
{
    (void)state;
    assert_int_equal(cm_heap_mode_from("loop"), CM_HUGE_LOOP);
    assert_int_equal(cm_heap_mode_from("LOOP"), CM_HUGE_LOOP);
    assert_int_equal(cm_heap_mode_from("all"), CM_HUGE_ALL);
    assert_int_equal(cm_heap_mode_from("true"), CM_HUGE_ALL);
    assert_int_equal(cm_heap_mode_from("1"), CM_HUGE_ALL);
    assert_int_equal(cm_heap_mode_from("off"), CM_HUGE_OFF);
    assert_int_equal(cm_heap_mode_from("false"), CM_HUGE_OFF);
    assert_int_equal(cm_heap_mode_from("0"), CM_HUGE_OFF);
    assert_int_equal(cm_heap_mode_from("yes"), CM_HUGE_ALL);
    assert_int_equal(cm_heap_mode_from("on"), CM_HUGE_ALL);
    assert_int_equal(cm_heap_mode_from("no"), CM_HUGE_OFF);
    assert_int_equal(cm_heap_mode_from("auto"), CM_HUGE_AUTO);
    assert_int_equal(cm_heap_mode_from("Auto"), CM_HUGE_AUTO);
    assert_int_equal(cm_heap_mode_from("huge"), -1);
    assert_int_equal(cm_heap_mode_from(""), -1);
}

/* A fresh anonymous mapping of `n` bytes, never advised. */
static void *fresh(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    return p;
}

static void test_advise_by_mode(void **state)
{
    (void)state;
    if (!thp_usable())
        skip();
    size_t big = (size_t)8 << 20, small = (size_t)1 << 20;
    /* Off: nothing is advised. */
    assert_string_equal(cm_heap_start(CM_HUGE_OFF, NULL), "off");
    void *p = fresh(big);
    cm_heap_advise(p, big);
    assert_int_equal(advised(p), 0);
    /* Loop: large ranges are, from their first whole page on; small ones are
     * not (under a sanitizer's allocator too). */
    assert_true(!strncmp(cm_heap_start(CM_HUGE_LOOP, NULL), "loop", 4));
    cm_heap_advise((char *)p + 100, big - 100);
    assert_int_equal(advised((char *)p + 4096), 1);
    assert_int_equal(advised(p), 0); /* the partial first page stays out */
    void *q = fresh(small);
    cm_heap_advise(q, small);
    assert_int_equal(advised(q), 0);
    munmap(p, big);
    munmap(q, small);
}

static void test_main_heap_grown(void **state)
{
    (void)state;
    if (!thp_usable())
        skip();
    assert_true(!strncmp(cm_heap_start(CM_HUGE_LOOP, NULL), "loop", 4));
    /* The break moved past what was advised at start, the way malloc moves
     * it (moved by hand: a sanitizer's allocator does not use the main
     * heap). */
    size_t n = (size_t)8 << 20;
    char *m = sbrk((intptr_t)n);
    assert_true(m != (char *)-1);
    memset(m, 1, n);
    char *probe = m + n / 2;
    assert_int_equal(advised(probe), 0);
    cm_heap_grown();
    assert_int_equal(advised(probe), 1);
    /* Nothing grew: no change, and no harm. */
    cm_heap_grown();
    assert_int_equal(advised(probe), 1);
    assert_true(sbrk(-(intptr_t)n) != (void *)-1);
    /* Trimmed, then grown again: the new range is a new mapping, advised
     * again. */
    cm_heap_grown();
    m = sbrk((intptr_t)n);
    assert_true(m != (char *)-1);
    memset(m, 1, n);
    assert_int_equal(advised(m + n / 2), 0);
    cm_heap_grown();
    assert_int_equal(advised(m + n / 2), 1);
    assert_true(sbrk(-(intptr_t)n) != (void *)-1);
}

/* The mappings of this process: a probe must leave none behind. */
static int mapping_count(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return -1;
    int n = 0, c;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

static void test_fault_probe(void **state)
{
    (void)state;
    int before = mapping_count();
    double ns = cm_heap_fault_ns();
    /* A page fault takes somewhere between 100 ns and a millisecond on any
     * machine this runs on; -1 only when mmap fails. */
    assert_true(ns > 100 && ns < 1e6);
    assert_int_equal(mapping_count(), before);
}

static void test_auto_rule(void **state)
{
    (void)state;
    assert_int_equal(cm_heap_auto_mode(-1), CM_HUGE_LOOP);
    assert_int_equal(cm_heap_auto_mode(1800), CM_HUGE_LOOP);
    assert_int_equal(cm_heap_auto_mode(CM_HEAP_AUTO_FAULT_NS - 1), CM_HUGE_LOOP);
    assert_int_equal(cm_heap_auto_mode(CM_HEAP_AUTO_FAULT_NS), CM_HUGE_ALL);
    assert_int_equal(cm_heap_auto_mode(9800), CM_HUGE_ALL);
}

/* Auto measures, says what it measured, and goes on as the rule says. The
 * tunable already in the environment stops the re-exec CM_HUGE_ALL would do
 * (this test cannot be executed again), so that branch reports "set in
 * GLIBC_TUNABLES". */
static void test_auto_start(void **state)
{
    (void)state;
    assert_int_equal(setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0", 1), 0);
    const char *r = cm_heap_start(CM_HUGE_AUTO, NULL);
    unsetenv("GLIBC_TUNABLES");
    const char *why = strstr(r, " (auto: ");
    assert_non_null(why);
    if (!thp_usable() || strstr(why, "not measured")) {
        /* A sanitizer build, or THP off: the loop mode, unmeasured. */
        assert_non_null(strstr(why, "not measured"));
        assert_true(!strncmp(r, "loop", 4));
        return;
    }
    double us = 0;
    assert_int_equal(sscanf(why, " (auto: a small-page fault takes %lf us)", &us), 1);
    assert_true(us > 0.1 && us < 1000);
    if (us * 1000 >= CM_HEAP_AUTO_FAULT_NS + 100)
        assert_true(!strncmp(r, "set in GLIBC_TUNABLES", 21));
    else if (us * 1000 < CM_HEAP_AUTO_FAULT_NS - 100)
        assert_true(!strncmp(r, "loop (auto: ", 12));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mode_from),       cmocka_unit_test(test_advise_by_mode),
        cmocka_unit_test(test_main_heap_grown), cmocka_unit_test(test_fault_probe),
        cmocka_unit_test(test_auto_rule),       cmocka_unit_test(test_auto_start),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
