"""Kernel differential test: the same crafted packets through a Linux NAT router (nftables,
in network namespaces) and through shardct configured with the same rules in
iptables-save form; the packets that come out are compared field by field.

Each world builds its server replies from what *its* server captured (never from what the
test expects), so a difference shows up as a difference, not as a crash. Ports the kernel
picks at random are accepted anywhere in the allowed class (kernel-behaviour.md).
"""
from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw
from scapy.layers.inet import IPerror, UDPerror

from kernel_router import CLIENT, SERVER, KernelRouter, available

from shardct import Config, ConnTrack, PacketBatch
from shardct import track as K
from shardct.netconf import Network
from shardct.rules import parse_iptables_save

pytestmark = pytest.mark.netns



def network(server_mtu=1500):
    return Network.from_dict({"interfaces": {
        "rtr-in": {"address": ["10.0.0.3/24", "b::1/64"]},
        "rtr-out": {"address": ["192.168.0.1/24", "a::1/64"], "mtu": server_mtu}}})


NET = network()
IFX = {CLIENT: 0, SERVER: 1}


def nft(family, *rules):
    fam = "ip" if family == 4 else "ip6"
    chains = {"prerouting": "dstnat", "postrouting": "srcnat"}
    out = [f"table {fam} nat {{"]
    for chain, prio in chains.items():
        out.append(f"    chain {chain} {{")
        out.append(f"        type nat hook {chain} priority {prio}; policy accept;")
        out += [f"        {r}" for c, r in rules if c == chain]
        out.append("    }")
    out.append("}")
    return "\n".join(out) + "\n"


def ipt(family, *rules):
    text = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
           ":POSTROUTING ACCEPT [0:0]\n" + "\n".join(rules) + "\nCOMMIT\n"
    return parse_iptables_save(text, "differential.rules", family)


class ShardctWorld:
    def __init__(self, rules, family, net=NET):
        self.ct = ConnTrack(Config(), seed=11, rules=rules, network=net, router=True,
                            rng=np.random.default_rng(11))
        self.t = 1_000_000_000

    def exchange(self, side, frame):
        return self.exchange_all(side, frame)[0]

    def exchange_all(self, side, frame):
        """(frames forwarded, errors the router sent back)."""
        self.t += 1_000_000
        b = PacketBatch.from_frames([frame], ts=self.t, ifindex=IFX[side])
        r = self.ct.process(b)
        back = r.generated.frames() if r.generated is not None else []
        return ([b.frame(0)] if r.forward[0] else []), back


@pytest.fixture(scope="module")
def can_run():
    ok, why = available()
    if not ok:
        pytest.skip(why)


def l3(frame: bytes):
    e = Ether(frame)
    return e[IP] if IP in e else e[IPv6]


def checksums_valid(frame: bytes) -> bool:
    e = Ether(frame)
    q = e.copy()
    for layer in (IP, TCP, ICMP):
        if layer in q:
            del q[layer].chksum
    if UDP in q and q[UDP].chksum != 0:
        del q[UDP].chksum
    for layer in q.layers():
        if layer.__name__.startswith("ICMPv6") and hasattr(q[layer], "cksum"):
            del q[layer].cksum
    return raw(Ether(raw(q))) == raw(e)


def fields(frame: bytes) -> dict:
    """What the comparison looks at (no MACs: shardct's L2 output is the runtime's job)."""
    p = l3(frame)
    d = {"src": p.src, "dst": p.dst}
    if p.version == 4:
        d.update(ttl=p.ttl, id=p.id, tos=p.tos, flags=int(p.flags), proto=p.proto)
    else:
        d.update(hlim=p.hlim, nh=p.nh, tc=p.tc)
    for L in (TCP, UDP):
        if L in p and not isinstance(p[L].underlayer, (IPerror,)):
            d.update(sport=p[L].sport, dport=p[L].dport)
            if L is TCP:
                d.update(seq=p[TCP].seq, ack=p[TCP].ack, tflags=int(p[TCP].flags))
            if L is UDP:
                d.update(udp_zero=p[UDP].chksum == 0)
            d["payload"] = bytes(p[L].payload)
            break
    if ICMP in p:
        d.update(itype=p[ICMP].type, icode=p[ICMP].code)
        if p[ICMP].type in (0, 8, 13, 14, 15, 16, 17, 18):      # queries: ident, no quote
            d.update(ident=p[ICMP].id, payload=bytes(p[ICMP].payload))
        else:
            q = IP(bytes(p[ICMP].payload))
            d.update(q_src=q.src, q_dst=q.dst)
            if UDP in q:
                d.update(q_sport=q[UDP].sport, q_dport=q[UDP].dport)
    d["checksums_valid"] = checksums_valid(frame)
    return d


