"""NAT scenarios from gVisor (reference/gvisor-conntrack.md §4) and Linux's selftests
(reference/linux-netfilter.md §3) that apply to a NAT router, checking rewritten bytes.

Topology (gVisor's): client Host2 10.0.0.2 / b::2 on lan0 (router 10.0.0.3 / b::1),
server Host1 192.168.0.2 / a::2 on wan0 (router 192.168.0.1 / a::1).
"""
from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw
from scapy.layers.inet import IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest

from shardct import Config, ConnTrack, ManualClock, PacketBatch
from shardct import track as K
from shardct.netconf import Network
from shardct.rules import parse_iptables_save

E = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02")
NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24", "b::1/64"]},
                      "wan0": {"address": ["192.168.0.1/24", "a::1/64"]}}}
LAN, WAN = 0, 1
CLIENT, SERVER, R_LAN, R_WAN = "10.0.0.2", "192.168.0.2", "10.0.0.3", "192.168.0.1"
CLIENT6, SERVER6, R_LAN6, R_WAN6 = "b::2", "a::2", "b::1", "a::1"


def nat_rules(body: str, family: int = 4):
    text = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
           ":POSTROUTING ACCEPT [0:0]\n" + body.strip() + "\nCOMMIT\n"
    return parse_iptables_save(text, "test.rules", family)


class Router:
    def __init__(self, body="", family=4, seed=3, **cfg):
        self.clock = ManualClock(10 * 1_000_000_000)
        self.ct = ConnTrack(Config(**cfg), seed=seed, clock=self.clock,
                            rules=nat_rules(body, family) if body else None,
                            network=Network.from_dict(NET), router=True,
                            rng=np.random.default_rng(seed))

    def send(self, pkt, ifindex):
        """Returns (verdict, frame after the engine)."""
        b = PacketBatch.from_frames([raw(E / pkt)], ifindex=ifindex)
        r = self.ct.process(b)
        return int(r.verdict[0]), Ether(b.frame(0))


def checksums_ok(frame: Ether) -> bool:
    """scapy's own computation agrees with every checksum in the frame."""
    q = frame.copy()
    for layer in (IP, TCP, UDP, ICMP, IPerror, TCPerror, UDPerror):
        if layer in q and hasattr(q[layer], "chksum"):
            if layer is UDP and q[UDP].chksum == 0:
                continue
            if layer is UDPerror or layer is TCPerror:
                continue      # quoted transport checksums cover data that is not there
            del q[layer].chksum
    for layer in q.layers():
        if layer.__name__.startswith("ICMPv6") and hasattr(q[layer], "cksum"):
            del q[layer].cksum
    return raw(Ether(raw(q))) == raw(frame)


def want(cond, msg):
    assert cond, msg


# ---------------------------------------------------------------- MASQUERADE

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_masquerade_keeps_port_and_unnats_reply(proto):
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    L4 = TCP(sport=1234, dport=8080, flags="S") if proto == "tcp" else UDP(sport=1234, dport=8080)
    v, out = r.send(IP(src=CLIENT, dst=SERVER, ttl=64) / L4 / b"\x01\x02\x03\x04", LAN)
    got = (v, out[IP].src, out[IP].dst, out[IP].sport, out[IP].dport, out[IP].ttl)
    exp = (K.V_ACCEPT, R_WAN, SERVER, 1234, 8080, 63)
    assert got == exp, f"got {got}, want {exp}"
    assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
    got = bytes(out[Raw])
    assert got == b"\x01\x02\x03\x04", f"payload got {got!r}, want b'\\x01\\x02\\x03\\x04'"
    L4r = TCP(sport=8080, dport=1234, flags="SA", ack=1) if proto == "tcp" else UDP(sport=8080, dport=1234)
    v, back = r.send(IP(src=SERVER, dst=R_WAN) / L4r, WAN)
    got = (v, back[IP].src, back[IP].dst, back[IP].sport, back[IP].dport)
    exp = (K.V_ACCEPT, SERVER, CLIENT, 8080, 1234)
    assert got == exp, f"got {got}, want {exp}"
    assert checksums_ok(back), f"checksums got invalid, want valid: {back.summary()}"


