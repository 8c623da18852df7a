# The nat table of iptables-save / ip6tables-save files: parsing with file:line errors,
# load-time validation (targets on the right hooks, ports need -p tcp|udp), and a
# flattened per-hook program evaluated once per new conn. Semantics: iptables(8),
# iptables-extensions(8) (DNAT, SNAT, MASQUERADE, REDIRECT), reference/linux-netfilter.md §1.8.
"""NAT rules.

``parse_iptables_save(text, filename, family)`` returns a :class:`RuleSet`. Only the
``*nat`` table is used; other tables are skipped whole (named in ``ignored_tables``).
Supported per rule: ``-s -d`` (address or CIDR), ``-p tcp|udp|icmp|icmpv6|all|N``,
``--sport --dport`` (port or ``a:b``, ``:b``, ``a:``), ``-i -o`` (``+`` suffix =
prefix match), ``!`` before any of them, ``-m tcp|udp|icmp|icmp6|comment``
(``--comment`` is kept, not matched), ``-j`` DNAT, SNAT, MASQUERADE, REDIRECT, ACCEPT,
RETURN or a user chain, ``-A`` and ``-I CHAIN [n]``, ``-N``, chain policies and counters.
Anything else is refused at load with ``RuleError(file, line, reason)``.

``RuleSet.evaluate(hook, family, src, dst, proto, sport, dport, in_iface, out_iface)``
walks the hook's flattened program (user chains inlined, RETURN handled) and returns the
first :class:`NatTarget` that matches, or None (ACCEPT, or no rule matched).

``compile_rules(ruleset, ifnames)`` turns the programs into arrays (:class:`RuleProgram`)
and ``evaluate_compiled`` walks them in compiled code with the same result.
"""
from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np

from .errors import RuleError

HOOK_PREROUTING, HOOK_INPUT, HOOK_OUTPUT, HOOK_POSTROUTING = 0, 1, 2, 3
BUILTIN = {"PREROUTING": HOOK_PREROUTING, "INPUT": HOOK_INPUT, "OUTPUT": HOOK_OUTPUT,
           "POSTROUTING": HOOK_POSTROUTING}
HOOK_NAMES = {v: k for k, v in BUILTIN.items()}
KIND_DNAT, KIND_SNAT, KIND_MASQUERADE, KIND_REDIRECT = 1, 2, 3, 4
KIND_NAMES = {KIND_DNAT: "DNAT", KIND_SNAT: "SNAT", KIND_MASQUERADE: "MASQUERADE",
              KIND_REDIRECT: "REDIRECT"}
F_RANDOM, F_RANDOM_FULLY, F_PERSISTENT = 1, 2, 4
# where each target may run (iptables-extensions(8))
TARGET_HOOKS = {
    KIND_DNAT: {HOOK_PREROUTING, HOOK_OUTPUT},
    KIND_REDIRECT: {HOOK_PREROUTING, HOOK_OUTPUT},
    KIND_SNAT: {HOOK_POSTROUTING, HOOK_INPUT},
    KIND_MASQUERADE: {HOOK_POSTROUTING},
}
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "icmp6": 58,
          "all": 0, "sctp": 132, "gre": 47, "esp": 50, "ah": 51}
MATCHES = {"tcp", "udp", "icmp", "icmp6", "icmpv6", "comment"}


@dataclass(frozen=True)
class NatTarget:
    kind: int
    addr_min: object = None      # ipaddress object, or None (MASQUERADE/REDIRECT/port-only)
    addr_max: object = None
    has_addr: bool = False
    port_min: int = 0
    port_max: int = 0
    has_port: bool = False
    flags: int = 0
    lineno: int = 0

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass(frozen=True)
class Match:
    src: tuple | None = None         # (network, negate)
    dst: tuple | None = None
    proto: tuple | None = None       # (number, negate); 0 = all
    sport: tuple | None = None       # (lo, hi, negate)
    dport: tuple | None = None
    in_iface: tuple | None = None    # (name, prefix, negate)
    out_iface: tuple | None = None

    def matches(self, family, src, dst, proto, sport, dport, in_iface, out_iface) -> bool:
        if self.src is not None and (_in(src, self.src[0]) == self.src[1]):
            return False
        if self.dst is not None and (_in(dst, self.dst[0]) == self.dst[1]):
            return False
        if self.proto is not None and self.proto[0] != 0 and ((proto == self.proto[0]) == self.proto[1]):
            return False
        if self.sport is not None and ((self.sport[0] <= sport <= self.sport[1]) == self.sport[2]):
            return False
        if self.dport is not None and ((self.dport[0] <= dport <= self.dport[1]) == self.dport[2]):
            return False
        if self.in_iface is not None and (_if(in_iface, self.in_iface) == self.in_iface[2]):
            return False
        if self.out_iface is not None and (_if(out_iface, self.out_iface) == self.out_iface[2]):
            return False
        return True