def compare(kernel_out, shardct_out, random_ports=()):
    assert len(kernel_out) == len(shardct_out), \
        f"frames out: kernel {len(kernel_out)}, shardct {len(shardct_out)}"
    for kf, sf in zip(kernel_out, shardct_out):
        kd, sd = fields(kf), fields(sf)
        for k in random_ports:
            # a port the kernel picks at random: both must have moved, inside the class
            lo, hi = random_ports[k]
            assert lo <= kd[k] <= hi and lo <= sd[k] <= hi, f"{k}: kernel {kd[k]}, shardct {sd[k]}"
            kd.pop(k)
            sd.pop(k)
        assert kd == sd, f"\nkernel  {kd}\nshardct {sd}"
        assert kd["checksums_valid"], "kernel output checksum"


def run_flow(k, s, steps, random_ports=None):
    """steps: (side, fn(last_kernel_frame, last_shardct_frame) -> (frame_k, frame_s))."""
    last_k = last_s = None
    for i, (side, make) in enumerate(steps):
        fk, fs = make(last_k, last_s)
        ko = k.exchange(side, fk)
        so = s.exchange(side, fs)
        compare(ko, so, (random_ports or {}).get(i, {}))
        last_k = ko[0] if ko else None
        last_s = so[0] if so else None


def frame_from(k, side, pkt):
    src, dst = k.macs(side)
    return raw(Ether(src=src, dst=dst) / pkt)


def reply_to(k, side, captured, build):
    """A frame from `side` answering `captured` (as that side saw it)."""
    return frame_from(k, side, build(l3(captured)))


# ------------------------------------------------------------------------------ scenarios

MASQ4 = (nft(4, ("postrouting", 'oifname "rtr-out" masquerade')),
         ["-A POSTROUTING -o rtr-out -j MASQUERADE"])
MASQ6 = (nft(6, ("postrouting", 'oifname "rtr-out" masquerade')),
         ["-A POSTROUTING -o rtr-out -j MASQUERADE"])
DNAT4 = (nft(4, ("prerouting", 'iifname "rtr-in" udp dport 5353 dnat to 192.168.0.2:8080'),
             ("prerouting", 'iifname "rtr-in" tcp dport 8081 dnat to 192.168.0.2:8080')),
         ["-A PREROUTING -i rtr-in -p udp --dport 5353 -j DNAT --to-destination 192.168.0.2:8080",
          "-A PREROUTING -i rtr-in -p tcp --dport 8081 -j DNAT --to-destination 192.168.0.2:8080"])


def worlds(spec, family=4, server_mtu=1500):
    nft_text, ipt_rules = spec
    k = KernelRouter(nft_rules=nft_text, family=family, server_mtu=server_mtu)
    return k, ShardctWorld(ipt(family, *ipt_rules), family, network(server_mtu))


def same_conns(k, s, proto, family=4):
    """Both tables hold as many ``proto`` conns (TCP: in the same states) after a step."""
    lines = k.conntrack_list("-f", "ipv4" if family == 4 else "ipv6").splitlines()
    kern = sorted(ln.split()[3] if proto == "tcp" else proto
                  for ln in lines if ln.split()[:1] == [proto])
    ours = sorted((c.state or proto) for c in s.ct.conns(now=s.t)
                  if {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}[c.proto] == proto)
    assert kern == ours, f"{proto} conns: kernel {kern}, shardct {ours}\n" + "\n".join(lines)


def router_errors(k, s, side, frame, forwarded=0):
    """Send ``frame`` from ``side`` through both routers: ``forwarded`` frames must go
    on and exactly one ICMP error come back to ``side``; the errors must match in
    every field but the IP id (a fresh one) and their whole ICMP message (type, code,
    checksum, MTU field, quote) byte for byte."""
    other = SERVER if side == CLIENT else CLIENT
    got = k.exchange_all(side, frame)
    fwd, back = s.exchange_all(side, frame)
    assert (len(got[other]), len(fwd)) == (forwarded, forwarded), \
        f"forwarded: kernel {len(got[other])}, shardct {len(fwd)}, want {forwarded}"
    assert (len(got[side]), len(back)) == (1, 1), \
        f"errors back: kernel {len(got[side])}, shardct {len(back)}"
    same_error(got[side][0], back[0])


