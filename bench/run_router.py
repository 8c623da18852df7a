"""`shardct run` as the router, beside the Linux kernel doing the same NAT, on the same
namespace topology (issue 16's router row):

    client 10.0.0.2 -- router (shardct run, or the kernel's forwarding + nftables
    MASQUERADE) -- server 192.168.0.2

* **zero-loss rate**: UDP datagrams (64 B payload, 64 flows) sent from the client at a
  paced rate for ``--seconds``; the server counts what arrives. The highest rate tried
  with nothing lost. One Python sender: above ~50-100 kpps the sender is the limit, and
  the table says what the sender reached.
* **latency**: UDP echo round trips client -> server -> client through the router,
  p50/p99 in microseconds, idle (before the floods) and **under load**: while a second
  sender floods at half that router's zero-loss rate (issue 13's measure); the added
  latency is shardct's minus the kernel's.

The namespaces come from tests/netns (kernel_router.KernelRouter: every exit path
removes them; every traffic loop is bounded in count and time). Needs root, ip, nft.

    python3 bench/run_router.py [--quick] [--workers 1,2] [--rates 10000,30000,0]
                                [--seconds 3] [--pings 500]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "netns"))

PORT = 9100
SERVER = "192.168.0.2"

COUNT_SERVER = f"""\
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("{SERVER}", {PORT}))
s.settimeout(1.0)
print("listening", file=sys.stderr, flush=True)
n, end = 0, time.monotonic() + {{limit}}
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        if n:
            break
        continue
    if data[:4] == b"echo":
        s.sendto(data, peer)
    else:
        n += 1
print(n, flush=True)
"""

SENDER = f"""\
import socket, time, json
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
rate, seconds = {{rate}}, {{seconds}}
payload = b"x" * 64
n, t0 = 0, time.perf_counter()
end = t0 + seconds
while True:
    now = time.perf_counter()
    if now >= end:
        break
    due = int((now - t0) * rate) if rate else n + 64
    while n < due:
        socks[n % 64].sendto(payload, ("{SERVER}", {PORT}))
        n += 1
print(json.dumps({{{{"sent": n, "pps": n / (time.perf_counter() - t0)}}}}))
"""

PINGER = f"""\
import socket, time, json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
rtt = []
for k in range({{count}}):
    t = time.perf_counter()
    s.sendto(b"echo%d" % k, ("{SERVER}", {PORT}))
    try:
        s.recvfrom(2048)
    except socket.timeout:
        continue
    rtt.append((time.perf_counter() - t) * 1e6)
