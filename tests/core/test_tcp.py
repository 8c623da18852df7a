"""TCP tracking: every gVisor tcpconntrack sequence mapped onto Linux states, window
scaling, RST checks, the whole (state x flag class x direction) space, and timeouts.

gVisor's results map to Linux states like this: Connecting = SYN_SENT / SYN_SENT2,
Alive = SYN_RECV / ESTABLISHED / FIN_WAIT / CLOSE_WAIT / LAST_ACK, ClosedBy* =
TIME_WAIT, Reset = CLOSE (and, when the RST came before any reply, no conn at all).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scapy.all import IP, TCP, Ether, IPv6, raw

from shardct import Config, ConnTrack, ManualClock, PacketBatch
from shardct import track as K
from shardct.tcpstate import IG, IV, TRANSITIONS, FlagClass, TcpState, flag_class, next_state
from shardct.config import Timeouts
from shardct.errors import ConfigError
from shardct.table import SCALES

S = 1_000_000_000
E = Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
CLI, SRV, CPORT, SPORT = "10.0.0.1", "10.0.0.2", 1234, 80


def seg(direction, flags, seq=0, ack=0, win=30000, data=0, ws=None, v6=False):
    """A TCP frame in the original (client->server) or reply direction."""
    src, dst, sp, dp = (CLI, SRV, CPORT, SPORT) if direction == "O" else (SRV, CLI, SPORT, CPORT)
    opts = [("WScale", ws)] if ws is not None else []
    tcp = TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack, window=win, options=opts)
    if v6:
        src6 = "b::2" if src == CLI else "c::3"
        dst6 = "c::3" if dst == SRV else "b::2"
        return raw(E / IPv6(src=src6, dst=dst6) / tcp / (b"x" * data))
    return raw(E / IP(src=src, dst=dst) / tcp / (b"x" * data))


class Tracker:
    def __init__(self, **cfg):
        self.clock = ManualClock(1 * S)
        self.ct = ConnTrack(Config(**cfg), seed=7, clock=self.clock)

    def send(self, frame):
        r = self.ct.process(PacketBatch.from_frames([frame]))
        return int(r.verdict[0])

    def state(self, v6=False):
        hit = self.ct.lookup("b::2" if v6 else CLI, "c::3" if v6 else SRV, CPORT, SPORT, "tcp")
        return None if hit is None else hit[0].state

    def conn(self):
        hit = self.ct.lookup(CLI, SRV, CPORT, SPORT, "tcp")
        return None if hit is None else hit[0]


def step(t, frame, want_state, want_verdict=K.V_ACCEPT, note=""):
    got_v = t.send(frame)
    assert got_v == want_verdict, f"{note}: verdict got {got_v}, want {want_verdict}"
    got = t.state()
    assert got == want_state, f"{note}: state got {got}, want {want_state}"


def connected(t, iss=1234, irs=789, isw=30000, irw=50000):
    step(t, seg("O", "S", seq=iss, win=irw), "SYN_SENT", note="SYN")
    step(t, seg("R", "SA", seq=irs, ack=iss + 1, win=isw), "SYN_RECV", note="SYN/ACK")
    step(t, seg("O", "A", seq=iss + 1, ack=irs + 1, win=irw), "ESTABLISHED", note="ACK")
    got = t.conn().status
    assert "ASSURED" in got, f"status got {got}, want ASSURED in it"


# ---------------------------------------------------------------- gVisor sequences

A, I = K.V_ACCEPT, K.V_INVALID


def connected_steps(iss=1234, irs=789, isw=30000, irw=50000):
    """gVisor's connected(iss, irs, isw, irw) as table rows."""
    return [("O", "S", dict(seq=iss, win=irw), "SYN_SENT", A),
            ("R", "SA", dict(seq=irs, ack=iss + 1, win=isw), "SYN_RECV", A),
            ("O", "A", dict(seq=iss + 1, ack=irs + 1, win=irw), "ESTABLISHED", A)]