def test_masquerade_icmp_echo_keeps_ident():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    v, out = r.send(IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=1, seq=5) / b"ping", LAN)
    got = (v, out[IP].src, out[ICMP].id, out[ICMP].seq)
    assert got == (K.V_ACCEPT, R_WAN, 1, 5), got
    assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
    v, back = r.send(IP(src=SERVER, dst=R_WAN) / ICMP(type=0, id=1, seq=5) / b"ping", WAN)
    got = (v, back[IP].src, back[IP].dst, back[ICMP].id)
    assert got == (K.V_ACCEPT, SERVER, CLIENT, 1), got
    assert checksums_ok(back), f"checksums got invalid, want valid: {back.summary()}"


def test_masquerade_ipv6_udp_and_echo():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE", family=6)
    v, out = r.send(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=1234, dport=8080) / b"abcd", LAN)
    got, exp = (v, out[IPv6].src, out[IPv6].hlim), (K.V_ACCEPT, R_WAN6, 63)
    assert got == exp, f"(verdict, src, hlim) got {got}, want {exp}"
    assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
    v, back = r.send(IPv6(src=SERVER6, dst=R_WAN6) / UDP(sport=8080, dport=1234), WAN)
    got, exp = (v, back[IPv6].dst), (K.V_ACCEPT, CLIENT6)
    assert got == exp, f"(verdict, dst) got {got}, want {exp}"
    assert checksums_ok(back), f"checksums got invalid, want valid: {back.summary()}"
    v, out = r.send(IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(id=9, seq=1), LAN)
    got, exp = (v, out[IPv6].src, out[ICMPv6EchoRequest].id), (K.V_ACCEPT, R_WAN6, 9)
    assert got == exp, f"(verdict, src, echo id) got {got}, want {exp}"
    q = out.copy()
    del q[ICMPv6EchoRequest].cksum
    assert raw(Ether(raw(q))) == raw(out), "ICMPv6 checksum (pseudo-header) must verify"
    v, back = r.send(IPv6(src=SERVER6, dst=R_WAN6) / ICMPv6EchoReply(id=9, seq=1), WAN)
    got, exp = (v, back[IPv6].dst, back[ICMPv6EchoReply].id), (K.V_ACCEPT, CLIENT6, 9)
    assert got == exp, f"(verdict, dst, echo id) got {got}, want {exp}"


def test_zero_udp_checksum_stays_zero():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    pkt = IP(src=CLIENT, dst=SERVER) / UDP(sport=1234, dport=53, chksum=0) / b"q"
    v, out = r.send(pkt, LAN)
    got, exp = (v, out[UDP].chksum, out[IP].src), (K.V_ACCEPT, 0, R_WAN)
    assert got == exp, f"(verdict, UDP checksum, src) got {got}, want {exp}"


# ---------------------------------------------------------------- DNAT / REDIRECT

