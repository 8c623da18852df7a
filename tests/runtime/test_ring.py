"""The pool's shared-memory frame ring (workers/ring.py) and batches ``shared`` on it:
allocation wraps and refuses when full, space comes back in order, frames never move
once placed, and take/concat/scatter give views on the ring with the same frames."""
from __future__ import annotations

import numpy as np
import pytest

from shardct.batch import PacketBatch, compact, concat, take
from shardct.scatter import scatter
from shardct.traffic import handshake_frames
from workers.ring import FrameRing


@pytest.fixture
def ring():
    r = FrameRing.create(4096)
    yield r
    r.unlink()


def frames(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return PacketBatch.from_frames([rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                                    for _ in range(n)])


def test_put_wraps_refuses_when_full_and_releases_in_order(ring):
    a, b, c = frames(10, 100, 1), frames(10, 100, 2), frames(10, 100, 3)   # 1000 B each
    pa, ta = ring.put(a)
    pb, tb = ring.put(b)
    pc, tc = ring.put(c)
    assert ring.put(frames(2, 600)) is None                # 1096 B left at the end: no
    assert pa.frames() == a.frames() and pc.frames() == c.frames()
    assert pa.shared and pa.buf is ring.buf
    ring.release(tb)                                       # a and b: [0, 2000) is free
    pd, td = ring.put(frames(12, 100, 4))                  # 1200 B: not after c, so at 0
    assert int(pd.off[0]) == 0 and pc.frames() == c.frames()
    pe, te = ring.put(frames(8, 100, 5))                   # exactly the 800 B up to c
    assert int(pe.off[0]) == 1200
    assert ring.put(frames(1, 1)) is None                  # full
    ring.release(tc)
    assert [t for t, _, _ in ring.live] == [td, te]
    pf, _ = ring.put(frames(20, 100, 6))                   # after e again
    assert int(pf.off[0]) == 2000
    assert pd.frames() == frames(12, 100, 4).frames() and pe.frames() == frames(8, 100, 5).frames()


def test_a_second_mapping_sees_the_frames(ring):
    p, _ = ring.put(frames(5, 64))
    other = FrameRing(ring.path)
    q = other.batch(p.off, p.length, p.ifindex, p.ts)
    assert q.frames() == p.frames()
    q.buf[int(q.off[0])] ^= 0xFF                           # a rewrite shows on both sides
    assert p.frame(0) == q.frame(0)
    with pytest.raises(ValueError):
        other.batch(p.off + ring.size, p.length, p.ifindex, p.ts)
    with pytest.raises(ValueError):
        other.batch(p.off.astype(np.int32), p.length, p.ifindex, p.ts)


def test_shared_take_concat_scatter_are_views_with_the_same_frames():
    b = handshake_frames(40)
    s = PacketBatch(b.buf, b.off, b.length, b.ifindex, b.ts, True)
    idx = np.arange(len(b))[::-3]
    assert take(s, idx).buf is b.buf and take(s, idx).frames() == take(b, idx).frames()
    halves = [take(s, np.arange(0, 30)), take(s, np.arange(30, len(b)))]
    joined = concat(halves)
    assert joined.shared and joined.buf is b.buf and joined.frames() == b.frames()
    c = compact(s)
    assert not c.shared and c.buf is not b.buf and c.frames() == b.frames()
    hashes = np.arange(len(b), dtype=np.int64) * 2654435761 % (1 << 32)
    for (pc, hc, ic), (pv, hv, iv) in zip(scatter(b, hashes, 3, 16384),
                                          scatter(s, hashes, 3, 16384)):
        assert pv.shared and pv.buf is b.buf
        assert pc.frames() == pv.frames() and (ic == iv).all() and (hc == hv).all()
