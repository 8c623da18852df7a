# The control socket of a running pool, and `shardct conntrack`, its client: conntrack -L
# and -S of what the workers hold right now. One REP socket per run, in a 0700 directory
# of the user's, so only its owner can connect; msgpack with size limits both ways.
"""Control socket.

A pool started with ``control=NAME`` (replay and live do) binds ``ipc://DIR/PID.sock``
where DIR is :func:`control_dir` (0700, owned by this user: the socket accepts only its
owner). Requests and replies are one msgpack map each::

    {"cmd": "stats"}          -> {"ok": true, "name", "pid", "workers", "stats": {..},
                                  "totals": {..}, "counts": {..}}
    {"cmd": "list"}           -> the same and "conns": [conn, ...]
    {"cmd": "delete", "filter": {proto, src, dst, sport, dport}}
                              -> the same and "deleted": n (an empty filter flushes)
    {"cmd": "save", "dir": DIR} -> the same, once every worker saved its shard in DIR
    {"cmd": "orig_dst", "tuple": {proto, src, dst, sport, dport}}
                              -> {"ok": true, "found": bool, "dst", "dport"}: what
                                 SO_ORIGINAL_DST gives a local listener that accepted
                                 (src, sport) -> (dst, dport) after DNAT/REDIRECT: the
                                 original destination of the conn with that reply tuple

Events (``conntrack -E``) go out on an XPUB socket beside it, ``DIR/PID.events``: while
anyone subscribes, workers ship their NEW/UPDATE/DESTROY events with each round's results
(``Pool.want_events``), and each emitted round's events are published as one msgpack list
of conns (``_conn_dict`` with "event"), in time order.

The requests ask every worker for its table and counters with a round of their own
(``Pool.request_dump``), so the answer is the table as of the packets fed so far, and
come back once that round is out. ``shardct run --workers 1`` serves the same socket
from its one engine (``EngineView``: answered at once; no -D/-F or save there). A bad
request gets ``{"ok": false, "error": ...}`` and is counted (``rejected``). The server is
polled by the pool's feed loop (``Pool._tick``), or by run's loop: it never blocks it.
"""
from __future__ import annotations

import os
import sys
import time

import msgpack
import zmq

from shardct.show import format_conn, format_event, format_stats

MAX_REQUEST = 64 * 1024
MAX_REPLY = 1 << 30         # a listing of millions of conns


def control_dir() -> str:
    """This user's directory of control sockets: SHARDCT_RUN_DIR, /run/shardct for root,
    else $XDG_RUNTIME_DIR/shardct, else /tmp/shardct-UID. Created 0700; refused when
    another user owns it or others may enter it."""
    d = os.environ.get("SHARDCT_RUN_DIR")
    if not d:
        if os.geteuid() == 0:
            d = "/run/shardct"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "shardct")
        else:
            d = f"/tmp/shardct-{os.geteuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{d}: not a 0700 directory of this user")
    return d


def _conn_dict(c, now: int) -> dict:
    o, r = c.original, c.reply
    return {"id": c.id, "proto": c.proto, "state": c.state, "status": sorted(c.status),
            "timeout": c.timeout(now), "packets": list(c.packets), "bytes": list(c.bytes),
            "original": {"src": str(o.src), "dst": str(o.dst), "sport": o.sport,
                         "dport": o.dport},
            "reply": {"src": str(r.src), "dst": str(r.dst), "sport": r.sport, "dport": r.dport},
            "line": format_conn(c, now)}


