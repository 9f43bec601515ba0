#!/usr/bin/env python3
"""Hand-made clickmart messages with known outcomes (Python 3 stdlib only).

SELFTEST (partitions 0-2) is the data set of test_reference_selftest.sh, whose expected
tables were worked out by hand; EDGE (partition 3) adds corner cases of CONTRACT §1.1
where an independent implementation could read the contract differently (see
docs/testing.md), used by test_edge_cases.sh to hold the daemon against the reference.
MARTS (a data set of its own, partitions 0-2) exercises §3 cohort_retention, §4 and §5-§6:
its expected tables are worked out by hand in test_reference_selftest.sh, and
test_marts.sh holds the daemon against the reference on it.

    handmade.py dump FILE [--edge|--marts]    write a kcat-format dump ('%p %o %S\n%s\n')
    handmade.py produce BROKER TOPIC [--edge|--marts]
                                              produce them with kcat, each to its partition,
                                              in order (null values as null messages)
"""

import json
import subprocess
import sys

D = 1700006400000
M = 60000
NOW = 1700092800000

def ev(eid, uid, etype, ts, **kw):
    d = {"event_id": eid, "user_id": uid, "event_type": etype, "ts": ts}
    d.update(kw)
    return json.dumps(d).encode()

def padded(raw, size):
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))

def raw(s):
    return s.encode("utf-8") if isinstance(s, str) else s

P0 = [
    ev("e01", "u1", "page_view", D, country="DE"),
    ev("e02", "u1", "product_view", D + M, device="desktop", country="FR", product_id="p1"),
    ev("e03", "u1", "add_to_cart", D + M + 1800000, device="mobile"),     # gap exactly 30 min
    ev("e04", "u1", "checkout", D + 31 * M + 1800001),                    # gap 30 min + 1 ms
    ev("e05", "u1", "purchase", D + 62 * M, amount=19.99,
       items=[{"product_id": "p1", "quantity": 2, "price": 9.995}]),
    ev("e02", "u1", "page_view", D + M),                                  # duplicate
    ev("e06", "u1", "page_view", D + 46 * M),                             # late: merges
    ev("e07", "u1", "page_view", D + 62 * M - 172800000 - 1),             # too_late by 1 ms
    ev("e08", "u1", "page_view", D + 62 * M - 172800000, device=None, country=""),  # at the bound
    ev("e09", "u1", "page_view", "2023-11-15 02:00:00.999999+01:00"),     # D + 1 h + 999 ms
]

P1 = [
    ev("a01", "u2", "experiment_assignment", D + 10 * M, experiment="exp1", variant="control"),
    ev("e10", "u2", "product_view", D + 10 * M, device="tablet", country="US"),
    ev("e11", "u2", "add_to_cart", D + 12 * M),
    ev("e12", "u2", "purchase", D + 13 * M, amount=0.125, items=""),
    ev("e13", "u2", "page_view", NOW + 3600000),                          # exactly max_future
    ev("e14", "u2", "page_view", NOW + 3600001),                          # future_timestamp
    None,                                                                 # 6 null value
    b"",                                                                  # 7 empty value
    raw('{"event_id":"r8","user_id":"u","event_type":"page_view","ts":1700000000000,"x":"\\ud800"}'),
    raw('{"event_id":"r9","user_id":"u","event_type":"page_view","ts":1700000000000,"ts":1700000000000}'),
    raw('{"event_id":"r10","user_id":"u","event_type":"page_view","ts":1700000000000,"x":"a\\u0000"}'),
    b'{"event_id":"r11\xff","user_id":"u","event_type":"page_view","ts":1700000000000}',
    raw('{"event_id":"r12","user_id":"u","event_type":"page_view","ts":1700000000000,"x":NaN}'),
    raw('[1,2]'),                                                         # 13 not_an_object
    padded(ev("r14", "u2", "page_view", D + 11 * M), 65537),              # 14 too large
    padded(ev("big", "u2", "page_view", D + 11 * M), 65536),              # 15 accepted
    raw('{"event_id":5,"user_id":"u"}'),                                  # 16 missing event_type
    raw('{"event_id":"r17","user_id":"u","event_type":"page_view","ts":1.7e12,"device":"%s"}' % ("x" * 40)),
    raw('{"event_id":"","user_id":"u","event_type":"page_view","ts":1700000000000,"country":"%s"}' % ("x" * 40)),
    ev("r19", "u", "Page_view", 1700000000000),
    ev("r20", "u", "page_view", "2023-11-15T00:00:60Z"),
    ev("r21", "u", "purchase", 1700000000000, items=[{"quantity": 2}]),
    raw('{"event_id":"r22","user_id":"u","event_type":"purchase","ts":1700000000000,"amount":5,'
        '"items":[{"product_id":"p","quantity":2.0}],"device":7}'),
    ev("r23", "u", "purchase", 1700000000000, amount=5, items=[{"product_id": "p", "price": -1}],
       country="x" * 33),
    ev("r24", "u", "experiment_assignment", 1700000000000, experiment="exp1"),
    ev("", "u", "page_view", 1700000000000, device=123),                   # 25 bad_type device
    ev("r26", "u", "page_view", NOW + 86400000, product_id="p" * 129),   # 26 before future
    ev("r27", "u2", "page_view", D - 2 * 86400000),                       # 27 too_late
    ev("r28", "é" * 65, "page_view", 1700000000000),                      # 28 130 bytes
    raw('{"event_id":"r29","user_id":"u","event_type":"page_view","ts":1700000000000,"x":1e400}'),
    raw('"str"'),                                                         # 30 not_an_object
    ev("a02", "u2", "experiment_assignment", D + 700000, experiment="exp2", variant="b"),
]

