"""Issue 12, live input: `shardct live -i rtr-in -i rtr-out --workers 2` watching a Linux
kernel NAT router (nftables MASQUERADE) while a client downloads with curl from a server
behind it must end with the kernel's conntrack table: every conn the kernel lists in the
same state with the same ASSURED flag, no INVALID verdict, ring drops printed and 0.
Builds namespaces (live_router.py); skips with the reason without root, ip, nft,
conntrack, ethtool or curl."""
from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import live_router as LR  # noqa: E402

pytestmark = pytest.mark.netns

DOWNLOADS = 30
DURATION = 120       # seconds of reading at most; SIGINT ends it once the downloads are done
SETTLE = 1.0         # seconds after the last download (its last ACKs reach the router)


def test_live_on_two_router_interfaces_ends_with_the_kernels_table():
    why = LR.why_not()
    if why:
        pytest.skip(why)
    with LR.LiveRouter() as lr:
        lr.http_server(lifetime_s=DURATION + 240)
        live = lr.live(2, DURATION)
        codes = lr.curl(DOWNLOADS)
        time.sleep(SETTLE)
        live.interrupt()
        rc = live.wait(DURATION + 240)
        kernel = LR.parse_conns(lr.conntrack())
        err = "".join(live.err)[-3000:]
    assert codes == ["200"] * DOWNLOADS, f"got HTTP codes {codes}, want {DOWNLOADS} x 200"
    assert rc == 0, f"got shardct live exit {rc}, want 0:\n{err}"
    summary = LR.parse_summary(live.out)
    assert summary, f"got no summary line in:\n{live.out[-2000:]}\n{err}"
    ours = LR.parse_conns(live.out)

    http = {k: v for k, v in kernel.items() if k[0] == "tcp" and k[4] == str(LR.HTTP_PORT)}
    assert len(http) == DOWNLOADS, f"got {len(http)} kernel conns to the server, want {DOWNLOADS}"
    want = {k: ("TIME_WAIT", True) for k in http}
    assert http == want, f"got kernel conns {http}, want TIME_WAIT + ASSURED each"
    got = {k: ours.get(k) for k in kernel}
    assert got == kernel, (f"got shardct {got}, want the kernel's {kernel}\n{summary['line']}")
    extra = sorted(set(ours) - set(kernel))
    assert not extra, f"got conns only shardct has: {extra}"

    assert summary["verdicts"].get("INVALID", 0) == 0, f"got {summary['line']}, want INVALID=0"
    want_drops = {"rtr-in": 0, "rtr-out": 0}
    assert summary["drops"] == want_drops, f"got {summary['line']}, want ring drops {want_drops}"
    assert summary["lost_packets"] == 0, f"got {summary['line']}, want lost_packets=0"
    assert summary["late"] == 0, f"got {summary['line']}, want no late frames"
