/*
 * ctl_watch.c - `clickmartctl watch`. See ctl_watch.h and docs/status.md.
 *
 * Every interval it fetches /status once and compares it with the previous
 * sample: rates are differences of the daemon's running totals divided by
 * the difference of its uptime (so a slow answer does not skew them). On a
 * terminal it draws a full screen (alternate screen buffer, cleared and
 * redrawn each time) and reads single keys; elsewhere it prints one
 * key=value line per sample, for logs and pipes.
 */
#include "tools/ctl_watch.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>

#include <jansson.h>

static volatile sig_atomic_t g_stop;
static struct termios g_saved;
static int g_raw;    /* stdin is in non-canonical mode */
static int g_screen; /* the alternate screen is on */

static void on_signal(int s)
{
    (void)s;
    g_stop = 1;
}

static void restore_terminal(void)
{
    if (g_screen) {
        fputs("\033[?25h\033[?1049l", stdout); /* cursor back, leave the alternate screen */
        fflush(stdout);
        g_screen = 0;
    }
    if (g_raw) {
        tcsetattr(STDIN_FILENO, TCSAFLUSH, &g_saved);
        g_raw = 0;
    }
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double num(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

/* Strings from the daemon may hold anything; never send control characters to a terminal. */
static const char *str(json_t *o, const char *k, char *buf, size_t cap)
{
    json_t *v = json_object_get(o, k);
    if (!json_is_string(v))
        return "-";
    snprintf(buf, cap, "%s", json_string_value(v));
    for (char *p = buf; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = ' ';
    return buf;
}

static const char *fmt_num(char *b, size_t n, double v)
{
    if (isnan(v))
        return "-";
    snprintf(b, n, "%.0f", v);
    return b;
}

static const char *fmt_rate(char *b, size_t n, double v)
{
    if (isnan(v))
        return "-";
    snprintf(b, n, "%.1f", v);
    return b;
}

static const char *fmt_dur(char *b, size_t n, double s)
{
    if (isnan(s) || s < 0)
        return "-";
    if (s < 60)
        snprintf(b, n, "%.1f s", s);
    else if (s < 3600)
        snprintf(b, n, "%dm %02ds", (int)(s / 60), (int)fmod(s, 60));
    else if (s < 86400)
        snprintf(b, n, "%dh %02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    else
        snprintf(b, n, "%dd %02dh", (int)(s / 86400), (int)fmod(s / 3600, 24));
    return b;
}

static const char *fmt_bytes(char *b, size_t n, double v)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    if (isnan(v))
        return "-";
    int u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        u++;
    }
    snprintf(b, n, u ? "%.1f %s" : "%.0f %s", v, units[u]);
    return b;
}

/* The rate of a running total between two samples; NAN without a previous sample. */
static double rate_of(json_t *cur, json_t *prev, double dt, const char *obj, const char *key)
{
    if (!prev || !(dt > 0))
        return NAN;
    json_t *c = obj ? json_object_get(cur, obj) : cur, *p = obj ? json_object_get(prev, obj) : prev;
    double a = num(c, key), b = num(p, key);
    if (isnan(a) || isnan(b) || a < b)
        return NAN;
    return (a - b) / dt;
}

static json_t *find_partition(json_t *parts, json_int_t p)
{
    size_t i;
    json_t *v;
    json_array_foreach(parts, i, v)
    {
        json_t *id = json_object_get(v, "partition");
        if (json_is_integer(id) && json_integer_value(id) == p)
            return v;
    }
    return NULL;
}

static void utc_now(char *b, size_t n, int compact)
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(b, n, compact ? "%Y-%m-%dT%H:%M:%SZ" : "%Y-%m-%d %H:%M:%S UTC", &tm);
}

/* One key=value line per sample (stdout is not a terminal). */
static void print_line(FILE *out, json_t *st, json_t *prev, double dt)
{
    char ts[32], b[13][48];
    utc_now(ts, sizeof ts, 1);
    json_t *fl = json_object_get(st, "flush"), *state = json_object_get(st, "state");
    double ls = num(st, "lag_seconds");
    if (!isnan(ls))
        snprintf(b[7], sizeof b[7], "%.1f", ls);
    fprintf(out,
            "ts=%s messages=%s rate=%s accepted=%s accepted_rate=%s duplicates=%s rejected=%s "
            "lag=%s lag_seconds=%s flushes=%s flush_failures=%s rows_written=%s rows_rate=%s "
            "pending_rows=%s paused=%d pg=%d broker=%d healthy=%d\n",
            ts, fmt_num(b[0], sizeof b[0], num(st, "messages")),
            fmt_rate(b[1], sizeof b[1], rate_of(st, prev, dt, NULL, "messages")),
            fmt_num(b[2], sizeof b[2], num(st, "accepted")),
            fmt_rate(b[3], sizeof b[3], rate_of(st, prev, dt, NULL, "accepted")),
            fmt_num(b[4], sizeof b[4], num(st, "duplicates")),
            fmt_num(b[5], sizeof b[5], num(st, "rejected")),
            fmt_num(b[6], sizeof b[6], num(st, "lag")), isnan(ls) ? "-" : b[7],
            fmt_num(b[8], sizeof b[8], num(fl, "flushes")),
            fmt_num(b[9], sizeof b[9], num(fl, "failures")),
            fmt_num(b[10], sizeof b[10], num(fl, "rows_written")),
            fmt_rate(b[11], sizeof b[11], rate_of(st, prev, dt, "flush", "rows_written")),
            fmt_num(b[12], sizeof b[12], num(state, "dirty_rows")),
            json_is_true(json_object_get(st, "paused")),
            json_is_true(json_object_get(st, "pg_connected")),
            json_is_true(json_object_get(st, "broker_up")),
            json_is_true(json_object_get(st, "healthy")));
}

/* The full-screen view, written in one go to keep the redraw from flickering. */
static void draw_screen(json_t *st, json_t *prev, double dt, double interval, const char *problem)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *o = open_memstream(&buf, &len);
    if (!o)
        return;
    struct winsize ws;
    int rows = 24;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 0)
        rows = ws.ws_row;
    char a[128], b[128], c[128], ts[40];
    int used = 0;
    utc_now(ts, sizeof ts, 0);
    fputs("\033[H\033[2J", o); /* home, clear screen */
    fprintf(o, "\033[1mclickmartd %s\033[0m  topic %s  up %s  %s  (every %g s, q quits)\n",
            str(st, "version", a, sizeof a), str(st, "topic", b, sizeof b),
            fmt_dur(c, sizeof c, num(st, "uptime_s")), ts, interval);
    int healthy = json_is_true(json_object_get(st, "healthy"));
    fprintf(o, "%s%s\033[0m | postgres %s | broker %s | intake %s%s\n",
            healthy ? "\033[32mhealthy" : "\033[31munhealthy: ",
            healthy ? "" : str(st, "health", a, sizeof a),
            json_is_true(json_object_get(st, "pg_connected")) ? "up" : "DOWN",
            json_is_true(json_object_get(st, "broker_up")) ? "up" : "DOWN",
            json_is_true(json_object_get(st, "paused")) ? "PAUSED" : "consuming",
            json_is_true(json_object_get(st, "paused_backpressure")) ? " (back-pressure)" : "");
    used += 2;
    if (problem) {
        fprintf(o, "\033[31m%s\033[0m\n", problem);
        used++;
    }
    fprintf(o, "\n%-12s %14s %12s\n", "", "total", "per second");
    static const char *const keys[] = {"messages", "accepted", "duplicates", "rejected"};
    for (int i = 0; i < 4; i++)
        fprintf(o, "%-12s %14s %12s\n", keys[i], fmt_num(a, sizeof a, num(st, keys[i])),
                fmt_rate(b, sizeof b, rate_of(st, prev, dt, NULL, keys[i])));
    double lag = num(st, "lag"), plag = prev ? num(prev, "lag") : NAN;
    fprintf(o, "%-12s %14s %12s  (change; negative: catching up)\n", "lag (msgs)",
            fmt_num(a, sizeof a, lag),
            isnan(plag) || !(dt > 0) ? "-"
                                     : (snprintf(b, sizeof b, "%+.1f", (lag - plag) / dt), b));
    fprintf(o, "%-12s %14s  (now - watermark)\n", "event lag",
            fmt_dur(a, sizeof a, num(st, "lag_seconds")));
    used += 8;
    json_t *fl = json_object_get(st, "flush"), *state = json_object_get(st, "state");
    double last_at = num(fl, "last_at");
    double ago = isnan(last_at) ? NAN : (double)time(NULL) - last_at / 1000.0;
    char d1[64], d2[64];
    fprintf(o, "\n%-12s %s ok, %s failed; last %s ago, %s rows in %s ms%s\n", "flushes",
            fmt_num(a, sizeof a, num(fl, "flushes")), fmt_num(b, sizeof b, num(fl, "failures")),
            fmt_dur(c, sizeof c, ago < 0 ? 0 : ago), fmt_num(d1, sizeof d1, num(fl, "last_rows")),
            fmt_num(d2, sizeof d2, num(fl, "last_duration_ms")),
            json_is_true(json_object_get(fl, "in_flight")) ? " (one running)" : "");
    fprintf(o, "%-12s %14s %12s\n", "rows written", fmt_num(a, sizeof a, num(fl, "rows_written")),
            fmt_rate(b, sizeof b, rate_of(st, prev, dt, "flush", "rows_written")));
    fprintf(o, "%-12s %s of %s map, %s rows pending\n", "state",
            fmt_bytes(a, sizeof a, num(state, "bytes")),
            fmt_bytes(b, sizeof b, num(state, "map_size")),
            fmt_num(c, sizeof c, num(state, "dirty_rows")));
    used += 4;
    if (json_is_string(json_object_get(fl, "last_error"))) {
        char err[256];
        fprintf(o, "%-12s %s\n", "last error", str(fl, "last_error", err, sizeof err));
        used++;
    }
    json_t *parts = json_object_get(st, "partitions");
    size_t np = json_array_size(parts);
    fprintf(o, "\n%9s %12s %12s %10s %10s %10s\n", "PARTITION", "NEXT_OFFSET", "END_OFFSET", "LAG",
            "MSGS/S", "EVENT_LAG");
    used += 2;
    int room = rows - used - 2;
    if (room < 1)
        room = 1;
    size_t i;
    json_t *p;
    json_array_foreach(parts, i, p)
    {
        if ((int)i >= room && np > i + 1) {
            fprintf(o, "... %zu more partitions (a taller terminal shows them)\n", np - i);
            break;
        }
        json_t *pp = prev ? find_partition(json_object_get(prev, "partitions"),
                                           json_integer_value(json_object_get(p, "partition")))
                          : NULL;
        double r = NAN;
        if (pp && dt > 0) {
            double x = num(p, "next_offset"), y = num(pp, "next_offset");
            if (!isnan(x) && !isnan(y) && x >= y)
                r = (x - y) / dt;
        }
        fprintf(o, "%9s %12s %12s %10s %10s %10s\n", fmt_num(a, sizeof a, num(p, "partition")),
                fmt_num(b, sizeof b, num(p, "next_offset")),
                fmt_num(c, sizeof c, num(p, "end_offset")), fmt_num(ts, sizeof ts, num(p, "lag")),
                fmt_rate(d1, sizeof d1, r), fmt_dur(d2, sizeof d2, num(p, "lag_seconds")));
    }
    fclose(o);
    fwrite(buf, 1, len, stdout);
    fflush(stdout);
    free(buf);
}

