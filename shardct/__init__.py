# shardct: connection tracking and NAT with Linux conntrack semantics, as numba batch
# kernels (this package, pure) driven by a sharded worker pool (the `workers` package).
"""shardct — the pure core.

Public API: :class:`ConnTrack` (embed a conntrack table in any Python program),
:class:`Config`, :class:`PacketBatch`, :class:`ManualClock`, :class:`Network` (interfaces
and routes; ``ConnTrack.route`` gives each frame's egress as :class:`Routes`) and
:class:`RuleSet` (NAT rules, from ``parse_iptables_save``).
"""
from .batch import PacketBatch
from .config import Config, Timeouts
from .conntrack import Conn, ConnTrack, Event, ManualClock, Result, Tuple
from .errors import ConfigError, RuleError, ShardctError
from .netconf import Network, Routes
from .rules import RuleSet, parse_iptables_save

__all__ = ["ConnTrack", "Config", "Timeouts", "PacketBatch", "ManualClock", "Conn", "Event",
           "Result", "Tuple", "Network", "Routes", "RuleSet", "parse_iptables_save",
           "ConfigError", "RuleError", "ShardctError"]
