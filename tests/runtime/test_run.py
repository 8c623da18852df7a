"""`shardct run`'s forwarding step without rings (workers/run.py): after the engine, each
frame leaves by its route's interface with that interface's MAC as source and its next
hop's MAC as destination; local, unroutable and unresolved frames stay, counted; the
engine's ICMP errors leave by their ingress interface. The neighbour table falls back to
the kernel's, re-read on a miss at most every refresh_s. A config without interfaces, or
an interface that is not there, is one line and exit 2. Runs as any user (fake TX rings)."""
from __future__ import annotations

import ipaddress
import os

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from shardct import ConnTrack
from shardct import track as K
from shardct.batch import PacketBatch
from workers.cli import main
from workers.configfile import load
from workers.run import Forwarder, Neighbours

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "home-router.toml")
CLIENT_MAC, LAN_MAC, WAN_MAC, GW_MAC = ("02:00:00:00:00:0a", "02:00:00:00:00:01",
                                        "02:00:00:00:01:01", "02:00:00:00:01:fe")


class FakeTx:
    """A TxRing that keeps what it is given."""

    def __init__(self):
        self.frames, self.too_big = [], 0

    def send(self, batch, mask):
        self.frames += [batch.frame(i) for i in np.flatnonzero(mask)]
        return int(mask.sum())


def _from_lan(dst, ttl=64, sport=5000):
    return bytes(Ether(src=CLIENT_MAC, dst=LAN_MAC) / IP(src="192.0.2.10", dst=dst, ttl=ttl)
                 / UDP(sport=sport, dport=53) / b"q")


def test_forwarder_readdresses_routes_and_counts_what_stays():
    ec = load(CONFIG)
    ct = ConnTrack(ec.config, seed=1, rules=ec.rules, network=ec.network, router=True)
    tx = [FakeTx(), FakeTx()]                              # lan0, wan0
    fwd = Forwarder(ec.network, tx, Neighbours(ec.neighbours, read_kernel=None))
    frames = [_from_lan("198.51.100.7"),                   # via the gateway, MASQUERADEd
              _from_lan("192.0.2.1", sport=5001),           # the router's own address: UDP
              bytes(Ether(src=CLIENT_MAC, dst=LAN_MAC) / IP(src="192.0.2.10", dst="192.0.2.1")
                    / TCP(sport=5004, dport=22, flags="S")),  # ... TCP
              bytes(Ether(src=CLIENT_MAC, dst=LAN_MAC) / IP(src="192.0.2.10", dst="192.0.2.1")
                    / ICMP(id=7)),                          # ... and a ping: echo reply
              _from_lan("192.0.2.20", sport=5002),          # on-link, MAC unknown
              _from_lan("198.51.100.8", ttl=1, sport=5003)]  # expires here
    batch = PacketBatch.from_frames(frames, ts=10**9, ifindex=0)
    res = ct.process(batch)
    fwd(batch, res.forward, res.generated, res.meta)

    assert len(tx[1].frames) == 1, f"got {len(tx[1].frames)} frames out of wan0, want 1"
    out = Ether(tx[1].frames[0])
    got = (out.src, out.dst, out[IP].src, out[IP].dst, out[IP].ttl)
    assert got == (WAN_MAC, GW_MAC, "203.0.113.2", "198.51.100.7", 63), got
    assert len(tx[0].frames) == 4, f"got {len(tx[0].frames)} frames out of lan0, want 4"
    got = [(e.dst, e[IP].src, e[IP].dst) + ((e[ICMP].type, e[ICMP].code) if ICMP in e
                                             else (str(e[TCP].flags),))
           for e in map(Ether, tx[0].frames)]
    want = [(CLIENT_MAC, "192.0.2.1", "192.0.2.10", 3, 3),     # port unreachable
            (CLIENT_MAC, "192.0.2.1", "192.0.2.10", "RA"),     # the SYN's reset
            (CLIENT_MAC, "192.0.2.1", "192.0.2.10", 0, 0),     # the echo reply
            (CLIENT_MAC, "192.0.2.1", "192.0.2.10", 11, 0)]    # time exceeded
    assert got == want, got
    assert (fwd.forwarded, fwd.icmp_sent) == (1, 4)
    # the engine keeps the UDP, TCP, ping (answered) and the expired frame home
    want = {"engine": 4, "local": 0, "no_route": 0, "no_neighbour": 1, "tx_full": 0,
            "too_big": 0}
    assert dict(fwd.dropped) == want, f"got {dict(fwd.dropped)}, want {want}"


