"""Bad input to the CLI: one line naming the file (and offset), never a traceback; exit 2
when the capture is unusable, 1 when it was replayed up to damage (tcpdump-like).
Linux cooked captures (SLL 113, SLL2 276) replay as the Ethernet capture they carry."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw, wrpcap
from scapy.layers.l2 import CookedLinux, CookedLinuxV2

from workers.cli import main
from workers.pcapio import CaptureError, PcapngWriter, read_capture
from shardct.batch import PacketBatch

E = Ether(dst="02:00:00:00:00:03", src="02:00:00:00:00:02")
N = 20


def payloads(n=N):
    return [IP(src="10.0.0.2", dst="192.168.0.2") / UDP(sport=1000 + k, dport=53) / (b"x" * k)
            for k in range(n)]


def frames(n=N):
    return [raw(E / p) for p in payloads(n)]


def replay(capsys, path, *extra):
    """(exit code, stdout, stderr) of `shardct replay path`, in this process."""
    rc = main(["replay", str(path), "--list", "0", "--seed", "1", *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


@pytest.fixture
def good(tmp_path):
    wrpcap(str(tmp_path / "good.pcap"), [Ether(f) for f in frames()])
    return tmp_path / "good.pcap"


def record_offsets(data: bytes):
    offs, p = [], 24
    while p + 16 <= len(data):
        offs.append(p)
        p += 16 + struct.unpack_from("<I", data, p + 8)[0]
    return offs


def test_unusable_captures_one_line_exit_2(tmp_path, capsys, good):
    cases = {
        "missing.pcap": (None, "cannot read"),
        "empty.pcap": (b"", "empty file"),
        "text.pcap": (b"hello, this is not a capture at all\n", "not a pcap or pcapng file"),
        "short.pcap": (good.read_bytes()[:20], "pcap header cut off (20 of 24 bytes)"),
        "ng.pcapng": (struct.pack("<I", 0x0A0D0D0A) + b"\x03\0\0\0" * 6, "not a pcapng file"),
        "ng20.pcapng": (struct.pack("<I", 0x0A0D0D0A) + b"\x03\0\0\0" * 4, "cut off (20 of 28"),
    }
    wrpcap(str(tmp_path / "l101.pcap"), [IP(raw(IP(dst="1.2.3.4")))], linktype=101)
    for name, (data, want) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        rc, out, err = replay(capsys, tmp_path / name)
        assert rc == 2, f"{name}: exit code got {rc}, want 2; stderr {err!r}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and want in lines[0], \
            f"{name}: stderr got {err!r}, want one line naming the file with {want!r}"
    rc, out, err = replay(capsys, tmp_path / "l101.pcap")
    assert rc == 2 and "l101.pcap: link type 101 is not supported" in err, (rc, err)


def test_damaged_captures_replay_what_is_whole_and_warn(tmp_path, capsys, good):
    data = good.read_bytes()
    offs = record_offsets(data)
    huge = bytearray(data)
    struct.pack_into("<I", huge, offs[3] + 8, 2**31)
    cases = {
        "cut.pcap": (data[:-5], N - 1, f"offset {offs[-1]}: record {N}: cut off"),
        "huge.pcap": (bytes(huge), 3, f"offset {offs[3]}: record 4: cut off (claims 2147483648 bytes"),
        "half.pcap": (data[:offs[5] + 7], 5, f"offset {offs[5]}: record 6: header cut off"),
    }
    for name, (blob, n, want) in cases.items():
        (tmp_path / name).write_bytes(blob)
        rc, out, err = replay(capsys, tmp_path / name)
        assert rc == 1, f"{name}: exit code got {rc}, want 1; stderr {err!r}"
        assert f"replayed {n} packets" in out, f"{name}: want {n} packets replayed; {out!r}"
        warn = [ln for ln in err.splitlines() if "warning" in ln]
        assert len(warn) == 1 and name in warn[0] and want in warn[0], \
            f"{name}: warning got {err!r}, want one line with {want!r}"
    rc, out, err = replay(capsys, good)
    assert rc == 0 and "warning" not in err, (rc, err)


def pcapng(tmp_path, name, mutate):
    """A pcapng written by us (SHB, IDB, EPBs), then ``mutate(bytearray, block offsets)``."""
    b = PacketBatch.from_frames(frames(5), ts=np.arange(5) + 10**18, ifindex=[0] * 5)
    with PcapngWriter(str(tmp_path / name), ["eth0"]) as w:
        w.write_batch(b)
    data = bytearray((tmp_path / name).read_bytes())
    blocks, p = [], 0
    while p < len(data):
        blocks.append(p)
        p += struct.unpack_from("<I", data, p + 4)[0]
    mutate(data, blocks)
    (tmp_path / name).write_bytes(bytes(data))
    return tmp_path / name, blocks


def test_damaged_pcapng_warns_with_offset(tmp_path, capsys):
    def epb_first(d, blocks):            # move the IDB after the first EPB
        idb = d[blocks[1]:blocks[2]]
        epb = d[blocks[2]:blocks[3]]
        d[blocks[1]:blocks[3]] = epb + idb

    def len3(d, blocks):
        struct.pack_into("<I", d, blocks[4] + 4, 3)

    def cut(d, blocks):
        del d[-6:]

    path, blocks = pcapng(tmp_path, "early.pcapng", epb_first)
    rc, out, err = replay(capsys, path)
    assert rc == 1 and "replayed 4 packets" in out, (rc, out, err)
    assert f"early.pcapng: warning: offset {blocks[1]}: packet block for interface 0 before its description" in err, err
    path, blocks = pcapng(tmp_path, "len3.pcapng", len3)
    rc, out, err = replay(capsys, path)
    assert rc == 1 and "replayed 2 packets" in out, (rc, out, err)
    assert f"len3.pcapng: warning: offset {blocks[4]}: bad block length 3" in err, err
    path, blocks = pcapng(tmp_path, "cut.pcapng", cut)
    rc, out, err = replay(capsys, path)
    assert rc == 1 and "replayed 4 packets" in out, (rc, out, err)
    assert f"offset {blocks[-1]}: block cut off" in err, err


@pytest.mark.parametrize("linktype,layer", [(113, CookedLinux), (276, CookedLinuxV2)])
def test_linux_cooked_capture_reads_as_ethernet(tmp_path, capsys, linktype, layer):
    src = bytes.fromhex("020000000002") + b"\0\0"
    cooked = [layer(lladdrtype=1, lladdrlen=6, src=src) / p for p in payloads()]
    wrpcap(str(tmp_path / "c.pcap"), cooked, linktype=linktype)
    got = [f for b in read_capture(tmp_path / "c.pcap", batch_size=7) for f in b.frames()]
    want = [raw(Ether(dst="00:00:00:00:00:00", src="02:00:00:00:00:02") / p) for p in payloads()]
    assert got == want, f"link type {linktype}: frames got {got[:1]}..., want {want[:1]}..."
    # pcapng with one cooked interface: the same frames
    from scapy.utils import PcapNgWriter
    w = PcapNgWriter(str(tmp_path / "c.pcapng"))
    w.linktype = linktype
    for p in cooked:
        w.write(p)
    w.close()
    got = [f for b in read_capture(tmp_path / "c.pcapng") for f in b.frames()]
    assert got == want, f"pcapng link type {linktype}: frames differ"
    wrpcap(str(tmp_path / "e.pcap"), [Ether(f) for f in frames()])
    rc, out_cooked, err = replay(capsys, tmp_path / "c.pcap")
    assert rc == 0, err
    rc, out_eth, err = replay(capsys, tmp_path / "e.pcap")
    summary = [ln for ln in out_cooked.splitlines() if ln.startswith(("cpu=", "entries="))]
    want_summary = [ln for ln in out_eth.splitlines() if ln.startswith(("cpu=", "entries="))]
    assert summary == want_summary and "insert=20" in summary[0], (summary, want_summary)


def test_cooked_record_shorter_than_its_header_is_an_empty_frame(tmp_path):
    good = raw(CookedLinux(lladdrtype=1, lladdrlen=6, src=b"\2" * 8) / payloads(1)[0])
    wrpcap(str(tmp_path / "s.pcap"), [good, good[:9], good], linktype=113)
    b = next(read_capture(tmp_path / "s.pcap"))
    assert list(b.length) == [len(good) - 2, 0, len(good) - 2], list(b.length)
    assert b.frame(2) == b.frame(0), "the record after a short one is untouched"


@pytest.mark.parametrize("argv,want", [
    (["replay", "--workers", "0"], "--workers: '0': want 1..256 or 'auto'"),
    (["replay", "--workers", "-1"], "--workers: '-1': want 1..256 or 'auto'"),
    (["replay", "--workers", "many"], "--workers: 'many'"),
    (["replay", "--workers", "257"], "want 1..256"),
    (["replay", "--batch", "0"], "--batch: '0': want a positive integer"),
    (["replay", "--round", "x"], "--round: 'x' is not an integer"),
    (["replay", "--seed", "-1"], "--seed: '-1': want 0..0xffffffff"),
    (["replay", "--seed", "0x100000000"], "want 0..0xffffffff"),
    (["hash", "tcp", "10.0.0.1:1", "10.0.0.2:2"], "--seed"),
    (["live", "-i", "lo", "--workers", "0"], "want 1..256"),
])
def test_bad_options_refused_in_one_line(capsys, argv, want):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, f"{argv}: exit code got {e.value.code}, want 2"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and want in lines[0], f"{argv}: stderr got {err!r}, want one line with {want!r}"


def test_replay_draws_and_prints_a_seed(capsys, good):
    seeds = []
    for _ in range(2):
        assert main(["replay", str(good), "--list", "0"]) == 0
        err = capsys.readouterr().err
        line = [ln for ln in err.splitlines() if "seed 0x" in ln]
        assert len(line) == 1, f"want one 'seed 0x...' line on stderr, got {err!r}"
        seeds.append(int(line[0].split("seed ")[1].split()[0], 16))
    assert seeds[0] != seeds[1], f"two runs drew the same seed {seeds[0]:#x}"
    main(["replay", str(good), "--list", "0", "--seed", "0x5eed"])
    assert "seed 0x" not in capsys.readouterr().err, "a given seed is not drawn again"


def test_dispatcher_death_is_one_line_with_what_was_lost(capsys, monkeypatch):
    """`shardct replay --workers 2` whose dispatcher is killed: exit 3, one line saying
    why and how many packets were lost, no traceback."""
    import os
    import signal

    from workers import replay as R
    from workers.pool import Pool
    pools = []
    start = Pool.start

    def recording_start(self):
        start(self)
        pools.append(self)

    batches = R._batches

    def killing_batches(args, names, size=None, stats=None):
        it = batches(args, names, 1024, stats)      # the demo in small batches

        def gen():
            yield next(it)
            pool = pools[0]
            pool.wait_ready(600)
            d = pool.sup.procs[pool.n]
            os.kill(d.pid, signal.SIGKILL)
            d.join(10)
            yield from it
        return gen()

    monkeypatch.setattr(Pool, "start", recording_start)
    monkeypatch.setattr(R, "_batches", killing_batches)
    rc = main(["replay", "--workers", "2", "--seed", "1", "--list", "0"])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("shardct replay:")]
    assert rc == 3, f"exit code got {rc}, want 3; stderr {err!r}"
    assert len(lines) == 1 and "the dispatcher died" in lines[0] and " packets handed to it" in lines[0], \
        f"stderr got {err!r}, want one line naming the dispatcher's death and the loss"
