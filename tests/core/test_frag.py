"""Defragmentation before tracking and fragmentation on output (frag.py, issue 13): the
engine reassembles IPv4/IPv6 fragments as nf_defrag_ipv4/6 do, tracks and NATs the whole
datagram, and re-fragments it at the original size (Linux's frag_max_size); a non-DF IPv4
packet over the egress MTU is cut. scapy builds the fragments and checks every output.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, UDP, Ether, IPv6, Raw, raw
from scapy.layers.inet import fragment
from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6

from shardct import Config, ConnTrack, ManualClock, PacketBatch
from shardct import track as K
from shardct.netconf import Network
from shardct.rules import parse_iptables_save

E = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02")
NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24", "b::1/64"]},
                      "wan0": {"address": ["192.168.0.1/24", "a::1/64"], "mtu": 1500}},
       "routes": [{"dst": "0.0.0.0/0", "dev": "wan0", "via": "192.168.0.254"},
                  {"dst": "::/0", "dev": "wan0", "via": "a::fe"}]}
LAN, WAN = 0, 1
CLIENT, SERVER, R_WAN = "10.0.0.2", "192.168.0.2", "192.168.0.1"
S = 1_000_000_000


def rules(body="-A POSTROUTING -o wan0 -j MASQUERADE"):
    text = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
           ":POSTROUTING ACCEPT [0:0]\n" + body + "\nCOMMIT\n"
    return parse_iptables_save(text, "test.rules", 4)


def engine(router=True, net=NET, **cfg):
    clock = ManualClock(10 * S)
    ct = ConnTrack(Config(**cfg), seed=7, clock=clock, rules=rules() if router else None,
                   network=Network.from_dict(net) if router else None, router=router,
                   rng=np.random.default_rng(7))
    return ct, clock


def frames(pkts):
    return [p if isinstance(p, bytes) else raw(E / p) for p in pkts]


def run(ct, pkts, ifindex=LAN):
    b = PacketBatch.from_frames(frames(pkts), ifindex=ifindex)
    return b, ct.process(b)


def out_frames(res):
    f = res.fragments
    return [] if f is None else [Ether(f.frame(k)) for k in range(len(f))]


def v4_frags(size=3000, mtu=1400, id=0x4242, sport=4000, flags=0):
    dgram = IP(src=CLIENT, dst=SERVER, id=id, flags=flags) / UDP(sport=sport, dport=53) \
        / Raw(bytes(range(256)) * (size // 256) + b"z" * (size % 256))
    return dgram, fragment(dgram, mtu)


def ip_ok(f):
    """IPv4 header checksum valid (scapy recomputes it when deleted)."""
    q = f[IP].copy()
    del q.chksum
    return IP(raw(q)).chksum == f[IP].chksum


def reassembled(frs):
    """The datagram the IPv4 fragments carry (scapy's own defragment)."""
    from scapy.layers.inet import defragment
    return defragment([f[IP] for f in frs])[0]


def test_in_order_udp_is_reassembled_nated_and_refragmented_at_the_original_boundaries():
    ct, _ = engine()
    dgram, frs = v4_frags()
    b, res = run(ct, frs)
    v = res.verdict.tolist()
    assert v == [K.V_QUEUED, K.V_QUEUED, K.V_ACCEPT], f"verdicts {v}"
    assert res.forward.tolist() == [False, False, False], "the fragments leave as res.fragments"
    outs = out_frames(res)
    got = [(len(o[IP]), o[IP].frag, o[IP].flags.value, o[IP].id, o[IP].src) for o in outs]
    want = [(len(f), f.frag, f.flags.value, f.id, R_WAN) for f in frs]
    assert [g[:4] for g in got] == [w[:4] for w in want], f"boundaries: {got} vs {want}"
    assert all(g[4] == R_WAN for g in got), f"every fragment SNATed: {got}"
    assert all(ip_ok(o) for o in outs), "IP header checksums"
    assert all(o[IP].ttl == dgram.ttl - 1 for o in outs), "one hop taken"
    assert res.fragment_of.tolist() == [2, 2, 2]
    whole = reassembled(outs)
    assert whole[UDP].sport == 4000 and raw(whole[UDP].payload) == raw(dgram[UDP].payload)
    assert udp_checksum_ok(whole), "UDP checksum of the NATed datagram"
    (conn,) = list(ct.conns())
    assert conn.original.sport == 4000 and conn.packets == (1, 0) and conn.bytes[0] == len(dgram)
    s = ct.stats()
    assert (s["frag_reasm_oks"], s["frag_reasm_reqds"], s["frag_creates"]) == (1, 3, 3), s


def udp_checksum_ok(ip_pkt) -> bool:
    q = IP(raw(ip_pkt))
    want = q[UDP].chksum
    del q[UDP].chksum
    return IP(raw(q))[UDP].chksum == want


def test_nat_port_is_the_same_on_every_fragment_and_the_checksum_holds():
    # the port clashes with an existing conn's reply: NAT remaps it, and the remapped port
    # is in the first fragment; later fragments have no ports, but carry the NATed source
    ct, _ = engine()
    run(ct, [IP(src="10.0.0.9", dst=SERVER) / UDP(sport=4000, dport=53) / b"x"])
    _, frs = v4_frags()
    _, res = run(ct, frs[::-1])
    outs = out_frames(res)
    assert len(outs) == 3 and all(o[IP].src == R_WAN for o in outs)
    whole = reassembled(outs)
    assert whole[UDP].sport != 4000, "remapped: the first conn holds 4000"
    assert udp_checksum_ok(whole), "UDP checksum over the NATed datagram"
    back = IP(src=SERVER, dst=R_WAN) / UDP(sport=53, dport=whole[UDP].sport) / b"ok"
    _, r2 = run(ct, [back], WAN)
    assert r2.verdict.tolist() == [K.V_ACCEPT] and r2.tuple_id[0] >= 0


def test_out_of_order_and_duplicate_fragments():
    ct, _ = engine()
    dgram, frs = v4_frags(size=5000, mtu=1000)
    order = [3, 0, 0, 4, 1, 2, 5] if len(frs) == 6 else None
    assert order is not None, len(frs)
    _, res = run(ct, [frs[k] for k in order])
    assert res.verdict.tolist()[:-1] == [K.V_QUEUED, K.V_QUEUED, K.V_DROP, K.V_QUEUED,
                                         K.V_QUEUED, K.V_QUEUED], res.verdict
    assert res.verdict[-1] == K.V_ACCEPT
    outs = out_frames(res)
    assert [o[IP].frag for o in outs] == [f.frag for f in frs]
    assert raw(reassembled(outs)[UDP].payload) == raw(dgram[UDP].payload)
    assert ct.stats()["frag_duplicates"] == 1


def test_fragments_across_batches_and_the_conn_sees_one_packet():
    ct, _ = engine()
    _, frs = v4_frags()
    _, r1 = run(ct, frs[:2])
    assert r1.verdict.tolist() == [K.V_QUEUED] * 2 and r1.fragments is None
    assert len(ct) == 0, "nothing is tracked before the datagram is whole"
    _, r2 = run(ct, frs[2:] + [IP(src=CLIENT, dst=SERVER) / UDP(sport=4000, dport=53) / b"y"])
    assert r2.verdict.tolist() == [K.V_ACCEPT, K.V_ACCEPT]
    assert r2.tuple_id[0] == r2.tuple_id[1], "the next datagram finds the conn"
    assert r2.forward.tolist() == [False, True] and len(r2.fragments) == 3


def test_overlap_drops_the_whole_datagram():
    ct, _ = engine()
    _, frs = v4_frags(size=3000, mtu=1400)
    p = raw(frs[1][IP])
    # a fragment overlapping the first's tail by 8 bytes
    ovl = IP(src=CLIENT, dst=SERVER, id=0x4242, proto=17, flags="MF", frag=frs[1].frag - 1) \
        / Raw(b"E" * 200)
    _, res = run(ct, [frs[0], ovl, frs[1], frs[2]])
    assert res.verdict.tolist() == [K.V_QUEUED, K.V_DROP, K.V_QUEUED, K.V_QUEUED], res.verdict
    assert res.fragments is None
    s = ct.stats()
    assert (s["frag_overlaps"], s["frag_reasm_fails"], s["frag_reasm_oks"]) == (1, 1, 0), s
    assert len(p) > 0


def test_ipv6_overlap_drops_the_whole_datagram():
    ct, _ = engine()
    p6 = IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=9) / UDP(sport=1, dport=2) \
        / (b"y" * 3000)
    f6 = fragment6(p6, 1400)
    bad = IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=9, nh=17, offset=(f6[1][IPv6ExtHdrFragment].offset - 1), m=1) / (b"Q" * 64)
    _, res = run(ct, [f6[0], bad] + list(f6[1:]))
    assert res.fragments is None and ct.stats()["frag_overlaps"] == 1


