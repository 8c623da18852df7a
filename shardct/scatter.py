# The dispatcher's split of a batch into one batch per owning worker (key-affine: each
# packet goes to the owner of its tuple's bucket), by a counting sort; order is kept
# within each worker, so per-flow order holds end to end.
"""Scattering a batch to workers.

``owners(hashes, n_workers, n_buckets)``: owner of each packet, the worker whose
contiguous bucket slice holds ``hash % n_buckets`` (hashing.owner_slices). Packets with
no tuple (hash -1: not IP, broken headers, non-first fragments) go to worker 0, which
gives them their verdict and counter like any other worker would.

``scatter(batch, hashes, n_workers, n_buckets)`` returns one (PacketBatch, hashes,
index) per worker; ``index`` maps each packet back to its place in the input. A
``shared`` batch (frames in the pool's shared ring) is split into views: no frame moves;
any other batch is copied once, each worker's frames one region of one buffer.
``group`` is the split itself (a counting sort by owner), for callers that carry more
per-packet arrays along (the pool's dispatcher). ``SeqOrder`` is the way back: packets
from several workers into sequence order.
"""
from __future__ import annotations

import numba
import numpy as np

from .batch import PacketBatch, take
from .hashing import owners


@numba.njit(cache=True)
def group(owner, n_workers, order, bounds):
    """A stable counting sort by owner: worker k's packets are order[bounds[k]:bounds[k+1]],
    in input order. order: int64[len(owner)], bounds: int64[n_workers + 1] (written)."""
    bounds[:] = 0
    for i in range(owner.shape[0]):
        bounds[owner[i] + 1] += 1
    for k in range(n_workers):
        bounds[k + 1] += bounds[k]
    nxt = bounds[:n_workers].copy()
    for i in range(owner.shape[0]):
        k = owner[i]
        order[nxt[k]] = i
        nxt[k] += 1


@numba.njit(cache=True)
def _copy(buf, off, length, order, out_buf, out_off):
    """Copy the frames in ``order`` one after the other into out_buf."""
    o = np.uint64(0)
    for j in range(order.shape[0]):
        i = order[j]
        ln = np.uint64(length[i])
        s = np.uint64(off[i])
        for b in range(ln):        # unsigned: no wraparound test, the loop vectorizes
            out_buf[o + b] = buf[s + b]
        out_off[j] = o
        o += ln


def by_owner(owner: np.ndarray, n: int):
    """(k, idx) for each owner k in 0..n-1 that ``owner`` (int64) names, idx the places
    naming it in input order: one counting sort (``group``) where a unique and a mask
    per owner took a sort and n more passes. Raises ValueError for an owner outside
    0..n-1 (``group`` would write out of bounds)."""
    if owner.shape[0] and not (0 <= int(owner.min()) and int(owner.max()) < n):
        raise ValueError(f"owners {int(owner.min())}..{int(owner.max())} outside 0..{n - 1}")
    order = np.empty(owner.shape[0], dtype=np.int64)
    bounds = np.empty(n + 1, dtype=np.int64)
    group(owner, n, order, bounds)
    for k in range(n):
        if bounds[k + 1] > bounds[k]:
            yield k, order[bounds[k]:bounds[k + 1]]


def frames_in_order(batch: PacketBatch, order: np.ndarray) -> PacketBatch:
    """The frames of batch in ``order``: views on a shared batch's buffer (no frame
    moves), else one compact copy."""
    if batch.shared:
        return take(batch, order)
    length = batch.length[order]
    out_buf = np.empty(int(length.sum()), dtype=np.uint8)
    out_off = np.empty(len(order), dtype=np.int64)
    _copy(batch.buf, batch.off, batch.length, order, out_buf, out_off)
    return PacketBatch(out_buf, out_off, length, batch.ifindex[order], batch.ts[order])


def scatter(batch: PacketBatch, hashes: np.ndarray, n_workers: int, n_buckets: int):
    owner = owners(hashes, n_workers, n_buckets)
    order = np.empty(len(batch), dtype=np.int64)
    bounds = np.empty(n_workers + 1, dtype=np.int64)
    group(owner, n_workers, order, bounds)
    whole = frames_in_order(batch, order)
    return [(part_of(whole, int(bounds[k]), int(bounds[k + 1])), hashes[order[bounds[k]:bounds[k + 1]]],
             order[bounds[k]:bounds[k + 1]]) for k in range(n_workers)]


def part_of(whole: PacketBatch, s: int, e: int) -> PacketBatch:
    """Frames s..e of a batch from ``frames_in_order``: views; unless shared, on their
    own region of the buffer only (a part carries only its own frames' bytes)."""
    if whole.shared or s == e:
        return PacketBatch(whole.buf if whole.shared else whole.buf[:0], whole.off[s:e],
                           whole.length[s:e], whole.ifindex[s:e], whole.ts[s:e], whole.shared)
    lo = int(whole.off[s])
    hi = int(whole.off[e - 1]) + int(whole.length[e - 1])
    return PacketBatch(whole.buf[lo:hi], whole.off[s:e] - lo, whole.length[s:e],
                       whole.ifindex[s:e], whole.ts[s:e])


@numba.njit(cache=True)
def _dense_order(seq, lo, slot, out):
    """out = the order of seq (each seq[i] - lo indexes ``slot``); False when a number
    repeats (out is then unusable)."""
    slot[:] = -1
    for i in range(seq.shape[0]):
        p = seq[i] - lo
        if slot[p] >= 0:
            return False
        slot[p] = i
    j = 0
    for p in range(slot.shape[0]):
        if slot[p] >= 0:
            out[j] = slot[p]
            j += 1
    return True


class SeqOrder:
    """``order(seq)``: the permutation that sorts ``seq`` (int64), stably. A round's
    packets are distinct numbers from one range, with gaps only for what was lost or
    held back: they are placed by number in one pass, in a slot array kept from call to
    call (a fresh one costs a page fault per 4 KiB), where a sort of a 64k round cost
    the pool's sink about a tenth of its time. Anything else is sorted. Owner: one
    thread."""

    def __init__(self):
        self._slot = np.empty(0, dtype=np.int64)

    def __call__(self, seq: np.ndarray) -> np.ndarray:
        n = seq.shape[0]
        if n > 1:
            lo, hi = int(seq.min()), int(seq.max())
            if hi - lo < 4 * n:
                if self._slot.shape[0] <= hi - lo:
                    self._slot = np.empty(max(hi - lo + 1, 2 * self._slot.shape[0]), np.int64)
                out = np.empty(n, dtype=np.int64)
                if _dense_order(seq, lo, self._slot[:hi - lo + 1], out):
                    return out
        return np.argsort(seq, kind="stable")
