/*
 * heap.h - how the daemon's heap takes memory from the kernel: glibc's top
 * pad and transparent huge pages.
 *
 * Two facts measured on the benchmark's virtual machines decide it
 * (docs/benchmarks.md, eighteenth session): memory touched for the first time
 * is expensive (the host backs it then), and a fresh huge page more so per MB
 * than small pages; but memory probed at random for a long time pays that
 * back in fewer TLB misses. The loop thread's heap (LMDB's dirty pages, the
 * caches, the duplicate index, the dirty-mark sets) is of the second kind;
 * librdkafka's prefetch and the batches on the thread pool are written once,
 * read once in order and freed. So by default (CM_HUGE_LOOP) only the loop
 * thread's heap and the large tables the modules ask for get huge pages.
 *
 * Everything here is Linux and glibc specific; elsewhere the calls do
 * nothing. docs/operations.md "The heap".
 */
#ifndef CLICKMART_DAEMON_HEAP_H
#define CLICKMART_DAEMON_HEAP_H

#include <stddef.h>
#include <stdint.h>

enum cm_huge {
    CM_HUGE_OFF = 0, /* small pages everywhere */
    CM_HUGE_LOOP,    /* the loop thread's heap and cm_heap_advise'd tables */
    CM_HUGE_ALL      /* every heap: glibc.malloc.hugetlb=1 */
};

/* Parse "loop", "all" or "off" (true, 1, yes, on mean all, and false, 0,
 * no mean off: the values of the boolean flag this replaced); -1 when
 * unknown. */
int cm_heap_mode_from(const char *s);

/*
 * Start the mode. CM_HUGE_ALL executes the program again (argv, through
 * /proc/self/exe, same pid and process name) with glibc.malloc.hugetlb=1
 * added to GLIBC_TUNABLES, since glibc reads its tunables only at start; it
 * returns only when it did not (already done, or the exec failed).
 * CM_HUGE_LOOP notes where the main heap (the main thread's arena, which the
 * loop thread allocates from) ends, for cm_heap_grown. Call from the main
 * thread, which runs the loop, before any other thread starts. Returns what
 * was done, for the log: "loop", "all", "off", "set in GLIBC_TUNABLES",
 * "off (...)" with the reason, or "loop (tables only: ...)" in a sanitizer
 * build, whose allocator has no main heap (a static string).
 */
const char *cm_heap_start(int mode, char **argv);

/*
 * glibc's top pad (M_TOP_PAD): heap taken beyond each need and kept when
 * memory is freed, so that the batches' scratch is not returned to the
 * kernel and faulted in again. 0 leaves glibc's default. Main thread, at
 * start. Returns 0, or -1 when the allocator refuses (a sanitizer build).
 */
int cm_heap_pad(int64_t pad_mb);

/*
 * CM_HUGE_LOOP: advise the main heap's growth since the last call for huge
 * pages. Without growth it makes no system call, so the loop calls it before
 * every slice of work. Loop thread only.
 */
void cm_heap_grown(void);

/*
 * CM_HUGE_LOOP: advise [p, p + n), a large allocation of the caller's (a hash
 * table above glibc's mmap threshold, which glibc maps on its own), for huge
 * pages. Only the whole pages inside the range, and nothing below 2 MiB or in
 * the other modes (with CM_HUGE_ALL glibc advised it already). Any thread.
 */
void cm_heap_advise(void *p, size_t n);

/* The host's THP mode: the bracketed word of
 * /sys/kernel/mm/transparent_hugepage/enabled, "unknown" without it. Valid
 * until the next call; any thread, one at a time. */
const char *cm_heap_thp_mode(void);

#endif
