# The tracking kernels: lookup, conn creation and confirm, TCP/UDP/ICMP/generic state
# updates with Linux's rules (nf_conntrack_proto_*.c), counters, events, early drop and
# the bounded reaper (gVisor reapUnused). Compiled with numba; no Python per packet.
"""Per-packet tracking over a parsed batch.

``track_batch`` walks packets in order from ``start``. For each packet it looks the tuple
up, creates and confirms a conn when the packet may start one, updates the protocol
state, the counters and the timer, and writes a verdict and the tuple id it matched.
It stops early, returning the index, only at a packet that needs a decision made in
Python (a new conn the compiled NAT decision, nat.py, cannot settle, or every new conn
with ``cfg[CF_NAT] == NAT_PYTHON``); the caller decides and calls again from that index.
Order is therefore exactly packet order.

Time: each packet carries its own ``now`` (``ts[i]``, ns); a conn is expired when
``now > expires`` (strict, as gVisor and Linux).

Owner: the single thread of the process holding the table.
"""
from __future__ import annotations

import numba
import numpy as np

from .cpu import kernel, prefetch
from .hashing import hash_key
from .table import (S_NEW_PENDING, BYTES0, EXPIRES, IPVER, PKTS0, PROTO, S_ASSURED, S_CONFIRMED,
                    S_DST_NAT, S_DYING, S_INVIS, S_LINK0, S_LINK1, S_PENDING, S_REMOTE,
                    S_SEEN_REPLY, S_SRC_NAT, S_USED, S_XSHARD, T_DYING,
                    SCALES, STATE, T_COUNT, T_EVN, T_FREE, T_MASK, T_NBUCKETS, T_NHEADS,
                    T_SEED, TF_BE_LIBERAL, TF_CLOSE_INIT, TF_DATA_UNACK, TF_MAXACK_SET,
                    TF_SACK_PERM, TF_WINDOW_SCALE, TFLAGS0, UDP_STREAM_HI, UDP_STREAM_LO,
                    W_END, W_MAXACK, W_MAXEND, W_MAXWIN, ACKFP, LAST, LAST_DIR, LAST_INDEX,
                    LAST_RETRANS_MAX, LAST_RETRANS_SHIFT, LAST_WIN0,
                    chain_mask, find_tuple, tuple_is)    # the lookup lives in table.py; K.find_tuple
from .tcpstate import TRANSITIONS, IG, IV
from .nat import D_DROP, D_PYTHON, nat_decide
from .rewrite import decrement_ttl, icmp_recompute, rewrite_header
from .wire import (CLS_INVALID, CLS_NOTIP, CLS_RELATED, CLS_TRACK, CLS_UNTRACKED,
                   M_ACK, M_CLS, M_ECHO, M_INNER_L3, M_INNER_L4, M_IPVER, M_L3, M_L3LEN, M_L4, M_PAYLEN, M_PORTS, M_PROTO,
                   M_REASON, M_SACKPERM, M_SEQ, M_TFLAGS, M_WIN, M_WSCALE, REASON_NAMES, HOP_EXPIRED,
                   icmp_query, load_addr)

# ---- configuration (cfg int64 array)
(CF_BE_LIBERAL, CF_LOOSE, CF_MAX_CONNS, CF_EVENTS, CF_IGNORE_INVALID_RST, CF_NAT, CF_ROUTER,
 CF_SHARD_LO, CF_SHARD_HI, CF_MAX_RETRANS, CF_HOLD) = range(11)
N_CFG = 11          # CF_SHARD_LO..HI: the routing buckets this table owns (all by default);
                    # CF_HOLD: a shard's first pass of a round (see track_batch)
# cfg[CF_ROUTER] bits: drop broken IP headers and trim trailers (ip_rcv_core); take the
# hop (TTL / hop limit) of forwarded packets (ip_forward)
RT_CHECK, RT_TTL = 1, 2
# cfg[CF_NAT]: no NAT; every new conn stops for Python; new conns decided in the kernel
NAT_OFF, NAT_PYTHON, NAT_COMPILED = 0, 1, 2

# ---- timeouts (tmo int64 array, ns): TCP states 0..9, then these
TMO_RETRANS, TMO_UNACK, TMO_UDP, TMO_UDP_STREAM, TMO_ICMP, TMO_GENERIC = 10, 11, 12, 13, 14, 15
TMO_CLOSE = 8       # the CLOSE state's: Linux gives any RST that passes this timeout
INVALID_LOWER_FROM = 120_000_000_000    # nf_tcp_handle_invalid leaves conns with < 120 s left
N_TMO = 16

# ---- verdicts
V_ACCEPT, V_RELATED, V_UNTRACKED, V_INVALID, V_DROP, V_NOTIP = 0, 1, 2, 3, 4, 5
# sharded pool only (shard.py; never leave a worker): wait for a cross-shard insertion,
# go to the conn's home, go back to the owner of the packet's own bucket, wait for the
# round's handoffs to its conn (home of a cross-shard conn), wait for the conns the
# round's earlier packets create elsewhere (a miss that may answer one of them)
V_PARK, V_HANDOFF, V_BOUNCE, V_HOLD, V_DEFER = 6, 7, 8, 9, 10
# a fragment held for reassembly (frag.py; Linux's NF_STOLEN): it does not leave itself
V_QUEUED = 11
PENDING_EXPIRES = np.int64(2**63 - 1)   # a pending conn's expiry: never, until committed
V_PENDING = 255
VERDICT_NAMES = ("accept", "related", "untracked", "invalid", "drop", "not_ip", "park",
                 "handoff", "bounce", "hold", "defer", "queued")
# given[i] for packets without a known conn: fresh from the dispatcher (count it, take
# its router hop) or already counted by an earlier pass; either may be deferrable
G_FRESH, G_COUNTED, G_FRESH_DEFER, G_COUNTED_DEFER = -1, -2, -3, -4
# a negative given[i] is -1 - x, x a bit set: counted, deferrable (the four above), and
# from the dispatcher: PURE (every packet of its tuple and the inverted tuple went to
# this shard this round: no handoff can come for a conn of them) and STEER (sent to the
# home of the conn it likely answers; x >> G_HASH_SHIFT is the tuple hash of its
# inverted tuple, that conn's original). See track_batch.
GX_COUNTED, GX_DEFER, GX_PURE, GX_STEER = 1, 2, 4, 8
G_HASH_SHIFT = 4
# pconn[i] of the packet that created a conn *surely* (see create_conn): the tuple id
# with this bit set; the shard reserves the reply tuple and clears it
SURE_TAG = np.int64(1) << 62

# ---- statistics (stats int64 array). The first eight are conntrack -S's names.
(ST_FOUND, ST_INVALID, ST_INSERT, ST_INSERT_FAILED, ST_DROP, ST_EARLY_DROP, ST_ERROR,
 ST_SEARCH_RESTART, ST_UNTRACKED, ST_NOT_IP, ST_IGNORE, ST_NEW, ST_DESTROY, ST_EXPIRED,
 ST_RELATED, ST_EVENTS_LOST, ST_PACKETS, ST_NAT_FAILED, ST_CLASH_RESOLVE, ST_TTL_EXPIRED,
 ST_NAT_REWRITES) = range(21)
STAT_NAMES = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop", "error",
              "search_restart", "untracked", "not_ip", "ignore", "new", "destroy", "expired",
              "related", "events_lost", "packets", "nat_failed", "clash_resolve", "ttl_expired",
              "nat_rewrites")
