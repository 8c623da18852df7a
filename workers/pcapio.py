# Capture files: classic pcap (both byte orders, us/ns timestamps) and pcapng (SHB, IDB
# with if_name/if_tsresol, EPB, SPB) read into PacketBatches, and written from them.
# Formats: pcap(5) / draft-ietf-opsawg-pcap; pcapng: draft-ietf-opsawg-pcapng.
"""Reading and writing captures.

``read_capture(path, batch_size=4096, interface=None, names=None)`` yields PacketBatches.
Interface ids in ``batch.ifindex`` index ``names`` (the engine's interface table): a
pcapng packet takes its IDB's ``if_name``; a plain pcap takes ``interface`` for all
packets; -1 when the name is not in ``names``. Only Ethernet link types are accepted.
A truncated last record ends the read and is counted in ``stats['truncated']``; it is
never an exception once the header is valid.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numba
import numpy as np

from shardct.batch import PacketBatch
from shardct.errors import ConfigError

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
LINKTYPE_ETHERNET = 1


class CaptureError(ConfigError):
    """A capture file cannot be read (names the file)."""


@numba.njit(cache=True)
def _walk_pcap(data, start, big, nsres, off, length, ts):
    """Record offsets of a pcap body. Returns (count, truncated)."""
    p = start
    n = 0
    end = data.shape[0]
    while p + 16 <= end and n < off.shape[0]:
        if big:
            sec = (np.int64(data[p]) << 24) | (np.int64(data[p + 1]) << 16) | (np.int64(data[p + 2]) << 8) | np.int64(data[p + 3])
            sub = (np.int64(data[p + 4]) << 24) | (np.int64(data[p + 5]) << 16) | (np.int64(data[p + 6]) << 8) | np.int64(data[p + 7])
            cap = (np.int64(data[p + 8]) << 24) | (np.int64(data[p + 9]) << 16) | (np.int64(data[p + 10]) << 8) | np.int64(data[p + 11])
        else:
            sec = np.int64(data[p]) | (np.int64(data[p + 1]) << 8) | (np.int64(data[p + 2]) << 16) | (np.int64(data[p + 3]) << 24)
            sub = np.int64(data[p + 4]) | (np.int64(data[p + 5]) << 8) | (np.int64(data[p + 6]) << 16) | (np.int64(data[p + 7]) << 24)
            cap = np.int64(data[p + 8]) | (np.int64(data[p + 9]) << 8) | (np.int64(data[p + 10]) << 16) | (np.int64(data[p + 11]) << 24)
        if p + 16 + cap > end:
            return n, True
        off[n] = p + 16
        length[n] = cap
        ts[n] = sec * 1_000_000_000 + (sub if nsres else sub * 1000)
        n += 1
        p += 16 + cap
    return n, p < end


def _iface_id(name, names):
    if name is None or names is None:
        return -1
    try:
        return names.index(name)
    except ValueError:
        return -1


def read_pcap(path, *, batch_size=4096, interface=None, names=None, stats=None):
    data = np.fromfile(path, dtype=np.uint8)
    if data.size < 24:
        raise CaptureError(str(path), "too short for a pcap header")
    magic_le = int.from_bytes(data[:4].tobytes(), "little")
    magic_be = int.from_bytes(data[:4].tobytes(), "big")
    if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        big, ns = False, magic_le == PCAP_MAGIC_NS
    elif magic_be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        big, ns = True, magic_be == PCAP_MAGIC_NS
    else:
        raise CaptureError(str(path), "not a pcap file (bad magic)")
    linktype = int.from_bytes(data[20:24].tobytes(), "big" if big else "little") & 0xFFFF
    if linktype != LINKTYPE_ETHERNET:
        raise CaptureError(str(path), f"link type {linktype} is not Ethernet (1)")
    maxn = max(1, (data.size - 24) // 16)
    off = np.empty(maxn, dtype=np.int64)
    length = np.empty(maxn, dtype=np.int32)
    ts = np.empty(maxn, dtype=np.int64)
    n, truncated = _walk_pcap(data, 24, big, ns, off, length, ts)
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + int(truncated)
        stats["packets"] = stats.get("packets", 0) + int(n)
    ifx = _iface_id(interface, names)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        yield PacketBatch(data, off[s:e].copy(), length[s:e].copy(),
                          np.full(e - s, ifx, dtype=np.int16), ts[s:e].copy())


def read_pcapng(path, *, batch_size=4096, names=None, stats=None):
    raw = Path(path).read_bytes()
    data = np.frombuffer(bytearray(raw), dtype=np.uint8)    # writable: NAT rewrites in place
    p = 0
    endian = "<"
    ifaces: list[tuple[str | None, int]] = []       # (name, ns per tick)
    off, length, ts, ifx = [], [], [], []
    truncated = 0

    def flush():
        if not off:
            return None
        b = PacketBatch(data, np.array(off, np.int64), np.array(length, np.int32),
                        np.array(ifx, np.int16), np.array(ts, np.int64))
        off.clear(), length.clear(), ts.clear(), ifx.clear()
        return b

    while p + 12 <= len(raw):
        btype_le = struct.unpack_from("<I", raw, p)[0]
        if btype_le == PCAPNG_SHB:
            bom = raw[p + 8:p + 12]
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">" if bom == b"\x1a\x2b\x3c\x4d" else None
            if endian is None:
                raise CaptureError(str(path), f"bad byte-order magic at offset {p}")
            ifaces = []
        btype, blen = struct.unpack_from(endian + "II", raw, p)
        if blen < 12 or blen % 4 or p + blen > len(raw):
            if p == 0:
                raise CaptureError(str(path), "not a pcapng file (bad first block)")
            truncated = 1
            break
        body = p + 8
        if btype == 1:          # interface description
            linktype = struct.unpack_from(endian + "H", raw, body)[0]
            if linktype != LINKTYPE_ETHERNET:
                raise CaptureError(str(path), f"interface {len(ifaces)}: link type {linktype} is not Ethernet (1)")
            name, tick = None, 1000       # default resolution: microseconds
            q = body + 8
            while q + 4 <= p + blen - 4:
                code, olen = struct.unpack_from(endian + "HH", raw, q)
                if code == 0:
                    break
                val = raw[q + 4:q + 4 + olen]
                if code == 2:
                    name = val.split(b"\0")[0].decode(errors="replace")
                elif code == 9 and olen >= 1:
                    r = val[0]
                    tick = (10 ** 9) // (10 ** (r & 0x7F)) if not r & 0x80 else max(1, int(1e9 / (2 ** (r & 0x7F))))
                q += 4 + ((olen + 3) & ~3)
            ifaces.append((name, tick))
        elif btype == 6:        # enhanced packet
            iid, hi, lo, cap, _orig = struct.unpack_from(endian + "IIIII", raw, body)
            if iid >= len(ifaces) or body + 20 + cap > p + blen:
                truncated = 1
            else:
                name, tick = ifaces[iid]
                off.append(body + 20)
                length.append(cap)
                ts.append(((hi << 32) | lo) * tick)
                ifx.append(_iface_id(name, names))
        elif btype == 3:        # simple packet
            olen = struct.unpack_from(endian + "I", raw, body)[0]
            cap = min(olen, blen - 16)
            name = ifaces[0][0] if ifaces else None
            off.append(body + 4)
            length.append(cap)
            ts.append(0)
            ifx.append(_iface_id(name, names))
        p += blen
        if len(off) >= batch_size:
            yield flush()
    if p < len(raw):
        truncated = 1
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + truncated
        stats["interfaces"] = [n for n, _ in ifaces]
    b = flush()
    if b is not None:
        yield b


def read_capture(path, *, batch_size=4096, interface=None, names=None, stats=None):
    """pcap or pcapng, chosen by the file's magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CaptureError(str(path), f"cannot read: {e.strerror}") from None
    if len(head) == 4 and int.from_bytes(head, "little") == PCAPNG_SHB:
        yield from read_pcapng(path, batch_size=batch_size, names=names, stats=stats)
    else:
        yield from read_pcap(path, batch_size=batch_size, interface=interface, names=names,
                             stats=stats)


