# Local delivery for `shardct run`: a TAP interface between the engine and this host's own
# stack. Frames the engine routes to the router's own addresses (after DNAT/REDIRECT) are
# written to the TAP; what the host's stack sends on it (a local listener's replies) is
# read back and goes through the engine as locally generated packets (ingress -1: the
# OUTPUT/POSTROUTING hooks, no TTL decrement).
"""The local TAP.

``[local] tap = "sct-tap0"`` in the engine config makes ``shardct run`` create a TAP
device (/dev/net/tun, TUNSETIFF with IFF_TAP | IFF_NO_PI) in its network namespace and
configure the host's side with ``ip`` (iproute2; pyroute2 is not a dependency):

* the link up, its MTU the smallest of the routed interfaces'; IPv6 off on it when the
  config has no IPv6 address, else no link-local address (no DAD or router
  solicitations; the host's MLD reports from :: still come and are not routed);
* every address of the config's interfaces, as /32 or /128 (no connected routes: the
  host's stack must not ARP or solicit on the TAP);
* a gateway that is shardct itself: 169.254.0.1 (IPv4) and fe80::1 (IPv6), permanent
  neighbours with ``GATEWAY_MAC``, and (``routes = true``, the default) a route via it
  for every connected subnet and every ``[[routes]]`` destination of the config. A route
  the host already has for a prefix is left alone and reported: replies to it would not
  reach shardct (the routed interfaces should hold no addresses: the TAP holds them).

The host's kernel must still not route or answer what arrives on the routed interfaces:
with their addresses gone it would answer IPv6 it cannot route with no-route errors
(routing comes before an input hook), so drop their frames at prerouting (nftables
``iifname != "TAP" drop`` in a prerouting filter chain; AF_PACKET sees them first).

The TAP goes away (with its addresses and routes) when shardct closes it.

Per frame this is one read(2) or write(2): the TUN driver has no batched interface. The
engine still gets whole batches (``read`` gathers up to ``max_frames`` frames into one
PacketBatch) and local delivery is the slow path of a router (its own listeners), not the
forwarding path.

Owner: the routing thread (one TapPort, never shared). Needs CAP_NET_ADMIN (root).
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import time

import numpy as np

from shardct.batch import PacketBatch, compact

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
SIOCGIFHWADDR = 0x8927
IFNAMSIZ = 16
GATEWAY_MAC = bytes.fromhex("025343540001")         # "SCT": shardct's side of the TAP
GATEWAY = {4: ipaddress.ip_address("169.254.0.1"), 6: ipaddress.ip_address("fe80::1")}
READ_FRAMES = 256           # frames gathered into one batch per read()
ETH_HDR = 14


def check_name(name) -> str | None:
    """Why ``name`` cannot be an interface name (None when it can)."""
    if not isinstance(name, str) or not 0 < len(name) < IFNAMSIZ:
        return f"tap {name!r}: want a name of 1..{IFNAMSIZ - 1} characters"
    if any(c in name for c in "/: \t\n") or name in (".", ".."):
        return f"tap {name!r}: not an interface name"
    return None


def _ip(*args: str, timeout_s: float = 5.0, check: bool = True) -> subprocess.CompletedProcess:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    cp = subprocess.run([ip, *args], capture_output=True, text=True, timeout=timeout_s)
    if check and cp.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {cp.stderr.strip()}")
    return cp


def host_routes(network) -> list:
    """The destinations the host's stack reaches through the TAP: connected subnets of
    the config's interfaces, then its routes (networks, no duplicates)."""
    out = []
    for ifc in network.interfaces:
        for a in ifc.addresses:
            if a.network not in out:
                out.append(a.network)
    for r in network.routes:
        if r.dst not in out:
            out.append(r.dst)
    return out