# invalid reasons: parse reasons first, then the tracker's own
INV_BASE = 32
INV_TCP_STATE = len(REASON_NAMES)         # state table says invalid
INV_TCP_WINDOW = INV_TCP_STATE + 1        # out of window
INV_TCP_RST = INV_TCP_STATE + 2           # RST with a bad sequence
INV_NOT_NEW = INV_TCP_STATE + 3           # packet cannot start a conn (SYN/ACK, echo reply...)
INVALID_NAMES = REASON_NAMES + ("tcp_state", "tcp_window", "tcp_rst", "not_new")
N_STATS = INV_BASE + len(INVALID_NAMES)

# ---- events (ev int64 rows + evaddr uint64 rows of both tuples)
EV_NEW, EV_UPDATE, EV_DESTROY = 1, 2, 3
EVENT_NAMES = {1: "NEW", 2: "UPDATE", 3: "DESTROY"}
(E_TYPE, E_CONN, E_PROTO, E_IPVER, E_STATE, E_STATUS, E_PORTS0, E_PORTS1, E_PKTS0, E_PKTS1,
 E_BYTES0, E_BYTES1, E_EXPIRES, E_TIME) = range(14)
N_EV = 14

# ---- the TCP tracker's internal results
R_ACCEPT, R_INVALID, R_IGNORE, R_KILL, R_REOPEN = 0, 1, 2, 3, 4
W_OK, W_INVALID, W_IGNORE = 0, 1, 2

M32 = 0xFFFFFFFF
MAXACKWINCONST = 66000


@numba.njit(inline="always", cache=True)
def s32(x):
    """Signed 32-bit value of a sequence difference."""
    return ((x + 0x80000000) & M32) - 0x80000000


@numba.njit(inline="always", cache=True)
def before(a, b):
    return s32(a - b) < 0


@numba.njit(inline="always", cache=True)
def after(a, b):
    return s32(b - a) < 0


# ------------------------------------------------------------------ table primitives

@numba.njit(inline="always", cache=True)
def tuple_hash_of(tkey, tport, c8, tbl, t):
    c = t >> 1
    return hash_key(tbl[T_SEED], tkey[t, 0], tkey[t, 1], tkey[t, 2], tkey[t, 3],
                    np.int64(tport[t]), np.int64(c8[c, PROTO]), np.int64(c8[c, IPVER]))


@kernel
def link_tuple(heads, tnext, tbl, t, h):
    k = h & chain_mask(tbl)
    tnext[t] = heads[k]
    heads[k] = t


@kernel
def unlink_tuple(heads, tkey, tport, tnext, c8, tbl, t):
    h = tuple_hash_of(tkey, tport, c8, tbl, t)
    k = h & chain_mask(tbl)
    p = np.int64(heads[k])
    if p == t:
        heads[k] = tnext[t]
        tnext[t] = -1
        return True
    while p >= 0:
        nx = np.int64(tnext[p])
        if nx == t:
            tnext[p] = tnext[t]
            tnext[t] = -1
            return True
        p = nx
    return False


@kernel
def emit(ev, evaddr, tbl, stats, cfg, kind, c, tkey, tport, c64, c32, c8, cstatus, now):
    """Append one event with a snapshot of conn c (it may be freed right after)."""
    if cfg[CF_EVENTS] == 0:
        return
    n = tbl[T_EVN]
    if n >= ev.shape[0]:
        stats[ST_EVENTS_LOST] += 1
        return
    ev[n, E_TYPE] = kind
    ev[n, E_CONN] = c
    ev[n, E_PROTO] = c8[c, PROTO]
    ev[n, E_IPVER] = c8[c, IPVER]
    ev[n, E_STATE] = c8[c, STATE]
    ev[n, E_STATUS] = cstatus[c]
    ev[n, E_PORTS0] = tport[2 * c]
    ev[n, E_PORTS1] = tport[2 * c + 1]
    ev[n, E_PKTS0] = c32[c, PKTS0]
    ev[n, E_PKTS1] = c32[c, PKTS0 + 1]
    ev[n, E_BYTES0] = c64[c, BYTES0]
    ev[n, E_BYTES1] = c64[c, BYTES0 + 1]
    ev[n, E_EXPIRES] = c64[c, EXPIRES]
    ev[n, E_TIME] = now
    for k in range(4):
        evaddr[n, k] = tkey[2 * c, k]
        evaddr[n, 4 + k] = tkey[2 * c + 1, k]
    tbl[T_EVN] = n + 1


@kernel
def destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                 ev, evaddr, c, now):
    """Unlink both tuples of conn c, emit DESTROY, free the slot (a cross-shard conn's
    slot goes to the dying list instead)."""
    st = cstatus[c]
    if st & S_USED == 0 or st & S_DYING:
        return
    if st & S_LINK0:
        unlink_tuple(heads, tkey, tport, tnext, c8, tbl, 2 * c)
    if st & S_LINK1:
        unlink_tuple(heads, tkey, tport, tnext, c8, tbl, 2 * c + 1)
    if st & S_CONFIRMED:
        emit(ev, evaddr, tbl, stats, cfg, EV_DESTROY, c, tkey, tport, c64, c32, c8, cstatus, now)
        stats[ST_DESTROY] += 1
    if st & S_XSHARD:
        # its reply entry lives in another shard: keep the slot on the dying list until
        # the pool has sent the release (shard.py drains it)
        cstatus[c] = S_USED | S_DYING | S_XSHARD
        tnext[2 * c + 1] = tbl[T_DYING]
        tbl[T_DYING] = c
        return
    free_slot(tnext, cstatus, tbl, c)


@numba.njit(inline="always", cache=True)
def free_slot(tnext, cstatus, tbl, c):
    """Return slot c (its tuples already unlinked) to the free list."""
    cstatus[c] = 0
    tnext[2 * c] = tbl[T_FREE]
    tnext[2 * c + 1] = -1
    tbl[T_FREE] = c
    tbl[T_COUNT] -= 1


@kernel
def alloc_conn(tnext, c64, c32, c8, cstatus, tbl):
    """Take a free slot (zeroed) or return -1 when the arrays are full."""
    c = tbl[T_FREE]
    if c < 0:
        return np.int64(-1)
    tbl[T_FREE] = tnext[2 * c]
    tnext[2 * c] = -1
    tnext[2 * c + 1] = -1
    for k in range(c64.shape[1]):
        c64[c, k] = 0
    for k in range(c32.shape[1]):
        c32[c, k] = 0
    for k in range(c8.shape[1]):
        c8[c, k] = 0
    cstatus[c] = S_USED
    tbl[T_COUNT] += 1
    return c


@kernel
def early_drop(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
               h, now):
    """Free slots in the 8 chains starting at chain ``h`` (NF_CT_EVICTION_RANGE): first
    reap every expired conn there (counted as expired, as Linux's early_drop_list does
    with nf_ct_gc_expired), and only when none had expired evict the first non-ASSURED
    conn (early_drop). True when a slot was freed."""
    mask = chain_mask(tbl)
    freed = False
    for k in range(8):
        chain = (h + k) & mask
        t = np.int64(heads[chain])
        while t >= 0:
            c = t >> 1
            if cstatus[c] & (S_REMOTE | S_PENDING) == 0 and now > c64[c, EXPIRES]:
                stats[ST_EXPIRED] += 1
                destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats,
                             cfg, ev, evaddr, c, now)
                freed = True
                # both of its tuples may have been in this chain: walk it again from
                # its head (each restart follows a removal, so this ends)
                t = np.int64(heads[chain])
                continue
            t = np.int64(tnext[t])
    if freed:
        return True
    for k in range(8):
        t = np.int64(heads[(h + k) & mask])
        while t >= 0:
            c = t >> 1
            # reply entries and pending insertions are not ours to evict
            if cstatus[c] & (S_REMOTE | S_PENDING | S_ASSURED) == 0:
                stats[ST_EARLY_DROP] += 1
                destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats,
                             cfg, ev, evaddr, c, now)
                return True
            t = np.int64(tnext[t])
    return False


# ------------------------------------------------------------------ TCP

