"""Per-stage model of the worker pool, measured: what each stage costs on its own, and
what that predicts for more cores than this machine has.

The stages of ``workers/pool.py``, each measured apart (one process unless it is the
transport), on realistic two-way traffic (``shardct.profiles``: the "2k" and "20k"
profiles, seed 3):

* **dispatcher** (a process of its own): ``shardct.shard.Dispatcher(n, ...).rounds(batch)``
  consumed fully: parse + hash, answer deps, the scatter into one Packets per shard.
  ns/packet for each n, with its parts (parse+hash, deps, scatter, the rest).
* **workers** (one process each): ``LocalPool(n, ...)`` rounds driven as ``run_round``
  drives them, with ``Shard.local/outbox/step/results`` and the reaper timed per shard.
  Between two superstep barriers a worker computes one *segment* (``local`` + first
  ``outbox``; ``step`` + next ``outbox``; last ``step`` + ``results`` + reap); a round's
  compute on the critical path is the sum over segments of the slowest shard's segment.
  Also: supersteps per round, messages and bytes each shard sends per superstep (every
  ``Msg`` array: rel, req, ans, and the ho/bo Packets' frame bytes plus their per-packet
  arrays), and the sink's reordering of the round (concat, argsort, take).
* **transport**: ZeroMQ ipc PUSH/PULL to a second process (this file run as a peer by
  ``subprocess``): array messages shaped as the pool's (a msgpack header, the frame
  buffer and eight per-packet arrays as raw frames, ``send_multipart(copy=False)``; the
  receiver copies the buffer as ``workers.pool.pk_from`` does), streamed at several
  sizes: wall time and each side's CPU per message, fitted as per-message + per-byte;
  and a ping-pong round trip of an empty superstep message (polling as the workers do).

The model (seconds per round of R packets, n workers, each process on a core of its own;
send/recv/view: the transport's fitted CPU per message and per byte):

    D = R*d(n) + n*send(part) + view(input batch)                       dispatcher
    W = recv(part) + CP(R, n) + steps * L(n) + busiest shard's step bytes + send(result)
        L(n) = one-way latency + (n-1) messages sent and received       one worker
    S = send(input batch) + n*recv(result part) + R*reorder              sink

The dispatcher runs up to ``window`` rounds ahead of the sink, so the three stages
overlap round against round: Mpps = R / max(D, W, S), and the largest names the limit.
Inside W nothing overlaps: each superstep waits for every peer's message. Stages in
series (one core for everything) would give R / (D + W + S). 8 and 16 cores are 6 and 14
workers beside the dispatcher and the sink.

**Check** (not with --quick; --no-check skips it): the real ``workers.pool.Pool`` with one
worker and the dispatcher in the supervisor (2 processes: what this 2-core VM can give a
core each) on the same trace, its rate and each process's CPU (/proc, 10 ms ticks) beside
the model's. The summary's bracketed figures scale D and S by the supervisor's measured /
modelled CPU and W by the worker's.

    PYTHONPATH=. python3 bench/model.py [--quick] [--profiles 2k,20k]
        [--shards 1,2,4,6,8,14,16] [--rounds 4096,16384] [--json FILE]

Prints everything it measures; asserts nothing about speed. This VM's speed drifts by
tens of percent between runs, and other processes share its 2 cores, so repeated work is
timed several times and the least time of each piece is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SEED = 0x5EED
PER_PACKET = 8 + 4 + 2 + 8 + 8 + 8 + 8 + 8   # off length ifindex ts hashes seq given dep
HEADER = 170      # bytes of the msgpack header of a BATCH of 9 arrays (workers/messages.py)


# ------------------------------------------------------------------ transport peer

def sockets(ctx, rx_ep: str, tx_ep: str, bind: bool):
    """A PULL socket on rx_ep, a PUSH socket on tx_ep (no send limit, as the pool's) and
    a poller on the PULL one."""
    import zmq
    rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    tx.setsockopt(zmq.SNDHWM, 0)
    for sock, ep in ((rx, rx_ep), (tx, tx_ep)):
        sock.setsockopt(zmq.LINGER, 0)
        (sock.bind if bind else sock.connect)(ep)
    poller = zmq.Poller()
    poller.register(rx, zmq.POLLIN)
    return rx, tx, poller


def peer(endpoint_in: str, endpoint_out: str):
    """The second process: receives streams (and acknowledges each with its CPU time)
    and echoes ping-pong messages. Runs without shardct: zmq and numpy only."""
    import zmq
    ctx = zmq.Context()
    rx, tx, poller = sockets(ctx, endpoint_in, endpoint_out, bind=False)
    tx.send(b"ready")
    while True:
        cmd = json.loads(rx.recv())
        if cmd["op"] == "stop":
            break
        if cmd["op"] == "stream":
            c0 = time.process_time()
            for _ in range(cmd["k"]):
                frames = rx.recv_multipart(copy=False)
                if len(frames) > 1:              # as pk_from: view the arrays, copy buf
                    buf = np.frombuffer(memoryview(frames[1]), np.uint8)
                    if cmd["copy"]:              # (the dispatcher's decode does not)
                        buf.copy()
                    for f in frames[2:]:
                        np.frombuffer(memoryview(f), np.uint8)
            tx.send(json.dumps({"cpu": time.process_time() - c0}).encode())
        elif cmd["op"] == "pingpong":
            c0 = time.process_time()
            for _ in range(cmd["k"]):
                while not poller.poll(20):       # as a worker waits for a superstep
                    pass
                tx.send_multipart(rx.recv_multipart(copy=False), copy=False)
            tx.send(json.dumps({"cpu": time.process_time() - c0}).encode())
    rx.close(0)
    tx.close(0)
    ctx.term()


def packets_message(p: int, frame_bytes: int) -> list:
    """Frames of a pool array message carrying p packets (header, buf, 8 arrays)."""
    import msgpack
    arrays = [np.zeros(p * frame_bytes, np.uint8), np.arange(p, dtype=np.int64),
              np.full(p, frame_bytes, np.int32), np.zeros(p, np.int16)] + \
        [np.arange(p, dtype=np.int64) for _ in range(5)]
    spec = [[f"a{i}", a.dtype.str[1:], list(a.shape)] for i, a in enumerate(arrays)]
    head = msgpack.packb({"v": 1, "t": "step", "arrays": spec, "round": 1, "step": 0,
                          "from": 0, "active": True, "low": 1 << 62, "gen": 0})
    return [head] + [a.data for a in arrays]


def empty_message() -> list:
    import msgpack
    return [msgpack.packb({"v": 1, "t": "step", "arrays": [], "round": 1, "step": 0,
                           "from": 0, "active": False, "low": 1 << 62, "gen": 0})]


def measure_transport(frame_bytes: int, quick: bool) -> dict:
    """Stream and ping-pong over ipc to a peer process."""
    import zmq
    tmp = tempfile.mkdtemp(prefix="shardct-model-")
    e_out, e_in = f"ipc://{tmp}/to-peer", f"ipc://{tmp}/from-peer"
    ctx = zmq.Context()
    rx, tx, poller = sockets(ctx, e_in, e_out, bind=True)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--peer", e_out, e_in])
    out = {"stream": [], "frame_bytes": frame_bytes}
    try:
        if not rx.poll(30_000):
            raise RuntimeError("transport peer did not start")
        rx.recv()
        budget = 0.12 if quick else 0.25      # seconds per size and repetition

        def stream(p, copy):
            msg = empty_message() if p == 0 else packets_message(p, frame_bytes)
            nbytes = sum(memoryview(f).nbytes for f in msg)
            k, best = 4, None
            for _ in range(3):
                tx.send(json.dumps({"op": "stream", "k": k, "copy": copy}).encode())
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(k):
                    tx.send_multipart(msg, copy=False)
                ack = json.loads(rx.recv())
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = {"p": p, "bytes": nbytes, "k": k, "copy": copy, "wall_us": wall / k * 1e6,
                       "send_cpu_us": cpu / k * 1e6, "recv_cpu_us": ack["cpu"] / k * 1e6}
                if best is None or row["wall_us"] < best["wall_us"]:
                    best = row
                k = int(min(200_000, max(4, k * budget / max(wall, 1e-6))))
            return best

        def fit(rows, key):
            """per message + per byte, least squares on relative error"""
            x = np.array([r["bytes"] for r in rows], float)
            y = np.array([r[key] for r in rows], float)
            A = np.vstack([np.ones_like(x), x]).T
            (a, b), *_ = np.linalg.lstsq(A / y[:, None], np.ones_like(y), rcond=None)
            return {"per_msg_us": float(a), "per_kb_us": float(b * 1024)}

        out["stream"] = [stream(p, True) for p in (0, 1, 8, 64, 512, 4096, 16384)]
        pts = [r for r in out["stream"] if r["p"] >= 1]
        for key in ("wall_us", "send_cpu_us", "recv_cpu_us"):
            out[key.replace("_us", "")] = fit(pts, key)
        # a receiver that only views the buffer (the dispatcher's decode_batch)
        out["stream_nocopy"] = [stream(p, False) for p in (1, 512, 4096, 16384)]
        out["recv_cpu_nocopy"] = fit(out["stream_nocopy"], "recv_cpu_us")
        e = out["stream"][0]
        out["empty"] = {"wall_us": e["wall_us"], "send_cpu_us": e["send_cpu_us"],
                        "recv_cpu_us": e["recv_cpu_us"]}
        # ping-pong of an empty superstep message
        msg = empty_message()
        k = 300 if quick else 2000
        tx.send(json.dumps({"op": "pingpong", "k": k}).encode())
        rtts = np.empty(k)
        c0 = time.process_time()
        for i in range(k):
            t0 = time.perf_counter()
            tx.send_multipart(msg, copy=False)
            while not poller.poll(20):
                pass
            rx.recv_multipart(copy=False)
            rtts[i] = time.perf_counter() - t0
        cpu_me = time.process_time() - c0
        ack = json.loads(rx.recv())
        out["pingpong"] = {"k": k, "rtt_median_us": float(np.median(rtts) * 1e6),
                           "rtt_p10_us": float(np.percentile(rtts, 10) * 1e6),
                           "rtt_p90_us": float(np.percentile(rtts, 90) * 1e6),
                           "cpu_per_rtt_us": (cpu_me + ack["cpu"]) / k * 1e6}
        tx.send(json.dumps({"op": "stop"}).encode())
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tx.close(0)
        rx.close(0)
        ctx.term()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    return out


class Link:
    """The transport's fitted costs, in seconds."""

    def __init__(self, t: dict):
        self.t = t
        self.send_a = t["send_cpu"]["per_msg_us"] * 1e-6
        self.send_b = t["send_cpu"]["per_kb_us"] * 1e-6 / 1024
        self.recv_a = t["recv_cpu"]["per_msg_us"] * 1e-6
        self.recv_b = t["recv_cpu"]["per_kb_us"] * 1e-6 / 1024
        self.view_a = t["recv_cpu_nocopy"]["per_msg_us"] * 1e-6
        self.view_b = t["recv_cpu_nocopy"]["per_kb_us"] * 1e-6 / 1024
        self.empty = (t["empty"]["send_cpu_us"] + t["empty"]["recv_cpu_us"]) * 1e-6
        # what a one-way trip costs beyond the two ends' CPU: waking up the receiver
        self.latency = max(0.0, t["pingpong"]["rtt_median_us"] / 2 * 1e-6 - self.empty)

    def send(self, nbytes, msgs=1):
        return msgs * self.send_a + nbytes * self.send_b

    def recv(self, nbytes, msgs=1):
        """received and its frame buffer copied (pk_from)"""
        return msgs * self.recv_a + nbytes * self.recv_b

    def view(self, nbytes, msgs=1):
        """received and only viewed (decode_batch(writable=False))"""
        return msgs * self.view_a + nbytes * self.view_b


# ------------------------------------------------------------------ stage timers

class Patch:
    """Replace attributes for a while (timers around the code under test)."""

    def __init__(self):
        self.saved = []

    def wrap(self, owner, name, make):
        raw = vars(owner)[name]
        self.saved.append((owner, name, raw))
        if isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(make(raw.__func__)))
        else:
            setattr(owner, name, make(raw))

    def undo(self):
        for owner, name, orig in reversed(self.saved):
            setattr(owner, name, orig)
        self.saved = []