def ignore_bad_reset_steps():
    """gVisor IgnoreBadResetOnSynSent: one SYN, then eight bad RSTs in a row."""
    rows = [("O", "S", dict(seq=1234, win=30000), "SYN_SENT", A)]
    for ack in (1234, 1236, 1000, 5000):
        for flags in ("R", "RA"):
            # gVisor keeps Connecting; Linux calls these RSTs INVALID and keeps SYN_SENT
            rows.append(("R", flags, dict(seq=789, ack=ack), "SYN_SENT", I))
    return rows + [("R", "SA", dict(seq=789, ack=1235), "SYN_RECV", A),
                   ("O", "A", dict(seq=1235, ack=790), "ESTABLISHED", A)]


def send_and_receive_steps():
    """gVisor SendAndReceiveDataClosedByOriginator, bit-exact including its
    ``sseq += 1004`` quirk."""
    rows = connected_steps(1234, 789, 30000, 50000)
    sseq, rseq = 1235, 790
    for _ in range(10):
        rows.append(("O", "A", dict(seq=sseq, ack=rseq, win=30000, data=1024), "ESTABLISHED", A))
        sseq += 1004
        rows.append(("R", "A", dict(seq=rseq, ack=sseq, win=50000, data=1024), "ESTABLISHED", A))
    for _ in range(10):
        rows.append(("R", "A", dict(seq=rseq, ack=sseq, win=50000, data=1024), "ESTABLISHED", A))
        rseq += 1024
        rows.append(("O", "A", dict(seq=sseq, ack=rseq, win=30000, data=1024), "ESTABLISHED", A))
    return rows + [("O", "FA", dict(seq=sseq, ack=rseq), "FIN_WAIT", A),
                   ("R", "FA", dict(seq=rseq, ack=sseq + 1), "LAST_ACK", A),
                   ("O", "A", dict(seq=sseq + 1, ack=rseq + 1), "TIME_WAIT", A)]


# Every sequence of gVisor's tcp_conntrack_test.go (reference/gvisor-conntrack.md §3.1):
# (test, gVisor's final result, rows of (direction, flags, header fields, Linux state
# after the segment (None: no conn), verdict)).
GVISOR_TCP_SEQUENCES = [
    ("ConnectionRefused", "Reset", [
        ("O", "S", dict(seq=1234, win=30000), "SYN_SENT", A),
        # Linux: CLOSE, and since the only reply was a RST the conn is deleted at once
        ("R", "RA", dict(seq=789, ack=1235, win=50000), None, A)]),
    ("ConnectionRefusedInSynRcvd", "Reset", [
        ("O", "S", dict(seq=1234), "SYN_SENT", A),
        ("R", "S", dict(seq=789), "SYN_SENT2", A),       # simultaneous open
        ("R", "R", dict(seq=790), "CLOSE", A)]),
    ("ConnectionResetInSynRcvd", "Reset", [
        ("O", "S", dict(seq=1234), "SYN_SENT", A),
        ("R", "S", dict(seq=789), "SYN_SENT2", A),
        ("O", "R", dict(seq=1235, win=0), "CLOSE", A)]),
    ("RetransmitOnSynSent", "Connecting", [
        ("O", "S", dict(seq=1234, win=30000), "SYN_SENT", A),
        ("O", "S", dict(seq=1234, win=30000), "SYN_SENT", A)]),
    ("RetransmitOnSynRcvd", "Alive", [
        ("O", "S", dict(seq=1234, win=30000), "SYN_SENT", A),
        ("R", "S", dict(seq=789, win=50000), "SYN_SENT2", A),
        ("O", "S", dict(seq=1234, win=30000), "SYN_SENT2", A),
        ("O", "SA", dict(seq=1234, ack=790), "SYN_RECV", A)]),   # SYN/ACK from the originator
    ("ClosedByOriginator", "ClosedByOriginator", connected_steps() + [
        ("O", "FA", dict(seq=1235, ack=790), "FIN_WAIT", A),
        ("R", "FA", dict(seq=790, ack=1236), "LAST_ACK", A),
        ("O", "A", dict(seq=1236, ack=791), "TIME_WAIT", A)]),
    ("ClosedByResponder", "ClosedByResponder", connected_steps() + [
        ("R", "FA", dict(seq=790, ack=1235), "FIN_WAIT", A),
        ("O", "FA", dict(seq=1235, ack=791), "LAST_ACK", A),
        ("R", "A", dict(seq=791, ack=1236), "TIME_WAIT", A)]),
    ("IgnoreBadResetOnSynSent", "Alive", ignore_bad_reset_steps()),
    ("SendAndReceiveDataClosedByOriginator", "ClosedByOriginator", send_and_receive_steps()),
]


