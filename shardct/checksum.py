# Internet checksum arithmetic: full sums (RFC 1071) and incremental updates (RFC 1624).
# Numba helpers used inside the parse and rewrite kernels; pure-Python twins for tests.
"""Ones'-complement checksums.

Full: ``csum_fold(csum_add(buf, start, n, 0))`` gives the 16-bit sum; a packet verifies
when the fold of everything including its checksum field is 0xFFFF.

Incremental (RFC 1624 eqn. 3): replacing a 16-bit word ``m`` by ``m2`` in data covered by
checksum ``hc`` gives ``hc2 = ~(~hc + ~m + m2)``. Words are big-endian 16-bit values.
"""
from __future__ import annotations

import numba
import numpy as np

from .cpu import load16, load32, load64

_LITTLE = bool(np.little_endian)


@numba.njit(inline="always", cache=True)
def bswap16(x):
    return ((x & 0xFF) << 8) | ((x >> 8) & 0xFF)


@numba.njit(inline="always", cache=True)
def csum_raw(buf, start, n):
    """Unfolded sum of buf[start:start+n] as native 32-bit halves (an odd tail padded
    with 0), for csum_native. Raw sums of ranges that each start a 16-bit word may be
    added together before folding.

    Reads 8 bytes per load: a ones'-complement sum does not depend on word size or byte
    order once folded, except that a little-endian host gets it byte-swapped (RFC 1071
    §2(B)), which csum_native undoes. Reads nothing outside the range. Precondition: buf
    is a C-contiguous uint8 array holding the range, n < 2**32."""
    i = np.int64(start)
    end = i + n
    s = np.uint64(0)
    while i + 8 <= end:
        w = load64(buf, i)
        s += (w & np.uint64(0xFFFFFFFF)) + (w >> np.uint64(32))
        i += 8
    if i + 4 <= end:
        s += np.uint64(load32(buf, i))
        i += 4
    if i + 2 <= end:
        s += np.uint64(load16(buf, i))
        i += 2
    if i < end:
        s += np.uint64(buf[i]) if _LITTLE else np.uint64(buf[i]) << np.uint64(8)
    return s


@numba.njit(inline="always", cache=True)
def csum_native(s):
    """A raw sum folded to 16 bits, in network order (as an int)."""
    s = (s & np.uint64(0xFFFFFFFF)) + (s >> np.uint64(32))
    s = (s & np.uint64(0xFFFFFFFF)) + (s >> np.uint64(32))
    s = (s & np.uint64(0xFFFF)) + (s >> np.uint64(16))
    s = (s & np.uint64(0xFFFF)) + (s >> np.uint64(16))
    v = np.int64(s)
    if _LITTLE:
        v = bswap16(v)
    return v


@numba.njit(inline="always", cache=True)
def csum_add(buf, start, n, acc):
    """Add the 16-bit big-endian words of buf[start:start+n] (an odd tail padded with 0)
    to the accumulator; returns acc plus their folded 16-bit sum."""
    return acc + csum_native(csum_raw(buf, start, n))


@numba.njit(inline="always", cache=True)
def l4_sum(buf, l3, l4, n, proto, ipver):
    """Unfolded sum over the pseudo-header (IPv4 or IPv6 at l3) and the n bytes of the
    transport segment at l4, folded once: the segment verifies when
    ``csum_fold(l4_sum(...)) == 0xFFFF``."""
    if ipver == 4:
        s = csum_raw(buf, l3 + 12, 8)
    else:
        s = csum_raw(buf, l3 + 8, 32)
    return csum_native(s + csum_raw(buf, l4, n)) + proto + (n & 0xFFFF) + (n >> 16)


@numba.njit(inline="always", cache=True)
def icmp_sum(buf, l3, l4, n, ipver):
    """Sum over an ICMP message (ICMPv6: with its pseudo-header, RFC 4443 §2.3)."""
    if ipver == 6:
        return l4_sum(buf, l3, l4, n, 58, 6)
    return csum_add(buf, l4, n, np.int64(0))      # ICMPv4 has no pseudo-header


@numba.njit(inline="always", cache=True)
def csum_fold(acc):
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


@numba.njit(inline="always", cache=True)
def csum_replace16(hc, old, new):
    """RFC 1624 eqn. 3 for one 16-bit word."""
    acc = np.int64((~hc) & 0xFFFF) + np.int64((~old) & 0xFFFF) + np.int64(new & 0xFFFF)
    return (~csum_fold(acc)) & 0xFFFF


@numba.njit(inline="always", cache=True)
def get16(buf, i):
    """Big-endian 16-bit field at buf[i] (one load)."""
    if _LITTLE:
        return bswap16(load16(buf, i))
    return load16(buf, i)


@numba.njit(inline="always", cache=True)
def put16(buf, i, v):
    buf[i] = (v >> 8) & 0xFF
    buf[i + 1] = v & 0xFF


@numba.njit(inline="always", cache=True)
def get32(buf, i):
    """Big-endian 32-bit field at buf[i] (one load)."""
    v = load32(buf, i)
    if _LITTLE:
        v = (((v & 0xFF) << 24) | ((v & 0xFF00) << 8) | ((v >> 8) & 0xFF00)
             | ((v >> 24) & 0xFF))
    return v


# ------------------------------------------------------------------ references

def checksum(data: bytes) -> int:
    """RFC 1071 checksum of data (the value to store in the checksum field)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def replace16(hc: int, old: int, new: int) -> int:
    """Reference RFC 1624 eqn. 3."""
    s = ((~hc) & 0xFFFF) + ((~old) & 0xFFFF) + (new & 0xFFFF)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF
