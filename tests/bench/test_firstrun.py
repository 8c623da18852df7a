"""The first-run check reads numba's cache the way numba does, and the frame bar stays out
of non-terminal output."""
from __future__ import annotations

import importlib
import io
import sys

from workers import firstrun


def test_cold_then_warm_for_a_fresh_cached_kernel(tmp_path, monkeypatch):
    (tmp_path / "fr16mod.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    mod = importlib.import_module("fr16mod")
    try:
        assert firstrun.is_cold(mod.twice)
        assert mod.twice(21) == 42
        assert not firstrun.is_cold(mod.twice)      # the index now exists for this numba
    finally:
        sys.modules.pop("fr16mod", None)


def test_the_kernel_list_names_real_kernels():
    ks = firstrun.kernels()
    assert "shardct.track.track_batch" in ks and "shardct.wire.parse_hash_batch" in ks
    assert set(firstrun.WARM_KERNELS) <= set(ks)
    assert set(firstrun.cold_kernels()) <= set(firstrun.WARM_KERNELS)


def test_warm_cache_prints_nothing():
    if firstrun.cold_kernels():
        firstrun.warm(io.StringIO())
    out = io.StringIO()
    assert firstrun.warm(out) == {"cold": [], "compiled": [], "seconds": 0.0}
    assert out.getvalue() == ""


def test_frame_progress_is_quiet_off_a_terminal():
    out = io.StringIO()
    got = list(firstrun.frames_progress(iter([[1, 2], [3]]), stream=out))
    assert got == [[1, 2], [3]] and out.getvalue() == ""
