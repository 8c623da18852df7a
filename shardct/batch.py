# A batch of frames: one contiguous byte buffer plus per-frame arrays.
# This is the unit every kernel, the wire format and every source/sink share.
# Pure data: no I/O here.
"""Packet batches.

A batch holds n frames back to back in ``buf``; frame i is
``buf[off[i] : off[i] + length[i]]``.  Frames start at the Ethernet header.

Fields (all numpy arrays, C-contiguous):

=========  =======  ====================================================
buf        uint8    the bytes of every frame
off        int64    start of frame i in ``buf``
length     int32    captured length of frame i
ifindex    int16    ingress interface id (index into the engine's interface
                    name table); -1 when unknown
ts         int64    timestamp of frame i, nanoseconds (the replay clock)
=========  =======  ====================================================

Owner: whoever built it; kernels read ``buf`` and may rewrite frames in
place (NAT), never move them; router mode may shorten ``length[i]`` (a trailer past
the IP datagram is cut off), never lengthen it.

``shared``: ``buf`` is a region other batches use too (the pool's shared-memory frame
ring): ``take`` and ``concat`` then give views on it instead of copies, and only the
per-frame arrays travel between processes. Precondition: each frame is in one live
batch at a time (whoever holds it may rewrite it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass
class PacketBatch:
    buf: np.ndarray
    off: np.ndarray
    length: np.ndarray
    ifindex: np.ndarray
    ts: np.ndarray
    shared: bool = False

    def __len__(self) -> int:
        return int(self.off.shape[0])

    def frame(self, i: int) -> bytes:
        o = int(self.off[i])
        return self.buf[o : o + int(self.length[i])].tobytes()

    def frames(self) -> list[bytes]:
        return [self.frame(i) for i in range(len(self))]

    @classmethod
    def from_frames(cls, frames, ts=None, ifindex=None) -> "PacketBatch":
        """Build a batch from an iterable of bytes (tests, generators)."""
        frames = [bytes(f) for f in frames]
        n = len(frames)
        length = np.fromiter((len(f) for f in frames), dtype=np.int32, count=n)
        off = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(length[:-1], out=off[1:])
        buf = np.frombuffer(b"".join(frames), dtype=np.uint8).copy()
        if ts is None:
            ts_arr = np.zeros(n, dtype=np.int64)
        else:
            ts_arr = np.broadcast_to(np.asarray(ts, dtype=np.int64), (n,)).copy()
        if ifindex is None:
            if_arr = np.full(n, -1, dtype=np.int16)
        else:
            if_arr = np.broadcast_to(np.asarray(ifindex, dtype=np.int16), (n,)).copy()
        return cls(buf, off, length, if_arr, ts_arr)

    @classmethod
    def empty(cls) -> "PacketBatch":
        return cls.from_frames([])


@numba.njit(cache=True)
def _gather(buf, off, length, idx, out, out_off):
    # unsigned positions: numba then skips its negative-index wraparound test, which
    # otherwise keeps the byte loop from vectorizing (8x slower)
    o = np.uint64(0)
    for j in range(idx.shape[0]):
        i = idx[j]
        s = np.uint64(off[i])
        n = np.uint64(length[i])
        for b in range(n):
            out[o + b] = buf[s + b]
        out_off[j] = o
        o += n


def take(batch: PacketBatch, idx: np.ndarray) -> PacketBatch:
    """A new batch of frames ``idx`` of ``batch`` in that order (copied; a view on the
    same buffer when ``batch.shared``)."""
    idx = np.asarray(idx, dtype=np.int64)
    length = batch.length[idx]
    if batch.shared:
        return PacketBatch(batch.buf, batch.off[idx], length, batch.ifindex[idx], batch.ts[idx],
                           True)
    return _copy(batch, idx, length)


def _copy(batch: PacketBatch, idx: np.ndarray, length: np.ndarray) -> PacketBatch:
    out = np.empty(int(length.astype(np.int64).sum()), dtype=np.uint8)
    out_off = np.empty(idx.shape[0], dtype=np.int64)
    _gather(batch.buf, batch.off, batch.length, idx, out, out_off)
    return PacketBatch(out, out_off, length, batch.ifindex[idx], batch.ts[idx])


def place(batch: PacketBatch, buf: np.ndarray, at: int) -> PacketBatch:
    """Copy ``batch``'s frames into ``buf`` from byte ``at`` on, back to back; the copy
    as a ``shared`` batch on ``buf``. Precondition: they fit."""
    n = len(batch)
    out_off = np.empty(n, dtype=np.int64)
    need = int(batch.length.astype(np.int64).sum())
    _gather(batch.buf, batch.off, batch.length, np.arange(n, dtype=np.int64),
            buf[at:at + need], out_off)
    out_off += at
    return PacketBatch(buf, out_off, batch.length.copy(), batch.ifindex.copy(), batch.ts.copy(),
                       True)


def compact(batch: PacketBatch) -> PacketBatch:
    """``batch`` itself when its buffer holds little but its frames, else a copy of just
    its frames (a batch read from a capture is a view on the whole file: sending it
    as it is would carry the file). Never ``shared``: the copy is the caller's."""
    need = int(batch.length.astype(np.int64).sum())
    if batch.buf.shape[0] <= 2 * need + 4096 and not batch.shared:
        return batch
    return _copy(batch, np.arange(len(batch), dtype=np.int64), batch.length)


def concat(batches: list[PacketBatch]) -> PacketBatch:
    """One batch holding every frame of ``batches`` in order (buffers copied, unless
    every batch is ``shared`` on one buffer: then a view on it)."""
    batches = [b for b in batches if len(b)]
    if not batches:
        return PacketBatch.empty()
    if len(batches) == 1:
        return batches[0]
    if all(b.shared and b.buf is batches[0].buf for b in batches):
        return PacketBatch(batches[0].buf, *(np.concatenate([getattr(b, f) for b in batches])
                                             for f in ("off", "length", "ifindex", "ts")), True)
    bufs, offs, base = [], [], 0
    for b in batches:
        bufs.append(b.buf)
        offs.append(b.off + base)
        base += b.buf.shape[0]
    return PacketBatch(np.concatenate(bufs), np.concatenate(offs),
                       np.concatenate([b.length for b in batches]),
                       np.concatenate([b.ifindex for b in batches]),
                       np.concatenate([b.ts for b in batches]))
