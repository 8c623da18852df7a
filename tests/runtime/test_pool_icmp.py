"""The engine's generated frames (router mode: ICMP time-exceeded) through the worker pool
(workers/pool.py): each worker generates the errors for the packets it drops, the sink
hands them to the emitter in the order of the packets they answer, and they are the
frames one process generates, byte for byte (IPv4 ids included). `shardct replay
--workers 2 -w` writes the capture `--workers 1` writes."""
from __future__ import annotations


import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, raw

from shardct import Config, ConnTrack, PacketBatch
from shardct.batch import concat, take
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.shard import Packets
from workers.pool import Pool

import pooltrace as PT

SEED = 0x5EED
HOSTS = 12          # TTL-1 senders; 3 probes each stay under the burst of 6 per host


def nat_kw():
    return dict(rules=parse_iptables_save(PT.MASQ, "masq.rules", 4),
                network=Network.from_dict(PT.NET), router=True)


def trace_with_expiring_probes(per_host=3):
    """The NAT trace with TTL-1 UDP probes (traceroute's first hop) mixed in, from
    HOSTS LAN hosts, ``per_host`` each, and a TTL-1 ping from the WAN side to a LAN
    host."""
    b = PT.trace(120, seed=5, nat=True)
    rng = np.random.default_rng(7)
    t0, t1 = int(b.ts.min()), int(b.ts.max())
    probes = [(PT.LAN, IP(src=f"10.0.9.{1 + h}", dst="192.168.0.5", ttl=1, id=100 + k)
               / UDP(sport=33434 + k, dport=33434 + h) / (b"p" * (20 + 97 * k)))
              for h in range(HOSTS) for k in range(per_host)]
    probes.append((PT.WAN, IP(src="192.168.0.7", dst="10.0.0.9", ttl=1) / ICMP(type=8, id=9)))
    ts = np.sort(rng.integers(t0, t1, len(probes)))
    p = PacketBatch.from_frames([raw(PT.E / x) for _, x in probes], ts=ts.tolist(),
                                   ifindex=[i for i, _ in probes])
    both = concat([b, p])
    order = np.argsort(both.ts, kind="stable")
    return take(both, order)


def one_process(b):
    ct = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw())
    r = ct.process(take(b, np.arange(len(b))))
    assert r.generated is not None
    return b, r.generated.frames(), r.generated.ifindex.tolist(), r.generated.ts.tolist(), \
        r.generated_by.tolist(), ct.stats()


@pytest.fixture(scope="module")
def reference():
    return one_process(trace_with_expiring_probes())


@pytest.mark.parametrize("n,own_process,ring", [(2, True, None), (3, False, None), (2, True, 0)])
def test_pool_hands_the_emitter_the_errors_one_process_generates(reference, n, own_process, ring):
    assert len(reference[1]) == HOSTS * 3 + 1, f"one process generated {len(reference[1])} errors"
    errors_as_one_process(reference, n, own_process, ring)


@pytest.mark.parametrize("n,own_process", [(2, True), (3, False)])
def test_pool_rate_limits_errors_as_one_process(n, own_process):
    """12 probes a host, over the burst of 6: one engine's icmp_ratelimit holds them
    back per host. A host's probes reach every worker (their tuples differ), so the
    pool's limit must be one engine's, not one per worker: the same errors go out and
    the same are counted rate-limited."""
    ref = one_process(trace_with_expiring_probes(per_host=12))
    limited = ref[5].get("icmp_time_exceeded_ratelimited", 0)
    assert limited >= HOSTS, f"one process rate-limited {limited} errors: the test needs some"
    errors_as_one_process(ref, n, own_process, None)


