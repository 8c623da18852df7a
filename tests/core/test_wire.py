"""Frame parsing (wire.parse_batch): a table-driven corpus checked against scapy's own
dissection, every INVALID reason, padding, validate=False, truncation sweeps and
hypothesis properties (arbitrary bytes and mutations never raise, never read past the
frame, and give consistent offsets).

Expected classes follow Linux conntrack's tcp_error / udp_error / icmp_error and gVisor
getTupleID (reference/linux-netfilter.md §1.1, §1.4, §1.5; gvisor-conntrack.md §2.2).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, Raw, raw
from scapy.layers.inet import IPerror, IPOption_NOP, IPOption_Router_Alert, IPOption_Timestamp, fragment
from scapy.layers.inet6 import (ICMPv6DestUnreach, IPerror6, PadN, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6MLQuery, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA,
                                ICMPv6ND_RS, ICMPv6PacketTooBig, ICMPv6ParamProblem,
                                ICMPv6TimeExceeded, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, fragment6)
from scapy.layers.l2 import GRE, Dot1AD

from shardct import PacketBatch, wire
from shardct.hashing import words_addr
from shardct.wire import (CLS_INVALID, CLS_NOTIP, CLS_RELATED, CLS_TRACK, CLS_UNTRACKED,
                          CLASS_NAMES, REASON_NAMES)

E = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
A4, B4, R4 = "10.0.0.1", "10.0.0.2", "10.0.0.254"
A6, B6, R6 = "b::2", "c::3", "b::1"
EXT6 = (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment)

COLS = {
    "cls": wire.M_CLS, "reason": wire.M_REASON, "ipver": wire.M_IPVER, "proto": wire.M_PROTO,
    "ports": wire.M_PORTS, "l3": wire.M_L3, "l4": wire.M_L4, "l3len": wire.M_L3LEN,
    "l4len": wire.M_L4LEN, "flags": wire.M_TFLAGS, "seq": wire.M_SEQ, "ack": wire.M_ACK,
    "win": wire.M_WIN, "wscale": wire.M_WSCALE, "sackperm": wire.M_SACKPERM,
    "paylen": wire.M_PAYLEN, "icmptype": wire.M_ICMPTYPE, "inner_l3": wire.M_INNER_L3,
    "inner_l4": wire.M_INNER_L4, "frag": wire.M_FRAG, "echo": wire.M_ECHO,
    "inner_proto": wire.M_INNER_PROTO,
}


# ---------------------------------------------------------------- helpers

def parse_rows(frames, validate=True):
    b = PacketBatch.from_frames(frames)
    meta, addr = wire.new_meta(len(b))
    wire.parse_batch(b.buf, b.off, b.length, meta, addr, validate)
    return meta, addr


def parsed(frame: bytes, validate=True) -> dict:
    """One frame's parse as a dict of named fields (+ src/dst addresses)."""
    meta, addr = parse_rows([frame], validate)
    d = {k: int(meta[0, c]) for k, c in COLS.items()}
    ver = d["ipver"]
    if ver in (4, 6) and d["cls"] in (CLS_TRACK, CLS_RELATED):
        d["src"] = ipaddress.ip_address(words_addr(int(addr[0, 0]), int(addr[0, 1]), ver))
        d["dst"] = ipaddress.ip_address(words_addr(int(addr[0, 2]), int(addr[0, 3]), ver))
    return d


def names(d: dict) -> tuple[str, str]:
    return CLASS_NAMES[d["cls"]], REASON_NAMES[d["reason"]]


def off_in(root_len: int, layer) -> int:
    """Offset of a scapy layer in a frame of root_len bytes (padding stays in the tail)."""
    return root_len - len(raw(layer))


def walk_l4(l3):
    """(l4 layer, protocol number) after an IP/IPv6 header and any IPv6 extension headers."""
    if isinstance(l3, IPv6):
        nh, cur = l3.nh, l3.payload
        while isinstance(cur, EXT6):
            nh, cur = cur.nh, cur.payload
        return cur, nh
    return l3.payload, l3.proto


def outer_ip(pkt):
    """The first IP/IPv6 layer under Ethernet and VLAN tags."""
    cur = pkt.payload
    while not isinstance(cur, (IP, IPv6)):
        cur = cur.payload
    return cur


# ICMP queries Linux tracks (nf_conntrack_proto_icmp{,v6}.c invmap), type -> the tuple's
# key: 0 for echo, else the request's type
Q_REQ = {8: 0, 13: 13, 15: 15, 17: 17, 128: 0}
Q_REP = {0: 0, 14: 13, 16: 15, 18: 17, 129: 0}


