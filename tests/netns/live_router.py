"""`shardct live` watching a Linux kernel NAT router in network namespaces (no tests here).

    <prefix>-cli  cli0 10.0.0.2 ---- rtr-in 10.0.0.3 | <prefix>-rtr | rtr-out 192.168.0.1 ---- srv0 192.168.0.2  <prefix>-srv
                                                       forwarding, nftables MASQUERADE out of rtr-out

The namespaces come from kernel_router.KernelRouter (offloads off, permanent neighbours,
cleanup on every exit path) with the endpoints un-muted, so their own TCP stacks talk:
curl in the client, python3 -m http.server in the server. shardct runs in the router
namespace on both router interfaces with the same MASQUERADE rule, so it sees what the
kernel's conntrack sees (ingress of both interfaces, before the kernel's NAT of replies)
and must end with the kernel's table.

Run directly it measures instead: ``python3 tests/netns/live_router.py flood --count N
[--flows F] [--senders K] [--workers W]`` sends N UDP datagrams per sender, as fast as K
Python processes can, from the client through the router to F server ports while
`shardct live` watches, and prints the live run's summary line with its ring drops (JSON).

Every wait is bounded; every process started here is ended by its pid, or dies with the
process that started it (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import kernel_router as KR  # noqa: E402

PREFIX_BASE = "sct12l"         # + 4 hex of the pid: KernelRouter's prefix rule (<= 10 chars)
HTTP_PORT = 8000
SINK_PORT = 10000              # the flood's first UDP port (the server drops all UDP input)

MASQ_NFT = """\
table ip nat {
    chain postrouting { type nat hook postrouting priority srcnat; oifname "rtr-out" masquerade; }
}
"""
MASQ_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.0.0.0/24 -o rtr-out -j MASQUERADE
COMMIT
"""
ENGINE_TOML = """\
[conntrack]
max_conns = 65536

[nat]
rules = "masq.rules"

[interfaces.rtr-in]
address = ["10.0.0.3/24"]
mac = "02:00:00:00:00:03"

[interfaces.rtr-out]
address = ["192.168.0.1/24"]
mac = "02:00:00:00:01:01"
"""
SINK_NFT = f"""\
table inet sct_sink {{
    chain input {{ type filter hook input priority -400; meta l4proto udp drop; }}
}}
"""


def why_not() -> str | None:
    """None when this can run here, else the reason to skip."""
    ok, why = KR.available()
    if not ok:
        return why
    if KR._which("curl") is None:
        return "needs curl (run .ci/install-netns-deps.sh)"
    return None


def prefix() -> str:
    return f"{PREFIX_BASE}{os.getpid() & 0xFFFF:04x}"


def cleanup_stale() -> list[str]:
    """Remove namespaces a killed run of this helper left (owner process gone)."""
    return KR.cleanup_stale(PREFIX_BASE + "????")


PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child before exec: SIGTERM when the process that started it dies, even by
    SIGKILL (kept across exec, so `ip netns exec` passes it on)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Proc:
    """A process started here, ended by its pid (SIGTERM, then SIGKILL) or with us; stderr
    lines are collected by a thread so a line can be waited for."""

    def __init__(self, argv, **kw):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, preexec_fn=_die_with_parent, **kw)
        self.err: list[str] = []
        self.out = ""
        self._t = threading.Thread(target=self._read_err, daemon=True)
        self._t.start()
        self._to = threading.Thread(target=self._read_out, daemon=True)
        self._to.start()

    def _read_err(self):
        for line in self.p.stderr:
            self.err.append(line)

    def _read_out(self):
        self.out = self.p.stdout.read()

    def wait_line(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.err):
                return True
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        return any(needle in line for line in self.err)

    def wait(self, timeout: float) -> int | None:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._t.join(5)
        self._to.join(5)
        return rc

    def interrupt(self):
        """SIGINT (shardct live then stops reading and prints its summary)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)

    def end(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


class LiveRouter:
    """The namespaces plus an HTTP server; a context manager (everything ends on exit)."""

    def __init__(self):
        self.kr = KR.KernelRouter(prefix=prefix(), nft_rules=MASQ_NFT)
        self.tmp = tempfile.mkdtemp(prefix="sct12l-")
        self.procs: list[Proc] = []

    def __enter__(self):
        cleanup_stale()
        try:
            self.kr.start()
            for ns in (self.kr.ns_client, self.kr.ns_server):   # let the endpoints talk
                KR._ns_exec(ns, [KR._tool("nft"), "delete", "table", "inet", "sct_mute"])
            KR._ns_exec(self.kr.ns_server, [KR._tool("nft"), "-f", "-"], input=SINK_NFT)
            with open(os.path.join(self.tmp, "masq.rules"), "w") as f:
                f.write(MASQ_RULES)
            with open(os.path.join(self.tmp, "engine.toml"), "w") as f:
                f.write(ENGINE_TOML)
            os.makedirs(os.path.join(self.tmp, "www"))
            with open(os.path.join(self.tmp, "www", "blob"), "wb") as f:
                f.write(os.urandom(64 * 1024))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for p in self.procs:
            try:
                p.end()
            except Exception:  # noqa: BLE001 - keep ending the others
                pass
        self.kr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def start(self, ns, argv, **kw) -> Proc:
        p = Proc(["ip", "netns", "exec", ns] + argv, **kw)
        self.procs.append(p)
        return p

    def http_argv(self) -> list[str]:
        return [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind",
                self.kr.server_ip4, "--directory", os.path.join(self.tmp, "www")]

    def http_server(self, lifetime_s: int = 300):
        """python3 -m http.server in the server namespace, ended after lifetime_s at the
        latest; returns once it accepts (probed inside the server namespace only, so the
        router sees nothing of it)."""
        p = self.start(self.kr.ns_server, ["timeout", str(lifetime_s)] + self.http_argv())
        probe = ("import socket,sys,time\n"
                 "for _ in range(100):\n"
                 f"    try: socket.create_connection(('{self.kr.server_ip4}', {HTTP_PORT}), 1)"
                 ".close(); sys.exit(0)\n"
                 "    except OSError: time.sleep(0.1)\n"
                 "sys.exit(1)\n")
        cp = KR._ns_exec(self.kr.ns_server, [sys.executable, "-c", probe], check=False,
                         timeout=30)
        if cp.returncode != 0:
            raise KR.KernelRouterError(f"http.server did not start: {''.join(p.err)[-500:]}")
        return p

    def live(self, workers: int, duration: float, *extra: str) -> Proc:
        """`shardct live` on both router interfaces (returns once its workers are ready)."""
        p = self.start(self.kr.ns_router,
                       [sys.executable, "-m", "workers.cli", "live",
                        "-i", self.kr.router_client_if, "-i", self.kr.router_server_if,
                        "-c", os.path.join(self.tmp, "engine.toml"), "--workers", str(workers),
                        "--duration", str(duration), "--list", "-1", *extra], cwd=ROOT)
        if not p.wait_line("workers ready", 600):
            p.end()
            raise KR.KernelRouterError("shardct live did not get ready:\n"
                                       + "".join(p.err)[-2000:])
        return p

    def curl(self, n: int, max_time: float = 10.0) -> list[str]:
        """n downloads from the client, one after the other; their HTTP codes."""
        codes = []
        url = f"http://{self.kr.server_ip4}:{HTTP_PORT}/blob"
        for _ in range(n):
            cp = KR._ns_exec(self.kr.ns_client,
                             [KR._tool("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "--max-time", str(max_time), url],
                             check=False, timeout=max_time + 5)
            codes.append(cp.stdout.strip() or f"rc={cp.returncode}")
        return codes

    def udp_flood(self, count: int, flows: int = 64, size: int = 64, senders: int = 1) -> dict:
        """count datagrams (payload `size`) from client sockets to `flows` server ports in
        turn (each a conn; the server drops them), as fast as `senders` Python processes
        (count each) send."""
        code = ("import json,socket,time\n"
                f"n,flows,size={count},{flows},{size}\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1<<20)\n"
                f"dst=[('{self.kr.server_ip4}',{SINK_PORT}+k) for k in range(flows)]\n"
                "data=bytes(size); err=0\n"
                "t=time.perf_counter()\n"
                "for i in range(n):\n"
                "    try: s.sendto(data, dst[i % flows])\n"
                "    except OSError: err+=1\n"
                "dt=time.perf_counter()-t\n"
                "print(json.dumps({'sent':n-err,'errors':err,'seconds':dt,'pps':n/dt}))\n")
        ps = [self.start(self.kr.ns_client, [sys.executable, "-c", code]) for _ in range(senders)]
        res = [(p.wait(600), p) for p in ps]
        got = [json.loads(p.out.strip().splitlines()[-1]) for rc, p in res if rc == 0]
        if len(got) != senders:
            raise KR.KernelRouterError(f"a sender failed: {[''.join(p.err) for _, p in res]}")
        return {"sent": sum(g["sent"] for g in got), "errors": sum(g["errors"] for g in got),
                "seconds": max(g["seconds"] for g in got),
                "pps": round(sum(g["sent"] for g in got) / max(g["seconds"] for g in got))}

    def conntrack(self) -> str:
        return self.kr.conntrack_list()


# ------------------------------------------------------------------------ parsing

_CONN = re.compile(r"^(?P<proto>\w+)\s+(?P<num>\d+)\s+(?P<tmo>\d+)\s+(?:(?P<state>[A-Z_0-9]+)\s+)?"
                   r"src=(?P<src>\S+) dst=(?P<dst>\S+) (?:sport=(?P<sport>\d+) "
                   r"dport=(?P<dport>\d+) )?")


def parse_conns(text: str) -> dict[tuple, tuple]:
    """`conntrack -L` lines (the kernel's or shardct's) -> {(proto, src, dst, sport, dport):
    (state, assured)}."""
    out = {}
    for line in text.splitlines():
        m = _CONN.match(line.strip())
        if m is None:
            continue
        key = (m["proto"], m["src"], m["dst"], m["sport"], m["dport"])
        out[key] = (m["state"], "[ASSURED]" in line)
    return out


def parse_summary(out: str) -> dict:
    """shardct live's `tracked ...` line: verdict counts, ring drops, lost packets."""
    line = next((x for x in out.splitlines() if x.startswith("tracked ")), None)
    if line is None:
        return {}
    head, _, rest = line.partition(" workers: ")
    verdict_s, _, tail = rest.partition("; ring drops: ")
    res = {"packets": int(head.split()[1]), "line": line, "verdicts": {}, "drops": {}}
    for kv in verdict_s.split(", "):
        if "=" in kv:
            k, v = kv.split("=")
            res["verdicts"][k] = int(v)
    drops_s, _, tail = tail.partition("; ")
    for kv in drops_s.split():
        k, v = kv.split("=")
        res["drops"][k] = int(v)
    m = re.search(r"lost_packets=(\d+)", tail)
    res["lost_packets"] = int(m.group(1)) if m else None
    m = re.search(r"late frames: (\d+)", tail)
    res["late"] = int(m.group(1)) if m else 0
    return res


# ------------------------------------------------------------------------ measuring

def flood_main(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="live_router.py flood")
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--flows", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--senders", type=int, default=1, help="sender processes (count each)")
    ap.add_argument("--duration", type=float, default=0,
                    help="live --duration (default: until 1 s after the flood)")
    a = ap.parse_args(argv)
    why = why_not()
    if why:
        print(json.dumps({"skipped": why}))
        return 0
    with LiveRouter() as lr:
        live = lr.live(a.workers, a.duration or 300)
        t0 = time.monotonic()
        sent = lr.udp_flood(a.count, a.flows, a.size, a.senders)
        t_flood = time.monotonic() - t0
        if not a.duration:
            time.sleep(1.0)
            live.interrupt()
        rc = live.wait((a.duration or 300) + 300)
        summ = parse_summary(live.out)
        print(json.dumps({"workers": a.workers, "flood": sent, "flood_wall_s": round(t_flood, 2),
                          "rc": rc, "summary": summ.get("line"),
                          "stderr": [x.strip() for x in live.err if "ring drops" in x][-3:]}))
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "flood":
    sys.exit(flood_main(sys.argv[2:]))
