"""The control socket (issue 13): `shardct conntrack -L/-S` of a running pool gives the
workers' tables as of the packets fed so far; only its owner can reach it; bad requests
are answered with an error and counted, never stop the pool."""
from __future__ import annotations

import os
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from shardct import Config
from shardct import profiles as P
from shardct.batch import take
from workers import control as C
from workers.pool import Pool

SEED = 0x5EED


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("SHARDCT_RUN_DIR", str(d))
    return d



def _feed_while(pool, b, client):
    """Feed ``b`` as a live source would, while ``client`` runs in a thread; then the
    final (table) round."""
    t = threading.Thread(target=client)
    t.start()
    pool.feed(_live_like([b], lambda: not t.is_alive()), timeout_s=120)
    t.join(10)
    pool.feed([], final=True, timeout_s=60)

def _wait_out(pool, n, limit_s=60.0):
    """In a client thread: wait until the pool has put out n packets (all fed)."""
    deadline = time.monotonic() + limit_s
    while pool.totals["packets_out"] < n and time.monotonic() < deadline:
        time.sleep(0.02)


def _live_like(batches, until, limit_s=60.0):
    """The batches, then empty ones (an idle live source) until ``until()``."""
    yield from batches
    end = time.monotonic() + limit_s
    while not until() and time.monotonic() < end:
        time.sleep(0.01)
        yield take(batches[0], np.arange(0))


@pytest.mark.parametrize("own_process", [False, True])
def test_list_and_stats_of_a_running_pool(run_dir, own_process, capsys):
    tr = P.profile("2k", 12_000, seed=3)
    b = tr.fresh()
    batches = [take(b, np.arange(s, min(len(b), s + 2048))) for s in range(0, len(b), 2048)]
    pool = Pool(2, Config(events=False), seed=SEED, log=lambda *a: None, frames=False,
                dispatcher_process=own_process, control="test")
    got = {}

    def client():
        pid = os.getpid()
        _wait_out(pool, len(b))
        try:
            got["list"] = C.request(pid, {"cmd": "list", "now": int(b.ts.max())}, 30)
            got["stats"] = C.request(pid, {"cmd": "stats"}, 30)
            got["bad"] = C.request(pid, {"cmd": "rm -rf"}, 30)
            from workers.cli import main
            got["cli"] = main(["conntrack", "-L", "-p", "udp", "-o", "json"])
        except Exception as e:      # reported by the assertions below
            got["error"] = repr(e)

    t = threading.Thread(target=client)
    pool.start()
    try:
        t.start()
        pool.feed(_live_like(batches, lambda: not t.is_alive()), timeout_s=120)
        t.join(10)
        pool.feed([], final=True, timeout_s=60)
        want = sorted(c.original for c in pool.conns())
        stats = pool.stats()
        pid = os.getpid()
        assert sorted(os.listdir(run_dir)) == [f"{pid}.events", f"{pid}.sock"], os.listdir(run_dir)
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
    finally:
        pool.stop()
    assert "error" not in got, got.get("error")
    conns = got["list"]["conns"]
    seen = sorted((c["original"]["src"], c["original"]["dst"], c["original"]["sport"],
                   c["original"]["dport"], c["proto"]) for c in conns)
    assert seen == sorted((str(o.src), str(o.dst), o.sport, o.dport, o.proto) for o in want)
    assert len(conns) > 100 and all(c["line"].split()[0] in ("tcp", "udp", "icmp")
                                    for c in conns)
    assert got["stats"]["stats"]["entries"] == stats["entries"], (got["stats"]["stats"], stats)
    assert got["bad"]["ok"] is False and "unknown request" in got["bad"]["error"]
    import json
    out = capsys.readouterr()
    lines = [json.loads(x) for x in out.out.splitlines()]
    udp = [c for c in conns if c["proto"] == 17]
    assert got["cli"] == 0 and len(lines) == len(udp) > 0 and all(x["proto"] == 17 for x in lines)
    assert f"{len(udp)} flow entries have been shown" in out.err, out.err
    assert os.listdir(run_dir) == [], f"sockets outlived the pool: {os.listdir(run_dir)}"


def test_the_control_directory_refuses_others(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    monkeypatch.setenv("SHARDCT_RUN_DIR", str(d))
    with pytest.raises(PermissionError, match="0700"):
        C.control_dir()


def test_conntrack_cli_with_nothing_running_says_so(run_dir, capsys):
    from workers.cli import main
    assert main(["conntrack", "-L"]) == 1
    assert "no running shardct" in capsys.readouterr().err


def test_garbage_on_the_socket_is_answered_and_counted(run_dir):
    pool = Pool(1, Config(events=False), seed=SEED, log=lambda *a: None, frames=False,
                dispatcher_process=False, control="test")
    pool.start()
    try:
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"ipc://{run_dir}/{os.getpid()}.sock")
        s.send(b"\xc1\xff not msgpack")
        for _ in range(200):
            pool.control.poll()
            if s.poll(10):
                break
        reply = msgpack.unpackb(s.recv())
        s.close(0)
        assert reply["ok"] is False and pool.control.rejected == 1, reply
    finally:
        pool.stop()


