# Errors the router originates, as Linux sends them: ICMP time-exceeded for a forwarded
# packet that arrived with TTL / hop limit <= 1 (ip_forward / ip6_forward), frag-needed /
# packet-too-big for one over the egress MTU (ip_exceeds_mtu / ip6_pkt_too_big), and, with
# no local delivery, port unreachable for UDP to the router's own address (udp_rcv with no
# socket) and a TCP RST for TCP to it (tcp_v4_send_reset); built by numba kernels, ICMP
# rate-limited per destination host (icmp_ratelimit).
"""Generated errors: ICMP, and the RST of a closed TCP port (one module owns them).

``IcmpErrors(network, config, seed)`` holds what the generator needs across batches:
each interface's first IPv4 and IPv6 address and its MTU, the network's routes and own
addresses as arrays, and the rate limiter's per-destination token buckets.
``generate(batch, meta, verdict, forward, tid, ts, table, V_DROP, V_ACCEPT)`` runs after
the tracking kernel: it picks the frames that get an error (``error_rows``), drops the
ones over their egress MTU (verdict V_DROP, forward False; ``too_big`` lists them, and
the engine withdraws a conn such a packet created: track.withdraw_new) and keeps the
ones for the router itself from leaving (forward False), then returns a PacketBatch of
the errors (or None).

The errors (reference/kernel-behaviour.md; net/ipv4/icmp.c __icmp_send, ipv6/icmp.c
icmp6_send):

=================  ==========  ============  ===============  ===========  ============
kind               ICMP        ICMPv6        source address   rate limit   info field
=================  ==========  ============  ===============  ===========  ============
time exceeded      11 / 0      3 / 0         ingress iface    yes          0
frag needed / PTB  3 / 4 (DF)  2 / 0         ingress iface    no           egress MTU
port unreachable   3 / 3       1 / 4         packet's dst     yes          0
tcp reset          (TCP RST)                 packet's dst     no           -
=================  ==========  ============  ===============  ===========  ============

ICMP over IPv4: TTL 64, TOS (arrived TOS & 0x1e) | 0xc0, DF clear, a fresh IP id, the quote cut so
the whole error fits min(576, ingress MTU) bytes; IPv6: hop limit 64, quote cut to 1280
bytes in all. The quote is the packet *as it arrived*: the tracking kernel rewrote it
(NAT, the hop taken), so the quote is rewritten back to its conn's tuple in its
direction (as Linux's nf_nat_icmp_reply_translation does to the error) and gets its hop
back. The Ethernet header is the arriving one with the two MACs swapped (VLAN tags
kept); the error's ``ifindex`` is the ingress interface.
No error answers an ICMP error, a non-first fragment, or a source that is not unicast
("not sent"); a port unreachable or a reset only answers UDP / TCP conntrack accepted
(the stack drops a bad checksum silently), and a reset never answers a reset.

The reset, as tcp_v4_send_reset / tcp_v6_send_reset: to the segment's source from the
address and port it was sent to *after NAT* (the router's own), seq = the segment's ack
if it had ACK, else ack = its seq + SYN + FIN + payload with ACK set; a 20-byte header,
window 0; IPv4 TTL 64, DF, id 0, TOS as the segment's without ECN; IPv6 hop limit 64, the
segment's traffic class without ECN, flow label 0. It is a locally generated packet: the
engine tracks it (a conn whose only reply is the RST is deleted, as Linux does) and NAT
rewrites it back (REDIRECT, DNAT to the router), as conntrack does on OUTPUT
(``resets``: which generated frames those are).

Rate limit (icmp_ratelimit; icmpv4_mask_allow and the ICMPv6 ratemask "0-1,3-127"
exempt frag-needed and packet-too-big: "Don't limit PMTU discovery"): one token bucket
per destination host, shared by the kinds it applies to, holding up to 6 intervals
(XRLIM_BURST_FACTOR); each error costs one interval; a host not seen before starts
full. Buckets live in a fixed direct-mapped table (a colliding host takes the slot over
with a full bucket), so memory is bounded.

A datagram the engine reassembled (frag.py) is one packet here: held fragments get no
error; the datagram is held to the egress MTU by its largest fragment (Linux's
frag_max_size: ip_exceeds_mtu / ip6_pkt_too_big), and its IPv4 header has DF when that
fragment had it (ip_frag_reasm).

Not here: fragmenting non-DF IPv4 packets and reassembled datagrams over the MTU
(frag.py's ``Output`` cuts them), and local delivery (``Config.local_delivery``: a host
stack answers for the router's addresses, so no port unreachable or RST is made here).
"""
from __future__ import annotations

import numba
import numpy as np