@numba.njit(inline="always", cache=True)
def scale_of(c8, c, d):
    """Window scale of direction d (a nibble of SCALES)."""
    return (np.int64(c8[c, SCALES]) >> (4 * d)) & 0xF


@numba.njit(inline="always", cache=True)
def set_scale(c8, c, d, v):
    sh = 4 * d
    c8[c, SCALES] = ((np.int64(c8[c, SCALES]) & ~(0xF << sh)) | ((v & 0xF) << sh)) & 0xFF


@numba.njit(inline="always", cache=True)
def tcp_options_into(c8, c, d, wscale, sackperm):
    f = c8[c, TFLAGS0 + d]
    if wscale >= 0:
        set_scale(c8, c, d, wscale)
        f |= TF_WINDOW_SCALE
    else:
        set_scale(c8, c, d, 0)
        f &= ~TF_WINDOW_SCALE & 0xFF
    if sackperm:
        f |= TF_SACK_PERM
    c8[c, TFLAGS0 + d] = f


@numba.njit(inline="always", cache=True)
def ack_fingerprint(d, seq, ack, end, win):
    """8 bits standing for Linux's (last_dir, last_seq, last_ack, last_end, last_win) of
    an ACK segment: equal for the same segment again. Distinct segments collide with
    probability 1/256, so a false count of 3 retransmissions takes three collisions in a
    row (about 6e-8 per segment), and it lasts only until the next segment."""
    x = (np.uint64(seq & M32) << np.uint64(32)) | np.uint64(ack & M32)
    y = (np.uint64(end & M32) << np.uint64(17)) ^ (np.uint64(win & 0xFFFF) << np.uint64(1)) \
        ^ np.uint64(d)
    h = x * np.uint64(0x9E3779B97F4A7C15) ^ y * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= h >> np.uint64(29)
    return np.int64((h * np.uint64(0xBF58476D1CE4E5B9)) >> np.uint64(56))


@numba.njit(inline="always", cache=True)
def set_last(c8, c, idx, d):
    """Linux's last_index = idx, last_dir = d (retrans and last_win kept)."""
    c8[c, LAST] = ((np.int64(c8[c, LAST]) & ~(LAST_INDEX | LAST_DIR)) | (idx + 1) | (d << 3)) & 0xFF


@numba.njit(inline="always", cache=True)
def with_last_win(last, win):
    """The LAST byte ``last`` noting whether the last segment's raw window was 0."""
    return (last & ~LAST_WIN0) | (LAST_WIN0 if win == 0 else 0)


@numba.njit(inline="always", cache=True)
def last_index(c8, c):
    """(last_index, last_dir); last_index -1 when no packet has been noted yet."""
    last = np.int64(c8[c, LAST])
    return (last & LAST_INDEX) - 1, (last & LAST_DIR) >> 3


@kernel
def tcp_new(c32, c8, c, fl, seq, win, paylen, wscale, sackperm, syn):
    """Initialise the original direction's window data (tcp_new)."""
    end = (seq + paylen + (1 if fl & 2 else 0) + (1 if fl & 1 else 0)) & M32
    b = 2
    mw = win if win != 0 else 1
    c32[c, b + W_END] = end
    c32[c, b + W_MAXWIN] = mw
    if syn:
        c32[c, b + W_MAXEND] = end
        tcp_options_into(c8, c, 0, wscale, sackperm)
    else:
        c32[c, b + W_MAXEND] = (end + mw) & M32
        c8[c, TFLAGS0] = TF_SACK_PERM | TF_BE_LIBERAL
        c8[c, TFLAGS0 + 1] = TF_SACK_PERM | TF_BE_LIBERAL


@numba.njit(inline="always", cache=True)
def tcp_in_window(c32, c8, c, d, state, fl, seq, ack, win, paylen, wscale, sackperm, liberal):
    """Linux tcp_in_window (6.1+ outcomes). Returns W_OK, W_INVALID or W_IGNORE."""
    sb = 2 + 4 * d            # sender
    rb = 2 + 4 * (1 - d)      # receiver
    win_raw = win
    syn = fl & 2
    fin = fl & 1
    ackf = fl & 16
    rst = fl & 4
    end = (seq + paylen + (1 if syn else 0) + (1 if fin else 0)) & M32
    sack = ack
    s_maxwin = np.int64(c32[c, sb + W_MAXWIN])
    if s_maxwin == 0:
        if syn:
            # SYN/ACK answering a SYN, or a reply SYN in simultaneous open
            c32[c, sb + W_END] = end
            c32[c, sb + W_MAXEND] = end
            c32[c, sb + W_MAXWIN] = win if win != 0 else 1
            tcp_options_into(c8, c, d, wscale, sackperm)
            if not ((c8[c, TFLAGS0 + d] & TF_WINDOW_SCALE)
                    and (c8[c, TFLAGS0 + 1 - d] & TF_WINDOW_SCALE)):
                c8[c, SCALES] = 0
        else:
            # picked up mid-stream: use what this packet says
            c32[c, sb + W_END] = end
            swin = np.int64(win) << scale_of(c8, c, d)
            if swin == 0:
                swin = 1
            c32[c, sb + W_MAXWIN] = swin & M32
            c32[c, sb + W_MAXEND] = (end + swin) & M32
            if c32[c, rb + W_MAXWIN] == 0:
                c32[c, rb + W_END] = sack & M32
                c32[c, rb + W_MAXEND] = sack & M32
            elif sack == ((np.int64(c32[c, rb + W_END]) + 1) & M32):
                c32[c, rb + W_END] = sack & M32
    elif (((state == 1 and d == 0) or (state == 2 and d == 1))
          and after(end, np.int64(c32[c, sb + W_END]))):
        # the sender restarted its handshake with higher sequence numbers
        c32[c, sb + W_END] = end
        c32[c, sb + W_MAXEND] = end
        c32[c, sb + W_MAXWIN] = win if win != 0 else 1
        tcp_options_into(c8, c, d, wscale, sackperm)

    r_end = np.int64(c32[c, rb + W_END])
    if not ackf:
        ack = r_end
        sack = r_end
    elif rst and ack == 0:
        ack = r_end
        sack = r_end
    s_end = np.int64(c32[c, sb + W_END])
    if rst and seq == 0 and state == 1:
        seq = s_end
        end = s_end
    s_maxend = np.int64(c32[c, sb + W_MAXEND])
    s_maxwin = np.int64(c32[c, sb + W_MAXWIN])
    r_maxwin = np.int64(c32[c, rb + W_MAXWIN])
    liberal = liberal or (c8[c, TFLAGS0 + d] & TF_BE_LIBERAL) != 0
    maxack_win = s_maxwin if s_maxwin > MAXACKWINCONST else MAXACKWINCONST
    in_recv_win = r_maxwin == 0 or after(end, s_end - r_maxwin - 1)
    # the checks in Linux's order; be_liberal passes every one of them unchanged
    if not before(seq, s_maxend + 1):
        # SEQ over the upper bound. A sender overshooting the receiver's window by at most
        # that window, with a sane ACK, passes as IGNORE but its end is kept, so the
        # peer's ACK of those bytes is not "ACK over the upper bound" (Linux 6.0+)
        overshot = (end - s_maxend + 1) & M32
        if (r_maxwin != 0 and in_recv_win and after(sack, r_end - maxack_win - 1)
                and overshot <= r_maxwin and before(sack, r_end + 1)):
            c32[c, sb + W_END] = end
            c8[c, TFLAGS0 + d] |= TF_DATA_UNACK
            return W_OK if liberal else W_IGNORE
        return W_OK if liberal else W_INVALID
    if not before(sack, r_end + 1):
        return W_OK if liberal else W_INVALID          # ACKs data not seen yet
    if not in_recv_win:
        return W_OK if liberal else W_IGNORE           # already-ACKed data retransmitted
    if not after(sack, r_end - maxack_win - 1):
        return W_OK if liberal else W_IGNORE           # overly delayed ACK
    # in window: update sender and receiver data
    if not syn:
        win = win << scale_of(c8, c, d)
    swin = win + s32(sack - ack)
    if s_maxwin < swin:
        c32[c, sb + W_MAXWIN] = swin & M32
    if after(end, s_end):
        c32[c, sb + W_END] = end
        c8[c, TFLAGS0 + d] |= TF_DATA_UNACK
    if ackf:
        if not (c8[c, TFLAGS0 + d] & TF_MAXACK_SET):
            c32[c, sb + W_MAXACK] = ack & M32
            c8[c, TFLAGS0 + d] |= TF_MAXACK_SET
        elif after(ack, np.int64(c32[c, sb + W_MAXACK])):
            c32[c, sb + W_MAXACK] = ack & M32
    if r_maxwin != 0 and after(end, s_maxend):
        c32[c, rb + W_MAXWIN] = (r_maxwin + s32(end - s_maxend)) & M32
    r_maxend = np.int64(c32[c, rb + W_MAXEND])
    if after(sack + win, r_maxend - 1):
        nme = sack + win
        if win == 0:
            nme += 1
        c32[c, rb + W_MAXEND] = nme & M32
    if ack == r_end:
        c8[c, TFLAGS0 + 1 - d] &= ~TF_DATA_UNACK & 0xFF
    if ackf and not (syn or fin or rst):
        # Linux counts retransmissions: the same ACK segment (direction, seq, ack, end,
        # window) again; any other resets the count and notes whether its window is 0
        fp = ack_fingerprint(d, seq, ack, end, win_raw)
        last = np.int64(c8[c, LAST])
        if np.int64(c8[c, ACKFP]) == fp:
            if (last >> LAST_RETRANS_SHIFT) < LAST_RETRANS_MAX:
                last += 1 << LAST_RETRANS_SHIFT
        else:
            c8[c, ACKFP] = fp
            last = with_last_win(last & (LAST_INDEX | LAST_DIR), win_raw)
        c8[c, LAST] = last & 0xFF
    return W_OK