def scapy_view(frame: bytes) -> dict:
    """What scapy's own dissection says the parser should report for a tracked/related frame."""
    pkt = Ether(frame)
    n = len(frame)
    l3 = outer_ip(pkt)
    ver = 6 if isinstance(l3, IPv6) else 4
    l3off = off_in(n, l3)
    l3len = l3.len if ver == 4 else 40 + l3.plen
    l4, proto = walk_l4(l3)
    l4off = off_in(n, l4)
    v = {"ipver": ver, "l3": l3off, "l4": l4off, "l3len": l3len, "l4len": l3len - (l4off - l3off),
         "proto": proto, "src": ipaddress.ip_address(l3.src), "dst": ipaddress.ip_address(l3.dst)}
    if proto == 6:
        fl = int(l4.flags)
        syn = bool(fl & 0x02)
        ws, sp = -1, 0
        if syn:
            for name, val in l4.options:
                if name == "WScale":
                    ws = min(int(val), 14)
                if name == "SAckOK":
                    sp = 1
        v.update(ports=(l4.sport << 16) | l4.dport, seq=l4.seq, ack=l4.ack, flags=fl,
                 win=l4.window, wscale=ws, sackperm=sp,
                 paylen=len(l4[Raw].load) if l4.haslayer(Raw) else 0)
    elif proto == 17:
        v.update(ports=(l4.sport << 16) | l4.dport)
    elif proto in (1, 58):
        ty = l4.type
        v["icmptype"] = ty
        if ty in Q_REQ:
            v.update(ports=(l4.id << 16) | Q_REQ[ty], echo=1)
        elif ty in Q_REP:
            v.update(ports=(Q_REP[ty] << 16) | l4.id, echo=2)
        else:
            # an error: the tuple is the quoted packet's, inverted
            qbytes = raw(l4.payload)
            q = IPerror(qbytes) if ver == 4 else IPerror6(qbytes)
            ql4, qproto = walk_l4(q)
            il3 = off_in(n, l4.payload)
            il4 = il3 + len(qbytes) - len(raw(ql4))
            v.update(src=ipaddress.ip_address(q.dst), dst=ipaddress.ip_address(q.src),
                     proto=qproto, inner_proto=qproto, inner_l3=il3, inner_l4=il4)
            if qproto in (6, 17):
                if hasattr(ql4, "sport"):
                    qs, qd = ql4.sport, ql4.dport
                else:       # scapy left a cut header as Raw: the ports are its first 4 bytes
                    qs, qd = int.from_bytes(raw(ql4)[0:2], "big"), int.from_bytes(raw(ql4)[2:4], "big")
                v["ports"] = (qd << 16) | qs
            elif qproto in (1, 58):
                qty = ql4.type
                v["ports"] = ((Q_REQ[qty] << 16) | ql4.id if qty in Q_REQ
                              else (ql4.id << 16) | Q_REP[qty])
            else:
                v["ports"] = 0
    else:
        v["ports"] = 0
    return v


def diff(got: dict, want: dict) -> list[str]:
    return [f"{k}: got {got.get(k)!r}, want {w!r}" for k, w in want.items() if got.get(k) != w]


def bad_l4_checksum(pkt, layer, fieldname="chksum"):
    """The frame of pkt with layer's checksum off by one bit pattern (never accidentally right)."""
    good = Ether(raw(pkt))[layer]
    p = pkt.copy()
    setattr(p[layer], fieldname, getattr(good, fieldname) ^ 0x5A5A)
    return raw(p)


# ---------------------------------------------------------------- the corpus

def v4(l4, **ipkw):
    return E / IP(src=A4, dst=B4, **ipkw) / l4


def v6(l4, **ipkw):
    return E / IPv6(src=A6, dst=B6, **ipkw) / l4


SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (12345, 0)), ("NOP", None),
            ("WScale", 7)]
TCP_SYN = TCP(sport=40000, dport=80, flags="S", seq=1000, window=64240, options=SYN_OPTS)
TCP_DATA = TCP(sport=40000, dport=80, flags="PA", seq=0x80000001, ack=0xFFFFFFF0,
               window=502) / (b"d" * 37)
UDP_DNS = UDP(sport=5353, dport=53) / b"query"


def quote(q, cut=None):
    """Bytes of an original packet as an ICMP error quotes it (optionally cut)."""
    b = raw(q)
    return b if cut is None else b[:cut]


def err4(ty, code, q, cut=None, **kw):
    return E / IP(src=R4, dst=A4) / ICMP(type=ty, code=code, **kw) / Raw(quote(q, cut))


def err6(cls, q, cut=None, **kw):
    return E / IPv6(src=R6, dst=A6) / cls(**kw) / Raw(quote(q, cut))


# the packets an error may quote: sent A -> B
Q4 = {
    "tcp": IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="S", seq=7),
    "udp": IP(src=A4, dst=B4) / UDP(sport=5353, dport=53) / b"abcdefgh",
    "echo": IP(src=A4, dst=B4) / ICMP(type=8, id=0x4242, seq=3) / b"ping",
}
Q6 = {
    "tcp": IPv6(src=A6, dst=B6) / TCP(sport=40000, dport=80, flags="S", seq=7),
    "udp": IPv6(src=A6, dst=B6) / UDP(sport=5353, dport=53) / b"abcdefgh",
    "echo": IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=0x4242, seq=3) / b"ping",
}
ERR4 = [(3, 3), (11, 0), (12, 0), (4, 0), (5, 1)]
ERR6 = [(1, ICMPv6DestUnreach, {}), (2, ICMPv6PacketTooBig, {"mtu": 1280}),
        (3, ICMPv6TimeExceeded, {}), (4, ICMPv6ParamProblem, {"ptr": 6})]


@dataclass
class Case:
    name: str
    pkt: object                       # scapy packet or bytes
    cls: int
    reason: int = 0
    extra: dict = field(default_factory=dict)   # fields asserted besides scapy's view

    @property
    def frame(self) -> bytes:
        return self.pkt if isinstance(self.pkt, bytes) else raw(self.pkt)