@pytest.mark.parametrize("name,gvisor_result,rows", GVISOR_TCP_SEQUENCES,
                         ids=[name for name, _, _ in GVISOR_TCP_SEQUENCES])
def test_gvisor_tcp_sequence(name, gvisor_result, rows):
    t = Tracker()
    for k, (d, flags, fields, want_state, want_verdict) in enumerate(rows):
        step(t, seg(d, flags, **fields), want_state, want_verdict,
             note=f"{name} (gVisor: {gvisor_result}) row {k}: {d} {flags} {fields}")


def test_connection_refused_deletes_the_conn():
    t = Tracker()
    for d, flags, fields, want_state, want_verdict in GVISOR_TCP_SEQUENCES[0][2]:
        step(t, seg(d, flags, **fields), want_state, want_verdict)
    got = (t.ct.stats()["destroy"], len(t.ct))
    assert got == (1, 0), f"(destroy, conns) got {got}, want (1, 0)"


@pytest.mark.parametrize("ack", [1234, 1236, 1000, 5000])
@pytest.mark.parametrize("flags", ["R", "RA"])
def test_ignore_bad_reset_on_syn_sent_one_at_a_time(ack, flags):
    """Each bad RST of IgnoreBadResetOnSynSent on a fresh conn."""
    t = Tracker()
    step(t, seg("O", "S", seq=1234, win=30000), "SYN_SENT")
    step(t, seg("R", flags, seq=789, ack=ack), "SYN_SENT", K.V_INVALID, note=f"{flags} ack={ack}")
    step(t, seg("R", "SA", seq=789, ack=1235), "SYN_RECV")
    step(t, seg("O", "A", seq=1235, ack=790), "ESTABLISHED")


# gVisor TestWindowScaling: (W, synScale, synAckScale, dataLen). Linux checks only that the
# segment starts inside the window, so every case is accepted; the conn lives through 2x120 s
# (data unacknowledged caps the timeout at 300 s) and is gone 5 days later.
@pytest.mark.parametrize("w,syn_scale,synack_scale,data", [
    (4, 0, 0, 2), (4, 0, 0, 8), (4, 1, 1, 6), (4, 1, 1, 10), (4, 2, 1, 10), (4, 1, 2, 10)])
def test_window_scaling(w, syn_scale, synack_scale, data):
    t = Tracker()
    t.ct = ConnTrack(Config(), seed=7, clock=t.clock)
    step(t, seg("O", "S", seq=10, win=w, ws=syn_scale or None), "SYN_SENT")
    step(t, seg("R", "SA", seq=20, ack=11, win=w, ws=synack_scale or None), "SYN_RECV")
    step(t, seg("O", "A", seq=11, ack=21, win=w, data=data), "ESTABLISHED")
    both_scaled = bool(syn_scale) and bool(synack_scale)
    c = t.conn().id
    packed = int(t.ct.table.c8[c, SCALES])     # direction d's scale in bits 4d..4d+3
    got = (packed & 0xF, packed >> 4)
    want = (syn_scale, synack_scale) if both_scaled else (0, 0)
    assert got == want, f"scales got {got}, want {want}"
    now = t.clock.advance(240)
    got = t.ct.reap_all(now)
    assert got == 0, f"reaped after 240 s got {got}, want 0"
    got = len(t.ct)
    assert got == 1, f"conns after 240 s got {got}, want 1"
    now = t.clock.advance(5 * 24 * 3600)
    got = t.ct.reap_all(now)
    assert got == 1, f"reaped after 5 days got {got}, want 1"
    got = len(t.ct)
    assert got == 0, f"conns after 5 days got {got}, want 0"


