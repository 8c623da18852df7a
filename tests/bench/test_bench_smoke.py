"""Each benchmark harness runs at toy sizes and returns/writes what it promises (no timing
is asserted: the figures of toy sizes mean nothing)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("dpkt")

from bench import core, kernel_nat, model, peer, pool  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402


def positive(d: dict, keys):
    for k in keys:
        assert k in d, f"{k} missing from {sorted(d)}"
        assert d[k] > 0, f"{k} = {d[k]}"


def test_core_measure_returns_its_figures():
    core.REPS = 1
    f = core.measure(2000, 10_000, 1024, machine=False, out=None)
    positive(f, ["established_zipf_ns", "established_uniform_ns", "established_1k_uniform_ns",
                 "established_zipf_masquerade_ns", "new_conns_per_s",
                 "new_conns_masquerade_per_s", "bytes_per_conn_1M"])
    assert len(f["kernel_ns"]) == 3
    assert len(core.batch_latency(1000, 4096, 1024)) == 4


def test_pool_returns_per_worker_rows():
    args, chosen = pool.parse_args(["--quick", "--profiles", "synthetic,2k", "--workers", "1,2",
                                    "--flows", "300", "--packets", "3000", "--packets-2k",
                                    "2000", "--timeout", "120"])
    r = pool.run(args, chosen)
    assert set(r) == {"synthetic", "2k"}
    for prof in r.values():
        positive(prof, ["frames", "single_mpps"])
        assert [row["workers"] for row in prof["pool"]] == [1, 2]
        for row in prof["pool"]:
            assert "error" not in row, row
            positive(row, ["mpps", "ratio"])
            assert 0 <= row["handoff"] <= 1
    assert all(row["same_verdicts"] for row in r["2k"]["pool"])
    for row in r["2k"]["pool"]:     # each process's CPU while the pool ran (default: own dispatcher)
        cpu = row["cpu_ns_per_packet"]
        assert set(cpu) == {"supervisor", "dispatcher", "workers"} and min(cpu.values()) > 0, cpu
    d = pool.dispatcher_rate(3000, workers=(1, 2), reps=1)
    assert set(d) == {1, 2} and all(v["ns"] > 0 and v["mpps"] > 0 for v in d.values())


def test_model_measures_every_stage_and_checks_the_pool(tmp_path):
    """bench/model.py end to end at toy sizes: the transport against its peer process,
    every stage timer against today's Dispatcher and Shard, the model, and its check
    against the real Pool with the dispatcher in the supervisor and in its own process."""
    out = tmp_path / "model.json"
    assert model.main(["--tiny", "--profiles", "2k", "--shards", "1,2", "--rounds", "512",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    t = r["transport"]
    assert [row["p"] for row in t["batch"]][-1] == 65536
    positive(t["pingpong"], ["rtt_median_us"])
    prof = r["profiles"]["2k"]
    positive(prof, ["put_ns"])
    rows = prof["dispatcher"]["512"]
    assert [row["n"] for row in rows] == [1, 2]
    for row in rows:
        positive(row, ["ns", "parse_hash", "deps", "split"])
        assert row["out_bytes_per_pkt"] == model.PK_ARRAYS     # frames stay in the ring
    assert [w["n"] for w in prof["workers"]] == [1, 2]
    for w in prof["workers"]:
        positive(w, ["rounds", "cp_ns", "steps_per_round", "reorder_ns"])
        assert w["in_bytes_per_pkt"] == model.PK_ARRAYS
    assert prof["workers"][1]["handoff_ratio"] > 0
    for p in prof["predictions"] + prof["predictions_no_frames"]:
        positive(p, ["D", "W", "S", "mpps"])
        assert p["limit"] in ("dispatcher", "workers", "supervisor")
    assert [c["dispatcher_process"] for c in prof["checks"]] == [False, True]
    for c in prof["checks"]:
        assert "error" not in c, c
        positive(c, ["packets", "mpps", "model_mpps", "sup_cpu_ns", "model_worker_ns"])


def test_peer_trackers_and_ratios():
    r = peer.measure(300, 2000, 30, out=None)
    positive(r["shardct"], ["new_conns_per_s", "established_ns"])
    positive(r["dpkt"], ["new_conns_per_s", "established_ns", "ratio_established",
                         "ratio_new_conns", "conns"])
    assert r["dpkt"]["established"] == 300      # every handshake reached ESTABLISHED
    if "skipped" not in r["scapy"]:
        positive(r["scapy"], ["established_ns", "ratio_established"])


def test_kernel_nat_or_a_reason():
    why = kernel_nat.skip_reason()
    r = kernel_nat.measure(3000, 0.5, 8, out=None)
    if why:
        assert r == {"skipped": why}
        return
    for mode in ("forward", "masquerade"):
        positive(r[mode], ["sent", "received", "kpps"])
        assert r[mode]["softirq_ns_per_packet"] >= 0     # tick-sampled: 0 on a short run
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"bk16-{os.getpid()}-" not in left           # the namespaces are gone


def test_one_command_writes_json_summary_and_plots(tmp_path):
    assert bench_main(["--tiny", "--out", str(tmp_path), "--only", "core,dispatcher,peer"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "python", "numpy", "numba", "date"} <= set(res["machine"])
    assert set(res["sections"]) == {"core", "dispatcher", "peer"} and not res["errors"]
    text = (tmp_path / "summary.md").read_text()
    for want in ("## Core", "<= 1.4", "## Peers side by side", "not run (python3 -m bench --only router)"):
        assert want in text
    for png in ("throughput_vs_flows.png", "latency_cdf.png", "memory_vs_connections.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_router_bench_runs_or_says_why_it_skips():
    """bench/run_router.py at toy sizes: the kernel and `shardct run` each forward the
    datagrams sent at a low rate and answer echoes (no timing asserted)."""
    from bench import run_router
    reason = run_router.skip_reason()
    if reason:
        pytest.skip(reason)
    r = run_router.measure(workers=(1,), rates=(2_000,), seconds=0.5, pings=20, out=lambda *a: None)
    for name in ("kernel", "shardct_1"):
        row = r[name]["rows"][0]
        assert row["sent"] > 0 and row["received"] > 0, (name, row)
        assert r[name]["rtt_p50_us"] and r[name]["rtt_p50_us"] > 0, (name, r[name])
        assert r[name]["rtt_load_p50_us"] and r[name]["load_pps"] > 0, (name, r[name])
