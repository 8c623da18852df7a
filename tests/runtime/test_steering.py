"""The dispatcher's steering (shard.py ``_steer``) and sure conns, driven in one process:
a reply steered to a home whose conn is not there (it never started, it expired) bounces
to its owner and ends as in one table; without NAT, new cross-shard conns are created
surely (nothing parked) and both directions meet at home; a sure conn its owner refuses
is destroyed and counted."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw

from shardct import Config, ConnTrack, PacketBatch, wire
from shardct import profiles as P
from shardct.batch import take
from shardct.hashing import owners
from shardct.shard import LocalPool, sum_counts
from workers.configfile import load

import pooltrace as PT
from pooltrace import snapshot

SEED = 0x5EED
SAME_STATS = ("packets", "invalid", "insert", "insert_failed", "drop", "new", "related",
              "destroy")
CLIENT, SERVER = "10.0.0.2", "192.168.0.10"
S = 1_000_000_000


def udp(src, dst, sport, dport, bad_sum=False):
    p = Ether() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"x" * 20)
    if bad_sum:
        p[UDP].chksum = 0x1234
    return raw(p)


def owner_pair(sport, dport=53, n=2):
    """(owner of client->server, owner of server->client) with n shards."""
    b = PacketBatch.from_frames([udp(CLIENT, SERVER, sport, dport), udp(SERVER, CLIENT, dport, sport)])
    meta, addr = wire.new_meta(2)
    h = np.empty(2, dtype=np.int64)
    wire.parse_hash_batch(b.buf, b.off, b.length, meta, addr, False, SEED, h)
    return tuple(int(x) for x in owners(h, n, Config().n_buckets))


def cross_ports(k, n=2):
    """k client ports whose two directions have different owners."""
    out = [p for p in range(20000, 30000) if len(set(owner_pair(p, n=n))) == 2]
    assert len(out) >= k
    return out[:k]


def same_as_one_table(frames, ts, n=2, max_round=16384):
    b = PacketBatch.from_frames(frames, ts=np.asarray(ts, dtype=np.int64))
    end = int(b.ts.max())
    ref = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED))
    rb = take(b, np.arange(len(b)))
    r = ref.process(rb)
    lp = LocalPool(n, Config(), seed=SEED, max_round=max_round)
    pk, v = lp.process(take(b, np.arange(len(b))))
    PT.assert_same(f"n={n} round={max_round}", (rb.frames(), r.verdict, snapshot(ref.conns(now=end)),
                                                ref.stats()), pk, v,
                   snapshot(lp.conns(now=end)), lp.stats(), SAME_STATS)
    return r.verdict, sum_counts(s.counts for s in lp.shards)


@pytest.mark.parametrize("max_round", [1, 16384])
def test_reply_to_a_first_packet_that_started_nothing_bounces(max_round):
    """The client's first datagram has a bad checksum (INVALID: no conn), but the
    dispatcher saw it go by and steers the server's datagram to the client tuple's
    shard. That shard has no conn: it bounces the datagram to its owner, which starts
    the conn with the server's tuple as original, as one table does."""
    port = cross_ports(1)[0]
    frames = [udp(CLIENT, SERVER, port, 53, bad_sum=True), udp(SERVER, CLIENT, 53, port),
              udp(CLIENT, SERVER, port, 53), udp(SERVER, CLIENT, 53, port)]
    verdict, c = same_as_one_table(frames, [0, S, 2 * S, 3 * S], max_round=max_round)
    assert verdict.tolist() == [3, 0, 0, 0], verdict
    assert c["steered"] >= 1 and c["steer_missed"] >= 1, c


@pytest.mark.parametrize("gap_s", [60, 300])
def test_server_starts_again_after_the_conn_expired(gap_s):
    """A UDP exchange, then after its conn expired (30 s) the server sends first: within
    the steering slot's age (120 s) the datagram is steered to the old home, which finds
    the conn expired and bounces it; past it, it goes to its owner. Either way it starts
    a conn of its own, as in one table, and the client's answer is steered to it."""
    ports = cross_ports(3)
    frames, ts = [], []
    for k, p in enumerate(ports):
        frames += [udp(CLIENT, SERVER, p, 53), udp(SERVER, CLIENT, 53, p)]
        ts += [k * S, k * S + 1000]
    t = (gap_s + 3) * S
    for k, p in enumerate(ports):
        frames += [udp(SERVER, CLIENT, 53, p), udp(CLIENT, SERVER, p, 53)]
        ts += [t + k * S, t + k * S + 1000]
    verdict, c = same_as_one_table(frames, ts)
    assert (verdict == 0).all(), verdict
    assert c["steered"] >= 2 * len(ports), c
    if gap_s < 120:
        assert c["steer_missed"] >= len(ports), c


def test_without_nat_new_cross_shard_conns_are_sure():
    """Realistic traffic without NAT: new cross-shard conns are committed at once (no
    packet parked for a reservation) and reserved alongside; with MASQUERADE (a conn's
    reply tuple may be another's) they park as before. Same output as one table."""
    tr = P.profile("2k", 12000, seed=9)
    cfg = Config(max_conns=1 << 16, events=False)
    lp = LocalPool(2, cfg, seed=SEED, max_round=4096)
    lp.process(tr.fresh())
    c = sum_counts(s.counts for s in lp.shards)
    assert c["reserve_requests"] > 100 and c["grants"] == c["reserve_requests"], c
    assert c["parked"] * 20 < c["reserve_requests"], c
    # both directions met at home: few handoffs, few holds
    assert c["steered"] > 1000 and c["handoffs_out"] * 10 < c["steered"], c
    assert c["held"] * 10 < c["steered"], c
    ec = load("configs/demo.toml")
    nat = P.through_nat(tr, cfg, seed=SEED, rules=ec.rules, network=ec.network)
    masq = LocalPool(2, cfg, seed=SEED, max_round=4096, rules=ec.rules, network=ec.network)
    masq.process(nat.fresh())
    m = sum_counts(s.counts for s in masq.shards)
    assert m["parked"] > c["reserve_requests"] // 2, m


def test_a_sure_conn_its_owner_refuses_is_destroyed_and_counted():
    """The reply tuples' owner has a full table: it cannot keep their reply entries and
    refuses. The home had committed those conns surely (their packets were judged); it
    destroys them and counts sure_lost, and lists none of them."""
    ports = cross_ports(40)
    homes = {}
    for p in ports:
        homes.setdefault(owner_pair(p)[0], []).append(p)
    home, mine = max(homes.items(), key=lambda kv: len(kv[1]))
    mine = mine[:8]         # the home's own table has room for these
    assert len(mine) == 8
    # fill the owner's table first with conns wholly its own
    own = [p for p in range(30000, 40000) if owner_pair(p) == (1 - home, 1 - home)][:16]
    frames = [udp(CLIENT, SERVER, p, 53) for p in own] + [udp(CLIENT, SERVER, p, 53) for p in mine]
    b = PacketBatch.from_frames(frames, ts=np.arange(len(frames), dtype=np.int64) * 1000)
    lp = LocalPool(2, Config(max_conns=16), seed=SEED, max_round=len(frames))
    pk, v = lp.process(b)
    c = sum_counts(s.counts for s in lp.shards)
    assert c["sure_lost"] == len(mine) and c["fails"] == len(mine), c
    listed = {conn.original.sport for conn in lp.conns()}
    assert not listed & set(mine), sorted(listed & set(mine))
    assert set(own) <= listed