@numba.njit(inline="always", cache=True)
def tcp_handle_invalid(c64, c8, cstatus, tmo, c, d, idx, now):
    """nf_tcp_handle_invalid: an out-of-window FIN or RST of an ASSURED conn that
    answers the other side's FIN or RST lowers its timeout to UNACK (a dead conn whose
    window state is out of sync goes in minutes, not days); any other notes itself."""
    if cstatus[c] & S_ASSURED == 0 or (idx != 2 and idx != 4):
        return
    li, ld = last_index(c8, c)
    if ld != d and (li == 2 or li == 4):
        left = c64[c, EXPIRES] - now
        if left >= INVALID_LOWER_FROM and left > tmo[TMO_UNACK]:
            c64[c, EXPIRES] = now + tmo[TMO_UNACK]
    else:
        set_last(c8, c, idx, d)


@numba.njit(inline="always", cache=True)
def tcp_packet(c64, c32, c8, cstatus, cfg, tmo, stats, c, d, fl, seq, ack, win, paylen,
               wscale, sackperm, now):
    """nf_conntrack_tcp_packet: table transition + checks + window + timer.
    Returns R_ACCEPT, R_INVALID, R_IGNORE, R_KILL (accept, then destroy) or R_REOPEN."""
    old = np.int64(c8[c, STATE])
    if fl & 4:
        idx = 4
    elif fl & 2:
        idx = 1 if fl & 16 else 0
    elif fl & 1:
        idx = 2
    elif fl & 16:
        idx = 3
    else:
        idx = 5
    new = np.int64(TRANSITIONS[d, idx, old])
    if new == 1 and old >= 7:
        # SYN on TIME_WAIT/CLOSE: kill the old conn, the packet starts a new one. Linux
        # reopens only after a FIN (CLOSE_INIT) or this side's own RST; otherwise it
        # ignores the SYN and resyncs on the SYN/ACK from the SYN's end, window, scale
        # and flags, which a conn record here does not keep (8 more bytes): reopening at
        # once reaches the same state one packet earlier
        return R_REOPEN
    if new == IG:
        # Linux notes an ignored packet as the last one (its window too)
        set_last(c8, c, idx, d)
        c8[c, LAST] = with_last_win(np.int64(c8[c, LAST]), win) & 0xFF
        stats[ST_IGNORE] += 1
        return R_IGNORE
    if new == IV:
        stats[ST_INVALID] += 1
        stats[INV_BASE + INV_TCP_STATE] += 1
        return R_INVALID
    if idx == 4:
        od = 1 - d
        if old == 1 and d == 1:
            # RFC 9293 SYN-SENT: a RST is acceptable only if it ACKs the SYN
            if not (fl & 16) or ack != np.int64(c32[c, 2 + W_END]):
                stats[ST_INVALID] += 1
                stats[INV_BASE + INV_TCP_RST] += 1
                return R_INVALID
        elif c8[c, TFLAGS0 + od] & TF_MAXACK_SET:
            maxack = np.int64(c32[c, 2 + 4 * od + W_MAXACK])
            established = old == 3 and (cstatus[c] & S_ASSURED) != 0
            if seq == 0 and not established:
                pass
            elif before(seq, maxack) and cfg[CF_IGNORE_INVALID_RST] == 0:
                stats[ST_INVALID] += 1
                stats[INV_BASE + INV_TCP_RST] += 1
                return R_INVALID
            elif established and seq != maxack:
                new = old      # inexact RST: keep state, room for a challenge ACK
    w = tcp_in_window(c32, c8, c, d, old, fl, seq, ack, win, paylen, wscale, sackperm,
                      cfg[CF_BE_LIBERAL] != 0)
    if w == W_INVALID:
        stats[ST_INVALID] += 1
        stats[INV_BASE + INV_TCP_WINDOW] += 1
        tcp_handle_invalid(c64, c8, cstatus, tmo, c, d, idx, now)
        return R_INVALID
    if w == W_IGNORE:
        stats[ST_IGNORE] += 1
        return R_IGNORE
    set_last(c8, c, idx, d)
    c8[c, STATE] = new
    if old != new and new == 4:
        c8[c, TFLAGS0 + d] |= TF_CLOSE_INIT
    # the timeout, first rule that applies (Linux nf_conntrack_tcp_packet)
    timeout = tmo[new]
    last = np.int64(c8[c, LAST])
    if (last >> LAST_RETRANS_SHIFT) >= cfg[CF_MAX_RETRANS] and timeout > tmo[TMO_RETRANS]:
        timeout = tmo[TMO_RETRANS]
    elif idx == 4:
        timeout = tmo[TMO_CLOSE]
    elif (((c8[c, TFLAGS0] | c8[c, TFLAGS0 + 1]) & TF_DATA_UNACK)
          and timeout > tmo[TMO_UNACK]):
        timeout = tmo[TMO_UNACK]
    elif last & LAST_WIN0 and timeout > tmo[TMO_RETRANS]:
        timeout = tmo[TMO_RETRANS]
    st = cstatus[c]
    if st & S_SEEN_REPLY == 0:
        if fl & 4:
            return R_KILL      # the only reply was a RST: not a connection
        if new == 3 and timeout > tmo[TMO_UNACK]:
            timeout = tmo[TMO_UNACK]
    elif st & S_ASSURED == 0 and (old == 2 or old == 3) and new == 3:
        cstatus[c] = st | S_ASSURED
    c64[c, EXPIRES] = now + timeout
    return R_ACCEPT


