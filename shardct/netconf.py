# The router's view of its network: interfaces (name, MAC, addresses), routes and
# neighbours, from the engine config. Used once per new conn (routing, MASQUERADE and
# REDIRECT addresses), never per packet; ``compiled()`` gives the arrays the compiled NAT
# decision reads. Pure: built from a dict.
"""Interfaces and routes.

Config form (TOML)::

    [interfaces.lan0]
    address = ["10.0.0.3/24", "b::1/64"]
    mac = "02:00:00:00:00:03"

    [[routes]]
    dst = "0.0.0.0/0"
    dev = "wan0"
    via = "192.168.0.254"        # optional

Connected subnets of interface addresses are routes too. ``route(addr)`` is the
longest-prefix match; ``is_local(addr)`` is true for the router's own addresses.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np

from .errors import ConfigError


@dataclass
class Interface:
    name: str
    mac: bytes = b"\x00" * 6
    addresses: list = field(default_factory=list)   # ipaddress.IPv4Interface / IPv6Interface

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
        self._table = []
        for ifc in self.interfaces:
            for a in ifc.addresses:
                self._table.append((a.network, ifc.name))
        for r in self.routes:
            if r.dev not in self._by_name:
                raise ConfigError("routes", f"route to {r.dst} uses unknown interface {r.dev!r}")
            self._table.append((r.dst, r.dev))
        self._table.sort(key=lambda e: -e[0].prefixlen)
        self._local = {a.ip for ifc in self.interfaces for a in ifc.addresses}

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
            ifcs.append(Interface(name, mac, parsed))
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