class TapPort:
    """The TAP device ``name`` and its file descriptor (non-blocking).

    ``read(now)``: a new PacketBatch (the caller's) of up to ``max_frames`` frames the
    host's stack sent, ``ifindex`` -1 (locally generated), ``ts`` = ``now``.
    ``deliver(batch, mask)``: rewrites the Ethernet header of the selected frames in ``batch.buf`` (destination:
    the TAP's MAC, source: GATEWAY_MAC) and writes them to the host; returns how many
    were written. Counters: ``read_frames``, ``delivered``, ``errors`` (a write the
    kernel refused; its queue is full when the host's stack does not read)."""

    def __init__(self, name: str, mtu: int = 1500, max_frames: int = READ_FRAMES):
        self.name, self.mtu, self.max_frames = name, mtu, max_frames
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                         IFF_TAP | IFF_NO_PI))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifr = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
            self.mac = ifr[18:24]
        except OSError:
            os.close(self.fd)
            raise
        self.slot = ETH_HDR + 4 + max(mtu, 1500)      # room for a VLAN tag
        self.buf = np.empty(self.slot * max_frames, dtype=np.uint8)
        self._views = [memoryview(self.buf)[k * self.slot:(k + 1) * self.slot]
                       for k in range(max_frames)]
        self._hdr = np.concatenate((np.frombuffer(self.mac, dtype=np.uint8),
                                    np.frombuffer(GATEWAY_MAC, dtype=np.uint8)))
        self.read_frames = self.delivered = self.errors = 0
        self.routes_kept: list = []        # prefixes the host already routed elsewhere

    def configure(self, network, routes: bool = True):
        """The host's side (see the module docstring). Precondition: ``network`` is the
        engine's (the TAP gets its addresses)."""
        n = self.name
        fams = {a.version for ifc in network.interfaces for a in ifc.addresses}
        if 6 not in fams:
            try:        # no IPv6 chatter (router solicitations, MLD) from the host on it
                with open(f"/proc/sys/net/ipv6/conf/{n}/disable_ipv6", "w") as f:
                    f.write("1")
            except OSError:
                pass
        else:           # no link-local address: no DAD or router solicitations from it
            _ip("link", "set", n, "addrgenmode", "none")
        _ip("link", "set", n, "mtu", str(self.mtu), "up")
        for ifc in network.interfaces:
            for a in ifc.addresses:
                plen = 32 if a.version == 4 else 128
                extra = [] if a.version == 4 else ["nodad"]
                _ip("addr", "replace", f"{a.ip}/{plen}", "dev", n, *extra)
        for ver in sorted(fams):
            _ip("neigh", "replace", str(GATEWAY[ver]), "lladdr", GATEWAY_MAC.hex(":"),
                "dev", n, "nud", "permanent")
        if not routes:
            return
        for net in host_routes(network):
            if net.version not in fams:
                continue
            cp = _ip(f"-{net.version}", "route", "add", str(net), "via", str(GATEWAY[net.version]),
                     "dev", n, "onlink", check=False)
            if cp.returncode != 0:
                if "exists" not in cp.stderr:
                    raise OSError(f"ip route add {net} via the TAP: {cp.stderr.strip()}")
                self.routes_kept.append(net)

    def read(self, now: int) -> PacketBatch:
        """What the host's stack sent since the last call (at most ``max_frames``)."""
        k = 0
        lengths = np.empty(self.max_frames, dtype=np.int32)
        while k < self.max_frames:
            try:
                got = os.readv(self.fd, [self._views[k]])
            except (BlockingIOError, InterruptedError):
                break
            if got <= 0:
                break
            lengths[k] = got
            k += 1
        self.read_frames += k
        off = np.arange(k, dtype=np.int64) * self.slot
        # a copy of just the frames: the caller's to keep while the slots are read again
        return compact(PacketBatch(self.buf, off, lengths[:k], np.full(k, -1, dtype=np.int16),
                                   np.full(k, now, dtype=np.int64), shared=True))

    def deliver(self, batch: PacketBatch, mask: np.ndarray) -> int:
        idx = np.flatnonzero(mask)
        if idx.shape[0] == 0:
            return 0
        idx = idx[batch.length[idx] >= ETH_HDR]
        batch.buf[batch.off[idx][:, None] + np.arange(12)] = self._hdr
        mv = memoryview(batch.buf)
        sent = 0
        for i in idx:
            o = int(batch.off[i])
            try:
                os.write(self.fd, mv[o:o + int(batch.length[i])])
                sent += 1
            except (BlockingIOError, OSError):
                self.errors += 1
        self.delivered += sent
        return sent

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_local(local: dict, network, log) -> TapPort | None:
    """The TAP the config's ``[local]`` asks for (None without one), configured; raises
    OSError when it cannot be made."""
    if not local or not local.get("tap"):
        return None
    mtu = min((i.mtu for i in network.interfaces), default=1500)
    tap = TapPort(local["tap"], mtu)
    try:
        tap.configure(network, local.get("routes", True))
    except (OSError, subprocess.SubprocessError):
        tap.close()
        raise
    for net in tap.routes_kept:
        log(f"local: the host already routes {net}; its replies there do not reach {tap.name}")
    log(f"local: {tap.name} ({tap.mac.hex(':')}) holds the router's addresses")
    return tap


def now_ns() -> int:
    """The stamp of frames read from the TAP: CLOCK_REALTIME, as the rings' stamps."""
    return time.time_ns()
