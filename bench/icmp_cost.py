"""``python3 -m bench.icmp_cost``: what the router's error generator (shardct/icmp.py)
costs on traffic that needs no error: ``IcmpErrors.generate`` alone on 65,536 forwarded
established-TCP frames, ns per packet (best of 20), with and without the check for the
router's own addresses (``Config.local_delivery`` false / true)."""
from __future__ import annotations

import time

from shardct import Config, ConnTrack
from shardct import track as K
from shardct.netconf import Network
from shardct.traffic import tcp_frames

NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/8", "b::1/64"]},
                      "wan0": {"address": ["192.168.0.1/16", "a::1/64"]}},
       "routes": [{"dst": "0.0.0.0/0", "dev": "wan0"}]}


def main(repeat: int = 20) -> dict[str, float]:
    b, _ = tcp_frames(10000, 65536, seed=1)
    b.ifindex[:] = 0
    ct = ConnTrack(Config(), seed=1, network=Network.from_dict(NET), router=True)
    r = ct.process(b)
    g = ct._icmp
    out = {}
    for answer_local in (False, True):
        g.answer_local = answer_local
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            g.generate(b, r.meta, r.verdict, r.forward, r.tuple_id, b.ts, ct.table, K.V_DROP,
                       K.V_ACCEPT)
            best = min(best, time.perf_counter() - t)
        key = "with own-address check" if answer_local else "MTU and TTL only"
        out[key] = best / len(b) * 1e9
        print(f"icmp generate, {key}: {out[key]:.2f} ns/packet (best of {repeat}, 65536 frames)")
    return out


if __name__ == "__main__":
    main()