def pk_bytes(pk) -> int:
    if not len(pk):
        return 0
    b = pk.batch
    return int(b.buf.nbytes + sum(a.nbytes for a in (b.off, b.length, b.ifindex, b.ts,
                                                     pk.hashes, pk.seq, pk.given, pk.dep)))


def msg_bytes(m) -> int:
    return int(m.rel.nbytes + m.req.nbytes + m.ans.nbytes + pk_bytes(m.ho) + pk_bytes(m.bo))


def measure_dispatcher(batch, cfg, shards, max_round, reps):
    """ns/packet of Dispatcher.rounds consumed fully, and of its parts. The work is the
    same in every repetition, so each round's time (and each part's) is the least over
    ``reps`` runs: other processes on this VM then disturb the figure less."""
    from shardct import shard as S
    from shardct import wire
    rows = []
    m = len(batch)
    for n in shards:
        runs = []
        for _ in range(reps):
            parts_t = {"parse_hash": [], "deps": [], "scatter": []}
            pt = Patch()

            def timer(key):
                def make(orig):
                    def f(*a, **kw):
                        t0 = time.perf_counter()
                        r = orig(*a, **kw)
                        parts_t[key].append(time.perf_counter() - t0)
                        return r
                    return f
                return make
            pt.wrap(wire, "parse_hash_batch", timer("parse_hash"))
            pt.wrap(S, "answer_deps", timer("deps"))
            pt.wrap(S, "scatter", timer("scatter"))
            try:
                d = S.Dispatcher(n, cfg, SEED, max_round)
                out_bytes, per_round = 0, []
                it = d.rounds(batch)
                while True:
                    t0 = time.perf_counter()
                    nxt = next(it, None)       # the first one parses the whole batch
                    per_round.append(time.perf_counter() - t0)
                    if nxt is None:
                        break
                    out_bytes += sum(pk_bytes(p) for p in nxt[0])
            finally:
                pt.undo()
            runs.append((np.array(per_round), {k: np.array(v) for k, v in parts_t.items()},
                         out_bytes))
        total = np.min([r[0] for r in runs], axis=0).sum()
        row = {"n": n, "ns": total / m * 1e9, "out_bytes_per_pkt": runs[0][2] / m}
        for k in ("parse_hash", "deps", "scatter"):
            row[k] = np.min([r[1][k] for r in runs], axis=0).sum() / m * 1e9
        row["rest"] = row["ns"] - row["parse_hash"] - row["deps"] - row["scatter"]
        rows.append(row)
    return rows


