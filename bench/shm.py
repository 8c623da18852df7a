"""Batch payloads between two processes: ZeroMQ ipc (today) against a shared-memory ring
(issue 12, item 4: "measure ipc vs a shared-memory ring for batch payloads, coordination
stays on ZeroMQ").

A producer (this process) moves packet batches to a consumer (a ``multiprocessing``
process, spawn) three ways, side by side in one run:

* **zmq** (today's way): ``workers.messages.encode_batch`` sent with
  ``send_multipart(copy=False)`` over ipc PUSH/PULL (a msgpack header, the frame buffer
  and off/length/ifindex/ts as raw frames); the consumer ``decode_batch``es it, which
  copies the buffer (the engine rewrites frames in place, so it must be writable).
* **ring**: a fixed-size file in /dev/shm (``--ring-mib``, 64) mapped by both sides and used
  as a byte ring. The producer copies the batch's frames into it (one numpy copy) and
  sends ``encode_arrays(BATCH, off, length, ifindex, ts; pos, nbytes, end)``: the four
  per-packet arrays as raw ZeroMQ frames, no frame bytes. The consumer views the frames
  in place (writable, no copy), validates them as ``decode_batch`` does, and sends
  ``ACK {upto}`` back: every ring byte before ``upto`` is free again (credits). The
  producer never overwrites bytes not yet acknowledged; a record never wraps: when it
  does not fit before the end of the ring the producer skips to the start.
* **ring1**: as ring, the per-packet arrays in the ring too (after the frames): the
  ZeroMQ message is one msgpack frame {pos, n, nbytes, end}.

In all three the consumer runs ``shardct.wire.parse_batch`` (the header parse) on every
batch, so a lazy copy is not free, and builds a ``PacketBatch`` of it.

Traffic: ``profiles.profile("2k", --packets, seed=3)`` (about 430 B a frame) and
``traffic.tcp_frames`` (64-byte frames), each cut into batches of ``--batches`` frames
(views of one buffer, as a dispatcher's per-worker buffer would be). Per configuration and
way, over ``--reps`` rounds (the order of the ways rotates each round; one unmeasured
round first, which also checks that the consumer parsed exactly what was sent):

* end to end ns/packet: the producer's first send (or first copy into the ring) to the
  consumer's last parsed batch (both ``time.perf_counter``, CLOCK_MONOTONIC: one clock
  for both processes);
* producer and consumer CPU ns/packet (``time.process_time`` in each process: every
  thread, ZeroMQ's I/O thread included), GB/s of frame bytes end to end;
* zmq/this: the ratio of zmq's figure to this way's in the same round (paired), median.

Medians over the rounds are printed (end to end also min-max). This VM has 2 cores that
other work may share: compare the ways within one run, by their ratios.

    PYTHONPATH=. python3 bench/shm.py [--quick] [--packets 300000] [--batches 4096,16384]
        [--traffic 2k,64] [--reps 40] [--ring-mib 64] [--budget 80] [--json FILE]

Bounded in time: every wait for the other process gives up after WAIT_S (at once if it
died), and no round of the k-th of c configurations starts after k/c of ``--budget``
seconds. The ring file is unlinked as soon as the consumer has mapped it (so even a
killed run leaves nothing in /dev/shm), and again in ``finally`` if that point was never
reached. Asserts nothing about speed.

One run (2-core VM, load 0.9-1.1, another session's tests running; 300k packets, 40
rounds, 18 s), zmq/ring1 paired medians: 2k (430 B) end to end 1.84x (R=4096) and 2.01x
(R=16384), both processes' CPU 1.69x / 2.29x (consumer 182 -> 115 and 249 -> 102 ns/packet,
parse alone 75-86); 64-byte frames 1.81x / 2.02x end to end, 1.80x / 2.01x CPU. ring (the
arrays as ZeroMQ frames) gains less: 1.55x / 1.72x on 2k, 1.21x / 1.35x on 64 B frames:
each extra frame of a message costs microseconds. So ring1 is the faster form. Here the
consumer acknowledges right after parsing; in the pool a worker holds its frames until its
RESULT is out, so a ring must hold ``window`` rounds of a worker's frame bytes.
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import zmq

from shardct import PacketBatch, wire
from workers import messages as M

MODES = ("zmq", "ring", "ring1")
ALIGN = 64             # ring records start on a cache line
WAIT_S = 20.0          # the longest either side waits for the other inside a run
START_S = 90.0         # for the consumer to import and map the ring
IDLE_POLL_MS = 200     # the consumer checks its parent this often when idle


def layout(n: int, nbytes: int) -> tuple[int, int, int, int, int]:
    """ring1's record of a batch of n frames (nbytes of them): the frames, then off and ts
    (int64), length (int32), ifindex (int16). Their offsets in the record, and its size."""
    o_off = -(-nbytes // 8) * 8
    o_ts = o_off + 8 * n
    o_len = o_ts + 8 * n
    o_if = o_len + 4 * n
    return o_off, o_ts, o_len, o_if, o_if + 2 * n


def ring_batch(ring, pos, nbytes, off, length, ifindex, ts):
    """The batch whose frames lie at ring[pos:pos+nbytes] (a writable view), validated as
    ``decode_batch`` validates a received one (raises WireError)."""
    n = off.shape[0]
    if not all(isinstance(x, int) for x in (pos, nbytes)) or not (
            0 <= pos and 0 <= nbytes and pos + nbytes <= ring.shape[0] and n <= M.MAX_PACKETS):
        raise M.WireError(f"record {pos}+{nbytes} ({n} packets) outside the ring")
    if any(a.shape[0] != n for a in (length, ifindex, ts)):
        raise M.WireError("arrays of different lengths")
    if n and (off.min() < 0 or length.min() < 0
              or int((off + length.astype(np.int64)).max()) > nbytes):
        raise M.WireError("a frame lies outside the record")
    return PacketBatch(ring[pos:pos + nbytes], off, length, ifindex, ts)


def ring1_batch(ring, h):
    """ring1: the batch a one-frame header {pos, n, nbytes} names, arrays viewed in the ring."""
    pos, n, nb = h.get("pos"), h.get("n"), h.get("nbytes")
    if not all(isinstance(x, int) for x in (pos, n, nb)) or not (
            0 <= n <= M.MAX_PACKETS and 0 <= nb and 0 <= pos):
        raise M.WireError(f"bad ring1 header {h!r:.80}")
    o_off, o_ts, o_len, o_if, size = layout(n, nb)
    if pos + size > ring.shape[0]:
        raise M.WireError(f"record {pos}+{size} outside the ring")
    r = ring[pos:pos + size]
    return ring_batch(r, 0, nb, r[o_off:o_ts].view(np.int64), r[o_len:o_if].view(np.int32),
                      r[o_if:size].view(np.int16), r[o_ts:o_len].view(np.int64))


def checksum(acc: int, meta, addr) -> int:
    """Folds one parsed batch into acc (to check that the consumer parsed what was sent)."""
    return (acc * 31 + int(meta.sum()) + int(addr.sum(dtype=np.uint64))) % (1 << 61)


# ------------------------------------------------------------------ consumer process

def consumer(eps: dict, ring_path: str, ring_bytes: int, max_n: int):
    """The consumer: maps the ring, then runs what each HELLO asks until STOP, or until
    its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the producer's finally stops us
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (rx, tx):
        s.setsockopt(zmq.LINGER, 0)
    tx.setsockopt(zmq.SNDHWM, 0)
    rx.connect(eps["data"])
    tx.connect(eps["back"])
    fd = os.open(ring_path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, ring_bytes)
    finally:
        os.close(fd)
    ring = np.frombuffer(mm, np.uint8)
    ring[::mmap.PAGESIZE] = 0           # map every page now, not during the first run
    meta, addr = wire.new_meta(max_n)
    wire.parse_batch(ring[:0], np.zeros(0, np.int64), np.zeros(0, np.int32), meta[:0],
                     addr[:0], False)   # load the compiled kernel

    def consume(h):
        mode, k, check = h["mode"], h["batches"], h["check"]
        if check:
            meta[:] = 0
            addr[:] = 0
        acc = 0
        tx.send(M.encode(M.READY))
        c0 = time.process_time()
        for _ in range(k):
            if not rx.poll(WAIT_S * 1000):
                raise TimeoutError(f"no batch in {WAIT_S} s")
            end = None
            if mode == "zmq":
                _, b, _ = M.decode_batch(rx.recv_multipart(copy=False))   # copies buf
            elif mode == "ring":
                hh, a = M.decode_arrays(rx.recv_multipart(copy=False))
                b = ring_batch(ring, hh.get("pos"), hh.get("nbytes"), a["off"], a["length"],
                               a["ifindex"], a["ts"])
                end = hh["end"]
            else:
                hh = M.decode(rx.recv())
                b = ring1_batch(ring, hh)
                end = hh["end"]
            n = len(b)
            wire.parse_batch(b.buf, b.off, b.length, meta[:n], addr[:n], False)
            if end is not None:
                tx.send(M.encode(M.ACK, upto=end))
            if check:
                if not b.buf.flags.writeable:
                    raise RuntimeError(f"{mode}: the frames are not writable")
                acc = checksum(acc, meta[:n], addr[:n])
        return {"cpu": time.process_time() - c0, "t_last": time.perf_counter(), "check": acc}

    parent = mp.parent_process()
    try:
        tx.send(M.encode(M.READY))
        while parent is None or parent.is_alive():
            if not rx.poll(IDLE_POLL_MS):
                continue
            h = M.decode(rx.recv())
            if h["t"] == M.STOP:
                break
            try:
                tx.send(M.encode(M.END, **consume(h)))
            except Exception as e:          # reported to the producer, which stops
                tx.send(M.encode(M.END, error=f"{type(e).__name__}: {e}"))
    finally:
        del ring
        mm.close()
        rx.close(0)
        tx.close(0)
        ctx.term()


