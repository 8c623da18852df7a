"""AF_PACKET rings (workers/afpacket.py) on a veth pair in a namespace of our own: every
frame in is a frame out, byte for byte, both ways; masked and oversized frames are not
sent."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.netns


def _ip(*args):
    subprocess.run(["ip", *args], check=True, timeout=20, capture_output=True)


def run_in_veth_namespace(*args):
    """Run afpacket_run.py with args in a fresh namespace holding veth afa <-> afb
    (IPv6 off: no chatter); the namespace is removed on every exit path."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and AF_PACKET")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip)")
    ns = f"sctaf{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "add", "afa", "type", "veth", "peer", "name", "afb")
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1"], timeout=20, capture_output=True)
        for dev in ("afa", "afb"):
            _ip("-n", ns, "link", "set", dev, "up")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable,
                            os.path.join(HERE, "afpacket_run.py"), *args],
                           capture_output=True, text=True, timeout=300,
                           cwd=os.path.join(HERE, "..", ".."))
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=20, capture_output=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_rx_and_tx_rings_on_a_veth_pair():
    r = run_in_veth_namespace()
    assert r["rx_count"] == 500 and r["rx_equal"], r
    assert r["ifindex"] == 3 and r["ts_ok"], r
    assert r["tx_sent"] == 499 and r["too_big"] == 1, r
    assert r["tx_count"] == 499 and r["tx_equal"], r


def test_rx_v2_ring_and_tx_ring_on_a_veth_pair():
    """The per-frame (TPACKET_V2) RX ring `shardct run` reads: the same frames, byte for
    byte; one longer than a slot is counted in truncated, not read."""
    r = run_in_veth_namespace("v2")
    assert r["rx_count"] == 500 and r["rx_equal"], r
    assert r["ifindex"] == 3 and r["ts_ok"], r
    assert r["truncated"] == 1 and r["stats_packets"] >= 501, r
    assert r["tx_count"] == 499 and r["tx_equal"], r


def test_pool_between_af_packet_rings():
    """A live source and sink: frames in on an RX ring, through the pool (2 workers),
    out through a TX ring, all of them, in order, byte for byte (no NAT configured)."""
    r = run_in_veth_namespace("pool")
    assert r["out"] == r["in"] and r["equal"], json.dumps(r)
    assert r["totals"]["lost_packets"] == 0, r


def test_shardct_live_monitors_an_interface():
    """`shardct live -i afb --workers 2` tracks what arrives and lists the same conns
    the single table builds from those frames."""
    import numpy as np
    from shardct import Config, ConnTrack
    sys.path.insert(0, os.path.join(HERE, "..", "runtime"))
    import pooltrace as PT
    r = run_in_veth_namespace("live")
    assert r["rc"] == 0, r["err"]
    assert f"tracked {r['sent']} packets on afb with 2 workers" in r["out"], r["out"][-2000:]
    ref = ConnTrack(Config(), seed=0x5EED)
    ref.process(PT.trace(100, seed=43))
    n = len(list(ref.conns()))
    assert f"shardct: {n} flow entries in the table" in r["out"], r["out"][-1500:]
