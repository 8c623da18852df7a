# AF_PACKET source and sink with memory-mapped rings (the kernel's packet_mmap): frames
# come out of a TPACKET_V3 RX ring and go into a TPACKET_V2 TX ring by numba kernels, a
# batch at a time; Python only polls the sockets, orders batches and flushes the TX ring.
# Rules from the kernel's Documentation/networking/packet_mmap.rst and net/packet/af_packet.c.
"""AF_PACKET rings.

``RxRing(ifname)`` maps a TPACKET_V3 receive ring (blocks of frames the kernel retires
when full or after ``timeout_ms``); ``read(timeout_s)`` copies every retired block into
one PacketBatch (timestamps from the kernel, ``ifindex`` as given) and hands the blocks
back. ``RxRing(ifname, version=2)`` maps a TPACKET_V2 ring instead: one slot per frame,
each readable as soon as the kernel has written it (no retire timer: what an inline
router wants; a V3 block waits up to ``timeout_ms``, 1 ms at least, for its timer);
frames longer than a slot are not read but counted in ``truncated``. Frames this host sends on the interface are ignored (PACKET_IGNORE_OUTGOING), so a
router may receive and transmit on one interface. ``poll_stats()`` adds the kernel's
PACKET_STATISTICS (which reading resets) to ``packets``, ``drops`` and ``freezes``; a
frame the kernel could not put in the ring is counted there and nowhere else.

``RingMerge(rings)`` reads several rings and returns their frames in kernel-timestamp
order (see its docstring for why it holds frames back); ``ring_batches`` is the live
source built on it.

``TxRing(ifname)`` maps a TPACKET_V2 transmit ring; ``send(batch, mask)`` writes the
selected frames into free slots and asks the kernel to send them (one send(2) per call,
more only when the ring is full). Frames larger than a slot are not sent and counted in
``too_big``.

Owner: one thread per ring. Needs CAP_NET_RAW (root).
"""
from __future__ import annotations

import mmap
import select
import socket
import struct
import time

import numba
import numpy as np

from shardct.batch import PacketBatch, take

SOL_PACKET = 263
PACKET_RX_RING, PACKET_VERSION, PACKET_TX_RING = 5, 10, 13
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2, TPACKET_V3 = 1, 2
ETH_P_ALL = 0x0003
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
TP_STATUS_AVAILABLE, TP_STATUS_SEND_REQUEST = 0, 1
TX_DATA = 32          # TPACKET2_HDRLEN - sizeof(struct sockaddr_ll): where a TX frame starts


@numba.njit(inline="always", cache=True)
def _u32(a, o):
    return (np.uint32(a[o]) | (np.uint32(a[o + 1]) << 8) | (np.uint32(a[o + 2]) << 16)
            | (np.uint32(a[o + 3]) << 24))


@numba.njit(inline="always", cache=True)
def _put32(a, o, v):
    a[o] = v & 0xFF
    a[o + 1] = (v >> 8) & 0xFF
    a[o + 2] = (v >> 16) & 0xFF
    a[o + 3] = (v >> 24) & 0xFF


@numba.njit(inline="always", cache=True)
def _copy_frame(ring, hdr, mac_at, snap, out, o, out_off, out_len, out_ts, n, ts):
    """Frame n: the snap bytes at hdr + the u16 at mac_at (the header's tp_mac) to
    out[o:], with its offset, length and time."""
    src = hdr + (np.uint64(ring[mac_at]) | (np.uint64(ring[mac_at + np.uint64(1)]) << np.uint64(8)))
    for j in range(snap):
        out[o + j] = ring[src + j]
    out_off[n] = o
    out_len[n] = snap
    out_ts[n] = ts