# ------------------------------------------------------------------ producer

class Writer:
    """The producer's side of the ring: where the next record goes, and waiting for credits
    (``credit()`` returns the consumer's latest ACK upto). head and tail count bytes ever
    written and ever freed; unread bytes are [tail, head)."""

    def __init__(self, ring, credit):
        self.ring, self.size, self.credit = ring, ring.shape[0], credit
        self.head = self.tail = 0

    def reserve(self, nbytes: int) -> tuple[int, int]:
        """(position of a record of nbytes in the ring, head after it) once it is free."""
        need = -(-nbytes // ALIGN) * ALIGN
        if need > self.size:
            raise ValueError(f"a record of {nbytes} bytes does not fit a ring of {self.size}")
        pos = self.head % self.size
        if pos + need > self.size:             # never split a record: skip to the start
            self.head += self.size - pos
            pos = 0
        while self.head + need - self.tail > self.size:
            self.tail = max(self.tail, self.credit())
        self.head += need
        return pos, self.head


class Producer:
    def __init__(self, zctx, eps, ring):
        self.ring = ring
        self.alive = None          # the consumer process's is_alive, once started
        self.data, self.back = zctx.socket(zmq.PUSH), zctx.socket(zmq.PULL)
        for s in (self.data, self.back):
            s.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.SNDHWM, 0)       # as the pool's sockets
        self.data.bind(eps["data"])
        self.back.bind(eps["back"])

    def close(self):
        self.data.close(0)
        self.back.close(0)
        self.ring = None

    def recv(self, wait_s=WAIT_S) -> dict:
        """The consumer's next message; an END with an error raises, and so does a
        consumer that died or said nothing for wait_s."""
        alive = self.alive
        t_end = time.monotonic() + wait_s
        while not self.back.poll(IDLE_POLL_MS):
            if alive is not None and not alive():
                raise RuntimeError("the consumer process died")
            if time.monotonic() > t_end:
                raise TimeoutError(f"the consumer said nothing in {wait_s} s")
        h = M.decode(self.back.recv())
        if h.get("error"):
            raise RuntimeError(f"consumer: {h['error']}")
        return h

    def credit(self) -> int:
        h = self.recv()
        if h["t"] != M.ACK:
            raise RuntimeError(f"want ACK, got {h['t']}")
        return h["upto"]

    def run(self, mode: str, batches: list, check: bool) -> dict:
        """One run: every batch to the consumer; times and the consumer's report."""
        data, ring = self.data, self.ring
        data.send(M.encode(M.HELLO, mode=mode, batches=len(batches), check=check))
        if self.recv()["t"] != M.READY:
            raise RuntimeError("want READY")
        w = Writer(ring, self.credit)
        c0, t0 = time.process_time(), time.perf_counter()
        for i, b in enumerate(batches):
            if mode == "zmq":
                data.send_multipart(M.encode_batch(b, seq=i), copy=False)
            elif mode == "ring":
                nb = b.buf.shape[0]
                pos, end = w.reserve(nb)
                ring[pos:pos + nb] = b.buf
                data.send_multipart(M.encode_arrays(
                    M.BATCH, {"off": b.off, "length": b.length, "ifindex": b.ifindex,
                              "ts": b.ts}, seq=i, pos=pos, nbytes=nb, end=end), copy=False)
            else:
                n, nb = len(b), b.buf.shape[0]
                o_off, o_ts, o_len, o_if, size = layout(n, nb)
                pos, end = w.reserve(size)
                r = ring[pos:pos + size]
                r[:nb] = b.buf
                r[o_off:o_ts].view(np.int64)[:] = b.off
                r[o_ts:o_len].view(np.int64)[:] = b.ts
                r[o_len:o_if].view(np.int32)[:] = b.length
                r[o_if:size].view(np.int16)[:] = b.ifindex
                data.send(M.encode(M.BATCH, seq=i, pos=pos, n=n, nbytes=nb, end=end))
        while True:
            h = self.recv()
            if h["t"] == M.END:
                break
            w.tail = h["upto"]                       # late credits
        cpu = time.process_time() - c0
        return {"e2e": h["t_last"] - t0, "prod_cpu": cpu, "cons_cpu": h["cpu"],
                "check": h["check"]}


