"""iptables-save nat rule files: what loads, what is refused (with file:line), and how
rules evaluate per hook, user chains and RETURN included."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from shardct.errors import RuleError
from shardct.rules import (HOOK_INPUT, HOOK_OUTPUT, HOOK_POSTROUTING, HOOK_PREROUTING,
                           KIND_DNAT, KIND_MASQUERADE, KIND_REDIRECT, KIND_SNAT, F_PERSISTENT,
                           F_RANDOM, F_RANDOM_FULLY, parse_iptables_save)

HEAD = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(body, family=4, head=HEAD):
    return parse_iptables_save(head + body + "\nCOMMIT\n", "t.rules", family)


def a(s):
    return ipaddress.ip_address(s).packed


def ev(rs, hook, src, dst, proto=6, sport=1000, dport=80, i=None, o=None, family=None):
    fam = family or rs.family
    return rs.evaluate(hook, fam, a(src), a(dst), proto, sport, dport, i, o)


# ---------------------------------------------------------------- accepted forms

@pytest.mark.parametrize("spec,want", [
    ("--to-destination 10.0.0.5", ("10.0.0.5", "10.0.0.5", None)),
    ("--to-destination 10.0.0.5:8080", ("10.0.0.5", "10.0.0.5", (8080, 8080))),
    ("--to-destination 10.0.0.5-10.0.0.9:8080-8090", ("10.0.0.5", "10.0.0.9", (8080, 8090))),
    ("--to-destination :8080", (None, None, (8080, 8080))),
])
def test_dnat_specs(spec, want):
    rs = load(f"-A PREROUTING -p tcp -j DNAT {spec}")
    t = ev(rs, HOOK_PREROUTING, "1.1.1.1", "2.2.2.2")
    got = (str(t.addr_min) if t.has_addr else None, str(t.addr_max) if t.has_addr else None,
           (t.port_min, t.port_max) if t.has_port else None)
    assert (t.kind, got) == (KIND_DNAT, want), f"got {got}, want {want}"


def test_ipv6_specs_and_family():
    rs = load("-A PREROUTING -d 2001:db8::1/128 -p udp -j DNAT --to-destination [a::1-a::9]:53-60\n"
              "-A POSTROUTING -o wan0 -j SNAT --to-source a::1", family=6)
    t = ev(rs, HOOK_PREROUTING, "b::2", "2001:db8::1", proto=17)
    got = (str(t.addr_min), str(t.addr_max), t.port_min, t.port_max)
    want = ("a::1", "a::9", 53, 60)
    assert got == want, f"DNAT (addr_min, addr_max, port_min, port_max) got {got}, want {want}"
    t = ev(rs, HOOK_POSTROUTING, "b::2", "c::3", o="wan0")
    got, want = (t.kind, str(t.addr_min), t.has_port), (KIND_SNAT, "a::1", False)
    assert got == want, f"SNAT (kind, addr_min, has_port) got {got}, want {want}"
    got = ev(rs, HOOK_POSTROUTING, "b::2", "c::3", o="wan0", family=4)
    assert got is None, f"IPv4 on IPv6 rules: target got {got}, want None"


def test_matches_and_negation():
    rs = load("-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n"
              "-A PREROUTING ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80\n"
              "-A PREROUTING -p udp --sport 1000:2000 ! --dport 53 -j REDIRECT --to-ports 5353\n"
              "-A PREROUTING -i eth+ -p tcp -j REDIRECT --to-ports 3128")
    got = ev(rs, HOOK_POSTROUTING, "172.17.0.5", "8.8.8.8", o="eth0").kind
    assert got == KIND_MASQUERADE, f"-o eth0: kind got {got}, want {KIND_MASQUERADE} (MASQUERADE)"
    got = ev(rs, HOOK_POSTROUTING, "172.17.0.5", "8.8.8.8", o="docker0")
    assert got is None, f"! -o docker0: target got {got}, want None"
    got = ev(rs, HOOK_POSTROUTING, "10.0.0.5", "8.8.8.8", o="eth0")
    assert got is None, f"-s outside 172.17.0.0/16: target got {got}, want None"
    assert ev(rs, HOOK_PREROUTING, "8.8.8.8", "1.2.3.4", dport=8080, i="docker0") is None, \
        "! -i docker0 fails and eth+ does not match docker0"
    t = ev(rs, HOOK_PREROUTING, "8.8.8.8", "1.2.3.4", dport=8080, i="eth0")
    got, want = (t.kind, str(t.addr_min), t.port_min), (KIND_DNAT, "172.17.0.2", 80)
    assert got == want, f"DNAT (kind, addr_min, port_min) got {got}, want {want}"
    t = ev(rs, HOOK_PREROUTING, "8.8.8.8", "1.2.3.4", proto=17, sport=1500, dport=54, i="wlan0")
    got, want = (t.kind, t.port_min), (KIND_REDIRECT, 5353)
    assert got == want, f"REDIRECT (kind, port_min) got {got}, want {want}"
    got = ev(rs, HOOK_PREROUTING, "8.8.8.8", "1.2.3.4", proto=17, sport=1500, dport=53, i="wlan0")
    assert got is None, f"! --dport 53 with dport 53: target got {got}, want None"
    got = ev(rs, HOOK_PREROUTING, "8.8.8.8", "1.2.3.4", dport=22, i="eth1").port_min
    assert got == 3128, f"-i eth+ REDIRECT: port_min got {got}, want 3128"


def test_first_match_wins_and_accept_stops():
    rs = load("-A PREROUTING -p tcp --dport 22 -j ACCEPT\n"
              "-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.1")
    got = ev(rs, HOOK_PREROUTING, "1.1.1.1", "2.2.2.2", dport=22)
    assert got is None, f"dport 22 (ACCEPT first): target got {got}, want None"
    got = ev(rs, HOOK_PREROUTING, "1.1.1.1", "2.2.2.2", dport=23).kind
    assert got == KIND_DNAT, f"dport 23: kind got {got}, want {KIND_DNAT} (DNAT)"


def test_user_chains_with_return_kube_proxy_style():
    rs = load(":KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-MARK - [0:0]\n"
              "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
              "-A OUTPUT -j KUBE-SERVICES\n"
              "-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j KUBE-SVC-A\n"
              "-A KUBE-SVC-A -s 10.244.0.0/16 -j RETURN\n"
              "-A KUBE-SVC-A -p udp -j DNAT --to-destination 10.244.1.5:53\n"
              "-A KUBE-SERVICES -p tcp -j DNAT --to-destination 10.244.9.9:80", head=HEAD)
    t = ev(rs, HOOK_PREROUTING, "192.168.1.1", "10.96.0.10", proto=17, dport=53)
    got, want = (t.kind, str(t.addr_min), t.port_min), (KIND_DNAT, "10.244.1.5", 53)
    assert got == want, f"service DNAT (kind, addr_min, port_min) got {got}, want {want}"
    # RETURN from the service chain continues in KUBE-SERVICES (no UDP rule after it)
    got = ev(rs, HOOK_PREROUTING, "10.244.3.3", "10.96.0.10", proto=17, dport=53)
    assert got is None, f"RETURN for 10.244.0.0/16: target got {got}, want None"
    t = ev(rs, HOOK_OUTPUT, "10.244.3.3", "10.96.0.10", proto=6, dport=53)
    got = str(t.addr_min)
    assert got == "10.244.9.9", f"OUTPUT tcp DNAT: addr_min got {got}, want 10.244.9.9"


def test_flags_counters_and_other_tables():
    text = ("# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n"
            + HEAD + "[5:300] -A POSTROUTING -p tcp -o wan0 -j MASQUERADE --to-ports 1024-2047 --random\n"
            "-A POSTROUTING -o wan1 -j SNAT --to-source 1.2.3.4-1.2.3.8 --persistent --random-fully\n"
            "COMMIT\n")
    rs = parse_iptables_save(text, "t.rules", 4)
    got = rs.ignored_tables
    assert got == ["filter"], f"ignored_tables got {got}, want ['filter']"
    t = ev(rs, HOOK_POSTROUTING, "10.0.0.2", "8.8.8.8", o="wan0")
    got, want = (t.port_min, t.port_max, t.flags), (1024, 2047, F_RANDOM)
    assert got == want, f"MASQUERADE (port_min, port_max, flags) got {got}, want {want}"
    t = ev(rs, HOOK_POSTROUTING, "10.0.0.2", "8.8.8.8", o="wan1")
    assert t.flags == F_PERSISTENT | F_RANDOM_FULLY, \
        f"SNAT flags got {t.flags}, want {F_PERSISTENT | F_RANDOM_FULLY} (persistent, random-fully)"


def test_example_configs_load():
    rs = parse_iptables_save((CONFIGS / "demo.rules").read_text(), "demo.rules", 4)
    got = ev(rs, HOOK_POSTROUTING, "10.0.0.7", "1.1.1.1", o="wan0").kind
    assert got == KIND_MASQUERADE, \
        f"demo.rules -o wan0: kind got {got}, want {KIND_MASQUERADE} (MASQUERADE)"
    t = ev(rs, HOOK_PREROUTING, "1.1.1.1", "192.168.0.1", dport=8080, i="wan0")
    got, want = (str(t.addr_min), t.port_min), ("10.0.0.80", 80)
    assert got == want, f"demo.rules DNAT (addr_min, port_min) got {got}, want {want}"


# ---------------------------------------------------------------- refused, with file:line

@pytest.mark.parametrize("body,line,reason", [
    ("-A POSTROUTING -j DNAT --to-destination 1.2.3.4", 6, "DNAT is only valid in PREROUTING or OUTPUT"),
    ("-A PREROUTING -j SNAT --to-source 1.2.3.4", 6, "SNAT is only valid in"),
    ("-A OUTPUT -j MASQUERADE", 6, "MASQUERADE is only valid in POSTROUTING"),
    ("-A INPUT -p tcp -j REDIRECT --to-ports 80", 6, "REDIRECT is only valid in"),
    ("-A PREROUTING --frobnicate 1", 6, "unknown option '--frobnicate'"),
    ("-A PREROUTING -s 10.0.0.300 -j ACCEPT", 6, "is not an address or CIDR"),
    ("-A PREROUTING -s a::1 -j ACCEPT", 6, "is IPv6"),
    ("-A PREROUTING -p tcp --dport 70000 -j ACCEPT", 6, "out of range"),
    ("-A PREROUTING -p tcp --dport 90:80 -j ACCEPT", 6, "min > max"),
    ("-A PREROUTING --dport 80 -j ACCEPT", 6, "needs -p tcp or -p udp"),
    ("-A PREROUTING -j REDIRECT --to-ports 42", 6, "needs -p tcp or -p udp"),
    ("-A PREROUTING -j DNAT --to-destination 1.2.3.4:80", 6, "needs -p tcp or -p udp"),
    ("-A PREROUTING -p tcp -j DNAT --to-destination 1.2.3.4:0", 6, "port 0"),
    ("-A PREROUTING -p tcp -j DNAT", 6, "needs --to-destination"),
    ("-A PREROUTING -j NOPE", 6, "no such chain or target"),
    ("-A PREROUTING -o eth0 -j ACCEPT", 6, "-o cannot be used in PREROUTING"),
    ("-A POSTROUTING -i eth0 -j ACCEPT", 6, "-i cannot be used in POSTROUTING"),
    ("-A PREROUTING -j DROP", 6, "not allowed in the nat table"),
    ("-A NOTDECLARED -j ACCEPT", 6, "was not declared"),
    ("-A PREROUTING -m addrtype --dst-type LOCAL -j ACCEPT", 6, "-m addrtype is not supported"),
    ("-A POSTROUTING -p tcp -j MASQUERADE --to-source 1.2.3.4", 6, "MASQUERADE does not take --to-source"),
    (":X - [0:0]\n-A PREROUTING -j X\n-A X -j MASQUERADE", 8, "chain X is reached from PREROUTING"),
    (":X - [0:0]\n:Y - [0:0]\n-A PREROUTING -j X\n-A X -j Y\n-A Y -j X", 10, "jump loop"),
])
def test_refused_with_file_line_reason(body, line, reason):
    with pytest.raises(RuleError) as e:
        load(body)
    msg = str(e.value)
    assert msg.startswith(f"t.rules:{line}:"), f"got {msg!r}, want t.rules:{line}: ..."
    assert reason in msg, f"got {msg!r}, want it to say {reason!r}"


def test_missing_commit_and_stray_lines():
    with pytest.raises(RuleError, match=r"t.rules:1: table \*nat has no COMMIT"):
        parse_iptables_save("*nat\n:PREROUTING ACCEPT [0:0]\n", "t.rules", 4)
    with pytest.raises(RuleError, match=r"t.rules:1: line outside a table"):
        parse_iptables_save("-A PREROUTING -j ACCEPT\n", "t.rules", 4)


# ---------------------------------------------------------------- property: flattening

def _walk(rs, chain, hook, args, depth=0):
    """Direct interpretation of the chains (no flattening), the reference."""
    for r in rs.chains.get(chain, []):
        if not r.match.matches(*args):
            continue
        if r.nat is not None:
            return "nat", r.nat
        if r.target == "ACCEPT":
            return "accept", None
        if r.target == "RETURN":
            return ("accept", None) if depth == 0 else ("return", None)
        if r.target in rs.chains:
            res = _walk(rs, r.target, hook, args, depth + 1)
            if res[0] != "return":
                return res
    return ("accept", None) if depth == 0 else ("return", None)


rule_st = st.tuples(st.sampled_from(["", "-s 10.0.0.0/8 ", "! -s 10.0.0.0/8 ", "-d 1.2.3.4 "]),
                    st.sampled_from(["", "-p tcp ", "-p udp --dport 53 ", "-p tcp ! --dport 80 "]),
                    st.sampled_from(["-j ACCEPT", "-j RETURN", "-j A", "-j B",
                                     "-j DNAT --to-destination 9.9.9.9", "-j REDIRECT"]))


@settings(max_examples=150, deadline=None)
@given(pre=st.lists(rule_st, max_size=5), a_rules=st.lists(rule_st, max_size=4),
       b_rules=st.lists(rule_st, max_size=4),
       pkt=st.tuples(st.sampled_from(["10.1.1.1", "192.168.1.1"]), st.sampled_from(["1.2.3.4", "5.6.7.8"]),
                     st.sampled_from([6, 17]), st.sampled_from([53, 80, 443])))
def test_flattened_program_equals_chain_walk(pre, a_rules, b_rules, pkt):
    def line(chain, r):
        m1, m2, tgt = r
        if chain == "B" and tgt in ("-j A", "-j B"):
            tgt = "-j ACCEPT"          # no loops
        if chain == "A" and tgt == "-j A":
            tgt = "-j B"
        return f"-A {chain} {m1}{m2}{tgt}"
    body = ":A - [0:0]\n:B - [0:0]\n" + "\n".join(
        [line("PREROUTING", r) for r in pre] + [line("A", r) for r in a_rules] + [line("B", r) for r in b_rules])
    rs = load(body)
    src, dst, proto, dport = pkt
    args = (4, a(src), a(dst), proto, 1234, dport, "lan0", None)
    kind, nat = _walk(rs, "PREROUTING", HOOK_PREROUTING, args)
    got = rs.evaluate(HOOK_PREROUTING, *args)
    assert got == (nat if kind == "nat" else None), f"flattened {got}, walk {kind} {nat}\n{body}"
