"""Router behaviour of the engine (issue 13): what Linux does to a forwarded packet beyond
conntrack and NAT. ICMP timestamp / information / address-mask queries tracked like echo
(nf_conntrack_proto_icmp.c), trailers trimmed (ip_rcv_core's pskb_trim_rcsum),
``drop_invalid`` in the engine's result, TTL only on forwarded packets, and the egress
interface of each routed frame.
"""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw
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
TCP_SYN = TCP(sport=40600, dport=22, flags="S")


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
        return int(r.verdict[0]), Ether(b.frame(0)), bool(r.forward[0])


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


# ---------------------------------------------------------------- trailers

@pytest.mark.parametrize("router,want_cut", [(True, True), (False, False)])
def test_trailer_past_the_ip_datagram_is_trimmed_in_router_mode(router, want_cut):
    r = Router()
    if not router:
        r.ct = ConnTrack(Config(), seed=3, clock=r.clock)
    pkt = raw(E / IP(src=CLIENT, dst=SERVER, ttl=64) / UDP(sport=1, dport=2) / b"data")
    trailer = b"\xde\xad\xbe\xef" * 8
    b = PacketBatch.from_frames([pkt + trailer, pkt], ifindex=LAN)
    res = r.ct.process(b)
    got = (b.length.tolist(), res.verdict.tolist(), res.forward.tolist())
    cut = len(pkt) if want_cut else len(pkt) + len(trailer)
    assert got == ([cut, len(pkt)], [K.V_ACCEPT] * 2, [True, True]), f"got {got}"
    out = Ether(b.frame(0))
    assert (out[IP].src, bytes(out[UDP].payload)[:4]) == ((R_WAN if router else CLIENT), b"data")


def test_short_ethernet_padding_is_trimmed_and_invalid_frames_keep_their_verdict():
    r = Router()
    pad = raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=3, dport=4))     # 42 bytes
    bad = raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=5, dport=6, chksum=0x1234) / b"x")
    b = PacketBatch.from_frames([pad + b"\0" * 18, bad + b"\0" * 10], ifindex=LAN)
    res = r.ct.process(b)
    got = (b.length.tolist(), res.verdict.tolist())
    assert got == ([len(pad), len(bad)], [K.V_ACCEPT, K.V_INVALID]), f"got {got}"


# ---------------------------------------------------------------- drop_invalid, TTL

@pytest.mark.parametrize("drop", [False, True])
def test_result_forward_honors_drop_invalid(drop):
    r = Router(drop_invalid=drop)
    bad = IP(src=CLIENT, dst=SERVER) / UDP(sport=1, dport=2, chksum=0x1234)
    v, out, fwd = r.send(bad, LAN)
    assert (v, fwd) == (K.V_INVALID, not drop), f"drop_invalid={drop}: got {(v, fwd)}"
    assert out[IP].src == CLIENT, "INVALID packets are not NATed"
    b = PacketBatch.from_frames([raw(E / bad)], ifindex=LAN)
    res = r.ct.process(b)
    got = (res.forward_mask().tolist(), res.forward_mask(True).tolist(),
           res.forward_mask(False).tolist())
    assert got == ([not drop], [False], [True]), f"forward_mask: got {got}"


def test_ttl_taken_only_on_forwarded_packets():
    r = Router()
    b = PacketBatch.from_frames([raw(E / IP(src=CLIENT, dst=SERVER, ttl=64) / UDP(sport=7, dport=8)),
                                 raw(E / IP(src=R_WAN, dst=SERVER, ttl=64) / UDP(sport=9, dport=8)),
                                 raw(E / IP(src=R_WAN, dst=SERVER, ttl=1) / UDP(sport=10, dport=8)),
                                 raw(E / IP(src=CLIENT, dst=SERVER, ttl=1) / UDP(sport=11, dport=8))])
    b.ifindex[:] = [LAN, -1, -1, LAN]
    res = r.ct.process(b)
    got = ([Ether(b.frame(i))[IP].ttl for i in range(4)], res.verdict.tolist())
    want = ([63, 64, 1, 1], [K.V_ACCEPT, K.V_ACCEPT, K.V_ACCEPT, K.V_DROP])
    assert got == want, f"(TTLs, verdicts): got {got}, want {want} (locally generated: -1)"
    assert r.ct.stats()["ttl_expired"] == 1


