"""Pool benchmark: the whole pipeline replaying from memory, dispatcher + N worker
processes over ZeroMQ ipc, side by side with the single-process core on the same frames.

Traffic: 64-byte TCP/IPv4 frames over established flows, Zipf popularity, both
directions (a share ``--reply-share`` of the packets are the server's ACKs, which are
handed off when the conn's home is another worker). First every flow's handshake goes
through in three waves (all SYNs: new conns/s and cross-shard inserts/s; then the
SYN/ACKs; then the ACKs), then the data phase is timed.

Prints per configuration: Mpps end to end (first dispatch to last result at the sink),
handoff ratio, cross-shard inserts/s, and where the time goes: the main process's CPU
(dispatcher and sink, or the sink alone when the dispatcher has its own process), each
worker's compute vs waiting for its peers' superstep messages. The largest worker count
also runs with the dispatcher in its own process.

    python3 bench/pool.py [--flows 20000] [--packets 3000000] [--round 65536]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from shardct import Config, ConnTrack
from shardct.batch import concat, take
from shardct.traffic import (F_ACK, F_DPORT, F_FLAGS, F_FRAMELEN, F_SEQ, F_SPORT, F_WIN,
                             build_frames, handshake_frames, tcp_frames)
from workers.pool import Pool

SEED = 0x5EED


def both_directions(flows, packets, reply_share, seed=1):
    """Established ACKs: original direction from tcp_frames, and the reply direction
    of the same flows (addresses, ports, sequence numbers swapped)."""
    hs = handshake_frames(flows, seed=seed)
    fwd, flow = tcp_frames(flows, packets, seed=seed, frame_len=64, iss=hs.iss, irs=hs.irs)
    from shardct import wire
    meta, addr = wire.new_meta(len(fwd))
    wire.parse_batch(fwd.buf, fwd.off, fwd.length, meta, addr, False)
    rng = np.random.default_rng(seed + 7)
    rev = rng.random(packets) < reply_share
    from shardct.traffic import N_F, _defaults
    f = np.zeros((packets, N_F), dtype=np.int64)
    _defaults(f, 4, 6)
    ports = meta[:, wire.M_PORTS]
    f[:, F_SPORT] = np.where(rev, ports & 0xFFFF, ports >> 16)
    f[:, F_DPORT] = np.where(rev, ports >> 16, ports & 0xFFFF)
    f[:, F_FLAGS] = 0x10
    f[:, F_SEQ] = np.where(rev, (hs.irs[flow] + 1) % 2**32, (hs.iss[flow] + 1) % 2**32)
    f[:, F_ACK] = np.where(rev, (hs.iss[flow] + 1) % 2**32, (hs.irs[flow] + 1) % 2**32)
    f[:, F_WIN] = 512
    f[:, F_FRAMELEN] = 64
    a = np.where(rev[:, None], addr[:, [2, 3, 0, 1]], addr)
    data = build_frames(f, a, np.full(packets, 10**9, np.int64))
    hs.ts[:] = 0
    return hs, data


def chunks(b, size):
    for s in range(0, len(b), size):
        yield take(b, np.arange(s, min(len(b), s + size)))


def single(hs, data, batch):
    ct = ConnTrack(Config(max_conns=len(hs), events=False), seed=SEED)
    for b in chunks(hs, 4096):
        ct.process(b)
    parts = list(chunks(data, batch))
    t = time.perf_counter()
    for b in parts:
        ct.process(b)
    dt = time.perf_counter() - t
    return len(data) / dt


def pool_run(n, hs, data, args, causal, own=False):
    if causal:
        data = take(data, np.arange(min(len(data), args.causal_packets)))
    cfg = Config(max_conns=len(hs), events=False)
    pool = Pool(n, cfg, seed=SEED, max_round=args.round, causal=causal, window=args.window,
                log=lambda *a: None, dispatcher_process=own)
    pool.start()
    try:
        pool.wait_ready()
        # the handshakes as three waves (every SYN, then every SYN/ACK, then every ACK):
        # each wave completes before the next, so any round size keeps them in order
        waves = [take(hs, np.arange(w, len(hs), 3)) for w in range(3)]
        t = time.perf_counter()
        pool.feed(chunks(waves[0], 65536), final=True)
        t_syn = time.perf_counter() - t
        grants = pool.counts().get("grants", 0)
        for w in waves[1:]:
            pool.feed(chunks(w, 65536), final=True)
        rounds0 = pool.totals["rounds"]
        before = dict(pool.counts())
        parts = list(chunks(data, 65536))
        pool.totals["packets_out"] = 0
        cpu0 = time.process_time()
        t = time.perf_counter()
        pool.feed(parts, final=True)
        dt = time.perf_counter() - t
        cpu = time.process_time() - cpu0
        after = pool.counts()
        out = pool.totals["packets_out"]
        assert out == len(data), pool.totals
        st = pool.stats()
    finally:
        pool.stop()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"mpps": out / dt / 1e6, "handoff": d["handoffs_out"] / out,
            "xinserts_per_s": grants / t_syn, "hs_conns": len(hs) // 3,
            "conns_per_s": len(waves[0]) / t_syn,
            "dispatcher_cpu": cpu / dt, "worker_busy": d["busy_us"] / 1e6 / n / dt,
            "worker_wait": d["step_wait_us"] / 1e6 / n / dt,
            "rounds": pool.totals["rounds"] - rounds0,
            "invalid": st.get("invalid", 0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=20000)
    ap.add_argument("--packets", type=int, default=3_000_000)
    ap.add_argument("--round", type=int, default=65536,
                    help="packets per round at most (bigger rounds: fewer superstep waits, "
                         "more latency; 65536 is the largest a batch message carries)")
    ap.add_argument("--window", type=int, default=8, help="rounds in flight")
    ap.add_argument("--reply-share", type=float, default=0.5)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--causal-packets", type=int, default=20000,
                    help="data frames for the causal-round runs (they cut rounds at every "
                         "direction change of a cross-shard flow, so they are slow)")
    args = ap.parse_args()
    hs, data = both_directions(args.flows, args.packets, args.reply_share)
    print(f"{args.flows} flows, {args.packets} frames of 64 bytes, Zipf 1.1, "
          f"{args.reply_share:.0%} reply direction, rounds <= {args.round}")
    base = single(hs, data, 1024)
    print(f"  single process ConnTrack.process, batch 1024: {base / 1e6:6.2f} Mpps")
    runs = [(False, n, False) for n in [int(x) for x in args.workers.split(",")]]
    runs += [(False, max(int(x) for x in args.workers.split(",")), True)]
    runs += [(True, n, False) for n in [int(x) for x in args.workers.split(",")]]
    for causal, n, own in runs:
        mode = "causal rounds (replay order kept)" if causal else "rounds by size"
        if own:
            mode += ", dispatcher in its own process"
        r = pool_run(n, hs, data, args, causal, own)
        print(f"  pool {n} worker(s), {mode}: {r['mpps'] * 1000:8,.0f} kpps end to end "
              f"({r['rounds']} rounds), handoff {r['handoff']:.1%}, "
              f"SYN wave {r['conns_per_s']:,.0f} new conns/s of which cross-shard inserts "
              f"{r['xinserts_per_s']:,.0f}/s; main process CPU {r['dispatcher_cpu']:.0%}, "
              f"worker busy {r['worker_busy']:.0%} / waiting on peers "
              f"{r['worker_wait']:.0%}; invalid {r['invalid']}")


if __name__ == "__main__":
    main()
