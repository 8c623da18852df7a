# Seeded Jenkins one-at-a-time hash over gVisor's tuple bytes, and bucket ownership.
# Bit-exact with gVisor pkg/tcpip/hash/jenkins and conntrack's tuple hash
# (reference/gvisor-conntrack.md §1). Never Python's hash(): it is randomised per process.
"""Routing hash.

``hash = OAAT(seed, src addr ‖ dst addr ‖ le16 sport ‖ le16 dport ‖ le16 proto ‖ le16 netproto)``
with the seed as the initial state (no mixing step), 4- or 16-byte addresses.
``bucket = hash % n_buckets`` (default 16384) and worker *k* of *n* owns the contiguous
bucket slice ``[k*n_buckets//n, (k+1)*n_buckets//n)``, so ascending bucket order is
ascending worker order.

The key is not symmetric: a conn's original and reply tuples hash independently and often
land in different buckets, and NAT changes the reply tuple anyway.

Tuples inside kernels are four uint64 address words (src_hi, src_lo, dst_hi, dst_lo; an
IPv4 address lives in the low 32 bits of ``lo``, ``hi`` = 0), a uint32 ``ports`` word
(sport << 16 | dport), the transport protocol and the IP version (4 or 6).
"""
from __future__ import annotations

import numba
import numpy as np

N_BUCKETS = 16384
M32 = 0xFFFFFFFF
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def oaat(data: bytes, seed: int = 0) -> int:
    """Reference Jenkins one-at-a-time; ``seed`` is the initial state."""
    h = seed & M32
    for b in data:
        h = (h + b) & M32
        h = (h + (h << 10)) & M32
        h ^= h >> 6
    h = (h + (h << 3)) & M32
    h ^= h >> 11
    h = (h + (h << 15)) & M32
    return h


