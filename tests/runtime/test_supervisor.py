"""The supervisor with real processes over ipc:// in a temporary directory: batches come
back exactly once in per-worker order, kill -9 is restarted and counted, a boot failure
stops the pool, SIGTERM drains with no process or socket left. Every wait is bounded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import zmq

from shardct import wire
from shardct.hashing import N_BUCKETS
from shardct.traffic import tcp_frames
from workers import messages as M
from shardct.scatter import scatter
from workers.supervisor import EXIT_BOOT, Supervisor


def wait_for(cond, timeout, step=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if step:
            step()
        if cond():
            return True
        time.sleep(0.01)
    return False


def pool(tmp_path, n=2, body="workers.echo_worker:echo"):
    sup = Supervisor(n, body, ipc_dir=str(tmp_path), log=lambda *_: None)
    sup.start()
    return sup


def test_batches_come_back_once_in_order_and_kill9_restarts(tmp_path):
    sup = pool(tmp_path)
    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    sink.bind(sup.endpoints["sink"])
    pushes = []
    for k in range(sup.n):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(sup.endpoints[f"shard-{k}"])
        pushes.append(s)
    try:
        assert wait_for(lambda: all(sup.ready), 60, lambda: sup.poll(0.01)), "workers ready"
        b, _ = tcp_frames(300, 10_000, seed=2, popularity="uniform")
        meta, addr = wire.new_meta(len(b))
        h = np.empty(len(b), np.int64)
        wire.parse_hash_batch(b.buf, b.off, b.length, meta, addr, True, 99, h)
        sent = {}
        seq = 0
        for s in range(0, len(b), 500):
            part = type(b)(b.buf, b.off[s:s + 500], b.length[s:s + 500], b.ifindex[s:s + 500],
                           b.ts[s:s + 500])
            for k, (pb, ph, idx) in enumerate(scatter(part, h[s:s + 500], sup.n, N_BUCKETS)):
                pushes[k].send_multipart(M.encode_batch(pb, ph, seq=seq), copy=False)
                sent[seq] = (k, (idx + s).tolist())
                seq += 1
        got = {}
        while len(got) < len(sent) and sink.poll(10_000):
            hd, pb, ph = M.decode_batch(sink.recv_multipart())
            got[hd["seq"]] = (hd["worker"], pb.frames())
        assert len(got) == len(sent), f"batches back: {len(got)} of {len(sent)}"
        for q, (k, idx) in sent.items():
            want_frames = [b.frame(i) for i in idx]
            assert got[q][0] == k and got[q][1] == want_frames, \
                f"batch {q}: worker got {got[q][0]}, want {k}; " \
                f"frames equal to the {len(idx)} sent got {got[q][1] == want_frames}, want True"
        # kill -9 under load: restarted, counted, and it serves again
        victim = sup.procs[0].pid
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: sup.restarts[0] == 1 and sup.ready[0], 60,
                             lambda: sup.poll(0.01))
        assert restarted, \
            f"(restarts, ready) got {(sup.restarts[0], sup.ready[0])}, want (1, True) in 60 s"
        assert sup.procs[0].pid != victim, \
            f"worker 0 pid got {sup.procs[0].pid}, want a new one, not {victim}"
        pushes[0].send_multipart(M.encode_batch(b, None, seq=-1), copy=False)
        assert sink.poll(20_000), "the restarted worker answers"
        hd, pb, _ = M.decode_batch(sink.recv_multipart())
        answer = (hd["worker"], len(pb))
        assert answer == (0, len(b)), f"answer (worker, packets) got {answer}, want {(0, len(b))}"
    finally:
        for s in pushes:
            s.close(0)
        sink.close(0)
        ctx.term()
        sup.stop()
    assert all(not p.is_alive() for p in sup.procs), "no worker left"
    assert not [f for f in os.listdir(tmp_path)], f"ipc files left: {os.listdir(tmp_path)}"


def test_boot_failure_stops_the_pool(tmp_path):
    logs = []
    sup = Supervisor(2, "workers.echo_worker:fail_boot", ipc_dir=str(tmp_path), log=logs.append)
    sup.start()
    try:
        stopped = wait_for(lambda: not sup.poll(0.01), 60)
    finally:
        sup.stop()
    assert stopped and sup.exit_code == EXIT_BOOT, \
        f"(stopped, exit_code) got {(stopped, sup.exit_code)}, want {(True, EXIT_BOOT)}"
    assert "cannot open its capture device" in (sup.error or ""), sup.error
    assert sum(sup.restarts) == 0, "a boot failure is not restarted"


def test_sigterm_drains_and_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from workers.supervisor import Supervisor
        sup = Supervisor(2, "workers.echo_worker:echo", ipc_dir={str(tmp_path)!r}, log=lambda *a: None)
        t0 = time.monotonic()
        def until():
            if all(sup.ready) and not getattr(sup, "_told", False):
                print(" ".join(str(p.pid) for p in sup.procs), flush=True)
                sup._told = True
            return time.monotonic() - t0 > 120
        sys.exit(sup.run(until))
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        line = p.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2, f"children: {line!r}"
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
        assert rc == 0, f"supervisor exit code after SIGTERM got {rc}, want 0"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"worker {pid} outlived the supervisor"
    assert not os.listdir(tmp_path), f"ipc files left: {os.listdir(tmp_path)}"
