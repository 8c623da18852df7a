# The first run of shardct compiles its numba kernels (minutes on a small machine) and would
# print nothing meanwhile. This module finds out whether the kernels' on-disk cache is cold,
# says so, and compiles them with a progress bar; `shardct warm` runs it ahead of time.
"""First run: announce and show the numba kernels' one-time compile (``shardct warm``).

Every batch kernel is ``numba.njit(cache=True)``: compiled on its first call, then loaded
from an index (``<function>-<line>.py311.nbi``) and data files in the module's
``__pycache__`` (or under ``NUMBA_CACHE_DIR``, or numba's per-user cache when the source
directory is read-only). An index is valid only for the numba version that wrote it and for
the source file's current stamp, so an upgrade or an edited module makes it cold again.
:func:`cold_kernels` asks numba's own cache object for each kernel's index, so the check
follows the same rules.

:func:`warm` compiles what the commands need by running the engine on tiny inputs, stage by
stage (tracking, NAT with the demo rules, capture I/O, the pool's shard protocol), and
advances a bar each time numba finishes compiling one of shardct's kernels (numba's
``numba:compile`` events), so the bar moves with the real work.
"""
from __future__ import annotations

import importlib
import sys
import threading
import time

#: modules whose kernels the commands compile (imported in this order)
KERNEL_MODULES = ("shardct.cpu", "shardct.checksum", "shardct.hashing", "shardct.wire",
                  "shardct.batch", "shardct.traffic", "shardct.rewrite", "shardct.netconf", "shardct.icmp",
                  "shardct.nat", "shardct.frag",
                  "shardct.track", "shardct.scatter", "shardct.shard", "workers.pcapio")

#: kernels compiled by :func:`warm`'s stages, as recorded on a cold cache (the bar's total
#: is the cold ones among these; a kernel compiled that is not listed raises the total)
WARM_KERNELS = (
    "shardct.traffic._put32", "shardct.traffic._build", "shardct.wire.parse_hash_batch",
    "shardct.track.unlink_tuple", "shardct.track.emit", "shardct.track.destroy_conn",
    "shardct.track.nat_packet", "shardct.track.early_drop", "shardct.track.alloc_conn",
    "shardct.track.link_tuple", "shardct.track.create_conn", "shardct.track.tcp_new",
    "shardct.track.init_proto", "shardct.track.track_batch", "shardct.icmp.error_rows",
    "shardct.nat.tuple_taken", "shardct.icmp.build_errors",
    "shardct.track.reap", "shardct.nat.unique_port", "shardct.track.collect_conns",
    "workers.pcapio._walk_pcap", "shardct.wire.parse_batch", "shardct.netconf.route_kernel",
    "shardct.shard.answer_deps",
    "shardct.hashing.owner_of_bucket", "shardct.hashing.owners", "shardct.shard.request_rows",
    "shardct.shard.find_visible", "shardct.shard.link_reply_entry", "shardct.shard.answer_rows",
    "shardct.shard.commit_rows", "shardct.track.count_conns", "shardct.batch._gather",
    "shardct.scatter.group", "shardct.shard.round_rows", "shardct.scatter._copy",
    "shardct.scatter._dense_order",
    "shardct.nat.nat_decide", "shardct.frag.defrag", "shardct.frag.expire",
    "shardct.frag.fragment", "shardct.frag.put_frames", "shardct.track.take_hops",
    "shardct.wire.may_be_fragment",
)

NOTICE = "shardct: compiling the packet kernels (first run only, a few minutes)..."


def _name(d) -> str:
    f = d.py_func
    return f"{f.__module__}.{f.__qualname__}"


def _columns() -> int:
    """The terminal's width; 80 when it reports none (a pty without a size says 0 columns,
    which would make tqdm print nothing)."""
    import shutil
    return shutil.get_terminal_size((80, 24)).columns or 80


def _ours(name: str) -> bool:
    return name.startswith(("shardct.", "workers."))


def kernels() -> dict:
    """{name: dispatcher} of every cached, separately compiled kernel in KERNEL_MODULES
    (``inline='always'`` helpers are compiled into their callers and never cached alone)."""
    from numba.core.registry import CPUDispatcher
    out = {}
    for mod in KERNEL_MODULES:
        m = importlib.import_module(mod)
        for obj in vars(m).values():
            if not isinstance(obj, CPUDispatcher) or obj.py_func.__module__ != mod:
                continue
            if obj.targetoptions.get("inline") == "always" or not hasattr(obj._cache, "_cache_file"):
                continue
            out[_name(obj)] = obj
    return out


def is_cold(d) -> bool:
    """True when the dispatcher's on-disk cache holds nothing this numba can load for the
    current source (missing index, another numba version, or an edited source file)."""
    cache = getattr(d, "_cache", None)
    cf = getattr(cache, "_cache_file", None)
    if cf is None:          # no cache object: it compiles every time
        return True
    try:
        return not cf._load_index()
    except Exception:       # unreadable index: numba will recompile and rewrite it
        return True