def test_the_hop_comes_after_tracking_as_in_ip_forward():
    """Linux tracks (and DNATs) a packet at PREROUTING and takes the hop in ip_forward:
    a TTL 1 packet for the router itself is delivered (port unreachable here, quoting
    TTL 1), one REDIRECTed to a local listener reaches it with its TTL, and one of an
    established conn counts in it before it is dropped; a new conn's TTL 1 packet
    leaves no conn (never confirmed)."""
    r = Router()
    b = PacketBatch.from_frames([raw(ttl1(dst=R_LAN))], ifindex=LAN)
    res = r.ct.process(b)
    g = res.generated
    e = Ether(g.frame(0))
    got = (res.forward.tolist(), e[ICMP].type, e[ICMP].code, e[IP].ttl, IP(raw(e[ICMP].payload)).ttl)
    assert got == ([False], 3, 3, 64, 1), f"(forward, type, code, TTL, quoted TTL): got {got}"
    assert r.ct.stats()["ttl_expired"] == 0
    # REDIRECT to a local listener: the host's stack gets it, TTL and all
    r = Router("-A PREROUTING -i lan0 -p tcp --dport 80 -j REDIRECT --to-ports 8080",
               local_delivery=True)
    syn = IP(src=CLIENT, dst=SERVER, ttl=1) / TCP(sport=40800, dport=80, flags="S")
    v, f, fwd = r.send(syn, LAN)
    got = (v, fwd, f[IP].dst, f[TCP].dport, f[IP].ttl, r.ct.stats()["ttl_expired"])
    assert got == (K.V_ACCEPT, True, R_LAN, 8080, 1, 0), f"got {got}"
    # an established conn: the expiring packet is tracked, then dropped
    r = Router()
    assert r.send(IP(src=CLIENT, dst=SERVER) / UDP(sport=40900, dport=53), LAN)[2]
    assert r.send(IP(src=SERVER, dst=R_WAN) / UDP(sport=53, dport=40900), WAN)[2]
    v, _, fwd = r.send(IP(src=CLIENT, dst=SERVER, ttl=1) / UDP(sport=40900, dport=53), LAN)
    (c,) = [c for c in r.ct.conns() if c.original.sport == 40900]
    assert (v, fwd, c.packets[0]) == (K.V_DROP, False, 2), (v, fwd, c.packets)
    # a new conn's first packet expiring: no conn, nothing inserted
    before = r.ct.stats()
    v, _, _ = r.send(IP(src=CLIENT, dst=SERVER, ttl=1) / UDP(sport=40901, dport=53), LAN)
    after = r.ct.stats()
    assert v == K.V_DROP and not [c for c in r.ct.conns() if c.original.sport == 40901]
    assert (after["insert"] - before["insert"], after["new"] - before["new"],
            after["ttl_expired"] - before["ttl_expired"]) == (0, 0, 1)


def test_ttl_off_keeps_broken_header_drops_and_trimming():
    r = Router(decrement_ttl=False)
    ok = raw(E / IP(src=CLIENT, dst=SERVER, ttl=1) / UDP(sport=7, dport=8))
    broken = bytearray(raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=7, dport=8)))
    broken[14 + 10] ^= 0xFF        # IPv4 header checksum
    b = PacketBatch.from_frames([ok + b"\0" * 6, bytes(broken)], ifindex=LAN)
    res = r.ct.process(b)
    got = (res.verdict.tolist(), Ether(b.frame(0))[IP].ttl, int(b.length[0]))
    assert got == ([K.V_ACCEPT, K.V_DROP], 1, len(ok)), f"got {got}"
    assert r.ct.stats()["invalid.ip_checksum"] == 1


# ---------------------------------------------------------------- routing a batch

def test_route_gives_egress_next_hop_and_local_delivery_after_nat():
    import ipaddress
    r = Router("-A PREROUTING -i wan0 -p udp --dport 53 -j DNAT --to-destination 10.0.0.7\n" + MASQ)
    frames = [raw(E / IP(src=CLIENT, dst="8.8.8.8") / UDP(sport=1, dport=2)),      # default route
              raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=3, dport=4)),         # connected
              raw(E / IP(src=SERVER, dst=R_WAN) / UDP(sport=5, dport=53)),         # DNAT to the LAN
              raw(E / IP(src=CLIENT, dst=R_LAN) / UDP(sport=6, dport=7)),          # the router itself
              raw(E / IPv6(src="b::2", dst="c::9") / UDP(sport=8, dport=9)),         # no IPv6 default
              bytes(Ether(src="02:00:00:00:00:02", dst="ff:ff:ff:ff:ff:ff", type=0x0806) / (b"\0" * 28))]
    b = PacketBatch.from_frames(frames, ifindex=[LAN, LAN, WAN, LAN, LAN, LAN])
    res = r.ct.process(b)
    rt = r.ct.route(b, res)
    got = (rt.egress.tolist(), rt.local.tolist(),
           [None if a is None else str(a) for a in map(rt.nexthop_address, range(len(b)))])
    want = ([WAN, WAN, LAN, LAN, -1, -1], [False, False, False, True, False, False],
            ["192.168.0.254", SERVER, "10.0.0.7", R_LAN, None, None])
    assert got == want, f"\ngot  {got}\nwant {want}"
    # the same without the Result's parse, and the per-address route agrees
    again = r.ct.network.route_batch(b)
    assert again.egress.tolist() == want[0]
    net = r.ct.network
    for i, dst in enumerate(["8.8.8.8", SERVER, "10.0.0.7", R_LAN]):
        assert net.index(net.route(ipaddress.ip_address(dst))) == want[0][i], dst


def test_egress_labels_unrouted_frames_with_their_ingress():
    from shardct.netconf import egress
    net = Network.from_dict({"interfaces": {"lan0": {"address": ["10.0.0.3/24"]},
                                            "wan0": {"address": ["192.168.0.1/24"]}}})
    b = PacketBatch.from_frames([raw(E / IP(src=CLIENT, dst=SERVER) / UDP()),
                                 raw(E / IP(src=SERVER, dst="8.8.8.8") / UDP())], ifindex=[LAN, WAN])
    assert egress(net, b).tolist() == [WAN, WAN]
    assert egress(None, b).tolist() == [LAN, WAN]


def test_public_names_are_exported():
    import shardct
    for name in ("Network", "RuleSet", "Routes", "parse_iptables_save"):
        assert name in shardct.__all__ and hasattr(shardct, name), name


# ---------------------------------------------------------------- time exceeded

def ttl1(src=CLIENT, dst=SERVER, sport=40004, payload=b"t", **ip):
    return E / IP(src=src, dst=dst, ttl=1, **ip) / UDP(sport=sport, dport=5000) / payload


def errors(r, frames, ifindex=LAN):
    b = PacketBatch.from_frames([raw(f) for f in frames], ifindex=ifindex)
    res = r.ct.process(b)
    assert not res.forward.any(), "a TTL 1 packet is never forwarded"
    g = res.generated
    return [] if g is None else [(Ether(g.frame(i)), int(g.ifindex[i])) for i in range(len(g))]


def test_ttl1_gets_time_exceeded_from_the_ingress_address_quoting_it_as_it_arrived():
    # a DNATed flow: the quote keeps the destination the packet arrived with
    r = Router("-A PREROUTING -i lan0 -p udp --dport 5000 -j DNAT --to-destination 192.168.0.9\n" + MASQ)
    arrived = ttl1(dst="8.8.8.8", id=77)
    ((e, ifx),) = errors(r, [arrived])
    got = (ifx, e.src, e.dst, e[IP].src, e[IP].dst, e[IP].ttl, e[IP].tos, int(e[IP].flags),
           e[ICMP].type, e[ICMP].code)
    want = (LAN, E.dst, E.src, R_LAN, CLIENT, 64, 0xC0, 0, 11, 0)
    assert got == want, f"\ngot  {got}\nwant {want}"
    assert raw(e[IP])[28:] == raw(arrived[IP]), "the quote is the packet as it arrived"
    assert icmp_ok(e), "IP and ICMP checksums"
    assert r.ct.stats()["icmp_time_exceeded"] == 1


def test_time_exceeded_quote_fits_576_bytes():
    r = Router()
    arrived = ttl1(payload=b"q" * 1000)
    ((e, _),) = errors(r, [arrived])
    quote = raw(e[IP])[28:]
    got = (e[IP].len, len(quote))
    assert got == (576, 548), f"(IP length, quote): got {got}, want (576, 548)"
    assert quote == raw(arrived[IP])[:548] and icmp_ok(e)


def test_time_exceeded_is_rate_limited_per_host_like_icmp_ratelimit():
    r = Router()
    got = len(errors(r, [ttl1(sport=40000 + k) for k in range(10)]))
    assert got == 6, f"a burst of 10 from one host: got {got} errors, want 6 (the burst)"
    got = len(errors(r, [ttl1(src="10.0.0.5")]))
    assert got == 1, "another host has its own bucket"
    r.clock.advance(0.5)
    assert len(errors(r, [ttl1()])) == 0, "half an interval later: still limited"
    r.clock.advance(0.5)
    assert len(errors(r, [ttl1(), ttl1()])) == 1, "one interval later: one more"
    assert r.ct.stats()["icmp_time_exceeded_ratelimited"] == 6


def test_no_time_exceeded_for_errors_fragments_local_or_bad_sources():
    r = Router()
    quote = raw(IP(src=SERVER, dst=CLIENT) / UDP(sport=1, dport=2))
    frames = [E / IP(src=CLIENT, dst=SERVER, ttl=1) / ICMP(type=3, code=3) / Raw(quote),
              E / IP(src=CLIENT, dst=SERVER, ttl=1, frag=10, proto=17) / Raw(b"x" * 16),
              ttl1(src="0.0.0.0"), ttl1(src="224.0.0.9")]
    assert errors(r, frames) == []
    # locally generated (no ingress interface): no hop is taken, so nothing expires
    b = PacketBatch.from_frames([raw(ttl1(src=R_WAN))], ifindex=-1)
    res = r.ct.process(b)
    assert (res.forward.tolist(), res.generated) == ([True], None)


def test_hop_limit_1_gets_icmpv6_time_exceeded():
    from scapy.layers.inet6 import ICMPv6TimeExceeded
    r = Router()
    arrived = E / IPv6(src="b::2", dst="a::2", hlim=1) / UDP(sport=1, dport=2) / b"six"
    ((e, ifx),) = errors(r, [arrived])
    t = e[ICMPv6TimeExceeded]
    got = (ifx, e[IPv6].src, e[IPv6].dst, e[IPv6].hlim, t.type, t.code)
    assert got == (LAN, "b::1", "b::2", 64, 3, 0), f"got {got}"
    q = e.copy()
    del q[ICMPv6TimeExceeded].cksum
    assert raw(Ether(raw(q))) == raw(e), "ICMPv6 checksum"
    assert raw(e[IPv6])[48:] == raw(arrived[IPv6])


def test_icmp_errors_off_or_ttl_off_generates_nothing():
    for cfg in ({"icmp_errors": False}, {"decrement_ttl": False}):
        r = Router(**cfg)
        b = PacketBatch.from_frames([raw(ttl1())], ifindex=LAN)
        assert r.ct.process(b).generated is None, cfg


# ---------------------------------------------------------------- frag needed / packet too big

def small_mtu_router(body=MASQ, lan_mtu=1500, wan_mtu=1400, **cfg):
    """A Router whose interfaces have the given MTUs."""
    r = Router(body, **cfg)
    net = {"interfaces": {k: dict(v) for k, v in NET["interfaces"].items()}, "routes": NET["routes"]}
    net["interfaces"]["lan0"]["mtu"] = lan_mtu
    net["interfaces"]["wan0"]["mtu"] = wan_mtu
    r.ct = ConnTrack(Config(**cfg), seed=3, clock=r.clock, rules=nat_rules(body) if body else None,
                     network=Network.from_dict(net), router=True, rng=np.random.default_rng(3))
    return r


def process(r, frames, ifindex=LAN):
    """(result, [(error frame, its ifindex)]) of one batch."""
    b = PacketBatch.from_frames([raw(f) for f in frames], ifindex=ifindex)
    res = r.ct.process(b)
    g = res.generated
    return res, [] if g is None else [(Ether(g.frame(i)), int(g.ifindex[i])) for i in range(len(g))]


def big(size, df=True, src=CLIENT, dst=SERVER, sport=40100, ttl=64, tos=0):
    """A UDP frame whose IP datagram is ``size`` bytes."""
    return E / IP(src=src, dst=dst, ttl=ttl, tos=tos, flags="DF" if df else 0, id=99) \
        / UDP(sport=sport, dport=5000) / (b"m" * (size - 28))


def test_df_packet_over_the_egress_mtu_gets_frag_needed_with_the_mtu():
    r = small_mtu_router()
    arrived = big(1401, tos=0x2A)
    res, ((e, ifx),) = process(r, [arrived])
    got = (res.verdict.tolist(), res.forward.tolist(), ifx, e.src, e.dst, e[IP].src, e[IP].dst,
           e[IP].ttl, e[IP].tos, int(e[IP].flags), e[IP].len, e[ICMP].type, e[ICMP].code,
           raw(e[ICMP])[4:8])
    want = ([K.V_DROP], [False], LAN, E.dst, E.src, R_LAN, CLIENT, 64, 0xC0 | 0x0A, 0, 576, 3, 4,
            b"\x00\x00\x05\x78")
    assert got == want, f"\ngot  {got}\nwant {want}"
    assert raw(e[IP])[28:] == raw(arrived[IP])[:548], "the quote: the packet as it arrived, to 576"
    assert icmp_ok(e), "IP and ICMP checksums"
    s = r.ct.stats()
    assert (s["icmp_frag_needed"], s["icmp_frag_needed_not_sent"]) == (1, 0), s
    # dropped before POSTROUTING: Linux never confirms the conn this packet began
    got = (len(r.ct), r.ct.events(), s["insert"], s["new"], s["destroy"])
    assert got == (0, [], 0, 0, 0), f"(conns, events, insert, new, destroy): got {got}"


def test_a_conn_that_forwarded_before_stays_when_a_packet_is_too_big():
    r = small_mtu_router()
    process(r, [big(100)])
    r.ct.events()
    res, errs = process(r, [big(1450)])
    got = (res.forward.tolist(), len(errs), len(r.ct), [e.kind for e in r.ct.events()])
    assert got == ([False], 1, 1, []), f"got {got}"


def test_at_the_mtu_or_without_df_the_packet_is_forwarded():
    r = small_mtu_router()
    res, errs = process(r, [big(1400, sport=1), big(1401, df=False, sport=2), big(1401, sport=3)])
    got = (res.verdict.tolist(), res.forward.tolist(), len(errs), res.fragment_of.tolist())
    # a non-DF packet over the MTU is left to fragmentation (frag.py): it leaves as fragments
    assert got == ([K.V_ACCEPT, K.V_ACCEPT, K.V_DROP], [True, False, False], 1, [1, 1]), f"got {got}"
    assert r.ct.stats()["icmp_frag_needed"] == 1
    got = sorted(c.original.sport for c in r.ct.conns())
    assert got == [1, 2], f"conns by source port: got {got}, want the two forwarded ones"
    assert [e.conn.original.sport for e in r.ct.events()] == [1, 2], "NEW events"


def test_frag_needed_quote_is_the_reply_as_it_arrived_before_un_nat():
    # a masqueraded flow's reply over the LAN MTU: the quote keeps the NATed destination
    # and the TTL it arrived with; the error comes from the WAN interface's address
    r = small_mtu_router(lan_mtu=1300, wan_mtu=1500)
    res, errs = process(r, [big(100, sport=40200)])
    assert (res.forward.tolist(), errs) == ([True], [])
    reply = E / IP(src=SERVER, dst=R_WAN, ttl=50, flags="DF", id=5) / UDP(sport=5000, dport=40200) \
        / (b"r" * 1372)
    res, ((e, ifx),) = process(r, [reply], WAN)
    got = (res.forward.tolist(), ifx, e[IP].src, e[IP].dst, e[ICMP].type, e[ICMP].code,
           raw(e[ICMP])[6:8])
    assert got == ([False], WAN, R_WAN, SERVER, 3, 4, b"\x05\x14"), f"got {got}"
    assert raw(e[IP])[28:] == raw(reply[IP])[:548], "quote as it arrived (un-NAT and TTL undone)"
    assert icmp_ok(e)
    assert len(r.ct) == 1, "the conn the request confirmed stays"


def test_masqueraded_request_quote_keeps_the_lan_source_and_ttl():
    r = small_mtu_router()
    arrived = big(1450, ttl=9)
    res, ((e, _),) = process(r, [arrived])
    q = IP(raw(e[IP])[28:])
    assert (q.src, q.ttl, q[UDP].sport) == (CLIENT, 9, 40100), (q.src, q.ttl, q[UDP].sport)
    assert raw(e[IP])[28:] == raw(arrived[IP])[:548]


def test_ipv6_over_the_mtu_gets_packet_too_big_df_or_not():
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    r = small_mtu_router()
    arrived = E / IPv6(src="b::2", dst="a::2", hlim=7) / UDP(sport=1, dport=2) / (b"s" * 1400)
    res, ((e, ifx),) = process(r, [arrived])
    t = e[ICMPv6PacketTooBig]
    got = (res.forward.tolist(), ifx, e[IPv6].src, e[IPv6].dst, e[IPv6].hlim, t.type, t.code, t.mtu,
           e[IPv6].plen)
    assert got == ([False], LAN, "b::1", "b::2", 64, 2, 0, 1400, 1240), f"got {got}"
    assert raw(e[IPv6])[48:] == raw(arrived[IPv6])[:1232], "quote as it arrived, to 1280 in all"
    q = e.copy()
    del q[ICMPv6PacketTooBig].cksum
    assert raw(Ether(raw(q))) == raw(e), "ICMPv6 checksum"


def test_frag_needed_is_not_rate_limited_port_unreachable_is():
    r = small_mtu_router()
    _, errs = process(r, [big(1450, sport=40300 + k) for k in range(10)])
    assert len(errs) == 10, f"frag-needed: {len(errs)} of 10 (PMTU discovery is not limited)"
    _, errs = process(r, [E / IP(src=CLIENT, dst=R_LAN) / UDP(sport=41000 + k, dport=9) for k in range(10)])
    assert len(errs) == 6, f"port unreachable: {len(errs)} of 10, want the burst of 6"
    s = r.ct.stats()
    assert (s["icmp_port_unreachable"], s["icmp_port_unreachable_ratelimited"]) == (6, 4), s


@pytest.mark.parametrize("defrag", [False, True])
def test_no_frag_needed_for_errors_later_fragments_or_bad_sources_but_dropped(defrag):
    r = small_mtu_router(defrag=defrag)
    quote = raw(IP(src=SERVER, dst=CLIENT) / UDP(sport=1, dport=2)) + b"e" * 1400
    frames = [E / IP(src=CLIENT, dst=SERVER, flags="DF") / ICMP(type=3, code=3) / Raw(quote),
              E / IP(src=CLIENT, dst=SERVER, flags="DF", frag=100, proto=17) / Raw(b"x" * 1450),
              big(1450, src="0.0.0.0"), big(1450, src="224.0.0.9")]
    res, errs = process(r, frames)
    assert (res.forward.tolist(), errs) == ([False] * 4, []), (res.forward.tolist(), errs)
    # with defrag the later fragment is held for its datagram (queued), never judged
    assert int(res.verdict[1]) == (K.V_QUEUED if defrag else K.V_DROP)
    assert r.ct.stats()["icmp_frag_needed_not_sent"] == (3 if defrag else 4)


def test_locally_generated_oversize_is_left_alone():
    r = small_mtu_router()
    res, errs = process(r, [big(1450, src=R_WAN)], -1)
    assert (res.forward.tolist(), errs) == ([True], [])


# ---------------------------------------------------------------- port unreachable

@pytest.mark.parametrize("dst", [R_LAN, R_WAN])
def test_udp_to_the_router_gets_port_unreachable_from_that_address(dst):
    r = Router()
    arrived = E / IP(src=CLIENT, dst=dst, ttl=33, id=4) / UDP(sport=40400, dport=9) / b"hello"
    res, ((e, ifx),) = process(r, [arrived])
    got = (res.verdict.tolist(), res.forward.tolist(), ifx, e[IP].src, e[IP].dst, e[IP].tos,
           e[ICMP].type, e[ICMP].code)
    assert got == ([K.V_ACCEPT], [False], LAN, dst, CLIENT, 0xC0, 3, 3), f"got {got}"
    assert raw(e[IP])[28:] == raw(arrived[IP]), "the whole datagram, TTL as it arrived"
    assert icmp_ok(e)
    assert len(r.ct) == 1, "the conn is confirmed (Linux confirms at LOCAL_IN)"


def test_udp_to_the_router_over_ipv6_gets_port_unreachable():
    from scapy.layers.inet6 import ICMPv6DestUnreach
    r = Router()
    arrived = E / IPv6(src="b::2", dst="b::1") / UDP(sport=3, dport=4) / b"six"
    res, ((e, ifx),) = process(r, [arrived])
    u = e[ICMPv6DestUnreach]
    got = (res.forward.tolist(), ifx, e[IPv6].src, e[IPv6].dst, u.type, u.code)
    assert got == ([False], LAN, "b::1", "b::2", 1, 4), f"got {got}"
    assert raw(e[IPv6])[48:] == raw(arrived[IPv6])
    q = e.copy()
    del q[ICMPv6DestUnreach].cksum
    assert raw(Ether(raw(q))) == raw(e), "ICMPv6 checksum"


def test_redirected_udp_is_answered_from_the_address_it_was_sent_to():
    r = Router("-A PREROUTING -i lan0 -p udp --dport 53 -j REDIRECT --to-ports 5353\n" + MASQ)
    arrived = E / IP(src=CLIENT, dst="8.8.8.8") / UDP(sport=40500, dport=53) / b"q"
    res, ((e, _),) = process(r, [arrived])
    q = IP(raw(e[IP])[28:])
    got = (res.forward.tolist(), e[IP].src, e[IP].dst, q.dst, q[UDP].dport)
    assert got == ([False], "8.8.8.8", CLIENT, "8.8.8.8", 53), f"got {got}"
    assert raw(e[IP])[28:] == raw(arrived[IP]) and icmp_ok(e)


