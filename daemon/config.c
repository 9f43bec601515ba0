/*
 * config.c - one table drives the config file, the flags and --help.
 */
#include "daemon/config.h"

#include <errno.h>
#include <ini.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/heap.h"
#include "sink/sink.h"

enum opt_type { OPT_STR, OPT_INT, OPT_BOOL, OPT_DOUBLE };

typedef struct opt {
    const char *name;
    enum opt_type type;
    size_t off;
    const char *def;
    int64_t min, max;
    const char *help;
} opt_t;

#define O(f) offsetof(cfg_t, f)

static const opt_t opts[] = {
    {"config", OPT_STR, O(config_path), "", 0, 0,
     "Config file (INI: `name = value` lines; librdkafka properties in a [kafka] section)."},
    {"brokers", OPT_STR, O(brokers), "127.0.0.1:9092", 0, 0, "Kafka bootstrap servers."},
    {"topic", OPT_STR, O(topic), "clickmart.events", 0, 0, "Topic to consume."},
    {"group", OPT_STR, O(group), "clickmartd", 0, 0,
     "Consumer group id (committed group offsets are the fallback when LMDB has none)."},
    {"pg", OPT_STR, O(pg), "", 0, 0,
     "libpq conninfo string; empty uses libpq's environment variables and defaults."},
    {"schema", OPT_STR, O(schema), "clickmart", 0, 0, "Postgres schema for the marts."},
    {"state-dir", OPT_STR, O(state_dir), "./clickmart-state", 0, 0,
     "Directory of the LMDB state (created if missing)."},
    {"status-socket", OPT_STR, O(status_socket), "", 0, 0,
     "Unix socket path for the HTTP status server (empty: none)."},
    {"http-listen", OPT_STR, O(http_listen), "", 0, 0,
     "Also serve the status HTTP endpoints and the live page (GET /) on host:port (empty: "
     "none; no TLS or auth: bind to loopback or a trusted network)."},
    {"flush-interval-ms", OPT_INT, O(flush_interval_ms), "2000", 50, 3600000,
     "How often changed rows are flushed to Postgres."},
    {"flush-ahead-ms", OPT_INT, O(flush_ahead_ms), "500", 0, 3600000,
     "While an interval runs, write the rows changed so far into an open Postgres transaction "
     "every this many ms (nobody sees them before the commit), so that the flush at the tick "
     "only writes the rest and commits: rows become visible sooner after each tick, for some "
     "rows written twice (0 or >= the flush interval: off)."},
    {"catchup-flush-interval-ms", OPT_INT, O(catchup_flush_interval_ms), "0", 0, 3600000,
     "While intake is behind by more than a flush interval (a backlog; with --exit-at-end, until "
     "the end offsets), commit to Postgres at most this often; parts still write ahead. Postgres "
     "rewrites fewer per-user rows (-9 % rows in a 10 M backfill at 10000), but the loop thread "
     "collects more parts (that backfill ran 17 % slower). 0 or <= the flush interval: every "
     "flush interval."},
    {"batch-size", OPT_INT, O(batch_size), "40000", 1, 1000000,
     "Most messages in one batch: taken from librdkafka at once, validated on the thread "
     "pool and applied in order."},
    {"txn-messages", OPT_INT, O(txn_messages), "160000", 1, 4000000,
     "Most messages one LMDB transaction gathers from ready batches (at most 16; at or below "
     "--batch-size, one batch each; while catching up it may grow, see --txn-messages-max): "
     "fewer commits and fsyncs while catching up, more memory until the commit."},
    {"txn-messages-max", OPT_INT, O(txn_messages_max), "640000", 1, 4000000,
     "While catching up, transactions grow up to this many messages (doubling) when their "
     "commits write more than 600 bytes per message, as they do once the users spread over "
     "many more pages than a transaction touches; fewer pages rewritten per message, more "
     "memory until the commit. At most 16 batches; <= --txn-messages: never grow."},
    {"commit-interval-ms", OPT_INT, O(commit_interval_ms), "300", 0, 60000,
     "Longest an LMDB transaction stays open to gather batches before it commits (fewer "
     "commits: fewer fsyncs without checkpoints, fewer walks of the compactor and pages copied "
     "into nested transactions with them; a flush tick commits the open transaction first, so "
     "it does not delay the rows' visibility; 0: commit every batch). While catching up, "
     "--catchup-commit-interval-ms caps it."},
    {"catchup-commit-interval-ms", OPT_INT, O(catchup_commit_interval_ms), "100", 0, 60000,
     "While intake catches up (a backlog of at least --txn-messages, or --exit-at-end), the "
     "longest an LMDB transaction waits for more batches, when below --commit-interval-ms: "
     "the loop thread then bounds the throughput, and a transaction held open longer left it "
     "idle while the pool validated the next batch."},
    {"max-event-bytes", OPT_INT, O(max_event_bytes), "65536", 16, 16777216,
     "Messages longer than this are rejected as payload_too_large."},
    {"max-future-ms", OPT_INT, O(max_future_ms), "3600000", 0, 31536000000LL,
     "Events later than now plus this are rejected as future_timestamp."},
    {"allowed-lateness-ms", OPT_INT, O(allowed_lateness_ms), "172800000", 0, 31536000000LL,
     "Events older than the partition watermark minus this are rejected as too_late."},
    {"session-gap-ms", OPT_INT, O(session_gap_ms), "1800000", 1, 86400000,
     "A gap longer than this starts a new session."},
    {"max-dirty-rows", OPT_INT, O(max_dirty_rows), "2000000", 1000, 1000000000,
     "Unflushed rows before intake pauses (e.g. while Postgres is down)."},
    {"state-map-size-mb", OPT_INT, O(state_map_size_mb), "8192", 16, 16777216,
     "Initial LMDB map size; it grows by doubling when full."},
    {"heap-pad-mb", OPT_INT, O(heap_pad_mb), "64", 0, CM_HEAP_PAD_MAX_MB,
     "Heap the allocator takes beyond each need and keeps when memory is freed (glibc "
     "M_TOP_PAD): batches free and allocate again all the time, and returning the memory to "
     "the kernel only to fault it back in cost ~25% of the CPU per event (0: glibc's 128 KiB)."},
    {"heap-mmap-threshold-mb", OPT_INT, O(heap_mmap_threshold_mb), "32", 0,
     CM_HEAP_MMAP_THRESHOLD_MAX_MB,
     "Allocations from this size up get a mapping of their own (glibc M_MMAP_THRESHOLD), "
     "unmapped when freed; smaller ones come from the heaps and are reused. With a heap pad "
     "set glibc keeps 128 KiB, so librdkafka's fetch and decompression buffers were mapped "
     "and zeroed afresh for every fetch (0: glibc's; at most 32, glibc's limit)."},
    {"heap-arenas", OPT_INT, O(heap_arenas), "1", 0, CM_HEAP_ARENAS_MAX,
     "Most malloc arenas the threads share (glibc M_ARENA_MAX). With 1 every thread "
     "allocates from the main heap, which the pad keeps and the prefault helper faults in: "
     "librdkafka's broker thread reuses what the thread pool freed instead of faulting in "
     "heaps of its own (0: glibc's, up to 8 per core)."},
    {"heap-huge-pages", OPT_STR, O(heap_huge_pages), "auto", 0, 0,
     "Transparent huge pages: auto (measures a small-page fault at start: all where it "
     "takes 5 us or more, as on hosts whose hypervisor handles each fault, else loop), loop "
     "(the loop thread's heap and the large tables it probes at random; other threads' heaps "
     "on small pages, cheaper to fault in where a fault is cheap), all (every heap: "
     "glibc.malloc.hugetlb=1, the daemon re-executes itself once with GLIBC_TUNABLES set) or "
     "off. Needs THP in madvise or always mode; true and false mean all and off."},
    {"heap-prefault", OPT_BOOL, O(heap_prefault), "true", 0, 1,
     "Fault in the loop thread's heap as it grows on a helper thread (MADV_POPULATE_WRITE, "
     "Linux 5.14), so that the kernel zeroes fresh memory there and not on the thread that "
     "bounds intake; the heap pad's pages are then resident before they are used."},
    {"checkpoint-messages", OPT_INT, O(checkpoint_messages), "640000", 0, 4000000,
     "Transactions commit into a checkpoint transaction that becomes durable (one LMDB "
     "commit) before every flush and after this many messages: a page many transactions "
     "change is written once per flush; a crash replays from the last checkpoint. 0: every "
     "transaction commits durably. Off with --state-sync none."},
    {"state-sync", OPT_STR, O(state_sync), "meta", 0, 0,
     "LMDB durability: full (fsync data and meta), meta (one fsync per commit), none (no "
     "fsync, pages written in place: ~2x faster, safe against kill -9, not an OS crash)."},
    {"pg-retry-max-ms", OPT_INT, O(pg_retry_max_ms), "30000", 100, 3600000,
     "Longest back-off between Postgres retries."},
    {"shutdown-timeout-ms", OPT_INT, O(shutdown_timeout_ms), "30000", 0, 3600000,
     "How long the final flush may retry on shutdown before giving up (state is kept)."},
    {"kafka-close-timeout-ms", OPT_INT, O(kafka_close_timeout_ms), "5000", 0, 600000,
     "Longest wait at shutdown for librdkafka to close (its offset commits to the group "
     "are advisory; the state holds the offsets)."},
    {"sweep-per-batch", OPT_INT, O(sweep_per_batch), "4000", 0, 10000000,
     "Least state entries the compactor examines per batch; it examines at least twice "
     "the batch's accepted events (0 disables compaction)."},
    {"stats-log-interval-ms", OPT_INT, O(stats_log_interval_ms), "10000", 0, 3600000,
     "How often a summary line is logged (0: never)."},
    {"stats-interval-ms", OPT_INT, O(stats_interval_ms), "60000", 1000, 86400000,
     "How often the experiments' logistic regressions are refitted (and at shutdown)."},
    {"health-max-flush-age-ms", OPT_INT, O(health_max_flush_age_ms), "0", 0, 86400000,
     "/healthz fails when rows are pending and no flush succeeded for this long "
     "(0: 5 x --flush-interval-ms, or --catchup-flush-interval-ms when longer, + 30000)."},
    {"exposure-event", OPT_STR, O(exposure_event), "product_view", 0, 0,
     "Default exposure event type of experiments ([experiment.NAME] exposure_event overrides)."},
    {"window-days", OPT_INT, O(window_days), "7", 1, 365,
     "Default outcome window of experiments in days ([experiment.NAME] window_days overrides)."},
    {"confidence", OPT_DOUBLE, O(confidence), "0.95", 0, 0,
     "Confidence level of every interval and test, strictly between 0.5 and 1."},
    {"sequential-tuning", OPT_DOUBLE, O(sequential_tuning), "5000", 0, 0,
     "N* of the always-valid confidence sequence (the sample size it is tightest at), > 0."},
    {"exit-at-end", OPT_BOOL, O(exit_at_end), "false", 0, 1,
     "Consume up to the end offsets seen at start, flush and exit 0."},
    {"allow-state-rebuild", OPT_BOOL, O(allow_state_rebuild), "false", 0, 1,
     "With an empty state dir but populated tables: empty the tables and rebuild from the "
     "earliest offsets (without it the daemon refuses to start)."},
    {"print-config", OPT_BOOL, O(print_config), "false", 0, 1,
     "Print the effective settings (defaults, then the config file, then the flags; secrets "
     "redacted) as config-file lines and exit."},
    {"log-level", OPT_STR, O(log_level), "info", 0, 0, "error, warn, info or debug."},
    {"log-format", OPT_STR, O(log_format), "text", 0, 0, "text (key=value) or json."},
};

