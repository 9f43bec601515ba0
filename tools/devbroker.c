/*
 * clickmart-devbroker: a throw-away Kafka cluster for development and tests.
 *
 * It serves librdkafka's built-in mock cluster on loopback so that kcat, clickmart-gen and
 * clickmartd can talk to it like to a real broker, without a JVM.  The first line on stdout is
 * the bootstrap address; everything else goes to stderr, so a script can do
 *
 *     clickmart-devbroker --partitions 8 > addr.txt &
 *
 * and read the address from the file.
 *
 * Limits of the mock in librdkafka 2.0.2 (src/rdkafka_mock.c) that tests must respect:
 *
 *   - Each partition keeps only the last 5 MiB or 100000 message sets, whichever limit is hit
 *     first; older message sets are dropped silently and the log start offset moves on.  A
 *     consumer that starts from the beginning after that simply never sees them.  Tests must
 *     therefore stay under the limit, and big runs need compressed (zstd) batches, which store
 *     many events in one small message set, and more partitions.
 *   - A Fetch returns a single message set per partition, found by a linear scan, so small
 *     uncompressed batches make consumption slow.
 *   - A consumer that rejoins a group gets its partitions only after the previous member's
 *     session has expired, so a restart waits up to session.timeout.ms (45 s by default).
 *   - Everything lives in memory; killing the devbroker loses every topic.
 *
 * Signals: SIGTERM and SIGINT stop it cleanly; SIGUSR1 takes all brokers down (connections
 * are dropped and refused) and SIGUSR2 brings them up again, for fault-injection tests.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define DEFAULT_TOPIC "clickmart.events"
#define DEFAULT_PARTITIONS 4
#define DEFAULT_BROKERS 1
#define MAX_TOPICS 64

struct options {
    int partitions;
    int brokers;
    const char *topics[MAX_TOPICS];
    int ntopics;
};

/* Log lines carry a UTC timestamp so they can be lined up with the daemon's log. */
static void logmsg(const char *fmt, ...)
{
    char stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);

    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s devbroker: ", stamp);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: clickmart-devbroker [options]\n"
            "\n"
            "Serves librdkafka's in-memory mock Kafka cluster on loopback.  Prints the\n"
            "bootstrap address (host:port) as the first line on stdout, then logs to stderr.\n"
            "\n"
            "Options:\n"
            "  --partitions N   partitions of every topic created at start (default %d)\n"
            "  --topic NAME     topic to create at start; repeatable (default \"%s\")\n"
            "  --brokers N      number of mock brokers (default %d)\n"
            "  --help           show this help and exit\n"
            "\n"
            "Signals: SIGTERM/SIGINT stop it; SIGUSR1 takes all brokers down; SIGUSR2 brings\n"
            "them back up.\n"
            "\n"
            "Mock limits (librdkafka 2.0.2): each partition keeps only the last 5 MiB or\n"
            "100000 message sets, older ones vanish silently; use zstd batches and more\n"
            "partitions for big runs.  A consumer rejoining a group waits session.timeout.ms.\n",
            DEFAULT_PARTITIONS, DEFAULT_TOPIC, DEFAULT_BROKERS);
}

/* Parses a positive int, refusing trailing junk so that "--partitions 4x" is an error. */
static int parse_positive(const char *flag, const char *s, int max, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < 1 || v > max) {
        fprintf(stderr, "clickmart-devbroker: %s wants an integer in 1..%d, got \"%s\"\n", flag,
                max, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* Returns 0 to run, 1 to exit successfully (--help), -1 on a usage error. */
static int parse_args(int argc, char **argv, struct options *o)
{
    o->partitions = DEFAULT_PARTITIONS;
    o->brokers = DEFAULT_BROKERS;
    o->ntopics = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        /* Accept both "--flag value" and "--flag=value", the two forms people type. */
        const char *val = NULL;
        char name[64];
        const char *eq = strchr(a, '=');
        if (strncmp(a, "--", 2) == 0 && eq != NULL && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
            val = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", a);
        }

        if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
            usage(stdout);
            return 1;
        }
        int takes_value = strcmp(name, "--partitions") == 0 || strcmp(name, "--topic") == 0 ||
                          strcmp(name, "--brokers") == 0;
        if (!takes_value) {
            fprintf(stderr, "clickmart-devbroker: unknown option \"%s\" (see --help)\n", a);
            return -1;
        }
        if (val == NULL) {
            if (i + 1 >= argc) {
                fprintf(stderr, "clickmart-devbroker: %s needs a value\n", name);
                return -1;
            }
            val = argv[++i];
        }
        if (strcmp(name, "--partitions") == 0) {
            if (parse_positive(name, val, 100000, &o->partitions) != 0)
                return -1;
        } else if (strcmp(name, "--brokers") == 0) {
            if (parse_positive(name, val, 64, &o->brokers) != 0)
                return -1;
        } else {
            if (val[0] == '\0' || strlen(val) > 249) {
                fprintf(stderr, "clickmart-devbroker: --topic wants a name of 1..249 bytes\n");
                return -1;
            }
            if (o->ntopics >= MAX_TOPICS) {
                fprintf(stderr, "clickmart-devbroker: at most %d topics\n", MAX_TOPICS);
                return -1;
            }
            o->topics[o->ntopics++] = val;
        }
    }
    if (o->ntopics == 0)
        o->topics[o->ntopics++] = DEFAULT_TOPIC;
    return 0;
}

