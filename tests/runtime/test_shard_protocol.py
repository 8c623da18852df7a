"""The cross-shard protocol (shardct/shard.py) driven in one process: shard-count
invariance against the single-table core, the race, stress with table invariants, a
lost shard, and the supersteps settling."""
from __future__ import annotations

import random

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

from shardct import Config, ConnTrack, PacketBatch
from shardct import track as K
from shardct.batch import take
from shardct.hashing import hash_key, owner_of_bucket
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.shard import LocalPool, Packets, Shard, run_round
from shardct.table import (HCONN, HOME, S_DYING, S_LINK0, S_LINK1, S_PENDING, S_REMOTE, S_USED,
                           S_XSHARD)

import pooltrace as PT
from pooltrace import snapshot

SEED = 0x5EED
SAME_STATS = ("packets", "invalid", "insert", "insert_failed", "drop", "new", "related",
              "nat_rewrites", "untracked", "not_ip", "ignore")


def fresh(b: PacketBatch) -> PacketBatch:
    return take(b, np.arange(len(b)))


def nat_kw(nat):
    if not nat:
        return {}
    return dict(rules=parse_iptables_save(PT.MASQ, "masq.rules", 4),
                network=Network.from_dict(PT.NET), router=True)


@pytest.mark.parametrize("nat", [False, True], ids=["plain", "masquerade"])
def test_shard_count_invariance(nat):
    """TCP lifecycles (FIN and RST), UDP, ICMP echo, NAT, and a 40 s idle gap (UDP conns
    expire, the reaper runs, they start again): with 1..4 shards every frame leaves with
    the same bytes and verdict, and the final table and counters are the single table's."""
    b = PT.trace(240, seed=11, nat=nat, gap_s=40)
    end = int(b.ts.max())
    ref = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw(nat))
    rb = fresh(b)
    r = ref.process(rb)
    want_conns = snapshot(ref.conns(now=end))
    want_stats = ref.stats()
    got = (r.verdict == K.V_ACCEPT).sum()
    assert got > 0.9 * len(b), f"single table: accepted got {got} of {len(b)}, want over 90%"
    for n in (1, 2, 3, 4):
        pool = LocalPool(n, Config(), seed=SEED, reap=True, **nat_kw(nat))
        pk, v = pool.process(fresh(b))
        PT.assert_same(f"n={n}", (rb.frames(), r.verdict, want_conns, want_stats), pk, v,
                       snapshot(pool.conns(now=end)), pool.stats(), SAME_STATS)
        if n > 1:
            handoffs = sum(s.counts["handoffs_out"] for s in pool.shards)
            grants = sum(s.counts["grants"] for s in pool.shards)
            assert handoffs > 0 and grants > 0, "the trace exercises cross-shard conns"


@pytest.mark.parametrize("max_round", [1, 3])
def test_small_rounds_hold_only_what_may_wait_for_a_handoff(max_round):
    """Live rounds are small. A packet before its round's first packet at another shard
    is never held (no handoff can come before it), so rounds of one packet hold nothing
    and take one superstep exchange; results stay the single table's either way."""
    b = PT.trace(60, seed=12, nat=True)
    end = int(b.ts.max())
    ref = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw(True))
    rb = fresh(b)
    r = ref.process(rb)
    pool = LocalPool(2, Config(), seed=SEED, max_round=max_round, reap=True, **nat_kw(True))
    pk, v = pool.process(fresh(b))
    PT.assert_same(f"max_round={max_round}", (rb.frames(), r.verdict,
                   snapshot(ref.conns(now=end)), ref.stats()), pk, v,
                   snapshot(pool.conns(now=end)), pool.stats(), SAME_STATS)
    held = sum(s.counts["held"] for s in pool.shards)
    handoffs = sum(s.counts["handoffs_out"] for s in pool.shards)
    assert handoffs > 0, "the trace has cross-shard conns"
    if max_round == 1:
        assert held == 0, f"held {held} packets in rounds of one"


def _shards(n, seed, **kw):
    return [Shard(k, n, Config(max_conns=4096), seed=seed, **kw) for k in range(n)]


def _owner(seed, n, src, dst, sport, dport, proto):
    from shardct.hashing import tuple_hash
    import ipaddress
    h = tuple_hash(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, sport,
                   dport, proto, seed)
    return owner_of_bucket(h % 16384, n, 16384)


def _packets(frames, seed, seqs, ts=10**9):
    b = PacketBatch.from_frames(frames, ts=ts)
    from shardct import wire
    meta, addr = wire.new_meta(len(b))
    h = np.empty(len(b), np.int64)
    wire.parse_hash_batch(b.buf, b.off, b.length, meta, addr, True, seed, h)
    return Packets(b, h, np.asarray(seqs, np.int64), np.full(len(b), -1, np.int64),
                   np.full(len(b), -1, np.int64))