def tracked_cases() -> list[Case]:
    c = [
        Case("eth-ipv4-tcp-syn-options", v4(TCP_SYN), CLS_TRACK,
             extra={"wscale": 7, "sackperm": 1, "paylen": 0, "frag": 0}),
        Case("eth-ipv4-tcp-data", v4(TCP_DATA), CLS_TRACK, extra={"paylen": 37, "wscale": -1}),
        Case("tcp-syn-wscale-clamped-to-14",
             v4(TCP(sport=1, dport=2, flags="S", options=[("WScale", 20)])), CLS_TRACK,
             extra={"wscale": 14, "sackperm": 0}),
        Case("tcp-synack-options", v4(TCP(sport=80, dport=40000, flags="SA", seq=5, ack=1001,
                                          options=[("NOP", None), ("WScale", 3), ("SAckOK", b"")])),
             CLS_TRACK, extra={"wscale": 3, "sackperm": 1}),
        Case("tcp-ack-wscale-option-ignored",
             v4(TCP(sport=1, dport=2, flags="A", options=[("WScale", 5)])), CLS_TRACK,
             extra={"wscale": -1}),
        Case("dot1q-ipv4-udp", E / Dot1Q(vlan=10) / IP(src=A4, dst=B4) / UDP_DNS, CLS_TRACK,
             extra={"l3": 18}),
        Case("qinq-88a8-ipv4-tcp", E / Dot1AD(vlan=100) / Dot1Q(vlan=10) / IP(src=A4, dst=B4)
             / TCP_DATA, CLS_TRACK, extra={"l3": 22}),
        Case("qinq-8100-8100-ipv6-udp", E / Dot1Q(vlan=100) / Dot1Q(vlan=10)
             / IPv6(src=A6, dst=B6) / UDP_DNS, CLS_TRACK, extra={"l3": 22}),
        Case("ipv4-options-tcp", E / IP(src=A4, dst=B4, options=[IPOption_Router_Alert(),
                                                                   IPOption_NOP(), IPOption_NOP(),
                                                                   IPOption_NOP(), IPOption_NOP()])
             / TCP_SYN, CLS_TRACK, extra={"l4": 14 + 28}),
        Case("ipv4-options-udp-timestamp", E / IP(src=A4, dst=B4,
                                                   options=[IPOption_Timestamp(flg=0, timestamp=[1, 2])])
             / UDP_DNS, CLS_TRACK),
        Case("ipv4-df-not-a-fragment", v4(UDP_DNS, flags="DF"), CLS_TRACK, extra={"frag": 0}),
        Case("ipv4-first-fragment-tcp", v4(TCP_DATA, flags="MF", id=9), CLS_TRACK,
             extra={"frag": 1}),
        Case("ipv4-non-first-fragment", E / IP(src=A4, dst=B4, frag=100, proto=17) / Raw(b"x" * 40),
             CLS_UNTRACKED, wire.REASON_FRAGMENT),
        Case("ipv4-last-fragment", E / IP(src=A4, dst=B4, frag=5, flags=0, proto=6) / Raw(b"y" * 24),
             CLS_UNTRACKED, wire.REASON_FRAGMENT),
        Case("ipv6-tcp", v6(TCP_SYN), CLS_TRACK, extra={"wscale": 7}),
        Case("ipv6-udp", v6(UDP_DNS), CLS_TRACK),
        Case("ipv6-hbh-routing-destopt-tcp",
             v6(IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["d::1"], segleft=0) / IPv6ExtHdrDestOpt()
                / TCP_DATA), CLS_TRACK, extra={"paylen": 37}),
        Case("ipv6-destopt-udp", v6(IPv6ExtHdrDestOpt() / UDP_DNS), CLS_TRACK),
        Case("ipv6-first-fragment-tcp",
             v6(IPv6ExtHdrFragment(offset=0, m=1, id=77) / TCP_DATA), CLS_TRACK, extra={"frag": 1}),
        Case("ipv6-non-first-fragment",
             v6(IPv6ExtHdrFragment(offset=185, m=1, id=77, nh=6) / Raw(b"z" * 48)),
             CLS_UNTRACKED, wire.REASON_FRAGMENT),
        Case("ipv6-last-fragment-after-hbh",
             v6(IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(offset=3, m=0, id=1, nh=17) / Raw(b"q" * 8)),
             CLS_UNTRACKED, wire.REASON_FRAGMENT),
        Case("ipv6-no-next-header", v6(Raw(b""), nh=59), CLS_UNTRACKED, wire.REASON_NOT_TRACKED),
        Case("ipv4-udp-zero-checksum", v4(UDP(sport=5353, dport=53, chksum=0) / b"query"),
             CLS_TRACK),
        Case("ipv4-icmp-echo-request", v4(ICMP(type=8, id=0x1234, seq=1) / b"ping"), CLS_TRACK,
             extra={"ports": 0x1234 << 16, "echo": 1}),
        Case("ipv4-icmp-echo-reply", E / IP(src=B4, dst=A4) / ICMP(type=0, id=0x1234, seq=1) / b"ping",
             CLS_TRACK, extra={"ports": 0x1234, "echo": 2}),
        Case("ipv6-icmp-echo-request", v6(ICMPv6EchoRequest(id=0xBEEF, seq=9) / b"ping"), CLS_TRACK,
             extra={"ports": 0xBEEF << 16, "echo": 1, "proto": 58}),
        Case("ipv6-icmp-echo-reply", E / IPv6(src=B6, dst=A6) / ICMPv6EchoReply(id=0xBEEF, seq=9),
             CLS_TRACK, extra={"ports": 0xBEEF, "echo": 2}),
        Case("ipv6-neighbour-solicitation", E / IPv6(src=A6, dst="ff02::1:ff00:3", hlim=255)
             / ICMPv6ND_NS(tgt=B6), CLS_UNTRACKED, wire.REASON_NOT_TRACKED),
        Case("ipv6-neighbour-advertisement", E / IPv6(src=B6, dst=A6, hlim=255)
             / ICMPv6ND_NA(tgt=B6), CLS_UNTRACKED, wire.REASON_NOT_TRACKED),
        Case("ipv6-router-solicitation", E / IPv6(src=A6, dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
             CLS_UNTRACKED, wire.REASON_NOT_TRACKED),
        Case("ipv6-router-advertisement", E / IPv6(src="fe80::1", dst="ff02::1", hlim=255)
             / ICMPv6ND_RA(), CLS_UNTRACKED, wire.REASON_NOT_TRACKED),
        Case("ipv6-mld-query", E / IPv6(src="fe80::1", dst="ff02::1", hlim=1) / ICMPv6MLQuery(),
             CLS_UNTRACKED, wire.REASON_NOT_TRACKED),
        # timestamp, information and address mask are tracked like echo (Linux invmap);
        # the request's type is the tuple's key
        Case("ipv4-icmp-timestamp-request", v4(ICMP(type=13, id=0x0102)), CLS_TRACK,
             extra={"ports": (0x0102 << 16) | 13, "echo": 1}),
        Case("ipv4-icmp-timestamp-reply", v4(ICMP(type=14, id=0x0102)), CLS_TRACK,
             extra={"ports": (13 << 16) | 0x0102, "echo": 2}),
        Case("ipv4-icmp-info-request", v4(ICMP(type=15, id=7)), CLS_TRACK,
             extra={"ports": (7 << 16) | 15, "echo": 1}),
        Case("ipv4-icmp-info-reply", v4(ICMP(type=16, id=7)), CLS_TRACK,
             extra={"ports": (15 << 16) | 7, "echo": 2}),
        Case("ipv4-icmp-mask-request", v4(ICMP(type=17, id=9) / (b"\0" * 4)), CLS_TRACK,
             extra={"ports": (9 << 16) | 17, "echo": 1}),
        Case("ipv4-icmp-mask-reply", v4(ICMP(type=18, id=9) / (b"\xff" * 4)), CLS_TRACK,
             extra={"ports": (17 << 16) | 9, "echo": 2}),
        Case("ipv4-icmp-router-solicitation-untracked", v4(ICMP(type=10)), CLS_UNTRACKED,
             wire.REASON_NOT_TRACKED),
        Case("arp", E / ARP(op=1, hwsrc="02:00:00:00:00:02", psrc=A4, pdst=B4,
                            hwdst="00:00:00:00:00:00"), CLS_NOTIP),
        Case("lldp-ethertype", Ether(dst="01:80:c2:00:00:0e", src="02:00:00:00:00:02", type=0x88CC)
             / Raw(b"\x02\x07\x04" + b"\0" * 40), CLS_NOTIP),
        Case("ipv4-gre", v4(GRE() / IP(src="1.1.1.1", dst="2.2.2.2")), CLS_TRACK,
             extra={"proto": 47, "ports": 0}),
        Case("ipv6-sctp-generic", v6(Raw(b"\x00\x01\x00\x02" + b"\0" * 12), nh=132), CLS_TRACK,
             extra={"proto": 132, "ports": 0}),
        Case("ipv6-hbh-then-gre", v6(IPv6ExtHdrHopByHop() / GRE() / IP(src="1.1.1.1", dst="2.2.2.2")),
             CLS_TRACK, extra={"proto": 47, "ports": 0}),
    ]
    # ICMP errors: every error type quoting TCP, UDP and an echo request
    for ty, code in ERR4:
        for k, q in Q4.items():
            c.append(Case(f"icmp4-error-{ty}-quoting-{k}", err4(ty, code, q), CLS_RELATED,
                          extra={"icmptype": ty, "src": ipaddress.ip_address(B4),
                                 "dst": ipaddress.ip_address(A4)}))
    for ty, cls, kw in ERR6:
        for k, q in Q6.items():
            c.append(Case(f"icmp6-error-{ty}-quoting-{k}", err6(cls, q, **kw), CLS_RELATED,
                          extra={"icmptype": ty, "src": ipaddress.ip_address(B6),
                                 "dst": ipaddress.ip_address(A6)}))
    c += [
        Case("icmp4-error-rfc792-quote-ip-plus-8", err4(3, 1, Q4["tcp"], cut=28), CLS_RELATED,
             extra={"ports": (80 << 16) | 40000, "proto": 6}),
        Case("icmp6-error-quote-ip-plus-8", err6(ICMPv6DestUnreach, Q6["tcp"], cut=48), CLS_RELATED,
             extra={"ports": (80 << 16) | 40000, "proto": 6}),
        Case("icmp4-error-quoting-echo-reply",
             err4(3, 3, IP(src=A4, dst=B4) / ICMP(type=0, id=0x77)), CLS_RELATED,
             extra={"ports": 0x77 << 16, "proto": 1}),
        Case("icmp6-error-quoting-echo-reply",
             err6(ICMPv6DestUnreach, IPv6(src=A6, dst=B6) / ICMPv6EchoReply(id=0x77)), CLS_RELATED,
             extra={"ports": 0x77 << 16, "proto": 58}),
        Case("icmp4-error-quoting-ipv4-with-options",
             err4(11, 0, IP(src=A4, dst=B4, options=[IPOption_Router_Alert()]) / UDP_DNS),
             CLS_RELATED, extra={"ports": (53 << 16) | 5353, "proto": 17}),
        Case("icmp6-error-quoting-ipv6-with-ext-headers",
             err6(ICMPv6TimeExceeded, IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop()
                  / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=443, flags="A")),
             CLS_RELATED, extra={"ports": (443 << 16) | 40000, "proto": 6}),
        Case("icmp4-error-quote-cut-inside-tcp", err4(3, 3, Q4["tcp"], cut=24), CLS_INVALID,
             wire.REASON_ICMP_INNER),
        Case("icmp4-error-quote-cut-inside-udp", err4(3, 3, Q4["udp"], cut=27), CLS_INVALID,
             wire.REASON_ICMP_INNER),
        Case("icmp4-error-quote-cut-inside-icmp", err4(3, 3, Q4["echo"], cut=26), CLS_INVALID,
             wire.REASON_ICMP_INNER),
        Case("icmp6-error-quote-cut-inside-udp", err6(ICMPv6DestUnreach, Q6["udp"], cut=44),
             CLS_INVALID, wire.REASON_ICMP_INNER),
        Case("icmp4-error-quote-cut-inside-ip-header", err4(3, 3, Q4["tcp"], cut=12), CLS_INVALID,
             wire.REASON_ICMP_INNER),
        Case("icmp6-error-quote-cut-inside-ipv6-header",
             err6(ICMPv6DestUnreach, Q6["tcp"], cut=30), CLS_INVALID, wire.REASON_ICMP_INNER),
        Case("icmp4-error-quoting-ipv6", err4(3, 3, Q6["udp"]), CLS_INVALID, wire.REASON_ICMP_INNER),
        Case("icmp4-error-quoting-error", err4(3, 3, IP(src=A4, dst=B4) / ICMP(type=3) / Raw(b"\0" * 28)),
             CLS_INVALID, wire.REASON_ICMP_INNER),
        Case("icmp4-error-quoting-non-first-fragment",
             err4(3, 4, IP(src=A4, dst=B4, frag=10, proto=17) / Raw(b"\0" * 16)),
             CLS_INVALID, wire.REASON_ICMP_INNER),
    ]
    return c


