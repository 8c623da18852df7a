# A shard's snapshot on disk: written whole or not at all (temporary file, fsync, rename),
# versioned and checksummed, read back only when every check passes. No pickle: a msgpack
# header names each array's dtype and shape, the raw bytes follow.
"""Shard snapshot files.

Layout::

    MAGIC (16 bytes)  b"shardct-snap\\x00\\x00\\x00\\x01"  (the last byte is FORMAT)
    u32 little-endian  header length
    header             msgpack {"scalars": {...}, "arrays": [[name, dtype, shape], ...],
                                "digest": blake2b-256 of the array bytes, hex}
    array bytes        back to back, in header order

``save`` owns the file it writes; ``load`` raises :class:`SnapshotError` (a
ConfigError: ``path: reason``) for anything that is not a whole snapshot of this format.
What a snapshot holds, and whether it fits a shard, is ``Shard.snapshot``/``restore``'s
business (shardct/shard.py).
"""
from __future__ import annotations

import hashlib
import os
import struct

import msgpack
import numpy as np

from shardct.errors import ConfigError

FORMAT = 1
MAGIC = b"shardct-snap\x00\x00\x00" + bytes([FORMAT])
MAX_HEADER = 1 << 20
DTYPES = {"|u1": np.uint8, "<i4": np.int32, "<i8": np.int64, "<u4": np.uint32,
          "<u8": np.uint64, "<u2": np.uint16}


class SnapshotError(ConfigError):
    """A snapshot file that cannot be used: ``path: reason``."""


def path_of(directory: str, k: int) -> str:
    return os.path.join(directory, f"shard-{k}.snap")


def save(path: str, scalars: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write a snapshot atomically (a reader sees the old file or the new one, never a
    part). Returns the bytes written. Precondition: every array is C-contiguous with a
    dtype in DTYPES."""
    digest = hashlib.blake2b(digest_size=32)
    specs = []
    for name, a in arrays.items():
        if a.dtype.str not in DTYPES or not a.flags.c_contiguous:
            raise ValueError(f"array {name}: {a.dtype} is not a snapshot dtype")
        specs.append([name, a.dtype.str, list(a.shape)])
        digest.update(memoryview(a).cast("B"))
    header = msgpack.packb({"scalars": scalars, "arrays": specs,
                            "digest": digest.hexdigest()}, use_bin_type=True)
    tmp = f"{path}.tmp{os.getpid()}"
    size = 0
    try:
        with open(tmp, "wb") as f:
            for part in (MAGIC, struct.pack("<I", len(header)), header):
                f.write(part)
            for a in arrays.values():
                f.write(memoryview(a).cast("B"))
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)           # the rename itself survives a crash
    finally:
        os.close(dfd)
    return size


def load(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(scalars, arrays) of a snapshot file; SnapshotError if it is missing, cut off,
    of another format, or its bytes do not match its digest."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotError(path, e.strerror or str(e)) from None
    if data[:len(MAGIC) - 1] != MAGIC[:-1]:
        raise SnapshotError(path, "not a shardct snapshot")
    if data[len(MAGIC) - 1] != FORMAT:
        raise SnapshotError(path, f"snapshot format {data[len(MAGIC) - 1]}, want {FORMAT}")
    pos = len(MAGIC)
    if len(data) < pos + 4:
        raise SnapshotError(path, "cut off in its header")
    (hlen,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if hlen > MAX_HEADER or pos + hlen > len(data):
        raise SnapshotError(path, f"header length {hlen} does not fit the file")
    try:
        h = msgpack.unpackb(data[pos:pos + hlen], raw=False, strict_map_key=True)
        scalars, specs, want = h["scalars"], h["arrays"], h["digest"]
    except Exception as e:      # msgpack raises several types for bad input
        raise SnapshotError(path, f"bad header: {e}") from None
    pos += hlen
    arrays, digest = {}, hashlib.blake2b(digest_size=32)
    try:
        for name, dt, shape in specs:
            a = np.frombuffer(data, dtype=DTYPES[dt], count=int(np.prod(shape, dtype=np.int64)),
                              offset=pos).reshape(shape)
            digest.update(memoryview(a).cast("B"))
            arrays[name] = a
            pos += a.nbytes
    except (KeyError, ValueError, TypeError) as e:
        raise SnapshotError(path, f"array table does not fit the file: {e}") from None
    if pos != len(data):
        raise SnapshotError(path, f"{len(data) - pos} bytes after the last array")
    if digest.hexdigest() != want:
        raise SnapshotError(path, "checksum mismatch (a damaged file)")
    return scalars, arrays