def same_error(kf, sf):
    """The kernel's error ``kf`` and shardct's ``sf`` match in every field but the IP id
    (a fresh one) and in their whole ICMP message (type, code, checksum, MTU field, quote)
    byte for byte."""
    kd, sd = fields(kf), fields(sf)
    kd.pop("id", None), sd.pop("id", None)
    assert kd == sd, f"\nkernel  {kd}\nshardct {sd}"
    hl = 20 if l3(sf).version == 4 else 40
    km, sm = raw(l3(kf))[hl:], raw(l3(sf))[hl:]
    assert km == sm, f"ICMP messages differ: kernel {km[:8].hex()}+{len(km)}, shardct {sm[:8].hex()}+{len(sm)}"
    assert kd["checksums_valid"], "kernel output checksum"


def test_masquerade_udp_both_ways(can_run):
    k, s = worlds(MASQ4)
    with k:
        c = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40000, dport=53) / b"query"),) * 2
        rep = lambda lk, ls: (reply_to(k, SERVER, lk, lambda p: IP(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / b"answer"),
                              reply_to(k, SERVER, ls, lambda p: IP(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / b"answer"))
        run_flow(k, s, [(CLIENT, c), (SERVER, rep)])


def test_masquerade_tcp_handshake(can_run):
    k, s = worlds(MASQ4)

    def synack(p):
        return IP(src=p.dst, dst=p.src) / TCP(sport=p[TCP].dport, dport=p[TCP].sport, flags="SA",
                                             seq=5000, ack=p[TCP].seq + 1, window=64000)
    with k:
        syn = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2", id=7) /
                                     TCP(sport=41000, dport=80, flags="S", seq=100, window=64000)),) * 2
        sa = lambda lk, ls: (reply_to(k, SERVER, lk, synack), reply_to(k, SERVER, ls, synack))
        ack = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") /
                                     TCP(sport=41000, dport=80, flags="A", seq=101, ack=5001, window=64000) / b"GET /"),) * 2
        run_flow(k, s, [(CLIENT, syn), (SERVER, sa), (CLIENT, ack)])


def test_masquerade_icmp_echo(can_run):
    k, s = worlds(MASQ4)
    with k:
        req = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / ICMP(id=4321, seq=1) / b"ping"),) * 2
        rep = lambda lk, ls: tuple(reply_to(k, SERVER, f, lambda p: IP(src=p.dst, dst=p.src) / ICMP(type=0, id=p[ICMP].id, seq=1) / b"ping") for f in (lk, ls))
        run_flow(k, s, [(CLIENT, req), (SERVER, rep)])


@pytest.mark.parametrize("req", [13, 17], ids=["timestamp", "address-mask"])
def test_masquerade_icmp_query_tracked_like_echo(can_run, req):
    # Linux tracks timestamp (and address-mask) queries: both are NATed, even with the
    # LAN address otherwise leaking (they were UNTRACKED)
    body = b"\0" * (12 if req == 13 else 4)
    k, s = worlds(MASQ4)
    with k:
        q = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / ICMP(type=req, id=4322, seq=1) / body),) * 2
        rep = lambda lk, ls: tuple(reply_to(k, SERVER, f, lambda p: IP(src=p.dst, dst=p.src) / ICMP(type=req + 1, id=p[ICMP].id, seq=1) / body) for f in (lk, ls))
        run_flow(k, s, [(CLIENT, q), (SERVER, rep)])


def test_masquerade_zero_udp_checksum(can_run):
    k, s = worlds(MASQ4)
    with k:
        c = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40001, dport=53, chksum=0) / b"q"),) * 2
        run_flow(k, s, [(CLIENT, c)])