def test_dnat_to_other_host_and_port():
    r = Router("-A PREROUTING -i lan0 -p tcp --dport 8081 -j DNAT --to-destination 192.168.0.2:8080")
    v, out = r.send(IP(src=CLIENT, dst=R_LAN) / TCP(sport=40000, dport=8081, flags="S"), LAN)
    got = (v, out[IP].src, out[IP].dst, out[TCP].sport, out[TCP].dport)
    assert got == (K.V_ACCEPT, CLIENT, SERVER, 40000, 8080), got
    assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
    v, back = r.send(IP(src=SERVER, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", ack=1), WAN)
    got = (v, back[IP].src, back[TCP].sport, back[IP].dst)
    assert got == (K.V_ACCEPT, R_LAN, 8081, CLIENT), got
    assert checksums_ok(back), f"checksums got invalid, want valid: {back.summary()}"
    got = r.ct.original_dst(CLIENT, SERVER, 40000, 8080, "tcp")
    exp = (ipaddress.ip_address(R_LAN), 8081)
    assert got == exp, f"original_dst got {got}, want {exp}"


def test_redirect_to_ingress_address_and_original_dst():
    r = Router("-A PREROUTING -i lan0 -p udp -j REDIRECT --to-ports 42")
    v, out = r.send(IP(src=CLIENT, dst=SERVER) / UDP(sport=5000, dport=2402) / b"x", LAN)
    got = (v, out[IP].dst, out[UDP].dport)
    assert got == (K.V_ACCEPT, R_LAN, 42), got
    assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
    got = r.ct.original_dst(CLIENT, R_LAN, 5000, 42, "udp")
    assert got == (ipaddress.ip_address(SERVER), 2402), got
    assert r.ct.original_dst(CLIENT, R_LAN, 5001, 42, "udp") is None, "no conn: ENOTCONN"


def test_redirect_reply_not_redirected():
    # gVisor NATPreRedirectTCPOutgoing: PREROUTING redirects all TCP, yet an outgoing
    # (locally generated, ifindex -1 = OUTPUT hook) connection works: its SYN/ACK belongs
    # to the conn and is not redirected.
    r = Router("-A PREROUTING -p tcp -j REDIRECT --to-ports 2401")
    v, out = r.send(IP(src=R_WAN, dst=SERVER) / TCP(sport=33000, dport=2402, flags="S"), -1)
    assert (v, out[TCP].dport, out[IP].dst) == (K.V_ACCEPT, 2402, SERVER), out.summary()
    v, back = r.send(IP(src=SERVER, dst=R_WAN) / TCP(sport=2402, dport=33000, flags="SA", ack=1), WAN)
    assert (v, back[TCP].sport, back[TCP].dport) == (K.V_ACCEPT, 2402, 33000), back.summary()
    # a connection arriving on an interface is redirected to the ingress address
    v, out = r.send(IP(src=SERVER, dst="192.168.0.9") / TCP(sport=44000, dport=80, flags="S"), WAN)
    assert (out[IP].dst, out[TCP].dport) == (R_WAN, 2401), out.summary()


def test_output_redirect_goes_to_loopback():
    r = Router("-A OUTPUT -p udp -d 192.168.0.2 -j REDIRECT --to-ports 42")
    v, out = r.send(IP(src=R_WAN, dst=SERVER) / UDP(sport=5000, dport=2401), -1)
    assert (v, out[IP].dst, out[UDP].dport) == (K.V_ACCEPT, "127.0.0.1", 42), out.summary()


# ---------------------------------------------------------------- allocation

def test_port_exhaustion_with_tiny_range():
    r = Router("-A POSTROUTING -o wan0 -p udp -j SNAT --to-source 192.168.0.1:1000-1001")
    ports = []
    for k in range(3):
        v, out = r.send(IP(src=f"10.0.0.{10 + k}", dst=SERVER) / UDP(sport=5555, dport=53), LAN)
        ports.append((v, out[UDP].sport if v == K.V_ACCEPT else None))
    got = sorted(p for v, p in ports if v == K.V_ACCEPT)
    assert got == [1000, 1001], f"got {ports}"
    assert ports[2][0] == K.V_DROP, f"third flow verdict got {ports[2][0]}, want {K.V_DROP} (drop)"
    s = r.ct.stats()
    assert (s["insert_failed"], s["drop"]) == (1, 1), s


def test_nat_conflict_single_port_range():
    # gVisor TestNATConflict: SNAT to a::1 port 1; the second flow maps to the same reply
    r = Router("-A POSTROUTING -p udp -j SNAT --to-source [a::1]:1", family=6)
    v1, _ = r.send(IPv6(src="b::2", dst="a::2") / UDP(sport=2, dport=3), LAN)
    v2, _ = r.send(IPv6(src="d::4", dst="a::2") / UDP(sport=2, dport=3), LAN)
    v3, _ = r.send(IPv6(src="b::2", dst="a::2") / UDP(sport=2, dport=3), LAN)
    got, exp = (v1, v2, v3), (K.V_ACCEPT, K.V_DROP, K.V_ACCEPT)
    assert got == exp, f"verdicts got {got}, want {exp}"


@pytest.mark.parametrize("sport,lo,hi", [(1, 1, 511), (511, 1, 511), (512, 600, 1023),
                                         (1023, 600, 1023), (1024, 1024, 65535), (65535, 1024, 65535)])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_snat_port_conflicts_stay_in_class(sport, lo, hi, proto):
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    got = []
    for k in range(3):
        L4 = TCP(sport=sport, dport=5432, flags="S") if proto == "tcp" else UDP(sport=sport, dport=5432)
        v, out = r.send(IP(src=f"10.0.0.{20 + k}", dst=SERVER) / L4, LAN)
        assert v == K.V_ACCEPT, f"flow {k} verdict got {v}, want {K.V_ACCEPT}"
        got.append(out[IP].sport)
    assert got[0] == sport, f"first flow keeps its port: got {got[0]}, want {sport}"
    for p in got[1:]:
        assert lo <= p <= hi and p != sport, f"remapped port {p} outside [{lo}, {hi}]"
    assert len(set(got)) == 3, f"ports got {got}, want 3 distinct"


@pytest.mark.parametrize("ident", [0, 511, 512, 1023, 1024, 65535])
def test_snat_icmp_ident_conflicts(ident):
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    got = []
    for k in range(3):
        v, out = r.send(IP(src=f"10.0.0.{30 + k}", dst=SERVER) / ICMP(id=ident), LAN)
        assert v == K.V_ACCEPT, f"flow {k} verdict got {v}, want {K.V_ACCEPT}"
        got.append(out[ICMP].id)
        assert checksums_ok(out), f"flow {k}: checksums got invalid, want valid: {out.summary()}"
    assert got[0] == ident and len(set(got)) == 3, got


def test_dnat_clash_null_binding_remaps_source():
    # Linux nft_nat.sh test_dnat_clash: the second flow's reply equals the first's; the
    # SNAT null binding moves its source port, payload intact.
    r = Router("-A PREROUTING -p udp -d 10.0.0.3 --dport 1234 -j DNAT --to-destination 192.168.0.2:1234")
    v1, o1 = r.send(IP(src=CLIENT, dst=R_LAN) / UDP(sport=4321, dport=1234) / b"step 1", LAN)
    v2, o2 = r.send(IP(src=CLIENT, dst=SERVER) / UDP(sport=4321, dport=1234) / b"step 2", LAN)
    got, exp = (v1, o1[IP].dst, o1[UDP].sport), (K.V_ACCEPT, SERVER, 4321)
    assert got == exp, f"first flow (verdict, dst, sport) got {got}, want {exp}"
    assert v2 == K.V_ACCEPT and o2[UDP].sport != 4321 and o2[UDP].sport >= 1024, \
        f"flow 2 (verdict, sport) got {(v2, o2[UDP].sport)}, want ({K.V_ACCEPT}, >= 1024, != 4321)"
    got = bytes(o2[Raw])
    assert got == b"step 2" and checksums_ok(o2), \
        f"second flow payload got {got!r}, want b'step 2' with valid checksums: {o2.summary()}"


def test_snat_and_dnat_on_one_flow():
    r = Router("-A PREROUTING -i lan0 -p tcp --dport 8080 -d 10.0.0.3 -j DNAT --to-destination 192.168.0.2\n"
               "-A POSTROUTING -o wan0 -j SNAT --to-source 192.168.0.1")
    v, out = r.send(IP(src=CLIENT, dst=R_LAN) / TCP(sport=1234, dport=8080, flags="S"), LAN)
    got = (v, out[IP].src, out[IP].dst, out[TCP].sport, out[TCP].dport)
    assert got == (K.V_ACCEPT, R_WAN, SERVER, 1234, 8080), got
    c, _ = r.ct.lookup(CLIENT, R_LAN, 1234, 8080, "tcp")
    assert {"SRC_NAT", "DST_NAT"} <= c.status, f"status got {c.status}, want SRC_NAT and DST_NAT"
    v, back = r.send(IP(src=SERVER, dst=R_WAN) / TCP(sport=8080, dport=1234, flags="SA", ack=1), WAN)
    got = (v, back[IP].src, back[IP].dst, back[TCP].sport, back[TCP].dport)
    assert got == (K.V_ACCEPT, R_LAN, CLIENT, 8080, 1234), got
    assert checksums_ok(back), f"checksums got invalid, want valid: {back.summary()}"


# ---------------------------------------------------------------- ICMP errors

@pytest.mark.parametrize("trim", [0, 4])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("icmp_type,code", [(3, 3), (11, 0), (12, 0)])
def test_icmp_error_for_nated_flow(trim, proto, icmp_type, code):
    # gVisor TestNATICMPError: DNAT to Host1:5432 + MASQUERADE; Host1's error quoting the
    # NATed packet reaches the client from RouterNIC2, quoting exactly what the client sent
    # (TTL - 1).
    r = Router("-A PREROUTING -i lan0 -d 10.0.0.3 -p udp -j DNAT --to-destination 192.168.0.2:5432\n"
               "-A PREROUTING -i lan0 -d 10.0.0.3 -p tcp -j DNAT --to-destination 192.168.0.2:5432\n"
               "-A POSTROUTING -o wan0 -j MASQUERADE")
    L4 = UDP(sport=1234, dport=5432) if proto == "udp" else TCP(sport=1234, dport=5432, flags="S")
    sent = IP(src=CLIENT, dst=R_LAN, ttl=64) / L4 / b"\x01\x02\x03\x04"
    v, out = r.send(sent, LAN)
    got, exp = (out[IP].src, out[IP].dst), (R_WAN, SERVER)
    assert got == exp, f"(src, dst) got {got}, want {exp}"
    quote = raw(out[IP])
    quote = quote[:len(quote) - trim] if trim else quote
    err = IP(src=SERVER, dst=R_WAN) / ICMP(type=icmp_type, code=code) / Raw(quote)
    v, back = r.send(err, WAN)
    assert v == K.V_RELATED, f"verdict {v}"
    got, exp = (back[IP].src, back[IP].dst, back[ICMP].type), (R_LAN, CLIENT, icmp_type)
    assert got == exp, f"(src, dst, ICMP type) got {got}, want {exp}"
    want_quote = IP(raw(sent))
    want_quote.ttl = 63
    del want_quote.chksum
    want_bytes = raw(IP(raw(want_quote)))
    want_bytes = want_bytes[:len(want_bytes) - trim] if trim else want_bytes
    got_quote = bytes(back[ICMP].payload)
    assert got_quote == want_bytes, f"quote got {got_quote.hex()}, want {want_bytes.hex()}"
    q = back.copy()
    del q[ICMP].chksum
    del q[IP].chksum
    assert raw(Ether(raw(q)))[:len(raw(back))] == raw(back), "outer checksums"


def test_icmp_error_quoting_ipv4_options():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    from scapy.all import IPOption_NOP
    sent = IP(src=CLIENT, dst=SERVER, options=[IPOption_NOP()] * 4) / UDP(sport=1234, dport=9) / b"opt"
    v, out = r.send(sent, LAN)
    got, exp = (v, out[IP].src, out[IP].ihl), (K.V_ACCEPT, R_WAN, 6)
    assert got == exp, f"(verdict, src, ihl) got {got}, want {exp}"
    v, back = r.send(IP(src=SERVER, dst=R_WAN) / ICMP(type=3, code=3) / Raw(raw(out[IP])), WAN)
    got, exp = (v, back[IP].dst), (K.V_RELATED, CLIENT)
    assert got == exp, f"(verdict, dst) got {got}, want {exp}"
    q = IP(bytes(back[ICMP].payload))
    assert (q.src, q.ihl, q[UDP].sport) == (CLIENT, 6, 1234), q.summary()
    assert checksums_ok(back), f"checksums got invalid, want valid: {back.summary()}"
    chk = q.copy()
    del chk.chksum
    assert raw(IP(raw(chk)))[:24] == raw(q)[:24], "quoted IPv4 header checksum (with options)"


def test_icmpv6_error_quoting_extension_headers():
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE", family=6)
    sent = IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=1234, dport=9) / b"x"
    v, out = r.send(sent, LAN)
    got, exp = (v, out[IPv6].src), (K.V_ACCEPT, R_WAN6)
    assert got == exp, f"(verdict, src) got {got}, want {exp}"
    err = IPv6(src=SERVER6, dst=R_WAN6) / ICMPv6DestUnreach(code=4) / Raw(raw(out[IPv6]))
    v, back = r.send(err, WAN)
    got, exp = (v, back[IPv6].dst), (K.V_RELATED, CLIENT6)
    assert got == exp, f"(verdict, dst) got {got}, want {exp}"
    inner = IPv6(bytes(back[ICMPv6DestUnreach].payload))
    assert (inner.src, inner[UDP].sport) == (CLIENT6, 1234), inner.summary()
    q = back.copy()
    del q[ICMPv6DestUnreach].cksum
    assert raw(Ether(raw(q))) == raw(back), "ICMPv6 checksum"


def test_drop_invalid_setting_is_reported_in_the_mask():
    for drop in (False, True):
        r = Router("-A POSTROUTING -o wan0 -j MASQUERADE", drop_invalid=drop)
        b = PacketBatch.from_frames([raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=1, dport=2, chksum=0x1234))],
                                    ifindex=LAN)
        res = r.ct.process(b)
        got = int(res.verdict[0])
        assert got == K.V_INVALID, f"drop_invalid={drop}: verdict got {got}, want {K.V_INVALID}"
        got = bool(res.forward_mask(r.ct.config.drop_invalid)[0])
        assert got is (not drop), f"drop_invalid={drop}: forward_mask got {got}, want {not drop}"
        assert IP(raw(Ether(b.frame(0))[IP])).src == CLIENT, "INVALID packets are not NATed"


def test_icmp_error_with_cut_l4_header_is_invalid():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    v, out = r.send(IP(src=CLIENT, dst=SERVER) / UDP(sport=1234, dport=5432) / b"data", LAN)
    quote = raw(out[IP])[:20 + 3]
    v, back = r.send(IP(src=SERVER, dst=R_WAN) / ICMP(type=3, code=3) / Raw(quote), WAN)
    assert v == K.V_INVALID, f"verdict got {v}, want {K.V_INVALID} (invalid)"
    got = r.ct.stats()["invalid.icmp_inner"]
    assert got == 1, f"invalid.icmp_inner got {got}, want 1"


def test_icmpv6_error_for_masqueraded_flow():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE", family=6)
    v, out = r.send(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=1234, dport=5432) / b"d", LAN)
    err = IPv6(src=SERVER6, dst=R_WAN6) / ICMPv6DestUnreach(code=4) / Raw(raw(out[IPv6]))
    v, back = r.send(err, WAN)
    got, exp = (v, back[IPv6].dst), (K.V_RELATED, CLIENT6)
    assert got == exp, f"(verdict, dst) got {got}, want {exp}"
    inner = IPv6(bytes(back[ICMPv6DestUnreach].payload))
    got, exp = (inner.src, inner[UDP].sport), (CLIENT6, 1234)
    assert got == exp, f"quoted (src, sport) got {got}, want {exp}"
    q = back.copy()
    del q[ICMPv6DestUnreach].cksum
    assert raw(Ether(raw(q))) == raw(back), "ICMPv6 checksum"