def test_timeout_frees_the_queue_and_later_fragments_start_afresh():
    ct, clock = engine()
    _, frs = v4_frags()
    run(ct, frs[:2])
    assert ct._defrag.queues() == 1 and ct._defrag.memory() > 0
    clock.advance(29)
    run(ct, [])
    assert ct._defrag.queues() == 1, "29 s: still held"
    clock.advance(1)
    _, res = run(ct, frs[2:])
    assert res.verdict.tolist() == [K.V_QUEUED], "the last fragment alone"
    s = ct.stats()
    assert s["frag_timeouts"] == 1 and s["frag_reasm_fails"] == 1, s
    ct.reap_all(clock() + 31 * S)
    assert ct._defrag.queues() == 0 and ct._defrag.memory() == 0


def test_ipv6_is_keyed_by_interface_and_times_out_at_60_s():
    ct, clock = engine()
    p6 = IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=0x12345) / UDP(sport=1, dport=2) \
        / (b"y" * 3000)
    f6 = fragment6(p6, 1400)
    run(ct, f6[:2], LAN)
    _, res = run(ct, f6[2:], WAN)
    assert res.verdict.tolist() == [K.V_QUEUED], "another interface: another queue"
    clock.advance(59)
    _, res = run(ct, f6[2:], LAN)
    assert res.verdict.tolist() == [K.V_ACCEPT]
    outs = out_frames(res)
    got = [(len(o[IPv6]), o[IPv6ExtHdrFragment].offset, o[IPv6ExtHdrFragment].m,
            o[IPv6ExtHdrFragment].id, o[IPv6].hlim) for o in outs]
    new_id = outs[0][IPv6ExtHdrFragment].id
    want = [(len(f), f[IPv6ExtHdrFragment].offset, f[IPv6ExtHdrFragment].m, new_id, 63)
            for f in f6]
    assert got == want and new_id != 0x12345, f"{got} vs {want} (a fresh id, as Linux)"
    data = b"".join(raw(o[IPv6ExtHdrFragment].payload) for o in outs)
    assert data == raw(UDP(raw(p6[UDP]))), "the datagram's bytes"
    clock.advance(61)
    run(ct, [])
    ct.reap_all(clock())
    assert ct._defrag.queues() == 0 and ct.stats()["frag_timeouts"] == 1


