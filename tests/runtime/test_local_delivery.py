"""The runtime side of local delivery (issue 13, part 3) without namespaces: the control
socket's original-destination query (what SO_ORIGINAL_DST gives) answered by one engine
(EngineView, `shardct run --workers 1`) and from a conn list (the pool's dump), its
checks of a bad request, `shardct conntrack --original-dst`, and the config's [local]."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether, raw

from shardct import Config, ConnTrack, ManualClock, PacketBatch
from shardct.errors import ConfigError
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from workers import control
from workers.configfile import load

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24"]},
                      "wan0": {"address": ["192.168.0.1/24"]}}}
RULES = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
         ":POSTROUTING ACCEPT [0:0]\n-A PREROUTING -i lan0 -p tcp --dport 80 "
         "-j REDIRECT --to-ports 3129\nCOMMIT\n")
CLIENT, ROUTER, ASKED = "10.0.0.2", "10.0.0.3", "198.51.100.7"


def redirected_engine():
    """An engine that saw one SYN from CLIENT:40000 to ASKED:80, REDIRECTed to ROUTER:3129
    (local delivery: a host stack answers, not the engine's RST)."""
    clock = ManualClock(10**10)
    ct = ConnTrack(Config(local_delivery=True), seed=5, clock=clock, router=True,
                   rules=parse_iptables_save(RULES, "t.rules", 4),
                   network=Network.from_dict(NET), rng=np.random.default_rng(5))
    syn = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02") / \
        IP(src=CLIENT, dst=ASKED) / TCP(sport=40000, dport=80, flags="S")
    b = PacketBatch.from_frames([raw(syn)], ifindex=0)
    ct.process(b)
    assert Ether(b.frame(0))[IP].dst == ROUTER, "the SYN got no REDIRECT"
    return ct, clock


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SHARDCT_RUN_DIR", str(d))
    return d


def serve(server, stop):
    while not stop.is_set():
        server.poll()
        stop.wait(0.005)


@pytest.fixture
def engine_server(run_dir):
    import zmq
    ct, clock = redirected_engine()
    server = control.ControlServer(control.EngineView(ct, clock=clock), zmq.Context.instance(),
                                   "run")
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(server, stop), daemon=True)
    t.start()
    yield server
    stop.set()
    t.join(5)
    server.close()


def test_engine_answers_the_original_dst_of_a_redirected_conn(engine_server):
    got = control.original_dst(CLIENT, ROUTER, 40000, 3129, "tcp", timeout_s=5)
    assert got == (ipaddress.ip_address(ASKED), 80), f"got {got}, want ({ASKED}, 80)"
    assert control.original_dst(CLIENT, ROUTER, 40001, 3129, timeout_s=5) is None, \
        "got an answer for a peer port with no conn, want None (ENOTCONN)"
    # the original direction's tuple is not what a listener sees: no answer either
    assert control.original_dst(CLIENT, ASKED, 40000, 80, timeout_s=5) is None


def test_engine_refuses_bad_queries_and_deletes(engine_server):
    pid = os.getpid()
    for bad in ({"proto": 6, "src": CLIENT, "dst": "b::1", "sport": 1, "dport": 2},
                {"proto": 6, "src": CLIENT, "dst": ROUTER, "sport": 70000, "dport": 2},
                {"src": CLIENT, "dst": ROUTER, "sport": 1, "dport": 2}):
        r = control.request(pid, {"cmd": "orig_dst", "tuple": bad}, 5)
        assert not r["ok"] and "orig_dst" in r["error"], f"got {r} for {bad}"
    r = control.request(pid, {"cmd": "delete", "filter": {}}, 5)
    assert not r["ok"] and "--workers" in r["error"], f"got {r}, want -F refused by one engine"
    r = control.request(pid, {"cmd": "list"}, 5)
    assert r["ok"] and len(r["conns"]) == 1 and "DST_NAT" in r["conns"][0]["status"], r


def test_cli_original_dst(engine_server, run_dir):
    env = {**os.environ, "PYTHONPATH": ROOT, "SHARDCT_RUN_DIR": str(run_dir)}

    def cli(*args):
        cp = subprocess.run([sys.executable, "-m", "workers.cli", "conntrack", "--original-dst",
                             *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        return cp.returncode, cp.stdout.strip(), cp.stderr.strip()

    got = cli("-s", CLIENT, "--sport", "40000", "-d", ROUTER, "--dport", "3129")
    assert got[:2] == (0, f"{ASKED} 80"), f"got {got}"
    got = cli("-s", CLIENT, "--sport", "40000", "-d", ROUTER, "--dport", "3129", "-o", "json")
    assert got[:2] == (0, f'{{"dst": "{ASKED}", "dport": 80}}'), f"got {got}"
    got = cli("-s", CLIENT, "--sport", "1", "-d", ROUTER, "--dport", "3129")
    assert got[0] == 1 and "ENOTCONN" in got[2], f"got {got}"
    got = cli("-s", CLIENT, "-d", ROUTER, "--dport", "3129")
    assert got[0] == 2 and "--sport" in got[2], f"got {got}"


def test_original_dst_of_a_conn_list_matches_the_engine():
    ct, clock = redirected_engine()
    conns = list(ct.conns())
    q = dict(proto=6, src=ipaddress.ip_address(CLIENT), dst=ipaddress.ip_address(ROUTER),
             sport=40000, dport=3129)
    got = control.original_dst_of(conns, **q)
    assert got == ct.original_dst(CLIENT, ROUTER, 40000, 3129, "tcp") == \
        (ipaddress.ip_address(ASKED), 80), f"got {got}"
    assert control.original_dst_of(conns, **{**q, "proto": 17}) is None


def test_config_local_section(tmp_path):
    base = '[interfaces.lan0]\naddress = ["10.0.0.3/24"]\n'
    p = tmp_path / "e.toml"
    p.write_text(base + '[local]\ntap = "sct-tap0"\n')
    assert load(p).local == {"tap": "sct-tap0", "routes": True}
    p.write_text(base)
    assert load(p).local == {}
    for body, line, why in (('[local]\ntap = "much-too-long-name"\n', 4, "1..15"),
                            ('[local]\ntap = "a/b"\n', 4, "not an interface"),
                            ('[local]\ntap = "t0"\nroutes = 1\n', 5, "true or false"),
                            ('[local]\ntap = "t0"\nmac = "x"\n', 5, "unknown key"),
                            ('[local]\nroutes = false\n', 3, "needs tap")):
        p.write_text(base + body)
        with pytest.raises(ConfigError) as e:
            load(p)
        assert f"e.toml:{line}" in str(e.value) and why in str(e.value), \
            f"got {e.value}, want line {line} and {why!r}"


def test_shipped_port_forward_config_loads():
    ec = load(os.path.join(ROOT, "configs", "port-forward.toml"))
    assert ec.local == {"tap": "sct-tap0", "routes": True}
    assert ec.network.names == ["lan0", "wan0"]