def tuple_bytes(src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> bytes:
    """The bytes gVisor hashes for a tuple; the address length picks the family."""
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError(f"address lengths {len(src)}, {len(dst)}: want 4+4 or 16+16")
    netproto = ETH_P_IP if len(src) == 4 else ETH_P_IPV6
    return (bytes(src) + bytes(dst) + sport.to_bytes(2, "little") + dport.to_bytes(2, "little")
            + proto.to_bytes(2, "little") + netproto.to_bytes(2, "little"))


def tuple_hash(src: bytes, dst: bytes, sport: int, dport: int, proto: int, seed: int) -> int:
    """Reference tuple hash (pure Python, slow): for tests and the CLI."""
    return oaat(tuple_bytes(src, dst, sport, dport, proto), seed)


def bucket_of(h: int, n_buckets: int = N_BUCKETS) -> int:
    return h % n_buckets


@numba.njit(cache=True)
def owner_of_bucket(bucket, n_workers, n_buckets):
    """Worker owning ``bucket``: the k with k*nb//n <= bucket < (k+1)*nb//n."""
    k = (bucket * n_workers) // n_buckets
    # integer division of slice bounds can leave bucket just below k's start
    while k > 0 and bucket < (k * n_buckets) // n_workers:
        k -= 1
    while k + 1 < n_workers and bucket >= ((k + 1) * n_buckets) // n_workers:
        k += 1
    return k


def owner_of(bucket: int, n_workers: int, n_buckets: int = N_BUCKETS) -> int:
    return int(owner_of_bucket(bucket, n_workers, n_buckets))


def owner_slices(n_workers: int, n_buckets: int = N_BUCKETS) -> list[tuple[int, int]]:
    return [(k * n_buckets // n_workers, (k + 1) * n_buckets // n_workers) for k in range(n_workers)]


# ---------------------------------------------------------------- compiled forms

@numba.njit(inline="always", cache=True)
def _mix(h, b):
    h = (h + b) & 0xFFFFFFFF
    h = (h + (h << 10)) & 0xFFFFFFFF
    return h ^ (h >> 6)


@numba.njit(inline="always", cache=True)
def _mix_word_be(h, w, nbytes):
    # feed the low ``nbytes`` bytes of w, most significant first (network order)
    for k in range(nbytes - 1, -1, -1):
        h = _mix(h, (w >> (8 * k)) & 0xFF)
    return h


@numba.njit(inline="always", cache=True)
def _mix32(h, b):
    h = np.uint32(h + b)
    h = np.uint32(h + (h << np.uint32(10)))
    return np.uint32(h ^ (h >> np.uint32(6)))


@numba.njit(inline="always", cache=True)
def hash_v4(seed, src, dst, ports, proto):
    """hash_key for IPv4 (src, dst: the address in the low 32 bits) in 32-bit arithmetic
    without branches, so a loop of these vectorizes across packets. Returns uint32."""
    a = np.uint32(src & 0xFFFFFFFF)
    b = np.uint32(dst & 0xFFFFFFFF)
    p = np.uint32(ports & 0xFFFFFFFF)
    m = np.uint32(0xFF)
    h = np.uint32(seed & 0xFFFFFFFF)
    h = _mix32(h, a >> np.uint32(24))
    h = _mix32(h, (a >> np.uint32(16)) & m)
    h = _mix32(h, (a >> np.uint32(8)) & m)
    h = _mix32(h, a & m)
    h = _mix32(h, b >> np.uint32(24))
    h = _mix32(h, (b >> np.uint32(16)) & m)
    h = _mix32(h, (b >> np.uint32(8)) & m)
    h = _mix32(h, b & m)
    h = _mix32(h, (p >> np.uint32(16)) & m)      # sport, little-endian
    h = _mix32(h, p >> np.uint32(24))
    h = _mix32(h, p & m)                         # dport
    h = _mix32(h, (p >> np.uint32(8)) & m)
    h = _mix32(h, np.uint32(proto & 0xFF))       # proto as le16
    h = _mix32(h, np.uint32(0))
    h = _mix32(h, np.uint32(0x00))               # ETH_P_IP as le16
    h = _mix32(h, np.uint32(0x08))
    h = np.uint32(h + (h << np.uint32(3)))
    h = np.uint32(h ^ (h >> np.uint32(11)))
    return np.uint32(h + (h << np.uint32(15)))


@numba.njit(inline="always", cache=True)
def hash_key(seed, a0, a1, a2, a3, ports, proto, ipver):
    """Hash of one tuple in kernel form (see module docstring). Returns uint32 as int64.
    IPv4 is hash_v4, the form batch loops vectorize."""
    if ipver == 4:
        return np.int64(hash_v4(seed, a1, a3, ports, proto))
    h = np.int64(seed) & 0xFFFFFFFF
    h = _mix_word_be(h, np.int64(a0 >> 32), 4)
    h = _mix_word_be(h, np.int64(a0 & 0xFFFFFFFF), 4)
    h = _mix_word_be(h, np.int64(a1 >> 32), 4)
    h = _mix_word_be(h, np.int64(a1 & 0xFFFFFFFF), 4)
    h = _mix_word_be(h, np.int64(a2 >> 32), 4)
    h = _mix_word_be(h, np.int64(a2 & 0xFFFFFFFF), 4)
    h = _mix_word_be(h, np.int64(a3 >> 32), 4)
    h = _mix_word_be(h, np.int64(a3 & 0xFFFFFFFF), 4)
    sport = (np.int64(ports) >> 16) & 0xFFFF
    dport = np.int64(ports) & 0xFFFF
    h = _mix(h, sport & 0xFF)
    h = _mix(h, sport >> 8)
    h = _mix(h, dport & 0xFF)
    h = _mix(h, dport >> 8)
    h = _mix(h, np.int64(proto) & 0xFF)
    h = _mix(h, 0)
    h = _mix(h, 0xDD)            # ETH_P_IPV6 as le16
    h = _mix(h, 0x86)
    h = (h + (h << 3)) & 0xFFFFFFFF
    h ^= h >> 11
    h = (h + (h << 15)) & 0xFFFFFFFF
    return h


@numba.njit(cache=True)
def hash_batch(seed, addr, ports, proto, ipver, valid, out):
    """out[i] = hash of packet i's tuple where valid[i], else -1.

    Preconditions: addr is (n, 4) uint64, ports uint32, proto/ipver uint8, out int64.
    """
    for i in range(out.shape[0]):
        if valid[i]:
            out[i] = hash_key(seed, addr[i, 0], addr[i, 1], addr[i, 2], addr[i, 3],
                              ports[i], proto[i], ipver[i])
        else:
            out[i] = -1


def addr_words(addr: bytes) -> tuple[int, int]:
    """Raw address bytes -> (hi, lo) uint64 words of the kernel form."""
    if len(addr) == 4:
        return 0, int.from_bytes(addr, "big")
    if len(addr) == 16:
        return int.from_bytes(addr[:8], "big"), int.from_bytes(addr[8:], "big")
    raise ValueError(f"address of {len(addr)} bytes: want 4 or 16")


def words_addr(hi: int, lo: int, ipver: int) -> bytes:
    if ipver == 4:
        return int(lo & M32).to_bytes(4, "big")
    return int(hi).to_bytes(8, "big") + int(lo).to_bytes(8, "big")


@numba.njit(cache=True)
def owners(hashes, n_workers, n_buckets):
    """Owning worker of each tuple hash; a packet with no tuple (hash -1: not IP, broken
    headers, non-first fragments) goes to worker 0, which gives it its verdict."""
    out = np.empty(hashes.shape[0], dtype=np.int64)
    for i in range(hashes.shape[0]):
        h = hashes[i]
        if h < 0:
            out[i] = 0
            continue
        out[i] = owner_of_bucket(h % n_buckets, n_workers, n_buckets)
    return out