def test_memory_bound_refuses_new_queues_and_counts():
    # 8 KiB: 16 chunks of 512 B; each first fragment (1380 B of data) takes 3, so the
    # 6th queue takes the 16th..18th and no 7th queue is made
    ct, _ = engine(frag_high_thresh=8192)
    pkts = []
    for k in range(10):
        _, frs = v4_frags(size=3000, mtu=1400, id=100 + k)
        pkts.append(frs[0])
    _, res = run(ct, pkts)
    s = ct.stats()
    got = (s["frag_nomem"], ct._defrag.queues(), ct._defrag.memory(), res.verdict.tolist())
    assert got == (4, 6, 18 * 512, [K.V_QUEUED] * 6 + [K.V_DROP] * 4), got


def test_non_df_ipv4_over_the_egress_mtu_is_cut_and_df_is_left_alone():
    net = {"interfaces": {"lan0": {"address": ["10.0.0.3/24"]},
                          "wan0": {"address": ["192.168.0.1/24"], "mtu": 576}},
           "routes": [{"dst": "0.0.0.0/0", "dev": "wan0", "via": "192.168.0.254"}]}
    ct, _ = engine(net=net)
    big = IP(src=CLIENT, dst=SERVER, id=0x99) / UDP(sport=5, dport=6) / (b"k" * 1200)
    df = IP(src=CLIENT, dst=SERVER, id=0x98, flags="DF") / UDP(sport=5, dport=6) / (b"k" * 1200)
    small = IP(src=CLIENT, dst=SERVER) / UDP(sport=5, dport=6) / b"s"
    _, res = run(ct, [big, df, small])
    # the DF one is not cut: the engine answers it with frag-needed (icmp.py)
    assert res.forward.tolist() == [False, False, True]
    assert res.generated_by.tolist() == [1] and res.fragment_of.tolist() == [0, 0, 0]
    outs = out_frames(res)
    assert [len(o[IP]) for o in outs] == [572, 572, 1228 - 2 * 552]
    assert [o[IP].frag for o in outs] == [0, 69, 138]
    assert [o[IP].flags.value for o in outs] == [1, 1, 0]
    assert all(o[IP].id == 0x99 and o[IP].src == R_WAN and ip_ok(o) for o in outs)
    assert udp_checksum_ok(reassembled(outs))