def test_neighbours_prefer_static_and_reread_the_kernel_table_at_most_every_refresh():
    now = [0.0]
    reads = []
    a, b, gw = (ipaddress.ip_address(x) for x in ("10.0.0.2", "10.0.0.3", "10.0.0.254"))

    def kernel():
        reads.append(now[0])
        return {a: b"\x01" * 6} if len(reads) == 1 else {a: b"\x01" * 6, b: b"\x03" * 6}

    n = Neighbours({gw: b"\x02" * 6, a: b"\x09" * 6}, read_kernel=kernel, refresh_s=1.0,
                   clock=lambda: now[0])
    assert (n.lookup(a), n.lookup(gw)) == (b"\x09" * 6, b"\x02" * 6)
    assert n.lookup(b) is None and reads == [0.0], "re-read before refresh_s"
    now[0] = 1.5
    assert n.lookup(b) == b"\x03" * 6 and reads == [0.0, 1.5]


@pytest.mark.parametrize("body,want", [
    ("[conntrack]\n", "needs [interfaces.NAME] sections"),
    ("[interfaces.sct13-none0]\naddress = [\"10.9.0.1/24\"]\n", "sct13-none0: "),
    ("[neighbours]\n\"10.0.0.2\" = 5\n", "want a MAC string"),
])
def test_unusable_config_or_interface_one_line_exit_2(tmp_path, capsys, body, want):
    (tmp_path / "r.toml").write_text(body)
    rc = main(["run", "-c", str(tmp_path / "r.toml"), "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and want in err, f"got rc={rc} {err!r}"


def test_forwarder_sends_fragments_in_the_place_of_the_frame_they_replace():
    """A datagram the engine reassembled leaves as fragments where its last fragment was,
    between the frames around it, on one TX ring; held fragments are not drops."""
    from scapy.layers.inet import fragment
    ec = load(CONFIG)
    ct = ConnTrack(ec.config, seed=1, rules=ec.rules, network=ec.network, router=True)
    tx = [FakeTx(), FakeTx()]
    fwd = Forwarder(ec.network, tx, Neighbours(ec.neighbours, read_kernel=None))
    dgram = IP(src="192.0.2.10", dst="198.51.100.7", id=0x99) / UDP(sport=6000, dport=53) / (b"f" * 3000)
    frags = [bytes(Ether(src=CLIENT_MAC, dst=LAN_MAC) / f) for f in fragment(dgram, 1480)]
    frames = [_from_lan("198.51.100.7", sport=5000)] + frags + [_from_lan("198.51.100.7", sport=5001)]
    batch = PacketBatch.from_frames(frames, ts=10**9, ifindex=0)
    res = ct.process(batch)
    fwd(batch, res.forward, res.generated, res.meta, res.fragments, res.fragment_of,
        int((res.verdict == K.V_QUEUED).sum()))
    got = [(e.dst, e[IP].src, e[IP].id, e[IP].frag, len(e[IP])) for e in map(Ether, tx[1].frames)]
    ids = [Ether(f)[IP].id for f in frames]
    want = [(GW_MAC, "203.0.113.2", ids[0], 0, 29)] \
        + [(GW_MAC, "203.0.113.2", 0x99, f[IP].frag, len(f[IP])) for f in map(Ether, frags)] \
        + [(GW_MAC, "203.0.113.2", ids[-1], 0, 29)]
    assert got == want, f"\ngot  {got}\nwant {want}"
    assert fwd.forwarded == 5 and sum(fwd.dropped.values()) == 0, (fwd.forwarded, dict(fwd.dropped))
