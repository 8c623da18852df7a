# `shardct run`: the engine as an inline NAT router on AF_PACKET. Frames come in on every
# configured interface's RX ring, go through ConnTrack (router mode), are routed, get the
# egress interface's MAC and the next hop's MAC, and leave on the egress interface's TX ring.
"""The live router.

``shardct run -c CONFIG [--workers N] [--duration S] [--seed N]`` forwards between the
interfaces the config names (``[interfaces.NAME]``: the real interface names, their
addresses and MACs; ``[[routes]]``; ``[nat]`` rules) until SIGINT/SIGTERM or the
duration, then prints what it forwarded and dropped (by reason), the ring drops, the
conntrack counters and the table.

Per batch: ``ConnTrack.process`` (defragmentation, NAT rewrite, TTL, drop_invalid; the
fragments it sends in place of reassembled or oversize frames), ``Network.route_batch``
(egress, next hop, local), Ethernet source MAC := the egress interface's MAC, destination
MAC := the next hop's from ``Neighbours`` (the config's ``[neighbours]``, then the
kernel's neighbour table; a next hop with neither is dropped and counted in
``no_neighbour``: shardct does not ARP). The engine's ICMP errors leave by their ingress
interface. Frames for the router's own addresses (after DNAT/REDIRECT) go to the host's
stack through the config's ``[local] tap`` (workers/tap.py; counted in ``delivered``), and
what the host sends on the TAP goes through the engine as locally generated packets
(ingress -1: OUTPUT and POSTROUTING, no TTL decrement); without a TAP they are not
forwarded (``local``), and the engine answers UDP and TCP to them with port unreachable
and RST as a host with no listener does (``Config.local_delivery``, which a TAP sets).
The control socket (``shardct conntrack``, workers/control.py) serves the table, the
counters, events and the original-destination query.
``--workers 1`` runs the engine in this process; more run the worker pool
(workers/pool.py), which gives the frames back rewritten in input order with the ICMP
errors its workers' engines generated, reassembling in front of them and fragmenting
after them as one engine does (frag.PoolStage), and rate-limiting those errors
(icmp_ratelimit) where they meet, as one engine does (icmp.RateLimiter).

The host must not route or answer for these interfaces itself: turn its forwarding off
(``net.ipv4.ip_forward=0``) and keep its stack off the router's addresses (no addresses
on the interfaces, or an nftables input/output drop), or it answers with RSTs and
port-unreachables of its own. Its ARP may stay: neighbours may learn the router's MACs
from it. The RX rings ignore the frames shardct transmits (PACKET_IGNORE_OUTGOING). With
a ``[local] tap`` the TAP holds the router's addresses: the routed interfaces then need
none, the nftables drop must spare the TAP and sit at prerouting (workers/tap.py), and
the host still answers ARP on them for those addresses (Linux's default arp_ignore=0),
with their MACs.
"""
from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np

from shardct import track as K
from shardct.frag import with_fragments

from . import argtypes as A
from .tap import open_local

# RX rings are TPACKET_V2 (a slot per frame, readable as soon as the kernel wrote it): a
# V3 block reaches the reader only when full or at its retire timer (1 ms at least), which
# was half of the 2 ms echo round trip through `run --workers 1` (bench/run_router.py).
# A slot holds one frame whatever its size: 64 MiB of 2 KiB slots are 32768 frames, half
# a second of a 60 kpps burst the router cannot follow (a V3 ring of 32 MiB packed some
# 200k small frames)
RX_RING_BYTES = 64 << 20
REFRESH_S = 1.0         # the kernel's neighbour table is read again at most this often
STATS_S = 1.0           # ring drop counters are read this often
REASONS = ("engine", "local", "no_route", "no_neighbour", "tx_full", "too_big")


def add_parser(sub):
    p = sub.add_parser("run", help="route and NAT between the configured interfaces "
                                   "(AF_PACKET rings, inline)")
    p.add_argument("-c", "--config", required=True,
                   help="engine config (TOML) naming the interfaces; see configs/home-router.toml")
    p.add_argument("--workers", type=A.workers, default=1,
                   help="1: the engine in this process (default); more (or 'auto'): the "
                        "worker pool")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds of routing (0: at SIGINT/SIGTERM)")
    p.add_argument("--seed", type=A.seed, default=None,
                   help="hash seed, 0..2^32-1 (default: drawn at random and printed on stderr)")
    p.add_argument("--list", type=int, default=10, metavar="N",
                   help="print N conntrack -L lines at the end (0: none, -1: all)")
    p.add_argument("--no-kernel-neighbours", action="store_true",
                   help="use only the config's [neighbours], never the kernel's table")
    p.set_defaults(func=cmd_run)


