# Frame parsing: Ethernet (802.1Q/QinQ) / IPv4 (options) / IPv6 (extension headers) /
# TCP / UDP / ICMP / ICMPv6 into tuple arrays, in one numba kernel over a batch.
# Outcome rules follow Linux conntrack (tcp_error, udp_error, icmp_error) and gVisor getTupleID.
"""Parsing frames to tuples.

``parse_batch(batch.buf, batch.off, batch.length, meta, addr, validate_checksums)`` fills
one row of ``meta`` (int64, columns ``M_*``) and ``addr`` (uint64 src_hi, src_lo, dst_hi,
dst_lo) per frame. It never raises: every frame ends in one class:

===============  =============================================================
CLS_TRACK        a tuple that may be looked up (and maybe create a conn)
CLS_RELATED      an ICMP error: the tuple is the *inverted* tuple of the packet it
                 quotes; it never creates a conn
CLS_UNTRACKED    IP, but nothing conntrack follows (non-first fragment, ND/MLD,
                 ICMP types without a tuple, no next header)
CLS_INVALID      truncated or inconsistent headers, bad checksum, impossible flags
CLS_NOTIP        not IPv4/IPv6 (ARP, LLDP...): passed, never tracked
===============  =============================================================

``M_REASON`` says why for INVALID/UNTRACKED (``REASON_*``). Offsets are relative to the
frame start. ICMP query tuples (echo, and for IPv4 timestamp, information and address
mask, the types Linux tracks) put the ident in the sport slot for requests and the dport
slot for replies (gVisor getTupleID), so a reply matches the request's inverted tuple.
The other slot holds the query's key (``icmp_query``): 0 for echo, which keeps gVisor's
echo tuple, else the request's type, so a timestamp and an echo with one ident are two
conns as in Linux (whose tuple holds the type).
"""
from __future__ import annotations

import numba
import numpy as np

from .checksum import csum_add, csum_fold, get16, get32, icmp_sum, l4_sum
from .cpu import kernel, prefetch
from .hashing import hash_key, hash_v4

# classes
CLS_TRACK, CLS_RELATED, CLS_UNTRACKED, CLS_INVALID, CLS_NOTIP = 0, 1, 2, 3, 4
CLASS_NAMES = ("track", "related", "untracked", "invalid", "not_ip")

# reasons
REASON_NONE = 0
REASON_SHORT_L2 = 1       # frame shorter than its Ethernet/VLAN header
REASON_IP_HDR = 2         # bad version/IHL or header past the frame
REASON_IP_LEN = 3         # IP total/payload length larger than the frame
REASON_IP_CSUM = 4        # IPv4 header checksum
REASON_L4_SHORT = 5       # transport header truncated
REASON_TCP_DOFF = 6       # data offset < 5 or past the segment
REASON_TCP_FLAGS = 7      # flag combination Linux calls invalid
REASON_L4_CSUM = 8        # TCP/UDP/ICMP checksum
REASON_UDP_LEN = 9        # UDP length field inconsistent
REASON_ICMP_TYPE = 10     # ICMP type unknown to conntrack
REASON_ICMP_INNER = 11    # ICMP error whose quoted packet cannot give a tuple
REASON_FRAGMENT = 12      # non-first fragment (UNTRACKED)
REASON_NOT_TRACKED = 13   # ND/MLD, informational ICMP, no next header (UNTRACKED)
REASON_EXT_HDR = 14       # IPv6 extension header chain truncated or too long
# not a parse result: set on a forwarded packet the router dropped because its TTL / hop
# limit ran out (track.take_hops, after tracking); the ICMP generator answers those
HOP_EXPIRED = 255
REASON_NAMES = ("none", "short_l2", "ip_header", "ip_length", "ip_checksum", "l4_short",
                "tcp_doff", "tcp_flags", "l4_checksum", "udp_length", "icmp_type",
                "icmp_inner", "fragment", "not_tracked", "ext_header")

