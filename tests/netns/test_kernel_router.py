"""Proves the kernel-router harness (kernel_router.py) tells the truth about Linux NAT.

Each test builds a fresh router (three namespaces, ~0.2 s), injects frames crafted with scapy
and checks what the kernel sent out, field by field. Every server-side reply is built from the
frame the server actually captured, never from what the test expected.
"""
from __future__ import annotations

import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw
from scapy.layers.inet import IPerror, UDPerror

import kernel_router
from kernel_router import CLIENT, SERVER, KernelRouter, available, cleanup_stale, list_netns

pytestmark = pytest.mark.netns

HERE = os.path.dirname(os.path.abspath(__file__))

MASQ = """
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "rtr-out" masquerade
    }
}
"""

MASQ6 = """
table ip6 nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "rtr-out" masquerade
    }
}
"""

DNAT = """
table ip nat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "rtr-in" udp dport 5353 dnat to 192.168.0.2:8080
    }
}
"""


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", autouse=True)
def _stale():
    ok, why = available()
    if not ok:
        pytest.skip(why)
    cleanup_stale()          # leftovers of killed runs (dead owners only)
    yield


@pytest.fixture
def make_router():
    """make_router(rules, **kw) -> started KernelRouter; all closed and checked gone after."""
    ok, why = available()
    if not ok:
        pytest.skip(why)
    routers: list[KernelRouter] = []

    def make(rules: str = "", **kw) -> KernelRouter:
        r = KernelRouter(nft_rules=rules, **kw)
        routers.append(r)
        return r.start()

    yield make
    for r in routers:
        r.close()
    mine = {r.prefix for r in routers}
    left = [n for n in list_netns() if n.rpartition("-")[0] in mine]
    assert left == [], f"namespaces left behind: got {left}, want []"
    markers = [p for p in mine if os.path.exists(os.path.join(kernel_router.MARKER_DIR, p))]
    assert markers == [], f"owner markers left behind: got {markers}, want []"


# ------------------------------------------------------------------------------ helpers

def eq(got, want, what: str) -> None:
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def one(frames: list[bytes], what: str) -> Ether:
    eq(len(frames), 1, f"number of frames out ({what}); got {[Ether(f).summary() for f in frames]}")
    f = frames[0]
    e = Ether(f)
    eq(bytes(e), f, f"scapy round trip of {what}")
    return e


def checksums(e: Ether) -> dict[str, int]:
    """{layer: checksum} for the outer IP and transport layers present."""
    out = {}
    for layer in (IP, UDP, TCP, ICMP):
        if layer in e:
            out[layer.__name__] = e[layer].chksum
    return out


def assert_checksums_valid(e: Ether, what: str) -> None:
    """Delete the checksum fields, let scapy rebuild, compare (a zero UDP checksum must stay 0
    and is checked by the caller)."""
    c = e.copy()
    for layer in (IP, UDP, TCP, ICMP):
        if layer in c:
            if layer is UDP and c[UDP].chksum == 0:
                continue
            del c[layer].chksum
    rebuilt = Ether(bytes(c))
    eq(checksums(e), checksums(rebuilt), f"checksums of {what} (frame vs scapy recomputed)")


def frame(r: KernelRouter, side: str, pkt) -> bytes:
    src, dst = r.macs(side)
    return bytes(Ether(src=src, dst=dst) / pkt)


def reply_udp(r: KernelRouter, cap: Ether, payload: bytes = b"pong", chksum=None) -> bytes:
    """Server reply built from what the server captured."""
    u = UDP(sport=cap[UDP].dport, dport=cap[UDP].sport)
    if chksum is not None:
        u.chksum = chksum
    return frame(r, SERVER, IP(src=cap[IP].dst, dst=cap[IP].src, ttl=64, id=7) / u / payload)


def assert_out_headers(r: KernelRouter, e: Ether, to: str, ttl: int, what: str) -> None:
    if to == SERVER:
        eq((e.src, e.dst), (r.router_server_mac, r.server_mac), f"{what}: MACs")
    else:
        eq((e.src, e.dst), (r.router_client_mac, r.client_mac), f"{what}: MACs")
    eq(e[IP].ttl, ttl, f"{what}: TTL")