#define N_OPTS (sizeof opts / sizeof opts[0])

static void err(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void err(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
}

static char **str_field(cfg_t *c, const opt_t *o)
{
    return (char **)((char *)c + o->off);
}

static int set_opt(cfg_t *c, const opt_t *o, const char *v, char *eb, size_t ecap)
{
    if (o->type == OPT_STR) {
        char **p = str_field(c, o);
        char *d = strdup(v);
        if (!d) {
            err(eb, ecap, "out of memory");
            return CFG_EINVAL;
        }
        free(*p);
        *p = d;
        return 0;
    }
    if (o->type == OPT_BOOL) {
        int *p = (int *)((char *)c + o->off);
        if (!strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes") || !strcmp(v, "on"))
            *p = 1;
        else if (!strcmp(v, "false") || !strcmp(v, "0") || !strcmp(v, "no") || !strcmp(v, "off"))
            *p = 0;
        else {
            err(eb, ecap, "--%s: expected true or false, got '%s'", o->name, v);
            return CFG_EINVAL;
        }
        return 0;
    }
    char *end = NULL;
    errno = 0;
    if (o->type == OPT_DOUBLE) {
        double d = strtod(v, &end);
        int ok = !errno && end != v && *end == '\0' && d == d;
        if (ok && !strcmp(o->name, "confidence"))
            ok = d > 0.5 && d < 1.0;
        else if (ok)
            ok = d > 0 && d < 1e12;
        if (!ok) {
            err(eb, ecap, "--%s: '%s' is not a valid value (see --help)", o->name, v);
            return CFG_EINVAL;
        }
        /* memcpy: the field's place is known only as an offset. */
        memcpy((char *)c + o->off, &d, sizeof d);
        return 0;
    }
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end != '\0') {
        err(eb, ecap, "--%s: expected an integer, got '%s'", o->name, v);
        return CFG_EINVAL;
    }
    if (x < o->min || x > o->max) {
        err(eb, ecap, "--%s: %lld is out of range [%lld, %lld]", o->name, x, (long long)o->min,
            (long long)o->max);
        return CFG_EINVAL;
    }
    *(int64_t *)((char *)c + o->off) = x;
    return 0;
}

/* Find an option by name; '_' and '-' are the same so config files may use either. */
static const opt_t *find_opt(const char *name)
{
    char norm[64];
    size_t i = 0;
    for (; i < sizeof norm - 1 && name[i]; i++)
        norm[i] = name[i] == '_' ? '-' : name[i];
    norm[i] = '\0';
    for (size_t k = 0; k < N_OPTS; k++)
        if (!strcmp(opts[k].name, norm))
            return &opts[k];
    return NULL;
}

static int add_kafka_prop(cfg_t *c, const char *name, const char *value, char *eb, size_t ecap)
{
    for (int i = 0; i < c->n_kafka_props; i++) {
        if (!strcmp(c->kafka_prop_names[i], name)) {
            char *d = strdup(value);
            if (!d)
                return CFG_EINVAL;
            free(c->kafka_prop_values[i]);
            c->kafka_prop_values[i] = d;
            return 0;
        }
    }
    if (c->n_kafka_props >= CFG_MAX_KAFKA_PROPS) {
        err(eb, ecap, "too many librdkafka properties (at most %d)", CFG_MAX_KAFKA_PROPS);
        return CFG_EINVAL;
    }
    c->kafka_prop_names[c->n_kafka_props] = strdup(name);
    c->kafka_prop_values[c->n_kafka_props] = strdup(value);
    c->n_kafka_props++;
    return 0;
}

void cfg_defaults(cfg_t *c)
{
    memset(c, 0, sizeof *c);
    char eb[16];
    for (size_t k = 0; k < N_OPTS; k++)
        set_opt(c, &opts[k], opts[k].def, eb, sizeof eb);
}

static cfg_experiment_t *find_experiment(cfg_t *c, const char *name, char *eb, size_t ecap)
{
    for (int i = 0; i < c->n_experiments; i++)
        if (!strcmp(c->experiments[i].name, name))
            return &c->experiments[i];
    size_t n = strlen(name);
    if (n == 0 || n > 64) {
        err(eb, ecap, "[experiment.%s]: an experiment name has 1 to 64 bytes", name);
        return NULL;
    }
    if (c->n_experiments >= CFG_MAX_EXPERIMENTS) {
        err(eb, ecap, "at most %d [experiment.*] sections", CFG_MAX_EXPERIMENTS);
        return NULL;
    }
    cfg_experiment_t *e = &c->experiments[c->n_experiments++];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    return e->name ? e : NULL;
}

/* weights = "control:50,treatment:50" (names and relative weights). */
static int parse_weights(cfg_experiment_t *e, const char *v, char *eb, size_t ecap)
{
    char *copy = strdup(v), *save = NULL;
    if (!copy)
        return CFG_EINVAL;
    int rc = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok && rc == 0; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ')
            tok++;
        char *colon = strrchr(tok, ':');
        char *end = NULL;
        double w = colon ? strtod(colon + 1, &end) : 0;
        if (!colon || colon == tok || end == colon + 1 || *end != '\0' || !(w > 0) ||
            e->n_weights >= CFG_MAX_WEIGHTS) {
            err(eb, ecap,
                "[experiment.%s] weights: expected name:weight,... with positive "
                "weights (at most %d), got '%s'",
                e->name, CFG_MAX_WEIGHTS, v);
            rc = CFG_EFILE;
            break;
        }
        *colon = '\0';
        e->weight_names[e->n_weights] = strdup(tok);
        e->weights[e->n_weights++] = w;
    }
    free(copy);
    return rc;
}

