# `shardct replay`: run a capture (pcap/pcapng) or the built-in demo trace through the
# engine on the packets' own clock, write what leaves, print conntrack -S / -L output.
"""Replay.

The clock is the capture's timestamps, so a replay is deterministic for a given seed.
The reaper runs between batches on that clock (gVisor's adaptive interval).
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from collections import Counter

import numpy as np

from shardct import ConnTrack
from shardct import track as K
from shardct.config import Config
from shardct.frag import with_fragments
from shardct.netconf import egress
from shardct.show import format_conn, format_stats

from . import argtypes as A

DEFAULT_BATCH = 1024


def add_parser(sub):
    p = sub.add_parser("replay", help="replay a capture (or the built-in demo) through the engine")
    p.add_argument("capture", nargs="?", help="pcap or pcapng file (default: the built-in demo trace)")
    p.add_argument("-c", "--config", help="engine config (TOML); see configs/")
    p.add_argument("-w", "--write", help="write forwarded frames to this pcap/pcapng file")
    p.add_argument("-i", "--interface", default=None,
                   help="ingress interface name for plain pcap input (pcapng carries its own)")
    p.add_argument("--seed", type=A.seed, default=None,
                   help="hash seed, 0..2^32-1 (default: drawn at random and printed on stderr)")
    p.add_argument("--batch", type=A.positive_int, default=DEFAULT_BATCH)
    p.add_argument("--list", type=int, default=10, metavar="N",
                   help="print N conntrack -L lines at the end (0: none, -1: all)")
    p.add_argument("--events", action="store_true", help="print conntrack -E lines as they happen")
    p.add_argument("--router", action="store_true", help="decrement TTL (router hop)")
    p.add_argument("--workers", type=A.workers, default=1,
                   help="shard worker processes (N or 'auto' for every core); 1 runs the "
                        "engine in this process")
    p.add_argument("--dispatcher-inline", action="store_true",
                   help="pool: run the dispatcher in the supervisor's process, not its own")
    p.add_argument("--round", type=A.positive_int, default=65536,
                   help="pool: packets per round at most (bigger: fewer superstep exchanges "
                        "per packet, more latency)")
    A.add_snapshot_options(p)
    A.add_metrics_option(p)
    p.set_defaults(func=cmd_replay)


def _engine(args):
    rules = network = None
    cfg = Config()
    if args.config is None and args.capture is None:
        from .demo import DEMO_CONFIG
        args.config = str(DEMO_CONFIG)
        args.router = True
    if args.config:
        from .configfile import load
        ec = load(args.config)
        cfg, rules, network = ec.config, ec.rules, ec.network
    return cfg, rules, network


def _batches(args, names, size=None, stats=None):
    """The input's batches. The first is read before this returns, so a file that is not
    a capture raises CaptureError here, before any worker starts and before a cold
    kernel cache is announced and compiled (``ensure_warm``)."""
    from .firstrun import ensure_warm, frames_progress   # a bar on a terminal
    size = size or args.batch
    if args.capture is None:
        from .demo import demo_batches
        ensure_warm()
        return frames_progress(demo_batches(size, names))
    from .pcapio import read_capture
    it = read_capture(args.capture, batch_size=size, interface=args.interface, names=names,
                      stats=stats)
    first = next(it, None)
    ensure_warm()
    return frames_progress(it if first is None else itertools.chain([first], it))


def _warnings(args, stats) -> int:
    """Damage after a valid header: one line (tcpdump-like), exit status 1."""
    w = stats.get("warnings") or []
    if not w:
        return 0
    more = f" (and {len(w) - 1} more)" if len(w) > 1 else ""
    print(f"shardct replay: {args.capture}: warning: {w[0]}{more}; replayed what came before",
          file=sys.stderr)
    return 1


def cmd_replay(args) -> int:
    """Exit status: 0 done; 1 done, but the capture was damaged or packets were lost;
    2 unusable input (config, capture, output file); 3 the pool stopped."""
    from shardct.errors import ConfigError
    from .errors import PoolStopped
    try:
        return _cmd_replay(args)
    except ConfigError as e:        # CaptureError too: names the file
        print(f"shardct replay: {e}", file=sys.stderr)
        return 2
    except PoolStopped as e:
        print(f"shardct replay: {e}", file=sys.stderr)
        return 3
    except BrokenPipeError:         # the reader went away (| head): stop quietly, as
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # tcpdump does
        return 128 + signal.SIGPIPE
    except OSError as e:            # the -w file
        print(f"shardct replay: {e.filename or args.write}: {e.strerror or e}", file=sys.stderr)
        return 2


def _cmd_replay(args) -> int:
    cfg, rules, network = _engine(args)
    A.draw_seed(args, "shardct replay")
    workers = args.workers
    if workers != 1 or A.wants_snapshots(args):     # snapshots are the pool's
        return _replay_pool(args, cfg, rules, network, workers)
    ct = ConnTrack(cfg, seed=args.seed, rules=rules, network=network, router=args.router,
                   rng=np.random.default_rng(args.seed))
    names = ct.network.names if ct.network is not None else []
    writer = None
    verdicts = Counter()
    n_pkts = 0
    t0 = time.perf_counter()
    next_reap, reap_start = None, 0
    last_ts = 0
    stats = {}
    batches = _batches(args, names, stats=stats)
    try:
        for batch in batches:
            if not len(batch):
                continue
            r = ct.process(batch)
            n_pkts += len(batch)
            for v, c in zip(*np.unique(r.verdict, return_counts=True)):
                verdicts[K.VERDICT_NAMES[int(v)]] += int(c)
            if args.write:
                if writer is None:
                    writer = _open_writer(args.write, names)
                if r.fragments is None:
                    _write(writer, batch, r.forward, egress(ct.network, batch, r.meta),
                           np.arange(len(batch)), r.generated, r.generated_by)
                else:       # each fragment in the place of the frame it replaces
                    out, src = with_fragments(batch, r.forward, r.fragments, r.fragment_of)
                    _write(writer, out, np.ones(len(out), dtype=np.bool_),
                           egress(ct.network, out), src, r.generated, r.generated_by)
            last_ts = int(batch.ts[-1])
            if next_reap is None:
                next_reap = last_ts
            while last_ts >= next_reap:
                reap_start, interval = ct.reap(next_reap, reap_start)
                next_reap += interval
            if args.events:
                from shardct.show import format_event
                for e in ct.events():
                    print(format_event(e))
            else:
                ct.clear_events()       # a Python object per event costs more than tracking
    finally:
        if writer is not None:
            writer.close()
    # the capture is over: every conn expired by its last packet goes now, so entries and
    # expired do not depend on when the reaper last ran (the pool does the same)
    if last_ts:
        ct.reap_all(last_ts)
        if args.events:
            from shardct.show import format_event
            for e in ct.events():
                print(format_event(e))
    dt = time.perf_counter() - t0
    print(f"replayed {n_pkts} packets in {dt:.3f} s (wall clock, cold start included): "
          + ", ".join(f"{k}={v}" for k, v in sorted(verdicts.items())))
    _summary(args, ct.stats(), list(ct.conns(now=last_ts)), last_ts)
    return _warnings(args, stats)


def _summary(args, s, conns, last_ts):
    print(format_stats(s))
    print(f"entries={s['entries']} new={s['new']} destroy={s['destroy']} expired={s['expired']} "
          f"related={s['related']} untracked={s['untracked']} nat_rewrites={s['nat_rewrites']}")
    if args.list:
        shown = conns if args.list < 0 else conns[:args.list]
        for c in shown:
            print(format_conn(c, last_ts))
        if len(shown) < len(conns):
            print(f"... {len(conns) - len(shown)} more (--list -1 prints all)")
        print(f"shardct: {len(conns)} flow entries in the table, {len(shown)} shown.")


def _replay_pool(args, cfg, rules, network, workers) -> int:
    """The same replay through the worker pool (workers/pool.py)."""
    from shardct.conntrack import forward_mask
    from .pool import Pool
    if args.events:
        print("shardct replay: --events needs --workers 1 (the pool does not ship events)",
              file=sys.stderr)
        return 2
    names = network.names if network is not None else []
    stats = {}
    # the dispatcher cuts rounds inside a batch: read whole rounds at a time
    batches = _batches(args, names, max(args.batch, min(65536, 16 * args.round)), stats)
    pool = Pool(workers, cfg, seed=args.seed, rules=rules, network=network, router=args.router,
                max_round=args.round, dispatcher_process=not args.dispatcher_inline,
                frames=bool(args.write),       # only a capture being written needs them
                log=lambda m: print(m, file=sys.stderr), control="replay",
                metrics_port=args.metrics_port, **A.snapshot_kwargs(args))
    verdicts = Counter()
    state = {"writer": None, "last_ts": 0}

    def emit(pk, v, gen=None, out=None):
        for x, c in zip(*np.unique(v, return_counts=True)):
            verdicts[K.VERDICT_NAMES[int(x)]] += int(c)
        if len(pk):
            state["last_ts"] = max(state["last_ts"], int(pk.batch.ts.max()))
        if args.write:
            if state["writer"] is None:
                state["writer"] = _open_writer(args.write, names)
            b, key = pk.batch, pk.seq
            fw = forward_mask(v, cfg.drop_invalid) if out is None else out[0]
            if out is not None and out[1] is not None:   # fragments in place of frames
                b, src = with_fragments(b, fw, out[1], out[2])
                fw, key = np.ones(len(b), dtype=np.bool_), key[src]
            _write(state["writer"], b, fw, egress(network, b), key, gen.batch, gen.seq)

    t0 = time.perf_counter()
    try:
        totals = pool.run(batches, emit=emit, generated=bool(args.write))
    finally:
        if state["writer"] is not None:
            state["writer"].close()
    dt = time.perf_counter() - t0
    count_fragments(verdicts, totals)
    print(f"replayed {totals['packets_in'] + totals['frag_held'] + totals['frag_dropped']} "
          f"packets through {pool.n} workers in {dt:.3f} s "
          f"(wall clock, worker start included): "
          + ", ".join(f"{k}={v}" for k, v in sorted(verdicts.items())))
    c = pool.counts()
    print(f"pool: rounds={totals['rounds']} handoffs={c.get('handoffs_out', 0)} "
          f"steered={c.get('steered', 0)} "
          f"cross_shard_inserts={c.get('grants', 0)} joins={c.get('joins', 0)} "
          f"lost_packets={totals['lost_packets']} lost_conns={totals['lost_conns']} "
          f"restored_conns={totals['restored_conns']} "
          f"restarts={sum(pool.sup.restarts)}")
    _summary(args, pool.stats(), pool.conns(now=state["last_ts"]), state["last_ts"])
    return max(_warnings(args, stats), 0 if totals["lost_packets"] == 0 else 1)


def count_fragments(verdicts, totals):
    """A pool's reassembly keeps fragments from the workers: their verdicts (queued,
    drop) as one process gives them, added to ``verdicts``."""
    for name, what in (("queued", "frag_held"), ("drop", "frag_dropped")):
        if totals.get(what):
            verdicts[name] += totals[what]


def _write(writer, batch, keep, egress_if, key, gen, gen_key):
    """Write the frames of ``batch`` that ``keep`` selects (leaving by ``egress_if``) and
    the engine's generated frames ``gen`` (leaving by their ``ifindex``), each generated
    frame right after the place of the frame it answers: ``key`` orders the batch's
    frames (index or sequence number), ``gen_key`` names each generated frame's cause on
    the same scale. So the file is the same whatever the batch or round sizes, for one
    process and for a pool."""
    from shardct.batch import concat, take
    if gen is None or not len(gen):
        writer.write_batch(batch, mask=keep, ifindex=egress_if)
        return
    idx = np.flatnonzero(keep)
    both = concat([take(batch, idx), gen])
    order = np.argsort(np.concatenate((2 * key[idx], 2 * gen_key + 1)), kind="stable")
    writer.write_batch(take(both, order),
                       ifindex=np.concatenate((egress_if[idx], gen.ifindex))[order])


def _open_writer(path, names):
    from .pcapio import PcapngWriter, PcapWriter
    if path.endswith(".pcapng"):
        return PcapngWriter(path, names or ["eth0"])
    return PcapWriter(path)
