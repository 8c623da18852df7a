# The worker pool over ZeroMQ: the dispatcher and the sink (in the supervisor's process)
# and the shard workers (one process each), moving shard.py's rounds and supersteps as
# array messages. The protocol itself lives in shardct/shard.py; this is its transport.
"""Worker pool.

Sockets (endpoints are configuration: ``ipc://`` on one host by default, ``tcp://``
across hosts; see :func:`endpoints`)::

    dispatcher --PUSH--> shard-k (PULL, bound by worker k)     BATCH {round, n}: Packets
    worker j   --PUSH--> peer-k  (PULL, bound by worker k)     STEP {round, step, from,
                                                               active, gen}: Msg arrays
    worker k   --PUSH--> sink    (PULL, bound by the pool)     RESULT {round, worker, gen}
    worker k   --PUSH--> sink, every peer                      HELLO {worker, gen, first}

Per round every worker gets exactly one BATCH (maybe empty); it runs ``Shard.local``,
then supersteps: send one STEP to every peer, wait for one STEP from every peer, run
``Shard.step``; when a superstep was silent everywhere it sends its RESULT (every packet
it finished this round, with verdicts) and takes the next round. The sink emits a round
once every worker's RESULT is in, in sequence order, so frames leave in input order.

Crash (a worker killed mid-round): the supervisor restarts it and the dispatcher tells
the new incarnation (HELLO on its shard socket) the first round f it will take: the
next one not yet dispatched. The worker says HELLO(f) to its peers and the sink. Peers then treat its STEP
messages for rounds before f as empty and fail the conns that were waiting on it; at
round f they drop their reply entries for its conns and reserve their own again
(``Shard.peer_restarted``). A peer that moved on to a later round never sends the
current one's remaining steps; receivers treat them as empty. The sink counts every
packet of a round that never came back as lost (``lost_packets``), and the conns the
dead worker had at its last heartbeat as ``lost_conns``.

With snapshots (``snapshot_interval``) the new incarnation starts from its shard's last
snapshot (``workers/snapshot.py``) and says so in its HELLO: peers then keep their
entries for its conns and only reserve their own again (``Shard.peer_restored``), it
reserves its cross-shard conns' reply tuples again, and the sink takes what it restored
off ``lost_conns`` (``restored_conns``).

Timeouts: the protocol inside a round has none; a superstep waits for every present
peer's message, and only a dead peer can withhold one. The supervisor sees a dead worker
at once (process exit) or after ``supervisor.DEAD_AFTER_S`` (10 s) without heartbeats
(every 0.2 s; a stalled worker prints its stack at 8 s); the restart's HELLO releases
whoever waited. ``Pool.feed(timeout_s=)`` bounds a whole run.

The dispatcher runs as a process of its own (``dispatcher_body``; ``dispatcher_process=
False`` keeps it in the supervisor's process, one hop less): the pool sends it batches on
``source``, it announces each round to the sink (ROUND), acknowledges each batch (ACK),
and the sink grants it room with ACK {emitted}. It is not restarted: its death stops the
pool with that reason (its place in the input died with it).

Backpressure: at most ``window`` rounds are in flight between the dispatcher and the
sink. Flow control needs no other waiting: a worker only ever waits for the current
superstep's messages, which every worker sends before it reads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from dataclasses import replace

import numpy as np
import zmq

from shardct import PacketBatch
from shardct.batch import compact
from shardct.config import Config
from shardct.frag import PoolStage
from shardct.icmp import RateLimiter
from shardct.scatter import SeqOrder
from shardct.shard import NEVER, Dispatcher, Msg, Packets, Shard, nat_deps, sum_counts

from . import messages as M
from . import snapshot
from . import transport as T
from .errors import PoolStopped
from .ring import FrameRing, frames_on
from .supervisor import Supervisor

STATS_EVERY = 64     # rounds between counter reports (and with the final table)
DEFAULT_RING = 256 << 20
GEN_MAX_BYTES = M.MAX_BUF // 8    # generated frames (ICMP errors) one RESULT carries at most
IDLE_WAIT_MS = 50    # feed(wake=): longest wait for a result or the source's descriptors


def tcp_endpoints(n: int, host: str, worker_host: str, port: int) -> dict:
    """Endpoints for a pool across hosts: the supervisor, dispatcher and sink listen on
    ``host``, the workers on ``worker_host``; ports from ``port`` up (4 + 2n of them).
    Without this every endpoint is ipc:// in a private directory. Anyone who reaches
    these ports can talk to the pool unless it runs with ``Pool(curve=DIR)``."""
    p = iter(range(port, port + 4 + 2 * n))
    eps = {"control": f"tcp://{host}:{next(p)}", "command": f"tcp://{host}:{next(p)}",
           "sink": f"tcp://{host}:{next(p)}", "source": f"tcp://{host}:{next(p)}"}
    for k in range(n):
        eps[f"shard-{k}"] = f"tcp://{worker_host}:{next(p)}"
        eps[f"peer-{k}"] = f"tcp://{worker_host}:{next(p)}"
    return eps


# ------------------------------------------------------------------ wire forms

def pk_arrays(prefix: str, pk: Packets) -> dict:
    """A ``shared`` batch's frames stay in the frame ring: only its arrays travel."""
    b = pk.batch
    return {**({} if b.shared else {f"{prefix}buf": b.buf}), f"{prefix}off": b.off,
            f"{prefix}length": b.length, f"{prefix}ifindex": b.ifindex, f"{prefix}ts": b.ts, f"{prefix}hashes": pk.hashes,
            f"{prefix}seq": pk.seq, f"{prefix}given": pk.given, f"{prefix}dep": pk.dep}


def pk_from(prefix: str, a: dict, ring: FrameRing | None = None) -> Packets:
    """Packets from received arrays, validated (raises WireError). Without a ``buf``
    array the frames are in ``ring``."""
    try:
        off, length = a[prefix + "off"], a[prefix + "length"]
        buf = a[prefix + "buf"] if ring is None else a.get(prefix + "buf", ring.buf)
        rest = [a[prefix + f] for f in ("ifindex", "ts", "hashes", "seq", "given", "dep")]
    except KeyError as e:
        raise M.WireError(f"missing array {e}") from None
    n = off.shape[0]
    want = (np.uint8, np.int64, np.int32, np.int16, np.int64, np.int64, np.int64, np.int64,
            np.int64)
    for arr, dt in zip([buf, off, length] + rest, want):
        if arr.dtype != dt or arr.ndim != 1:
            raise M.WireError(f"{prefix}: array of {arr.dtype}/{arr.ndim}d, want {np.dtype(dt)}")
    if any(x.shape[0] != n for x in [length] + rest):
        raise M.WireError(f"{prefix}: arrays of different lengths")
    if n and (off.min() < 0 or length.min() < 0
              or int((off + length.astype(np.int64)).max()) > buf.shape[0]):
        raise M.WireError(f"{prefix}: a frame lies outside the buffer")
    if ring is not None and buf is ring.buf:
        batch = PacketBatch(buf, off, length, rest[0], rest[1], True)
    else:
        batch = PacketBatch(buf.copy(), off, length, rest[0], rest[1])
    return Packets(batch, rest[2], rest[3], rest[4].copy(), rest[5])


def sizes_in(sizes, s: int, e: int) -> dict:
    """BATCH arrays ``fseq``/``fmax`` for round [s, e) of the pool's sequence numbers:
    the reassembled datagrams among them and their largest fragments (``sizes``: sorted
    (seq, fmax) arrays, or None; PoolStage.before)."""
    if sizes is None:
        return {}
    a, b = np.searchsorted(sizes[0], [s, e])
    return {} if a == b else {"fseq": sizes[0][a:b], "fmax": sizes[1][a:b]}