from . import wire
from .batch import PacketBatch
from .checksum import csum_add, csum_fold, icmp_sum, l4_sum, put16
from .cpu import kernel
from .hashing import addr_words
from .netconf import route_compiled
from .rewrite import restore_hop, rewrite_header

BURST = 6                 # XRLIM_BURST_FACTOR
RL_SLOTS = 4096           # rate limiter buckets (a power of two)
ROOM4 = 576               # icmp_send: the whole error fits in 576 bytes (or the MTU)
QUOTE6 = 1280 - 40 - 8    # icmpv6_send: ... in IPV6_MIN_MTU
TTL_OUT = 64
PREC_INTERNETCONTROL = 0xC0
TOS_MASK = 0x1E

# error kinds (rows of ERRORS)
TIME_EXCEEDED, FRAG_NEEDED, PORT_UNREACH, TCP_RESET, ECHO_REPLY, TS_REPLY = 0, 1, 2, 3, 4, 5
KIND_NAMES = ("icmp_time_exceeded", "icmp_frag_needed", "icmp_port_unreachable", "tcp_reset",
              "icmp_echo_reply", "icmp_timestamp_reply")
TS_LEN = 20               # a timestamp reply's ICMP message: header and three times
# source of the error's address
SRC_INGRESS, SRC_DEST = 0, 1
# columns: ICMP type, code, ICMPv6 type, code, rate-limited, source
ERRORS = np.array([
    [11, 0, 3, 0, 1, SRC_INGRESS],
    # ip_forward: TTL <= 1 -> icmp_send(ICMP_TIME_EXCEEDED, ICMP_EXC_TTL)
    [3, 4, 2, 0, 0, SRC_INGRESS],
    # DF (IPv4) or any IPv6 packet over the egress MTU; exempt from the rate limit
    [3, 3, 1, 4, 1, SRC_DEST],
    # UDP to the router's own address, no socket: from the address it was sent to
    [0, 0, 0, 0, 0, SRC_DEST],
    # TCP to the router's own address, no socket: a RST, not ICMP (never rate-limited)
    [0, 0, 129, 0, 0, SRC_DEST],
    # echo request to the router's own address: icmp_echo / icmpv6_echo_reply (echo
    # replies are outside icmp_ratemask's default)
    [14, 0, 0, 0, 0, SRC_DEST],
    # timestamp request (IPv4) to it: icmp_timestamp, the times in ms since midnight UT
], dtype=np.int64)
# counters (stats array [kind, column])
ST_SENT, ST_RATELIMITED, ST_SKIPPED = 0, 1, 2
STAT_NAMES = tuple(f"{k}{s}" for k in KIND_NAMES for s in ("", "_ratelimited", "_not_sent"))
RST_LEN = 20
_NO_SIZE = np.zeros(0, dtype=np.int64)      # error_rows: every frame held to its own length


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


@numba.njit(inline="always", cache=True)
def _l2_ip(buf, o, l2, out, p, ver, tos, payload, ident, df, proto):
    """Write at out[p:] the arriving frame's L2 header (buf[o:o + l2], VLAN tags kept)
    with its two MACs swapped, then an IP header with no addresses yet: TTL / hop limit
    64, ``tos`` (IPv6: the traffic class, flow label 0), ``payload`` bytes after it, the
    next protocol ``proto``; IPv4 id ``ident``, DF when ``df``, checksum 0 (_ip4_checksum
    once the addresses are in)."""
    for k in range(l2):
        out[p + k] = buf[o + k]
    for k in range(6):
        out[p + k] = buf[o + 6 + k]
        out[p + 6 + k] = buf[o + k]
    n3 = p + l2
    if ver == 4:
        out[n3] = 0x45
        out[n3 + 1] = tos
        put16(out, n3 + 2, 20 + payload)
        put16(out, n3 + 4, ident & 0xFFFF)
        put16(out, n3 + 6, 0x4000 if df else 0)
        out[n3 + 8] = TTL_OUT
        out[n3 + 9] = proto
        put16(out, n3 + 10, 0)
        return
    out[n3] = 0x60 | (tos >> 4)
    out[n3 + 1] = (tos & 0xF) << 4
    out[n3 + 2] = 0
    out[n3 + 3] = 0
    put16(out, n3 + 4, payload)
    out[n3 + 6] = proto
    out[n3 + 7] = TTL_OUT


@numba.njit(inline="always", cache=True)
def _ip4_checksum(out, n3):
    put16(out, n3 + 10, (~csum_fold(csum_add(out, n3, 20, np.int64(0)))) & 0xFFFF)


