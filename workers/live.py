# `shardct live`: the engine on live interfaces through AF_PACKET rings, as a passive
# monitor (nothing is sent), with the worker pool; prints conntrack -S / -L at the end.
"""Live monitoring.

``shardct live -i eth0 [-i eth1] [--workers N] [--duration S] [-c CONFIG]`` tracks every
frame the interfaces receive (kernel timestamps are the clock) until SIGINT/SIGTERM or
the duration, then prints the counters and the table. Several interfaces are merged in
timestamp order (afpacket.RingMerge); the frames the kernel dropped because a ring was
full are read from each ring and printed per interface (``ring drops: eth0=0``), on
stderr as they happen and in the summary line. Inline forwarding (routing, next hop MACs)
is not part of it yet.
"""
from __future__ import annotations

import signal
import sys
import time
from collections import Counter

import numpy as np

from shardct import track as K

from . import argtypes as A


def add_parser(sub):
    p = sub.add_parser("live", help="track live interfaces (AF_PACKET rings), passive")
    p.add_argument("-i", "--interface", action="append", required=True,
                   help="interface to read (repeat for several)")
    p.add_argument("-c", "--config", help="engine config (TOML); see configs/")
    p.add_argument("--workers", type=A.workers, default=1,
                   help="shard worker processes (1..256 or 'auto')")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds of reading, counted from when the "
                        "workers are ready (0: at SIGINT/SIGTERM)")
    p.add_argument("--seed", type=A.seed, default=None,
                   help="hash seed, 0..2^32-1 (default: drawn at random and printed on stderr)")
    p.add_argument("--list", type=int, default=10, metavar="N",
                   help="print N conntrack -L lines at the end (0: none, -1: all)")
    A.add_snapshot_options(p)
    A.add_metrics_option(p)
    p.set_defaults(func=cmd_live)


def cmd_live(args) -> int:
    """Exit status as replay's: 2 unusable config or interface, 3 the pool stopped."""
    from shardct.errors import ConfigError
    from .errors import PoolStopped
    try:
        return _cmd_live(args)
    except ConfigError as e:        # SnapshotError too (--restore): names the file
        print(f"shardct live: {e}", file=sys.stderr)
        return 2
    except PoolStopped as e:
        print(f"shardct live: {e}", file=sys.stderr)
        return 3


def _cmd_live(args) -> int:
    from shardct.config import Config
    from shardct.errors import ConfigError
    from .afpacket import RingMerge, RxRing, ring_batches
    from .pool import Pool
    from .replay import _summary
    rules = network = None
    cfg = Config()
    if args.config:
        from .configfile import load
        try:
            ec = load(args.config)
        except ConfigError as e:
            print(f"shardct live: {e}", file=sys.stderr)
            return 2
        cfg, rules, network = ec.config, ec.rules, ec.network
    workers = args.workers
    A.draw_seed(args, "shardct live")
    names = network.names if network is not None else list(args.interface)
    try:
        rings = [RxRing(name, names.index(name) if name in names else -1)
                 for name in args.interface]
    except OSError as e:
        print(f"shardct live: {args.interface}: {e}", file=sys.stderr)
        return 2
    pool = Pool(workers, cfg, seed=args.seed, rules=rules, network=network, frames=False,
                log=lambda m: print(m, file=sys.stderr),     # passive: frames never leave
                control="live", metrics_port=args.metrics_port,
                **A.snapshot_kwargs(args))
    pool.rings = rings                  # their drops on the metrics endpoint
    state = {"stop": False, "last_ts": 0}
    verdicts = Counter()
    old = {s: signal.signal(s, lambda *_: state.update(stop=True))
           for s in (signal.SIGINT, signal.SIGTERM)}
    end = None

    def stop():
        return state["stop"] or (end is not None and time.monotonic() >= end)

    def emit(pk, v):
        for x, c in zip(*np.unique(v, return_counts=True)):
            verdicts[K.VERDICT_NAMES[int(x)]] += int(c)
        if len(pk):
            state["last_ts"] = max(state["last_ts"], int(pk.batch.ts.max()))

    def log(m):
        print(f"shardct live: {m}", file=sys.stderr, flush=True)

    def per_ring(values):
        return " ".join(f"{r.ifname}={v}" for r, v in zip(rings, values))

    merge = RingMerge(rings)
    pool.start()
    try:
        pool.wait_ready(600.0)      # a cold numba cache compiles for minutes
        log(f"workers ready, reading {' '.join(args.interface)}")
        if args.duration > 0:           # the duration counts from here
            end = time.monotonic() + args.duration
        totals = pool.feed(ring_batches(rings, stop, merge=merge, log=log), emit=emit,
                           timeout_s=(args.duration + 120) if end else 10**9, final=True)
    finally:
        pool.stop()
        for s, h in old.items():
            signal.signal(s, h)
        for r in rings:
            r.close()                   # reads the kernel's counters a last time
        log(f"ring drops: {per_ring(r.drops for r in rings)} (the kernel's packets: "
            f"{per_ring(r.packets for r in rings)}; read: {per_ring(merge.read)})")
    late = f", late frames: {merge.late}" if merge.late else ""
    from .replay import count_fragments
    count_fragments(verdicts, totals)
    print(f"tracked {totals['packets_in'] + totals['frag_held'] + totals['frag_dropped']} packets on {','.join(args.interface)} with "
          f"{pool.n} workers: " + ", ".join(f"{k}={v}" for k, v in sorted(verdicts.items()))
          + f"; ring drops: {per_ring(r.drops for r in rings)}"
          + f"; lost_packets={totals['lost_packets']} lost_conns={totals['lost_conns']} "
          f"restored_conns={totals['restored_conns']} restarts={sum(pool.sup.restarts)}{late}")
    _summary(args, pool.stats(), pool.conns(now=state["last_ts"]), state["last_ts"])
    return 0
