"""Issue 13, local delivery and the port-forward box: `shardct run` is the router (kernel
forwarding off in its namespace) and its TAP holds the router's addresses.

* configs/port-forward.rules reached from the WAN side: curl to the router's WAN address
  port 8080 downloads the LAN server's file (port 80) intact, the server sees the WAN
  client's address, and `shardct conntrack -L` over the control socket shows the flow
  with DST_NAT, ASSURED, in a closing-or-closed TCP state, reply from the server's port 80;
* a REDIRECT of port 80 to a local listener on the TAP: curl to a WAN address gets the
  listener's answer (un-NATed: from the address it asked for), and the listener's
  original-destination query (workers/control.py, over the control socket) and
  `shardct conntrack --original-dst` return the address and port the client asked for;
* iperf3 TCP for 5 s through MASQUERADE (run_router's namespaces, no TAP needed).

With 1 worker and with the pool of 2 (iperf3: 1 worker); the REDIRECT over IPv6 too. Builds namespaces
(local_router.py, run_router.py); skips with the reason without root, ip, nft, conntrack,
ethtool, curl, /dev/net/tun or (iperf3 only) iperf3.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_router as KR  # noqa: E402
import live_router as LR  # noqa: E402
import local_router as L  # noqa: E402
import run_router as RR  # noqa: E402

pytestmark = pytest.mark.netns

DURATION = 120          # seconds of routing at most; SIGINT ends it once the checks are done
IPERF_S = 5
CLOSING = {"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE"}


def _skip_unless_ready():
    why = RR.why_not()
    if why:
        pytest.skip(why)
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("local delivery needs /dev/net/tun (TAP devices)")


def _summary(run) -> str:
    return next((x for x in run.out.splitlines() if x.startswith("routed ")), "")


@pytest.mark.parametrize("workers", [1, 2])
def test_port_forward_from_the_wan_reaches_the_lan_server(workers):
    _skip_unless_ready()
    with L.LocalRouter(L.port_forward_rules()) as lr:
        server = lr.http_server80(DURATION + 240)
        forwarding = lr.kr.router_exec(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
        run = lr.run(DURATION, "--workers", str(workers))
        got_path = os.path.join(lr.tmp, "got")
        curl, _ = lr.curl(f"http://{lr.kr.router_client_ip4}:8080/blob", 60, got_path)
        time.sleep(0.5)                 # the last ACKs and FINs reach the router
        conns = lr.conns_json()
        run.interrupt()
        rc = run.wait(60)
        err = "".join(run.err)[-3000:]
        got = open(got_path, "rb").read() if os.path.exists(got_path) else b""
        blob, http_log = lr.blob, "".join(server.err)

    print(f"curl: {curl}; shardct: {_summary(run) or err}")
    assert forwarding == "0", f"got ip_forward={forwarding} in the router, want 0"
    assert rc == 0, f"got shardct run exit {rc}, want 0:\n{err}"
    assert curl == f"200 {len(blob)}", f"got curl {curl!r}, want 200 and {len(blob)} bytes"
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest(), \
        "got different bytes than the server's file"
    assert f"{lr.kr.client_ip4} - - " in http_log, \
        f"got server log {http_log[-300:]!r}, want the WAN client's address (DNAT only)"
    flows = [c for c in conns if c["proto"] == 6 and c["original"]["dport"] == 8080]
    assert len(flows) == 1, f"got {conns}, want the one forwarded download"
    c, = flows
    assert c["original"]["src"] == lr.kr.client_ip4 and \
        c["original"]["dst"] == lr.kr.router_client_ip4, c
    assert (c["reply"]["src"], c["reply"]["sport"], c["reply"]["dst"]) == \
        (lr.kr.server_ip4, 80, lr.kr.client_ip4), f"got reply tuple {c['reply']}"
    assert {"DST_NAT", "ASSURED", "SEEN_REPLY"} <= set(c["status"]) and \
        "SRC_NAT" not in c["status"], f"got status {c['status']}"
    assert c["state"] in CLOSING, f"got state {c['state']} after the download, want closing"
    line = _summary(run)
    assert "no_neighbour=0" in line and "tx_full=0" in line, line


@pytest.mark.parametrize("workers, family", [(1, 4), (2, 4), (1, 6)])
def test_redirect_to_a_local_listener_answers_and_gives_the_original_dst(workers, family):
    _skip_unless_ready()
    # nobody has the WAN address: only the REDIRECT can answer
    if family == 4:
        wan, client, router, url = "198.51.100.7", "10.0.0.2", "10.0.0.3", "http://198.51.100.7/"
        rules, listen = (L.REDIRECT_RULES, None), L.LISTENER
    else:
        wan, client, router, url = "2001:db8:1::7", "b::2", "b::1", "http://[2001:db8:1::7]/"
        rules, listen = (L.REDIRECT_RULES, L.REDIRECT6_RULES), L.IPV6_LISTENER
    with L.LocalRouter(*rules) as lr:
        run = lr.run(DURATION, "--workers", str(workers))
        listener = lr.router_python(listen)
        assert listener.wait_line("listening", 30), f"listener: {''.join(listener.err)}"
        curl, body = lr.curl(url, 20)
        listener.wait(20)
        said = listener.out.strip().split()
        peer, sport = (said[-4], said[-3]) if len(said) >= 4 else ("", "")
        cli = lr.ctl("--original-dst", "-s", peer or client, "--sport", sport or "0",
                     "-d", router, "--dport", str(L.LISTEN_PORT))
        miss = lr.ctl("--original-dst", "-s", client, "--sport", "1",
                      "-d", router, "--dport", str(L.LISTEN_PORT))
        run.interrupt()
        rc = run.wait(60)
        err = "".join(run.err)[-3000:]

    print(f"curl: {curl} {body!r}; shardct: {_summary(run) or err}")
    assert rc == 0, f"got shardct run exit {rc}, want 0:\n{err}"
    assert curl.startswith("200 "), f"got curl {curl!r}, want the local listener's 200"
    want = f"local listener: {client}:{sport} asked for {wan}:80"
    assert body.strip() == want, f"got body {body!r}, want {want!r}"
    assert cli[0] == 0 and cli[1].strip() == f"{wan} 80", \
        f"got shardct conntrack --original-dst {cli}, want '{wan} 80'"
    assert miss[0] == 1 and "ENOTCONN" in miss[2], f"got {miss} for a tuple with no conn"
    line = _summary(run)
    assert "delivered=0 " not in line and "local=0" in line, \
        f"got {line!r}, want frames delivered to the TAP and none dropped as local"


def test_iperf3_tcp_for_5_s_through_masquerade():
    why = RR.why_not()
    if why:
        pytest.skip(why)
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3 (run .ci/install-netns-deps.sh)")
    with RR.RunRouter() as rr:
        server = rr.start(rr.kr.ns_server, ["timeout", str(DURATION + 60), "iperf3", "-s", "-1",
                                            "-B", rr.kr.server_ip4])
        assert L.LocalRouter.listening(rr, rr.kr.ns_server, 5201), \
            f"iperf3 -s did not start: {''.join(server.err)}"
        run = rr.run(DURATION)
        cp = KR._ns_exec(rr.kr.ns_client, ["iperf3", "-c", rr.kr.server_ip4, "-t", str(IPERF_S),
                                           "-J", "--connect-timeout", "5000"],
                         check=False, timeout=IPERF_S + 60)
        time.sleep(0.5)
        run.interrupt()
        rc = run.wait(60)
        err = "".join(run.err)[-3000:]
    try:
        res = json.loads(cp.stdout)
    except ValueError:
        res = {"error": f"not JSON: {cp.stdout[-500:]!r} {cp.stderr[-500:]!r}"}
    assert "error" not in res, f"got iperf3 error {res['error']}"
    sent, recv = res["end"]["sum_sent"], res["end"]["sum_received"]
    print(f"iperf3 TCP {IPERF_S} s through shardct run (1 worker): "
          f"{recv['bits_per_second'] / 1e6:.0f} Mbit/s received, {sent['bytes']} bytes sent, "
          f"{sent.get('retransmits')} retransmits; shardct: {_summary(run)}")
    assert rc == 0, f"got shardct run exit {rc}, want 0:\n{err}"
    # TCP: what was sent arrives (less what was still in flight when the sender stopped)
    assert 0 < recv["bytes"] <= sent["bytes"] and recv["bytes"] >= 0.95 * sent["bytes"], \
        f"got sent {sent} received {recv}"
    assert recv["seconds"] >= IPERF_S - 0.5, f"got a {recv['seconds']} s test, want {IPERF_S}"
    conns = LR.parse_conns(run.out)
    data = [k for k in conns if k[0] == "tcp" and k[4] == "5201"]
    assert len(data) == 2, f"got {data}, want iperf3's control and data connections"
    assert all(conns[k][1] for k in data), f"got {[conns[k] for k in data]}, want ASSURED"
