# Reads engine configuration files (TOML) and the NAT rule files they name, turning them
# into the core's Config, Network and RuleSet; errors name the file (and line).
"""Config files.

An engine config is TOML::

    [conntrack]              # shardct.config.Config fields; [conntrack.timeouts] too
    max_conns = 262144
    drop_invalid = true

    [nat]
    rules = "nat.rules"      # iptables-save file, relative to this file
    rules6 = "nat6.rules"    # ip6tables-save file (optional)

    [interfaces.lan0]        # shardct.netconf: addresses, mac; [[routes]]
    address = ["10.0.0.3/24"]

    [neighbours]             # static next hop MACs (shardct run), before the kernel's table
    "10.0.0.2" = "02:00:00:00:00:02"

    [local]                  # shardct run: local delivery through a TAP (workers/tap.py)
    tap = "sct-tap0"
    routes = true            # route the config's networks from the host through the TAP
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from shardct.config import Config
from shardct.errors import ConfigError
from shardct.netconf import Network


@dataclass
class EngineConfig:
    config: Config
    network: Network | None
    rules: object | None        # shardct.rules.RuleSet (IPv4 + IPv6 merged view) or None
    path: str
    neighbours: dict = field(default_factory=dict)  # ip_address -> 6-byte MAC
    local: dict = field(default_factory=dict)       # [local]: {"tap": name, "routes": bool}


def read_text(p: Path, what: str = "") -> str:
    """A config or rule file's text; ConfigError ``file: cannot read...`` or
    ``file:line: not UTF-8 ...`` instead of OSError/UnicodeDecodeError."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read{what}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{p}:{line}", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                         f"{col})") from None


def key_line(text: str, key: str, section: str = "conntrack") -> int | None:
    """The line of ``key`` (``name`` or ``timeouts.name``) in ``[section]`` of a TOML
    text (``[section.timeouts]`` or a dotted key for a timeout); None when not found."""
    sub, _, name = key.rpartition(".")
    want = {(section, key), (f"{section}.{sub}" if sub else section, name)}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        t = line.strip()
        if t.startswith("[") and not t.startswith("[["):
            current = t.strip("[]").strip().replace(" ", "")
            continue
        k = t.split("=", 1)[0].strip().replace(" ", "").strip('"') if "=" in t else None
        if k is not None and (current, k) in want:
            return n
    return None


def load_rules(path: str | Path, family: int = 4):
    from shardct.rules import parse_iptables_save
    p = Path(path)
    return parse_iptables_save(read_text(p, " rules"), str(p), family)


def load(path: str | Path) -> EngineConfig:
    p = Path(path)
    text = read_text(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"not valid TOML: {e}") from None
    known = {"conntrack", "nat", "interfaces", "routes", "pool", "neighbours", "local"}
    for k in data:
        if k not in known:
            raise ConfigError(str(p), f"unknown section [{k}] (known: {', '.join(sorted(known))})")
    for k in ("conntrack", "nat"):
        if not isinstance(data.get(k, {}), dict):
            raise ConfigError(f"{p}:{key_line(text, k, '') or 1}", f"{k} must be a table: [{k}]")
    try:
        cfg = Config.from_dict(data.get("conntrack", {}), str(p))
    except ConfigError as e:
        line = key_line(text, getattr(e, "key", ""))
        if line is None:
            raise
        raise ConfigError(f"{p}:{line}", e.reason) from None
    net = Network.from_dict(data, str(p)) if ("interfaces" in data or "routes" in data) else None
    rules = None
    nat = data.get("nat", {})
    for k in ("rules", "rules6"):
        if k in nat and not isinstance(nat[k], str):
            raise ConfigError(f"{p}:{key_line(text, k, 'nat') or 1}",
                              f"nat.{k} = {nat[k]!r}: want a file name")
    r4 = load_rules(p.parent / nat["rules"], 4) if "rules" in nat else None
    r6 = load_rules(p.parent / nat["rules6"], 6) if "rules6" in nat else None
    if r4 is not None or r6 is not None:
        rules = DualRules(r4, r6)
    local = local_section(data.get("local", {}), text, p)
    if local:
        cfg.local_delivery = True     # the host's stack on the TAP answers, not the engine
    return EngineConfig(cfg, net, rules, str(p), neighbours(data.get("neighbours", {}), text, p),
                        local)


def local_section(d, text: str, p: Path) -> dict:
    """``[local]``: {"tap": interface name, "routes": bool} ({} without the section);
    ConfigError with the line of a bad key."""
    from .tap import check_name
    if not isinstance(d, dict):
        raise ConfigError(f"{p}:{key_line(text, 'local', '') or 1}",
                          "local must be a table: [local]")
    for k, v in d.items():
        where = f"{p}:{key_line(text, k, 'local') or 1}"
        if k not in ("tap", "routes"):
            raise ConfigError(where, f"local.{k}: unknown key (known: routes, tap)")
        why = check_name(v) if k == "tap" else (
            None if isinstance(v, bool) else f"routes = {v!r}: want true or false")
        if why:
            raise ConfigError(where, f"local.{why}")
    if d and "tap" not in d:
        at = next((n for n, x in enumerate(text.splitlines(), 1)
                   if x.strip().replace(" ", "") == "[local]"), 1)
        raise ConfigError(f"{p}:{at}", "local: needs tap = NAME")
    return {"tap": d["tap"], "routes": d.get("routes", True)} if d else {}


def neighbours(d, text: str, p: Path) -> dict:
    """``[neighbours]`` (address = "mac") as {ip_address: 6-byte MAC}; ConfigError with
    the line of a bad entry."""
    import ipaddress
    from shardct.netconf import parse_mac
    if not isinstance(d, dict):
        raise ConfigError(f"{p}:{key_line(text, 'neighbours', '') or 1}",
                          "neighbours must be a table: [neighbours]")
    out = {}
    for k, v in d.items():
        where = f"{p}:{key_line(text, k, 'neighbours') or 1}"
        try:
            addr = ipaddress.ip_address(k)
        except ValueError:
            raise ConfigError(where, f"neighbours: {k!r} is not an IP address") from None
        if not isinstance(v, str):
            raise ConfigError(where, f"neighbours.{k} = {v!r}: want a MAC string")
        out[addr] = parse_mac(v, where)
    return out


class DualRules:
    """iptables + ip6tables rule sets behind one evaluate(): each family has its own."""

    def __init__(self, v4, v6):
        self.v4, self.v6 = v4, v6

    def rulesets(self) -> tuple:
        """The rule sets of both families (for shardct.rules.compile_rules)."""
        return tuple(rs for rs in (self.v4, self.v6) if rs is not None)

    def evaluate(self, hook, family, *args):
        rs = self.v4 if family == 4 else self.v6
        return None if rs is None else rs.evaluate(hook, family, *args)