# ---------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(flows=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([1, 600, 1024, 40000]),
                                st.sampled_from(["udp", "tcp", "icmp"])), min_size=1, max_size=40),
       seed=st.integers(0, 2**32 - 1))
def test_allocations_keep_live_tuples_unique(flows, seed):
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE", seed=seed)
    for host, port, proto in flows:
        L4 = {"udp": UDP(sport=port, dport=53), "tcp": TCP(sport=port, dport=80, flags="S"),
              "icmp": ICMP(id=port)}[proto]
        v, out = r.send(IP(src=f"10.0.0.{40 + host}", dst=SERVER) / L4, LAN)
        assert v in (K.V_ACCEPT, K.V_DROP), f"verdict got {v}, want {K.V_ACCEPT} or {K.V_DROP}"
        if v == K.V_ACCEPT:
            assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
    seen = set()
    for c in r.ct.conns():
        for t in (c.original, c.reply):
            assert t not in seen, f"tuple {t} held twice"
            seen.add(t)


def test_udp_checksum_computing_to_zero_is_sent_as_ffff():
    r = Router("-A POSTROUTING -o wan0 -j MASQUERADE")
    # choose the payload word so that the NATed datagram's checksum sums to zero
    probe = IP(src=R_WAN, dst=SERVER, ttl=63) / UDP(sport=1234, dport=53) / b"\x00\x00"
    c0 = IP(raw(probe))[UDP].chksum
    word = c0 if c0 != 0xFFFF else 0
    v, out = r.send(IP(src=CLIENT, dst=SERVER) / UDP(sport=1234, dport=53) / word.to_bytes(2, "big"), LAN)
    got, exp = (v, out[IP].src), (K.V_ACCEPT, R_WAN)
    assert got == exp, f"(verdict, src) got {got}, want {exp}"
    assert out[UDP].chksum == 0xFFFF, f"got {out[UDP].chksum:#06x}, want 0xffff (a computed 0)"
    assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"


def test_snat_address_range_same_client_same_address():
    r = Router("-A POSTROUTING -o wan0 -p udp -j SNAT --to-source 192.168.0.100-192.168.0.110")
    got = set()
    for k in range(3):
        v, out = r.send(IP(src=CLIENT, dst=SERVER) / UDP(sport=2000 + k, dport=53), LAN)
        assert v == K.V_ACCEPT, f"flow {k} verdict got {v}, want {K.V_ACCEPT}"
        got.add(out[IP].src)
    addrs = sorted(got)
    assert len(got) == 1 and 100 <= int(got.pop().split(".")[-1]) <= 110, \
        f"source addresses got {addrs}, want one in 192.168.0.100-110"
    r = Router("-A POSTROUTING -o wan0 -p udp -j SNAT --to-source 192.168.0.100-192.168.0.110 --persistent")
    got = set()
    for k in range(5):
        v, out = r.send(IP(src=CLIENT, dst=f"192.168.0.{20 + k}") / UDP(sport=3000, dport=53), LAN)
        got.add(out[IP].src)
    assert len(got) == 1, f"--persistent: one address per client whatever the destination, got {got}"
    spread = set()
    for k in range(40):
        v, out = r.send(IP(src=f"10.0.0.{100 + k}", dst=SERVER) / UDP(sport=3000, dport=53), LAN)
        spread.add(out[IP].src)
    assert len(spread) > 3 and all(100 <= int(a.split(".")[-1]) <= 110 for a in spread), spread


