"""The measured timeline (``train.trace``): spans of every pipeline instruction, on every rank, on one clock.

Each rank records spans (name, start, end, step) with ``time.perf_counter`` and maps them onto a
clock shared by every rank: ``time.time`` is one clock on one host, so ranks on the same host need
no correction; ranks on other hosts are shifted by the offset of their ``time.time`` to rank 0's,
measured once as each rank leaves the same barrier. At the end rank 0 gathers every rank's spans
and writes ``trace.json`` (Chrome trace / Perfetto: one process per stage, one thread per
data-parallel replica), ``trace.png`` (the measured 1F1B timeline, drawn like ``pipefit plan``'s
predicted one) and the per-stage breakdown. Recording costs two ``perf_counter`` calls and one
list append per instruction; nothing is communicated until the run ends.

A receive's span covers its wait for the peer: on a stage that is blocked, the time shows up as
communication, and the PNG shows where in the schedule the wait falls.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipefit.run.logs import write_atomic

# What each span is, for the breakdown. Spans inside another span (depth > 0, e.g. the gradient
# norm inside the optimizer step) are shown in trace.json but not counted twice.
CATEGORY = {
    "ForwardPass": "compute",
    "BackwardPass": "compute",
    "BackwardInput": "compute",  # zero-bubble B and W (pipefit.run.zero_bubble)
    "BackwardWeight": "compute",
    "LoadMicroBatch": "data",
    "SendActivation": "communication",
    "RecvActivation": "communication",
    "SendGrad": "communication",
    "RecvGrad": "communication",
    "ReduceTiedGrads": "communication",
    "ReduceGrads": "communication",
    "AggregateLoss": "communication",
    "OptimizerStep": "optimizer",
    "Logging": "logging",
    "Evaluate": "evaluation",
}
_LETTER = {"BackwardInput": "B", "BackwardWeight": "W"}
_LETTERED = ("ForwardPass", "BackwardPass", "BackwardInput", "BackwardWeight")
KINDS = ("compute", "communication", "optimizer", "data", "logging", "evaluation", "idle")
COLORS = {
    "ForwardPass": "tab:blue",
    "BackwardPass": "tab:orange",
    "BackwardInput": "tab:orange",
    "BackwardWeight": "tab:olive",
    "OptimizerStep": "tab:gray",
    "LoadMicroBatch": "tab:green",
    "communication": "tab:red",
    "Logging": "tab:purple",
}


@dataclass
class Tracer:
    """One rank's spans for the steps in ``[first, last]`` (inclusive; ``last=None``: no end)."""

    first: int = 1
    last: int | None = None
    clock: Callable[[], float] = time.perf_counter
    # (name, start, end, step, depth, micro-batch or -1); times on this rank's perf_counter.
    spans: list[tuple[str, float, float, int, int, int]] = field(default_factory=list)
    # Per traced step: (step, window start, window end): train_batch's start to the step's last span.
    steps: list[tuple[int, float, float]] = field(default_factory=list)
    step: int = 0
    active: bool = False
    depth: int = 0
    # time.time() - perf_counter() on this rank, plus the offset onto rank 0's clock.
    to_shared: float = 0.0

    def begin_step(self, step: int) -> None:
        self.step = step
        self.active = self.first <= step and (self.last is None or step <= self.last)
        if self.active:
            self.steps.append((step, self.clock(), 0.0))

    def end_step(self) -> None:
        if self.active:
            step, start, _ = self.steps[-1]
            self.steps[-1] = (step, start, self.clock())
        self.active = False

    @contextmanager
    def span(self, name: str, micro: int = -1) -> Iterator[None]:
        if not self.active:
            yield
            return
        depth = self.depth
        self.depth += 1
        t0 = self.clock()
        try:
            yield
        finally:
            self.depth = depth
            self.spans.append((name, t0, self.clock(), self.step, depth, micro))

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """``fn`` recorded as a span ``name`` while a step is traced (for per-instance method overrides)."""

        def traced(*args: Any, **kwargs: Any) -> Any:
            with self.span(name):
                return fn(*args, **kwargs)

        return traced

    def align(
        self, all_gather_object: Callable[[list[Any], Any], None], barrier: Callable[[], None], world: int
    ) -> None:
        """Map this rank's clock onto rank 0's. Collective: call on every rank once, before the steps."""
        barrier()
        now = time.time()
        self.to_shared = now - self.clock()
        every: list[Any] = [None] * world
        all_gather_object(every, (socket.gethostname(), now))
        host0, t0 = every[0]
        if socket.gethostname() != host0:  # another host's time.time(): shift by the offset seen at the barrier
            self.to_shared += t0 - now

    def records(self, rank: int, stage: int, data: int) -> dict[str, Any]:
        """This rank's spans and step windows in seconds of the shared clock."""
        s = self.to_shared
        return {
            "rank": rank,
            "stage": stage,
            "data": data,
            "spans": [(n, a + s, b + s, step, d, m) for n, a, b, step, d, m in self.spans],
            "steps": [(step, a + s, b + s) for step, a, b in self.steps],
        }


