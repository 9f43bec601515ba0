/*
 * test_status.c - the status HTTP server (daemon/status.c) over real sockets.
 *
 * Each test runs the server's uv loop on a background thread and talks to it from the test
 * thread with blocking POSIX sockets, because cmocka's assertions must run on the test thread.
 * The loop is stopped through a uv_async_t, and every test checks that the loop then closes
 * cleanly, which proves that the server left no handle behind.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "unit_cmocka.h"

#include "daemon/status.h"

#define STATUS_JSON "{\"version\":\"0.1.0\",\"paused\":false}"
#define BIG_LEN 4096

typedef struct fixture {
    char dir[64];
    char path[128];
    uv_loop_t loop;
    uv_async_t stop;
    sts_server_t *srv;
    pthread_t thread;
    bool running;
    bool closed;
    atomic_int calls;
    pthread_mutex_t mu;
    char last_method[16];
    char last_path[256];
} fixture_t;

/* ---- the server side ---------------------------------------------------------------------- */

static char *dup_str(const char *s, size_t *len)
{
    *len = strlen(s);
    char *p = malloc(*len + 1);
    assert_non_null(p);
    memcpy(p, s, *len + 1);
    return p;
}

/* Serves what the daemon's handler would, plus /big for the back-pressure test. */
static void handler(void *ud, const char *method, const char *path, sts_response_t *resp)
{
    fixture_t *f = ud;
    atomic_fetch_add(&f->calls, 1);
    pthread_mutex_lock(&f->mu);
    snprintf(f->last_method, sizeof f->last_method, "%s", method);
    snprintf(f->last_path, sizeof f->last_path, "%s", path);
    pthread_mutex_unlock(&f->mu);

    if (strcmp(path, "/status") == 0) {
        resp->status = 200;
        resp->content_type = "application/json";
        resp->body = dup_str(STATUS_JSON, &resp->body_len);
    } else if (strcmp(path, "/healthz") == 0) {
        resp->status = 503;
        resp->content_type = "text/plain";
        resp->body = dup_str("paused\n", &resp->body_len);
    } else if (strcmp(path, "/big") == 0) {
        resp->status = 200;
        resp->content_type = "text/plain";
        resp->body = malloc(BIG_LEN);
        memset(resp->body, 'x', BIG_LEN);
        resp->body_len = BIG_LEN;
    } else if (strcmp(path, "/stop") == 0) {
        /* The daemon may stop the server from inside a request (e.g. on shutdown). */
        sts_stop(f->srv);
        f->srv = NULL;
        resp->status = 200;
        resp->body = dup_str("bye\n", &resp->body_len);
    } else if (strcmp(path, "/empty") == 0) {
        resp->status = 204;
        resp->content_type = "text/plain";
    } else {
        resp->status = 404;
        resp->content_type = "text/plain";
        resp->body = dup_str("not found\n", &resp->body_len);
    }
}

static void on_stop(uv_async_t *a)
{
    fixture_t *f = a->data;
    sts_stop(f->srv);
    f->srv = NULL;
    uv_close((uv_handle_t *)a, NULL);
}

static void *loop_main(void *arg)
{
    fixture_t *f = arg;
    uv_run(&f->loop, UV_RUN_DEFAULT);
    return NULL;
}

static void fixture_init(fixture_t *f)
{
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_status.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/clickmartd.sock", f->dir);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    pthread_mutex_init(&f->mu, NULL);
}

static void fixture_run(fixture_t *f)
{
    assert_int_equal(uv_async_init(&f->loop, &f->stop, on_stop), 0);
    f->stop.data = f;
    assert_int_equal(pthread_create(&f->thread, NULL, loop_main, f), 0);
    f->running = true;
}

/* Stop the server from its own loop thread and check that the loop ends with nothing open. */
static void fixture_stop(fixture_t *f)
{
    if (f->running) {
        uv_async_send(&f->stop);
        pthread_join(f->thread, NULL);
        f->running = false;
    }
    if (!f->closed) {
        assert_int_equal(uv_loop_close(&f->loop), 0);
        f->closed = true;
    }
}

