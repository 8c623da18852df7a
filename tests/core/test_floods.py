"""Floods against max_conns (issue 15): a SYN flood from distinct sources and a UDP flood
(requests only: nothing is ever answered) fill the table while 1,000 ASSURED flows keep
sending. The assured flows pass as ESTABLISHED throughout, early drop takes only
unassured entries, memory stays what the table was given, and the counters say so.
In one table and in a pool of two shards."""
from __future__ import annotations

import numpy as np
import pytest

from shardct import Config, ConnTrack
from shardct import track as K
from shardct.batch import concat, take
from shardct.shard import LocalPool
from shardct.traffic import handshake_frames, tcp_frames, udp_frames

SEED = 0x5EED
FLOWS = 1000
MAX_CONNS = 8192


def _flood(n, seed):
    """n SYNs from n distinct 10.64.0.0/10 sources and n one-way UDP requests from n distinct
    172.16.0.0/12 sources, shuffled together."""
    rng = np.random.default_rng(seed)
    syn = handshake_frames(n, seed=seed, syn_only=True, base_src="10.64.0.0",
                           base_dst="192.0.2.1")
    udp = udp_frames(n, seed=seed, replies=False, base_src="172.16.0.0",
                     base_dst="192.0.2.2")
    b = concat([syn, udp])
    return take(b, rng.permutation(len(b)))


def _trace(seed=5, flood=60_000, data=20_000):
    hs = handshake_frames(FLOWS, seed=seed)
    hs.ts[:] = np.arange(len(hs)) * 1000
    data_b, _ = tcp_frames(FLOWS, data, seed=seed, frame_len=64, iss=hs.iss, irs=hs.irs)
    fl = _flood(flood // 2, seed)
    # the assured flows' packets spread through the flood, all on one advancing clock
    rng = np.random.default_rng(seed + 1)
    mix = concat([data_b, fl])
    order = rng.permutation(len(mix))
    mix = take(mix, order)
    t0 = int(hs.ts.max()) + 10**6
    mix.ts[:] = t0 + np.arange(len(mix)) * 1000          # 1 us apart: nothing expires
    is_data = order < len(data_b)
    return hs, mix, is_data


def _check(verdict_hs, verdict_mix, is_data, conns, stats, entries, where):
    assert (verdict_hs == K.V_ACCEPT).all(), f"{where}: the handshakes did not all pass"
    bad = verdict_mix[is_data] != K.V_ACCEPT
    assert not bad.any(), f"{where}: {int(bad.sum())} packets of assured flows not accepted"
    est = [c for c in conns if c.state == "ESTABLISHED" and "ASSURED" in c.status
           and c.original.dport == 80 and str(c.original.dst).startswith("10.2.")]
    assert len(est) == FLOWS, f"{where}: {len(est)} assured flows left, want {FLOWS}"
    assert stats["early_drop"] > 0, f"{where}: the flood never filled the table: {stats}"
    assert entries <= MAX_CONNS, f"{where}: {entries} entries over max_conns"
    print(f"{where}: early_drop={stats['early_drop']} drop={stats['drop']} "
          f"entries={entries} insert={stats['insert']}")


def test_floods_leave_assured_flows_established_one_table():
    hs, mix, is_data = _trace()
    ct = ConnTrack(Config(max_conns=MAX_CONNS, events=False), seed=SEED)
    size = ct.table.nbytes()
    v_hs = ct.process(hs).verdict
    v = np.concatenate([ct.process(take(mix, np.arange(s, min(len(mix), s + 4096)))).verdict
                        for s in range(0, len(mix), 4096)])
    now = int(mix.ts.max())
    _check(v_hs, v, is_data, list(ct.conns(now)), ct.stats(), ct.stats()["entries"],
           "one table")
    assert ct.table.nbytes() == size, "the table grew"


@pytest.mark.parametrize("n", [2])
def test_floods_leave_assured_flows_established_pool(n):
    hs, mix, is_data = _trace(seed=6)
    lp = LocalPool(n, Config(max_conns=MAX_CONNS, events=False), seed=SEED, max_round=2048)
    _, v_hs = lp.process(hs)
    _, v = lp.process(mix)
    now = int(mix.ts.max())
    st = lp.stats()
    _check(v_hs, v, is_data, lp.conns(now), st, max(s.ct.stats()["entries"] for s in lp.shards),
           f"pool of {n}")