def breakdown(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per stage (its slowest data-parallel replica by window): seconds per kind, averaged over traced steps.

    ``idle``: the step window not covered by a top-level span (Python between instructions, host
    syncs, waiting outside DeepSpeed's instructions). ``step_s``: the window itself.
    """
    per_stage: dict[int, dict[str, float]] = {}
    for rec in records:
        n = max(len(rec["steps"]), 1)
        out = dict.fromkeys(KINDS, 0.0)
        for name, a, b, _, depth, _ in rec["spans"]:
            if depth == 0:
                out[CATEGORY.get(name, "compute")] += (b - a) / n
        window = sum(b - a for _, a, b in rec["steps"]) / n
        out["idle"] = max(0.0, window - sum(out[k] for k in KINDS if k != "idle"))
        out["step_s"] = window
        stage = rec["stage"]
        if stage not in per_stage or window > per_stage[stage]["step_s"]:
            per_stage[stage] = out
    return dict(sorted(per_stage.items()))


def per_instruction(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per stage: mean seconds per step of each span name (nested ones included), over its replicas."""
    out: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for rec in records:
        n = max(len(rec["steps"]), 1)
        row = out.setdefault(rec["stage"], {})
        counts[rec["stage"]] = counts.get(rec["stage"], 0) + 1
        for name, a, b, *_ in rec["spans"]:
            row[name] = row.get(name, 0.0) + (b - a) / n
    return {s: {k: v / counts[s] for k, v in sorted(row.items())} for s, row in sorted(out.items())}


def format_breakdown(table: dict[int, dict[str, float]]) -> list[str]:
    lines = []
    for stage, row in table.items():
        step = row["step_s"] or 1.0
        parts = " ".join(f"{k} {row[k]:.3f}s ({100 * row[k] / step:.1f}%)" for k in KINDS)
        lines.append(f"trace stage {stage}: step {row['step_s']:.3f}s = {parts}")
    return lines


def chrome_trace(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Chrome-trace JSON: pid = stage, tid = data-parallel replica; microseconds from the first span."""
    t0 = min((a for rec in records for _, a, *_ in rec["steps"]), default=0.0)
    events: list[dict[str, Any]] = []
    for rec in records:
        pid, tid = rec["stage"], rec["data"]
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"stage {pid}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pid,
                "tid": tid,
                "args": {"name": f"data {tid} (rank {rec['rank']})"},
            }
        )
        for step, a, b in rec["steps"]:
            events.append(_event(f"step {step}", "step", a, b, t0, pid, tid, {"step": step}))
        for name, a, b, step, depth, micro in rec["spans"]:
            args = {"step": step, **({"buffer": micro} if micro >= 0 else {})}
            events.append(
                _event(name, CATEGORY.get(name, "compute") if depth == 0 else "detail", a, b, t0, pid, tid, args)
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _event(name: str, cat: str, a: float, b: float, t0: float, pid: int, tid: int, args: dict) -> dict[str, Any]:
    return {
        "name": name,
        "cat": cat,
        "ph": "X",
        "ts": (a - t0) * 1e6,
        "dur": (b - a) * 1e6,
        "pid": pid,
        "tid": tid,
        "args": args,
    }


def write_png(records: list[dict[str, Any]], table: dict[int, dict[str, float]], path: Path, title: str) -> None:
    """One traced step (of median length) of every rank, one row per (stage, replica), like ``pipefit plan``'s
    timeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The traced step of median length (on the slowest rank), not one a busy machine stretched.
    lengths: dict[int, float] = {}
    for rec in records:
        for step, a, b in rec["steps"]:
            lengths[step] = max(lengths.get(step, 0.0), b - a)
    ordered = sorted(lengths, key=lambda k: (lengths[k], k))
    last = ordered[(len(ordered) - 1) // 2] if ordered else 0
    rows = sorted(records, key=lambda r: (r["stage"], r["data"]))
    starts = [a for rec in rows for step, a, _ in rec["steps"] if step == last]
    t0 = min(starts, default=0.0)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.6 * len(rows)))
    n = len(rows)
    for i, rec in enumerate(rows):
        y = n - 1 - i
        for name, a, b, step, depth, micro in rec["spans"]:
            if step != last:
                continue
            if depth:  # e.g. the gradient norm inside the optimizer step: a strip along the bar's foot
                ax.broken_barh([(a - t0, b - a)], (y - 0.4, 0.25), facecolors=COLORS["communication"], zorder=3)
                continue
            color = COLORS.get(name, COLORS["communication"] if CATEGORY.get(name) == "communication" else "tab:brown")
            ax.broken_barh([(a - t0, b - a)], (y - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.3)
            if name in _LETTERED and (micro >= 0 or name == "BackwardWeight"):
                ax.text((a + b) / 2 - t0, y, _LETTER.get(name, name[0]), ha="center", va="center", fontsize=6)
    labels = [f"stage {r['stage']} data {r['data']}" for r in rows][::-1]
    ax.set_yticks(range(n), labels)
    ax.set_xlabel(
        "seconds (blue: forward, orange: backward, red: send/recv/reduce, gray: optimizer with its gradient-norm "
        "collective as a red strip, white: idle)"
    )
    shares = "; ".join(
        f"stage {s}: compute {_share(r, 'compute')} comm {_share(r, 'communication')}" for s, r in table.items()
    )
    ax.set_title(f"{title}: measured step {last} (mean of the traced steps: {shares})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _share(row: dict[str, float], kind: str) -> str:
    return f"{100 * row[kind] / (row['step_s'] or 1):.0f}%"


def gather_and_write(
    tracer: Tracer, engine: Any, rank: int, folder: Path, title: str
) -> tuple[dict[int, dict[str, float]], list[dict[str, Any]]]:
    """Collective: every rank's spans to rank 0, which writes ``trace.json`` and ``trace.png``. Returns the
    per-stage breakdown and every rank's records on rank 0 (empty elsewhere)."""
    import torch.distributed as dist

    mine = tracer.records(rank, engine.stage_id, engine.grid.get_data_parallel_rank())
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank != 0:
        return {}, []
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "trace.json", json.dumps(chrome_trace(every)))
    table = breakdown(every)
    if any(rec["steps"] for rec in every):
        write_png(every, table, folder / "trace.png", title)
    return table, every


def breakdown_record(table: dict[int, dict[str, float]], instr: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of the breakdown: seconds per kind and per instruction, per stage."""
    return {
        "trace": {
            f"stage{s}": {
                **{k: round(v, 6) for k, v in row.items()},
                "instructions": {k: round(v, 6) for k, v in instr.get(s, {}).items()},
            }
            for s, row in table.items()
        }
    }