@numba.njit(cache=True)
def rx_drain(ring, block_size, n_blocks, block, out, out_off, out_len, out_ts):
    """Copy every frame of the retired blocks from ``block`` on into out (whole blocks
    only, while they fit), give the blocks back to the kernel. Returns (frames, next
    block). Host byte order: little-endian (x86, arm64)."""
    n = 0
    o = np.uint64(0)
    cap_frames = out_off.shape[0]
    cap_bytes = np.uint64(out.shape[0])
    for _ in range(n_blocks):
        b = np.uint64(block) * np.uint64(block_size)
        if _u32(ring, b + np.uint64(8)) & TP_STATUS_USER == 0:
            break
        npk = _u32(ring, b + np.uint64(12))
        blen = np.uint64(_u32(ring, b + np.uint64(20)))
        if n + npk > cap_frames or o + blen > cap_bytes:
            break
        p = b + np.uint64(_u32(ring, b + np.uint64(16)))
        for _k in range(npk):
            sec = np.int64(_u32(ring, p + np.uint64(4)))
            nsec = np.int64(_u32(ring, p + np.uint64(8)))
            snap = np.uint64(_u32(ring, p + np.uint64(12)))
            _copy_frame(ring, p, p + np.uint64(24), snap, out, o, out_off, out_len, out_ts, n,
                        sec * 1_000_000_000 + nsec)
            o += snap
            n += 1
            nxt = np.uint64(_u32(ring, p))
            p += nxt
        _put32(ring, b + np.uint64(8), TP_STATUS_KERNEL)
        block = (block + 1) % n_blocks
    return n, block


@numba.njit(cache=True)
def rx2_drain(ring, frame_size, n_frames, head, max_n, out, out_off, out_len, out_ts):
    """Copy up to max_n frames from the TPACKET_V2 slots the kernel handed over, from
    ``head`` on, into out (while they fit), give the slots back. A frame cut short by
    the slot (tp_snaplen < tp_len) is given back uncopied. Returns (frames, new head,
    frames cut short)."""
    n = 0
    cut = 0
    o = np.uint64(0)
    cap = np.uint64(out.shape[0])
    max_n = min(max_n, out_off.shape[0])
    while n < max_n:
        s = np.uint64(head) * np.uint64(frame_size)
        if _u32(ring, s) & TP_STATUS_USER == 0:
            break
        ln = _u32(ring, s + np.uint64(4))
        snap = np.uint64(_u32(ring, s + np.uint64(8)))
        if snap < ln:
            cut += 1
        else:
            if o + snap > cap:
                break
            _copy_frame(ring, s, s + np.uint64(12), snap, out, o, out_off, out_len, out_ts, n,
                        np.int64(_u32(ring, s + np.uint64(16))) * 1_000_000_000
                        + np.int64(_u32(ring, s + np.uint64(20))))
            o += snap
            n += 1
        _put32(ring, s, TP_STATUS_KERNEL)
        head = (head + 1) % n_frames
    return n, head, cut


@numba.njit(cache=True)
def tx_fill(ring, frame_size, n_frames, head, buf, off, length, mask):
    """Write the frames with mask[i] into free slots from ``head``. Returns (index of the
    first frame not written, new head, frames written, too big)."""
    room = frame_size - TX_DATA
    written = 0
    big = 0
    for i in range(off.shape[0]):
        if not mask[i]:
            continue
        ln = np.uint64(length[i])
        if ln > room:
            big += 1
            continue
        s = np.uint64(head) * np.uint64(frame_size)
        if _u32(ring, s) != TP_STATUS_AVAILABLE:
            return i, head, written, big          # ring full: flush and come back
        d = s + np.uint64(TX_DATA)
        src = np.uint64(off[i])
        for j in range(ln):
            ring[d + j] = buf[src + j]
        _put32(ring, s + np.uint64(4), ln)          # tp_len
        _put32(ring, s + np.uint64(8), ln)          # tp_snaplen
        _put32(ring, s, TP_STATUS_SEND_REQUEST)
        head = (head + 1) % n_frames
        written += 1
    return off.shape[0], head, written, big


