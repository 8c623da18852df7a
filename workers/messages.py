# Wire format between the pool's processes: versioned msgpack headers, and packet batches
# as one contiguous buffer plus raw numpy arrays (zero-copy frames), never pickle.
# Receivers validate everything and raise WireError, which they count and drop.
"""Messages.

A batch travels as a multipart ZeroMQ message::

    frame 0  msgpack header {"v": VERSION, "t": BATCH, "n": n, "seq": s, ...extra}
    frame 1  buf      uint8   the frames back to back
    frame 2  off      int64   start of each frame in buf
    frame 3  length   int32
    frame 4  ifindex  int16
    frame 5  ts       int64   nanoseconds
    frame 6  hashes   int64   (optional: the tuple hash the dispatcher computed, -1 none)

Control messages are a single msgpack frame ``{"v": VERSION, "t": TYPE, ...}``.

Array messages (the pool's rounds, steps and results) are a header naming each array's
dtype and shape, ``{"v", "t", "arrays": [[name, dtype, shape(, at)], ...], "packed", ...}``;
then, when ``packed``, one frame holding the small arrays (each at its ``at``), then one
raw frame per other array, in order; dtypes come from ``DTYPES`` only.
Unpacking is bounded (``MAX_HEADER`` bytes of msgpack, ``MAX_PACKETS`` per batch,
``MAX_BUF`` bytes of frames); anything inconsistent raises :class:`WireError`.
"""
from __future__ import annotations

import msgpack
import numpy as np

from shardct.batch import PacketBatch, compact

VERSION = 1
# message types
BATCH, RESULT, HANDOFF, HEARTBEAT, READY, STOP, STATS, END, ACK, STEP, HELLO, ROUND, DUMP = (
    "batch", "result", "handoff", "heartbeat", "ready", "stop", "stats", "end", "ack", "step",
    "hello", "round", "dump")
TYPES = {BATCH, RESULT, HANDOFF, HEARTBEAT, READY, STOP, STATS, END, ACK, STEP, HELLO, ROUND,
         DUMP}
# dtypes an array message may carry
DTYPES = {"u1": np.uint8, "i2": np.int16, "i4": np.int32, "i8": np.int64, "u8": np.uint64}
_DT = {code: np.dtype(t) for code, t in DTYPES.items()}
MAX_ARRAYS = 32

MAX_HEADER = 64 * 1024
MAX_PACKETS = 1 << 16
MAX_BUF = 64 << 20

_ARRAYS = (("off", np.int64), ("length", np.int32), ("ifindex", np.int16), ("ts", np.int64))


class WireError(ValueError):
    """A message that must be dropped (and counted) by its receiver."""


def _unpack_header(frame) -> dict:
    data = bytes(frame)
    if len(data) > MAX_HEADER:
        raise WireError(f"header of {len(data)} bytes exceeds {MAX_HEADER}")
    try:
        h = msgpack.unpackb(data, raw=False, strict_map_key=True,
                            max_str_len=4096, max_bin_len=4096, max_array_len=4096,
                            max_map_len=256)
    except Exception as e:       # msgpack raises several types for bad input
        raise WireError(f"undecodable header: {type(e).__name__}") from None
    if not isinstance(h, dict):
        raise WireError("header is not a map")
    if h.get("v") != VERSION:
        raise WireError(f"version {h.get('v')!r}, want {VERSION}")
    if h.get("t") not in TYPES:
        raise WireError(f"unknown message type {h.get('t')!r}")
    return h


def encode(t: str, **fields) -> bytes:
    """A control message."""
    if t not in TYPES:
        raise ValueError(f"unknown message type {t!r}")
    return msgpack.packb({"v": VERSION, "t": t, **fields}, use_bin_type=True)


def decode(frame) -> dict:
    return _unpack_header(frame)


def encode_batch(batch: PacketBatch, hashes: np.ndarray | None = None, t: str = BATCH,
                 **header) -> list:
    """Frames for send_multipart(copy=False): a header and the batch's arrays as raw
    buffers (no per-packet objects). Preconditions: arrays of the documented dtypes."""
    batch = compact(batch)           # only its own frames' bytes travel
    n = len(batch)
    h = {"v": VERSION, "t": t, "n": n, "hashes": hashes is not None, **header}
    out = [msgpack.packb(h, use_bin_type=True), np.ascontiguousarray(batch.buf).data]
    for name, dt in _ARRAYS:
        out.append(np.ascontiguousarray(getattr(batch, name), dtype=dt).data)
    if hashes is not None:
        out.append(np.ascontiguousarray(hashes, dtype=np.int64).data)
    return out


