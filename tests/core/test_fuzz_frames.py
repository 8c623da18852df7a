"""Hostile frames built with structure (issue 15): Ethernet with VLAN tags, IPv4 with
options and bad IHL/lengths/checksums, IPv6 extension chains, TCP/UDP/ICMP/ICMPv6,
ICMP errors quoting ICMP errors, fragments, zero-length and 9000-byte frames, and every
truncation of valid frames, through ConnTrack (with and without configs/demo.toml's
MASQUERADE router) and through LocalPool(2).

Invariant: one verdict per frame, from the verdicts a caller may see; no exception;
NOTIP and DROP verdicts each counted once under their names, UNTRACKED ones in
``untracked`` (which also counts untracked frames whose TTL then ran out), INVALID ones in
``invalid``; and the counters account for every frame: ``not_ip + untracked + packets +
invalid.<parse reason>`` is the frame count (a frame is not IP, untracked, refused by the
parser with a reason, or it reached the tracker and counts in ``packets``; one whose TTL
runs out was tracked first), plus at most one per ``error`` (an ICMP error without its conn
reaches the tracker and is then counted ``invalid.icmp_inner`` too) and one per RST, echo
or timestamp reply the router sends itself (tracked on OUTPUT as Linux does); fragments held or
dropped by defrag (V_QUEUED, V_DROP) count in ``frag_reasm_reqds - frag_reasm_oks``.
(test_engine_fuzz.py feeds random bytes; this file feeds frames that get past parsers.)
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.all import (ICMP, IP, TCP, UDP, Dot1Q, Ether, IPOption_NOP, IPOption_RR,
                       IPOption_Router_Alert, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                       IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, Raw, raw)
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6PacketTooBig, ICMPv6ParamProblem, ICMPv6TimeExceeded)

from shardct import Config, ConnTrack, PacketBatch
from shardct import track as K
from shardct import wire
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.shard import LocalPool

S = 1_000_000_000
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALLOWED = {K.V_ACCEPT, K.V_RELATED, K.V_UNTRACKED, K.V_INVALID, K.V_DROP, K.V_NOTIP,
           K.V_QUEUED}
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def demo_nat():
    """configs/demo.toml's engine: MASQUERADE lan0 -> wan0, DNAT :8080, router mode."""
    d = tomllib.loads((CONFIGS / "demo.toml").read_text())
    rules = parse_iptables_save((CONFIGS / "demo.rules").read_text(), "demo.rules", 4)
    return Config.from_dict(d["conntrack"]), dict(rules=rules, network=Network.from_dict(d),
                                                  router=True)


# ------------------------------------------------------------------ strategies

V4 = ["10.0.0.5", "10.0.0.80", "192.168.0.1", "192.168.0.9", "8.8.8.8", "0.0.0.0",
      "255.255.255.255", "224.0.0.1"]
V6 = ["b::2", "c::3", "fe80::1", "::", "ff02::1"]
port = st.one_of(st.sampled_from([0, 53, 80, 8080, 1234, 40000, 65535]),
                 st.integers(0, 65535))
u16 = st.integers(0, 65535)
maybe = st.booleans()


def payload(max_size=64):
    return st.binary(max_size=max_size)


@st.composite
def tcp(draw):
    kw = dict(sport=draw(port), dport=draw(port), seq=draw(st.integers(0, 2**32 - 1)),
              ack=draw(st.integers(0, 2**32 - 1)), window=draw(u16),
              flags=draw(st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA", "F", "",
                                          "SF", "SR", "FPU", "SAFRPU"])))
    if draw(maybe):
        kw["options"] = draw(st.sampled_from([[("MSS", 1460)], [("WScale", 14), ("NOP", None)],
                                              [("SAckOK", b""), ("Timestamp", (1, 0))],
                                              [("NOP", None)] * 7]))
    if draw(st.integers(0, 5)) == 0:
        kw["dataofs"] = draw(st.integers(0, 15))           # bad data offset
    if draw(st.integers(0, 5)) == 0:
        kw["chksum"] = draw(u16)
    return TCP(**kw) / Raw(draw(payload()))


@st.composite
def udp(draw):
    kw = dict(sport=draw(port), dport=draw(port))
    if draw(st.integers(0, 5)) == 0:
        kw["len"] = draw(u16)
    if draw(st.integers(0, 4)) == 0:
        kw["chksum"] = draw(st.sampled_from([0, 0xFFFF])) if draw(maybe) else draw(u16)
    return UDP(**kw) / Raw(draw(payload()))


def icmp4(depth):
    echo = st.builds(lambda t, i, s, p: ICMP(type=t, id=i, seq=s) / Raw(p),
                     st.sampled_from([0, 8, 13, 14]), u16, u16, payload(32))
    if depth == 0:
        return echo
    err = st.builds(lambda t, c, inner, cut: ICMP(type=t, code=c) / Raw(raw(inner)[:cut]),
                    st.sampled_from([3, 11, 12, 5, 4]), st.integers(0, 15),
                    ipv4(depth - 1), st.integers(0, 80))
    return st.one_of(echo, err)


