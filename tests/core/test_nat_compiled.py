"""The compiled NAT decision (nat.nat_decide, run inside the tracking kernel) against the
Python reference (NatEngine.decide): identical bindings, random offsets taken and
"found" counts, on random rule sets and packets over a table that fills up, so that
port clashes and searches happen. Then whole batches through ConnTrack both ways."""
from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import HealthCheck, event, given, settings, strategies as st

from shardct import Config, ConnTrack, ManualClock
from shardct import track as K
from shardct.hashing import addr_words, hash_key
from shardct.nat import D_DROP, D_OK, D_PYTHON, nat_decide
from shardct.netconf import Network
from shardct.rules import parse_iptables_save
from shardct.wire import M_ECHO, M_IPVER, M_PORTS, M_PROTO, N_META

NET = {"interfaces": {"lan0": {"address": ["10.0.0.3/24", "b::1/64"]},
                      "wan0": {"address": ["192.168.0.1/24", "a::1/64"]},
                      "dmz0": {"address": ["c::1/64"]}},       # no IPv4: MASQUERADE drops
       "routes": [{"dst": "0.0.0.0/0", "dev": "wan0"}, {"dst": "::/0", "dev": "wan0"},
                  {"dst": "172.16.0.0/12", "dev": "dmz0"}]}
IFACES = ["lan0", "wan0", "dmz0", "lan+", "wan+", "eth0"]
ADDRS = {4: ["10.0.0.2", "10.0.0.5", "192.168.0.2", "192.168.0.1", "10.0.0.3", "172.16.0.9"],
         6: ["b::2", "b::5", "a::2", "a::1", "b::1", "c::9"]}
NETS = {4: ["10.0.0.0/24", "192.168.0.0/16", "10.0.0.2/32", "0.0.0.0/0", "172.16.0.0/12"],
        6: ["b::/64", "a::/16", "b::2/128", "::/0", "c::/64"]}
RANGES = {4: ["192.168.0.7", "192.168.0.7-192.168.0.9", "10.0.0.9", "10.0.0.1-10.0.0.200"],
          6: ["a::7", "[a::7-a::9]", "[b::9]", "a::1-a::ff"]}
PORTS = [22, 80, 443, 600, 1000, 1001, 1024, 1025, 40000]


def maybe_neg(draw, opt, val):
    return f"{'! ' if draw(st.booleans()) and draw(st.booleans()) else ''}{opt} {val}"


@st.composite
def rule(draw, chain, fam):
    parts = []
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp" if fam == 4 else "icmpv6"]))
    if draw(st.booleans()):
        parts.append(maybe_neg(draw, "-s", draw(st.sampled_from(NETS[fam]))))
    if draw(st.booleans()):
        parts.append(maybe_neg(draw, "-d", draw(st.sampled_from(NETS[fam]))))
    if proto:
        parts.append(f"-p {proto}")
    if proto in ("tcp", "udp"):
        for opt in ("--sport", "--dport"):
            if draw(st.booleans()):
                a = draw(st.sampled_from(PORTS))
                b = draw(st.sampled_from([p for p in PORTS if p >= a]))
                parts.append(maybe_neg(draw, opt, f"{a}:{b}" if a != b else str(a)))
    if chain in ("PREROUTING", "INPUT") and draw(st.booleans()):
        parts.append(maybe_neg(draw, "-i", draw(st.sampled_from(IFACES))))
    if chain == "POSTROUTING" and draw(st.booleans()):
        parts.append(maybe_neg(draw, "-o", draw(st.sampled_from(IFACES))))
    ported = proto in ("tcp", "udp")
    targets = {"PREROUTING": ["DNAT", "REDIRECT", "ACCEPT", "RETURN", "USER"],
               "INPUT": ["SNAT", "ACCEPT"], "POSTROUTING": ["SNAT", "MASQUERADE", "ACCEPT"],
               "USER": ["DNAT", "REDIRECT", "ACCEPT", "RETURN"]}[chain]
    tgt = draw(st.sampled_from(targets))
    if tgt == "USER":
        parts.append("-j USER")
    elif tgt in ("DNAT", "SNAT"):
        addr = draw(st.sampled_from(RANGES[fam] + [None] * ported))
        port = draw(st.sampled_from([None, "1000-1003", "1024", "2000-2001"])) if ported else None
        if addr is None and port is None:
            port = "1000-1001"
        if port and fam == 6 and addr and not addr.startswith("["):
            addr = f"[{addr}]"
        spec = (addr or "") + (f":{port}" if port else "")
        opt = "--to-destination" if tgt == "DNAT" else "--to-source"
        parts.append(f"-j {tgt} {opt} {spec}")
        parts += [f for f in ("--random", "--persistent")
                  if draw(st.booleans()) and draw(st.booleans())]
    elif tgt in ("MASQUERADE", "REDIRECT"):
        parts.append(f"-j {tgt}")
        if ported and draw(st.booleans()):
            parts.append(f"--to-ports {draw(st.sampled_from(['1000-1003', '8080']))}")
        if draw(st.booleans()) and draw(st.booleans()):
            parts.append("--random")
    else:
        parts.append(f"-j {tgt}")
    return f"-A {chain} " + " ".join(parts)