rtt.sort()
print(json.dumps({{{{"n": len(rtt), "p50": rtt[len(rtt) // 2] if rtt else None,
                  "p99": rtt[int(len(rtt) * 0.99)] if rtt else None}}}}))
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    import run_router as RR
    return RR.why_not()


def _trial(router, rate: float, seconds: float, pings: int, loaded: bool = False) -> dict:
    """One server run: echo pings first (latency), then the paced flood (loss); with
    ``loaded`` the pings run while the flood goes on (latency under load)."""
    import kernel_router as KR
    srv = router.start(router.kr.ns_server, ["timeout", str(int(seconds + 30)), sys.executable,
                                             "-c", COUNT_SERVER.format(limit=seconds + 20)])
    if not srv.wait_line("listening", 10):
        raise KR.KernelRouterError(f"the counting server did not start: {srv.err}")

    def ping():
        cp = KR._ns_exec(router.kr.ns_client, [sys.executable, "-c", PINGER.format(count=pings)],
                         check=False, timeout=pings + 10)
        return json.loads(cp.stdout.strip().splitlines()[-1])
    lat = {}
    if pings and not loaded:
        lat = ping()
    flood = router.start(router.kr.ns_client, [
        "timeout", str(int(seconds + 10)), sys.executable, "-c",
        SENDER.format(rate=rate, seconds=seconds)])
    if pings and loaded:
        time.sleep(min(0.3, seconds / 4))       # the flood is on
        lat = ping()
    flood.wait(seconds + 15)
    sent = json.loads(flood.out.strip().splitlines()[-1])
    srv.wait(seconds + 25)
    got = int(srv.out.strip().splitlines()[-1]) if srv.out.strip() else 0
    return {"rate": rate, "sent": sent["sent"], "sender_pps": round(sent["pps"]),
            "received": got, "lost": sent["sent"] - got, **{f"rtt_{k}": v for k, v in lat.items()}}


def _series(router, rates, seconds, pings, out) -> dict:
    rows = []
    for k, rate in enumerate(rates):
        r = _trial(router, rate, seconds, pings if k == 0 else 0)
        rows.append(r)
        out(f"    rate {rate or 'max':>7}: sent {r['sent']:>8,} at {r['sender_pps']:>7,} pps, "
            f"received {r['received']:>8,}, lost {r['lost']:,}")
    zero = [r["sender_pps"] for r in rows if r["lost"] == 0]
    res = {"rows": rows, "zero_loss_pps": max(zero) if zero else 0,
           "rtt_p50_us": rows[0].get("rtt_p50"), "rtt_p99_us": rows[0].get("rtt_p99")}
    if pings and res["zero_loss_pps"]:
        # long enough for the pings (about 1 ms each under load, bounded by their timeout)
        half = res["zero_loss_pps"] // 2
        r = _trial(router, half, max(seconds, pings / 200 + 1), pings, loaded=True)
        res.update(load_pps=half, load_lost=r["lost"], rtt_load_p50_us=r.get("rtt_p50"),
                   rtt_load_p99_us=r.get("rtt_p99"))
        out(f"    pings under a flood at {half:,} pps (half the zero-loss rate): RTT p50/p99 "
            f"{r.get('rtt_p50') or 0:.0f}/{r.get('rtt_p99') or 0:.0f} us over {r.get('rtt_n', 0)} "
            f"of {pings}; flood lost {r['lost']:,}")
    return res


def measure(workers=(1, 2), rates=(10_000, 30_000, 0), seconds=3.0, pings=500,
            out=print) -> dict:
    """The kernel and shardct run with each worker count; a dict of figures."""
    reason = skip_reason()
    if reason:
        out(f"router bench skipped: {reason}")
        return {"skipped": reason}
    import kernel_router as KR
    import live_router as LR
    import run_router as RR
    res = {}
    out("kernel (forwarding + nftables MASQUERADE):")
    with LR.LiveRouter() as lr:
        KR._ns_exec(lr.kr.ns_server, [KR._tool("nft"), "delete", "table", "inet", "sct_sink"])
        res["kernel"] = _series(lr, rates, seconds, pings, out)
    for w in workers:
        out(f"shardct run --workers {w}:")
        with RR.RunRouter() as rr:
            p = rr.run(seconds * (len(rates) + 3) + pings / 100 + 60, "--workers", str(w))
            try:
                res[f"shardct_{w}"] = _series(rr, rates, seconds, pings, out)
            finally:
                p.interrupt()
                p.wait(30)
                p.end()
            summary = [ln for ln in p.err if "ring drops" in ln or "forwarded" in ln]
            res[f"shardct_{w}"]["summary"] = "".join(summary[-2:]).strip()
            routed = [ln for ln in p.out.splitlines() if ln.startswith("routed ")]
            if routed and "dropped: " in routed[0]:
                out("    dropped: " + routed[0].split("dropped: ", 1)[1])
            inside = [ln for ln in p.out.splitlines() if ln.startswith("time in the router")]
            if inside:
                res[f"shardct_{w}"]["in_router"] = inside[0].split(": ", 1)[1]
                out(f"    {inside[0]}")
    k = res["kernel"]
    for w in workers:
        s = res[f"shardct_{w}"]
        if s["rtt_p50_us"] and k["rtt_p50_us"]:
            s["added_latency_p50_us"] = round(s["rtt_p50_us"] - k["rtt_p50_us"], 1)
            s["added_latency_p99_us"] = round(s["rtt_p99_us"] - k["rtt_p99_us"], 1)
        if s.get("rtt_load_p50_us") and k.get("rtt_load_p50_us"):
            s["added_load_p50_us"] = round(s["rtt_load_p50_us"] - k["rtt_load_p50_us"], 1)
            s["added_load_p99_us"] = round(s["rtt_load_p99_us"] - k["rtt_load_p99_us"], 1)
    out(f"{'router':<12} {'zero-loss pps':>14} {'ratio':>6} {'idle RTT p50/p99 us':>20} "
        f"{'loaded RTT p50/p99':>19} {'added idle':>13} {'added loaded':>14}")
    for name, s in res.items():
        ratio = s["zero_loss_pps"] / k["zero_loss_pps"] if k["zero_loss_pps"] else 0

        def pair(a, b):
            return f"{s.get(a) or 0:.0f}/{s.get(b) or 0:.0f}"
        add = pair("added_latency_p50_us", "added_latency_p99_us") if name != "kernel" else "-"
        addl = pair("added_load_p50_us", "added_load_p99_us") if name != "kernel" else "-"
        out(f"{name:<12} {s['zero_loss_pps']:>14,} {ratio:>6.2f} "
            f"{pair('rtt_p50_us', 'rtt_p99_us'):>20} {pair('rtt_load_p50_us', 'rtt_load_p99_us'):>19} "
            f"{add:>13} {addl:>14}")
    out("(zero-loss pps: the highest sender rate with nothing lost; one Python sender, so "
        "at the top rate the sender is the limit; loaded: pings while a second sender floods "
        "at half that router's zero-loss rate; goal p99 added <= 500 us)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per rate, 100 pings")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rates", default="10000,30000,0",
                    help="paced sender rates, pps (0: as fast as it goes); comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="per rate")
    ap.add_argument("--pings", type=int, default=500, help="UDP echo round trips (latency)")
    a = ap.parse_args(argv)
    workers = tuple(int(x) for x in a.workers.split(","))
    if a.quick:
        measure(workers, rates=(10_000, 0), seconds=1.0, pings=100)
    else:
        measure(workers, tuple(int(x) for x in a.rates.split(",")), a.seconds, a.pings)


if __name__ == "__main__":
    main()
