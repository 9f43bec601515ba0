#!/usr/bin/env python3
"""Independent reference for the clickmart data contract (shared/CONTRACT.md).

A naive full recompute of what the daemon must have written, from a dump of the
topic made with

    kcat -C -b BROKER -t TOPIC -o beginning -e -q -f '%p %o %S\\n%s\\n'

It covers CONTRACT §1 and §1.1 (validation and rejects), §2 (watermark, too_late,
duplicates), §3 (sessions, users, funnel_daily, cohort_retention), §4 (product_daily,
product_pairs and the daemon's helper basket_daily), §5 and §6 (user_exposure,
user_outcomes, experiments, experiment_results, experiment_regression) and §7
(rejected_events without payload, partitions).  It shares no code with the daemon on
purpose: validation is written from the contract text with Python's json module and
hooks, RFC 3339 with a regex and calendar arithmetic, money with exact rational
arithmetic, and the statistics (normal, Student t and chi-square distributions, a
logistic regression by Newton's method) from their textbook definitions.

Python 3 standard library only.  compare.py imports it; on its own it prints the
expected tables:

    reference.py --dump FILE [--topic NAME] [--now-ms MS] [--window-days N]
                 [--exposure-type T] [--confidence C] [--sequential-tuning N]
                 --print TABLE|all

Values are printed canonically: timestamps as ms since the epoch, money as integer
cents, days as days since 1970-01-01, booleans as t/f, floats as Python's shortest
repr, NULL as \\N, strings with \\\\, \\t, \\n, \\r and other control characters
escaped.
"""

import argparse
import json
import math
import re
import sys
import threading
import time
from collections import defaultdict
from fractions import Fraction

# ---------------------------------------------------------------------------
# Settings (CONTRACT defaults)

DEFAULT_SETTINGS = {
    "max_event_bytes": 65536,
    "max_future_ms": 3600000,
    "allowed_lateness_ms": 172800000,
    "session_gap_ms": 1800000,
    # The contract sets no nesting limit (0 = none). A JSON library may have one
    # (jansson: 2048 levels, the top-level value counting as one); set it here to model it.
    "max_json_depth": 0,
    # §5 and §6 defaults of the daemon for an experiment it has no configuration for.
    "window_days": 7,
    "exposure_type": "product_view",
    "confidence": 0.95,
    "sequential_tuning": 5000,
}

TS_MIN = 946684800000  # 2000-01-01T00:00:00Z
TS_END = 4102444800000  # 2100-01-01T00:00:00Z (exclusive)
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_ITEMS = 100

MS_PER_DAY = 86400000

# Field fault ranks; a smaller rank wins (CONTRACT §1.1 order of reasons).
MISSING, BAD_TYPE, BAD_VALUE = 1, 2, 3
FAULT_NAME = {MISSING: "missing_field", BAD_TYPE: "bad_type", BAD_VALUE: "bad_value"}

FUNNEL_TYPES = ("product_view", "add_to_cart", "checkout", "purchase")
ASSIGNMENT = "experiment_assignment"

# ---------------------------------------------------------------------------
# Table layouts shared with compare.py.  kind: text, int, ts (ms), money (cents),
# date (days since 1970-01-01), bool, float (compared with a tolerance).  Nullable
# columns hold None.

TABLES = {
    "sessions": {
        "key": 1,
        "columns": [
            ("session_id", "text"), ("user_id", "text"), ("started_at", "ts"),
            ("ended_at", "ts"), ("events", "int"), ("page_views", "int"),
            ("product_views", "int"), ("add_to_carts", "int"), ("checkouts", "int"),
            ("purchases", "int"), ("revenue", "money"), ("device", "text"),
            ("country", "text"), ("funnel_stage", "int"),
        ],
    },
    "users": {
        "key": 1,
        "columns": [
            ("user_id", "text"), ("first_seen", "ts"), ("last_seen", "ts"),
            ("device", "text"), ("country", "text"), ("events", "int"),
            ("sessions", "int"), ("orders", "int"), ("revenue", "money"),
            ("first_order_at", "ts"), ("last_order_at", "ts"),
        ],
    },
    "funnel_daily": {
        "key": 3,
        "columns": [
            ("day", "date"), ("device", "text"), ("country", "text"),
            ("sessions", "int"), ("sessions_product_view", "int"),
            ("sessions_add_to_cart", "int"), ("sessions_checkout", "int"),
            ("sessions_purchase", "int"), ("users", "int"),
            ("users_product_view", "int"), ("users_add_to_cart", "int"),
            ("users_checkout", "int"), ("users_purchase", "int"),
            ("orders", "int"), ("revenue", "money"),
        ],
    },
    # topic is a filter, not a column, in the comparison.
    "partitions": {
        "key": 1,
        "columns": [
            ("partition", "int"), ("next_offset", "int"), ("watermark", "ts"),
            ("accepted", "int"), ("duplicates", "int"), ("rejected", "int"),
        ],
    },
    "rejected_events": {
        "key": 2,
        "columns": [
            ("partition", "int"), ("kafka_offset", "int"), ("reason", "text"),
            ("detail", "text"),
        ],
    },
    "cohort_retention": {
        "key": 2,
        "columns": [("cohort_week", "date"), ("week_offset", "int"), ("users", "int")],
    },
    "product_daily": {
        "key": 2,
        "columns": [
            ("day", "date"), ("product_id", "text"), ("views", "int"),
            ("add_to_carts", "int"), ("orders", "int"), ("units", "int"),
            ("revenue", "money"),
        ],
    },
    "product_pairs": {
        "key": 2,
        "columns": [("product_a", "text"), ("product_b", "text"), ("orders", "int")],
    },
    # Not in the contract: the daemon's helper behind product_affinity.total_orders.
    "basket_daily": {
        "key": 1,
        "columns": [
            ("day", "date"), ("orders_with_items", "int"), ("units", "int"),
            ("revenue", "money"),
        ],
    },
    "user_exposure": {
        "key": 2,
        "columns": [
            ("experiment", "text"), ("user_id", "text"), ("variant", "text"),
            ("assigned_at", "ts"), ("exposed_at", "ts"), ("excluded", "bool"),
        ],
    },
    "user_outcomes": {
        "key": 2,
        "columns": [
            ("experiment", "text"), ("user_id", "text"), ("variant", "text"),
            ("exposed_at", "ts"), ("converted", "bool"), ("orders", "int"),
            ("revenue", "money"), ("events", "int"), ("added_to_cart", "bool"),
            ("reached_checkout", "bool"),
        ],
    },
    "experiments": {
        "key": 1,
        "columns": [
            ("experiment", "text"), ("control_variant", "text"), ("variants", "int"),
            ("users", "int"), ("excluded_users", "int"), ("srm_chi2", "float"),
            ("srm_p", "float"), ("srm_detected", "bool"), ("chi2", "float"),
            ("chi2_p", "float"), ("window_days", "int"),
        ],
    },
    "experiment_results": {
        "key": 2,
        "columns": [
            ("experiment", "text"), ("variant", "text"), ("users", "int"),
            ("converters", "int"), ("conversion_rate", "float"), ("orders", "int"),
            ("revenue", "money"), ("revenue_per_user", "float"), ("revenue_sd", "float"),
            ("events_per_user", "float"), ("cart_rate", "float"),
            ("checkout_rate", "float"), ("is_control", "bool"),
        ] + [(c, "float") for c in (
            "abs_lift", "rel_lift", "diff_ci_low", "diff_ci_high", "rel_ci_low",
            "rel_ci_high", "z", "p_value", "seq_ci_low", "seq_ci_high", "seq_p_value",
            "chance_to_win", "rpu_diff", "rpu_ci_low", "rpu_ci_high", "rpu_p_value")],
    },
    "experiment_regression": {
        "key": 2,
        "columns": [
            ("experiment", "text"), ("term", "text"), ("coef", "float"),
            ("std_err", "float"), ("z", "float"), ("p_value", "float"), ("n", "int"),
        ],
    },
}
TABLE_ORDER = ["sessions", "users", "funnel_daily", "partitions", "rejected_events",
               "cohort_retention", "product_daily", "product_pairs", "basket_daily",
               "user_exposure", "user_outcomes", "experiments", "experiment_results",
               "experiment_regression"]