# ---------------------------------------------------------------- with the router's errors

def mtu_net(wan_mtu):
    net = {"interfaces": {k: dict(v) for k, v in NET["interfaces"].items()}, "routes": NET["routes"]}
    net["interfaces"]["wan0"]["mtu"] = wan_mtu
    return net


def errors_of(res):
    g = res.generated
    return [] if g is None else [Ether(g.frame(k)) for k in range(len(g))]


@pytest.mark.parametrize("split", [False, True], ids=["one-batch", "two-batches"])
def test_df_fragments_whose_largest_is_over_the_egress_mtu_get_frag_needed_and_no_conn(split):
    """ip_exceeds_mtu on a defragmented datagram: DF (the datagram has it when its
    largest fragment had it) and that fragment (frag_max_size) over the egress MTU:
    frag-needed with the MTU, once, after the fragment that completed the datagram,
    quoting the datagram as it arrived; the held fragments get nothing; the conn it
    began is withdrawn (Linux never confirmed it)."""
    ct, _ = engine(net=mtu_net(1400))
    dgram, frs = v4_frags(mtu=1480, flags="DF")
    assert max(len(f) for f in frs) == 1500
    if split:
        _, held = run(ct, frs[:2])
        assert (held.verdict.tolist(), held.generated) == ([K.V_QUEUED] * 2, None)
        _, res = run(ct, frs[2:])
    else:
        _, res = run(ct, frs)
    (e,) = errors_of(res)
    got = (int(res.verdict[-1]), bool(res.forward.any()), res.fragments, res.generated_by.tolist(),
           e[IP].src, e[IP].dst, e[ICMP].type, e[ICMP].code, e[ICMP].nexthopmtu)
    want = (K.V_DROP, False, None, [len(res.verdict) - 1], "10.0.0.3", CLIENT, 3, 4, 1400)
    assert got == want, f"\ngot  {got}\nwant {want}"
    assert raw(e[IP])[28:] == raw(dgram)[:548], "the quote: the reassembled datagram as it arrived"
    s = ct.stats()
    got = (len(ct), ct.events(), s["insert"], s["new"], s["icmp_frag_needed"], s["frag_fails"])
    assert got == (0, [], 0, 0, 1, 0), f"(conns, events, insert, new, frag_needed, frag_fails): {got}"