P2 = [
    ev("e30", "u3", "page_view", 946684800000, device="tv"),
    ev("e31", "u3", "page_view", D + 5 * M, device="", country=None, amount="x", items=7,
       experiment=5),
    ev("e32", "u3", "product_view", D + 5 * M + 1800000, country="JP"),   # gap exactly 30 min
    ev("e33", "u3", "add_to_cart", "2023-11-15T01:05:00.0019999Z", device="tv",
       country="JP"),                                                     # D + 35 min + 30 min + 1 ms
    ev("e34", "u3", "page_view", 946684800001),                           # too_late
    ev("a00", "u4", "page_view", D + 20 * M, country="CL"),
    ev("e35", "u4", "purchase", D + 20 * M, amount=1000000000000, country="BR"),
    ev("e36", "u4", "checkout", D + 21 * M),
    ev("e37", "u4", "page_view", 4102444800000),                          # bad_value ts
    ev("e38", "u4", "page_view", "2023-11-15T00:20:00Z", device="mobile"),
    ev("e31", "u3", "page_view", D + 6 * M),                              # duplicate
    ev("e30", "u3", "page_view", 946684800000, device="tv"),              # dup, but too_late
]


def _edge():
    """Partition 3: corner cases, one message each; every event of this partition has its
    own event_id.  Outcomes as the reference reads the contract."""
    base = D + 2 * 86400000  # 2023-11-17, after everything in partitions 0-2
    msgs = []
    n = [0]

    def add(value):
        msgs.append(value)

    def e(etype="page_view", ts=None, uid="x", **kw):
        n[0] += 1
        return ev("x%03d" % n[0], uid, etype, base + n[0] * 1000 if ts is None else ts, **kw)

    def j(text):  # a raw JSON text with {ID} and {TS} filled in
        n[0] += 1
        return raw(text.replace("{ID}", '"x%03d"' % n[0]).replace("{TS}", str(base + n[0] * 1000)))

    add(e(ts="2000-02-29T00:00:00Z"))                       # accepted: leap day, no watermark yet
    add(e(ts=base))                                         # accepted
    # ts
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":99999999999999999999}'))  # bad_value: int beyond int64
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":1.7e12}'))              # bad_type
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":1700000000000.0}'))     # bad_type
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":"1700000000000"}'))     # bad_value
    add(e(ts="2023-11-17T00:00:01-00:00"))                  # accepted
    add(e(ts="2023-11-17T00:00:02.123456789Z"))             # accepted, cut to .123
    add(e(ts="2023-11-17t00:00:03.9999z"))                  # accepted, cut to .999
    add(e(ts="2023-11-17T24:00:00Z"))                       # bad_value
    add(e(ts="2023-11-17T00:00:00+24:00"))                  # bad_value (offset hour > 23)
    add(e(ts="2023-11-17T00:00:00+01:60"))                  # bad_value
    add(e(ts="2023-11-17T00:00:00.Z"))                      # bad_value (fraction needs digits)
    add(e(ts=" 2023-11-17T00:00:00Z"))                      # bad_value
    add(e(ts="2023-11-17T00:00Z"))                          # bad_value (no seconds)
    add(e(ts="2023-11-17T00:00:00+0100"))                   # bad_value (offset needs a colon)
    add(e(ts="2023-02-29T00:00:00Z"))                       # bad_value
    add(e(ts=946684799999))                                 # bad_value
    add(e(ts=4102444800000))                                # bad_value
    add(e(ts=True))                                         # bad_type
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":null}'))  # missing_field
    # items, quantity, price
    add(e("purchase", amount=1, items=[{"product_id": "p", "quantity": ""}]))   # bad_type items: "" is no number
    add(e("purchase", amount=1, items=[{"product_id": "p", "price": ""}]))      # bad_type items
    add(e("purchase", amount=1, items=[{"product_id": "p", "quantity": None, "price": None}]))  # accepted
    add(e("purchase", amount=1, items=[{"product_id": "p"}] * 100))            # accepted: 100 items
    add(e("purchase", amount=1, items=[{"product_id": "p"}] * 101))            # bad_value items
    add(e("purchase", amount=1, items=[1]))                                    # bad_type items
    add(e("purchase", amount=1, items={}))                                     # bad_type items
    add(e("purchase", amount=1, items=None))                                   # accepted
    add(e("purchase", amount=1, items=[{"product_id": ""}]))                   # bad_value items
    add(e("purchase", amount=1, items=[{"product_id": "p", "quantity": 1000001}]))  # bad_value
    add(e("purchase", amount=1, items=[{"product_id": "p", "quantity": 1000000}]))  # accepted
    add(e("purchase", amount=1, items=[{"product_id": "p", "quantity": True}]))     # bad_type
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":1,'
          '"items":[{"product_id":"p","quantity":2e0}]}'))                     # bad_type items
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":1,'
          '"items":[{"product_id":"p","quantity":-0}]}'))                      # bad_value items
    add(e("purchase", amount=1, items=[{"product_id": "p", "price": 1e12 + 1}]))   # bad_value
    add(e("purchase", amount=1, items=[{"product_id": "p", "price": "1"}]))       # bad_type
    add(e("purchase", amount=1, items=[{"product_id": "p", "quantity": 0}, {"quantity": 1}]))  # missing_field items
    # amount
    add(e("purchase", amount=""))                                              # bad_type amount
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":-0.0}'))  # accepted, 0
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":1e-400}'))  # accepted, 0
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},'
          '"amount":1000000000000.0000001}'))  # accepted: the double is 1e12
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":0.005}'))  # 1 cent
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":1.005}'))  # 100 cents
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":2.675}'))  # 268: 2.675*100.0 is 267.5
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":99999999999}'))  # accepted
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},'
          '"amount":10000000000000000000000}'))                                # bad_value (> 1e12)
    add(j('{"event_id":{ID},"user_id":"x","event_type":"purchase","ts":{TS},"amount":-1e-300}'))  # bad_value
    # JSON
    add(b"  \t\r\n" + e() + b" \n")                         # accepted: whitespace around
    add(b"\xef\xbb\xbf" + e())                               # invalid_json: BOM
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"a":1,"\\u0061":2}'))  # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"a\\u0000b":1}'))     # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"\\udc00":1}'))      # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},'
          '"device":"\\ud83d\\ude00"}'))                                        # accepted: a pair
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":123456789012345678901234567890}'))  # accepted
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":1%s}' % ("0" * 400)))  # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":-1e309}'))  # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":01}'))     # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":1.}'))     # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":[1,]}'))   # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":"\\x41"}'))  # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":Infinity}'))  # invalid_json
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":true}'))  # accepted
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS}}{}'))         # invalid_json
    add(b'{"event_id":"raw","user_id":"x","event_type":"page_view","ts":1700179200000,"z":"a\x01b"}')  # invalid_json
    add(b'{"event_id":"raw","user_id":"x","event_type":"page_view","ts":1700179200000,"z":"\xc0\xaf"}')  # invalid_json
    add(b'{"event_id":"raw","user_id":"x","event_type":"page_view","ts":1700179200000,"z":"\xed\xa0\x80"}')  # invalid_json
    add(b'{"event_id":"raw","user_id":"x","event_type":"page_view","ts":1700179200000,"z":"\xf4\x90\x80\x80"}')  # invalid_json
    add(raw("null"))                                                          # not_an_object
    add(raw("  12  "))                                                        # not_an_object
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"z":%s}'
          % ("[" * 1000 + "]" * 1000)))                                       # accepted: depth 1001
    # strings, lengths, types
    add(e(device="é" * 16))                                                   # accepted: 32 bytes
    add(e(device="é" * 16 + "a"))                                             # bad_value device
    add(e(country="x" * 32, product_id="p" * 128))                            # accepted
    add(e(device=False))                                                      # bad_type device
    add(e(country=[]))                                                        # bad_type country
    add(e(product_id={}))                                                     # bad_type product_id
    add(e(product_id=0))                                                      # bad_type product_id
    add(e("a"))                                                               # accepted: activity
    add(e("a" * 64))                                                          # accepted
    add(e("a" * 65))                                                          # bad_value event_type
    add(e("1abc"))                                                            # bad_value
    add(e("page-view"))                                                       # bad_value
    add(e("pagé"))                                                            # bad_value
    add(e(1))                                                                 # bad_type event_type
    add(ev("y" * 128, "x", "page_view", base + 500))                          # accepted: 128 bytes
    add(ev("y" * 129, "x", "page_view", base + 500))                          # bad_value event_id
    add(ev("y1", "u" * 128, "page_view", base + 500))                         # accepted
    add(ev("y2", "", "page_view", base + 500))                                # bad_value user_id
    add(ev("y3", None, "page_view", base + 500))                              # missing_field user_id
    add(ev("y4", 7, "page_view", base + 500, event_type2=1))                  # bad_type user_id
    add(e(ASSIGNMENT, experiment="e" * 64, variant="v"))                      # accepted
    add(e(ASSIGNMENT, experiment="e" * 65, variant="v"))                      # bad_value experiment
    add(e(ASSIGNMENT, experiment="e", variant=""))                            # bad_value variant
    add(e(ASSIGNMENT, experiment=1, variant=None))                            # missing_field variant
    add(e(ASSIGNMENT, experiment="e", variant="v", amount="x", items=5))      # accepted
    add(e(ASSIGNMENT, experiment="e", variant="v", device=5))                 # bad_type device
    add(e("purchase", amount=1, experiment=5, variant=[]))                    # accepted
    # precedence
    add(e("purchase", amount="x", ts="bad", device=[]))                       # bad_type amount
    add(ev("", "", "Bad", "bad"))                                             # bad_value event_id
    add(ev("z1", "x", "purchase", "bad", items=[{"quantity": 1}]))            # missing_field amount
    add(ev("z2", "x", "purchase", 1.5, amount=-1))                            # bad_type ts
    add(j('{"event_id":{ID},"user_id":"x","event_type":"page_view","ts":{TS},"device":"'
          + "d" * 40 + '","country":7}'))                                     # bad_type country
    return msgs


