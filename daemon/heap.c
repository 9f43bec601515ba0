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
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* The mode cm_heap_start set; written before other threads exist. */
static int g_mode = CM_HUGE_OFF;
/* The main heap's end as last advised (CM_HUGE_LOOP; loop thread only). */
static uintptr_t g_brk_done;

#define HUGE_MIN ((size_t)2 << 20)

/* The page size less one, for rounding to whole pages. First called by
 * cm_heap_start in loop mode, before other threads exist. */
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

int cm_heap_pad(int64_t pad_mb)
{
#ifdef __GLIBC__
    /* A sanitizer build replaces malloc and refuses mallopt. */
    if (pad_mb > 0 && mallopt(M_TOP_PAD, (int)(pad_mb * 1024 * 1024)) != 1)
        return -1;
#else
    (void)pad_mb;
#endif
    return 0;
}

/*
 * The marker variable stops a second round of CM_HUGE_ALL's exec and carries
 * the process name: executing /proc/self/exe would otherwise rename the
 * daemon "exe" for ps, pgrep and top.
 */
#define HUGE_PAGES_MARKER "CLICKMARTD_HEAP_HUGE_PAGES"

static const char *start_all(char **argv)
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
    if (setenv("GLIBC_TUNABLES", val, 1) == 0 && setenv(HUGE_PAGES_MARKER, name, 1) == 0)
        execv("/proc/self/exe", argv);
    unsetenv(HUGE_PAGES_MARKER);
    if (saved)
        setenv("GLIBC_TUNABLES", saved, 1);
    else
        unsetenv("GLIBC_TUNABLES");
    free(saved);
    return "off (re-exec failed)";
#else
    (void)argv;
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
        return "all";
    }
    g_mode = CM_HUGE_OFF;
    if (mode == CM_HUGE_ALL)
        return start_all(argv);
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
    return "loop (tables only: a sanitizer's allocator)";
#else
    return "loop";
#endif
#else
    (void)mode;
    (void)argv;
    return "off (not glibc on Linux)";
#endif
}

void cm_heap_grown(void)
{
#ifdef __linux__
    if (g_mode != CM_HUGE_LOOP)
        return;
    /* sbrk(0) reads glibc's cached break: no system call. */
    uintptr_t cur = page_down((uintptr_t)sbrk(0));
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
#endif
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
