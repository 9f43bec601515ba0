#!/usr/bin/env python3
"""Independent reference for the clickmart data contract (shared/CONTRACT.md).

A naive full recompute of what the daemon must have written, from a dump of the
topic made with

    kcat -C -b BROKER -t TOPIC -o beginning -e -q -f '%p %o %S\\n%s\\n'

It covers CONTRACT §1 and §1.1 (validation and rejects), §2 (watermark, too_late,
duplicates), §3 (sessions, users, funnel_daily) and §7 (rejected_events without
payload, partitions).  It shares no code with the daemon on purpose: validation is
written from the contract text with Python's json module and hooks, RFC 3339 with a
regex and calendar arithmetic, and money with exact rational arithmetic.

Python 3 standard library only.  compare.py imports it; on its own it prints the
expected tables:

    reference.py --dump FILE [--topic NAME] [--now-ms MS] --print sessions|users|
                 funnel_daily|partitions|rejected_events|all

Values are printed canonically: timestamps as ms since the epoch, money as integer
cents, days as days since 1970-01-01, NULL as \\N, strings with \\\\, \\t, \\n, \\r and
other control characters escaped.
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
# date (days since 1970-01-01).  Nullable columns hold None.

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
}
TABLE_ORDER = ["sessions", "users", "funnel_daily", "partitions", "rejected_events"]


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
                 "product_id", "cents", "partition", "offset", "eid_bytes")

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
    res.tables = {
        "sessions": _to_rows("sessions", sessions),
        "users": _to_rows("users", users),
        "funnel_daily": _to_rows("funnel_daily", funnel),
        "partitions": _to_rows("partitions", parts),
        "rejected_events": _to_rows("rejected_events", rejects),
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


def settings_from_args(args):
    return {
        "max_event_bytes": args.max_event_bytes,
        "max_future_ms": args.max_future_ms,
        "allowed_lateness_ms": args.allowed_lateness_ms,
        "session_gap_ms": args.session_gap_ms,
        "max_json_depth": args.max_json_depth,
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