def run_workers(batch, cfg, n, max_round, warm_frac):
    """Drive LocalPool(n) round by round with every Shard call timed per shard: per
    measured round the compute segments between barriers (superstep j: rows; shards:
    columns), bytes each shard sent and received per superstep, the sink's reorder."""
    from shardct.shard import LocalPool, Packets, Shard, run_round, sum_counts
    lp = LocalPool(n, cfg, seed=SEED, max_round=max_round)
    calls = []            # (k, name, seconds, extra) of the current round

    def timed(name):
        def make(orig):
            def f(self, *a, **kw):
                t0 = time.perf_counter()
                r = orig(self, *a, **kw)
                dt = time.perf_counter() - t0
                extra = None
                if name == "outbox":
                    extra = {p: (msg_bytes(m), not m.empty()) for p, m in r.items()}
                calls.append((self.k, name, dt, extra))
                return r
            return f
        return make

    empty = [0.0]

    def timed_empty(orig):
        def f():
            t0 = time.perf_counter()
            r = orig()
            empty[0] += time.perf_counter() - t0
            return r
        return f

    pt = Patch()
    for name in ("local", "outbox", "step", "results"):
        pt.wrap(Shard, name, timed(name))
    pt.wrap(Packets, "empty", timed_empty)
    framesless = getattr(Packets, "framesless", None)
    rounds = []
    warm_seq = int(warm_frac * len(batch))
    try:
        for parts, (s, e) in lp.dispatcher.rounds(batch):
            calls.clear()
            empty[0] = 0.0
            steps = run_round(lp.shards, parts)
            res = [sh.results() for sh in lp.shards]
            reap = []
            for sh in lp.shards:
                t0 = time.perf_counter()
                sh.reap_until(max(sh.now, lp.dispatcher.clock))
                reap.append(time.perf_counter() - t0)
            t0 = time.perf_counter()           # the sink: the round back in input order
            pk = Packets.concat([p for p, _ in res])
            v = np.concatenate([v for _, v in res])
            order = np.argsort(pk.seq, kind="stable")
            pk.take(order), v[order]
            reorder = time.perf_counter() - t0
            reorder_nf = reorder
            if framesless is not None:         # the same for results without frames
                nf = [framesless(p.seq, p.batch.ts, p.batch.ifindex) for p, _ in res]
                t0 = time.perf_counter()
                pk_nf = Packets.concat(nf)
                v_nf = np.concatenate([x for _, x in res])
                order = np.argsort(pk_nf.seq, kind="stable")
                pk_nf.take(order), v_nf[order]
                reorder_nf = time.perf_counter() - t0
            if s < warm_seq:
                continue
            # a worker computes between barriers: local + outbox, step + outbox, ...,
            # the last step + results + reap
            seg = np.zeros((steps + 1, n))
            sent = np.zeros((steps + 1, n))
            recv = np.zeros((steps + 1, n))
            cur = [0] * n
            msgs = nonempty = 0
            for k, name, dt, extra in calls:
                seg[cur[k], k] += dt
                if name == "step":
                    cur[k] += 1
                elif name == "outbox":
                    for p, (nb, ne) in extra.items():
                        sent[cur[k], k] += nb
                        recv[cur[k], p] += nb
                        msgs += 1
                        nonempty += int(ne)
            seg[steps] += reap
            rounds.append(dict(packets=e - s, steps=steps, seg=seg, sent=sent, recv=recv,
                               reorder=reorder, reorder_nf=reorder_nf, msgs=msgs,
                               nonempty=nonempty, empty=empty[0],
                               in_bytes=sum(pk_bytes(p) for p in parts),
                               out_bytes=pk_bytes(pk) + len(v)))
    finally:
        pt.undo()
    counts = sum_counts(sh.counts for sh in lp.shards)
    return rounds, counts, lp.dispatcher.seq