def test_masquerade_ipv6_udp(can_run):
    k, s = worlds(MASQ6, family=6)
    with k:
        c = lambda *_: (frame_from(k, CLIENT, IPv6(src="b::2", dst="a::2") / UDP(sport=40002, dport=53) / b"q6"),) * 2
        rep = lambda lk, ls: tuple(reply_to(k, SERVER, f, lambda p: IPv6(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / b"a6") for f in (lk, ls))
        run_flow(k, s, [(CLIENT, c), (SERVER, rep)])


def test_dnat_udp_and_tcp(can_run):
    k, s = worlds(DNAT4)
    with k:
        c = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="10.0.0.3") / UDP(sport=40003, dport=5353) / b"x"),) * 2
        rep = lambda lk, ls: tuple(reply_to(k, SERVER, f, lambda p: IP(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / b"y") for f in (lk, ls))
        run_flow(k, s, [(CLIENT, c), (SERVER, rep)])
        syn = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="10.0.0.3") / TCP(sport=41001, dport=8081, flags="S", seq=9)),) * 2
        run_flow(k, s, [(CLIENT, syn)])


def test_icmp_port_unreachable_for_masqueraded_udp(can_run):
    k, s = worlds(MASQ4)

    def unreach(p):
        return IP(src=p.dst, dst=p.src) / ICMP(type=3, code=3) / Raw(raw(p)[:28 + 8])
    with k:
        c = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40004, dport=9) / (b"z" * 16)),) * 2
        err = lambda lk, ls: (reply_to(k, SERVER, lk, unreach), reply_to(k, SERVER, ls, unreach))
        run_flow(k, s, [(CLIENT, c), (SERVER, err)])


def test_bad_udp_checksum_forwarded_unnated(can_run):
    k, s = worlds(MASQ4)
    with k:
        c = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40005, dport=53, chksum=0x1234) / b"bad"),) * 2
        ko = k.exchange(CLIENT, c()[0])
        so = s.exchange(CLIENT, c()[0])
        assert len(ko) == len(so) == 1
        kd, sd = fields(ko[0]), fields(so[0])
        assert kd == sd, f"\nkernel  {kd}\nshardct {sd}"
        assert kd["src"] == "10.0.0.2", "INVALID packets leave un-NATed"


def test_trailer_past_the_ip_datagram_is_trimmed(can_run):
    k, s = worlds(MASQ4)
    with k:
        f = frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40007, dport=53) / b"t") \
            + b"\xee" * 20
        ko, so = k.exchange(CLIENT, f), s.exchange(CLIENT, f)
        compare(ko, so)
        got = [len(x) for x in ko], [len(x) for x in so]
        assert got[0] == got[1] == [len(f) - 20], f"frame lengths (kernel, shardct): {got}"


@pytest.mark.parametrize("size", [3, 1000], ids=["short", "quote-cut-at-576"])
def test_ttl1_time_exceeded_from_the_ingress_address(can_run, size):
    k, s = worlds(MASQ4)
    with k:
        f = frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2", ttl=1, id=5) / UDP(sport=40008, dport=53) / (b"t" * size))
        router_errors(k, s, CLIENT, f)


def test_source_port_clash_remapped_in_class(can_run):
    k, s = worlds(MASQ4)
    with k:
        k.add_client_address("10.0.0.4")
        first = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40006, dport=53) / b"1"),) * 2
        second = lambda *_: (frame_from(k, CLIENT, IP(src="10.0.0.4", dst="192.168.0.2") / UDP(sport=40006, dport=53) / b"2"),) * 2
        run_flow(k, s, [(CLIENT, first), (CLIENT, second)], random_ports={1: {"sport": (1024, 65535)}})


def fragments_through(k, s, frags):
    """Send the client's fragments through both routers as one burst; returns (what the
    kernel's server side got, shardct's fragments out, shardct's Result, what the
    kernel sent back to the client); shardct's errors are ``r.generated``."""
    k.drain()
    for f in frags:
        k.send(CLIENT, f)
    got = k.recv_all(0.3)
    s.t += 1_000_000
    b = PacketBatch.from_frames(frags, ts=s.t, ifindex=IFX[CLIENT])
    r = s.ct.process(b)
    return got[SERVER], [] if r.fragments is None else r.fragments.frames(), r, got[CLIENT]


@pytest.mark.parametrize("order,mtu", [("in-order", 1500), ("reversed", 1500), ("in-order", 1400)],
                         ids=["in-order", "reversed", "egress-mtu-1400"])