# ------------------------------------------------------------------ traffic

def traffic(name: str, packets: int):
    if name == "64":
        from shardct import traffic as T
        return T.tcp_frames(2000, packets, seed=3)[0]
    from shardct import profiles as P
    return P.profile(name, packets, seed=3).batch


def cut(batch, r: int) -> list:
    """Batches of r frames, views of batch's buffer (its frames lie back to back)."""
    out = []
    for s in range(0, len(batch), r):
        e = min(s + r, len(batch))
        lo = int(batch.off[s])
        hi = int(batch.off[e - 1]) + int(batch.length[e - 1])
        off = batch.off[s:e] - lo
        out.append(PacketBatch(batch.buf[lo:hi], off, batch.length[s:e].copy(),
                               batch.ifindex[s:e].copy(), batch.ts[s:e].copy()))
    return out


def expected(batches, max_n) -> tuple[int, float]:
    """What the consumer's checksum must be (the same parses, here), and the least time
    of three for those parses alone (seconds): the consumer's floor."""
    meta, addr = wire.new_meta(max_n)
    acc, best = 0, float("inf")
    for k in range(3):
        t0 = time.perf_counter()
        for b in batches:
            n = len(b)
            wire.parse_batch(b.buf, b.off, b.length, meta[:n], addr[:n], False)
            if k == 0:
                acc = checksum(acc, meta[:n], addr[:n])
        if k:
            best = min(best, time.perf_counter() - t0)
    return acc, best


