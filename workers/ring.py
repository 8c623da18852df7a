# The pool's shared-memory frame ring: input frames are copied in once, by the pool;
# the dispatcher, the workers and the sink then pass only per-frame arrays (offsets
# into the ring) over ZeroMQ, and NAT rewrites frames where they lie.
"""Frame ring.

One file in ``/dev/shm`` mapped by every process of one pool. The pool is its only
allocator: :meth:`FrameRing.put` copies a batch into the next free stretch (batches are
never split; the ring wraps between them) and returns it as a ``shared`` PacketBatch on
the ring plus a ticket. Space comes back in allocation order, with :meth:`release`,
once every round made from that batch has been emitted: before that a frame is owned by
exactly one process at a time (the dispatcher, the shard that holds the packet, then
the sink), and ZeroMQ messages pass that ownership on.

Only for processes on one host: with ``tcp://`` endpoints the frames travel in the
messages as before.
"""
from __future__ import annotations

import mmap
import os
import secrets
from collections import deque

import numpy as np

from shardct.batch import PacketBatch, place
from shardct.frag import place_screened

DEFAULT_BYTES = 256 << 20
SHM_DIR = "/dev/shm"


class FrameRing:
    def __init__(self, path: str, create: bool = False, size: int = DEFAULT_BYTES):
        """Map the ring at ``path`` (``create``: make it, ``size`` bytes)."""
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            size = os.fstat(fd).st_size
            # every page mapped now: a first touch per 4 KiB page while packets flow
            # costs more than copying the frames
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path, self.size = path, size
        self.buf = np.frombuffer(self._map, dtype=np.uint8)
        self.live: deque[tuple[int, int, int]] = deque()   # (ticket, start, end), oldest first
        self.next_ticket = 0

    @classmethod
    def create(cls, size: int = DEFAULT_BYTES) -> "FrameRing":
        d = SHM_DIR if os.path.isdir(SHM_DIR) else None
        if d is None:
            raise OSError(f"{SHM_DIR} is missing: the frame ring needs shared memory")
        return cls(os.path.join(d, f"shardct-ring-{os.getpid()}-{secrets.token_hex(4)}"),
                   create=True, size=size)

    def unlink(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------- allocation (pool only)
    def _start(self, need: int) -> int | None:
        if not self.live:
            return 0 if need <= self.size else None
        tail, head = self.live[0][1], self.live[-1][2]
        if head > tail:                     # one stretch [tail, head): room after, or before
            if self.size - head >= need:
                return head
            return 0 if need <= tail else None
        return head if tail - head >= need else None      # wrapped: room in [head, tail)

    def put(self, batch: PacketBatch, screen: bool = False):
        """``batch`` copied into the ring, and its ticket; None when there is no room
        now (release some and try again). ``screen``: also whether a frame may be an IP
        fragment (frag.place_screened, read while copying). Precondition: ``fits(batch)``."""
        need = int(batch.length.astype(np.int64).sum())
        at = self._start(max(need, 1))
        if at is None:
            return None
        t = self.next_ticket
        self.next_ticket += 1
        self.live.append((t, at, at + max(need, 1)))
        if screen:
            got, maybe = place_screened(batch, self.buf, at)
            return got, t, maybe
        return place(batch, self.buf, at), t

    def fits(self, batch: PacketBatch) -> bool:
        """A batch this ring can ever take (a quarter of it at most, so that batches
        before it can stay in flight)."""
        return int(batch.length.astype(np.int64).sum()) <= self.size // 4

    def release(self, ticket: int):
        """Give back every stretch up to and including ``ticket``'s."""
        while self.live and self.live[0][0] <= ticket:
            self.live.popleft()

    # ---------------------------------------------------------------- readers
    def batch(self, off, length, ifindex, ts) -> PacketBatch:
        """A received batch's frames, on the ring. Raises ValueError if one lies outside."""
        return frames_on(self.buf, off, length, ifindex, ts, shared=True)


def frames_on(buf, off, length, ifindex, ts, shared: bool = False) -> PacketBatch:
    """A received batch's frames on ``buf`` (a ring's, or one that came with them), as a
    PacketBatch. Raises ValueError if an array has the wrong type or a frame lies outside."""
    n = off.shape[0]
    for x, dt in ((off, np.int64), (length, np.int32), (ifindex, np.int16), (ts, np.int64)):
        if x.dtype != dt or x.shape != (n,):
            raise ValueError(f"frame array of {x.dtype} {x.shape}, want {np.dtype(dt)} ({n},)")
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise ValueError(f"frame buffer of {buf.dtype}/{buf.ndim}d, want uint8")
    if n and (off.min() < 0 or length.min() < 0
              or int((off + length.astype(np.int64)).max()) > buf.shape[0]):
        raise ValueError("a frame lies outside the buffer")
    return PacketBatch(buf, off, length, ifindex, ts, shared)