def ct_lines(r: KernelRouter, proto: str) -> list[str]:
    return [ln for ln in r.conntrack_list().splitlines() if ln.split()[:1] == [proto]]


# ------------------------------------------------------------------------------ masquerade

def test_masquerade_udp_and_reply(make_router):
    r = make_router(MASQ)
    pkt = IP(src=r.client_ip, dst=r.server_ip, ttl=64, id=0x1234, flags="DF", tos=0x10) / \
        UDP(sport=40000, dport=5000) / b"hello kernel"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "client->server UDP")
    assert_out_headers(r, cap, SERVER, 63, "client->server UDP")
    eq(cap[IP].src, r.router_server_ip, "source after masquerade")
    eq(cap[IP].dst, r.server_ip, "destination")
    eq(cap[UDP].sport, 40000, "source port (kept: reply tuple free)")
    eq(cap[UDP].dport, 5000, "destination port")
    eq((cap[IP].id, cap[IP].flags.value, cap[IP].tos), (0x1234, 2, 0x10), "IP id/flags/tos kept")
    eq(bytes(cap[UDP].payload), b"hello kernel", "payload")
    assert_checksums_valid(cap, "client->server UDP")

    back = one(r.exchange(SERVER, reply_udp(r, cap)), "server->client UDP reply")
    assert_out_headers(r, back, CLIENT, 63, "reply")
    eq((back[IP].src, back[IP].dst), (r.server_ip, r.client_ip), "reply addresses un-NATed")
    eq((back[UDP].sport, back[UDP].dport), (5000, 40000), "reply ports un-NATed")
    eq(bytes(back[UDP].payload), b"pong", "reply payload")
    assert_checksums_valid(back, "server->client UDP reply")


def test_masquerade_tcp_handshake(make_router):
    r = make_router(MASQ)
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (12345, 0)), ("NOP", None),
            ("WScale", 7)]
    syn = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / \
        TCP(sport=41000, dport=80, flags="S", seq=1000, window=64240, options=opts)
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, syn)), "SYN")
    assert_out_headers(r, cap, SERVER, 63, "SYN")
    eq((cap[IP].src, cap[TCP].sport), (r.router_server_ip, 41000), "SYN source after masquerade")
    eq((cap[TCP].seq, cap[TCP].ack, cap[TCP].window, str(cap[TCP].flags)), (1000, 0, 64240, "S"),
       "SYN seq/ack/window/flags untouched")
    eq(cap[TCP].options, TCP(bytes(syn[TCP])).options, "SYN options untouched")
    assert_checksums_valid(cap, "SYN")

    synack = IP(src=cap[IP].dst, dst=cap[IP].src, ttl=64) / \
        TCP(sport=cap[TCP].dport, dport=cap[TCP].sport, flags="SA", seq=5000,
            ack=cap[TCP].seq + 1, window=65160, options=[("MSS", 1460)])
    back = one(r.exchange(SERVER, frame(r, SERVER, synack)), "SYN-ACK")
    assert_out_headers(r, back, CLIENT, 63, "SYN-ACK")
    eq((back[IP].dst, back[TCP].dport), (r.client_ip, 41000), "SYN-ACK un-NATed")
    eq((back[TCP].seq, back[TCP].ack, str(back[TCP].flags)), (5000, 1001, "SA"),
       "SYN-ACK seq/ack/flags")
    assert_checksums_valid(back, "SYN-ACK")

    ack = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / \
        TCP(sport=41000, dport=80, flags="A", seq=1001, ack=5001, window=502)
    cap2 = one(r.exchange(CLIENT, frame(r, CLIENT, ack)), "ACK")
    eq((cap2[IP].src, cap2[TCP].sport, cap2[TCP].seq, cap2[TCP].ack),
       (r.router_server_ip, 41000, 1001, 5001), "ACK after masquerade")
    assert_checksums_valid(cap2, "ACK")

    lines = ct_lines(r, "tcp")
    eq(len(lines), 1, f"tcp conntrack entries {lines}")
    assert " ESTABLISHED " in lines[0], f"conntrack state: got {lines[0]!r}, want ESTABLISHED"


