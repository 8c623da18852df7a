# The router's view of its network: interfaces (name, MAC, addresses), routes and
# neighbours, from the engine config. Used once per new conn (routing, MASQUERADE and
# REDIRECT addresses), never per packet. Pure: built from a dict.
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
