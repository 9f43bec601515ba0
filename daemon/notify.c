/*
 * notify.c - sd_notify for Type=notify services. See notify.h.
 */
#include "daemon/notify.h"

#include <stdarg.h>
#include <stdio.h>
#include <systemd/sd-daemon.h>

#include "daemon/util.h"

static uv_timer_t g_wd_timer;
static int g_wd_on;

void notify_ready(void)
{
    int r = sd_notify(0, "READY=1");
    if (r > 0)
        cm_info("notified systemd: ready", "%s", "");
    else if (r < 0)
        cm_warn("sd_notify READY=1 failed", "error=%d", r);
}

void notify_stopping(void)
{
    (void)sd_notify(0, "STOPPING=1");
}

void notify_status(const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "STATUS=");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    (void)sd_notify(0, buf);
}

static void on_wd_timer(uv_timer_t *t)
{
    (void)t;
    (void)sd_notify(0, "WATCHDOG=1");
}

uint64_t notify_watchdog_start(uv_loop_t *loop)
{
    uint64_t usec = 0;
    /* > 0 when WATCHDOG_USEC is set and WATCHDOG_PID is unset or ours. */
    if (g_wd_on || sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
        return 0;
    uint64_t ms = usec / 2000; /* half the interval, in ms */
    if (ms < 1)
        ms = 1;
    uv_timer_init(loop, &g_wd_timer);
    uv_timer_start(&g_wd_timer, on_wd_timer, 0, ms);
    g_wd_on = 1;
    cm_info("systemd watchdog on", "watchdog_usec=%llu ping_ms=%llu", (unsigned long long)usec,
            (unsigned long long)ms);
    return ms;
}

static void on_wd_closed(uv_handle_t *h)
{
    (void)h;
}

void notify_close(void)
{
    if (!g_wd_on)
        return;
    g_wd_on = 0;
    uv_timer_stop(&g_wd_timer);
    uv_close((uv_handle_t *)&g_wd_timer, on_wd_closed);
}
