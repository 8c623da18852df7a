"""Inside a namespace with veth pair afa <-> afb (test_afpacket.py sets it up): frames
sent into afa with a plain packet socket must come out of an RxRing on afb; frames sent
through a TxRing on afb must reach a plain packet socket on afa. Prints JSON."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def frames(n, tag):
    out = []
    for i in range(n):
        eth = bytes.fromhex("02aa00000002") + bytes.fromhex("02aa00000001") + b"\x88\xb5"
        out.append(eth + tag + i.to_bytes(4, "big") + bytes(40 + i % 300))
    return out


def main(version=3):
    from workers.afpacket import RxRing, TxRing
    from shardct.batch import PacketBatch
    n = 500
    res = {}
    # ---- RX ring on afb
    rx = RxRing("afb", ifindex=3, timeout_ms=5, version=version)
    plain = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    plain.bind(("afa", 0))
    sent = frames(n, b"RX01")
    for f in sent:
        plain.send(f)
    got, deadline = [], time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        b = rx.read(0.05)
        got += [f for f in b.frames() if f[14:18] == b"RX01"]
        if len(b):
            res["ifindex"] = int(b.ifindex[0])
            res["ts_ok"] = bool((b.ts > 1_600_000_000 * 10**9).all())
    res["rx_equal"] = got == sent
    res["rx_count"] = len(got)
    if version == 2:        # a frame longer than a slot is counted, not read
        import subprocess
        for dev in ("afa", "afb"):
            subprocess.run(["ip", "link", "set", dev, "mtu", "4000"], check=True, timeout=20)
        plain.send(frames(1, b"RX02")[0] + bytes(2100))
        for _ in range(20):
            rx.read(0.05)
            if rx.truncated:
                break
        res["truncated"] = rx.truncated
        rx.poll_stats()
        res["stats_packets"] = rx.packets
    # ---- TX ring on afb, plain receiver on afa
    tx = TxRing("afb", frames=256)
    recv = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    recv.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)     # SO_RCVBUFFORCE: hold the burst
    recv.bind(("afa", 0))
    recv.settimeout(0.2)
    out = frames(n, b"TX01") + [bytes(4000)]         # the last one is too big for a slot
    b = PacketBatch.from_frames(out)
    mask = [True] * len(out)
    mask[7] = False                                   # masked frames are not sent
    import numpy as np
    res["tx_sent"] = tx.send(b, np.array(mask))
    res["too_big"] = tx.too_big
    got, deadline = [], time.monotonic() + 5
    while len(got) < n - 1 and time.monotonic() < deadline:
        try:
            f = recv.recv(65535)
        except socket.timeout:
            continue
        if f[14:18] == b"TX01":
            got.append(f)
    want = [f for i, f in enumerate(out[:n]) if i != 7]
    res["tx_equal"] = got == want
    res["tx_count"] = len(got)
    rx.close()
    tx.close()
    print(json.dumps(res))


if __name__ == "__main__" and len(sys.argv) == 1:
    main()


def pool_main():
    """Frames of a generated trace go in on afa, through an RX ring on afb, the pool (2
    workers), a TX ring on afb, and back out on afa. Prints JSON."""
    import hashlib
    import threading
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime"))
    import pooltrace as PT
    from shardct import Config
    from workers.afpacket import RingSink, RxRing, TxRing, ring_batches
    from workers.pool import Pool
    b = PT.trace(100, seed=41)
    sent = b.frames()
    rx = RxRing("afb", ifindex=0, timeout_ms=2)
    tx = TxRing("afb", frames=1024)
    recv = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    recv.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
    recv.setsockopt(263, 23, 1)          # PACKET_IGNORE_OUTGOING: not what we inject
    recv.bind(("afa", 0))
    recv.settimeout(0.1)
    inject = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    inject.bind(("afa", 0))
    got = []
    done = threading.Event()

    def collect():
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                got.append(recv.recv(65535))
            except socket.timeout:
                pass
        done.set()

    th = threading.Thread(target=collect, daemon=True)
    th.start()
    pool = Pool(2, Config(), seed=0x5EED, log=lambda m: print(m, file=sys.stderr))
    sink = RingSink({0: tx}, egress=lambda batch: np.zeros(len(batch), np.int16))
    pool.start()
    try:
        pool.wait_ready()
        t_end = [None]

        def stop():
            if t_end[0] is None and len(got) >= len(sent):
                t_end[0] = time.monotonic()
            return done.is_set() or (t_end[0] is not None)

        def source():
            for f in sent:              # in order, paced a little so RX keeps up
                inject.send(f)
            yield from ring_batches([rx], stop)

        totals = pool.feed(source(), emit=sink, timeout_s=90)
    finally:
        pool.stop()
    th.join(5)
    missing = [i for i, f in enumerate(sent) if f not in set(got)][:10]
    print(json.dumps({"in": len(sent), "out": len(got), "equal": got == sent,
                      "missing": missing, "mlen": [len(sent[i]) for i in missing],
                      "extra": [len(f) for f in got if f not in set(sent)][:10],
                      "sent": sink.sent, "totals": totals}))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "v2":
    main(version=2)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "pool":
    pool_main()


def live_main():
    """`shardct live -i afb` (2 workers) while a trace is sent into afa; prints its
    output as JSON."""
    import subprocess
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime"))
    import pooltrace as PT
    p = subprocess.Popen([sys.executable, "-m", "workers.cli", "live", "-i", "afb",
                          "--workers", "2", "--duration", "25", "--list", "-1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inject = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    inject.bind(("afa", 0))
    b = PT.trace(100, seed=43)
    time.sleep(15)                       # the workers boot (numba kernels load)
    for f in b.frames():
        inject.send(f)
    out, err = p.communicate(timeout=120)
    print(json.dumps({"rc": p.returncode, "out": out, "err": err[-2000:], "sent": len(b)}))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "live":
    live_main()
