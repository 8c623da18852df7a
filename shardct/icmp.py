# ICMP errors the router originates: time-exceeded for a forwarded packet that arrived with
# TTL / hop limit <= 1 (Linux ip_forward -> icmp_send, ip6_forward -> icmpv6_send), built by
# a numba kernel, rate-limited per destination as inet_peer_xrlim_allow (icmp_ratelimit).
"""Generated ICMP errors.

``TimeExceeded(network, ratelimit_ms, seed)`` holds what the generator needs across
batches: each interface's first IPv4 and IPv6 address (the error's source: the address of
the interface the packet came in by) and the rate limiter's per-destination token buckets.
``generate(batch, meta, verdict, ts, V_DROP)`` returns a PacketBatch of the errors for the frames
``track_batch`` dropped for their TTL (or None when there are none).

Each error, as Linux sends it (reference/kernel-behaviour.md): IPv4 TTL 64, TOS 0xc0, DF
clear, a fresh IP id, ICMP type 11 code 0, quoting the packet *as it arrived* (the engine
drops it before NAT) up to 576 bytes in all; IPv6 hop limit 64, ICMPv6 type 3 code 0,
quoting up to 1280 bytes in all. The Ethernet header is the arriving one with the two MACs
swapped (VLAN tags kept); the frame's ``ifindex`` is the ingress interface.
No error answers an ICMP error, a non-first fragment, or a source that is not unicast.

Rate limit (icmp_ratelimit, icmpv6 ratelimit): a token bucket per destination host holding
up to 6 intervals (XRLIM_BURST_FACTOR), each error costs one interval; a host not seen
before starts full. Buckets live in a fixed direct-mapped table (a colliding host takes
the slot over with a full bucket), so memory is bounded.
"""
from __future__ import annotations

import numba
import numpy as np

from . import wire
from .batch import PacketBatch
from .checksum import csum_add, csum_fold, icmp_sum, put16
from .cpu import kernel
from .hashing import addr_words

BURST = 6                 # XRLIM_BURST_FACTOR
RL_SLOTS = 4096           # rate limiter buckets (a power of two)
QUOTE4 = 576 - 20 - 8     # icmp_send: the whole error fits in 576 bytes
QUOTE6 = 1280 - 40 - 8    # icmpv6_send: ... in IPV6_MIN_MTU
TTL_OUT = 64
TOS_OUT = 0xC0
# counters (stats array)
ST_SENT, ST_RATELIMITED, ST_SKIPPED = 0, 1, 2
STAT_NAMES = ("icmp_time_exceeded", "icmp_ratelimited", "icmp_not_sent")


@numba.njit(inline="always", cache=True)
def _src_ok(buf, l3, ver):
    """May an error go to this packet's source? Not to 0.0.0.0, 127/8, multicast,
    broadcast (IPv4) nor to :: or multicast (IPv6)."""
    if ver == 4:
        a = buf[l3 + 12]
        if a == 0 or a == 127 or a >= 224:
            return False
        return True
    if buf[l3 + 8] == 0xFF:
        return False
    for k in range(16):
        if buf[l3 + 8 + k] != 0:
            return True
    return False


@numba.njit(inline="always", cache=True)
def _put_words(buf, at, hi, lo, ver):
    if ver == 4:
        for k in range(4):
            buf[at + k] = np.uint8((lo >> np.uint64(24 - 8 * k)) & np.uint64(0xFF))
        return
    for k in range(8):
        buf[at + k] = np.uint8((hi >> np.uint64(56 - 8 * k)) & np.uint64(0xFF))
        buf[at + 8 + k] = np.uint8((lo >> np.uint64(56 - 8 * k)) & np.uint64(0xFF))


@kernel
def expired_rows(buf, off, ifindex, meta, verdict, v_drop, out):
    """Indices of the frames dropped for their TTL: dropped, from an interface, a sound
    IP header (M_L3LEN set) and TTL / hop limit <= 1 (the TTL check precedes every other
    drop, so such a frame was dropped by it). Returns how many were written to out."""
    k = 0
    for i in range(off.shape[0]):
        if verdict[i] != v_drop or ifindex[i] < 0 or meta[i, wire.M_L3LEN] <= 0:
            continue
        ver = meta[i, wire.M_IPVER]
        l3 = off[i] + meta[i, wire.M_L3]
        ttl = buf[l3 + 8] if ver == 4 else buf[l3 + 7]
        if ttl <= 1:
            out[k] = i
            k += 1
    return k