# ------------------------------------------------------------------ report

def summarize(rows: list, modes) -> list:
    """Per configuration and way: medians over rounds, and zmq/this paired by round."""
    out = []
    for key in dict.fromkeys((r["traffic"], r["batch"]) for r in rows):
        rs = [r for r in rows if (r["traffic"], r["batch"]) == key]
        base = {r["rep"]: r for r in rs if r["mode"] == "zmq"}
        for mode in modes:
            m = [r for r in rs if r["mode"] == mode]
            if not m:
                continue
            p, nb = m[0]["packets"], m[0]["bytes"]
            e2e = np.array([r["e2e"] for r in m]) / p * 1e9
            cpu = np.array([r["prod_cpu"] + r["cons_cpu"] for r in m])
            pairs = [(base[r["rep"]], r) for r in m if r["rep"] in base]
            out.append({
                "traffic": key[0], "batch": key[1], "mode": mode, "rounds": len(m),
                "e2e_ns": float(np.median(e2e)), "e2e_min": float(e2e.min()),
                "e2e_max": float(e2e.max()),
                "prod_ns": float(np.median([r["prod_cpu"] for r in m])) / p * 1e9,
                "cons_ns": float(np.median([r["cons_cpu"] for r in m])) / p * 1e9,
                "gbps": float(np.median([nb / r["e2e"] for r in m])) / 1e9,
                "ratio_e2e": float(np.median([a["e2e"] / b["e2e"] for a, b in pairs]))
                if pairs else None,
                "ratio_cpu": float(np.median(
                    [(a["prod_cpu"] + a["cons_cpu"]) / (b["prod_cpu"] + b["cons_cpu"])
                     for a, b in pairs])) if pairs else None,
                "cpu_ns": float(np.median(cpu)) / p * 1e9})
    return out


def print_table(summary: list):
    print(f"{'traffic':>7} {'batch':>6} {'way':>5} | {'e2e ns/pkt (min-max)':>22} "
          f"{'prod CPU':>8} {'cons CPU':>8} {'GB/s':>5} | {'zmq/this e2e':>12} "
          f"{'zmq/this CPU':>12}")
    for s in summary:
        rng = f"{s['e2e_ns']:.0f} ({s['e2e_min']:.0f}-{s['e2e_max']:.0f})"
        ratio = (f"{s['ratio_e2e']:12.2f} {s['ratio_cpu']:12.2f}"
                 if s["ratio_e2e"] is not None else "")
        print(f"{s['traffic']:>7} {s['batch']:>6} {s['mode']:>5} | {rng:>22} "
              f"{s['prod_ns']:8.0f} {s['cons_ns']:8.0f} {s['gbps']:5.2f} | {ratio}")


