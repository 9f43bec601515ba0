/*
 * validate.h - turn one Kafka message value into a checked event (CONTRACT §1).
 *
 * Validation is a pure function of the message bytes, the wall clock and the
 * limits: it touches no shared state, so it may run on any thread. The
 * watermark check (too_late) and duplicate detection need per-partition state
 * and therefore live in the aggregator (CONTRACT §2).
 */
#ifndef CLICKMART_INGEST_VALIDATE_H
#define CLICKMART_INGEST_VALIDATE_H

#include <stddef.h>
#include <stdint.h>

/* Reject reasons in precedence order (CONTRACT §1.1). ING_OK is not a reject. */
typedef enum ing_reason {
    ING_OK = 0,
    ING_R_PAYLOAD_TOO_LARGE,
    ING_R_INVALID_JSON,
    ING_R_NOT_AN_OBJECT,
    ING_R_MISSING_FIELD,
    ING_R_BAD_TYPE,
    ING_R_BAD_VALUE,
    ING_R_FUTURE_TIMESTAMP,
    ING_R_TOO_LATE,
    ING_R__COUNT
} ing_reason_t;

/* Event type codes. Every type not listed is ING_ET_OTHER (activity). */
typedef enum ing_etype {
    ING_ET_OTHER = 0,
    ING_ET_PAGE_VIEW,
    ING_ET_PRODUCT_VIEW,
    ING_ET_ADD_TO_CART,
    ING_ET_CHECKOUT,
    ING_ET_PURCHASE,
    ING_ET_ASSIGNMENT,
    ING_ET__COUNT
} ing_etype_t;

#define ING_ID_MAX 128    /* event_id, user_id, product_id */
#define ING_TYPE_MAX 64   /* event_type */
#define ING_ATTR_MAX 32   /* device, country */
#define ING_EXP_MAX 64    /* experiment, variant */
#define ING_ITEMS_MAX 100 /* items per purchase */
#define ING_TS_MIN 946684800000LL
#define ING_TS_END 4102444800000LL

typedef struct ing_item {
    char product_id[ING_ID_MAX + 1];
    uint8_t product_id_len;
    int64_t quantity;    /* 1 .. 1e6, default 1 */
    int64_t price_cents; /* llround(price * 100.0), default 0 */
} ing_item_t;

/*
 * One accepted-by-validation event. Strings are copied in, NUL-terminated,
 * with their byte length beside them; a length of 0 means "absent" for the
 * optional fields (device, country, product_id). Fields that the contract
 * says to ignore for this event type are left absent / zero.
 */
typedef struct ing_event {
    char event_id[ING_ID_MAX + 1];
    uint8_t event_id_len;
    char user_id[ING_ID_MAX + 1];
    uint8_t user_id_len;
    char event_type[ING_TYPE_MAX + 1];
    uint8_t event_type_len;
    ing_etype_t type; /* code of event_type */
    int64_t ts;       /* ms since the epoch */
    char device[ING_ATTR_MAX + 1];
    uint8_t device_len;
    char country[ING_ATTR_MAX + 1];
    uint8_t country_len;
    char product_id[ING_ID_MAX + 1];
    uint8_t product_id_len;
    int64_t amount_cents; /* purchase only: llround(amount * 100.0) */
    char experiment[ING_EXP_MAX + 1];
    uint8_t experiment_len; /* assignment only */
    char variant[ING_EXP_MAX + 1];
    uint8_t variant_len; /* assignment only */
    int n_items;         /* purchase only */
    ing_item_t items[ING_ITEMS_MAX];
} ing_event_t;

typedef struct ing_limits {
    int64_t max_event_bytes; /* payload_too_large above this (default 65536) */
    int64_t max_future_ms;   /* future_timestamp when ts > now + this (default 3600000) */
} ing_limits_t;

/*
 * Validate one message value. Returns ING_OK and fills *out, or the first
 * reject reason that applies (reason precedence first, then field order) and
 * writes the detail (the field's name, or "" when the reason has none) into
 * detail[0..detail_cap). `buf` need not be NUL-terminated; it is not retained.
 * Never aborts on any input. Thread-safe (uses only its arguments).
 */
ing_reason_t ing_validate(const char *buf, size_t len, int64_t now_ms, const ing_limits_t *lim,
                          ing_event_t *out, char *detail, size_t detail_cap);