def invalid_cases() -> list[Case]:
    tcp_v4 = raw(v4(TCP_DATA))
    c = [
        Case("frame-shorter-than-ethernet", raw(E)[:13], CLS_INVALID, wire.REASON_SHORT_L2),
        Case("empty-frame", b"", CLS_INVALID, wire.REASON_SHORT_L2),
        Case("vlan-tag-truncated", raw(E / Dot1Q(vlan=3))[:16], CLS_INVALID, wire.REASON_SHORT_L2),
        Case("ethernet-only-ipv4-ethertype", raw(Ether(dst="02:00:00:00:00:01",
                                                       src="02:00:00:00:00:02", type=0x0800)),
             CLS_INVALID, wire.REASON_IP_HDR),
        Case("bad-ip-version-5", raw(E)[:12] + b"\x08\x00" + bytes([0x55]) + tcp_v4[15:],
             CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv6-inside-ipv4-ethertype", raw(E)[:12] + b"\x08\x00" + raw(IPv6(src=A6, dst=B6) / UDP_DNS),
             CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv4-inside-ipv6-ethertype", raw(E)[:12] + b"\x86\xdd" + raw(IP(src=A4, dst=B4) / UDP_DNS),
             CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv4-ihl-4", v4(TCP_DATA, ihl=4), CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv4-ihl-past-frame", raw(v4(UDP_DNS, ihl=15)), CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv4-total-length-below-ihl", v4(UDP_DNS, len=12), CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv6-header-truncated", raw(v6(UDP_DNS))[:14 + 39], CLS_INVALID, wire.REASON_IP_HDR),
        Case("ipv4-total-length-past-frame", v4(TCP_DATA, len=1000), CLS_INVALID, wire.REASON_IP_LEN),
        Case("ipv6-payload-length-past-frame", v6(UDP_DNS, plen=500), CLS_INVALID, wire.REASON_IP_LEN),
        Case("ipv4-bad-header-checksum", v4(TCP_DATA, chksum=0x1234), CLS_INVALID, wire.REASON_IP_CSUM),
        Case("ipv4-tcp-header-truncated", v4(Raw(raw(TCP(sport=1, dport=2))[:19]), proto=6),
             CLS_INVALID, wire.REASON_L4_SHORT),
        Case("ipv6-tcp-header-truncated", v6(Raw(raw(TCP(sport=1, dport=2))[:10]), nh=6),
             CLS_INVALID, wire.REASON_L4_SHORT),
        Case("ipv4-udp-header-truncated", v4(Raw(b"\x00\x35\x00\x35\x00"), proto=17),
             CLS_INVALID, wire.REASON_L4_SHORT),
        Case("ipv4-icmp-header-truncated", v4(Raw(b"\x08\x00\xf7\xff"), proto=1),
             CLS_INVALID, wire.REASON_L4_SHORT),
        Case("ipv6-icmp-header-truncated", v6(Raw(b"\x80\x00\x00\x00\x01"), nh=58),
             CLS_INVALID, wire.REASON_L4_SHORT),
        Case("tcp-data-offset-4", v4(TCP(sport=1, dport=2, flags="A", dataofs=4) / b"abcd"),
             CLS_INVALID, wire.REASON_TCP_DOFF),
        Case("tcp-data-offset-0", v4(TCP(sport=1, dport=2, flags="A", dataofs=0)),
             CLS_INVALID, wire.REASON_TCP_DOFF),
        Case("tcp-data-offset-past-segment", v4(TCP(sport=1, dport=2, flags="A", dataofs=15) / b"abcd"),
             CLS_INVALID, wire.REASON_TCP_DOFF),
        Case("tcp-syn-fin", v4(TCP(sport=1, dport=2, flags="SF")), CLS_INVALID, wire.REASON_TCP_FLAGS),
        Case("tcp-null", v4(TCP(sport=1, dport=2, flags=0)), CLS_INVALID, wire.REASON_TCP_FLAGS),
        Case("tcp-syn-rst", v4(TCP(sport=1, dport=2, flags="SR")), CLS_INVALID, wire.REASON_TCP_FLAGS),
        Case("tcp-fin-alone", v4(TCP(sport=1, dport=2, flags="F")), CLS_INVALID, wire.REASON_TCP_FLAGS),
        Case("tcp-xmas", v4(TCP(sport=1, dport=2, flags="FSRPAUEC")), CLS_INVALID, wire.REASON_TCP_FLAGS),
        Case("ipv6-tcp-syn-fin", v6(TCP(sport=1, dport=2, flags="SF")), CLS_INVALID,
             wire.REASON_TCP_FLAGS),
        Case("ipv4-tcp-bad-checksum", bad_l4_checksum(v4(TCP_DATA), TCP), CLS_INVALID,
             wire.REASON_L4_CSUM),
        Case("ipv6-tcp-bad-checksum", bad_l4_checksum(v6(TCP_SYN), TCP), CLS_INVALID,
             wire.REASON_L4_CSUM),
        Case("ipv4-udp-bad-checksum", bad_l4_checksum(v4(UDP_DNS), UDP), CLS_INVALID,
             wire.REASON_L4_CSUM),
        Case("ipv6-udp-bad-checksum", bad_l4_checksum(v6(UDP_DNS), UDP), CLS_INVALID,
             wire.REASON_L4_CSUM),
        Case("ipv6-udp-zero-checksum", v6(UDP(sport=5353, dport=53, chksum=0) / b"query"),
             CLS_INVALID, wire.REASON_L4_CSUM),
        Case("ipv4-icmp-bad-checksum", bad_l4_checksum(v4(ICMP(type=8, id=1) / b"x"), ICMP),
             CLS_INVALID, wire.REASON_L4_CSUM),
        Case("ipv4-icmp-error-bad-checksum", bad_l4_checksum(err4(3, 3, Q4["udp"]), ICMP),
             CLS_INVALID, wire.REASON_L4_CSUM),
        Case("ipv6-icmp-bad-checksum", bad_l4_checksum(v6(ICMPv6EchoRequest(id=1)), ICMPv6EchoRequest,
                                                       "cksum"), CLS_INVALID, wire.REASON_L4_CSUM),
        Case("ipv6-icmp-error-bad-checksum",
             bad_l4_checksum(err6(ICMPv6DestUnreach, Q6["tcp"]), ICMPv6DestUnreach, "cksum"),
             CLS_INVALID, wire.REASON_L4_CSUM),
        Case("udp-length-too-large", v4(UDP(sport=5353, dport=53, len=100) / b"query"),
             CLS_INVALID, wire.REASON_UDP_LEN),
        Case("udp-length-too-small", v4(UDP(sport=5353, dport=53, len=7) / b"query"),
             CLS_INVALID, wire.REASON_UDP_LEN),
        Case("udp-length-zero", v4(UDP(sport=5353, dport=53, len=0) / b"query"),
             CLS_INVALID, wire.REASON_UDP_LEN),
        Case("ipv6-udp-length-too-large", v6(UDP(sport=5353, dport=53, len=14) / b"query"),
             CLS_INVALID, wire.REASON_UDP_LEN),
        Case("ipv6-ext-header-truncated",
             raw(E / IPv6(src=A6, dst=B6, nh=0, plen=4)) + b"\x06\x00\x00\x00",
             CLS_INVALID, wire.REASON_EXT_HDR),
        Case("ipv6-ext-header-chain-too-long",
             v6(IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                / IPv6ExtHdrDestOpt() / UDP_DNS),
             CLS_INVALID, wire.REASON_EXT_HDR),
    ]
    for ty in (19, 40, 128, 255):
        c.append(Case(f"icmp4-type-{ty}", v4(ICMP(type=ty, code=0) / (b"\0" * 8)), CLS_INVALID,
                      wire.REASON_ICMP_TYPE))
    for ty in (0, 5, 100, 127):
        c.append(Case(f"icmp6-error-type-{ty}", v6(Raw(bytes([ty]) + b"\0" * 7), nh=58),
                      CLS_INVALID, wire.REASON_ICMP_TYPE))
    return c