def _in(addr: bytes, net) -> bool:
    a = ipaddress.ip_address(addr)
    return a.version == net.version and a in net


def _if(name, spec) -> bool:
    if name is None:
        return False
    pat, prefix, _ = spec
    return name.startswith(pat) if prefix else name == pat


@dataclass(frozen=True)
class Rule:
    chain: str
    match: Match
    target: str                  # DNAT, SNAT, MASQUERADE, REDIRECT, ACCEPT, RETURN, chain, ""
    nat: NatTarget | None
    lineno: int
    comment: str = ""


# program steps: (match, op, arg); op: "nat" (arg NatTarget), "accept", "goto" (arg index)
@dataclass
class RuleSet:
    family: int
    filename: str
    chains: dict = field(default_factory=dict)       # name -> list[Rule]
    ignored_tables: list = field(default_factory=list)
    programs: dict = field(default_factory=dict)     # hook -> list of steps

    def rulesets(self) -> tuple:
        """The RuleSets behind this one's evaluate (for compile_rules)."""
        return (self,)

    @property
    def rules(self) -> list[Rule]:
        return [r for rs in self.chains.values() for r in rs]

    def evaluate(self, hook, family, src, dst, proto, sport, dport, in_iface=None, out_iface=None):
        if family != self.family:
            return None
        prog = self.programs.get(hook, ())
        k = 0
        while k < len(prog):
            m, op, arg = prog[k]
            if m is None or m.matches(family, src, dst, proto, sport, dport, in_iface, out_iface):
                if op == "nat":
                    return arg
                if op == "accept":
                    return None
                if op == "goto":
                    k = arg
                    continue
            k += 1
        return None


# ---------------------------------------------------------------- parsing

def _err(fn, ln, msg):
    return RuleError(fn, ln, msg)


def _addr(s, family, fn, ln, what):
    try:
        net = ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise _err(fn, ln, f"{what} {s!r} is not an address or CIDR") from None
    if net.version != family:
        raise _err(fn, ln, f"{what} {s!r} is IPv{net.version} in an "
                           f"{'iptables' if family == 4 else 'ip6tables'}-save file")
    return net


def _port(s, fn, ln, what):
    try:
        p = int(s)
    except ValueError:
        raise _err(fn, ln, f"{what}: {s!r} is not a port number") from None
    if not 0 <= p <= 65535:
        raise _err(fn, ln, f"{what}: port {p} out of range 0-65535")
    return p


def _port_match(s, fn, ln, what):
    if ":" in s:
        a, b = s.split(":", 1)
        lo = _port(a, fn, ln, what) if a else 0
        hi = _port(b, fn, ln, what) if b else 65535
    else:
        lo = hi = _port(s, fn, ln, what)
    if lo > hi:
        raise _err(fn, ln, f"{what}: range {s!r} has min > max")
    return lo, hi


def _port_range(s, fn, ln, what):
    a, _, b = s.partition("-")
    lo = _port(a, fn, ln, what)
    hi = _port(b, fn, ln, what) if b else lo
    if lo < 1 or hi < 1:
        raise _err(fn, ln, f"{what}: port 0 is not allowed in a NAT range")
    if lo > hi:
        raise _err(fn, ln, f"{what}: range {s!r} has min > max")
    return lo, hi


