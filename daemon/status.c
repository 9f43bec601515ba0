/*
 * status.c - the daemon's small HTTP/1.1 server (see status.h).
 *
 * The listening sockets are created, bound and put into the listening state with plain system
 * calls before any libuv handle exists, and only then handed to libuv. Every failure of
 * sts_start() that can happen in practice therefore happens while there is nothing on the loop
 * to close, so a failed start leaves nothing behind and the caller can close its loop at once.
 *
 * Each connection owns two handles (its stream and an idle timer) and is freed when both close
 * callbacks have run. Requests are parsed with http-parser and answered in order as soon as each
 * one is complete, which gives keep-alive and pipelining for free because libuv writes queued
 * buffers in the order uv_write() was called.
 */
#include "daemon/status.h"
#include "daemon/util.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <http_parser.h>

/* The request line and all header lines together may not exceed this. */
#define STS_MAX_HEADER 8192
/* Nothing we serve takes a body, so a bigger one is refused rather than read forever. */
#define STS_MAX_BODY 65536
#define STS_MAX_CONNS 64
/*
 * Only a complete request or a finished write counts as activity, not a partial read, so a
 * client that trickles in a request a byte at a time cannot hold one of the 64 slots forever.
 */
#define STS_IDLE_MS 10000
/* How long a closing connection keeps draining the peer's data after our last response. */
#define STS_LINGER_MS 2000
#define STS_READ_BUF 16384
/*
 * A client that pipelines requests without reading the responses would otherwise make us queue
 * responses without bound; above this many queued bytes we stop parsing until writes drain.
 */
#define STS_MAX_QUEUED (256 * 1024)
#define STS_BACKLOG 128

typedef struct sts_conn sts_conn_t;

struct sts_server {
    uv_loop_t *loop;
    sts_handler_fn fn;
    void *ud;
    uv_pipe_t pipe;
    uv_tcp_t tcp;
    bool has_pipe, has_tcp;
    char *socket_path;
    /* The identity of the socket file we created, so that sts_stop() never unlinks a socket
     * that another process has put at the same path in the meantime. */
    dev_t sock_dev;
    ino_t sock_ino;
    sts_conn_t *conns;
    unsigned nconns;
    unsigned open_handles; /* listeners, connections' handles and refused handles */
    bool stopping;
};

struct sts_conn {
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_pipe_t pipe;
        uv_tcp_t tcp;
    } io;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    sts_server_t *srv;
    sts_conn_t *prev, *next;
    int open_handles;

    http_parser parser;
    char url[STS_MAX_HEADER + 1];
    size_t url_len;
    size_t header_bytes;
    size_t body_bytes;
    int reject_status; /* set by a parser callback that refused the request */
    bool in_field;

    /* Unparsed input left in rbuf while parsing is throttled; reading is stopped meanwhile, so
     * libuv never reuses rbuf before the backlog has been parsed. */
    const char *backlog;
    size_t backlog_len;
    size_t queued_bytes;
    unsigned pending_writes;

    bool reading;
    bool throttled;   /* parsing paused until queued responses drain */
    bool close_after; /* no more requests: close once the queued responses are written */
    bool peer_eof;
    bool shutting; /* our side is shut down; draining the peer until EOF or the linger timer */
    bool closing;
    char rbuf[STS_READ_BUF];
};

/* One queued response. It owns the header text and the body until the write callback. */
typedef struct sts_write {
    uv_write_t req;
    sts_conn_t *conn;
    char *owned_body;
    size_t total;
    char head[512];
} sts_write_t;

/* Handle for a connection refused because of the connection limit. */
typedef union sts_refused {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_pipe_t pipe;
    uv_tcp_t tcp;
} sts_refused_t;

const char *sts_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case STS_EEXIST:
        return "the status socket path exists and is not a socket";
    case STS_ELISTEN:
        return "cannot listen on the status address";
    case STS_EINVAL:
        return "invalid status server argument";
    case STS_ENOMEM:
        return "out of memory";
    default:
        return "unknown status server error";
    }
}

