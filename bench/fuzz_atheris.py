"""Byte-level mutation fuzzing of real frames (issue 15) with atheris (libFuzzer).

The seed corpus is made in code: TCP handshakes, UDP and ICMP echo (IPv4 and IPv6,
shardct.traffic) and a realistic mixed trace (shardct.profiles). libFuzzer mutates those
bytes; each input is one frame, tracked by a plain ConnTrack and by configs/demo.toml's
MASQUERADE router (and every 4th by LocalPool(2)), with a packet clock that advances.
Checked per input: one verdict, no exception, the counters account for the frame (as in
tests/core/test_fuzz_frames.py). Exceptions and violations are counted, not fatal.

    python3 bench/fuzz_atheris.py [--seconds 60] [--json out.json]

Prints one line: frames fuzzed, exceptions, invariant violations, frames/s. Without
atheris installed it says so and exits 0 (pip install atheris).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tomllib
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = {"frames": 0, "exceptions": 0, "violations": 0, "first": [], "t0": 0.0, "end": 0.0,
         "json": None, "seeds": 0}


def seed_frames() -> list[bytes]:
    """Real frames to mutate: every kind the traffic generators make."""
    from shardct.profiles import realistic
    from shardct.traffic import handshake_frames, icmp_echo_frames, udp_frames
    out = []
    for ipver in (4, 6):
        for b in (handshake_frames(3, ipver=ipver), udp_frames(2, ipver=ipver),
                  icmp_echo_frames(2, ipver=ipver)):
            out += b.frames()
    out += realistic(400, 40, seed=1).batch.frames()[:200]
    return out


def engines():
    """(plain ConnTrack, the demo MASQUERADE router, LocalPool(2) with the router)."""
    from shardct import Config, ConnTrack
    from shardct.netconf import Network
    from shardct.rules import parse_iptables_save
    from shardct.shard import LocalPool
    d = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    rules = parse_iptables_save((ROOT / "configs" / "demo.rules").read_text(), "demo.rules", 4)
    nat = dict(rules=rules, network=Network.from_dict(d), router=True)
    cfg = Config(**{**Config.from_dict(d["conntrack"]).__dict__, "max_conns": 4096})
    return (ConnTrack(Config(max_conns=4096), seed=7), ConnTrack(cfg, seed=7, **nat),
            LocalPool(2, cfg, seed=7, reap=True, **nat))


def accounted(st: dict) -> int:
    from shardct import wire
    return (st["not_ip"] + st["untracked"] + st["packets"] + st["ttl_expired"]
            + sum(st[f"invalid.{r}"] for r in wire.REASON_NAMES))


def report():
    dt = time.monotonic() - STATE["t0"]
    out = {k: STATE[k] for k in ("frames", "exceptions", "violations", "seeds")}
    out.update(seconds=round(dt, 1), frames_per_s=int(STATE["frames"] / max(dt, 1e-9)),
               first_failures=STATE["first"])
    print(f"fuzz_atheris: {out['frames']} frames fuzzed in {out['seconds']} s "
          f"({out['frames_per_s']}/s) from {out['seeds']} seed frames, "
          f"{out['exceptions']} exceptions, {out['violations']} invariant violations", flush=True)
    for f in STATE["first"]:
        print(f, flush=True)
    if STATE["json"]:
        Path(STATE["json"]).write_text(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", default=None)
    a, rest = ap.parse_known_args()
    try:
        import atheris
    except ImportError:
        print("fuzz_atheris: atheris is not installed (pip install atheris); skipped")
        return 0
    # not instrumented: the per-frame work is numba kernels, which neither take
    # atheris's bytecode hooks nor report coverage, so this is mutation without coverage
    # guidance (libFuzzer still keeps its corpus and mutates real frames)
    from shardct import PacketBatch
    from shardct import track as K
    allowed = {K.V_ACCEPT, K.V_RELATED, K.V_UNTRACKED, K.V_INVALID, K.V_DROP, K.V_NOTIP}
    plain, router, pool = engines()
    seeds = seed_frames()
    warm = PacketBatch.from_frames(seeds, ts=[10**9 - 10**6 + k for k in range(len(seeds))],
                                   ifindex=[k & 1 for k in range(len(seeds))])
    for eng in (plain, router):          # kernels loaded and the seeds' conns live
        eng.process(PacketBatch(warm.buf.copy(), warm.off, warm.length, warm.ifindex, warm.ts))
    pool.process(warm)
    corpus = tempfile.mkdtemp(prefix="shardct-fuzz-")
    for k, f in enumerate(seeds):
        Path(corpus, f"{k:04d}").write_bytes(f)
    STATE.update(t0=time.monotonic(), end=time.monotonic() + a.seconds, json=a.json,
                 seeds=len(seeds))
    clock = {"ns": 10**9}

    def fail(kind, data, what):
        STATE[kind] += 1
        if len(STATE["first"]) < 5:
            STATE["first"].append(f"{kind}: {what} on {data[:64].hex()}")

    def one(data: bytes):
        if time.monotonic() >= STATE["end"]:
            report()
            import shutil
            shutil.rmtree(corpus, ignore_errors=True)
            os._exit(0)
        clock["ns"] += 1_000_000          # 1 ms a frame: conns expire as the run goes
        STATE["frames"] += 1
        b = PacketBatch.from_frames([data], ts=clock["ns"], ifindex=[len(data) & 1])
        try:
            for name, eng in (("plain", plain), ("router", router)):
                before = eng.stats()
                v = eng.process(PacketBatch(b.buf.copy(), b.off, b.length, b.ifindex, b.ts)).verdict
                after = eng.stats()
                added = accounted(after) - accounted(before)
                if len(v) != 1 or int(v[0]) not in allowed or not (
                        1 <= added <= 1 + after["error"] - before["error"]):
                    fail("violations", data, f"{name}: verdicts {v.tolist()}, counted {added}")
            if STATE["frames"] % 4 == 0:
                before = pool.stats()
                _, v = pool.process(b)
                if len(v) != 1 or int(v[0]) not in allowed \
                        or accounted(pool.stats()) - accounted(before) < 1:
                    fail("violations", data, f"LocalPool: verdicts {v.tolist()}")
        except Exception:                    # the finding: count it, keep fuzzing
            fail("exceptions", data, traceback.format_exc(limit=3).strip().splitlines()[-1])

    atheris.Setup([sys.argv[0], corpus, "-max_len=9100", "-rss_limit_mb=4096",
                   f"-max_total_time={int(a.seconds) + 30}", *rest], one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