def _fix_icmp6_checksums(cases):
    # raw ICMPv6 frames above carry a zero checksum; put a right one in
    out = []
    for cs in cases:
        if cs.name.startswith("icmp6-error-type-"):
            p = Ether(cs.frame)
            body = raw(p[IPv6].payload)
            from scapy.layers.inet6 import in6_chksum
            ck = in6_chksum(58, p[IPv6], body)
            body = body[:2] + ck.to_bytes(2, "big") + body[4:]
            cs = Case(cs.name, raw(p)[:14 + 40] + body, cs.cls, cs.reason, cs.extra)
        out.append(cs)
    return out


TRACKED = tracked_cases()
INVALID = _fix_icmp6_checksums(invalid_cases())
CORPUS = TRACKED + INVALID


# ---------------------------------------------------------------- corpus tests

@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_class_and_reason(case):
    got = names(parsed(case.frame))
    want = (CLASS_NAMES[case.cls], REASON_NAMES[case.reason])
    assert got == want, f"{case.name}: got {got!r}, want {want!r}"


@pytest.mark.parametrize("case", [c for c in TRACKED if c.cls in (CLS_TRACK, CLS_RELATED)],
                         ids=[c.name for c in TRACKED if c.cls in (CLS_TRACK, CLS_RELATED)])