VALID = [raw(E / IP(src=CLIENT, dst=SERVER) / TCP(sport=1234, dport=80, flags="S")),
         raw(E / IP(src=SERVER, dst=R_WAN) / TCP(sport=80, dport=1234, flags="SA", ack=1)),
         raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=5, dport=53) / b"q"),
         raw(E / IP(src=SERVER, dst=R_WAN) / ICMP(type=3, code=3) /
             IP(src=R_WAN, dst=SERVER) / UDP(sport=5, dport=53)),
         raw(E / IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5, dport=53) / b"q"),
         raw(E / IP(src=CLIENT, dst=R_LAN) / ICMP(id=9))]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_engine_never_raises_on_any_bytes(data):
    """The fuzz invariant of the whole engine (NAT on, router mode): any batch of byte
    strings, valid or mutated, gets a verdict per frame and never raises."""
    r = Router("-A PREROUTING -i lan0 -p tcp -d 10.0.0.3 -j DNAT --to-destination 192.168.0.2\n"
               "-A POSTROUTING -o wan0 -j MASQUERADE")
    frames, ifx = [], []
    for _ in range(data.draw(st.integers(1, 12))):
        base = bytearray(data.draw(st.sampled_from(VALID)))
        for _ in range(data.draw(st.integers(0, 4))):
            if not base:
                break
            pos = data.draw(st.integers(0, len(base) - 1))
            base[pos] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(base)))
        frames.append(bytes(base[:cut]) if data.draw(st.booleans()) else bytes(base))
        ifx.append(data.draw(st.sampled_from([-1, LAN, WAN])))
    b = PacketBatch.from_frames(frames, ifindex=ifx, ts=10_000_000_000)
    res = r.ct.process(b)
    got = set(res.verdict.tolist())
    assert got <= {K.V_ACCEPT, K.V_RELATED, K.V_UNTRACKED, K.V_INVALID,
                   K.V_DROP, K.V_NOTIP, K.V_QUEUED}, \
        f"verdicts got {sorted(got)}, want only known verdicts"
    # router mode trims bytes past the IP datagram (an IPv6 payload length cut to 0 leaves
    # 40 bytes), so a frame may shrink, never grow
    grew = [(int(n), len(f)) for n, f in zip(b.length, frames) if n > len(f)]
    assert grew == [], f"frames grew: (length, was) {grew}"


