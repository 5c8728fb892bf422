"""The benchmark scripts import: what each takes from its siblings (``_bench``, ``partition``) exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_benchmark_script_imports() -> None:
    names = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    env_path = [str(REPO / "benchmarks"), str(REPO / "plugin")]
    found = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}\n{code}", *names],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert found.returncode == 0 and found.stdout.strip() == "ok", found.stderr[-2000:]
    assert {"partition", "layouts", "peer", "zero_bubble", "_bench"} <= set(names)
