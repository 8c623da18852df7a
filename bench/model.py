"""Per-stage model of the worker pool, measured: what each stage costs on its own, and
what that predicts for more cores than this machine has.

The pool as ``workers/pool.py`` runs it by default (``Pool(n)``: the frame ring, the
dispatcher in a process of its own, rounds of up to ``max_round`` = 65536 packets, input
batches of 65536 frames as ``bench/pool.py`` feeds them). Input frames are copied into
the shared-memory ring once (``workers/ring.py``); from then on every message carries
per-frame arrays only (offsets into the ring, lengths, interface, time, hash, sequence
number, given, dep: 54 B a packet), small arrays packed into one frame
(``workers/messages.py``). Each stage is measured apart (one process unless it is the
transport), on realistic two-way traffic (``shardct.profiles``: the "2k" and "20k"
profiles, seed 3), the trace's frames on one buffer marked ``shared`` as the ring's are:

* **supervisor** (feeder and sink, the pool's process): copies each input batch into the
  ring (``FrameRing.put``: ns/packet measured on a real ring), sends the batch's arrays to
  the dispatcher, takes n RESULTs per round and puts the round back in input order
  (concat, argsort, take; with frames also ``compact``, the copy out of the ring that
  ``emit`` gets).
* **dispatcher** (a process): ``shardct.shard.Dispatcher(n, ...).rounds(batch)`` over
  input batches of 65536 frames, consumed fully: ns/packet for each n, with its parts
  (``wire.parse_hash_batch``, ``answer_deps``, ``owners``, ``round_rows``: the counting
  sort by owner (``scatter.group``) and each packet's hash, seq, given and dep in shard
  order; ``frames_in_order``: views on the ring; the rest: ``part_of``, ``Packets``,
  the generator), then one BATCH per worker and a ROUND to the sink per round.
* **workers** (one process each): ``LocalPool(n, ...)`` rounds driven as ``run_round``
  drives them, with ``Shard.local/outbox/step/results`` and the reaper timed per shard.
  Between two superstep barriers a worker computes one *segment* (``local`` + first
  ``outbox``; ``step`` + next ``outbox``; last ``step`` + ``results`` + reap); a round's
  compute on the critical path is the sum over segments of the slowest shard's segment.
  Also: supersteps per round, messages and bytes each shard sends per superstep (what
  ``workers.pool.msg_arrays`` sends: rel, req, ans and the ho/bo Packets' arrays).
* **transport**: ZeroMQ ipc PUSH/PULL to a second process (this file run as a peer by
  ``subprocess``), each message built by ``messages.encode_arrays`` as the pool builds
  it and taken apart by the receiver as the pool does (``decode_arrays`` + ``pk_from``
  on a ring; the dispatcher's input: ``FrameRing.batch``): BATCH messages of p packets
  and input batches streamed at several sizes, wall time and each side's CPU per message
  (encoding and decoding included); empty one-frame messages (an idle STEP, ROUND,
  ACK); a ping-pong of an empty STEP (polling as the workers do).

The model (seconds per round of R packets, n workers, each process on a core of its own;
send/recv: the transport's measured CPU for a message with that many bytes of arrays,
interpolated between the sizes measured; B = 65536 frames per input batch, so a round
carries R/B of one):

    D = R*d(n) + R/B*recv_in(B) + n*send(R/n packets) + send(ROUND) + recv(ACK)  dispatcher
    W = recv(R/n) + CP(R, n) + steps * L(n) + busiest shard's step bytes + send(R/n results)
        L(n) = one-way latency + (n-1) messages sent and received               one worker
    S = R*put + R/B*send_in(B) + n*recv(R/n results) + recv(ROUND) + send(ACK)
        + R*reorder                                                            supervisor

The dispatcher runs up to ``window`` (8) rounds ahead of the sink, so the three stages
overlap round against round: Mpps = R / max(D, W, S), and the largest names the limit.
Inside W nothing overlaps: each superstep waits for every peer's message. With fewer
cores than processes the cores are shared: Mpps <= cores * R / (D + n*W + S) as well.
8 and 16 cores are 6 and 14 workers beside the dispatcher and the supervisor.
(``Pool(dispatcher_process=False)``: D and S in one process, without the input message,
ROUND and ACK.)

**Check** (--no-check skips it): the real ``workers.pool.Pool`` with one worker on a
longer trace of the same profile (seed 4: 2M frames, so that many rounds pass the window
of 8), rounds of the largest R measured, (a) the dispatcher in the supervisor (2
processes: what this 2-core VM can give a core each) and (b) the default, the
dispatcher in its own process (3 processes on 2 cores): rate (over the whole feed, and
steady, once the pipeline is full) and each process's CPU (/proc: every thread's
schedstat) beside the model's. The summary's bracketed figures scale D, W and S by what
(b) found each process spends beyond the model.

    PYTHONPATH=. python3 bench/model.py [--quick | --tiny] [--profiles 2k,20k]
        [--shards 1,2,4,6,8,14,16] [--rounds 4096,16384,65536] [--json FILE]

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
import types

import numpy as np

SEED = 0x5EED
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = 65536            # frames per input batch (bench/pool.py --pool-batch, MAX_PACKETS)
PK_ARRAYS = 8 + 4 + 2 + 8 + 8 + 8 + 8 + 8   # off length ifindex ts hashes seq given dep
IN_ARRAYS = 8 + 4 + 2 + 8                   # the input batch: off length ifindex ts
RES_NF = 8 + 8 + 2 + 1                      # a result without frames: seq ts ifindex verdict
STANDIN = 1 << 26        # bytes of the stand-in ring the transport's receiver validates on


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


def standin_ring():
    """What ``pk_from`` and ``FrameRing.batch`` read of a ring: its buffer and size
    (zeros from calloc: no page is touched, nothing reads the frames)."""
    return types.SimpleNamespace(buf=np.zeros(STANDIN, np.uint8), size=STANDIN)


def receiver(ring):
    """What the pool's receivers do with a message, as a function of the frames: an
    array message decoded and its Packets validated (``pk_from`` on the ring: BATCH,
    STEP, RESULT), or the input batch's arrays (the dispatcher process's
    ``FrameRing.batch``); a one-frame message decoded."""
    from workers import messages as M
    from workers.pool import pk_from
    from workers.ring import FrameRing

    def receive(frames):
        if len(frames) == 1:
            return M.decode(frames[0])
        h, a = M.decode_arrays(frames)
        if "hashes" in a:
            pk_from("", a, ring)
        else:
            FrameRing.batch(ring, a["off"], a["length"], a["ifindex"], a["ts"])
        return h
    return receive


def idle_step():
    """(builder, 0): an idle STEP as a worker sends one (no arrays: one frame)."""
    from shardct.shard import NEVER
    from workers import messages as M

    def build():
        return M.encode_arrays(M.STEP, {}, **{"from": 0}, round=1, step=0, active=False,
                               low=NEVER, gen=0)
    return build, 0


def peer(endpoint_in: str, endpoint_out: str):
    """The second process: receives streams (and acknowledges each with its CPU time)
    and answers ping-pong messages with an idle STEP of its own."""
    import zmq
    receive = receiver(standin_ring())
    step = idle_step()[0]
    ctx = zmq.Context()
    rx, tx, poller = sockets(ctx, endpoint_in, endpoint_out, bind=False)
    tx.send(b"ready")
    while True:
        cmd = json.loads(rx.recv())
        if cmd["op"] == "stop":
            break
        c0 = time.process_time()
        for _ in range(cmd["k"]):
            if cmd["op"] == "pingpong":
                while not poller.poll(20):       # as a worker waits for a superstep
                    pass
            receive(rx.recv_multipart(copy=False))
            if cmd["op"] == "pingpong":
                tx.send_multipart(step(), copy=False)
        tx.send(json.dumps({"cpu": time.process_time() - c0}).encode())
    rx.close(0)
    tx.close(0)
    ctx.term()


def batch_message(p: int, frame_bytes: int):
    """(builder, bytes of arrays) of a BATCH of p packets as the dispatcher sends one to
    a worker: its frames in the ring, so only the 8 per-packet arrays."""
    from shardct.batch import PacketBatch
    from shardct.shard import Packets
    from workers import messages as M
    from workers.pool import pk_arrays
    b = PacketBatch(np.zeros(0, np.uint8), np.arange(p, dtype=np.int64) * frame_bytes,
                    np.full(p, frame_bytes, np.int32), np.zeros(p, np.int16),
                    np.arange(p, dtype=np.int64), True)
    pk = Packets(b, np.arange(p, dtype=np.int64), np.arange(p, dtype=np.int64),
                 np.zeros(p, np.int64), np.full(p, -1, np.int64))

    def build():
        return M.encode_arrays(M.BATCH, pk_arrays("", pk), round=1, first=0, final=False,
                               dump=False, delete=None, save=None, events=False, clock=0)
    return build, p * PK_ARRAYS


def input_message(p: int, frame_bytes: int):
    """(builder, bytes of arrays) of an input batch of p frames as the supervisor sends
    one to the dispatcher process (the frames are in the ring)."""
    from workers import messages as M
    arrays = {"off": np.arange(p, dtype=np.int64) * frame_bytes,
              "length": np.full(p, frame_bytes, np.int32), "ifindex": np.zeros(p, np.int16),
              "ts": np.arange(p, dtype=np.int64)}

    def build():
        return M.encode_arrays(M.BATCH, arrays, seq=1, events=False)
    return build, p * IN_ARRAYS


def summary_fit(rows, key):
    """Two figures for a table of message costs: per message (the smallest message's
    cost) and per KB of arrays (the slope between the two largest). The model itself
    interpolates between the measured sizes: below ~2048 packets the arrays are packed
    (copied) into one frame, above they go as frames of their own, and the cost per byte
    is not one line across that."""
    a, b = rows[-2], rows[-1]
    return {"per_msg_us": rows[0][key],
            "per_kb_us": (b[key] - a[key]) / max(1, b["bytes"] - a["bytes"]) * 1024}


def measure_transport(frame_bytes: int, budget: float, pingpongs: int,
                      sizes=(1, 8, 64, 512, 2048, 4096, 16384, 65536),
                      in_sizes=(512, 4096, 65536)) -> dict:
    """Stream and ping-pong over ipc to a peer process (``budget``: seconds per size and
    repetition)."""
    import zmq
    tmp = tempfile.mkdtemp(prefix="shardct-model-")
    e_out, e_in = f"ipc://{tmp}/to-peer", f"ipc://{tmp}/from-peer"
    ctx = zmq.Context()
    rx, tx, poller = sockets(ctx, e_in, e_out, bind=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--peer", e_out, e_in],
                            env=env)
    receive = receiver(standin_ring())
    step = idle_step()[0]
    out = {"frame_bytes": frame_bytes}
    try:
        if not rx.poll(60_000):
            raise RuntimeError("transport peer did not start")
        rx.recv()

        def stream(kind, p):
            make = {"batch": batch_message, "input": input_message,
                    "empty": lambda p, fb: idle_step()}[kind]
            build, nbytes = make(p, frame_bytes)
            k, best = 4, None
            for _ in range(3):
                tx.send(json.dumps({"op": "stream", "k": k}).encode())
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(k):
                    tx.send_multipart(build(), copy=False)
                ack = json.loads(rx.recv())
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = {"kind": kind, "p": p, "bytes": nbytes, "k": k,
                       "wall_us": wall / k * 1e6, "send_cpu_us": cpu / k * 1e6,
                       "recv_cpu_us": ack["cpu"] / k * 1e6}
                if best is None or row["wall_us"] < best["wall_us"]:
                    best = row
                k = int(min(200_000, max(4, k * budget / max(wall, 1e-6))))
            return best

        out["batch"] = [stream("batch", p) for p in sizes]
        out["input"] = [stream("input", p) for p in in_sizes]
        out["empty"] = stream("empty", 0)
        for kind in ("batch", "input"):
            for key in ("wall_us", "send_cpu_us", "recv_cpu_us"):
                out[f"{kind}_{key[:-3]}"] = summary_fit(out[kind], key)
        # ping-pong of an idle STEP: each end receives, decodes and sends its own
        tx.send(json.dumps({"op": "pingpong", "k": pingpongs}).encode())
        rtts = np.empty(pingpongs)
        c0 = time.process_time()
        for i in range(pingpongs):
            t0 = time.perf_counter()
            tx.send_multipart(step(), copy=False)
            while not poller.poll(20):
                pass
            receive(rx.recv_multipart(copy=False))
            rtts[i] = time.perf_counter() - t0
        cpu_me = time.process_time() - c0
        ack = json.loads(rx.recv())
        out["pingpong"] = {"k": pingpongs, "rtt_median_us": float(np.median(rtts) * 1e6),
                           "rtt_p10_us": float(np.percentile(rtts, 10) * 1e6),
                           "rtt_p90_us": float(np.percentile(rtts, 90) * 1e6),
                           "cpu_per_rtt_us": (cpu_me + ack["cpu"]) / pingpongs * 1e6}
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
    """The transport's measured CPU costs, in seconds, as functions of a message's bytes
    of arrays: piecewise linear between the sizes measured (the smallest's cost below
    it, the last segment's slope beyond the largest)."""

    def __init__(self, t: dict):
        self.t = t

        def curve(rows, key):
            x = np.array([r["bytes"] for r in rows], float)
            y = np.array([r[key] for r in rows], float) * 1e-6
            slope = (y[-1] - y[-2]) / max(1.0, x[-1] - x[-2])

            def cost(nbytes):
                if nbytes > x[-1]:
                    return float(y[-1] + (nbytes - x[-1]) * slope)
                return float(np.interp(nbytes, x, y))
            return cost
        self.send = curve(t["batch"], "send_cpu_us")      # a BATCH, STEP or RESULT sent
        self.recv = curve(t["batch"], "recv_cpu_us")      # received, decoded, pk_from
        self.send_input = curve(t["input"], "send_cpu_us")
        self.recv_input = curve(t["input"], "recv_cpu_us")
        self.empty_send = t["empty"]["send_cpu_us"] * 1e-6
        self.empty_recv = t["empty"]["recv_cpu_us"] * 1e-6
        self.empty = self.empty_send + self.empty_recv
        # what a one-way trip costs beyond the two ends' CPU: waking up the receiver
        self.latency = max(0.0, t["pingpong"]["rtt_median_us"] / 2 * 1e-6 - self.empty)


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


def on_ring(batch):
    """The trace's frames on a buffer of their own, marked ``shared`` as the pool's frame
    ring is: take/concat/frames_in_order give views, only arrays travel. A fresh copy
    for each run (the workers may rewrite frames where they lie)."""
    from shardct.batch import PacketBatch
    return PacketBatch(batch.buf.copy(), batch.off, batch.length, batch.ifindex, batch.ts, True)


def inputs(batch, s: int, e: int):
    """Frames s..e of a shared batch as the pool's input batches of INPUT frames (views
    on the same buffer, as FrameRing.batch gives the dispatcher)."""
    from shardct.batch import PacketBatch
    for a in range(s, e, INPUT):
        b = min(e, a + INPUT)
        yield PacketBatch(batch.buf, batch.off[a:b], batch.length[a:b], batch.ifindex[a:b],
                          batch.ts[a:b], True)


def pk_bytes(pk) -> int:
    """Bytes of a Packets' arrays in a message (its frames too unless they are in the
    ring)."""
    if not len(pk):
        return 0
    b = pk.batch
    return int((0 if b.shared else b.buf.nbytes)
               + sum(a.nbytes for a in (b.off, b.length, b.ifindex, b.ts, pk.hashes, pk.seq,
                                        pk.given, pk.dep)))


def msg_bytes(m) -> int:
    return int(m.rel.nbytes + m.req.nbytes + m.ans.nbytes + pk_bytes(m.ho) + pk_bytes(m.bo))


DISPATCHER_PARTS = {"parse_hash": ("wire", "parse_hash_batch"),
                    "deps": ("shard", "answer_deps"),
                    "owners": ("shard", "owners"),
                    "split": ("shard", "round_rows"),
                    "views": ("shard", "frames_in_order")}


def measure_dispatcher(trace_batch, cfg, shards, max_round, reps, warm):
    """ns/packet of Dispatcher.rounds consumed fully over input batches of INPUT frames
    (the first ``warm`` frames untimed), and of its parts. The work is the same in every
    repetition, so each round's time (and each part's) is the least over ``reps`` runs:
    other processes on this VM then disturb the figure less."""
    from shardct import shard as S
    from shardct import wire
    mods = {"wire": wire, "shard": S}
    rows = []
    batch = on_ring(trace_batch)
    m = len(batch) - warm
    for n in shards:
        runs = []
        for _ in range(reps):
            parts_t = {k: [] for k in DISPATCHER_PARTS}
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
            for key, (mod, name) in DISPATCHER_PARTS.items():
                pt.wrap(mods[mod], name, timer(key))
            try:
                d = S.Dispatcher(n, cfg, SEED, max_round)
                for b in inputs(batch, 0, warm):
                    for _ in d.rounds(b):
                        pass
                for v in parts_t.values():
                    v.clear()
                out_bytes, per_round = 0, []
                for b in inputs(batch, warm, len(batch)):
                    it = d.rounds(b)
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
        for k in DISPATCHER_PARTS:
            row[k] = np.min([r[1][k] for r in runs], axis=0).sum() / m * 1e9
        row["rest"] = row["ns"] - sum(row[k] for k in DISPATCHER_PARTS)
        rows.append(row)
    return rows


def measure_put(trace_batch, reps) -> float:
    """ns/packet of FrameRing.put: the supervisor copying input batches of INPUT frames
    into a real ring (the pool's default size), the least of ``reps`` passes."""
    from workers.pool import DEFAULT_RING
    from workers.ring import FrameRing
    ring = FrameRing.create(DEFAULT_RING)
    best = float("inf")
    try:
        chunks = list(inputs(trace_batch, 0, len(trace_batch)))
        ring.release(ring.put(chunks[0])[1])        # untimed: loads the copy kernel
        for _ in range(reps):
            t = 0.0
            for b in chunks:
                t0 = time.perf_counter()
                _, ticket = ring.put(b)
                t += time.perf_counter() - t0
                ring.release(ticket)
            best = min(best, t)
    finally:
        ring.unlink()
    return best / len(trace_batch) * 1e9


def run_workers(trace_batch, cfg, n, max_round, warm):
    """Drive LocalPool(n) round by round (input batches of INPUT frames on a shared
    buffer; the first ``warm`` frames untimed) with every Shard call timed per shard:
    per measured round the compute segments between barriers (superstep j: rows;
    shards: columns), bytes each shard sent and received per superstep, the sink's
    reorder with and without frames."""
    from shardct.batch import compact
    from shardct.shard import LocalPool, Packets, Shard, run_round, sum_counts
    lp = LocalPool(n, cfg, seed=SEED, max_round=max_round)
    batch = on_ring(trace_batch)
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

    pt = Patch()
    for name in ("local", "outbox", "step", "results"):
        pt.wrap(Shard, name, timed(name))
    rounds = []

    def all_rounds():
        for b in inputs(batch, 0, warm):
            for parts, _ in lp.dispatcher.rounds(b):
                yield parts, False
        for b in inputs(batch, warm, len(batch)):
            for parts, _ in lp.dispatcher.rounds(b):
                yield parts, True
    try:
        for parts, timed_round in all_rounds():
            calls.clear()
            steps = run_round(lp.shards, parts)
            res = [sh.results() for sh in lp.shards]
            reap = []
            for sh in lp.shards:
                t0 = time.perf_counter()
                sh.reap_until(max(sh.now, lp.dispatcher.clock))
                reap.append(time.perf_counter() - t0)
            # the sink: the round back in input order, the frames copied out of the ring
            # for emit (Pool._emit_ready)
            t0 = time.perf_counter()
            pk = Packets.concat([p for p, _ in res])
            v = np.concatenate([v for _, v in res])
            order = np.argsort(pk.seq, kind="stable")
            out = pk.take(order)
            v[order]
            compact(out.batch)
            reorder = time.perf_counter() - t0
            # the same for results without frames (Pool(frames=False))
            nf = [Packets.framesless(p.seq, p.batch.ts, p.batch.ifindex) for p, _ in res]
            t0 = time.perf_counter()
            pk_nf = Packets.concat(nf)
            v_nf = np.concatenate([x for _, x in res])
            order = np.argsort(pk_nf.seq, kind="stable")
            pk_nf.take(order), v_nf[order]
            reorder_nf = time.perf_counter() - t0
            if not timed_round:
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
            rounds.append(dict(packets=sum(len(p) for p in parts), steps=steps, seg=seg,
                               sent=sent, recv=recv, reorder=reorder, reorder_nf=reorder_nf,
                               msgs=msgs, nonempty=nonempty,
                               in_bytes=sum(pk_bytes(p) for p in parts),
                               out_bytes=pk_bytes(pk) + len(v)))
    finally:
        pt.undo()
    counts = sum_counts(sh.counts for sh in lp.shards)
    return rounds, counts, lp.dispatcher.seq


def measure_workers(trace_batch, cfg, n, max_round, warm, reps):
    """run_workers ``reps`` times; the runs do the same work, so each compute segment of
    each shard (and each round's reorder) is the least over the runs."""
    runs = [run_workers(trace_batch, cfg, n, max_round, warm) for _ in range(reps)]
    rr, counts, seq = runs[0]
    for other, _, _ in runs[1:]:
        for r, o in zip(rr, other):
            if r["seg"].shape != o["seg"].shape:
                raise AssertionError("LocalPool runs differ in supersteps")
            r["seg"] = np.minimum(r["seg"], o["seg"])
            r["reorder"] = min(r["reorder"], o["reorder"])
            r["reorder_nf"] = min(r["reorder_nf"], o["reorder_nf"])
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
        "round_packets": P / R,                        # packets in a measured round
        "steps_per_round": tot("steps") / R,
        "cp_ns": tot("cp") / P * 1e9,                  # compute on the critical path
        "mean_ns": tot("total") / n / P * 1e9,         # per shard if perfectly balanced
        "busiest_ns": tot("busiest") / P * 1e9,        # the busiest shard's own compute
        "total_ns": tot("total") / P * 1e9,            # all shards' compute together
        "reorder_ns": tot("reorder") / P * 1e9,        # the sink, frames copied out
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

def superstep_comm(w: dict, link: Link) -> float:
    """Seconds per round a worker spends on supersteps' transport (not its compute):
    per superstep the latency and its idle messages to and from n-1 peers, and its
    non-empty ones, each of the busiest shard's bytes shared out over them."""
    n = w["n"]
    if n == 1:
        return 0.0             # no peers: no message, no wait
    frac = w["nonempty_frac"]
    steps = w["steps_per_round"]
    full = steps * (n - 1) * frac            # non-empty messages a shard sends a round
    idle = steps * (n - 1) * (1 - frac) * link.empty
    if full < 1e-9:
        return steps * link.latency + idle
    return (steps * link.latency + idle
            + full * link.send(w["busiest_send_per_round"] / full)
            + full * link.recv(w["busiest_recv_per_round"] / full))


def predict(w: dict, d_ns: float, put_ns: float, link: Link, frames: bool = True,
            batch: int = INPUT) -> dict:
    """Seconds per round of each stage (a process each, the default pool) for worker
    row w, dispatcher d_ns and ring copy put_ns ns/packet. ``frames=False``: results
    carry seq, ts, ifindex and verdict only and the sink copies no frame out (the
    workers' compute is still that measured with frames)."""
    n, R = w["n"], w["round_packets"]
    share = R * w["in_bytes_per_pkt"] / n
    res = R * (w["out_bytes_per_pkt"] if frames else RES_NF) / n
    f = R / batch                                   # of an input batch per round
    D = (R * d_ns * 1e-9 + f * link.recv_input(batch * IN_ARRAYS) + n * link.send(share)
         + link.empty_send + link.empty_recv)
    reorder = w["reorder_ns"] if frames else w["reorder_nf_ns"]
    S = (R * put_ns * 1e-9 + f * link.send_input(batch * IN_ARRAYS) + n * link.recv(res)
         + link.empty_recv + link.empty_send + R * reorder * 1e-9)
    cp = R * w["cp_ns"] * 1e-9
    comm = superstep_comm(w, link)
    io = link.recv(share) + link.send(res)
    W = cp + comm + io
    stages = {"dispatcher": D, "workers": W, "supervisor": S}
    # the in-process dispatcher (Pool(dispatcher_process=False)): D and S in one
    DS = (R * (d_ns + put_ns + reorder) * 1e-9 + n * link.send(share) + n * link.recv(res))
    return {"n": n, "R": w["R"], "Rp": R, "D": D, "W": W, "S": S, "DS": DS,
            "W_compute": cp, "W_comm": comm, "W_io": io,
            "mpps": R / max(D, W, S) / 1e6, "inproc_mpps": R / max(DS, W) / 1e6, "limit": max(stages, key=stages.get)}


def on_cores(stage_s: list[float], R: float, cores: int) -> float:
    """Mpps of processes taking stage_s seconds per round each on ``cores`` cores: no
    faster than the slowest, nor than the cores can give all of them."""
    return R / max(max(stage_s), sum(stage_s) / cores) / 1e6


def proc_cpu(pid: int) -> float:
    """CPU seconds of process pid so far, every thread: from each thread's schedstat
    (nanoseconds on a CPU), else from /proc/pid/stat (user + system, 10 ms ticks)."""
    try:
        total = 0
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        return total * 1e-9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_pool(tr, cfg, w1: dict, d_ns: float, put_ns: float, link: Link,
               dispatcher_process: bool, window: int = 8) -> dict:
    """The real pool with 1 worker on trace ``tr`` (input batches of INPUT frames, rounds
    of w1's R, results with frames, emitted), each process's CPU from /proc, beside the
    model. The first quarter of the batches is fed untimed. Rates: over the whole timed
    feed (the pipeline fills and drains in it), and steady, between the first round
    emitted and the last one emitted before the input ran out of rounds for the window
    (``window`` rounds from the end)."""
    from shardct.batch import take
    from workers.pool import Pool
    b = tr.batch
    chunk = min(INPUT, len(b) // 4)          # at least 3 input batches timed
    parts = [take(b, np.arange(s, min(len(b), s + chunk))) for s in range(0, len(b), chunk)]
    pool = Pool(1, cfg, seed=SEED, log=lambda *_: None, dispatcher_process=dispatcher_process,
                max_round=w1["R"], window=window)
    emits = []

    def emit(pk, v):
        emits.append((time.perf_counter(), len(v)))
    pool.start()
    try:
        pool.wait_ready()
        warm = max(1, len(parts) // 4)      # untimed, as in the stages' measurement
        pool.feed(parts[:warm], emit, timeout_s=300)
        emits.clear()
        pids = [p.pid for p in pool.sup.procs]
        c0, p0, t0 = time.process_time(), [proc_cpu(p) for p in pids], time.perf_counter()
        pool.feed(parts[warm:], emit, timeout_s=300)
        dt = time.perf_counter() - t0
        cpu_sup = time.process_time() - c0
        cpu = [proc_cpu(p) - c for p, c in zip(pids, p0)]
    finally:
        pool.stop()
    p = predict(w1, d_ns, put_ns, link, batch=chunk)
    got = sum(n for _, n in emits)
    m, R = max(1, got), p["Rp"]
    last = len(emits) - 1 - window
    steady = (sum(n for _, n in emits[1:last + 1]) / (emits[last][0] - emits[0][0]) / 1e6
              if last >= 2 else None)
    out = {"dispatcher_process": dispatcher_process, "packets": got, "batch": chunk,
           "rounds": len(emits), "mpps": got / dt / 1e6, "steady_mpps": steady,
           "steady_rounds": max(0, last), "sup_cpu_ns": cpu_sup * 1e9 / m,
           "worker_cpu_ns": cpu[0] * 1e9 / m, "model_worker_ns": p["W"] * 1e9 / R}
    cores = os.cpu_count() or 1
    if dispatcher_process:
        out.update(disp_cpu_ns=cpu[1] * 1e9 / m, model_disp_ns=p["D"] * 1e9 / R,
                   model_sup_ns=p["S"] * 1e9 / R,
                   model_mpps=on_cores([p["D"], p["W"], p["S"]], R, cores))
    else:
        out.update(model_sup_ns=p["DS"] * 1e9 / R, model_mpps=on_cores([p["DS"], p["W"]], R,
                                                                        cores))
    return out


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    ap.add_argument("--tiny", action="store_true",
                    help="toy sizes: checks that it runs (the figures mean nothing)")
    ap.add_argument("--profiles", default="2k,20k")
    ap.add_argument("--shards", default="1,2,4,6,8,14,16",
                    help="worker counts (6 and 14: 8 and 16 cores with dispatcher and "
                    "supervisor)")
    ap.add_argument("--rounds", default=None,
                    help="round sizes R (default 4096,16384,65536; --quick 4096,65536)")
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
    size = "tiny" if a.tiny else "quick" if a.quick else "full"
    rsizes = [int(x) for x in (a.rounds or {"full": "4096,16384,65536",
                                            "quick": "4096,65536",
                                            "tiny": "1024"}[size]).split(",")]
    names = a.profiles.split(",")
    sizes = {"full": {"2k": 600_000, "20k": 1_000_000}, "quick": {"2k": 200_000, "20k": 300_000},
             "tiny": {"2k": 5_000, "20k": 5_000}}[size]
    reps_d, reps_w = {"full": (3, 2), "quick": (2, 1), "tiny": (1, 1)}[size]
    budget, pingpongs = {"full": (0.25, 2000), "quick": (0.1, 300), "tiny": (0.01, 20)}[size]
    check_packets = {"full": 2_000_000, "quick": 600_000, "tiny": 8_000}[size]
    warm_frac = 0.25
    print(f"bench/model.py: shards {shards}, rounds {rsizes}, profiles {names} ({size}); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    Shard.warm()
    result = {"profiles": {}, "load_start": os.getloadavg(), "rounds": rsizes,
              "shards": shards}

    traces = {}
    for name in names:
        tr = P.profile(name, a.packets or sizes.get(name, 200_000), seed=3)
        traces[name] = tr
        b = tr.batch
        print(f"profile {name}: {len(b)} frames, {len(tr.proto)} flows, median "
              f"{tr.concurrency():.0f} open, {b.buf.nbytes / len(b):.0f} B/frame")

    frame_bytes = int(np.mean([t.batch.buf.nbytes / len(t.batch) for t in traces.values()]))
    print("\n== transport: ZeroMQ ipc PUSH/PULL to a second process; messages built and taken "
          f"apart as the pool does (frames of {frame_bytes} B in the ring: BATCH {PK_ARRAYS} "
          f"B of arrays a packet, input batch {IN_ARRAYS} B; arrays under 16 KiB packed into "
          "one frame), best of 3")
    tr_res = measure_transport(frame_bytes, budget, pingpongs)
    result["transport"] = tr_res
    print(f"{'message':>14} {'array bytes':>11} {'msgs':>7} {'wall us/msg':>12} "
          f"{'send CPU us':>12} {'recv CPU us':>12} {'wall MB/s':>10}")
    for r in tr_res["batch"] + tr_res["input"] + [tr_res["empty"]]:
        mbps = r["bytes"] / r["wall_us"] if r["p"] else 0
        label = "idle STEP" if r["kind"] == "empty" else f"{r['kind']} {r['p']}"
        print(f"{label:>14} {r['bytes']:>11} {r['k']:>7} {r['wall_us']:>12.1f} "
              f"{r['send_cpu_us']:>12.1f} {r['recv_cpu_us']:>12.1f} {mbps:>10.0f}")
    for key in ("batch_wall", "batch_send_cpu", "batch_recv_cpu", "input_send_cpu",
                "input_recv_cpu"):
        f = tr_res[key]
        print(f"{key:>15}: {f['per_msg_us']:6.1f} us for the smallest message, "
              f"{f['per_kb_us']:6.3f} us/KB between the two largest")
    print("(the model interpolates between the sizes measured: the cost per KB is not one "
          "line from packed to zero-copy arrays)")
    link = Link(tr_res)
    pp = tr_res["pingpong"]
    print(f"ping-pong (idle STEP, polled as the workers do): RTT median "
          f"{pp['rtt_median_us']:.1f} us (p10 {pp['rtt_p10_us']:.1f}, p90 "
          f"{pp['rtt_p90_us']:.1f}), CPU of both ends {pp['cpu_per_rtt_us']:.1f} us per RTT")
    print(f"=> one-way latency beyond the ends' CPU {link.latency * 1e6:.1f} us; idle message "
          f"send+recv CPU {link.empty * 1e6:.1f} us")

    for name in names:
        tr = traces[name]
        b = tr.batch
        warm = int(warm_frac * len(b))
        cfg = Config(max_conns=max(65536, 2 * len(tr.proto)), events=False)
        res = {"dispatcher": {}, "workers": [], "predictions": []}
        result["profiles"][name] = res
        print(f"\n===== profile {name}")
        res["put_ns"] = put_ns = measure_put(b, reps_d)
        print(f"== supervisor: FrameRing.put (input frames into the ring, {INPUT} a batch) "
              f"{put_ns:.0f} ns/packet")
        for R in rsizes:
            rows = measure_dispatcher(b, cfg, shards, R, reps_d, warm)
            res["dispatcher"][R] = rows
            print(f"== dispatcher, R={R}, input batches of {INPUT} (each round the best of "
                  f"{reps_d}), ns/packet")
            print(f"{'n':>3} {'total':>7} {'parse+hash':>10} {'deps':>6} {'owners':>6} "
                  f"{'split':>6} {'views':>6} {'rest':>6} {'B out/pkt':>9}")
            for r in rows:
                print(f"{r['n']:>3} {r['ns']:>7.0f} {r['parse_hash']:>10.0f} {r['deps']:>6.0f} "
                      f"{r['owners']:>6.0f} {r['split']:>6.0f} {r['views']:>6.0f} "
                      f"{r['rest']:>6.0f} {r['out_bytes_per_pkt']:>9.0f}")
        for R in rsizes:
            print(f"== workers, R={R}, the first {warm_frac:.0%} of frames untimed, best of "
                  f"{reps_w} per segment: ns per packet of the round's compute (on the "
                  "critical path, if balanced, busiest shard's, all shards'); per shard per "
                  "superstep: messages, share non-empty, KB sent; per packet: handoffs, "
                  "reservations; the sink's reorder with frames (copied out of the ring) "
                  "and without")
            print(f"{'n':>3} {'rounds':>6} {'crit.path':>9} {'balanced':>8} {'busiest':>7} "
                  f"{'all':>6} {'steps/rd':>8} {'msgs':>4} {'nonempty':>8} "
                  f"{'KB/step':>8} {'handoff':>7} {'reserve':>7} {'reorder':>7} {'no fr.':>6}")
            for n in shards:
                w = measure_workers(b, cfg, n, R, warm, reps_w)
                res["workers"].append(w)
                print(f"{n:>3} {w['rounds']:>6} {w['cp_ns']:>9.0f} "
                      f"{w['mean_ns']:>8.0f} {w['busiest_ns']:>7.0f} {w['total_ns']:>6.0f} "
                      f"{w['steps_per_round']:>8.2f} {w['msgs_per_step']:>4} "
                      f"{w['nonempty_frac']:>8.2f} {w['kb_sent_per_step']:>8.1f} "
                      f"{w['handoff_ratio']:>7.3f} {w['reserve_ratio']:>7.3f} "
                      f"{w['reorder_ns']:>7.0f} {w['reorder_nf_ns']:>6.0f}")
        print("== model (results with frames): us per round per stage, each on a core of its "
              "own; caps R/stage in Mpps; Mpps = R / max(D, W, S); 'inproc': the dispatcher "
              "in the supervisor (n + 1 cores)")
        print(f"{'R':>6} {'n':>3} {'cores':>5} {'D':>6} {'W':>6} {'=comp':>6} {'+comm':>6} "
              f"{'+io':>5} {'S':>6} {'D cap':>6} {'W cap':>6} {'S cap':>6} {'Mpps':>6} "
              f"{'inproc':>6}  limit")
        for w in res["workers"]:
            d_ns = next(r["ns"] for r in res["dispatcher"][w["R"]] if r["n"] == w["n"])
            p = predict(w, d_ns, put_ns, link)
            res["predictions"].append(p)
            R = p["Rp"]
            print(f"{w['R']:>6} {w['n']:>3} {w['n'] + 2:>5} {p['D'] * 1e6:>6.0f} "
                  f"{p['W'] * 1e6:>6.0f} {p['W_compute'] * 1e6:>6.0f} {p['W_comm'] * 1e6:>6.0f} "
                  f"{p['W_io'] * 1e6:>5.0f} {p['S'] * 1e6:>6.0f} {R / p['D'] / 1e6:>6.2f} "
                  f"{R / p['W'] / 1e6:>6.2f} {R / p['S'] / 1e6:>6.2f} {p['mpps']:>6.2f} "
                  f"{p['inproc_mpps']:>6.2f}  {p['limit']}")
        if not a.no_check and 1 in shards:
            R = rsizes[-1]
            w1 = next(w for w in res["workers"] if w["n"] == 1 and w["R"] == R)
            d_ns = next(r["ns"] for r in res["dispatcher"][R] if r["n"] == 1)
            res["checks"] = []
            tc = P.profile(name, check_packets, seed=4)    # longer: rounds past the window
            cfg_c = Config(max_conns=max(65536, 2 * len(tc.proto)), events=False)
            print(f"== checks on {name}, {len(tc.batch)} frames (seed 4)")
            for dp in (False, True):
                try:
                    c = check_pool(tc, cfg_c, w1, d_ns, put_ns, link, dp)
                except Exception as e:          # the pool is someone else's moving part
                    print(f"== check skipped: the real pool failed: {type(e).__name__}: {e}")
                    res["checks"].append({"dispatcher_process": dp,
                                          "error": f"{type(e).__name__}: {e}"})
                    continue
                res["checks"].append(c)
                cores = os.cpu_count()
                rate = (f"{c['mpps']:.2f} Mpps over the timed feed ({c['rounds']} rounds), "
                        + (f"{c['steady_mpps']:.2f} steady ({c['steady_rounds']} rounds)"
                           if c["steady_mpps"] else "too few rounds for a steady rate"))
                if dp:
                    print(f"== check (b), R={R}: workers.pool.Pool(1) as it runs by default: "
                          f"supervisor, dispatcher and worker, 3 processes on {cores} cores "
                          "shared with whatever else runs")
                    print(f"   measured {rate}; CPU ns/packet: supervisor "
                          f"{c['sup_cpu_ns']:.0f}, dispatcher {c['disp_cpu_ns']:.0f}, worker "
                          f"{c['worker_cpu_ns']:.0f} (/proc, every thread)")
                    print(f"   model    {c['model_mpps']:.2f} Mpps on {cores} cores; CPU "
                          f"ns/packet: supervisor {c['model_sup_ns']:.0f}, dispatcher "
                          f"{c['model_disp_ns']:.0f}, worker {c['model_worker_ns']:.0f}")
                else:
                    print(f"== check (a), R={R}: workers.pool.Pool(1, dispatcher_process="
                          f"False): dispatcher and sink in the supervisor, 2 processes on "
                          f"{cores} cores shared with whatever else runs")
                    print(f"   measured {rate}; CPU ns/packet: supervisor "
                          f"{c['sup_cpu_ns']:.0f}, worker {c['worker_cpu_ns']:.0f} (/proc, "
                          "every thread)")
                    print(f"   model    {c['model_mpps']:.2f} Mpps; CPU ns/packet: supervisor "
                          f"{c['model_sup_ns']:.0f}, worker {c['model_worker_ns']:.0f}")

    def pred(res, n, R):
        return next(p for p in res["predictions"] if p["n"] == n and p["R"] == R)

    def no_frames(res, n, R):
        w = next(w for w in res["workers"] if w["n"] == n and w["R"] == R)
        d_ns = next(r["ns"] for r in res["dispatcher"][R] if r["n"] == n)
        p = predict(w, d_ns, res["put_ns"], link, frames=False)
        res.setdefault("predictions_no_frames", []).append(p)
        return f"{p['mpps']:.2f} ({p['limit']})"

    def factors(res):
        """measured / modelled CPU of each process in check (b), if it ran"""
        c = next((c for c in res.get("checks", []) if c.get("dispatcher_process")
                  and "mpps" in c), None)
        if c is None:
            return None
        return {"dispatcher": c["disp_cpu_ns"] / c["model_disp_ns"],
                "workers": c["worker_cpu_ns"] / c["model_worker_ns"],
                "supervisor": c["sup_cpu_ns"] / c["model_sup_ns"]}

    def with_frames(res, n, R):
        p = pred(res, n, R)
        cell = f"{p['mpps']:.2f} ({p['limit']})"
        f = factors(res)
        if f:
            cal = {"dispatcher": p["D"] * f["dispatcher"], "workers": p["W"] * f["workers"],
                   "supervisor": p["S"] * f["supervisor"]}
            lim = max(cal, key=cal.get)
            p["calibrated_mpps"], p["calibrated_limit"] = p["Rp"] / cal[lim] / 1e6, lim
            cell += f" [{p['calibrated_mpps']:.2f} {lim[0]}]"
        return cell

    def summary(title, cell, width):
        print(title)
        print(f"{'n':>3} {'cores':>5}"
              + "".join(f"{f'{nm} R={R}':>{width}}" for nm in names for R in rsizes))
        for n in shards:
            cells = [cell(result["profiles"][nm], n, R) for nm in names for R in rsizes]
            print(f"{n:>3} {n + 2:>5}" + "".join(f"{c:>{width}}" for c in cells))

    summary("\n== predictions, results without frames (Pool(frames=False): bench/pool.py, "
            "watching, replay without -w): Mpps (limiting stage)", no_frames, 22)
    checked = any(factors(r) for r in result["profiles"].values())
    summary("\n== predictions: Mpps (limiting stage) with n workers on n + 2 cores, results "
            "with frames (the default)"
            + ("; [in brackets: each stage's cost times what check (b) found its process "
               "spends beyond the model]" if checked else ""), with_frames, 30)
    result["load_end"] = os.getloadavg()
    print(f"\n(D dispatcher; W one worker = compute on the critical path + superstep latency, "
          f"messages and bytes + its batch in and results out; S supervisor: ring copy, "
          f"input to the dispatcher, results in, reorder. Load average at the end "
          f"{os.getloadavg()[0]:.2f}; {time.perf_counter() - t_start:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
