"""What the measuring benchmarks share: worker launch, pipefit's engine on a given split, timed steps.

The engine is the one a run trains with (:func:`pipefit.run.engine.start_engine`: pipefit's
``PipelineEngine`` subclass, its sends, its ZeRO-1 paths), so a benchmark measures what users get.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def fresh_profile_cache() -> Iterator[str]:
    """``PIPEFIT_CACHE_DIR`` set to a new empty folder, removed afterwards: every profile the benchmark
    uses is measured in its own run, at the machine's present speed, never read from a user's cache of
    an earlier day. The worker processes it launches inherit it."""
    before = os.environ.get("PIPEFIT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="pipefit-bench-cache-") as folder:
        os.environ["PIPEFIT_CACHE_DIR"] = folder
        try:
            yield folder
        finally:
            if before is None:
                os.environ.pop("PIPEFIT_CACHE_DIR", None)
            else:
                os.environ["PIPEFIT_CACHE_DIR"] = before


def save_results(path: str | None, text: str, detail: Any = None) -> None:
    """Write a benchmark's table to ``path`` (nothing when ``None``) and, given ``detail``, every measurement
    it was made from beside it as JSON (``path`` with suffix ``.json``)."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    if detail is not None:
        Path(path).with_suffix(".json").write_text(json.dumps(detail, indent=1) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_workers(script: str | Path, args: list[str], processes: int = 2) -> int:
    """``script --worker *args`` on ``processes`` local ranks (torch.distributed.run, one thread each),
    importing this checkout's pipefit (plugin/), not whichever one is installed. Returns the exit code."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugin"), str(REPO / "benchmarks")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        str(Path(script).resolve()),
        "--worker",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:
        print(f"benchmark workers failed (exit {proc.returncode})", file=sys.stderr)
    return proc.returncode


def pipefit_engine(prepared: Any, bounds: list[int], topo: Any, schedule: str | None = None) -> Any:
    """This rank's engine for ``prepared.run`` split at ``bounds``, started as a run starts it, fed by
    its data-parallel replica's batches."""
    import torch.distributed as dist

    from pipefit.run.ds_config import build_ds_config
    from pipefit.run.engine import build_pipeline_module, start_engine

    run = prepared.run
    module = build_pipeline_module(
        prepared.skeleton, list(bounds), topo, "cpu", run.pipeline.activation_checkpoint_interval
    )
    engine, _ = start_engine(module, run, prepared.skeleton, build_ds_config(run, prepared.dp, "cpu", None), False)
    if schedule is not None:
        engine.use_schedule(schedule)
    if engine.is_first_stage() or engine.is_last_stage():
        engine.set_dataiterator(prepared.batches.iterate(topo.get_coord(dist.get_rank()).data))
    return engine


def time_steps(engine: Any, steps: int, warm_up: bool = True) -> tuple[float, dict[int, dict[str, float]]]:
    """Median seconds of ``steps`` training steps (each between two barriers; after one warm-up step unless
    ``warm_up`` is false), and per stage the mean seconds per step of every pipeline instruction (pipefit's
    tracer; the mean over a stage's replicas), as ``train.trace`` reports them and ``pipefit plan
    --calibrate`` reads them."""
    import torch.distributed as dist

    from pipefit.run.trace import Tracer

    tracer = Tracer(first=1, last=steps)
    engine.trace(tracer)
    if warm_up:
        engine.train_batch()  # allocations, first communication
    times = []
    for step in range(1, steps + 1):
        dist.barrier()
        tracer.begin_step(step)
        t0 = time.perf_counter()
        engine.train_batch()
        tracer.end_step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    spans: dict[str, float] = {}
    for name, a, b, _, depth, _ in tracer.spans:
        if depth == 0:
            spans[name] = spans.get(name, 0.0) + (b - a) / steps
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (engine.stage_id, spans))
    stages: dict[int, dict[str, float]] = {}
    replicas = collections.Counter(stage for stage, _ in every)
    for stage, found in every:
        row = stages.setdefault(stage, {})
        for name, seconds in found.items():
            row[name] = row.get(name, 0.0) + seconds / replicas[stage]
    return statistics.median(times), dict(sorted(stages.items()))
