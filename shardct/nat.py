# NAT decisions for new conns: rule evaluation per hook, Linux get_unique_tuple (keep the
# original when free and in range, pick an address from the range, random-offset port
# probing in rounds of 128/64/32/16/8), null bindings, confirm with clash -> drop.
# Sources: Linux nf_nat_core.c, gVisor nat.go (reference/linux-netfilter.md §1.8).
"""NAT for a ConnTrack (router path: PREROUTING -> routing -> POSTROUTING, or INPUT
for packets addressed to the router).

Once per new conn, in compiled code (``nat_decide``, called by track.py's kernel, over a
:class:`NatProgram` of arrays), or in Python (``NatEngine.decide``: the reference, the
pool's ``decide_home``, and what the kernel hands back when it cannot decide: an IPv6
address range, or the random pool ran short). Both give the same bindings:

1. PREROUTING: the first DNAT/REDIRECT rule that matches gives a destination range;
   none gives a null binding (destination kept; an ICMP ident may still move on a clash).
2. Routing on the (new) destination picks the egress interface, or local delivery.
3. POSTROUTING (or INPUT): SNAT/MASQUERADE range, or a null binding (source kept unless
   its reply tuple is taken, then the source port moves inside its class).
4. Confirm: both tuples go in; a reply tuple held by another live conn drops the packet
   (insert_failed, drop).

The uniqueness test of a candidate is "is its inverted tuple a live tuple" (Linux
nf_nat_used_tuple). Randomness comes from the injected ``rng`` (numpy Generator) through
a :class:`RandomPool` both paths take from in order, so a seed gives the same ports
whichever path decided.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from .cpu import kernel
from .hashing import _mix_word_be, addr_words, hash_key, oaat
from .netconf import no_network, route_compiled
from .rules import (TC_FLAGS, TC_HAS_ADDR, TC_HAS_PORT, TC_KIND, TC_PMAX, TC_PMIN,
                    compile_rules, evaluate_compiled)
from .table import EXPIRES, T_SEED, find_tuple

MANIP_SRC, MANIP_DST = 0, 1
HOOK_PREROUTING, HOOK_INPUT, HOOK_OUTPUT, HOOK_POSTROUTING = 0, 1, 2, 3
KIND_DNAT, KIND_SNAT, KIND_MASQUERADE, KIND_REDIRECT = 1, 2, 3, 4
F_RANDOM, F_RANDOM_FULLY, F_PERSISTENT = 1, 2, 4


@dataclass(frozen=True)
class NatRange:
    """One manip's range. Addresses as ipaddress objects (None = keep the address);
    ports None = no port range given (PROTO_SPECIFIED unset)."""
    addr_min: object = None
    addr_max: object = None
    port_min: int | None = None
    port_max: int | None = None
    random: bool = False
    persistent: bool = False


@kernel
def tuple_taken(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi, s_lo, d_hi, d_lo, ports,
                proto, ipver):
    """True when invert(tuple) is a live tuple of some conn (nf_nat_used_tuple)."""
    rp = ((ports & 0xFFFF) << 16) | (ports >> 16)
    h = hash_key(tbl[T_SEED], d_hi, d_lo, s_hi, s_lo, rp, proto, ipver)
    t = find_tuple(heads, tkey, tport, tnext, c8, tbl, h, d_hi, d_lo, s_hi, s_lo, rp, proto,
                   ipver)
    return t >= 0 and now <= c64[t >> 1, EXPIRES]


@numba.njit(inline="always", cache=True)
def reply_bucket(tbl, s_hi, s_lo, d_hi, d_lo, ports, proto, ipver):
    """Routing bucket of invert(tuple): where a conn with this NATed tuple keeps its reply."""
    rp = ((ports & 0xFFFF) << 16) | (ports >> 16)
    return hash_key(tbl[5], d_hi, d_lo, s_hi, s_lo, rp, proto, ipver) % tbl[4]


@kernel
def unique_port(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi, s_lo, d_hi, d_lo,
                ports, proto, ipver, shift, pmin, size, offsets, o0, zero_first, home_lo,
                home_hi):
    """nf_nat_l4proto_unique_tuple: probe ports pmin + (off + k) % size in the 16-bit slot
    at ``shift`` (16 = sport slot, 0 = dport slot), rounds of min(128, size) halving to 8,
    each round from offsets[o0 + round] (the first from 0 when ``zero_first``). Returns
    (ports, found, taken probes: the stats' "found"); on failure the last probe.
    With home_lo >= 0 a candidate must also have its reply bucket in [home_lo, home_hi)
    (shard-affine ports: the reply lands on the conn's home worker)."""
    attempts = 128 if size > 128 else size
    rnd = 0
    off = 0 if zero_first else offsets[o0]
    cand = ports
    clashes = 0
    while True:
        for k in range(attempts):
            p = pmin + (off + k) % size
            cand = (ports & ~(0xFFFF << shift)) | (p << shift)
            if home_lo >= 0:
                b = reply_bucket(tbl, s_hi, s_lo, d_hi, d_lo, cand, proto, ipver)
                if b < home_lo or b >= home_hi:
                    continue
            if not tuple_taken(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi, s_lo,
                               d_hi, d_lo, cand, proto, ipver):
                return cand, True, clashes
            clashes += 1
        if attempts >= size or attempts < 16:
            return cand, False, clashes
        attempts //= 2
        rnd += 1
        off = offsets[o0 + rnd]


# ---------------------------------------------------------------- the compiled decision

# nat_decide's outcomes
D_OK, D_DROP, D_PYTHON = 0, 1, 2


class NatProgram(NamedTuple):
    """What ``nat_decide`` reads: the rules (rules.RuleProgram's arrays), the network
    (netconf.NetProgram's), the shard-affine slice (aff_lo < 0: off) and the random pool
    (RandomPool's arrays, read from ``rcur[0]`` on)."""
    hooks: np.ndarray
    step: np.ndarray
    saddr: np.ndarray
    ifok: np.ndarray
    tgt: np.ndarray
    taddr: np.ndarray
    n_if: int
    routes: np.ndarray
    rinfo: np.ndarray
    local: np.ndarray
    lver: np.ndarray
    prim: np.ndarray
    has_prim: np.ndarray
    aff_lo: int
    aff_hi: int
    rvals: np.ndarray
    rcur: np.ndarray


def nat_program(rules, network, rand, aff_lo=-1, aff_hi=-1) -> NatProgram:
    """The NatProgram of rules (a RuleSet or anything with its ``rulesets()`` and
    ``evaluate``; or None) and a Network (or None)."""
    net = network.compiled() if network is not None else no_network()
    rp = compile_rules(rules.rulesets() if rules is not None else (),
                       network.names if network is not None else [])
    return NatProgram(rp.hooks, rp.step, rp.saddr, rp.ifok, rp.tgt, rp.taddr,
                      *net, int(aff_lo), int(aff_hi), rand.vals, rand.cur)


def no_nat_program() -> NatProgram:
    """The NatProgram of a table without NAT (track_batch takes one regardless)."""
    return nat_program(None, None, RandomPool(None, size=0))


@numba.njit(inline="always", cache=True)
def port_slot(ports, proto, manip, echo):
    """(shift, port) of the 16-bit slot a manip may change: 16 = sport, 0 = dport; an
    ICMP echo's ident slot whatever the manip."""
    if proto == 1 or proto == 58:
        return (16, ports >> 16) if echo == 1 else (0, ports & 0xFFFF)
    return (16, ports >> 16) if manip == MANIP_SRC else (0, ports & 0xFFFF)


@numba.njit(inline="always", cache=True)
def _le128(a_hi, a_lo, b_hi, b_lo):
    return a_hi < b_hi or (a_hi == b_hi and a_lo <= b_lo)


@numba.njit(inline="always", cache=True)
def _mix_addr(h, hi, lo, ver):
    # feed an address's bytes in network order (4 for IPv4, 16 for IPv6)
    if ver != 4:
        h = _mix_word_be(h, np.int64(hi >> 32), 4)
        h = _mix_word_be(h, np.int64(hi & 0xFFFFFFFF), 4)
        h = _mix_word_be(h, np.int64(lo >> 32), 4)
    return _mix_word_be(h, np.int64(lo & 0xFFFFFFFF), 4)


@numba.njit(inline="always", cache=True)
def _is_home(tbl, s_hi, s_lo, d_hi, d_lo, ports, proto, ver, lo, hi):
    b = reply_bucket(tbl, s_hi, s_lo, d_hi, d_lo, ports, proto, ver)
    return lo <= b < hi


@numba.njit(inline="always", cache=True)
def unique_tuple_compiled(heads, tkey, tport, tnext, c64, c8, tbl, P, now, s_hi, s_lo, d_hi,
                          d_lo, ports, proto, ver, manip, echo, has_addr, amin_hi, amin_lo,
                          amax_hi, amax_lo, pspec, pmin, pmax, rand, pers, affine):
    """``NatEngine.unique_tuple`` (not strict) in compiled code. Returns (outcome, s_hi,
    s_lo, d_hi, d_lo, ports, taken probes); D_PYTHON for an address range it does not
    compute (IPv6 wider than one low word's 2**32) or a random pool short of offsets."""
    affine = affine and P.aff_lo >= 0
    icmp = proto == 1 or proto == 58
    shift, key = port_slot(ports, proto, manip, echo)
    ported = proto == 6 or proto == 17 or icmp
    # step 1 (SRC only): keep the tuple when in range and free
    if manip == MANIP_SRC and not rand:
        in_addr = not has_addr or (_le128(amin_hi, amin_lo, s_hi, s_lo)
                                   and _le128(s_hi, s_lo, amax_hi, amax_lo))
        in_port = not pspec or not ported or (pmin <= key <= pmax)
        if (in_addr and in_port
                and not tuple_taken(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi, s_lo,
                                    d_hi, d_lo, ports, proto, ver)
                and (not affine or _is_home(tbl, s_hi, s_lo, d_hi, d_lo, ports, proto, ver,
                                            P.aff_lo, P.aff_hi))):
            return D_OK, s_hi, s_lo, d_hi, d_lo, ports, 0
    # step 2: address (find_best_ips_proto, as NatEngine._pick_addr)
    if has_addr:
        n_hi, n_lo = amin_hi, amin_lo
        if amin_hi != amax_hi or amin_lo != amax_lo:
            if amin_hi != amax_hi or amax_lo - amin_lo > np.uint64(0xFFFFFFFF):
                return D_PYTHON, s_hi, s_lo, d_hi, d_lo, ports, 0
            h = np.int64(0) if pers else np.int64(tbl[T_SEED]) & 0xFFFFFFFF
            h = _mix_addr(h, s_hi, s_lo, ver)
            if not pers:
                h = _mix_addr(h, d_hi, d_lo, ver)
            h = (h + (h << 3)) & 0xFFFFFFFF
            h ^= h >> 11
            h = (h + (h << 15)) & 0xFFFFFFFF
            span = amax_lo - amin_lo + np.uint64(1)
            n_lo = amin_lo + ((np.uint64(h) * span) >> np.uint64(32))
        if manip == MANIP_SRC:
            s_hi, s_lo = n_hi, n_lo
        else:
            d_hi, d_lo = n_hi, n_lo
    if not ported:
        return D_OK, s_hi, s_lo, d_hi, d_lo, ports, 0
    # step 3: keep the port when in range and free (or the range is a single port)
    if not rand and (not affine or _is_home(tbl, s_hi, s_lo, d_hi, d_lo, ports, proto, ver,
                                            P.aff_lo, P.aff_hi)):
        if pspec:
            if pmin <= key <= pmax and (
                    pmin == pmax or not tuple_taken(heads, tkey, tport, tnext, c64, c8, tbl,
                                                    now, s_hi, s_lo, d_hi, d_lo, ports,
                                                    proto, ver)):
                return D_OK, s_hi, s_lo, d_hi, d_lo, ports, 0
        elif not tuple_taken(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi, s_lo, d_hi,
                             d_lo, ports, proto, ver):
            return D_OK, s_hi, s_lo, d_hi, d_lo, ports, 0
    # step 4: search
    if pspec:
        lo, size = pmin, pmax - pmin + 1
    elif icmp:
        lo, size = 0, 65536
    elif manip == MANIP_DST:
        return D_OK, s_hi, s_lo, d_hi, d_lo, ports, 0
    elif key < 1024:
        lo, size = (1, 511) if key <= 511 else (600, 424)
    else:
        lo, size = 1024, 64512
    o0 = P.rcur[0]
    if o0 + N_OFFSETS > P.rvals.shape[0]:
        return D_PYTHON, s_hi, s_lo, d_hi, d_lo, ports, 0
    P.rcur[0] = o0 + N_OFFSETS
    zero_first = manip == MANIP_DST and not rand and pspec
    clashes = 0
    newports = ports
    for pass_ in range(2 if affine else 1):     # shard-affine first, then any free port
        hlo = P.aff_lo if affine and pass_ == 0 else -1
        hhi = P.aff_hi if affine and pass_ == 0 else -1
        newports, found, cl = unique_port(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi,
                                          s_lo, d_hi, d_lo, ports, proto, ver, shift, lo, size,
                                          P.rvals, o0, zero_first, hlo, hhi)
        clashes += cl
        if found:
            break
    return D_OK, s_hi, s_lo, d_hi, d_lo, newports, clashes


@numba.njit(inline="always", cache=True)
def _manip_compiled(heads, tkey, tport, tnext, c64, c8, tbl, P, now, s_hi, s_lo, d_hi, d_lo,
                    ports, proto, ver, echo, hook, manip, in_k, out_k):
    """One NAT hook (NatEngine.decide's ``manip``): the matching rule's range, or a null
    binding, then the tuple search. D_DROP: MASQUERADE/REDIRECT without an address."""
    t = evaluate_compiled(P.hooks, P.step, P.saddr, P.ifok, 0 if ver == 4 else 1, hook, s_hi,
                          s_lo, d_hi, d_lo, proto, ports >> 16, ports & 0xFFFF, in_k, out_k)
    z = np.uint64(0)
    has_addr = False
    a0, a1, a2, a3 = z, z, z, z
    kind = P.tgt[t, TC_KIND] if t >= 0 else 0
    flags = P.tgt[t, TC_FLAGS] if t >= 0 else 0
    if t < 0:
        pass        # a null binding: no range
    elif kind == KIND_DNAT or kind == KIND_SNAT:
        if P.tgt[t, TC_HAS_ADDR] != 0:
            has_addr = True
            a0, a1, a2, a3 = P.taddr[t, 0], P.taddr[t, 1], P.taddr[t, 2], P.taddr[t, 3]
    elif kind == KIND_REDIRECT and in_k == P.n_if:
        # OUTPUT: to the host itself (127.0.0.1 / ::1)
        has_addr = True
        a1 = np.uint64(0x7F000001) if ver == 4 else np.uint64(1)
        a3 = a1
    else:
        j = in_k if kind == KIND_REDIRECT else out_k
        f = 0 if ver == 4 else 1
        if j >= P.n_if or not P.has_prim[j, f]:
            return D_DROP, s_hi, s_lo, d_hi, d_lo, ports, 0
        has_addr = True
        a0, a1 = P.prim[j, f, 0], P.prim[j, f, 1]
        a2, a3 = a0, a1
    return unique_tuple_compiled(heads, tkey, tport, tnext, c64, c8, tbl, P, now, s_hi, s_lo,
                                 d_hi, d_lo, ports, proto, ver, manip, echo, has_addr, a0, a1,
                                 a2, a3, t >= 0 and P.tgt[t, TC_HAS_PORT] != 0,
                                 P.tgt[t, TC_PMIN] if t >= 0 else 0,
                                 P.tgt[t, TC_PMAX] if t >= 0 else 0,
                                 (flags & (F_RANDOM | F_RANDOM_FULLY)) != 0,
                                 (flags & F_PERSISTENT) != 0, t >= 0 and manip == MANIP_SRC)


@kernel
def nat_decide(heads, tkey, tport, tnext, c64, c8, tbl, P, now, ifx, s_hi, s_lo, d_hi, d_lo,
               ports, proto, ver, echo):
    """``NatEngine.decide`` in compiled code for the conn a packet starts (arriving on
    interface ``ifx``, -1 none). Returns (outcome, s_hi, s_lo, d_hi, d_lo, ports, taken
    probes): the NATed original tuple for D_OK; D_DROP as decide's None; D_PYTHON when
    only Python can decide (the random pool is then as it was)."""
    r0 = P.rcur[0]
    in_k = ifx if 0 <= ifx < P.n_if else P.n_if
    hook = HOOK_OUTPUT if in_k == P.n_if else HOOK_PREROUTING
    r = _manip_compiled(heads, tkey, tport, tnext, c64, c8, tbl, P, now, s_hi, s_lo, d_hi,
                        d_lo, ports, proto, ver, echo, hook, MANIP_DST, in_k, P.n_if)
    if r[0] != D_OK:
        return r        # D_PYTHON and D_DROP come before any search: nothing was taken
    local, out_k = route_compiled(P.routes, P.rinfo, P.local, P.lver, P.n_if, ver, r[3], r[4])
    r2 = _manip_compiled(heads, tkey, tport, tnext, c64, c8, tbl, P, now, r[1], r[2], r[3],
                         r[4], r[5], proto, ver, echo, HOOK_INPUT if local else HOOK_POSTROUTING,
                         MANIP_SRC, in_k, out_k)
    if r2[0] == D_PYTHON:
        P.rcur[0] = r0
        return r2
    return r2[0], r2[1], r2[2], r2[3], r2[4], r2[5], r[6] + r2[6]


N_OFFSETS = 5       # one random offset per search round (128, 64, 32, 16, 8)


class RandomPool:
    """Port-search offsets (uniform in [0, 65536)) drawn ahead from an rng and taken in
    order by both paths: ``take`` in Python, the kernel through ``vals``/``cur``. numpy's
    bounded integers are one stream however they are chunked, so the offsets a decision
    gets are those ``rng.integers(0, 65536, size=5)`` would give it at that point.

    Owner: the NatEngine (same thread)."""

    def __init__(self, rng: np.random.Generator, size: int = 16384):
        self.rng = rng
        self.vals = np.zeros(size, dtype=np.int64)      # refilled in place (the kernel
        self.cur = np.array([size], dtype=np.int64)     # holds both); cur = next unread

    def left(self) -> int:
        return len(self.vals) - int(self.cur[0])

    def ensure(self, k: int) -> None:
        """At least min(k, size) values unread (draws only when fewer are left)."""
        left, c = self.left(), int(self.cur[0])
        if left >= min(k, len(self.vals)):
            return
        self.vals[:left] = self.vals[c:].copy()
        self.vals[left:] = self.rng.integers(0, 65536, size=len(self.vals) - left,
                                             dtype=np.int64)
        self.cur[0] = 0

    def take(self, k: int) -> np.ndarray:
        self.ensure(k)
        c = int(self.cur[0])
        self.cur[0] = c + k
        return self.vals[c:c + k].copy()


def _addr_int(a) -> int:
    return int(a)


class NatEngine:
    """The NAT part of a ConnTrack: holds rules, network and rng; decides bindings.

    Owner: the ConnTrack that created it (same thread).
    """

    def __init__(self, ct, rules, network, rng: np.random.Generator,
                 affine: tuple[int, int] | None = None):
        """affine: this shard's bucket slice [lo, hi) when SNAT/MASQUERADE should prefer
        ports whose reply tuple hashes into it (off: None, Linux's choice)."""
        from .track import ST_FOUND      # track.py imports this module
        self._st_found = ST_FOUND
        self.ct = ct
        self.rules = rules
        self.net = network
        self.rng = rng
        self.rand = RandomPool(rng)
        self.affine = affine
        self.strict = False     # remap_home: only tuples whose reply hashes into affine
        lo, hi = affine if affine is not None else (-1, -1)
        self.program = nat_program(rules, network, self.rand, lo, hi)

    # ---------------------------------------------------------------- helpers
    def _taken(self, now, cur) -> bool:
        t = self.ct.table
        s, d, ports, proto, ver = cur
        return bool(tuple_taken(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c8, t.tbl, now,
                                np.uint64(s[0]), np.uint64(s[1]), np.uint64(d[0]), np.uint64(d[1]),
                                ports, proto, ver))

    def _pick_addr(self, rng_: NatRange, src_ip, dst_ip, manip):
        """find_best_ips_proto: a single address, or a hash of the client spread over the
        range (same client -> same address; `persistent` ignores the destination)."""
        lo, hi = _addr_int(rng_.addr_min), _addr_int(rng_.addr_max)
        if lo == hi:
            return rng_.addr_min
        key = src_ip.packed + (b"" if rng_.persistent else dst_ip.packed)
        j = oaat(key, 0 if rng_.persistent else self.ct.table.seed)
        span = hi - lo + 1
        ver = rng_.addr_min.version
        return _mk(lo + (j * span >> 32), ver) if span <= (1 << 32) else _mk(lo + j % span, ver)

    def _home(self, cur) -> bool:
        s, d, ports, proto, ver = cur
        lo, hi = self.affine
        b = int(reply_bucket(self.ct.table.tbl, np.uint64(s[0]), np.uint64(s[1]), np.uint64(d[0]),
                             np.uint64(d[1]), ports, proto, ver))
        return lo <= b < hi

    def unique_tuple(self, now, cur, rng_: NatRange, manip, echo, affine=False):
        """Linux get_unique_tuple for one manip; cur = ((s_hi, s_lo), (d_hi, d_lo), ports,
        proto, ipver). Returns the new cur (possibly still taken: confirm decides).
        affine: prefer a port whose reply tuple hashes into this shard (self.affine)."""
        affine = affine and self.affine is not None
        s, d, ports, proto, ver = cur
        icmp = proto in (1, 58)
        shift, key = (int(x) for x in port_slot(ports, proto, manip, echo))
        proto_spec = rng_.port_min is not None
        ported = proto in (6, 17) or icmp
        # step 1 (SRC only): keep the tuple when in range and free
        if manip == MANIP_SRC and not rng_.random:
            a = _words_to_int(s, ver)
            in_addr = rng_.addr_min is None or (_addr_int(rng_.addr_min) <= a <= _addr_int(rng_.addr_max))
            in_port = not proto_spec or not ported or (rng_.port_min <= key <= rng_.port_max)
            if (in_addr and in_port and not self._taken(now, cur)
                    and (not affine or self._home(cur))):
                return cur
        # step 2: address
        if rng_.addr_min is not None:
            src_ip = _mk(_words_to_int(s, ver), ver)
            dst_ip = _mk(_words_to_int(d, ver), ver)
            new = self._pick_addr(rng_, src_ip, dst_ip, manip)
            w = addr_words(new.packed)
            if manip == MANIP_SRC:
                s = w
            else:
                d = w
            cur = (s, d, ports, proto, ver)
        if not ported:
            return cur
        # step 3: keep the port when in range and free (or the range is a single port)
        if not rng_.random and (not affine or self._home(cur)):
            if proto_spec:
                if rng_.port_min <= key <= rng_.port_max and (
                        rng_.port_min == rng_.port_max or not self._taken(now, cur)):
                    return cur
            elif not self._taken(now, cur):
                return cur
        # step 4: search
        if proto_spec:
            pmin, size = rng_.port_min, rng_.port_max - rng_.port_min + 1
        elif icmp:
            pmin, size = 0, 65536
        elif manip == MANIP_DST:
            return cur          # a destination's port never moves without a range
        elif key < 1024:
            pmin, size = (1, 511) if key <= 511 else (600, 424)
        else:
            pmin, size = 1024, 64512
        offsets = self.rand.take(N_OFFSETS)
        zero_first = manip == MANIP_DST and not rng_.random and proto_spec
        t = self.ct.table
        homes = [self.affine] if affine and self.strict else \
            [self.affine, (-1, -1)] if affine else [(-1, -1)]
        for lo, hi in homes:     # shard-affine first, then any free port
            newports, found, clashes = unique_port(
                t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c8, t.tbl, now, np.uint64(s[0]),
                np.uint64(s[1]), np.uint64(d[0]), np.uint64(d[1]), ports, proto, ver, shift,
                pmin, size, offsets, 0, zero_first, lo, hi)
            self.ct.stats_arr[self._st_found] += clashes
            if found:
                break
        return (s, d, int(newports), proto, ver)

    # ---------------------------------------------------------------- per new conn
    def range_for(self, target, manip, in_if, out_if, ver) -> NatRange | None:
        """The NatRange a rule target gives, None when it cannot apply (no address)."""
        kind = target.kind
        pmin = target.port_min if target.has_port else None
        pmax = target.port_max if target.has_port else None
        rnd = bool(target.flags & (F_RANDOM | F_RANDOM_FULLY))
        pers = bool(target.flags & F_PERSISTENT)
        if kind in (KIND_DNAT, KIND_SNAT):
            if target.has_addr:
                amin = target.addr_min if not isinstance(target.addr_min, int) else \
                    _mk(target.addr_min, ver)
                amax = target.addr_max if not isinstance(target.addr_max, int) else \
                    _mk(target.addr_max, ver)
                return NatRange(amin, amax, pmin, pmax, rnd, pers)
            return NatRange(None, None, pmin, pmax, rnd, pers)
        if kind == KIND_REDIRECT and in_if is None:
            # OUTPUT: to the host itself (Linux nf_nat_redirect: 127.0.0.1 / ::1)
            a = ipaddress.ip_address("127.0.0.1" if ver == 4 else "::1")
            return NatRange(a, a, pmin, pmax, rnd, pers)
        ifname = in_if if kind == KIND_REDIRECT else out_if
        ifc = self.net.interface(ifname) if (ifname and self.net) else None
        a = ifc.primary(ver) if ifc else None
        if a is None:
            return None
        return NatRange(a, a, pmin, pmax, rnd, pers)

    def decide(self, now, meta_row, addr_row, in_if):
        """Bindings for the conn a packet starts. Returns (original, reply) tuples in
        kernel form, or None when the packet must be dropped (no address for
        MASQUERADE/REDIRECT). Counts nothing itself."""
        ver = int(meta_row[2])
        proto = int(meta_row[3])
        ports = int(meta_row[4])
        echo = int(meta_row[20])
        s = (int(addr_row[0]), int(addr_row[1]))
        d = (int(addr_row[2]), int(addr_row[3]))
        orig = (s, d, ports, proto, ver)
        cur = orig
        fam = 4 if ver == 4 else 6

        def ev(hook, c, in_i, out_i):
            if self.rules is None:
                return None
            s_, d_, p_, _, _ = c
            return self.rules.evaluate(hook, fam, _words_to_bytes(s_, ver), _words_to_bytes(d_, ver),
                                       proto, p_ >> 16, p_ & 0xFFFF, in_i, out_i)

        def manip(cur, hook, kind, out_i):
            """One NAT hook: the matching rule's range, or a null binding. None = drop."""
            tgt = ev(hook, cur, in_if, out_i)
            r = NatRange(None, None) if tgt is None else self.range_for(tgt, kind, in_if, out_i, ver)
            affine = tgt is not None and kind == MANIP_SRC
            return None if r is None else self.unique_tuple(now, cur, r, kind, echo, affine)

        # PREROUTING (or OUTPUT for locally generated packets: no ingress interface)
        cur = manip(cur, HOOK_OUTPUT if in_if is None else HOOK_PREROUTING, MANIP_DST, None)
        if cur is None:
            return None
        # routing, then POSTROUTING (or INPUT for the router's own addresses)
        dst_ip = _mk(_words_to_int(cur[1], ver), ver)
        local = self.net.is_local(dst_ip) if self.net else False
        out_if = None if (local or not self.net) else self.net.route(dst_ip)
        cur = manip(cur, HOOK_INPUT if local else HOOK_POSTROUTING, MANIP_SRC, out_if)
        if cur is None:
            return None
        return orig, cur

    def decide_home(self, now, meta_row, addr_row, in_if, home: tuple[int, int]):
        """``decide`` with source NAT free to pick only tuples whose reply hashes into
        ``home`` (a bucket slice): a pooled conn whose reply tuple another shard holds is
        remapped to one its own shard can check. The result may still be taken."""
        saved = self.affine, self.strict
        self.affine, self.strict = home, True
        try:
            return self.decide(now, meta_row, addr_row, in_if)
        finally:
            self.affine, self.strict = saved


def _words_to_int(w, ver) -> int:
    hi, lo = w
    return (lo & 0xFFFFFFFF) if ver == 4 else (hi << 64) | lo


def _words_to_bytes(w, ver) -> bytes:
    return _words_to_int(w, ver).to_bytes(4 if ver == 4 else 16, "big")


def _mk(v: int, ver: int):
    return ipaddress.IPv4Address(v) if ver == 4 else ipaddress.IPv6Address(v)
