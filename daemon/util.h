/*
 * util.h - logging, clocks and UTF-8 checks shared by the daemon and the tools.
 *
 * Logging writes one line per event as key=value fields (or JSON with
 * cm_log_set_json), to stderr, under a mutex so that lines from the flush
 * thread and the loop thread never interleave. Thread-safe.
 */
#ifndef CLICKMART_DAEMON_UTIL_H
#define CLICKMART_DAEMON_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

enum cm_log_level { CM_LOG_ERROR = 0, CM_LOG_WARN, CM_LOG_INFO, CM_LOG_DEBUG };

/* Parse "error", "warn", "info" or "debug"; -1 when unknown. */
int cm_log_level_from(const char *s);
void cm_log_set_level(int level);
void cm_log_set_json(int on);
int cm_log_enabled(int level);

/*
 * Log one line: `msg` is a short fixed text, `fmt` adds key=value pairs
 * (printf-style, e.g. "partition=%d offset=%lld"). In JSON mode the pairs
 * are turned into JSON fields. Thread-safe.
 */
void cm_log(int level, const char *msg, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define cm_err(msg, ...) cm_log(CM_LOG_ERROR, msg, __VA_ARGS__)
#define cm_warn(msg, ...) cm_log(CM_LOG_WARN, msg, __VA_ARGS__)
#define cm_info(msg, ...) cm_log(CM_LOG_INFO, msg, __VA_ARGS__)
#define cm_debug(msg, ...)                                                                         \
    do {                                                                                           \
        if (cm_log_enabled(CM_LOG_DEBUG))                                                          \
            cm_log(CM_LOG_DEBUG, msg, __VA_ARGS__);                                                \
    } while (0)

/* Wall clock in ms since the epoch. */
int64_t cm_now_ms(void);
/* Monotonic clock in ms (for durations and timers). */
double cm_mono_ms(void);

/* Format ms since the epoch as "YYYY-MM-DDTHH:MM:SS.mmmZ" into buf (>= 32 bytes). */
void cm_fmt_ts(int64_t ms, char *buf, size_t cap);

/*
 * Length of the well-formed UTF-8 sequence at s[0..n) (n >= 1), or 0 when
 * none starts there: no overlong forms, no UTF-16 surrogate halves, nothing
 * above U+10FFFF, and NUL counts as invalid. On 0, *bad is the length of the
 * maximal invalid subpart (at least 1), for a caller that replaces it with
 * one U+FFFD. Any thread.
 */
size_t cm_utf8_seq(const unsigned char *s, size_t n, size_t *bad);

/*
 * Bytes passed to write calls per message of a commit above which, while
 * intake catches up, transactions gather twice the messages (CM_TXN_GROW_BPM),
 * and below which they halve again (CM_TXN_SHRINK_BPM). docs/operations.md,
 * "Transactions that grow with the state".
 */
#define CM_TXN_GROW_BPM 600.0
#define CM_TXN_SHRINK_BPM 200.0

/*
 * The message count after which the next LMDB transaction commits, given the
 * current one (cur), --txn-messages (base), --txn-messages-max (max), and the
 * commit just made: its messages and the bytes it passed to write calls. Not
 * catching up, or max <= base: base. Catching up: twice cur (at most max)
 * when the commit wrote more than CM_TXN_GROW_BPM per message, half of it (at
 * least base) when less than CM_TXN_SHRINK_BPM, else cur. Pure; any thread.
 */
size_t cm_txn_target(size_t cur, size_t base, size_t max, size_t msgs, uint64_t bytes,
                     int catching_up);

/*
 * Whether the end offsets of --exit-at-end come within share * interval_ms
 * at the pace of the last interval: `before` messages were left at the last
 * tick, `left` now, dt_ms later. 0 when nothing is left or nothing moved
 * (no pace to go by). Pure; any thread.
 */
int cm_end_within(int64_t before, int64_t left, double dt_ms, double interval_ms, double share);

/*
 * Whether intake is behind by more than interval_ms: `lag` messages behind
 * the end offsets at the pace of the last interval (`moved` messages in
 * dt_ms). 0 without a pace (nothing moved). Pure; any thread.
 */
int cm_behind(int64_t lag, uint64_t moved, double dt_ms, double interval_ms);

/*
 * Whether a tick counts intake as behind for --catchup-flush-interval-ms.
 * With --exit-at-end (`left` >= 0, the messages left to the end offsets)
 * the whole run is a backfill: behind while anything is left, whatever the
 * pace, since the final flush follows the end. (By the pace alone, a tick
 * less than an interval from the end but not within the end rule's share
 * of one, or one after a stalled interval, would flush shortly before the
 * final flush and write the per-user rows twice.) Otherwise (`left` < 0)
 * cm_behind on the consumer `lag`. Pure; any thread.
 */
int cm_tick_behind(int64_t left, int64_t lag, uint64_t moved, double dt_ms, double interval_ms);

/*
 * Bytes the calling thread has passed to write calls so far (the wchar line
 * of /proc/thread-self/io; of the whole process, /proc/self/io, on kernels
 * before 3.17) in *out. 0, or a negative errno where the kernel does not
 * tell (then the caller keeps its transactions at --txn-messages).
 */
int cm_write_bytes(uint64_t *out);

#endif
