"""Issue 13: `shardct run` is the router (kernel forwarding off in its namespace) between a
client and a server: an 8 MiB curl download through its MASQUERADE arrives intact and the
server sees the router's WAN address, a UDP exchange goes both ways, a TTL-1 datagram gets
time-exceeded, a DF datagram over the WAN MTU frag-needed and UDP to the router's own
address port unreachable, each from the router's LAN address (one process; the pool sends
no ICMP errors yet), and the final table lists the flows. With 1 worker and with the pool of 2.
Builds namespaces (run_router.py); skips with the reason without root, ip, nft,
conntrack, ethtool or curl."""
from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import live_router as LR  # noqa: E402
import run_router as RR  # noqa: E402

pytestmark = pytest.mark.netns

DURATION = 120       # seconds of routing at most; SIGINT ends it once the checks are done


@pytest.mark.parametrize("workers", [1, 2])
def test_run_routes_and_masquerades_a_download_udp_and_icmp_probes(workers):
    why = RR.why_not()
    if why:
        pytest.skip(why)
    with RR.RunRouter() as rr:
        server = rr.http_server(lifetime_s=DURATION + 240)
        forwarding = rr.kr.router_exec(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
        run = rr.run(DURATION, "--workers", str(workers))
        echo = rr.start(rr.kr.ns_server, ["timeout", "90", sys.executable, "-c", RR.UDP_ECHO])
        assert echo.wait_line("listening", 10), f"UDP echo did not start: {echo.err}"
        curl, got = rr.download()
        udp = rr.client_python(RR.UDP_CLIENT)
        ttl = rr.client_python(RR.TTL_PROBE)
        df = rr.client_python(RR.DF_PROBE)
        local = rr.client_python(RR.LOCAL_PROBE)
        time.sleep(0.5)                 # the download's last ACKs reach the router
        run.interrupt()
        rc = run.wait(60)
        echo.end()
        err = "".join(run.err)[-3000:]
        blob = rr.blob
        http_log = "".join(server.err)

    print(f"curl: {curl}; shardct: {run.out.splitlines()[0] if run.out else err}")
    assert forwarding == "0", f"got ip_forward={forwarding} in the router, want 0"
    assert rc == 0, f"got shardct run exit {rc}, want 0:\n{err}"
    code, size, _ = (curl.split() + ["", "", ""])[:3]
    assert code == "200" and got is not None and len(got) == len(blob), \
        f"got curl {curl!r} ({0 if got is None else len(got)} bytes), want 200 and {len(blob)}"
    assert RR.sha(got) == RR.sha(blob), "got different bytes than the server's file"
    assert '192.168.0.1 - - ' in http_log and '10.0.0.2' not in http_log, \
        f"got server log {http_log[-500:]!r}, want the router's WAN address as the client"
    want_udp = [f"ping{k} from 192.168.0.1" for k in range(3)]
    assert udp.split("\n")[:3] == want_udp, f"got UDP answers {udp!r}, want {want_udp}"
    one = workers == 1          # the pool sends no ICMP errors (and checks no MTU) yet
    want = {"ttl": "time-exceeded from 10.0.0.3 code 0",
            "df": f"frag-needed from 10.0.0.3 code 4 mtu {RR.WAN_MTU}",
            "local": "port-unreachable from 10.0.0.3 code 3"}
    probes = {"ttl": ttl.strip(), "df": df.strip(), "local": local.strip()}
    want = want if one else dict.fromkeys(want, "none")
    assert probes == want, f"\ngot  {probes}\nwant {want}"

    line = next((x for x in run.out.splitlines() if x.startswith("routed ")), "")
    assert "ring drops: rtr-in=0 rtr-out=0" in line, f"got {line!r}, want no ring drops"
    assert f"icmp_sent={3 * one}" in line and "no_neighbour=0" in line and "tx_full=0" in line, line
    conns = LR.parse_conns(run.out)
    http = {k: v for k, v in conns.items() if k[0] == "tcp" and k[4] == str(LR.HTTP_PORT)}
    assert len(http) == 1, f"got {http} from shardct's table, want the one download"
    (key, (state, assured)), = http.items()
    assert key[1:3] == ("10.0.0.2", "192.168.0.2") and assured \
        and state in ("ESTABLISHED", "TIME_WAIT"), f"got {key} {state} assured={assured}"
    udp_conns = [k for k in conns if k[0] == "udp" and k[4] == str(RR.UDP_PORT)]
    assert len(udp_conns) == 1, f"got {udp_conns}, want the UDP exchange's conn"