def test_fragmented_udp_is_nated_whole(can_run, order, mtu):
    """A 3000-byte UDP datagram sent as three fragments (no DF): both routers hold the
    fragments, NAT the datagram whole and send it on cut where the client cut it, or at the
    egress MTU when that is smaller (every fragment from the router's address, the same IP
    id, the port in the first)."""
    from scapy.layers.inet import defragment, fragment
    k, s = worlds(MASQ4, server_mtu=mtu)
    with k:
        dgram = IP(src="10.0.0.2", dst="192.168.0.2", id=0x4321) / UDP(sport=40010, dport=53) \
            / (bytes(range(256)) * 12)[:3000]
        frags = [frame_from(k, CLIENT, f) for f in fragment(dgram, 1480)]
        if order == "reversed":
            frags = frags[::-1]
        ko, so, r, _ = fragments_through(k, s, frags)
        assert not r.forward.any(), "no fragment leaves as it came"

        def geometry(frames):
            return [(l3(f).src, l3(f).dst, l3(f).ttl, l3(f).id, int(l3(f).flags), l3(f).frag,
                     len(l3(f)), checksums_valid(f) if l3(f).frag else True) for f in frames]
        assert geometry(ko) == geometry(so), f"\nkernel  {geometry(ko)}\nshardct {geometry(so)}"
        kd, sd = defragment([l3(f) for f in ko])[0], defragment([l3(f) for f in so])[0]
        kw = (kd[UDP].sport, kd[UDP].dport, bytes(kd[UDP].payload), kd[UDP].chksum)
        sw = (sd[UDP].sport, sd[UDP].dport, bytes(sd[UDP].payload), sd[UDP].chksum)
        assert kw == sw, f"datagrams differ: kernel {kw[:2]} {kw[3]:#x}, shardct {sw[:2]} {sw[3]:#x}"
        assert len(ko) == 3 and kd.src == "192.168.0.1"


def test_fragmented_ipv6_udp_is_nated_whole(can_run):
    """The same for IPv6: reassembled (nf_conntrack_reasm), NATed, re-fragmented at the
    largest fragment; the fragment id is a fresh one (ip6_fragment), the same on every
    fragment of the datagram."""
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6
    k, s = worlds(MASQ6, family=6)
    with k:
        dgram = IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=0x5151) \
            / UDP(sport=40011, dport=53) / (bytes(range(256)) * 12)[:3000]
        frags = [frame_from(k, CLIENT, f) for f in fragment6(dgram, 1400)]
        ko, so, r, _ = fragments_through(k, s, frags)

        def geometry(frames):
            out = []
            for f in frames:
                p, h = l3(f), l3(f)[IPv6ExtHdrFragment]
                out.append((p.src, p.dst, p.hlim, h.offset, h.m, h.nh, len(p)))
            return out
        assert geometry(ko) == geometry(so), f"\nkernel  {geometry(ko)}\nshardct {geometry(so)}"
        ids = [{l3(f)[IPv6ExtHdrFragment].id for f in x} for x in (ko, so)]
        assert [len(x) for x in ids] == [1, 1] and 0x5151 not in ids[0] | ids[1], \
            f"fragment ids: kernel {ids[0]}, shardct {ids[1]} (the original was 0x5151)"
        data = [b"".join(bytes(l3(f)[IPv6ExtHdrFragment].payload) for f in x) for x in (ko, so)]
        assert data[0] == data[1], "the datagrams' bytes (UDP header and checksum included)"
        assert len(ko) == 3


@pytest.mark.parametrize("family", [4, 6])
def test_fragments_whose_largest_is_over_the_egress_mtu_get_frag_needed(can_run, family):
    """A 3000-byte UDP datagram as fragments of 1500 bytes (IPv4: each with DF), the egress
    MTU 1400: both routers reassemble it and, its largest fragment being over the MTU
    (frag_max_size), drop it with frag-needed / packet-too-big quoting the reassembled
    datagram; no fragment gets an error of its own, and no conn stays."""
    from scapy.layers.inet import fragment
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6
    k, s = worlds(MASQ4 if family == 4 else MASQ6, family=family, server_mtu=1400)
    with k:
        data = UDP(sport=40016, dport=53) / (bytes(range(256)) * 12)[:3000]
        if family == 4:
            pk = fragment(IP(src="10.0.0.2", dst="192.168.0.2", id=0x4444, flags="DF") / data, 1480)
        else:
            pk = fragment6(IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=0x4444) / data, 1500)
        frags = [frame_from(k, CLIENT, f) for f in pk]
        ko, so, r, back = fragments_through(k, s, frags)
        errs = [] if r.generated is None else r.generated.frames()
        assert (len(ko), len(so), int(r.forward.sum())) == (0, 0, 0), "nothing forwarded"
        assert (len(back), len(errs)) == (1, 1), f"errors back: kernel {len(back)}, shardct {len(errs)}"
        same_error(back[0], errs[0])
        assert r.generated_by.tolist() == [len(frags) - 1], "the error answers the last fragment"
        same_conns(k, s, "udp", family)


