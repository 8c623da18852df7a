# The pool's cross-shard protocol as a pure state machine: one Shard per worker owns a
# contiguous slice of the routing buckets and a ConnTrack table; shards talk only through
# the messages this module builds and consumes (workers/pool.py moves them over ZeroMQ).
"""Cross-shard insertion, handoff and release.

Ownership
    A conn's **home** is the shard owning its original tuple's bucket; only the home
    writes conn state. When the reply tuple's bucket belongs to another shard (the
    **owner**), the owner keeps a **reply entry**: a slot whose tuple 1 is linked in its
    bucket and whose c32 words say (home, conn) (table.S_REMOTE). The home keeps the conn
    with its reply tuple unlinked (S_XSHARD).

A round (one dispatcher batch per shard)
    Packets carry their global sequence number; a conn's packets are applied at its home
    in that order, whichever shard they reached first, so a round can be as long as the
    dispatcher likes (``max_round``) and an established conn never splits one.

    ``local(pk)`` runs the kernel over the shard's packets in order. Packets that hit a
    reply entry are *handed off* to the home with the conn's tuple id (the home checks
    it, it does not look it up). Packets that hit one of our cross-shard conns are
    *held* (V_HOLD): the other direction's handoffs come in step 0, and the two are
    merged by sequence number. A packet that starts a conn whose reply tuple is
    elsewhere creates it *pending* (S_PENDING) and parks; so do later packets of it.

    A miss that may answer an earlier packet of the round (the dispatcher's ``dep``: see
    ``answer_deps``) is *deferred* (V_DEFER) instead of starting a conn: the conn it
    answers may be being created elsewhere. Every step re-runs the deferred packets
    after the reservations it received were linked, so an answer finds its conn's
    reply entry as soon as that exists. One still missing starts a conn only once the
    packet it may answer is settled: the ``low`` of that packet's shard (its lowest
    deferred, held or bouncing sequence number, sent with every message, after the
    reservations of what it settled) is above it. The lowest unsettled packet anywhere
    always qualifies, so rounds end.

    Steering: the dispatcher remembers which shard got the first packet of each tuple
    that may start a conn (a UDP datagram, a TCP SYN; ``_steer``) and sends the inverted
    tuple's packets there, to the conn's likely home, not to their own bucket's owner.
    The home takes a steered packet only for the conn whose original tuple is the
    packet's inverted and whose reply tuple is the packet's own (tuples are unique: one
    table would find that conn too), and bounces anything else to the owner. So both
    directions of a conn without NAT meet at its home, without handoffs.

    Pure pairs (track.GX_PURE): when every packet of a round with a tuple or its inverse
    went to one shard, no handoff can come for their conn (without NAT), so hits on it
    are not held; and in a pool without NAT rules a conn such a packet starts is
    created *surely*: committed at once (nothing parked), its reply tuple reserved
    alongside (PEND_SURE). Its owner grants it: a clash needs another conn holding that
    tuple, either one started from the inverted tuple (whose packets went elsewhere this
    round, or whose reply entry the home would have hit) or one NATed onto it (there are
    no NAT rules). A sure conn refused anyway (the owner's table is full, or it
    restarted) is destroyed and counted ``sure_lost``; its packets of that round were
    already judged.

    Then supersteps: every shard sends every other shard exactly one :class:`Msg`
    (possibly empty) and then processes what it received, in sender order and in this
    section order: ``rel`` (releases), ``req`` (reservations), ``ans`` (answers),
    ``ho`` (handoffs, merged with what was held and with the released parked packets),
    ``bo`` (bounces, which join the deferred). A round ends after a superstep in which
    every shard said it had nothing to send or to wait for (``Msg.active`` false
    everywhere), so all shards agree. No shard ever waits for anything but the peers'
    message of the current superstep, which every shard sends before it reads; a
    superstep cannot deadlock. Typical rounds take 2 supersteps (established flows:
    handoffs, then silence) or 3 (new cross-shard conns: reservations, then grants with
    their answers' handoffs, then silence).

Insertion in ascending bucket order (gVisor's lock order, as messages)
    A conn needs two buckets: b0 (its original tuple, at home) and b1 (its reply tuple,
    at the owner). It **reserves the lower bucket first**:

    * b0 < b1: the home links the original tuple at once (visible: it holds b0) and
      sends ``req`` to the owner of b1.
    * b1 < b0: the original tuple is linked but S_INVIS (invisible to others'
      reservations: it does not hold b0 yet) and ``req`` goes to the owner of b1. On a
      grant the home takes b0: if a visible entry with that tuple appeared meanwhile the
      conn loses, releases b1 and its packets join the winner (or are dropped).

    The owner answers a ``req`` at once, never waiting: no visible entry with that tuple
    -> GRANT (it links the reply entry); a visible conn whose other tuple is the
    requester's original tuple -> JOIN (the requester's packets are that conn's, in the
    direction it names: the race where a packet and its inverse start at two shards
    together); anything else -> FAIL (insert_failed, the packets are dropped, as
    Linux's confirm does on a clash).

    Both contenders for the same pair of buckets ask for the same lower bucket first,
    so its owner orders them; the loser never holds the higher one. Exactly one conn
    results.

Handoff, bounce, release
    A handoff whose conn is gone (expired, reaped, lost in a worker crash) is **bounced**
    to the shard that owns the packet's own bucket together with a release of the stale
    reply entry; that shard looks it up afresh. A destroyed cross-shard conn waits on
    the table's dying list until ``release`` rows for its reply entry are sent.

Deviations (documented): NAT's port-in-use check only sees reply tuples in this shard's
buckets. A source-NATed conn whose reply tuple another shard holds (FAIL) searches again
among tuples whose reply hashes into its home's slice, which its home can check, and
commits there (``nat_remapped``); one table would have searched among all ports, so
contended ports differ from one process's. A DNATed conn has no port to move: its clash
stays insert_failed. (``shard_affine_nat`` prefers home ports from the start.) A handoff whose conn died on the way
(expired at home in the same round) starts its new conn a superstep late, so a later
packet elsewhere may start a conn first that it would have answered (a JOIN then).
A NATed reply that neither comes from where its conn's first packet went nor goes to
where it came from (SNAT and DNAT on one conn, both changing that end) has no dep.

Owner: the single thread of one worker. Time comes in with the packets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numba
import numpy as np

from . import track as K
from . import wire
from .batch import PacketBatch, concat, take
from .config import Config
from .cpu import prefetch
from .conntrack import REAP_FRACTION, REAP_MAX_INTERVAL, ConnTrack, forward_mask
from .errors import InvariantViolation
from .hashing import addr_words, hash_batch, hash_key, owner_of_bucket, owner_slices, owners
from .scatter import SeqOrder, by_owner, frames_in_order, group, part_of
from .table import (ConnTable, EXPIRES, HCONN, HOME, IPVER, PROTO, S_CONFIRMED, S_DYING, S_INVIS,
                    S_LINK0, S_LINK1, S_NEW_PENDING, S_PENDING, S_REMOTE, S_SRC_NAT, S_USED, S_XSHARD, T_COUNT,
                    T_DYING, T_FREE, T_SEED)

# answers
GRANT, JOIN, FAIL = 0, 1, 2
N_REL = 9    # release rows: key0..3, ports, proto, ipver, home, hconn
N_REQ = 14   # request rows: reply key0..3, rports, proto, ipver, orig key0..3, oports, conn,
             # again (1: a committed conn reserving anew at a restarted owner)
N_ANS = 4    # answer rows: conn, kind, join home, join tuple id
NEVER = np.iinfo(np.int64).max
SNAPSHOT_VERSION = 1     # Shard.snapshot's layout; a restore refuses any other
PEND_NONE, PEND_REQ, PEND_AGAIN = 0, 1, 2     # Shard.pend: what a conn's request is
# a conn created surely (committed) whose answer has not come: its request not sent yet,
# sent, or sent and its reply entry released already (it died; the slot waits for the
# answer, which names it)
PEND_SURE, PEND_SURE_SENT, PEND_SURE_RELEASED = 3, 4, 5


def fresh(given: np.ndarray) -> np.ndarray:
    """Which packets no kernel run has counted yet (track.G_* bits)."""
    return (given < 0) & ((-1 - given) & K.GX_COUNTED == 0)


def steered(given: np.ndarray) -> np.ndarray:
    """Which packets the dispatcher steered (track.GX_STEER), not yet run."""
    return (given < 0) & ((-1 - given) & K.GX_STEER != 0)


@dataclass
class Packets:
    """Frames with what the pool carries along: tuple hash, global sequence number, the
    tuple id a shard already found (or a track.G_* code), and ``dep``: the latest
    earlier packet of the round this one may answer, as ``seq << DEP_SHIFT | its shard``
    (-1: none; see ``answer_deps``)."""
    batch: PacketBatch
    hashes: np.ndarray
    seq: np.ndarray
    given: np.ndarray
    dep: np.ndarray

    def __len__(self):
        return len(self.batch)

    def take(self, idx) -> "Packets":
        idx = np.asarray(idx, dtype=np.int64)
        return Packets(take(self.batch, idx), self.hashes[idx], self.seq[idx], self.given[idx],
                       self.dep[idx])

    @staticmethod
    def concat(parts: list["Packets"]) -> "Packets":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Packets.empty()
        if len(parts) == 1:
            return parts[0]
        return Packets(concat([p.batch for p in parts]),
                       *(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("hashes", "seq", "given", "dep")))

    @staticmethod
    def empty() -> "Packets":
        """No packets: one shared value (nothing can be written into empty arrays)."""
        return _EMPTY

    @staticmethod
    def framesless(seq, ts, ifindex) -> "Packets":
        """Packets of empty frames that keep only their sequence number, time and
        interface (a result for a caller that does not want the frames)."""
        z = np.zeros(len(seq), dtype=np.int64)
        return Packets(PacketBatch(np.zeros(0, np.uint8), z, z.astype(np.int32), ifindex, ts),
                       z, seq, z, z)


_z = np.zeros(0, dtype=np.int64)
_EMPTY = Packets(PacketBatch.empty(), _z, _z, _z, _z)


@dataclass
class Msg:
    """One superstep's message from one shard to another."""
    active: bool = False                        # the sender sent something to anyone
    low: int = NEVER                            # sender's lowest unsettled sequence number
    rel: np.ndarray = field(default_factory=lambda: np.zeros((0, N_REL), np.uint64))
    req: np.ndarray = field(default_factory=lambda: np.zeros((0, N_REQ), np.uint64))
    ans: np.ndarray = field(default_factory=lambda: np.zeros((0, N_ANS), np.int64))
    ho: Packets = field(default_factory=Packets.empty)
    bo: Packets = field(default_factory=Packets.empty)

    def empty(self) -> bool:
        return not (len(self.rel) or len(self.req) or len(self.ans) or len(self.ho)
                    or len(self.bo))


# ------------------------------------------------------------------ table operations