@numba.njit(inline="always", cache=True)
def _tos(buf, l3, ver):
    """The IPv4 TOS / IPv6 traffic class of the packet at buf[l3]."""
    if ver == 4:
        return np.int64(buf[l3 + 1])
    return (np.int64(buf[l3]) & 0xF) << 4 | np.int64(buf[l3 + 1]) >> 4


@numba.njit(inline="always", cache=True)
def _answer_header(buf, o, l2, out, p, ver, tos, payload, ident, df, proto):
    """_l2_ip for an answer from the address the frame at buf[o:] was sent to back to
    its source: the L2 header and an IP header with the two addresses swapped (IPv4
    checksum done)."""
    _l2_ip(buf, o, l2, out, p, ver, tos, payload, ident, df, proto)
    l3 = o + l2
    n3 = p + l2
    if ver == 4:
        for k in range(4):
            out[n3 + 12 + k] = buf[l3 + 16 + k]
            out[n3 + 16 + k] = buf[l3 + 12 + k]
        _ip4_checksum(out, n3)
    else:
        for k in range(16):
            out[n3 + 8 + k] = buf[l3 + 24 + k]
            out[n3 + 24 + k] = buf[l3 + 8 + k]


@numba.njit(inline="always", cache=True)
def _is_error(buf, o, meta, i):
    """Is frame i itself an ICMP error (icmp_send: an error type or one past
    NR_ICMP_TYPES; ICMPv6: a type < 128)?"""
    if meta[i, wire.M_FRAG] == 2 or meta[i, wire.M_L4LEN] < 1:
        return False
    ty = np.int64(buf[o + meta[i, wire.M_L4]])
    if meta[i, wire.M_IPVER] == 4 and meta[i, wire.M_PROTO] == 1:
        return ty == 3 or ty == 4 or ty == 5 or ty == 11 or ty == 12 or ty > 18
    if meta[i, wire.M_IPVER] == 6 and meta[i, wire.M_PROTO] == 58:
        return ty < 128
    return False


@kernel
def error_rows(buf, off, ifindex, meta, verdict, forward, v_drop, v_accept, ttl_on, answer_local,
               routes, rinfo, local, lver, n_if, mtu, min_mtu, size, rows, kinds, info):
    """Pick the frames that get an error; returns how many (rows[k], kinds[k], info[k]).

    - time exceeded: dropped (``v_drop``) with ``ttl_on`` for its TTL / hop limit
      (track.take_hops marks those wire.HOP_EXPIRED, after tracking);
    - port unreachable / tcp reset / echo reply / timestamp reply (``answer_local``):
      accepted UDP / TCP (not a RST) / ICMP or ICMPv6 echo request / ICMP timestamp
      request, not a fragment, from an interface, addressed (after NAT) to one of
      ``local``; forward[i] := False;
    - frag needed: leaving (``forward``), from an interface, routed (after NAT) to an
      interface whose ``mtu`` its IP length exceeds (``size[i]`` when ``size`` is not
      empty: a reassembled datagram's largest fragment, Linux's frag_max_size), IPv4
      with DF or IPv6; verdict[i] := v_drop, forward[i] := False, info = that MTU.
    Only frames whose length (or size) exceeds ``min_mtu`` (the smallest interface MTU)
    are routed here.
    Preconditions: meta from wire.parse_batch, after the tracking kernel; the route
    arrays as netconf.NetProgram's; rows/kinds/info of len(off)."""
    k = 0
    for i in range(off.shape[0]):
        ifx = ifindex[i]
        if ifx < 0 or ifx >= mtu.shape[0] or meta[i, wire.M_L3LEN] <= 0:
            continue        # locally generated (or an interface the network lacks)
        ver = meta[i, wire.M_IPVER]
        l3 = off[i] + meta[i, wire.M_L3]
        if verdict[i] == v_drop:
            if ttl_on and meta[i, wire.M_REASON] == wire.HOP_EXPIRED:
                rows[k] = i
                kinds[k] = TIME_EXCEEDED
                info[k] = 0
                k += 1
            continue
        ln = size[i] if size.shape[0] else meta[i, wire.M_L3LEN]
        big = ln > min_mtu
        if not forward[i] or not (big or answer_local):
            continue
        hi, lo = wire.load_addr(buf, l3 + (16 if ver == 4 else 24), 4 if ver == 4 else 16)
        if answer_local:
            mine = False
            for j in range(local.shape[0]):
                if lver[j] == ver and local[j, 0] == hi and local[j, 1] == lo:
                    mine = True
                    break
            if mine:
                proto = meta[i, wire.M_PROTO]
                if verdict[i] != v_accept or meta[i, wire.M_FRAG] != 0:
                    continue
                kind = -1
                if proto == 17 or (proto == 6 and meta[i, wire.M_TFLAGS] & 4 == 0):
                    kind = PORT_UNREACH if proto == 17 else TCP_RESET
                elif ((proto == 1 and meta[i, wire.M_ICMPTYPE] == 8)
                        or (proto == 58 and meta[i, wire.M_ICMPTYPE] == 128)):
                    kind = ECHO_REPLY
                elif proto == 1 and meta[i, wire.M_ICMPTYPE] == 13 \
                        and meta[i, wire.M_L4LEN] >= 12:
                    kind = TS_REPLY         # icmp_timestamp: the originate time is there
                if kind >= 0:
                    forward[i] = False
                    rows[k] = i
                    kinds[k] = kind
                    info[k] = 0
                    k += 1
                continue
        if not big or (ver == 4 and buf[l3 + 6] & 0x40 == 0):
            continue        # fits every interface, or may be fragmented (frag.py)
        _, eg = route_compiled(routes, rinfo, local, lver, n_if, ver, hi, lo)
        if eg < n_if and ln > mtu[eg]:
            verdict[i] = v_drop
            forward[i] = False
            rows[k] = i
            kinds[k] = FRAG_NEEDED
            info[k] = mtu[eg]
            k += 1
    return k