# meta columns
M_CLS = 0
M_REASON = 1
M_IPVER = 2      # 4 or 6
M_PROTO = 3      # transport protocol number
M_PORTS = 4      # sport << 16 | dport (echo: ident in one slot)
M_L3 = 5         # offset of the IP header
M_L4 = 6         # offset of the transport header
M_L3LEN = 7      # IP datagram length (the bytes conntrack accounts)
M_L4LEN = 8      # transport bytes per the IP header
M_TFLAGS = 9     # TCP flags byte (with ECE/CWR)
M_SEQ = 10
M_ACK = 11
M_WIN = 12       # raw TCP window
M_WSCALE = 13    # window scale option on a SYN, -1 when absent
M_SACKPERM = 14  # SACK-permitted option on a SYN
M_PAYLEN = 15    # TCP payload bytes
M_ICMPTYPE = 16
M_INNER_L3 = 17  # ICMP error: quoted IP header offset
M_INNER_L4 = 18  # ICMP error: quoted transport header offset
M_FRAG = 19      # 1 for a first fragment (L4 checksum not checkable)
M_ECHO = 20      # ICMP query (icmp_query): 1 request, 2 reply
M_INNER_PROTO = 21
N_META = 22

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58

TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK, TH_URG, TH_ECE, TH_CWR = 1, 2, 4, 8, 16, 32, 64, 128

# tcp_valid_flags[] of nf_conntrack_proto_tcp.c, indexed by flags & ~(PSH|ECE|CWR)
_VALID_FLAGS = np.zeros(64, dtype=np.uint8)
for _f in (TH_SYN, TH_SYN | TH_URG, TH_SYN | TH_ACK, TH_RST, TH_RST | TH_ACK,
           TH_FIN | TH_ACK, TH_FIN | TH_ACK | TH_URG, TH_ACK, TH_ACK | TH_URG):
    _VALID_FLAGS[_f] = 1


# ICMP queries conntrack tracks (nf_conntrack_proto_icmp{,v6}.c invmap; only requests may
# create a conn): rows (table, request type, reply type, key); table 0 is ICMP, 1 ICMPv6
_QUERIES = ((0, 8, 0, 0), (0, 13, 14, 13), (0, 15, 16, 15), (0, 17, 18, 17), (1, 128, 129, 0))
_Q_ROLE = np.zeros((2, 256), dtype=np.int64)     # 1 request, 2 reply, 0 not a query
_Q_KEY = np.zeros((2, 256), dtype=np.int64)      # the tuple's other slot
for _t, _req, _rep, _key in _QUERIES:
    _Q_ROLE[_t, _req], _Q_KEY[_t, _req] = 1, _key
    _Q_ROLE[_t, _rep], _Q_KEY[_t, _rep] = 2, _key


@numba.njit(inline="always", cache=True)
def icmp_query(ver, ty):
    """(role, key) of ICMP (ver 4) / ICMPv6 (ver 6) type ``ty`` (0..255): role 1 request,
    2 reply, 0 not a tracked query; key goes in the tuple slot the ident does not use."""
    k = 0 if ver == 4 else 1
    return _Q_ROLE[k, ty], _Q_KEY[k, ty]


@numba.njit(cache=True)
def may_be_fragment(meta):
    """Might frag.Defrag take one of these parsed frames? True for any IP fragment
    (M_FRAG set) and for any frame whose IP header the parser refused (defrag reads the
    header on its own and may judge it otherwise): the engine then runs defrag on them."""
    for i in range(meta.shape[0]):
        if meta[i, M_FRAG] != 0:
            return True
        if meta[i, M_CLS] == CLS_INVALID:
            r = meta[i, M_REASON]
            if r == REASON_IP_HDR or r == REASON_IP_LEN or r == REASON_IP_CSUM \
                    or r == REASON_EXT_HDR:
                return True
    return False


