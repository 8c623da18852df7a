"""Process hygiene: kill -9 of the process that runs a pool leaves nothing behind. Its
workers, dispatcher and multiprocessing helper exit within a bounded time (parent-death
signal and getppid checks), and the ipc directory and the shared-memory frame ring file
are removed by the orphans. A normal stop removes them too."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import sys, time
    from shardct.config import Config
    from workers.pool import Pool
    pool = Pool(2, Config(), seed=1, ring_bytes=1 << 20, log=lambda m: None)
    pool.start()
    pool.wait_ready(600)
    print(pool.sup.dir, pool.ring.path, flush=True)
    {after}
""")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(after: str):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", SCRIPT.format(after=after)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        p.kill()
        pytest.fail(f"the pool did not start: {p.stderr.read()[-2000:]}")
    ipc_dir, ring = line.split()
    return p, ipc_dir, ring


def test_kill_9_of_the_pool_process_leaves_no_process_and_no_file():
    p, ipc_dir, ring = start("time.sleep(600)")
    kids = descendants(p.pid)
    assert len(kids) >= 3, f"want 2 workers + the dispatcher below the pool, got {sorted(kids)}"
    assert os.path.isdir(ipc_dir) and os.path.exists(ring), "ipc dir and ring exist while it runs"
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    end = t0 + 20
    while time.monotonic() < end and (any(alive(k) for k in kids) or os.path.exists(ipc_dir)
                                      or os.path.exists(ring)):
        time.sleep(0.05)
    left = sorted(k for k in kids if alive(k))
    took = time.monotonic() - t0
    for k in left:                      # do not leave them to the next test
        os.kill(k, signal.SIGKILL)
    assert left == [], f"processes left {took:.1f} s after kill -9 of the pool: {left}"
    assert not os.path.exists(ipc_dir), f"ipc directory {ipc_dir} left behind"
    assert not os.path.exists(ring), f"frame ring {ring} left behind"
    print(f"every child gone and files removed {took:.2f} s after kill -9")


def test_pool_stop_removes_the_ipc_directory_and_the_ring():
    p, ipc_dir, ring = start("pool.stop(); print('stopped', flush=True)")
    assert p.stdout.readline().strip() == "stopped"
    p.wait(30)
    assert p.returncode == 0, p.stderr.read()[-2000:]
    assert not os.path.exists(ipc_dir) and not os.path.exists(ring), (ipc_dir, ring)
