"""Capture I/O and the CLI: pcap/pcapng round trips against scapy, `shardct hash`,
`shardct replay` on the demo and on a capture it wrote."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw, rdpcap, wrpcap
from scapy.utils import PcapNgReader, PcapNgWriter

from shardct.batch import PacketBatch
from workers.pcapio import CaptureError, PcapngWriter, PcapWriter, read_capture

E = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02")


def frames(n=5):
    return [raw(E / IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=1000 + k, dport=53) / (b"x" * k))
            for k in range(n)]


def test_pcap_written_by_scapy_reads_back(tmp_path):
    pk = [Ether(f) for f in frames()]
    for k, p in enumerate(pk):
        p.time = 1700000000 + k / 1000
    wrpcap(str(tmp_path / "a.pcap"), pk)
    got = [b for b in read_capture(tmp_path / "a.pcap", interface="lan0", names=["lan0"])]
    b = got[0]
    assert b.frames() == frames(), "bytes"
    ifx = list(b.ifindex)
    assert ifx == [0] * 5, f"ifindex got {ifx}, want [0] * 5 (lan0)"
    want_ts = [1700000000_000_000_000 + k * 1_000_000 for k in range(5)]
    assert [int(t) for t in b.ts] == want_ts, f"got {list(b.ts)}, want {want_ts}"


def test_pcap_and_pcapng_written_by_us_read_by_scapy(tmp_path):
    b = PacketBatch.from_frames(frames(), ts=np.arange(5) * 1000 + 1_700_000_000_000_000_000,
                                ifindex=[0, 1, 0, 1, 0])
    with PcapWriter(str(tmp_path / "o.pcap")) as w:
        w.write_batch(b, mask=np.array([1, 1, 0, 1, 1], bool))
    got = [raw(p) for p in rdpcap(str(tmp_path / "o.pcap"))]
    want = [f for k, f in enumerate(frames()) if k != 2]
    assert got == want, f"pcap frames got {got}, want {want} (frame 2 masked out)"
    with PcapngWriter(str(tmp_path / "o.pcapng"), ["lan0", "wan0"]) as w:
        w.write_batch(b)
    got = [(raw(p), p.sniffed_on) for p in PcapNgReader(str(tmp_path / "o.pcapng"))]
    want = [(f, ["lan0", "wan0"][k % 2]) for k, f in enumerate(frames())]
    assert got == want, f"pcapng (frame, interface) got {got}, want {want}"
    back = list(read_capture(tmp_path / "o.pcapng", names=["wan0", "lan0"]))[0]
    got_frames, got_if = back.frames(), list(back.ifindex)
    assert got_frames == frames() and got_if == [1, 0, 1, 0, 1], \
        f"(frames, ifindex) got {(got_frames, got_if)}, want {(frames(), [1, 0, 1, 0, 1])}"
    assert [int(t) for t in back.ts] == [int(t) for t in b.ts], "ns timestamps survive"


def test_pcapng_written_by_scapy(tmp_path):
    w = PcapNgWriter(str(tmp_path / "s.pcapng"))
    for f in frames(3):
        w.write(Ether(f))
    w.close()
    got = list(read_capture(tmp_path / "s.pcapng"))
    first = got[0].frames()
    assert first == frames(3), f"frames got {first}, want {frames(3)}"


def test_truncated_pcap_counts_and_does_not_raise(tmp_path):
    wrpcap(str(tmp_path / "t.pcap"), [Ether(f) for f in frames()])
    data = (tmp_path / "t.pcap").read_bytes()
    (tmp_path / "t.pcap").write_bytes(data[:-3])
    stats = {}
    got = sum(len(b) for b in read_capture(tmp_path / "t.pcap", stats=stats))
    assert (got, stats["truncated"]) == (4, 1), \
        f"(packets, truncated) got {(got, stats['truncated'])}, want (4, 1)"


def test_wrong_linktype_names_the_file(tmp_path):
    wrpcap(str(tmp_path / "l.pcap"), [IP(raw(IP(dst="1.2.3.4")))], linktype=101)
    with pytest.raises(CaptureError, match="l.pcap.*link type 101"):
        list(read_capture(tmp_path / "l.pcap"))


def run(*args):
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_hash_matches_gvisor_vectors():
    r = run("hash", "--seed", "0", "--workers", "4", "tcp", "10.0.0.1:1234", "10.0.0.2:80")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "hash=0x715a03cf bucket=975 worker=0/4" in lines[0], lines[0]
    assert "hash=0xba4c849d bucket=1181 worker=0/4" in lines[1], lines[1]
    r = run("hash", "--seed", "0x12345678", "udp", "[b::2]:2", "[c::3]:3")
    assert "hash=0x1bbc6856 bucket=10326" in r.stdout, r.stdout


def test_cli_replay_demo_and_its_own_capture(tmp_path):
    out = tmp_path / "demo.pcapng"
    r = run("replay", "-w", str(out), "--list", "3", "--seed", "0x5eed")
    assert r.returncode == 0, r.stderr
    assert "accept=19050" in r.stdout and "insert=3250" in r.stdout, r.stdout
    assert "src=192.168.0.10 dst=192.168.0.1 sport=443 dport=20000" in r.stdout, \
        "the masqueraded reply tuple is listed"
    pk = list(PcapNgReader(str(out)))
    assert len(pk) == 19050, f"frames written got {len(pk)}, want 19050"
    assert pk[0][IP].src == "192.168.0.1" and pk[0].sniffed_on == "wan0", pk[0].summary()
    r = run("replay", str(out), "-c", "configs/demo.toml", "--list", "0", "--seed", "0x5eed")
    assert r.returncode == 0, r.stderr


def test_cli_replay_bad_config_names_file_and_line(tmp_path):
    (tmp_path / "bad.rules").write_text("*nat\n:POSTROUTING ACCEPT [0:0]\n"
                                        "-A POSTROUTING -j DNAT --to-destination 1.2.3.4\nCOMMIT\n")
    (tmp_path / "c.toml").write_text('[nat]\nrules = "bad.rules"\n')
    r = run("replay", "-c", str(tmp_path / "c.toml"))
    assert r.returncode == 2, f"exit code got {r.returncode}, want 2; stderr: {r.stderr}"
    assert "bad.rules:3" in r.stderr and "DNAT" in r.stderr, r.stderr


def test_cli_replay_through_the_pool_writes_the_same_capture(tmp_path):
    """`shardct replay --workers 2` (dispatcher + 2 worker processes) writes the demo's
    output byte for byte as the single-process replay does."""
    one, two = tmp_path / "one.pcapng", tmp_path / "two.pcapng"
    for out, workers in ((one, "1"), (two, "2")):
        p = subprocess.run([sys.executable, "-m", "workers.cli", "replay", "--list", "0",
                            "--seed", "0x5eed",
                            "--workers", workers, "-w", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    assert "lost_packets=0" in p.stdout and "handoffs=" in p.stdout, p.stdout
    # the demo's MASQUERADE rules: the dispatcher steers nothing
    assert re.search(r" steered=0 ", p.stdout), p.stdout
    one_b, two_b = one.read_bytes(), two.read_bytes()
    assert one_b == two_b, \
        f"--workers 2 capture got {len(two_b)} B, want --workers 1's {len(one_b)} B, byte for byte"


def test_cli_replay_writes_a_fragmented_datagram_nated_whole(tmp_path):
    """`shardct replay` (one process, the demo's MASQUERADE) holds the fragments of a UDP
    datagram, NATs it whole and writes it cut where the client cut it, out of wan0."""
    from scapy.layers.inet import fragment
    dgram = IP(src="10.0.0.2", dst="192.168.0.2", id=0x77) / UDP(sport=4444, dport=53) \
        / (b"f" * 3000)
    frs = fragment(dgram, 1400)
    wrpcap(str(tmp_path / "frags.pcap"), [E / f for f in frs[::-1]])
    out = tmp_path / "out.pcapng"
    r = run("replay", str(tmp_path / "frags.pcap"), "-c", "configs/demo.toml", "-i", "lan0",
            "--router", "-w", str(out), "--list", "0", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "queued=2" in r.stdout and "accept=1" in r.stdout, r.stdout
    pk = list(PcapNgReader(str(out)))
    got = [(p[IP].src, p[IP].id, p[IP].frag, len(p[IP]), p.sniffed_on) for p in pk]
    want = [("192.168.0.1", 0x77, f.frag, len(f), "wan0") for f in frs]
    assert got == want, f"got {got}, want {want}"


def test_cli_replay_router_writes_its_own_icmp_errors(tmp_path):
    """`shardct replay --router` writes the engine's errors beside the forwarded frames,
    each right after the place of the frame it answers, on the interface the offending
    packet came in by: frag-needed for a DF datagram over wan0's mtu, port unreachable for
    UDP to the router's own address."""
    from scapy.all import ICMP
    (tmp_path / "r.toml").write_text(
        '[interfaces.lan0]\naddress = ["10.0.0.3/24"]\n'
        '[interfaces.wan0]\naddress = ["192.168.0.1/24"]\nmtu = 1400\n')
    sent = [E / IP(src="10.0.0.2", dst="192.168.0.2", flags="DF") / UDP(sport=1, dport=2) / (b"b" * 1422),
            E / IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=3, dport=4) / b"fits",
            E / IP(src="10.0.0.2", dst="10.0.0.3") / UDP(sport=5, dport=6) / b"anyone?"]
    with PcapngWriter(str(tmp_path / "in.pcapng"), ["lan0", "wan0"]) as w:
        w.write_batch(PacketBatch.from_frames([raw(p) for p in sent], ts=10**9, ifindex=0))
    r = run("replay", str(tmp_path / "in.pcapng"), "-c", str(tmp_path / "r.toml"), "--router",
            "-w", str(tmp_path / "out.pcapng"), "--list", "0", "--seed", "7")
    assert r.returncode == 0, r.stderr
    got = [(p.sniffed_on, p[IP].src, p[IP].dst) + ((p[ICMP].type, p[ICMP].code) if ICMP in p else ())
           for p in PcapNgReader(str(tmp_path / "out.pcapng"))]
    want = [("lan0", "10.0.0.3", "10.0.0.2", 3, 4), ("wan0", "10.0.0.2", "192.168.0.2"),
            ("lan0", "10.0.0.3", "10.0.0.2", 3, 3)]
    assert got == want, f"\ngot  {got}\nwant {want}"


