# NAT rewriting of a tracked packet in place: addresses, ports and echo idents, with
# incremental checksum updates (RFC 1624) for IPv4 and TCP/UDP/ICMPv6 pseudo-headers;
# ICMP errors get the quoted packet rewritten too (Linux nf_nat_proto.c, nf_nat_icmp_reply_translation).
"""Packet rewriting kernels (called from track.track_batch).

A packet in direction d of a conn is rewritten to ``invert(tuple[1-d])`` (Linux
``nf_nat_packet``): fields NAT did not change are already equal, so only the changed
16-bit words are replaced and every checksum covering them is adjusted by the same
RFC 1624 delta. A zero UDP checksum (IPv4: "no checksum") stays zero; a result of
zero is written as 0xFFFF. TCP/UDP ports live at L4+0/+2, TCP's checksum at +16,
UDP's at +6, ICMP's at +2 with the ident at +4.

ICMP errors (RELATED, quoting a packet that travelled in direction 1-d): the quoted
packet becomes ``tuple[1-d]``; the outer source/destination take the matching
field of ``invert(tuple[1-d])`` when that manip applies to direction d; the outer ICMP
checksum is then recomputed over the whole message.
"""
from __future__ import annotations

import numba
import numpy as np

from .checksum import csum_fold, get16, icmp_sum, put16

M16 = 0xFFFF


@numba.njit(inline="always", cache=True)
def _apply(check, delta):
    """Checksum after adding `delta` (sum of ~old + new words) to the data."""
    return (~csum_fold(np.int64((~check) & M16) + delta)) & M16


@numba.njit(inline="always", cache=True)
def _set_word(buf, at, new):
    """Write a 16-bit word; returns its contribution ~old + new to a checksum delta."""
    old = get16(buf, at)
    if old == new:
        return np.int64(0)
    put16(buf, at, new)
    return np.int64((~old) & M16) + np.int64(new)


@numba.njit(inline="always", cache=True)
def _set_addr(buf, at, ipver, hi, lo):
    """Write an address (4 or 16 bytes) from its (hi, lo) words; returns the delta."""
    d = np.int64(0)
    if ipver == 4:
        v = np.int64(lo & np.uint64(0xFFFFFFFF))
        d += _set_word(buf, at, (v >> 16) & M16)
        d += _set_word(buf, at + 2, v & M16)
        return d
    for k in range(4):
        d += _set_word(buf, at + 2 * k, np.int64((hi >> np.uint64(48 - 16 * k)) & np.uint64(M16)))
        d += _set_word(buf, at + 8 + 2 * k, np.int64((lo >> np.uint64(48 - 16 * k)) & np.uint64(M16)))
    return d


@numba.njit(inline="always", cache=True)
def _fix_l4(buf, l4, proto, ipver, delta_pseudo, delta_l4, complete):
    """Adjust the transport checksum for address (pseudo-header) and port/ident deltas.
    `complete` = the checksum field is inside the available bytes."""
    if not complete:
        return
    if proto == 6:
        at = l4 + 16
        put16(buf, at, _apply(get16(buf, at), delta_pseudo + delta_l4))
    elif proto == 17:
        at = l4 + 6
        ck = get16(buf, at)
        if ck == 0 and ipver == 4:
            return          # no checksum stays no checksum
        v = _apply(ck, delta_pseudo + delta_l4)
        put16(buf, at, 0xFFFF if v == 0 else v)
    elif proto == 1:
        at = l4 + 2
        put16(buf, at, _apply(get16(buf, at), delta_l4))
    elif proto == 58:
        at = l4 + 2
        put16(buf, at, _apply(get16(buf, at), delta_pseudo + delta_l4))


@numba.njit(inline="always", cache=True)
def rewrite_header(buf, l3, l4, l4avail, ipver, proto, echo, s_hi, s_lo, d_hi, d_lo, ports,
                   set_src, set_dst):
    """Rewrite one IP header + transport header to the given tuple fields.

    echo: 0 not echo, 1 request (ident = sport slot), 2 reply (ident = dport slot).
    Only src fields are touched when set_src, only dst fields when set_dst.
    l4avail: transport bytes present (a quoted header may be truncated).
    Returns nothing; checksums are updated incrementally.
    """
    if ipver == 4:
        dip = np.int64(0)
        if set_src:
            dip += _set_addr(buf, l3 + 12, 4, s_hi, s_lo)
        if set_dst:
            dip += _set_addr(buf, l3 + 16, 4, d_hi, d_lo)
        if dip != 0:
            put16(buf, l3 + 10, _apply(get16(buf, l3 + 10), dip))
    else:
        dip = np.int64(0)
        if set_src:
            dip += _set_addr(buf, l3 + 8, 6, s_hi, s_lo)
        if set_dst:
            dip += _set_addr(buf, l3 + 24, 6, d_hi, d_lo)
    dl4 = np.int64(0)
    if proto == 6 or proto == 17:
        if l4avail >= 4:
            if set_src:
                dl4 += _set_word(buf, l4, (ports >> 16) & M16)
            if set_dst:
                dl4 += _set_word(buf, l4 + 2, ports & M16)
        complete = l4avail >= (18 if proto == 6 else 8)
        if dip != 0 or dl4 != 0:
            _fix_l4(buf, l4, proto, ipver, dip, dl4, complete)
    elif proto == 1 or proto == 58:
        if l4avail >= 8 and echo != 0:
            if echo == 1 and set_src:
                dl4 += _set_word(buf, l4 + 4, (ports >> 16) & M16)
            elif echo == 2 and set_dst:
                dl4 += _set_word(buf, l4 + 4, ports & M16)
        if dip != 0 or dl4 != 0:
            _fix_l4(buf, l4, proto, ipver, dip, dl4, l4avail >= 4)


@numba.njit(inline="always", cache=True)
def decrement_ttl(buf, l3, ipver):
    """Router hop: TTL/hop limit - 1 (IPv4 checksum adjusted). Returns False when the
    packet must not be forwarded (it arrived with TTL <= 1)."""
    if ipver == 4:
        ttl = np.int64(buf[l3 + 8])
        if ttl <= 1:
            return False
        old = get16(buf, l3 + 8)
        new = old - 0x100
        put16(buf, l3 + 8, new)
        put16(buf, l3 + 10, _apply(get16(buf, l3 + 10), np.int64((~old) & M16) + new))
        return True
    hl = np.int64(buf[l3 + 7])
    if hl <= 1:
        return False
    buf[l3 + 7] = hl - 1
    return True


@numba.njit(inline="always", cache=True)
def restore_hop(buf, l3, ipver):
    """The hop given back (TTL/hop limit + 1, IPv4 checksum adjusted): a packet as it
    arrived, before decrement_ttl, e.g. in an ICMP error's quote."""
    if ipver == 4:
        old = get16(buf, l3 + 8)
        put16(buf, l3 + 10, _apply(get16(buf, l3 + 10), _set_word(buf, l3 + 8, old + 0x100)))
        return
    buf[l3 + 7] = buf[l3 + 7] + 1


@numba.njit(inline="always", cache=True)
def icmp_recompute(buf, l3, l4, l4len, ipver):
    """Recompute an ICMP/ICMPv6 checksum over the whole message."""
    put16(buf, l4 + 2, 0)
    put16(buf, l4 + 2, (~csum_fold(icmp_sum(buf, l3, l4, l4len, ipver))) & M16)