/* The same validation with every message parsed by jansson (ing_validate
 * parses plain messages with a faster, stricter parser and falls back to
 * jansson for the rest). For the differential tests that prove both paths
 * accept, reject and read exactly the same; any thread. */
ing_reason_t ing_validate_reference(const char *buf, size_t len, int64_t now_ms,
                                    const ing_limits_t *lim, ing_event_t *out, char *detail,
                                    size_t detail_cap);

/* 1 when ing_validate reads this message with its fast parser rather than
 * jansson (tests use it to know the differential checks cover that path). */
int ing_validate_fast_path(const char *buf, size_t len);

/*
 * A validated event packed for the queues between validation and the marts:
 * the scalar fields, then the strings and items at their used lengths (an
 * ing_event_t reserves the longest of each, about 680 bytes before its items;
 * a typical event packs into about 120). Batches wait in memory until their
 * LMDB commit, and every byte of them is memory the kernel must fault in and
 * zero first, so the queues hold this form and the marts unpack one event at
 * a time into a reused ing_event_t.
 *
 * Layout: this header, the strings of ING_PF_* in that order (no NULs), then
 * n_items items of {uint8_t len, the product_id, int64_t quantity, int64_t
 * price_cents} (the integers unaligned, read with memcpy); size counts it all,
 * rounded up to a multiple of 8, so that packed events can follow each other
 * in one buffer at 8-byte alignment.
 */
enum {
    ING_PF_EVENT_ID,
    ING_PF_USER_ID,
    ING_PF_EVENT_TYPE,
    ING_PF_DEVICE,
    ING_PF_COUNTRY,
    ING_PF_PRODUCT_ID,
    ING_PF_EXPERIMENT,
    ING_PF_VARIANT,
    ING_PF__COUNT
};

typedef struct ing_packed {
    int64_t ts;
    int64_t amount_cents;
    uint32_t size;   /* bytes of the whole record, a multiple of 8 */
    uint8_t type;    /* ing_etype_t */
    uint8_t n_items; /* 0 .. ING_ITEMS_MAX */
    uint8_t len[ING_PF__COUNT];
    uint8_t pad_[2];
} ing_packed_t;

/* A bound on any packed event: every length field at its largest value
 * (255), not only at the contract's limits, so that a scratch buffer of
 * this size holds whatever an ing_event_t's lengths say. */
#define ING_PACKED_MAX                                                                             \
    ((sizeof(ing_packed_t) + ING_PF__COUNT * 255 + ING_ITEMS_MAX * (1 + 255 + 16) + 7) & ~(size_t)7)

/* Bytes ing_pack writes for ev (a multiple of 8, at most ING_PACKED_MAX).
 * ev must be as ing_validate leaves it (lengths within their fields). */
size_t ing_pack_size(const ing_event_t *ev);

/* Pack ev into out (8-byte aligned, ing_pack_size(ev) bytes; the padding is
 * zeroed). Returns the size written. Any thread. */
size_t ing_pack(const ing_event_t *ev, void *out);

/* Unpack p into out exactly as ing_validate left it: the scalar part is
 * cleared first, strings are NUL-terminated, items[0..n_items) filled. */
void ing_unpack(const ing_packed_t *p, ing_event_t *out);

/* A packed event's strings (not NUL-terminated; their lengths are
 * p->len[ING_PF_*]). Valid as long as p is. */
static inline const char *ing_packed_str(const ing_packed_t *p, int field)
{
    const char *s = (const char *)(p + 1);
    for (int i = 0; i < field; i++)
        s += p->len[i];
    return s;
}

/* Name of a reason as stored in rejected_events.reason ("invalid_json", ...). */
const char *ing_reason_name(ing_reason_t r);

/* Map an event_type string to its code (ING_ET_OTHER for unknown types). */
ing_etype_t ing_etype_from(const char *s, size_t len);

/* The event_type string of a known code (static storage); NULL for
 * ING_ET_OTHER and values outside the enum. */
const char *ing_etype_name(ing_etype_t t);

/*
 * Parse an RFC 3339 date-time (T, t or space separator, optional fraction cut
 * to ms, mandatory Z/z or +-HH:MM offset) into ms since the epoch.
 * Returns 0 on success, -1 when the string is not such a date-time.
 * The range check [ING_TS_MIN, ING_TS_END) is the caller's.
 */
int ing_parse_rfc3339(const char *s, size_t len, int64_t *ms);

#endif
