# The conntrack table as struct-of-arrays: bucket heads, tuple chains (gVisor's bucket
# lists, one chain per head), conn slots with both tuples, status, timers, counters and
# TCP window state; a free list. No Python object per connection.
"""Connection table storage.

Layout (``cap`` conn slots, tuple id ``t = 2*conn + dir``, dir 0 original, 1 reply):

==========  ===============  ====================================================
heads       int32[nheads]    first tuple of each chain, -1 empty
tkey        uint64[2cap, 4]  src_hi, src_lo, dst_hi, dst_lo of each tuple
tport       uint32[2cap]     sport << 16 | dport
tnext       int32[2cap]      next tuple in the chain; for a free conn, tnext[2c] links
                             the free list
c64         int64[cap, 3]    EXPIRES (ns, absolute), BYTES0, BYTES1
c32         uint32[cap, 10]  PKTS0, PKTS1, then per direction d at 2+4d:
                             END, MAXEND, MAXWIN, MAXACK (Linux td_*); UDP keeps its
                             stream time (ns) in the first two words
c8          uint8[cap, 8]    PROTO, IPVER, STATE, SCALES (window scale of direction d in
                             bits 4d..4d+3), TFLAGS0, TFLAGS1, LAST (Linux's last_index,
                             last_dir, last_win == 0 and retrans, packed: ``LAST_*``),
                             ACKFP (fingerprint of the last ACK segment, see track.py)
cstatus     uint16[cap]      status bits (``S_*``, Linux numbering where Linux has one)
tbl         int64[...]       scalars: free list head, entry count, capacity, chain mask,
                             routing buckets, hash seed, event count, dying list
==========  ===============  ====================================================

In memory these are records, so that a lookup touches few cache lines: tkey, tport and
tnext are strided views into one 40-byte record per tuple (a conn's two tuples are
adjacent), and c64, c32, c8 and cstatus are views into one 74-byte record per conn. Kernels
see ordinary (non-contiguous) arrays and index them as above. Large tables sit on huge
pages (cpu.table_bytes).

Chains are indexed by ``hash & (nheads - 1)``; nheads is a power of two and a multiple
of the routing bucket count (a power of two too), so every chain lies inside one routing
bucket (``chain & (n_buckets - 1)``) and walking a routing bucket means walking chains
``b, b + n_buckets, b + 2*n_buckets, ...``.

Owner: one ConnTrack (one process). Kernels in ``track.py`` are the only writers; the
lookup (``find_tuple``) lives here so that both track.py and nat.py can use it.
"""
from __future__ import annotations

import numba
import numpy as np

from .cpu import table_bytes
from .errors import ConfigError

# c64 columns
EXPIRES, BYTES0, BYTES1 = 0, 1, 2
# c32 columns
PKTS0, PKTS1 = 0, 1
HOME, HCONN = 0, 1      # a reply entry (S_REMOTE) keeps its conn's home worker and id here
W_END, W_MAXEND, W_MAXWIN, W_MAXACK = 0, 1, 2, 3     # + 2 + 4*dir
UDP_STREAM_LO, UDP_STREAM_HI = 2, 3
N_C32 = 10
# c8 columns
PROTO, IPVER, STATE, SCALES, TFLAGS0, TFLAGS1, LAST, ACKFP = 0, 1, 2, 3, 4, 5, 6, 7
N_C8 = 8

# status bits
S_SEEN_REPLY = 1 << 1
S_ASSURED = 1 << 2
S_CONFIRMED = 1 << 3
S_SRC_NAT = 1 << 4
S_DST_NAT = 1 << 5
S_SRC_NAT_DONE = 1 << 7
S_DST_NAT_DONE = 1 << 8
S_DYING = 1 << 9
S_NEW_PENDING = 1 << 12   # confirmed, its first packet not yet accepted (no NEW event yet)
# sharded pool (shard.py): a table holds home conns and reply entries of conns homed elsewhere
S_REMOTE = 1 << 0     # reply entry: tuple 1 linked here, the conn lives at c32 HOME/HCONN
S_XSHARD = 1 << 6     # home conn whose reply tuple is in another shard's bucket
S_PENDING = 1 << 10   # cross-shard insertion not committed yet: its packets are parked
S_INVIS = 1 << 11     # pending and not yet holding its own (higher) bucket
S_LINK0 = 1 << 13     # original tuple is in a chain here
S_LINK1 = 1 << 14     # reply tuple is in a chain here
S_USED = 1 << 15      # slot allocated

# TCP window-tracking flags per direction (Linux IP_CT_TCP_FLAG_*)
TF_WINDOW_SCALE = 0x01
TF_SACK_PERM = 0x02
TF_CLOSE_INIT = 0x04
TF_BE_LIBERAL = 0x08
TF_DATA_UNACK = 0x10
TF_MAXACK_SET = 0x20

# the LAST byte: what Linux keeps of the last packet that passed the window checks (or
# was ignored), for the retransmission count, the zero-window cap and the answer to an
# out-of-window FIN/RST. The count saturates at LAST_RETRANS_MAX.
LAST_INDEX = 0x07           # its flag class index (tcp_packet's idx) + 1; 0 none yet
LAST_DIR = 0x08             # its direction
LAST_WIN0 = 0x10            # the last ACK segment advertised a zero window
LAST_RETRANS_SHIFT = 5      # bits 5..7: the same ACK segment seen again, times
LAST_RETRANS_MAX = 7