def _select(batch: PacketBatch, mask):
    idx = np.arange(len(batch)) if mask is None else np.flatnonzero(mask)
    return idx


class _Writer:
    f = None

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PcapWriter(_Writer):
    """Classic pcap, nanosecond timestamps by default, little-endian, Ethernet."""

    def __init__(self, path, nanosecond=True, snaplen=262144):
        self.f = open(path, "wb")
        self.ns = nanosecond
        magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
        self.f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))

    def write_batch(self, batch: PacketBatch, mask=None, ifindex=None):
        idx = _select(batch, mask)
        if not len(idx):
            return
        ln = batch.length[idx].astype(np.int64)
        ts = batch.ts[idx]
        sec = ts // 1_000_000_000
        sub = ts % 1_000_000_000 if self.ns else (ts % 1_000_000_000) // 1000
        hdr = np.zeros((len(idx), 4), dtype="<u4")
        hdr[:, 0], hdr[:, 1], hdr[:, 2], hdr[:, 3] = sec, sub, ln, ln
        out = bytearray()
        hb = hdr.tobytes()
        for k, i in enumerate(idx):
            o = int(batch.off[i])
            out += hb[16 * k:16 * k + 16]
            out += batch.buf[o:o + int(batch.length[i])].tobytes()
        self.f.write(out)


class PcapngWriter(_Writer):
    """pcapng with one IDB per interface name (nanosecond resolution); ``ifindex`` per
    frame (default: the batch's) picks the IDB."""

    def __init__(self, path, interfaces: list[str]):
        self.f = open(path, "wb")
        shb_body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
        self.f.write(struct.pack("<II", PCAPNG_SHB, 12 + len(shb_body)) + shb_body
                     + struct.pack("<I", 12 + len(shb_body)))
        self.n_if = max(1, len(interfaces))
        for name in (interfaces or ["eth0"]):
            nb = name.encode()
            opt = struct.pack("<HH", 2, len(nb)) + nb + b"\0" * ((4 - len(nb) % 4) % 4)
            opt += struct.pack("<HHB", 9, 1, 9) + b"\0\0\0" + struct.pack("<HH", 0, 0)
            body = struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 262144) + opt
            self.f.write(struct.pack("<II", 1, 12 + len(body)) + body + struct.pack("<I", 12 + len(body)))

    def write_batch(self, batch: PacketBatch, mask=None, ifindex=None):
        idx = _select(batch, mask)
        ifs = batch.ifindex if ifindex is None else ifindex
        out = bytearray()
        for i in idx:
            o, ln = int(batch.off[i]), int(batch.length[i])
            pad = (4 - ln % 4) % 4
            blen = 32 + ln + pad
            t = int(batch.ts[i])
            iid = int(ifs[i]) if 0 <= int(ifs[i]) < self.n_if else 0
            out += struct.pack("<IIIIIII", 6, blen, iid, t >> 32, t & 0xFFFFFFFF, ln, ln)
            out += batch.buf[o:o + ln].tobytes() + b"\0" * pad + struct.pack("<I", blen)
        self.f.write(out)