def test_corpus_fields_match_scapy(case):
    got = parsed(case.frame)
    want = scapy_view(case.frame)
    want.update(case.extra)
    bad = diff(got, want)
    assert not bad, f"{case.name}: " + "; ".join(bad)


@pytest.mark.parametrize("case", [c for c in CORPUS if c.cls in (CLS_UNTRACKED, CLS_INVALID)
                                  and len(c.frame) >= 14 + 20
                                  and c.reason not in (wire.REASON_IP_HDR, wire.REASON_SHORT_L2)],
                         ids=lambda c: c.name)
def test_untracked_and_invalid_still_report_l3(case):
    """Past the IP header check the parser records the version and L3 offset."""
    got = parsed(case.frame)
    l3 = outer_ip(Ether(case.frame))
    want = {"ipver": 6 if isinstance(l3, IPv6) else 4, "l3": off_in(len(case.frame), l3)}
    bad = diff(got, want)
    assert not bad, f"{case.name}: " + "; ".join(bad)


def test_corpus_in_one_batch_equals_one_by_one():
    frames = [c.frame for c in CORPUS]
    meta, addr = parse_rows(frames)
    for i, c in enumerate(CORPUS):
        m1, a1 = parse_rows([c.frame])
        assert np.array_equal(meta[i], m1[0]), f"{c.name}: batch row got {meta[i].tolist()}, want {m1[0].tolist()}"
        assert np.array_equal(addr[i], a1[0]), f"{c.name}: batch addr got {addr[i].tolist()}, want {a1[0].tolist()}"


def test_parse_hash_batch_agrees_with_parse_batch():
    from shardct.hashing import hash_key
    frames = [c.frame for c in CORPUS]
    b = PacketBatch.from_frames(frames)
    meta, addr = wire.new_meta(len(b))
    hashes = np.zeros(len(b), dtype=np.int64)
    wire.parse_hash_batch(b.buf, b.off, b.length, meta, addr, True, 0xDEADBEEF, hashes)
    meta2, addr2 = parse_rows(frames)
    assert np.array_equal(meta, meta2), "parse_hash_batch meta differs from parse_batch"
    for i, c in enumerate(CORPUS):
        if meta[i, wire.M_CLS] in (CLS_TRACK, CLS_RELATED):
            want = int(hash_key(0xDEADBEEF, addr[i, 0], addr[i, 1], addr[i, 2], addr[i, 3],
                                meta[i, wire.M_PORTS], meta[i, wire.M_PROTO], meta[i, wire.M_IPVER]))
        else:
            want = -1
        assert int(hashes[i]) == want, f"{c.name}: hash got {int(hashes[i])}, want {want}"


# ---------------------------------------------------------------- TCP flags, exhaustively

