# Capture files: classic pcap (both byte orders, us/ns timestamps) and pcapng (SHB, IDB
# with if_name/if_tsresol, EPB, SPB) read into PacketBatches, and written from them.
# Formats: pcap(5) / draft-ietf-opsawg-pcap; pcapng: draft-ietf-opsawg-pcapng.
"""Reading and writing captures.

``read_capture(path, batch_size=4096, interface=None, names=None)`` yields PacketBatches.
Interface ids in ``batch.ifindex`` index ``names`` (the engine's interface table): a
pcapng packet takes its IDB's ``if_name``; a plain pcap takes ``interface`` for all
packets; -1 when the name is not in ``names``. Ethernet (1) and Linux cooked captures
(SLL 113, SLL2 276, as ``tcpdump -i any`` writes) are accepted; cooked records become
Ethernet frames in place (``cooked_to_ethernet``), so the engine sees one link type.

A file that is not a capture at all (missing, empty, no magic, a header cut short, an
unsupported link type) raises CaptureError naming the file. Damage after a valid header
(a record cut off or claiming more bytes than are left, a block of a bad length, a packet
block before its interface description) is never an exception: what is whole is read,
``stats['truncated']`` counts the stops and ``stats['warnings']`` lists
``"offset N: ..."`` texts, the first of which a CLI prints (tcpdump-like).
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
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
LINKTYPES = {LINKTYPE_ETHERNET: "Ethernet", LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
             LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)"}
COOKED_HDR = {LINKTYPE_LINUX_SLL: 16, LINKTYPE_LINUX_SLL2: 20}
ETH_HDR = 14


class CaptureError(ConfigError):
    """A capture file cannot be read (names the file)."""


def _linktype_error(path, linktype, where=""):
    known = ", ".join(f"{v} {k}" for k, v in LINKTYPES.items())
    return CaptureError(str(path), f"{where}link type {linktype} is not supported ({known})")


def cooked_to_ethernet(buf, off, length, linktype):
    """Linux cooked records (SLL: 16-byte header, SLL2: 20) rewritten in place as Ethernet
    frames: the last 14 bytes of the cooked header become destination MAC 0, source MAC
    = the link-layer address the header carries, ethertype = its protocol field. Returns
    the new (off, length); a record shorter than its header becomes an empty frame (the
    engine counts it invalid). Vectorised over the records; ``off``/``length`` are not
    modified."""
    hdr = COOKED_HDR[linktype]
    off = off.astype(np.int64)
    length = length.astype(np.int32)
    whole = length >= hdr
    o = off[whole]
    six = np.arange(6)
    if linktype == LINKTYPE_LINUX_SLL:
        # pkttype 0-1, hatype 2-3, addrlen 4-5, addr 6-13, protocol 14-15
        src = buf[(o + 6)[:, None] + six]                  # a copy: the stretches overlap
        buf[(o + 8)[:, None] + six] = src
        buf[(o + 2)[:, None] + six] = 0
    else:
        # protocol 0-1, reserved 2-3, ifindex 4-7, hatype 8-9, pkttype 10, addrlen 11,
        # addr 12-19: the source MAC is already where Ethernet wants it (12-17)
        proto = buf[o[:, None] + np.arange(2)]
        buf[(o + 18)[:, None] + np.arange(2)] = proto
        buf[(o + 6)[:, None] + six] = 0
    shift = hdr - ETH_HDR
    new_off = np.where(whole, off + shift, off)
    new_len = np.where(whole, length - shift, 0).astype(np.int32)
    return new_off, new_len


@numba.njit(cache=True)
def _walk_pcap(data, start, big, nsres, off, length, ts):
    """Record offsets of a pcap body. Returns (count, offset where it stopped); the
    offset is the file's end unless the record there is cut off."""
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
            return n, p
        off[n] = p + 16
        length[n] = cap
        ts[n] = sec * 1_000_000_000 + (sub if nsres else sub * 1000)
        n += 1
        p += 16 + cap
    return n, p


