/*
 * clickmartctl: ask a running clickmartd how it is doing, over its status socket.
 *
 *     clickmartctl [--socket PATH] status|metrics|health
 *     clickmartctl [--socket PATH] watch [--interval SECONDS] [--count N]   (tools/ctl_watch.c)
 *
 * It speaks just enough HTTP/1.1 over a Unix socket to send one request with "Connection: close"
 * and read one response, with plain POSIX sockets so that it has no event loop and starts fast
 * enough to be called from health checks and shell loops. See docs/status.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include <jansson.h>

#include "tools/ctl_watch.h"

#define DEFAULT_SOCKET "/run/clickmart/clickmartd.sock"
/* A daemon that accepts but never answers must not hang a health check forever. */
#define IO_TIMEOUT_S 5
/* The daemon's answers are small; anything far bigger is not the daemon talking. */
#define MAX_RESPONSE (16u << 20)

/* Exit codes; documented in usage() and docs/status.md. */
#define EXIT_OK 0
#define EXIT_BAD 1         /* unhealthy, or an error/unexpected answer */
#define EXIT_UNREACHABLE 2 /* the daemon could not be reached or did not answer */
#define EXIT_USAGE 64

typedef struct response {
    int status;
    char *raw;        /* the whole response, NUL-terminated */
    const char *body; /* points into raw */
    size_t body_len;
} response_t;

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: clickmartctl [--socket PATH] COMMAND\n"
            "       clickmartctl [--socket PATH] watch [--interval SECONDS] [--count N]\n"
            "\n"
            "Queries a running clickmartd over its status socket.\n"
            "\n"
            "Commands:\n"
            "  status    show topic, progress per partition, flushes and state size\n"
            "  metrics   print the Prometheus metrics (GET /metrics) as they are\n"
            "  health    print the health check answer (GET /healthz)\n"
            "  watch     a refreshing view of rates, lag and flushes, like top (q or\n"
            "            Ctrl-C quits); when stdout is not a terminal, one key=value\n"
            "            line per sample\n"
            "\n"
            "Options:\n"
            "  --socket PATH       status socket of the daemon (default %s)\n"
            "  --interval SECONDS  watch: time between samples (default 2, 0.1..3600)\n"
            "  --count N           watch: stop after N samples (default 0: until q/Ctrl-C)\n"
            "  --help              show this help and exit\n"
            "\n"
            "Exit codes:\n"
            "  0    success; for health: the daemon is healthy (HTTP 200)\n"
            "  1    health: the daemon is unhealthy (HTTP 503) or answered another status;\n"
            "       status/metrics: the daemon answered with an error or unreadable data\n"
            "  2    the daemon could not be reached (no socket, connection refused,\n"
            "       permission denied) or did not answer within %d s\n"
            "  64   usage error\n",
            DEFAULT_SOCKET, IO_TIMEOUT_S);
}

