/*
 * ctl_watch.h - `clickmartctl watch`: a refreshing view of a running
 * clickmartd (rates, lag, flushes), like top. See docs/status.md.
 */
#ifndef CLICKMART_TOOLS_CTL_WATCH_H
#define CLICKMART_TOOLS_CTL_WATCH_H

#include <stddef.h>

/*
 * Fetch `target` from the daemon: 0 with a malloc'ed NUL-terminated body and
 * the HTTP status, or clickmartctl's exit code (2 unreachable, 1 bad answer)
 * after printing why on stderr.
 */
typedef int (*ctl_fetch_fn)(const char *sock, const char *target, char **body, size_t *len,
                            int *status);

/*
 * Sample /status every `interval_s` seconds and show it: on a terminal a
 * full-screen view redrawn in place (q, Ctrl-C or SIGTERM quit), otherwise
 * one key=value line per sample. Stops after `count` samples when count > 0.
 * Returns 0 when it ended normally, 2 when the daemon could not be reached
 * for the first sample, 1 on an unreadable first answer.
 */
int ctl_watch(const char *sock, double interval_s, long count, ctl_fetch_fn fetch);

#endif
