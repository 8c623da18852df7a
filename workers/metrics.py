# Prometheus metrics of a running pool (`--metrics-port`): per-worker conntrack counters
# and protocol counts, the pool's totals, ring drops per interface and round latency,
# read from what the sink already has when the endpoint is scraped.
"""Metrics endpoint (prometheus_client).

``serve(pool, port, rings=None)`` starts prometheus_client's HTTP server (a thread of
the supervisor's process, started after the workers are forked; on 127.0.0.1 unless
told otherwise) with a collector that reads, at scrape time:

* ``shardct_conntrack_<counter>{worker}``: each worker's conntrack -S counters (its
  latest report; ``entries`` is a gauge),
* ``shardct_pool_<count>{worker}``: the cross-shard protocol's counts (handoffs, grants,
  supersteps, ...),
* ``shardct_<total>``: the pool's totals (packets in and out, lost, restored, rounds),
* ``shardct_ring_drops{interface}``: frames the kernel could not put in a ring (live),
* ``shardct_round_seconds``: a histogram of round latency (dispatch to emit).

The collector only reads; a scrape never waits for the workers.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

GAUGES = {"entries", "busy_us", "step_wait_us"}


class PoolCollector:
    def __init__(self, pool, rings=None):
        self.pool, self._rings = pool, rings

    @property
    def rings(self):
        return self._rings if self._rings is not None else getattr(self.pool, "rings", [])

    def collect(self):
        p = self.pool
        latest = {}
        for (k, g), st in list(p.worker_stats.items()):
            if k not in latest or g >= latest[k][0]:
                latest[k] = (g, st, p.worker_counts.get((k, g), {}))
        fams = {}
        for k, (_, st, counts) in sorted(latest.items()):
            for prefix, d in (("conntrack", st), ("pool", counts)):
                for name, v in d.items():
                    key = f"shardct_{prefix}_{name}"
                    if key not in fams:
                        kind = GaugeMetricFamily if name in GAUGES else CounterMetricFamily
                        fams[key] = kind(key, f"{prefix} {name} of each worker",
                                         labels=["worker"])
                    fams[key].add_metric([str(k)], float(v))
        yield from fams.values()
        for name, v in list(p.totals.items()):
            c = CounterMetricFamily(f"shardct_{name}", f"the pool's {name}")
            c.add_metric([], float(v))
            yield c
        if self.rings:
            d = CounterMetricFamily("shardct_ring_drops", "frames the kernel dropped at a ring",
                                    labels=["interface"])
            for r in self.rings:
                d.add_metric([r.ifname], float(r.drops))
            yield d
        lat = p.round_latency
        acc, buckets = 0, []
        for bound, n in zip(lat.BOUNDS + (float("inf"),), lat.counts):
            acc += n
            buckets.append((str(bound) if bound != float("inf") else "+Inf", acc))
        h = HistogramMetricFamily("shardct_round_seconds", "round latency, dispatch to emit")
        h.add_metric([], buckets, lat.sum)
        yield h


class Endpoint:
    """A running endpoint; ``close()`` stops its server thread."""

    def __init__(self, pool, port: int, rings=None, addr: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self.registry.register(PoolCollector(pool, rings))
        self.httpd, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self.httpd.server_port

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def serve(pool, port: int, rings=None, addr: str = "127.0.0.1") -> Endpoint:
    """Start the endpoint on addr:port (0: any free port, see ``.port``)."""
    return Endpoint(pool, port, rings, addr)
