# Engine settings: limits, switches and timeouts with Linux's defaults and sysctl names.
# Pure: built from a dict (the runtime reads TOML files); bad values raise ConfigError.
"""Configuration.

Timeouts are seconds, named after Linux's ``net.netfilter.nf_conntrack_*`` sysctls.
``Config.from_dict(d, where)`` accepts the ``[conntrack]`` table of a TOML file and
names ``where`` (file) and the key in its errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .errors import ConfigError
from .table import LAST_RETRANS_MAX
from .tcpstate import TcpState


@dataclass
class Timeouts:
    tcp_syn_sent: float = 120
    tcp_syn_recv: float = 60
    tcp_established: float = 432000
    tcp_fin_wait: float = 120
    tcp_close_wait: float = 60
    tcp_last_ack: float = 30
    tcp_time_wait: float = 120
    tcp_close: float = 10
    tcp_syn_sent2: float = 120
    tcp_max_retrans: float = 300
    tcp_unacknowledged: float = 300
    udp: float = 30
    udp_stream: float = 120
    icmp: float = 30
    generic: float = 600

    def to_array(self) -> np.ndarray:
        """The kernel's tmo array (ns): TCP states by TcpState value, then the rest."""
        s = 1_000_000_000
        by_state = {
            TcpState.NONE: self.tcp_syn_sent, TcpState.SYN_SENT: self.tcp_syn_sent,
            TcpState.SYN_RECV: self.tcp_syn_recv, TcpState.ESTABLISHED: self.tcp_established,
            TcpState.FIN_WAIT: self.tcp_fin_wait, TcpState.CLOSE_WAIT: self.tcp_close_wait,
            TcpState.LAST_ACK: self.tcp_last_ack, TcpState.TIME_WAIT: self.tcp_time_wait,
            TcpState.CLOSE: self.tcp_close, TcpState.SYN_SENT2: self.tcp_syn_sent2,
        }
        arr = np.zeros(16, dtype=np.int64)
        for st, v in by_state.items():
            arr[int(st)] = int(v * s)
        rest = [self.tcp_max_retrans, self.tcp_unacknowledged, self.udp, self.udp_stream,
                self.icmp, self.generic]
        for k, v in enumerate(rest):
            arr[10 + k] = int(v * s)
        return arr


# upper bounds of the sizes (each is an array allocated up front): 2^26 conns is about
# 10 GiB of table, 2^24 routing buckets and 2^22 buffered events are far past any use
LIMITS = {"max_conns": 1 << 26, "n_buckets": 1 << 24, "event_buffer": 1 << 22,
          "frag_high_thresh": 1 << 30, "frag_queues": 1 << 20, "frag_timeout": 1 << 16,
          "frag6_timeout": 1 << 16}


@dataclass
class Config:
    max_conns: int = 262144          # nf_conntrack_max
    n_buckets: int = 16384           # routing buckets (gVisor's table length)
    tcp_be_liberal: bool = False     # nf_conntrack_tcp_be_liberal
    tcp_loose: bool = True           # nf_conntrack_tcp_loose: pick up mid-stream
    tcp_ignore_invalid_rst: bool = False
    tcp_max_retrans: int = 3         # nf_conntrack_tcp_max_retrans (1..7 here: a 3-bit count)
    checksum: bool = True            # nf_conntrack_checksum: validate before tracking
    events: bool = True              # nf_conntrack_events
    drop_invalid: bool = False       # forward INVALID untouched unless set (Linux default)
    decrement_ttl: bool = True       # router mode: forwarded packets take the hop (TTL)
    icmp_errors: bool = True         # router mode: time-exceeded, frag-needed, port unreachable (icmp.py)
    local_delivery: bool = False     # router mode: a host stack answers for the router's own
                                     # addresses; when False, UDP to them gets port unreachable
                                     # and TCP a RST from the engine, as a kernel with no
                                     # listener answers (icmp.py)
    icmp_ratelimit: int = 1000       # net.ipv4.icmp_ratelimit (ms per error per host)
    event_buffer: int = 65536        # events held between drains; overflow is counted
    shard_affine_nat: bool = False   # SNAT/MASQUERADE prefer ports whose reply hashes home
    defrag: bool = True              # reassemble fragments before tracking (nf_defrag_ipv4/6)
    frag_timeout: int = 30           # net.ipv4.ipfrag_time (s)
    frag6_timeout: int = 60          # net.netfilter.nf_conntrack_frag6_timeout (s)
    frag_high_thresh: int = 4194304  # net.ipv4.ipfrag_high_thresh: no new queue above it (B)
    frag_queues: int = 1024          # fragment queues held at most (frag.py)
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self):
        for k, top in LIMITS.items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= top:
                raise ConfigError(k, f"{k} = {v!r}: want 1..{top} (2^{top.bit_length() - 1})")
        if self.n_buckets & (self.n_buckets - 1):
            raise ConfigError("n_buckets", f"n_buckets = {self.n_buckets}: want a power of two")
        if not 1 <= self.tcp_max_retrans <= LAST_RETRANS_MAX:
            raise ConfigError("tcp_max_retrans",
                              f"tcp_max_retrans = {self.tcp_max_retrans}: want 1.."
                              f"{LAST_RETRANS_MAX} (the retransmission count is kept in 3 "
                              "bits per conn)")

    @classmethod
    def from_dict(cls, d: dict, where: str = "<config>") -> "Config":
        d = dict(d)
        tmo = d.pop("timeouts", {}) or {}
        if not isinstance(tmo, dict):
            raise ConfigError(where, f"timeouts = {tmo!r}: want a table of name = seconds")
        known = {f.name for f in fields(cls)} - {"timeouts"}
        kw = {}
        for k, v in d.items():
            if k not in known:
                raise _keyed(where, k, f"unknown setting {k!r} (known: {', '.join(sorted(known))})")
            want = type(getattr(cls(), k))
            if want is bool and not isinstance(v, bool):
                raise _keyed(where, k, f"{k} = {v!r}: want true or false")
            if want is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise _keyed(where, k, f"{k} = {v!r}: want a positive integer")
            kw[k] = v
        tkw = {}
        tknown = {f.name for f in fields(Timeouts)}
        for k, v in tmo.items():
            if k not in tknown:
                raise _keyed(where, f"timeouts.{k}",
                             f"unknown timeout {k!r} (known: {', '.join(sorted(tknown))})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e9:
                raise _keyed(where, f"timeouts.{k}", f"timeouts.{k} = {v!r}: want seconds > 0")
            tkw[k] = v
        try:
            return cls(**kw, timeouts=Timeouts(**tkw))
        except ConfigError as e:        # __post_init__ names the setting in e.where
            raise _keyed(where, e.where, e.reason) from None


def _keyed(where: str, key: str, reason: str) -> ConfigError:
    e = ConfigError(where, reason)
    e.key = key
    return e
