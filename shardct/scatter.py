# The dispatcher's split of a batch into one batch per owning worker (key-affine: each
# packet goes to the owner of its tuple's bucket), in two numba passes; order is kept
# within each worker, so per-flow order holds end to end.
"""Scattering a batch to workers.

``owners(hashes, n_workers, n_buckets)``: owner of each packet, the worker whose
contiguous bucket slice holds ``hash % n_buckets`` (hashing.owner_slices). Packets with
no tuple (hash -1: not IP, broken headers, non-first fragments) go to worker 0, which
gives them their verdict and counter like any other worker would.

``scatter(batch, hashes, n_workers, n_buckets)`` returns one (PacketBatch, hashes,
index) per worker; ``index`` maps each packet back to its place in the input. A
``shared`` batch (frames in the pool's shared ring) is split into views: no frame moves.
"""
from __future__ import annotations

import numba
import numpy as np

from .batch import PacketBatch, take
from .hashing import owners


@numba.njit(cache=True)
def _plan(owner, length, n_workers):
    """Per-worker packet and byte counts."""
    npk = np.zeros(n_workers, dtype=np.int64)
    nby = np.zeros(n_workers, dtype=np.int64)
    for i in range(owner.shape[0]):
        npk[owner[i]] += 1
        nby[owner[i]] += length[i]
    return npk, nby


@numba.njit(cache=True)
def _copy(buf, off, length, owner, pk_start, by_start, out_buf, out_off, out_idx):
    """Copy each frame into its worker's region, in input order."""
    pk_next = pk_start.copy()
    by_next = by_start.copy()
    for i in range(owner.shape[0]):
        k = owner[i]
        j = pk_next[k]
        o = np.uint64(by_next[k])
        ln = np.uint64(length[i])
        s = np.uint64(off[i])
        for b in range(ln):        # unsigned: no wraparound test, the loop vectorizes
            out_buf[o + b] = buf[s + b]
        out_off[j] = o
        out_idx[j] = i
        pk_next[k] = j + 1
        by_next[k] = o + ln


def scatter(batch: PacketBatch, hashes: np.ndarray, n_workers: int, n_buckets: int):
    owner = owners(hashes, n_workers, n_buckets)
    if batch.shared:
        order = np.argsort(owner, kind="stable")
        ends = np.searchsorted(owner[order], np.arange(1, n_workers + 1))
        starts = np.concatenate(([0], ends[:-1]))
        return [(take(batch, order[s:e]), hashes[order[s:e]], order[s:e])
                for s, e in zip(starts, ends)]
    npk, nby = _plan(owner, batch.length, n_workers)
    pk_start = np.concatenate(([0], np.cumsum(npk)[:-1])).astype(np.int64)
    by_start = np.concatenate(([0], np.cumsum(nby)[:-1])).astype(np.int64)
    out_buf = np.empty(int(nby.sum()), dtype=np.uint8)
    out_off = np.empty(len(batch), dtype=np.int64)
    out_idx = np.empty(len(batch), dtype=np.int64)
    _copy(batch.buf, batch.off, batch.length, owner, pk_start, by_start, out_buf, out_off, out_idx)
    parts = []
    for k in range(n_workers):
        s, e = int(pk_start[k]), int(pk_start[k] + npk[k])
        idx = out_idx[s:e]
        bs, be = int(by_start[k]), int(by_start[k] + nby[k])
        parts.append((PacketBatch(out_buf[bs:be], out_off[s:e] - bs, batch.length[idx],
                                  batch.ifindex[idx], batch.ts[idx]), hashes[idx], idx))
    return parts