def test_reap_refreshed_by_retransmitted_syn():
    # gVisor TestReap (#6748): the same SYN 60 s later refreshes the timer.
    t = Tracker()
    step(t, seg("O", "S", seq=1), "SYN_SENT")
    t.clock.advance(60)
    step(t, seg("O", "S", seq=1), "SYN_SENT")
    now = t.clock.advance(90)
    assert t.ct.reap_all(now) == 0, "SYN_SENT timeout is 120 s since the last packet"
    now = t.clock.advance(60)
    got = t.ct.reap_all(now)
    assert got == 1, f"reaped 150 s after the last SYN got {got}, want 1"


# ---------------------------------------------------------------- Linux specifics

def test_rst_sequence_checks():
    # nf_conntrack packetdrill conntrack_rst_invalid: in ESTABLISHED, RSTs before td_maxack
    # or out of window are INVALID (state kept); the exact next sequence closes.
    t = Tracker()
    connected(t, iss=1000, irs=3000, isw=65000, irw=65000)
    step(t, seg("O", "A", seq=1001, ack=3001), "ESTABLISHED")
    for bad in (0, 42, 1000000, 2999):
        step(t, seg("R", "R", seq=bad), "ESTABLISHED", K.V_INVALID, note=f"RST seq {bad}")
    step(t, seg("R", "R", seq=3001), "CLOSE", note="exact RST")
    got = t.ct.stats()["invalid.tcp_rst"] + t.ct.stats()["invalid.tcp_window"]
    assert got == 4, f"invalid.tcp_rst + invalid.tcp_window got {got}, want 4"


def test_inexact_in_window_rst_keeps_state():
    t = Tracker()
    connected(t, iss=1000, irs=3000, isw=65000, irw=65000)
    step(t, seg("O", "A", seq=1001, ack=3001), "ESTABLISHED")
    step(t, seg("R", "R", seq=3100), "ESTABLISHED", note="in window, not exact")


def test_out_of_window_data_is_invalid_unless_liberal():
    for liberal, want in ((False, K.V_INVALID), (True, K.V_ACCEPT)):
        t = Tracker(tcp_be_liberal=liberal)
        connected(t, iss=1000, irs=3000, isw=1000, irw=1000)
        step(t, seg("O", "A", seq=1001 + 10_000_000, ack=3001, data=10), "ESTABLISHED", want,
             note=f"liberal={liberal}")


def test_liberal_still_refuses_rsts_below_the_acked_sequence():
    """nf_conntrack_tcp_be_liberal: "mark only out of window RST segments as INVALID".
    In Linux's code that is the RST check (seq before the peer's max ACK), which runs
    before and apart from the window checks; the window checks themselves all pass."""
    t = Tracker(tcp_be_liberal=True)
    connected(t, iss=1000, irs=3000, isw=65000, irw=65000)
    step(t, seg("O", "A", seq=1001, ack=3001), "ESTABLISHED")
    step(t, seg("R", "R", seq=2999), "ESTABLISHED", K.V_INVALID, note="liberal, RST below max ACK")
    step(t, seg("O", "A", seq=1001 + 10_000_000, ack=3001, data=10), "ESTABLISHED", K.V_ACCEPT,
         note="liberal, data out of window")


def test_ack_of_unseen_data_is_invalid():
    t = Tracker()
    connected(t)
    step(t, seg("O", "A", seq=1235, ack=790 + 100000), "ESTABLISHED", K.V_INVALID)


def acked_stream(t):
    """Connect, then 6000 bytes from the client, each 1000 ACKed by the server."""
    connected(t, iss=1000, irs=3000, isw=2000, irw=2000)
    step(t, seg("O", "A", seq=1001, ack=3001, win=2000, data=1000), "ESTABLISHED")
    step(t, seg("R", "A", seq=3001, ack=2001, win=2000), "ESTABLISHED")
    for k in range(5):
        step(t, seg("O", "A", seq=2001 + 1000 * k, ack=3001, win=2000, data=1000), "ESTABLISHED")
        step(t, seg("R", "A", seq=3001, ack=3001 + 1000 * k, win=2000), "ESTABLISHED")


