"""A Linux kernel NAT router in network namespaces, driven with raw Ethernet frames.

Helper for kernel-differential tests (no tests in here). It builds three namespaces

    <prefix>-cli              <prefix>-rtr                   <prefix>-srv
    cli0 ---------------- rtr-in | rtr-out ------------------- srv0
    10.0.0.2/24          10.0.0.3/24  192.168.0.1/24          192.168.0.2/24
    b::2/64              b::1/64      a::1/64                 a::2/64
    02:00:00:00:00:02    02:00:00:00:00:03
                                      02:00:00:00:01:01       02:00:00:00:01:02

(the client-side MACs and addresses are the ones tests/core/test_nat.py uses), loads an
nftables ruleset into the router namespace, and lets a test inject full Ethernet frames on the
endpoint veths (AF_PACKET) and collect the frames the router sends back out.

The setup follows reference/kernel-behaviour.md ("Building a kernel-differential test that tells
the truth"):

* router: ip_forward=1, IPv6 forwarding=1, rp_filter=0, send_redirects=0, ICMP rate limits off
  (so back-to-back ICMP errors are never suppressed), permanent neighbour entries on every
  link, no DAD;
* offloads (rx, tx, tso, gso, gro) off on every veth, checked after setting;
* the endpoint kernels are muted by an nftables ``inet`` table dropping all input and output, so
  they never answer with RSTs or port-unreachables of their own; capturing happens on the
  endpoint veths before that table, with AF_PACKET, only for frames arriving from the router
  (PACKET_HOST / PACKET_OTHERHOST; the router's own IPv6 multicast chatter such as MLD reports
  is PACKET_MULTICAST and ignored unless ``include_multicast=True``).

Namespaces are removed on every exit path: context-manager exit, exceptions in setup, SIGTERM /
SIGHUP / SIGINT (handlers chain to the previous ones) and atexit. Each router writes an owner
marker (pid + process start time) before creating anything, so ``cleanup_stale()`` can remove
what a killed (SIGKILL) run left behind without touching a concurrent live run.

Every wait is bounded: subprocesses have timeouts, capture windows are deadlines, helper threads
are joined with a timeout.

Sockets are created in the endpoint namespaces from a short-lived helper thread that calls
setns(CLONE_NEWNET) and exits; the main thread's namespace is never changed. An AF_PACKET
socket stays bound to the namespace it was created in.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import fnmatch
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

__all__ = [
    "KernelRouter", "KernelRouterError", "available", "cleanup_stale", "list_netns",
    "Addr", "PREFIX_BASE", "CLIENT", "SERVER",
]

PREFIX_BASE = "sct"               # every namespace this harness creates starts with this
CLIENT, SERVER = "client", "server"
SIDES = (CLIENT, SERVER)

NETNS_DIR = "/run/netns"
MARKER_DIR = "/run/shardct-netns"  # <prefix> -> "pid starttime"

CMD_TIMEOUT = 10.0                 # seconds, every subprocess
THREAD_TIMEOUT = 5.0               # seconds, the setns helper thread

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
_INCOMING = {socket.PACKET_HOST, socket.PACKET_OTHERHOST}
_INCOMING_MC = _INCOMING | {socket.PACKET_BROADCAST, socket.PACKET_MULTICAST}

_TOOLS = ("ip", "nft", "conntrack", "ethtool")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")


class KernelRouterError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# small utilities

def _which(tool: str) -> str | None:
    p = shutil.which(tool)
    if p:
        return p
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        cand = os.path.join(d, tool)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _tool(tool: str) -> str:
    p = _which(tool)
    if p is None:
        raise KernelRouterError(f"{tool} not found (run .ci/install-netns-deps.sh)")
    return p


def _run(argv: list[str], *, input: str | None = None, check: bool = True,
         timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise KernelRouterError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        raise KernelRouterError(
            f"command failed ({cp.returncode}): {' '.join(argv)}\n{cp.stderr.strip()}")
    return cp


def _ns_exec(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return _run([_tool("ip"), "netns", "exec", ns] + argv, **kw)


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    cp = _run([_tool("ip"), "netns", "list"], check=False)
    names = []
    for line in cp.stdout.splitlines():
        line = line.strip()
        if line:
            names.append(line.split()[0])
    return names


def _del_netns(name: str) -> None:
    ip = _which("ip")
    if ip is None:
        return
    try:
        subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=CMD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


_libc = None


def _setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):                      # Python 3.12+
        os.setns(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def _in_netns(ns: str, fn, timeout: float = THREAD_TIMEOUT):
    """Run fn() in a fresh thread that has joined network namespace `ns`; return its result.

    Only that thread switches namespace (and then exits), so the caller is never affected."""
    result: dict = {}

    def target():
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the caller
            result["error"] = e

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise KernelRouterError(f"helper thread in netns {ns} did not finish in {timeout}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _proc_starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may contain spaces and parentheses
    rest = stat.rsplit(")", 1)[-1].split()
    return rest[19] if len(rest) > 19 else None


def _owner_alive(prefix: str) -> bool:
    try:
        with open(os.path.join(MARKER_DIR, prefix)) as f:
            pid_s, start = f.read().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _proc_starttime(pid) == start


def _write_marker(prefix: str) -> None:
    os.makedirs(MARKER_DIR, exist_ok=True)
    pid = os.getpid()
    with open(os.path.join(MARKER_DIR, prefix), "w") as f:
        f.write(f"{pid} {_proc_starttime(pid)}\n")


def _remove_marker(prefix: str) -> None:
    try:
        os.unlink(os.path.join(MARKER_DIR, prefix))
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# availability and stale cleanup

_available_cache: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") when the harness can run here, else (False, why). Cached after the first call."""
    global _available_cache
    if _available_cache is not None:
        return _available_cache
    _available_cache = _check_available()
    return _available_cache