class Neighbours:
    """Next hop address -> MAC: the static entries first, then the kernel's neighbour
    table of the current network namespace (``ip -j neigh show``), read again on a miss
    at most every ``refresh_s``. ``read_kernel`` is injectable for tests (a callable
    returning {address: MAC}), None for static entries only."""

    USABLE = {"REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"}

    def __init__(self, static: dict | None = None, read_kernel="ip", refresh_s: float = REFRESH_S,
                 clock=time.monotonic):
        self.static = dict(static or {})
        self.read_kernel = kernel_neighbours if read_kernel == "ip" else read_kernel
        self.refresh_s, self.clock = refresh_s, clock
        self.kernel: dict = {}
        self.read_at = None
        self.errors = 0
        self._refresh()

    def _refresh(self):
        if self.read_kernel is None:
            return
        self.read_at = self.clock()
        try:
            self.kernel = self.read_kernel()
        except (OSError, ValueError, subprocess.SubprocessError):
            self.errors += 1            # keep the last table

    def lookup(self, addr) -> bytes | None:
        """The MAC of ``addr`` (an ipaddress object), None when unknown."""
        mac = self.static.get(addr) or self.kernel.get(addr)
        if mac is None and self.read_at is not None and \
                self.clock() - self.read_at >= self.refresh_s:
            self._refresh()
            mac = self.kernel.get(addr)
        return mac


