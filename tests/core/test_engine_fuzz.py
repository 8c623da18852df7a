"""Bad input is normal input, through the whole engine (parse, hash, track), NAT off:
any batch of byte strings gets a verdict per frame, never raises, and every verdict is
counted under its conntrack name. (test_wire.py fuzzes the parser alone; test_nat.py the
NAT router on mutated valid frames.)
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.all import IP, TCP, UDP, Ether, IPv6, raw

from shardct import Config, ConnTrack, PacketBatch
from shardct import track as K

S = 1_000_000_000
E = raw(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02"))[:12]
# prefixes that make random tails reach the IP, TCP and UDP code instead of stopping at
# the Ethernet header
PREFIXES = [b"", E + b"\x08\x00", E + b"\x86\xdd",
            raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2", proto=6))[:34],
            raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2", proto=17))[:34],
            raw(Ether() / IPv6(src="b::2", dst="c::3", nh=6))[:54]]
# valid segments of one flow, so some random frames meet a live conn
FLOW = [raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1234, dport=80, flags="S",
                                                                 seq=100)),
        raw(Ether() / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=1234, flags="SA",
                                                                 seq=500, ack=101)),
        raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=53) / b"q")]

COUNTED = {K.V_NOTIP: "not_ip", K.V_UNTRACKED: "untracked", K.V_INVALID: "invalid"}


frame = st.one_of(st.binary(max_size=200),
                  st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=120)).map(b"".join),
                  st.sampled_from(FLOW))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(frame, min_size=1, max_size=16), min_size=1, max_size=4))
def test_any_bytes_through_the_engine(batches):
    ct = ConnTrack(Config(max_conns=64, event_buffer=256), seed=7)
    for k, frames in enumerate(batches):
        before = ct.stats()
        res = ct.process(PacketBatch.from_frames(frames, ts=(k + 1) * S))
        got = set(res.verdict.tolist())
        allowed = {K.V_ACCEPT, K.V_RELATED, K.V_UNTRACKED, K.V_INVALID, K.V_NOTIP}
        assert got <= allowed, f"verdicts got {sorted(got)}, want a subset of {sorted(allowed)}"
        after = ct.stats()
        for v, name in COUNTED.items():
            n = int((res.verdict == v).sum())
            got_n = after[name] - before[name]
            assert got_n == n, f"{name} counted {got_n}, want {n} (one per {name} verdict)"
        tracked = int(((res.verdict == K.V_ACCEPT) | (res.verdict == K.V_RELATED)).sum())
        assert tracked <= after["packets"] - before["packets"], (
            f"accepted/related {tracked} but packets counted "
            f"{after['packets'] - before['packets']}")
        assert len(ct) <= 64, f"conns got {len(ct)}, want <= max_conns 64"