static int setup(void **state)
{
    fixture_t *f = malloc(sizeof *f);
    assert_non_null(f);
    fixture_init(f);
    assert_int_equal(sts_start(&f->loop, f->path, NULL, handler, f, &f->srv), 0);
    fixture_run(f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    fixture_stop(f);
    struct stat st;
    assert_int_equal(lstat(f->path, &st), -1);
    assert_int_equal(errno, ENOENT);
    assert_int_equal(rmdir(f->dir), 0);
    pthread_mutex_destroy(&f->mu);
    free(f);
    return 0;
}

/* ---- the client side ---------------------------------------------------------------------- */

static int connect_unix(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    /* A server bug must fail the test, not hang it. */
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

static void send_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        assert_true(n > 0);
        data += n;
        len -= (size_t)n;
    }
}

static void send_str(int fd, const char *s)
{
    send_all(fd, s, strlen(s));
}

/* Read until the peer closes; returns a malloc'ed, NUL-terminated buffer. */
static char *read_to_eof(int fd, size_t *out_len)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    for (;;) {
        if (cap - len < 2048) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        if (n == 0)
            break;
        if (n < 0 && errno == ECONNRESET)
            break;
        assert_true(n > 0);
        len += (size_t)n;
    }
    buf[len] = '\0';
    *out_len = len;
    return buf;
}

typedef struct response {
    int status;
    char headers[2048];
    char body[8192];
    size_t body_len;
    long content_length;
} response_t;

/* Parse one response from buf; returns the bytes it took, or 0 when it is incomplete. */
static size_t parse_response(const char *buf, size_t len, bool head, response_t *r)
{
    memset(r, 0, sizeof *r);
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end)
        return 0;
    size_t hlen = (size_t)(end - buf) + 4;
    assert_true(hlen < sizeof r->headers);
    memcpy(r->headers, buf, hlen);
    assert_int_equal(sscanf(r->headers, "HTTP/1.1 %d ", &r->status), 1);
    const char *cl = strstr(r->headers, "\r\nContent-Length: ");
    assert_non_null(cl);
    r->content_length = strtol(cl + 18, NULL, 10);
    size_t blen = head ? 0 : (size_t)r->content_length;
    if (len - hlen < blen)
        return 0;
    assert_true(blen < sizeof r->body);
    memcpy(r->body, buf + hlen, blen);
    r->body_len = blen;
    return hlen + blen;
}

/* Read exactly one response from a kept-alive connection. */
static void read_response(int fd, bool head, response_t *r)
{
    char buf[16384];
    size_t len = 0;
    for (;;) {
        /* Peek so that bytes of a following response stay in the socket. */
        ssize_t n = recv(fd, buf, sizeof buf, MSG_PEEK);
        assert_true(n > 0);
        len = (size_t)n;
        size_t used = parse_response(buf, len, head, r);
        if (used > 0) {
            assert_int_equal(recv(fd, buf, used, 0), (ssize_t)used);
            return;
        }
        assert_true(len < sizeof buf);
        struct pollfd p = {.fd = fd, .events = POLLIN};
        /* Wait for more than what is already there. */
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        (void)poll(&p, 1, 100);
    }
}