# Tables the daemon has had from the start: compare.py always requires them.  The others
# are compared when the daemon's schema has them (or always, with --require-all).
BASE_TABLES = ["sessions", "users", "funnel_daily", "partitions", "rejected_events"]
# Analysts' views, sanity-checked by compare.py against the reference tables.
VIEW_ORDER = ["product_affinity", "daily_kpis", "rfm_segments"]


# ---------------------------------------------------------------------------
# The dump


class DumpError(Exception):
    pass


def read_dump(path):
    """Parse a kcat dump ('%p %o %S\\n%s\\n') by byte counts.

    Returns a list of (partition, offset, value) where value is bytes, or None for a
    null value (%S = -1).  A value may hold any bytes, newlines included.
    """
    with open(path, "rb") as f:
        data = f.read()
    return parse_dump(data)


def parse_dump(data):
    out = []
    pos = 0
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise DumpError("truncated header at byte %d" % pos)
        header = data[pos:nl]
        parts = header.split(b" ")
        if len(parts) != 3:
            raise DumpError("bad header %r at byte %d" % (header[:80], pos))
        try:
            p, o, s = (int(x) for x in parts)
        except ValueError:
            raise DumpError("bad header %r at byte %d" % (header[:80], pos))
        if s < -1 or p < 0 or o < 0:
            raise DumpError("bad header %r at byte %d" % (header[:80], pos))
        start = nl + 1
        length = max(s, 0)
        end = start + length
        if end + 1 > n or data[end:end + 1] != b"\n":
            raise DumpError("value of %d bytes at byte %d is not followed by a newline" % (s, start))
        value = None if s == -1 else data[start:end]
        out.append((p, o, value))
        pos = end + 1
    return out


# ---------------------------------------------------------------------------
# JSON (CONTRACT §1.1 invalid_json)


class InvalidJSON(Exception):
    pass


class _BigInt(int):
    """A JSON integer literal outside int64 that still fits a finite double."""


def _parse_int(s):
    f = float(s)  # correctly rounded, no digit limit
    if math.isinf(f):
        raise InvalidJSON("integer fits neither int64 nor a finite double")
    v = int(s)  # at most ~310 digits here, well under Python's digit limit
    if INT64_MIN <= v <= INT64_MAX:
        return v
    return _BigInt(v)


def _parse_float(s):
    f = float(s)
    if math.isinf(f) or math.isnan(f):
        raise InvalidJSON("number is not a finite double")
    return f


def _parse_constant(s):
    raise InvalidJSON("%s is not JSON" % s)


