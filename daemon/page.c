/*
 * page.c - the live page's history ring and /api/snapshot. See page.h.
 */
#include "daemon/page.h"

#include <math.h>
#include <string.h>

/* Generated at build time from daemon/page.html (cmake/embed.cmake). */
extern const unsigned char clickmart_page_html[];
extern const size_t clickmart_page_html_len;

void page_hist_sample(page_hist_t *h, double mono_ms, int64_t now_ms, uint64_t messages,
                      int64_t accepted, int64_t lag, double lag_s)
{
    double rate = 0, arate = 0;
    if (h->primed) {
        double dt = (mono_ms - h->last_mono) / 1000.0;
        if (dt > 0) {
            rate = messages >= h->last_msgs ? (double)(messages - h->last_msgs) / dt : 0;
            arate = accepted >= h->last_accepted ? (double)(accepted - h->last_accepted) / dt : 0;
        }
    }
    h->primed = 1;
    h->last_mono = mono_ms;
    h->last_msgs = messages;
    h->last_accepted = accepted;
    page_sample_t *s = &h->s[h->head];
    s->t_ms = now_ms;
    s->rate = rate;
    s->accepted_rate = arate;
    s->lag = lag;
    s->lag_s = lag_s;
    h->head = (h->head + 1) % PAGE_HIST_CAP;
    if (h->n < PAGE_HIST_CAP)
        h->n++;
}

static json_t *num(double v)
{
    return isfinite(v) ? json_real(round(v * 1000.0) / 1000.0) : json_null();
}

static json_t *hist_json(const page_hist_t *h)
{
    json_t *o = json_object();
    json_t *t = json_array(), *rate = json_array(), *arate = json_array(), *lag = json_array(),
           *lag_s = json_array();
    for (int i = 0; i < h->n; i++) {
        const page_sample_t *s = &h->s[(h->head - h->n + i + PAGE_HIST_CAP) % PAGE_HIST_CAP];
        json_array_append_new(t, json_integer(s->t_ms));
        json_array_append_new(rate, num(s->rate));
        json_array_append_new(arate, num(s->accepted_rate));
        json_array_append_new(lag, json_integer(s->lag));
        json_array_append_new(lag_s, s->lag_s >= 0 ? num(s->lag_s) : json_null());
    }
    json_object_set_new(o, "interval_ms", json_integer(PAGE_SAMPLE_MS));
    json_object_set_new(o, "t", t);
    json_object_set_new(o, "rate", rate);
    json_object_set_new(o, "accepted_rate", arate);
    json_object_set_new(o, "lag", lag);
    json_object_set_new(o, "lag_s", lag_s);
    return o;
}

char *page_snapshot_json(json_t *status, const char *marts_json, const char *marts_error,
                         const page_hist_t *h, int64_t now_ms)
{
    json_t *root = json_object();
    if (!root) {
        json_decref(status);
        return NULL;
    }
    json_object_set_new(root, "now", json_integer(now_ms));
    json_object_set_new(root, "status", status ? status : json_null());
    json_object_set_new(root, "history", hist_json(h));
    json_t *marts = marts_json ? json_loads(marts_json, 0, NULL) : NULL;
    if (json_is_object(marts))
        json_object_update(root, marts);
    else
        json_object_set_new(root, "marts_error",
                            json_string(marts_error ? marts_error : "no snapshot"));
    json_decref(marts);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return s;
}

const char *page_html(size_t *len)
{
    *len = clickmart_page_html_len;
    return (const char *)clickmart_page_html;
}
