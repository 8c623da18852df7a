"""Router behaviour of the engine (issue 13): what Linux does to a forwarded packet beyond
conntrack and NAT. ICMP timestamp / information / address-mask queries tracked like echo
(nf_conntrack_proto_icmp.c), trailers trimmed (ip_rcv_core's pskb_trim_rcsum),
``drop_invalid`` in the engine's result, TTL only on forwarded packets, and the egress
interface of each routed frame.
"""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import ICMP, IP, UDP, Ether, Raw, raw
from scapy.layers.inet import ICMPerror, IPerror

from shardct import Config, ConnTrack, ManualClock, PacketBatch
from shardct import track as K
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.show import format_conn

E = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02")
NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24", "b::1/64"]},
                      "wan0": {"address": ["192.168.0.1/24", "a::1/64"]}},
       "routes": [{"dst": "0.0.0.0/0", "dev": "wan0", "via": "192.168.0.254"}]}
LAN, WAN = 0, 1
CLIENT, SERVER, R_LAN, R_WAN = "10.0.0.2", "192.168.0.2", "10.0.0.3", "192.168.0.1"
MASQ = "-A POSTROUTING -o wan0 -j MASQUERADE"


def nat_rules(body: str):
    text = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
           ":POSTROUTING ACCEPT [0:0]\n" + body.strip() + "\nCOMMIT\n"
    return parse_iptables_save(text, "test.rules", 4)


class Router:
    def __init__(self, body=MASQ, seed=3, **cfg):
        self.clock = ManualClock(10 * 1_000_000_000)
        self.ct = ConnTrack(Config(**cfg), seed=seed, clock=self.clock,
                            rules=nat_rules(body) if body else None,
                            network=Network.from_dict(NET), router=True,
                            rng=np.random.default_rng(seed))

    def send(self, pkt, ifindex):
        """(verdict, frame after the engine, forwarded?)."""
        b = PacketBatch.from_frames([raw(E / pkt) if not isinstance(pkt, bytes) else pkt],
                                    ifindex=ifindex)
        r = self.ct.process(b)
        return int(r.verdict[0]), Ether(b.frame(0)), bool(r.forward_mask(self.ct.config.drop_invalid)[0])


def icmp_ok(frame: Ether) -> bool:
    q = frame.copy()
    del q[IP].chksum
    del q[ICMP].chksum
    return raw(Ether(raw(q))) == raw(frame)


# ---------------------------------------------------------------- ICMP queries

QUERIES = [(13, 14, b"\0" * 12), (15, 16, b""), (17, 18, b"\0" * 4)]


@pytest.mark.parametrize("req,rep,body", QUERIES, ids=["timestamp", "information", "address-mask"])
def test_icmp_query_is_tracked_and_masqueraded(req, rep, body):
    r = Router(drop_invalid=True)
    v, out, fwd = r.send(IP(src=CLIENT, dst=SERVER) / ICMP(type=req, id=0x77, seq=1) / body, LAN)
    got = (v, fwd, out[IP].src, out[ICMP].id, icmp_ok(out))
    assert got == (K.V_ACCEPT, True, R_WAN, 0x77, True), f"request: got {got}"
    v, back, fwd = r.send(IP(src=SERVER, dst=R_WAN) / ICMP(type=rep, id=0x77, seq=1) / body, WAN)
    got = (v, fwd, back[IP].dst, back[ICMP].id, icmp_ok(back))
    assert got == (K.V_ACCEPT, True, CLIENT, 0x77, True), f"reply: got {got}"
    (conn,) = list(r.ct.conns())
    line = format_conn(conn, 0)
    assert f"type={req} code=0 id={0x77}" in line and f"type={rep} code=0 id={0x77}" in line, line
    assert "SEEN_REPLY" in conn.status, conn.status


@pytest.mark.parametrize("rep", [14, 16, 18])
def test_icmp_query_reply_without_request_is_invalid_and_dropped(rep):
    r = Router(drop_invalid=True)
    v, out, fwd = r.send(IP(src=CLIENT, dst=SERVER) / ICMP(type=rep, id=5), LAN)
    assert (v, fwd) == (K.V_INVALID, False), f"got {(v, fwd)}, want INVALID and not forwarded"
    assert len(r.ct) == 0


def test_echo_and_timestamp_with_one_ident_are_two_conns():
    r = Router()
    r.send(IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=9), LAN)
    r.send(IP(src=CLIENT, dst=SERVER) / ICMP(type=13, id=9) / (b"\0" * 12), LAN)
    assert len(r.ct) == 2, f"conns: got {len(r.ct)}, want 2 (Linux's tuple holds the type)"
    # an echo reply does not answer the timestamp request (nor the other way round)
    v, back, _ = r.send(IP(src=SERVER, dst=R_WAN) / ICMP(type=14, id=9) / (b"\0" * 12), WAN)
    assert (v, back[IP].dst) == (K.V_ACCEPT, CLIENT), (v, back[IP].dst)
    statuses = sorted(sorted(c.status) for c in r.ct.conns())
    assert sum("SEEN_REPLY" in s for s in statuses) == 1, statuses


def test_icmp_error_quoting_a_timestamp_request_is_related_and_unnated():
    r = Router()
    _, out, _ = r.send(IP(src=CLIENT, dst=SERVER) / ICMP(type=13, id=0x55) / (b"\0" * 12), LAN)
    err = IP(src=SERVER, dst=R_WAN) / ICMP(type=3, code=1) / Raw(raw(out[IP]))
    v, back, fwd = r.send(err, WAN)
    q = back[IPerror]
    got = (v, fwd, back[IP].dst, q.src, q[ICMPerror].type, q[ICMPerror].id, icmp_ok(back))
    assert got == (K.V_RELATED, True, CLIENT, CLIENT, 13, 0x55, True), f"got {got}"
