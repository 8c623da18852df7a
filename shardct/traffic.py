# Synthetic traffic for tests, benchmarks and the demo: Ethernet/IPv4/IPv6 + TCP/UDP/ICMP
# frames with correct checksums, built by one numba kernel from header-field arrays.
# Pure: randomness comes from the seed argument.
"""Traffic generators.

``build_frames(fields)`` writes one frame per row of header fields; the generators fill
those fields: ``handshake_frames`` (SYN, SYN/ACK, ACK per flow, window scale on the
SYNs), ``tcp_frames`` (established data packets over n flows, Zipf or uniform
popularity, per-flow consistent sequence numbers), ``udp_frames``, ``icmp_echo_frames``.
Flow k is ``base_src + k`` port ``1024 + k % 60000`` -> ``base_dst + k // 60000``
port ``dport``, so flows never collide.
"""
from __future__ import annotations

import ipaddress

import numba
import numpy as np

from .batch import PacketBatch
from .checksum import csum_add, csum_fold, put16

# field columns (int64)
(F_IPVER, F_PROTO, F_SPORT, F_DPORT, F_FLAGS, F_SEQ, F_ACK, F_WIN, F_PAYLEN, F_TTL, F_IPID,
 F_WSCALE, F_ICMPTYPE, F_FRAMELEN) = range(14)
N_F = 14
MAC_DST = bytes.fromhex("020000000003")
MAC_SRC = bytes.fromhex("020000000002")


@numba.njit(cache=True)
def _put32(buf, i, v):
    buf[i] = (v >> 24) & 0xFF
    buf[i + 1] = (v >> 16) & 0xFF
    buf[i + 2] = (v >> 8) & 0xFF
    buf[i + 3] = v & 0xFF