def _mapped_ring(ifname: str, proto: int, options: list, size: int):
    """A packet socket bound to ifname with ``options`` (SOL_PACKET, value) set before
    binding, and its ring mapped: (socket, mmap, uint8 view). Closes it on failure."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    try:
        for opt, val in options:
            sock.setsockopt(SOL_PACKET, opt, val)
        sock.bind((ifname, proto))
        mm = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        sock.close()
        raise
    return sock, mm, np.frombuffer(mm, dtype=np.uint8)


class RxRing:
    # Ring geometry: a block goes back to the kernel only when read, and at low rates every
    # block retires after timeout_ms with a few frames in it, so the number of blocks (not
    # their size) is how long the reader may be away: 256 x 10 ms = 2.5 s (16 blocks, 160
    # ms, lost frames to the pool's pauses of 150-300 ms here). 128 KiB holds a 64 KiB
    # GRO frame whole; 256 x 128 KiB = 32 MiB of ring per interface.
    # Version 2: the same 32 MiB as 16384 slots of 2048 bytes (an Ethernet frame of MTU
    # 1500 and the slot's header fit); ``block_size`` then is what one drain_into call
    # copies at most (``block_frames`` slots), ``blocks`` how many calls empty the ring.
    def __init__(self, ifname: str, ifindex: int = -1, *, block_size: int = 1 << 17,
                 blocks: int = 256, frame_size: int = 2048, timeout_ms: int = 10,
                 version: int = 3):
        self.ifname, self.ifindex = ifname, ifindex
        self.block_size, self.blocks = block_size, blocks
        self.version, self.frame_size = version, frame_size
        n_frames = block_size * blocks // frame_size
        if version == 2:
            req = struct.pack("4I", block_size, blocks, frame_size, n_frames)
            ver, timeout_ms = TPACKET_V2, 0
        else:
            req = struct.pack("7I", block_size, blocks, frame_size, n_frames, timeout_ms, 0, 0)
            ver = TPACKET_V3
        self.sock, self.mm, self.ring = _mapped_ring(
            ifname, ETH_P_ALL, [(PACKET_VERSION, ver), (PACKET_IGNORE_OUTGOING, 1),
                                (PACKET_RX_RING, req)], block_size * blocks)
        self.block = 0          # V3: the next block to read; V2: the next slot
        self.timeout_ms = timeout_ms
        self.ring_bytes = block_size * blocks
        if version == 2:
            self.n_frames = n_frames
            self.max_frames = n_frames
            self.block_frames = block_size // frame_size
        else:
            self.max_frames = block_size * blocks // 64     # a V3 frame takes >= 64 ring bytes
            self.block_frames = block_size // 64
        self.packets = self.drops = self.freezes = 0     # PACKET_STATISTICS, accumulated
        self.truncated = 0                               # V2: frames longer than a slot
        self._out = None                                 # read()'s scratch, made on first use

    def poll_stats(self) -> int:
        """Add the kernel's counters since the last call (struct tpacket_stats_v3: packets
        including drops, drops, queue freezes; V2's struct tpacket_stats has no freezes;
        getsockopt resets them) to ``packets``,
        ``drops`` and ``freezes``. Returns the drops just read."""
        if self.version == 2:            # struct tpacket_stats: no freezes
            packets, drops = struct.unpack("2I", self.sock.getsockopt(SOL_PACKET,
                                                                      PACKET_STATISTICS, 8))
            freezes = 0
        else:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
            packets, drops, freezes = struct.unpack("3I", raw)
        self.packets += packets
        self.drops += drops
        self.freezes += freezes
        return drops

    def drain_into(self, out, out_off, out_len, out_ts, limit: bool = False) -> int:
        """Copy the retired blocks (V2: the filled slots) into ``out`` (offsets from 0)
        while whole blocks fit (``ring_bytes`` bytes and ``max_frames`` frames of room
        take all of them; ``limit``: one block's worth, ``block_size`` bytes and
        ``block_frames`` frames, at most); hand them back to the kernel. Returns the
        number of frames. Does not wait."""
        if self.version == 2:
            n, self.block, cut = rx2_drain(self.ring, self.frame_size, self.n_frames, self.block,
                                           self.block_frames if limit else self.n_frames,
                                           out, out_off, out_len, out_ts)
            self.truncated += cut
            return n
        n, self.block = rx_drain(self.ring, self.block_size, self.blocks, self.block,
                                 out, out_off, out_len, out_ts)
        return n

    def retired(self) -> bool:
        """True when the next block (V2: slot) is the reader's (drain_into would copy it)."""
        if self.version == 2:
            return bool(self.ring[self.block * self.frame_size] & TP_STATUS_USER)
        return bool(self.ring[self.block * self.block_size + 8] & TP_STATUS_USER)

    def read(self, timeout_s: float = 0.05) -> PacketBatch:
        """Every frame of the blocks retired so far (waiting up to timeout_s for one)."""
        if self._out is None:
            self._out = np.empty(self.ring_bytes, dtype=np.uint8)
            self._off = np.empty(self.max_frames, dtype=np.int64)
            self._len = np.empty(self.max_frames, dtype=np.int32)
            self._ts = np.empty(self.max_frames, dtype=np.int64)
        select.select([self.sock], [], [], timeout_s)
        n = self.drain_into(self._out, self._off, self._len, self._ts)
        if n == 0:
            return PacketBatch.empty()
        end = int(self._off[n - 1] + self._len[n - 1])
        return PacketBatch(self._out[:end].copy(), self._off[:n].copy(), self._len[:n].copy(),
                           np.full(n, self.ifindex, dtype=np.int16), self._ts[:n].copy())

    def close(self):
        """Read the kernel's counters one last time, unmap and close."""
        if self.ring is None:
            return
        try:
            self.poll_stats()
        except OSError:
            pass
        self.ring = None
        self.mm.close()
        self.sock.close()