@pytest.mark.parametrize("n_workers", [2, 4])
def test_shard_affine_masquerade_ports_bring_replies_home(n_workers):
    """Optional shard-affine NAT (issue 4 item 6): with it on, a worker's MASQUERADE picks
    ports whose reply tuple hashes into its own bucket slice; off, Linux keeps the port."""
    from shardct.hashing import bucket_of, owner_of, tuple_hash
    for affine in (False, True):
        k = n_workers - 1
        ct = ConnTrack(Config(shard_affine_nat=affine), seed=7, clock=ManualClock(10**9),
                       rules=nat_rules("-A POSTROUTING -o wan0 -j MASQUERADE"),
                       network=Network.from_dict(NET), router=True, shard=(k, n_workers),
                       rng=np.random.default_rng(7))
        kept = home = 0
        for j in range(40):
            pkt = IP(src=f"10.0.0.{10 + j}", dst=SERVER) / UDP(sport=30000 + j, dport=53)
            b = PacketBatch.from_frames([raw(E / pkt)], ifindex=LAN)
            got = int(ct.process(b).verdict[0])
            assert got == K.V_ACCEPT, f"flow {j}: verdict got {got}, want {K.V_ACCEPT}"
            out = Ether(b.frame(0))
            kept += out[UDP].sport == 30000 + j
            h = tuple_hash(ipaddress.ip_address(SERVER).packed, ipaddress.ip_address(R_WAN).packed,
                           53, out[UDP].sport, 17, ct.table.seed)
            home += owner_of(bucket_of(h), n_workers) == k
            assert checksums_ok(out), f"checksums got invalid, want valid: {out.summary()}"
        if affine:
            assert home == 40, f"replies landing home: got {home}/40"
        else:
            assert kept == 40, f"ports kept without affinity: got {kept}/40"