@numba.njit(inline="always", cache=True)
def tcp_may_create(fl, loose):
    """tcp_new's first check: SYN opens; an ACK picks up mid-stream when loose."""
    if fl & 4:
        return False
    if fl & 2:
        return (fl & 16) == 0
    if fl & 1:
        return False
    return (fl & 16) != 0 and loose


# ------------------------------------------------------------------ the batch kernel

@kernel
def create_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                h0, a0, a1, a2, a3, ports0, r0, r1, r2, r3, rports, proto, ipver, now, sure):
    """Create and confirm a conn with original tuple (a*, ports0) and reply tuple
    (r*, rports): check max_conns (early drop), refuse a reply tuple owned by another
    live conn (insert_failed), link both tuples, emit NEW.

    When the reply tuple's routing bucket is outside this table's slice
    (cfg CF_SHARD_LO..HI) the conn is created pending (S_XSHARD | S_PENDING, reply tuple
    not linked; S_INVIS too when the reply bucket is the lower one): shard.py reserves
    the reply tuple at its owner and commits. ``sure``: its owner will grant it (track_batch,
    GX_PURE), so it is committed now, S_XSHARD only; the shard reserves alongside.

    Returns the conn id, -1 when the table is full (drop), -2 on a reply clash.
    Precondition: the original tuple is not in the table (the caller looked it up).
    """
    rh = hash_key(tbl[T_SEED], r0, r1, r2, r3, rports, proto, ipver)
    same = (r0 == a0 and r1 == a1 and r2 == a2 and r3 == a3 and rports == ports0)
    nb = tbl[T_NBUCKETS]
    rb = rh % nb
    xshard = not same and (rb < cfg[CF_SHARD_LO] or rb >= cfg[CF_SHARD_HI])
    if not same and not xshard:
        rt = find_tuple(heads, tkey, tport, tnext, c8, tbl, rh, r0, r1, r2, r3, rports,
                        proto, ipver)
        if rt >= 0:
            oc = rt >> 1
            if now > c64[oc, EXPIRES]:
                stats[ST_EXPIRED] += 1
                destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats,
                             cfg, ev, evaddr, oc, now)
            else:
                stats[ST_INSERT_FAILED] += 1
                return np.int64(-2)
    if tbl[T_COUNT] >= cfg[CF_MAX_CONNS] or tbl[T_FREE] < 0:
        if not early_drop(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                          ev, evaddr, h0, now):
            return np.int64(-1)
    c = alloc_conn(tnext, c64, c32, c8, cstatus, tbl)
    if c < 0:
        return np.int64(-1)
    t0 = 2 * c
    tkey[t0, 0] = a0
    tkey[t0, 1] = a1
    tkey[t0, 2] = a2
    tkey[t0, 3] = a3
    tport[t0] = ports0
    tkey[t0 + 1, 0] = r0
    tkey[t0 + 1, 1] = r1
    tkey[t0 + 1, 2] = r2
    tkey[t0 + 1, 3] = r3
    tport[t0 + 1] = rports
    c8[c, PROTO] = proto
    c8[c, IPVER] = ipver
    c64[c, EXPIRES] = now
    link_tuple(heads, tnext, tbl, t0, h0)
    st = S_USED | S_CONFIRMED | S_LINK0
    if xshard and sure:
        st |= S_XSHARD
    elif xshard:
        st |= S_XSHARD | S_PENDING
        if rb < h0 % nb:
            st |= S_INVIS
        # its first packet is parked, so no timeout is set yet: until the commit it is
        # live whatever the clock says (not "expired" to a NAT search or to a clash)
        c64[c, EXPIRES] = PENDING_EXPIRES
    elif not same:
        link_tuple(heads, tnext, tbl, t0 + 1, rh)
        st |= S_LINK1
    # SRC_NAT: the reply does not go back to the original source (address or port)
    if not (r2 == a0 and r3 == a1 and (rports & 0xFFFF) == (ports0 >> 16)):
        st |= S_SRC_NAT
    # DST_NAT: the reply does not come from the original destination
    if not (r0 == a2 and r1 == a3 and (rports >> 16) == (ports0 & 0xFFFF)):
        st |= S_DST_NAT
    cstatus[c] = st | S_NEW_PENDING
    stats[ST_INSERT] += 1
    stats[ST_NEW] += 1
    return c


@kernel
def nat_packet(buf, o, meta, i, tkey, tport, c8, cstatus, stats, t, related):
    """Rewrite packet i (frame at buf[o:]) of tuple id t = 2c+d to what the conn's NAT
    bindings say (see rewrite.py). No-op for conns without SRC_NAT/DST_NAT."""
    c = t >> 1
    d = t & 1
    st = cstatus[c]
    if st & (S_SRC_NAT | S_DST_NAT) == 0:
        return
    ot = 2 * c + 1 - d
    ipver = meta[i, M_IPVER]
    if d == 0:
        set_src = (st & S_SRC_NAT) != 0
        set_dst = (st & S_DST_NAT) != 0
    else:
        set_src = (st & S_DST_NAT) != 0
        set_dst = (st & S_SRC_NAT) != 0
    l3 = o + meta[i, M_L3]
    l4 = o + meta[i, M_L4]
    l4len = meta[i, M_L3LEN] - meta[i, M_L4]  + meta[i, M_L3]
    stats[ST_NAT_REWRITES] += 1
    op = np.int64(tport[ot])
    if not related:
        rewrite_header(buf, l3, l4, l4len, ipver, meta[i, M_PROTO], meta[i, M_ECHO],
                       tkey[ot, 2], tkey[ot, 3], tkey[ot, 0], tkey[ot, 1],
                       ((op & 0xFFFF) << 16) | (op >> 16), set_src, set_dst)
        return
    # ICMP error: the quoted packet becomes tuple[1-d]; the outer header follows the manips
    il3 = o + meta[i, M_INNER_L3]
    il4 = o + meta[i, M_INNER_L4]
    iavail = l4 + l4len - il4
    iproto = meta[i, M_PROTO]
    iecho = 0
    if (iproto == 1 or iproto == 58) and iavail >= 1:
        iecho, _ = icmp_query(ipver, np.int64(buf[il4]))
    rewrite_header(buf, il3, il4, iavail, ipver, iproto, iecho,
                   tkey[ot, 0], tkey[ot, 1], tkey[ot, 2], tkey[ot, 3], op, True, True)
    oproto = 1 if ipver == 4 else 58
    rewrite_header(buf, l3, l4, l4len, ipver, oproto, 0,
                   tkey[ot, 2], tkey[ot, 3], tkey[ot, 0], tkey[ot, 1], 0, set_src, set_dst)
    icmp_recompute(buf, l3, l4, l4len, ipver)


@kernel
def init_proto(c32, c8, c, meta, i, now):
    """Protocol state of a conn created by packet i (tcp_new; UDP stream time)."""
    proto = meta[i, M_PROTO]
    if proto == 6:
        fl = meta[i, M_TFLAGS]
        tcp_new(c32, c8, c, fl, meta[i, M_SEQ], meta[i, M_WIN], meta[i, M_PAYLEN],
                meta[i, M_WSCALE], meta[i, M_SACKPERM], (fl & 2) != 0)
    elif proto == 17:
        stream = now + 2_000_000_000
        c32[c, UDP_STREAM_LO] = stream & M32
        c32[c, UDP_STREAM_HI] = (stream >> 32) & M32


PF_HEAD = 24     # packets ahead whose chain head is prefetched (prefetch_ahead)
PF_ROWS = 12     # packets ahead whose chain's first tuple record is prefetched
PF_NEXT = 6      # packets ahead whose conn (or second tuple and its conn) is


@numba.njit(inline="always", cache=True)
def prefetch_record(tkey, tnext, t):
    """Hint tuple t's record: its first and last fields cover its lines (table.py)."""
    prefetch(tkey, t)
    prefetch(tnext, t)


