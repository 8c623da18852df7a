"""Soak: mixed traffic with churn through the worker pool for minutes (issue 15).

Realistic two-way traffic (shardct.profiles: TCP, UDP and ICMP flows with whole
lifecycles) plus a stream of new UDP flows, half of them answered, from addresses never
used before, so conns keep being created, expire (30 s unreplied, 120 s replied) and
are early-dropped at ``max_conns``. The packet clock advances ``--clock-per-chunk``
seconds per chunk of traffic, much faster than the wall clock, so timeouts and the
reaper run many times over. Every ``--every`` seconds it samples the RSS of every pool
process (/proc), each worker's table size and the key counters, prints a table and
writes a JSON. It asserts nothing; at the end it says whether RSS and entries stayed
bounded (the last third of the samples against the first third after warm-up).

    python3 bench/soak.py [--minutes 10] [--every 10] [--workers 2] [--json soak.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from shardct import Config
from shardct.batch import concat, take
from shardct.profiles import realistic
from shardct.traffic import udp_frames

S = 1_000_000_000
KEYS = ("packets", "new", "destroy", "expired", "early_drop", "drop", "invalid")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Traffic:
    """Chunks of traffic, each ``clock_s`` seconds of packet time: a realistic trace
    (one of ``n_traces`` made once, its times squeezed into the chunk) and ``udp_per_s``
    new UDP flows per second of packet time."""

    def __init__(self, packets_per_chunk=4000, udp_per_s=1000, clock_s=1.0, n_traces=6, seed=0):
        self.traces = [realistic(packets_per_chunk, max(50, packets_per_chunk // 15),
                                 seed=seed + j).batch for j in range(n_traces)]
        self.udp = int(udp_per_s * clock_s)
        self.chunk_ns = int(clock_s * S)
        self.k = 0
        self.clock = 10 * S

    def next(self):
        b = self.traces[self.k % len(self.traces)]
        t0, span = int(b.ts.min()), max(1, int(b.ts.max() - b.ts.min()))
        rb = take(b, np.arange(len(b)))
        rb.ts[:] = self.clock + (b.ts - t0) * (self.chunk_ns - 1000) // span
        parts = [rb]
        for replied in (False, True):
            n = self.udp // 2
            base = (10 << 24 | 64 << 16) + (self.k * self.udp + replied * n) % (1 << 22)
            u = udp_frames(n, base_src=".".join(str(base >> s & 255) for s in (24, 16, 8, 0)),
                           base_dst="192.168.0.53", replies=replied,
                           gap_ns=max(1, self.chunk_ns // max(1, 2 * n)), start_ns=self.clock)
            u.ifindex[:] = 0
            if replied:
                u.ifindex[1::2] = 1
            parts.append(u)
        c = concat(parts)
        self.k += 1
        self.clock += self.chunk_ns
        return take(c, np.argsort(c.ts, kind="stable"))


def run(seconds: float, every: float, workers: int = 2, max_conns: int = 65536,
        udp_per_s: int = 1000, packets_per_chunk: int = 4000, clock_s: float = 1.0,
        log=print, seed: int = 0x50A6) -> dict:
    """Soak for ``seconds`` of wall time; returns {"config", "samples", "summary"}."""
    from workers.pool import Pool
    traffic = Traffic(packets_per_chunk, udp_per_s, clock_s, seed=seed)
    pool = Pool(workers, Config(max_conns=max_conns), seed=seed, frames=False,
                log=lambda m: log(m))
    samples = []
    state = {"t0": 0.0, "next": 0.0, "end": 0.0}

    def sample():
        t = time.monotonic() - state["t0"]
        procs = [("pool", os.getpid())] + [
            (("dispatcher" if k == pool.n else f"worker{k}"), p.pid)
            for k, p in enumerate(pool.sup.procs) if p is not None]
        st = pool.stats()
        row = {"t_s": round(t, 1), "clock_s": round((traffic.clock - 10 * S) / S, 1),
               "packets_in": pool.totals["packets_in"],
               "rss_mb": {name: round(rss_mb(pid), 1) for name, pid in procs},
               "entries": list(pool.entries), **{k: int(st.get(k, 0)) for k in KEYS}}
        row["rss_total_mb"] = round(sum(row["rss_mb"].values()), 1)
        samples.append(row)
        if len(samples) == 1:
            log(f"{'t_s':>6} {'clock_s':>8} {'packets':>10} {'rss_mb':>8} "
                f"{'entries':>16} {'new':>9} {'expired':>9} {'early_drop':>10}")
        log(f"{row['t_s']:>6} {row['clock_s']:>8} {row['packets_in']:>10} "
            f"{row['rss_total_mb']:>8} {str(row['entries']):>16} {row['new']:>9} "
            f"{row['expired']:>9} {row['early_drop']:>10}")

    def batches():
        while True:
            now = time.monotonic()
            if now >= state["next"]:
                sample()
                state["next"] = now + every
            if now >= state["end"]:
                return
            yield traffic.next()

    pool.start()
    try:
        pool.wait_ready(600)
        state["t0"] = time.monotonic()
        state["next"], state["end"] = state["t0"], state["t0"] + seconds
        totals = pool.feed(batches(), timeout_s=seconds + 300, final=True)
        sample()                    # the final round brought every worker's counters
    finally:
        pool.stop()
    return {"config": dict(seconds=seconds, every=every, workers=workers, max_conns=max_conns,
                           udp_per_s=udp_per_s, packets_per_chunk=packets_per_chunk,
                           clock_s=clock_s),
            "totals": totals, "samples": samples, "summary": summary(samples, max_conns)}


def summary(samples, max_conns: int) -> dict:
    """Growth from the first third (after a warm-up of the first sixth) to the last."""
    body = samples[max(1, len(samples) // 6):-1] or samples
    third = max(1, len(body) // 3)
    first, last = body[:third], body[-third:]

    def mean(rows, f):
        return sum(f(r) for r in rows) / len(rows)
    rss = mean(last, lambda r: r["rss_total_mb"]) / max(1e-9, mean(first, lambda r: r["rss_total_mb"]))
    ent = (mean(last, lambda r: sum(r["entries"])) + 1) / (mean(first, lambda r: sum(r["entries"])) + 1)
    peak = max(max(r["entries"]) for r in samples)
    return {"rss_growth": round(rss, 3), "entries_growth": round(ent, 3),
            "max_worker_entries": peak, "entries_within_max_conns": peak <= max_conns,
            "rss_bounded": rss < 1.25, "entries_bounded": ent < 1.25 and peak <= max_conns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-conns", type=int, default=65536)
    ap.add_argument("--udp-per-s", type=int, default=1000,
                    help="new UDP flows per second of packet time")
    ap.add_argument("--packets-per-chunk", type=int, default=4000)
    ap.add_argument("--clock-per-chunk", type=float, default=1.0,
                    help="seconds of packet time per chunk")
    ap.add_argument("--json", default="soak.json")
    a = ap.parse_args(argv)
    r = run(a.minutes * 60, a.every, a.workers, a.max_conns, a.udp_per_s, a.packets_per_chunk,
            a.clock_per_chunk)
    s = r["summary"]
    print(f"soak: {r['totals']['packets_in']} packets in {a.minutes} min; RSS last/first "
          f"third {s['rss_growth']} ({'bounded' if s['rss_bounded'] else 'GROWING'}), entries "
          f"{s['entries_growth']} ({'bounded' if s['entries_bounded'] else 'GROWING'}), "
          f"peak worker entries {s['max_worker_entries']} of max_conns {a.max_conns}")
    with open(a.json, "w") as f:
        json.dump(r, f, indent=1)
    print(f"soak: wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