def _check_available() -> tuple[bool, str]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "kernel router tests need root (network namespaces, AF_PACKET)"
    missing = [t for t in _TOOLS if _which(t) is None]
    if missing:
        return False, f"missing tools: {', '.join(missing)} (run .ci/install-netns-deps.sh)"
    if not hasattr(socket, "AF_PACKET"):
        return False, "no AF_PACKET sockets on this platform"
    probe = f"{PREFIX_BASE}probe{secrets.token_hex(2)}"
    try:
        cp = _run([_tool("ip"), "netns", "add", probe], check=False)
        if cp.returncode != 0:
            return False, f"`ip netns add` failed: {cp.stderr.strip()}"
        cp = _ns_exec(probe, [_tool("nft"), "add", "table", "inet", "probe"], check=False)
        if cp.returncode != 0:
            return False, f"nftables does not work in a network namespace: {cp.stderr.strip()}"
        try:
            _in_netns(probe, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
        except Exception as e:  # noqa: BLE001
            return False, f"cannot open AF_PACKET socket in a namespace: {e}"
    except KernelRouterError as e:
        return False, str(e)
    finally:
        _del_netns(probe)
    return True, ""


def cleanup_stale(prefix_glob: str = PREFIX_BASE + "[0-9a-f][0-9a-f][0-9a-f][0-9a-f]",
                  *, force: bool = False) -> list[str]:
    """Delete namespaces `<prefix>-cli|-rtr|-srv` left by killed runs; return the names deleted.

    `prefix_glob` must start with this harness's prefix (``sct``). A prefix whose owner process
    (recorded in /run/shardct-netns/<prefix>) is still alive is skipped unless `force`."""
    if not prefix_glob.startswith(PREFIX_BASE) or "*" in prefix_glob[:len(PREFIX_BASE)]:
        raise ValueError(f"prefix_glob must start with {PREFIX_BASE!r}: {prefix_glob!r}")
    removed = []
    prefixes = set()
    for name in list_netns():
        base, _, suffix = name.rpartition("-")
        if suffix not in ("cli", "rtr", "srv") or not fnmatch.fnmatchcase(base, prefix_glob):
            continue
        if base in _LIVE_PREFIXES or (not force and _owner_alive(base)):
            continue
        _del_netns(name)
        removed.append(name)
        prefixes.add(base)
    # markers whose namespaces are already gone
    try:
        markers = os.listdir(MARKER_DIR)
    except OSError:
        markers = []
    for base in markers:
        if fnmatch.fnmatchcase(base, prefix_glob) and base not in _LIVE_PREFIXES \
                and (force or not _owner_alive(base)):
            prefixes.add(base)
    for base in prefixes:
        _remove_marker(base)
    return removed


# --------------------------------------------------------------------------------------------
# exit-path cleanup shared by all routers of this process

_LIVE: set["KernelRouter"] = set()
_LIVE_PREFIXES: set[str] = set()
_handlers_installed = False
_prev_handlers: dict[int, object] = {}
_lock = threading.RLock()


def _close_all() -> None:
    for r in list(_LIVE):
        try:
            r.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def _on_signal(signum, frame):
    _close_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)              # e.g. default_int_handler -> KeyboardInterrupt
    elif prev == signal.SIG_IGN:
        return
    else:                                # SIG_DFL: die of the same signal
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _handlers_installed
    with _lock:
        if _handlers_installed:
            return
        _handlers_installed = True
        atexit.register(_close_all)
        if threading.current_thread() is not threading.main_thread():
            return                        # signal.signal only works in the main thread
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                prev = signal.getsignal(sig)
                if prev is None:          # installed from C; cannot chain to it, leave it
                    continue
                _prev_handlers[sig] = prev
                signal.signal(sig, _on_signal)
            except (ValueError, OSError):
                pass


# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Addr:
    client_mac: str = "02:00:00:00:00:02"
    router_client_mac: str = "02:00:00:00:00:03"
    router_server_mac: str = "02:00:00:00:01:01"
    server_mac: str = "02:00:00:00:01:02"
    client_ip4: str = "10.0.0.2"
    router_client_ip4: str = "10.0.0.3"
    router_server_ip4: str = "192.168.0.1"
    server_ip4: str = "192.168.0.2"
    client_ip6: str = "b::2"
    router_client_ip6: str = "b::1"
    router_server_ip6: str = "a::1"
    server_ip6: str = "a::2"
    plen4: int = 24
    plen6: int = 64


_MUTE_RULES = """\
table inet sct_mute {
    chain input { type filter hook input priority -400; policy drop; }
    chain output { type filter hook output priority -400; policy drop; }
}
"""


class KernelRouter:
    """Linux NAT router in three namespaces; use as a context manager.

    r = KernelRouter(nft_rules=MASQ)        # prefix defaults to 'sct' + 4 random hex
    with r:
        out = r.exchange('client', frame)   # frames that came out on the server veth

    Attributes: see `Addr` (client_mac, router_client_mac, router_server_mac, server_mac,
    client_ip4/6, router_client_ip4/6, router_server_ip4/6, server_ip4/6) plus the
    family-selected aliases client_ip, router_client_ip, router_server_ip, server_ip;
    interface names client_if='cli0', router_client_if='rtr-in', router_server_if='rtr-out',
    server_if='srv0'; namespace names ns_client, ns_router, ns_server.
    """

    client_if = "cli0"
    router_client_if = "rtr-in"
    router_server_if = "rtr-out"
    server_if = "srv0"

    def __init__(self, prefix: str | None = None, nft_rules: str = "", family: int = 4, *,
                 router_sysctls: dict[str, str | int] | None = None,
                 client_mtu: int = 1500, server_mtu: int = 1500,
                 icmp_ratelimit_off: bool = True, include_multicast: bool = False,
                 addr: Addr = Addr()):
        self._auto_prefix = prefix is None
        if prefix is None:
            prefix = PREFIX_BASE + secrets.token_hex(2)
        if not _PREFIX_RE.match(prefix) or not prefix.startswith(PREFIX_BASE):
            raise ValueError(f"prefix must match {PREFIX_BASE}[a-z0-9]{{,7}}: {prefix!r}")
        if family not in (4, 6):
            raise ValueError("family must be 4 or 6 (both stacks are always configured)")
        self.nft_rules = nft_rules
        self.family = family
        self.addr = addr
        self.router_sysctls = dict(router_sysctls or {})
        self.client_mtu, self.server_mtu = client_mtu, server_mtu
        self.icmp_ratelimit_off = icmp_ratelimit_off
        self._incoming = _INCOMING_MC if include_multicast else _INCOMING
        self._set_prefix(prefix)
        self._socks: dict[str, socket.socket] = {}
        self._closed = False
        self._started = False
        self._owner = False     # True once this object may delete <prefix>-* namespaces
        #: frames discarded by the drain before each exchange, per side (debugging aid)
        self.stray: dict[str, list[bytes]] = {CLIENT: [], SERVER: []}
        for name in Addr.__dataclass_fields__:
            setattr(self, name, getattr(addr, name))
        sfx = "4" if family == 4 else "6"
        self.client_ip = getattr(addr, "client_ip" + sfx)
        self.router_client_ip = getattr(addr, "router_client_ip" + sfx)
        self.router_server_ip = getattr(addr, "router_server_ip" + sfx)
        self.server_ip = getattr(addr, "server_ip" + sfx)

    def _set_prefix(self, prefix: str) -> None:
        self.prefix = prefix
        self.ns_client = f"{prefix}-cli"
        self.ns_router = f"{prefix}-rtr"
        self.ns_server = f"{prefix}-srv"

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> "KernelRouter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "KernelRouter":
        if self._started:
            return self
        ok, why = available()
        if not ok:
            raise KernelRouterError(why)
        _install_handlers()
        self._started = True
        # never take over (and later delete) namespaces of another run with the same prefix;
        # a generated prefix is simply drawn again (bounded)
        for _ in range(16):
            clash = [ns for ns in (self.ns_client, self.ns_router, self.ns_server)
                     if os.path.exists(os.path.join(NETNS_DIR, ns))]
            if not (clash or self.prefix in _LIVE_PREFIXES or _owner_alive(self.prefix)):
                break
            if not self._auto_prefix:
                self._closed = True
                raise KernelRouterError(f"prefix {self.prefix!r} already in use: {clash}")
            self._set_prefix(PREFIX_BASE + secrets.token_hex(2))
        else:
            self._closed = True
            raise KernelRouterError("no free generated prefix after 16 draws")
        self._owner = True
        with _lock:
            _LIVE.add(self)
            _LIVE_PREFIXES.add(self.prefix)
        try:
            _write_marker(self.prefix)      # before anything exists, for cleanup_stale
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close sockets and delete the namespaces. Idempotent; safe on partial setup."""
        if self._closed:
            return
        self._closed = True
        for s in self._socks.values():
            try:
                s.close()
            except OSError:
                pass
        self._socks.clear()
        if self._owner:
            for ns in (self.ns_client, self.ns_server, self.ns_router):
                _del_netns(ns)
            _remove_marker(self.prefix)
        with _lock:
            _LIVE.discard(self)
            _LIVE_PREFIXES.discard(self.prefix)

    # ---------------------------------------------------------------- setup

    def _ip(self, ns: str, *args: str) -> None:
        _run([_tool("ip"), "-n", ns] + list(args))

    def _sysctls(self, ns: str, values: dict[str, str | int], *, strict: bool = True) -> None:
        """Write sysctls in `ns` in one subprocess (bounded); strict=False ignores missing keys."""
        lines = ["set -e"] if strict else []
        for key, val in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            if strict:
                lines.append(f"echo {val} > {path}")
            else:
                lines.append(f"[ -w {path} ] && echo {val} > {path} || true")
        _ns_exec(ns, ["/bin/sh", "-c", "\n".join(lines)])

    def _build(self) -> None:
        a = self.addr
        ip = _tool("ip")
        for ns in (self.ns_client, self.ns_router, self.ns_server):
            _run([ip, "netns", "add", ns])

        # endpoints muted before any link comes up
        for ns in (self.ns_client, self.ns_server):
            _ns_exec(ns, [_tool("nft"), "-f", "-"], input=_MUTE_RULES)

        base6 = {"net.ipv6.conf.default.accept_dad": 0, "net.ipv6.conf.all.accept_dad": 0,
                 "net.ipv6.conf.default.dad_transmits": 0, "net.ipv6.conf.all.accept_ra": 0,
                 "net.ipv6.conf.default.accept_ra": 0,
                 "net.ipv6.conf.default.router_solicitations": 0}
        router = dict(base6)
        router.update({
            "net.ipv4.ip_forward": 1,
            "net.ipv6.conf.all.forwarding": 1, "net.ipv6.conf.default.forwarding": 1,
            "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
            "net.ipv4.conf.all.send_redirects": 0, "net.ipv4.conf.default.send_redirects": 0,
            "net.ipv4.conf.all.accept_redirects": 0, "net.ipv4.conf.default.accept_redirects": 0,
            "net.ipv6.conf.all.accept_redirects": 0,
        })
        self._sysctls(self.ns_router, router)
        for ns in (self.ns_client, self.ns_server):
            self._sysctls(ns, base6)

        # veth pairs created directly inside the namespaces: nothing ever appears in the
        # caller's namespace, so concurrent runs cannot clash on interface names
        self._ip(self.ns_client, "link", "add", self.client_if, "address", a.client_mac,
                 "mtu", str(self.client_mtu), "type", "veth",
                 "peer", "name", self.router_client_if, "netns", self.ns_router,
                 "address", a.router_client_mac, "mtu", str(self.client_mtu))
        self._ip(self.ns_server, "link", "add", self.server_if, "address", a.server_mac,
                 "mtu", str(self.server_mtu), "type", "veth",
                 "peer", "name", self.router_server_if, "netns", self.ns_router,
                 "address", a.router_server_mac, "mtu", str(self.server_mtu))

        ifs = {self.ns_client: [self.client_if],
               self.ns_router: [self.router_client_if, self.router_server_if],
               self.ns_server: [self.server_if]}

        # per-interface sysctls on the router (interfaces created after the defaults were set,
        # but be explicit: rp_filter uses max(all, iface))
        per_if = {}
        for dev in ifs[self.ns_router]:
            per_if.update({f"net.ipv4.conf.{dev}.rp_filter": 0,
                           f"net.ipv4.conf.{dev}.send_redirects": 0,
                           f"net.ipv6.conf.{dev}.forwarding": 1})
        if self.icmp_ratelimit_off:
            per_if.update({"net.ipv4.icmp_ratelimit": 0, "net.ipv6.icmp.ratelimit": 0,
                           "net.ipv4.icmp_msgs_per_sec": 1000000,
                           "net.ipv4.icmp_msgs_burst": 1000000})
        self._sysctls(self.ns_router, per_if, strict=False)

        ethtool = _tool("ethtool")
        for ns, devs in ifs.items():
            for dev in devs:
                _ns_exec(ns, [ethtool, "-K", dev, "rx", "off", "tx", "off", "tso", "off",
                              "gso", "off", "gro", "off"])
                self._check_offloads(ns, dev)

        # addresses (nodad), links up, routes, permanent neighbours
        self._ip(self.ns_client, "addr", "add", f"{a.client_ip4}/{a.plen4}", "dev", self.client_if)
        self._ip(self.ns_client, "addr", "add", f"{a.client_ip6}/{a.plen6}", "dev", self.client_if,
                 "nodad")
        self._ip(self.ns_server, "addr", "add", f"{a.server_ip4}/{a.plen4}", "dev", self.server_if)
        self._ip(self.ns_server, "addr", "add", f"{a.server_ip6}/{a.plen6}", "dev", self.server_if,
                 "nodad")
        r = self.ns_router
        self._ip(r, "addr", "add", f"{a.router_client_ip4}/{a.plen4}", "dev", self.router_client_if)
        self._ip(r, "addr", "add", f"{a.router_client_ip6}/{a.plen6}", "dev",
                 self.router_client_if, "nodad")
        self._ip(r, "addr", "add", f"{a.router_server_ip4}/{a.plen4}", "dev", self.router_server_if)
        self._ip(r, "addr", "add", f"{a.router_server_ip6}/{a.plen6}", "dev",
                 self.router_server_if, "nodad")
        for ns, devs in ifs.items():
            self._ip(ns, "link", "set", "lo", "up")
            for dev in devs:
                self._ip(ns, "link", "set", dev, "up")
        self._ip(self.ns_client, "route", "add", "default", "via", a.router_client_ip4)
        self._ip(self.ns_client, "-6", "route", "add", "default", "via", a.router_client_ip6)
        self._ip(self.ns_server, "route", "add", "default", "via", a.router_server_ip4)
        self._ip(self.ns_server, "-6", "route", "add", "default", "via", a.router_server_ip6)

        def neigh(ns, ipaddr, mac, dev):
            self._ip(ns, "neigh", "replace", ipaddr, "lladdr", mac, "dev", dev, "nud", "permanent")

        neigh(self.ns_client, a.router_client_ip4, a.router_client_mac, self.client_if)
        neigh(self.ns_client, a.router_client_ip6, a.router_client_mac, self.client_if)
        neigh(self.ns_server, a.router_server_ip4, a.router_server_mac, self.server_if)
        neigh(self.ns_server, a.router_server_ip6, a.router_server_mac, self.server_if)
        neigh(r, a.client_ip4, a.client_mac, self.router_client_if)
        neigh(r, a.client_ip6, a.client_mac, self.router_client_if)
        neigh(r, a.server_ip4, a.server_mac, self.router_server_if)
        neigh(r, a.server_ip6, a.server_mac, self.router_server_if)

        if self.nft_rules.strip():
            self.load_rules(self.nft_rules, flush=False)
        if self.router_sysctls:
            self._sysctls(r, self.router_sysctls)

        for side, ns, dev in ((CLIENT, self.ns_client, self.client_if),
                              (SERVER, self.ns_server, self.server_if)):
            self._socks[side] = _in_netns(ns, lambda dev=dev: _open_packet_socket(dev))
        self.drain()

    def _check_offloads(self, ns: str, dev: str) -> None:
        out = _ns_exec(ns, [_tool("ethtool"), "-k", dev]).stdout
        want_off = ("rx-checksumming", "tx-checksumming", "tcp-segmentation-offload",
                    "generic-segmentation-offload", "generic-receive-offload")
        for feat in want_off:
            m = re.search(rf"^{feat}: (\w+)", out, re.M)
            if m is None or m.group(1) != "off":
                raise KernelRouterError(
                    f"{ns}/{dev}: {feat} is {m.group(1) if m else 'missing'}, want off")

    # ---------------------------------------------------------------- configuration

    def load_rules(self, nft_rules: str, *, flush: bool = True) -> None:
        """Load an nftables ruleset into the router (`nft -f -`); flush the old one first."""
        text = ("flush ruleset\n" if flush else "") + nft_rules
        _ns_exec(self.ns_router, [_tool("nft"), "-f", "-"], input=text)

    def nft(self, *args: str) -> str:
        """Run `nft ARGS` in the router namespace; return stdout."""
        return _ns_exec(self.ns_router, [_tool("nft")] + list(args)).stdout

    def router_exec(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run a command in the router namespace (bounded by CMD_TIMEOUT)."""
        return _ns_exec(self.ns_router, argv, check=check)

    def sysctl(self, values: dict[str, str | int]) -> None:
        """Set sysctls in the router namespace (keys in dotted form)."""
        self._sysctls(self.ns_router, values)

    def add_client_address(self, ipaddr: str) -> None:
        """Another client address on cli0 (same MAC); the router gets a permanent neighbour."""
        self._add_endpoint_address(self.ns_client, self.client_if, ipaddr, self.client_mac,
                                   self.router_client_if)

    def add_server_address(self, ipaddr: str) -> None:
        self._add_endpoint_address(self.ns_server, self.server_if, ipaddr, self.server_mac,
                                   self.router_server_if)

    def _add_endpoint_address(self, ns, dev, ipaddr, mac, rdev) -> None:
        plen = self.addr.plen6 if ":" in ipaddr else self.addr.plen4
        extra = ["nodad"] if ":" in ipaddr else []
        self._ip(ns, "addr", "add", f"{ipaddr}/{plen}", "dev", dev, *extra)
        self._ip(self.ns_router, "neigh", "replace", ipaddr, "lladdr", mac, "dev", rdev,
                 "nud", "permanent")

    # ---------------------------------------------------------------- frames

    def macs(self, side: str) -> tuple[str, str]:
        """(src, dst) MACs for a frame sent from `side` to the router."""
        if side == CLIENT:
            return self.client_mac, self.router_client_mac
        if side == SERVER:
            return self.server_mac, self.router_server_mac
        raise ValueError(f"side must be 'client' or 'server': {side!r}")

    def _sock(self, side: str) -> socket.socket:
        if side not in SIDES:
            raise ValueError(f"side must be 'client' or 'server': {side!r}")
        if self._closed or side not in self._socks:
            raise KernelRouterError("router not started or already closed")
        return self._socks[side]

    def send(self, side: str, frame: bytes, timeout: float = 1.0) -> None:
        """Inject one full Ethernet frame on the endpoint veth of `side`."""
        s = self._sock(side)
        frame = bytes(frame)
        deadline = time.monotonic() + timeout
        while True:
            try:
                n = s.send(frame)
                if n != len(frame):
                    raise KernelRouterError(f"short send: {n} of {len(frame)} bytes")
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KernelRouterError(f"send on {side} blocked for {timeout}s") from None
                select.select([], [s], [], left)

    def drain(self) -> None:
        """Discard anything already queued on both endpoint sockets (kept in self.stray)."""
        for side, s in self._socks.items():
            for _ in range(100000):            # bounded
                try:
                    data, sa = s.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if sa[2] in self._incoming:
                    self.stray[side].append(data)

    def recv_all(self, timeout: float = 0.1) -> dict[str, list[bytes]]:
        """Frames arriving from the router on both endpoint veths during a `timeout` window."""
        out: dict[str, list[bytes]] = {CLIENT: [], SERVER: []}
        by_fd = {s.fileno(): side for side, s in self._socks.items()}
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select(list(self._socks.values()), [], [], left)
            for s in r:
                side = by_fd[s.fileno()]
                for _ in range(10000):
                    try:
                        data, sa = s.recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    if sa[2] in self._incoming:
                        out[side].append(data)
        return out

    def recv(self, side: str, timeout: float = 0.1) -> list[bytes]:
        """Frames arriving from the router on `side`'s veth during a `timeout` window.

        Frames that arrive on the other side during the window are kept in self.stray."""
        self._sock(side)
        got = self.recv_all(timeout)
        other = SERVER if side == CLIENT else CLIENT
        self.stray[other].extend(got[other])
        return got[side]

    def exchange_all(self, side: str, frame: bytes, timeout: float = 0.1) -> dict[str, list[bytes]]:
        """Drain, send `frame` from `side`, return what both endpoints got within `timeout`
        (the router's ICMP errors go back to the sender; forwarded packets to the other side)."""
        self.drain()
        self.send(side, frame)
        return self.recv_all(timeout)

    def exchange(self, side: str, frame: bytes, timeout: float = 0.1) -> list[bytes]:
        """Drain, send `frame` from `side`, return the frames the opposite side got."""
        got = self.exchange_all(side, frame, timeout)
        self.stray[side].extend(got[side])
        return got[SERVER if side == CLIENT else CLIENT]

    # ---------------------------------------------------------------- conntrack

    def conntrack(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _ns_exec(self.ns_router, [_tool("conntrack")] + list(args), check=check)

    def conntrack_list(self, *args: str) -> str:
        """`conntrack -L [ARGS]` in the router namespace (stdout; the summary line on stderr
        is dropped)."""
        return self.conntrack("-L", *args).stdout

    def conntrack_stats(self) -> str:
        """`conntrack -S` in the router namespace."""
        return self.conntrack("-S").stdout

    def conntrack_flush(self) -> None:
        self.conntrack("-F")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<KernelRouter {self.prefix} {state}>"


def _open_packet_socket(dev: str) -> socket.socket:
    """AF_PACKET socket bound to `dev` in the calling thread's namespace, non-blocking.

    Opened with protocol 0 so nothing is queued before bind() restricts it to `dev`."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        try:
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError as e:
            if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((dev, ETH_P_ALL))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s