@kernel
def build_errors(buf, off, ifindex, ts, meta, rows, if_addr, rl_key, rl_tok, rl_last, interval,
                 ident, stats, out, out_off, out_len):
    """Write the time-exceeded error for each frame rows[j] at out[out_off[j]:] and its
    length in out_len[j] (0: none: rate-limited, no source address, or not allowed).
    Preconditions: out_off[j] leaves room for the L2 header, the IP and ICMP headers and
    the quote (``sizes``); if_addr[ifx, 0 or 1] = (present, hi, lo) of the interface's
    IPv4 / IPv6 address; ident[0] the next IPv4 id."""
    for j in range(rows.shape[0]):
        i = rows[j]
        out_len[j] = 0
        ver = meta[i, wire.M_IPVER]
        o = off[i]
        l2 = meta[i, wire.M_L3]
        l3 = o + l2
        cls = meta[i, wire.M_CLS]
        fam = 0 if ver == 4 else 1
        ifx = ifindex[i]
        # never about an ICMP error (icmp_send: an error type or one past NR_ICMP_TYPES;
        # ICMPv6: a type < 128) or a later fragment, never to a non-unicast source
        err = False
        if meta[i, wire.M_FRAG] != 2 and meta[i, wire.M_L4LEN] >= 1:
            ty = np.int64(buf[o + meta[i, wire.M_L4]])
            if ver == 4 and meta[i, wire.M_PROTO] == 1:
                err = ty == 3 or ty == 4 or ty == 5 or ty == 11 or ty == 12 or ty > 18
            elif ver == 6 and meta[i, wire.M_PROTO] == 58:
                err = ty < 128
        if (err or cls == wire.CLS_RELATED or meta[i, wire.M_FRAG] == 2
                or not _src_ok(buf, l3, ver) or if_addr[ifx, fam, 0] == 0):
            stats[ST_SKIPPED] += 1
            continue
        # rate limit per destination (the packet's source)
        dhi, dlo = wire.load_addr(buf, l3 + (12 if ver == 4 else 8), 4 if ver == 4 else 16)
        now = ts[i]
        h = (dhi * np.uint64(0x9E3779B97F4A7C15)) ^ (dlo * np.uint64(0xC2B2AE3D27D4EB4F)) \
            ^ np.uint64(ver)
        s = np.int64((h >> np.uint64(40)) & np.uint64(rl_key.shape[0] - 1))
        if not (rl_key[s, 0] == np.uint64(ver) and rl_key[s, 1] == dhi and rl_key[s, 2] == dlo):
            rl_key[s, 0] = np.uint64(ver)
            rl_key[s, 1] = dhi
            rl_key[s, 2] = dlo
            rl_tok[s] = BURST * interval
            rl_last[s] = now
        tok = rl_tok[s] + max(now - rl_last[s], 0)
        rl_last[s] = max(now, rl_last[s])
        if tok > BURST * interval:
            tok = BURST * interval
        if tok < interval:
            rl_tok[s] = tok
            stats[ST_RATELIMITED] += 1
            continue
        rl_tok[s] = tok - interval
        # the frame: L2 with the MACs swapped, IP, ICMP, quote
        p = out_off[j]
        for k in range(l2):
            out[p + k] = buf[o + k]
        for k in range(6):
            out[p + k] = buf[o + 6 + k]
            out[p + 6 + k] = buf[o + k]
        q = min(meta[i, wire.M_L3LEN], QUOTE4 if ver == 4 else QUOTE6)
        n3 = p + l2
        hl = 20 if ver == 4 else 40
        n4 = n3 + hl
        for k in range(q):
            out[n4 + 8 + k] = buf[l3 + k]
        for k in range(8):
            out[n4 + k] = 0
        if ver == 4:
            out[n3] = 0x45
            out[n3 + 1] = TOS_OUT
            put16(out, n3 + 2, hl + 8 + q)
            put16(out, n3 + 4, ident[0] & 0xFFFF)
            ident[0] = (ident[0] + 1) & 0xFFFF
            put16(out, n3 + 6, 0)
            out[n3 + 8] = TTL_OUT
            out[n3 + 9] = 1
            put16(out, n3 + 10, 0)
            _put_words(out, n3 + 12, if_addr[ifx, 0, 1], if_addr[ifx, 0, 2], 4)
            for k in range(4):
                out[n3 + 16 + k] = buf[l3 + 12 + k]
            put16(out, n3 + 10, (~csum_fold(csum_add(out, n3, 20, np.int64(0)))) & 0xFFFF)
            out[n4] = 11
        else:
            out[n3] = 0x60
            out[n3 + 1] = 0
            out[n3 + 2] = 0
            out[n3 + 3] = 0
            put16(out, n3 + 4, 8 + q)
            out[n3 + 6] = 58
            out[n3 + 7] = TTL_OUT
            _put_words(out, n3 + 8, if_addr[ifx, 1, 1], if_addr[ifx, 1, 2], 6)
            for k in range(16):
                out[n3 + 24 + k] = buf[l3 + 8 + k]
            out[n4] = 3
        put16(out, n4 + 2, (~csum_fold(icmp_sum(out, n3, n4, 8 + q, ver))) & 0xFFFF)
        out_len[j] = l2 + hl + 8 + q
        stats[ST_SENT] += 1