@numba.njit(inline="always", cache=True)
def _over_limit(rl_key, rl_tok, rl_last, ver, dhi, dlo, now, interval):
    """icmp_ratelimit's token bucket for destination (ver, dhi, dlo) at time ``now``:
    True when an error to it must not go now; else the error is paid for."""
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
        return True
    rl_tok[s] = tok - interval
    return False


@kernel
def build_errors(buf, off, ifindex, ts, meta, tid, rows, kinds, info, if_addr, if_mtu, hop_taken,
                 tkey, tport, rl_key, rl_tok, rl_last, interval, ident, stats, out, out_off,
                 out_len):
    """Write the error of kind kinds[j] for frame rows[j] at out[out_off[j]:] and its
    length in out_len[j] (0: none: rate-limited, no source address, or not allowed).
    The quote is rewritten back to the tuple tid[i] (>= 0: 2*conn + direction, the
    frame as it arrived; ``tkey``/``tport`` the table's) and, when ``hop_taken`` and the
    frame was forwarded (frag needed: an expired one kept its TTL, a local one takes no
    hop), gets its TTL / hop limit back.
    A TCP_RESET row gets the RST (``_reset``) instead.
    Preconditions: out_off[j] leaves room for the L2 header, the IP and ICMP headers and
    the quote (as ``IcmpErrors.generate`` sizes them); if_addr[ifx, 0 or 1] = (present,
    hi, lo) of the interface's IPv4 / IPv6 address; ident[0] the next IPv4 id."""
    for j in range(rows.shape[0]):
        i = rows[j]
        kind = kinds[j]
        out_len[j] = 0
        ver = meta[i, wire.M_IPVER]
        o = off[i]
        l2 = meta[i, wire.M_L3]
        l3 = o + l2
        fam = 0 if ver == 4 else 1
        ifx = ifindex[i]
        if (_is_error(buf, o, meta, i) or meta[i, wire.M_CLS] == wire.CLS_RELATED
                or meta[i, wire.M_FRAG] == 2
                or (ERRORS[kind, 5] == SRC_INGRESS and if_addr[ifx, fam, 0] == 0)):
            stats[kind, ST_SKIPPED] += 1
            continue
        if kind == TCP_RESET:
            if _src_ok(buf, l3, ver):
                out_len[j] = _reset(buf, o, meta, i, out, out_off[j])
                stats[kind, ST_SENT] += 1
            else:
                stats[kind, ST_SKIPPED] += 1
            continue
        if kind == TS_REPLY:
            if _src_ok(buf, l3, ver):
                out_len[j] = _timestamp_reply(buf, o, meta, i, out, out_off[j], ident[0], ts[i])
                ident[0] = (ident[0] + 1) & 0xFFFF
                stats[kind, ST_SENT] += 1
            else:
                stats[kind, ST_SKIPPED] += 1
            continue
        if kind == ECHO_REPLY:
            # the whole request comes back (no fragmenting here: one over the MTU back
            # is not answered)
            if _src_ok(buf, l3, ver) and (20 if ver == 4 else 40) + meta[i, wire.M_L4LEN] \
                    <= if_mtu[ifx]:
                out_len[j] = _echo_reply(buf, o, meta, i, out, out_off[j], ident[0])
                if ver == 4:
                    ident[0] = (ident[0] + 1) & 0xFFFF
                stats[kind, ST_SENT] += 1
            else:
                stats[kind, ST_SKIPPED] += 1
            continue
        # the quote first: the packet as it arrived (the conn's tuple in its direction,
        # the hop back), whose source the error goes to
        p = out_off[j]
        q = min(meta[i, wire.M_L3LEN], quote_room(ver, if_mtu[ifx]))
        n3 = p + l2
        hl = 20 if ver == 4 else 40
        n4 = n3 + hl
        q3 = n4 + 8
        for k in range(q):
            out[q3 + k] = buf[l3 + k]
        t = tid[i]
        if t >= 0:
            ql4 = q3 + meta[i, wire.M_L4] - l2
            rewrite_header(out, q3, ql4, q3 + q - ql4, ver, meta[i, wire.M_PROTO],
                           meta[i, wire.M_ECHO], tkey[t, 0], tkey[t, 1], tkey[t, 2], tkey[t, 3],
                           np.int64(tport[t]), True, True)
        if hop_taken and kind == FRAG_NEEDED:      # forwarded: the hop was taken
            restore_hop(out, q3, ver)
        if not _src_ok(out, q3, ver):
            stats[kind, ST_SKIPPED] += 1
            continue
        # rate limit per destination (the packet's source)
        if ERRORS[kind, 4] != 0:
            dhi, dlo = wire.load_addr(out, q3 + (12 if ver == 4 else 8), 4 if ver == 4 else 16)
            if _over_limit(rl_key, rl_tok, rl_last, ver, dhi, dlo, ts[i], interval):
                stats[kind, ST_RATELIMITED] += 1
                continue
        # L2, IP and ICMP headers
        tos = (np.int64(buf[l3 + 1]) & TOS_MASK) | PREC_INTERNETCONTROL if ver == 4 else 0
        _l2_ip(buf, o, l2, out, p, ver, tos, 8 + q, ident[0], False, 1 if ver == 4 else 58)
        for k in range(8):
            out[n4 + k] = 0
        put16(out, n4 + 4, (info[j] >> 16) & 0xFFFF)
        put16(out, n4 + 6, info[j] & 0xFFFF)
        from_dst = ERRORS[kind, 5] == SRC_DEST
        if ver == 4:
            ident[0] = (ident[0] + 1) & 0xFFFF
            for k in range(4):
                out[n3 + 16 + k] = out[q3 + 12 + k]
                if from_dst:
                    out[n3 + 12 + k] = out[q3 + 16 + k]
            if not from_dst:
                _put_words(out, n3 + 12, if_addr[ifx, 0, 1], if_addr[ifx, 0, 2], 4)
            _ip4_checksum(out, n3)
            out[n4] = ERRORS[kind, 0]
            out[n4 + 1] = ERRORS[kind, 1]
        else:
            for k in range(16):
                out[n3 + 24 + k] = out[q3 + 8 + k]
                if from_dst:
                    out[n3 + 8 + k] = out[q3 + 24 + k]
            if not from_dst:
                _put_words(out, n3 + 8, if_addr[ifx, 1, 1], if_addr[ifx, 1, 2], 6)
            out[n4] = ERRORS[kind, 2]
            out[n4 + 1] = ERRORS[kind, 3]
        put16(out, n4 + 2, (~csum_fold(icmp_sum(out, n3, n4, 8 + q, ver))) & 0xFFFF)
        out_len[j] = l2 + hl + 8 + q
        stats[kind, ST_SENT] += 1