def test_retransmission_of_acked_data_is_ignored():
    t = Tracker()
    acked_stream(t)
    before = t.ct.stats()["ignore"]
    step(t, seg("O", "A", seq=1001, ack=3001, win=2000, data=10), "ESTABLISHED", K.V_ACCEPT,
         note="old data again")
    got = t.ct.stats()["ignore"]
    assert got == before + 1, f"ignore got {got}, want {before + 1}"


def test_sender_overshooting_the_window_passes_and_its_ack_fits():
    """Linux 6.0+: data starting past the receiver's window, by at most that window, is
    IGNOREd (passes, no state change) but its end is kept, so the ACK for it is valid."""
    t = Tracker()
    connected(t, iss=1000, irs=3000, isw=1000, irw=1000)     # client may send up to 2001
    before = t.ct.stats()["ignore"]
    step(t, seg("O", "A", seq=2002, ack=3001, win=1000, data=100), "ESTABLISHED", K.V_ACCEPT,
         note="100 bytes past the window")
    got = t.ct.stats()["ignore"] - before
    assert got == 1, f"ignored got {got}, want 1"
    step(t, seg("R", "A", seq=3001, ack=2102, win=1000), "ESTABLISHED", K.V_ACCEPT,
         note="the ACK of the overshooting bytes")
    # past the window by more than the receiver's largest window: INVALID as before
    step(t, seg("O", "A", seq=2102 + 3000, ack=3001, win=1000, data=10), "ESTABLISHED",
         K.V_INVALID, note="far past the window")


def test_window_checks_run_in_linux_order():
    """Old (already ACKed) data that also ACKs unseen data: Linux checks the ACK's upper
    bound before the receive window, so INVALID, not IGNORE."""
    t = Tracker()
    acked_stream(t)
    inv = t.ct.stats()["invalid.tcp_window"]
    step(t, seg("O", "A", seq=1001, ack=3001 + 100000, win=2000, data=10), "ESTABLISHED",
         K.V_INVALID, note="old data, ACK of unseen data")
    got = t.ct.stats()["invalid.tcp_window"] - inv
    assert got == 1, f"invalid.tcp_window got +{got}, want +1"


def test_syn_ack_first_is_invalid_and_creates_nothing():
    t = Tracker()
    step(t, seg("O", "SA", seq=1, ack=1), None, K.V_INVALID)
    got = len(t.ct)
    assert got == 0, f"conns got {got}, want 0"
    got = t.ct.stats()["invalid.not_new"]
    assert got == 1, f"invalid.not_new got {got}, want 1"


def test_midstream_pickup_loose():
    t = Tracker()
    step(t, seg("O", "A", seq=5000, ack=7000, data=10), "ESTABLISHED")
    c = t.conn()
    assert c.timeout(t.clock()) == 300, "mid-stream pickups are capped at UNACK until a reply"
    t2 = Tracker(tcp_loose=False)
    step(t2, seg("O", "A", seq=5000, ack=7000, data=10), None, K.V_INVALID)


def test_reopen_in_time_wait():
    t = Tracker()
    connected(t)
    step(t, seg("O", "FA", seq=1235, ack=790), "FIN_WAIT")
    step(t, seg("R", "FA", seq=790, ack=1236), "LAST_ACK")
    step(t, seg("O", "A", seq=1236, ack=791), "TIME_WAIT")
    old = t.conn().id
    step(t, seg("O", "S", seq=99999), "SYN_SENT", note="new SYN reopens")
    kinds = [e.kind for e in t.ct.events()]
    assert kinds[-2:] == ["DESTROY", "NEW"], f"got {kinds[-2:]}, want DESTROY, NEW"
    got = t.ct.stats()["new"]
    assert got == 2, f"new got {got}, want 2"
    assert old is not None, f"first conn id got {old}, want an id"