@numba.njit(cache=True)
def find_visible(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                 k0, k1, k2, k3, ports, proto, ipver, exclude, now):
    """A tuple id holding this key that others must respect (not S_INVIS, not dying,
    not conn ``exclude``), or -1. An expired home conn found on the way is destroyed."""
    h = hash_key(tbl[T_SEED], k0, k1, k2, k3, ports, proto, ipver)
    while True:
        t = K.find_tuple(heads, tkey, tport, tnext, c8, tbl, h, k0, k1, k2, k3, ports, proto,
                         ipver)
        # find_tuple returns the first match; walk on past ones that do not count
        while t >= 0:
            c = t >> 1
            st = cstatus[c]
            if (c != exclude and st & (S_INVIS | S_DYING) == 0 and tkey[t, 0] == k0
                    and tkey[t, 1] == k1 and tkey[t, 2] == k2 and tkey[t, 3] == k3
                    and np.int64(tport[t]) == ports and np.int64(c8[c, PROTO]) == proto
                    and np.int64(c8[c, IPVER]) == ipver):
                break
            t = np.int64(tnext[t])
        if t < 0:
            return np.int64(-1)
        c = t >> 1
        if cstatus[c] & (S_REMOTE | S_PENDING) == 0 and now > c64[c, EXPIRES]:
            stats[K.ST_EXPIRED] += 1
            K.destroy_conn(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                           ev, evaddr, c, now)
            continue
        return t


@numba.njit(cache=True)
def link_reply_entry(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, row, home):
    """Link a reply entry for request ``row`` of shard ``home``; its slot or -1 (full)."""
    c = K.alloc_conn(tnext, c64, c32, c8, cstatus, tbl)
    if c < 0:
        return np.int64(-1)
    t1 = 2 * c + 1
    for k in range(4):
        tkey[t1, k] = row[k]
        tkey[t1 - 1, k] = row[7 + k]
    tport[t1] = row[4]
    tport[t1 - 1] = row[11]
    c8[c, PROTO] = row[5]
    c8[c, IPVER] = row[6]
    c32[c, HOME] = home
    c32[c, HCONN] = row[12]
    c64[c, EXPIRES] = NEVER          # the home decides expiry and sends a release
    cstatus[c] = S_USED | S_REMOTE | S_LINK1 | S_CONFIRMED
    h = hash_key(tbl[T_SEED], row[0], row[1], row[2], row[3], np.int64(row[4]),
                 np.int64(row[5]), np.int64(row[6]))
    K.link_tuple(heads, tnext, tbl, t1, h)
    return c


@numba.njit(cache=True)
def release_entry(heads, tkey, tport, tnext, c8, cstatus, c32, tbl, row):
    """Remove the reply entry ``row`` (a release) names; False when there is none."""
    h = hash_key(tbl[T_SEED], row[0], row[1], row[2], row[3], np.int64(row[4]),
                 np.int64(row[5]), np.int64(row[6]))
    t = np.int64(heads[h & K.chain_mask(tbl)])
    while t >= 0:
        c = t >> 1
        if (cstatus[c] & S_REMOTE and t & 1 and c32[c, HOME] == row[7]
                and c32[c, HCONN] == row[8] and tkey[t, 0] == row[0] and tkey[t, 1] == row[1]
                and tkey[t, 2] == row[2] and tkey[t, 3] == row[3] and tport[t] == row[4]):
            K.unlink_tuple(heads, tkey, tport, tnext, c8, tbl, t)
            K.free_slot(tnext, cstatus, tbl, c)
            return True
        t = np.int64(tnext[t])
    return False


@numba.njit(cache=True)
def release_rows(heads, tkey, tport, tnext, c8, cstatus, c32, tbl, rows):
    """release_entry for every row (a peer's releases, in order); how many removed one."""
    k = 0
    for j in range(rows.shape[0]):
        if release_entry(heads, tkey, tport, tnext, c8, cstatus, c32, tbl, rows[j]):
            k += 1
    return k


@numba.njit(inline="always", cache=True)
def _release_row(tkey, tport, c8, c, home, row):
    """The release row of conn c's reply entry."""
    t1 = 2 * c + 1
    for k in range(4):
        row[k] = tkey[t1, k]
    row[4] = tport[t1]
    row[5] = c8[c, PROTO]
    row[6] = c8[c, IPVER]
    row[7] = home
    row[8] = c


@numba.njit(cache=True)
def drain_dying(tkey, tport, tnext, c8, cstatus, tbl, home, out, pend):
    """Release rows for every dying cross-shard conn (their reply entries), freeing
    the slots. Returns how many rows; stops early when ``out`` is full. A sure conn whose
    answer has not come stays on the list, its slot not reused (the answer names it):
    its release goes out once its request has (PEND_SURE_SENT; a release read before
    the request would leave the grant's entry behind), and again when it is freed."""
    n = 0
    c = tbl[T_DYING]
    keep = np.int64(-1)
    while c >= 0 and n < out.shape[0]:
        nx = tnext[2 * c + 1]
        p = pend[c]
        if p == PEND_SURE or p == PEND_SURE_SENT or p == PEND_SURE_RELEASED:
            if p == PEND_SURE_SENT:
                _release_row(tkey, tport, c8, c, home, out[n])
                n += 1
                pend[c] = PEND_SURE_RELEASED
            tnext[2 * c + 1] = keep
            keep = c
            c = nx
            continue
        _release_row(tkey, tport, c8, c, home, out[n])
        n += 1
        K.free_slot(tnext, cstatus, tbl, c)
        c = nx
    while keep >= 0:
        nx = tnext[2 * keep + 1]
        tnext[2 * keep + 1] = c
        c = keep
        keep = nx
    tbl[T_DYING] = c
    return n


@numba.njit(cache=True)
def forget_peer(heads, tkey, tport, tnext, c8, cstatus, c32, tbl, peer, n_workers, out,
                forget=True):
    """A restarted peer lost its table: free our reply entries pointing at it (unless
    ``forget`` is False: it restored its conns from a snapshot), and list our cross-shard
    conns whose reply entry it held (to reserve again). Returns (entries freed, conns
    listed in out)."""
    freed = 0
    m = 0
    nb = tbl[K.T_NBUCKETS]
    for c in range(cstatus.shape[0]):
        st = cstatus[c]
        if st & S_USED == 0 or st & S_DYING:
            continue
        if st & S_REMOTE and c32[c, HOME] == peer:
            if not forget:
                continue
            K.unlink_tuple(heads, tkey, tport, tnext, c8, tbl, 2 * c + 1)
            K.free_slot(tnext, cstatus, tbl, c)
            freed += 1
        elif st & S_XSHARD:
            h = K.tuple_hash_of(tkey, tport, c8, tbl, 2 * c + 1)
            if owner_of_bucket(h % nb, n_workers, nb) == peer:
                out[m] = c
                m += 1
    return freed, m


@numba.njit(cache=True)
def request_rows(tkey, tport, c8, seed, conns, again, rows, rh):
    """Request rows for pending conns ``conns`` (their reply tuple, original tuple and
    id) and the hash of each reply tuple (where the row goes)."""
    for j in range(conns.shape[0]):
        c = conns[j]
        for k in range(4):
            rows[j, k] = tkey[2 * c + 1, k]
            rows[j, 7 + k] = tkey[2 * c, k]
        rows[j, 4] = tport[2 * c + 1]
        rows[j, 5] = c8[c, PROTO]
        rows[j, 6] = c8[c, IPVER]
        rows[j, 11] = tport[2 * c]
        rows[j, 12] = c
        rows[j, 13] = again
        rh[j] = hash_key(seed, rows[j, 0], rows[j, 1], rows[j, 2], rows[j, 3],
                         np.int64(rows[j, 4]), np.int64(rows[j, 5]), np.int64(rows[j, 6]))


