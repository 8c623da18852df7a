"""Generated traces for the pool tests: many flows with whole lifecycles, interleaved at
random but each flow in order, with an RTT between a packet and its answer.

Topology (as tests/core/test_nat.py): clients 10.0.0.x on lan0 (ifindex 0), servers
192.168.0.x on wan0 (ifindex 1), the router 10.0.0.3 / 192.168.0.1. With ``nat`` the
replies are addressed to the router's WAN address (MASQUERADE keeps the client's port,
which is unique per flow: plenty of ports).
"""
from __future__ import annotations

import random

from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, raw

from shardct import PacketBatch

E = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02")
NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24"]},
                      "wan0": {"address": ["192.168.0.1/24"]}}}
LAN, WAN = 0, 1
R_WAN = "192.168.0.1"
MASQ = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o wan0 -j MASQUERADE\nCOMMIT\n")
S = 1_000_000_000


def _tcp_flow(c, s, sport, dport, nat, rst):
    back = R_WAN if nat else c
    a, b = 1000, 5000
    out = [(LAN, IP(src=c, dst=s) / TCP(sport=sport, dport=dport, flags="S", seq=a)),
           (WAN, IP(src=s, dst=back) / TCP(sport=dport, dport=sport, flags="SA", seq=b, ack=a + 1)),
           (LAN, IP(src=c, dst=s) / TCP(sport=sport, dport=dport, flags="A", seq=a + 1, ack=b + 1)),
           (LAN, IP(src=c, dst=s) / TCP(sport=sport, dport=dport, flags="PA", seq=a + 1, ack=b + 1)
            / Raw(b"x" * 20)),
           (WAN, IP(src=s, dst=back) / TCP(sport=dport, dport=sport, flags="PA", seq=b + 1,
                                           ack=a + 21) / Raw(b"y" * 30))]
    if rst:
        out.append((LAN, IP(src=c, dst=s) / TCP(sport=sport, dport=dport, flags="R", seq=a + 21)))
        return out
    out += [(LAN, IP(src=c, dst=s) / TCP(sport=sport, dport=dport, flags="FA", seq=a + 21, ack=b + 31)),
            (WAN, IP(src=s, dst=back) / TCP(sport=dport, dport=sport, flags="FA", seq=b + 31,
                                            ack=a + 22)),
            (LAN, IP(src=c, dst=s) / TCP(sport=sport, dport=dport, flags="A", seq=a + 22, ack=b + 32))]
    return out


def _udp_flow(c, s, sport, dport, nat):
    back = R_WAN if nat else c
    return [(LAN, IP(src=c, dst=s) / UDP(sport=sport, dport=dport) / Raw(b"q")),
            (WAN, IP(src=s, dst=back) / UDP(sport=dport, dport=sport) / Raw(b"ra")),
            (LAN, IP(src=c, dst=s) / UDP(sport=sport, dport=dport) / Raw(b"q2"))]


def _icmp_flow(c, s, ident, nat):
    back = R_WAN if nat else c
    return [(LAN, IP(src=c, dst=s) / ICMP(type=8, id=ident, seq=1)),
            (WAN, IP(src=s, dst=back) / ICMP(type=0, id=ident, seq=1))]


def trace(n_flows: int, seed: int, nat: bool = False, gap_s: float = 0.0):
    """(PacketBatch, ifindex per frame). Flows start at random times over ~1 s; each
    answer comes an RTT (0.5-3 ms) after what it answers. ``gap_s`` > 0 adds a second
    wave of the UDP flows after that idle gap (their conns expire in between)."""
    rng = random.Random(seed)
    events = []
    for f in range(n_flows):
        c = f"10.0.{1 + f // 250}.{1 + f % 250}"
        s = f"192.168.0.{2 + f % 7}"
        sport = 20000 + f
        kind = f % 4
        if kind in (0, 1):
            pkts = _tcp_flow(c, s, sport, 80 + f % 3, nat, rst=kind == 1)
        elif kind == 2:
            pkts = _udp_flow(c, s, sport, 53, nat)
        else:
            pkts = _icmp_flow(c, s, 100 + f, nat)
        t = rng.randrange(0, S)
        for ifx, p in pkts:
            events.append((t, f, ifx, p))
            t += rng.randrange(S // 2000, 3 * S // 1000)
        if gap_s and kind == 2:
            t += int(gap_s * S)
            for ifx, p in _udp_flow(c, s, sport, 53, nat):
                events.append((t, f, ifx, p))
                t += rng.randrange(S // 2000, 3 * S // 1000)
    events.sort(key=lambda e: (e[0], e[1]))
    frames = [raw(E / p) for _, _, _, p in events]
    return PacketBatch.from_frames(frames, ts=[t + 10 * S for t, _, _, _ in events],
                                   ifindex=[ifx for _, _, ifx, _ in events])


def snapshot(conns):
    """What is compared of a table: each conn's tuples, state, status, counters, expiry."""
    return sorted((c.original, c.reply, c.state, c.status, c.packets, c.bytes, c.expires)
                  for c in conns)


def assert_same(label, want, pk, v, conns, stats, names):
    """The pool's output (Packets in sequence order, verdicts, table snapshot, counters)
    equals one table's ``want`` = (frames, verdicts, table snapshot, counters)."""
    import numpy as np
    frames, verdict, want_conns, want_stats = want
    seq = pk.seq.tolist()
    assert seq == list(range(len(frames))), \
        f"{label}: seq got {seq[:8]}..., want 0..{len(frames) - 1}"
    bad = np.flatnonzero(v != verdict)
    assert not len(bad), \
        f"{label}: verdicts differ at {bad[:5]}: got {v[bad[:5]]}, want {verdict[bad[:5]]}"
    got = pk.batch.frames()
    diff = [i for i in range(len(frames)) if got[i] != frames[i]]
    assert not diff, f"{label}: frames differ at {diff[:5]}"
    assert conns == want_conns, f"{label}: table differs: extra {set(conns) - set(want_conns)}, " \
        f"missing {set(want_conns) - set(conns)}"
    for name in names:
        assert stats[name] == want_stats[name], \
            f"{label}: {name}: got {stats[name]}, want {want_stats[name]}"


def replay_one_and_two(tmp_path, batch, toml: str, seed: int) -> dict:
    """`shardct replay --router -w` of ``batch`` (written as a pcapng of lan0, wan0) with
    the config ``toml`` (its rules: MASQ in masq.rules), by --workers 1 in batches of 100
    and --workers 2 in rounds of 64: {"1"/"2": (first stdout line, bytes written)}."""
    import subprocess
    import sys

    from workers.pcapio import PcapngWriter
    with PcapngWriter(str(tmp_path / "in.pcapng"), ["lan0", "wan0"]) as w:
        w.write_batch(batch)
    (tmp_path / "masq.rules").write_text(MASQ)
    (tmp_path / "r.toml").write_text(toml)
    outs = {}
    for workers, extra in (("1", ["--batch", "100"]), ("2", ["--round", "64"])):
        out = tmp_path / f"out{workers}.pcapng"
        p = subprocess.run([sys.executable, "-m", "workers.cli", "replay",
                            str(tmp_path / "in.pcapng"), "-c", str(tmp_path / "r.toml"),
                            "--router", "--list", "0", "--seed", str(seed),
                            "--workers", workers, "-w", str(out), *extra],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        outs[workers] = (p.stdout.splitlines()[0], out.read_bytes())
    return outs