def icmp6(depth):
    echo = st.builds(lambda req, i, s, p: (ICMPv6EchoRequest if req else ICMPv6EchoReply)(
        id=i, seq=s, data=p), maybe, u16, u16, payload(32))
    if depth == 0:
        return echo
    kinds = [ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded, ICMPv6ParamProblem]
    err = st.builds(lambda k, inner, cut: k() / Raw(raw(inner)[:cut]),
                    st.sampled_from(kinds), ipv6(depth - 1), st.integers(0, 120))
    return st.one_of(echo, err)


def ipv4(depth=2):
    @st.composite
    def build(draw):
        l4 = draw(st.one_of(tcp(), udp(), icmp4(depth), payload().map(Raw)))
        kw = dict(src=draw(st.sampled_from(V4)), dst=draw(st.sampled_from(V4)),
                  ttl=draw(st.sampled_from([0, 1, 2, 64, 255])))
        if draw(maybe):
            kw["options"] = draw(st.sampled_from([[IPOption_NOP()] * 4, [IPOption_Router_Alert()],
                                                  [IPOption_RR(routers=["1.2.3.4"])]]))
        if draw(st.integers(0, 4)) == 0:                     # a fragment
            kw["flags"] = draw(st.sampled_from(["MF", 0, "DF"]))
            kw["frag"] = draw(st.sampled_from([0, 1, 185, 8191]))
        if draw(st.integers(0, 5)) == 0:
            kw["ihl"] = draw(st.integers(0, 15))
        if draw(st.integers(0, 5)) == 0:
            kw["len"] = draw(u16)
        if draw(st.integers(0, 5)) == 0:
            kw["chksum"] = draw(u16)
        if not isinstance(l4, (TCP, UDP, ICMP)):
            kw["proto"] = draw(st.sampled_from([6, 17, 1, 47, 132, 255]))
        return IP(**kw) / l4
    return build()


def ipv6(depth=2):
    ext = st.sampled_from([IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, "frag"])

    @st.composite
    def build(draw):
        l4 = draw(st.one_of(tcp(), udp(), icmp6(depth), payload().map(Raw)))
        pkt = IPv6(src=draw(st.sampled_from(V6)), dst=draw(st.sampled_from(V6)),
                   hlim=draw(st.sampled_from([0, 1, 64])))
        for e in draw(st.lists(ext, max_size=4)):
            if e == "frag":
                pkt = pkt / IPv6ExtHdrFragment(offset=draw(st.sampled_from([0, 1, 100])),
                                               m=draw(st.integers(0, 1)))
            else:
                pkt = pkt / e()
        pkt = pkt / l4
        if draw(st.integers(0, 5)) == 0:
            pkt[IPv6].plen = draw(u16)
        return pkt
    return build()


@st.composite
def frame(draw):
    """A frame as bytes: structured, or one of the edge sizes, maybe cut short."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return b""
    if kind == 1:                                      # a 9000-byte jumbo frame
        return raw(Ether() / IP(src="10.0.0.5", dst="8.8.8.8") / UDP(sport=1, dport=2)
                   / Raw(b"j" * (9000 - 42)))
    l2 = Ether(src="02:00:00:00:00:05", dst="02:00:00:00:00:01")
    for _ in range(draw(st.integers(0, 2) if draw(st.integers(0, 4)) == 0 else st.just(0))):
        l2 = l2 / Dot1Q(vlan=draw(st.integers(0, 4095)))
    f = raw(l2 / draw(st.one_of(ipv4(), ipv6())))
    if draw(st.integers(0, 3)) == 0:
        f = f[:draw(st.integers(0, len(f)))]
    return f


batches = st.lists(st.lists(st.tuples(frame(), st.integers(0, 1)), min_size=1, max_size=12),
                   min_size=1, max_size=3)


# ------------------------------------------------------------------ invariants

def accounted(stats: dict) -> int:
    """Frames the counters account for (see the module docstring)."""
    # every fragment defrag takes counts in frag_reasm_reqds; the one that completes a
    # datagram is then tracked (and counted) as the datagram
    # a frame whose TTL runs out was tracked first (the hop comes after conntrack, as in
    # ip_forward), so it counts where its class puts it, not in ttl_expired
    return (stats["not_ip"] + stats["untracked"] + stats["packets"]
            + sum(stats[f"invalid.{r}"] for r in wire.REASON_NAMES)
            + stats.get("frag_reasm_reqds", 0) - stats.get("frag_reasm_oks", 0))


def check(label, v, n, before, after):
    """The invariant on one batch: ``v`` its verdicts, ``before``/``after`` the counters."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    assert len(v) == n, f"{label}: {len(v)} verdicts for {n} frames"
    got = set(v.tolist())
    assert got <= ALLOWED, f"{label}: verdicts {sorted(got - ALLOWED)} outside {sorted(ALLOWED)}"
    count = {x: int((v == x).sum()) for x in ALLOWED}
    for verdict, name in ((K.V_NOTIP, "not_ip"), (K.V_DROP, "drop")):
        assert d[name] == count[verdict], \
            f"{label}: {name} counted {d[name]}, want {count[verdict]} (one per verdict)"
    # an untracked frame whose TTL ran out leaves DROP
    assert count[K.V_UNTRACKED] <= d["untracked"] <= count[K.V_UNTRACKED] + d["ttl_expired"], \
        f"{label}: untracked counted {d['untracked']} for {count[K.V_UNTRACKED]} UNTRACKED " \
        f"verdicts and {d['ttl_expired']} expired"
    # the router's own RSTs and echo / timestamp replies are tracked too (conntrack sees
    # them on OUTPUT): each counts once more, as a packet or as invalid
    own = d.get("tcp_reset", 0) + d.get("icmp_echo_reply", 0) + d.get("icmp_timestamp_reply", 0)
    assert count[K.V_INVALID] <= d["invalid"] <= count[K.V_INVALID] + count[K.V_DROP] + own, \
        f"{label}: invalid counted {d['invalid']} for {count[K.V_INVALID]} INVALID and " \
        f"{count[K.V_DROP]} DROP verdicts ({own} own replies)"
    assert count[K.V_ACCEPT] + count[K.V_RELATED] <= d["packets"], d
    # an ICMP error whose conn is gone counts in packets and in invalid.icmp_inner (and
    # in error), so it is the one frame the sum may count twice
    added = accounted(after) - accounted(before)
    assert n <= added <= n + d["error"] + own, \
        f"{label}: counters account for {added} frames, want {n} (+ up to {d['error']} " \
        f"errors and {own} own replies)"