def new_meta(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, N_META), dtype=np.int64), np.zeros((n, 4), dtype=np.uint64)


class MetaScratch:
    """parse_batch's output arrays, reused from call to call (fresh ones cost a page
    fault per 4 KiB on first write: tens of ns a packet). The views it returns are valid
    until the next call. Owner: one thread."""

    def __init__(self):
        self.meta, self.addr = new_meta(0)

    def __call__(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.meta.shape[0] < n:
            self.meta, self.addr = new_meta(max(n, 2 * self.meta.shape[0], 1024))
        return self.meta[:n], self.addr[:n]


@numba.njit(inline="always", cache=True)
def _load_addr(buf, at, nbytes):
    # returns (hi, lo) words of an address at buf[at]
    if nbytes == 4:
        return np.uint64(0), np.uint64(get32(buf, at))
    hi = np.uint64(0)
    lo = np.uint64(0)
    for k in range(8):
        hi = (hi << np.uint64(8)) | np.uint64(buf[at + k])
        lo = (lo << np.uint64(8)) | np.uint64(buf[at + 8 + k])
    return hi, lo


load_addr = _load_addr     # for the other kernels that read an address from a frame


@numba.njit(inline="always", cache=True)
def _ip_header(buf, l3, end):
    """Walk an IP header at l3 (end = last valid byte + 1).

    Returns (status, ipver, proto, l4, l4end, frag) where status is 0 ok, else a
    REASON_*; frag is 0 unfragmented, 1 first fragment, 2 non-first fragment.
    l4end is the end of the datagram (clamped to `end` by the caller for quotes).
    """
    if l3 + 1 > end:
        return REASON_IP_HDR, 0, 0, 0, 0, 0
    ver = buf[l3] >> 4
    if ver == 4:
        ihl = (buf[l3] & 0xF) * 4
        if ihl < 20 or l3 + ihl > end:
            return REASON_IP_HDR, 4, 0, 0, 0, 0
        tot = get16(buf, l3 + 2)
        if tot < ihl:
            return REASON_IP_HDR, 4, 0, 0, 0, 0
        fo = get16(buf, l3 + 6)
        frag = 0
        if fo & 0x1FFF:
            frag = 2
        elif fo & 0x2000:
            frag = 1
        return 0, 4, np.int64(buf[l3 + 9]), l3 + ihl, l3 + tot, frag
    if ver == 6:
        if l3 + 40 > end:
            return REASON_IP_HDR, 6, 0, 0, 0, 0
        plen = get16(buf, l3 + 4)
        nh = np.int64(buf[l3 + 6])
        p = l3 + 40
        dend = l3 + 40 + plen
        frag = 0
        for _ in range(8):
            if nh == 0 or nh == 43 or nh == 60:
                if p + 8 > end:
                    return REASON_EXT_HDR, 6, 0, 0, 0, 0
                nxt = np.int64(buf[p])
                p += (np.int64(buf[p + 1]) + 1) * 8
                nh = nxt
            elif nh == 44:
                if p + 8 > end:
                    return REASON_EXT_HDR, 6, 0, 0, 0, 0
                nxt = np.int64(buf[p])
                fo = get16(buf, p + 2)
                if fo & 0xFFF8:
                    frag = 2
                elif fo & 1:
                    frag = 1
                p += 8
                nh = nxt
            elif nh == 51:
                if p + 8 > end:
                    return REASON_EXT_HDR, 6, 0, 0, 0, 0
                nxt = np.int64(buf[p])
                p += (np.int64(buf[p + 1]) + 2) * 4
                nh = nxt
            else:
                if p > end or p > dend:
                    return REASON_EXT_HDR, 6, 0, 0, 0, 0
                return 0, 6, nh, p, dend, frag
        return REASON_EXT_HDR, 6, 0, 0, 0, 0
    return REASON_IP_HDR, np.int64(ver), 0, 0, 0, 0


@numba.njit(inline="always", cache=True)
def parse_one(buf, o, n, meta, addr, i, validate):
    """Parse frame i (buf[o:o+n]) into meta[i], addr[i]. Never raises."""
    for c in range(N_META):
        meta[i, c] = 0
    meta[i, M_WSCALE] = -1
    for c in range(4):
        addr[i, c] = 0
    end = o + n
    # -- Ethernet, up to two VLAN tags
    if n < 14:
        meta[i, M_CLS] = CLS_INVALID
        meta[i, M_REASON] = REASON_SHORT_L2
        return
    et = get16(buf, o + 12)
    l3 = o + 14
    for _ in range(2):
        if et == 0x8100 or et == 0x88A8:
            if l3 + 4 > end:
                meta[i, M_CLS] = CLS_INVALID
                meta[i, M_REASON] = REASON_SHORT_L2
                return
            et = get16(buf, l3 + 2)
            l3 += 4
    if et != 0x0800 and et != 0x86DD:
        meta[i, M_CLS] = CLS_NOTIP
        return
    st, ver, proto, l4, dend, frag = _ip_header(buf, l3, end)
    if st == 0 and ((et == 0x0800 and ver != 4) or (et == 0x86DD and ver != 6)):
        st = REASON_IP_HDR
    meta[i, M_IPVER] = ver
    meta[i, M_L3] = l3 - o
    if st != 0:
        meta[i, M_CLS] = CLS_INVALID
        meta[i, M_REASON] = st
        return
    if dend > end:
        meta[i, M_CLS] = CLS_INVALID
        meta[i, M_REASON] = REASON_IP_LEN
        return
    if ver == 4:
        if validate and csum_fold(csum_add(buf, l3, l4 - l3, np.int64(0))) != 0xFFFF:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_IP_CSUM
            return
        a0, a1 = _load_addr(buf, l3 + 12, 4)
        a2, a3 = _load_addr(buf, l3 + 16, 4)
    else:
        a0, a1 = _load_addr(buf, l3 + 8, 16)
        a2, a3 = _load_addr(buf, l3 + 24, 16)
    addr[i, 0] = a0
    addr[i, 1] = a1
    addr[i, 2] = a2
    addr[i, 3] = a3
    meta[i, M_PROTO] = proto
    meta[i, M_L4] = l4 - o
    meta[i, M_L3LEN] = dend - l3
    l4len = dend - l4
    meta[i, M_L4LEN] = l4len
    meta[i, M_FRAG] = frag
    if frag == 2:
        meta[i, M_CLS] = CLS_UNTRACKED
        meta[i, M_REASON] = REASON_FRAGMENT
        return
    if ver == 6 and proto == 59:
        meta[i, M_CLS] = CLS_UNTRACKED
        meta[i, M_REASON] = REASON_NOT_TRACKED
        return
    check = validate and frag == 0
    if proto == IPPROTO_TCP:
        if l4len < 20:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_SHORT
            return
        doff = (buf[l4 + 12] >> 4) * 4
        if doff < 20 or doff > l4len:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_TCP_DOFF
            return
        fl = np.int64(buf[l4 + 13])
        if _VALID_FLAGS[fl & 0x37] == 0:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_TCP_FLAGS
            return
        if check and csum_fold(l4_sum(buf, l3, l4, l4len, IPPROTO_TCP, ver)) != 0xFFFF:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_CSUM
            return
        meta[i, M_PORTS] = (get16(buf, l4) << 16) | get16(buf, l4 + 2)
        meta[i, M_SEQ] = get32(buf, l4 + 4)
        meta[i, M_ACK] = get32(buf, l4 + 8)
        meta[i, M_TFLAGS] = fl
        meta[i, M_WIN] = get16(buf, l4 + 14)
        meta[i, M_PAYLEN] = l4len - doff
        if fl & TH_SYN:
            p = l4 + 20
            oend = l4 + doff
            while p < oend:
                kind = buf[p]
                if kind == 0:
                    break
                if kind == 1:
                    p += 1
                    continue
                if p + 1 >= oend:
                    break
                olen = np.int64(buf[p + 1])
                if olen < 2 or p + olen > oend:
                    break
                if kind == 3 and olen == 3:
                    ws = np.int64(buf[p + 2])
                    meta[i, M_WSCALE] = 14 if ws > 14 else ws
                elif kind == 4 and olen == 2:
                    meta[i, M_SACKPERM] = 1
                p += olen
        meta[i, M_CLS] = CLS_TRACK
        return
    if proto == IPPROTO_UDP:
        if l4len < 8:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_SHORT
            return
        ulen = get16(buf, l4 + 4)
        if ulen < 8 or (ulen > l4len and frag == 0):
            # (a first fragment carries the whole datagram's length)
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_UDP_LEN
            return
        ck = get16(buf, l4 + 6)
        if ver == 6 and ck == 0 and frag == 0:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_CSUM
            return
        if check and ck != 0 and csum_fold(l4_sum(buf, l3, l4, ulen, IPPROTO_UDP, ver)) != 0xFFFF:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_CSUM
            return
        meta[i, M_PORTS] = (get16(buf, l4) << 16) | get16(buf, l4 + 2)
        meta[i, M_CLS] = CLS_TRACK
        return
    if (proto == IPPROTO_ICMP and ver == 4) or (proto == IPPROTO_ICMPV6 and ver == 6):
        if l4len < 8:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_SHORT
            return
        if check and csum_fold(icmp_sum(buf, l3, l4, l4len, ver)) != 0xFFFF:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_L4_CSUM
            return
        ty = np.int64(buf[l4])
        meta[i, M_ICMPTYPE] = ty
        ident = get16(buf, l4 + 4)
        role, key = icmp_query(ver, ty)
        if ver == 4:
            is_err = ty == 3 or ty == 4 or ty == 5 or ty == 11 or ty == 12
            unknown = ty > 18
        else:
            is_err = ty >= 1 and ty <= 4
            unknown = ty < 128 and not is_err
        if role == 1:
            meta[i, M_PORTS] = (ident << 16) | key
            meta[i, M_ECHO] = 1
            meta[i, M_CLS] = CLS_TRACK
            return
        if role == 2:
            meta[i, M_PORTS] = (key << 16) | ident
            meta[i, M_ECHO] = 2
            meta[i, M_CLS] = CLS_TRACK
            return
        if unknown:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_ICMP_TYPE
            return
        if not is_err:
            meta[i, M_CLS] = CLS_UNTRACKED
            meta[i, M_REASON] = REASON_NOT_TRACKED
            return
        # ICMP error: tuple of the quoted packet, inverted
        il3 = l4 + 8
        qend = dend
        ist, iver, iproto, il4, idend, ifrag = _ip_header(buf, il3, qend)
        if ist != 0 or iver != ver or ifrag == 2:
            meta[i, M_CLS] = CLS_INVALID
            meta[i, M_REASON] = REASON_ICMP_INNER
            return
        ports = np.int64(0)
        if iproto == IPPROTO_TCP or iproto == IPPROTO_UDP:
            if il4 + 8 > qend:
                meta[i, M_CLS] = CLS_INVALID
                meta[i, M_REASON] = REASON_ICMP_INNER
                return
            # inverted: sport = quoted dport, dport = quoted sport
            ports = (get16(buf, il4 + 2) << 16) | get16(buf, il4)
        elif iproto == proto:
            if il4 + 8 > qend:
                meta[i, M_CLS] = CLS_INVALID
                meta[i, M_REASON] = REASON_ICMP_INNER
                return
            irole, ikey = icmp_query(ver, np.int64(buf[il4]))
            iid = get16(buf, il4 + 4)
            if irole == 1:
                ports = (ikey << 16) | iid      # quoted request -> inverted reply form
            elif irole == 2:
                ports = (iid << 16) | ikey
            else:
                meta[i, M_CLS] = CLS_INVALID
                meta[i, M_REASON] = REASON_ICMP_INNER
                return
        if ver == 4:
            b0, b1 = _load_addr(buf, il3 + 16, 4)   # quoted dst becomes src
            b2, b3 = _load_addr(buf, il3 + 12, 4)
        else:
            b0, b1 = _load_addr(buf, il3 + 24, 16)
            b2, b3 = _load_addr(buf, il3 + 8, 16)
        addr[i, 0] = b0
        addr[i, 1] = b1
        addr[i, 2] = b2
        addr[i, 3] = b3
        meta[i, M_PROTO] = iproto
        meta[i, M_INNER_PROTO] = iproto
        meta[i, M_PORTS] = ports
        meta[i, M_INNER_L3] = il3 - o
        meta[i, M_INNER_L4] = il4 - o
        meta[i, M_CLS] = CLS_RELATED
        return
    # any other transport: generic tracking, no ports
    meta[i, M_CLS] = CLS_TRACK


PF_FRAMES = 16      # frames ahead whose headers parse_batch prefetches
HASH_BLOCK = 1024    # parse_hash_batch: frames parsed before their hashes are taken


@numba.njit(inline="always", cache=True)
def prefetch_headers(buf, off, i):
    """Ask for the first two cache lines of frame i (its Ethernet, IP and TCP headers):
    frames read in order from a large buffer (a capture, the pool's ring) are rarely in
    cache, and their variable sizes defeat the hardware's stride prefetcher (a cold parse
    runs about 75 ns a frame here, a cached one 15)."""
    if i < off.shape[0]:
        o = off[i]
        last = buf.shape[0] - 1
        if o <= last:
            prefetch(buf, o)
            prefetch(buf, min(o + 64, last))


@kernel
def parse_batch(buf, off, length, meta, addr, validate):
    """Parse every frame of a batch. Preconditions: meta is (n, N_META) int64 and addr
    is (n, 4) uint64 with n == len(off)."""
    for i in range(min(PF_FRAMES, off.shape[0])):
        prefetch_headers(buf, off, i)
    for i in range(off.shape[0]):
        prefetch_headers(buf, off, i + PF_FRAMES)
        parse_one(buf, off[i], length[i], meta, addr, i, validate)


@kernel
def parse_hash_batch(buf, off, length, meta, addr, validate, seed, hashes):
    """Parse, then hash each trackable or related tuple (-1 otherwise): what the
    dispatcher needs to route. The one-at-a-time hash is a long serial chain per tuple,
    so it runs after parsing as a branch-free IPv4 loop the compiler vectorizes across
    packets; a third loop fixes the rows that are not IPv4 tuples. The three run block by
    block, so the hash reads rows the parse has just written (still in cache)."""
    n = off.shape[0]
    for i in range(min(PF_FRAMES, n)):
        prefetch_headers(buf, off, i)
    for s in range(0, n, HASH_BLOCK):
        e = min(n, s + HASH_BLOCK)
        for i in range(s, e):
            prefetch_headers(buf, off, i + PF_FRAMES)
            parse_one(buf, off[i], length[i], meta, addr, i, validate)
        for i in range(s, e):
            hashes[i] = np.int64(hash_v4(seed, addr[i, 1], addr[i, 3], meta[i, M_PORTS],
                                         meta[i, M_PROTO]))
        for i in range(s, e):
            c = meta[i, M_CLS]
            if c != CLS_TRACK and c != CLS_RELATED:
                hashes[i] = -1
            elif meta[i, M_IPVER] != 4:
                hashes[i] = hash_key(seed, addr[i, 0], addr[i, 1], addr[i, 2], addr[i, 3],
                                     meta[i, M_PORTS], meta[i, M_PROTO], meta[i, M_IPVER])