# ------------------------------------------------------------------------------ the router's own errors

@pytest.mark.parametrize("proto", ["icmp", "udp"])
def test_df_packet_over_the_egress_mtu_gets_frag_needed(can_run, proto):
    k, s = worlds(MASQ4, server_mtu=1400)
    with k:
        body = (ICMP(id=4400, seq=1) if proto == "icmp" else UDP(sport=40010, dport=53)) / (b"d" * 1400)
        f = frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2", flags="DF", tos=0x28) / body)
        router_errors(k, s, CLIENT, f)
        same_conns(k, s, proto)         # dropped before it was confirmed: no conn
        # at the MTU it passes, and without DF it is not dropped (the kernel fragments it)
        fit = frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2", flags="DF") / UDP(sport=40011, dport=53) / (b"f" * 1372))
        compare(k.exchange(CLIENT, fit), s.exchange(CLIENT, fit))


def test_masqueraded_reply_over_the_lan_mtu_gets_frag_needed_quoting_it_as_it_arrived(can_run):
    # the LAN side's MTU lowered: the kernel's veth pair, shardct's rtr-in
    k = KernelRouter(nft_rules=MASQ4[0], family=4, client_mtu=1300)
    s = ShardctWorld(ipt(4, *MASQ4[1]), 4, Network.from_dict({"interfaces": {
        "rtr-in": {"address": ["10.0.0.3/24", "b::1/64"], "mtu": 1300},
        "rtr-out": {"address": ["192.168.0.1/24", "a::1/64"]}}}))
    with k:
        q = frame_from(k, CLIENT, IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=40012, dport=53) / b"q")
        ko, so = k.exchange(CLIENT, q), s.exchange(CLIENT, q)
        compare(ko, so)
        big = lambda p: IP(src=p.dst, dst=p.src, flags="DF", ttl=40) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / (b"r" * 1400)
        assert reply_to(k, SERVER, ko[0], big) == reply_to(k, SERVER, so[0], big), "same MASQUERADE port"
        router_errors(k, s, SERVER, reply_to(k, SERVER, ko[0], big))
        same_conns(k, s, "udp")


def test_ipv6_over_the_egress_mtu_gets_packet_too_big(can_run):
    k, s = worlds(MASQ6, family=6, server_mtu=1400)
    with k:
        f = frame_from(k, CLIENT, IPv6(src="b::2", dst="a::2") / UDP(sport=40013, dport=53) / (b"6" * 1400))
        router_errors(k, s, CLIENT, f)
        same_conns(k, s, "udp", 6)


@pytest.mark.parametrize("family,dst", [(4, "10.0.0.3"), (4, "192.168.0.1"), (6, "b::1")])
def test_udp_to_the_router_gets_port_unreachable(can_run, family, dst):
    k, s = worlds(MASQ4 if family == 4 else MASQ6, family=family)
    with k:
        ip = IP(src="10.0.0.2", dst=dst, ttl=20) if family == 4 else IPv6(src="b::2", dst=dst, hlim=20)
        f = frame_from(k, CLIENT, ip / UDP(sport=40014, dport=9) / b"anyone?")
        router_errors(k, s, CLIENT, f)
        same_conns(k, s, "udp", family)  # confirmed on input: it stays


