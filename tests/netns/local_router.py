"""`shardct run` as the router with local delivery through its TAP (no tests here).

    <prefix>-cli  cli0 10.0.0.2 ---- rtr-in | <prefix>-rtr | rtr-out ---- srv0 192.168.0.2  <prefix>-srv
                                              shardct run
                                              sct-tap0: 10.0.0.3/32 192.168.0.1/32 (the host's stack)

run_router.RunRouter's namespaces, with the router's addresses moved off the veths (the
TAP that shardct creates holds them, as workers/tap.py asks) and the router's kernel
muted on every interface but the TAP (nftables prerouting/output drop), so only shardct
forwards and only what shardct delivers to the TAP reaches the host's stack. Kernel
forwarding stays off. Next hop MACs come from the config's [neighbours] (removing the
addresses flushed the kernel's neighbour entries on the veths).

The control socket lives in a directory of this run (SHARDCT_RUN_DIR), so concurrent
runs elsewhere do not matter; ``ctl(...)`` runs `shardct conntrack` against it.

Every wait is bounded; every process is ended by its pid (live_router.Proc).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import kernel_router as KR  # noqa: E402
import live_router as LR  # noqa: E402
import run_router as RR  # noqa: E402

TAP = "sct-tap0"
LISTEN_PORT = 3129          # the local listener REDIRECT sends to
# prerouting, not input: the kernel would route (and answer no-route for) what it cannot
# deliver before an input hook sees it; AF_PACKET gets the frames before either
ROUTER_MUTE_BUT_TAP = f"""\
table inet sct13t_mute {{
    chain prerouting {{ type filter hook prerouting priority -400; iifname != "{TAP}" drop; }}
    chain output {{ type filter hook output priority -400; oifname != "{TAP}" drop; }}
}}
"""
# run_router's engine (its interfaces, INVALID dropped) with these rules, the TAP and the
# next hops' MACs
ENGINE_TOML = RR.ENGINE_TOML.replace('rules = "masq.rules"', 'rules = "local.rules"') + f"""
[local]
tap = "{TAP}"

[neighbours]
"10.0.0.2" = "02:00:00:00:00:02"
"192.168.0.2" = "02:00:00:00:01:02"
"b::2" = "02:00:00:00:00:02"
"a::2" = "02:00:00:00:01:02"
"""
# the same with IPv6 too: the router's b::1 and a::1, ip6tables rules in local6.rules
ENGINE6_TOML = ENGINE_TOML.replace('rules = "local.rules"',
                                   'rules = "local.rules"\nrules6 = "local6.rules"') \
    .replace('"10.0.0.3/24"', '"10.0.0.3/24", "b::1/64"') \
    .replace('"192.168.0.1/24"', '"192.168.0.1/24", "a::1/64"')
# configs/port-forward.rules on this topology: WAN = the client side (rtr-in)
PORT_FORWARD_MAP = (("wan0", "rtr-in"), ("lan0", "rtr-out"), ("203.0.113.2", "10.0.0.3"),
                    ("192.0.2.10:80", "192.168.0.2:80"), ("192.0.2.0/24", "192.168.0.0/24"))
REDIRECT_RULES = f"""\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i rtr-in -p tcp --dport 80 -j REDIRECT --to-ports {LISTEN_PORT}
-A POSTROUTING -s 10.0.0.0/24 -o rtr-out -j MASQUERADE
COMMIT
"""
REDIRECT6_RULES = REDIRECT_RULES.replace("10.0.0.0/24", "b::/64")

# A transparent-proxy stand-in in the router's namespace: accepts one connection on the
# TAP's addresses, asks shardct for its original destination (the library call of
# workers/control.py), answers it in an HTTP reply and prints it. IPv4; IPV6_LISTENER: IPv6.
LISTENER = f"""\
import socket, sys
from workers.control import original_dst
s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {LISTEN_PORT}))
s.listen(4)
s.settimeout(60)
print("listening", file=sys.stderr, flush=True)
c, peer = s.accept()
c.settimeout(10)
here = c.getsockname()
req = c.recv(4096)
od = original_dst(peer[0], here[0], peer[1], here[1], "tcp")
said = (f"local listener: {{peer[0]}}:{{peer[1]}} asked for {{od[0]}}:{{od[1]}}" if od
        else "local listener: no orig-dst")
print(said, peer[0], peer[1], here[0], here[1], flush=True)
body = said.encode() + b"\\n"
c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
c.close()
"""
IPV6_LISTENER = LISTENER.replace("socket.AF_INET)", "socket.AF_INET6)").replace('"0.0.0.0"', '"::"')


def port_forward_rules() -> str:
    """configs/port-forward.rules with this topology's names and addresses."""
    with open(os.path.join(ROOT, "configs", "port-forward.rules")) as f:
        text = f.read()
    for a, b in PORT_FORWARD_MAP:
        text = text.replace(a, b)
    return text