def sizes_from(a: dict):
    """The ``fseq``/``fmax`` arrays of a received message, validated, or None."""
    if "fseq" not in a:
        return None
    fs, fm = a["fseq"], a.get("fmax")
    if (fm is None or fs.dtype != np.int64 or fm.dtype != np.int64 or fs.ndim != 1
            or fs.shape != fm.shape):
        raise M.WireError("fseq/fmax: want two int64 arrays of one length")
    return fs, fm


def _within_limits(batches, max_bytes: int = M.MAX_BUF // 2):
    """Batches cut to what one message may carry (messages.MAX_PACKETS frames,
    MAX_BUF bytes; a larger one would be refused on arrival) and to ``max_bytes`` of
    frames. A cut is a view on the batch's buffer: the ring's ``put`` or the message's
    ``compact`` copies its frames once, later."""
    for b in batches:
        n = len(b)
        if n <= M.MAX_PACKETS and b.buf.shape[0] <= max_bytes:
            yield b
            continue
        ln = b.length.astype(np.int64)
        s = 0
        while s < n:
            # at most MAX_PACKETS frames and half MAX_BUF bytes (at least one frame)
            e = min(n, s + M.MAX_PACKETS)
            over = np.flatnonzero(np.cumsum(ln[s:e]) > max_bytes)
            if len(over):
                e = s + max(1, int(over[0]))
            yield PacketBatch(b.buf, b.off[s:e], b.length[s:e], b.ifindex[s:e], b.ts[s:e],
                              b.shared)
            s = e


def _no_frames(a: dict) -> Packets:
    """A result without frames (``Pool(frames=False)``): empty frames that keep their
    sequence number, time and interface."""
    try:
        seq, ts, ifx = a["seq"], a["ts"], a["ifindex"]
    except KeyError as e:
        raise M.WireError(f"missing array {e}") from None
    n = seq.shape[0]
    if (seq.dtype != np.int64 or ts.dtype != np.int64 or ifx.dtype != np.int16
            or ts.shape != (n,) or ifx.shape != (n,)):
        raise M.WireError("result arrays of the wrong type or length")
    return Packets.framesless(seq, ts, ifx)


def msg_arrays(m: Msg) -> dict:
    """Only the sections with something in them travel."""
    out = {name: x for name, x in (("rel", m.rel), ("req", m.req), ("ans", m.ans)) if len(x)}
    for prefix, pk in (("ho.", m.ho), ("bo.", m.bo)):
        if len(pk):
            out.update(pk_arrays(prefix, pk))
    return out


def msg_from(h: dict, a: dict, ring: FrameRing | None = None) -> Msg:
    from shardct.shard import N_ANS, N_REL, N_REQ
    m = Msg(active=bool(h.get("active")), low=int(h.get("low", NEVER)))
    for name, cols, dt in (("rel", N_REL, np.uint64), ("req", N_REQ, np.uint64),
                           ("ans", N_ANS, np.int64)):
        x = a.get(name)
        if x is None:
            continue
        if x.dtype != dt or x.ndim != 2 or x.shape[1] != cols:
            raise M.WireError(f"{name}: want ({cols} columns) of {np.dtype(dt)}")
        setattr(m, name, x)
    for prefix in ("ho.", "bo."):
        if prefix + "off" in a:
            setattr(m, prefix[:2], pk_from(prefix, a, ring))
    return m


# ------------------------------------------------------------------ the worker

class Rejected(M.WireError):
    """A well-formed message whose sender, generation or round cannot be right."""


def warm_kernels(dispatcher: bool = True):
    """Load (or compile) the kernels of a shard, and of the dispatcher, in this process.
    Run in the supervisor before it forks, the workers get them for nothing."""
    Shard.warm()
    if dispatcher:
        from shardct.traffic import handshake_frames
        d = Dispatcher(2, Config(max_conns=64), 1, 64, nat_deps(None, None))
        for _ in d.rounds(handshake_frames(2)):
            pass


def shard_worker(ctx, k, n, eps, alive, *, config: Config, seed: int, rules=None, network=None,
                 router: bool = False, incarnation: int = 0, frames: bool = True,
                 ring: str | None = None, snapshots: tuple | None = None,
                 restore: bool = False, curve: str | None = None):
    """Worker body (supervisor.worker_main): shard k of n. ``frames``: results carry the
    frames (as rewritten); without, only sequence numbers, times, interfaces, verdicts.
    ``ring``: the pool's frame ring (frames stay there; only arrays travel).
    ``snapshots``: (directory, seconds or None, final): write this shard's snapshot there
    between rounds at most that often, and after the final round when ``final``; a
    restarted incarnation starts from it, and so does the first one with ``restore``
    (the pool put a planned restart's rehashed tables there). ``curve``: the key
    directory for tcp:// endpoints (transport.Curve)."""
    Shard.warm()
    shard = Shard(k, n, config, seed=seed, rules=rules, network=network, router=router,
                  rng=np.random.default_rng([seed, k]))
    restored = _restore(shard, snapshots, incarnation > 0 or restore)
    keys = T.Curve.load(curve) if curve else None
    # refused handshakes and rejected messages go to the sink with the shard's counts
    guard = T.Guard(ctx, keys, shard.counts)

    def sock(kind, name, bind, **opts):
        return T.open_socket(ctx, kind, eps[name], bind=bind, curve=keys, guard=guard, **opts)
    rx = sock(zmq.PULL, f"shard-{k}", True)
    prx = sock(zmq.PULL, f"peer-{k}", True)
    ptx = {p: sock(zmq.PUSH, f"peer-{p}", False, sndhwm=0) for p in range(n) if p != k}
    sink = sock(zmq.PUSH, "sink", False, linger=1000, sndhwm=0)
    poller = zmq.Poller()
    poller.register(rx, zmq.POLLIN)
    poller.register(prx, zmq.POLLIN)
    W = _WorkerState(k, n, shard, incarnation, frames,
                     FrameRing(ring) if ring is not None else None, snapshots, restored)
    W.alive = alive        # alive.announced: the incarnations the supervisor started

    def loop():
        try:
            yield from W.run(rx, prx, ptx, sink, poller, alive)
        finally:
            for s in [rx, prx, sink, *ptx.values()]:
                s.close(0)
            guard.stop()
    return loop()


DELETE_KEYS = {"proto", "src", "dst", "sport", "dport"}


def delete_filter(f) -> dict:
    """A conntrack -D filter from a message, checked (ValueError: the message is bad)."""
    import ipaddress
    if not isinstance(f, dict) or not set(f) <= DELETE_KEYS:
        raise ValueError(f"bad delete filter {f!r:.80}")
    out = {}
    for key, v in f.items():
        if key in ("src", "dst"):
            out[key] = ipaddress.ip_address(str(v))
        elif not isinstance(v, int) or not 0 <= v <= 65535:
            raise ValueError(f"bad {key} {v!r:.40}")
        else:
            out[key] = v
    return out


def _restore(shard: Shard, snapshots, wanted: bool) -> int:
    """A worker's table from its snapshot: the entries restored (0 when there is none, or
    it does not fit: said on stdout, the worker starts empty)."""
    if not snapshots or not wanted:
        return 0
    path = snapshot.path_of(snapshots[0], shard.k)
    if not os.path.exists(path):
        return 0
    try:
        return shard.restore(*snapshot.load(path))
    except (snapshot.SnapshotError, ValueError) as e:
        shard.counts["snapshot_errors"] = shard.counts.get("snapshot_errors", 0) + 1
        print(f"worker {shard.k}: not restoring {path}: {e}", flush=True)
        return 0


class _WorkerState:
    def __init__(self, k, n, shard, gen, frames=True, ring: FrameRing | None = None,
                 snapshots: tuple[str, float] | None = None, restored: int = 0):
        self.k, self.n, self.shard, self.gen, self.frames = k, n, shard, gen, frames
        self.ring = ring
        self.snapshots = snapshots
        self.restored = restored          # entries this incarnation took from a snapshot
        self.snap_at = time.monotonic()   # when the next snapshot is due
        self.final_done = False           # the round just finished was a final one
        self.peer_restored: dict[int, bool] = {}   # peer -> it came back with its table
        self.steps: dict[tuple[int, int], dict[int, Msg]] = {}
        self.batches: dict[int, Packets] = {}
        self.clocks: dict[int, int] = {}       # round -> the packet clock at its end
        self.firsts: dict[int, int] = {}       # round -> its first sequence number
        self.sizes: dict[int, tuple] = {}      # round -> its reassembled datagrams' sizes
        self.absent_until = {p: 0 for p in range(n) if p != k}   # peer p absent before round
        self.moved_on = {p: -1 for p in range(n) if p != k}      # highest round seen from p
        self.restarted: dict[int, int] = {}                      # peer -> round it rejoins
        self.peer_gen = {p: 0 for p in range(n) if p != k}
        self.wire_errors = 0
        self.late = 0
        self.final: set[int] = set()       # rounds after which the table is sent along
        self.dumps: set[int] = set()       # the same, asked for by the control socket
        self.deletes: dict[int, dict] = {}  # round -> conntrack -D filter, before it runs
        self.ship_events: set[int] = set()  # rounds whose events go out with the result
        self.saves: dict[int, str] = {}     # round -> directory to save the shard in after it
        self.start_round = 0 if gen == 0 else None

    def _announced(self, p: int, g: int) -> bool:
        """Whether the supervisor started incarnation ``g`` of worker ``p`` (True when
        this worker runs without a supervisor to ask)."""
        alive = getattr(self, "alive", None)
        known = getattr(alive, "announced", None)
        if known is None or g <= known.get(p, 0):
            return True
        alive()                  # reads the command socket: the news may be waiting there
        return g <= known.get(p, 0)

    def _drop(self, e: Exception, what: str):
        """Count a message that failed validation (``rejected``: well formed, but its
        sender, generation or round cannot be right) or decoding (``wire_errors``); both
        travel to the sink in the shard's counts."""
        key = "rejected" if isinstance(e, Rejected) else "wire_errors"
        n = self.shard.counts[key] = self.shard.counts.get(key, 0) + 1
        self.wire_errors += 1
        if n <= 10 or n % 1000 == 0:            # a flood of them does not flood the log
            print(f"worker {self.k}: dropped a bad {what} ({key} {n}): {e}", flush=True)

    def _recv_peer(self, prx):
        """Take one message from a peer. Validated: ``from`` is a peer, a HELLO or STEP
        generation is one the supervisor started (a HELLO also newer than the one
        known), a STEP for (round, step) comes once per peer. A forged STEP with the
        right round, step and generation is not detectable here (the ipc directory's
        0700 and CurveZMQ on tcp:// keep strangers out)."""
        frames = prx.recv_multipart(copy=False)
        try:
            h, a = M.decode_arrays(frames) if len(frames) > 1 else (M.decode(frames[0]), {})
            p = h.get("from")
            if not isinstance(p, int) or p not in self.absent_until:
                raise Rejected(f"message from unknown worker {p!r}")
            if h["t"] == M.HELLO:
                g, f = int(h["gen"]), int(h["first"])
                if g == self.peer_gen[p]:
                    return                  # the incarnation known already (gen 0 at start)
                if g < self.peer_gen[p] or not self._announced(p, g) or f < 0:
                    raise Rejected(f"HELLO from worker {p} gen {g} first {f}: not a restart "
                                   f"the supervisor announced")
                self.peer_gen[p] = g
                self.absent_until[p] = f
                self.restarted[p] = f
                self.peer_restored[p] = bool(h.get("restored", 0))
                self.shard.peer_lost(p)
                return
            if h["t"] != M.STEP:
                raise Rejected(f"unexpected {h['t']}")
            r, s, g = int(h["round"]), int(h["step"]), int(h["gen"])
            if g < self.peer_gen[p]:
                return                      # from a dead incarnation
            if r < 0 or s < 0 or not self._announced(p, g):
                raise Rejected(f"STEP from worker {p}: round {r} step {s} gen {g}")
            have = self.steps.setdefault((r, s), {})
            if p in have:
                raise Rejected(f"a second STEP ({r}, {s}) from worker {p}")
            m = msg_from(h, a, self.ring)
            self.moved_on[p] = max(self.moved_on[p], r)
            have[p] = m
        except (M.WireError, KeyError, TypeError, ValueError) as e:
            self._drop(e, "peer message")

    def _recv_batch(self, rx):
        """Take one message from the dispatcher: a BATCH, or (once, to a restarted
        incarnation) the HELLO that says where it joins."""
        frames = rx.recv_multipart(copy=False)
        try:
            if len(frames) == 1:
                h = M.decode(frames[0])
                if (h["t"] != M.HELLO or int(h["gen"]) != self.gen or self.gen == 0
                        or self.start_round is not None or int(h["first"]) < 0):
                    raise Rejected(f"{h['t']} gen {h.get('gen')!r} to worker {self.k} gen "
                                   f"{self.gen} (started: {self.start_round is not None})")
                self.start_round = int(h["first"])     # where a restarted worker joins
                return
            h, a = M.decode_arrays(frames)
            self.batches[int(h["round"])] = pk_from("", a, self.ring)
            sizes = sizes_from(a)
            if sizes is not None:
                self.sizes[int(h["round"])] = sizes
            self.firsts[int(h["round"])] = int(h.get("first", -1))
            self.clocks[int(h["round"])] = int(h.get("clock", 0))
            if h.get("final"):
                self.final.add(int(h["round"]))
            if h.get("dump"):
                self.dumps.add(int(h["round"]))
            if h.get("events"):
                self.ship_events.add(int(h["round"]))
            if isinstance(h.get("save"), str):
                self.saves[int(h["round"])] = h["save"]
            if h.get("delete") is not None:
                try:
                    self.deletes[int(h["round"])] = delete_filter(h["delete"])
                except ValueError as e:       # the round itself is fine: run it
                    self.wire_errors += 1
                    print(f"worker {self.k}: ignored a bad delete filter: {e}", flush=True)
        except (M.WireError, KeyError, TypeError, ValueError) as e:
            self._drop(e, "batch")

    def run(self, rx, prx, ptx, sink, poller, alive):
        r = None
        while alive():
            # ---- wait for this round's batch
            if r is None or r not in self.batches:
                ev = dict(poller.poll(20))
                if rx in ev:
                    self._recv_batch(rx)
                if prx in ev:
                    self._recv_peer(prx)
                if r is None and self.start_round is not None:
                    r = self.start_round
                    for old in [x for x in self.batches if x < r]:
                        del self.batches[old]
                        self.clocks.pop(old, None)
                        self.firsts.pop(old, None)
                        self.sizes.pop(old, None)
                    hello = M.encode(M.HELLO, **{"from": self.k}, worker=self.k, gen=self.gen,
                                     first=r, restored=self.restored)
                    for s in ptx.values():
                        s.send(hello)
                    sink.send(hello)
                yield
                continue
            pk = self.batches.pop(r)
            if r in self.final and self.clocks.get(r, 0) > 0:
                # the input is over: every conn expired by then goes (entries and
                # expired then do not depend on when each worker's reaper ran)
                self.shard.reap_all(self.clocks[r])
            for p, f in list(self.restarted.items()):
                if f <= r:
                    if self.peer_restored.pop(p, False):
                        self.shard.peer_restored(p)
                    else:
                        self.shard.peer_restarted(p)
                    del self.restarted[p]
            t0 = time.perf_counter()
            deleted = self.shard.delete(**self.deletes.pop(r)) if r in self.deletes else 0
            first = self.firsts.pop(r, -1)
            self.shard.sizes = self.sizes.pop(r, None)
            self.shard.local(pk, first if first >= 0 else None)
            step = 0
            while True:
                out = self.shard.outbox()
                for p, m in out.items():
                    if r >= self.absent_until[p]:
                        ptx[p].send_multipart(M.encode_arrays(
                            M.STEP, msg_arrays(m), **{"from": self.k}, round=r, step=step,
                            active=m.active, low=m.low, gen=self.gen), copy=False)
                t1 = time.perf_counter()
                self.shard.counts["busy_us"] += int((t1 - t0) * 1e6)
                inbox = yield from self._gather(r, step, prx, rx, poller, alive)
                if inbox is None:
                    return
                t0 = time.perf_counter()
                self.shard.counts["step_wait_us"] += int((t0 - t1) * 1e6)
                more = self.shard.step(inbox, final_ok=True)
                step += 1
                if not more:
                    break
            for key in [key for key in self.steps if key[0] <= r]:
                self.late += len(self.steps.pop(key))
            res, verdict = self.shard.results(self.frames)
            gen = self._generated()
            table = {}
            if r in self.final or r in self.dumps:
                self.dumps.discard(r)
                table = {f"conn.{name}": a for name, a in self.shard.ct.conn_rows().items()}
            extra = {}
            if table or r % STATS_EVERY == 0:
                extra = {"counts": self.shard.counts, "stats": self.shard.ct.stats()}
            if r in self.ship_events:          # someone watches (conntrack -E)
                self.ship_events.discard(r)
                table["ev"], table["evaddr"] = self.shard.ct.event_rows()
            else:
                self.shard.ct.clear_events()
            if self.frames:
                out = pk_arrays("", res)
            else:
                b = res.batch
                out = {"seq": res.seq, "ts": b.ts, "ifindex": b.ifindex}
            sink.send_multipart(M.encode_arrays(
                M.RESULT, {**out, "verdict": verdict, **gen, **table}, worker=self.k,
                round=r, gen=self.gen, entries=self.shard.ct.table.count, deleted=deleted,
                **extra), copy=False)
            self.shard.counts["busy_us"] += int((time.perf_counter() - t0) * 1e6)
            self.final_done = r in self.final
            self._snapshot()
            if r in self.saves:                # shardct snapshot save, while running
                snapshot.save(snapshot.path_of(self.saves.pop(r), self.k), *self.shard.snapshot())
            # every worker reaps on the dispatcher's clock, not on what it happened to see
            self.shard.reap_until(max(self.shard.now, self.clocks.pop(r, 0)))
            r += 1
            yield

    def _generated(self) -> dict:
        """The round's generated frames (the engine's ICMP errors, Shard.take_generated)
        as RESULT arrays ``gen.*`` (their ``seq``: the packet each answers), when results
        carry frames; at most GEN_MAX_BYTES of them, the rest counted in
        ``generated_cut``."""
        gen = self.shard.take_generated()
        if not self.frames or not len(gen):
            return {}
        ends = np.cumsum(gen.batch.length.astype(np.int64))
        fit = int(np.searchsorted(ends, GEN_MAX_BYTES, side="right"))
        if fit < len(gen):
            c = self.shard.counts
            c["generated_cut"] = c.get("generated_cut", 0) + len(gen) - fit
            gen = gen.take(np.arange(fit))
        return pk_arrays("gen.", gen)

    def _snapshot(self):
        """Between rounds, when one is due: this shard's state to its snapshot file.
        (Before the reaper runs: the releases it queues are not in a snapshot, a restore
        reaps again.)"""
        if not self.snapshots:
            return
        directory, every, final = self.snapshots
        if not (final and self.final_done) and (every is None or time.monotonic() < self.snap_at):
            return
        t = time.perf_counter()
        snapshot.save(snapshot.path_of(directory, self.k), *self.shard.snapshot())
        c = self.shard.counts
        c["snapshots"] = c.get("snapshots", 0) + 1
        c["snapshot_us"] = c.get("snapshot_us", 0) + int((time.perf_counter() - t) * 1e6)
        self.snap_at = time.monotonic() + (every or 0)

    def _gather(self, r, step, prx, rx, poller, alive):
        """Wait (yielding) until every present peer's STEP (r, step) is in."""
        while True:
            have = self.steps.get((r, step), {})
            inbox, missing = [], False
            for p in sorted(self.absent_until):
                if p in have:
                    inbox.append(have[p])
                elif r < self.absent_until[p] or self.moved_on[p] > r:
                    inbox.append(Msg())          # it is gone or has left this round
                else:
                    missing = True
                    break
            if not missing:
                self.steps.pop((r, step), None)
                return inbox
            if not alive():
                return None
            ev = dict(poller.poll(20))
            if prx in ev:
                self._recv_peer(prx)
            if rx in ev:
                self._recv_batch(rx)
            yield


# ------------------------------------------------------------------ the dispatcher process

def dispatcher_body(ctx, k, n, eps, alive, *, config: Config, seed: int, max_round: int,
                    nat: tuple, window: int, ring: str | None = None,
                    curve: str | None = None):
    """The dispatcher as a process of its own (``Pool(dispatcher_process=True)``): takes
    batches on ``source``, sends each round to the workers and its size to the sink
    (ROUND), acknowledges each batch with the rounds it made (ACK), passes restarts on
    to the restarted worker (HELLO: the next round is its first), and ends with the
    table round on END. With ``ring``, batches come as arrays on the frame ring."""
    warm_kernels(dispatcher=True)                    # before READY (free when forked)
    disp = Dispatcher(n, config, seed, max_round, nat)
    fr = FrameRing(ring) if ring is not None else None
    keys = T.Curve.load(curve) if curve else None
    counts = {"wire_errors": 0}          # sent to the sink with every ACK
    guard = T.Guard(ctx, keys, counts)

    def sock(kind, name, bind, **opts):
        return T.open_socket(ctx, kind, eps[name], bind=bind, curve=keys, guard=guard, **opts)
    src = sock(zmq.PULL, "source", True)
    tx = [sock(zmq.PUSH, f"shard-{j}", False, sndhwm=0) for j in range(n)]
    sink = sock(zmq.PUSH, "sink", False, linger=1000, sndhwm=0)
    st = {"r": 0, "emitted": 0, "rounds": None, "batch": 0, "end": False, "events": False}
    queue = []          # batches waiting for the current one's rounds to go out
    sizes = [None]      # the current batch's reassembled datagrams (PoolStage.before)

    def send_round(parts, final, dump=False, delete=None, save=None, first=-1, sizes=None):
        r = st["r"]
        for j, part in enumerate(parts):
            tx[j].send_multipart(M.encode_arrays(M.BATCH, {**pk_arrays("", part), **(sizes or {})},
                                                 round=r,
                                                 first=first, final=final, dump=dump,
                                                 delete=delete,
                                                 save=save, events=st["events"],
                                                 clock=disp.clock), copy=False)
        sink.send(M.encode(M.ROUND, round=r, n=sum(len(x) for x in parts), final=final,
                           dump=dump))
        st["r"] = r + 1

    def take_message():
        frames = src.recv_multipart(copy=False)
        try:
            if len(frames) == 1:
                h = M.decode(frames[0])
                if h["t"] == M.HELLO:
                    w = h["worker"]
                    if not (isinstance(w, int) and 0 <= w < n):
                        raise M.WireError(f"HELLO for unknown worker {w!r}")
                    tx[w].send(M.encode(M.HELLO, gen=int(h["gen"]), first=st["r"]))
                elif h["t"] == M.ACK:                  # the sink emitted up to this round
                    st["emitted"] = max(st["emitted"], int(h["emitted"]))
                elif h["t"] == M.END:
                    st["end"] = True
                elif h["t"] == M.DUMP:                 # after the batches sent before it
                    queue.append(((h.get("delete"), h.get("save")), None, None))
                return
            h, a = M.decode_arrays(frames)
            if fr is not None:
                batch = fr.batch(a["off"], a["length"], a["ifindex"], a["ts"])
            elif "buf" in a:                    # read-only: scatter copies
                batch = frames_on(a["buf"], a["off"], a["length"], a["ifindex"], a["ts"])
            else:
                raise M.WireError("a batch without frames, and no ring")
            queue.append((int(h.get("seq", 0)), batch, sizes_from(a)))
            st["events"] = bool(h.get("events"))     # someone watches conntrack -E
        except (M.WireError, KeyError, TypeError, ValueError) as e:
            counts["wire_errors"] += 1
            print(f"dispatcher: dropped a bad message: {e}", flush=True)

    def loop():
        try:
            while alive():
                while src.poll(0):
                    take_message()
                while st["rounds"] is None and queue and queue[0][1] is None:
                    (delete, save), _, _ = queue.pop(0)
                    send_round([Packets.empty()] * n, False, True, delete, save)  # tables, please
                if st["rounds"] is None and queue:
                    st["batch"], b, sizes[0] = queue.pop(0)
                    st["rounds"] = disp.rounds(b)
                sent = 0
                # at most ``window`` rounds ahead of the sink: a restarted worker then
                # loses only those
                while st["rounds"] is not None and st["r"] - st["emitted"] < window and sent < 64:
                    nxt = next(st["rounds"], None)
                    if nxt is None:
                        st["rounds"] = None
                        sink.send(M.encode(M.ACK, batch=st["batch"], rounds=st["r"],
                                           counts=counts))
                        break
                    send_round(nxt[0], False, first=nxt[1][0], sizes=sizes_in(sizes[0], *nxt[1]))
                    sent += 1
                if st["end"] and st["rounds"] is None and not queue:
                    send_round([Packets.empty()] * n, True)
                    st["end"] = False
                if not sent:
                    src.poll(5)
                yield
        finally:
            for s in [src, sink, *tx]:
                s.close(0)
            guard.stop()
    return loop()


# ------------------------------------------------------------------ dispatcher + sink

class Latency:
    """A cumulative histogram of round latencies (seconds), as Prometheus buckets."""
    BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, s: float):
        i = 0
        while i < len(self.BOUNDS) and s > self.BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += s