def cold_kernels(names=WARM_KERNELS) -> list[str]:
    """The kernels among ``names`` whose cache is cold (all of them on a fresh install)."""
    ks = kernels()
    return [n for n in names if n in ks and is_cold(ks[n])]


# ------------------------------------------------------------------ the stages

def _demo_batches(n=64):
    from .demo import demo_batches
    from .configfile import load
    from .demo import DEMO_CONFIG
    ec = load(DEMO_CONFIG)
    names = ec.network.names if ec.network is not None else []
    return ec, names, list(demo_batches(n, names))[:8]


def _stage_tracking():
    import numpy as np
    from shardct import Config, ConnTrack
    _, _, batches = _demo_batches()
    ct = ConnTrack(Config(), seed=1, rng=np.random.default_rng(1))
    for b in batches:
        ct.process(b)
    ts = int(batches[-1].ts[-1])
    ct.reap(ts, 0)
    ct.reap_all(ts)
    list(ct.conns(now=ts))
    ct.stats()


def _stage_nat():
    import numpy as np
    from shardct import ConnTrack
    from shardct.batch import take
    ec, _, batches = _demo_batches()
    ct = ConnTrack(ec.config, seed=1, rules=ec.rules, network=ec.network, router=True,
                   rng=np.random.default_rng(1))
    for b in batches:
        r = ct.process(b)
        r.forward_mask(ec.config.drop_invalid)
    ts = int(batches[-1].ts[-1])
    ct.process(_ttl1_batch(ts, ec.network.index("lan0")))     # the time-exceeded kernels
    # defrag (a queue across two batches: its expiry) and fragmentation
    fb = _fragments_batch(ts, ec.network.index("lan0"))
    ct.process(take(fb, np.array([0])))
    ct.process(take(fb, np.array([1, 2])))
    ct.reap(ts, 0)
    ct.reap_all(ts)
    list(ct.conns(now=ts))


def _ttl1_batch(ts, ifindex):
    """A LAN UDP frame arriving with TTL 1 (the router answers it with time-exceeded)."""
    import struct
    from shardct import PacketBatch
    from shardct.checksum import checksum
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 1, 17, 0,
                               bytes((10, 0, 0, 2)), bytes((192, 168, 0, 2))))
    ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(ip) + struct.pack("!HHHH", 1, 2, 8, 0)
    return PacketBatch.from_frames([frame], ts=ts, ifindex=ifindex)


def _fragments_batch(ts, ifindex):
    """A 3000-byte LAN UDP datagram as three fragments (cut by frag.cut_frames)."""
    import struct
    import numpy as np
    from shardct import PacketBatch, wire
    from shardct import frag as F
    from shardct.checksum import checksum
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 3028, 7, 0, 64, 17, 0,
                               bytes((10, 0, 0, 2)), bytes((192, 168, 0, 2))))
    ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(ip) \
        + struct.pack("!HHHH", 1, 2, 3008, 0) + b"w" * 3000
    whole = PacketBatch.from_frames([frame], ts=ts, ifindex=ifindex)
    meta, addr = wire.new_meta(1)
    wire.parse_batch(whole.buf, whole.off, whole.length, meta, addr, False)
    frags, _ = F.cut_frames(whole, np.array([0]), meta, [1400],
                            np.zeros((1, F.N_INFO), dtype=np.int64),
                            np.zeros(len(F.STAT_NAMES), dtype=np.int64))
    return frags


def _stage_capture():
    import os
    import tempfile
    from .pcapio import PcapngWriter, PcapWriter, read_capture
    from shardct.netconf import egress
    ec, names, batches = _demo_batches()
    with tempfile.TemporaryDirectory(prefix="shardct-warm-") as d:
        for ext, w in ((".pcap", PcapWriter), (".pcapng", lambda p: PcapngWriter(p, names))):
            path = os.path.join(d, "warm" + ext)
            with w(path) as wr:
                wr.write_batch(batches[0])
            for b in read_capture(path, batch_size=64, names=names):
                egress(ec.network, b)


def _stage_pool():
    from shardct import Config
    from shardct.shard import LocalPool
    ec, _, batches = _demo_batches()
    for kw in ({}, dict(rules=ec.rules, network=ec.network, router=True)):
        lp = LocalPool(2, ec.config if kw else Config(), seed=1, **kw)
        for b in batches:
            lp.process(b)
        lp.stats()
    # the pool's dispatcher on batches it copies (scatter), and batch copies (take/compact)
    import numpy as np
    from shardct.batch import compact, take
    from shardct.shard import Dispatcher
    d = Dispatcher(2, Config(), 1, 16384)
    for b in batches[:2]:
        list(d.rounds(compact(take(b, np.arange(len(b))))))


