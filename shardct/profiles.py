# Realistic two-way traffic as a NAT router sees it: TCP conns (handshake, request,
# response segments, ACKs, keep-alives, FIN from either side or RST), DNS-like UDP, ping
# series; many LAN clients, few WAN servers, ~N flows open at any moment. Pure: the seed
# argument is the only randomness; frames come from traffic.build_frames.
"""Traffic profiles.

``realistic(n_packets, concurrent)`` gives a :class:`Trace`: the frames arriving at a
router between a LAN (clients 10.0.0.x, ``ifindex`` 0) and a WAN (servers 192.168.0.x,
``ifindex`` 1), in timestamp order, as ``configs/demo.toml`` lays them out. Every flow is
whole (its last packet is in the trace), and its sequence and ACK numbers are those of a
real exchange, so Linux window tracking accepts every packet:

====  =====================================================================
TCP   SYN (window scale 7), SYN/ACK, ACK, a request, 1-7 response segments,
      a client ACK per two segments, sometimes a keep-alive probe (seq - 1)
      and its ACK, then FIN/ACK from the client or the server, the other's
      FIN/ACK and the last ACK (TIME_WAIT); or a RST from the client (CLOSE)
UDP   a query to port 53 and its response
ICMP  2-6 echo requests, each answered
====  =====================================================================

Flows start as a Poisson process whose rate makes ``concurrent`` flows open at a time on
average (Little's law over the flows' own durations); each flow's packets are spaced by
its round-trip times, so flows interleave. ``through_nat`` re-addresses the server's
packets to what a single-process engine with MASQUERADE rules made of the client's
(the WAN side of a NAT router); ``contention`` makes many clients use the same source
port towards the same server, so MASQUERADE must remap.

Source ports (ICMP: idents) are handed out so that no two flows of a trace share a
tuple, nor, unless ``port_share`` > 1, a masqueraded one: flow j of a protocol takes
(server, service port) pair j % S and source port 32768 + (j // S) % 28232, so tuples
repeat only after S * 28232 flows of one protocol.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numba
import numpy as np

from .batch import PacketBatch
from .traffic import (F_ACK, F_DPORT, F_FLAGS, F_ICMPTYPE, F_IPID, F_PAYLEN, F_PROTO, F_SEQ,
                      F_SPORT, F_TTL, F_WIN, F_WSCALE, N_F, _defaults, build_frames)

LAN, WAN = 0, 1                     # ifindex of client->server and server->client frames
TCP, UDP, ICMP = 6, 17, 1
SYN, SYNACK, ACK, PSHACK, FINACK, RSTACK = 0x02, 0x12, 0x10, 0x18, 0x11, 0x14
CLOSE_CLIENT_FIN, CLOSE_SERVER_FIN, CLOSE_CLIENT_RST = 0, 1, 2
EPHEMERAL_LO, EPHEMERAL_N = 32768, 28232        # Linux ip_local_port_range 32768-60999
TCP_PORTS = (443, 80)
DNS_PORT = 53
MS = 1_000_000                                  # ns
START_NS = 1_700_000_000 * 1_000_000_000        # a plausible capture time

# the named profiles of issue 12 (bench/pool.py, the pool invariance tests)
PROFILES = {
    "2k": dict(concurrent=2_000),
    "20k": dict(concurrent=20_000),
}


@dataclass
class Trace:
    """Frames plus what generated them.

    batch   PacketBatch in timestamp order (strictly increasing ns); ifindex 0 = arrived on
            the LAN side (client->server), 1 = on the WAN side (server->client)
    flow    int64[n frames]: the flow of each frame (flows numbered by start time)
    proto   uint8[n flows]: 6, 17 or 1
    first   int64[n flows]: row of each flow's first frame (it opens the conn)
    reply   int64[n flows]: row of each flow's first server frame
    fields, addr: the build_frames rows behind ``batch`` (through_nat edits copies)
    remapped: flows whose source port / ident the NAT engine changed (through_nat)
    """
    batch: PacketBatch
    flow: np.ndarray
    proto: np.ndarray
    first: np.ndarray
    reply: np.ndarray
    fields: np.ndarray
    addr: np.ndarray
    remapped: int = 0

    def __len__(self) -> int:
        return len(self.batch)

    def conns(self) -> dict[str, int]:
        """Flows per protocol: the conns a tracker makes of this trace."""
        return {name: int((self.proto == p).sum()) for name, p in
                (("tcp", TCP), ("udp", UDP), ("icmp", ICMP))}

    def concurrency(self) -> float:
        """Flows open (between their first and last frame) when a frame passes, the
        median over frames: what the trace's steady state holds (the first and last
        flow lifetimes ramp up and down)."""
        ts = self.batch.ts
        last = np.zeros(len(self.proto), dtype=np.int64)
        np.maximum.at(last, self.flow, ts)
        opened = np.searchsorted(np.sort(ts[self.first]), ts, side="right")
        closed = np.searchsorted(np.sort(last), ts, side="left")
        return float(np.median(opened - closed)) if len(ts) else 0.0

    def fresh(self) -> PacketBatch:
        """A copy of the batch (NAT and router mode rewrite frames in place)."""
        b = self.batch
        return PacketBatch(b.buf.copy(), b.off.copy(), b.length.copy(), b.ifindex.copy(),
                           b.ts.copy())


@numba.njit(inline="always", cache=True)
def _row(f, rel, side, i, t, sd, flags, seq, ack, pay, win, ws):
    f[i, F_FLAGS] = flags
    f[i, F_SEQ] = seq & 0xFFFFFFFF
    f[i, F_ACK] = ack & 0xFFFFFFFF
    f[i, F_PAYLEN] = pay
    f[i, F_WIN] = win
    f[i, F_WSCALE] = ws
    rel[i] = t
    side[i] = sd


@numba.njit(cache=True)
def _fill(proto, row0, rtt_w, rtt_l, gap, ser, think, idle, iss, irs, nresp, seglen, reqlen,
          keep, close, qlen, rlen, npings, ping_gap, f, rel, side):
    """Write every flow's frames (flags, numbers, lengths, time since the flow's start,
    side) from row0[k] on. Returns the rows written. Times: the router sees a server
    answer rtt_w after the client's packet passed, a client answer rtt_l after."""
    i = 0
    for k in range(proto.shape[0]):
        i = row0[k]
        w, l = rtt_w[k], rtt_l[k]
        if proto[k] == 6:
            c, s = iss[k], irs[k]
            _row(f, rel, side, i, 0, 0, SYN, c, 0, 0, 64240, 7)
            _row(f, rel, side, i + 1, w, 1, SYNACK, s, c + 1, 0, 65160, 7)
            c += 1
            s += 1
            _row(f, rel, side, i + 2, w + l, 0, ACK, c, s, 0, 502, -1)
            t = w + l + gap[k]
            _row(f, rel, side, i + 3, t, 0, PSHACK, c, s, reqlen[k], 502, -1)
            c += reqlen[k]
            i += 4
            t += w
            r = nresp[k]
            for j in range(r):
                ln = seglen[k, j]
                _row(f, rel, side, i, t + j * ser[k], 1, PSHACK if j == r - 1 else ACK,
                     s, c, ln, 509, -1)
                s += ln
                i += 1
                if j % 2 == 1 or j == r - 1:         # delayed ACK: one per two segments
                    _row(f, rel, side, i, t + j * ser[k] + l, 0, ACK, c, s, 0, 501, -1)
                    i += 1
            t += (r - 1) * ser[k] + l
            if keep[k]:
                t += idle[k]
                _row(f, rel, side, i, t, 0, ACK, c - 1, s, 0, 501, -1)
                _row(f, rel, side, i + 1, t + w, 1, ACK, s, c, 0, 509, -1)
                t += w
                i += 2
            t += think[k]
            if close[k] == CLOSE_CLIENT_FIN:
                _row(f, rel, side, i, t, 0, FINACK, c, s, 0, 501, -1)
                _row(f, rel, side, i + 1, t + w, 1, FINACK, s, c + 1, 0, 509, -1)
                _row(f, rel, side, i + 2, t + w + l, 0, ACK, c + 1, s + 1, 0, 501, -1)
                i += 3
            elif close[k] == CLOSE_SERVER_FIN:
                _row(f, rel, side, i, t, 1, FINACK, s, c, 0, 509, -1)
                _row(f, rel, side, i + 1, t + l, 0, FINACK, c, s + 1, 0, 501, -1)
                _row(f, rel, side, i + 2, t + l + w, 1, ACK, s + 1, c + 1, 0, 509, -1)
                i += 3
            else:
                _row(f, rel, side, i, t, 0, RSTACK, c, s, 0, 0, -1)
                i += 1
        elif proto[k] == 17:
            _row(f, rel, side, i, 0, 0, 0, 0, 0, qlen[k], 0, -1)
            _row(f, rel, side, i + 1, w, 1, 0, 0, 0, rlen[k], 0, -1)
            i += 2
        else:
            for p in range(npings[k]):
                _row(f, rel, side, i, p * ping_gap, 0, 0, p + 1, 0, 56, 0, -1)
                f[i, F_ICMPTYPE] = 8
                _row(f, rel, side, i + 1, p * ping_gap + w, 1, 0, p + 1, 0, 56, 0, -1)
                f[i + 1, F_ICMPTYPE] = 0
                i += 2
    return i