# tcp_valid_flags[] (linux-netfilter.md §1.4), indexed by flags & ~(PSH|ECE|CWR)
LINUX_VALID = {0x02, 0x22, 0x12, 0x04, 0x14, 0x11, 0x31, 0x10, 0x30}


def test_tcp_valid_flag_list_passes():
    for name, fl in [("SYN", "S"), ("SYN+URG", "SU"), ("SYN+ACK", "SA"), ("RST", "R"),
                     ("RST+ACK", "RA"), ("FIN+ACK", "FA"), ("FIN+ACK+URG", "FAU"), ("ACK", "A"),
                     ("ACK+URG", "AU"), ("SYN+ECE+CWR", "SEC"), ("PSH+ACK", "PA"),
                     ("FIN+PSH+ACK", "FPA")]:
        got = names(parsed(raw(v4(TCP(sport=1, dport=2, flags=fl)))))
        want = ("track", "none")
        assert got == want, f"{name}: got {got!r}, want {want!r}"


def test_tcp_flags_every_byte():
    frames = [raw(v4(TCP(sport=1, dport=2, flags=f, seq=1, ack=1))) for f in range(256)]
    meta, _ = parse_rows(frames)
    for f in range(256):
        want = (CLS_TRACK, 0) if (f & 0x37) in LINUX_VALID else (CLS_INVALID, wire.REASON_TCP_FLAGS)
        got = (int(meta[f, wire.M_CLS]), int(meta[f, wire.M_REASON]))
        assert got == want, f"flags {f:#04x}: got {got!r}, want {want!r}"
        if got[0] == CLS_TRACK:
            assert int(meta[f, wire.M_TFLAGS]) == f, f"flags {f:#04x}: M_TFLAGS got {int(meta[f, wire.M_TFLAGS]):#x}"


# ---------------------------------------------------------------- padding, validate=False

@pytest.mark.parametrize("pkt", [v4(TCP_DATA), v4(UDP_DNS), v6(TCP_SYN), v6(UDP_DNS),
                                 v4(ICMP(type=8, id=5)), err4(3, 3, Q4["udp"], cut=28)],
                         ids=["v4-tcp", "v4-udp", "v6-tcp", "v6-udp", "v4-echo", "v4-icmp-error"])
def test_ethernet_padding_uses_ip_length(pkt):
    plain = raw(pkt)
    padded = plain + b"\xa5" * 32       # trailer bytes that would break checksums if counted
    got = parsed(padded)
    want = parsed(plain)
    assert got == want, f"padded: got {got!r}, want {want!r}"
    sv = scapy_view(padded)
    bad = diff(got, {k: sv[k] for k in ("l3len", "l4len", "l3", "l4")})
    assert not bad, "; ".join(bad)
    assert got["cls"] in (CLS_TRACK, CLS_RELATED), f"class got {CLASS_NAMES[got['cls']]}, want track/related"


def test_short_ipv4_frame_padded_to_60_bytes():
    f = raw(v4(UDP(sport=1, dport=2)))      # 42 bytes
    padded = f + b"\0" * (60 - len(f))
    got = parsed(padded)
    want = {"cls": CLS_TRACK, "l3len": 28, "l4len": 8, "ports": (1 << 16) | 2}
    bad = diff(got, want)
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("case", [c for c in INVALID if c.reason in (wire.REASON_IP_CSUM, wire.REASON_L4_CSUM)
                                  and "zero" not in c.name], ids=lambda c: c.name)
def test_validate_false_skips_checksums(case):
    got = names(parsed(case.frame, validate=False))
    want_cls = "related" if "error" in case.name else "track"
    assert got == (want_cls, "none"), f"{case.name} validate=False: got {got!r}, want ({want_cls!r}, 'none')"
    got_v = names(parsed(case.frame, validate=True))
    assert got_v[0] == "invalid", f"{case.name} validate=True: got {got_v!r}, want invalid"


def test_validate_false_keeps_structural_checks():
    for case in INVALID:
        if case.reason in (wire.REASON_IP_CSUM, wire.REASON_L4_CSUM):
            continue
        got = names(parsed(case.frame, validate=False))
        want = (CLASS_NAMES[case.cls], REASON_NAMES[case.reason])
        assert got == want, f"{case.name} validate=False: got {got!r}, want {want!r}"


# ---------------------------------------------------------------- fragments

def test_ipv4_first_fragment_udp_is_tracked():
    """A real first fragment of a large UDP datagram: the UDP length field covers the
    whole datagram, so it exceeds the fragment. The tuple is complete; the checksum and
    length cannot be checked on a fragment (M_FRAG = 1)."""
    frags = fragment(IP(src=A4, dst=B4) / UDP(sport=5353, dport=53) / (b"x" * 3000), 1400)
    got = parsed(raw(E / frags[0]))
    want = {"cls": CLS_TRACK, "reason": 0, "frag": 1, "ports": (5353 << 16) | 53, "proto": 17}
    bad = diff(got, want)
    assert not bad, "first IPv4 fragment of a UDP datagram: " + "; ".join(
        bad + [f"reason name {REASON_NAMES[got['reason']]}"])
    for f in frags[1:]:
        got = names(parsed(raw(E / f)))
        assert got == ("untracked", "fragment"), f"later fragment: got {got!r}, want ('untracked', 'fragment')"


def test_ipv6_first_fragment_udp_is_tracked():
    frags = fragment6(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment() / UDP(sport=5353, dport=53)
                      / (b"x" * 3000), 1280)
    got = parsed(raw(E / frags[0]))
    want = {"cls": CLS_TRACK, "reason": 0, "frag": 1, "ports": (5353 << 16) | 53, "proto": 17}
    bad = diff(got, want)
    assert not bad, "first IPv6 fragment of a UDP datagram: " + "; ".join(
        bad + [f"reason name {REASON_NAMES[got['reason']]}"])
    for f in frags[1:]:
        got = names(parsed(raw(E / f)))
        assert got == ("untracked", "fragment"), f"later fragment: got {got!r}, want ('untracked', 'fragment')"