class TimeExceeded:
    """Time-exceeded generation for one engine (see the module docstring). Owner: the
    engine's thread."""

    def __init__(self, network, ratelimit_ms: int, seed: int):
        n_if = max(1, len(network.interfaces))
        self.if_addr = np.zeros((n_if, 2, 3), dtype=np.uint64)
        for k, ifc in enumerate(network.interfaces):
            for fam, ver in ((0, 4), (1, 6)):
                a = ifc.primary(ver)
                if a is not None:
                    self.if_addr[k, fam] = (1, *addr_words(a.packed))
        self.interval = int(ratelimit_ms) * 1_000_000
        self.rl_key = np.zeros((RL_SLOTS, 3), dtype=np.uint64)
        self.rl_tok = np.zeros(RL_SLOTS, dtype=np.int64)
        self.rl_last = np.zeros(RL_SLOTS, dtype=np.int64)
        self.ident = np.array([seed & 0xFFFF], dtype=np.int64)
        self.stats = np.zeros(len(STAT_NAMES), dtype=np.int64)
        self._rows = np.empty(0, dtype=np.int64)

    def generate(self, batch: PacketBatch, meta: np.ndarray, verdict: np.ndarray,
                 ts: np.ndarray, v_drop: int) -> tuple[PacketBatch, np.ndarray] | None:
        """The errors for ``batch``'s TTL drops (``meta``: its parse; ``verdict``: the
        kernel's; ``ts``: the packets' times, ns, the rate limiter's clock), stamped
        with the dropped packets' times, and for each the index in ``batch`` of the
        frame it answers (ascending); None when there are none."""
        n = len(batch)
        if self._rows.shape[0] < n:
            self._rows = np.empty(max(n, 256), dtype=np.int64)
        k = expired_rows(batch.buf, batch.off, batch.ifindex, meta, verdict, v_drop, self._rows)
        if k == 0:
            return None
        rows = self._rows[:k].copy()
        m = meta[rows]
        quote = np.minimum(m[:, wire.M_L3LEN], np.where(m[:, wire.M_IPVER] == 4, QUOTE4, QUOTE6))
        size = m[:, wire.M_L3] + np.where(m[:, wire.M_IPVER] == 4, 28, 48) + quote
        out_off = np.zeros(k, dtype=np.int64)
        np.cumsum(size[:-1], out=out_off[1:])
        out = np.zeros(int(size.sum()), dtype=np.uint8)
        out_len = np.zeros(k, dtype=np.int32)
        build_errors(batch.buf, batch.off, batch.ifindex, ts, meta, rows, self.if_addr,
                     self.rl_key, self.rl_tok, self.rl_last, self.interval, self.ident,
                     self.stats, out, out_off, out_len)
        keep = out_len > 0
        if not keep.any():
            return None
        return (PacketBatch(out, out_off[keep], out_len[keep], batch.ifindex[rows][keep].copy(),
                            ts[rows][keep].copy()), rows[keep])


@kernel
def restamp_ids(buf, off, length, ident):
    """Write ident[0], ident[0] + 1, ... (mod 2^16) into the IPv4 id of each frame in
    order and fix its header checksum; IPv6 frames and anything not IPv4 behind
    Ethernet (VLAN tags skipped) are left alone. The pool's sink gives the errors its
    workers generated the ids one engine would have: one counter, in input order."""
    for i in range(off.shape[0]):
        o = off[i]
        end = o + length[i]
        p = o + 12
        while p + 2 <= end and ((buf[p] == 0x81 and buf[p + 1] == 0x00)
                                or (buf[p] == 0x88 and buf[p + 1] == 0xA8)):
            p += 4
        if p + 22 > end or buf[p] != 0x08 or buf[p + 1] != 0x00 or buf[p + 2] != 0x45:
            continue
        l3 = p + 2
        put16(buf, l3 + 4, ident[0] & 0xFFFF)
        ident[0] = (ident[0] + 1) & 0xFFFF
        put16(buf, l3 + 10, 0)
        put16(buf, l3 + 10, (~csum_fold(csum_add(buf, l3, 20, np.int64(0)))) & 0xFFFF)