@st.composite
def ruleset(draw, fam):
    lines = []
    for chain in ("PREROUTING", "INPUT", "POSTROUTING", "USER"):
        lines += draw(st.lists(rule(chain, fam), max_size=3))
    if draw(st.booleans()):     # a home router: many clients, one address, few ports
        lines.append("-A POSTROUTING " + draw(st.sampled_from([
            "-o wan0 -j MASQUERADE", "-p tcp -j MASQUERADE --to-ports 1000-1002",
            "-p tcp -j SNAT --to-source :1000-1001"])))
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n:USER - [0:0]\n" + "\n".join(lines) + "\nCOMMIT\n")
    return parse_iptables_save(text, "random.rules", fam)


@st.composite
def packet(draw, fam):
    proto = draw(st.sampled_from([6, 17, 1 if fam == 4 else 58, 47]))
    # mostly LAN clients to one server from few ports: NATed tuples meet each other
    s = draw(st.sampled_from(ADDRS[fam][:2] * 3 + ADDRS[fam]))
    d = draw(st.sampled_from(ADDRS[fam][2:3] * 6 + ADDRS[fam]))
    if proto in (1, 58):
        ports, echo = draw(st.sampled_from([7, 8, 1000])) << 16, 1
    elif proto == 47:
        ports, echo = 0, 0
    else:
        sport = draw(st.sampled_from([1000, 1001, 1024] * 3 + PORTS))
        ports, echo = (sport << 16) | draw(st.sampled_from([80] * 4 + PORTS)), 0
    return fam, s, d, proto, ports, echo, draw(st.sampled_from([0, 0, 0, -1, 1, 2, 7]))


def rows(fam, s, d, proto, ports, echo):
    meta = np.zeros(N_META, dtype=np.int64)
    meta[M_IPVER], meta[M_PROTO], meta[M_PORTS], meta[M_ECHO] = fam, proto, ports, echo
    w = [addr_words(ipaddress.ip_address(a).packed) for a in (s, d)]
    return meta, np.array([w[0][0], w[0][1], w[1][0], w[1][1]], dtype=np.uint64)


class Dual:
    """Both families' rules behind one evaluate (as workers.configfile.DualRules)."""

    def __init__(self, v4, v6):
        self.by = {4: v4, 6: v6}

    def rulesets(self):
        return tuple(self.by.values())

    def evaluate(self, hook, family, *args):
        return self.by[family].evaluate(hook, family, *args)


def engine(rules, seed, affine):
    return ConnTrack(Config(max_conns=512, shard_affine_nat=affine), seed=seed,
                     rules=rules, network=Network.from_dict(NET), router=True,
                     rng=np.random.default_rng(seed), shard=(0, 1))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fam=st.sampled_from([4, 4, 6, 0]), data=st.data(), seed=st.integers(0, 2 ** 32 - 1),
       affine=st.booleans())