@numba.njit(inline="always", cache=True)
def prefetch_conn(c64, c8, c):
    """Hint conn c's record (c64 first, c8 and cstatus last)."""
    prefetch(c64, c)
    prefetch(c8, c)


@numba.njit(inline="always", cache=True)
def prefetch_head(hashes, heads, mask, j):
    prefetch(heads, hashes[j] & mask)


@numba.njit(inline="always", cache=True)
def prefetch_first(hashes, heads, tkey, tnext, mask, j):
    t = np.int64(heads[hashes[j] & mask])
    if t >= 0:
        prefetch_record(tkey, tnext, t)


@numba.njit(inline="always", cache=True)
def prefetch_match(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, j):
    """The first tuple's record is in cache by now: when its ports and one address word
    are packet j's, hint its conn; otherwise hint the second tuple and its conn."""
    t = np.int64(heads[hashes[j] & mask])
    if t < 0:
        return
    if np.int64(tport[t]) == meta[j, M_PORTS] and tkey[t, 3] == addr[j, 3]:
        prefetch_conn(c64, c8, t >> 1)
        return
    t = np.int64(tnext[t])
    if t >= 0:
        prefetch_record(tkey, tnext, t)
        prefetch_conn(c64, c8, t >> 1)


@numba.njit(inline="always", cache=True)
def prefetch_ahead(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, i, n):
    """Hints only. A lookup in a large table misses the cache at the head, then at the
    tuple, then at its conn; when the tuple is second in its chain (about a third of
    lookups with about one tuple per head) that is one more dependent miss. So: heads
    PF_HEAD packets ahead, the chain's first tuple PF_ROWS ahead, and PF_NEXT ahead the
    conn of whichever tuple looks like the packet's. Conn records are hinted only for
    a likely match: the memory system here keeps a bounded number of misses in flight,
    and hinting every chain's first conn too measured 3-5% slower over 100k uniform
    flows. Reading heads and tnext early is safe (the values only aim hints; the lookup
    reads them again), and a packet without a tuple (hash -1) just hints the last chain."""
    if i + PF_HEAD < n:
        prefetch_head(hashes, heads, mask, i + PF_HEAD)
    if i + PF_ROWS < n:
        prefetch_first(hashes, heads, tkey, tnext, mask, i + PF_ROWS)
    if i + PF_NEXT < n:
        prefetch_match(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, i + PF_NEXT)


@numba.njit(inline="always", cache=True)
def prefetch_start(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, start, n):
    """Fill the pipeline for a batch's first PF_HEAD packets, which no earlier packet
    hinted for: otherwise each takes its misses one after another (about 3% of the time
    over 100k uniform flows at 1024-packet batches)."""
    for j in range(start, min(start + PF_HEAD, n)):
        prefetch_head(hashes, heads, mask, j)
    for j in range(start, min(start + PF_ROWS, n)):
        prefetch_first(hashes, heads, tkey, tnext, mask, j)
    for j in range(start, min(start + PF_NEXT, n)):
        prefetch_match(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, j)


