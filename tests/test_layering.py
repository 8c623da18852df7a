"""The core stays pure (DESIGN.md §1): shardct/ never imports I/O, processes, clocks,
scapy or the runtime. Time and randomness come in as arguments."""
from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"socket", "zmq", "multiprocess", "multiprocessing", "subprocess", "threading",
             "time", "os", "scapy", "workers", "asyncio", "select", "signal", "random"}
CORE = Path(__file__).resolve().parents[1] / "shardct"


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_core_imports_nothing_impure():
    bad = [f"{p.name}:{ln}: import {mod}" for p in sorted(CORE.glob("*.py"))
           for ln, mod in imports(p) if mod in FORBIDDEN]
    assert not bad, "the core imports I/O or the runtime:\n" + "\n".join(bad)


def test_the_check_sees_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import time\nfrom os import path\nimport numpy\n")
    assert [m for _, m in imports(f)] == ["time", "os", "numpy"]
