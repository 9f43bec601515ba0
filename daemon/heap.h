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
 * read once in order and freed. So CM_HUGE_LOOP gives huge pages only to the
 * loop thread's heap and the large tables the modules ask for.
 *
 * On hosts whose hypervisor takes part in every page fault (PVM guests; the
 * twenty-sixth session's machine) a small-page fault costs about 10 us even
 * on memory the guest already holds, against under 2 us on the others, and
 * librdkafka's prefetch and the batches then spent a fifth of the daemon's
 * CPU in faults. There every heap is better on huge pages (one fault per
 * 2 MiB instead of 512). CM_HUGE_AUTO, the default, measures a small-page
 * fault at start and takes CM_HUGE_ALL or CM_HUGE_LOOP accordingly.
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
    CM_HUGE_ALL,     /* every heap: glibc.malloc.hugetlb=1 */
    CM_HUGE_AUTO     /* CM_HUGE_ALL where a page fault is slow, else CM_HUGE_LOOP */
};

/* A small-page fault at or above this many nanoseconds makes CM_HUGE_AUTO
 * take CM_HUGE_ALL. Measured: 9 600-13 900 ns on a PVM guest, where all
 * heaps on huge pages ran a 1 M-event catch-up 11 % faster; 1 700-1 900 ns
 * (first touches, the host backing them included) on the hosts where the
 * loop mode won by 9 % (docs/benchmarks.md, eighteenth and twenty-sixth
 * sessions). */
#define CM_HEAP_AUTO_FAULT_NS 5000.0

/* Parse "auto", "loop", "all" or "off" (true, 1, yes, on mean all, and
 * false, 0, no mean off: the values of the boolean flag this replaced); -1
 * when unknown. */
int cm_heap_mode_from(const char *s);

/*
 * The CPU time one small-page fault takes on this host, in nanoseconds: a
 * mapping of 1 MiB kept on small pages is touched page by page three times,
 * unmapped after each round, and the fastest of the last two rounds counts
 * (their pages are the ones just freed, so what is measured is the fault,
 * not the host backing fresh memory). 256 faults a round: 1-12 ms in all (4
 * MiB rounds took about 50 ms of every start on the benchmark's PVM guest
 * and read 9.6-11.0 us there against 10.7-14.6 us for 1 MiB, both far from
 * the 5 us threshold). -1 when it cannot measure (a mapping or the clock
 * failed). Calling thread's CPU clock; any thread.
 */
double cm_heap_fault_ns(void);

/*
 * The mode CM_HUGE_AUTO takes for a small-page fault of `fault_ns` (from
 * cm_heap_fault_ns): CM_HUGE_ALL at CM_HEAP_AUTO_FAULT_NS or above,
 * CM_HUGE_LOOP below it or when it was not measured (negative).
 */
int cm_heap_auto_mode(double fault_ns);

/*
 * Start the mode. CM_HUGE_AUTO measures (cm_heap_fault_ns; not under a
 * sanitizer, whose allocator glibc's tunable does not reach, nor under
 * valgrind, with pages other than 4 KiB, or where THP is not usable) and
 * goes on as CM_HUGE_ALL or CM_HUGE_LOOP; an automatic CM_HUGE_ALL that
 * cannot happen falls back to CM_HUGE_LOOP. CM_HUGE_ALL executes the program
 * again (argv, through /proc/self/exe, same pid and process name) with
 * glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, since glibc reads its
 * tunables only at start; it returns only when it did not (already done, or
 * the exec failed). CM_HUGE_LOOP notes where the main heap (the main
 * thread's arena, which the loop thread allocates from) ends, for
 * cm_heap_grown. Call from the main thread, which runs the loop, before any
 * other thread starts. Returns what was done, for the log: "loop", "all",
 * "off", "set in GLIBC_TUNABLES", "off (...)" with the reason, or "loop
 * (tables only: ...)" in a sanitizer build, whose allocator has no main
 * heap; after CM_HUGE_AUTO the mode followed by " (auto: ...)" with the
 * measured fault or why it was not measured, and "loop (all: ...) (auto:
 * ...)" after a fallback. Valid for the life of the process.
 */
const char *cm_heap_start(int mode, char **argv);

/* The largest top pad cm_heap_pad takes, in MiB (--heap-pad-mb's bound). */
#define CM_HEAP_PAD_MAX_MB 1024

/*
 * glibc's top pad (M_TOP_PAD), in MiB: heap taken beyond each need and kept
 * when memory is freed, so that the batches' scratch is not returned to the
 * kernel and faulted in again. 0 leaves glibc's default. Main thread, at
 * start. Returns 0, -EINVAL out of range (0-CM_HEAP_PAD_MAX_MB), or -1 when
 * the allocator refuses (a sanitizer build).
 */
int cm_heap_pad(int64_t pad_mb);

