"""Runs the worker pool over tcp:// for test_pool_tcp.py (started inside the dispatcher's
network namespace; the workers enter their own). Prints one JSON line of results."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker-netns", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--worker-host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    import numpy as np
    import pooltrace as PT
    from shardct import Config
    from shardct.batch import take
    from shardct.netconf import Network
    from shardct.rules import parse_iptables_save
    from workers.pool import Pool, tcp_endpoints

    b = PT.trace(160, seed=31, nat=True, gap_s=40)
    eps = tcp_endpoints(a.workers, a.host, a.worker_host, a.port)
    pool = Pool(a.workers, Config(), seed=0x5EED, rules=parse_iptables_save(PT.MASQ, "m", 4),
                network=Network.from_dict(PT.NET), router=True, eps=eps,
                worker_netns=a.worker_netns, log=lambda m: print(m, file=sys.stderr))
    frames, verdicts = hashlib.sha256(), []

    def emit(pk, v):
        for f in pk.batch.frames():
            frames.update(f)
        verdicts.extend(int(x) for x in v)

    totals = pool.run([take(b, np.arange(len(b)))], emit=emit, timeout_s=300)
    conns = sorted(str((c.original, c.reply, c.state, sorted(c.status), c.packets))
                   for c in pool.conns(now=int(b.ts.max())))
    print(json.dumps({"totals": totals, "frames": frames.hexdigest(), "verdicts": verdicts,
                      "conns": conns, "grants": pool.counts().get("grants", 0),
                      "handoffs": pool.counts().get("handoffs_out", 0)}))


if __name__ == "__main__":
    main()