/* ---- server lifetime ---------------------------------------------------------------------- */

static void server_maybe_free(sts_server_t *s)
{
    if (!s->stopping || s->open_handles > 0)
        return;
    free(s->socket_path);
    free(s);
}

static void on_listener_closed(uv_handle_t *h)
{
    sts_server_t *s = h->data;
    s->open_handles--;
    server_maybe_free(s);
}

static void on_refused_closed(uv_handle_t *h)
{
    sts_server_t *s = h->data;
    free(h);
    s->open_handles--;
    server_maybe_free(s);
}

/* ---- connection lifetime ------------------------------------------------------------------ */

static void on_conn_handle_closed(uv_handle_t *h)
{
    sts_conn_t *c = h->data;
    if (--c->open_handles > 0)
        return;
    sts_server_t *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    s->open_handles--;
    free(c);
    server_maybe_free(s);
}

/*
 * Closing the stream makes libuv cancel its queued writes (their callbacks run with
 * UV_ECANCELED and free their buffers) before our close callbacks free the connection.
 */
static void conn_close(sts_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    c->backlog = NULL;
    c->backlog_len = 0;
    uv_close(&c->io.handle, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

static void on_timer(uv_timer_t *t)
{
    sts_conn_t *c = t->data;
    conn_close(c);
}

static void conn_arm_timer(sts_conn_t *c, uint64_t ms)
{
    if (!c->closing)
        uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void conn_stop_reading(sts_conn_t *c)
{
    if (c->reading) {
        uv_read_stop(&c->io.stream);
        c->reading = false;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    sts_conn_t *c = h->data;
    *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void conn_start_reading(sts_conn_t *c)
{
    if (c->reading || c->closing || c->peer_eof)
        return;
    int rc = uv_read_start(&c->io.stream, on_alloc, on_read);
    if (rc < 0) {
        conn_close(c);
        return;
    }
    c->reading = true;
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    sts_conn_t *c = req->data;
    if (c->closing)
        return;
    if (status < 0 || c->peer_eof) {
        conn_close(c);
        return;
    }
    /*
     * Closing a TCP socket that still has unread input makes the kernel send a reset, which can
     * destroy our last response before the client has read it. So after shutting down our side
     * we read and discard whatever the client still sends until it closes too, or the linger
     * time runs out.
     */
    conn_arm_timer(c, STS_LINGER_MS);
    conn_start_reading(c);
}

/* Called whenever something that blocks the end of a closing connection may have finished. */
static void conn_maybe_finish(sts_conn_t *c)
{
    if (c->closing || !c->close_after || c->shutting || c->pending_writes > 0)
        return;
    if (c->peer_eof) {
        conn_close(c);
        return;
    }
    c->shutting = true;
    conn_stop_reading(c);
    c->shutdown_req.data = c;
    if (uv_shutdown(&c->shutdown_req, &c->io.stream, on_shutdown) < 0)
        conn_close(c);
}

/* ---- responses ---------------------------------------------------------------------------- */

static void process_input(sts_conn_t *c, const char *data, size_t len);

static void on_write(uv_write_t *req, int status)
{
    sts_write_t *w = req->data;
    sts_conn_t *c = w->conn;
    c->pending_writes--;
    c->queued_bytes -= w->total;
    free(w->owned_body);
    free(w);
    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    if (!c->shutting)
        conn_arm_timer(c, STS_IDLE_MS);
    if (c->throttled && c->queued_bytes < STS_MAX_QUEUED / 2) {
        c->throttled = false;
        const char *data = c->backlog;
        size_t len = c->backlog_len;
        c->backlog = NULL;
        c->backlog_len = 0;
        if (len > 0)
            process_input(c, data, len);
        if (!c->throttled && !c->close_after)
            conn_start_reading(c);
    }
    conn_maybe_finish(c);
}

static const char *reason_phrase(int status)
{
    const char *r = http_status_str((enum http_status)status);
    /* http-parser answers "<unknown>" for codes it does not list. */
    return (r && r[0] != '<') ? r : "Unknown";
}

/*
 * Queue one response. `body` is freed here (now for HEAD, after the write otherwise) when
 * `owned` is true; a static body is never freed. Returns -1 when the connection was closed.
 */
static int conn_respond(sts_conn_t *c, int status, const char *ctype, char *body, size_t body_len,
                        bool owned, bool head_only, bool keep_alive)
{
    sts_write_t *w = calloc(1, sizeof *w);
    if (!w) {
        if (owned)
            free(body);
        conn_close(c);
        return -1;
    }
    if (status < 100 || status > 999)
        status = 500;
    if (!ctype)
        ctype = "text/plain; charset=utf-8";
    const char *conn_hdr = "";
    if (!keep_alive)
        conn_hdr = "Connection: close\r\n";
    else if (c->parser.http_major == 1 && c->parser.http_minor == 0)
        conn_hdr = "Connection: keep-alive\r\n";
    int n = snprintf(w->head, sizeof w->head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\n%s%s\r\n",
                     status, reason_phrase(status), ctype, body_len,
                     status == 405 ? "Allow: GET, HEAD\r\n" : "", conn_hdr);
    if (n < 0 || (size_t)n >= sizeof w->head) {
        /* Only an absurdly long content type can get here; fail loudly rather than truncate. */
        cm_err("status server: response header too long", "status=%d", status);
        if (owned)
            free(body);
        free(w);
        conn_close(c);
        return -1;
    }

    uv_buf_t bufs[2];
    unsigned nbufs = 1;
    bufs[0] = uv_buf_init(w->head, (unsigned)n);
    w->total = (size_t)n;
    if (head_only || body_len == 0) {
        if (owned)
            free(body);
    } else {
        if (owned)
            w->owned_body = body;
        bufs[1] = uv_buf_init(body, (unsigned)body_len);
        nbufs = 2;
        w->total += body_len;
    }
    w->conn = c;
    w->req.data = w;
    int rc = uv_write(&w->req, &c->io.stream, bufs, nbufs, on_write);
    if (rc < 0) {
        free(w->owned_body);
        free(w);
        conn_close(c);
        return -1;
    }
    c->pending_writes++;
    c->queued_bytes += w->total;
    return 0;
}

/* Answer a request we refuse to parse further and end the connection after it. */
static void conn_fail(sts_conn_t *c, int status)
{
    static char msg400[] = "bad request\n";
    static char msg413[] = "request body too large\n";
    static char msg431[] = "request header fields too large\n";
    char *msg = msg400;
    if (status == 413)
        msg = msg413;
    else if (status == 431)
        msg = msg431;
    c->close_after = true;
    conn_stop_reading(c);
    if (conn_respond(c, status, NULL, msg, strlen(msg), false, false, false) == 0)
        conn_maybe_finish(c);
}

/* ---- request parsing ---------------------------------------------------------------------- */

static int on_message_begin(http_parser *p)
{
    sts_conn_t *c = p->data;
    c->url_len = 0;
    c->url[0] = '\0';
    c->header_bytes = 0;
    c->body_bytes = 0;
    c->reject_status = 0;
    c->in_field = false;
    return 0;
}

/* Count bytes of the header section; returns nonzero (stopping the parser) above the limit. */
static int count_header(sts_conn_t *c, size_t len)
{
    c->header_bytes += len;
    if (c->header_bytes > STS_MAX_HEADER) {
        c->reject_status = 431;
        return 1;
    }
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    sts_conn_t *c = p->data;
    if (count_header(c, len))
        return 1;
    /* header_bytes includes the URL, so the URL always fits in the buffer here. */
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    c->url[c->url_len] = '\0';
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    (void)at;
    sts_conn_t *c = p->data;
    size_t extra = 0;
    if (!c->in_field) {
        /* A new header line: account for its ": " and CRLF too. */
        extra = 4;
        c->in_field = true;
    }
    return count_header(c, len + extra);
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    (void)at;
    sts_conn_t *c = p->data;
    c->in_field = false;
    return count_header(c, len);
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    (void)at;
    sts_conn_t *c = p->data;
    c->body_bytes += len;
    if (c->body_bytes > STS_MAX_BODY) {
        c->reject_status = 413;
        return 1;
    }
    return 0;
}

/*
 * Find the path of the request target: origin form ("/status?x") is cut at the query, absolute
 * form ("http://host/status") is split with http-parser. Returns false for a malformed target.
 */
static bool request_path(sts_conn_t *c, char *out, size_t outsz)
{
    const char *path = c->url;
    size_t len;
    if (c->url[0] == '/') {
        len = strcspn(c->url, "?#");
    } else {
        struct http_parser_url u;
        http_parser_url_init(&u);
        if (http_parser_parse_url(c->url, c->url_len, 0, &u) != 0)
            return false;
        if (u.field_set & (1 << UF_PATH)) {
            path = c->url + u.field_data[UF_PATH].off;
            len = u.field_data[UF_PATH].len;
        } else {
            path = "/";
            len = 1;
        }
    }
    /* Only OPTIONS may use "*", and the handler only knows absolute paths. */
    if (len >= outsz || path[0] != '/')
        return false;
    memcpy(out, path, len);
    out[len] = '\0';
    return true;
}

static int on_message_complete(http_parser *p)
{
    sts_conn_t *c = p->data;
    sts_server_t *s = c->srv;
    bool keep = http_should_keep_alive(p) && !p->upgrade;
    int rc;

    if (p->method == HTTP_GET || p->method == HTTP_HEAD) {
        char path[STS_MAX_HEADER + 1];
        if (!request_path(c, path, sizeof path)) {
            static char msg[] = "bad request target\n";
            keep = false;
            rc = conn_respond(c, 400, NULL, msg, strlen(msg), false, false, false);
        } else {
            sts_response_t resp = {.status = 500, .content_type = NULL, .body = NULL};
            const char *method = p->method == HTTP_HEAD ? "HEAD" : "GET";
            s->fn(s->ud, method, path, &resp);
            if (c->closing) {
                /* The handler stopped the server; nobody is left to answer. */
                free(resp.body);
                return 1;
            }
            if (!resp.body)
                resp.body_len = 0;
            rc = conn_respond(c, resp.status, resp.content_type, resp.body, resp.body_len, true,
                              p->method == HTTP_HEAD, keep);
        }
    } else {
        static char msg[] = "method not allowed\n";
        rc = conn_respond(c, 405, NULL, msg, strlen(msg), false, false, keep);
    }
    if (rc < 0)
        return 1;

    conn_arm_timer(c, STS_IDLE_MS);
    if (!keep) {
        /* Whatever follows the last request on the connection is never answered. */
        c->close_after = true;
        http_parser_pause(p, 1);
    } else if (c->queued_bytes > STS_MAX_QUEUED) {
        c->throttled = true;
        http_parser_pause(p, 1);
    }
    return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void process_input(sts_conn_t *c, const char *data, size_t len)
{
    size_t n = http_parser_execute(&c->parser, &parser_settings, data, len);
    if (c->closing)
        return;
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_PAUSED) {
        http_parser_pause(&c->parser, 0);
        if (c->close_after) {
            conn_stop_reading(c);
            conn_maybe_finish(c);
            return;
        }
        /* Throttled: keep the rest of the input until the queued responses drain. */
        conn_stop_reading(c);
        c->backlog = data + n;
        c->backlog_len = len - n;
        return;
    }
    if (e != HPE_OK) {
        conn_fail(c, c->reject_status ? c->reject_status : 400);
        return;
    }
    if (c->parser.upgrade || c->close_after) {
        /* We never switch protocols, so the bytes after an upgrade request are not HTTP. */
        c->close_after = true;
        conn_stop_reading(c);
        conn_maybe_finish(c);
    }
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    sts_conn_t *c = stream->data;
    if (c->closing)
        return;
    if (nread < 0) {
        if (nread != UV_EOF || c->shutting) {
            conn_close(c);
            return;
        }
        /* The client may half-close after its last request and still read the answers. */
        c->peer_eof = true;
        c->close_after = true;
        conn_stop_reading(c);
        conn_maybe_finish(c);
        return;
    }
    if (nread == 0 || c->shutting)
        return;
    process_input(c, c->rbuf, (size_t)nread);
}

/* ---- accepting ---------------------------------------------------------------------------- */

static int stream_init(sts_server_t *s, uv_stream_t *server, uv_handle_t *h)
{
    if (server->type == UV_NAMED_PIPE)
        return uv_pipe_init(s->loop, (uv_pipe_t *)h, 0);
    return uv_tcp_init(s->loop, (uv_tcp_t *)h);
}

/*
 * Over the connection limit we still accept, because libuv stops watching a listener whose
 * pending connection is not taken, and close at once so that the client sees EOF.
 */
static void refuse(sts_server_t *s, uv_stream_t *server)
{
    sts_refused_t *r = malloc(sizeof *r);
    if (!r || stream_init(s, server, &r->handle) < 0) {
        cm_err("status server: cannot refuse a connection: out of memory", "%s", "");
        free(r);
        return;
    }
    r->handle.data = s;
    s->open_handles++;
    (void)uv_accept(server, &r->stream);
    uv_close(&r->handle, on_refused_closed);
}

static void on_connection(uv_stream_t *server, int status)
{
    sts_server_t *s = server->data;
    if (status < 0) {
        cm_warn("status server: accept failed", "error=\"%s\"", uv_strerror(status));
        return;
    }
    if (s->stopping)
        return;
    if (s->nconns >= STS_MAX_CONNS) {
        refuse(s, server);
        return;
    }
    sts_conn_t *c = calloc(1, sizeof *c);
    if (!c) {
        refuse(s, server);
        return;
    }
    c->srv = s;
    if (stream_init(s, server, &c->io.handle) < 0) {
        free(c);
        refuse(s, server);
        return;
    }
    uv_timer_init(s->loop, &c->timer);
    c->io.handle.data = c;
    c->timer.data = c;
    c->open_handles = 2;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;

    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    s->open_handles++;

    if (uv_accept(server, &c->io.stream) < 0) {
        conn_close(c);
        return;
    }
    if (server->type == UV_TCP)
        uv_tcp_nodelay(&c->io.tcp, 1);
    conn_arm_timer(c, STS_IDLE_MS);
    conn_start_reading(c);
}

/* ---- listening ---------------------------------------------------------------------------- */

/*
 * Prepare the Unix socket path: a socket left behind by a dead daemon is removed, a socket a
 * live process still listens on is left alone (so a second daemon cannot steal the first one's
 * socket), and anything else is an operator's file we must not touch.
 */
static int unix_prepare_path(const char *path, const struct sockaddr_un *sa)
{
    struct stat st;
    if (lstat(path, &st) < 0) {
        if (errno == ENOENT)
            return 0;
        cm_err("status server: cannot inspect the socket path", "path=%s error=\"%s\"", path,
               strerror(errno));
        return STS_ELISTEN;
    }
    if (!S_ISSOCK(st.st_mode)) {
        cm_err("status server: the socket path exists and is not a socket; not replacing it",
               "path=%s", path);
        return STS_EEXIST;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd >= 0) {
        int rc = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
        int err = errno;
        close(fd);
        if (rc == 0 || err == EAGAIN || err == EINPROGRESS) {
            cm_err("status server: another process is listening on the socket", "path=%s", path);
            return STS_ELISTEN;
        }
    }
    if (unlink(path) < 0 && errno != ENOENT) {
        cm_err("status server: cannot remove the stale socket", "path=%s error=\"%s\"", path,
               strerror(errno));
        return STS_ELISTEN;
    }
    return 0;
}

static int unix_listen_fd(const char *path, int *out_fd, struct stat *out_st)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof sa.sun_path) {
        cm_err("status server: socket path is empty or too long", "path=%s max=%zu", path,
               sizeof sa.sun_path - 1);
        return STS_EINVAL;
    }
    memcpy(sa.sun_path, path, len + 1);

    int rc = unix_prepare_path(path, &sa);
    if (rc < 0)
        return rc;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        cm_err("status server: socket() failed", "error=\"%s\"", strerror(errno));
        return STS_ELISTEN;
    }
    if (bind(fd, (const struct sockaddr *)&sa, sizeof sa) < 0) {
        cm_err("status server: cannot bind the socket", "path=%s error=\"%s\"", path,
               strerror(errno));
        close(fd);
        return STS_ELISTEN;
    }
    /*
     * bind() created the file with the process umask applied; set the documented mode before
     * listen() so that no client can connect while the mode is still the umask's.
     */
    if (chmod(path, 0660) < 0 || lstat(path, out_st) < 0) {
        cm_err("status server: cannot set the socket mode", "path=%s error=\"%s\"", path,
               strerror(errno));
        unlink(path);
        close(fd);
        return STS_ELISTEN;
    }
    if (listen(fd, STS_BACKLOG) < 0) {
        cm_err("status server: cannot listen on the socket", "path=%s error=\"%s\"", path,
               strerror(errno));
        unlink(path);
        close(fd);
        return STS_ELISTEN;
    }
    *out_fd = fd;
    return 0;
}

/* Parse "host:port", "[v6]:port", ":port" or "*:port" (any address) into *sa. */
static int parse_host_port(const char *spec, struct sockaddr_storage *sa)
{
    char host[64];
    const char *colon;
    const char *hstart = spec;
    size_t hlen;
    bool v6 = false;

    if (spec[0] == '[') {
        const char *end = strchr(spec, ']');
        if (!end || end[1] != ':')
            return STS_EINVAL;
        hstart = spec + 1;
        hlen = (size_t)(end - hstart);
        colon = end + 1;
        v6 = true;
    } else {
        colon = strrchr(spec, ':');
        if (!colon)
            return STS_EINVAL;
        hlen = (size_t)(colon - spec);
    }
    if (hlen >= sizeof host)
        return STS_EINVAL;
    memcpy(host, hstart, hlen);
    host[hlen] = '\0';

    const char *ps = colon + 1;
    if (*ps < '0' || *ps > '9')
        return STS_EINVAL;
    char *end;
    errno = 0;
    long port = strtol(ps, &end, 10);
    if (errno || *end != '\0' || port < 1 || port > 65535)
        return STS_EINVAL;

    memset(sa, 0, sizeof *sa);
    if (v6)
        return uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)sa) == 0 ? 0 : STS_EINVAL;
    if (host[0] == '\0' || strcmp(host, "*") == 0)
        strcpy(host, "0.0.0.0");
    else if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    /* uv_ip4_addr() accepts forms like "1" through inet_pton's strictness; check it anyway. */
    struct in_addr probe;
    if (inet_pton(AF_INET, host, &probe) != 1)
        return STS_EINVAL;
    return uv_ip4_addr(host, (int)port, (struct sockaddr_in *)sa) == 0 ? 0 : STS_EINVAL;
}