def measure_workers(batch, cfg, n, max_round, warm_frac, reps):
    """run_workers ``reps`` times; the runs do the same work, so each compute segment of
    each shard (and each round's reorder) is the least over the runs."""
    runs = [run_workers(batch, cfg, n, max_round, warm_frac) for _ in range(reps)]
    rr, counts, seq = runs[0]
    for other, _, _ in runs[1:]:
        for r, o in zip(rr, other):
            if r["seg"].shape != o["seg"].shape:
                raise AssertionError("LocalPool runs differ in supersteps")
            r["seg"] = np.minimum(r["seg"], o["seg"])
            r["reorder"] = min(r["reorder"], o["reorder"])
            r["reorder_nf"] = min(r["reorder_nf"], o["reorder_nf"])
            r["empty"] = min(r["empty"], o["empty"])
    for r in rr:
        own = r["seg"].sum(axis=0)
        r.update(cp=r["seg"].max(axis=1).sum(), total=own.sum(), busiest=own.max(),
                 step_bytes=r["sent"].sum(), busiest_send=r["sent"].max(axis=1).sum(),
                 busiest_recv=r["recv"].max(axis=1).sum())

    def tot(key):
        return float(sum(r[key] for r in rr))
    P, R = max(1.0, tot("packets")), max(1, len(rr))
    return {
        "n": n, "R": max_round, "rounds": len(rr), "packets": int(P),
        "steps_per_round": tot("steps") / R,
        "cp_ns": tot("cp") / P * 1e9,                  # compute on the critical path
        "mean_ns": tot("total") / n / P * 1e9,         # per shard if perfectly balanced
        "busiest_ns": tot("busiest") / P * 1e9,        # the busiest shard's own compute
        "total_ns": tot("total") / P * 1e9,            # all shards' compute together
        "empty_ns": tot("empty") / P * 1e9,            # of which in Packets.empty()
        "reorder_ns": tot("reorder") / P * 1e9,
        "reorder_nf_ns": tot("reorder_nf") / P * 1e9,  # the same without frames
        "in_bytes_per_pkt": tot("in_bytes") / P,
        "out_bytes_per_pkt": tot("out_bytes") / P,
        # per shard per superstep
        "msgs_per_step": n - 1,
        "nonempty_frac": tot("nonempty") / max(1.0, tot("msgs")),
        "kb_sent_per_step": tot("step_bytes") / max(1.0, tot("steps")) / n / 1024,
        "busiest_send_per_round": tot("busiest_send") / R,
        "busiest_recv_per_round": tot("busiest_recv") / R,
        "handoff_ratio": counts.get("handoffs_out", 0) / max(1, seq),
        "reserve_ratio": counts.get("reserve_requests", 0) / max(1, seq),
    }


