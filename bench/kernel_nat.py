"""The Linux kernel doing the NAT: nftables MASQUERADE on a namespace router, measured.

Topology (namespaces and veth pairs created here, named with the prefix ``bk16`` and this
process's pid; addresses exist only inside these namespaces)::

    bk16-<pid>-c              bk16-<pid>-r                     bk16-<pid>-s
    bk16c<pid> ----- bk16r<pid>i | bk16r<pid>o ----- bk16s<pid>
    10.77.0.2/24       10.77.0.1/24   10.78.0.1/24       10.78.0.2/24

The router forwards with ``ip_forward=1`` and, in the NAT run, an nftables ``ip nat``
postrouting chain with ``oifname <out> masquerade``; the server drops the UDP in an nftables
input chain (no port-unreachables back). A Python sender in the client namespace sends
64-byte-payload UDP packets over ``--flows`` source ports to the server, bounded by a packet
count and a deadline. Per run: packets sent, packets the server's input chain counted, the
forwarded rate, loss, and the CPU time per packet of the softirq work (``/proc/stat``
softirq ticks, all CPUs, before/after: veth forwarding, conntrack and NAT run in the
NET_RX softirq), once with plain forwarding and once with MASQUERADE: the difference is
what conntrack+NAT cost the kernel per packet.

What limits the rate: the single Python sender (a ``sendto`` syscall per packet, about
1-3 us here), not the router. With zero loss the rate is a lower bound of the router's
zero-loss rate, and says so.

Root and ``ip netns`` are needed; otherwise it skips and says why. Everything it creates
is removed on every exit path (finally, SIGTERM/SIGINT/SIGHUP handler, atexit).

    python3 bench/kernel_nat.py [--quick] [--packets 2000000] [--seconds 6] [--flows 512]
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time

QUICK = dict(packets=300_000, seconds=2.0, flows=256)
FULL = dict(packets=3_000_000, seconds=6.0, flows=512)
CMD_TIMEOUT = 20.0

SENDER = r"""
import socket, sys, time
dst, n, secs, flows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
socks = []
for k in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 20000 + k))
    socks.append(s)
payload = b"x" * 64
addr = (dst, 9)
sent = 0
t0 = time.perf_counter()
end = t0 + secs
while sent < n:
    for s in socks:
        s.sendto(payload, addr)
    sent += flows
    if time.perf_counter() > end:
        break
