"""Fragments through the worker pool (workers/pool.py with frag.PoolStage): the pool
reassembles in front of its shards and cuts on the way out, so what leaves is what one
process (ConnTrack.process) sends, byte for byte: datagrams NATed whole and
re-fragmented at min(egress MTU, largest fragment), frag-needed for DF datagrams whose
largest fragment is over the MTU (and none for those under it), oversize non-DF IPv4
frames cut at the MTU, overlaps dropped; with the same counters and verdicts."""
from __future__ import annotations


import numpy as np
import pytest
from scapy.all import ICMP, IP, UDP, Ether, IPv6, Raw, raw
from scapy.layers.inet import fragment
from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6

from shardct import Config, ConnTrack, PacketBatch
from shardct import track as K
from shardct.batch import concat, take
from shardct.conntrack import forward_mask
from shardct.frag import with_fragments
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.shard import Packets
from workers.pcapio import read_capture
from workers.pool import Pool

import pooltrace as PT

SEED = 0xF4A6
WAN_MTU = 1300
NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24", "fd00::3/64"]},
                      "wan0": {"address": ["192.168.0.1/24", "2001:db8::1/64"],
                               "mtu": WAN_MTU}}}
E6 = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02", type=0x86DD)


def nat_kw():
    return dict(rules=parse_iptables_save(PT.MASQ, "masq.rules", 4),
                network=Network.from_dict(NET), router=True)


def _v4(h, size, cut, df=False, sport=None):
    p = IP(src=f"10.0.9.{1 + h}", dst="192.168.0.5", id=0x4000 + h, flags="DF" if df else 0) \
        / UDP(sport=sport or 4000 + h, dport=53) / Raw(bytes([h]) * size)
    frs = fragment(p, cut)
    if df:
        for f in frs:
            f.flags |= 2
    return [raw(PT.E / f) for f in frs]


def fragment_frames():
    """(LAN frames in order, each a list of one datagram's fragments or one whole packet)."""
    rng = np.random.default_rng(3)
    out = []
    for h in range(8):                      # non-DF, cut at 1400: re-cut at the WAN MTU
        out.append(_v4(h, 3000, 1400))
    for h in range(8, 12):                  # DF, cut at 1000 (under the MTU): whole again
        out.append(_v4(h, 2500, 1000, df=True))
    for h in range(12, 16):                 # DF, largest 1400 > MTU: frag-needed, no conn
        out.append(_v4(h, 2500, 1400, df=True))
    for h in range(16, 20):                 # out of order and a duplicate
        f = _v4(h, 4000, 1200)
        f = [f[i] for i in rng.permutation(len(f))]
        out.append(f + [f[0]])
    for h in range(20, 23):                 # an overlapping fragment: all dropped
        p = IP(src=f"10.0.9.{1 + h}", dst="192.168.0.5", id=0x5000 + h) \
            / UDP(sport=4000 + h, dport=53) / Raw(b"o" * 2000)
        a = fragment(p, 1000)
        b = IP(raw(a[0]))
        b.frag = 60
        b.flags = 1
        del b.chksum
        out.append([raw(PT.E / a[0]), raw(PT.E / b), raw(PT.E / a[1])])
    for h in range(23, 27):                 # whole but over the MTU: non-DF cut, DF answered
        out.append([raw(PT.E / IP(src=f"10.0.9.{1 + h}", dst="192.168.0.6",
                                  flags="DF" if h % 2 else 0)
                          / UDP(sport=4000 + h, dport=53) / Raw(b"w" * 1400))])
    for h in range(27, 31):                 # IPv6 (never cut by routers: too-big)
        p = IPv6(src=f"fd00::9:{h}", dst="2001:db8::5") / IPv6ExtHdrFragment(id=0x600 + h) \
            / UDP(sport=5000 + h, dport=53) / Raw(b"6" * 2400)
        out.append([raw(E6 / f) for f in fragment6(p, 1000 if h % 2 else 1400)])
    return out


def trace():
    """The NAT trace with the datagrams' fragments spread over its time (each datagram's
    in order of the list), from the LAN."""
    b = PT.trace(80, seed=9, nat=True)
    rng = np.random.default_rng(11)
    t0, t1 = int(b.ts.min()), int(b.ts.max())
    frames, ts = [], []
    for d in fragment_frames():
        ts += np.sort(rng.integers(t0, t1, len(d))).tolist()
        frames += d
    p = PacketBatch.from_frames(frames, ts=ts, ifindex=[PT.LAN] * len(frames))
    both = concat([b, p])
    return take(both, np.argsort(both.ts, kind="stable"))


def leaving(batch, fw, frags, frag_of, key):
    """(frames, key of each) that leave, fragments in place of what they replace."""
    if frags is None:
        idx = np.flatnonzero(fw)
        return take(batch, idx).frames(), key[idx].tolist()
    out, src = with_fragments(batch, fw, frags, frag_of)
    return out.frames(), key[src].tolist()


@pytest.fixture(scope="module")
def reference():
    b = trace()
    ct = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw())
    frames, keys, gen = [], [], []
    # in batches of 100: fragment queues live across batches
    for s in range(0, len(b), 100):
        part = take(b, np.arange(s, min(s + 100, len(b))))
        r = ct.process(part)
        f, k = leaving(part, r.forward, r.fragments, r.fragment_of, np.arange(s, s + len(part)))
        frames += f
        keys += k
        if r.generated is not None:
            gen += r.generated.frames()
        if s == 0:
            verdicts = r.verdict.tolist()
        else:
            verdicts += r.verdict.tolist()
    return b, frames, gen, np.bincount(verdicts, minlength=16), ct.stats()