static int set_experiment(cfg_t *c, const char *exp, const char *name, const char *value, char *eb,
                          size_t ecap)
{
    cfg_experiment_t *e = find_experiment(c, exp, eb, ecap);
    if (!e)
        return CFG_EFILE;
    if (!strcmp(name, "control")) {
        free(e->control);
        e->control = strdup(value);
    } else if (!strcmp(name, "exposure_event") || !strcmp(name, "exposure-event")) {
        free(e->exposure_event);
        e->exposure_event = strdup(value);
    } else if (!strcmp(name, "window_days") || !strcmp(name, "window-days")) {
        char *end = NULL;
        long d = strtol(value, &end, 10);
        if (end == value || *end != '\0' || d < 1 || d > 365) {
            err(eb, ecap, "[experiment.%s] window_days: expected 1..365, got '%s'", exp, value);
            return CFG_EFILE;
        }
        e->window_days = (int)d;
    } else if (!strcmp(name, "weights")) {
        for (int i = 0; i < e->n_weights; i++)
            free(e->weight_names[i]);
        e->n_weights = 0;
        return parse_weights(e, value, eb, ecap);
    } else {
        err(eb, ecap,
            "[experiment.%s]: unknown setting '%s' (control, weights, exposure_event, "
            "window_days)",
            exp, name);
        return CFG_EFILE;
    }
    return 0;
}