@numba.njit(inline="always", cache=True)
def _reset(buf, o, meta, i, out, p):
    """Write at out[p:] the RST answering TCP segment i (frame at buf[o:]) as the router
    would send it (see the module docstring); returns its length."""
    ver = meta[i, wire.M_IPVER]
    l2 = meta[i, wire.M_L3]
    l3 = o + l2
    l4 = o + meta[i, wire.M_L4]
    n3 = p + l2
    hl = 20 if ver == 4 else 40
    n4 = n3 + hl
    # the segment's TOS / traffic class without ECN
    _answer_header(buf, o, l2, out, p, ver, _tos(buf, l3, ver) & 0xFC, RST_LEN, 0, True, 6)
    fl = meta[i, wire.M_TFLAGS]
    out[n4] = buf[l4 + 2]
    out[n4 + 1] = buf[l4 + 3]
    out[n4 + 2] = buf[l4]
    out[n4 + 3] = buf[l4 + 1]
    seq = np.int64(0)
    ack = np.int64(0)
    if fl & 16:
        seq = meta[i, wire.M_ACK]
        flags = 0x04
    else:
        ack = (meta[i, wire.M_SEQ] + (fl & 2) // 2 + (fl & 1) + meta[i, wire.M_PAYLEN]) & 0xFFFFFFFF
        flags = 0x14
    put16(out, n4 + 4, (seq >> 16) & 0xFFFF)
    put16(out, n4 + 6, seq & 0xFFFF)
    put16(out, n4 + 8, (ack >> 16) & 0xFFFF)
    put16(out, n4 + 10, ack & 0xFFFF)
    out[n4 + 12] = 0x50
    out[n4 + 13] = flags
    for k in range(14, RST_LEN):
        out[n4 + k] = 0
    put16(out, n4 + 16, (~csum_fold(l4_sum(out, n3, n4, RST_LEN, 6, ver))) & 0xFFFF)
    return l2 + hl + RST_LEN


@numba.njit(inline="always", cache=True)
def _echo_reply(buf, o, meta, i, out, p, ident):
    """Write at out[p:] the echo reply to echo request i (frame at buf[o:]): addresses
    swapped, TTL / hop limit 64, the request's TOS / traffic class, IPv4 id ``ident``
    and no DF (the kernel's ICMP socket), no IP options; the ICMP message as it came
    (ident, sequence, data) with type 0 / 129 and its checksum. Returns its length."""
    ver = meta[i, wire.M_IPVER]
    l2 = meta[i, wire.M_L3]
    l3 = o + l2
    l4 = o + meta[i, wire.M_L4]
    n = meta[i, wire.M_L4LEN]
    n3 = p + l2
    hl = 20 if ver == 4 else 40
    n4 = n3 + hl
    _answer_header(buf, o, l2, out, p, ver, _tos(buf, l3, ver), n, ident, False,
                   1 if ver == 4 else 58)
    for k in range(n):
        out[n4 + k] = buf[l4 + k]
    out[n4] = 0 if ver == 4 else 129
    out[n4 + 1] = 0
    put16(out, n4 + 2, 0)
    put16(out, n4 + 2, (~csum_fold(icmp_sum(out, n3, n4, n, ver))) & 0xFFFF)
    return l2 + hl + n


@numba.njit(inline="always", cache=True)
def _timestamp_reply(buf, o, meta, i, out, p, ident, now):
    """Write at out[p:] the timestamp reply to request i (IPv4, frame at buf[o:]), as
    icmp_timestamp: ident and sequence copied, the request's originate time, and receive
    and transmit times both ``now`` (ns since the epoch, the packet's time) as ms since
    midnight UT; nothing past the three times. Returns its length."""
    l2 = meta[i, wire.M_L3]
    l3 = o + l2
    l4 = o + meta[i, wire.M_L4]
    n3 = p + l2
    n4 = n3 + 20
    _answer_header(buf, o, l2, out, p, 4, _tos(buf, l3, 4), TS_LEN, ident, False, 1)
    for k in range(12):
        out[n4 + k] = buf[l4 + k]          # type, code, checksum (set below), ident, seq, originate
    out[n4] = 14
    out[n4 + 1] = 0
    ms = (now // 1_000_000) % 86_400_000
    for at in (12, 16):
        put16(out, n4 + at, (ms >> 16) & 0xFFFF)
        put16(out, n4 + at + 2, ms & 0xFFFF)
    put16(out, n4 + 2, 0)
    put16(out, n4 + 2, (~csum_fold(icmp_sum(out, n3, n4, TS_LEN, 4))) & 0xFFFF)
    return l2 + 20 + TS_LEN


@numba.njit(inline="always", cache=True)
def quote_room(ver, ingress_mtu):
    """Bytes of the offending packet an error quotes at most: IPv4 fits the error in
    min(576, the MTU back), IPv6 in 1280."""
    if ver == 4:
        return min(ROOM4, ingress_mtu) - 28
    return QUOTE6


class RateLimiter:
    """icmp_ratelimit's token buckets, one per destination host (RL_SLOTS of them,
    direct-mapped), for the kinds ERRORS marks; ``Config.icmp_ratelimit`` ms an error, 0:
    no limit. An engine's errors pay as they are built (``build_errors``); the worker
    pool's workers build theirs unlimited and its sink pays for them here (``limit``),
    in the order one engine would have sent them: a host's errors come from every
    worker, and one engine's limit holds only where they meet. Owner: one thread."""

    def __init__(self, config):
        self.interval = int(config.icmp_ratelimit) * 1_000_000
        self.key = np.zeros((RL_SLOTS, 3), dtype=np.uint64)
        self.tok = np.zeros(RL_SLOTS, dtype=np.int64)
        self.last = np.zeros(RL_SLOTS, dtype=np.int64)
        self.stats = np.zeros((len(KIND_NAMES), 3), dtype=np.int64)   # what limit() held back

    def buckets(self):
        return self.key, self.tok, self.last, self.interval

    def limit(self, batch: PacketBatch) -> np.ndarray:
        """Which of ``batch``'s frames (errors built unlimited, in sending order, their
        times the limiter's clock) may go; the others count as rate-limited."""
        keep = np.ones(len(batch), dtype=np.bool_)
        if len(batch) and self.interval:
            limit_errors(batch.buf, batch.off, batch.length, batch.ts, *self.buckets(),
                         self.stats, keep)
        return keep

    def counters(self) -> dict[str, int]:
        """What ``limit`` held back, as corrections to the counters of the engines that
        built those errors (they counted them sent)."""
        out = {}
        for k, name in enumerate(KIND_NAMES):
            n = int(self.stats[k, ST_RATELIMITED])
            if n:
                out[name] = -n
                out[name + "_ratelimited"] = n
        return out


class IcmpErrors:
    """Error generation for one engine (see the module docstring). ``config``: the
    engine's Config (icmp_ratelimit, decrement_ttl: whether TTL expiry and the hop apply;
    local_delivery: whether the router's own addresses are answered by a host stack, so
    no port unreachable or RST is made here). Owner: the engine's thread."""

    def __init__(self, network, config, seed: int):
        n_if = max(1, len(network.interfaces))
        self.if_addr = np.zeros((n_if, 2, 3), dtype=np.uint64)
        self.if_mtu = np.full(n_if, 1500, dtype=np.int64)
        for k, ifc in enumerate(network.interfaces):
            self.if_mtu[k] = ifc.mtu
            for fam, ver in ((0, 4), (1, 6)):
                a = ifc.primary(ver)
                if a is not None:
                    self.if_addr[k, fam] = (1, *addr_words(a.packed))
        self.min_mtu = int(self.if_mtu.min()) if network.interfaces else 1 << 30
        self.net = network.compiled()
        self.ttl_on = bool(config.decrement_ttl)
        self.answer_local = not config.local_delivery
        self.limiter = RateLimiter(config)
        self.ident = np.array([seed & 0xFFFF], dtype=np.int64)
        self.stats = np.zeros((len(KIND_NAMES), 3), dtype=np.int64)
        self.tracked = self.too_big = None
        self._rows = self._kinds = self._info = np.empty(0, dtype=np.int64)

    def counters(self) -> dict[str, int]:
        """{name: count}: per kind, sent, rate-limited and not sent (STAT_NAMES)."""
        return dict(zip(STAT_NAMES, (int(v) for v in self.stats.ravel())))

    def generate(self, batch: PacketBatch, meta: np.ndarray, verdict: np.ndarray,
                 forward: np.ndarray, tid: np.ndarray, ts: np.ndarray, table,
                 v_drop: int, v_accept: int,
                 size: np.ndarray | None = None) -> tuple[PacketBatch, np.ndarray] | None:
        """The errors for ``batch`` after the tracking kernel (``meta``: its parse;
        ``verdict``, ``tid``: the kernel's; ``forward``: the forward mask; ``ts``: the
        packets' times, ns, the rate limiter's clock; ``table``: the ConnTable the tuple
        ids point into; ``size``: the IP length held to the egress MTU per frame, None
        for the frames' own: frag.py passes a reassembled datagram's largest fragment).
        Updates ``verdict`` and ``forward`` of the frames it drops or keeps home (see
        error_rows). The errors carry the offending packets' times;
        None when there are none. ``self.tracked``: indices of the TCP resets and echo
        and timestamp replies among them, which the engine tracks as locally generated packets; ``self.too_big``: the
        frames of ``batch`` dropped over their MTU (each None when there are none). Returns
        (errors, for each the index in ``batch`` of the frame it answers, ascending)."""
        n = len(batch)
        self.tracked = self.too_big = None
        if self._rows.shape[0] < n:
            m = max(n, 256)
            self._rows = np.empty(m, dtype=np.int64)
            self._kinds = np.empty(m, dtype=np.int64)
            self._info = np.empty(m, dtype=np.int64)
        net = self.net
        k = error_rows(batch.buf, batch.off, batch.ifindex, meta, verdict, forward, v_drop,
                       v_accept, self.ttl_on, self.answer_local, net.routes, net.rinfo,
                       net.local, net.lver, net.n_if, self.if_mtu, self.min_mtu,
                       _NO_SIZE if size is None else size, self._rows, self._kinds, self._info)
        if k == 0:
            return None
        rows = self._rows[:k].copy()
        kinds = self._kinds[:k]
        too_big = rows[kinds == FRAG_NEEDED]
        self.too_big = too_big if len(too_big) else None
        m = meta[rows]
        v4 = m[:, wire.M_IPVER] == 4
        room = np.where(v4, np.minimum(ROOM4, self.if_mtu[batch.ifindex[rows]]) - 28, QUOTE6)
        body = np.where(kinds == TCP_RESET, RST_LEN,
                        np.where(kinds == ECHO_REPLY, m[:, wire.M_L4LEN],
                                 np.where(kinds == TS_REPLY, TS_LEN,
                                          8 + np.minimum(m[:, wire.M_L3LEN], room))))
        size = m[:, wire.M_L3] + np.where(v4, 20, 40) + body
        out_off = np.zeros(k, dtype=np.int64)
        np.cumsum(size[:-1], out=out_off[1:])
        out = np.zeros(int(size.sum()), dtype=np.uint8)
        out_len = np.zeros(k, dtype=np.int32)
        build_errors(batch.buf, batch.off, batch.ifindex, ts, meta, tid, rows,
                     kinds, self._info[:k], self.if_addr, self.if_mtu, self.ttl_on,
                     table.tkey, table.tport, *self.limiter.buckets(), self.ident, self.stats,
                     out, out_off, out_len)
        keep = out_len > 0
        if not keep.any():
            return None
        kk = kinds[keep]
        mine = np.flatnonzero((kk == TCP_RESET) | (kk == ECHO_REPLY) | (kk == TS_REPLY))
        self.tracked = mine if len(mine) else None
        return (PacketBatch(out, out_off[keep], out_len[keep], batch.ifindex[rows][keep].copy(),
                            ts[rows][keep].copy()), rows[keep])


@numba.njit(inline="always", cache=True)
def _ethertype_at(buf, o, end):
    """Where the EtherType of the frame at buf[o:end] is (VLAN tags skipped)."""
    p = o + 12
    while p + 2 <= end and ((buf[p] == 0x81 and buf[p + 1] == 0x00)
                            or (buf[p] == 0x88 and buf[p + 1] == 0xA8)):
        p += 4
    return p


@kernel
def limit_errors(buf, off, length, ts, rl_key, rl_tok, rl_last, interval, stats, keep):
    """RateLimiter.limit: keep[i] False when frame i is an ICMP / ICMPv6 error of a kind
    ERRORS rate-limits and its destination's bucket (``_over_limit``, at ts[i]) is
    empty; stats[kind, ST_RATELIMITED] counts those. Other frames are kept.
    Precondition: keep[i] True for every i."""
    for i in range(off.shape[0]):
        o = off[i]
        end = o + length[i]
        p = _ethertype_at(buf, o, end)
        l3 = p + 2
        if p + 2 > end:
            continue
        if buf[p] == 0x08 and buf[p + 1] == 0x00 and l3 + 20 <= end and buf[l3 + 9] == 1:
            ver, col, at, nbytes = 4, 0, l3 + 16, 4
            l4 = l3 + 4 * (np.int64(buf[l3]) & 0xF)
        elif buf[p] == 0x86 and buf[p + 1] == 0xDD and l3 + 40 <= end and buf[l3 + 6] == 58:
            ver, col, at, nbytes = 6, 2, l3 + 24, 16
            l4 = l3 + 40
        else:
            continue
        if l4 + 2 > end:
            continue
        for kind in range(ERRORS.shape[0]):
            if (ERRORS[kind, 4] != 0 and ERRORS[kind, col] == buf[l4]
                    and ERRORS[kind, col + 1] == buf[l4 + 1]):
                dhi, dlo = wire.load_addr(buf, at, nbytes)
                if _over_limit(rl_key, rl_tok, rl_last, ver, dhi, dlo, ts[i], interval):
                    keep[i] = False
                    stats[kind, ST_RATELIMITED] += 1
                break


@kernel
def restamp_ids(buf, off, length, ident):
    """Write ident[0], ident[0] + 1, ... (mod 2^16) into the IPv4 id of each frame in
    order and fix its header checksum; IPv6 frames, anything not IPv4 behind Ethernet
    (VLAN tags skipped) and what is not ICMP (the RSTs, id 0 as Linux sends them) are
    left alone. The pool's sink gives the errors its
    workers generated the ids one engine would have: one counter, in input order."""
    for i in range(off.shape[0]):
        o = off[i]
        end = o + length[i]
        p = _ethertype_at(buf, o, end)
        if (p + 22 > end or buf[p] != 0x08 or buf[p + 1] != 0x00 or buf[p + 2] != 0x45
                or buf[p + 11] != 1):
            continue
        l3 = p + 2
        put16(buf, l3 + 4, ident[0] & 0xFFFF)
        ident[0] = (ident[0] + 1) & 0xFFFF
        put16(buf, l3 + 10, 0)
        put16(buf, l3 + 10, (~csum_fold(csum_add(buf, l3, 20, np.int64(0)))) & 0xFFFF)