# ------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="100k packets, 10 rounds, budget 15 s (unless given)")
    ap.add_argument("--packets", type=int)
    ap.add_argument("--batches", default="4096,16384")
    ap.add_argument("--traffic", default="2k,64", help="profile names, or 64 (64-byte frames)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--ring-mib", type=int, default=64)
    ap.add_argument("--budget", type=float,
                    help="seconds (80; --quick 15) after which no round starts")
    ap.add_argument("--shm-dir", default="/dev/shm")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    packets = a.packets or (100_000 if a.quick else 300_000)
    reps = a.reps or (10 if a.quick else 40)
    budget = a.budget or (15.0 if a.quick else 80.0)
    sizes = [int(x) for x in a.batches.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: want some of {', '.join(MODES)}")
    ring_bytes = a.ring_mib << 20
    t_start = time.monotonic()
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))   # so finally runs

    tmp = tempfile.mkdtemp(prefix="shardct-shm-")
    eps = {"data": f"ipc://{tmp}/data", "back": f"ipc://{tmp}/back"}
    ring_path = mm = proc = zctx = prod = None
    try:
        fd, ring_path = tempfile.mkstemp(prefix="shardct-ring-", dir=a.shm_dir)
        try:
            os.posix_fallocate(fd, 0, ring_bytes)      # no SIGBUS later on a full tmpfs
            mm = mmap.mmap(fd, ring_bytes)
        finally:
            os.close(fd)
        zctx = zmq.Context()
        prod = Producer(zctx, eps, np.frombuffer(mm, np.uint8))
        proc = mp.get_context("spawn").Process(
            target=consumer, args=(eps, ring_path, ring_bytes, max(sizes)), daemon=True,
            name="shm-consumer")
        proc.start()
        prod.alive = proc.is_alive
        prod.recv(wait_s=START_S)          # it has mapped the ring
        os.unlink(ring_path)
        ring_path = None
        print(f"{packets} packets a run, batches {sizes}, ring {a.ring_mib} MiB, "
              f"{reps} rounds (+1 unmeasured), load {os.getloadavg()[0]:.2f}", flush=True)
        rows, stopped = [], False
        configs = [(t, r) for t in a.traffic.split(",") for r in sizes]
        for tname in a.traffic.split(","):
            full = traffic(tname, packets)
            nbytes = int(full.length.astype(np.int64).sum())
            print(f"traffic {tname}: {len(full)} frames, {nbytes / len(full):.0f} B avg",
                  flush=True)
            for r in sizes:
                batches = cut(full, r)
                want, alone = expected(batches, max(sizes))
                print(f"  batches of {r}: parse alone {alone / len(full) * 1e9:.0f} ns/packet "
                      "(the consumer's floor)", flush=True)
                for rep in range(-1, reps):
                    share = (configs.index((tname, r)) + 1) / len(configs)
                    if rep >= 0 and time.monotonic() - t_start > budget * share:
                        stopped = True
                        break
                    k = rep % len(modes)
                    for mode in modes[k:] + modes[:k]:
                        res = prod.run(mode, batches, check=rep < 0)
                        if rep < 0 and res["check"] != want:
                            raise RuntimeError(f"{mode}: the consumer parsed other frames")
                        if rep >= 0:
                            rows.append({"traffic": tname, "batch": r, "mode": mode, "rep": rep,
                                         "packets": len(full), "bytes": nbytes, **res})
        prod.data.send(M.encode(M.STOP))
        proc.join(10)
        summary = summarize(rows, modes)
        print(f"ns per packet; load {os.getloadavg()[0]:.2f}; {time.monotonic() - t_start:.0f} s"
              + ("; budget reached, fewer rounds" if stopped else ""))
        print_table(summary)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rows": rows, "summary": summary}, f, indent=1)
    finally:
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if prod is not None:
            prod.close()
        if zctx is not None:
            zctx.term()
        if mm is not None:
            try:
                mm.close()
            except BufferError:     # views held by a traceback: the mapping goes at exit
                pass
        if ring_path is not None:
            try:
                os.unlink(ring_path)
            except FileNotFoundError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