struct ini_ctx {
    cfg_t *c;
    char *eb;
    size_t ecap;
    int rc;
};

static int ini_cb(void *ud, const char *section, const char *name, const char *value)
{
    struct ini_ctx *x = ud;
    if (x->rc)
        return 0;
    if (!strcmp(section, "kafka")) {
        x->rc = add_kafka_prop(x->c, name, value, x->eb, x->ecap);
        return x->rc == 0;
    }
    if (!strncmp(section, "experiment.", 11)) {
        x->rc = set_experiment(x->c, section + 11, name, value, x->eb, x->ecap);
        return x->rc == 0;
    }
    if (section[0] && strcmp(section, "clickmartd") != 0) {
        err(x->eb, x->ecap, "unknown section [%s]", section);
        x->rc = CFG_EFILE;
        return 0;
    }
    const opt_t *o = find_opt(name);
    if (!o || !strcmp(o->name, "config")) {
        err(x->eb, x->ecap, "unknown setting '%s'", name);
        x->rc = CFG_EFILE;
        return 0;
    }
    x->rc = set_opt(x->c, o, value, x->eb, x->ecap);
    return x->rc == 0;
}

/*
 * inih reads a line into a buffer of its own size (INI_MAX_LINE, 200 bytes
 * in Debian's build) and takes the rest of a longer line for the next line,
 * which, starting with a space, it then reads as a continuation of the
 * previous setting's value: a long comment line turned into a bad value for
 * the setting above it. This reader hands inih each line's start and drops
 * the rest; a long comment is harmless, a long setting an error.
 */