def _iface_id(name, names):
    if name is None or names is None:
        return -1
    try:
        return names.index(name)
    except ValueError:
        return -1


def _warn(stats, text):
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + 1
        stats.setdefault("warnings", []).append(text)


def _cut_off(data, p, n, big):
    """The warning for pcap record n (0-based) at offset p that does not fit."""
    left = data.size - p
    if left < 16:
        return f"offset {p}: record {n + 1}: header cut off ({left} of 16 bytes)"
    cap = int.from_bytes(data[p + 8:p + 12].tobytes(), "big" if big else "little")
    return (f"offset {p}: record {n + 1}: cut off (claims {cap} bytes, "
            f"{left - 16} left in the file)")


def read_pcap(path, *, batch_size=4096, interface=None, names=None, stats=None):
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise CaptureError(str(path), f"cannot read: {e.strerror or e}") from None
    if data.size == 0:
        raise CaptureError(str(path), "empty file, not a capture")
    magic_le = int.from_bytes(data[:4].tobytes(), "little")
    magic_be = int.from_bytes(data[:4].tobytes(), "big")
    if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        big, ns = False, magic_le == PCAP_MAGIC_NS
    elif magic_be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        big, ns = True, magic_be == PCAP_MAGIC_NS
    else:
        head = data[:8].tobytes()
        raise CaptureError(str(path), f"not a pcap or pcapng file (starts with {head!r})")
    if data.size < 24:
        raise CaptureError(str(path), f"pcap header cut off ({data.size} of 24 bytes)")
    linktype = int.from_bytes(data[20:24].tobytes(), "big" if big else "little") & 0xFFFF
    if linktype not in LINKTYPES:
        raise _linktype_error(path, linktype)
    maxn = max(1, (data.size - 24) // 16)
    off = np.empty(maxn, dtype=np.int64)
    length = np.empty(maxn, dtype=np.int32)
    ts = np.empty(maxn, dtype=np.int64)
    n, stop = _walk_pcap(data, 24, big, ns, off, length, ts)
    if stop < data.size:
        _warn(stats, _cut_off(data, stop, n, big))
    if stats is not None:
        stats["packets"] = stats.get("packets", 0) + int(n)
    off, length = off[:n], length[:n]
    if linktype != LINKTYPE_ETHERNET:
        off, length = cooked_to_ethernet(data, off, length, linktype)
    ifx = _iface_id(interface, names)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        yield PacketBatch(data, off[s:e].copy(), length[s:e].copy(),
                          np.full(e - s, ifx, dtype=np.int16), ts[s:e].copy())


def read_pcapng(path, *, batch_size=4096, names=None, stats=None):
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise CaptureError(str(path), f"cannot read: {e.strerror or e}") from None
    if len(raw) < 28:
        raise CaptureError(str(path), f"pcapng section header cut off ({len(raw)} of 28 bytes)")
    data = np.frombuffer(bytearray(raw), dtype=np.uint8)    # writable: NAT rewrites in place
    p = 0
    endian = "<"
    ifaces: list[tuple[str | None, int, int]] = []     # (name, ns per tick, link type)
    off, length, ts, ifx = [], [], [], []
    cooked = []                 # (index in off, link type) of the non-Ethernet records

    def flush():
        if not off:
            return None
        o, ln = np.array(off, np.int64), np.array(length, np.int32)
        if cooked:
            at, lts = np.array(cooked, np.int64).T
            for linktype in COOKED_HDR:
                m = at[lts == linktype]
                if len(m):
                    o[m], ln[m] = cooked_to_ethernet(data, o[m], ln[m], linktype)
        b = PacketBatch(data, o, ln, np.array(ifx, np.int16), np.array(ts, np.int64))
        for x in (off, length, ts, ifx, cooked):
            x.clear()
        return b

    def packet(at, cap, tstamp, iid):
        name, tick, linktype = ifaces[iid]
        off.append(at)
        length.append(cap)
        ts.append(tstamp * tick)
        ifx.append(_iface_id(name, names))
        if linktype != LINKTYPE_ETHERNET:
            cooked.append((len(off) - 1, linktype))

    while p < len(raw):
        if p + 12 > len(raw):
            _warn(stats, f"offset {p}: block header cut off ({len(raw) - p} of 12 bytes)")
            break
        btype_le = struct.unpack_from("<I", raw, p)[0]
        if btype_le == PCAPNG_SHB:
            bom = raw[p + 8:p + 12]
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">" if bom == b"\x1a\x2b\x3c\x4d" else None
            if endian is None:
                if p == 0:
                    raise CaptureError(str(path), "not a pcapng file (bad byte-order magic)")
                _warn(stats, f"offset {p}: section header with a bad byte-order magic")
                break
            ifaces = []
        btype, blen = struct.unpack_from(endian + "II", raw, p)
        if blen < 12 or blen % 4 or p + blen > len(raw):
            if p == 0:
                raise CaptureError(str(path), f"not a pcapng file (first block length {blen})")
            why = (f"bad block length {blen}" if blen < 12 or blen % 4 else
                   f"block cut off (claims {blen} bytes, {len(raw) - p} left in the file)")
            _warn(stats, f"offset {p}: {why}")
            break
        body = p + 8
        if btype == 1:          # interface description
            if blen < 20:
                _warn(stats, f"offset {p}: interface description of {blen} bytes (want >= 20)")
                p += blen
                continue
            linktype = struct.unpack_from(endian + "H", raw, body)[0]
            if linktype not in LINKTYPES:
                raise _linktype_error(path, linktype, f"interface {len(ifaces)} (offset {p}): ")
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
                    tick = (10 ** 9) // (10 ** min(r & 0x7F, 9)) if not r & 0x80 else max(1, int(1e9 / (2 ** (r & 0x7F))))
                q += 4 + ((olen + 3) & ~3)
            ifaces.append((name, tick, linktype))
        elif btype == 6:        # enhanced packet
            if blen < 32:
                _warn(stats, f"offset {p}: packet block of {blen} bytes (want >= 32)")
            else:
                iid, hi, lo, cap, _orig = struct.unpack_from(endian + "IIIII", raw, body)
                if iid >= len(ifaces):
                    _warn(stats, f"offset {p}: packet block for interface {iid} before its "
                                 f"description (skipped)")
                elif body + 20 + cap > p + blen - 4:
                    _warn(stats, f"offset {p}: packet block claims {cap} bytes in a "
                                 f"{blen}-byte block (skipped)")
                else:               # the common block: no call per packet
                    name, tick, linktype = ifaces[iid]
                    off.append(body + 20)
                    length.append(cap)
                    ts.append(((hi << 32) | lo) * tick)
                    ifx.append(_iface_id(name, names))
                    if linktype != LINKTYPE_ETHERNET:
                        cooked.append((len(off) - 1, linktype))
        elif btype == 3:        # simple packet
            if blen < 16 or not ifaces:
                _warn(stats, f"offset {p}: simple packet block "
                             + ("before any interface description" if blen >= 16 else
                                f"of {blen} bytes (want >= 16)") + " (skipped)")
            else:
                olen = struct.unpack_from(endian + "I", raw, body)[0]
                packet(body + 4, min(olen, blen - 16), 0, 0)
        p += blen
        if len(off) >= batch_size:
            yield flush()
    if stats is not None:
        stats["interfaces"] = [n for n, _, _ in ifaces]
    b = flush()
    if b is not None:
        yield b


def read_capture(path, *, batch_size=4096, interface=None, names=None, stats=None):
    """pcap or pcapng, chosen by the file's magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CaptureError(str(path), f"cannot read: {e.strerror or e}") from None
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
