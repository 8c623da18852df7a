# IP defragmentation before tracking (Linux nf_defrag_ipv4 -> ip_defrag, nf_defrag_ipv6 ->
# nf_ct_frag6_gather) and fragmentation on output (ip_do_fragment honouring frag_max_size,
# ip6_fragment), in numba kernels over fixed-size tables. Pure: time comes in as arguments.
"""Fragments.

``Defrag(config, seed)`` owns the fragment queues of one engine. ``run(batch, ts)`` looks at
every frame: frames that are not IP fragments pass (``K_PASS``); a fragment is queued
(``K_HELD``: Linux steals it, nothing leaves), dropped (``K_DROP``: counted), or completes
its datagram (``K_DONE``): the reassembled datagram is returned as a frame of its own and is
tracked and NATed in place of that last fragment, as Linux continues with the reassembled
skb from the hook of the fragment that completed it.

Queues, as Linux keys them (reference: net/ipv4/ip_fragment.c, net/ipv6/netfilter/
nf_conntrack_reasm.c): IPv4 by (src, dst, id, protocol); IPv6 by (src, dst, id, ingress
interface). A queue lives ``frag_timeout`` (30 s, ipfrag_time) or ``frag6_timeout`` (60 s,
nf_conntrack_frag6_timeout) from its first fragment. Overlaps: since CVE-2018-5391 both
families drop the whole datagram on an overlapping fragment (RFC 5722); a fragment wholly
inside data already held is a duplicate and only it is dropped. Other rules of
ip_frag_queue / nf_ct_frag6_queue: a last fragment ending before data already held, or two
last fragments that disagree, or data past a known end kill the IPv4 queue (the IPv6 one
drops only the fragment); an IPv4 non-last fragment is trimmed to a multiple of 8, an IPv6
one that is not a multiple of 8 kills its queue; an empty fragment kills (IPv4) or is
dropped (IPv6); a datagram over 65535 bytes is dropped as oversize.
Not done: ipfrag_max_dist (IPv4 "too far" reordering check), ECN merging (ip_frag_ecn).

Memory: fragment data lives in an arena of fixed chunks (``CHUNK`` bytes) sized
``frag_high_thresh`` plus a quarter; once the chunks in use reach ``frag_high_thresh`` no new
queue is made (Linux refuses new queues above ipfrag_high_thresh) and a fragment that
finds no free chunk kills its queue (``frag_nomem``). The queue table is set-associative
(``WAYS`` queues per set, the set chosen by a seeded hash of the key); a full set refuses
the new queue (``frag_queue_full``). Bounded work: each fragment walks its own queue's
fragments (at most one per 8 bytes of datagram); ``expire`` walks the queue table.

Output (``fragment``): a reassembled datagram leaves as fragments of at most
min(egress MTU, the largest fragment received) bytes (Linux's frag_max_size: the original
boundaries whenever the sender cut at one size), IPv4 with the original IP id, IPv6 with
a fresh fragment id (ip6_fragment; seen in the kernel differential test); a forwarded
IPv4 packet without DF larger than its egress MTU is cut at the MTU. A datagram whose
largest fragment is over the egress MTU and had DF (IPv4), or any such IPv6 one, is not
cut but dropped: the engine answers it with frag-needed / packet-too-big (icmp.py, Linux's
ip_exceeds_mtu / ip6_pkt_too_big; its IPv4 header has DF iff that fragment had it, as
ip_frag_reasm sets it). Tracking comes between: ``track_defragged``. Each fragment but the
last carries a multiple of 8 data bytes; IPv4 later fragments keep only the options with
the copied flag (ip_options_fragment: the others become NOPs).

Owner: the engine's thread.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from . import wire
from .batch import PacketBatch, concat, take
from .checksum import csum_add, csum_fold, get16, get32, put16
from .cpu import kernel
from .track import ST_DROP, V_DROP

CHUNK = 512                 # arena chunk (bytes)
WAYS = 8                    # queues per set
HDR_MAX = 256               # L2 + unfragmentable header bytes kept from the first fragment
MAX_DATAGRAM = 65535
OUT_SLACK = HDR_MAX + MAX_DATAGRAM + 1      # run() keeps this much output room per frame

# queue columns (q)
(Q_USED, Q_EXPIRES, Q_LEN, Q_MEAT, Q_FLAGS, Q_MAX, Q_MAXDF, Q_HEAD, Q_HDR, Q_L3, Q_NHAT,
 Q_NH, Q_IFX) = range(13)
N_Q = 13
FIRST_IN, LAST_IN = 1, 2
# fragment entries (fe): one per queued fragment, sorted by offset within a queue
FE_OFF, FE_END, FE_CHUNK, FE_NEXT = range(4)
# top: free lists and gauges
T_FREE_CHUNK, T_FREE_FE, T_CHUNKS, T_QUEUES = range(4)
# cfg
C_TMO4, C_TMO6, C_HIGH_CHUNKS, C_SEED = range(4)
# per-frame outcome of run()
K_PASS, K_HELD, K_DONE, K_DROP = 0, 1, 2, 3
# per reassembled frame (info rows): what fragment() needs besides the frame
(I_FMAX, I_ID, I_UNFRAG, I_NHAT, I_NH) = range(5)
N_INFO = 5

# counters (Linux's Ip/Ip6 MIB names where there is one)
(S_REASM_REQDS, S_REASM_OKS, S_REASM_FAILS, S_TIMEOUTS, S_OVERLAPS, S_DUPLICATES, S_OVERSIZE,
 S_NOMEM, S_QUEUE_FULL, S_MALFORMED, S_FRAG_OKS, S_FRAG_CREATES, S_FRAG_FAILS) = range(13)
STAT_NAMES = ("frag_reasm_reqds", "frag_reasm_oks", "frag_reasm_fails", "frag_timeouts",
              "frag_overlaps", "frag_duplicates", "frag_oversize", "frag_nomem",
              "frag_queue_full", "frag_malformed", "frag_oks", "frag_creates", "frag_fails")


class FragTable(NamedTuple):
    """The queue table and arena (one value for the kernels; see the module docstring)."""
    q: np.ndarray         # (Q, N_Q) int64 queue rows
    qkey: np.ndarray      # (Q, 6) uint64: family|proto|ifx, src hi, lo, dst hi, lo, id
    qhdr: np.ndarray      # (Q, HDR_MAX) uint8: L2 + unfragmentable headers of offset 0
    fe: np.ndarray        # (F, 4) int64 fragment entries
    arena: np.ndarray     # (NCH * CHUNK,) uint8 fragment data, chunk c at c * CHUNK
    chnext: np.ndarray    # (NCH,) int64 next chunk of a fragment / free list
    top: np.ndarray       # (4,) int64
    cfg: np.ndarray       # (4,) int64
    stats: np.ndarray     # (len(STAT_NAMES),) int64


def new_table(n_queues: int, high_thresh: int, timeout4_ns: int, timeout6_ns: int,
              seed: int) -> FragTable:
    """A table of ``n_queues`` queues (rounded up to a multiple of WAYS, sets a power of
    two) and an arena of high_thresh * 5/4 bytes."""
    sets = 1
    while sets * WAYS < n_queues:
        sets *= 2
    nq = sets * WAYS
    high = max(1, high_thresh // CHUNK)
    nch = high + high // 4 + 1
    q = np.zeros((nq, N_Q), dtype=np.int64)
    q[:, Q_HEAD] = -1
    fe = np.zeros((nch, 4), dtype=np.int64)
    fe[:, FE_NEXT] = np.arange(1, nch + 1)
    fe[-1, FE_NEXT] = -1
    chnext = np.arange(1, nch + 1, dtype=np.int64)
    chnext[-1] = -1
    top = np.array([0, 0, 0, 0], dtype=np.int64)
    cfg = np.array([timeout4_ns, timeout6_ns, high, seed & 0xFFFFFFFF], dtype=np.int64)
    return FragTable(q, np.zeros((nq, 6), dtype=np.uint64), np.zeros((nq, HDR_MAX), np.uint8),
                     fe, np.zeros(nch * CHUNK, dtype=np.uint8), chnext, top, cfg,
                     np.zeros(len(STAT_NAMES), dtype=np.int64))


# ------------------------------------------------------------------ queue table

@numba.njit(inline="always", cache=True)
def _copy(dst, d, src, s, n):
    """dst[d:d+n] = src[s:s+n], with unsigned positions (numba then drops its
    negative-index test and vectorizes the loop; see batch._gather)."""
    d = np.uint64(d)
    s = np.uint64(s)
    for b in range(np.uint64(n)):
        dst[d + b] = src[s + b]


@numba.njit(inline="always", cache=True)
def _kill(t, q):
    """Free queue q and everything it holds."""
    e = t.q[q, Q_HEAD]
    while e >= 0:
        c = t.fe[e, FE_CHUNK]
        while c >= 0:
            nc = t.chnext[c]
            t.chnext[c] = t.top[T_FREE_CHUNK]
            t.top[T_FREE_CHUNK] = c
            t.top[T_CHUNKS] -= 1
            c = nc
        ne = t.fe[e, FE_NEXT]
        t.fe[e, FE_NEXT] = t.top[T_FREE_FE]
        t.top[T_FREE_FE] = e
        e = ne
    t.q[q, Q_USED] = 0
    t.q[q, Q_HEAD] = -1
    t.top[T_QUEUES] -= 1


@numba.njit(inline="always", cache=True)
def _fail(t, q, counter):
    """Kill queue q: the datagram is lost (ReasmFails and the reason's counter)."""
    _kill(t, q)
    t.stats[S_REASM_FAILS] += 1
    t.stats[counter] += 1


@numba.njit(inline="always", cache=True)
def _find(t, k0, k1, k2, k3, k4, k5, now, tmo):
    """The live queue with this key, or a new one; -1 when the set is full, -2 when
    fragment memory is over the high threshold. Expired queues met on the way are freed."""
    h = np.uint64(t.cfg[C_SEED]) ^ (k0 * np.uint64(0x9E3779B97F4A7C15))
    for w in (k1, k2, k3, k4, k5):
        h = (h ^ w) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= h >> np.uint64(29)
    sets = t.q.shape[0] // WAYS
    base = np.int64(h & np.uint64(sets - 1)) * WAYS
    free = -1
    for w in range(WAYS):
        q = base + w
        if t.q[q, Q_USED] != 0 and now >= t.q[q, Q_EXPIRES]:
            _fail(t, q, S_TIMEOUTS)
        if t.q[q, Q_USED] != 0:
            kk = t.qkey[q]
            if (kk[0] == k0 and kk[1] == k1 and kk[2] == k2 and kk[3] == k3 and kk[4] == k4
                    and kk[5] == k5):
                return q
        elif free < 0:
            free = q
    if free < 0:
        return -1
    if t.top[T_CHUNKS] >= t.cfg[C_HIGH_CHUNKS]:
        return -2
    q = free
    for c in range(N_Q):
        t.q[q, c] = 0
    t.q[q, Q_USED] = 1
    t.q[q, Q_EXPIRES] = now + tmo
    t.q[q, Q_HEAD] = -1
    t.qkey[q, 0] = k0
    t.qkey[q, 1] = k1
    t.qkey[q, 2] = k2
    t.qkey[q, 3] = k3
    t.qkey[q, 4] = k4
    t.qkey[q, 5] = k5
    t.top[T_QUEUES] += 1
    return q


@numba.njit(inline="always", cache=True)
def _place(t, q, off, end):
    """Where [off, end) goes in queue q's sorted list: (0, entry to insert after or -1),
    (1, _) a duplicate (wholly inside contiguous data held), (2, _) an overlap."""
    prev = -1
    hit = False
    e = t.q[q, Q_HEAD]
    while e >= 0:
        eo = t.fe[e, FE_OFF]
        ee = t.fe[e, FE_END]
        if eo >= end:
            break
        if ee > off:
            hit = True
            break
        prev = e
        e = t.fe[e, FE_NEXT]
    if not hit:
        return 0, prev
    cur = off              # a duplicate iff contiguous held data covers [off, end)
    e = t.q[q, Q_HEAD]
    while e >= 0 and cur < end:
        eo = t.fe[e, FE_OFF]
        ee = t.fe[e, FE_END]
        if eo > cur:
            break
        if ee > cur:
            cur = ee
        e = t.fe[e, FE_NEXT]
    return (1, prev) if cur >= end else (2, prev)


@numba.njit(inline="always", cache=True)
def _store(t, q, prev, buf, src, off, end):
    """Copy buf[src : src + end - off] into free chunks as a new entry after ``prev``;
    False when the arena or the entry list is out of room (nothing taken)."""
    n = end - off
    need = (n + CHUNK - 1) // CHUNK
    if t.chnext.shape[0] - t.top[T_CHUNKS] < need or t.top[T_FREE_FE] < 0:
        return False
    e = t.top[T_FREE_FE]
    t.top[T_FREE_FE] = t.fe[e, FE_NEXT]
    head = -1
    last = -1
    for k in range(need):
        c = t.top[T_FREE_CHUNK]
        t.top[T_FREE_CHUNK] = t.chnext[c]
        t.chnext[c] = -1
        if last < 0:
            head = c
        else:
            t.chnext[last] = c
        last = c
        _copy(t.arena, c * CHUNK, buf, src + k * CHUNK, min(CHUNK, n - k * CHUNK))
    t.top[T_CHUNKS] += need
    t.fe[e, FE_OFF] = off
    t.fe[e, FE_END] = end
    t.fe[e, FE_CHUNK] = head
    if prev < 0:
        t.fe[e, FE_NEXT] = t.q[q, Q_HEAD]
        t.q[q, Q_HEAD] = e
    else:
        t.fe[e, FE_NEXT] = t.fe[prev, FE_NEXT]
        t.fe[prev, FE_NEXT] = e
    return True


@numba.njit(inline="always", cache=True)
def _reasm(t, q, out, at, ver):
    """Write queue q's datagram at out[at:] (the first fragment's L2 and unfragmentable
    headers, then the data); returns its frame length. Precondition: complete."""
    hl = t.q[q, Q_HDR]
    for b in range(hl):
        out[at + b] = t.qhdr[q, b]
    data = at + hl
    e = t.q[q, Q_HEAD]
    while e >= 0:
        eo = t.fe[e, FE_OFF]
        n = t.fe[e, FE_END] - eo
        c = t.fe[e, FE_CHUNK]
        k = 0
        while c >= 0:
            _copy(out, data + eo + k * CHUNK, t.arena, c * CHUNK, min(CHUNK, n - k * CHUNK))
            c = t.chnext[c]
            k += 1
        e = t.fe[e, FE_NEXT]
    l3 = at + t.q[q, Q_L3]
    ln = t.q[q, Q_LEN]
    if ver == 4:
        ihl = hl - t.q[q, Q_L3]
        put16(out, l3 + 2, ihl + ln)
        # DF only when the largest fragment carried it (ip_frag_reasm, IPSKB_FRAG_PMTU)
        put16(out, l3 + 6, 0x4000 if t.q[q, Q_MAXDF] == t.q[q, Q_MAX] else 0)
        put16(out, l3 + 10, 0)
        put16(out, l3 + 10, (~csum_fold(csum_add(out, l3, ihl, np.int64(0)))) & 0xFFFF)
    else:
        out[at + t.q[q, Q_NHAT]] = np.uint8(t.q[q, Q_NH])
        put16(out, l3 + 4, hl - t.q[q, Q_L3] - 40 + ln)
    return hl + ln


@kernel
def expire(t, now):
    """Free every queue whose time is up (counted as timeouts); returns how many."""
    k = 0
    for q in range(t.q.shape[0]):
        if t.q[q, Q_USED] != 0 and now >= t.q[q, Q_EXPIRES]:
            _fail(t, q, S_TIMEOUTS)
            k += 1
    return k


@numba.njit(inline="always", cache=True)
def _l3(buf, o, end):
    """(ethertype, IP header offset) after up to two VLAN tags; ethertype 0 if short."""
    if end - o < 14:
        return 0, 0
    et = get16(buf, o + 12)
    l3 = o + 14
    for _ in range(2):
        if et == 0x8100 or et == 0x88A8:
            if l3 + 4 > end:
                return 0, 0
            et = get16(buf, l3 + 2)
            l3 += 4
    return et, l3


@kernel
def defrag(buf, off, length, ifindex, ts, t, kind, out, out_used, done_off, done_len, info,
           start):
    """Queue the fragments of frames start.. (see the module docstring); ``kind[i]`` says
    what became of frame i; a completed datagram is written to ``out`` from
    ``out_used[0]`` on (its place in done_off[i], done_len[i], info[i]). Stops before a
    fragment when ``out`` has less than OUT_SLACK bytes left and returns that frame's index
    (the caller grows ``out`` and calls again); returns len(off) when done. Frames whose
    headers are broken pass: the parser classifies them."""
    n = off.shape[0]
    for i in range(start, n):
        kind[i] = K_PASS
        o = off[i]
        end = o + length[i]
        et, l3 = _l3(buf, o, end)
        ver = 0
        ihl = 0
        dstart = 0
        offset = 0
        fend = 0
        mf = False
        df = False
        k0 = a1 = a2 = a3 = a4 = ident = np.uint64(0)
        hdr_end = 0
        nhat = 0
        nh = 0
        fsize = 0
        tmo = 0
        if et == 0x0800:
            if l3 + 20 > end or buf[l3] >> 4 != 4:
                continue
            ihl = np.int64(buf[l3] & 0xF) * 4
            fo = get16(buf, l3 + 6)
            tot = get16(buf, l3 + 2)
            if fo & 0x3FFF == 0:
                continue                      # not a fragment
            if ihl < 20 or tot < ihl or l3 + tot > end or \
                    csum_fold(csum_add(buf, l3, ihl, np.int64(0))) != 0xFFFF:
                continue                      # ip_rcv would drop it; the parser says why
            ver = 4
            dstart = l3 + ihl
            offset = np.int64(fo & 0x1FFF) * 8
            mf = (fo & 0x2000) != 0
            df = (fo & 0x4000) != 0
            fend = offset + tot - ihl
            k0 = np.uint64(4 << 8) | np.uint64(buf[l3 + 9])
            a1, a2 = wire.load_addr(buf, l3 + 12, 4)
            a3, a4 = wire.load_addr(buf, l3 + 16, 4)
            ident = np.uint64(get16(buf, l3 + 4))
            hdr_end = dstart
            nhat = o
            fsize = tot
            tmo = t.cfg[C_TMO4]
        elif et == 0x86DD:
            if l3 + 40 > end or buf[l3] >> 4 != 6:
                continue
            plen = get16(buf, l3 + 4)
            dend = l3 + 40 + plen
            if plen == 0 or dend > end:
                continue
            nh = np.int64(buf[l3 + 6])
            nhat = l3 + 6
            p = l3 + 40
            fh = -1
            for _ in range(8):
                if nh == 44:
                    fh = p
                    break
                if nh != 0 and nh != 43 and nh != 60 and nh != 51:
                    break
                if p + 8 > dend:
                    break
                nhat = p
                step = (np.int64(buf[p + 1]) + 2) * 4 if nh == 51 else \
                    (np.int64(buf[p + 1]) + 1) * 8
                nh = np.int64(buf[p])
                p += step
            if fh < 0 or fh + 8 > dend:
                continue
            fo = get16(buf, fh + 2)
            if fo & 0xFFF9 == 0:
                continue                      # an atomic fragment: a whole datagram
            ver = 6
            dstart = fh + 8
            offset = np.int64(fo & 0xFFF8)
            mf = (fo & 1) != 0
            df = False
            fend = offset + dend - dstart
            k0 = np.uint64(6 << 8) | (np.uint64(ifindex[i] + 1) << np.uint64(16))
            a1, a2 = wire.load_addr(buf, l3 + 8, 16)
            a3, a4 = wire.load_addr(buf, l3 + 24, 16)
            ident = np.uint64(get32(buf, fh + 4))
            hdr_end = fh
            nh = np.int64(buf[fh])
            fsize = 40 + plen
            tmo = t.cfg[C_TMO6]
        else:
            continue
        if out.shape[0] - out_used[0] < OUT_SLACK:
            return i
        now = ts[i]
        t.stats[S_REASM_REQDS] += 1
        kind[i] = K_DROP
        if ver == 6 and fend > MAX_DATAGRAM:
            t.stats[S_OVERSIZE] += 1          # "offset is too large": the fragment only
            continue
        q = _find(t, k0, a1, a2, a3, a4, ident, now, tmo)
        if q == -1:
            t.stats[S_QUEUE_FULL] += 1
            t.stats[S_REASM_FAILS] += 1
            continue
        if q == -2:
            t.stats[S_NOMEM] += 1
            t.stats[S_REASM_FAILS] += 1
            continue
        if ver == 4 and fend + ihl > MAX_DATAGRAM:
            _fail(t, q, S_OVERSIZE)
            continue
        fl = t.q[q, Q_FLAGS]
        bad = False
        if not mf:
            bad = fend < t.q[q, Q_LEN] or ((fl & LAST_IN) != 0 and fend != t.q[q, Q_LEN])
            if not bad:
                t.q[q, Q_FLAGS] = fl | LAST_IN
                t.q[q, Q_LEN] = fend
        else:
            if fend & 7:
                if ver == 6:
                    _fail(t, q, S_MALFORMED)  # RFC 8200: a parameter problem; the datagram goes
                    continue
                fend &= ~7
            if fend > t.q[q, Q_LEN]:
                bad = (fl & LAST_IN) != 0
                if not bad:
                    t.q[q, Q_LEN] = fend
        if bad or fend <= offset:
            if ver == 4:
                _fail(t, q, S_MALFORMED)      # ip_frag_queue: discard_qp
            else:
                t.stats[S_MALFORMED] += 1     # nf_ct_frag6_queue: err, the fragment only
                t.stats[S_REASM_FAILS] += 1
            continue
        st, prev = _place(t, q, offset, fend)
        if st == 1:
            t.stats[S_DUPLICATES] += 1
            if ver == 6:
                kind[i] = K_HELD              # "pretend they got queued"
            continue
        if st == 2:
            _fail(t, q, S_OVERLAPS)           # RFC 5722: the whole datagram goes
            continue
        if offset == 0:
            hl = hdr_end - o
            if hl > HDR_MAX:
                _fail(t, q, S_MALFORMED)
                continue
            for b in range(hl):
                t.qhdr[q, b] = buf[o + b]
            t.q[q, Q_HDR] = hl
            t.q[q, Q_L3] = l3 - o
            t.q[q, Q_NHAT] = nhat - o
            t.q[q, Q_NH] = nh
        if not _store(t, q, prev, buf, dstart, offset, fend):
            _fail(t, q, S_NOMEM)
            continue
        if offset == 0:
            t.q[q, Q_FLAGS] |= FIRST_IN
        t.q[q, Q_MEAT] += fend - offset
        t.q[q, Q_IFX] = ifindex[i]
        if fsize > t.q[q, Q_MAX]:
            t.q[q, Q_MAX] = fsize
        if df and fsize > t.q[q, Q_MAXDF]:
            t.q[q, Q_MAXDF] = fsize
        kind[i] = K_HELD
        if t.q[q, Q_FLAGS] != FIRST_IN | LAST_IN or t.q[q, Q_MEAT] != t.q[q, Q_LEN]:
            continue
        # complete: the datagram leaves the queue, which is freed
        if t.q[q, Q_HDR] - t.q[q, Q_L3] + t.q[q, Q_LEN] - (40 if ver == 6 else 0) > MAX_DATAGRAM:
            _fail(t, q, S_OVERSIZE)
            kind[i] = K_DROP
            continue
        at = out_used[0]
        m = _reasm(t, q, out, at, ver)
        done_off[i] = at
        done_len[i] = m
        out_used[0] = at + m
        info[i, I_FMAX] = t.q[q, Q_MAX]
        info[i, I_ID] = np.int64(ident)
        info[i, I_UNFRAG] = t.q[q, Q_HDR] - t.q[q, Q_L3]
        info[i, I_NHAT] = t.q[q, Q_NHAT]
        info[i, I_NH] = t.q[q, Q_NH]
        _kill(t, q)
        t.stats[S_REASM_OKS] += 1
        kind[i] = K_DONE
    return n


# ------------------------------------------------------------------ output

@kernel
def fragment(src, s_off, s_len, l3rel, ver, mtu, info, out, o_off, o_len, o_job, stats):
    """Cut job j's frame src[s_off[j]:][:s_len[j]] (IP header at l3rel[j], family ver[j])
    into fragments of at most mtu[j] IP bytes, written back to back into ``out``; IPv6
    jobs are reassembled datagrams and take their unfragmentable length, next-header
    position (from the frame start) and id from info[j]. Writes each fragment's offset,
    length and job; returns how many. Preconditions: ``out`` and the o_* arrays hold
    what ``fragment_sizes`` computed; every job's step is at least 8."""
    k = 0
    p = 0
    for j in range(s_off.shape[0]):
        o = s_off[j]
        l3 = o + l3rel[j]
        l2 = l3rel[j]
        if ver[j] == 4:
            hl = np.int64(src[l3] & 0xF) * 4
            tot = get16(src, l3 + 2)
            fo = get16(src, l3 + 6)
            base = np.int64(fo & 0x1FFF) * 8
            keep = fo & 0x4000                # DF is kept; MF comes from the cut
            last_mf = fo & 0x2000
            data = tot - hl
            step = (mtu[j] - hl) & ~7
            d = 0
            first = True
            while d < data:
                dl = min(step, data - d)
                for b in range(l2 + hl):
                    out[p + b] = src[o + b]
                h = p + l2
                if not first:
                    # ip_options_fragment: options without the copied flag become NOPs
                    x = 20
                    while x < hl:
                        opt = out[h + x]
                        if opt == 0:
                            break
                        if opt == 1:
                            x += 1
                            continue
                        ol = np.int64(out[h + x + 1]) if x + 1 < hl else 0
                        if ol < 2 or x + ol > hl:
                            break
                        if opt & 0x80 == 0:
                            for b in range(ol):
                                out[h + x + b] = 1
                        x += ol
                _copy(out, h + hl, src, l3 + hl + d, dl)
                more = d + dl < data
                put16(out, h + 2, hl + dl)
                put16(out, h + 6, keep | ((base + d) >> 3) | (0x2000 if more or last_mf else 0))
                put16(out, h + 10, 0)
                put16(out, h + 10, (~csum_fold(csum_add(out, h, hl, np.int64(0)))) & 0xFFFF)
                o_off[k] = p
                o_len[k] = l2 + hl + dl
                o_job[k] = j
                p += l2 + hl + dl
                k += 1
                d += dl
                first = False
            stats[S_FRAG_OKS] += 1
            continue
        ul = info[j, I_UNFRAG]
        nhat = info[j, I_NHAT]
        ident = info[j, I_ID]
        plen = get16(src, l3 + 4)
        data = 40 + plen - ul
        step = (mtu[j] - ul - 8) & ~7
        d = 0
        while d < data:
            dl = min(step, data - d)
            for b in range(l2 + ul):
                out[p + b] = src[o + b]
            nh = out[p + nhat]
            out[p + nhat] = 44
            h = p + l2
            f = h + ul
            out[f] = nh
            out[f + 1] = 0
            more = d + dl < data
            put16(out, f + 2, d | (1 if more else 0))
            put16(out, f + 4, (ident >> 16) & 0xFFFF)
            put16(out, f + 6, ident & 0xFFFF)
            _copy(out, f + 8, src, l3 + ul + d, dl)
            put16(out, h + 4, ul - 40 + 8 + dl)
            o_off[k] = p
            o_len[k] = l2 + ul + 8 + dl
            o_job[k] = j
            p += l2 + ul + 8 + dl
            k += 1
            d += dl
        stats[S_FRAG_OKS] += 1
    stats[S_FRAG_CREATES] += k
    return k


def fragment_sizes(src: np.ndarray, s_off, l3rel, ver, mtu, info):
    """(fragments per job, output bytes per job, data step per job) for ``fragment``'s
    jobs (numpy over the jobs' headers)."""
    l3 = s_off + l3rel
    v4 = ver == 4
    hl4 = (src[l3].astype(np.int64) & 0xF) * 4
    tot4 = (src[l3 + 2].astype(np.int64) << 8) | src[l3 + 3]
    plen6 = (src[l3 + 4].astype(np.int64) << 8) | src[l3 + 5]
    ul = np.where(v4, hl4, info[:, I_UNFRAG])
    data = np.where(v4, tot4 - hl4, 40 + plen6 - ul)
    extra = np.where(v4, 0, 8)
    step = (mtu - ul - extra) & ~7
    count = np.where(step >= 8, -(-data // np.maximum(step, 8)), 0)
    size = count * (l3rel + ul + extra) + data
    return count, size, step


class Defrag:
    """The fragment queues of one engine (owner: its thread)."""

    def __init__(self, config, seed: int):
        self.table = new_table(config.frag_queues, config.frag_high_thresh,
                               int(config.frag_timeout * 1e9), int(config.frag6_timeout * 1e9),
                               seed)
        self.out = np.empty(2 * OUT_SLACK, dtype=np.uint8)
        self._kind = np.empty(0, dtype=np.uint8)

    @property
    def stats(self) -> np.ndarray:
        return self.table.stats

    def queues(self) -> int:
        """Live queues (some may have expired since the last ``expire``)."""
        return int(self.table.top[T_QUEUES])

    def memory(self) -> int:
        """Bytes of fragment data held (whole chunks)."""
        return int(self.table.top[T_CHUNKS]) * CHUNK

    def expire(self, now: int) -> int:
        if self.table.top[T_QUEUES] == 0:
            return 0
        return int(expire(self.table, now))

    def run(self, batch: PacketBatch, ts: np.ndarray):
        """Queue ``batch``'s fragments (``ts``: the frames' times, ns). None when no frame is
        a fragment; else (kind, done, rbatch, info): kind per frame (K_*), the indices of
        the K_DONE frames, their reassembled frames as a batch (ifindex and ts of the
        completing fragment) and their info rows (I_*), in batch order."""
        n = len(batch)
        if self._kind.shape[0] < n:
            self._kind = np.empty(max(n, 256), dtype=np.uint8)
            self._doff = np.zeros(max(n, 256), dtype=np.int64)
            self._dlen = np.zeros(max(n, 256), dtype=np.int64)
            self._info = np.zeros((max(n, 256), N_INFO), dtype=np.int64)
        kind = self._kind[:n]
        used = np.zeros(1, dtype=np.int64)
        i = defrag(batch.buf, batch.off, batch.length, batch.ifindex, ts, self.table, kind,
                   self.out, used, self._doff, self._dlen, self._info, 0)
        while i < n:
            grown = np.empty(2 * self.out.shape[0], dtype=np.uint8)
            grown[:used[0]] = self.out[:used[0]]
            self.out = grown
            i = defrag(batch.buf, batch.off, batch.length, batch.ifindex, ts, self.table, kind,
                       self.out, used, self._doff, self._dlen, self._info, i)
        if not kind.any():
            return None
        done = np.flatnonzero(kind == K_DONE)
        buf = self.out[:used[0]].copy()
        rb = PacketBatch(buf, self._doff[done].copy(), self._dlen[done].astype(np.int32),
                         batch.ifindex[done].copy(), ts[done].copy())
        return kind.copy(), done, rb, self._info[done].copy()


# ------------------------------------------------------------------ the engine's use

def track_defragged(ct, batch, d, meta, addr, hashes, ts, verdict, tid, v_queued):
    """Track ``batch`` (ConnTrack.process's arrays) after ``Defrag.run`` gave ``d``: held
    fragments get ``v_queued``, dropped ones V_DROP (both parsed, never tracked, never
    answered with an error), and each completed datagram is parsed and tracked in its
    last fragment's place, in order with the frames around it (it is NATed in ``d``'s
    reassembled batch; meta, addr, verdict and tid row i then describe it), and then
    given the engine's errors as one packet, held to the egress MTU by its largest
    fragment (``ConnTrack.generate``'s ``size``). One tracking run: the frames to track
    are copied side by side with the datagrams, tracked, and copied back (NAT and the
    router's trim change them). Returns (forward mask, generated frames, the frame each
    answers) as ``process`` does."""
    from .conntrack import forward_mask     # (conntrack imports this module)
    kind, done, rb, info = d
    other = np.flatnonzero((kind == K_HELD) | (kind == K_DROP))
    if other.shape[0]:
        m, a = wire.new_meta(other.shape[0])
        wire.parse_batch(batch.buf, batch.off[other], batch.length[other], m, a, False)
        meta[other] = m
        addr[other] = a
        verdict[other] = np.where(kind[other] == K_HELD, v_queued, V_DROP)
        tid[other] = -1
        ct.stats_arr[ST_DROP] += int((kind == K_DROP).sum())    # (its reason: frag_*)
    track = np.flatnonzero((kind == K_PASS) | (kind == K_DONE))
    if not track.shape[0]:
        return forward_mask(verdict, ct.config.drop_invalid), None, None
    is_done = kind[track] == K_DONE
    passing = track[~is_done]
    both = concat([take(PacketBatch(batch.buf, batch.off, batch.length, batch.ifindex,
                                    batch.ts), passing), rb])
    na = passing.shape[0]
    pos = np.where(is_done, na + np.cumsum(is_done) - 1, np.cumsum(~is_done) - 1)
    wb = PacketBatch(both.buf, both.off[pos], both.length[pos], both.ifindex[pos],
                     both.ts[pos])
    fwd, gen, by = _track(ct, wb, track, is_done, info[:, I_FMAX], meta, addr, hashes, ts,
                          verdict, tid)
    # the tracked frames back where the caller looks for them
    put_frames(wb.buf, wb.off[~is_done], wb.length[~is_done], batch.buf, batch.off[passing])
    batch.length[passing] = wb.length[~is_done]
    rb.buf, rb.off, rb.length = wb.buf, wb.off[is_done], wb.length[is_done]
    return fwd, gen, by


@kernel
def put_frames(src, s_off, length, dst, d_off):
    """Copy frame k of ``src`` (s_off[k], length[k]) to dst[d_off[k]:]."""
    for k in range(s_off.shape[0]):
        _copy(dst, d_off[k], src, s_off[k], length[k])


def _track(ct, sub, idx, is_done, fmax, meta, addr, hashes, ts, verdict, tid):
    """parse_run over frames ``idx`` of the batch (``sub``; ``is_done``: which are
    reassembled datagrams, whose largest fragments are ``fmax``), then the engine's
    errors; results written back to rows idx. Returns (the batch's forward mask,
    generated frames, the batch index each answers)."""
    k = idx.shape[0]
    m, a = wire.new_meta(k)
    h = np.empty(k, dtype=np.int64)
    v = np.empty(k, dtype=np.uint8)
    t = np.empty(k, dtype=np.int64)
    tsk = ts[idx]
    ct.parse_run(sub, m, a, h, tsk, v, t, np.full(k, -1, dtype=np.int64),
                 ct.config.checksum, parse_hash=True)
    from .conntrack import forward_mask
    f = forward_mask(v, ct.config.drop_invalid)
    size = None
    if ct._icmp is not None and is_done.any():
        size = m[:, wire.M_L3LEN].astype(np.int64)
        size[is_done] = fmax
    gen, by = ct.generate(sub, m, v, f, t, tsk, size=size)
    meta[idx] = m
    addr[idx] = a
    hashes[idx] = h
    verdict[idx] = v
    tid[idx] = t
    fwd = forward_mask(verdict, ct.config.drop_invalid)
    fwd[idx] = f            # the generator's: it keeps frames for the router itself home
    return fwd, gen, None if by is None else idx[by]


class Output:
    """Fragmentation on output for one engine: ``mtu`` per interface of its network (None:
    no network, so only reassembled datagrams are cut, at their largest fragment)."""

    def __init__(self, network, router: bool, seed: int = 0):
        self.network = network if router else None
        self.mtu = None if self.network is None else \
            np.array([i.mtu for i in network.interfaces], dtype=np.int64)
        self.min_mtu = 0 if self.mtu is None or not self.mtu.shape[0] else int(self.mtu.min())
        self.stats = np.zeros(len(STAT_NAMES), dtype=np.int64)
        # IPv6 fragment ids of re-fragmented datagrams: fresh ones, as ip6_fragment takes
        # (ipv6_select_ident), from a counter with a seeded start
        self.ident6 = (seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF

    def egress_mtu(self, b, meta):
        """(egress MTU per frame of ``b`` (0: no route, or local delivery), routes)."""
        r = self.network.route_batch(b, meta)
        ok = (r.egress >= 0) & ~r.local
        return np.where(ok, self.mtu[np.maximum(r.egress, 0)], 0), r

    def __call__(self, batch, meta, forward, d):
        """The fragments leaving in place of frames of ``batch`` (forward[i] is cleared for
        each frame they replace): every reassembled datagram of ``d`` (Defrag.run) that
        may leave, and, with a network, every forwarded IPv4 frame without DF larger than
        its egress MTU. Returns (PacketBatch of fragments, index of the frame each
        replaces), or (None, None)."""
        jobs = []       # (source batch, rows in it, frame indices, mtu, info)
        if d is not None and d[1].shape[0]:
            kind, done, rb, info = d
            ok = forward[done]
            fmax = info[:, I_FMAX]
            m = meta[done]
            mtu = fmax.copy()
            whole = np.zeros(done.shape[0], dtype=np.bool_)
            if self.network is not None:
                emtu, r = self.egress_mtu(rb, m)
                routed = emtu > 0
                whole = ~routed                   # local or unrouted: as one frame
                # ip_exceeds_mtu / ip6_pkt_too_big: frag_max_size over the MTU with DF (set
                # on the datagram when its largest fragment had it) or IPv6 is dropped;
                # with ICMP errors on, the engine's generator already did (frag-needed)
                l3 = rb.off + m[:, wire.M_L3]
                pmtu = (m[:, wire.M_IPVER] == 6) | ((rb.buf[l3 + 6] & 0x40) != 0)
                too_big = routed & pmtu & (fmax > emtu)
                self.stats[S_FRAG_FAILS] += int((ok & too_big).sum())
                ok &= ~too_big
                mtu = np.where(routed, np.minimum(emtu, fmax), fmax)
            whole |= m[:, wire.M_L3LEN] <= mtu
            forward[done] = False
            cut = np.flatnonzero(ok & ~whole)
            keep = np.flatnonzero(ok & whole)
            if keep.shape[0]:
                jobs.append((rb, keep, done[keep], None, None))
            if cut.shape[0]:
                ci = info[cut].copy()
                v6 = np.flatnonzero(m[cut, wire.M_IPVER] == 6)
                ci[v6, I_ID] = (self.ident6 + 1 + np.arange(v6.shape[0])) & 0xFFFFFFFF
                self.ident6 = (self.ident6 + v6.shape[0]) & 0xFFFFFFFF
                jobs.append((rb, cut, done[cut], mtu[cut], ci))
        if self.network is not None and self.min_mtu and meta.shape[0]:
            big = forward & (meta[:, wire.M_IPVER] == 4) & (meta[:, wire.M_L3LEN] > self.min_mtu)
            idx = np.flatnonzero(big)
            if idx.shape[0]:
                l3 = batch.off[idx] + meta[idx, wire.M_L3]
                idx = idx[(batch.buf[l3 + 6] & 0x40) == 0]          # DF: not ours to cut
            if idx.shape[0]:
                sub = PacketBatch(batch.buf, batch.off[idx], batch.length[idx],
                                  batch.ifindex[idx], batch.ts[idx])
                emtu, _ = self.egress_mtu(sub, meta[idx])
                over = (emtu > 0) & (meta[idx, wire.M_L3LEN] > emtu)
                if over.any():
                    rows = np.flatnonzero(over)
                    forward[idx[rows]] = False
                    jobs.append((batch, idx[rows], idx[rows], emtu[rows],
                                 np.zeros((rows.shape[0], N_INFO), dtype=np.int64)))
        if not jobs:
            return None, None
        parts, src_idx = [], []
        for b, rows, frames, mtu, info in jobs:
            if mtu is None:                       # whole frames (copies)
                parts.append(take(PacketBatch(b.buf, b.off, b.length, b.ifindex, b.ts), rows))
                src_idx.append(frames)
                continue
            fb, job = cut_frames(b, rows, meta[frames], mtu, info, self.stats)
            parts.append(fb)
            src_idx.append(frames[job])
        return concat(parts), np.concatenate(src_idx)


def with_fragments(batch, forward, fragments, fragment_of):
    """The frames that leave for ``batch``, in order: the ones ``forward`` selects, and
    ``fragments`` each in the place of the frame it replaces (``fragment_of``; a
    Result's). Returns (PacketBatch, the index in ``batch`` of the frame each stands for);
    copies."""
    idx = np.flatnonzero(forward)
    src = np.concatenate((idx, fragment_of))
    order = np.argsort(src, kind="stable")      # a frame's fragments keep their order
    return take(concat([take(batch, idx), fragments]), order), src[order]


def cut_frames(b, rows, meta, mtu, info, stats):
    """Fragments of frames ``rows`` of ``b`` (their parse ``meta``) cut at ``mtu`` (per
    row; ``info`` rows for IPv6); returns (PacketBatch, row index of each fragment)."""
    s_off = b.off[rows]
    l3rel = meta[:, wire.M_L3].astype(np.int64)
    ver = meta[:, wire.M_IPVER].astype(np.int64)
    mtu = np.asarray(mtu, dtype=np.int64)
    count, size, _ = fragment_sizes(b.buf, s_off, l3rel, ver, mtu, info)
    k = int(count.sum())
    out = np.empty(int(size.sum()), dtype=np.uint8)
    o_off = np.empty(k, dtype=np.int64)
    o_len = np.empty(k, dtype=np.int32)
    o_job = np.empty(k, dtype=np.int64)
    ok = count > 0
    stats[S_FRAG_FAILS] += int((~ok).sum())
    sel = np.flatnonzero(ok)
    got = fragment(b.buf, s_off[sel], b.length[rows][sel], l3rel[sel], ver[sel], mtu[sel],
                   info[sel], out, o_off, o_len, o_job, stats)
    job = sel[o_job[:got]]
    src = rows[job]
    return PacketBatch(out, o_off[:got], o_len[:got], b.ifindex[src].copy(),
                       b.ts[src].copy()), job


# ------------------------------------------------------------------ a pool's stage

@numba.njit(inline="always", cache=True)
def _may_be_fragment(buf, o, end):
    """Might ``defrag`` take the frame at buf[o:end]? It reads the same header bytes and
    is stricter (checksum, lengths): False here means it passes the frame."""
    et, l3 = _l3(buf, o, end)
    if et == 0x0800:
        return l3 + 20 <= end and (get16(buf, l3 + 6) & 0x3FFF) != 0
    if et == 0x86DD:
        if l3 + 40 > end:
            return False
        nh = buf[l3 + 6]
        return nh == 44 or nh == 0 or nh == 43 or nh == 60 or nh == 51
    return False


@kernel
def any_fragment(buf, off, length):
    """Whether a frame of the batch may be a fragment (``_may_be_fragment``)."""
    for i in range(off.shape[0]):
        if _may_be_fragment(buf, off[i], off[i] + length[i]):
            return True
    return False


@kernel
def _gather_screened(buf, off, length, out, out_off):
    """batch._gather over every frame that also says whether one may be a fragment: the
    header is read from the copy just written, so the screen costs no pass of its own."""
    o = np.uint64(0)
    maybe = False
    for i in range(off.shape[0]):
        s = np.uint64(off[i])
        n = np.uint64(length[i])
        for b in range(n):
            out[o + b] = buf[s + b]
        out_off[i] = o
        if not maybe:
            maybe = _may_be_fragment(out, np.int64(o), np.int64(o + n))
        o += n
    return maybe


def place_screened(batch: PacketBatch, buf: np.ndarray, at: int) -> tuple[PacketBatch, bool]:
    """batch.place (``batch``'s frames copied into ``buf`` from ``at`` on, as a shared
    batch) and whether one of them may be a fragment. Precondition: they fit."""
    n = len(batch)
    out_off = np.empty(n, dtype=np.int64)
    need = int(batch.length.astype(np.int64).sum())
    maybe = _gather_screened(batch.buf, batch.off, batch.length, buf[at:at + need], out_off)
    out_off += at
    return PacketBatch(buf, out_off, batch.length.copy(), batch.ifindex.copy(),
                       batch.ts.copy(), True), bool(maybe)


class PoolStage:
    """Reassembly in front of a worker pool and fragmentation behind it, as one engine's
    ``process`` does them (owner: the pool's supervisor thread). Shards see whole
    datagrams and never hold a fragment; a datagram is judged by the shard that tracks
    it, held to its egress MTU by its largest fragment (``before`` gives the sizes the
    workers pass to ``ConnTrack.generate``), and cut on its way out (``after``).

    Sequence numbers are the pool's: frames numbered in the order ``before`` returns
    them, from 0. Held fragments never reach the pool: ``held`` and ``dropped`` count
    them (the verdicts queued and drop one process gives them)."""

    def __init__(self, config, network, router: bool, seed: int, frames: bool = True):
        self.defrag = Defrag(config, seed) if config.defrag else None
        self.output = Output(network, router, seed)
        self.drop_invalid = bool(config.drop_invalid)
        self.frames = frames            # False: nothing is emitted, so nothing is cut
        self.seq = 0
        self.clock = 0
        self.held = self.dropped = 0
        self.re_seq = np.zeros(0, dtype=np.int64)        # reassembled datagrams not out yet
        self.re_info = np.zeros((0, N_INFO), dtype=np.int64)

    def before(self, batch: PacketBatch, maybe: bool | None = None):
        """(batch as the pool takes it, sizes): held and dropped fragments taken out, each
        completed datagram in the place of the fragment that completed it (a new batch;
        else ``batch`` itself). ``sizes``: (sequence numbers, largest fragment) of those
        datagrams, or None. ``maybe``: whether a frame may be a fragment, when the caller
        screened the batch already (``place_screened``)."""
        n = len(batch)
        if n == 0:
            return batch, None
        self.clock = max(self.clock, int(batch.ts.max()))
        d = None
        if self.defrag is not None:
            self.defrag.expire(int(batch.ts[0]))
            if maybe is None:
                maybe = any_fragment(batch.buf, batch.off, batch.length)
            if maybe:
                d = self.defrag.run(batch, batch.ts)
        if d is None:
            self.seq += n
            return batch, None
        kind, done, rb, info = d
        self.held += int((kind == K_HELD).sum())
        self.dropped += int((kind == K_DROP).sum())
        passing = np.flatnonzero(kind == K_PASS)
        src = np.concatenate((passing, done))
        order = np.argsort(src, kind="stable")
        out = take(concat([take(batch, passing), rb]), order)
        seq = self.seq + np.flatnonzero(order >= passing.shape[0])
        self.seq += len(out)
        if self.frames and done.shape[0]:
            self.re_seq = np.concatenate((self.re_seq, seq))
            self.re_info = np.concatenate((self.re_info, info))
        return out, (seq, info[:, I_FMAX].copy()) if done.shape[0] else None

    def after(self, batch: PacketBatch, seq: np.ndarray, verdict: np.ndarray):
        """What leaves for a round the pool emits (its frames in sequence order, as the
        workers left them): None when every frame leaves as it is (``forward_mask`` of
        ``verdict``); else (forward, fragments, fragment_of) as ``ConnTrack.process``'s
        Result has them: the reassembled datagrams cut at min(egress MTU, largest
        fragment) or dropped over it, forwarded IPv4 frames without DF cut at their
        egress MTU."""
        from .conntrack import forward_mask     # (conntrack imports this module)
        n = len(batch)
        if n == 0:
            return None
        re = np.zeros(n, dtype=np.bool_)
        j = np.zeros(n, dtype=np.int64)
        if self.re_seq.shape[0]:
            j = np.minimum(np.searchsorted(self.re_seq, seq), self.re_seq.shape[0] - 1)
            re = self.re_seq[j] == seq
            info = self.re_info[j[re]]
            self.emitted(int(seq.max()))
        fw = forward_mask(verdict, self.drop_invalid)
        cand = re.copy()
        if self.output.min_mtu:     # a frame's IP length is at most its length
            cand |= fw & (batch.length > self.output.min_mtu)
        idx = np.flatnonzero(cand)
        if idx.shape[0] == 0:
            return None
        sub = PacketBatch(batch.buf, batch.off[idx], batch.length[idx], batch.ifindex[idx],
                          batch.ts[idx])
        meta, addr = wire.new_meta(idx.shape[0])
        wire.parse_batch(sub.buf, sub.off, sub.length, meta, addr, False)
        d = None
        done = np.flatnonzero(re[idx])
        if done.shape[0]:
            rb = PacketBatch(sub.buf, sub.off[done], sub.length[done], sub.ifindex[done],
                             sub.ts[done])
            d = (None, done, rb, info)
        f = fw[idx]
        frags, frag_of = self.output(sub, meta, f, d)
        if frags is None and (f == fw[idx]).all():
            return None
        fw[idx] = f
        return fw, frags, None if frag_of is None else idx[frag_of]

    def emitted(self, last: int):
        """Frames up to sequence number ``last`` are out: forget their datagrams."""
        gone = int(np.searchsorted(self.re_seq, last, side="right"))
        if gone:
            self.re_seq, self.re_info = self.re_seq[gone:], self.re_info[gone:]

    def finish(self):
        """The input is over: queues expired by its last frame go (as ``reap_all``)."""
        if self.defrag is not None and self.clock:
            self.defrag.expire(self.clock)

    def stats(self) -> dict[str, int]:
        """The frag_* counters, and ``drop``: fragments dropped (overlaps and the like)."""
        fs = self.output.stats + (0 if self.defrag is None else self.defrag.stats)
        s = {name: int(v) for name, v in zip(STAT_NAMES, fs)}
        s["drop"] = self.dropped
        return s