struct line_reader {
    FILE *f;
    int line;     /* lines read so far */
    int too_long; /* the first setting line longer than the buffer, 0: none */
    int max;      /* inih's buffer size */
};

static char *read_line(char *str, int num, void *stream)
{
    struct line_reader *r = stream;
    r->max = num;
    if (!fgets(str, num, r->f))
        return NULL;
    r->line++;
    size_t n = strlen(str);
    if (n > 0 && str[n - 1] == '\n')
        return str;
    int ch = fgetc(r->f);
    if (ch == EOF || ch == '\n')
        return str; /* the whole line fitted */
    while ((ch = fgetc(r->f)) != EOF && ch != '\n') {
    }
    const char *p = str + strspn(str, " \t");
    if (*p != '#' && *p != ';' && !r->too_long)
        r->too_long = r->line;
    return str;
}

static int load_file(cfg_t *c, const char *path, char *eb, size_t ecap)
{
    struct ini_ctx x = {c, eb, ecap, 0};
    struct line_reader rd = {fopen(path, "r"), 0, 0, 0};
    if (!rd.f) {
        err(eb, ecap, "cannot open config file %s: %s", path, strerror(errno));
        return CFG_EFILE;
    }
    int r = ini_parse_stream(read_line, &rd, ini_cb, &x);
    fclose(rd.f);
    if (rd.too_long) {
        err(eb, ecap, "%s: line %d is too long (a setting line fits in %d bytes)", path,
            rd.too_long, rd.max - 1);
        return CFG_EFILE;
    }
    if (x.rc) {
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s: %s", path, eb);
        snprintf(eb, ecap, "%s", tmp);
        return CFG_EFILE;
    }
    if (r > 0) {
        err(eb, ecap, "%s: syntax error on line %d", path, r);
        return CFG_EFILE;
    }
    return 0;
}