@pytest.mark.parametrize("case", ["largest-without-df", "df-within-the-mtu", "icmp-errors-off"])
def test_datagrams_the_router_may_cut_are_cut_at_the_smaller_of_mtu_and_largest_fragment(case):
    """No frag-needed when the largest fragment had no DF (cut at the MTU) or fits the
    MTU (cut at it, DF kept: ip_do_fragment with IPSKB_FRAG_PMTU); with ICMP errors off a
    DF datagram over the MTU is dropped silently (counted in frag_fails)."""
    ct, _ = engine(net=mtu_net(1400), icmp_errors=case != "icmp-errors-off")
    if case == "largest-without-df":
        dgram, frs = v4_frags(mtu=1480)
        frs[-1].flags = "DF"                # the small last fragment only
    elif case == "df-within-the-mtu":
        dgram, frs = v4_frags(mtu=1376, flags="DF")
    else:
        dgram, frs = v4_frags(mtu=1480, flags="DF")
    _, res = run(ct, frs)
    outs = out_frames(res)
    got = (res.generated, [len(o[IP]) for o in outs], {int(o[IP].flags) & 2 for o in outs})
    want = {"largest-without-df": (None, [1396, 1396, 276], {0}),
            "df-within-the-mtu": (None, [1396, 1396, 276], {2}),
            "icmp-errors-off": (None, [], set())}[case]
    assert got == want, f"\ngot  {got}\nwant {want}"
    if outs:
        assert reassembled(outs)[UDP].payload == dgram[UDP].payload
    assert ct.stats()["frag_fails"] == (case == "icmp-errors-off")


def test_ipv6_fragments_whose_largest_is_over_the_egress_mtu_get_packet_too_big():
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    ct, _ = engine(net=mtu_net(1400))
    d = IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=9) / UDP(sport=1, dport=2) / (b"6" * 3000)
    frs = fragment6(d, 1500)
    _, res = run(ct, frs)
    (e,) = errors_of(res)
    q = raw(e[IPv6])[48:]
    got = (bool(res.forward.any()), res.fragments, res.generated_by.tolist(), e[IPv6].src,
           e[ICMPv6PacketTooBig].mtu, q[6], int.from_bytes(q[4:6], "big"), len(q), len(ct))
    # the quote: the reassembled datagram (no fragment header, its whole payload length)
    want = (False, None, [len(frs) - 1], "b::1", 1400, 17, 3008, 1232, 0)
    assert got == want, f"\ngot  {got}\nwant {want}"


def test_a_datagram_is_answered_as_one_packet_held_fragments_never():
    """TTL 1 on every fragment: one time-exceeded, for the datagram, after its last
    fragment; a fragmented UDP datagram to the router's own address: one port unreachable."""
    ct, _ = engine()
    frs = fragment(IP(src=CLIENT, dst=SERVER, id=5, ttl=1) / UDP(sport=1, dport=2) / (b"t" * 3000), 1480)
    mine = fragment(IP(src=CLIENT, dst="10.0.0.3", id=6) / UDP(sport=3, dport=9) / (b"l" * 3000), 1480)
    _, res = run(ct, frs + mine)
    errs = errors_of(res)
    got = ([(e[ICMP].type, e[ICMP].code) for e in errs], res.generated_by.tolist(),
           res.verdict.tolist(), res.fragments)
    want = ([(11, 0), (3, 3)], [2, 5], [K.V_QUEUED] * 2 + [K.V_DROP] + [K.V_QUEUED] * 2 + [K.V_ACCEPT],
            None)
    assert got == want, f"\ngot  {got}\nwant {want}"
    assert not res.forward.any()