# ------------------------------------------------------------------ the model

NO_FRAMES = 8 + 8 + 2 + 1    # a result without frames: seq, ts, ifindex, verdict


def stage_bytes(w: dict, frames: bool = True):
    """Bytes per round: a worker's batch, a worker's results, the input batch.
    ``frames=False``: results without the frames (``Pool(frames=False)``)."""
    n, R = w["n"], w["R"]
    share_in = R * w["in_bytes_per_pkt"] / n + HEADER
    share_out = R * (w["out_bytes_per_pkt"] if frames else NO_FRAMES) / n + HEADER
    # the input batch carries buf, off, length, ifindex, ts: not hashes, seq, given, dep
    batch_in = R * (w["in_bytes_per_pkt"] - 32) + HEADER
    return share_in, share_out, batch_in


def superstep_comm(w: dict, link: Link) -> float:
    """Seconds per round a worker spends on supersteps' transport (not its compute)."""
    n = w["n"]
    if n == 1:
        return 0.0             # no peers: the last step is local
    frac = w["nonempty_frac"]
    per_step = link.latency + (n - 1) * ((1 - frac) * link.empty
                                         + frac * (link.send_a + link.recv_a))
    return (w["steps_per_round"] * per_step + w["busiest_send_per_round"] * link.send_b
            + w["busiest_recv_per_round"] * link.recv_b)