class LocalRouter(RR.RunRouter):
    """The namespaces, shardct's config with ``[local] tap`` and ``rules`` (iptables-save
    text; with ``rules6``, ip6tables-save text, the router has its IPv6 addresses too); a
    context manager (everything ends on exit)."""

    def __init__(self, rules: str, rules6: str | None = None):
        super().__init__()
        self.kr.nft_rules = ROUTER_MUTE_BUT_TAP
        self.rules, self.rules6 = rules, rules6
        self.run_dir = os.path.join(self.tmp, "run")
        self.env = {**os.environ, "SHARDCT_RUN_DIR": self.run_dir, "PYTHONPATH": ROOT}

    def __enter__(self):
        super().__enter__()
        try:
            os.makedirs(self.run_dir, mode=0o700)
            for dev in (self.kr.router_client_if, self.kr.router_server_if):
                self.kr.router_exec(["ip", "addr", "flush", "dev", dev])
            with open(os.path.join(self.tmp, "local.rules"), "w") as f:
                f.write(self.rules)
            if self.rules6 is not None:
                with open(os.path.join(self.tmp, "local6.rules"), "w") as f:
                    f.write(self.rules6)
            with open(os.path.join(self.tmp, "engine.toml"), "w") as f:
                f.write(ENGINE_TOML if self.rules6 is None else ENGINE6_TOML)
        except BaseException:
            self.close()
            raise
        return self

    def start(self, ns, argv, **kw) -> LR.Proc:
        """A process in ``ns`` that can import shardct and reach the run's control socket."""
        kw.setdefault("env", self.env)
        return super().start(ns, argv, **kw)

    def run(self, duration: float, *extra: str) -> LR.Proc:
        """`shardct run` in the router namespace (returns once it routes); next hops from
        the config only."""
        return super().run(duration, "--no-kernel-neighbours", *extra)

    def http_server80(self, lifetime_s: int) -> LR.Proc:
        """run_router's http.server in the server namespace on port 80 (the LAN web
        server of configs/port-forward.rules); returns once it accepts."""
        argv = self.http_argv()
        argv[-1] = argv[-1].replace(f"'{LR.HTTP_PORT}'", "'80'")     # its sys.argv
        p = self.start(self.kr.ns_server, ["timeout", str(lifetime_s)] + argv)
        if not self.listening(self.kr.ns_server, 80):
            raise KR.KernelRouterError(f"http.server did not start: {''.join(p.err)[-500:]}")
        return p

    def listening(self, ns: str, port: int, timeout: float = 20.0) -> bool:
        """Whether a TCP listener on ``port`` shows in ``ns`` (ss) within timeout seconds."""
        def up():
            cp = KR._ns_exec(ns, [KR._tool("ss"), "-Hltn", f"sport = :{port}"], check=False)
            return bool(cp.stdout.strip())
        return bool(wait_until(up, timeout))

    def router_python(self, code: str) -> LR.Proc:
        """A Python process in the router namespace that can import shardct and reach
        the run's control socket."""
        return self.start(self.kr.ns_router, ["timeout", "90", sys.executable, "-c", code],
                          cwd=ROOT)

    def ctl(self, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """`shardct conntrack ARGS` against this run: (exit status, stdout, stderr)."""
        try:
            cp = subprocess.run([sys.executable, "-m", "workers.cli", "conntrack", *args],
                                capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                env=self.env)
        except subprocess.TimeoutExpired:
            return -1, "", f"shardct conntrack {' '.join(args)}: timed out after {timeout} s"
        return cp.returncode, cp.stdout, cp.stderr

    def conns_json(self) -> list[dict]:
        """`shardct conntrack -L -o json` of the run (each conn a dict)."""
        rc, out, err = self.ctl("-L", "-o", "json")
        if rc != 0:
            raise KR.KernelRouterError(f"shardct conntrack -L failed ({rc}): {err}")
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    def curl(self, url: str, max_time: float = 20.0, out: str | None = None) -> tuple[str, str]:
        """curl from the client: (curl's "code size", the body or the file's path)."""
        argv = [KR._tool("curl"), "-s", "-w", "\n%{http_code} %{size_download}",
                "--max-time", str(max_time)]
        if out:
            argv += ["-o", out]
        cp = KR._ns_exec(self.kr.ns_client, argv + [url], check=False, timeout=max_time + 5)
        body, _, tail = cp.stdout.rpartition("\n")
        return tail.strip() or f"rc={cp.returncode} {cp.stderr.strip()}", body


def wait_until(pred, timeout: float, step: float = 0.1):
    """pred()'s first true value within timeout seconds (else its last value)."""
    end = time.monotonic() + timeout
    v = pred()
    while not v and time.monotonic() < end:
        time.sleep(step)
        v = pred()
    return v
