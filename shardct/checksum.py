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

_LITTLE = bool(np.little_endian)


@numba.njit(inline="always", cache=True)
def csum_add(buf, start, n, acc):
    """Add n bytes of buf from start to the 64-bit accumulator (odd tail padded with 0)."""
    i = start
    end = start + n
    while i + 8 <= end:
        acc += (((np.int64(buf[i]) << 8) | np.int64(buf[i + 1]))
                + ((np.int64(buf[i + 2]) << 8) | np.int64(buf[i + 3]))
                + ((np.int64(buf[i + 4]) << 8) | np.int64(buf[i + 5]))
                + ((np.int64(buf[i + 6]) << 8) | np.int64(buf[i + 7])))
        i += 8
    while i + 2 <= end:
        acc += (np.int64(buf[i]) << 8) | np.int64(buf[i + 1])
        i += 2
    if i < end:
        acc += np.int64(buf[i]) << 8
    return acc


@numba.njit(inline="always", cache=True)
def csum_add_w(w16, buf, start, n, acc):
    """csum_add for hot paths: when start is even, sums native 16-bit words of the
    uint16 view ``w16`` of ``buf`` (ones'-complement sums are byte-order independent,
    RFC 1071 §2(B): swap the folded result), else falls back to bytes."""
    if start & 1:
        return csum_add(buf, start, n, acc)
    k = start >> 1
    e = (start + n) >> 1
    s = np.int64(0)
    while k + 4 <= e:
        s += np.int64(w16[k]) + np.int64(w16[k + 1]) + np.int64(w16[k + 2]) + np.int64(w16[k + 3])
        k += 4
    while k < e:
        s += np.int64(w16[k])
        k += 1
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    if _LITTLE:      # little-endian host: swap to network order
        s = ((s & 0xFF) << 8) | (s >> 8)
    if n & 1:
        s += np.int64(buf[start + n - 1]) << 8
    return acc + s


@numba.njit(inline="always", cache=True)
def csum_fold(acc):
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


@numba.njit(inline="always", cache=True)
def pseudo_v4(buf, l3, proto, l4len):
    """Sum of the IPv4 pseudo-header (addresses at l3+12..l3+20)."""
    acc = csum_add(buf, l3 + 12, 8, np.int64(0))
    return acc + proto + l4len


@numba.njit(inline="always", cache=True)
def pseudo_v6(buf, l3, proto, l4len):
    """Sum of the IPv6 pseudo-header (addresses at l3+8..l3+40)."""
    acc = csum_add(buf, l3 + 8, 32, np.int64(0))
    return acc + proto + (l4len & 0xFFFF) + (l4len >> 16)


@numba.njit(inline="always", cache=True)
def csum_replace16(hc, old, new):
    """RFC 1624 eqn. 3 for one 16-bit word."""
    acc = np.int64((~hc) & 0xFFFF) + np.int64((~old) & 0xFFFF) + np.int64(new & 0xFFFF)
    return (~csum_fold(acc)) & 0xFFFF


@numba.njit(inline="always", cache=True)
def get16(buf, i):
    return (np.int64(buf[i]) << 8) | np.int64(buf[i + 1])


@numba.njit(inline="always", cache=True)
def put16(buf, i, v):
    buf[i] = (v >> 8) & 0xFF
    buf[i + 1] = v & 0xFF


@numba.njit(inline="always", cache=True)
def get32(buf, i):
    return ((np.int64(buf[i]) << 24) | (np.int64(buf[i + 1]) << 16)
            | (np.int64(buf[i + 2]) << 8) | np.int64(buf[i + 3]))


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
