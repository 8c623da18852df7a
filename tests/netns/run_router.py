"""`shardct run` as the router between two network namespaces (no tests here).

    <prefix>-cli  cli0 10.0.0.2 ---- rtr-in 10.0.0.3 | <prefix>-rtr | rtr-out 192.168.0.1 ---- srv0 192.168.0.2  <prefix>-srv
                                                       shardct run: MASQUERADE out of rtr-out

The namespaces come from kernel_router.KernelRouter (offloads off, permanent neighbours,
cleanup on every exit path) with the endpoints un-muted so their own stacks talk, and the
router's kernel kept out of the way: forwarding off (net.ipv4.ip_forward=0) and an
nftables table dropping its IP input and output, so only shardct forwards and the kernel
never answers for the router's addresses (no RSTs, no port-unreachables). shardct reads
and sends on rtr-in and rtr-out through AF_PACKET rings; next hop MACs come from the
router namespace's (permanent) neighbour table.

Every wait is bounded; every process started here is ended by its pid, or dies with the
process that started it (live_router.Proc).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import kernel_router as KR  # noqa: E402
import live_router as LR  # noqa: E402

PREFIX_BASE = "sct13r"          # + 4 hex of the pid (KernelRouter's prefix rule)
UDP_PORT = 9000
BLOB_MB = 8
WAN_MTU = 1400                  # shardct's rtr-out (the veth says 1500): DF 1450 is too big

ROUTER_MUTE = """\
table inet sct13r_mute {
    chain input { type filter hook input priority -400; policy drop; }
    chain output { type filter hook output priority -400; policy drop; }
}
"""
KERNEL_FORWARDING_OFF = {"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0}
MASQ_RULES = LR.MASQ_RULES      # -A POSTROUTING -s 10.0.0.0/24 -o rtr-out -j MASQUERADE
ENGINE_TOML = LR.ENGINE_TOML.replace(       # the same interfaces and rules, INVALID dropped
    "max_conns = 65536\n", "max_conns = 65536\ndrop_invalid = true\n").replace(
    'address = ["192.168.0.1/24"]\n', 'address = ["192.168.0.1/24"]\nmtu = ' + str(WAN_MTU) + '\n')

# UDP echo in the server: answers each datagram with the sender's address it saw
UDP_ECHO = f"""\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.168.0.2", {UDP_PORT}))
s.settimeout(60)
print("listening", file=sys.stderr, flush=True)
for _ in range(10):
    data, peer = s.recvfrom(65535)
    said = data if len(data) < 100 else b"big %d" % len(data)
    s.sendto(said + b" from " + peer[0].encode(), peer)
"""
UDP_CLIENT = f"""\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for k in range(3):
    s.sendto(b"ping%d" % k, ("192.168.0.2", {UDP_PORT}))
    print(s.recvfrom(2048)[0].decode())
"""
# a 4000-byte UDP datagram: the client's kernel sends it as three fragments (MTU 1500,
# no DF), which leave re-fragmented at WAN_MTU
FRAG_CLIENT = f"""\
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"F" * 4000, ("192.168.0.2", {UDP_PORT}))
try:
    print(s.recvfrom(2048)[0].decode())
except socket.timeout:
    print("none")
"""


def icmp_probe(label: str, itype: int, icode: int | None, dst: str, port: int, size: int,
               setup: str = "") -> str:
    """Client code: one UDP datagram of ``size`` bytes to dst:port (after ``setup`` on
    socket ``u``); prints "<label> from <source> code <code>" (and " mtu <n>" for
    frag-needed) of the first ICMP of type ``itype`` (and code ``icode``) that comes
    back within 3 s, else "none"."""
    return f"""\
import socket, time
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
{setup}
u.sendto(b"p" * {size}, ({dst!r}, {port}))
end, got = time.monotonic() + 3, "none"
while got == "none" and time.monotonic() < end:
    icmp.settimeout(max(0.01, end - time.monotonic()))
    try:
        pkt, src = icmp.recvfrom(2048)
    except socket.timeout:
        break
    ihl = (pkt[0] & 15) * 4
    if pkt[ihl] == {itype} and {icode!r} in (None, pkt[ihl + 1]):
        got = f"{label} from {{src[0]}} code {{pkt[ihl + 1]}}"
        if pkt[ihl + 1] == 4:
            got += f" mtu {{int.from_bytes(pkt[ihl + 6:ihl + 8], 'big')}}"