def test_masquerade_icmp_echo(make_router):
    r = make_router(MASQ)
    req = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / ICMP(type=8, id=0x4242, seq=3) / \
        (b"x" * 56)
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, req)), "echo request")
    assert_out_headers(r, cap, SERVER, 63, "echo request")
    eq(cap[IP].src, r.router_server_ip, "echo request source after masquerade")
    eq((cap[ICMP].type, cap[ICMP].id, cap[ICMP].seq), (8, 0x4242, 3), "echo type/id/seq kept")
    assert_checksums_valid(cap, "echo request")

    rep = IP(src=cap[IP].dst, dst=cap[IP].src, ttl=64) / \
        ICMP(type=0, id=cap[ICMP].id, seq=cap[ICMP].seq) / bytes(cap[ICMP].payload)
    back = one(r.exchange(SERVER, frame(r, SERVER, rep)), "echo reply")
    assert_out_headers(r, back, CLIENT, 63, "echo reply")
    eq((back[IP].src, back[IP].dst), (r.server_ip, r.client_ip), "echo reply un-NATed")
    eq((back[ICMP].type, back[ICMP].id, back[ICMP].seq), (0, 0x4242, 3), "echo reply id/seq")
    assert_checksums_valid(back, "echo reply")


def test_masquerade_udp_ipv6(make_router):
    r = make_router(MASQ6, family=6)
    pkt = IPv6(src=r.client_ip, dst=r.server_ip, hlim=64) / UDP(sport=40000, dport=5000) / b"v6"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "client->server UDP/IPv6")
    eq((cap[IPv6].src, cap[IPv6].hlim, cap[UDP].sport), (r.router_server_ip, 63, 40000),
       "IPv6 source / hop limit / port after masquerade")
    c = cap.copy()
    del c[UDP].chksum
    eq(cap[UDP].chksum, Ether(bytes(c))[UDP].chksum, "UDP/IPv6 checksum vs scapy")
    rep = IPv6(src=cap[IPv6].dst, dst=cap[IPv6].src) / \
        UDP(sport=cap[UDP].dport, dport=cap[UDP].sport) / b"r"
    back = one(r.exchange(SERVER, frame(r, SERVER, rep)), "IPv6 reply")
    eq((back[IPv6].dst, back[UDP].dport), (r.client_ip, 40000), "IPv6 reply un-NATed")


# ------------------------------------------------------------------------------ DNAT

def test_dnat_udp_and_reply(make_router):
    r = make_router(DNAT)
    pkt = IP(src=r.client_ip, dst=r.router_client_ip, ttl=64) / UDP(sport=33333, dport=5353) / \
        b"query"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "DNATed request")
    assert_out_headers(r, cap, SERVER, 63, "DNATed request")
    eq((cap[IP].src, cap[UDP].sport), (r.client_ip, 33333), "source untouched by DNAT")
    eq((cap[IP].dst, cap[UDP].dport), ("192.168.0.2", 8080), "destination after DNAT")
    assert_checksums_valid(cap, "DNATed request")

    back = one(r.exchange(SERVER, reply_udp(r, cap, b"answer")), "DNAT reply")
    assert_out_headers(r, back, CLIENT, 63, "DNAT reply")
    eq((back[IP].src, back[UDP].sport), (r.router_client_ip, 5353), "reply source un-DNATed")
    eq((back[IP].dst, back[UDP].dport), (r.client_ip, 33333), "reply destination")
    assert_checksums_valid(back, "DNAT reply")


# ------------------------------------------------------------------------------ checksums

