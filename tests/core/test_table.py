"""The conntrack table through the ConnTrack API: UDP/ICMP/generic lifecycles and
timeouts (linux-netfilter.md §1.3), strict expiry (gVisor TestNATedConnectionReap), ICMP
errors as RELATED (§1.5), the bounded reaper (gvisor-conntrack.md §2.4), max_conns with
early drop (§1.6), events and statistics (§1.7), per-direction accounting, Config
validation, and a hypothesis property over random traffic keeping the table consistent.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest
from scapy.layers.l2 import GRE

from shardct import Config, ConfigError, ConnTrack, PacketBatch
from shardct import track as K
from shardct.config import Timeouts
from shardct.hashing import addr_words, hash_batch, tuple_hash
from shardct.table import S_USED, T_FREE, T_MASK

S = 1_000_000_000
MS = 1_000_000
T0 = 100 * S
SEED = 0x5EED
E = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
A, B, R = "10.0.0.1", "10.0.0.2", "10.0.0.254"
A6, B6, R6 = "b::2", "c::3", "b::1"


# ---------------------------------------------------------------- helpers

def mk(**cfg) -> ConnTrack:
    cfg.setdefault("event_buffer", 4096)
    return ConnTrack(Config(**cfg), seed=SEED)


def l3(src, dst):
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def udp(src, dst, sp, dp, data=b"x", pad=0):
    return raw(E / l3(src, dst) / UDP(sport=sp, dport=dp) / data) + b"\0" * pad


def tcp(src, dst, sp, dp, flags, seq=0, ack=0, win=65000, data=b""):
    return raw(E / l3(src, dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack,
                                      window=win) / data)


def echo(src, dst, ident, reply=False):
    if ":" in src:
        m = ICMPv6EchoReply(id=ident) if reply else ICMPv6EchoRequest(id=ident)
        return raw(E / IPv6(src=src, dst=dst) / m / b"ping")
    return raw(E / IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident) / b"ping")


def icmp_error(router, to, quoted: bytes):
    """An ICMP destination-unreachable from ``router`` to ``to`` quoting the IP packet
    ``quoted`` (the frame of an earlier packet, Ethernet header included)."""
    q = quoted[14:]
    if ":" in router:
        return raw(E / IPv6(src=router, dst=to) / ICMPv6DestUnreach(code=4) / Raw(q))
    return raw(E / IP(src=router, dst=to) / ICMP(type=3, code=3) / Raw(q))


def gre(src, dst):
    return raw(E / IP(src=src, dst=dst) / GRE() / IP(src="1.1.1.1", dst="2.2.2.2"))


def send(ct, frames, now):
    """Process frames (bytes or list) at ``now``; returns (verdicts, tuple ids) as lists."""
    if isinstance(frames, bytes):
        frames = [frames]
    r = ct.process(PacketBatch.from_frames(frames), now=now)
    return [int(v) for v in r.verdict], [int(t) for t in r.tuple_id]


def send1(ct, frame, now):
    v, t = send(ct, frame, now)
    return v[0], t[0]


def handshake(ct, a, b, sp, dp, now):
    """SYN, SYN/ACK, ACK at now, now+1ms, now+2ms; returns the verdicts."""
    return [send1(ct, tcp(a, b, sp, dp, "S", seq=100), now)[0],
            send1(ct, tcp(b, a, dp, sp, "SA", seq=500, ack=101), now + MS)[0],
            send1(ct, tcp(a, b, sp, dp, "A", seq=101, ack=501), now + 2 * MS)[0]]


def proto_num(p):
    return {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}.get(p, p)


def buckets_of(ct, src, dst, sp, dp, proto):
    """(routing bucket of the original tuple, of the reply tuple) of a flow without NAT."""
    nb = ct.config.n_buckets
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    p = proto_num(proto)
    return (tuple_hash(s, d, sp, dp, p, ct.table.seed) % nb,
            tuple_hash(d, s, dp, sp, p, ct.table.seed) % nb)


def stat_diff(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before.get(k)}


def linked_tuples(ct) -> list[int]:
    """Every tuple id in every chain; asserts each sits in the chain of its own hash."""
    t = ct.table
    out = []
    mask = int(t.tbl[T_MASK])
    for k in range(t.heads.shape[0]):
        x = int(t.heads[k])
        steps = 0
        while x >= 0:
            out.append(x)
            c = x >> 1
            h = int(K.tuple_hash_of(t.tkey, t.tport, t.c8, t.tbl, x))
            assert h & mask == k, f"tuple {x} in chain {k}: got hash chain {h & mask}, want {k}"
            assert t.cstatus[c] & S_USED, f"tuple {x} in chain {k} belongs to free conn {c}"
            x = int(t.tnext[x])
            steps += 1
            assert steps <= 2 * t.capacity, f"chain {k} loops"
    return out


def free_list_len(ct) -> int:
    t = ct.table
    n, c = 0, int(t.tbl[T_FREE])
    while c >= 0:
        assert not t.cstatus[c] & S_USED, f"free list holds used conn {c}"
        n += 1
        c = int(t.tnext[2 * c])
        assert n <= t.capacity, "free list loops"
    return n


# ---------------------------------------------------------------- UDP

def test_udp_unreplied_then_replied_then_assured():
    ct = mk()
    v, tid = send1(ct, udp(A, B, 1234, 53), T0)
    assert (v, tid & 1) == (K.V_ACCEPT, 0), f"got verdict {v} dir {tid & 1}, want accept dir 0"
    conn, d = ct.lookup(A, B, 1234, 53, "udp", now=T0)
    got = (d, conn.status, conn.expires, conn.timeout(T0), conn.state)
    want = (0, frozenset({"CONFIRMED"}), T0 + 30 * S, 30, None)
    assert got == want, f"new conn: got {got!r}, want {want!r}"

    v, tid2 = send1(ct, udp(B, A, 53, 1234), T0 + 1 * S)
    got = (v, tid2, ct.conn(tid >> 1).status, ct.conn(tid >> 1).expires)
    want = (K.V_ACCEPT, tid | 1, frozenset({"CONFIRMED", "SEEN_REPLY"}), T0 + 31 * S)
    assert got == want, f"reply: got {got!r}, want {want!r}"

    # stream_ts = creation + 2 s, compared strictly (time_after)
    send1(ct, udp(A, B, 1234, 53), T0 + 2 * S)
    c = ct.conn(tid >> 1)
    got = ("ASSURED" in c.status, c.expires)
    want = (False, T0 + 32 * S)
    assert got == want, f"at creation + 2 s exactly: got {got!r}, want {want!r}"

    now = T0 + 2 * S + 1
    send1(ct, udp(A, B, 1234, 53), now)
    c = ct.conn(tid >> 1)
    got = (c.status, c.expires)
    want = (frozenset({"CONFIRMED", "SEEN_REPLY", "ASSURED"}), now + 120 * S)
    assert got == want, f"after creation + 2 s: got {got!r}, want {want!r}"

    later = now + 50 * S
    send1(ct, udp(B, A, 53, 1234), later)
    got = ct.conn(tid >> 1).expires
    assert got == later + 120 * S, f"assured refresh: got {got}, want {later + 120 * S}"


def test_udp_without_reply_never_assured():
    ct = mk()
    for k in range(5):
        send1(ct, udp(A, B, 1234, 53), T0 + k * 5 * S)
    c = ct.lookup(A, B, 1234, 53, "udp")[0]
    got = (c.status, c.expires)
    want = (frozenset({"CONFIRMED"}), T0 + 20 * S + 30 * S)
    assert got == want, f"got {got!r}, want {want!r}"


def test_first_reply_after_two_seconds_is_not_yet_assured():
    # Linux sets SEEN_REPLY after the protocol handler: the first reply itself refreshes 30 s
    ct = mk()
    send1(ct, udp(A, B, 1234, 53), T0)
    send1(ct, udp(B, A, 53, 1234), T0 + 5 * S)
    c = ct.lookup(A, B, 1234, 53, "udp")[0]
    got = ("ASSURED" in c.status, c.expires)
    want = (False, T0 + 35 * S)
    assert got == want, f"got {got!r}, want {want!r}"


def test_udp_expiry_is_strict():
    ct = mk()
    send1(ct, udp(A, B, 1234, 53), T0)
    exp = T0 + 30 * S
    got = ct.lookup(A, B, 1234, 53, "udp", now=exp)
    assert got is not None, "at last + 30 s exactly: got no conn, want the conn"
    got = ct.lookup(A, B, 1234, 53, "udp", now=exp + 1)
    assert got is None, f"at last + 30 s + 1 ns: got {got!r}, want None"
    got = ct.lookup(B, A, 53, 1234, "udp", now=exp + 1)
    assert got is None, f"reply tuple at last + 30 s + 1 ns: got {got!r}, want None"
    # conns(now) also skips it; conns() without now still lists it until reaped
    got = (len(list(ct.conns(exp + 1))), len(list(ct.conns())), len(ct))
    assert got == (0, 1, 1), f"(live, allocated, len) got {got}, want (0, 1, 1)"
    got = ct.reap_all(exp)
    assert got == 0, f"reap_all at expiry exactly: got {got} destroyed, want 0"
    got = ct.reap_all(exp + 1)
    assert got == 1, f"reap_all at expiry + 1 ns: got {got} destroyed, want 1"
    assert len(ct) == 0, f"table count got {len(ct)}, want 0"


def test_packet_on_expired_conn_starts_a_new_one():
    ct = mk()
    _, t1 = send1(ct, udp(A, B, 1234, 53), T0)
    send1(ct, udp(B, A, 53, 1234), T0 + S)
    ct.events()
    now = T0 + S + 30 * S + 1
    v, t2 = send1(ct, udp(B, A, 53, 1234), now)
    # the old conn is gone: the reply-direction packet now opens a conn of its own
    got = (v, t2 & 1, [e.kind for e in ct.events()], ct.stats()["expired"], len(ct))
    want = (K.V_ACCEPT, 0, ["DESTROY", "NEW"], 1, 1)
    assert got == want, f"got {got!r}, want {want!r}"
    c = ct.conn(t2 >> 1)
    want_orig = (ipaddress.ip_address(B), ipaddress.ip_address(A), 53, 1234, 17)
    assert tuple(c.original) == want_orig, f"original got {tuple(c.original)}, want {want_orig}"


def test_nated_style_reap_ipv6_udp_120s():
    """gVisor TestNATedConnectionReap: b::2:2 -> c::3:3, reaped from the lower of its
    two buckets: both tuples stay at last + 120 s exactly and both go at + 1 ns."""
    ct = mk()
    send1(ct, udp(A6, B6, 2, 3), T0)
    send1(ct, udp(B6, A6, 3, 2), T0 + S)
    last = T0 + 3 * S
    send1(ct, udp(A6, B6, 2, 3), last)
    c = ct.lookup(A6, B6, 2, 3, "udp")[0]
    assert "ASSURED" in c.status, f"status got {c.status}, want ASSURED"
    assert c.expires == last + 120 * S, f"expires got {c.expires}, want {last + 120 * S}"
    b0, b1 = buckets_of(ct, A6, B6, 2, 3, "udp")
    low = min(b0, b1)
    for now, want_present in ((last + 120 * S, True), (last + 120 * S + 1, False)):
        ct.reap(now, low)
        got = (ct.find(A6, B6, 2, 3, "udp") is not None, ct.find(B6, A6, 3, 2, "udp") is not None)
        assert got == (want_present, want_present), f"at {now - last} ns: tuples present got {got}, want {(want_present,) * 2}"
    got = linked_tuples(ct)
    assert got == [], f"tuples left in chains: got {got}, want none"


# ---------------------------------------------------------------- ICMP and generic

@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_icmp_echo_conn(fam):
    a, b, proto = (A, B, 1) if fam == "v4" else (A6, B6, 58)
    ct = mk()
    v, tid = send1(ct, echo(a, b, 0x77), T0)
    assert v == K.V_ACCEPT, f"echo request verdict got {v}, want accept"
    c = ct.conn(tid >> 1)
    got = (tuple(c.original), tuple(c.reply), c.expires)
    want = ((ipaddress.ip_address(a), ipaddress.ip_address(b), 0x77, 0, proto),
            (ipaddress.ip_address(b), ipaddress.ip_address(a), 0, 0x77, proto), T0 + 30 * S)
    assert got == want, f"got {got!r}, want {want!r}"
    v, tid2 = send1(ct, echo(b, a, 0x77, reply=True), T0 + 5 * S)
    c = ct.conn(tid >> 1)
    got = (v, tid2, "SEEN_REPLY" in c.status, c.expires)
    want = (K.V_ACCEPT, tid | 1, True, T0 + 35 * S)
    assert got == want, f"echo reply: got {got!r}, want {want!r}"
    # never ASSURED (linux-netfilter.md §1.2)
    send1(ct, echo(a, b, 0x77), T0 + 10 * S)
    send1(ct, echo(b, a, 0x77, reply=True), T0 + 11 * S)
    assert "ASSURED" not in ct.conn(tid >> 1).status, "ICMP conn got ASSURED, want never"


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_echo_reply_without_conn_is_invalid(fam):
    a, b = (A, B) if fam == "v4" else (A6, B6)
    ct = mk()
    before = ct.stats()
    v, tid = send1(ct, echo(b, a, 0x99, reply=True), T0)
    got = (v, tid, stat_diff(before, ct.stats()), len(ct))
    want = (K.V_INVALID, -1, {"invalid": 1, "invalid.not_new": 1, "packets": 1}, 0)
    assert got == want, f"got {got!r}, want {want!r}"


@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("kind", ["udp", "tcp", "echo"])
def test_icmp_error_for_known_flow_is_related(fam, kind):
    a, b, r = (A, B, R) if fam == "v4" else (A6, B6, R6)
    ct = mk()
    if kind == "udp":
        orig, rep = udp(a, b, 5353, 53), udp(b, a, 53, 5353)
    elif kind == "tcp":
        orig, rep = tcp(a, b, 40000, 80, "S", seq=100), tcp(b, a, 80, 40000, "SA", seq=500, ack=101)
    else:
        orig, rep = echo(a, b, 0x42), echo(b, a, 0x42, reply=True)
    _, tid = send1(ct, orig, T0)
    c = tid >> 1
    send1(ct, rep, T0 + MS)
    before = ct.conn(c)
    sb = ct.stats()
    # an error about the original-direction packet travels back to a: reply direction
    v, t = send1(ct, icmp_error(r, a, orig), T0 + 2 * MS)
    got = (v, t)
    want = (K.V_RELATED, 2 * c + 1)
    assert got == want, f"error quoting original dir: got {got!r}, want {want!r}"
    # an error about the reply-direction packet travels to b: original direction
    v, t = send1(ct, icmp_error(r, b, rep), T0 + 3 * MS)
    got = (v, t)
    want = (K.V_RELATED, 2 * c)
    assert got == want, f"error quoting reply dir: got {got!r}, want {want!r}"
    d = stat_diff(sb, ct.stats())
    want = {"related": 2, "packets": 2}
    assert d == want, f"stats diff got {d!r}, want {want!r}"
    after = ct.conn(c)
    got = (after.expires, after.packets, after.status)
    want = (before.expires, before.packets, before.status)
    assert got == want, f"conn changed by RELATED errors: got {got!r}, want {want!r}"


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_icmp_error_for_unknown_flow_is_invalid(fam):
    a, b, r = (A, B, R) if fam == "v4" else (A6, B6, R6)
    ct = mk()
    send1(ct, udp(a, b, 5353, 53), T0)
    before = ct.stats()
    v, t = send1(ct, icmp_error(r, a, udp(a, b, 5354, 53)), T0 + MS)
    got = (v, t, stat_diff(before, ct.stats()))
    want = (K.V_INVALID, -1, {"invalid": 1, "invalid.icmp_inner": 1, "error": 1, "packets": 1})
    assert got == want, f"got {got!r}, want {want!r}"


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_icmp_error_to_a_host_outside_the_flow_is_invalid(fam):
    """nf_conntrack_inet_error (linux-netfilter.md §1.5): the outer destination must be
    the destination of the conn's tuple in the error's direction; an error about a->b
    sent to a third host c is INVALID and counted as error."""
    a, b, r, c = (A, B, R, "10.0.0.3") if fam == "v4" else (A6, B6, R6, "b::99")
    ct = mk()
    orig = udp(a, b, 5353, 53)
    send1(ct, orig, T0)
    before = ct.stats()
    v, t = send1(ct, icmp_error(r, c, orig), T0 + MS)
    d = stat_diff(before, ct.stats())
    got = (v, t, d.get("error", 0), d.get("invalid", 0))
    want = (K.V_INVALID, -1, 1, 1)
    assert got == want, f"(verdict, tuple id, error, invalid) got {got!r}, want {want!r}"


def test_icmp_error_for_expired_flow_is_invalid():
    ct = mk()
    orig = udp(A, B, 5353, 53)
    send1(ct, orig, T0)
    v, _ = send1(ct, icmp_error(R, A, orig), T0 + 30 * S + 1)
    assert v == K.V_INVALID, f"got verdict {v}, want invalid ({K.V_INVALID})"
    assert ct.stats()["error"] == 1, f"error got {ct.stats()['error']}, want 1"


def test_icmp_error_with_broken_quote_counts_error():
    ct = mk()
    orig = udp(A, B, 5353, 53)
    send1(ct, orig, T0)
    before = ct.stats()
    cut = raw(E / IP(src=R, dst=A) / ICMP(type=3, code=3) / Raw(orig[14:14 + 24]))
    v, _ = send1(ct, cut, T0 + 1)
    got = (v, stat_diff(before, ct.stats()))
    want = (K.V_INVALID, {"invalid": 1, "invalid.icmp_inner": 1, "error": 1})
    assert got == want, f"got {got!r}, want {want!r}"


def test_generic_protocol_600s():
    ct = mk()
    v, tid = send1(ct, gre(A, B), T0)
    c = ct.conn(tid >> 1)
    got = (v, c.proto, tuple(c.original), c.expires)
    want = (K.V_ACCEPT, 47, (ipaddress.ip_address(A), ipaddress.ip_address(B), 0, 0, 47), T0 + 600 * S)
    assert got == want, f"got {got!r}, want {want!r}"
    v, t2 = send1(ct, gre(B, A), T0 + 10 * S)
    got = (v, t2, ct.conn(tid >> 1).expires, "ASSURED" in ct.conn(tid >> 1).status)
    want = (K.V_ACCEPT, tid | 1, T0 + 610 * S, False)
    assert got == want, f"reply: got {got!r}, want {want!r}"
    got = ct.lookup(A, B, 0, 0, 47, now=T0 + 610 * S + 1)
    assert got is None, f"after 600 s idle: got {got!r}, want None"


def test_lookup_skips_expired_entries_but_find_without_time_sees_them():
    ct = mk()
    send1(ct, udp(A, B, 1, 2), T0)
    got = (ct.find(A, B, 1, 2, "udp", now=T0 + 31 * S), ct.find(A, B, 1, 2, "udp") is not None)
    assert got == (None, True), f"got {got!r}, want (None, True)"


def test_lookup_with_clock_uses_clock():
    from shardct import ManualClock
    clock = ManualClock(T0)
    ct = ConnTrack(Config(event_buffer=64), seed=SEED, clock=clock)
    ct.process(PacketBatch.from_frames([udp(A, B, 1, 2)]))
    assert ct.lookup(A, B, 1, 2, "udp") is not None, "got None right after creation, want conn"
    clock.advance(30)
    assert ct.lookup(A, B, 1, 2, "udp") is not None, "got None at +30 s exactly, want conn"
    clock.advance(ns=1)
    got = ct.lookup(A, B, 1, 2, "udp")
    assert got is None, f"at +30 s + 1 ns: got {got!r}, want None"


# ---------------------------------------------------------------- the reaper

def spread_flows(ct, n, now, base_port=10000):
    """n UDP conns A:port -> B:53 at ``now``; returns {conn id: (bucket0, bucket1)}."""
    out = {}
    for k in range(n):
        sp = base_port + k
        _, tid = send1(ct, udp(A, B, sp, 53), now)
        out[tid >> 1] = buckets_of(ct, A, B, sp, 53, "udp")
    return out


def test_reap_walks_one_128th_of_the_buckets():
    ct = mk(n_buckets=256, max_conns=1024)
    flows = spread_flows(ct, 80, T0)
    now = T0 + 31 * S
    # a start whose two buckets hold at least one tuple
    start = next(b for b in range(0, 256, 2) if any(b in bs or b + 1 in bs for bs in flows.values()))
    nxt, interval = ct.reap(now, start)
    walked = {start, start + 1}
    want_gone = {c for c, bs in flows.items() if walked & set(bs)}
    alive = {c.id for c in ct.conns()}
    got_gone = set(flows) - alive
    assert got_gone == want_gone, f"gone got {sorted(got_gone)}, want {sorted(want_gone)} (walked {sorted(walked)})"
    got = (nxt, interval, len(ct))
    want = (start + 2, 10 * MS, 80 - len(want_gone))
    assert got == want, f"(next_start, interval, count) got {got!r}, want {want!r}"
    # walking on from next_start for 127 more calls reaps everything
    s = nxt
    for _ in range(127):
        s, _ = ct.reap(now, s)
    got = (s, len(ct))
    assert got == (start, 0), f"after a full traversal (next_start, count) got {got!r}, want {(start, 0)!r}"


def test_reap_default_size_walks_128_buckets():
    ct = mk(max_conns=4096)
    flows = spread_flows(ct, 200, T0)
    now = T0 + 31 * S
    nxt, _ = ct.reap(now, 1000)
    walked = set(range(1000, 1128))
    want_gone = {c for c, bs in flows.items() if walked & set(bs)}
    got_gone = set(flows) - {c.id for c in ct.conns()}
    got = (nxt, got_gone)
    want = (1128, want_gone)
    assert got == want, f"got {got!r}, want {want!r}"


def test_reap_wraps_around_the_last_bucket():
    """Buckets past the end wrap to 0: reap(now, n_buckets - 1) walks the last bucket and
    bucket 0 (gVisor: idx = (i + start) % len(buckets))."""
    ct = mk(n_buckets=256, max_conns=256)      # one chain per routing bucket
    now = T0
    sp = next(p for p in range(1024, 65536)
              if buckets_of(ct, A, B, p, 53, "udp")[0] == 0 and buckets_of(ct, A, B, p, 53, "udp")[1] != 255)
    send1(ct, udp(A, B, sp, 53), now)
    nxt, _ = ct.reap(now + 31 * S, 255)
    got = (nxt, len(ct), ct.find(A, B, sp, 53, "udp") is None)
    want = (1, 0, True)
    assert got == want, (f"reap(start=255) with a conn in bucket 0: (next_start, count, gone) "
                         f"got {got!r}, want {want!r}")


def udp_ports_with_buckets(ct, src, dst, want0, want1):
    """(sport, dport) of a UDP flow src -> dst whose original tuple lands in routing bucket
    want0 and reply tuple in want1 (vectorised search with the numba hash)."""
    nb = ct.config.n_buckets
    s_hi, s_lo = addr_words(ipaddress.ip_address(src).packed)
    d_hi, d_lo = addr_words(ipaddress.ip_address(dst).packed)
    sp = np.repeat(np.arange(1024, 65536, dtype=np.int64), 16)
    dp = np.tile(np.arange(1, 17, dtype=np.int64), 65536 - 1024)
    n = sp.shape[0]
    proto = np.full(n, 17, dtype=np.uint8)
    ver = np.full(n, 4, dtype=np.uint8)
    valid = np.ones(n, dtype=np.bool_)
    fwd, rev = np.zeros((n, 4), dtype=np.uint64), np.zeros((n, 4), dtype=np.uint64)
    fwd[:] = (s_hi, s_lo, d_hi, d_lo)
    rev[:] = (d_hi, d_lo, s_hi, s_lo)
    h0, h1 = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    hash_batch(ct.table.seed, fwd, ((sp << 16) | dp).astype(np.uint32), proto, ver, valid, h0)
    hash_batch(ct.table.seed, rev, ((dp << 16) | sp).astype(np.uint32), proto, ver, valid, h1)
    hit = np.nonzero((h0 % nb == want0) & (h1 % nb == want1))[0]
    assert hit.size, f"no UDP flow with buckets ({want0}, {want1})"
    return int(sp[hit[0]]), int(dp[hit[0]])


def test_reap_traversal_from_odd_start_covers_every_bucket():
    """128 calls walk every bucket once whatever the start; here a conn with both tuples
    in bucket 0 and one chain per routing bucket."""
    ct = mk(n_buckets=256, max_conns=256)
    sp, dp = udp_ports_with_buckets(ct, A, B, 0, 0)
    got = buckets_of(ct, A, B, sp, dp, "udp")
    assert got == (0, 0), f"search: buckets got {got}, want (0, 0)"
    send1(ct, udp(A, B, sp, dp), T0)
    spread_flows(ct, 100, T0)
    now = T0 + 31 * S
    s = 255
    for _ in range(128):
        s, _ = ct.reap(now, s)
    left = sorted((c.original.sport, c.original.dport) for c in ct.conns())
    assert len(ct) == 0, (f"after 128 calls from start 255: got {len(ct)} conns left "
                          f"(ports {left}; the bucket-0 flow is {(sp, dp)}), want 0")


def test_reap_interval_rule():
    """gVisor reapUnused: 10 ms when expired * 100 // checked > 50 (tuples), else the
    previous interval + 10 ms, capped at 468.75 ms; the first run's previous interval is
    reaperDelay (5 s)."""
    ct = mk(n_buckets=128, max_conns=1024)     # one bucket per call
    got = [ct.reap(T0, k)[1] for k in range(2)]
    assert got == [468_750_000] * 2, f"first runs (after 5 s) got {got}, want 468.75 ms twice"

    def port_in_bucket(b, taken, both=False):
        """A UDP port p: A:p -> B:53 in bucket b; its reply in b too iff ``both``."""
        for p in range(1024, 65536):
            if p in taken:
                continue
            b0, b1 = buckets_of(ct, A, B, p, 53, "udp")
            if b0 == b and (b1 == b) == both:
                taken.add(p)
                return p
        raise AssertionError("no port found")

    taken = set()
    # bucket 7: two expired conns, one live -> 2 of 3 tuples expired -> 10 ms
    x1, x2 = port_in_bucket(7, taken), port_in_bucket(7, taken)
    send(ct, [udp(A, B, x1, 53), udp(A, B, x2, 53)], T0)
    y = port_in_bucket(7, taken)
    send1(ct, udp(A, B, y, 53), T0 + 20 * S)
    _, iv = ct.reap(T0 + 31 * S, 7)
    assert iv == 10 * MS, f"2 of 3 expired: interval got {iv}, want {10 * MS}"
    got = (ct.find(A, B, x1, 53, "udp"), ct.find(A, B, x2, 53, "udp"), ct.find(A, B, y, 53, "udp") is not None)
    assert got == (None, None, True), f"(x1, x2, y present) got {got!r}, want (None, None, True)"
    # bucket 9: one expired, one live -> exactly half -> not more than half: grows
    x = port_in_bucket(9, taken)
    send1(ct, udp(A, B, x, 53), T0)
    y = port_in_bucket(9, taken)
    send1(ct, udp(A, B, y, 53), T0 + 20 * S)
    _, iv = ct.reap(T0 + 31 * S, 9)
    assert iv == 20 * MS, f"1 of 2 expired: interval got {iv}, want {20 * MS}"
    # nothing expired: grows again, then on up to the cap
    got = [ct.reap(T0 + 31 * S, 9)[1] for _ in range(47)]
    want = [min(10 * MS * (k + 3), 468_750_000) for k in range(47)]
    assert got == want, f"0 expired: intervals got {got}, want {want}"
    # bucket 11: an expired conn with both tuples there and a live one: 2 of 3 tuples
    x = port_in_bucket(11, taken, both=True)
    send1(ct, udp(A, B, x, 53), T0)
    y = port_in_bucket(11, taken)
    send1(ct, udp(A, B, y, 53), T0 + 20 * S)
    _, iv = ct.reap(T0 + 31 * S, 11)
    assert iv == 10 * MS, f"2 of 3 tuples expired (one conn): interval got {iv}, want {10 * MS}"
    # bucket 13: 26 of 51 tuples expired is 50 in gVisor's integer percentage: grows
    xs = [port_in_bucket(13, taken) for _ in range(26)]
    ys = [port_in_bucket(13, taken) for _ in range(25)]
    send(ct, [udp(A, B, p, 53) for p in xs], T0)
    send(ct, [udp(A, B, p, 53) for p in ys], T0 + 20 * S)
    _, iv = ct.reap(T0 + 31 * S, 13)
    assert iv == 20 * MS, f"26 of 51 expired: interval got {iv}, want {20 * MS}"


def test_reaping_removes_both_tuples_and_flow_can_be_recreated():
    ct = mk()
    send1(ct, udp(A, B, 1234, 53), T0)
    send1(ct, udp(B, A, 53, 1234), T0 + S)
    got = len(linked_tuples(ct))
    assert got == 2, f"linked tuples got {got}, want 2"
    got = ct.reap_all(T0 + S + 30 * S + 1)
    assert got == 1, f"reaped got {got}, want 1"
    got = (ct.find(A, B, 1234, 53, "udp"), ct.find(B, A, 53, 1234, "udp"), len(ct),
           linked_tuples(ct), ct.stats()["destroy"], ct.stats()["expired"])
    want = (None, None, 0, [], 1, 1)
    assert got == want, f"after reap got {got!r}, want {want!r}"
    now = T0 + 100 * S
    ct.events()
    v, tid = send1(ct, udp(A, B, 1234, 53), now)
    v2, tid2 = send1(ct, udp(B, A, 53, 1234), now + S)
    got = (v, v2, tid2, [e.kind for e in ct.events()], len(ct), len(linked_tuples(ct)),
           "SEEN_REPLY" in ct.conn(tid >> 1).status)
    want = (K.V_ACCEPT, K.V_ACCEPT, tid | 1, ["NEW", "UPDATE"], 1, 2, True)
    assert got == want, f"recreated: got {got!r}, want {want!r}"


# ---------------------------------------------------------------- max_conns, early drop

def test_full_table_early_drops_an_unassured_conn():
    # n_buckets = 8: the eviction range (8 chains from the new tuple's) covers the table
    ct = mk(max_conns=8, n_buckets=8)
    for k in range(8):
        v, _ = send1(ct, udp(A, B, 2000 + k, 53), T0 + k)
        assert v == K.V_ACCEPT, f"conn {k}: verdict got {v}, want accept"
    ct.events()
    before = ct.stats()
    v, tid = send1(ct, udp(A, B, 3000, 53), T0 + 10)
    d = stat_diff(before, ct.stats())
    got = (v, len(ct), d.get("early_drop"), d.get("drop", 0), [e.kind for e in ct.events()])
    want = (K.V_ACCEPT, 8, 1, 0, ["DESTROY", "NEW"])
    assert got == want, f"got {got!r}, want {want!r}"
    assert ct.find(A, B, 3000, 53, "udp") is not None, "new conn not found after early drop"
    gone = [k for k in range(8) if ct.find(A, B, 2000 + k, 53, "udp") is None]
    assert len(gone) == 1, f"evicted conns got {gone}, want exactly one"


def test_full_table_of_assured_conns_drops_new_packets():
    ct = mk(max_conns=8, n_buckets=8)
    for k in range(8):
        vs = handshake(ct, A, B, 40000 + k, 80, T0 + k * 10 * MS)
        assert vs == [K.V_ACCEPT] * 3, f"handshake {k}: verdicts got {vs}"
        c = ct.lookup(A, B, 40000 + k, 80, "tcp")[0]
        assert "ASSURED" in c.status, f"handshake {k}: status got {c.status}, want ASSURED"
    before = ct.stats()
    v1, t1 = send1(ct, tcp(A, B, 50000, 80, "S", seq=1), T0 + S)
    v2, t2 = send1(ct, udp(A, B, 50001, 53), T0 + S)
    d = stat_diff(before, ct.stats())
    got = (v1, t1, v2, t2, d.get("drop"), d.get("early_drop", 0), len(ct))
    want = (K.V_DROP, -1, K.V_DROP, -1, 2, 0, 8)
    assert got == want, f"got {got!r}, want {want!r}"
    got = (ct.find(A, B, 50000, 80, "tcp"), ct.find(A, B, 50001, 53, "udp"))
    assert got == (None, None), f"dropped flows found: got {got!r}"
    # the forward mask keeps everything except drops
    r = ct.process(PacketBatch.from_frames([tcp(A, B, 50002, 80, "S"), tcp(A, B, 40000, 80, "A", seq=101, ack=501)]),
                   now=T0 + S)
    got = r.forward_mask(False).tolist()
    assert got == [False, True], f"forward mask got {got}, want [False, True]"


def test_full_table_evicts_an_expired_assured_conn_first():
    ct = mk(max_conns=8, n_buckets=8, timeouts=Timeouts(tcp_established=60))
    for k in range(8):
        handshake(ct, A, B, 40000 + k, 80, T0)
    before = ct.stats()
    v, _ = send1(ct, tcp(A, B, 50000, 80, "S", seq=1), T0 + 2 * MS + 60 * S + 1)
    d = stat_diff(before, ct.stats())
    got = (v, d.get("expired"), d.get("early_drop", 0), d.get("drop", 0), len(ct))
    # every expired conn in the eviction range (here the whole table) is reaped
    want = (K.V_ACCEPT, 8, 0, 0, 1)
    assert got == want, f"got {got!r}, want {want!r}"


def test_full_table_reaps_every_expired_entry_before_early_dropping_a_live_one():
    """Churn: the table is full of conns half of which have expired. New conns take the
    expired ones' slots (all of them reaped on the first early-drop scan, as Linux's
    early_drop_list does); no live (unassured) conn is early-dropped."""
    ct = mk(max_conns=8, n_buckets=8)       # 8 chains: the eviction range is the table
    for k in range(4):
        send1(ct, udp(A, B, 2000 + k, 53), T0)              # expire at T0 + 30 s
    for k in range(4):
        send1(ct, udp(A, B, 2100 + k, 53), T0 + 20 * S)     # live until T0 + 50 s
    assert len(ct) == 8, f"table got {len(ct)} conns, want full (8)"
    before = ct.stats()
    got_v = [send1(ct, udp(A, B, 3000 + k, 53), T0 + 31 * S)[0] for k in range(4)]
    d = stat_diff(before, ct.stats())
    got = (got_v, d.get("expired", 0), d.get("early_drop", 0), d.get("drop", 0), len(ct))
    want = ([K.V_ACCEPT] * 4, 4, 0, 0, 8)
    assert got == want, f"(verdicts, expired, early_drop, drop, len) got {got!r}, want {want!r}"
    live = [k for k in range(4) if ct.find(A, B, 2100 + k, 53, "udp") is not None]
    assert live == [0, 1, 2, 3], f"live conns left got {live}, want all four"
    # one more: nothing has expired now, so an unassured conn is early-dropped
    before = ct.stats()
    v, _ = send1(ct, udp(A, B, 4000, 53), T0 + 32 * S)
    d = stat_diff(before, ct.stats())
    got = (v, d.get("expired", 0), d.get("early_drop", 0), len(ct))
    assert got == (K.V_ACCEPT, 0, 1, 8), f"got {got!r}, want an early drop now"


# ---------------------------------------------------------------- events

@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_events_tcp_handshake_then_reap(fam):
    a, b = (A, B) if fam == "v4" else (A6, B6)
    ct = mk()
    vs = handshake(ct, a, b, 40000, 80, T0)
    assert vs == [K.V_ACCEPT] * 3, f"verdicts got {vs}"
    c = ct.lookup(a, b, 40000, 80, "tcp")[0]
    end = c.expires
    assert end == T0 + 2 * MS + 432000 * S, f"established expires got {end}, want {T0 + 2 * MS + 432000 * S}"
    assert ct.reap_all(end) == 0, "reaped at expiry exactly, want kept"
    assert ct.reap_all(end + 1) == 1, "not reaped at expiry + 1 ns"
    ev = ct.events()
    got = [(e.kind, e.conn.state, tuple(sorted(e.conn.status)), e.conn.packets, e.time) for e in ev]
    want = [
        ("NEW", "SYN_SENT", ("CONFIRMED",), (1, 0), T0),
        ("UPDATE", "SYN_RECV", ("CONFIRMED", "SEEN_REPLY"), (1, 1), T0 + MS),
        ("UPDATE", "ESTABLISHED", ("ASSURED", "CONFIRMED", "SEEN_REPLY"), (2, 1), T0 + 2 * MS),
        ("DESTROY", "ESTABLISHED", ("ASSURED", "CONFIRMED", "SEEN_REPLY"), (2, 1), end + 1),
    ]
    assert got == want, f"events got {got!r}, want {want!r}"
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    for e in ev:
        got = (tuple(e.conn.original), tuple(e.conn.reply), e.conn.id)
        want = ((ia, ib, 40000, 80, 6), (ib, ia, 80, 40000, 6), c.id)
        assert got == want, f"{e.kind} tuples got {got!r}, want {want!r}"
    assert ct.events() == [], "events not drained"


def test_events_udp_new_reply_assured_no_event_on_plain_refresh():
    ct = mk()
    send1(ct, udp(A, B, 1, 2), T0)
    send1(ct, udp(A, B, 1, 2), T0 + MS)            # refresh only
    send1(ct, udp(B, A, 2, 1), T0 + 2 * MS)        # SEEN_REPLY
    send1(ct, udp(B, A, 2, 1), T0 + 3 * MS)        # refresh only
    send1(ct, udp(A, B, 1, 2), T0 + 3 * S)         # ASSURED
    send1(ct, udp(A, B, 1, 2), T0 + 4 * S)         # refresh only
    got = [(e.kind, tuple(sorted(e.conn.status))) for e in ct.events()]
    want = [("NEW", ("CONFIRMED",)), ("UPDATE", ("CONFIRMED", "SEEN_REPLY")),
            ("UPDATE", ("ASSURED", "CONFIRMED", "SEEN_REPLY"))]
    assert got == want, f"events got {got!r}, want {want!r}"


def test_events_off():
    ct = mk(events=False)
    handshake(ct, A, B, 1, 2, T0)
    got = ct.events()
    assert got == [], f"events with events=False got {got!r}, want []"


def test_event_buffer_overflow_is_counted():
    ct = mk(event_buffer=2)
    send(ct, [udp(A, B, 1000 + k, 53) for k in range(5)], T0)
    got = (len(ct.events()), ct.stats()["events_lost"])
    assert got == (2, 3), f"(events, events_lost) got {got!r}, want (2, 3)"


# ---------------------------------------------------------------- statistics

def test_stats_keys():
    st_ = mk().stats()
    for k in ("entries", "found", "invalid", "insert", "insert_failed", "drop", "early_drop",
              "error", "search_restart"):
        assert k in st_, f"stats() lacks {k!r}; got keys {sorted(st_)}"
        assert st_[k] == 0, f"fresh {k} got {st_[k]}, want 0"
    reasons = sorted(k for k in st_ if k.startswith("invalid."))
    assert len(reasons) == len(K.INVALID_NAMES), f"invalid.* keys got {reasons}"


def _parse_invalid_frames():
    ok_tcp = E / IP(src=A, dst=B) / TCP(sport=1, dport=2, flags="A")
    good = raw(ok_tcp)
    bad_l4 = bytearray(good)
    bad_l4[14 + 20 + 16] ^= 0xFF
    bad_ip = bytearray(good)
    bad_ip[14 + 10] ^= 0xFF
    return [
        ("short_l2", good[:10]),
        ("ip_header", raw(E / IP(src=A, dst=B, ihl=4) / UDP())),
        ("ip_length", raw(E / IP(src=A, dst=B, len=500) / UDP())),
        ("ip_checksum", bytes(bad_ip)),
        ("l4_short", raw(E / IP(src=A, dst=B, proto=6) / Raw(b"\0" * 10))),
        ("tcp_doff", raw(E / IP(src=A, dst=B) / TCP(sport=1, dport=2, flags="A", dataofs=3))),
        ("tcp_flags", raw(E / IP(src=A, dst=B) / TCP(sport=1, dport=2, flags="SF"))),
        ("l4_checksum", bytes(bad_l4)),
        ("udp_length", raw(E / IP(src=A, dst=B) / UDP(sport=1, dport=2, len=300))),
        ("icmp_type", raw(E / IP(src=A, dst=B) / ICMP(type=44))),
        ("icmp_inner", raw(E / IP(src=R, dst=A) / ICMP(type=3, code=3) / Raw(udp(A, B, 1, 2)[14:14 + 22]))),
        ("ext_header", raw(E / IPv6(src=A6, dst=B6, nh=0, plen=4)) + b"\x06\x00\x00\x00"),
        ("l4_checksum", raw(E / IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2, chksum=0))),
    ]


@pytest.mark.parametrize("reason,frame", _parse_invalid_frames(), ids=[r for r, _ in _parse_invalid_frames()])
def test_parse_invalid_counts_once(reason, frame):
    ct = mk()
    before = ct.stats()
    v, t = send1(ct, frame, T0)
    d = stat_diff(before, ct.stats())
    inv = {k: n for k, n in d.items() if k.startswith("invalid.")}
    got = (v, t, d.get("invalid"), inv)
    want = (K.V_INVALID, -1, 1, {f"invalid.{reason}": 1})
    assert got == want, f"got {got!r}, want {want!r}"


def _tracker_invalid_cases():
    """(name, setup frames, invalid frame, reason) for invalids decided by the tracker."""
    hs = [tcp(A, B, 1, 2, "S", seq=100), tcp(B, A, 2, 1, "SA", seq=500, ack=101),
          tcp(A, B, 1, 2, "A", seq=101, ack=501)]
    return [
        ("synack-without-conn", [], tcp(B, A, 2, 1, "SA", seq=1, ack=1), "not_new"),
        ("rst-without-conn", [], tcp(A, B, 1, 2, "R", seq=1), "not_new"),
        ("fin-ack-without-conn", [], tcp(A, B, 1, 2, "FA", seq=1, ack=1), "not_new"),
        ("echo-reply-without-conn", [], echo(B, A, 5, reply=True), "not_new"),
        ("icmp-error-unknown-flow", [], icmp_error(R, A, udp(A, B, 1, 2)), "icmp_inner"),
        ("fin-in-syn-sent", hs[:1], tcp(A, B, 1, 2, "FA", seq=101, ack=0), "tcp_state"),
        ("ack-from-originator-in-syn-sent", hs[:1], tcp(A, B, 1, 2, "A", seq=101, ack=1), "tcp_state"),
        ("seq-over-upper-bound", hs, tcp(A, B, 1, 2, "A", seq=101 + 50_000_000, ack=501, data=b"x"),
         "tcp_window"),
        ("rst-before-maxack", hs + [tcp(A, B, 1, 2, "A", seq=101, ack=501)],
         tcp(B, A, 2, 1, "R", seq=400), "tcp_rst"),
    ]


@pytest.mark.parametrize("name,setup,frame,reason", _tracker_invalid_cases(),
                         ids=[c[0] for c in _tracker_invalid_cases()])
def test_tracker_invalid_counts_once(name, setup, frame, reason):
    ct = mk()
    for k, f in enumerate(setup):
        v, _ = send1(ct, f, T0 + k * MS)
        assert v == K.V_ACCEPT, f"{name} setup packet {k}: verdict got {v}, want accept"
    n_before = len(ct)
    before = ct.stats()
    v, t = send1(ct, frame, T0 + S)
    d = stat_diff(before, ct.stats())
    inv = {k: n for k, n in d.items() if k.startswith("invalid.")}
    got = (v, t, d.get("invalid"), inv, len(ct))
    want = (K.V_INVALID, -1, 1, {f"invalid.{reason}": 1}, n_before)
    assert got == want, f"{name}: got {got!r}, want {want!r}"


def test_untracked_and_not_ip_are_not_invalid():
    from scapy.all import ARP
    from scapy.layers.inet6 import ICMPv6ND_NS
    ct = mk(defrag=False)       # with defrag (the default) a lone fragment is held: test_frag
    frames = [raw(E / IP(src=A, dst=B, frag=10, proto=17) / Raw(b"\0" * 16)),
              raw(E / IPv6(src=A6, dst="ff02::1:ff00:3") / ICMPv6ND_NS(tgt=B6)),
              raw(E / ARP(op=1, hwsrc="02:00:00:00:00:02", psrc=A, pdst=B, hwdst="00:00:00:00:00:00"))]
    before = ct.stats()
    vs, ts = send(ct, frames, T0)
    d = stat_diff(before, ct.stats())
    got = (vs, ts, d)
    want = ([K.V_UNTRACKED, K.V_UNTRACKED, K.V_NOTIP], [-1, -1, -1], {"untracked": 2, "not_ip": 1})
    assert got == want, f"got {got!r}, want {want!r}"


def test_insert_and_new_counted_per_conn():
    ct = mk()
    send(ct, [udp(A, B, 1, 2), udp(B, A, 2, 1), udp(A, B, 3, 4), echo(A, B, 9), gre(A, B)], T0)
    s = ct.stats()
    got = (s["insert"], s["new"], s["entries"], s["packets"])
    assert got == (4, 4, 4, 5), f"(insert, new, entries, packets) got {got}, want (4, 4, 4, 5)"


# ---------------------------------------------------------------- IPv6 and counters

@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_tcp_and_udp_conns_both_families(fam):
    a, b = (A, B) if fam == "v4" else (A6, B6)
    ct = mk()
    vs = handshake(ct, a, b, 40000, 443, T0)
    assert vs == [K.V_ACCEPT] * 3, f"verdicts got {vs}"
    c, d = ct.lookup(a, b, 40000, 443, "tcp")
    c2, d2 = ct.lookup(b, a, 443, 40000, "tcp")
    got = (c.state, d, c2.id == c.id, d2, sorted(c.status))
    want = ("ESTABLISHED", 0, True, 1, ["ASSURED", "CONFIRMED", "SEEN_REPLY"])
    assert got == want, f"tcp: got {got!r}, want {want!r}"
    send1(ct, udp(a, b, 5000, 53), T0)
    send1(ct, udp(b, a, 53, 5000), T0 + S)
    c, d = ct.lookup(b, a, 53, 5000, "udp")
    got = (d, sorted(c.status), c.proto, c.original.src.version)
    want = (1, ["CONFIRMED", "SEEN_REPLY"], 17, 4 if fam == "v4" else 6)
    assert got == want, f"udp: got {got!r}, want {want!r}"
    # the other family's addresses never match
    other = ("::ffff:" + a) if fam == "v4" else A
    other_b = ("::ffff:" + b) if fam == "v4" else B
    got = ct.lookup(other, other_b, 5000, 53, "udp")
    assert got is None, f"cross-family lookup got {got!r}, want None"


@pytest.mark.parametrize("fam,hdr", [("v4", 20), ("v6", 40)])
def test_counters_per_direction_count_ip_bytes(fam, hdr):
    a, b = (A, B) if fam == "v4" else (A6, B6)
    ct = mk()
    send(ct, [udp(a, b, 1, 2, b"x" * 10, pad=7), udp(a, b, 1, 2, b"y" * 10)], T0)
    send1(ct, udp(b, a, 2, 1, b"z" * 100, pad=30), T0 + S)
    c = ct.lookup(a, b, 1, 2, "udp")[0]
    got = (c.packets, c.bytes)
    want = ((2, 1), (2 * (hdr + 8 + 10), hdr + 8 + 100))
    assert got == want, f"(packets, bytes) got {got!r}, want {want!r}"


def test_invalid_and_related_packets_do_not_count_bytes():
    ct = mk()
    _, tid = send1(ct, tcp(A, B, 1, 2, "S", seq=100), T0)
    send1(ct, tcp(A, B, 1, 2, "FA", seq=101), T0 + 1)          # invalid in SYN_SENT
    send1(ct, icmp_error(R, A, tcp(A, B, 1, 2, "S", seq=100)), T0 + 2)
    c = ct.conn(tid >> 1)
    got = (c.packets, c.bytes)
    assert got == ((1, 0), (40, 0)), f"got {got!r}, want ((1, 0), (40, 0))"


# ---------------------------------------------------------------- Config

def test_config_from_dict_accepts_known_settings():
    cfg = Config.from_dict({"max_conns": 1000, "n_buckets": 1024, "checksum": False,
                            "timeouts": {"udp": 10, "tcp_established": 7.5}}, "ct.toml")
    got = (cfg.max_conns, cfg.n_buckets, cfg.checksum, cfg.timeouts.udp,
           cfg.timeouts.tcp_established, cfg.timeouts.icmp)
    want = (1000, 1024, False, 10, 7.5, 30)
    assert got == want, f"got {got!r}, want {want!r}"
    arr = cfg.timeouts.to_array()
    got = (int(arr[K.TMO_UDP]), int(arr[3]))
    assert got == (10 * S, int(7.5 * S)), f"tmo array got {got}"


@pytest.mark.parametrize("d", [
    {"max_conn": 5},
    {"bogus": True},
    {"timeouts": {"udp_foo": 3}},
    {"max_conns": "100"},
    {"max_conns": 1.5},
    {"max_conns": True},
    {"max_conns": 0},
    {"max_conns": -4},
    {"event_buffer": 0},
    {"checksum": 1},
    {"checksum": "yes"},
    {"tcp_loose": None},
    {"n_buckets": 1000},
    {"timeouts": {"udp": 0}},
    {"timeouts": {"udp": -1}},
    {"timeouts": {"udp": "30"}},
    {"timeouts": {"udp": True}},
    {"timeouts": 30},
    {"timeouts": ["udp"]},
    {"timeouts": {"udp": float("nan")}},
    {"timeouts": {"udp": float("inf")}},
    {"max_conns": 2**31},
    {"max_conns": 2**26 + 1},
    {"max_conns": 10**11},
    {"n_buckets": 2**40},
    {"n_buckets": 2**25},
    {"event_buffer": 2**63 - 1},
    {"event_buffer": 2**22 + 1},
], ids=lambda d: repr(d))
def test_config_from_dict_rejects_with_file_name(d):
    try:
        Config.from_dict(d, "conf/ct.toml")
    except ConfigError as e:
        got = (e.where, str(e).startswith("conf/ct.toml: "))
        assert got == ("conf/ct.toml", True), f"ConfigError got where={e.where!r} msg={str(e)!r}"
        return
    except Exception as e:      # noqa: BLE001 - the point is which exception
        raise AssertionError(f"{d!r}: got {type(e).__name__}: {e}, want ConfigError naming conf/ct.toml") from e
    raise AssertionError(f"{d!r}: got a Config, want ConfigError naming conf/ct.toml")


def test_config_bounds_are_inclusive_and_checked_on_direct_construction():
    cfg = Config.from_dict({"max_conns": 2**26, "n_buckets": 2**24, "event_buffer": 2**22})
    got = (cfg.max_conns, cfg.n_buckets, cfg.event_buffer)
    assert got == (2**26, 2**24, 2**22), f"got {got}, want the limits themselves accepted"
    for kw in ({"max_conns": 2**31}, {"n_buckets": 3}, {"event_buffer": 0}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            Config(**kw)


def test_config_error_names_the_key():
    with pytest.raises(ConfigError) as ei:
        Config.from_dict({"max_conns": "x"}, "a.toml")
    assert "max_conns" in str(ei.value), f"message got {str(ei.value)!r}, want it to name max_conns"
    with pytest.raises(ConfigError) as ei:
        Config.from_dict({"timeouts": {"zzz": 1}}, "a.toml")
    assert "zzz" in str(ei.value), f"message got {str(ei.value)!r}, want it to name zzz"


# ---------------------------------------------------------------- property: table consistency

H4 = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
H6 = ["b::1", "b::2"]
FLAGS = ["S", "SA", "A", "PA", "FA", "R", "RA"]
SEQS = [0, 1, 100, 101, 500, 501, 2 ** 31]


@lru_cache(maxsize=None)
def gen_frame(kind, fam, si, di, sp, dp, fl, seq, ack, ident) -> bytes:
    hosts = H4 if fam == 4 else H6
    s, d = hosts[si], hosts[di]
    if kind == "udp":
        return udp(s, d, sp, dp)
    if kind == "tcp":
        return tcp(s, d, sp, dp, fl, seq=seq, ack=ack, win=65000, data=b"x" if fl == "PA" else b"")
    if kind == "echo":
        return echo(s, d, ident)
    if kind == "reply":
        return echo(s, d, ident, reply=True)
    if kind == "gre":
        return gre(s, d) if fam == 4 else udp(s, d, sp, dp)
    # an ICMP error from the destination quoting a UDP packet src -> dst
    return icmp_error(d, s, udp(s, d, sp, dp))


@st.composite
def packets(draw):
    fam = draw(st.sampled_from([4, 4, 6]))
    n = 3 if fam == 4 else 2
    si = draw(st.integers(0, n - 1))
    di = draw(st.integers(0, n - 2))
    di = di + 1 if di >= si else di
    return gen_frame(draw(st.sampled_from(["udp", "udp", "tcp", "tcp", "tcp", "echo", "reply", "gre", "err"])),
                     fam, si, di, draw(st.sampled_from([53, 1000])),
                     draw(st.sampled_from([53, 1000])), draw(st.sampled_from(FLAGS)),
                     draw(st.sampled_from(SEQS)), draw(st.sampled_from(SEQS)),
                     draw(st.sampled_from([1, 2])))


STEPS = [0, 1, MS, S, 3 * S, 29 * S, 31 * S, 121 * S]


def check_table(ct, now, live_ids):
    allc = list(ct.conns())
    live = list(ct.conns(now))
    got = (len(ct), len(allc))
    assert got[0] == got[1], f"table count {got[0]} != conns iterated {got[1]}"
    assert len(ct) <= ct.config.max_conns, f"count {len(ct)} over max_conns {ct.config.max_conns}"
    ids = {c.id for c in allc}
    assert ids == live_ids, f"conn ids got {sorted(ids)}, want (from events) {sorted(live_ids)}"
    seen = {}
    for c in allc:
        for d, tup in enumerate((c.original, c.reply)):
            key = tuple(tup)
            assert key not in seen, f"tuple {key} shared by conn {seen.get(key)} and conn {c.id}/{d}"
            seen[key] = (c.id, d)
    for c in live:
        for d, tup in enumerate((c.original, c.reply)):
            got = ct.find(str(tup.src), str(tup.dst), tup.sport, tup.dport, tup.proto, now=now)
            assert got == (c.id, d), f"live conn {c.id} dir {d} tuple {tuple(tup)}: find got {got}, want {(c.id, d)}"
    for c in allc:
        for d, tup in enumerate((c.original, c.reply)):
            got = ct.find(str(tup.src), str(tup.dst), tup.sport, tup.dport, tup.proto)
            assert got == (c.id, d), f"conn {c.id} dir {d}: raw find got {got}, want {(c.id, d)}"
    n_linked = len(linked_tuples(ct))
    assert n_linked == 2 * len(ct), f"linked tuples got {n_linked}, want {2 * len(ct)}"
    got = free_list_len(ct) + len(ct)
    assert got == ct.table.capacity, f"free + used got {got}, want capacity {ct.table.capacity}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.tuples(packets(), st.sampled_from(STEPS)), min_size=1, max_size=6),
                          st.sampled_from([None, None, "reap", "all"]), st.integers(0, 15)),
                min_size=1, max_size=12),
       st.integers(0, 2 ** 32 - 1), st.sampled_from([(6, 8), (64, 16), (16, 128)]))
def test_random_traffic_keeps_table_consistent(batches, seed, sizes):
    max_conns, nb = sizes
    ct = ConnTrack(Config(max_conns=max_conns, n_buckets=nb, event_buffer=1024), seed=seed)
    now = T0
    live_ids: set[int] = set()

    def absorb_events():
        for e in ct.events():
            if e.kind == "NEW":
                assert e.conn.id not in live_ids, f"NEW for conn {e.conn.id} already live"
                live_ids.add(e.conn.id)
            elif e.kind == "DESTROY":
                assert e.conn.id in live_ids, f"DESTROY for conn {e.conn.id} not live"
                live_ids.discard(e.conn.id)
            else:
                assert e.conn.id in live_ids, f"UPDATE for conn {e.conn.id} not live"

    for pkts, maint, start in batches:
        ts = []
        for _, dt in pkts:
            now += dt
            ts.append(now)
        b = PacketBatch.from_frames([f for f, _ in pkts], ts=ts)
        r = ct.process(b)
        for i, (v, t) in enumerate(zip(r.verdict.tolist(), r.tuple_id.tolist())):
            assert v in (K.V_ACCEPT, K.V_RELATED, K.V_UNTRACKED, K.V_INVALID, K.V_DROP, K.V_NOTIP), f"verdict {v}"
            assert (t >= 0) == (v in (K.V_ACCEPT, K.V_RELATED)), f"packet {i}: verdict {v} with tuple id {t}"
        if maint == "reap":
            ct.reap(now, start % nb)
        elif maint == "all":
            ct.reap_all(now)
        absorb_events()
        check_table(ct, now, live_ids)
        for i, (v, t) in enumerate(zip(r.verdict.tolist(), r.tuple_id.tolist())):
            if v == K.V_ACCEPT and maint is None and len(pkts) == 1 and t >> 1 in live_ids:
                # the tuple a packet matched is that packet's own tuple, in the conn
                c = ct.conn(t >> 1)
                tup = c.original if t & 1 == 0 else c.reply
                m = r.meta  # scratch: still this batch's
                want_ports = int(m[i, 4])
                got_ports = (tup.sport << 16) | tup.dport
                assert got_ports == want_ports, f"packet {i}: conn ports got {got_ports:#x}, want {want_ports:#x}"