def test_the_pool_does_not_reassemble_so_never_holds_a_fragment():
    from shardct.shard import LocalPool
    lp = LocalPool(2, Config(), seed=7)
    assert all(sh.ct._defrag is None for sh in lp.shards)
    _, frs = v4_frags()
    _, v = lp.process(PacketBatch.from_frames(frames(frs), ifindex=LAN))
    assert v.tolist() == [K.V_ACCEPT, K.V_UNTRACKED, K.V_UNTRACKED], v.tolist()


def test_ipv4_options_copied_only_when_flagged():
    from scapy.layers.inet import IPOption_RR, IPOption_Security
    net = {"interfaces": {"lan0": {"address": ["10.0.0.3/24"]},
                          "wan0": {"address": ["192.168.0.1/24"], "mtu": 576}},
           "routes": [{"dst": "0.0.0.0/0", "dev": "wan0", "via": "192.168.0.254"}]}
    ct, _ = engine(net=net)
    pkt = IP(src=CLIENT, dst=SERVER, options=[IPOption_RR(), IPOption_Security()]) \
        / UDP(sport=5, dport=6) / (b"k" * 1000)
    _, res = run(ct, [pkt])
    outs = out_frames(res)
    hl = IP(raw(pkt)).ihl * 4
    first, later = raw(outs[0][IP])[20:hl], raw(outs[1][IP])[20:hl]
    assert first == raw(IP(raw(pkt)))[20:hl]
    rr_len = raw(IP(raw(pkt)))[21]
    assert later[:rr_len] == b"\x01" * rr_len, "record route is not copied"
    assert later[rr_len] == 130, "security is copied"


def test_passive_engine_reassembles_and_refragments_at_the_largest_fragment():
    ct, _ = engine(router=False)
    _, frs = v4_frags()
    b, res = run(ct, frs)
    outs = out_frames(res)
    assert [raw(o) for o in outs] == [raw(E / f) for f in frs], "unchanged bytes come back"


def test_defrag_off_keeps_the_old_behaviour():
    ct, _ = engine(defrag=False)
    _, frs = v4_frags()
    _, res = run(ct, frs)
    assert res.verdict.tolist() == [K.V_ACCEPT, K.V_UNTRACKED, K.V_UNTRACKED]


def test_malformed_fragments_are_counted():
    ct, _ = engine()
    last1 = IP(src=CLIENT, dst=SERVER, id=5, proto=17, frag=100) / Raw(b"a" * 16)
    last2 = IP(src=CLIENT, dst=SERVER, id=5, proto=17, frag=200) / Raw(b"a" * 16)
    empty = IP(src=CLIENT, dst=SERVER, id=6, proto=17, flags="MF", frag=3) / Raw(b"a" * 4)
    big = IP(src=CLIENT, dst=SERVER, id=7, proto=17, frag=8190) / Raw(b"a" * 100)
    _, res = run(ct, [last1, last2, empty, big])
    assert res.verdict.tolist() == [K.V_QUEUED, K.V_DROP, K.V_DROP, K.V_DROP]
    s = ct.stats()
    assert (s["frag_malformed"], s["frag_oversize"]) == (2, 1), s


# ---------------------------------------------------------------- fuzz

def frag_stream():
    """Fragments of a few datagrams, cut at random sizes, shuffled, some bytes damaged."""
    return st.lists(st.tuples(st.sampled_from([4, 6]), st.integers(1, 3),
                              st.integers(8, 2000), st.integers(60, 1500),
                              st.booleans()), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frag_stream(), st.randoms(use_true_random=False), st.lists(st.integers(0, 1 << 16),
                                                                    max_size=6))