def test_no_answer_with_local_delivery_a_bad_checksum_a_fragment_or_a_reset():
    r = Router(local_delivery=True)
    res, errs = process(r, [E / IP(src=CLIENT, dst=R_LAN) / UDP(sport=1, dport=9),
                            E / IP(src=CLIENT, dst=R_LAN) / TCP_SYN])
    assert (res.forward.tolist(), errs) == ([True, True], []), "local delivery: the host answers"
    r = Router()
    frames = [E / IP(src=CLIENT, dst=R_LAN) / UDP(sport=2, dport=9, chksum=0x1234),
              E / IP(src=CLIENT, dst=R_LAN) / TCP(sport=3, dport=22, flags="S", chksum=0x1234),
              E / IP(src=CLIENT, dst=R_LAN, flags="MF", id=3) / UDP(sport=4, dport=9) / (b"f" * 16),
              E / IP(src=CLIENT, dst=R_LAN) / TCP(sport=5, dport=22, flags="R", seq=1)]
    res, errs = process(r, frames)
    s = r.ct.stats()
    got = (res.forward.tolist(), errs, s["icmp_port_unreachable"], s["tcp_reset"])
    # the first fragment is held for its datagram (defrag), unanswered
    assert got == ([True, True, False, True], [], 0, 0), f"got {got}"
    assert int(res.verdict[2]) == K.V_QUEUED
    r = Router(defrag=False)        # without defrag it passes unanswered
    res, errs = process(r, frames[2:3])
    assert (res.forward.tolist(), errs) == ([True], [])


# ---------------------------------------------------------------- TCP reset

def tcp_ok(frame: Ether) -> bool:
    q = frame.copy()
    del q[IP].chksum
    del q[TCP].chksum
    return raw(Ether(raw(q))) == raw(frame)


def test_syn_to_the_router_gets_rst_ack_and_the_conn_is_gone():
    r = Router()
    syn = E / IP(src=CLIENT, dst=R_LAN, tos=0x2B) / TCP(sport=40700, dport=22, flags="S", seq=1000)
    res, ((e, ifx),) = process(r, [syn])
    got = (res.forward.tolist(), ifx, e.src, e.dst, e[IP].src, e[IP].dst, e[IP].ttl, e[IP].tos,
           int(e[IP].flags), e[IP].id, e[IP].len, e[TCP].sport, e[TCP].dport, str(e[TCP].flags),
           e[TCP].seq, e[TCP].ack, e[TCP].window, e[TCP].dataofs)
    want = ([False], LAN, E.dst, E.src, R_LAN, CLIENT, 64, 0x28, 2, 0, 40, 22, 40700, "RA", 0,
            1001, 0, 5)
    assert got == want, f"\ngot  {got}\nwant {want}"
    assert tcp_ok(e), "IP and TCP checksums"
    # conntrack saw the RST go out: "if only reply is a RST ... delete immediately"
    # (nf_conntrack_tcp_packet), so the SYN's conn is gone
    assert (len(r.ct), r.ct.stats()["tcp_reset"]) == (0, 1), (len(r.ct), r.ct.stats()["tcp_reset"])


def test_ack_with_data_to_the_router_gets_a_bare_rst_at_its_ack():
    r = Router()
    seg = E / IP(src=CLIENT, dst=R_WAN) / TCP(sport=40701, dport=80, flags="PA", seq=5, ack=777) / b"GET"
    _, ((e, _),) = process(r, [seg])
    got = (e[IP].src, str(e[TCP].flags), e[TCP].seq, e[TCP].ack, tcp_ok(e))
    assert got == (R_WAN, "R", 777, 0, True), f"got {got}"


def test_redirected_tcp_is_reset_from_the_address_it_was_sent_to():
    r = Router("-A PREROUTING -i lan0 -p tcp --dport 80 -j REDIRECT --to-ports 8080\n" + MASQ)
    syn = E / IP(src=CLIENT, dst="8.8.8.8") / TCP(sport=40702, dport=80, flags="S", seq=9)
    _, ((e, _),) = process(r, [syn])
    got = (e[IP].src, e[IP].dst, e[TCP].sport, e[TCP].dport, str(e[TCP].flags), e[TCP].ack,
           tcp_ok(e))
    assert got == ("8.8.8.8", CLIENT, 80, 40702, "RA", 10, True), f"got {got}"


def test_syn_to_the_router_over_ipv6_gets_rst():
    r = Router()
    syn = E / IPv6(src="b::2", dst="b::1", tc=0x29) / TCP(sport=3, dport=22, flags="S", seq=41)
    _, ((e, _),) = process(r, [syn])
    got = (e[IPv6].src, e[IPv6].dst, e[IPv6].hlim, e[IPv6].tc, e[IPv6].fl, e[IPv6].plen,
           str(e[TCP].flags), e[TCP].ack)
    assert got == ("b::1", "b::2", 64, 0x28, 0, 20, "RA", 42), f"got {got}"
    q = e.copy()
    del q[TCP].chksum
    assert raw(Ether(raw(q))) == raw(e), "TCP checksum"


