# The demo trace behind `shardct replay` with no arguments: LAN clients behind the demo
# router (configs/demo.toml) open TCP connections, ask DNS, ping, and a WAN client uses
# the port forward. Replies are addressed as the WAN sees the router (ports are kept:
# the demo has no clashes). Generated in code, deterministic.
"""Built-in demo trace for ``shardct replay``."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np

from shardct.batch import PacketBatch
from shardct.traffic import (F_ACK, F_DPORT, F_FLAGS, F_ICMPTYPE, F_IPVER, F_PAYLEN, F_PROTO,
                             F_SEQ, F_SPORT, F_TTL, F_WIN, F_WSCALE, N_F, build_frames)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"
LAN, WAN = 0, 1
ROUTER_WAN = "192.168.0.1"
SYN, SYNACK, ACK, FINACK, PSHACK = 0x02, 0x12, 0x10, 0x11, 0x18


def _ip(s):
    return np.uint64(int(ipaddress.ip_address(s)))


def demo_rows(n_tcp=2000, n_udp=1000, n_ping=200):
    rows = []      # (time, ifindex, proto, src, dst, sport, dport, flags, seq, ack, paylen, icmp type)
    t = 0
    for k in range(n_tcp):
        cli = f"10.0.0.{2 + k % 200}"
        srv = f"192.168.0.{10 + k % 20}"
        sp, dp = 20000 + k, 80 if k % 3 else 443
        iss, irs = 1000 * k + 7, 5000 * k + 11
        t0 = t
        rows += [
            (t0 + 0, LAN, 6, cli, srv, sp, dp, SYN, iss, 0, 0, 0),
            (t0 + 1, WAN, 6, srv, ROUTER_WAN, dp, sp, SYNACK, irs, iss + 1, 0, 0),
            (t0 + 2, LAN, 6, cli, srv, sp, dp, ACK, iss + 1, irs + 1, 0, 0),
            (t0 + 3, LAN, 6, cli, srv, sp, dp, PSHACK, iss + 1, irs + 1, 120, 0),
            (t0 + 4, WAN, 6, srv, ROUTER_WAN, dp, sp, PSHACK, irs + 1, iss + 121, 900, 0),
            (t0 + 5, LAN, 6, cli, srv, sp, dp, ACK, iss + 121, irs + 901, 0, 0),
        ]
        if k % 4:       # three in four close; the rest stay ESTABLISHED
            rows += [
                (t0 + 6, LAN, 6, cli, srv, sp, dp, FINACK, iss + 121, irs + 901, 0, 0),
                (t0 + 7, WAN, 6, srv, ROUTER_WAN, dp, sp, FINACK, irs + 901, iss + 122, 0, 0),
                (t0 + 8, LAN, 6, cli, srv, sp, dp, ACK, iss + 122, irs + 902, 0, 0),
            ]
        t += 3
    for k in range(n_udp):
        cli = f"10.0.0.{2 + k % 200}"
        sp = 40000 + k
        rows += [(t, LAN, 17, cli, "192.168.0.53", sp, 53, 0, 0, 0, 32, 0),
                 (t + 2, WAN, 17, "192.168.0.53", ROUTER_WAN, 53, sp, 0, 0, 0, 96, 0)]
        t += 1
    for k in range(n_ping):
        cli = f"10.0.0.{2 + k % 200}"
        rows += [(t, LAN, 1, cli, "192.168.0.99", 100 + k, 0, 0, 1, 0, 56, 8),
                 (t + 1, WAN, 1, "192.168.0.99", ROUTER_WAN, 100 + k, 0, 0, 1, 0, 56, 0)]
        t += 1
    for k in range(50):      # port forward from the WAN to the LAN web server
        wc = f"192.168.0.{150 + k}"
        sp = 30000 + k
        rows += [(t, WAN, 6, wc, ROUTER_WAN, sp, 8080, SYN, 77, 0, 0, 0),
                 (t + 1, LAN, 6, "10.0.0.80", wc, 80, sp, SYNACK, 99, 78, 0, 0),
                 (t + 2, WAN, 6, wc, ROUTER_WAN, sp, 8080, ACK, 78, 100, 0, 0)]
        t += 1
    rows.sort(key=lambda r: r[0])
    return rows


def demo_batch() -> PacketBatch:
    rows = demo_rows()
    n = len(rows)
    f = np.zeros((n, N_F), dtype=np.int64)
    a = np.zeros((n, 4), dtype=np.uint64)
    ts = np.zeros(n, dtype=np.int64)
    ifx = np.zeros(n, dtype=np.int16)
    for i, (t, ifi, proto, src, dst, sp, dp, fl, seq, ack, pay, ity) in enumerate(rows):
        f[i, F_IPVER], f[i, F_PROTO], f[i, F_TTL] = 4, proto, 64
        f[i, F_SPORT], f[i, F_DPORT], f[i, F_FLAGS] = sp, dp, fl
        f[i, F_SEQ], f[i, F_ACK], f[i, F_PAYLEN] = seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, pay
        f[i, F_WIN], f[i, F_WSCALE] = 65535, (7 if fl & SYN else -1)
        f[i, F_ICMPTYPE] = ity
        a[i, 1], a[i, 3] = _ip(src), _ip(dst)
        ts[i] = 1_700_000_000_000_000_000 + t * 1_000_000      # 1 ms apart
        ifx[i] = ifi
    return build_frames(f, a, ts, ifx)


def demo_batches(batch_size: int, names=None):
    """The demo trace cut into batches (interface ids follow configs/demo.toml)."""
    b = demo_batch()
    for s in range(0, len(b), batch_size):
        e = min(len(b), s + batch_size)
        yield PacketBatch(b.buf, b.off[s:e], b.length[s:e], b.ifindex[s:e], b.ts[s:e])
