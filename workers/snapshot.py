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
from shardct.table import T_COUNT

FORMAT = 1
MAGIC = b"shardct-snap\x00\x00\x00" + bytes([FORMAT])
MAX_HEADER = 1 << 20
DTYPES = {"|u1": np.uint8, "<i4": np.int32, "<i8": np.int64, "<u4": np.uint32,
          "<u8": np.uint64, "<u2": np.uint16}


class SnapshotError(ConfigError):
    """A snapshot file that cannot be used: ``path: reason``."""


def path_of(directory: str, k: int) -> str:
    return os.path.join(directory, f"shard-{k}.snap")


def _header(scalars: dict, arrays: dict[str, np.ndarray]) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    specs = []
    for name, a in arrays.items():
        if a.dtype.str not in DTYPES or not a.flags.c_contiguous:
            raise ValueError(f"array {name}: {a.dtype} is not a snapshot dtype")
        specs.append([name, a.dtype.str, list(a.shape)])
        digest.update(memoryview(a).cast("B"))
    header = msgpack.packb({"scalars": scalars, "arrays": specs,
                            "digest": digest.hexdigest()}, use_bin_type=True)
    return MAGIC + struct.pack("<I", len(header)) + header


def dump_bytes(scalars: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """The snapshot file's bytes, in memory."""
    return b"".join([_header(scalars, arrays)] + [memoryview(a).cast("B") for a in arrays.values()])


def save(path: str, scalars: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write a snapshot atomically (a reader sees the old file or the new one, never a
    part). Returns the bytes written. Precondition: every array is C-contiguous with a
    dtype in DTYPES."""
    head = _header(scalars, arrays)
    tmp = f"{path}.tmp{os.getpid()}"
    size = 0
    try:
        with open(tmp, "wb") as f:
            f.write(head)
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
    return load_bytes(data, path)


def load_bytes(data: bytes, where: str = "snapshot") -> tuple[dict, dict[str, np.ndarray]]:
    """``load`` of a snapshot's bytes; errors name ``where``."""
    if data[:len(MAGIC) - 1] != MAGIC[:-1]:
        raise SnapshotError(where, "not a shardct snapshot")
    if data[len(MAGIC) - 1] != FORMAT:
        raise SnapshotError(where, f"snapshot format {data[len(MAGIC) - 1]}, want {FORMAT}")
    pos = len(MAGIC)
    if len(data) < pos + 4:
        raise SnapshotError(where, "cut off in its header")
    (hlen,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if hlen > MAX_HEADER or pos + hlen > len(data):
        raise SnapshotError(where, f"header length {hlen} does not fit the file")
    try:
        h = msgpack.unpackb(data[pos:pos + hlen], raw=False, strict_map_key=True)
        scalars, specs, want = h["scalars"], h["arrays"], h["digest"]
    except Exception as e:      # msgpack raises several types for bad input
        raise SnapshotError(where, f"bad header: {e}") from None
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
        raise SnapshotError(where, f"array table does not fit the file: {e}") from None
    if pos != len(data):
        raise SnapshotError(where, f"{len(data) - pos} bytes after the last array")
    if digest.hexdigest() != want:
        raise SnapshotError(where, "checksum mismatch (a damaged file)")
    return scalars, arrays


# ------------------------------------------------------------------ shardct snapshot show

def add_parser(sub):
    p = sub.add_parser("snapshot", help="what a run's snapshots hold (--snapshot-dir)")
    p.add_argument("action", choices=["show", "save"],
                   help="show: each shard file, checked; save: every worker of a running "
                        "replay or live saves its shard there now (restart it with --restore)")
    p.add_argument("dir", help="a directory of shard-K.snap files")
    p.add_argument("--pid", type=int, help="save: which run (default: the only one)")
    p.set_defaults(func=cmd_snapshot)


def cmd_snapshot(args) -> int:
    """One line per file: shard, seed, entries, the packet clock, size; a damaged file
    gets its reason and exit status 1. A planned restart: ``--restore DIR``."""
    import sys
    from datetime import datetime, timezone
    if args.action == "save":
        from .control import ask_one
        r = ask_one("shardct snapshot", args.pid, {"cmd": "save", "dir": os.path.abspath(args.dir)})
        if r is None:
            return 1
        print(f"shardct snapshot: {r['workers']} shards of pid {r['pid']} saved in {args.dir} "
              f"({r['stats'].get('entries', 0)} conns)", file=sys.stderr)
        return 0
    try:
        files = sorted(f for f in os.listdir(args.dir) if f.endswith(".snap"))
    except OSError as e:
        print(f"shardct snapshot: {args.dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not files:
        print(f"shardct snapshot: {args.dir}: no snapshot files", file=sys.stderr)
        return 2
    bad = 0
    for f in files:
        path = os.path.join(args.dir, f)
        try:
            sc, ar = load(path)
            tbl = ar["tbl"]
        except (SnapshotError, KeyError) as e:
            print(f"{f}: {e}")
            bad += 1
            continue
        when = datetime.fromtimestamp(int(sc["now"]) / 1e9, timezone.utc)
        print(f"{f}: shard {sc['k']} of {sc['n']}, seed 0x{int(sc['seed']):08x}, "
              f"{int(tbl[T_COUNT])} entries of {sc['capacity']}, clock {when:%Y-%m-%d %H:%M:%S} UTC, "
              f"{os.path.getsize(path):,} bytes")
    return 1 if bad else 0