def test_malformed_frames_through_small_mtus_never_raise():
    rng = np.random.default_rng(5)
    r = small_mtu_router(lan_mtu=1280, wan_mtu=1280)
    seeds = [raw(big(1450)), raw(E / IPv6(src="b::2", dst="a::2") / UDP() / (b"s" * 1400)),
             raw(E / IP(src=CLIENT, dst=R_LAN) / UDP(sport=1, dport=2) / b"x")]
    frames = []
    for s in seeds:
        for _ in range(60):
            f = bytearray(s[:int(rng.integers(1, len(s) + 1))])
            for _ in range(int(rng.integers(0, 4))):
                f[int(rng.integers(0, len(f)))] = int(rng.integers(0, 256))
            frames.append(bytes(f))
    b = PacketBatch.from_frames(frames, ifindex=LAN)
    res = r.ct.process(b)
    assert res.verdict.shape == (len(frames),)


# ---------------------------------------------------------------- echo replies

def test_ping_to_the_router_gets_an_echo_reply_tracked_as_its_conns_reply():
    """Linux answers an echo request to one of its addresses (icmp_echo): the reply goes
    from that address back out of the ingress interface with the request's ident,
    sequence and data, and conntrack sees it on OUTPUT as the echo conn's reply. With a
    host stack behind local delivery, the host answers instead."""
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest
    r = Router()
    req4 = E / IP(src=CLIENT, dst=R_WAN, tos=0x10) / ICMP(type=8, id=0x1234, seq=7) / (b"p" * 40)
    req6 = E / IPv6(src="b::2", dst="b::1") / ICMPv6EchoRequest(id=9, seq=3, data=b"six")
    res, out = process(r, [req4, req6])
    assert res.forward.tolist() == [False, False], "the router keeps the requests"
    (e4, if4), (e6, if6) = out
    got4 = (if4, e4.src, e4.dst, e4[IP].src, e4[IP].dst, e4[IP].ttl, e4[IP].tos, e4[ICMP].type,
            e4[ICMP].id, e4[ICMP].seq, bytes(e4[ICMP].payload))
    assert got4 == (LAN, E.dst, E.src, R_WAN, CLIENT, 64, 0x10, 0, 0x1234, 7, b"p" * 40), got4
    assert icmp_ok(e4), "IP and ICMP checksums"
    got6 = (if6, e6[IPv6].src, e6[IPv6].dst, e6[IPv6].hlim, e6[ICMPv6EchoReply].id,
            e6[ICMPv6EchoReply].seq, e6[ICMPv6EchoReply].data)
    assert got6 == (LAN, "b::1", "b::2", 64, 9, 3, b"six"), got6
    q = e6.copy()
    del q[ICMPv6EchoReply].cksum
    assert raw(Ether(raw(q))) == raw(e6), "ICMPv6 checksum"
    conns = {c.original.src.version: c for c in r.ct.conns() if c.original.proto in (1, 58)}
    assert set(conns) == {4, 6} and all("SEEN_REPLY" in c.status for c in conns.values()), \
        [(c.original, sorted(c.status)) for c in conns.values()]
    assert (r.ct.stats()["icmp_echo_reply"], r.ct.stats()["packets"]) == (2, 4)
    # the host answers with local delivery; a ping through the router is forwarded
    r = Router(local_delivery=True)
    res, out = process(r, [req4, E / IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=5)])
    assert (res.forward.tolist(), out) == ([True, True], [])


def test_timestamp_request_to_the_router_gets_a_reply_as_icmp_timestamp():
    """Linux answers ICMP timestamp requests to its addresses (icmp_timestamp): ident and
    sequence back, the originate time copied, receive and transmit the time of day in ms
    since midnight UT (here the packet's time: the engine's clock, 10 s after the epoch),
    nothing past the three times; the conn sees its reply."""
    r = Router()
    req = E / IP(src=CLIENT, dst=R_LAN) / ICMP(type=13, id=0x55, seq=2, ts_ori=123456, ts_rx=0,
                                               ts_tx=0) / b"extra"
    res, ((e, ifx),) = process(r, [req])
    i = e[ICMP]
    got = (res.forward.tolist(), ifx, e[IP].src, e[IP].dst, i.type, i.code, i.id, i.seq,
           i.ts_ori, i.ts_rx, i.ts_tx, len(e[IP]))
    assert got == ([False], LAN, R_LAN, CLIENT, 14, 0, 0x55, 2, 123456, 10_000, 10_000, 40), got
    assert icmp_ok(e)
    (c,) = [c for c in r.ct.conns() if c.original.proto == 1]
    assert "SEEN_REPLY" in c.status and r.ct.stats()["icmp_timestamp_reply"] == 1