def test_the_reference_covers_every_case(reference):
    b, frames, gen, verdicts, st = reference
    assert st["frag_reasm_oks"] == 24 and st["frag_overlaps"] == 3, st
    assert st["frag_creates"] > 0 and st["frag_fails"] == 0, st
    kinds = [(Ether(g)[ICMP].type, Ether(g)[ICMP].code) for g in gen if Ether(g).haslayer(ICMP)]
    assert kinds.count((3, 4)) == 4 + 2, kinds     # 4 DF datagrams + 2 DF whole packets
    v6 = [f for f in frames if Ether(f).haslayer(IPv6)]
    assert len(v6) > 4 and verdicts[K.V_QUEUED] > 0, (len(v6), verdicts)
    # DF fragments of 1020 B (under the MTU) leave as they came, with no frag-needed
    small = [Ether(f)[IP] for f in frames if Ether(f).haslayer(IP)
             and Ether(f)[IP].id in range(0x4008, 0x400C)]
    assert small and max(len(x) for x in small) == 1020, [len(x) for x in small]
    assert all(len(Ether(f)) - 14 <= WAN_MTU for f in frames if Ether(f).haslayer(IP)
               and Ether(f)[IP].src == "192.168.0.1")


@pytest.mark.parametrize("n,own_process,ring", [(2, True, None), (3, False, None), (2, True, 0)])
def test_pool_sends_what_one_process_sends(reference, n, own_process, ring):
    b, frames, gen, verdicts, st = reference
    kw = {} if ring is None else {"ring_bytes": ring}
    pool = Pool(n, Config(), seed=SEED, log=lambda *a: None, max_round=64,
                dispatcher_process=own_process, **kw, **nat_kw())
    got, gens, seen = [], [], np.zeros(16, dtype=np.int64)

    def emit(pk, v, g, out):
        seen[:] += np.bincount(v, minlength=16)
        if out is None:
            got.extend(take(pk.batch, np.flatnonzero(forward_mask(v, False))).frames())
        else:
            got.extend(leaving(pk.batch, out[0], out[1], out[2], pk.seq)[0])
        gens.append(g)

    # several input batches: queues live across them, and across rounds of 64
    parts = [take(b, np.arange(s, min(s + 150, len(b)))) for s in range(0, len(b), 150)]
    totals = pool.run(parts, emit=emit, timeout_s=300, generated=True)
    assert totals["lost_packets"] == 0, totals
    seen[K.V_QUEUED] += totals["frag_held"]
    seen[K.V_DROP] += totals["frag_dropped"]
    assert seen.tolist() == verdicts.tolist(), f"verdicts {seen.tolist()}, want {verdicts.tolist()}"
    assert Packets.concat(gens).batch.frames() == gen, "the generated frames differ"
    diff = [i for i in range(min(len(got), len(frames))) if got[i] != frames[i]]
    assert len(got) == len(frames) and not diff, \
        f"{n} workers sent {len(got)} frames, want {len(frames)}; first difference at " \
        f"{diff[:1]}: {Ether(got[diff[0]]).summary() if diff else ''} / " \
        f"{Ether(frames[diff[0]]).summary() if diff else ''}"
    ps = pool.stats()
    names = [k for k in st if k.startswith("frag_")] + [
        "drop", "insert", "new", "icmp_frag_needed", "entries", "packets"]
    bad = {k: (ps.get(k), st.get(k)) for k in names if ps.get(k) != st.get(k)}
    assert not bad, f"counters (pool, one process): {bad}"


def test_passive_pool_reassembles_without_frames(reference):
    """frames=False (shardct live): datagrams still tracked whole, nothing cut."""
    b, frames, gen, verdicts, st = reference
    pool = Pool(2, Config(), seed=SEED, log=lambda *a: None, max_round=64, frames=False,
                **nat_kw())
    totals = pool.run([b], emit=lambda pk, v: None, timeout_s=300)
    ps = pool.stats()
    assert totals["frag_held"] == verdicts[K.V_QUEUED], totals
    assert ps["frag_reasm_oks"] == st["frag_reasm_oks"] and ps["new"] == st["new"], ps
    assert ps["frag_creates"] == 0


TOML = """\
[nat]
rules = "masq.rules"

[interfaces.lan0]
address = ["10.0.0.3/24", "fd00::3/64"]

[interfaces.wan0]
address = ["192.168.0.1/24", "2001:db8::1/64"]
mtu = 1300
"""


def test_cli_replay_writes_the_same_fragments_for_one_and_two_workers(tmp_path, reference):
    b = reference[0]
    got = PT.replay_one_and_two(tmp_path, b, TOML, SEED)
    lines = {k: v[0].split(": ", 1)[1] for k, v in got.items()}     # the verdicts
    outs = {k: v[1] for k, v in got.items()}
    assert all(f"replayed {len(b)} packets" in v[0] for v in got.values()), got
    assert lines["1"] == lines["2"], lines
    got = concat(list(read_capture(str(tmp_path / "out2.pcapng"), batch_size=4096)))
    assert any(Ether(f).haslayer(IP) and Ether(f)[IP].frag for f in got.frames())
    assert outs["1"] == outs["2"], \
        f"--workers 2 wrote {len(outs['2'])} B, want --workers 1's {len(outs['1'])} B"
