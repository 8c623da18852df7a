# The `shardct` command: hash (which bucket/worker owns a flow), replay (a capture or the
# built-in demo trace through the engine), live (watch), run (route), and conntrack-style listings.
"""Command line interface. ``shardct --help`` lists the commands."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from shardct.hashing import N_BUCKETS, bucket_of, owner_of, tuple_hash

from . import argtypes as A

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (the subcommands' parsers are of this class too)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _endpoint(s: str):
    """'10.0.0.1:80', '[b::2]:80', '10.0.0.1' (port 0)."""
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "0"
    elif s.count(":") == 1:
        host, port = s.split(":")
    else:
        host, port = s, "0"
    try:
        addr = ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        raise SystemExit(f"shardct hash: bad endpoint {s!r}: want ADDR:PORT or [ADDR6]:PORT")
    if not 0 <= p <= 65535:
        raise SystemExit(f"shardct hash: port {p} out of range")
    return addr, p


def cmd_hash(a) -> int:
    proto = PROTOS.get(a.proto, None)
    if proto is None:
        try:
            proto = int(a.proto)
        except ValueError:
            raise SystemExit(f"shardct hash: unknown protocol {a.proto!r}")
    (src, sport), (dst, dport) = _endpoint(a.src), _endpoint(a.dst)
    if src.version != dst.version:
        raise SystemExit("shardct hash: source and destination are different families")
    if proto in (1, 58):
        # echo request tuple: ident in the sport slot, 0 in the other (gVisor getTupleID)
        dport = 0
    rows = [("original", src, dst, sport, dport), ("reply", dst, src, dport, sport)]
    for name, s, d, sp, dp in rows:
        h = tuple_hash(s.packed, d.packed, sp, dp, proto, a.seed)
        b = bucket_of(h, a.buckets)
        w = owner_of(b, a.workers, a.buckets)
        ss = f"[{s}]" if s.version == 6 else str(s)
        ds = f"[{d}]" if d.version == 6 else str(d)
        print(f"{name:<8} {a.proto} {ss}:{sp} -> {ds}:{dp}  hash=0x{h:08x} bucket={b} worker={w}/{a.workers}")
    return 0


def cmd_keygen(a) -> int:
    """Keys for a pool whose endpoints are tcp:// (Pool(curve=DIR)): see
    workers/transport.py for the layout."""
    from .transport import keygen
    try:
        keygen(a.dir)
    except OSError as e:
        print(f"shardct keygen: {e}", file=sys.stderr)
        return 2
    print(f"shardct keygen: wrote {a.dir}/server.key*, client.key* and "
          f"{a.dir}/authorized/client.key (add other clients' .key files there)")
    return 0


def main(argv=None) -> int:
    ap = Parser(prog="shardct", description="Sharded conntrack + NAT engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hash", help="bucket and owning worker of a flow and of its reply")
    h.add_argument("--seed", type=A.seed, required=True,
                   help="the pool's hash seed (a running pool draws its own: it printed it)")
    h.add_argument("--workers", type=A.workers, default=1)
    h.add_argument("--buckets", type=A.positive_int, default=N_BUCKETS)
    h.add_argument("proto", help="tcp, udp, icmp, icmpv6 or a protocol number")
    h.add_argument("src", help="ADDR:PORT (IPv6: [ADDR]:PORT; ICMP: ADDR:IDENT)")
    h.add_argument("dst", help="ADDR:PORT")
    h.set_defaults(func=cmd_hash)

    k = sub.add_parser("keygen", help="create CurveZMQ keys for a pool on tcp:// endpoints")
    k.add_argument("dir", help="directory for the keys (created 0700; never overwritten)")
    k.set_defaults(func=cmd_keygen)

    from . import control, firstrun, live, replay, run, snapshot
    replay.add_parser(sub)
    live.add_parser(sub)
    run.add_parser(sub)
    firstrun.add_parser(sub)
    snapshot.add_parser(sub)
    control.add_parser(sub)

    a = ap.parse_args(argv)
    if a.cmd == "hash" and a.workers == "auto":
        a.workers = os.cpu_count() or 1
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
