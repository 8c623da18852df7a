"""RingMerge (workers/afpacket.py) on fake rings: frames of several interfaces come out in
timestamp order across polls, a ring's own order is kept, frames are held back only as
long as a later frame of another ring could still appear, and nothing is lost or
duplicated when the staging buffer is compacted or grown. No sockets are read: the fake
rings hand out frames scripted per poll, the clock is manual."""
from __future__ import annotations

import socket

import numpy as np

from workers.afpacket import RingMerge


class FakeRing:
    """Stands in for RxRing: ``script[k]`` is the list of ts the k-th drain hands out
    (each frame's bytes are ifindex + ts, so every frame is unique)."""

    def __init__(self, ifindex, script, timeout_ms=10, ring_bytes=4096, max_frames=64):
        self.ifindex, self.ifname = ifindex, f"f{ifindex}"
        self.script = [list(x) for x in script]
        self.timeout_ms, self.ring_bytes, self.max_frames = timeout_ms, ring_bytes, max_frames
        self.blocks, self.block_size, self.block_frames = 1, ring_bytes, max_frames
        self.sock, self._peer = socket.socketpair()   # never readable: select times out
        self.drops = 0
        self.taken = False       # this poll's frames were drained (run() resets it)

    def retired(self):
        return not self.taken

    def drain_into(self, out, out_off, out_len, out_ts, limit=False):
        self.taken = True
        batch = self.script.pop(0) if self.script else []
        assert len(batch) <= self.max_frames, f"got {len(batch)} frames, want <= {self.max_frames}"
        o = 0
        for i, t in enumerate(batch):
            f = frame(self.ifindex, t)
            assert o + len(f) <= out.shape[0], f"got room {out.shape[0]}, want {o + len(f)}"
            out[o:o + len(f)] = np.frombuffer(f, np.uint8)
            out_off[i], out_len[i], out_ts[i] = o, len(f), t
            o += len(f)
        return len(batch)

    def poll_stats(self):
        return 0

    def close(self):
        self.sock.close()
        self._peer.close()


def frame(ifindex, t):
    return bytes(14) + ifindex.to_bytes(2, "big") + int(t).to_bytes(8, "big") + bytes(t % 7)


class SmallMerge(RingMerge):
    MIN_BYTES, MIN_FRAMES = 64, 4       # the staging buffer is compacted and grown often


def run(rings, nows, hold_ms=50, merge=RingMerge):
    """Poll once per entry of nows (ms), then flush; returns [[(ifindex, ts), ...] per
    batch] and checks every frame's bytes."""
    clock = iter(nows)

    def now():
        for r in rings:
            r.taken = False
        return next(clock) * 1_000_000

    m = merge(rings, hold_ms=hold_ms, clock=now)
    out = [m.poll(0) for _ in nows] + [m.flush(settle=False)]
    res = []
    for b in out:
        got = [(int(b.ifindex[i]), int(b.ts[i])) for i in range(len(b))]
        for (ifx, t), f in zip(got, b.frames()):
            assert f == frame(ifx, t), f"frame bytes of {ifx}/{t} differ"
        res.append(got)
    for r in rings:
        r.close()
    return res, m


MS = 1_000_000


def test_watermark_orders_two_rings_and_holds_what_may_still_be_overtaken():
    a = FakeRing(0, [[10 * MS, 30 * MS], [40 * MS]])
    b = FakeRing(1, [[20 * MS], [35 * MS]])
    res, m = run([a, b], [1, 1])          # the clock is far behind: only the watermark cuts
    want = [[(0, 10 * MS), (1, 20 * MS)], [(0, 30 * MS), (1, 35 * MS)], [(0, 40 * MS)]]
    assert res == want, f"got {res}, want {want}"
    assert m.late == 0, f"got late={m.late}, want 0"


def test_a_frame_read_one_poll_later_is_not_overtaken():
    """Ring B's frame stamped 20 ms shows up only at the second poll (its block was not
    retired yet); ring A's frame stamped 30 ms must wait for it."""
    a = FakeRing(0, [[10 * MS, 30 * MS], []])
    b = FakeRing(1, [[], [20 * MS]])
    res, m = run([a, b], [31, 32])
    flat = [x for batch in res for x in batch]
    want = [(0, 10 * MS), (1, 20 * MS), (0, 30 * MS)]
    assert flat == want, f"got {flat}, want {want}"
    assert res[0] == [], f"got {res[0]} at the first poll, want nothing (B may still show)"
    assert m.late == 0, f"got late={m.late}, want 0"


