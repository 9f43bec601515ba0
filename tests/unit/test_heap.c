/*
 * test_heap.c - daemon/heap.c: the --heap-huge-pages values, that the loop
 * mode advises what it should and nothing else, and the auto mode's probe
 * and rule. The advice is read back
 * from /proc/self/smaps, where a range advised with MADV_HUGEPAGE carries
 * the "hg" VmFlag.
 */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
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

/* Pages of [p, p + n) resident, from mincore; -1 when it cannot tell. */
static long resident_pages(const void *p, size_t n)
{
    size_t ps = (size_t)sysconf(_SC_PAGESIZE), np = (n + ps - 1) / ps;
    unsigned char *v = malloc(np);
    if (!v || mincore((void *)p, n, v) != 0) {
        free(v);
        return -1;
    }
    long r = 0;
    for (size_t i = 0; i < np; i++)
        r += v[i] & 1;
    free(v);
    return r;
}

/* Waits up to 3 s for the helper to have faulted in at least `bytes`. */
static int prefaulted_at_least(uint64_t bytes)
{
    for (int i = 0; i < 300; i++) {
        if (cm_heap_prefaulted() >= bytes)
            return 1;
        usleep(10000);
    }
    return 0;
}

/* The prefault helper faults in the main heap's growth, without changing a
 * byte of it: found by polling the break while the heap grows, and by the
 * loop thread's signal (cm_heap_grown) once it has gone quiet; inactive, it
 * leaves the growth alone. */
static void test_prefault(void **state)
{
    (void)state;
    int r = cm_heap_prefault_start();
    if (r == -EINVAL) /* a kernel before 5.14 */
        skip();
    assert_int_equal(r, 0);
    assert_int_equal(cm_heap_prefault_start(), 0); /* already running */
    size_t n = (size_t)16 << 20;
    uint64_t before = cm_heap_prefaulted();
    /* Moved by hand, as malloc moves it (a sanitizer's allocator does not
     * use the main heap). */
    char *m = sbrk((intptr_t)n);
    assert_true(m != (char *)-1);
    assert_true(prefaulted_at_least(before + n / 2));
    long ps = sysconf(_SC_PAGESIZE);
    char *a = (char *)(((uintptr_t)m + (uintptr_t)ps - 1) & ~((uintptr_t)ps - 1));
    size_t whole = (size_t)(m + n - a) & ~((size_t)ps - 1);
    /* Every page of it is there, and still zero. */
    for (int i = 0; i < 300 && resident_pages(a, whole) < (long)(whole / (size_t)ps); i++)
        usleep(10000);
    assert_int_equal(resident_pages(a, whole), (long)(whole / (size_t)ps));
    for (size_t i = 0; i < n; i += 4096)
        assert_int_equal(m[i], 0);
    memset(m, 7, n);
    /* Quiet for longer than the helper polls (half a second, more under
     * load): only the signal wakes it now. Waited for, not slept: a fixed
     * 1.5 s was too short when each 2 ms poll took 6 ms or more. */
    for (int i = 0; i < 1000 && !cm_heap_prefault_waiting(); i++)
        usleep(10000);
    assert_true(cm_heap_prefault_waiting());
    uint64_t mid = cm_heap_prefaulted();
    char *m2 = sbrk((intptr_t)n);
    assert_true(m2 != (char *)-1);
    usleep(100000);
    assert_true(cm_heap_prefaulted() == mid);
    cm_heap_grown();
    /* All of it (but a page lost to rounding at each end): a step still
     * running would count after the helper was made inactive below. */
    assert_true(prefaulted_at_least(mid + n - 2 * (uint64_t)sysconf(_SC_PAGESIZE)));
    assert_int_equal(m[n - 1], 7);
    /* Inactive (the daemon at steady rates): growth is left alone. */
    cm_heap_prefault_active(0);
    uint64_t off = cm_heap_prefaulted();
    char *m3 = sbrk((intptr_t)n);
    assert_true(m3 != (char *)-1);
    usleep(200000);
    cm_heap_grown();
    usleep(200000);
    assert_true(cm_heap_prefaulted() == off);
    cm_heap_prefault_active(1);
    assert_true(sbrk(-(intptr_t)(3 * n)) != (void *)-1);
    cm_heap_prefault_stop();
    cm_heap_prefault_stop(); /* stopped already: nothing to do */
}

/* Ranges asked for (a table allocated ahead of its use, mapped on its own)
 * are faulted in whole and keep their contents; without a running, active
 * helper the caller is told to fault them in itself. */