def test_metrics_endpoint_serves_the_pools_counters():
    """Pool(metrics_port=0) serves Prometheus text: per-worker conntrack counters and
    protocol counts, the totals and the round latency histogram, matching the pool."""
    import urllib.request
    tr = P.profile("2k", 6000, seed=2)
    b = tr.fresh()
    pool = Pool(2, Config(events=False), seed=SEED, log=lambda *a: None, frames=False,
                metrics_port=0)
    pool.start()
    try:
        pool.feed([b], timeout_s=120)
        pool.feed([], final=True, timeout_s=60)
        port = pool.metrics.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        rounds = pool.totals["rounds"]
    finally:
        pool.stop()
    assert f"shardct_packets_out_total {float(len(b))}" in text, text[:2000]
    assert 'shardct_conntrack_entries{worker="0"}' in text
    assert 'shardct_pool_handoffs_out_total{worker="1"}' in text
    assert f"shardct_round_seconds_count {float(rounds)}" in text, \
        [ln for ln in text.splitlines() if "round_seconds" in ln]


def test_delete_by_filter_and_flush(run_dir, capsys):
    """-D -p udp deletes exactly the UDP conns (their reply entries at other workers go
    too: the final table has none), and -F empties the table."""
    from workers.cli import main
    tr = P.profile("2k", 12_000, seed=6)
    b = tr.fresh()
    pool = Pool(2, Config(events=False), seed=SEED, log=lambda *a: None, frames=False,
                control="test")
    got = {}

    def client():
        _wait_out(pool, len(b))
        try:
            before = C.request(os.getpid(), {"cmd": "list"}, 30)["conns"]
            got["udp"] = sum(1 for c in before if c["proto"] == 17)
            got["all"] = len(before)
            got["rc_d"] = main(["conntrack", "-D", "-p", "udp"])
            got["after_d"] = C.request(os.getpid(), {"cmd": "list"}, 30)["conns"]
            got["rc_f"] = main(["conntrack", "-F"])
            got["after_f"] = C.request(os.getpid(), {"cmd": "list"}, 30)["conns"]
            got["rc_bad"] = main(["conntrack", "-D"])
        except Exception as e:
            got["error"] = repr(e)

    pool.start()
    try:
        _feed_while(pool, b, client)
        final = pool.conns()
        entries = pool.stats()["entries"]
    finally:
        pool.stop()
    assert "error" not in got, got["error"]
    err = capsys.readouterr().err
    assert got["udp"] > 0 and got["rc_d"] == 0, got
    assert f"{got['udp']} flow entries have been deleted" in err, err
    assert not [c for c in got["after_d"] if c["proto"] == 17]
    assert len(got["after_d"]) == got["all"] - got["udp"], (len(got["after_d"]), got)
    assert got["rc_f"] == 0 and got["after_f"] == [] and final == [], (got["after_f"][:2], final[:2])
    assert entries == 0, f"entries got {entries}: reply entries outlived their conns"
    assert got["rc_bad"] == 2 and "-D needs a filter" in err


@pytest.mark.parametrize("own_process", [False, True])
def test_events_reach_a_watcher_from_every_worker(run_dir, capsys, own_process):
    """`shardct conntrack -E` while a trace goes through 2 workers: one [NEW] line per
    conn the workers created (their `new` counters), UPDATEs too; the watcher ends when
    the run does."""
    from workers.cli import main
    tr = P.profile("2k", 8000, seed=11)
    b = tr.fresh()
    pool = Pool(2, Config(events=True), seed=SEED, log=lambda *a: None, frames=False,
                dispatcher_process=own_process, control="test")
    rc = {}
    t = threading.Thread(target=lambda: rc.update(rc=main(["conntrack", "-E", "-o", "json"])))

    def source():
        end = time.monotonic() + 30
        while not pool.want_events and time.monotonic() < end:
            time.sleep(0.01)
            yield take(b, np.arange(0))
        yield b
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            time.sleep(0.01)
            yield take(b, np.arange(0))

    pool.start()
    try:
        t.start()
        pool.feed(source(), timeout_s=120)
        new = pool.feed([], final=True, timeout_s=60) and pool.stats()["new"]
    finally:
        pool.stop()
    t.join(10)
    import json
    out = capsys.readouterr()
    events = [json.loads(x) for x in out.out.splitlines()]
    assert rc.get("rc") == 0 and not t.is_alive(), rc
    news = [e for e in events if e["event"] == "NEW"]
    assert len(news) == new > 0, (len(news), new)
    assert {e["event"] for e in events} >= {"NEW", "UPDATE"}, {e["event"] for e in events}
    assert f"{len(events)} flow events have been shown" in out.err


def test_snapshot_save_of_a_running_pool(run_dir, tmp_path, capsys):
    """`shardct snapshot save DIR` while a pool runs: every worker writes its shard there;
    the files load and hold the pool's entries (restart with --restore DIR)."""
    from workers import snapshot as S
    from workers.cli import main
    from shardct.table import T_COUNT
    tr = P.profile("2k", 8000, seed=12)
    b = tr.fresh()
    pool = Pool(2, Config(events=False), seed=SEED, log=lambda *a: None, frames=False,
                control="test")
    got = {}
    d = tmp_path / "saved"

    def client():
        _wait_out(pool, len(b))
        got["rc"] = main(["snapshot", "save", str(d)])

    pool.start()
    try:
        _feed_while(pool, b, client)
        entries = sum(s["entries"] for s in [pool.stats()])
    finally:
        pool.stop()
    assert got.get("rc") == 0, capsys.readouterr().err
    files = sorted(os.listdir(d))
    assert files == ["shard-0.snap", "shard-1.snap"], files
    total = 0
    for k in (0, 1):
        sc, ar = S.load(str(d / f"shard-{k}.snap"))
        total += int(ar["tbl"][T_COUNT])
    assert total >= entries > 0, (total, entries)   # slots include the reply entries
