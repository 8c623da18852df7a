# argparse types of the CLI's numeric options: a bad value is refused by argparse with
# one line (the parser's error), never reaches a process.
"""Argument types."""
from __future__ import annotations

import argparse
import secrets
import sys

MAX_WORKERS = 256
SEED_MAX = 2**32 - 1


def _int(s: str) -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None


def positive_int(s: str) -> int:
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: want a positive integer")
    return v


def workers(s: str):
    """1..MAX_WORKERS or 'auto' (every core)."""
    if s == "auto":
        return s
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: want 1..{MAX_WORKERS} or 'auto'") from None
    if not 1 <= v <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{s!r}: want 1..{MAX_WORKERS} or 'auto'")
    return v


def seed(s: str) -> int:
    """The hash seed: 0..2^32-1, decimal or 0x hex."""
    v = _int(s)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{s!r}: want 0..0x{SEED_MAX:x}")
    return v


def draw_seed(args, prog: str) -> int:
    """``args.seed``, drawn from the OS's randomness when none was given (a fixed default
    lets anyone craft flows that share one chain: hash flooding), and printed on stderr
    so the run can be repeated with ``--seed``."""
    if args.seed is None:
        args.seed = secrets.randbits(32)
        print(f"{prog}: seed 0x{args.seed:08x} (drawn at random; repeat with --seed)",
              file=sys.stderr)
    return args.seed


def seconds(s: str) -> float:
    """A duration in seconds, 0 or more."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of seconds") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: want 0 or more seconds")
    return v


def add_snapshot_options(p):
    """--snapshot-interval / --snapshot-dir of a command that runs a pool."""
    p.add_argument("--snapshot-interval", type=seconds, default=None, metavar="SECONDS",
                   help="pool: each worker saves its shard this often (between rounds); a "
                        "worker restarted after a crash starts from its last snapshot "
                        "(default: no snapshots; 0: after every round)")
    p.add_argument("--snapshot-dir", default=None, metavar="DIR",
                   help="pool: where the snapshots go; given, every shard is also saved at "
                        "the end of the run, for a planned restart with --restore DIR "
                        "(default: a directory of the run's own, removed at the end)")
    p.add_argument("--restore", default=None, metavar="DIR",
                   help="pool: start from another run's snapshots (--snapshot-dir DIR): "
                        "every conn is rehashed under this run's seed and worker count")


def snapshot_kwargs(args) -> dict:
    """Pool keyword arguments of the snapshot options."""
    return {"snapshot_interval": args.snapshot_interval, "snapshot_dir": args.snapshot_dir,
            "restore_from": args.restore}


def wants_snapshots(args) -> bool:
    return any(v is not None for v in snapshot_kwargs(args).values())


def add_metrics_option(p):
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT while the pool runs "
                        "(per-worker counters, ring drops, handoffs, round latency)")