def errors_as_one_process(reference, n, own_process, ring):
    """The pool's emitter gets the errors ``one_process`` generated for the same trace,
    byte for byte, with their causes, interfaces and times, and the same counters."""
    b, frames, ifx, ts, by, stats = reference
    kw = {} if ring is None else {"ring_bytes": ring}
    pool = Pool(n, Config(), seed=SEED, log=lambda *a: None, max_round=64,
                dispatcher_process=own_process, **kw, **nat_kw())
    rounds, gens = [], []

    def emit(pk, v, gen, out=None):
        rounds.append(pk.seq.copy())
        gens.append(gen)
        if len(gen):     # an error comes with the round of the packet it answers
            assert np.isin(gen.seq, pk.seq).all(), (gen.seq, pk.seq)

    totals = pool.run([take(b, np.arange(len(b)))], emit=emit, timeout_s=300, generated=True)
    g = Packets.concat(gens)
    assert totals["lost_packets"] == 0 and totals["generated"] == len(frames), totals
    assert len(rounds) > 4, "the trace went through several rounds"
    assert g.seq.tolist() == by, f"causes got {g.seq.tolist()}, want {by}"
    assert g.batch.ifindex.tolist() == ifx and g.batch.ts.tolist() == ts
    got = g.batch.frames()
    diff = [i for i in range(len(frames)) if got[i] != frames[i]]
    assert not diff, f"{n} workers: errors differ at {diff[:5]}: got " \
        f"{Ether(got[diff[0]]).summary() if diff else ''} id " \
        f"{Ether(got[diff[0]])[IP].id if diff else ''}, want id {Ether(frames[diff[0]])[IP].id if diff else ''}"
    st = pool.stats()
    for name in ("icmp_time_exceeded", "icmp_time_exceeded_ratelimited", "ttl_expired"):
        if name in stats:
            assert st[name] == stats[name], f"{name}: got {st[name]}, want {stats[name]}"


def test_pool_without_generated_emits_two_arguments(reference):
    """An emitter that did not ask for generated frames keeps the two-argument form."""
    b = reference[0]
    pool = Pool(2, Config(), seed=SEED, log=lambda *a: None, max_round=256, **nat_kw())
    seen = []
    totals = pool.run([take(b, np.arange(len(b)))], emit=lambda pk, v: seen.append(len(pk)))
    assert sum(seen) == len(b) and totals["generated"] == 0, totals


TOML = """\
[nat]
rules = "masq.rules"

[interfaces.lan0]
address = ["10.0.0.3/24"]

[interfaces.wan0]
address = ["192.168.0.1/24"]
"""


def test_cli_replay_writes_the_errors_alike_for_one_and_two_workers(tmp_path, reference):
    """replay --router -w: every error follows the frame it answers in the file, so
    --workers 1 (batches of 100) and --workers 2 (rounds of 64) write the same bytes."""
    b = reference[0]
    outs = {k: v[1] for k, v in PT.replay_one_and_two(tmp_path, b, TOML, SEED).items()}
    from workers.pcapio import read_capture
    got = concat(list(read_capture(str(tmp_path / "out2.pcapng"), batch_size=4096)))
    te = [f for f in got.frames() if Ether(f).haslayer(ICMP) and Ether(f)[ICMP].type == 11]
    assert len(te) == HOSTS * 3 + 1, f"got {len(te)} time-exceeded in the file"
    assert outs["1"] == outs["2"], \
        f"--workers 2 wrote {len(outs['2'])} B, want --workers 1's {len(outs['1'])} B, byte for byte"