def test_zero_udp_checksum_stays_zero(make_router):
    r = make_router(MASQ)
    pkt = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / UDP(sport=40001, dport=5000, chksum=0) / \
        b"no checksum"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "zero-checksum UDP")
    eq(cap[IP].src, r.router_server_ip, "source after masquerade")
    eq(cap[UDP].chksum, 0, "UDP checksum after NAT")
    assert_checksums_valid(cap, "zero-checksum UDP (IP header)")
    back = one(r.exchange(SERVER, reply_udp(r, cap, chksum=0)), "zero-checksum reply")
    eq((back[IP].dst, back[UDP].dport, back[UDP].chksum), (r.client_ip, 40001, 0),
       "reply un-NATed with zero checksum kept")


def test_bad_udp_checksum_is_invalid_and_leaks(make_router):
    """Offloads really are off: the kernel verifies the L4 checksum itself, classifies the packet
    INVALID and (with no `ct state invalid drop`) forwards it un-NATed."""
    r = make_router(MASQ)
    pkt = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / UDP(sport=40002, dport=5000, chksum=0x1234) / \
        b"bad"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "bad-checksum UDP")
    eq((cap[IP].src, cap[UDP].sport, cap[UDP].chksum), (r.client_ip, 40002, 0x1234),
       "INVALID packet forwarded un-NATed, checksum untouched")
    eq(cap[IP].ttl, 63, "TTL")
    eq(ct_lines(r, "udp"), [], "no conntrack entry for an INVALID packet")


def test_icmp_port_unreachable_for_masqueraded_udp(make_router):
    r = make_router(MASQ)
    pkt = IP(src=r.client_ip, dst=r.server_ip, ttl=64, id=99) / UDP(sport=40003, dport=5001) / \
        b"anyone there?"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "UDP towards a closed port")
    quoted = bytes(cap[IP])
    err = IP(src=cap[IP].dst, dst=cap[IP].src, ttl=64) / ICMP(type=3, code=3) / quoted
    back = one(r.exchange(SERVER, frame(r, SERVER, err)), "port unreachable")
    assert_out_headers(r, back, CLIENT, 63, "port unreachable")
    eq((back[IP].src, back[IP].dst), (r.server_ip, r.client_ip),
       "outer source untouched, outer destination un-NATed")
    eq((back[ICMP].type, back[ICMP].code), (3, 3), "ICMP type/code")
    assert_checksums_valid(back, "port unreachable (outer IP + ICMP)")

    inner = IP(bytes(back[ICMP].payload))
    eq((inner.src, inner.dst), (r.client_ip, r.server_ip), "quoted addresses")
    eq((inner[UDP].sport, inner[UDP].dport), (40003, 5001), "quoted ports")
    eq((inner.ttl, inner.id), (63, 99), "quoted TTL/id (as the server saw it)")
    c = inner.copy()
    del c[IP].chksum
    del c[UDP].chksum
    rebuilt = IP(bytes(c))
    eq((inner[IP].chksum, inner[UDP].chksum), (rebuilt[IP].chksum, rebuilt[UDP].chksum),
       "quoted IP and UDP checksums (updated to the rewritten quote)")
    assert IPerror in back and UDPerror in back, "scapy sees the quote as IPerror/UDPerror"


def test_ttl1_time_exceeded_goes_back_to_sender(make_router):
    """exchange_all sees the router's own ICMP error, sent from the ingress address."""
    r = make_router(MASQ)
    pkt = IP(src=r.client_ip, dst=r.server_ip, ttl=1) / UDP(sport=40004, dport=5000) / b"t"
    got = r.exchange_all(CLIENT, frame(r, CLIENT, pkt))
    eq(got[SERVER], [], "frames forwarded with TTL 1")
    back = one(got[CLIENT], "time exceeded")
    eq((back[IP].src, back[IP].dst, back[IP].ttl), (r.router_client_ip, r.client_ip, 64),
       "time exceeded from the ingress address, TTL 64")
    eq((back[ICMP].type, back[ICMP].code), (11, 0), "ICMP type/code")
    eq(IP(bytes(back[ICMP].payload)).src, r.client_ip, "quote is of the packet as it arrived")
    assert_checksums_valid(back, "time exceeded")


# ------------------------------------------------------------------------------ port clash