def test_an_idle_ring_holds_the_other_back_only_for_hold():
    a = FakeRing(0, [[10 * MS, 30 * MS], [], []])
    b = FakeRing(1, [[], [], []])
    res, _ = run([a, b], [40, 61, 200], hold_ms=50)
    want = [[], [(0, 10 * MS)], [(0, 30 * MS)], []]
    assert res == want, f"got {res}, want {want}"


def test_one_ring_is_never_held_and_keeps_its_order():
    a = FakeRing(0, [[10 * MS, 5 * MS, 12 * MS]])
    res, _ = run([a], [0])
    want = [[(0, 10 * MS), (0, 5 * MS), (0, 12 * MS)], []]
    assert res == want, f"got {res}, want {want}"


def test_a_rings_own_order_is_kept_when_its_stamps_step_back():
    a = FakeRing(0, [[10 * MS, 5 * MS, 12 * MS]])
    b = FakeRing(1, [[11 * MS, 13 * MS]])
    res, _ = run([a, b], [0])
    flat = [x for batch in res for x in batch]
    want = [(0, 10 * MS), (0, 5 * MS), (1, 11 * MS), (0, 12 * MS), (1, 13 * MS)]
    assert flat == want, f"got {flat}, want {want}"


def test_a_frame_later_than_hold_is_counted_late():
    a = FakeRing(0, [[10 * MS], [], []])
    b = FakeRing(1, [[], [], [5 * MS]])
    res, m = run([a, b], [100, 101, 102], hold_ms=50)
    flat = [x for batch in res for x in batch]
    want = [(0, 10 * MS), (1, 5 * MS)]
    assert flat == want, f"got {flat}, want {want}"
    assert m.late == 1, f"got late={m.late}, want 1"


def test_many_polls_compact_and_grow_without_loss():
    """Three rings, 600 polls 1 ms apart, tiny rings (the staging buffer is compacted and
    regrown often). Each ring's frames become readable up to 15 ms after their stamp, in
    ring order (as retired blocks do), and rings go quiet for stretches: every frame comes
    out once, in timestamp order across rings, none late with hold 20 ms."""
    rng = np.random.default_rng(7)
    polls = 600
    scripts = []
    for k in range(3):
        script = [[] for _ in range(polls)]
        t, visible = 0, 0
        while True:
            t += int(rng.exponential(0.3 * MS)) + (int(60 * MS) if rng.random() < 0.003 else 0)
            visible = max(visible, t + int(rng.integers(0, 15 * MS)))
            p = -(-visible // MS)                  # first poll at or after `visible`
            if p >= polls:
                break
            script[p].append(t)
        scripts.append(script)
    rings = [FakeRing(k, scripts[k], ring_bytes=40 * 40, max_frames=40) for k in range(3)]
    assert max(len(x) for s in scripts for x in s) <= 40, "a poll's frames exceed the fake ring"
    res, m = run(rings, list(range(polls)), hold_ms=20, merge=SmallMerge)
    flat = [x for batch in res for x in batch]
    want = [(k, ts) for k in range(3) for seq in scripts[k] for ts in seq]
    assert sorted(flat) == sorted(want), f"got {len(flat)} frames, want {len(want)}"
    keys = [ts for _, ts in flat]
    assert keys == sorted(keys), "got frames out of timestamp order"
    assert m.late == 0, f"got late={m.late}, want 0"
    assert len(want) > 3000, f"got {len(want)} frames, want a few thousand"


def test_everything_held_grows_the_buffer_and_comes_out_at_flush():
    """Ring B never speaks and hold is long: all of ring A's 6000 frames stay held (the
    staging buffer grows from 64 bytes), then come out, once each and in order, at flush."""
    a = FakeRing(0, [[(p * 30 + j + 1) * MS // 10 for j in range(30)] for p in range(200)],
                 ring_bytes=30 * 40, max_frames=30)
    b = FakeRing(1, [])
    res, m = run([a, b], [0] * 200, hold_ms=10_000, merge=SmallMerge)
    assert all(x == [] for x in res[:-1]), "got frames before the flush, want all held"
    want = [(0, t * MS // 10) for t in range(1, 6001)]
    assert res[-1] == want, f"got {len(res[-1])} frames at flush, want {len(want)} in order"
    assert m.buf.shape[0] > 6000 * 24, f"got a {m.buf.shape[0]}-byte buffer, want it grown"