static bool has_header(const response_t *r, const char *line)
{
    return strstr(r->headers, line) != NULL;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_get_status(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    send_str(fd, "GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 200);
    assert_true(strncmp(r.headers, "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_true(has_header(&r, "\r\nContent-Type: application/json\r\n"));
    assert_true(has_header(&r, "\r\nCache-Control: no-store\r\n"));
    assert_true(has_header(&r, "\r\nConnection: close\r\n"));
    assert_int_equal(r.content_length, strlen(STATUS_JSON));
    assert_memory_equal(r.body, STATUS_JSON, strlen(STATUS_JSON));
    free(all);

    pthread_mutex_lock(&f->mu);
    assert_string_equal(f->last_method, "GET");
    assert_string_equal(f->last_path, "/status");
    pthread_mutex_unlock(&f->mu);
}

static void test_query_string_and_absolute_form(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    response_t r;
    send_str(fd, "GET /status?pretty=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    send_str(fd, "GET http://localhost/healthz?x HTTP/1.1\r\nHost: x\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 503);
    assert_int_equal(r.body_len, 7);
    assert_memory_equal(r.body, "paused\n", 7);
    close(fd);
}

static void test_head_has_no_body(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    send_str(fd, "HEAD /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_int_equal(parse_response(all, len, true, &r), len);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.content_length, strlen(STATUS_JSON));
    assert_int_equal(r.body_len, 0);
    free(all);
    pthread_mutex_lock(&f->mu);
    assert_string_equal(f->last_method, "HEAD");
    pthread_mutex_unlock(&f->mu);
}

static void test_keep_alive(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    response_t r;
    send_str(fd, "GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    assert_false(has_header(&r, "Connection: close"));
    send_str(fd, "GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 404);
    /* An HTTP/1.0 client asking for keep-alive gets it, and is told so. */
    send_str(fd, "GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    assert_true(has_header(&r, "\r\nConnection: keep-alive\r\n"));
    /* A plain HTTP/1.0 request ends the connection. */
    send_str(fd, "GET /status HTTP/1.0\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 200);
    assert_true(has_header(&r, "\r\nConnection: close\r\n"));
    free(all);
    close(fd);
    assert_int_equal(atomic_load(&f->calls), 4);
}

static void test_pipelined(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    /* Everything in one write; the request after the closing one must not be answered. */
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\n\r\n"
                 "HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                 "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                 "GET /missing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                 "GET /status HTTP/1.1\r\nHost: a\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    size_t off = 0, n;
    n = parse_response(all + off, len - off, false, &r);
    assert_true(n > 0);
    assert_int_equal(r.status, 200);
    off += n;
    n = parse_response(all + off, len - off, true, &r);
    assert_true(n > 0);
    assert_int_equal(r.status, 503);
    assert_int_equal(r.content_length, 7);
    off += n;
    n = parse_response(all + off, len - off, false, &r);
    assert_true(n > 0);
    assert_int_equal(r.status, 503);
    assert_memory_equal(r.body, "paused\n", 7);
    off += n;
    n = parse_response(all + off, len - off, false, &r);
    assert_true(n > 0);
    assert_int_equal(r.status, 404);
    off += n;
    assert_int_equal(off, len);
    free(all);
    assert_int_equal(atomic_load(&f->calls), 4);
}

static void test_pipelined_byte_by_byte(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    const char *req = "GET /status HTTP/1.1\r\nHost: a\r\n\r\n"
                      "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    for (const char *p = req; *p; p++)
        send_all(fd, p, 1);
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    size_t n = parse_response(all, len, false, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(parse_response(all + n, len - n, false, &r), len - n);
    assert_int_equal(r.status, 503);
    free(all);
}

/*
 * Many pipelined requests whose responses the client does not read: the server must throttle
 * itself and still answer every request, in order, once the client reads.
 */
static void test_pipelined_backpressure(void **state)
{
    fixture_t *f = *state;
    enum { N = 2000 };
    static const char one[] = "GET /big HTTP/1.1\r\nHost: a\r\n\r\n";
    static const char last[] = "GET /status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    size_t reqlen = (N - 1) * (sizeof one - 1) + sizeof last - 1;
    char *req = malloc(reqlen);
    assert_non_null(req);
    for (size_t i = 0; i < N - 1; i++)
        memcpy(req + i * (sizeof one - 1), one, sizeof one - 1);
    memcpy(req + (N - 1) * (sizeof one - 1), last, sizeof last - 1);

    int fd = connect_unix(f->path);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    size_t sent = 0, cap = 16 << 20, got = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    /*
     * The requests (64 KB) fit in the socket buffer, so the server reads hundreds of them at
     * once while their responses (8 MB) do not fit: it must pause parsing until we read.
     */
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN | (sent < reqlen ? POLLOUT : 0)};
        assert_true(poll(&p, 1, 5000) > 0);
        if (p.revents & POLLOUT) {
            ssize_t n = send(fd, req + sent, reqlen - sent, MSG_NOSIGNAL);
            assert_true(n > 0 || errno == EAGAIN);
            if (n > 0)
                sent += (size_t)n;
        }
        if (!(p.revents & (POLLIN | POLLHUP)))
            continue;
        ssize_t n = recv(fd, buf + got, cap - got, 0);
        if (n == 0)
            break;
        if (n < 0 && errno == EAGAIN)
            continue;
        assert_true(n > 0);
        got += (size_t)n;
        assert_true(got < cap);
    }
    close(fd);
    assert_int_equal(sent, reqlen);
    size_t off = 0;
    response_t r;
    for (int i = 0; i < N; i++) {
        size_t n = parse_response(buf + off, got - off, false, &r);
        assert_true(n > 0);
        assert_int_equal(r.status, 200);
        assert_int_equal(r.body_len, i == N - 1 ? strlen(STATUS_JSON) : BIG_LEN);
        off += n;
    }
    assert_int_equal(off, got);
    free(buf);
    free(req);
}

static void test_other_methods_405(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    response_t r;
    send_str(fd, "POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 405);
    assert_true(has_header(&r, "\r\nAllow: GET, HEAD\r\n"));
    /* The body was consumed, so the connection stays usable. */
    send_str(fd, "DELETE /status HTTP/1.1\r\nHost: a\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 405);
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    close(fd);
    assert_int_equal(atomic_load(&f->calls), 1);
}

static void test_oversized_header(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    size_t vlen = 10000, cap = vlen + 128;
    char *req = malloc(cap);
    assert_non_null(req);
    int n = sprintf(req, "GET /status HTTP/1.1\r\nHost: a\r\nX-Big: ");
    memset(req + n, 'a', vlen);
    snprintf(req + n + vlen, cap - vlen - (size_t)n, "\r\n\r\n");
    send_str(fd, req);
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_true(parse_response(all, len, false, &r) > 0);
    assert_true(r.status == 431 || r.status == 400);
    assert_true(has_header(&r, "\r\nConnection: close\r\n"));
    free(all);
    free(req);

    /* The same limit applies to a long URL. */
    fd = connect_unix(f->path);
    req = malloc(cap);
    assert_non_null(req);
    n = sprintf(req, "GET /");
    memset(req + n, 'a', vlen);
    snprintf(req + n + vlen, cap - vlen - (size_t)n, " HTTP/1.1\r\nHost: a\r\n\r\n");
    send_str(fd, req);
    all = read_to_eof(fd, &len);
    close(fd);
    assert_true(parse_response(all, len, false, &r) > 0);
    assert_true(r.status == 431 || r.status == 400);
    free(all);
    free(req);

    /* A header section just under the limit is fine. */
    fd = connect_unix(f->path);
    cap = 8192;
    req = malloc(cap);
    assert_non_null(req);
    n = sprintf(req, "GET /status HTTP/1.1\r\nX-Pad: ");
    memset(req + n, 'b', 7000);
    snprintf(req + n + 7000, cap - 7000 - (size_t)n, "\r\nConnection: close\r\n\r\n");
    send_str(fd, req);
    all = read_to_eof(fd, &len);
    close(fd);
    assert_true(parse_response(all, len, false, &r) > 0);
    assert_int_equal(r.status, 200);
    free(all);
    free(req);
    assert_int_equal(atomic_load(&f->calls), 1);
}

static void test_malformed_400(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\n\r\nthis is not http\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    size_t n = parse_response(all, len, false, &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(parse_response(all + n, len - n, false, &r), len - n);
    assert_int_equal(r.status, 400);
    free(all);
}

static void test_bad_target_400(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    response_t r;
    send_str(fd, "GET http://localhost HTTP/1.1\r\nHost: a\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 404);
    pthread_mutex_lock(&f->mu);
    assert_string_equal(f->last_path, "/");
    pthread_mutex_unlock(&f->mu);
    send_str(fd, "GET * HTTP/1.1\r\nHost: a\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 400);
    assert_true(has_header(&r, "\r\nConnection: close\r\n"));
    free(all);
    assert_int_equal(atomic_load(&f->calls), 1);
}

static void test_body_too_large_413(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    size_t blen = 100000;
    char *req = malloc(blen + 128);
    assert_non_null(req);
    int n = sprintf(req, "POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: %zu\r\n\r\n", blen);
    memset(req + n, 'z', blen);
    send_all(fd, req, (size_t)n + blen);
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 413);
    free(all);
    free(req);
}

/* We never switch protocols: the request is answered and the connection closed. */
static void test_upgrade_closes(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                 "Upgrade: websocket\r\n\r\n\x81\x05hello");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 200);
    assert_true(has_header(&r, "\r\nConnection: close\r\n"));
    free(all);
}

/* The handler may stop the server; the request's connection is then closed unanswered. */
static void test_stop_from_handler(void **state)
{
    fixture_t *f = *state;
    int other = connect_unix(f->path);
    int fd = connect_unix(f->path);
    send_str(fd, "GET /stop HTTP/1.1\r\nHost: a\r\n\r\nGET /status HTTP/1.1\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    assert_int_equal(len, 0);
    free(all);
    all = read_to_eof(other, &len);
    assert_int_equal(len, 0);
    free(all);
    close(fd);
    close(other);
    assert_int_equal(atomic_load(&f->calls), 1);
}

static void test_empty_body_and_status(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    response_t r;
    send_str(fd, "GET /empty HTTP/1.1\r\nHost: a\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 204);
    assert_int_equal(r.content_length, 0);
    close(fd);
}

static void test_socket_mode(void **state)
{
    fixture_t *f = *state;
    struct stat st;
    assert_int_equal(lstat(f->path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0660);
}

/* Over 64 connections, the extra one is accepted and closed at once. */
static void test_connection_limit(void **state)
{
    fixture_t *f = *state;
    int fds[64];
    response_t r;
    for (int i = 0; i < 64; i++) {
        fds[i] = connect_unix(f->path);
        /* A round trip proves the server has accepted this connection. */
        send_str(fds[i], "GET /status HTTP/1.1\r\nHost: a\r\n\r\n");
        read_response(fds[i], false, &r);
        assert_int_equal(r.status, 200);
    }
    int extra = connect_unix(f->path);
    char c;
    ssize_t n = recv(extra, &c, 1, 0);
    assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
    close(extra);

    /* Once a slot frees up, new connections are served again. */
    close(fds[0]);
    bool served = false;
    for (int tries = 0; tries < 100 && !served; tries++) {
        int fd = connect_unix(f->path);
        send(fd, "GET /status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 53, MSG_NOSIGNAL);
        size_t len;
        char *all = read_to_eof(fd, &len);
        served = len > 0;
        free(all);
        close(fd);
        if (!served) {
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
        }
    }
    assert_true(served);
    for (int i = 1; i < 64; i++)
        close(fds[i]);
}

/* A client that half-closes after its request still gets the answer. */
static void test_half_close(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\n\r\n");
    shutdown(fd, SHUT_WR);
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 200);
    free(all);
}

static void test_idle_timeout(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    struct timeval tv = {.tv_sec = 15};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    /* A partial request does not count as activity. */
    send_str(fd, "GET /sta");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char c;
    ssize_t n = recv(fd, &c, 1, 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    assert_int_equal(n, 0);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    assert_true(secs > 9.0 && secs < 12.0);
    close(fd);
}

/* sts_stop closes open connections, unlinks the socket, and the loop ends cleanly. */
static void test_stop_with_open_connection(void **state)
{
    fixture_t *f = *state;
    int fd = connect_unix(f->path);
    response_t r;
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    int idle = connect_unix(f->path);
    send_str(idle, "GET /stat");
    fixture_stop(f);
    struct stat st;
    assert_int_equal(lstat(f->path, &st), -1);
    char c;
    ssize_t n = recv(fd, &c, 1, 0);
    assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
    n = recv(idle, &c, 1, 0);
    assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
    close(fd);
    close(idle);
}

/* ---- start-up tests (their own loops) ----------------------------------------------------- */

static void test_existing_file_eexist(void **state)
{
    (void)state;
    fixture_t f;
    fixture_init(&f);
    FILE *fp = fopen(f.path, "w");
    assert_non_null(fp);
    fputs("precious\n", fp);
    fclose(fp);
    chmod(f.path, 0604);

    assert_int_equal(sts_start(&f.loop, f.path, NULL, handler, &f, &f.srv), STS_EEXIST);
    assert_null(f.srv);
    assert_non_null(sts_strerror(STS_EEXIST));

    struct stat st;
    assert_int_equal(lstat(f.path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(st.st_mode & 07777, 0604);
    char buf[32] = {0};
    fp = fopen(f.path, "r");
    assert_non_null(fp);
    assert_non_null(fgets(buf, sizeof buf, fp));
    fclose(fp);
    assert_string_equal(buf, "precious\n");

    /* A failed start leaves nothing on the loop. */
    assert_int_equal(uv_loop_close(&f.loop), 0);
    unlink(f.path);
    rmdir(f.dir);
    pthread_mutex_destroy(&f.mu);
}

static int bind_unix(const char *path, bool do_listen)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    if (do_listen)
        assert_int_equal(listen(fd, 4), 0);
    return fd;
}

static void test_stale_socket_replaced(void **state)
{
    (void)state;
    fixture_t f;
    fixture_init(&f);
    /* A socket nobody listens on any more, as a crashed daemon leaves behind. */
    close(bind_unix(f.path, false));
    struct stat before;
    assert_int_equal(lstat(f.path, &before), 0);

    assert_int_equal(sts_start(&f.loop, f.path, NULL, handler, &f, &f.srv), 0);
    struct stat after;
    assert_int_equal(lstat(f.path, &after), 0);
    assert_true(S_ISSOCK(after.st_mode));
    assert_int_equal(after.st_mode & 07777, 0660);
    fixture_run(&f);

    int fd = connect_unix(f.path);
    send_str(fd, "GET /status HTTP/1.1\r\nConnection: close\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    close(fd);
    response_t r;
    assert_true(parse_response(all, len, false, &r) > 0);
    assert_int_equal(r.status, 200);
    free(all);

    fixture_stop(&f);
    assert_int_equal(lstat(f.path, &after), -1);
    assert_int_equal(rmdir(f.dir), 0);
    pthread_mutex_destroy(&f.mu);
}

/* A socket that a live process listens on is not stolen. */
static void test_live_socket_kept(void **state)
{
    (void)state;
    fixture_t f;
    fixture_init(&f);
    int other = bind_unix(f.path, true);
    struct stat before, after;
    assert_int_equal(lstat(f.path, &before), 0);
    assert_int_equal(sts_start(&f.loop, f.path, NULL, handler, &f, &f.srv), STS_ELISTEN);
    assert_int_equal(lstat(f.path, &after), 0);
    assert_int_equal(before.st_ino, after.st_ino);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    close(other);
    unlink(f.path);
    rmdir(f.dir);
    pthread_mutex_destroy(&f.mu);
}

static int free_tcp_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t len = sizeof sa;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

static void test_tcp_listener(void **state)
{
    (void)state;
    fixture_t f;
    fixture_init(&f);
    char spec[64];
    int port = free_tcp_port();
    snprintf(spec, sizeof spec, "127.0.0.1:%d", port);
    assert_int_equal(sts_start(&f.loop, NULL, spec, handler, &f, &f.srv), 0);
    fixture_run(&f);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    response_t r;
    send_str(fd, "GET /status HTTP/1.1\r\nHost: a\r\n\r\n");
    read_response(fd, false, &r);
    assert_int_equal(r.status, 200);
    send_str(fd, "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 503);
    free(all);
    close(fd);

    fixture_stop(&f);
    rmdir(f.dir);
    pthread_mutex_destroy(&f.mu);
}

/* "localhost:port" and ":port" are accepted; a port in use fails and leaves no socket file. */
static void test_tcp_forms_and_port_in_use(void **state)
{
    (void)state;
    fixture_t f;
    fixture_init(&f);
    char spec[64];
    snprintf(spec, sizeof spec, "localhost:%d", free_tcp_port());
    assert_int_equal(sts_start(&f.loop, NULL, spec, handler, &f, &f.srv), 0);
    sts_server_t *first = f.srv;

    /* The same port again, now with the Unix socket too: bind fails after the socket exists. */
    sts_server_t *second = NULL;
    assert_int_equal(sts_start(&f.loop, f.path, spec, handler, &f, &second), STS_ELISTEN);
    assert_null(second);
    struct stat st;
    assert_int_equal(lstat(f.path, &st), -1);

    snprintf(spec, sizeof spec, ":%d", free_tcp_port());
    assert_int_equal(sts_start(&f.loop, NULL, spec, handler, &f, &second), 0);
    sts_stop(first);
    sts_stop(second);
    f.srv = NULL;
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    assert_int_equal(rmdir(f.dir), 0);
    pthread_mutex_destroy(&f.mu);
}

static void test_tcp_ipv6_listener(void **state)
{
    (void)state;
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 sa6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    if (probe < 0 || bind(probe, (struct sockaddr *)&sa6, sizeof sa6) < 0) {
        if (probe >= 0)
            close(probe);
        skip();
    }
    socklen_t slen = sizeof sa6;
    getsockname(probe, (struct sockaddr *)&sa6, &slen);
    int port = ntohs(sa6.sin6_port);
    close(probe);

    fixture_t f;
    fixture_init(&f);
    char spec[64];
    snprintf(spec, sizeof spec, "[::1]:%d", port);
    assert_int_equal(sts_start(&f.loop, f.path, spec, handler, &f, &f.srv), 0);
    fixture_run(&f);
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa6, sizeof sa6), 0);
    send_str(fd, "GET /status HTTP/1.1\r\nConnection: close\r\n\r\n");
    size_t len;
    char *all = read_to_eof(fd, &len);
    response_t r;
    assert_int_equal(parse_response(all, len, false, &r), len);
    assert_int_equal(r.status, 200);
    free(all);
    close(fd);
    fixture_stop(&f);
    assert_int_equal(rmdir(f.dir), 0);
    pthread_mutex_destroy(&f.mu);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    fixture_t f;
    fixture_init(&f);
    static const char *bad[] = {"127.0.0.1",     "127.0.0.1:0",     "127.0.0.1:70000",
                                "127.0.0.1:80x", "no.such.host:80", "[::1]80",
                                "::1:80",        "1.2.3:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        /* The Unix socket is bound first; a bad TCP address must remove it again. */
        assert_int_equal(sts_start(&f.loop, f.path, bad[i], handler, &f, &f.srv), STS_EINVAL);
        assert_null(f.srv);
        struct stat st;
        assert_int_equal(lstat(f.path, &st), -1);
    }
    assert_int_equal(sts_start(&f.loop, NULL, NULL, handler, &f, &f.srv), STS_EINVAL);
    assert_int_equal(sts_start(&f.loop, f.path, NULL, NULL, &f, &f.srv), STS_EINVAL);
    assert_int_equal(sts_start(&f.loop, f.dir, NULL, handler, &f, &f.srv), STS_EEXIST);
    char longpath[200];
    memset(longpath, 'a', sizeof longpath - 1);
    longpath[0] = '/';
    longpath[sizeof longpath - 1] = '\0';
    assert_int_equal(sts_start(&f.loop, longpath, NULL, handler, &f, &f.srv), STS_EINVAL);
    assert_int_equal(sts_start(&f.loop, "/nonexistent-dir/x.sock", NULL, handler, &f, &f.srv),
                     STS_ELISTEN);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    assert_int_equal(rmdir(f.dir), 0);
    pthread_mutex_destroy(&f.mu);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_get_status, setup, teardown),
        cmocka_unit_test_setup_teardown(test_query_string_and_absolute_form, setup, teardown),
        cmocka_unit_test_setup_teardown(test_head_has_no_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keep_alive, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipelined, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipelined_byte_by_byte, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pipelined_backpressure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_other_methods_405, setup, teardown),
        cmocka_unit_test_setup_teardown(test_oversized_header, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_400, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_target_400, setup, teardown),
        cmocka_unit_test_setup_teardown(test_body_too_large_413, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upgrade_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_from_handler, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_body_and_status, setup, teardown),
        cmocka_unit_test_setup_teardown(test_socket_mode, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connection_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_half_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_with_open_connection, setup, teardown),
        cmocka_unit_test(test_existing_file_eexist),
        cmocka_unit_test(test_stale_socket_replaced),
        cmocka_unit_test(test_live_socket_kept),
        cmocka_unit_test(test_tcp_listener),
        cmocka_unit_test(test_tcp_forms_and_port_in_use),
        cmocka_unit_test(test_tcp_ipv6_listener),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