@pytest.mark.parametrize("sport,lo,hi", [(40000, 1024, 65535), (500, 1, 511), (700, 600, 1023)])
def test_port_clash_remaps_within_class(make_router, sport, lo, hi):
    r = make_router(MASQ)
    other = "10.0.0.4"
    r.add_client_address(other)
    a = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / UDP(sport=sport, dport=5000) / b"a"
    cap_a = one(r.exchange(CLIENT, frame(r, CLIENT, a)), "first client")
    eq((cap_a[IP].src, cap_a[UDP].sport), (r.router_server_ip, sport), "first flow keeps its port")

    b = IP(src=other, dst=r.server_ip, ttl=64) / UDP(sport=sport, dport=5000) / b"b"
    cap_b = one(r.exchange(CLIENT, frame(r, CLIENT, b)), "second client")
    eq(cap_b[IP].src, r.router_server_ip, "second flow source address")
    got = cap_b[UDP].sport
    assert got != sport, f"second flow source port: got {got}, want anything but {sport}"
    assert lo <= got <= hi, f"second flow source port: got {got}, want in [{lo}, {hi}]"
    assert_checksums_valid(cap_b, "remapped flow")

    back = one(r.exchange(SERVER, reply_udp(r, cap_b)), "reply to the remapped port")
    eq((back[IP].dst, back[UDP].dport), (other, sport), "reply reaches the second client")
    back_a = one(r.exchange(SERVER, reply_udp(r, cap_a)), "reply to the first flow")
    eq((back_a[IP].dst, back_a[UDP].dport), (r.client_ip, sport), "first flow unaffected")
    eq(len(ct_lines(r, "udp")), 2, "udp conntrack entries")


# ------------------------------------------------------------------------------ conntrack CLI

def test_conntrack_list_shows_masqueraded_flow(make_router):
    r = make_router(MASQ)
    pkt = IP(src=r.client_ip, dst=r.server_ip, ttl=64) / UDP(sport=40005, dport=5201) / b"x"
    cap = one(r.exchange(CLIENT, frame(r, CLIENT, pkt)), "request")
    lines = ct_lines(r, "udp")
    eq(len(lines), 1, f"udp entries {lines}")
    want = (f"src={r.client_ip} dst={r.server_ip} sport=40005 dport=5201 [UNREPLIED] "
            f"src={r.server_ip} dst={r.router_server_ip} sport=5201 dport=40005")
    assert want in lines[0], f"conntrack -L: got {lines[0]!r}, want it to contain {want!r}"

    one(r.exchange(SERVER, reply_udp(r, cap)), "reply")
    lines = ct_lines(r, "udp")
    want = (f"src={r.client_ip} dst={r.server_ip} sport=40005 dport=5201 "
            f"src={r.server_ip} dst={r.router_server_ip} sport=5201 dport=40005")
    assert len(lines) == 1 and want in lines[0] and "UNREPLIED" not in lines[0], \
        f"conntrack -L after reply: got {lines}, want one line containing {want!r}"
    m = re.match(r"udp\s+17\s+(\d+)\s", lines[0])
    assert m and 0 < int(m.group(1)) <= 30, f"udp timeout field: got {lines[0]!r}, want 1..30"

    stats = r.conntrack_stats()
    assert re.search(r"^cpu=0\s.*\bfound=\d+", stats, re.M), \
        f"conntrack -S: got {stats!r}, want per-cpu lines"


# ------------------------------------------------------------------------------ the harness itself

def test_offloads_off_and_endpoints_quiet(make_router):
    r = make_router(MASQ)
    for ns, dev in ((r.ns_client, r.client_if), (r.ns_router, r.router_client_if),
                    (r.ns_router, r.router_server_if), (r.ns_server, r.server_if)):
        out = subprocess.run([kernel_router._tool("ip"), "netns", "exec", ns,
                              kernel_router._tool("ethtool"), "-k", dev], capture_output=True,
                             text=True, timeout=10).stdout
        for feat in ("rx-checksumming", "tx-checksumming", "tcp-segmentation-offload",
                     "generic-segmentation-offload", "generic-receive-offload"):
            m = re.search(rf"^{feat}: (\w+)", out, re.M)
            eq(m and m.group(1), "off", f"{ns}/{dev} {feat}")
    # a TCP SYN to the muted server: the server kernel must not answer (no RST), and our own
    # outgoing frame must not show up in the sender's capture
    syn = IP(src=r.client_ip, dst=r.server_ip) / TCP(sport=42000, dport=9, flags="S")
    got = r.exchange_all(CLIENT, frame(r, CLIENT, syn), timeout=0.2)
    eq(len(got[SERVER]), 1, "SYN forwarded")
    eq(got[CLIENT], [], "frames back at the client (own frame or an RST)")
    eq(r.recv_all(0.2), {CLIENT: [], SERVER: []}, "later frames")