def test_timeouts_follow_linux_defaults():
    want = {"SYN_SENT": 120, "SYN_RECV": 60, "ESTABLISHED": 432000, "FIN_WAIT": 120,
            "LAST_ACK": 30, "TIME_WAIT": 120}
    t = Tracker()
    got = {}
    t.send(seg("O", "S", seq=1234))
    got["SYN_SENT"] = t.conn().timeout(t.clock())
    t.send(seg("R", "SA", seq=789, ack=1235))
    got["SYN_RECV"] = t.conn().timeout(t.clock())
    t.send(seg("O", "A", seq=1235, ack=790))
    got["ESTABLISHED"] = t.conn().timeout(t.clock())
    t.send(seg("O", "FA", seq=1235, ack=790))
    got["FIN_WAIT"] = t.conn().timeout(t.clock())
    t.send(seg("R", "FA", seq=790, ack=1236))
    got["LAST_ACK"] = t.conn().timeout(t.clock())
    t.send(seg("O", "A", seq=1236, ack=791))
    got["TIME_WAIT"] = t.conn().timeout(t.clock())
    assert got == want, f"got {got}, want {want}"


def test_timeouts_of_the_other_states_follow_linux_defaults():
    got = {}
    t = Tracker()
    connected(t)
    step(t, seg("R", "FA", seq=790, ack=1235), "FIN_WAIT")
    step(t, seg("O", "A", seq=1235, ack=791), "CLOSE_WAIT", note="the FIN ACKed")
    got["CLOSE_WAIT"] = timeout_of(t)
    t = Tracker()
    connected(t)
    step(t, seg("O", "R", seq=1235), "CLOSE")
    got["CLOSE"] = timeout_of(t)
    t = Tracker()
    step(t, seg("O", "S", seq=1234), "SYN_SENT")
    step(t, seg("R", "S", seq=789), "SYN_SENT2", note="simultaneous open")
    got["SYN_SENT2"] = timeout_of(t)
    want = {"CLOSE_WAIT": 60, "CLOSE": 10, "SYN_SENT2": 120}
    assert got == want, f"got {got}, want {want}"


# timeouts distinct from each other so each rule shows which one applied
RULES_TMO = dict(tcp_max_retrans=200, tcp_unacknowledged=250)


def timeout_of(t):
    return t.conn().timeout(t.clock())


@pytest.mark.parametrize("max_retrans", [3, 1])
def test_retransmitted_ack_segments_cap_the_timeout(max_retrans):
    """nf_conntrack_tcp_max_retrans: after that many copies of the same ACK segment the
    timeout is min(state's, timeout_max_retrans); any other segment lifts it again."""
    t = Tracker(tcp_max_retrans=max_retrans, timeouts=Timeouts(**RULES_TMO))
    connected(t)
    ack = seg("O", "A", seq=1235, ack=790, win=30000)
    got = []
    for _ in range(max_retrans + 1):       # the segment, then max_retrans copies
        got.append(timeout_of(t))
        step(t, ack, "ESTABLISHED")
    got.append(timeout_of(t))
    want = [432000] * (max_retrans + 1) + [200]
    assert got == want, f"timeouts got {got}, want {want}"
    step(t, seg("O", "A", seq=1235, ack=790, win=29000), "ESTABLISHED", note="a new window")
    got = timeout_of(t)
    assert got == 432000, f"after a different segment: timeout got {got}, want 432000"


def test_zero_window_caps_the_timeout():
    t = Tracker(timeouts=Timeouts(**RULES_TMO))
    connected(t)
    step(t, seg("R", "A", seq=790, ack=1235, win=0), "ESTABLISHED", note="zero window")
    got = timeout_of(t)
    assert got == 200, f"after a zero window: timeout got {got}, want 200 (max_retrans)"
    step(t, seg("R", "A", seq=790, ack=1235, win=5000), "ESTABLISHED", note="window opens")
    got = timeout_of(t)
    assert got == 432000, f"window open again: timeout got {got}, want 432000"