class Pool:
    """Supervisor, dispatcher and sink in this process; n shard workers.

    ``run(batches, emit)``: dispatch every batch (an iterable of PacketBatch), call
    ``emit(packets, verdicts)`` once per round in order, return the totals. With
    ``frames=False`` the packets emitted are empty frames (sequence number, time and
    interface kept): for a caller that only counts or watches, the frames never travel
    back from the workers.

    ``ring_bytes``: size of the shared-memory frame ring (``workers.ring``); input frames
    are copied into it once and stay there. 0 (and any ``tcp://`` endpoints) sends the
    frames inside the messages instead.

    ``snapshot_interval``: seconds between each worker's snapshots of its shard (taken
    between rounds, written atomically to ``snapshot_dir``, by default a directory of
    the pool's own that goes with it); a worker restarted after a crash starts from its
    last one, so established flows go on and only what changed since is lost
    (``lost_conns`` then counts the entries it had beyond those restored). A
    ``snapshot_dir`` given also gets every shard's state after the final round.

    ``restore_from``: a directory of another pool's snapshots (a planned restart): its
    conns are rehashed under this pool's seed and worker count (``shard.rehash``) before
    the workers start, and they start from them. ``restored_conns`` counts them.

    ``control``: a name (the command) for a control socket that `shardct conntrack`
    talks to while the pool runs (``workers/control.py``). ``metrics_port``: serve
    Prometheus metrics there while it runs (``workers/metrics.py``; ``rings``, set by a
    live source, adds their drops).

    ``curve``: a key directory (``shardct keygen DIR``, :mod:`workers.transport`): every
    ``tcp://`` endpoint then uses CurveZMQ and admits only the authorized client keys.
    Refused handshakes and rejected messages are counted by whoever received them:
    ``counts()`` (workers and dispatcher: ``handshake_failed``, ``auth_refused``,
    ``wire_errors``, ``rejected``) and ``transport_counts()`` (this process)."""

    def __init__(self, n, config: Config | None = None, *, seed: int, rules=None, network=None,
                 router=False, max_round=65536, window=8, eps: dict | None = None,
                 ipc_dir=None, log=print, worker_netns: str | None = None,
                 dispatcher_process: bool = True, frames: bool = True,
                 ring_bytes: int = DEFAULT_RING, snapshot_interval: float | None = None,
                 snapshot_dir: str | None = None, restore_from: str | None = None,
                 control: str | None = None, metrics_port: int | None = None,
                 curve: str | None = None):
        self.config = config or Config()
        self.n = n if n != "auto" else (os.cpu_count() or 1)
        self.ring = None
        self.control = None
        self._control_name = control
        self.want_events = False             # workers ship their events (conntrack -E)
        self.metrics = None
        self._metrics_port = metrics_port
        self.rings = []
        if ring_bytes and not any(e.startswith("tcp://") for e in (eps or {}).values()):
            self.ring = FrameRing.create(ring_bytes)
            # gone at exit even if stop() is never reached
            weakref.finalize(self, self.ring.unlink)
        path = self.ring.path if self.ring else None
        # with frames, workers build their errors unlimited and the sink limits them
        # (RateLimiter: one engine's limit, where every worker's errors meet)
        self.limiter = RateLimiter(self.config) if frames else None
        kw = dict(config=replace(self.config, icmp_ratelimit=0) if frames else self.config,
                  seed=seed, rules=rules, network=network, router=router, frames=frames,
                  ring=path, curve=curve)
        self.snapshot_dir = None
        self.carried = 0            # conns a planned restart brought in (restore_from)
        if snapshot_interval is not None or snapshot_dir is not None or restore_from:
            final = snapshot_dir is not None
            if snapshot_dir is None:
                snapshot_dir = tempfile.mkdtemp(prefix="shardct-snap-")
                weakref.finalize(self, shutil.rmtree, snapshot_dir, True)
            os.makedirs(snapshot_dir, mode=0o700, exist_ok=True)
            self.snapshot_dir = snapshot_dir
            every = None if snapshot_interval is None else float(snapshot_interval)
            kw["snapshots"] = (snapshot_dir, every, final)
            if restore_from:
                self.carried = self._rehash(restore_from, seed, rules, network, router, log)
                kw["restore"] = True
        self.dispatcher_process = dispatcher_process
        nat = nat_deps(rules, network)
        extra = None
        if dispatcher_process:
            extra = ("workers.pool:dispatcher_body",
                     dict(config=self.config, seed=seed, max_round=max_round, nat=nat,
                          window=window, ring=path, curve=curve))
        self.sup = Supervisor(self.n, "workers.pool:shard_worker", kw, ipc_dir, log,
                              endpoints=eps, pass_incarnation=True, netns=worker_netns,
                              extra=extra, leftovers=[path] if path else None, curve=curve)
        self.dispatcher = Dispatcher(self.n, self.config, seed, max_round, nat)
        # reassembly in front of the shards and fragmentation behind them, here (frag.py):
        # the shards see whole datagrams; cut frames go to emitters that take generated
        self.frag = None
        if self.config.defrag or (router and network is not None):
            self.frag = PoolStage(self.config, network, router, seed, frames)
        self._sizes = None
        self.window = window
        self.log = log
        self.totals = {"packets_in": 0, "packets_out": 0, "lost_packets": 0, "rounds": 0,
                       "lost_conns": 0, "restored_conns": self.carried, "deleted": 0,
                       "wire_errors": 0, "generated": 0, "frag_held": 0, "frag_dropped": 0}
        self._lost_by = [0] * self.n     # entries counted lost at each worker's last death
        self.worker_stats: dict[int, dict] = {}
        self.worker_counts: dict[int, dict] = {}
        self.dispatcher_counts: dict[str, int] = {}
        self.entries = [0] * self.n
        self.round_latency = Latency()     # dispatch (or ROUND) to emit, per round
        self._order = SeqOrder()           # the sink's reorder
        self._with_generated = False       # feed(generated=True): emit gets the ICMP errors
        self._gen_ident = np.array([seed & 0xFFFF], dtype=np.int64)   # as icmp.IcmpErrors
        self.tables: dict[int, dict] = {}     # worker -> its conns after the last round

    def _rehash(self, old_dir, seed, rules, network, router, log) -> int:
        """Another pool's snapshots in ``old_dir``, rehashed into this pool's shards and
        written where the workers restore from. Raises SnapshotError (one line) when a
        file is missing, damaged or of another pool."""
        from shardct.shard import rehash
        files = sorted(f for f in os.listdir(old_dir) if f.startswith("shard-")
                       and f.endswith(".snap")) if os.path.isdir(old_dir) else []
        if not files:
            raise snapshot.SnapshotError(old_dir, "no shard-K.snap files")
        old = [snapshot.load(os.path.join(old_dir, f)) for f in files]
        n_old = {int(sc["n"]) for sc, _ in old}
        if len(n_old) != 1 or sorted(int(sc["k"]) for sc, _ in old) != list(range(n_old.pop())):
            raise snapshot.SnapshotError(old_dir, "the files are not one pool's shards 0..n-1")
        shards = [Shard(k, self.n, self.config, seed=seed, rules=rules, network=network,
                        router=router) for k in range(self.n)]
        carried, dropped = rehash(old, shards)
        if dropped:
            log(f"pool: {dropped} conns of {old_dir} did not fit (max_conns)")
        for sh in shards:
            snapshot.save(snapshot.path_of(self.snapshot_dir, sh.k), *sh.snapshot())
        return carried

    def _open(self):
        sock = self.sup.socket
        self.tx = [sock(zmq.PUSH, f"shard-{k}", bind=False, sndhwm=0) for k in range(self.n)]
        self.rx = sock(zmq.PULL, "sink", bind=True)
        if self.dispatcher_process:
            self.src = sock(zmq.PUSH, "source", bind=False, sndhwm=0)
            self.tx.append(self.src)

    def _close(self):
        for s in self.tx + [self.rx]:
            s.close(0)

    def start(self):
        """Open the sockets and start the workers (they warm up their kernels, then take
        rounds)."""
        self._open()
        if self.sup.start_method == "fork":
            warm_kernels(self.dispatcher_process)
        self.sup.start()
        if self._control_name:
            from .control import ControlServer
            self.control = ControlServer(self, self.sup.ctx, self._control_name)
        if self._metrics_port is not None:     # a thread: only once the workers are forked
            from .metrics import serve
            self.metrics = serve(self, self._metrics_port)
        self.pending: dict[int, dict] = {}   # round -> {"n": packets, "got": {worker: ...}}
        self.first = [0] * self.n            # worker k answers rounds >= first[k] (restarts)
        self.gen = [0] * self.n
        self.next_emit = 0
        self.r = 0
        self.batches_sent = 0
        self.batches_acked = 0
        self.final_round = None
        self._held = None                    # an input batch waiting for room in the ring
        self._sizes = None                   # the last input batch's (PoolStage.before)
        self._tickets = deque()              # [ticket, batch seq, round after its last]
        self.dump_rounds: set[int] = set()   # rounds that bring the tables (request_dump)
        self._round_t0: dict[int, float] = {}  # round -> when the sink learnt of it
        self.dumped = 0
        self._dump_wanted = False
        self._dump_delete = None
        self._dump_save = None

    def wait_ready(self, timeout_s: float = 120.0):
        """Block until every worker has booted (kernels loaded), e.g. before timing."""
        deadline = time.monotonic() + timeout_s
        while not all(self.sup.ready):
            if not self.sup.poll(0.05):
                raise self._stopped()
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout_s} s")

    def _stopped(self) -> PoolStopped:
        """Why the pool stopped under its caller, and what was lost with it."""
        t = self.totals
        lost = t["packets_in"] - t["packets_out"] - t["lost_packets"]
        return PoolStopped(f"pool stopped: {self.sup.error or 'stop requested'}; lost "
                           f"{lost + t['lost_packets']} of the {t['packets_in']} packets "
                           f"handed to it ({lost} in flight), {t['packets_out']} came out")

    def stop(self):
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._close()
        self.sup.stop()
        if self.ring is not None:
            self.ring.unlink()

    def run(self, batches, emit=None, timeout_s: float = 600.0, generated: bool = False) -> dict:
        """start, feed every batch and the final (table) round, stop."""
        self.start()
        try:
            return self.feed(batches, emit, timeout_s, final=True, generated=generated)
        finally:
            self.stop()

    def feed(self, batches, emit=None, timeout_s: float = 600.0, final: bool = False,
             generated: bool = False, wake=None) -> dict:
        """Dispatch every batch and wait until every round is out. ``emit(packets,
        verdicts)`` gets each round in sequence order (None: only count). ``final``: end
        with an empty round that brings every worker's table back (``conns()``).
        ``generated`` (a pool with ``frames``): ``emit(packets, verdicts, generated,
        out)``, where ``generated`` are the frames the workers' engines originated for the
        round (router mode: ICMP errors, each with the interface to leave by in
        ``ifindex``), as Packets whose ``seq`` is the packet each answers, in that order;
        ``out`` is None when every frame leaves as its verdict says, else (forward mask,
        fragments, fragment_of) as a Result's: reassembled datagrams and oversize IPv4
        frames cut on output (frag.PoolStage; an emitter without ``generated`` gets
        whole frames).
        Fragments the pool reassembles never reach the workers: ``packets_in`` counts
        the frames they see, ``frag_held`` and ``frag_dropped`` the fragments kept back
        (the verdicts queued and drop one process gives them).
        ``wake``: what a live source that does not block reads (file descriptors or
        objects with ``fileno()``): once it comes back with an empty batch, the pool
        waits for a result or for one of these to be readable, whichever comes first
        (at most IDLE_WAIT_MS), instead of the source waiting for input while results
        wait for it."""
        self._with_generated = generated
        self._idle = None
        if wake:
            self._idle = zmq.Poller()
            self._idle.register(self.rx, zmq.POLLIN)
            for w in wake:
                self._idle.register(w, zmq.POLLIN)
        batches = _within_limits(batches, M.MAX_BUF // 2 if self.ring is None
                                 else min(M.MAX_BUF // 2, self.ring.size // 4))
        if self.dispatcher_process:
            return self._feed_remote(batches, emit, timeout_s, final)
        it = iter(batches)
        rounds_iter = iter(())
        sizes = None
        done_src = False
        sent_final = not final
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.sup.poll(0):
                raise self._stopped()
            self._note_restarts(self.gen, self.r)
            self._tick()
            # ---- dispatch while the window allows
            idle = False
            while not done_src and self.r - self.next_emit < self.window:
                nxt = next(rounds_iter, None)
                if nxt is None:
                    self._rounds_made(None, self.r)
                    b = self._input(it, self.batches_sent)
                    if b is False:
                        break                   # the ring is full: emit first
                    if b is None:
                        done_src = True
                        break
                    self.batches_sent += 1
                    self.totals["packets_in"] += len(b)
                    rounds_iter = self.dispatcher.rounds(b)
                    sizes = self._sizes
                    if not len(b):
                        idle = True       # a live source had nothing: go collect results
                        break
                    continue
                self._send_round(nxt[0], False, first=nxt[1][0], sizes=sizes_in(sizes, *nxt[1]))
            if done_src and not sent_final:
                if self.frag is not None:
                    self.frag.finish()
                self._send_round([Packets.empty()] * self.n, True)
                sent_final = True
            if done_src and self.next_emit == self.r:
                return self.totals
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool did not finish round {self.next_emit} in {timeout_s} s")
            # ---- collect results (a live source that came back empty already waited)
            if self._wait_results(idle):
                self._recv(self.pending, self.first)
            self._emit_ready(emit)

    def _feed_remote(self, batches, emit, timeout_s, final):
        """feed() with the dispatcher in its own process: send it batches (at most two
        unacknowledged, and only while the window of rounds has room), collect results."""
        it = iter(batches)
        done_src = False
        sent_end = not final
        self.final_round = None
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.sup.poll(0):
                raise self._stopped()
            self._note_restarts(self.gen, None)
            self._tick()
            idle = False
            while (not done_src and self.batches_sent - self.batches_acked < 2
                   and self.r - self.next_emit < self.window):
                b = self._input(it, self.batches_sent)
                if b is False:
                    break                       # the ring is full: emit first
                if b is None:
                    done_src = True
                    break
                if not len(b):
                    idle = True         # a live source had nothing: nothing to send
                    break
                self.totals["packets_in"] += len(b)
                if self.ring is None:
                    b = compact(b)          # only its own frames' bytes travel
                arrays = {f: getattr(b, f) for f in ("off", "length", "ifindex", "ts")}
                if self.ring is None:
                    arrays["buf"] = b.buf
                if self._sizes is not None:
                    arrays.update(fseq=self._sizes[0], fmax=self._sizes[1])
                self.src.send_multipart(M.encode_arrays(M.BATCH, arrays, seq=self.batches_sent,
                                                        events=self.want_events), copy=False)
                self.batches_sent += 1
            if done_src and not sent_end and self.batches_acked == self.batches_sent:
                if self.frag is not None:
                    self.frag.finish()
                self.src.send(M.encode(M.END))
                sent_end = True
            if (done_src and sent_end and self.batches_acked == self.batches_sent
                    and self.next_emit == self.r and (not final or self.final_round is not None)):
                return self.totals
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool did not finish round {self.next_emit} in {timeout_s} s")
            if self._wait_results(idle):
                self._recv(self.pending, self.first)
            before = self.next_emit
            self._emit_ready(emit)
            if self.next_emit != before:
                self.src.send(M.encode(M.ACK, emitted=self.next_emit))

    def _wait_results(self, idle: bool) -> bool:
        """Whether a result is waiting: after waiting up to 20 ms for one while the input
        is busy (the window or the dispatcher is full), not at all when a live source
        came back empty (it waited for input itself), or, with ``feed(wake=)``, until a
        result or input comes."""
        if not idle:
            return bool(self.rx.poll(20))
        if self._idle is None:
            return bool(self.rx.poll(0))
        return self.rx in dict(self._idle.poll(IDLE_WAIT_MS))

    def _input(self, it, seq):
        """The next input batch, copied into the ring when there is one, and reassembled
        (``self.frag``: held fragments out, datagrams in; ``self._sizes`` says which); None
        at the end of the input; False when the ring has no room for it yet."""
        # (batch, through frag.before already, its sizes): one waiting for ring space
        b, done, sizes = self._held if self._held is not None else (next(it, None), False, None)
        self._held = None
        self._sizes = None
        if b is None or not len(b):
            return b
        if self.frag is not None and not done and self.ring is None:
            b, sizes = self.frag.before(b)
        elif self.frag is not None and not done:
            got = self.ring.put(b, screen=True)     # the copy screens for fragments
            if got is None:
                self._held = (b, False, None)
                return False
            c, ticket, maybe = got
            b, sizes = self.frag.before(c, maybe)
            if b is c:
                return self._queued(b, sizes, ticket, seq)
            # reassembled: into the ring again (c's stretch goes back with b's ticket)
        if self.ring is None:
            return self._queued(b, sizes, None, seq)
        got = self.ring.put(b)
        if got is None:
            self._held = (b, True, sizes)
            return False
        return self._queued(got[0], sizes, got[1], seq)

    def _queued(self, b, sizes, ticket, seq):
        """``b`` goes to the dispatcher (``ticket``: its ring space, or None)."""
        self._sizes = sizes
        if ticket is not None:
            self._tickets.append([ticket, seq, None])
        if self.frag is not None:
            self.totals["frag_held"] = self.frag.held
            self.totals["frag_dropped"] = self.frag.dropped
        return b

    def _rounds_made(self, seq, end):
        """Batch ``seq`` (None: the latest) went out as rounds before ``end``."""
        for t in self._tickets:
            if t[2] is None and (seq is None or t[1] == seq):
                t[2] = end
                return

    def _release(self):
        """Ring space of batches whose rounds are all emitted comes back."""
        while self._tickets and self._tickets[0][2] is not None \
                and self._tickets[0][2] <= self.next_emit:
            self.ring.release(self._tickets.popleft()[0])

    def _send_round(self, parts, final, dump=False, delete=None, save=None, first=-1,
                    sizes=None):
        """Round self.r to every worker (``first``: its first sequence number, -1 for a
        round without packets; ``sizes``: sizes_in's arrays for it)."""
        self.pending[self.r] = {"n": sum(len(p) for p in parts), "got": {}}
        for k, p in enumerate(parts):
            self.tx[k].send_multipart(M.encode_arrays(M.BATCH, {**pk_arrays("", p), **(sizes or {})},
                                                      round=self.r,
                                                      first=first, final=final, dump=dump,
                                                      delete=delete,
                                                      save=save,
                                                      events=self.want_events,
                                                      clock=self.dispatcher.clock), copy=False)
        if dump:
            self.dump_rounds.add(self.r)
        self._round_t0[self.r] = time.monotonic()
        self.r += 1

    def request_dump(self, delete: dict | None = None, save: str | None = None):
        """Ask every worker for its table and counters with a round of their own (sent
        after what was fed so far); ``dumped`` counts the dumps completed, and
        ``conns()``/``stats()`` are as of the latest. ``delete``: a conntrack -D filter
        (``workers.pool.DELETE_KEYS``; {} flushes) each worker applies first; the
        ``deleted`` total counts what went. ``save``: a directory where every worker saves
        its shard after that round (``shardct snapshot save``)."""
        self._dump_wanted = True
        self._dump_delete = delete
        self._dump_save = save

    def refresh(self, timeout_s: float = 60.0):
        """Make ``stats()``, ``counts()`` and ``conns()`` current: they are as of each
        worker's last report (every STATS_EVERY rounds, a dump, the final round), so
        after a ``feed`` without ``final`` they lag what was fed. This runs a dump round
        after what was fed and waits for it (every worker ships its table too)."""
        want = self.dumped + 1
        self.request_dump()

        def idle():             # a live source with nothing, until the dump is in
            while self.dumped < want:
                time.sleep(0.001)
                yield PacketBatch.empty()
        self.feed(idle(), None, timeout_s=timeout_s)

    def _dump(self):
        """Send a requested dump round (the feed loops call this between rounds)."""
        if not self._dump_wanted:
            return
        self._dump_wanted = False
        if self.dispatcher_process:
            self.src.send(M.encode(M.DUMP, delete=self._dump_delete, save=self._dump_save))
        else:
            self._send_round([Packets.empty()] * self.n, False, dump=True,
                             delete=self._dump_delete, save=self._dump_save)

    def _tick(self):
        """Once per feed-loop turn: the control socket, if any, and a requested dump."""
        if self.control is not None:
            self.control.poll()
        self._dump()

    def _emit_ready(self, emit):
        """Emit every complete round at the head of the window, in order."""
        while (self.next_emit < self.r and self.pending[self.next_emit]["n"] is not None
               and all(k in self.pending[self.next_emit]["got"] or self.next_emit < self.first[k]
                       for k in range(self.n))):
            got = self.pending.pop(self.next_emit)
            if got.get("ev") and self.control is not None:
                self.control.publish_events(got["ev"])
            parts = list(got["got"].values())
            n_out = sum(len(p) for p, _ in parts)
            self.totals["lost_packets"] += got["n"] - n_out
            self.totals["packets_out"] += n_out
            self.totals["rounds"] += 1
            gen = self._round_generated(got.get("gen", []), self._with_generated)
            if emit is not None:
                pk = Packets.concat([p for p, _ in parts])
                v = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.uint8)
                order = self._order(pk.seq)
                pk = pk.take(order)
                if pk.batch.shared:     # the ring space is reused once this round is out
                    pk = Packets(compact(pk.batch), pk.hashes, pk.seq, pk.given, pk.dep)
                v = v[order]
                if self._with_generated:
                    out = None if self.frag is None else self.frag.after(pk.batch, pk.seq, v)
                    emit(pk, v, gen, out)
                else:
                    if self.frag is not None and len(pk):
                        self.frag.emitted(int(pk.seq.max()))
                    emit(pk, v)
            if self.next_emit in self.dump_rounds:
                self.dump_rounds.discard(self.next_emit)
                self.dumped += 1
            t0 = self._round_t0.pop(self.next_emit, None)
            if t0 is not None:
                self.round_latency.observe(time.monotonic() - t0)
            self.next_emit += 1
        if self.ring is not None:
            self._release()

    def _round_generated(self, parts: list, emitted: bool) -> Packets:
        """A round's generated frames from every worker, in the order of the packets
        they answer, rate-limited as one engine limits them (whether emitted or not: the
        counters are one engine's), and when ``emitted`` with the IPv4 ids one engine
        gives its errors (one counter from the seed, in that order; each worker's own
        counter would repeat the others') and counted in ``generated``."""
        from shardct.icmp import restamp_ids
        gen = Packets.concat(parts)
        if len(gen):
            gen = gen.take(self._order(gen.seq))
            keep = self.limiter.limit(gen.batch)
            if not keep.all():
                gen = gen.take(np.flatnonzero(keep))
        if len(gen) and emitted:
            b = gen.batch
            restamp_ids(b.buf, b.off, b.length, self._gen_ident)
            self.totals["generated"] += len(gen)
        return gen

    def _note_restarts(self, gen, next_round):
        for k in range(self.n):
            if self.sup.restarts[k] > gen[k]:
                gen[k] = self.sup.restarts[k]
                # the rounds it had are lost; it joins at the next one dispatched
                if self.dispatcher_process:
                    self.src.send(M.encode(M.HELLO, worker=k, gen=gen[k]))
                else:
                    self.tx[k].send(M.encode(M.HELLO, gen=gen[k], first=next_round))
                self.totals["lost_conns"] += self.entries[k]
                self._lost_by[k] = self.entries[k]
                self.entries[k] = 0

    def _recv(self, pending, first):
        frames = self.rx.recv_multipart(copy=False)
        try:
            if len(frames) == 1:
                h = M.decode(frames[0])
                if h["t"] == M.HELLO:
                    k = self._worker_of(h)
                    if int(h["gen"]) != self.gen[k]:
                        # only the incarnation the supervisor started may move first[k]
                        raise M.WireError(f"HELLO from worker {k} gen {h['gen']!r}, "
                                          f"want {self.gen[k]}")
                    first[k] = max(first[k], int(h["first"]))
                    # a restored incarnation brought back this many of the entries that
                    # were counted lost when it died
                    back = min(int(h.get("restored", 0)), self._lost_by[k])
                    self._lost_by[k] -= back
                    self.totals["lost_conns"] -= back
                    self.totals["restored_conns"] += back
                elif h["t"] == M.ROUND:          # the dispatcher process made a round
                    rr = int(h["round"])
                    if not self.dispatcher_process or rr != self.r:
                        # rounds come in order from the one dispatcher: the next or none
                        raise Rejected(f"ROUND {rr}, want {self.r}")
                    pending.setdefault(rr, {"n": None, "got": {}})["n"] = int(h["n"])
                    self.r = max(self.r, rr + 1)
                    if h.get("final"):
                        self.final_round = rr
                    if h.get("dump"):
                        self.dump_rounds.add(rr)
                    self._round_t0[rr] = time.monotonic()
                elif h["t"] == M.ACK:
                    if (not self.dispatcher_process or self.batches_acked >= self.batches_sent
                            or h.get("batch") != self.batches_acked):
                        raise Rejected(f"ACK of batch {h.get('batch')!r}, want "
                                       f"{self.batches_acked} (sent {self.batches_sent})")
                    self.batches_acked += 1
                    self._rounds_made(int(h.get("batch", -1)), int(h.get("rounds", 0)))
                    c = h.get("counts")
                    if isinstance(c, dict):
                        self.dispatcher_counts = {str(x): int(y) for x, y in c.items()}
                else:
                    raise M.WireError(f"unexpected {h['t']}")
                return
            h, a = M.decode_arrays(frames)
            if h["t"] != M.RESULT:
                raise M.WireError(f"unexpected {h['t']}")
            k, rr = self._worker_of(h), int(h["round"])
            if int(h.get("gen", 0)) > self.gen[k]:
                raise M.WireError(f"RESULT from worker {k} gen {h.get('gen')!r}, an "
                                  f"incarnation not started")
            pk = pk_from("", a, self.ring) if "off" in a else _no_frames(a)
            v = a["verdict"]
            if v.dtype != np.uint8 or v.shape != (len(pk),):
                raise M.WireError("verdicts do not match the packets")
            self.entries[k] = int(h.get("entries", 0))
            self.totals["deleted"] += int(h.get("deleted", 0))
            g = int(h.get("gen", 0))
            if "stats" in h:
                self.worker_stats[(k, g)] = h["stats"]
                self.worker_counts[(k, g)] = h["counts"]
            gen = pk_from("gen.", a) if "gen.off" in a else None     # frames in the message
            if rr in pending or (self.dispatcher_process and rr >= self.next_emit):
                pending.setdefault(rr, {"n": None, "got": {}})["got"][k] = (pk, v)
                if gen is not None:
                    pending[rr].setdefault("gen", []).append(gen)
                if "ev" in a and len(a["ev"]):
                    pending[rr].setdefault("ev", []).append((a["ev"], a["evaddr"]))
            if "conn.id" in a:
                self.tables[k] = {name[5:]: x for name, x in a.items() if name.startswith("conn.")}
        except (M.WireError, KeyError, TypeError, ValueError) as e:
            self.totals["wire_errors"] += 1
            self.log(f"pool: dropped a bad result: {e}")

    def _worker_of(self, h: dict) -> int:
        k = h["worker"]
        if not (isinstance(k, int) and 0 <= k < self.n):
            raise M.WireError(f"message from unknown worker {k!r}")
        return k

    def conns(self, now: int | None = None):
        """Every worker's conns as of the end of ``run`` (Conn snapshots)."""
        from shardct.conntrack import ConnTrack
        out = []
        for k in sorted(self.tables):
            out += [c for c in ConnTrack.conns_from_rows(self.tables[k])
                    if now is None or c.expires >= now]
        return out

    def stats(self) -> dict[str, int]:
        """Counters summed over workers (each incarnation's last report). ``entries``
        counts only each worker's latest incarnation: a dead one's conns are gone (they
        are ``lost_conns`` in the totals); what it counted while alive stays."""
        latest = {}
        for k, g in self.worker_stats:
            latest[k] = max(latest.get(k, g), g)
        out = sum_counts(list(self.worker_stats.values())
                         + ([] if self.frag is None else [self.frag.stats()])
                         + ([] if self.limiter is None else [self.limiter.counters()]))
        out["entries"] = sum(int(st.get("entries", 0)) for (k, g), st in self.worker_stats.items()
                             if g == latest[k])
        return out

    def counts(self) -> dict[str, int]:
        """Protocol counters (Shard.counts) summed over workers, with the dispatcher
        process's transport counters (``wire_errors``, refused handshakes)."""
        return sum_counts([*self.worker_counts.values(), self.dispatcher_counts])

    def transport_counts(self) -> dict[str, int]:
        """This process's transport counters: the sink's ``wire_errors``, the
        supervisor's ``rejected`` control messages, refused handshakes on its listeners."""
        return {**self.sup.counts, "wire_errors": self.totals["wire_errors"]}
