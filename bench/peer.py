"""The tracker a Python user writes today, beside shardct's core, on the same frames.

A dict keyed by the 5-tuple parsed with dpkt (and, much slower, scapy), looked up in both
directions, holding a tiny TCP state (SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT,
CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE from the flags alone, no windows) and per-direction
packet/byte counters. The traffic is bench/core.py's: every flow's handshake (new conns/s),
then 64-byte ACKs over established flows with Zipf popularity (ns/packet). Frames are
handed over as ``bytes`` objects, as a pcap reader gives them (making them is not timed).
shardct runs the same frames through ``ConnTrack.process`` in batches of ``--batch``.

    python3 bench/peer.py [--quick] [--flows 100000] [--packets 300000] [--scapy-packets 3000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
QUICK = dict(flows=10_000, packets=50_000, scapy_packets=1000)
FULL = dict(flows=100_000, packets=300_000, scapy_packets=3000)


def frames_of(batch, n=None):
    """The frames of a PacketBatch as a list of bytes (a pcap reader's output)."""
    buf = batch.buf
    n = len(batch) if n is None else min(n, len(batch))
    return [buf[o:o + ln].tobytes() for o, ln in zip(batch.off[:n].tolist(),
                                                    batch.length[:n].tolist())]


class DictTracker:
    """conns[(src, sport, dst, dport, proto)] = [state, pkts_orig, pkts_reply, bytes...];
    the reply direction is found by looking the inverted key up."""

    def __init__(self):
        self.conns = {}

    def packet(self, src, dst, proto, sport, dport, flags, length):
        key = (src, sport, dst, dport, proto)
        c = self.conns.get(key)
        reply = False
        if c is None:
            c = self.conns.get((dst, dport, src, sport, proto))
            if c is None:
                c = self.conns[key] = ["SYN_SENT" if flags & SYN else "ESTABLISHED", 0, 0, 0, 0]
                return c
            reply = True
        st = c[0]
        if flags & RST:
            st = "CLOSE"
        elif flags & SYN and flags & ACK and reply and st == "SYN_SENT":
            st = "SYN_RECV"
        elif flags & FIN:
            st = {"ESTABLISHED": "FIN_WAIT" if not reply else "CLOSE_WAIT",
                  "FIN_WAIT": "LAST_ACK", "CLOSE_WAIT": "LAST_ACK"}.get(st, st)
        elif flags & ACK:
            if st == "SYN_RECV" and not reply:
                st = "ESTABLISHED"
            elif st == "LAST_ACK":
                st = "TIME_WAIT"
        c[0] = st
        i = 2 if reply else 1
        c[i] += 1
        c[i + 2] += length
        return c


def track_dpkt(tracker, frames):
    import dpkt
    Ethernet, TCP, UDP = dpkt.ethernet.Ethernet, dpkt.tcp.TCP, dpkt.udp.UDP
    pkt = tracker.packet
    for fr in frames:
        ip = Ethernet(fr).data
        l4 = ip.data
        if isinstance(l4, TCP):
            pkt(ip.src, ip.dst, 6, l4.sport, l4.dport, l4.flags, len(fr))
        elif isinstance(l4, UDP):
            pkt(ip.src, ip.dst, 17, l4.sport, l4.dport, 0, len(fr))


def track_scapy(tracker, frames):
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    pkt = tracker.packet
    for fr in frames:
        p = Ether(fr)
        ip = p[IP]
        if TCP in p:
            t = p[TCP]
            pkt(ip.src, ip.dst, 6, t.sport, t.dport, int(t.flags), len(fr))
        elif UDP in p:
            u = p[UDP]
            pkt(ip.src, ip.dst, 17, u.sport, u.dport, 0, len(fr))


def shardct_rates(hs, data, flows, batch):
    """(new conns/s through the handshakes, ns/packet established) for ConnTrack.process."""
    from shardct import Config, ConnTrack
    from shardct.batch import take

    def chunks(b):
        for s in range(0, len(b), batch):
            yield take(b, np.arange(s, min(len(b), s + batch)))
    warm = ConnTrack(Config(max_conns=4096, events=False), seed=1)
    for b in chunks(take(hs, np.arange(min(len(hs), 3000)))):
        warm.process(b)
    ct = ConnTrack(Config(max_conns=max(2 * flows, 1024), events=False), seed=0x5EED)
    parts = list(chunks(hs))
    t = time.perf_counter()
    for b in parts:
        ct.process(b)
    cps = flows / (time.perf_counter() - t)
    parts = list(chunks(data))
    for b in parts[:4]:
        ct.process(b, now=1_000_000)
    t = time.perf_counter()
    for b in parts:
        ct.process(b, now=1_000_000)
    return cps, (time.perf_counter() - t) / len(data) * 1e9


def measure(flows=100_000, packets=300_000, scapy_packets=3000, batch=1024, out=print):
    """{"shardct": {...}, "dpkt": {...}, "scapy": {...} or {"skipped": why}}: new conns/s and
    ns/packet established, with shardct/peer ratios (how many times faster shardct is)."""
    from shardct.traffic import handshake_frames, tcp_frames
    hs = handshake_frames(flows, seed=1)
    hs.ts[:] = 0
    data, _ = tcp_frames(flows, packets, popularity="zipf", seed=1, frame_len=64,
                         iss=hs.iss, irs=hs.irs)
    data.ts[:] = 1_000_000
    cps, ns = shardct_rates(hs, data, flows, batch)
    res = {"flows": flows, "packets": packets,
           "shardct": {"new_conns_per_s": cps, "established_ns": ns}}
    hs_frames, data_frames = frames_of(hs), frames_of(data)
    for name, fn, n_data in (("dpkt", track_dpkt, packets), ("scapy", track_scapy, scapy_packets)):
        try:
            __import__(name)
        except ImportError as e:
            res[name] = {"skipped": f"{name} not installed ({e})"}
            continue
        fn(DictTracker(), hs_frames[:30])      # first use: imports, class set-up
        tr = DictTracker()
        n_hs = len(hs_frames) if name == "dpkt" else min(len(hs_frames), 3 * (n_data // 3))
        t = time.perf_counter()
        fn(tr, hs_frames[:n_hs])
        p_cps = (n_hs // 3) / (time.perf_counter() - t)
        if name == "scapy":    # the flows its handshakes opened
            sub = data_frames[:n_data]
        else:
            sub = data_frames
        t = time.perf_counter()
        fn(tr, sub)
        p_ns = (time.perf_counter() - t) / len(sub) * 1e9
        est = sum(1 for c in tr.conns.values() if c[0] == "ESTABLISHED")
        res[name] = {"new_conns_per_s": p_cps, "established_ns": p_ns, "frames": len(sub),
                     "conns": len(tr.conns), "established": est,
                     "ratio_established": p_ns / ns, "ratio_new_conns": cps / p_cps}
    if out is not None:
        out(f"peers: a dict tracker over dpkt/scapy-parsed tuples vs shardct's core, "
            f"{flows:,} flows, Zipf, 64-byte frames")
        out(f"  {'tracker':<34} {'new conns/s':>14} {'ns/pkt estab.':>14}  shardct is")
        out(f"  {'shardct ConnTrack.process':<34} {cps:14,.0f} {ns:14.1f}")
        for name in ("dpkt", "scapy"):
            r = res[name]
            if "skipped" in r:
                out(f"  {name + ' + dict':<34} skipped: {r['skipped']}")
                continue
            out(f"  {name + ' + dict':<34} {r['new_conns_per_s']:14,.0f} "
                f"{r['established_ns']:14.1f}  {r['ratio_established']:,.0f}x faster per "
                f"packet, {r['ratio_new_conns']:,.0f}x new conns/s ({r['frames']:,} frames)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flows", type=int)
    ap.add_argument("--packets", type=int)
    ap.add_argument("--scapy-packets", type=int)
    ap.add_argument("--batch", type=int, default=1024)
    a = ap.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return measure(a.flows, a.packets, a.scapy_packets, a.batch)


if __name__ == "__main__":
    main()