def test_any_fragment_stream_gets_a_verdict_and_never_raises(spec, rnd, damage):
    ct, clock = engine(frag_high_thresh=65536, frag_queues=16)
    out = []
    for ver, ident, size, mtu, tail in spec:
        if ver == 4:
            d = IP(src=CLIENT, dst=SERVER, id=ident) / UDP(sport=9, dport=9) / (b"p" * size)
            out += [raw(E / f) for f in fragment(d, max(mtu, 68))]
        else:
            d = IPv6(src="b::2", dst="a::2") / IPv6ExtHdrFragment(id=ident) \
                / UDP(sport=9, dport=9) / (b"p" * size)
            out += [raw(E / f) for f in fragment6(d, max(mtu, 1280))]
        if tail:
            out.append(out[-1][:-3] if len(out[-1]) > 40 else out[-1])
    rnd.shuffle(out)
    out = [bytearray(f) for f in out]
    for k, pos in enumerate(damage):
        f = out[k % len(out)]
        f[pos % len(f)] ^= 0xFF
    b = PacketBatch.from_frames([bytes(f) for f in out], ifindex=LAN)
    res = ct.process(b)
    assert res.verdict.shape == (len(out),)
    assert set(res.verdict.tolist()) <= {K.V_ACCEPT, K.V_QUEUED, K.V_DROP, K.V_INVALID,
                                         K.V_UNTRACKED, K.V_NOTIP, K.V_RELATED}
    if res.fragments is not None:
        assert all(len(Ether(res.fragments.frame(k))) > 0 for k in range(len(res.fragments)))
    clock.advance(61)
    ct.process(PacketBatch.from_frames([]))
    ct.reap_all(clock())
    assert ct._defrag.queues() == 0 and ct._defrag.memory() == 0


def test_fragments_after_the_first_chunk_are_reassembled_as_in_small_batches():
    """Defrag looks only at chunks the parser says may hold a fragment (engine.CHUNK
    frames each): a big batch with fragments, a TTL-1 frame and a broken IP header past
    its first chunk gives the verdicts, outputs, errors and counters of the same frames
    in batches of 100 (each of which goes through defrag whole)."""
    from shardct.conntrack import CHUNK
    rng = np.random.default_rng(3)
    plain = [IP(src=CLIENT, dst=SERVER) / UDP(sport=5000 + k % 50, dport=53) / b"q"
             for k in range(CHUNK + 300)]
    _, frs = v4_frags(id=0x77)
    _, frs_b = v4_frags(id=0x78, sport=4100)
    broken = bytearray(raw(E / IP(src=CLIENT, dst=SERVER) / UDP(sport=9, dport=9)))
    broken[14 + 10] ^= 0xFF
    pkts = plain[:CHUNK + 100] + [frs[2], bytes(broken), frs[0]] + plain[CHUNK + 100:] \
        + [frs[1], IP(src=CLIENT, dst=SERVER, ttl=1) / UDP(sport=7, dport=7)] + list(frs_b)
    ts = np.sort(rng.integers(10 * S, 11 * S, len(pkts)))
    want = {}
    for label, size in (("whole", len(pkts)), ("small", 100)):
        ct, _ = engine()
        verdicts, outs, errs = [], [], []
        for s in range(0, len(pkts), size):
            b = PacketBatch.from_frames(frames(pkts[s:s + size]), ifindex=LAN,
                                        ts=ts[s:s + size].tolist())
            res = ct.process(b)
            verdicts += res.verdict.tolist()
            if res.fragments is not None:
                outs += [(s + int(i), res.fragments.frame(k))
                         for k, i in enumerate(res.fragment_of)]
            if res.generated is not None:
                errs += [(s + int(i), res.generated.frame(k))
                         for k, i in enumerate(res.generated_by)]
        st = {k: v for k, v in ct.stats().items() if k.startswith(("frag", "icmp", "ttl", "drop",
                                                                   "invalid", "packets"))}
        want[label] = (verdicts, outs, errs, st)
    got, ref = want["whole"], want["small"]
    assert got[0] == ref[0], "verdicts differ"
    assert len(got[1]) == 6 and got[1] == ref[1], "fragments out differ"
    assert len(got[2]) == 1 and got[2] == ref[2], "errors (the TTL-1 frame's) differ"
    assert got[3] == ref[3], f"counters: {got[3]} vs {ref[3]}"