class ControlServer:
    """Owned by the pool (created in ``start``, closed in ``stop``); one request at a
    time, answered once the dump it asked for is out."""

    def __init__(self, pool, ctx, name: str):
        self.pool, self.name = pool, name
        self.path = os.path.join(control_dir(), f"{os.getpid()}.sock")
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST)
        if os.path.exists(self.path):
            os.unlink(self.path)            # a pid's stale socket: that process is gone
        self.sock.bind(f"ipc://{self.path}")
        os.chmod(self.path, 0o600)
        self.waiting = None                 # (request, the dump count that answers it)
        self.served = self.rejected = 0
        self.events_path = os.path.join(control_dir(), f"{os.getpid()}.events")
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 1000)         # a slow watcher loses events, not us
        self.pub.setsockopt(zmq.MAXMSGSIZE, 64)       # subscriptions only
        self.pub.bind(f"ipc://{self.events_path}")
        os.chmod(self.events_path, 0o600)
        self.watchers = 0

    def _subscriptions(self):
        while self.pub.poll(0):
            m = self.pub.recv()
            if m[:1] == b"\x01":
                self.watchers += 1
            elif m[:1] == b"\x00":
                self.watchers = max(0, self.watchers - 1)
        self.pool.want_events = self.watchers > 0

    def publish_events(self, parts):
        """One round's events from the workers ((ev, evaddr) row arrays), in time order."""
        from shardct import track as K
        from shardct.conntrack import ConnTrack
        import numpy as np
        ev = np.concatenate([e for e, _ in parts])
        evaddr = np.concatenate([a for _, a in parts])
        order = np.argsort(ev[:, K.E_TIME], kind="stable")
        out = []
        for e in ConnTrack.events_from_rows(ev[order], evaddr[order]):
            d = _conn_dict(e.conn, e.time)
            d["event"] = e.kind
            d["line"] = format_event(e)
            out.append(d)
        try:
            self.pub.send(msgpack.packb(out, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def poll(self):
        self._subscriptions()
        if self.waiting is not None:
            req, want, deleted = self.waiting
            if self.pool.dumped >= want:
                self.waiting = None
                out = self._answer(req)
                out["deleted"] = self.pool.totals["deleted"] - deleted
                self._reply(out)
            return
        if not self.sock.poll(0):
            return
        try:
            req = msgpack.unpackb(self.sock.recv(), raw=False, max_str_len=4096,
                                  max_map_len=32, max_array_len=32, max_bin_len=0)
            if not isinstance(req, dict) or req.get("cmd") not in ("stats", "list", "delete",
                                                                   "save", "orig_dst"):
                raise ValueError(f"unknown request {req!r:.80}")
            if req["cmd"] in getattr(self.pool, "refuses", ()):
                raise ValueError(f"{req['cmd']}: not with {self.pool.n} engine in this process "
                                 f"(run with --workers 2 or more)")
            if req["cmd"] == "orig_dst":
                req["tuple"] = query_tuple(req.get("tuple"))
            delete = save = None
            if req["cmd"] == "save":
                save = req.get("dir")
                if not isinstance(save, str) or not os.path.isabs(save):
                    raise ValueError("save needs an absolute directory")
                os.makedirs(save, mode=0o700, exist_ok=True)
            if req["cmd"] == "delete":
                from .pool import delete_filter
                delete = req.get("filter", {})
                delete_filter(delete)           # refused here, not in the workers
        except Exception as e:      # msgpack raises several types for bad input
            self.rejected += 1
            self._reply({"ok": False, "error": str(e)})
            return
        want = self.pool.dumped + 1     # an EngineView's dump is done at once
        self.pool.request_dump(delete, save)
        self.waiting = (req, want, self.pool.totals["deleted"])

    def _answer(self, req) -> dict:
        p = self.pool
        out = {"ok": True, "name": self.name, "pid": os.getpid(), "workers": p.n,
               "stats": p.stats(), "totals": dict(p.totals), "counts": p.counts()}
        if req["cmd"] == "list":
            now = int(req.get("now") or time.time_ns())
            out["conns"] = [_conn_dict(c, now) for c in p.conns()]
        if req["cmd"] == "orig_dst":
            q = req["tuple"]
            find = getattr(p, "original_dst", None)
            hit = find(**q) if find is not None else original_dst_of(p.conns(), **q)
            out["found"] = hit is not None
            if hit is not None:
                out["dst"], out["dport"] = str(hit[0]), int(hit[1])
        return out

    def _reply(self, msg: dict):
        self.served += 1
        self.sock.send(msgpack.packb(msg, use_bin_type=True))

    def close(self):
        if self.waiting is not None:
            self._reply({"ok": False, "error": "the run ended before the workers answered"})
        self.sock.close(0)
        self.pub.close(0)
        for path in (self.path, self.events_path):
            if os.path.exists(path):
                os.unlink(path)


def query_tuple(t) -> dict:
    """An orig_dst request's tuple, checked: {proto, src, dst, sport, dport} with
    addresses as ipaddress objects of one family (ValueError: the message is bad)."""
    import ipaddress
    if not isinstance(t, dict) or set(t) != {"proto", "src", "dst", "sport", "dport"}:
        raise ValueError(f"orig_dst needs proto, src, dst, sport and dport: {t!r:.80}")
    out = {"src": ipaddress.ip_address(str(t["src"])), "dst": ipaddress.ip_address(str(t["dst"]))}
    if out["src"].version != out["dst"].version:
        raise ValueError("orig_dst: src and dst of different families")
    for k in ("proto", "sport", "dport"):
        if not isinstance(t[k], int) or not 0 <= t[k] <= (255 if k == "proto" else 65535):
            raise ValueError(f"orig_dst: bad {k} {t[k]!r:.40}")
        out[k] = t[k]
    return out


def original_dst_of(conns, proto, src, dst, sport, dport):
    """(address, port) before DNAT/REDIRECT of the conn among ``conns`` (Conn snapshots)
    whose reply tuple is (dst, dport) -> (src, sport), the direction a local listener
    answers in; None when there is none (SO_ORIGINAL_DST's ENOTCONN)."""
    for c in conns:
        r = c.reply
        if (c.proto == proto and r.src == dst and r.dst == src and r.sport == dport
                and r.dport == sport):
            return c.original.dst, c.original.dport
    return None


class EngineView:
    """One ConnTrack (``shardct run --workers 1``) behind ControlServer: what it reads
    of a Pool, answered from the engine at once. Owner: the routing thread, which calls
    ``ControlServer.poll`` between batches and ships events while ``want_events``."""

    n = 1
    refuses = ("delete", "save")

    def __init__(self, ct, clock=time.time_ns):
        self.ct, self.clock = ct, clock
        self.want_events = False
        self.dumped = 0
        self.totals = {"deleted": 0}

    def request_dump(self, delete=None, save=None):
        self.dumped += 1            # the table is here: the next poll answers

    def stats(self) -> dict:
        return self.ct.stats()

    def counts(self) -> dict:
        return {}

    def conns(self, now=None):
        return list(self.ct.conns(now=now))

    def original_dst(self, proto, src, dst, sport, dport):
        return self.ct.original_dst(src, dst, sport, dport, proto, now=self.clock())


# ------------------------------------------------------------------ the client

def running() -> list[int]:
    """Pids with a control socket here whose process is alive."""
    d = control_dir()
    out = []
    for f in os.listdir(d):
        if f.endswith(".sock") and f[:-5].isdigit():
            pid = int(f[:-5])
            if os.path.exists(f"/proc/{pid}"):
                out.append(pid)
    return sorted(out)


def request(pid: int, msg: dict, timeout_s: float = 10.0) -> dict:
    """One request to pid's control socket; raises TimeoutError or ConnectionError."""
    path = os.path.join(control_dir(), f"{pid}.sock")
    if not os.path.exists(path):
        raise ConnectionError(f"no control socket {path}")
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
    try:
        s.connect(f"ipc://{path}")
        s.send(msgpack.packb(msg, use_bin_type=True))
        if not s.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"pid {pid} did not answer in {timeout_s:.0f} s")
        return msgpack.unpackb(s.recv(), raw=False, max_bin_len=0,
                               max_str_len=1 << 20, max_array_len=1 << 26, max_map_len=1 << 26)
    finally:
        s.close(0)


def original_dst(src, dst, sport: int, dport: int, proto="tcp", pid: int | None = None,
                 timeout_s: float = 10.0):
    """SO_ORIGINAL_DST for a local listener: it accepted a connection from (src, sport)
    on (dst, dport); the (address, port) the client asked for before DNAT/REDIRECT, as
    the running shardct (``pid``, default the only one) knows it; None when no conn has
    that reply tuple. Raises ConnectionError (no such run), TimeoutError, or
    ValueError (the run refused the request)."""
    p = PROTOS.get(proto, proto) if isinstance(proto, str) else int(proto)
    if pid is None:
        pids = running()
        if len(pids) != 1:
            raise ConnectionError(f"{len(pids)} runs with a control socket in {control_dir()}: "
                                  "give pid")
        pid = pids[0]
    r = request(pid, {"cmd": "orig_dst", "tuple": {"proto": p, "src": str(src), "dst": str(dst),
                                                   "sport": int(sport), "dport": int(dport)}},
                timeout_s)
    if not r.get("ok"):
        raise ValueError(r.get("error"))
    if not r["found"]:
        return None
    import ipaddress
    return ipaddress.ip_address(r["dst"]), r["dport"]


def add_parser(sub):
    p = sub.add_parser("conntrack", help="conntrack -L / -S of a running replay or live")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-L", "--dump", action="store_true", help="list the conns")
    g.add_argument("-S", "--stats", action="store_true", help="the counters")
    g.add_argument("-D", "--delete", action="store_true",
                   help="delete the conns that match the filters (at least one)")
    g.add_argument("-F", "--flush", action="store_true", help="delete every conn")
    g.add_argument("-E", "--event", action="store_true",
                   help="print NEW/UPDATE/DESTROY events as they happen (until Ctrl-C)")
    g.add_argument("--original-dst", action="store_true",
                   help="SO_ORIGINAL_DST: the destination before DNAT/REDIRECT of the "
                        "connection a local listener accepted from -s/--sport on -d/--dport "
                        "(-p, default tcp); prints ADDRESS PORT")
    p.add_argument("-p", "--proto", help="only this protocol (tcp, udp, icmp, icmpv6 or a number)")
    p.add_argument("-s", "--src", "--orig-src", dest="src", help="original source address")
    p.add_argument("-d", "--dst", "--orig-dst", dest="dst", help="original destination address")
    p.add_argument("--sport", "--orig-port-src", dest="sport", type=int, help="original source port")
    p.add_argument("--dport", "--orig-port-dst", dest="dport", type=int,
                   help="original destination port")
    p.add_argument("-o", "--output", choices=["json"], help="json: one object per conn")
    p.add_argument("--pid", type=int, help="which run (default: the only one running)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    p.add_argument("--duration", type=float, default=0.0,
                   help="-E: stop after this many seconds (0: at Ctrl-C or when the run ends)")
    p.set_defaults(func=cmd_conntrack)


PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


def _keep(c: dict, a) -> bool:
    if a.proto is not None:
        want = PROTOS.get(a.proto)
        if want is None:
            want = int(a.proto) if a.proto.isdigit() else -1
        if c["proto"] != want:
            return False
    o = c["original"]
    return ((a.src is None or o["src"] == a.src) and (a.dst is None or o["dst"] == a.dst)
            and (a.sport is None or o["sport"] == a.sport)
            and (a.dport is None or o["dport"] == a.dport))


def _filter(a) -> dict:
    """The -D filter of the options given (the workers' delete_filter form)."""
    f = {}
    if a.proto is not None:
        f["proto"] = PROTOS.get(a.proto) or (int(a.proto) if a.proto.isdigit() else -1)
    for key in ("src", "dst", "sport", "dport"):
        if getattr(a, key) is not None:
            f[key] = getattr(a, key)
    return f


def _watch(pid: int, a) -> int:
    """conntrack -E: print the run's events until Ctrl-C, --duration or its end."""
    import json
    path = os.path.join(control_dir(), f"{pid}.events")
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(f"ipc://{path}")
    n = 0
    end = time.monotonic() + a.duration if a.duration else None
    try:
        while os.path.exists(path) and (end is None or time.monotonic() < end):
            if not s.poll(200):
                continue
            for c in msgpack.unpackb(s.recv(), raw=False, max_bin_len=0,
                                     max_str_len=1 << 20, max_array_len=1 << 26,
                                     max_map_len=1 << 20):
                if _keep(c, a):
                    n += 1
                    print(json.dumps({k: v for k, v in c.items() if k != "line"})
                          if a.output == "json" else c["line"], flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        s.close(0)
    print(f"shardct conntrack v1 (pid {pid}): {n} flow events have been shown.",
          file=sys.stderr)
    return 0


def pick(prog: str, pid: int | None) -> int | None:
    """The run to talk to: ``pid``, else the only one running (None: said why)."""
    pids = [pid] if pid else running()
    if not pids:
        print(f"{prog}: no running shardct with a control socket in {control_dir()}",
              file=sys.stderr)
        return None
    if len(pids) > 1:
        print(f"{prog}: several runs ({', '.join(map(str, pids))}): pick one with --pid",
              file=sys.stderr)
        return None
    return pids[0]


def ask_one(prog: str, pid: int | None, msg: dict, timeout_s: float = 60.0) -> dict | None:
    """One request to the run ``pick`` chooses; None after saying what went wrong."""
    try:
        pid = pick(prog, pid)
        r = None if pid is None else request(pid, msg, timeout_s)
    except (OSError, TimeoutError, ConnectionError, zmq.ZMQError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    if r is not None and not r.get("ok"):
        print(f"{prog}: {r.get('error')}", file=sys.stderr)
        return None
    return r


def _original_dst(pid: int, a) -> int:
    """--original-dst: 0 and "ADDRESS PORT" (or json), 1 when no conn matches."""
    import json
    if None in (a.src, a.dst, a.sport, a.dport):
        print("shardct conntrack: --original-dst needs -s, -d, --sport and --dport (the "
              "peer and the local address the listener sees)", file=sys.stderr)
        return 2
    hit = original_dst(a.src, a.dst, a.sport, a.dport, a.proto or "tcp", pid, a.timeout)
    if hit is None:
        print("shardct conntrack: no conn has that reply tuple (ENOTCONN)", file=sys.stderr)
        return 1
    print(json.dumps({"dst": str(hit[0]), "dport": hit[1]}) if a.output == "json"
          else f"{hit[0]} {hit[1]}")
    return 0


def cmd_conntrack(a) -> int:
    import json
    try:
        pid = pick("shardct conntrack", a.pid)
        if pid is None:
            return 1
        pids = [pid]
        if a.event:
            return _watch(pids[0], a)
        if a.original_dst:
            return _original_dst(pids[0], a)
        if a.delete and not _filter(a):
            print("shardct conntrack: -D needs a filter (-p, -s, -d, --sport, --dport); "
                  "-F deletes everything", file=sys.stderr)
            return 2
        if a.delete:
            # what goes, as conntrack -D prints it: listed first, then deleted by filter
            before = request(pids[0], {"cmd": "list"}, a.timeout)
            r = request(pids[0], {"cmd": "delete", "filter": _filter(a)}, a.timeout)
            r["conns"] = [c for c in before.get("conns", []) if _keep(c, a)]
        elif a.flush:
            r = request(pids[0], {"cmd": "delete", "filter": {}}, a.timeout)
        else:
            r = request(pids[0], {"cmd": "list" if a.dump else "stats"}, a.timeout)
    except (OSError, TimeoutError, ConnectionError, zmq.ZMQError, ValueError) as e:
        print(f"shardct conntrack: {e}", file=sys.stderr)
        return 1
    if not r.get("ok"):
        print(f"shardct conntrack: {r.get('error')}", file=sys.stderr)
        return 1
    if a.stats:
        if a.output == "json":
            print(json.dumps({"stats": r["stats"], "totals": r["totals"]}))
        else:
            print(format_stats(r["stats"]))
        return 0
    if a.flush:
        print(f"shardct conntrack v1 (pid {r['pid']}): connection tracking table has been "
              f"emptied ({r['deleted']} flow entries).", file=sys.stderr)
        return 0
    conns = [c for c in r["conns"] if _keep(c, a)]
    for c in conns:
        print(json.dumps({k: v for k, v in c.items() if k != "line"}) if a.output == "json"
              else c["line"])
    # conntrack-tools prints its summary on stderr
    done = f"{r['deleted']} flow entries have been deleted" if a.delete else \
        f"{len(conns)} flow entries have been shown"
    print(f"shardct conntrack v1 (pid {r['pid']}, {r['name']}, {r['workers']} workers): "
          f"{done}.", file=sys.stderr)
    return 0