ASSIGNMENT = "experiment_assignment"
SELFTEST = [P0, P1, P2]
EDGE = _edge()


# ---------------------------------------------------------------------------
# MARTS: §3 cohort_retention, §4 products, §5-§6 experiments.  Every event here has its
# own event_id; the expected tables are in test_reference_selftest.sh.

H = 3600000
DAY = 86400000
W0 = 1699833600000  # Monday 2023-11-13T00:00:00Z (day 19674), D = W0 + 2 days


def _marts_p0():
    """Products (2023-11-15/16) and cohorts (weeks of Nov 13, 20, 27 and Dec 4)."""
    return [
        ev("m01", "c2", "page_view", W0 + DAY + 10 * H),                      # Tue Nov 14
        ev("m02", "b1", "product_view", D + 9 * H, product_id="pA"),
        ev("m03", "b1", "product_view", D + 9 * H + M, product_id="pA"),
        ev("m04", "b1", "add_to_cart", D + 9 * H + 2 * M, product_id="pA"),
        ev("m05", "b1", "product_view", D + 9 * H + 3 * M),                   # no product
        ev("m06", "b1", "add_to_cart", D + 9 * H + 4 * M, product_id="pQ"),
        ev("m07", "b1", "page_view", D + 9 * H + 5 * M, product_id="pY"),     # no view
        # o1: pB twice (2 x llround(100.49999) = 200, 1 x llround(267.5) = 268), pA with
        # the defaults (1 x 0), pé 3 x llround(12.5) = 39, pZ with null quantity and price.
        ev("m08", "b1", "purchase", D + 10 * H, amount=5.07, product_id="pX",
           items=[{"product_id": "pB", "quantity": 2, "price": 1.005},
                  {"product_id": "pA"},
                  {"product_id": "pB", "price": 2.675},
                  {"product_id": "pé", "quantity": 3, "price": 0.125},
                  {"product_id": "pZ", "quantity": None, "price": None}]),
        ev("m09", "b2", "purchase", D + 11 * H, amount=8.5,
           items=[{"product_id": "pé", "price": 5},
                  {"product_id": "pf", "quantity": 2, "price": 1.5},
                  {"product_id": "pA", "quantity": 1, "price": 0.5}]),
        ev("m10", "b2", "product_view", D + DAY - 1, product_id="pB"),       # 23:59:59.999
        ev("m11", "b2", "product_view", D + DAY, product_id="pA"),           # Thu 00:00
        ev("m12", "b2", "product_view", D + DAY + M, product_id="pB"),
        ev("m13", "b2", "purchase", D + DAY + 2 * M, amount=1, items=[]),
        ev("m14", "b2", "purchase", D + DAY + 3 * M, amount=2),
        ev("m15", "b2", "purchase", D + DAY + 4 * M, amount=1,
           items=[{"product_id": "pA", "quantity": 4, "price": 0.25}]),
        ev("m15", "b2", "purchase", D + DAY + 4 * M, amount=1,               # duplicate
           items=[{"product_id": "pA", "quantity": 4, "price": 0.25}]),
        ev("m16", "c1", "page_view", W0 + 7 * DAY + H),                       # Mon Nov 20 01:00
        ev("m17", "c2", ASSIGNMENT, W0 + 8 * DAY + 10 * H, experiment="cx", variant="v1"),
        ev("m18", "c1", "page_view", W0 + 7 * DAY - 2 * H),                   # late: Sun Nov 19
        ev("m19", "c4", ASSIGNMENT, W0 + 8 * DAY + 11 * H, experiment="cx", variant="v2"),
        ev("m20", "c1", "page_view", W0 + 14 * DAY + 9 * H),                  # Mon Nov 27
        ev("m21", "c2", "page_view", W0 + 15 * DAY + 10 * H),                 # Tue Nov 28
        ev("m22", "c3", "page_view", W0 + 21 * DAY - 1),                      # Sun Dec 3, last ms
        ev("m23", "c3", "page_view", W0 + 21 * DAY),                          # Mon Dec 4
    ]