def kernel_neighbours(timeout_s: float = 2.0) -> dict:
    """{address: MAC} of the usable entries of this namespace's neighbour table."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    out = subprocess.run([ip, "-j", "neigh", "show"], capture_output=True, text=True,
                         timeout=timeout_s, check=True).stdout
    table = {}
    for e in json.loads(out or "[]"):
        if "lladdr" not in e or not Neighbours.USABLE & set(e.get("state", [])):
            continue
        table[ipaddress.ip_address(e["dst"])] = bytes.fromhex(e["lladdr"].replace(":", ""))
    return table


class Forwarder:
    """Routes, re-addresses and sends processed frames (owner: the routing thread).

    ``tx[k]``: the TxRing of interface k of ``network``. ``__call__(batch, forward,
    generated)``: precondition: ``batch`` was just processed by the router-mode engine
    (NAT applied, ``forward`` its forward mask); rewrites the Ethernet header of the
    frames it sends in ``batch.buf``; the engine's ``fragments`` leave in the place of the
    frames they replace (frag.py). ``local(batch, mask)``: delivers the frames for the
    router's own addresses and returns how many it took (workers/tap.py's
    ``TapPort.deliver``); None drops them. Counts ``forwarded``, ``delivered``,
    ``icmp_sent`` and ``dropped`` by reason (REASONS)."""

    def __init__(self, network, tx: list, neighbours: Neighbours, local=None):
        self.network, self.tx, self.neigh, self.local = network, tx, neighbours, local
        self.macs = np.array([list(i.mac) for i in network.interfaces], dtype=np.uint8)
        self.forwarded = self.icmp_sent = self.delivered = 0
        self.dropped = Counter({r: 0 for r in REASONS})
        self._hdr = np.arange(12, dtype=np.int64)

    def __call__(self, batch, forward, generated=None, meta=None, fragments=None,
                 fragment_of=None, held=0):
        """``fragments``: frames leaving in place of the frames ``fragment_of`` (the
        engine's Result), routed and sent like forwarded ones; ``held``: frames the
        engine keeps for reassembly (not dropped)."""
        n = len(batch)
        replaced = 0 if fragment_of is None else np.unique(fragment_of).shape[0]
        self.dropped["engine"] += int(n - forward.sum()) - replaced - int(held)
        if n:
            if fragments is not None and len(fragments):
                # each fragment in the place of the frame it replaces (one TX ring keeps
                # the order); their routes are looked up afresh
                batch, _ = with_fragments(batch, forward, fragments, fragment_of)
                forward, meta = np.ones(len(batch), dtype=np.bool_), None
            self._forward(batch, forward, meta)
        if generated is not None and len(generated):
            self._send(generated, np.ones(len(generated), dtype=np.bool_), generated.ifindex,
                       "icmp_sent")

    def _forward(self, batch, forward, meta):
        r = self.network.route_batch(batch, meta)
        keep = forward & ~r.local
        mine = forward & r.local
        took = self.local(batch, mine) if self.local is not None else 0
        self.delivered += took
        self.dropped["local"] += int(mine.sum()) - took
        routed = keep & (r.egress >= 0)
        self.dropped["no_route"] += int((keep & ~routed).sum())
        keep = self._readdress(batch, r, routed)
        self._send(batch, keep, r.egress, "forwarded")

    def _readdress(self, batch, r, keep):
        """Write destination (next hop) and source (egress) MACs of the kept frames;
        returns keep without the frames whose next hop has no MAC."""
        idx = np.flatnonzero(keep)
        if idx.shape[0] == 0:
            return keep
        key = np.column_stack((r.ipver[idx].astype(np.uint64), r.nexthop[idx]))
        if (key == key[0]).all():       # one next hop (always so for one frame): no sort
            hops, inv = key[:1], np.zeros(idx.shape[0], dtype=np.int64)
        else:
            hops, inv = np.unique(key, axis=0, return_inverse=True)
        hop_mac = np.zeros((hops.shape[0], 6), dtype=np.uint8)
        known = np.zeros(hops.shape[0], dtype=np.bool_)
        for h, (ver, hi, lo) in enumerate(hops):
            mac = self.neigh.lookup(_address(int(ver), int(hi), int(lo)))
            if mac is not None:
                hop_mac[h] = np.frombuffer(mac, dtype=np.uint8)
                known[h] = True
        inv = inv.reshape(-1)
        ok = known[inv]
        self.dropped["no_neighbour"] += int((~ok).sum())
        idx, inv = idx[ok], inv[ok]
        hdr = np.concatenate((hop_mac[inv], self.macs[r.egress[idx]]), axis=1)
        batch.buf[batch.off[idx][:, None] + self._hdr] = hdr
        out = np.zeros_like(keep)
        out[idx] = True
        return out

    def _send(self, batch, keep, egress, counter):
        known = (egress >= 0) & (egress < len(self.tx))
        self.dropped["no_route"] += int((keep & ~known).sum())
        keep = keep & known
        for ifx in np.unique(egress[keep]):
            sel = keep & (egress == ifx)
            ring = self.tx[int(ifx)]
            big = ring.too_big
            sent = ring.send(batch, sel)
            setattr(self, counter, getattr(self, counter) + sent)
            self.dropped["too_big"] += ring.too_big - big
            self.dropped["tx_full"] += int(sel.sum()) - sent - (ring.too_big - big)


class Delay:
    """How long frames spend in the router: from each frame's kernel RX stamp
    (CLOCK_REALTIME, taken as the frame enters the RX ring) to a stage (``read``: out of
    the rings; ``sent``: its batch was routed and handed to the TX rings, dropped frames
    included), the last SAMPLES frames per stage. Owner: the routing thread."""
    SAMPLES = 1 << 16

    def __init__(self, clock=time.time_ns):
        self.clock = clock
        self.samples: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def observe(self, stage: str, ts: np.ndarray):
        if not len(ts):
            return
        d = self.clock() - ts[-self.SAMPLES:]
        buf = self.samples.setdefault(stage, np.zeros(self.SAMPLES, dtype=np.int64))
        n = self.count.get(stage, 0)
        at = (n + np.arange(len(d))) % self.SAMPLES
        buf[at] = d
        self.count[stage] = n + len(d)

    def summary(self) -> str:
        """``stage p50/p99 us`` for each stage seen."""
        out = []
        for stage, buf in self.samples.items():
            d = buf[:min(self.count[stage], self.SAMPLES)] / 1000.0
            out.append(f"{stage} p50/p99 {np.percentile(d, 50):.0f}/{np.percentile(d, 99):.0f} us")
        return "; ".join(out) if out else "no frames"


def _address(ver: int, hi: int, lo: int):
    from shardct.hashing import words_addr
    return ipaddress.ip_address(words_addr(hi, lo, ver))


def _slot_size(mtu: int) -> int:
    """A ring slot for a frame of this MTU: the Ethernet header, a VLAN tag and the
    slot's own header (tpacket2_hdr and sockaddr_ll, 66 bytes before the frame) fit;
    a power of two, 2048 at least."""
    need = mtu + 14 + 4 + 80
    return max(2048, 1 << (need - 1).bit_length())


def cmd_run(args) -> int:
    """Exit status: 0 after a clean stop, 2 unusable config or interface."""
    from shardct.errors import ConfigError
    try:
        return _cmd_run(args)
    except ConfigError as e:
        print(f"shardct run: {e}", file=sys.stderr)
        return 2


def _warm(cfg, rules, network, seed):
    """Load (or compile) the engine's kernels on a throwaway engine, so the rings do not
    fill while the first batch compiles."""
    from shardct import ConnTrack
    from shardct.traffic import handshake_frames
    ct = ConnTrack(cfg, seed=seed, rules=rules, network=network, router=True)
    b = handshake_frames(2)
    b.ifindex[:] = 0
    res = ct.process(b)
    network.route_batch(b, res.meta)


def _cmd_run(args) -> int:
    from shardct.errors import ConfigError
    from .afpacket import RingMerge, RxRing, TxRing
    from .configfile import load
    from .replay import _summary
    ec = load(args.config)
    cfg, rules, network = ec.config, ec.rules, ec.network
    if network is None or not network.interfaces:
        raise ConfigError(ec.path, "shardct run needs [interfaces.NAME] sections (the "
                                   "interfaces to route between)")
    A.draw_seed(args, "shardct run")
    names = network.names

    def log(m):
        print(f"shardct run: {m}", file=sys.stderr, flush=True)

    if args.workers == 1:
        _warm(cfg, rules, network, args.seed)
    neigh = Neighbours(ec.neighbours, None if args.no_kernel_neighbours else "ip")
    rx, tx, tap = [], [], None
    state = {"stop": False}
    old = {s: signal.signal(s, lambda *_: state.update(stop=True))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            for k, name in enumerate(names):
                slot = _slot_size(network.interfaces[k].mtu)
                block = max(1 << 17, slot)
                rx.append(RxRing(name, k, version=2, frame_size=slot, block_size=block,
                                 blocks=max(1, RX_RING_BYTES // block)))
                tx.append(TxRing(name, frame_size=slot))
        except OSError as e:
            print(f"shardct run: {names[len(tx)]}: {e}", file=sys.stderr)
            return 2
        try:
            tap = open_local(ec.local, network, log)
        except OSError as e:
            print(f"shardct run: local tap {ec.local.get('tap')}: {e}", file=sys.stderr)
            return 2
        fwd = Forwarder(network, tx, neigh, None if tap is None else tap.deliver)
        # hold 0: inline, an answer is caused by a frame we forwarded, so it cannot be
        # read before its cause; per ring the kernel's order is kept
        merge = RingMerge(rx, hold_ms=0)
        stop = _stopper(args, state)
        delay = Delay()
        if args.workers == 1:
            out = _route_loop(cfg, rules, network, args.seed, fwd, merge, stop, log, delay,
                              tap)
        else:
            out = _route_pool(args, cfg, rules, network, fwd, merge, stop, log, delay, tap)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if tap is not None:
            tap.close()
        for r in rx:
            r.close()
        for t in tx:
            t.close()

    def per_ring(values):
        return " ".join(f"{r.ifname}={v}" for r, v in zip(rx, values))

    verdicts, last_ts, stats, conns, n = out
    print(f"routed {sum(verdicts.values())} packets on {','.join(names)} with {n} "
          f"worker{'s' if n > 1 else ''}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(verdicts.items()))
          + f"; forwarded={fwd.forwarded} delivered={fwd.delivered} icmp_sent={fwd.icmp_sent}"
          + "; dropped: "
          + " ".join(f"{k}={v}" for k, v in fwd.dropped.items())
          + f"; ring drops: {per_ring(r.drops for r in rx)}"
          + f"; longer than a ring slot: {per_ring(r.truncated for r in rx)}")
    print(f"time in the router from the kernel's RX stamp: {delay.summary()}")
    _summary(args, stats, conns, last_ts)
    return 0


def _stopper(args, state):
    """stop(): true after SIGINT/SIGTERM or --duration seconds from the first call."""
    end = []

    def stop():
        if not end:
            end.append(time.monotonic() + args.duration if args.duration > 0 else None)
        return state["stop"] or (end[0] is not None and time.monotonic() >= end[0])
    return stop


def _count(verdicts, v):
    for x, c in zip(*np.unique(v, return_counts=True)):
        verdicts[K.VERDICT_NAMES[int(x)]] += int(c)


def engine_control(ct):
    """The control socket of one engine in this process (workers/control.py)."""
    import zmq
    from .control import ControlServer, EngineView
    return ControlServer(EngineView(ct), zmq.Context.instance(), "run")


def _route_loop(cfg, rules, network, seed, fwd, merge, stop, log, delay, tap=None):
    """The engine in this process: read (the rings, then the local TAP if any), process,
    route and send until stop(), serving the control socket between batches; returns
    (verdict counts, last time, stats, conns, 1)."""
    from shardct import ConnTrack
    ct = ConnTrack(cfg, seed=seed, rules=rules, network=network, router=True,
                   rng=np.random.default_rng(seed))
    verdicts = Counter()
    control = engine_control(ct)
    log(f"ready, routing {' '.join(r.ifname for r in merge.rings)}")
    next_stats = time.monotonic() + STATS_S
    next_reap, reap_start, last_ts = None, 0, 0

    def handle(batch):
        nonlocal last_ts
        if not len(batch):
            return
        delay.observe("read", batch.ts)
        res = ct.process(batch)
        _count(verdicts, res.verdict)
        fwd(batch, res.forward, res.generated, res.meta, res.fragments, res.fragment_of,
            int((res.verdict == K.V_QUEUED).sum()))
        delay.observe("sent", batch.ts)
        last_ts = max(last_ts, int(batch.ts.max()))
        if control.pool.want_events:
            ev = ct.event_rows()
            if len(ev[0]):
                control.publish_events([ev])
        else:
            ct.clear_events()       # nobody watches them

    try:
        while not stop():
            handle(merge.poll(0.002))
            if tap is not None:
                handle(tap.read(time.time_ns()))
            control.poll()
            now = time.time_ns()        # the kernel's stamps are CLOCK_REALTIME too
            if next_reap is None:
                next_reap = now
            while now >= next_reap:
                reap_start, interval = ct.reap(next_reap, reap_start)
                next_reap += interval
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_S
                if merge.poll_stats():
                    log("ring drops so far: "
                        + " ".join(f"{r.ifname}={r.drops}" for r in merge.rings))
        handle(merge.flush(settle=False))
    finally:
        control.close()
    last_ts = max(last_ts, time.time_ns())
    return verdicts, last_ts, ct.stats(), list(ct.conns(now=last_ts)), 1


def _route_pool(args, cfg, rules, network, fwd, merge, stop, log, delay, tap=None):
    """The engine as a worker pool (workers/pool.py): frames come back rewritten in input
    order and are routed and sent in emit, with the ICMP errors the workers generated
    (out of their ingress interface); what the local TAP (if any) read is fed after each
    batch of the rings. The pool serves the control socket. Returns as _route_loop."""
    from shardct.batch import compact
    from shardct.conntrack import forward_mask
    from .afpacket import ring_batches
    from .pool import Pool
    # the dispatcher in this process: one hop and one process fewer per round (a 1-packet
    # round through 2 workers: 1.1 -> 0.7 ms p50); live input is far below its rate
    pool = Pool(args.workers, cfg, seed=args.seed, rules=rules, network=network, router=True,
                frames=True, log=lambda m: print(m, file=sys.stderr), dispatcher_process=False,
                control="run")
    verdicts = Counter()
    last = [0]

    def emit(pk, v, gen, out):
        _count(verdicts, v)
        if not len(pk):
            return
        b = compact(pk.batch) if pk.batch.shared else pk.batch   # ours to re-address
        if out is None:
            fwd(b, forward_mask(v, cfg.drop_invalid), gen.batch)
        else:       # the pool's fragments in place of reassembled or oversize frames
            fwd(b, out[0], gen.batch, fragments=out[1], fragment_of=out[2])
        delay.observe("sent", b.ts)
        last[0] = max(last[0], int(b.ts.max()))

    def source():       # never waits itself: the pool waits on the rings and its results
        for b in ring_batches(merge.rings, stop, 0.0, merge=merge, log=log):
            delay.observe("read", b.ts)
            yield b

    pool.start()
    try:
        pool.wait_ready(600.0)      # a cold numba cache compiles for minutes
        log(f"ready, routing {' '.join(r.ifname for r in merge.rings)} with {pool.n} workers")
        wake = [r.sock for r in merge.rings] + ([tap.fd] if tap is not None else [])
        totals = pool.feed(source() if tap is None else _with_tap(source(), tap), emit=emit,
                           wake=wake,
                           timeout_s=(args.duration + 120) if args.duration > 0 else 10**9,
                           final=True, generated=True)
    finally:
        pool.stop()
    log(f"lost_packets={totals['lost_packets']} lost_conns={totals['lost_conns']} "
        f"restarts={sum(pool.sup.restarts)}")
    from .replay import count_fragments
    count_fragments(verdicts, totals)
    last_ts = max(last[0], time.time_ns())
    return verdicts, last_ts, pool.stats(), pool.conns(now=last_ts), pool.n


def _with_tap(source, tap):
    """The batches of ``source``, each followed by what the local TAP read meanwhile."""
    for b in source:
        yield b
        t = tap.read(time.time_ns())
        if len(t):
            yield t