int main(int argc, char **argv)
{
    struct options opt;
    int rc = parse_args(argc, argv, &opt);
    if (rc != 0)
        return rc > 0 ? 0 : 2;

    /*
     * Block the signals we care about before librdkafka starts its threads, so that they
     * inherit the mask and every signal is left pending for the sigwait loop below.  That way
     * no mock API is ever called from a signal handler, where it would not be safe.
     */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGUSR1);
    sigaddset(&sigs, SIGUSR2);
    if (pthread_sigmask(SIG_BLOCK, &sigs, NULL) != 0) {
        logmsg("cannot block signals");
        return 1;
    }

    /*
     * The mock cluster needs an rd_kafka_t for its bookkeeping; a producer that is never used
     * is the cheapest one.  It has no bootstrap servers of its own, so it stays quiet.
     */
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* Log level 4 (warning) hides the notice that this handle has no bootstrap servers,
     * which is true and harmless here but looks like a fault in the log. */
    if (rd_kafka_conf_set(conf, "client.id", "clickmart-devbroker", errstr, sizeof errstr) !=
            RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(conf, "log_level", "4", errstr, sizeof errstr) != RD_KAFKA_CONF_OK) {
        logmsg("config: %s", errstr);
        rd_kafka_conf_destroy(conf);
        return 1;
    }
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (rk == NULL) {
        logmsg("cannot create the librdkafka handle: %s", errstr);
        return 1;
    }

    rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(rk, opt.brokers);
    if (mc == NULL) {
        logmsg("cannot create the mock cluster");
        rd_kafka_destroy(rk);
        return 1;
    }

    for (int i = 0; i < opt.ntopics; i++) {
        rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(mc, opt.topics[i], opt.partitions, 1);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            logmsg("cannot create topic %s: %s", opt.topics[i], rd_kafka_err2str(err));
            rd_kafka_mock_cluster_destroy(mc);
            rd_kafka_destroy(rk);
            return 1;
        }
        logmsg("topic %s: %d partitions", opt.topics[i], opt.partitions);
    }

    /* The address is the one line scripts wait for, so it goes out before anything else. */
    const char *boot = rd_kafka_mock_cluster_bootstraps(mc);
    printf("%s\n", boot);
    fflush(stdout);
    logmsg("%d broker(s) listening on %s (pid %ld); SIGUSR1 = down, SIGUSR2 = up, "
           "SIGTERM = stop",
           opt.brokers, boot, (long)getpid());

    for (;;) {
        int sig = 0;
        int err = sigwait(&sigs, &sig);
        if (err != 0) {
            /* sigwait only fails on a bad set, which would repeat forever: give up cleanly. */
            logmsg("sigwait failed: %s", strerror(err));
            break;
        }
        if (sig == SIGTERM || sig == SIGINT) {
            logmsg("received %s, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
            break;
        }
        if (sig == SIGUSR1) {
            rd_kafka_resp_err_t e = rd_kafka_mock_broker_set_down(mc, -1);
            logmsg("SIGUSR1: all brokers down (%s)", rd_kafka_err2str(e));
        } else if (sig == SIGUSR2) {
            rd_kafka_resp_err_t e = rd_kafka_mock_broker_set_up(mc, -1);
            logmsg("SIGUSR2: all brokers up (%s)", rd_kafka_err2str(e));
        }
    }

    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(rk);
    logmsg("stopped");
    return 0;
}