def _spawn_router(prefix: str) -> subprocess.Popen:
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import kernel_router as K\n"
            "r = K.KernelRouter(prefix=sys.argv[2], nft_rules=''); r.start()\n"
            "print('up', flush=True)\n"
            "time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code, HERE, prefix], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    buf = b""
    while b"up\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or p.poll() is not None:
            p.kill()
            p.wait(5)
            raise AssertionError(f"router subprocess did not come up: {buf!r} "
                                 f"{p.stderr.read().decode(errors='replace')}")
        r, _, _ = select.select([p.stdout], [], [], left)
        if r:
            buf += os.read(p.stdout.fileno(), 1024)
    return p


def _mine(prefix: str) -> list[str]:
    return sorted(n for n in list_netns() if n.rpartition("-")[0] == prefix)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_namespaces(sig):
    """SIGTERM: the handler cleans up and the process dies of the signal. SIGINT: the handler
    cleans up and chains to Python's KeyboardInterrupt, which (uncaught) also ends in -SIGINT."""
    prefix = "sct" + secrets.token_hex(3)
    p = _spawn_router(prefix)
    try:
        eq(_mine(prefix), [f"{prefix}-cli", f"{prefix}-rtr", f"{prefix}-srv"], "namespaces while up")
        p.send_signal(sig)
        eq(p.wait(timeout=15), -sig, f"exit status after {sig.name}")
    finally:
        _reap_router(p, prefix)
    eq(_mine(prefix), [], f"namespaces after {sig.name}")


def _reap_router(p, prefix):
    """Stop a spawned router process (if still up) and remove its namespaces."""
    if p.poll() is None:
        p.kill()
        p.wait(5)
    p.stdout.close()
    p.stderr.close()
    cleanup_stale(prefix, force=True)


def test_cleanup_stale_after_sigkill_spares_live_runs(make_router):
    live = make_router(MASQ)
    prefix = "sct" + secrets.token_hex(3)
    p = _spawn_router(prefix)
    try:
        eq(cleanup_stale(prefix), [], "cleanup_stale while the owner is alive")
        eq(len(_mine(prefix)), 3, "namespaces of a live owner kept")
        p.kill()
        p.wait(timeout=10)
        eq(len(_mine(prefix)), 3, "namespaces after SIGKILL (nothing could clean up)")
        removed = [n for n in cleanup_stale("sct*") if n.rpartition("-")[0] == prefix]
        eq(sorted(removed), [f"{prefix}-cli", f"{prefix}-rtr", f"{prefix}-srv"],
           "cleanup_stale removed")
    finally:
        _reap_router(p, prefix)
    eq(_mine(prefix), [], "namespaces after cleanup_stale")
    # the live router of this process was not touched
    eq(len(_mine(live.prefix)), 3, "live router namespaces")
    pkt = IP(src=live.client_ip, dst=live.server_ip) / UDP(sport=40006, dport=5000)
    one(live.exchange(CLIENT, frame(live, CLIENT, pkt)), "live router still forwards")
    with pytest.raises(ValueError):
        cleanup_stale("*")
    # a second router with a live prefix refuses to start and leaves the live one alone
    with pytest.raises(kernel_router.KernelRouterError):
        KernelRouter(prefix=live.prefix).start()
    eq(len(_mine(live.prefix)), 3, "live router namespaces after a prefix clash")
    one(live.exchange(CLIENT, frame(live, CLIENT, pkt)), "live router forwards after a clash")
