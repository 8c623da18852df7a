"""Writes ``python3 -m bench``'s results: results.json, summary.md and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

ROUTER_ROW = "not run (python3 -m bench --only router)"

# published peer figures (shared/reference/performance-anchors.md)
PUBLISHED = [
    ("OVS userspace conntrack (C), established", "ns/pkt", 127.0,
     "ovstest test-conntrack benchmark, one flow, hot cache"),
    ("Linux netfilter with conntrack, per core", "ns/pkt", 1e9 / 1.8e6,
     "1.8 Mpps/core, XDP paper (CoNEXT 2018)"),
    ("CPython parse + dict conntrack, 100k flows Zipf", "ns/pkt", 766.0,
     "reference run, 1 core, no IPC"),
    ("VPP NAT44 single core (2017)", "ns/pkt", 1e9 / 1.42e6, "1.42 Mpps, VPP-832"),
    ("Linux nf_conntrack entry", "B/conn", 256.0, "slab object on a 6.x x86-64 kernel"),
]


def _json_default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _num(x, fmt="{:,.1f}"):
    return "n/a" if x is None else fmt.format(x)


def _ok(cond):
    return "n/a" if cond is None else ("yes" if cond else "**no**")


def _cmp(value, op, target):
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


def core_rows(c: dict) -> list[tuple]:
    """(figure, value, target, met, source) rows of the core section."""
    rows = []
    by = {int(k): v for k, v in c.get("by_flows", {}).items()}
    small = by.get(100_000) or (by[min(by)] if by else None)
    big = by.get(1_000_000)
    for n in sorted(set(by) | {1_000_000}):
        d = by.get(n)
        if d is None:
            rows.append((f"established TCP, {n:,} flows", "not run (--quick)", "", None, ""))
            continue
        z = d["established_zipf_ns"]
        rows.append((f"established TCP, Zipf, {n:,} flows, ns/pkt", _num(z),
                     "<= 60 goal, <= 100 floor", _cmp(z, "<=", 100), "issues 14, 2"))
        rows.append((f"established TCP, uniform, {n:,} flows, ns/pkt",
                     _num(d["established_uniform_ns"]), "<= 100",
                     _cmp(d["established_uniform_ns"], "<=", 100), "issue 2"))
        rows.append((f"established TCP, Zipf, MASQUERADE, {n:,} flows, ns/pkt",
                     _num(d["established_zipf_masquerade_ns"]), "", None, ""))
        u = d.get("established_uniform_masquerade_ns")
        if u is not None:
            rows.append((f"established TCP, uniform, MASQUERADE, {n:,} flows, ns/pkt", _num(u),
                         "", None, ""))
    if small is not None:
        d = small
        incache = d["established_1k_uniform_ns"]
        rows.append(("established TCP, 1k flows (in cache), ns/pkt", _num(incache), "", None, ""))
        ref = big or d
        label = "1M" if big else f"{d['flows']:,} (1M not run)"
        r = ref["established_uniform_ns"] / incache
        rows.append((f"uniform {label} / 1k in-cache", _num(r, "{:.2f}"), "<= 1.4",
                     _cmp(r, "<=", 1.4), "issue 14"))
        m = d["established_zipf_masquerade_ns"] / d["established_zipf_ns"]
        rows.append(("MASQUERADE / no NAT, established Zipf", _num(m, "{:.2f}"), "<= 1.1",
                     _cmp(m, "<=", 1.1), "issue 14"))
        rows.append(("new conns/s, no NAT (SYN, SYN/ACK, ACK)", _num(d["new_conns_per_s"], "{:,.0f}"),
                     ">= 200,000", _cmp(d["new_conns_per_s"], ">=", 200_000), "issue 2"))
        nn = d["new_conns_masquerade_per_s"]
        rows.append(("new conns/s, MASQUERADE", _num(nn, "{:,.0f}"), ">= 500,000",
                     _cmp(nn, ">=", 500_000), "issue 14"))
        rr = nn / d["new_conns_per_s"]
        rows.append(("new conns MASQUERADE / no NAT", _num(rr, "{:.3f}"), ">= 0.25",
                     _cmp(rr, ">=", 0.25), "issue 14"))
    for n, b in c.get("bytes_per_conn", {}).items():
        n = int(n)
        big_n = n == 1 << 20
        rows.append((f"table bytes per conn at {n >> 10}k", _num(b),
                     "<= 128" if big_n else "", _cmp(b, "<=", 128) if big_n else None,
                     "issue 14" if big_n else ""))
    return rows


def pool_tables(p: dict) -> list[str]:
    out = ["| profile | frames | single process Mpps | 1 worker | 2 workers | 3 workers | "
           "handoff (2 w) | verdicts same as one process |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    checks = []
    for name, r in p.items():
        if name == "replay":
            continue
        cells = {}
        hand, same = "", []
        for row in r.get("pool", []):
            if "error" in row:
                cells[row["workers"]] = "failed"
                continue
            cells[row["workers"]] = f"{row['mpps']:.2f} ({row['ratio']:.2f}x)"
            if row["workers"] == 2:
                hand = f"{row['handoff']:.1%}"
            if "same_verdicts" in row:
                same.append(f"{row['workers']}w: {'yes' if row['same_verdicts'] else 'NO'}")
        out.append(f"| {name} | {r['frames']:,} | {r['single_mpps']:.2f} | "
                   + " | ".join(cells.get(n, "") for n in (1, 2, 3))
                   + f" | {hand} | {', '.join(same) or 'not compared'} |")
        w = {row["workers"]: row for row in r.get("pool", []) if "mpps" in row}
        if name != "synthetic" and 2 in w:
            checks.append((f"{name}: 2 workers Mpps", _num(w[2]["mpps"], "{:.2f}"), ">= 2",
                           _cmp(w[2]["mpps"], ">=", 2.0), "issue 12"))
            checks.append((f"{name}: 2 workers / one process", _num(w[2]["ratio"], "{:.2f}"),
                           ">= 0.8", _cmp(w[2]["ratio"], ">=", 0.8), "issue 12"))
            if 3 in w:
                checks.append((f"{name}: 3 workers / 2 workers",
                               _num(w[3]["mpps"] / w[2]["mpps"], "{:.2f}"), ">= 1.0",
                               _cmp(w[3]["mpps"] / w[2]["mpps"], ">=", 1.0), "issue 12"))
    for rep in p.get("replay", []):
        runs = {x["workers"]: x for x in rep["runs"]}
        desc = "; ".join(f"--workers {n}: {x['wall_s']:.2f} s wall" if x["wall_s"] else
                         f"--workers {n}: {x['result']}" for n, x in runs.items())
        v = rep.get("w2_over_w1_wall")
        checks.append((f"shardct replay, {rep['frames']:,} frames ({rep['capture']}): "
                       f"--workers 2 / 1 wall time ({desc})", _num(v, "{:.2f}"), "<= 2",
                       _cmp(v, "<=", 2.0), "issue 12"))
    return out, checks


def table(rows, head=("figure", "this run", "target", "met", "from")) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| {r[0]} | {r[1]} | {r[2]} | {_ok(r[3]) if r[2] else ''} | {r[4]} |")
    return out


def peer_section(res: dict) -> list[str]:
    s = res["sections"]
    core = s.get("core", {}).get("by_flows", {})
    byf = {int(k): v for k, v in core.items()}
    c = byf.get(100_000) or (byf[min(byf)] if byf else None)
    cf = f"{c['flows']:,}" if c else ""
    out = ["| peer | its figure | shardct's, same run | shardct / peer |", "|---|---:|---:|---:|"]
    pr = s.get("peer")
    if pr:
        sh = pr["shardct"]
        for name in ("dpkt", "scapy"):
            r = pr.get(name, {})
            if "skipped" in r:
                out.append(f"| {name} + dict tracker | skipped: {r['skipped']} | | |")
                continue
            if not r:
                continue
            out.append(f"| {name}-parsed tuples + dict, established ({pr['flows']:,} flows, Zipf) "
                       f"| {r['established_ns']:,.0f} ns/pkt | {sh['established_ns']:,.0f} ns/pkt "
                       f"| {r['ratio_established']:,.0f}x faster |")
            out.append(f"| {name}-parsed tuples + dict, new conns/s | "
                       f"{r['new_conns_per_s']:,.0f} | {sh['new_conns_per_s']:,.0f} | "
                       f"{r['ratio_new_conns']:,.0f}x faster |")
    k = s.get("kernel")
    if k:
        if "skipped" in k:
            out.append(f"| Linux kernel nftables MASQUERADE (namespace router) | skipped: "
                       f"{k['skipped']} | | |")
        else:
            m, f = k["masquerade"], k["forward"]
            z = "zero loss" if m["loss"] <= 0 else f"{m['loss']:,} lost"
            out.append(f"| Linux kernel MASQUERADE, forwarded UDP rate ({z}; {k['limit']}) | "
                       f"{m['kpps']:,.0f} kpps | | |")
            sc = c["established_zipf_masquerade_ns"] if c else None
            out.append(f"| Linux kernel forwarding + conntrack + MASQUERADE, softirq CPU per "
                       f"packet (plain forwarding: {f['softirq_ns_per_packet']:,.0f}) | "
                       f"{m['softirq_ns_per_packet']:,.0f} ns | "
                       f"{_num(sc, '{:,.0f}')} ns (core, MASQUERADE, Zipf; tracking and "
                       f"rewriting only, no forwarding) | "
                       + (f"{m['softirq_ns_per_packet'] / sc:,.1f}x less CPU (not like for like) |"
                          if sc else "|"))
            out.append(f"| Linux kernel: conntrack + MASQUERADE over plain forwarding, softirq "
                       f"CPU per packet | {k['nat_softirq_ns']:+,.0f} ns | | |")
    rt = s.get("router")
    if not rt:
        out.append(f"| router zero-loss rate / added latency (`shardct run`) | {ROUTER_ROW} | | |")
    elif "skipped" in rt:
        out.append(f"| router zero-loss rate / added latency (`shardct run`) | skipped: "
                   f"{rt['skipped']} | | |")
    else:
        k = rt.get("kernel", {})
        for name, r in rt.items():
            if not name.startswith("shardct_"):
                continue
            out.append(f"| `shardct run --workers {name[8:]}`: UDP zero-loss rate (one Python "
                       f"sender) | {r['zero_loss_pps']:,} pps | {k.get('zero_loss_pps', 0):,} pps "
                       f"(kernel) | {r['zero_loss_pps'] / max(1, k.get('zero_loss_pps', 0)):.2f}x |")
            out.append(f"| `shardct run --workers {name[8:]}`: UDP echo RTT p50 / p99 | "
                       f"{r['rtt_p50_us'] or 0:,.0f} / {r['rtt_p99_us'] or 0:,.0f} µs | "
                       f"{k.get('rtt_p50_us') or 0:,.0f} / {k.get('rtt_p99_us') or 0:,.0f} µs "
                       f"(kernel) | +{r.get('added_latency_p50_us', 0):,.0f} / "
                       f"+{r.get('added_latency_p99_us', 0):,.0f} µs added |")
    for name, unit, val, src in PUBLISHED:
        if c is None:
            break
        mine = c["established_zipf_ns"] if unit == "ns/pkt" else None
        if unit == "B/conn":
            bpc = s["core"].get("bytes_per_conn", {})
            mine = bpc.get(1 << 20) or bpc.get(str(1 << 20))
            out.append(f"| {name} (published: {src}) | {val:,.0f} B | {mine:,.1f} B at 1M | "
                       f"{mine / val:.2f}x the memory |")
            continue
        out.append(f"| {name} (published: {src}) | {val:,.0f} ns/pkt | {mine:,.0f} ns/pkt "
                   f"(core, Zipf, {cf} flows) | {val / mine:.2f}x faster |")
    return out


def summary(res: dict) -> str:
    m = res["machine"]
    s = res["sections"]
    L = ["# shardct benchmark summary", "",
         f"`python3 -m bench{' --quick' if res['quick'] else ''}` on {m['date']}: {m['cpu']}, "
         f"{m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, numpy {m['numpy']}, "
         f"numba {m['numba']}; load average at start {m['load_avg_at_start'][0]:.2f} (the VM is "
         f"shared: absolute times move by tens of percent between runs, ratios in one run "
         f"less). Took {res['seconds']['total']:.0f} s"
         + (" (quick: small sizes, 1M-flow rows not run)" if res["quick"] else "") + ".", "",
         "Each figure sits beside its target; `met` says whether this run meets it. "
         "All figures are in `results.json`; the plots are beside this file.", ""]
    if res["errors"]:
        L += ["**Sections that failed:** " + "; ".join(f"{k}: {v}" for k, v in
                                                      res["errors"].items()), ""]
    if "core" in s:
        L += ["## Core (one process, `ConnTrack.process`, 64-byte frames, batches of 1024)", ""]
        L += table(core_rows(s["core"]))
        kn = next(iter(s["core"]["by_flows"].values())).get("kernel_ns", {})
        if kn:
            L += ["", "Kernel time alone (no Python between batches): " + "; ".join(
                f"{k} {v:.1f} ns/pkt" for k, v in kn.items()) + "."]
        lat = s["core"].get("batch_latency_us")
        if lat:
            L += ["", f"Latency: {lat['what']}: " + ", ".join(
                f"p{p} {v:,.0f} µs" for p, v in lat["percentiles"].items())
                + " (`latency_cdf.png`). A frame waits for at most its batch."]
        sw = s["core"].get("mpps_vs_flows_uniform")
        if sw:
            L += ["", "Throughput against concurrent flows (uniform popularity): " + ", ".join(
                f"{int(f):,} flows {v:.2f} Mpps" for f, v in sw.items())
                + " (`throughput_vs_flows.png`)."]
        L += [""]
    if "dispatcher" in s:
        d = s["dispatcher"]
        L += ["## Dispatcher (parse, hash, answer dependencies, scatter; 2k realistic profile)",
              "", "| shards | ns/pkt | Mpps | target |", "|---:|---:|---:|---|"]
        for n, v in d.items():
            L.append(f"| {n} | {v['ns']:.0f} | {v['mpps']:.2f} | 1-2 Mpps (performance anchors, "
                     f"2-vCPU goal) |")
        L += [""]
    if "pool" in s:
        tab, checks = pool_tables(s["pool"])
        L += ["## Pool (dispatcher + N worker processes, from memory; `shardct replay`)", "",
              "Mpps end to end, and the ratio to one process in the same run. "
              "(`throughput_vs_workers.png`)", ""] + tab + [""] + table(checks) + [""]
    if "peer" in s or "kernel" in s or "core" in s:
        L += ["## Peers side by side", "",
              "The dict trackers ran on the core bench's frames in this run; the kernel on a "
              "client-router-server namespace topology in this run; published figures are from "
              "`reference/performance-anchors.md` (other machines: read them as orders of "
              "magnitude).", ""] + peer_section(res) + [""]
    L += ["## How to read this", "",
          "* ns/pkt is wall time per packet through the Python API in batches of 1024, the "
          "best of a few repetitions; Mpps = 1000 / ns.",
          "* Pool figures include the dispatcher process and message passing; on 2 cores the "
          "pool shares them with the dispatcher and the sink, so it is expected to trail one "
          "process here (see bench/MODEL.md).",
          "* `--quick` sizes are small: 1M-flow rows are not run and the sizes are noisy; run "
          "`python3 -m bench` for the standard set.",
          "* Plots: `throughput_vs_workers.png`, `throughput_vs_flows.png`, "
          "`latency_cdf.png` (per-batch latency), `memory_vs_connections.png` (allocated "
          "table bytes).", ""]
    return "\n".join(L)


def make_plots(res: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = res["sections"]
    files = []

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=72)
        plt.close(fig)
        files.append(p)

    pool = s.get("pool")
    if pool:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in pool.items():
            if name == "replay":
                continue
            pts = sorted((row["workers"], row["mpps"]) for row in r.get("pool", [])
                         if "mpps" in row)
            if not pts:
                continue
            line, = ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
            ax.axhline(r["single_mpps"], ls=":", color=line.get_color())
        ax.set_xlabel("worker processes (dotted: one process)")
        ax.set_ylabel("Mpps, end to end")
        ax.set_xticks([1, 2, 3])
        ax.set_title("Pool throughput vs workers")
        ax.legend(fontsize=8)
        save(fig, "throughput_vs_workers.png")
    core = s.get("core")
    if core and core.get("mpps_vs_flows_uniform"):
        sw = sorted((int(k), v) for k, v in core["mpps_vs_flows_uniform"].items())
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([x for x, _ in sw], [y for _, y in sw], "o-", label="shardct core, uniform")
        ax.set_xscale("log")
        ax.set_xlabel("concurrent flows (established)")
        ax.set_ylabel("Mpps, one process")
        ax.set_title("Core throughput vs concurrent flows")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        save(fig, "throughput_vs_flows.png")
    if core and core.get("batch_latency_us"):
        import numpy as np
        lat = np.asarray(core["batch_latency_us"]["samples"])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat))
        ax.set_xscale("log")
        ax.set_xlabel("µs per ConnTrack.process call (1024 frames)")
        ax.set_ylabel("fraction of batches")
        ax.set_title("Per-batch latency CDF (core, established, Zipf)")
        save(fig, "latency_cdf.png")
    if core and core.get("bytes_per_conn"):
        pts = sorted((int(k), v) for k, v in core["bytes_per_conn"].items())
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([n for n, _ in pts], [n * b / 2**20 for n, b in pts], "o-",
                label="shardct table (allocated)")
        ax.plot([n for n, _ in pts], [n * 256 / 2**20 for n, _ in pts], "--",
                label="Linux nf_conntrack, 256 B/entry")
        for n, b in pts:
            ax.annotate(f"{b:.0f} B/conn", (n, n * b / 2**20), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("connections (table capacity)")
        ax.set_ylabel("MiB")
        ax.set_title("Memory vs connections")
        ax.legend(fontsize=8)
        save(fig, "memory_vs_connections.png")
    return files


def write(res: dict, out: Path, plots: bool = True) -> list[Path]:
    """results.json, summary.md and (unless disabled) the PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    p = out / "results.json"
    p.write_text(json.dumps(res, indent=1, default=_json_default) + "\n")
    files.append(p)
    p = out / "summary.md"
    p.write_text(summary(res))
    files.append(p)
    if plots:
        files += make_plots(res, out)
    return files