static int tcp_listen_fd(const char *spec, int *out_fd)
{
    struct sockaddr_storage sa;
    if (parse_host_port(spec, &sa) < 0) {
        cm_err("status server: invalid listen address (want host:port or [v6]:port)", "listen=%s",
               spec);
        return STS_EINVAL;
    }
    socklen_t salen =
        sa.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        cm_err("status server: socket() failed", "error=\"%s\"", strerror(errno));
        return STS_ELISTEN;
    }
    /* A restarted daemon must be able to bind while old connections sit in TIME_WAIT. */
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, salen) < 0 || listen(fd, STS_BACKLOG) < 0) {
        cm_err("status server: cannot listen", "listen=%s error=\"%s\"", spec, strerror(errno));
        close(fd);
        return STS_ELISTEN;
    }
    *out_fd = fd;
    return 0;
}

int sts_start(uv_loop_t *loop, const char *socket_path, const char *tcp_listen, sts_handler_fn fn,
              void *ud, sts_server_t **out)
{
    if (out)
        *out = NULL;
    if (!loop || !fn || !out || (!socket_path && !tcp_listen))
        return STS_EINVAL;

    sts_server_t *s = calloc(1, sizeof *s);
    if (!s)
        return STS_ENOMEM;
    s->loop = loop;
    s->fn = fn;
    s->ud = ud;
    if (socket_path && !(s->socket_path = strdup(socket_path))) {
        free(s);
        return STS_ENOMEM;
    }

    int ufd = -1, tfd = -1, rc;
    struct stat st;
    if (socket_path) {
        rc = unix_listen_fd(socket_path, &ufd, &st);
        if (rc < 0)
            goto fail;
        s->sock_dev = st.st_dev;
        s->sock_ino = st.st_ino;
    }
    if (tcp_listen) {
        rc = tcp_listen_fd(tcp_listen, &tfd);
        if (rc < 0)
            goto fail;
    }

    /*
     * From here on the sockets belong to libuv handles. These calls only register descriptors
     * that are already listening, so they do not fail in practice; should one fail anyway, the
     * handles are closed through the loop and the server is freed when it runs.
     */
    if (ufd >= 0) {
        uv_pipe_init(loop, &s->pipe, 0);
        s->pipe.data = s;
        s->has_pipe = true;
        s->open_handles++;
        if ((rc = uv_pipe_open(&s->pipe, ufd)) < 0)
            close(ufd);
        ufd = -1;
        if (rc < 0 || (rc = uv_listen((uv_stream_t *)&s->pipe, STS_BACKLOG, on_connection)) < 0)
            goto fail_handles;
    }
    if (tfd >= 0) {
        uv_tcp_init(loop, &s->tcp);
        s->tcp.data = s;
        s->has_tcp = true;
        s->open_handles++;
        if ((rc = uv_tcp_open(&s->tcp, tfd)) < 0)
            close(tfd);
        tfd = -1;
        if (rc < 0 || (rc = uv_listen((uv_stream_t *)&s->tcp, STS_BACKLOG, on_connection)) < 0)
            goto fail_handles;
    }
    *out = s;
    return 0;

fail_handles:
    cm_err("status server: cannot register the listening sockets", "error=\"%s\"", uv_strerror(rc));
    if (tfd >= 0)
        close(tfd);
    sts_stop(s);
    return STS_ELISTEN;

fail:
    if (ufd >= 0) {
        close(ufd);
        unlink(socket_path);
    }
    free(s->socket_path);
    free(s);
    return rc;
}

void sts_stop(sts_server_t *s)
{
    if (!s || s->stopping)
        return;
    s->stopping = true;
    if (s->has_pipe)
        uv_close((uv_handle_t *)&s->pipe, on_listener_closed);
    if (s->has_tcp)
        uv_close((uv_handle_t *)&s->tcp, on_listener_closed);
    for (sts_conn_t *c = s->conns; c; c = c->next)
        conn_close(c);
    if (s->socket_path) {
        struct stat st;
        if (lstat(s->socket_path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == s->sock_dev &&
            st.st_ino == s->sock_ino)
            unlink(s->socket_path);
    }
    server_maybe_free(s);
}