def check_tables(shards, n):
    """Every linked tuple is unique across the pool; every cross-shard conn has exactly
    one reply entry at its owner pointing back at it, and every entry at a live conn."""
    seen = {}
    entries = {}
    for s in shards:
        t = s.ct.table
        for c in np.flatnonzero(t.cstatus & S_USED):
            st = int(t.cstatus[c])
            assert not st & S_PENDING, f"shard {s.k}: conn {c} still pending after the round"
            if st & S_DYING:
                continue
            for d, bit in ((0, S_LINK0), (1, S_LINK1)):
                if st & bit:
                    key = (tuple(t.tkey[2 * c + d]), int(t.tport[2 * c + d]), int(t.c8[c, 0]))
                    assert key not in seen, f"tuple {key} linked twice: {seen[key]} and {(s.k, c, d)}"
                    seen[key] = (s.k, c, d)
            if st & S_REMOTE:
                entries[(int(t.c32[c, HOME]), int(t.c32[c, HCONN]))] = (
                    s.k, tuple(t.tkey[2 * c + 1]), int(t.tport[2 * c + 1]))
    for s in shards:
        t = s.ct.table
        for c in np.flatnonzero(t.cstatus & S_USED):
            st = int(t.cstatus[c])
            if st & S_XSHARD and not st & S_DYING:
                e = entries.pop((s.k, int(c)), None)
                assert e is not None, f"shard {s.k}: cross-shard conn {c} has no reply entry"
                want_e = (tuple(t.tkey[2 * c + 1]), int(t.tport[2 * c + 1]))
                assert e[1] == want_e[0] and e[2] == want_e[1], \
                    f"shard {s.k}: conn {c}: reply entry (key, port) got {e[1:]}, want {want_e}"
                h = hash_key(t.seed, *t.tkey[2 * c + 1], int(t.tport[2 * c + 1]),
                             int(t.c8[c, 0]), int(t.c8[c, 1]))
                owner = owner_of_bucket(h % 16384, n, 16384)
                assert owner == e[0], \
                    f"shard {s.k} conn {c}: reply entry at shard got {e[0]}, want owner {owner}"
    assert not entries, f"reply entries without a conn: {list(entries.items())[:3]}"


def flush(shards):
    """An empty round: sends what is queued (releases after reaping)."""
    run_round(shards, [Packets.empty() for _ in shards])


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_race_packet_and_inverse_at_two_shards(proto):
    """A packet and its inverse start at two shards in the same round, thousands of times
    over random hash seeds: exactly one conn each time, both packets accepted (the loser
    as the winner's reply direction), and the rounds settle."""
    races = 0
    for seed in range(30):
        n = 2 + seed % 3
        shards = _shards(n, seed)
        rng = random.Random(seed)
        parts = [[] for _ in range(n)]
        pairs = []
        seq = 0
        for j in range(200):
            a, b = f"10.{seed}.{j // 200}.{j % 200 + 1}", f"172.16.{j % 7}.{j % 13 + 1}"
            sp, dp = rng.randrange(1024, 65535), rng.randrange(1, 1024)
            if proto == "udp":
                p = IP(src=a, dst=b) / UDP(sport=sp, dport=dp)
                q = IP(src=b, dst=a) / UDP(sport=dp, dport=sp)
            else:
                p = IP(src=a, dst=b) / TCP(sport=sp, dport=dp, flags="S", seq=100)
                q = IP(src=b, dst=a) / TCP(sport=dp, dport=sp, flags="S", seq=900)
            kp = _owner(seed, n, a, b, sp, dp, 6 if proto == "tcp" else 17)
            kq = _owner(seed, n, b, a, dp, sp, 6 if proto == "tcp" else 17)
            if kp == kq:
                continue
            first, second = (p, q) if rng.random() < 0.5 else (q, p)
            for pkt in (first, second):
                k = kp if pkt is p else kq
                parts[k].append((raw(Ether() / pkt), seq))
                seq += 1
            pairs.append((a, b, sp, dp))
        pks = [_packets([f for f, _ in part], seed, [s for _, s in part]) for part in parts]
        run_round(shards, pks)
        verdicts = np.concatenate([s.results()[1] for s in shards])
        assert len(verdicts) == seq and (verdicts == K.V_ACCEPT).all(), \
            f"seed {seed}: verdicts {np.bincount(verdicts)}"
        for a, b, sp, dp in pairs:
            hits = [c for s in shards for c in s.ct.conns()
                    if {(str(c.original.src), c.original.sport), (str(c.original.dst), c.original.dport)}
                    == {(a, sp), (b, dp)}]
            assert len(hits) == 1, f"seed {seed}: {len(hits)} conns for {a}:{sp} <-> {b}:{dp}"
            assert hits[0].packets == (1, 1), hits[0]
        check_tables(shards, n)
        races += len(pairs)
    assert races > 1500, f"races got {races}, want > 1500"