@numba.njit(cache=True)
def answer_rows(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                reqs, sender, me, now, ans):
    """Answer shard ``sender``'s requests at once, in order (see the module docstring):
    GRANT links a reply entry, JOIN names the visible conn whose other tuple is the
    requester's original, FAIL otherwise. Returns (grants, joins, fails)."""
    g = 0
    jn = 0
    f = 0
    m = reqs.shape[0]
    mask = K.chain_mask(tbl)
    rh = np.empty(m, dtype=np.int64)
    for j in range(m):
        r = reqs[j]
        rh[j] = hash_key(tbl[T_SEED], r[0], r[1], r[2], r[3], np.int64(r[4]), np.int64(r[5]),
                         np.int64(r[6]))
    # hints only (as track.prefetch_ahead): rows come from anywhere in a large table, so
    # each takes several dependent misses (chain head, tuple, a free slot's records);
    # hinting rows ahead overlaps them (1.2 us a row without, on a 115k-conn table)
    free = np.int64(tbl[T_FREE])
    cap = tnext.shape[0] // 2
    for j in range(min(m, PF_REQ)):
        prefetch(heads, rh[j] & mask)
    for j in range(PF_REQ // 2):
        if 0 <= free < cap:
            K.prefetch_conn(c64, c8, free)
            prefetch(c32, free)
            prefetch(tnext, 2 * free)
            free = np.int64(tnext[2 * free])
    for j in range(m):
        if j + PF_REQ < m:
            prefetch(heads, rh[j + PF_REQ] & mask)
        if j + PF_REQ // 2 < m:
            t = np.int64(heads[rh[j + PF_REQ // 2] & mask])
            if t >= 0:
                K.prefetch_record(tkey, tnext, t)
        r = reqs[j]
        ans[j, 0] = np.int64(r[12])
        ans[j, 2] = 0
        ans[j, 3] = 0
        hit = find_visible(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                           ev, evaddr, r[0], r[1], r[2], r[3], np.int64(r[4]), np.int64(r[5]),
                           np.int64(r[6]), -1, now)
        if hit < 0:
            if 0 <= free < cap:          # the slot a grant PF_REQ / 2 later takes
                K.prefetch_conn(c64, c8, free)
                prefetch(c32, free)
                prefetch(tnext, 2 * free)
                free = np.int64(tnext[2 * free])
            if link_reply_entry(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, r,
                                sender) < 0:
                ans[j, 1] = FAIL            # no room for the reply entry
                f += 1
            else:
                ans[j, 1] = GRANT
                g += 1
            continue
        c = hit >> 1
        other = hit ^ 1
        same = (tkey[other, 0] == r[7] and tkey[other, 1] == r[8] and tkey[other, 2] == r[9]
                and tkey[other, 3] == r[10] and tport[other] == r[11])
        if same and r[13] != 0 and cstatus[c] & S_REMOTE and c32[c, HOME] == sender:
            # a home reserving anew (its owner or itself restored a snapshot) finds its
            # own entry: keep it, pointing at the conn it names now
            c32[c, HCONN] = np.uint32(r[12])
            ans[j, 1] = GRANT
            g += 1
        elif same:
            ans[j, 1] = JOIN
            jn += 1
            if cstatus[c] & S_REMOTE:
                ans[j, 2] = c32[c, HOME]
                ans[j, 3] = 2 * np.int64(c32[c, HCONN]) + (other & 1)
            else:
                ans[j, 2] = me
                ans[j, 3] = other
        else:
            ans[j, 1] = FAIL
            f += 1
    return g, jn, f


PF_REQ = 8      # answer_rows / commit_rows hint rows this far ahead


@numba.njit(inline="always", cache=True)
def _hint_commit(ans, pend, c64, c8, j):
    c = ans[j, 0]
    if 0 <= c < pend.shape[0]:
        K.prefetch_conn(c64, c8, c)


@numba.njit(cache=True)
def commit_rows(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                ans, pend, now, done):
    """Commit every pending conn whose answer is a plain GRANT (done[j] = 1): it holds
    both buckets now. An S_INVIS conn takes its own (higher) bucket here, unless a
    visible entry with its tuple appeared meanwhile. Every other answer (JOIN, FAIL,
    stale, a re-reservation, a lost bucket) is left to Python (done[j] = 0)."""
    for j in range(min(ans.shape[0], PF_REQ)):
        _hint_commit(ans, pend, c64, c8, j)
    for j in range(ans.shape[0]):
        if j + PF_REQ < ans.shape[0]:
            _hint_commit(ans, pend, c64, c8, j + PF_REQ)
        done[j] = 0
        c = ans[j, 0]
        if ans[j, 1] == GRANT and 0 <= c < pend.shape[0] and pend[c] >= PEND_SURE:
            pend[c] = PEND_NONE     # committed already (dying: released now)
            done[j] = 1
            continue
        if (ans[j, 1] != GRANT or c < 0 or c >= pend.shape[0] or pend[c] != PEND_REQ
                or cstatus[c] & S_PENDING == 0):
            continue
        if cstatus[c] & S_INVIS:
            if find_visible(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg,
                            ev, evaddr, tkey[2 * c, 0], tkey[2 * c, 1], tkey[2 * c, 2],
                            tkey[2 * c, 3], np.int64(tport[2 * c]), np.int64(c8[c, PROTO]),
                            np.int64(c8[c, IPVER]), c, now) >= 0:
                continue
        cstatus[c] &= ~(S_PENDING | S_INVIS) & 0xFFFF
        c64[c, EXPIRES] = now        # committed: its first packet sets the timeout
        pend[c] = PEND_NONE
        done[j] = 1


@numba.njit(cache=True)
def relink_reply(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                 c, r0, r1, r2, r3, rports, now):
    """Give pending conn c the reply tuple (r*, rports), which hashes into this table's
    slice, and commit it here: linked, no longer cross-shard or pending. False (nothing
    changed) when the tuple is not ours or is held, or c's own tuple was taken meanwhile."""
    proto = np.int64(c8[c, PROTO])
    ipver = np.int64(c8[c, IPVER])
    rh = hash_key(tbl[T_SEED], r0, r1, r2, r3, rports, proto, ipver)
    rb = rh % tbl[K.T_NBUCKETS]
    if rb < cfg[K.CF_SHARD_LO] or rb >= cfg[K.CF_SHARD_HI]:
        return False
    if find_visible(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
                    r0, r1, r2, r3, rports, proto, ipver, -1, now) >= 0:
        return False
    if cstatus[c] & S_INVIS and find_visible(
            heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, stats, cfg, ev, evaddr,
            tkey[2 * c, 0], tkey[2 * c, 1], tkey[2 * c, 2], tkey[2 * c, 3],
            np.int64(tport[2 * c]), proto, ipver, c, now) >= 0:
        return False
    t1 = 2 * c + 1
    tkey[t1, 0] = r0
    tkey[t1, 1] = r1
    tkey[t1, 2] = r2
    tkey[t1, 3] = r3
    tport[t1] = rports
    K.link_tuple(heads, tnext, tbl, t1, rh)
    cstatus[c] = (cstatus[c] & ~(S_XSHARD | S_PENDING | S_INVIS) & 0xFFFF) | S_LINK1
    c64[c, EXPIRES] = now            # committed: its first packet sets the timeout
    return True


def key_rows(pk: Packets, idx: np.ndarray, ncols: int) -> np.ndarray:
    """Rows for packets idx of pk with their tuple in columns 0..6 (key words, ports,
    proto, ipver), the rest zero: the start of a release or request row."""
    b = pk.batch
    meta, addr = wire.new_meta(len(idx))
    wire.parse_batch(b.buf, b.off[idx], b.length[idx], meta, addr, False)
    rows = np.zeros((len(idx), ncols), dtype=np.uint64)
    rows[:, 0:4] = addr
    rows[:, 4] = meta[:, wire.M_PORTS]
    rows[:, 5] = meta[:, wire.M_PROTO]
    rows[:, 6] = meta[:, wire.M_IPVER]
    return rows


class Shard:
    """Worker k of n: its table and its side of the protocol.

    Call order per round: ``local(packets)``; then repeatedly ``outbox()`` -> deliver
    each peer its Msg -> ``step(inbox)`` with the n-1 received Msgs in sender order,
    until ``step`` returns False (round over on every shard); then ``results()``.
    Between rounds: ``reap(now)``.
    """

    def __init__(self, k: int, n: int, config: Config | None = None, *, seed: int, rules=None,
                 network=None, router: bool = False, rng=None):
        self.k, self.n = k, n
        self.config = config or Config()
        self.nb = self.config.n_buckets
        # a shard does not reassemble (its kernel runs see one shard's packets): no
        # fragment queues, so never V_QUEUED here. The worker pool reassembles in front
        # of its shards (frag.PoolStage); a LocalPool passes fragments as the tracker
        # classifies them (later ones UNTRACKED)
        self.ct = ConnTrack(replace(self.config, defrag=False), seed=seed, rules=rules,
                            network=network, router=router, rng=rng, shard=(k, n),
                            owned=owner_slices(n, self.nb)[k])
        self._out: dict[int, dict[str, list]] = {}
        self._reset_out()
        # per conn slot: PEND_REQ pending and requested, PEND_AGAIN committed and
        # reserving anew (a restarted owner); the pending conns' packets (given = tid)
        self.pend = np.zeros(self.ct.table.capacity, dtype=np.uint8)
        self.parked = Packets.empty()
        # finished packets: (Packets, which of them or None for all, their verdicts);
        # frames are only gathered when results() is asked for them
        self.done: list[tuple[Packets, np.ndarray | None, np.ndarray]] = []
        self.held: list[Packets] = []                  # V_HOLD: wait for step 0's handoffs
        self.generated: list[Packets] = []             # take_generated: ICMP errors
        self.deferred = Packets.empty()                # V_DEFER: wait for earlier creations
        self.reran = 0
        # this round's reassembled datagrams: (sorted seq, largest fragment), or None
        # (frag.PoolStage: each is held to its egress MTU by that size, as in one engine)
        self.sizes: tuple[np.ndarray, np.ndarray] | None = None
        self.counts = {"handoffs_out": 0, "handoffs_in": 0, "bounces": 0, "reserve_requests": 0,
                       "grants": 0, "joins": 0, "fails": 0, "releases_out": 0,
                       "releases_applied": 0, "stale_answers": 0, "supersteps": 0,
                       "peer_restarts": 0, "entries_forgotten": 0, "reply_lost": 0,
                       "abandoned": 0, "peer_lost": 0, "held": 0, "deferred": 0,
                       "deferred_released": 0, "nat_remapped": 0, "restored": 0,
                       "parked": 0, "steered": 0, "steer_missed": 0, "sure_lost": 0,
                       "sure_unanswered": 0,
                       "busy_us": 0, "step_wait_us": 0}     # the worker pool's timers
        self._dying = np.zeros((1024, N_REL), dtype=np.uint64)
        self._scratch = wire.MetaScratch()
        self._order = SeqOrder()
        self._bounce_low = NEVER      # lowest seq we bounced in the last outbox
        self.now = 0
        self._reap_at = None
        self._reap_start = 0

    # ------------------------------------------------------------ plumbing
    def _reset_out(self):
        self._out = {p: {"rel": [], "req": [], "ans": [], "ho": [], "bo": []}
                     for p in range(self.n) if p != self.k}

    def owner(self, h: int) -> int:
        """The shard owning the routing bucket of tuple hash h."""
        return owner_of_bucket(int(h) % self.nb, self.n, self.nb)

    def _kernel(self, pk: Packets):
        """Run the tracking kernel over pk in order; returns (verdict, tid)."""
        n = len(pk)
        meta, addr = self._scratch(n)
        # packets another kernel run already saw (held, deferred, handoffs, bounces,
        # parked) had their checksums checked there
        validate = self.ct.config.checksum and bool(fresh(pk.given).any())
        verdict = np.empty(n, dtype=np.uint8)
        tid = np.empty(n, dtype=np.int64)
        if n:
            self.now = max(self.now, int(pk.batch.ts.max()))
        self.ct.parse_run(pk.batch, meta, addr, pk.hashes, pk.batch.ts, verdict, tid, pk.given,
                          validate, parse_hash=False)
        sure = np.flatnonzero(tid >= K.SURE_TAG)
        if len(sure):
            tid[sure] &= K.SURE_TAG - 1
            c = tid[sure] >> 1
            # one the same run destroyed again is released through the dying list
            self._request(c[self.ct.table.cstatus[c] & S_DYING == 0], sure=True)
        # only final verdicts leave (a parked, held or handed-off packet is judged where
        # its conn lives, once it is committed)
        fwd = forward_mask(verdict, self.ct.config.drop_invalid) & (verdict <= K.V_NOTIP)
        size = None
        if self.sizes is not None and n:
            fs, fm = self.sizes
            j = np.minimum(np.searchsorted(fs, pk.seq), fs.shape[0] - 1)
            hit = fs[j] == pk.seq
            if hit.any():
                size = meta[:, wire.M_L3LEN].astype(np.int64)
                size[hit] = fm[j[hit]]
        gen, by = self.ct.generate(pk.batch, meta, verdict, fwd, tid, pk.batch.ts, size=size)
        if gen is not None:         # each frame carries the sequence number of its cause
            z = np.zeros(len(gen), dtype=np.int64)
            self.generated.append(Packets(gen, z - 1, pk.seq[by], z, z - 1))
        return verdict, tid

    def take_generated(self) -> Packets:
        """The frames this shard's engine originated (its ICMP errors) since the last
        call, in the order of the packets they answer: ``seq`` is that packet's sequence
        number (``hashes`` and ``dep`` -1). Clears them."""
        gen, self.generated = Packets.concat(self.generated), []
        return self._sort(gen)

    def _sort(self, pk: Packets) -> Packets:
        if len(pk) < 2 or bool((pk.seq[1:] > pk.seq[:-1]).all()):
            return pk
        return pk.take(self._order(pk.seq))

    def _dispose(self, pk: Packets, verdict: np.ndarray, tid: np.ndarray):
        """Route each packet by its verdict: final ones to the results, the others to
        their home, their owner or their pending conn."""
        t = self.ct.table
        final = verdict <= K.V_NOTIP
        if final.all():
            self.done.append((pk, None, verdict))
            return
        idx = np.flatnonzero(final)
        if len(idx):
            self.done.append((pk, idx, verdict[idx]))
        ho = np.flatnonzero(verdict == K.V_HANDOFF)
        if len(ho):
            e = tid[ho] >> 1
            homes = t.c32[e, HOME].astype(np.int64)
            given = 2 * t.c32[e, HCONN].astype(np.int64) + 1
            self.counts["handoffs_out"] += len(ho)
            for home, sel in by_owner(homes, self.n):
                part = pk.take(ho[sel])
                part.given[:] = given[sel]
                self._out[home]["ho"].append(part)
        bo = np.flatnonzero(verdict == K.V_BOUNCE)
        if len(bo):
            own = owners(pk.hashes[bo], self.n, self.nb)
            self.counts["bounces"] += len(bo)
            self.counts["steer_missed"] += int(steered(pk.given[bo]).sum())
            for o, sel in by_owner(own, self.n):
                part = pk.take(bo[sel])
                part.given[:] = K.G_COUNTED_DEFER       # a miss there: obeys its dep
                self._out[o]["bo"].append(part)
        hold = np.flatnonzero(verdict == K.V_HOLD)
        if len(hold):
            part = pk.take(hold)
            # looked up again, but a steered packet by the conn it found (its own tuple's
            # bucket is not ours)
            part.given[:] = np.where(steered(part.given), tid[hold], K.G_COUNTED)
            self.held.append(part)
            self.counts["held"] += len(hold)
        dfr = np.flatnonzero(verdict == K.V_DEFER)
        if len(dfr):
            part = pk.take(dfr)
            part.given[:] = K.G_COUNTED_DEFER
            self.deferred = Packets.concat([self.deferred, part])
            self.counts["deferred"] += len(dfr)
        park = np.flatnonzero(verdict == K.V_PARK)
        if len(park):
            part = pk.take(park)
            part.given[:] = tid[park]
            self.counts["parked"] += len(park)
            self.parked = Packets.concat([self.parked, part])
            conns = np.unique(tid[park] >> 1)
            self._request(conns[self.pend[conns] == PEND_NONE])

    def _unpark(self, conns) -> Packets:
        """Take the parked packets of ``conns`` out."""
        if not len(self.parked):
            return Packets.empty()
        mine = np.isin(self.parked.given >> 1, conns)
        if not mine.any():
            return Packets.empty()
        out = self.parked.take(np.flatnonzero(mine))
        self.parked = self.parked.take(np.flatnonzero(~mine))
        return out

    def peer_lost(self, p: int):
        """Peer p died: conns waiting for its answer will not get one; drop them."""
        for c in np.flatnonzero(self.pend != PEND_NONE):
            if self._reply_owner(int(c)) != p:
                continue
            if self.pend[c] >= PEND_AGAIN:
                self.pend[c] = PEND_NONE
                continue
            self.counts["peer_lost"] += 1
            self._fail(self._abort(int(c)))
        self._drain_dying()

    def _reply_owner(self, c: int) -> int:
        t = self.ct.table
        return self.owner(K.tuple_hash_of(t.tkey, t.tport, t.c8, t.tbl, 2 * c + 1))

    def peer_restarted(self, p: int):
        """Peer p came back with an empty table (its worker died): forget our entries
        for its conns and reserve our conns' reply tuples there again."""
        t = self.ct.table
        out = np.empty(t.capacity, dtype=np.int64)
        freed, m = forget_peer(t.heads, t.tkey, t.tport, t.tnext, t.c8, t.cstatus, t.c32,
                               t.tbl, p, self.n, out)
        self.counts["peer_restarts"] += 1
        self.counts["entries_forgotten"] += int(freed)
        self._request(out[:m].copy(), again=True)

    def peer_restored(self, p: int):
        """Peer p came back with its table as of its last snapshot: our entries for its
        conns stay (one whose conn it no longer has bounces and is released on first
        use); our conns' reply tuples are reserved there again (granted where its
        restored entry is still ours)."""
        t = self.ct.table
        out = np.empty(t.capacity, dtype=np.int64)
        _, m = forget_peer(t.heads, t.tkey, t.tport, t.tnext, t.c8, t.cstatus, t.c32,
                           t.tbl, p, self.n, out, False)
        self.counts["peer_restarts"] += 1
        self._request(out[:m].copy(), again=True)

    def delete(self, proto: int | None = None, src=None, dst=None, sport: int | None = None,
               dport: int | None = None) -> int:
        """conntrack -D (-F with no filter): destroy the conns homed here whose original
        tuple matches every field given (addresses as ipaddress objects); their reply
        entries at other shards are released next round. Returns how many went.
        Precondition: between rounds."""
        t = self.ct.table
        st = t.cstatus
        c = np.flatnonzero((st & S_USED != 0) & (st & (S_REMOTE | S_DYING) == 0))
        if proto is not None:
            c = c[t.c8[c, PROTO] == proto]
        for addr, col in ((src, 0), (dst, 2)):
            if addr is not None:
                hi, lo = addr_words(addr.packed)
                k = t.tkey[2 * c]
                c = c[(k[:, col] == hi) & (k[:, col + 1] == lo)
                      & (t.c8[c, IPVER] == addr.version)]
        if sport is not None:
            c = c[(t.tport[2 * c] >> 16) == sport]
        if dport is not None:
            c = c[(t.tport[2 * c] & 0xFFFF) == dport]
        ta, ct = self._table_args(), self.ct
        for x in c:
            K.destroy_conn(*ta, ct.stats_arr, ct.cfg, ct.ev, ct.evaddr, int(x), self.now)
        self._drain_dying()
        return len(c)

    def snapshot(self) -> tuple[dict, dict[str, np.ndarray]]:
        """This shard's state between two rounds, as (scalars, arrays): the table, the
        reaper's place, the packet clock and the NAT search's random state. Counters are
        not in it: what a dead incarnation counted is already reported. The arrays are
        the live ones: write them out before the next round.
        Precondition: no round in progress (nothing parked, held, deferred or pending)."""
        if len(self.parked) or self.held or len(self.deferred) or self.pend.any():
            raise InvariantViolation(f"shard {self.k}: snapshot inside a round")
        t, ct = self.ct.table, self.ct
        rng = ct.nat.rng.bit_generator.state if ct.nat is not None else None
        scalars = {"version": SNAPSHOT_VERSION, "k": self.k, "n": self.n, "seed": t.seed,
                   "capacity": t.capacity, "n_buckets": int(t.tbl[K.T_NBUCKETS]),
                   "now": int(self.now), "reap_start": int(self._reap_start),
                   "reap_at": -1 if self._reap_at is None else int(self._reap_at),
                   "reap_interval": int(ct.reap_interval),
                   "rng": json.dumps(rng) if rng is not None else ""}
        arrays = {"heads": t.heads, "trec": t._trec, "crec": t._crec, "tbl": t.tbl}
        return scalars, arrays

    def restore(self, scalars: dict, arrays: dict[str, np.ndarray]) -> int:
        """Load a ``snapshot()`` of this same shard (k of n, same seed, table shape and
        version) into this fresh one, and reserve every cross-shard conn's reply tuple
        again (its entry may have been released since). Returns the entries restored.
        Raises ValueError naming what differs; then nothing was changed."""
        t, ct = self.ct.table, self.ct
        want = {"version": SNAPSHOT_VERSION, "k": self.k, "n": self.n, "seed": t.seed,
                "capacity": t.capacity, "n_buckets": int(t.tbl[K.T_NBUCKETS])}
        for key, v in want.items():
            if scalars.get(key) != v:
                raise ValueError(f"{key} is {scalars.get(key)!r}, this shard's is {v!r}")
        mine = {"heads": t.heads, "trec": t._trec, "crec": t._crec, "tbl": t.tbl}
        for key, a in mine.items():
            b = arrays.get(key)
            if b is None or b.dtype != a.dtype or b.shape != a.shape:
                raise ValueError(f"array {key} is not {a.dtype} {a.shape}")
        if t.count or self.pend.any():
            raise ValueError("this shard is not fresh")
        for key, a in mine.items():
            a[...] = arrays[key]
        self.now = int(scalars["now"])
        self._reap_start = int(scalars["reap_start"])
        self._reap_at = None if scalars["reap_at"] < 0 else int(scalars["reap_at"])
        ct.reap_interval = int(scalars["reap_interval"])
        if ct.nat is not None and scalars.get("rng"):
            ct.nat.rng.bit_generator.state = json.loads(scalars["rng"])
        st = t.cstatus
        xs = np.flatnonzero((st & S_USED != 0) & (st & S_XSHARD != 0) & (st & S_DYING == 0))
        self._request(xs, again=True)
        self.counts["restored"] = t.count
        return t.count

    def _request(self, conns: np.ndarray, again: bool = False, sure: bool = False):
        """Reserve the reply tuples of ``conns`` at their owners (rows go out next).
        ``again``: committed conns reserving anew (a restarted owner); ``sure``: committed
        conns created surely (track.create_conn)."""
        if not len(conns):
            return
        t = self.ct.table
        conns = np.asarray(conns, dtype=np.int64)
        rows = np.zeros((len(conns), N_REQ), dtype=np.uint64)
        rh = np.empty(len(conns), dtype=np.int64)
        request_rows(t.tkey, t.tport, t.c8, t.seed, conns, int(again), rows, rh)
        own = owners(rh, self.n, self.nb)
        for o, sel in by_owner(own, self.n):
            self._out[o]["req"].append(rows[sel])
        self.pend[conns] = PEND_AGAIN if again else PEND_SURE if sure else PEND_REQ
        self.counts["reserve_requests"] += len(conns)

    def _drain_dying(self):
        t = self.ct.table
        n = len(self._dying)
        while n == len(self._dying):
            n = drain_dying(t.tkey, t.tport, t.tnext, t.c8, t.cstatus, t.tbl, self.k, self._dying,
                            self.pend)
            for r in self._dying[:n]:
                rh = hash_key(t.seed, r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]))
                self._out[self.owner(rh)]["rel"].append(r.copy())
                self.counts["releases_out"] += 1

    def _table_args(self):
        t = self.ct.table
        return (t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8, t.cstatus, t.tbl)

    def _abort(self, c: int):
        """Undo pending conn c: it never existed (no NEW/DESTROY events); its reservation,
        if granted, is released through the dying list."""
        t = self.ct.table
        st = self.ct.stats_arr
        t.cstatus[c] &= ~(S_CONFIRMED | S_NEW_PENDING | S_PENDING | S_INVIS) & 0xFFFF
        st[K.ST_INSERT] -= 1
        st[K.ST_NEW] -= 1
        K.destroy_conn(*self._table_args(), st, self.ct.cfg, self.ct.ev, self.ct.evaddr, c,
                       self.now)
        self.pend[c] = PEND_NONE
        return self._unpark([c])

    # ------------------------------------------------------------ a round
    def local(self, pk: Packets, first: int | None = None):
        """The dispatcher's packets for this shard (in sequence order), ``given`` G_FRESH
        or G_FRESH_DEFER. Hits on our cross-shard conns are held for step 0 (the other
        direction's handoffs come then); misses that may answer an earlier packet of the
        round are deferred. ``first``: the round's first sequence number, when known:
        the packets before the round's first one at another shard are not held (no
        handoff can come before them), so a conn's packets in a round that reached only
        this shard so far need no superstep (a live round of one packet)."""
        if len(pk):
            self.counts["steered"] += int(steered(pk.given).sum())
            lead = 0
            if first is not None:
                own = pk.seq == np.arange(first, first + len(pk))
                lead = len(pk) if own.all() else int(np.argmin(own))
            for part, hold in ((pk, 1),) if lead == 0 else ((pk, 0),) if lead == len(pk) \
                    else ((pk.take(np.arange(lead)), 0), (pk.take(np.arange(lead, len(pk))), 1)):
                cfg = self.ct.cfg
                cfg[K.CF_HOLD] = hold
                try:
                    verdict, tid = self._kernel(part)
                finally:
                    cfg[K.CF_HOLD] = 0
                self._dispose(part, verdict, tid)
        self._drain_dying()

    def _drop_dead_requests(self):
        """Sure conns that died before their request went out: no request (it would
        reach the owner after the release), no wait for an answer."""
        cs = self.ct.table.cstatus
        dropped = False
        for q in self._out.values():
            for j, rows in enumerate(q["req"]):
                c = rows[:, 12].astype(np.int64)
                dead = (self.pend[c] == PEND_SURE) & (cs[c] & S_DYING != 0)
                if dead.any():
                    self.pend[c[dead]] = PEND_NONE
                    q["req"][j] = rows[~dead]
                    dropped = True
        if dropped:
            self._drain_dying()

    def _low(self, msgs) -> int:
        """Our lowest sequence number that may still create a conn: deferred and held
        packets here, bounces we are sending. (Not handoffs: one whose conn died on the
        way comes back as a bounce a superstep later, so a conn it starts may be created
        after a later packet's elsewhere: counted in ``bounces``.)"""
        low = NEVER
        for part in [self.deferred, *self.held, *(m.bo for m in msgs.values())]:
            if len(part):
                # a deferred packet that cannot start a conn (a SYN/ACK, an echo reply,
                # an ICMP error) only waits; bounces (dep -1) may
                starts = (part.dep < 0) | (part.dep & DEP_STARTS != 0) \
                    if part is self.deferred else slice(None)
                if len(part.seq[starts]):
                    low = min(low, int(part.seq[starts].min()))
        return low

    def outbox(self) -> dict[int, Msg]:
        """This superstep's message to every peer (built from what is queued)."""
        self._drop_dead_requests()
        msgs = {}
        for p, q in self._out.items():
            m = Msg()
            if q["rel"]:
                m.rel = np.vstack(q["rel"])
            if q["req"]:
                m.req = np.vstack(q["req"])
            if q["ans"]:
                m.ans = np.vstack(q["ans"])
            m.ho = Packets.concat(q["ho"])
            m.bo = Packets.concat(q["bo"])
            msgs[p] = m
        active = (any(not m.empty() for m in msgs.values()) or len(self.deferred) > 0
                  or len(self.held) > 0)
        low = self._low(msgs)
        for m in msgs.values():
            m.active = active
            m.low = low
        self._sent_active = active
        for m in msgs.values():
            if len(m.req):
                c = m.req[:, 12].astype(np.int64)
                self.pend[c[self.pend[c] == PEND_SURE]] = PEND_SURE_SENT
        # what we bounce now its owner may start a conn from in this same superstep
        bo = [m.bo.seq for m in msgs.values() if len(m.bo)]
        self._bounce_low = int(min(x.min() for x in bo)) if bo else NEVER
        self._reset_out()
        return msgs

    def step(self, inbox: list[Msg], final_ok: bool = False) -> bool:
        """Process one superstep's messages (from every peer, in sender order). Returns
        False when the round is over everywhere: nobody sent anything this superstep.
        A round cannot end with pending conns unless a peer vanished during it
        (``final_ok``, the worker pool): those are dropped and counted ``abandoned``."""
        self.counts["supersteps"] += 1
        if not self._sent_active and not any(m.active for m in inbox):
            if len(self.deferred) or self.held:
                raise AssertionError(f"shard {self.k}: round ended with deferred packets")
            left = np.unique(self.parked.given >> 1)
            if len(left) and not final_ok:
                raise AssertionError(f"shard {self.k}: round ended with pending conns "
                                     f"{left.tolist()}")
            for c in left:
                self.counts["abandoned"] += 1
                self._fail(self._abort(int(c)))
            if final_ok:
                # sure conns whose owner vanished: committed; its restart reserves again
                unanswered = self.pend >= PEND_SURE
                self.counts["sure_unanswered"] += int(unanswered.sum())
                self.pend[unanswered] = PEND_NONE
            self._drain_dying()
            return False
        ta = self._table_args()
        t = self.ct.table
        st, cfg, ev, evaddr = self.ct.stats_arr, self.ct.cfg, self.ct.ev, self.ct.evaddr
        # 1. releases
        for m in inbox:
            if len(m.rel):
                self.counts["releases_applied"] += release_rows(
                    t.heads, t.tkey, t.tport, t.tnext, t.c8, t.cstatus, t.c32, t.tbl, m.rel)
        # 2. reservations: answer at once
        for sender, m in self._senders(inbox):
            if len(m.req):
                ans = np.zeros((len(m.req), N_ANS), dtype=np.int64)
                g, j, f = answer_rows(*ta, st, cfg, ev, evaddr, m.req, sender, self.k,
                                      self.now, ans)
                self.counts["grants"] += g
                self.counts["joins"] += j
                self.counts["fails"] += f
                self._out[sender]["ans"].append(ans)
        # 3. answers to our reservations: plain grants commit in the kernel, the rest
        # (joins, fails, stale answers, re-reservations) one by one
        rerun = []
        for sender, m in self._senders(inbox):
            if not len(m.ans):
                continue
            done = np.zeros(len(m.ans), dtype=np.uint8)
            commit_rows(*ta, st, cfg, ev, evaddr, m.ans, self.pend, self.now, done)
            rerun.append(self._unpark(m.ans[done == 1, 0]))
            for a in m.ans[done == 0]:
                pk = self._resolve(int(a[0]), int(a[1]), int(a[2]), int(a[3]), ta, st, cfg, ev,
                                   evaddr)
                if pk is not None:
                    rerun.append(pk)
        # 4. handoffs to us (we are the home), merged with what we held for them
        for m in inbox:
            if len(m.ho):
                self.counts["handoffs_in"] += len(m.ho)
                rerun.append(m.ho)
        rerun += self.held
        self.held = []
        # 5. bounces (we own their bucket) and deferred misses: a miss may start a conn
        # once no peer can still create one from a packet before the one it may answer
        # (its dep); the rest hit what the reservations above linked, or wait again
        dfr = Packets.concat([self.deferred] + [m.bo for m in inbox])
        self.deferred = Packets.empty()
        if len(dfr):
            # low of each shard (ours: our own deferred run in order with this one, but
            # not the packets we bounced this superstep, which their owner runs now)
            low = np.full(DEP_ANY + 1, NEVER, np.int64)
            for p, m in enumerate(self._with_self(inbox)):
                low[p] = self._bounce_low if m is None else m.low
            low[DEP_ANY] = low[:self.n].min()
            free = (dfr.dep < 0) | ((dfr.dep >> DEP_SHIFT) < low[dfr.dep & DEP_OWNER])
            dfr.given[:] = np.where(free, K.G_COUNTED, K.G_COUNTED_DEFER)
            self.counts["deferred_released"] += int(free.sum())
            rerun.append(dfr)
        if rerun:
            pk = self._sort(Packets.concat(rerun))
            verdict, tid = self._kernel(pk)
            self._bounce_stale(pk, verdict)
            self._dispose(pk, verdict, tid)
        self._drain_dying()
        return True

    def _with_self(self, inbox):
        """inbox (the peers' messages in sender order) with None in our own place."""
        it = iter(inbox)
        return [None if p == self.k else next(it) for p in range(self.n)]

    def _senders(self, inbox):
        peers = [p for p in range(self.n) if p != self.k]
        return zip(peers, inbox)

    def _resolve(self, c, kind, jhome, jtid, ta, st, cfg, ev, evaddr):
        """Act on the answer for pending conn c. Returns packets to run here now, or None."""
        t = self.ct.table
        if 0 <= c < len(self.pend) and self.pend[c] >= PEND_AGAIN:
            sure = self.pend[c] >= PEND_SURE
            self.pend[c] = PEND_NONE
            if kind != GRANT and t.cstatus[c] & S_XSHARD and not t.cstatus[c] & S_DYING:
                # its reply tuple went to another conn while the owner was down; or a
                # surely created conn was not granted after all (the owner's table was
                # full, or it restarted): its packets this round were already judged
                self.counts["sure_lost" if sure else "reply_lost"] += 1
                K.destroy_conn(*ta, st, cfg, ev, evaddr, c, self.now)
            return None
        if not (0 <= c < len(self.pend)) or self.pend[c] != PEND_REQ \
                or not t.cstatus[c] & S_PENDING:
            self.counts["stale_answers"] += 1
            return None
        if kind == GRANT:
            if t.cstatus[c] & S_INVIS:
                # take our own (higher) bucket now; someone may have got there first
                k0 = t.tkey[2 * c]
                hit = find_visible(*ta, st, cfg, ev, evaddr, k0[0], k0[1], k0[2], k0[3],
                                   int(t.tport[2 * c]), int(t.c8[c, PROTO]),
                                   int(t.c8[c, IPVER]), c, self.now)
                if hit >= 0:
                    w = hit >> 1
                    r1 = t.tkey[2 * c + 1].copy()
                    other = hit ^ 1
                    pk = self._abort(c)
                    if np.array_equal(t.tkey[other], r1) and t.tport[other] == t.tport[2 * c + 1]:
                        if t.cstatus[w] & S_REMOTE:
                            return self._join(pk, int(t.c32[w, HOME]),
                                              2 * int(t.c32[w, HCONN]) + (hit & 1))
                        return self._join(pk, self.k, hit)
                    return self._fail(pk)
            t.cstatus[c] &= ~(S_PENDING | S_INVIS) & 0xFFFF
            t.c64[c, EXPIRES] = self.now    # committed: its first packet sets the timeout
            self.pend[c] = PEND_NONE
            return self._unpark([c])
        if kind == FAIL and self._remap_home(c):
            self.counts["nat_remapped"] += 1
            self.pend[c] = PEND_NONE
            return self._unpark([c])
        pk = self._abort(c)
        if kind == JOIN:
            return self._join(pk, jhome, jtid)
        return self._fail(pk)

    def _remap_home(self, c: int) -> bool:
        """A source-NATed pending conn whose reply tuple another shard holds: search
        again among tuples whose reply hashes into our own slice (Linux would have seen
        the clash in its one table and searched on), and commit it here. False when
        there is no such tuple (or no source NAT): the caller fails the conn."""
        t, ct = self.ct.table, self.ct
        if ct.nat is None or not t.cstatus[c] & S_SRC_NAT or not len(self.parked):
            return False
        mine = np.flatnonzero(self.parked.given >> 1 == c)
        if not len(mine):
            return False
        first = self.parked.take(mine[[np.argmin(self.parked.seq[mine])]])
        b = first.batch
        meta, addr = wire.new_meta(1)
        wire.parse_batch(b.buf, b.off, b.length, meta, addr, False)
        ifx = int(b.ifindex[0])
        in_if = ct.network.name(ifx) if ct.network is not None and ifx >= 0 else None
        lo, hi = int(ct.cfg[K.CF_SHARD_LO]), int(ct.cfg[K.CF_SHARD_HI])
        dec = ct.nat.decide_home(self.now, meta[0], addr[0], in_if, (lo, hi))
        if dec is None:
            return False
        (s, d, ports, _, _), (ns, nd, nports, proto, ver) = dec
        u = np.uint64
        r = (u(nd[0]), u(nd[1]), u(ns[0]), u(ns[1]))
        rports = ((nports & 0xFFFF) << 16) | (nports >> 16)
        return bool(relink_reply(*self._table_args(), self.ct.stats_arr, self.ct.cfg,
                                 self.ct.ev, self.ct.evaddr, c, *r, rports, self.now))

    def _join(self, pk: Packets, home: int, tid: int):
        """The packets belong to conn ``tid`` at ``home`` (they lost a race to it)."""
        pk.given[:] = tid
        if home == self.k:
            return pk
        if tid & 1:
            # we own this tuple's bucket: remember where its conn lives
            row = key_rows(pk, np.zeros(1, np.int64), N_REQ)[0]
            ta = self._table_args()
            if find_visible(*ta, self.ct.stats_arr, self.ct.cfg, self.ct.ev, self.ct.evaddr,
                            row[0], row[1], row[2], row[3], int(row[4]), int(row[5]),
                            int(row[6]), -1, self.now) < 0:
                p = int(row[4])
                row[7:11] = (row[2], row[3], row[0], row[1])     # the original: inverted
                row[11] = ((p & 0xFFFF) << 16) | (p >> 16)
                row[12] = tid >> 1
                link_reply_entry(*ta, row, home)
        self._out[home]["ho"].append(pk)
        self.counts["handoffs_out"] += len(pk)
        return None

    def _fail(self, pk: Packets):
        """A clash no one wins (Linux: insert_failed at confirm): drop the packets."""
        st = self.ct.stats_arr
        st[K.ST_INSERT_FAILED] += len(pk)
        st[K.ST_DROP] += len(pk)
        self.done.append((pk, None, np.full(len(pk), K.V_DROP, dtype=np.uint8)))
        return None

    def _bounce_stale(self, pk: Packets, verdict):
        """Handoffs that bounced: tell the sender to forget the stale reply entry."""
        idx = np.flatnonzero((verdict == K.V_BOUNCE) & (pk.given >= 0))
        if not len(idx):
            return
        rows = key_rows(pk, idx, N_REL)
        rows[:, 7] = self.k
        rows[:, 8] = (pk.given[idx] >> 1).astype(np.uint64)
        own = owners(pk.hashes[idx], self.n, self.nb)
        for o, sel in by_owner(own, self.n):
            self._out[o]["rel"].append(rows[sel])

    # ------------------------------------------------------------ between rounds
    def results(self, frames: bool = True) -> tuple[Packets, np.ndarray]:
        """The round's finished packets (any order) and their verdicts; clears them.
        ``frames=False``: empty frames that keep their sequence number, time and
        interface (nothing is copied but those)."""
        done, self.done = self.done, []
        if not done:
            return Packets.empty(), np.zeros(0, dtype=np.uint8)
        v = np.concatenate([v for _, _, v in done])
        if frames:
            return Packets.concat([p if i is None else p.take(i) for p, i, _ in done]), v

        def pick(p, i, name):
            a = getattr(p.batch, name) if name in ("ts", "ifindex") else getattr(p, name)
            return a if i is None else a[i]
        seq, ts, ifx = (np.concatenate([pick(p, i, f) for p, i, _ in done])
                        for f in ("seq", "ts", "ifindex"))
        return Packets.framesless(seq, ts, ifx), v

    @staticmethod
    def warm():
        """Compile (or load from numba's cache) every kernel a shard uses, so a worker
        pays for it before it says READY rather than in its first round."""
        from .traffic import handshake_frames, udp_frames
        pool = LocalPool(2, Config(max_conns=64), seed=1)
        b = concat([handshake_frames(4, seed=1), udp_frames(4, seed=1)])
        pool.process(b)
        for sh in pool.shards:
            sh.reap(int(b.ts.max()) + 10**12, 0)
            sh.peer_lost(1 - sh.k)
            sh.peer_restarted(1 - sh.k)
            sh.peer_restored(1 - sh.k)
        run_round(pool.shards, [Packets.empty(), Packets.empty()])

    def reap(self, now: int, start: int) -> tuple[int, int]:
        """One bounded reaper run on the packet clock; releases go out next round."""
        r = self.ct.reap(now, start)
        self._drain_dying()
        return r

    def reap_all(self, now: int):
        """Every bucket at once (the end of the input); releases go out this round."""
        self.ct.reap_all(now)
        self._drain_dying()

    def reap_until(self, now: int):
        """Run the reaper on its own schedule (gVisor's adaptive interval) up to ``now``
        on the packet clock. A clock that jumps more than a full sweep ahead gets one
        full sweep instead of a run per missed interval."""
        if now <= 0:
            return
        if self._reap_at is None:
            self._reap_at = now + self.ct.reap_interval
            return
        if now - self._reap_at > REAP_FRACTION * REAP_MAX_INTERVAL:
            self.reap_all(now)
            self._reap_at = now + self.ct.reap_interval
            return
        while now >= self._reap_at:
            self._reap_start, interval = self.reap(self._reap_at, self._reap_start)
            self._reap_at += interval


# ------------------------------------------------------------------ a planned restart

@numba.njit(cache=True)
def adopt_conns(heads, tkey, tport, tnext, c64, c32, c8, cstatus, tbl, lo, hi,
                okey, oport, rkey, rport, r64, r32, r8, rstat, xshard):
    """Insert conns carried over from other tables (a pool restarting under a new seed):
    each keeps its state, counters, expiry and NAT flags; its original tuple is linked
    here; its reply tuple too when it hashes into buckets [lo, hi), else the conn is
    cross-shard and listed in ``xshard`` (its owner needs a reply entry). Returns
    (conns adopted, conns listed); fewer adopted than given when the table is full.
    Precondition: no two conns share a tuple (they came from one consistent pool)."""
    nb = tbl[K.T_NBUCKETS]
    seed = tbl[T_SEED]
    m = 0
    keep = ~(S_LINK0 | S_LINK1 | S_XSHARD | S_PENDING | S_INVIS | S_REMOTE | S_DYING) & 0xFFFF
    for j in range(okey.shape[0]):
        c = K.alloc_conn(tnext, c64, c32, c8, cstatus, tbl)
        if c < 0:
            return j, m
        t0 = 2 * c
        for k in range(4):
            tkey[t0, k] = okey[j, k]
            tkey[t0 + 1, k] = rkey[j, k]
        tport[t0] = oport[j]
        tport[t0 + 1] = rport[j]
        for k in range(c64.shape[1]):
            c64[c, k] = r64[j, k]
        for k in range(c32.shape[1]):
            c32[c, k] = r32[j, k]
        for k in range(c8.shape[1]):
            c8[c, k] = r8[j, k]
        proto = np.int64(c8[c, PROTO])
        ipver = np.int64(c8[c, IPVER])
        K.link_tuple(heads, tnext, tbl, t0, hash_key(seed, okey[j, 0], okey[j, 1], okey[j, 2],
                                                    okey[j, 3], np.int64(oport[j]), proto, ipver))
        st = (rstat[j] & keep) | S_USED | S_LINK0
        same = (rport[j] == oport[j] and rkey[j, 0] == okey[j, 0] and rkey[j, 1] == okey[j, 1]
                and rkey[j, 2] == okey[j, 2] and rkey[j, 3] == okey[j, 3])
        if not same:
            rh = hash_key(seed, rkey[j, 0], rkey[j, 1], rkey[j, 2], rkey[j, 3],
                          np.int64(rport[j]), proto, ipver)
            if lo <= rh % nb < hi:
                K.link_tuple(heads, tnext, tbl, t0 + 1, rh)
                st |= S_LINK1
            else:
                st |= S_XSHARD
                xshard[m] = c
                m += 1
        cstatus[c] = st
    return okey.shape[0], m


def rehash(old: list[tuple[dict, dict]], shards: list["Shard"]) -> tuple[int, int]:
    """A planned restart (gVisor: a persisted seed widens the hash-flooding window): the
    conns of an old pool's snapshots (``Shard.snapshot``, any seed and worker count) go
    into ``shards``, fresh shards of the new pool under its own seed, each at its new
    home with reply entries where its reply tuple now lives. Returns (conns carried,
    conns that did not fit: a table full). The old reply entries are not carried: they
    are rebuilt. Precondition: every old snapshot is of one pool, between two rounds."""
    rows = []
    now = 0
    for scalars, arrays in old:
        t = ConnTable(int(scalars["capacity"]), int(scalars["n_buckets"]), int(scalars["seed"]))
        for name, a in (("heads", t.heads), ("trec", t._trec), ("crec", t._crec), ("tbl", t.tbl)):
            if arrays[name].shape != a.shape or arrays[name].dtype != a.dtype:
                raise ValueError(f"array {name} is not {a.dtype} {a.shape}")
            a[...] = arrays[name]
        st = t.cstatus
        c = np.flatnonzero((st & S_USED != 0) & (st & (S_REMOTE | S_DYING) == 0))
        rows.append((t.tkey[2 * c], t.tport[2 * c], t.tkey[2 * c + 1], t.tport[2 * c + 1],
                     t.c64[c], t.c32[c], t.c8[c], st[c]))
        now = max(now, int(scalars["now"]))
    okey, oport, rkey, rport, r64, r32, r8, rstat = (np.ascontiguousarray(np.concatenate(x))
                                                     for x in zip(*rows))
    n, sh0 = len(shards), shards[0]
    t0 = sh0.ct.table
    h = np.empty(len(okey), dtype=np.int64)
    hash_batch(t0.seed, okey, oport, r8[:, PROTO], r8[:, IPVER], np.ones(len(okey), np.bool_), h)
    home = owners(h, n, sh0.nb)
    carried = 0
    xs = []
    for sh in shards:
        t, ct = sh.ct.table, sh.ct
        if t.count:
            raise ValueError(f"shard {sh.k} is not fresh")
        sel = np.flatnonzero(home == sh.k)
        out = np.empty(len(sel), dtype=np.int64)
        got, m = adopt_conns(*sh._table_args(), int(ct.cfg[K.CF_SHARD_LO]),
                             int(ct.cfg[K.CF_SHARD_HI]), okey[sel], oport[sel], rkey[sel],
                             rport[sel], r64[sel], r32[sel], r8[sel], rstat[sel], out)
        carried += got
        xs.append(out[:m])
        sh.now = now
    for sh, conns in zip(shards, xs):       # reply entries at the owners, as grants
        if not len(conns):
            continue
        t = sh.ct.table
        req = np.zeros((len(conns), N_REQ), dtype=np.uint64)
        rh = np.empty(len(conns), dtype=np.int64)
        request_rows(t.tkey, t.tport, t.c8, t.seed, conns, 0, req, rh)
        own = owners(rh, n, sh.nb)
        for o, sel in by_owner(own, n):
            owner = shards[o]
            part = req[sel]
            ans = np.zeros((len(part), N_ANS), dtype=np.int64)
            answer_rows(*owner._table_args(), owner.ct.stats_arr, owner.ct.cfg, owner.ct.ev,
                        owner.ct.evaddr, part, sh.k, owner.k, now, ans)
            lost = part[ans[:, 1] != GRANT, 12].astype(np.int64)
            for c in lost:           # no room for its entry: the conn cannot be kept
                K.destroy_conn(*sh._table_args(), sh.ct.stats_arr, sh.ct.cfg, sh.ct.ev,
                               sh.ct.evaddr, int(c), now)
                carried -= 1
            sh._drain_dying()
            sh._reset_out()          # releases of what was dropped: nothing holds them
    for sh in shards:
        sh.ct.clear_events()
    return carried, len(okey) - carried


# ------------------------------------------------------------------ the dispatcher's rounds

@numba.njit(inline="always", cache=True)
def _end_key(hi, lo, port, proto):
    """Key of one end point (address, port) of a tuple: 64 well-mixed bits (the tables
    compare whole keys; a shorter key made a tenth of the lookups of a 64k-packet round
    with NAT find some other end point's packet and wait for it)."""
    x = (hi * np.uint64(0x9E3779B97F4A7C15)) ^ lo
    x ^= np.uint64((port << 8) | proto) << np.uint64(40)
    x ^= x >> np.uint64(33)         # murmur3's fmix64
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return np.int64(x)


DEP_SHIFT = 7       # dep = seq << DEP_SHIFT | DEP_STARTS? | shard: at most 63 shards
DEP_OWNER = (1 << 6) - 1
DEP_ANY = DEP_OWNER  # dep's "shard" when it waits for every shard (end point matches)
DEP_STARTS = 1 << 6  # the packet itself may start a conn (a deferred one holds its low)
NAT_SRC, NAT_DST = 1, 2


def nat_deps(rules, network) -> tuple[int, np.ndarray]:
    """``answer_deps``'s nat and dnat arguments for a pool with these rules and network:
    the flags, and which (protocol row, destination port) a DNAT or REDIRECT rule may
    match (rows: TCP, UDP, anything else; a rule's own match is necessary for it to
    apply, so this is a superset of what gets DNATed)."""
    ports = np.zeros((3, 65536), dtype=np.bool_)
    if rules is None and network is None:
        return 0, ports
    sets = [getattr(rules, "v4", None), getattr(rules, "v6", None)] if hasattr(rules, "v4") \
        else [rules]
    dst = False
    for rs in sets:
        for r in (rs.rules if rs is not None else ()):
            if r.target not in ("DNAT", "REDIRECT"):
                continue
            dst = True
            m = r.match
            p = m.proto
            rows = [0, 1, 2] if p is None or p[0] == 0 or p[1] else \
                [0] if p[0] == 6 else [1] if p[0] == 17 else [2]
            d = m.dport
            for row in rows:
                if d is None or d[2] or row == 2:
                    ports[row, :] = True
                else:
                    ports[row, d[0]:d[1] + 1] = True
    return NAT_SRC | (NAT_DST if dst else 0), ports


@numba.njit(inline="always", cache=True)
def _ep_slot(tab, k, gen):
    """Linear probing in tab (int64[size, 2] of key, gen << 32 | index; size a power of
    two, at least twice a round): the slot of end point key k in round ``gen``, or the
    free slot where it goes."""
    mask = tab.shape[0] - 1
    j = k & mask
    while tab[j, 1] >> 32 == gen and tab[j, 0] != k:
        j = (j + 1) & mask
    return j


@numba.njit(inline="always", cache=True)
def _seen(tab, k, gen):
    """Index of the latest packet of round ``gen`` recorded under key k, or -1."""
    e = tab[_ep_slot(tab, k, gen), 1]
    return e & 0xFFFFFFFF if e >> 32 == gen else np.int64(-1)


@numba.njit(inline="always", cache=True)
def _record(tab, k, gen, idx):
    """Packet ``idx`` (gen << 32 | index) is now the latest under key k."""
    j = _ep_slot(tab, k, gen)
    tab[j, 0] = k
    tab[j, 1] = idx


@numba.njit(inline="always", cache=True)
def _pair_key(a, b):
    """Key of the tuple from end point a to end point b (``_end_key``s): order matters,
    so the inverted tuple's key is ``_pair_key(b, a)``."""
    return a ^ (b * np.int64(-7046029254386353131))    # 0x9E3779B97F4A7C15


STEER_SLOTS = 1 << 18
TS_UNIT = 30            # a steering slot's time: ts >> TS_UNIT (about a second), 8 bits


@numba.njit(inline="always", cache=True)
def _steer(tab, k, ki, proto, syn, inverse_seen, own, h, gen, now, max_age):
    """Where the dispatcher sends a TCP or UDP packet with tuple key k (``_pair_key``;
    ki its inverted tuple's) owned by shard ``own`` (tuple hash h), and the hash to steer
    it by: (own, -1), or (home, hash of the inverted tuple) when it likely answers a conn
    whose first packet went to shard ``home``.

    ``tab`` (int64[size, 2], size a power of two, kept across rounds; direct-mapped)
    remembers, per tuple key of a packet that may have started a conn (UDP, a TCP SYN
    without ACK), the shard it went to and its hash: column 1 is hash << 30 | the last
    round that used the slot (16 bits) << 14 | when (8 bits of ts >> TS_UNIT) << 6 |
    shard, or -1 for none. A packet whose inverted tuple is there goes to that shard;
    the shard checks (track.GX_STEER) and bounces it when the conn is not its own. So
    the two directions of a conn meet at its home without a handoff. Within one round a
    conn's packets in one direction all go one way: a slot used this round is not
    replaced, a tuple is not recorded once its inverse went by unsteered
    (``inverse_seen``), and a pure SYN (a reopen: the conn may start anew in the other
    direction) drops the inverse's slot only when this round has not used it. A UDP slot
    older than ``max_age`` (the longest UDP timeout, in ts >> TS_UNIT) is not used,
    unless this round used it."""
    mask = tab.shape[0] - 1
    g16 = gen & 0xFFFF
    j = ki & mask
    v = tab[j, 1]
    if tab[j, 0] == ki and v >= 0:
        used = (v >> 14) & 0xFFFF == g16
        if used or not syn and (proto == 6 or ((now >> TS_UNIT) - (v >> 6)) & 0xFF <= max_age):
            tab[j, 1] = (v & ~(np.int64(0xFFFF) << 14)) | (g16 << 14)
            home = v & 0x3F
            return (home, v >> 30) if home != own else (own, np.int64(-1))
    if not (syn or proto == 17) or inverse_seen:
        return own, np.int64(-1)
    if tab[j, 0] == ki and v >= 0:
        tab[j, 1] = -1          # a reopen the other way (or a stale UDP slot)
    j = k & mask
    v = tab[j, 1]
    if v < 0 or (v >> 14) & 0xFFFF != g16 or tab[j, 0] == k:
        tab[j, 0] = k
        tab[j, 1] = (h << 30) | (g16 << 14) | (((now >> TS_UNIT) & 0xFF) << 6) | own
    return own, np.int64(-1)


@numba.njit(cache=True)
def answer_deps(meta, addr, nat, dnat, max_round, gen0, tuples, srcs, dsts, pairs, dep,
                anyone, starts, loose, steer, own, hashes, ts, max_age, dest, steerh, pairk,
                pure):
    """For packet i of a parsed batch cut into rounds of ``max_round``: dep[i] = the index
    of the latest earlier packet of its round that i may answer, else -1; anyone[i]:
    it may answer earlier packets of other tuples too (end point matches, which may be
    in any shard), not only that one's (the same tuple: the same shard). starts[i]: i
    may start a conn if it misses (track.tcp_may_create with ``loose``, an echo request,
    UDP or another protocol; never an ICMP error).

    i may answer j when i's tuple is j's inverted (the reply of a conn j starts, ICMP
    errors about j included: their tuple is the quoted packet's inverted). With NAT
    rules (``nat``) also when i comes from where j went (the reply to j's conn after
    SNAT: the reply tuple's source is j's destination) or i goes to where a packet
    that may start a conn came from (after DNAT). Tuples (``tuples``) and end points
    (``srcs``, ``dsts``) are matched by 64-bit keys built from the two end points'
    keys (a few multiplies, where the tuple's seeded Jenkins hash of the inverted
    tuple cost most of this kernel), in open-addressing tables; two tuples with one key
    (about 2**-64 a pair) would make one packet wait for the other's shard.

    nat: 0 no NAT rules, NAT_SRC their replies may come from where a packet went
    (SNAT, MASQUERADE), NAT_DST also go back to where a conn's first packet came from
    (DNAT, REDIRECT), for packets that a DNAT rule may match (``dnat``, ``nat_deps``).
    tuples/srcs/dsts: int64[size, 2], size a power of two >= 2 * max_round, scratch kept across calls (entries are gen << 32 | index in the
    round; round r of this batch is gen0 + r). Returns the next gen.

    Steering (``steer``: ``_steer``'s table, or an empty one for no steering): dest[i] is
    the shard packet i goes to (own[i], its tuple hash's owner, unless steered) and
    steerh[i] the hash it is steered by, else -1. Without steering pure[i] is False;
    with it, pure[i]: every packet of its round with
    its tuple or the inverted one goes to dest[i] (``pairs``: a table like ``tuples``,
    keyed by the smaller of the two tuple keys, whose slot pairk[i] keeps; value the
    shard, or PAIR_MIXED)."""
    n = meta.shape[0]
    gen = gen0
    start = 0
    for i in range(n):
        if i - start >= max_round:
            _pure(pairs, pairk, pure, start, i, gen)
            gen += 1
            start = i
        dep[i] = -1
        dest[i] = own[i]
        steerh[i] = -1
        pairk[i] = -1
        cls = meta[i, wire.M_CLS]
        if cls != wire.CLS_TRACK and cls != wire.CLS_RELATED:
            continue
        ports = meta[i, wire.M_PORTS]
        proto = meta[i, wire.M_PROTO]
        # the inverted tuple's end points are this one's, swapped (M_PORTS: sport << 16)
        ks = _end_key(addr[i, 0], addr[i, 1], ports >> 16, proto)
        kd = _end_key(addr[i, 2], addr[i, 3], ports & 0xFFFF, proto)
        d = _seen(tuples, _pair_key(kd, ks), gen)
        anyone[i] = False
        icmp = proto == 1 or proto == 58
        starts[i] = cls == wire.CLS_TRACK and (
            (proto == 6 and K.tcp_may_create(meta[i, wire.M_TFLAGS], loose))
            or (icmp and meta[i, wire.M_ECHO] == 1) or (proto != 6 and not icmp))
        idx = (gen << 32) | (i - start)
        k = _pair_key(ks, kd)
        if steer.shape[0]:
            ki = _pair_key(kd, ks)
            if cls == wire.CLS_TRACK and (proto == 6 or proto == 17):
                dest[i], steerh[i] = _steer(
                    steer, k, ki, proto, proto == 6 and (meta[i, wire.M_TFLAGS] & 0x12) == 0x02,
                    d >= 0, own[i], hashes[i], gen, ts[i], max_age)
            _pairs(tuples, pairs, pairk, dest, i, k, ki, gen, idx)
        else:
            _record(tuples, k, gen, idx)
        if nat:
            e = _seen(dsts, ks, gen)
            if starts[i]:
                _record(dsts, kd, gen, idx)  # a first packet SNAT may have sent elsewhere
            if nat & NAT_DST:
                e = max(e, _seen(srcs, kd, gen))
                row = 0 if proto == 6 else 1 if proto == 17 else 2
                if (starts[i] and (proto != 6 or (meta[i, wire.M_TFLAGS] & 0x12) == 0x02)
                        and dnat[row, ports & 0xFFFF]):
                    _record(srcs, ks, gen, idx)  # a first packet DNAT may match
            if e >= 0:
                anyone[i] = True
                d = max(d, e)
        dep[i] = d + start if d >= 0 else np.int64(-1)
    _pure(pairs, pairk, pure, start, n, gen)
    return gen + 1


PAIR_MIXED = 0xFFFF


@numba.njit(inline="always", cache=True)
def _pairs(tuples, pairs, pairk, dest, i, k, ki, gen, idx):
    """Record packet i (tuple key k, inverted ki) in ``tuples`` and its shard under the
    pair's key in ``pairs`` (PAIR_MIXED once two shards have the pair)."""
    _record(tuples, k, gen, idx)
    key = min(k, ki)
    j = _ep_slot(pairs, key, gen)
    pairk[i] = j        # a round's entries never move: its slot, for _pure
    if pairs[j, 1] >> 32 != gen:
        pairs[j, 0] = key
        pairs[j, 1] = (gen << 32) | dest[i]
    elif pairs[j, 1] & 0xFFFFFFFF != dest[i]:
        pairs[j, 1] = (gen << 32) | PAIR_MIXED


@numba.njit(inline="always", cache=True)
def _pure(pairs, pairk, pure, s, e, gen):
    """pure[i] for the packets s..e of round ``gen`` (see answer_deps)."""
    for i in range(s, e):
        pure[i] = pairk[i] >= 0 and pairs[pairk[i], 1] & 0xFFFFFFFF != PAIR_MIXED


class Dispatcher:
    """The dispatcher's work, pure: parse and hash each frame, number it, cut the batch
    into rounds of at most ``max_round`` packets, mark what each packet may answer
    (``answer_deps``) and split each round by the shard it goes to: its owner, or, with
    several shards and no NAT rules, the home its conn likely has (``_steer``; the table
    is the one piece of state kept from batch to batch besides the numbering). ``nat``:
    ``nat_deps`` of the pool's rules (replies then need not be the inverted tuple)."""

    def __init__(self, n: int, config: Config, seed: int, max_round: int = 16384,
                 nat: tuple[int, np.ndarray] | None = None):
        if n > DEP_ANY:
            raise ValueError(f"{n} shards: the pool takes at most {DEP_ANY}")
        self.n, self.config, self.seed = n, config, seed & 0xFFFFFFFF
        self.max_round = max_round
        self.nat, self.dnat = nat if nat is not None else nat_deps(None, None)
        self.seq = 0
        self.clock = 0      # the packet clock at the end of the last round yielded
        self._gen = 1
        self._scratch = wire.MetaScratch()
        size = 1 << max(12, int(2 * max_round - 1).bit_length())
        self._tabs = tuple(np.zeros((size, 2), np.int64) for _ in range(4))
        # _steer's table: one shard needs none; with NAT rules replies are not the
        # inverted tuple (and new conns are not sure): no steering, no pairs
        self._steer = np.zeros((STEER_SLOTS if n > 1 and not self.nat else 0, 2), np.int64)
        self._steer[:, 1] = -1
        self._max_age = int(config.timeouts.udp_stream * 1e9) >> TS_UNIT

    def rounds(self, batch: PacketBatch):
        """Yield (parts, seq range) per round: parts[k] is shard k's Packets."""
        m = len(batch)
        meta, addr = self._scratch(m)       # used before the first round is yielded
        hashes = np.empty(m, dtype=np.int64)
        # routing needs the tuple only: checksums are the workers' job
        wire.parse_hash_batch(batch.buf, batch.off, batch.length, meta, addr, False, self.seed,
                              hashes)
        dep = np.empty(m, dtype=np.int64)
        anyone = np.empty(m, dtype=np.bool_)
        starts = np.empty(m, dtype=np.bool_)
        own = owners(hashes, self.n, self.config.n_buckets)
        dest = np.empty(m, dtype=np.int64)
        steerh = np.empty(m, dtype=np.int64)
        pairk = np.empty(m, dtype=np.int64)
        pure = np.empty(m, dtype=np.bool_)
        self._gen = answer_deps(meta, addr, self.nat, self.dnat, self.max_round, self._gen,
                                *self._tabs, dep, anyone, starts, self.config.tcp_loose,
                                self._steer, own, hashes, batch.ts, self._max_age, dest,
                                steerh, pairk, pure)
        seq0 = self.seq
        self.seq += m
        order = np.empty(m, dtype=np.int64)
        bounds = np.empty(self.n + 1, dtype=np.int64)
        rows = np.empty((4, m), dtype=np.int64)      # hashes, seq, given, dep in shard order
        for s in range(0, m, self.max_round):
            e = min(m, s + self.max_round)
            o = order[s:e]
            round_rows(dest, dep, anyone, starts, hashes, steerh, pure, s, e, seq0, self.n, o,
                       bounds, rows[:, s:e])
            whole = frames_in_order(batch, o)
            parts = []
            for k in range(self.n):
                a, b = int(bounds[k]), int(bounds[k + 1])
                parts.append(Packets(part_of(whole, a, b), *rows[:, s + a:s + b]))
            self.clock = max(self.clock, int(batch.ts[s:e].max()))
            yield parts, (seq0 + s, seq0 + e)


@numba.njit(cache=True)
def round_rows(dest, dep, anyone, starts, hashes, steerh, pure, s, e, seq0, n, order, bounds,
               rows):
    """Round s..e of a dispatched batch, split by the shard each packet goes to
    (``dest``: ``answer_deps``'s): order[j] is the batch index of the round's j-th
    packet in shard order (shard k's are j = bounds[k]..bounds[k+1], in input order), and
    rows[:, j] its hash, global sequence number, given code (track.G_FRESH with the GX_*
    bits: GX_DEFER when it may answer an earlier packet and is not steered, GX_STEER and
    the hash when steered, GX_PURE) and dep word
    (``Packets.dep``: -1, or the sequence number of the packet ``answer_deps`` found,
    the shard it went to or DEP_ANY, and DEP_STARTS)."""
    group(dest[s:e], n, order, bounds)
    for j in range(e - s):
        i = s + order[j]
        order[j] = i
        d = dep[i]
        rows[0, j] = hashes[i]
        rows[1, j] = seq0 + i
        x = K.GX_PURE if pure[i] else 0
        if steerh[i] >= 0:
            x |= K.GX_STEER | (steerh[i] << K.G_HASH_SHIFT)
        if d >= 0:
            # a steered packet may bounce to its owner: then any shard may hold it
            who = DEP_ANY if anyone[i] or steerh[d] >= 0 else dest[d]
            rows[3, j] = ((d + seq0) << DEP_SHIFT) | who | (DEP_STARTS if starts[i] else 0)
            if steerh[i] < 0:
                x |= K.GX_DEFER
        else:
            rows[3, j] = -1
        rows[2, j] = -1 - x


def run_round(shards: list[Shard], parts: list[Packets]) -> int:
    """One round across shards in this process (tests, the single-host simulator):
    ``local`` on each, then supersteps until every shard says the round is over.
    Returns the number of supersteps."""
    seqs = [p.seq[0] for p in parts if len(p)]
    first = int(min(seqs)) if seqs else None
    for s, p in zip(shards, parts):
        s.local(p, first)
    steps = 0
    while True:
        boxes = [s.outbox() for s in shards]
        more = [s.step([boxes[p][s.k] for p in range(len(shards)) if p != s.k]) for s in shards]
        steps += 1
        if not any(more):
            return steps
        if steps > 64:
            raise AssertionError("a round did not settle in 64 supersteps")


def sum_counts(dicts) -> dict[str, int]:
    """Counters of several shards added up by name."""
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return total


class LocalPool:
    """n shards in this process, driven round by round exactly as the worker pool drives
    them (tests, and the reference for the pool's results)."""

    def __init__(self, n: int, config: Config | None = None, *, seed: int, max_round: int = 16384,
                 reap: bool = False, **shard_kw):
        self.config = config or Config()
        self.shards = [Shard(k, n, self.config, seed=seed, **shard_kw) for k in range(n)]
        nat = nat_deps(shard_kw.get("rules"), shard_kw.get("network"))
        self.dispatcher = Dispatcher(n, self.config, seed, max_round, nat)
        self.rounds = 0
        self.supersteps = 0
        self.reap = reap        # run each shard's reaper between rounds (packet clock)

    def process(self, batch: PacketBatch) -> tuple[Packets, np.ndarray]:
        """Every frame's outcome, in sequence order: (Packets as they leave, verdicts).
        Frames are rewritten where they lie in ``batch`` (as ConnTrack.process does) and
        the Packets returned are views on its buffer, as in the pool's frame ring."""
        out = []
        batch = PacketBatch(batch.buf, batch.off, batch.length, batch.ifindex, batch.ts, True)
        for parts, (s, e) in self.dispatcher.rounds(batch):
            self.supersteps += run_round(self.shards, parts)
            self.rounds += 1
            for sh in self.shards:
                out.append(sh.results())
            if self.reap:
                for sh in self.shards:
                    sh.reap_until(max(x.now for x in self.shards))
        pk = Packets.concat([p for p, _ in out])
        v = np.concatenate([v for _, v in out]) if out else np.zeros(0, np.uint8)
        order = SeqOrder()(pk.seq)
        return pk.take(order), v[order]

    def conns(self, now=None):
        return [c for sh in self.shards for c in sh.ct.conns(now)]

    def stats(self) -> dict[str, int]:
        return sum_counts(sh.ct.stats() for sh in self.shards)