def _pairs_hook(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise InvalidJSON("repeated key")
        obj[k] = v
    return obj


def _check_string(s):
    if "\x00" in s:
        raise InvalidJSON("NUL in a string")
    try:
        s.encode("utf-8")  # strict: a lone surrogate from \\uD800 fails here
    except UnicodeEncodeError:
        raise InvalidJSON("lone surrogate")


def parse_json(value, max_depth=0):
    """bytes -> Python value, or raise InvalidJSON. max_depth > 0 limits nesting (the
    top-level value is level 1)."""
    if value is None or len(value) == 0:
        raise InvalidJSON("empty")
    try:
        text = value.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise InvalidJSON("invalid UTF-8")
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_pairs_hook,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except InvalidJSON:
        raise
    except RecursionError:
        raise InvalidJSON("nesting deeper than the checker's stack")
    except ValueError:  # JSONDecodeError and friends
        raise InvalidJSON("syntax")
    # Every string, keys included, anywhere in the document (iteratively).
    stack = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is str:
            _check_string(v)
        elif t is dict or t is list:
            if max_depth and depth > max_depth:
                raise InvalidJSON("nested deeper than %d" % max_depth)
            if t is dict:
                for k, x in v.items():
                    _check_string(k)
                    stack.append((x, depth + 1))
            else:
                stack.extend((x, depth + 1) for x in v)
    return obj


# ---------------------------------------------------------------------------
# RFC 3339 and calendar arithmetic (written out, no datetime)

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def is_leap(y):
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def days_in_month(y, m):
    if m == 2:
        return 29 if is_leap(y) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def days_from_civil(y, m, d):
    """Days since 1970-01-01 of a proleptic Gregorian date (counted naively)."""
    days = 0
    if y >= 1970:
        for yy in range(1970, y):
            days += 366 if is_leap(yy) else 365
    else:
        for yy in range(y, 1970):
            days -= 366 if is_leap(yy) else 365
    for mm in range(1, m):
        days += days_in_month(y, mm)
    return days + d - 1


def parse_rfc3339(s):
    """RFC 3339 date-time -> ms since the epoch (fraction cut to ms), or None."""
    m = _RFC3339.fullmatch(s)
    if not m:
        return None
    y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7)
    if not (1 <= mo <= 12 and 1 <= d <= days_in_month(y, mo)):
        return None
    if h > 23 or mi > 59 or sec > 59:
        return None
    off = 0
    if m.group(8) is None:
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            return None
        off = (oh * 60 + om) * 60000
        if m.group(9) == "-":
            off = -off
    ms = ((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60 + sec
    ms *= 1000
    if frac:
        ms += int((frac + "00")[:3])
    return ms - off


def civil_from_ms(ms):
    """ms -> 'YYYY-MM-DDTHH:MM:SS.mmmZ', for messages only."""
    days, rem = divmod(ms, MS_PER_DAY)
    y = 1970
    while True:
        n = 366 if is_leap(y) else 365
        if days >= n:
            days -= n
            y += 1
        elif days < 0:
            y -= 1
            days += 366 if is_leap(y) else 365
        else:
            break
    mo = 1
    while days >= days_in_month(y, mo):
        days -= days_in_month(y, mo)
        mo += 1
    h, rem = divmod(rem, 3600000)
    mi, rem = divmod(rem, 60000)
    s, msec = divmod(rem, 1000)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (y, mo, days + 1, h, mi, s, msec)


# ---------------------------------------------------------------------------
# Money: C's llround(x * 100.0), exactly


def llround_cents(x):
    """llround(double(x) * 100.0): the product in double, then rounded half away
    from zero on its exact value (Fraction), as C's llround does."""
    prod = float(x) * 100.0  # one IEEE double multiplication, as in C
    q = Fraction(prod)
    n = math.floor(abs(q) + Fraction(1, 2))
    return -n if q < 0 else n


# ---------------------------------------------------------------------------
# Field checks (CONTRACT §1)

_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _is_int(v):
    return type(v) is int or type(v) is _BigInt  # bool is not int here


def _is_num(v):
    return _is_int(v) or type(v) is float


def _blen(s):
    return len(s.encode("utf-8"))


def _absent_optional(v):
    return v is None or (type(v) is str and v == "")


def _required_string(v, lo, hi):
    if v is None:
        return MISSING
    if type(v) is not str:
        return BAD_TYPE
    if not (lo <= _blen(v) <= hi):
        return BAD_VALUE
    return None


def _optional_string(v, hi):
    if _absent_optional(v):
        return None
    if type(v) is not str:
        return BAD_TYPE
    if _blen(v) > hi:
        return BAD_VALUE
    return None


def _check_event_type(v):
    if v is None:
        return MISSING
    if type(v) is not str:
        return BAD_TYPE
    if not _EVENT_TYPE.fullmatch(v):
        return BAD_VALUE
    return None


def _ts_value(v):
    """(fault, ms)."""
    if v is None:
        return MISSING, None
    if _is_int(v):
        ms = int(v)
        if not (INT64_MIN <= ms <= INT64_MAX):
            return BAD_VALUE, None
    elif type(v) is str:
        ms = parse_rfc3339(v)
        if ms is None:
            return BAD_VALUE, None
    else:
        return BAD_TYPE, None  # float (even integral), bool, array, object
    if not (TS_MIN <= ms < TS_END):
        return BAD_VALUE, None
    return None, ms


def _check_money(v, required):
    """(fault, cents) for amount / price: a number 0..1e12; a null price is the default 0."""
    if v is None:
        return (MISSING if required else None), (None if required else 0)
    if not _is_num(v):
        return BAD_TYPE, None
    f = float(v)
    if not (0.0 <= f <= 1e12):
        return BAD_VALUE, None
    return None, llround_cents(f)


def _min_fault(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _check_item(el):
    if type(el) is not dict:
        return BAD_TYPE
    fault = _required_string(el.get("product_id"), 1, 128)
    # An item's quantity and price default only when absent or null: "" is a string, not
    # a number. (The contract's "an empty string in an optional field means absent" is
    # read as covering the optional fields of its table, not an item's members.)
    q = el.get("quantity")
    if q is not None:
        if not _is_int(q):
            fault = _min_fault(fault, BAD_TYPE)
        elif not (1 <= q <= 1000000):
            fault = _min_fault(fault, BAD_VALUE)
    pf, _ = _check_money(el.get("price"), required=False)
    return _min_fault(fault, pf)


def _check_items(v):
    if _absent_optional(v):
        return None
    if type(v) is not list:
        return BAD_TYPE
    fault = BAD_VALUE if len(v) > MAX_ITEMS else None
    for el in v:
        fault = _min_fault(fault, _check_item(el))
    return fault


class Event:
    __slots__ = ("event_id", "user_id", "event_type", "ts", "device", "country",
                 "product_id", "cents", "partition", "offset", "eid_bytes", "items",
                 "experiment", "variant")

    def sort_key(self):
        return (self.ts, self.eid_bytes)


def validate(value, now_ms, settings):
    """Message value -> ('ok', Event) or ('reject', reason, detail[, ts]).

    Covers every reject reason but too_late, which needs the partition watermark.
    """
    length = 0 if value is None else len(value)
    if length > settings["max_event_bytes"]:
        return ("reject", "payload_too_large", "")
    try:
        obj = parse_json(value, settings.get("max_json_depth", 0))
    except InvalidJSON:
        return ("reject", "invalid_json", "")
    if type(obj) is not dict:
        return ("reject", "not_an_object", "")

    faults = []  # (field, fault) in field order
    faults.append(("event_id", _required_string(obj.get("event_id"), 1, 128)))
    faults.append(("user_id", _required_string(obj.get("user_id"), 1, 128)))
    et = obj.get("event_type")
    faults.append(("event_type", _check_event_type(et)))
    ts_fault, ts = _ts_value(obj.get("ts"))
    faults.append(("ts", ts_fault))
    cents = None
    if et == "purchase":
        af, cents = _check_money(obj.get("amount"), required=True)
        faults.append(("amount", af))
        faults.append(("items", _check_items(obj.get("items"))))
    elif et == ASSIGNMENT:
        faults.append(("experiment", _required_string(obj.get("experiment"), 1, 64)))
        faults.append(("variant", _required_string(obj.get("variant"), 1, 64)))
    faults.append(("device", _optional_string(obj.get("device"), 32)))
    faults.append(("country", _optional_string(obj.get("country"), 32)))
    faults.append(("product_id", _optional_string(obj.get("product_id"), 128)))

    worst = None
    for i, (name, fault) in enumerate(faults):
        if fault is not None and (worst is None or (fault, i) < worst[:2]):
            worst = (fault, i, name)
    if worst is not None:
        return ("reject", FAULT_NAME[worst[0]], worst[2])

    if ts > now_ms + settings["max_future_ms"]:
        return ("reject", "future_timestamp", "", ts)

    ev = Event()
    ev.event_id = obj["event_id"]
    ev.eid_bytes = ev.event_id.encode("utf-8")
    ev.user_id = obj["user_id"]
    ev.event_type = et
    ev.ts = ts
    ev.device = None if _absent_optional(obj.get("device")) else obj["device"]
    ev.country = None if _absent_optional(obj.get("country")) else obj["country"]
    ev.product_id = None if _absent_optional(obj.get("product_id")) else obj["product_id"]
    ev.cents = cents if et == "purchase" else 0
    # items (purchase only): (product_id, quantity, unit price in cents), defaults applied.
    ev.items = []
    if et == "purchase" and not _absent_optional(obj.get("items")):
        for el in obj["items"]:
            q = el.get("quantity")
            _, price_cents = _check_money(el.get("price"), required=False)
            ev.items.append((el["product_id"], 1 if q is None else int(q), price_cents))
    ev.experiment = obj["experiment"] if et == ASSIGNMENT else None
    ev.variant = obj["variant"] if et == ASSIGNMENT else None
    return ("ok", ev)


# ---------------------------------------------------------------------------
# §2: partitions in offset order, watermark, too_late, duplicates


class Result:
    """Everything the reference derives from one dump."""

    def __init__(self):
        self.accepted = []  # Event, in processing order
        self.rejected = []  # (partition, offset, reason, detail)
        self.partitions = {}  # p -> dict
        self.cross_partition_duplicates = 0
        self.near_future_threshold = 0  # events whose ts is within 10 min of now+max_future
        self.tables = {}


def process(records, settings, now_ms):
    res = Result()
    by_part = defaultdict(list)
    for p, o, v in records:
        by_part[p].append((o, v))
    seen = {}  # event_id -> partition of the accepted copy
    lateness = settings["allowed_lateness_ms"]
    future_limit = now_ms + settings["max_future_ms"]
    for p in sorted(by_part):
        msgs = sorted(by_part[p], key=lambda m: m[0])
        for a, b in zip(msgs, msgs[1:]):
            if a[0] == b[0]:
                raise DumpError("partition %d offset %d appears twice in the dump" % (p, a[0]))
        wm = None
        acc = dup = rej = 0
        for o, v in msgs:
            r = validate(v, now_ms, settings)
            ts = r[1].ts if r[0] == "ok" else (r[3] if len(r) > 3 else None)
            if ts is not None and abs(ts - future_limit) <= 600000:
                res.near_future_threshold += 1
            if r[0] == "ok":
                ev = r[1]
                if wm is not None and ev.ts < wm - lateness:
                    r = ("reject", "too_late", "")
            if r[0] == "reject":
                rej += 1
                res.rejected.append((p, o, r[1], r[2]))
                continue
            if ev.event_id in seen:
                dup += 1
                if seen[ev.event_id] != p:
                    res.cross_partition_duplicates += 1
                continue
            seen[ev.event_id] = p
            ev.partition, ev.offset = p, o
            res.accepted.append(ev)
            acc += 1
            wm = ev.ts if wm is None else max(wm, ev.ts)
        res.partitions[p] = {
            "next_offset": msgs[-1][0] + 1,
            "watermark": wm,
            "accepted": acc,
            "duplicates": dup,
            "rejected": rej,
        }
    return res


# ---------------------------------------------------------------------------
# §3: sessions, users, funnel_daily


def _stage(s):
    stage = 1
    if s["product_views"] > 0:
        stage = 2
        if s["add_to_carts"] > 0:
            stage = 3
            if s["checkouts"] > 0:
                stage = 4
                if s["purchases"] > 0:
                    stage = 5
    return stage


def _first_attr(events, attr):
    """Attribute of the earliest event (by ts, event_id) that has one."""
    best = None
    for e in events:
        v = getattr(e, attr)
        if v is not None and (best is None or e.sort_key() < best.sort_key()):
            best = e
    return "unknown" if best is None else getattr(best, attr)


def build_sessions(accepted, gap):
    by_user = defaultdict(list)
    for e in accepted:
        if e.event_type != ASSIGNMENT:
            by_user[e.user_id].append(e)
    sessions = []  # dicts
    for user, evs in by_user.items():
        evs.sort(key=Event.sort_key)
        groups = []
        for e in evs:
            if groups and e.ts - groups[-1][-1].ts <= gap:
                groups[-1].append(e)
            else:
                groups.append([e])
        for g in groups:
            s = {
                "session_id": g[0].event_id,
                "user_id": user,
                "started_at": g[0].ts,
                "ended_at": g[-1].ts,
                "events": len(g),
                "page_views": sum(1 for e in g if e.event_type == "page_view"),
                "product_views": sum(1 for e in g if e.event_type == "product_view"),
                "add_to_carts": sum(1 for e in g if e.event_type == "add_to_cart"),
                "checkouts": sum(1 for e in g if e.event_type == "checkout"),
                "purchases": sum(1 for e in g if e.event_type == "purchase"),
                "revenue": sum(e.cents for e in g if e.event_type == "purchase"),
                "device": _first_attr(g, "device"),
                "country": _first_attr(g, "country"),
            }
            s["funnel_stage"] = _stage(s)
            sessions.append(s)
    return by_user, sessions


def build_users(by_user, sessions):
    nsess = defaultdict(int)
    for s in sessions:
        nsess[s["user_id"]] += 1
    users = []
    for user, evs in by_user.items():
        orders = [e for e in evs if e.event_type == "purchase"]
        users.append({
            "user_id": user,
            "first_seen": min(e.ts for e in evs),
            "last_seen": max(e.ts for e in evs),
            "device": _first_attr(evs, "device"),
            "country": _first_attr(evs, "country"),
            "events": len(evs),
            "sessions": nsess[user],
            "orders": len(orders),
            "revenue": sum(e.cents for e in orders),
            "first_order_at": min(e.ts for e in orders) if orders else None,
            "last_order_at": max(e.ts for e in orders) if orders else None,
        })
    return users


def build_funnel_daily(sessions):
    groups = defaultdict(list)
    for s in sessions:
        day = s["started_at"] // MS_PER_DAY
        dev, ctry = s["device"], s["country"]
        for key in ((day, dev, ctry), (day, dev, "*"), (day, "*", ctry), (day, "*", "*")):
            groups[key].append(s)
    rows = []
    for (day, dev, ctry), ss in groups.items():
        row = {"day": day, "device": dev, "country": ctry, "sessions": len(ss)}
        for k, name in ((2, "product_view"), (3, "add_to_cart"), (4, "checkout"), (5, "purchase")):
            row["sessions_" + name] = sum(1 for s in ss if s["funnel_stage"] >= k)
        row["users"] = len({s["user_id"] for s in ss})
        for k, name in ((2, "product_view"), (3, "add_to_cart"), (4, "checkout"), (5, "purchase")):
            row["users_" + name] = len({s["user_id"] for s in ss if s["funnel_stage"] >= k})
        row["orders"] = sum(s["purchases"] for s in ss)
        row["revenue"] = sum(s["revenue"] for s in ss)
        if row["sessions"] > 0:
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# §3 cohort_retention, §4 products


def week_of_day(day):
    """Days since 1970-01-01 -> the day number of the Monday of its ISO week
    (1970-01-01 was a Thursday)."""
    return day - (day + 3) % 7


def build_cohorts(by_user):
    counts = defaultdict(int)
    for evs in by_user.values():
        cohort = week_of_day(min(e.ts for e in evs) // MS_PER_DAY)
        for week in {week_of_day(e.ts // MS_PER_DAY) for e in evs}:
            counts[(cohort, (week - cohort) // 7)] += 1
    return [{"cohort_week": c, "week_offset": o, "users": n}
            for (c, o), n in counts.items() if n > 0]


def _bytes_key(s):
    return s.encode("utf-8")


def build_products(accepted):
    """product_daily, product_pairs and basket_daily from the clickstream events."""
    daily = defaultdict(lambda: [0, 0, 0, 0, 0])  # views, add_to_carts, orders, units, cents
    pairs = defaultdict(int)
    basket = defaultdict(lambda: [0, 0, 0])  # orders_with_items, units, cents
    for e in accepted:
        if e.event_type == ASSIGNMENT:
            continue
        day = e.ts // MS_PER_DAY
        if e.event_type in ("product_view", "add_to_cart") and e.product_id is not None:
            daily[(day, e.product_id)][0 if e.event_type == "product_view" else 1] += 1
        if e.event_type != "purchase" or not e.items:
            continue
        per_product = defaultdict(lambda: [0, 0])  # units, cents
        for pid, qty, price_cents in e.items:
            per_product[pid][0] += qty
            per_product[pid][1] += qty * price_cents
        for pid, (units, cents) in per_product.items():
            row = daily[(day, pid)]
            row[2] += 1  # once per purchase, however often the product is repeated
            row[3] += units
            row[4] += cents
        b = basket[day]
        b[0] += 1
        b[1] += sum(u for u, _ in per_product.values())
        b[2] += sum(c for _, c in per_product.values())
        pids = sorted(per_product, key=_bytes_key)
        for i in range(len(pids)):
            for j in range(i + 1, len(pids)):
                pairs[(pids[i], pids[j])] += 1
    product_daily = [{"day": d, "product_id": p, "views": v[0], "add_to_carts": v[1],
                      "orders": v[2], "units": v[3], "revenue": v[4]}
                     for (d, p), v in daily.items()]
    product_pairs = [{"product_a": a, "product_b": b, "orders": n}
                     for (a, b), n in pairs.items()]
    basket_daily = [{"day": d, "orders_with_items": v[0], "units": v[1], "revenue": v[2]}
                    for d, v in basket.items()]
    return product_daily, product_pairs, basket_daily


# ---------------------------------------------------------------------------
# §6 distributions, written out (no scipy): normal via math.erfc, Student t via the
# regularized incomplete beta function, chi-square via the regularized upper incomplete
# gamma function (continued fractions and series as in Numerical Recipes, ch. 6).

_SQRT2 = math.sqrt(2.0)
_EPS = 2.220446049250313e-16
_FPMIN = 1e-300
_MAXIT = 100000


def norm_cdf(x):
    """Φ(x)."""
    return 0.5 * math.erfc(-x / _SQRT2)


def norm_sf(x):
    """1 − Φ(x), without cancellation in the upper tail."""
    return 0.5 * math.erfc(x / _SQRT2)


def norm_ppf(p):
    """Φ⁻¹(p): Acklam's rational approximation (relative error 1.15e-9), then two Halley
    steps on the exact Φ (erfc), which bring it to the last bits of a double."""
    if not 0.0 < p < 1.0:
        raise ValueError("norm_ppf: p must be in (0, 1)")
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
         1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
         6.680131188771972e+01, -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
         -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
         3.754408661907416e+00)
    plow = 0.02425
    if p < plow:
        q = math.sqrt(-2.0 * math.log(p))
        x = ((((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
             / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0))
    elif p <= 1.0 - plow:
        q = p - 0.5
        r = q * q
        x = ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
             / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0))
    else:
        q = math.sqrt(-2.0 * math.log1p(-p))
        x = -((((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
              / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0))
    for _ in range(2):
        # Error of Φ(x) − p, taken in the tail where it has no cancellation.
        e = norm_cdf(x) - p if x <= 0 else (1.0 - p) - norm_sf(x)
        u = e * math.sqrt(2.0 * math.pi) * math.exp(x * x / 2.0)
        x = x - u / (1.0 + x * u / 2.0)
    return x


def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    if abs(d) < _FPMIN:
        d = _FPMIN
    d = 1.0 / d
    h = d
    for m in range(1, _MAXIT + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        if abs(d) < _FPMIN:
            d = _FPMIN
        c = 1.0 + aa / c
        if abs(c) < _FPMIN:
            c = _FPMIN
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        if abs(d) < _FPMIN:
            d = _FPMIN
        c = 1.0 + aa / c
        if abs(c) < _FPMIN:
            c = _FPMIN
        d = 1.0 / d
        de = d * c
        h *= de
        if abs(de - 1.0) <= _EPS:
            return h
    raise ArithmeticError("incomplete beta: no convergence (a=%r, b=%r, x=%r)" % (a, b, x))


_STIRLING = (1.0 / 12, -1.0 / 360, 1.0 / 1260, -1.0 / 1680, 1.0 / 1188, -691.0 / 360360,
             1.0 / 156)


def _stirling_tail(z):
    """ln Γ(z) − [(z − ½) ln z − z + ½ ln 2π] for z ≥ 10 (Stirling's series)."""
    zz = 1.0 / (z * z)
    total, power = 0.0, 1.0 / z
    for coef in _STIRLING:
        total += coef * power
        power *= zz
    return total


def lgamma_ratio(a, b):
    """ln Γ(a + b) − ln Γ(a), without the cancellation of two large lgamma values when
    a is large (b > 0 moderate)."""
    if a < 10.0:
        return math.lgamma(a + b) - math.lgamma(a)
    return (b * math.log(a) + (a + b - 0.5) * math.log1p(b / a) - b
            + _stirling_tail(a + b) - _stirling_tail(a))


def betainc(a, b, x, y=None, log_x=None, log_y=None):
    """Regularized incomplete beta I_x(a, b).  y = 1 − x, log_x = ln x and log_y = ln y
    may be given when the caller knows them more precisely than by subtraction."""
    if y is None:
        y = 1.0 - x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    if log_x is None:
        log_x = math.log(x)
    if log_y is None:
        log_y = math.log(y)
    big, small = (a, b) if a >= b else (b, a)
    lbt = lgamma_ratio(big, small) - math.lgamma(small) + a * log_x + b * log_y
    bt = math.exp(lbt)
    if x < (a + 1.0) / (a + b + 2.0):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, y) / b


def t_two_sided(t, df):
    """P(|T| ≥ |t|) for Student's t with df (real, > 0) degrees of freedom:
    I_x(df/2, 1/2) with x = df / (df + t²)."""
    t2 = t * t
    if t2 == 0.0:
        return 1.0
    return betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2),
                   log_x=-math.log1p(t2 / df), log_y=math.log(t2) - math.log(df + t2))


def t_cdf(t, df):
    tail = t_two_sided(t, df) / 2.0
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q, df):
    """The t quantile for q in (0.5, 1): bisection on the two-sided tail, to the last bit."""
    if not 0.5 < q < 1.0:
        raise ValueError("t_ppf: q must be in (0.5, 1)")
    target = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) > target:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ArithmeticError("t_ppf: no bracket")
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            return hi if abs(t_two_sided(hi, df) - target) <= abs(t_two_sided(lo, df) - target) else lo
        if t_two_sided(mid, df) > target:
            lo = mid
        else:
            hi = mid


def gammaincc(a, x):
    """Regularized upper incomplete gamma Q(a, x) = Γ(a, x) / Γ(a)."""
    if x <= 0.0:
        return 1.0
    lpre = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        # Series for P(a, x); Q = 1 − P is not small here.
        ap, term = a, 1.0 / a
        total = term
        for _ in range(_MAXIT):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                return 1.0 - total * math.exp(lpre)
        raise ArithmeticError("gammaincc series: no convergence (a=%r, x=%r)" % (a, x))
    # Continued fraction for Q(a, x) (modified Lentz).
    b = x + 1.0 - a
    c = 1.0 / _FPMIN
    d = 1.0 / b
    h = d
    for i in range(1, _MAXIT + 1):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _FPMIN:
            d = _FPMIN
        c = b + an / c
        if abs(c) < _FPMIN:
            c = _FPMIN
        d = 1.0 / d
        de = d * c
        h *= de
        if abs(de - 1.0) <= _EPS:
            return math.exp(lpre) * h
    raise ArithmeticError("gammaincc fraction: no convergence (a=%r, x=%r)" % (a, x))


def chi2_sf(x, df):
    """P(X ≥ x) for a chi-square variable with df degrees of freedom."""
    return gammaincc(df / 2.0, x / 2.0)


# ---------------------------------------------------------------------------
# §5 experiments


def _first_by_key(events):
    return min(events, key=Event.sort_key)


def build_exposure(accepted, by_user, settings):
    """user_exposure and user_outcomes rows (dicts)."""
    assignments = defaultdict(list)
    for e in accepted:
        if e.event_type == ASSIGNMENT:
            assignments[(e.experiment, e.user_id)].append(e)
    window = settings["window_days"] * MS_PER_DAY
    exposure_type = settings["exposure_type"]
    exposure, outcomes = [], []
    for (exp, user), evs in assignments.items():
        assigned_at = min(e.ts for e in evs)
        variant = _first_by_key(evs).variant
        excluded = len({e.variant for e in evs}) > 1
        clicks = by_user.get(user, [])
        exposures = [e.ts for e in clicks if e.event_type == exposure_type and e.ts >= assigned_at]
        exposed_at = min(exposures) if exposures else None
        exposure.append({"experiment": exp, "user_id": user, "variant": variant,
                         "assigned_at": assigned_at, "exposed_at": exposed_at,
                         "excluded": excluded})
        if exposed_at is None or excluded:
            continue
        inside = [e for e in clicks if exposed_at <= e.ts < exposed_at + window]
        purchases = [e for e in inside if e.event_type == "purchase"]
        outcomes.append({
            "experiment": exp, "user_id": user, "variant": variant, "exposed_at": exposed_at,
            "converted": bool(purchases), "orders": len(purchases),
            "revenue": sum(e.cents for e in purchases), "events": len(inside),
            "added_to_cart": any(e.event_type == "add_to_cart" for e in inside),
            "reached_checkout": any(e.event_type == "checkout" for e in inside),
        })
    return exposure, outcomes


def choose_control(variants):
    """The default control: 'control' if it is one of them, else the byte-wise smallest."""
    if "control" in variants:
        return "control"
    return min(variants, key=_bytes_key)


def _mean_var(values):
    """(mean, sample variance with n − 1, or None when n < 2)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


def _positive(x):
    return x is not None and x > 0 and math.isfinite(x)


def compare_variants(t, c, alpha, zstar, n_star):
    """§6: the comparison columns of variant t against the control c (dicts with n, x,
    rev = per-user window revenue in currency units).  None = NULL."""
    out = dict.fromkeys(COMPARISON_COLUMNS)
    nt, nc = t["n"], c["n"]
    pt, pc = t["x"] / nt, c["x"] / nc
    vt, vc = pt * (1.0 - pt), pc * (1.0 - pc)
    out["abs_lift"] = diff = pt - pc
    if pc > 0:
        out["rel_lift"] = pt / pc - 1.0
        rel_var = vt / (nt * pc * pc) + pt * pt * vc / (nc * pc ** 4)
        if _positive(rel_var):
            half = zstar * math.sqrt(rel_var)
            out["rel_ci_low"], out["rel_ci_high"] = out["rel_lift"] - half, out["rel_lift"] + half
    pbar = (t["x"] + c["x"]) / (nt + nc)
    pooled_var = pbar * (1.0 - pbar) * (1.0 / nt + 1.0 / nc)
    if _positive(pooled_var):
        out["z"] = z = diff / math.sqrt(pooled_var)
        out["p_value"] = 2.0 * norm_sf(abs(z))  # = 2(1 − Φ(|z|))
    se2 = vt / nt + vc / nc
    if _positive(se2):
        se = math.sqrt(se2)
        out["diff_ci_low"], out["diff_ci_high"] = diff - zstar * se, diff + zstar * se
        out["chance_to_win"] = norm_cdf(diff / se)
        # Normal-mixture confidence sequence (Howard et al. 2021; GrowthBook).
        n = nt + nc
        sigma2 = n * se2
        l2a = -2.0 * math.log(alpha)
        rho2 = (l2a + math.log(l2a + 1.0)) / n_star
        nr1 = n * rho2 + 1.0
        half = math.sqrt(sigma2 * 2.0 * nr1 / (n * n * rho2) * math.log(math.sqrt(nr1) / alpha))
        out["seq_ci_low"], out["seq_ci_high"] = diff - half, diff + half
        # 1/E = sqrt(Nρ² + 1) · exp(−ρ²N²·lift² / (2σ²(Nρ² + 1))), without overflow.
        inv_e = math.sqrt(nr1) * math.exp(-rho2 * n * n * diff * diff / (2.0 * sigma2 * nr1))
        out["seq_p_value"] = min(1.0, inv_e)
    # Revenue per user: Welch's t-test.
    mt, st2 = _mean_var(t["rev"])
    mc, sc2 = _mean_var(c["rev"])
    out["rpu_diff"] = rdiff = mt - mc
    if st2 is not None and sc2 is not None:
        at, ac = st2 / nt, sc2 / nc
        rse2 = at + ac
        if _positive(rse2):
            df = rse2 * rse2 / (at * at / (nt - 1) + ac * ac / (nc - 1))
            rse = math.sqrt(rse2)
            out["rpu_p_value"] = t_two_sided(rdiff / rse, df)
            q = t_ppf(1.0 - alpha / 2.0, df)
            out["rpu_ci_low"], out["rpu_ci_high"] = rdiff - q * rse, rdiff + q * rse
    return out


COMPARISON_COLUMNS = ("abs_lift", "rel_lift", "diff_ci_low", "diff_ci_high", "rel_ci_low",
                      "rel_ci_high", "z", "p_value", "seq_ci_low", "seq_ci_high",
                      "seq_p_value", "chance_to_win", "rpu_diff", "rpu_ci_low",
                      "rpu_ci_high", "rpu_p_value")


def srm_test(users):
    """Chi-square goodness of fit of the variants' users against an equal split:
    (chi2, p) or (None, None) with fewer than two variants."""
    k = len(users)
    if k < 2:
        return None, None
    expected = sum(users) / k
    chi2 = math.fsum((o - expected) ** 2 / expected for o in users)
    return chi2, chi2_sf(chi2, k - 1)


def independence_test(table):
    """Pearson's chi-square test of independence on rows of (converted, not converted),
    with Yates' correction when it has one degree of freedom (as scipy.stats.
    chi2_contingency): (chi2, p), or (None, None) when undefined (fewer than two rows, or
    an expected count of zero)."""
    k = len(table)
    if k < 2:
        return None, None
    rows = [a + b for a, b in table]
    cols = [sum(r[0] for r in table), sum(r[1] for r in table)]
    total = sum(rows)
    if min(cols) == 0 or min(rows) == 0:
        return None, None
    dof = (k - 1) * (2 - 1)
    terms = []
    for i, row in enumerate(table):
        for j in range(2):
            e = rows[i] * cols[j] / total
            dev = abs(row[j] - e)
            if dof == 1:
                dev -= min(0.5, dev)
            terms.append(dev * dev / e)
    chi2 = math.fsum(terms)
    return chi2, chi2_sf(chi2, dof)


def _solve_inverse(m):
    """Inverse of a small square matrix by Gauss-Jordan elimination with partial pivoting;
    None when it is singular (a pivot below 1e-12 of the largest entry)."""
    n = len(m)
    scale = max(abs(v) for row in m for v in row)
    if scale == 0:
        return None
    a = [list(row) + [1.0 if i == j else 0.0 for j in range(n)] for i, row in enumerate(m)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) <= 1e-12 * scale:
            return None
        a[col], a[piv] = a[piv], a[col]
        pv = a[col][col]
        a[col] = [v / pv for v in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0.0:
                f = a[r][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    return [row[n:] for row in a]


def _sigmoid(eta):
    if eta >= 0:
        return 1.0 / (1.0 + math.exp(-eta))
    e = math.exp(eta)
    return e / (1.0 + e)


REGRESSION_MAX_ITER = 50


def logistic_regression(xs, ys):
    """Maximum likelihood by Newton's method (IRLS) from β = 0.  Returns (coef, std_err)
    lists, or None when undefined: fewer than two outcomes of either kind, a singular
    information matrix, or no convergence (max |Δβ_j| ≤ 1e-10 (1 + |β_j|)) within
    REGRESSION_MAX_ITER iterations."""
    ones = sum(ys)
    if ones < 2 or len(ys) - ones < 2:
        return None
    k = len(xs[0])
    beta = [0.0] * k

    def information(beta):
        h = [[0.0] * k for _ in range(k)]
        g = [0.0] * k
        for x, y in zip(xs, ys):
            p = _sigmoid(sum(b * v for b, v in zip(beta, x)))
            w = p * (1.0 - p)
            for i in range(k):
                g[i] += (y - p) * x[i]
                wi = w * x[i]
                for j in range(i + 1):
                    h[i][j] += wi * x[j]
        for i in range(k):
            for j in range(i):
                h[j][i] = h[i][j]
        return h, g

    for _ in range(REGRESSION_MAX_ITER):
        h, g = information(beta)
        inv = _solve_inverse(h)
        if inv is None:
            return None
        step = [sum(inv[i][j] * g[j] for j in range(k)) for i in range(k)]
        beta = [b + s for b, s in zip(beta, step)]
        if not all(math.isfinite(b) for b in beta):
            return None
        if all(abs(s) <= 1e-10 * (1.0 + abs(b)) for s, b in zip(step, beta)):
            h, _ = information(beta)
            inv = _solve_inverse(h)
            if inv is None or any(inv[i][i] <= 0 for i in range(k)):
                return None
            return beta, [math.sqrt(inv[i][i]) for i in range(k)]
    return None


def build_experiments(exposure, outcomes, settings, warnings):
    alpha = 1.0 - settings["confidence"]
    zstar = norm_ppf(1.0 - alpha / 2.0)
    n_star = settings["sequential_tuning"]
    by_exp = defaultdict(list)
    for o in outcomes:
        by_exp[o["experiment"]].append(o)
    excluded_exposed = defaultdict(int)
    for x in exposure:
        if x["excluded"] and x["exposed_at"] is not None:
            excluded_exposed[x["experiment"]] += 1
    experiments, results, regression = [], [], []
    for exp, rows in by_exp.items():
        groups = defaultdict(list)
        for o in rows:
            groups[o["variant"]].append(o)
        variants = sorted(groups, key=_bytes_key)
        control = choose_control(variants)
        stats = {}
        for v in variants:
            g = groups[v]
            n = len(g)
            rev = [o["revenue"] / 100.0 for o in g]
            stats[v] = {"n": n, "x": sum(1 for o in g if o["converted"]), "rev": rev}
            _, var = _mean_var(rev)
            row = {
                "experiment": exp, "variant": v, "users": n, "converters": stats[v]["x"],
                "conversion_rate": stats[v]["x"] / n,
                "orders": sum(o["orders"] for o in g),
                "revenue": sum(o["revenue"] for o in g),
                "revenue_per_user": sum(o["revenue"] for o in g) / 100.0 / n,
                "revenue_sd": None if var is None else math.sqrt(var),
                "events_per_user": sum(o["events"] for o in g) / n,
                "cart_rate": sum(1 for o in g if o["added_to_cart"]) / n,
                "checkout_rate": sum(1 for o in g if o["reached_checkout"]) / n,
                "is_control": v == control,
            }
            if v == control:
                row.update(dict.fromkeys(COMPARISON_COLUMNS))
            results.append(row)
        for row in results:
            if row["experiment"] == exp and not row["is_control"]:
                row.update(compare_variants(stats[row["variant"]], stats[control], alpha,
                                            zstar, n_star))
        srm_chi2, srm_p = srm_test([stats[v]["n"] for v in variants])
        chi2, chi2_p = independence_test([(stats[v]["x"], stats[v]["n"] - stats[v]["x"])
                                          for v in variants])
        experiments.append({
            "experiment": exp, "control_variant": control, "variants": len(variants),
            "users": len(rows), "excluded_users": excluded_exposed[exp],
            "srm_chi2": srm_chi2, "srm_p": srm_p,
            "srm_detected": None if srm_p is None else srm_p < 0.001,
            "chi2": chi2, "chi2_p": chi2_p, "window_days": settings["window_days"],
        })
        treated = [v for v in variants if v != control]
        terms = ["intercept"] + treated + ["log_engagement"]
        if len(set(terms)) != len(terms):
            warnings.append("experiment %r: a variant is named like a regression term; no "
                            "regression rows expected" % exp)
            continue
        xs = [[1.0] + [1.0 if o["variant"] == v else 0.0 for v in treated]
              + [math.log1p(o["events"])] for o in rows]
        ys = [1 if o["converted"] else 0 for o in rows]
        fit = logistic_regression(xs, ys)
        if fit is None:
            continue
        for term, b, se in zip(terms, fit[0], fit[1]):
            z = b / se
            regression.append({"experiment": exp, "term": term, "coef": b, "std_err": se,
                               "z": z, "p_value": 2.0 * norm_sf(abs(z)), "n": len(rows)})
    return experiments, results, regression


def _to_rows(table, dicts):
    cols = [c for c, _ in TABLES[table]["columns"]]
    nkey = TABLES[table]["key"]
    out = {}
    for d in dicts:
        row = tuple(d[c] for c in cols)
        key = row[:nkey]
        if key in out:
            raise AssertionError("duplicate key %r in %s" % (key, table))
        out[key] = row
    return out


def compute(records, settings=None, now_ms=None, topic=None):
    """records from read_dump -> Result with .tables = {table: {key: row}}."""
    settings = dict(DEFAULT_SETTINGS, **(settings or {}))
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    res = process(records, settings, now_ms)
    by_user, sessions = build_sessions(res.accepted, settings["session_gap_ms"])
    users = build_users(by_user, sessions)
    funnel = build_funnel_daily(sessions)
    parts = [dict(partition=p, **v) for p, v in res.partitions.items()]
    rejects = [dict(partition=p, kafka_offset=o, reason=r, detail=d)
               for p, o, r, d in res.rejected]
    product_daily, product_pairs, basket_daily = build_products(res.accepted)
    exposure, outcomes = build_exposure(res.accepted, by_user, settings)
    res.warnings = []
    experiments, results, regression = build_experiments(exposure, outcomes, settings,
                                                         res.warnings)
    res.sessions = sessions  # for compare.py's checks of the views
    res.tables = {
        "sessions": _to_rows("sessions", sessions),
        "users": _to_rows("users", users),
        "funnel_daily": _to_rows("funnel_daily", funnel),
        "partitions": _to_rows("partitions", parts),
        "rejected_events": _to_rows("rejected_events", rejects),
        "cohort_retention": _to_rows("cohort_retention", build_cohorts(by_user)),
        "product_daily": _to_rows("product_daily", product_daily),
        "product_pairs": _to_rows("product_pairs", product_pairs),
        "basket_daily": _to_rows("basket_daily", basket_daily),
        "user_exposure": _to_rows("user_exposure", exposure),
        "user_outcomes": _to_rows("user_outcomes", outcomes),
        "experiments": _to_rows("experiments", experiments),
        "experiment_results": _to_rows("experiment_results", results),
        "experiment_regression": _to_rows("experiment_regression", regression),
    }
    res.now_ms = now_ms
    res.settings = settings
    res.topic = topic
    return res


def run_big_stack(fn, *args, **kwargs):
    """Run fn in a thread with a large stack, so that deeply nested JSON (up to the
    max_event_bytes limit) parses instead of hitting the recursion limit."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 200000))
    old_size = threading.stack_size(512 * 1024 * 1024)
    try:
        t = threading.Thread(target=target)
        t.start()
        t.join()
    finally:
        threading.stack_size(old_size)
        sys.setrecursionlimit(old_limit)
    if "error" in box:
        raise box["error"]
    return box["value"]


def compute_from_dump(path, settings=None, now_ms=None, topic=None):
    records = read_dump(path)
    return run_big_stack(compute, records, settings, now_ms, topic)


# ---------------------------------------------------------------------------
# Printing

def escape_text(s):
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def format_value(v, kind):
    if v is None:
        return "\\N"
    if kind == "text":
        return escape_text(v)
    if kind == "bool":
        return "t" if v else "f"
    if kind == "float":
        return repr(float(v))
    return str(v)


def print_table(res, table, out):
    cols = TABLES[table]["columns"]
    extra = [("topic", "text")] if table == "rejected_events" else []
    out.write("# " + "\t".join(c for c, _ in extra + cols) + "\n")
    for key in sorted(res.tables[table], key=_sort_key):
        row = res.tables[table][key]
        vals = [format_value(res.topic or "", "text")] if extra else []
        vals += [format_value(v, k) for v, (_, k) in zip(row, cols)]
        out.write("\t".join(vals) + "\n")


def _sort_key(key):
    # Strings byte-wise (UTF-8 order == code point order), ints numerically.
    return tuple((0, v, "") if isinstance(v, int) else (1, 0, v) for v in key)


def add_settings_args(ap):
    ap.add_argument("--max-event-bytes", type=int, default=DEFAULT_SETTINGS["max_event_bytes"])
    ap.add_argument("--max-future-ms", type=int, default=DEFAULT_SETTINGS["max_future_ms"])
    ap.add_argument("--allowed-lateness-ms", type=int,
                    default=DEFAULT_SETTINGS["allowed_lateness_ms"])
    ap.add_argument("--session-gap-ms", type=int, default=DEFAULT_SETTINGS["session_gap_ms"])
    ap.add_argument("--max-json-depth", type=int, default=DEFAULT_SETTINGS["max_json_depth"],
                    help="reject JSON nested deeper than this as invalid_json (default 0: "
                         "no limit, as in the contract)")
    ap.add_argument("--now-ms", type=int, default=None,
                    help="wall clock for future_timestamp (default: now)")
    ap.add_argument("--window-days", type=int, default=DEFAULT_SETTINGS["window_days"],
                    help="experiments' outcome window in days (default 7)")
    ap.add_argument("--exposure-type", default=DEFAULT_SETTINGS["exposure_type"],
                    help="experiments' exposure event type (default product_view)")
    ap.add_argument("--confidence", type=float, default=DEFAULT_SETTINGS["confidence"],
                    help="confidence level 1 - alpha of §6 (default 0.95)")
    ap.add_argument("--sequential-tuning", type=float,
                    default=DEFAULT_SETTINGS["sequential_tuning"],
                    help="N* of the confidence sequence (default 5000)")


def settings_from_args(args):
    return {
        "max_event_bytes": args.max_event_bytes,
        "max_future_ms": args.max_future_ms,
        "allowed_lateness_ms": args.allowed_lateness_ms,
        "session_gap_ms": args.session_gap_ms,
        "max_json_depth": args.max_json_depth,
        "window_days": args.window_days,
        "exposure_type": args.exposure_type,
        "confidence": args.confidence,
        "sequential_tuning": args.sequential_tuning,
    }


def summary_lines(res):
    lines = []
    dups = sum(v["duplicates"] for v in res.partitions.values())
    total = len(res.rejected) + len(res.accepted) + dups
    lines.append("messages %d in %d partitions: accepted %d, duplicates %d, rejected %d" % (
        total, len(res.partitions), len(res.accepted), dups, len(res.rejected)))
    reasons = defaultdict(int)
    for _, _, r, _ in res.rejected:
        reasons[r] += 1
    if reasons:
        lines.append("rejects: " + ", ".join("%s %d" % kv for kv in sorted(reasons.items())))
    lines.append(", ".join("%s %d rows" % (t, len(res.tables[t])) for t in TABLE_ORDER))
    if res.cross_partition_duplicates:
        lines.append("WARNING: %d duplicates of an event_id accepted in another partition: "
                     "which copy wins depends on the interleaving of partitions"
                     % res.cross_partition_duplicates)
    for w in getattr(res, "warnings", []):
        lines.append("WARNING: " + w)
    if res.near_future_threshold:
        lines.append("WARNING: %d events have a ts within 10 min of now + max_future: "
                     "future_timestamp depends on the exact wall clock"
                     % res.near_future_threshold)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dump", required=True, help="kcat dump ('%%p %%o %%S\\n%%s\\n')")
    ap.add_argument("--topic", default="clickmart.events")
    ap.add_argument("--print", dest="print_table", metavar="TABLE",
                    choices=TABLE_ORDER + ["all"],
                    help="print one expected table (or all) as canonical TSV")
    add_settings_args(ap)
    args = ap.parse_args(argv)
    try:
        res = compute_from_dump(args.dump, settings_from_args(args), args.now_ms, args.topic)
    except DumpError as e:
        print("reference.py: %s: %s" % (args.dump, e), file=sys.stderr)
        return 2
    sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    if args.print_table:
        tables = TABLE_ORDER if args.print_table == "all" else [args.print_table]
        for i, t in enumerate(tables):
            if args.print_table == "all":
                sys.stdout.write("%s[== %s ==]\n" % ("\n" if i else "", t))
            print_table(res, t, sys.stdout)
    else:
        for line in summary_lines(res):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
