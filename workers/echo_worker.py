# Test bodies for the supervisor: an echo worker that returns the batches it receives, and
# one that fails while booting. Used by tests/runtime/test_supervisor.py.
"""Worker bodies for tests."""
from __future__ import annotations

import zmq

from . import messages as M
from . import transport as T


def echo(ctx, k, n, endpoints, alive):
    """Receive batches on shard-k, send them to the sink tagged with this worker."""
    rx = T.open_socket(ctx, zmq.PULL, endpoints[f"shard-{k}"], bind=True)
    tx = T.open_socket(ctx, zmq.PUSH, endpoints["sink"], bind=False, linger=1000)

    def loop():
        try:
            while alive():
                if rx.poll(20):
                    frames = rx.recv_multipart(copy=False)
                    try:
                        h, batch, hashes = M.decode_batch(frames)
                    except M.WireError:
                        continue
                    tx.send_multipart(M.encode_batch(batch, hashes, t=M.RESULT, seq=h.get("seq"),
                                                     worker=k), copy=False)
                yield
        finally:
            rx.close()
            tx.close()
    return loop()


def fail_boot(ctx, k, n, endpoints, alive):
    raise RuntimeError(f"worker {k} cannot open its capture device")