def test_any_rst_that_passes_gets_the_close_timeout():
    """Linux: an inexact in-window RST keeps ESTABLISHED (room for a challenge ACK) but
    its timeout is CLOSE's; the next valid segment restores ESTABLISHED's."""
    t = Tracker()
    connected(t, iss=1000, irs=3000, isw=65000, irw=65000)
    step(t, seg("O", "A", seq=1001, ack=3001), "ESTABLISHED")
    step(t, seg("R", "R", seq=3100), "ESTABLISHED", note="in window, not exact")
    got = timeout_of(t)
    assert got == 10, f"after an inexact RST: timeout got {got}, want 10"
    # the RST's sequence counts as sent (td_end 3100): acking it clears unacked data
    step(t, seg("O", "A", seq=1001, ack=3100), "ESTABLISHED", note="ACK up to the RST")
    got = timeout_of(t)
    assert got == 432000, f"after the ACK: timeout got {got}, want 432000"


def test_out_of_window_fins_from_both_sides_lower_an_assured_timeout():
    """nf_tcp_handle_invalid (6.1+): an ASSURED conn whose FIN/RST is out of window and
    is answered by an out-of-window FIN/RST from the other side drops to UNACK."""
    t = Tracker(timeouts=Timeouts(**RULES_TMO))
    connected(t, iss=1000, irs=3000, isw=65000, irw=65000)
    step(t, seg("O", "FA", seq=1001 + 10_000_000, ack=3001), "ESTABLISHED", K.V_INVALID,
         note="client FIN out of window")
    got = timeout_of(t)
    assert got == 432000, f"one side only: timeout got {got}, want 432000"
    step(t, seg("R", "FA", seq=3001 + 10_000_000, ack=1001), "ESTABLISHED", K.V_INVALID,
         note="server FIN out of window")
    got = timeout_of(t)
    assert got == 250, f"both sides: timeout got {got}, want 250 (unacknowledged)"


def test_max_retrans_outside_the_count_is_a_config_error():
    with pytest.raises(ConfigError, match=r"ct\.toml: tcp_max_retrans = 9: want 1\.\.7"):
        Config.from_dict({"tcp_max_retrans": 9}, "ct.toml")


def test_ipv6_handshake():
    t = Tracker()
    for d, f, s, a in (("O", "S", 1, 0), ("R", "SA", 100, 2), ("O", "A", 2, 101)):
        got = t.send(seg(d, f, seq=s, ack=a, v6=True))
        assert got == K.V_ACCEPT, f"{d} {f}: verdict got {got}, want {K.V_ACCEPT}"
    got = t.state(v6=True)
    assert got == "ESTABLISHED", f"state got {got}, want ESTABLISHED"


# ---------------------------------------------------------------- the whole table

FLAGS_BY_CLASS = {FlagClass.SYN: "S", FlagClass.SYNACK: "SA", FlagClass.FIN: "FA",
                  FlagClass.ACK: "A", FlagClass.RST: "R", FlagClass.NONE: ""}


def test_table_covers_every_state_class_direction():
    for d, cls, s in itertools.product(range(2), range(6), range(10)):
        got = int(TRANSITIONS[d, cls, s])
        assert got in set(range(10)) | {IV, IG}, f"[{d}][{cls}][{s}] = {got}"
    got = next_state(0, 0x02, TcpState.NONE)
    assert got == TcpState.SYN_SENT, \
        f"next_state(original, SYN, NONE) got {got}, want {int(TcpState.SYN_SENT)} (SYN_SENT)"
    syn_ack, rst = flag_class(0x12), flag_class(0x14)
    assert syn_ack == FlagClass.SYNACK and rst == FlagClass.RST, \
        f"flag_class(SYN/ACK, RST/ACK) got {syn_ack!r}, {rst!r}, want SYNACK, RST"