def test_stress_many_cross_shard_conns_at_once():
    """Four shards create thousands of conns at once, with duplicates, inverses and the
    same tuples again after expiry: every round settles within a bound, every linked
    tuple is unique and every reply entry matches its conn."""
    n = 4
    shards = _shards(n, 99)
    rng = random.Random(7)
    seq = 0
    ts = 10**9
    for rnd in range(12):
        parts = [[] for _ in range(n)]
        for _ in range(600):
            a, b = f"10.1.{rng.randrange(4)}.{rng.randrange(1, 40)}", f"172.16.0.{rng.randrange(1, 20)}"
            sp, dp = rng.randrange(1024, 1100), rng.choice([53, 80, 443])
            if rng.random() < 0.3:
                a, b, sp, dp = b, a, dp, sp
            pkt = IP(src=a, dst=b) / UDP(sport=sp, dport=dp)
            parts[_owner(99, n, a, b, sp, dp, 17)].append((raw(Ether() / pkt), seq))
            seq += 1
        pks = [_packets([f for f, _ in p], 99, [s for _, s in p], ts) for p in parts]
        steps = run_round(shards, pks)
        assert steps <= 8, f"round {rnd} took {steps} supersteps"
        for s in shards:
            _, v = s.results()
            got = set(v.tolist())
            assert got <= {K.V_ACCEPT, K.V_DROP}, \
                f"round {rnd} shard {s.k}: verdicts got {sorted(got)}, " \
                f"want {K.V_ACCEPT}/{K.V_DROP} only"
        flush(shards)
        check_tables(shards, n)
        ts += 20 * 10**9 if rnd % 3 == 2 else 10**8
        for s in shards:
            s.reap(ts, 0)
            s.ct.reap_all(ts)
            s._drain_dying()
        flush(shards)
        check_tables(shards, n)
    got = sum(s.counts["grants"] for s in shards)
    assert got > 1000, f"grants got {got}, want > 1000"
    got = sum(s.counts["releases_applied"] for s in shards)
    assert got > 100, f"releases_applied got {got}, want > 100"


def test_lost_shard_conns_are_rebuilt_and_counted():
    """A shard that loses its table (a crashed worker's replacement): replies for conns
    it was home of are bounced back and start new conns; stale reply entries at other
    shards are released; nothing raises and every packet gets a verdict."""
    b = PT.trace(200, seed=3)
    pool = LocalPool(3, Config(tcp_loose=True), seed=SEED)
    half = len(b) // 2
    pool.process(take(b, np.arange(half)))
    lost = pool.shards[1].ct.table.count
    assert lost > 0, f"conns at shard 1 got {lost}, want > 0"
    pool.shards[1] = Shard(1, 3, Config(tcp_loose=True), seed=SEED)
    for s in (pool.shards[0], pool.shards[2]):
        s.peer_restarted(1)
    pk, v = pool.process(take(b, np.arange(half, len(b))))
    assert len(v) == len(b) - half, f"verdicts got {len(v)}, want {len(b) - half}"
    got = set(v.tolist())
    assert got <= {K.V_ACCEPT, K.V_INVALID, K.V_DROP}, \
        f"verdicts got {sorted(got)}, want {K.V_ACCEPT}/{K.V_INVALID}/{K.V_DROP} only"
    got = sum(s.counts["entries_forgotten"] for s in pool.shards)
    assert got > 0, f"entries_forgotten got {got}, want > 0"
    flush(pool.shards)
    check_tables(pool.shards, 3)


def test_shard_affine_masquerade_needs_no_handoff():
    """Issue 4 item 6: with shard_affine_nat each home picks MASQUERADE ports whose
    reply tuple lands in its own buckets, so replies need no handoff and no cross-shard
    insert; off (the default, Linux's choice of port), they do."""
    clients = [(f"10.0.1.{1 + j}", 30000 + j) for j in range(120)]
    for affine in (False, True):
        pool = LocalPool(3, Config(shard_affine_nat=affine), seed=SEED, **nat_kw(True))
        out = [raw(Ether() / IP(src=c, dst="192.168.0.5") / UDP(sport=p, dport=53))
               for c, p in clients]
        pk, v = pool.process(PacketBatch.from_frames(out, ts=10**9, ifindex=PT.LAN))
        assert (v == K.V_ACCEPT).all(), np.bincount(v)
        ports = [Ether(f)[UDP].sport for f in pk.batch.frames()]
        before = sum(s.counts["handoffs_out"] for s in pool.shards)
        back = [raw(Ether() / IP(src="192.168.0.5", dst=PT.R_WAN) / UDP(sport=53, dport=p))
                for p in ports]
        pk, v = pool.process(PacketBatch.from_frames(back, ts=2 * 10**9, ifindex=PT.WAN))
        assert (v == K.V_ACCEPT).all(), np.bincount(v)
        got = [Ether(f)[IP].dst for f in pk.batch.frames()]
        want = [c for c, _ in clients]
        assert got == want, f"affine={affine}: reply dst got {got}, want {want}"
        ho = sum(s.counts["handoffs_out"] for s in pool.shards) - before
        req = sum(s.counts["reserve_requests"] for s in pool.shards)
        if affine:
            assert ho == 0 and req == 0, f"affine: {ho} handoffs, {req} cross-shard inserts"
        else:
            assert ho > 0 and req > 0, (ho, req)
