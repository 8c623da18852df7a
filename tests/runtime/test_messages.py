"""Wire format: batches round-trip as raw arrays, and every corruption is a WireError."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shardct.batch import PacketBatch
from workers import messages as M


def batch(n=4):
    return PacketBatch.from_frames([bytes([k]) * (60 + k) for k in range(n)],
                                   ts=np.arange(n) * 10, ifindex=[k % 2 for k in range(n)])


def frames_of(msg):
    return [bytes(f) for f in msg]


def test_round_trip_with_and_without_hashes():
    b = batch()
    for hashes in (None, np.arange(4, dtype=np.int64) * 7):
        h, got, gh = M.decode_batch(frames_of(M.encode_batch(b, hashes, seq=9, worker=1)))
        hdr = (h["seq"], h["worker"], h["n"])
        assert hdr == (9, 1, 4), f"header (seq, worker, n) got {hdr}, want (9, 1, 4)"
        got_frames = got.frames()
        assert got_frames == b.frames(), f"frames got {got_frames}, want {b.frames()}"
        got_if, got_ts = list(got.ifindex), list(got.ts)
        assert got_if == list(b.ifindex) and got_ts == list(b.ts), \
            f"(ifindex, ts) got {(got_if, got_ts)}, want {(list(b.ifindex), list(b.ts))}"
        assert (gh is None) == (hashes is None), \
            f"hashes got {gh!r}, want {'None' if hashes is None else 'an array'}"
        if hashes is not None:
            got_h = list(gh)
            assert got_h == list(hashes), f"hashes got {got_h}, want {list(hashes)}"
        assert got.buf.flags.writeable, "the engine rewrites frames in place"


def test_control_messages():
    got = M.decode(M.encode(M.HEARTBEAT, worker=2, t_ns=5))
    want = {"v": 1, "t": "heartbeat", "worker": 2, "t_ns": 5}
    assert got == want, f"heartbeat got {got}, want {want}"
    with pytest.raises(ValueError):
        M.encode("nope")


@pytest.mark.parametrize("corrupt,why", [
    (lambda f: [msgpack.packb({"v": 2, "t": "batch", "n": 4, "hashes": False})] + f[1:], "version"),
    (lambda f: [msgpack.packb({"v": 1, "t": "zap", "n": 4, "hashes": False})] + f[1:], "unknown message type"),
    (lambda f: [msgpack.packb({"v": 1, "t": "batch", "n": 5, "hashes": False})] + f[1:], "bytes for 5 packets"),
    (lambda f: [msgpack.packb({"v": 1, "t": "batch", "n": -1, "hashes": False})] + f[1:], "packet count"),
    (lambda f: [msgpack.packb({"v": 1, "t": "batch", "n": 4, "hashes": True})] + f[1:], "header says 7"),
    (lambda f: f[:4], "want 6 or 7"),
    (lambda f: f[:1] + [f[1][:10]] + f[2:], "outside the buffer"),
    (lambda f: f[:2] + [f[2][:-8]] + f[3:], "off:"),
    (lambda f: [b"\xc1garbage"] + f[1:], "undecodable"),
    (lambda f: [msgpack.packb([1, 2, 3])] + f[1:], "not a map"),
    (lambda f: [b"\x00" * (M.MAX_HEADER + 1)] + f[1:], "exceeds"),
])
def test_every_corruption_is_a_wire_error(corrupt, why):
    f = frames_of(M.encode_batch(batch()))
    with pytest.raises(M.WireError, match=why):
        M.decode_batch(corrupt(f))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=8))
def test_random_frames_only_ever_raise_wire_error(frames):
    try:
        M.decode_batch(frames)
    except M.WireError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**64 - 1) | st.text(max_size=8), max_size=6))
def test_random_headers_only_ever_raise_wire_error(d):
    f = frames_of(M.encode_batch(batch()))
    try:
        M.decode_batch([msgpack.packb(d)] + f[1:])
    except M.WireError:
        pass


def test_pool_messages_round_trip_and_reject_corruption():
    """Array messages (workers/pool.py): a superstep Msg survives the trip; a bad dtype,
    a short frame or a frame outside its buffer is a WireError, never a crash."""
    import numpy as np
    from shardct.shard import Msg, Packets
    from shardct.traffic import handshake_frames
    from workers.pool import msg_arrays, msg_from
    b = handshake_frames(3)
    pk = Packets(b, np.arange(len(b), dtype=np.int64), np.arange(len(b), dtype=np.int64) + 7,
                 np.full(len(b), -1, dtype=np.int64), np.arange(len(b), dtype=np.int64) - 1)
    m = Msg(active=True, low=5, ans=np.array([[1, 0, 2, 3]], dtype=np.int64), ho=pk)
    frames = M.encode_arrays(M.STEP, msg_arrays(m), round=1, step=0, active=True, low=5)
    h, a = M.decode_arrays([bytes(f) for f in frames])
    got = msg_from(h, a)
    ans, n_bo = got.ans.tolist(), len(got.bo)
    assert got.active and ans == [[1, 0, 2, 3]] and n_bo == 0, \
        f"(active, ans, len(bo)) got {(got.active, ans, n_bo)}, want (True, [[1, 0, 2, 3]], 0)"
    assert got.low == 5 and list(got.ho.dep) == list(pk.dep), \
        f"(low, dep) got {(got.low, list(got.ho.dep))}, want {(5, list(pk.dep))}"
    ho_frames, ho_seq = got.ho.batch.frames(), list(got.ho.seq)
    assert ho_frames == b.frames() and ho_seq == list(pk.seq), \
        f"handoff (frames, seq) got {(ho_frames, ho_seq)}, want {(b.frames(), list(pk.seq))}"
    bad = [bytes(f) for f in frames]
    bad[1] = bad[1][:-1]                                   # a short array
    with pytest.raises(M.WireError):
        M.decode_arrays(bad)
    h2, a2 = M.decode_arrays([bytes(f) for f in frames])
    a2["ho.off"] = a2["ho.off"] + 10_000                   # frames outside the buffer
    with pytest.raises(M.WireError):
        msg_from(h2, a2)
    a3 = dict(a)
    a3["ans"] = a["ans"].astype(np.uint64)                 # wrong dtype
    with pytest.raises(M.WireError):
        msg_from(h, a3)


def test_batches_over_a_message_limit_are_cut_not_refused():
    """A batch of more frames than one message carries (a capture read in big batches)
    reaches the pool in pieces, every frame once and in order (it used to be refused by
    the dispatcher, and the pool waited for it until its timeout)."""
    import numpy as np
    from shardct.traffic import syn_frames
    from workers.pool import _within_limits
    b = syn_frames(M.MAX_PACKETS + 4500)
    parts = list(_within_limits([b]))
    sizes = [len(p) for p in parts]
    assert max(sizes) <= M.MAX_PACKETS and sum(sizes) == len(b), f"sizes {sizes}, want <= " \
        f"{M.MAX_PACKETS} each and {len(b)} in all"
    got = b"".join(f for p in parts for f in p.frames())
    assert got == b"".join(b.frames()), "frames changed or reordered"
    ts = np.concatenate([p.ts for p in parts])
    assert np.array_equal(ts, b.ts), "timestamps changed"


def test_small_arrays_share_one_frame_and_big_ones_travel_alone():
    """encode_arrays packs arrays under PACK_BELOW into one frame (8-byte aligned) and
    sends bigger ones as their own frames; decode_arrays gives back every array, and
    refuses a packed array placed outside its frame or off alignment, and extra frames."""
    import msgpack
    import numpy as np
    big = np.arange(M.PACK_BELOW // 8 + 1, dtype=np.int64)
    arrays = {"a": np.arange(3, dtype=np.uint8), "big": big, "b": np.array([-1, 5], np.int16),
              "c": np.arange(6, dtype=np.uint64).reshape(2, 3)}
    frames = M.encode_arrays(M.RESULT, arrays, round=4)
    assert len(frames) == 3, f"got {len(frames)} frames, want header, packed, big"
    h, got = M.decode_arrays([bytes(f) for f in frames])
    assert h["round"] == 4 and set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].tolist() == v.tolist(), k

    def with_spec(edit):
        h = msgpack.unpackb(bytes(frames[0]), raw=False)
        edit(h["arrays"])
        return [msgpack.packb(h, use_bin_type=True)] + [bytes(f) for f in frames[1:]]
    for edit in (lambda s: s[0].__setitem__(3, 4),          # off the 8-byte grid
                 lambda s: s[2].__setitem__(3, 1 << 20),    # outside the packed frame
                 lambda s: s[0].__setitem__(3, -8)):
        with pytest.raises(M.WireError):
            M.decode_arrays(with_spec(edit))
    with pytest.raises(M.WireError):
        M.decode_arrays([bytes(f) for f in frames] + [b"x"])  # a frame nobody names
    with pytest.raises(M.WireError):
        M.decode_arrays([bytes(f) for f in frames[:2]])       # the big array's frame lost