def predict(w: dict, d_ns: float, link: Link, frames: bool = True) -> dict:
    """Seconds per round of each stage (a core each) for worker row w and dispatcher
    d_ns ns/packet. ``frames=False``: results travel without their frames (the
    workers' compute is still that measured with frames)."""
    n, R = w["n"], w["R"]
    share_in, share_out, batch_in = stage_bytes(w, frames)
    D = R * d_ns * 1e-9 + n * link.send(share_in) + link.view(batch_in)
    reorder = w["reorder_ns"] if frames else w.get("reorder_nf_ns", w["reorder_ns"])
    S = link.send(batch_in) + n * link.recv(share_out) + R * reorder * 1e-9
    cp = R * w["cp_ns"] * 1e-9
    comm = superstep_comm(w, link)
    io = link.recv(share_in) + link.send(share_out)
    W = cp + comm + io
    stages = {"dispatcher": D, "workers": W, "sink": S}
    return {"n": n, "R": R, "D": D, "W": W, "S": S, "W_compute": cp, "W_comm": comm,
            "W_io": io, "mpps": R / max(D, W, S) / 1e6, "serial_mpps": R / (D + W + S) / 1e6,
            "limit": max(stages, key=stages.get)}


def check_pool(tr, cfg, w1: dict, d_ns: float, link: Link, chunk: int = 32768) -> dict:
    """The real pool with 1 worker and the dispatcher and sink in the supervisor's
    process (2 processes: this VM's 2 cores), beside what the model says of it."""
    from shardct.batch import take
    from workers.pool import Pool
    b = tr.batch
    parts = [take(b, np.arange(s, min(len(b), s + chunk))) for s in range(0, len(b), chunk)]
    pool = Pool(1, cfg, seed=SEED, log=lambda *_: None, dispatcher_process=False,
                max_round=w1["R"])
    got = [0]

    def emit(pk, v):
        got[0] += len(v)
    pool.start()
    try:
        pool.wait_ready()
        warm = max(1, len(parts) // 4)      # untimed, as in the worker stage's measurement
        pool.feed(parts[:warm], emit, timeout_s=300)
        got[0] = 0
        pid = pool.sup.procs[0].pid
        c0, w0, t0 = time.process_time(), proc_cpu(pid), time.perf_counter()
        pool.feed(parts[warm:], emit, timeout_s=300)
        dt = time.perf_counter() - t0
        cpu_sup, cpu_w = time.process_time() - c0, proc_cpu(pid) - w0
    finally:
        pool.stop()
    R = w1["R"]
    share_in, share_out, _ = stage_bytes(w1)
    sup = R * d_ns * 1e-9 + link.send(share_in) + link.recv(share_out) \
        + R * w1["reorder_ns"] * 1e-9
    W = predict(w1, d_ns, link)["W"]
    m = max(1, got[0])
    return {"packets": got[0], "mpps": got[0] / dt / 1e6,
            "worker_cpu_ns": cpu_w * 1e9 / m, "sup_cpu_ns": cpu_sup * 1e9 / m,
            "model_sup_ns": sup * 1e9 / R, "model_worker_ns": W * 1e9 / R,
            "model_mpps": R / max(sup, W) / 1e6}


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process pid so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under 30 s)")
    ap.add_argument("--profiles", default="2k,20k")
    ap.add_argument("--shards", default="1,2,4,6,8,14,16",
                    help="worker counts (6 and 14: 8 and 16 cores with dispatcher and sink)")
    ap.add_argument("--rounds", default="4096,16384", help="round sizes R")
    ap.add_argument("--packets", type=int, default=None, help="frames per profile")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the real pool with 1 worker beside the model")
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--peer", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.peer:
        return peer(*a.peer)

    from shardct import Config
    from shardct import profiles as P
    from shardct.shard import Shard

    t_start = time.perf_counter()
    shards = [int(x) for x in a.shards.split(",")]
    rsizes = [int(x) for x in a.rounds.split(",")]
    names = a.profiles.split(",")
    sizes = {"2k": 50_000, "20k": 100_000} if a.quick else {"2k": 200_000, "20k": 300_000}
    reps_d, reps_w = (2, 2) if a.quick else (3, 2)
    warm_frac = 0.25
    print(f"bench/model.py: shards {shards}, rounds {rsizes}, profiles {names} "
          f"({'quick' if a.quick else 'full'}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    Shard.warm()
    result = {"profiles": {}, "load_start": os.getloadavg()}

    traces = {}
    for name in names:
        tr = P.profile(name, a.packets or sizes.get(name, 200_000), seed=3)
        traces[name] = tr
        b = tr.batch
        print(f"profile {name}: {len(b)} frames, {len(tr.proto)} flows, median "
              f"{tr.concurrency():.0f} open, {b.buf.nbytes / len(b):.0f} B/frame")

    frame_bytes = int(np.mean([t.batch.buf.nbytes / len(t.batch) for t in traces.values()]))
    print("\n== transport: ZeroMQ ipc PUSH/PULL to a second process, messages of p packets "
          f"({frame_bytes} B frames + {PER_PACKET} B of arrays, 10 raw frames), best of 3")
    tr_res = measure_transport(frame_bytes, a.quick)
    result["transport"] = tr_res
    print(f"{'packets':>8} {'bytes':>10} {'msgs':>7} {'wall us/msg':>12} {'send CPU us':>12} "
          f"{'recv CPU us':>12} {'wall MB/s':>10}")
    for r in tr_res["stream"] + tr_res["stream_nocopy"]:
        mbps = r["bytes"] / r["wall_us"] if r["p"] else 0
        label = (str(r["p"]) if r["p"] else "empty") + ("" if r["copy"] else " view")
        print(f"{label:>8} {r['bytes']:>10} {r['k']:>7} {r['wall_us']:>12.1f} "
              f"{r['send_cpu_us']:>12.1f} {r['recv_cpu_us']:>12.1f} {mbps:>10.0f}")
    print("('view': the receiver does not copy the frame buffer, as the dispatcher's "
          "decode_batch; otherwise it copies it, as pk_from)")
    for key in ("wall", "send_cpu", "recv_cpu", "recv_cpu_nocopy"):
        f = tr_res[key]
        print(f"fit {key:>15}: {f['per_msg_us']:6.1f} us/message + {f['per_kb_us']:6.3f} us/KB")
    pp = tr_res["pingpong"]
    print(f"ping-pong (empty superstep message, poll as the workers): RTT median "
          f"{pp['rtt_median_us']:.1f} us (p10 {pp['rtt_p10_us']:.1f}, p90 "
          f"{pp['rtt_p90_us']:.1f}), CPU of both ends {pp['cpu_per_rtt_us']:.1f} us per RTT")
    link = Link(tr_res)
    print(f"=> one-way latency beyond the ends' CPU {link.latency * 1e6:.1f} us; empty message "
          f"send+recv CPU {link.empty * 1e6:.1f} us")

    for name in names:
        tr = traces[name]
        b = tr.batch
        cfg = Config(max_conns=max(65536, 2 * len(tr.proto)), events=False)
        res = {"dispatcher": {}, "workers": [], "predictions": []}
        result["profiles"][name] = res
        print(f"\n===== profile {name}")
        for R in rsizes:
            rows = measure_dispatcher(b, cfg, shards, R, reps_d)
            res["dispatcher"][R] = rows
            print(f"== dispatcher, R={R} (each round the best of {reps_d}), ns/packet")
            print(f"{'n':>3} {'total':>7} {'parse+hash':>10} {'deps':>6} {'scatter':>8} "
                  f"{'rest':>6} {'B out/pkt':>9}")
            for r in rows:
                print(f"{r['n']:>3} {r['ns']:>7.0f} {r['parse_hash']:>10.0f} {r['deps']:>6.0f} "
                      f"{r['scatter']:>8.0f} {r['rest']:>6.0f} {r['out_bytes_per_pkt']:>9.0f}")
        for R in rsizes:
            print(f"== workers, R={R}, the first {warm_frac:.0%} of frames untimed, best of "
                  f"{reps_w} per segment: ns per packet of the round of compute (on the "
                  "critical path, if balanced, busiest shard's, all shards', of which in "
                  "Packets.empty()); per shard per superstep: messages, share non-empty, KB "
                  "sent; per packet: handoffs, reservations; the sink's reorder with and "
                  "without frames")
            print(f"{'n':>3} {'rounds':>6} {'crit.path':>9} {'balanced':>8} {'busiest':>7} "
                  f"{'all':>6} {'empty':>6} {'steps/rd':>8} {'msgs':>4} {'nonempty':>8} "
                  f"{'KB/step':>8} {'handoff':>7} {'reserve':>7} {'reorder':>7} {'no fr.':>6}")
            for n in shards:
                w = measure_workers(b, cfg, n, R, warm_frac, reps_w)
                res["workers"].append(w)
                print(f"{n:>3} {w['rounds']:>6} {w['cp_ns']:>9.0f} "
                      f"{w['mean_ns']:>8.0f} {w['busiest_ns']:>7.0f} {w['total_ns']:>6.0f} "
                      f"{w['empty_ns']:>6.0f} "
                      f"{w['steps_per_round']:>8.2f} {w['msgs_per_step']:>4} "
                      f"{w['nonempty_frac']:>8.2f} {w['kb_sent_per_step']:>8.1f} "
                      f"{w['handoff_ratio']:>7.3f} {w['reserve_ratio']:>7.3f} "
                      f"{w['reorder_ns']:>7.0f} {w['reorder_nf_ns']:>6.0f}")
        print("== model: us per round per stage, each on a core of its own; caps R/stage in "
              "Mpps; Mpps = R / max(D, W, S)")
        print(f"{'R':>6} {'n':>3} {'cores':>5} {'D':>6} {'W':>6} {'=comp':>6} {'+comm':>6} "
              f"{'+io':>5} {'S':>6} {'D cap':>6} {'W cap':>6} {'S cap':>6} {'Mpps':>6} "
              f"{'serial':>6}  limit")
        for w in res["workers"]:
            d_ns = next(r["ns"] for r in res["dispatcher"][w["R"]] if r["n"] == w["n"])
            p = predict(w, d_ns, link)
            res["predictions"].append(p)
            R = w["R"]
            print(f"{R:>6} {w['n']:>3} {w['n'] + 2:>5} {p['D'] * 1e6:>6.0f} "
                  f"{p['W'] * 1e6:>6.0f} {p['W_compute'] * 1e6:>6.0f} {p['W_comm'] * 1e6:>6.0f} "
                  f"{p['W_io'] * 1e6:>5.0f} {p['S'] * 1e6:>6.0f} {R / p['D'] / 1e6:>6.2f} "
                  f"{R / p['W'] / 1e6:>6.2f} {R / p['S'] / 1e6:>6.2f} {p['mpps']:>6.2f} "
                  f"{p['serial_mpps']:>6.2f}  {p['limit']}")
        if not a.no_check and not a.quick and 1 in shards:
            R = rsizes[0]
            w1 = next(w for w in res["workers"] if w["n"] == 1 and w["R"] == R)
            d_ns = next(r["ns"] for r in res["dispatcher"][R] if r["n"] == 1)
            try:
                c = check_pool(tr, cfg, w1, d_ns, link)
            except Exception as e:          # the pool is someone else's moving part
                print(f"== check skipped: the real pool failed: {type(e).__name__}: {e}")
            else:
                res["check"] = c
                print(f"== check, R={R}: workers.pool.Pool(1, dispatcher_process=False), "
                      "dispatcher and sink in the supervisor: 2 processes on this VM's 2 "
                      "cores, shared with whatever else runs")
                print(f"   measured {c['mpps']:.2f} Mpps; CPU ns/packet: supervisor "
                      f"{c['sup_cpu_ns']:.0f}, worker {c['worker_cpu_ns']:.0f} (/proc, every "
                      "thread)")
                print(f"   model    {c['model_mpps']:.2f} Mpps; CPU ns/packet: supervisor "
                      f"{c['model_sup_ns']:.0f}, worker {c['model_worker_ns']:.0f}")

    def no_frames(res, n, R):
        w = next(w for w in res["workers"] if w["n"] == n and w["R"] == R)
        d_ns = next(r["ns"] for r in res["dispatcher"][R] if r["n"] == n)
        p = predict(w, d_ns, link, frames=False)
        res.setdefault("predictions_no_frames", []).append(p)
        return f"{p['mpps']:.2f} ({p['limit']})"

    def with_frames(res, n, R):
        p = next(p for p in res["predictions"] if p["n"] == n and p["R"] == R)
        cell = f"{p['mpps']:.2f} ({p['limit']})"
        c = res.get("check")
        if c:
            fs = c["sup_cpu_ns"] / c["model_sup_ns"]
            fw = c["worker_cpu_ns"] / c["model_worker_ns"]
            cal = {"dispatcher": p["D"] * fs, "workers": p["W"] * fw, "sink": p["S"] * fs}
            lim = max(cal, key=cal.get)
            cell += f" [{R / cal[lim] / 1e6:.2f} {lim[0]}]"
        return cell

    def summary(title, cell, width):
        print(title)
        print(f"{'n':>3} {'cores':>5}"
              + "".join(f"{f'{nm} R={R}':>{width}}" for nm in names for R in rsizes))
        for n in shards:
            cells = [cell(result["profiles"][nm], n, R) for nm in names for R in rsizes]
            print(f"{n:>3} {n + 2:>5}" + "".join(f"{c:>{width}}" for c in cells))

    summary("\n== predictions, results without frames (Pool(frames=False): watching, replay "
            "without -w): Mpps (limiting stage)", no_frames, 20)
    checked = any("check" in r for r in result["profiles"].values())
    summary("\n== predictions: Mpps (limiting stage) with n workers on n + 2 cores"
            + ("; [in brackets: each stage's cost times what the check found the real "
               "processes spend beyond the model (supervisor's factor for D and S, "
               "worker's for W)]" if checked else ""), with_frames, 27)
    result["load_end"] = os.getloadavg()
    print(f"\n(D dispatcher; W one worker = compute on the critical path + superstep latency, "
          f"messages and bytes + its batch in and results out; S sink; 'serial': every stage "
          f"on one core. Load average at the end {os.getloadavg()[0]:.2f}; "
          f"{time.perf_counter() - t_start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
