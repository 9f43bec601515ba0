/*
 * heap.c - glibc's top pad and transparent huge pages for the daemon's heap
 * (heap.h).
 */
#include "daemon/heap.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#endif
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* The mode cm_heap_start set; written before other threads exist. */
static int g_mode = CM_HUGE_OFF;
/* The main heap's end as last advised (CM_HUGE_LOOP; loop thread only). */
static uintptr_t g_brk_done;

/*
 * The helper that faults in the main heap's growth (cm_heap_prefault_start).
 * `seen` is the break the loop thread last saw, so that it takes the lock
 * only when the heap grew; `grew` tells a waiting helper.
 */
static struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int running;        /* main thread: started and not yet joined */
    atomic_int stop;    /* set by cm_heap_prefault_stop */
    atomic_int idle;    /* cm_heap_prefault_active(0): growth is left to the loop */
    atomic_int waiting; /* the helper sleeps until signalled (cm_heap_prefault_waiting) */
    int grew;           /* under lock: the loop thread saw growth */
    uintptr_t seen;     /* loop thread only */
    uintptr_t done;     /* helper only: faulted in up to here */
    atomic_ullong bytes;
    uintptr_t ranges[CM_HEAP_PREFAULT_RANGES][2]; /* under lock: [start, end) asked for */
    int nranges;                                  /* under lock */
} g_pf = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

/* One madvise call's share, so that a stop is not kept waiting for a large
 * growth (8 MiB: 5-15 ms where fresh memory is dear). */
#define PREFAULT_STEP ((uintptr_t)8 << 20)
/* How often the helper looks at the break while the heap grows, and after
 * how many looks without growth (half a second) it waits for a signal. */
#define PREFAULT_POLL_NS 2000000L
#define PREFAULT_QUIET_POLLS 250

#define HUGE_MIN ((size_t)2 << 20)

/* The page size less one, for rounding to whole pages. First called by
 * cm_heap_start, before other threads exist (or by a test). */
static uintptr_t page_mask(void)
{
    static uintptr_t mask;
    if (!mask) {
        long ps = sysconf(_SC_PAGESIZE);
        mask = (uintptr_t)(ps > 0 ? ps : 4096) - 1;
    }
    return mask;
}

/* The address rounded up, or down, to a page boundary: madvise takes whole
 * pages, and only those inside an allocation are the caller's. */
static uintptr_t page_up(uintptr_t a)
{
    return (a + page_mask()) & ~page_mask();
}

static uintptr_t page_down(uintptr_t a)
{
    return a & ~page_mask();
}

int cm_heap_mode_from(const char *s)
{
    if (!strcasecmp(s, "auto"))
        return CM_HUGE_AUTO;
    if (!strcasecmp(s, "loop"))
        return CM_HUGE_LOOP;
    /* The boolean flag this replaced took true, 1, yes and on for all. */
    if (!strcasecmp(s, "all") || !strcasecmp(s, "true") || !strcmp(s, "1") ||
        !strcasecmp(s, "yes") || !strcasecmp(s, "on"))
        return CM_HUGE_ALL;
    if (!strcasecmp(s, "off") || !strcasecmp(s, "false") || !strcmp(s, "0") || !strcasecmp(s, "no"))
        return CM_HUGE_OFF;
    return -1;
}

#ifndef __GLIBC__
/* Elsewhere the settings below do nothing. */
#define M_TOP_PAD 0
#define M_MMAP_THRESHOLD 0
#define M_ARENA_MAX 0
#endif

/* One of glibc's malloc parameters, `n` times `unit`, when n is not 0:
 * 0, -EINVAL when n is outside 0..max, -1 when the allocator refuses (a
 * sanitizer build replaces malloc and refuses mallopt). */
static int malloc_param(int param, int64_t n, int64_t max, int64_t unit)
{
    if (n < 0 || n > max)
        return -EINVAL;
#ifdef __GLIBC__
    if (n > 0 && mallopt(param, (int)(n * unit)) != 1)
        return -1;
#else
    (void)param;
    (void)unit;
#endif
    return 0;
}

int cm_heap_pad(int64_t pad_mb)
{
    return malloc_param(M_TOP_PAD, pad_mb, CM_HEAP_PAD_MAX_MB, 1024 * 1024);
}