def as_batch(frames, k):
    return PacketBatch.from_frames([f for f, _ in frames], ts=(k + 1) * S,
                                   ifindex=[i for _, i in frames])


def run_conntrack(bs, nat):
    cfg, kw = demo_nat() if nat else (Config(), {})
    ct = ConnTrack(Config(**{**cfg.__dict__, "max_conns": 64}), seed=7, **kw)
    for k, frames in enumerate(bs):
        before = ct.stats()
        res = ct.process(as_batch(frames, k))
        check(f"conntrack nat={nat}", res.verdict, len(frames), before, ct.stats())
        assert len(ct) <= 64


def run_pool(bs, nat):
    cfg, kw = demo_nat() if nat else (Config(), {})
    pool = LocalPool(2, Config(**{**cfg.__dict__, "max_conns": 64}), seed=7, reap=True, **kw)
    for k, frames in enumerate(bs):
        before = pool.stats()
        pk, v = pool.process(as_batch(frames, k))
        assert pk.seq.tolist() == sorted(pk.seq.tolist()), "LocalPool out of order"
        check(f"LocalPool(2) nat={nat}", v, len(frames), before, pool.stats())


@SETTINGS
@given(batches)
def test_structured_frames_through_conntrack(bs):
    run_conntrack(bs, nat=False)


@SETTINGS
@given(batches)
def test_structured_frames_through_the_masquerade_router(bs):
    run_conntrack(bs, nat=True)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches, st.booleans())
def test_structured_frames_through_local_pool(bs, nat):
    run_pool(bs, nat)


# every prefix of frames that reach deep into the parsers, after the frames that make
# their conns live (so cut frames meet a conn as well as none)
WHOLE = [
    Ether() / IP(src="10.0.0.5", dst="8.8.8.8", options=[IPOption_NOP()] * 4)
    / TCP(sport=1234, dport=80, flags="S", options=[("MSS", 1460), ("WScale", 7)]),
    Ether() / Dot1Q(vlan=7) / IP(src="10.0.0.5", dst="8.8.8.8") / UDP(sport=5353, dport=53)
    / Raw(b"query"),
    Ether() / IPv6(src="b::2", dst="c::3") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    / IPv6ExtHdrRouting() / UDP(sport=5, dport=53) / Raw(b"q6"),
    Ether() / IP(src="8.8.8.8", dst="192.168.0.1") / ICMP(type=3, code=3)
    / IP(src="192.168.0.1", dst="8.8.8.8") / ICMP(type=11)
    / IP(src="8.8.8.8", dst="192.168.0.1") / UDP(sport=53, dport=5353),
    Ether() / IPv6(src="c::3", dst="b::2") / ICMPv6DestUnreach()
    / IPv6(src="b::2", dst="c::3") / ICMPv6EchoRequest(id=9, seq=1),
    Ether() / IP(src="10.0.0.5", dst="8.8.8.8", flags="MF", frag=0) / ICMP(type=8, id=3)
    / Raw(b"f" * 40),
    Ether() / IPv6(src="b::2", dst="c::3") / IPv6ExtHdrFragment(offset=0, m=1)
    / TCP(sport=7, dport=80, flags="S"),
]


@pytest.mark.parametrize("nat", [False, True])
def test_every_truncation_of_valid_frames(nat):
    whole = [raw(p) for p in WHOLE]
    frames = [(f, 0) for f in whole] + [(f[:i], i % 2) for f in whole for i in range(len(f) + 1)]
    run_conntrack([frames[:len(whole)], frames[len(whole):]], nat)
    run_pool([frames[:len(whole)], frames[len(whole):]], nat)
