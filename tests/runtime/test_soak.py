"""A short soak (bench/soak.py for ~20 s): mixed traffic with churn through 2 workers
with the packet clock running far ahead of the wall clock. Loose bounds: no worker's
table above max_conns, conns expire and are early-dropped, RSS after warm-up grows by
less than half."""
from __future__ import annotations

from bench import soak


def test_short_soak_stays_bounded():
    lines = []
    r = soak.run(20, 2, workers=2, max_conns=8192, log=lines.append)
    print("\n".join(lines))
    rows, s = r["samples"], r["summary"]
    assert len(rows) >= 6, f"samples got {len(rows)}, want >= 6"
    peak = max(max(x["entries"]) for x in rows)
    assert peak <= 8192, f"a worker held {peak} entries, max_conns 8192"
    last = rows[-1]
    assert last["expired"] > 0 and last["early_drop"] > 0 and last["new"] > 8192, last
    warm = rows[len(rows) // 4]
    assert last["rss_total_mb"] < 1.5 * warm["rss_total_mb"], \
        f"RSS got {last['rss_total_mb']} MB, was {warm['rss_total_mb']} after warm-up"
    assert r["totals"]["lost_packets"] == 0, r["totals"]
    print("soak summary:", s)
