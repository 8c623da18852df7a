# The router's view of its network: interfaces (name, MAC, addresses), routes and
# neighbours, from the engine config. Used once per new conn (routing, MASQUERADE and
# REDIRECT addresses), never per packet; compiled to arrays for the batch routing
# kernel (route_batch) and for the compiled NAT decision (``compiled()``). Pure: built
# from a dict.
"""Interfaces and routes.

Config form (TOML)::

    [interfaces.lan0]
    address = ["10.0.0.3/24", "b::1/64"]
    mac = "02:00:00:00:00:03"
    mtu = 1500                   # optional; the largest IP packet sent out of it

    [[routes]]
    dst = "0.0.0.0/0"
    dev = "wan0"
    via = "192.168.0.254"        # optional

Connected subnets of interface addresses are routes too. ``route(addr)`` is the
longest-prefix match; ``is_local(addr)`` is true for the router's own addresses.
``route_batch(batch)`` routes every frame of a batch at once (``Routes``: egress
interface, next hop, local delivery); ``egress(network, batch)`` is the interface id
to label each frame with (replay's output, a TX sink).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np

from . import wire
from .cpu import kernel
from .errors import ConfigError
from .hashing import addr_words


@dataclass
class Interface:
    name: str
    mac: bytes = b"\x00" * 6
    addresses: list = field(default_factory=list)   # ipaddress.IPv4Interface / IPv6Interface
    mtu: int = 1500                                  # the largest IP packet it sends (bytes)

    def primary(self, version: int):
        for a in self.addresses:
            if a.version == version:
                return a.ip
        return None


@dataclass
class Route:
    dst: object        # ip_network
    dev: str
    via: object = None


def parse_mac(s: str, where: str) -> bytes:
    parts = s.split(":")
    if len(parts) != 6:
        raise ConfigError(where, f"mac {s!r}: want six hex bytes separated by ':'")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(where, f"mac {s!r}: not hex") from None


class NetProgram(NamedTuple):
    """A Network as arrays, for compiled routing. Interface j of ``interfaces``; j ==
    n_if stands for "none". Families as index 0 (IPv4) and 1 (IPv6)."""
    n_if: int
    routes: np.ndarray      # uint64[r, 4]: net hi, lo, mask hi, lo (longest prefix first)
    rinfo: np.ndarray       # int64[r, 2]: ip version, interface
    local: np.ndarray       # uint64[l, 2]: the router's own addresses
    lver: np.ndarray        # int64[l]: their ip versions
    prim: np.ndarray        # uint64[n_if, 2, 2]: primary address per interface and family
    has_prim: np.ndarray    # bool[n_if, 2]


def _words(v: int, version: int) -> tuple[int, int]:
    return (0, v) if version == 4 else (v >> 64, v & (2 ** 64 - 1))


class Network:
    def __init__(self, interfaces: list[Interface] | None = None, routes: list[Route] | None = None):
        self.interfaces = list(interfaces or [])
        self.routes = list(routes or [])
        self._by_name = {i.name: k for k, i in enumerate(self.interfaces)}
        if len(self._by_name) != len(self.interfaces):
            raise ConfigError("interfaces", "an interface name appears twice")
        table = []      # (network, interface name, gateway or None)
        for ifc in self.interfaces:
            for a in ifc.addresses:
                table.append((a.network, ifc.name, None))
        for r in self.routes:
            if r.dev not in self._by_name:
                raise ConfigError("routes", f"route to {r.dst} uses unknown interface {r.dev!r}")
            table.append((r.dst, r.dev, r.via))
        table.sort(key=lambda e: -e[0].prefixlen)
        self._table = [(net, dev) for net, dev, _ in table]
        self._vias = [via for _, _, via in table]
        self._local = {a.ip for ifc in self.interfaces for a in ifc.addresses}
        self._compile()

    def _compile(self):
        """The table as arrays for route_kernel: rows in longest-prefix-first order of
        (ipver, net hi, net lo, mask hi, mask lo, interface id, gateway hi, gateway lo,
        has gateway), and the local addresses as (ipver, hi, lo)."""
        rows = np.zeros((len(self._table), 9), dtype=np.uint64)
        for k, ((net, dev), gw) in enumerate(zip(self._table, self._vias)):
            rows[k, 0] = net.version
            rows[k, 1:3] = addr_words(net.network_address.packed)
            rows[k, 3:5] = addr_words(net.netmask.packed)
            rows[k, 5] = self._by_name[dev]
            if gw is not None:
                rows[k, 6:8] = addr_words(gw.packed)
                rows[k, 8] = 1
        self._rows = rows
        loc = sorted(self._local, key=lambda a: (a.version, int(a)))
        self._loc = np.array([(a.version, *addr_words(a.packed)) for a in loc],
                             dtype=np.uint64).reshape(-1, 3)

    @classmethod
    def from_dict(cls, d: dict, where: str = "<config>") -> "Network":
        ifcs = []
        for name, spec in (d.get("interfaces") or {}).items():
            addrs = spec.get("address", [])
            if isinstance(addrs, str):
                addrs = [addrs]
            try:
                parsed = [ipaddress.ip_interface(a) for a in addrs]
            except ValueError as e:
                raise ConfigError(f"{where}: interfaces.{name}", str(e)) from None
            mac = parse_mac(spec["mac"], f"{where}: interfaces.{name}") if "mac" in spec else b"\0" * 6
            mtu = spec.get("mtu", 1500)
            # IPv4's minimum is 68 (RFC 791); an interface that carries IPv6 needs 1280.
            low = 1280 if any(a.version == 6 for a in parsed) else 68
            if type(mtu) is not int or not low <= mtu <= 65535:
                raise ConfigError(f"{where}: interfaces.{name}",
                                  f"mtu {mtu!r}: want an integer in {low}..65535")
            ifcs.append(Interface(name, mac, parsed, mtu))
        routes = []
        for k, r in enumerate(d.get("routes") or []):
            try:
                routes.append(Route(ipaddress.ip_network(r["dst"], strict=False), r["dev"],
                                    ipaddress.ip_address(r["via"]) if "via" in r else None))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{where}: routes[{k}]", f"bad route: {e}") from None
        return cls(ifcs, routes)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.interfaces]

    def index(self, name: str) -> int:
        return self._by_name[name]

    def name(self, ifindex: int) -> str | None:
        return self.interfaces[ifindex].name if 0 <= ifindex < len(self.interfaces) else None

    def interface(self, name: str) -> Interface | None:
        k = self._by_name.get(name)
        return None if k is None else self.interfaces[k]

    def route(self, addr) -> str | None:
        """Egress interface for a destination (longest prefix), None if unroutable."""
        for net, dev in self._table:
            if net.version == addr.version and addr in net:
                return dev
        return None

    def is_local(self, addr) -> bool:
        return addr in self._local

    def route_batch(self, batch, meta=None) -> "Routes":
        """Route every frame of ``batch`` on its destination address as the frame holds
        it now (after NAT rewrote it). ``meta``: wire.parse_batch rows of this batch
        (only the IP version and L3 offset are read, so a parse from before NAT will
        do, e.g. ``Result.meta``); parsed here when None."""
        n = len(batch)
        if meta is None:
            meta, addr = wire.new_meta(n)
            wire.parse_batch(batch.buf, batch.off, batch.length, meta, addr, False)
        out = Routes(np.full(n, -1, dtype=np.int16), np.zeros((n, 2), dtype=np.uint64),
                     np.zeros(n, dtype=np.bool_), np.zeros(n, dtype=np.uint8))
        route_kernel(batch.buf, batch.off, batch.length, meta, self._rows, self._loc,
                     out.egress, out.nexthop, out.local, out.ipver)
        return out


    def compiled(self) -> NetProgram:
        """The arrays ``route_compiled`` and the compiled NAT decision read."""
        r = [[*_words(int(n.network_address), n.version), *_words(int(n.netmask), n.version)]
             for n, _ in self._table]
        ri = [[n.version, self._by_name[dev]] for n, dev in self._table]
        loc = sorted(self._local, key=lambda a: (a.version, int(a)))
        n = len(self.interfaces)
        prim = np.zeros((n, 2, 2), dtype=np.uint64)
        has = np.zeros((n, 2), dtype=np.bool_)
        for j, ifc in enumerate(self.interfaces):
            for f, ver in enumerate((4, 6)):
                a = ifc.primary(ver)
                if a is not None:
                    prim[j, f] = _words(int(a), ver)
                    has[j, f] = True
        return NetProgram(n, np.array(r, dtype=np.uint64).reshape(len(r), 4),
                          np.array(ri, dtype=np.int64).reshape(len(r), 2),
                          np.array([_words(int(a), a.version) for a in loc],
                                   dtype=np.uint64).reshape(len(loc), 2),
                          np.array([a.version for a in loc], dtype=np.int64), prim, has)


@dataclass
class Routes:
    """Per-frame routing of a batch (``Network.route_batch``).

    egress[i]   interface id of the route (for a local address: the interface holding
                it); -1 when not IP or no route
    nexthop[i]  (hi, lo) address words of the next hop: the route's gateway, else the
                destination itself (on-link); zeros when there is no route
    local[i]    addressed to one of the router's own addresses (local delivery)
    ipver[i]    4 or 6; 0 for frames that are not IP or whose IP header is broken
    """
    egress: np.ndarray
    nexthop: np.ndarray
    local: np.ndarray
    ipver: np.ndarray

    def nexthop_address(self, i: int):
        """The next hop of frame i as an ipaddress object, None when unrouted."""
        if self.egress[i] < 0:
            return None
        from .hashing import words_addr
        return ipaddress.ip_address(words_addr(int(self.nexthop[i, 0]), int(self.nexthop[i, 1]),
                                               int(self.ipver[i])))


def egress(network: Network | None, batch, meta=None) -> np.ndarray:
    """Egress interface id (int16) of each frame: its route, or its ingress interface
    when there is no network or no route (a capture writer labels every frame)."""
    if network is None:
        return batch.ifindex
    eg = network.route_batch(batch, meta).egress
    return np.where(eg >= 0, eg, batch.ifindex).astype(np.int16)


@kernel
def route_kernel(buf, off, length, meta, rows, loc, egress, nexthop, local, ipver_out):
    """Longest-prefix match of each frame's destination against ``rows`` (sorted
    longest prefix first, so the first match wins) and a scan of the local addresses.
    Preconditions: meta rows from wire.parse_batch of these frames; output arrays of
    len(off) rows, egress preset to -1, nexthop and local to zero."""
    for i in range(off.shape[0]):
        ver = meta[i, wire.M_IPVER]
        l3 = meta[i, wire.M_L3]
        if ver != 4 and ver != 6:
            continue
        if l3 + (20 if ver == 4 else 40) > length[i]:
            continue
        ipver_out[i] = ver
        hi, lo = wire.load_addr(buf, off[i] + l3 + (16 if ver == 4 else 24), 4 if ver == 4 else 16)
        v = np.uint64(ver)
        for k in range(loc.shape[0]):
            if loc[k, 0] == v and loc[k, 1] == hi and loc[k, 2] == lo:
                local[i] = True
                break
        for k in range(rows.shape[0]):
            if rows[k, 0] == v and (hi & rows[k, 3]) == rows[k, 1] and (lo & rows[k, 4]) == rows[k, 2]:
                egress[i] = np.int16(rows[k, 5])
                if rows[k, 8] != 0:
                    nexthop[i, 0] = rows[k, 6]
                    nexthop[i, 1] = rows[k, 7]
                else:
                    nexthop[i, 0] = hi
                    nexthop[i, 1] = lo
                break


def no_network() -> NetProgram:
    """The NetProgram of no network: no interfaces, routes or addresses."""
    return Network().compiled()


@numba.njit(inline="always", cache=True)
def route_compiled(routes, rinfo, local, lver, n_if, ver, hi, lo):
    """(is_local, egress interface or n_if) for destination (hi, lo) of ``ver``: the
    compiled ``is_local`` and ``route``."""
    for k in range(local.shape[0]):
        if lver[k] == ver and local[k, 0] == hi and local[k, 1] == lo:
            return True, np.int64(n_if)
    for k in range(routes.shape[0]):
        if rinfo[k, 0] == ver and (hi & routes[k, 2]) == routes[k, 0] \
                and (lo & routes[k, 3]) == routes[k, 1]:
            return False, np.int64(rinfo[k, 1])
    return False, np.int64(n_if)
