# Every ZeroMQ socket of the pool is made here: a maximum message size on all of them,
# CurveZMQ on tcp:// endpoints (keys from files, a ZAP handler that admits only the
# listed client keys), and failed handshakes counted. ipc:// stays as it is (0700 dir).
"""Transport security and socket options.

Keys (``shardct keygen DIR``, or zmq's ``zmq.auth.create_certificates``)::

    DIR/server.key, server.key_secret    the pool's listening side (every bound tcp socket)
    DIR/client.key, client.key_secret    the pool's connecting side
    DIR/authorized/*.key                 client public keys the listeners admit

Every process of the pool reads the same directory: each both listens and connects.
A plain (no curve) peer fails the handshake (mechanism mismatch), a curve peer with a
key not in ``authorized/`` is refused by the ZAP handler; both show up as
``handshake_failed`` / ``auth_refused`` in the counts of the process that listened.
"""
from __future__ import annotations

import os
import shutil
import threading
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from . import messages as M

# a frame larger than this makes the receiver drop the sender's connection (libzmq
# checks each frame); MAX_BUF of frames is the largest a valid message carries
MAX_MSG = M.MAX_BUF + (1 << 20)

FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
          zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
          zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_refused"}


class Curve(NamedTuple):
    """The key material of one pool (all raw z85 bytes as zmq wants them)."""
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    authorized: str          # directory of admitted client public keys

    @classmethod
    def load(cls, directory: str) -> "Curve":
        """Precondition: ``directory`` was made by :func:`keygen` (or has its layout).
        Raises OSError/ValueError naming the file that is missing or bad."""
        sp, ss = zmq.auth.load_certificate(os.path.join(directory, "server.key_secret"))
        cp, cs = zmq.auth.load_certificate(os.path.join(directory, "client.key_secret"))
        if ss is None or cs is None:
            raise ValueError(f"{directory}: a .key_secret file without its secret key")
        auth = os.path.join(directory, "authorized")
        if not os.path.isdir(auth):
            raise OSError(f"{auth}: no directory of authorized client keys")
        return cls(sp, ss, cp, cs, auth)


def keygen(directory: str) -> Curve:
    """Create a pool's keys in ``directory`` (made 0700 if new); the client key is the
    one authorized. Refuses to overwrite existing keys."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name in ("server", "client"):
        if os.path.exists(os.path.join(directory, f"{name}.key_secret")):
            raise FileExistsError(f"{directory}/{name}.key_secret exists; not overwritten")
    zmq.auth.create_certificates(directory, "server")
    zmq.auth.create_certificates(directory, "client")
    for name in ("server", "client"):
        os.chmod(os.path.join(directory, f"{name}.key_secret"), 0o600)
    auth = os.path.join(directory, "authorized")
    os.makedirs(auth, mode=0o700, exist_ok=True)
    shutil.copy(os.path.join(directory, "client.key"), os.path.join(auth, "client.key"))
    return Curve.load(directory)


def open_socket(ctx, kind: int, endpoint: str, *, bind: bool, curve: Curve | None = None,
                linger: int = 0, sndhwm: int | None = None, subscribe: bytes | None = None,
                guard: "Guard | None" = None):
    """A socket of ``kind`` bound or connected to ``endpoint``, with MAX_MSG as its
    maximum message size and, on tcp:// with ``curve``, CurveZMQ (listener: server key;
    connector: client key and the server's public key). ``guard`` watches a listener's
    handshakes."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, linger)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_MSG)
    if sndhwm is not None:
        s.setsockopt(zmq.SNDHWM, sndhwm)
    if subscribe is not None:
        s.setsockopt(zmq.SUBSCRIBE, subscribe)
    if curve is not None and endpoint.startswith("tcp://"):
        if bind:
            s.curve_secretkey = curve.server_secret
            s.curve_publickey = curve.server_public
            s.curve_server = True
        else:
            s.curve_secretkey = curve.client_secret
            s.curve_publickey = curve.client_public
            s.curve_serverkey = curve.server_public
    if bind:
        if guard is not None and endpoint.startswith("tcp://"):
            guard.watch(s)
        s.bind(endpoint)
    else:
        s.connect(endpoint)
    return s


class Guard:
    """One per process (per ZeroMQ context): the ZAP handler when ``curve`` is given,
    and a monitor of each watched listener that counts failed handshakes into
    ``counts`` (``handshake_failed``, ``auth_refused``). Owner: the process that made
    ``ctx``; ``stop()`` before closing the context."""

    def __init__(self, ctx, curve: Curve | None, counts: dict):
        self.ctx, self.counts = ctx, counts
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.auth = None
        if curve is not None:
            self.auth = ThreadAuthenticator(ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=curve.authorized)

    def watch(self, sock):
        """Count ``sock``'s failed handshakes (call before it binds)."""
        addr = f"inproc://shardct-monitor-{id(sock)}"
        sock.monitor(addr, sum(FAILED))
        t = threading.Thread(target=self._count, args=(addr,), daemon=True)
        t.start()
        self._threads.append(t)

    def _count(self, addr):
        mon = self.ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(addr)
        try:
            while not self._stop.is_set():
                if not mon.poll(100):
                    continue
                try:
                    ev = recv_monitor_message(mon)["event"]
                except (zmq.ZMQError, ValueError, KeyError):
                    continue
                key = FAILED.get(ev)
                if key is not None:     # only this thread writes these keys
                    self.counts[key] = self.counts.get(key, 0) + 1
        finally:
            mon.close(0)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(2)
        if self.auth is not None:
            self.auth.stop()
