"""The pool's transport (workers/transport.py, issue 15): a size limit on every socket,
CurveZMQ on tcp:// that refuses and counts strangers, and forged control/peer messages
that are rejected, counted and stall nothing."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import zmq

from shardct import Config, ConnTrack
from shardct.batch import take
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.shard import Packets
from workers import messages as M
from workers import transport as T
from workers.pool import Pool, tcp_endpoints

import pooltrace as PT

SEED = 0x5EED


def nat_kw():
    return dict(rules=parse_iptables_save(PT.MASQ, "masq.rules", 4),
                network=Network.from_dict(PT.NET), router=True)


@pytest.fixture(scope="module")
def trace():
    """A NAT trace and the verdicts one table gives it."""
    b = PT.trace(120, seed=5, nat=True)
    ref = ConnTrack(Config(), seed=SEED, rng=np.random.default_rng(SEED), **nat_kw())
    return b, ref.process(take(b, np.arange(len(b)))).verdict.copy()


def feed(pool, b):
    """Feed ``b`` to a started pool; the verdicts in sequence order."""
    out = []
    totals = pool.feed([take(b, np.arange(len(b)))], emit=lambda pk, v: out.append((pk, v)),
                       timeout_s=120, final=True)
    pk = Packets.concat([p for p, _ in out])
    v = np.concatenate([v for _, v in out])
    assert pk.seq.tolist() == list(range(len(b))), "frames out of order or missing"
    return totals, v


def free_ports(n: int) -> int:
    """A first port of ``n`` consecutive free ones on 127.0.0.1."""
    for base in range(23000 + (time.time_ns() // 1000) % 20000, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def test_every_socket_has_a_size_limit(tmp_path):
    ctx = zmq.Context()
    try:
        s = T.open_socket(ctx, zmq.PULL, f"ipc://{tmp_path}/x", bind=True)
        assert s.getsockopt(zmq.MAXMSGSIZE) == T.MAX_MSG > M.MAX_BUF
        s.close(0)
    finally:
        ctx.term()


def test_keygen_refuses_to_overwrite(tmp_path):
    keys = T.keygen(str(tmp_path / "k"))
    assert T.Curve.load(str(tmp_path / "k")) == keys
    with pytest.raises(FileExistsError):
        T.keygen(str(tmp_path / "k"))


def test_curve_pool_on_tcp_refuses_and_counts_strangers(tmp_path, trace):
    """A 2-worker pool on tcp://127.0.0.1 with curve keys gives the single table's
    verdicts; a plain client and a curve client with an unlisted key, both pushing
    forged messages at worker 0's peer port, get nothing through and are counted."""
    b, want = trace
    keys = str(tmp_path / "keys")
    T.keygen(keys)
    eps = tcp_endpoints(2, "127.0.0.1", "127.0.0.1", free_ports(8))
    pool = Pool(2, Config(), seed=SEED, eps=eps, curve=keys, log=lambda *a: None, **nat_kw())
    ctx = zmq.Context()
    pool.start()
    try:
        pool.wait_ready(120)
        plain = ctx.socket(zmq.PUSH)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(eps["peer-0"])
        stranger = ctx.socket(zmq.PUSH)
        stranger.setsockopt(zmq.LINGER, 0)
        pub, sec = zmq.curve_keypair()
        stranger.curve_publickey, stranger.curve_secretkey = pub, sec
        stranger.curve_serverkey = T.Curve.load(keys).server_public
        stranger.connect(eps["peer-0"])
        forged = M.encode(M.HELLO, **{"from": 1}, worker=1, gen=1, first=10**9)
        for s in (plain, stranger):
            try:                 # the handshake may fail between poll and send: Again
                s.send(forged, zmq.NOBLOCK)
            except zmq.Again:
                pass
        time.sleep(1.0)          # a few handshakes (libzmq retries every 100 ms)
        totals, v = feed(pool, b)
    finally:
        pool.stop()
        ctx.destroy(0)
    bad = np.flatnonzero(v != want)
    assert not len(bad), f"verdicts differ at {bad[:5]}"
    c = pool.counts()
    print("curve pool counts:", {k: c.get(k, 0) for k in ("handshake_failed", "auth_refused",
                                                        "rejected", "wire_errors")})
    assert c.get("handshake_failed", 0) >= 1, f"plain client not counted: {c}"
    assert c.get("auth_refused", 0) >= 1, f"unlisted key not counted: {c}"
    assert c.get("rejected", 0) == 0 and c.get("wire_errors", 0) == 0, \
        f"a stranger's message got through: {c}"
    assert totals["lost_packets"] == 0, totals


@pytest.mark.parametrize("own_process", [True, False])
def test_forged_messages_stall_nothing(trace, own_process):
    """Forged HELLO/STEP/STOP pushed at a worker's peer and shard sockets, the sink, the
    dispatcher and the supervisor's control socket: the pool finishes the trace with the
    verdicts it gives without them, the supervisor's error stays unset, and every
    receiver counts what it rejected."""
    b, want = trace
    pool = Pool(2, Config(), seed=SEED, log=lambda *a: None, dispatcher_process=own_process,
                **nat_kw())
    ctx = zmq.Context()
    pool.start()
    try:
        pool.wait_ready(120)
        ep = pool.sup.endpoints

        def push(name, *msgs):
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(ep[name])
            for m in msgs:
                s.send(m)
            return s

        hello = M.encode(M.HELLO, **{"from": 1}, worker=1, gen=99, first=10**9)
        socks = [
            push("peer-0", hello, hello, hello,
                 M.encode(M.HELLO, **{"from": 1}, worker=1, gen=1, first=0),
                 M.encode(M.STEP, **{"from": 1}, round=10**6, step=0, gen=99),
                 M.encode(M.STEP, **{"from": 7}, round=0, step=0, gen=0),
                 M.encode(M.STOP, **{"from": 1}, error="forged"), b"\x00garbage"),
            push("shard-1", M.encode(M.HELLO, gen=0, first=10**9)),
            push("sink", M.encode(M.HELLO, worker=0, gen=5, first=10**9),
                 M.encode(M.HELLO, worker=9, gen=0, first=10**9),
                 M.encode(M.ROUND, round=10**6, n=5), M.encode(M.ACK, batch=7, rounds=9)),
            push("control", M.encode(M.STOP, worker=0, pid=1, error="forged"),
                 M.encode(M.STOP, worker=1, error="forged")),
        ]
        if own_process:
            socks.append(push("source", M.encode(M.HELLO, worker=5, gen=1)))
        time.sleep(0.5)
        totals, v = feed(pool, b)
        for s in socks:
            s.close(0)
    finally:
        pool.stop()
        ctx.destroy(0)
    bad = np.flatnonzero(v != want)
    assert not len(bad), f"verdicts differ at {bad[:5]}"
    assert pool.sup.error is None, f"a forged STOP set the error: {pool.sup.error!r}"
    assert totals["lost_packets"] == 0, totals
    c, t = pool.counts(), pool.transport_counts()
    print("forged: workers", {k: c.get(k, 0) for k in ("rejected", "wire_errors")},
          "this process", t)
    assert c.get("rejected", 0) >= 8, f"worker rejections got {c}, want >= 8"
    assert c.get("wire_errors", 0) >= 1, f"garbage not counted: {c}"
    assert t["rejected"] >= 2 and t["wire_errors"] >= 4, t
    if own_process:
        assert pool.dispatcher_counts.get("wire_errors", 0) >= 1, pool.dispatcher_counts