def trace_for_the_router_itself():
    """The NAT trace with packets the router answers for itself or drops over the MTU:
    UDP to its LAN address (port unreachable), pings and timestamp requests to it
    (echo and timestamp replies), TCP SYNs to
    its WAN address (RST, which kills the SYN's conn), and DF UDP over wan0's MTU (frag-needed; the conn
    its only packet created is withdrawn). Distinct hosts and ports, so that the conns
    spread over every shard and many have their reply tuple in another."""
    b = PT.trace(120, seed=6, nat=True)
    rng = np.random.default_rng(8)
    t0, t1 = int(b.ts.min()), int(b.ts.max())
    extra = []
    for h in range(HOSTS):
        extra.append((PT.LAN, IP(src=f"10.0.8.{1 + h}", dst="10.0.0.3")
                      / UDP(sport=40000 + h, dport=53) / b"q"))
        extra.append((PT.WAN, IP(src=f"192.168.0.{20 + h}", dst=PT.R_WAN)
                      / TCP(sport=50000 + h, dport=22, flags="S", seq=1000 * h)))
        extra.append((PT.LAN, IP(src=f"10.0.7.{1 + h}", dst="192.168.0.5", flags="DF")
                      / UDP(sport=30000 + h, dport=9) / (b"x" * 1600)))
        extra.append((PT.LAN, IP(src=f"10.0.6.{1 + h}", dst="10.0.0.3")
                      / ICMP(type=8, id=700 + h, seq=1) / b"ping"))
        extra.append((PT.LAN, IP(src=f"10.0.5.{1 + h}", dst="10.0.0.3")
                      / ICMP(type=13, id=800 + h, seq=1, ts_ori=1000 + h)))
    # the SYNs come in the trace's last second: no timeout ends their conns
    ts = [int(rng.integers(t1 - PT.S, t1)) if x.haslayer(TCP) else int(rng.integers(t0, t1))
          for _, x in extra]
    p = PacketBatch.from_frames([raw(PT.E / x) for _, x in extra], ts=ts,
                                ifindex=[i for i, _ in extra])
    both = concat([b, p])
    return take(both, np.argsort(both.ts, kind="stable"))


@pytest.mark.parametrize("n", [2, 3])
def test_pool_answers_for_the_router_itself_as_one_process(n):
    """Port unreachable, RSTs and frag-needed from a pool are one process's, byte for
    byte, and so are the conns they touch: the RST kills its SYN's conn at its home, the
    oversize packets' conns were withdrawn (not in the table, not counted inserted)."""
    b = trace_for_the_router_itself()
    ct = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw())
    r = ct.process(take(b, np.arange(len(b))))
    want = r.generated.frames()
    kinds = {}
    for f in want:
        e = Ether(f)
        k = "rst" if e.haslayer(TCP) else f"icmp{e[ICMP].type}/{e[ICMP].code}"
        kinds[k] = kinds.get(k, 0) + 1
    assert kinds == {"icmp3/3": HOSTS, "rst": HOSTS, "icmp3/4": HOSTS, "icmp0/0": HOSTS,
                     "icmp14/0": HOSTS}, kinds
    pool = Pool(n, Config(), seed=SEED, log=lambda *a: None, max_round=64, **nat_kw())
    gens = []
    totals = pool.run([take(b, np.arange(len(b)))], emit=lambda pk, v, gen, out=None: gens.append(gen),
                      timeout_s=300, generated=True)
    got = Packets.concat(gens)
    assert totals["generated"] == len(want), totals
    assert got.seq.tolist() == r.generated_by.tolist()
    assert got.batch.frames() == want, f"{n} workers: the errors differ from one process's"
    st, one = pool.stats(), ct.stats()
    for name in ("insert", "new", "icmp_port_unreachable", "tcp_reset", "icmp_frag_needed",
                 "icmp_echo_reply", "icmp_timestamp_reply", "entries", "packets"):
        assert st.get(name) == one.get(name), f"{name}: got {st.get(name)}, want {one.get(name)}"

    def table(conns):
        return sorted((c.original.src, c.original.sport, c.original.dport, c.state,
                       "SEEN_REPLY" in c.status)
                      for c in conns if c.original.dport in (22, 53, 9) or c.original.proto == 1)
    assert table(pool.conns()) == table(ct.conns()), "the conns the errors touch differ"
    # a RST as the only reply kills the conn at once (Linux's tcp_packet), expiry or not
    assert st["destroy"] == one["destroy"] == HOSTS and one.get("expired", 0) == 0, \
        (st["destroy"], one["destroy"])
    assert not [c for c in pool.conns() if c.original.dport == 22]