def _marts_p1():
    """Experiments exp_edge and exp_small: exposure and window corner cases.  A = D."""
    A = D
    a = lambda eid, uid, ts, exp, var: ev(eid, uid, ASSIGNMENT, ts, experiment=exp, variant=var)
    return [
        ev("n01", "ue", "page_view", A - H),                                 # before assignment
        a("n02", "ue", A, "exp_edge", "control"),
        ev("n03", "ue", "product_view", A),                                  # exposed: same ms
        a("n04", "ul", A + H, "exp_edge", "treatment"),
        ev("n05", "un", "product_view", A + H + 5 * M),                      # only view: before
        a("n06", "un", A + H + 6 * M, "exp_edge", "holdout"),                # never exposed
        a("k-b", "xe", A + H + 10 * M, "exp_edge", "control"),               # contaminated:
        a("k-a", "xe", A + H + 10 * M, "exp_edge", "treatment"),             # k-a < k-b wins
        ev("n07", "xe", "product_view", A + H + 15 * M),                     # exposed, excluded
        ev("n08", "xu", "product_view", A + H + 20 * M),
        a("n09", "xu", A + H + 25 * M, "exp_edge", "control"),               # contaminated,
        a("n10", "xu", A + H + 26 * M, "exp_edge", "treatment"),             # never exposed
        ev("n11", "ud", "product_view", A + 2 * H),
        a("n12", "ud", A + 2 * H + M, "exp_edge", "treatment"),
        a("n13", "ud", A + 2 * H + 2 * M, "exp_edge", "treatment"),          # same variant again
        ev("n14", "ud", "product_view", A + 2 * H + 3 * M),
        ev("n15", "ud", "checkout", A + 2 * H + 4 * M),
        ev("n16", "ul", "product_view", A + 3 * H),
        ev("n17", "ul", "add_to_cart", A + 3 * H + M),
        a("n18", "ud", A + 2 * H - 30000, "exp_edge", "treatment"),          # late assignment
        ev("n19", "ul", "product_view", A + 2 * H),                          # late view
        a("n20", "s1", A + 4 * H, "exp_small", "a"),
        ev("n21", "s1", "product_view", A + 4 * H + M),
        ev("n22", "s1", "purchase", A + 4 * H + 2 * M, amount=3),
        a("n23", "s2", A + 4 * H + 10 * M, "exp_small", "B"),
        ev("n24", "s2", "product_view", A + 4 * H + 11 * M),
        ev("n25", "ue", "purchase", A + 7 * DAY - 1, amount=10),             # last ms in window
        ev("n26", "ue", "purchase", A + 7 * DAY, amount=20),                 # first ms out
        ev("n27", "ul", "purchase", A + 7 * DAY + 2 * H + 30 * M, amount=5), # out since n19
    ]


