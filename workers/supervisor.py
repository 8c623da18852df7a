# The pool's arbiter (gunicorn-style): starts N worker processes (multiprocess, fork),
# watches their heartbeats, restarts the dead and counts them, stops the pool on a boot
# failure instead of restarting forever, and drains on SIGINT/SIGTERM. No orphans.
"""Supervisor.

Runs in the main process. Each worker process runs :func:`worker_main`, which creates
its own ZeroMQ context (after the fork/spawn), connects a PUSH socket to the supervisor's
control PULL, says READY once its body has booted, then heartbeats every
``HEARTBEAT_S`` while its body runs. The body is pluggable: ``"module:function"``
called as ``body(ctx, k, n, endpoints, stop_event_check, **kwargs)``; it returns when
asked to stop.

Workers are forked by default: a caller that loaded its kernels first (``Pool.start``)
hands them over at no cost, where a spawned worker imports numpy, numba and shardct and
loads every kernel again (0.7 s of CPU each, and the pool's start-up is most of a short
replay). ``start_method="spawn"`` is there for a caller whose process cannot fork
(threads it cannot vouch for).

Rules:
1. A worker that exits (or misses heartbeats for ``DEAD_AFTER_S``) after READY is
   restarted; ``restarts[k]`` counts it and the restart is logged.
2. A worker that exits before READY is a boot failure: the pool stops, exit code
   ``EXIT_BOOT`` (3), with the worker's message.
3. Signal handlers only set a flag; the loop sends STOP, waits ``DRAIN_S``, then
   terminates and finally kills what is left, and removes its ipc directory.
4. A child outlives no supervisor: it asks the kernel for SIGUSR2 when its parent dies
   (PR_SET_PDEATHSIG) and checks ``getppid()`` with each heartbeat; either way it stops
   its body, removes the pool's leftovers (the ipc directory, the frame ring file: the
   supervisor that would have removed them is gone) and exits 0, within
   ``ORPHAN_EXIT_S`` even if its body hangs.
"""
from __future__ import annotations

import faulthandler
import importlib
import os
import shutil
import signal
import sys
import tempfile
import time
import weakref

import multiprocess as mp
import zmq

from . import messages as M
from . import transport as T

EXIT_OK, EXIT_BOOT = 0, 3
HEARTBEAT_S = 0.2
DEAD_AFTER_S = 10.0    # generous: a first numba compile inside a round can take seconds
DRAIN_S = 3.0
ORPHAN_EXIT_S = 5       # an orphan whose body does not return by then is ended by SIGALRM
PR_SET_PDEATHSIG = 1


def resolve(spec: str):
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def enter_netns(name: str):
    """Move this process into network namespace ``name`` (ip netns add name)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:          # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns({name})")
    finally:
        os.close(fd)


def remove_leftovers(paths):
    """Remove the pool's files and directories (an orphan does it: its supervisor died)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def orphan_guard(parent: int, leftovers, state: dict):
    """In a child: notice the death of ``parent`` (SIGUSR2 by PR_SET_PDEATHSIG, or
    ``check()`` seeing another getppid()), then remove ``leftovers``, set
    ``state['stop']`` and arm SIGALRM so the process ends even if its body hangs.
    Returns ``check``: call it now and then (every heartbeat)."""
    def orphaned(*_):
        if state.get("orphan"):
            return
        state["orphan"] = state["stop"] = True
        remove_leftovers(leftovers)
        signal.alarm(ORPHAN_EXIT_S)     # default action: the process ends

    def check():
        if os.getppid() != parent:
            orphaned()

    signal.signal(signal.SIGUSR2, orphaned)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR2), 0, 0, 0)
    except (OSError, AttributeError):    # not Linux: the getppid() check alone
        pass
    check()                             # the parent may have died before prctl
    return check