def test_compiled_decision_equals_python(fam, data, seed, affine):
    """fam 0: IPv4 and IPv6 rule sets together, packets of both."""
    if fam:
        rules = data.draw(ruleset(fam))
        pkts = data.draw(st.lists(packet(fam), min_size=10, max_size=80))
    else:
        rules = Dual(data.draw(ruleset(4)), data.draw(ruleset(6)))
        pkts = data.draw(st.lists(st.sampled_from([4, 6]).flatmap(packet), min_size=10,
                                  max_size=80))
    ct = engine(rules, seed, affine)
    t, nat, stats = ct.table, ct.nat, ct.stats_arr
    now = 10 ** 9
    decided = 0
    for fam_, s, d, proto, ports, echo, ifx in pkts:
        meta, addr = rows(fam_, s, d, proto, ports, echo)
        nat.rand.ensure(100)
        cur0, found0 = int(nat.rand.cur[0]), int(stats[K.ST_FOUND])
        in_if = ct.network.name(ifx)
        dec = nat.decide(now, meta, addr, in_if)
        py_cur, py_found = int(nat.rand.cur[0]), int(stats[K.ST_FOUND]) - found0
        nat.rand.cur[0] = cur0
        out = nat_decide(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c8, t.tbl, nat.program,
                         now, ifx, addr[0], addr[1], addr[2], addr[3], ports, proto, fam_, echo)
        if out[0] == D_PYTHON:
            # only an IPv6 address range is left to Python here
            assert fam_ == 6 and int(nat.rand.cur[0]) == cur0
            event("left to Python")
            continue
        assert int(nat.rand.cur[0]) == py_cur
        assert out[6] == py_found
        if py_cur != cur0:
            event("searched")
        if py_found:
            event("a search met taken tuples")
        if dec is None:
            assert out[0] == D_DROP
            event("dropped")
            continue
        assert out[0] == D_OK
        (_, _, _, _, _), (ns, nd, nports, _, _) = dec
        assert (int(out[1]), int(out[2]), int(out[3]), int(out[4]), int(out[5])) == \
            (ns[0], ns[1], nd[0], nd[1], nports)
        decided += 1
        if (ns, nd, nports) != ((int(addr[0]), int(addr[1])), (int(addr[2]), int(addr[3])), ports):
            event("NATed")
        # confirm it (when free) so later packets clash with it
        u = np.uint64
        h = hash_key(t.seed, addr[0], addr[1], addr[2], addr[3], ports, proto, fam_)
        if K.find_tuple(t.heads, t.tkey, t.tport, t.tnext, t.c8, t.tbl, h, addr[0], addr[1],
                        addr[2], addr[3], ports, proto, fam_) < 0:
            rports = ((nports & 0xFFFF) << 16) | (nports >> 16)
            K.create_conn(t.heads, t.tkey, t.tport, t.tnext, t.c64, t.c32, t.c8, t.cstatus,
                          t.tbl, stats, ct.cfg, ct.ev, ct.evaddr, h, addr[0], addr[1], addr[2],
                          addr[3], ports, u(nd[0]), u(nd[1]), u(ns[0]), u(ns[1]), rports,
                          proto, fam_, now, False)


def test_port_clashes_search_the_same_way():
    """A one-port-wide source and a four-port SNAT range: the fifth client finds every
    port taken, the searches walk clashes; both paths agree conn for conn."""
    rules = parse_iptables_save(
        "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o wan0 -p tcp -j SNAT "
        "--to-source 192.168.0.1:1000-1003\n-A POSTROUTING -o wan0 -j MASQUERADE\nCOMMIT\n",
        "clash.rules", 4)
    from shardct import PacketBatch
    from scapy.all import IP, TCP, UDP, Ether, raw
    frames = [raw(Ether() / IP(src=f"10.0.0.{2 + k % 6}", dst="192.168.0.2")
                  / (TCP(sport=1000 + k % 3, dport=80, flags="S") if k % 4 else
                     UDP(sport=1000, dport=53)))
              for k in range(40)]
    results = []
    for compiled in (True, False):
        ct = ConnTrack(Config(), seed=5, clock=ManualClock(10 ** 9),
                       rules=rules, network=Network.from_dict(NET), router=True,
                       rng=np.random.default_rng(5), compiled_nat=compiled)
        b = PacketBatch.from_frames(frames, ifindex=0)
        r = ct.process(b)
        results.append((r.verdict.tolist(), b.buf.tobytes(), ct.stats(),
                        sorted((c.original, c.reply) for c in ct.conns())))
    assert results[0] == results[1]
    assert results[0][2]["found"] > 0 and results[0][2]["insert_failed"] > 0


def test_reply_later_in_the_batch_finds_the_conn():
    """Packet order holds with decisions in the kernel: a MASQUERADEd SYN, the server's
    SYN/ACK to the router's address and the client's ACK in one batch are one conn."""
    from shardct import PacketBatch
    from scapy.all import IP, TCP, Ether, raw
    rules = parse_iptables_save("*nat\n:POSTROUTING ACCEPT [0:0]\n"
                                "-A POSTROUTING -o wan0 -j MASQUERADE\nCOMMIT\n", "m.rules", 4)
    ct = ConnTrack(Config(), seed=5, clock=ManualClock(10 ** 9), rules=rules,
                   network=Network.from_dict(NET), router=True, rng=np.random.default_rng(5))
    out, back = IP(src="10.0.0.2", dst="192.168.0.2"), IP(src="192.168.0.2", dst="192.168.0.1")
    frames = [raw(Ether() / out / TCP(sport=40000, dport=80, flags="S", seq=1)),
              raw(Ether() / back / TCP(sport=80, dport=40000, flags="SA", seq=7, ack=2)),
              raw(Ether() / out / TCP(sport=40000, dport=80, flags="A", seq=2, ack=8))]
    b = PacketBatch.from_frames(frames, ifindex=[0, 1, 0])
    r = ct.process(b)
    assert r.verdict.tolist() == [K.V_ACCEPT] * 3
    assert r.tuple_id.tolist() == [0, 1, 0]
    assert Ether(b.frame(0))[IP].src == "192.168.0.1"      # SNATed out
    assert Ether(b.frame(1))[IP].dst == "10.0.0.2"         # un-NATed back
    assert ct.stats()["new"] == 1 and len(ct) == 1