@numba.njit(cache=True)
def _nat_cuts(opens_reply, cap):
    """Chunk starts for through_nat: a chunk never holds the server's first frame of a
    flow that the same chunk opens (its address is known only once the opening frame
    went through the engine). opens_reply[j]: row of the first server frame of the flow
    frame j opens, or a huge value when frame j opens nothing."""
    n = opens_reply.shape[0]
    cuts = [0]
    s = 0
    m = np.int64(1) << 62
    for j in range(n):
        if m <= j or j - s >= cap:
            cuts.append(j)
            s = j
            m = np.int64(1) << 62
        if opens_reply[j] < m:
            m = opens_reply[j]
    cuts.append(n)
    return cuts


def _ip(s: str) -> int:
    a = ipaddress.ip_address(s)
    if a.version != 4:
        raise ValueError(f"{s}: profiles are IPv4 only")
    return int(a)


def _endpoints(j, share, n_pairs, n_clients, rng):
    """Client index, (server, port) pair index and source port of the j-th flow of one
    protocol: groups of ``share`` flows (distinct clients) use one source port towards
    one pair; group g takes pair g % n_pairs and port 32768 + (g // n_pairs) % 28232."""
    g, m = j // share, j % share
    base = rng.integers(0, n_clients, int(g.max()) + 1 if len(g) else 0)
    client = (base[g] + m) % n_clients
    pair = g % n_pairs
    sport = EPHEMERAL_LO + (g // n_pairs) % EPHEMERAL_N
    return client, pair, sport


def realistic(n_packets: int, concurrent: int = 2000, *, seed: int = 0, n_flows: int | None = None,
              mix=(0.7, 0.25, 0.05), n_clients: int = 250, client_base: str = "10.0.0.2",
              n_servers: int = 8, server_base: str = "192.168.0.10", n_dns: int = 2,
              dns_base: str = "192.168.0.53", port_share: int = 1, keepalive: float = 0.2,
              server_close: float = 0.4, reset: float = 0.05, mss: int = 1448,
              rtt_ms: float = 20.0, think_ms: float = 50.0, ping_gap_ms: float = 200.0,
              start_ns: int = START_NS) -> Trace:
    """A trace of whole flows, at most ``n_packets`` frames (flows are added in start
    order while they fit), or exactly ``n_flows`` flows when given.

    concurrent: flows open at a time on average once the trace is under way (it ramps
    up over the first flow lifetime: ask for many more packets than ~12 x concurrent
    for a steady state). mix: shares of TCP, UDP and ICMP among flows. Clients are
    ``n_clients`` addresses from ``client_base`` (keep them in 10.0.0.0/24 for the demo
    rules); TCP goes to ``n_servers`` addresses from ``server_base`` on ports 443 and
    80, UDP to ``n_dns`` addresses from ``dns_base`` on 53, pings to the TCP servers.
    port_share: flows (from distinct clients) that share one source port towards one
    server and port (1: none; more: MASQUERADE contention, see ``contention``).
    keepalive, server_close, reset: shares of TCP flows with a keep-alive probe, closed
    by the server first, and ended by the client's RST instead of FINs. Round trips:
    WAN side lognormal around ``rtt_ms``, LAN side 0.1-2 ms."""
    if not 1 <= port_share <= n_clients:
        raise ValueError(f"port_share {port_share}: want 1..n_clients ({n_clients})")
    if reset + server_close > 1:
        raise ValueError(f"reset {reset} + server_close {server_close} > 1")
    rng = np.random.default_rng(seed)
    m = n_flows if n_flows is not None else n_packets // 2 + 1     # every flow has >= 2
    p = np.asarray(mix, dtype=np.float64)
    proto = np.array([TCP, UDP, ICMP], np.uint8)[rng.choice(3, size=m, p=p / p.sum())]
    rtt_w = np.clip(rng.lognormal(np.log(rtt_ms * MS), 0.7, m), MS // 2, 20 * rtt_ms * MS)
    rtt_l = rng.integers(100_000, 2 * MS, m)
    gap = rng.integers(5_000, 200_000, m)                # client's request after its ACK
    ser = rng.integers(12_000, 30_000, m)                # between back-to-back segments
    think = rng.exponential(think_ms * MS, m).astype(np.int64) + 1
    idle = rng.exponential(5 * think_ms * MS, m).astype(np.int64) + 1
    iss = rng.integers(0, 2**32, m)
    irs = rng.integers(0, 2**32, m)
    nresp = rng.integers(1, 8, m)
    seglen = np.full((m, 7), mss, np.int64)
    seglen[np.arange(m), nresp - 1] = rng.integers(1, mss + 1, m)
    reqlen = rng.integers(80, 700, m)
    keep = rng.random(m) < keepalive
    u = rng.random(m)
    close = np.where(u < reset, CLOSE_CLIENT_RST,
                     np.where(u < reset + server_close, CLOSE_SERVER_FIN, CLOSE_CLIENT_FIN))
    qlen = rng.integers(20, 60, m)
    rlen = rng.integers(40, 400, m)
    npings = rng.integers(2, 7, m)
    count = np.where(proto == TCP, 4 + nresp + (nresp + 1) // 2 + 2 * keep
                     + np.where(close == CLOSE_CLIENT_RST, 1, 3),
                     np.where(proto == UDP, 2, 2 * npings)).astype(np.int64)
    if n_flows is None:
        m = int(np.searchsorted(np.cumsum(count), n_packets, side="right"))
    proto, count = proto[:m], count[:m]
    row0 = np.zeros(m, np.int64)
    np.cumsum(count[:-1], out=row0[1:])
    n = int(count.sum())
    f = np.zeros((n, N_F), np.int64)
    _defaults(f, 4, 0)
    rel = np.zeros(n, np.int64)
    side = np.zeros(n, np.int8)
    got = _fill(proto, row0, rtt_w[:m].astype(np.int64), rtt_l[:m], gap[:m], ser[:m], think[:m],
                idle[:m], iss[:m], irs[:m], nresp[:m], seglen[:m], reqlen[:m], keep[:m],
                close[:m], qlen[:m], rlen[:m], npings[:m], int(ping_gap_ms * MS), f, rel, side)
    assert got == n, f"got {got} rows, want {n}"
    flow = np.repeat(np.arange(m, dtype=np.int64), count)
    f[:, F_PROTO] = proto[flow]

    # endpoints per flow: client, server address, ports (ICMP: ident in F_SPORT both ways)
    cl, sv = np.zeros(m, np.int64), np.zeros(m, np.int64)
    cport, sport = np.zeros(m, np.int64), np.zeros(m, np.int64)
    for pr, pairs, nsv, ports, sbase in ((TCP, 2 * n_servers, n_servers, TCP_PORTS, server_base),
                                         (UDP, n_dns, n_dns, (DNS_PORT,), dns_base),
                                         (ICMP, n_servers, n_servers, (0,), server_base)):
        k = np.flatnonzero(proto == pr)
        c, pair, sp = _endpoints(np.arange(len(k)), port_share, pairs, n_clients, rng)
        cl[k] = _ip(client_base) + c
        sv[k] = _ip(sbase) + pair % nsv
        cport[k] = sp
        sport[k] = np.asarray(ports)[pair // nsv]
    down = side[:, None] == 1
    cli = np.stack([np.zeros(n, np.uint64), cl[flow].astype(np.uint64)], axis=1)
    srv = np.stack([np.zeros(n, np.uint64), sv[flow].astype(np.uint64)], axis=1)
    addr = np.where(down, np.hstack([srv, cli]), np.hstack([cli, srv]))
    icmp = proto[flow] == ICMP
    f[:, F_SPORT] = np.where(icmp | (side == 0), cport[flow], sport[flow])
    f[:, F_DPORT] = np.where(icmp, 0, np.where(side == 0, sport[flow], cport[flow]))
    f[:, F_TTL] = np.where(side == 0, 64, 52)
    f[:, F_IPID] = rng.integers(0, 65536, n)

    # flow starts: Poisson arrivals at the rate that keeps `concurrent` flows open
    dur = np.zeros(m, np.int64)
    np.maximum.at(dur, flow, rel)
    rate = concurrent / max(1.0, float(dur.mean() + 1))           # flows per ns
    start = start_ns + np.cumsum(rng.exponential(1 / rate, m)).astype(np.int64)
    ts = start[flow] + rel
    order = np.lexsort((np.arange(n), ts))
    ts = ts[order]
    k = np.arange(n, dtype=np.int64)
    ts = np.maximum.accumulate(ts - k) + k          # strictly increasing, order kept
    return _trace(f[order], addr[order], ts, side[order], flow[order], proto)


def _trace(f, addr, ts, side, flow, proto, remapped=0) -> Trace:
    n, m = len(flow), len(proto)
    rows = np.arange(n, dtype=np.int64)
    first = np.full(m, n, np.int64)
    np.minimum.at(first, flow, rows)
    reply = np.full(m, n, np.int64)
    down = side == 1
    np.minimum.at(reply, flow[down], rows[down])
    batch = build_frames(f, addr, ts, side.astype(np.int16))
    return Trace(batch, flow, proto, first, reply, f, addr, remapped)


def contention(n_packets: int, concurrent: int = 2000, *, share: int = 16, n_servers: int = 2,
               **kw) -> Trace:
    """``realistic`` with groups of ``share`` clients using the same source port towards
    the same server and port: behind MASQUERADE (one address) all but one of each
    group must be remapped. Without NAT the tuples stay distinct."""
    return realistic(n_packets, concurrent, port_share=share, n_servers=n_servers, **kw)


def profile(name: str, n_packets: int, *, seed: int = 0, **kw) -> Trace:
    """A named profile (``PROFILES``: "2k", "20k") of about ``n_packets`` frames."""
    try:
        params = PROFILES[name]
    except KeyError:
        raise ValueError(f"profile {name!r}: want one of {', '.join(PROFILES)}") from None
    return realistic(n_packets, seed=seed, **{**params, **kw})


def through_nat(trace: Trace, config=None, *, seed: int, rules=None, network=None, rng=None,
                router: bool = False, chunk: int = 65536) -> Trace:
    """The trace as a NAT router sees it when its rules rewrite the client's packets:
    every server frame is addressed to the address and port (ICMP: ident) that a
    single-process ``ConnTrack(config, seed=seed, rules=rules, network=network,
    rng=rng, router=router)`` gave the flow's first packet. Client frames are unchanged.

    The engine runs the final frames in order, in chunks that never hold a flow's
    opening frame together with its first server frame, so its choices are those a
    replay with the same arguments makes (under port contention other seeds, shard
    counts or shard-affine NAT may choose other ports). ``remapped`` counts the flows
    whose source port or ident moved. Frames the engine drops (no NAT binding) keep
    their original addresses."""
    from .conntrack import ConnTrack
    ct = ConnTrack(config, seed=seed, rules=rules, network=network, rng=rng, router=router)
    f, addr = trace.fields.copy(), trace.addr.copy()
    b, flow = trace.batch, trace.flow
    n = len(b)
    opens_reply = np.full(n, np.int64(1) << 62, np.int64)
    opens_reply[trace.first] = trace.reply
    down = b.ifindex == WAN
    icmp_row = trace.proto[flow] == ICMP
    m = len(trace.proto)
    to_addr = np.zeros((m, 2), np.uint64)
    to_port = np.full(m, -1, np.int64)
    t = ct.table
    cuts = np.asarray(_nat_cuts(opens_reply, chunk))
    for s, e in zip(cuts[:-1], cuts[1:]):
        if s == e:
            continue
        rows = s + np.flatnonzero(down[s:e])
        fl = flow[rows]
        ok = to_port[fl] >= 0
        rows, fl = rows[ok], fl[ok]
        addr[rows, 2:4] = to_addr[fl]
        col = np.where(icmp_row[rows], F_SPORT, F_DPORT)
        f[rows, col] = to_port[fl]
        r = ct.process(build_frames(f[s:e], addr[s:e], b.ts[s:e], b.ifindex[s:e]))
        opened = np.flatnonzero(opens_reply[s:e] < n)
        tid = r.tuple_id[opened]
        keep = tid >= 0
        c = tid[keep] >> 1
        fo = flow[s + opened[keep]]
        to_addr[fo] = t.tkey[2 * c + 1][:, 2:4]
        to_port[fo] = t.tport[2 * c + 1].astype(np.int64) & 0xFFFF
    orig = trace.fields[trace.first, F_SPORT]       # the client's port or ident
    remapped = int(((to_port >= 0) & (to_port != orig)).sum())
    return _trace(f, addr, b.ts, b.ifindex.astype(np.int8), flow, trace.proto, remapped)
