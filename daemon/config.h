/*
 * config.h - the daemon's settings, driven by one table.
 *
 * Every setting has one row in the table in config.c (name, type, default,
 * bounds, help). That table parses the config file, parses the command-line
 * flags and prints --help, so the three can never disagree. Settings apply in
 * this order: defaults, then the config file (--config), then the flags.
 */
#ifndef CLICKMART_DAEMON_CONFIG_H
#define CLICKMART_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CFG_MAX_KAFKA_PROPS 64
#define CFG_MAX_EXPERIMENTS 64
#define CFG_MAX_WEIGHTS 16

/* One [experiment.NAME] section of the config file. */
typedef struct cfg_experiment {
    char *name;
    char *control;        /* NULL: the contract's default */
    char *exposure_event; /* NULL: --exposure-event */
    int window_days;      /* 0: --window-days */
    int n_weights;
    char *weight_names[CFG_MAX_WEIGHTS];
    double weights[CFG_MAX_WEIGHTS];
} cfg_experiment_t;

typedef struct cfg {
    char *config_path;
    char *brokers;
    char *topic;
    char *group;
    char *pg;
    char *schema;
    char *state_dir;
    char *status_socket;
    char *http_listen;
    char *log_level;
    char *log_format;
    char *state_sync;
    int64_t flush_interval_ms;
    int64_t flush_ahead_ms;
    int64_t catchup_flush_interval_ms;
    int64_t batch_size;
    int64_t txn_messages;
    int64_t txn_messages_max;
    int64_t checkpoint_messages;
    int64_t commit_interval_ms;
    int64_t catchup_commit_interval_ms;
    int64_t max_event_bytes;
    int64_t max_future_ms;
    int64_t allowed_lateness_ms;
    int64_t session_gap_ms;
    int64_t max_dirty_rows;
    int64_t state_map_size_mb;
    int64_t heap_pad_mb;
    int64_t heap_mmap_threshold_mb;
    int64_t heap_arenas;
    char *heap_huge_pages;
    int heap_prefault;
    int64_t pg_retry_max_ms;
    int64_t shutdown_timeout_ms;
    int64_t kafka_close_timeout_ms;
    int64_t sweep_per_batch;
    int64_t stats_log_interval_ms;
    int64_t stats_interval_ms;
    int64_t health_max_flush_age_ms; /* 0: 5 x flush_interval_ms + 30 s */
    int64_t window_days;
    char *exposure_event;
    double confidence;
    double sequential_tuning;
    int exit_at_end;
    int allow_state_rebuild;
    int print_config; /* --print-config: cfg_dump and exit */
    int n_experiments;
    cfg_experiment_t experiments[CFG_MAX_EXPERIMENTS];
    /* librdkafka properties from -X prop=value and the [kafka] section. */
    int n_kafka_props;
    char *kafka_prop_names[CFG_MAX_KAFKA_PROPS];
    char *kafka_prop_values[CFG_MAX_KAFKA_PROPS];
} cfg_t;

#define CFG_EINVAL (-1) /* a bad flag or value; the message is in errbuf */
#define CFG_EFILE (-2)  /* the config file could not be read or parsed */
#define CFG_HELP 1      /* --help was given: help was printed, exit 0 */
#define CFG_VERSION 2   /* --version was given */

/* Fill c with the defaults. Free with cfg_free. */
void cfg_defaults(cfg_t *c);

/*
 * Apply the config file named by --config (if any) and then the flags.
 * Returns 0, CFG_HELP, CFG_VERSION or a negative error with a message in
 * errbuf. Not thread-safe (call once at startup).
 */
int cfg_parse(cfg_t *c, int argc, char **argv, char *errbuf, size_t errcap);

/* Print the --help text generated from the table. */
void cfg_print_help(FILE *out, const char *prog);

/* Print every setting as "name = value" (the effective configuration), with
 * the Postgres password and librdkafka secrets redacted. */
void cfg_dump(const cfg_t *c, FILE *out);

void cfg_free(cfg_t *c);

#endif
