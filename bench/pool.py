"""Pool benchmark: the whole pipeline replaying from memory (dispatcher + N worker
processes over ZeroMQ ipc) beside the single-process core on the same frames, and
`shardct replay` of a capture with 1 and 2 workers.

Profiles, all in one run (``--profiles`` picks some):

* ``2k``, ``20k`` (and ``2k-nat``, ``20k-nat`` through configs/demo.toml's MASQUERADE):
  realistic two-way router traffic from shardct/profiles.py, about 2,000 / 20,000 flows
  open at a time (TCP handshake, request, 1-7 response segments, ACKs, keep-alives,
  FIN from either side or RST; DNS-like UDP; ping series). Per run: single process
  (ConnTrack.process in batches of ``--batch``), then the pool with each of
  ``--workers`` (dispatcher in its own process unless ``--dispatcher-inline``): Mpps
  end to end (first batch in to last result out; worker start and the final table
  round excluded), ratio to the single process, handoff ratio, INVALID verdicts,
  whether the pool's verdicts equal the single process's frame by frame, and the CPU
  each of the pool's processes spent per packet meanwhile (all threads, /proc) beside
  one process's ns per packet.
* ``synthetic``: 64-byte ACKs over established flows, Zipf popularity, a share
  ``--reply-share`` in the reply direction, after every flow's handshake went through
  in three waves (SYNs, SYN/ACKs, ACKs; the SYN wave gives new conns/s and cross-shard
  inserts/s).
* ``replay``: a realistic capture (``--replay-packets`` frames, the 2k profile) written
  to a temporary pcap, then ``shardct replay FILE --workers 1`` and ``--workers 2`` as
  commands: wall time side by side (``--replay-nat`` also runs a pcapng with lan0/wan0
  through ``-c configs/demo.toml``).

    python3 bench/pool.py [--quick] [--profiles 2k,20k-nat,replay] [--workers 1,2,3]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from shardct import Config, ConnTrack
from shardct import profiles as P
from shardct import track as K
from shardct.batch import take
from shardct.traffic import (F_ACK, F_DPORT, F_FLAGS, F_FRAMELEN, F_SEQ, F_SPORT, F_WIN, N_F,
                             _defaults, build_frames, handshake_frames, tcp_frames)
from workers.pool import DEFAULT_RING, Pool

SEED = 0x5EED
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run as python3 bench/pool.py
    sys.path.insert(0, str(ROOT))
from bench.model import proc_cpu      # noqa: E402  (needs ROOT on the path)
DEMO = ROOT / "configs" / "demo.toml"
ALL = ("synthetic", "2k", "2k-nat", "20k", "20k-nat", "replay")
QUICK = dict(flows=2000, packets=50_000, packets_2k=10_000, packets_20k=30_000,
             replay_packets=10_000)
FULL = dict(flows=20_000, packets=3_000_000, packets_2k=1_000_000, packets_20k=2_000_000,
            replay_packets=300_000)


def chunks(b, size):
    """Compact copies of consecutive frames (a pool batch carries only its own bytes)."""
    for s in range(0, len(b), size):
        yield take(b, np.arange(s, min(len(b), s + size)))


def quiet(*_):
    pass


# ------------------------------------------------------------------ realistic profiles

def demo_nat():
    from workers.configfile import load
    ec = load(DEMO)
    return ec.rules, ec.network


def make_trace(name, n_packets, nat):
    """(trace, engine kwargs, config) of a realistic profile, MASQUERADEd when nat."""
    tr = P.profile(name, n_packets, seed=1)
    cfg = Config(max_conns=max(65536, 2 * len(tr.proto)), events=False)
    kw = {}
    if nat:
        rules, network = demo_nat()
        kw = dict(rules=rules, network=network)
        tr = P.through_nat(tr, cfg, seed=SEED, **kw)
    return tr, kw, cfg


def single_realistic(tr, kw, cfg, batch):
    warm = ConnTrack(cfg, seed=SEED, **kw)          # load every kernel (NAT's too) first
    warm.process(take(tr.batch, np.arange(min(len(tr), 2000))))
    ct = ConnTrack(cfg, seed=SEED, **kw)
    parts = list(chunks(tr.batch, batch))
    verdicts = []
    t = time.perf_counter()
    for b in parts:
        verdicts.append(ct.process(b).verdict)
    dt = time.perf_counter() - t
    return len(tr) / dt / 1e6, np.concatenate(verdicts), ct.stats()


def ring_bytes(transport):
    """Pool(ring_bytes=) for a transport: frames in the shared ring, or in the messages."""
    return {"ring": DEFAULT_RING, "zmq": 0}[transport]


def pool_realistic(n, tr, kw, cfg, args, transport="ring"):
    pool = Pool(n, cfg, seed=SEED, log=quiet, dispatcher_process=not args.dispatcher_inline,
                frames=False, ring_bytes=ring_bytes(transport), **kw)   # verdicts are compared
    got = []

    def emit(pk, v):
        got.append((np.asarray(pk.seq), np.asarray(v)))

    pool.start()
    try:
        pool.wait_ready()
        parts = list(chunks(tr.batch, args.pool_batch))
        pids = {"supervisor": os.getpid(), "dispatcher": None, "workers": []}
        for k, p in enumerate(pool.sup.procs):
            if k < n:
                pids["workers"].append(p.pid)
            else:
                pids["dispatcher"] = p.pid
        cpu0 = cpu_of(pids)
        t = time.perf_counter()
        pool.feed(parts, emit, timeout_s=args.timeout)
        dt = time.perf_counter() - t
        cpu = {k: (v - cpu0[k]) / len(tr) * 1e9 for k, v in cpu_of(pids).items()}
        pool.feed([], emit, timeout_s=args.timeout, final=True)    # tables and counters
        counts, stats = pool.counts(), pool.stats()
    finally:
        pool.stop()
    seq = np.concatenate([s for s, _ in got]) if got else np.zeros(0, np.int64)
    v = np.concatenate([x for _, x in got]) if got else np.zeros(0, np.uint8)
    return {"mpps": len(v) / dt / 1e6, "out": len(v), "verdict": v[np.argsort(seq, kind="stable")],
            "cpu_ns": cpu,
            "handoff": counts.get("handoffs_out", 0) / max(1, len(v)),
            "invalid_stat": stats.get("invalid", 0)}


def cpu_of(pids: dict) -> dict:
    """CPU seconds so far of the pool's processes (``pids``: supervisor and dispatcher
    pids, the dispatcher's None when it runs in the supervisor, and workers' pids),
    every thread: the supervisor, the dispatcher, and the workers summed."""
    out = {"supervisor": proc_cpu(pids["supervisor"]),
           "workers": sum(proc_cpu(p) for p in pids["workers"])}
    if pids["dispatcher"] is not None:
        out["dispatcher"] = proc_cpu(pids["dispatcher"])
    return out


def run_realistic(name, nat, n_packets, args):
    t = time.perf_counter()
    tr, kw, cfg = make_trace(name, n_packets, nat)
    gen = time.perf_counter() - t
    c = tr.conns()
    print(f"{name} flows open{' + MASQUERADE (configs/demo.toml)' if nat else ''}: "
          f"{len(tr):,} frames, {tr.batch.buf.nbytes / len(tr):.0f} B/frame, "
          f"{tr.concurrency():,.0f} flows open (median), conns tcp {c['tcp']:,} udp {c['udp']:,} "
          f"icmp {c['icmp']:,}" + (f", {tr.remapped} remapped" if nat else "")
          + f"; generated in {gen:.1f} s")
    base, want, st = single_realistic(tr, kw, cfg, args.batch)
    inv = int((want == K.V_INVALID).sum())
    res = {"profile": name + ("-nat" if nat else ""), "frames": len(tr),
           "flows_open": float(tr.concurrency()), "single_mpps": base, "single_invalid": inv,
           "pool": []}
    print(f"  {'single process, batch ' + str(args.batch):<34} {base:6.2f} Mpps  1.00x"
          f"{'':16} invalid {inv} (stats {st['invalid']})")
    for n, transport in [(n, t) for n in args.workers for t in args.transports]:
        label = f"pool {n} worker{'s' if n > 1 else ''}, {transport}"
        try:
            r = pool_realistic(n, tr, kw, cfg, args, transport)
        except Exception as e:      # the pool is being rebuilt: report, go on
            print(f"  {label:<34} failed: {type(e).__name__}: {e}")
            res["pool"].append({"workers": n, "transport": transport,
                                "error": f"{type(e).__name__}: {e}"})
            continue
        v = r["verdict"]
        if len(v) != len(want):
            same = f"verdicts: {len(v):,} of {len(want):,} frames came out"
        else:
            d = np.flatnonzero(v != want)
            pairs = Counter(f"{K.VERDICT_NAMES[int(want[i])]}->{K.VERDICT_NAMES[int(v[i])]}"
                            for i in d)
            same = "verdicts same" if not len(d) else (
                f"verdicts DIFFER in {len(d):,} frames (single->pool: "
                + ", ".join(f"{k} {c}" for k, c in pairs.most_common()) + ")")
        print(f"  {label:<34} {r['mpps']:6.2f} Mpps {r['mpps'] / base:5.2f}x  handoff "
              f"{r['handoff']:5.1%}  invalid {int((v == K.V_INVALID).sum())} (stats "
              f"{r['invalid_stat']}), {same}")
        cpu = r["cpu_ns"]
        print(f"  {'':<34} CPU ns/packet: " + ", ".join(f"{k} {x:.0f}" for k, x in cpu.items())
              + f"; all {sum(cpu.values()):.0f} = {sum(cpu.values()) * base / 1e3:.2f}x "
              f"one process's {1e3 / base:.0f}")
        res["pool"].append({"workers": n, "transport": transport, "mpps": r["mpps"],
                            "ratio": r["mpps"] / base, "handoff": r["handoff"],
                            "cpu_ns_per_packet": cpu,
                            "invalid": int((v == K.V_INVALID).sum()),
                            "same_verdicts": same == "verdicts same", "verdicts": same})
    return res


# ------------------------------------------------------------------ synthetic profile

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


def single_synthetic(hs, data, batch):
    ct = ConnTrack(Config(max_conns=len(hs), events=False), seed=SEED)
    for b in chunks(hs, 4096):
        ct.process(b)
    parts = list(chunks(data, batch))
    t = time.perf_counter()
    for b in parts:
        ct.process(b)
    return len(data) / (time.perf_counter() - t)


def pool_synthetic(n, hs, data, args, transport="ring"):
    cfg = Config(max_conns=len(hs), events=False)
    pool = Pool(n, cfg, seed=SEED, log=quiet, dispatcher_process=not args.dispatcher_inline,
                ring_bytes=ring_bytes(transport))
    pool.start()
    try:
        pool.wait_ready()
        # the handshakes as three waves (every SYN, then every SYN/ACK, then every ACK):
        # each wave completes before the next
        waves = [take(hs, np.arange(w, len(hs), 3)) for w in range(3)]
        t = time.perf_counter()
        pool.feed(chunks(waves[0], args.pool_batch), timeout_s=args.timeout)
        t_syn = time.perf_counter() - t
        grants = pool.counts().get("grants", 0)
        for w in waves[1:]:
            pool.feed(chunks(w, args.pool_batch), timeout_s=args.timeout)
        before = dict(pool.counts())
        parts = list(chunks(data, args.pool_batch))
        out = [0]

        def emit(pk, v):
            out[0] += len(v)
        t = time.perf_counter()
        pool.feed(parts, emit, timeout_s=args.timeout)
        dt = time.perf_counter() - t
        after = pool.counts()
        pool.feed([], timeout_s=args.timeout, final=True)
        st = pool.stats()
    finally:
        pool.stop()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"mpps": out[0] / dt / 1e6, "handoff": d.get("handoffs_out", 0) / max(1, out[0]),
            "xinserts_per_s": grants / t_syn, "conns_per_s": len(waves[0]) / t_syn,
            "worker_busy": d.get("busy_us", 0) / 1e6 / n / dt,
            "worker_wait": d.get("step_wait_us", 0) / 1e6 / n / dt,
            "invalid": st.get("invalid", 0)}


def run_synthetic(args):
    hs, data = both_directions(args.flows, args.packets, args.reply_share)
    print(f"synthetic: {args.flows:,} flows, {args.packets:,} frames of 64 bytes, Zipf 1.1, "
          f"{args.reply_share:.0%} reply direction")
    base = single_synthetic(hs, data, args.batch) / 1e6
    print(f"  {'single process, batch ' + str(args.batch):<34} {base:6.2f} Mpps  1.00x")
    res = {"profile": "synthetic", "frames": len(data), "flows_open": float(args.flows),
           "single_mpps": base, "pool": []}
    for n, transport in [(n, t) for n in args.workers for t in args.transports]:
        label = f"pool {n} worker{'s' if n > 1 else ''}, {transport}"
        try:
            r = pool_synthetic(n, hs, data, args, transport)
        except Exception as e:
            print(f"  {label:<34} failed: {type(e).__name__}: {e}")
            res["pool"].append({"workers": n, "transport": transport,
                                "error": f"{type(e).__name__}: {e}"})
            continue
        res["pool"].append({"workers": n, "transport": transport, "ratio": r["mpps"] / base,
                            **r})
        print(f"  {label:<34} {r['mpps']:6.2f} Mpps {r['mpps'] / base:5.2f}x  handoff "
              f"{r['handoff']:5.1%}  invalid {r['invalid']}; SYN wave {r['conns_per_s']:,.0f} "
              f"new conns/s, cross-shard inserts {r['xinserts_per_s']:,.0f}/s; workers busy "
              f"{r['worker_busy']:.0%}, waiting on peers {r['worker_wait']:.0%}")
    return res


# ------------------------------------------------------------------ shardct replay

def replay_wall(path, workers, extra, timeout):
    """Wall time of `shardct replay path --workers N` (start-up included) and the time
    it reports itself; None on timeout."""
    cmd = [sys.executable, "-m", "workers.cli", "replay", str(path), "--workers", str(workers),
           "--list", "0", *extra]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, None, "timed out"
    wall = time.perf_counter() - t
    m = re.search(r"in ([0-9.]+) s .*?: (.*)", r.stdout)
    if r.returncode != 0 or m is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return wall, None, f"exit {r.returncode}: {tail}"
    return wall, float(m.group(1)), m.group(2)


def run_replay(args):
    tr = P.profile("2k", args.replay_packets, seed=2)
    runs = [("pcap, no config", ".pcap", tr, [])]
    if args.replay_nat:
        cfg = Config(max_conns=max(65536, 2 * len(tr.proto)), events=False)
        rules, network = demo_nat()
        nat = P.through_nat(tr, cfg, seed=0x5EED, rules=rules, network=network)
        runs.append(("pcapng lan0/wan0, -c configs/demo.toml", ".pcapng", nat,
                     ["-c", str(DEMO)]))
    from workers.pcapio import PcapngWriter, PcapWriter
    out = []
    for label, ext, t, extra in runs:
        fd, path = tempfile.mkstemp(suffix=ext, prefix="shardct-bench-")
        os.close(fd)
        try:
            w = PcapngWriter(path, ["lan0", "wan0"]) if ext == ".pcapng" else PcapWriter(path)
            with w:
                for b in chunks(t.batch, 65536):
                    w.write_batch(b)
            print(f"shardct replay, {len(t):,} frames ({label}, {os.path.getsize(path) / 1e6:.0f} MB):")
            res = {n: replay_wall(path, n, extra, args.timeout) for n in (1, 2)}
        finally:
            os.unlink(path)
        for n, (wall, own, what) in res.items():
            if wall is None:
                print(f"  --workers {n}: {what} after {args.timeout:.0f} s")
            elif own is None:
                print(f"  --workers {n}: {wall:7.2f} s wall, {what}")
            else:
                print(f"  --workers {n}: {wall:7.2f} s wall ({own:.2f} s by its own clock, "
                      f"{len(t) / own / 1e3:,.0f} kpps): {what}")
        w1, w2 = res[1][0], res[2][0]
        if w1 and w2 and res[2][1] is not None:
            print(f"  --workers 2 / --workers 1 wall time: {w2 / w1:.2f}x")
        out.append({"capture": label, "frames": len(t),
                    "runs": [{"workers": n, "wall_s": wall, "own_s": own,
                              "kpps": len(t) / own / 1e3 if own else None, "result": what}
                             for n, (wall, own, what) in res.items()],
                    "w2_over_w1_wall": (w2 / w1) if (w1 and w2 and res[2][1] is not None)
                    else None})
    return out


def dispatcher_rate(n_packets, workers=(1, 2, 3), reps=3, max_round=16384):
    """ns/packet of the pool's dispatcher (parse + hash + answer dependencies + scatter,
    ``shardct.shard.Dispatcher.rounds`` consumed fully) on the 2k realistic profile, in
    this process; the best of ``reps`` runs."""
    from shardct.shard import Dispatcher
    tr = P.profile("2k", n_packets, seed=3)
    cfg = Config(max_conns=max(65536, 2 * len(tr.proto)), events=False)
    out = {}
    for n in workers:
        best = float("inf")
        for _ in range(reps + 1):
            b = take(tr.batch, np.arange(len(tr)))      # a fresh, unshared copy (scatter copies)
            d = Dispatcher(n, cfg, SEED, max_round)
            t = time.perf_counter()
            for _parts in d.rounds(b):
                pass
            best = min(best, time.perf_counter() - t)
        out[n] = {"ns": best / len(tr) * 1e9, "mpps": len(tr) / best / 1e6}
    return out


def parse_args(argv=None):
    """bench/pool.py's options (argv=None: the command line), sizes filled in:
    (args, chosen profiles)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (checks that it runs)")
    ap.add_argument("--profiles", default=",".join(ALL), help=f"some of {','.join(ALL)}")
    ap.add_argument("--workers", default="1,2,3", help="pool sizes to run")
    ap.add_argument("--batch", type=int, default=1024, help="single process: frames per call")
    ap.add_argument("--pool-batch", type=int, default=65536, help="pool: frames per batch fed")
    ap.add_argument("--dispatcher-inline", action="store_true",
                    help="pool: dispatcher in the feeding process, not its own")
    ap.add_argument("--transports", default="ring",
                    help="pool: frames in the shared ring (ring), in the ZeroMQ messages "
                         "(zmq), or both side by side (ring,zmq)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pool run / replay")
    ap.add_argument("--flows", type=int, help="synthetic: flows")
    ap.add_argument("--packets", type=int, help="synthetic: data frames")
    ap.add_argument("--reply-share", type=float, default=0.5, help="synthetic: reply direction")
    ap.add_argument("--packets-2k", type=int, help="frames of the 2k profiles")
    ap.add_argument("--packets-20k", type=int, help="frames of the 20k profiles")
    ap.add_argument("--replay-packets", type=int, help="frames of the replayed capture")
    ap.add_argument("--replay-nat", action="store_true",
                    help="replay: also a MASQUERADE capture through configs/demo.toml")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.workers = [int(x) for x in args.workers.split(",")]
    args.transports = [t for t in args.transports.split(",") if t]
    if any(t not in ("ring", "zmq") for t in args.transports):
        ap.error("--transports: ring, zmq or both")
    chosen = [p for p in args.profiles.split(",") if p]
    bad = [p for p in chosen if p not in ALL]
    if bad:
        ap.error(f"unknown profile(s) {','.join(bad)}: want some of {','.join(ALL)}")
    return args, chosen


def main(argv=None):
    args, chosen = parse_args(argv)
    print(f"bench/pool.py{' --quick' if args.quick else ''}: {os.cpu_count()} CPUs, pool "
          f"dispatcher {'inline' if args.dispatcher_inline else 'in its own process'}")
    return run(args, chosen)


def run(args, chosen):
    """Runs the chosen profiles; {profile: result dict} (printing as it goes)."""
    results = {}
    for p in chosen:
        if p == "synthetic":
            results[p] = run_synthetic(args)
        elif p == "replay":
            results[p] = run_replay(args)
        else:
            name, nat = p.removesuffix("-nat"), p.endswith("-nat")
            results[p] = run_realistic(name, nat,
                                       args.packets_2k if name == "2k" else args.packets_20k, args)
    return results


if __name__ == "__main__":
    main()
