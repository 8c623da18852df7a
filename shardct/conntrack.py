# The embeddable engine: ConnTrack = parse + hash + track kernels over one table, with
# lookup, iteration, events, statistics and the reaper. Pure: time and seed come in.
"""Library entry point.

>>> ct = ConnTrack(Config(), seed=0x1234, clock=ManualClock())
>>> result = ct.process(batch)          # verdicts and matched conns, one per frame
>>> ct.lookup("10.0.0.1", "10.0.0.2", 1234, 80, "tcp")
>>> for conn in ct.conns(): ...
>>> ct.events(), ct.stats()

Time: ``process(batch)`` uses the batch's own timestamps (replay) unless ``now`` is given
or the engine has a ``clock`` (a callable returning ns), which then stamps every packet
of the batch. The reaper takes ``now`` explicitly.

Owner: one thread. Nothing here blocks, sleeps or does I/O.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

from . import frag as F
from . import track as K
from . import wire
from .batch import PacketBatch, concat
from .config import Config
from .hashing import addr_words, hash_key, words_addr
from .nat import N_OFFSETS, NatEngine, no_nat_program
from .table import (BYTES0, EXPIRES, IPVER, PKTS0, PROTO, STATE, S_ASSURED, S_CONFIRMED,
                    S_DST_NAT, S_SEEN_REPLY, S_SRC_NAT, S_USED, T_EVN, ConnTable)
from .tcpstate import TcpState

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58}
PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
STATUS_NAMES = ((S_SEEN_REPLY, "SEEN_REPLY"), (S_ASSURED, "ASSURED"), (S_CONFIRMED, "CONFIRMED"),
                (S_SRC_NAT, "SRC_NAT"), (S_DST_NAT, "DST_NAT"))

CHUNK = 4096        # packets parsed and tracked together (frames and rows stay in cache)
REAP_MIN_INTERVAL = 10_000_000          # 10 ms
REAP_MAX_INTERVAL = 468_750_000         # 60 s / 128
REAP_FRACTION = 128
REAP_DELAY = 5_000_000_000             # gVisor reaperDelay: the first run's "previous interval"


class ManualClock:
    """A clock for tests: ``now()`` returns ns; ``advance(seconds)`` moves it."""

    def __init__(self, start_ns: int = 0):
        self.t = int(start_ns)

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float = 0, ns: int = 0) -> int:
        self.t += int(seconds * 1_000_000_000) + int(ns)
        return self.t


class Tuple(NamedTuple):
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int      # ICMP query: ident for a request, key (wire.icmp_query) for a reply
    dport: int      # ICMP query: key for a request, ident for a reply (echo's key is 0)
    proto: int

    def reply(self) -> "Tuple":
        return Tuple(self.dst, self.src, self.dport, self.sport, self.proto)


@dataclass(frozen=True)
class Conn:
    """A snapshot of one conn (a copy: the table keeps changing)."""
    id: int
    original: Tuple
    reply: Tuple
    proto: int
    state: str | None        # TCP state name, None for other protocols
    status: frozenset
    expires: int             # ns, absolute
    packets: tuple[int, int]  # original, reply
    bytes: tuple[int, int]

    def timeout(self, now: int) -> int:
        """Seconds left, as conntrack -L prints them."""
        return max(0, (self.expires - now) // 1_000_000_000)


@dataclass(frozen=True)
class Event:
    kind: str                # NEW, UPDATE, DESTROY
    conn: Conn
    time: int


@dataclass
class Result:
    """Per-frame outcome of ``process``: ``verdict[i]`` (track.V_*), ``tuple_id[i]``
    (2*conn + direction, -1 when no conn) and ``forward[i]``: whether frame i leaves,
    with the engine's ``Config.drop_invalid`` applied (``forward_mask``), and in router
    mode without frames over their egress MTU (dropped: verdict V_DROP) or UDP and TCP
    for the router's own addresses without ``Config.local_delivery`` (answered here:
    kept home). ``generated``: frames the engine originates for this batch (router mode:
    ICMP time-exceeded, frag-needed / packet-too-big, port unreachable; TCP RSTs; see
    icmp.py), each with the interface to leave by in ``ifindex``; None when none.
    ``generated_by[j]``: the index in the batch of the frame generated frame j answers
    (ascending; an error goes out right after the place of the frame it answers).
    ``fragments``: frames that leave *in place of* frames of the batch (frag.py: a
    reassembled datagram re-fragmented, or an IPv4 packet cut to its egress MTU), NATed,
    each with its source frame's ingress ``ifindex``, to be routed like forwarded frames;
    ``fragment_of[k]`` is the frame fragment k replaces (whose ``forward`` is False).
    A fragment held for reassembly has verdict V_QUEUED (no error answers it); the frame
    that completes a datagram has the datagram's verdict, tuple_id, meta and addr, and an
    error answering the datagram names that frame in ``generated_by``."""
    verdict: np.ndarray
    tuple_id: np.ndarray
    meta: np.ndarray
    addr: np.ndarray
    forward: np.ndarray | None = None
    generated: PacketBatch | None = None
    generated_by: np.ndarray | None = None
    fragments: PacketBatch | None = None
    fragment_of: np.ndarray | None = None

    def forward_mask(self, drop_invalid: bool | None = None) -> np.ndarray:
        """``forward``; or, given ``drop_invalid``, the mask under that setting."""
        if drop_invalid is None and self.forward is not None:
            return self.forward
        return forward_mask(self.verdict, bool(drop_invalid))


def forward_mask(verdict: np.ndarray, drop_invalid: bool) -> np.ndarray:
    """Which frames leave: all but DROP and QUEUED (held for reassembly), and but INVALID
    when ``drop_invalid``."""
    keep = (verdict != K.V_DROP) & (verdict != K.V_QUEUED)
    if drop_invalid:
        keep &= verdict != K.V_INVALID
    return keep


def _addr(a) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return a if isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(a)


def _part(batch: PacketBatch, s: int, e: int) -> PacketBatch:
    """Frames s..e of ``batch``, a view on its buffer and arrays."""
    return PacketBatch(batch.buf, batch.off[s:e], batch.length[s:e], batch.ifindex[s:e],
                       batch.ts[s:e], batch.shared)


class ConnTrack:
    """Connection tracking for one table (one process, one shard)."""

    def __init__(self, config: Config | None = None, *, seed: int,
                 clock: Callable[[], int] | None = None, rules=None, network=None,
                 rng: np.random.Generator | None = None, router: bool = False,
                 shard: tuple[int, int] = (0, 1), owned: tuple[int, int] | None = None,
                 compiled_nat: bool = True):
        """rules: a parsed nat RuleSet (rules.py) or None; network: a netconf.Network
        (interfaces, routes) for routing, MASQUERADE and REDIRECT; rng: randomness for NAT
        port search (a numpy Generator; derived from ``seed`` when omitted); router: act as
        a router receiving the frames: drop broken IP headers, trim bytes past the IP
        datagram (``batch.length`` shrinks), and, with ``config.decrement_ttl``, take
        the hop (TTL / hop limit; TTL <= 1 is dropped) of forwarded packets only: a
        frame with no ingress interface (``ifindex`` -1) is locally generated. With a
        network and ``config.icmp_errors`` a router also answers as Linux does (icmp.py):
        time-exceeded, frag-needed / packet-too-big over the egress interface's MTU, and,
        unless ``config.local_delivery`` says a host stack answers for the router's own
        addresses, port unreachable for UDP and a RST for TCP sent to them.
        With rules or a network, every new conn goes through the NAT decision (null
        bindings included), as Linux does once the nat table exists: in the tracking
        kernel (nat.nat_decide), or with ``compiled_nat=False`` always in Python
        (NatEngine.decide; the same bindings, slower).
        shard: (k, n) when this table is worker k of n (it owns bucket slice k); with
        ``config.shard_affine_nat`` SNAT/MASQUERADE then prefer ports whose reply tuple
        hashes into that slice. owned: the routing buckets [lo, hi) this table owns in a
        sharded pool (shard.py); packets then may get the pool verdicts V_PARK, V_HANDOFF
        and V_BOUNCE. Default: every bucket."""
        self.config = config or Config()
        self.clock = clock
        c = self.config
        self.table = ConnTable(c.max_conns, c.n_buckets, seed)
        self.cfg = np.zeros(K.N_CFG, dtype=np.int64)
        self.cfg[K.CF_BE_LIBERAL] = int(c.tcp_be_liberal)
        self.cfg[K.CF_LOOSE] = int(c.tcp_loose)
        self.cfg[K.CF_MAX_CONNS] = c.max_conns
        self.cfg[K.CF_EVENTS] = int(c.events)
        self.cfg[K.CF_IGNORE_INVALID_RST] = int(c.tcp_ignore_invalid_rst)
        self.cfg[K.CF_MAX_RETRANS] = int(c.tcp_max_retrans)
        lo, hi = owned if owned is not None else (0, c.n_buckets)
        self.cfg[K.CF_SHARD_LO] = lo
        self.cfg[K.CF_SHARD_HI] = hi
        self._sharded = owned is not None
        self.tmo = c.timeouts.to_array()
        self.stats_arr = np.zeros(K.N_STATS, dtype=np.int64)
        self.ev = np.zeros((c.event_buffer, K.N_EV), dtype=np.int64)
        self.evaddr = np.zeros((c.event_buffer, 8), dtype=np.uint64)
        self.reap_interval = REAP_DELAY
        t = self.table
        self._cap = 0           # scratch arrays (see _scratch), grown on first use
        self._seed = t.seed
        self.cfg[K.CF_ROUTER] = (K.RT_CHECK | (K.RT_TTL if c.decrement_ttl else 0)) if router else 0
        self.nat = None
        natp = no_nat_program()
        if rules is not None or network is not None:
            k, n = shard
            affine = None
            if self.config.shard_affine_nat:
                from .hashing import owner_slices
                affine = owner_slices(n, self.config.n_buckets)[k]
            self.nat = NatEngine(self, rules, network,
                                 rng if rng is not None else np.random.default_rng(seed), affine)
            natp = self.nat.program
            self.cfg[K.CF_NAT] = K.NAT_COMPILED if compiled_nat else K.NAT_PYTHON
        self.network = network
        # the router's own addresses: a frame for them is delivered, it takes no hop
        prog = network.compiled() if network is not None else None
        self._local = prog.local if prog is not None else np.zeros((0, 2), dtype=np.uint64)
        self._lver = prog.lver if prog is not None else np.zeros(0, dtype=np.int64)
        self._defrag = F.Defrag(c, seed) if c.defrag else None
        self._frag_out = F.Output(network, router, seed)
        self._icmp = None
        if router and network is not None and c.icmp_errors:
            from .icmp import IcmpErrors
            self._icmp = IcmpErrors(network, c, seed)
        # track_batch's table and engine arguments, gathered once (they are never replaced)
        self._track_args = (t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8, t.cstatus,
                            t.tbl, self.stats_arr, self.cfg, self.tmo, self.ev, self.evaddr,
                            natp)

    # ------------------------------------------------------------ packets
    def _scratch(self, n):
        """Per-batch work arrays, reused across calls (grown when needed)."""
        if self._cap < n:
            cap = max(n, 256)
            self._meta, self._addr = wire.new_meta(cap)
            self._hashes = np.empty(cap, dtype=np.int64)
            self._given = np.full(cap, -1, dtype=np.int64)
            self._ts = np.empty(cap, dtype=np.int64)
            self._cap = cap
        return self._meta[:n], self._addr[:n], self._hashes[:n]

    def parse(self, batch: PacketBatch):
        """(meta, addr, hashes) of a batch: fresh arrays (wire.parse_hash_batch)."""
        n = len(batch)
        meta, addr = wire.new_meta(n)
        hashes = np.empty(n, dtype=np.int64)
        wire.parse_hash_batch(batch.buf, batch.off, batch.length, meta, addr,
                              self.config.checksum, self.table.seed, hashes)
        return meta, addr, hashes

    def process(self, batch: PacketBatch, now: int | None = None) -> Result:
        """Track every frame of ``batch`` in order. Frames of NATed conns (and, in router
        mode, every forwarded IP frame's TTL) are rewritten in place in ``batch.buf``;
        in router mode a frame longer than its IP datagram is trimmed (``batch.length``).

        The Result's ``verdict``, ``tuple_id`` and ``forward`` are fresh arrays; its
        ``meta`` and ``addr`` are this engine's scratch space, valid until the next call."""
        buf = batch.buf
        n = batch.off.shape[0]
        if not buf.flags.writeable:
            raise ValueError("batch.buf is read-only: NAT and router mode rewrite frames in place")
        if now is None and self.clock is not None:
            now = self.clock()
        if self._cap < n:
            self._scratch(n)
        meta, addr, hashes = self._meta[:n], self._addr[:n], self._hashes[:n]
        if now is None:
            ts = batch.ts
        else:
            ts = self._ts[:n]
            ts.fill(now)
        # the Result's arrays are the kernel's outputs: fresh ones, no copies
        verdict = np.empty(n, dtype=np.uint8)
        tid = np.empty(n, dtype=np.int64)
        d = None
        defrag = self._defrag is not None and n > 0
        if defrag:
            self._defrag.expire(int(ts[0]))
        # frames are tracked as they are parsed until a chunk may hold a fragment (the
        # parser sees it: no pass over the frames of its own); from there on defrag
        # takes them first (most batches hold none: s == n)
        s = self.parse_run(batch, meta, addr, hashes, ts, verdict, tid, self._given[:n],
                           self.config.checksum, parse_hash=True, until_fragment=defrag)
        fwd = np.empty(n, dtype=np.bool_)
        fwd[:s] = forward_mask(verdict[:s], self.config.drop_invalid)
        head = batch if s == n else _part(batch, 0, s)
        gen, by = self.generate(head, meta[:s], verdict[:s], fwd[:s], tid[:s], ts[:s])
        if s < n:
            rest = _part(batch, s, n)
            d = self._defrag.run(rest, ts[s:])
        if d is not None:       # fragments: held, or reassembled and tracked in place
            fwd[s:], g2, by2 = F.track_defragged(self, rest, d, meta[s:], addr[s:],
                                                 hashes[s:], ts[s:], verdict[s:], tid[s:],
                                                 K.V_QUEUED)
            if g2 is not None:
                gen = g2 if gen is None else concat([gen, g2])
                by = by2 + s if by is None else np.concatenate([by, by2 + s])
            d = (None, d[1] + s, d[2], d[3])
        elif s < n:             # screened, but defrag took none: track them as they are
            self.parse_run(rest, meta[s:], addr[s:], hashes[s:], ts[s:], verdict[s:],
                           tid[s:], self._given[s:n], self.config.checksum, parse_hash=True)
            fwd[s:] = forward_mask(verdict[s:], self.config.drop_invalid)
            g2, by2 = self.generate(rest, meta[s:], verdict[s:], fwd[s:], tid[s:], ts[s:])
            if g2 is not None:
                gen = g2 if gen is None else concat([gen, g2])
                by = by2 + s if by is None else np.concatenate([by, by2 + s])
        frags, frag_of = self._frag_out(batch, meta, fwd, d)
        return Result(verdict, tid, meta, addr, fwd, gen, by, frags, frag_of)

    def generate(self, batch: PacketBatch, meta, verdict, fwd, tid, ts, size=None):
        """(frames, causes): the frames the engine originates for a batch just tracked
        (router mode: its ICMP errors and RSTs; ``meta``, ``verdict``, ``tid``, ``ts``:
        that run's, ``fwd`` its forward mask; frames it drops or keeps home are marked in
        ``verdict`` and ``fwd``) and, for each, the index of the frame it answers; (None,
        None) when none. Both ``process`` and a pool's shard (shard.py) call this after
        the tracking kernel. A conn whose only packet the router dropped (TTL, MTU) is
        withdrawn; RSTs and echo replies are tracked as locally generated packets (in a
        shard, at the conn's home, where the packet they answer got its verdict). ``size``: the
        IP length each frame is held to its egress MTU by (frag.py gives a reassembled
        datagram its largest fragment's, as Linux's frag_max_size); None: the frames' own."""
        # dropped by the router (TTL run out, over the MTU) before POSTROUTING, where Linux
        # confirms: a conn such a packet created is gone (in a shard a cross-shard one goes
        # to the dying list: its reply entry is released like any destroyed conn's)
        t = self.table
        expired = None
        if self.cfg[K.CF_ROUTER] & K.RT_TTL and len(verdict):
            expired = np.flatnonzero((verdict == K.V_DROP)
                                     & (meta[:, wire.M_REASON] == wire.HOP_EXPIRED))
            if len(expired):
                K.withdraw_new(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8,
                               t.cstatus, t.tbl, self.stats_arr, self.cfg, self.ev,
                               self.evaddr, tid, expired, ts)
        if self._icmp is None:
            return None, None
        got = self._icmp.generate(batch, meta, verdict, fwd, tid, ts, self.table, K.V_DROP,
                                  K.V_ACCEPT, size)
        if self._icmp.too_big is not None:
            K.withdraw_new(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8, t.cstatus,
                           t.tbl, self.stats_arr, self.cfg, self.ev, self.evaddr, tid,
                           self._icmp.too_big, ts)
        if got is None:
            return None, None
        if self._icmp.tracked is not None:
            rows = self._icmp.tracked
            # a shard checks the answered packet's conn in the other direction instead
            # of looking the RST up: its reply tuple may be linked in another shard
            given = None if not self._sharded else tid[got[1][rows]] ^ 1
            self._track_local(got[0], rows, given)
        return got

    def _track_local(self, gen: PacketBatch, rows: np.ndarray, given=None):
        """Track frames ``rows`` of ``gen`` as locally generated (no ingress interface:
        no hop taken), as conntrack sees the router's own RSTs and echo replies on
        OUTPUT: their conn's state moves, NAT rewrites them in ``gen.buf``. Their verdicts are not kept (the
        router sends them whatever conntrack says, as Linux without a filter does).
        ``given``: their tuple ids when known (track.track_batch; they are counted here
        as the fresh packets they are), else they are looked up."""
        n = len(rows)
        part = PacketBatch(gen.buf, gen.off[rows], gen.length[rows],
                           np.full(n, -1, dtype=np.int16), gen.ts[rows])
        meta, addr = wire.new_meta(n)
        if given is None:
            given = np.full(n, K.G_FRESH, dtype=np.int64)
        else:
            self.stats_arr[K.ST_PACKETS] += n
        self.parse_run(part, meta, addr, np.empty(n, dtype=np.int64), part.ts,
                       np.empty(n, dtype=np.uint8), np.empty(n, dtype=np.int64),
                       np.asarray(given, dtype=np.int64), self.config.checksum, parse_hash=True)

    def parse_run(self, batch, meta, addr, hashes, ts, verdict, tid, given, validate: bool,
                  parse_hash: bool, until_fragment: bool = False) -> int:
        """Parse (and hash, when ``parse_hash``; else ``hashes`` are given) and ``run``,
        CHUNK packets at a time: a chunk's frame headers and rows are still in cache when
        the kernel reads them and NAT rewrites the frames (one pass over a batch of 64k
        frames each would find them evicted). Same arrays and result as parsing the whole
        batch, then running it. ``until_fragment``: stop before tracking the first chunk
        that may hold a fragment for defrag (wire.may_be_fragment) and return where it
        starts; returns len(batch) when every frame was tracked."""
        n = batch.off.shape[0]
        for s in range(0, max(n, 1), CHUNK):
            e = min(n, s + CHUNK)
            part = batch if e - s == n else _part(batch, s, e)
            if parse_hash:
                wire.parse_hash_batch(part.buf, part.off, part.length, meta[s:e], addr[s:e],
                                      validate, self._seed, hashes[s:e])
            else:
                wire.parse_batch(part.buf, part.off, part.length, meta[s:e], addr[s:e],
                                 validate)
            if until_fragment and wire.may_be_fragment(meta[s:e]):
                return s
            self.run(part, meta[s:e], addr[s:e], hashes[s:e], ts[s:e], verdict[s:e],
                     tid[s:e], given[s:e])
        return n

    def run(self, batch, meta, addr, hashes, ts, verdict, tid, given):
        """Track a parsed batch in order (the kernel, stopping for the NAT slow path
        where it must). ``given``: see track.track_batch. Writes verdict and tid."""
        n = batch.off.shape[0]
        buf, off, length, ifx = batch.buf, batch.off, batch.length, batch.ifindex
        self._batch = batch
        args = self._track_args
        rand = self.nat.rand if self.nat is not None else None
        if rand is not None:
            rand.ensure(2 * N_OFFSETS * n)     # enough for every packet's two searches
        i = K.track_batch(buf, off, meta, addr, hashes, length, ifx, ts, verdict, tid, given,
                          *args, 0, False)
        while i < n:
            j = self._slow_path(i, meta, addr, hashes, ts, verdict, tid)
            if j < n:
                rand.ensure(2 * N_OFFSETS * (n - j))
                i = K.track_batch(buf, off, meta, addr, hashes, length, ifx, ts, verdict, tid,
                                  given, *args, j, j == i)
            else:
                i = j
        if self.cfg[K.CF_ROUTER] & K.RT_TTL:
            K.take_hops(buf, off, ifx, meta, verdict, self._local, self._lver, self.stats_arr)

    def _slow_path(self, i, meta, addr, hashes, ts, verdict, tid) -> int:
        """Packet i starts a conn whose NAT decision the kernel left to Python: decide the
        bindings (nat.py), create and confirm the conn, and hand the packet back to the
        kernel (returns i), or drop it (returns i + 1)."""
        if self.nat is None:
            raise AssertionError(f"kernel stopped at packet {i} with NAT off")
        now = int(ts[i])
        ifx = int(self._batch.ifindex[i])
        in_if = self.network.name(ifx) if self.network is not None else None
        dec = self.nat.decide(now, meta[i], addr[i], in_if)
        st = self.stats_arr
        if dec is None:
            verdict[i] = K.V_DROP
            st[K.ST_NAT_FAILED] += 1
            st[K.ST_DROP] += 1
            return i + 1
        (s, d, ports, proto, ver), (ns, nd, nports, _, _) = dec
        rports = ((nports & 0xFFFF) << 16) | (nports >> 16)
        t = self.table
        u = np.uint64
        c = K.create_conn(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8, t.cstatus, t.tbl,
                          st, self.cfg, self.ev, self.evaddr, int(hashes[i]),
                          u(s[0]), u(s[1]), u(d[0]), u(d[1]), ports,
                          u(nd[0]), u(nd[1]), u(ns[0]), u(ns[1]), rports, proto, ver, now,
                          False)
        if c < 0:
            verdict[i] = K.V_DROP
            st[K.ST_DROP] += 1
            return i + 1
        K.init_proto(t.c32, t.c8, c, meta, i, now)
        return i

    def route(self, batch: PacketBatch, result: Result | None = None):
        """Routing of each frame of a processed batch (netconf.Routes: egress interface,
        next hop, local delivery), on the destinations NAT gave them. ``result``: the
        last ``process`` result for this batch (its parse is reused). Precondition: the
        engine has a network."""
        if self.network is None:
            raise ValueError("route: this engine has no network (interfaces and routes)")
        return self.network.route_batch(batch, None if result is None else result.meta)

    def original_dst(self, src, dst, sport, dport, proto, now: int | None = None):
        """SO_ORIGINAL_DST: for a packet seen after DNAT/REDIRECT in the original
        direction (src -> dst), the destination (address, port) before NAT; None when no
        conn has such a reply tuple (ENOTCONN)."""
        hit = self.lookup(dst, src, dport, sport, proto, now)
        if hit is None or hit[1] != 1:
            return None
        o = hit[0].original
        return o.dst, o.dport

    # ------------------------------------------------------------ queries
    def _key(self, src, dst, sport, dport, proto):
        src, dst = _addr(src), _addr(dst)
        if src.version != dst.version:
            raise ValueError(f"mixed address families: {src}, {dst}")
        p = PROTO_NUMBERS.get(proto, proto) if isinstance(proto, str) else int(proto)
        s_hi, s_lo = addr_words(src.packed)
        d_hi, d_lo = addr_words(dst.packed)
        return (np.uint64(s_hi), np.uint64(s_lo), np.uint64(d_hi), np.uint64(d_lo),
                (int(sport) << 16) | int(dport), p, src.version)

    def find(self, src, dst, sport, dport, proto, now: int | None = None) -> tuple[int, int] | None:
        """(conn id, direction) of a live conn with this tuple, or None."""
        a0, a1, a2, a3, ports, p, ver = self._key(src, dst, sport, dport, proto)
        t = self.table
        h = hash_key(t.seed, a0, a1, a2, a3, ports, p, ver)
        tid = K.find_tuple(t.heads, t.tkey, t.tport, t.tnext, t.c8, t.tbl, h, a0, a1, a2, a3,
                           ports, p, ver)
        if tid < 0:
            return None
        if now is None and self.clock is not None:
            now = self.clock()
        if now is not None and now > t.c64[tid >> 1, EXPIRES]:
            return None
        return int(tid >> 1), int(tid & 1)

    def lookup(self, src, dst, sport, dport, proto, now: int | None = None) -> tuple[Conn, int] | None:
        """(Conn snapshot, direction) for a tuple, or None. Expired conns are skipped."""
        hit = self.find(src, dst, sport, dport, proto, now)
        if hit is None:
            return None
        return self.conn(hit[0]), hit[1]

    def conn(self, c: int) -> Conn:
        t = self.table
        if not t.cstatus[c] & S_USED:
            raise KeyError(f"conn {c} is not allocated")
        return self._snapshot(c, t.tkey[2 * c], t.tkey[2 * c + 1], int(t.tport[2 * c]),
                              int(t.tport[2 * c + 1]), int(t.c8[c, PROTO]), int(t.c8[c, IPVER]),
                              int(t.c8[c, STATE]), int(t.cstatus[c]), int(t.c64[c, EXPIRES]),
                              (int(t.c32[c, PKTS0]), int(t.c32[c, PKTS0 + 1])),
                              (int(t.c64[c, BYTES0]), int(t.c64[c, BYTES0 + 1])))

    @staticmethod
    def _snapshot(c, k0, k1, p0, p1, proto, ver, state, status, expires, pk, by) -> Conn:
        def tup(k, p):
            return Tuple(ipaddress.ip_address(words_addr(int(k[0]), int(k[1]), ver)),
                         ipaddress.ip_address(words_addr(int(k[2]), int(k[3]), ver)),
                         p >> 16, p & 0xFFFF, proto)
        return Conn(int(c), tup(k0, p0), tup(k1, p1), proto,
                    TcpState(state).name if proto == 6 else None,
                    frozenset(name for bit, name in STATUS_NAMES if status & bit),
                    expires, pk, by)

    def conns(self, now: int | None = None) -> Iterator[Conn]:
        """Snapshots of every allocated conn (expired ones too unless ``now`` is given)."""
        t = self.table
        ids = np.empty(t.capacity, dtype=np.int64)
        n = K.collect_conns(t.cstatus, ids)
        for c in ids[:n]:
            if now is not None and now > t.c64[c, EXPIRES]:
                continue
            yield self.conn(int(c))

    def conn_rows(self) -> dict[str, np.ndarray]:
        """Every live conn as arrays (what a worker sends when asked for its table);
        ``conns_from_rows`` turns them back into Conn snapshots."""
        t = self.table
        ids = np.empty(t.capacity, dtype=np.int64)
        c = ids[:K.collect_conns(t.cstatus, ids)]
        return {"id": c, "tkey": np.hstack((t.tkey[2 * c], t.tkey[2 * c + 1])),
                "tport": np.stack((t.tport[2 * c], t.tport[2 * c + 1]), axis=1).astype(np.int64),
                "c8": np.ascontiguousarray(t.c8[c]), "status": t.cstatus[c].astype(np.int64),
                "expires": t.c64[c, EXPIRES].copy(),
                "pkts": t.c32[c, PKTS0:PKTS0 + 2].astype(np.int64),
                "bytes": t.c64[c, BYTES0:BYTES0 + 2].copy()}

    @classmethod
    def conns_from_rows(cls, r: dict) -> list[Conn]:
        out = []
        for i in range(len(r["id"])):
            c8 = r["c8"][i]
            out.append(cls._snapshot(int(r["id"][i]), r["tkey"][i, :4], r["tkey"][i, 4:],
                                     int(r["tport"][i, 0]), int(r["tport"][i, 1]), int(c8[PROTO]),
                                     int(c8[IPVER]), int(c8[STATE]), int(r["status"][i]),
                                     int(r["expires"][i]), tuple(int(x) for x in r["pkts"][i]),
                                     tuple(int(x) for x in r["bytes"][i])))
        return out

    def __len__(self) -> int:
        return self.table.count

    def events(self) -> list[Event]:
        """Drain the events gathered since the last call (oldest first)."""
        t = self.table
        n = int(t.tbl[T_EVN])
        out = self.events_from_rows(self.ev[:n], self.evaddr[:n])
        t.tbl[T_EVN] = 0
        return out

    def event_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Drain the events gathered since the last call as copies of their rows (what a
        worker ships; ``events_from_rows`` makes Events of them)."""
        n = int(self.table.tbl[T_EVN])
        rows = self.ev[:n].copy(), self.evaddr[:n].copy()
        self.table.tbl[T_EVN] = 0
        return rows

    @classmethod
    def events_from_rows(cls, ev: np.ndarray, evaddr: np.ndarray) -> list[Event]:
        out = []
        for k in range(ev.shape[0]):
            e = ev[k]
            a = evaddr[k]
            conn = cls._snapshot(int(e[K.E_CONN]), a[0:4], a[4:8], int(e[K.E_PORTS0]),
                                  int(e[K.E_PORTS1]), int(e[K.E_PROTO]), int(e[K.E_IPVER]),
                                  int(e[K.E_STATE]), int(e[K.E_STATUS]), int(e[K.E_EXPIRES]),
                                  (int(e[K.E_PKTS0]), int(e[K.E_PKTS1])),
                                  (int(e[K.E_BYTES0]), int(e[K.E_BYTES1])))
            out.append(Event(K.EVENT_NAMES[int(e[K.E_TYPE])], conn, int(e[K.E_TIME])))
        return out

    def clear_events(self) -> int:
        """Drop the events gathered since the last call unread (a caller that does not
        watch them); how many there were."""
        n = int(self.table.tbl[T_EVN])
        self.table.tbl[T_EVN] = 0
        return n

    def stats(self) -> dict[str, int]:
        """Counters by name: conntrack -S's names first, then shardct's own, then
        ``invalid.<reason>`` breakdowns; ``entries`` is the live table count."""
        s = {"entries": self.table.count}
        if self.cfg[K.CF_SHARD_LO] != 0 or self.cfg[K.CF_SHARD_HI] != self.config.n_buckets:
            # a shard's table also holds reply entries of conns homed elsewhere
            s["entries"] = K.count_conns(self.table.cstatus)
        for k, name in enumerate(K.STAT_NAMES):
            s[name] = int(self.stats_arr[k])
        for k, name in enumerate(K.INVALID_NAMES):
            s[f"invalid.{name}"] = int(self.stats_arr[K.INV_BASE + k])
        if self._icmp is not None:
            s.update(self._icmp.counters())
        fs = self._frag_out.stats + (0 if self._defrag is None else self._defrag.stats)
        s.update((name, int(v)) for name, v in zip(F.STAT_NAMES, fs))
        return s

    # ------------------------------------------------------------ expiry
    def reap(self, now: int, start: int) -> tuple[int, int]:
        """One bounded reaper run (gVisor reapUnused): walk n_buckets/128 routing buckets
        from ``start``; returns (next_start, next_interval_ns). The interval drops to
        10 ms when over half of the tuples seen had expired (gVisor's integer percentage,
        ``expired * 100 // checked > 50``), else grows by 10 ms up to 468.75 ms. Like
        gVisor's reaper, which starts 5 s (reaperDelay) after the table is made, the
        first run takes 5 s as the previous interval, so unless the table is stale it
        returns 468.75 ms."""
        t = self.table
        nb = self.config.n_buckets
        n_walk = max(1, nb // REAP_FRACTION)
        if self._defrag is not None:
            self._defrag.expire(now)
        nxt, checked, expired = K.reap(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8,
                                       t.cstatus, t.tbl, self.stats_arr, self.cfg, self.ev,
                                       self.evaddr, now, start, n_walk)
        if checked and expired * 100 // checked > 50:
            self.reap_interval = REAP_MIN_INTERVAL
        else:
            self.reap_interval = min(self.reap_interval + REAP_MIN_INTERVAL, REAP_MAX_INTERVAL)
        return int(nxt) % nb, self.reap_interval

    def reap_all(self, now: int) -> int:
        """Walk every bucket once; returns how many conns were destroyed."""
        before = int(self.stats_arr[K.ST_EXPIRED])
        if self._defrag is not None:
            self._defrag.expire(now)
        t = self.table
        K.reap(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8, t.cstatus, t.tbl,
               self.stats_arr, self.cfg, self.ev, self.evaddr, now, 0, self.config.n_buckets)
        return int(self.stats_arr[K.ST_EXPIRED]) - before
