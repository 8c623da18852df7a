"""The dispatcher's scatter: every packet lands at the owner of its bucket, order is kept
per worker, and the parts are a permutation of the input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shardct import wire
from shardct.batch import PacketBatch
from shardct.hashing import N_BUCKETS, owner_of
from shardct.traffic import tcp_frames
from shardct.scatter import SeqOrder, by_owner, owners, scatter


@settings(max_examples=50, deadline=None)
@given(n_workers=st.integers(1, 7), hs=st.lists(st.integers(-1, 2**32 - 1), max_size=200))
def test_owner_matches_hashing(n_workers, hs):
    h = np.array(hs, dtype=np.int64)
    got = owners(h, n_workers, N_BUCKETS)
    want = [0 if x < 0 else owner_of(x % N_BUCKETS, n_workers) for x in hs]
    got = list(got)
    assert got == want, f"owners got {got}, want {want}"


def test_scatter_keeps_order_and_loses_nothing():
    b, flow = tcp_frames(500, 5000, seed=3, popularity="uniform")
    meta, addr = wire.new_meta(len(b))
    h = np.empty(len(b), np.int64)
    wire.parse_hash_batch(b.buf, b.off, b.length, meta, addr, True, 1234, h)
    for n in (1, 2, 3, 4):
        parts = scatter(b, h, n, N_BUCKETS)
        seen = np.concatenate([idx for _, _, idx in parts])
        assert sorted(seen.tolist()) == list(range(len(b))), "a permutation of the input"
        for k, (pb, ph, idx) in enumerate(parts):
            assert list(idx) == sorted(idx), f"worker {k}: input order kept"
            got_owners = [owner_of(int(x) % N_BUCKETS, n) for x in ph]
            assert all(o == k for o in got_owners), \
                f"n={n} worker {k}: bucket owners got {sorted(set(got_owners))}, want only {k}"
            assert pb.frames() == [b.frame(int(i)) for i in idx], "frames copied intact"
            got_ts = list(pb.ts)
            assert got_ts == list(b.ts[idx]), \
                f"n={n} worker {k}: ts got {got_ts}, want {list(b.ts[idx])}"


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 300), max_size=200), base=st.integers(-2**40, 2**40))
def test_seq_order_is_a_stable_sort(seq, base):
    """Dense distinct numbers (a round), repeats (errors of one packet) and sparse
    numbers all come out as a stable sort gives them."""
    s = np.array(seq, dtype=np.int64) + base
    assert SeqOrder()(s).tolist() == np.argsort(s, kind="stable").tolist()


def test_seq_order_places_a_shuffled_round_with_gaps():
    rng = np.random.default_rng(1)
    s = 10**9 + rng.permutation(70_000)[:65_536]      # some numbers lost or held back
    order = SeqOrder()
    order(s[:100])                  # a small slot array first: it grows
    got = order(s)
    assert (np.diff(s[got]) > 0).all() and sorted(got.tolist()) == list(range(len(s)))


def test_by_owner_splits_in_input_order_and_refuses_strangers():
    own = np.array([2, 0, 2, 1, 0, 2], dtype=np.int64)
    got = [(k, idx.tolist()) for k, idx in by_owner(own, 4)]
    assert got == [(0, [1, 4]), (1, [3]), (2, [0, 2, 5])], got
    with pytest.raises(ValueError):
        list(by_owner(np.array([0, 4], dtype=np.int64), 4))
