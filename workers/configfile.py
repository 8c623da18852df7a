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
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
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


def load_rules(path: str | Path, family: int = 4):
    from shardct.rules import parse_iptables_save
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), f"cannot read rules: {e.strerror}") from None
    return parse_iptables_save(text, str(p), family)


def load(path: str | Path) -> EngineConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"not valid TOML: {e}") from None
    known = {"conntrack", "nat", "interfaces", "routes", "pool"}
    for k in data:
        if k not in known:
            raise ConfigError(str(p), f"unknown section [{k}] (known: {', '.join(sorted(known))})")
    cfg = Config.from_dict(data.get("conntrack", {}), str(p))
    net = Network.from_dict(data, str(p)) if ("interfaces" in data or "routes" in data) else None
    rules = None
    nat = data.get("nat", {})
    r4 = load_rules(p.parent / nat["rules"], 4) if "rules" in nat else None
    r6 = load_rules(p.parent / nat["rules6"], 6) if "rules6" in nat else None
    if r4 is not None or r6 is not None:
        rules = DualRules(r4, r6)
    return EngineConfig(cfg, net, rules, str(p))


class DualRules:
    """iptables + ip6tables rule sets behind one evaluate(): each family has its own."""

    def __init__(self, v4, v6):
        self.v4, self.v6 = v4, v6

    def evaluate(self, hook, family, *args):
        rs = self.v4 if family == 4 else self.v6
        return None if rs is None else rs.evaluate(hook, family, *args)