static int parse_kafka_flag(cfg_t *c, const char *kv, char *eb, size_t ecap)
{
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv) {
        err(eb, ecap, "-X expects prop=value, got '%s'", kv);
        return CFG_EINVAL;
    }
    char name[256];
    size_t n = (size_t)(eq - kv);
    if (n >= sizeof name) {
        err(eb, ecap, "-X property name too long");
        return CFG_EINVAL;
    }
    memcpy(name, kv, n);
    name[n] = '\0';
    return add_kafka_prop(c, name, eq + 1, eb, ecap);
}

int cfg_parse(cfg_t *c, int argc, char **argv, char *eb, size_t ecap)
{
    /* The config file is applied first so that flags override it. */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return CFG_HELP;
        if (!strcmp(argv[i], "--version"))
            return CFG_VERSION;
        if (!strncmp(argv[i], "--config=", 9)) {
            set_opt(c, &opts[0], argv[i] + 9, eb, ecap);
        } else if (!strcmp(argv[i], "--config") && i + 1 < argc) {
            set_opt(c, &opts[0], argv[i + 1], eb, ecap);
        }
    }
    if (c->config_path[0]) {
        int r = load_file(c, c->config_path, eb, ecap);
        if (r)
            return r;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-X")) {
            if (i + 1 >= argc) {
                err(eb, ecap, "-X needs prop=value");
                return CFG_EINVAL;
            }
            int r = parse_kafka_flag(c, argv[++i], eb, ecap);
            if (r)
                return r;
            continue;
        }
        if (!strncmp(a, "-X", 2)) {
            int r = parse_kafka_flag(c, a + 2, eb, ecap);
            if (r)
                return r;
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            err(eb, ecap, "unexpected argument '%s' (see --help)", a);
            return CFG_EINVAL;
        }
        char name[64];
        const char *val = NULL;
        const char *eq = strchr(a + 2, '=');
        size_t n = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
        if (n >= sizeof name) {
            err(eb, ecap, "unknown flag '%s' (see --help)", a);
            return CFG_EINVAL;
        }
        memcpy(name, a + 2, n);
        name[n] = '\0';
        const opt_t *o = find_opt(name);
        if (!o) {
            err(eb, ecap, "unknown flag '%s' (see --help)", a);
            return CFG_EINVAL;
        }
        if (eq) {
            val = eq + 1;
        } else if (o->type == OPT_BOOL) {
            val = "true";
        } else {
            if (i + 1 >= argc) {
                err(eb, ecap, "--%s needs a value", o->name);
                return CFG_EINVAL;
            }
            val = argv[++i];
        }
        int r = set_opt(c, o, val, eb, ecap);
        if (r)
            return r;
    }
    return 0;
}