@numba.njit(cache=True)
def _build(f, addr, off, buf, macs):
    """Write frame i at buf[off[i]:] from f[i] (fields) and addr[i] (src_hi, src_lo,
    dst_hi, dst_lo). Payload bytes are zero (buf must be zeroed)."""
    for i in range(f.shape[0]):
        o = off[i]
        for k in range(12):
            buf[o + k] = macs[k]
        ver = f[i, F_IPVER]
        proto = f[i, F_PROTO]
        l3 = o + 14
        if proto == 6:
            l4h = 20 + (4 if f[i, F_WSCALE] >= 0 else 0)
        else:
            l4h = 8
        l4len = l4h + f[i, F_PAYLEN]
        if ver == 4:
            put16(buf, o + 12, 0x0800)
            buf[l3] = 0x45
            put16(buf, l3 + 2, 20 + l4len)
            put16(buf, l3 + 4, f[i, F_IPID])
            put16(buf, l3 + 6, 0x4000)
            buf[l3 + 8] = f[i, F_TTL]
            buf[l3 + 9] = proto
            _put32(buf, l3 + 12, np.int64(addr[i, 1] & np.uint64(0xFFFFFFFF)))
            _put32(buf, l3 + 16, np.int64(addr[i, 3] & np.uint64(0xFFFFFFFF)))
            put16(buf, l3 + 10, (~csum_fold(csum_add(buf, l3, 20, np.int64(0)))) & 0xFFFF)
            l4 = l3 + 20
        else:
            put16(buf, o + 12, 0x86DD)
            buf[l3] = 0x60
            put16(buf, l3 + 4, l4len)
            buf[l3 + 6] = proto
            buf[l3 + 7] = f[i, F_TTL]
            for w in range(4):
                for k in range(8):
                    buf[l3 + 8 + 8 * w + k] = (addr[i, w] >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)
            l4 = l3 + 40
        if proto == 6 or proto == 17:
            put16(buf, l4, f[i, F_SPORT])
            put16(buf, l4 + 2, f[i, F_DPORT])
        if proto == 6:
            _put32(buf, l4 + 4, f[i, F_SEQ])
            _put32(buf, l4 + 8, f[i, F_ACK])
            buf[l4 + 12] = (l4h // 4) << 4
            buf[l4 + 13] = f[i, F_FLAGS]
            put16(buf, l4 + 14, f[i, F_WIN])
            if f[i, F_WSCALE] >= 0:
                buf[l4 + 20] = 1
                buf[l4 + 21] = 3
                buf[l4 + 22] = 3
                buf[l4 + 23] = f[i, F_WSCALE]
            ck = l4 + 16
        elif proto == 17:
            put16(buf, l4 + 4, l4len)
            ck = l4 + 6
        else:
            buf[l4] = f[i, F_ICMPTYPE]
            put16(buf, l4 + 4, f[i, F_SPORT])     # ident
            put16(buf, l4 + 6, f[i, F_SEQ] & 0xFFFF)
            ck = l4 + 2
        acc = np.int64(0)
        if ver == 4 and proto != 1:
            acc = csum_add(buf, l3 + 12, 8, acc) + proto + l4len
        elif ver == 6:
            acc = csum_add(buf, l3 + 8, 32, acc) + proto + l4len
        v = (~csum_fold(csum_add(buf, l4, l4len, acc))) & 0xFFFF
        if v == 0 and proto == 17:
            v = 0xFFFF
        put16(buf, ck, v)


def _addr_words(base: str, idx: np.ndarray, ipver: int) -> tuple[np.ndarray, np.ndarray]:
    b = int(ipaddress.ip_address(base))
    vals = [b + int(k) for k in idx] if ipver == 6 else None
    if ipver == 4:
        lo = (np.uint64(b) + idx.astype(np.uint64)) & np.uint64(0xFFFFFFFF)
        return np.zeros(len(idx), dtype=np.uint64), lo
    hi = np.array([v >> 64 for v in vals], dtype=np.uint64)
    lo = np.array([v & ((1 << 64) - 1) for v in vals], dtype=np.uint64)
    return hi, lo


def build_frames(fields: np.ndarray, addr: np.ndarray, ts: np.ndarray | None = None,
                 ifindex: np.ndarray | None = None) -> PacketBatch:
    """Frames from field rows (F_* columns) and address rows. Frame length is
    F_FRAMELEN when larger than the headers (zero padding), else the headers + payload."""
    n = fields.shape[0]
    hdr = np.where(fields[:, F_IPVER] == 4, 34, 54)
    l4h = np.where(fields[:, F_PROTO] == 6, 20 + np.where(fields[:, F_WSCALE] >= 0, 4, 0), 8)
    need = hdr + l4h + fields[:, F_PAYLEN]
    length = np.maximum(need, fields[:, F_FRAMELEN]).astype(np.int32)
    off = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(length[:-1], out=off[1:])
    buf = np.zeros(int(length.sum()), dtype=np.uint8)
    _build(fields.astype(np.int64), addr, off, buf, np.frombuffer(MAC_DST + MAC_SRC, np.uint8))
    return PacketBatch(buf, off, length,
                       np.full(n, -1, np.int16) if ifindex is None else ifindex.astype(np.int16),
                       np.zeros(n, np.int64) if ts is None else ts.astype(np.int64))


def _flows(n_flows, ipver, base_src, base_dst):
    k = np.arange(n_flows, dtype=np.int64)
    s_hi, s_lo = _addr_words(base_src, k, ipver)
    d_hi, d_lo = _addr_words(base_dst, k // 60000, ipver)
    sport = 1024 + k % 60000
    return s_hi, s_lo, d_hi, d_lo, sport


def _defaults(fields, ipver, proto):
    fields[:, F_IPVER] = ipver
    fields[:, F_PROTO] = proto
    fields[:, F_TTL] = 64
    fields[:, F_WSCALE] = -1
    fields[:, F_WIN] = 65535


def handshake_frames(n_flows, *, seed=0, ipver=4, base_src=None, base_dst=None, dport=80,
                     wscale=7, syn_only=False, gap_ns=1000, start_ns=0) -> PacketBatch:
    """SYN, SYN/ACK, ACK of each flow, flows in order (3 frames each)."""
    base_src = base_src or ("10.1.0.0" if ipver == 4 else "fd00:1::")
    base_dst = base_dst or ("10.2.0.1" if ipver == 4 else "fd00:2::1")
    rng = np.random.default_rng(seed)
    s_hi, s_lo, d_hi, d_lo, sport = _flows(n_flows, ipver, base_src, base_dst)
    iss = rng.integers(0, 2**32, n_flows)
    irs = rng.integers(0, 2**32, n_flows)
    per = 1 if syn_only else 3
    n = n_flows * per
    f = np.zeros((n, N_F), dtype=np.int64)
    _defaults(f, ipver, 6)
    a = np.zeros((n, 4), dtype=np.uint64)
    rows = np.arange(n_flows) * per
    # SYN
    f[rows, F_SPORT], f[rows, F_DPORT] = sport, dport
    f[rows, F_FLAGS], f[rows, F_SEQ], f[rows, F_WSCALE] = 0x02, iss, wscale
    a[rows] = np.stack([s_hi, s_lo, d_hi, d_lo], axis=1)
    if not syn_only:
        r = rows + 1   # SYN/ACK
        f[r, F_SPORT], f[r, F_DPORT] = dport, sport
        f[r, F_FLAGS], f[r, F_SEQ], f[r, F_ACK] = 0x12, irs, (iss + 1) % 2**32
        f[r, F_WSCALE] = wscale
        a[r] = np.stack([d_hi, d_lo, s_hi, s_lo], axis=1)
        r = rows + 2   # ACK
        f[r, F_SPORT], f[r, F_DPORT] = sport, dport
        f[r, F_FLAGS], f[r, F_SEQ], f[r, F_ACK] = 0x10, (iss + 1) % 2**32, (irs + 1) % 2**32
        f[r, F_WIN] = 512
        a[r] = np.stack([s_hi, s_lo, d_hi, d_lo], axis=1)
    ts = start_ns + np.arange(n, dtype=np.int64) * gap_ns
    b = build_frames(f, a, ts)
    b.iss, b.irs = iss, irs     # for tcp_frames continuing these flows
    return b


def syn_frames(n_flows, **kw) -> PacketBatch:
    return handshake_frames(n_flows, syn_only=True, **kw)


def popularity_draw(n_flows, n_packets, popularity, zipf_s, rng) -> np.ndarray:
    if popularity == "uniform":
        return rng.integers(0, n_flows, n_packets)
    if popularity != "zipf":
        raise ValueError(f"popularity {popularity!r}: want 'zipf' or 'uniform'")
    ranks = np.arange(1, n_flows + 1, dtype=np.float64)
    p = ranks ** -zipf_s
    p /= p.sum()
    flows = rng.choice(n_flows, size=n_packets, p=p)
    return rng.permutation(n_flows)[flows]      # popularity not tied to flow index


def tcp_frames(n_flows, n_packets, *, popularity="zipf", zipf_s=1.1, frame_len=64, seed=0,
               ipver=4, base_src=None, base_dst=None, dport=80, iss=None, irs=None,
               gap_ns=100, start_ns=0, payload=0):
    """Established-flow packets (ACK, original direction), padded to frame_len bytes.
    With payload 0 (default) they are pure ACKs (64-byte frames: 54 bytes of headers and
    Ethernet padding), which a window tracker accepts however many there are; with a
    payload the sequence numbers advance per flow (and outrun a window nobody ACKs).
    Sequence numbers continue ``handshake_frames(n_flows, seed=seed)`` (same iss/irs).
    Returns (batch, flow id per packet)."""
    base_src = base_src or ("10.1.0.0" if ipver == 4 else "fd00:1::")
    base_dst = base_dst or ("10.2.0.1" if ipver == 4 else "fd00:2::1")
    rng = np.random.default_rng(seed)
    if iss is None or irs is None:
        iss = rng.integers(0, 2**32, n_flows)
        irs = rng.integers(0, 2**32, n_flows)
    rng2 = np.random.default_rng(seed + 1)
    flow = popularity_draw(n_flows, n_packets, popularity, zipf_s, rng2)
    pay = payload
    # k-th packet of its flow: stable rank inside the flow
    order = np.argsort(flow, kind="stable")
    counts = np.bincount(flow, minlength=n_flows)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    kth = np.empty(n_packets, dtype=np.int64)
    kth[order] = np.arange(n_packets) - np.repeat(starts, counts)
    s_hi, s_lo, d_hi, d_lo, sport = _flows(n_flows, ipver, base_src, base_dst)
    f = np.zeros((n_packets, N_F), dtype=np.int64)
    _defaults(f, ipver, 6)
    f[:, F_SPORT], f[:, F_DPORT] = sport[flow], dport
    f[:, F_FLAGS] = 0x10
    f[:, F_SEQ] = (iss[flow] + 1 + kth * pay) % 2**32
    f[:, F_ACK] = (irs[flow] + 1) % 2**32
    f[:, F_PAYLEN] = pay
    f[:, F_WIN] = 512
    f[:, F_FRAMELEN] = frame_len
    a = np.stack([s_hi[flow], s_lo[flow], d_hi[flow], d_lo[flow]], axis=1)
    ts = start_ns + np.arange(n_packets, dtype=np.int64) * gap_ns
    return build_frames(f, a, ts), flow


def udp_frames(n_flows, *, seed=0, ipver=4, base_src=None, base_dst=None, dport=53,
               payload=16, replies=True, gap_ns=1000, start_ns=0) -> PacketBatch:
    """A request per flow, followed by its reply when ``replies``."""
    base_src = base_src or ("10.1.0.0" if ipver == 4 else "fd00:1::")
    base_dst = base_dst or ("10.2.0.1" if ipver == 4 else "fd00:2::1")
    s_hi, s_lo, d_hi, d_lo, sport = _flows(n_flows, ipver, base_src, base_dst)
    per = 2 if replies else 1
    n = n_flows * per
    f = np.zeros((n, N_F), dtype=np.int64)
    _defaults(f, ipver, 17)
    f[:, F_PAYLEN] = payload
    a = np.zeros((n, 4), dtype=np.uint64)
    r = np.arange(n_flows) * per
    f[r, F_SPORT], f[r, F_DPORT] = sport, dport
    a[r] = np.stack([s_hi, s_lo, d_hi, d_lo], axis=1)
    if replies:
        f[r + 1, F_SPORT], f[r + 1, F_DPORT] = dport, sport
        a[r + 1] = np.stack([d_hi, d_lo, s_hi, s_lo], axis=1)
    return build_frames(f, a, start_ns + np.arange(n, dtype=np.int64) * gap_ns)


def icmp_echo_frames(n_flows, *, seed=0, ipver=4, base_src=None, base_dst=None,
                     payload=8, gap_ns=1000, start_ns=0) -> PacketBatch:
    """Echo request + reply per flow (ident = 1 + k % 65535)."""
    base_src = base_src or ("10.1.0.0" if ipver == 4 else "fd00:1::")
    base_dst = base_dst or ("10.2.0.1" if ipver == 4 else "fd00:2::1")
    s_hi, s_lo, d_hi, d_lo, _ = _flows(n_flows, ipver, base_src, base_dst)
    n = 2 * n_flows
    proto = 1 if ipver == 4 else 58
    req, rep = (8, 0) if ipver == 4 else (128, 129)
    f = np.zeros((n, N_F), dtype=np.int64)
    _defaults(f, ipver, proto)
    f[:, F_PAYLEN] = payload
    ident = 1 + np.arange(n_flows) % 65535
    r = np.arange(n_flows) * 2
    f[r, F_ICMPTYPE], f[r, F_SPORT] = req, ident
    f[r + 1, F_ICMPTYPE], f[r + 1, F_SPORT] = rep, ident
    a = np.zeros((n, 4), dtype=np.uint64)
    a[r] = np.stack([s_hi, s_lo, d_hi, d_lo], axis=1)
    a[r + 1] = np.stack([d_hi, d_lo, s_hi, s_lo], axis=1)
    return build_frames(f, a, start_ns + np.arange(n, dtype=np.int64) * gap_ns)