static void test_prefault_range(void **state)
{
    (void)state;
    size_t n = (size_t)16 << 20;
    char *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(m != MAP_FAILED);
    long ps = sysconf(_SC_PAGESIZE);
    assert_int_equal(cm_heap_prefault_range(m, n), -ENOTSUP); /* not running */
    int r = cm_heap_prefault_start();
    if (r == -EINVAL) { /* a kernel before 5.14 */
        munmap(m, n);
        skip();
    }
    assert_int_equal(r, 0);
    assert_int_equal(cm_heap_prefault_range(m, (size_t)ps - 1), -EINVAL); /* no whole page */
    m[5] = 9; /* one page the owner wrote already: kept as it is */
    assert_true(resident_pages(m, n) < (long)(n / (size_t)ps));
    uint64_t before = cm_heap_prefaulted();
    assert_int_equal(cm_heap_prefault_range(m, n), 0);
    assert_true(prefaulted_at_least(before + n));
    for (int i = 0; i < 300 && resident_pages(m, n) < (long)(n / (size_t)ps); i++)
        usleep(10000);
    assert_int_equal(resident_pages(m, n), (long)(n / (size_t)ps));
    assert_int_equal(m[5], 9);
    for (size_t i = 0; i < n; i += (size_t)ps)
        assert_int_equal(m[i + (i == 0 ? 0 : 5)], 0);
    /* A range unmapped before the helper reaches it is skipped. */
    char *gone = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(gone != MAP_FAILED);
    assert_int_equal(munmap(gone, n), 0);
    assert_int_equal(cm_heap_prefault_range(gone, n), 0);
    /* Inactive (steady rates): refused, the caller faults it in on use. */
    cm_heap_prefault_active(0);
    assert_int_equal(cm_heap_prefault_range(m, n), -ENOTSUP);
    cm_heap_prefault_active(1);
    cm_heap_prefault_stop();
    assert_int_equal(cm_heap_prefault_range(m, n), -ENOTSUP); /* stopped */
    munmap(m, n);
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
 * (this test cannot be executed again), so that branch reports the fallback
 * to the loop mode, "loop (all: set in GLIBC_TUNABLES) (auto: ...)". */
static void test_auto_start(void **state)
{
    (void)state;
#ifndef __GLIBC__
    skip();
#endif
    assert_int_equal(setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0", 1), 0);
    const char *r = cm_heap_start(CM_HUGE_AUTO, NULL);
    unsetenv("GLIBC_TUNABLES");
    const char *why = strstr(r, " (auto: ");
    assert_non_null(why);
    /* Whatever it chose, the mode it runs is the loop mode here. */
    assert_true(!strncmp(r, "loop", 4));
#ifdef __SANITIZE_ADDRESS__
    assert_string_equal(why, " (auto: not measured: a sanitizer's allocator)");
    return;
#endif
    if (!thp_usable()) {
        assert_string_equal(why, " (auto: not measured: THP unusable)");
        return;
    }
    if (sysconf(_SC_PAGESIZE) != 4096) {
        assert_string_equal(why, " (auto: not measured: pages are not 4 KiB)");
        return;
    }
    double us = 0;
    assert_int_equal(sscanf(why, " (auto: a small-page fault takes %lf us)", &us), 1);
    assert_true(us > 0.1 && us < 1000);
    if (us * 1000 >= CM_HEAP_AUTO_FAULT_NS + 100)
        assert_true(!strncmp(r, "loop (all: set in GLIBC_TUNABLES) (auto: ", 41));
    else if (us * 1000 < CM_HEAP_AUTO_FAULT_NS - 100)
        assert_true(!strncmp(r, "loop (auto: ", 12));
}

/* The second run of "all" (the marker set, as the first run sets it before
 * its exec) reports the first run's reason when it has one, and only a
 * reason that cannot break the log's quoting; it clears both variables. */
static void test_second_run(void **state)
{
    (void)state;
#ifndef __GLIBC__
    skip();
#endif
    static const struct {
        const char *why, *want;
    } cases[] = {
        {NULL, "all"},
        {"a small-page fault takes 9.9 us", "all (auto: a small-page fault takes 9.9 us)"},
        {"takes \"9.9\" us", "all"},
        {"a\\b", "all"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(setenv("CLICKMARTD_HEAP_HUGE_PAGES", "test_heap", 1), 0);
        if (cases[i].why)
            assert_int_equal(setenv("CLICKMARTD_HEAP_AUTO", cases[i].why, 1), 0);
        else
            unsetenv("CLICKMARTD_HEAP_AUTO");
        assert_string_equal(cm_heap_start(CM_HUGE_LOOP, NULL), cases[i].want);
        assert_null(getenv("CLICKMARTD_HEAP_HUGE_PAGES"));
        assert_null(getenv("CLICKMARTD_HEAP_AUTO"));
    }
}

/* Chunks the allocator holds as mappings of their own right now. */
static size_t mapped_chunks(void)
{
    return mallinfo2().hblks;
}

/* Allocations under the threshold come from the heap, larger ones are
 * mapped; 0 leaves the threshold as it is. */
static void test_mmap_threshold(void **state)
{
    (void)state;
    assert_int_equal(cm_heap_mmap_threshold(33), -EINVAL);
    assert_int_equal(cm_heap_mmap_threshold(-1), -EINVAL);
    /* The threshold a top pad leaves (glibc's 128 KiB, no longer adjusted);
     * a sanitizer's allocator refuses mallopt. */
    if (mallopt(M_MMAP_THRESHOLD, 128 * 1024) != 1) {
        assert_int_equal(cm_heap_mmap_threshold(32), -1);
        assert_null(getenv("CM_TEST_MALLOPT")); /* glibc's allocator was meant */
        skip();
    }
    size_t before = mapped_chunks();
    char *p = malloc((size_t)1 << 20);
    assert_non_null(p);
    assert_int_equal(mapped_chunks(), before + 1);
    free(p);
    assert_int_equal(mapped_chunks(), before);

    assert_int_equal(cm_heap_mmap_threshold(32), 0);
    p = malloc((size_t)1 << 20);
    char *q = malloc((size_t)16 << 20);
    assert_non_null(p);
    assert_non_null(q);
    assert_int_equal(mapped_chunks(), before);
    free(q);
    free(p);
    char *big = malloc((size_t)40 << 20);
    assert_non_null(big);
    assert_int_equal(mapped_chunks(), before + 1);
    free(big);

    assert_int_equal(cm_heap_mmap_threshold(0), 0);
    p = malloc((size_t)1 << 20);
    assert_non_null(p);
    assert_int_equal(mapped_chunks(), before);
    free(p);
}

/* Allocates 256 KiB on a new thread and leaves it allocated. */
static void *alloc_on_thread(void *arg)
{
    *(void **)arg = malloc((size_t)256 << 10);
    return NULL;
}

/* The end of the program's data: the main heap (glibc's main arena, grown
 * with brk) lies between it and the break; other arenas are mappings. */
extern char end;

/* 1 when a new thread's allocation comes from the main heap, 0 when from an
 * arena of its own, -1 on failure. */
static int thread_uses_main_arena(void)
{
    void *p = NULL;
    pthread_t t;
    if (pthread_create(&t, NULL, alloc_on_thread, &p) != 0 || pthread_join(t, NULL) != 0 || !p)
        return -1;
    int r = (char *)p >= &end && (char *)p < (char *)sbrk(0);
    free(p);
    return r;
}

/* Runs thread_uses_main_arena after cm_heap_arenas(n) in a child: the limit
 * cannot be undone in this process, and it decides only for threads that
 * have not yet allocated. Returns what that returned, 2 when the allocator
 * refused the limit, 3 when the thread failed. */
static int arena_child(int64_t n)
{
    pid_t pid = fork();
    if (pid == 0) {
        if (cm_heap_arenas(n) != 0)
            _exit(2);
        int r = thread_uses_main_arena();
        _exit(r < 0 ? 3 : r);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

/* With one arena a new thread allocates from the main heap; without a
 * limit (0 leaves glibc's) it gets an arena of its own. */
static void test_arenas(void **state)
{
    (void)state;
    assert_int_equal(cm_heap_arenas(-1), -EINVAL);
    assert_int_equal(cm_heap_arenas(CM_HEAP_ARENAS_MAX + 1), -EINVAL);
    int one = arena_child(1);
    if (one == 2) {
        assert_null(getenv("CM_TEST_MALLOPT")); /* glibc's allocator was meant */
        skip();                                 /* a sanitizer's allocator */
    }
    assert_int_equal(one, 1);
    assert_int_equal(arena_child(0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mode_from),       cmocka_unit_test(test_advise_by_mode),
        cmocka_unit_test(test_main_heap_grown), cmocka_unit_test(test_fault_probe),
        cmocka_unit_test(test_auto_rule),       cmocka_unit_test(test_auto_start),
        cmocka_unit_test(test_second_run),      cmocka_unit_test(test_prefault),
        cmocka_unit_test(test_prefault_range),  cmocka_unit_test(test_mmap_threshold),
        cmocka_unit_test(test_arenas),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
