"""The worker pool in processes over ZeroMQ (workers/pool.py): the same results as the
single-table core with 1, 2, 3 and 4 workers, and a worker killed under load."""
from __future__ import annotations

import os

import numpy as np
import pytest

from shardct import Config, ConnTrack
from shardct.batch import concat, take
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.shard import Packets
from workers.errors import PoolStopped
from workers.pool import Pool

import pooltrace as PT
from pooltrace import snapshot

SEED = 0x5EED
SAME_STATS = ("packets", "invalid", "insert", "insert_failed", "drop", "new", "related",
              "nat_rewrites", "expired", "destroy", "entries")


def nat_kw():
    return dict(rules=parse_iptables_save(PT.MASQ, "masq.rules", 4),
                network=Network.from_dict(PT.NET), router=True)


def run_pool(n, b, **kw):
    out = []
    pool = Pool(n, Config(), seed=SEED, log=lambda *a: None, **kw)
    totals = pool.run([take(b, np.arange(len(b)))], emit=lambda pk, v: out.append((pk, v)))
    pk = Packets.concat([p for p, _ in out])
    v = np.concatenate([v for _, v in out]) if out else np.zeros(0, np.uint8)
    return pool, totals, pk, v


@pytest.fixture(scope="module")
def nat_trace():
    b = PT.trace(200, seed=21, nat=True, gap_s=40)
    ref = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw())
    rb = take(b, np.arange(len(b)))
    r = ref.process(rb)
    ref.reap_all(int(b.ts.max()))      # the end of the input, as replay and the pool do
    return b, rb.frames(), r.verdict.copy(), snapshot(ref.conns(now=int(b.ts.max()))), ref.stats()


TINY_RING = 64 << 10     # far smaller than the trace: the ring wraps, batches wait for room


@pytest.mark.parametrize("n,own_process,ring", [
    (1, False, None), (2, False, None), (3, False, None), (4, False, None), (2, True, None),
    (2, True, 0), (2, False, 0), (3, True, TINY_RING), (2, False, TINY_RING)])
def test_pool_equals_single_table(nat_trace, n, own_process, ring):
    """TCP/UDP/ICMP lifecycles through MASQUERADE with an idle gap (expiry): every frame
    leaves once, in input order, with the bytes and verdict the single table gives; the
    final tables and the counters agree too. own_process: the dispatcher runs in a
    process of its own. ring: the frame ring's size (None: the default; 0: frames in
    the messages)."""
    b, frames, verdict, conns, stats = nat_trace
    kw = {} if ring is None else {"ring_bytes": ring}
    pool, totals, pk, v = run_pool(n, b, dispatcher_process=own_process, **kw, **nat_kw())
    assert (pool.ring is None) == (ring == 0)
    if ring == TINY_RING:
        assert pool.ring.next_ticket > 4 * len(b.buf) // TINY_RING, "the ring did not wrap"
    if pool.ring is not None:
        assert not os.path.exists(pool.ring.path), "the ring file outlived the pool"
    assert totals["packets_out"] == len(b) and totals["lost_packets"] == 0, totals
    PT.assert_same(f"{n} workers", (frames, verdict, conns, stats), pk, v,
                   snapshot(pool.conns(now=int(b.ts.max()))), pool.stats(), SAME_STATS)
    if n > 1:
        c = pool.counts()
        assert c["handoffs_out"] > 0 and c["grants"] > 0, c


@pytest.mark.parametrize("own_process", [False, True])
def test_kill_9_under_load_is_restarted_and_counted(own_process):
    """kill -9 of worker 1 while rounds are in flight: the pool keeps going, the worker
    comes back, every input packet is either out or counted lost, and the conns it held
    are reported lost."""
    b = concat([PT.trace(400, seed=s) for s in range(6)])
    b.ts[:] = np.sort(b.ts)
    pool = Pool(2, Config(tcp_loose=True), seed=SEED, log=lambda *a: None, max_round=64,
                dispatcher_process=own_process)
    state = {"rounds": 0, "killed": False}

    def emit(pk, v):
        state["rounds"] += 1
        if state["rounds"] == 40 and not state["killed"]:
            pool.sup.procs[1].kill()
            state["killed"] = True

    totals = pool.run([take(b, np.arange(len(b)))], emit=emit, timeout_s=240)
    assert state["killed"], f"killed got {state['killed']} ({state['rounds']} rounds), want True"
    assert pool.sup.restarts[1] == 1, pool.sup.restarts
    assert totals["packets_out"] + totals["lost_packets"] == len(b), totals
    assert totals["packets_out"] > len(b) // 2, f"the pool kept working: {totals}"
    assert totals["lost_conns"] > 0, totals
    assert 1 in pool.tables, "the restarted worker finished the run"
    entries, live = pool.stats()["entries"], len(pool.conns())
    assert entries == live, f"entries got {entries}, want the {live} conns the workers hold " \
        "(the dead incarnation's are lost, not live)"
    print("kill -9 run:", totals, pool.counts())


def test_dispatcher_process_death_stops_the_pool_with_a_reason():
    """The dispatcher in its own process is not restarted (its place in the input would
    be lost): its death stops the run with a clear error, and no process is left."""
    b = PT.trace(300, seed=8)
    pool = Pool(2, Config(), seed=SEED, log=lambda *a: None, max_round=16,
                dispatcher_process=True)
    state = {"rounds": 0}

    def emit(pk, v):
        state["rounds"] += 1
        if state["rounds"] == 5:
            pool.sup.procs[2].kill()

    with pytest.raises(PoolStopped, match="dispatcher died") as ei:
        pool.run([take(b, np.arange(len(b)))], emit=emit, timeout_s=120)
    t = pool.totals
    want = f"lost {t['packets_in'] - t['packets_out']} of the {t['packets_in']} packets"
    assert want in str(ei.value) and t["packets_in"] > t["packets_out"], \
        f"message got {str(ei.value)!r}, want what was lost: {want!r}"
    alive = [p.is_alive() for p in pool.sup.procs]
    assert not any(alive), f"processes alive got {alive}, want all False"


def test_refresh_makes_counters_current():
    """Workers report their counters every STATS_EVERY rounds: after a feed without
    ``final`` (a few rounds) stats() lags what was fed; refresh() makes it current."""
    from shardct.traffic import handshake_frames
    b = handshake_frames(300, seed=3)
    pool = Pool(2, Config(), seed=SEED, log=lambda *a: None, max_round=100)
    pool.start()
    try:
        pool.wait_ready()
        parts = [take(b, np.arange(s, min(len(b), s + 100))) for s in range(0, len(b), 100)]
        pool.feed(parts, None)
        assert pool.totals["rounds"] > 1, pool.totals
        lagging = pool.stats().get("packets", 0)
        pool.refresh()
        got = pool.stats()
    finally:
        pool.stop()
    assert lagging < len(b), f"stats before refresh counted {lagging} of {len(b)}: not lagging"
    assert got["packets"] == len(b) and got["entries"] == 300, \
        f"got packets={got['packets']} entries={got['entries']}, want {len(b)} and 300"
