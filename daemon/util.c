/*
 * util.c - logging and clocks. See util.h.
 */
#include "daemon/util.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static int g_level = CM_LOG_INFO;
static int g_json = 0;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int cm_log_level_from(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

void cm_log_set_level(int level)
{
    g_level = level;
}

void cm_log_set_json(int on)
{
    g_json = on;
}

int cm_log_enabled(int level)
{
    return level <= g_level;
}

int64_t cm_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double cm_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

void cm_fmt_ts(int64_t ms, char *buf, size_t cap)
{
    time_t secs = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
    int frac = (int)(ms - (int64_t)secs * 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    /* Formatted into a buffer wide enough for any int so that the copy,
     * not the formatting, is what a small caller buffer cuts. */
    char tmp[112];
    snprintf(tmp, sizeof tmp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
    if (cap == 0)
        return;
    size_t n = strlen(tmp);
    if (n >= cap)
        n = cap - 1;
    memcpy(buf, tmp, n);
    buf[n] = '\0';
}

/*
 * Returns the length of the well-formed UTF-8 sequence at s[0..n), or 0 if
 * none starts there; in that case *bad is the length of the maximal invalid
 * subpart (at least 1), which the caller replaces with a single U+FFFD, as
 * the Unicode standard recommends ("U+FFFD substitution of maximal
 * subparts"). The bounds on the second byte follow Table 3-7 of the
 * standard, which rules out overlong forms, surrogates (ED A0..BF) and code
 * points above U+10FFFF in one place; a sequence cut short by the end of the
 * input is a maximal subpart like any other. NUL is treated as invalid
 * because Postgres text cannot hold it.
 */
size_t cm_utf8_seq(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned c = s[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;

    *bad = 1;
    if (c >= 0x01 && c <= 0x7F)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        /* NUL, a stray continuation byte, C0/C1 (always overlong) or F5..FF. */
        return 0;
    }
    for (size_t i = 1; i < need; i++) {
        if (i >= n) {
            *bad = i;
            return 0;
        }
        unsigned x = s[i];
        unsigned l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (x < l || x > h) {
            *bad = i;
            return 0;
        }
    }
    return need;
}

/* Append a JSON-escaped copy of s[0..n) to out. */
static size_t json_escape(char *out, size_t cap, size_t pos, const char *s, size_t n)
{
    for (size_t i = 0; i < n && pos + 7 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            out[pos++] = '\\';
            out[pos++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            pos += (size_t)snprintf(out + pos, cap - pos, "\\u%04x", c);
        } else if (c >= 0x80) {
            /* Copy a well-formed UTF-8 sequence; anything else becomes U+FFFD, so that
             * every line stays valid JSON whatever bytes a message carried. */
            size_t bad;
            size_t len = cm_utf8_seq((const unsigned char *)s + i, n - i, &bad);
            if (len > 0) {
                memcpy(out + pos, s + i, len);
                pos += len;
                i += len - 1;
            } else {
                pos += (size_t)snprintf(out + pos, cap - pos, "\\ufffd");
            }
        } else {
            out[pos++] = (char)c;
        }
    }
    return pos;
}

/*
 * Where the value that starts at v (just after a key's '=') ends, and in
 * *quoted whether it is a "quoted value". Callers write key="%s" around
 * text that may hold spaces, '=' and quotes of its own (a conninfo, a
 * libpq error): such a value runs to the quote that ends the string or
 * comes before the next " key=". An unquoted value runs to the next
 * " key=", so it may hold spaces only when it is the last pair. The end
 * returned is just past the closing quote of a quoted value.
 */
static const char *pair_end(const char *v, int *quoted)
{
    *quoted = 0;
    if (*v == '"') {
        for (const char *q = v + 1; *q; q++) {
            if (*q != '"')
                continue;
            const char *k = q + 1;
            if (*k == '\0') {
                *quoted = 1;
                return k;
            }
            if (*k == ' ') {
                k++;
                while (*k && *k != ' ' && *k != '=' && *k != '"')
                    k++;
                if (*k == '=' && k > q + 2) {
                    *quoted = 1;
                    return q + 1;
                }
            }
        }
    }
    for (const char *q = v; *q; q++) {
        if (*q == ' ') {
            const char *k = q + 1;
            while (*k && *k != ' ' && *k != '=')
                k++;
            if (*k == '=')
                return q;
        }
    }
    return v + strlen(v);
}

/* Turn "a=1 b=two words?" style pairs into JSON fields (pair_end); the
 * quotes of a quoted value are not part of the JSON string. */
static size_t pairs_to_json(char *out, size_t cap, size_t pos, const char *pairs)
{
    const char *p = pairs;
    while (*p && pos + 16 < cap) {
        while (*p == ' ')
            p++;
        const char *eq = strchr(p, '=');
        if (!eq)
            break;
        int quoted;
        const char *end = pair_end(eq + 1, &quoted);
        out[pos++] = ',';
        out[pos++] = '"';
        pos = json_escape(out, cap, pos, p, (size_t)(eq - p));
        out[pos++] = '"';
        out[pos++] = ':';
        out[pos++] = '"';
        if (quoted)
            pos = json_escape(out, cap, pos, eq + 2, (size_t)(end - 1 - (eq + 2)));
        else
            pos = json_escape(out, cap, pos, eq + 1, (size_t)(end - (eq + 1)));
        out[pos++] = '"';
        p = end;
    }
    return pos;
}

/*
 * Copy the pairs to out as logfmt: a value that holds a space, '=' or a
 * quote is written quoted, with its own quotes and backslashes escaped (\"
 * and \\), so that a logfmt reader gets the whole value back (a libpq
 * error quotes the names it cannot find); control characters become
 * spaces. Returns the new length; stops short of cap.
 */
static size_t pairs_to_logfmt(char *out, size_t cap, size_t pos, const char *pairs)
{
    const char *p = pairs;
    int first = 1;
    while (*p == ' ')
        p++;
    while (*p && pos + 8 < cap) {
        const char *eq = strchr(p, '=');
        if (!eq)
            break;
        int quoted;
        const char *end = pair_end(eq + 1, &quoted);
        const char *v = quoted ? eq + 2 : eq + 1, *ve = quoted ? end - 1 : end;
        int quote = quoted;
        for (const char *c = v; c < ve && !quote; c++)
            quote = *c == ' ' || *c == '=' || *c == '"' || (unsigned char)*c < 0x20 || *c == 0x7f;
        if (!first)
            out[pos++] = ' ';
        first = 0;
        for (const char *c = p; c <= eq && pos + 4 < cap; c++)
            out[pos++] = *c;
        if (quote)
            out[pos++] = '"';
        for (const char *c = v; c < ve && pos + 4 < cap; c++) {
            if (quote && (*c == '"' || *c == '\\'))
                out[pos++] = '\\';
            /* One line per event: a newline inside a value (libpq's
             * multi-line errors) must not start a line of its own. */
            out[pos++] = (unsigned char)*c < 0x20 || *c == 0x7f ? ' ' : *c;
        }
        if (quote)
            out[pos++] = '"';
        p = end;
        while (*p == ' ')
            p++;
    }
    /* Whatever does not read as pairs (text without '=') as it is. */
    if (*p && !first && pos + 2 < cap)
        out[pos++] = ' ';
    for (; *p && pos + 1 < cap; p++)
        out[pos++] = *p;
    return pos;
}

void cm_log(int level, const char *msg, const char *fmt, ...)
{
    if (level > g_level)
        return;
    char pairs[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pairs, sizeof pairs, fmt, ap);
    va_end(ap);
    char ts[40];
    cm_fmt_ts(cm_now_ms(), ts, sizeof ts);
    char line[4096];
    size_t pos;
    if (g_json) {
        pos = (size_t)snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"", ts,
                               level_names[level]);
        pos = json_escape(line, sizeof line, pos, msg, strlen(msg));
        line[pos++] = '"';
        pos = pairs_to_json(line, sizeof line - 4, pos, pairs);
        line[pos++] = '}';
    } else {
        pos = (size_t)snprintf(line, sizeof line, "ts=%s level=%s msg=\"%s\"%s", ts,
                               level_names[level], msg, pairs[0] ? " " : "");
        if (pos >= sizeof line - 1)
            pos = sizeof line - 2;
        pos = pairs_to_logfmt(line, sizeof line - 1, pos, pairs);
        /* One line per event: a newline inside a value (libpq's multi-line errors)
         * must not start a line of its own. */
        for (size_t i = 0; i < pos; i++)
            if ((unsigned char)line[i] < 0x20)
                line[i] = ' ';
    }
    line[pos++] = '\n';
    pthread_mutex_lock(&g_lock);
    fwrite(line, 1, pos, stderr);
    fflush(stderr);
    pthread_mutex_unlock(&g_lock);
}

size_t cm_txn_target(size_t cur, size_t base, size_t max, size_t msgs, uint64_t bytes,
                     int catching_up)
{
    if (!catching_up || max <= base || msgs == 0)
        return base;
    if (cur < base)
        cur = base;
    if (cur > max)
        cur = max;
    double bpm = (double)bytes / (double)msgs;
    if (bpm > CM_TXN_GROW_BPM)
        return cur > max / 2 ? max : cur * 2;
    if (bpm < CM_TXN_SHRINK_BPM)
        return cur / 2 < base ? base : cur / 2;
    return cur;
}

int cm_end_within(int64_t before, int64_t left, double dt_ms, double interval_ms, double share)
{
    if (left <= 0 || before <= left || dt_ms <= 0)
        return 0;
    double per_ms = (double)(before - left) / dt_ms;
    return (double)left / per_ms < share * interval_ms;
}

int cm_behind(int64_t lag, uint64_t moved, double dt_ms, double interval_ms)
{
    if (lag <= 0 || moved == 0 || dt_ms <= 0)
        return 0;
    return (double)lag * dt_ms / (double)moved > interval_ms;
}

int cm_tick_behind(int64_t left, int64_t lag, uint64_t moved, double dt_ms, double interval_ms)
{
    if (left >= 0)
        return left > 0;
    return cm_behind(lag, moved, dt_ms, interval_ms);
}

int cm_write_bytes(uint64_t *out)
{
    /* The calling thread's own writes where the kernel tells them apart
     * (Linux 3.17), so that other threads' log lines do not count. */
    FILE *f = fopen("/proc/thread-self/io", "r");
    if (!f)
        f = fopen("/proc/self/io", "r");
    if (!f)
        return -errno;
    char line[128];
    int r = -ENOENT;
    while (fgets(line, sizeof line, f)) {
        unsigned long long v;
        if (sscanf(line, "wchar: %llu", &v) == 1) {
            *out = (uint64_t)v;
            r = 0;
            break;
        }
    }
    fclose(f);
    return r;
}