STATE_PATHS = {
    # how to drive a fresh conn into each state (direction, flags, seq, ack)
    TcpState.SYN_SENT: [("O", "S", 100, 0)],
    TcpState.SYN_SENT2: [("O", "S", 100, 0), ("R", "S", 500, 0)],
    TcpState.SYN_RECV: [("O", "S", 100, 0), ("R", "SA", 500, 101)],
    TcpState.ESTABLISHED: [("O", "S", 100, 0), ("R", "SA", 500, 101), ("O", "A", 101, 501)],
    TcpState.FIN_WAIT: [("O", "S", 100, 0), ("R", "SA", 500, 101), ("O", "A", 101, 501),
                        ("O", "FA", 101, 501)],
    TcpState.CLOSE_WAIT: [("O", "S", 100, 0), ("R", "SA", 500, 101), ("O", "A", 101, 501),
                          ("O", "FA", 101, 501), ("R", "A", 501, 102)],
    TcpState.LAST_ACK: [("O", "S", 100, 0), ("R", "SA", 500, 101), ("O", "A", 101, 501),
                        ("O", "FA", 101, 501), ("R", "FA", 501, 102)],
    TcpState.TIME_WAIT: [("O", "S", 100, 0), ("R", "SA", 500, 101), ("O", "A", 101, 501),
                         ("O", "FA", 101, 501), ("R", "FA", 501, 102), ("O", "A", 102, 502)],
    TcpState.CLOSE: [("O", "S", 100, 0), ("R", "SA", 500, 101), ("O", "A", 101, 501),
                     ("R", "R", 501, 0)],
}


@pytest.mark.parametrize("state", list(STATE_PATHS), ids=lambda s: s.name)
def test_state_paths_reach_their_state(state):
    t = Tracker()
    for d, f, s, a in STATE_PATHS[state]:
        t.send(seg(d, f, seq=s, ack=a))
    assert t.state() == state.name, f"got {t.state()}, want {state.name}"


def outcome_problem(state, cls, direction, seq_off):
    """Drive a fresh conn into ``state``, send one segment of flag class ``cls``; None
    when the verdict and the new state are what the table allows, else what is wrong."""
    t = Tracker()
    for d, f, s, a in STATE_PATHS[state]:
        t.send(seg(d, f, seq=s, ack=a))
    if t.state() != state.name:
        return f"path reached {t.state()}"
    # a segment near the right sequence numbers for its direction
    seq = (101 if direction == "O" else 501) + seq_off + 2
    ack = (502 if direction == "O" else 102)
    v = t.send(seg(direction, FLAGS_BY_CLASS[cls], seq=seq & 0xFFFFFFFF, ack=ack))
    after = t.state()
    d = 0 if direction == "O" else 1
    want = int(TRANSITIONS[d, int(cls), int(state)])
    if v not in (K.V_ACCEPT, K.V_INVALID):
        return f"verdict {v}"
    if want == IV:
        return None if v == K.V_INVALID and after == state.name else f"IV: got {v}, {after}"
    if want == IG:
        return None if after == state.name else f"IG: state moved to {after}"
    if v == K.V_INVALID:
        return None if after == state.name else f"INVALID moved the state to {after}"
    if want == TcpState.SYN_SENT and state in (TcpState.TIME_WAIT, TcpState.CLOSE) and d == 0:
        return None if after == "SYN_SENT" else f"reopen: got {after}"
    allowed = {TcpState(want).name, state.name, None}
    return None if after in allowed else f"got {after}, want one of {sorted(map(str, allowed))}"


@pytest.mark.parametrize("state", list(STATE_PATHS), ids=lambda s: s.name)
def test_every_state_flag_direction_has_a_defined_outcome(state):
    """Exhaustive over flag class x direction x seq offset from each reachable state (NONE
    is the first packet's, see tcp_may_create): the verdict is one the table allows, and
    the state moves only as the table says (or the conn reopens / is killed)."""
    bad = []
    for cls, direction, off in itertools.product(FLAGS_BY_CLASS, "OR", range(-3, 4)):
        why = outcome_problem(state, cls, direction, off)
        if why is not None:
            bad.append(f"{cls.name} {direction} {off:+d}: {why}")
    assert not bad, f"{state.name}: {len(bad)} bad outcomes: {bad[:10]}"


@settings(max_examples=150, deadline=None)
@given(state=st.sampled_from(list(STATE_PATHS)), cls=st.sampled_from(list(FLAGS_BY_CLASS)),
       direction=st.sampled_from(["O", "R"]), seq_off=st.integers(-(1 << 31), 1 << 31))
def test_any_sequence_offset_has_a_defined_outcome(state, cls, direction, seq_off):
    """Property: the same holds for a segment anywhere in sequence space."""
    why = outcome_problem(state, cls, direction, seq_off)
    assert why is None, why