@kernel(error_model="numpy")
def track_batch(buf, off, meta, addr, hashes, length, ifindex, ts, verdict, pconn, given,
                heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl,
                stats, cfg, tmo, ev, evaddr, natp, start, resumed):
    """Track packets start..n-1 in order. ``resumed``: packet ``start`` already went
    through this kernel once (it was handed to the slow path and comes back), so its
    router hop (TTL) is not taken again. Returns the index of the first packet left
    unprocessed (n when all are done); that packet has verdict V_PENDING and needs a
    Python decision: a new conn while ``cfg[CF_NAT]`` is NAT_PYTHON, or one nat.nat_decide
    (NAT_COMPILED, over ``natp``, a nat.NatProgram; ``ifindex[i]`` the packet's ingress
    interface) hands back.

    ``given[i]``: G_FRESH (-1) for a fresh packet; G_COUNTED (-2) for one already counted
    (and TTL-decremented) by an earlier kernel pass, here or in another shard; a tuple id
    >= 0 for a packet whose conn a shard already found (handoff, parked): it is checked,
    not looked up. G_FRESH_DEFER / G_COUNTED_DEFER: the same, but a miss is not a new conn
    yet (V_DEFER): the packet may answer a conn an earlier packet is creating elsewhere.
    GX_STEER in -1 - given[i]: fresh, sent here (not to its own bucket's owner) as the
    likely reply of a conn whose home this is: it takes the conn found by its inverted
    tuple only when that tuple is the conn's original and the conn's reply tuple is the
    packet's own (tuples are unique, so one table would find that conn too); anything
    else bounces (V_BOUNCE) to the owner, which looks it up as usual. GX_PURE: no other
    shard has packets of this tuple or its inverse this round, so a hit on a cross-shard
    conn without NAT is not held, and (``cfg[CF_NAT] == NAT_OFF``: no conn can take its
    reply tuple under NAT) a conn it starts is created *surely*: committed at once, its
    reply tuple reserved alongside (pconn | SURE_TAG), not parked.
    Pool verdicts (a table with a bucket slice): V_HANDOFF (hit a reply entry; pconn is
    the entry), V_PARK (its conn is pending; pconn is the tuple), V_BOUNCE (would start a
    conn whose original tuple is not in this slice), V_HOLD (``cfg[CF_HOLD]`` set and a
    fresh packet hit a cross-shard conn at its home: it waits for the round's handoffs,
    so the conn sees both directions in sequence order), V_DEFER (above).

    Preconditions: meta/addr filled by wire.parse_batch; hashes[i] is the tuple hash of
    each CLS_TRACK / CLS_RELATED packet.
    """
    n = meta.shape[0]
    nb = tbl[T_NBUCKETS]
    mask = chain_mask(tbl)
    start = max(start, 0)      # a loop index known non-negative: no wraparound either
    prefetch_start(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, start, n)
    for i in range(start, n):
        # three-stage prefetch (see prefetch_ahead): heads, the chain's first tuple,
        # then the likely match's conn
        prefetch_ahead(hashes, heads, tkey, tport, tnext, c64, c8, addr, meta, mask, i, n)
        now = ts[i]
        cls = meta[i, M_CLS]
        pconn[i] = -1
        g = given[i]
        gx = -1 - g if g < 0 else np.int64(0)
        fresh = g < 0 and gx & GX_COUNTED == 0 and not (resumed and i == start)
        defer = g < 0 and gx & GX_DEFER != 0
        pure = g < 0 and gx & GX_PURE != 0
        if cls == CLS_NOTIP:
            verdict[i] = V_NOTIP
            stats[ST_NOT_IP] += 1
            continue
        rt = cfg[CF_ROUTER]
        if rt & RT_CHECK:
            r = meta[i, M_REASON]
            if cls == CLS_INVALID and (r <= 4 or r == 14):
                # a broken IP header is dropped before conntrack, as a router does
                verdict[i] = V_DROP
                stats[ST_DROP] += 1
                stats[ST_INVALID] += 1
                stats[INV_BASE + r] += 1
                continue
            # bytes past the IP datagram (a trailer, Ethernet padding) are cut off
            dend = meta[i, M_L3] + meta[i, M_L3LEN]
            if meta[i, M_L3LEN] > 0 and dend < length[i]:
                length[i] = dend
        if cls == CLS_UNTRACKED:
            verdict[i] = V_UNTRACKED
            stats[ST_UNTRACKED] += 1
            continue
        if cls == CLS_INVALID:
            verdict[i] = V_INVALID
            r = meta[i, M_REASON]
            if r == 11:      # broken ICMP error: Linux counts it as error
                stats[ST_ERROR] += 1
            stats[ST_INVALID] += 1
            stats[INV_BASE + r] += 1
            continue
        if fresh:
            stats[ST_PACKETS] += 1
        a0 = addr[i, 0]
        a1 = addr[i, 1]
        a2 = addr[i, 2]
        a3 = addr[i, 3]
        ports = meta[i, M_PORTS]
        proto = meta[i, M_PROTO]
        ipver = meta[i, M_IPVER]
        h = hashes[i]
        if g < 0 and gx & GX_STEER:
            # the conn's original tuple is ours inverted: found by the hash the dispatcher
            # kept for it
            t = find_tuple(heads, tkey, tport, tnext, c8, tbl, gx >> G_HASH_SHIFT, a2, a3, a0, a1,
                           ((ports & 0xFFFF) << 16) | (ports >> 16), proto, ipver)
            if t >= 0:
                r = t | 1
                if (t & 1 or cstatus[t >> 1] & (S_REMOTE | S_DYING)
                        or not tuple_is(tkey, tport, r, a0, a1, a2, a3, ports)):
                    t = -1       # not this packet's conn: its owner looks it up
                else:
                    t = r
        elif g >= 0 and not (resumed and i == start):
            t = g
            gc = g >> 1
            if not (cstatus[gc] & S_USED and cstatus[gc] & (S_REMOTE | S_DYING) == 0
                    and tuple_is(tkey, tport, t, a0, a1, a2, a3, ports)
                    and np.int64(c8[gc, PROTO]) == proto and np.int64(c8[gc, IPVER]) == ipver):
                t = -1        # the conn it was handed for is gone
        else:
            t = find_tuple(heads, tkey, tport, tnext, c8, tbl, h, a0, a1, a2, a3, ports, proto,
                           ipver)
        if t >= 0 and cstatus[t >> 1] & (S_REMOTE | S_PENDING):
            # a reply entry: the conn lives in another shard; a pending conn: wait for
            # its insertion to commit
            verdict[i] = V_HANDOFF if cstatus[t >> 1] & S_REMOTE else V_PARK
            pconn[i] = t
            continue
        if (t >= 0 and cfg[CF_HOLD] != 0 and g < 0 and cstatus[t >> 1] & S_XSHARD
                and not (pure and cstatus[t >> 1] & (S_SRC_NAT | S_DST_NAT) == 0)):
            verdict[i] = V_HOLD
            pconn[i] = t
            continue
        if t >= 0 and now > c64[t >> 1, EXPIRES]:
            stats[ST_EXPIRED] += 1
            destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                         ev, evaddr, t >> 1, now)
            t = -1
        if cls == CLS_RELATED and t >= 0:
            # Linux nf_conntrack_inet_error: the error must be addressed to the host the
            # quoted flow's tuple in this direction goes to
            l3o = off[i] + meta[i, M_L3]
            if meta[i, M_IPVER] == 4:
                od_lo = np.uint64((np.int64(buf[l3o + 16]) << 24) | (np.int64(buf[l3o + 17]) << 16)
                                  | (np.int64(buf[l3o + 18]) << 8) | np.int64(buf[l3o + 19]))
                if od_lo != tkey[t, 3]:
                    t = -1
            else:
                od_hi = np.uint64(0)
                od_lo = np.uint64(0)
                for k in range(8):
                    od_hi = (od_hi << np.uint64(8)) | np.uint64(buf[l3o + 24 + k])
                    od_lo = (od_lo << np.uint64(8)) | np.uint64(buf[l3o + 32 + k])
                if od_hi != tkey[t, 2] or od_lo != tkey[t, 3]:
                    t = -1
        if cls == CLS_RELATED:
            if t < 0 and defer:
                verdict[i] = V_DEFER
            elif t < 0:
                verdict[i] = V_INVALID
                stats[ST_ERROR] += 1
                stats[ST_INVALID] += 1
                stats[INV_BASE + 11] += 1
            else:
                verdict[i] = V_RELATED
                pconn[i] = t
                stats[ST_RELATED] += 1
                if cstatus[t >> 1] & (S_SRC_NAT | S_DST_NAT):
                    nat_packet(buf, off[i], meta, i, tkey, tport, c8, cstatus, stats, t, True)
            continue
        fl = meta[i, M_TFLAGS]
        sure = False
        for _attempt in range(2):      # a second pass only after a TCP reopen
            if t < 0:
                # ---- no conn: may this packet start one?
                if h % nb < cfg[CF_SHARD_LO] or h % nb >= cfg[CF_SHARD_HI]:
                    verdict[i] = V_BOUNCE      # its original tuple belongs to another shard
                    break
                if defer:
                    verdict[i] = V_DEFER
                    break
                ok = True
                if proto == 6:
                    ok = tcp_may_create(fl, cfg[CF_LOOSE] != 0)
                elif (proto == 1 or proto == 58) and meta[i, M_ECHO] != 1:
                    ok = False
                if not ok:
                    verdict[i] = V_INVALID
                    stats[ST_INVALID] += 1
                    stats[INV_BASE + INV_NOT_NEW] += 1
                    break
                # no NAT: the reply tuple is the inverted original
                r0, r1, r2, r3 = a2, a3, a0, a1
                rports = ((ports & 0xFFFF) << 16) | (ports >> 16)
                if cfg[CF_NAT] == NAT_PYTHON:
                    verdict[i] = V_PENDING
                    return i
                if cfg[CF_NAT] == NAT_COMPILED:
                    out, n0, n1, n2, n3, nports, found = nat_decide(
                        heads, tkey, tport, tnext, c64, c8, tbl, natp, now, ifindex[i], a0,
                        a1, a2, a3, ports, proto, ipver, meta[i, M_ECHO])
                    if out == D_PYTHON:
                        verdict[i] = V_PENDING
                        return i
                    stats[ST_FOUND] += found
                    if out == D_DROP:
                        verdict[i] = V_DROP
                        stats[ST_NAT_FAILED] += 1
                        stats[ST_DROP] += 1
                        break
                    # the reply tuple is the inverted NATed original
                    r0, r1, r2, r3 = n2, n3, n0, n1
                    rports = ((nports & 0xFFFF) << 16) | (nports >> 16)
                c = create_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats,
                                cfg, ev, evaddr, h, a0, a1, a2, a3, ports, r0, r1, r2, r3,
                                rports, proto, ipver, now, pure and cfg[CF_NAT] == NAT_OFF)
                sure = cstatus[c] & S_XSHARD != 0 if c >= 0 else False
                if c < 0:
                    verdict[i] = V_DROP
                    stats[ST_DROP] += 1
                    break
                init_proto(c32, c8, c, meta, i, now)
                t = 2 * c
                if cstatus[c] & S_PENDING:
                    verdict[i] = V_PARK
                    pconn[i] = t
                    break
            # ---- conn c, direction d: update protocol state
            c = t >> 1
            d = t & 1
            old_state = np.int64(c8[c, STATE])
            st_before = cstatus[c]
            res = update_conn(c64, c32, c8, cstatus, cfg, tmo, stats, c, d, proto, fl,
                              meta[i, M_SEQ], meta[i, M_ACK], meta[i, M_WIN], meta[i, M_PAYLEN],
                              meta[i, M_WSCALE], meta[i, M_SACKPERM], now)
            if res == R_REOPEN:
                destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                             ev, evaddr, c, now)
                t = -1
                continue
            if res == R_INVALID:
                verdict[i] = V_INVALID
                if cstatus[c] & S_NEW_PENDING:
                    # the packet that created it is invalid: the conn never existed
                    cstatus[c] = cstatus[c] & ~(S_CONFIRMED | S_NEW_PENDING)
                    stats[ST_INSERT] -= 1
                    stats[ST_NEW] -= 1
                    destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl,
                                 stats, cfg, ev, evaddr, c, now)
                break
            verdict[i] = V_ACCEPT
            pconn[i] = t | SURE_TAG if sure else t
            if cstatus[c] & (S_SRC_NAT | S_DST_NAT):
                nat_packet(buf, off[i], meta, i, tkey, tport, c8, cstatus, stats, t, False)
            c32[c, PKTS0 + d] += 1
            c64[c, BYTES0 + d] += meta[i, M_L3LEN]
            if d == 1 and cstatus[c] & S_SEEN_REPLY == 0:
                cstatus[c] = cstatus[c] | S_SEEN_REPLY
            if st_before & S_NEW_PENDING:
                cstatus[c] = cstatus[c] & ~S_NEW_PENDING
                emit(ev, evaddr, tbl, stats, cfg, EV_NEW, c, tkey, tport, c64, c32, c8,
                     cstatus, now)
            elif res != R_KILL and (cstatus[c] != st_before
                                    or np.int64(c8[c, STATE]) != old_state):
                emit(ev, evaddr, tbl, stats, cfg, EV_UPDATE, c, tkey, tport, c64, c32,
                     c8, cstatus, now)
            if res == R_KILL:
                destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                             ev, evaddr, c, now)
            break
    return n


