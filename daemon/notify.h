/*
 * notify.h - systemd service notifications (sd_notify) for Type=notify.
 *
 * Every call is a no-op when the daemon was not started by systemd (no
 * NOTIFY_SOCKET in the environment), so the daemon calls them
 * unconditionally. Loop thread only.
 */
#ifndef CLICKMART_DAEMON_NOTIFY_H
#define CLICKMART_DAEMON_NOTIFY_H

#include <stdint.h>
#include <uv.h>

/* READY=1: start-up is complete (state opened, consumer and status server
 * running). */
void notify_ready(void);

/* STOPPING=1: shutdown began (intake stopped, final flush under way). */
void notify_stopping(void);

/* STATUS=...: a one-line human-readable status shown by `systemctl status`. */
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * When the service manager asked for watchdog pings (WatchdogSec=, passed as
 * WATCHDOG_USEC and WATCHDOG_PID), start a libuv timer on `loop` that sends
 * WATCHDOG=1 every half of that interval: a stuck loop stops the pings and
 * systemd restarts the daemon. Returns the ping interval in ms, 0 when the
 * watchdog is off. Call notify_close before closing the loop.
 */
uint64_t notify_watchdog_start(uv_loop_t *loop);

/* Stop and close the watchdog timer (if any); the loop must run once more. */
void notify_close(void);

#endif