static void errmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("clickmartctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void sanitize(char *s);

/* ---- HTTP over the Unix socket ------------------------------------------------------------ */

static int connect_socket(const char *path)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t len = strlen(path);
    if (len >= sizeof sa.sun_path) {
        errmsg("socket path too long: %s", path);
        return -1;
    }
    memcpy(sa.sun_path, path, len + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        errmsg("socket: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = IO_TIMEOUT_S};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int err = errno;
        errmsg("cannot reach clickmartd at %s: %s%s", path, strerror(err),
               err == ENOENT || err == ECONNREFUSED ? " (is clickmartd running?)"
               : err == EACCES                      ? " (is this user in the daemon's group?)"
                                                    : "");
        close(fd);
        return -1;
    }
    return fd;
}

/* Find a header's value in the header block (case-insensitive name); NULL when absent. */
static const char *find_header(const char *headers, const char *end, const char *name)
{
    size_t nlen = strlen(name);
    const char *line = strstr(headers, "\r\n");
    while (line && line < end) {
        line += 2;
        if ((size_t)(end - line) > nlen && strncasecmp(line, name, nlen) == 0 &&
            line[nlen] == ':') {
            const char *v = line + nlen + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            return v;
        }
        line = strstr(line, "\r\n");
    }
    return NULL;
}

/*
 * Send "GET target" and read the response: up to Content-Length when the daemon sends one (it
 * always does), else to EOF. Returns 0, or EXIT_UNREACHABLE / EXIT_BAD after saying why.
 */
static int http_get(const char *sock, const char *target, response_t *r)
{
    memset(r, 0, sizeof *r);
    int fd = connect_socket(sock);
    if (fd < 0)
        return EXIT_UNREACHABLE;

    char req[256];
    int rlen = snprintf(req, sizeof req,
                        "GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", target);
    for (int off = 0; off < rlen;) {
        ssize_t n = send(fd, req + off, (size_t)(rlen - off), MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            errmsg("sending to %s: %s", sock, strerror(errno));
            close(fd);
            return EXIT_UNREACHABLE;
        }
        off += (int)n;
    }

    size_t cap = 8192, len = 0;
    char *buf = malloc(cap);
    size_t want = SIZE_MAX; /* total length once the headers are known */
    size_t hlen = 0;
    int rc = 0;
    while (buf && len < want) {
        if (cap - len < 4096) {
            if (cap >= MAX_RESPONSE) {
                errmsg("response from %s is too large", sock);
                rc = EXIT_BAD;
                break;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int err = errno;
            errmsg("reading from %s: %s", sock,
                   err == EAGAIN || err == EWOULDBLOCK ? "no answer (timed out)" : strerror(err));
            rc = EXIT_UNREACHABLE;
            break;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        buf[len] = '\0';
        if (hlen == 0) {
            char *end = strstr(buf, "\r\n\r\n");
            if (end) {
                hlen = (size_t)(end - buf) + 4;
                const char *cl = find_header(buf, end, "Content-Length");
                if (cl)
                    want = hlen + strtoull(cl, NULL, 10);
            }
        }
    }
    close(fd);
    if (!buf) {
        errmsg("out of memory");
        return EXIT_BAD;
    }
    if (rc != 0) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    if (len == 0) {
        /* The daemon closes connections over its limit without a word. */
        errmsg("clickmartd at %s closed the connection without answering (too many clients?)",
               sock);
        free(buf);
        return EXIT_UNREACHABLE;
    }
    if (hlen == 0 || sscanf(buf, "HTTP/1.%*1[01] %3d", &r->status) != 1) {
        errmsg("%s did not answer with HTTP", sock);
        free(buf);
        return EXIT_BAD;
    }
    if (want != SIZE_MAX && len < want) {
        errmsg("response from %s was cut short", sock);
        free(buf);
        return EXIT_BAD;
    }
    r->raw = buf;
    r->body = buf + hlen;
    r->body_len = (want != SIZE_MAX ? want : len) - hlen;
    return 0;
}

/* Report a non-200 answer with whatever the daemon said about it. */
static void report_status(const char *target, const response_t *r)
{
    char said[256];
    size_t n = r->body_len < sizeof said - 1 ? r->body_len : sizeof said - 1;
    memcpy(said, r->body, n);
    said[n] = '\0';
    sanitize(said);
    while (n > 0 && said[n - 1] == ' ')
        said[--n] = '\0';
    errmsg("GET %s answered HTTP %d%s%s", target, r->status, n ? ": " : "", said);
}

/* ---- formatting --------------------------------------------------------------------------- */

/* Strings from the daemon may hold anything; never send control characters to a terminal. */
static void sanitize(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = ' ';
}

static const char *fmt_str(char *out, size_t n, json_t *v)
{
    if (!json_is_string(v))
        return "-";
    snprintf(out, n, "%s", json_string_value(v));
    sanitize(out);
    return out;
}

static const char *fmt_int(char *out, size_t n, json_t *v)
{
    if (json_is_integer(v))
        snprintf(out, n, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else if (json_is_real(v))
        snprintf(out, n, "%.0f", json_real_value(v));
    else
        return "-";
    return out;
}

static const char *fmt_bool(json_t *v, const char *yes, const char *no)
{
    if (json_is_true(v))
        return yes;
    if (json_is_false(v))
        return no;
    return "-";
}

/* Milliseconds since the epoch as an ISO 8601 UTC time. */
static const char *fmt_ms(char *out, size_t n, json_t *v)
{
    if (!json_is_number(v))
        return "-";
    double ms = json_number_value(v);
    if (ms < 0 || ms > 253402300799999.0)
        return "-";
    int64_t msi = (int64_t)ms;
    time_t secs = (time_t)(msi / 1000);
    struct tm tm;
    if (!gmtime_r(&secs, &tm))
        return "-";
    char base[32];
    strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, n, "%s.%03dZ", base, (int)(msi % 1000));
    return out;
}

static const char *fmt_duration(char *out, size_t n, json_t *v)
{
    if (!json_is_number(v))
        return "-";
    double s = json_number_value(v);
    if (s < 0)
        return "-";
    if (s < 60) {
        snprintf(out, n, "%.1f s", s);
        return out;
    }
    uint64_t t = (uint64_t)s;
    unsigned d = (unsigned)(t / 86400), h = (unsigned)(t / 3600 % 24), m = (unsigned)(t / 60 % 60),
             sec = (unsigned)(t % 60);
    if (d > 0)
        snprintf(out, n, "%ud %02uh %02um %02us", d, h, m, sec);
    else if (h > 0)
        snprintf(out, n, "%uh %02um %02us", h, m, sec);
    else
        snprintf(out, n, "%um %02us", m, sec);
    return out;
}

static const char *fmt_bytes(char *out, size_t n, json_t *v)
{
    if (!json_is_number(v))
        return "-";
    double b = json_number_value(v);
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    unsigned u = 0;
    while (b >= 1024 && u + 1 < sizeof units / sizeof units[0]) {
        b /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(out, n, "%.0f B", b);
    else
        snprintf(out, n, "%.1f %s", b, units[u]);
    return out;
}

static const char *fmt_ms_duration(char *out, size_t n, json_t *v)
{
    if (!json_is_number(v))
        return "-";
    snprintf(out, n, "%.1f ms", json_number_value(v));
    return out;
}

/* ---- commands ----------------------------------------------------------------------------- */

#define NCOLS 8

static void print_partitions(json_t *parts)
{
    static const char *heads[NCOLS] = {"PARTITION",       "NEXT_OFFSET", "END_OFFSET", "LAG",
                                       "WATERMARK (UTC)", "ACCEPTED",    "DUPLICATES", "REJECTED"};
    static const char *keys[NCOLS] = {"partition", "next_offset", "end_offset", "lag",
                                      "watermark", "accepted",    "duplicates", "rejected"};
    size_t rows = json_array_size(parts);
    if (rows == 0) {
        printf("partitions   -\n");
        return;
    }
    char(*cells)[NCOLS][40] = calloc(rows, sizeof *cells);
    if (!cells) {
        errmsg("out of memory");
        return;
    }
    int width[NCOLS];
    for (int c = 0; c < NCOLS; c++)
        width[c] = (int)strlen(heads[c]);
    for (size_t r = 0; r < rows; r++) {
        json_t *p = json_array_get(parts, r);
        for (int c = 0; c < NCOLS; c++) {
            json_t *v = json_object_get(p, keys[c]);
            const char *s = c == 4 ? fmt_ms(cells[r][c], sizeof cells[r][c], v)
                                   : fmt_int(cells[r][c], sizeof cells[r][c], v);
            if (s != cells[r][c])
                snprintf(cells[r][c], sizeof cells[r][c], "%s", s);
            int w = (int)strlen(cells[r][c]);
            if (w > width[c])
                width[c] = w;
        }
    }
    /* Numbers are right-aligned, the timestamp left-aligned, two spaces between columns. */
    for (int c = 0; c < NCOLS; c++)
        printf(c == 4 ? "%-*s%s" : "%*s%s", width[c], heads[c], c + 1 < NCOLS ? "  " : "\n");
    for (size_t r = 0; r < rows; r++)
        for (int c = 0; c < NCOLS; c++)
            printf(c == 4 ? "%-*s%s" : "%*s%s", width[c], cells[r][c], c + 1 < NCOLS ? "  " : "\n");
    free(cells);
}

/* True when the daemon sent this field; optional extras are only shown when present. */
static bool has(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return v && !json_is_null(v);
}

static void print_status(json_t *st)
{
    char a[128], b[128], c[128];

    printf("topic        %s\n", fmt_str(a, sizeof a, json_object_get(st, "topic")));
    printf("version      %s\n", fmt_str(a, sizeof a, json_object_get(st, "version")));
    printf("uptime       %s\n", fmt_duration(a, sizeof a, json_object_get(st, "uptime_s")));
    if (has(st, "healthy"))
        printf("healthy      %s\n", fmt_bool(json_object_get(st, "healthy"), "yes", "no"));
    printf("paused       %s%s\n", fmt_bool(json_object_get(st, "paused"), "yes", "no"),
           json_is_true(json_object_get(st, "paused_backpressure")) ? " (back-pressure)" : "");
    printf("postgres     %s\n",
           fmt_bool(json_object_get(st, "pg_connected"), "connected", "disconnected"));
    if (has(st, "broker_up"))
        printf("broker       %s\n", fmt_bool(json_object_get(st, "broker_up"), "up", "down"));
    if (json_is_true(json_object_get(st, "stopping")))
        printf("stopping     yes\n");

    printf("accepted     %s\n", fmt_int(a, sizeof a, json_object_get(st, "accepted")));
    printf("duplicates   %s\n", fmt_int(a, sizeof a, json_object_get(st, "duplicates")));
    printf("rejected     %s", fmt_int(a, sizeof a, json_object_get(st, "rejected")));
    /* The daemon lists every reason; the ones that never happened are noise here. */
    json_t *reasons = json_object_get(st, "rejects_by_reason");
    const char *key;
    json_t *v;
    const char *sep = " (";
    json_object_foreach(reasons, key, v)
    {
        if (json_is_number(v) && json_number_value(v) == 0)
            continue;
        snprintf(b, sizeof b, "%s", key);
        sanitize(b);
        printf("%s%s %s", sep, b, fmt_int(a, sizeof a, v));
        sep = ", ";
    }
    printf("%s\n", sep[0] == ',' ? ")" : "");
    if (has(st, "lag"))
        printf("lag          %s\n", fmt_int(a, sizeof a, json_object_get(st, "lag")));
    printf("\n");

    print_partitions(json_object_get(st, "partitions"));
    printf("\n");

    json_t *fl = json_object_get(st, "flush");
    if (json_is_number(json_object_get(fl, "last_at")))
        printf("last flush   %s, %s, %s rows%s\n",
               fmt_ms(a, sizeof a, json_object_get(fl, "last_at")),
               fmt_ms_duration(b, sizeof b, json_object_get(fl, "last_duration_ms")),
               fmt_int(c, sizeof c, json_object_get(fl, "last_rows")),
               json_is_true(json_object_get(fl, "in_flight")) ? " (next one running)" : "");
    else
        printf("last flush   -%s\n",
               json_is_true(json_object_get(fl, "in_flight")) ? " (first one running)" : "");
    if (has(fl, "flushes"))
        printf("flushes      %s\n", fmt_int(a, sizeof a, json_object_get(fl, "flushes")));
    printf("failures     %s\n", fmt_int(a, sizeof a, json_object_get(fl, "failures")));
    char err[512];
    printf("last error   %s\n", fmt_str(err, sizeof err, json_object_get(fl, "last_error")));

    json_t *state = json_object_get(st, "state");
    if (!json_is_object(state)) {
        printf("state        -\n");
        return;
    }
    printf("state        %s of %s map, %s dirty rows\n",
           fmt_bytes(a, sizeof a, json_object_get(state, "bytes")),
           fmt_bytes(b, sizeof b, json_object_get(state, "map_size")),
           fmt_int(c, sizeof c, json_object_get(state, "dirty_rows")));
}

static int cmd_status(const char *sock)
{
    response_t r;
    int rc = http_get(sock, "/status", &r);
    if (rc != 0)
        return rc;
    if (r.status != 200) {
        report_status("/status", &r);
        free(r.raw);
        return EXIT_BAD;
    }
    json_error_t jerr;
    json_t *st = json_loadb(r.body, r.body_len, 0, &jerr);
    free(r.raw);
    if (!json_is_object(st)) {
        errmsg("unreadable status JSON: %s", st ? "not an object" : jerr.text);
        json_decref(st);
        return EXIT_BAD;
    }
    print_status(st);
    json_decref(st);
    return fflush(stdout) == 0 ? EXIT_OK : EXIT_BAD;
}

static int cmd_metrics(const char *sock)
{
    response_t r;
    int rc = http_get(sock, "/metrics", &r);
    if (rc != 0)
        return rc;
    if (r.status != 200) {
        report_status("/metrics", &r);
        free(r.raw);
        return EXIT_BAD;
    }
    fwrite(r.body, 1, r.body_len, stdout);
    free(r.raw);
    return fflush(stdout) == 0 ? EXIT_OK : EXIT_BAD;
}

/* ctl_watch's fetch: the body of one GET as a malloc'ed string, with the HTTP status. */
static int fetch_body(const char *sock, const char *target, char **body, size_t *len, int *status)
{
    response_t r;
    int rc = http_get(sock, target, &r);
    if (rc != 0)
        return rc;
    *status = r.status;
    *len = r.body_len;
    *body = malloc(r.body_len + 1);
    if (!*body) {
        free(r.raw);
        errmsg("out of memory");
        return EXIT_BAD;
    }
    memcpy(*body, r.body, r.body_len);
    (*body)[r.body_len] = '\0';
    free(r.raw);
    return 0;
}

/* A number option's value: --name VALUE or --name=VALUE; -1 on a usage error. */
static int opt_value(int argc, char **argv, int *i, const char *name, const char **val)
{
    size_t n = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, n) == 0 && a[n] == '=') {
        *val = a + n + 1;
        return 1;
    }
    if (strcmp(a, name) != 0)
        return 0;
    if (*i + 1 >= argc) {
        errmsg("%s needs a value (see --help)", name);
        return -1;
    }
    *val = argv[++*i];
    return 1;
}

static int cmd_health(const char *sock)
{
    response_t r;
    int rc = http_get(sock, "/healthz", &r);
    if (rc != 0)
        return rc;
    fwrite(r.body, 1, r.body_len, stdout);
    if (r.body_len > 0 && r.body[r.body_len - 1] != '\n')
        fputc('\n', stdout);
    if (r.status != 200 && r.status != 503)
        errmsg("GET /healthz answered HTTP %d", r.status);
    rc = r.status == 200 ? EXIT_OK : EXIT_BAD;
    free(r.raw);
    if (fflush(stdout) != 0)
        rc = EXIT_BAD;
    return rc;
}

int main(int argc, char **argv)
{
    const char *sock = DEFAULT_SOCKET;
    const char *cmd = NULL;
    double interval = 2.0;
    long count = 0;
    int watch_opts = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = NULL;
        int o;
        if ((o = opt_value(argc, argv, &i, "--interval", &v)) != 0) {
            char *end = NULL;
            interval = o > 0 ? strtod(v, &end) : 0;
            if (o < 0 || end == v || *end != '\0' || !(interval >= 0.1 && interval <= 3600)) {
                if (o > 0)
                    errmsg("--interval: expected seconds between 0.1 and 3600, got \"%s\"", v);
                return EXIT_USAGE;
            }
            watch_opts = 1;
            continue;
        }
        if ((o = opt_value(argc, argv, &i, "--count", &v)) != 0) {
            char *end = NULL;
            count = o > 0 ? strtol(v, &end, 10) : -1;
            if (o < 0 || end == v || *end != '\0' || count < 0) {
                if (o > 0)
                    errmsg("--count: expected a number >= 0, got \"%s\"", v);
                return EXIT_USAGE;
            }
            watch_opts = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return EXIT_OK;
        } else if (strcmp(a, "--socket") == 0) {
            if (++i >= argc) {
                errmsg("--socket needs a path (see --help)");
                return EXIT_USAGE;
            }
            sock = argv[i];
        } else if (strncmp(a, "--socket=", 9) == 0) {
            sock = a + 9;
        } else if (a[0] == '-' && a[1] != '\0') {
            errmsg("unknown option \"%s\" (see --help)", a);
            return EXIT_USAGE;
        } else if (!cmd) {
            cmd = a;
        } else {
            errmsg("unexpected argument \"%s\" (see --help)", a);
            return EXIT_USAGE;
        }
    }
    if (sock[0] == '\0') {
        errmsg("--socket needs a path (see --help)");
        return EXIT_USAGE;
    }
    if (!cmd) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(cmd, "watch") == 0)
        return ctl_watch(sock, interval, count, fetch_body);
    if (watch_opts) {
        errmsg("--interval and --count are options of watch (see --help)");
        return EXIT_USAGE;
    }
    if (strcmp(cmd, "status") == 0)
        return cmd_status(sock);
    if (strcmp(cmd, "metrics") == 0)
        return cmd_metrics(sock);
    if (strcmp(cmd, "health") == 0)
        return cmd_health(sock);
    errmsg("unknown command \"%s\" (want status, metrics, health or watch)", cmd);
    return EXIT_USAGE;
}