STAGES = (("tracking", _stage_tracking), ("NAT", _stage_nat), ("capture I/O", _stage_capture),
          ("worker pool", _stage_pool))


def warm(stream=None, force: bool = False, bar: bool | None = None) -> dict:
    """Compile the kernels the commands use, if their cache is cold (or ``force``).
    Prints the notice and a tqdm bar on ``stream`` (stderr); the bar only when the stream is
    a terminal (``bar`` overrides), one line at the end otherwise. Returns
    {"cold": [...], "compiled": [...], "seconds": s}."""
    stream = stream or sys.stderr
    cold = cold_kernels()
    if not cold and not force:
        return {"cold": [], "compiled": [], "seconds": 0.0}
    from numba.core import event as ev
    from tqdm import tqdm
    tty = bar if bar is not None else stream.isatty()
    print(NOTICE, file=stream, flush=True)
    pbar = tqdm(total=max(1, len(cold)), unit="kernel", file=stream, disable=not tty,
                ncols=_columns(), bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} kernels "
                "[{elapsed}<{remaining}{postfix}]")
    compiled: list[str] = []
    want = set(cold)
    stage = [""]

    class Listener(ev.Listener):
        def on_start(self, event):
            n = _name(event.data["dispatcher"])
            if _ours(n):
                pbar.set_postfix_str(f"{stage[0]}: {n.split('.', 1)[1]}", refresh=False)

        def on_end(self, event):
            n = _name(event.data["dispatcher"])
            if not _ours(n) or n in compiled:
                return
            compiled.append(n)
            if n not in want:       # a kernel the list does not know of: count it too
                want.add(n)
                pbar.total = max(pbar.total, len(want))
            pbar.update(1)

    stop = threading.Event()

    def tick():             # keep the elapsed time moving during a long compile
        while not stop.wait(1.0):
            pbar.refresh()

    listener = Listener()
    ev.register("numba:compile", listener)
    ticker = threading.Thread(target=tick, daemon=True)
    if tty:
        ticker.start()
    t0 = time.perf_counter()
    try:
        for label, fn in STAGES:
            stage[0] = label
            pbar.set_postfix_str(label)
            fn()
        pbar.total = pbar.n or 1     # listed kernels that were not needed: the bar ends full
        pbar.set_postfix_str("done")
    finally:
        stop.set()
        ev.unregister("numba:compile", listener)
        pbar.close()
    dt = time.perf_counter() - t0
    print(f"shardct: compiled {len(compiled)} kernels in {dt:.0f} s; later runs load them "
          f"from the cache", file=stream, flush=True)
    return {"cold": cold, "compiled": compiled, "seconds": dt}


def ensure_warm(stream=None) -> None:
    """Called by commands before their main job: compiles (with the notice) only when the
    cache is cold; otherwise costs a few index reads."""
    try:
        warm(stream)
    except Exception as e:     # never let the announcement stop the job itself
        print(f"shardct: warm-up skipped ({type(e).__name__}: {e}); kernels compile on "
              f"first use", file=stream or sys.stderr)


def cmd_warm(args) -> int:
    if args.check:
        cold = cold_kernels()
        print(f"{len(cold)} of {len(WARM_KERNELS)} kernels need compiling"
              + (": " + ", ".join(cold) if cold else " (cache is warm)"))
        return 1 if cold else 0
    r = warm(sys.stderr, force=args.force)
    if not r["cold"] and not args.force:
        print("shardct: the kernels are compiled already (cache is warm)", file=sys.stderr)
    if args.verbose:
        for n in r["compiled"]:
            print(n)
    return 0


def add_parser(sub):
    p = sub.add_parser("warm", help="compile the packet kernels now (done once; later runs "
                                    "load them from numba's cache)")
    p.add_argument("--check", action="store_true",
                   help="only say whether the cache is cold (exit 1 if it is)")
    p.add_argument("--force", action="store_true", help="run the stages even if the cache is warm")
    p.add_argument("-v", "--verbose", action="store_true", help="list the kernels compiled")
    p.set_defaults(func=cmd_warm)


# ------------------------------------------------------------------ progress over frames

def frames_progress(batches, stream=None, desc="replay", delay=2.0):
    """Pass ``batches`` through, counting their frames on a tqdm bar on ``stream``
    (stderr) that appears only after ``delay`` seconds (long replays) and only when the
    stream is a terminal; quiet otherwise. The bar is closed when the batches end."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield from batches
        return
    from tqdm import tqdm
    with tqdm(unit="frame", unit_scale=True, desc=desc, file=stream, delay=delay,
              leave=False, ncols=_columns()) as bar:
        for b in batches:
            yield b
            bar.update(len(b))