def worker_main(k: int, n: int, endpoints: dict, body_spec: str, kwargs: dict,
                netns: str | None = None, parent: int | None = None, leftovers=(),
                curve: str | None = None, incarnations=None):
    """Entry point of worker process k (runs in the child). ``parent``: the supervisor's
    pid; when it dies this child removes ``leftovers`` and exits (rule 4). ``curve``:
    the key directory (tcp:// endpoints use CurveZMQ). ``incarnations``: every
    process's restart count when this one was started; later restarts are announced on
    the command socket and the body reads them as ``alive.announced`` (worker -> gen)."""
    state = {"stop": False, "last": 0.0}
    orphan_check = orphan_guard(parent, leftovers, state) if parent else (lambda: None)
    if netns:
        enter_netns(netns)
    keys = T.Curve.load(curve) if curve else None
    ctx = zmq.Context()
    ctl = T.open_socket(ctx, zmq.PUSH, endpoints["control"], bind=False, curve=keys,
                        linger=1000)
    cmd = T.open_socket(ctx, zmq.SUB, endpoints["command"], bind=False, curve=keys,
                        subscribe=b"")
    announced = dict(enumerate(incarnations or ()))

    def alive():
        """Called by the body often: heartbeats, and False once STOP was broadcast or
        the supervisor died."""
        now = time.monotonic()
        if now - state["last"] >= HEARTBEAT_S:
            orphan_check()
            ctl.send(M.encode(M.HEARTBEAT, worker=k, pid=os.getpid()))
            state["last"] = now
            # a worker about to be declared silent prints where it is stuck first
            faulthandler.dump_traceback_later(DEAD_AFTER_S * 0.8, file=sys.__stderr__)
        while cmd.poll(0):
            try:
                h = M.decode(cmd.recv())
                if h["t"] == M.STOP:
                    state["stop"] = True
                elif h["t"] == M.HELLO:        # the supervisor restarted a worker
                    w, g = int(h["worker"]), int(h["gen"])
                    announced[w] = max(announced.get(w, 0), g)
            except (M.WireError, KeyError, TypeError, ValueError):
                state["rejected"] = state.get("rejected", 0) + 1
        return not state["stop"]
    alive.announced = announced

    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the supervisor decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)     # a forked child has its parent's
    # kill -USR1 <pid>: print the stack. To the real stderr: a forked child keeps its
    # parent's sys.stderr, which may be no file at all (a test capturing output)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__)
    try:
        body = resolve(body_spec)
        boot = body(ctx, k, n, endpoints, alive, **kwargs)
        ctl.send(M.encode(M.READY, worker=k, pid=os.getpid()))
        for _ in boot:            # the body is a generator: booted once it yields
            if not alive():
                break
        boot.close()              # its finally closes its sockets: ctx.term() waits for them
        if state.get("orphan"):   # no one to tell: leave without lingering
            ctl.close(0)
            cmd.close(0)
            ctx.term()
            os._exit(0)
    except Exception as e:      # a failing body: report it, exit non-zero
        if state.get("orphan"):
            os._exit(0)
        ctl.send(M.encode(M.STOP, worker=k, pid=os.getpid(),
                          error=f"{type(e).__name__}: {e}"))
        ctl.close()
        cmd.close()
        ctx.term()
        os._exit(1)
    ctl.send(M.encode(M.END, worker=k, pid=os.getpid()))
    ctl.close()
    cmd.close()
    ctx.term()


