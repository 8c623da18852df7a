"""Routing hash: Jenkins one-at-a-time vectors (reference/gvisor-conntrack.md §1.1), the
tuple byte layout and tuple vectors (§1.2), the numba kernel form against the reference,
and bucket ownership by worker slices.
"""
from __future__ import annotations

import ipaddress

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shardct.hashing import (N_BUCKETS, addr_words, bucket_of, hash_batch, hash_key, hash_v4, oaat,
                             owner_of, owner_slices, tuple_bytes, tuple_hash, words_addr)


def kernel_hash(src: bytes, dst: bytes, sport: int, dport: int, proto: int, seed: int) -> int:
    """hash_key called the way the tracker calls it (uint64 words, ports word)."""
    s_hi, s_lo = addr_words(src)
    d_hi, d_lo = addr_words(dst)
    ver = 4 if len(src) == 4 else 6
    return int(hash_key(seed, np.uint64(s_hi), np.uint64(s_lo), np.uint64(d_hi),
                        np.uint64(d_lo), (sport << 16) | dport, proto, ver))


def ip(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


# ---------------------------------------------------------------- §1.1 OAAT vectors

OAAT_VECTORS = [
    # (input, seed, want uint32, source)
    (b"", 0, 0x00000000, "golden"),
    (b"a", 0, 0xCA2E9442, "golden"),
    (b"ab", 0, 0x45E61E58, "golden"),
    (b"abc", 0, 0xED131F5B, "golden"),
    (b"12\x03\x04\x05", 0, 0xD4E22F8A, "derived"),
    (b"abc", 1, 0x4DF33543, "derived"),
    (b"abc", 0xDEADBEEF, 0x6BC9DC0C, "derived"),
]


@pytest.mark.parametrize("data,seed,want,source", OAAT_VECTORS)
def test_oaat_vectors(data, seed, want, source):
    got = oaat(data, seed)
    assert got == want, f"{source} oaat({data!r}, seed={seed:#x}): got {got:#010x}, want {want:#010x}"


def test_oaat_golden_sum_bytes_big_endian():
    # Sum() appends the value big-endian: "a" -> ca 2e 94 42
    got = oaat(b"a").to_bytes(4, "big")
    want = bytes.fromhex("ca2e9442")
    assert got == want, f"got {got.hex()}, want {want.hex()}"


# ---------------------------------------------------------------- §1.2 tuple vectors

TUPLE_VECTORS = [
    # (seed, src, dst, sport, dport, proto, bytes hex (None: addresses + tail), hash, bucket)
    (0, "10.0.0.1", "10.0.0.2", 1234, 80, 6, "0a0000010a000002d204500006000008", 0x715A03CF, 975),
    (0, "10.0.0.2", "10.0.0.1", 80, 1234, 6, "0a0000020a0000015000d20406000008", 0xBA4C849D, 1181),
    (0xDEADBEEF, "10.0.0.1", "10.0.0.2", 1234, 80, 6, "0a0000010a000002d204500006000008",
     0x53C38F22, 3874),
    (0xDEADBEEF, "192.168.1.1", "8.8.8.8", 5555, 53, 17, "c0a8010108080808b315350011000008",
     0xB1ABED35, 11573),
    (0x12345678, "b::2", "c::3", 2, 3, 17,
     (ip("b::2") + ip("c::3")).hex() + "020003001100dd86", 0x1BBC6856, 10326),
]
TUPLE_IDS = [f"{v[1]}>{v[2]}:{v[3]}>{v[4]}/{v[5]}@{v[0]:#x}" for v in TUPLE_VECTORS]


@pytest.mark.parametrize("seed,src,dst,sport,dport,proto,hexbytes,want,bucket", TUPLE_VECTORS,
                         ids=TUPLE_IDS)
def test_tuple_bytes(seed, src, dst, sport, dport, proto, hexbytes, want, bucket):
    got = tuple_bytes(ip(src), ip(dst), sport, dport, proto).hex()
    assert got == hexbytes, f"got {got}, want {hexbytes}"
    wantlen = 16 if "." in src else 40
    assert len(got) // 2 == wantlen, f"got {len(got) // 2} bytes, want {wantlen}"


@pytest.mark.parametrize("seed,src,dst,sport,dport,proto,hexbytes,want,bucket", TUPLE_VECTORS,
                         ids=TUPLE_IDS)
def test_tuple_hash_reference(seed, src, dst, sport, dport, proto, hexbytes, want, bucket):
    got = tuple_hash(ip(src), ip(dst), sport, dport, proto, seed)
    assert got == want, f"got {got:#010x}, want {want:#010x}"
    got_b = bucket_of(got)
    assert got_b == bucket, f"bucket: got {got_b}, want {bucket}"
    got_raw = oaat(bytes.fromhex(hexbytes), seed)
    assert got_raw == want, f"oaat over the listed bytes: got {got_raw:#010x}, want {want:#010x}"


@pytest.mark.parametrize("seed,src,dst,sport,dport,proto,hexbytes,want,bucket", TUPLE_VECTORS,
                         ids=TUPLE_IDS)
def test_tuple_hash_kernel(seed, src, dst, sport, dport, proto, hexbytes, want, bucket):
    got = kernel_hash(ip(src), ip(dst), sport, dport, proto, seed)
    assert got == want, f"got {got:#010x}, want {want:#010x}"
    got_b = got % N_BUCKETS
    assert got_b == bucket, f"bucket: got {got_b}, want {bucket}"


def test_hash_batch_matches_and_marks_invalid():
    rows = [v for v in TUPLE_VECTORS if v[0] == 0xDEADBEEF]
    n = len(rows) + 1
    addr = np.zeros((n, 4), dtype=np.uint64)
    ports = np.zeros(n, dtype=np.uint32)
    proto = np.zeros(n, dtype=np.uint8)
    ipver = np.zeros(n, dtype=np.uint8)
    valid = np.zeros(n, dtype=np.bool_)
    for i, (_, src, dst, sp, dp, pr, _, _, _) in enumerate(rows):
        addr[i, 0:2] = addr_words(ip(src))
        addr[i, 2:4] = addr_words(ip(dst))
        ports[i] = (sp << 16) | dp
        proto[i] = pr
        ipver[i] = 4
        valid[i] = True
    out = np.zeros(n, dtype=np.int64)
    hash_batch(0xDEADBEEF, addr, ports, proto, ipver, valid, out)
    got = [int(x) for x in out]
    want = [v[7] for v in rows] + [-1]
    assert got == want, f"got {got}, want {want}"


def test_kernel_hash_is_not_symmetric():
    a = kernel_hash(ip("10.0.0.1"), ip("10.0.0.2"), 1234, 80, 6, 0)
    b = kernel_hash(ip("10.0.0.2"), ip("10.0.0.1"), 80, 1234, 6, 0)
    assert a != b, f"got equal hashes {a:#x} for a tuple and its inverse, want different"


def test_tuple_bytes_rejects_mixed_families():
    with pytest.raises(ValueError):
        tuple_bytes(ip("10.0.0.1"), ip("b::2"), 1, 2, 6)


@pytest.mark.parametrize("a", ["10.0.0.1", "255.255.255.255", "0.0.0.0", "b::2",
                               "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:1.2.3.4"])
def test_addr_words_roundtrip(a):
    raw_ = ip(a)
    hi, lo = addr_words(raw_)
    ver = 4 if len(raw_) == 4 else 6
    got = words_addr(hi, lo, ver)
    assert got == raw_, f"got {got.hex()}, want {raw_.hex()}"
    if ver == 4:
        assert hi == 0, f"hi word of an IPv4 address: got {hi}, want 0"


# ---------------------------------------------------------------- property: kernel == reference

u16 = st.integers(0, 0xFFFF)
seeds = st.integers(0, 0xFFFFFFFF)
protos = st.sampled_from([1, 6, 17, 47, 58, 132, 0, 255])


@settings(max_examples=300, deadline=None)
@given(src=st.binary(min_size=4, max_size=4), dst=st.binary(min_size=4, max_size=4),
       sport=u16, dport=u16, proto=protos, seed=seeds)
def test_kernel_equals_reference_v4(src, dst, sport, dport, proto, seed):
    want = tuple_hash(src, dst, sport, dport, proto, seed)
    got = kernel_hash(src, dst, sport, dport, proto, seed)
    assert got == want, f"got {got:#010x}, want {want:#010x}"


@settings(max_examples=300, deadline=None)
@given(src=st.binary(min_size=16, max_size=16), dst=st.binary(min_size=16, max_size=16),
       sport=u16, dport=u16, proto=protos, seed=seeds)
def test_kernel_equals_reference_v6(src, dst, sport, dport, proto, seed):
    want = tuple_hash(src, dst, sport, dport, proto, seed)
    got = kernel_hash(src, dst, sport, dport, proto, seed)
    assert got == want, f"got {got:#010x}, want {want:#010x}"


# ---------------------------------------------------------------- ownership

@pytest.mark.parametrize("n_workers", range(1, 9))
def test_owner_slices_cover_all_buckets(n_workers):
    sl = owner_slices(n_workers)
    got_n = len(sl)
    assert got_n == n_workers, f"got {got_n} slices, want {n_workers}"
    assert sl[0][0] == 0, f"first slice starts at {sl[0][0]}, want 0"
    assert sl[-1][1] == N_BUCKETS, f"last slice ends at {sl[-1][1]}, want {N_BUCKETS}"
    for k in range(n_workers - 1):
        assert sl[k][1] == sl[k + 1][0], f"slice {k} ends at {sl[k][1]}, slice {k + 1} starts at {sl[k + 1][0]}"
    for k, (lo, hi) in enumerate(sl):
        assert lo < hi, f"slice {k} = [{lo}, {hi}) is empty"


@pytest.mark.parametrize("n_workers", range(1, 9))
def test_owner_of_agrees_with_slices(n_workers):
    want = np.empty(N_BUCKETS, dtype=np.int64)
    for k, (lo, hi) in enumerate(owner_slices(n_workers)):
        want[lo:hi] = k
    got = np.array([owner_of(b, n_workers) for b in range(N_BUCKETS)])
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, (f"bucket {bad[0]}: got owner {got[bad[0]]}, want {want[bad[0]]} "
                           f"({bad.size} buckets disagree)")
    # ascending bucket order is ascending (non-decreasing) worker order
    steps = np.diff(got)
    assert np.all((steps == 0) | (steps == 1)), f"owner steps got {sorted(set(steps.tolist()))}, want only 0/1"


@pytest.mark.parametrize("n_buckets", [1, 7, 128, 256, 1000])
def test_owner_of_small_tables(n_buckets):
    for n_workers in range(1, 9):
        sl = owner_slices(n_workers, n_buckets)
        for b in range(n_buckets):
            got = owner_of(b, n_workers, n_buckets)
            lo, hi = sl[got]
            assert lo <= b < hi, f"nb={n_buckets} n={n_workers} bucket {b}: got owner {got} with slice [{lo}, {hi})"


def test_same_bucket_more_workers_gives_ascending_owner():
    for b in range(N_BUCKETS):
        owners = [owner_of(b, n) for n in range(1, 9)]
        assert owners == sorted(owners), f"bucket {b}: owners for n=1..8 got {owners}, want ascending"
        assert owners[0] == 0, f"bucket {b}: owner with one worker got {owners[0]}, want 0"


@numba.njit(cache=True)
def _hash_v4_rows(seed, src, dst, ports, proto, out):
    for i in range(out.shape[0]):
        out[i] = hash_v4(seed, src[i], dst[i], ports[i], proto[i])


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
                               u16, u16, protos), min_size=1, max_size=40), seed=seeds)
def test_vectorized_v4_hash_equals_reference(rows, seed):
    """hash_v4 (the branch-free form parse_hash_batch runs over whole batches) is the
    reference one-at-a-time hash, row by row."""
    n = len(rows)
    src = np.array([int.from_bytes(r[0], "big") for r in rows], dtype=np.uint64)
    dst = np.array([int.from_bytes(r[1], "big") for r in rows], dtype=np.uint64)
    ports = np.array([(r[2] << 16) | r[3] for r in rows], dtype=np.int64)
    proto = np.array([r[4] for r in rows], dtype=np.int64)
    out = np.zeros(n, dtype=np.int64)
    _hash_v4_rows(seed, src, dst, ports, proto, out)
    for i, (s, d, sp, dp, pr) in enumerate(rows):
        want = tuple_hash(s, d, sp, dp, pr, seed)
        assert int(out[i]) == want, f"row {i}: got {int(out[i]):#010x}, want {want:#010x}"