class TxRing:
    def __init__(self, ifname: str, *, frame_size: int = 2048, frames: int = 4096):
        self.frame_size = frame_size
        per_block = (1 << 16) // frame_size
        blocks = max(1, frames // per_block)
        self.n_frames = per_block * blocks
        req = struct.pack("4I", 1 << 16, blocks, frame_size, self.n_frames)
        self.sock, self.mm, self.ring = _mapped_ring(
            ifname, 0, [(PACKET_VERSION, TPACKET_V2), (PACKET_TX_RING, req)], (1 << 16) * blocks)
        self.head = 0
        self.sent = 0
        self.too_big = 0

    def send(self, batch: PacketBatch, mask: np.ndarray | None = None, timeout_s: float = 1.0):
        """Queue and send the frames (all, or where mask); returns how many were sent.
        Frames left when the ring stays full for timeout_s are not sent."""
        if mask is None:
            mask = np.ones(len(batch), dtype=np.bool_)
        start, deadline, total = 0, time.monotonic() + timeout_s, 0
        while True:
            i, self.head, w, big = tx_fill(self.ring, self.frame_size, self.n_frames, self.head,
                                           batch.buf, batch.off[start:], batch.length[start:],
                                           mask[start:])
            total += w
            self.too_big += big
            self.sock.send(b"")                   # transmit every slot marked for sending
            start += i
            if start >= len(batch) or time.monotonic() > deadline:
                break
            select.select([], [self.sock], [], 0.01)
        self.sent += total
        return total

    def close(self):
        self.ring = None
        self.mm.close()
        self.sock.close()


HOLD_SLACK_MS = 30      # added to a ring's retire timeout: the kernel's timer rounds up to
                        # jiffies (up to 10 ms at HZ=100) and fires late under load


@numba.njit(cache=True)
def _running_max(ts, start, key):
    """key[i] = max(start, ts[0..i]): a ring's frames keep their ring order under a sort
    by key. Returns the last key (start when ts is empty)."""
    m = start
    for i in range(ts.shape[0]):
        if ts[i] > m:
            m = ts[i]
        key[i] = m
    return m


def warm():
    """Load the numba kernels a live source runs (from the cache, or compiled): the first
    call takes ~0.4 s, which a ring must not spend filling up before its first read."""
    ring = np.zeros(64, dtype=np.uint8)                     # one block, kernel-owned
    rx_drain(ring, 64, 1, 0, np.empty(64, dtype=np.uint8), np.empty(1, dtype=np.int64),
             np.empty(1, dtype=np.int32), np.empty(1, dtype=np.int64))
    rx2_drain(ring, 64, 1, 0, 1, np.empty(64, dtype=np.uint8), np.empty(1, dtype=np.int64),
              np.empty(1, dtype=np.int32), np.empty(1, dtype=np.int64))
    _running_max(np.zeros(1, dtype=np.int64), 0, np.empty(1, dtype=np.int64))
    take(PacketBatch.from_frames([bytes(14)]), np.zeros(1, dtype=np.int64))


class RingMerge:
    """The frames of several RxRings, merged in kernel-timestamp order.

    Each ``poll`` drains every ring straight into one staging buffer, then returns (as a
    new batch) the frames that are safe to emit, ordered by a stable sort on their ring's
    running-maximum timestamp: a ring's own frames keep the kernel's order, frames of
    different rings interleave by time.

    Why hold frames back: TPACKET_V3 hands a block to user space only when it is full or
    ``timeout_ms`` after its first frame, so a frame stamped t on ring B may still be
    invisible when ring A's frames stamped t + 5 ms are read. Emitting A's frames then
    would put B's frame after them in the next batch (a SYN-ACK before its SYN, seen on two
    interfaces of a router). A frame is emitted once its key is at most the cut

        cut = max(min over rings of the latest key read,    (the watermark)
                  now - hold)                               (the delay bound)

    taking ``now`` (CLOCK_REALTIME, the clock of the kernel's software stamps) before the
    rings are read. Below the watermark every ring has already shown a later frame, so
    nothing older can follow (rings are read in order); below ``now - hold`` every block
    holding such a frame has been retired, since hold exceeds the retire timeout. The
    watermark keeps latency low while every ring has traffic; the delay bound lets an idle
    ring's silence stop holding the others back after ``hold``. One ring is never held.
    A frame that still arrives older than what was emitted (hold too short, or the clock
    stepped) goes out in the next batch and is counted in ``late``.

    Owner: the thread that polls. Memory: held frames plus one drain per ring; the buffer
    is compacted when full (only frames not yet emitted move) and grows when it must.
    """

    MIN_BYTES, MIN_FRAMES = 4 << 20, 1 << 16     # the staging buffer's first size

    def __init__(self, rings: list[RxRing], hold_ms: float | None = None, clock=time.time_ns):
        self.rings = list(rings)
        self.clock = clock       # ns on the kernel's stamp clock (tests pass their own)
        if hold_ms is None:
            hold_ms = max((r.timeout_ms for r in self.rings), default=0) + HOLD_SLACK_MS
        self.hold_ns = int(hold_ms * 1_000_000)
        self.latest = np.zeros(len(self.rings), dtype=np.int64)   # last key per ring
        self.read = [0] * len(self.rings)                          # frames read per ring
        self.emitted_key = 0     # largest key emitted so far
        self.late = 0            # frames read after a later-stamped frame went out
        warm()
        self._alloc(max(self.MIN_BYTES, 4 * max((r.block_size for r in self.rings), default=0)),
                    max(self.MIN_FRAMES, 4 * max((r.block_frames for r in self.rings), default=0)))
        self.n = 0               # frames in the buffer: [head, n) may still be held
        self.nbytes = 0
        self.head = 0

    def _alloc(self, nbytes, nframes):
        self.buf = np.empty(nbytes, dtype=np.uint8)
        self.off = np.empty(nframes, dtype=np.int64)
        self.length = np.empty(nframes, dtype=np.int32)
        self.ifindex = np.empty(nframes, dtype=np.int16)
        self.ts = np.empty(nframes, dtype=np.int64)
        self.key = np.empty(nframes, dtype=np.int64)
        self.held = np.zeros(nframes, dtype=np.bool_)

    def _room(self, nbytes, nframes):
        """Make room for nbytes and nframes more: move the frames from head down to 0
        (emitted frames between held ones move too) and grow if that is not enough."""
        if self.nbytes + nbytes <= self.buf.shape[0] and self.n + nframes <= self.off.shape[0]:
            return
        h, n = self.head, self.n
        base = int(self.off[h]) if h < n else self.nbytes
        live_b, live_n = self.nbytes - base, n - h
        old = (self.buf, self.off, self.length, self.ifindex, self.ts, self.key, self.held)
        if live_b + nbytes > self.buf.shape[0] or live_n + nframes > self.off.shape[0]:
            self._alloc(2 * (live_b + nbytes), 2 * (live_n + nframes))
        self.buf[:live_b] = old[0][base:self.nbytes]
        self.off[:live_n] = old[1][h:n] - base
        for dst, src in zip((self.length, self.ifindex, self.ts, self.key, self.held), old[2:]):
            dst[:live_n] = src[h:n]
        self.head, self.n, self.nbytes = 0, live_n, live_b

    def _drain(self):
        for i, r in enumerate(self.rings):
            for _ in range(r.blocks):           # bounded: one block at least per pass
                if not r.retired():
                    break
                self._room(r.block_size, r.block_frames)
                self._append(i, r)

    def _append(self, i, r):
        n0, b0 = self.n, self.nbytes
        k = r.drain_into(self.buf[b0:], self.off[n0:], self.length[n0:], self.ts[n0:], limit=True)
        if k == 0:
            return
        self.read[i] += k
        s = slice(n0, n0 + k)
        self.off[s] += b0
        self.ifindex[s] = r.ifindex
        self.held[s] = True
        self.latest[i] = _running_max(self.ts[s], int(self.latest[i]), self.key[s])
        self.n = n0 + k
        self.nbytes = int(self.off[n0 + k - 1] + self.length[n0 + k - 1])

    def poll(self, timeout_s: float = 0.002) -> PacketBatch:
        """Wait up to timeout_s for any ring, drain them all, return what may go out now
        (maybe nothing)."""
        select.select([r.sock for r in self.rings], [], [], timeout_s)
        now = self.clock()
        self._drain()
        if len(self.rings) == 1:
            cut = np.iinfo(np.int64).max
        else:
            cut = max(int(self.latest.min()), now - self.hold_ns)
        return self._take(cut)

    def flush(self, settle: bool = True) -> PacketBatch:
        """Everything still held, in order (at the end of a run). ``settle``: first wait
        for the blocks still open to retire (the retire timeout and slack), so every
        frame the rings took before the call is read."""
        if settle and self.rings:
            end = time.monotonic() + self.hold_ns / 1e9
            for _ in range(1000):               # bounded: select returns at the deadline
                left = end - time.monotonic()
                if left <= 0:
                    break
                select.select([r.sock for r in self.rings], [], [], left)
                self._drain()
        self._drain()
        return self._take(np.iinfo(np.int64).max)

    def _take(self, cut: int) -> PacketBatch:
        h, n = self.head, self.n
        if h == n:
            return PacketBatch.empty()
        key = self.key[h:n]
        sel = np.flatnonzero(self.held[h:n] & (key <= cut))
        if sel.shape[0] == 0:
            return PacketBatch.empty()
        if len(self.rings) > 1:
            sel = sel[np.argsort(key[sel], kind="stable")]
        first = int(key[sel[0]])
        if first < self.emitted_key:
            self.late += int((key[sel] < self.emitted_key).sum())
        self.emitted_key = max(self.emitted_key, int(key[sel[-1]]))
        sel += h
        self.held[sel] = False
        rest = np.flatnonzero(self.held[h:n])
        self.head = h + int(rest[0]) if rest.shape[0] else n
        if self.head == n:          # nothing held: start the buffer over
            self.head = self.n = self.nbytes = 0
        view = PacketBatch(self.buf, self.off[:n], self.length[:n], self.ifindex[:n], self.ts[:n])
        return take(view, sel)

    def poll_stats(self) -> int:
        """Read every ring's kernel counters (RxRing.poll_stats); returns the new drops."""
        return sum(r.poll_stats() for r in self.rings)


def ring_batches(rings: list[RxRing], stop, poll_s: float = 0.002, *, merge: RingMerge | None = None,
                 stats_s: float = 1.0, log=None):
    """A live source for ``Pool.feed``: every poll_s, one batch of what the rings got,
    in timestamp order across rings (RingMerge; maybe empty); when ``stop()`` is true,
    what was held back, then the end. Every stats_s the rings' kernel counters are read;
    ``log(message)`` hears of new drops."""
    merge = merge if merge is not None else RingMerge(rings)
    next_stats = time.monotonic() + stats_s
    while not stop():
        yield merge.poll(poll_s)
        if time.monotonic() >= next_stats:
            next_stats = time.monotonic() + stats_s
            if merge.poll_stats() and log is not None:
                log("ring drops so far: " + " ".join(f"{r.ifname}={r.drops}" for r in rings))
    last = merge.flush()
    if len(last):
        yield last


class RingSink:
    """A sink for ``Pool.feed``'s ``emit``: sends each forwarded frame out of its egress
    interface's TX ring. ``egress(batch)`` gives the interface id of each frame (for
    example shardct.netconf.egress with the engine's network); ``rings`` maps ids to TxRings.
    Frames with no ring are counted in ``no_ring``."""

    def __init__(self, rings: dict[int, TxRing], egress, drop_invalid: bool = True):
        self.rings, self.egress, self.drop_invalid = rings, egress, drop_invalid
        self.sent = 0
        self.no_ring = 0

    def __call__(self, pk, verdict):
        from shardct.conntrack import forward_mask
        b = pk.batch
        keep = forward_mask(verdict, self.drop_invalid)
        eg = self.egress(b)
        for ifx in np.unique(eg[keep]):
            ring = self.rings.get(int(ifx))
            sel = keep & (eg == ifx)
            if ring is None:
                self.no_ring += int(sel.sum())
                continue
            self.sent += ring.send(b, sel)