/* Wait up to `secs`, returning early on a signal or (with keys) on q. */
static void wait_or_key(double secs, int keys)
{
    double end = mono_s() + secs;
    while (!g_stop) {
        double left = end - mono_s();
        if (left <= 0)
            return;
        if (keys) {
            struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
            int r = poll(&pfd, 1, (int)(left * 1000) + 1);
            if (r > 0) {
                char ch[16];
                ssize_t n = read(STDIN_FILENO, ch, sizeof ch);
                if (n <= 0) {
                    keys = 0; /* stdin closed: keep sampling, stop reading */
                    continue;
                }
                for (ssize_t k = 0; k < n; k++)
                    if (ch[k] == 'q' || ch[k] == 'Q' || ch[k] == 3 /* ^C without ISIG */)
                        g_stop = 1;
            }
        } else {
            struct timespec ts = {(time_t)left, (long)((left - floor(left)) * 1e9)};
            nanosleep(&ts, NULL); /* EINTR on a signal: the loop checks g_stop */
        }
    }
}

int ctl_watch(const char *sock, double interval_s, long count, ctl_fetch_fn fetch)
{
    int tty = isatty(STDOUT_FILENO);
    int keys = tty && isatty(STDIN_FILENO);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: poll and nanosleep return at once */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    atexit(restore_terminal);

    json_t *prev = NULL;
    double prev_up = NAN;
    long n = 0;
    int rc = 0;
    while (!g_stop) {
        char *body = NULL;
        size_t len = 0;
        int status = 0;
        int fr = fetch(sock, "/status", &body, &len, &status);
        json_t *st = NULL;
        const char *problem = NULL;
        if (fr == 0 && status == 200) {
            st = json_loadb(body, len, 0, NULL);
            if (!json_is_object(st)) {
                json_decref(st);
                st = NULL;
                fr = 1;
                problem = "unreadable /status answer (retrying)";
            }
        } else if (fr == 0) {
            fr = 1;
            problem = "/status answered an error status (retrying)";
        } else {
            problem = "clickmartd unreachable (retrying)";
        }
        free(body);
        if (!st && n == 0) {
            rc = fr; /* the daemon could not be reached or read at all */
            break;
        }
        /* Set up the terminal only once the daemon answered. */
        if (tty && !g_screen) {
            if (keys && tcgetattr(STDIN_FILENO, &g_saved) == 0) {
                struct termios raw = g_saved;
                raw.c_lflag &= (tcflag_t) ~(ICANON | ECHO);
                raw.c_cc[VMIN] = 0;
                raw.c_cc[VTIME] = 0;
                if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &raw) == 0)
                    g_raw = 1;
            }
            fputs("\033[?1049h\033[?25l", stdout); /* alternate screen, hide the cursor */
            g_screen = 1;
        }
        if (st) {
            double up = num(st, "uptime_s");
            double dt = up - prev_up;
            /* A restarted daemon starts its totals over: no rates for that step. */
            if (prev && (isnan(dt) || dt <= 0 || num(st, "messages") < num(prev, "messages"))) {
                json_decref(prev);
                prev = NULL;
            }
            if (tty)
                draw_screen(st, prev, dt, interval_s, NULL);
            else
                print_line(stdout, st, prev, dt);
            json_decref(prev);
            prev = st;
            prev_up = up;
        } else if (tty) {
            fprintf(stdout, "\033[H\033[31m%s\033[0m\033[K\n", problem);
        } else {
            char ts[32];
            utc_now(ts, sizeof ts, 1);
            fprintf(stdout, "ts=%s error=\"%s\"\n", ts, problem);
        }
        if (fflush(stdout) != 0 || ferror(stdout)) {
            rc = errno == EPIPE ? 0 : 1; /* e.g. `watch | head`: the reader is gone */
            break;
        }
        n++;
        if (count > 0 && n >= count)
            break;
        wait_or_key(interval_s, keys);
    }
    json_decref(prev);
    restore_terminal();
    return rc;
}