@pytest.mark.parametrize("flags,dst", [("S", "10.0.0.3"), ("PA", "192.168.0.1")], ids=["syn", "ack-data"])
def test_tcp_to_the_router_gets_a_reset(can_run, flags, dst):
    k, s = worlds(MASQ4)
    with k:
        f = frame_from(k, CLIENT, IP(src="10.0.0.2", dst=dst, tos=0x2B) /
                       TCP(sport=40015, dport=22, flags=flags, seq=1000, ack=77 if "A" in flags else 0) /
                       (b"x" if "A" in flags else b""))
        got = k.exchange_all(CLIENT, f)
        fwd, back = s.exchange_all(CLIENT, f)
        assert (len(got[SERVER]), len(fwd)) == (0, 0), "nothing forwarded"
        assert (len(got[CLIENT]), len(back)) == (1, 1), f"resets: kernel {len(got[CLIENT])}, shardct {len(back)}"
        compare(got[CLIENT], back)
        same_conns(k, s, "tcp")


@pytest.mark.parametrize("family,dst", [(4, "10.0.0.3"), (6, "b::1")])
def test_ttl1_to_the_router_is_delivered_not_expired(can_run, family, dst):
    """The hop is ip_forward's: a TTL / hop limit 1 datagram for the router itself is
    delivered (port unreachable here), not answered with time-exceeded."""
    k, s = worlds(MASQ4 if family == 4 else MASQ6, family=family)
    with k:
        ip = IP(src="10.0.0.2", dst=dst, ttl=1) if family == 4 else IPv6(src="b::2", dst=dst, hlim=1)
        f = frame_from(k, CLIENT, ip / UDP(sport=40016, dport=9) / b"one hop")
        router_errors(k, s, CLIENT, f)
        same_conns(k, s, "udp", family)


@pytest.mark.parametrize("family,dst", [(4, "10.0.0.3"), (4, "192.168.0.1"), (6, "b::1")])
def test_ping_to_the_router_gets_an_echo_reply(can_run, family, dst):
    """An echo request to one of the router's addresses: the kernel answers (icmp_echo /
    icmpv6_echo_reply); shardct's reply matches it in every field but the IPv4 id, its
    ICMP message byte for byte, and both tables hold the echo conn."""
    from scapy.layers.inet6 import ICMPv6EchoRequest
    k, s = worlds(MASQ4 if family == 4 else MASQ6, family=family)
    with k:
        if family == 4:
            pkt = IP(src="10.0.0.2", dst=dst, tos=0x10) / ICMP(type=8, id=0x4321, seq=5) / b"ping?"
        else:
            pkt = IPv6(src="b::2", dst=dst) / ICMPv6EchoRequest(id=0x4321, seq=5, data=b"ping?")
        f = frame_from(k, CLIENT, pkt)
        got = k.exchange_all(CLIENT, f)
        fwd, back = s.exchange_all(CLIENT, f)
        assert (len(got[SERVER]), len(fwd)) == (0, 0), "nothing forwarded"
        assert (len(got[CLIENT]), len(back)) == (1, 1), \
            f"replies: kernel {len(got[CLIENT])}, shardct {len(back)}"
        same_error(got[CLIENT][0], back[0])
        same_conns(k, s, "icmp" if family == 4 else "icmpv6", family)


def test_timestamp_request_to_the_router_gets_a_timestamp_reply(can_run):
    """icmp_timestamp: both answer with one reply of the same shape (addresses, TTL, TOS,
    flags, type 14, ident, sequence, originate time, length); the receive and transmit
    times are each router's clock, so they are only checked to be equal to each other."""
    k, s = worlds(MASQ4)
    with k:
        f = frame_from(k, CLIENT, IP(src="10.0.0.2", dst="10.0.0.3") /
                       ICMP(type=13, id=0x99, seq=4, ts_ori=4242, ts_rx=0, ts_tx=0))
        got = k.exchange_all(CLIENT, f)
        fwd, back = s.exchange_all(CLIENT, f)
        assert (len(got[SERVER]), len(fwd)) == (0, 0), "nothing forwarded"
        assert (len(got[CLIENT]), len(back)) == (1, 1), \
            f"replies: kernel {len(got[CLIENT])}, shardct {len(back)}"

        def shape(frame):
            p = l3(frame)
            i = p[ICMP]
            return (p.src, p.dst, p.ttl, p.tos, int(p.flags), p.len, i.type, i.code, i.id,
                    i.seq, i.ts_ori, i.ts_rx == i.ts_tx, checksums_valid(frame))
        assert shape(got[CLIENT][0]) == shape(back[0]), \
            f"\nkernel  {shape(got[CLIENT][0])}\nshardct {shape(back[0])}"
        same_conns(k, s, "icmp")
