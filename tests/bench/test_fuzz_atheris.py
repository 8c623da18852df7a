"""bench/fuzz_atheris.py for a few seconds: real frames mutated byte by byte, no
exception and no invariant violation (skipped without atheris: pip install atheris)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

ROOT = Path(__file__).resolve().parents[2]


def test_atheris_harness_runs_clean(tmp_path):
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz_atheris.py"), "--seconds",
                        "4", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["frames"] > 1000, r
    assert r["exceptions"] == 0 and r["violations"] == 0, r