def _marts_p2():
    """exp_ab, a two-variant readout with three covariate patterns (the logistic
    regression is then saturated and has a closed form):
      A: control,   20 users with 3 window events, 5 convert (one purchase of 10.00);
      C: control,   20 users with 15 window events, 10 convert (two purchases of 10.00);
      B: treatment, 48 users with 3 window events, 24 convert (one purchase of 12.00).
    A converter's window holds product_view, checkout, purchase(s); a non-converter's
    product_view, add_to_cart, page_view(s).  Pattern A users also have a page_view at
    assignment, before exposure; pattern B users one at exposure + 7 days (window end,
    excluded)."""
    out = []
    users = ([("ca%02d" % i, "A", i < 5) for i in range(20)]
             + [("cc%02d" % i, "C", i < 10) for i in range(20)]
             + [("tb%02d" % i, "B", i < 24) for i in range(48)])
    for k, (uid, pattern, conv) in enumerate(users):
        t = D + k * 10 * M
        variant = "treatment" if pattern == "B" else "control"
        evs = [(ASSIGNMENT, {"experiment": "exp_ab", "variant": variant}), ("product_view", {})]
        if conv:
            price = 12 if pattern == "B" else 10
            evs += [("checkout", {}), ("purchase", {"amount": price})]
            if pattern == "C":
                evs = evs[:2] + [("add_to_cart", {})] + evs[2:] + [("purchase", {"amount": 10})]
                evs += [("page_view", {})] * 10
        else:
            evs += [("add_to_cart", {}), ("page_view", {})]
            if pattern == "C":
                evs += [("page_view", {})] * 12
        for i, (etype, kw) in enumerate(evs):
            out.append((t + i * 1000, "%s-%02d" % (uid, i), uid, etype, kw))
        if pattern == "A":
            out.append((t, "%s-pre" % uid, uid, "page_view", {}))
        if pattern == "B":
            out.append((t + 1000 + 7 * DAY, "%s-end" % uid, uid, "page_view", {}))
    out.sort(key=lambda r: (r[0], r[1]))
    return [ev(eid, uid, etype, ts, **kw) for ts, eid, uid, etype, kw in out]


