"""Hash flooding: tuples crafted (by brute force, with the project's own hash kernel) to
share one chain under a known seed spread out under another seed, which is why replay and
live draw the seed at random unless one is given."""
from __future__ import annotations

import numba
import numpy as np

from shardct.hashing import bucket_of, hash_v4, owner_of, tuple_hash

SEED_A, SEED_B = 0x5EED, 0x9E3779B9
N_BUCKETS = 16384
DST, DPORT, UDP = 0x0A000001, 53, 17        # 10.0.0.1:53


@numba.njit(cache=True)
def _collide(seed, target, mask, out):
    """Fill ``out`` with (src addr << 16 | sport) of UDP tuples to DST:DPORT whose hash
    & mask == target; returns how many were found."""
    n = 0
    for hi in range(1 << 16):                # sources 198.18.0.0/16 (RFC 2544 bench range)
        src = (198 << 24) | (18 << 16) | hi
        for sport in range(1024, 65536):
            h = hash_v4(seed, src, DST, (sport << 16) | DPORT, UDP)
            if (h & mask) == target:
                out[n] = (np.int64(src) << 16) | sport
                n += 1
                if n == out.shape[0]:
                    return n
    return n


def longest_chain(found, seed, n_buckets=N_BUCKETS):
    buckets = [bucket_of(tuple_hash(int(x >> 16).to_bytes(4, "big"), DST.to_bytes(4, "big"),
                                    int(x & 0xFFFF), DPORT, UDP, seed), n_buckets)
               for x in found]
    return int(np.bincount(buckets, minlength=n_buckets).max()), buckets


def test_tuples_that_share_one_bucket_under_one_seed_spread_under_another():
    want = 3000
    found = np.empty(want, dtype=np.int64)
    n = _collide(SEED_A, 777, N_BUCKETS - 1, found)
    assert n == want, f"brute force found {n} colliding tuples, want {want}"
    assert len(set(found.tolist())) == want, "the tuples are distinct"
    chain_a, ba = longest_chain(found, SEED_A)
    assert chain_a == want and set(ba) == {777}, \
        f"under the crafting seed: longest chain got {chain_a}, want all {want} in bucket 777"
    chain_b, bb = longest_chain(found, SEED_B)
    assert chain_b <= 8, f"under another seed: longest chain got {chain_b}, want <= 8"
    workers_a = {owner_of(b, 2, N_BUCKETS) for b in ba}
    per_worker_b = np.bincount([owner_of(b, 2, N_BUCKETS) for b in bb], minlength=2)
    assert len(workers_a) == 1 and per_worker_b.min() > want // 3, \
        f"workers under A got {workers_a} (want one), under B got {per_worker_b} (want both busy)"