class Supervisor:
    def __init__(self, n: int, body: str, kwargs: dict | None = None, ipc_dir: str | None = None,
                 log=print, *, endpoints: dict | None = None, pass_incarnation: bool = False,
                 netns: str | None = None, extra: tuple[str, dict] | None = None,
                 leftovers: list[str] | None = None, start_method: str = "fork",
                 curve: str | None = None):
        """endpoints: overrides of the ipc defaults (tcp:// across hosts); every worker
        gets ``incarnation=`` (its restart count) when pass_incarnation; netns: the
        network namespace the workers run in; extra: (body, kwargs) of one more process
        (index n: the dispatcher), started first and not restarted: its death stops the
        pool (its place in the input is gone with it); leftovers: files (the frame
        ring) that the children remove, with the ipc directory, if this process dies;
        start_method: "fork" (default) or "spawn"; curve: the key directory
        (transport.keygen) for tcp:// endpoints.

        Control messages are taken only from a known process: the ``worker`` index in
        range and the ``pid`` of its current incarnation (READY, HEARTBEAT, STOP, END);
        anything else is counted in ``counts["rejected"]`` and dropped."""
        self.n = n if n != "auto" else (os.cpu_count() or 1)
        self.extra = extra
        self.body = body
        self.kwargs = kwargs or {}
        self.own_dir = ipc_dir is None
        self.dir = ipc_dir or tempfile.mkdtemp(prefix="shardct-")
        if self.own_dir:
            # a caller that never reaches stop() (an exception before it) still leaves
            # no ipc directory behind when this process exits
            weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.endpoints = {"control": f"ipc://{self.dir}/control",
                          "command": f"ipc://{self.dir}/command",
                          **{f"shard-{k}": f"ipc://{self.dir}/shard-{k}" for k in range(self.n)},
                          **{f"peer-{k}": f"ipc://{self.dir}/peer-{k}" for k in range(self.n)},
                          "sink": f"ipc://{self.dir}/sink", "source": f"ipc://{self.dir}/source",
                          **(endpoints or {})}
        self.leftovers = ([self.dir] if self.own_dir else []) + list(leftovers or [])
        self.pass_incarnation = pass_incarnation
        self.netns = netns
        self.log = log
        m = self.n + (1 if extra else 0)
        self.restarts = [0] * m
        self.procs: list = [None] * m
        self.ready = [False] * m
        self.seen = [0.0] * m
        self.stopping = False
        self.exit_code = EXIT_OK
        self.error = None
        self.start_method = start_method
        self._mp = mp.get_context(start_method)
        self.curve = curve
        self.keys = T.Curve.load(curve) if curve else None
        self.counts = {"rejected": 0}       # this process's transport counters
        self.ctx = zmq.Context()
        self.guard = T.Guard(self.ctx, self.keys, self.counts)
        self.ctl = self.socket(zmq.PULL, "control", bind=True)
        self.cmd = self.socket(zmq.PUB, "command", bind=True)

    def socket(self, kind: int, name: str, *, bind: bool, **opts):
        """A socket of this process's context on endpoint ``name`` (transport.open_socket:
        size limit, curve on tcp://, failed handshakes counted)."""
        return T.open_socket(self.ctx, kind, self.endpoints[name], bind=bind,
                             curve=self.keys, guard=self.guard, **opts)

    # ------------------------------------------------------------ lifecycle
    def spawn(self, k: int):
        if k == self.n:
            body, kw, netns = self.extra[0], self.extra[1], None
        else:
            body, netns = self.body, self.netns
            kw = dict(self.kwargs, incarnation=self.restarts[k]) if self.pass_incarnation else self.kwargs
        if self.restarts[k]:
            # peers accept a HELLO only from an incarnation announced here
            self.cmd.send(M.encode(M.HELLO, worker=k, gen=self.restarts[k]))
        p = self._mp.Process(target=worker_main, name=f"shardct-worker-{k}",
                             args=(k, self.n, self.endpoints, body, kw, netns),
                             kwargs=dict(parent=os.getpid(), leftovers=self.leftovers,
                                         curve=self.curve, incarnations=list(self.restarts)),
                             daemon=True)
        p.start()
        self.procs[k] = p
        self.ready[k] = False
        self.seen[k] = time.monotonic()

    def start(self):
        for k in range(len(self.procs)):
            self.spawn(k)

    def request_stop(self, *_):
        """Signal handler: only sets a flag."""
        self.stopping = True

    def poll(self, timeout_s: float = 0.05) -> bool:
        """One supervisor step: read control messages, restart the dead. False when the
        pool must stop (boot failure or stop requested)."""
        deadline = time.monotonic() + timeout_s
        while self.ctl.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            try:
                msg = M.decode(self.ctl.recv())
            except M.WireError as e:
                self.counts["rejected"] += 1
                self.log(f"supervisor: dropped a bad control message: {e}")
                continue
            k = msg.get("worker")
            if (not isinstance(k, int) or not 0 <= k < len(self.procs)
                    or self.procs[k] is None or msg.get("pid") != self.procs[k].pid):
                # not from the current incarnation of one of ours: a forgery or a ghost
                self.counts["rejected"] += 1
                continue
            self.seen[k] = time.monotonic()
            if msg["t"] == M.READY:
                self.ready[k] = True
            elif msg["t"] == M.STOP and "error" in msg:
                self.error = f"worker {k}: {msg['error']}"
        now = time.monotonic()
        for k, p in enumerate(self.procs):
            if p is None:
                continue
            dead = not p.is_alive()
            silent = self.ready[k] and now - self.seen[k] > DEAD_AFTER_S
            if not (dead or silent) or self.stopping:
                continue
            if not self.ready[k]:
                self.error = self.error or f"worker {k} exited during boot (exit code {p.exitcode})"
                self.log(f"supervisor: boot failure, stopping the pool: {self.error}")
                self.exit_code = EXIT_BOOT
                return False
            if silent and not dead:
                p.kill()
                p.join(1)
            if k == self.n:
                self.error = self.error or f"the dispatcher died (exit code {p.exitcode})"
                self.log(f"supervisor: {self.error}; stopping the pool")
                return False
            self.restarts[k] += 1
            self.log(f"supervisor: worker {k} died (exit code {p.exitcode}); restart #{self.restarts[k]}")
            self.spawn(k)
        return not self.stopping

    def stop(self):
        """Drain and stop every worker; no process or ipc file is left behind."""
        self.cmd.send(M.encode(M.STOP))
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(p is not None and p.is_alive() for p in self.procs):
            self.cmd.send(M.encode(M.STOP))
            time.sleep(0.05)
        for p in self.procs:
            if p is not None and p.is_alive():
                p.terminate()
                p.join(1)
            if p is not None and p.is_alive():
                p.kill()
                p.join(1)
        self.ctl.close(0)
        self.cmd.close(0)
        self.guard.stop()
        self.ctx.term()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for ep in self.endpoints.values():
                path = ep[len("ipc://"):]
                if ep.startswith("ipc://") and os.path.exists(path):
                    os.unlink(path)

    def run(self, until=None) -> int:
        """Supervise until a signal, a boot failure or ``until()`` is true."""
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while self.poll() and not (until and until()):
                pass
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
        return self.exit_code