def _nat_spec(s, family, fn, ln, what):
    """ip[-ip][:port[-port]], [ip6[-ip6]]:port[-port], :port[-port]."""
    addr = port = None
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise _err(fn, ln, f"{what} {s!r}: missing ']'")
        addr, rest = s[1:close], s[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise _err(fn, ln, f"{what} {s!r}: want [addr]:port")
            port = rest[1:]
    elif family == 4 or s.startswith(":"):
        addr, _, port = s.partition(":") if ":" in s else (s, "", None)
        port = port if port else None
    else:
        addr = s       # bare IPv6 address (range) without port
    amin = amax = None
    if addr:
        a, _, b = addr.partition("-")
        try:
            amin = ipaddress.ip_address(a)
            amax = ipaddress.ip_address(b) if b else amin
        except ValueError:
            raise _err(fn, ln, f"{what} {s!r}: {addr!r} is not an address or range") from None
        if amin.version != family or amax.version != family:
            raise _err(fn, ln, f"{what} {s!r}: not an IPv{family} address")
        if int(amin) > int(amax):
            raise _err(fn, ln, f"{what} {s!r}: address range has min > max")
    pr = _port_range(port, fn, ln, what) if port else None
    if amin is None and pr is None:
        raise _err(fn, ln, f"{what} {s!r}: neither address nor port")
    return amin, amax, pr


def _parse_rule(tokens, chain, family, fn, ln):
    m = {}
    target = ""
    topts = {}
    flags = 0
    comment = ""
    neg = False
    proto = None
    k = 0

    def val():
        nonlocal k
        k += 1
        if k >= len(tokens):
            raise _err(fn, ln, f"option {tokens[k - 1]} needs a value")
        return tokens[k]

    while k < len(tokens):
        t = tokens[k]
        if t == "!":
            neg = True
            k += 1
            continue
        if t in ("-s", "--source", "-d", "--destination"):
            key = "src" if t in ("-s", "--source") else "dst"
            m[key] = (_addr(val(), family, fn, ln, t), neg)
        elif t in ("-p", "--protocol"):
            v = val().lower()
            if v in PROTOS:
                num = PROTOS[v]
            else:
                try:
                    num = int(v)
                except ValueError:
                    raise _err(fn, ln, f"unknown protocol {v!r}") from None
            if (family == 4 and num == 58) or (family == 6 and num == 1):
                raise _err(fn, ln, f"protocol {v} does not exist in IPv{family}")
            proto = (num, neg)
            m["proto"] = proto
        elif t in ("--sport", "--source-port", "--dport", "--destination-port"):
            key = "sport" if t in ("--sport", "--source-port") else "dport"
            if proto is None or proto[1] or proto[0] not in (6, 17):
                raise _err(fn, ln, f"{t} needs -p tcp or -p udp before it")
            lo, hi = _port_match(val(), fn, ln, t)
            m[key] = (lo, hi, neg)
        elif t in ("-i", "--in-interface", "-o", "--out-interface"):
            key = "in_iface" if t in ("-i", "--in-interface") else "out_iface"
            name = val()
            if len(name) > 15 or not name:
                raise _err(fn, ln, f"interface name {name!r} is not valid")
            hook = BUILTIN.get(chain)
            if key == "out_iface" and hook in (HOOK_PREROUTING, HOOK_INPUT):
                raise _err(fn, ln, f"-o cannot be used in {chain} (no output interface yet)")
            if key == "in_iface" and hook in (HOOK_POSTROUTING, HOOK_OUTPUT):
                raise _err(fn, ln, f"-i cannot be used in {chain} (no input interface)")
            m[key] = (name.rstrip("+"), name.endswith("+"), neg)
        elif t in ("-m", "--match"):
            v = val()
            if v not in MATCHES:
                raise _err(fn, ln, f"match -m {v} is not supported by shardct")
        elif t == "--comment":
            comment = val()
        elif t in ("-j", "--jump"):
            target = val()
        elif t in ("-g", "--goto"):
            raise _err(fn, ln, "-g (goto) is not supported; use -j")
        elif t in ("-c", "--set-counters"):
            val()
            val()
        elif t in ("--to-destination", "--to-source", "--to-ports", "--to"):
            topts[t] = val()
        elif t == "--random":
            flags |= F_RANDOM
        elif t == "--random-fully":
            flags |= F_RANDOM_FULLY
        elif t == "--persistent":
            flags |= F_PERSISTENT
        else:
            raise _err(fn, ln, f"unknown option {t!r}")
        if neg and t not in ("-s", "--source", "-d", "--destination", "-p", "--protocol",
                             "--sport", "--source-port", "--dport", "--destination-port",
                             "-i", "--in-interface", "-o", "--out-interface"):
            raise _err(fn, ln, f"'!' cannot negate {t}")
        neg = False
        k += 1
    if neg:
        raise _err(fn, ln, "'!' at the end of the rule")
    nat = _nat_target(target, topts, flags, proto, family, fn, ln)
    if target not in ("DNAT", "SNAT", "MASQUERADE", "REDIRECT") and (topts or flags):
        raise _err(fn, ln, f"{', '.join(list(topts) or ['--random'])} needs a NAT target, not {target or 'no target'}")
    return Rule(chain, Match(**m), target, nat, ln, comment)


def _nat_target(target, topts, flags, proto, family, fn, ln):
    ported = proto is not None and not proto[1] and proto[0] in (6, 17)
    if target in ("DNAT", "SNAT"):
        opt = "--to-destination" if target == "DNAT" else "--to-source"
        extra = set(topts) - {opt, "--to"}
        if extra:
            raise _err(fn, ln, f"{target} does not take {', '.join(sorted(extra))}")
        spec = topts.get(opt) or topts.get("--to")
        if spec is None:
            raise _err(fn, ln, f"{target} needs {opt}")
        amin, amax, pr = _nat_spec(spec, family, fn, ln, opt)
        if pr is not None and not ported:
            raise _err(fn, ln, f"{opt} with a port needs -p tcp or -p udp")
        kind = KIND_DNAT if target == "DNAT" else KIND_SNAT
        return NatTarget(kind, amin, amax, amin is not None, pr[0] if pr else 0,
                         pr[1] if pr else 0, pr is not None, flags, ln)
    if target in ("MASQUERADE", "REDIRECT"):
        extra = set(topts) - {"--to-ports"}
        if extra:
            raise _err(fn, ln, f"{target} does not take {', '.join(sorted(extra))}")
        if flags & F_PERSISTENT:
            raise _err(fn, ln, f"{target} does not take --persistent")
        pr = None
        if "--to-ports" in topts:
            if not ported:
                raise _err(fn, ln, f"{target} --to-ports needs -p tcp or -p udp")
            pr = _port_range(topts["--to-ports"], fn, ln, "--to-ports")
        kind = KIND_MASQUERADE if target == "MASQUERADE" else KIND_REDIRECT
        return NatTarget(kind, None, None, False, pr[0] if pr else 0, pr[1] if pr else 0,
                         pr is not None, flags, ln)
    return None


def parse_iptables_save(text: str, filename: str = "<rules>", family: int = 4) -> RuleSet:
    """Parse iptables-save (family 4) or ip6tables-save (family 6) text."""
    if family not in (4, 6):
        raise ValueError(f"family {family}: want 4 or 6")
    rs = RuleSet(family, filename)
    table = None
    table_line = 0
    chains: dict[str, list] = {}
    declared: dict[str, int] = {}
    for ln, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if table is not None:
                raise _err(filename, ln, f"table *{line[1:]} starts before COMMIT of *{table}")
            table, table_line = line[1:].strip(), ln
            if table != "nat":
                rs.ignored_tables.append(table)
            continue
        if table is None:
            raise _err(filename, ln, "line outside a table (missing '*nat')")
        if line == "COMMIT":
            table = None
            continue
        if table != "nat":
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            if len(parts) < 2:
                raise _err(filename, ln, "chain declaration needs a name and a policy")
            name, policy = parts[0], parts[1]
            if name in BUILTIN:
                if policy != "ACCEPT":
                    raise _err(filename, ln, f"policy {policy} on {name}: the nat table only allows ACCEPT")
            elif policy != "-":
                raise _err(filename, ln, f"user chain {name} cannot have policy {policy}")
            declared.setdefault(name, ln)
            chains.setdefault(name, [])
            continue
        if line.startswith("["):
            close = line.find("]")
            line = line[close + 1:].strip()     # leading [packets:bytes] counters
        try:
            tokens = shlex.split(line)
        except ValueError as e:
            raise _err(filename, ln, f"cannot split the line: {e}") from None
        if not tokens:
            continue
        cmd = tokens[0]
        if cmd in ("-N", "--new-chain"):
            if len(tokens) != 2:
                raise _err(filename, ln, "-N needs exactly one chain name")
            if tokens[1] in BUILTIN:
                raise _err(filename, ln, f"{tokens[1]} is a built-in chain")
            declared.setdefault(tokens[1], ln)
            chains.setdefault(tokens[1], [])
            continue
        if cmd in ("-A", "--append", "-I", "--insert"):
            if len(tokens) < 2:
                raise _err(filename, ln, f"{cmd} needs a chain name")
            chain = tokens[1]
            rest = tokens[2:]
            pos = None
            if cmd in ("-I", "--insert") and rest and rest[0].isdigit():
                pos = int(rest[0]) - 1
                rest = rest[1:]
            if chain not in chains:
                if chain in BUILTIN:
                    chains[chain] = []
                else:
                    raise _err(filename, ln, f"chain {chain} was not declared")
            rule = _parse_rule(rest, chain, family, filename, ln)
            if rule.target in ("DROP", "REJECT"):
                raise _err(filename, ln, f"{rule.target} is not allowed in the nat table")
            if pos is None:
                chains[chain].append(rule)
            else:
                if not 0 <= pos <= len(chains[chain]):
                    raise _err(filename, ln, f"-I {chain} {pos + 1}: no such position")
                chains[chain].insert(pos, rule)
            continue
        raise _err(filename, ln, f"unknown command {cmd!r}")
    if table is not None:
        raise _err(filename, table_line, f"table *{table} has no COMMIT")
    rs.chains = chains
    _validate(rs, declared)
    rs.programs = {h: _flatten(rs, name) for name, h in BUILTIN.items()}
    return rs


def _targets_ok(rs: RuleSet, declared):
    fn = rs.filename
    for name, rules in rs.chains.items():
        for r in rules:
            t = r.target
            if t and t not in ("ACCEPT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "REDIRECT"):
                if t not in rs.chains:
                    raise _err(fn, r.lineno, f"-j {t}: no such chain or target")
                if t in BUILTIN:
                    raise _err(fn, r.lineno, f"-j {t}: cannot jump to a built-in chain")
            if t == "RETURN" and name in BUILTIN:
                pass    # RETURN in a built-in chain = policy (ACCEPT)


def _validate(rs: RuleSet, declared):
    _targets_ok(rs, declared)
    fn = rs.filename

    # which built-in hooks reach each chain, with loop detection
    def walk(chain, hook, stack):
        if chain in stack:
            first = next(r for r in rs.chains[stack[-1]] if r.target == chain)
            raise _err(fn, first.lineno, f"jump loop: {' -> '.join(stack + [chain])}")
        for r in rs.chains[chain]:
            if r.nat is not None and hook not in TARGET_HOOKS[r.nat.kind]:
                allowed = " or ".join(HOOK_NAMES[h] for h in sorted(TARGET_HOOKS[r.nat.kind]))
                via = "" if chain in BUILTIN else f" (chain {chain} is reached from {HOOK_NAMES[hook]})"
                raise _err(fn, r.lineno, f"{r.target} is only valid in {allowed}, not "
                                         f"{HOOK_NAMES[hook]}{via}")
            if chain not in BUILTIN:
                if r.match.out_iface is not None and hook in (HOOK_PREROUTING, HOOK_INPUT):
                    raise _err(fn, r.lineno, f"-o in chain {chain} reached from {HOOK_NAMES[hook]}")
                if r.match.in_iface is not None and hook in (HOOK_POSTROUTING, HOOK_OUTPUT):
                    raise _err(fn, r.lineno, f"-i in chain {chain} reached from {HOOK_NAMES[hook]}")
            if r.target in rs.chains and r.target not in BUILTIN:
                walk(r.target, hook, stack + [chain])

    for name, hook in BUILTIN.items():
        if name in rs.chains:
            walk(name, hook, [])


def _flatten(rs: RuleSet, chain: str) -> list:
    """Inline user chains: a jump becomes 'if not match: skip the callee'; RETURN and the
    callee's end continue after the jump."""
    prog: list = []

    def emit(ch):
        # returns the indexes of the chain's RETURN steps, patched by the caller
        rets = []
        for r in rs.chains.get(ch, []):
            t = r.target
            if r.nat is not None:
                prog.append((r.match, "nat", r.nat))
            elif t == "ACCEPT":
                prog.append((r.match, "accept", None))
            elif t == "RETURN":
                if ch in BUILTIN:
                    prog.append((r.match, "accept", None))
                else:
                    rets.append(len(prog))
                    prog.append((r.match, "goto", None))
            elif t in rs.chains:
                skip_at = len(prog)
                prog.append((_Not(r.match), "goto", None))
                inner = emit(t)
                end = len(prog)
                for k in inner:
                    prog[k] = (prog[k][0], "goto", end)
                prog[skip_at] = (prog[skip_at][0], "goto", end)
        return rets

    emit(chain)
    return prog


class _Not:
    """Negation of a Match (for 'skip the inlined chain unless the jump rule matches')."""
    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def matches(self, *a):
        return not self.m.matches(*a)


# ---------------------------------------------------------------- compiled form

# step columns (int64): the whole match negated (_Not), src/dst on+negate, proto (-1 any),
# port ranges, op (OP_*), arg (target row or absolute step index)
(SC_NOT, SC_SRC, SC_SRC_NEG, SC_DST, SC_DST_NEG, SC_PROTO, SC_PROTO_NEG, SC_SP, SC_SP_LO,
 SC_SP_HI, SC_SP_NEG, SC_DP, SC_DP_LO, SC_DP_HI, SC_DP_NEG, SC_OP, SC_ARG) = range(17)
N_SC = 17
OP_NAT, OP_ACCEPT, OP_GOTO = 0, 1, 2
# target columns (int64); addresses in RuleProgram.taddr as min hi, lo, max hi, lo words
TC_KIND, TC_HAS_ADDR, TC_PMIN, TC_PMAX, TC_HAS_PORT, TC_FLAGS = range(6)
N_TC = 6


class RuleProgram(NamedTuple):
    """The per-hook programs of an IPv4 and an IPv6 RuleSet as arrays. Steps of hook h
    for family index f (0 IPv4, 1 IPv6) are ``hooks[f, h] <= k < hooks[f, h + 1]``.
    ``ifok[k, 0|1, j]``: the step's -i / -o condition holds for interface j of the
    network's list (j = number of interfaces stands for "no interface")."""
    hooks: np.ndarray       # int64[2, 5]
    step: np.ndarray        # int64[n, N_SC]
    saddr: np.ndarray       # uint64[n, 8]: src net hi, lo, mask hi, lo; dst the same
    ifok: np.ndarray        # bool[n, 2, n_if + 1]
    tgt: np.ndarray         # int64[m, N_TC]
    taddr: np.ndarray       # uint64[m, 4]
    targets: tuple          # the NatTarget of each tgt row


def _net_words(net):
    w = 32 if net.version == 4 else 128
    a, m = int(net.network_address), int(net.netmask)
    if w == 32:
        return 0, a, 0, m
    return a >> 64, a & (2 ** 64 - 1), m >> 64, m & (2 ** 64 - 1)


def _ip_words(a):
    v = int(a)
    return (0, v) if a.version == 4 else (v >> 64, v & (2 ** 64 - 1))


def compile_rules(rulesets, ifnames: list) -> RuleProgram:
    """The compiled form of ``rulesets`` (RuleSets of distinct families; none: an empty
    program) for a network with interfaces ``ifnames`` (in index order)."""
    steps, saddr, ifok, targets = [], [], [], []
    hooks = np.zeros((2, 5), dtype=np.int64)
    by_family = {rs.family: rs for rs in rulesets}
    names = list(ifnames) + [None]
    for f, fam in enumerate((4, 6)):
        rs = by_family.get(fam)
        for h in range(4):
            hooks[f, h] = len(steps)
            base = len(steps)
            for m, op, arg in (rs.programs.get(h, ()) if rs is not None else ()):
                neg = isinstance(m, _Not)
                mm = m.m if neg else m
                row = [0] * N_SC
                a = [0] * 8
                row[SC_NOT] = int(neg)
                if mm.src is not None:
                    row[SC_SRC], row[SC_SRC_NEG] = 1, int(mm.src[1])
                    a[0:4] = _net_words(mm.src[0])
                if mm.dst is not None:
                    row[SC_DST], row[SC_DST_NEG] = 1, int(mm.dst[1])
                    a[4:8] = _net_words(mm.dst[0])
                row[SC_PROTO] = -1
                if mm.proto is not None and mm.proto[0] != 0:
                    row[SC_PROTO], row[SC_PROTO_NEG] = mm.proto[0], int(mm.proto[1])
                for on, col, spec in ((SC_SP, SC_SP_LO, mm.sport), (SC_DP, SC_DP_LO, mm.dport)):
                    if spec is not None:
                        row[on], row[col], row[col + 1], row[col + 2] = \
                            1, spec[0], spec[1], int(spec[2])
                row[SC_OP] = {"nat": OP_NAT, "accept": OP_ACCEPT, "goto": OP_GOTO}[op]
                if op == "nat":
                    row[SC_ARG] = len(targets)
                    targets.append(arg)
                elif op == "goto":
                    row[SC_ARG] = base + arg
                ifok.append([[not (spec is not None and _if(n, spec) == spec[2]) for n in names]
                             for spec in (mm.in_iface, mm.out_iface)])
                steps.append(row)
                saddr.append(a)
        hooks[f, 4] = len(steps)
    tgt, taddr = [], []
    for t in targets:
        tgt.append([t.kind, int(t.has_addr), t.port_min, t.port_max, int(t.has_port), t.flags])
        taddr.append([*_ip_words(t.addr_min), *_ip_words(t.addr_max)] if t.has_addr else [0] * 4)
    n = len(steps)
    return RuleProgram(
        hooks, np.array(steps, dtype=np.int64).reshape(n, N_SC),
        np.array(saddr, dtype=np.uint64).reshape(n, 8),
        np.array(ifok, dtype=np.bool_).reshape(n, 2, len(names)),
        np.array(tgt, dtype=np.int64).reshape(len(targets), N_TC),
        np.array(taddr, dtype=np.uint64).reshape(len(targets), 4), tuple(targets))


@numba.njit(inline="always", cache=True)
def _in_net(w, k, c, hi, lo):
    # address (hi, lo) in the network at saddr[k, c:c + 4]
    return (hi & w[k, c + 2]) == w[k, c] and (lo & w[k, c + 3]) == w[k, c + 1]


@numba.njit(inline="always", cache=True)
def evaluate_compiled(hooks, step, saddr, ifok, fi, hook, s_hi, s_lo, d_hi, d_lo, proto,
                      sport, dport, in_k, out_k):
    """``RuleSet.evaluate`` over a RuleProgram's arrays for a packet of family index
    ``fi`` (0 IPv4, 1 IPv6): the target row of the first NAT step that matches, or -1."""
    k = hooks[fi, hook]
    end = hooks[fi, hook + 1]
    while k < end:
        # each condition holds when absent, or when its test differs from its negation
        st = step[k]
        ok = ((st[SC_SRC] == 0 or _in_net(saddr, k, 0, s_hi, s_lo) != (st[SC_SRC_NEG] != 0))
              and (st[SC_DST] == 0 or _in_net(saddr, k, 4, d_hi, d_lo) != (st[SC_DST_NEG] != 0))
              and (st[SC_PROTO] < 0 or (proto == st[SC_PROTO]) != (st[SC_PROTO_NEG] != 0))
              and (st[SC_SP] == 0
                   or (st[SC_SP_LO] <= sport <= st[SC_SP_HI]) != (st[SC_SP_NEG] != 0))
              and (st[SC_DP] == 0
                   or (st[SC_DP_LO] <= dport <= st[SC_DP_HI]) != (st[SC_DP_NEG] != 0))
              and ifok[k, 0, in_k] and ifok[k, 1, out_k])
        if ok != (st[SC_NOT] != 0):
            if st[SC_OP] == OP_NAT:
                return st[SC_ARG]
            if st[SC_OP] == OP_ACCEPT:
                return np.int64(-1)
            k = st[SC_ARG]
            continue
        k += 1
    return np.int64(-1)
