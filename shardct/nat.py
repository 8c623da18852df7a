# NAT decisions for new conns: rule evaluation per hook, Linux get_unique_tuple (keep the
# original when free and in range, pick an address from the range, random-offset port
# probing in rounds of 128/64/32/16/8), null bindings, confirm with clash -> drop.
# Sources: Linux nf_nat_core.c, gVisor nat.go (reference/linux-netfilter.md §1.8).
"""NAT for a ConnTrack (router path: PREROUTING -> routing -> POSTROUTING, or INPUT
for packets addressed to the router).

Once per new conn, in Python (the kernel stops at the packet, see track.py):

1. PREROUTING: the first DNAT/REDIRECT rule that matches gives a destination range;
   none gives a null binding (destination kept; an ICMP ident may still move on a clash).
2. Routing on the (new) destination picks the egress interface, or local delivery.
3. POSTROUTING (or INPUT): SNAT/MASQUERADE range, or a null binding (source kept unless
   its reply tuple is taken, then the source port moves inside its class).
4. Confirm: both tuples go in; a reply tuple held by another live conn drops the packet
   (insert_failed, drop).

The uniqueness test of a candidate is "is its inverted tuple a live tuple" (Linux
nf_nat_used_tuple). Randomness comes from the injected ``rng`` (numpy Generator).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numba
import numpy as np

from . import track as K
from .hashing import addr_words, hash_key, oaat
from .table import EXPIRES

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


@numba.njit(cache=True)
def tuple_taken(heads, tkey, tport, tnext, c64, c8, tbl, now, s_hi, s_lo, d_hi, d_lo, ports,
                proto, ipver):
    """True when invert(tuple) is a live tuple of some conn (nf_nat_used_tuple)."""
    rp = ((ports & 0xFFFF) << 16) | (ports >> 16)
    h = hash_key(tbl[5], d_hi, d_lo, s_hi, s_lo, rp, proto, ipver)
    t = K.find_tuple(heads, tkey, tport, tnext, c8, tbl, h, d_hi, d_lo, s_hi, s_lo, rp, proto,
                     ipver)
    return t >= 0 and now <= c64[t >> 1, EXPIRES]


@numba.njit(inline="always", cache=True)
def reply_bucket(tbl, s_hi, s_lo, d_hi, d_lo, ports, proto, ipver):
    """Routing bucket of invert(tuple): where a conn with this NATed tuple keeps its reply."""
    rp = ((ports & 0xFFFF) << 16) | (ports >> 16)
    return hash_key(tbl[5], d_hi, d_lo, s_hi, s_lo, rp, proto, ipver) % tbl[4]


@numba.njit(cache=True)
def unique_port(heads, tkey, tport, tnext, c64, c8, tbl, stats, now, s_hi, s_lo, d_hi, d_lo,
                ports, proto, ipver, shift, pmin, size, offsets, home_lo, home_hi):
    """nf_nat_l4proto_unique_tuple: probe ports pmin + (off + k) % size in the 16-bit slot
    at ``shift`` (16 = sport slot, 0 = dport slot), rounds of min(128, size) halving to 8,
    each round from offsets[round]. Returns (ports, found); on failure the last probe.
    With home_lo >= 0 a candidate must also have its reply bucket in [home_lo, home_hi)
    (shard-affine ports: the reply lands on the conn's home worker)."""
    attempts = 128 if size > 128 else size
    rnd = 0
    off = offsets[0]
    cand = ports
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
                return cand, True
            stats[K.ST_FOUND] += 1
        if attempts >= size or attempts < 16:
            return cand, False
        attempts //= 2
        rnd += 1
        off = offsets[rnd]


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
        self.ct = ct
        self.rules = rules
        self.net = network
        self.rng = rng
        self.affine = affine
        self.strict = False     # remap_home: only tuples whose reply hashes into affine

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
        sport, dport = ports >> 16, ports & 0xFFFF
        icmp = proto in (1, 58)
        # which 16-bit slot this manip may change
        if icmp:
            shift = 16 if echo == 1 else 0          # the ident slot
            key = sport if echo == 1 else dport
        else:
            shift = 16 if manip == MANIP_SRC else 0
            key = sport if manip == MANIP_SRC else dport
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
        offsets = self.rng.integers(0, 65536, size=5, dtype=np.int64)
        if manip == MANIP_DST and not rng_.random and proto_spec:
            offsets[0] = 0
        t = self.ct.table
        homes = [self.affine] if affine and self.strict else \
            [self.affine, (-1, -1)] if affine else [(-1, -1)]
        for lo, hi in homes:     # shard-affine first, then any free port
            newports, found = unique_port(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c8, t.tbl,
                                          self.ct.stats_arr, now, np.uint64(s[0]), np.uint64(s[1]),
                                          np.uint64(d[0]), np.uint64(d[1]), ports, proto, ver,
                                          shift, pmin, size, offsets, lo, hi)
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