print(sent, time.perf_counter() - t0)
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root (namespaces and nftables need CAP_NET_ADMIN)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed"
    try:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=CMD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` unavailable ({e})"
    if r.returncode != 0:
        return f"`ip netns` unavailable: {r.stderr.strip()}"
    return None


def softirq_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()      # cpu user nice system idle iowait irq softirq ...
    return int(parts[7])


class Topology:
    """The three namespaces; ``close()`` removes them (idempotent)."""

    def __init__(self, tag: str | None = None):
        tag = tag or str(os.getpid())
        self.ns = {k: f"bk16-{tag}-{k}" for k in ("c", "r", "s")}
        self.ifs = {"c": f"bk16c{tag}"[:15], "ri": f"bk16r{tag}i"[:15],
                    "ro": f"bk16r{tag}o"[:15], "s": f"bk16s{tag}"[:15]}
        self.made: list[str] = []
        self._old = {}

    def run(self, *cmd, ns=None, check=True, input=None):
        full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
        r = subprocess.run(full, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                           input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(full)}: {r.stderr.strip()}")
        return r.stdout

    def open(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._on_signal)
        atexit.register(self.close)
        for ns in self.ns.values():
            self.run("ip", "netns", "add", ns)
            self.made.append(ns)
        c, r, s = self.ns["c"], self.ns["r"], self.ns["s"]
        i = self.ifs
        self.run("ip", "link", "add", i["c"], "netns", c, "type", "veth", "peer", "name",
                 i["ri"], "netns", r)
        self.run("ip", "link", "add", i["ro"], "netns", r, "type", "veth", "peer", "name",
                 i["s"], "netns", s)
        for ns, dev, addr in ((c, i["c"], "10.77.0.2/24"), (r, i["ri"], "10.77.0.1/24"),
                              (r, i["ro"], "10.78.0.1/24"), (s, i["s"], "10.78.0.2/24")):
            self.run("ip", "addr", "add", addr, "dev", dev, ns=ns)
            self.run("ip", "link", "set", dev, "up", ns=ns)
            self.run("ip", "link", "set", "lo", "up", ns=ns)
        self.run("ip", "route", "add", "default", "via", "10.77.0.1", ns=c)
        self.run("ip", "route", "add", "default", "via", "10.78.0.1", ns=s)
        self.run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
        # the server swallows the test traffic (no ICMP port-unreachable back)
        self.run("nft", "-f", "-", ns=s, input="table inet bk16 {\n chain input {\n  type filter "
                 "hook input priority 0; policy accept;\n  udp dport 9 counter drop\n }\n}\n")
        return self

    def nat(self, on: bool):
        r = self.ns["r"]
        self.run("nft", "delete", "table", "ip", "bk16nat", ns=r, check=False)
        if on:
            self.run("nft", "-f", "-", ns=r, input=(
                "table ip bk16nat {\n chain post {\n  type nat hook postrouting priority 100;\n"
                f'  oifname "{self.ifs["ro"]}" masquerade\n }}\n}}\n'))
        self.run("sh", "-c", "command -v conntrack >/dev/null && conntrack -F 2>/dev/null; true",
                 ns=r, check=False)

    def rx_packets(self) -> int:
        """Test packets that reached the server (its input chain's counter)."""
        out = self.run("nft", "list", "chain", "inet", "bk16", "input", ns=self.ns["s"])
        m = re.search(r"counter packets (\d+)", out)
        if m is None:
            raise RuntimeError(f"no counter in the server's chain: {out!r}")
        return int(m.group(1))

    def conntrack_count(self) -> int | None:
        out = self.run("cat", "/proc/sys/net/netfilter/nf_conntrack_count", ns=self.ns["r"],
                       check=False).strip()
        return int(out) if out.isdigit() else None

    def close(self):
        for ns in reversed(self.made):      # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=CMD_TIMEOUT)
        self.made = []
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _on_signal(self, sig, frame):
        self.close()
        raise SystemExit(128 + sig)

    def send(self, packets, seconds, flows):
        """(sent, seconds, received, softirq seconds) of one bounded sender run."""
        rx0, si0 = self.rx_packets(), softirq_ticks()
        r = subprocess.run(["ip", "netns", "exec", self.ns["c"], sys.executable, "-c", SENDER,
                            "10.78.0.2", str(packets), str(seconds), str(flows)],
                           capture_output=True, text=True, timeout=seconds + CMD_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"sender: {r.stderr.strip()}")
        sent, dt = r.stdout.split()
        time.sleep(0.2)         # let the last packets through
        rx, si = self.rx_packets() - rx0, softirq_ticks() - si0
        return int(sent), float(dt), rx, si / os.sysconf("SC_CLK_TCK")


def measure(packets=3_000_000, seconds=6.0, flows=512, out=print) -> dict:
    """{"skipped": why} or per mode ("forward", "masquerade"): sent, received, kpps, loss,
    softirq ns per packet; and "nat_softirq_ns" (masquerade less forward)."""
    why = skip_reason()
    if why:
        if out:
            out(f"kernel NAT (nftables MASQUERADE): skipped: {why}")
        return {"skipped": why}
    topo = Topology()
    res = {"flows": flows, "limit": "sender: one Python process, one sendto per packet"}
    try:
        topo.open()
        for mode in ("forward", "masquerade"):
            topo.nat(mode == "masquerade")
            topo.send(min(packets, 20_000), 1.0, flows)      # ARP, conntrack entries, caches
            sent, dt, rx, si = topo.send(packets, seconds, flows)
            res[mode] = {"sent": sent, "received": rx, "seconds": dt,
                         "kpps": rx / dt / 1e3, "loss": sent - rx,
                         "softirq_ns_per_packet": si / max(1, rx) * 1e9,
                         "conntrack_entries": topo.conntrack_count()}
    finally:
        topo.close()
    f, m = res["forward"], res["masquerade"]
    res["nat_softirq_ns"] = m["softirq_ns_per_packet"] - f["softirq_ns_per_packet"]
    if out:
        out(f"kernel NAT: client ns -> router ns (nftables) -> server ns, 64 B UDP payload, "
            f"{flows} flows; limited by {res['limit']}")
        for mode in ("forward", "masquerade"):
            r = res[mode]
            z = "zero loss" if r["loss"] == 0 else f"lost {r['loss']:,}"
            out(f"  {mode:<11} {r['kpps']:8.1f} kpps forwarded ({r['received']:,} of "
                f"{r['sent']:,}, {z}); softirq CPU {r['softirq_ns_per_packet']:7.0f} ns/packet; "
                f"conntrack entries {r['conntrack_entries']}")
        out(f"  conntrack + MASQUERADE in softirq: {res['nat_softirq_ns']:+.0f} ns/packet over "
            f"plain forwarding (tick-sampled /proc/stat softirq, all CPUs)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--packets", type=int, help="packets per run at most")
    ap.add_argument("--seconds", type=float, help="seconds per run at most")
    ap.add_argument("--flows", type=int, help="UDP source ports (conns)")
    a = ap.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return measure(a.packets, a.seconds, a.flows)


if __name__ == "__main__":
    main()