print(got)
"""


# a UDP datagram with TTL 1: time-exceeded
TTL_PROBE = icmp_probe("time-exceeded", 11, None, "192.168.0.2", UDP_PORT + 1, 4,
                       "u.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)")
# 1450 bytes with DF (IP_PMTUDISC_PROBE: DF set, the cached path MTU ignored): frag-needed
DF_PROBE = icmp_probe("frag-needed", 3, 4, "192.168.0.2", UDP_PORT + 2, 1450 - 28,
                      "u.setsockopt(socket.IPPROTO_IP, 10, 3)   # IP_MTU_DISCOVER, PROBE")
# UDP to the router's own LAN address, where nothing listens: port unreachable
LOCAL_PROBE = icmp_probe("port-unreachable", 3, 3, "10.0.0.3", UDP_PORT + 3, 4)


def why_not() -> str | None:
    """None when this can run here, else the reason to skip."""
    return LR.why_not()       # root, ip, nft, conntrack, ethtool, curl, namespaces


class RunRouter(LR.LiveRouter):
    """The namespaces with shardct as the router, an 8 MiB file to serve; a context
    manager (everything ends on exit)."""

    def __init__(self):
        self.kr = KR.KernelRouter(prefix=f"{PREFIX_BASE}{os.getpid() & 0xFFFF:04x}",
                                  nft_rules=ROUTER_MUTE, router_sysctls=KERNEL_FORWARDING_OFF)
        self.tmp = tempfile.mkdtemp(prefix="sct13r-")
        self.procs: list[LR.Proc] = []

    def __enter__(self):
        KR.cleanup_stale(PREFIX_BASE + "????")
        try:
            self.kr.start()
            for ns in (self.kr.ns_client, self.kr.ns_server):   # let the endpoints talk
                KR._ns_exec(ns, [KR._tool("nft"), "delete", "table", "inet", "sct_mute"])
            for name, text in (("masq.rules", MASQ_RULES), ("engine.toml", ENGINE_TOML)):
                with open(os.path.join(self.tmp, name), "w") as f:
                    f.write(text)
            os.makedirs(os.path.join(self.tmp, "www"))
            self.blob = os.urandom(BLOB_MB << 20)
            with open(os.path.join(self.tmp, "www", "blob"), "wb") as f:
                f.write(self.blob)
        except BaseException:
            self.close()
            raise
        return self

    def http_argv(self) -> list[str]:
        """live_router's http.server without the reverse DNS lookup of its own address at
        start (socket.getfqdn): that query would leave through shardct, which drops it
        (no route), and stall the start."""
        rest = super().http_argv()[3:]      # after python3 -m http.server
        return [sys.executable, "-c", "import runpy, socket, sys; "
                "socket.getfqdn = lambda name='': name; "
                f"sys.argv = {['http.server'] + rest!r}; "
                "runpy.run_module('http.server', run_name='__main__')"]

    def run(self, duration: float, *extra: str) -> LR.Proc:
        """`shardct run` in the router namespace (returns once it routes)."""
        p = self.start(self.kr.ns_router,
                       [sys.executable, "-m", "workers.cli", "run",
                        "-c", os.path.join(self.tmp, "engine.toml"),
                        "--duration", str(duration), "--list", "-1", *extra], cwd=ROOT)
        if not p.wait_line("ready, routing", 600):     # a cold numba cache compiles
            p.end()
            raise KR.KernelRouterError("shardct run did not get ready:\n"
                                       + "".join(p.err)[-2000:])
        return p

    def download(self, max_time: float = 30.0) -> tuple[str, bytes | None]:
        """curl the blob from the client: (curl's "code size seconds", the bytes)."""
        out = os.path.join(self.tmp, "got")
        url = f"http://{self.kr.server_ip4}:{LR.HTTP_PORT}/blob"
        cp = KR._ns_exec(self.kr.ns_client,
                         [KR._tool("curl"), "-s", "-o", out, "-w",
                          "%{http_code} %{size_download} %{time_total}",
                          "--max-time", str(max_time), url], check=False, timeout=max_time + 5)
        try:
            with open(out, "rb") as f:
                got = f.read()
        except OSError:
            got = None
        return cp.stdout.strip() or f"rc={cp.returncode} {cp.stderr.strip()}", got

    def client_python(self, code: str, timeout: float = 10.0) -> str:
        cp = KR._ns_exec(self.kr.ns_client, [sys.executable, "-c", code], check=False,
                         timeout=timeout)
        return cp.stdout + cp.stderr


def sha(b: bytes | None) -> str:
    return "-" if b is None else hashlib.sha256(b).hexdigest()[:16]
