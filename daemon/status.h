/*
 * status.h - the daemon's small HTTP/1.1 server (status socket, optional TCP).
 *
 * Operators reach it with `curl --unix-socket PATH http://localhost/status`.
 * The server only parses requests and writes responses; what each path
 * returns is decided by the handler the daemon passes in. Loop thread only.
 */
#ifndef CLICKMART_DAEMON_STATUS_H
#define CLICKMART_DAEMON_STATUS_H

#include <stddef.h>
#include <uv.h>

#define STS_EEXIST (-1)  /* the socket path exists and is not a socket */
#define STS_ELISTEN (-2) /* bind/listen failed (see errno-style message in log) */
#define STS_EINVAL (-3)  /* bad argument, e.g. a malformed host:port */
#define STS_ENOMEM (-4)

typedef struct sts_server sts_server_t;

/* A response built by the handler. body is malloc'ed; the server frees it. */
typedef struct sts_response {
    int status;               /* 200, 404, 503, ... */
    const char *content_type; /* static string */
    char *body;
    size_t body_len;
} sts_response_t;

/*
 * Called on the loop thread for every complete GET/HEAD request. `path` is the
 * request target without the query string. The handler fills *resp; it must
 * not block.
 */
typedef void (*sts_handler_fn)(void *ud, const char *method, const char *path,
                               sts_response_t *resp);

/*
 * Start listening on a Unix socket at `socket_path` (created with mode 0660;
 * a stale socket is replaced, any other existing file makes it fail with
 * STS_EEXIST) and, when `tcp_listen` is not NULL, on "host:port" too.
 * Either may be NULL, not both. Requests are limited to 8 KiB of headers and
 * at most 64 concurrent connections; idle connections close after 10 s.
 */
int sts_start(uv_loop_t *loop, const char *socket_path, const char *tcp_listen, sts_handler_fn fn,
              void *ud, sts_server_t **out);

/* Stop listening, close every connection and unlink the socket. The server
 * is freed once libuv has closed all its handles (run the loop once more). */
void sts_stop(sts_server_t *s);

const char *sts_strerror(int err);

#endif
