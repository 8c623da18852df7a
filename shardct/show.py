# Text output in conntrack-tools' formats: `conntrack -L` lines (libnetfilter_conntrack
# snprintf_default.c), `-E` event lines and `-S` statistics. Pure formatting.
"""Formatting conns, events and statistics the way conntrack(8) prints them."""
from __future__ import annotations

from .conntrack import Conn, Event, Tuple

L4_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_ECHO = {4: (8, 0), 6: (128, 129)}


def _tuple_fields(t: Tuple, ipver: int, reply: bool) -> str:
    s = f"src={t.src} dst={t.dst} "
    if t.proto in (6, 17):
        return s + f"sport={t.sport} dport={t.dport} "
    if t.proto in (1, 58):
        # query tuples (wire.py): request (ident, key), reply (key, ident); key 0 is echo,
        # else the request's type (its reply is type + 1)
        ident, key = (t.dport, t.sport) if reply else (t.sport, t.dport)
        ty = _ECHO[ipver][reply] if key == 0 else key + reply
        return s + f"type={ty} code=0 id={ident} "
    return s


def format_conn(c: Conn, now: int, *, extended: bool = False, counters: bool = True) -> str:
    """One `conntrack -L` line (`-o extended` adds the l3 columns)."""
    ipver = c.original.src.version
    out = ""
    if extended:
        out += f"{'ipv4' if ipver == 4 else 'ipv6':<8} {2 if ipver == 4 else 10} "
    name = L4_NAMES.get(c.proto, "unknown")
    out += f"{name:<8} {c.proto} {c.timeout(now)} "
    if c.state is not None:
        out += f"{c.state} "
    out += _tuple_fields(c.original, ipver, False)
    if counters:
        out += f"packets={c.packets[0]} bytes={c.bytes[0]} "
    if "SEEN_REPLY" not in c.status:
        out += "[UNREPLIED] "
    out += _tuple_fields(c.reply, ipver, True)
    if counters:
        out += f"packets={c.packets[1]} bytes={c.bytes[1]} "
    if "ASSURED" in c.status:
        out += "[ASSURED] "
    out += "mark=0 use=1"
    return out


def format_event(e: Event, now: int | None = None) -> str:
    """One `conntrack -E` line: `[NEW] tcp 6 120 SYN_SENT src=...`."""
    tag = {"NEW": "    [NEW] ", "UPDATE": " [UPDATE] ", "DESTROY": "[DESTROY] "}[e.kind]
    line = format_conn(e.conn, e.time if now is None else now, counters=e.kind == "DESTROY")
    if e.kind == "DESTROY":
        # conntrack -E prints no timeout for destroyed entries
        head, _, rest = line.partition(" ")
        proto_num, _, rest = rest.strip().partition(" ")
        _, _, rest = rest.partition(" ")
        line = f"{head:<8} {proto_num} {rest}"
    return tag + line.replace(" mark=0 use=1", "")


CONNTRACK_S_FIELDS = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop",
                      "error", "search_restart")


def format_stats(stats: dict, cpu: int = 0) -> str:
    """A `conntrack -S` line (one per worker, as the kernel prints one per CPU)."""
    parts = [f"cpu={cpu:<4}"] + [f"{k}={stats.get(k, 0)} " for k in CONNTRACK_S_FIELDS]
    return " ".join(p.strip() if i == len(parts) - 1 else p.rstrip() for i, p in enumerate(parts))