int cm_heap_mmap_threshold(int64_t mb)
{
    return malloc_param(M_MMAP_THRESHOLD, mb, CM_HEAP_MMAP_THRESHOLD_MAX_MB, 1024 * 1024);
}

int cm_heap_arenas(int64_t n)
{
    return malloc_param(M_ARENA_MAX, n, CM_HEAP_ARENAS_MAX, 1);
}

#define PROBE_BYTES ((size_t)1 << 20)
#define PROBE_ROUNDS 3

#ifdef __linux__
/* The calling thread's CPU time, or -1 when the clock cannot be read. */
static double thread_cpu_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
        return -1;
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}
#endif

double cm_heap_fault_ns(void)
{
#ifdef __linux__
    size_t ps = (size_t)page_mask() + 1, pages = PROBE_BYTES / ps;
    double best = -1;
    for (int r = 0; r < PROBE_ROUNDS; r++) {
        volatile char *p =
            mmap(NULL, PROBE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return -1;
        /* THP in "always" mode would otherwise fault the range in 2 MiB at a
         * time. */
        (void)madvise((void *)p, PROBE_BYTES, MADV_NOHUGEPAGE);
        double t0 = thread_cpu_ns();
        for (size_t i = 0; i < PROBE_BYTES; i += ps)
            p[i] = 1;
        double t1 = thread_cpu_ns();
        munmap((void *)p, PROBE_BYTES);
        if (t0 < 0 || t1 < 0)
            return -1;
        double ns = (t1 - t0) / (double)pages;
        /* The first round's pages may be fresh to the host as well. */
        if (r > 0 && ns > 0 && (best < 0 || ns < best))
            best = ns;
    }
    return best;
#else
    return -1;
#endif
}

int cm_heap_auto_mode(double fault_ns)
{
    return fault_ns >= CM_HEAP_AUTO_FAULT_NS ? CM_HUGE_ALL : CM_HUGE_LOOP;
}

#if defined(__GLIBC__) && defined(__linux__)
/* What an automatic choice logs (written once, by the main thread, before
 * other threads exist). */
static char g_auto_desc[192];

/* "MODE (auto: WHY)", or "loop (all: FAILED) (auto: WHY)" when the mode
 * taken was not the one chosen. */
static const char *auto_desc(const char *mode, const char *failed, const char *why)
{
    if (failed)
        snprintf(g_auto_desc, sizeof g_auto_desc, "%s (all: %s) (auto: %s)", mode, failed, why);
    else
        snprintf(g_auto_desc, sizeof g_auto_desc, "%s (auto: %s)", mode, why);
    return g_auto_desc;
}
#endif

/*
 * The marker variable stops a second round of CM_HUGE_ALL's exec and carries
 * the process name: executing /proc/self/exe would otherwise rename the
 * daemon "exe" for ps, pgrep and top.
 */
#define HUGE_PAGES_MARKER "CLICKMARTD_HEAP_HUGE_PAGES"
/* Carries CM_HUGE_AUTO's reason into the second run, for its log line. */
#define HUGE_PAGES_AUTO "CLICKMARTD_HEAP_AUTO"

/* `why` is CM_HUGE_AUTO's reason, or NULL. */
static const char *start_all(char **argv, const char *why)
{
#if defined(__GLIBC__) && defined(__linux__)
    const char *cur = getenv("GLIBC_TUNABLES");
    if (cur && strstr(cur, "glibc.malloc.hugetlb="))
        return "set in GLIBC_TUNABLES";
    char val[1024];
    int n = snprintf(val, sizeof val, "%s%sglibc.malloc.hugetlb=1", cur ? cur : "",
                     cur && *cur ? ":" : "");
    if (n < 0 || (size_t)n >= sizeof val)
        return "off (GLIBC_TUNABLES too long)";
    char name[17] = "";
    if (prctl(PR_GET_NAME, name, 0, 0, 0) != 0)
        name[0] = '\0';
    char *saved = cur ? strdup(cur) : NULL;
    /* An inherited reason would make an explicit "all" log an automatic
     * choice. */
    if (!why)
        unsetenv(HUGE_PAGES_AUTO);
    if (setenv("GLIBC_TUNABLES", val, 1) == 0 && setenv(HUGE_PAGES_MARKER, name, 1) == 0 &&
        (!why || setenv(HUGE_PAGES_AUTO, why, 1) == 0))
        execv("/proc/self/exe", argv);
    unsetenv(HUGE_PAGES_MARKER);
    unsetenv(HUGE_PAGES_AUTO);
    if (saved)
        setenv("GLIBC_TUNABLES", saved, 1);
    else
        unsetenv("GLIBC_TUNABLES");
    free(saved);
    return "off (re-exec failed)";
#else
    (void)argv;
    (void)why;
    return "off (not glibc on Linux)";
#endif
}

const char *cm_heap_start(int mode, char **argv)
{
#if defined(__GLIBC__) && defined(__linux__)
    const char *marker = getenv(HUGE_PAGES_MARKER);
    if (marker) {
        /* The second run of CM_HUGE_ALL. */
        if (*marker)
            prctl(PR_SET_NAME, marker, 0, 0, 0);
        unsetenv(HUGE_PAGES_MARKER);
        g_mode = CM_HUGE_ALL;
        /* The reason goes into a quoted log field: one that could break the
         * quoting did not come from the first run. */
        const char *why = getenv(HUGE_PAGES_AUTO);
        const char *desc = why && !strpbrk(why, "\"\\\n") ? auto_desc("all", NULL, why) : "all";
        unsetenv(HUGE_PAGES_AUTO);
        return desc;
    }
    g_mode = CM_HUGE_OFF;
    const char *why = NULL;
    char fault[64];
    if (mode == CM_HUGE_AUTO) {
        double ns = -1;
#ifdef __SANITIZE_ADDRESS__
        /* glibc's tunable does not reach a sanitizer's allocator. */
        why = "not measured: a sanitizer's allocator";
#else
        const char *thp = cm_heap_thp_mode();
        const char *preload = getenv("LD_PRELOAD");
        if (strcmp(thp, "madvise") != 0 && strcmp(thp, "always") != 0)
            why = "not measured: THP unusable";
        else if (preload && strstr(preload, "vgpreload"))
            /* CM_HUGE_ALL's second exec would leave valgrind. */
            why = "not measured: under valgrind";
        else if (page_mask() + 1 != 4096)
            /* The threshold is for 4 KiB pages: a larger page takes fewer
             * faults per MB, so the figures do not compare. */
            why = "not measured: pages are not 4 KiB";
        else if ((ns = cm_heap_fault_ns()) < 0)
            why = "not measured: the probe failed";
#endif
        if (!why) {
            snprintf(fault, sizeof fault, "a small-page fault takes %.1f us", ns / 1000);
            why = fault;
        }
        mode = cm_heap_auto_mode(ns);
    }
    const char *failed = NULL;
    if (mode == CM_HUGE_ALL) {
        const char *r = start_all(argv, why);
        if (!why)
            return r;
        /* An automatic "all" that did not happen falls back to the loop
         * mode, the default before "auto", rather than to none. */
        failed = r;
        mode = CM_HUGE_LOOP;
    }
    if (mode != CM_HUGE_LOOP)
        return "off";
    g_mode = CM_HUGE_LOOP;
    /* The heap before this point is a few pages of start-up: advise from
     * here on. glibc's mmap threshold is left dynamic. A version that fixed
     * it at 32 MiB (so that more of the loop thread's allocations would come
     * from the main heap) also moved the other threads' large buffers into
     * their arenas, and a 10 M-event run then took 7 % more memory and 24 %
     * more CPU per event at its end (docs/benchmarks.md, eighteenth
     * session). */
    g_brk_done = page_up((uintptr_t)sbrk(0));
#ifdef __SANITIZE_ADDRESS__
    /* AddressSanitizer's allocator maps its own memory: no main heap. */
    const char *r = "loop (tables only: a sanitizer's allocator)";
#else
    const char *r = "loop";
#endif
    return why ? auto_desc(r, failed, why) : r;
#else
    (void)mode;
    (void)argv;
    return "off (not glibc on Linux)";
#endif
}

#ifdef __linux__
/* CM_HUGE_LOOP's advice for the main heap's growth up to cur. */
static void advise_grown(uintptr_t cur)
{
    if (cur <= g_brk_done) {
        /* Trimmed (rare with the top pad): what grows back is a new mapping. */
        g_brk_done = cur;
        return;
    }
    /* The kernel gives a huge page to a fault in an aligned 2 MiB block of
     * an advised range; blocks already partly faulted in stay small. The
     * advice is not retried: a failure only costs speed. */
    (void)madvise((void *)g_brk_done, cur - g_brk_done, MADV_HUGEPAGE);
    g_brk_done = cur;
}
#endif

void cm_heap_grown(void)
{
#ifdef __linux__
    if (g_mode != CM_HUGE_LOOP && !g_pf.running)
        return;
    /* sbrk(0) reads glibc's cached break: no system call. */
    uintptr_t cur = page_down((uintptr_t)sbrk(0));
    /* The advice first: pages the helper faults in before it would stay
     * small. */
    if (g_mode == CM_HUGE_LOOP)
        advise_grown(cur);
    if (g_pf.running && cur != g_pf.seen) {
        g_pf.seen = cur;
        pthread_mutex_lock(&g_pf.lock);
        g_pf.grew = 1;
        pthread_cond_signal(&g_pf.cond);
        pthread_mutex_unlock(&g_pf.lock);
    }
#endif
}

#ifdef __linux__
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

/* Fault in [g_pf.done, to): what the kernel zeroes here, the loop thread
 * does not wait for. A range the allocator gave back meanwhile fails
 * (ENOMEM) and is skipped. */
static void prefault_to(uintptr_t to)
{
    if (to < g_pf.done) {
        g_pf.done = to; /* trimmed: what grows back is new */
        return;
    }
    while (g_pf.done < to && !atomic_load(&g_pf.stop)) {
        uintptr_t n = to - g_pf.done < PREFAULT_STEP ? to - g_pf.done : PREFAULT_STEP;
        if (madvise((void *)g_pf.done, n, MADV_POPULATE_WRITE) != 0) {
            g_pf.done = to;
            return;
        }
        atomic_fetch_add(&g_pf.bytes, (unsigned long long)n);
        g_pf.done += n;
    }
}

/* The break as the kernel has it: glibc's cached copy (sbrk(0)) belongs to
 * the thread that moves it. */
static uintptr_t kernel_brk(void)
{
    return page_down((uintptr_t)syscall(SYS_brk, 0));
}

/* Fault in the ranges cm_heap_prefault_range asked for, oldest first. A
 * range unmapped meanwhile (its table was freed) fails and is dropped. */
static void prefault_ranges(void)
{
    for (;;) {
        pthread_mutex_lock(&g_pf.lock);
        if (g_pf.nranges == 0) {
            pthread_mutex_unlock(&g_pf.lock);
            return;
        }
        uintptr_t a = g_pf.ranges[0][0], e = g_pf.ranges[0][1];
        g_pf.nranges--;
        memmove(g_pf.ranges[0], g_pf.ranges[1], (size_t)g_pf.nranges * sizeof g_pf.ranges[0]);
        pthread_mutex_unlock(&g_pf.lock);
        while (a < e && !atomic_load(&g_pf.stop)) {
            uintptr_t n = e - a < PREFAULT_STEP ? e - a : PREFAULT_STEP;
            if (madvise((void *)a, n, MADV_POPULATE_WRITE) != 0)
                break;
            atomic_fetch_add(&g_pf.bytes, (unsigned long long)n);
            a += n;
        }
    }
}

static void *prefault_main(void *arg)
{
    (void)arg;
    int quiet = 0;
    for (;;) {
        if (quiet >= PREFAULT_QUIET_POLLS) {
            /* Nothing grew for a while (an idle daemon): no more polling
             * until the loop thread sees growth (cm_heap_grown). */
            pthread_mutex_lock(&g_pf.lock);
            atomic_store(&g_pf.waiting, 1);
            while (!atomic_load(&g_pf.stop) && !g_pf.grew && !g_pf.nranges)
                pthread_cond_wait(&g_pf.cond, &g_pf.lock);
            atomic_store(&g_pf.waiting, 0);
            g_pf.grew = 0;
            pthread_mutex_unlock(&g_pf.lock);
            quiet = 0;
        } else {
            /* While the heap grows, the loop thread's next cm_heap_grown
             * comes only at its next slice of work, after it has touched
             * the first of the new memory itself: polling the break is
             * ahead of it (1 M events: 5 % less of the loop thread's CPU
             * than waiting for the signal alone). */
            struct timespec ts = {0, PREFAULT_POLL_NS};
            nanosleep(&ts, NULL);
        }
        if (atomic_load(&g_pf.stop))
            break;
        prefault_ranges();
        uintptr_t to = kernel_brk();
        if (to == g_pf.done) {
            quiet++;
            continue;
        }
        quiet = 0;
        if (atomic_load(&g_pf.idle))
            g_pf.done = to; /* the loop thread faults it in itself */
        else
            prefault_to(to);
    }
    return NULL;
}
#endif

int cm_heap_prefault_start(void)
{
#if defined(__linux__) && defined(__GLIBC__)
    if (g_pf.running)
        return 0;
    /* Kernels before 5.14 do not know the advice: nothing to start. */
    size_t ps = (size_t)page_mask() + 1;
    void *probe = mmap(NULL, ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (probe == MAP_FAILED)
        return -errno;
    int r = madvise(probe, ps, MADV_POPULATE_WRITE) == 0 ? 0 : -errno;
    munmap(probe, ps);
    if (r)
        return r;
    uintptr_t cur = page_down((uintptr_t)sbrk(0));
    g_pf.seen = g_pf.done = cur;
    g_pf.grew = 0;
    g_pf.nranges = 0;
    atomic_store(&g_pf.stop, 0);
    r = pthread_create(&g_pf.thread, NULL, prefault_main, NULL);
    if (r)
        return -r;
    (void)pthread_setname_np(g_pf.thread, "cm-prefault");
    g_pf.running = 1;
    return 0;
#else
    return -ENOTSUP;
#endif
}

void cm_heap_prefault_stop(void)
{
#if defined(__linux__) && defined(__GLIBC__)
    if (!g_pf.running)
        return;
    pthread_mutex_lock(&g_pf.lock);
    atomic_store(&g_pf.stop, 1);
    pthread_cond_signal(&g_pf.cond);
    pthread_mutex_unlock(&g_pf.lock);
    pthread_join(g_pf.thread, NULL);
    g_pf.running = 0;
#endif
}

void cm_heap_prefault_active(int on)
{
    atomic_store(&g_pf.idle, !on);
}

uint64_t cm_heap_prefaulted(void)
{
    return (uint64_t)atomic_load(&g_pf.bytes);
}

int cm_heap_prefault_range(void *p, size_t n)
{
#if defined(__linux__) && defined(__GLIBC__)
    if (!g_pf.running || atomic_load(&g_pf.idle))
        return -ENOTSUP;
    uintptr_t a = page_up((uintptr_t)p), e = page_down((uintptr_t)p + n);
    if (!p || e <= a)
        return -EINVAL;
    pthread_mutex_lock(&g_pf.lock);
    int r = -EAGAIN;
    if (g_pf.nranges < CM_HEAP_PREFAULT_RANGES) {
        g_pf.ranges[g_pf.nranges][0] = a;
        g_pf.ranges[g_pf.nranges][1] = e;
        g_pf.nranges++;
        pthread_cond_signal(&g_pf.cond);
        r = 0;
    }
    pthread_mutex_unlock(&g_pf.lock);
    return r;
#else
    (void)p;
    (void)n;
    return -ENOTSUP;
#endif
}

int cm_heap_prefault_waiting(void)
{
    return atomic_load(&g_pf.waiting);
}

void cm_heap_advise(void *p, size_t n)
{
#ifdef __linux__
    if (g_mode != CM_HUGE_LOOP || !p || n < HUGE_MIN)
        return;
    uintptr_t a = page_up((uintptr_t)p), e = page_down((uintptr_t)p + n);
    if (e > a)
        (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

const char *cm_heap_thp_mode(void)
{
    static char mode[16];
    char line[128];
    strcpy(mode, "unknown");
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f)
        return mode;
    if (fgets(line, sizeof line, f)) {
        const char *open = strchr(line, '[');
        const char *close = open ? strchr(open, ']') : NULL;
        if (close && (size_t)(close - open - 1) < sizeof mode) {
            memcpy(mode, open + 1, (size_t)(close - open - 1));
            mode[close - open - 1] = '\0';
        }
    }
    fclose(f);
    return mode;
}
