"""Realistic traffic profiles (shardct/profiles.py) through the single-process engine:
every frame accepted, one conn per flow, TCP conns closed (TIME_WAIT or CLOSE) and
ASSURED; through the demo router's MASQUERADE (configs/demo.toml) the same, with the
server's frames addressed to the router, and port contention remapped."""
from __future__ import annotations

import ipaddress
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shardct import Config, ConnTrack
from shardct import profiles as P
from shardct import track as K
from shardct import wire
from shardct.netconf import Network
from shardct.rules import parse_iptables_save

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEED = 0x5EED
ROUTER_WAN = ipaddress.ip_address("192.168.0.1")
LAN_NET = ipaddress.ip_network("10.0.0.0/24")


def demo_nat():
    """(rules, network) of configs/demo.toml (MASQUERADE out of wan0)."""
    d = tomllib.loads((CONFIGS / "demo.toml").read_text())
    rules = parse_iptables_save((CONFIGS / d["nat"]["rules"]).read_text(), "demo.rules", 4)
    return rules, Network.from_dict(d, "demo.toml")


def track(trace, **kw):
    """Run a fresh copy of the trace through one ConnTrack: (verdicts, stats, conns)."""
    ct = ConnTrack(Config(max_conns=1 << 16, events=False), seed=SEED, **kw)
    r = ct.process(trace.fresh())
    return r.verdict, ct.stats(), list(ct.conns())


def check_tracked(trace, verdict, stats, conns):
    n = len(trace)
    got_v = Counter(K.VERDICT_NAMES[int(v)] for v in verdict)
    assert got_v == {"accept": n}, f"got verdicts {dict(got_v)}, want accept={n}"
    for name in ("invalid", "ignore", "insert_failed", "drop", "early_drop", "nat_failed"):
        assert stats[name] == 0, f"got {name}={stats[name]}, want 0"
    want = trace.conns()
    got = Counter({6: "tcp", 17: "udp", 1: "icmp"}[c.proto] for c in conns)
    assert dict(got) == {k: v for k, v in want.items() if v}, f"got conns {dict(got)}, want {want}"
    tcp = [c for c in conns if c.proto == 6]
    states = Counter(c.state for c in tcp)
    assert set(states) <= {"TIME_WAIT", "CLOSE"}, f"got TCP states {dict(states)}, want TIME_WAIT/CLOSE"
    unassured = sum("ASSURED" not in c.status for c in tcp)
    assert unassured == 0, f"got {unassured} TCP conns without ASSURED, want 0"
    return states


@pytest.fixture(scope="module")
def small():
    return P.realistic(4000, 200, seed=3)


def test_every_frame_tracked_and_every_tcp_conn_closed(small):
    states = check_tracked(small, *track(small))
    # the mix holds each kind of flow and each end (FIN: TIME_WAIT, RST: CLOSE)
    assert states["TIME_WAIT"] > 0 and states["CLOSE"] > 0, f"got {dict(states)}, want both"
    got = small.conns()
    assert min(got.values()) > 0, f"got flows {got}, want every protocol"


def test_shape_order_and_sides(small):
    n = len(small)
    assert 3900 <= n <= 4000, f"got {n} frames, want at most 4000 (whole flows) and close"
    d = np.diff(small.batch.ts)
    assert d.min() > 0, f"got a timestamp step of {d.min()} ns, want strictly increasing"
    b = small.batch
    meta, addr = wire.new_meta(n)
    wire.parse_batch(b.buf, b.off, b.length, meta, addr, True)
    src = np.array([ipaddress.ip_address(int(x)) in LAN_NET for x in addr[:, 1]])
    lan = b.ifindex == P.LAN
    assert np.array_equal(src, lan), f"got {int((src != lan).sum())} frames whose ifindex " \
                                     "does not match their side, want 0"
    first_lan = lan[small.first].all()
    assert first_lan, "got a flow opened from the WAN side, want every flow opened by a client"
    assert (small.reply > small.first).all(), "got a flow answered before it opened"


def test_deterministic_from_seed():
    a, b = P.realistic(1500, 50, seed=11), P.realistic(1500, 50, seed=11)
    same = np.array_equal(a.batch.buf, b.batch.buf) and np.array_equal(a.batch.ts, b.batch.ts)
    assert same, "got different traces for one seed, want identical"
    c = P.realistic(1500, 50, seed=12)
    differ = not np.array_equal(a.batch.ts, c.batch.ts)
    assert differ, "got the same trace for seeds 11 and 12, want different"


def test_n_flows_and_concurrency():
    t = P.realistic(0, 300, seed=5, n_flows=3000, mix=(1, 0, 0))
    assert t.conns() == {"tcp": 3000, "udp": 0, "icmp": 0}, f"got {t.conns()}, want 3000 TCP flows"
    got = t.concurrency()
    assert 150 <= got <= 450, f"got {got} flows open at a time, want about 300"


def test_named_profiles_and_bad_arguments():
    t = P.profile("2k", 3000, seed=1)
    check_tracked(t, *track(t))
    with pytest.raises(ValueError):
        P.profile("3k", 100)
    with pytest.raises(ValueError):
        P.realistic(100, 10, port_share=1000)


def test_masquerade_through_the_demo_router(small):
    rules, net = demo_nat()
    cfg = Config(max_conns=1 << 16, events=False)
    nat = P.through_nat(small, cfg, seed=SEED, rules=rules, network=net)
    assert nat.remapped == 0, f"got {nat.remapped} ports moved, want 0 (no contention)"
    verdict, stats, conns = track(nat, rules=rules, network=net)
    check_tracked(nat, verdict, stats, conns)
    nonat = sum("SRC_NAT" not in c.status for c in conns)
    assert nonat == 0, f"got {nonat} conns without SRC_NAT, want 0"
    b = nat.batch
    meta, addr = wire.new_meta(len(b))
    wire.parse_batch(b.buf, b.off, b.length, meta, addr, True)
    down = b.ifindex == P.WAN
    to_router = addr[down, 3] == int(ROUTER_WAN)
    assert to_router.all(), f"got {int((~to_router).sum())} WAN frames not to {ROUTER_WAN}"
    lan_same = np.array_equal(b.buf[b.off[0]:b.off[0] + b.length[0]],
                              small.batch.buf[:small.batch.length[0]])
    assert lan_same, "got the first client frame changed, want client frames as sent"


def test_port_contention_remaps_under_masquerade():
    t = P.contention(4000, 200, share=8, seed=4)
    check_tracked(t, *track(t))             # without NAT the tuples are distinct
    rules, net = demo_nat()
    cfg = Config(max_conns=1 << 16, events=False)
    nat = P.through_nat(t, cfg, seed=SEED, rules=rules, network=net)
    flows = len(t.proto)
    assert nat.remapped >= flows // 2, f"got {nat.remapped} of {flows} flows remapped, want " \
                                       "most (8 clients share each port)"
    verdict, stats, conns = track(nat, rules=rules, network=net)
    check_tracked(nat, verdict, stats, conns)
    replies = Counter(c.reply for c in conns)
    dup = sum(v > 1 for v in replies.values())
    assert dup == 0, f"got {dup} reply tuples held twice, want 0"