@numba.njit(inline="always", cache=True)
def update_conn(c64, c32, c8, cstatus, cfg, tmo, stats, c, d, proto, fl, seq, ack, win,
                paylen, wscale, sackperm, now):
    """Per-protocol state update of conn c for a packet in direction d."""
    if proto == 6:
        return tcp_packet(c64, c32, c8, cstatus, cfg, tmo, stats, c, d, fl, seq, ack, win,
                          paylen, wscale, sackperm, now)
    if proto == 17:
        timeout = tmo[TMO_UDP]
        st = cstatus[c]
        if st & S_SEEN_REPLY:
            stream = np.int64(c32[c, UDP_STREAM_LO]) | (np.int64(c32[c, UDP_STREAM_HI]) << 32)
            if now > stream:
                timeout = tmo[TMO_UDP_STREAM]
                cstatus[c] = st | S_ASSURED
        c64[c, EXPIRES] = now + timeout
        return R_ACCEPT
    if proto == 1 or proto == 58:
        c64[c, EXPIRES] = now + tmo[TMO_ICMP]
        return R_ACCEPT
    c64[c, EXPIRES] = now + tmo[TMO_GENERIC]
    return R_ACCEPT


# ------------------------------------------------------------------ expiry

@kernel
def reap(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
         now, start, n_walk):
    """Walk routing buckets start..start+n_walk-1 (every chain inside them) and destroy
    expired conns, both tuples together. Returns (next_start, checked, expired), counted
    in tuples as gVisor's reapUnused counts them: an expired conn whose other tuple is in
    the same routing bucket counts that tuple as checked and expired too (the walk would
    have met it there)."""
    nb = tbl[T_NBUCKETS]
    nheads = tbl[T_NHEADS]
    checked = 0
    expired = 0
    b = start % nb
    for _ in range(n_walk):
        b = b % nb
        k = b
        while k < nheads:
            t = np.int64(heads[k])
            while t >= 0:
                nx = np.int64(tnext[t])
                c = t >> 1
                checked += 1
                if now > c64[c, EXPIRES]:
                    # the other tuple may be the next one: skip past it before freeing
                    while nx >= 0 and (nx >> 1) == c:
                        nx = np.int64(tnext[nx])
                    expired += 1
                    o = t ^ 1
                    if (cstatus[c] & (S_LINK1 if o & 1 else S_LINK0)
                            and tuple_hash_of(tkey, tport, c8, tbl, o) % nb == b):
                        checked += 1
                        expired += 1
                    stats[ST_EXPIRED] += 1
                    destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats,
                                 cfg, ev, evaddr, c, now)
                t = nx
            k += nb
        b += 1
    return b, checked, expired


@kernel
def collect_conns(cstatus, out):
    """Ids of allocated conns (not reply entries, not dying) into out; returns how many."""
    n = 0
    for c in range(cstatus.shape[0]):
        if cstatus[c] & S_USED and cstatus[c] & (S_REMOTE | S_DYING) == 0:
            out[n] = c
            n += 1
    return n


@kernel
def count_conns(cstatus):
    """How many allocated conns (not reply entries, not dying) there are."""
    n = 0
    for c in range(cstatus.shape[0]):
        if cstatus[c] & S_USED and cstatus[c] & (S_REMOTE | S_DYING) == 0:
            n += 1
    return n


@kernel
def take_hops(buf, off, ifindex, meta, verdict, local, lver, stats):
    """The router's hop, after tracking, as Linux's ip_forward runs after PREROUTING's
    conntrack and DNAT: every frame from an interface (``ifindex`` >= 0) with a final
    verdict that leaves it (accept, related, untracked, invalid) and is not addressed,
    after NAT, to one of the router's own addresses (``local`` / ``lver``: netconf's;
    local delivery takes no hop) loses one TTL / hop limit (the IPv4 checksum adjusted),
    or, arriving with 1 or 0, is dropped: verdict V_DROP, ``meta[i, M_REASON]`` =
    wire.HOP_EXPIRED (the ICMP generator answers those with time exceeded), counted
    ttl_expired. A pool verdict (the packet is judged elsewhere or later) is left alone,
    so each frame takes its hop once, where its conn lives. Returns how many expired."""
    expired = 0
    for i in range(off.shape[0]):
        v = verdict[i]
        if ifindex[i] < 0 or meta[i, M_L3LEN] <= 0 or not (
                v == V_ACCEPT or v == V_RELATED or v == V_UNTRACKED or v == V_INVALID):
            continue
        ver = meta[i, M_IPVER]
        l3 = off[i] + meta[i, M_L3]
        mine = False
        if local.shape[0]:
            hi, lo = load_addr(buf, l3 + (16 if ver == 4 else 24), 4 if ver == 4 else 16)
            for j in range(local.shape[0]):
                if lver[j] == ver and local[j, 0] == hi and local[j, 1] == lo:
                    mine = True
                    break
        if mine:
            continue
        if not decrement_ttl(buf, l3, ver):
            verdict[i] = V_DROP
            meta[i, M_REASON] = HOP_EXPIRED
            stats[ST_TTL_EXPIRED] += 1
            stats[ST_DROP] += 1
            expired += 1
    return expired


@kernel
def withdraw_new(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                 pconn, rows, ts):
    """Packets rows[j] (tuple ids pconn[i]) were tracked, then dropped before they left
    by a check Linux makes before POSTROUTING confirms a conn (ip_forward's MTU check).
    A conn such a packet created (its only packet so far, original direction) never
    existed, as Linux frees an unconfirmed conn: its NEW event is withdrawn, its insert
    uncounted, and it is released without DESTROY. Returns how many were withdrawn."""
    done = 0
    for j in range(rows.shape[0]):
        i = rows[j]
        t = pconn[i]
        if t < 0 or t & 1:
            continue
        c = t >> 1
        if (cstatus[c] & S_USED == 0 or cstatus[c] & S_CONFIRMED == 0
                or c32[c, PKTS0] != 1 or c32[c, PKTS0 + 1] != 0):
            continue
        n = tbl[T_EVN]
        for k in range(n - 1, -1, -1):
            if ev[k, E_CONN] == c and ev[k, E_TYPE] == EV_NEW:
                for m in range(k, n - 1):
                    for f in range(ev.shape[1]):
                        ev[m, f] = ev[m + 1, f]
                    for f in range(evaddr.shape[1]):
                        evaddr[m, f] = evaddr[m + 1, f]
                tbl[T_EVN] = n - 1
                break
        cstatus[c] = cstatus[c] & ~S_CONFIRMED
        stats[ST_INSERT] -= 1
        stats[ST_NEW] -= 1
        destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev,
                     evaddr, c, ts[i])
        done += 1
    return done