def decode_batch(frames, writable: bool = True) -> tuple[dict, PacketBatch, np.ndarray | None]:
    """Validate and view a batch message (arrays are views of the frames' buffers;
    buf is copied once so the engine may rewrite frames in place, unless ``writable``
    is False: a reader that only copies frames out, such as the dispatcher)."""
    if len(frames) < 6:
        raise WireError(f"batch of {len(frames)} frames, want 6 or 7")
    h = _unpack_header(frames[0])
    n = h.get("n")
    if not isinstance(n, int) or not 0 <= n <= MAX_PACKETS:
        raise WireError(f"packet count {n!r} outside 0..{MAX_PACKETS}")
    want = 7 if h.get("hashes") else 6
    if len(frames) != want:
        raise WireError(f"batch of {len(frames)} frames, header says {want}")
    raw = memoryview(frames[1])
    if raw.nbytes > MAX_BUF:
        raise WireError(f"frame buffer of {raw.nbytes} bytes exceeds {MAX_BUF}")
    buf = np.frombuffer(raw, dtype=np.uint8)
    if writable:
        buf = buf.copy()
    arrs = {}
    for k, (name, dt) in enumerate(_ARRAYS):
        mv = memoryview(frames[2 + k])
        if mv.nbytes != n * np.dtype(dt).itemsize:
            raise WireError(f"{name}: {mv.nbytes} bytes for {n} packets")
        arrs[name] = np.frombuffer(mv, dtype=dt)
    hashes = None
    if want == 7:
        mv = memoryview(frames[6])
        if mv.nbytes != n * 8:
            raise WireError(f"hashes: {mv.nbytes} bytes for {n} packets")
        hashes = np.frombuffer(mv, dtype=np.int64)
    off, length = arrs["off"], arrs["length"]
    if n and (off.min() < 0 or length.min() < 0
              or int((off + length.astype(np.int64)).max()) > buf.shape[0]):
        raise WireError("a frame lies outside the buffer")
    return h, PacketBatch(buf, off, length, arrs["ifindex"], arrs["ts"]), hashes


PACK_BELOW = 16 * 1024    # arrays smaller than this share one frame (see encode_arrays)


def encode_arrays(t: str, arrays: dict, **header) -> list:
    """Frames for send_multipart(copy=False): a header, then the small arrays (under
    PACK_BELOW bytes) copied back to back into one frame, each at a multiple of 8
    bytes, then each other array as its own raw buffer (zero-copy). A frame costs the
    sender microseconds whatever its size: a live round of one packet would otherwise
    spend more on its dozen tiny frames than on the packet."""
    spec, frames, small, at = [], [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        code = a.dtype.str[1:]
        if code not in DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot travel")
        if a.nbytes < PACK_BELOW:
            spec.append([name, code, list(a.shape), at])
            small.append(a.tobytes())
            pad = -a.nbytes % 8
            if pad:
                small.append(bytes(pad))
            at += a.nbytes + pad
        else:
            spec.append([name, code, list(a.shape)])
            frames.append(a.data)
    h = {"v": VERSION, "t": t, "arrays": spec, "packed": bool(small), **header}
    return [msgpack.packb(h, use_bin_type=True)] + ([b"".join(small)] if small else []) + frames


def decode_arrays(frames) -> tuple[dict, dict]:
    """Validate and view an array message: (header, {name: array}). Arrays are read-only
    views of the frames; copy what you will write."""
    if not frames:
        raise WireError("empty message")
    h = _unpack_header(frames[0])
    spec = h.get("arrays")
    packed = h.get("packed") is True
    if not isinstance(spec, list) or len(spec) > MAX_ARRAYS:
        raise WireError(f"array list {spec!r:.80} is not a list of at most {MAX_ARRAYS}")
    pack = memoryview(frames[1]) if packed and len(frames) > 1 else None
    rest = iter(frames[2 if packed else 1:])
    out, total = {}, 0
    for item in spec:
        if not (type(item) is list and 3 <= len(item) <= 4 and type(item[0]) is str
                and item[1] in _DT and type(item[2]) is list and len(item[2]) <= 2):
            raise WireError(f"bad array spec {item!r:.80}")
        name, code, shape = item[0], item[1], item[2]
        dt = _DT[code]
        want = dt.itemsize
        for d in shape:
            if type(d) is not int or d < 0 or d > MAX_BUF:
                raise WireError(f"bad array spec {item!r:.80}")
            want *= d
        if len(item) == 4:          # in the shared frame, at item[3]
            at = item[3]
            if pack is None or type(at) is not int or at < 0 or at % 8 \
                    or at + want > pack.nbytes:
                raise WireError(f"{name}: {want} bytes at {at!r:.20} outside the packed frame")
            got = want
            a = np.frombuffer(pack, dtype=dt, count=want // dt.itemsize, offset=at)
        else:
            frame = next(rest, None)
            if frame is None:
                raise WireError(f"{name}: no frame left for it")
            mv = memoryview(frame)
            got = mv.nbytes
            if got != want:
                raise WireError(f"{name}: {got} bytes, shape {shape} wants {want}")
            a = np.frombuffer(mv, dtype=dt)
        total += got
        if total > MAX_BUF:
            raise WireError(f"{name}: {total} bytes in all exceed {MAX_BUF}")
        out[name] = a if len(shape) == 1 else a.reshape(shape)
    if next(rest, None) is not None:
        raise WireError(f"more frames than the {len(spec)} arrays named")
    return h, out