MARTS = [_marts_p0(), _marts_p1(), _marts_p2()]


def partitions(which):
    if which == "marts":
        return MARTS
    return SELFTEST + [EDGE] if which == "edge" else SELFTEST


def write_dump(path, which=None):
    # Interleave the partitions as kcat does, to check that readers regroup them.
    rows = []
    for p, msgs in enumerate(partitions(which)):
        for o, v in enumerate(msgs):
            rows.append((o, p, v))
    rows.sort(key=lambda r: (r[0], r[1]))
    out = bytearray()
    for o, p, v in rows:
        out += b"%d %d %d\n" % (p, o, -1 if v is None else len(v))
        out += (v or b"") + b"\n"
    with open(path, "wb") as f:
        f.write(out)


def produce(broker, topic, which=None):
    """Each partition's messages, in order, with kcat (key 'k'); a null value is sent as a
    null message (kcat -Z), an empty one as an empty message."""
    for p, msgs in enumerate(partitions(which)):
        i = 0
        while i < len(msgs):
            null = msgs[i] is None
            j = i
            while j < len(msgs) and (msgs[j] is None) == null:
                j += 1
            data = bytearray()
            for v in msgs[i:j]:
                v = v or b""
                assert b"\x1e" not in v and b"\x1f" not in v
                data += b"k\x1f" + v + b"\x1e"
            cmd = ["kcat", "-P", "-b", broker, "-t", topic, "-p", str(p), "-K", "\\x1f",
                   "-D", "\\x1e", "-X", "max.in.flight.requests.per.connection=1"]
            if null:
                cmd.append("-Z")
            subprocess.run(cmd, input=bytes(data), check=True)
            i = j


def main(argv):
    which = "edge" if "--edge" in argv else "marts" if "--marts" in argv else None
    args = [a for a in argv if a not in ("--edge", "--marts")]
    if len(args) == 2 and args[0] == "dump":
        write_dump(args[1], which)
        return 0
    if len(args) == 3 and args[0] == "produce":
        produce(args[1], args[2], which)
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