def test_cli_replay_router_writes_fragments_and_errors_in_their_frames_places(tmp_path):
    """Fragments and the router's errors together: a datagram sent as DF fragments whose
    largest is over wan0's mtu gets one frag-needed, after its last fragment (its other
    fragments are held, unanswered); one without DF leaves re-fragmented at the mtu in the
    place of its last fragment; each error follows the frame it answers."""
    from scapy.all import ICMP
    from scapy.layers.inet import IPerror, fragment
    (tmp_path / "r.toml").write_text(
        '[interfaces.lan0]\naddress = ["10.0.0.3/24"]\n'
        '[interfaces.wan0]\naddress = ["192.168.0.1/24"]\nmtu = 1400\n')
    df = fragment(IP(src="10.0.0.2", dst="192.168.0.2", id=1, flags="DF") / UDP(sport=7, dport=8)
                  / (b"d" * 3000), 1480)
    nodf = fragment(IP(src="10.0.0.2", dst="192.168.0.2", id=2) / UDP(sport=9, dport=10)
                    / (b"n" * 3000), 1480)
    sent = [E / f for f in df] + [E / IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=3, dport=4) / b"fits"] \
        + [E / f for f in nodf] \
        + [E / IP(src="10.0.0.2", dst="10.0.0.3") / UDP(sport=5, dport=6) / b"anyone?",
           E / IP(src="10.0.0.2", dst="192.168.0.2", flags="DF") / UDP(sport=1, dport=2) / (b"b" * 1422)]
    with PcapngWriter(str(tmp_path / "in.pcapng"), ["lan0", "wan0"]) as w:
        w.write_batch(PacketBatch.from_frames([raw(p) for p in sent], ts=10**9, ifindex=0))
    r = run("replay", str(tmp_path / "in.pcapng"), "-c", str(tmp_path / "r.toml"), "--router",
            "-w", str(tmp_path / "out.pcapng"), "--list", "0", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert "queued=4" in r.stdout, r.stdout

    def row(p):
        if ICMP in p:
            q = p[IPerror]
            return (p.sniffed_on, p[IP].src, p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu, q.id, q.len)
        return (p.sniffed_on, p[IP].id, p[IP].frag, len(p[IP]))
    got = [row(p) for p in PcapNgReader(str(tmp_path / "out.pcapng"))]
    fits = IP(raw(sent[3][IP]))
    want = [("lan0", "10.0.0.3", 3, 4, 1400, 1, 3028), ("wan0", fits.id, 0, len(fits)),
            ("wan0", 2, 0, 1396), ("wan0", 2, 172, 1396), ("wan0", 2, 344, 276),
            ("lan0", "10.0.0.3", 3, 3, 0, 1, 35), ("lan0", "10.0.0.3", 3, 4, 1400, 1, 1450)]
    assert got == want, f"\ngot  {got}\nwant {want}"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_replay_into_a_closed_pipe_stops_quietly(workers):
    """`shardct replay --list -1 | head -1`: the reader leaves after one line; replay
    stops without a message (tcpdump's way) and exits 141 (128 + SIGPIPE)."""
    p = subprocess.Popen([sys.executable, "-m", "workers.cli", "replay", "--list", "-1",
                          "--seed", "7", "--workers", workers],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=600) == 141, err
    assert first.startswith(b"replayed "), first
    assert "Broken pipe" not in err and "Traceback" not in err, err