def test_ipv4_first_fragment_skips_l4_checksum():
    # the checksum covers bytes not in this fragment: it must not be checked
    frags = fragment(IP(src=A4, dst=B4) / TCP(sport=1, dport=2, flags="A") / (b"x" * 3000), 1400)
    got = names(parsed(raw(E / frags[0])))
    assert got == ("track", "none"), f"got {got!r}, want ('track', 'none')"


# ---------------------------------------------------------------- IPv6 extension header past payload

def test_ipv6_ext_header_past_payload_length_is_invalid():
    """Extension headers that run past the IPv6 payload length (into Ethernet padding)
    cannot be walked: Linux trims the skb to the payload, ipv6_skip_exthdr fails."""
    f = raw(E / IPv6(src=A6, dst=B6, plen=8, nh=0)
            / IPv6ExtHdrHopByHop(nh=47, len=1, autopad=0,
                                 options=[PadN(optdata=b"\0" * 12)])
            / (b"\0" * 16))
    got = parsed(f)
    assert got["cls"] == CLS_INVALID, (f"got class {CLASS_NAMES[got['cls']]} reason {REASON_NAMES[got['reason']]} "
                                       f"l4len {got['l4len']}, want invalid/ext_header")
    assert got["reason"] == wire.REASON_EXT_HDR, f"reason got {REASON_NAMES[got['reason']]}, want ext_header"


# ---------------------------------------------------------------- truncation sweeps

SWEEP = {
    "v4-tcp-syn-opts": raw(v4(TCP_SYN)),
    "qinq-v4-tcp": raw(E / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IP(src=A4, dst=B4) / TCP_DATA),
    "v6-ext-tcp": raw(v6(IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["d::1"], segleft=0)
                         / IPv6ExtHdrDestOpt() / TCP_DATA)),
    "v4-icmp-error-tcp": raw(err4(3, 3, Q4["tcp"])),
    "v6-icmp-error-echo": raw(err6(ICMPv6DestUnreach, Q6["echo"])),
    "v4-options-udp": raw(E / IP(src=A4, dst=B4, options=[IPOption_Router_Alert()]) / UDP_DNS),
    "arp": raw(E / ARP(op=1, hwsrc="02:00:00:00:00:02", psrc=A4, pdst=B4, hwdst="00:00:00:00:00:00")),
}


@pytest.mark.parametrize("name", list(SWEEP))
def test_truncation_sweep(name):
    full = SWEEP[name]
    prefixes = [full[:k] for k in range(len(full) + 1)]
    meta, _ = parse_rows(prefixes)
    classes = meta[:, wire.M_CLS]
    assert np.all((classes >= 0) & (classes <= 4)), f"classes got {sorted(set(classes.tolist()))}"
    full_cls = int(classes[-1])
    for k in range(len(full)):
        got = int(classes[k])
        if k < 14:
            want = CLS_INVALID
        elif name == "arp":
            want = CLS_NOTIP
        else:
            want = CLS_INVALID     # the IP length always claims more than a strict prefix
        assert got == want, (f"{name}[:{k}] of {len(full)}: got {CLASS_NAMES[got]}/"
                             f"{REASON_NAMES[int(meta[k, wire.M_REASON])]}, want {CLASS_NAMES[want]}")
    assert full_cls != CLS_INVALID, f"{name} full frame: got invalid"


# ---------------------------------------------------------------- properties

TRAILERS = (b"\x00" * 96, b"\xff" * 96)


def check_frame_properties(frame: bytes):
    """Class in range; independent of the bytes after the frame (no read past its end);
    offsets of tracked frames are inside the frame and consistent."""
    meta, addr = parse_rows([frame, TRAILERS[0]])
    meta2, addr2 = parse_rows([frame, TRAILERS[1]])
    row, row2 = meta[0].tolist(), meta2[0].tolist()
    assert row == row2, f"parse depends on bytes after the frame: got {row} vs {row2}"
    assert addr[0].tolist() == addr2[0].tolist(), "addresses depend on bytes after the frame"
    cls = row[wire.M_CLS]
    assert 0 <= cls <= 4, f"class got {cls}, want 0..4"
    if cls in (CLS_TRACK, CLS_RELATED):
        l3, l4, l3len, l4len = row[wire.M_L3], row[wire.M_L4], row[wire.M_L3LEN], row[wire.M_L4LEN]
        assert 14 <= l3 < l4 <= l3 + l3len <= len(frame), (
            f"offsets got l3={l3} l4={l4} l3len={l3len} frame={len(frame)}")
        assert l4len == l3len - (l4 - l3), f"l4len got {l4len}, want {l3len - (l4 - l3)}"
        assert row[wire.M_IPVER] in (4, 6), f"ipver got {row[wire.M_IPVER]}"
    if cls == CLS_RELATED:
        il3, il4 = row[wire.M_INNER_L3], row[wire.M_INNER_L4]
        assert row[wire.M_L4] < il3 < il4 <= len(frame), f"inner offsets got {il3}, {il4}"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_never_raise(data):
    check_frame_properties(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_any_ip_payload_never_raises(body):
    # bytes behind a valid-looking Ethernet header of each IP ethertype reach deeper code
    for et in (b"\x08\x00", b"\x86\xdd"):
        check_frame_properties(raw(E)[:12] + et + body)


MUTATE_BASE = [c.frame for c in CORPUS if len(c.frame) >= 14]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frames_never_raise(data):
    frame = bytearray(data.draw(st.sampled_from(MUTATE_BASE)))
    n_mut = data.draw(st.integers(1, 6))
    for _ in range(n_mut):
        kind = data.draw(st.sampled_from(["byte", "cut", "grow"]))
        if kind == "byte" and frame:
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] = data.draw(st.integers(0, 255))
        elif kind == "cut" and frame:
            frame = frame[:data.draw(st.integers(0, len(frame)))]
        else:
            frame += data.draw(st.binary(max_size=24))
    check_frame_properties(bytes(frame))


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_properties(case):
    check_frame_properties(case.frame)
