# AF_PACKET source and sink with memory-mapped rings (the kernel's packet_mmap): frames
# come out of a TPACKET_V3 RX ring and go into a TPACKET_V2 TX ring by numba kernels, a
# batch at a time; Python only polls the sockets and flushes the TX ring.
# Rules from the kernel's Documentation/networking/packet_mmap.rst and net/packet/af_packet.c.
"""AF_PACKET rings.

``RxRing(ifname)`` maps a TPACKET_V3 receive ring (blocks of frames the kernel retires
when full or after ``timeout_ms``); ``read(timeout_s)`` copies every retired block into
one PacketBatch (timestamps from the kernel, ``ifindex`` as given) and hands the blocks
back. Frames this host sends on the interface are ignored (PACKET_IGNORE_OUTGOING), so a
router may receive and transmit on one interface. ``poll_stats()`` adds the kernel's
PACKET_STATISTICS (which reading resets) to ``packets``, ``drops`` and ``freezes``; a
frame the kernel could not put in the ring is counted there and nowhere else.

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

from shardct.batch import PacketBatch

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
            mac = np.uint64(ring[p + np.uint64(24)]) | (np.uint64(ring[p + np.uint64(25)]) << np.uint64(8))
            src = p + mac
            for j in range(snap):
                out[o + j] = ring[src + j]
            out_off[n] = o
            out_len[n] = snap
            out_ts[n] = sec * 1_000_000_000 + nsec
            o += snap
            n += 1
            nxt = np.uint64(_u32(ring, p))
            p += nxt
        _put32(ring, b + np.uint64(8), TP_STATUS_KERNEL)
        block = (block + 1) % n_blocks
    return n, block


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
    def __init__(self, ifname: str, ifindex: int = -1, *, block_size: int = 1 << 17,
                 blocks: int = 256, frame_size: int = 2048, timeout_ms: int = 10):
        self.ifname, self.ifindex = ifname, ifindex
        self.block_size, self.blocks = block_size, blocks
        req = struct.pack("7I", block_size, blocks, frame_size,
                          block_size * blocks // frame_size, timeout_ms, 0, 0)
        self.sock, self.mm, self.ring = _mapped_ring(
            ifname, ETH_P_ALL, [(PACKET_VERSION, TPACKET_V3), (PACKET_IGNORE_OUTGOING, 1),
                                (PACKET_RX_RING, req)], block_size * blocks)
        self.block = 0
        self.timeout_ms = timeout_ms
        self.ring_bytes = block_size * blocks
        self.max_frames = block_size * blocks // 64     # a V3 frame takes >= 64 ring bytes
        self.block_frames = block_size // 64
        self.packets = self.drops = self.freezes = 0     # PACKET_STATISTICS, accumulated
        self._out = None                                 # read()'s scratch, made on first use

    def poll_stats(self) -> int:
        """Add the kernel's counters since the last call (struct tpacket_stats_v3: packets
        including drops, drops, queue freezes; getsockopt resets them) to ``packets``,
        ``drops`` and ``freezes``. Returns the drops just read."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, freezes = struct.unpack("3I", raw)
        self.packets += packets
        self.drops += drops
        self.freezes += freezes
        return drops

    def drain_into(self, out, out_off, out_len, out_ts) -> int:
        """Copy the retired blocks into ``out`` (offsets from 0) while whole blocks fit
        (``ring_bytes`` bytes and ``max_frames`` frames of room take all of them); hand
        them back to the kernel. Returns the number of frames. Does not wait."""
        n, self.block = rx_drain(self.ring, self.block_size, self.blocks, self.block,
                                 out, out_off, out_len, out_ts)
        return n

    def retired(self) -> bool:
        """True when the next block is the reader's (drain_into would copy it)."""
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


def ring_batches(rings: list[RxRing], stop, poll_s: float = 0.002):
    """A live source for ``Pool.feed``: every poll_s, one batch of what all rings got
    (maybe empty); ends when ``stop()`` is true."""
    from shardct.batch import concat
    while not stop():
        yield concat([r.read(poll_s / max(1, len(rings))) for r in rings])


class RingSink:
    """A sink for ``Pool.feed``'s ``emit``: sends each forwarded frame out of its egress
    interface's TX ring. ``egress(batch)`` gives the interface id of each frame (for
    example replay._egress with the engine's network); ``rings`` maps ids to TxRings.
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