# tbl scalars
T_FREE, T_COUNT, T_CAP, T_MASK, T_NBUCKETS, T_SEED, T_EVN, T_NHEADS, T_DYING = range(9)
N_TBL = 9


# ---- lookup (used by the tracking and NAT kernels)

@numba.njit(inline="always", cache=True)
def chain_mask(tbl):
    """The chain index mask, known non-negative (nheads < 2**31), so indexing with
    ``h & mask`` skips numba's negative-index wraparound."""
    return tbl[T_MASK] & 0x7FFFFFFF


@numba.njit(inline="always", cache=True)
def tuple_is(tkey, tport, t, a0, a1, a2, a3, ports):
    """Whether tuple id t has these addresses and ports (protocol and family are the
    conn's: c8)."""
    return (tkey[t, 1] == a1 and tkey[t, 3] == a3 and np.int64(tport[t]) == ports
            and tkey[t, 0] == a0 and tkey[t, 2] == a2)


@numba.njit(inline="always", cache=True)
def find_tuple(heads, tkey, tport, tnext, c8, tbl, h, a0, a1, a2, a3, ports, proto, ipver):
    """Tuple id with this key in chain ``h & mask``, or -1. Does not look at expiry."""
    t = np.int64(heads[h & chain_mask(tbl)])
    while t >= 0:
        if tuple_is(tkey, tport, t, a0, a1, a2, a3, ports):
            c = t >> 1
            if np.int64(c8[c, PROTO]) == proto and np.int64(c8[c, IPVER]) == ipver:
                return t
        t = np.int64(tnext[t])
    return np.int64(-1)



TUPLE_RECORD = 40     # bytes per tuple: tkey, tport, tnext
CONN_RECORD = 74      # bytes per conn: c64, c32, c8, cstatus


def _field(raw: np.ndarray, n: int, record: int, offset: int, dtype, width: int = 0):
    """A view of one field of ``n`` records of ``record`` bytes in ``raw``: shape (n,)
    or (n, width) of ``dtype`` starting ``offset`` bytes into each record."""
    dt = np.dtype(dtype)
    if width:
        return np.ndarray((n, width), dt, buffer=raw, offset=offset,
                          strides=(record, dt.itemsize))
    return np.ndarray((n,), dt, buffer=raw, offset=offset, strides=(record,))


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


class ConnTable:
    """Arrays of one table. ``capacity`` conns; chains sized to one head per conn."""

    def __init__(self, capacity: int, n_buckets: int, seed: int):
        if capacity < 1:
            raise ConfigError("max_conns", f"got {capacity}, want >= 1")
        if n_buckets < 1 or n_buckets & (n_buckets - 1):
            raise ConfigError("n_buckets", f"got {n_buckets}, want a power of two")
        cap = int(capacity)
        nheads = max(_pow2_at_least(cap), n_buckets)
        self.heads = table_bytes(4 * nheads).view(np.int32)
        self.heads[:] = -1
        # tuple record: tkey (32 bytes), tport (4), tnext (4)
        self._trec = table_bytes(2 * cap * TUPLE_RECORD)
        self.tkey = _field(self._trec, 2 * cap, TUPLE_RECORD, 0, np.uint64, 4)
        self.tport = _field(self._trec, 2 * cap, TUPLE_RECORD, 32, np.uint32)
        self.tnext = _field(self._trec, 2 * cap, TUPLE_RECORD, 36, np.int32)
        self.tnext[:] = -1
        # conn record: c64 (24 bytes), c32 (40), c8 (8), cstatus (2)
        self._crec = table_bytes(cap * CONN_RECORD)
        self.c64 = _field(self._crec, cap, CONN_RECORD, 0, np.int64, 3)
        self.c32 = _field(self._crec, cap, CONN_RECORD, 24, np.uint32, N_C32)
        self.c8 = _field(self._crec, cap, CONN_RECORD, 64, np.uint8, N_C8)
        self.cstatus = _field(self._crec, cap, CONN_RECORD, 72, np.uint16)
        # free list: 0 -> 1 -> ... -> cap-1
        self.tnext[0:2 * cap:2] = np.arange(1, cap + 1, dtype=np.int32)
        self.tnext[2 * (cap - 1)] = -1
        self.tbl = np.zeros(N_TBL, dtype=np.int64)
        self.tbl[T_FREE] = 0
        self.tbl[T_CAP] = cap
        self.tbl[T_MASK] = nheads - 1
        self.tbl[T_NBUCKETS] = n_buckets
        self.tbl[T_SEED] = seed & 0xFFFFFFFF
        self.tbl[T_NHEADS] = nheads
        self.tbl[T_DYING] = -1

    @property
    def capacity(self) -> int:
        return int(self.tbl[T_CAP])

    @property
    def count(self) -> int:
        return int(self.tbl[T_COUNT])

    @property
    def seed(self) -> int:
        return int(self.tbl[T_SEED])

    def nbytes(self) -> int:
        """Bytes held by the table's arrays (everything a conn costs)."""
        return sum(a.nbytes for a in (self.heads, self._trec, self._crec,
                                      self.tbl))

    def arrays(self):
        return (self.heads, self.tkey, self.tport, self.tnext, self.c64, self.c32, self.c8,
                self.cstatus, self.tbl)
