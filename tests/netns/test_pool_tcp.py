"""Issue 4 item 7: the pool across hosts. The workers run in their own network namespace
and talk to the dispatcher, the sink and each other over tcp://; the results equal the
single-table core's."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "runtime"))

import pooltrace as PT  # noqa: E402

pytestmark = pytest.mark.netns
TIMEOUT = 20


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def _ip(*args):
    subprocess.run(["ip", *args], check=True, timeout=TIMEOUT, capture_output=True)


@pytest.fixture
def two_namespaces():
    """<prefix>-d (dispatcher, sink, supervisor) and <prefix>-w (workers) joined by a
    veth pair; removed on every exit path of the test."""
    why = _why_not()
    if why:
        pytest.skip(why)
    tag = secrets.token_hex(2)
    d, w = f"sctp{tag}-d", f"sctp{tag}-w"
    net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:], 16)}"
    made = []
    try:
        for ns in (d, w):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", d, "link", "add", "vd", "type", "veth", "peer", "name", "vw", "netns", w)
        _ip("-n", d, "addr", "add", f"{net}.1/24", "dev", "vd")
        _ip("-n", w, "addr", "add", f"{net}.2/24", "dev", "vw")
        _ip("-n", d, "link", "set", "vd", "up")
        _ip("-n", w, "link", "set", "vw", "up")
        yield d, w, f"{net}.1", f"{net}.2"
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], timeout=TIMEOUT, capture_output=True)


def test_workers_in_another_namespace_over_tcp(two_namespaces):
    from shardct import Config, ConnTrack
    from shardct.batch import take
    from shardct.netconf import Network
    from shardct.rules import parse_iptables_save

    d, w, host, whost = two_namespaces
    p = subprocess.run(["ip", "netns", "exec", d, sys.executable,
                        os.path.join(HERE, "pool_tcp_run.py"), "--worker-netns", w,
                        "--host", host, "--worker-host", whost, "--port", "41000"],
                       capture_output=True, text=True, timeout=400,
                       cwd=os.path.join(HERE, "..", ".."))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    b = PT.trace(160, seed=31, nat=True, gap_s=40)
    ref = ConnTrack(Config(), seed=0x5EED, rng=np.random.default_rng(0x5EED),
                    rules=parse_iptables_save(PT.MASQ, "m", 4), network=Network.from_dict(PT.NET),
                    router=True)
    rb = take(b, np.arange(len(b)))
    r = ref.process(rb)
    h = hashlib.sha256()
    for f in rb.frames():
        h.update(f)
    assert got["totals"]["packets_out"] == len(b) and got["totals"]["lost_packets"] == 0
    assert got["verdicts"] == [int(x) for x in r.verdict]
    assert got["frames"] == h.hexdigest(), "the frames leave with the single table's bytes"
    want = sorted(str((c.original, c.reply, c.state, sorted(c.status), c.packets))
                  for c in ref.conns(now=int(b.ts.max())))
    assert got["conns"] == want
    assert got["grants"] > 0 and got["handoffs"] > 0, "cross-shard traffic crossed tcp://"