void cfg_print_help(FILE *out, const char *prog)
{
    fprintf(out,
            "Usage: %s [options]\n\n"
            "clickmartd consumes clickstream events from Kafka, keeps exact incremental marts in\n"
            "LMDB and flushes them to PostgreSQL. Every option can also be set in the config\n"
            "file as `name = value` (dashes or underscores).\n\nOptions:\n",
            prog);
    for (size_t k = 0; k < N_OPTS; k++) {
        const opt_t *o = &opts[k];
        char left[64];
        snprintf(left, sizeof left, "--%s%s", o->name,
                 o->type == OPT_BOOL ? "" : (o->type == OPT_STR ? " VALUE" : " N"));
        fprintf(out, "  %-28s %s", left, o->help);
        if (o->type == OPT_INT)
            fprintf(out, " [default %s, %lld..%lld]", o->def, (long long)o->min, (long long)o->max);
        else if (o->def[0])
            fprintf(out, " [default %s]", o->def);
        fputc('\n', out);
    }
    fprintf(out, "\nPer-experiment settings go in the config file, one section per experiment:\n"
                 "  [experiment.checkout_redesign]\n"
                 "  control = control\n"
                 "  weights = control:50,treatment:50\n"
                 "  exposure_event = product_view\n"
                 "  window_days = 7\n\n");
    fprintf(out, "  %-28s %s\n", "-X prop=value",
            "Pass a librdkafka property (TLS, SASL, ...), as kcat does; repeatable. "
            "clickmartd sets fetch.wait.max.ms=100 and queued.min.messages=1000000 unless given "
            "(docs/devbroker.md, docs/operations.md).");
    fprintf(out, "  %-28s %s\n", "--help", "Show this help and exit.");
    fprintf(out, "  %-28s %s\n", "--version", "Show the version and exit.");
}

static int is_secret_prop(const char *name)
{
    return strstr(name, "password") || strstr(name, "secret") || strstr(name, "key.pem") ||
           strstr(name, "token");
}

void cfg_dump(const cfg_t *c, FILE *out)
{
    for (size_t k = 0; k < N_OPTS; k++) {
        const opt_t *o = &opts[k];
        const char *base = (const char *)c + o->off;
        if (o->type == OPT_STR) {
            const char *v = *(char *const *)base;
            if (!strcmp(o->name, "pg")) {
                char red[1024];
                snk_redact_conninfo(v, red, sizeof red);
                fprintf(out, "%s = %s\n", o->name, red);
            } else {
                fprintf(out, "%s = %s\n", o->name, v);
            }
        } else if (o->type == OPT_INT) {
            fprintf(out, "%s = %lld\n", o->name, (long long)*(const int64_t *)base);
        } else if (o->type == OPT_DOUBLE) {
            double d;
            memcpy(&d, base, sizeof d);
            fprintf(out, "%s = %g\n", o->name, d);
        } else {
            fprintf(out, "%s = %s\n", o->name, *(const int *)base ? "true" : "false");
        }
    }
    /* The rest as config-file sections, so that the output reads as a config file. */
    if (c->n_kafka_props > 0)
        fprintf(out, "\n[kafka]\n");
    for (int i = 0; i < c->n_kafka_props; i++)
        fprintf(out, "%s = %s\n", c->kafka_prop_names[i],
                is_secret_prop(c->kafka_prop_names[i]) ? "***" : c->kafka_prop_values[i]);
    for (int i = 0; i < c->n_experiments; i++) {
        const cfg_experiment_t *e = &c->experiments[i];
        fprintf(out, "\n[experiment.%s]\n", e->name);
        if (e->control)
            fprintf(out, "control = %s\n", e->control);
        if (e->n_weights > 0) {
            fprintf(out, "weights = ");
            for (int k = 0; k < e->n_weights; k++)
                fprintf(out, "%s%s:%g", k ? "," : "", e->weight_names[k], e->weights[k]);
            fputc('\n', out);
        }
        if (e->exposure_event)
            fprintf(out, "exposure_event = %s\n", e->exposure_event);
        if (e->window_days)
            fprintf(out, "window_days = %d\n", e->window_days);
    }
}

void cfg_free(cfg_t *c)
{
    for (size_t k = 0; k < N_OPTS; k++)
        if (opts[k].type == OPT_STR)
            free(*str_field(c, &opts[k]));
    for (int i = 0; i < c->n_kafka_props; i++) {
        free(c->kafka_prop_names[i]);
        free(c->kafka_prop_values[i]);
    }
    for (int i = 0; i < c->n_experiments; i++) {
        cfg_experiment_t *e = &c->experiments[i];
        free(e->name);
        free(e->control);
        free(e->exposure_event);
        for (int k = 0; k < e->n_weights; k++)
            free(e->weight_names[k]);
    }
    memset(c, 0, sizeof *c);
}
