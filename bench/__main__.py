"""``python3 -m bench [--quick]``: the standard benchmark set, with peers, in one run.

Runs, in this order, and prints as it goes:

* **core** (bench/core.py): ns/packet through ``ConnTrack.process`` for established TCP
  (Zipf and uniform; 100k and 1M flows, 100k only with ``--quick``; with and without
  MASQUERADE), a table that fits in cache (1k flows), the kernel-time breakdown, new
  conns/s with and without NAT, bytes per conn at 64k/256k/1M, throughput against the
  number of concurrent flows, and the per-batch latency distribution;
* **dispatcher** rate (the pool's ``Dispatcher.rounds`` on the 2k realistic profile);
* **pool** (bench/pool.py): the pool replaying from memory with 1, 2 and 3 workers beside
  one process on the synthetic and realistic profiles (handoff ratio, verdicts compared),
  and ``shardct replay`` of a capture with ``--workers 1`` and ``2``;
* **peers**: a dict tracker over dpkt/scapy-parsed tuples on the core's frames
  (bench/peer.py), and the Linux kernel's nftables MASQUERADE on a namespace router
  (bench/kernel_nat.py; skips without root and says why); `shardct run` as the router
  beside the kernel on one topology: UDP zero-loss rate and echo RTT (bench/run_router.py);

then writes ``bench/results/`` (``--out``): ``results.json`` (every figure, the machine
description, the options), ``summary.md`` (each figure beside its target from issues 2,
12, 14 and 16, and the shardct/peer ratios) and four PNG plots.
``--quick`` runs every harness at small sizes (under 3 minutes on the 2-core VM); the full
set takes under 15.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:           # python3 -m bench from a checkout
    sys.path.insert(0, str(ROOT))

SECTIONS = ("core", "dispatcher", "pool", "peer", "kernel", "router")

QUICK = dict(core_flows=(100_000,), core_packets=500_000, reps=2,
             sweep=(1_000, 10_000, 100_000), latency_packets=200_000, dispatcher_packets=100_000,
             pool=["--quick", "--profiles", "synthetic,2k,2k-nat,replay", "--packets", "200000",
                   "--packets-2k", "100000", "--replay-packets", "30000", "--timeout", "120"],
             peer=dict(flows=10_000, packets=50_000, scapy_packets=1000),
             kernel=dict(packets=300_000, seconds=2.0, flows=256),
             router=dict(workers=(1, 2), rates=(10_000, 0), seconds=1.0, pings=100))
# tests/bench: every harness at toy sizes (checks that it runs; figures meaningless)
TINY = dict(core_flows=(2_000,), core_packets=20_000, reps=1, sweep=(1_000, 2_000),
            latency_packets=10_000, dispatcher_packets=5_000,
            pool=["--quick", "--profiles", "synthetic,2k,replay", "--workers", "1,2",
                  "--flows", "500", "--packets", "5000", "--packets-2k", "3000",
                  "--replay-packets", "2000", "--timeout", "120"],
            peer=dict(flows=500, packets=3000, scapy_packets=60),
            kernel=dict(packets=5_000, seconds=0.5, flows=16),
            router=dict(workers=(1,), rates=(5_000,), seconds=0.5, pings=20))
FULL = dict(core_flows=(100_000, 1_000_000), core_packets=2_000_000, reps=3,
            sweep=(1_000, 10_000, 100_000, 1_000_000), latency_packets=1_000_000,
            dispatcher_packets=300_000,
            pool=["--profiles", "synthetic,2k,2k-nat,20k,20k-nat,replay", "--packets",
                  "1000000", "--packets-2k", "300000", "--packets-20k", "600000",
                  "--replay-packets", "300000", "--timeout", "300"],
            peer=dict(flows=100_000, packets=300_000, scapy_packets=3000),
            kernel=dict(packets=3_000_000, seconds=6.0, flows=512),
            router=dict(workers=(1, 2), rates=(10_000, 30_000, 0), seconds=3.0, pings=500))

def machine() -> dict:
    import numba
    import numpy
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "numba": numba.__version__,
            "kernel": platform.release(), "load_avg_at_start": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def say(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------ sections

def run_core(S) -> dict:
    from bench import core
    core.REPS = S["reps"]
    res = {"by_flows": {}}
    for i, flows in enumerate(S["core_flows"]):
        say(f"== core: {flows:,} flows, {S['core_packets']:,} packets of 64 B")
        res["by_flows"][flows] = core.measure(flows, S["core_packets"], 1024, machine=i == 0,
                                              out=say)
        if flows != S["core_flows"][0]:
            ns, _, _ = core.run_nat(flows, S["core_packets"], 1024, popularity="uniform")
            res["by_flows"][flows]["established_uniform_masquerade_ns"] = ns
    first = S["core_flows"][0]
    ns, _, _ = core.run_nat(first, S["core_packets"], 1024, popularity="uniform")
    res["by_flows"][first]["established_uniform_masquerade_ns"] = ns
    res["bytes_per_conn"] = {n: core.bytes_per_conn(n) for n in (1 << 16, 1 << 18, 1 << 20)}
    say("  table bytes per conn: " + ", ".join(f"{n:,}: {b:.1f} B"
                                               for n, b in res["bytes_per_conn"].items()))
    sweep = {}
    for flows in S["sweep"]:
        got = res["by_flows"].get(flows)
        if got is not None:
            sweep[flows] = 1e3 / got["established_uniform_ns"]
            continue
        ns, pps, _ = core.run_established(flows, S["core_packets"], 1024, "uniform")
        sweep[flows] = pps / 1e6
    res["mpps_vs_flows_uniform"] = sweep
    say("  Mpps vs concurrent flows (uniform): " + ", ".join(f"{f:,}: {m:.2f}"
                                                          for f, m in sweep.items()))
    lat = core.batch_latency(first, S["latency_packets"], 1024)
    import numpy as np
    q = {p: float(np.percentile(lat, p) * 1e6) for p in (50, 90, 99, 99.9)}
    res["batch_latency_us"] = {"what": "wall time of one ConnTrack.process call on a batch of "
                                       "1024 established 64-byte frames (Zipf, "
                               f"{first:,} flows)", "percentiles": q,
                               "samples": [float(x * 1e6) for x in np.sort(lat)]}
    say("  per-batch latency (1024 frames) us: " + ", ".join(f"p{p}: {v:.0f}" for p, v in q.items()))
    return res


def run_dispatcher(S) -> dict:
    from bench import pool
    say(f"== dispatcher: 2k realistic profile, {S['dispatcher_packets']:,} frames")
    r = pool.dispatcher_rate(S["dispatcher_packets"], reps=S["reps"])
    say("  " + ", ".join(f"{n} shard{'s' if n > 1 else ''}: {v['ns']:.0f} ns/pkt "
                         f"({v['mpps']:.2f} Mpps)" for n, v in r.items()))
    return r


def run_pool(S) -> dict:
    from bench import pool
    args, chosen = pool.parse_args(S["pool"])
    say(f"== pool: {', '.join(chosen)}; workers {args.workers}")
    return pool.run(args, chosen)


def run_peer(S) -> dict:
    from bench import peer
    say("== peers: dict trackers")
    return peer.measure(**S["peer"], out=say)


def run_kernel(S) -> dict:
    from bench import kernel_nat
    say("== peer: Linux kernel NAT (nftables MASQUERADE) on a namespace router")
    return kernel_nat.measure(**S["kernel"], out=say)


def run_router(S) -> dict:
    from bench import run_router
    say("== router: shardct run beside the kernel (namespaces; UDP zero-loss rate, RTT)")
    return run_router.measure(**S["router"], out=say)


RUNNERS = {"core": run_core, "dispatcher": run_dispatcher, "pool": run_pool,
           "peer": run_peer, "kernel": run_kernel, "router": run_router}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under 3 minutes)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results directory")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"sections to run, some of {','.join(SECTIONS)}")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests only
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {','.join(bad)}")
    from workers.firstrun import ensure_warm
    ensure_warm()
    S = TINY if a.tiny else QUICK if a.quick else FULL
    t0 = time.perf_counter()
    res = {"machine": machine(), "quick": a.quick, "argv": sys.argv[1:] if argv is None else argv,
           "sections": {}, "seconds": {}, "errors": {}}
    say(f"python3 -m bench{' --quick' if a.quick else ''}: {res['machine']['cpu']}, "
        f"{res['machine']['cores']} cores, load {res['machine']['load_avg_at_start'][0]:.2f}")
    for name in only:
        t = time.perf_counter()
        try:
            res["sections"][name] = RUNNERS[name](S)
        except Exception as e:      # one harness failing does not lose the others' figures
            import traceback
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
        res["seconds"][name] = time.perf_counter() - t
    res["seconds"]["total"] = time.perf_counter() - t0
    from bench.report import write
    files = write(res, Path(a.out), plots=not a.no_plots)
    say(f"wrote {', '.join(str(f) for f in files)} in {res['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