/* The largest mmap threshold glibc takes on 64-bit hosts, in MiB
 * (--heap-mmap-threshold-mb's bound). */
#define CM_HEAP_MMAP_THRESHOLD_MAX_MB 32

/*
 * glibc's mmap threshold (M_MMAP_THRESHOLD), in MiB: allocations from this
 * size up get a mapping of their own, unmapped (and so zeroed again by the
 * kernel on the next use) when freed; smaller ones come from the heaps and
 * are reused. Setting a top pad freezes glibc's threshold at 128 KiB, where
 * every librdkafka fetch and zstd output buffer (about 1 MB each) was a
 * fresh mapping. 0 leaves glibc's threshold; 1-32 (32 MiB is glibc's
 * limit on 64-bit hosts). Main thread, at start. Returns 0, -EINVAL out of
 * range, or -1 when the allocator refuses (a sanitizer build).
 */
int cm_heap_mmap_threshold(int64_t mb);

/* The most arenas cm_heap_arenas takes (--heap-arenas' bound). */
#define CM_HEAP_ARENAS_MAX 64

/*
 * The most malloc arenas (glibc M_ARENA_MAX) the threads share. glibc gives
 * each new thread an arena of its own up to eight per core; with 1 every
 * thread allocates from the main heap, which the prefault helper faults in
 * ahead and the pad keeps, so librdkafka's broker thread reuses what the
 * pool freed instead of growing heaps of its own. 0 leaves glibc's default.
 * Main thread, before any other thread allocates. Returns 0, -EINVAL out of
 * range (0-CM_HEAP_ARENAS_MAX), or -1 when the allocator refuses (a
 * sanitizer build).
 */
int cm_heap_arenas(int64_t n);

/*
 * After the main heap grew since the last call: CM_HUGE_LOOP advises the
 * growth for huge pages, and the prefault helper (cm_heap_prefault_start)
 * is told to fault it in. Without growth it makes no system call and takes
 * no lock, so the loop calls it before every slice of work. Loop thread
 * only.
 */
void cm_heap_grown(void);

/*
 * Start a helper thread ("cm-prefault") that faults in the main heap's
 * growth (MADV_POPULATE_WRITE) as soon as it sees the break move (polled
 * every 2 ms while the heap grows; after half a second without growth it
 * waits for cm_heap_grown's signal instead): the kernel
 * zeroes the memory the loop thread is about to use on the helper, not on
 * the loop thread, which bounds intake. glibc grows the main heap by at
 * least the top pad (cm_heap_pad) at a time, so the helper is usually ahead
 * of the allocations that follow; the pad's pages are then resident (RSS)
 * before they are used. 0, or a negative errno: -EINVAL on kernels before
 * 5.14, -ENOTSUP where this is not glibc on Linux. Main thread, after
 * cm_heap_start and before the loop runs.
 */
int cm_heap_prefault_start(void);

/* Stop the helper and wait for it (at most one 8 MiB step). Main thread. */
void cm_heap_prefault_stop(void);

/*
 * Whether the helper faults in the growth from now on (1, the start) or
 * leaves it to the allocating thread (0). The daemon keeps it on only while
 * intake catches up, when the loop thread bounds the throughput: at steady
 * rates the loop thread has time to spare, and the helper's bursts (8 MiB
 * steps of up to a whole pad) took a core from the flushes instead
 * (freshness p99 +5 % at 100 000 events/s). Any thread.
 */
void cm_heap_prefault_active(int on);

/* Bytes the helper has faulted in so far. Any thread. */
uint64_t cm_heap_prefaulted(void);

/* The most ranges cm_heap_prefault_range keeps waiting for the helper. */
#define CM_HEAP_PREFAULT_RANGES 4

/*
 * Ask the helper to fault in [p, p + n) as well (MADV_POPULATE_WRITE, the
 * whole pages inside it): a table the caller allocated ahead of the moment
 * it fills it. glibc maps a large one on its own, where the helper does not
 * see the heap grow, and one written right after its allocation (a hash
 * table's rehash) is faulted in by the writer before the helper's next look
 * at the break. Nothing is written: the contents stay what they were. The
 * caller keeps the memory allocated until it is done with it; a range freed
 * before the helper gets to it is skipped (the kernel refuses unmapped
 * memory). 0 when queued; -ENOTSUP when the helper is not running or
 * inactive (cm_heap_prefault_active(0)): the caller's thread faults the
 * table in on use; -EAGAIN when CM_HEAP_PREFAULT_RANGES ranges already
 * wait; -EINVAL when it holds no whole page. Main thread (the thread that
 * started the helper).
 */
int cm_heap_prefault_range(void *p, size_t n);

/*
 * Whether the helper has stopped polling (nothing grew for a while) and
 * sleeps until cm_heap_grown signals it: what a test waits for instead of
 * guessing how long the polls take under load. Any thread.
 */
int cm_heap_prefault_waiting(void);

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
